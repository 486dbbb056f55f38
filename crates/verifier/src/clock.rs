//! The clock the cache's ages are read on: the staleness bound, each answer's lifetime and its
//! credential's `exp`. `Instant` (CLOCK_MONOTONIC on Linux) stops while the host is suspended: a
//! laptop or VM woken after an hour would find an answer whose credential expired meanwhile, and a
//! stream silent all that time, as fresh as when it slept, and use them for up to `cache_ttl`
//! (`max_staleness`) more. So these ages are read on a clock that counts a suspend:
//! CLOCK_BOOTTIME on Linux and Android, CLOCK_MONOTONIC on Apple's systems (which counts sleep
//! there). It is one vDSO read as `Instant::now()` is (22 ns against 22 ns on the bench VM:
//! BENCHMARKS.md, "The embedded verifier's clock"), so a cache hit still reads one clock. Other
//! systems fall back to `Instant`, and with it to the limitation.

use std::time::Duration;

/// A reading of [`Clock`], in nanoseconds since an arbitrary origin (the boot, on Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Moment(u64);

impl Moment {
    pub(crate) fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    pub(crate) fn nanos(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is; zero if it is not after.
    pub(crate) fn saturating_duration_since(self, earlier: Moment) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// `self + duration`; past what the clock holds (584 years after its origin), its end: never, in
/// practice, and not a panic.
impl std::ops::Add<Duration> for Moment {
    type Output = Moment;

    fn add(self, duration: Duration) -> Moment {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        Moment(self.0.saturating_add(nanos))
    }
}

/// `self - duration`, or the clock's origin.
impl std::ops::Sub<Duration> for Moment {
    type Output = Moment;

    fn sub(self, duration: Duration) -> Moment {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        Moment(self.0.saturating_sub(nanos))
    }
}

/// Where [`Moment`]s come from: the system's clock that counts a suspend, or, in tests, one they
/// move (a suspend is the clock jumping while the process did not run).
#[derive(Debug, Clone, Default)]
pub(crate) enum Clock {
    #[default]
    System,
    #[cfg(test)]
    Manual(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    #[inline]
    pub(crate) fn now(&self) -> Moment {
        match self {
            Clock::System => system_now(),
            #[cfg(test)]
            Clock::Manual(nanos) => Moment(nanos.load(std::sync::atomic::Ordering::SeqCst)),
        }
    }

    /// A clock at `start` that moves only when [`Clock::advance`] moves it.
    #[cfg(test)]
    pub(crate) fn manual(start: Duration) -> Self {
        let nanos = u64::try_from(start.as_nanos()).unwrap();
        Clock::Manual(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            nanos,
        )))
    }

    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        match self {
            Clock::Manual(nanos) => {
                let by = u64::try_from(by.as_nanos()).unwrap();
                nanos.fetch_add(by, std::sync::atomic::Ordering::SeqCst);
            }
            Clock::System => panic!("the system clock is not moved by tests"),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android", target_vendor = "apple"))]
fn system_now() -> Moment {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const COUNTS_SUSPEND: libc::clockid_t = libc::CLOCK_BOOTTIME;
    #[cfg(target_vendor = "apple")]
    const COUNTS_SUSPEND: libc::clockid_t = libc::CLOCK_MONOTONIC;
    let mut at = std::mem::MaybeUninit::<libc::timespec>::uninit();
    // SAFETY: `at` is a timespec for clock_gettime to write; it is read only if the call says
    // it did. The clock exists on every kernel Rust supports (Linux 2.6.39, macOS 10.12).
    let read = unsafe { libc::clock_gettime(COUNTS_SUSPEND, at.as_mut_ptr()) };
    assert_eq!(read, 0, "clock_gettime of the boot clock failed");
    // SAFETY: written by the successful call above.
    let at = unsafe { at.assume_init() };
    let seconds = u64::try_from(at.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(at.tv_nsec).unwrap_or(0);
    Moment(seconds.saturating_mul(1_000_000_000).saturating_add(nanos))
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
fn system_now() -> Moment {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let elapsed = ORIGIN.get_or_init(std::time::Instant::now).elapsed();
    Moment(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_moves_forward() {
        let clock = Clock::System;
        let first = clock.now();
        std::thread::sleep(Duration::from_millis(20));
        let moved = clock.now().saturating_duration_since(first);
        assert!(moved >= Duration::from_millis(20), "{moved:?}");
    }

    #[test]
    fn moments_saturate_rather_than_panic() {
        let start = Moment::from_nanos(5);
        assert_eq!((start + Duration::MAX).nanos(), u64::MAX);
        assert_eq!((start - Duration::from_secs(1)).nanos(), 0);
        assert_eq!(
            start.saturating_duration_since(Moment::from_nanos(9)),
            Duration::ZERO
        );
    }
}
