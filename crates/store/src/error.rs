use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A uniqueness rule or state rule was violated (duplicate live name, rotating a revoked one).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A create would leave the tenant with more live credentials than the `max_live` it was
    /// given (`serve --max-live-credentials-per-org`). Nothing changed.
    #[error("the tenant holds {limit} live credentials, its limit")]
    LiveCredentialLimit { limit: u64 },
    /// The database cannot serve this request now, for a reason expected to pass (see
    /// [`StoreFault`]); the request may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(Unavailable),
    /// A write that was to keep an idempotent request's answer ([`crate::AnswerOf`]) found its
    /// claim gone: another attempt took the key after the claim's lock ran out. Nothing changed.
    #[error("the Idempotency-Key was taken over by another attempt; nothing changed")]
    IdempotencyClaimLost,
    /// A write that was to keep a secret for a console session to show
    /// ([`crate::KeptAnswer::ConsoleSecret`]) found the session ended. Nothing changed.
    #[error("the console session has ended; nothing changed")]
    ConsoleSessionEnded,
    #[error("store configuration: {0}")]
    Config(String),
    /// The store's schema is older than this keyplane's, and the open was not to migrate it
    /// ([`crate::PendingMigrations::Refuse`]).
    #[error("the store's schema is at {at}, older than this keyplane's {latest}")]
    SchemaBehind { at: i64, latest: i64 },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Why the store cannot serve a request now. Every one of these is transient from the client's
/// point of view: the same request may succeed once the operator or the database fixes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// The database cannot be reached or dropped the connection (restart, network).
    Unreachable,
    /// Another writer holds the lock, or every connection is taken (lock and pool timeouts).
    Busy,
    /// The database did not answer in time.
    TimedOut,
    /// No space left for the database to write.
    DiskFull,
    /// The database refuses writes (read-only file system, hot standby, read-only setting).
    ReadOnly,
    /// The operating system failed a read or write of the database files.
    IoError,
}

impl StoreFault {
    /// A short name for logs and `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreFault::Unreachable => "unreachable",
            StoreFault::Busy => "busy",
            StoreFault::TimedOut => "timed out",
            StoreFault::DiskFull => "disk full",
            StoreFault::ReadOnly => "read-only",
            StoreFault::IoError => "I/O error",
        }
    }

    /// What a client reads: what is wrong, without any internal detail.
    pub fn public_message(self) -> &'static str {
        match self {
            StoreFault::Unreachable => "the store is unreachable; retry later",
            StoreFault::Busy => "the store is busy; retry later",
            StoreFault::TimedOut => "the store did not answer in time; retry later",
            StoreFault::DiskFull => {
                "the store is out of disk space; writes resume once space is freed"
            }
            StoreFault::ReadOnly => {
                "the store is read-only; writes resume once it accepts them again"
            }
            StoreFault::IoError => "the store could not read or write its files; retry later",
        }
    }

    /// How long a client should wait before retrying: a lock or a restart passes in about a second;
    /// an operator freeing space takes longer.
    pub fn retry_after_secs(self) -> u64 {
        match self {
            StoreFault::Busy | StoreFault::TimedOut | StoreFault::Unreachable => 1,
            StoreFault::DiskFull | StoreFault::ReadOnly | StoreFault::IoError => 5,
        }
    }
}

impl std::fmt::Display for StoreFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A [`StoreFault`] and the database's own description of it (for the log, never the client).
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub fault: StoreFault,
    pub detail: String,
    /// The fault came while committing: the write may have been made (its acknowledgement was
    /// lost). Otherwise nothing was written.
    pub may_have_committed: bool,
}

impl Unavailable {
    pub fn new(fault: StoreFault, detail: impl Into<String>) -> Self {
        Self {
            fault,
            detail: detail.into(),
            may_have_committed: false,
        }
    }
}

impl StoreError {
    /// This error, as the answer to a commit: a fault then may have come after the write was made.
    pub(crate) fn from_commit(error: sqlx::Error) -> Self {
        match StoreError::from(error) {
            StoreError::Unavailable(unavailable) => StoreError::Unavailable(Unavailable {
                may_have_committed: true,
                ..unavailable
            }),
            error => error,
        }
    }

    /// Whether this write may have been made though it failed (see [`Unavailable`]).
    pub fn may_have_committed(&self) -> bool {
        matches!(self, StoreError::Unavailable(unavailable) if unavailable.may_have_committed)
    }
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.fault, self.detail)
    }
}

impl StoreError {
    /// The transient fault behind this error, if it is one.
    pub fn fault(&self) -> Option<StoreFault> {
        match self {
            StoreError::Unavailable(unavailable) => Some(unavailable.fault),
            _ => None,
        }
    }
}

/// The transient fault a database error stands for, if any. SQLite reports (extended) result
/// codes, PostgreSQL SQLSTATEs; both spell them as digits, so the backend is told by type.
fn classify(error: &sqlx::Error) -> Option<StoreFault> {
    match error {
        sqlx::Error::PoolTimedOut => Some(StoreFault::Busy),
        sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => Some(StoreFault::Unreachable),
        sqlx::Error::Database(db) => {
            let code = db.code()?;
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                classify_sqlite(code.parse().ok()?)
            } else if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                classify_sqlstate(&code)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// <https://www.sqlite.org/rescode.html>: the primary code is the low byte of the extended one.
fn classify_sqlite(extended_code: i32) -> Option<StoreFault> {
    match extended_code & 0xff {
        5 | 6 => Some(StoreFault::Busy),  // SQLITE_BUSY, SQLITE_LOCKED
        8 => Some(StoreFault::ReadOnly),  // SQLITE_READONLY
        10 => Some(StoreFault::IoError),  // SQLITE_IOERR
        13 => Some(StoreFault::DiskFull), // SQLITE_FULL
        14 => Some(StoreFault::IoError),  // SQLITE_CANTOPEN
        _ => None,
    }
}

/// <https://www.postgresql.org/docs/current/errcodes-appendix.html>
fn classify_sqlstate(code: &str) -> Option<StoreFault> {
    match code {
        "53100" => Some(StoreFault::DiskFull), // disk_full
        "25006" => Some(StoreFault::ReadOnly), // read_only_sql_transaction
        // serialization_failure, deadlock_detected, lock_not_available: retrying succeeds
        "40001" | "40P01" | "55P03" => Some(StoreFault::Busy),
        "57014" => Some(StoreFault::TimedOut), // query_canceled (statement_timeout)
        "58030" => Some(StoreFault::IoError),  // io_error
        // admin_shutdown, crash_shutdown, cannot_connect_now (a restart), connection exceptions,
        // insufficient resources (memory, too many connections)
        _ if code.starts_with("57P") || code.starts_with("08") || code.starts_with("53") => {
            Some(StoreFault::Unreachable)
        }
        _ => None,
    }
}

/// How long one direct connection attempt may take to tell why a pool has no connection to give:
/// short enough for `/readyz`'s second.
const CONNECT_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Why the database at `options` cannot be reached, if it cannot: one direct connection attempt,
/// bounded. A pool retries a refused connection until its acquire timeout and then says only that
/// it timed out (which reads as busy), where the database is down and the attempt's own error
/// (connection refused, unknown host, ...) says so. Only a failure to reach it counts: a database
/// that answers, if only to refuse (too many clients, starting up), or that is too slow to connect
/// to in time, is reachable, and the pooled query may still get its answer.
pub(crate) async fn unreachable_database<O>(options: &O) -> Option<StoreError>
where
    O: sqlx::ConnectOptions,
    O::Connection: Sized,
{
    let detail = match tokio::time::timeout(CONNECT_PROBE_TIMEOUT, options.connect()).await {
        Ok(Ok(connection)) => {
            let _ = sqlx::Connection::close(connection).await;
            return None;
        }
        Ok(Err(error @ sqlx::Error::Io(_))) => error.to_string(),
        Ok(Err(_)) | Err(_) => return None,
    };
    Some(StoreError::Unavailable(Unavailable::new(
        StoreFault::Unreachable,
        format!("cannot connect to the database: {detail}"),
    )))
}

/// Opening a pool: a timeout is what a direct attempt says when it cannot connect either.
pub(crate) async fn opening_failed<O>(error: sqlx::Error, options: &O) -> StoreError
where
    O: sqlx::ConnectOptions,
    O::Connection: Sized,
{
    if matches!(error, sqlx::Error::PoolTimedOut) {
        if let Some(unreachable) = unreachable_database(options).await {
            return unreachable;
        }
    }
    error.into()
}

/// A pool's timeout ([`POOL_TIMED_OUT`], `busy`) while the pool holds no connection at all, nor
/// opens one: it could open none, so the database is unreachable rather than busy.
pub(crate) fn without_connections(error: StoreError, open_connections: u32) -> StoreError {
    match error {
        StoreError::Unavailable(unavailable)
            if open_connections == 0 && unavailable.detail == POOL_TIMED_OUT =>
        {
            StoreError::Unavailable(Unavailable::new(
                StoreFault::Unreachable,
                "no connection to the database could be opened",
            ))
        }
        error => error,
    }
}

/// The detail of a pool's timeout: sqlx's own words.
const POOL_TIMED_OUT: &str = "pool timed out while waiting for an open connection";

/// The error migration 0020's triggers raise for a row of a deleted tenant.
const DELETED_TENANT: &str = "keyplane: the organization is deleted";

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if matches!(error, sqlx::Error::PoolTimedOut) {
            return StoreError::Unavailable(Unavailable::new(StoreFault::Busy, POOL_TIMED_OUT));
        }
        if let Some(fault) = classify(&error) {
            return StoreError::Unavailable(Unavailable::new(fault, error.to_string()));
        }
        match &error {
            // Migration 0020's triggers: a row for a deleted organization, which is as unknown.
            sqlx::Error::Database(db) if db.message().contains(DELETED_TENANT) => {
                StoreError::NotFound
            }
            sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation => {
                StoreError::Conflict("a live credential with this name already exists".into())
            }
            sqlx::Error::RowNotFound => StoreError::NotFound,
            _ => StoreError::Other(anyhow::Error::new(error)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        match error {
            sqlx::migrate::MigrateError::Execute(error) if classify(&error).is_some() => {
                error.into()
            }
            // The cause in the message: `Other` displays only its outermost context, and an
            // operator must see which migration failed and why.
            error => StoreError::Other(anyhow::anyhow!("applying migrations: {error}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_codes_are_classified_by_their_primary_code() {
        assert_eq!(classify_sqlite(5), Some(StoreFault::Busy));
        assert_eq!(classify_sqlite(517), Some(StoreFault::Busy)); // SQLITE_BUSY_SNAPSHOT
        assert_eq!(classify_sqlite(262), Some(StoreFault::Busy)); // SQLITE_LOCKED_SHAREDCACHE
        assert_eq!(classify_sqlite(13), Some(StoreFault::DiskFull));
        assert_eq!(classify_sqlite(8), Some(StoreFault::ReadOnly));
        assert_eq!(classify_sqlite(1032), Some(StoreFault::ReadOnly)); // SQLITE_READONLY_DBMOVED
        assert_eq!(classify_sqlite(778), Some(StoreFault::IoError)); // SQLITE_IOERR_WRITE
        assert_eq!(classify_sqlite(2067), None); // SQLITE_CONSTRAINT_UNIQUE
        assert_eq!(classify_sqlite(11), None); // SQLITE_CORRUPT: not transient
    }

    #[test]
    fn only_a_commit_that_lost_its_connection_may_have_committed() {
        let lost = || sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into());
        assert!(StoreError::from_commit(lost()).may_have_committed());
        assert!(!StoreError::from(lost()).may_have_committed());
        assert!(!StoreError::from_commit(sqlx::Error::RowNotFound).may_have_committed());
    }

    #[test]
    fn sqlstates_are_classified() {
        assert_eq!(classify_sqlstate("57P01"), Some(StoreFault::Unreachable));
        assert_eq!(classify_sqlstate("57P03"), Some(StoreFault::Unreachable));
        assert_eq!(classify_sqlstate("08006"), Some(StoreFault::Unreachable));
        assert_eq!(classify_sqlstate("53300"), Some(StoreFault::Unreachable));
        assert_eq!(classify_sqlstate("53100"), Some(StoreFault::DiskFull));
        assert_eq!(classify_sqlstate("25006"), Some(StoreFault::ReadOnly));
        assert_eq!(classify_sqlstate("40001"), Some(StoreFault::Busy));
        assert_eq!(classify_sqlstate("23505"), None); // unique_violation
        assert_eq!(classify_sqlstate("22P02"), None); // invalid_text_representation
    }
}
