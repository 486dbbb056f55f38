//! Failed authentications are limited per client address: past the budget (default 300 a minute),
//! every request from that address answers 429 until the bucket refills, before any credential is
//! looked at. Secrets cannot be guessed at speed, and an honest client with a stale token is not
//! locked out for longer than the refill takes.

use crate::app::App;
use crate::error::AppError;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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

    fn blocked_for(&self, ip: IpAddr) -> Option<Duration> {
        let blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let until = *blocked.get(&ip)?;
        until.checked_duration_since(Instant::now())
    }

    fn record_failure(&self, ip: IpAddr) {
        if let Err(not_until) = self.failures.check_key(&ip) {
            let wait = not_until.wait_time_from(self.clock.now());
            let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
            blocked.insert(ip, Instant::now() + wait);
            tracing::warn!(client.ip = %ip, retry_after_ms = wait.as_millis() as u64, "too many failed authentications; refusing this address for a while");
        }
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

/// Refuses blocked addresses up front and counts every 401 answered; runs inside `observe`.
pub(crate) async fn limit_failed_authentications(
    app: &App,
    request: Request,
    next: Next,
) -> Response {
    let Some(limiter) = app.inner().failed_auth.as_ref() else {
        return next.run(request).await;
    };
    // Operations endpoints never authenticate: a load balancer's health checks keep working.
    if matches!(
        request.uri().path(),
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json" | "/docs"
    ) {
        return next.run(request).await;
    }
    let Some(ip) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
    else {
        return next.run(request).await;
    };
    if let Some(wait) = limiter.blocked_for(ip) {
        let retry_after_secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return crate::error::render_for_path(
            request.uri().path(),
            AppError::RateLimited { retry_after_secs },
        );
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        limiter.record_failure(ip);
    }
    response
}
