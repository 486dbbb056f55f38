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
#[derive(Default, utoipa::ToSchema)]
#[schema(example = json!({"grace_seconds": 3600, "retire_when_unused_seconds": 600}))]
pub struct RotateRequest {
    /// How long the replaced secret keeps working beside the new one, 0–604800 seconds (7 days).
    /// Default 0: it stops at once. A rotation always ends an earlier previous secret at once, so
    /// at most two secrets are ever live.
    #[schema(minimum = 0, maximum = 604800)]
    pub grace_seconds: Option<u32>,
    /// Retire the replaced secret before the grace period ends, once it has not been presented
    /// for this many seconds (1–604800) and the new secret has been used at least once. Needs a
    /// `grace_seconds` above 0.
    #[schema(minimum = 1, maximum = 604800)]
    pub retire_when_unused_seconds: Option<u32>,
    /// A new expiry for the credential (RFC 3339, in the future); default: it keeps its own. The
    /// organization's credential policy applies to the expiry the credential ends up with.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl RotateRequest {
    pub fn spec(&self) -> crate::ops::RotateSpec {
        crate::ops::RotateSpec {
            options: keyplane_core::RotationOptions {
                grace_seconds: self.grace_seconds.unwrap_or(0),
                retire_when_unused_seconds: self.retire_when_unused_seconds,
            },
            expires_at: self.expires_at,
        }
    }
}

impl crate::extract::FromJsonBody for RotateRequest {
    fn from_json(r: &mut crate::extract::ObjectReader, now: DateTime<Utc>) -> Option<Self> {
        use keyplane_core::error::codes;
        use keyplane_core::{FieldError, FieldPath};
        let max = keyplane_core::credential::MAX_GRACE_SECONDS;
        let grace_seconds = r.optional_u32("grace_seconds", 0, max);
        let retire = r.optional_u32("retire_when_unused_seconds", 1, max);
        let expires_at = r.expires_at("expires_at", now);
        let (grace_seconds, retire_when_unused_seconds) = (grace_seconds?, retire?);
        if retire_when_unused_seconds.is_some() && grace_seconds.unwrap_or(0) == 0 {
            r.check::<()>(Err(FieldError::new(
                FieldPath::body("retire_when_unused_seconds"),
                codes::INVALID_FORMAT,
                "needs a grace_seconds above 0: without a grace period there is nothing to retire",
            )));
            return None;
        }
        Some(Self {
            grace_seconds,
            retire_when_unused_seconds,
            expires_at: expires_at?,
        })
    }
}
