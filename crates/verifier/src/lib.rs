//! Verify keyplane credentials inside a Rust service, without a network hop per request.
//!
//! [`Verifier::verify`] checks a presented token's format and CRC32 locally (garbage never leaves
//! the process), answers from a cache keyed by the token's SHA-256, and on a miss asks keyplane
//! (`POST /oauth2/introspect`, with a credential holding `tokens:verify`). A background task
//! follows keyplane's revocation stream (`GET /v1/revocations/stream`): each revoke, rotation,
//! suspension, grant change, expiry or leak of the organization drops the cached answers of that
//! credential, and a `reset` drops them all. The stream resumes with `Last-Event-ID` after a
//! disconnection, so no change is missed.
//!
//! # The staleness contract
//!
//! - While the stream is connected, a credential revoked, rotated, suspended or whose grants
//!   changed through **any** keyplane replica is refused here within the stream's delivery time:
//!   the replica serving the stream reads its organization's audit chain at once on every cache
//!   invalidation it hears of (its own writes, other replicas' through PostgreSQL NOTIFY) and at
//!   least every second, so about a second at worst, plus network.
//! - Whatever happens, a cached answer is never used once nothing has been heard from the stream
//!   (an event or a heartbeat) for longer than [`VerifierConfig::max_staleness`]: the verifier
//!   is then *stale* and applies [`StalePolicy`] — refuse everything ([`StalePolicy::FailClosed`])
//!   or ask keyplane on every request ([`StalePolicy::Recheck`]). So a change is refused here
//!   within `max_staleness` in every case. [`Verifier::metrics`] says whether it is stale.
//! - Independently, no answer is cached longer than [`VerifierConfig::cache_ttl`] (this bounds
//!   changes no event announces, such as a rotation's grace period running out), refusals for
//!   [`VerifierConfig::negative_ttl`], and no credential is accepted past its `exp`.
//!
//! The server's heartbeat interval (15 s by default) must be well below `max_staleness`.

use keyplane_core::CredentialKind;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[cfg(feature = "axum")]
mod layer;
mod sse;
mod stream;

#[cfg(feature = "axum")]
pub use layer::{VerifyLayer, VerifyService};

/// What to do once the revocation stream has been silent for longer than `max_staleness`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StalePolicy {
    /// Refuse every credential ([`VerifyError::Stale`]) until the stream is back.
    FailClosed,
    /// Ask keyplane on every request, ignoring the cache, until the stream is back.
    Recheck,
}

#[derive(Clone)]
pub struct VerifierConfig {
    /// keyplane's base URL, e.g. `https://keyplane.internal:8443`.
    pub base_url: String,
    /// A credential of the organization to verify for, holding `tokens:verify`.
    pub verify_token: String,
    /// See the staleness contract in the crate documentation.
    pub max_staleness: Duration,
    pub stale_policy: StalePolicy,
    /// How long an accepted credential's answer is kept at most.
    pub cache_ttl: Duration,
    /// How long a refusal (unknown, revoked, suspended) is kept.
    pub negative_ttl: Duration,
    /// Cached answers at most; past it, expired ones go first, then arbitrary ones.
    pub max_entries: usize,
    /// Timeout of one introspection request.
    pub request_timeout: Duration,
    /// The HTTP client to use (e.g. one trusting a private CA); default: reqwest's, with rustls.
    pub http: Option<reqwest::Client>,
}

impl VerifierConfig {
    pub fn new(base_url: impl Into<String>, verify_token: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            verify_token: verify_token.into(),
            max_staleness: Duration::from_secs(30),
            stale_policy: StalePolicy::FailClosed,
            cache_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(2),
            max_entries: 100_000,
            request_timeout: Duration::from_secs(5),
            http: None,
        }
    }
}

impl std::fmt::Debug for VerifierConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierConfig")
            .field("base_url", &self.base_url)
            .field("verify_token", &"<redacted>")
            .field("max_staleness", &self.max_staleness)
            .field("stale_policy", &self.stale_policy)
            .field("cache_ttl", &self.cache_ttl)
            .finish_non_exhaustive()
    }
}

/// A verified credential, as keyplane's introspection describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The credential id (introspection's `sub`).
    pub credential_id: String,
    pub org_id: String,
    /// `api_token` or `service_account`.
    pub kind: String,
    /// The credential's name.
    pub name: String,
    pub scopes: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub expires_at: Option<i64>,
}

impl Identity {
    /// Whether the credential holds `scope`, as forward-auth's `scope` check decides: `*` covers
    /// every scope.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == "*")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// Not a keyplane token (prefix, length, alphabet or checksum): no request was made.
    #[error("not a keyplane credential")]
    Malformed,
    /// Unknown, revoked, suspended, expired, of another organization, or a robot secret.
    #[error("the credential is not active")]
    Inactive,
    /// The revocation stream has been silent longer than `max_staleness` and the policy is
    /// [`StalePolicy::FailClosed`].
    #[error("the verifier is stale: keyplane's revocation stream is down")]
    Stale,
    /// keyplane could not be asked (unreachable, an error answer).
    #[error("keyplane is unavailable: {0}")]
    Unavailable(String),
}

/// Counters and state for monitoring, as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Metrics {
    pub accepted: u64,
    pub refused: u64,
    pub malformed: u64,
    pub cache_hits: u64,
    pub introspections: u64,
    pub introspection_errors: u64,
    /// Requests refused because the verifier was stale (FailClosed).
    pub stale_refusals: u64,
    /// Requests sent to keyplane because the verifier was stale (Recheck).
    pub stale_rechecks: u64,
    pub stream_connects: u64,
    pub stream_disconnects: u64,
    /// `revocation` events received.
    pub stream_events: u64,
    pub stream_resets: u64,
    /// The last event id (audit seq) received; 0 before the first.
    pub last_event_id: u64,
    pub stream_connected: bool,
    /// Nothing heard from the stream for longer than `max_staleness` (or never).
    pub stale: bool,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    malformed: AtomicU64,
    cache_hits: AtomicU64,
    introspections: AtomicU64,
    introspection_errors: AtomicU64,
    stale_refusals: AtomicU64,
    stale_rechecks: AtomicU64,
    stream_connects: AtomicU64,
    stream_disconnects: AtomicU64,
    stream_events: AtomicU64,
    stream_resets: AtomicU64,
    last_event_id: AtomicU64,
    stream_connected: AtomicBool,
}

struct Entry {
    /// `None`: refused.
    identity: Option<Arc<Identity>>,
    until: Instant,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], Entry>,
    /// Bumped by every invalidation: an answer fetched across one is not cached.
    generation: u64,
    /// Credentials changed in the last [`RECENT`]: their answers are not cached yet, since the
    /// replica answering an introspection may hear of the change a moment after the stream's.
    recent: HashMap<String, Instant>,
}

const RECENT: Duration = Duration::from_secs(2);

struct Inner {
    config: VerifierConfig,
    http: reqwest::Client,
    introspect_url: String,
    cache: Mutex<Cache>,
    counters: Counters,
    /// When the stream last delivered anything (an event or a heartbeat); `None`: never.
    last_contact: Mutex<Option<Instant>>,
}

/// Verifies keyplane credentials in-process. Cheap to clone; the stream task ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
    _guard: Arc<StopOnDrop>,
}

struct StopOnDrop(tokio::sync::watch::Sender<bool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

#[derive(Deserialize)]
struct Introspection {
    active: bool,
    token_type: Option<String>,
    scope: Option<String>,
    sub: Option<String>,
    org_id: Option<String>,
    username: Option<String>,
    exp: Option<i64>,
}

impl Verifier {
    /// Starts following the revocation stream (on the current tokio runtime) and returns the
    /// verifier. It is stale until the stream's first event arrives.
    pub fn new(config: VerifierConfig) -> Result<Self, reqwest::Error> {
        let http = match &config.http {
            Some(client) => client.clone(),
            None => reqwest::Client::builder().build()?,
        };
        let base = config.base_url.trim_end_matches('/').to_string();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            introspect_url: format!("{base}/oauth2/introspect"),
            http,
            config,
            cache: Mutex::new(Cache::default()),
            counters: Counters::default(),
            last_contact: Mutex::new(None),
        });
        tokio::spawn(stream::follow(
            Arc::downgrade(&inner),
            format!("{base}/v1/revocations/stream"),
            stopped,
        ));
        Ok(Self {
            inner,
            _guard: Arc::new(StopOnDrop(stop)),
        })
    }

    /// Verifies a presented credential (the bare token, without `Bearer `).
    pub async fn verify(&self, token: &str) -> Result<Arc<Identity>, VerifyError> {
        let result = self.verify_inner(token).await;
        let counters = &self.inner.counters;
        match &result {
            Ok(_) => counters.accepted.fetch_add(1, Relaxed),
            Err(VerifyError::Malformed) => counters.malformed.fetch_add(1, Relaxed),
            Err(_) => counters.refused.fetch_add(1, Relaxed),
        };
        result
    }

    async fn verify_inner(&self, token: &str) -> Result<Arc<Identity>, VerifyError> {
        let parsed = keyplane_core::token::parse(token).map_err(|_| VerifyError::Malformed)?;
        // Robot secrets log in to the registry only; keyplane would say inactive.
        if parsed.kind == CredentialKind::RobotAccount {
            return Err(VerifyError::Inactive);
        }
        let key = *parsed.hash.as_bytes();
        let counters = &self.inner.counters;
        if self.is_stale() {
            match self.inner.config.stale_policy {
                StalePolicy::FailClosed => {
                    counters.stale_refusals.fetch_add(1, Relaxed);
                    return Err(VerifyError::Stale);
                }
                StalePolicy::Recheck => {
                    counters.stale_rechecks.fetch_add(1, Relaxed);
                    return self.introspect(token, key, false).await;
                }
            }
        }
        if let Some(cached) = self.cached(&key) {
            counters.cache_hits.fetch_add(1, Relaxed);
            return cached;
        }
        self.introspect(token, key, true).await
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<Arc<Identity>, VerifyError>> {
        let cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.entries.get(key)?;
        if entry.until <= Instant::now() {
            return None;
        }
        Some(match &entry.identity {
            Some(identity) if !expired(identity) => Ok(identity.clone()),
            Some(_) | None => Err(VerifyError::Inactive),
        })
    }

    async fn introspect(
        &self,
        token: &str,
        key: [u8; 32],
        cache: bool,
    ) -> Result<Arc<Identity>, VerifyError> {
        let inner = &self.inner;
        let generation = inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        inner.counters.introspections.fetch_add(1, Relaxed);
        let answer = inner
            .http
            .post(&inner.introspect_url)
            .bearer_auth(&inner.config.verify_token)
            .form(&[("token", token)])
            .timeout(inner.config.request_timeout)
            .send()
            .await;
        let failed = |message: String| {
            inner.counters.introspection_errors.fetch_add(1, Relaxed);
            VerifyError::Unavailable(message)
        };
        let response =
            answer.map_err(|e| failed(format!("introspection failed: {}", e.without_url())))?;
        if !response.status().is_success() {
            return Err(failed(format!(
                "introspection answered {}",
                response.status()
            )));
        }
        let body: Introspection = response.json().await.map_err(|e| {
            failed(format!(
                "introspection answer unreadable: {}",
                e.without_url()
            ))
        })?;
        let identity = match body {
            Introspection {
                active: true,
                token_type: Some(kind),
                sub: Some(credential_id),
                org_id: Some(org_id),
                scope,
                username,
                exp,
            } => Some(Arc::new(Identity {
                credential_id,
                org_id,
                kind,
                name: username.unwrap_or_default(),
                scopes: scope
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect(),
                expires_at: exp,
            })),
            _ => None,
        };
        if cache {
            let ttl = match identity {
                Some(_) => inner.config.cache_ttl,
                None => inner.config.negative_ttl,
            };
            let mut cache = inner.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.recent.retain(|_, at| at.elapsed() < RECENT);
            let recent = identity
                .as_ref()
                .is_some_and(|i| cache.recent.contains_key(&i.credential_id));
            // An invalidation while the question was out may concern this very answer.
            if cache.generation == generation && !recent {
                if cache.entries.len() >= inner.config.max_entries {
                    make_room(&mut cache.entries, inner.config.max_entries);
                }
                cache.entries.insert(
                    key,
                    Entry {
                        identity: identity.clone(),
                        until: Instant::now() + ttl,
                    },
                );
            }
        }
        match identity {
            Some(identity) if !expired(&identity) => Ok(identity),
            _ => Err(VerifyError::Inactive),
        }
    }

    /// Nothing heard from the revocation stream for longer than `max_staleness`, or never.
    pub fn is_stale(&self) -> bool {
        self.inner.is_stale()
    }

    pub fn metrics(&self) -> Metrics {
        let c = &self.inner.counters;
        Metrics {
            accepted: c.accepted.load(Relaxed),
            refused: c.refused.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
            cache_hits: c.cache_hits.load(Relaxed),
            introspections: c.introspections.load(Relaxed),
            introspection_errors: c.introspection_errors.load(Relaxed),
            stale_refusals: c.stale_refusals.load(Relaxed),
            stale_rechecks: c.stale_rechecks.load(Relaxed),
            stream_connects: c.stream_connects.load(Relaxed),
            stream_disconnects: c.stream_disconnects.load(Relaxed),
            stream_events: c.stream_events.load(Relaxed),
            stream_resets: c.stream_resets.load(Relaxed),
            last_event_id: c.last_event_id.load(Relaxed),
            stream_connected: c.stream_connected.load(Relaxed),
            stale: self.is_stale(),
        }
    }
}

impl Inner {
    fn is_stale(&self) -> bool {
        let last = *self.last_contact.lock().unwrap_or_else(|p| p.into_inner());
        last.is_none_or(|at| at.elapsed() > self.config.max_staleness)
    }

    fn heard_from_stream(&self) {
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Drops every cached answer about `credential_id`.
    fn invalidate(&self, credential_id: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.generation += 1;
        cache
            .recent
            .insert(credential_id.to_string(), Instant::now());
        cache.entries.retain(|_, entry| {
            entry
                .identity
                .as_ref()
                .is_none_or(|identity| identity.credential_id != credential_id)
        });
    }

    /// Drops every cached answer.
    fn invalidate_all(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.generation += 1;
        cache.entries.clear();
    }
}

fn expired(identity: &Identity) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    identity.expires_at.is_some_and(|exp| exp <= now)
}

/// Expired entries first; if that is not enough, an arbitrary tenth.
fn make_room(entries: &mut HashMap<[u8; 32], Entry>, max: usize) {
    let now = Instant::now();
    entries.retain(|_, entry| entry.until > now);
    if entries.len() >= max {
        let drop: Vec<[u8; 32]> = entries.keys().take(max / 10 + 1).copied().collect();
        for key in drop {
            entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn garbage_is_refused_without_a_request_and_the_verifier_starts_stale() {
        // Nothing listens on port 9: no request may be needed to refuse these.
        let verifier = Verifier::new(VerifierConfig::new("http://127.0.0.1:9", "unused")).unwrap();
        for garbage in [
            "",
            "Bearer x",
            "aether_123",
            "aether_0000000000000000000000000000000000000000000000000000000000",
        ] {
            assert_eq!(verifier.verify(garbage).await, Err(VerifyError::Malformed));
        }
        let metrics = verifier.metrics();
        assert_eq!((metrics.malformed, metrics.introspections), (4, 0));
        assert!(metrics.stale && !metrics.stream_connected);
    }

    #[test]
    fn the_config_never_shows_its_token() {
        let config = VerifierConfig::new("http://keyplane", "aether_secret");
        assert!(!format!("{config:?}").contains("aether_secret"));
    }
}
