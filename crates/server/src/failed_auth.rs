//! Failed authentications are limited per client address (`client_addr`: the real client behind
//! trusted proxies; an IPv6 client's /64): past the budget (default 300 a minute), the address's failures answer 429
//! with `Retry-After` instead of 401 until the bucket refills, so a client stuck in a loop on a
//! stale or guessed secret is told to back off. The limit counts failures, not people: a request
//! with a valid credential the verification caches hold (verified on this replica within the
//! last `positive_ttl`, 30 s) is answered as usual whatever its address did, so garbage from one
//! client behind a NAT or a proxy cannot lock out the others' credentials in use. (Guessing is not
//! what this stops: secrets carry 256 random bits.)
//!
//! An address over its budget cuts the work it makes too: a secret it presents that the caches do
//! not hold is refused (429) without the store lookup (`auth::Verifier` asks
//! [`FailedAuthLimiter::is_blocked`] on a cache miss), so a flood of well-formed random secrets
//! (the checksum is public) cannot keep the store's readers busy. A valid credential not cached
//! there is refused with them until the block ends.
//!
//! A failure is a 401 answer, nothing else. In particular an introspection answering
//! `{"active": false}` is not one: its caller authenticated with `tokens:verify`, and an embedded
//! verifier re-checking revoked tokens must not be throttled into failing its own service.

use crate::app::App;
use crate::client_addr::ClientAddr;
use crate::error::{AppError, ErrorDialect};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) struct FailedAuthLimiter {
    failures: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    /// Addresses over budget, and until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl FailedAuthLimiter {
    /// `None` when `per_minute` is 0 (off).
    pub fn new(per_minute: u32) -> Option<Self> {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute)?);
        Some(Self {
            failures: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            blocked: Mutex::new(HashMap::new()),
        })
    }

    /// Charges one failure to `client`'s [`ClientAddr::limit_key`]; `Some(wait)` when it is over
    /// budget, for how long.
    fn record_failure(&self, client: ClientAddr) -> Option<Duration> {
        let ip = client.limit_key();
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(wait) = blocked
            .get(&ip)
            .and_then(|until| until.checked_duration_since(now))
        {
            return Some(wait);
        }
        let not_until = self.failures.check_key(&ip).err()?;
        let wait = not_until.wait_time_from(self.clock.now());
        blocked.insert(ip, now + wait);
        // Once per block, not per refused failure: a flood must not flood the log too.
        tracing::warn!(client.ip = %client.0, client.limit_key = %ip, retry_after_ms = wait.as_millis() as u64, "too many failed authentications from this address; its failures answer 429 for a while");
        Some(wait)
    }

    /// Whether some address may be over its budget: when none is, a verification need not
    /// describe its request to ask [`Self::is_blocked`].
    pub fn any_blocked(&self) -> bool {
        !self
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// How much longer `client`'s [`ClientAddr::limit_key`] is over its budget, if it is now: its
    /// failures answer 429 (`FailureWatch::finish`), so its secrets the caches do not hold are not
    /// looked up.
    pub fn blocked_for(&self, client: ClientAddr) -> Option<Duration> {
        let ip = client.limit_key();
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .and_then(|until| until.checked_duration_since(Instant::now()))
            .filter(|wait| !wait.is_zero())
    }

    /// Forgets addresses whose block ended and whose buckets are full again.
    pub fn prune(&self) {
        let now = Instant::now();
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, until| *until > now);
        self.failures.retain_recent();
    }
}

/// Counts a request's failed authentication against the client's address and, past the budget,
/// answers the address's failures with 429. Taken and finished by `router::Observer`.
pub(crate) struct FailureWatch {
    client: ClientAddr,
    /// The format of a refusal, picked by the request's path (when it is taken, not kept).
    dialect: ErrorDialect,
}

impl FailureWatch {
    /// `None` when the limit is off or the request came through no listener.
    pub(crate) fn of(app: &App, request: &Request, client: Option<ClientAddr>) -> Option<Self> {
        app.inner().failed_auth.as_ref()?;
        Some(Self {
            client: client?,
            dialect: ErrorDialect::of_path(request.uri().path()),
        })
    }

    pub(crate) fn finish(self, app: &App, response: Response) -> Response {
        let Some(limiter) = app.inner().failed_auth.as_ref() else {
            return response;
        };
        if response.status() != StatusCode::UNAUTHORIZED {
            return response;
        }
        match limiter.record_failure(self.client) {
            None => response,
            Some(wait) => {
                let retry_after_secs = crate::error::retry_after_secs(wait);
                self.dialect
                    .render(AppError::RateLimited { retry_after_secs })
            }
        }
    }
}
