//! Background work done after an answer (public revocation reports, canary trigger events): a
//! bound on how much runs at once, and a way for shutdown to wait for it.

use keyplane_core::TenantId;
use keyplane_store::StoreFault;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

pub(crate) struct Jobs {
    permits: Arc<Semaphore>,
    capacity: usize,
    /// What the jobs are, for the shutdown log.
    what: &'static str,
    /// Turned true when the drain starts: a job waiting to retry ([`Backoff`]) tries once more at
    /// once, then gives up, rather than sleep through the drain.
    draining: tokio::sync::watch::Sender<bool>,
}

impl Jobs {
    pub(crate) fn new(capacity: usize, what: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            what,
            draining: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The waits between a job's attempts through a store outage, cut short by the drain.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            started: tokio::time::Instant::now(),
            last: None,
            draining: self.draining.subscribe(),
            deadline: None,
        }
    }

    /// Whether a stop's drain has started: no new job should start then.
    pub(crate) fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// A slot for one job, held until the permit is dropped; `None` when all are taken.
    pub(crate) fn try_start(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Waits (at most `limit`) for the jobs running: `serve` calls it after the last connection
    /// closed, before the store is closed.
    pub(crate) async fn drain(&self, limit: Duration) {
        self.draining.send_replace(true);
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

/// How long a job whose reporter was already answered (a canary's trigger event) is retried
/// through a store outage before it is given up. (A public revocation report is retried so only
/// while its lease lasts, then from the store: `leaks::revoke`.)
pub(crate) const RETRY_THROUGH_OUTAGE_FOR: Duration = Duration::from_secs(3600);
/// The longest wait between two of its attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The waits between a job's attempts while the store has a transient fault: first the fault's
/// `Retry-After`, then doubling up to [`MAX_BACKOFF`], for [`RETRY_THROUGH_OUTAGE_FOR`] in all.
/// When its [`Jobs`]' drain starts (shutdown), a wait ends at once for one last attempt, and the
/// job is given up if that fails too: a store back before the stop is not slept through.
pub(crate) struct Backoff {
    started: tokio::time::Instant,
    last: Option<Duration>,
    draining: tokio::sync::watch::Receiver<bool>,
    /// No attempt is waited for past this (the end of a lease on the job).
    deadline: Option<tokio::time::Instant>,
}

impl Backoff {
    /// The same waits, but none that would end after `deadline`: the job is given up then.
    pub(crate) fn until(self, deadline: tokio::time::Instant) -> Self {
        Self {
            deadline: Some(deadline),
            ..self
        }
    }

    /// Whether this is the first wait (for a log line once per job).
    pub(crate) fn is_first(&self) -> bool {
        self.last.is_none()
    }

    /// Waits before the next attempt after an attempt met `fault`; `false` (at once) when the
    /// job has been retried long enough and is to be given up.
    pub(crate) async fn wait(&mut self, fault: StoreFault) -> bool {
        let gone = self.draining.has_changed().is_err();
        if self.started.elapsed() >= RETRY_THROUGH_OUTAGE_FOR || gone || *self.draining.borrow() {
            return false;
        }
        let next = self
            .last
            .map_or(Duration::from_secs(fault.retry_after_secs()), |last| {
                (last * 2).min(MAX_BACKOFF)
            });
        if self
            .deadline
            .is_some_and(|deadline| tokio::time::Instant::now() + next > deadline)
        {
            return false;
        }
        self.last = Some(next);
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            // Also when its `Jobs` is gone (an `App` dropped without a stop): then it gives up
            // after this attempt, rather than retry at once for the rest of the hour.
            _ = self.draining.wait_for(|draining| *draining) => {}
        }
        true
    }
}

/// A periodic job's clock: a tick every `interval`, the first at once (a late one delays the next
/// rather than bunching them), until `stop` turns true.
pub(crate) struct Every {
    tick: tokio::time::Interval,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Every {
    pub(crate) fn new(interval: Duration, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { tick, stop }
    }

    /// Waits for the next tick: `false` once `stop` has changed, when the job is to end.
    pub(crate) async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.tick.tick() => true,
            _ = self.stop.changed() => false,
        }
    }
}

/// Each organization's share of something bounded in all (open streams, events being written):
/// at most `max` held by one tenant at once, so one cannot take every place.
pub(crate) struct TenantShares {
    max: usize,
    held: Arc<Mutex<HashMap<TenantId, usize>>>,
}

impl TenantShares {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            held: Arc::default(),
        }
    }

    /// One place in `tenant`'s share, given back when dropped; `None` while it holds `max`.
    pub(crate) fn take(&self, tenant: TenantId) -> Option<TenantShare> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(&tenant).is_some_and(|count| *count >= self.max) {
            return None;
        }
        *held.entry(tenant).or_insert(0) += 1;
        Some(TenantShare {
            held: self.held.clone(),
            tenant,
        })
    }

    /// Places held now, all tenants together.
    pub(crate) fn held(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }
}

/// A place in a [`TenantShares`]; a tenant holding none has no entry.
pub(crate) struct TenantShare {
    held: Arc<Mutex<HashMap<TenantId, usize>>>,
    tenant: TenantId,
}

impl Drop for TenantShare {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}
