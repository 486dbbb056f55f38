//! GitHub's secret scanning partner endpoint. GitHub posts a JSON array of matches
//! (`{token, type, url, source}`) signed with ECDSA P-256 / SHA-256 over the exact body bytes:
//! `GITHUB-PUBLIC-KEY-SIGNATURE` is the base64 DER signature, `GITHUB-PUBLIC-KEY-IDENTIFIER` names
//! the key in GitHub's keys document (`--github-secret-scanning-keys-url`). The keys are cached;
//! an unknown identifier refetches the document, at most once per
//! [`GithubKeysConfig::unknown_key_refresh_interval`] (5 min) once keys are loaded, so made-up
//! identifiers cannot spend GitHub's quota for unauthenticated API calls (60 an hour per address).
//! Anything not signed by a listed key is a 401 before the body is even parsed; while no keys
//! could ever be loaded nothing can be told, and the answer is a 503 GitHub retries.

use super::{respond_to_report, LeakOutcome, LeakReport, LeakSource, ReportIdentity, TAG};
use crate::app::App;
use crate::error::{ApiError, AppError, Surface};
use crate::verify::Verification;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use data_encoding::BASE64;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use utoipa::ToSchema;

/// GitHub's reports answer errors as the verification endpoints do, but a 401 carries no
/// `WWW-Authenticate`: GitHub signs the body and sends nothing in `Authorization`.
pub(crate) struct GithubSigned;

impl Surface for GithubSigned {
    fn error_body(error: &AppError) -> serde_json::Value {
        Verification::error_body(error)
    }

    fn status(error: &AppError) -> StatusCode {
        Verification::status(error)
    }

    const CHALLENGE: Option<&'static str> = None;
}

const KEY_IDENTIFIER: &str = "github-public-key-identifier";
const KEY_SIGNATURE: &str = "github-public-key-signature";

/// Where GitHub's keys come from and how often they may be fetched.
#[derive(Debug, Clone)]
pub struct GithubKeysConfig {
    /// The keys document (`--github-secret-scanning-keys-url`).
    pub url: String,
    /// Until keys are first loaded, at most one fetch within this interval (a failed first fetch
    /// is retried soon: until then every report answers 503).
    pub min_refresh_interval: Duration,
    /// Once keys are loaded, at most one fetch within this interval, whatever asks for it (an
    /// unknown key identifier, old keys, a failed fetch): anyone can send made-up identifiers,
    /// and GitHub allows 60 unauthenticated API calls an hour per address. GitHub announces new
    /// keys ahead of using them, which the refetch after `max_key_age` picks up anyway.
    pub unknown_key_refresh_interval: Duration,
    /// Keys older than this are refetched in the background, so a key GitHub withdrew stops being
    /// trusted even if no request ever names an unknown one.
    pub max_key_age: Duration,
    /// The bound on each fetch.
    pub http_timeout: Duration,
}

impl Default for GithubKeysConfig {
    fn default() -> Self {
        Self {
            url: super::GITHUB_KEYS_URL.into(),
            min_refresh_interval: Duration::from_secs(10),
            unknown_key_refresh_interval: Duration::from_secs(300),
            max_key_age: Duration::from_secs(600),
            http_timeout: Duration::from_secs(5),
        }
    }
}
/// Longer header values are refused before any decoding (a DER P-256 signature is ≤ 72 bytes).
const MAX_HEADER_CHARS: usize = 256;

/// GitHub's keys document: `{"public_keys": [{"key_identifier", "key" (SPKI PEM), "is_current"}]}`.
#[derive(Deserialize)]
struct KeysDocument {
    public_keys: Vec<PublishedKey>,
}

#[derive(Deserialize)]
struct PublishedKey {
    key_identifier: String,
    key: String,
}

struct KeyState {
    keys: Arc<HashMap<String, VerifyingKey>>,
    /// When the current keys were fetched; `None`: never.
    fetched: Option<Instant>,
}

/// GitHub's signing keys, fetched on first use and cached. Cloning shares the cache.
#[derive(Clone)]
pub(crate) struct GithubKeys(Arc<Inner>);

struct Inner {
    config: GithubKeysConfig,
    http: reqwest::Client,
    state: RwLock<KeyState>,
    /// When the last fetch started; held during a fetch, so concurrent misses wait for one fetch.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
}

impl GithubKeys {
    pub(crate) fn new(config: GithubKeysConfig) -> Self {
        let http = crate::oidc::key_fetch_client(config.http_timeout);
        Self(Arc::new(Inner {
            config,
            http,
            state: RwLock::new(KeyState {
                keys: Arc::new(HashMap::new()),
                fetched: None,
            }),
            last_attempt: tokio::sync::Mutex::new(None),
        }))
    }

    /// Checks that `body` was signed by the GitHub key `key_id`. `Unauthenticated` for anything
    /// unsigned, malformed, unknown or not matching; `UpstreamUnavailable` (503) when nothing can
    /// be told: no keys were ever loaded, or the refetch this identifier caused just failed
    /// (GitHub retries on a 5xx).
    async fn verify(&self, key_id: &str, signature: &str, body: &[u8]) -> Result<(), AppError> {
        if key_id.is_empty() || key_id.len() > MAX_HEADER_CHARS {
            return Err(reject("github key identifier malformed"));
        }
        // Parsed before any key lookup: garbage never causes a fetch.
        let signature = (signature.len() <= MAX_HEADER_CHARS)
            .then(|| BASE64.decode(signature.trim().as_bytes()).ok())
            .flatten()
            .and_then(|der| Signature::from_der(&der).ok())
            .ok_or(reject("github signature malformed"))?;
        let key = match self.cached(key_id) {
            Some(key) => {
                self.refresh_if_old();
                key
            }
            None => {
                // GitHub may have added a key: refetch (rate-limited) and look again.
                let fetched = self.refresh().await;
                match self.cached(key_id) {
                    Some(key) => key,
                    None if fetched == Some(false) || !self.loaded() => {
                        return Err(AppError::UpstreamUnavailable {
                            what: "GitHub's secret-scanning keys",
                            retry_after_secs: crate::error::retry_after_secs(self.next_fetch_in()),
                        })
                    }
                    None => return Err(reject("github key identifier unknown")),
                }
            }
        };
        key.verify(body, &signature)
            .map_err(|_| reject("github signature does not verify"))
    }

    fn cached(&self, key_id: &str) -> Option<VerifyingKey> {
        self.0
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .get(key_id)
            .copied()
    }

    /// Whether keys were ever loaded.
    fn loaded(&self) -> bool {
        self.0
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .fetched
            .is_some()
    }

    /// The least time between two fetches: short until keys are first loaded, long after.
    fn refresh_interval(&self) -> Duration {
        if self.loaded() {
            self.0.config.unknown_key_refresh_interval
        } else {
            self.0.config.min_refresh_interval
        }
    }

    /// How long until another fetch may start (zero: now, or one is running).
    fn next_fetch_in(&self) -> Duration {
        match self.0.last_attempt.try_lock().map(|last| *last) {
            Ok(Some(at)) => self.refresh_interval().saturating_sub(at.elapsed()),
            _ => Duration::ZERO,
        }
    }

    /// Fetches the keys document unless a fetch started less than [`Self::refresh_interval`] ago:
    /// `Some(loaded)` when this call fetched, `None` when it was too soon. A failure is logged and
    /// keeps the keys already loaded.
    async fn refresh(&self) -> Option<bool> {
        let mut last_attempt = self.0.last_attempt.lock().await;
        if last_attempt.is_some_and(|at| at.elapsed() < self.refresh_interval()) {
            return None;
        }
        *last_attempt = Some(Instant::now());
        let fetched = fetch_keys(&self.0.http, &self.0.config.url).await;
        let mut state = self.0.state.write().unwrap_or_else(|p| p.into_inner());
        match fetched {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "GitHub secret-scanning keys loaded");
                *state = KeyState {
                    keys: Arc::new(keys),
                    fetched: Some(Instant::now()),
                };
                Some(true)
            }
            Err(e) => {
                tracing::warn!(url = %self.0.config.url, error = %format!("{e:#}"), "cannot load GitHub's secret-scanning keys; keys already loaded stay in use");
                Some(false)
            }
        }
    }

    fn refresh_if_old(&self) {
        let old = self
            .0
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .fetched
            .is_some_and(|at| at.elapsed() > self.0.config.max_key_age);
        let due = old
            && self
                .0
                .last_attempt
                .try_lock()
                .is_ok_and(|last| last.is_none_or(|at| at.elapsed() >= self.refresh_interval()));
        if due {
            let keys = self.clone();
            tokio::spawn(async move { keys.refresh().await });
        }
    }
}

fn reject(reason: &'static str) -> AppError {
    AppError::Unauthenticated(reason)
}

/// The document's keys by identifier. One key that does not parse does not discard the others.
async fn fetch_keys(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<HashMap<String, VerifyingKey>> {
    let document: KeysDocument = crate::oidc::get_json(http, url).await?;
    let mut keys = HashMap::new();
    for published in document.public_keys {
        match VerifyingKey::from_public_key_pem(&published.key) {
            Ok(key) => {
                keys.insert(published.key_identifier, key);
            }
            Err(e) => {
                tracing::warn!(key.id = %published.key_identifier, error = %e, "skipping a GitHub secret-scanning key that is not a P-256 public key")
            }
        }
    }
    if keys.is_empty() {
        anyhow::bail!("the keys document holds no P-256 public key");
    }
    Ok(keys)
}

/// How long a replica remembers when it first received a GitHub report: GitHub delivers a report
/// answered 5xx again, and the same report is to record a canary's trigger once.
const REMEMBER_REPORTS_FOR: Duration = Duration::from_secs(3600);
/// Reports remembered at once; past it (reports older than [`REMEMBER_REPORTS_FOR`] forgotten
/// first) a report is not remembered, and its redelivery may record a canary's trigger again.
const MAX_REMEMBERED_REPORTS: usize = 10_000;

/// When this replica first received each recent GitHub report, by a digest of its signed body
/// (nothing of its tokens is kept).
#[derive(Default)]
pub(crate) struct GithubReportsSeen(std::sync::Mutex<HashMap<[u8; 32], FirstReceived>>);

/// When a report was first received: the wall-clock time its events carry, and the monotonic
/// reading its memory expires by.
type FirstReceived = (DateTime<Utc>, Instant);

impl GithubReportsSeen {
    /// The report `body`, received `now`: as first received, if it was within
    /// [`REMEMBER_REPORTS_FOR`].
    fn identity(&self, body: &[u8], now: DateTime<Utc>) -> ReportIdentity {
        use sha2::{Digest, Sha256};
        let digest: [u8; 32] = Sha256::digest(body).into();
        let fresh = |(_, at): &FirstReceived| at.elapsed() < REMEMBER_REPORTS_FOR;
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let first = match seen.get(&digest).filter(|entry| fresh(entry)) {
            Some((first, _)) => *first,
            None => {
                if seen.len() >= MAX_REMEMBERED_REPORTS {
                    seen.retain(|_, entry| fresh(entry));
                }
                if seen.len() < MAX_REMEMBERED_REPORTS || seen.contains_key(&digest) {
                    seen.insert(digest, (now, Instant::now()));
                }
                now
            }
        };
        ReportIdentity::github(body, first)
    }
}

/// One match GitHub found. Fields GitHub may add later are ignored.
#[derive(Deserialize, ToSchema)]
pub struct GithubMatch {
    /// The string that matched the registered pattern.
    pub token: String,
    /// The token type registered with GitHub for the pattern (e.g. `keyplane_api_token`).
    #[serde(rename = "type")]
    pub token_type: String,
    /// Where it was found.
    #[serde(default)]
    pub url: Option<String>,
    /// What it was found in: `content`, `commit`, `pull_request`, `issue`, `npm`, ….
    #[serde(default)]
    pub source: Option<String>,
}

/// Feedback on one match, as GitHub's partner program reads it.
#[derive(Serialize, ToSchema)]
pub struct GithubFeedback {
    /// The token, as GitHub sent it.
    pub token_raw: String,
    /// The match's `type`, as GitHub sent it.
    pub token_type: String,
    pub label: FeedbackLabel,
}

/// `true_positive`: a keyplane credential (now revoked, or revoked before); `false_positive`:
/// not one (wrong prefix, length, alphabet or checksum, or no such credential).
#[derive(Serialize, ToSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackLabel {
    TruePositive,
    FalsePositive,
}

/// GitHub secret scanning alert
///
/// GitHub's secret scanning partner program posts here the keyplane tokens it finds in public
/// repositories, gists, issues and npm packages. The request must be signed by GitHub: an ECDSA
/// P-256 / SHA-256 signature over the exact body (`GITHUB-PUBLIC-KEY-SIGNATURE`, base64 DER) by
/// the key `GITHUB-PUBLIC-KEY-IDENTIFIER` names in GitHub's keys document; anything else is 401 and
/// changes nothing. Each match is checked offline (prefix, length, CRC32) before any lookup; a
/// real, live credential is revoked and `credential.leaked` is recorded in its organization's
/// audit trail. The answer labels every match.
#[utoipa::path(
    post, path = "/v1/secret-scanning/github", tag = TAG,
    params(
        ("GITHUB-PUBLIC-KEY-IDENTIFIER" = String, Header, description = "The `key_identifier` of the GitHub key that signed the body."),
        ("GITHUB-PUBLIC-KEY-SIGNATURE" = String, Header, description = "Base64 DER ECDSA P-256 / SHA-256 signature of the raw body."),
    ),
    request_body(content = Vec<GithubMatch>, content_type = "application/json"),
    responses(
        (status = 200, description = "One feedback entry per match.", body = Vec<GithubFeedback>),
        (status = 400, description = "Signed, but not a JSON array of matches.", body = crate::openapi::OAuthError),
        (status = 401, description = "Unsigned, or not signed by a key in GitHub's keys document.", body = crate::openapi::OAuthError),
        (status = 429, description = "Too many failed authentications from this address; see Retry-After.", body = crate::openapi::OAuthError),
        (status = 503, description = "GitHub's keys document cannot be fetched, so the request cannot be verified; GitHub retries (see Retry-After).", body = crate::openapi::OAuthError),
    ),
    security(()),
)]
pub(crate) async fn github_secret_scanning(
    State(app): State<App>,
    request: Request,
) -> Result<Json<Vec<GithubFeedback>>, ApiError<GithubSigned>> {
    let context = crate::audit::request_context(request.headers(), request.extensions());
    let headers = request.headers().clone();
    let body = crate::extract::read_body(request, &app).await?;
    let key_id = header_text(&headers, KEY_IDENTIFIER).ok_or(reject("github signature missing"))?;
    let signature =
        header_text(&headers, KEY_SIGNATURE).ok_or(reject("github signature missing"))?;
    app.inner()
        .github_keys
        .verify(key_id, signature, &body)
        .await?;
    if !crate::extract::is_json(&headers) {
        return Err(AppError::UnsupportedMediaType("application/json").into());
    }
    let matches: Vec<GithubMatch> =
        serde_json::from_slice(&body).map_err(|e| AppError::InvalidJson(e.to_string()))?;
    let identity = app
        .inner()
        .github_reports
        .identity(&body, crate::ops::now());
    let mut feedback = Vec::with_capacity(matches.len());
    for found in matches {
        let label = label_and_respond(&app, &found, &context, identity).await?;
        feedback.push(GithubFeedback {
            token_raw: found.token,
            token_type: found.token_type,
            label,
        });
    }
    Ok(Json(feedback))
}

async fn label_and_respond(
    app: &App,
    found: &GithubMatch,
    context: &keyplane_core::RequestContext,
    identity: ReportIdentity,
) -> Result<FeedbackLabel, AppError> {
    let Ok(parsed) = keyplane_core::token::parse(&found.token) else {
        return Ok(FeedbackLabel::FalsePositive);
    };
    let report = LeakReport {
        source: LeakSource::GithubSecretScanning,
        url: found.url.clone(),
        found_in: found.source.clone(),
        token_type: Some(found.token_type.clone()),
        context: context.clone(),
        identity: Some(identity),
    };
    match respond_to_report(app, &parsed.hash, &report).await? {
        None | Some(LeakOutcome::NoLongerLive) => Ok(FeedbackLabel::FalsePositive),
        Some(_) => Ok(FeedbackLabel::TruePositive),
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
