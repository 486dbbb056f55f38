//! Aether wire shapes, one struct per shape, field names exactly as the reference spells them.

use crate::wire::{
    no_scopes, one_time_secret, optional_leak_action, optional_rule, optional_timestamp,
    permission_list, received_secret, scope_list, timestamp, Lifecycle,
};
use chrono::{DateTime, Utc};
use keyplane_core::{Credential, Plaintext, Registry, RobotPermission, ScopeSet};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// `POST /api-tokens` body.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"name": "ci-deploy", "scopes": ["api_tokens:read", "deploy:prod"], "expires_at": "2030-01-01T00:00:00Z"}))]
pub struct CreateApiTokenRequest {
    /// 1–120 characters (at least one besides surrounding whitespace, which is trimmed), without control, format (bidi, zero-width) or line
    /// separator characters; unique among the org's live tokens.
    #[schema(min_length = 1, max_length = 120)]
    pub name: String,
    /// Capability keys (`api_tokens:read`, `api_tokens:write`, `registry:read`, `registry:write`,
    /// `auth.manage`, `audit:read`, `tokens:verify`, `webhooks:manage`, `*`) or other scopes carried through to
    /// verification. At most the caller's own scopes, at most 64, each 1–128 characters of
    /// `[A-Za-z0-9_.:/-]` starting with a letter or digit, or `*`. Default: none.
    #[schema(value_type = Option<Vec<String>>, max_items = 64)]
    // Empty means none, which is also what leaving the field out means.
    #[serde(serialize_with = "scope_list", skip_serializing_if = "no_scopes")]
    pub scopes: ScopeSet,
    /// Optional expiry timestamp (RFC 3339), in the future and no later than
    /// 9999-12-31T23:59:59.999999Z; kept to the microsecond.
    #[schema(value_type = Option<String>, format = DateTime)]
    #[serde(
        serialize_with = "optional_timestamp",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<DateTime<Utc>>,
    /// A canary: a credential that looks like any other (same token format, same answer, `token`
    /// shown once) but authenticates nowhere. Every presentation of it, on any endpoint, is
    /// refused exactly as a revoked credential's would be and recorded as
    /// `credential.canary_triggered` (client address, user agent, route). Listed only to callers
    /// holding `api_tokens:write`. Default false.
    #[schema(value_type = Option<bool>, default = false)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
}

/// An API token as listed: never its secret.
#[derive(Serialize, Deserialize, ToSchema)]
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
    /// `credential.canary_triggered`). Canaries are listed only to callers holding `api_tokens:write`.
    pub canary: bool,
}

impl From<Credential> for ApiTokenView {
    fn from(credential: Credential) -> Self {
        let lifecycle = Lifecycle::of(&credential);
        let Credential {
            id,
            tenant_id,
            kind: _,
            name,
            secret_hash: _,
            display,
            scopes,
            permissions: _,
            expires_at,
            created_at,
            updated_at: _,
            last_used_at,
            revoked_at: _,
            created_by_user_id: _,
            // Not on the platforms' shapes, which the references fix; `admin access-review` shows it.
            created_by: _,
            revoked_by_user_id: _,
            suspended_at: _,
            rotated_at: _,
            previous_secret: _,
            expiry_notice_days: _,
            canary,
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
            previous_secret_expires_at: lifecycle.previous_secret_expires_at,
            previous_secret_last_used_at: lifecycle.previous_secret_last_used_at,
            suspended_at: lifecycle.suspended_at,
            canary,
        }
    }
}

/// Create and rotate answer: the token plus its raw secret, shown only this once.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = ApiTokenWithSecret)]
pub struct ApiTokenCreated {
    #[serde(flatten)]
    pub api_token: ApiTokenView,
    /// The raw API token (aether_<hex>). Shown only once, at creation (or rotation).
    #[serde(
        serialize_with = "one_time_secret",
        deserialize_with = "received_secret"
    )]
    #[schema(value_type = String)]
    pub token: Plaintext,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = ApiTokenList)]
pub struct ApiTokenPage {
    pub items: Vec<ApiTokenView>,
    /// Pass as `cursor` to get the next page; null on the last page (always present).
    #[schema(required = true)]
    pub next_cursor: Option<Uuid>,
}

/// The Aether error envelope.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorEnvelope {
    pub error: ErrorObject,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorObject {
    /// A stable, machine-readable error code.
    pub code: String,
    pub message: String,
    pub details: Option<Vec<ErrorDetail>>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// JSON path of the field, e.g. `scopes[1]`.
    pub field: String,
    pub code: String,
    pub message: String,
}

/// `POST /registry/robot-accounts` body.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"name": "ci", "permissions": ["pull", "push:team-a/*"]}))]
pub struct CreateRobotAccountRequest {
    /// `^[a-z0-9]+(?:[._-][a-z0-9]+)*$`, unique among the org's live robots. The registry login
    /// name is `robot$<harbor_project>+<name>` (`harbor_project` from `GET /registry`).
    #[schema(
        min_length = 1,
        max_length = 120,
        pattern = r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$"
    )]
    pub name: String,
    /// `pull`, `push`, `delete`, each optionally narrowed to repositories of the project matching a
    /// glob: `push:team-a/*` (`*` within one path segment, `**` across). 1–50 of them, each
    /// listed once. Default `["pull"]`.
    #[schema(value_type = Option<Vec<String>>, min_items = 1, max_items = 50)]
    // Left out when empty, so that the server applies its default (`["pull"]`).
    #[serde(
        serialize_with = "permission_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub permissions: Vec<RobotPermission>,
    /// Optional expiry (RFC 3339), in the future and no later than 9999-12-31T23:59:59.999999Z;
    /// the organization's credential policy may require one or fill in its default lifetime.
    #[schema(value_type = Option<String>, format = DateTime)]
    #[serde(
        serialize_with = "optional_timestamp",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<DateTime<Utc>>,
    /// A canary: a credential that looks like any other (same token format, same answer, `token`
    /// shown once) but authenticates nowhere. Every presentation of it, on any endpoint (a registry login included), is
    /// refused exactly as a revoked credential's would be and recorded as
    /// `credential.canary_triggered` (client address, user agent, route). Listed only to callers
    /// holding `registry:write`. Default false.
    #[schema(value_type = Option<bool>, default = false)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
}

/// `PUT /registry/robot-accounts/{id}` body.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"permissions": ["pull"]}))]
pub struct UpdateRobotAccountRequest {
    /// The robot's new permissions (replacing the old ones): 1–50, each listed once.
    #[schema(value_type = Vec<String>, min_items = 1, max_items = 50)]
    #[serde(serialize_with = "permission_list")]
    pub permissions: Vec<RobotPermission>,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = RobotAccount)]
pub struct RobotAccountView {
    pub id: Uuid,
    pub org_id: Uuid,
    /// The short name; the registry login name is `robot$<harbor_project>+<name>`.
    pub name: String,
    pub permissions: Vec<String>,
    /// Always null: no Harbor backend is configured.
    pub harbor_id: Option<i64>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
    /// When the robot's secret stops working; null: never.
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
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
    /// `credential.canary_triggered`). Canaries are listed only to callers holding `registry:write`.
    pub canary: bool,
}

impl From<Credential> for RobotAccountView {
    fn from(credential: Credential) -> Self {
        let lifecycle = Lifecycle::of(&credential);
        let Credential {
            id,
            tenant_id,
            kind: _,
            name,
            secret_hash: _,
            display: _,
            scopes: _,
            permissions,
            expires_at,
            created_at,
            updated_at,
            last_used_at,
            revoked_at: _,
            created_by_user_id: _,
            // Not on the platforms' shapes, which the references fix; `admin access-review` shows it.
            created_by: _,
            revoked_by_user_id: _,
            suspended_at: _,
            rotated_at: _,
            previous_secret: _,
            expiry_notice_days: _,
            canary,
        } = credential;
        Self {
            id: id.as_uuid(),
            org_id: tenant_id.as_uuid(),
            name,
            permissions: permissions.iter().map(RobotPermission::to_wire).collect(),
            harbor_id: None,
            last_used_at,
            created_at,
            updated_at,
            expires_at,
            previous_secret_expires_at: lifecycle.previous_secret_expires_at,
            previous_secret_last_used_at: lifecycle.previous_secret_last_used_at,
            suspended_at: lifecycle.suspended_at,
            canary,
        }
    }
}

/// Create and rotate answer: the robot and its secret, shown only this once.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = RobotAccountWithToken)]
pub struct RobotAccountCreated {
    #[serde(flatten)]
    pub robot_account: RobotAccountView,
    /// The one-time robot account secret: the registry password for
    /// `robot$<harbor_project>+<name>`.
    #[serde(
        serialize_with = "one_time_secret",
        deserialize_with = "received_secret"
    )]
    #[schema(value_type = String)]
    pub token: Plaintext,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = RobotAccountList)]
pub struct RobotAccountPage {
    pub items: Vec<RobotAccountView>,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = Registry)]
pub struct RegistryView {
    pub id: Uuid,
    pub org_id: Uuid,
    /// The project robots log in to: `robot$<harbor_project>+<name>`; repositories live under
    /// `<endpoint>/<harbor_project>/`.
    pub harbor_project: String,
    /// The registry address for `docker login` / `skopeo`.
    pub endpoint: String,
    pub enabled: bool,
    /// Not enforced by keyplane; -1 means unlimited.
    pub quota_gb: i64,
    /// Unknown without a Harbor backend: null.
    pub used_gb: Option<f64>,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
}

impl RegistryView {
    pub fn new(registry: Registry, endpoint: &str) -> Self {
        let Registry {
            id,
            tenant_id,
            project,
            quota_gb,
            created_at,
            updated_at,
        } = registry;
        Self {
            id,
            org_id: tenant_id.as_uuid(),
            harbor_project: project,
            endpoint: endpoint.to_string(),
            enabled: true,
            quota_gb,
            used_gb: None,
            created_at,
            updated_at,
        }
    }
}

/// `GET /registry` answer: the registry, or `{"enabled": false}` when none is provisioned.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RegistryState {
    Enabled(RegistryView),
    Disabled(RegistryDisabled),
}

/// `GET /registry` when no registry is provisioned.
#[derive(Serialize, Deserialize, ToSchema)]
// No other property, so an enabled registry never also reads as this shape.
#[serde(deny_unknown_fields)]
pub struct RegistryDisabled {
    /// Always false.
    pub enabled: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RegistryCredentials {
    /// `robot$<harbor_project>+default`.
    pub username: String,
    /// Shown once.
    #[serde(
        serialize_with = "one_time_secret",
        deserialize_with = "received_secret"
    )]
    #[schema(value_type = String)]
    pub password: Plaintext,
}

/// `POST /registry` answer.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RegistryEnabled {
    pub registry: RegistryView,
    pub credentials: RegistryCredentials,
}

/// Lifetime rules for one kind of credential, or for all.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = LifetimeRule)]
pub struct LifetimeRuleView {
    /// No credential may expire later than this many days after it is created or rotated
    /// (1–36500); null: no limit.
    #[schema(minimum = 1, maximum = 36500)]
    pub max_lifetime_days: Option<u32>,
    /// Every credential must have an `expires_at` (given, or filled from `default_lifetime_days`).
    pub require_expiry: bool,
    /// The lifetime, in days, of a credential created without `expires_at` (1–36500, at most
    /// `max_lifetime_days`); null: none is filled in.
    #[schema(minimum = 1, maximum = 36500)]
    pub default_lifetime_days: Option<u32>,
}

impl From<&keyplane_core::LifetimeRule> for LifetimeRuleView {
    fn from(rule: &keyplane_core::LifetimeRule) -> Self {
        Self {
            max_lifetime_days: rule.max_lifetime_days,
            require_expiry: rule.require_expiry,
            default_lifetime_days: rule.default_lifetime_days,
        }
    }
}

/// How many live credentials of each kind break the policy now (it does not change them).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PolicyExceeding {
    pub api_tokens: u64,
    pub service_accounts: u64,
    pub robot_accounts: u64,
}

/// The organization's credential policy.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = CredentialPolicy)]
pub struct CredentialPolicyView {
    pub org_id: Uuid,
    /// The rule for every kind without its own.
    pub all: LifetimeRuleView,
    /// API tokens' own rule, replacing `all` for them; null: `all` applies.
    pub api_tokens: Option<LifetimeRuleView>,
    pub service_accounts: Option<LifetimeRuleView>,
    pub robot_accounts: Option<LifetimeRuleView>,
    /// What a reported leak does to the credential: `revoke` (default) or `suspend`.
    #[schema(value_type = String, pattern = "^(revoke|suspend)$")]
    pub on_leak: String,
    /// When the policy was last set; null: never (this is the default policy).
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub updated_at: Option<DateTime<Utc>>,
    pub exceeding: PolicyExceeding,
}

/// One lifetime rule in a `PUT /credential-policy` body; absent fields take their defaults.
#[derive(Serialize, ToSchema)]
#[schema(as = LifetimeRuleInput)]
pub struct LifetimeRuleInput {
    #[schema(minimum = 1, maximum = 36500)]
    pub max_lifetime_days: Option<u32>,
    pub require_expiry: Option<bool>,
    #[schema(minimum = 1, maximum = 36500)]
    pub default_lifetime_days: Option<u32>,
}

/// `PUT /credential-policy` body: the whole policy (absent fields take their defaults: no rules,
/// leaks revoke).
#[derive(Serialize, ToSchema)]
#[schema(as = CredentialPolicyUpdate, example = json!({"all": {"max_lifetime_days": 90, "require_expiry": true, "default_lifetime_days": 30}, "robot_accounts": {"max_lifetime_days": 365}, "on_leak": "revoke"}))]
pub struct PutCredentialPolicyRequest {
    #[schema(value_type = Option<LifetimeRuleInput>)]
    #[serde(
        serialize_with = "optional_rule",
        skip_serializing_if = "Option::is_none"
    )]
    pub all: Option<keyplane_core::LifetimeRule>,
    #[schema(value_type = Option<LifetimeRuleInput>)]
    #[serde(
        serialize_with = "optional_rule",
        skip_serializing_if = "Option::is_none"
    )]
    pub api_tokens: Option<keyplane_core::LifetimeRule>,
    #[schema(value_type = Option<LifetimeRuleInput>)]
    #[serde(
        serialize_with = "optional_rule",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_accounts: Option<keyplane_core::LifetimeRule>,
    #[schema(value_type = Option<LifetimeRuleInput>)]
    #[serde(
        serialize_with = "optional_rule",
        skip_serializing_if = "Option::is_none"
    )]
    pub robot_accounts: Option<keyplane_core::LifetimeRule>,
    /// `revoke` (default) or `suspend`.
    #[schema(value_type = Option<String>, pattern = "^(revoke|suspend)$")]
    #[serde(
        serialize_with = "optional_leak_action",
        skip_serializing_if = "Option::is_none"
    )]
    pub on_leak: Option<keyplane_core::LeakAction>,
}

impl PutCredentialPolicyRequest {
    pub fn into_policy(self) -> keyplane_core::CredentialPolicy {
        keyplane_core::CredentialPolicy {
            all: self.all.unwrap_or_default(),
            api_tokens: self.api_tokens,
            service_accounts: self.service_accounts,
            robot_accounts: self.robot_accounts,
            on_leak: self.on_leak.unwrap_or_default(),
        }
    }
}
