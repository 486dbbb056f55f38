//! The verification reads' own pool: credential lookups by hash and what a verification reads
//! with them (a service account's or a user's live grants, a robot's registry), and `/readyz`'s
//! ping. These are few, small and indexed, and a verification waits on them; the general readers
//! serve everything else (audit searches that walk a whole chain, exports, streams, management
//! lists), whose slow queries must not leave a cache miss or the readiness check without a
//! connection. So a verification read never waits behind them, and a load balancer does not pull
//! a replica that its cache could answer from.

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
