//! Verification APIs for other services: RFC 7662 introspection, forward-auth for reverse proxies,
//! and whoami. They serve other services' traffic, so the management rate limit does not count
//! them. Errors use the OAuth style `{"error", "error_description"}`.

use crate::app::App;
use crate::auth::{bearer_token, Verified};
use crate::canary::{CanarySurface, Presentation};
use crate::error::{ApiError, AppError, Surface};
use crate::request_id::Origin;
use crate::router::Answer;
use axum::extract::{Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::{BoxFuture, Either, FutureExt};
use keyplane_api_types::verify::VerificationError;
pub use keyplane_api_types::verify::{IntrospectionResponse, WhoAmI};
use keyplane_core::{Capability, Error as DomainError, Scope, ScopeSet, TenantId};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const TAG: &str = "Verification";

/// Marker for the verification endpoints' OAuth-style error dialect.
pub struct Verification;

type VerifyError = ApiError<Verification>;

impl Surface for Verification {
    fn error_body(error: &AppError) -> Value {
        let code = match error {
            AppError::Unauthenticated(_) => "invalid_token",
            AppError::Domain(DomainError::Forbidden(_)) => "insufficient_scope",
            AppError::Domain(DomainError::NotFound) => "not_found",
            AppError::RateLimited { .. } => "rate_limited",
            AppError::Unavailable(_)
            | AppError::UpstreamUnavailable { .. }
            | AppError::OverBudget { .. } => "temporarily_unavailable",
            AppError::Internal(_) => "server_error",
            _ => "invalid_request",
        };
        let description = match error {
            AppError::Domain(DomainError::Validation(fields)) => fields
                .iter()
                .map(|f| format!("{}: {}", f.path, f.message))
                .collect::<Vec<_>>()
                .join("; "),
            other => other.public_message(),
        };
        serde_json::to_value(VerificationError {
            error: code.to_string(),
            error_description: description,
        })
        .expect("a struct of strings is JSON")
    }

    /// RFC 6749 §5.2: a malformed request is `400 invalid_request`, whatever the field.
    fn status(error: &AppError) -> StatusCode {
        match error {
            AppError::Domain(DomainError::Validation(_)) => StatusCode::BAD_REQUEST,
            other => other.status(),
        }
    }
}

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(introspect))
        .routes(routes!(forward_auth))
        .routes(routes!(whoami))
}

/// The verification routes, which [`crate::router::Front`] serves without the router.
#[derive(Clone, Copy)]
pub(crate) enum DirectRoute {
    ForwardAuth,
    Introspect,
    Whoami,
}

impl DirectRoute {
    pub(crate) const ALL: [Self; 3] = [Self::ForwardAuth, Self::Introspect, Self::Whoami];

    /// The route a request is for, when it is one of these and of its method.
    pub(crate) fn of(method: &Method, path: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|route| route.path() == path && route.method() == method)
    }

    /// Whether `path` is one of these routes' (whatever the method).
    pub(crate) fn serves_path(path: &str) -> bool {
        Self::ALL.into_iter().any(|route| route.path() == path)
    }

    fn method(self) -> Method {
        match self {
            Self::Introspect => Method::POST,
            Self::ForwardAuth | Self::Whoami => Method::GET,
        }
    }

    /// As the router's `MatchedPath` would name it.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::ForwardAuth => "/v1/auth/forward",
            Self::Introspect => "/oauth2/introspect",
            Self::Whoami => "/v1/whoami",
        }
    }

    /// The route's handler called as the router would call it, its future boxed per route so
    /// that each request builds and moves only its own route's; forward-auth is answered at once,
    /// with no future (nor a clone of `app`), when the verification caches can
    /// ([`forward_auth_cached`]).
    pub(crate) fn serve(
        self,
        app: &App,
        request: Request,
        origin: Origin,
    ) -> Either<Response, BoxFuture<'static, Answer>> {
        fn answer(response: impl IntoResponse) -> Answer {
            Ok(response.into_response())
        }
        let pending = match self {
            Self::ForwardAuth => {
                let (parts, body) = request.into_parts();
                if let Some(response) = forward_auth_cached(app, &parts, &origin) {
                    return Either::Left(response);
                }
                let request = Request::from_parts(parts, body);
                forward_auth(State(app.clone()), origin, request)
                    .map(answer)
                    .boxed()
            }
            Self::Introspect => introspect(State(app.clone()), origin, request)
                .map(answer)
                .boxed(),
            Self::Whoami => whoami(State(app.clone()), origin, request)
                .map(answer)
                .boxed(),
        };
        Either::Right(pending)
    }
}

const ORG_ID: HeaderName = HeaderName::from_static("x-keyplane-org-id");
const SUBJECT: HeaderName = HeaderName::from_static("x-keyplane-subject");
const KIND: HeaderName = HeaderName::from_static("x-keyplane-credential-kind");
const SCOPES: HeaderName = HeaderName::from_static("x-keyplane-scopes");
const SECRET: HeaderName = HeaderName::from_static("x-keyplane-secret");
/// Marks an active introspection answer given from the cache while the store was failing.
const STALE: HeaderName = HeaderName::from_static("x-keyplane-stale");

/// A credential's scopes as one space-separated string. (Robot secrets never verify here.)
fn scope_string(scopes: &ScopeSet) -> String {
    let scopes: Vec<&str> = scopes.iter().map(Scope::as_str).collect();
    scopes.join(" ")
}

/// The `token` of an introspection request, from a form or JSON body: borrowed from the body when
/// it needs no decoding.
fn presented_token<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<Cow<'a, str>, AppError> {
    const FORM: &str = "application/x-www-form-urlencoded";
    let content_type = headers.get(header::CONTENT_TYPE);
    // What clients send, compared as bytes before the general case: parsing the header costs
    // more than the rest of the form's reading (BENCHMARKS.md, "Fourteenth sitting").
    let is_plain_form = content_type.is_some_and(|v| v.as_bytes() == FORM.as_bytes());
    let media_type_is = |expected: &str| {
        content_type
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map_or("", str::trim)
            .eq_ignore_ascii_case(expected)
    };
    let token = if is_plain_form || media_type_is(FORM) {
        form_field(body, "token")
    } else if media_type_is("application/json") {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| AppError::InvalidJson(e.to_string()))?
            .get("token")
            .and_then(Value::as_str)
            .map(|token| Cow::Owned(token.to_string()))
    } else {
        return Err(AppError::UnsupportedMediaType(
            "application/x-www-form-urlencoded or application/json",
        ));
    };
    token.ok_or_else(|| {
        AppError::Domain(DomainError::Validation(vec![
            keyplane_core::FieldError::new(
                keyplane_core::FieldPath::body("token"),
                keyplane_core::error::codes::REQUIRED,
                "is required",
            ),
        ]))
    })
}

/// The first field called `name` of a form body. A body with nothing to decode (no `%`, no `+`)
/// is split in place, and its field's value borrowed when it is UTF-8 (a token's alphabet is);
/// any other is decoded pair by pair. The separators are found with `memchr`, which scans a
/// token's length several bytes at a time where a byte loop took most of this function's time.
pub(crate) fn form_field<'a>(body: &'a [u8], name: &str) -> Option<Cow<'a, str>> {
    if memchr::memchr2(b'%', b'+', body).is_none() {
        let mut rest = Some(body);
        let value = std::iter::from_fn(|| {
            let pairs = rest?;
            let (pair, next) = match memchr::memchr(b'&', pairs) {
                Some(at) => (&pairs[..at], Some(&pairs[at + 1..])),
                None => (pairs, None),
            };
            rest = next;
            Some(pair)
        })
        .find_map(|pair| {
            let (key, value) = match memchr::memchr(b'=', pair) {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &pair[pair.len()..]),
            };
            // A key that is not UTF-8 decodes with a replacement character, so never to `name`.
            (key == name.as_bytes()).then_some(value)
        });
        match value.map(std::str::from_utf8) {
            None => return None,
            Some(Ok(value)) => return Some(Cow::Borrowed(value)),
            // Decoded below, replacing what is not UTF-8 as `form_urlencoded` does.
            Some(Err(_)) => {}
        }
    }
    // Other fields are skipped, not decoded into strings.
    form_urlencoded::parse(body)
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

/// An introspection request's body, as a form (`token=...`) or JSON. For the document only: the
/// handler reads the field itself (`presented_token`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct IntrospectionRequest {
    /// The credential to check. Other fields (RFC 7662's `token_type_hint`) are ignored.
    token: String,
}

/// Introspect a token (RFC 7662)
///
/// Tells whether a keyplane credential is active and what it holds. The caller authenticates with
/// a Bearer credential holding `tokens:verify`, and only learns about credentials of its own
/// organization: anything unknown, expired, revoked, elsewhere or a robot secret (robots log in to
/// the registry only) is `{"active": false}`. The body
/// is `token=...` (form) or `{"token": "..."}` (JSON).
#[utoipa::path(
    post, path = "/oauth2/introspect", tag = TAG,
    request_body(content(
        (IntrospectionRequest = "application/x-www-form-urlencoded"),
        (IntrospectionRequest = "application/json"),
    )),
    responses(
        (status = 200, description = "The introspection answer.", body = IntrospectionResponse,
            headers(("X-Keyplane-Stale" = String, description = "`1` on an active answer given while keyplane's store could not be read (stale-if-error): it comes from this replica's cache and may miss a change made through another replica since."))),
        (status = 401, description = "The caller's own credential is missing or invalid, or a robot secret."),
        (status = 403, description = "The caller lacks `tokens:verify`."),
        (status = 429, description = "Too many failed authentications (401s) from the caller's address, or the caller's organization introspected more unknown tokens this minute than its budget (`--introspect-misses-per-minute`: tokens the verification caches do not hold that the store did not know); see Retry-After. Tokens the caches hold are still answered. Inactive answers are no failed authentications."),
    ),
    security(("bearer" = [])),
)]
async fn introspect(
    State(app): State<App>,
    origin: Origin,
    mut request: Request,
) -> Result<Response, VerifyError> {
    const ROUTE: &str = "POST /oauth2/introspect";
    // The headers taken rather than cloned (as a `HeaderMap` extractor would).
    let headers = std::mem::take(request.headers_mut());
    let body = crate::extract::read_body(request, &app).await?;
    let verifier = &app.inner().verifier;
    let at_caller = || {
        Presentation::of_request(
            CanarySurface::IntrospectionCaller,
            ROUTE.into(),
            &headers,
            &origin,
        )
    };
    let caller = verifier
        .verify_bearer(bearer_token(&headers)?, &at_caller)
        .await?;
    if !caller.rights.scopes.grants(Capability::TokensVerify) {
        return Err(AppError::Domain(DomainError::Forbidden(
            "introspection needs a credential with the `tokens:verify` capability".into(),
        ))
        .into());
    }
    let token = presented_token(&headers, &body)?;
    // The introspected token was presented to the caller (a resource server), which asks here: the
    // trigger's address and agent are the caller's, and it names the caller when it is of the
    // canary's organization.
    // No client: an inactive answer is no failure of the caller's, which authenticated.
    let at_token = || {
        Presentation::new(
            CanarySurface::IntrospectedToken,
            ROUTE.into(),
            crate::audit::request_context_of(&headers, &origin),
        )
        .introspected_by(&caller.credential)
    };
    let verified = match verifier
        .introspect(&token, caller.credential.tenant_id, &at_token)
        .await
    {
        Ok(verified) => verified,
        Err(AppError::Unauthenticated(_)) => {
            // Not a failure of the caller, which authenticated: re-checking revoked or unknown
            // tokens is an embedded verifier's job, and guessing 256-bit secrets is hopeless.
            return Ok(Json(IntrospectionResponse::inactive()).into_response());
        }
        Err(other) => return Err(other.into()),
    };
    let credential = &verified.credential;
    let answer = ActiveAnswer {
        token_type: credential.kind.as_str(),
        scope: &verified.rights.headers.scopes,
        sub: credential.id.as_uuid(),
        org_id: &verified.rights.headers.org_id,
        username: &credential.name,
        // The presented secret's end: a previous secret's grace end when that is sooner, so a
        // verifier caching the answer stops accepting the old secret when keyplane does.
        exp: Some(verified.gate.ends_at_micros())
            .filter(|end| *end != i64::MAX)
            .map(|end| end.div_euclid(1_000_000)),
        iat: credential.created_at.timestamp(),
        secret: verified.secret.as_str(),
    };
    let mut response = crate::wire::json_response(axum::body::Body::from(answer.to_json()));
    if verifier.answering_stale() {
        response
            .headers_mut()
            .insert(STALE, HeaderValue::from_static("1"));
    }
    Ok(response)
}

/// An active introspection answer, borrowed from the cache entry: the organization and the scopes
/// as their forward-auth headers hold them, rendered once per interned scope set.
struct ActiveAnswer<'a> {
    token_type: &'a str,
    scope: &'a HeaderValue,
    sub: uuid::Uuid,
    org_id: &'a HeaderValue,
    username: &'a str,
    exp: Option<i64>,
    iat: i64,
    secret: &'a str,
}

impl ActiveAnswer<'_> {
    /// The bytes `serde_json` makes of the same [`IntrospectionResponse`] (a test holds them
    /// equal), written without a `String` per field or escaping what cannot need it: kinds, ids,
    /// scopes (`[A-Za-z0-9_.:/-]` or `*`) and `current`/`previous`. Only the name is user text.
    /// As `Bytes` of an exact-size buffer: from a `Vec` with room to spare, `Bytes` allocates a
    /// shared header of its own, where shrinking stays in the allocator's block.
    fn to_json(&self) -> axum::body::Bytes {
        let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let mut json = Vec::with_capacity(256 + self.scope.len() + self.username.len());
        json.extend_from_slice(br#"{"active":true,"token_type":""#);
        json.extend_from_slice(self.token_type.as_bytes());
        json.extend_from_slice(br#"","scope":""#);
        json.extend_from_slice(self.scope.as_bytes());
        json.extend_from_slice(br#"","sub":""#);
        json.extend_from_slice(self.sub.hyphenated().encode_lower(&mut uuid).as_bytes());
        json.extend_from_slice(br#"","org_id":""#);
        json.extend_from_slice(self.org_id.as_bytes());
        json.extend_from_slice(br#"","username":"#);
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut json, self.username);
        if let Some(exp) = self.exp {
            json.extend_from_slice(br#","exp":"#);
            let _ = serde_json::to_writer(&mut json, &exp);
        }
        json.extend_from_slice(br#","iat":"#);
        let _ = serde_json::to_writer(&mut json, &self.iat);
        json.extend_from_slice(br#","secret":""#);
        json.extend_from_slice(self.secret.as_bytes());
        json.extend_from_slice(br#""}"#);
        axum::body::Bytes::from(json.into_boxed_slice())
    }
}

/// Forward-auth
///
/// For nginx `auth_request`, Traefik `forwardAuth` and Envoy `ext_authz`: verifies the request's
/// own `Authorization: Bearer` credential and answers 200 with `X-Keyplane-Org-Id`,
/// `X-Keyplane-Subject` (credential id), `X-Keyplane-Credential-Kind`, `X-Keyplane-Scopes`
/// (space-separated) and `X-Keyplane-Secret` (`current`, or `previous` during a rotation's grace
/// period), or 401. Each `scope` query parameter is a scope the credential must hold, and `org`
/// parameters name the organizations it may belong to (403 otherwise): any organization can mint
/// a credential with any scope string, so a proxy in front of one organization's service names it.
#[utoipa::path(
    get, path = "/v1/auth/forward", tag = TAG,
    params(
        ("scope" = Option<String>, Query, description = "Repeatable: a scope the credential must hold."),
        ("org" = Option<Uuid>, Query, description = "Repeatable: an organization the credential may belong to; with none, any."),
    ),
    responses(
        (status = 200, description = "Valid; identity in the X-Keyplane-* headers. No body.",
            headers(
                ("X-Keyplane-Org-Id" = String, description = "The credential's organization (UUID)."),
                ("X-Keyplane-Subject" = String, description = "The credential's id (UUID)."),
                ("X-Keyplane-Credential-Kind" = String, description = "`api_token` or `service_account`."),
                ("X-Keyplane-Scopes" = String, description = "The credential's scopes, space-separated."),
                ("X-Keyplane-Secret" = String, description = "`current`, or `previous` for the previous secret during a rotation's grace period."),
            )),
        (status = 401, description = "Missing, unknown, expired or revoked credential, or a robot secret."),
        (status = 403, description = "Valid, but without a required scope, or of an organization not named by `org`."),
    ),
    security(("bearer" = [])),
)]
async fn forward_auth(State(app): State<App>, origin: Origin, request: Request) -> Response {
    // The whole request, not extractors: its parts describe a canary's presentation, read only
    // when one is presented, and nothing is copied on the hot path.
    let (parts, _) = request.into_parts();
    let check = match ForwardCheck::read(&parts) {
        Ok(check) => check,
        Err(refused) => return refusal(refused),
    };
    let at = || forward_presentation(&parts, &origin);
    let verified = app.inner().verifier.verify_bearer(check.token, &at).await;
    check.answer(verified)
}

/// [`forward_auth`]'s answer when the verification caches can give it, as they do for almost
/// every request: without its future, which would be built, boxed and polled for an answer that
/// is ready at once. `None`: only the store can tell (serve `forward_auth` then).
fn forward_auth_cached(app: &App, parts: &Parts, origin: &Origin) -> Option<Response> {
    let check = match ForwardCheck::read(parts) {
        Ok(check) => check,
        Err(refused) => return Some(refusal(refused)),
    };
    let at = || forward_presentation(parts, origin);
    let verified = app
        .inner()
        .verifier
        .verify_bearer_cached(check.token, &at)?;
    Some(check.answer(verified))
}

/// How a canary presented at forward-auth is described.
fn forward_presentation(parts: &Parts, origin: &Origin) -> Presentation {
    Presentation::of_route(
        CanarySurface::ForwardAuth,
        DirectRoute::ForwardAuth.path(),
        parts,
        origin,
    )
}

/// A forward-auth request read: the credential it presents, the scopes that must hold and the
/// organizations it may belong to (none: any).
struct ForwardCheck<'a> {
    token: &'a str,
    scopes: Vec<String>,
    orgs: Vec<TenantId>,
}

impl<'a> ForwardCheck<'a> {
    /// `parts` read, or why they cannot be checked.
    fn read(parts: &'a Parts) -> Result<Self, AppError> {
        let invalid = |field: &str, code, message: &str| {
            AppError::Domain(DomainError::Validation(vec![
                keyplane_core::FieldError::new(
                    keyplane_core::FieldPath::query(field),
                    code,
                    message,
                ),
            ]))
        };
        let (mut scopes, mut orgs) = (Vec::new(), Vec::new());
        // Most checks name no scope: no query, nothing to parse.
        if parts.uri.query().is_some() {
            let Ok(Query(pairs)) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri) else {
                return Err(invalid(
                    "scope",
                    keyplane_core::error::codes::INVALID_FORMAT,
                    "is not a query string of `scope` parameters",
                ));
            };
            for (name, value) in pairs {
                match name.as_str() {
                    "scope" => scopes.push(value),
                    "org" => orgs.push(
                        uuid::Uuid::parse_str(&value)
                            .map(TenantId::from_uuid)
                            .map_err(|_| {
                                invalid(
                                    "org",
                                    keyplane_core::error::codes::INVALID_FORMAT,
                                    "is not an organization id (a UUID)",
                                )
                            })?,
                    ),
                    // A misspelt parameter must not silently drop the check it was meant to add.
                    unknown => {
                        return Err(invalid(
                            unknown,
                            keyplane_core::error::codes::UNKNOWN_FIELD,
                            "is not a known parameter (only `scope` and `org`)",
                        ))
                    }
                }
            }
        }
        let token = bearer_token(&parts.headers)?;
        Ok(Self {
            token,
            scopes,
            orgs,
        })
    }

    /// The answer to the verification of `self.token`: 200 with the identity headers, 403 when
    /// a required scope is not held, else the refusal.
    fn answer(&self, verified: Result<Arc<Verified>, AppError>) -> Response {
        let verified = match verified {
            Ok(verified) => verified,
            Err(refused) => return refusal(refused),
        };
        if !self.orgs.is_empty() && !self.orgs.contains(&verified.credential.tenant_id) {
            return refusal(AppError::Domain(DomainError::Forbidden(
                "the credential belongs to another organization".into(),
            )));
        }
        let holds = &verified.rights.scopes;
        for scope in &self.scopes {
            let held = Scope::parse(scope).is_ok_and(|s| holds.covers(&s));
            if !held {
                return refusal(AppError::Domain(DomainError::Forbidden(format!(
                    "the credential lacks the `{scope}` scope"
                ))));
            }
        }
        let shared = &verified.rights.headers;
        let mut response = StatusCode::OK.into_response();
        *response.headers_mut() = forward_answer_headers([
            shared.org_id.clone(),
            crate::router::uuid_header(verified.credential.id.as_uuid()),
            HeaderValue::from_static(verified.gate.kind.as_str()),
            shared.scopes.clone(),
            HeaderValue::from_static(verified.secret.as_str()),
        ]);
        response
    }
}

/// An error as this surface answers it.
fn refusal(error: AppError) -> Response {
    VerifyError::from(error).into_response()
}

/// A forward-auth answer's headers: the identity headers with `values` (organization, subject,
/// kind, scopes, secret), `Cache-Control: no-store`, and a slot for the request id, which
/// `router::Observation` fills as on every answer. The names are laid out once and each answer
/// clones the layout, which copies its table: inserting them would hash each name anew, byte by
/// byte, and that was most of what these headers cost (BENCHMARKS.md, "Fifth sitting").
fn forward_answer_headers(values: [HeaderValue; 5]) -> HeaderMap {
    static LAYOUT: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(|| {
        let mut layout = HeaderMap::with_capacity(7);
        for name in [ORG_ID, SUBJECT, KIND, SCOPES, SECRET] {
            layout.insert(name, HeaderValue::from_static(""));
        }
        layout.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        layout.insert(crate::request_id::REQUEST_ID, HeaderValue::from_static(""));
        layout
    });
    let mut headers = LAYOUT.clone();
    // In insertion order: the layout is never removed from.
    for (slot, value) in headers.values_mut().zip(values) {
        *slot = value;
    }
    headers
}

/// Forward-auth's organization and scopes headers, rendered and checked once per interned scope
/// set ([`crate::auth::Rights`]): a response clones each value (a reference count) instead of
/// rendering it, and an introspection answer copies their bytes. The subject, one per credential,
/// is rendered per response instead: kept, it would cost every cached credential a buffer and its
/// header values.
pub(crate) struct ForwardHeaders {
    pub(crate) org_id: HeaderValue,
    scopes: HeaderValue,
}

impl ForwardHeaders {
    pub(crate) fn of(tenant: TenantId, scopes: &ScopeSet) -> Self {
        Self {
            org_id: crate::router::uuid_header(tenant.as_uuid()),
            // Scopes are ASCII by their grammar.
            scopes: HeaderValue::try_from(scope_string(scopes)).expect("ASCII header value"),
        }
    }

    /// The heap bytes the rendered values hold.
    pub(crate) fn held(&self) -> usize {
        self.org_id.len() + self.scopes.len()
    }
}

/// Who am I
///
/// The calling credential describes itself.
#[utoipa::path(
    get, path = "/v1/whoami", tag = TAG,
    responses(
        (status = 200, description = "The caller.", body = WhoAmI),
        (status = 401, description = "Missing, unknown, expired or revoked credential, or a robot secret."),
    ),
    security(("bearer" = [])),
)]
async fn whoami(
    State(app): State<App>,
    origin: Origin,
    request: Request,
) -> Result<Json<WhoAmI>, VerifyError> {
    let (parts, _) = request.into_parts();
    let at = || {
        let route = DirectRoute::Whoami.path();
        Presentation::of_route(CanarySurface::Whoami, route, &parts, &origin)
    };
    let verified = app
        .inner()
        .verifier
        .verify_bearer(bearer_token(&parts.headers)?, &at)
        .await?;
    let credential = &verified.credential;
    Ok(Json(WhoAmI {
        kind: credential.kind.as_str().to_string(),
        id: credential.id.to_string(),
        org_id: credential.tenant_id.to_string(),
        name: credential.name.to_string(),
        scopes: verified.rights.scopes.to_strings(),
        expires_at: credential.expires_at.as_ref().map(crate::wire::rfc3339),
        secret: verified.secret.as_str().to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_answer_names_each_value_it_is_given() {
        let values = ["org", "subject", "kind", "scopes", "secret"].map(HeaderValue::from_static);
        let headers = forward_answer_headers(values);
        for (name, value) in [
            (ORG_ID, "org"),
            (SUBJECT, "subject"),
            (KIND, "kind"),
            (SCOPES, "scopes"),
            (SECRET, "secret"),
            (header::CACHE_CONTROL, "no-store"),
            (crate::request_id::REQUEST_ID, ""),
        ] {
            assert_eq!(headers[&name], value, "{name}");
        }
        assert_eq!(headers.len(), 7);
    }

    #[test]
    fn an_active_answer_is_the_json_serde_makes_of_the_introspection_response() {
        let names = [
            "ci",
            "",
            "quote \" and back\\slash",
            "tab\tnewline\ncontrol\u{1}\u{1f}",
            "ünïcødé ✓ 🔑",
        ];
        for username in names {
            for exp in [None, Some(1_900_000_000), Some(-5)] {
                let answer = ActiveAnswer {
                    token_type: "service_account",
                    scope: &HeaderValue::from_static("api_tokens:read billing/invoices:read *"),
                    sub: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
                    org_id: &HeaderValue::from_static("ffffffff-ffff-ffff-ffff-ffffffffffff"),
                    username,
                    exp,
                    iat: 1_700_000_000,
                    secret: "previous",
                };
                let expected = serde_json::to_vec(&IntrospectionResponse {
                    active: true,
                    token_type: Some(answer.token_type.to_string()),
                    scope: Some(answer.scope.to_str().unwrap().to_string()),
                    sub: Some(answer.sub.to_string()),
                    org_id: Some(answer.org_id.to_str().unwrap().to_string()),
                    username: Some(username.to_string()),
                    exp,
                    iat: Some(answer.iat),
                    secret: Some(answer.secret.to_string()),
                })
                .unwrap();
                assert_eq!(
                    String::from_utf8(answer.to_json().to_vec()).unwrap(),
                    String::from_utf8(expected).unwrap()
                );
            }
        }
    }

    #[test]
    fn a_form_field_is_read_as_form_urlencoded_decodes_it() {
        let cases: [(&[u8], Option<&str>); 14] = [
            (b"token=kp_abc", Some("kp_abc")),
            (b"a=1&token=first&token=second", Some("first")),
            (b"&&token=q&", Some("q")),
            (b"token", Some("")),
            (b"token=", Some("")),
            (b"tokens=1&xtoken=2", None),
            (b"", None),
            (b"token=a%2Bb%3D", Some("a+b=")),
            (b"token=a+b", Some("a b")),
            (b"%74oken=z", Some("z")),
            (b"token=\xff", Some("\u{fffd}")),
            (b"\xff=1&token=ok", Some("ok")),
            (b"token==a=b&token=c", Some("=a=b")),
            (b"x=\xff&token=t", Some("t")),
        ];
        for (body, expected) in cases {
            let oracle = form_urlencoded::parse(body)
                .find(|(key, _)| key == "token")
                .map(|(_, value)| value.into_owned());
            let found = form_field(body, "token");
            assert_eq!(
                found.as_deref(),
                expected,
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(found.map(Cow::into_owned), oracle);
        }
    }
}
