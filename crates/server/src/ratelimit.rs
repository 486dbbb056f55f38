//! Token buckets (governor's GCRA) keyed by who is charged: the management API's per-principal
//! limit (credential or user id), the public revocation endpoint's per-address limit and its
//! budget over all addresses (keyed by `()`).

use crate::error::AppError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

pub(crate) struct KeyedRateLimiter<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    clock: DefaultClock,
}

/// The management API's limit, per principal.
pub(crate) type CredentialRateLimiter = KeyedRateLimiter<uuid::Uuid>;

/// The management API's limit per organization, over all its credentials.
pub(crate) type TenantRateLimiter = KeyedRateLimiter<keyplane_core::TenantId>;

/// A tenant's burst: a tenth of a minute's budget, at least 1 (a burst of a whole minute's budget
/// would let one client take it at once).
pub(crate) fn tenant_burst(per_minute: u32) -> u32 {
    (per_minute / 10).max(1)
}

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K> {
    /// `None` when `per_minute` is 0 (off). `burst` is held to `1..=per_minute`; `serve` refuses
    /// any other `--rate-limit-burst`.
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

    pub fn check(&self, key: K) -> Result<(), AppError> {
        self.take(key).map_err(|wait| AppError::RateLimited {
            retry_after_secs: crate::error::retry_after_secs(wait),
        })
    }

    /// Takes one from `key`'s bucket, or tells how long until it has one.
    pub fn take(&self, key: K) -> Result<(), Duration> {
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets keys whose buckets are full again, so memory stays bounded.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}
