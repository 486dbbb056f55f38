use crate::audit::impl_audit;
use crate::sql::{bind_credential_fn, impl_store, ImportConnection, Placeholders};
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

/// The embedded default: one SQLite file in WAL mode. SQLite has one writer at a time, so writes
/// queue on a pool of one connection, and reads (which WAL never blocks) have their own pool:
/// waiting writers cannot starve verification.
pub struct SqliteStore {
    /// Read-only connections: every read.
    pool: SqlitePool,
    /// The one read-write connection: every write.
    writer: SqlitePool,
    writes: crate::WriteTracker,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
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
        let migrator = sqlx::migrate!("./migrations/sqlite");
        if crate::sql::migrations_pending(&migrator, crate::sql::applied_migrations(&writer).await)
        {
            migrator.run(&writer).await?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            pool,
            writer,
            writes: crate::WriteTracker::default(),
        })
    }

    const PLACEHOLDERS: Placeholders = Placeholders::Anonymous;

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

    async fn close_pools(&self) {
        // Readers first: the last connection to close checkpoints the WAL and removes it, and only
        // a read-write one can.
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
    async fn notify_invalidation(
        _tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        _subject: uuid::Uuid,
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
impl_store!(SqliteStore, "sqlite");
impl_audit!(SqliteStore, sqlx::Sqlite);
impl_webhooks!(SqliteStore, sqlx::Sqlite);

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

    #[test]
    fn sqlite_imports_bind_anonymous_parameters() {
        let sql = crate::sql::multi_row_insert(2, SqliteStore::PLACEHOLDERS);
        assert_eq!(sql.matches('?').count(), 36);
        assert!(!sql.contains('$'));
        let sql = crate::sql::multi_row_insert(2, crate::sql::Placeholders::Numbered);
        assert!(sql.ends_with("$35, $36)"));
    }
}
