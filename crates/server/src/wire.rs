//! The serializers every surface shares live in `keyplane_api_types::wire` (re-exported here);
//! this is the server's half of the shapes defined there: reading a rotate body field by field.

pub use keyplane_api_types::wire::*;

use chrono::{DateTime, Utc};

/// An answer of JSON written already (or streamed): built as it is sent, since `Bytes`' or a
/// stream's own answer would be labelled `application/octet-stream` first.
pub(crate) fn json_response(body: axum::body::Body) -> axum::response::Response {
    let mut response = axum::response::Response::new(body);
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// What a rotate body asks of `ops`.
pub fn rotate_spec(request: &RotateRequest) -> crate::ops::RotateSpec {
    crate::ops::RotateSpec {
        options: keyplane_core::RotationOptions {
            grace_seconds: request.grace_seconds.unwrap_or(0),
            retire_when_unused_seconds: request.retire_when_unused_seconds,
        },
        expires_at: request.expires_at,
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
        // The previous secret goes unused this long at the earliest when the grace period is this
        // long past the rotation, and the grace period has ended it by then: nothing to retire.
        if let (Some(retire), Some(grace)) = (retire_when_unused_seconds, grace_seconds) {
            if retire >= grace {
                r.check::<()>(Err(FieldError::new(
                    FieldPath::body("retire_when_unused_seconds"),
                    codes::OUT_OF_RANGE,
                    format!(
                        "must be below grace_seconds ({grace}): the grace period ends the previous secret before it could go unused that long"
                    ),
                )));
                return None;
            }
        }
        Some(Self {
            grace_seconds,
            retire_when_unused_seconds,
            expires_at: expires_at?,
        })
    }
}
