//! The audit trail's rules: what an event holds, its canonical bytes and the per-tenant hash chain.
//!
//! An event never holds a secret, a hash of a secret or an `Authorization` value: only ids, names,
//! display prefixes and the request's metadata. `chain_hash` = SHA-256(previous `chain_hash` ||
//! [`AuditEvent::canonical_bytes`]); the first event of a tenant chains from 32 zero bytes, and
//! after pruning the chain continues from the recorded anchor (the last pruned event's hash).

use crate::authz::{Actor, Principal};
use crate::ids::TenantId;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Stable, dotted action names.
pub mod actions {
    pub const ORGANIZATION_CREATED: &str = "organization.created";
    pub const API_TOKEN_CREATED: &str = "api_token.created";
    pub const API_TOKEN_ROTATED: &str = "api_token.rotated";
    pub const API_TOKEN_REVOKED: &str = "api_token.revoked";
    /// A bulk import of credentials (`keyplane admin import-credentials`): one event per batch,
    /// with `count`, `kind`, `via` and who ran it; the actions below likewise per kind.
    pub const API_TOKEN_IMPORTED: &str = "api_token.imported";
    pub const SERVICE_ACCOUNT_IMPORTED: &str = "service_account.imported";
    pub const ROBOT_ACCOUNT_IMPORTED: &str = "robot_account.imported";
    pub const SERVICE_ACCOUNT_CREATED: &str = "service_account.created";
    pub const SERVICE_ACCOUNT_ROTATED: &str = "service_account.rotated";
    pub const SERVICE_ACCOUNT_REVOKED: &str = "service_account.revoked";
    pub const ROBOT_ACCOUNT_CREATED: &str = "robot_account.created";
    pub const ROBOT_ACCOUNT_ROTATED: &str = "robot_account.rotated";
    pub const ROBOT_ACCOUNT_REVOKED: &str = "robot_account.revoked";
    pub const ROBOT_ACCOUNT_PERMISSIONS_UPDATED: &str = "robot_account.permissions_updated";
    pub const REGISTRY_ENABLED: &str = "registry.enabled";
    pub const AUTHORIZATION_CREATED: &str = "authorization.created";
    pub const AUTHORIZATION_REVOKED: &str = "authorization.revoked";
    pub const ACCESS_DENIED: &str = "access.denied";
    pub const API_TOKEN_SUSPENDED: &str = "api_token.suspended";
    pub const API_TOKEN_RESUMED: &str = "api_token.resumed";
    pub const API_TOKEN_PREVIOUS_SECRET_RETIRED: &str = "api_token.previous_secret_retired";
    pub const SERVICE_ACCOUNT_SUSPENDED: &str = "service_account.suspended";
    pub const SERVICE_ACCOUNT_RESUMED: &str = "service_account.resumed";
    pub const SERVICE_ACCOUNT_PREVIOUS_SECRET_RETIRED: &str =
        "service_account.previous_secret_retired";
    pub const ROBOT_ACCOUNT_SUSPENDED: &str = "robot_account.suspended";
    pub const ROBOT_ACCOUNT_RESUMED: &str = "robot_account.resumed";
    pub const ROBOT_ACCOUNT_PREVIOUS_SECRET_RETIRED: &str = "robot_account.previous_secret_retired";
    /// A credential's expiry is 30, 7 or 1 days away (the sweep, actor `system`).
    pub const CREDENTIAL_EXPIRING: &str = "credential.expiring";
    /// A credential's expiry has passed (the sweep, actor `system`).
    pub const CREDENTIAL_EXPIRED: &str = "credential.expired";
    pub const CREDENTIAL_POLICY_UPDATED: &str = "credential_policy.updated";
    /// A credential's secret was reported found in public (GitHub secret scanning, the public
    /// revocation endpoint) and keyplane acted on it; the target names the credential.
    pub const CREDENTIAL_LEAKED: &str = "credential.leaked";
    /// A canary credential was presented (to any surface, or reported leaked); the target names
    /// the canary, the context and details say where it was presented.
    pub const CREDENTIAL_CANARY_TRIGGERED: &str = "credential.canary_triggered";
    pub const WEBHOOK_CREATED: &str = "webhook.created";
    pub const WEBHOOK_UPDATED: &str = "webhook.updated";
    pub const WEBHOOK_DELETED: &str = "webhook.deleted";
    pub const WEBHOOK_SECRET_ROTATED: &str = "webhook.secret_rotated";
    /// Turned off by keyplane after failing for too long.
    pub const WEBHOOK_DISABLED: &str = "webhook.disabled";
    pub const WEBHOOK_DELIVERY_RETRIED: &str = "webhook.delivery_retried";
    /// Someone signed in to the web console (`method`: `token` or `oidc`); the target is the
    /// session (`console_session`), named as the console names who signed in.
    pub const CONSOLE_SESSION_STARTED: &str = "console.session_started";
    /// A console session moved to this organization (one holding rights in several); its end in
    /// the organization it left is a `console.session_ended` there.
    pub const CONSOLE_ORGANIZATION_SWITCHED: &str = "console.organization_switched";
    /// A console session ended (`reason`: `signed_out`, `expired`, `idle`,
    /// `switched_organization`, or `credential_refused` when the credential it acted with
    /// stopped working).
    pub const CONSOLE_SESSION_ENDED: &str = "console.session_ended";
    /// The registry token signing key (one for every organization's registry) was created,
    /// staged, promoted or retired; recorded in each organization with a registry (actor
    /// `system`, target the registry, `key_id`, `previous_key_id`, `via`).
    pub const REGISTRY_SIGNING_KEY_CREATED: &str = "registry.signing_key_created";
    pub const REGISTRY_SIGNING_KEY_STAGED: &str = "registry.signing_key_staged";
    pub const REGISTRY_SIGNING_KEY_PROMOTED: &str = "registry.signing_key_promoted";
    pub const REGISTRY_SIGNING_KEY_RETIRED: &str = "registry.signing_key_retired";
    /// Retention deleted the start of the chain (actor `system`): `through_seq` and
    /// `through_chain_hash` are the anchor it left, which this event vouches for, `count` how many
    /// it deleted, `cutoff` and `retention_days` why. Appended in the pruning's transaction.
    pub const AUDIT_PRUNED: &str = "audit.pruned";
    /// `keyplane admin restore-replay` found events of the exported trail that a restore from
    /// backup took out of the store (`lost_from_seq`..`lost_through_seq`, whose seqs newer events
    /// may reuse), and made their changes again (`revoked`, `suspended`, `retired`, `already`,
    /// `not_found`, `reported` counts). Actor `system`.
    pub const AUDIT_RESTORED: &str = "audit.restored";
    /// `admin delete-org` deleted the organization (actor `system`; `reason`, `via`, `os_user`,
    /// `operator`, and the counts of what it deleted and kept). The last event of its chain.
    pub const ORGANIZATION_DELETED: &str = "organization.deleted";
}

/// The action for a change to a credential of `kind`: `<kind>.<verb>`.
pub fn credential_action(kind: crate::CredentialKind, verb: CredentialChange) -> &'static str {
    use crate::CredentialKind::*;
    use actions::*;
    use CredentialChange::*;
    match (kind, verb) {
        (ApiToken, Created) => API_TOKEN_CREATED,
        (ApiToken, Rotated) => API_TOKEN_ROTATED,
        (ApiToken, Revoked) => API_TOKEN_REVOKED,
        (ServiceAccount, Created) => SERVICE_ACCOUNT_CREATED,
        (ServiceAccount, Rotated) => SERVICE_ACCOUNT_ROTATED,
        (ServiceAccount, Revoked) => SERVICE_ACCOUNT_REVOKED,
        (RobotAccount, Created) => ROBOT_ACCOUNT_CREATED,
        (RobotAccount, Rotated) => ROBOT_ACCOUNT_ROTATED,
        (RobotAccount, Revoked) => ROBOT_ACCOUNT_REVOKED,
        (ApiToken, Suspended) => API_TOKEN_SUSPENDED,
        (ApiToken, Resumed) => API_TOKEN_RESUMED,
        (ApiToken, PreviousSecretRetired) => API_TOKEN_PREVIOUS_SECRET_RETIRED,
        (ServiceAccount, Suspended) => SERVICE_ACCOUNT_SUSPENDED,
        (ServiceAccount, Resumed) => SERVICE_ACCOUNT_RESUMED,
        (ServiceAccount, PreviousSecretRetired) => SERVICE_ACCOUNT_PREVIOUS_SECRET_RETIRED,
        (RobotAccount, Suspended) => ROBOT_ACCOUNT_SUSPENDED,
        (RobotAccount, Resumed) => ROBOT_ACCOUNT_RESUMED,
        (RobotAccount, PreviousSecretRetired) => ROBOT_ACCOUNT_PREVIOUS_SECRET_RETIRED,
        (ApiToken, Imported) => API_TOKEN_IMPORTED,
        (ServiceAccount, Imported) => SERVICE_ACCOUNT_IMPORTED,
        (RobotAccount, Imported) => ROBOT_ACCOUNT_IMPORTED,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialChange {
    Created,
    Rotated,
    Revoked,
    Suspended,
    Resumed,
    /// The previous secret of a rotation with a grace period ended before its grace did.
    PreviousSecretRetired,
    /// Brought in from another system with its secret's hash (`admin import-credentials`).
    Imported,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "success" => Some(Outcome::Success),
            "denied" => Some(Outcome::Denied),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorType {
    ApiToken,
    ServiceAccount,
    User,
    RobotAccount,
    /// The operator on the store (`keyplane admin ...`) or the server itself (bootstrap).
    System,
}

impl ActorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorType::ApiToken => "api_token",
            ActorType::ServiceAccount => "service_account",
            ActorType::User => "user",
            ActorType::RobotAccount => "robot_account",
            ActorType::System => "system",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "api_token" => ActorType::ApiToken,
            "service_account" => ActorType::ServiceAccount,
            "user" => ActorType::User,
            "robot_account" => ActorType::RobotAccount,
            "system" => ActorType::System,
            _ => return None,
        })
    }

    pub fn of_credential(kind: crate::CredentialKind) -> Self {
        match kind {
            crate::CredentialKind::ApiToken => ActorType::ApiToken,
            crate::CredentialKind::ServiceAccount => ActorType::ServiceAccount,
            crate::CredentialKind::RobotAccount => ActorType::RobotAccount,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditActor {
    pub actor_type: ActorType,
    /// `None` for [`ActorType::System`].
    pub id: Option<uuid::Uuid>,
    /// Users only: the OIDC issuer and `sub`, when known.
    pub issuer: Option<String>,
    pub subject: Option<String>,
}

impl AuditActor {
    pub fn system() -> Self {
        Self {
            actor_type: ActorType::System,
            id: None,
            issuer: None,
            subject: None,
        }
    }

    pub fn of(principal: &Principal) -> Self {
        let actor_type = match principal.actor {
            Actor::Credential { kind, .. } => ActorType::of_credential(kind),
            Actor::User(_) => ActorType::User,
        };
        let (issuer, subject) = match principal.user_identity() {
            Some((issuer, subject)) => (Some(bounded(issuer)), Some(bounded(subject))),
            None => (None, None),
        };
        Self {
            actor_type,
            id: Some(principal.id()),
            issuer,
            subject,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditTarget {
    /// `organization`, `api_token`, `service_account`, `robot_account`, `registry`,
    /// `authorization`, `webhook`, `credential_policy`, `console_session`.
    pub target_type: String,
    pub id: uuid::Uuid,
    pub name: Option<String>,
}

/// Where a request came from. Every field is bounded and free of secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
}

/// Longest request id or user agent kept; longer values are cut (on a character boundary).
pub const MAX_CONTEXT_CHARS: usize = 256;

impl RequestContext {
    pub fn new(
        request_id: Option<&str>,
        client_ip: Option<String>,
        user_agent: Option<&str>,
    ) -> Self {
        Self {
            request_id: request_id.map(bounded),
            client_ip,
            user_agent: user_agent.map(bounded),
        }
    }
}

fn bounded(value: &str) -> String {
    value.chars().take(MAX_CONTEXT_CHARS).collect()
}

/// A `details` value: text, a whole number, or a list of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetailValue {
    Text(String),
    Count(u64),
    List(Vec<String>),
}

/// One change or refusal, as it is stored and exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// UUIDv7: time-ordered.
    pub id: uuid::Uuid,
    pub tenant_id: TenantId,
    pub occurred_at: DateTime<Utc>,
    pub action: String,
    pub outcome: Outcome,
    pub actor: AuditActor,
    pub target: Option<AuditTarget>,
    pub context: RequestContext,
    /// Sorted by key, so the canonical bytes do not depend on insertion order.
    pub details: BTreeMap<String, DetailValue>,
}

impl AuditEvent {
    /// A successful change; add the target and details with the builder methods.
    pub fn new(
        id: uuid::Uuid,
        tenant_id: TenantId,
        occurred_at: DateTime<Utc>,
        action: &str,
        actor: AuditActor,
        context: RequestContext,
    ) -> Self {
        Self {
            id,
            tenant_id,
            occurred_at,
            action: action.to_string(),
            outcome: Outcome::Success,
            actor,
            target: None,
            context,
            details: BTreeMap::new(),
        }
    }

    pub fn denied(mut self) -> Self {
        self.outcome = Outcome::Denied;
        self
    }

    pub fn target(mut self, target_type: &str, id: uuid::Uuid, name: Option<&str>) -> Self {
        self.target = Some(AuditTarget {
            target_type: target_type.to_string(),
            id,
            name: name.map(str::to_string),
        });
        self
    }

    pub fn detail(mut self, key: &str, value: DetailValue) -> Self {
        self.details.insert(key.to_string(), value);
        self
    }

    pub fn text(self, key: &str, value: impl Into<String>) -> Self {
        self.detail(key, DetailValue::Text(value.into()))
    }

    pub fn list<I: IntoIterator<Item = S>, S: Into<String>>(self, key: &str, values: I) -> Self {
        self.detail(
            key,
            DetailValue::List(values.into_iter().map(Into::into).collect()),
        )
    }

    /// Names who ran a `keyplane admin` command: details `os_user`, and `operator` when given.
    /// The actor stays `system`, so filters and readers of the actor type see what they always
    /// did.
    pub fn operated_by(self, operator: &crate::created_by::Operator) -> Self {
        let event = self.text("os_user", bounded(&operator.os_user));
        match &operator.name {
            Some(name) => event.text("operator", bounded(name)),
            None => event,
        }
    }

    /// The bytes the chain hashes, position `seq` in its tenant's chain included. See
    /// ARCHITECTURE.md ("Audit trail") for the layout: a version tag, then every field in a fixed
    /// order as `tag byte, u32 big-endian length, UTF-8 bytes` (tag 0 and no length for an absent
    /// field), then the details as a count and sorted key/value pairs.
    pub fn canonical_bytes(&self, seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"keyplane-audit-v1\n");
        let uuid = |id: uuid::Uuid| id.hyphenated().to_string();
        field(&mut out, Some(&uuid(self.id)));
        field(&mut out, Some(&uuid(self.tenant_id.as_uuid())));
        field(&mut out, Some(&seq.to_string()));
        field(&mut out, Some(&canonical_time(self.occurred_at)));
        field(&mut out, Some(&self.action));
        field(&mut out, Some(self.outcome.as_str()));
        field(&mut out, Some(self.actor.actor_type.as_str()));
        field(&mut out, self.actor.id.map(uuid).as_deref());
        field(&mut out, self.actor.issuer.as_deref());
        field(&mut out, self.actor.subject.as_deref());
        let target = self.target.as_ref();
        field(&mut out, target.map(|t| t.target_type.as_str()));
        field(&mut out, target.map(|t| uuid(t.id)).as_deref());
        field(&mut out, target.and_then(|t| t.name.as_deref()));
        field(&mut out, self.context.request_id.as_deref());
        field(&mut out, self.context.client_ip.as_deref());
        field(&mut out, self.context.user_agent.as_deref());
        out.extend_from_slice(&(self.details.len() as u32).to_be_bytes());
        for (key, value) in &self.details {
            field(&mut out, Some(key));
            match value {
                DetailValue::Text(text) => {
                    out.push(b's');
                    field(&mut out, Some(text));
                }
                DetailValue::Count(count) => {
                    out.push(b'n');
                    field(&mut out, Some(&count.to_string()));
                }
                DetailValue::List(items) => {
                    out.push(b'l');
                    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
                    for item in items {
                        field(&mut out, Some(item));
                    }
                }
            }
        }
        out
    }
}

/// RFC 3339 in UTC with exactly six fractional digits: what both stores keep.
pub fn canonical_time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn field(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0),
        Some(text) => {
            out.push(1);
            out.extend_from_slice(&(text.len() as u32).to_be_bytes());
            out.extend_from_slice(text.as_bytes());
        }
    }
}

/// A chain hash as lowercase hex, as it is stored and shown.
pub fn hash_hex(hash: &[u8; 32]) -> String {
    use std::fmt::Write;
    hash.iter()
        .fold(String::with_capacity(64), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// The hash a tenant's chain starts from before its first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// SHA-256(previous || canonical bytes of `event` at `seq`).
pub fn chain_hash(previous: &[u8; 32], event: &AuditEvent, seq: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(event.canonical_bytes(seq));
    hasher.finalize().into()
}

/// An event as stored: its place in the tenant's chain and the hash it was written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedEvent {
    pub seq: u64,
    pub chain_hash: [u8; 32],
    pub event: AuditEvent,
}

/// Where a chain stops being what was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainBreak {
    /// The row at `seq` is not what was written there: changed, or moved from elsewhere.
    Altered { seq: u64, id: uuid::Uuid },
    /// Events `expected..found` are missing before the event at `found` (`id`).
    Missing {
        expected: u64,
        found: u64,
        id: uuid::Uuid,
    },
    /// The chain's recorded head is at `head` but the last event found is at `last`: the newest
    /// events were deleted.
    Truncated { last: u64, head: u64 },
    /// The chain reaches the head's seq, but the newest event there (`id`; `None` when only the
    /// anchor is left) does not end with the hash the head recorded: that event was changed and
    /// its own chain hash recomputed, or the head row was.
    HeadMismatch { seq: u64, id: Option<uuid::Uuid> },
    /// The tenant has events (or an anchor at `anchor`) but no head row: it was deleted, and with
    /// it what the newest events must reach.
    HeadMissing { anchor: u64 },
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The hash a row is checked against is its predecessor's as stored: an edit that
            // recomputed the predecessor's hash shows up here.
            ChainBreak::Altered { seq, id } => write!(
                f,
                "event {id} (seq {seq}) was changed or reordered, or the event before it was changed and its chain hash recomputed"
            ),
            ChainBreak::Missing {
                expected,
                found,
                id,
            } => write!(
                f,
                "events with seq {expected}..{} are missing before event {id} (seq {found}): deleted",
                found - 1
            ),
            ChainBreak::Truncated { last, head } => write!(
                f,
                "events after seq {last} up to {head} are missing: deleted"
            ),
            ChainBreak::HeadMismatch { seq, id: Some(id) } => write!(
                f,
                "the newest event {id} (seq {seq}) does not match the chain head's hash: it was changed and its chain hash recomputed, or the head record was changed"
            ),
            ChainBreak::HeadMismatch { seq, id: None } => write!(
                f,
                "the pruning anchor at seq {seq} does not match the chain head's hash: the head or anchor record was changed"
            ),
            ChainBreak::HeadMissing { anchor } => write!(
                f,
                "the chain head record is missing (deleted) while events after seq {anchor} exist: the newest events may have been deleted with it"
            ),
        }
    }
}

/// Checks a tenant's events in `seq` order, one at a time, from an anchor.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    previous: [u8; 32],
    next_seq: u64,
    checked: u64,
    /// The last event checked since the anchor; `None` before the first.
    last_id: Option<uuid::Uuid>,
}

impl ChainVerifier {
    /// Starts after `anchor_seq` (0: from the beginning, with [`GENESIS`]), whose hash is `anchor`.
    pub fn from_anchor(anchor_seq: u64, anchor: [u8; 32]) -> Self {
        Self {
            previous: anchor,
            next_seq: anchor_seq + 1,
            checked: 0,
            last_id: None,
        }
    }

    /// Goes on from a later anchor (retention pruned the events up to it while they were being
    /// read), keeping the count of events checked so far.
    pub fn resume_from_anchor(&mut self, anchor_seq: u64, anchor: [u8; 32]) {
        self.previous = anchor;
        self.next_seq = anchor_seq + 1;
        self.last_id = None;
    }

    pub fn check(&mut self, stored: &ChainedEvent) -> Result<(), ChainBreak> {
        if stored.seq != self.next_seq {
            return Err(if stored.seq > self.next_seq {
                ChainBreak::Missing {
                    expected: self.next_seq,
                    found: stored.seq,
                    id: stored.event.id,
                }
            } else {
                ChainBreak::Altered {
                    seq: stored.seq,
                    id: stored.event.id,
                }
            });
        }
        let recomputed = chain_hash(&self.previous, &stored.event, stored.seq);
        if recomputed != stored.chain_hash {
            return Err(ChainBreak::Altered {
                seq: stored.seq,
                id: stored.event.id,
            });
        }
        self.previous = recomputed;
        self.next_seq += 1;
        self.checked += 1;
        self.last_id = Some(stored.event.id);
        Ok(())
    }

    /// After the last event: the chain must reach the head the store recorded, seq and hash. The
    /// hash catches the newest event changed with its own chain hash recomputed (no later event
    /// is chained from it yet) and a head set back to an earlier seq alone.
    pub fn finish(self, head_seq: u64, head_hash: [u8; 32]) -> Result<u64, ChainBreak> {
        let last = self.next_seq - 1;
        if last != head_seq {
            return Err(ChainBreak::Truncated {
                last,
                head: head_seq,
            });
        }
        if self.previous != head_hash {
            return Err(ChainBreak::HeadMismatch {
                seq: last,
                id: self.last_id,
            });
        }
        Ok(self.checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn event(n: u128) -> AuditEvent {
        AuditEvent::new(
            uuid::Uuid::from_u128(n),
            TenantId::from_uuid(uuid::Uuid::from_u128(7)),
            Utc.timestamp_opt(1_700_000_000, 123_456_000).unwrap(),
            actions::API_TOKEN_CREATED,
            AuditActor::system(),
            RequestContext::new(Some("req"), Some("127.0.0.1".into()), Some("curl")),
        )
        .target("api_token", uuid::Uuid::from_u128(9), Some("ci"))
        .list("scopes", ["a", "b"])
    }

    fn chain(events: &[AuditEvent]) -> Vec<ChainedEvent> {
        let mut previous = GENESIS;
        events
            .iter()
            .enumerate()
            .map(|(i, event)| {
                let seq = i as u64 + 1;
                previous = chain_hash(&previous, event, seq);
                ChainedEvent {
                    seq,
                    chain_hash: previous,
                    event: event.clone(),
                }
            })
            .collect()
    }

    /// Checks `stored` against a head at `head` whose hash is the original chain's there.
    fn verify(stored: &[ChainedEvent], head: u64) -> Result<u64, ChainBreak> {
        let original = chain(&[event(1), event(2), event(3)]);
        let head_hash = original[head as usize - 1].chain_hash;
        let mut verifier = ChainVerifier::from_anchor(0, GENESIS);
        for event in stored {
            verifier.check(event)?;
        }
        verifier.finish(head, head_hash)
    }

    #[test]
    fn canonical_bytes_separate_fields_unambiguously() {
        let a = event(1).text("k", "ab");
        let b = event(1).text("ka", "b");
        assert_ne!(a.canonical_bytes(1), b.canonical_bytes(1));
        assert_ne!(event(1).canonical_bytes(1), event(1).canonical_bytes(2));
        let mut absent = event(1);
        absent.context.user_agent = None;
        let mut empty = event(1);
        empty.context.user_agent = Some(String::new());
        assert_ne!(absent.canonical_bytes(1), empty.canonical_bytes(1));
    }

    #[test]
    fn an_intact_chain_verifies_and_counts() {
        let stored = chain(&[event(1), event(2), event(3)]);
        assert_eq!(verify(&stored, 3), Ok(3));
    }

    #[test]
    fn a_changed_row_is_found() {
        let mut stored = chain(&[event(1), event(2), event(3)]);
        stored[1].event.action = "api_token.revoked".into();
        assert_eq!(
            verify(&stored, 3),
            Err(ChainBreak::Altered {
                seq: 2,
                id: uuid::Uuid::from_u128(2)
            })
        );
    }

    #[test]
    fn deleted_and_reordered_rows_are_found() {
        let stored = chain(&[event(1), event(2), event(3)]);
        let without_middle = [stored[0].clone(), stored[2].clone()];
        assert!(matches!(
            verify(&without_middle, 3),
            Err(ChainBreak::Missing {
                expected: 2,
                found: 3,
                ..
            })
        ));
        assert_eq!(
            verify(&stored[..2], 3),
            Err(ChainBreak::Truncated { last: 2, head: 3 })
        );
        let mut swapped = stored.clone();
        swapped[1].seq = 3;
        swapped[2].seq = 2;
        swapped.swap(1, 2);
        assert!(matches!(
            verify(&swapped, 3),
            Err(ChainBreak::Altered { seq: 2, .. })
        ));
    }

    #[test]
    fn a_pruned_chain_verifies_from_its_anchor() {
        let stored = chain(&[event(1), event(2), event(3)]);
        let mut verifier = ChainVerifier::from_anchor(1, stored[0].chain_hash);
        verifier.check(&stored[1]).unwrap();
        verifier.check(&stored[2]).unwrap();
        assert_eq!(verifier.finish(3, stored[2].chain_hash), Ok(2));
    }

    #[test]
    fn a_newest_event_rehashed_or_a_head_set_back_is_found() {
        let mut stored = chain(&[event(1), event(2), event(3)]);
        stored[2].event.action = "api_token.revoked".into();
        stored[2].chain_hash = chain_hash(&stored[1].chain_hash, &stored[2].event, 3);
        assert_eq!(
            verify(&stored, 3),
            Err(ChainBreak::HeadMismatch {
                seq: 3,
                id: Some(uuid::Uuid::from_u128(3))
            })
        );
        // The newest event deleted and the head's seq (not its hash) set back to the one before.
        let stored = chain(&[event(1), event(2), event(3)]);
        let mut verifier = ChainVerifier::from_anchor(0, GENESIS);
        verifier.check(&stored[0]).unwrap();
        verifier.check(&stored[1]).unwrap();
        assert!(matches!(
            verifier.finish(2, stored[2].chain_hash),
            Err(ChainBreak::HeadMismatch { seq: 2, .. })
        ));
    }
}
