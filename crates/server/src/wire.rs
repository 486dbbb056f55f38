//! Serialization helpers every surface shares.

use chrono::{DateTime, SecondsFormat, Utc};
use keyplane_core::{Plaintext, WebhookSecret};
use serde::Serializer;

/// The only way a secret becomes JSON: the `token` field of a create or rotate response.
pub fn one_time_secret<S: Serializer>(
    secret: &Plaintext,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose_secret())
}

/// A webhook's signing secret, the same way: only in the create and rotate-secret responses.
pub fn one_time_webhook_secret<S: Serializer>(
    secret: &WebhookSecret,
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
