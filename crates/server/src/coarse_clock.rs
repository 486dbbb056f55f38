//! A monotonic clock at the kernel tick's resolution (1 to 10 ms), for deadlines of seconds that
//! each request reads several times (the connection's watchdog, the body deadline, the cache's
//! time to live). `CLOCK_MONOTONIC_COARSE` is a read of memory the kernel keeps current, where
//! `Instant::now` also reads and scales the CPU's time stamp counter: on the VMs measured, about
//! four times the cost (BENCHMARKS.md, "Fourth sitting"). Durations that are reported, such as a
//! request's latency, keep using `Instant`.

use std::sync::LazyLock;
use std::time::Instant;

/// Now, up to a tick early or late.
pub(crate) fn now() -> Instant {
    imp::now()
}

/// Time on this clock since an origin fixed when it is first read: for a stopwatch read often,
/// where two readings' difference is all that matters (no conversion to an `Instant`).
pub(crate) fn reading() -> std::time::Duration {
    imp::reading()
}

/// The `Instant` of a [`reading`] (up to a tick), for a deadline to wait on.
pub(crate) fn instant_at(reading: std::time::Duration) -> Instant {
    imp::instant_at(reading)
}

#[cfg(target_os = "linux")]
mod imp {
    use super::*;
    use std::time::Duration;

    /// An `Instant` and the coarse clock read together once: the two count from the same origin,
    /// so a later coarse reading converts to an `Instant` by adding what it moved since.
    static ORIGIN: LazyLock<(Instant, Duration)> = LazyLock::new(|| (Instant::now(), coarse()));

    fn coarse() -> Duration {
        let mut at = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `at` is a valid timespec to write to, and the clock is one Linux always has.
        // (libc's, not rustix's: rustix finds the vDSO itself, which crashes under valgrind.)
        let read = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut at) };
        debug_assert_eq!(read, 0, "CLOCK_MONOTONIC_COARSE is always readable");
        Duration::new(
            u64::try_from(at.tv_sec).unwrap_or_default(),
            u32::try_from(at.tv_nsec).unwrap_or_default(),
        )
    }

    pub(super) fn now() -> Instant {
        instant_at(reading())
    }

    pub(super) fn instant_at(reading: Duration) -> Instant {
        ORIGIN.0 + reading
    }

    pub(super) fn reading() -> Duration {
        coarse().saturating_sub(ORIGIN.1)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::*;

    static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

    pub(super) fn now() -> Instant {
        Instant::now()
    }

    pub(super) fn reading() -> std::time::Duration {
        ORIGIN.elapsed()
    }

    pub(super) fn instant_at(reading: std::time::Duration) -> Instant {
        *ORIGIN + reading
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn follows_the_precise_clock_within_a_tick() {
        // A tick is at most 10 ms (HZ=100); allow one either way.
        let tick = Duration::from_millis(10);
        for _ in 0..3 {
            let before = Instant::now();
            let coarse = now();
            let after = Instant::now();
            assert!(
                coarse + tick >= before,
                "{coarse:?} + {tick:?} < {before:?}"
            );
            assert!(coarse <= after + tick, "{coarse:?} > {after:?} + {tick:?}");
            std::thread::sleep(Duration::from_millis(25));
        }
        let start = now();
        std::thread::sleep(Duration::from_millis(50));
        let moved = now().duration_since(start);
        assert!(
            moved >= Duration::from_millis(30) && moved < Duration::from_secs(5),
            "{moved:?}"
        );
    }

    #[test]
    fn readings_measure_what_the_precise_clock_does_within_two_ticks() {
        let tick = Duration::from_millis(10);
        let (first, started) = (reading(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let (moved, precise) = (reading() - first, started.elapsed());
        assert!(
            moved + 2 * tick >= precise && moved <= precise + 2 * tick,
            "coarse {moved:?} against precise {precise:?}"
        );
        let (at, precise) = (instant_at(reading()), Instant::now());
        assert!(
            at + tick >= precise && at <= precise + tick,
            "{at:?} against {precise:?}"
        );
    }
}
