//! `GET /registry/token` (HTTP Basic, as skopeo and containerd ask) and `POST /registry/token`
//! (the OAuth2 password form the docker CLI uses).

use crate::app::App;
use crate::canary::{CanarySurface, Presentation};
use crate::config::RegistryConfig;
use crate::error::AppError;
use crate::jobs::TenantShares;
use crate::request_id::Origin;
use axum::extract::rejection::FormRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use keyplane_core::registry::{grant_access, grant_cost, parse_scopes, GrantedAccess, ScopeError};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const TAG: &str = "Registry token service";

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new().routes(routes!(issue_registry_token, issue_registry_token_oauth))
}

/// The Distribution token answer.
#[derive(Serialize, ToSchema)]
pub struct RegistryTokenResponse {
    pub token: String,
    /// The same JWT, for OAuth2 clients.
    pub access_token: String,
    /// Seconds from `issued_at` to the token's `exp`: the token lifetime, or less when the robot
    /// (or the previous secret it logged in with) stops authenticating sooner.
    pub expires_in: u64,
    pub issued_at: String,
}

#[derive(Serialize)]
struct Access<'a> {
    #[serde(rename = "type")]
    resource_type: &'a str,
    name: &'a str,
    actions: &'a [String],
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    /// A plain string: Distribution 2.x rejects an array.
    aud: &'a str,
    exp: i64,
    nbf: i64,
    iat: i64,
    jti: String,
    access: Vec<Access<'a>>,
}

/// Glob matching above this [`grant_cost`] (some 50 µs) runs on a blocking thread, not on the
/// async workers; below it, handing it over would cost more than the match.
const INLINE_GRANT_COST: usize = 10_000;

/// How long past a token's `exp` Distribution still accepts it (`Leeway` in its
/// `registry/auth/token`), both ways for clock skew; `admin registry-key retire-previous` waits
/// it out too.
pub const REGISTRY_EXP_LEEWAY_SECONDS: i64 = 60;

/// Grants over [`INLINE_GRANT_COST`] computed at once, per core (`App::costly_grants`): each takes
/// up to ~10 ms of a blocking thread.
pub(crate) const MAX_COSTLY_GRANTS_PER_CORE: usize = 2;

/// The turns of grants over [`INLINE_GRANT_COST`], and each organization's share of them: a login
/// takes a place in its organization's share before it waits for a turn, and one past the share
/// is refused at once (429), so one organization's logins cannot queue ahead of every other's.
pub(crate) struct CostlyGrants {
    turns: Arc<Semaphore>,
    count: usize,
    per_org: TenantShares,
}

/// How many grants over [`INLINE_GRANT_COST`] this machine computes at once
/// ([`MAX_COSTLY_GRANTS_PER_CORE`] per core): the most an organization's share
/// (`RegistryConfig::costly_grants_per_org`) can be.
pub fn costly_grant_turns() -> usize {
    MAX_COSTLY_GRANTS_PER_CORE * std::thread::available_parallelism().map_or(1, usize::from)
}

impl CostlyGrants {
    pub(crate) fn new(config: &RegistryConfig) -> Self {
        let count = costly_grant_turns();
        let share = config.costly_grants_per_org.unwrap_or((count / 2).max(1));
        Self {
            turns: Arc::new(Semaphore::new(count)),
            count,
            per_org: TenantShares::new(share),
        }
    }

    /// See `App::hold_costly_grant_turns`.
    pub(crate) async fn hold_every_turn(&self) -> OwnedSemaphorePermit {
        let count = u32::try_from(self.count).expect("a few turns per core");
        self.turns
            .clone()
            .acquire_many_owned(count)
            .await
            .expect("the semaphore is never closed")
    }

    pub(crate) fn places_held(&self) -> usize {
        self.per_org.held()
    }
}

/// The Distribution token service's error body.
#[derive(Serialize, ToSchema)]
pub struct RegistryErrors {
    /// One entry.
    pub errors: Vec<RegistryErrorItem>,
}

#[derive(Serialize, ToSchema)]
pub struct RegistryErrorItem {
    pub code: RegistryErrorCode,
    pub message: String,
}

/// The Distribution error codes the token service answers.
#[derive(Serialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryErrorCode {
    /// 401: bad or missing robot credentials.
    #[serde(rename = "UNAUTHORIZED")]
    Unauthorized,
    /// 400, 413, 415: a request the token service does not serve (another service, a scope
    /// outside the grammar, a body that is not a form within the size limit).
    #[serde(rename = "UNSUPPORTED")]
    Unsupported,
    /// 400: a scope names a repository that is not a canonical repository name.
    #[serde(rename = "NAME_INVALID")]
    NameInvalid,
    /// 429: too many failed logins from this address.
    #[serde(rename = "TOOMANYREQUESTS")]
    TooManyRequests,
    /// 500, 503.
    #[serde(rename = "UNAVAILABLE")]
    Unavailable,
}

/// What a refused `POST /registry/token` answers: RFC 6749's error (`unsupported_grant_type`,
/// `invalid_scope`) where OAuth2 names one, as its clients read it; the Distribution errors
/// otherwise (another service, a body that is not a form). For the document only.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum RegistryFormRefusal {
    OAuth(crate::openapi::OAuthError),
    Distribution(RegistryErrors),
}

/// `POST /registry/token`'s form, as the docker CLI sends it. For the document only: the handler
/// reads the pairs as sent.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RegistryTokenForm {
    /// Only `password` is served (400 `unsupported_grant_type` otherwise).
    #[schema(value_type = String, pattern = "^password$")]
    grant_type: String,
    /// The robot's login name, `robot$<harbor_project>+<name>`.
    username: String,
    /// The robot's secret.
    password: String,
    /// The registry's service name (400 for another).
    #[schema(nullable = false)]
    service: Option<String>,
    /// `repository:<name>:<actions>`; several separated by spaces, or the field repeated.
    #[schema(nullable = false)]
    scope: Option<String>,
}

/// A refusal in the registry's error format.
enum RegistryError {
    App(AppError),
    /// A request the token service does not serve (wrong service, unsupported form).
    Unsupported(String),
    /// A `scope` outside the Distribution grammar: nothing is granted.
    InvalidScope(ScopeError),
    /// The organization already has its share of costly logins under way or waiting.
    CostlyShareTaken,
}

/// A Distribution error answer.
fn registry_errors(status: StatusCode, code: RegistryErrorCode, message: String) -> Response {
    let body = RegistryErrors {
        errors: vec![RegistryErrorItem { code, message }],
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let error = match self {
            RegistryError::App(error) => error,
            RegistryError::Unsupported(message) => {
                return registry_errors(
                    StatusCode::BAD_REQUEST,
                    RegistryErrorCode::Unsupported,
                    message,
                );
            }
            RegistryError::InvalidScope(error) => {
                let code = match error {
                    ScopeError::InvalidName { .. } => RegistryErrorCode::NameInvalid,
                    ScopeError::Malformed { .. } | ScopeError::TooMany => {
                        RegistryErrorCode::Unsupported
                    }
                };
                return registry_errors(StatusCode::BAD_REQUEST, code, error.to_string());
            }
            RegistryError::CostlyShareTaken => {
                let mut response = registry_errors(
                    StatusCode::TOO_MANY_REQUESTS,
                    RegistryErrorCode::TooManyRequests,
                    "too many logins of this organization with costly permissions at once; \
                     retry shortly"
                        .into(),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1));
                response.extensions_mut().insert(crate::error::ErrorCause(
                    "the organization's share of costly grants is taken".into(),
                ));
                return response;
            }
        };
        let status = error.status();
        let code = match status {
            StatusCode::UNAUTHORIZED => RegistryErrorCode::Unauthorized,
            StatusCode::BAD_REQUEST
            | StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE => RegistryErrorCode::Unsupported,
            StatusCode::TOO_MANY_REQUESTS => RegistryErrorCode::TooManyRequests,
            _ => RegistryErrorCode::Unavailable,
        };
        let message = match &error {
            AppError::Unauthenticated(_) => "invalid username or password".to_string(),
            other => other.public_message(),
        };
        let mut response = registry_errors(status, code, message);
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(BASIC_CHALLENGE),
            );
        }
        if let Some(seconds) = error.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
            .extensions_mut()
            .insert(crate::error::ErrorCause(error.to_string()));
        response
    }
}

/// The challenge of the token service's 401.
pub(crate) const BASIC_CHALLENGE: &str = "Basic realm=\"keyplane registry\"";

/// An [`AppError`] in the registry's error format, for refusals made before the handler runs.
pub(crate) fn error_response(error: AppError) -> Response {
    RegistryError::App(error).into_response()
}

impl From<AppError> for RegistryError {
    fn from(error: AppError) -> Self {
        Self::App(error)
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = data_encoding::BASE64
        .decode(encoded.trim().as_bytes())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

async fn issue(
    app: &App,
    username: &str,
    secret: &str,
    params: &[(String, String)],
    at: crate::canary::Presented<'_>,
) -> Result<Response, RegistryError> {
    let config = &app.inner().config.registry;
    let admitted = app
        .inner()
        .verifier
        .authenticate_robot(username, secret, at)
        .await?;
    let (verified, registry) = (&admitted.verified, &admitted.registry);
    let robot = &verified.credential;
    if let Some((_, service)) = params.iter().find(|(k, _)| k == "service") {
        if service != &config.service {
            return Err(RegistryError::Unsupported(format!(
                "this token service issues tokens for service `{}` only",
                config.service
            )));
        }
    }
    let requested = parse_scopes(
        params
            .iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.as_str()),
    )
    .map_err(RegistryError::InvalidScope)?;
    // The scope and permission bounds cap this work (`grant_cost`); a large share of it still
    // leaves the async workers.
    let granted: Vec<GrantedAccess> =
        if grant_cost(&robot.permissions, &requested) <= INLINE_GRANT_COST {
            grant_access(&robot.permissions, &registry.project, &requested)
        } else {
            // Only a costly login is charged to the robot's and its organization's limits (those
            // of management requests): a CI fleet sharing one robot logs in in bursts, and a cheap
            // grant costs less than the verification before it.
            app.charge(robot.id.as_uuid(), Some(robot.tenant_id))?;
            let permissions = robot.permissions.clone();
            let project = registry.project.clone();
            let costly = &app.inner().costly_grants;
            // The place first: waiting for a turn is bounded per organization too.
            let place = costly
                .per_org
                .take(robot.tenant_id)
                .ok_or(RegistryError::CostlyShareTaken)?;
            let turn = costly
                .turns
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| AppError::Internal(e.into()))?;
            // The turn and the place go with the work: a request given up still holds them until
            // it ends.
            tokio::task::spawn_blocking(move || {
                let granted = grant_access(&permissions, &project, &requested);
                drop((turn, place));
                granted
            })
            .await
            .map_err(|e| AppError::Internal(e.into()))?
        };
    let now = crate::ops::now();
    // Never past the robot's own end (its expiry, or the grace end of the previous secret it
    // logged in with). Distribution accepts a token up to `REGISTRY_EXP_LEEWAY_SECONDS` past its
    // `exp`, so the end is brought forward by that much.
    let exp = (now.timestamp() + config.token_ttl.as_secs() as i64)
        .min(verified.gate.ends_at_micros().div_euclid(1_000_000) - REGISTRY_EXP_LEEWAY_SECONDS);
    let claims = Claims {
        iss: &config.issuer,
        sub: username,
        aud: &config.service,
        exp,
        nbf: now.timestamp() - 1,
        iat: now.timestamp(),
        jti: uuid::Uuid::new_v4().simple().to_string(),
        access: granted
            .iter()
            .map(|g| Access {
                resource_type: &g.resource_type,
                name: &g.name,
                actions: &g.actions,
            })
            .collect(),
    };
    let signer = app.registry_signer().await?;
    let token = signer.sign(&claims)?;
    app.inner().verifier.robot_logged_in(&admitted);
    tracing::info!(tenant.id = %robot.tenant_id, credential.id = %robot.id, granted = granted.len(), "registry token issued");
    Ok(Json(RegistryTokenResponse {
        access_token: token.clone(),
        token,
        expires_in: (exp - now.timestamp()).max(0) as u64,
        issued_at: now.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    })
    .into_response())
}

/// Issue a registry token
///
/// The Distribution token-authentication endpoint (the registry's `auth.token.realm` is
/// `http://<keyplane>/registry/token`). Log in with HTTP Basic: the robot's login name
/// `robot$<harbor_project>+<name>` and its secret. Each `scope` (`repository:<project>/<repo>:pull,push`)
/// is granted as far as the robot's permissions allow, never outside its organization's project;
/// a scope the robot may not use is left out of the token. A scope that does not follow the
/// Distribution grammar, with a canonical repository name (lowercase components, no empty
/// segment or `..`, at most 255 bytes), refuses the request with 400.
#[utoipa::path(
    get, path = "/registry/token", tag = TAG,
    params(
        ("service" = Option<String>, Query, description = "The registry's service name."),
        ("scope" = Option<String>, Query, description = "Repeatable: `repository:<name>:<actions>`."),
        ("account" = Option<String>, Query, description = "The login name (informational)."),
    ),
    responses(
        (status = 200, description = "A signed token.", body = RegistryTokenResponse),
        (status = 400, description = "A `scope` outside the Distribution grammar (`NAME_INVALID` for a name that is not a canonical repository name, `UNSUPPORTED` otherwise; at most 32 scopes), or another service."),
        (status = 401, description = "Bad or missing robot credentials."),
        (status = 429, description = "Too many failed logins from this address, or a robot whose permissions make its grant costly past its rate limit (`--rate-limit-per-minute`) or its organization's (`--tenant-rate-limit-per-minute`), or while its organization has half of the replica's costly logins under way or waiting (`TOOMANYREQUESTS`); see Retry-After."),
    ),
    security(("basic" = [])),
)]
async fn issue_registry_token(
    State(app): State<App>,
    origin: Origin,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, RegistryError> {
    let (username, secret) = basic_credentials(&headers)
        .ok_or(AppError::Unauthenticated("missing basic credentials"))?;
    let at = presentation("GET /registry/token", &headers, origin);
    issue(&app, &username, &secret, &params, &at).await
}

/// Describes a token request, for a canary robot's trigger.
fn presentation<'a>(
    route: &'static str,
    headers: &'a HeaderMap,
    origin: Origin,
) -> impl Fn() -> Presentation + Sync + 'a {
    move || Presentation::of_request(CanarySurface::RegistryToken, route.into(), headers, &origin)
}

/// Issue a registry token (OAuth2 form)
///
/// The OAuth2 `grant_type=password` form of the same endpoint, as the docker CLI sends it
/// (`username`, `password`, `service`, `scope` form fields). Refresh tokens are not issued.
#[utoipa::path(
    post, path = "/registry/token", tag = TAG,
    request_body(content = RegistryTokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "A signed token.", body = RegistryTokenResponse),
        (status = 400, description = "In RFC 6749's shape (`{error, error_description}`): an unsupported grant type (`unsupported_grant_type`), or a `scope` outside the Distribution grammar (`invalid_scope`; at most 32 scopes). In the Distribution shape (`{errors}`, `UNSUPPORTED`): another service, or a body that cannot be read as a form.", body = RegistryFormRefusal),
        (status = 401, description = "Bad or missing robot credentials (`username`, `password`)."),
        (status = 429, description = "Too many failed logins from this address, or a robot whose permissions make its grant costly past its rate limit (`--rate-limit-per-minute`) or its organization's (`--tenant-rate-limit-per-minute`), or while its organization has half of the replica's costly logins under way or waiting (`TOOMANYREQUESTS`); see Retry-After."),
    ),
)]
async fn issue_registry_token_oauth(
    State(app): State<App>,
    origin: Origin,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, RegistryError> {
    let Form(params) = form.map_err(form_refusal)?;
    let field = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if field("grant_type").as_deref() != Some("password") {
        return Ok(oauth_error(
            "unsupported_grant_type",
            "only grant_type=password is supported",
        ));
    }
    let (Some(username), Some(secret)) = (field("username"), field("password")) else {
        return Err(AppError::Unauthenticated("missing username or password").into());
    };
    let at = presentation("POST /registry/token", &headers, origin);
    match issue(&app, &username, &secret, &params, &at).await {
        Err(RegistryError::InvalidScope(error)) => {
            Ok(oauth_error("invalid_scope", &error.to_string()))
        }
        other => other,
    }
}

/// A body the form extractor refused: 413 past the size limit, 415 when it is not labelled a
/// form, 400 otherwise.
fn form_refusal(rejection: FormRejection) -> RegistryError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge.into(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            AppError::UnsupportedMediaType("application/x-www-form-urlencoded").into()
        }
        _ => RegistryError::Unsupported(rejection.body_text()),
    }
}

/// An RFC 6749 §5.2 error answer, as OAuth2 clients of the form read it.
fn oauth_error(code: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": code, "error_description": description })),
    )
        .into_response()
}
