use crate::{LogFormat, StoreArgs};
use anyhow::Context;
use clap::Args;
use keyplane_server::auth::CacheConfig;
use keyplane_server::client_addr::{ForwardedHeader, TrustedProxies};
use keyplane_server::config::{HttpLimits, RegistryConfig};
use keyplane_server::oidc::OidcConfig;
use keyplane_server::{ops, App, Config};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// How long `serve` waits, after its stop, for the store's connections to close.
const STORE_CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEYPLANE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    store: StoreArgs,
    /// Management API requests per minute per credential (token bucket); 0 turns the limit off.
    #[arg(long, env = "KEYPLANE_RATE_LIMIT_PER_MINUTE", default_value_t = 100)]
    rate_limit_per_minute: u32,
    /// Requests a credential may send in a burst before the per-minute rate applies: at least 1,
    /// and at most --rate-limit-per-minute (when the limit is on). Default: 10, or the
    /// per-minute rate when that is lower.
    #[arg(long, env = "KEYPLANE_RATE_LIMIT_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit_burst: Option<u32>,
    /// Management API requests per minute per organization, all its credentials together (a
    /// tenth of it may come at once), so that minting credentials cannot multiply a budget and one
    /// organization cannot take the store from the others. 0 (the default) turns it off.
    #[arg(
        long,
        env = "KEYPLANE_TENANT_RATE_LIMIT_PER_MINUTE",
        default_value_t = 0
    )]
    tenant_rate_limit_per_minute: u32,
    /// Failed authentications allowed per client address per minute; past it the address's failures
    /// answer 429 until its budget refills (requests with a valid credential are always served).
    /// 0 turns the limit off. Behind a proxy, see --trusted-proxies.
    #[arg(long, env = "KEYPLANE_FAILED_AUTH_PER_MINUTE", default_value_t = 300)]
    failed_auth_per_minute: u32,
    /// Live (unrevoked) credentials one organization may hold, API tokens, service accounts and
    /// robot accounts together: a create through the API past it answers 409 until one is
    /// revoked (expired ones count until then). The operator's `admin` commands are not held to
    /// it. 0 turns the limit off.
    #[arg(long, env = "KEYPLANE_MAX_LIVE_CREDENTIALS_PER_ORG", default_value_t = keyplane_server::config::DEFAULT_MAX_LIVE_CREDENTIALS_PER_ORG)]
    max_live_credentials_per_org: u64,
    /// Introspections per minute, per caller's organization, of tokens the verification caches
    /// do not hold that turn out unknown (each one a store lookup); past it such introspections
    /// answer 429 without a lookup until the budget refills, while tokens in the caches are
    /// answered as usual. 0 turns the budget off.
    #[arg(long, env = "KEYPLANE_INTROSPECT_MISSES_PER_MINUTE", default_value_t = keyplane_server::config::DEFAULT_INTROSPECT_MISSES_PER_MINUTE)]
    introspect_misses_per_minute: u32,
    /// How often coalesced `last_used_at` updates are written, in milliseconds (how far they may lag).
    #[arg(long, env = "KEYPLANE_LAST_USED_FLUSH_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    last_used_flush_ms: u64,
    /// The registry's `auth.token.service` (the JWT audience of registry tokens).
    #[arg(
        long,
        env = "KEYPLANE_REGISTRY_SERVICE",
        default_value = "keyplane-registry"
    )]
    registry_service: String,
    /// The registry's `auth.token.issuer` (the JWT issuer of registry tokens).
    #[arg(long, env = "KEYPLANE_REGISTRY_ISSUER", default_value = "keyplane")]
    registry_issuer: String,
    /// The registry address reported as the Registry `endpoint` (what `docker login` is given).
    #[arg(
        long,
        env = "KEYPLANE_REGISTRY_ENDPOINT",
        default_value = "localhost:5000"
    )]
    registry_endpoint: String,
    /// Lifetime of registry tokens in seconds (the token spec's minimum is 60).
    #[arg(long, env = "KEYPLANE_REGISTRY_TOKEN_TTL_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(60..=crate::admin::MAX_REGISTRY_TOKEN_TTL_SECONDS))]
    registry_token_ttl_seconds: u64,
    #[command(flatten)]
    registry_key_refresh: crate::admin::RegistryKeyRefresh,
    /// Costly registry logins (many repositories against wide permission globs, computed on a
    /// blocking thread) one organization may have under way or waiting at once on this server;
    /// more answer 429, so one organization cannot take every turn. From 1 to the server's turns
    /// (2 per core). Default: half of the turns, at least 1.
    #[arg(long, env = "KEYPLANE_REGISTRY_COSTLY_GRANTS_PER_ORG", value_parser = clap::value_parser!(u64).range(1..))]
    registry_costly_grants_per_org: Option<u64>,
    /// Trust JWT access tokens from this OAuth/OIDC issuer, spelled exactly as its tokens' `iss`
    /// (repeatable; comma-separated in the environment). Its keys come from its discovery document.
    #[arg(
        long = "oidc-issuer",
        env = "KEYPLANE_OIDC_ISSUER",
        value_name = "URL",
        value_delimiter = ',',
        requires = "oidc_audience"
    )]
    oidc_issuers: Vec<String>,
    /// The `aud` user access tokens must carry: this API's identifier at the identity provider.
    #[arg(
        long,
        env = "KEYPLANE_OIDC_AUDIENCE",
        value_name = "AUDIENCE",
        requires = "oidc_issuers"
    )]
    oidc_audience: Option<String>,
    /// The one --oidc-issuer whose `sub`, when a canonical lower-case UUID (not version 5), is the
    /// user id as it is; every other `sub` (and every other issuer's) maps to
    /// UUIDv5(URL, issuer + "#" + sub).
    /// Give `keyplane admin grant` the same value.
    #[arg(
        long,
        env = "KEYPLANE_OIDC_UUID_SUBJECTS",
        value_name = "ISSUER",
        requires = "oidc_issuers"
    )]
    oidc_uuid_subjects: Option<String>,
    /// Seconds a cached valid credential keeps verifying past its cache lifetime while the store
    /// cannot be reached (stale-if-error); revoked, unknown and uncached ones fail closed. 0 = off.
    #[arg(long, env = "KEYPLANE_STALE_IF_ERROR_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    stale_if_error_seconds: u64,
    /// Live credentials the verification cache holds (LRU-like beyond that: a credential used
    /// again is kept over one used once). Size it above the credentials in active use across all
    /// organizations; past it, verifications read the store.
    #[arg(long, env = "KEYPLANE_VERIFY_CACHE_CAPACITY", default_value_t = CacheConfig::default().capacity as u64, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    verify_cache_capacity: u64,
    /// Reverse proxies (CIDRs or addresses, comma-separated) whose forwarding header names the
    /// client; from anyone else the TCP peer is the client. Default: none.
    #[arg(
        long,
        env = "KEYPLANE_TRUSTED_PROXIES",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<String>,
    /// Accept keys imported from another system (`keyplane admin import-credentials`) that start
    /// with PREFIX as credentials of KIND (`api-token`, `service-account`, `robot`), e.g.
    /// `acme_live_=api-token`: they skip keyplane's length and checksum rules (not the 128-byte
    /// cap, nor the failed-authentication budget). Repeatable; comma-separated in the environment.
    /// Asked only about what is not a keyplane token. See README, "Migrating to keyplane".
    #[arg(
        long = "legacy-token-prefix",
        env = "KEYPLANE_LEGACY_TOKEN_PREFIXES",
        value_name = "PREFIX=KIND",
        value_delimiter = ','
    )]
    legacy_token_prefixes: Vec<String>,
    /// The forwarding header the trusted proxies set (only that one is read).
    #[arg(
        long,
        env = "KEYPLANE_FORWARDED_HEADER",
        value_enum,
        default_value = "x-forwarded-for"
    )]
    forwarded_header: ForwardedHeaderArg,
    /// Seconds a client has to send a request's head (from connecting, or from the first byte of
    /// each next request).
    #[arg(long, env = "KEYPLANE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_read_timeout_seconds: u64,
    /// Seconds a client has to send a whole request body, from the start of the request.
    #[arg(long, env = "KEYPLANE_BODY_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    body_timeout_seconds: u64,
    /// Seconds a kept-alive connection may stay idle between requests before it is closed.
    #[arg(long, env = "KEYPLANE_IDLE_TIMEOUT_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    idle_timeout_seconds: u64,
    /// Largest request head (request line and headers) in bytes; larger answers 431.
    #[arg(long, env = "KEYPLANE_MAX_HEADER_BYTES", default_value_t = 32 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024))]
    max_header_bytes: u64,
    /// Connections served at once; more wait in the listen backlog. Lowered at start to what the
    /// open-file limit allows.
    #[arg(long, env = "KEYPLANE_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Connections one client address (an IPv6 client's /64) may have open at once; one past it
    /// is closed as soon as it is accepted, so that one address cannot hold every slot of
    /// --max-connections while everyone else waits. The TCP peer is the address counted:
    /// --trusted-proxies are not held to it (their connections carry many clients). 0 turns the
    /// cap off.
    #[arg(long, env = "KEYPLANE_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    max_connections_per_client: u64,
    /// Seconds a stop (SIGTERM, Ctrl-C) may take in all: open connections, then leak reports and
    /// canary alarms (at least 5 s), the last-used flush and the audit export's last pass; what is
    /// left at the deadline is cut off.
    #[arg(long, env = "KEYPLANE_SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=3600))]
    shutdown_timeout_seconds: u64,
    /// Write every committed audit event as one JSON line to this file (`-`: stdout), at least
    /// once: after a crash the export resumes where it stopped. SIGHUP reopens the file (log
    /// rotation).
    #[arg(long, env = "KEYPLANE_AUDIT_LOG", value_name = "PATH")]
    audit_log: Option<String>,
    /// Bootstrap an empty store (a new `default` organization and its token) even though the
    /// --audit-log file already holds exported events. Without it such a start is refused: an
    /// empty store under a used audit log is a lost data directory or a wrong --database-url
    /// more often than a new deployment.
    #[arg(long, env = "KEYPLANE_ALLOW_EMPTY_STORE")]
    allow_empty_store: bool,
    /// Prune audit events older than this many days (at most 36500), in the background; 0 keeps
    /// them forever.
    #[arg(long, env = "KEYPLANE_AUDIT_RETENTION_DAYS", default_value_t = 400, value_parser = clap::value_parser!(u32).range(0..=36_500))]
    audit_retention_days: u32,
    /// Refused attempts are aggregated over this many milliseconds into one event per caller,
    /// attempt and target (with a `count`).
    #[arg(long, env = "KEYPLANE_AUDIT_REFUSAL_WINDOW_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    audit_refusal_window_ms: u64,
    /// How often the lifecycle sweep runs: `credential.expiring`/`credential.expired` events,
    /// retiring unused previous secrets (`retire_when_unused_seconds`), forgetting ended ones.
    #[arg(long, env = "KEYPLANE_LIFECYCLE_SWEEP_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lifecycle_sweep_seconds: u64,
    /// On PostgreSQL, how far this replica's clock may be from the database's (measured at start
    /// and every few seconds) before the jobs that change the store by it are held: the lifecycle
    /// sweep (grace ends, expiry notices), audit retention and the pruning of Idempotency-Key
    /// records, console sessions, webhook deliveries and public revocation reports. 1 to 3600.
    #[arg(long, env = "KEYPLANE_MAX_CLOCK_SKEW_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    max_clock_skew_seconds: u64,
    /// On PostgreSQL, take this replica out of its load balancer's rotation while its clock is
    /// off from the database's by more than this many seconds: `/readyz` answers 503 (`reason`
    /// `clock skewed`) until a measurement finds it within half of that. Verification and
    /// changes sent to it still work. Off unless set; 1 to 86400.
    #[arg(long, env = "KEYPLANE_UNREADY_CLOCK_SKEW_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    unready_clock_skew_seconds: Option<u64>,
    /// Where GitHub's secret-scanning public keys are fetched (cached; refetched when a request
    /// names an unknown key, at most every 5 min once keys are loaded, every 10 s until then).
    /// `https`, or `http` to a loopback host.
    #[arg(
        long,
        env = "KEYPLANE_GITHUB_SECRET_SCANNING_KEYS_URL",
        value_name = "URL",
        default_value = keyplane_server::leaks::GITHUB_KEYS_URL
    )]
    github_secret_scanning_keys_url: String,
    /// Unauthenticated `POST /v1/credentials/revoke` requests (up to 100 tokens each) per client
    /// address per minute; 0 turns the limit off. Behind a proxy, see --trusted-proxies.
    #[arg(long, env = "KEYPLANE_PUBLIC_REVOKE_PER_MINUTE", default_value_t = 10)]
    public_revoke_per_minute: u32,
    /// Public revocation reports that name a well-formed token (each is stored, costing the
    /// store two writes) accepted per minute by this server from all addresses together; past it
    /// they answer 503 with Retry-After. Bounds what a sender with many addresses can make the
    /// store's writers do. 0 turns the budget off. GitHub's signed reports are not counted.
    #[arg(
        long,
        env = "KEYPLANE_PUBLIC_REVOKE_TOTAL_PER_MINUTE",
        default_value_t = 600
    )]
    public_revoke_total_per_minute: u32,
    /// Let webhooks target loopback, private, link-local and cloud-metadata addresses (tests,
    /// closed networks). Without it such targets are refused at creation and at every attempt.
    #[arg(long, env = "KEYPLANE_WEBHOOK_ALLOW_PRIVATE_TARGETS")]
    webhook_allow_private_targets: bool,
    /// Delays before each retry of a failed webhook delivery: comma-separated, each a whole
    /// number with `ms`, `s`, `m` or `h` (at most 20, each at most 48h), stretched by 0-20 %
    /// jitter. After the last retry fails the delivery is marked failed.
    #[arg(long, env = "KEYPLANE_WEBHOOK_RETRY_SCHEDULE", value_name = "DELAYS", default_value = keyplane_server::webhooks::DEFAULT_RETRY_SCHEDULE)]
    webhook_retry_schedule: String,
    /// Serve the web console at /console (`--console=false` turns it off).
    #[arg(long, env = "KEYPLANE_CONSOLE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    console: bool,
    /// The console is reached over https (directly or through a TLS-terminating proxy): its
    /// cookies get `Secure` and the `__Host-` prefix. Implied by --tls-cert and by an https
    /// --console-oidc-redirect-url.
    #[arg(long, env = "KEYPLANE_CONSOLE_HTTPS")]
    console_https: bool,
    /// A console session unused this many minutes ends.
    #[arg(long, env = "KEYPLANE_CONSOLE_IDLE_MINUTES", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=1440))]
    console_idle_minutes: u64,
    /// A console session ends this many hours after sign-in, however busy.
    #[arg(long, env = "KEYPLANE_CONSOLE_SESSION_HOURS", default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=168))]
    console_session_hours: u64,
    /// "Sign in with <issuer>" on the console: the OAuth client id registered at the first
    /// --oidc-issuer (a public client: authorization code with PKCE, no secret).
    #[arg(
        long,
        env = "KEYPLANE_CONSOLE_OIDC_CLIENT_ID",
        requires = "oidc_issuers"
    )]
    console_oidc_client_id: Option<String>,
    /// Where the issuer sends the browser back: this server's public URL +
    /// /console/oidc/callback. Default: built from the Host the browser used.
    #[arg(
        long,
        env = "KEYPLANE_CONSOLE_OIDC_REDIRECT_URL",
        requires = "console_oidc_client_id"
    )]
    console_oidc_redirect_url: Option<String>,
    /// The scope the console asks the issuer for: `openid` plus whatever puts --oidc-audience in
    /// the access token at that issuer.
    #[arg(
        long,
        env = "KEYPLANE_CONSOLE_OIDC_SCOPE",
        default_value = "openid",
        requires = "console_oidc_client_id"
    )]
    console_oidc_scope: String,
    /// "Sign in with" sign-ins one client address may start per minute (an IPv6 client's /64);
    /// past it the console answers 429 with Retry-After. Each sign-in may cost a code exchange at
    /// the issuer, whose own rate limit every user's sign-in shares. 0 turns the limit off.
    /// Behind a proxy, see --trusted-proxies.
    #[arg(
        long,
        env = "KEYPLANE_CONSOLE_OIDC_SIGN_INS_PER_MINUTE",
        default_value_t = 10
    )]
    console_oidc_sign_ins_per_minute: u32,
    /// Serve HTTPS with this PEM certificate chain (leaf first): TLS 1.2 and 1.3, HTTP/2 or
    /// HTTP/1.1 by ALPN. Reloaded without a restart when the file changes or on SIGHUP.
    #[arg(
        long,
        env = "KEYPLANE_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(
        long,
        env = "KEYPLANE_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// Seconds between checks of --tls-cert and --tls-key for a change (contents, inode, owner,
    /// mode); 0: reload on SIGHUP only.
    #[arg(long, env = "KEYPLANE_TLS_CHECK_SECONDS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=3600))]
    tls_check_seconds: u64,
    /// Revocation streams (`GET /v1/revocations/stream`) open at once; more answer 429.
    #[arg(long, env = "KEYPLANE_MAX_REVOCATION_STREAMS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_revocation_streams: u64,
    /// Revocation streams of one organization open at once, so that one cannot take every slot;
    /// more answer 429. At most --max-revocation-streams. Default: 100, or
    /// --max-revocation-streams when that is lower.
    #[arg(long, env = "KEYPLANE_MAX_REVOCATION_STREAMS_PER_ORG", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_revocation_streams_per_org: Option<u64>,
    /// Seconds between heartbeats on an idle revocation stream; clients take a stream silent for
    /// two heartbeats for dead, so keep it well below their max_staleness. Must be below
    /// --idle-timeout-seconds, which would otherwise close every idle stream first.
    #[arg(long, env = "KEYPLANE_REVOCATION_HEARTBEAT_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=300))]
    revocation_heartbeat_seconds: u64,
    /// Log format on stderr. The level comes from KEYPLANE_LOG (default `info`).
    #[arg(long, env = "KEYPLANE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// A store at an older schema than this keyplane's: `auto` migrates it at start; `never`
    /// refuses to start until `keyplane admin migrate` has (for replicas sharing a store, so that
    /// one new replica does not migrate it under the older ones). A new, empty store is created
    /// either way.
    #[arg(long, env = "KEYPLANE_MIGRATE", value_enum, default_value = "auto")]
    migrate: MigrateArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MigrateArg {
    Auto,
    Never,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ForwardedHeaderArg {
    XForwardedFor,
    Forwarded,
}

/// Descriptors kept for the store, the log and the listener when sizing the connection limit.
const RESERVED_FILES: u64 = 256;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Before anything slow (the store may take a while to connect): SIGHUP's default action
    // would end the process, and a `logrotate` or `systemctl reload` may send one at any time.
    let hangups = hangup_signal();
    // SIGTERM and Ctrl-C likewise: one during the start ends it cleanly, never between the
    // bootstrap's commit and its file's rename.
    let mut shutdown = Box::pin(shutdown_signal());
    check_limits(&args)?;
    let header = match args.forwarded_header {
        ForwardedHeaderArg::XForwardedFor => ForwardedHeader::XForwardedFor,
        ForwardedHeaderArg::Forwarded => ForwardedHeader::Forwarded,
    };
    let trusted_proxies = TrustedProxies::parse(&args.trusted_proxies, header)
        .map_err(|e| anyhow::anyhow!("--trusted-proxies: {e}"))?;
    let legacy_token_prefixes = keyplane_core::legacy_token::LegacyPrefixes::parse(
        args.legacy_token_prefixes.iter().map(String::as_str),
    )
    .map_err(|e| anyhow::anyhow!("--legacy-token-prefix: {e}"))?;
    let mut max_connections = args.max_connections;
    if let Some(files) = raise_open_file_limit() {
        let allowed = files.saturating_sub(RESERVED_FILES).max(1);
        if allowed < max_connections {
            tracing::warn!(
                max_connections,
                open_file_limit = files,
                "the open-file limit allows fewer connections: serving at most {allowed}"
            );
            max_connections = allowed;
        }
    }
    let console_oidc = match &args.console_oidc_client_id {
        Some(client_id) => Some(
            keyplane_server::console::ConsoleOidc::new(
                args.oidc_issuers.first().cloned().unwrap_or_default(),
                client_id.clone(),
                args.console_oidc_redirect_url.clone(),
                args.console_oidc_scope.clone(),
            )
            .map_err(|e| anyhow::anyhow!("--console-oidc-client-id: {e}"))?,
        ),
        None => None,
    };
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = keyplane_server::tls::TlsFiles { cert, key };
            files
                .load()
                .map_err(|e| anyhow::anyhow!("--tls-cert / --tls-key: {e}"))?;
            Some(files)
        }
        _ => None,
    };
    let audit_log = match args.audit_log.as_deref() {
        Some(raw) => {
            let target = keyplane_server::audit::AuditLogTarget::parse(raw);
            // Like the TLS files: a log the export could not open stops the start, rather than a
            // server that runs without its audit export.
            target.check().map_err(|e| {
                anyhow::anyhow!("--audit-log: cannot open {raw} for appending: {e}")
            })?;
            Some(target)
        }
        None => None,
    };
    let console = keyplane_server::console::ConsoleConfig {
        enabled: args.console,
        // Served over TLS here, the console is reached over https too: a cookie without
        // `Secure` would go out in clear to any http:// URL of this host an attacker lures to.
        secure_cookies: args.console_https
            || tls.is_some()
            || console_oidc
                .as_ref()
                .and_then(|o| o.redirect_url.as_deref())
                .is_some_and(|url| url.starts_with("https://")),
        idle_timeout: Duration::from_secs(args.console_idle_minutes * 60),
        absolute_timeout: Duration::from_secs(args.console_session_hours * 3600),
        oidc: console_oidc,
        oidc_sign_ins_per_minute: args.console_oidc_sign_ins_per_minute,
    };
    let oidc = match args.oidc_audience {
        Some(audience) => {
            let config = OidcConfig::new(args.oidc_issuers, audience)
                .map_err(|e| anyhow::anyhow!("--oidc-issuer / --oidc-audience: {e}"))?;
            Some(match args.oidc_uuid_subjects {
                Some(issuer) => config
                    .with_uuid_subjects(issuer)
                    .map_err(|e| anyhow::anyhow!("--oidc-uuid-subjects: {e}"))?,
                None => config,
            })
        }
        None => None,
    };
    keyplane_server::leaks::check_keys_url(&args.github_secret_scanning_keys_url)
        .map_err(|e| anyhow::anyhow!("--github-secret-scanning-keys-url: {e}"))?;
    let webhook_retry_schedule =
        keyplane_server::webhooks::parse_schedule(&args.webhook_retry_schedule)
            .map_err(|e| anyhow::anyhow!("--webhook-retry-schedule: {e}"))?;
    let opened = tokio::select! {
        biased;
        () = &mut shutdown => {
            tracing::info!("stopped while connecting to the store");
            return Ok(());
        }
        opened = args.store.open_with(match args.migrate {
            MigrateArg::Auto => keyplane_store::PendingMigrations::Apply,
            MigrateArg::Never => keyplane_store::PendingMigrations::Refuse,
        }) => opened?,
    };
    // The store logged any migration it ran, from which schema to which.
    let (store, schema) = (opened.store, opened.schema);
    tracing::info!(store = store.backend(), schema, "store ready");
    if let Some(oidc) = &oidc {
        tracing::info!(oidc.issuers = ?oidc.issuers, oidc.audience = %oidc.audience, "users authenticate with access tokens from these issuers");
    }

    if let Some(target) = &audit_log {
        if !args.allow_empty_store {
            refuse_empty_store_under_used_log(store.as_ref(), target).await?;
        }
    }
    // Not interrupted: the bootstrap file is settled before a stop is acted on.
    bootstrap(store.as_ref(), &args.store.data_dir).await?;
    if already_done(&mut shutdown).await {
        store.close().await;
        tracing::info!("stopped before serving");
        return Ok(());
    }

    let config = Config {
        rate_limit_per_minute: args.rate_limit_per_minute,
        tenant_rate_limit_per_minute: args.tenant_rate_limit_per_minute,
        rate_limit_burst: args
            .rate_limit_burst
            .unwrap_or(DEFAULT_RATE_LIMIT_BURST.min(args.rate_limit_per_minute.max(1))),
        failed_auth_per_minute: args.failed_auth_per_minute,
        max_live_credentials_per_org: (args.max_live_credentials_per_org > 0)
            .then_some(args.max_live_credentials_per_org),
        introspect_misses_per_minute: args.introspect_misses_per_minute,
        last_used_flush_interval: Duration::from_millis(args.last_used_flush_ms),
        registry: RegistryConfig {
            service: args.registry_service,
            issuer: args.registry_issuer,
            endpoint: args.registry_endpoint,
            token_ttl: Duration::from_secs(args.registry_token_ttl_seconds),
            key_refresh: args.registry_key_refresh.interval(),
            costly_grants_per_org: args
                .registry_costly_grants_per_org
                .map(|share| share as usize),
        },
        oidc,
        verify_cache: CacheConfig {
            stale_if_error: Duration::from_secs(args.stale_if_error_seconds),
            capacity: usize::try_from(args.verify_cache_capacity)
                .context("--verify-cache-capacity does not fit this machine")?,
            ..CacheConfig::default()
        },
        trusted_proxies,
        http: HttpLimits {
            header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds),
            body_timeout: Duration::from_secs(args.body_timeout_seconds),
            idle_timeout: Duration::from_secs(args.idle_timeout_seconds),
            max_header_bytes: args.max_header_bytes as usize,
            max_connections: max_connections as usize,
            max_connections_per_client: args.max_connections_per_client as usize,
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_seconds),
        },
        audit_log,
        audit_retention_days: args.audit_retention_days,
        audit_refusal_window: Duration::from_millis(args.audit_refusal_window_ms),
        lifecycle_sweep_interval: Duration::from_secs(args.lifecycle_sweep_seconds),
        max_clock_skew: Duration::from_secs(args.max_clock_skew_seconds),
        unready_clock_skew: args.unready_clock_skew_seconds.map(Duration::from_secs),
        github_keys: keyplane_server::leaks::GithubKeysConfig {
            url: args.github_secret_scanning_keys_url,
            ..Default::default()
        },
        public_revoke_per_minute: args.public_revoke_per_minute,
        public_revoke_total_per_minute: args.public_revoke_total_per_minute,
        webhooks: keyplane_server::webhooks::WebhookConfig {
            allow_private_targets: args.webhook_allow_private_targets,
            retry_schedule: webhook_retry_schedule,
            ..Default::default()
        },
        console,
        tls,
        tls_check_interval: (args.tls_check_seconds > 0)
            .then(|| Duration::from_secs(args.tls_check_seconds)),
        max_revocation_streams: args.max_revocation_streams as usize,
        max_revocation_streams_per_org: args
            .max_revocation_streams_per_org
            .unwrap_or(DEFAULT_MAX_REVOCATION_STREAMS_PER_ORG.min(args.max_revocation_streams))
            as usize,
        revocation_heartbeat: Duration::from_secs(args.revocation_heartbeat_seconds),
        legacy_token_prefixes,
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(address = %listener.local_addr()?, scheme, "listening");
    let app = App::new(store.clone(), config);
    reload_on_sighup(hangups, app.clone());
    keyplane_server::serve(listener, app, shutdown).await?;
    // After the last `last_used_at` flush: SQLite checkpoints and removes its WAL. Bounded: a
    // pool's close waits for every connection, and one a background step abandoned on a store
    // gone silent is held by sqlx's release check until TCP gives up.
    if tokio::time::timeout(STORE_CLOSE_WAIT, store.close())
        .await
        .is_err()
    {
        tracing::warn!("the store's connections did not all close within 5 s (a connection to it went silent?); exiting without them");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Whether `future` has already finished (polled once, never waited for).
async fn already_done(future: &mut (impl std::future::Future<Output = ()> + Unpin)) -> bool {
    tokio::select! {
        biased;
        () = future => true,
        () = std::future::ready(()) => false,
    }
}

/// `--rate-limit-burst` when not given (lowered to the per-minute rate below it).
const DEFAULT_RATE_LIMIT_BURST: u32 = 10;

/// `--max-revocation-streams-per-org` when not given (lowered to `--max-revocation-streams`
/// below it).
const DEFAULT_MAX_REVOCATION_STREAMS_PER_ORG: u64 = 100;

/// Refuses flag combinations that would quietly not do what they say.
fn check_limits(args: &ServeArgs) -> anyhow::Result<()> {
    if args.revocation_heartbeat_seconds >= args.idle_timeout_seconds {
        anyhow::bail!(
            "--revocation-heartbeat-seconds ({}) must be below --idle-timeout-seconds ({}): an idle revocation stream would be closed before its heartbeat",
            args.revocation_heartbeat_seconds,
            args.idle_timeout_seconds
        );
    }
    match args.max_revocation_streams_per_org {
        Some(per_org) if per_org > args.max_revocation_streams => {
            anyhow::bail!(
                "--max-revocation-streams-per-org ({per_org}) must not exceed --max-revocation-streams ({}): an organization cannot have more streams than the server",
                args.max_revocation_streams
            );
        }
        _ => {}
    }
    let turns = keyplane_server::registry::costly_grant_turns();
    match args.registry_costly_grants_per_org {
        Some(share) if share > turns as u64 => {
            anyhow::bail!(
                "--registry-costly-grants-per-org ({share}) must not exceed this server's costly-grant turns ({turns}: 2 per core): an organization cannot have more than the server"
            );
        }
        _ => {}
    }
    match args.rate_limit_burst {
        Some(burst) if args.rate_limit_per_minute > 0 && burst > args.rate_limit_per_minute => {
            anyhow::bail!(
                "--rate-limit-burst ({burst}) must not exceed --rate-limit-per-minute ({}): the limiter lets a burst be at most one minute's requests",
                args.rate_limit_per_minute
            );
        }
        _ => {}
    }
    Ok(())
}

/// Stops the start when the store is empty (never bootstrapped) but `target` already holds
/// exported events: bootstrapping would hand out a new `default` organization and `*` token on a
/// store that lost every organization the log speaks of (a lost data directory, a wrong
/// `--database-url`), and append its events under seqs the log already holds.
async fn refuse_empty_store_under_used_log(
    store: &dyn keyplane_store::Store,
    target: &keyplane_server::audit::AuditLogTarget,
) -> anyhow::Result<()> {
    let bootstrapped = store
        .is_bootstrapped()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the store: {e}"))?;
    if bootstrapped {
        return Ok(());
    }
    let used = target
        .exported_before()
        .map_err(|e| anyhow::anyhow!("--audit-log: cannot check what it holds: {e}"))?;
    match used {
        Some(why) => anyhow::bail!(
            "the store is empty, but {why}: this data directory or database was lost or is not the one the log was exported from. \
             Restore the store from a backup, or point --database-url/--data-dir at the right one; \
             to start a new store anyway, pass --allow-empty-store (and better, a new --audit-log path)"
        ),
        None => Ok(()),
    }
}

/// On an empty store: org `default` and a `*` token, written to `<data-dir>/bootstrap.json`.
/// The file is written (mode 0600, fresh inode) before the store commits, and only moved into place
/// once it has, so the token can neither be lost nor land in a file others can read. Each attempt
/// writes a pending file of its own (`bootstrap.<org id>.json.pending`): replicas starting at once
/// on one data directory never touch each other's, and only the one whose org the store took moves
/// its file. A pending file an earlier start left behind (it died, or lost the store, between the
/// commit and the move) is settled at the next start ([`settle_pending_bootstrap`]). A
/// bootstrapped store is only read: `serve` writes nothing to it at start, so it starts on a full
/// disk or a read-only store and serves verification and reads.
async fn bootstrap(store: &dyn keyplane_store::Store, data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join("bootstrap.json");
    if store
        .is_bootstrapped()
        .await
        .map_err(|e| anyhow::anyhow!("bootstrap failed: {e}"))?
    {
        settle_pending_bootstrap(store, data_dir, &path).await;
        return Ok(());
    }
    let by = keyplane_core::CreatedBy::system(keyplane_core::Channel::Bootstrap);
    let created =
        ops::mint_first_org("default", by).map_err(|e| anyhow::anyhow!("bootstrap failed: {e}"))?;
    let pending = data_dir.join(format!("bootstrap.{}.json.pending", created.tenant.id));
    write_private(&pending, &crate::admin::org_json(&created))
        .with_context(|| format!("writing {}", pending.display()))?;
    match ops::bootstrap(store, &created).await {
        Ok(true) => {
            match publish(&pending, &path) {
                Ok(()) => {}
                // Another replica, starting on the bootstrapped store, settled it first.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && token_in(&path) == Some(created.token.secret.hash()) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("moving the bootstrap token to {}", path.display())
                    })
                }
            }
            tracing::info!(path = %path.display(), tenant.id = %created.tenant.id, "empty store: created org `default`; its token is in the bootstrap file");
            Ok(())
        }
        Ok(false) => remove_if_present(&pending)
            .with_context(|| format!("removing {}", pending.display())),
        // The store may have committed all the same (a connection lost during the commit): the
        // pending file stays, for the next start to settle.
        Err(e) => Err(anyhow::anyhow!(
            "bootstrap failed: {e} (if the store took it all the same, its token is in {}, which the next start moves to {})",
            pending.display(),
            path.display()
        )),
    }
}

/// What earlier starts left pending on a bootstrapped store: the file whose token the store holds
/// becomes `path`, unless `path` already holds a live token (one left from a wiped store does
/// not); the others (attempts the store did not take) are removed. Store reads only; a failure
/// leaves the files for the next start.
async fn settle_pending_bootstrap(store: &dyn keyplane_store::Store, data_dir: &Path, path: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    let mut pending: Vec<_> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|file| {
            file.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with("bootstrap.") && name.ends_with(".json.pending")
                })
        })
        .collect();
    if pending.is_empty() {
        return;
    }
    pending.sort();
    let Ok(mut settled) = holds_a_live_token(store, path).await else {
        return;
    };
    for file in pending {
        let result = match holds_a_live_token(store, &file).await {
            Ok(true) if !settled => publish(&file, path).map(|()| {
                settled = true;
                tracing::warn!(path = %path.display(), "the bootstrap token an earlier start left pending is now in the bootstrap file");
            }),
            Ok(_) => remove_if_present(&file),
            Err(error) => {
                tracing::warn!(%error, path = %file.display(), "cannot check a pending bootstrap file; the next start tries again");
                continue;
            }
        };
        if let Err(error) = result {
            tracing::warn!(%error, path = %file.display(), "cannot settle a pending bootstrap file");
        }
    }
}

/// The hash of the token in a bootstrap file, if it holds one.
fn token_in(file: &Path) -> Option<keyplane_core::TokenHash> {
    let text = std::fs::read_to_string(file).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["token"].as_str().map(keyplane_core::TokenHash::of)
}

/// Whether `file` holds a token the store knows and has not revoked.
async fn holds_a_live_token(
    store: &dyn keyplane_store::Store,
    file: &Path,
) -> Result<bool, keyplane_store::StoreError> {
    let Some(hash) = token_in(file) else {
        return Ok(false);
    };
    let found = store.find_credential_by_hash(&hash).await?;
    Ok(found.is_some_and(|credential| !credential.is_revoked()))
}

/// Moves `pending` to `path` and makes the move durable (the directory is synced).
fn publish(pending: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(pending, path)?;
    sync_dir_of(path)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `body` to a new file only its owner can read, replacing any stale one.
fn write_private(path: &Path, body: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        crate::create_private_dir(dir).map_err(std::io::Error::other)?;
    }
    remove_if_present(path)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    writeln!(file, "{body}")?;
    file.sync_all()?;
    sync_dir_of(path)
}

/// Makes a new or moved directory entry durable, as `sync_all` does a file's contents.
fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

/// Takes SIGHUP over from its default action (ending the process); a hangup that arrives before
/// [`reload_on_sighup`] runs is acted on then.
fn hangup_signal() -> Hangups {
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .inspect_err(|error| tracing::warn!(%error, "cannot handle SIGHUP"))
        .ok();
}

/// SIGHUP: the audit log export reopens its path (`logrotate` renamed the file) and the TLS
/// certificate and key are read again.
fn reload_on_sighup(hangups: Hangups, app: App) {
    #[cfg(unix)]
    if let Some(mut hangups) = hangups {
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reopening the audit log, reloading the TLS certificate");
                app.reopen_audit_log();
                app.reload_tls();
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (hangups, app);
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when the
/// future is first polled: a SIGTERM that arrives while the server is still starting must stop it
/// gracefully too, not kill it. Once the stop is under way, another SIGTERM or Ctrl-C ends the
/// process at once (exit 1): the way out of a stop that takes too long, short of SIGKILL.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let first = stop_signal();
    async move {
        first.await;
        tracing::info!("shutdown requested: finishing in-flight requests");
        let second = stop_signal();
        tokio::spawn(async move {
            second.await;
            tracing::warn!("second stop signal: exiting now, without finishing");
            std::process::exit(1);
        });
    }
}

/// The next SIGTERM or Ctrl-C after this call (its handlers are installed by the call itself).
fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (interrupt, terminate) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = wait(interrupt) => {},
                _ = wait(terminate) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Raises the soft open-file limit to the hard one (each connection holds a descriptor; the soft
/// default is often 1024) and returns the limit in force, if it is known.
#[cfg(unix)]
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // Refused on some systems (macOS caps it below an infinite hard limit): keep the soft one.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    // `rlim_t` is not u64 everywhere.
    #[allow(clippy::unnecessary_cast)]
    Some(limit.rlim_cur as u64)
}

#[cfg(not(unix))]
fn raise_open_file_limit() -> Option<u64> {
    None
}
