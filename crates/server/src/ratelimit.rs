//! The management API's per-principal token bucket (governor's GCRA, keyed by credential or user id).

use crate::error::AppError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

pub(crate) struct CredentialRateLimiter {
    limiter: DefaultKeyedRateLimiter<uuid::Uuid>,
    clock: DefaultClock,
}

impl CredentialRateLimiter {
    /// `None` when `per_minute` is 0 (off).
    pub fn new(per_minute: u32, burst: u32) -> Option<Self> {
        let per_minute = NonZeroU32::new(per_minute)?;
        let burst = NonZeroU32::new(burst.clamp(1, per_minute.get())).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_secs(60) / per_minute.get();
        let quota = Quota::with_period(period)?.allow_burst(burst);
        Some(Self {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        })
    }

    pub fn check(&self, principal: uuid::Uuid) -> Result<(), AppError> {
        self.limiter.check_key(&principal).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            AppError::RateLimited {
                retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }

    /// Forgets credentials whose buckets are full again, so memory stays bounded.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}
