//! Persistence. One [`Store`] trait, two implementations sharing their SQL: SQLite (the embedded
//! default, WAL) and PostgreSQL (for many replicas). Core types in, core types out.
//!
//! Architecture invariant: this is the only crate with SQL. Every method is one operation and one
//! transaction, durable before it returns.

mod audit;
mod error;
mod pg_migrate;
mod postgres;
#[cfg(test)]
mod query_plans;
mod rows;
mod sql;
mod sqlite;
mod tenants;
#[cfg(feature = "testing")]
pub mod testing;
mod verification;
mod webhooks;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyplane_core::{
    AuditEvent, ChainedEvent, Credential, CredentialId, CredentialKind, Grant, GrantId, GrantKind,
    Rotation, SubjectType, Tenant, TenantId, TokenHash, UserId,
};
use std::sync::Arc;

pub use audit::{AuditChainState, AuditOrder, AuditQuery, PrunedPrefix};
pub use error::{StoreError, StoreFault, Unavailable};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use webhooks::{
    AttemptNext, AttemptRecorded, DeliveryAttempt, DeliveryClaim, DeliveryJob, DeliveryQuery,
    WebhookBacklog, WebhookDelivery, DISABLED_WEBHOOK_ERROR, RETRY_OF_DISABLED_WEBHOOK,
};

/// A page request over one tenant's credentials of one kind, in creation order.
#[derive(Debug, Clone)]
pub struct ListCredentials {
    pub tenant_id: TenantId,
    pub kind: CredentialKind,
    /// Exclusive: only credentials created after this one.
    pub after: Option<CredentialId>,
    /// `None`: every match.
    pub limit: Option<u32>,
    pub include_revoked: bool,
    /// Only live credentials expiring in this window (exclusive start: already expired ones are
    /// not "about to expire").
    pub expiring: Option<ExpiryWindow>,
    /// Canary credentials are listed only when asked for (callers holding the kind's write
    /// right).
    pub include_canaries: bool,
}

/// `expires_at` in `(after, until]`.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryWindow {
    pub after: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

/// One coalesced use of a credential, for [`Store::record_last_used`].
#[derive(Debug, Clone, Copy)]
pub struct CredentialUse {
    pub id: CredentialId,
    pub at: DateTime<Utc>,
    /// The first bytes of the presented secret's hash ([`TokenHash::prefix`]): the credential's
    /// current secret, or its previous one (which has its own `last_used_at`). The store credits
    /// whichever it is when it writes.
    pub secret: [u8; 8],
}

/// A registry token signing key and its self-signed certificate (for the registry's
/// `rootcertbundle`), shared by every replica.
#[derive(Debug, Clone)]
pub struct SigningKey {
    /// libtrust key id, the JWT `kid`.
    pub key_id: String,
    pub private_key: keyplane_core::PrivateKeyPem,
    pub certificate_pem: String,
    pub created_at: DateTime<Utc>,
    /// When a promotion replaced it (set on `previous` only): tokens it signed may be valid until
    /// a token lifetime after that.
    pub signed_until: Option<DateTime<Utc>>,
}

/// The registry signing keys by rotation slot (`keyplane admin registry-key`).
#[derive(Debug, Clone, Default)]
pub struct SigningKeys {
    /// The key tokens are signed with.
    pub current: Option<SigningKey>,
    /// Staged: in the registry's bundle, not signing yet.
    pub next: Option<SigningKey>,
    /// The key the last promotion replaced, in the bundle until it is retired.
    pub previous: Option<SigningKey>,
}

/// A registry signing-key change as one organization with a registry records it: the store calls
/// the change's [`EventOf`] once for each registry, inside the change's transaction (the key signs
/// every organization's registry tokens, so each one's trail says when it changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyChange {
    pub tenant_id: TenantId,
    pub registry_id: uuid::Uuid,
    pub project: String,
    /// The key created, staged, promoted (now current) or retired.
    pub key_id: String,
    /// Staged: the current key it is to replace; promoted: the key it replaced; else `None`.
    pub previous_key_id: Option<String>,
}

/// A change another replica must hear about: cached verifications of this subject (a credential or
/// a grant's subject) are stale, or (`Reset`) every cached verification may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Another process changed the subject, in a tenant it did not name (a replica of a release
    /// from before [`Invalidation::InTenant`]).
    Subject(uuid::Uuid),
    /// Another process changed the subject, in this tenant: only that tenant's revocation streams
    /// need to look.
    InTenant(keyplane_core::TenantId, uuid::Uuid),
    /// This store's own change of the subject, heard back (PostgreSQL delivers a NOTIFY to its
    /// sender's listener too): its writer knew of it at once, unless the commit's answer was lost.
    Echo(uuid::Uuid),
    Reset,
    /// Not an invalidation: the listener's connection is listening (`true`) or was lost and is
    /// being reconnected (`false`; a `Reset` follows every second until it listens again).
    Listening(bool),
}

pub type InvalidationHandler = Arc<dyn Fn(Invalidation) + Send + Sync>;

/// What ends a background task of the store: `true` sent, or the sender dropped.
pub type StopSignal = tokio::sync::watch::Receiver<bool>;

/// Which grants of a tenant to list; `None` fields match anything.
#[derive(Debug, Clone)]
pub struct GrantFilter {
    pub tenant_id: TenantId,
    pub subject_type: Option<SubjectType>,
    pub subject_id: Option<uuid::Uuid>,
    pub kind: Option<GrantKind>,
    pub capability_key: Option<String>,
    pub include_revoked: bool,
    /// Exclusive: only grants created after this one (a page cursor).
    pub after: Option<GrantId>,
    /// `None`: every match.
    pub limit: Option<u32>,
}

impl GrantFilter {
    /// The live grants of one subject: what its rights are computed from.
    pub fn live_for(
        tenant_id: TenantId,
        subject_type: SubjectType,
        subject_id: uuid::Uuid,
    ) -> Self {
        Self {
            tenant_id,
            subject_type: Some(subject_type),
            subject_id: Some(subject_id),
            kind: None,
            capability_key: None,
            include_revoked: false,
            after: None,
            limit: None,
        }
    }
}

/// A web-console session as stored. The cookie value the browser holds is not: only its SHA-256
/// (`id_hash`); the signed-in token and the one-time secrets waiting to be shown
/// ([`ConsoleSecret`]) are sealed under a key derived from the cookie value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    pub id_hash: [u8; 32],
    pub tenant_id: TenantId,
    pub sealed_token: Vec<u8>,
    /// Who signed in, as the console shows it.
    pub label: String,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// The absolute end (absolute timeout, or the signed-in token's expiry).
    pub ends_at: DateTime<Utc>,
    /// A one-time message for the next page.
    pub notice: Option<String>,
}

/// A new secret kept for a console session to show once, in the transaction of the change that
/// made it: the change commits if and only if the secret is kept, so no credential goes live with
/// a secret nobody can see. If the session has ended (signed out in another tab), the write fails
/// with [`StoreError::ConsoleSessionEnded`] and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSecret {
    /// The session that shows it ([`ConsoleSession::id_hash`]).
    pub session: [u8; 32],
    /// Sealed secrets, oldest first; each joins those the session already holds.
    pub sealed: Vec<Vec<u8>>,
    /// The session must not have ended by then.
    pub at: DateTime<Utc>,
    /// A session to start first, the one `sealed` is for: a session whose own credential was
    /// rotated moves to the new secret, and the secret must not wait in the session that ends.
    pub start: Option<ConsoleSession>,
}

/// What a change keeps with itself ([`AnswerOf`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeptAnswer {
    /// The answer of a request made with an `Idempotency-Key`.
    Idempotent(IdempotentAnswer),
    /// A secret a console session shows once.
    ConsoleSecret(ConsoleSecret),
}

impl From<IdempotentAnswer> for KeptAnswer {
    fn from(answer: IdempotentAnswer) -> Self {
        KeptAnswer::Idempotent(answer)
    }
}

/// A public revocation report answered 202 and not yet worked off, as the store keeps it until it
/// is: the reported tokens' hashes (never a token) and the reporting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakReportRecord {
    pub id: uuid::Uuid,
    pub token_hashes: Vec<TokenHash>,
    pub context: keyplane_core::RequestContext,
    pub received_at: DateTime<Utc>,
    /// Leases taken on it so far, the one it is held under included (the receiving replica's is
    /// the first).
    pub attempts: u32,
}

/// One attempt to take an `Idempotency-Key` for a request. The store sees only values derived
/// from the key, never the key itself.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    /// Derived from the key, the tenant and the caller: the record's identity.
    pub lookup_id: [u8; 32],
    pub tenant_id: TenantId,
    pub principal_id: uuid::Uuid,
    /// SHA-256 of the request (method, path, body): the same key with another request is refused.
    pub fingerprint: [u8; 32],
    /// This attempt: only it may complete or release the record it claims.
    pub claim_id: uuid::Uuid,
    pub now: DateTime<Utc>,
    /// Until when this attempt holds the key; a record still in flight after that (its request
    /// crashed) may be claimed again.
    pub locked_until: DateTime<Utc>,
    /// Records created before this have expired: they count as absent.
    pub expired_before: DateTime<Utc>,
}

/// A finished request's answer as the store keeps it: the body is ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// An idempotent request's answer, sealed by the server, and the claim it is kept under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentAnswer {
    /// The record the request claimed ([`IdempotencyClaim::lookup_id`]).
    pub lookup_id: [u8; 32],
    /// The claim that must still hold the record ([`IdempotencyClaim::claim_id`]).
    pub claim_id: uuid::Uuid,
    pub response: StoredResponse,
}

/// How a create or rotate keeps the answer of the request that asked for it with an
/// `Idempotency-Key`: the store calls it, inside the write's transaction, with the record as that
/// transaction wrote it (a rotation's row as rotated, not as read before), and completes the
/// claimed record in the same transaction. So the change commits if and only if its answer is
/// kept: a crash after the commit cannot leave a change whose retry would run it again. If the
/// claim no longer holds the record (its lock ran out and another attempt took the key), the write
/// fails with [`StoreError::IdempotencyClaimLost`] and changes nothing. `None`: no key, nothing to
/// keep. The console keeps a new secret to show the same way ([`KeptAnswer::ConsoleSecret`]).
pub type AnswerOf<'a, T> = Option<&'a (dyn Fn(&T) -> Result<KeptAnswer, StoreError> + Send + Sync)>;

/// What [`Store::claim_idempotency_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyRecord {
    /// The claim holds the key now: run the request, and keep its answer with its change
    /// ([`AnswerOf`]) or release the key.
    Claimed,
    /// Another attempt holds the key and has not finished.
    InFlight { fingerprint: [u8; 32] },
    Completed {
        fingerprint: [u8; 32],
        response: StoredResponse,
    },
}

/// One credential of a [`Store::revoke_credentials`] batch, with the event of its revocation.
#[derive(Debug, Clone, Copy)]
pub struct CredentialRevocation<'a> {
    pub kind: CredentialKind,
    pub id: CredentialId,
    pub event: &'a AuditEvent,
}

/// Makes a write's event from what the write found inside its transaction (a grant it revoked
/// along with its subject, a record as it was just before the change): only there is that known
/// for sure, and there the event is appended.
pub type EventOf<'a, T> = &'a (dyn Fn(&T) -> AuditEvent + Send + Sync);

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`, for logs and `/readyz`.
    fn backend(&self) -> &'static str;

    /// Reads from the database (a table, not only the connection), so a locked or frozen store
    /// does not look healthy.
    async fn ping(&self) -> Result<(), StoreError>;

    /// How the latest writes went: whether they are failing now, and the last transient fault
    /// one met. No I/O.
    fn write_health(&self) -> WriteHealth;

    /// Writes one row larger than a client's change (`meta`'s `write_probe`: the time and 1 MiB
    /// of padding; deleted again), recording the outcome for [`Store::write_health`]: while
    /// writes are failing,
    /// background work calls it so that a store that takes writes again reads as such without
    /// waiting for a client's change (which a degraded replica may not get).
    async fn probe_writes(&self) -> Result<(), StoreError>;

    /// Refreshes the statistics the query planner chooses indexes by, where the backend does
    /// not by itself (SQLite: `PRAGMA optimize`, usually a no-op). For a background task, about
    /// hourly.
    async fn refresh_statistics(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The database server's clock, read on one connection (the best of a few readings, by round
    /// trip), for comparing a replica's clock with it: replicas sharing the store judge time-driven
    /// changes (grace ends, expiry notices, pruning) by their own clocks. `None` where there is no
    /// other clock to compare with (SQLite: one process, on the machine whose clock it is).
    async fn database_clock(&self) -> Result<Option<DatabaseClock>, StoreError>;

    /// Closes every connection, waiting for those in use to be returned. SQLite checkpoints and
    /// removes its WAL. Every later call answers `Unavailable`.
    async fn close(&self);

    /// Whether [`Store::bootstrap_once`] could still do anything. A read only, so a server on a
    /// bootstrapped store writes nothing at start.
    async fn is_bootstrapped(&self) -> Result<bool, StoreError>;

    /// Creates `tenant` and `credential` only if this store has never been bootstrapped and holds
    /// no tenant. Returns whether it did. Safe to race: exactly one caller wins.
    async fn bootstrap_once(
        &self,
        tenant: &Tenant,
        credential: &Credential,
        events: &[AuditEvent],
    ) -> Result<bool, StoreError>;

    async fn get_tenant(&self, id: TenantId) -> Result<Option<Tenant>, StoreError>;

    /// [`Store::insert_credential_within_limit`] with no limit on the tenant's live credentials
    /// (the operator's `admin issue-token`).
    async fn insert_credential(
        &self,
        credential: &Credential,
        event: &AuditEvent,
        answer: AnswerOf<'_, Credential>,
    ) -> Result<(), StoreError> {
        self.insert_credential_within_limit(credential, None, event, answer)
            .await
    }

    /// `Conflict` when a live credential of the same kind and name exists in the tenant;
    /// `LiveCredentialLimit` when the tenant would then hold more than `max_live` live
    /// credentials (a count kept in the same transaction, exact under concurrent creates).
    /// `answer` is called with `credential`.
    async fn insert_credential_within_limit(
        &self,
        credential: &Credential,
        max_live: Option<u64>,
        event: &AuditEvent,
        answer: AnswerOf<'_, Credential>,
    ) -> Result<(), StoreError>;

    /// Bulk import (seeding, migration from another system): all or nothing, in one transaction.
    /// `Conflict` if any live name or secret hash is taken; `NotFound` if a tenant is deleted (as
    /// for every insert, migration 0020). `events` (one per tenant imported into, built by the
    /// caller) are appended in the same transaction.
    async fn import_credentials(
        &self,
        credentials: &[Credential],
        events: &[AuditEvent],
    ) -> Result<(), StoreError>;

    async fn get_credential(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
    ) -> Result<Option<Credential>, StoreError>;

    async fn list_credentials(
        &self,
        query: &ListCredentials,
    ) -> Result<Vec<Credential>, StoreError>;

    /// The verification lookup, on verification's own connections (`store/src/verification.rs`).
    /// The caller still checks revocation and expiry.
    async fn find_credential_by_hash(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<Credential>, StoreError>;

    /// Replaces the secret `replaces`, keeps the id, and sets the previous secret and expiry the
    /// rotation carries (an earlier previous secret ends). `NotFound` if absent; `Conflict` if
    /// revoked, or if its secret is no longer `replaces` (another rotation came first: of
    /// concurrent rotations exactly one succeeds). `answer` is called with the record returned.
    #[allow(clippy::too_many_arguments)] // what is rotated, from which secret, how, and its answer
    async fn rotate_credential(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
        replaces: &TokenHash,
        rotation: &Rotation,
        event: &AuditEvent,
        answer: AnswerOf<'_, Credential>,
    ) -> Result<Credential, StoreError>;

    /// Suspends (`suspended_at: Some`) or resumes (`None`) a credential. Returns the record and
    /// whether it changed; an unchanged one writes no event. `NotFound` if absent, `Conflict` if
    /// revoked. With `while_live`, only while that secret is the credential's (see
    /// [`Store::revoke_credential`]).
    #[allow(clippy::too_many_arguments)] // what is suspended, how, when, on which condition, the event
    async fn set_credential_suspended(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
        suspended_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
        event: &AuditEvent,
        while_live: Option<&TokenHash>,
    ) -> Result<(Credential, bool), StoreError>;

    /// Ends the previous secret `previous` before its grace period does (on demand, or unused).
    /// `None` when it is no longer the credential's previous secret (nothing changed, no event).
    async fn retire_previous_secret(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
        previous: &TokenHash,
        at: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<Option<Credential>, StoreError>;

    /// Live credentials that hold a previous secret, soonest-ending first, at most `limit` (the
    /// sweep reads the first to learn whether any has ended).
    async fn credentials_with_previous_secret(
        &self,
        limit: u32,
    ) -> Result<Vec<Credential>, StoreError>;

    /// Live credentials whose previous secret is to be retired once unused
    /// (`retire_when_unused_seconds`) and whose new secret has been used since the rotation: the
    /// usage-aware cutover's candidates. Soonest-ending previous secret first, after `after` (the
    /// last page's `(previous secret's expires_at, id)`; `None`: from the start), at most `limit`.
    async fn credentials_retiring_previous_when_unused(
        &self,
        after: Option<(DateTime<Utc>, CredentialId)>,
        limit: u32,
    ) -> Result<Vec<Credential>, StoreError>;

    /// Forgets previous secrets whose grace period ended at or before `now` (they already
    /// authenticate nowhere). Returns how many.
    async fn clear_ended_previous_secrets(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Live credentials expiring at or before `due_before` whose announced expiry stage is not yet
    /// at or below `stage` (days: 30, 7, 1, or 0 for expired), soonest first, at most `limit`.
    async fn credentials_due_for_expiry_notice(
        &self,
        stage: u32,
        due_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Credential>, StoreError>;

    /// Records that `stage` was announced for `credential` at its `expires_at`, and appends
    /// `event`, in one transaction, only if no replica did it first (compare-and-set). Returns
    /// whether this call did.
    async fn record_expiry_notice(
        &self,
        credential: &Credential,
        stage: u32,
        event: &AuditEvent,
    ) -> Result<bool, StoreError>;

    /// The tenant's credential policy and when it was set; `None`: never set.
    async fn get_credential_policy(
        &self,
        tenant_id: TenantId,
    ) -> Result<Option<(keyplane_core::CredentialPolicy, DateTime<Utc>)>, StoreError>;

    async fn put_credential_policy(
        &self,
        tenant_id: TenantId,
        policy: &keyplane_core::CredentialPolicy,
        at: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// How many live credentials of `kind` in the tenant break `rule` as of `now`.
    async fn count_credentials_exceeding(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        rule: &keyplane_core::LifetimeRule,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// Permanent and idempotent: revoking again returns the record with its first `revoked_at`,
    /// and writes no event (nothing changed). A service account's live grants are revoked with it,
    /// at the same `revoked_at`, each with the event `grant_event` makes of it, after `event` and
    /// in the same transaction.
    ///
    /// With `while_live` (a leak report's secret) it changes nothing unless that secret is still
    /// the credential's as of `at`: its current one, or its previous one within the grace period.
    /// The report read the credential earlier; a rotation since then must not let it take down a
    /// new secret that never leaked.
    #[allow(clippy::too_many_arguments)] // what is revoked, when, by whom, the two events, and on which condition
    async fn revoke_credential(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
        at: DateTime<Utc>,
        by_user: Option<UserId>,
        event: &AuditEvent,
        grant_event: EventOf<'_, Grant>,
        while_live: Option<&TokenHash>,
    ) -> Result<Credential, StoreError>;

    /// Revokes a batch of `tenant_id`'s credentials in one transaction (one commit, where
    /// [`Store::revoke_credential`] commits each), each with everything that revoke gives it (no
    /// user, no secret condition): `revoked_at = at`, a service account's live grants with
    /// `grant_event`'s event each, its own event then those in the trail (credentials in the
    /// batch's order), their webhook deliveries and, on PostgreSQL, its notifications, as
    /// `revoke_credential` sends them (the batch's in one round trip). A credential already
    /// revoked (by another writer meanwhile) or not the tenant's is skipped, with no event.
    /// Returns those this call revoked, in the batch's order. The transaction holds the tenant's
    /// audit head until it commits: callers keep batches to a page.
    async fn revoke_credentials(
        &self,
        tenant_id: TenantId,
        revocations: &[CredentialRevocation<'_>],
        at: DateTime<Utc>,
        grant_event: EventOf<'_, Grant>,
    ) -> Result<Vec<Credential>, StoreError>;

    /// Replaces a live robot's permissions, with the event `event` makes of the robot as it was
    /// just before, read under the write's row lock (so concurrent updates each record the
    /// permissions they replaced). `NotFound` if absent or revoked.
    async fn update_robot_permissions(
        &self,
        tenant_id: TenantId,
        id: CredentialId,
        permissions: &[keyplane_core::RobotPermission],
        at: DateTime<Utc>,
        event: EventOf<'_, Credential>,
    ) -> Result<Credential, StoreError>;

    /// The tenant's registry and its default robot, atomically. `Conflict` if the tenant has one or
    /// the project name is taken; `LiveCredentialLimit` as [`Store::insert_credential_within_limit`]
    /// for the robot. `answer` is called with `registry`.
    async fn create_registry(
        &self,
        registry: &keyplane_core::Registry,
        default_robot: &Credential,
        max_live: Option<u64>,
        events: &[AuditEvent],
        answer: AnswerOf<'_, keyplane_core::Registry>,
    ) -> Result<(), StoreError>;

    async fn get_registry(
        &self,
        tenant_id: TenantId,
    ) -> Result<Option<keyplane_core::Registry>, StoreError>;

    async fn project_taken(&self, project: &str) -> Result<bool, StoreError>;

    /// Stores `candidate` unless a key exists; returns the stored key either way (first writer wins,
    /// so racing replicas agree). When it stores it, `created`'s event is appended for every
    /// registry in the same transaction.
    async fn signing_key_or_insert(
        &self,
        candidate: &SigningKey,
        created: EventOf<'_, SigningKeyChange>,
    ) -> Result<SigningKey, StoreError>;

    /// Every registry signing key, by slot.
    async fn signing_keys(&self) -> Result<SigningKeys, StoreError>;

    /// Stores `candidate` as the `next` key unless one is staged; returns the staged key either
    /// way (racing callers agree on one). When it stores it, `staged`'s event is appended for
    /// every registry.
    async fn stage_signing_key(
        &self,
        candidate: &SigningKey,
        staged: EventOf<'_, SigningKeyChange>,
    ) -> Result<SigningKey, StoreError>;

    /// In one transaction: `current` becomes `previous` (replacing it) with `signed_until = at`,
    /// and `next` becomes `current`, which is returned; `promoted`'s event for every registry.
    /// `NotFound` when nothing is staged.
    async fn promote_signing_key(
        &self,
        at: DateTime<Utc>,
        promoted: EventOf<'_, SigningKeyChange>,
    ) -> Result<SigningKey, StoreError>;

    /// Drops the `previous` key if it is still `key_id` (a promotion since has replaced it with
    /// another, which stays), with `retired`'s event for every registry; whether it was dropped.
    async fn retire_previous_signing_key(
        &self,
        key_id: &str,
        retired: EventOf<'_, SigningKeyChange>,
    ) -> Result<bool, StoreError>;

    /// `Conflict` when the same live grant exists, or when its subject is a service account of the
    /// tenant that is revoked, suspended or expired at the grant's `created_at` (checked under the
    /// account's row lock, so a grant cannot slip past a concurrent revocation), or when the
    /// subject already holds [`keyplane_core::grant::MAX_LIVE_GRANTS_PER_SUBJECT`] live grants in
    /// the tenant (counted under that lock, or the tenant's audit head for a user or group, so
    /// concurrent grants keep to it). `answer` is called with `grant`.
    async fn insert_grant(
        &self,
        grant: &Grant,
        event: &AuditEvent,
        answer: AnswerOf<'_, Grant>,
    ) -> Result<(), StoreError>;

    /// Grants in creation order.
    async fn list_grants(&self, filter: &GrantFilter) -> Result<Vec<Grant>, StoreError>;

    /// The live grants of one subject in every tenant, by tenant, then creation: what a user's
    /// rights are computed from (a user is not bound to one tenant as a credential is).
    async fn list_grants_of_subject(
        &self,
        subject_type: SubjectType,
        subject_id: uuid::Uuid,
    ) -> Result<Vec<Grant>, StoreError>;

    /// One grant of the tenant, revoked or not.
    async fn get_grant(
        &self,
        tenant_id: TenantId,
        id: GrantId,
    ) -> Result<Option<Grant>, StoreError>;

    /// Permanent and idempotent, like credential revocation (no event when it already was).
    /// `NotFound` outside the tenant.
    async fn revoke_grant(
        &self,
        tenant_id: TenantId,
        id: GrantId,
        at: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<Grant, StoreError>;

    /// Calls `on_event` for every change other processes commit that affects cached verifications,
    /// and for this store's own as [`Invalidation::Echo`], until `stop` turns true (or its sender
    /// is dropped); then the listener lets its connection go. A no-op where one process owns the
    /// store (SQLite).
    fn listen_invalidations(&self, on_event: InvalidationHandler, stop: StopSignal);

    /// Appends an event that comes with no change (a refused attempt) to its tenant's chain.
    /// Idempotent by the event's id: an event already in the trail (a retry of a write whose
    /// commit's acknowledgement was lost: [`StoreError::may_have_committed`]) is not written again.
    async fn append_audit_event(&self, event: &AuditEvent) -> Result<(), StoreError>;

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<ChainedEvent>, StoreError>;

    /// The tenant's chain anchor (after pruning) and head.
    async fn audit_chain_state(&self, tenant_id: TenantId) -> Result<AuditChainState, StoreError>;

    /// Every tenant's newest seq and the chain hash there.
    async fn audit_heads(&self) -> Result<Vec<(TenantId, u64, [u8; 32])>, StoreError>;

    /// Deletes at most `batch` of the oldest events (a prefix of one tenant's chain) that occurred
    /// before `before`, recording the new anchor and appending `pruned`'s event (an
    /// `audit.pruned`, which vouches for the anchor) to that chain in the same transaction.
    /// Returns how many it deleted; 0: nothing is left to prune (or another process pruned the
    /// same events at once). Events are pruned in chain order: an old event behind a younger one
    /// (times need not follow the chain) stays until that one is old too, and does not hold up
    /// other tenants'. `audit.pruned` events are pruned only with an older event of another
    /// action, so that pruning, which appends one, ends. A deleted tenant's trail (ending with
    /// its `organization.deleted`) is pruned without `pruned`'s event: nothing is appended after
    /// its end, and the last of it, the deletion's event, goes once it is old too. With
    /// `exported_by` (an export's consumer name), only events up to that export's cursor for
    /// their tenant: none of a tenant it has no cursor for.
    async fn prune_audit_events(
        &self,
        before: DateTime<Utc>,
        batch: u32,
        exported_by: Option<&str>,
        pruned: EventOf<'_, PrunedPrefix>,
    ) -> Result<u64, StoreError>;

    /// How far the export named `consumer` has written each tenant's chain.
    async fn audit_export_cursors(
        &self,
        consumer: &str,
    ) -> Result<Vec<(TenantId, u64)>, StoreError>;

    async fn save_audit_export_cursors(
        &self,
        consumer: &str,
        cursors: &[(TenantId, u64)],
    ) -> Result<(), StoreError>;

    /// Applies a batch of coalesced `last_used_at` updates in one transaction.
    async fn record_last_used(&self, uses: &[CredentialUse]) -> Result<(), StoreError>;

    /// Takes the key for `claim` unless a live record holds it: a finished one (younger than
    /// `expired_before`) or one in flight whose lock has not run out. Atomic: of racing claims,
    /// exactly one gets [`IdempotencyRecord::Claimed`].
    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<IdempotencyRecord, StoreError>;

    /// Forgets an in-flight record held by `claim_id`, so the key can be used again at once.
    async fn release_idempotency_key(
        &self,
        lookup_id: &[u8; 32],
        claim_id: uuid::Uuid,
    ) -> Result<(), StoreError>;

    /// Deletes up to `limit` records created before `created_before`, oldest first; returns how many.
    async fn prune_idempotency_keys(
        &self,
        created_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Stores a new webhook. `Conflict` when its tenant already has `max_per_tenant`. `answer` is
    /// called with `webhook`.
    async fn create_webhook(
        &self,
        webhook: &keyplane_core::Webhook,
        max_per_tenant: u32,
        event: &AuditEvent,
        answer: AnswerOf<'_, keyplane_core::Webhook>,
    ) -> Result<(), StoreError>;

    /// The tenant's webhooks, oldest first.
    async fn list_webhooks(
        &self,
        tenant_id: TenantId,
    ) -> Result<Vec<keyplane_core::Webhook>, StoreError>;

    async fn get_webhook(
        &self,
        tenant_id: TenantId,
        id: uuid::Uuid,
    ) -> Result<Option<keyplane_core::Webhook>, StoreError>;

    /// Replaces the webhook's URL, patterns, description and enabled flag (its `failing_since`
    /// is cleared when it is enabled again); not its secrets. A disabled webhook's pending
    /// deliveries fail ([`DISABLED_WEBHOOK_ERROR`]) in the same transaction. `NotFound` outside its
    /// tenant.
    async fn update_webhook(
        &self,
        webhook: &keyplane_core::Webhook,
        event: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// Makes `secret` the webhook's signing secret, and the one it replaces its previous secret
    /// until `previous_until`, in one statement. Returns the webhook, which `answer` is called
    /// with. `NotFound` outside the tenant.
    #[allow(clippy::too_many_arguments)] // what is rotated, to what, until when, and its answer
    async fn rotate_webhook_secret(
        &self,
        tenant_id: TenantId,
        id: uuid::Uuid,
        secret: &keyplane_core::WebhookSecret,
        previous_until: DateTime<Utc>,
        at: DateTime<Utc>,
        event: &AuditEvent,
        answer: AnswerOf<'_, keyplane_core::Webhook>,
    ) -> Result<keyplane_core::Webhook, StoreError>;

    /// Deletes the webhook and its deliveries. `NotFound` outside the tenant.
    async fn delete_webhook(
        &self,
        tenant_id: TenantId,
        id: uuid::Uuid,
        event: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// A page of one webhook's deliveries, newest event first.
    async fn list_webhook_deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> Result<Vec<WebhookDelivery>, StoreError>;

    /// Makes a delivery pending again, due at `at`, at `schedule_step` of the retry schedule.
    /// One already pending and due by `at` (queued by a retry whose answer was lost, or being
    /// attempted) is returned unchanged and writes no event. `NotFound` if the tenant's webhook
    /// has no delivery of that event; `Conflict` ([`RETRY_OF_DISABLED_WEBHOOK`]) if the webhook is
    /// disabled.
    async fn retry_webhook_delivery(
        &self,
        tenant_id: TenantId,
        webhook_id: uuid::Uuid,
        event_id: uuid::Uuid,
        at: DateTime<Utc>,
        schedule_step: u32,
        event: &AuditEvent,
    ) -> Result<WebhookDelivery, StoreError>;

    /// Leases up to `claim.limit` due deliveries of enabled webhooks to this claim, each webhook's
    /// oldest first, no webhook past `claim.max_per_webhook` unexpired leases and no tenant past
    /// `claim.max_per_tenant`. Of replicas
    /// claiming at once, each delivery goes to one. A delivery whose stored webhook or event
    /// cannot be read is marked failed under the claim's lease instead of being returned.
    async fn claim_webhook_deliveries(
        &self,
        claim: &DeliveryClaim,
    ) -> Result<Vec<DeliveryJob>, StoreError>;

    /// Moves the lease `lease_id` of the deliveries still pending under it to `until`, and
    /// returns them (webhook id, event id): a claim renews its lease once it has read what
    /// sending takes, so that the lease covers the attempts however long the claim took. A
    /// delivery another claim took once the lease ran out is not returned: not this claim's to
    /// send.
    async fn renew_webhook_lease(
        &self,
        lease_id: uuid::Uuid,
        until: DateTime<Utc>,
    ) -> Result<Vec<(uuid::Uuid, uuid::Uuid)>, StoreError>;

    /// Records an attempt made under `attempt.lease_id` (nothing if that lease was lost). After a
    /// failure, a webhook failing since `disable_failing_since` or earlier is disabled, with
    /// `disable_event`, and its pending deliveries fail ([`DISABLED_WEBHOOK_ERROR`]), in the same
    /// transaction. `disable_failing_since` at `DateTime::<Utc>::MIN_UTC` says the recording
    /// replica's clock is not trusted: a failure then neither starts the webhook's failing period
    /// (stamped by `attempt.at`, which a clock behind would date too early) nor disables it.
    async fn record_webhook_attempt(
        &self,
        attempt: &DeliveryAttempt,
        disable_failing_since: DateTime<Utc>,
        disable_event: &AuditEvent,
    ) -> Result<AttemptRecorded, StoreError>;

    /// How many deliveries are pending (due or waiting for a retry), and since when the oldest.
    async fn webhook_backlog(&self) -> Result<WebhookBacklog, StoreError>;

    /// Deletes up to `limit` finished deliveries queued before `before`; returns how many. First
    /// fails the pending deliveries of disabled webhooks whose lease ended by `now` (an attempt
    /// never recorded, its replica gone), as the disable failed the others
    /// ([`DISABLED_WEBHOOK_ERROR`]).
    async fn prune_webhook_deliveries(
        &self,
        now: DateTime<Utc>,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Stores an accepted public revocation report, leased to `lease_id` until `lease_until` (the
    /// replica that received it works it off at once), unless `max_pending` reports are stored
    /// already: `false` then, and nothing is stored.
    async fn insert_leak_report(
        &self,
        report: &LeakReportRecord,
        lease_id: uuid::Uuid,
        lease_until: DateTime<Utc>,
        max_pending: u32,
    ) -> Result<bool, StoreError>;

    /// Leases to `lease_id` until `lease_until` up to `limit` reports whose lease ran out by
    /// `now` (their replica died, or the store failed their work), oldest first, each one's
    /// `attempts` counting this lease. Of replicas claiming at once, each report goes to one.
    async fn claim_leak_reports(
        &self,
        lease_id: uuid::Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<LeakReportRecord>, StoreError>;

    /// Forgets a report once it is worked off.
    async fn finish_leak_report(&self, id: uuid::Uuid) -> Result<(), StoreError>;

    /// Deletes up to `limit` reports received before `before` (given up), oldest first; returns
    /// how many.
    async fn prune_leak_reports(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Stores a new web-console session, and `event` (its start) in the same transaction.
    async fn insert_console_session(
        &self,
        session: &ConsoleSession,
        event: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// The session `id_hash` if it is live at `now` (before its end, and seen after
    /// `idle_before`), its `last_seen_at` moved to `now`; `None` otherwise.
    async fn touch_console_session(
        &self,
        id_hash: &[u8; 32],
        now: DateTime<Utc>,
        idle_before: DateTime<Utc>,
    ) -> Result<Option<ConsoleSession>, StoreError>;

    /// Sets (or clears) the session's one-time notice.
    async fn set_console_session_notice(
        &self,
        id_hash: &[u8; 32],
        notice: Option<&str>,
    ) -> Result<(), StoreError>;

    /// The sealed one-time secrets the session holds, oldest first, left in place.
    async fn console_session_secrets(&self, id_hash: &[u8; 32])
        -> Result<Vec<Vec<u8>>, StoreError>;

    /// Removes and returns the sealed one-time secrets the session holds, oldest first: of racing
    /// callers, each secret goes to exactly one, so a secret is shown once.
    async fn take_console_session_secrets(
        &self,
        id_hash: &[u8; 32],
    ) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Ends a session (sign-out, or its credential stopped working), appending `event` (its end)
    /// in the same transaction if the session was there to end. Returns whether it was.
    async fn delete_console_session(
        &self,
        id_hash: &[u8; 32],
        event: Option<&AuditEvent>,
    ) -> Result<bool, StoreError>;

    /// Deletes up to `limit` sessions that ended by `now` or were last seen by `idle_before`,
    /// appending `ended(session)` for each in the same transaction (of replicas pruning at once,
    /// each session's end is recorded once); returns how many.
    async fn prune_console_sessions(
        &self,
        now: DateTime<Utc>,
        idle_before: DateTime<Utc>,
        limit: u32,
        ended: EventOf<'_, ConsoleSession>,
    ) -> Result<u64, StoreError>;

    /// A page of live organizations (deleted ones, tombstones, are not listed) in creation order
    /// (`created_at`, then id), each with its registry's project if it has one: `admin list-orgs`.
    async fn list_tenants(&self, page: &TenantPage<'_>) -> Result<Vec<TenantListing>, StoreError>;

    /// `admin create-org`: the tenant, its first credential if given, and the events, in one
    /// transaction. `Conflict` if its id is taken. With [`NewTenant::unique_name`], the check that
    /// no live organization has its name is made in the same transaction, serialised with every
    /// other such creation (SQLite's write lock, taken first; on PostgreSQL a transaction-scoped
    /// advisory lock on the name): of two creating one name at once, exactly one creates it.
    async fn create_tenant(&self, new: &NewTenant<'_>) -> Result<TenantCreated, StoreError>;

    /// The tenant as stored, deleted or not: what `admin audit`, the access review and
    /// `admin delete-org` read (every other lookup, [`Store::get_tenant`], takes a deleted tenant
    /// for an unknown one).
    async fn get_tenant_record(&self, id: TenantId) -> Result<Option<TenantRecord>, StoreError>;

    /// What the tenant holds, counted in one read: what [`Store::purge_tenant`] would delete
    /// (its credentials and grants revoked or not) and its audit events, which stay.
    async fn count_tenant_rows(&self, id: TenantId) -> Result<TenantRows, StoreError>;

    /// Deletes the tenant (`admin delete-org`, once everything in it is revoked): its revoked
    /// credentials and grants `batch` rows a transaction, then in one final transaction, which
    /// refuses (`Conflict`: run it again) if a credential or grant of the tenant is live, what is
    /// left of them, its webhooks (with their deliveries), console sessions, idempotency records
    /// and credential policy; marks the tenant deleted (`deleted_at`: its row, registry row and
    /// audit events stay); marks the store bootstrapped; and appends `deleted`'s event of the
    /// counts. From then on nothing of the tenant can be inserted (migration 0020's triggers
    /// answer `NotFound`). `Ok(None)` if it was deleted already; `NotFound` if there is no such
    /// tenant. Safe to run again after a failure.
    async fn purge_tenant(
        &self,
        id: TenantId,
        at: DateTime<Utc>,
        batch: u32,
        deleted: EventOf<'_, TenantRows>,
    ) -> Result<Option<TenantRows>, StoreError>;

    /// The credentials with these ids, in any tenant and of any kind, revoked or not: ids are
    /// unique across all of them (`admin import-credentials` checks a file's explicit ids are free,
    /// many per query).
    async fn find_credentials_by_ids(
        &self,
        ids: &[CredentialId],
    ) -> Result<Vec<Credential>, StoreError>;

    /// The credentials whose current or previous secret is one of `hashes`, as
    /// [`Store::find_credential_by_hash`] finds them but on the general readers: lookups that are
    /// not verifications (`admin import-credentials` checks a file's secrets are free, many per
    /// query; a leak report looks up the reported secret).
    async fn find_credentials_by_hashes(
        &self,
        hashes: &[TokenHash],
    ) -> Result<Vec<Credential>, StoreError>;
}

/// Which organizations [`Store::list_tenants`] reads.
#[derive(Debug, Clone, Copy)]
pub struct TenantPage<'a> {
    /// Only those with exactly this name.
    pub name: Option<&'a str>,
    /// Exclusive: only those after this one in the listing's order (a page cursor).
    pub after: Option<&'a Tenant>,
    pub limit: u32,
}

/// One organization as [`Store::list_tenants`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantListing {
    pub tenant: Tenant,
    /// Its registry's project, if the registry is enabled.
    pub registry_project: Option<String>,
}

/// What [`Store::create_tenant`] writes.
pub struct NewTenant<'a> {
    pub tenant: &'a Tenant,
    /// Its first credential (`None`: `admin create-org --no-token`).
    pub credential: Option<&'a Credential>,
    pub events: &'a [AuditEvent],
    /// Refuse it if a live organization has its name (a deleted one's name may be taken again).
    pub unique_name: bool,
}

/// What [`Store::create_tenant`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum TenantCreated {
    Created,
    /// Nothing: this live organization has the name (the first created of those that have it).
    NameTaken(Tenant),
}

/// A tenant as stored, with when it was deleted ([`Store::get_tenant_record`]).
#[derive(Debug, Clone)]
pub struct TenantRecord {
    pub tenant: Tenant,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// Rows of one tenant: what deleting it removed or would remove, and the audit events it keeps
/// ([`Store::purge_tenant`], [`Store::count_tenant_rows`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantRows {
    pub credentials: u64,
    pub grants: u64,
    pub webhooks: u64,
    pub console_sessions: u64,
    pub idempotency_records: u64,
    pub credential_policies: u64,
    /// Kept: pruned by audit retention.
    pub audit_events: u64,
}

/// One reading of the database server's clock ([`Store::database_clock`]).
#[derive(Debug, Clone, Copy)]
pub struct DatabaseClock {
    /// The database's time when it answered.
    pub at: DateTime<Utc>,
    /// When the query was sent and its answer received, on this process's monotonic clock.
    pub sent: std::time::Instant,
    pub received: std::time::Instant,
}

impl DatabaseClock {
    pub fn round_trip(&self) -> std::time::Duration {
        self.received.saturating_duration_since(self.sent)
    }

    /// Where the database most likely read its clock: half way through the round trip (off by at
    /// most half of it).
    pub fn midpoint(&self) -> std::time::Instant {
        self.sent + self.round_trip() / 2
    }
}

/// What `/readyz` reports about writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteHealth {
    /// The latest write that finished met a transient fault (and none has succeeded since).
    pub failing: bool,
    /// The last transient fault a write met, and when; kept after writes recover.
    pub last_failure: Option<(StoreFault, DateTime<Utc>)>,
}

/// Records the outcome of every write for [`Store::write_health`].
#[derive(Default)]
pub(crate) struct WriteTracker(std::sync::Mutex<WriteHealth>);

impl WriteTracker {
    /// Passes `outcome` through. Only transient faults and writes that `wrote` says are evidence
    /// change the health: a conflict says nothing about the database, and neither does a
    /// transaction that changed no row (it commits on a full disk or a frozen file system: a
    /// prune that found nothing) or background work's writes, mostly of nothing or of one small
    /// row, no sign that a client's change would go through. Taken for evidence, they had a
    /// failing store read as ready within a background tick.
    pub(crate) fn observe<T>(
        &self,
        outcome: Result<T, StoreError>,
        wrote: impl FnOnce(&T) -> bool,
    ) -> Result<T, StoreError> {
        let fault = match &outcome {
            Ok(done) if wrote(done) => None,
            Ok(_) => return outcome,
            Err(error) => match error.fault() {
                Some(fault) => Some(fault),
                None => return outcome,
            },
        };
        let mut health = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match fault {
            Some(fault) => {
                health.failing = true;
                health.last_failure = Some((fault, Utc::now()));
            }
            None => health.failing = false,
        }
        outcome
    }

    pub(crate) fn health(&self) -> WriteHealth {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What opening a store does with the migrations this keyplane has and the store has not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingMigrations {
    /// Runs them, logging the schema versions from and to.
    Apply,
    /// Refuses the store ([`StoreError::SchemaBehind`]): older keyplane replicas may still be
    /// serving it, and migrating it under them is for the operator to decide. A new store (no
    /// schema at all) is created all the same: nothing can be serving it yet.
    Refuse,
}

/// An open store, and what opening it did to its schema.
pub struct Opened {
    pub store: Arc<dyn Store>,
    /// The schema version it is at: this keyplane's latest migration.
    pub schema: i64,
    /// The version it was at before this open migrated it (0: a new store); `None` when it was
    /// up to date.
    pub migrated_from: Option<i64>,
}

/// This keyplane's schema version, the one it brings a store to: its latest migration (the same
/// number on both backends).
pub fn latest_schema() -> i64 {
    sql::latest_migration(&sqlite::MIGRATOR)
}

/// Opens the store a URL names (`sqlite://...` or `postgres://...`), doing with migrations it has
/// not run what `pending` says.
pub async fn open(url: &str, pending: PendingMigrations) -> Result<Opened, StoreError> {
    if url.starts_with("sqlite:") {
        let (store, migrated_from) = SqliteStore::connect_with(url, pending).await?;
        Ok(Opened {
            store: Arc::new(store),
            schema: sql::latest_migration(&sqlite::MIGRATOR),
            migrated_from,
        })
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let (store, migrated_from) = PostgresStore::connect_with(url, pending).await?;
        Ok(Opened {
            store: Arc::new(store),
            schema: sql::latest_migration(&postgres::MIGRATOR),
            migrated_from,
        })
    } else {
        Err(StoreError::Config(
            "database URL must start with sqlite:// or postgres://".into(),
        ))
    }
}

/// Opens the store a URL names (`sqlite://...` or `postgres://...`) and applies migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    Ok(open(url, PendingMigrations::Apply).await?.store)
}

/// The SQLite URL for a data directory: `<dir>/keyplane.db`.
pub fn sqlite_url_for_data_dir(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("keyplane.db").display())
}
