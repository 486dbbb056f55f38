//! This replica's clock against the database's. Replicas sharing a PostgreSQL store each judge
//! time-driven changes to it by their own clock (a grace period's end, an expiry notice, what is
//! old enough to prune), for every tenant and for good: one host whose time is off would make
//! them early (or late) for all. So the clock is measured against the database's, at start and
//! then periodically; while it is off by more than a job tolerates ([`ClockJob`]:
//! `Config::max_clock_skew` where seconds decide, the larger of it and an hour where the job cuts
//! at a day or more), the job is held ([`ClockCheck::allows`], `keyplane_clock_jobs_held`), and
//! the difference is logged (once on entering, once on leaving), shown by `/readyz` and exported
//! as `keyplane_clock_skew_seconds`.
//! A verdict holds only while it is fresh: with no successful measurement for [`STALE_AFTER`] (or
//! three check intervals, if longer) the clock is `Unknown` again, which holds the jobs too (a
//! measurement that keeps failing mostly means a database those jobs could not write to anyway,
//! and a clock stepped meanwhile is what this check is for); the first that succeeds frees them.
//! SQLite is one process on one machine: nothing to compare with.
//!
//! The jobs are not all: each request this replica serves dates what it writes by its clock
//! (`created_at`, a default expiry, a rotation's grace end). With `--unready-clock-skew-seconds`,
//! a measurement off by more than that makes `/readyz` answer 503 ([`ClockCheck::unready`]), so
//! the load balancer takes the replica out, until one finds it within half of it (the last
//! successful measurement decides, however old: a replica whose clock was found hours off is not
//! sent traffic again because measuring fails). Such a request's time is off by the skew on that
//! one row, where a job's would be on every tenant's, so the writes that reach it anyway are
//! served, not refused: refusing them would fail clients that bypass the balancer for an error
//! the balancer already routes around.

use crate::app::App;
use chrono::{DateTime, TimeDelta, Utc};
use std::time::{Duration, Instant};

/// A job that changes the shared store by this replica's clock, held by [`ClockCheck::allows`]
/// while the clock is not known to be within the error the job tolerates. Nothing reads the
/// database's clock otherwise (every time is bound from this replica's), so a database whose clock
/// is off costs only these holds: each job is held no longer than its own tolerance requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClockJob {
    /// Forgetting previous secrets whose grace ended: a grace may be a minute.
    GracePeriodEnd,
    /// Retiring a previous secret unused for its period (which may be a minute).
    UnusedSecretCutover,
    /// `credential.expired` for a credential that ended within the lenient tolerance: seconds
    /// decide whether it has (one that ended longer ago has by any clock within it).
    ExpiredNotice,
    /// Ending console sessions idle past their timeout (30 minutes by default).
    ConsoleSessionPrune,
    /// `credential.expiring`, 30, 7 or 1 days ahead.
    ExpiringNotice,
    /// Deleting audit events older than the retention's days.
    AuditRetention,
    /// Deleting Idempotency-Key records older than a day.
    IdempotencyPrune,
    /// Deleting finished webhook deliveries older than their retention (30 days).
    WebhookDeliveryPrune,
    /// Starting a webhook's failing period and disabling it after five days of failures.
    WebhookDisable,
    /// Giving up public revocation reports older than a day.
    LeakReportGiveUp,
}

impl ClockJob {
    pub(crate) const ALL: [Self; 10] = [
        Self::GracePeriodEnd,
        Self::UnusedSecretCutover,
        Self::ExpiredNotice,
        Self::ConsoleSessionPrune,
        Self::ExpiringNotice,
        Self::AuditRetention,
        Self::IdempotencyPrune,
        Self::WebhookDeliveryPrune,
        Self::WebhookDisable,
        Self::LeakReportGiveUp,
    ];

    /// `keyplane_clock_jobs_held`'s label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::GracePeriodEnd => "grace_period_end",
            Self::UnusedSecretCutover => "unused_secret_cutover",
            Self::ExpiredNotice => "expired_notice",
            Self::ConsoleSessionPrune => "console_session_prune",
            Self::ExpiringNotice => "expiring_notice",
            Self::AuditRetention => "audit_retention",
            Self::IdempotencyPrune => "idempotency_prune",
            Self::WebhookDeliveryPrune => "webhook_delivery_prune",
            Self::WebhookDisable => "webhook_disable",
            Self::LeakReportGiveUp => "leak_report_give_up",
        }
    }

    /// Whether a few seconds (or minutes) decide it: held past `--max-clock-skew-seconds`; the
    /// others, which cut at a day or more, only past [`LENIENT_LIMIT`].
    fn strict(self) -> bool {
        matches!(
            self,
            Self::GracePeriodEnd
                | Self::UnusedSecretCutover
                | Self::ExpiredNotice
                | Self::ConsoleSessionPrune
        )
    }
}

/// The error the jobs that cut at days tolerate (if the limit is not larger): an hour early or
/// late on a day or more.
const LENIENT_LIMIT: Duration = Duration::from_secs(3600);

/// A measurement this recent answers [`ClockCheck::measure`] (every job asks before it runs).
const REUSE: Duration = Duration::from_secs(1);
/// How long the last successful measurement's verdict stands without another: past it the clock
/// is `Unknown` (an `Ok` hours old says nothing of a clock stepped since).
const STALE_AFTER: Duration = Duration::from_secs(60);

/// What is known of this replica's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClockStatus {
    /// Within the limit at the last measurement.
    Ok,
    /// Off by more than the limit at the last measurement: the time-driven jobs are held.
    Skewed,
    /// Not measured yet, or no measurement has succeeded for [`STALE_AFTER`] (or longer): held
    /// too.
    Unknown,
    /// Nothing to compare with (SQLite).
    NotChecked,
}

/// The last successful measurement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    /// This replica's clock less the database's: positive when ahead.
    pub skew: TimeDelta,
    /// When, on this replica's clock.
    pub at: DateTime<Utc>,
    /// When, on the monotonic clock tests move with the wall clock (`Clock::monotonic`): what
    /// the verdict's age is read from.
    pub taken: Instant,
}

impl Measured {
    pub(crate) fn skew_seconds(&self) -> f64 {
        self.skew.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ClockState {
    pub status: ClockStatus,
    pub last: Option<Measured>,
}

struct Attempts {
    /// When the last measurement was attempted (successful or not), on the monotonic clock tests
    /// move (so that time they make pass is measured anew, not taken for a stale verdict).
    last_at: Option<Instant>,
    /// Whether the last attempts failed: logged once per run of failures.
    failing: bool,
    /// Whether this run of failures has outlived the last verdict (logged once).
    stale: bool,
}

pub(crate) struct ClockCheck {
    limit: Duration,
    /// `--unready-clock-skew-seconds`.
    unready_above: Option<Duration>,
    /// Whether the last successful measurement was past `unready_above` (or, once past, not yet
    /// back within half of it).
    unready: std::sync::atomic::AtomicBool,
    /// How long a verdict stands without a successful measurement.
    stale_after: Duration,
    clock: crate::config::Clock,
    state: std::sync::Mutex<ClockState>,
    /// One measurement at a time; those who ask meanwhile take its result.
    attempts: tokio::sync::Mutex<Attempts>,
}

impl ClockCheck {
    /// `check_interval`: how often the background work measures; a verdict outlives three of them.
    pub(crate) fn new(
        limit: Duration,
        unready_above: Option<Duration>,
        check_interval: Duration,
        clock: crate::config::Clock,
    ) -> Self {
        Self {
            limit,
            unready_above,
            unready: std::sync::atomic::AtomicBool::new(false),
            stale_after: STALE_AFTER.max(check_interval.saturating_mul(3)),
            clock,
            state: std::sync::Mutex::new(ClockState {
                status: ClockStatus::Unknown,
                last: None,
            }),
            attempts: tokio::sync::Mutex::new(Attempts {
                last_at: None,
                failing: false,
                stale: false,
            }),
        }
    }

    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    /// `--unready-clock-skew-seconds`, if set.
    pub(crate) fn unready_above(&self) -> Option<Duration> {
        self.unready_above
    }

    /// Whether `/readyz` is to answer 503: the last measurement found the clock off by more than
    /// `--unready-clock-skew-seconds` (see the module's documentation).
    pub(crate) fn unready(&self) -> bool {
        self.unready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Updates [`Self::unready`] from a measurement `off`; logs a change.
    fn judge_readiness(&self, off: Duration, skew_seconds: f64) {
        let Some(above) = self.unready_above else {
            return;
        };
        let was = self.unready();
        // Back only well within, as the jobs are: a clock at the limit does not flap.
        let unready = if was { off > above / 2 } else { off > above };
        self.unready
            .store(unready, std::sync::atomic::Ordering::Relaxed);
        let above_seconds = above.as_secs_f64();
        match (was, unready) {
            (false, true) => tracing::warn!(
                clock.skew_seconds = skew_seconds,
                clock.unready_above_seconds = above_seconds,
                "this replica's clock is {:.3} s off the database's (more than --unready-clock-skew-seconds, {above_seconds} s): /readyz answers 503 until it agrees again",
                skew_seconds.abs(),
            ),
            (true, false) => tracing::warn!(
                clock.skew_seconds = skew_seconds,
                clock.unready_above_seconds = above_seconds,
                "this replica's clock is within {:.3} s of the database's again: /readyz answers 200",
                skew_seconds.abs(),
            ),
            _ => {}
        }
    }

    /// The last verdict, `Unknown` once it is older than [`Self::stale_after`] (the skew and
    /// when it was measured are still shown).
    pub(crate) fn state(&self) -> ClockState {
        let mut state = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(state.status, ClockStatus::Ok | ClockStatus::Skewed)
            && state.last.is_none_or(|last| self.is_stale(&last))
        {
            state.status = ClockStatus::Unknown;
        }
        state
    }

    fn is_stale(&self, measured: &Measured) -> bool {
        self.clock
            .monotonic()
            .saturating_duration_since(measured.taken)
            > self.stale_after
    }

    /// How far off the clock may be for `job` to run.
    pub(crate) fn tolerance(&self, job: ClockJob) -> Duration {
        if job.strict() {
            self.limit
        } else {
            self.limit.max(LENIENT_LIMIT)
        }
    }

    /// Whether `job` may run now: after a fresh measurement (at most [`REUSE`] old), unless the
    /// clock is off by more than the job tolerates, or unknown (not measured yet, or no
    /// measurement succeeded lately).
    pub(crate) async fn allows(&self, app: &App, job: ClockJob) -> bool {
        self.measure(app).await;
        self.allows_now(app, job)
    }

    /// [`Self::allows`] by the last measurement, without measuring again: for a decision made often
    /// (every webhook attempt), or right after [`Self::measure`]; the background work measures
    /// every few seconds.
    pub(crate) fn allows_now(&self, app: &App, job: ClockJob) -> bool {
        let held = self.holds(job);
        app.inner().metrics.clock_job_held(job, held);
        if held {
            tracing::debug!(
                job = job.label(),
                "held: this replica's clock is not known to agree with the database's closely enough"
            );
        }
        !held
    }

    fn holds(&self, job: ClockJob) -> bool {
        let state = self.state();
        match state.status {
            ClockStatus::Ok | ClockStatus::NotChecked => false,
            ClockStatus::Unknown => true,
            ClockStatus::Skewed => {
                job.strict()
                    || state.last.is_none_or(|last| {
                        last.skew.abs().to_std().unwrap_or(Duration::MAX) > self.tolerance(job)
                    })
            }
        }
    }

    /// The jobs held at `off`, for the log.
    fn held_at(&self, off: Duration) -> String {
        let held: Vec<_> = ClockJob::ALL
            .into_iter()
            .filter(|job| off > self.tolerance(*job) || job.strict())
            .map(ClockJob::label)
            .collect();
        held.join(", ")
    }

    /// Measures the clock against the database's, unless that was tried within [`REUSE`].
    pub(crate) async fn measure(&self, app: &App) {
        let mut attempts = self.attempts.lock().await;
        let monotonic = || self.clock.monotonic();
        if attempts
            .last_at
            .is_some_and(|at| monotonic().saturating_duration_since(at) < REUSE)
        {
            return;
        }
        // Under its job's deadline (2 s by default): a store that does not answer holds nothing
        // up.
        let read = crate::jobs::bounded(
            app,
            crate::config::BackgroundJob::ClockCheck,
            app.store().database_clock(),
        )
        .await;
        // When it ended: a reading that took its whole timeout is not tried again at once by the
        // next job asking.
        attempts.last_at = Some(monotonic());
        let reading = match read {
            Ok(Ok(Some(reading))) => reading,
            Ok(Ok(None)) => {
                self.set(ClockState {
                    status: ClockStatus::NotChecked,
                    last: None,
                });
                return;
            }
            Ok(Err(error)) => {
                if !attempts.failing {
                    tracing::warn!(%error, "cannot read the database's clock to compare this replica's with it; retrying");
                }
                self.failed(&mut attempts);
                return;
            }
            Err(late) => {
                if !attempts.failing {
                    tracing::warn!(
                        "cannot read the database's clock to compare this replica's with it: {late}; retrying"
                    );
                }
                self.failed(&mut attempts);
                return;
            }
        };
        let round_trip = reading.round_trip();
        // Such a reading cannot tell an error of the limit's size from the time it took.
        if round_trip > self.limit {
            if !attempts.failing {
                tracing::warn!(
                    round_trip_ms = round_trip.as_millis() as u64,
                    limit_seconds = self.limit.as_secs_f64(),
                    "cannot compare this replica's clock with the database's: the round trip took longer than the allowed difference; retrying"
                );
            }
            self.failed(&mut attempts);
            return;
        }
        attempts.failing = false;
        attempts.stale = false;
        let clock = &app.inner().config.clock;
        // This replica's time when the database read its clock: now, less what passed since.
        let here =
            clock.now() - TimeDelta::from_std(reading.midpoint().elapsed()).unwrap_or_default();
        let measured = Measured {
            skew: here - (reading.at + clock.moved()),
            at: here,
            taken: clock.monotonic(),
        };
        app.inner().metrics.clock_skew(measured.skew_seconds());
        let before = self.state().status;
        let off = measured.skew.abs().to_std().unwrap_or(Duration::MAX);
        self.judge_readiness(off, measured.skew_seconds());
        // Back to normal only well within the limit, so a clock at the limit does not flap.
        let status = match before {
            ClockStatus::Skewed if off > self.limit / 2 => ClockStatus::Skewed,
            _ if off > self.limit => ClockStatus::Skewed,
            _ => ClockStatus::Ok,
        };
        self.set(ClockState {
            status,
            last: Some(measured),
        });
        let skew_seconds = measured.skew_seconds();
        let direction = if skew_seconds >= 0.0 {
            "ahead of"
        } else {
            "behind"
        };
        let round_trip_ms = round_trip.as_secs_f64() * 1000.0;
        let limit_seconds = self.limit.as_secs_f64();
        match (before, status) {
            (ClockStatus::Skewed, ClockStatus::Skewed) | (ClockStatus::Ok, ClockStatus::Ok) => {}
            (_, ClockStatus::Skewed) => tracing::warn!(
                clock.skew_seconds = skew_seconds,
                clock.limit_seconds = limit_seconds,
                clock.round_trip_ms = round_trip_ms,
                "this replica's clock is {:.3} s {direction} the database's (more than --max-clock-skew-seconds, {limit_seconds} s): holding {} until it agrees again; fix this host's time synchronization (NTP), or the database server's if every replica says the same",
                skew_seconds.abs(),
                self.held_at(off),
            ),
            (ClockStatus::Skewed, _) => tracing::warn!(
                clock.skew_seconds = skew_seconds,
                clock.limit_seconds = limit_seconds,
                clock.round_trip_ms = round_trip_ms,
                "this replica's clock agrees with the database's again ({:.3} s {direction} it): the held time-driven jobs resume",
                skew_seconds.abs(),
            ),
            (_, _) => tracing::info!(
                clock.skew_seconds = skew_seconds,
                clock.limit_seconds = limit_seconds,
                clock.round_trip_ms = round_trip_ms,
                "this replica's clock agrees with the database's ({:.3} s {direction} it)",
                skew_seconds.abs(),
            ),
        }
    }

    /// A measurement failed: the verdict stands until it is stale, which is logged once.
    fn failed(&self, attempts: &mut Attempts) {
        attempts.failing = true;
        let stored = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !attempts.stale
            && matches!(stored.status, ClockStatus::Ok | ClockStatus::Skewed)
            && self.state().status == ClockStatus::Unknown
        {
            attempts.stale = true;
            tracing::warn!(
                stale_after_seconds = self.stale_after.as_secs(),
                "no measurement of this replica's clock has succeeded for {} s: its agreement with the database's is unknown, holding every job that cuts by it until one does",
                self.stale_after.as_secs(),
            );
        }
    }

    fn set(&self, state: ClockState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured_now(check: &ClockCheck, status: ClockStatus) {
        check.set(ClockState {
            status,
            last: Some(Measured {
                skew: TimeDelta::seconds(30),
                at: check.clock.now(),
                taken: check.clock.monotonic(),
            }),
        });
    }

    #[test]
    fn a_verdict_stands_a_minute_or_three_check_intervals() {
        let clock = crate::config::Clock::default();
        let check = ClockCheck::new(
            Duration::from_secs(5),
            None,
            Duration::from_secs(1),
            clock.clone(),
        );
        for status in [ClockStatus::Ok, ClockStatus::Skewed] {
            measured_now(&check, status);
            clock.advance(Duration::from_secs(60));
            assert_eq!(check.state().status, status);
            clock.advance(Duration::from_secs(1));
            let state = check.state();
            assert_eq!(state.status, ClockStatus::Unknown);
            assert!(state.last.is_some(), "the old measurement is still shown");
        }
        check.set(ClockState {
            status: ClockStatus::NotChecked,
            last: None,
        });
        clock.advance(Duration::from_secs(3600));
        assert_eq!(check.state().status, ClockStatus::NotChecked);

        let slow = ClockCheck::new(
            Duration::from_secs(5),
            None,
            Duration::from_secs(30),
            clock.clone(),
        );
        measured_now(&slow, ClockStatus::Ok);
        clock.advance(Duration::from_secs(90));
        assert_eq!(slow.state().status, ClockStatus::Ok);
        clock.advance(Duration::from_secs(1));
        assert_eq!(slow.state().status, ClockStatus::Unknown);
    }
}
