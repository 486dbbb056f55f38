use crate::audit::impl_audit;
use crate::sql::{bind_credential_fn, impl_store};
use crate::StoreError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::str::FromStr;
use std::time::Duration;

/// The embedded default: one SQLite file in WAL mode.
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged write survives power loss, not only a process crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
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

    fn spawn_invalidation_listener(&self, _on_event: crate::InvalidationHandler) {}
}

bind_credential_fn!(sqlx::Sqlite);
impl_store!(SqliteStore, "sqlite");
impl_audit!(SqliteStore, sqlx::Sqlite);
