//! Running PostgreSQL migrations beside serving replicas without stalling them.
//!
//! A migration's `ALTER TABLE` or `CREATE INDEX` waits for the table's lock behind any open
//! transaction that touched it (a `pg_dump`, a long report), and while it waits, every later
//! query on that table queues behind it: the older replicas still serving the store stop writing,
//! and reading, until the long transaction ends. So each lock is waited for
//! [`MIGRATION_LOCK_TIMEOUT`] at most; the migration then rolls back (each is its own
//! transaction, recorded in `_sqlx_migrations` within it, so the ones before it stay applied and
//! it is simply run again) and the queue behind it drains; it is tried again after a pause, up to
//! [`MIGRATION_ATTEMPTS`] times, and the start then fails naming who holds the lock.
//!
//! sqlx's migration lock (an advisory lock) is taken first without that limit: a replica starting
//! while another migrates waits for it, however long its migrations take, and then finds nothing
//! to do. The session keeps it through the attempts (taking it again is immediate for its holder)
//! and gives it up by closing.

use crate::StoreError;
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::time::Duration;

/// How long a migration's statement waits for one lock before it is rolled back.
pub(crate) const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs of the migrations that may each time out on a lock before the start fails.
pub(crate) const MIGRATION_ATTEMPTS: u32 = 3;

/// The pause after the first run that timed out; doubled after each one after it.
const FIRST_PAUSE: Duration = Duration::from_secs(1);

/// PostgreSQL's `lock_not_available`: `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// Applies `migrator`'s pending migrations to the database `options` names, on a connection of
/// its own.
pub(crate) async fn run(
    migrator: &'static Migrator,
    options: PgConnectOptions,
) -> Result<(), StoreError> {
    let mut connection = PgConnection::connect_with(&options).await?;
    let migrated = run_on(migrator, &mut connection).await;
    // Ends the session, and with it the migration lock, which a failed run leaves taken.
    let _ = connection.close().await;
    migrated
}

async fn run_on(migrator: &Migrator, connection: &mut PgConnection) -> Result<(), StoreError> {
    connection.lock().await?;
    let timeout = format!(
        "SET lock_timeout = '{}ms'",
        MIGRATION_LOCK_TIMEOUT.as_millis()
    );
    sqlx::query(&timeout).execute(&mut *connection).await?;
    let (mut attempt, mut pause) = (1, FIRST_PAUSE);
    loop {
        let (error, version) = match migrator.run_direct(&mut *connection).await {
            Ok(()) => return Ok(()),
            Err(MigrateError::ExecuteMigration(sqlx::Error::Database(error), version))
                if error.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
            {
                (error, version)
            }
            Err(error) => return Err(error.into()),
        };
        let migration = named(migrator, version);
        let holders = lock_holders(connection).await;
        if attempt == MIGRATION_ATTEMPTS {
            return Err(StoreError::Other(anyhow::anyhow!(
                "applying migrations: {migration} waited {}s for a lock on a table it changes, \
                 {MIGRATION_ATTEMPTS} times ({error}); {holders}. End that transaction (or wait \
                 for it) and start again; the migrations before it stay applied",
                MIGRATION_LOCK_TIMEOUT.as_secs()
            )));
        }
        tracing::warn!(
            attempt,
            of = MIGRATION_ATTEMPTS,
            retry_in = ?pause,
            "{migration} waited {}s for a lock on a table it changes and was rolled back, so as \
             not to hold up the replicas serving the store; {holders}",
            MIGRATION_LOCK_TIMEOUT.as_secs()
        );
        tokio::time::sleep(pause).await;
        (attempt, pause) = (attempt + 1, pause * 2);
    }
}

/// `migration N (description)`.
fn named(migrator: &Migrator, version: i64) -> String {
    let description = migrator
        .iter()
        .find(|m| m.version == version)
        .map_or("", |m| &*m.description);
    format!("migration {version} ({description})")
}

/// A table, a lock mode, the holder's process id and application, its transaction's age in seconds.
type LockHolder = (String, String, i32, String, f64);

/// Who holds locks on this database's tables from the oldest open transactions: the likely
/// reason a migration could not have one. Names tables, modes, process ids and applications,
/// never a query's text (it may hold secrets).
async fn lock_holders(connection: &mut PgConnection) -> String {
    let holders: Result<Vec<LockHolder>, _> = sqlx::query_as(
        "SELECT c.relname::text, l.mode, a.pid, a.application_name, \
                EXTRACT(EPOCH FROM now() - a.xact_start)::float8 \
         FROM pg_locks l \
         JOIN pg_class c ON c.oid = l.relation \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.granted AND l.locktype = 'relation' \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL \
           AND c.relkind IN ('r', 'p') AND c.relnamespace <> 'pg_catalog'::regnamespace \
         ORDER BY a.xact_start, c.relname LIMIT 3",
    )
    .fetch_all(&mut *connection)
    .await;
    match holders {
        Ok(holders) if !holders.is_empty() => {
            let named: Vec<String> = holders
                .iter()
                .map(|(table, mode, pid, application, seconds)| {
                    let application = if application.is_empty() {
                        String::new()
                    } else {
                        format!(" ({application})")
                    };
                    format!(
                        "{mode} on table {table} held by process {pid}{application}, in a \
                         transaction open for {seconds:.0}s"
                    )
                })
                .collect();
            format!("locks held now: {}", named.join("; "))
        }
        Ok(_) => "no lock on a table is held now".to_string(),
        Err(error) => format!("who held the lock could not be read: {error}"),
    }
}
