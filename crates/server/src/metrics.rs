//! Prometheus metrics: requests by route and status, latency, credentials verified and rejected,
//! connections refused, leak reports, background steps abandoned at their deadline, the audit
//! export's lag, the TLS certificate's expiry and failed reloads, failed OIDC key fetches and the
//! webhook delivery backlog.

use keyplane_core::CredentialKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeakLabels {
    source: &'static str,
    outcome: &'static str,
}

/// `keyplane_leaked_tokens`'s outcomes: a credential revoked or suspended for the report, or
/// nothing changed (no such credential, already revoked or suspended, rotated away meanwhile, or a
/// canary). Not told apart further: `/metrics` is unauthenticated, and a finer split would tell
/// whoever reports a token and reads it what the public answer does not (whether the token
/// existed), and a canary from a revoked credential.
const LEAK_OUTCOMES: [&str; 3] = ["revoked", "suspended", "unchanged"];

/// What became of a public revocation report (`POST /v1/credentials/revoke`) whose body was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PublicReport {
    /// Stored, to be worked off: answered 202.
    Stored,
    /// No well-formed token in it: nothing to store, answered 202.
    NoToken,
    /// The store's writes are failing, or it could not store this one: 503.
    RefusedStoreFailing,
    /// Too many reports being worked off by this replica: 503.
    RefusedInProgress,
    /// This replica's reports per minute (`--public-revoke-total-per-minute`) are spent: 503.
    RefusedBudget,
    /// Too many reports stored, over every replica: 503.
    RefusedStoredLimit,
    /// The store answered an error that is not a fault expected to pass (500).
    Failed,
}

impl PublicReport {
    const ALL: [PublicReport; 7] = [
        Self::Stored,
        Self::NoToken,
        Self::RefusedStoreFailing,
        Self::RefusedInProgress,
        Self::RefusedBudget,
        Self::RefusedStoredLimit,
        Self::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::NoToken => "no_token",
            Self::RefusedStoreFailing => "refused_store_failing",
            Self::RefusedInProgress => "refused_in_progress",
            Self::RefusedBudget => "refused_budget",
            Self::RefusedStoredLimit => "refused_stored_limit",
            Self::Failed => "failed",
        }
    }
}

/// What the verification cache answered for one lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheOutcome {
    /// A fresh entry for a known credential.
    Hit,
    /// A fresh negative entry: the secret is known to be unknown.
    Unknown,
    /// No entry: the store was asked.
    Miss,
    /// An entry past its lifetime or invalidated: the store was asked again.
    Reload,
    /// The store could not answer; a cached valid credential answered (stale-if-error).
    Stale,
    /// An entry past its lifetime or invalidated whose reload another request had under way:
    /// that reload's answer was taken, with no store read of its own.
    Coalesced,
}

impl CacheOutcome {
    const ALL: [CacheOutcome; 6] = [
        Self::Hit,
        Self::Unknown,
        Self::Miss,
        Self::Reload,
        Self::Stale,
        Self::Coalesced,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Unknown => "unknown",
            Self::Miss => "miss",
            Self::Reload => "reload",
            Self::Stale => "stale",
            Self::Coalesced => "coalesced",
        }
    }
}

#[derive(Clone)]
pub(crate) struct Metrics(Arc<Inner>);

/// A `'static` copy of a matched route, made once per distinct route in the process (there are
/// a few dozen), so metrics labels cost no allocation per request.
fn interned(route: &str) -> &'static str {
    static ROUTES: std::sync::OnceLock<RwLock<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let routes = ROUTES.get_or_init(Default::default);
    if let Some(known) = routes.read().unwrap_or_else(|p| p.into_inner()).get(route) {
        return known;
    }
    let mut routes = routes.write().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = routes.get(route) {
        return known;
    }
    let leaked: &'static str = Box::leak(route.to_string().into_boxed_str());
    routes.insert(leaked);
    leaked
}

/// The method and status combinations a route remembers ([`RouteMetrics`]).
const REQUEST_SLOTS: usize = 16;

/// One route's request metrics, resolved once: a request on it adds to them without hashing
/// labels or taking the families' locks.
pub(crate) struct RouteMetrics {
    /// The matched route, the label (`unmatched` for every path no route matched).
    pub route: &'static str,
    latency: Histogram,
    /// `http_requests` by method and status, as answered so far on this route (a handful), each
    /// found without a lock: a read lock costs two atomic writes of a shared line per request.
    /// Past `REQUEST_SLOTS` combinations, the family's map is asked.
    requests: [OnceLock<(&'static str, u16, Counter)>; REQUEST_SLOTS],
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    /// The `credentials_verified` counter for each of `CredentialKind::ALL`, in that order.
    verified_by_kind: Vec<Counter>,
    rejected: Family<ReasonLabels, Counter>,
    /// The `verify_cache_lookups` counter for each of `CacheOutcome::ALL`, in that order.
    cache_by_outcome: Vec<Counter>,
    audit_refusals_dropped: Counter,
    audit_refusals_unrecorded: Counter,
    connections_open: Gauge,
    /// `connections_refused` with reason `max_connections_per_client`.
    connections_refused_per_client: Counter,
    connection_limit_reached: Counter,
    leaked_tokens: Family<LeakLabels, Counter>,
    public_reports: Family<OutcomeLabels, Counter>,
    /// This replica's clock less the database's, at the last measurement (`clock_check`).
    clock_skew_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 for each job the clock check held at its last ask (`clock_check::ClockJob`).
    clock_jobs_held: Family<JobLabels, Gauge>,
    /// Background steps abandoned at their deadline, by job (`jobs::bounded`).
    background_step_timeouts: Family<JobLabels, Counter>,
    /// Set from `audit_export_caught_up` when rendered.
    audit_export_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// When the `--audit-log` export last had every committed event written; `None` without one.
    audit_export_caught_up: std::sync::Mutex<Option<std::time::Instant>>,
    audit_export_behind: Gauge,
    audit_export_missed: Counter,
    tls_not_after: Gauge,
    tls_reload_failures: Counter,
    /// 1 while the invalidation listener (PostgreSQL) is listening, else 0.
    invalidation_listener_up: Gauge,
    invalidation_resets: Counter,
    oidc_key_fetch_failures: Family<IssuerLabels, Counter>,
    webhook_deliveries_pending: Gauge,
    /// When the oldest pending webhook delivery was queued, at the last count; `None`: none.
    webhook_oldest_pending: std::sync::Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// Set from `webhook_oldest_pending` when rendered.
    webhook_oldest_pending_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    routes: RwLock<HashMap<&'static str, Arc<RouteMetrics>, foldhash::fast::RandomState>>,
}

/// `keyplane_build_info`'s one sample, always 1.
fn build_info() -> prometheus_client::metrics::info::Info<[(&'static str, String); 2]> {
    prometheus_client::metrics::info::Info::new([
        ("version", crate::VERSION.to_string()),
        ("schema", keyplane_store::latest_schema().to_string()),
    ])
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 17,
    ))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyplane");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let verified = Family::<KindLabels, Counter>::default();
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        registry.register(
            "credentials_verified",
            "Credentials accepted, by kind",
            verified.clone(),
        );
        registry.register(
            "credentials_rejected",
            "Credentials rejected, by reason",
            rejected.clone(),
        );
        let cache = Family::<ResultLabels, Counter>::default();
        registry.register(
            "verify_cache_lookups",
            "Verification cache lookups by result: hit, unknown (negative hit), miss (not cached: \
             the store was asked), reload (cached but expired or invalidated: the store was asked \
             again), stale (answered from the cache because the store could not), coalesced \
             (cached but expired or invalidated, and another request's reload of it under way \
             answered: no store read of its own)",
            cache.clone(),
        );
        let cache_by_outcome = CacheOutcome::ALL
            .iter()
            .map(|outcome| {
                cache
                    .get_or_create(&ResultLabels {
                        result: outcome.as_str(),
                    })
                    .clone()
            })
            .collect();
        let audit_refusals_dropped = Counter::default();
        registry.register(
            "audit_refusals_dropped",
            "Refused attempts not recorded: too many were pending, or the store could not take them",
            audit_refusals_dropped.clone(),
        );
        let audit_refusals_unrecorded = Counter::default();
        registry.register(
            "audit_refusals_unrecorded",
            "Refused attempts of users in a tenant where they hold nothing (no tenant to record in)",
            audit_refusals_unrecorded.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "HTTP connections open; at --max-connections, more wait to be accepted",
            connections_open.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "HTTP connections closed as soon as accepted, by reason: max_connections_per_client \
             (the client address had that many open)",
            refused.clone(),
        );
        let connections_refused_per_client = refused
            .get_or_create(&ReasonLabels {
                reason: "max_connections_per_client",
            })
            .clone();
        let connection_limit_reached = Counter::default();
        registry.register(
            "connection_limit_reached",
            "Times every --max-connections slot was taken: new connections waited to be accepted \
             until one closed (none is refused for it)",
            connection_limit_reached.clone(),
        );
        let leaked_tokens = Family::<LeakLabels, Counter>::default();
        registry.register(
            "leaked_tokens",
            "Well-formed tokens reported leaked and looked up, by source (github_secret_scanning, \
             public_revoke) and outcome: revoked, suspended (a credential.leaked event each), or \
             unchanged (no such credential, already revoked or suspended, rotated away meanwhile, \
             or a canary)",
            leaked_tokens.clone(),
        );
        // Made at 0: a series shows (and can be alerted on) before its first count.
        for source in crate::leaks::LeakSource::ALL {
            for outcome in LEAK_OUTCOMES {
                drop(leaked_tokens.get_or_create(&LeakLabels {
                    source: source.as_str(),
                    outcome,
                }));
            }
        }
        let public_reports = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "public_revoke_reports",
            "Public revocation reports whose body was read, by outcome: stored, no_token (none \
             well-formed: nothing stored), refused_store_failing, refused_in_progress, \
             refused_budget, refused_stored_limit (each answered 503), failed (the store's error, \
             500)",
            public_reports.clone(),
        );
        for outcome in PublicReport::ALL {
            drop(public_reports.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            }));
        }
        let clock_skew_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "clock_skew_seconds",
            "This replica's clock less the database's at the last measurement (positive: ahead; \
             PostgreSQL only, 0 on SQLite); past --max-clock-skew-seconds the time-driven jobs \
             that change the store are held",
            clock_skew_seconds.clone(),
        );
        let clock_jobs_held = Family::<JobLabels, Gauge>::default();
        registry.register(
            "clock_jobs_held",
            "1 while this replica holds the job because its clock is not known to be within the \
             error the job tolerates (PostgreSQL only): --max-clock-skew-seconds for \
             grace_period_end, unused_secret_cutover, expired_notice and console_session_prune, \
             the larger of it and an hour for the others",
            clock_jobs_held.clone(),
        );
        for job in crate::clock_check::ClockJob::ALL {
            drop(clock_jobs_held.get_or_create(&JobLabels { job: job.label() }));
        }
        let background_step_timeouts = Family::<JobLabels, Counter>::default();
        registry.register(
            "background_step_timeouts",
            "Background steps abandoned at their job's deadline because the store did not answer \
             in time (each is tried again at the job's next run), by job",
            background_step_timeouts.clone(),
        );
        for job in crate::config::BackgroundJob::ALL {
            drop(background_step_timeouts.get_or_create(&JobLabels { job: job.label() }));
        }
        let audit_export_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "audit_export_lag_seconds",
            "Seconds since the --audit-log export last had every committed event written (0 \
             without one): grows while the export is stalled",
            audit_export_lag.clone(),
        );
        let audit_export_behind = Gauge::default();
        registry.register(
            "audit_export_behind_organizations",
            "Organizations whose audit chain in the store was found, since the start, behind what \
             the --audit-log export had written (a restore, a point-in-time recovery, a failover \
             to a standby missing commits, a lost data directory): their new events reuse seqs \
             the log already holds",
            audit_export_behind.clone(),
        );
        let audit_export_missed = Counter::default();
        registry.register(
            "audit_export_missed_events",
            "Audit events the --audit-log export found gone from the store before it wrote them \
             (pruned by retention on a replica without this export, or before the export was \
             configured): neither the store nor the log holds them; /readyz's audit lists the \
             organizations",
            audit_export_missed.clone(),
        );
        let tls_not_after = Gauge::default();
        registry.register(
            "tls_certificate_not_after_seconds",
            "When the certificate served to new TLS connections expires, in Unix seconds (0 \
             without --tls-cert)",
            tls_not_after.clone(),
        );
        let tls_reload_failures = Counter::default();
        registry.register(
            "tls_reload_failures",
            "Loads of changed (or failed, retried every 30 s) TLS certificate and key files that \
             failed; the previous pair keeps serving",
            tls_reload_failures.clone(),
        );
        let invalidation_listener_up = Gauge::default();
        registry.register(
            "invalidation_listener_up",
            "1 while the connection that hears other replicas' changes (PostgreSQL's LISTEN) is \
             listening; 0 while it is lost and being reconnected, and always on SQLite (one \
             process: nothing to hear)",
            invalidation_listener_up.clone(),
        );
        let invalidation_resets = Counter::default();
        registry.register(
            "invalidation_resets",
            "Times every cached verification was marked for reloading because changes may have \
             gone unheard: at each (re)connection and loss of the invalidation listener, and every \
             second while it is lost",
            invalidation_resets.clone(),
        );
        let oidc_key_fetch_failures = Family::<IssuerLabels, Counter>::default();
        registry.register(
            "oidc_key_fetch_failures",
            "Fetches of an --oidc-issuer's discovery document and keys (JWKS) that failed, by \
             issuer; keys already loaded stay in use, but a user's token naming a key not held is \
             answered 503 until a fetch succeeds",
            oidc_key_fetch_failures.clone(),
        );
        let webhook_deliveries_pending = Gauge::default();
        registry.register(
            "webhook_deliveries_pending",
            "Webhook deliveries not yet made, due or waiting for a retry, over every replica (the \
             store's count, read every 15 s by each replica)",
            webhook_deliveries_pending.clone(),
        );
        let webhook_oldest_pending_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "webhook_oldest_pending_delivery_age_seconds",
            "Seconds since the oldest pending webhook delivery was queued, as of the last count (0 \
             when none is pending): grows while a receiver is down or deliveries fall behind",
            webhook_oldest_pending_age.clone(),
        );
        registry.register(
            "build",
            "This replica's keyplane: its version, and the store schema it knows (its latest \
             migration); during a rolling upgrade, which replicas run which",
            build_info(),
        );
        let verified_by_kind = CredentialKind::ALL
            .iter()
            .map(|kind| {
                verified
                    .get_or_create(&KindLabels {
                        kind: kind.as_str(),
                    })
                    .clone()
            })
            .collect();
        Self(Arc::new(Inner {
            registry,
            requests,
            latency,
            verified_by_kind,
            rejected,
            cache_by_outcome,
            audit_refusals_dropped,
            audit_refusals_unrecorded,
            connections_open,
            connections_refused_per_client,
            connection_limit_reached,
            leaked_tokens,
            public_reports,
            clock_skew_seconds,
            clock_jobs_held,
            background_step_timeouts,
            audit_export_lag,
            audit_export_caught_up: std::sync::Mutex::new(None),
            audit_export_behind,
            audit_export_missed,
            tls_not_after,
            tls_reload_failures,
            invalidation_listener_up,
            invalidation_resets,
            oidc_key_fetch_failures,
            webhook_deliveries_pending,
            webhook_oldest_pending: std::sync::Mutex::new(None),
            webhook_oldest_pending_age,
            routes: RwLock::default(),
        }))
    }

    /// The metrics of `route` (a matched route, or `unmatched`): made on its first request.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        let routes = self.0.routes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = routes.get(route) {
            return known.clone();
        }
        drop(routes);
        let mut routes = self.0.routes.write().unwrap_or_else(|p| p.into_inner());
        let route = interned(route);
        routes
            .entry(route)
            .or_insert_with(|| {
                Arc::new(RouteMetrics {
                    route,
                    latency: self.0.latency.get_or_create(&RouteLabels { route }).clone(),
                    requests: Default::default(),
                })
            })
            .clone()
    }

    pub fn observe_request(
        &self,
        route: &RouteMetrics,
        method: &'static str,
        status: u16,
        seconds: f64,
    ) {
        route.latency.observe(seconds);
        for slot in &route.requests {
            match slot.get() {
                Some((m, s, counter)) if *m == method && *s == status => {
                    counter.inc();
                    return;
                }
                Some(_) => {}
                None => break,
            }
        }
        let labels = RequestLabels {
            method,
            route: route.route,
            status,
        };
        let counter = self.0.requests.get_or_create(&labels).clone();
        counter.inc();
        // Kept in the first free slot. Should another request have filled it meanwhile, a
        // combination may take two slots: both hold the family's one counter for its labels.
        if let Some(free) = route.requests.iter().find(|slot| slot.get().is_none()) {
            let _ = free.set((method, status, counter));
        }
    }

    /// On the hot path: an atomic increment of a counter resolved at start, no map lookup.
    pub fn credential_verified(&self, kind: CredentialKind) {
        let index = CredentialKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default();
        self.0.verified_by_kind[index].inc();
    }

    pub fn verify_cache(&self, outcome: CacheOutcome) {
        let index = CacheOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or_default();
        self.0.cache_by_outcome[index].inc();
    }

    pub fn credential_rejected(&self, reason: &'static str) {
        self.0
            .rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn audit_refusals_dropped(&self, count: u64) {
        self.0.audit_refusals_dropped.inc_by(count);
    }

    pub fn audit_refusal_unrecorded(&self) {
        self.0.audit_refusals_unrecorded.inc();
    }

    /// The `connections_open` gauge, counted by the server loop (an atomic).
    pub(crate) fn connections_open(&self) -> Gauge {
        self.0.connections_open.clone()
    }

    /// A connection closed at accept: its address had `max_connections_per_client` open.
    pub(crate) fn connection_refused_per_client(&self) {
        self.0.connections_refused_per_client.inc();
    }

    /// The accept loop found every `max_connections` slot taken.
    pub(crate) fn connection_limit_reached(&self) {
        self.0.connection_limit_reached.inc();
    }

    /// A well-formed token reported by `source`, and what was done: `None` when it is no
    /// credential.
    pub(crate) fn leaked_token(
        &self,
        source: crate::leaks::LeakSource,
        outcome: Option<crate::leaks::LeakOutcome>,
    ) {
        use crate::leaks::LeakOutcome;
        let [revoked, suspended, unchanged] = LEAK_OUTCOMES;
        let outcome = match outcome {
            Some(LeakOutcome::Revoked) => revoked,
            Some(LeakOutcome::Suspended) => suspended,
            // A canary is left armed: counted as a revoked credential reported again is.
            Some(
                LeakOutcome::AlreadyHandled
                | LeakOutcome::CanaryTriggered
                | LeakOutcome::NoLongerLive,
            )
            | None => unchanged,
        };
        self.0
            .leaked_tokens
            .get_or_create(&LeakLabels {
                source: source.as_str(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn public_report(&self, outcome: PublicReport) {
        self.0
            .public_reports
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// The last measured difference of this replica's clock from the database's.
    pub(crate) fn clock_skew(&self, seconds: f64) {
        self.0.clock_skew_seconds.set(seconds);
    }

    /// Whether the clock check held `job` at its last ask.
    pub(crate) fn clock_job_held(&self, job: crate::clock_check::ClockJob, held: bool) {
        self.0
            .clock_jobs_held
            .get_or_create(&JobLabels { job: job.label() })
            .set(i64::from(held));
    }

    /// A step of `job` was abandoned at its deadline.
    pub(crate) fn background_step_timed_out(&self, job: crate::config::BackgroundJob) {
        self.0
            .background_step_timeouts
            .get_or_create(&JobLabels { job: job.label() })
            .inc();
    }

    /// The `--audit-log` export had written every event committed before `at`.
    pub(crate) fn audit_export_caught_up(&self, at: std::time::Instant) {
        *self
            .0
            .audit_export_caught_up
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    /// `organizations` were found behind the `--audit-log` export so far.
    pub(crate) fn audit_export_behind(&self, organizations: usize) {
        self.0
            .audit_export_behind
            .set(i64::try_from(organizations).unwrap_or(i64::MAX));
    }

    /// The export found `events` gone before it wrote them.
    pub(crate) fn audit_export_missed(&self, events: u64) {
        self.0.audit_export_missed.inc_by(events);
    }

    /// The certificate now served expires at `unix` (seconds).
    pub(crate) fn tls_certificate_not_after(&self, unix: i64) {
        self.0.tls_not_after.set(unix);
    }

    pub(crate) fn tls_reload_failed(&self) {
        self.0.tls_reload_failures.inc();
    }

    /// Counts a reset and follows the listener's state; other events are not counted.
    pub(crate) fn invalidation_heard(&self, event: keyplane_store::Invalidation) {
        match event {
            keyplane_store::Invalidation::Reset => {
                self.0.invalidation_resets.inc();
            }
            keyplane_store::Invalidation::Listening(up) => {
                self.0.invalidation_listener_up.set(i64::from(up));
            }
            _ => {}
        }
    }

    /// The counter of `issuer`'s failed key fetches, shown (at 0) from now on.
    pub(crate) fn oidc_key_fetch_failures(&self, issuer: &str) -> Counter {
        self.0
            .oidc_key_fetch_failures
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_string(),
            })
            .clone()
    }

    /// The webhook deliveries pending in the store, and when the oldest of them was queued.
    pub(crate) fn webhook_backlog(
        &self,
        pending: u64,
        oldest: Option<chrono::DateTime<chrono::Utc>>,
    ) {
        self.0
            .webhook_deliveries_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        *self
            .0
            .webhook_oldest_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = oldest;
    }

    /// Whether the invalidation listener is listening (`/readyz`).
    pub(crate) fn invalidation_listener_up(&self) -> bool {
        self.0.invalidation_listener_up.get() == 1
    }

    pub fn render(&self) -> String {
        // Measured now: a stalled export does not update it.
        let caught_up = *self
            .0
            .audit_export_caught_up
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(at) = caught_up {
            self.0.audit_export_lag.set(at.elapsed().as_secs_f64());
        }
        let oldest = *self
            .0
            .webhook_oldest_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let age = oldest.map_or(0.0, |at| {
            (chrono::Utc::now() - at)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64()
        });
        self.0.webhook_oldest_pending_age.set(age);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.0.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `http_requests` sample for `route`, `method` and `status` in `rendered`.
    fn requests_counted(rendered: &str, route: &str, method: &str, status: u16) -> Option<u64> {
        rendered.lines().find_map(|line| {
            let rest = line.strip_prefix("keyplane_http_requests_total{")?;
            let (labels, value) = rest.split_once("} ")?;
            let wanted = [
                format!("method=\"{method}\""),
                format!("route=\"{route}\""),
                format!("status=\"{status}\""),
            ];
            wanted
                .iter()
                .all(|label| labels.split(',').any(|l| l == label))
                .then(|| value.parse().expect("a count"))
        })
    }

    #[test]
    fn every_method_and_status_is_counted_past_the_remembered_ones() {
        let metrics = Metrics::new();
        let route = metrics.route("/v1/test");
        // More combinations than a route remembers, each answered a different number of times.
        let statuses: Vec<u16> = (0..REQUEST_SLOTS as u16 + 5).map(|i| 200 + i).collect();
        for (times, status) in statuses.iter().enumerate() {
            for _ in 0..=times {
                metrics.observe_request(&route, "GET", *status, 0.001);
            }
        }
        metrics.observe_request(&route, "POST", 200, 0.001);
        let rendered = metrics.render();
        for (times, status) in statuses.iter().enumerate() {
            assert_eq!(
                requests_counted(&rendered, "/v1/test", "GET", *status),
                Some(times as u64 + 1),
                "GET {status} in:\n{rendered}"
            );
        }
        assert_eq!(
            requests_counted(&rendered, "/v1/test", "POST", 200),
            Some(1)
        );
    }
}
