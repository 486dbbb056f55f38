//! Background work done after an answer (public revocation reports, canary trigger events): a
//! bound on how much runs at once, and a way for shutdown to wait for it. And the periodic jobs'
//! clock ([`Every`], [`periodic`]) and their steps' deadline ([`bounded`]).

use crate::app::App;
use crate::config::BackgroundJob;
use keyplane_core::TenantId;
use keyplane_store::{StoreError, StoreFault, Unavailable};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
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

    /// The same, but the first tick one `interval` from now.
    pub(crate) fn later(interval: Duration, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        let mut every = Self::new(interval, stop);
        every.tick.reset();
        every
    }

    /// Waits for the next tick: `false` once `stop` has changed, when the job is to end.
    pub(crate) async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.tick.tick() => true,
            _ = self.stop.changed() => false,
        }
    }

    /// Resolves once `stop` changes (or its sender is gone).
    async fn stopped(&mut self) {
        let _ = self.stop.changed().await;
    }
}

/// Runs `job`'s `step` at each of `every`'s ticks, each run under the job's deadline
/// ([`bounded`]), until its stop: a run under way then is abandoned, as at its deadline (every
/// step given here can be: what it did not finish is done by a later one).
pub(crate) async fn periodic<F, Fut>(app: App, job: BackgroundJob, mut every: Every, mut step: F)
where
    F: FnMut(App) -> Fut,
    Fut: Future<Output = ()>,
{
    while every.tick().await {
        tokio::select! {
            _ = bounded(&app, job, step(app.clone())) => {}
            _ = every.stopped() => return,
        }
    }
}

/// A background step abandoned at its job's deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepTimedOut {
    pub deadline: Duration,
}

impl std::fmt::Display for StepTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no answer within {:?}", self.deadline)
    }
}

impl std::error::Error for StepTimedOut {}

/// As a store's fault: `timed out`, and a write abandoned so may have been committed (a retry
/// must be one that may find it made).
impl From<StepTimedOut> for StoreError {
    fn from(late: StepTimedOut) -> Self {
        StoreError::Unavailable(Unavailable {
            may_have_committed: true,
            ..Unavailable::new(StoreFault::TimedOut, late.to_string())
        })
    }
}

/// Which jobs' last step was abandoned at its deadline (`/readyz`'s `background`), so that a run
/// of them is logged once, when it starts, and once when a step finishes again.
#[derive(Default)]
pub(crate) struct StalledJobs([AtomicBool; BackgroundJob::ALL.len()]);

impl StalledJobs {
    /// The jobs whose last step was abandoned, in [`BackgroundJob::ALL`]'s order.
    pub(crate) fn now(&self) -> Vec<BackgroundJob> {
        BackgroundJob::ALL
            .into_iter()
            .filter(|job| self.0[*job as usize].load(Ordering::Relaxed))
            .collect()
    }

    /// Marks whether `job`'s last step was abandoned; whether it was before.
    fn set(&self, job: BackgroundJob, stalled: bool) -> bool {
        self.0[job as usize].swap(stalled, Ordering::Relaxed)
    }
}

/// `step` of `job`, abandoned (dropped) if it has not ended by the job's deadline
/// (`Config::background_step_deadlines`): counted in `keyplane_background_step_timeouts_total`,
/// logged at `warn` (once per run of them), and shown by `/readyz` until a step of the job ends
/// in time. Dropping a store call's future drops its transaction unfinished (rolled back) or
/// its connection; each step given here keeps what it did not finish for its next run. The one
/// deadline every periodic job's store work runs under.
pub(crate) async fn bounded<T>(
    app: &App,
    job: BackgroundJob,
    step: impl Future<Output = T>,
) -> Result<T, StepTimedOut> {
    let deadline = app.inner().config.background_step_deadlines.of(job);
    let stalled = &app.inner().stalled_jobs;
    match tokio::time::timeout(deadline, step).await {
        Ok(done) => {
            if stalled.set(job, false) {
                tracing::info!(
                    job = job.label(),
                    "background job goes on: its step ended within its deadline again"
                );
            }
            Ok(done)
        }
        Err(_) => {
            app.inner().metrics.background_step_timed_out(job);
            let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
            if stalled.set(job, true) {
                tracing::debug!(
                    job = job.label(),
                    deadline_ms,
                    "background step abandoned at its deadline again"
                );
            } else {
                tracing::warn!(job = job.label(), deadline_ms, "background step abandoned at its deadline: the store did not answer in time; retried at the job's next run, see keyplane_background_step_timeouts_total");
            }
            Err(StepTimedOut { deadline })
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
