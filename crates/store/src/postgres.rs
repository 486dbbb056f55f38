use crate::audit::impl_audit;
use crate::sql::{bind_credential_fn, impl_store, ImportConnection, Placeholders};
use crate::tenants::impl_tenant_purge;
use crate::verification;
use crate::webhooks::impl_webhooks;
use crate::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// How long a write waits for a lock or a connection before it answers `Busy`.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// The scale-out store: keyplane replicas share one PostgreSQL. Writes have their own, smaller
/// pool: writers waiting on locks hold at most its connections, never the ones reads need.
pub struct PostgresStore {
    /// Every read but verification's (and the invalidation listener's connection options).
    pool: PgPool,
    /// Verification's reads and `/readyz`'s ping ([`crate::verification`]).
    verifier: PgPool,
    /// Every write.
    writer: PgPool,
    writes: crate::WriteTracker,
    /// This store's notifications, until its listener hears them back.
    sent: std::sync::Arc<SentNotifications>,
}

/// This keyplane's PostgreSQL migrations.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Counts `_sqlx_migrations` where sqlx's unqualified name finds it (the search path): 0 in a new
/// database.
const MIGRATIONS_TABLE_EXISTS: &str =
    "SELECT COUNT(*) FROM (SELECT to_regclass('_sqlx_migrations') AS t) AS r WHERE t IS NOT NULL";

impl PostgresStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opened = Self::connect_with(url, crate::PendingMigrations::Apply).await;
        opened.map(|(store, _)| store)
    }

    /// Opens the store, doing with pending migrations what `pending` says; with the schema
    /// version it migrated the store from, if it did.
    pub(crate) async fn connect_with(
        url: &str,
        pending: crate::PendingMigrations,
    ) -> Result<(Self, Option<i64>), StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        let writer = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(WRITE_WAIT)
            // A write queued behind a lock answers `Busy` (503) in bounded time, as on SQLite.
            .connect_with(options.clone().options([("lock_timeout", "5s")]))
            .await;
        let writer = match writer {
            Ok(writer) => writer,
            Err(error) => return Err(crate::error::opening_failed(error, &options).await),
        };
        // Before migrating: an older server would fail part-way through the migrations, or start
        // and then fail the first query using newer syntax. On a connection of its own, closed
        // after: the writers' pool is left as it was opened.
        let (version_num, version): (i32, String) = {
            use sqlx::Connection;
            let mut asking = sqlx::PgConnection::connect_with(&options).await?;
            let asked = sqlx::query_as(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            )
            .fetch_one(&mut asking)
            .await;
            let _ = asking.close().await;
            asked?
        };
        supported_server(version_num, &version)?;
        // Only when something is pending: running them takes locks and writes, which a read-only or
        // full database refuses, and such a database must still serve verification.
        let migrated_from = crate::sql::migrate(
            &MIGRATOR,
            &writer,
            MIGRATIONS_TABLE_EXISTS,
            pending,
            // On a connection of its own: a replica starting while another runs the migrations
            // waits for sqlx's migration lock however long they take, and a migration waits for
            // a table's lock a few seconds at a time (`pg_migrate`).
            || crate::pg_migrate::run(&MIGRATOR, options.clone()),
        )
        .await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone().options(verification::GENERAL_READ_SETTINGS))
            .await?;
        let verifier = PgPoolOptions::new()
            .max_connections(verification::POSTGRES_CONNECTIONS)
            .acquire_timeout(verification::ACQUIRE_WAIT)
            .connect_with(options.options(verification::POSTGRES_SETTINGS))
            .await?;
        let store = Self {
            pool,
            verifier,
            writer,
            writes: crate::WriteTracker::default(),
            sent: std::sync::Arc::default(),
        };
        Ok((store, migrated_from))
    }

    /// PostgreSQL's autovacuum analyzes tables as they change: nothing to do.
    async fn refresh_planner_statistics(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// `clock_timestamp()` (the time as the query runs; `now()` is its transaction's start) a few
    /// times on one connection, keeping the reading with the shortest round trip: the first may
    /// include preparing the statement, and a reading is known only to within half its round trip.
    async fn read_database_clock(&self) -> Result<Option<crate::DatabaseClock>, StoreError> {
        const READINGS: usize = 3;
        let mut connection = self.pool.acquire().await?;
        let mut best: Option<crate::DatabaseClock> = None;
        for _ in 0..READINGS {
            let sent = Instant::now();
            let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
                .fetch_one(&mut *connection)
                .await?;
            let reading = crate::DatabaseClock {
                at,
                sent,
                received: Instant::now(),
            };
            if best.is_none_or(|b| reading.round_trip() < b.round_trip()) {
                best = Some(reading);
            }
        }
        Ok(best)
    }

    async fn close_pools(&self) {
        self.verifier.close().await;
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// The oldest PostgreSQL keyplane runs on (`server_version_num`): 12 for `WITH … AS MATERIALIZED`,
/// which the webhook deliveries' claim uses. The tests run on the machine's PostgreSQL (15).
pub const MINIMUM_SERVER_VERSION_NUM: i32 = 120_000;

/// Refuses a server older than [`MINIMUM_SERVER_VERSION_NUM`], naming the version it found.
fn supported_server(version_num: i32, version: &str) -> Result<(), StoreError> {
    if version_num >= MINIMUM_SERVER_VERSION_NUM {
        return Ok(());
    }
    Err(StoreError::Config(format!(
        "PostgreSQL {version} is too old: keyplane needs PostgreSQL {} or later",
        MINIMUM_SERVER_VERSION_NUM / 10_000
    )))
}

/// The first key of the advisory locks on organization names ([`PostgresStore::lock_tenant_name`]):
/// "kpnm".
const TENANT_NAME_LOCKS: i32 = 0x6b70_6e6d;

/// The channel replicas use to tell each other which subjects' cached verifications are stale.
const CHANNEL: &str = "keyplane_invalidation";

#[cfg(feature = "testing")]
impl crate::testing::VerificationReaders for PostgresStore {
    type Database = sqlx::Postgres;

    fn verification_readers(&self) -> &PgPool {
        &self.verifier
    }
}

impl PostgresStore {
    const PLACEHOLDERS: Placeholders = Placeholders::Numbered;

    /// Begins a transaction that reads before it writes: as `begin` does.
    const BEGIN_WRITE: &'static str = "BEGIN";

    /// Any writer connection, as it is.
    async fn import_connection(&self) -> Result<ImportConnection<sqlx::Postgres>, StoreError> {
        Ok(ImportConnection {
            connection: self.writer.acquire().await?,
            restore: None,
        })
    }

    /// Nothing to set aside: migration 0023's trigger checks the tenants of each statement's
    /// rows, the import's 500 at once, and 0021's counts per statement too.
    async fn set_aside_import_triggers(
        _tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        _credentials: &[keyplane_core::Credential],
    ) -> Result<crate::sql::SetAsideTriggers, StoreError> {
        Ok(crate::sql::SetAsideTriggers::default())
    }

    /// How a statement that writes several webhook deliveries locks them first, in (webhook,
    /// event) order (see [`crate::webhooks`]'s `in_lock_order`). `NO KEY`: the lock an UPDATE
    /// takes anyway (a DELETE then takes the stronger one of rows it already holds).
    pub(crate) const ROW_LOCK: &'static str = " FOR NO KEY UPDATE OF locked";

    /// How a write that takes its tenant's audit head before inserting a row migration 0020's
    /// trigger checks (webhook creation) first reads the tenant's row: `FOR SHARE`, as the trigger
    /// does, so that it holds the row before the head like every insert does (the row, then the
    /// head as its event is appended), and never waits for the row while holding the head that
    /// `admin delete-org`'s final transaction, holding the row, waits for.
    pub(crate) const TENANT_ROW_SHARE: &'static str =
        "SELECT COUNT(*) FROM (SELECT 1 FROM tenants WHERE id = $1 FOR SHARE) locked";

    /// Whether the tenant is deleted, its row read `FOR SHARE` (see [`Self::TENANT_ROW_SHARE`]):
    /// a deletion under way is waited for, and its outcome read.
    pub(crate) const TENANT_DELETED_SHARE: &'static str =
        "SELECT deleted_at IS NOT NULL FROM tenants WHERE id = $1 FOR SHARE";

    /// Makes the transactions creating a tenant named `name` take turns until they end: a
    /// transaction-scoped advisory lock on (a class of keyplane's own, the name's hash), so no two
    /// both find the name free and insert it. Two names of one hash only wait for each other.
    /// The two-key form: its keys never meet sqlx's migration lock, which takes the one-key form.
    async fn lock_tenant_name(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        name: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(TENANT_NAME_LOCKS)
            .bind(name)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Locks a webhook's deliveries in the order every write of several of them takes them (see
    /// [`Self::ROW_LOCK`]), so that deleting it (a cascade, whose plan picks its own order) does
    /// not hold some while it waits for a claim's, the prune's or a lease renewal's.
    async fn lock_webhook_deliveries(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        tenant: keyplane_core::TenantId,
        webhook_id: uuid::Uuid,
    ) -> Result<(), StoreError> {
        // Counted, not sent back: a webhook may have 30 days' deliveries.
        sqlx::query(
            "SELECT COUNT(*) FROM (SELECT 1 FROM webhook_deliveries WHERE webhook_id = $1 \
             AND tenant_id = $2 ORDER BY webhook_id, event_id FOR UPDATE) locked",
        )
        .bind(webhook_id)
        .bind(tenant.as_uuid())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Locks the credentials `ids` in id order, before a write of several: a last-use flush's
    /// `UPDATE ... FROM` locks rows in whatever order its plan visits them, and two transactions
    /// taking the same rows in different orders deadlock (another replica's flush, a sweep, a
    /// batch of revocations). `NO KEY`: the lock the UPDATE takes anyway.
    async fn lock_credentials(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        ids: &[uuid::Uuid],
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT id FROM credentials WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
            .bind(ids)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Sent inside the writing transaction: PostgreSQL delivers them at commit, never for a
    /// rollback. Noted with the sending backend's process id, by which the listener knows them for
    /// this store's own when they come back.
    ///
    /// Two notifications per subject, in this order: [`tenant_notice`] (`t:<tenant>:<subject>`),
    /// then the subject alone, as every release has sent it. A listener of this release hears the
    /// pair as [`Invalidation::InTenant`](crate::Invalidation::InTenant), so that only that
    /// tenant's revocation streams look; one of a release before ignores the first (not a UUID)
    /// and invalidates by the second, so replicas of both releases can share a database. (One
    /// notice carrying both would go unheard by those listeners during a rolling upgrade.) A
    /// transaction's notifications are delivered in the order sent, so each pair stays together.
    ///
    /// One round trip, however many subjects: each notification a statement of one simple query,
    /// which PostgreSQL runs in order (one `SELECT pg_notify(..), pg_notify(..)` would not promise
    /// which is sent first). A simple query takes no parameters: only the channel's constant name
    /// and UUIDs are spelled into it, nothing that needs quoting.
    async fn notify_invalidations(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        tenant: keyplane_core::TenantId,
        subjects: &[uuid::Uuid],
    ) -> Result<(), StoreError> {
        use sqlx::Row;
        use std::fmt::Write;
        let mut statements = String::with_capacity(subjects.len() * 170 + 32);
        for subject in subjects {
            write!(
                statements,
                "SELECT pg_notify('{CHANNEL}', '{notice}'); \
                 SELECT pg_notify('{CHANNEL}', '{subject}'); ",
                notice = tenant_notice(tenant, *subject),
            )
            .expect("writing to a String cannot fail");
        }
        statements.push_str("SELECT pg_backend_pid()");
        // A query without arguments goes as a simple query.
        let rows = sqlx::Executor::fetch_all(&mut **tx, statements.as_str()).await?;
        // The last statement's row (the others' are their `void`).
        let sender: i32 = rows
            .last()
            .ok_or_else(|| StoreError::Other(anyhow::anyhow!("pg_backend_pid() answered no row")))?
            .try_get(0)?;
        // Before the commit, which may deliver them to the listener before this task runs again.
        for subject in subjects {
            self.sent.note(sender, *subject);
        }
        Ok(())
    }

    /// Listens on [`CHANNEL`] until `stop`, reconnecting after failures. Every (re)connection, and
    /// every loss of one, reports [`Invalidation::Reset`](crate::Invalidation::Reset): notifications
    /// sent meanwhile are lost, so everything cached must be re-checked. While no connection is
    /// listening (connect attempts failing or hanging, e.g. PostgreSQL at its connection limit
    /// while the pooled readers still work) a reset is reported every [`UNHEARD_RESET_INTERVAL`]:
    /// an entry loaded during the gap could miss a revocation too, so none counts as fresh for
    /// longer than that. Connecting and issuing the LISTEN are bounded by [`CONNECT_DEADLINE`].
    ///
    /// A connection can also stop delivering without closing (a frozen backend, a dropped network
    /// path). So the listener NOTIFYs its own heartbeat every [`HEARTBEAT_INTERVAL`] through the
    /// shared pool and, when one it sent is not heard back within [`HEARTBEAT_DEADLINE`], reports a
    /// reset and reconnects: a revocation elsewhere is missed for at most about the deadline plus
    /// an interval. A heartbeat that could not be sent (the pool saturated) proves nothing and is
    /// not waited for.
    fn spawn_invalidation_listener(
        &self,
        on_event: crate::InvalidationHandler,
        mut stop: crate::StopSignal,
    ) {
        let pool = self.pool.clone();
        let sent = self.sent.clone();
        let heartbeat = format!("{HEARTBEAT_PREFIX}{}:", uuid::Uuid::new_v4());
        tokio::spawn(async move {
            let listening = async {
                let mut first = true;
                loop {
                    let attempt = async {
                        if !std::mem::take(&mut first) {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        tokio::time::timeout(CONNECT_DEADLINE, connect_listener(&pool)).await
                    };
                    match resetting_until(attempt, &on_event).await {
                        Ok(Ok(mut listener)) => {
                            on_event(crate::Invalidation::Listening(true));
                            on_event(crate::Invalidation::Reset);
                            let why = deliver_until_silent(
                                &mut listener,
                                &pool,
                                &heartbeat,
                                &sent,
                                &on_event,
                            )
                            .await;
                            tracing::warn!(
                                reason = why,
                                "invalidation listener stopped; resetting the cache and reconnecting"
                            );
                            on_event(crate::Invalidation::Listening(false));
                            on_event(crate::Invalidation::Reset);
                        }
                        Ok(Err(error)) => tracing::warn!(
                            %error,
                            "cannot connect the invalidation listener; retrying"
                        ),
                        Err(_) => tracing::warn!(
                            "connecting the invalidation listener took over {CONNECT_DEADLINE:?}; retrying"
                        ),
                    }
                }
            };
            tokio::select! {
                () = listening => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
        });
    }
}

/// The notifications this store sent and its listener has not heard back yet, oldest first: by
/// the sending backend's process id and the subject, and when. No other client's connection has
/// that process id while this store's does, so another replica's notification of the same subject
/// is never taken for this store's own, however close together the two come. (Through a
/// transaction-pooling proxy, replicas share backends: a notification of a transaction that
/// rolled back after sending, never delivered, can then be matched by another replica's of the
/// same subject sent from the same backend within [`ECHO_WINDOW`].)
#[derive(Default)]
struct SentNotifications(std::sync::Mutex<std::collections::VecDeque<(i32, uuid::Uuid, Instant)>>);

/// How long a sent notification is waited for; past it (its transaction rolled back, or the
/// listener was reconnecting), it is forgotten and one heard later counts as another process's.
const ECHO_WINDOW: Duration = Duration::from_secs(5);
/// The most sent notifications remembered; past it, the oldest are forgotten.
const MAX_UNHEARD_SENT: usize = 4096;

impl SentNotifications {
    fn note(&self, sender: i32, subject: uuid::Uuid) {
        let mut sent = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while sent.front().is_some_and(|(_, _, at)| {
            sent.len() >= MAX_UNHEARD_SENT || now.duration_since(*at) > ECHO_WINDOW
        }) {
            sent.pop_front();
        }
        sent.push_back((sender, subject, now));
    }

    /// Whether a notification of `subject` from backend `sender` is one this store sent; each is
    /// matched once.
    fn heard_back(&self, sender: u32, subject: uuid::Uuid) -> bool {
        let mut sent = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let found = sent.iter().position(|(pid, noted, at)| {
            u32::try_from(*pid) == Ok(sender)
                && *noted == subject
                && now.duration_since(*at) <= ECHO_WINDOW
        });
        found.and_then(|index| sent.remove(index)).is_some()
    }
}

/// A listener connection that has issued its LISTEN.
async fn connect_listener(pool: &PgPool) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    // A pool of its own per connection: a listener given up on a frozen connection leaves behind a
    // task waiting on it, which must not hold a shared connection.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CONNECT_DEADLINE)
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Runs `attempt` while reporting a reset every [`UNHEARD_RESET_INTERVAL`] (the first at once):
/// nothing is listening meanwhile.
async fn resetting_until<T>(
    attempt: impl std::future::Future<Output = T>,
    on_event: &crate::InvalidationHandler,
) -> T {
    let mut tick = tokio::time::interval(UNHEARD_RESET_INTERVAL);
    tokio::pin!(attempt);
    loop {
        tokio::select! {
            done = &mut attempt => return done,
            _ = tick.tick() => on_event(crate::Invalidation::Reset),
        }
    }
}

/// How often each replica's listener NOTIFYs its own heartbeat on [`CHANNEL`].
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a heartbeat sent may go unheard before the listener is taken for dead.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(3);
/// Heartbeat payloads (`heartbeat:<listener>:<sequence>`): not a UUID, so other replicas (and
/// older versions) ignore them.
const HEARTBEAT_PREFIX: &str = "heartbeat:";
/// How late a tick may fire compared with the one a heartbeat was sent on.
const TICK_JITTER: Duration = Duration::from_millis(100);
/// How often a reset is reported while no listener connection is listening.
const UNHEARD_RESET_INTERVAL: Duration = Duration::from_secs(1);
/// How long connecting the listener and issuing its LISTEN may take before it is tried again.
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);

/// What names the tenant of a change of `subject`, sent just before the subject's own notification
/// ([`PostgresStore::notify_invalidations`]).
fn tenant_notice(tenant: keyplane_core::TenantId, subject: uuid::Uuid) -> String {
    format!("{TENANT_PREFIX}{}:{subject}", tenant.as_uuid())
}
/// Starts a [`tenant_notice`]: not a UUID, so releases from before ignore it.
const TENANT_PREFIX: &str = "t:";

/// The tenant a [`tenant_notice`] names, and its subject; `None` for any other payload.
fn read_tenant_notice(payload: &str) -> Option<(keyplane_core::TenantId, uuid::Uuid)> {
    let (tenant, subject) = payload.strip_prefix(TENANT_PREFIX)?.split_once(':')?;
    Some((
        keyplane_core::TenantId::from_uuid(uuid::Uuid::parse_str(tenant).ok()?),
        uuid::Uuid::parse_str(subject).ok()?,
    ))
}

/// Hands notifications to `on_event` until the connection fails or a heartbeat it sent (payload
/// `heartbeat` + its sequence number) goes unheard for [`HEARTBEAT_DEADLINE`]; returns why it
/// stopped.
async fn deliver_until_silent(
    listener: &mut sqlx::postgres::PgListener,
    pool: &PgPool,
    heartbeat: &str,
    sent: &SentNotifications,
    on_event: &crate::InvalidationHandler,
) -> String {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Heartbeats sent and not heard yet, oldest first, with when their sending began.
    let mut unheard = std::collections::VecDeque::<(u64, tokio::time::Instant)>::new();
    let mut sequence = 0u64;
    // The last tenant notice heard, with its sender: the subject's own notification, when it comes
    // next from the same backend, is placed in that tenant. A transaction's notifications arrive
    // together and in the order sent, so nothing comes between the two.
    let mut placed: Option<(u32, keyplane_core::TenantId, uuid::Uuid)> = None;
    loop {
        tokio::select! {
            received = listener.try_recv() => match received {
                Ok(Some(notification)) => {
                    let payload = notification.payload();
                    if let Some(heard) = payload.strip_prefix(heartbeat) {
                        // Delivered in order: every heartbeat sent up to this one has arrived.
                        if let Ok(heard) = heard.parse::<u64>() {
                            while unheard.front().is_some_and(|(sent, _)| *sent <= heard) {
                                unheard.pop_front();
                            }
                        }
                    } else if let Some((tenant, subject)) = read_tenant_notice(payload) {
                        placed = Some((notification.process_id(), tenant, subject));
                    } else if let Ok(subject) = uuid::Uuid::parse_str(payload) {
                        let sender = notification.process_id();
                        let tenant = placed
                            .take()
                            .filter(|(from, _, of)| *from == sender && *of == subject)
                            .map(|(_, tenant, _)| tenant);
                        on_event(if sent.heard_back(sender, subject) {
                            crate::Invalidation::Echo(subject)
                        } else if let Some(tenant) = tenant {
                            crate::Invalidation::InTenant(tenant, subject)
                        } else {
                            // A replica of a release from before: its tenant is unknown.
                            crate::Invalidation::Subject(subject)
                        });
                    }
                }
                Ok(None) => return "lost its connection".into(),
                Err(error) => return format!("failed: {error}"),
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                // The check falls on a tick three after the send: allow for the ticks' jitter.
                if unheard.front().is_some_and(|(_, sent)| {
                    now.duration_since(*sent) + TICK_JITTER >= HEARTBEAT_DEADLINE
                }) {
                    return format!("heard no heartbeat for {HEARTBEAT_DEADLINE:?}");
                }
                // Bounded, so a slow store cannot hold up the deadline check. Only a heartbeat
                // that was sent can go unheard: one the saturated pool could not send says nothing
                // about this connection.
                sequence += 1;
                let sent = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(format!("{heartbeat}{sequence}"))
                    .execute(pool);
                match tokio::time::timeout(HEARTBEAT_INTERVAL, sent).await {
                    Ok(Ok(_)) => unheard.push_back((sequence, now)),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "cannot send the invalidation listener's heartbeat");
                    }
                    Err(_) => {
                        tracing::debug!("the invalidation listener's heartbeat could not be sent in time");
                    }
                }
            }
        }
    }
}

bind_credential_fn!(sqlx::Postgres);
impl_store!(PostgresStore, sqlx::Postgres, "postgres");
impl_audit!(PostgresStore, sqlx::Postgres);
impl_webhooks!(PostgresStore, sqlx::Postgres);
impl_tenant_purge!(PostgresStore, sqlx::Postgres);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_older_than_twelve_is_refused_by_name() {
        let refused = supported_server(110_022, "11.22 (Debian 11.22-1)").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "store configuration: PostgreSQL 11.22 (Debian 11.22-1) is too old: keyplane needs \
             PostgreSQL 12 or later"
        );
        assert!(supported_server(96_024, "9.6.24").is_err());
        assert!(supported_server(120_000, "12.0").is_ok());
        assert!(supported_server(150_019, "15.19").is_ok());
    }
}
