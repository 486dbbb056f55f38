//! SQL both backends run unchanged (`$n` placeholders work on SQLite and PostgreSQL alike), and the
//! one implementation of [`Store`](crate::Store) over them, instantiated per backend by
//! [`impl_store!`]. Only DDL differs, in `migrations/{sqlite,postgres}`.

pub(crate) const CREDENTIAL_COLUMNS: &str = "id, tenant_id, kind, name, secret_hash, display_prefix, public_id, last4, scopes, permissions, expires_at, created_at, updated_at, last_used_at, revoked_at, created_by_user_id, revoked_by_user_id, suspended_at, rotated_at, previous_secret_hash, previous_secret_expires_at, previous_secret_last_used_at, retire_previous_when_unused_seconds, expiry_notice_days, canary, created_by_actor_type, created_by_actor_id, created_by_via, created_by_os_user, created_by_operator";

pub(crate) const INSERT_TENANT: &str =
    "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)";
/// A deleted tenant (`admin delete-org`) is as unknown as one never created.
pub(crate) const SELECT_TENANT: &str =
    "SELECT id, name, created_at FROM tenants WHERE id = $1 AND deleted_at IS NULL";
pub(crate) const CLAIM_BOOTSTRAP: &str =
    "INSERT INTO meta (key, value) VALUES ('bootstrapped', $1) ON CONFLICT (key) DO NOTHING";
pub(crate) const ANY_TENANT: &str = "SELECT id FROM tenants LIMIT 1";
/// The row triggers a bulk import dropped in its own transaction and does the work of once
/// (SQLite: see `SqliteStore::set_aside_import_triggers`; none on PostgreSQL, whose triggers on
/// `credentials` run per statement): their `CREATE TRIGGER` statements, run again before the
/// commit, and the live credentials the import adds per tenant, for the count trigger.
#[derive(Default)]
pub(crate) struct SetAsideTriggers {
    pub(crate) triggers: Vec<String>,
    pub(crate) live_counts: Vec<(keyplane_core::TenantId, i64)>,
}

/// What migration 0021's insert trigger does per row, for a tenant's whole import at once.
pub(crate) const ADD_LIVE_CREDENTIALS: &str =
    "INSERT INTO live_credential_counts (tenant_id, live) \
     VALUES ($1, $2) ON CONFLICT (tenant_id) DO UPDATE SET live = live + excluded.live";

/// A tenant's live credentials, as migration 0021's triggers keep them.
pub(crate) const LIVE_CREDENTIALS: &str =
    "SELECT live FROM live_credential_counts WHERE tenant_id = $1";
/// A new credential. The lifecycle columns (suspension, previous secret, expiry notices) start
/// NULL: only later changes set them. `created_by_*` (0019) come from the creation's event actor.
pub(crate) const INSERT_CREDENTIAL: &str = "INSERT INTO credentials (id, tenant_id, kind, name, secret_hash, display_prefix, public_id, last4, scopes, permissions, expires_at, created_at, updated_at, last_used_at, revoked_at, created_by_user_id, revoked_by_user_id, canary, created_by_actor_type, created_by_actor_id, created_by_via, created_by_os_user, created_by_operator) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)";
pub(crate) const REGISTRY_COLUMNS: &str =
    "id, tenant_id, project, quota_gb, created_at, updated_at";
pub(crate) const INSERT_REGISTRY: &str = "INSERT INTO registries (id, tenant_id, project, quota_gb, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)";
pub(crate) const INSERT_SIGNING_KEY: &str = "INSERT INTO registry_signing_keys (slot, key_id, private_key_pem, certificate_pem, created_at) VALUES ('current', $1, $2, $3, $4) ON CONFLICT (slot) DO NOTHING";
pub(crate) const SELECT_SIGNING_KEY: &str = "SELECT key_id, private_key_pem, certificate_pem, created_at, signed_until FROM registry_signing_keys WHERE slot = 'current'";
pub(crate) const SELECT_SIGNING_KEYS: &str = "SELECT slot, key_id, private_key_pem, certificate_pem, created_at, signed_until FROM registry_signing_keys";
pub(crate) const STAGE_SIGNING_KEY: &str = "INSERT INTO registry_signing_keys (slot, key_id, private_key_pem, certificate_pem, created_at) VALUES ('next', $1, $2, $3, $4) ON CONFLICT (slot) DO NOTHING";
pub(crate) const SELECT_STAGED_SIGNING_KEY: &str = "SELECT key_id, private_key_pem, certificate_pem, created_at, signed_until FROM registry_signing_keys WHERE slot = 'next'";
/// Reads the staged key under its row lock: a concurrent promotion waits, then finds none.
pub(crate) const LOCK_STAGED_SIGNING_KEY: &str = "UPDATE registry_signing_keys SET slot = slot WHERE slot = 'next' RETURNING key_id, private_key_pem, certificate_pem, created_at, signed_until";
pub(crate) const DROP_PREVIOUS_SIGNING_KEY: &str =
    "DELETE FROM registry_signing_keys WHERE slot = 'previous'";
pub(crate) const DEMOTE_CURRENT_SIGNING_KEY: &str =
    "UPDATE registry_signing_keys SET slot = 'previous', signed_until = $1 WHERE slot = 'current'";
pub(crate) const PROMOTE_NEXT_SIGNING_KEY: &str =
    "UPDATE registry_signing_keys SET slot = 'current' WHERE slot = 'next'";
pub(crate) const RETIRE_PREVIOUS_SIGNING_KEY: &str =
    "DELETE FROM registry_signing_keys WHERE slot = 'previous' AND key_id = $1";
pub(crate) const CURRENT_SIGNING_KEY_ID: &str =
    "SELECT key_id FROM registry_signing_keys WHERE slot = 'current'";
/// The organizations a signing-key change is recorded in; in one order, as the heads are locked.
/// Not a deleted one: its registry row stays only to keep its project name taken.
pub(crate) const REGISTRIES_TO_TELL: &str =
    "SELECT r.tenant_id, r.id, r.project FROM registries r \
     JOIN tenants t ON t.id = r.tenant_id WHERE t.deleted_at IS NULL ORDER BY r.tenant_id";
/// Appends ` AND <condition>` with `value` bound after it, if there is a value: a list's optional
/// filter is left out when absent, since `($n IS NULL OR ...)` would keep the planner from
/// seeking the listing index.
pub(crate) fn and_if<'a, DB: sqlx::Database, T>(
    sql: &mut sqlx::QueryBuilder<'a, DB>,
    condition: &str,
    value: Option<T>,
) where
    T: 'a + sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(value) = value {
        sql.push(" AND ").push(condition).push_bind(value);
    }
}

/// Whether `filter` asks for one subject's live grants, all of them (what a verification's rights
/// are computed from, [`crate::GrantFilter::live_for`]): at most
/// [`keyplane_core::grant::MAX_LIVE_GRANTS_PER_SUBJECT`] rows by an index, read on verification's
/// pool ([`crate::verification`]).
pub(crate) fn one_subjects_live_grants(filter: &crate::GrantFilter) -> bool {
    filter.subject_type.is_some() && filter.subject_id.is_some() && !filter.include_revoked
}

/// Reads a table: a locked or frozen database fails it, where `SELECT 1` would not touch it.
pub(crate) const PING: &str = "SELECT 1 FROM meta LIMIT 1";
/// A write that always changes a row (a new time): `Store::probe_writes`.
pub(crate) const PROBE_WRITES: &str = "INSERT INTO meta (key, value) VALUES ('write_probe', $1) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// Bytes of padding in the probe's row: more than a client's change writes (bar large imports).
pub(crate) const PROBE_PADDING: usize = 1024 * 1024;
pub(crate) const PROBE_DONE: &str = "DELETE FROM meta WHERE key = 'write_probe'";
/// A ping slower than this asks whether the database can be reached at all.
pub(crate) const SLOW_PING: std::time::Duration = std::time::Duration::from_millis(200);
pub(crate) const BOOTSTRAPPED: &str = "SELECT 1 FROM meta WHERE key = 'bootstrapped' \
     UNION ALL SELECT 1 FROM tenants LIMIT 1";
/// Last uses only move forward: replicas, and a flush that lost a race with another, may write an
/// older use after a newer one. Comparing works on SQLite's text too: sqlx writes every time as
/// RFC 3339 in UTC (`+00:00`) with 0, 3, 6 or 9 fractional digits, which sorts as the times do
/// (`+` sorts before `.`, and both before digits).
/// A use is credited to the secret that was presented (`u.column3`), as the row holds it when the
/// use is written: a use of a secret that a rotation has made the previous one since (a replica's
/// cache still held it as current) counts for the previous secret, never for the new one, whose
/// first use may retire the old one early; a secret that is neither any more counts for nothing.
/// The secret is named by its hash's first 8 bytes (all a cache entry keeps of it; two secrets of
/// one credential share them with odds of 2^-64). `substr` takes bytes of a blob on both backends.
/// One statement for a batch: a use is a row `(id, at, secret)` of `u`, and no credential may have
/// two rows, or it is updated once, with either (as `UPDATE ... FROM` does on both backends).
/// `u.columnN`: the names both give a VALUES list's columns (SQLite takes no names after `AS u`).
pub(crate) fn touch_last_used(rows: usize, placeholders: Placeholders) -> String {
    let mut sql = String::from(
        "UPDATE credentials SET \
         last_used_at = CASE WHEN substr(credentials.secret_hash, 1, 8) = u.column3 \
             AND (credentials.last_used_at IS NULL OR credentials.last_used_at < u.column2) \
             THEN u.column2 ELSE credentials.last_used_at END, \
         previous_secret_last_used_at = CASE WHEN substr(credentials.previous_secret_hash, 1, 8) = u.column3 \
             AND (credentials.previous_secret_last_used_at IS NULL OR credentials.previous_secret_last_used_at < u.column2) \
             THEN u.column2 ELSE credentials.previous_secret_last_used_at END \
         FROM (VALUES ",
    );
    push_value_rows(&mut sql, rows, LAST_USE_FIELDS, placeholders);
    sql.push_str(
        ") AS u WHERE credentials.id = u.column1 \
         AND ((substr(credentials.secret_hash, 1, 8) = u.column3 \
             AND (credentials.last_used_at IS NULL OR credentials.last_used_at < u.column2)) \
         OR (substr(credentials.previous_secret_hash, 1, 8) = u.column3 \
             AND (credentials.previous_secret_last_used_at IS NULL OR credentials.previous_secret_last_used_at < u.column2)))",
    );
    sql
}

/// Uses per statement of a last-use flush: 3 parameters each, 12,288 in all, under SQLite's limit
/// (32,766) and PostgreSQL's (65,535); one flush batch of the server's is one statement.
pub(crate) const LAST_USE_CHUNK: usize = 4096;
const LAST_USE_FIELDS: usize = 3;

/// A batch of uses as [`touch_last_used`] takes them: the latest use of each credential and
/// secret, in rounds in which each credential has at most one (one round, unless a credential
/// was used with two secrets: its current and previous one, or one that is neither any more), each
/// round in id order. Applied one after the other they do what applying every use would.
pub(crate) fn last_use_rounds(uses: &[crate::CredentialUse]) -> Vec<Vec<crate::CredentialUse>> {
    let mut latest = std::collections::BTreeMap::new();
    for used in uses {
        latest
            .entry((used.id, used.secret))
            .and_modify(|at: &mut chrono::DateTime<chrono::Utc>| *at = (*at).max(used.at))
            .or_insert(used.at);
    }
    let mut rounds: Vec<Vec<crate::CredentialUse>> = Vec::new();
    let mut previous_id = None;
    let mut round = 0;
    for ((id, secret), at) in latest {
        round = if previous_id == Some(id) {
            round + 1
        } else {
            0
        };
        previous_id = Some(id);
        if round == rounds.len() {
            rounds.push(Vec::new());
        }
        rounds[round].push(crate::CredentialUse { id, at, secret });
    }
    rounds
}

/// The live credentials that expire by `$1` and have not been announced at `stage` (days before
/// expiry) or nearer, soonest first. The condition is, word for word, the predicate of the
/// partial index `credentials_expiry_stage_{stage}` (one a stage, migration 0017), so both
/// backends read only the rows still to announce at that stage: the stage is a literal for that.
pub(crate) fn expiry_notice_sql(stage: u32) -> String {
    format!(
        "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE revoked_at IS NULL AND expires_at IS NOT NULL \
         AND (expiry_notice_days IS NULL OR expiry_notice_days > {stage}) \
         AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
    )
}
/// The live credentials in a grace period, the one ending first first: the grace-period sweep
/// sleeps until then. Served by `credentials_previous_secret_expiry`.
pub(crate) fn in_grace_sql() -> String {
    format!(
        "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE previous_secret_hash IS NOT NULL \
         AND revoked_at IS NULL ORDER BY previous_secret_expires_at LIMIT $1"
    )
}
/// A page of the credentials whose previous secret retires once unused, in the order of
/// `credentials_previous_secret_expiry` (whose predicate `previous_secret_hash IS NOT NULL` is
/// spelled out so that it serves it), after `($2, $3)` when `after`: a row value, so that the
/// index is sought to the cursor rather than read from its start.
pub(crate) fn retiring_previous_sql(after: bool) -> String {
    format!(
        "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE previous_secret_hash IS NOT NULL \
         AND revoked_at IS NULL AND retire_previous_when_unused_seconds IS NOT NULL \
         AND last_used_at >= rotated_at{} ORDER BY previous_secret_expires_at, id LIMIT $1",
        if after {
            " AND (previous_secret_expires_at, id) > ($2, $3)"
        } else {
            ""
        },
    )
}
/// Locks a grant's service-account subject and reads its state. An UPDATE rather than a SELECT so
/// that it waits for (and then sees) a concurrent revocation or suspension.
pub(crate) const LOCK_SERVICE_ACCOUNT: &str = "UPDATE credentials SET updated_at = updated_at WHERE id = $1 AND tenant_id = $2 AND kind = 'service_account' RETURNING revoked_at, suspended_at, expires_at";
pub(crate) const REVOKE_GRANTS_OF_SUBJECT: &str = "UPDATE grants SET revoked_at = $1 WHERE tenant_id = $2 AND subject_type = $3 AND subject_id = $4 AND revoked_at IS NULL";
pub(crate) const SELECT_CREDENTIAL_POLICY: &str =
    "SELECT policy, updated_at FROM credential_policies WHERE tenant_id = $1";
pub(crate) const UPSERT_CREDENTIAL_POLICY: &str = "INSERT INTO credential_policies (tenant_id, policy, updated_at) VALUES ($1, $2, $3) ON CONFLICT (tenant_id) DO UPDATE SET policy = excluded.policy, updated_at = excluded.updated_at";
pub(crate) const COUNT_CREDENTIALS_EXCEEDING: &str = "SELECT COUNT(*) FROM credentials WHERE tenant_id = $1 AND kind = $2 AND revoked_at IS NULL \
     AND (expires_at IS NULL OR expires_at > $3) \
     AND ((expires_at IS NULL AND $4) OR (expires_at IS NOT NULL AND $5 IS NOT NULL AND expires_at > $5))";

/// The condition of a write that acts only while a reported secret (parameter `hash`, or NULL for
/// no condition) is the credential's as of `at`: its current secret, or its previous one within the
/// grace period (as `Credential::secret_slot` decides).
pub(crate) fn while_live(hash: &str, at: &str) -> String {
    format!(
        "({hash} IS NULL OR secret_hash = {hash} \
         OR (previous_secret_hash = {hash} AND previous_secret_expires_at > {at}))"
    )
}

pub(crate) const ENDED_PREVIOUS_SECRETS: &str = "SELECT id FROM credentials WHERE previous_secret_hash IS NOT NULL AND previous_secret_expires_at <= $1";
pub(crate) const CLEAR_ENDED_PREVIOUS_SECRET: &str = "UPDATE credentials SET previous_secret_hash = NULL, previous_secret_expires_at = NULL, previous_secret_last_used_at = NULL, retire_previous_when_unused_seconds = NULL WHERE id = $1 AND previous_secret_hash IS NOT NULL AND previous_secret_expires_at <= $2";

pub(crate) const GRANT_COLUMNS: &str = "id, tenant_id, grant_kind, subject_type, subject_id, capability_key, resource_type, resource_id, created_at, revoked_at, created_by_user_id, created_by_actor_type, created_by_actor_id, created_by_via, created_by_os_user, created_by_operator";
/// Through `grants_by_subject` (tenant, subject type, subject id).
pub(crate) const COUNT_LIVE_GRANTS_OF_SUBJECT: &str = "SELECT COUNT(*) FROM grants WHERE tenant_id = $1 AND subject_type = $2 AND subject_id = $3 AND revoked_at IS NULL";
pub(crate) const INSERT_GRANT: &str = "INSERT INTO grants (id, tenant_id, grant_kind, subject_type, subject_id, capability_key, resource_type, resource_id, created_at, revoked_at, created_by_user_id, created_by_actor_type, created_by_actor_id, created_by_via, created_by_os_user, created_by_operator) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

/// The `(version, checksum)` of every migration sqlx recorded as applied; `None` for a database
/// without `_sqlx_migrations` (a new one), as `table_exists` (a count of that table in the
/// catalog) says. Any other failure to read it (permission denied, a broken table) is an error:
/// taken for "nothing applied", it would have the store migrated from scratch.
pub(crate) async fn applied_migrations<DB>(
    pool: &sqlx::Pool<DB>,
    table_exists: &str,
) -> Result<Option<Vec<(i64, Vec<u8>)>>, crate::StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'r> (i64, Vec<u8>): sqlx::FromRow<'r, DB::Row>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let cannot_read = |error: sqlx::Error| match crate::StoreError::from(error) {
        unavailable @ crate::StoreError::Unavailable(_) => unavailable,
        error => crate::StoreError::Config(format!(
            "cannot read the store's applied migrations (_sqlx_migrations): {error}"
        )),
    };
    let (tables,): (i64,) = sqlx::query_as(table_exists)
        .fetch_one(pool)
        .await
        .map_err(cannot_read)?;
    if tables == 0 {
        return Ok(None);
    }
    sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success = TRUE")
        .fetch_all(pool)
        .await
        .map(Some)
        .map_err(cannot_read)
}

/// The highest migration `migrator` has: the schema version it brings a store to.
pub(crate) fn latest_migration(migrator: &sqlx::migrate::Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Brings the database `pool` opens to `migrator`'s schema, by `run`, with a log line before
/// and after: an operator sees which process migrated a shared store, from which schema to which,
/// and when. Returns the version it migrated from (0: a new store), or `None` when it was up to
/// date. Refuses a database that a newer keyplane migrated ([`refuse_unknown_migrations`]), one
/// that ran a migration other than this keyplane's under its number, and, when `pending` says so,
/// one with migrations pending (but for a new database, which no older keyplane can be serving).
pub(crate) async fn migrate<DB, F, R>(
    migrator: &sqlx::migrate::Migrator,
    pool: &sqlx::Pool<DB>,
    table_exists: &str,
    pending: crate::PendingMigrations,
    run: F,
) -> Result<Option<i64>, crate::StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'r> (i64, Vec<u8>): sqlx::FromRow<'r, DB::Row>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
    F: FnOnce() -> R,
    R: std::future::Future<Output = Result<(), crate::StoreError>>,
{
    let applied = applied_migrations(pool, table_exists).await?;
    refuse_unknown_migrations(migrator, applied.as_deref())?;
    refuse_modified_migrations(migrator, applied.as_deref())?;
    if !migrations_pending(migrator, applied.as_deref()) {
        return Ok(None);
    }
    let from = applied
        .iter()
        .flatten()
        .map(|(version, _)| *version)
        .max()
        .unwrap_or(0);
    let to = latest_migration(migrator);
    if pending == crate::PendingMigrations::Refuse && from > 0 {
        return Err(crate::StoreError::SchemaBehind {
            at: from,
            latest: to,
        });
    }
    if from == 0 {
        tracing::info!("creating the store at schema {to}");
    } else {
        tracing::info!("migrating the store from schema {from} to {to}");
    }
    run().await?;
    if from == 0 {
        tracing::info!("created the store at schema {to}");
    } else {
        tracing::info!("migrated the store from schema {from} to {to}");
    }
    Ok(Some(from))
}

/// Whether `migrator` has migrations that are not `applied`.
pub(crate) fn migrations_pending(
    migrator: &sqlx::migrate::Migrator,
    applied: Option<&[(i64, Vec<u8>)]>,
) -> bool {
    let Some(applied) = applied else {
        return true;
    };
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .any(|m| !applied.iter().any(|(version, _)| *version == m.version))
}

/// Refuses a database that ran one of this keyplane's migrations with other contents (the file was
/// edited after it was applied, or another build's migration took its number): sqlx would refuse
/// it while migrating, and a database with nothing pending would be served on a schema this
/// keyplane does not know.
fn refuse_modified_migrations(
    migrator: &sqlx::migrate::Migrator,
    applied: Option<&[(i64, Vec<u8>)]>,
) -> Result<(), crate::StoreError> {
    let modified = applied
        .unwrap_or_default()
        .iter()
        .find(|(version, checksum)| {
            migrator
                .iter()
                .any(|m| m.version == *version && *m.checksum != **checksum)
        });
    match modified {
        Some((version, _)) => Err(crate::StoreError::Config(format!(
            "migration {version} was previously applied but has been modified: the store ran \
             other contents under that number than this keyplane's migration {version}"
        ))),
        None => Ok(()),
    }
}

/// Refuses a database that a newer keyplane has migrated: this binary would serve it without the
/// columns it does not know (a canary would verify as an ordinary credential, a suspended one as
/// live), and nothing else would notice.
pub(crate) fn refuse_unknown_migrations(
    migrator: &sqlx::migrate::Migrator,
    applied: Option<&[(i64, Vec<u8>)]>,
) -> Result<(), crate::StoreError> {
    let known_up_to = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let Some(unknown) = applied
        .unwrap_or_default()
        .iter()
        .map(|(version, _)| *version)
        .filter(|version| !migrator.iter().any(|m| m.version == *version))
        .max()
    else {
        return Ok(());
    };
    let schema_at = applied
        .unwrap_or_default()
        .iter()
        .map(|(version, _)| *version)
        .max()
        .unwrap_or(unknown);
    Err(crate::StoreError::Config(if unknown > known_up_to {
        format!(
            "the database's schema is at {schema_at}, written by a newer keyplane; this one knows up to {known_up_to}"
        )
    } else {
        format!(
            "the database records migration {unknown}, which this keyplane does not have (it knows up to {known_up_to}); it was written by another build"
        )
    }))
}
/// Takes a key: inserts the record, or replaces one that has expired or whose in-flight attempt
/// held its lock too long (it crashed). Affects no row when a live record holds the key.
pub(crate) const CLAIM_IDEMPOTENCY_KEY: &str = "INSERT INTO idempotency_keys (lookup_id, tenant_id, principal_id, fingerprint, claim_id, created_at_ms, locked_until_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (lookup_id) DO UPDATE SET tenant_id = excluded.tenant_id, principal_id = excluded.principal_id, fingerprint = excluded.fingerprint, claim_id = excluded.claim_id, created_at_ms = excluded.created_at_ms, locked_until_ms = excluded.locked_until_ms, status = NULL, nonce = NULL, response = NULL \
     WHERE idempotency_keys.created_at_ms < $8 OR (idempotency_keys.status IS NULL AND idempotency_keys.locked_until_ms <= $6)";
pub(crate) const SELECT_IDEMPOTENCY_KEY: &str = "SELECT fingerprint, status, nonce, response FROM idempotency_keys WHERE lookup_id = $1 AND tenant_id = $2 AND principal_id = $3";
/// Keeps an answer in the transaction of the change it answers, only while the claim still holds
/// the record in flight.
pub(crate) const COMPLETE_IDEMPOTENCY_KEY: &str = "UPDATE idempotency_keys SET status = $3, nonce = $4, response = $5 WHERE lookup_id = $1 AND claim_id = $2 AND status IS NULL";
pub(crate) const RELEASE_IDEMPOTENCY_KEY: &str =
    "DELETE FROM idempotency_keys WHERE lookup_id = $1 AND claim_id = $2 AND status IS NULL";
/// Neither backend takes `DELETE ... LIMIT` (SQLite only when built for it): a bounded sub-select.
pub(crate) const INSERT_CONSOLE_SESSION: &str = "INSERT INTO console_sessions (id_hash, tenant_id, sealed_token, label, created_at_ms, last_seen_at_ms, ends_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)";
pub(crate) const TOUCH_CONSOLE_SESSION: &str = "UPDATE console_sessions SET last_seen_at_ms = $2 WHERE id_hash = $1 AND ends_at_ms > $2 AND last_seen_at_ms > $3 \
     RETURNING id_hash, tenant_id, sealed_token, label, created_at_ms, last_seen_at_ms, ends_at_ms, notice";
pub(crate) const SET_CONSOLE_SESSION_NOTICE: &str =
    "UPDATE console_sessions SET notice = $2 WHERE id_hash = $1";
/// Adds a secret to show only to a session that has not ended: none is added to a signed-out one.
pub(crate) const KEEP_CONSOLE_SESSION_SECRET: &str =
    "INSERT INTO console_session_secrets (id_hash, sealed) \
     SELECT id_hash, $2 FROM console_sessions WHERE id_hash = $1 AND ends_at_ms > $3";
pub(crate) const SELECT_CONSOLE_SESSION_SECRETS: &str =
    "SELECT seq, sealed FROM console_session_secrets WHERE id_hash = $1 ORDER BY seq";
pub(crate) const TAKE_CONSOLE_SESSION_SECRETS: &str =
    "DELETE FROM console_session_secrets WHERE id_hash = $1 RETURNING seq, sealed";
pub(crate) const DELETE_CONSOLE_SESSION: &str = "DELETE FROM console_sessions WHERE id_hash = $1";
/// The prunes' condition is in the outer WHERE too: PostgreSQL checks only that on a row another
/// transaction changed while the DELETE waited for it, so a row renewed meanwhile (a session
/// touched, a key claimed again) is kept, where the sub-select alone would still name it.
pub(crate) const PRUNE_CONSOLE_SESSIONS: &str = "DELETE FROM console_sessions WHERE (ends_at_ms <= $1 OR last_seen_at_ms <= $2) \
     AND id_hash IN (SELECT id_hash FROM console_sessions WHERE ends_at_ms <= $1 OR last_seen_at_ms <= $2 LIMIT $3) \
     RETURNING id_hash, tenant_id, sealed_token, label, created_at_ms, last_seen_at_ms, ends_at_ms, notice";
pub(crate) const PRUNE_IDEMPOTENCY_KEYS: &str = "DELETE FROM idempotency_keys WHERE created_at_ms < $1 \
     AND lookup_id IN (SELECT lookup_id FROM idempotency_keys WHERE created_at_ms < $1 ORDER BY created_at_ms LIMIT $2)";

/// A report is stored only while fewer than `$9` are: reports pile up only while they cannot be
/// worked off, and the bound keeps an outage of the workers from filling the database.
pub(crate) const INSERT_LEAK_REPORT: &str = "INSERT INTO leak_reports (id, token_hashes, request_id, client_ip, user_agent, received_at_ms, attempts, lease_id, locked_until_ms) \
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE (SELECT COUNT(*) FROM leak_reports) < $10";
pub(crate) const LEAK_REPORTS_DUE: &str =
    "SELECT 1 FROM leak_reports WHERE locked_until_ms <= $1 LIMIT 1";
/// The lease's condition is in the outer WHERE too: of racing claims, the one that waited for
/// another's (PostgreSQL) sees the new lease there and leaves the report.
pub(crate) const CLAIM_LEAK_REPORTS: &str = "UPDATE leak_reports SET lease_id = $1, locked_until_ms = $2, attempts = attempts + 1 \
     WHERE locked_until_ms <= $3 AND id IN (SELECT id FROM leak_reports WHERE locked_until_ms <= $3 ORDER BY received_at_ms LIMIT $4) \
     RETURNING id, token_hashes, request_id, client_ip, user_agent, received_at_ms, attempts";
pub(crate) const FINISH_LEAK_REPORT: &str = "DELETE FROM leak_reports WHERE id = $1";
pub(crate) const PRUNE_LEAK_REPORTS: &str = "DELETE FROM leak_reports WHERE received_at_ms < $1 \
     AND id IN (SELECT id FROM leak_reports WHERE received_at_ms < $1 ORDER BY received_at_ms LIMIT $2)";

/// Ids or hashes per query of the lookups by many (`find_credentials_by_ids` and `_by_hashes`,
/// which binds each twice): well under SQLite's and PostgreSQL's parameter limits.
pub(crate) const LOOKUP_CHUNK: usize = 500;

/// Rows per multi-row INSERT when importing: 23 parameters each stays under SQLite's and
/// PostgreSQL's parameter limits.
pub(crate) const IMPORT_CHUNK: usize = 500;
const CREDENTIAL_FIELDS: usize = 23;

/// How a backend spells the bind parameters of the import's multi-row INSERT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placeholders {
    /// `$1, $2, ...`
    Numbered,
    /// `?, ?, ...`. For SQLite: sqlx reads the name of every numbered parameter it binds, and
    /// SQLite finds a name by walking the statement's list of them, so the 9,000 `$n` of one chunk
    /// cost time quadratic in their number (90% of a 1M import).
    Anonymous,
}

/// `INSERT INTO credentials (...) VALUES ($1..$23), ($24..$46), ...` for `rows` rows.
pub(crate) fn multi_row_insert(rows: usize, placeholders: Placeholders) -> String {
    let (head, _) = INSERT_CREDENTIAL
        .split_once(" VALUES ")
        .expect("INSERT_CREDENTIAL has a VALUES clause");
    let mut sql = String::with_capacity(head.len() + rows * 120);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    push_value_rows(&mut sql, rows, CREDENTIAL_FIELDS, placeholders);
    sql
}

/// `($1, $2, ...), ($k, ...), ...`: `rows` rows of `fields` parameters each.
fn push_value_rows(sql: &mut String, rows: usize, fields: usize, placeholders: Placeholders) {
    use std::fmt::Write;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for field in 0..fields {
            if field > 0 {
                sql.push_str(", ");
            }
            match placeholders {
                Placeholders::Numbered => {
                    write!(sql, "${}", row * fields + field + 1)
                        .expect("writing to a String cannot fail");
                }
                Placeholders::Anonymous => sql.push('?'),
            }
        }
        sql.push(')');
    }
}

/// The connection an import writes through. A backend may tune it for the import (SQLite: a
/// larger page cache); `restore` then holds the statement that undoes that, and a connection
/// dropped before it ran (the import failed or was cancelled) is closed rather than returned to
/// the pool still tuned.
pub(crate) struct ImportConnection<DB: sqlx::Database> {
    pub(crate) connection: sqlx::pool::PoolConnection<DB>,
    pub(crate) restore: Option<String>,
}

impl<DB: sqlx::Database> Drop for ImportConnection<DB> {
    fn drop(&mut self) {
        if self.restore.is_some() {
            self.connection.close_on_drop();
        }
    }
}

/// Implements [`crate::Store`] for `$store`, whose `pool` field (reads) and `writer` field (writes)
/// are `sqlx::Pool<$db>`s and whose `writes` field is a [`crate::WriteTracker`].
macro_rules! impl_store {
    ($store:ty, $db:ty, $backend:literal) => {
        impl $store {
            async fn insert_tenant(
                tx: &mut sqlx::Transaction<'_, $db>,
                tenant: &keyplane_core::Tenant,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query($crate::sql::INSERT_TENANT)
                    .bind(tenant.id.as_uuid())
                    .bind(&tenant.name)
                    .bind(tenant.created_at)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            /// `LiveCredentialLimit` when, with what `tx` inserted, `tenant` holds more than
            /// `max_live` live credentials. The count's row (migration 0021) is locked by the
            /// insert's trigger until `tx` ends, so a concurrent create reads it after this one.
            async fn refuse_past_live_limit(
                tx: &mut sqlx::Transaction<'_, $db>,
                tenant: keyplane_core::TenantId,
                max_live: Option<u64>,
            ) -> Result<(), $crate::StoreError> {
                let Some(limit) = max_live else {
                    return Ok(());
                };
                let (live,): (i64,) = sqlx::query_as($crate::sql::LIVE_CREDENTIALS)
                    .bind(tenant.as_uuid())
                    .fetch_one(&mut **tx)
                    .await?;
                if u64::try_from(live).unwrap_or(0) > limit {
                    return Err($crate::StoreError::LiveCredentialLimit { limit });
                }
                Ok(())
            }

            /// Stores `candidate` with `insert` (which does nothing when its slot is taken) and
            /// returns the slot's key, read with `select`: the first writer's, so racers agree.
            /// Only the writer that stored it records `event` (of the key, after the current key
            /// when `after_current`) in every organization with a registry.
            async fn first_signing_key(
                &self,
                insert: &'static str,
                select: &'static str,
                candidate: &$crate::SigningKey,
                after_current: bool,
                event: $crate::EventOf<'_, $crate::SigningKeyChange>,
            ) -> Result<$crate::SigningKey, $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    let stored = sqlx::query(insert)
                        .bind(&candidate.key_id)
                        .bind(candidate.private_key.expose_secret())
                        .bind(&candidate.certificate_pem)
                        .bind(candidate.created_at)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                    if stored {
                        let previous = if after_current {
                            sqlx::query_as::<_, (String,)>($crate::sql::CURRENT_SIGNING_KEY_ID)
                                .fetch_optional(&mut *tx)
                                .await?
                                .map(|(id,)| id)
                        } else {
                            None
                        };
                        Self::record_signing_key_change(
                            &mut tx,
                            &candidate.key_id,
                            previous,
                            event,
                        )
                        .await?;
                    }
                    let row: $crate::rows::SigningKeyRow =
                        sqlx::query_as(select).fetch_one(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(row.into())
                })
                .await
            }

            /// Appends `event`'s record of a signing-key change to the chain of every
            /// organization with a registry, inside the change's transaction `tx`.
            async fn record_signing_key_change(
                tx: &mut sqlx::Transaction<'_, $db>,
                key_id: &str,
                previous_key_id: Option<String>,
                event: $crate::EventOf<'_, $crate::SigningKeyChange>,
            ) -> Result<(), $crate::StoreError> {
                let registries: Vec<(uuid::Uuid, uuid::Uuid, String)> =
                    sqlx::query_as($crate::sql::REGISTRIES_TO_TELL)
                        .fetch_all(&mut **tx)
                        .await?;
                for (tenant, registry_id, project) in registries {
                    let change = $crate::SigningKeyChange {
                        tenant_id: keyplane_core::TenantId::from_uuid(tenant),
                        registry_id,
                        project,
                        key_id: key_id.to_owned(),
                        previous_key_id: previous_key_id.clone(),
                    };
                    Self::append_audit(tx, &event(&change)).await?;
                }
                Ok(())
            }

            /// The statement `list_tenants` runs: only the conditions that apply, as in
            /// [`Self::credential_list_query`], and the cursor as one row comparison, which
            /// seeks the listing index (`created_at > $n OR (created_at = $n AND id > $m)`
            /// would read every organization before the page).
            pub(crate) fn tenant_list_query(
                page: &$crate::TenantPage<'_>,
            ) -> sqlx::QueryBuilder<'static, $db> {
                let mut sql = sqlx::QueryBuilder::<$db>::new(
                    "SELECT t.id, t.name, t.created_at, r.project FROM tenants t \
                     LEFT JOIN registries r ON r.tenant_id = t.id WHERE t.deleted_at IS NULL",
                );
                $crate::sql::and_if(&mut sql, "t.name = ", page.name.map(str::to_owned));
                if let Some(after) = page.after {
                    sql.push(" AND (t.created_at, t.id) > (");
                    sql.push_bind(after.created_at);
                    sql.push(", ");
                    sql.push_bind(after.id.as_uuid());
                    sql.push(")");
                }
                sql.push(" ORDER BY t.created_at, t.id LIMIT ");
                sql.push_bind(i64::from(page.limit));
                sql
            }

            /// The statement `list_credentials` runs.
            pub(crate) fn credential_list_query(
                query: &$crate::ListCredentials,
            ) -> sqlx::QueryBuilder<'static, $db> {
                // Only the conditions that apply: `($n IS NULL OR id > $n)` would keep the
                // planner from seeking the listing index to the cursor, and each page would
                // read every row before it.
                let mut sql = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM credentials WHERE tenant_id = ",
                    $crate::sql::CREDENTIAL_COLUMNS
                ));
                sql.push_bind(query.tenant_id.as_uuid());
                sql.push(" AND kind = ");
                sql.push_bind(query.kind.as_str());
                if !query.include_revoked {
                    sql.push(" AND revoked_at IS NULL");
                }
                $crate::sql::and_if(&mut sql, "id > ", query.after.map(|after| after.as_uuid()));
                if let Some(window) = query.expiring {
                    sql.push(" AND revoked_at IS NULL AND expires_at > ");
                    sql.push_bind(window.after);
                    sql.push(" AND expires_at <= ");
                    sql.push_bind(window.until);
                }
                if !query.include_canaries {
                    sql.push(" AND canary = FALSE");
                }
                sql.push(" ORDER BY id LIMIT ");
                sql.push_bind(query.limit.map_or(i64::MAX, i64::from));
                sql
            }

            /// The rows of one credential's revocation in `tx` (`revoke_credential`'s and each
            /// of `revoke_credentials`'): the credential's, unless it is revoked already (or,
            /// with `while_live`, that secret is no longer its), then a service account's live
            /// grants, at the same `at`, in creation order. `None`: nothing changed.
            #[allow(clippy::too_many_arguments)] // the credential, when, by whom, on which condition
            async fn revoke_rows(
                tx: &mut sqlx::Transaction<'_, $db>,
                tenant_id: keyplane_core::TenantId,
                kind: keyplane_core::CredentialKind,
                id: keyplane_core::CredentialId,
                at: chrono::DateTime<chrono::Utc>,
                by_user: Option<keyplane_core::UserId>,
                while_live: Option<&keyplane_core::TokenHash>,
            ) -> Result<
                Option<($crate::rows::CredentialRow, Vec<keyplane_core::Grant>)>,
                $crate::StoreError,
            > {
                let sql = format!(
                    "UPDATE credentials SET revoked_at = $1, revoked_by_user_id = $2, updated_at = $1 \
                     WHERE tenant_id = $3 AND kind = $4 AND id = $5 AND revoked_at IS NULL AND {} \
                     RETURNING {}",
                    $crate::sql::while_live("$6", "$1"),
                    $crate::sql::CREDENTIAL_COLUMNS
                );
                let row: Option<$crate::rows::CredentialRow> = sqlx::query_as(&sql)
                    .bind(at)
                    .bind(by_user.map(|u| u.as_uuid()))
                    .bind(tenant_id.as_uuid())
                    .bind(kind.as_str())
                    .bind(id.as_uuid())
                    .bind(while_live.map(|hash| hash.as_bytes().to_vec()))
                    .fetch_optional(&mut **tx)
                    .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let mut grants = Vec::new();
                if kind == keyplane_core::CredentialKind::ServiceAccount {
                    // Its grants go with it, at the same instant.
                    let sql = format!(
                        "{} RETURNING {}",
                        $crate::sql::REVOKE_GRANTS_OF_SUBJECT,
                        $crate::sql::GRANT_COLUMNS
                    );
                    let rows: Vec<$crate::rows::GrantRow> = sqlx::query_as(&sql)
                        .bind(at)
                        .bind(tenant_id.as_uuid())
                        .bind(keyplane_core::SubjectType::ServiceAccount.as_str())
                        .bind(id.as_uuid())
                        .fetch_all(&mut **tx)
                        .await?;
                    grants = rows
                        .into_iter()
                        .map(keyplane_core::Grant::try_from)
                        .collect::<Result<Vec<_>, _>>()?;
                    // RETURNING has no order: the trail lists them in creation order.
                    grants.sort_by_key(|grant| grant.id);
                }
                Ok(Some((row, grants)))
            }

            /// A revocation's events in `tx`: the credential's `event`, then one of
            /// `grant_event`'s for each grant revoked with it.
            async fn append_revocation_events(
                tx: &mut sqlx::Transaction<'_, $db>,
                event: &keyplane_core::AuditEvent,
                grants: &[keyplane_core::Grant],
                grant_event: $crate::EventOf<'_, keyplane_core::Grant>,
            ) -> Result<(), $crate::StoreError> {
                Self::append_audit(tx, event).await?;
                for grant in grants {
                    Self::append_audit(tx, &grant_event(grant)).await?;
                }
                Ok(())
            }

            /// [`Self::notify_invalidations`] of one subject.
            async fn notify_invalidation(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                tenant: keyplane_core::TenantId,
                subject: uuid::Uuid,
            ) -> Result<(), $crate::StoreError> {
                self.notify_invalidations(tx, tenant, &[subject]).await
            }

            /// Runs one write operation that writes whenever it succeeds (a client's change, which
            /// records its event) and records how it went for `/readyz`.
            async fn write<T>(
                &self,
                operation: impl std::future::Future<Output = Result<T, $crate::StoreError>>,
            ) -> Result<T, $crate::StoreError> {
                self.write_if(operation, |_| true).await
            }

            /// [`Self::write`] for an operation that may find nothing to write (a delete of what
            /// may be gone): its success counts for `/readyz` only when `wrote` says it changed
            /// rows. Background work passes `|_| false` ([`Self::write_background`]).
            async fn write_if<T>(
                &self,
                operation: impl std::future::Future<Output = Result<T, $crate::StoreError>>,
                wrote: impl FnOnce(&T) -> bool,
            ) -> Result<T, $crate::StoreError> {
                let outcome = operation.await.map_err(|error| {
                    $crate::error::without_connections(error, self.writer.size())
                });
                self.writes.observe(outcome, wrote)
            }

            /// [`Self::write`] for background work (prunes, claims, sweeps, last-use flushes):
            /// its faults count for `/readyz`, its successes do not. They mostly write nothing
            /// or one small row, which may commit where a client's change does not; the probe
            /// (`probe_writes`) and clients' changes tell that writes work again.
            async fn write_background<T>(
                &self,
                operation: impl std::future::Future<Output = Result<T, $crate::StoreError>>,
            ) -> Result<T, $crate::StoreError> {
                self.write_if(operation, |_| false).await
            }
        }

        #[async_trait::async_trait]
        impl $crate::Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            #[tracing::instrument(skip_all)]
            async fn ping(&self) -> Result<(), $crate::StoreError> {
                // On verification's pool: ready means verification can be answered, whatever the
                // general readers are busy with.
                let mut ping = std::pin::pin!(async {
                    let mut read = $crate::verification::BoundedRead::acquire(&self.verifier).await?;
                    let pinged = read.within(|c| sqlx::query($crate::sql::PING).fetch_optional(c)).await;
                    read.finish(pinged).map(drop)
                });
                if let Ok(pinged) = tokio::time::timeout($crate::sql::SLOW_PING, &mut ping).await {
                    return pinged;
                }
                // Slow: the pool may be retrying a database that refuses connections (it would say
                // only that it timed out); one direct attempt tells.
                let options = self.verifier.connect_options();
                if let Some(unreachable) = $crate::error::unreachable_database(&*options).await {
                    return Err(unreachable);
                }
                ping.await
            }

            fn write_health(&self) -> $crate::WriteHealth {
                self.writes.health()
            }

            #[tracing::instrument(skip_all)]
            async fn probe_writes(&self) -> Result<(), $crate::StoreError> {
                self.write(async {
                    // Padded past what a client's change writes: a write smaller than the
                    // change that failed may fit where it did not. Random, or PostgreSQL's TOAST
                    // would compress it to a few KiB.
                    use rand::distributions::DistString;
                    let padding = rand::distributions::Alphanumeric
                        .sample_string(&mut rand::thread_rng(), $crate::sql::PROBE_PADDING);
                    let value = format!("{} {padding}", chrono::Utc::now().to_rfc3339());
                    sqlx::query($crate::sql::PROBE_WRITES)
                        .bind(value)
                        .execute(&self.writer)
                        .await?;
                    Ok(())
                })
                .await?;
                // Not kept: the padding would stay in the store. Background work: not observed.
                self.write_background(async {
                    sqlx::query($crate::sql::PROBE_DONE)
                        .execute(&self.writer)
                        .await?;
                    Ok(())
                })
                .await
            }

            async fn close(&self) {
                self.close_pools().await;
            }

            #[tracing::instrument(skip_all)]
            async fn refresh_statistics(&self) -> Result<(), $crate::StoreError> {
                self.refresh_planner_statistics().await
            }

            async fn database_clock(
                &self,
            ) -> Result<Option<$crate::DatabaseClock>, $crate::StoreError> {
                self.read_database_clock().await
            }

            #[tracing::instrument(skip_all)]
            async fn is_bootstrapped(&self) -> Result<bool, $crate::StoreError> {
                let found = sqlx::query($crate::sql::BOOTSTRAPPED)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(found.is_some())
            }

            #[tracing::instrument(skip_all)]
            async fn bootstrap_once(
                &self,
                tenant: &keyplane_core::Tenant,
                credential: &keyplane_core::Credential,
                events: &[keyplane_core::AuditEvent],
            ) -> Result<bool, $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    let claimed = sqlx::query($crate::sql::CLAIM_BOOTSTRAP)
                        .bind(tenant.created_at.to_rfc3339())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                    let empty = sqlx::query($crate::sql::ANY_TENANT)
                        .fetch_optional(&mut *tx)
                        .await?
                        .is_none();
                    if !(claimed && empty) {
                        // Commit the claim anyway: a store that had tenants first is never bootstrapped later.
                        tx.commit().await?;
                        return Ok(false);
                    }
                    Self::insert_tenant(&mut tx, tenant).await?;
                    bind_credential(sqlx::query($crate::sql::INSERT_CREDENTIAL), credential)
                        .execute(&mut *tx)
                        .await?;
                    for event in events {
                        Self::append_audit(&mut tx, event).await?;
                    }
                    tx.commit().await?;
                    Ok(true)
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %id))]
            async fn get_tenant(
                &self,
                id: keyplane_core::TenantId,
            ) -> Result<Option<keyplane_core::Tenant>, $crate::StoreError> {
                let row: Option<$crate::rows::TenantRow> = sqlx::query_as($crate::sql::SELECT_TENANT)
                    .bind(id.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(Into::into))
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %credential.tenant_id, credential.id = %credential.id))]
            async fn insert_credential_within_limit(
                &self,
                credential: &keyplane_core::Credential,
                max_live: Option<u64>,
                event: &keyplane_core::AuditEvent,
                answer: $crate::AnswerOf<'_, keyplane_core::Credential>,
            ) -> Result<(), $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    bind_credential(sqlx::query($crate::sql::INSERT_CREDENTIAL), credential)
                        .execute(&mut *tx)
                        .await?;
                    Self::refuse_past_live_limit(&mut tx, credential.tenant_id, max_live).await?;
                    Self::append_audit(&mut tx, event).await?;
                    Self::keep_answer(&mut tx, answer, credential).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(count = credentials.len()))]
            async fn import_credentials(
                &self,
                credentials: &[keyplane_core::Credential],
                events: &[keyplane_core::AuditEvent],
            ) -> Result<(), $crate::StoreError> {
                self.write(async {
                    let mut import = self.import_connection().await?;
                    let mut tx =
                        sqlx::Connection::begin_with(&mut *import.connection, Self::BEGIN_WRITE)
                            .await?;
                    let set_aside = Self::set_aside_import_triggers(&mut tx, credentials).await?;
                    let mut full_chunk_sql = None;
                    for chunk in credentials.chunks($crate::sql::IMPORT_CHUNK) {
                        let partial_chunk_sql;
                        let sql = if chunk.len() == $crate::sql::IMPORT_CHUNK {
                            full_chunk_sql.get_or_insert_with(|| {
                                $crate::sql::multi_row_insert(chunk.len(), Self::PLACEHOLDERS)
                            })
                        } else {
                            partial_chunk_sql =
                                $crate::sql::multi_row_insert(chunk.len(), Self::PLACEHOLDERS);
                            &partial_chunk_sql
                        };
                        let mut query = sqlx::query(sql);
                        for credential in chunk {
                            query = bind_credential(query, credential);
                        }
                        query.execute(&mut *tx).await?;
                    }
                    for (tenant, live) in &set_aside.live_counts {
                        sqlx::query($crate::sql::ADD_LIVE_CREDENTIALS)
                            .bind(tenant.as_uuid())
                            .bind(*live)
                            .execute(&mut *tx)
                            .await?;
                    }
                    for trigger in &set_aside.triggers {
                        sqlx::query(trigger)
                            .persistent(false)
                            .execute(&mut *tx)
                            .await?;
                    }
                    for event in events {
                        Self::append_audit(&mut tx, event).await?;
                    }
                    tx.commit().await?;
                    if let Some(restore) = import.restore.as_deref() {
                        // The import is committed: a failure here only costs the connection,
                        // which is then closed on drop.
                        match sqlx::query(restore).execute(&mut *import.connection).await {
                            Ok(_) => import.restore = None,
                            Err(error) => tracing::warn!(%error, "cannot restore the writer connection after an import; closing it"),
                        }
                    }
                    Ok(())
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, credential.id = %id))]
            async fn get_credential(
                &self,
                tenant_id: keyplane_core::TenantId,
                kind: keyplane_core::CredentialKind,
                id: keyplane_core::CredentialId,
            ) -> Result<Option<keyplane_core::Credential>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM credentials WHERE tenant_id = $1 AND kind = $2 AND id = $3",
                    $crate::sql::CREDENTIAL_COLUMNS
                );
                let row: Option<$crate::rows::CredentialRow> = sqlx::query_as(&sql)
                    .bind(tenant_id.as_uuid())
                    .bind(kind.as_str())
                    .bind(id.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %query.tenant_id))]
            async fn list_credentials(
                &self,
                query: &$crate::ListCredentials,
            ) -> Result<Vec<keyplane_core::Credential>, $crate::StoreError> {
                let rows: Vec<$crate::rows::CredentialRow> = Self::credential_list_query(query)
                    .build_query_as()
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(skip_all)]
            async fn find_credential_by_hash(
                &self,
                hash: &keyplane_core::TokenHash,
            ) -> Result<Option<keyplane_core::Credential>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM credentials WHERE secret_hash = $1 OR previous_secret_hash = $1",
                    $crate::sql::CREDENTIAL_COLUMNS
                );
                let mut read = $crate::verification::BoundedRead::acquire(&self.verifier).await?;
                let found = read
                    .within(|c| sqlx::query_as(&sql).bind(&hash.as_bytes()[..]).fetch_optional(c))
                    .await;
                let row: Option<$crate::rows::CredentialRow> = read.finish(found)?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, credential.id = %id))]
            async fn rotate_credential(
                &self,
                tenant_id: keyplane_core::TenantId,
                kind: keyplane_core::CredentialKind,
                id: keyplane_core::CredentialId,
                replaces: &keyplane_core::TokenHash,
                rotation: &keyplane_core::Rotation,
                event: &keyplane_core::AuditEvent,
                answer: $crate::AnswerOf<'_, keyplane_core::Credential>,
            ) -> Result<keyplane_core::Credential, $crate::StoreError> {
                self.write(async {
                    // Compare-and-swap on the secret the caller saw: a rotation that lost a race
                    // changes nothing.
                    let sql = format!(
                        "UPDATE credentials SET secret_hash = $1, display_prefix = $2, public_id = $3, \
                         last4 = $4, updated_at = $5, rotated_at = $5, \
                         previous_secret_hash = $10, previous_secret_expires_at = $11, \
                         previous_secret_last_used_at = NULL, retire_previous_when_unused_seconds = $12, \
                         expires_at = $13, \
                         expiry_notice_days = CASE WHEN $14 THEN expiry_notice_days ELSE NULL END \
                         WHERE tenant_id = $6 AND kind = $7 AND id = $8 AND revoked_at IS NULL \
                         AND secret_hash = $9 RETURNING {}",
                        $crate::sql::CREDENTIAL_COLUMNS
                    );
                    let mut tx = self.writer.begin().await?;
                    let row: Option<$crate::rows::CredentialRow> = sqlx::query_as(&sql)
                        .bind(&rotation.secret_hash.as_bytes()[..])
                        .bind(&rotation.display.prefix)
                        .bind(&rotation.display.public_id)
                        .bind(&rotation.display.last4)
                        .bind(rotation.rotated_at)
                        .bind(tenant_id.as_uuid())
                        .bind(kind.as_str())
                        .bind(id.as_uuid())
                        .bind(&replaces.as_bytes()[..])
                        .bind(rotation.previous.as_ref().map(|p| p.hash.as_bytes().to_vec()))
                        .bind(rotation.previous.as_ref().map(|p| p.expires_at))
                        .bind(
                            rotation
                                .previous
                                .as_ref()
                                .and_then(|p| p.retire_when_unused_seconds)
                                .map(|s| i32::try_from(s).unwrap_or(i32::MAX)),
                        )
                        .bind(rotation.expires_at)
                        .bind(rotation.keeps_expiry)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let rotated: Option<keyplane_core::Credential> =
                        row.map(TryInto::try_into).transpose()?;
                    if let Some(rotated) = &rotated {
                        self.notify_invalidation(&mut tx, tenant_id, id.as_uuid()).await?;
                        Self::append_audit(&mut tx, event).await?;
                        // The answer shows the row as this statement left it.
                        Self::keep_answer(&mut tx, answer, rotated).await?;
                    }
                    tx.commit().await?;
                    match rotated {
                        Some(rotated) => Ok(rotated),
                        None => match self.get_credential(tenant_id, kind, id).await? {
                            Some(c) if c.is_revoked() => Err($crate::StoreError::Conflict("the credential is revoked".into())),
                            Some(_) => Err($crate::StoreError::Conflict(
                                "the credential was rotated by another request at the same time".into(),
                            )),
                            None => Err($crate::StoreError::NotFound),
                        },
                    }
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, credential.id = %id))]
            async fn revoke_credential(
                &self,
                tenant_id: keyplane_core::TenantId,
                kind: keyplane_core::CredentialKind,
                id: keyplane_core::CredentialId,
                at: chrono::DateTime<chrono::Utc>,
                by_user: Option<keyplane_core::UserId>,
                event: &keyplane_core::AuditEvent,
                grant_event: $crate::EventOf<'_, keyplane_core::Grant>,
                while_live: Option<&keyplane_core::TokenHash>,
            ) -> Result<keyplane_core::Credential, $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    let revoked = Self::revoke_rows(
                        &mut tx, tenant_id, kind, id, at, by_user, while_live,
                    )
                    .await?;
                    if let Some((_, grants)) = &revoked {
                        self.notify_invalidation(&mut tx, tenant_id, id.as_uuid()).await?;
                        Self::append_revocation_events(&mut tx, event, grants, grant_event)
                            .await?;
                    }
                    tx.commit().await?;
                    match revoked {
                        Some((row, _)) => row.try_into(),
                        None => self
                            .get_credential(tenant_id, kind, id)
                            .await?
                            .ok_or($crate::StoreError::NotFound),
                    }
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, credentials = revocations.len()))]
            async fn revoke_credentials(
                &self,
                tenant_id: keyplane_core::TenantId,
                revocations: &[$crate::CredentialRevocation<'_>],
                at: chrono::DateTime<chrono::Utc>,
                grant_event: $crate::EventOf<'_, keyplane_core::Grant>,
            ) -> Result<Vec<keyplane_core::Credential>, $crate::StoreError> {
                let revoking = async {
                    let mut tx = self.writer.begin().await?;
                    // On PostgreSQL a revoke of one holds its credential's row, then takes the
                    // tenant's live count (migration 0021's trigger), then its audit head. So the
                    // batch takes every credential's row first (in id order, as a last-use flush
                    // does), before its first revocation takes the count, and every row before
                    // the head: holding either while it waited for a row, it would deadlock.
                    let ids: Vec<uuid::Uuid> =
                        revocations.iter().map(|r| r.id.as_uuid()).collect();
                    Self::lock_credentials(&mut tx, &ids).await?;
                    let mut revoked = Vec::with_capacity(revocations.len());
                    for r in revocations {
                        revoked.push(
                            Self::revoke_rows(&mut tx, tenant_id, r.kind, r.id, at, None, None)
                                .await?,
                        );
                    }
                    let subjects: Vec<uuid::Uuid> = revocations
                        .iter()
                        .zip(&revoked)
                        .filter(|(_, done)| done.is_some())
                        .map(|(r, _)| r.id.as_uuid())
                        .collect();
                    if !subjects.is_empty() {
                        self.notify_invalidations(&mut tx, tenant_id, &subjects).await?;
                    }
                    for (r, done) in revocations.iter().zip(&revoked) {
                        if let Some((_, grants)) = done {
                            Self::append_revocation_events(&mut tx, r.event, grants, grant_event)
                                .await?;
                        }
                    }
                    tx.commit().await?;
                    revoked
                        .into_iter()
                        .flatten()
                        .map(|(row, _)| row.try_into())
                        .collect::<Result<Vec<keyplane_core::Credential>, _>>()
                };
                self.write_if(revoking, |revoked| !revoked.is_empty()).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, credential.id = %id))]
            async fn update_robot_permissions(
                &self,
                tenant_id: keyplane_core::TenantId,
                id: keyplane_core::CredentialId,
                permissions: &[keyplane_core::RobotPermission],
                at: chrono::DateTime<chrono::Utc>,
                event: $crate::EventOf<'_, keyplane_core::Credential>,
            ) -> Result<keyplane_core::Credential, $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    // The robot as this write replaces it: a no-op UPDATE locks the row until
                    // commit on PostgreSQL (SQLite has one writer), so a concurrent update waits
                    // and then reads what this one wrote.
                    let lock = format!(
                        "UPDATE credentials SET updated_at = updated_at \
                         WHERE tenant_id = $1 AND kind = $2 AND id = $3 AND revoked_at IS NULL \
                         RETURNING {}",
                        $crate::sql::CREDENTIAL_COLUMNS
                    );
                    let before: Option<$crate::rows::CredentialRow> = sqlx::query_as(&lock)
                        .bind(tenant_id.as_uuid())
                        .bind(keyplane_core::CredentialKind::RobotAccount.as_str())
                        .bind(id.as_uuid())
                        .fetch_optional(&mut *tx)
                        .await?;
                    let before: keyplane_core::Credential =
                        before.ok_or($crate::StoreError::NotFound)?.try_into()?;
                    let sql = format!(
                        "UPDATE credentials SET permissions = $1, updated_at = $2 \
                         WHERE tenant_id = $3 AND kind = $4 AND id = $5 AND revoked_at IS NULL \
                         RETURNING {}",
                        $crate::sql::CREDENTIAL_COLUMNS
                    );
                    let row: Option<$crate::rows::CredentialRow> = sqlx::query_as(&sql)
                        .bind($crate::rows::permission_list_json(permissions))
                        .bind(at)
                        .bind(tenant_id.as_uuid())
                        .bind(keyplane_core::CredentialKind::RobotAccount.as_str())
                        .bind(id.as_uuid())
                        .fetch_optional(&mut *tx)
                        .await?;
                    if row.is_some() {
                        self.notify_invalidation(&mut tx, tenant_id, id.as_uuid()).await?;
                        Self::append_audit(&mut tx, &event(&before)).await?;
                    }
                    tx.commit().await?;
                    row.ok_or($crate::StoreError::NotFound)?.try_into()
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %registry.tenant_id))]
            async fn create_registry(
                &self,
                registry: &keyplane_core::Registry,
                default_robot: &keyplane_core::Credential,
                max_live: Option<u64>,
                events: &[keyplane_core::AuditEvent],
                answer: $crate::AnswerOf<'_, keyplane_core::Registry>,
            ) -> Result<(), $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    sqlx::query($crate::sql::INSERT_REGISTRY)
                        .bind(registry.id)
                        .bind(registry.tenant_id.as_uuid())
                        .bind(&registry.project)
                        .bind(registry.quota_gb)
                        .bind(registry.created_at)
                        .bind(registry.updated_at)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| match $crate::StoreError::from(e) {
                            $crate::StoreError::Conflict(_) => $crate::StoreError::Conflict(
                                "a registry for this tenant or with this project name exists".into(),
                            ),
                            other => other,
                        })?;
                    bind_credential(sqlx::query($crate::sql::INSERT_CREDENTIAL), default_robot)
                        .execute(&mut *tx)
                        .await?;
                    Self::refuse_past_live_limit(&mut tx, registry.tenant_id, max_live).await?;
                    for event in events {
                        Self::append_audit(&mut tx, event).await?;
                    }
                    Self::keep_answer(&mut tx, answer, registry).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id))]
            async fn get_registry(
                &self,
                tenant_id: keyplane_core::TenantId,
            ) -> Result<Option<keyplane_core::Registry>, $crate::StoreError> {
                let sql = format!("SELECT {} FROM registries WHERE tenant_id = $1", $crate::sql::REGISTRY_COLUMNS);
                // A robot's registry login reads it: one row by key.
                let mut read = $crate::verification::BoundedRead::acquire(&self.verifier).await?;
                let found = read
                    .within(|c| sqlx::query_as(&sql).bind(tenant_id.as_uuid()).fetch_optional(c))
                    .await;
                let row: Option<$crate::rows::RegistryRow> = read.finish(found)?;
                Ok(row.map(Into::into))
            }

            #[tracing::instrument(skip_all)]
            async fn project_taken(&self, project: &str) -> Result<bool, $crate::StoreError> {
                let row: Option<(uuid::Uuid,)> = sqlx::query_as("SELECT id FROM registries WHERE project = $1")
                    .bind(project)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.is_some())
            }

            #[tracing::instrument(skip_all)]
            async fn signing_key_or_insert(
                &self,
                candidate: &$crate::SigningKey,
                created: $crate::EventOf<'_, $crate::SigningKeyChange>,
            ) -> Result<$crate::SigningKey, $crate::StoreError> {
                self.first_signing_key(
                    $crate::sql::INSERT_SIGNING_KEY,
                    $crate::sql::SELECT_SIGNING_KEY,
                    candidate,
                    false,
                    created,
                )
                .await
            }

            #[tracing::instrument(skip_all)]
            async fn signing_keys(&self) -> Result<$crate::SigningKeys, $crate::StoreError> {
                let rows: Vec<$crate::rows::SlottedSigningKeyRow> =
                    sqlx::query_as($crate::sql::SELECT_SIGNING_KEYS)
                        .fetch_all(&self.pool)
                        .await?;
                let mut keys = $crate::SigningKeys::default();
                for row in rows {
                    let slot = match row.slot.as_str() {
                        "current" => &mut keys.current,
                        "next" => &mut keys.next,
                        "previous" => &mut keys.previous,
                        other => {
                            return Err($crate::StoreError::Other(anyhow::anyhow!(
                                "unknown registry signing key slot {other:?}"
                            )))
                        }
                    };
                    *slot = Some(row.key.into());
                }
                Ok(keys)
            }

            #[tracing::instrument(skip_all)]
            async fn stage_signing_key(
                &self,
                candidate: &$crate::SigningKey,
                staged: $crate::EventOf<'_, $crate::SigningKeyChange>,
            ) -> Result<$crate::SigningKey, $crate::StoreError> {
                self.first_signing_key(
                    $crate::sql::STAGE_SIGNING_KEY,
                    $crate::sql::SELECT_STAGED_SIGNING_KEY,
                    candidate,
                    true,
                    staged,
                )
                .await
            }

            #[tracing::instrument(skip_all)]
            async fn promote_signing_key(
                &self,
                at: chrono::DateTime<chrono::Utc>,
                promoted: $crate::EventOf<'_, $crate::SigningKeyChange>,
            ) -> Result<$crate::SigningKey, $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    let staged: Option<$crate::rows::SigningKeyRow> =
                        sqlx::query_as($crate::sql::LOCK_STAGED_SIGNING_KEY)
                            .fetch_optional(&mut *tx)
                            .await?;
                    let Some(staged) = staged else {
                        return Err($crate::StoreError::NotFound);
                    };
                    let replaced: Option<(String,)> =
                        sqlx::query_as($crate::sql::CURRENT_SIGNING_KEY_ID)
                            .fetch_optional(&mut *tx)
                            .await?;
                    sqlx::query($crate::sql::DROP_PREVIOUS_SIGNING_KEY)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query($crate::sql::DEMOTE_CURRENT_SIGNING_KEY)
                        .bind(at)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query($crate::sql::PROMOTE_NEXT_SIGNING_KEY)
                        .execute(&mut *tx)
                        .await?;
                    let staged: $crate::SigningKey = staged.into();
                    Self::record_signing_key_change(
                        &mut tx,
                        &staged.key_id,
                        replaced.map(|(id,)| id),
                        promoted,
                    )
                    .await?;
                    tx.commit().await?;
                    Ok(staged)
                })
                .await
            }

            #[tracing::instrument(skip_all)]
            async fn retire_previous_signing_key(
                &self,
                key_id: &str,
                retired: $crate::EventOf<'_, $crate::SigningKeyChange>,
            ) -> Result<bool, $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    let dropped = sqlx::query($crate::sql::RETIRE_PREVIOUS_SIGNING_KEY)
                        .bind(key_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                    if dropped {
                        Self::record_signing_key_change(&mut tx, key_id, None, retired).await?;
                    }
                    tx.commit().await?;
                    Ok(dropped)
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %grant.tenant_id, grant.id = %grant.id))]
            async fn insert_grant(
                &self,
                grant: &keyplane_core::Grant,
                event: &keyplane_core::AuditEvent,
                answer: $crate::AnswerOf<'_, keyplane_core::Grant>,
            ) -> Result<(), $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    // The subject's live grants are counted below, which is not atomic under READ
                    // COMMITTED: grants to one subject are made one at a time, under its service
                    // account's row lock, or else the tenant's audit head (as webhooks keep to
                    // their cap).
                    let mut lock_head = true;
                    if grant.subject_type == keyplane_core::SubjectType::ServiceAccount {
                        type State = (
                            Option<chrono::DateTime<chrono::Utc>>,
                            Option<chrono::DateTime<chrono::Utc>>,
                            Option<chrono::DateTime<chrono::Utc>>,
                        );
                        let state: Option<State> = sqlx::query_as($crate::sql::LOCK_SERVICE_ACCOUNT)
                            .bind(grant.subject_id)
                            .bind(grant.tenant_id.as_uuid())
                            .fetch_optional(&mut *tx)
                            .await?;
                        lock_head = state.is_none();
                        let unusable = state.is_some_and(|(revoked, suspended, expires)| {
                            revoked.is_some()
                                || suspended.is_some()
                                || expires.is_some_and(|at| at <= grant.created_at)
                        });
                        if unusable {
                            return Err($crate::StoreError::Conflict(
                                "the service account is revoked, suspended or expired".into(),
                            ));
                        }
                    }
                    let insert = sqlx::query($crate::sql::INSERT_GRANT)
                        .bind(grant.id.as_uuid())
                        .bind(grant.tenant_id.as_uuid())
                        .bind(grant.kind.as_str())
                        .bind(grant.subject_type.as_str())
                        .bind(grant.subject_id)
                        .bind(grant.capability_key.as_ref().map(|k| k.as_str()))
                        .bind(&grant.resource.resource_type)
                        .bind(&grant.resource.resource_id)
                        .bind(grant.created_at)
                        .bind(grant.revoked_at)
                        .bind(grant.created_by_user_id.map(|u| u.as_uuid()));
                    let by = $crate::rows::CreatedByColumns::of(grant.created_by.as_ref());
                    insert
                        .bind(by.actor_type)
                        .bind(by.actor_id)
                        .bind(by.via)
                        .bind(by.os_user)
                        .bind(by.operator)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| match $crate::StoreError::from(e) {
                            $crate::StoreError::Conflict(_) => {
                                $crate::StoreError::Conflict("the same live grant already exists".into())
                            }
                            other => other,
                        })?;
                    // Taken after the insert, as a revoke takes the grant's row before the head: an
                    // insert waiting on a live grant being revoked (the same key) holds no head, so
                    // the two cannot deadlock. The count is a statement of its own, so under READ
                    // COMMITTED it still sees every grant committed before the head was ours.
                    if lock_head {
                        Self::lock_audit_head(&mut tx, grant.tenant_id).await?;
                    }
                    // Counted after the insert, so that the same live grant again is still refused
                    // as a duplicate (above), not for the cap.
                    let live: i64 = sqlx::query_scalar($crate::sql::COUNT_LIVE_GRANTS_OF_SUBJECT)
                        .bind(grant.tenant_id.as_uuid())
                        .bind(grant.subject_type.as_str())
                        .bind(grant.subject_id)
                        .fetch_one(&mut *tx)
                        .await?;
                    if live > keyplane_core::grant::MAX_LIVE_GRANTS_PER_SUBJECT as i64 {
                        return Err($crate::StoreError::Conflict(
                            keyplane_core::grant::too_many_grants_message(),
                        ));
                    }
                    self.notify_invalidation(&mut tx, grant.tenant_id, grant.subject_id).await?;
                    Self::append_audit(&mut tx, event).await?;
                    Self::keep_answer(&mut tx, answer, grant).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %filter.tenant_id))]
            async fn list_grants(
                &self,
                filter: &$crate::GrantFilter,
            ) -> Result<Vec<keyplane_core::Grant>, $crate::StoreError> {
                // Only the conditions that apply, as for credentials: the cursor seeks the
                // listing index, so a page costs the same wherever it starts.
                let mut sql = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM grants WHERE tenant_id = ",
                    $crate::sql::GRANT_COLUMNS
                ));
                sql.push_bind(filter.tenant_id.as_uuid());
                use $crate::sql::and_if;
                and_if(&mut sql, "subject_type = ", filter.subject_type.map(|t| t.as_str()));
                and_if(&mut sql, "subject_id = ", filter.subject_id);
                and_if(&mut sql, "grant_kind = ", filter.kind.map(|kind| kind.as_str()));
                and_if(&mut sql, "capability_key = ", filter.capability_key.clone());
                if !filter.include_revoked {
                    sql.push(" AND revoked_at IS NULL");
                }
                and_if(&mut sql, "id > ", filter.after.map(|after| after.as_uuid()));
                sql.push(" ORDER BY id LIMIT ");
                sql.push_bind(filter.limit.map_or(i64::MAX, i64::from));
                // One subject's live grants (a verification's rights) are few and indexed.
                let rows: Vec<$crate::rows::GrantRow> = if $crate::sql::one_subjects_live_grants(filter) {
                    let mut read = $crate::verification::BoundedRead::acquire(&self.verifier).await?;
                    let found = read.within(|c| sql.build_query_as().fetch_all(c)).await;
                    read.finish(found)?
                } else {
                    sql.build_query_as().fetch_all(&self.pool).await?
                };
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(skip_all, fields(subject.id = %subject_id))]
            async fn list_grants_of_subject(
                &self,
                subject_type: keyplane_core::SubjectType,
                subject_id: uuid::Uuid,
            ) -> Result<Vec<keyplane_core::Grant>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM grants WHERE subject_type = $1 AND subject_id = $2 \
                     AND revoked_at IS NULL ORDER BY tenant_id, id",
                    $crate::sql::GRANT_COLUMNS
                );
                // A verification's (a user's rights): few and indexed.
                let mut read = $crate::verification::BoundedRead::acquire(&self.verifier).await?;
                let found = read
                    .within(|c| {
                        sqlx::query_as(&sql)
                            .bind(subject_type.as_str())
                            .bind(subject_id)
                            .fetch_all(c)
                    })
                    .await;
                let rows: Vec<$crate::rows::GrantRow> = read.finish(found)?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, grant.id = %id))]
            async fn get_grant(
                &self,
                tenant_id: keyplane_core::TenantId,
                id: keyplane_core::GrantId,
            ) -> Result<Option<keyplane_core::Grant>, $crate::StoreError> {
                let sql = format!(
                    "SELECT {} FROM grants WHERE tenant_id = $1 AND id = $2",
                    $crate::sql::GRANT_COLUMNS
                );
                let row: Option<$crate::rows::GrantRow> = sqlx::query_as(&sql)
                    .bind(tenant_id.as_uuid())
                    .bind(id.as_uuid())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, grant.id = %id))]
            async fn revoke_grant(
                &self,
                tenant_id: keyplane_core::TenantId,
                id: keyplane_core::GrantId,
                at: chrono::DateTime<chrono::Utc>,
                event: &keyplane_core::AuditEvent,
            ) -> Result<keyplane_core::Grant, $crate::StoreError> {
                self.write(async {
                    let sql = format!(
                        "UPDATE grants SET revoked_at = COALESCE(revoked_at, $1) \
                         WHERE tenant_id = $2 AND id = $3 RETURNING {}",
                        $crate::sql::GRANT_COLUMNS
                    );
                    let mut tx = self.writer.begin().await?;
                    let row: Option<$crate::rows::GrantRow> = sqlx::query_as(&sql)
                        .bind(at)
                        .bind(tenant_id.as_uuid())
                        .bind(id.as_uuid())
                        .fetch_optional(&mut *tx)
                        .await?;
                    // Revoking again changes nothing, records nothing and tells no other
                    // replica anything.
                    if let Some(revoked) = row.as_ref().filter(|r| r.revoked_at() == Some(at)) {
                        self.notify_invalidation(&mut tx, tenant_id, revoked.subject_id()).await?;
                        Self::append_audit(&mut tx, event).await?;
                    }
                    tx.commit().await?;
                    row.ok_or($crate::StoreError::NotFound)?.try_into()
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %event.tenant_id))]
            async fn append_audit_event(
                &self,
                event: &keyplane_core::AuditEvent,
            ) -> Result<(), $crate::StoreError> {
                self.write_if(async {
                    let mut tx = self.writer.begin().await?;
                    // Only the writer that made an event retries it, one attempt after another:
                    // no lock needed between this read and the append.
                    let written = sqlx::query($crate::audit::AUDIT_EVENT_EXISTS)
                        .bind(event.tenant_id.as_uuid())
                        .bind(event.id)
                        .fetch_optional(&mut *tx)
                        .await?
                        .is_some();
                    if !written {
                        match Self::append_audit(&mut tx, event).await {
                            // Another writer appended it since the read (a retry racing the
                            // attempt whose commit was still on its way, or another replica
                            // working off the same leak report): it is in the trail.
                            Err(error) if $crate::audit::is_duplicate_event(&error) => {
                                return Ok(false)
                            }
                            outcome => outcome?,
                        }
                        tx.commit().await.map_err($crate::StoreError::from_commit)?;
                    }
                    Ok(!written)
                }, |appended| *appended)
                .await
                .map(drop)
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %query.tenant_id))]
            async fn list_audit_events(
                &self,
                query: &$crate::AuditQuery,
            ) -> Result<Vec<keyplane_core::ChainedEvent>, $crate::StoreError> {
                Self::query_audit(&self.pool, query).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id))]
            async fn audit_chain_state(
                &self,
                tenant_id: keyplane_core::TenantId,
            ) -> Result<$crate::AuditChainState, $crate::StoreError> {
                Self::audit_chain_state_of(&self.pool, tenant_id).await
            }

            async fn audit_heads(
                &self,
            ) -> Result<Vec<(keyplane_core::TenantId, u64, [u8; 32])>, $crate::StoreError> {
                Self::audit_heads_of(&self.pool).await
            }

            #[tracing::instrument(skip_all)]
            async fn prune_audit_events(
                &self,
                before: chrono::DateTime<chrono::Utc>,
                batch: u32,
                exported_by: Option<&str>,
                pruned: $crate::EventOf<'_, $crate::PrunedPrefix>,
            ) -> Result<u64, $crate::StoreError> {
                self.write_background(Self::prune_audit_batch(&self.writer, before, batch, exported_by, pruned))
                    .await
            }

            async fn audit_export_cursors(
                &self,
                consumer: &str,
            ) -> Result<Vec<(keyplane_core::TenantId, u64)>, $crate::StoreError> {
                Self::export_cursors_of(&self.pool, consumer).await
            }

            async fn save_audit_export_cursors(
                &self,
                consumer: &str,
                cursors: &[(keyplane_core::TenantId, u64)],
            ) -> Result<(), $crate::StoreError> {
                self.write_background(Self::save_export_cursors(&self.writer, consumer, cursors))
                    .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, credential.id = %id))]
            async fn set_credential_suspended(
                &self,
                tenant_id: keyplane_core::TenantId,
                kind: keyplane_core::CredentialKind,
                id: keyplane_core::CredentialId,
                suspended_at: Option<chrono::DateTime<chrono::Utc>>,
                at: chrono::DateTime<chrono::Utc>,
                event: &keyplane_core::AuditEvent,
                while_live: Option<&keyplane_core::TokenHash>,
            ) -> Result<(keyplane_core::Credential, bool), $crate::StoreError> {
                self.write(async {
                    // Only a change of state matches: suspending a suspended credential (or
                    // resuming an active one) touches nothing and records nothing.
                    let state = if suspended_at.is_some() { "suspended_at IS NULL" } else { "suspended_at IS NOT NULL" };
                    let sql = format!(
                        "UPDATE credentials SET suspended_at = $1, updated_at = $2 \
                         WHERE tenant_id = $3 AND kind = $4 AND id = $5 AND revoked_at IS NULL AND {state} AND {} \
                         RETURNING {}",
                        $crate::sql::while_live("$6", "$2"),
                        $crate::sql::CREDENTIAL_COLUMNS
                    );
                    let mut tx = self.writer.begin().await?;
                    let row: Option<$crate::rows::CredentialRow> = sqlx::query_as(&sql)
                        .bind(suspended_at)
                        .bind(at)
                        .bind(tenant_id.as_uuid())
                        .bind(kind.as_str())
                        .bind(id.as_uuid())
                        .bind(while_live.map(|hash| hash.as_bytes().to_vec()))
                        .fetch_optional(&mut *tx)
                        .await?;
                    if row.is_some() {
                        self.notify_invalidation(&mut tx, tenant_id, id.as_uuid()).await?;
                        Self::append_audit(&mut tx, event).await?;
                    }
                    tx.commit().await?;
                    match row {
                        Some(row) => Ok((row.try_into()?, true)),
                        None => match self.get_credential(tenant_id, kind, id).await? {
                            Some(c) if c.is_revoked() => Err($crate::StoreError::Conflict("the credential is revoked".into())),
                            Some(c) => Ok((c, false)),
                            None => Err($crate::StoreError::NotFound),
                        },
                    }
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, credential.id = %id))]
            async fn retire_previous_secret(
                &self,
                tenant_id: keyplane_core::TenantId,
                kind: keyplane_core::CredentialKind,
                id: keyplane_core::CredentialId,
                previous: &keyplane_core::TokenHash,
                at: chrono::DateTime<chrono::Utc>,
                event: &keyplane_core::AuditEvent,
            ) -> Result<Option<keyplane_core::Credential>, $crate::StoreError> {
                self.write_if(async {
                    let sql = format!(
                        "UPDATE credentials SET previous_secret_hash = NULL, previous_secret_expires_at = NULL, \
                         previous_secret_last_used_at = NULL, retire_previous_when_unused_seconds = NULL, updated_at = $1 \
                         WHERE tenant_id = $2 AND kind = $3 AND id = $4 AND previous_secret_hash = $5 \
                         RETURNING {}",
                        $crate::sql::CREDENTIAL_COLUMNS
                    );
                    let mut tx = self.writer.begin().await?;
                    let row: Option<$crate::rows::CredentialRow> = sqlx::query_as(&sql)
                        .bind(at)
                        .bind(tenant_id.as_uuid())
                        .bind(kind.as_str())
                        .bind(id.as_uuid())
                        .bind(&previous.as_bytes()[..])
                        .fetch_optional(&mut *tx)
                        .await?;
                    if row.is_some() {
                        self.notify_invalidation(&mut tx, tenant_id, id.as_uuid()).await?;
                        Self::append_audit(&mut tx, event).await?;
                    }
                    tx.commit().await?;
                    row.map(TryInto::try_into).transpose()
                }, |retired| retired.is_some())
                .await
            }

            #[tracing::instrument(skip_all)]
            async fn credentials_with_previous_secret(
                &self,
                limit: u32,
            ) -> Result<Vec<keyplane_core::Credential>, $crate::StoreError> {
                let sql = $crate::sql::in_grace_sql();
                let rows: Vec<$crate::rows::CredentialRow> = sqlx::query_as(&sql)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(skip_all)]
            async fn credentials_retiring_previous_when_unused(
                &self,
                after: Option<(chrono::DateTime<chrono::Utc>, keyplane_core::CredentialId)>,
                limit: u32,
            ) -> Result<Vec<keyplane_core::Credential>, $crate::StoreError> {
                let sql = $crate::sql::retiring_previous_sql(after.is_some());
                let mut query =
                    sqlx::query_as::<_, $crate::rows::CredentialRow>(&sql).bind(i64::from(limit));
                if let Some((expires_at, id)) = after {
                    query = query.bind(expires_at).bind(id.as_uuid());
                }
                let rows = query.fetch_all(&self.pool).await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(skip_all)]
            async fn clear_ended_previous_secrets(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::StoreError> {
                // A row a statement: one UPDATE of them all would lock the rows in the table's
                // order while waiting for the next, and deadlock on PostgreSQL with a last-use
                // flush holding them in id order.
                self.write_background(async {
                    let ended: Vec<(uuid::Uuid,)> = sqlx::query_as($crate::sql::ENDED_PREVIOUS_SECRETS)
                        .bind(now)
                        .fetch_all(&self.writer)
                        .await?;
                    let mut cleared = 0;
                    for (id,) in ended {
                        cleared += sqlx::query($crate::sql::CLEAR_ENDED_PREVIOUS_SECRET)
                            .bind(id)
                            .bind(now)
                            .execute(&self.writer)
                            .await?
                            .rows_affected();
                    }
                    Ok(cleared)
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(stage))]
            async fn credentials_due_for_expiry_notice(
                &self,
                stage: u32,
                due_before: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<Vec<keyplane_core::Credential>, $crate::StoreError> {
                let sql = $crate::sql::expiry_notice_sql(stage);
                let rows: Vec<$crate::rows::CredentialRow> = sqlx::query_as(&sql)
                    .bind(due_before)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(skip_all, fields(credential.id = %credential.id, stage))]
            async fn record_expiry_notice(
                &self,
                credential: &keyplane_core::Credential,
                stage: u32,
                event: &keyplane_core::AuditEvent,
            ) -> Result<bool, $crate::StoreError> {
                self.write_if(async {
                    let stage = i32::try_from(stage).unwrap_or(0);
                    let mut tx = self.writer.begin().await?;
                    let claimed = sqlx::query(
                        "UPDATE credentials SET expiry_notice_days = $1 WHERE id = $2 AND expires_at = $3 \
                         AND revoked_at IS NULL AND (expiry_notice_days IS NULL OR expiry_notice_days > $1)",
                    )
                    .bind(stage)
                    .bind(credential.id.as_uuid())
                    .bind(credential.expires_at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                        == 1;
                    if claimed {
                        Self::append_audit(&mut tx, event).await?;
                    }
                    tx.commit().await?;
                    Ok(claimed)
                }, |claimed| *claimed)
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id))]
            async fn get_credential_policy(
                &self,
                tenant_id: keyplane_core::TenantId,
            ) -> Result<Option<(keyplane_core::CredentialPolicy, chrono::DateTime<chrono::Utc>)>, $crate::StoreError> {
                let row: Option<(String, chrono::DateTime<chrono::Utc>)> =
                    sqlx::query_as($crate::sql::SELECT_CREDENTIAL_POLICY)
                        .bind(tenant_id.as_uuid())
                        .fetch_optional(&self.pool)
                        .await?;
                row.map(|(text, at)| Ok(($crate::rows::policy_from_json(&text)?, at)))
                    .transpose()
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id))]
            async fn put_credential_policy(
                &self,
                tenant_id: keyplane_core::TenantId,
                policy: &keyplane_core::CredentialPolicy,
                at: chrono::DateTime<chrono::Utc>,
                event: &keyplane_core::AuditEvent,
            ) -> Result<(), $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    sqlx::query($crate::sql::UPSERT_CREDENTIAL_POLICY)
                        .bind(tenant_id.as_uuid())
                        .bind($crate::rows::policy_json(policy))
                        .bind(at)
                        .execute(&mut *tx)
                        .await?;
                    Self::append_audit(&mut tx, event).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id))]
            async fn count_credentials_exceeding(
                &self,
                tenant_id: keyplane_core::TenantId,
                kind: keyplane_core::CredentialKind,
                rule: &keyplane_core::LifetimeRule,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::StoreError> {
                let unbounded_exceeds = rule.require_expiry || rule.max_lifetime_days.is_some();
                // What `expiry_for` still accepts is not exceeding.
                let latest_accepted = rule
                    .latest_expiry(now)
                    .map(|latest| latest + keyplane_core::policy::CALLER_CLOCK_TOLERANCE);
                let (count,): (i64,) = sqlx::query_as($crate::sql::COUNT_CREDENTIALS_EXCEEDING)
                    .bind(tenant_id.as_uuid())
                    .bind(kind.as_str())
                    .bind(now)
                    .bind(unbounded_exceeds)
                    .bind(latest_accepted)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(u64::try_from(count).unwrap_or(0))
            }

            fn listen_invalidations(
                &self,
                on_event: $crate::InvalidationHandler,
                stop: $crate::StopSignal,
            ) {
                self.spawn_invalidation_listener(on_event, stop);
            }

            #[tracing::instrument(skip_all, fields(count = uses.len()))]
            async fn record_last_used(
                &self,
                uses: &[$crate::CredentialUse],
            ) -> Result<(), $crate::StoreError> {
                // A statement a chunk, never one a use: each round trip would hold the rows
                // written before it longer, and a revocation of one waits for the commit.
                let rounds = $crate::sql::last_use_rounds(uses);
                let Some(every_credential) = rounds.first() else {
                    return Ok(());
                };
                self.write_background(async {
                    let mut tx = self.writer.begin().await?;
                    let ids: Vec<uuid::Uuid> =
                        every_credential.iter().map(|used| used.id.as_uuid()).collect();
                    Self::lock_credentials(&mut tx, &ids).await?;
                    for round in &rounds {
                        for chunk in round.chunks($crate::sql::LAST_USE_CHUNK) {
                            let sql = $crate::sql::touch_last_used(chunk.len(), Self::PLACEHOLDERS);
                            // Not kept prepared: batch sizes vary, and each would be another
                            // statement in the connection's cache.
                            let mut query = sqlx::query(&sql).persistent(false);
                            for used in chunk {
                                query = query
                                    .bind(used.id.as_uuid())
                                    .bind(used.at)
                                    .bind(&used.secret[..]);
                            }
                            query.execute(&mut *tx).await?;
                        }
                    }
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %claim.tenant_id))]
            async fn claim_idempotency_key(
                &self,
                claim: &$crate::IdempotencyClaim,
            ) -> Result<$crate::IdempotencyRecord, $crate::StoreError> {
                let claimed = sqlx::query($crate::sql::CLAIM_IDEMPOTENCY_KEY)
                    .bind(&claim.lookup_id[..])
                    .bind(claim.tenant_id.as_uuid())
                    .bind(claim.principal_id)
                    .bind(&claim.fingerprint[..])
                    .bind(claim.claim_id)
                    .bind(claim.now.timestamp_millis())
                    .bind(claim.locked_until.timestamp_millis())
                    .bind(claim.expired_before.timestamp_millis())
                    .execute(&self.writer)
                    .await?
                    .rows_affected()
                    == 1;
                if claimed {
                    return Ok($crate::IdempotencyRecord::Claimed);
                }
                let row: Option<$crate::rows::IdempotencyRow> =
                    sqlx::query_as($crate::sql::SELECT_IDEMPOTENCY_KEY)
                        .bind(&claim.lookup_id[..])
                        .bind(claim.tenant_id.as_uuid())
                        .bind(claim.principal_id)
                        .fetch_optional(&self.writer)
                        .await?;
                match row {
                    Some(row) => row.try_into(),
                    // Released or pruned between the two statements: its holder just finished, so
                    // the caller answers as for one in flight and the client's retry claims it.
                    None => Ok($crate::IdempotencyRecord::InFlight {
                        fingerprint: claim.fingerprint,
                    }),
                }
            }

            #[tracing::instrument(skip_all)]
            async fn release_idempotency_key(
                &self,
                lookup_id: &[u8; 32],
                claim_id: uuid::Uuid,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query($crate::sql::RELEASE_IDEMPOTENCY_KEY)
                    .bind(&lookup_id[..])
                    .bind(claim_id)
                    .execute(&self.writer)
                    .await?;
                Ok(())
            }

            #[tracing::instrument(skip_all)]
            async fn prune_idempotency_keys(
                &self,
                created_before: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<u64, $crate::StoreError> {
                Ok(sqlx::query($crate::sql::PRUNE_IDEMPOTENCY_KEYS)
                    .bind(created_before.timestamp_millis())
                    .bind(i64::from(limit))
                    .execute(&self.writer)
                    .await?
                    .rows_affected())
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %webhook.tenant_id, webhook.id = %webhook.id))]
            async fn create_webhook(
                &self,
                webhook: &keyplane_core::Webhook,
                max_per_tenant: u32,
                event: &keyplane_core::AuditEvent,
                answer: $crate::AnswerOf<'_, keyplane_core::Webhook>,
            ) -> Result<(), $crate::StoreError> {
                self.write(self.webhook_create(webhook, max_per_tenant, event, answer)).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id))]
            async fn list_webhooks(
                &self,
                tenant_id: keyplane_core::TenantId,
            ) -> Result<Vec<keyplane_core::Webhook>, $crate::StoreError> {
                self.webhooks_of(tenant_id, None).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, webhook.id = %id))]
            async fn get_webhook(
                &self,
                tenant_id: keyplane_core::TenantId,
                id: uuid::Uuid,
            ) -> Result<Option<keyplane_core::Webhook>, $crate::StoreError> {
                Ok(self.webhooks_of(tenant_id, Some(id)).await?.pop())
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %webhook.tenant_id, webhook.id = %webhook.id))]
            async fn update_webhook(
                &self,
                webhook: &keyplane_core::Webhook,
                event: &keyplane_core::AuditEvent,
            ) -> Result<(), $crate::StoreError> {
                self.write(self.webhook_update(webhook, event)).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, webhook.id = %id))]
            async fn rotate_webhook_secret(
                &self,
                tenant_id: keyplane_core::TenantId,
                id: uuid::Uuid,
                secret: &keyplane_core::WebhookSecret,
                previous_until: chrono::DateTime<chrono::Utc>,
                at: chrono::DateTime<chrono::Utc>,
                event: &keyplane_core::AuditEvent,
                answer: $crate::AnswerOf<'_, keyplane_core::Webhook>,
            ) -> Result<keyplane_core::Webhook, $crate::StoreError> {
                self.write(self.secret_rotate(tenant_id, id, secret, previous_until, at, event, answer))
                    .await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, webhook.id = %id))]
            async fn delete_webhook(
                &self,
                tenant_id: keyplane_core::TenantId,
                id: uuid::Uuid,
                event: &keyplane_core::AuditEvent,
            ) -> Result<(), $crate::StoreError> {
                self.write(self.webhook_delete(tenant_id, id, event)).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %query.tenant_id, webhook.id = %query.webhook_id))]
            async fn list_webhook_deliveries(
                &self,
                query: &$crate::DeliveryQuery,
            ) -> Result<Vec<$crate::WebhookDelivery>, $crate::StoreError> {
                Self::deliveries_of(&self.pool, query, None).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %tenant_id, webhook.id = %webhook_id))]
            async fn retry_webhook_delivery(
                &self,
                tenant_id: keyplane_core::TenantId,
                webhook_id: uuid::Uuid,
                event_id: uuid::Uuid,
                at: chrono::DateTime<chrono::Utc>,
                schedule_step: u32,
                event: &keyplane_core::AuditEvent,
            ) -> Result<$crate::WebhookDelivery, $crate::StoreError> {
                self.write(self.delivery_retry(tenant_id, webhook_id, event_id, at, schedule_step, event))
                    .await
            }

            #[tracing::instrument(skip_all)]
            async fn claim_webhook_deliveries(
                &self,
                claim: &$crate::DeliveryClaim,
            ) -> Result<Vec<$crate::DeliveryJob>, $crate::StoreError> {
                if !self.deliveries_due(claim.now).await? {
                    return Ok(Vec::new());
                }
                self.write_background(self.deliveries_claim(claim)).await
            }

            #[tracing::instrument(skip_all, fields(lease.id = %lease_id))]
            async fn renew_webhook_lease(
                &self,
                lease_id: uuid::Uuid,
                until: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<(uuid::Uuid, uuid::Uuid)>, $crate::StoreError> {
                self.write_background(self.lease_renew(lease_id, until)).await
            }

            #[tracing::instrument(skip_all, fields(webhook.id = %attempt.webhook_id))]
            async fn record_webhook_attempt(
                &self,
                attempt: &$crate::DeliveryAttempt,
                disable_failing_since: chrono::DateTime<chrono::Utc>,
                disable_event: &keyplane_core::AuditEvent,
            ) -> Result<$crate::AttemptRecorded, $crate::StoreError> {
                self.write_background(self.attempt_record(attempt, disable_failing_since, disable_event))
                    .await
            }

            #[tracing::instrument(skip_all)]
            async fn webhook_backlog(&self) -> Result<$crate::WebhookBacklog, $crate::StoreError> {
                self.deliveries_backlog().await
            }

            #[tracing::instrument(skip_all)]
            async fn prune_webhook_deliveries(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                before: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<u64, $crate::StoreError> {
                // Background housekeeping, like the idempotency prune: not a client's write, so
                // it does not count towards `/readyz`.
                self.deliveries_prune(now, before, limit).await
            }

            #[tracing::instrument(skip_all, fields(leak_report.id = %report.id))]
            async fn insert_leak_report(
                &self,
                report: &$crate::LeakReportRecord,
                lease_id: uuid::Uuid,
                lease_until: chrono::DateTime<chrono::Utc>,
                max_pending: u32,
            ) -> Result<bool, $crate::StoreError> {
                let hashes: Vec<u8> = report
                    .token_hashes
                    .iter()
                    .flat_map(|hash| *hash.as_bytes())
                    .collect();
                let insert = sqlx::query($crate::sql::INSERT_LEAK_REPORT)
                    .bind(report.id)
                    .bind(hashes)
                    .bind(report.context.request_id.as_deref())
                    .bind(report.context.client_ip.as_deref())
                    .bind(report.context.user_agent.as_deref())
                    .bind(report.received_at.timestamp_millis())
                    .bind(i32::try_from(report.attempts).unwrap_or(i32::MAX))
                    .bind(lease_id)
                    .bind(lease_until.timestamp_millis())
                    .bind(i64::from(max_pending))
                    .execute(&self.writer);
                self.write_if(async { Ok(insert.await?.rows_affected() == 1) }, |stored| {
                    *stored
                })
                .await
            }

            #[tracing::instrument(skip_all, fields(lease.id = %lease_id))]
            async fn claim_leak_reports(
                &self,
                lease_id: uuid::Uuid,
                now: chrono::DateTime<chrono::Utc>,
                lease_until: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<Vec<$crate::LeakReportRecord>, $crate::StoreError> {
                // A read first: most polls find nothing, and write nothing then.
                let due: Option<(i32,)> = sqlx::query_as($crate::sql::LEAK_REPORTS_DUE)
                    .bind(now.timestamp_millis())
                    .fetch_optional(&self.pool)
                    .await?;
                if due.is_none() {
                    return Ok(Vec::new());
                }
                let claim = sqlx::query_as::<_, $crate::rows::LeakReportRow>(
                    $crate::sql::CLAIM_LEAK_REPORTS,
                )
                .bind(lease_id)
                .bind(lease_until.timestamp_millis())
                .bind(now.timestamp_millis())
                .bind(i64::from(limit))
                .fetch_all(&self.writer);
                let rows = self
                    .write_background(async { Ok(claim.await?) })
                    .await?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            #[tracing::instrument(skip_all, fields(leak_report.id = %id))]
            async fn finish_leak_report(&self, id: uuid::Uuid) -> Result<(), $crate::StoreError> {
                let delete = sqlx::query($crate::sql::FINISH_LEAK_REPORT)
                    .bind(id)
                    .execute(&self.writer);
                self.write_background(async { Ok(delete.await.map(drop)?) }).await
            }

            #[tracing::instrument(skip_all)]
            async fn prune_leak_reports(
                &self,
                before: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<u64, $crate::StoreError> {
                // Housekeeping, like the other prunes: not counted towards `/readyz`.
                Ok(sqlx::query($crate::sql::PRUNE_LEAK_REPORTS)
                    .bind(before.timestamp_millis())
                    .bind(i64::from(limit))
                    .execute(&self.writer)
                    .await?
                    .rows_affected())
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %session.tenant_id))]
            async fn insert_console_session(
                &self,
                session: &$crate::ConsoleSession,
                event: &keyplane_core::AuditEvent,
            ) -> Result<(), $crate::StoreError> {
                self.write(async {
                    let mut tx = self.writer.begin().await?;
                    Self::insert_console_session_in(&mut *tx, session).await?;
                    Self::append_audit(&mut tx, event).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            #[tracing::instrument(skip_all)]
            async fn touch_console_session(
                &self,
                id_hash: &[u8; 32],
                now: chrono::DateTime<chrono::Utc>,
                idle_before: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<$crate::ConsoleSession>, $crate::StoreError> {
                let row: Option<$crate::rows::ConsoleSessionRow> =
                    sqlx::query_as($crate::sql::TOUCH_CONSOLE_SESSION)
                        .bind(&id_hash[..])
                        .bind(now.timestamp_millis())
                        .bind(idle_before.timestamp_millis())
                        .fetch_optional(&self.writer)
                        .await?;
                row.map(TryInto::try_into).transpose()
            }

            #[tracing::instrument(skip_all)]
            async fn set_console_session_notice(
                &self,
                id_hash: &[u8; 32],
                notice: Option<&str>,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query($crate::sql::SET_CONSOLE_SESSION_NOTICE)
                    .bind(&id_hash[..])
                    .bind(notice)
                    .execute(&self.writer)
                    .await?;
                Ok(())
            }

            #[tracing::instrument(skip_all)]
            async fn console_session_secrets(
                &self,
                id_hash: &[u8; 32],
            ) -> Result<Vec<Vec<u8>>, $crate::StoreError> {
                let rows: Vec<(i64, Vec<u8>)> =
                    sqlx::query_as($crate::sql::SELECT_CONSOLE_SESSION_SECRETS)
                        .bind(&id_hash[..])
                        .fetch_all(&self.writer)
                        .await?;
                Ok(rows.into_iter().map(|(_, sealed)| sealed).collect())
            }

            #[tracing::instrument(skip_all)]
            async fn take_console_session_secrets(
                &self,
                id_hash: &[u8; 32],
            ) -> Result<Vec<Vec<u8>>, $crate::StoreError> {
                let mut rows: Vec<(i64, Vec<u8>)> =
                    sqlx::query_as($crate::sql::TAKE_CONSOLE_SESSION_SECRETS)
                        .bind(&id_hash[..])
                        .fetch_all(&self.writer)
                        .await?;
                // RETURNING promises no order.
                rows.sort_by_key(|(seq, _)| *seq);
                Ok(rows.into_iter().map(|(_, sealed)| sealed).collect())
            }

            #[tracing::instrument(skip_all)]
            async fn delete_console_session(
                &self,
                id_hash: &[u8; 32],
                event: Option<&keyplane_core::AuditEvent>,
            ) -> Result<bool, $crate::StoreError> {
                self.write_if(async {
                    let mut tx = self.writer.begin().await?;
                    // The head before the session's row, in the order of a console change that
                    // appends its event and then keeps a secret for this session (whose foreign
                    // key locks the row): a sign-out in another tab meanwhile cannot deadlock it.
                    if let Some(event) = event {
                        Self::lock_audit_head(&mut tx, event.tenant_id).await?;
                    }
                    let deleted = sqlx::query($crate::sql::DELETE_CONSOLE_SESSION)
                        .bind(&id_hash[..])
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                    // Only the request that ended it records the end (another tab may have).
                    if let (true, Some(event)) = (deleted, event) {
                        Self::append_audit(&mut tx, event).await?;
                    }
                    tx.commit().await?;
                    Ok(deleted)
                }, |deleted| *deleted)
                .await
            }

            #[tracing::instrument(skip_all)]
            async fn prune_console_sessions(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                idle_before: chrono::DateTime<chrono::Utc>,
                limit: u32,
                ended: $crate::EventOf<'_, $crate::ConsoleSession>,
            ) -> Result<u64, $crate::StoreError> {
                self.write_background(async {
                    let mut tx = self.writer.begin().await?;
                    let rows: Vec<$crate::rows::ConsoleSessionRow> =
                        sqlx::query_as($crate::sql::PRUNE_CONSOLE_SESSIONS)
                            .bind(now.timestamp_millis())
                            .bind(idle_before.timestamp_millis())
                            .bind(i64::from(limit))
                            .fetch_all(&mut *tx)
                            .await?;
                    let pruned = rows.len() as u64;
                    let mut sessions = Vec::with_capacity(rows.len());
                    for row in rows {
                        match $crate::ConsoleSession::try_from(row) {
                            Ok(session) => sessions.push(session),
                            // Gone all the same; an unreadable row must not keep the others.
                            Err(error) => {
                                tracing::warn!(%error, "pruned an unreadable console session; its end is not recorded")
                            }
                        }
                    }
                    // Tenants' chain heads in one order, whatever order the rows came in.
                    sessions.sort_by_key(|s| (s.tenant_id.as_uuid(), s.created_at));
                    for session in &sessions {
                        Self::append_audit(&mut tx, &ended(session)).await?;
                    }
                    tx.commit().await?;
                    Ok(pruned)
                })
                .await
            }

            #[tracing::instrument(skip_all)]
            async fn list_tenants(
                &self,
                page: &$crate::TenantPage<'_>,
            ) -> Result<Vec<$crate::TenantListing>, $crate::StoreError> {
                let mut sql = Self::tenant_list_query(page);
                let rows: Vec<$crate::rows::TenantListingRow> =
                    sql.build_query_as().fetch_all(&self.pool).await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %new.tenant.id))]
            async fn create_tenant(
                &self,
                new: &$crate::NewTenant<'_>,
            ) -> Result<$crate::TenantCreated, $crate::StoreError> {
                self.tenant_create(new).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %id))]
            async fn get_tenant_record(
                &self,
                id: keyplane_core::TenantId,
            ) -> Result<Option<$crate::TenantRecord>, $crate::StoreError> {
                self.tenant_record(id).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %id))]
            async fn count_tenant_rows(
                &self,
                id: keyplane_core::TenantId,
            ) -> Result<$crate::TenantRows, $crate::StoreError> {
                self.tenant_rows(id).await
            }

            #[tracing::instrument(skip_all, fields(tenant.id = %id))]
            async fn purge_tenant(
                &self,
                id: keyplane_core::TenantId,
                at: chrono::DateTime<chrono::Utc>,
                batch: u32,
                deleted: $crate::EventOf<'_, $crate::TenantRows>,
            ) -> Result<Option<$crate::TenantRows>, $crate::StoreError> {
                self.tenant_purge(id, at, batch, deleted).await
            }

            #[tracing::instrument(skip_all, fields(count = ids.len()))]
            async fn find_credentials_by_ids(
                &self,
                ids: &[keyplane_core::CredentialId],
            ) -> Result<Vec<keyplane_core::Credential>, $crate::StoreError> {
                let mut found = Vec::new();
                for chunk in ids.chunks($crate::sql::LOOKUP_CHUNK) {
                    let mut sql = sqlx::QueryBuilder::<$db>::new(format!(
                        "SELECT {} FROM credentials WHERE id IN (",
                        $crate::sql::CREDENTIAL_COLUMNS
                    ));
                    let mut list = sql.separated(", ");
                    for id in chunk {
                        list.push_bind(id.as_uuid());
                    }
                    sql.push(")");
                    let rows: Vec<$crate::rows::CredentialRow> =
                        sql.build_query_as().fetch_all(&self.pool).await?;
                    for row in rows {
                        found.push(row.try_into()?);
                    }
                }
                Ok(found)
            }

            #[tracing::instrument(skip_all, fields(count = hashes.len()))]
            async fn find_credentials_by_hashes(
                &self,
                hashes: &[keyplane_core::TokenHash],
            ) -> Result<Vec<keyplane_core::Credential>, $crate::StoreError> {
                let mut found = Vec::new();
                for chunk in hashes.chunks($crate::sql::LOOKUP_CHUNK) {
                    let mut sql = sqlx::QueryBuilder::<$db>::new(format!(
                        "SELECT {} FROM credentials WHERE secret_hash IN (",
                        $crate::sql::CREDENTIAL_COLUMNS
                    ));
                    let push_chunk = |sql: &mut sqlx::QueryBuilder<'static, $db>| {
                        let mut list = sql.separated(", ");
                        for hash in chunk {
                            list.push_bind(hash.as_bytes().to_vec());
                        }
                    };
                    push_chunk(&mut sql);
                    sql.push(") OR previous_secret_hash IN (");
                    push_chunk(&mut sql);
                    sql.push(")");
                    let rows: Vec<$crate::rows::CredentialRow> =
                        sql.build_query_as().fetch_all(&self.pool).await?;
                    for row in rows {
                        found.push(row.try_into()?);
                    }
                }
                Ok(found)
            }
        }
    };
}

/// Binds every column of [`INSERT_CREDENTIAL`], in order.
macro_rules! bind_credential_fn {
    ($db:ty) => {
        fn bind_credential<'q>(
            query: sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
            c: &'q keyplane_core::Credential,
        ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
            let by = $crate::rows::CreatedByColumns::of(c.created_by.as_ref());
            query
                .bind(c.id.as_uuid())
                .bind(c.tenant_id.as_uuid())
                .bind(c.kind.as_str())
                .bind(&c.name)
                .bind(&c.secret_hash.as_bytes()[..])
                .bind(&c.display.prefix)
                .bind(&c.display.public_id)
                .bind(&c.display.last4)
                .bind($crate::rows::scopes_json(&c.scopes))
                .bind($crate::rows::permissions_json(c))
                .bind(c.expires_at)
                .bind(c.created_at)
                .bind(c.updated_at)
                .bind(c.last_used_at)
                .bind(c.revoked_at)
                .bind(c.created_by_user_id.map(|u| u.as_uuid()))
                .bind(c.revoked_by_user_id.map(|u| u.as_uuid()))
                .bind(c.canary)
                .bind(by.actor_type)
                .bind(by.actor_id)
                .bind(by.via)
                .bind(by.os_user)
                .bind(by.operator)
        }
    };
}

pub(crate) use bind_credential_fn;
pub(crate) use impl_store;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    /// `NNNN_name.sql` files of `migrations/<backend>`, by version; panics on a file sqlx would
    /// not take as a migration, or on two files sharing a version (sqlx sorts them one after the
    /// other, and a store then refuses the second as "modified").
    fn migrations(backend: &str) -> BTreeMap<i64, String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(backend);
        let mut versions = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let (version, rest) = name
                .split_once('_')
                .unwrap_or_else(|| panic!("{backend}/{name}: not NNNN_name.sql"));
            let description = rest
                .strip_suffix(".sql")
                .unwrap_or_else(|| panic!("{backend}/{name}: not NNNN_name.sql"));
            let version: i64 = version
                .parse()
                .unwrap_or_else(|_| panic!("{backend}/{name}: not NNNN_name.sql"));
            if let Some(other) = versions.insert(version, description.to_owned()) {
                panic!("{backend}: two migrations numbered {version}: {other} and {description}");
            }
        }
        versions
    }

    /// Both backends have the same migrations, by number and name: the other backend's copy of a
    /// migration is never forgotten, or given another number.
    #[test]
    fn migration_versions_are_unique_and_the_same_on_both_backends() {
        let sqlite = migrations("sqlite");
        let postgres = migrations("postgres");
        let only_in = |one: &BTreeMap<i64, String>, other: &BTreeMap<i64, String>| {
            one.iter()
                .filter(|(version, name)| other.get(version) != Some(name))
                .map(|(version, name)| format!("{version:04}_{name}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (only_in(&sqlite, &postgres), only_in(&postgres, &sqlite)),
            (vec![], vec![]),
            "(only in sqlite, only in postgres)"
        );
        // What the embedded migrators hold is what the files say.
        let embedded = |migrator: &sqlx::migrate::Migrator| {
            migrator.iter().map(|m| m.version).collect::<Vec<_>>()
        };
        let files: Vec<i64> = sqlite.keys().copied().collect();
        assert_eq!(embedded(&crate::sqlite::MIGRATOR), files);
        assert_eq!(embedded(&crate::postgres::MIGRATOR), files);
    }
}
