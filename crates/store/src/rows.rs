//! Row shapes and their conversion to core types. Generic over the database: both backends decode
//! the same columns into the same Rust types.

use crate::StoreError;
use chrono::{DateTime, Utc};
use keyplane_core::audit::ActorType;
use keyplane_core::{Channel, CreatedBy, Operator};
use keyplane_core::{
    Credential, CredentialId, CredentialKind, CredentialPolicy, Grant, GrantId, GrantKind,
    GrantResource, PreviousSecret, Registry, RobotPermission, Scope, ScopeSet, SubjectType, Tenant,
    TenantId, TokenDisplay, TokenHash, UserId,
};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
pub(crate) struct TenantRow {
    id: Uuid,
    name: String,
    created_at: DateTime<Utc>,
}

impl From<TenantRow> for Tenant {
    fn from(row: TenantRow) -> Self {
        Tenant {
            id: TenantId::from_uuid(row.id),
            name: row.name,
            created_at: row.created_at,
        }
    }
}

/// A tenant and its registry's project (`list_tenants`).
#[derive(sqlx::FromRow)]
pub(crate) struct TenantListingRow {
    id: Uuid,
    name: String,
    created_at: DateTime<Utc>,
    project: Option<String>,
}

impl From<TenantListingRow> for crate::TenantListing {
    fn from(row: TenantListingRow) -> Self {
        Self {
            tenant: TenantRow {
                id: row.id,
                name: row.name,
                created_at: row.created_at,
            }
            .into(),
            registry_project: row.project,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct CredentialRow {
    id: Uuid,
    tenant_id: Uuid,
    kind: String,
    name: String,
    secret_hash: Vec<u8>,
    display_prefix: String,
    public_id: Option<String>,
    last4: String,
    scopes: String,
    permissions: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    created_by_user_id: Option<Uuid>,
    revoked_by_user_id: Option<Uuid>,
    suspended_at: Option<DateTime<Utc>>,
    rotated_at: Option<DateTime<Utc>>,
    previous_secret_hash: Option<Vec<u8>>,
    previous_secret_expires_at: Option<DateTime<Utc>>,
    previous_secret_last_used_at: Option<DateTime<Utc>>,
    retire_previous_when_unused_seconds: Option<i32>,
    expiry_notice_days: Option<i32>,
    canary: bool,
    #[sqlx(flatten)]
    created_by: CreatedByRow,
}

impl TryFrom<CredentialRow> for Credential {
    type Error = StoreError;

    fn try_from(row: CredentialRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Other(anyhow::anyhow!(
                "stored credential {} has a bad {what}",
                row.id
            ))
        };
        let kind = CredentialKind::parse(&row.kind).ok_or_else(|| corrupt("kind"))?;
        let secret_hash =
            TokenHash::from_bytes(&row.secret_hash).ok_or_else(|| corrupt("secret hash"))?;
        let scopes: Vec<String> =
            serde_json::from_str(&row.scopes).map_err(|_| corrupt("scope list"))?;
        let permissions: Vec<String> = match &row.permissions {
            Some(json) => serde_json::from_str(json).map_err(|_| corrupt("permission list"))?,
            None => Vec::new(),
        };
        let permissions = permissions
            .iter()
            .map(|p| RobotPermission::parse_stored(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| corrupt("permission"))?;
        let previous_secret = match (&row.previous_secret_hash, row.previous_secret_expires_at) {
            (Some(hash), Some(expires_at)) => Some(PreviousSecret {
                hash: TokenHash::from_bytes(hash).ok_or_else(|| corrupt("previous secret hash"))?,
                expires_at,
                last_used_at: row.previous_secret_last_used_at,
                retire_when_unused_seconds: row
                    .retire_previous_when_unused_seconds
                    .map(|s| u32::try_from(s).map_err(|_| corrupt("retirement delay")))
                    .transpose()?,
            }),
            (None, _) => None,
            (Some(_), None) => return Err(corrupt("previous secret expiry")),
        };
        Ok(Credential {
            id: CredentialId::from_uuid(row.id),
            tenant_id: TenantId::from_uuid(row.tenant_id),
            kind,
            name: row.name,
            secret_hash,
            display: TokenDisplay {
                prefix: row.display_prefix,
                public_id: row.public_id,
                last4: row.last4,
            },
            scopes: ScopeSet::from_trusted(scopes),
            permissions,
            expires_at: row.expires_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
            last_used_at: row.last_used_at,
            revoked_at: row.revoked_at,
            created_by_user_id: row.created_by_user_id.map(UserId::from_uuid),
            created_by: row.created_by.decode(),
            revoked_by_user_id: row.revoked_by_user_id.map(UserId::from_uuid),
            suspended_at: row.suspended_at,
            rotated_at: row.rotated_at,
            previous_secret,
            expiry_notice_days: row
                .expiry_notice_days
                .map(|d| u32::try_from(d).map_err(|_| corrupt("expiry notice stage")))
                .transpose()?,
            canary: row.canary,
        })
    }
}

pub(crate) fn scopes_json(scopes: &ScopeSet) -> String {
    serde_json::Value::from(scopes.to_strings()).to_string()
}

/// `NULL` for credentials that are not robots.
pub(crate) fn permissions_json(credential: &Credential) -> Option<String> {
    (credential.kind == CredentialKind::RobotAccount).then(|| {
        serde_json::Value::from(
            credential
                .permissions
                .iter()
                .map(RobotPermission::to_wire)
                .collect::<Vec<_>>(),
        )
        .to_string()
    })
}

pub(crate) fn permission_list_json(permissions: &[RobotPermission]) -> String {
    serde_json::Value::from(
        permissions
            .iter()
            .map(RobotPermission::to_wire)
            .collect::<Vec<_>>(),
    )
    .to_string()
}

#[derive(sqlx::FromRow)]
pub(crate) struct RegistryRow {
    id: Uuid,
    tenant_id: Uuid,
    project: String,
    quota_gb: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<RegistryRow> for Registry {
    fn from(row: RegistryRow) -> Self {
        Registry {
            id: row.id,
            tenant_id: TenantId::from_uuid(row.tenant_id),
            project: row.project,
            quota_gb: row.quota_gb,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SigningKeyRow {
    key_id: String,
    private_key_pem: String,
    certificate_pem: String,
    created_at: DateTime<Utc>,
    signed_until: Option<DateTime<Utc>>,
}

impl From<SigningKeyRow> for crate::SigningKey {
    fn from(row: SigningKeyRow) -> Self {
        crate::SigningKey {
            key_id: row.key_id,
            private_key: keyplane_core::PrivateKeyPem::new(row.private_key_pem),
            certificate_pem: row.certificate_pem,
            created_at: row.created_at,
            signed_until: row.signed_until,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SlottedSigningKeyRow {
    pub(crate) slot: String,
    #[sqlx(flatten)]
    pub(crate) key: SigningKeyRow,
}

#[derive(sqlx::FromRow)]
pub(crate) struct GrantRow {
    id: Uuid,
    tenant_id: Uuid,
    grant_kind: String,
    subject_type: String,
    subject_id: Uuid,
    capability_key: Option<String>,
    resource_type: Option<String>,
    resource_id: Option<String>,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    created_by_user_id: Option<Uuid>,
    #[sqlx(flatten)]
    created_by: CreatedByRow,
}

impl GrantRow {
    pub(crate) fn subject_id(&self) -> Uuid {
        self.subject_id
    }

    pub(crate) fn revoked_at(&self) -> Option<DateTime<Utc>> {
        self.revoked_at
    }
}

impl TryFrom<GrantRow> for Grant {
    type Error = StoreError;

    fn try_from(row: GrantRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Other(anyhow::anyhow!("stored grant {} has a bad {what}", row.id))
        };
        Ok(Grant {
            id: GrantId::from_uuid(row.id),
            tenant_id: TenantId::from_uuid(row.tenant_id),
            kind: GrantKind::parse(&row.grant_kind).ok_or_else(|| corrupt("grant kind"))?,
            subject_type: SubjectType::parse(&row.subject_type)
                .ok_or_else(|| corrupt("subject type"))?,
            subject_id: row.subject_id,
            capability_key: row
                .capability_key
                .as_deref()
                .map(Scope::parse)
                .transpose()
                .map_err(|_| corrupt("capability key"))?,
            resource: GrantResource {
                resource_type: row.resource_type,
                resource_id: row.resource_id,
            },
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            created_by_user_id: row.created_by_user_id.map(UserId::from_uuid),
            created_by: row.created_by.decode(),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct IdempotencyRow {
    fingerprint: Vec<u8>,
    status: Option<i32>,
    nonce: Option<Vec<u8>>,
    response: Option<Vec<u8>>,
}

impl TryFrom<IdempotencyRow> for crate::IdempotencyRecord {
    type Error = StoreError;

    fn try_from(row: IdempotencyRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Other(anyhow::anyhow!(
                "stored idempotency record has a bad {what}"
            ))
        };
        let fingerprint: [u8; 32] = row
            .fingerprint
            .try_into()
            .map_err(|_| corrupt("fingerprint"))?;
        Ok(match (row.status, row.nonce, row.response) {
            (None, _, _) => crate::IdempotencyRecord::InFlight { fingerprint },
            (Some(status), Some(nonce), Some(ciphertext)) => crate::IdempotencyRecord::Completed {
                fingerprint,
                response: crate::StoredResponse {
                    status: u16::try_from(status).map_err(|_| corrupt("status"))?,
                    nonce,
                    ciphertext,
                },
            },
            _ => return Err(corrupt("response")),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    tenant_id: Uuid,
    seq: i64,
    id: Uuid,
    occurred_at: DateTime<Utc>,
    action: String,
    outcome: String,
    actor_type: String,
    actor_id: Option<Uuid>,
    actor_issuer: Option<String>,
    actor_sub: Option<String>,
    target_type: Option<String>,
    target_id: Option<Uuid>,
    target_name: Option<String>,
    request_id: Option<String>,
    client_ip: Option<String>,
    user_agent: Option<String>,
    details: String,
    chain_hash: String,
}

impl TryFrom<AuditRow> for keyplane_core::ChainedEvent {
    type Error = StoreError;

    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        use crate::audit::{corrupt, event_details, event_outcome, parse_hash};
        use keyplane_core::audit::{ActorType, AuditTarget};
        let target = match (row.target_type, row.target_id) {
            (Some(target_type), Some(id)) => Some(AuditTarget {
                target_type,
                id,
                name: row.target_name,
            }),
            _ => None,
        };
        Ok(keyplane_core::ChainedEvent {
            seq: u64::try_from(row.seq).map_err(|_| corrupt("seq"))?,
            chain_hash: parse_hash(&row.chain_hash)?,
            event: keyplane_core::AuditEvent {
                id: row.id,
                tenant_id: TenantId::from_uuid(row.tenant_id),
                occurred_at: row.occurred_at,
                action: row.action,
                outcome: event_outcome(&row.outcome)?,
                actor: keyplane_core::AuditActor {
                    actor_type: ActorType::parse(&row.actor_type)
                        .ok_or_else(|| corrupt("actor type"))?,
                    id: row.actor_id,
                    issuer: row.actor_issuer,
                    subject: row.actor_sub,
                },
                target,
                context: keyplane_core::RequestContext {
                    request_id: row.request_id,
                    client_ip: row.client_ip,
                    user_agent: row.user_agent,
                },
                details: event_details(&row.details)?,
            },
        })
    }
}

/// A tenant's policy as stored: `{"all": rule, "api_tokens": rule|null, ..., "on_leak": "revoke"}`
/// with `rule = {"max_lifetime_days", "require_expiry", "default_lifetime_days"}`.
pub(crate) fn policy_json(policy: &CredentialPolicy) -> String {
    use serde_json::{json, Value};
    let rule = |r: &keyplane_core::LifetimeRule| {
        json!({
            "max_lifetime_days": r.max_lifetime_days,
            "require_expiry": r.require_expiry,
            "default_lifetime_days": r.default_lifetime_days,
        })
    };
    let kind_rule = |r: &Option<keyplane_core::LifetimeRule>| r.as_ref().map_or(Value::Null, rule);
    json!({
        "all": rule(&policy.all),
        "api_tokens": kind_rule(&policy.api_tokens),
        "service_accounts": kind_rule(&policy.service_accounts),
        "robot_accounts": kind_rule(&policy.robot_accounts),
        "on_leak": policy.on_leak.as_str(),
    })
    .to_string()
}

pub(crate) fn policy_from_json(text: &str) -> Result<CredentialPolicy, StoreError> {
    use serde_json::Value;
    let corrupt = || StoreError::Other(anyhow::anyhow!("a stored credential policy is unreadable"));
    let value: Value = serde_json::from_str(text).map_err(|_| corrupt())?;
    let days = |rule: &Value, key: &str| -> Result<Option<u32>, StoreError> {
        match rule.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .map(Some)
                .ok_or_else(corrupt),
        }
    };
    let rule = |rule: &Value| -> Result<keyplane_core::LifetimeRule, StoreError> {
        Ok(keyplane_core::LifetimeRule {
            max_lifetime_days: days(rule, "max_lifetime_days")?,
            require_expiry: rule
                .get("require_expiry")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            default_lifetime_days: days(rule, "default_lifetime_days")?,
        })
    };
    let kind_rule = |key: &str| match value.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(r) => rule(r).map(Some),
    };
    Ok(CredentialPolicy {
        all: rule(value.get("all").ok_or_else(corrupt)?)?,
        api_tokens: kind_rule("api_tokens")?,
        service_accounts: kind_rule("service_accounts")?,
        robot_accounts: kind_rule("robot_accounts")?,
        on_leak: match value.get("on_leak").and_then(Value::as_str) {
            None => keyplane_core::LeakAction::default(),
            Some(text) => keyplane_core::LeakAction::parse(text).ok_or_else(corrupt)?,
        },
    })
}

#[derive(sqlx::FromRow)]
pub(crate) struct ConsoleSessionRow {
    id_hash: Vec<u8>,
    tenant_id: uuid::Uuid,
    sealed_token: Vec<u8>,
    label: String,
    created_at_ms: i64,
    last_seen_at_ms: i64,
    ends_at_ms: i64,
    notice: Option<String>,
}

impl TryFrom<ConsoleSessionRow> for crate::ConsoleSession {
    type Error = StoreError;

    fn try_from(row: ConsoleSessionRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Other(anyhow::anyhow!("stored console session has a bad {what}"))
        };
        let time = |ms: i64, what: &str| {
            chrono::DateTime::from_timestamp_millis(ms).ok_or_else(|| corrupt(what))
        };
        Ok(Self {
            id_hash: row.id_hash.try_into().map_err(|_| corrupt("id"))?,
            tenant_id: keyplane_core::TenantId::from_uuid(row.tenant_id),
            sealed_token: row.sealed_token,
            label: row.label,
            created_at: time(row.created_at_ms, "creation time")?,
            last_seen_at: time(row.last_seen_at_ms, "last-seen time")?,
            ends_at: time(row.ends_at_ms, "end")?,
            notice: row.notice,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct LeakReportRow {
    id: Uuid,
    token_hashes: Vec<u8>,
    request_id: Option<String>,
    client_ip: Option<String>,
    user_agent: Option<String>,
    received_at_ms: i64,
    attempts: i32,
}

impl TryFrom<LeakReportRow> for crate::LeakReportRecord {
    type Error = StoreError;

    fn try_from(row: LeakReportRow) -> Result<Self, StoreError> {
        let corrupt =
            |what: &str| StoreError::Other(anyhow::anyhow!("stored leak report has a bad {what}"));
        if !row.token_hashes.len().is_multiple_of(32) {
            return Err(corrupt("token hash list"));
        }
        Ok(Self {
            id: row.id,
            token_hashes: row
                .token_hashes
                .chunks_exact(32)
                .filter_map(TokenHash::from_bytes)
                .collect(),
            context: keyplane_core::RequestContext {
                request_id: row.request_id,
                client_ip: row.client_ip,
                user_agent: row.user_agent,
            },
            received_at: DateTime::from_timestamp_millis(row.received_at_ms)
                .ok_or_else(|| corrupt("receipt time"))?,
            attempts: u32::try_from(row.attempts).map_err(|_| corrupt("attempt count"))?,
        })
    }
}

/// The `created_by_*` columns of a credential or grant (migration 0019); all NULL on rows from
/// before it, and on rows a previous release inserted.
#[derive(sqlx::FromRow)]
pub(crate) struct CreatedByRow {
    created_by_actor_type: Option<String>,
    created_by_actor_id: Option<Uuid>,
    created_by_via: Option<String>,
    created_by_os_user: Option<String>,
    created_by_operator: Option<String>,
}

impl CreatedByRow {
    /// `None` when nothing was recorded, or when a later release recorded an actor type or
    /// channel this one does not know: the creator only informs, and refusing the row would fail
    /// every verification of a credential a newer replica created, during a rolling upgrade or
    /// after a rollback.
    fn decode(self) -> Option<CreatedBy> {
        let actor_type = ActorType::parse(self.created_by_actor_type.as_deref()?)?;
        let via = Channel::parse(self.created_by_via.as_deref()?)?;
        let operator = self.created_by_os_user.map(|os_user| Operator {
            os_user,
            name: self.created_by_operator,
        });
        Some(CreatedBy {
            actor_type,
            actor_id: self.created_by_actor_id,
            via,
            operator,
        })
    }
}

/// What a row's `created_by_*` columns are bound to, in their order.
pub(crate) struct CreatedByColumns<'a> {
    pub(crate) actor_type: Option<&'static str>,
    pub(crate) actor_id: Option<Uuid>,
    pub(crate) via: Option<&'static str>,
    pub(crate) os_user: Option<&'a str>,
    pub(crate) operator: Option<&'a str>,
}

impl<'a> CreatedByColumns<'a> {
    pub(crate) fn of(created_by: Option<&'a CreatedBy>) -> Self {
        let operator = created_by.and_then(|by| by.operator.as_ref());
        Self {
            actor_type: created_by.map(|by| by.actor_type.as_str()),
            actor_id: created_by.and_then(|by| by.actor_id),
            via: created_by.map(|by| by.via.as_str()),
            os_user: operator.map(|o| o.os_user.as_str()),
            operator: operator.and_then(|o| o.name.as_deref()),
        }
    }
}
