use crate::audit::impl_audit;
use crate::sql::{bind_credential_fn, impl_store};
use crate::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// The scale-out store: keyplane replicas share one PostgreSQL.
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }
}

/// The channel replicas use to tell each other which subjects' cached verifications are stale.
const CHANNEL: &str = "keyplane_invalidation";

impl PostgresStore {
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
    /// (re)connection reports [`Invalidation::Reset`](crate::Invalidation::Reset): notifications sent
    /// while disconnected are lost, so everything cached must be re-checked.
    fn spawn_invalidation_listener(&self, on_event: crate::InvalidationHandler) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(mut listener) => {
                        if let Err(error) = listener.listen(CHANNEL).await {
                            tracing::warn!(%error, "cannot LISTEN for cache invalidations; retrying");
                        } else {
                            on_event(crate::Invalidation::Reset);
                            loop {
                                match listener.try_recv().await {
                                    Ok(Some(notification)) => {
                                        if let Ok(subject) =
                                            uuid::Uuid::parse_str(notification.payload())
                                        {
                                            on_event(crate::Invalidation::Subject(subject));
                                        }
                                    }
                                    Ok(None) => {
                                        tracing::warn!("invalidation listener lost its connection; reconnecting");
                                        on_event(crate::Invalidation::Reset);
                                    }
                                    Err(error) => {
                                        tracing::warn!(%error, "invalidation listener failed; reconnecting");
                                        break;
                                    }
                                }
                            }
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

bind_credential_fn!(sqlx::Postgres);
impl_store!(PostgresStore, "postgres");
impl_audit!(PostgresStore, sqlx::Postgres);
