//! Users: JWT access tokens from the OAuth 2.0 / OIDC identity providers the operator trusts
//! (`serve --oidc-issuer`). Each issuer's keys come from its discovery document and JWKS and are
//! cached; a token naming a key we do not hold triggers a refetch, at most once per
//! [`OidcConfig::min_refresh_interval`] per issuer, so unknown `kid`s cannot be used to hammer the
//! provider. Nothing here blocks startup, and a provider that is down only affects its users' new
//! tokens: keys already fetched keep working (a token naming another key is answered 503 while the
//! last fetch failed: the provider may have rotated to it), and keyplane's own credentials never
//! touch this module. Failed fetches are counted per issuer (`keyplane_oidc_key_fetch_failures`).
//!
//! What a token must be: signed with RS256 or ES256 by a key the issuer publishes (the algorithm
//! follows from the key's type; `none` and HMAC never verify), `iss` one of the configured issuers
//! exactly, `aud` containing the configured audience, `exp` in the future and `nbf` (if present) in
//! the past within a small leeway, `typ` (if present) `at+jwt` or `JWT`, and a non-empty `sub`.

use crate::error::AppError;
use anyhow::Context;
use chrono::{DateTime, Utc};
use data_encoding::BASE64URL_NOPAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use keyplane_core::UserId;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Which identity providers keyplane trusts, and how it talks to them.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Issuer URLs, exactly as their tokens spell `iss`.
    pub issuers: Vec<String>,
    /// The `aud` a token must carry: this API's identifier at the providers.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// At most one discovery + JWKS fetch per issuer within this interval, whatever the reason
    /// (unknown `kid`, a failed fetch, old keys).
    pub min_refresh_interval: Duration,
    /// Keys fetched longer ago than this are refetched in the background, so a key the provider
    /// withdrew stops being trusted even if no token ever names an unknown one.
    pub max_key_age: Duration,
    /// The bound on each request to a provider.
    pub http_timeout: Duration,
    /// How long a token naming a key not held waits for a fetch of the issuer's keys that is
    /// already under way (started by another token, or the warm-up) before answering 503: such a
    /// fetch usually ends in a fraction of a second, and its keys are what the token needs.
    pub max_fetch_wait: Duration,
    /// The one issuer whose canonical UUID `sub`s are user ids as they are
    /// (`--oidc-uuid-subjects`); every other `sub` maps through [`user_id`].
    pub uuid_subjects: Option<String>,
}

/// The largest leeway accepted: more would keep expired tokens alive noticeably.
pub const MAX_LEEWAY: Duration = Duration::from_secs(60);

impl OidcConfig {
    /// Checks the issuers (absolute `https` URLs, or `http` on a loopback host for local
    /// development: keys fetched in the clear would let anyone on the path mint users) and the
    /// audience, with default timings.
    pub fn new(issuers: Vec<String>, audience: String) -> Result<Self, String> {
        if issuers.is_empty() {
            return Err("at least one issuer is required".into());
        }
        let mut unique: Vec<String> = Vec::with_capacity(issuers.len());
        for issuer in issuers {
            check_url(&issuer).map_err(|e| format!("issuer {issuer:?}: {e}"))?;
            let url =
                reqwest::Url::parse(&issuer).map_err(|e| format!("issuer {issuer:?}: {e}"))?;
            if url.query().is_some() || url.fragment().is_some() {
                return Err(format!(
                    "issuer {issuer:?}: an issuer has no query or fragment"
                ));
            }
            if !unique.contains(&issuer) {
                unique.push(issuer);
            }
        }
        if audience.trim().is_empty() {
            return Err("the audience must not be empty".into());
        }
        Ok(Self {
            issuers: unique,
            audience,
            leeway: Duration::from_secs(30),
            min_refresh_interval: Duration::from_secs(10),
            max_key_age: Duration::from_secs(600),
            http_timeout: Duration::from_secs(5),
            max_fetch_wait: Duration::from_secs(2),
            uuid_subjects: None,
        })
    }

    /// Takes `issuer`'s canonical UUID `sub`s as user ids as they are. It must be one of the
    /// configured issuers, spelled the same way.
    pub fn with_uuid_subjects(mut self, issuer: String) -> Result<Self, String> {
        if !self.issuers.contains(&issuer) {
            return Err(format!(
                "{issuer:?} is not one of the configured issuers (--oidc-issuer)"
            ));
        }
        self.uuid_subjects = Some(issuer);
        Ok(self)
    }
}

/// The user a token's `sub` at `issuer` speaks for: `UUIDv5(NAMESPACE_URL, issuer + "#" + sub)`,
/// except that the one issuer named by `uuid_subjects` names its users by a canonical lower-case
/// UUID `sub` directly (but for version 5 UUIDs, the ids of other issuers' users). So no issuer can
/// produce another issuer's users, and a UUID-shaped `sub` elsewhere is hashed like any other. `keyplane admin grant --user-sub` uses the same rule.
pub fn user_id(issuer: &str, sub: &str, uuid_subjects: Option<&str>) -> UserId {
    let direct = (uuid_subjects == Some(issuer))
        .then(|| UserId::from_uuid_subject(sub))
        .flatten();
    direct.unwrap_or_else(|| UserId::from_subject(issuer, sub))
}

/// `https`, or `http` to a loopback host.
pub(crate) fn check_url(text: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err("must be an https URL (http only on a loopback host)".into()),
    }
}

/// A validated access token: the user it speaks for (and its issuer and `sub`, for the audit
/// trail), and until when.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub user: UserId,
    pub expires_at: DateTime<Utc>,
    pub issuer: String,
    pub subject: String,
}

/// Three dot-separated base64url segments: the shape of a JWS compact serialization. keyplane's
/// own tokens never contain a dot, so this routes a bearer without ambiguity. Empty segments
/// count (an unsigned `alg: none` token ends with a dot) so that they are rejected as JWTs.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
        && token
            .bytes()
            .all(|b| b == b'.' || b == b'-' || b == b'_' || b.is_ascii_alphanumeric())
}

/// Larger tokens are refused before any decoding; real access tokens are a few KiB at most.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Larger discovery documents or JWKS are refused.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Smaller RSA keys are ignored.
const MIN_RSA_BITS: usize = 2048;

/// The JOSE header fields we act on.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<serde_json::Value>,
}

/// What is read from the payload before the signature is checked: only which issuer's keys to
/// check it with. Nothing else is trusted until [`jsonwebtoken::decode`] has verified it.
#[derive(Deserialize)]
struct UnverifiedClaims {
    iss: Option<String>,
}

/// The claims used once verified (`iss`, `aud`, `exp` and `nbf` are checked by `Validation`).
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: f64,
}

/// A signature key an issuer publishes, with the one algorithm it may verify.
struct VerifyingKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

struct KeySet {
    keys: Arc<Vec<VerifyingKey>>,
    /// When keys were last loaded; `None`: never.
    fetched: Option<Instant>,
    /// Whether the last fetch failed.
    last_fetch_failed: bool,
}

struct Issuer {
    url: String,
    keys: RwLock<KeySet>,
    /// When the last fetch started. Held during a fetch, so concurrent misses wait for one request
    /// instead of each making their own.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    /// Whether a fetch is under way (the lock above is also held briefly without one).
    fetching: AtomicBool,
    /// `keyplane_oidc_key_fetch_failures` for this issuer.
    fetch_failures: prometheus_client::metrics::counter::Counter,
}

/// Marks a fetch under way until dropped, however the fetch ends.
struct Fetching<'a>(&'a AtomicBool);

impl<'a> Fetching<'a> {
    fn start(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        Self(flag)
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The trusted issuers and their cached keys. Cloning shares the cache.
#[derive(Clone)]
pub struct Oidc(Arc<Inner>);

struct Inner {
    config: OidcConfig,
    http: reqwest::Client,
    issuers: Vec<Issuer>,
}

impl Oidc {
    /// Failed fetches are counted in `metrics`.
    pub(crate) fn new(config: OidcConfig, metrics: &crate::metrics::Metrics) -> Self {
        let http = key_fetch_client(config.http_timeout);
        let issuers = config
            .issuers
            .iter()
            .map(|url| Issuer {
                url: url.clone(),
                keys: RwLock::new(KeySet {
                    keys: Arc::new(Vec::new()),
                    fetched: None,
                    last_fetch_failed: false,
                }),
                last_attempt: tokio::sync::Mutex::new(None),
                fetching: AtomicBool::new(false),
                fetch_failures: metrics.oidc_key_fetch_failures(url),
            })
            .collect();
        Self(Arc::new(Inner {
            config,
            http,
            issuers,
        }))
    }

    /// Fetches every issuer's keys in the background, so the first user does not wait. Startup
    /// never waits for it; without a runtime (a non-serving use) keys load on first use.
    pub fn warm_up(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for index in 0..self.0.issuers.len() {
            let oidc = self.clone();
            runtime.spawn(async move { oidc.refresh(index).await });
        }
    }

    /// Validates a JWT access token. Every failure is `Unauthenticated` with a reason for the log,
    /// but two: when the token names a key not held and the issuer's last fetch failed (whether
    /// keys were ever loaded or not), nothing can be told about it (the provider may have rotated
    /// to that key), and `UpstreamUnavailable` (503) says so: a client takes a 401 for a bad token,
    /// not for an outage. Likewise when the fetch under way that may bring the key outlasts
    /// `max_fetch_wait`.
    pub async fn validate(&self, token: &str) -> Result<AccessToken, AppError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(reject("jwt too large"));
        }
        let mut segments = token.split('.');
        let (Some(header), Some(payload)) = (segments.next(), segments.next()) else {
            return Err(reject("jwt malformed"));
        };
        let header: JoseHeader = decode_segment(header).ok_or(reject("jwt malformed header"))?;
        let alg = match header.alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            "none" => return Err(reject("jwt alg none")),
            _ => return Err(reject("jwt alg not allowed")),
        };
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: extensions we do not implement must be refused.
            return Err(reject("jwt crit header"));
        }
        if header
            .typ
            .as_deref()
            .is_some_and(|typ| !acceptable_typ(typ))
        {
            return Err(reject("jwt typ not an access token"));
        }
        let claimed: UnverifiedClaims =
            decode_segment(payload).ok_or(reject("jwt malformed payload"))?;
        // Only configured issuers are ever contacted, whatever a token claims.
        let index = self
            .0
            .issuers
            .iter()
            .position(|i| Some(&i.url) == claimed.iss.as_ref())
            .ok_or(reject("jwt unknown issuer"))?;

        // Without a `kid`, any key of the issuer for this algorithm may have signed it.
        let fits =
            |key: &&VerifyingKey| key.alg == alg && (header.kid.is_none() || key.kid == header.kid);
        let mut keys = self.cached_keys(index);
        if keys.iter().any(|key| fits(&key)) {
            self.refresh_if_old(index);
        } else {
            // Perhaps the provider rotated its keys: refetch (rate-limited) and look again.
            self.fetch_for_unknown_key(index).await?;
            keys = self.cached_keys(index);
            if !keys.iter().any(|key| fits(&key)) {
                self.unavailable_if_last_fetch_failed(index)?;
            }
        }
        let validation = self.validation(index, alg);
        let mut failure = reject("jwt unknown key");
        for key in keys.iter().filter(fits) {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    return access_token(
                        &self.0.issuers[index].url,
                        self.0.config.uuid_subjects.as_deref(),
                        data.claims,
                    )
                }
                // Without a `kid`, several keys may fit: try the next one.
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => {
                    failure = reject("jwt bad signature")
                }
                Err(e) => return Err(reject(reason(e.kind()))),
            }
        }
        Err(failure)
    }

    fn validation(&self, index: usize, alg: Algorithm) -> Validation {
        let config = &self.0.config;
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.0.issuers[index].url]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.min(MAX_LEEWAY).as_secs();
        validation
    }

    fn cached_keys(&self, index: usize) -> Arc<Vec<VerifyingKey>> {
        self.0.issuers[index]
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .clone()
    }

    /// 503 when the issuer's last fetch failed, for a token whose key the keys held (none, if
    /// never loaded) lack; `Retry-After` is when the next fetch may start. Only a fetch that
    /// answered can say a key is not the provider's.
    fn unavailable_if_last_fetch_failed(&self, index: usize) -> Result<(), AppError> {
        let issuer = &self.0.issuers[index];
        let down = issuer
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .last_fetch_failed;
        if !down {
            return Ok(());
        }
        let next_fetch_in = match issuer.last_attempt.try_lock().map(|last| *last) {
            Ok(Some(at)) => self
                .0
                .config
                .min_refresh_interval
                .saturating_sub(at.elapsed()),
            _ => Duration::ZERO,
        };
        Err(AppError::UpstreamUnavailable {
            what: "the identity provider's keys",
            retry_after_secs: crate::error::retry_after_secs(next_fetch_in),
        })
    }

    /// Brings the issuer's keys up to date for a token naming a key not held: waits for the fetch
    /// under way, if one is (at most `max_fetch_wait`: 503 past it, the keys still coming), or
    /// fetches them, unless a fetch was tried within `min_refresh_interval` (what it said
    /// stands: if it failed, 503).
    async fn fetch_for_unknown_key(&self, index: usize) -> Result<(), AppError> {
        let issuer = &self.0.issuers[index];
        // Not "the lock is held": other requests hold it for a moment to read the last attempt,
        // and one that waited on that would go on without the fetch its new key needs.
        let under_way = issuer.fetching.load(Ordering::Acquire);
        if under_way {
            let waited =
                tokio::time::timeout(self.0.config.max_fetch_wait, issuer.last_attempt.lock())
                    .await;
            return match waited {
                // Its keys, or its failure, are in the cache now.
                Ok(_) => Ok(()),
                // Against a provider that does not answer it may take up to two HTTP timeouts;
                // the token may be good, so not a 401.
                Err(_) => Err(AppError::UpstreamUnavailable {
                    what: "the identity provider's keys",
                    retry_after_secs: 1,
                }),
            };
        }
        if !self.fetch_due(index) {
            self.unavailable_if_last_fetch_failed(index)?;
        }
        self.refresh(index).await;
        Ok(())
    }

    /// Whether a fetch may start now: none is running and none started within
    /// `min_refresh_interval`.
    fn fetch_due(&self, index: usize) -> bool {
        self.0.issuers[index]
            .last_attempt
            .try_lock()
            .is_ok_and(|last| {
                last.is_none_or(|at| at.elapsed() >= self.0.config.min_refresh_interval)
            })
    }

    /// Fetches the issuer's keys unless a fetch started less than `min_refresh_interval` ago.
    /// Failures are logged and leave the cached keys in place.
    async fn refresh(&self, index: usize) {
        let issuer = &self.0.issuers[index];
        let mut last_attempt = issuer.last_attempt.lock().await;
        if last_attempt.is_some_and(|at| at.elapsed() < self.0.config.min_refresh_interval) {
            return;
        }
        *last_attempt = Some(Instant::now());
        let _fetching = Fetching::start(&issuer.fetching);
        match fetch_keys(&self.0.http, &issuer.url).await {
            Ok(keys) => {
                tracing::info!(oidc.issuer = %issuer.url, keys = keys.len(), "identity provider keys loaded");
                *issuer.keys.write().unwrap_or_else(|p| p.into_inner()) = KeySet {
                    keys: Arc::new(keys),
                    fetched: Some(Instant::now()),
                    last_fetch_failed: false,
                };
            }
            Err(e) => {
                issuer.fetch_failures.inc();
                issuer
                    .keys
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .last_fetch_failed = true;
                tracing::warn!(oidc.issuer = %issuer.url, error = %format!("{e:#}"), "cannot load the identity provider's keys; keys already loaded stay in use")
            }
        }
    }

    /// Starts a background refetch when the cached keys are older than `max_key_age` and no fetch
    /// is running or was tried recently.
    fn refresh_if_old(&self, index: usize) {
        let issuer = &self.0.issuers[index];
        let old = issuer
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .fetched
            .is_some_and(|at| at.elapsed() > self.0.config.max_key_age);
        if !old {
            return;
        }
        if self.fetch_due(index) {
            let oidc = self.clone();
            tokio::spawn(async move { oidc.refresh(index).await });
        }
    }
}

fn reject(reason: &'static str) -> AppError {
    AppError::Unauthenticated(reason)
}

fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "jwt expired",
        ErrorKind::ImmatureSignature => "jwt not yet valid",
        ErrorKind::InvalidAudience => "jwt wrong audience",
        ErrorKind::InvalidIssuer => "jwt wrong issuer",
        ErrorKind::InvalidSignature => "jwt bad signature",
        // `Json`: a claim we read (`sub`, `exp`) is absent or of the wrong type.
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => "jwt missing claim",
        ErrorKind::InvalidAlgorithm => "jwt alg not allowed",
        _ => "jwt invalid",
    }
}

/// `at+jwt` (RFC 9068) or plain `JWT`, as many providers still write; case-insensitive, with or
/// without the `application/` prefix RFC 7515 §4.1.9 lets producers omit.
fn acceptable_typ(typ: &str) -> bool {
    let typ = typ.to_ascii_lowercase();
    let typ = typ.strip_prefix("application/").unwrap_or(&typ);
    typ == "at+jwt" || typ == "jwt"
}

fn decode_segment<T: DeserializeOwned>(segment: &str) -> Option<T> {
    let bytes = BASE64URL_NOPAD.decode(segment.as_bytes()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn access_token(
    issuer: &str,
    uuid_subjects: Option<&str>,
    claims: Claims,
) -> Result<AccessToken, AppError> {
    if claims.sub.is_empty() {
        return Err(reject("jwt empty sub"));
    }
    let expires_at = DateTime::from_timestamp(claims.exp as i64, 0).ok_or(reject("jwt invalid"))?;
    Ok(AccessToken {
        user: user_id(issuer, &claims.sub, uuid_subjects),
        expires_at,
        issuer: issuer.to_string(),
        subject: claims.sub,
    })
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

/// A discovery document: the issuer it names, and the members `T` reads.
#[derive(Deserialize)]
struct DiscoveryDocument<T> {
    issuer: String,
    #[serde(flatten)]
    members: T,
}

/// `issuer`'s discovery document, read as `T`. It must name the issuer we asked about (OpenID
/// Connect Discovery §4.3), so one provider cannot speak for another.
pub(crate) async fn discovery<T: DeserializeOwned>(
    http: &reqwest::Client,
    issuer: &str,
) -> anyhow::Result<T> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let document: DiscoveryDocument<T> =
        get_json(http, &url).await.context("discovery document")?;
    if document.issuer != issuer {
        anyhow::bail!(
            "the discovery document names issuer {:?}, not this one",
            document.issuer
        );
    }
    Ok(document.members)
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

/// The JWK members we read; the rest are ignored.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    alg: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Discovery, then the JWKS it points to.
async fn fetch_keys(http: &reqwest::Client, issuer: &str) -> anyhow::Result<Vec<VerifyingKey>> {
    let discovery: Discovery = discovery(http, issuer).await?;
    check_url(&discovery.jwks_uri)
        .map_err(|e| anyhow::anyhow!("jwks_uri {:?}: {e}", discovery.jwks_uri))?;
    let set: JwkSet = get_json(http, &discovery.jwks_uri).await.context("JWKS")?;
    // One key we cannot use (another type, a malformed entry) does not discard the others.
    let keys: Vec<VerifyingKey> = set.keys.into_iter().filter_map(verifying_key).collect();
    if keys.is_empty() {
        anyhow::bail!("the JWKS holds no RS256 or ES256 signature key");
    }
    Ok(keys)
}

/// What keyplane's key fetches (OIDC discovery and JWKS, GitHub's secret-scanning keys) call
/// themselves: GitHub's API refuses a request without a `User-Agent` (403).
const USER_AGENT: &str = concat!("keyplane/", env!("CARGO_PKG_VERSION"));

/// The client for fetching signing keys: bounded by `timeout`, naming keyplane, and not following
/// redirects (the documents are where the configuration says; a redirect elsewhere is refused).
pub(crate) fn key_fetch_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client with a TLS backend builds")
}

pub(crate) async fn get_json<T: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<T> {
    let mut response = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await?
        .error_for_status()?;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            anyhow::bail!("{url} answered more than {MAX_DOCUMENT_BYTES} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).with_context(|| format!("{url} did not answer the expected JSON"))
}

/// A JWK as a key for exactly one algorithm, chosen by its type: RSA → RS256, EC P-256 → ES256.
/// A token's `alg` must then match, so an RSA key can never be used as an HMAC secret.
fn verifying_key(value: serde_json::Value) -> Option<VerifyingKey> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if jwk.usage.as_deref().is_some_and(|usage| usage != "sig") {
        return None;
    }
    let (alg, key) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => {
            let (n, e) = (jwk.n?, jwk.e?);
            let modulus = BASE64URL_NOPAD.decode(n.as_bytes()).ok()?;
            let leading_zeros = modulus.iter().take_while(|b| **b == 0).count();
            if (modulus.len() - leading_zeros) * 8 < MIN_RSA_BITS {
                return None;
            }
            (
                Algorithm::RS256,
                DecodingKey::from_rsa_components(&n, &e).ok()?,
            )
        }
        ("EC", Some("P-256")) => (
            Algorithm::ES256,
            DecodingKey::from_ec_components(&jwk.x?, &jwk.y?).ok()?,
        ),
        _ => return None,
    };
    let published_for = jwk.alg.as_deref();
    let alg_name = match alg {
        Algorithm::RS256 => "RS256",
        _ => "ES256",
    };
    if published_for.is_some_and(|a| a != alg_name) {
        return None;
    }
    Some(VerifyingKey {
        kid: jwk.kid,
        alg,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_three_base64url_segments_are_routed_as_jwts() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(
            looks_like_jwt("eyJh.eyJz."),
            "unsigned tokens are rejected as JWTs"
        );
        assert!(!looks_like_jwt("aether_0123abcd"));
        assert!(!looks_like_jwt("hbx_sa_abc_def"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("a+b.c.d"));
    }

    #[test]
    fn typ_must_name_a_jwt_or_an_access_token() {
        for typ in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "JWT",
            "application/jwt",
        ] {
            assert!(acceptable_typ(typ), "{typ}");
        }
        for typ in ["dpop+jwt", "JOSE", "id_token+jwt", "application/json", ""] {
            assert!(!acceptable_typ(typ), "{typ}");
        }
    }

    #[test]
    fn issuers_must_be_https_or_loopback() {
        let config = |issuers: &[&str], audience: &str| {
            OidcConfig::new(
                issuers.iter().map(|i| i.to_string()).collect(),
                audience.into(),
            )
        };
        let ok = config(
            &[
                "https://idp.example/realms/a",
                "http://127.0.0.1:3000",
                "http://localhost:1",
                "http://[::1]:2",
                "https://idp.example/realms/a",
            ],
            "api",
        )
        .unwrap();
        assert_eq!(ok.issuers.len(), 4, "duplicates are dropped");
        assert!(ok.leeway <= MAX_LEEWAY);
        assert!(config(&["http://idp.example"], "api").is_err());
        assert!(config(&["http://10.0.0.1"], "api").is_err());
        assert!(config(&["ftp://idp.example"], "api").is_err());
        assert!(config(&["idp.example"], "api").is_err());
        assert!(config(&["https://idp.example?x=1"], "api").is_err());
        assert!(config(&[], "api").is_err());
        assert!(config(&["https://idp.example"], " ").is_err());
    }

    #[test]
    fn only_the_named_issuer_names_users_by_uuid() {
        let uuid = "3c90c3cc-0d44-4b50-8888-8dd25736052a";
        let (trusted, other) = ("https://a.example", "https://b.example");
        assert_eq!(user_id(trusted, uuid, Some(trusted)).to_string(), uuid);
        assert_eq!(
            user_id(other, uuid, Some(trusted)),
            UserId::from_subject(other, uuid)
        );
        assert_eq!(
            user_id(trusted, &uuid.to_uppercase(), Some(trusted)),
            UserId::from_subject(trusted, &uuid.to_uppercase())
        );
        assert_eq!(
            user_id(trusted, "alice", Some(trusted)),
            UserId::from_subject(trusted, "alice")
        );
        assert_eq!(
            user_id(trusted, uuid, None),
            UserId::from_subject(trusted, uuid)
        );
        let config = OidcConfig::new(vec![trusted.into(), other.into()], "api".into()).unwrap();
        assert!(config.clone().with_uuid_subjects(other.into()).is_ok());
        assert!(config
            .with_uuid_subjects("https://c.example".into())
            .is_err());
    }

    /// The lock a fetch holds is also taken for a moment by another request reading when the last
    /// fetch started (`fetch_due`, a 503's Retry-After): a token naming a new key that finds it
    /// held waits, and then still fetches the keys, or it is refused for a key the provider has.
    #[tokio::test]
    async fn a_lock_held_without_a_fetch_is_not_taken_for_one() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let asked = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let provider = {
            let (asked, issuer) = (asked.clone(), issuer.clone());
            axum::Router::new()
                .route(
                    "/.well-known/openid-configuration",
                    axum::routing::get(move || {
                        asked.fetch_add(1, SeqCst);
                        let document =
                            json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")});
                        async move { axum::Json(document) }
                    }),
                )
                .route(
                    "/jwks",
                    axum::routing::get(|| async { axum::Json(json!({"keys": [rsa_jwk(256)]})) }),
                )
        };
        let serving = tokio::spawn(async move { axum::serve(listener, provider).await });
        let oidc = Oidc::new(
            OidcConfig::new(vec![issuer], "api".into()).unwrap(),
            &crate::metrics::Metrics::new(),
        );

        let read_by_another_request = oidc.0.issuers[0].last_attempt.lock().await;
        let looking = {
            let oidc = oidc.clone();
            tokio::spawn(async move { oidc.fetch_for_unknown_key(0).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(read_by_another_request);
        assert!(looking.await.unwrap().is_ok());
        assert_eq!(asked.load(SeqCst), 1, "the keys were fetched");
        serving.abort();
    }

    fn b64(bytes: &[u8]) -> String {
        BASE64URL_NOPAD.encode(bytes)
    }

    fn rsa_jwk(modulus_bytes: usize) -> serde_json::Value {
        let mut n = vec![0xc5; modulus_bytes];
        n[modulus_bytes - 1] = 0x01;
        json!({"kty": "RSA", "kid": "r", "n": b64(&n), "e": b64(&[1, 0, 1])})
    }

    fn ec_jwk() -> serde_json::Value {
        json!({"kty": "EC", "crv": "P-256", "kid": "e", "x": b64(&[7; 32]), "y": b64(&[9; 32])})
    }

    #[test]
    fn a_key_verifies_exactly_the_algorithm_of_its_type() {
        let rsa = verifying_key(rsa_jwk(256)).unwrap();
        assert_eq!((rsa.kid.as_deref(), rsa.alg), (Some("r"), Algorithm::RS256));
        let ec = verifying_key(ec_jwk()).unwrap();
        assert_eq!((ec.kid.as_deref(), ec.alg), (Some("e"), Algorithm::ES256));

        let with = |mut jwk: serde_json::Value, key: &str, value: serde_json::Value| {
            jwk[key] = value;
            verifying_key(jwk)
        };
        assert!(with(rsa_jwk(256), "alg", json!("RS256")).is_some());
        assert!(with(rsa_jwk(256), "alg", json!("RS512")).is_none());
        assert!(with(rsa_jwk(256), "alg", json!("HS256")).is_none());
        assert!(with(ec_jwk(), "alg", json!("RS256")).is_none());
        assert!(with(rsa_jwk(256), "use", json!("enc")).is_none());
        assert!(with(rsa_jwk(256), "use", json!("sig")).is_some());
        assert!(with(ec_jwk(), "crv", json!("P-384")).is_none());
        assert!(verifying_key(rsa_jwk(128)).is_none(), "1024-bit RSA");
        assert!(verifying_key(json!({"kty": "oct", "k": b64(b"secret")})).is_none());
        assert!(verifying_key(json!({"kty": "RSA"})).is_none());
        assert!(verifying_key(json!("not an object")).is_none());
    }
}
