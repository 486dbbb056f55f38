use crate::{LogFormat, StoreArgs};
use anyhow::Context;
use clap::Args;
use keyplane_server::config::RegistryConfig;
use keyplane_server::oidc::OidcConfig;
use keyplane_server::{ops, App, Config};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

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
    /// Requests a credential may send in a burst before the per-minute rate applies.
    #[arg(long, env = "KEYPLANE_RATE_LIMIT_BURST", default_value_t = 10)]
    rate_limit_burst: u32,
    /// Failed authentications allowed per client address per minute; past it the address gets 429
    /// until its budget refills. 0 turns the limit off. (Behind a proxy, every client shares the
    /// proxy's address.)
    #[arg(long, env = "KEYPLANE_FAILED_AUTH_PER_MINUTE", default_value_t = 300)]
    failed_auth_per_minute: u32,
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
    #[arg(long, env = "KEYPLANE_REGISTRY_TOKEN_TTL_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(60..=86_400))]
    registry_token_ttl_seconds: u64,
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
    /// Write every committed audit event as one JSON line to this file (`-`: stdout), at least
    /// once: after a crash the export resumes where it stopped. SIGHUP reopens the file (log
    /// rotation).
    #[arg(long, env = "KEYPLANE_AUDIT_LOG", value_name = "PATH")]
    audit_log: Option<String>,
    /// Prune audit events older than this many days, in the background; 0 keeps them forever.
    #[arg(long, env = "KEYPLANE_AUDIT_RETENTION_DAYS", default_value_t = 400)]
    audit_retention_days: u32,
    /// Refused attempts are aggregated over this many milliseconds into one event per caller,
    /// attempt and target (with a `count`).
    #[arg(long, env = "KEYPLANE_AUDIT_REFUSAL_WINDOW_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    audit_refusal_window_ms: u64,
    /// Log format on stderr. The level comes from KEYPLANE_LOG (default `info`).
    #[arg(long, env = "KEYPLANE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let oidc = match args.oidc_audience {
        Some(audience) => Some(
            OidcConfig::new(args.oidc_issuers, audience)
                .map_err(|e| anyhow::anyhow!("--oidc-issuer / --oidc-audience: {e}"))?,
        ),
        None => None,
    };
    let store = args.store.open().await?;
    tracing::info!(store = store.backend(), "store ready, migrations applied");
    if let Some(oidc) = &oidc {
        tracing::info!(oidc.issuers = ?oidc.issuers, oidc.audience = %oidc.audience, "users authenticate with access tokens from these issuers");
    }

    bootstrap(store.as_ref(), &args.store.data_dir).await?;

    let config = Config {
        rate_limit_per_minute: args.rate_limit_per_minute,
        rate_limit_burst: args.rate_limit_burst,
        failed_auth_per_minute: args.failed_auth_per_minute,
        last_used_flush_interval: Duration::from_millis(args.last_used_flush_ms),
        registry: RegistryConfig {
            service: args.registry_service,
            issuer: args.registry_issuer,
            endpoint: args.registry_endpoint,
            token_ttl: Duration::from_secs(args.registry_token_ttl_seconds),
        },
        oidc,
        audit_log: args
            .audit_log
            .as_deref()
            .map(keyplane_server::audit::AuditLogTarget::parse),
        audit_retention_days: args.audit_retention_days,
        audit_refusal_window: Duration::from_millis(args.audit_refusal_window_ms),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    let app = App::new(store, config);
    reopen_audit_log_on_sighup(app.clone());
    keyplane_server::serve(listener, app, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// On an empty store: org `default` and a `*` token, written to `<data-dir>/bootstrap.json`.
/// The file is written (mode 0600, fresh inode) before the store commits, and only moved into place
/// once it has, so the token can neither be lost nor land in a file others can read.
async fn bootstrap(store: &dyn keyplane_store::Store, data_dir: &Path) -> anyhow::Result<()> {
    let created =
        ops::mint_first_org("default").map_err(|e| anyhow::anyhow!("bootstrap failed: {e}"))?;
    let path = data_dir.join("bootstrap.json");
    let pending = data_dir.join("bootstrap.json.pending");
    write_private(&pending, &crate::admin::org_json(&created))
        .with_context(|| format!("writing {}", pending.display()))?;
    let bootstrapped = ops::bootstrap(store, &created).await;
    match bootstrapped {
        Ok(true) => {
            std::fs::rename(&pending, &path)
                .with_context(|| format!("moving the bootstrap token to {}", path.display()))?;
            tracing::info!(path = %path.display(), tenant.id = %created.tenant.id, "empty store: created org `default`; its token is in the bootstrap file");
            Ok(())
        }
        Ok(false) => Ok(std::fs::remove_file(&pending)?),
        Err(e) => {
            let _ = std::fs::remove_file(&pending);
            Err(anyhow::anyhow!("bootstrap failed: {e}"))
        }
    }
}

/// Writes `body` to a new file only its owner can read, replacing any stale one.
fn write_private(path: &Path, body: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    writeln!(file, "{body}")?;
    file.sync_all()
}

/// `logrotate` renames the file and sends SIGHUP: the export reopens its path.
fn reopen_audit_log_on_sighup(app: App) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reopening the audit log");
            app.reopen_audit_log();
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested: finishing in-flight requests");
}
