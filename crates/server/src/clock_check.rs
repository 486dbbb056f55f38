//! This replica's clock against the database's. Replicas sharing a PostgreSQL store each judge
//! time-driven changes to it by their own clock (a grace period's end, an expiry notice, what is
//! old enough to prune), for every tenant and for good: one host whose time is off would make
//! them early (or late) for all. So the clock is measured against the database's, at start and
//! then periodically; while it is off by more than `Config::max_clock_skew`, the jobs that change
//! the store by it are held ([`ClockCheck::allows`]), and the difference is logged (once on
//! entering, once on leaving), shown by `/readyz` and exported as `keyplane_clock_skew_seconds`.
//! A verdict holds only while it is fresh: with no successful measurement for [`STALE_AFTER`] (or
//! three check intervals, if longer) the clock is `Unknown` again, which holds the jobs too (a
//! measurement that keeps failing mostly means a database those jobs could not write to anyway,
//! and a clock stepped meanwhile is what this check is for); the first that succeeds frees them.
//! SQLite is one process on one machine: nothing to compare with.

use crate::app::App;
use chrono::{DateTime, TimeDelta, Utc};
use std::time::{Duration, Instant};

/// The jobs [`ClockCheck::allows`] holds while the clock is off, for the log.
const HELD_JOBS: &str = "the lifecycle sweep (ending grace periods, retiring unused previous \
                         secrets, expiry notices), audit retention, Idempotency-Key pruning, \
                         console session pruning, webhook delivery pruning, disabling failing \
                         webhooks, giving up old public revocation reports";

/// A measurement this recent answers [`ClockCheck::measure`] (every job asks before it runs).
const REUSE: Duration = Duration::from_secs(1);
/// How long one measurement may take: a store that does not answer holds nothing up.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(2);
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
    /// How long a verdict stands without a successful measurement.
    stale_after: Duration,
    clock: crate::config::Clock,
    state: std::sync::Mutex<ClockState>,
    /// One measurement at a time; those who ask meanwhile take its result.
    attempts: tokio::sync::Mutex<Attempts>,
}

impl ClockCheck {
    /// `check_interval`: how often the background work measures; a verdict outlives three of them.
    pub(crate) fn new(limit: Duration, check_interval: Duration, clock: crate::config::Clock) -> Self {
        Self {
            limit,
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

    /// Whether `job`, which changes the shared store by this replica's clock, may run now: after a
    /// fresh measurement (at most [`REUSE`] old), unless the clock is off by more than the limit
    /// or has not been measured yet.
    pub(crate) async fn allows(&self, app: &App, job: &'static str) -> bool {
        self.measure(app).await;
        match self.state().status {
            ClockStatus::Ok | ClockStatus::NotChecked => true,
            ClockStatus::Skewed | ClockStatus::Unknown => {
                tracing::debug!(
                    job,
                    "held: this replica's clock is not known to agree with the database's"
                );
                false
            }
        }
    }

    /// Whether the last measurement found the clock within the limit (or there is nothing to
    /// compare with), without measuring again: for a decision made often (every webhook attempt);
    /// the background work measures every few seconds.
    pub(crate) fn trusted(&self) -> bool {
        matches!(
            self.state().status,
            ClockStatus::Ok | ClockStatus::NotChecked
        )
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
        let read = tokio::time::timeout(MEASURE_TIMEOUT, app.store().database_clock()).await;
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
            Err(_) => {
                if !attempts.failing {
                    tracing::warn!(
                        "cannot read the database's clock to compare this replica's with it: no answer within 2 s; retrying"
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
                "this replica's clock is {:.3} s {direction} the database's (more than --max-clock-skew-seconds, {limit_seconds} s): holding {HELD_JOBS} until it agrees again; fix this host's time synchronization (NTP), or the database server's if every replica says the same",
                skew_seconds.abs(),
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
                "no measurement of this replica's clock has succeeded for {} s: its agreement with the database's is unknown, holding {HELD_JOBS} until one does",
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
        let check = ClockCheck::new(Duration::from_secs(5), Duration::from_secs(1), clock.clone());
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

        let slow = ClockCheck::new(Duration::from_secs(5), Duration::from_secs(30), clock.clone());
        measured_now(&slow, ClockStatus::Ok);
        clock.advance(Duration::from_secs(90));
        assert_eq!(slow.state().status, ClockStatus::Ok);
        clock.advance(Duration::from_secs(1));
        assert_eq!(slow.state().status, ClockStatus::Unknown);
    }
}
