//! Aether wire shapes, one struct per shape, field names exactly as the reference spells them.

use crate::extract::{FromJsonBody, ObjectReader};
use crate::wire::{one_time_secret, optional_timestamp, timestamp};
use chrono::{DateTime, Utc};
use keyplane_core::{validate, Credential, FieldPath, Plaintext, ScopeSet};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// `POST /api-tokens` body.
#[derive(ToSchema)]
pub struct CreateApiTokenRequest {
    /// 1–120 characters after trimming, no control characters; unique among the org's live tokens.
    pub name: String,
    /// Capability keys (`api_tokens:read`, `api_tokens:write`, `registry:read`, `registry:write`,
    /// `auth.manage`, `audit:read`, `tokens:verify`, `*`) or other scopes carried through to
    /// verification. At most the caller's own scopes. Default: none.
    #[schema(value_type = Option<Vec<String>>)]
    pub scopes: ScopeSet,
    /// Optional expiry timestamp (RFC 3339), in the future.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
}

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
        let expires_at = match r.nullable_string("expires_at") {
            Ok(Some(raw)) => r
                .check(validate::expires_at(
                    FieldPath::body("expires_at"),
                    &raw,
                    now,
                ))
                .map(Some),
            Ok(None) => Some(None),
            Err(()) => None,
        };
        Some(Self {
            name: name?,
            scopes: scopes?,
            expires_at: expires_at?,
        })
    }
}

/// An API token as listed: never its secret.
#[derive(Serialize, ToSchema)]
#[schema(as = ApiToken)]
pub struct ApiTokenView {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    /// The non-secret token prefix, for display/identification.
    pub prefix: String,
    pub scopes: Vec<String>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
}

impl From<Credential> for ApiTokenView {
    fn from(credential: Credential) -> Self {
        let Credential {
            id,
            tenant_id,
            kind: _,
            name,
            secret_hash: _,
            display,
            scopes,
            expires_at,
            created_at,
            updated_at: _,
            last_used_at,
            revoked_at: _,
            created_by_user_id: _,
            revoked_by_user_id: _,
        } = credential;
        Self {
            id: id.as_uuid(),
            org_id: tenant_id.as_uuid(),
            name,
            prefix: display.prefix,
            scopes: scopes.to_strings(),
            last_used_at,
            expires_at,
            created_at,
        }
    }
}

/// Create and rotate answer: the token plus its raw secret, shown only this once.
#[derive(Serialize, ToSchema)]
#[schema(as = ApiTokenWithSecret)]
pub struct ApiTokenCreated {
    #[serde(flatten)]
    pub api_token: ApiTokenView,
    /// The raw API token (aether_<hex>). Shown only once, at creation (or rotation).
    #[serde(serialize_with = "one_time_secret")]
    #[schema(value_type = String)]
    pub token: Plaintext,
}

impl From<crate::ops::Issued> for ApiTokenCreated {
    fn from(issued: crate::ops::Issued) -> Self {
        Self {
            api_token: issued.credential.into(),
            token: issued.secret,
        }
    }
}

#[derive(Serialize, ToSchema)]
#[schema(as = ApiTokenList)]
pub struct ApiTokenPage {
    pub items: Vec<ApiTokenView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<Uuid>,
}

/// The Aether error envelope.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorEnvelope {
    pub error: ErrorObject,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorObject {
    /// A stable, machine-readable error code.
    pub code: String,
    pub message: String,
    pub details: Option<Vec<ErrorDetail>>,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// JSON path of the field, e.g. `scopes[1]`.
    pub field: String,
    pub code: String,
    pub message: String,
}
