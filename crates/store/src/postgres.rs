use crate::audit::impl_audit;
use crate::sql::{bind_credential_fn, impl_store, ImportConnection, Placeholders};
use crate::webhooks::impl_webhooks;
use crate::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// How long a write waits for a lock or a connection before it answers `Busy`.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// The scale-out store: keyplane replicas share one PostgreSQL. Writes have their own, smaller
/// pool: writers waiting on locks hold at most its connections, never the ones reads need.
pub struct PostgresStore {
    /// Every read (and the invalidation listener's connection options).
    pool: PgPool,
    /// Every write.
    writer: PgPool,
    writes: crate::WriteTracker,
}

impl PostgresStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        let writer = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(WRITE_WAIT)
            // A write queued behind a lock answers `Busy` (503) in bounded time, as on SQLite.
            .connect_with(options.clone().options([("lock_timeout", "5s")]))
            .await?;
        let migrator = sqlx::migrate!("./migrations/postgres");
        // Only when something is pending: running them takes locks and writes, which a read-only or
        // full database refuses, and such a database must still serve verification.
        if crate::sql::migrations_pending(&migrator, crate::sql::applied_migrations(&writer).await)
        {
            migrator.run(&writer).await?;
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            writer,
            writes: crate::WriteTracker::default(),
        })
    }

    async fn close_pools(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// The channel replicas use to tell each other which subjects' cached verifications are stale.
const CHANNEL: &str = "keyplane_invalidation";

impl PostgresStore {
    const PLACEHOLDERS: Placeholders = Placeholders::Numbered;

    /// Any writer connection, as it is.
    async fn import_connection(&self) -> Result<ImportConnection<sqlx::Postgres>, StoreError> {
        Ok(ImportConnection {
            connection: self.writer.acquire().await?,
            restore: None,
        })
    }

    /// Sent inside the writing transaction: PostgreSQL delivers it at commit, never for a rollback.
    async fn notify_invalidation(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        subject: uuid::Uuid,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(subject.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Listens on [`CHANNEL`] for as long as the process runs, reconnecting after failures. Every
    /// (re)connection, and every loss of one, reports [`Invalidation::Reset`](crate::Invalidation::Reset):
    /// notifications sent meanwhile are lost, so everything cached must be re-checked.
    ///
    /// A connection can also stop delivering without closing (a frozen backend, a dropped network
    /// path). So the listener NOTIFYs its own heartbeat every [`HEARTBEAT_INTERVAL`] through the
    /// shared pool and, when none comes back within [`HEARTBEAT_DEADLINE`], reports a reset and
    /// reconnects: a revocation elsewhere is missed for at most about the deadline.
    fn spawn_invalidation_listener(&self, on_event: crate::InvalidationHandler) {
        let pool = self.pool.clone();
        let heartbeat = format!("{HEARTBEAT_PREFIX}{}", uuid::Uuid::new_v4());
        tokio::spawn(async move {
            loop {
                // A pool of its own per connection: a listener given up on a frozen connection
                // leaves behind a task waiting on it, which must not hold a shared connection.
                let own = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy_with((*pool.connect_options()).clone());
                match sqlx::postgres::PgListener::connect_with(&own).await {
                    Ok(mut listener) => {
                        if let Err(error) = listener.listen(CHANNEL).await {
                            tracing::warn!(%error, "cannot LISTEN for cache invalidations; retrying");
                        } else {
                            on_event(crate::Invalidation::Reset);
                            let why =
                                deliver_until_silent(&mut listener, &pool, &heartbeat, &on_event)
                                    .await;
                            tracing::warn!(
                                reason = why,
                                "invalidation listener stopped; resetting the cache and reconnecting"
                            );
                            on_event(crate::Invalidation::Reset);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot connect the invalidation listener; retrying")
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

/// How often each replica's listener NOTIFYs its own heartbeat on [`CHANNEL`].
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a listener may go without hearing its own heartbeat before it is taken for dead.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(3);
/// Heartbeat payloads: not a UUID, so other replicas (and older versions) ignore them.
const HEARTBEAT_PREFIX: &str = "heartbeat:";

/// Hands notifications to `on_event` until the connection fails or `heartbeat` goes unheard for
/// [`HEARTBEAT_DEADLINE`]; returns why it stopped.
async fn deliver_until_silent(
    listener: &mut sqlx::postgres::PgListener,
    pool: &PgPool,
    heartbeat: &str,
    on_event: &crate::InvalidationHandler,
) -> String {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            received = listener.try_recv() => match received {
                Ok(Some(notification)) if notification.payload() == heartbeat => {
                    heard = tokio::time::Instant::now();
                }
                Ok(Some(notification)) => {
                    if let Ok(subject) = uuid::Uuid::parse_str(notification.payload()) {
                        on_event(crate::Invalidation::Subject(subject));
                    }
                }
                Ok(None) => return "lost its connection".into(),
                Err(error) => return format!("failed: {error}"),
            },
            _ = tick.tick() => {
                if heard.elapsed() > HEARTBEAT_DEADLINE {
                    return format!("heard no heartbeat for {HEARTBEAT_DEADLINE:?}");
                }
                // Bounded, so a slow store cannot hold up the deadline check. A heartbeat that
                // cannot be sent is simply not heard, which is the point.
                let sent = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(heartbeat)
                    .execute(pool);
                if let Ok(Err(error)) = tokio::time::timeout(HEARTBEAT_INTERVAL, sent).await {
                    tracing::debug!(%error, "cannot send the invalidation listener's heartbeat");
                }
            }
        }
    }
}

bind_credential_fn!(sqlx::Postgres);
impl_store!(PostgresStore, "postgres");
impl_audit!(PostgresStore, sqlx::Postgres);
impl_webhooks!(PostgresStore, sqlx::Postgres);
