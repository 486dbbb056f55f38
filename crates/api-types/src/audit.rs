//! The one JSON shape of an audit event: the API's `audit-events`, `serve --audit-log`,
//! `keyplane admin audit` and `keyplane audit` all print it.

use crate::wire::timestamp;
use chrono::{DateTime, Utc};
use keyplane_core::audit::DetailValue;
use keyplane_core::ChainedEvent;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Who acted.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = AuditActor)]
pub struct AuditActorView {
    /// `api_token`, `service_account`, `user`, `robot_account` or `system`.
    #[serde(rename = "type")]
    pub actor_type: String,
    /// The credential or user id; null for `system`.
    pub id: Option<Uuid>,
    /// Users: the OIDC issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Users: the OIDC `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

/// What was acted on.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = AuditTarget)]
pub struct AuditTargetView {
    /// `organization`, `api_token`, `service_account`, `robot_account`, `registry`,
    /// `authorization`, `webhook`, `credential_policy` or `console_session`.
    #[serde(rename = "type")]
    pub target_type: String,
    pub id: Uuid,
    pub name: Option<String>,
}

/// One recorded change or refused attempt. Never holds a secret or a secret's hash.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = AuditEvent)]
pub struct AuditEventView {
    /// UUIDv7, time-ordered.
    pub id: Uuid,
    pub org_id: Uuid,
    /// Position in the organization's hash chain (1, 2, ...).
    pub seq: u64,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub occurred_at: DateTime<Utc>,
    /// Dotted and stable: `api_token.created`, `authorization.revoked`, `access.denied`, ...
    pub action: String,
    /// `success` or `denied`.
    pub outcome: String,
    pub actor: AuditActorView,
    pub target: Option<AuditTargetView>,
    /// The `x-request-id` of the call.
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// What changed: scopes or capability granted, old and new display prefix, a refusal's
    /// `count`, ...
    #[schema(value_type = Object)]
    pub details: serde_json::Map<String, serde_json::Value>,
    /// Lowercase hex SHA-256(previous event's `chain_hash` || this event's canonical bytes).
    pub chain_hash: String,
}

impl From<&ChainedEvent> for AuditEventView {
    fn from(stored: &ChainedEvent) -> Self {
        let event = &stored.event;
        Self {
            id: event.id,
            org_id: event.tenant_id.as_uuid(),
            seq: stored.seq,
            occurred_at: event.occurred_at,
            action: event.action.clone(),
            outcome: event.outcome.as_str().to_string(),
            actor: AuditActorView {
                actor_type: event.actor.actor_type.as_str().to_string(),
                id: event.actor.id,
                issuer: event.actor.issuer.clone(),
                sub: event.actor.subject.clone(),
            },
            target: event.target.as_ref().map(|t| AuditTargetView {
                target_type: t.target_type.clone(),
                id: t.id,
                name: t.name.clone(),
            }),
            request_id: event.context.request_id.clone(),
            client_ip: event.context.client_ip.clone(),
            user_agent: event.context.user_agent.clone(),
            details: event
                .details
                .iter()
                .map(|(key, value)| {
                    let value = match value {
                        DetailValue::Text(text) => serde_json::Value::from(text.as_str()),
                        DetailValue::Count(count) => serde_json::Value::from(*count),
                        DetailValue::List(items) => serde_json::Value::from(items.clone()),
                    };
                    (key.clone(), value)
                })
                .collect(),
            chain_hash: stored
                .chain_hash
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }
    }
}

/// A page of audit events, newest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AuditEventPage {
    pub items: Vec<AuditEventView>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<Uuid>,
}

/// The `error.code` of [`AuditChainDivergedError`].
pub const AUDIT_CHAIN_DIVERGED: &str = "audit_chain_diverged";

/// The 409 answer of `GET .../audit-events?after=`: the Aether error envelope, with where to go on
/// from.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AuditChainDivergedEnvelope {
    pub error: AuditChainDivergedError,
}

/// The organization's audit trail no longer holds the newest event `after` names: it went back
/// (a restore from a backup, a failover that lost the last commits) and its new events may have
/// taken the seqs of events the reader had, or retention pruned it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AuditChainDivergedError {
    /// `audit_chain_diverged`.
    pub code: String,
    pub message: String,
    /// Always null.
    pub details: Option<Vec<crate::aether::ErrorDetail>>,
    /// The seq of the newest event `after` named: the trail holds another event there, or none.
    pub diverged_seq: u64,
    /// The trail's newest seq now.
    pub head_seq: u64,
    /// Go on after this seq: the newest event `after` named that the trail still holds, else the
    /// oldest point it holds (0, or where retention pruned it to). Every event after it may be
    /// new to the reader; some may repeat events it had.
    pub resume_after_seq: u64,
    /// The same as an `after` value (`<seq>-<tag>`).
    pub resume_after: String,
}
