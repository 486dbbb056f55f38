//! Verify keyplane credentials inside a Rust service, without a network hop per request.
//!
//! [`Verifier::verify`] answers from a cache keyed by a keyed hash of the token (never the token
//! itself); on a miss it checks the token's format and CRC32 locally (garbage never leaves the
//! process), then asks keyplane
//! (`POST /oauth2/introspect`, with a credential holding `tokens:verify`). A background task
//! follows keyplane's revocation stream (`GET /v1/revocations/stream`): each revoke, rotation,
//! suspension, grant change, expiry or leak of the organization drops the cached answers of that
//! credential, and a `reset` drops them all. The stream resumes with `Last-Event-ID` after a
//! disconnection, so no change is missed; its ids also name their event's chain hash
//! (`?ids=seq_hash`), so a resumption after keyplane's audit trail went back and grew again (a
//! failover, a restore) is told `reset` rather than resumed on events it never saw.
//!
//! # The staleness contract
//!
//! - While the stream is connected and up to date, a credential revoked, rotated, suspended or
//!   whose grants changed through **any** keyplane replica is refused here within the stream's
//!   delivery time: the replica serving the stream reads its organization's audit chain at once
//!   on every cache invalidation it hears of (its own writes, other replicas' through PostgreSQL
//!   NOTIFY) and at least every second, so about a second at worst, plus network.
//! - The stream counts as heard from only when it is up to date: on a heartbeat (sent right after
//!   the server read the chain's head), or on an event once this connection has delivered the
//!   events up to the head its `ready` named. A resumed stream that keeps ending before the events
//!   it missed arrive is therefore not heard from at all.
//! - Whatever happens, a cached answer is never used once nothing has been heard from the stream
//!   for longer than [`VerifierConfig::max_staleness`]: the verifier is then *stale* and applies
//!   [`StalePolicy`] — refuse everything ([`StalePolicy::FailClosed`]) or ask keyplane on every
//!   request ([`StalePolicy::Recheck`]). So a change is refused here within `max_staleness` in
//!   every case. [`Verifier::metrics`] says whether it is stale.
//! - The replica answering an introspection may not have heard of a change the stream delivered.
//!   A revoke (or a leak, until the credential is resumed) is remembered for
//!   [`VerifierConfig::revocation_memory`] (330 s, the longest a replica may answer from its cache
//!   under keyplane's defaults) and an answer still calling that credential active is refused;
//!   answers about a credential with any other change in the last 5 s are used but not cached.
//! - An answer keyplane marks unconfirmed (`X-Keyplane-Stale`: the replica answered from its
//!   cache because its store could not be read) is never cached, and is refused
//!   ([`VerifyError::Unavailable`]) for a credential the stream named within
//!   `revocation_memory`, or for any credential within `revocation_memory` of a `reset`: it may
//!   predate a suspension, rotation or grant change made through another replica.
//! - Independently, no answer is cached longer than [`VerifierConfig::cache_ttl`] (this bounds
//!   changes no event announces), refusals for [`VerifierConfig::negative_ttl`], and no credential
//!   is accepted past its `exp` (for a previous secret, its grace end: a rotation's grace period
//!   running out needs no event).
//! - These ages count a suspend of the host (CLOCK_BOOTTIME on Linux): after a sleep, an answer
//!   whose credential expired meanwhile is refused, and a stream silent all along is stale.
//!
//! The server's heartbeat interval (15 s by default) must be under half of `max_staleness`
//! (a warning is logged otherwise): one late heartbeat would make the verifier stale.
//!
//! After a failed attempt or an ended connection the stream is tried again after 100 ms,
//! doubling with each failure in a row up to half of `max_staleness` (at most 30 s), of which a
//! random half or more; never sooner than keyplane's `Retry-After` (believed up to 30 s). A
//! connection that caught up resets that count. The wait does not weaken the contract above,
//! which counts from the stream's last contact; it only delays recovery.
//! [`Verifier::last_stream_error`] says why the stream last failed: a 401 or 403 is a verify
//! token keyplane refuses, which waiting will not mend.
//!
//! # Using it
//!
//! Create one [`Verifier`] per organization at start (within a tokio runtime: it follows the
//! stream on it) and clone it where needed; clones share the cache and the stream.
//!
//! ```no_run
//! use keyplane_verifier::{Verifier, VerifierConfig, VerifyError};
//!
//! # async fn example(presented: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let config = VerifierConfig::new(
//!     "https://keyplane.internal:8443",
//!     std::env::var("KEYPLANE_VERIFY_TOKEN")?,
//! );
//! let verifier = Verifier::new(config)?;
//! match verifier.verify(presented).await {
//!     Ok(identity) if identity.has_scope("deploy") => { /* allowed */ }
//!     Ok(_) => { /* authenticated, not allowed: 403 */ }
//!     Err(VerifyError::Malformed | VerifyError::Inactive) => { /* 401 */ }
//!     Err(_) => { /* cannot verify now (stale, keyplane unavailable): 503 */ }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! With the `axum` feature, `VerifyLayer` does this for each request: a handler behind it reads
//! the identity as `Extension<Arc<Identity>>`. (`Extension<Identity>` compiles too, but the
//! layer inserts an `Arc<Identity>`, so every request would fail with a 500 at run time.)
//!
//! # Memory
//!
//! The cache holds at most [`VerifierConfig::max_entries`] answers (a few hundred bytes each).
//! The changes the stream told of are remembered for `revocation_memory` in three memories
//! (revokes, leaks, every change), each holding at most 100,000 mentions of about 200 bytes: 60
//! MB at worst, reached only by that many changes within the window.

#![warn(missing_docs)]

use clock::{Clock, Moment};
pub use keyplane_core::legacy_token::LegacyPrefixes;
use keyplane_core::{CacheKey, CacheKeyer, CredentialKind};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod clock;
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
    /// Ask keyplane on every request, ignoring the cache, until the stream is back (verifies of
    /// one token at the same moment share one question).
    Recheck,
}

/// How a [`Verifier`] reaches keyplane and how long it trusts what it heard. Start from
/// [`VerifierConfig::new`] and set the fields to change.
#[derive(Clone)]
#[non_exhaustive]
pub struct VerifierConfig {
    /// keyplane's base URL, e.g. `https://keyplane.internal:8443`.
    pub base_url: String,
    /// A credential of the organization to verify for, holding `tokens:verify`.
    pub verify_token: String,
    /// See the staleness contract in the crate documentation. Default 30 s; at least twice
    /// keyplane's heartbeat interval (15 s by default).
    pub max_staleness: Duration,
    /// What to do once stale. Default [`StalePolicy::FailClosed`].
    pub stale_policy: StalePolicy,
    /// How long an accepted credential's answer is kept at most. Default 60 s.
    pub cache_ttl: Duration,
    /// How long a refusal (unknown, revoked, suspended) is kept. Default 2 s.
    pub negative_ttl: Duration,
    /// How long a revoke (or a leak, until the credential is resumed) the stream delivered is
    /// remembered, refusing any introspection answer that still calls the credential active. It
    /// must cover how long a keyplane replica may answer from a cache loaded before the revoke:
    /// a replica cut off from its database answers up to 30 s (its cache lifetime) +
    /// `--stale-if-error-seconds` after loading. Default 330 s, for keyplane's default of 300;
    /// raise it with that flag.
    pub revocation_memory: Duration,
    /// Cached answers at most (threads inserting at once may pass it by one each); default
    /// 100,000. Past it, the inserting answer's shard (a sixteenth of the cache) frees a tenth of
    /// itself, expired answers first, then refusals, then (for an accepted answer only)
    /// arbitrary ones: a flood of made-up tokens never evicts a valid credential's answer (a
    /// refusal that finds no room is not cached).
    pub max_entries: usize,
    /// How long a verify waits for keyplane at most, queueing for an introspection slot (see
    /// `max_concurrent_introspections`) included; then it answers [`VerifyError::Unavailable`].
    /// Also how long connecting to the stream may take. Default 5 s.
    pub request_timeout: Duration,
    /// Introspections in flight at most (default 64): past it, a verify that must ask keyplane
    /// waits for one to end, within its `request_timeout`. Verifies of one token that miss the
    /// cache at once share one introspection, so this bounds what a flood of distinct made-up
    /// (well-formed) tokens can make keyplane do.
    pub max_concurrent_introspections: usize,
    /// The HTTP client to use (e.g. one trusting a private CA); default: reqwest's, with rustls,
    /// following no redirect. A client given here:
    /// - must not follow redirects (`.redirect(reqwest::redirect::Policy::none())`): on a 307
    ///   or 308 it would re-send the introspection's form body, the caller's credential, to the
    ///   redirect's target;
    /// - must have no client-wide timeout (`ClientBuilder::timeout`): it bounds a whole
    ///   response, and would cut the stream, which stays open (`request_timeout` bounds each
    ///   introspection, and a silent stream is noticed without it);
    /// - and if it goes through a proxy, that proxy must pass `text/event-stream` through
    ///   unbuffered: one holding heartbeats back makes the verifier stale.
    pub http: Option<reqwest::Client>,
    /// Keys imported into keyplane from another system, accepted under these prefixes as
    /// keyplane's `serve --legacy-token-prefix` accepts them (build it with
    /// [`LegacyPrefixes::parse`] from the same `PREFIX=KIND` specs): asked only about a token
    /// that is not in keyplane's format, which is otherwise refused here without a question to
    /// keyplane. Default: none.
    pub legacy_token_prefixes: LegacyPrefixes,
}

impl VerifierConfig {
    /// A configuration with the defaults documented on each field, for keyplane at `base_url`
    /// with `verify_token`.
    pub fn new(base_url: impl Into<String>, verify_token: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            verify_token: verify_token.into(),
            max_staleness: Duration::from_secs(30),
            stale_policy: StalePolicy::FailClosed,
            cache_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(2),
            revocation_memory: Duration::from_secs(30 + 300),
            max_entries: 100_000,
            request_timeout: Duration::from_secs(5),
            max_concurrent_introspections: 64,
            http: None,
            legacy_token_prefixes: LegacyPrefixes::default(),
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
            .field("negative_ttl", &self.negative_ttl)
            .field("revocation_memory", &self.revocation_memory)
            .field("max_entries", &self.max_entries)
            .field("request_timeout", &self.request_timeout)
            .field(
                "max_concurrent_introspections",
                &self.max_concurrent_introspections,
            )
            .field("http", &self.http.as_ref().map(|_| "<caller's client>"))
            .field("legacy_token_prefixes", &self.legacy_token_prefixes)
            .finish()
    }
}

/// Why [`Verifier::new`] refused to start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `base_url` is not an absolute `http` or `https` URL.
    #[error("base_url must be an http or https URL: {0}")]
    BaseUrl(String),
    /// A setting that must be above zero (named) is zero.
    #[error("{0} must be above zero")]
    Zero(&'static str),
    /// [`Verifier::new`] was called outside a tokio runtime: it spawns the task following the
    /// revocation stream on the caller's runtime.
    #[error("Verifier::new must be called within a tokio runtime")]
    NoRuntime,
    /// The default HTTP client could not be built.
    #[error("the HTTP client cannot be built")]
    Http(#[source] reqwest::Error),
}

/// A verified credential, as keyplane's introspection describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The credential id (introspection's `sub`).
    pub credential_id: String,
    /// The organization the credential belongs to (the verify token's).
    pub org_id: String,
    /// `api_token` or `service_account`.
    pub kind: String,
    /// The credential's name.
    pub name: String,
    /// The credential's scopes; see [`Identity::has_scope`].
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

/// Why [`Verifier::verify`] did not accept a credential. `Malformed` and `Inactive` are the
/// caller's (401); `Stale` and `Unavailable` are the verifier's (503: try again later).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not a keyplane token (prefix, length, alphabet or checksum): no request was made.
    #[error("not a keyplane credential")]
    Malformed,
    /// Unknown, revoked, suspended, expired, of another organization, or a robot secret.
    #[error("the credential is not active")]
    Inactive,
    /// Nothing up to date has been heard from the revocation stream for longer than
    /// `max_staleness` and the policy is [`StalePolicy::FailClosed`]. The text says why, as far
    /// as the verifier knows ([`Verifier::last_stream_error`]): keyplane unreachable, or
    /// refusing the verify token, which waiting will not mend.
    #[error("the verifier is stale, nothing up to date heard from keyplane's revocation stream within max_staleness: {0}")]
    Stale(String),
    /// keyplane could not be asked, or not in time (unreachable, an error answer, no
    /// introspection slot free within `request_timeout`), or answered from a stale cache about
    /// a credential changed lately.
    #[error("keyplane is unavailable: {0}")]
    Unavailable(String),
}

/// Why the revocation stream last failed or ended ([`Verifier::last_stream_error`]). It names
/// no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
#[non_exhaustive]
pub struct StreamError {
    /// The HTTP status given instead of the stream, if one was: 401 or 403 mean the verify
    /// token is not live or lacks `tokens:verify` (a misconfiguration, not an outage), 429 that
    /// keyplane had no stream slot free.
    pub status: Option<u16>,
    /// What happened, for a person.
    pub reason: String,
}

/// Counters (since the verifier started) and state for monitoring, as plain numbers. Each
/// verify counts once in `accepted`, `refused` or `malformed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Metrics {
    /// Verifies that accepted the credential, from the cache or not.
    pub accepted: u64,
    /// Verifies that refused a well-formed credential: inactive, but also every stale refusal
    /// (`stale_refusals`) and every verify keyplane could not answer ([`VerifyError::Stale`],
    /// [`VerifyError::Unavailable`]).
    pub refused: u64,
    /// Verifies of something that is not a keyplane credential (no request was made).
    pub malformed: u64,
    /// Verifies answered from the cache (accepted or refused).
    pub cache_hits: u64,
    /// Introspection requests sent to keyplane (one per miss, shared by the verifies of one
    /// token that miss at once).
    pub introspections: u64,
    /// Introspections that gave no usable answer (keyplane unreachable, an error answer, an
    /// unreadable body, an unconfirmed answer about a credential changed lately), and verifies
    /// that found no introspection slot within `request_timeout`.
    pub introspection_errors: u64,
    /// Requests refused because the verifier was stale ([`StalePolicy::FailClosed`]); also
    /// counted in `refused`.
    pub stale_refusals: u64,
    /// Requests sent to keyplane because the verifier was stale ([`StalePolicy::Recheck`]).
    pub stale_rechecks: u64,
    /// Stream connections keyplane accepted (a 200 event stream).
    pub stream_connects: u64,
    /// Stream connections that ended, and attempts that failed (refused, unreachable, not an
    /// event stream): it grows while keyplane is unreachable, by one per attempt.
    pub stream_disconnects: u64,
    /// `revocation` events received.
    pub stream_events: u64,
    /// `reset` events received, and resumptions whose `Last-Event-ID` keyplane refused (every
    /// cached answer dropped).
    pub stream_resets: u64,
    /// Resumptions whose `Last-Event-ID` keyplane answered 400: a `<seq>-<tag>` id refused by
    /// a keyplane from before tagged ids (a rollback, a newer replica beside older ones) is
    /// retried at once as its bare seq; a bare seq refused, at once without an id (a fresh
    /// start). Either way every cached answer is dropped (counted in `stream_resets` too): a
    /// bare seq cannot tell a history that went back.
    pub stream_ids_refused: u64,
    /// The audit seq of the last event id received; 0 before the first.
    pub last_event_id: u64,
    /// A stream connection is open; it may still be catching up (`stale` says whether the
    /// verifier is up to date).
    pub stream_connected: bool,
    /// Nothing heard from the stream for longer than `max_staleness` (or never).
    pub stale: bool,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    malformed: AtomicU64,
    introspections: AtomicU64,
    introspection_errors: AtomicU64,
    stale_refusals: AtomicU64,
    stale_rechecks: AtomicU64,
    stream_connects: AtomicU64,
    stream_disconnects: AtomicU64,
    stream_events: AtomicU64,
    stream_resets: AtomicU64,
    stream_ids_refused: AtomicU64,
    last_event_id: AtomicU64,
    stream_connected: AtomicBool,
}

struct Entry {
    /// `None`: refused.
    identity: Option<Arc<Identity>>,
    /// The end of its `cache_ttl` (or `negative_ttl`), on [`Clock`], which counts a suspend.
    until: Moment,
    /// The credential's `exp` on [`Clock`], so that a cache hit reads one clock.
    expires: Option<Moment>,
}

/// A verify's outcome, and whether the cache answered it (then its shard counted it).
enum Answer {
    Cached(Result<Arc<Identity>, VerifyError>),
    Fresh(Result<Arc<Identity>, VerifyError>),
}

/// One shard of the cached answers, with an index by credential so that an event drops that
/// credential's answers without scanning the others. Every change to `entries` goes through the
/// methods below, which keep the index equal to the accepted entries' keys.
#[derive(Default)]
struct Cache {
    entries: HashMap<CacheKey, Entry>,
    /// Credential id -> the keys of its accepted answers: one secret, two during a rotation's
    /// grace period, so a short list. Refusals name no credential and are not indexed.
    by_credential: HashMap<String, Vec<CacheKey>>,
    /// Verifies answered from this shard, and how many of them accepted: counted under the
    /// shard's lock, so a cache hit writes no memory other threads' hits write.
    hits: u64,
    accepted_hits: u64,
    /// How many of `entries` are refusals.
    refusals: usize,
    /// No answer in `entries` expires before this (a lower bound: exact after `make_room`
    /// looked through the shard, lowered by each insertion); `None`: unknown.
    soonest_expiry: Option<Moment>,
    /// How many times `make_room` looked through the shard.
    #[cfg(test)]
    scans: usize,
}

/// The cache is split by key into this many shards, each behind its own lock: threads verifying
/// different credentials neither wait for each other nor write to a shared cache line. (One lock
/// made two threads verify fewer credentials per second than one: BENCHMARKS.md, "Eighteenth
/// sitting".)
const SHARDS: usize = 16;

/// A shard on cache lines of its own (128 bytes: adjacent-line prefetching pairs 64-byte lines).
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Cache>);

/// Credentials the stream named lately, each remembered for `window` after its last mention,
/// and at most `max` mentions at once (past that, the oldest are forgotten first).
struct Memory {
    window: Duration,
    max: usize,
    /// Credential id -> when it was last noted, and that note's number.
    at: HashMap<String, (Instant, u64)>,
    /// The notes in time order, so pruning costs what it drops, not the memory's size.
    order: VecDeque<(Instant, u64, String)>,
    /// Numbers the notes: a later note of the same credential outlives the earlier one's entry
    /// in `order`, even at the same instant.
    notes: u64,
}

/// What the stream said lately that an introspection answer must be weighed against.
struct Changes {
    /// Revokes (final), for `revocation_memory`: an answer calling one active is refused.
    revoked: Memory,
    /// Leaks, as `revoked` until the credential is resumed: the stream does not say whether
    /// the organization's policy revoked the credential or suspended it, and both refuse.
    leaked: Memory,
    /// Every change, for `revocation_memory` (and at least [`RECENT`]): answers about those of
    /// the last [`RECENT`] are not cached yet, and an unconfirmed answer (a replica answering
    /// from its cache, its store unreadable) about any may predate the change.
    changed: Memory,
    /// The last `reset`: the changes since the last event id are unknown.
    reset_at: Option<Instant>,
}

/// How long after a change of a credential its introspection answers are not cached: the
/// replica answering may hear of the change after the stream's replica. Through PostgreSQL
/// NOTIFY that is milliseconds, and a replica whose listener stalls notices within about 4 s
/// (1 s self-heartbeat, 3 s to miss it) and reloads; 5 s covers that, from the event's arrival
/// here, which is after the commit. A revoke is not merely left uncached: see `revocation_memory`.
const RECENT: Duration = Duration::from_secs(5);

/// Mentions each [`Memory`] keeps at most: about 200 bytes each (the id twice, in `at` and
/// `order`), so 20 MB at worst per memory and 60 MB for the three of [`Changes`], reached only
/// by as many changes within `revocation_memory`.
const MAX_REMEMBERED: usize = 100_000;

impl Cache {
    /// Inserts, replacing the key's answer if any; returns how many answers were added (0 or 1).
    fn insert(&mut self, key: CacheKey, entry: Entry) -> usize {
        // Unindexes the answer it replaces, whichever credential that one named.
        let replaced = self.remove(&key);
        match &entry.identity {
            Some(identity) => self
                .by_credential
                .entry(identity.credential_id.clone())
                .or_default()
                .push(key),
            None => self.refusals += 1,
        }
        self.soonest_expiry = self.soonest_expiry.map(|at| at.min(entry.until));
        self.entries.insert(key, entry);
        1 - replaced
    }

    /// Returns how many answers were removed (0 or 1).
    fn remove(&mut self, key: &CacheKey) -> usize {
        match self.entries.remove(key) {
            Some(Entry {
                identity: Some(identity),
                ..
            }) => {
                self.unindex(&identity.credential_id, key);
                1
            }
            Some(_) => {
                self.refusals -= 1;
                1
            }
            None => 0,
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
    /// Returns how many were dropped.
    fn drop_credential(&mut self, credential_id: &str) -> usize {
        let keys = self.by_credential.remove(credential_id).unwrap_or_default();
        for key in &keys {
            self.entries.remove(key);
        }
        keys.len()
    }

    /// Returns how many answers were dropped.
    fn clear(&mut self) -> usize {
        let dropped = self.entries.len();
        self.entries.clear();
        self.by_credential.clear();
        self.refusals = 0;
        self.soonest_expiry = None;
        dropped
    }

    /// Frees a tenth of this shard (at least one answer): expired answers first, then refusals,
    /// then, only to make room for an accepted answer, arbitrary accepted ones. Anyone can mint
    /// well-formed tokens that keyplane refuses, so a flood of them may evict other refusals but
    /// never a valid credential's answer. Freeing a tenth at once, not one slot, keeps the scan
    /// this costs to once per tenth of the shard's insertions. For a refusal, the shard is not
    /// even looked through while fewer than a tenth of it are refusals and none has expired
    /// (then the refusal is not cached): else a flood of them into a shard full of live accepted
    /// answers would look through it for each, freeing nothing. Returns how many were freed.
    fn make_room(&mut self, for_refusal: bool, now: Moment) -> usize {
        let tenth = (self.entries.len() / 10).max(1);
        let none_expired = self.soonest_expiry.is_some_and(|at| now < at);
        if for_refusal && self.refusals < tenth && none_expired {
            return 0;
        }
        #[cfg(test)]
        {
            self.scans += 1;
        }
        let target = self.entries.len().saturating_sub(tenth);
        let (mut expired, mut refusals) = (Vec::new(), Vec::new());
        let mut soonest: Option<Moment> = None;
        for (key, entry) in &self.entries {
            if entry.until <= now {
                expired.push(*key);
            } else {
                soonest = Some(soonest.map_or(entry.until, |at| at.min(entry.until)));
                if entry.identity.is_none() {
                    refusals.push(*key);
                }
            }
        }
        // The entries freed below only raise it: still a lower bound.
        self.soonest_expiry = soonest;
        let mut freed = 0;
        for key in expired {
            freed += self.remove(&key);
        }
        let excess = self.entries.len().saturating_sub(target);
        for key in refusals.into_iter().take(excess) {
            freed += self.remove(&key);
        }
        if !for_refusal {
            let excess = self.entries.len().saturating_sub(target);
            let arbitrary: Vec<CacheKey> = self.entries.keys().take(excess).copied().collect();
            for key in arbitrary {
                freed += self.remove(&key);
            }
        }
        freed
    }
}

impl Memory {
    fn new(window: Duration, max: usize) -> Self {
        Self {
            window,
            max,
            at: HashMap::new(),
            order: VecDeque::new(),
            notes: 0,
        }
    }

    fn note(&mut self, credential_id: &str, now: Instant) {
        self.prune(now);
        self.notes += 1;
        self.at.insert(credential_id.to_string(), (now, self.notes));
        self.order
            .push_back((now, self.notes, credential_id.to_string()));
        while self.order.len() > self.max {
            self.drop_oldest();
        }
    }

    /// The credential is no longer to be remembered (its `order` entry goes when pruned).
    fn forget(&mut self, credential_id: &str) {
        self.at.remove(credential_id);
    }

    /// Forgets the notes older than `window`; called on every event and every lookup, so `at`
    /// holds at most the last `window`'s changes whatever the traffic.
    fn prune(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.window {
                break;
            }
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        let Some((_, note, id)) = self.order.pop_front() else {
            return;
        };
        // A later note of the same credential keeps it.
        if self.at.get(&id).is_some_and(|(_, n)| *n == note) {
            self.at.remove(&id);
        }
    }

    fn contains(&self, credential_id: &str, now: Instant) -> bool {
        self.noted_within(credential_id, now, self.window)
    }

    /// Whether `credential_id` was last noted less than `window` (at most the memory's own)
    /// before `now`.
    fn noted_within(&self, credential_id: &str, now: Instant, window: Duration) -> bool {
        self.at
            .get(credential_id)
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < window)
    }
}

/// What the stream said lately about one credential, as an introspection answer sees it.
#[derive(Debug, PartialEq, Eq)]
enum Lately {
    Nothing,
    /// Changed in the last [`RECENT`]: the answer may be older than the change; not cached.
    Changed,
    /// Revoked (or leaked, not resumed since): an "active" answer is out of date.
    Revoked,
}

impl Changes {
    fn new(revocation_memory: Duration) -> Self {
        Self {
            revoked: Memory::new(revocation_memory, MAX_REMEMBERED),
            leaked: Memory::new(revocation_memory, MAX_REMEMBERED),
            changed: Memory::new(revocation_memory.max(RECENT), MAX_REMEMBERED),
            reset_at: None,
        }
    }

    /// A `reset`: whatever happened since the last event id is unknown.
    fn reset(&mut self, now: Instant) {
        self.reset_at = Some(now);
    }

    /// Whether an unconfirmed answer about `credential_id` may predate a change the stream
    /// told of (or could not tell of, across a reset) within `revocation_memory`.
    fn may_predate_a_change(&mut self, credential_id: &str, now: Instant) -> bool {
        self.changed.prune(now);
        // `revocation_memory`, the window every memory but `changed` keeps.
        let window = self.revoked.window;
        self.changed.noted_within(credential_id, now, window)
            || self
                .reset_at
                .is_some_and(|at| now.saturating_duration_since(at) < window)
    }

    /// Notes a `revocation` event's action on `credential_id`.
    fn note(&mut self, action: &str, credential_id: &str, now: Instant) {
        use keyplane_core::audit::actions::*;
        match action {
            // Final: no credential is ever un-revoked. (`authorization.revoked` is a grant
            // change: the credential stays.)
            API_TOKEN_REVOKED | SERVICE_ACCOUNT_REVOKED | ROBOT_ACCOUNT_REVOKED => {
                self.revoked.note(credential_id, now)
            }
            CREDENTIAL_LEAKED => self.leaked.note(credential_id, now),
            // A leak's suspension lifted; a revoke cannot be.
            API_TOKEN_RESUMED | SERVICE_ACCOUNT_RESUMED | ROBOT_ACCOUNT_RESUMED => {
                self.leaked.forget(credential_id)
            }
            _ => {}
        }
        self.changed.note(credential_id, now);
    }

    fn about(&mut self, credential_id: &str, now: Instant) -> Lately {
        for memory in [&mut self.changed, &mut self.revoked, &mut self.leaked] {
            memory.prune(now);
        }
        if self.revoked.contains(credential_id, now) || self.leaked.contains(credential_id, now) {
            Lately::Revoked
        } else if self.changed.noted_within(credential_id, now, RECENT) {
            Lately::Changed
        } else {
            Lately::Nothing
        }
    }
}

struct Inner {
    config: VerifierConfig,
    http: reqwest::Client,
    introspect_url: String,
    /// The cached answers, in [`SHARDS`] shards by key.
    shards: Box<[Shard]>,
    /// How many answers the shards hold together, kept to `max_entries`.
    cached: AtomicUsize,
    /// Bumped by every invalidation: an answer fetched across one is not cached.
    generation: AtomicU64,
    changes: Mutex<Changes>,
    /// The cache's keys: a keyed hash of the token, never the token itself.
    keys: CacheKeyer,
    counters: Counters,
    /// Introspections under way, by key, with the generation they started in: a miss joins
    /// its key's (see [`Flight`]) rather than asking again.
    flights: Mutex<HashMap<CacheKey, (u64, Arc<FlightAnswer>)>>,
    /// `max_staleness` was found under twice the heartbeat interval a `ready` announced, and
    /// said so (once).
    warned_of_heartbeat: AtomicBool,
    /// Why the stream last failed or ended; `None` once a connection caught up since.
    last_stream_error: Mutex<Option<StreamError>>,
    /// `max_concurrent_introspections` slots, one per introspection in flight.
    introspection_slots: tokio::sync::Semaphore,
    /// What the cache's ages and the staleness are read on ([`clock`]: a suspend counts).
    clock: Clock,
    /// When the stream last delivered anything (an event or a heartbeat): a [`Moment`]'s
    /// nanoseconds plus one; 0: never. An atomic, not a lock: every verify reads it.
    last_contact: AtomicU64,
}

/// Verifies keyplane credentials in-process. Cheap to clone; the stream task ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
    _guard: Arc<StopOnDrop>,
}

/// The configuration (its verify token redacted) and whether the verifier is stale.
impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("config", &self.inner.config)
            .field("stale", &self.is_stale())
            .finish_non_exhaustive()
    }
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
    /// Starts following the revocation stream on the current tokio runtime and returns the
    /// verifier. It is stale until the stream has caught up (its `ready` at the head, a catch-up
    /// event, or a heartbeat).
    ///
    /// # Errors
    ///
    /// [`ConfigError`]: called outside a tokio runtime; `base_url` not an `http(s)` URL;
    /// `max_staleness`, `request_timeout` or `max_concurrent_introspections` zero; the default
    /// HTTP client failing to build.
    pub fn new(config: VerifierConfig) -> Result<Self, ConfigError> {
        let positive = [
            ("max_staleness", !config.max_staleness.is_zero()),
            ("request_timeout", !config.request_timeout.is_zero()),
            (
                "max_concurrent_introspections",
                config.max_concurrent_introspections > 0,
            ),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, positive)| !positive) {
            return Err(ConfigError::Zero(name));
        }
        let url = reqwest::Url::parse(&config.base_url)
            .map_err(|e| ConfigError::BaseUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            let scheme = url.scheme();
            return Err(ConfigError::BaseUrl(format!("its scheme is {scheme}")));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        let http = match &config.http {
            Some(client) => client.clone(),
            // A redirect would re-send the introspection's form body, the caller's credential,
            // to wherever it points.
            None => reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(ConfigError::Http)?,
        };
        let base = config.base_url.trim_end_matches('/').to_string();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner::new(config, http, &base));
        runtime.spawn(stream::follow(
            Arc::downgrade(&inner),
            // Ids that name their event's chain hash: resuming after keyplane's audit trail went
            // back and grew past our last event again is then answered `reset`. keyplane from
            // before ignores the parameter and sends bare seqs.
            format!("{base}/v1/revocations/stream?ids=seq_hash"),
            stopped,
        ));
        Ok(Self {
            inner,
            _guard: Arc::new(StopOnDrop(stop)),
        })
    }

    /// Verifies a presented credential (the bare token, without `Bearer `): from the cache,
    /// else by asking keyplane (see [`VerifierConfig::request_timeout`] and
    /// [`VerifierConfig::max_concurrent_introspections`] for how long that may take).
    pub async fn verify(&self, token: &str) -> Result<Arc<Identity>, VerifyError> {
        let result = match self.verify_inner(token).await {
            Answer::Cached(result) => return result,
            Answer::Fresh(result) => result,
        };
        let counters = &self.inner.counters;
        match &result {
            Ok(_) => counters.accepted.fetch_add(1, Relaxed),
            Err(VerifyError::Malformed) => counters.malformed.fetch_add(1, Relaxed),
            Err(_) => counters.refused.fetch_add(1, Relaxed),
        };
        result
    }

    async fn verify_inner(&self, token: &str) -> Answer {
        // The format is checked on a miss only: the cache holds answers for well-formed tokens
        // alone, and a hit is decided by the key (`CacheKeyer::key_of_presented`).
        let Some(key) = self.inner.keys.key_of_presented(token) else {
            return Answer::Fresh(Err(VerifyError::Malformed));
        };
        let now = self.inner.clock.now();
        let stale = self.inner.is_stale_at(now);
        if !stale {
            if let Some(cached) = self.cached(&key, now) {
                return Answer::Cached(cached);
            }
        }
        let kind = match keyplane_core::token::kind_of(token) {
            Ok(kind) => kind,
            // Not keyplane's format: an imported key under a configured prefix, or garbage.
            Err(_) => match self.inner.config.legacy_token_prefixes.kind_of(token) {
                Some(kind) => kind,
                None => return Answer::Fresh(Err(VerifyError::Malformed)),
            },
        };
        // Robot secrets log in to the registry only; keyplane would say inactive.
        if kind == CredentialKind::RobotAccount {
            return Answer::Fresh(Err(VerifyError::Inactive));
        }
        if stale {
            let counters = &self.inner.counters;
            match self.inner.config.stale_policy {
                StalePolicy::FailClosed => {
                    counters.stale_refusals.fetch_add(1, Relaxed);
                    return Answer::Fresh(Err(VerifyError::Stale(self.inner.stale_reason())));
                }
                StalePolicy::Recheck => counters.stale_rechecks.fetch_add(1, Relaxed),
            };
        }
        // A stale verifier's answer is not cached: the stream may have missed its change.
        Answer::Fresh(self.introspect_shared(token, key, !stale).await)
    }

    /// [`Verifier::introspect`], shared by the verifies of `key` that miss at the same time: one
    /// introspection however many ask (if the one asking is dropped, one of the others asks).
    async fn introspect_shared(
        &self,
        token: &str,
        key: CacheKey,
        cache: bool,
    ) -> Result<Arc<Identity>, VerifyError> {
        let deadline = later(Instant::now(), self.inner.config.request_timeout);
        let flight = Flight::join(&self.inner, key);
        flight
            .answer()
            .get_or_init(|| self.introspect(token, key, cache, deadline))
            .await
            .clone()
    }

    /// The cached answer, counted in its shard.
    fn cached(&self, key: &CacheKey, now: Moment) -> Option<Result<Arc<Identity>, VerifyError>> {
        let mut cache = self.inner.shard(key);
        let entry = cache.entries.get(key)?;
        if entry.until <= now {
            return None;
        }
        let result = match &entry.identity {
            Some(identity) if unexpired(entry.expires, now) => Ok(identity.clone()),
            Some(_) | None => Err(VerifyError::Inactive),
        };
        cache.hits += 1;
        cache.accepted_hits += u64::from(result.is_ok());
        Some(result)
    }

    /// Asks keyplane about `token`, once one of the `max_concurrent_introspections` slots is
    /// free, and gives up at `deadline`.
    async fn introspect(
        &self,
        token: &str,
        key: CacheKey,
        cache: bool,
        deadline: Instant,
    ) -> Result<Arc<Identity>, VerifyError> {
        let inner = &self.inner;
        let failed = |message: String| {
            inner.counters.introspection_errors.fetch_add(1, Relaxed);
            VerifyError::Unavailable(message)
        };
        let slot = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline),
            inner.introspection_slots.acquire(),
        )
        .await;
        let Ok(Ok(_slot)) = slot else {
            return Err(failed(
                "too many introspections in flight for the request timeout".into(),
            ));
        };
        let generation = inner.generation.load(SeqCst);
        inner.counters.introspections.fetch_add(1, Relaxed);
        let answer = inner
            .http
            .post(&inner.introspect_url)
            .bearer_auth(&inner.config.verify_token)
            .form(&[("token", token)])
            .timeout(deadline.saturating_duration_since(Instant::now()))
            .send()
            .await;
        let response =
            answer.map_err(|e| failed(format!("introspection failed: {}", e.without_url())))?;
        if !response.status().is_success() {
            return Err(failed(format!(
                "introspection answered {}",
                response.status()
            )));
        }
        // The replica answered from its cache, its store unreadable: the answer may predate a
        // change made through another replica.
        let unconfirmed = response.headers().contains_key("x-keyplane-stale");
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
        let now = Instant::now();
        let lately = match &identity {
            Some(i) => lock(&inner.changes).about(&i.credential_id, now),
            None => Lately::Nothing,
        };
        // The stream said it is revoked: this "active" comes from a replica that has not heard
        // yet (or answers from its cache, cut off from its database). Refused, and not cached.
        if lately == Lately::Revoked {
            return Err(VerifyError::Inactive);
        }
        if unconfirmed {
            if let Some(identity) = &identity {
                if lock(&inner.changes).may_predate_a_change(&identity.credential_id, now) {
                    return Err(failed(
                        "keyplane answered from a stale cache about a credential changed lately"
                            .into(),
                    ));
                }
            }
        }
        let at = inner.clock.now();
        let expires = identity.as_ref().and_then(|i| clock_expiry(i, at));
        if cache && !unconfirmed {
            let ttl = match identity {
                Some(_) => inner.config.cache_ttl,
                None => inner.config.negative_ttl,
            };
            if lately == Lately::Nothing {
                let mut cache = inner.shard(&key);
                // An invalidation while the question was out may concern this very answer. It
                // bumps the generation before it locks the shards, so reading it under this
                // shard's lock either sees the bump or inserts before the invalidation drops.
                if inner.generation.load(SeqCst) == generation {
                    let entry = Entry {
                        expires,
                        identity: identity.clone(),
                        until: at + ttl,
                    };
                    inner.admit(&mut cache, key, entry);
                }
            }
        }
        match identity {
            Some(identity) if unexpired(expires, at) => Ok(identity),
            _ => Err(VerifyError::Inactive),
        }
    }

    /// Nothing heard from the revocation stream for longer than `max_staleness`, or never.
    pub fn is_stale(&self) -> bool {
        self.inner.is_stale()
    }

    /// Why the revocation stream last failed or ended; `None` before the first attempt ends,
    /// and again once a connection has caught up. A [`StreamError::status`] of 401 or 403 is a
    /// verify token keyplane refuses: look at this when the verifier stays stale.
    pub fn last_stream_error(&self) -> Option<StreamError> {
        lock(&self.inner.last_stream_error).clone()
    }

    /// The counters and state for monitoring; see [`Metrics`] for what each means.
    pub fn metrics(&self) -> Metrics {
        let c = &self.inner.counters;
        let (hits, accepted_hits) = self.inner.shards.iter().fold((0, 0), |(h, a), shard| {
            let cache = lock(&shard.0);
            (h + cache.hits, a + cache.accepted_hits)
        });
        Metrics {
            accepted: c.accepted.load(Relaxed) + accepted_hits,
            refused: c.refused.load(Relaxed) + (hits - accepted_hits),
            malformed: c.malformed.load(Relaxed),
            cache_hits: hits,
            introspections: c.introspections.load(Relaxed),
            introspection_errors: c.introspection_errors.load(Relaxed),
            stale_refusals: c.stale_refusals.load(Relaxed),
            stale_rechecks: c.stale_rechecks.load(Relaxed),
            stream_connects: c.stream_connects.load(Relaxed),
            stream_disconnects: c.stream_disconnects.load(Relaxed),
            stream_events: c.stream_events.load(Relaxed),
            stream_resets: c.stream_resets.load(Relaxed),
            stream_ids_refused: c.stream_ids_refused.load(Relaxed),
            last_event_id: c.last_event_id.load(Relaxed),
            stream_connected: c.stream_connected.load(Relaxed),
            stale: self.is_stale(),
        }
    }
}

impl Inner {
    /// An empty cache, never yet in contact with the stream, for keyplane at `base`.
    fn new(config: VerifierConfig, http: reqwest::Client, base: &str) -> Self {
        let revocation_memory = config.revocation_memory;
        let slots = config
            .max_concurrent_introspections
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            flights: Mutex::default(),
            last_stream_error: Mutex::default(),
            warned_of_heartbeat: AtomicBool::new(false),
            introspection_slots: tokio::sync::Semaphore::new(slots),
            introspect_url: format!("{base}/oauth2/introspect"),
            http,
            config,
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            cached: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            changes: Mutex::new(Changes::new(revocation_memory)),
            keys: CacheKeyer::random(),
            counters: Counters::default(),
            clock: Clock::default(),
            last_contact: AtomicU64::new(0),
        }
    }

    fn is_stale(&self) -> bool {
        self.is_stale_at(self.clock.now())
    }

    fn is_stale_at(&self, now: Moment) -> bool {
        match self.last_contact.load(Relaxed) {
            0 => true,
            heard => {
                let heard = Moment::from_nanos(heard - 1);
                now.saturating_duration_since(heard) > self.config.max_staleness
            }
        }
    }

    /// Why the verifier is stale, for [`VerifyError::Stale`].
    fn stale_reason(&self) -> String {
        match &*lock(&self.last_stream_error) {
            Some(error) => format!("the stream's last problem: {error}"),
            None if self.counters.stream_connected.load(Relaxed) => {
                "the stream is connected but not up to date".into()
            }
            None => "the stream is not connected yet".into(),
        }
    }

    fn heard_from_stream(&self) {
        let now = self.clock.now().nanos().min(u64::MAX - 1);
        self.last_contact.fetch_max(now + 1, Relaxed);
    }

    /// The shard holding `key`, locked.
    fn shard(&self, key: &CacheKey) -> std::sync::MutexGuard<'_, Cache> {
        lock(&self.shards[key.shard(SHARDS)].0)
    }

    /// Inserts into `cache` (the key's shard, locked), first making room there if the shards
    /// hold `max_entries` together; an answer that finds no room is not cached. Threads
    /// inserting into different shards at once may pass `max_entries` by one answer each.
    fn admit(&self, cache: &mut Cache, key: CacheKey, entry: Entry) {
        let max = self.config.max_entries;
        if self.cached.load(Relaxed) >= max && !cache.entries.contains_key(&key) {
            let freed = cache.make_room(entry.identity.is_none(), self.clock.now());
            if self.cached.fetch_sub(freed, Relaxed).saturating_sub(freed) >= max {
                return;
            }
        }
        self.cached.fetch_add(cache.insert(key, entry), Relaxed);
    }

    /// A `revocation` event: remembers it ([`Changes::note`]) and drops every cached answer
    /// about `credential_id`.
    fn apply(&self, action: &str, credential_id: &str) {
        lock(&self.changes).note(action, credential_id, Instant::now());
        self.drop_answers(credential_id);
    }

    /// Drops every cached answer about `credential_id`.
    fn drop_answers(&self, credential_id: &str) {
        // Before the shards are locked: see `Verifier::introspect`.
        self.generation.fetch_add(1, SeqCst);
        for shard in &self.shards {
            let dropped = lock(&shard.0).drop_credential(credential_id);
            self.cached.fetch_sub(dropped, Relaxed);
        }
    }

    /// A `reset` event: remembers it ([`Changes::reset`]) and drops every cached answer.
    fn reset(&self) {
        lock(&self.changes).reset(Instant::now());
        self.invalidate_all();
    }

    /// Drops every cached answer.
    fn invalidate_all(&self) {
        self.generation.fetch_add(1, SeqCst);
        for shard in &self.shards {
            let dropped = lock(&shard.0).clear();
            self.cached.fetch_sub(dropped, Relaxed);
        }
    }
}

/// One introspection's answer, awaited by every verify sharing it.
type FlightAnswer = tokio::sync::OnceCell<Result<Arc<Identity>, VerifyError>>;

/// A verify's share in the introspection of its key. A verify joins one only if it started
/// since the last invalidation (an older one may predate a change the stream told of before
/// this verify began) and is not answered yet (an answer that was not to be cached is not to be
/// reused either); otherwise it starts its own.
struct Flight<'a> {
    inner: &'a Inner,
    key: CacheKey,
    /// `None` once dropped.
    answer: Option<Arc<FlightAnswer>>,
}

impl<'a> Flight<'a> {
    fn join(inner: &'a Inner, key: CacheKey) -> Self {
        let generation = inner.generation.load(SeqCst);
        let mut flights = lock(&inner.flights);
        let answer = match flights.get(&key) {
            Some((started, answer)) if *started == generation && !answer.initialized() => {
                answer.clone()
            }
            _ => {
                let answer = Arc::new(FlightAnswer::new());
                flights.insert(key, (generation, answer.clone()));
                answer
            }
        };
        Self {
            inner,
            key,
            answer: Some(answer),
        }
    }

    fn answer(&self) -> &FlightAnswer {
        self.answer.as_ref().expect("held until dropped")
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = lock(&self.inner.flights);
        let Some(answer) = self.answer.take() else {
            return;
        };
        let current = flights
            .get(&self.key)
            .is_some_and(|(_, a)| Arc::ptr_eq(a, &answer));
        // Answered, the next miss asks afresh; left by every verify (their callers gone), no one
        // would finish it. (The map's reference and this one: no other verify holds it.)
        if current && (answer.initialized() || Arc::strong_count(&answer) == 2) {
            flights.remove(&self.key);
        }
        // Under the lock, so that a verify leaving next sees this one gone.
        drop(answer);
        drop(flights);
    }
}

/// `now + duration`; past what the clock holds, a century (never, in practice), not a panic.
fn later(now: Instant, duration: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
    now.checked_add(duration)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

/// A lock whose holder panicked still guards consistent data: no method here panics midway.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// When `identity` expires, on [`Clock`] as read at `now`; `None`: never. A wall-clock step after
/// this is not followed, but the answer is cached for `cache_ttl` at most; a suspend is (the clock
/// counts it as the wall clock does).
fn clock_expiry(identity: &Identity, now: Moment) -> Option<Moment> {
    let seconds = u64::try_from(identity.expires_at?).unwrap_or(0);
    // Past what the clocks can hold is never, not a panic.
    let exp = UNIX_EPOCH.checked_add(Duration::from_secs(seconds))?;
    let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
    Some(now + left).filter(|at| at.nanos() < u64::MAX)
}

/// Whether a credential expiring at `expires` ([`clock_expiry`]) is still live at `now`.
fn unexpired(expires: Option<Moment>, now: Moment) -> bool {
    expires.is_none_or(|exp| now < exp)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicBool;

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

    /// A key imported from another system under a configured legacy prefix is not malformed: it
    /// is asked about (here: nobody answers), or refused without a question if its prefix names
    /// robots; without the prefix configured it is malformed, as before.
    #[tokio::test]
    async fn legacy_prefixes_are_asked_about_only_when_configured() {
        // Nothing listens on port 9: an answer that needed keyplane would be `Unavailable`.
        let mut config = VerifierConfig::new("http://127.0.0.1:9", "unused");
        config.stale_policy = StalePolicy::Recheck;
        let plain = Verifier::new(config.clone()).unwrap();
        config.legacy_token_prefixes =
            LegacyPrefixes::parse(["acme_live_=api-token", "acme_bot_=robot"]).unwrap();
        let legacy = Verifier::new(config).unwrap();
        let key = "acme_live_4f9c2e7a1b3d5f60718293a4b5c6d7e8";
        assert_eq!(plain.verify(key).await, Err(VerifyError::Malformed));
        assert!(matches!(
            legacy.verify(key).await,
            Err(VerifyError::Unavailable(_))
        ));
        assert_eq!(
            legacy.verify("acme_bot_0123").await,
            Err(VerifyError::Inactive)
        );
        assert_eq!(
            legacy.verify("other_4f9c2e7a1b3d").await,
            Err(VerifyError::Malformed)
        );
        let too_long = format!(
            "acme_live_{}",
            "0".repeat(keyplane_core::token::MAX_TOKEN_LEN)
        );
        assert_eq!(legacy.verify(&too_long).await, Err(VerifyError::Malformed));
        assert_eq!(legacy.metrics().introspections, 1);
    }

    /// A cached answer skips the format check (the cache holds well-formed tokens' answers alone,
    /// and the key decides a hit); every other token is checked before keyplane would be asked,
    /// stale or not.
    #[tokio::test]
    async fn only_a_cached_answer_skips_the_format_check() {
        // Nothing listens on port 9: an answer that needed keyplane would be `Unavailable`.
        let mut config = VerifierConfig::new("http://127.0.0.1:9", "unused");
        config.stale_policy = StalePolicy::Recheck;
        let verifier = Verifier::new(config).unwrap();
        let mint = |kind| {
            let minted = keyplane_core::token::mint(kind, &mut rand::rngs::OsRng);
            minted.plaintext.expose_secret().to_string()
        };
        let (robot, cached) = (
            mint(CredentialKind::RobotAccount),
            mint(CredentialKind::ApiToken),
        );
        let last = if cached.ends_with('0') { "1" } else { "0" };
        let corrupted = format!("{}{last}", &cached[..cached.len() - 1]);
        let too_long = format!(
            "{cached}{}",
            "0".repeat(keyplane_core::token::MAX_TOKEN_LEN)
        );
        let inner = &verifier.inner;
        admit(
            inner,
            inner.keys.key(&cached),
            entry(Some("cached"), Duration::from_secs(60)),
        );
        for stale in [true, false] {
            if !stale {
                inner.heard_from_stream();
            }
            assert_eq!(inner.is_stale(), stale);
            assert_eq!(
                verifier.verify(&corrupted).await,
                Err(VerifyError::Malformed)
            );
            assert_eq!(
                verifier.verify(&too_long).await,
                Err(VerifyError::Malformed)
            );
            assert_eq!(verifier.verify(&robot).await, Err(VerifyError::Inactive));
        }
        let identity = verifier.verify(&cached).await.unwrap();
        assert_eq!(identity.credential_id, "cached");
        let metrics = verifier.metrics();
        assert_eq!((metrics.malformed, metrics.refused), (4, 2));
        assert_eq!(
            (
                metrics.introspections,
                metrics.stale_rechecks,
                metrics.cache_hits
            ),
            (0, 0, 1)
        );
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
            until: Clock::System.now() + ttl,
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
        assert_eq!(cache.refusals, cache.entries.len() - accepted);
        let soonest = cache.entries.values().map(|e| e.until).min();
        assert!(
            cache
                .soonest_expiry
                .is_none_or(|at| soonest.is_none_or(|s| at <= s)),
            "a lower bound"
        );
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
        let base = "http://127.0.0.1:9";
        Inner::new(
            VerifierConfig::new(base, "unused"),
            reqwest::Client::new(),
            base,
        )
    }

    fn inner_holding(max_entries: usize) -> Inner {
        let mut inner = inner();
        inner.config.max_entries = max_entries;
        inner
    }

    fn admit(inner: &Inner, key: CacheKey, entry: Entry) {
        let mut cache = inner.shard(&key);
        inner.admit(&mut cache, key, entry);
    }

    fn cached_keys(inner: &Inner) -> HashSet<CacheKey> {
        let shards = inner.shards.iter().map(|shard| lock(&shard.0));
        shards
            .flat_map(|c| c.entries.keys().copied().collect::<Vec<_>>())
            .collect()
    }

    /// Each shard's index is consistent, each key is in its own shard, and `cached` counts them.
    fn assert_consistent(inner: &Inner) {
        let mut total = 0;
        for (n, shard) in inner.shards.iter().enumerate() {
            let cache = lock(&shard.0);
            assert_index_consistent(&cache);
            assert!(cache.entries.keys().all(|key| key.shard(SHARDS) == n));
            total += cache.entries.len();
        }
        assert_eq!(inner.cached.load(Relaxed), total);
    }

    #[test]
    fn an_event_drops_its_credentials_answers_and_keeps_the_others() {
        let inner = inner();
        let hour = Duration::from_secs(3600);
        // A in its rotation's grace period: two secrets, two answers.
        admit(&inner, key(1), entry(Some("A"), hour));
        admit(&inner, key(2), entry(Some("A"), hour));
        admit(&inner, key(3), entry(Some("B"), hour));
        admit(&inner, key(4), entry(None, hour));
        assert_consistent(&inner);
        inner.apply("api_token.rotated", "A");
        assert_eq!(cached_keys(&inner), HashSet::from([key(3), key(4)]));
        let indexed = |id: &str| {
            inner
                .shards
                .iter()
                .any(|s| lock(&s.0).by_credential.contains_key(id))
        };
        assert!(indexed("B") && !indexed("A"));
        let mut changes = lock(&inner.changes);
        assert_eq!(changes.about("A", Instant::now()), Lately::Changed);
        assert_eq!(changes.about("B", Instant::now()), Lately::Nothing);
        assert_eq!(inner.generation.load(SeqCst), 1);
        drop(changes);
        assert_consistent(&inner);
        inner.invalidate_all();
        assert!(cached_keys(&inner).is_empty());
        assert_eq!(inner.generation.load(SeqCst), 2);
        assert_consistent(&inner);
    }

    #[test]
    fn eviction_expiry_and_replacement_keep_the_shards_consistent() {
        let max = 50;
        let inner = inner_holding(max);
        for n in 0..5_000u32 {
            // Every third answer is already expired, every seventh a refusal.
            let ttl = if n % 3 == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(3600)
            };
            let credential = format!("c{n}");
            let named = (n % 7 != 0).then_some(credential.as_str());
            admit(&inner, key(n), entry(named, ttl));
            // One thread: the bound is exact.
            assert!(inner.cached.load(Relaxed) <= max);
            let indexed: usize = inner
                .shards
                .iter()
                .map(|s| lock(&s.0).by_credential.len())
                .sum();
            assert!(indexed <= max, "no stale index growth");
        }
        assert_consistent(&inner);
        assert!(
            inner.cached.load(Relaxed) > max / 2,
            "eviction frees a tenth, not all"
        );
        // A key's answer replaced by a refusal, then by another credential's answer.
        let live = *cached_keys(&inner)
            .iter()
            .find(|k| inner.shard(k).entries[*k].identity.is_some())
            .unwrap();
        admit(&inner, live, entry(None, Duration::from_secs(60)));
        assert_consistent(&inner);
        admit(&inner, live, entry(Some("other"), Duration::from_secs(60)));
        assert_eq!(inner.shard(&live).by_credential["other"], [live]);
        assert_consistent(&inner);
        inner.invalidate_all();
        assert!(cached_keys(&inner).is_empty());
        assert_consistent(&inner);
    }

    /// Well-formed tokens keyplane refuses cost an attacker nothing to mint: a flood of them
    /// must not push valid credentials' answers out of the cache, while a valid answer may
    /// push refusals out.
    #[test]
    fn refusals_never_evict_accepted_answers() {
        let max = 64;
        let inner = inner_holding(max);
        for n in 0..max as u32 {
            admit(
                &inner,
                key(n),
                entry(Some(&format!("c{n}")), Duration::from_secs(3600)),
            );
        }
        let valid = cached_keys(&inner);
        assert_eq!(valid.len(), max);
        for n in 0..10_000u32 {
            admit(
                &inner,
                key(1_000_000 + n),
                entry(None, Duration::from_secs(3600)),
            );
        }
        assert_eq!(
            cached_keys(&inner),
            valid,
            "the flood evicted no valid answer"
        );
        assert_consistent(&inner);

        let refusals = inner_holding(max);
        for n in 0..max as u32 {
            admit(&refusals, key(n), entry(None, Duration::from_secs(3600)));
        }
        let valid = key(1_000);
        admit(
            &refusals,
            valid,
            entry(Some("c"), Duration::from_secs(3600)),
        );
        assert!(
            refusals.shard(&valid).entries.contains_key(&valid),
            "a valid answer displaces refusals"
        );
        assert!(refusals.cached.load(Relaxed) <= max);
        assert_consistent(&refusals);
    }

    /// A cache full of live accepted answers has no room a refusal may take: a flood of made-up
    /// tokens finds that out once per shard, not by looking through the shard for each.
    #[test]
    fn a_full_cache_of_accepted_answers_is_not_scanned_for_each_refusal() {
        let max = 160;
        let inner = inner_holding(max);
        for n in 0..max as u32 {
            let credential = format!("c{n}");
            admit(
                &inner,
                key(n),
                entry(Some(&credential), Duration::from_secs(3600)),
            );
        }
        let valid = cached_keys(&inner);
        for n in 0..10_000u32 {
            admit(
                &inner,
                key(1_000_000 + n),
                entry(None, Duration::from_secs(3600)),
            );
        }
        assert_eq!(cached_keys(&inner), valid);
        let scans: usize = inner.shards.iter().map(|s| lock(&s.0).scans).sum();
        assert!(scans <= SHARDS, "{scans} scans");
        assert_consistent(&inner);
    }

    #[test]
    fn threads_admitting_and_invalidating_at_once_keep_the_count() {
        let max = 100;
        let inner = inner_holding(max);
        let threads = 4u32;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let inner = &inner;
                scope.spawn(move || {
                    for n in 0..2_000u32 {
                        let id = format!("c{}", n % 300);
                        admit(
                            inner,
                            key(t * 10_000 + n),
                            entry(Some(&id), Duration::from_secs(60)),
                        );
                        if n % 50 == t {
                            inner.apply("api_token.rotated", &id);
                        }
                    }
                });
            }
        });
        assert_consistent(&inner);
        // Each thread may pass the bound by one answer while the others insert.
        assert!(inner.cached.load(Relaxed) <= max + threads as usize);
    }

    #[test]
    fn recent_changes_are_forgotten_without_insertions() {
        let mut recent = Memory::new(Duration::from_secs(2), MAX_REMEMBERED);
        let start = Instant::now();
        // 1,000 events 10 ms apart and no introspection at all: only the last 2 s stay.
        for n in 0..1_000u64 {
            recent.note(&format!("c{n}"), start + Duration::from_millis(10 * n));
        }
        assert_eq!(recent.at.len(), 200);
        assert_eq!(recent.order.len(), 200);
        // A credential changed twice stays recent until 2 s after its last change.
        let later = start + Duration::from_secs(100);
        recent.note("A", later);
        recent.note("A", later + Duration::from_millis(1500));
        recent.prune(later + Duration::from_millis(2500));
        assert!(recent.contains("A", later + Duration::from_millis(2500)));
        recent.prune(later + Duration::from_millis(3600));
        assert!(recent.at.is_empty() && recent.order.is_empty());
    }

    #[test]
    fn a_memory_keeps_its_newest_mentions_within_its_count() {
        let mut memory = Memory::new(Duration::from_secs(60), 100);
        let now = Instant::now();
        for n in 0..1_000 {
            memory.note(&format!("c{n}"), now);
        }
        assert_eq!((memory.at.len(), memory.order.len()), (100, 100));
        assert!(memory.contains("c999", now) && memory.contains("c900", now));
        assert!(!memory.contains("c899", now));
        // Noted again, a credential is kept past its first note's eviction, even at one instant.
        memory.note("c900", now);
        memory.note("x", now);
        assert!(memory.contains("c900", now) && !memory.contains("c901", now));
        // Forgotten, it is gone at once; its note leaves when pruned.
        memory.forget("c950");
        assert!(!memory.contains("c950", now));
        memory.prune(now + Duration::from_secs(60));
        assert!(memory.at.is_empty() && memory.order.is_empty());
    }

    /// Revokes are final; a leak may have suspended, so a resume lifts it; other changes,
    /// `authorization.revoked` included, only keep answers out of the cache for [`RECENT`].
    #[test]
    fn only_revokes_and_unresumed_leaks_refuse_answers() {
        let mut changes = Changes::new(Duration::from_secs(330));
        let now = Instant::now();
        for (action, id) in [
            ("api_token.revoked", "token"),
            ("service_account.revoked", "sa"),
            ("robot_account.revoked", "robot"),
            ("credential.leaked", "leaked"),
            ("credential.leaked", "leaked-then-resumed"),
            ("api_token.resumed", "leaked-then-resumed"),
            ("api_token.resumed", "token"),
            ("authorization.revoked", "grant-subject"),
            ("api_token.rotated", "rotated"),
            ("api_token.suspended", "suspended"),
            ("service_account.previous_secret_retired", "retired"),
            ("credential.expired", "expired"),
        ] {
            changes.note(action, id, now);
        }
        let revoked = ["token", "sa", "robot", "leaked"];
        let changed = [
            "leaked-then-resumed",
            "grant-subject",
            "rotated",
            "suspended",
            "retired",
            "expired",
        ];
        // (Lookups prune: each instant below is no earlier than the one before.)
        for id in revoked {
            assert_eq!(changes.about(id, now), Lately::Revoked, "{id}");
        }
        for id in changed {
            assert_eq!(changes.about(id, now), Lately::Changed, "{id}");
        }
        for id in changed {
            assert_eq!(changes.about(id, now + RECENT), Lately::Nothing, "{id}");
        }
        for id in revoked {
            let later = now + Duration::from_secs(329);
            assert_eq!(changes.about(id, later), Lately::Revoked, "{id}");
        }
        let past = now + Duration::from_secs(330);
        assert_eq!(changes.about("token", past), Lately::Nothing);
        assert!(changes.revoked.at.is_empty() && changes.leaked.at.is_empty());
    }

    #[test]
    fn staleness_follows_the_last_contact() {
        let inner = inner();
        let max = inner.config.max_staleness;
        assert!(inner.is_stale(), "stale until the stream is heard from");
        inner.heard_from_stream();
        let heard = inner.clock.now();
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
        let now = verifier.inner.clock.now();
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let in_a_minute = Identity {
            expires_at: Some(unix_now + 60),
            ..(*identity("A").unwrap()).clone()
        };
        let expires = clock_expiry(&in_a_minute, now).expect("an expiry");
        assert!(
            expires > now + Duration::from_secs(58) && expires <= now + Duration::from_secs(61)
        );
        verifier.inner.shard(&key(1)).insert(
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
        // Hits are counted in their shard, and reported with the rest.
        let metrics = verifier.metrics();
        assert_eq!(
            (metrics.cache_hits, metrics.accepted, metrics.refused),
            (2, 1, 1)
        );
        // Expiries before the epoch are past; one at the end of time is far off, not a panic.
        let at = |exp| Identity {
            expires_at: Some(exp),
            ..(*identity("A").unwrap()).clone()
        };
        assert!(clock_expiry(&at(-5), now).is_some_and(|exp| exp <= now));
        let century = Duration::from_secs(100 * 365 * 86_400);
        assert!(clock_expiry(&at(i64::MAX), now).is_none_or(|exp| exp > now + century));
    }

    /// The host sleeps for ten minutes with an answer cached for a day about a credential that
    /// expires in one (the clock the cache reads counts a suspend: here, it jumps). On waking the
    /// verifier is stale until the stream is heard from again (it was silent all along), and then
    /// the cached answer is refused: its credential expired during the sleep. Read on a clock that
    /// stopped meanwhile (`Instant`'s), both would still look fresh.
    #[tokio::test]
    async fn a_suspend_counts_for_expiry_lifetime_and_staleness() {
        let clock = Clock::manual(Duration::from_secs(1_000));
        let mut inner = inner();
        inner.clock = clock.clone();
        inner.config.cache_ttl = Duration::from_secs(86_400);
        let verifier = Verifier {
            inner: Arc::new(inner),
            _guard: Arc::new(StopOnDrop(tokio::sync::watch::channel(false).0)),
        };
        let minted = keyplane_core::token::mint(CredentialKind::ApiToken, &mut rand::rngs::OsRng);
        let token = minted.plaintext.expose_secret().to_string();
        let key = verifier.inner.keys.key_of_presented(&token).unwrap();
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let in_a_minute = Identity {
            expires_at: Some(unix_now + 60),
            ..(*identity("A").unwrap()).clone()
        };
        let now = clock.now();
        admit(
            &verifier.inner,
            key,
            Entry {
                expires: clock_expiry(&in_a_minute, now),
                identity: Some(Arc::new(in_a_minute)),
                until: now + verifier.inner.config.cache_ttl,
            },
        );
        verifier.inner.heard_from_stream();
        assert!(verifier.verify(&token).await.is_ok(), "cached and live");

        clock.advance(Duration::from_secs(600));
        assert!(
            verifier.is_stale(),
            "the stream was silent during the sleep"
        );
        assert!(matches!(
            verifier.verify(&token).await,
            Err(VerifyError::Stale(_))
        ));
        verifier.inner.heard_from_stream();
        assert_eq!(
            verifier.verify(&token).await,
            Err(VerifyError::Inactive),
            "accepted a credential that expired while the host slept"
        );
        assert_eq!(
            verifier.metrics().introspections,
            0,
            "answered from the cache"
        );
    }

    /// `Verifier::new` refuses what it cannot honour, rather than accepting it silently (a zero
    /// `max_staleness` makes the verifier stale for good) or panicking.
    #[tokio::test]
    async fn new_refuses_a_config_it_cannot_keep() {
        let config = || VerifierConfig::new("http://127.0.0.1:9", "unused");
        type Set = fn(&mut VerifierConfig);
        let zero: [(&str, Set); 3] = [
            ("max_staleness", |c| c.max_staleness = Duration::ZERO),
            ("request_timeout", |c| c.request_timeout = Duration::ZERO),
            ("max_concurrent_introspections", |c| {
                c.max_concurrent_introspections = 0
            }),
        ];
        for (name, set) in zero {
            let mut config = config();
            set(&mut config);
            let refused = Verifier::new(config).unwrap_err();
            assert!(
                matches!(refused, ConfigError::Zero(n) if n == name),
                "{refused:?}"
            );
            assert_eq!(refused.to_string(), format!("{name} must be above zero"));
        }
        for base in ["keyplane.internal:8443", "ftp://keyplane", "http://", ""] {
            let mut config = config();
            config.base_url = base.into();
            let refused = Verifier::new(config).unwrap_err();
            assert!(
                matches!(refused, ConfigError::BaseUrl(_)),
                "{base}: {refused:?}"
            );
        }
        assert!(Verifier::new(config()).is_ok());
    }

    #[test]
    fn new_outside_a_runtime_is_an_error_not_a_panic() {
        let config = VerifierConfig::new("http://127.0.0.1:9", "unused");
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Verifier::new(config).map(drop)
        }));
        assert!(matches!(made, Ok(Err(ConfigError::NoRuntime))), "{made:?}");
    }

    /// With `max_staleness` under twice the heartbeat keyplane announces, one late heartbeat
    /// makes the verifier stale: it warns (once) when a `ready` tells the interval (15 s here).
    /// (The decision is checked, not the log line: tracing's callsite cache is shared by the
    /// test threads, so a subscriber set for one thread may miss the event.)
    #[tokio::test]
    async fn a_max_staleness_under_two_heartbeats_is_warned_of() {
        let fake = FakeKeyplane::start(queued_stream(Arc::default()), || active("A"));
        let limit = Duration::from_secs(5);
        let warned = |verifier: &Verifier| verifier.inner.warned_of_heartbeat.load(SeqCst);
        let enough = fake_verifier(&fake, Duration::from_secs(30), StalePolicy::FailClosed);
        until("fresh", limit, || !enough.is_stale()).await;
        assert!(!warned(&enough));
        let short = fake_verifier(&fake, Duration::from_secs(20), StalePolicy::FailClosed);
        until("fresh", limit, || !short.is_stale()).await;
        assert!(warned(&short));
    }

    /// Lifetimes past what the clock can hold keep answers for good rather than panicking.
    #[tokio::test]
    async fn a_cache_lifetime_past_the_clock_is_forever() {
        let refuse = Arc::new(AtomicBool::new(false));
        let refusing = refuse.clone();
        let fake = FakeKeyplane::start(queued_stream(Arc::default()), move || {
            if refusing.load(SeqCst) {
                r#"{"active":false}"#.into()
            } else {
                active("A")
            }
        });
        let mut config = fake_config(&fake.base, Duration::from_secs(10), StalePolicy::FailClosed);
        (config.cache_ttl, config.negative_ttl) = (Duration::MAX, Duration::MAX);
        let verifier = Verifier::new(config).unwrap();
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        let (accepted, refused) = (api_token(), api_token());
        for _ in 0..2 {
            assert!(verifier.verify(&accepted).await.is_ok());
        }
        refuse.store(true, SeqCst);
        for _ in 0..2 {
            assert_eq!(verifier.verify(&refused).await, Err(VerifyError::Inactive));
        }
        let metrics = verifier.metrics();
        assert_eq!(
            (metrics.introspections, metrics.cache_hits),
            (2, 2),
            "{metrics:?}"
        );
    }

    #[tokio::test]
    async fn neither_the_config_nor_the_verifier_shows_its_token() {
        let config = VerifierConfig::new("http://keyplane", "aether_secret");
        assert!(!format!("{config:?}").contains("aether_secret"));
        let verifier = Verifier::new(config).unwrap();
        let shown = format!("{verifier:?}");
        assert!(shown.contains("http://keyplane") && !shown.contains("aether_secret"));
    }

    /// A keyplane stand-in on loopback, in plain threads (the crate has no HTTP server to spare):
    /// `GET /v1/revocations/stream` runs the test's script on the connection, then closes it;
    /// `POST /oauth2/introspect` answers the test's JSON.
    pub(crate) struct FakeKeyplane {
        pub(crate) base: String,
    }

    /// One stream connection, as the script sees it.
    pub(crate) struct StreamConn {
        /// The seq of the client's `Last-Event-ID`, if it sent one.
        pub(crate) last_event_id: Option<u64>,
        /// The client's `Last-Event-ID` as sent.
        pub(crate) sent_last_event_id: Option<String>,
        /// The request's path and query.
        pub(crate) target: String,
        socket: std::net::TcpStream,
        /// The answer's head is sent: a 200 event stream unless the script answered otherwise.
        answered: bool,
    }

    impl StreamConn {
        /// Writes raw SSE text, after a 200 event stream's head; false once the client is gone.
        pub(crate) fn send(&mut self, text: &str) -> bool {
            if !self.answered
                && !self.answer("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
            {
                return false;
            }
            self.write(text)
        }

        /// Answers with raw HTTP text instead of the stream.
        pub(crate) fn answer(&mut self, raw: &str) -> bool {
            self.answered = true;
            self.write(raw)
        }

        fn write(&mut self, text: &str) -> bool {
            use std::io::Write;
            self.socket
                .write_all(text.as_bytes())
                .and_then(|()| self.socket.flush())
                .is_ok()
        }
    }

    impl FakeKeyplane {
        pub(crate) fn start(
            stream: impl Fn(&mut StreamConn) + Send + Sync + 'static,
            introspect: impl Fn() -> String + Send + Sync + 'static,
        ) -> Self {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let stream: Arc<dyn Fn(&mut StreamConn) + Send + Sync> = Arc::new(stream);
            let introspect: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(introspect);
            std::thread::spawn(move || {
                for socket in listener.incoming().flatten() {
                    let (stream, introspect) = (stream.clone(), introspect.clone());
                    std::thread::spawn(move || Self::serve(socket, &*stream, &*introspect));
                }
            });
            Self { base }
        }

        fn serve(
            mut socket: std::net::TcpStream,
            stream: &(dyn Fn(&mut StreamConn) + Send + Sync),
            introspect: &(dyn Fn() -> String + Send + Sync),
        ) {
            use std::io::Write;
            let Some(request) = read_request(&mut socket) else {
                return;
            };
            let head = request.to_lowercase();
            let header = |name: &str| {
                head.lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                    .map(|value| value.trim().to_string())
            };
            if head.starts_with("get /v1/revocations/stream") {
                let sent_last_event_id = header("last-event-id");
                let mut conn = StreamConn {
                    last_event_id: sent_last_event_id
                        .as_deref()
                        .and_then(|id| id.split('-').next()?.parse().ok()),
                    sent_last_event_id,
                    target: head.split(' ').nth(1).unwrap_or_default().to_string(),
                    socket,
                    answered: false,
                };
                // The head goes at once, as keyplane's does, unless the script answers otherwise.
                stream(&mut conn);
                if !conn.answered {
                    conn.send("");
                }
            } else if head.starts_with("post /oauth2/introspect") {
                let answer = introspect();
                let (marks, body) = match answer.strip_prefix(UNCONFIRMED) {
                    Some(body) => ("x-keyplane-stale: 1\r\n", body),
                    None => ("", answer.as_str()),
                };
                let _ = write!(
                    socket,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{marks}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            } else {
                let _ = socket.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        }
    }

    /// Reads one request (its head, and its body as `content-length` says) as text; `None` if
    /// the client went away first.
    fn read_request(socket: &mut std::net::TcpStream) -> Option<String> {
        use std::io::Read;
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match socket.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        };
        let length: usize = String::from_utf8_lossy(&request[..head_end])
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while request.len() < head_end + length {
            match socket.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        Some(String::from_utf8_lossy(&request).into_owned())
    }

    /// A loopback server in plain threads that answers the `n`th request (from 0) with the raw
    /// HTTP text `answer(n, request)` and closes the connection, and records every request with
    /// the time it came.
    pub(crate) struct RawServer {
        pub(crate) base: String,
        pub(crate) requests: Arc<Mutex<Vec<(Instant, String)>>>,
    }

    impl RawServer {
        pub(crate) fn start(
            answer: impl Fn(usize, &str) -> String + Send + Sync + 'static,
        ) -> Self {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let requests = Arc::new(Mutex::new(Vec::new()));
            let (answer, recorded) = (Arc::new(answer), requests.clone());
            std::thread::spawn(move || {
                for mut socket in listener.incoming().flatten() {
                    let (answer, recorded) = (answer.clone(), recorded.clone());
                    std::thread::spawn(move || {
                        use std::io::Write;
                        let Some(request) = read_request(&mut socket) else {
                            return;
                        };
                        let n = {
                            let mut recorded = lock(&recorded);
                            recorded.push((Instant::now(), request.clone()));
                            recorded.len() - 1
                        };
                        let _ = socket.write_all(answer(n, &request).as_bytes());
                    });
                }
            });
            Self { base, requests }
        }

        /// How many requests came whose text starts with `start` (e.g. `GET`).
        pub(crate) fn count(&self, start: &str) -> usize {
            lock(&self.requests)
                .iter()
                .filter(|(_, request)| request.starts_with(start))
                .count()
        }
    }

    /// A `ready` or `reset` block; `head: None` as servers before it sent.
    pub(crate) fn position(event: &str, seq: u64, head: Option<u64>) -> String {
        let mut data = json!({"seq": seq, "heartbeat_seconds": 15});
        if let Some(head) = head {
            data["head"] = json!(head);
        }
        format!("event: {event}\nid: {seq}\ndata: {data}\n\n")
    }

    pub(crate) fn revocation(seq: u64, action: &str, credential_id: &str) -> String {
        let data = json!({
            "seq": seq, "action": action, "kind": "api_token",
            "credential_id": credential_id, "occurred_at": "2026-01-01T00:00:00Z",
        });
        format!("event: revocation\nid: {seq}\ndata: {data}\n\n")
    }

    /// `block` with its id in the `?ids=seq_hash` form (`<seq>-<16 hex>`; here the seq's own hex).
    pub(crate) fn hashed(block: &str) -> String {
        block
            .lines()
            .map(|line| match line.strip_prefix("id: ") {
                Some(seq) => format!("id: {seq}-{:016x}\n", seq.parse::<u64>().unwrap()),
                None => format!("{line}\n"),
            })
            .collect()
    }

    pub(crate) const HEARTBEAT: &str = ": heartbeat\n\n";

    /// Put before an introspection answer, it makes the fake send it as keyplane does an answer
    /// from its cache while its store is unreadable (`X-Keyplane-Stale`).
    const UNCONFIRMED: &str = "unconfirmed:";

    /// An introspection answer for an active API token, credential `sub`.
    pub(crate) fn active(sub: &str) -> String {
        json!({
            "active": true, "token_type": "api_token", "scope": "read", "sub": sub,
            "org_id": "org", "username": "name",
        })
        .to_string()
    }

    /// A configuration for keyplane at `base`, with the given staleness contract.
    pub(crate) fn fake_config(
        base: &str,
        max_staleness: Duration,
        policy: StalePolicy,
    ) -> VerifierConfig {
        let mut config = VerifierConfig::new(base, "unused");
        config.max_staleness = max_staleness;
        config.stale_policy = policy;
        config.http = Some(
            reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        );
        config
    }

    pub(crate) fn fake_verifier(
        fake: &FakeKeyplane,
        max_staleness: Duration,
        policy: StalePolicy,
    ) -> Verifier {
        Verifier::new(fake_config(&fake.base, max_staleness, policy)).unwrap()
    }

    pub(crate) fn api_token() -> String {
        let minted = keyplane_core::token::mint(CredentialKind::ApiToken, &mut rand::rngs::OsRng);
        minted.plaintext.expose_secret().to_string()
    }

    /// Polls `check` every 10 ms until it holds; fails after `limit`.
    pub(crate) async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
        let started = Instant::now();
        while !check() {
            assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A stream that sends `ready`, then what the test queues, and heartbeats in between.
    fn queued_stream(
        queue: Arc<Mutex<VecDeque<String>>>,
    ) -> impl Fn(&mut StreamConn) + Send + Sync {
        move |conn| {
            let from = conn.last_event_id.unwrap_or(5);
            if !conn.send(&position("ready", from, Some(from))) {
                return;
            }
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                let next = lock(&queue).pop_front();
                if !conn.send(next.as_deref().unwrap_or(HEARTBEAT)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Whatever answers at keyplane's address redirects elsewhere: following would send the
    /// caller's credential (the introspection's form body) and the verify token there.
    #[tokio::test]
    async fn redirects_are_not_followed() {
        let elsewhere = RawServer::start(|_, _| {
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
        });
        let target = elsewhere.base.clone();
        let keyplane = RawServer::start(move |_, request| {
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}{path}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        });
        // The default HTTP client; asking keyplane though stale.
        let mut config = VerifierConfig::new(keyplane.base.clone(), "unused");
        config.stale_policy = StalePolicy::Recheck;
        let verifier = Verifier::new(config).unwrap();
        let token = api_token();
        assert!(matches!(
            verifier.verify(&token).await,
            Err(VerifyError::Unavailable(_))
        ));
        until("the stream was tried", Duration::from_secs(5), || {
            keyplane.count("GET") > 0
        })
        .await;
        assert_eq!(keyplane.count("POST"), 1);
        assert!(
            lock(&elsewhere.requests).is_empty(),
            "{} requests were redirected",
            lock(&elsewhere.requests).len()
        );
    }

    /// Verifies of `tokens`, all at once (each in its own task), in order.
    async fn verify_all(
        verifier: &Verifier,
        tokens: Vec<String>,
    ) -> Vec<Result<Arc<Identity>, VerifyError>> {
        let tasks: Vec<_> = tokens
            .into_iter()
            .map(|token| {
                let verifier = verifier.clone();
                tokio::spawn(async move { verifier.verify(&token).await })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        answers
    }

    /// A hot token's answer expires (or a `reset` drops every answer) while it is presented
    /// many times at once: the misses share one introspection.
    #[tokio::test]
    async fn concurrent_misses_for_one_token_share_one_introspection() {
        let hold = Arc::new(AtomicBool::new(true));
        let holding = hold.clone();
        let fake = FakeKeyplane::start(queued_stream(Arc::default()), move || {
            while holding.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            active("A")
        });
        let verifier = fake_verifier(&fake, Duration::from_secs(10), StalePolicy::FailClosed);
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        let token = api_token();
        let key = verifier.inner.keys.key(&token);
        // The answer comes once all 32 wait for it (the map's reference and theirs).
        let release = async {
            until("all waiting", Duration::from_secs(5), || {
                let flights = lock(&verifier.inner.flights);
                flights.get(&key).map(|(_, a)| Arc::strong_count(a)) == Some(33)
            })
            .await;
            hold.store(false, SeqCst);
        };
        let (answers, ()) = tokio::join!(verify_all(&verifier, vec![token; 32]), release);
        assert!(answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|i| i.credential_id == "A")));
        let metrics = verifier.metrics();
        assert_eq!(
            (metrics.introspections, metrics.accepted),
            (1, 32),
            "{metrics:?}"
        );
    }

    /// A verify whose caller is gone leaves the introspection it started to the verifies that
    /// share it, and a flight left by all leaves nothing behind.
    #[tokio::test]
    async fn a_shared_introspection_outlives_the_verify_that_started_it() {
        let (asked, hold) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(true)),
        );
        let (counting, holding) = (asked.clone(), hold.clone());
        // Each answer waits until the test lets it go.
        let fake = FakeKeyplane::start(queued_stream(Arc::default()), move || {
            counting.fetch_add(1, SeqCst);
            while holding.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            active("A")
        });
        let verifier = fake_verifier(&fake, Duration::from_secs(10), StalePolicy::FailClosed);
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        let (token, limit) = (api_token(), Duration::from_secs(5));
        let spawn = |token: &String| {
            let (verifier, token) = (verifier.clone(), token.clone());
            tokio::spawn(async move { verifier.verify(&token).await })
        };
        let sharing = |n: usize| {
            let flights = lock(&verifier.inner.flights);
            let key = verifier.inner.keys.key(&token);
            flights.get(&key).map(|(_, a)| Arc::strong_count(a)) == Some(n + 1)
        };
        let first = spawn(&token);
        until("asked", limit, || asked.load(SeqCst) == 1).await;
        let second = spawn(&token);
        until("shared", limit, || sharing(2)).await;
        first.abort();
        until("asked anew", limit, || asked.load(SeqCst) == 2).await;
        hold.store(false, SeqCst);
        assert!(second.await.unwrap().is_ok());
        let metrics = verifier.metrics();
        assert_eq!(metrics.introspections, 2, "{metrics:?}");
        assert!(lock(&verifier.inner.flights).is_empty());

        hold.store(true, SeqCst);
        let alone = spawn(&api_token());
        until("asked", limit, || asked.load(SeqCst) == 3).await;
        alone.abort();
        assert!(alone.await.unwrap_err().is_cancelled());
        assert!(lock(&verifier.inner.flights).is_empty());
        hold.store(false, SeqCst);
    }

    /// Distinct tokens cannot be shared: they queue for `max_concurrent_introspections` slots.
    #[tokio::test]
    async fn introspections_in_flight_never_pass_the_cap() {
        let (in_flight, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counting, peaking) = (in_flight.clone(), peak.clone());
        let fake = FakeKeyplane::start(queued_stream(Arc::default()), move || {
            let now = counting.fetch_add(1, SeqCst) + 1;
            peaking.fetch_max(now, SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            counting.fetch_sub(1, SeqCst);
            active("A")
        });
        let mut config = fake_config(&fake.base, Duration::from_secs(10), StalePolicy::FailClosed);
        config.max_concurrent_introspections = 4;
        config.request_timeout = Duration::from_secs(60);
        let verifier = Verifier::new(config).unwrap();
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        let answers = verify_all(&verifier, (0..24).map(|_| api_token()).collect()).await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(verifier.metrics().introspections, 24);
        assert!(peak.load(SeqCst) <= 4, "{} at once", peak.load(SeqCst));
    }

    /// The replica answering introspections has not heard of the revoke the stream delivered
    /// (its NOTIFY listener stalled, or it is cut off from its database and answers from its
    /// cache): it still says "active". The verifier believes the stream.
    #[tokio::test]
    async fn a_revoked_credential_is_refused_whatever_a_lagging_replica_answers() {
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let fake = FakeKeyplane::start(queued_stream(queue.clone()), || active("A"));
        let verifier = fake_verifier(&fake, Duration::from_secs(10), StalePolicy::FailClosed);
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        let token = api_token();
        assert_eq!(verifier.verify(&token).await.unwrap().credential_id, "A");
        assert!(verifier.verify(&token).await.is_ok());
        assert_eq!(
            verifier.metrics().introspections,
            1,
            "the second answer came from the cache"
        );

        lock(&queue).push_back(revocation(6, "api_token.revoked", "A"));
        until("the revoke arrives", Duration::from_secs(5), || {
            verifier.metrics().stream_events == 1
        })
        .await;
        assert_eq!(verifier.verify(&token).await, Err(VerifyError::Inactive));
        // Past the window in which any change's answers go uncached, still refused, and each
        // answer is asked for again: none was cached.
        tokio::time::sleep(RECENT + Duration::from_millis(500)).await;
        assert_eq!(verifier.verify(&token).await, Err(VerifyError::Inactive));
        assert_eq!(verifier.verify(&token).await, Err(VerifyError::Inactive));
        let metrics = verifier.metrics();
        assert_eq!(
            (metrics.introspections, metrics.cache_hits),
            (4, 1),
            "{metrics:?}"
        );
        assert!(!metrics.stale, "{metrics:?}");
    }

    /// A replica cut off from its store answers from its cache, and says so: such an answer is
    /// used for a credential the stream has not named lately, but never cached; for one it named
    /// (a suspension here, which is not final), or for any after a `reset`, it is refused as
    /// unavailable for as long as a replica may answer from a cache loaded before the change.
    #[tokio::test]
    async fn unconfirmed_answers_are_not_trusted_about_changed_credentials() {
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let asked = Arc::new(Mutex::new(String::from("A")));
        let answering = asked.clone();
        let fake = FakeKeyplane::start(queued_stream(queue.clone()), move || {
            format!("{UNCONFIRMED}{}", active(&lock(&answering)))
        });
        let verifier = fake_verifier(&fake, Duration::from_secs(10), StalePolicy::FailClosed);
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        let token = api_token();
        assert!(verifier.verify(&token).await.is_ok());
        assert!(verifier.verify(&token).await.is_ok());
        assert_eq!(
            verifier.metrics().introspections,
            2,
            "neither answer was cached"
        );

        lock(&queue).push_back(revocation(6, "api_token.suspended", "A"));
        until("the suspension arrives", Duration::from_secs(5), || {
            verifier.metrics().stream_events == 1
        })
        .await;
        tokio::time::sleep(RECENT + Duration::from_millis(500)).await;
        assert!(
            matches!(
                verifier.verify(&token).await,
                Err(VerifyError::Unavailable(_))
            ),
            "an unconfirmed \"active\" may predate the suspension"
        );

        *lock(&asked) = "B".into();
        let other = api_token();
        assert!(verifier.verify(&other).await.is_ok(), "B was never named");
        lock(&queue).push_back(position("reset", 9, Some(9)));
        until("the reset arrives", Duration::from_secs(5), || {
            verifier.metrics().stream_resets == 1
        })
        .await;
        assert!(
            matches!(
                verifier.verify(&other).await,
                Err(VerifyError::Unavailable(_))
            ),
            "after a reset, any change may have been missed"
        );
    }

    /// A change that is not final (here a rotation) keeps answers out of the cache for a while
    /// but does not refuse them; a leak refuses them until the credential is resumed.
    #[tokio::test]
    async fn a_leak_refuses_until_resumed_and_other_changes_only_skip_the_cache() {
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let fake = FakeKeyplane::start(queued_stream(queue.clone()), || active("A"));
        let verifier = fake_verifier(&fake, Duration::from_secs(10), StalePolicy::FailClosed);
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        let token = api_token();
        let verifier = &verifier;
        let events = |n| move || verifier.metrics().stream_events == n;
        let limit = Duration::from_secs(5);

        lock(&queue).push_back(revocation(6, "api_token.rotated", "A"));
        until("the rotation arrives", limit, events(1)).await;
        assert!(verifier.verify(&token).await.is_ok());
        assert!(verifier.verify(&token).await.is_ok());
        assert_eq!(
            verifier.metrics().introspections,
            2,
            "neither answer was cached"
        );

        lock(&queue).push_back(revocation(7, "credential.leaked", "A"));
        until("the leak arrives", limit, events(2)).await;
        assert_eq!(verifier.verify(&token).await, Err(VerifyError::Inactive));

        lock(&queue).push_back(revocation(8, "api_token.resumed", "A"));
        until("the resumption arrives", limit, events(3)).await;
        assert!(verifier.verify(&token).await.is_ok());
        assert_eq!(verifier.metrics().introspections, 4);
    }
}
