//! Background work done after an answer (public revocation reports, canary trigger events): a
//! bound on how much runs at once, and a way for shutdown to wait for it.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub(crate) struct Jobs {
    permits: Arc<Semaphore>,
    capacity: usize,
    /// What the jobs are, for the shutdown log.
    what: &'static str,
}

impl Jobs {
    pub(crate) fn new(capacity: usize, what: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            what,
        }
    }

    /// A slot for one job, held until the permit is dropped; `None` when all are taken.
    pub(crate) fn try_start(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Waits (at most `limit`) for the jobs running: `serve` calls it after the last connection
    /// closed, before the store is closed.
    pub(crate) async fn drain(&self, limit: Duration) {
        let all = self
            .permits
            .acquire_many(u32::try_from(self.capacity).unwrap_or(u32::MAX));
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!(
                jobs = self.what,
                "background jobs still running at shutdown were abandoned"
            );
        }
    }
}
