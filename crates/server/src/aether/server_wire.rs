//! The server's half of the Aether wire shapes (which live in `keyplane_api_types::aether`, shared
//! with the client): reading request bodies field by field, and building answers from `ops`.

use super::wire::{
    ApiTokenCreated, CreateApiTokenRequest, CreateRobotAccountRequest, RobotAccountCreated,
    UpdateRobotAccountRequest,
};
use crate::extract::{FromJsonBody, ObjectReader};
use chrono::{DateTime, Utc};
use keyplane_core::registry::{self, RegistryAction};
use keyplane_core::{validate, FieldPath, RobotPermission, ScopeSet};

impl FromJsonBody for CreateApiTokenRequest {
    fn from_json(r: &mut ObjectReader, now: DateTime<Utc>) -> Option<Self> {
        let name = r
            .string("name")
            .and_then(|raw| r.check(validate::name(FieldPath::body("name"), &raw)));
        let scopes = match r.string_list("scopes") {
            Ok(Some(raw)) => r.check_all(ScopeSet::parse_list(&FieldPath::body("scopes"), &raw)),
            Ok(None) => Some(ScopeSet::empty()),
            Err(()) => None,
        };
        let expires_at = r.expires_at("expires_at", now);
        Some(Self {
            name: name?,
            scopes: scopes?,
            expires_at: expires_at?,
        })
    }
}

fn permissions_field(r: &mut ObjectReader, required: bool) -> Option<Vec<RobotPermission>> {
    let path = FieldPath::body("permissions");
    match r.string_list("permissions") {
        Ok(Some(raw)) => r.check_all(RobotPermission::parse_list(&path, &raw)),
        Ok(None) if required => r.check(Err(keyplane_core::FieldError::new(
            path,
            keyplane_core::error::codes::REQUIRED,
            "is required",
        ))),
        Ok(None) => Some(vec![RobotPermission {
            action: RegistryAction::Pull,
            repository: None,
        }]),
        Err(()) => None,
    }
}

impl FromJsonBody for CreateRobotAccountRequest {
    fn from_json(r: &mut ObjectReader, _now: DateTime<Utc>) -> Option<Self> {
        let name = r
            .string("name")
            .and_then(|raw| r.check(registry::robot_name(FieldPath::body("name"), &raw)));
        let permissions = permissions_field(r, false);
        Some(Self {
            name: name?,
            permissions: permissions?,
        })
    }
}

impl FromJsonBody for UpdateRobotAccountRequest {
    fn from_json(r: &mut ObjectReader, _now: DateTime<Utc>) -> Option<Self> {
        Some(Self {
            permissions: permissions_field(r, true)?,
        })
    }
}

impl From<crate::ops::Issued> for ApiTokenCreated {
    fn from(issued: crate::ops::Issued) -> Self {
        Self {
            api_token: issued.credential.into(),
            token: issued.secret,
        }
    }
}

impl From<crate::ops::Issued> for RobotAccountCreated {
    fn from(issued: crate::ops::Issued) -> Self {
        Self {
            robot_account: issued.credential.into(),
            token: issued.secret,
        }
    }
}
