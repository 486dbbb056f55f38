//! Runtime settings, as plain data. `cli` fills this from flags and environment; tests build it.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    /// Management API requests per minute per credential; 0 turns the limit off.
    pub rate_limit_per_minute: u32,
    /// How many requests a credential may send at once before the per-minute rate applies.
    pub rate_limit_burst: u32,
    /// Management API requests per minute per organization, all its credentials together (a
    /// credential cannot multiply its budget by minting more); 0 turns the limit off.
    pub tenant_rate_limit_per_minute: u32,
    /// Failed authentications allowed per client address per minute before that address is
    /// refused (429) until its budget refills; 0 turns the limit off.
    pub failed_auth_per_minute: u32,
    /// Live (unrevoked) credentials one organization may hold, every kind together; a create past
    /// it is refused (409). The API's creates only: the operator's `admin` commands are not held
    /// to it. `None`: no limit.
    pub max_live_credentials_per_org: Option<u64>,
    /// Introspections of tokens the verification caches do not hold that found no credential,
    /// per caller's organization per minute; past it, such introspections answer 429 without a
    /// store lookup until the budget refills. 0 turns the budget off.
    pub introspect_misses_per_minute: u32,
    /// How far `last_used_at` may lag behind use.
    pub last_used_flush_interval: Duration,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    pub registry: RegistryConfig,
    pub verify_cache: crate::auth::CacheConfig,
    /// The identity providers whose JWT access tokens authenticate users; `None`: users cannot
    /// authenticate, only keyplane's own credentials can.
    pub oidc: Option<crate::oidc::OidcConfig>,
    /// Reverse proxies whose forwarding header names the client (see `client_addr`).
    pub trusted_proxies: crate::client_addr::TrustedProxies,
    /// Connection limits and timeouts of the HTTP server.
    pub http: HttpLimits,
    /// Where every committed audit event is exported as a JSON line; `None`: no export.
    pub audit_log: Option<crate::audit::AuditLogTarget>,
    /// Audit events older than this many days are pruned; 0 keeps them forever.
    pub audit_retention_days: u32,
    /// Refused attempts are aggregated over this window before one event per kind is written.
    pub audit_refusal_window: Duration,
    /// The clock lifecycle decisions read: expiry, grace periods, suspension checks, the expiry
    /// sweep. Tests move it instead of waiting.
    pub clock: Clock,
    /// How often the lifecycle sweep runs: expiry warnings, the usage-aware cutover of previous
    /// secrets, forgetting ended ones.
    pub lifecycle_sweep_interval: Duration,
    /// How far this replica's clock may be from the database's (PostgreSQL) before the jobs that
    /// change the shared store by this replica's clock are held (`clock_check`).
    pub max_clock_skew: Duration,
    /// Past this difference from the database's clock `/readyz` answers 503 (`clock_check`), so
    /// that a load balancer takes the replica out; `None`: it never does (the default).
    pub unready_clock_skew: Option<Duration>,
    /// Leaked-token response (`leaks`): where and how GitHub's secret-scanning keys are fetched.
    pub github_keys: crate::leaks::GithubKeysConfig,
    /// `POST /v1/credentials/revoke` requests per client address per minute; 0 turns the limit
    /// off.
    pub public_revoke_per_minute: u32,
    /// Public revocation reports (those naming a well-formed token, which the store must keep)
    /// per minute on this replica, from every address together: many addresses are cheap (an
    /// IPv6 /48 holds 65,536 /64s), and each report costs two writes on the store's writer, which
    /// every organization's changes share. Past it, reports answer 503; 0 turns the budget off.
    pub public_revoke_total_per_minute: u32,
    /// How stored public revocation reports are leased and looked for.
    pub leak_reports: crate::leaks::LeakReportsConfig,
    /// How webhook deliveries are made (targets allowed, retry schedule, timeouts).
    pub webhooks: crate::webhooks::WebhookConfig,
    /// The web console at `/console` (`console`).
    pub console: crate::console::ConsoleConfig,
    /// Serve HTTPS (HTTP/2 or HTTP/1.1 by ALPN) with this certificate and key, reloaded when the
    /// files change or on `App::reload_tls`; `None`: plain HTTP/1.1.
    pub tls: Option<crate::tls::TlsFiles>,
    /// How often the TLS files are checked for a change; `None`: only on `App::reload_tls`.
    pub tls_check_interval: Option<Duration>,
    /// Revocation streams (`GET /v1/revocations/stream`) open at once on this replica.
    pub max_revocation_streams: usize,
    /// Revocation streams of one organization open at once on this replica (so that one cannot
    /// take every slot).
    pub max_revocation_streams_per_org: usize,
    /// A revocation stream reads its tenant's chain head at least this often (it also wakes at
    /// once on every cache invalidation this replica hears of).
    pub revocation_poll_interval: Duration,
    /// Heartbeat comments on an idle revocation stream.
    pub revocation_heartbeat: Duration,
    /// Keys in another system's format, imported by their hash, accepted under these prefixes
    /// (`serve --legacy-token-prefix`); none by default.
    pub legacy_token_prefixes: keyplane_core::legacy_token::LegacyPrefixes,
    /// How long each background job's step may take before it is abandoned
    /// ([`BackgroundJob::default_deadline`] unless tests shorten one).
    pub background_step_deadlines: StepDeadlines,
}

/// `serve --max-live-credentials-per-org`'s default: far past what a tenant's fleet holds (README,
/// "Limits"), near enough to stop a runaway script within a day of creates.
pub const DEFAULT_MAX_LIVE_CREDENTIALS_PER_ORG: u64 = 100_000;

/// `serve --introspect-misses-per-minute`'s default (README, "Limits").
pub const DEFAULT_INTROSPECT_MISSES_PER_MINUTE: u32 = 3_000;

/// Wall-clock time plus an offset that only tests move (`advance`, and `set_wrong_by`). Clones
/// share the offset, so one handle moves every replica a test builds with it.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Time passed as far as tests are concerned: everyone's clock moved, the database's too.
    offset_micros: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// How wrong this clock is (tests): its own error, which the database's clock does not share.
    wrong_by_micros: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    /// Now, at the precision both stores keep.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        keyplane_core::validate::now_micros(self.offset().saturating_add(self.wrong_by()))
    }

    /// [`Self::now`] as microseconds since the Unix epoch (no calendar arithmetic).
    pub fn now_unix_micros(&self) -> i64 {
        keyplane_core::validate::unix_micros_now(self.offset().saturating_add(self.wrong_by()))
    }

    /// How far [`Self::advance`] moved this clock: time that passed for the database as well, so
    /// not an error of this clock's (`clock_check` adds it to the database's reading).
    pub(crate) fn moved(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::microseconds(self.offset())
    }

    /// A monotonic reading that [`Self::advance`] moves too: for windows a step of the wall clock
    /// must not stretch or cut short.
    pub(crate) fn monotonic(&self) -> std::time::Instant {
        let offset = u64::try_from(self.offset()).unwrap_or(0);
        crate::coarse_clock::now() + Duration::from_micros(offset)
    }

    fn offset(&self) -> i64 {
        self.offset_micros
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves this clock (and its clones) forward.
    pub fn advance(&self, by: Duration) {
        let micros = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.offset_micros
            .fetch_add(micros, std::sync::atomic::Ordering::Relaxed);
    }

    fn wrong_by(&self) -> i64 {
        self.wrong_by_micros
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tests: makes this clock (and its clones) wrong by `by` (ahead when positive, behind when
    /// negative), as a host whose time is off: unlike [`Self::advance`], which stands for time
    /// passing, the database's clock does not move with it. `TimeDelta::zero()` sets it right.
    pub fn set_wrong_by(&self, by: chrono::TimeDelta) {
        let micros = by.num_microseconds().unwrap_or(i64::MAX);
        self.wrong_by_micros
            .store(micros, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What one connection may hold of the server, so that slow or idle clients cannot exhaust its
/// file descriptors or memory, and how long a stop waits for connections to finish.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Time a client has to send a complete request head: from accept for the first request, from
    /// its first byte for the next ones on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// Time a client has to send a whole request body, from the start of the request.
    pub body_timeout: Duration,
    /// A kept-alive connection that moves no byte for this long between requests is closed.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers); larger answers 431.
    pub max_header_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one client address (an IPv6 address's /64) may have open at once; past it a
    /// new connection from that address is closed as soon as it is accepted, so that one address
    /// cannot hold every slot of `max_connections` while the others wait. Trusted proxies
    /// (`Config::trusted_proxies`) are not held to it: their connections carry many clients'
    /// requests. 0 turns the cap off.
    pub max_connections_per_client: usize,
    /// After a stop is requested, connections still open after this long are closed.
    pub shutdown_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_connections: 10_000,
            max_connections_per_client: 1_000,
            shutdown_timeout: Duration::from_secs(20),
        }
    }
}

/// How keyplane acts as the token server of a Distribution registry (`auth: token`).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The registry's `auth.token.service`: the JWT `aud`.
    pub service: String,
    /// The registry's `auth.token.issuer`: the JWT `iss`.
    pub issuer: String,
    /// The registry address reported as the Registry `endpoint` (what `docker login` takes).
    pub endpoint: String,
    /// Lifetime of issued registry tokens (at least 60 s, as the token spec requires).
    pub token_ttl: Duration,
    /// How often the signing key is re-read, so that a promotion (`admin registry-key promote`)
    /// reaches every replica without a restart.
    pub key_refresh: Duration,
    /// Costly logins (grants run on a blocking thread) one organization may have under way or
    /// waiting at once on this replica; more answer 429. `None`: half of all the turns
    /// (`MAX_COSTLY_GRANTS_PER_CORE` per core), at least one, so one organization cannot take them
    /// all.
    pub costly_grants_per_org: Option<usize>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            service: "keyplane-registry".into(),
            issuer: "keyplane".into(),
            endpoint: "localhost:5000".into(),
            token_ttl: Duration::from_secs(300),
            key_refresh: Duration::from_secs(30),
            costly_grants_per_org: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            rate_limit_per_minute: 100,
            rate_limit_burst: 10,
            tenant_rate_limit_per_minute: 0,
            failed_auth_per_minute: 300,
            max_live_credentials_per_org: Some(DEFAULT_MAX_LIVE_CREDENTIALS_PER_ORG),
            introspect_misses_per_minute: DEFAULT_INTROSPECT_MISSES_PER_MINUTE,
            last_used_flush_interval: Duration::from_secs(5),
            max_body_bytes: 64 * 1024,
            registry: RegistryConfig::default(),
            verify_cache: crate::auth::CacheConfig::default(),
            oidc: None,
            trusted_proxies: crate::client_addr::TrustedProxies::default(),
            http: HttpLimits::default(),
            audit_log: None,
            audit_retention_days: 400,
            audit_refusal_window: Duration::from_secs(60),
            clock: Clock::default(),
            lifecycle_sweep_interval: Duration::from_secs(60),
            max_clock_skew: Duration::from_secs(5),
            unready_clock_skew: None,
            github_keys: crate::leaks::GithubKeysConfig::default(),
            public_revoke_per_minute: 10,
            public_revoke_total_per_minute: 600,
            leak_reports: crate::leaks::LeakReportsConfig::default(),
            webhooks: crate::webhooks::WebhookConfig::default(),
            console: crate::console::ConsoleConfig::default(),
            tls: None,
            tls_check_interval: Some(Duration::from_secs(1)),
            max_revocation_streams: 1000,
            max_revocation_streams_per_org: 100,
            revocation_poll_interval: Duration::from_secs(1),
            revocation_heartbeat: Duration::from_secs(15),
            legacy_token_prefixes: Default::default(),
            background_step_deadlines: StepDeadlines::default(),
        }
    }
}

/// A periodic job of the server's background work. Each runs on its own, and each of its steps
/// (one pass, or one store call where a pass may not be cut) is abandoned at its deadline: a
/// store that does not answer (a lock held, a network path to PostgreSQL gone silent) then holds
/// that job alone, for that step alone, and the step is tried again at the job's next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackgroundJob {
    /// Writing coalesced `last_used_at` (one flush: what it did not write is queued again).
    LastUsedFlush,
    /// The write of its own made while the store's writes fail (`Store::probe_writes`).
    WriteProbe,
    /// Refreshing the store's planner statistics, hourly.
    PlannerStatistics,
    /// Reading the database's clock (`clock_check`).
    ClockCheck,
    /// Deleting expired Idempotency-Key records (one pass of batches).
    IdempotencyPrune,
    /// Ending idle and expired console sessions.
    ConsoleSessionPrune,
    /// Writing one aggregated refusal event.
    RefusalFlush,
    /// One store call of the `--audit-log` export (cursors, heads, a page of events).
    AuditExport,
    /// Deleting one batch of audit events past the retention.
    AuditRetention,
    /// One lifecycle sweep (expiry notices, the unused-secret cutover, ended previous secrets).
    LifecycleSweep,
    /// Leasing due webhook deliveries (the claim and its renewal).
    WebhookClaim,
    /// Recording one webhook delivery attempt.
    WebhookRecord,
    /// Deleting one batch of finished webhook deliveries.
    WebhookPrune,
    /// Leasing one stored public revocation report, or giving up one batch of old ones.
    LeakReports,
}

impl BackgroundJob {
    pub const ALL: [Self; 14] = [
        Self::LastUsedFlush,
        Self::WriteProbe,
        Self::PlannerStatistics,
        Self::ClockCheck,
        Self::IdempotencyPrune,
        Self::ConsoleSessionPrune,
        Self::RefusalFlush,
        Self::AuditExport,
        Self::AuditRetention,
        Self::LifecycleSweep,
        Self::WebhookClaim,
        Self::WebhookRecord,
        Self::WebhookPrune,
        Self::LeakReports,
    ];

    /// `keyplane_background_step_timeouts_total`'s label, and the logs' `job`.
    pub fn label(self) -> &'static str {
        match self {
            Self::LastUsedFlush => "last_used_flush",
            Self::WriteProbe => "write_probe",
            Self::PlannerStatistics => "planner_statistics",
            Self::ClockCheck => "clock_check",
            Self::IdempotencyPrune => "idempotency_prune",
            Self::ConsoleSessionPrune => "console_session_prune",
            Self::RefusalFlush => "refusal_flush",
            Self::AuditExport => "audit_export",
            Self::AuditRetention => "audit_retention",
            Self::LifecycleSweep => "lifecycle_sweep",
            Self::WebhookClaim => "webhook_claim",
            Self::WebhookRecord => "webhook_record",
            Self::WebhookPrune => "webhook_prune",
            Self::LeakReports => "leak_reports",
        }
    }

    /// Well past what the step takes on a healthy store (PostgreSQL's writers give up a lock
    /// after 5 s, its general readers a statement after 30 s, SQLite's writer after 5 s busy),
    /// so only a store that does not answer at all reaches it.
    pub fn default_deadline(self) -> Duration {
        Duration::from_secs(match self {
            // What `/readyz` and the jobs held by the clock wait for: short.
            Self::ClockCheck => 2,
            // One small write each.
            Self::WriteProbe | Self::RefusalFlush => 10,
            // Within the lease a claim takes (the webhook timeout plus its margin, 15 s).
            Self::WebhookClaim | Self::WebhookRecord => 15,
            Self::LeakReports | Self::IdempotencyPrune | Self::ConsoleSessionPrune => 30,
            // Batches of 4096 rows on a loaded store: a backlog is written over several runs.
            Self::LastUsedFlush => 30,
            // A general reader's statement may take 30 s.
            Self::AuditExport | Self::AuditRetention | Self::WebhookPrune => 60,
            Self::PlannerStatistics => 120,
            // Many small transactions over every candidate credential.
            Self::LifecycleSweep => 300,
        })
    }
}

/// Each [`BackgroundJob`]'s step deadline.
#[derive(Debug, Clone)]
pub struct StepDeadlines([Duration; BackgroundJob::ALL.len()]);

impl Default for StepDeadlines {
    fn default() -> Self {
        Self(BackgroundJob::ALL.map(BackgroundJob::default_deadline))
    }
}

impl StepDeadlines {
    pub fn of(&self, job: BackgroundJob) -> Duration {
        self.0[job as usize]
    }

    /// These deadlines, with `job`'s set to `deadline`.
    pub fn with(mut self, job: BackgroundJob, deadline: Duration) -> Self {
        self.0[job as usize] = deadline;
        self
    }
}
