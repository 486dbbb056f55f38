//! Serialization helpers every surface shares.

use chrono::{DateTime, SecondsFormat, Utc};
use keyplane_core::{GrantKind, Plaintext, RobotPermission, Scope, ScopeSet, SubjectType};
use serde::{Deserialize, Deserializer, Serializer};

/// The only way a secret becomes JSON: the `token` field of a create or rotate response.
pub fn one_time_secret<S: Serializer>(
    secret: &Plaintext,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose_secret())
}

/// RFC 3339 in UTC with `Z`, fractional seconds only when present.
pub fn rfc3339(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
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
