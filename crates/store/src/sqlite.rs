use crate::audit::impl_audit;
use crate::sql::{bind_credential_fn, impl_store, ImportConnection, Placeholders};
use crate::tenants::impl_tenant_purge;
use crate::verification;
use crate::webhooks::impl_webhooks;
use crate::StoreError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::str::FromStr;
use std::time::Duration;

/// How long a write waits for SQLite's write lock, and for the one writer connection, before it
/// answers `Busy` (503): long enough to ride out another writer's transaction, short enough for a
/// client to retry.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// The writer's page cache during a bulk import, in KiB. SQLite allocates it as pages are read,
/// so a small import costs no more than before; a 1M import peaks about 70 MiB higher.
const IMPORT_PAGE_CACHE_KIB: u32 = 256 * 1024;

/// Run once the store is open: SQLite keeps no statistics until it is told to analyze, and
/// without them its planner may pick a full scan where an index serves. Analyzes every table
/// (0x10000) that has none or grew or shrank much since (0x2), under a temporary analysis limit
/// (0x10: a few thousand rows per index, so it is quick on a large store). Later runs:
/// [`crate::Store::refresh_statistics`].
const OPTIMIZE_AT_OPEN: &str = "PRAGMA optimize=0x10012";

/// The embedded default: one SQLite file in WAL mode. SQLite has one writer at a time, so writes
/// queue on a pool of one connection, and reads (which WAL never blocks) have their own pool:
/// waiting writers cannot starve verification.
pub struct SqliteStore {
    /// Read-only connections: every read but verification's.
    pool: SqlitePool,
    /// Read-only connections for verification's reads and `/readyz`'s ping
    /// ([`crate::verification`]).
    verifier: SqlitePool,
    /// The one read-write connection: every write.
    writer: SqlitePool,
    writes: crate::WriteTracker,
}

impl SqliteStore {
    /// Opens the store, waiting (up to [`MIGRATION_WAIT`]) while another process holds it busy
    /// as it creates or migrates it: SQLite answers some of the steps of an open (the writer's
    /// first pragmas, a read racing the first commit of a new file) "database is locked" at once
    /// or after the writers' 5 s, under load, rather than wait for the migration lock as
    /// [`run_migrations`] does. Two processes opening one new store (`serve` and an `admin`
    /// command) must both start.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (store, _) = Self::connect_with(url, crate::PendingMigrations::Apply).await?;
        Ok(store)
    }

    /// [`SqliteStore::connect`], doing with pending migrations what `pending` says; with the
    /// schema version it migrated the store from, if it did.
    pub(crate) async fn connect_with(
        url: &str,
        pending: crate::PendingMigrations,
    ) -> Result<(Self, Option<i64>), StoreError> {
        let started = std::time::Instant::now();
        loop {
            match Self::open(url, pending).await {
                Err(StoreError::Unavailable(busy))
                    if busy.fault == crate::error::StoreFault::Busy
                        && started.elapsed() < MIGRATION_WAIT =>
                {
                    tracing::debug!(error = %busy, "the store is busy opening; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                opened => return opened,
            }
        }
    }

    async fn open(
        url: &str,
        pending: crate::PendingMigrations,
    ) -> Result<(Self, Option<i64>), StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid SQLite URL: {e}")))?
            .busy_timeout(WRITE_WAIT)
            .foreign_keys(true);
        create_private_file(options.get_filename())?;
        let writer_options = options
            .clone()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged write survives power loss, not only a process crash.
            .synchronous(SqliteSynchronous::Full);
        let migrating_options = writer_options.clone();
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            // Kept open for the process's life: it is the connection that checkpoints and removes
            // the WAL when the store closes.
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(WRITE_WAIT)
            .connect_with(writer_options)
            .await?;
        let migrated_from =
            crate::sql::migrate(&MIGRATOR, &writer, MIGRATIONS_TABLE_EXISTS, pending, || {
                run_migrations(&MIGRATOR, migrating_options)
            })
            .await?;
        // Best effort: a read-only or full store refuses it and must still serve verification.
        if let Err(error) = sqlx::query(OPTIMIZE_AT_OPEN).execute(&writer).await {
            tracing::warn!(%error, "cannot refresh the SQLite planner's statistics");
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone().read_only(true))
            .await?;
        let verifier = SqlitePoolOptions::new()
            .max_connections(verification::SQLITE_CONNECTIONS)
            .acquire_timeout(verification::ACQUIRE_WAIT)
            .connect_with(
                options
                    .read_only(true)
                    .busy_timeout(verification::SQLITE_BUSY_WAIT),
            )
            .await?;
        let store = Self {
            pool,
            verifier,
            writer,
            writes: crate::WriteTracker::default(),
        };
        Ok((store, migrated_from))
    }

    /// The general readers' pool, for [`crate::testing::hold_general_readers`].
    #[cfg(feature = "testing")]
    pub(crate) fn general_readers(&self) -> &SqlitePool {
        &self.pool
    }

    const PLACEHOLDERS: Placeholders = Placeholders::Anonymous;

    /// Begins a transaction that reads before it writes: takes the write lock at once.
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";

    /// The writer, with a page cache of [`IMPORT_PAGE_CACHE_KIB`] for the import's duration: with
    /// SQLite's default 2 MiB, the unique indexes of a million-row table no longer fit and each
    /// insert reads their pages back from the file.
    async fn import_connection(&self) -> Result<ImportConnection<sqlx::Sqlite>, StoreError> {
        let mut connection = self.writer.acquire().await?;
        let (previous,): (i64,) = sqlx::query_as("PRAGMA cache_size")
            .fetch_one(&mut *connection)
            .await?;
        sqlx::query(&format!("PRAGMA cache_size = -{IMPORT_PAGE_CACHE_KIB}"))
            .execute(&mut *connection)
            .await?;
        Ok(ImportConnection {
            connection,
            restore: Some(format!("PRAGMA cache_size = {previous}")),
        })
    }

    /// Sets aside the row triggers on `credentials` for an import, and does their work once per
    /// transaction instead of once per row: migration 0020's check of the tenants (here) and
    /// 0021's live counts (after the insert). With any row trigger SQLite first copies a
    /// multi-row INSERT's rows to a temporary table, then runs the trigger's program for each,
    /// whatever its condition: 0020's made a 1M import 17% slower (BENCHMARKS.md). The import
    /// holds the write lock from its `BEGIN IMMEDIATE`, so no deletion or other insert comes
    /// between this check and its commit; it drops both triggers in its own transaction
    /// (SQLite's DDL is transactional: no other connection ever sees the table without them, and
    /// a failed or interrupted import rolls the drop back with its rows) and runs their own
    /// statements again before it commits ([`crate::sql::SetAsideTriggers`]).
    async fn set_aside_import_triggers(
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        credentials: &[keyplane_core::Credential],
    ) -> Result<crate::sql::SetAsideTriggers, StoreError> {
        let tenants: std::collections::BTreeSet<_> =
            credentials.iter().map(|c| c.tenant_id).collect();
        let mut set_aside = crate::sql::SetAsideTriggers::default();
        if tenants.is_empty() {
            return Ok(set_aside);
        }
        for tenant in &tenants {
            let deleted: Option<i64> = sqlx::query_scalar(DELETED_TENANT)
                .bind(tenant.as_uuid())
                .fetch_optional(&mut **tx)
                .await?;
            if deleted.is_some() {
                return Err(StoreError::NotFound);
            }
        }
        for name in [CREDENTIALS_TENANT_TRIGGER, CREDENTIALS_COUNT_TRIGGER] {
            let trigger: Option<String> = sqlx::query_scalar(TRIGGER_SQL)
                .bind(name)
                .fetch_optional(&mut **tx)
                .await?;
            let Some(trigger) = trigger else { continue };
            sqlx::query(&format!("DROP TRIGGER {name}"))
                .persistent(false)
                .execute(&mut **tx)
                .await?;
            set_aside.triggers.push(trigger);
            if name == CREDENTIALS_COUNT_TRIGGER {
                let mut live = std::collections::BTreeMap::new();
                for credential in credentials.iter().filter(|c| c.revoked_at.is_none()) {
                    *live.entry(credential.tenant_id).or_insert(0i64) += 1;
                }
                set_aside.live_counts = live.into_iter().collect();
            }
        }
        Ok(set_aside)
    }

    /// `PRAGMA optimize` without flags: analyzes (with a limit) the tables this connection's
    /// statements used whose size changed much since they were last analyzed; usually a no-op.
    async fn refresh_planner_statistics(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA optimize").execute(&self.writer).await?;
        Ok(())
    }

    /// One process on one machine: no other clock judges time on this store.
    async fn read_database_clock(&self) -> Result<Option<crate::DatabaseClock>, StoreError> {
        Ok(None)
    }

    async fn close_pools(&self) {
        // Readers first: the last connection to close checkpoints the WAL and removes it, and only
        // a read-write one can.
        self.verifier.close().await;
        self.pool.close().await;
        // A reader may still be closing on its worker thread when `close` returns, and then the
        // writer is not the last connection and leaves the WAL behind: truncate it explicitly.
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.writer)
            .await
        {
            tracing::warn!(%error, "could not checkpoint the WAL at close");
        }
        self.writer.close().await;
    }
}

/// Migration 0020's trigger on `credentials`, which an import sets aside
/// ([`SqliteStore::set_aside_import_triggers`]).
const CREDENTIALS_TENANT_TRIGGER: &str = "credentials_of_live_tenants";
/// Migration 0021's count of a tenant's live credentials on insert, which an import sets aside.
const CREDENTIALS_COUNT_TRIGGER: &str = "credentials_counted_on_insert";
/// A trigger's `CREATE TRIGGER` statement, as it was run.
const TRIGGER_SQL: &str = "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = $1";
/// Found when the tenant is deleted: 0020's trigger's condition.
const DELETED_TENANT: &str = "SELECT 1 FROM tenants WHERE id = $1 AND deleted_at IS NOT NULL";

#[cfg(feature = "testing")]
impl crate::testing::VerificationReaders for SqliteStore {
    type Database = sqlx::Sqlite;

    fn verification_readers(&self) -> &SqlitePool {
        &self.verifier
    }
}

/// This keyplane's SQLite migrations.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Counts `_sqlx_migrations`: 0 in a new database.
const MIGRATIONS_TABLE_EXISTS: &str =
    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'";

/// Runs the pending migrations under SQLite's write lock, taken first: sqlx's migration lock does
/// nothing on SQLite, so two processes opening one new store at once both applied its first
/// migration and one failed ("table already exists"). The second now waits for the lock, then finds
/// them applied. On a connection of its own, without the writers' 5 s busy timeout: a migration of
/// a large store may take longer than that.
async fn run_migrations(
    migrator: &sqlx::migrate::Migrator,
    options: SqliteConnectOptions,
) -> Result<(), StoreError> {
    use sqlx::{ConnectOptions, Connection};
    let mut connection = options.busy_timeout(MIGRATION_WAIT).connect().await?;
    let mut locked = connection.begin_with(SqliteStore::BEGIN_WRITE).await?;
    // `run` takes this connection too, but its future is then not `Send` (sqlx's `Acquire`).
    migrator.run_direct(&mut *locked).await?;
    locked.commit().await?;
    connection.close().await?;
    Ok(())
}

/// How long a process starting waits for another one's migrations.
const MIGRATION_WAIT: Duration = Duration::from_secs(600);

/// Creates the database file readable by its owner only, whatever the umask: it holds every
/// credential hash and the registry signing key. SQLite gives its `-wal` and `-shm` files the
/// database file's mode.
fn create_private_file(path: &std::path::Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if path.as_os_str() == ":memory:" || path.exists() {
            return Ok(());
        }
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(_) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| {
                    StoreError::Config(format!("cannot restrict {}: {e}", path.display()))
                }),
            // Another process created it first: its mode is checked by whoever opens the data dir.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::Config(format!(
                "cannot create {}: {e}",
                path.display()
            ))),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

impl SqliteStore {
    /// One process owns a SQLite store, and it evicts its own cache; nothing to tell others.
    async fn notify_invalidations(
        &self,
        _tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        _tenant: keyplane_core::TenantId,
        _subjects: &[uuid::Uuid],
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// A write transaction begun with [`Self::BEGIN_WRITE`] holds the store's write lock: other
    /// creations wait for it, whatever the name.
    async fn lock_tenant_name(
        _tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        _name: &str,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// SQLite locks the whole store for a write: no row locks (see [`crate::webhooks`]'s
    /// `in_lock_order`).
    pub(crate) const ROW_LOCK: &'static str = "";

    /// SQLite has no row locks: a read of the row (see `PostgresStore::TENANT_ROW_SHARE`).
    pub(crate) const TENANT_ROW_SHARE: &'static str = "SELECT COUNT(*) FROM tenants WHERE id = $1";

    /// SQLite has no row locks: whether the tenant is deleted (see
    /// `PostgresStore::TENANT_DELETED_SHARE`).
    pub(crate) const TENANT_DELETED_SHARE: &'static str =
        "SELECT deleted_at IS NOT NULL FROM tenants WHERE id = $1";

    /// SQLite locks the whole store for a write: no row order to keep.
    async fn lock_webhook_deliveries(
        _tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        _tenant: keyplane_core::TenantId,
        _webhook_id: uuid::Uuid,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// SQLite locks the whole store for a write: no row order to keep.
    async fn lock_credentials(
        _tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        _ids: &[uuid::Uuid],
    ) -> Result<(), StoreError> {
        Ok(())
    }

    fn spawn_invalidation_listener(
        &self,
        _on_event: crate::InvalidationHandler,
        _stop: crate::StopSignal,
    ) {
    }
}

bind_credential_fn!(sqlx::Sqlite);
impl_store!(SqliteStore, sqlx::Sqlite, "sqlite");
impl_audit!(SqliteStore, sqlx::Sqlite);
impl_webhooks!(SqliteStore, sqlx::Sqlite);
impl_tenant_purge!(SqliteStore, sqlx::Sqlite);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    async fn writer_cache_size(store: &SqliteStore) -> i64 {
        sqlx::query_scalar("PRAGMA cache_size")
            .fetch_one(&store.writer)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_import_leaves_the_writer_as_it_found_it() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("keyplane.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        let before = writer_cache_size(&store).await;
        assert_ne!(before, -i64::from(IMPORT_PAGE_CACHE_KIB));
        store.import_credentials(&[], &[]).await.unwrap();
        assert_eq!(writer_cache_size(&store).await, before);
    }

    /// The claim runs under SQLite's one write lock, and finished deliveries pile up (30 days'
    /// worth): it must reach the pending ones through their partial index, never by walking the
    /// table, even on a store that was never analyzed.
    #[tokio::test]
    async fn a_claim_reads_pending_deliveries_by_their_index_without_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("keyplane.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        sqlx::query("DROP TABLE IF EXISTS sqlite_stat1")
            .execute(&store.writer)
            .await
            .unwrap();
        let sql = format!(
            "EXPLAIN QUERY PLAN {}",
            crate::webhooks::claim_deliveries_sql(SqliteStore::ROW_LOCK)
        );
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&sql)
            .bind(2_i64)
            .bind(uuid::Uuid::nil())
            .bind(1_i64)
            .bind(10_i64)
            .bind(2_i64)
            .bind(16_i64)
            .fetch_all(&store.writer)
            .await
            .unwrap();
        let plan: Vec<&str> = plan
            .iter()
            .map(|(_, _, _, detail)| detail.as_str())
            .collect();
        assert!(
            plan.iter()
                .any(|d| d.contains("USING INDEX webhook_deliveries_pending")),
            "{plan:#?}"
        );
        for detail in &plan {
            // The primary key only to find the chosen rows by their key; no full scans.
            let by_key = detail.starts_with("SEARCH") && detail.contains("event_id=?");
            assert!(
                by_key || !detail.contains("sqlite_autoindex_webhook_deliveries"),
                "{plan:#?}"
            );
            assert_ne!(*detail, "SCAN webhook_deliveries", "{plan:#?}");
        }
    }

    #[test]
    fn sqlite_imports_bind_anonymous_parameters() {
        let sql = crate::sql::multi_row_insert(2, SqliteStore::PLACEHOLDERS);
        assert_eq!(sql.matches('?').count(), 46);
        assert!(!sql.contains('$'));
        let sql = crate::sql::multi_row_insert(2, crate::sql::Placeholders::Numbered);
        assert!(sql.ends_with("$45, $46)"));
    }
}
