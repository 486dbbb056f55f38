//! Verify keyplane credentials inside a Rust service, without a network hop per request.
//!
//! [`Verifier::verify`] checks a presented token's format and CRC32 locally (garbage never leaves
//! the process), answers from a cache keyed by a keyed hash of the token (never the token itself),
//! and on a miss asks keyplane
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

use keyplane_core::{CacheKey, CacheKeyer, CredentialKind};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
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
    /// The credential's `exp` on the monotonic clock, so that a cache hit reads one clock.
    expires: Option<Instant>,
}

/// The cached answers, with an index by credential so that an event drops that credential's
/// answers without scanning the others. Every change to `entries` goes through the methods
/// below, which keep the index equal to the accepted entries' keys.
#[derive(Default)]
struct Cache {
    entries: HashMap<CacheKey, Entry>,
    /// Credential id -> the keys of its accepted answers: one secret, two during a rotation's
    /// grace period, so a short list. Refusals name no credential and are not indexed.
    by_credential: HashMap<String, Vec<CacheKey>>,
    /// Bumped by every invalidation: an answer fetched across one is not cached.
    generation: u64,
    /// Credentials changed in the last [`RECENT`]: their answers are not cached yet, since the
    /// replica answering an introspection may hear of the change a moment after the stream's.
    recent: HashMap<String, Instant>,
    /// `recent`'s insertions in time order, so pruning it costs what it drops, not its size.
    recent_order: VecDeque<(Instant, String)>,
}

const RECENT: Duration = Duration::from_secs(2);

impl Cache {
    fn insert(&mut self, key: CacheKey, entry: Entry) {
        // Unindexes the answer it replaces, whichever credential that one named.
        self.remove(&key);
        if let Some(identity) = &entry.identity {
            self.by_credential
                .entry(identity.credential_id.clone())
                .or_default()
                .push(key);
        }
        self.entries.insert(key, entry);
    }

    /// Inserts, first making room if the cache holds `max` answers.
    fn admit(&mut self, key: CacheKey, entry: Entry, max: usize) {
        if self.entries.len() >= max && !self.entries.contains_key(&key) {
            self.make_room(max);
        }
        self.insert(key, entry);
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(Entry {
            identity: Some(identity),
            ..
        }) = self.entries.remove(key)
        {
            self.unindex(&identity.credential_id, key);
        }
    }

    fn unindex(&mut self, credential_id: &str, key: &CacheKey) {
        if let Some(keys) = self.by_credential.get_mut(credential_id) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_credential.remove(credential_id);
            }
        }
    }

    /// Drops the answers about `credential_id`: as many map operations as it has answers.
    fn drop_credential(&mut self, credential_id: &str) {
        for key in self.by_credential.remove(credential_id).unwrap_or_default() {
            self.entries.remove(&key);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.by_credential.clear();
    }

    /// Frees a tenth of `max`: expired entries first, then arbitrary ones. Freeing a tenth at
    /// once, not just one slot, keeps the scan this costs to once per `max / 10` insertions.
    fn make_room(&mut self, max: usize) {
        let target = max.saturating_sub(max / 10 + 1);
        let now = Instant::now();
        let expired: Vec<CacheKey> = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.until <= now)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            self.remove(&key);
        }
        let excess = self.entries.len().saturating_sub(target);
        let arbitrary: Vec<CacheKey> = self.entries.keys().take(excess).copied().collect();
        for key in arbitrary {
            self.remove(&key);
        }
    }

    fn note_recent(&mut self, credential_id: &str, now: Instant) {
        self.prune_recent(now);
        self.recent.insert(credential_id.to_string(), now);
        self.recent_order
            .push_back((now, credential_id.to_string()));
    }

    /// Forgets the changes older than [`RECENT`]; called on every event and every insertion, so
    /// `recent` holds at most the last [`RECENT`]'s changes whatever the traffic.
    fn prune_recent(&mut self, now: Instant) {
        while let Some((at, _)) = self.recent_order.front() {
            if now.duration_since(*at) < RECENT {
                break;
            }
            let (at, id) = self.recent_order.pop_front().expect("a front element");
            // A later change of the same credential keeps it recent.
            if self.recent.get(&id) == Some(&at) {
                self.recent.remove(&id);
            }
        }
    }

    fn is_recent(&self, credential_id: &str, now: Instant) -> bool {
        self.recent
            .get(credential_id)
            .is_some_and(|at| now.duration_since(*at) < RECENT)
    }
}

struct Inner {
    config: VerifierConfig,
    http: reqwest::Client,
    introspect_url: String,
    cache: Mutex<Cache>,
    /// The cache's keys: a keyed hash of the token, never the token itself.
    keys: CacheKeyer,
    counters: Counters,
    /// The origin of `last_contact`.
    started: Instant,
    /// When the stream last delivered anything (an event or a heartbeat), in nanoseconds after
    /// `started` plus one; 0: never. An atomic, not a lock: every verify reads it.
    last_contact: AtomicU64,
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
            keys: CacheKeyer::random(),
            counters: Counters::default(),
            started: Instant::now(),
            last_contact: AtomicU64::new(0),
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
        let kind = keyplane_core::token::kind_of(token).map_err(|_| VerifyError::Malformed)?;
        // Robot secrets log in to the registry only; keyplane would say inactive.
        if kind == CredentialKind::RobotAccount {
            return Err(VerifyError::Inactive);
        }
        let key = self.inner.keys.key(token);
        let counters = &self.inner.counters;
        let now = Instant::now();
        if self.inner.is_stale_at(now) {
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
        if let Some(cached) = self.cached(&key, now) {
            counters.cache_hits.fetch_add(1, Relaxed);
            return cached;
        }
        self.introspect(token, key, true).await
    }

    fn cached(&self, key: &CacheKey, now: Instant) -> Option<Result<Arc<Identity>, VerifyError>> {
        let cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.entries.get(key)?;
        if entry.until <= now {
            return None;
        }
        Some(match &entry.identity {
            Some(identity) if entry.expires.is_none_or(|exp| now < exp) => Ok(identity.clone()),
            Some(_) | None => Err(VerifyError::Inactive),
        })
    }

    async fn introspect(
        &self,
        token: &str,
        key: CacheKey,
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
            let now = Instant::now();
            cache.prune_recent(now);
            let recent = identity
                .as_ref()
                .is_some_and(|i| cache.is_recent(&i.credential_id, now));
            // An invalidation while the question was out may concern this very answer.
            if cache.generation == generation && !recent {
                cache.admit(
                    key,
                    Entry {
                        expires: identity.as_ref().and_then(|i| monotonic_expiry(i, now)),
                        identity: identity.clone(),
                        until: now + ttl,
                    },
                    inner.config.max_entries,
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
        self.is_stale_at(Instant::now())
    }

    fn is_stale_at(&self, now: Instant) -> bool {
        match self.last_contact.load(Relaxed) {
            0 => true,
            heard => {
                let heard = self.started + Duration::from_nanos(heard - 1);
                now.saturating_duration_since(heard) > self.config.max_staleness
            }
        }
    }

    fn heard_from_stream(&self) {
        let since_start = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_contact.fetch_max(since_start + 1, Relaxed);
    }

    /// Drops every cached answer about `credential_id`.
    fn invalidate(&self, credential_id: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.generation += 1;
        cache.note_recent(credential_id, Instant::now());
        cache.drop_credential(credential_id);
    }

    /// Drops every cached answer.
    fn invalidate_all(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.generation += 1;
        cache.clear();
    }
}

/// When `identity` expires, on the monotonic clock as read at `now`; `None`: never. A wall-clock
/// step after this is not followed, but the answer is cached for `cache_ttl` at most.
fn monotonic_expiry(identity: &Identity, now: Instant) -> Option<Instant> {
    let seconds = u64::try_from(identity.expires_at?).unwrap_or(0);
    // Past what the clocks can hold is never, not a panic.
    let exp = UNIX_EPOCH.checked_add(Duration::from_secs(seconds))?;
    now.checked_add(exp.duration_since(SystemTime::now()).unwrap_or_default())
}

fn expired(identity: &Identity) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    identity.expires_at.is_some_and(|exp| exp <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

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

    fn identity(credential_id: &str) -> Option<Arc<Identity>> {
        Some(Arc::new(Identity {
            credential_id: credential_id.into(),
            org_id: "org".into(),
            kind: "api_token".into(),
            name: credential_id.into(),
            scopes: vec!["read".into()],
            expires_at: None,
        }))
    }

    fn entry(credential_id: Option<&str>, ttl: Duration) -> Entry {
        Entry {
            identity: credential_id.and_then(identity),
            until: Instant::now() + ttl,
            expires: None,
        }
    }

    fn key(n: u32) -> CacheKey {
        static KEYS: std::sync::LazyLock<CacheKeyer> = std::sync::LazyLock::new(CacheKeyer::random);
        KEYS.key(&n.to_string())
    }

    /// The index names exactly the accepted entries' keys, under their own credentials.
    fn assert_index_consistent(cache: &Cache) {
        let accepted = cache
            .entries
            .values()
            .filter(|e| e.identity.is_some())
            .count();
        let indexed: usize = cache.by_credential.values().map(Vec::len).sum();
        assert_eq!(indexed, accepted, "every accepted answer indexed once");
        for (credential_id, keys) in &cache.by_credential {
            assert!(!keys.is_empty(), "no empty index lists are kept");
            for key in keys {
                let named = cache.entries[key]
                    .identity
                    .as_ref()
                    .map(|i| &i.credential_id);
                assert_eq!(named, Some(credential_id));
            }
        }
    }

    fn inner() -> Inner {
        Inner {
            config: VerifierConfig::new("http://127.0.0.1:9", "unused"),
            http: reqwest::Client::new(),
            introspect_url: String::new(),
            cache: Mutex::new(Cache::default()),
            keys: CacheKeyer::random(),
            counters: Counters::default(),
            started: Instant::now(),
            last_contact: AtomicU64::new(0),
        }
    }

    #[test]
    fn an_event_drops_its_credentials_answers_and_keeps_the_others() {
        let inner = inner();
        {
            let mut cache = inner.cache.lock().unwrap();
            let hour = Duration::from_secs(3600);
            // A in its rotation's grace period: two secrets, two answers.
            cache.admit(key(1), entry(Some("A"), hour), 100);
            cache.admit(key(2), entry(Some("A"), hour), 100);
            cache.admit(key(3), entry(Some("B"), hour), 100);
            cache.admit(key(4), entry(None, hour), 100);
        }
        inner.invalidate("A");
        let cache = inner.cache.lock().unwrap();
        let left: HashSet<CacheKey> = cache.entries.keys().copied().collect();
        assert_eq!(left, HashSet::from([key(3), key(4)]));
        assert!(cache.by_credential.contains_key("B") && !cache.by_credential.contains_key("A"));
        assert!(cache.is_recent("A", Instant::now()) && !cache.is_recent("B", Instant::now()));
        assert_eq!(cache.generation, 1);
        assert_index_consistent(&cache);
    }

    #[test]
    fn eviction_expiry_and_replacement_keep_the_index_consistent() {
        let max = 50;
        let mut cache = Cache::default();
        for n in 0..5_000u32 {
            // Every third answer is already expired, every seventh a refusal.
            let ttl = if n % 3 == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(3600)
            };
            let credential = format!("c{n}");
            let named = (n % 7 != 0).then_some(credential.as_str());
            cache.admit(key(n), entry(named, ttl), max);
            assert!(cache.entries.len() <= max);
            assert!(cache.by_credential.len() <= max, "no stale index growth");
        }
        assert_index_consistent(&cache);
        // A key's answer replaced by a refusal, then by another credential's answer.
        let live = *cache
            .entries
            .iter()
            .find(|(_, e)| e.identity.is_some())
            .unwrap()
            .0;
        cache.admit(live, entry(None, Duration::from_secs(60)), max);
        assert_index_consistent(&cache);
        cache.admit(live, entry(Some("other"), Duration::from_secs(60)), max);
        assert_eq!(cache.by_credential["other"], [live]);
        assert_index_consistent(&cache);
        cache.clear();
        assert!(cache.entries.is_empty() && cache.by_credential.is_empty());
    }

    #[test]
    fn recent_changes_are_forgotten_without_insertions() {
        let mut cache = Cache::default();
        let start = Instant::now();
        // 1,000 events 10 ms apart and no introspection at all: only the last 2 s stay.
        for n in 0..1_000u64 {
            cache.note_recent(&format!("c{n}"), start + Duration::from_millis(10 * n));
        }
        assert_eq!(cache.recent.len(), 200);
        assert_eq!(cache.recent_order.len(), 200);
        // A credential changed twice stays recent until 2 s after its last change.
        let later = start + Duration::from_secs(100);
        cache.note_recent("A", later);
        cache.note_recent("A", later + Duration::from_millis(1500));
        cache.prune_recent(later + Duration::from_millis(2500));
        assert!(cache.is_recent("A", later + Duration::from_millis(2500)));
        cache.prune_recent(later + Duration::from_millis(3600));
        assert!(cache.recent.is_empty() && cache.recent_order.is_empty());
    }

    #[test]
    fn staleness_follows_the_last_contact() {
        let inner = inner();
        let max = inner.config.max_staleness;
        assert!(inner.is_stale(), "stale until the stream is heard from");
        inner.heard_from_stream();
        let heard = Instant::now();
        assert!(!inner.is_stale_at(heard));
        assert!(!inner.is_stale_at(heard + max - Duration::from_millis(1)));
        assert!(inner.is_stale_at(heard + max + Duration::from_millis(1)));
    }

    #[test]
    fn a_cached_answer_is_refused_from_its_expiry() {
        let verifier = Verifier {
            inner: Arc::new(inner()),
            _guard: Arc::new(StopOnDrop(tokio::sync::watch::channel(false).0)),
        };
        let now = Instant::now();
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let in_a_minute = Identity {
            expires_at: Some(unix_now + 60),
            ..(*identity("A").unwrap()).clone()
        };
        let expires = monotonic_expiry(&in_a_minute, now).expect("an expiry");
        assert!(
            expires > now + Duration::from_secs(58) && expires <= now + Duration::from_secs(61)
        );
        verifier.inner.cache.lock().unwrap().insert(
            key(1),
            Entry {
                identity: Some(Arc::new(in_a_minute)),
                until: now + Duration::from_secs(3600),
                expires: Some(expires),
            },
        );
        assert!(verifier.cached(&key(1), now).unwrap().is_ok());
        assert_eq!(
            verifier.cached(&key(1), expires).unwrap(),
            Err(VerifyError::Inactive)
        );
        // Expiries before the epoch are past; one at the end of time is far off, not a panic.
        let at = |exp| Identity {
            expires_at: Some(exp),
            ..(*identity("A").unwrap()).clone()
        };
        assert!(monotonic_expiry(&at(-5), now).is_some_and(|exp| exp <= now));
        let century = Duration::from_secs(100 * 365 * 86_400);
        assert!(monotonic_expiry(&at(i64::MAX), now).is_none_or(|exp| exp > now + century));
    }

    #[test]
    fn the_config_never_shows_its_token() {
        let config = VerifierConfig::new("http://keyplane", "aether_secret");
        assert!(!format!("{config:?}").contains("aether_secret"));
    }
}
