//! Leaked-token response: keyplane's tokens carry a prefix and a CRC32 so that scanners find them
//! (`contrib/` has a detect-secrets plugin and a gitleaks rule); this module is where a found
//! token comes back and is killed.
//!
//! - `POST /v1/secret-scanning/github` ([`github`]): GitHub's secret-scanning partner endpoint,
//!   signed by GitHub (ECDSA P-256 over the raw body, keys from GitHub's keys document).
//! - `POST /v1/credentials/revoke` ([`revoke`]): anyone who finds a keyplane token may kill it
//!   without authenticating, as GitHub's own credential-revocation API allows.
//!
//! Either way a reported token is checked offline first ([`keyplane_core::token::parse`]: prefix,
//! length, alphabet, CRC32), so garbage never reaches the store, and a real one goes through the
//! one use case [`respond_to_leak`]. Both routes speak the verification endpoints' OAuth-style
//! error dialect.

mod github;
mod revoke;

use crate::app::App;
use crate::error::AppError;
use keyplane_core::audit::{actions, AuditActor};
use keyplane_core::credential::Unusable;
use keyplane_core::LeakAction;
use keyplane_core::{Credential, RequestContext, TokenHash};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use github::{FeedbackLabel, GithubFeedback, GithubKeysConfig, GithubMatch};
pub(crate) use github::{GithubKeys, GithubReportsSeen};
pub(crate) use revoke::run as work_off_stored_reports;
pub use revoke::{LeakReportsConfig, RevokeAccepted, RevokeCredentialsRequest, MAX_CREDENTIALS};

/// GitHub's secret-scanning keys document (`--github-secret-scanning-keys-url`'s default).
pub const GITHUB_KEYS_URL: &str = "https://api.github.com/meta/public_keys/secret_scanning";

/// Checks a keys document URL as `serve` takes it: `https`, or `http` to a loopback host (keys
/// fetched in the clear would let anyone on the path forge GitHub's reports).
pub fn check_keys_url(url: &str) -> Result<(), String> {
    crate::oidc::check_url(url)
}

pub(crate) const TAG: &str = "Leaked tokens";

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(github::github_secret_scanning))
        .routes(routes!(revoke::revoke_credentials))
}

/// Whether `path` is one of this module's routes: they answer errors in the verification
/// endpoints' OAuth style (`error::render_for_path`, `openapi::error_schema`).
pub(crate) fn owns_path(path: &str) -> bool {
    path == "/v1/secret-scanning/github" || path == "/v1/credentials/revoke"
}

/// How a leak reached keyplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakSource {
    /// GitHub's secret scanning, in a request signed by GitHub.
    GithubSecretScanning,
    /// Anyone, through the unauthenticated `POST /v1/credentials/revoke`.
    PublicRevoke,
}

impl LeakSource {
    pub const ALL: [LeakSource; 2] = [LeakSource::GithubSecretScanning, LeakSource::PublicRevoke];

    pub fn as_str(self) -> &'static str {
        match self {
            LeakSource::GithubSecretScanning => "github_secret_scanning",
            LeakSource::PublicRevoke => "public_revoke",
        }
    }

    /// The canary trigger's surface and route for a report from this source.
    fn canary_surface(self) -> (crate::canary::CanarySurface, &'static str) {
        match self {
            LeakSource::GithubSecretScanning => (
                crate::canary::CanarySurface::GithubSecretScanning,
                "POST /v1/secret-scanning/github",
            ),
            LeakSource::PublicRevoke => (
                crate::canary::CanarySurface::PublicRevoke,
                "POST /v1/credentials/revoke",
            ),
        }
    }

    /// Who reported it, as the audit trail names them: GitHub proved who it is by its signature,
    /// a public reporter is known only by its address (the event's `client_ip`).
    fn reported_by(self) -> &'static str {
        match self {
            LeakSource::GithubSecretScanning => "github",
            LeakSource::PublicRevoke => "anonymous",
        }
    }
}

/// Where and how a token was found, as far as the reporter says.
#[derive(Debug, Clone)]
pub struct LeakReport {
    pub source: LeakSource,
    /// Where it was found (GitHub: the file, commit, issue… URL).
    pub url: Option<String>,
    /// GitHub's `source`: `content`, `commit`, `pull_request`, `issue`, `npm`, ….
    pub found_in: Option<String>,
    /// GitHub's `type`: the token type the partner registered for this pattern.
    pub token_type: Option<String>,
    /// The reporting request: its id, the reporter's address (through trusted proxies), agent.
    pub context: RequestContext,
    /// What makes it the same report when it is worked off again (a stored report whose worker
    /// died or lost a write's acknowledgement) or delivered again (GitHub retries a report
    /// answered 5xx): a canary's trigger event is then made with the same id, and written once.
    pub identity: Option<ReportIdentity>,
}

/// What a report is known by when it comes again.
#[derive(Debug, Clone, Copy)]
pub struct ReportIdentity {
    /// A digest of the stored report's id, or of GitHub's signed body.
    key: [u8; 32],
    /// When it was (first) received.
    received_at: chrono::DateTime<chrono::Utc>,
}

impl ReportIdentity {
    /// A stored public report.
    pub fn stored(id: uuid::Uuid, received_at: chrono::DateTime<chrono::Utc>) -> Self {
        Self::of(
            &[&b"stored public revocation report\0"[..], id.as_bytes()],
            received_at,
        )
    }

    /// A report GitHub signed, by its body, first received at `received_at`.
    pub fn github(body: &[u8], received_at: chrono::DateTime<chrono::Utc>) -> Self {
        Self::of(
            &[&b"github secret scanning report\0"[..], body],
            received_at,
        )
    }

    fn of(parts: &[&[u8]], received_at: chrono::DateTime<chrono::Utc>) -> Self {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        for part in parts {
            digest.update(part);
        }
        Self {
            key: digest.finalize().into(),
            received_at,
        }
    }

    /// The id of the trigger event of the canary whose secret hashes to `token` in this report: a
    /// UUIDv7 of the time the report was received (events stay time-ordered), its other bits from
    /// a digest of the report and the token's hash (nothing of the token itself).
    fn trigger_event_id(&self, token: &TokenHash) -> uuid::Uuid {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"keyplane leak report canary trigger\0")
            .chain_update(self.key)
            .chain_update(token.as_bytes())
            .finalize();
        let mut bits = [0u8; 10];
        bits.copy_from_slice(&digest[..10]);
        let millis = u64::try_from(self.received_at.timestamp_millis()).unwrap_or(0);
        uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid()
    }
}

/// What [`respond_to_leak`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakOutcome {
    /// The credential was live (or expired) and is now revoked; `credential.leaked` was recorded.
    Revoked,
    /// The tenant's policy says `on_leak: suspend`: it is now suspended; `credential.leaked` was
    /// recorded.
    Suspended,
    /// It was already revoked (or, under `suspend`, already suspended): nothing changed and
    /// nothing was recorded.
    AlreadyHandled,
    /// A live canary: left armed (whoever copies it from where it leaked is caught next), and
    /// `credential.canary_triggered` recorded (within the canary bound).
    CanaryTriggered,
    /// The reported secret stopped being the credential's after it was looked up (rotated away,
    /// or its grace period ended): as if it had not been found, nothing changed or was recorded.
    NoLongerLive,
}

/// Longest reporter-supplied text kept in an event (a URL, GitHub's type or source); longer is
/// cut on a character boundary. The values come from a signed GitHub request, but are bounded
/// anyway: the audit trail keeps them for a long time.
const MAX_REPORTED_CHARS: usize = 2048;

fn bounded(text: &str) -> String {
    text.chars().take(MAX_REPORTED_CHARS).collect()
}

/// The credential a well-formed token is, if any (revoked ones included). Takes the hash of a
/// [`keyplane_core::token::parse`] result, so only a token that passed the offline checks is
/// looked up.
/// A previous secret whose grace period is over is no longer the credential (the store keeps its
/// hash until the lifecycle sweep): it neither authenticates nor can take the live secret down.
/// Looked up on the general readers, not verification's few connections: anyone may send
/// reports, and a flood of them must not keep cache misses waiting.
pub async fn find_reported(app: &App, token: &TokenHash) -> Result<Option<Credential>, AppError> {
    let found = app
        .store()
        .find_credentials_by_hashes(std::slice::from_ref(token))
        .await?;
    let Some(credential) = found.into_iter().next() else {
        return Ok(None);
    };
    let now = app.inner().config.clock.now();
    if let Err(Some(Unusable::PreviousSecretEnded)) = credential.secret_slot(token, now) {
        return Ok(None);
    }
    Ok(Some(credential))
}

/// A well-formed reported token ([`keyplane_core::token::parse`]'s hash): looked up and, if it is
/// a credential, responded to ([`respond_to_leak`]); `None`: it is none. Counted in
/// `keyplane_leaked_tokens` once answered (a store failure is not: the report is retried).
pub(crate) async fn respond_to_report(
    app: &App,
    token: &TokenHash,
    report: &LeakReport,
) -> Result<Option<LeakOutcome>, AppError> {
    let outcome = match find_reported(app, token).await? {
        Some(credential) => Some(respond_to_leak(app, &credential, token, report).await?),
        None => None,
    };
    app.inner().metrics.leaked_token(report.source, outcome);
    Ok(outcome)
}

/// The one use case for a leaked credential, whoever reported it: an API token, a service
/// account's token and a robot secret are all treated alike.
///
/// The tenant's credential policy decides (`on_leak`, read here and nowhere else): `revoke` (the
/// default) or `suspend` (reversible, for tenants who want a human to look first). Either change
/// carries a `credential.leaked` event as its one audit event, actor `system`, details `source`,
/// `reported_by`, `response` (`revoked` | `suspended`), and `url` / `found_in` / `token_type`
/// when the reporter gave them; the reporter's address is the event's `client_ip`. The whole
/// credential is acted on, also when the secret reported is the previous one of a rotation's
/// grace period: its holder cannot tell which copies leaked with it. But only while the `reported`
/// secret still is the credential's when the change is written: a rotation (without grace) since
/// the lookup leaves a new secret that never leaked, and the report then changes nothing
/// ([`LeakOutcome::NoLongerLive`]).
///
/// A report of an already revoked (under `suspend`: already suspended) credential changes nothing
/// and records nothing: GitHub rescans and anyone holding a public copy may report the same token
/// again and again; recording each would let strangers fill a tenant's audit trail and its
/// webhooks. Such repeats are logged (credential id, source) for the operator.
///
/// A live canary is what a canary is for: it is not revoked (left armed, it catches whoever uses
/// the leaked copy next) and the report is recorded as `credential.canary_triggered` (surface and
/// `source` the report's, `reported_by`, and what GitHub said), within the canary bound. The same
/// report coming again ([`LeakReport::identity`]) makes the same event, which the store writes once.
pub async fn respond_to_leak(
    app: &App,
    credential: &Credential,
    reported: &TokenHash,
    report: &LeakReport,
) -> Result<LeakOutcome, AppError> {
    if credential.canary && !credential.is_revoked() {
        let (surface, route) = report.source.canary_surface();
        let mut presentation =
            crate::canary::Presentation::new(surface, route.into(), report.context.clone())
                .detail("source", report.source.as_str())
                .detail("reported_by", report.source.reported_by());
        if let Some(identity) = &report.identity {
            presentation = presentation.event_id(identity.trigger_event_id(reported));
        }
        for (key, value) in [
            ("url", &report.url),
            ("found_in", &report.found_in),
            ("token_type", &report.token_type),
        ] {
            if let Some(value) = value {
                presentation = presentation.detail(key, bounded(value));
            }
        }
        let alarm = app.inner().verifier.canaries();
        // Not admitted: this address's report of it is recorded already (or being written).
        // Admitted but not written: its place in the bound is given back, so the reporter's retry
        // (GitHub's after a 5xx, a public report's backoff) records it.
        if let Some(trigger) = alarm.admit(credential, presentation, AuditActor::system()) {
            alarm.record(trigger).await?;
        }
        return Ok(LeakOutcome::CanaryTriggered);
    }
    let action = crate::ops::credential_policy(app.store().as_ref(), credential.tenant_id)
        .await?
        .on_leak;
    let handled = match action {
        LeakAction::Revoke => credential.is_revoked(),
        LeakAction::Suspend => credential.is_revoked() || credential.suspended_at.is_some(),
    };
    if handled {
        tracing::info!(tenant.id = %credential.tenant_id, credential.id = %credential.id, leak.source = report.source.as_str(), "leaked credential reported again; it is already revoked or suspended");
        return Ok(LeakOutcome::AlreadyHandled);
    }
    let mut event = crate::ops::credential_event(
        actions::CREDENTIAL_LEAKED,
        AuditActor::system(),
        &report.context,
        credential,
    )
    .text("source", report.source.as_str())
    .text("reported_by", report.source.reported_by())
    .text(
        "response",
        match action {
            LeakAction::Revoke => "revoked",
            LeakAction::Suspend => "suspended",
        },
    );
    for (key, value) in [
        ("url", &report.url),
        ("found_in", &report.found_in),
        ("token_type", &report.token_type),
    ] {
        if let Some(value) = value {
            event = event.text(key, bounded(value));
        }
    }
    let at = crate::ops::now();
    let store = app.store();
    let (tenant, kind, id) = (credential.tenant_id, credential.kind, credential.id);
    let outcome = match action {
        LeakAction::Revoke => {
            let grant_event =
                crate::ops::grants_revoked_with(AuditActor::system(), &report.context);
            let revoked = store
                .revoke_credential(
                    tenant,
                    kind,
                    id,
                    at,
                    None,
                    &event,
                    &grant_event,
                    Some(reported),
                )
                .await?;
            if revoked.revoked_at == Some(at) {
                LeakOutcome::Revoked
            } else if revoked.is_revoked() {
                // Revoked by someone else between the lookup and this write: theirs is the record.
                LeakOutcome::AlreadyHandled
            } else {
                LeakOutcome::NoLongerLive
            }
        }
        LeakAction::Suspend => {
            match store
                .set_credential_suspended(tenant, kind, id, Some(at), at, &event, Some(reported))
                .await
            {
                Ok((_, true)) => LeakOutcome::Suspended,
                Ok((unchanged, false)) if unchanged.suspended_at.is_none() => {
                    LeakOutcome::NoLongerLive
                }
                // Suspended or revoked by someone else in the meantime.
                Ok((_, false)) | Err(keyplane_store::StoreError::Conflict(_)) => {
                    LeakOutcome::AlreadyHandled
                }
                Err(other) => return Err(other.into()),
            }
        }
    };
    app.invalidate(tenant, id.as_uuid());
    if outcome == LeakOutcome::NoLongerLive {
        tracing::info!(tenant.id = %tenant, credential.id = %id, leak.source = report.source.as_str(), "reported secret stopped being the credential's before the leak response; nothing changed");
    } else if outcome != LeakOutcome::AlreadyHandled {
        tracing::warn!(tenant.id = %tenant, credential.id = %id, credential.kind = kind.as_str(), leak.source = report.source.as_str(), response = action.as_str(), "leaked credential acted on");
    }
    Ok(outcome)
}

/// Public revocation reports are worked off after the answer (so its timing tells nothing), by
/// at most this many tasks of a replica at once; past it new reports answer 503.
const MAX_PENDING_REPORTS: usize = 64;

/// The background work of public revocation reports (what a stop abandons stays stored, and is
/// worked off after the restart or by another replica).
pub(crate) fn leak_jobs() -> crate::jobs::Jobs {
    crate::jobs::Jobs::new(MAX_PENDING_REPORTS, "public revocation reports")
}
