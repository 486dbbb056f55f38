//! Hybridbox wire shapes, field names exactly as the reference spells them.

use crate::wire::{
    grant_kind, one_time_secret, optional_scope, optional_timestamp, received_secret, subject_type,
    timestamp, Lifecycle,
};
use chrono::{DateTime, Utc};
use keyplane_core::{
    Credential, FieldError, Grant, GrantKind, GrantResource, NewGrant, Plaintext, Scope,
    SubjectType,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Request body for creating a service account.
#[derive(Serialize, ToSchema)]
#[schema(as = ServiceAccountCreate, example = json!({"name": "billing-sync", "expires_at": "2030-01-01T00:00:00Z"}))]
pub struct CreateServiceAccountRequest {
    /// Human-readable service account name (1–120 characters, at least one besides surrounding
    /// whitespace, which is trimmed).
    #[schema(min_length = 1, max_length = 120)]
    pub name: String,
    /// Optional UTC token expiry timestamp (RFC 3339; one without an offset, such as
    /// `2030-01-01T00:00:00`, is read as UTC), in the future and no later than
    /// 9999-12-31T23:59:59.999999Z; kept to the microsecond.
    #[schema(value_type = Option<String>, format = DateTime)]
    #[serde(
        serialize_with = "optional_timestamp",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<DateTime<Utc>>,
    /// A canary: a credential that looks like any other (same token format, same answer, `token`
    /// shown once) but authenticates nowhere. Grants to it are kept but never honoured. Every presentation of it, on any endpoint, is
    /// refused exactly as a revoked credential's would be and recorded as
    /// `credential.canary_triggered` (client address, user agent, route). Listed only to callers
    /// holding `auth.manage`. Default false.
    #[schema(value_type = Option<bool>, default = false)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = ServiceAccount)]
pub struct ServiceAccountView {
    pub account_id: Uuid,
    pub id: Uuid,
    pub name: String,
    /// Always `hbx_sa`.
    pub token_prefix: String,
    /// The non-secret id inside the token (`hbx_sa_<token_public_id>_...`).
    pub token_public_id: String,
    pub token_last4: String,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
    pub created_by_user_id: Option<Uuid>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by_user_id: Option<Uuid>,
    /// When the previous secret, kept by a rotation with a grace period, stops working; null when
    /// there is none (no grace period, retired, or ended).
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// The previous secret's own last use (it may lag by the usage flush period); null when there
    /// is no previous secret or it has not been used since the rotation.
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub previous_secret_last_used_at: Option<DateTime<Utc>>,
    /// Set while suspended: it authenticates nowhere until resumed.
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub suspended_at: Option<DateTime<Utc>>,
    /// True for a canary credential (authenticates nowhere; every presentation is recorded as
    /// `credential.canary_triggered`). Canaries are listed only to callers holding `auth.manage`.
    pub canary: bool,
}

impl From<Credential> for ServiceAccountView {
    fn from(credential: Credential) -> Self {
        let lifecycle = Lifecycle::of(&credential);
        let Credential {
            id,
            tenant_id,
            kind: _,
            name,
            secret_hash: _,
            display,
            scopes: _,
            permissions: _,
            expires_at,
            created_at,
            updated_at,
            last_used_at,
            revoked_at,
            created_by_user_id,
            // Not on the platforms' shapes, which the references fix; `admin access-review` shows it.
            created_by: _,
            revoked_by_user_id,
            suspended_at: _,
            rotated_at: _,
            previous_secret: _,
            expiry_notice_days: _,
            canary,
        } = credential;
        Self {
            account_id: tenant_id.as_uuid(),
            id: id.as_uuid(),
            name,
            token_prefix: display.prefix,
            token_public_id: display.public_id.unwrap_or_default(),
            token_last4: display.last4,
            created_at,
            updated_at,
            created_by_user_id: created_by_user_id.map(|u| u.as_uuid()),
            expires_at,
            last_used_at,
            revoked_at,
            revoked_by_user_id: revoked_by_user_id.map(|u| u.as_uuid()),
            previous_secret_expires_at: lifecycle.previous_secret_expires_at,
            previous_secret_last_used_at: lifecycle.previous_secret_last_used_at,
            suspended_at: lifecycle.suspended_at,
            canary,
        }
    }
}

/// Create and rotate answer: the service account and its bearer token, shown only this once.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = ServiceAccountWithToken)]
pub struct ServiceAccountCreated {
    #[serde(flatten)]
    pub service_account: ServiceAccountView,
    /// Plaintext bearer token. Store it now; it is never returned again.
    #[serde(
        serialize_with = "one_time_secret",
        deserialize_with = "received_secret"
    )]
    #[schema(value_type = String)]
    pub token: Plaintext,
}

// `GrantKindName` and `SubjectTypeName` only give the document its enums: the fields are read and
// written through the domain's `GrantKind` and `SubjectType`.

/// What a grant gives: one capability, everything in the account, or everything everywhere.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = GrantKind)]
pub enum GrantKindName {
    Capability,
    AccountOwner,
    SuperAdmin,
}

/// Who a grant is given to.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = SubjectType)]
pub enum SubjectTypeName {
    User,
    Group,
    ServiceAccount,
}

/// Request body for granting a right.
#[derive(Serialize, ToSchema)]
#[schema(as = AuthorizationCreate, example = json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": "0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f", "capability_key": "auth.manage", "resource_type": null, "resource_id": null}))]
pub struct CreateAuthorizationRequest {
    /// `capability`, `account_owner` or `super_admin`.
    #[schema(value_type = GrantKindName)]
    #[serde(serialize_with = "grant_kind")]
    pub grant_kind: GrantKind,
    /// `user`, `group` or `service_account`.
    #[schema(value_type = SubjectTypeName)]
    #[serde(serialize_with = "subject_type")]
    pub subject_type: SubjectType,
    pub subject_id: Uuid,
    /// Required for `capability` grants (e.g. `auth.manage`), null otherwise.
    #[schema(value_type = Option<String>)]
    #[serde(serialize_with = "optional_scope")]
    pub capability_key: Option<Scope>,
    /// Narrows the grant to one resource; such a grant confers no account-wide right. 1–64
    /// characters of `[a-z0-9_.:-]` starting with a lower-case letter (`project`).
    #[schema(min_length = 1, max_length = 64, pattern = "^[a-z][a-z0-9_.:-]*$")]
    pub resource_type: Option<String>,
    /// 1–255 printable ASCII characters without spaces (a UUID, a slug, `team-a/app`).
    #[schema(min_length = 1, max_length = 255, pattern = "^[!-~]+$")]
    pub resource_id: Option<String>,
}

impl CreateAuthorizationRequest {
    pub fn into_domain(self) -> Result<NewGrant, FieldError> {
        let grant = NewGrant {
            kind: self.grant_kind,
            subject_type: self.subject_type,
            subject_id: self.subject_id,
            capability_key: self.capability_key,
            resource: GrantResource {
                resource_type: self.resource_type,
                resource_id: self.resource_id,
            },
        };
        grant.check_shape()?;
        Ok(grant)
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = Authorization)]
pub struct AuthorizationView {
    pub id: Uuid,
    #[schema(value_type = GrantKindName)]
    pub grant_kind: String,
    #[schema(value_type = SubjectTypeName)]
    pub subject_type: String,
    pub subject_id: Uuid,
    pub capability_key: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<Grant> for AuthorizationView {
    fn from(grant: Grant) -> Self {
        let Grant {
            id,
            tenant_id: _,
            kind,
            subject_type,
            subject_id,
            capability_key,
            resource,
            created_at,
            revoked_at,
            created_by_user_id: _,
            // Not on the platforms' shapes, which the references fix; `admin access-review` shows it.
            created_by: _,
        } = grant;
        Self {
            id: id.as_uuid(),
            grant_kind: kind.as_str().to_string(),
            subject_type: subject_type.as_str().to_string(),
            subject_id,
            capability_key: capability_key.map(|k| k.as_str().to_string()),
            resource_type: resource.resource_type,
            resource_id: resource.resource_id,
            created_at: Some(created_at),
            revoked_at,
        }
    }
}

/// `{"detail": "..."}`: every error except validation.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = ErrorMessage)]
pub struct ErrorMessage {
    pub detail: String,
}

/// `{"detail": [...]}`: 422 validation errors.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = HTTPValidationError)]
pub struct ValidationErrorBody {
    pub detail: Vec<ValidationErrorItem>,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = ValidationError)]
pub struct ValidationErrorItem {
    /// Where: `["body", "name"]`, `["query", "include_revoked"]`, `["path", "account_id"]`.
    #[schema(value_type = Vec<LocItem>)]
    pub loc: Vec<serde_json::Value>,
    pub msg: String,
    #[serde(rename = "type")]
    pub error_type: String,
}

/// One step of a `loc`: a location or field name, or an index into a list.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LocItem {
    Name(String),
    Index(u32),
}
