//! The audit trail's SQL: appending an event inside a write's transaction (chaining it under the
//! tenant's head row), reading, pruning and export cursors. Shared by both backends through
//! [`impl_audit!`], like [`crate::sql`].

use crate::StoreError;
use chrono::{DateTime, Utc};
use keyplane_core::audit::{DetailValue, Outcome};
use keyplane_core::TenantId;
use std::collections::BTreeMap;

/// Which events of one tenant to read.
#[derive(Debug, Clone)]
pub struct AuditQuery {
    pub tenant_id: TenantId,
    pub order: AuditOrder,
    pub limit: u32,
    /// Exact action names; any of them (with `action_prefixes`) matches. Both empty: any action.
    pub actions: Vec<String>,
    /// `api_token.` matches every `api_token.*` action.
    pub action_prefixes: Vec<String>,
    pub actor_id: Option<uuid::Uuid>,
    pub target_id: Option<uuid::Uuid>,
    pub outcome: Option<Outcome>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl AuditQuery {
    /// Every event after `seq`, oldest first: what `--follow`, export and verification read.
    pub fn after_seq(tenant_id: TenantId, seq: u64, limit: u32) -> Self {
        Self {
            tenant_id,
            order: AuditOrder::OldestAfterSeq(seq),
            limit,
            actions: Vec::new(),
            action_prefixes: Vec::new(),
            actor_id: None,
            target_id: None,
            outcome: None,
            since: None,
            until: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum AuditOrder {
    /// Newest first, older than the event with this id (`None`: from the newest).
    NewestBefore(Option<uuid::Uuid>),
    /// Oldest first, with `seq` greater than this.
    OldestAfterSeq(u64),
}

/// Where a tenant's chain starts (after pruning) and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditChainState {
    pub anchor_seq: u64,
    pub anchor_hash: [u8; 32],
    pub head_seq: u64,
    pub head_hash: [u8; 32],
    /// Whether the tenant has a head row. Without one the head reads as seq 0 at the genesis
    /// hash: a tenant with no events yet, or one whose head row was deleted.
    pub head_recorded: bool,
}

/// What one pruning batch deleted from a tenant's chain, for the `audit.pruned` event it appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunedPrefix {
    pub tenant_id: TenantId,
    /// The new anchor: the last event deleted, and its chain hash.
    pub through_seq: u64,
    pub through_chain_hash: [u8; 32],
    /// How many events this batch deleted.
    pub count: u64,
}

pub(crate) fn details_json(details: &BTreeMap<String, DetailValue>) -> String {
    let object: serde_json::Map<String, serde_json::Value> = details
        .iter()
        .map(|(key, value)| {
            let value = match value {
                DetailValue::Text(text) => serde_json::Value::from(text.as_str()),
                DetailValue::Count(count) => serde_json::Value::from(*count),
                DetailValue::List(items) => serde_json::Value::from(items.clone()),
            };
            (key.clone(), value)
        })
        .collect();
    serde_json::Value::Object(object).to_string()
}

pub(crate) fn parse_details(json: &str) -> Option<BTreeMap<String, DetailValue>> {
    let serde_json::Value::Object(object) = serde_json::from_str(json).ok()? else {
        return None;
    };
    object
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                serde_json::Value::String(text) => DetailValue::Text(text),
                serde_json::Value::Number(n) => DetailValue::Count(n.as_u64()?),
                serde_json::Value::Array(items) => DetailValue::List(
                    items
                        .into_iter()
                        .map(|i| i.as_str().map(str::to_string))
                        .collect::<Option<_>>()?,
                ),
                _ => return None,
            };
            Some((key, value))
        })
        .collect()
}

pub(crate) fn hash_hex(hash: &[u8; 32]) -> String {
    keyplane_core::audit::hash_hex(hash)
}

pub(crate) fn parse_hash(hex: &str) -> Result<[u8; 32], StoreError> {
    let bad = || {
        StoreError::Other(anyhow::anyhow!(
            "stored audit chain hash is not 64 hex digits"
        ))
    };
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

pub(crate) fn seq_to_db(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

pub(crate) const AUDIT_COLUMNS: &str = "tenant_id, seq, id, occurred_at, action, outcome, actor_type, actor_id, actor_issuer, actor_sub, target_type, target_id, target_name, request_id, client_ip, user_agent, details, chain_hash";

/// Takes the tenant's next seq under its head row (created at seq 1 from the genesis hash): the
/// upsert locks the row on PostgreSQL until commit, so concurrent writers on any replica chain one
/// after another; SQLite has one writer anyway. Returns the new seq and the previous hash.
pub(crate) const ADVANCE_HEAD: &str = "INSERT INTO audit_chain_heads (tenant_id, seq, chain_hash) VALUES ($1, 1, $2) \
     ON CONFLICT (tenant_id) DO UPDATE SET seq = audit_chain_heads.seq + 1 RETURNING seq, chain_hash";
pub(crate) const SET_HEAD_HASH: &str =
    "UPDATE audit_chain_heads SET chain_hash = $2 WHERE tenant_id = $1";
/// Whether the tenant's trail holds the event `$2`.
pub(crate) const AUDIT_EVENT_EXISTS: &str =
    "SELECT 1 FROM audit_events WHERE tenant_id = $1 AND id = $2";
pub(crate) const INSERT_AUDIT_EVENT: &str = "INSERT INTO audit_events (tenant_id, seq, id, occurred_at, action, outcome, actor_type, actor_id, actor_issuer, actor_sub, target_type, target_id, target_name, request_id, client_ip, user_agent, details, chain_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)";

/// An event whose id its tenant's trail holds already: a writer's mistake, not a conflict of
/// the request's (the generic unique-violation text names a credential).
#[derive(Debug, thiserror::Error)]
#[error("audit event {0} is already in its organization's trail")]
pub(crate) struct DuplicateEvent(uuid::Uuid);

/// `error` of appending the event `id`, as a [`DuplicateEvent`] when it is the trail's id
/// uniqueness that refused it.
pub(crate) fn duplicate_event_or(error: sqlx::Error, id: uuid::Uuid) -> crate::StoreError {
    match &error {
        // PostgreSQL names the index; SQLite lists its columns.
        sqlx::Error::Database(db)
            if db.kind() == sqlx::error::ErrorKind::UniqueViolation
                && (db.constraint() == Some("audit_events_id")
                    || db.message().contains("audit_events.id")) =>
        {
            crate::StoreError::Other(anyhow::Error::new(DuplicateEvent(id)))
        }
        _ => error.into(),
    }
}

/// Whether `error` is a [`DuplicateEvent`].
pub(crate) fn is_duplicate_event(error: &crate::StoreError) -> bool {
    matches!(error, crate::StoreError::Other(error) if error.is::<DuplicateEvent>())
}

/// Implements the audit helpers the [`crate::Store`] methods of `$store` (over `$db`) call.
macro_rules! impl_audit {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Appends `event` to its tenant's chain inside `tx`: the caller's change and its event
            /// commit together or not at all.
            async fn append_audit(
                tx: &mut sqlx::Transaction<'_, $db>,
                event: &keyplane_core::AuditEvent,
            ) -> Result<(), $crate::StoreError> {
                use $crate::audit::*;
                let genesis = hash_hex(&keyplane_core::audit::GENESIS);
                let (seq, previous): (i64, String) = sqlx::query_as(ADVANCE_HEAD)
                    .bind(event.tenant_id.as_uuid())
                    .bind(&genesis)
                    .fetch_one(&mut **tx)
                    .await?;
                let seq = u64::try_from(seq).map_err(|_| {
                    $crate::StoreError::Other(anyhow::anyhow!("negative audit seq"))
                })?;
                let hash = keyplane_core::audit::chain_hash(&parse_hash(&previous)?, event, seq);
                let hash = hash_hex(&hash);
                let target = event.target.as_ref();
                sqlx::query(INSERT_AUDIT_EVENT)
                    .bind(event.tenant_id.as_uuid())
                    .bind(seq_to_db(seq))
                    .bind(event.id)
                    .bind(event.occurred_at)
                    .bind(&event.action)
                    .bind(event.outcome.as_str())
                    .bind(event.actor.actor_type.as_str())
                    .bind(event.actor.id)
                    .bind(&event.actor.issuer)
                    .bind(&event.actor.subject)
                    .bind(target.map(|t| t.target_type.as_str()))
                    .bind(target.map(|t| t.id))
                    .bind(target.and_then(|t| t.name.as_deref()))
                    .bind(&event.context.request_id)
                    .bind(&event.context.client_ip)
                    .bind(&event.context.user_agent)
                    .bind(details_json(&event.details))
                    .bind(&hash)
                    .execute(&mut **tx)
                    .await
                    .map_err(|error| duplicate_event_or(error, event.id))?;
                sqlx::query(SET_HEAD_HASH)
                    .bind(event.tenant_id.as_uuid())
                    .bind(&hash)
                    .execute(&mut **tx)
                    .await?;
                // Every event reaches the tenant's webhooks: queued here, so in the same
                // transaction as the change it records.
                sqlx::query($crate::webhooks::QUEUE_DELIVERIES)
                    .bind(event.tenant_id.as_uuid())
                    .bind(event.id)
                    .bind(&event.action)
                    .bind($crate::webhooks::millis(event.occurred_at))
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            /// Keeps an idempotent request's answer, or a console session's secret to show
            /// ([`crate::AnswerOf`]), made of `record` in `tx`, the transaction of the change it
            /// answers. Every change that answers an idempotent
            /// request appends its one event just before, through [`Self::append_audit`]: the two
            /// commit with the change or not at all. Fails, so the caller's transaction rolls
            /// back, when the claim no longer holds the record in flight or the console session ended.
            async fn keep_answer<T: Sync>(
                tx: &mut sqlx::Transaction<'_, $db>,
                answer: $crate::AnswerOf<'_, T>,
                record: &T,
            ) -> Result<(), $crate::StoreError> {
                let Some(seal) = answer else {
                    return Ok(());
                };
                let answer = match seal(record)? {
                    $crate::KeptAnswer::Idempotent(answer) => answer,
                    $crate::KeptAnswer::ConsoleSecret(secret) => {
                        return Self::keep_console_secret(tx, &secret).await
                    }
                };
                let kept = sqlx::query($crate::sql::COMPLETE_IDEMPOTENCY_KEY)
                    .bind(&answer.lookup_id[..])
                    .bind(answer.claim_id)
                    .bind(i32::from(answer.response.status))
                    .bind(&answer.response.nonce)
                    .bind(&answer.response.ciphertext)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                if kept == 1 {
                    Ok(())
                } else {
                    Err($crate::StoreError::IdempotencyClaimLost)
                }
            }

            /// Stores a new console session through `connection` (a transaction's, or the
            /// writer's).
            async fn insert_console_session_in(
                connection: &mut <$db as sqlx::Database>::Connection,
                session: &$crate::ConsoleSession,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query($crate::sql::INSERT_CONSOLE_SESSION)
                    .bind(&session.id_hash[..])
                    .bind(session.tenant_id.as_uuid())
                    .bind(&session.sealed_token)
                    .bind(&session.label)
                    .bind(session.created_at.timestamp_millis())
                    .bind(session.last_seen_at.timestamp_millis())
                    .bind(session.ends_at.timestamp_millis())
                    .execute(connection)
                    .await?;
                Ok(())
            }

            async fn keep_console_secret(
                tx: &mut sqlx::Transaction<'_, $db>,
                secret: &$crate::ConsoleSecret,
            ) -> Result<(), $crate::StoreError> {
                if let Some(session) = &secret.start {
                    Self::insert_console_session_in(&mut **tx, session).await?;
                }
                for sealed in &secret.sealed {
                    let kept = sqlx::query($crate::sql::KEEP_CONSOLE_SESSION_SECRET)
                        .bind(&secret.session[..])
                        .bind(sealed)
                        .bind(secret.at.timestamp_millis())
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                    if kept != 1 {
                        return Err($crate::StoreError::ConsoleSessionEnded);
                    }
                }
                Ok(())
            }

            async fn query_audit(
                pool: &sqlx::Pool<$db>,
                query: &$crate::AuditQuery,
            ) -> Result<Vec<keyplane_core::ChainedEvent>, $crate::StoreError> {
                let rows: Vec<$crate::rows::AuditRow> = Self::audit_query(query)
                    .build_query_as()
                    .fetch_all(pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            /// The statement [`Self::query_audit`] runs: only the conditions that apply, each
            /// a plain comparison (`($n IS NULL OR col = $n)` would keep the planner from the
            /// indexes on (tenant, target / actor / action, seq) and (tenant, time)).
            pub(crate) fn audit_query(
                query: &$crate::AuditQuery,
            ) -> sqlx::QueryBuilder<'static, $db> {
                use $crate::audit::*;
                let mut sql = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE tenant_id = "
                ));
                sql.push_bind(query.tenant_id.as_uuid());
                match query.order {
                    AuditOrder::NewestBefore(Some(cursor)) => {
                        sql.push(" AND seq < (SELECT seq FROM audit_events WHERE tenant_id = ");
                        sql.push_bind(query.tenant_id.as_uuid());
                        sql.push(" AND id = ");
                        sql.push_bind(cursor);
                        sql.push(")");
                    }
                    AuditOrder::NewestBefore(None) => {}
                    AuditOrder::OldestAfterSeq(after) => {
                        sql.push(" AND seq > ");
                        sql.push_bind(seq_to_db(after));
                    }
                }
                if !query.actions.is_empty() || !query.action_prefixes.is_empty() {
                    // No constant term: SQLite does not drop one from an OR, and an OR with a
                    // term no index serves reads the tenant's whole chain.
                    let mut separator = " AND (";
                    for action in &query.actions {
                        sql.push(separator);
                        sql.push("action = ");
                        sql.push_bind(action.clone());
                        separator = " OR ";
                    }
                    for prefix in &query.action_prefixes {
                        // Compared as a leading substring: no LIKE, so `_` and `%` mean themselves.
                        sql.push(separator);
                        sql.push("substr(action, 1, ");
                        sql.push_bind(i32::try_from(prefix.len()).unwrap_or(i32::MAX));
                        sql.push(") = ");
                        sql.push_bind(prefix.clone());
                        separator = " OR ";
                    }
                    sql.push(")");
                }
                if let Some(actor) = query.actor_id {
                    sql.push(" AND actor_id = ");
                    sql.push_bind(actor);
                }
                if let Some(target) = query.target_id {
                    sql.push(" AND target_id = ");
                    sql.push_bind(target);
                }
                if let Some(outcome) = query.outcome {
                    sql.push(" AND outcome = ");
                    sql.push_bind(outcome.as_str());
                }
                if let Some(since) = query.since {
                    sql.push(" AND occurred_at >= ");
                    sql.push_bind(since);
                }
                if let Some(until) = query.until {
                    sql.push(" AND occurred_at < ");
                    sql.push_bind(until);
                }
                sql.push(match query.order {
                    AuditOrder::NewestBefore(_) => " ORDER BY seq DESC LIMIT ",
                    AuditOrder::OldestAfterSeq(_) => " ORDER BY seq ASC LIMIT ",
                });
                sql.push_bind(i64::from(query.limit));
                sql
            }

            async fn audit_chain_state_of(
                pool: &sqlx::Pool<$db>,
                tenant: keyplane_core::TenantId,
            ) -> Result<$crate::AuditChainState, $crate::StoreError> {
                use $crate::audit::*;
                let head: Option<(i64, String)> = sqlx::query_as(
                    "SELECT seq, chain_hash FROM audit_chain_heads WHERE tenant_id = $1",
                )
                .bind(tenant.as_uuid())
                .fetch_optional(pool)
                .await?;
                let anchor: Option<(i64, String)> = sqlx::query_as(
                    "SELECT seq, chain_hash FROM audit_chain_anchors WHERE tenant_id = $1",
                )
                .bind(tenant.as_uuid())
                .fetch_optional(pool)
                .await?;
                let genesis = keyplane_core::audit::GENESIS;
                let head_recorded = head.is_some();
                let (head_seq, head_hash) = match head {
                    Some((seq, hash)) => (seq.max(0) as u64, parse_hash(&hash)?),
                    None => (0, genesis),
                };
                let (anchor_seq, anchor_hash) = match anchor {
                    Some((seq, hash)) => (seq.max(0) as u64, parse_hash(&hash)?),
                    None => (0, genesis),
                };
                Ok($crate::AuditChainState {
                    anchor_seq,
                    anchor_hash,
                    head_seq,
                    head_hash,
                    head_recorded,
                })
            }

            /// Deletes up to `batch` of the oldest events, older than `before`, of a tenant whose
            /// chain begins with such an event, only as a prefix of its chain, moves its anchor to
            /// the last one deleted and appends `pruned`'s event there (not in a deleted
            /// tenant's trail). 0: no tenant's chain begins with one. With `exported_by`, only
            /// events that export's cursor has passed.
            async fn prune_audit_batch(
                pool: &sqlx::Pool<$db>,
                before: chrono::DateTime<chrono::Utc>,
                batch: u32,
                exported_by: Option<&str>,
                pruned: $crate::EventOf<'_, $crate::PrunedPrefix>,
            ) -> Result<u64, $crate::StoreError> {
                use keyplane_core::audit::actions::AUDIT_PRUNED;
                // Immediate on SQLite: it reads before it writes, and a deferred transaction
                // whose snapshot another process (`keyplane admin`) wrote past cannot write
                // (SQLITE_BUSY_SNAPSHOT).
                let mut tx = pool.begin_with(Self::BEGIN_WRITE).await?;
                // The tenant and its chain's first events, in one snapshot. Not merely the
                // tenant with the oldest event: events are chained in seq order, which times
                // need not follow (clocks of replicas, events recorded after their time), and
                // a tenant whose chain begins with a younger event has no prefix to prune; it
                // would be chosen again and again while the others' old events stay. The
                // `audit.pruned` events a pruning leaves do not count as a beginning: a chain
                // holding only those (and young events) has nothing to prune, or pruning them
                // would append another, for ever.
                // An export's cursor bounds it too (the export is the archive): a tenant whose
                // oldest event the export has not written is not chosen.
                let exported = if exported_by.is_some() {
                    " AND e.seq <= COALESCE((SELECT c.seq FROM audit_export_cursors c \
                     WHERE c.consumer = $4 AND c.tenant_id = e.tenant_id), 0)"
                } else {
                    ""
                };
                let sql = format!(
                    "SELECT tenant_id, seq, chain_hash, occurred_at, action FROM audit_events \
                     WHERE tenant_id = (SELECT e.tenant_id FROM audit_events e \
                     WHERE e.occurred_at < $1 AND e.action <> $3{exported} \
                     AND NOT EXISTS (SELECT 1 FROM audit_events p \
                     WHERE p.tenant_id = e.tenant_id AND p.seq < e.seq \
                     AND (p.action <> $3 OR p.occurred_at >= $1)) \
                     ORDER BY e.occurred_at LIMIT 1) \
                     ORDER BY seq LIMIT $2"
                );
                let mut query = sqlx::query_as(&sql)
                    .bind(before)
                    .bind(i64::from(batch.max(1)))
                    .bind(AUDIT_PRUNED);
                if let Some(consumer) = exported_by {
                    query = query.bind(consumer);
                }
                let rows: Vec<(uuid::Uuid, i64, String, chrono::DateTime<chrono::Utc>, String)> =
                    query.fetch_all(&mut *tx).await?;
                let Some((tenant, ..)) = rows.first() else {
                    return Ok(0);
                };
                // A deleted organization's trail ends with its `organization.deleted`: retention
                // prunes it as any other, but appends nothing after that end, and what it leaves
                // needs no `audit.pruned` to vouch for it. Its row first (FOR SHARE on
                // PostgreSQL, as every writer of the tenant's events takes it before the head),
                // so a deletion committing meanwhile is waited for and seen.
                let tombstone: Option<(bool,)> = sqlx::query_as(Self::TENANT_DELETED_SHARE)
                    .bind(tenant)
                    .fetch_optional(&mut *tx)
                    .await?;
                let tenant_deleted = tombstone.is_some_and(|(deleted,)| deleted);
                // How far the export wrote the chosen tenant's chain (in the same snapshot).
                let exported_through = match exported_by {
                    Some(consumer) => {
                        let cursor: Option<(i64,)> = sqlx::query_as(
                            "SELECT seq FROM audit_export_cursors WHERE consumer = $1 AND tenant_id = $2",
                        )
                        .bind(consumer)
                        .bind(tenant)
                        .fetch_optional(&mut *tx)
                        .await?;
                        cursor.map_or(0, |(seq,)| seq)
                    }
                    None => i64::MAX,
                };
                // The prefix: events before the tenant's first one that is still young enough
                // (or not yet exported), less the `audit.pruned` events at its end (kept until an
                // older event of another kind goes with them), unless it holds nothing else (a
                // batch of them only).
                let mut prefix: Vec<_> = rows
                    .iter()
                    .take_while(|row| row.3 < before && row.1 <= exported_through)
                    .collect();
                if let Some(last_other) = prefix.iter().rposition(|row| row.4 != AUDIT_PRUNED) {
                    if !tenant_deleted {
                        prefix.truncate(last_other + 1);
                    }
                }
                let Some((tenant, last_seq, last_hash, _, _)) = prefix.last() else {
                    return Ok(0);
                };
                // Fewer (even none) when another replica's prune took them meanwhile.
                let deleted = sqlx::query("DELETE FROM audit_events WHERE tenant_id = $1 AND seq <= $2")
                    .bind(tenant)
                    .bind(*last_seq)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if deleted == 0 {
                    return Ok(0);
                }
                sqlx::query(
                    "INSERT INTO audit_chain_anchors (tenant_id, seq, chain_hash) VALUES ($1, $2, $3) \
                     ON CONFLICT (tenant_id) DO UPDATE SET seq = excluded.seq, chain_hash = excluded.chain_hash \
                     WHERE excluded.seq > audit_chain_anchors.seq",
                )
                .bind(tenant)
                .bind(*last_seq)
                .bind(last_hash)
                .execute(&mut *tx)
                .await?;
                if tenant_deleted {
                    tx.commit().await?;
                    return Ok(deleted);
                }
                let record = pruned(&$crate::PrunedPrefix {
                    tenant_id: keyplane_core::TenantId::from_uuid(*tenant),
                    through_seq: u64::try_from(*last_seq).unwrap_or(0),
                    through_chain_hash: $crate::audit::parse_hash(last_hash)?,
                    count: deleted,
                });
                // Another action would not be kept by the rule above, nor vouch for the anchor.
                if record.action != AUDIT_PRUNED || record.tenant_id.as_uuid() != *tenant {
                    return Err($crate::StoreError::Other(anyhow::anyhow!(
                        "a pruning must record an {AUDIT_PRUNED} event in the pruned tenant"
                    )));
                }
                Self::append_audit(&mut tx, &record).await?;
                tx.commit().await?;
                Ok(deleted)
            }

            async fn audit_heads_of(
                pool: &sqlx::Pool<$db>,
            ) -> Result<Vec<(keyplane_core::TenantId, u64, [u8; 32])>, $crate::StoreError> {
                let rows: Vec<(uuid::Uuid, i64, String)> =
                    sqlx::query_as("SELECT tenant_id, seq, chain_hash FROM audit_chain_heads")
                        .fetch_all(pool)
                        .await?;
                rows.into_iter()
                    .map(|(t, s, hash)| {
                        Ok((
                            keyplane_core::TenantId::from_uuid(t),
                            s.max(0) as u64,
                            $crate::audit::parse_hash(&hash)?,
                        ))
                    })
                    .collect()
            }

            async fn export_cursors_of(
                pool: &sqlx::Pool<$db>,
                consumer: &str,
            ) -> Result<Vec<(keyplane_core::TenantId, u64)>, $crate::StoreError> {
                let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
                    "SELECT tenant_id, seq FROM audit_export_cursors WHERE consumer = $1",
                )
                .bind(consumer)
                .fetch_all(pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(t, s)| (keyplane_core::TenantId::from_uuid(t), s.max(0) as u64))
                    .collect())
            }

            async fn save_export_cursors(
                pool: &sqlx::Pool<$db>,
                consumer: &str,
                cursors: &[(keyplane_core::TenantId, u64)],
            ) -> Result<(), $crate::StoreError> {
                let mut tx = pool.begin().await?;
                for (tenant, seq) in cursors {
                    sqlx::query(
                        "INSERT INTO audit_export_cursors (consumer, tenant_id, seq) VALUES ($1, $2, $3) \
                         ON CONFLICT (consumer, tenant_id) DO UPDATE SET seq = excluded.seq",
                    )
                    .bind(consumer)
                    .bind(tenant.as_uuid())
                    .bind($crate::audit::seq_to_db(*seq))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

pub(crate) use impl_audit;

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("stored audit event has a bad {what}"))
}

pub(crate) fn event_outcome(raw: &str) -> Result<Outcome, StoreError> {
    Outcome::parse(raw).ok_or_else(|| corrupt("outcome"))
}

pub(crate) fn event_details(raw: &str) -> Result<BTreeMap<String, DetailValue>, StoreError> {
    parse_details(raw).ok_or_else(|| corrupt("details"))
}
