//! The verification reads' own pool: credential lookups by hash and what a verification reads
//! with them (a service account's or a user's live grants, a robot's registry), and `/readyz`'s
//! ping. These are few, small and indexed, and a verification waits on them; the general readers
//! serve everything else (audit searches that walk a whole chain, exports, streams, management
//! lists), whose slow queries must not leave a cache miss or the readiness check without a
//! connection. So a verification read never waits behind them, and a load balancer does not pull
//! a replica that its cache could answer from.

use crate::{StoreError, StoreFault, Unavailable};
use std::time::Duration;

/// Connections verification may hold on PostgreSQL: a lookup takes about a millisecond, so a few
/// serve thousands of cache misses a second, and a stuck few cannot take many of the server's
/// connections.
pub(crate) const POSTGRES_CONNECTIONS: u32 = 4;

/// Read-only connections verification may hold on SQLite (one process; WAL readers never wait on
/// the writer).
pub(crate) const SQLITE_CONNECTIONS: u32 = 2;

/// How long a verification waits for one of the pool's connections before it answers `busy`: a
/// miss then answers 503 (or a cached entry stale) at once rather than queueing.
pub(crate) const ACQUIRE_WAIT: Duration = Duration::from_secs(1);

/// PostgreSQL's own bound on one verification statement (`statement_timeout`), and on its wait for
/// a lock (`lock_timeout`, a lock on `credentials` during a migration or an operator's session):
/// both cancel the statement and keep the connection. The lock wait is past `/readyz`'s one
/// second, so that its ping waiting on a lock reads as the store not answering in time, as before.
pub(crate) const POSTGRES_SETTINGS: [(&str, &str); 2] =
    [("statement_timeout", "2s"), ("lock_timeout", "1500ms")];

/// How long a SQLite verification read waits for a lock (WAL readers meet one only while the
/// database recovers its WAL, or under an exclusive locking mode).
pub(crate) const SQLITE_BUSY_WAIT: Duration = Duration::from_millis(1500);

/// PostgreSQL's bound on the general readers' statements: an audit search or export that walks a
/// large chain still finishes, but a query stuck behind a lock gives its connection back.
pub(crate) const GENERAL_READ_SETTINGS: [(&str, &str); 1] = [("statement_timeout", "30s")];

/// How long one verification read may take, its wait for a connection included, before it gives
/// up as `timed out`. Past [`ACQUIRE_WAIT`] and PostgreSQL's `statement_timeout`, whose
/// cancellations keep the connection and so come first: this one is for a connection that answers
/// nothing at all (a primary gone silently, a dropped network path), which would otherwise hold
/// the request until TCP gave up.
pub(crate) const READ_DEADLINE: Duration = Duration::from_secs(3);

/// One verification read on a connection of verification's pool, under [`READ_DEADLINE`]:
/// [`BoundedRead::acquire`], then [`BoundedRead::within`] and [`BoundedRead::finish`]. Dropped
/// without finishing (the deadline passed, or the request was given up in the middle of the read),
/// its connection is closed rather than returned to the pool: sqlx pings a connection it gets
/// back, and one that stopped answering would keep its place, waiting, and take the pool's
/// connections one read at a time.
pub(crate) struct BoundedRead<DB: sqlx::Database> {
    connection: Option<sqlx::pool::PoolConnection<DB>>,
    deadline: tokio::time::Instant,
}

impl<DB: sqlx::Database> BoundedRead<DB> {
    pub(crate) async fn acquire(pool: &sqlx::Pool<DB>) -> Result<Self, StoreError> {
        let deadline = tokio::time::Instant::now() + READ_DEADLINE;
        // The pool's own acquire timeout is the shorter.
        let connection = pool.acquire().await?;
        Ok(Self {
            connection: Some(connection),
            deadline,
        })
    }

    /// Runs `read` on the connection until the deadline; `Err` if it passed first.
    pub(crate) async fn within<'c, T, Read>(
        &'c mut self,
        read: impl FnOnce(&'c mut DB::Connection) -> Read,
    ) -> Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>
    where
        Read: std::future::Future<Output = Result<T, sqlx::Error>> + 'c,
    {
        let deadline = self.deadline;
        let connection = self
            .connection
            .as_deref_mut()
            .expect("a read runs once, before it finishes");
        tokio::time::timeout_at(deadline, read(connection)).await
    }

    /// What [`Self::within`] read; the connection goes back to the pool if the database answered
    /// (an error too: PostgreSQL's own timeouts end the statement and keep the connection), and
    /// is closed if not.
    pub(crate) fn finish<T>(
        mut self,
        read: Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match read {
            Ok(answered) => {
                drop(self.connection.take());
                Ok(answered?)
            }
            Err(_) => Err(StoreError::Unavailable(Unavailable::new(
                StoreFault::TimedOut,
                format!("a verification read had no answer within {READ_DEADLINE:?}"),
            ))),
        }
    }
}

impl<DB: sqlx::Database> Drop for BoundedRead<DB> {
    fn drop(&mut self) {
        if let Some(unanswered) = self.connection.take() {
            tracing::debug!("closing a connection whose verification read did not finish");
            // Out of the pool, which opens another in its place; dropped, its socket closes.
            drop(unanswered.detach());
        }
    }
}
