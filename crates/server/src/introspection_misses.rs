//! Introspection's budget of store lookups that find no live credential, per caller's organization
//! (`serve --introspect-misses-per-minute`). An inactive answer is no failure of the caller's
//! (`failed_auth` does not count it), so without this a caller holding `tokens:verify` could make
//! one store lookup per well-formed random token (the checksum is public), or per revoked token of
//! its own (revoked credentials do not count against any limit and are cached for seconds only), on
//! the verification readers every organization's verifications share.
//!
//! Charged after the fact, as `failed_auth` is: a lookup of a token the verification caches do not
//! hold that the store does not know, or knows as revoked, takes one from the caller's
//! organization's bucket (an embedded verifier re-checks a revoked token once per its negative
//! cache's time, so only thousands of distinct revoked tokens a minute reach the budget). One past
//! the budget answers 429, and until the bucket refills every introspection by that organization of
//! a token the caches do not hold is refused (429) before the lookup. Tokens the caches hold, known
//! or known to be unknown, are answered as usual; a valid token not cached waits with the rest.

use crate::error::AppError;
use crate::ratelimit::KeyedRateLimiter;
use keyplane_core::TenantId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) struct IntrospectionMisses {
    misses: KeyedRateLimiter<TenantId>,
    /// Organizations that went over budget, and until when. Kept past their end until pruned, so
    /// that the log tells of a flood once, not at each refill.
    over: Mutex<HashMap<TenantId, Instant>>,
}

impl IntrospectionMisses {
    /// `None` when `per_minute` is 0 (off). A whole minute's budget may come at once.
    pub fn new(per_minute: u32) -> Option<Self> {
        Some(Self {
            misses: KeyedRateLimiter::new(per_minute, per_minute)?,
            over: Mutex::new(HashMap::new()),
        })
    }

    /// 429 while `caller`'s organization is over its budget: asked before the store lookup.
    pub fn refuse_while_over(&self, caller: TenantId) -> Result<(), AppError> {
        let over = self.over.lock().unwrap_or_else(|p| p.into_inner());
        match over
            .get(&caller)
            .and_then(|until| until.checked_duration_since(Instant::now()))
        {
            Some(wait) if !wait.is_zero() => Err(rate_limited(wait)),
            _ => Ok(()),
        }
    }

    /// Charges a lookup that found nothing to `caller`'s organization; 429 when that was one past
    /// its budget.
    pub fn charge_miss(&self, caller: TenantId) -> Result<(), AppError> {
        let Err(wait) = self.misses.take(caller) else {
            return Ok(());
        };
        let mut over = self.over.lock().unwrap_or_else(|p| p.into_inner());
        if over.insert(caller, Instant::now() + wait).is_none() {
            tracing::info!(tenant.id = %caller, retry_after_ms = wait.as_millis() as u64, "introspection of unknown tokens past the organization's budget: answering 429 without store lookups until it refills");
        }
        Err(rate_limited(wait))
    }

    /// Forgets organizations whose block ended and whose buckets are full again.
    pub fn prune(&self) {
        let now = Instant::now();
        self.over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, until| *until > now);
        self.misses.prune();
    }
}

fn rate_limited(wait: Duration) -> AppError {
    AppError::RateLimited {
        retry_after_secs: crate::error::retry_after_secs(wait),
    }
}
