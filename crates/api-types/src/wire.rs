//! Serialization helpers every surface shares.

use chrono::{DateTime, SecondsFormat, Utc};
use keyplane_core::{
    GrantKind, LeakAction, LifetimeRule, Plaintext, RobotPermission, Scope, ScopeSet, SubjectType,
    WebhookSecret,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only way a secret becomes JSON: the `token` field of a create or rotate response.
pub fn one_time_secret<S: Serializer>(
    secret: &Plaintext,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose_secret())
}

/// A webhook's signing secret, the way [`one_time_secret`] does a token's: only in the create and
/// rotate-secret responses.
pub fn one_time_webhook_secret<S: Serializer>(
    secret: &WebhookSecret,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose_secret())
}

/// The client's side of [`one_time_webhook_secret`]: refused unless it is `whsec_<base64>`.
pub fn received_webhook_secret<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<WebhookSecret, D::Error> {
    let text = String::deserialize(deserializer)?;
    // No part of the text goes into the error: it is a secret, however malformed.
    WebhookSecret::from_stored(text)
        .ok_or_else(|| serde::de::Error::custom("the secret is not a whsec_<base64> signing key"))
}

/// RFC 3339 in UTC with `Z`; fractional seconds only when present, and then always six digits
/// (what both stores keep), as pydantic writes them: not 3 or 6 by the value (`.745Z` for
/// 745,000 µs), which a client's fixed-width parser reads one time in a thousand only.
pub fn rfc3339(at: &DateTime<Utc>) -> String {
    let precision = match at.timestamp_subsec_nanos() {
        0 => SecondsFormat::Secs,
        _ => SecondsFormat::Micros,
    };
    at.to_rfc3339_opts(precision, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_have_six_digits_or_none() {
        let at =
            |micros: i64| DateTime::from_timestamp_micros(1_900_000_000_000_000 + micros).unwrap();
        assert_eq!(rfc3339(&at(0)), "2030-03-17T17:46:40Z");
        assert_eq!(rfc3339(&at(120_000)), "2030-03-17T17:46:40.120000Z");
        assert_eq!(rfc3339(&at(745_701)), "2030-03-17T17:46:40.745701Z");
        assert_eq!(rfc3339(&at(1)), "2030-03-17T17:46:40.000001Z");
    }
}

pub fn timestamp<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(at))
}

pub fn optional_timestamp<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serializer.serialize_str(&rfc3339(at)),
        None => serializer.serialize_none(),
    }
}

/// The client's side of [`one_time_secret`]: a secret read from a create or rotate response.
pub fn received_secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Plaintext, D::Error> {
    String::deserialize(deserializer).map(Plaintext::received)
}

pub fn scope_list<S: Serializer>(scopes: &ScopeSet, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(scopes.iter().map(Scope::as_str))
}

pub fn no_scopes(scopes: &ScopeSet) -> bool {
    scopes.iter().next().is_none()
}

pub fn optional_scope<S: Serializer>(
    scope: &Option<Scope>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match scope {
        Some(scope) => serializer.serialize_str(scope.as_str()),
        None => serializer.serialize_none(),
    }
}

pub fn permission_list<S: Serializer>(
    permissions: &[RobotPermission],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(permissions.iter().map(RobotPermission::to_wire))
}

pub fn grant_kind<S: Serializer>(kind: &GrantKind, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(kind.as_str())
}

pub fn subject_type<S: Serializer>(
    subject: &SubjectType,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(subject.as_str())
}

/// A lifetime rule as a `PUT /credential-policy` body spells it.
pub fn optional_rule<S: Serializer>(
    rule: &Option<LifetimeRule>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Rule {
        max_lifetime_days: Option<u32>,
        require_expiry: bool,
        default_lifetime_days: Option<u32>,
    }
    match rule {
        Some(rule) => Rule {
            max_lifetime_days: rule.max_lifetime_days,
            require_expiry: rule.require_expiry,
            default_lifetime_days: rule.default_lifetime_days,
        }
        .serialize(serializer),
        None => serializer.serialize_none(),
    }
}

pub fn optional_leak_action<S: Serializer>(
    action: &Option<LeakAction>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match action {
        Some(action) => serializer.serialize_str(action.as_str()),
        None => serializer.serialize_none(),
    }
}

/// What every surface shows of a credential's lifecycle, beside its own fields (each view carries
/// these three, documented there).
pub struct Lifecycle {
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub previous_secret_last_used_at: Option<DateTime<Utc>>,
    pub suspended_at: Option<DateTime<Utc>>,
}

impl Lifecycle {
    /// As stored: the use cases hand surfaces credentials as of their clock
    /// ([`keyplane_core::Credential::as_of`]), so an ended previous secret is already gone.
    pub fn of(credential: &keyplane_core::Credential) -> Self {
        let previous = credential.previous_secret.as_ref();
        Self {
            previous_secret_expires_at: previous.map(|p| p.expires_at),
            previous_secret_last_used_at: previous.and_then(|p| p.last_used_at),
            suspended_at: credential.suspended_at,
        }
    }
}

/// `POST .../{id}/rotate` body, on every surface; no body at all is `{}`: the old secret stops
/// working at once.
#[derive(Default, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"grace_seconds": 3600, "retire_when_unused_seconds": 600}))]
pub struct RotateRequest {
    /// How long the replaced secret keeps working beside the new one, 0–604800 seconds (7 days).
    /// Default 0: it stops at once. A rotation always ends an earlier previous secret at once, so
    /// at most two secrets are ever live.
    #[schema(minimum = 0, maximum = 604800)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<u32>,
    /// Retire the replaced secret before the grace period ends, once it has not been presented
    /// for this many seconds and the new secret has been used at least once. Needs a
    /// `grace_seconds` above 0, and must be below it (1 to `grace_seconds` − 1): the grace period
    /// would end the replaced secret first.
    #[schema(minimum = 1, maximum = 604800)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retire_when_unused_seconds: Option<u32>,
    /// A new expiry for the credential (RFC 3339, in the future); default: it keeps its own. The
    /// organization's credential policy applies to the expiry the credential ends up with.
    #[schema(value_type = Option<String>, format = DateTime)]
    #[serde(
        serialize_with = "optional_timestamp",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<DateTime<Utc>>,
}
