//! A store that can be switched off: every call fails as an unreachable database does, until it
//! is switched back on. For an outage of a store the test cannot take away otherwise (SQLite).
//! It can also hide what one expiry-sweep stage finds, as a store read just before a credential
//! was created would, to replay a sweep racing a create. And it can run retention at the moment a
//! reader of the audit trail asks for a page, to replay pruning racing a reader. And it can hold
//! the next create, rotate or revoke before it reaches the store, or switch itself off right after
//! a create or rotate, to replay a request overtaken while it ran or a process that dies once its
//! change is made. And it can hold lone events before they are written, as a store that does not
//! answer, or fail them, or lose one's acknowledgement after its commit. And it can report its writes failing (`Store::write_health`) whatever they
//! do. And it can answer webhook claims late, as a slow store. And it can fail reading the
//! database's clock alone. And it can leave Idempotency-Key prunes unanswered, as a store that
//! never answers one job's statement.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyplane_core::{
    AuditEvent, ChainedEvent, Credential, CredentialId, CredentialKind, CredentialPolicy, Grant,
    GrantId, LifetimeRule, Rotation, SubjectType, Tenant, TenantId, TokenHash, UserId, Webhook,
};
use keyplane_store::{
    AnswerOf, AuditChainState, AuditOrder, AuditQuery, CredentialRevocation, CredentialUse,
    EventOf, GrantFilter, IdempotencyClaim, IdempotencyRecord, InvalidationHandler,
    ListCredentials, PrunedPrefix, SigningKey, SigningKeyChange, SigningKeys, StopSignal, Store,
    StoreError, StoreFault, Unavailable, WriteHealth,
};
use keyplane_store::{
    AttemptRecorded, DeliveryAttempt, DeliveryClaim, DeliveryJob, DeliveryQuery, WebhookDelivery,
};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

pub struct FaultyStore {
    inner: Arc<dyn Store>,
    down: AtomicBool,
    /// The expiry-notice stage whose query answers nothing; `u32::MAX`: none.
    hidden_expiry_stage: AtomicU32,
    /// Only enabling a registry fails, as a store that went away during that one write would.
    registry_down: AtomicBool,
    /// Only saving the audit export's cursors fails.
    cursor_saves_down: AtomicBool,
    /// Only reading the database's clock fails.
    clock_reads_down: AtomicBool,
    /// Once an audit page after this seq is asked for, every event older than the time is pruned
    /// first.
    prune_on_read: std::sync::Mutex<Option<(u64, DateTime<Utc>)>>,
    /// The next create or rotate waits here before it reaches the store.
    hold_next_change: HoldSlot,
    /// The next create or rotate that succeeds switches the store off.
    down_after_next_change: AtomicBool,
    /// The next revoke waits here before it reaches the store.
    hold_before_next_revoke: HoldSlot,
    /// The next credential lookup by hash waits here before it reaches the store.
    hold_next_hash_lookup: HoldSlot,
    /// The next revoke waits here once the store has made it.
    hold_after_next_revoke: HoldSlot,
    /// While true, every `append_audit_event` waits before it reaches the store.
    audit_appends_held: tokio::sync::watch::Sender<bool>,
    /// While true, every `prune_idempotency_keys` waits before it reaches the store.
    idempotency_prunes_held: tokio::sync::watch::Sender<bool>,
    /// While true, `write_health` says writes are failing (the disk is full).
    writes_reported_failing: AtomicBool,
    /// While true, every `append_audit_event` fails (reads and other writes work).
    audit_appends_down: AtomicBool,
    /// The next `append_audit_event` is made, then fails as a connection lost before the
    /// commit's acknowledgement does.
    lose_next_audit_append_ack: AtomicBool,
    /// A webhook claim that leased something answers this much later, as a store whose reads of
    /// what sending takes are slow.
    slow_webhook_claims: std::sync::Mutex<std::time::Duration>,
    /// While switched off, how long (milliseconds) a credential lookup takes to fail, as one on
    /// a pool that waits for a connection until its timeout.
    failing_lookup_ms: AtomicU64,
    /// How many times `find_credential_by_hash` was called, answered or not.
    hash_lookups: AtomicU64,
    /// How many times `ping` was called, answered or not.
    pings: AtomicU64,
    /// How many times `audit_chain_state` was called for each tenant, answered or not.
    chain_state_reads: std::sync::Mutex<std::collections::HashMap<TenantId, u64>>,
    /// How many more `list_credentials` calls are answered before they fail; `u32::MAX`: all.
    credential_lists_left: AtomicU32,
}

/// The store's side of [`HeldChange`].
struct Hold {
    reached: tokio::sync::oneshot::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
}

/// Where one call waits, once a test arms it.
#[derive(Default)]
struct HoldSlot(std::sync::Mutex<Option<Hold>>);

impl HoldSlot {
    /// The next call to [`Self::pass`] waits until the returned [`HeldChange`] is released.
    fn arm(&self) -> HeldChange {
        let (reached, reached_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release) = tokio::sync::oneshot::channel();
        *self.0.lock().unwrap() = Some(Hold { reached, release });
        HeldChange {
            reached: reached_rx,
            release: release_tx,
        }
    }

    /// Waits here if armed (once), else goes on at once.
    async fn pass(&self) {
        let hold = self.0.lock().unwrap().take();
        if let Some(hold) = hold {
            let _ = hold.reached.send(());
            let _ = hold.release.await;
        }
    }
}

/// A create or rotate held before it reaches the store ([`FaultyStore::hold_next_change`]).
pub struct HeldChange {
    reached: tokio::sync::oneshot::Receiver<()>,
    release: tokio::sync::oneshot::Sender<()>,
}

impl HeldChange {
    /// Waits until a change is held.
    pub async fn reached(&mut self) {
        (&mut self.reached).await.expect("the store holds a change");
    }

    /// Whether the held call was given up (its request's future dropped) within `wait`.
    pub async fn given_up_within(&mut self, wait: std::time::Duration) -> bool {
        tokio::time::timeout(wait, self.release.closed())
            .await
            .is_ok()
    }

    /// Lets the held change go on.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

impl FaultyStore {
    /// A test server on `backend` whose store is wrapped in a `FaultyStore`, and the wrapper.
    pub async fn spawn(
        backend: keyplane_store::testing::Backend,
        config: keyplane_server::config::Config,
    ) -> (crate::helpers::TestApp, Arc<Self>) {
        let mut switch = None;
        let app = crate::helpers::TestApp::spawn_wrapped(backend, config, |store| {
            let faulty = Self::new(store);
            switch = Some(faulty.clone());
            faulty
        })
        .await;
        (app, switch.expect("spawn_wrapped calls its wrapper"))
    }

    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            down: AtomicBool::new(false),
            hidden_expiry_stage: AtomicU32::new(u32::MAX),
            registry_down: AtomicBool::new(false),
            cursor_saves_down: AtomicBool::new(false),
            clock_reads_down: AtomicBool::new(false),
            prune_on_read: std::sync::Mutex::new(None),
            hold_next_change: HoldSlot::default(),
            down_after_next_change: AtomicBool::new(false),
            hold_before_next_revoke: HoldSlot::default(),
            hold_next_hash_lookup: HoldSlot::default(),
            hold_after_next_revoke: HoldSlot::default(),
            audit_appends_held: tokio::sync::watch::Sender::new(false),
            idempotency_prunes_held: tokio::sync::watch::Sender::new(false),
            writes_reported_failing: AtomicBool::new(false),
            audit_appends_down: AtomicBool::new(false),
            lose_next_audit_append_ack: AtomicBool::new(false),
            slow_webhook_claims: std::sync::Mutex::new(std::time::Duration::ZERO),
            failing_lookup_ms: AtomicU64::new(0),
            hash_lookups: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            chain_state_reads: std::sync::Mutex::new(std::collections::HashMap::new()),
            credential_lists_left: AtomicU32::new(u32::MAX),
        })
    }

    /// The next `answered` credential lists (pages of a list) are read; later ones fail, as a
    /// store that went away in the middle of a long list does. `u32::MAX`: all are read again.
    pub fn fail_credential_lists_after(&self, answered: u32) {
        self.credential_lists_left.store(answered, Ordering::SeqCst);
    }

    /// From now on every webhook claim that leased something answers `delay` later.
    pub fn slow_webhook_claims(&self, delay: std::time::Duration) {
        *self.slow_webhook_claims.lock().unwrap() = delay;
    }

    /// While the store is switched off, a credential lookup fails only after `wait`.
    pub fn fail_lookups_after(&self, wait: std::time::Duration) {
        self.failing_lookup_ms
            .store(wait.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many readiness pings were asked so far.
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::SeqCst)
    }

    /// How many times `tenant`'s audit chain state (`audit_chain_state`) was read so far.
    pub fn chain_state_reads(&self, tenant: TenantId) -> u64 {
        self.chain_state_reads
            .lock()
            .unwrap()
            .get(&tenant)
            .copied()
            .unwrap_or(0)
    }

    /// How many credential lookups by hash (`find_credential_by_hash`) were asked so far.
    pub fn hash_lookups(&self) -> u64 {
        self.hash_lookups.load(Ordering::SeqCst)
    }

    /// The next credential lookup by hash (counted in [`Self::hash_lookups`]) waits before it
    /// reaches the store until the returned [`HeldChange`] is released: a slow read.
    pub fn hold_next_hash_lookup(&self) -> HeldChange {
        self.hold_next_hash_lookup.arm()
    }

    /// The next revoke waits before it reaches the store until the returned [`HeldChange`] is
    /// released: what it read before can be changed meanwhile.
    pub fn hold_before_next_revoke(&self) -> HeldChange {
        self.hold_before_next_revoke.arm()
    }

    /// The next revoke, once the store has made (committed) it, waits until the returned
    /// [`HeldChange`] is released: what follows a commit can be cut there.
    pub fn hold_after_next_revoke(&self) -> HeldChange {
        self.hold_after_next_revoke.arm()
    }

    /// Until called again with `false`, every lone event written (`append_audit_event`: canary
    /// triggers, refusals, notices) waits before it reaches the store, as on a store that does
    /// not answer.
    pub fn hold_audit_appends(&self, held: bool) {
        self.audit_appends_held.send_replace(held);
    }

    /// Until called again with `false`, every prune of Idempotency-Key records (a background
    /// job's step) waits before it reaches the store, as on a store that never answers it.
    pub fn hold_idempotency_prunes(&self, held: bool) {
        self.idempotency_prunes_held.send_replace(held);
    }

    /// How many lone events wait, held by [`Self::hold_audit_appends`].
    pub fn audit_appends_waiting(&self) -> usize {
        self.audit_appends_held.receiver_count()
    }

    /// The next lone event written (`append_audit_event`) is committed, then reported failed as
    /// when the connection drops before the commit's acknowledgement arrives.
    pub fn lose_next_audit_append_ack(&self) {
        self.lose_next_audit_append_ack
            .store(true, Ordering::SeqCst);
    }

    /// Until called again with `false`, every lone event written (`append_audit_event`) fails as
    /// on an unreachable store, while everything else works.
    pub fn fail_audit_appends(&self, down: bool) {
        self.audit_appends_down.store(down, Ordering::SeqCst);
    }

    /// The next create or rotate (an organization, credential, registry, grant or webhook) waits
    /// before it reaches the store until the returned [`HeldChange`] is released.
    pub fn hold_next_change(&self) -> HeldChange {
        self.hold_next_change.arm()
    }

    /// Once the next create or rotate has been made, the store is switched off ([`Self::set_down`]):
    /// every later call fails, as if the process lost its store (or died) right after the change.
    pub fn go_down_after_next_change(&self) {
        self.down_after_next_change.store(true, Ordering::SeqCst);
    }

    /// Runs `write`, a create or rotate, with the faults the test asked for.
    async fn change<T>(
        &self,
        write: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.hold_next_change.pass().await;
        let outcome = write.await;
        if outcome.is_ok() && self.down_after_next_change.swap(false, Ordering::SeqCst) {
            self.set_down(true);
        }
        outcome
    }

    /// The first time a page of events after `after_seq` (or later) is read, retention first
    /// deletes every event older than `before`, as if it ran just then.
    pub fn prune_when_read_after(&self, after_seq: u64, before: DateTime<Utc>) {
        *self.prune_on_read.lock().unwrap() = Some((after_seq, before));
    }

    /// Until set again, the sweep's query for this stage finds nothing.
    pub fn hide_expiry_stage(&self, stage: Option<u32>) {
        self.hidden_expiry_stage
            .store(stage.unwrap_or(u32::MAX), Ordering::SeqCst);
    }

    /// Until set again, `write_health` says the latest write failed just now on a full disk, as
    /// the store says once its writes fail (the writes themselves are not changed).
    pub fn report_writes_failing(&self, failing: bool) {
        self.writes_reported_failing
            .store(failing, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Until set again, `create_registry` alone fails (every read still answers).
    pub fn set_registry_down(&self, down: bool) {
        self.registry_down.store(down, Ordering::SeqCst);
    }

    /// Until set again, `save_audit_export_cursors` alone fails (the export reads on).
    pub fn set_cursor_saves_down(&self, down: bool) {
        self.cursor_saves_down.store(down, Ordering::SeqCst);
    }

    /// Until set again, `database_clock` alone fails (the clock check's measurements).
    pub fn set_clock_reads_down(&self, down: bool) {
        self.clock_reads_down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        Self::fail_if(&self.down)
    }

    fn fail_if(switch: &AtomicBool) -> Result<(), StoreError> {
        if switch.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(Unavailable::new(
                StoreFault::Unreachable,
                "switched off by the test",
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.pings.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.ping().await
    }

    async fn database_clock(&self) -> Result<Option<keyplane_store::DatabaseClock>, StoreError> {
        self.check()?;
        Self::fail_if(&self.clock_reads_down)?;
        self.inner.database_clock().await
    }

    fn write_health(&self) -> WriteHealth {
        if self.writes_reported_failing.load(Ordering::SeqCst) {
            return WriteHealth {
                failing: true,
                last_failure: Some((StoreFault::DiskFull, Utc::now())),
            };
        }
        self.inner.write_health()
    }

    async fn probe_writes(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.probe_writes().await
    }

    async fn close(&self) {
        self.inner.close().await
    }

    async fn is_bootstrapped(&self) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.is_bootstrapped().await
    }

    async fn bootstrap_once(
        &self,
        tenant: &Tenant,
        credential: &Credential,
        events: &[AuditEvent],
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.bootstrap_once(tenant, credential, events).await
    }

    async fn get_tenant(&self, id: TenantId) -> Result<Option<Tenant>, StoreError> {
        self.check()?;
        self.inner.get_tenant(id).await
    }

    async fn insert_credential_within_limit(
        &self,
        credential: &Credential,
        max_live: Option<u64>,
        event: &AuditEvent,
        answer: AnswerOf<'_, Credential>,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.change(
            self.inner
                .insert_credential_within_limit(credential, max_live, event, answer),
        )
        .await
    }

    async fn import_credentials(
        &self,
        credentials: &[Credential],
        events: &[AuditEvent],
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.import_credentials(credentials, events).await
    }

    async fn get_credential(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
    ) -> Result<Option<Credential>, StoreError> {
        self.check()?;
        self.inner.get_credential(tenant_id, kind, id).await
    }

    async fn list_credentials(
        &self,
        query: &ListCredentials,
    ) -> Result<Vec<Credential>, StoreError> {
        self.check()?;
        let left =
            self.credential_lists_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                    u32::MAX | 0 => None,
                    left => Some(left - 1),
                });
        if left == Err(0) {
            return Err(StoreError::Unavailable(Unavailable::new(
                StoreFault::Unreachable,
                "switched off by the test in the middle of a list",
            )));
        }
        self.inner.list_credentials(query).await
    }

    async fn find_credential_by_hash(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<Credential>, StoreError> {
        self.hash_lookups.fetch_add(1, Ordering::SeqCst);
        self.hold_next_hash_lookup.pass().await;
        if self.down.load(Ordering::SeqCst) {
            let wait = self.failing_lookup_ms.load(Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        }
        self.check()?;
        self.inner.find_credential_by_hash(hash).await
    }

    async fn rotate_credential(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
        replaces: &TokenHash,
        rotation: &Rotation,
        event: &AuditEvent,
        answer: AnswerOf<'_, Credential>,
    ) -> Result<Credential, StoreError> {
        self.check()?;
        self.change(
            self.inner
                .rotate_credential(tenant_id, kind, id, replaces, rotation, event, answer),
        )
        .await
    }

    async fn set_credential_suspended(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
        suspended_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
        event: &AuditEvent,
        while_live: Option<&TokenHash>,
    ) -> Result<(Credential, bool), StoreError> {
        self.check()?;
        self.inner
            .set_credential_suspended(tenant_id, kind, id, suspended_at, at, event, while_live)
            .await
    }

    async fn retire_previous_secret(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        id: CredentialId,
        previous: &TokenHash,
        at: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<Option<Credential>, StoreError> {
        self.check()?;
        self.inner
            .retire_previous_secret(tenant_id, kind, id, previous, at, event)
            .await
    }

    async fn credentials_with_previous_secret(
        &self,
        limit: u32,
    ) -> Result<Vec<Credential>, StoreError> {
        self.check()?;
        self.inner.credentials_with_previous_secret(limit).await
    }

    async fn credentials_retiring_previous_when_unused(
        &self,
        after: Option<(DateTime<Utc>, CredentialId)>,
        limit: u32,
    ) -> Result<Vec<Credential>, StoreError> {
        self.check()?;
        self.inner
            .credentials_retiring_previous_when_unused(after, limit)
            .await
    }

    async fn clear_ended_previous_secrets(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.clear_ended_previous_secrets(now).await
    }

    async fn credentials_due_for_expiry_notice(
        &self,
        stage: u32,
        due_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Credential>, StoreError> {
        self.check()?;
        if self.hidden_expiry_stage.load(Ordering::SeqCst) == stage {
            return Ok(Vec::new());
        }
        self.inner
            .credentials_due_for_expiry_notice(stage, due_before, limit)
            .await
    }

    async fn record_expiry_notice(
        &self,
        credential: &Credential,
        stage: u32,
        event: &AuditEvent,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner
            .record_expiry_notice(credential, stage, event)
            .await
    }

    async fn get_credential_policy(
        &self,
        tenant_id: TenantId,
    ) -> Result<Option<(CredentialPolicy, DateTime<Utc>)>, StoreError> {
        self.check()?;
        self.inner.get_credential_policy(tenant_id).await
    }

    async fn put_credential_policy(
        &self,
        tenant_id: TenantId,
        policy: &CredentialPolicy,
        at: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner
            .put_credential_policy(tenant_id, policy, at, event)
            .await
    }

    async fn count_credentials_exceeding(
        &self,
        tenant_id: TenantId,
        kind: CredentialKind,
        rule: &LifetimeRule,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        self.check()?;
        self.inner
            .count_credentials_exceeding(tenant_id, kind, rule, now)
            .await
    }

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
    ) -> Result<Credential, StoreError> {
        self.check()?;
        self.hold_before_next_revoke.pass().await;
        let revoked = self
            .inner
            .revoke_credential(
                tenant_id,
                kind,
                id,
                at,
                by_user,
                event,
                grant_event,
                while_live,
            )
            .await;
        self.hold_after_next_revoke.pass().await;
        revoked
    }

    async fn revoke_credentials(
        &self,
        tenant_id: TenantId,
        revocations: &[CredentialRevocation<'_>],
        at: DateTime<Utc>,
        grant_event: EventOf<'_, Grant>,
    ) -> Result<Vec<Credential>, StoreError> {
        self.check()?;
        self.inner
            .revoke_credentials(tenant_id, revocations, at, grant_event)
            .await
    }

    async fn update_robot_permissions(
        &self,
        tenant_id: TenantId,
        id: CredentialId,
        permissions: &[keyplane_core::RobotPermission],
        at: DateTime<Utc>,
        event: EventOf<'_, Credential>,
    ) -> Result<Credential, StoreError> {
        self.check()?;
        self.inner
            .update_robot_permissions(tenant_id, id, permissions, at, event)
            .await
    }

    async fn create_registry(
        &self,
        registry: &keyplane_core::Registry,
        default_robot: &Credential,
        max_live: Option<u64>,
        events: &[AuditEvent],
        answer: AnswerOf<'_, keyplane_core::Registry>,
    ) -> Result<(), StoreError> {
        self.check()?;
        Self::fail_if(&self.registry_down)?;
        self.change(
            self.inner
                .create_registry(registry, default_robot, max_live, events, answer),
        )
        .await
    }

    async fn get_registry(
        &self,
        tenant_id: TenantId,
    ) -> Result<Option<keyplane_core::Registry>, StoreError> {
        self.check()?;
        self.inner.get_registry(tenant_id).await
    }

    async fn project_taken(&self, project: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.project_taken(project).await
    }

    async fn signing_key_or_insert(
        &self,
        candidate: &SigningKey,
        created: EventOf<'_, SigningKeyChange>,
    ) -> Result<SigningKey, StoreError> {
        self.check()?;
        self.inner.signing_key_or_insert(candidate, created).await
    }

    async fn signing_keys(&self) -> Result<SigningKeys, StoreError> {
        self.check()?;
        self.inner.signing_keys().await
    }

    async fn stage_signing_key(
        &self,
        candidate: &SigningKey,
        staged: EventOf<'_, SigningKeyChange>,
    ) -> Result<SigningKey, StoreError> {
        self.check()?;
        self.inner.stage_signing_key(candidate, staged).await
    }

    async fn promote_signing_key(
        &self,
        at: DateTime<Utc>,
        promoted: EventOf<'_, SigningKeyChange>,
    ) -> Result<SigningKey, StoreError> {
        self.check()?;
        self.inner.promote_signing_key(at, promoted).await
    }

    async fn retire_previous_signing_key(
        &self,
        key_id: &str,
        retired: EventOf<'_, SigningKeyChange>,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner
            .retire_previous_signing_key(key_id, retired)
            .await
    }

    async fn insert_grant(
        &self,
        grant: &Grant,
        event: &AuditEvent,
        answer: AnswerOf<'_, Grant>,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.change(self.inner.insert_grant(grant, event, answer))
            .await
    }

    async fn list_grants(&self, filter: &GrantFilter) -> Result<Vec<Grant>, StoreError> {
        self.check()?;
        self.inner.list_grants(filter).await
    }

    async fn list_grants_of_subject(
        &self,
        subject_type: SubjectType,
        subject_id: uuid::Uuid,
    ) -> Result<Vec<Grant>, StoreError> {
        self.check()?;
        self.inner
            .list_grants_of_subject(subject_type, subject_id)
            .await
    }

    async fn get_grant(
        &self,
        tenant_id: TenantId,
        id: GrantId,
    ) -> Result<Option<Grant>, StoreError> {
        self.check()?;
        self.inner.get_grant(tenant_id, id).await
    }

    async fn revoke_grant(
        &self,
        tenant_id: TenantId,
        id: GrantId,
        at: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<Grant, StoreError> {
        self.check()?;
        self.inner.revoke_grant(tenant_id, id, at, event).await
    }

    fn listen_invalidations(&self, on_event: InvalidationHandler, stop: StopSignal) {
        self.inner.listen_invalidations(on_event, stop)
    }

    async fn append_audit_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let _ = self
            .audit_appends_held
            .subscribe()
            .wait_for(|held| !*held)
            .await;
        self.check()?;
        Self::fail_if(&self.audit_appends_down)?;
        self.inner.append_audit_event(event).await?;
        if self
            .lose_next_audit_append_ack
            .swap(false, Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable(Unavailable {
                may_have_committed: true,
                ..Unavailable::new(
                    StoreFault::Unreachable,
                    "the connection dropped before the commit was acknowledged",
                )
            }));
        }
        Ok(())
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<ChainedEvent>, StoreError> {
        self.check()?;
        let prune = {
            let mut armed = self.prune_on_read.lock().unwrap();
            match (*armed, query.order) {
                (Some((from, before)), AuditOrder::OldestAfterSeq(after)) if after >= from => {
                    armed.take();
                    Some(before)
                }
                _ => None,
            }
        };
        if let Some(before) = prune {
            let record = keyplane_server::ops::audit_pruned(before, 1);
            while self
                .inner
                .prune_audit_events(before, 1000, None, &record)
                .await?
                > 0
            {}
        }
        self.inner.list_audit_events(query).await
    }

    async fn audit_chain_state(&self, tenant_id: TenantId) -> Result<AuditChainState, StoreError> {
        *self
            .chain_state_reads
            .lock()
            .unwrap()
            .entry(tenant_id)
            .or_default() += 1;
        self.check()?;
        self.inner.audit_chain_state(tenant_id).await
    }

    async fn audit_heads(&self) -> Result<Vec<(TenantId, u64, [u8; 32])>, StoreError> {
        self.check()?;
        self.inner.audit_heads().await
    }

    async fn prune_audit_events(
        &self,
        before: DateTime<Utc>,
        batch: u32,
        exported_by: Option<&str>,
        pruned: EventOf<'_, PrunedPrefix>,
    ) -> Result<u64, StoreError> {
        self.check()?;
        self.inner
            .prune_audit_events(before, batch, exported_by, pruned)
            .await
    }

    async fn audit_export_cursors(
        &self,
        consumer: &str,
    ) -> Result<Vec<(TenantId, u64)>, StoreError> {
        self.check()?;
        self.inner.audit_export_cursors(consumer).await
    }

    async fn save_audit_export_cursors(
        &self,
        consumer: &str,
        cursors: &[(TenantId, u64)],
    ) -> Result<(), StoreError> {
        self.check()?;
        Self::fail_if(&self.cursor_saves_down)?;
        self.inner
            .save_audit_export_cursors(consumer, cursors)
            .await
    }

    async fn record_last_used(&self, uses: &[CredentialUse]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.record_last_used(uses).await
    }

    async fn claim_idempotency_key(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<IdempotencyRecord, StoreError> {
        self.check()?;
        self.inner.claim_idempotency_key(claim).await
    }

    async fn release_idempotency_key(
        &self,
        lookup_id: &[u8; 32],
        claim_id: uuid::Uuid,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner
            .release_idempotency_key(lookup_id, claim_id)
            .await
    }

    async fn prune_idempotency_keys(
        &self,
        created_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let _ = self
            .idempotency_prunes_held
            .subscribe()
            .wait_for(|held| !*held)
            .await;
        self.check()?;
        self.inner
            .prune_idempotency_keys(created_before, limit)
            .await
    }

    async fn create_webhook(
        &self,
        webhook: &Webhook,
        max_per_tenant: u32,
        event: &AuditEvent,
        answer: AnswerOf<'_, Webhook>,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.change(
            self.inner
                .create_webhook(webhook, max_per_tenant, event, answer),
        )
        .await
    }

    async fn list_webhooks(&self, tenant_id: TenantId) -> Result<Vec<Webhook>, StoreError> {
        self.check()?;
        self.inner.list_webhooks(tenant_id).await
    }

    async fn get_webhook(
        &self,
        tenant_id: TenantId,
        id: uuid::Uuid,
    ) -> Result<Option<Webhook>, StoreError> {
        self.check()?;
        self.inner.get_webhook(tenant_id, id).await
    }

    async fn update_webhook(
        &self,
        webhook: &Webhook,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.update_webhook(webhook, event).await
    }

    async fn rotate_webhook_secret(
        &self,
        tenant_id: TenantId,
        id: uuid::Uuid,
        secret: &keyplane_core::WebhookSecret,
        previous_until: DateTime<Utc>,
        at: DateTime<Utc>,
        event: &AuditEvent,
        answer: AnswerOf<'_, Webhook>,
    ) -> Result<Webhook, StoreError> {
        self.check()?;
        self.change(self.inner.rotate_webhook_secret(
            tenant_id,
            id,
            secret,
            previous_until,
            at,
            event,
            answer,
        ))
        .await
    }

    async fn delete_webhook(
        &self,
        tenant_id: TenantId,
        id: uuid::Uuid,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.delete_webhook(tenant_id, id, event).await
    }

    async fn list_webhook_deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        self.check()?;
        self.inner.list_webhook_deliveries(query).await
    }

    async fn retry_webhook_delivery(
        &self,
        tenant_id: TenantId,
        webhook_id: uuid::Uuid,
        event_id: uuid::Uuid,
        at: DateTime<Utc>,
        schedule_step: u32,
        event: &AuditEvent,
    ) -> Result<WebhookDelivery, StoreError> {
        self.check()?;
        self.inner
            .retry_webhook_delivery(tenant_id, webhook_id, event_id, at, schedule_step, event)
            .await
    }

    async fn claim_webhook_deliveries(
        &self,
        claim: &DeliveryClaim,
    ) -> Result<Vec<DeliveryJob>, StoreError> {
        self.check()?;
        let jobs = self.inner.claim_webhook_deliveries(claim).await?;
        let slow = *self.slow_webhook_claims.lock().unwrap();
        if !jobs.is_empty() && !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
        Ok(jobs)
    }

    async fn renew_webhook_lease(
        &self,
        lease_id: uuid::Uuid,
        until: DateTime<Utc>,
    ) -> Result<Vec<(uuid::Uuid, uuid::Uuid)>, StoreError> {
        self.check()?;
        self.inner.renew_webhook_lease(lease_id, until).await
    }

    async fn record_webhook_attempt(
        &self,
        attempt: &DeliveryAttempt,
        disable_failing_since: DateTime<Utc>,
        disable_event: &AuditEvent,
    ) -> Result<AttemptRecorded, StoreError> {
        self.check()?;
        self.inner
            .record_webhook_attempt(attempt, disable_failing_since, disable_event)
            .await
    }

    async fn webhook_backlog(&self) -> Result<keyplane_store::WebhookBacklog, StoreError> {
        self.check()?;
        self.inner.webhook_backlog().await
    }

    async fn prune_webhook_deliveries(
        &self,
        now: DateTime<Utc>,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.check()?;
        self.inner
            .prune_webhook_deliveries(now, before, limit)
            .await
    }

    async fn insert_leak_report(
        &self,
        report: &keyplane_store::LeakReportRecord,
        lease_id: uuid::Uuid,
        lease_until: DateTime<Utc>,
        max_pending: u32,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.change(
            self.inner
                .insert_leak_report(report, lease_id, lease_until, max_pending),
        )
        .await
    }

    async fn claim_leak_reports(
        &self,
        lease_id: uuid::Uuid,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<keyplane_store::LeakReportRecord>, StoreError> {
        self.check()?;
        self.inner
            .claim_leak_reports(lease_id, now, lease_until, limit)
            .await
    }

    async fn finish_leak_report(&self, id: uuid::Uuid) -> Result<(), StoreError> {
        self.check()?;
        self.inner.finish_leak_report(id).await
    }

    async fn prune_leak_reports(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.prune_leak_reports(before, limit).await
    }

    async fn insert_console_session(
        &self,
        session: &keyplane_store::ConsoleSession,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert_console_session(session, event).await
    }

    async fn touch_console_session(
        &self,
        id_hash: &[u8; 32],
        now: DateTime<Utc>,
        idle_before: DateTime<Utc>,
    ) -> Result<Option<keyplane_store::ConsoleSession>, StoreError> {
        self.check()?;
        self.inner
            .touch_console_session(id_hash, now, idle_before)
            .await
    }

    async fn set_console_session_notice(
        &self,
        id_hash: &[u8; 32],
        notice: Option<&str>,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.set_console_session_notice(id_hash, notice).await
    }

    async fn console_session_secrets(
        &self,
        id_hash: &[u8; 32],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.check()?;
        self.inner.console_session_secrets(id_hash).await
    }

    async fn take_console_session_secrets(
        &self,
        id_hash: &[u8; 32],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.check()?;
        self.inner.take_console_session_secrets(id_hash).await
    }

    async fn delete_console_session(
        &self,
        id_hash: &[u8; 32],
        event: Option<&AuditEvent>,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete_console_session(id_hash, event).await
    }

    async fn prune_console_sessions(
        &self,
        now: DateTime<Utc>,
        idle_before: DateTime<Utc>,
        limit: u32,
        ended: EventOf<'_, keyplane_store::ConsoleSession>,
    ) -> Result<u64, StoreError> {
        self.check()?;
        self.inner
            .prune_console_sessions(now, idle_before, limit, ended)
            .await
    }

    async fn list_tenants(
        &self,
        page: &keyplane_store::TenantPage<'_>,
    ) -> Result<Vec<keyplane_store::TenantListing>, StoreError> {
        self.check()?;
        self.inner.list_tenants(page).await
    }

    async fn create_tenant(
        &self,
        new: &keyplane_store::NewTenant<'_>,
    ) -> Result<keyplane_store::TenantCreated, StoreError> {
        self.check()?;
        self.change(self.inner.create_tenant(new)).await
    }

    async fn get_tenant_record(
        &self,
        id: TenantId,
    ) -> Result<Option<keyplane_store::TenantRecord>, StoreError> {
        self.check()?;
        self.inner.get_tenant_record(id).await
    }

    async fn count_tenant_rows(
        &self,
        id: TenantId,
    ) -> Result<keyplane_store::TenantRows, StoreError> {
        self.check()?;
        self.inner.count_tenant_rows(id).await
    }

    async fn purge_tenant(
        &self,
        id: TenantId,
        at: DateTime<Utc>,
        batch: u32,
        deleted: EventOf<'_, keyplane_store::TenantRows>,
    ) -> Result<Option<keyplane_store::TenantRows>, StoreError> {
        self.check()?;
        self.inner.purge_tenant(id, at, batch, deleted).await
    }

    async fn find_credentials_by_ids(
        &self,
        ids: &[CredentialId],
    ) -> Result<Vec<Credential>, StoreError> {
        self.check()?;
        self.inner.find_credentials_by_ids(ids).await
    }

    async fn find_credentials_by_hashes(
        &self,
        hashes: &[TokenHash],
    ) -> Result<Vec<Credential>, StoreError> {
        self.check()?;
        self.inner.find_credentials_by_hashes(hashes).await
    }
}
