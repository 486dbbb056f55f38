//! Webhooks' SQL: the endpoints, and their deliveries, which [`QUEUE_DELIVERIES`] queues inside
//! every audit append (so in the writing transaction), and which each replica's worker claims
//! with a lease (a conditional UPDATE: works alike on SQLite and PostgreSQL). Shared by both
//! backends through [`impl_webhooks!`], like [`crate::sql`].

use crate::StoreError;
use chrono::{DateTime, TimeZone, Utc};
use keyplane_core::{
    ActionPattern, ChainedEvent, DeliveryStatus, TenantId, Webhook, WebhookSecret,
};
use uuid::Uuid;

/// Which deliveries of one webhook to list: newest first.
#[derive(Debug, Clone)]
pub struct DeliveryQuery {
    pub tenant_id: TenantId,
    pub webhook_id: Uuid,
    /// Exclusive: only deliveries of events older than this one.
    pub before: Option<Uuid>,
    pub status: Option<DeliveryStatus>,
    pub limit: u32,
}

/// One event to one webhook, and how its attempts went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    pub webhook_id: Uuid,
    /// Also the delivery's id and its `webhook-id` header.
    pub event_id: Uuid,
    pub tenant_id: TenantId,
    pub action: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    /// Pending deliveries only.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<u16>,
    pub last_latency_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// The deliveries not yet made, over every webhook: what an operator watches for receivers
/// that are down or a worker that falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookBacklog {
    /// Pending deliveries, due now or waiting for a retry.
    pub pending: u64,
    /// When the oldest of them was queued; `None` when none is pending.
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

/// A worker's request for due deliveries.
#[derive(Debug, Clone)]
pub struct DeliveryClaim {
    pub now: DateTime<Utc>,
    /// The claimed deliveries are this worker's until then; after it, another may take them.
    pub lease_until: DateTime<Utc>,
    /// Names this claim: only it may record the attempt.
    pub lease_id: Uuid,
    pub limit: u32,
    /// A webhook's deliveries leased at once at most, this claim's and others' (every replica's)
    /// together: the rest of its due deliveries wait, in due order, so that one slow endpoint
    /// holds this many of the workers' slots and no more.
    pub max_per_webhook: u32,
    /// A tenant's deliveries leased at once at most, across its webhooks and every replica: so
    /// that a tenant's many slow endpoints hold this many of the workers' slots and no more.
    pub max_per_tenant: u32,
}

/// A claimed delivery with what sending it takes.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    pub webhook: Webhook,
    pub event_id: Uuid,
    pub attempts: u32,
    /// Delays of the retry schedule used up so far.
    pub schedule_step: u32,
    /// `None` when the event was pruned from the audit trail since it was queued.
    pub event: Option<ChainedEvent>,
}

/// What became of one attempt.
#[derive(Debug, Clone)]
pub struct DeliveryAttempt {
    pub webhook_id: Uuid,
    pub event_id: Uuid,
    pub lease_id: Uuid,
    pub at: DateTime<Utc>,
    pub status_code: Option<u16>,
    pub latency_ms: u64,
    /// Why it failed, in words free of the URL and any secret.
    pub error: Option<String>,
    pub next: AttemptNext,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptNext {
    Succeeded,
    RetryAt(DateTime<Utc>),
    /// The retry schedule is used up.
    Failed,
    /// Failed without being sent (its event was pruned from the audit trail): its endpoint did
    /// not fail, so the webhook's `failing_since` is left alone.
    Abandoned,
}

/// What recording an attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptRecorded {
    Recorded,
    /// Recorded, a success of a webhook that had been failing: its deliveries waiting for a retry
    /// (`brought_forward` of them) are due now rather than at their place in the schedule.
    Recovered {
        brought_forward: u64,
    },
    /// Recorded, and the webhook, failing for too long, was disabled.
    Disabled,
    /// Nothing: the delivery is no longer under the attempt's lease (another claim took it once
    /// the lease ran out, it is no longer pending, or it was deleted).
    NotLeased,
}

/// Queues a delivery of the event being appended to every enabled webhook of its tenant with a
/// matching pattern: one statement, which finds nothing (an index lookup) in a tenant without
/// webhooks.
pub(crate) const QUEUE_DELIVERIES: &str = "INSERT INTO webhook_deliveries (webhook_id, event_id, tenant_id, action, status, attempts, schedule_step, created_ms, next_attempt_ms, locked_until_ms) \
     SELECT w.id, $2, w.tenant_id, $3, 'pending', 0, 0, $4, $4, 0 FROM webhooks w \
     WHERE w.tenant_id = $1 AND w.enabled = TRUE AND EXISTS (SELECT 1 FROM webhook_event_patterns p WHERE p.webhook_id = w.id \
     AND ((p.is_prefix = FALSE AND p.pattern = $3) OR (p.is_prefix = TRUE AND substr($3, 1, length(p.pattern)) = p.pattern)))";

/// Takes the tenant's audit head row, which the transaction's own event (`append_audit`'s
/// `ADVANCE_HEAD`) takes at its end anyway, at its start: on PostgreSQL its row lock then
/// serializes the tenant's writes from their first statement (SQLite has one writer). A head that
/// does not exist yet is created at seq 0 with the genesis hash, which `ADVANCE_HEAD` then moves
/// to seq 1 with that hash, as when it creates the row itself; the caller's event must be the
/// same tenant's, so that the row is never left at seq 0 (a rollback takes it away too; a
/// recorded delivery attempt, which writes no event unless it disables its webhook, is for an
/// event, so its tenant's head exists). Every webhook write takes it first: then no two of them,
/// nor a webhook write and any other event's write (which takes the head, then queues deliveries
/// under a key-share lock on each matching webhook), lock the head and a webhook's rows in
/// opposite orders.
pub(crate) const LOCK_AUDIT_HEAD: &str =
    "INSERT INTO audit_chain_heads (tenant_id, seq, chain_hash) VALUES ($1, 0, $2) \
     ON CONFLICT (tenant_id) DO UPDATE SET seq = audit_chain_heads.seq";

pub(crate) const WEBHOOK_COLUMNS: &str = "id, tenant_id, url, events, description, enabled, secret, previous_secret, previous_secret_until_ms, failing_since_ms, created_at, updated_at";
const MAX_WEBHOOKS_PARAM: &str = "$13";
pub(crate) fn insert_webhook_sql() -> String {
    format!(
        "INSERT INTO webhooks ({WEBHOOK_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 \
         WHERE (SELECT COUNT(*) FROM webhooks WHERE tenant_id = $2) < {MAX_WEBHOOKS_PARAM}"
    )
}
pub(crate) const UPDATE_WEBHOOK: &str = "UPDATE webhooks SET url = $3, events = $4, description = $5, \
     failing_since_ms = CASE WHEN $6 = TRUE AND enabled = FALSE THEN NULL ELSE failing_since_ms END, \
     enabled = $6, updated_at = $7 WHERE tenant_id = $1 AND id = $2";
/// One statement, so that of two rotations at once neither loses the other's secret.
pub(crate) const ROTATE_SECRET: &str =
    "UPDATE webhooks SET previous_secret = secret, previous_secret_until_ms = $3, \
     secret = $4, updated_at = $5 WHERE tenant_id = $1 AND id = $2";
pub(crate) const INSERT_PATTERN: &str =
    "INSERT INTO webhook_event_patterns (webhook_id, pattern, is_prefix) VALUES ($1, $2, $3)";
pub(crate) const DELETE_PATTERNS: &str = "DELETE FROM webhook_event_patterns WHERE webhook_id = $1";
pub(crate) const DELIVERY_COLUMNS: &str = "webhook_id, event_id, tenant_id, action, status, attempts, created_ms, next_attempt_ms, last_attempt_ms, last_status_code, last_latency_ms, last_error";
/// Leases up to `$4` due deliveries of enabled webhooks to the claim `$2` until `$1`, those of the
/// tenants with the fewest in flight first and then the oldest due (`tenant_place`: a row's place
/// among its tenant's due rows plus the tenant's unexpired leases), so that tenants whose slow
/// receivers keep deliveries in flight do not take the free places ahead of one with none, however
/// old their backlog; taking of each webhook only its oldest due ones, and only so many that it has at most
/// `$5` leased, and of each tenant only so many that it has at most `$6` leased (both counting
/// unexpired leases of other claims). A tenant at its share takes no place in the claim, so the
/// others' deliveries go on. The outer conditions are checked again on each row as it is
/// updated, so of replicas racing for a row (PostgreSQL re-reads a row another transaction
/// changed) exactly one leases it. Racing claims see a webhook's (and a tenant's) same oldest
/// rows, so together they keep to `$5` and `$6` too (unless its due rows change between their
/// snapshots).
///
/// Of each webhook's due rows only its oldest `$5` can be leased, so only those (and those due
/// at the same millisecond as the last of them) are read, through the partial index
/// `webhook_deliveries_pending` on (webhook, next attempt, event): `hooks` walks the webhooks
/// with pending deliveries, one index seek each (a loose index scan, which neither backend
/// does by itself); `bounds` finds the next attempt of each one's `$5`th due delivery; `due`
/// reads each one's rows up to it (a CROSS JOIN, which SQLite does in the order written). A webhook whose receiver is slower than its events (a
/// backlog) then costs every claim `$5` rows, not its backlog. Each set is a materialized CTE
/// of its own that nothing needs in any order, so the planner reads each by its index whatever
/// the statistics say: ranked in one query, it may instead walk the whole table by its primary
/// key (which on a SQLite store never analyzed is every finished delivery too, under the write
/// lock). `$5` is at least 1 (`deliveries_claim`). The chosen rows are locked in
/// [`in_lock_order`].
pub(crate) fn claim_deliveries_sql(row_lock: &str) -> String {
    let chosen = in_lock_order(CHOSEN_FOR_CLAIM, row_lock);
    format!("{CLAIM_DELIVERIES} AND {chosen}")
}
const CLAIM_DELIVERIES: &str = "WITH RECURSIVE hooks (id) AS (\
     SELECT (SELECT webhook_id FROM webhook_deliveries WHERE status = 'pending' ORDER BY webhook_id LIMIT 1) \
     UNION ALL SELECT (SELECT d.webhook_id FROM webhook_deliveries d WHERE d.status = 'pending' \
     AND d.webhook_id > h.id ORDER BY d.webhook_id LIMIT 1) FROM hooks h WHERE h.id IS NOT NULL), \
     bounds AS MATERIALIZED (SELECT h.id AS webhook_id, COALESCE((SELECT e.next_attempt_ms FROM webhook_deliveries e \
     WHERE e.webhook_id = h.id AND e.status = 'pending' AND e.next_attempt_ms <= $3 AND e.locked_until_ms <= $3 \
     ORDER BY e.next_attempt_ms, e.event_id LIMIT 1 OFFSET $5 - 1), $3) AS until_ms \
     FROM hooks h WHERE h.id IS NOT NULL), \
     due AS MATERIALIZED (\
     SELECT d.webhook_id, d.event_id, d.tenant_id, d.next_attempt_ms FROM bounds b CROSS JOIN webhook_deliveries d \
     WHERE d.webhook_id = b.webhook_id AND d.status = 'pending' AND d.next_attempt_ms <= b.until_ms \
     AND d.locked_until_ms <= $3), \
     leases AS MATERIALIZED (SELECT webhook_id, tenant_id FROM webhook_deliveries \
     WHERE status = 'pending' AND lease_id IS NOT NULL AND locked_until_ms > $3) \
     UPDATE webhook_deliveries SET locked_until_ms = $1, lease_id = $2 \
     WHERE status = 'pending' AND locked_until_ms <= $3 AND next_attempt_ms <= $3";
/// The deliveries [`CLAIM_DELIVERIES`] leases, read from its sets.
const CHOSEN_FOR_CLAIM: &str = "SELECT webhook_id, event_id FROM (\
     SELECT r.webhook_id, r.event_id, r.next_attempt_ms, \
     ROW_NUMBER() OVER (PARTITION BY r.tenant_id ORDER BY r.next_attempt_ms, r.webhook_id, r.event_id) + COALESCE(t.leased, 0) AS tenant_place \
     FROM (\
     SELECT d.webhook_id, d.event_id, d.tenant_id, d.next_attempt_ms, \
     ROW_NUMBER() OVER (PARTITION BY d.webhook_id ORDER BY d.next_attempt_ms, d.event_id) + COALESCE(l.leased, 0) AS place \
     FROM due d JOIN webhooks w ON w.id = d.webhook_id \
     LEFT JOIN (SELECT webhook_id, COUNT(*) AS leased FROM leases GROUP BY webhook_id) l ON l.webhook_id = d.webhook_id \
     WHERE w.enabled = TRUE) r \
     LEFT JOIN (SELECT tenant_id, COUNT(*) AS leased FROM leases GROUP BY tenant_id) t ON t.tenant_id = r.tenant_id \
     WHERE r.place <= $5) ranked \
     WHERE tenant_place <= $6 ORDER BY tenant_place, next_attempt_ms, webhook_id, event_id LIMIT $4";
/// Whether any delivery is due: a read, so that an idle replica polling for work writes nothing
/// (and a read-only or full store is not written to every poll). It does not weigh the claim's
/// per-webhook limit: when every due delivery waits behind its webhook's lease, the claim that
/// follows leases nothing.
pub(crate) const ANY_DUE: &str = "SELECT 1 FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
     WHERE d.status = 'pending' AND d.next_attempt_ms <= $1 AND d.locked_until_ms <= $1 AND w.enabled = TRUE LIMIT 1";
/// [`WebhookBacklog`]: the pending deliveries are those `webhook_deliveries_due` indexes.
pub(crate) const BACKLOG: &str =
    "SELECT COUNT(*), MIN(created_ms) FROM webhook_deliveries WHERE status = 'pending'";
pub(crate) const CLAIMED_JOBS: &str = "SELECT w.id, w.tenant_id, w.url, w.events, w.description, w.enabled, w.secret, w.previous_secret, w.previous_secret_until_ms, w.failing_since_ms, w.created_at, w.updated_at, \
     d.event_id, d.attempts, d.schedule_step FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
     WHERE d.lease_id = $1 AND d.status = 'pending' ORDER BY d.next_attempt_ms";
/// The events of the deliveries still pending under the claim `$1`: one read for all of them, not
/// one per delivery, since the claim's lease runs while it reads.
pub(crate) fn claimed_events_sql() -> String {
    format!(
        "SELECT {} FROM audit_events WHERE (tenant_id, id) IN \
         (SELECT tenant_id, event_id FROM webhook_deliveries WHERE lease_id = $1 AND status = 'pending')",
        crate::audit::AUDIT_COLUMNS
    )
}
/// Moves the lease `$1` of its pending deliveries to `$2`, locking them in [`in_lock_order`]. A
/// delivery another claim took once the lease ran out carries that claim's lease id, so it is
/// neither moved nor returned.
pub(crate) fn renew_lease_sql(row_lock: &str) -> String {
    let leased = in_lock_order(
        "SELECT webhook_id, event_id FROM webhook_deliveries WHERE lease_id = $1 AND status = 'pending'",
        row_lock,
    );
    format!(
        "UPDATE webhook_deliveries SET locked_until_ms = $2 \
         WHERE lease_id = $1 AND status = 'pending' AND {leased} RETURNING webhook_id, event_id"
    )
}
/// A delivery to be attempted again (`$4` `pending`) whose webhook was disabled while it was being
/// sent fails instead: a disabled webhook has no pending delivery.
pub(crate) const RECORD_ATTEMPT: &str = "UPDATE webhook_deliveries SET status = CASE WHEN $4 = 'pending' \
     AND NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.id = $1 AND w.enabled = TRUE) THEN 'failed' ELSE $4 END, \
     attempts = attempts + 1, \
     schedule_step = schedule_step + 1, next_attempt_ms = $5, locked_until_ms = 0, lease_id = NULL, \
     last_attempt_ms = $6, last_status_code = $7, last_latency_ms = $8, last_error = $9 \
     WHERE webhook_id = $1 AND event_id = $2 AND lease_id = $3";
pub(crate) const WEBHOOK_SUCCEEDED: &str =
    "UPDATE webhooks SET failing_since_ms = NULL WHERE id = $1 AND failing_since_ms IS NOT NULL";
/// Makes the webhook `$1`'s deliveries waiting for a retry due at `$2`: its receiver answers
/// again, so the events of its outage arrive now, not hours later on the retry schedule (the
/// claim still sends at most its per-webhook share at once). Not those leased (being sent). Its
/// own statement, after the success's transaction: locking them in [`in_lock_order`] while
/// holding the succeeded delivery's row could deadlock with a webhook delete.
pub(crate) fn bring_forward_sql(row_lock: &str) -> String {
    let waiting = in_lock_order(
        "SELECT webhook_id, event_id FROM webhook_deliveries WHERE webhook_id = $1 \
         AND status = 'pending' AND next_attempt_ms > $2 AND locked_until_ms <= $2",
        row_lock,
    );
    format!(
        "UPDATE webhook_deliveries SET next_attempt_ms = $2 WHERE webhook_id = $1 \
         AND status = 'pending' AND next_attempt_ms > $2 AND locked_until_ms <= $2 AND {waiting}"
    )
}
pub(crate) const WEBHOOK_FAILED: &str =
    "UPDATE webhooks SET failing_since_ms = COALESCE(failing_since_ms, $2) WHERE id = $1";
/// Turns off a webhook failing since `$2` or earlier; affects no row otherwise.
pub(crate) const DISABLE_FAILING_WEBHOOK: &str =
    "UPDATE webhooks SET enabled = FALSE, updated_at = $3 \
     WHERE id = $1 AND enabled = TRUE AND failing_since_ms IS NOT NULL AND failing_since_ms <= $2";
/// The error of the deliveries a disable ended: the deliveries API shows it.
pub const DISABLED_WEBHOOK_ERROR: &str = "the webhook was disabled before the delivery was made";
/// Fails the pending deliveries of the webhook `$1` with the error `$2` when it is being disabled
/// (`$4`, its new `enabled`, false) or is disabled: no claim takes them (nor scans them: the due index holds pending
/// rows only), the prune removes them after the retention, and enabling the webhook again does not
/// send them all at once. Not those leased at `$3` (being sent): each ends as its receiver
/// answered, its record failing it rather than scheduling a retry ([`RECORD_ATTEMPT`]). So a
/// disabled webhook's pending delivery is one being sent, or one whose attempt was never recorded
/// (its replica died): that one fails once its lease has ended, when the webhook is enabled again
/// (an update runs this before it changes the webhook's row) or at the prune
/// ([`fail_stranded_deliveries_sql`]), never to be sent on re-enable. Locks them in
/// [`in_lock_order`].
pub(crate) fn fail_pending_deliveries_sql(row_lock: &str) -> String {
    let pending = in_lock_order(
        "SELECT webhook_id, event_id FROM webhook_deliveries WHERE webhook_id = $1 \
         AND status = 'pending' AND locked_until_ms <= $3",
        row_lock,
    );
    format!(
        "UPDATE webhook_deliveries SET status = 'failed', locked_until_ms = 0, lease_id = NULL, \
         last_error = $2 WHERE webhook_id = $1 AND status = 'pending' AND locked_until_ms <= $3 \
         AND ($4 = FALSE OR EXISTS (SELECT 1 FROM webhooks w WHERE w.id = $1 AND w.enabled = FALSE)) \
         AND {pending}"
    )
}
/// Fails, as [`fail_pending_deliveries_sql`] does, the pending deliveries of every disabled webhook
/// whose lease ended by `$1` (attempts never recorded), with the error `$2`.
pub(crate) fn fail_stranded_deliveries_sql(row_lock: &str) -> String {
    let stranded = in_lock_order(
        "SELECT d.webhook_id, d.event_id FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
         WHERE w.enabled = FALSE AND d.status = 'pending' AND d.locked_until_ms <= $1",
        row_lock,
    );
    format!(
        "UPDATE webhook_deliveries SET status = 'failed', locked_until_ms = 0, lease_id = NULL, \
         last_error = $2 WHERE status = 'pending' AND locked_until_ms <= $1 AND {stranded}"
    )
}
/// `(webhook_id, event_id) IN` the deliveries `rows` (a sub-select of those columns), locked with
/// `row_lock` (the backend's `ROW_LOCK`) in (webhook, event) order. Every statement that writes
/// deliveries of which another may write some too (a claim, a lease renewal, a disable, the
/// prune, and a webhook delete, `lock_webhook_deliveries`) locks them in this order, or two of
/// them holding rows the other waits for deadlock on PostgreSQL (an UPDATE locks rows in the order
/// its plan finds them). SQLite, whose writes take the whole store, has no row locks (`row_lock`
/// is empty).
fn in_lock_order(rows: &str, row_lock: &str) -> String {
    format!(
        "(webhook_id, event_id) IN (SELECT locked.webhook_id, locked.event_id FROM webhook_deliveries locked \
         WHERE (locked.webhook_id, locked.event_id) IN ({rows}) \
         ORDER BY locked.webhook_id, locked.event_id{row_lock})"
    )
}
/// The delivery is attempted again at `$4`; `$5` is where it stands in the retry schedule. Only
/// while its webhook is enabled: a disabled webhook has no pending delivery. Not when it is
/// already due by `$4` ([`DELIVERY_QUEUED`]).
pub(crate) const RETRY_DELIVERY: &str =
    "UPDATE webhook_deliveries SET status = 'pending', next_attempt_ms = $4, schedule_step = $5 \
     WHERE tenant_id = $1 AND webhook_id = $2 AND event_id = $3 \
     AND NOT (status = 'pending' AND next_attempt_ms <= $4) \
     AND EXISTS (SELECT 1 FROM webhooks w WHERE w.id = $2 AND w.enabled = TRUE)";
/// Whether the delivery is pending and due by `$4` (being attempted, or about to be) on an enabled
/// webhook: a retry then changes nothing.
pub(crate) const DELIVERY_QUEUED: &str =
    "SELECT 1 FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
     WHERE d.tenant_id = $1 AND d.webhook_id = $2 AND d.event_id = $3 \
     AND d.status = 'pending' AND d.next_attempt_ms <= $4 AND w.enabled = TRUE";
/// Why a delivery of a disabled webhook is not retried.
pub const RETRY_OF_DISABLED_WEBHOOK: &str =
    "the webhook is disabled: enable it (PUT with `enabled: true`) first";
/// The condition is in the outer WHERE too (as in [`crate::sql::PRUNE_IDEMPOTENCY_KEYS`]): a
/// delivery retried (set back to pending) while the DELETE waited for its row is kept. Locks them
/// in [`in_lock_order`].
pub(crate) fn prune_deliveries_sql(row_lock: &str) -> String {
    let finished = in_lock_order(
        "SELECT webhook_id, event_id FROM webhook_deliveries WHERE status <> 'pending' \
         AND created_ms < $1 ORDER BY created_ms LIMIT $2",
        row_lock,
    );
    format!("DELETE FROM webhook_deliveries WHERE status <> 'pending' AND created_ms < $1 AND {finished}")
}

pub(crate) fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

pub(crate) fn events_json(patterns: &[ActionPattern]) -> String {
    serde_json::Value::from(
        patterns
            .iter()
            .map(ActionPattern::to_wire)
            .collect::<Vec<_>>(),
    )
    .to_string()
}

fn corrupt(id: Uuid, what: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("stored webhook {id} has a bad {what}"))
}

#[derive(sqlx::FromRow)]
pub(crate) struct WebhookRow {
    id: Uuid,
    tenant_id: Uuid,
    url: String,
    events: String,
    description: String,
    enabled: bool,
    secret: String,
    previous_secret: Option<String>,
    previous_secret_until_ms: Option<i64>,
    failing_since_ms: Option<i64>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<WebhookRow> for Webhook {
    type Error = StoreError;

    fn try_from(row: WebhookRow) -> Result<Self, StoreError> {
        let id = row.id;
        let events: Vec<String> =
            serde_json::from_str(&row.events).map_err(|_| corrupt(id, "event list"))?;
        let events = events
            .iter()
            .map(|e| ActionPattern::parse(e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| corrupt(id, "event pattern"))?;
        let secret = WebhookSecret::from_stored(row.secret).ok_or_else(|| corrupt(id, "secret"))?;
        let previous_secret = match (row.previous_secret, row.previous_secret_until_ms) {
            (Some(previous), Some(until)) => Some((
                WebhookSecret::from_stored(previous).ok_or_else(|| corrupt(id, "secret"))?,
                from_millis(until).ok_or_else(|| corrupt(id, "time"))?,
            )),
            _ => None,
        };
        Ok(Webhook {
            id,
            tenant_id: TenantId::from_uuid(row.tenant_id),
            url: row.url,
            events,
            description: row.description,
            enabled: row.enabled,
            secret,
            previous_secret,
            failing_since: row.failing_since_ms.and_then(from_millis),
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    #[sqlx(flatten)]
    webhook: WebhookRow,
    event_id: Uuid,
    attempts: i64,
    schedule_step: i64,
}

impl JobRow {
    /// The job without its event (set once read); `Err` when the stored webhook is unreadable.
    pub(crate) fn into_job(self) -> Result<DeliveryJob, StoreError> {
        Ok(DeliveryJob {
            event_id: self.event_id,
            attempts: u32::try_from(self.attempts).unwrap_or(u32::MAX),
            schedule_step: u32::try_from(self.schedule_step).unwrap_or(u32::MAX),
            webhook: self.webhook.try_into()?,
            event: None,
        })
    }
}

/// A claimed delivery that cannot be sent because what it is made of does not decode: it fails
/// for good, alone, instead of failing every claim it is part of (it would be the oldest due again
/// once its lease ran out, so no delivery of any tenant would be made).
pub(crate) struct Unreadable {
    pub(crate) webhook_id: Uuid,
    pub(crate) event_id: Uuid,
    /// The delivery's `last_error`, which the tenant sees.
    pub(crate) error: &'static str,
    /// For the operator's log: which column or field, never a stored value.
    pub(crate) reason: String,
}

pub(crate) const UNREADABLE_WEBHOOK: &str = "the stored delivery or its webhook cannot be read";
pub(crate) const UNREADABLE_EVENT: &str = "the stored event cannot be read";

/// Why a row does not decode, naming the column only: sqlx's own message may quote the value.
pub(crate) fn decode_failure(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::ColumnDecode { index, .. } => format!("column {index} does not decode"),
        sqlx::Error::ColumnNotFound(column) => format!("column {column} is missing"),
        _ => "a column does not decode".into(),
    }
}

/// Logs an unreadable delivery by its ids (no stored value: the webhook row holds its secrets).
pub(crate) fn log_unreadable(unreadable: &Unreadable) {
    tracing::error!(
        webhook.id = %unreadable.webhook_id,
        event.id = %unreadable.event_id,
        reason = %unreadable.reason,
        "{}; the delivery is marked failed",
        unreadable.error
    );
}

#[derive(sqlx::FromRow)]
pub(crate) struct DeliveryRow {
    webhook_id: Uuid,
    event_id: Uuid,
    tenant_id: Uuid,
    action: String,
    status: String,
    attempts: i64,
    created_ms: i64,
    next_attempt_ms: i64,
    last_attempt_ms: Option<i64>,
    last_status_code: Option<i64>,
    last_latency_ms: Option<i64>,
    last_error: Option<String>,
}

impl TryFrom<DeliveryRow> for WebhookDelivery {
    type Error = StoreError;

    fn try_from(row: DeliveryRow) -> Result<Self, StoreError> {
        let status =
            DeliveryStatus::parse(&row.status).ok_or_else(|| corrupt(row.webhook_id, "status"))?;
        Ok(WebhookDelivery {
            webhook_id: row.webhook_id,
            event_id: row.event_id,
            tenant_id: TenantId::from_uuid(row.tenant_id),
            action: row.action,
            status,
            attempts: u32::try_from(row.attempts).unwrap_or(u32::MAX),
            created_at: from_millis(row.created_ms)
                .ok_or_else(|| corrupt(row.webhook_id, "time"))?,
            next_attempt_at: (status == DeliveryStatus::Pending)
                .then(|| from_millis(row.next_attempt_ms))
                .flatten(),
            last_attempt_at: row.last_attempt_ms.and_then(from_millis),
            last_status_code: row.last_status_code.and_then(|c| u16::try_from(c).ok()),
            last_latency_ms: row.last_latency_ms.and_then(|l| u64::try_from(l).ok()),
            last_error: row.last_error,
        })
    }
}

/// Implements the webhook methods of [`crate::Store`] for `$store` (over `$db`), called from
/// [`crate::sql::impl_store!`].
macro_rules! impl_webhooks {
    ($store:ty, $db:ty) => {
        impl $store {
            /// See [`LOCK_AUDIT_HEAD`]($crate::webhooks::LOCK_AUDIT_HEAD).
            async fn lock_audit_head(
                tx: &mut sqlx::Transaction<'_, $db>,
                tenant: keyplane_core::TenantId,
            ) -> Result<(), $crate::StoreError> {
                let genesis = $crate::audit::hash_hex(&keyplane_core::audit::GENESIS);
                sqlx::query($crate::webhooks::LOCK_AUDIT_HEAD)
                    .bind(tenant.as_uuid())
                    .bind(genesis)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            /// See [`fail_pending_deliveries_sql`]($crate::webhooks::fail_pending_deliveries_sql):
            /// when `enabled` is false (being disabled), or the webhook is disabled.
            async fn fail_pending_deliveries(
                tx: &mut sqlx::Transaction<'_, $db>,
                webhook_id: uuid::Uuid,
                enabled: bool,
                at: chrono::DateTime<chrono::Utc>,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query(&$crate::webhooks::fail_pending_deliveries_sql(Self::ROW_LOCK))
                    .bind(webhook_id)
                    .bind($crate::webhooks::DISABLED_WEBHOOK_ERROR)
                    .bind($crate::webhooks::millis(at))
                    .bind(enabled)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            async fn insert_patterns(
                tx: &mut sqlx::Transaction<'_, $db>,
                webhook: &keyplane_core::Webhook,
            ) -> Result<(), $crate::StoreError> {
                for pattern in &webhook.events {
                    let (text, is_prefix) = pattern.stored();
                    sqlx::query($crate::webhooks::INSERT_PATTERN)
                        .bind(webhook.id)
                        .bind(text)
                        .bind(is_prefix)
                        .execute(&mut **tx)
                        .await?;
                }
                Ok(())
            }

            async fn webhook_create(
                &self,
                webhook: &keyplane_core::Webhook,
                max_per_tenant: u32,
                event: &keyplane_core::AuditEvent,
                answer: $crate::AnswerOf<'_, keyplane_core::Webhook>,
            ) -> Result<(), $crate::StoreError> {
                use $crate::webhooks::*;
                let mut tx = self.writer.begin().await?;
                // The tenant's row before its head, in the order of every other insert.
                sqlx::query(Self::TENANT_ROW_SHARE)
                    .bind(webhook.tenant_id.as_uuid())
                    .execute(&mut *tx)
                    .await?;
                // Counting the tenant's webhooks and inserting one is not atomic under READ
                // COMMITTED: two creates at once would both see room for one. One at a time.
                Self::lock_audit_head(&mut tx, webhook.tenant_id).await?;
                let (previous, until) = match &webhook.previous_secret {
                    Some((secret, until)) => (Some(secret.expose_secret()), Some(millis(*until))),
                    None => (None, None),
                };
                let inserted = sqlx::query(&insert_webhook_sql())
                    .bind(webhook.id)
                    .bind(webhook.tenant_id.as_uuid())
                    .bind(&webhook.url)
                    .bind(events_json(&webhook.events))
                    .bind(&webhook.description)
                    .bind(webhook.enabled)
                    .bind(webhook.secret.expose_secret())
                    .bind(previous)
                    .bind(until)
                    .bind(webhook.failing_since.map(millis))
                    .bind(webhook.created_at)
                    .bind(webhook.updated_at)
                    .bind(i64::from(max_per_tenant))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if inserted == 0 {
                    return Err($crate::StoreError::Conflict(format!(
                        "an organization has at most {max_per_tenant} webhooks"
                    )));
                }
                Self::insert_patterns(&mut tx, webhook).await?;
                Self::append_audit(&mut tx, event).await?;
                Self::keep_answer(&mut tx, answer, webhook).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn webhook_update(
                &self,
                webhook: &keyplane_core::Webhook,
                event: &keyplane_core::AuditEvent,
            ) -> Result<(), $crate::StoreError> {
                use $crate::webhooks::*;
                let mut tx = self.writer.begin().await?;
                Self::lock_audit_head(&mut tx, webhook.tenant_id).await?;
                // Before the webhook's row changes, while it still tells whether it was disabled.
                Self::fail_pending_deliveries(&mut tx, webhook.id, webhook.enabled, webhook.updated_at)
                    .await?;
                let updated = sqlx::query(UPDATE_WEBHOOK)
                    .bind(webhook.tenant_id.as_uuid())
                    .bind(webhook.id)
                    .bind(&webhook.url)
                    .bind(events_json(&webhook.events))
                    .bind(&webhook.description)
                    .bind(webhook.enabled)
                    .bind(webhook.updated_at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if updated == 0 {
                    return Err($crate::StoreError::NotFound);
                }
                sqlx::query(DELETE_PATTERNS)
                    .bind(webhook.id)
                    .execute(&mut *tx)
                    .await?;
                Self::insert_patterns(&mut tx, webhook).await?;
                Self::append_audit(&mut tx, event).await?;
                tx.commit().await?;
                Ok(())
            }

            #[allow(clippy::too_many_arguments)] // the trait method's, passed on
            async fn secret_rotate(
                &self,
                tenant: keyplane_core::TenantId,
                id: uuid::Uuid,
                secret: &keyplane_core::WebhookSecret,
                previous_until: chrono::DateTime<chrono::Utc>,
                at: chrono::DateTime<chrono::Utc>,
                event: &keyplane_core::AuditEvent,
                answer: $crate::AnswerOf<'_, keyplane_core::Webhook>,
            ) -> Result<keyplane_core::Webhook, $crate::StoreError> {
                use $crate::webhooks::*;
                let mut tx = self.writer.begin().await?;
                Self::lock_audit_head(&mut tx, tenant).await?;
                let rotated = sqlx::query(ROTATE_SECRET)
                    .bind(tenant.as_uuid())
                    .bind(id)
                    .bind(millis(previous_until))
                    .bind(secret.expose_secret())
                    .bind(at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if rotated == 0 {
                    return Err($crate::StoreError::NotFound);
                }
                Self::append_audit(&mut tx, event).await?;
                let sql = format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1");
                let row: WebhookRow = sqlx::query_as(&sql).bind(id).fetch_one(&mut *tx).await?;
                let rotated: keyplane_core::Webhook = row.try_into()?;
                // The answer shows the webhook as this transaction left it.
                Self::keep_answer(&mut tx, answer, &rotated).await?;
                tx.commit().await?;
                Ok(rotated)
            }

            async fn webhook_delete(
                &self,
                tenant: keyplane_core::TenantId,
                id: uuid::Uuid,
                event: &keyplane_core::AuditEvent,
            ) -> Result<(), $crate::StoreError> {
                let mut tx = self.writer.begin().await?;
                // The head before the webhook's row: another write of the tenant holds its head
                // until it commits, and queuing its event's delivery to this webhook waits for
                // the webhook's row (the foreign key's share lock). Deleting first and then
                // waiting for the head would deadlock with it.
                Self::lock_audit_head(&mut tx, event.tenant_id).await?;
                // Its deliveries in the order every write of them takes them, before the delete
                // takes them in its own (the cascade's plan) and holds some while waiting for a
                // claim's.
                Self::lock_webhook_deliveries(&mut tx, tenant, id).await?;
                // Its patterns and deliveries go with it (ON DELETE CASCADE).
                let deleted = sqlx::query("DELETE FROM webhooks WHERE tenant_id = $1 AND id = $2")
                    .bind(tenant.as_uuid())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if deleted == 0 {
                    return Err($crate::StoreError::NotFound);
                }
                Self::append_audit(&mut tx, event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn webhooks_of(
                &self,
                tenant: keyplane_core::TenantId,
                id: Option<uuid::Uuid>,
            ) -> Result<Vec<keyplane_core::Webhook>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM webhooks WHERE tenant_id = $1 AND ($2 IS NULL OR id = $2) ORDER BY id",
                    $crate::webhooks::WEBHOOK_COLUMNS
                );
                let rows: Vec<$crate::webhooks::WebhookRow> = sqlx::query_as(&sql)
                    .bind(tenant.as_uuid())
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn deliveries_of(
                pool: &sqlx::Pool<$db>,
                query: &$crate::DeliveryQuery,
                event_id: Option<uuid::Uuid>,
            ) -> Result<Vec<$crate::WebhookDelivery>, $crate::StoreError> {
                let rows: Vec<$crate::webhooks::DeliveryRow> = Self::delivery_query(query, event_id)
                    .build_query_as()
                    .fetch_all(pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            /// The statement [`Self::deliveries_of`] runs.
            pub(crate) fn delivery_query(
                query: &$crate::DeliveryQuery,
                event_id: Option<uuid::Uuid>,
            ) -> sqlx::QueryBuilder<'static, $db> {
                // Only the conditions that apply: `($n IS NULL OR event_id < $n)` would keep the
                // planner from seeking the primary key to the cursor.
                let mut sql = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM webhook_deliveries WHERE tenant_id = ",
                    $crate::webhooks::DELIVERY_COLUMNS
                ));
                sql.push_bind(query.tenant_id.as_uuid());
                sql.push(" AND webhook_id = ");
                sql.push_bind(query.webhook_id);
                if let Some(before) = query.before {
                    sql.push(" AND event_id < ");
                    sql.push_bind(before);
                }
                if let Some(status) = query.status {
                    sql.push(" AND status = ");
                    sql.push_bind(status.as_str());
                }
                if let Some(event_id) = event_id {
                    sql.push(" AND event_id = ");
                    sql.push_bind(event_id);
                }
                sql.push(" ORDER BY event_id DESC LIMIT ");
                sql.push_bind(i64::from(query.limit));
                sql
            }

            async fn delivery_retry(
                &self,
                tenant: keyplane_core::TenantId,
                webhook_id: uuid::Uuid,
                event_id: uuid::Uuid,
                at: chrono::DateTime<chrono::Utc>,
                schedule_step: u32,
                event: &keyplane_core::AuditEvent,
            ) -> Result<$crate::WebhookDelivery, $crate::StoreError> {
                let mut tx = self.writer.begin().await?;
                Self::lock_audit_head(&mut tx, tenant).await?;
                let updated = sqlx::query($crate::webhooks::RETRY_DELIVERY)
                    .bind(tenant.as_uuid())
                    .bind(webhook_id)
                    .bind(event_id)
                    .bind($crate::webhooks::millis(at))
                    .bind(i64::from(schedule_step))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let queued = updated == 0
                    && sqlx::query($crate::webhooks::DELIVERY_QUEUED)
                        .bind(tenant.as_uuid())
                        .bind(webhook_id)
                        .bind(event_id)
                        .bind($crate::webhooks::millis(at))
                        .fetch_optional(&mut *tx)
                        .await?
                        .is_some();
                if updated == 0 && !queued {
                    // Disabled since the caller looked (or no such delivery).
                    let enabled: Option<(bool,)> =
                        sqlx::query_as("SELECT enabled FROM webhooks WHERE tenant_id = $1 AND id = $2")
                            .bind(tenant.as_uuid())
                            .bind(webhook_id)
                            .fetch_optional(&mut *tx)
                            .await?;
                    return Err(match enabled {
                        Some((false,)) => $crate::StoreError::Conflict(
                            $crate::webhooks::RETRY_OF_DISABLED_WEBHOOK.into(),
                        ),
                        _ => $crate::StoreError::NotFound,
                    });
                }
                if !queued {
                    Self::append_audit(&mut tx, event).await?;
                }
                tx.commit().await?;
                let query = $crate::DeliveryQuery {
                    tenant_id: tenant,
                    webhook_id,
                    before: None,
                    status: None,
                    limit: 1,
                };
                Self::deliveries_of(&self.writer, &query, Some(event_id))
                    .await?
                    .pop()
                    .ok_or($crate::StoreError::NotFound)
            }

            async fn deliveries_due(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::StoreError> {
                let due: Option<(i32,)> = sqlx::query_as($crate::webhooks::ANY_DUE)
                    .bind($crate::webhooks::millis(now))
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(due.is_some())
            }

            async fn deliveries_claim(
                &self,
                claim: &$crate::DeliveryClaim,
            ) -> Result<Vec<$crate::DeliveryJob>, $crate::StoreError> {
                use $crate::webhooks::*;
                if claim.max_per_webhook == 0 {
                    // Nothing to lease (and no `OFFSET -1` in the claim).
                    return Ok(Vec::new());
                }
                let claimed = sqlx::query(&claim_deliveries_sql(Self::ROW_LOCK))
                    .bind(millis(claim.lease_until))
                    .bind(claim.lease_id)
                    .bind(millis(claim.now))
                    .bind(i64::from(claim.limit))
                    .bind(i64::from(claim.max_per_webhook))
                    .bind(i64::from(claim.max_per_tenant))
                    .execute(&self.writer)
                    .await?
                    .rows_affected();
                if claimed == 0 {
                    return Ok(Vec::new());
                }
                // Raw rows, decoded one by one: a row that does not decode fails alone.
                let rows = sqlx::query(CLAIMED_JOBS)
                    .bind(claim.lease_id)
                    .fetch_all(&self.writer)
                    .await?;
                // A failure to fetch is the store's (transient): the claim fails, as before.
                let event_rows = sqlx::query(&claimed_events_sql())
                    .bind(claim.lease_id)
                    .fetch_all(&self.pool)
                    .await?;
                let mut events = std::collections::HashMap::with_capacity(event_rows.len());
                // An event whose key does not decode cannot be told from a pruned one.
                let mut keyless_events = false;
                for event in event_rows {
                    use sqlx::{FromRow, Row};
                    let key = (
                        event.try_get::<uuid::Uuid, _>("tenant_id"),
                        event.try_get::<uuid::Uuid, _>("id"),
                    );
                    let (Ok(tenant_id), Ok(event_id)) = key else {
                        keyless_events = true;
                        continue;
                    };
                    let decoded = $crate::rows::AuditRow::from_row(&event)
                        .map_err(|e| decode_failure(&e))
                        .and_then(|event| {
                            keyplane_core::ChainedEvent::try_from(event).map_err(|e| e.to_string())
                        });
                    events.insert((tenant_id, event_id), decoded);
                }
                let mut jobs = Vec::with_capacity(rows.len());
                let mut unreadable = Vec::new();
                for row in rows {
                    use sqlx::{FromRow, Row};
                    let decoded = JobRow::from_row(&row)
                        .map_err(|e| decode_failure(&e))
                        .and_then(|job| job.into_job().map_err(|e| e.to_string()));
                    let mut job = match decoded {
                        Ok(job) => job,
                        Err(reason) => {
                            // `id` is the webhook's (`w.id = d.webhook_id`).
                            let webhook_id = row.try_get::<uuid::Uuid, _>("id");
                            match (webhook_id, row.try_get::<uuid::Uuid, _>("event_id")) {
                                (Ok(webhook_id), Ok(event_id)) => unreadable.push(Unreadable {
                                    webhook_id,
                                    event_id,
                                    error: UNREADABLE_WEBHOOK,
                                    reason,
                                }),
                                // Not even its key: nothing to mark. Its lease runs out and it is
                                // claimed (and skipped) again, taking one place in a claim.
                                _ => tracing::error!(
                                    lease.id = %claim.lease_id,
                                    "a claimed webhook delivery cannot be read, not even its key"
                                ),
                            }
                            continue;
                        }
                    };
                    // One event may be several webhooks' deliveries.
                    match events.get(&(job.webhook.tenant_id.as_uuid(), job.event_id)) {
                        Some(Ok(event)) => job.event = Some(event.clone()),
                        Some(Err(reason)) => {
                            unreadable.push(Unreadable {
                                webhook_id: job.webhook.id,
                                event_id: job.event_id,
                                error: UNREADABLE_EVENT,
                                reason: reason.clone(),
                            });
                            continue;
                        }
                        None if keyless_events => {
                            unreadable.push(Unreadable {
                                webhook_id: job.webhook.id,
                                event_id: job.event_id,
                                error: UNREADABLE_EVENT,
                                reason: "a claimed event's key does not decode".into(),
                            });
                            continue;
                        }
                        // Pruned from the audit trail since it was queued.
                        None => {}
                    }
                    jobs.push(job);
                }
                for bad in &unreadable {
                    log_unreadable(bad);
                    // Recorded as a final failed attempt under this claim's lease, as the worker
                    // records a pruned event. The webhook's `failing_since` is left alone: its
                    // endpoint did not fail.
                    let at = millis(claim.now);
                    let marked = sqlx::query(RECORD_ATTEMPT)
                        .bind(bad.webhook_id)
                        .bind(bad.event_id)
                        .bind(claim.lease_id)
                        .bind("failed")
                        .bind(at)
                        .bind(at)
                        .bind(None::<i64>)
                        .bind(0_i64)
                        .bind(bad.error)
                        .execute(&self.writer)
                        .await;
                    // Unmarked, it is claimed again once its lease runs out, and marked then.
                    if let Err(error) = marked {
                        tracing::warn!(
                            %error,
                            webhook.id = %bad.webhook_id,
                            event.id = %bad.event_id,
                            "cannot mark an unreadable webhook delivery failed"
                        );
                    }
                }
                Ok(jobs)
            }

            async fn attempt_record(
                &self,
                attempt: &$crate::DeliveryAttempt,
                disable_failing_since: chrono::DateTime<chrono::Utc>,
                disable_event: &keyplane_core::AuditEvent,
            ) -> Result<$crate::AttemptRecorded, $crate::StoreError> {
                use $crate::webhooks::*;
                let (status, next_ms) = match attempt.next {
                    AttemptNext::Succeeded => ("succeeded", millis(attempt.at)),
                    AttemptNext::RetryAt(at) => ("pending", millis(at)),
                    AttemptNext::Failed | AttemptNext::Abandoned => ("failed", millis(attempt.at)),
                };
                let mut tx = self.writer.begin().await?;
                // It may disable the webhook, which is an event: the head first, as every webhook
                // write takes it (see `LOCK_AUDIT_HEAD`).
                Self::lock_audit_head(&mut tx, disable_event.tenant_id).await?;
                let recorded = sqlx::query(RECORD_ATTEMPT)
                    .bind(attempt.webhook_id)
                    .bind(attempt.event_id)
                    .bind(attempt.lease_id)
                    .bind(status)
                    .bind(next_ms)
                    .bind(millis(attempt.at))
                    .bind(attempt.status_code.map(i64::from))
                    .bind(i64::try_from(attempt.latency_ms).unwrap_or(i64::MAX))
                    .bind(&attempt.error)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if recorded == 0 {
                    return Ok(AttemptRecorded::NotLeased);
                }
                let mut disabled = false;
                let mut recovered = false;
                if attempt.next == AttemptNext::Succeeded {
                    recovered = sqlx::query(WEBHOOK_SUCCEEDED)
                        .bind(attempt.webhook_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                } else if attempt.next != AttemptNext::Abandoned
                    && disable_failing_since != chrono::DateTime::<chrono::Utc>::MIN_UTC
                {
                    sqlx::query(WEBHOOK_FAILED)
                        .bind(attempt.webhook_id)
                        .bind(millis(attempt.at))
                        .execute(&mut *tx)
                        .await?;
                    disabled = sqlx::query(DISABLE_FAILING_WEBHOOK)
                        .bind(attempt.webhook_id)
                        .bind(millis(disable_failing_since))
                        .bind(attempt.at)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                    if disabled {
                        Self::fail_pending_deliveries(&mut tx, attempt.webhook_id, false, attempt.at)
                            .await?;
                        Self::append_audit(&mut tx, disable_event).await?;
                    }
                }
                tx.commit().await?;
                if recovered {
                    let brought_forward = sqlx::query(&bring_forward_sql(Self::ROW_LOCK))
                        .bind(attempt.webhook_id)
                        .bind(millis(attempt.at))
                        .execute(&self.writer)
                        .await;
                    // The success is recorded whatever this does: on an error the waiting
                    // deliveries keep their schedule.
                    let brought_forward = match brought_forward {
                        Ok(done) => done.rows_affected(),
                        Err(error) => {
                            tracing::warn!(%error, webhook.id = %attempt.webhook_id, "a webhook answers again, but its deliveries waiting for a retry could not be made due now: they keep their schedule");
                            0
                        }
                    };
                    return Ok(AttemptRecorded::Recovered { brought_forward });
                }
                Ok(if disabled {
                    AttemptRecorded::Disabled
                } else {
                    AttemptRecorded::Recorded
                })
            }

            async fn lease_renew(
                &self,
                lease_id: uuid::Uuid,
                until: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<(uuid::Uuid, uuid::Uuid)>, $crate::StoreError> {
                Ok(sqlx::query_as(&$crate::webhooks::renew_lease_sql(Self::ROW_LOCK))
                    .bind(lease_id)
                    .bind($crate::webhooks::millis(until))
                    .fetch_all(&self.writer)
                    .await?)
            }

            async fn deliveries_backlog(&self) -> Result<$crate::WebhookBacklog, $crate::StoreError> {
                let (pending, oldest): (i64, Option<i64>) =
                    sqlx::query_as($crate::webhooks::BACKLOG)
                        .fetch_one(&self.pool)
                        .await?;
                Ok($crate::WebhookBacklog {
                    pending: u64::try_from(pending).unwrap_or_default(),
                    oldest_queued_at: oldest.and_then($crate::webhooks::from_millis),
                })
            }

            async fn deliveries_prune(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                before: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<u64, $crate::StoreError> {
                // Failed first, so that they are pruned with the others after the retention.
                sqlx::query(&$crate::webhooks::fail_stranded_deliveries_sql(Self::ROW_LOCK))
                    .bind($crate::webhooks::millis(now))
                    .bind($crate::webhooks::DISABLED_WEBHOOK_ERROR)
                    .execute(&self.writer)
                    .await?;
                Ok(sqlx::query(&$crate::webhooks::prune_deliveries_sql(Self::ROW_LOCK))
                    .bind($crate::webhooks::millis(before))
                    .bind(i64::from(limit))
                    .execute(&self.writer)
                    .await?
                    .rows_affected())
            }
        }
    };
}

pub(crate) use impl_webhooks;
