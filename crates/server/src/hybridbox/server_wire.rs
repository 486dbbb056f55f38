//! The server's half of the Hybridbox wire shapes (which live in
//! `keyplane_api_types::hybridbox`, shared with the client): reading request bodies field by field,
//! and building answers from `ops`.

use super::wire::{CreateAuthorizationRequest, CreateServiceAccountRequest, ServiceAccountCreated};
use crate::extract::{FromJsonBody, ObjectReader};
use chrono::{DateTime, Utc};
use keyplane_core::error::codes;
use keyplane_core::{grant, validate, FieldError, FieldPath, GrantKind, Scope, SubjectType};

impl FromJsonBody for CreateServiceAccountRequest {
    fn from_json(r: &mut ObjectReader, now: DateTime<Utc>) -> Option<Self> {
        let name = r
            .string("name")
            .and_then(|raw| r.check(validate::name(FieldPath::body("name"), &raw)));
        let expires_at = r.expires_at_utc_if_naive("expires_at", now);
        let canary = r.optional_bool("canary", false);
        Some(Self {
            name: name?,
            expires_at: expires_at?,
            canary: canary?,
        })
    }
}

impl From<crate::ops::Issued> for ServiceAccountCreated {
    fn from(issued: crate::ops::Issued) -> Self {
        Self {
            service_account: issued.credential.into(),
            token: issued.secret,
        }
    }
}

fn names<T: Copy>(all: &[T], name: fn(T) -> &'static str) -> Vec<&'static str> {
    all.iter().map(|v| name(*v)).collect()
}

impl FromJsonBody for CreateAuthorizationRequest {
    fn from_json(r: &mut ObjectReader, _now: DateTime<Utc>) -> Option<Self> {
        let grant_kind = r.choice(
            "grant_kind",
            GrantKind::parse,
            &names(&GrantKind::ALL, GrantKind::as_str),
        );
        let subject_type = r.choice(
            "subject_type",
            SubjectType::parse,
            &names(&SubjectType::ALL, SubjectType::as_str),
        );
        let subject_id = r.uuid("subject_id");
        let capability_key = match r.nullable_string("capability_key") {
            Ok(Some(raw)) => r
                .check(
                    Scope::parse(&raw)
                        .and_then(|scope| match scope.is_wildcard() {
                            true => Err("`*` is granted with grant_kind account_owner"),
                            false => Ok(scope),
                        })
                        .map_err(|message| {
                            FieldError::new(
                                FieldPath::body("capability_key"),
                                codes::INVALID_SCOPE,
                                message,
                            )
                        }),
                )
                .map(Some),
            Ok(None) => Some(None),
            Err(()) => None,
        };
        let resource_type = r.nullable_checked("resource_type", grant::resource_type);
        let resource_id = r.nullable_checked("resource_id", grant::resource_id);
        Some(Self {
            grant_kind: grant_kind?,
            subject_type: subject_type?,
            subject_id: subject_id?,
            capability_key: capability_key?,
            resource_type: resource_type?,
            resource_id: resource_id?,
        })
    }
}
