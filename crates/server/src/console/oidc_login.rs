//! "Sign in with <issuer>": OAuth 2.0 authorization code with PKCE (RFC 7636, S256) against the
//! configured `--oidc-issuer`. `state`, `nonce` and the code verifier stay on the server, under a
//! short-lived pending-login cookie; the code is exchanged on the back channel, and the access
//! token it yields is validated by the same `Verifier` as any API call, then sealed in the session
//! like a pasted token (its expiry bounds the session).

use super::session::{random_text, same_text, CookieValue, PendingLogin, PENDING_TTL};
use super::{html, set_cookie, ConsoleError, Html};
use crate::app::App;
use crate::error::AppError;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use data_encoding::BASE64URL_NOPAD;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pending_cookie_name(app: &App) -> &'static str {
    if app.inner().config.console.secure_cookies {
        "__Host-keyplane_oidc"
    } else {
        "keyplane_oidc"
    }
}

#[derive(Deserialize)]
struct Endpoints {
    authorization_endpoint: String,
    token_endpoint: String,
}

/// How long the issuer's discovery document is used before it is fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(300);
/// How long after a failed fetch sign-ins are refused without asking the issuer again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);

/// The console's view of its issuer: one HTTP client, and the discovery document for
/// [`DISCOVERY_TTL`]. Anyone may start a sign-in, so starting one must not cost a request to the
/// issuer each time; fetches happen one at a time, and a failure is remembered briefly.
#[derive(Default)]
pub(crate) struct IssuerEndpoints {
    http: std::sync::OnceLock<reqwest::Client>,
    found: tokio::sync::Mutex<Option<Fetched>>,
}

struct Fetched {
    at: Instant,
    endpoints: Option<Arc<Endpoints>>,
}

impl IssuerEndpoints {
    fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client with a TLS backend builds")
        })
    }

    /// The issuer's endpoints, fetched when the last fetch is older than its time to live.
    async fn of(&self, issuer: &str) -> Result<Arc<Endpoints>, ConsoleError> {
        let mut found = self.found.lock().await;
        if let Some(fetched) = found.as_ref() {
            let age = fetched.at.elapsed();
            match &fetched.endpoints {
                Some(endpoints) if age < DISCOVERY_TTL => return Ok(endpoints.clone()),
                None if age < DISCOVERY_RETRY => {
                    return Err(unavailable(
                        "discovery",
                        "the last fetch failed moments ago",
                    ))
                }
                _ => {}
            }
        }
        let fetched = discover(self.http(), issuer).await;
        *found = Some(Fetched {
            at: Instant::now(),
            endpoints: fetched.as_ref().ok().cloned(),
        });
        fetched
    }
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> ConsoleError {
    tracing::warn!(error = %error, "console sign-in with the issuer failed: {what}");
    ConsoleError::page(
        StatusCode::BAD_GATEWAY,
        "Signing in with the identity provider did not work. Try again, or sign in with a token.",
    )
}

async fn discover(http: &reqwest::Client, issuer: &str) -> Result<Arc<Endpoints>, ConsoleError> {
    let found: Endpoints = crate::oidc::discovery(http, issuer)
        .await
        .map_err(|e| unavailable("discovery", format!("{e:#}")))?;
    for endpoint in [&found.authorization_endpoint, &found.token_endpoint] {
        crate::oidc::check_url(endpoint).map_err(|e| unavailable("discovery", e))?;
    }
    Ok(Arc::new(found))
}

fn not_configured() -> ConsoleError {
    ConsoleError::page(
        StatusCode::NOT_FOUND,
        "Signing in with an identity provider is not configured here.",
    )
}

/// The host (and port) the browser asked for: `Host`, as HTTP/1.1 sends it, else the request
/// URI's authority, which is where hyper puts HTTP/2's `:authority` (browsers send no `Host`
/// over h2, which they use with native TLS). Only a plain host name or address is usable.
fn request_host<'r>(headers: &'r HeaderMap, uri: &'r Uri) -> Option<&'r str> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
}

/// The configured redirect URL, or this server's own callback under the host the browser used.
fn redirect_uri(
    app: &App,
    oidc: &super::ConsoleOidc,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<String, ConsoleError> {
    if let Some(url) = &oidc.redirect_url {
        return Ok(url.clone());
    }
    let host = request_host(headers, uri).ok_or_else(|| {
        ConsoleError::page(StatusCode::BAD_REQUEST, "The request names no usable host.")
    })?;
    let scheme = if app.inner().config.console.secure_cookies {
        "https"
    } else {
        "http"
    };
    Ok(format!("{scheme}://{host}/console/oidc/callback"))
}

/// How long a browser refused for [`sign_ins_busy`] is asked to wait: sign-ins under way end
/// within [`PENDING_TTL`], most far sooner.
const SIGN_INS_BUSY_RETRY_SECS: u64 = 30;

/// 503 while as many sign-ins are under way as are kept: the new one waits rather than end
/// someone else's.
fn sign_ins_busy() -> Response {
    ConsoleError::Page {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "Too many sign-ins are under way right now. Try again in a little while.".into(),
        details: Vec::new(),
        fields: Vec::new(),
        retry_after_secs: Some(SIGN_INS_BUSY_RETRY_SECS),
        cause: Some("too many sign-ins under way".into()),
    }
    .into_response()
}

#[derive(Deserialize)]
pub(super) struct StartQuery {
    /// The console page to go back to once signed in, as the token sign-in takes it.
    #[serde(default)]
    next: Option<String>,
}

pub(super) async fn start(
    State(app): State<App>,
    origin: crate::request_id::Origin,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<StartQuery>,
) -> Result<Response, ConsoleError> {
    let oidc = app
        .inner()
        .config
        .console
        .oidc
        .clone()
        .ok_or_else(not_configured)?;
    // Anyone may start a sign-in, and each may end in a code exchange at the issuer, whose rate
    // limits every user's sign-in shares: an address that starts too many waits.
    if let (Some(limiter), Some(client)) = (&app.inner().console_sign_in_limiter, origin.client) {
        limiter
            .check(client.limit_key())
            .map_err(|limited| ConsoleError::Page {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "Too many sign-ins were started from your address. Try again in a \
                          little while."
                    .into(),
                details: Vec::new(),
                fields: Vec::new(),
                retry_after_secs: limited.retry_after_secs(),
                cause: None,
            })?;
    }
    let issuer = &app.inner().console_issuer;
    let found = issuer.of(&oidc.issuer).await?;
    let login = PendingLogin {
        state: random_text(),
        nonce: random_text(),
        code_verifier: random_text(),
        started: Instant::now(),
        client: origin.client.map(|c| c.limit_key()),
        // Kept on the server with the login, so the issuer's round trip cannot change it.
        next: query
            .next
            .as_deref()
            .and_then(super::way_back)
            .map(str::to_string),
    };
    let redirect = redirect_uri(&app, &oidc, &headers, &uri)?;
    let challenge = BASE64URL_NOPAD.encode(&Sha256::digest(login.code_verifier.as_bytes()));
    let query = serde_urlencoded::to_string([
        ("response_type", "code"),
        ("client_id", oidc.client_id.as_str()),
        ("redirect_uri", redirect.as_str()),
        ("scope", oidc.scope.as_str()),
        ("state", login.state.as_str()),
        ("nonce", login.nonce.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ])
    .expect("text pairs encode");
    let separator = if found.authorization_endpoint.contains('?') {
        '&'
    } else {
        '?'
    };
    let cookie = CookieValue::fresh();
    if app
        .inner()
        .console_sessions
        .start_pending(&cookie, login)
        .is_err()
    {
        return Ok(sign_ins_busy());
    }
    let mut response = Redirect::to(&format!(
        "{}{separator}{query}",
        found.authorization_endpoint
    ))
    .into_response();
    // Lax: it must come back on the issuer's redirect, a cross-site navigation.
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            &app,
            pending_cookie_name(&app),
            &cookie.encode(),
            true,
            Some(PENDING_TTL.as_secs()),
        ),
    );
    Ok(response)
}

#[derive(Deserialize)]
pub(super) struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct IdClaims {
    iss: String,
    aud: serde_json::Value,
    nonce: Option<String>,
}

/// The ID token came straight from the token endpoint over the back channel, which OpenID
/// Connect Core §3.1.3.7 accepts in place of its signature; what is checked is that it answers
/// this login (`nonce`), from this issuer, for this client.
fn check_id_token(id_token: &str, issuer: &str, client_id: &str, nonce: &str) -> bool {
    let Some(payload) = id_token.split('.').nth(1) else {
        return false;
    };
    let Ok(bytes) = BASE64URL_NOPAD.decode(payload.trim_end_matches('=').as_bytes()) else {
        return false;
    };
    let Ok(claims) = serde_json::from_slice::<IdClaims>(&bytes) else {
        return false;
    };
    let audience_ok = match &claims.aud {
        serde_json::Value::String(aud) => aud == client_id,
        serde_json::Value::Array(auds) => auds.iter().any(|a| a.as_str() == Some(client_id)),
        _ => false,
    };
    claims.iss == issuer
        && audience_ok
        && claims.nonce.as_deref().is_some_and(|n| same_text(n, nonce))
}

pub(super) async fn callback(
    State(app): State<App>,
    origin: crate::request_id::Origin,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<CallbackQuery>,
) -> Result<Response, ConsoleError> {
    let oidc = app
        .inner()
        .config
        .console
        .oidc
        .clone()
        .ok_or_else(not_configured)?;
    let refused = |message: &str| ConsoleError::page(StatusCode::BAD_REQUEST, message);
    let cookie = super::read_cookie(&headers, pending_cookie_name(&app))
        .and_then(CookieValue::parse)
        .ok_or_else(|| {
            refused("This sign-in was not started here, or it took too long. Start again.")
        })?;
    let login = app
        .inner()
        .console_sessions
        .take_pending(&cookie)
        .ok_or_else(|| {
            refused("This sign-in was not started here, or it took too long. Start again.")
        })?;
    if query.error.is_some() {
        return Err(refused("The identity provider did not sign you in."));
    }
    let (Some(code), Some(state)) = (query.code, query.state) else {
        return Err(refused("The identity provider's answer is incomplete."));
    };
    if !same_text(&state, &login.state) {
        return Err(refused(
            "This answer belongs to another sign-in. Start again.",
        ));
    }
    let redirect = redirect_uri(&app, &oidc, &headers, &uri)?;
    let issuer = &app.inner().console_issuer;
    let found = issuer.of(&oidc.issuer).await?;
    let response = issuer
        .http()
        .post(&found.token_endpoint)
        .header(header::ACCEPT, "application/json")
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect.as_str()),
            ("client_id", oidc.client_id.as_str()),
            ("code_verifier", login.code_verifier.as_str()),
        ])
        .send()
        .await
        .map_err(|e| unavailable("token exchange", e))?;
    if !response.status().is_success() {
        return Err(unavailable("token exchange", response.status()));
    }
    let tokens: TokenResponse = response
        .json()
        .await
        .map_err(|e| unavailable("token exchange", e))?;
    if let Some(id_token) = &tokens.id_token {
        if !check_id_token(id_token, &oidc.issuer, &oidc.client_id, &login.nonce) {
            return Err(refused(
                "The identity provider's ID token does not match this sign-in.",
            ));
        }
    }
    // An access token (a JWT) never reaches the canary path; the description is for form's sake.
    let at = || {
        crate::canary::Presentation::of_request(
            crate::canary::CanarySurface::Console,
            "GET /console/oidc/callback".into(),
            &headers,
            &origin,
        )
    };
    let who = match super::authenticate(&app, &tokens.access_token, &at).await {
        Ok(who) => who,
        Err(AppError::Unauthenticated(reason)) => {
            tracing::info!(
                reason,
                "console sign-in: the issuer's access token was refused"
            );
            return Err(ConsoleError::page(
                StatusCode::UNAUTHORIZED,
                "The identity provider's access token was not accepted here (wrong audience, \
                 or expired).",
            ));
        }
        Err(other) => return Err(other.into()),
    };
    let context = crate::audit::request_context_of(&headers, &origin);
    let to = login
        .next
        .as_deref()
        .and_then(super::way_back)
        .unwrap_or("/console");
    let mut response = super::start_session(
        &app,
        &who,
        &tokens.access_token,
        "oidc",
        &context,
        super::remembered_organization(&app, &headers),
        to,
    )
    .await?;
    if response.status().is_redirection() {
        // The issuer's redirect is a cross-site navigation, after which a browser does not send
        // a SameSite=Strict cookie on a redirect either; a page that continues from this origin
        // does.
        let set_cookies: Vec<_> = response
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        let page = format!(
            "<p>You are signed in. <a href=\"{}\" data-continue data-autofocus>Continue to the \
             console</a>.</p>",
            html::esc(to)
        );
        response = (Html(html::bare_page("Signed in", false, &page)),).into_response();
        for cookie in set_cookies {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
    }
    response.headers_mut().append(
        header::SET_COOKIE,
        super::clear_cookie(&app, pending_cookie_name(&app)),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, Request, Version};

    fn host_of(request: &Request<()>) -> Option<&str> {
        request_host(request.headers(), request.uri())
    }

    #[test]
    fn the_host_comes_from_the_host_header() {
        let request = Request::get("/console/oidc/start")
            .header(header::HOST, "console.example:8443")
            .body(())
            .unwrap();
        assert_eq!(host_of(&request), Some("console.example:8443"));
    }

    /// HTTP/2 carries the host as `:authority`, which hyper puts in the request URI; it sends no
    /// `Host` header.
    #[test]
    fn over_http2_the_host_comes_from_the_authority() {
        let request = Request::get("https://console.example:8443/console/oidc/start")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(request.headers().get(header::HOST).is_none());
        assert_eq!(host_of(&request), Some("console.example:8443"));
        let v6 = Request::get("https://[::1]:8443/console/oidc/callback?code=c")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert_eq!(host_of(&v6), Some("[::1]:8443"));
    }

    #[test]
    fn an_unusable_host_is_refused_wherever_it_comes_from() {
        let none = Request::get("/console/oidc/start").body(()).unwrap();
        assert_eq!(host_of(&none), None);
        let mut odd = Request::get("/console/oidc/start").body(()).unwrap();
        odd.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("evil.example/path"));
        assert_eq!(host_of(&odd), None);
        let user = Request::get("https://user@console.example/console/oidc/start")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert_eq!(host_of(&user), None);
    }
}
