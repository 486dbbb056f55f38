//! The shared state every request sees.

use crate::auth::Verifier;
use crate::config::Config;
use crate::error::AppError;
use crate::metrics::Metrics;
use crate::ratelimit::CredentialRateLimiter;
use crate::usage::UsageRecorder;
use axum::http::HeaderMap;
use keyplane_core::Principal;
use keyplane_store::Store;
use std::sync::Arc;

#[derive(Clone)]
pub struct App(Arc<Inner>);

pub(crate) struct Inner {
    pub store: Arc<dyn Store>,
    pub config: Config,
    pub verifier: Verifier,
    pub usage: Arc<UsageRecorder>,
    pub rate_limiter: Option<CredentialRateLimiter>,
    pub tenant_rate_limiter: Option<crate::ratelimit::TenantRateLimiter>,
    pub failed_auth: Option<Arc<crate::failed_auth::FailedAuthLimiter>>,
    pub metrics: Metrics,
    /// `/openapi.json` and `/docs`, rendered once at start: each answer shares these bytes.
    pub openapi_json: axum::body::Bytes,
    pub docs_html: axum::body::Bytes,
    /// Loaded (or created) on first use, since `serve` needs no signing key until a robot logs
    /// in; replaced when a promotion is seen (`registry::refresh_signer`). Held only to clone.
    pub registry_signer: std::sync::RwLock<Option<Arc<crate::registry::Signer>>>,
    pub refusals: Arc<crate::audit::Refusals>,
    /// Notified on SIGHUP: the audit log export reopens its file.
    pub reopen_audit_log: Arc<tokio::sync::Notify>,
    /// Leaked-token response: GitHub's signing keys, the public revocation limit per address,
    /// and the reports being worked off.
    pub github_keys: crate::leaks::GithubKeys,
    /// When this replica first received each recent GitHub report.
    pub github_reports: crate::leaks::GithubReportsSeen,
    pub public_revoke_limiter: Option<crate::ratelimit::KeyedRateLimiter<std::net::IpAddr>>,
    /// The replica's budget of stored public revocation reports, all addresses together.
    pub public_revoke_budget: Option<crate::ratelimit::KeyedRateLimiter<()>>,
    pub leak_jobs: crate::jobs::Jobs,
    /// Changes (requests but GET/HEAD) running on their own task, so that a client hanging up
    /// cannot cut one between its commit and what must follow it (`router::Front::serve`).
    pub(crate) changes: crate::jobs::Jobs,
    /// The web console's server-side sessions.
    pub console_sessions: crate::console::Sessions,
    /// The console's "Sign in with …" issuer: its HTTP client and discovery document.
    pub(crate) console_issuer: crate::console::IssuerEndpoints,
    /// "Sign in with …" sign-ins started per client address.
    pub(crate) console_sign_in_limiter:
        Option<crate::ratelimit::KeyedRateLimiter<std::net::IpAddr>>,
    /// Notified on SIGHUP: the TLS certificate and key are read again.
    pub reload_tls: Arc<tokio::sync::Notify>,
    pub revocation_streams: crate::revocations::RevocationStreams,
    /// `/readyz`'s shared check of the store's reads.
    pub(crate) read_checks: crate::system::ReadChecks,
    /// Registry grants costly enough for a blocking thread (`registry::token`): a bounded number
    /// at once, the rest waiting their turn, and each organization's share of those.
    pub(crate) costly_grants: crate::registry::CostlyGrants,
    /// Where the usage-aware cutover's last sweep stopped (`ops::lifecycle_sweep`): the next
    /// continues there, so every candidate is reached within a bounded number of sweeps.
    pub(crate) retirement_cursor: crate::ops::RetirementCursor,
    /// This replica's clock against the database's: the time-driven jobs that change the shared
    /// store ask it first.
    pub(crate) clock_check: crate::clock_check::ClockCheck,
    /// Organizations whose chain the `--audit-log` export found behind what the log holds.
    pub(crate) export_behind: crate::export_heads::BehindExport,
    /// Events the export found pruned before it wrote them (`export_gaps`).
    pub(crate) export_gaps: crate::export_gaps::ExportGaps,
    /// Background jobs whose last step was abandoned at its deadline (`jobs::bounded`).
    pub(crate) stalled_jobs: crate::jobs::StalledJobs,
}

impl App {
    pub fn new(store: Arc<dyn Store>, config: Config) -> Self {
        let usage = Arc::new(UsageRecorder::new(store.clone()));
        let metrics = Metrics::new();
        let refusals = Arc::new(crate::audit::Refusals::new());
        let rate_limiter =
            CredentialRateLimiter::new(config.rate_limit_per_minute, config.rate_limit_burst);
        let tenant_rate_limiter = crate::ratelimit::TenantRateLimiter::new(
            config.tenant_rate_limit_per_minute,
            crate::ratelimit::tenant_burst(config.tenant_rate_limit_per_minute),
        );
        let failed_auth =
            crate::failed_auth::FailedAuthLimiter::new(config.failed_auth_per_minute).map(Arc::new);
        let verifier = Verifier::new(
            store.clone(),
            usage.clone(),
            metrics.clone(),
            &config,
            refusals.clone(),
            failed_auth.clone(),
        );
        let openapi_json = crate::openapi::to_json(&crate::router::openapi_document());
        let docs_html = axum::body::Bytes::from(crate::docs::render(&openapi_json));
        let openapi_json = axum::body::Bytes::from(openapi_json);
        let github_keys = crate::leaks::GithubKeys::new(config.github_keys.clone());
        let revocation_streams = crate::revocations::RevocationStreams::new(
            config.max_revocation_streams,
            config.max_revocation_streams_per_org,
        );
        let public_revoke_limiter = crate::ratelimit::KeyedRateLimiter::new(
            config.public_revoke_per_minute,
            config.public_revoke_per_minute,
        );
        let public_revoke_budget = crate::ratelimit::KeyedRateLimiter::new(
            config.public_revoke_total_per_minute,
            config.public_revoke_total_per_minute,
        );
        let console_sign_in_limiter = crate::ratelimit::KeyedRateLimiter::new(
            config.console.oidc_sign_ins_per_minute,
            config.console.oidc_sign_ins_per_minute,
        );
        let console_sessions = crate::console::Sessions::new(
            config.console.idle_timeout,
            config.console.absolute_timeout,
        );
        let costly_grants = crate::registry::CostlyGrants::new(&config.registry);
        let clock_check = crate::clock_check::ClockCheck::new(
            config.max_clock_skew,
            config.unready_clock_skew,
            config.last_used_flush_interval,
            config.clock.clone(),
        );
        Self(Arc::new(Inner {
            store,
            config,
            verifier,
            usage,
            failed_auth,
            rate_limiter,
            tenant_rate_limiter,
            metrics,
            openapi_json,
            docs_html,
            registry_signer: std::sync::RwLock::new(None),
            refusals,
            reopen_audit_log: Arc::new(tokio::sync::Notify::new()),
            github_keys,
            github_reports: Default::default(),
            public_revoke_limiter,
            public_revoke_budget,
            leak_jobs: crate::leaks::leak_jobs(),
            changes: crate::jobs::Jobs::new(crate::router::MAX_CHANGES, "changes"),
            console_sessions,
            console_issuer: Default::default(),
            console_sign_in_limiter,
            reload_tls: Arc::new(tokio::sync::Notify::new()),
            revocation_streams,
            read_checks: Default::default(),
            costly_grants,
            retirement_cursor: Default::default(),
            clock_check,
            export_behind: Default::default(),
            export_gaps: Default::default(),
            stalled_jobs: Default::default(),
        }))
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.0
    }

    /// Now, on the clock lifecycle decisions read (`Config::clock`).
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.0.config.clock.now()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.store
    }

    /// Authenticates a management API call and charges it to the caller's rate limit.
    pub(crate) async fn authenticate_management(
        &self,
        headers: &HeaderMap,
        at: crate::canary::Presented<'_>,
    ) -> Result<Principal, AppError> {
        let principal = self.0.verifier.authenticate(headers, at).await?;
        // Only a credential's organization: credentials can mint credentials, each with a bucket
        // of its own; a user is one person, and acts in several organizations.
        let tenant = match (principal.user_id(), principal.tenants()) {
            (None, [(tenant, _)]) => Some(*tenant),
            _ => None,
        };
        self.charge(principal.id(), tenant)?;
        Ok(principal)
    }

    /// Charges one request to `principal`'s rate limit and, for a credential, to its
    /// organization's (`tenant`): the management APIs' and the registry token service's.
    pub(crate) fn charge(
        &self,
        principal: uuid::Uuid,
        tenant: Option<keyplane_core::TenantId>,
    ) -> Result<(), AppError> {
        if let Some(limiter) = &self.0.rate_limiter {
            limiter.check(principal)?;
        }
        if let (Some(limiter), Some(tenant)) = (&self.0.tenant_rate_limiter, tenant) {
            limiter.check(tenant)?;
        }
        Ok(())
    }

    pub(crate) async fn registry_signer(&self) -> Result<Arc<crate::registry::Signer>, AppError> {
        if let Some(signer) = self.held_registry_signer() {
            return Ok(signer);
        }
        let loaded =
            crate::registry::load_or_create_signing_key(self.0.store.as_ref(), "serve", None)
                .await?;
        let mut held = self
            .0
            .registry_signer
            .write()
            .unwrap_or_else(|p| p.into_inner());
        // A refresh that ran meanwhile may have put a newer key in: it wins.
        Ok(held.get_or_insert_with(|| Arc::new(loaded)).clone())
    }

    pub(crate) fn held_registry_signer(&self) -> Option<Arc<crate::registry::Signer>> {
        self.0
            .registry_signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Signs with `signer` from now on; the one it replaced, if any.
    pub(crate) fn swap_registry_signer(
        &self,
        signer: Arc<crate::registry::Signer>,
    ) -> Option<Arc<crate::registry::Signer>> {
        self.0
            .registry_signer
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(signer)
    }

    /// Verifies a presented secret of any kind through the cache: the verification hot path,
    /// without HTTP (a canary's trigger names the surface `in_process`).
    pub async fn verify_secret(
        &self,
        presented: &str,
    ) -> Result<Arc<crate::auth::Verified>, AppError> {
        use crate::canary::{CanarySurface, Presentation};
        let at = || Presentation::new(CanarySurface::InProcess, String::new(), Default::default());
        self.0.verifier.verify_secret(presented, &at).await
    }

    /// Makes cached verifications of `subject` stale, here at once (other replicas hear of it
    /// through the store), and wakes `tenant`'s revocation streams: the change is in its chain.
    pub(crate) fn invalidate(&self, tenant: keyplane_core::TenantId, subject: uuid::Uuid) {
        self.0
            .verifier
            .invalidate(keyplane_store::Invalidation::Subject(subject));
        self.0.revocation_streams.wake_tenant(tenant);
    }

    /// Reopens the `--audit-log` file (after an outside tool renamed it).
    pub fn reopen_audit_log(&self) {
        self.0.reopen_audit_log.notify_one();
    }

    /// Reads the `--tls-cert` / `--tls-key` files again (SIGHUP); a pair that does not load is
    /// logged and the previous one keeps serving.
    pub fn reload_tls(&self) {
        self.0.reload_tls.notify_one();
    }

    /// Writes pending `last_used_at` updates now (shutdown, tests).
    pub async fn flush_usage(&self) {
        self.0.usage.flush().await;
    }

    /// Tests: takes every turn of the registry's costly grants, so that costly logins wait for
    /// one (each holding its organization's place) until the permit is dropped.
    #[doc(hidden)]
    pub async fn hold_costly_grant_turns(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.0.costly_grants.hold_every_turn().await
    }

    /// Tests: the places in organizations' shares of costly grants held now (logins waiting for
    /// a turn or working).
    #[doc(hidden)]
    pub fn costly_grant_places_held(&self) -> usize {
        self.0.costly_grants.places_held()
    }
}
