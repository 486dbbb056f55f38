//! The server's half of the Aether wire shapes (which live in `keyplane_api_types::aether`, shared
//! with the client): reading request bodies field by field, and building answers from `ops`.

use super::wire::{
    ApiTokenCreated, CreateApiTokenRequest, CreateRobotAccountRequest, CredentialPolicyView,
    PolicyExceeding, PutCredentialPolicyRequest, RobotAccountCreated, UpdateRobotAccountRequest,
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
        let canary = r.optional_bool("canary", false);
        Some(Self {
            name: name?,
            scopes: scopes?,
            expires_at: expires_at?,
            canary: canary?,
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
    fn from_json(r: &mut ObjectReader, now: DateTime<Utc>) -> Option<Self> {
        let name = r
            .string("name")
            .and_then(|raw| r.check(registry::robot_name(FieldPath::body("name"), &raw)));
        let permissions = permissions_field(r, false);
        let expires_at = r.expires_at("expires_at", now);
        let canary = r.optional_bool("canary", false);
        Some(Self {
            name: name?,
            permissions: permissions?,
            expires_at: expires_at?,
            canary: canary?,
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

/// The policy view of what `ops` reports.
pub fn policy_view(
    org: keyplane_core::TenantId,
    report: crate::ops::PolicyReport,
) -> CredentialPolicyView {
    let policy = &report.policy;
    let count = |kind| {
        report
            .exceeding
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    };
    CredentialPolicyView {
        org_id: org.as_uuid(),
        all: (&policy.all).into(),
        api_tokens: policy.api_tokens.as_ref().map(Into::into),
        service_accounts: policy.service_accounts.as_ref().map(Into::into),
        robot_accounts: policy.robot_accounts.as_ref().map(Into::into),
        on_leak: policy.on_leak.as_str().to_string(),
        updated_at: report.updated_at,
        exceeding: PolicyExceeding {
            api_tokens: count(keyplane_core::CredentialKind::ApiToken),
            service_accounts: count(keyplane_core::CredentialKind::ServiceAccount),
            robot_accounts: count(keyplane_core::CredentialKind::RobotAccount),
        },
    }
}

fn lifetime_rule(
    r: &mut ObjectReader,
    key: &'static str,
) -> Option<Option<keyplane_core::LifetimeRule>> {
    let max = keyplane_core::policy::MAX_POLICY_DAYS;
    let mut nested = match r.nested_object(key) {
        Ok(Some(nested)) => nested,
        Ok(None) => return Some(None),
        Err(()) => return None,
    };
    let max_lifetime_days = nested.optional_u32("max_lifetime_days", 1, max);
    let require_expiry = nested.optional_bool("require_expiry", false);
    let default_lifetime_days = nested.optional_u32("default_lifetime_days", 1, max);
    let rule = match (max_lifetime_days, require_expiry, default_lifetime_days) {
        (Some(max_lifetime_days), Some(require_expiry), Some(default_lifetime_days)) => {
            let rule = keyplane_core::LifetimeRule {
                max_lifetime_days,
                require_expiry,
                default_lifetime_days,
            };
            let problems = rule.check(&FieldPath::body(key));
            let ok = problems.is_empty();
            nested.check_all::<()>(if ok { Ok(()) } else { Err(problems) });
            ok.then_some(rule)
        }
        _ => None,
    };
    r.absorb(nested);
    rule.map(Some)
}

impl FromJsonBody for PutCredentialPolicyRequest {
    fn from_json(r: &mut ObjectReader, _now: DateTime<Utc>) -> Option<Self> {
        let all = lifetime_rule(r, "all");
        let api_tokens = lifetime_rule(r, "api_tokens");
        let service_accounts = lifetime_rule(r, "service_accounts");
        let robot_accounts = lifetime_rule(r, "robot_accounts");
        let on_leak = match r.nullable_string("on_leak") {
            Ok(None) => Some(None),
            Ok(Some(text)) => match keyplane_core::LeakAction::parse(&text) {
                Some(action) => Some(Some(action)),
                None => {
                    r.check::<()>(Err(keyplane_core::FieldError::new(
                        FieldPath::body("on_leak"),
                        keyplane_core::error::codes::INVALID_CHOICE,
                        "must be one of: revoke, suspend",
                    )));
                    None
                }
            },
            Err(()) => None,
        };
        Some(Self {
            all: all?,
            api_tokens: api_tokens?,
            service_accounts: service_accounts?,
            robot_accounts: robot_accounts?,
            on_leak: on_leak?,
        })
    }
}
