//! The verification endpoints' shapes: RFC 7662 introspection, whoami, and their OAuth-style
//! error `{"error", "error_description"}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// RFC 7662 answer.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct IntrospectionResponse {
    pub active: bool,
    /// `api_token` or `service_account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    /// Space-separated scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The credential id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    /// The credential's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// When the presented secret stops authenticating (seconds since the epoch): the credential's
    /// expiry, or a previous secret's grace end if sooner; absent when neither ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Which secret was presented: `current`, or `previous` during a rotation's grace period (find
    /// the callers that still use the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^(current|previous)$")]
    pub secret: Option<String>,
}

impl IntrospectionResponse {
    pub fn inactive() -> Self {
        Self {
            active: false,
            token_type: None,
            scope: None,
            sub: None,
            org_id: None,
            username: None,
            exp: None,
            iat: None,
            secret: None,
        }
    }
}

/// The calling credential, as `whoami` describes it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// `api_token` or `service_account`.
    pub kind: String,
    pub id: String,
    pub org_id: String,
    pub name: String,
    /// Its scopes (a service account's come from its grants).
    pub scopes: Vec<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<String>,
    /// Which secret was presented: `current`, or `previous` during a rotation's grace period.
    #[schema(value_type = String, pattern = "^(current|previous)$")]
    pub secret: String,
}

/// The verification endpoints' error (RFC 6749 §5.2 style).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct VerificationError {
    /// `invalid_token`, `insufficient_scope`, `invalid_request`, `rate_limited`,
    /// `temporarily_unavailable`, ...
    pub error: String,
    pub error_description: String,
}
