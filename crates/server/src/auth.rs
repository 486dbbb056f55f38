//! Verification, the hot path: parse and checksum with no I/O, a keyed hash ([`CacheKey`]), a
//! bounded in-memory cache (positive entries, and short negative ones for unknown secrets), the
//! store on a miss (by SHA-256, as it keeps secrets), then
//! revocation and expiry, then coalesced `last_used_at`. Every failure is the same 401 to the
//! client; the reason goes to the log and metrics.
//!
//! Staleness is bounded three ways: local writes invalidate at once; other replicas' writes arrive
//! as [`Invalidation`]s (PostgreSQL NOTIFY) within milliseconds, and a listener that stops hearing
//! its own heartbeat reports a reset within seconds; and every positive entry must be reloaded
//! after `positive_ttl`, the backstop if a notification is ever lost.
//!
//! Stale-if-error: when that reload fails because the store cannot answer, an entry loaded at most
//! `positive_ttl + stale_if_error` ago keeps verifying, unless its subject was invalidated since
//! it was loaded. Unknown, revoked and uncached secrets fail closed.
//!
//! Unknown secrets (well-formed, so anyone can mint them at will) are cached apart from known ones,
//! in a smaller negative cache: a flood of them can only evict each other, never a tenant's valid
//! credentials.
//!
//! Users (OIDC JWT access tokens, management APIs only) take a parallel path: the token is validated
//! by [`crate::oidc`], the user's rights are read from its grants, and the principal is cached by the
//! token's hash for at most `positive_ttl` and never past the token's `exp`; grant changes reach it
//! through the same invalidation marks, keyed by the user id.
//!
//! Canaries ([`crate::canary`]) are cached like live credentials but for `negative_ttl`, and
//! answered on every path as a revoked credential is (the same 401, the same `reason` and cache
//! outcome in logs and metrics, `CanaryEntry`); the only extra work, a bool check on the entry,
//! is what ordinary credentials pay. Only for a canary is the
//! request described ([`Presented`]) and the trigger recorded.

use crate::canary::{CanaryAlarm, Presented};
use crate::error::AppError;
use crate::introspection_misses::IntrospectionMisses;
use crate::metrics::Metrics;
use crate::oidc::Oidc;
use crate::usage::UsageRecorder;
use axum::http::{header, HeaderMap};
use keyplane_core::{
    token, CacheKey, CacheKeyer, Credential, CredentialIdentity, CredentialKind, Principal,
    Registry, ScopeSet, SecretGate, SecretSlot, TenantId, TokenHash,
};
use keyplane_store::{Invalidation, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A verification's one reading of the clock, taken when first needed, and shared by the expiry
/// check and the usage record: a refusal by format or from the unknown cache reads no clock (a
/// read, with its rounding to microseconds, is a large share of rejecting a malformed token:
/// criterion's `reject_bad_checksum` went from 132 to 260 ns with one before the format check).
///
/// A `Cell`, not a `OnceLock` (whose synchronization cost more than the clock read): one task
/// owns it, and no reference to it is held across an `await` (the lookup, `find`, comes before
/// it), so the verification's future stays `Send`.
pub(crate) struct VerificationTime<'a> {
    clock: &'a crate::config::Clock,
    /// Microseconds since the Unix epoch.
    read: std::cell::Cell<Option<i64>>,
}

impl<'a> VerificationTime<'a> {
    fn new(clock: &'a crate::config::Clock) -> Self {
        Self {
            clock,
            read: std::cell::Cell::new(None),
        }
    }

    fn get(&self) -> i64 {
        match self.read.get() {
            Some(now) => now,
            None => {
                let now = self.clock.now_unix_micros();
                self.read.set(Some(now));
                now
            }
        }
    }
}

/// A live credential as verification sees it: who it is, the rights it acts with, and whether the
/// presented secret may be used. Not the whole record (that stays in the store): with a million of
/// these cached, the size of one is the server's memory.
///
/// In this order (`repr(C)`): what a cached verification reads (the gate, the load time and the
/// last use) comes first, so that with a million entries it costs as few memory fetches as can be.
#[repr(C)]
pub struct Verified {
    /// Whether this entry's secret may be used: the record's state, copied at load.
    pub gate: SecretGate,
    /// Which of the credential's secrets this entry's hash is: the current one, or the previous
    /// one during a rotation's grace period.
    pub secret: SecretSlot,
    /// When its credential was last read from the store, as nanoseconds after the verifier's
    /// `epoch`: an atomic, so that a reload finding the credential unchanged refreshes this entry
    /// in place instead of replacing it (a million reloads would otherwise reallocate the cache).
    loaded: AtomicU64,
    /// What this entry counts for against the cache's capacity ([`EntryWeight`]), set at load.
    /// Also keeps an entry with its `Arc` counts at 200 bytes, in mimalloc's 224-byte class: at
    /// 192 bytes (this field's absence) criterion's `cached_api_token_1000000` took 1.00-1.04 µs
    /// against 0.90-0.94 µs, in interleaved runs (BENCHMARKS.md, "Eleventh sitting"); why that class
    /// is slower with a million entries was not found.
    weight: u64,
    pub(crate) last_use: crate::usage::LastUse,
    pub credential: CredentialIdentity,
    pub rights: Arc<Rights>,
    /// The presented secret's hash's first bytes: a use is credited to whichever of the
    /// credential's secrets that is when it is written (a rotation may have come since).
    presented: [u8; 8],
    /// A canary's whole record, for its trigger event (canaries are few; no other entry holds one).
    canary: Option<Box<CanaryEntry>>,
}

/// What a canary's cache entry holds besides a plain entry's. A canary must look revoked from
/// outside, metrics and timing included: a revoked secret's first presentation is read from the
/// store (`unknown or revoked`), then answered from the negative cache (`unknown`) for
/// `negative_ttl`. A canary's entry lives that long too ([`Verifier::is_fresh`]), and answers
/// `unknown` once it has answered once.
struct CanaryEntry {
    record: Credential,
    answered: AtomicBool,
}

impl Verified {
    pub fn principal(&self) -> Principal {
        Principal::for_credential(&self.credential, self.rights.scopes.clone())
    }

    /// What names the presented secret to [`keyplane_store::CredentialUse`].
    pub(crate) fn presented(&self) -> [u8; 8] {
        self.presented
    }
}

/// A scope set as verification answers with it, with forward-auth's organization and scopes
/// headers rendered once: shared by every cached credential of one organization holding the same
/// set (interned at load), so a million cached tokens cost one copy each of a few scope sets.
pub struct Rights {
    pub scopes: ScopeSet,
    pub(crate) headers: crate::verify::ForwardHeaders,
    /// The heap bytes this set holds, its copy in the interning map's key included.
    held: usize,
}

impl Rights {
    fn new(tenant: TenantId, scopes: &ScopeSet) -> Self {
        let headers = crate::verify::ForwardHeaders::of(tenant, scopes);
        let scope_bytes: usize = scopes
            .iter()
            .map(|scope| std::mem::size_of::<keyplane_core::Scope>() + scope.as_str().len())
            .sum();
        Self {
            held: std::mem::size_of::<Self>() + 2 * scope_bytes + headers.held(),
            headers,
            scopes: scopes.clone(),
        }
    }
}

/// What an ordinary cached credential costs: its entry, its key and the cache's slot for them
/// (a million took 355 MB of anonymous memory; BENCHMARKS.md, "One million cached").
const ORDINARY_ENTRY_BYTES: usize = 355;
/// What a cached credential may hold besides (its name, robot permissions, scope set and
/// rendered scopes header) and still count as one entry: a name and a dozen scopes of some
/// twenty characters (two dozen count as three). A set shared by many credentials counts for each of them (its first holder
/// paying alone would let a second holder keep it for one once the first is evicted), so this
/// is set high enough that ordinary sets are never weighed at all.
const ORDINARY_HELD_BYTES: usize = 2048;

/// Weighs the verification cache's entries by what they hold, so that its capacity bounds memory
/// and not just entries: the sizes that matter (scopes, names, permission globs) are the tenants'
/// to choose, and a count alone would let one organization's fat credentials take gigabytes of the
/// shared process. The weight is read, not computed: the cache weighs entries as it evicts them.
#[derive(Clone)]
struct EntryWeight;

impl quick_cache::Weighter<CacheKey, Arc<Verified>> for EntryWeight {
    fn weight(&self, _: &CacheKey, entry: &Arc<Verified>) -> u64 {
        entry.weight
    }
}

/// An entry holding `credential`, `rights` and `canary`: one, plus one for each ordinary entry's
/// size its holdings go past [`ORDINARY_HELD_BYTES`]; at most `most`. Computed once, at load.
fn entry_weight(
    credential: &CredentialIdentity,
    rights: &Rights,
    canary: Option<&CanaryEntry>,
    most: u64,
) -> u64 {
    let permissions: usize = credential
        .permissions
        .iter()
        .map(|p| {
            std::mem::size_of::<keyplane_core::RobotPermission>()
                + p.repository.as_ref().map_or(0, String::len)
        })
        .sum();
    let canary = canary.map_or(0, |canary| {
        let record = &canary.record;
        let scopes: usize = record.scopes.iter().map(|s| s.as_str().len()).sum();
        std::mem::size_of::<CanaryEntry>() + record.name.len() + scopes
    });
    let held = credential.name.len() + permissions + rights.held + canary;
    let extra = held.saturating_sub(ORDINARY_HELD_BYTES) / ORDINARY_ENTRY_BYTES;
    (1 + extra as u64).min(most)
}

/// The one reload asking a store that failed whether it is back ([`Verifier::probe`]); given up
/// when dropped, also when its request is.
struct StoreProbe<'a>(&'a AtomicBool);

impl Drop for StoreProbe<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Reloads under way, by cache key: the first request to find an entry stale reads the store
/// ([`ReloadFlight`]), and the others presenting the same secret meanwhile wait for its answer
/// instead of each reading it (after a reset, every cached credential in use is reloaded at once,
/// and a busy one by every request that comes during its read). Touched only on reloads.
type Reloads = Mutex<HashMap<CacheKey, tokio::sync::watch::Receiver<Option<Reloaded>>>>;

/// What a reload found, for the requests that waited for it.
#[derive(Clone)]
enum Reloaded {
    /// The credential, cached as found: taken unless it was invalidated after the read began.
    Found(Arc<Verified>),
    /// Unknown or revoked (for good: a revoked credential never comes back).
    Refused(&'static str),
    /// The store could not answer (`None`: an internal error): each waiting request answers as
    /// the reload did, stale if its entry may be served so.
    Fault(Option<keyplane_store::Unavailable>),
    /// Anything else: the waiting requests read the store themselves.
    Other,
}

impl Reloaded {
    fn of(loaded: &Result<Arc<Verified>, AppError>) -> Self {
        match loaded {
            Ok(verified) => Self::Found(verified.clone()),
            Err(AppError::Unauthenticated(reason)) => Self::Refused(reason),
            Err(AppError::Unavailable(unavailable)) => Self::Fault(Some(unavailable.clone())),
            Err(AppError::Internal(_)) => Self::Fault(None),
            Err(_) => Self::Other,
        }
    }
}

/// The one reload of a key under way. Its answer goes to the requests waiting for it
/// ([`Self::finish`]); dropped unfinished (its request went away), it wakes them to read the store
/// themselves.
struct ReloadFlight<'a> {
    reloads: &'a Reloads,
    key: CacheKey,
    answer: tokio::sync::watch::Sender<Option<Reloaded>>,
    finished: bool,
}

impl ReloadFlight<'_> {
    fn finish(mut self, reloaded: Reloaded) {
        // Out of the map first: a request coming from now on starts a reload of its own rather
        // than take this answer again when it finds it outdated.
        self.leave();
        self.answer.send_replace(Some(reloaded));
    }

    fn leave(&mut self) {
        if !std::mem::replace(&mut self.finished, true) {
            self.reloads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.key);
        }
    }
}

impl Drop for ReloadFlight<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A user's principal, valid until `until` unless the user's grants changed after `loaded`.
#[derive(Clone)]
struct CachedUser {
    principal: Principal,
    loaded: Instant,
    until: Instant,
}

/// Cache sizing and lifetimes.
///
/// Eviction rule: known entries exist only for real, live credentials, so growing them takes
/// creating credentials (a management write, rate limited per credential). They share
/// `capacity` with no per-tenant quota, under quick_cache's frequency-aware eviction (an entry used
/// again is kept over one used once): size `capacity` above the credentials in active use across
/// all tenants. Unknown secrets go to the separate `negative_capacity` and evict only each other.
/// A known entry counts for what it holds ([`EntryWeight`]), so `capacity` bounds memory whatever
/// the tenants' credentials hold.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Known (valid) credentials, as ordinary ones: one holding more counts as several.
    pub capacity: usize,
    /// Unknown secrets, remembered for `negative_ttl`.
    pub negative_capacity: usize,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    /// How long past `positive_ttl` a cached valid credential keeps verifying while the store
    /// cannot answer; zero turns stale-if-error off.
    pub stale_if_error: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            negative_capacity: 10_000,
            positive_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(2),
            stale_if_error: Duration::from_secs(300),
        }
    }
}

/// The reason a revoked credential is refused for, and so a canary too: logs and metrics must not
/// tell them apart.
const REVOKED: &str = "unknown or revoked";
/// The reason a secret that is not a keyplane token's shape is refused for.
const MALFORMED: &str = "malformed";

/// After a store fault, stale-servable entries are served without asking the store again for this
/// long, so an outage does not make every verification wait for the store's timeout. Past it, until
/// a load succeeds, one reload at a time (a probe) asks the store whether it is back, while the
/// others answer stale at once: a failing load takes the store's own timeout (the PostgreSQL
/// pool's `acquire_timeout`, 5 s) to fail.
const STORE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct Verifier {
    store: Arc<dyn Store>,
    usage: Arc<UsageRecorder>,
    metrics: Metrics,
    config: CacheConfig,
    /// Known credentials, by the presented secret's [`CacheKey`].
    cache: quick_cache::sync::Cache<CacheKey, Arc<Verified>, EntryWeight>,
    /// The most one entry may weigh: half a shard of `cache`, which admits nothing heavier than
    /// its share, so that a fat credential is still cached (if a shard's worth of memory is).
    heaviest: u64,
    /// Unknown secrets, until when they are known to be unknown.
    unknown: quick_cache::sync::Cache<CacheKey, Instant>,
    /// The caches' keys: a keyed hash, cheaper than the SHA-256 a miss looks up.
    keys: CacheKeyer,
    /// The origin of the instants below, kept as atomics for the hot path.
    epoch: Instant,
    /// When an [`Invalidation::Reset`] last arrived (nanoseconds after `epoch`, 0: never): every
    /// entry loaded before it must be reloaded.
    reset_at: AtomicU64,
    /// When a load last failed on a store fault (nanoseconds after `epoch`), 0: none since the
    /// store last answered.
    store_fault_at: AtomicU64,
    /// Taken by the one reload that asks a faulty store whether it is back ([`StoreProbe`]).
    probing: AtomicBool,
    /// Reloads under way, which other requests for the same key wait for.
    reloads: Reloads,
    /// Subjects invalidated within the last `positive_ttl`, and when: an entry loaded before its
    /// subject's invalidation is stale. Older marks are pruned; the entries they would catch have
    /// expired anyway.
    invalidated: RwLock<HashMap<uuid::Uuid, Instant>>,
    /// The scope sets cached credentials hold, one copy per organization and set; taken only when
    /// a credential is loaded, and pruned of sets no entry holds.
    rights: Mutex<HashMap<(TenantId, ScopeSet), Arc<Rights>>>,
    any_invalidated: AtomicBool,
    /// `None` when no issuer is configured: then no JWT authenticates.
    oidc: Option<Oidc>,
    users: quick_cache::sync::Cache<CacheKey, CachedUser>,
    /// Organizations' registries, once read: a registry is never changed nor removed once
    /// enabled, so a robot whose secret the caches serve logs in through a store outage too, and
    /// a login costs no store read for it.
    registries: quick_cache::sync::Cache<TenantId, Registry>,
    /// Known credentials presented when revoked, expired or of the wrong kind.
    refusals: Arc<crate::audit::Refusals>,
    /// What expiry, grace periods and suspension are judged against.
    clock: crate::config::Clock,
    /// Where canary presentations are recorded.
    canaries: CanaryAlarm,
    /// The failed-authentication limit (`None`: off): an address over its budget gets no store
    /// lookups for secrets the caches do not hold.
    failed_auth: Option<Arc<crate::failed_auth::FailedAuthLimiter>>,
    /// Introspection's budget of lookups that find nothing, per caller's organization (`None`:
    /// off).
    introspection_misses: Option<IntrospectionMisses>,
    /// Imported keys' prefixes, asked only about what keyplane's own format refused.
    legacy: keyplane_core::legacy_token::LegacyPrefixes,
}

impl Verifier {
    /// Sized and timed by `settings`' `verify_cache`, users' tokens validated by its `oidc` issuer,
    /// expiry judged by its `clock`.
    pub fn new(
        store: Arc<dyn Store>,
        usage: Arc<UsageRecorder>,
        metrics: Metrics,
        settings: &crate::config::Config,
        refusals: Arc<crate::audit::Refusals>,
        failed_auth: Option<Arc<crate::failed_auth::FailedAuthLimiter>>,
    ) -> Self {
        let config = settings.verify_cache.clone();
        let clock = settings.clock.clone();
        let oidc = settings
            .oidc
            .clone()
            .map(|config| Oidc::new(config, &metrics));
        if let Some(oidc) = &oidc {
            oidc.warm_up();
        }
        let capacity = config.capacity.max(1);
        let cache = quick_cache::sync::Cache::with_weighter(capacity, capacity as u64, EntryWeight);
        Self {
            heaviest: (cache.shard_capacity() / 2).max(1),
            cache,
            canaries: CanaryAlarm::new(
                store.clone(),
                clock.clone(),
                settings.tenant_rate_limit_per_minute,
            ),
            unknown: quick_cache::sync::Cache::new(config.negative_capacity.max(1)),
            keys: CacheKeyer::random(),
            epoch: Instant::now(),
            reset_at: AtomicU64::new(0),
            store_fault_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            reloads: Mutex::new(HashMap::new()),
            users: quick_cache::sync::Cache::new(config.capacity.max(1)),
            registries: quick_cache::sync::Cache::new(config.capacity.max(1)),
            oidc,
            store,
            usage,
            metrics,
            config,
            invalidated: RwLock::new(HashMap::new()),
            rights: Mutex::new(HashMap::new()),
            any_invalidated: AtomicBool::new(false),
            refusals,
            clock,
            failed_auth,
            introspection_misses: IntrospectionMisses::new(settings.introspect_misses_per_minute),
            legacy: settings.legacy_token_prefixes.clone(),
        }
    }

    /// Where canary presentations are recorded (also leak reports', and drained by `serve`).
    pub(crate) fn canaries(&self) -> &CanaryAlarm {
        &self.canaries
    }

    /// Forgets what is cached about `subject` (a credential, or a grant's subject).
    pub fn invalidate(&self, event: Invalidation) {
        match event {
            // An echo too: the commit's answer may have been lost before this replica marked it.
            Invalidation::Subject(subject)
            | Invalidation::InTenant(_, subject)
            | Invalidation::Echo(subject) => {
                let mut marks = self.invalidated.write().unwrap_or_else(|p| p.into_inner());
                marks.insert(subject, Instant::now());
                self.any_invalidated.store(true, Ordering::Release);
            }
            Invalidation::Listening(_) => {}
            Invalidation::Reset => {
                // Known entries stay, marked for reload, so stale-if-error can still serve them
                // if the store is what failed.
                self.reset_at
                    .store(self.nanos_since_epoch(), Ordering::Release);
                self.unknown.clear();
                self.users.clear();
            }
        }
    }

    /// Now, as nanoseconds after `epoch` (at least 1, so 0 can mean never).
    fn nanos_since_epoch(&self) -> u64 {
        self.nanos_at(Instant::now())
    }

    /// `at` as nanoseconds after `epoch` (at least 1, so 0 can mean never).
    fn nanos_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Whether the event recorded in `mark` happened at or after `at` (nanoseconds after `epoch`).
    fn marked_since(mark: &AtomicU64, at: u64) -> bool {
        let marked = mark.load(Ordering::Acquire);
        marked != 0 && marked >= at
    }

    /// Drops invalidation marks older than any cache entry can be.
    pub fn prune(&self) {
        let mut marks = self.invalidated.write().unwrap_or_else(|p| p.into_inner());
        // Entries live for up to `positive_ttl + stale_if_error`: marks must outlive them.
        let horizon = self.config.positive_ttl + self.config.stale_if_error;
        marks.retain(|_, at| at.elapsed() <= horizon);
        self.any_invalidated
            .store(!marks.is_empty(), Ordering::Release);
        drop(marks);
        // A scope set no cached credential holds any more.
        self.rights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, rights| Arc::strong_count(rights) > 1);
        self.canaries.prune();
        if let Some(budget) = &self.introspection_misses {
            budget.prune();
        }
    }

    /// How long ago `at` (nanoseconds after `epoch`) was, on the coarse clock, in nanoseconds.
    /// Integers throughout: making an `Instant` of `at` would divide by 10^9 on every cache hit.
    fn coarse_age(&self, at: u64) -> u128 {
        let now = crate::coarse_clock::now().saturating_duration_since(self.epoch);
        now.as_nanos().saturating_sub(u128::from(at))
    }

    fn is_fresh(&self, known: &Verified) -> bool {
        let loaded = known.loaded.load(Ordering::Acquire);
        // A canary lives as long as a revoked secret's negative entry would (`CanaryEntry`).
        let ttl = if known.gate.canary {
            self.config.negative_ttl
        } else {
            self.config.positive_ttl
        };
        self.coarse_age(loaded) <= ttl.as_nanos()
            && !Self::marked_since(&self.reset_at, loaded)
            && !self.entry_invalidated(known, loaded)
    }

    /// Whether `known`'s credential was invalidated since it was `loaded`. Reads the identity
    /// (another memory fetch) only when some subject was invalidated recently.
    fn entry_invalidated(&self, known: &Verified, loaded: u64) -> bool {
        self.any_invalidated.load(Ordering::Acquire)
            && self.invalidated_since(
                known.credential.id.as_uuid(),
                self.epoch + Duration::from_nanos(loaded),
            )
    }

    /// Whether `known` may answer while the store cannot: young enough, and its credential not
    /// changed since (a reset alone does not say it changed).
    fn may_serve_stale(&self, known: &Verified) -> bool {
        let loaded = known.loaded.load(Ordering::Acquire);
        // A revoked secret is never served stale (its negative entry is not kept past its time):
        // neither is a canary, which must answer as one does (503 while the store is away).
        !known.gate.canary
            && !self.config.stale_if_error.is_zero()
            && self.coarse_age(loaded)
                <= (self.config.positive_ttl + self.config.stale_if_error).as_nanos()
            && !self.entry_invalidated(known, loaded)
    }

    /// Whether `subject` was invalidated at or after `loaded`.
    fn invalidated_since(&self, subject: uuid::Uuid, loaded: Instant) -> bool {
        if !self.any_invalidated.load(Ordering::Acquire) {
            return false;
        }
        let marks = self.invalidated.read().unwrap_or_else(|p| p.into_inner());
        marks.get(&subject).is_some_and(|at| *at >= loaded)
    }

    /// Verifies a presented secret of any kind, recording the outcome in metrics and the use in
    /// `last_used_at`.
    pub async fn verify_secret(
        &self,
        presented: &str,
        at: Presented<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        let (result, now) = self.verify_uncounted(presented, None, at).await;
        self.count(result.as_ref(), &now);
        result
    }

    /// Records a verification's outcome: metrics, and `last_used_at` for a success. `now` is the
    /// instant the verification judged expiry against: one clock read per verification.
    fn count(&self, outcome: Result<&Arc<Verified>, &AppError>, now: &VerificationTime<'_>) {
        match outcome {
            Ok(verified) => {
                self.metrics.credential_verified(verified.gate.kind);
                self.usage.record(verified, now.get());
            }
            Err(AppError::Unauthenticated(reason)) => self.metrics.credential_rejected(reason),
            Err(_) => {}
        }
    }

    /// A credential authenticating itself at forward-auth, whoami or as an introspection caller:
    /// any live credential but a robot secret, which logs in to the registry only.
    pub async fn verify_bearer(
        &self,
        presented: &str,
        at: Presented<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        let found = self.find(presented, None, at).await;
        self.settle_bearer(found, at)
    }

    /// [`Self::verify_bearer`] from the caches alone, without a future to build and poll: `None`
    /// when only the store can tell, and nothing was counted (ask `verify_bearer` then).
    pub(crate) fn verify_bearer_cached(
        &self,
        presented: &str,
        at: Presented<'_>,
    ) -> Option<Result<Arc<Verified>, AppError>> {
        let found = self.find_cached(presented)?;
        Some(self.settle_bearer(found, at))
    }

    /// A found bearer credential admitted, or refused, and counted.
    fn settle_bearer(
        &self,
        found: Result<Arc<Verified>, AppError>,
        at: Presented<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        let (admitted, now) = self.admitted(found, at);
        let result = admitted.and_then(|verified| {
            match verified.credential.kind {
                CredentialKind::RobotAccount => {
                    // Robot secrets log in to the registry only.
                    self.refuse(&verified.credential, "robot secret", at);
                    Err(AppError::Unauthenticated("robot secret"))
                }
                _ => Ok(verified),
            }
        });
        self.count(result.as_ref(), &now);
        result
    }

    /// An introspected secret, for a caller of `tenant`: live, of that tenant, and not a robot
    /// secret. Anything else is `Unauthenticated` (inactive) and does not count as a use: another
    /// tenant's credential keeps its `last_used_at`. A store lookup that finds nothing is charged
    /// to `tenant`'s budget (`introspection_misses`): past it, `RateLimited`.
    pub async fn introspect(
        &self,
        presented: &str,
        tenant: TenantId,
        at: Presented<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        let (admitted, now) = self.verify_uncounted(presented, Some(tenant), at).await;
        let result = admitted.and_then(|verified| match &verified.credential {
            c if c.tenant_id != tenant => Err(AppError::Unauthenticated("another tenant")),
            c if c.kind == CredentialKind::RobotAccount => {
                Err(AppError::Unauthenticated("robot secret"))
            }
            _ => Ok(verified),
        });
        self.count(result.as_ref(), &now);
        result
    }

    /// `presented` found and admitted, not yet counted: the outcome, and the time it was judged
    /// against, for `count` once the caller's own checks are done.
    async fn verify_uncounted(
        &self,
        presented: &str,
        introspected_for: Option<TenantId>,
        at: Presented<'_>,
    ) -> (Result<Arc<Verified>, AppError>, VerificationTime<'_>) {
        let found = self.find(presented, introspected_for, at).await;
        self.admitted(found, at)
    }

    /// A found credential admitted or refused (`admit`), not yet counted, and the time it was
    /// judged against.
    fn admitted(
        &self,
        found: Result<Arc<Verified>, AppError>,
        at: Presented<'_>,
    ) -> (Result<Arc<Verified>, AppError>, VerificationTime<'_>) {
        let now = VerificationTime::new(&self.clock);
        let admitted = found.and_then(|verified| self.admit(verified, at, &now));
        (admitted, now)
    }

    /// The cached or stored credential `presented` is a secret of, if it is well-formed, known
    /// and of the kind its format says. Reads no clock. `introspected_for`: the introspecting
    /// caller's organization, whose budget a store lookup that finds nothing is charged to.
    async fn find(
        &self,
        presented: &str,
        introspected_for: Option<TenantId>,
        at: Presented<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        let key = self.key_of(presented)?;
        let verified = match self.lookup_cached(&key) {
            Some(found) => found?,
            None => {
                self.check_format(presented)?;
                self.lookup_stored(key, presented, introspected_for, at)
                    .await?
            }
        };
        self.of_kind(verified, presented)
    }

    /// [`Self::find`] from the caches alone: `None` when only the store can tell, or the format
    /// has to be checked.
    fn find_cached(&self, presented: &str) -> Option<Result<Arc<Verified>, AppError>> {
        let key = match self.key_of(presented) {
            Ok(key) => key,
            Err(malformed) => return Some(Err(malformed)),
        };
        let found = self.lookup_cached(&key)?;
        Some(found.and_then(|verified| self.of_kind(verified, presented)))
    }

    /// `presented`'s key in the caches, or a malformed secret when it is longer than any
    /// credential. Its format is checked on a miss only ([`Self::check_format`]): the caches
    /// hold keys of well-formed secrets alone (`load` follows the check), and a key decides a hit.
    fn key_of(&self, presented: &str) -> Result<CacheKey, AppError> {
        self.keys
            .key_of_presented(presented)
            .ok_or(AppError::Unauthenticated(MALFORMED))
    }

    /// Prefix, length, alphabet and checksum (`token::kind_of`), before the store is asked; only
    /// a secret that fails them is asked about the configured legacy prefixes.
    fn check_format(&self, presented: &str) -> Result<(), AppError> {
        match token::kind_of(presented) {
            Ok(_) => Ok(()),
            Err(_) if self.legacy.kind_of(presented).is_some() => Ok(()),
            Err(_) => Err(AppError::Unauthenticated(MALFORMED)),
        }
    }

    /// A secret's format (or its configured legacy prefix) names its kind: one that found another
    /// kind's credential is unknown. A keyplane token's prefix answers first, so its check costs
    /// what it did before legacy prefixes.
    fn of_kind(&self, verified: Arc<Verified>, presented: &str) -> Result<Arc<Verified>, AppError> {
        let named = token::kind_named(presented).or_else(|| self.legacy.kind_named(presented));
        if named != Some(verified.gate.kind) {
            return Err(AppError::Unauthenticated("unknown"));
        }
        Ok(verified)
    }

    /// Whether a found credential may be used as of `now` (read only here, once it is found).
    fn admit(
        &self,
        verified: Arc<Verified>,
        at: Presented<'_>,
        now: &VerificationTime<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        let gate = &verified.gate;
        if gate.canary {
            // Whatever the surface, kind or state: refused as a revoked credential is.
            let Some(entry) = verified.canary.as_deref() else {
                return Err(AppError::Unauthenticated(REVOKED));
            };
            self.canaries.presented(&entry.record, at());
            let reason = if entry.answered.swap(true, Ordering::Relaxed) {
                "unknown"
            } else {
                REVOKED
            };
            return Err(AppError::Unauthenticated(reason));
        }
        // The entry is keyed by the presented hash, so its secret slot was settled at load.
        if let Err(why) = gate.check(now.get()) {
            self.refuse(&verified.credential, why.as_str(), at);
            return Err(AppError::Unauthenticated(why.as_str()));
        }
        Ok(verified)
    }

    /// What the caches say of `hash`: a fresh known credential, or one known to be unknown;
    /// `None` when only the store can tell ([`Self::lookup_stored`]). Known credentials are looked
    /// up first: they are what a verification finds almost always, and a key is never in both
    /// caches (loading one drops it from the other).
    fn lookup_cached(&self, key: &CacheKey) -> Option<Result<Arc<Verified>, AppError>> {
        let cached = self.cache.get(key);
        if cached.is_none()
            && self
                .unknown
                .get(key)
                .is_some_and(|until| Instant::now() < until)
        {
            self.metrics
                .verify_cache(crate::metrics::CacheOutcome::Unknown);
            return Some(Err(AppError::Unauthenticated("unknown")));
        }
        let known = cached.filter(|known| self.is_fresh(known))?;
        // A revoked credential would be in the negative cache: count a canary as it would be.
        self.metrics.verify_cache(if known.gate.canary {
            crate::metrics::CacheOutcome::Unknown
        } else {
            crate::metrics::CacheOutcome::Hit
        });
        Some(Ok(known))
    }

    /// The store, for what the caches could not answer ([`Self::lookup_cached`]); an entry past
    /// its time to live answers, stale, when the store cannot.
    async fn lookup_stored(
        &self,
        key: CacheKey,
        presented: &str,
        introspected_for: Option<TenantId>,
        at: Presented<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        let cached = self.cache.get(&key);
        // Only for what no cache held: a reload is of a credential known to exist.
        let miss_budget = self
            .introspection_misses
            .as_ref()
            .zip(introspected_for)
            .filter(|_| cached.is_none());
        if cached.is_none() {
            self.refuse_over_failure_budget(at)?;
        }
        if let Some((budget, caller)) = miss_budget {
            budget.refuse_while_over(caller)?;
        }
        let outcome = match cached {
            // A revoked secret is never reloaded: it is read anew once the negative cache forgets
            // it. A canary's reload is counted as that.
            Some(ref known) if !known.gate.canary => crate::metrics::CacheOutcome::Reload,
            _ => crate::metrics::CacheOutcome::Miss,
        };
        let servable = cached
            .as_ref()
            .filter(|known| self.may_serve_stale(known))
            .cloned();
        // The store failed and has not answered since: an entry that may answer stale does so,
        // unless it is the one probe, when the retry interval has passed and no other is under way.
        let fault_seen = self.store_fault_at.load(Ordering::Acquire);
        let mut probe = None;
        if let Some(known) = servable.as_ref().filter(|_| fault_seen != 0) {
            probe = self
                .recent_fault_retried(fault_seen)
                .then(|| self.probe())
                .flatten();
            if probe.is_none() {
                self.metrics
                    .verify_cache(crate::metrics::CacheOutcome::Stale);
                return Ok(known.clone());
            }
        }
        // Boxed: the load's state (the store's answer, a whole record) would otherwise be part of
        // every verification's future, a cache hit's too, and make each one that much larger to
        // build and move (callgrind: ~2 KiB futures, a memcpy of them per request).
        let loading = self.load_once(outcome, key, presented, cached.as_ref(), miss_budget, at);
        let result = match Box::pin(loading).await {
            Err(fault @ (AppError::Unavailable(_) | AppError::Internal(_))) => {
                self.store_fault_at
                    .store(self.nanos_since_epoch(), Ordering::Release);
                match servable {
                    Some(known) => {
                        tracing::debug!(credential.id = %known.credential.id, error = %fault, "store fault: answering from the cache (stale-if-error)");
                        self.metrics
                            .verify_cache(crate::metrics::CacheOutcome::Stale);
                        Ok(known)
                    }
                    None => Err(fault),
                }
            }
            answered => {
                // The store answered: unless it failed again meanwhile, it is back.
                if fault_seen != 0 {
                    let _ = self.store_fault_at.compare_exchange(
                        fault_seen,
                        0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                answered
            }
        };
        drop(probe);
        result
    }

    /// Counts the lookup as `outcome` and loads, but a reload only once at a time per key: a
    /// request finding another's reload of its entry under way waits for that one's answer
    /// (counted `Coalesced`), bounded as that reload is by the store's read deadlines. A fault is
    /// returned as the reload's own would be, so `lookup_stored` answers stale if it may.
    async fn load_once(
        &self,
        outcome: crate::metrics::CacheOutcome,
        key: CacheKey,
        presented: &str,
        cached: Option<&Arc<Verified>>,
        miss_budget: Option<(&IntrospectionMisses, TenantId)>,
        at: Presented<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        if outcome != crate::metrics::CacheOutcome::Reload {
            self.metrics.verify_cache(outcome);
            return self.load(key, presented, cached, miss_budget, at).await;
        }
        loop {
            let waiting = match self.join_reload(key) {
                Ok(flight) => {
                    self.metrics.verify_cache(outcome);
                    let loaded = self.load(key, presented, cached, miss_budget, at).await;
                    flight.finish(Reloaded::of(&loaded));
                    return loaded;
                }
                Err(waiting) => waiting,
            };
            if let Some(answer) = self.reload_awaited(waiting).await {
                self.metrics
                    .verify_cache(crate::metrics::CacheOutcome::Coalesced);
                return answer;
            }
            // Another reload may have refreshed it meanwhile.
            if let Some(fresh) = self.cache.get(&key).filter(|known| self.is_fresh(known)) {
                self.metrics
                    .verify_cache(crate::metrics::CacheOutcome::Coalesced);
                return Ok(fresh);
            }
        }
    }

    /// The reload of `key` for this request to make, or the one under way to wait for.
    fn join_reload(
        &self,
        key: CacheKey,
    ) -> Result<ReloadFlight<'_>, tokio::sync::watch::Receiver<Option<Reloaded>>> {
        let mut reloads = self.reloads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(under_way) = reloads.get(&key) {
            return Err(under_way.clone());
        }
        let (answer, waiting) = tokio::sync::watch::channel(None);
        reloads.insert(key, waiting);
        Ok(ReloadFlight {
            reloads: &self.reloads,
            key,
            answer,
            finished: false,
        })
    }

    /// The answer of the reload `waiting` is for, as this request's; `None` when this request must
    /// read the store itself: the reload was given up (its request went away), or the credential
    /// was invalidated after its read began (a reset, or a change this request may have to see).
    async fn reload_awaited(
        &self,
        mut waiting: tokio::sync::watch::Receiver<Option<Reloaded>>,
    ) -> Option<Result<Arc<Verified>, AppError>> {
        let reloaded = match waiting.wait_for(Option::is_some).await {
            Ok(answer) => (*answer).clone()?,
            Err(_) => return None,
        };
        match reloaded {
            Reloaded::Found(verified) => {
                let loaded = verified.loaded.load(Ordering::Acquire);
                let outdated = Self::marked_since(&self.reset_at, loaded)
                    || self.entry_invalidated(&verified, loaded);
                (!outdated).then_some(Ok(verified))
            }
            Reloaded::Refused(reason) => Some(Err(AppError::Unauthenticated(reason))),
            Reloaded::Fault(Some(unavailable)) => Some(Err(AppError::Unavailable(unavailable))),
            Reloaded::Fault(None) => Some(Err(AppError::Internal(anyhow::anyhow!(
                "the reload this verification waited for failed"
            )))),
            Reloaded::Other => None,
        }
    }

    /// Refuses a request presenting what the caches do not hold from an address over its failure
    /// budget, before any lookup or signature check. Describes the request (`at`) only while some
    /// address is over. A 429 itself, as the address's failures get: a 401 left for
    /// `FailureWatch::finish` would stay one if the block ended meanwhile, telling a client whose
    /// secret was never looked up that it is wrong.
    fn refuse_over_failure_budget(&self, at: Presented<'_>) -> Result<(), AppError> {
        let Some(limiter) = self.failed_auth.as_ref() else {
            return Ok(());
        };
        if !limiter.any_blocked() {
            return Ok(());
        }
        match at().client.and_then(|client| limiter.blocked_for(client)) {
            Some(wait) => Err(AppError::RateLimited {
                retry_after_secs: crate::error::retry_after_secs(wait),
            }),
            None => Ok(()),
        }
    }

    /// Whether the retry interval has passed since the store fault recorded as `fault_at`.
    fn recent_fault_retried(&self, fault_at: u64) -> bool {
        let retry_interval = u64::try_from(STORE_RETRY_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
        self.nanos_since_epoch().saturating_sub(fault_at) >= retry_interval
    }

    /// The probe's turn, if no other reload holds it.
    fn probe(&self) -> Option<StoreProbe<'_>> {
        // Made only when taken: a `StoreProbe` dropped gives the turn up.
        (!self.probing.swap(true, Ordering::AcqRel)).then(|| StoreProbe(&self.probing))
    }

    /// Whether an answer given now may come from the cache without the store's confirmation:
    /// the store failed and has not answered since ([`STORE_RETRY_INTERVAL`]: until then a single
    /// probe at a time asks it), so cached credentials answer stale (stale-if-error) and may miss a
    /// change made through another replica. Introspection says so (`X-Keyplane-Stale`) for
    /// embedded verifiers, which may know of such a change.
    pub(crate) fn answering_stale(&self) -> bool {
        self.store_fault_at.load(Ordering::Acquire) != 0
    }

    /// Notes a known credential's refusal for the audit trail (aggregated, off the store path),
    /// with where the request came from, so an auditor can tell where a revoked or expired
    /// credential is still in use.
    fn refuse(&self, credential: &CredentialIdentity, reason: &str, at: Presented<'_>) {
        self.refusals
            .credential_refused(credential, reason, at().context, &self.metrics);
    }

    /// Reads `presented`'s credential from the store (by its SHA-256, as the store keeps it) and
    /// caches what it found under `key`; `cached` is the entry this reload replaces, refreshed in
    /// place instead when the credential has not changed. A lookup that finds no live credential
    /// (a secret the store does not know, or a revoked one: an organization may hold any number of
    /// those, and each is only briefly cached) is charged to `miss_budget`, an introspecting
    /// organization's.
    async fn load(
        &self,
        key: CacheKey,
        presented: &str,
        cached: Option<&Arc<Verified>>,
        miss_budget: Option<(&IntrospectionMisses, TenantId)>,
        at: Presented<'_>,
    ) -> Result<Arc<Verified>, AppError> {
        let loaded = Instant::now();
        let hash = TokenHash::of(presented);
        let found = self.store.find_credential_by_hash(&hash).await?;
        if let Some(revoked) = found.as_ref().filter(|c| c.is_revoked()) {
            self.refuse(&revoked.identity(), "revoked", at);
        }
        let Some(credential) = found.filter(|c| !c.is_revoked()) else {
            self.cache.remove(&key);
            self.unknown.insert(key, loaded + self.config.negative_ttl);
            if let Some((budget, caller)) = miss_budget {
                budget.charge_miss(caller)?;
            }
            return Err(AppError::Unauthenticated(REVOKED));
        };
        // A canary holds nothing, whatever scopes or grants it was given for show.
        let rights = if credential.canary {
            ScopeSet::empty()
        } else {
            crate::ops::rights_of(self.store.as_ref(), &credential).await?
        };
        let secret = if credential.secret_hash.matches(&hash) {
            SecretSlot::Current
        } else {
            SecretSlot::Previous
        };
        let loaded = self.nanos_at(loaded);
        let gate = credential.gate(secret);
        let identity = credential.identity();
        let rights = self.interned(credential.tenant_id, rights);
        let unchanged = cached.filter(|known| {
            // A canary's entry holds its whole record, which the comparison does not cover.
            !gate.canary
                && known.gate == gate
                && known.secret == secret
                && known.credential == identity
                && Arc::ptr_eq(&known.rights, &rights)
        });
        let verified = match unchanged {
            Some(known) => {
                // `fetch_max`: a slower reload that began earlier must not make it look older.
                known.loaded.fetch_max(loaded, Ordering::AcqRel);
                known.clone()
            }
            None => {
                let canary = credential.canary.then(|| {
                    Box::new(CanaryEntry {
                        record: credential,
                        answered: AtomicBool::new(false),
                    })
                });
                Arc::new(Verified {
                    gate,
                    secret,
                    loaded: AtomicU64::new(loaded),
                    weight: entry_weight(&identity, &rights, canary.as_deref(), self.heaviest),
                    last_use: Default::default(),
                    credential: identity,
                    rights,
                    presented: hash.prefix(),
                    canary,
                })
            }
        };
        self.unknown.remove(&key);
        self.cache.insert(key, verified.clone());
        Ok(verified)
    }

    /// The one shared copy of `scopes` for `tenant`'s credentials.
    fn interned(&self, tenant: TenantId, scopes: ScopeSet) -> Arc<Rights> {
        let mut rights = self.rights.lock().unwrap_or_else(|p| p.into_inner());
        rights
            .entry((tenant, scopes))
            .or_insert_with_key(|(tenant, scopes)| Arc::new(Rights::new(*tenant, scopes)))
            .clone()
    }

    /// A management API caller: a user's JWT access token, or any live credential but a robot
    /// secret.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        at: Presented<'_>,
    ) -> Result<Principal, AppError> {
        let presented = bearer_token(headers)?;
        if crate::oidc::looks_like_jwt(presented) {
            let result = self.authenticate_user(presented, at).await;
            if let Err(AppError::Unauthenticated(reason)) = &result {
                self.metrics.credential_rejected(reason);
            }
            return result;
        }
        Ok(self.verify_bearer(presented, at).await?.principal())
    }

    async fn authenticate_user(
        &self,
        token: &str,
        at: Presented<'_>,
    ) -> Result<Principal, AppError> {
        let oidc = self.oidc.as_ref().ok_or(AppError::Unauthenticated(
            "jwt but no oidc issuer configured",
        ))?;
        let key = self.keys.key(token);
        if let Some(hit) = self.users.get(&key) {
            // A load that began before a reset may have read grants a lost notification changed:
            // the reset clears the cache, but such a load inserts after it.
            if Instant::now() < hit.until
                && !Self::marked_since(&self.reset_at, self.nanos_at(hit.loaded))
                && !self.invalidated_since(hit.principal.id(), hit.loaded)
            {
                return Ok(hit.principal);
            }
        }
        self.refuse_over_failure_budget(at)?;
        let loaded = Instant::now();
        let access = oidc.validate(token).await?;
        let rights = crate::ops::rights_of_user(self.store.as_ref(), access.user).await?;
        let principal = Principal::for_user(access.user, rights, Some(access.expires_at))
            .with_user_identity(access.issuer, access.subject);
        let to_expiry = (access.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        self.users.insert(
            key,
            CachedUser {
                principal: principal.clone(),
                loaded,
                until: loaded + self.config.positive_ttl.min(to_expiry),
            },
        );
        Ok(principal)
    }

    /// A robot's registry login: a live robot secret, whose tenant has a registry, presented under
    /// its own login name `robot$<project>+<name>`. A refusal is counted here; a success only
    /// once its token is issued ([`Self::robot_logged_in`]): a login refused later (its scopes,
    /// its service, its rate limit) is not a use that keeps a previous secret alive.
    pub(crate) async fn authenticate_robot(
        &self,
        username: &str,
        secret: &str,
        at: Presented<'_>,
    ) -> Result<AdmittedRobot, AppError> {
        let (admitted, now) = self.verify_uncounted(secret, None, at).await;
        let admitted = admitted.and_then(|verified| {
            if verified.credential.kind != CredentialKind::RobotAccount {
                self.refuse(&verified.credential, "not a robot secret", at);
                return Err(AppError::Unauthenticated("not a robot secret"));
            }
            Ok(verified)
        });
        let result = match admitted {
            Ok(verified) => self.robot_registry(verified, username).await,
            Err(refused) => Err(refused),
        };
        match result {
            Ok((verified, registry)) => Ok(AdmittedRobot {
                verified,
                registry,
                verified_at_micros: now.get(),
            }),
            Err(refused) => {
                self.count(Err(&refused), &now);
                Err(refused)
            }
        }
    }

    /// Counts an admitted robot's login as a use, once its registry token is issued.
    pub(crate) fn robot_logged_in(&self, robot: &AdmittedRobot) {
        self.metrics.credential_verified(robot.verified.gate.kind);
        self.usage.record(&robot.verified, robot.verified_at_micros);
    }

    /// An admitted robot's registry, if it has one and `username` is the robot's login name.
    async fn robot_registry(
        &self,
        verified: Arc<Verified>,
        username: &str,
    ) -> Result<(Arc<Verified>, Registry), AppError> {
        let tenant = verified.credential.tenant_id;
        let registry = match self.registries.get(&tenant) {
            Some(registry) => registry,
            None => {
                // Not remembered while absent: the registry may be enabled any time.
                let registry = self
                    .store
                    .get_registry(tenant)
                    .await?
                    .ok_or(AppError::Unauthenticated("no registry"))?;
                self.registries.insert(tenant, registry.clone());
                registry
            }
        };
        if username
            != keyplane_core::registry::robot_username(&registry.project, &verified.credential.name)
        {
            return Err(AppError::Unauthenticated("robot name mismatch"));
        }
        Ok((verified, registry))
    }
}

/// A robot whose registry login [`Verifier::authenticate_robot`] admitted, not yet counted as a
/// use.
pub(crate) struct AdmittedRobot {
    pub verified: Arc<Verified>,
    pub registry: Registry,
    verified_at_micros: i64,
}

/// The token from `Authorization: Bearer <token>` (scheme case-insensitive).
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, AppError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| AppError::Unauthenticated("missing"))?
        .as_bytes();
    // What `HeaderValue::to_str` accepts: a header value holds no control byte but tab, so ASCII
    // is visible ASCII. Checked a word at a time (`to_str` goes byte by byte). The errors are
    // made only when returned (`ok_or` would make and drop one on every verification).
    let value = std::str::from_utf8(value)
        .ok()
        .filter(|value| value.is_ascii())
        .ok_or(AppError::Unauthenticated(MALFORMED))?;
    let space = value
        .bytes()
        .position(|b| b == b' ')
        .ok_or(AppError::Unauthenticated(MALFORMED))?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AppError::Unauthenticated("not a bearer credential"));
    }
    Ok(token.trim_ascii())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use keyplane_core::{FieldPath, NewCredential, Plaintext};

    #[test]
    fn bearer_token_reads_the_authorization_header() {
        let read = |value: Option<&[u8]>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                let value = axum::http::HeaderValue::from_bytes(value).unwrap();
                headers.insert(header::AUTHORIZATION, value);
            }
            match bearer_token(&headers) {
                Ok(token) => Ok(token.to_string()),
                Err(AppError::Unauthenticated(reason)) => Err(reason),
                Err(other) => panic!("{other:?}"),
            }
        };
        assert_eq!(read(Some(b"Bearer kp_abc")), Ok("kp_abc".into()));
        assert_eq!(read(Some(b"bEaReR   kp_abc \t")), Ok("kp_abc".into()));
        assert_eq!(read(Some(b"Bearer ")), Ok(String::new()));
        assert_eq!(read(None), Err("missing"));
        assert_eq!(read(Some(b"Bearer")), Err("malformed"));
        assert_eq!(read(Some(b"Bearer\tkp_abc")), Err("malformed"));
        // Bytes a header may hold but `to_str` refuses, in the scheme or in the token.
        assert_eq!(read(Some(b"Bearer kp_\xc3\xa9")), Err("malformed"));
        assert_eq!(read(Some(b"B\xe9arer kp_abc")), Err("malformed"));
        assert_eq!(
            read(Some(b"Basic a3A6YWJj")),
            Err("not a bearer credential")
        );
        assert_eq!(
            read(Some(b"Bearerx kp_abc")),
            Err("not a bearer credential")
        );
    }

    /// A SQLite store in a temporary directory, kept as long as the directory is.
    pub(crate) async fn sqlite_store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let url = keyplane_store::sqlite_url_for_data_dir(dir.path());
        (dir, keyplane_store::connect(&url).await.unwrap())
    }

    /// An API token of `tenant` holding `scopes`, in the store.
    pub(crate) async fn token(store: &dyn Store, tenant: TenantId, scopes: &[&str]) -> Plaintext {
        let (credential, secret) = issued(tenant, scopes);
        store.import_credentials(&[credential], &[]).await.unwrap();
        secret
    }

    /// An API token of `tenant` holding `scopes`, not yet stored.
    fn issued(tenant: TenantId, scopes: &[&str]) -> (keyplane_core::Credential, Plaintext) {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        NewCredential {
            tenant_id: tenant,
            kind: CredentialKind::ApiToken,
            name: uuid::Uuid::new_v4().to_string(),
            scopes: ScopeSet::parse_list(&FieldPath::body("scopes"), &scopes).unwrap(),
            permissions: Vec::new(),
            expires_at: None,
            created_by: keyplane_core::CreatedBy::system(keyplane_core::Channel::Admin),
            canary: false,
        }
        .issue(crate::ops::now(), &mut rand::rngs::OsRng)
    }

    /// A reload (here after every use: a 1 ms lifetime) that finds the credential as it was keeps
    /// its cache entry, refreshed; one that finds it changed replaces the entry.
    #[tokio::test]
    async fn a_reload_refreshes_an_unchanged_entry_in_place() {
        let (_dir, store) = sqlite_store().await;
        let tenant = crate::ops::create_org(store.as_ref(), "one", &crate::ops::tests_operator())
            .await
            .unwrap();
        let tenant = tenant.tenant.id;
        let mut config = crate::Config::default();
        config.verify_cache.positive_ttl = Duration::from_millis(1);
        let app = crate::App::new(store.clone(), config);
        let verifier = &app.inner().verifier;
        let secret = token(store.as_ref(), tenant, &["deploy"]).await;
        let secret = secret.expose_secret();
        // Past the lifetime on the coarse clock too, which moves a tick (up to 10 ms) at a time.
        let outlive = || tokio::time::sleep(Duration::from_millis(30));

        let first = app.verify_secret(secret).await.unwrap();
        let first_loaded = first.loaded.load(Ordering::Relaxed);
        outlive().await;
        let again = app.verify_secret(secret).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "unchanged: the same entry");
        assert!(
            again.loaded.load(Ordering::Relaxed) > first_loaded,
            "and it counts as just loaded"
        );
        assert!(Arc::ptr_eq(
            &verifier.cache.get(&verifier.keys.key(secret)).unwrap(),
            &first
        ));

        let id = first.credential.id;
        let suspend = |suspended: bool| {
            let store = store.clone();
            async move {
                let at = crate::ops::now();
                let event = crate::ops::audit_event(
                    tenant,
                    "api_token.suspended",
                    keyplane_core::AuditActor::system(),
                    &keyplane_core::RequestContext::default(),
                );
                let suspended_at = suspended.then_some(at);
                store
                    .set_credential_suspended(
                        tenant,
                        CredentialKind::ApiToken,
                        id,
                        suspended_at,
                        at,
                        &event,
                        None,
                    )
                    .await
                    .unwrap();
            }
        };
        suspend(true).await;
        outlive().await;
        assert!(app.verify_secret(secret).await.is_err(), "suspended");
        let suspended = verifier.cache.get(&verifier.keys.key(secret)).unwrap();
        assert!(!Arc::ptr_eq(&suspended, &first), "changed: a new entry");
        suspend(false).await;
        outlive().await;
        let resumed = app.verify_secret(secret).await.unwrap();
        assert!(!Arc::ptr_eq(&resumed, &suspended));
    }

    /// `keyplane_verify_cache_lookups_total{result}` so far (0 before its first count).
    fn lookups(verifier: &Verifier, result: &str) -> u64 {
        let series = format!("keyplane_verify_cache_lookups_total{{result=\"{result}\"}} ");
        verifier
            .metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .map_or(0, |count| count.parse().unwrap())
    }

    /// Whether `future`, polled once, is still under way.
    fn pending<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> bool {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        future.poll(&mut context).is_pending()
    }

    /// After a reset (a lost listener), concurrent verifications of one credential read the store
    /// once: the first reloads its entry and the others take its answer. One waiting for a reload
    /// whose request went away reads the store itself.
    #[tokio::test]
    async fn concurrent_reloads_of_one_entry_read_the_store_once() {
        let (_dir, store) = sqlite_store().await;
        let tenant = crate::ops::create_org(store.as_ref(), "one", &crate::ops::tests_operator())
            .await
            .unwrap();
        let app = crate::App::new(store.clone(), crate::Config::default());
        let verifier = &app.inner().verifier;
        let secret = token(store.as_ref(), tenant.tenant.id, &["deploy"]).await;
        let secret = secret.expose_secret();
        let first = app.verify_secret(secret).await.unwrap();

        // A reload under way: one whose read the store answered before its first poll returned
        // leaves nothing to wait for, so another reset tries again.
        let (leader, reloads, coalesced) = (0..100)
            .find_map(|_| {
                verifier.invalidate(Invalidation::Reset);
                let counts = (lookups(verifier, "reload"), lookups(verifier, "coalesced"));
                let mut leader = Box::pin(app.verify_secret(secret));
                pending(leader.as_mut()).then_some((leader, counts.0, counts.1))
            })
            .expect("a reload under way");
        let mut others: Vec<_> = (0..15)
            .map(|_| Box::pin(app.verify_secret(secret)))
            .collect();
        for other in &mut others {
            assert!(pending(other.as_mut()), "waiting for the reload");
        }
        assert!(Arc::ptr_eq(&leader.await.unwrap(), &first), "unchanged");
        for answer in futures::future::join_all(others).await {
            assert!(Arc::ptr_eq(&answer.unwrap(), &first), "its answer");
        }
        assert_eq!(lookups(verifier, "reload") - reloads, 1, "store reads");
        assert_eq!(lookups(verifier, "coalesced") - coalesced, 15);

        // A reload under way whose request goes away.
        verifier.invalidate(Invalidation::Reset);
        let Ok(given_up) = verifier.join_reload(verifier.keys.key(secret)) else {
            panic!("no reload under way");
        };
        let mut waiting = Box::pin(app.verify_secret(secret));
        assert!(pending(waiting.as_mut()), "waiting for that reload");
        let reloads = lookups(verifier, "reload");
        drop(given_up);
        assert!(Arc::ptr_eq(&waiting.await.unwrap(), &first));
        assert_eq!(lookups(verifier, "reload") - reloads, 1, "read it itself");
        assert!(
            verifier.reloads.lock().unwrap().is_empty(),
            "none left under way"
        );
    }

    /// The caches are keyed by the presented secret alone and checked before its format (a
    /// hit vouches for it). So a secret they do not hold is checked before the store is asked,
    /// and a hit is still held to the kind its format names.
    #[tokio::test]
    async fn the_format_is_checked_before_the_store_and_the_kind_on_every_hit() {
        let (_dir, store) = sqlite_store().await;
        let tenant = crate::ops::create_org(store.as_ref(), "one", &crate::ops::tests_operator())
            .await
            .unwrap();
        let tenant = tenant.tenant.id;
        let app = crate::App::new(store.clone(), crate::Config::default());
        let verifier = &app.inner().verifier;
        let secret = token(store.as_ref(), tenant, &["deploy"]).await;
        let secret = secret.expose_secret();
        assert!(app.verify_secret(secret).await.is_ok());

        // The last checksum digit changed: well-formed but for the checksum.
        let last = if secret.ends_with('0') { "1" } else { "0" };
        let corrupted = format!("{}{last}", &secret[..secret.len() - 1]);
        let too_long = format!("{secret}{}", "0".repeat(token::MAX_TOKEN_LEN));
        for malformed in [corrupted.as_str(), too_long.as_str(), "aether_", ""] {
            let refused = app.verify_secret(malformed).await.err().unwrap();
            assert!(
                matches!(refused, AppError::Unauthenticated(MALFORMED)),
                "{malformed:?}: {refused}"
            );
            // A secret the store was asked about would be cached, as unknown at least.
            let key = verifier.keys.key(malformed);
            assert!(verifier.cache.get(&key).is_none() && verifier.unknown.get(&key).is_none());
        }

        // A credential stored under another kind than its secret's format names.
        let (mut mislabelled, secret) = issued(tenant, &["deploy"]);
        mislabelled.kind = CredentialKind::ServiceAccount;
        store.import_credentials(&[mislabelled], &[]).await.unwrap();
        for attempt in ["from the store", "from the cache"] {
            let refused = app
                .verify_secret(secret.expose_secret())
                .await
                .err()
                .unwrap();
            assert!(
                matches!(refused, AppError::Unauthenticated("unknown")),
                "{attempt}: {refused}"
            );
        }
        assert!(verifier
            .cache
            .get(&verifier.keys.key(secret.expose_secret()))
            .is_some());
    }

    #[tokio::test]
    async fn credentials_holding_the_same_scopes_in_one_organization_share_one_rights() {
        let (_dir, store) = sqlite_store().await;
        let one = crate::ops::create_org(store.as_ref(), "one", &crate::ops::tests_operator())
            .await
            .unwrap();
        let two = crate::ops::create_org(store.as_ref(), "two", &crate::ops::tests_operator())
            .await
            .unwrap();
        let (one, two) = (one.tenant.id, two.tenant.id);
        let app = crate::App::new(store.clone(), crate::Config::default());
        let verify = |secret: &Plaintext| {
            let app = app.clone();
            let secret = secret.expose_secret().to_string();
            async move { app.verify_secret(&secret).await.unwrap() }
        };
        let a = verify(&token(store.as_ref(), one, &["deploy", "logs:read"]).await).await;
        let b = verify(&token(store.as_ref(), one, &["deploy", "logs:read"]).await).await;
        let other_scopes = verify(&token(store.as_ref(), one, &["deploy"]).await).await;
        let other_org = verify(&token(store.as_ref(), two, &["deploy", "logs:read"]).await).await;
        assert!(Arc::ptr_eq(&a.rights, &b.rights));
        assert!(!Arc::ptr_eq(&a.rights, &other_scopes.rights));
        assert!(!Arc::ptr_eq(&a.rights, &other_org.rights));
        assert_eq!(other_org.rights.scopes, a.rights.scopes);
        assert_eq!(
            other_org.rights.headers.org_id,
            two.to_string().as_str(),
            "each organization's header names it"
        );

        // A set no cached credential holds any more is dropped; one still held stays shared.
        let verifier = &app.inner().verifier;
        let held = |verifier: &Verifier| verifier.rights.lock().unwrap().len();
        assert_eq!(held(verifier), 3);
        let dropped = other_scopes.credential.id;
        verifier
            .cache
            .retain(|_, cached| cached.credential.id != dropped);
        drop(other_scopes);
        // Its use, queued for `last_used_at`, holds it until written.
        verifier.prune();
        assert_eq!(held(verifier), 3);
        app.inner().usage.flush().await;
        verifier.prune();
        assert_eq!(held(verifier), 2);
        let again = verify(&token(store.as_ref(), one, &["deploy", "logs:read"]).await).await;
        assert!(Arc::ptr_eq(&a.rights, &again.rights));
    }
    /// A credential's size is its organization's to choose (64 scopes of 128 bytes each, held
    /// apart from any other credential's when no other holds the same set): fat ones count for what
    /// they hold, so the cache stays within about `capacity` ordinary entries' worth of memory,
    /// while the ordinary credentials in use all stay cached.
    #[tokio::test]
    async fn fat_credentials_count_for_what_they_hold_against_the_cache_capacity() {
        let (_dir, store) = sqlite_store().await;
        let tenant = crate::ops::create_org(store.as_ref(), "one", &crate::ops::tests_operator())
            .await
            .unwrap();
        let tenant = tenant.tenant.id;
        let mut config = crate::Config::default();
        config.verify_cache.capacity = 4096;
        let app = crate::App::new(store.clone(), config);
        let verifier = &app.inner().verifier;
        let cached = |secret: &Plaintext| {
            verifier
                .cache
                .get(&verifier.keys.key(secret.expose_secret()))
                .is_some()
        };

        let mut ordinary = Vec::new();
        for _ in 0..100 {
            ordinary.push(token(store.as_ref(), tenant, &["deploy", "logs:read"]).await);
        }
        for secret in &ordinary {
            app.verify_secret(secret.expose_secret()).await.unwrap();
        }
        // A dozen scopes of twenty-odd characters are an ordinary credential, and count as one.
        let scopes: Vec<String> = (0..12)
            .map(|i| format!("service-{i:02}:deploy-read"))
            .collect();
        let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let typical = token(store.as_ref(), tenant, &scopes).await;
        app.verify_secret(typical.expose_secret()).await.unwrap();
        let entry = verifier
            .cache
            .get(&verifier.keys.key(typical.expose_secret()))
            .expect("cached");
        assert_eq!(entry.weight, 1, "a credential with 12 ordinary scopes");
        let mut fat = Vec::new();
        for i in 0..200 {
            let scopes: Vec<String> = (0..keyplane_core::scope::MAX_SCOPES)
                .map(|j| format!("{i:04}-{j:02}-{}", "s".repeat(120)))
                .collect();
            let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
            let secret = token(store.as_ref(), tenant, &scopes).await;
            app.verify_secret(secret.expose_secret()).await.unwrap();
            fat.push(secret);
            // The ordinary ones stay in use meanwhile.
            for secret in &ordinary {
                app.verify_secret(secret.expose_secret()).await.unwrap();
            }
        }

        let evicted = ordinary.iter().filter(|secret| !cached(secret)).count();
        assert_eq!(evicted, 0, "ordinary credentials evicted");
        // Each fat entry holds its 8 KiB of scopes three times over (the set, its interning key
        // and the rendered header): its scopes alone must fit the ordinary entries' budget.
        let fat_cached = fat.iter().filter(|secret| cached(secret)).count();
        let scope_bytes = keyplane_core::scope::MAX_SCOPES * keyplane_core::scope::MAX_SCOPE_LEN;
        assert!(fat_cached > 0, "a fat credential is still cached");
        assert!(
            3 * fat_cached * scope_bytes <= 4096 * ORDINARY_ENTRY_BYTES,
            "{fat_cached} fat credentials cached"
        );
        assert!(verifier.cache.weight() <= 4096);
    }
}
