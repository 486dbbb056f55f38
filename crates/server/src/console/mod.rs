//! `/console`: the web console, served by `keyplane serve` itself. Server-rendered HTML with forms;
//! the stylesheet and a small script are compiled in (`assets`), nothing comes from another host.
//!
//! Every page acts as the signed-in principal through the same `ops::*` use cases as the APIs, so
//! the console has no policy of its own. A session (`session`) is server-side: the browser holds
//! a random `HttpOnly`, `SameSite=Strict` cookie (`__Host-` and `Secure` over https); the token it
//! signed in with is sealed under a key derived from that cookie and verified on every request, so
//! revoking or suspending it ends the session at once. Every POST carries the session's CSRF
//! token. Responses carry a strict Content-Security-Policy (no inline script or style) and
//! `Cache-Control: no-store` (set for every route by `router`), so a one-time secret is gone on
//! reload and on back navigation.

pub(crate) mod assets;
mod html;
mod oidc_login;
mod pages;
pub(crate) mod session;
mod webhook_pages;

use crate::app::App;
use crate::error::AppError;
use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use keyplane_core::{
    AuditActor, Capability, CredentialId, CredentialKind, Error as DomainError, PathSegment,
    Principal, RequestContext, TenantId,
};
use session::{random_text, same_text, CookieValue};
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::set_header::SetResponseHeaderLayer;

pub(crate) use oidc_login::IssuerEndpoints;
pub(crate) use session::Sessions;

/// How the console is offered (`keyplane serve --console…`).
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// `--console=false` turns `/console` off entirely.
    pub enabled: bool,
    /// The console is reached over https (directly or through a TLS proxy): cookies get `Secure`
    /// and the `__Host-` prefix, and responses `Strict-Transport-Security`.
    pub secure_cookies: bool,
    /// A session unused this long ends.
    pub idle_timeout: Duration,
    /// A session ends this long after sign-in, however busy.
    pub absolute_timeout: Duration,
    /// "Sign in with <issuer>": OAuth 2.0 authorization code with PKCE.
    pub oidc: Option<ConsoleOidc>,
    /// "Sign in with <issuer>" sign-ins one client address may start per minute (each may cost
    /// a code exchange at the issuer, whose rate limits every user's sign-in shares); 0 turns
    /// the limit off.
    pub oidc_sign_ins_per_minute: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            secure_cookies: false,
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(12 * 3600),
            oidc: None,
            oidc_sign_ins_per_minute: 10,
        }
    }
}

/// The console's OAuth client at one of the `--oidc-issuer`s.
#[derive(Debug, Clone)]
pub struct ConsoleOidc {
    pub issuer: String,
    pub client_id: String,
    /// Where the issuer sends the browser back: `<console URL>/console/oidc/callback`; `None`:
    /// built from the request's `Host` (over HTTP/2, its `:authority`; the issuer accepts only the
    /// redirect URIs registered for the client, so a forged host only makes the sign-in fail).
    pub redirect_url: Option<String>,
    /// The `scope` asked for: `openid` and whatever the issuer needs to put this server's
    /// audience in the access token.
    pub scope: String,
}

impl ConsoleOidc {
    pub fn new(
        issuer: String,
        client_id: String,
        redirect_url: Option<String>,
        scope: String,
    ) -> Result<Self, String> {
        if let Some(url) = &redirect_url {
            crate::oidc::check_url(url).map_err(|e| format!("the redirect URL {e}"))?;
            if !url.ends_with("/console/oidc/callback") {
                return Err("the redirect URL must end with /console/oidc/callback".into());
            }
        }
        if client_id.trim().is_empty() {
            return Err("the client id is empty".into());
        }
        Ok(Self {
            issuer,
            client_id,
            redirect_url,
            scope,
        })
    }
}

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; form-action 'self'; \
                   base-uri 'none'; object-src 'none'";

/// Browsers keep to https for a year once they saw the console there (RFC 6797); not
/// `includeSubDomains`: the console cannot know what else its domain serves.
const HSTS: &str = "max-age=31536000";

/// The console's routes; `config` says whether it is reached over https (then it asks browsers
/// to keep to https: `Strict-Transport-Security`).
pub(crate) fn routes(config: &ConsoleConfig) -> Router<App> {
    let https = config.secure_cookies.then(|| {
        SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        )
    });
    let headers = ServiceBuilder::new()
        .option_layer(https)
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ));
    Router::new()
        .route("/console", get(pages::overview))
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route("/console/login", get(sign_in_page).post(sign_in))
        .route("/console/logout", post(sign_out))
        .route("/console/organization", post(switch_organization))
        .route("/console/oidc/start", get(oidc_login::start))
        .route("/console/oidc/callback", get(oidc_login::callback))
        .route("/console/assets/{name}", get(assets::serve))
        .route(
            "/console/api-tokens",
            get(pages::api_tokens).post(pages::create_api_token),
        )
        .route(
            "/console/service-accounts",
            get(pages::service_accounts).post(pages::create_service_account),
        )
        .route(
            "/console/registry",
            get(pages::registry).post(pages::enable_registry),
        )
        .route(
            "/console/service-accounts/{id}/grants",
            post(pages::create_grant),
        )
        .route("/console/grants/{id}/revoke", post(pages::revoke_grant))
        .route("/console/robots", post(pages::create_robot))
        .route(
            "/console/robots/{id}/permissions",
            get(pages::robot_permissions_page).post(pages::update_robot_permissions),
        )
        .route("/console/api-tokens/{id}", get(pages::detail_page))
        .route("/console/service-accounts/{id}", get(pages::detail_page))
        .route("/console/robots/{id}", get(pages::detail_page))
        .route(
            "/console/api-tokens/{id}/rotate",
            get(pages::rotate_page).post(pages::rotate),
        )
        .route(
            "/console/api-tokens/{id}/revoke",
            get(pages::revoke_page).post(pages::revoke),
        )
        .route(
            "/console/service-accounts/{id}/rotate",
            get(pages::rotate_page).post(pages::rotate),
        )
        .route(
            "/console/service-accounts/{id}/revoke",
            get(pages::revoke_page).post(pages::revoke),
        )
        .route(
            "/console/robots/{id}/rotate",
            get(pages::rotate_page).post(pages::rotate),
        )
        .route(
            "/console/robots/{id}/revoke",
            get(pages::revoke_page).post(pages::revoke),
        )
        .route("/console/secret", get(pages::secret))
        .route("/console/session", get(pages::keep_alive))
        .route("/console/audit", get(pages::audit))
        .route(
            "/console/webhooks",
            get(webhook_pages::list).post(webhook_pages::create),
        )
        .route(
            "/console/webhooks/{id}",
            get(webhook_pages::edit_page).post(webhook_pages::update),
        )
        .route(
            "/console/webhooks/{id}/rotate",
            get(webhook_pages::rotate_page).post(webhook_pages::rotate),
        )
        .route(
            "/console/webhooks/{id}/delete",
            get(webhook_pages::delete_page).post(webhook_pages::delete),
        )
        .route(
            "/console/webhooks/{id}/deliveries",
            get(webhook_pages::deliveries),
        )
        .route(
            "/console/webhooks/{id}/deliveries/{delivery}/retry",
            post(webhook_pages::retry),
        )
        .route("/console/{*rest}", get(not_found).post(not_found))
        .layer(axum::middleware::from_fn(back_to_the_form))
        .layer(headers)
}

/// The page holding the form a POST to `path` comes from, for its error page's link back
/// (browsers send the console no `Referer`: its pages ask for none). `None`: the overview.
fn form_page(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/console/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    // Only ids are echoed back into the link.
    let id = |raw: &str| uuid::Uuid::parse_str(raw).is_ok();
    Some(match segments.as_slice() {
        ["login"] => "/console/login".into(),
        [list @ ("api-tokens" | "service-accounts" | "webhooks")] => {
            format!("/console/{list}#create")
        }
        ["registry"] => "/console/registry".into(),
        ["robots"] => "/console/registry#create".into(),
        ["service-accounts", account, "grants"] if id(account) => {
            "/console/service-accounts".into()
        }
        ["grants", grant, "revoke"] if id(grant) => "/console/service-accounts".into(),
        ["api-tokens" | "service-accounts" | "robots", credential, "rotate" | "revoke" | "permissions"]
            if id(credential) =>
        {
            path.into()
        }
        ["webhooks", webhook] if id(webhook) => path.into(),
        ["webhooks", webhook, "rotate" | "delete"] if id(webhook) => path.into(),
        ["webhooks", webhook, "deliveries", delivery, "retry"] if id(webhook) && id(delivery) => {
            format!("/console/webhooks/{webhook}/deliveries")
        }
        _ => return None,
    })
}

/// A form refused (a field to correct, a name taken, a stale CSRF token): its error page links
/// back to the form rather than to the overview. Not a 404 (the thing the form was about is
/// gone) nor a server error.
async fn back_to_the_form(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let signed_in = SignedIn::default();
    request.extensions_mut().insert(signed_in.clone());
    let post = request.method() == axum::http::Method::POST;
    let form = post.then(|| form_page(request.uri().path())).flatten();
    // Where a sign-in this request is sent to leads back to: the page, or the form posted from.
    let back = if post {
        form.clone()
    } else {
        request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
    };
    let response = next.run(request).await;
    if let Some(needed) = response.extensions().get::<SignInNeeded>().copied() {
        return to_sign_in(needed, back.as_deref());
    }
    let Some(page) = response.extensions().get::<ErrorPage>().cloned() else {
        return response;
    };
    let status = response.status();
    let (back, back_label) = match form {
        Some(form) if status.is_client_error() && status != StatusCode::NOT_FOUND => {
            (form, "Back to the form")
        }
        _ => ("/console".to_string(), "Back to the console"),
    };
    let console = signed_in.0.lock().ok().and_then(|mut slot| slot.take());
    let body = match &console {
        Some(console) => page.render_signed_in(console, &back, back_label).await,
        None => None,
    };
    let body = match body {
        Some(body) => body,
        None if back_label == "Back to the form" => page.render(&back, back_label),
        None => return response,
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// A request that needs a (new) sign-in: `ended` when it came with a session that has ended
/// (timed out, signed out elsewhere, or its credential refused), kept on its redirect for
/// [`back_to_the_form`].
#[derive(Clone, Copy)]
struct SignInNeeded {
    ended: bool,
}

/// The sign-in page, saying so when a session `ended`, and leading back to `back` after it.
fn to_sign_in(needed: SignInNeeded, back: Option<&str>) -> Response {
    let mut query = Vec::new();
    if let Some(back) = back.and_then(way_back) {
        if back != "/console" {
            query.push(("next", back));
        }
    }
    if needed.ended {
        query.push(("ended", "1"));
    }
    let location = match serde_urlencoded::to_string(&query) {
        Ok(encoded) if !encoded.is_empty() => format!("/console/login?{encoded}"),
        _ => "/console/login".to_string(),
    };
    Redirect::to(&location).into_response()
}

/// `raw` when it is a console page to go back to after signing in: a path of this console only
/// (never another host's: no `//`, no backslash, nothing but visible ASCII), not a sign-in or
/// sign-out route, nor the one-time secret page (whose secrets went with the session).
fn way_back(raw: &str) -> Option<&str> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    let console_page = path == "/console" || path.starts_with("/console/");
    let excluded = [
        "/console/login",
        "/console/logout",
        "/console/oidc/",
        "/console/secret",
        "/console/session",
    ]
    .iter()
    .any(|prefix| path.starts_with(prefix));
    let plain = raw.len() <= 2000
        && raw.bytes().all(|b| b.is_ascii_graphic())
        && !raw.contains("//")
        && !raw.contains('\\');
    // A browser resolves dot segments (`/console/x/../secret`, `%2e%2e` too) before it asks: the
    // checks above would judge a path other than the one it goes to.
    let no_dot_segments = path.split('/').all(|segment| {
        let segment = segment.to_ascii_lowercase().replace("%2e", ".");
        segment != "." && segment != ".."
    });
    (console_page && !excluded && plain && no_dot_segments).then_some(raw)
}

/// What an error page says, kept on its response for [`back_to_the_form`].
#[derive(Clone)]
struct ErrorPage {
    title: &'static str,
    message: String,
    details: Vec<String>,
}

impl ErrorPage {
    /// The page outside a session (bare layout).
    fn render(&self, back: &str, back_label: &str) -> String {
        html::bare_page(self.title, true, &self.main(back, back_label))
    }

    /// The page inside the signed-in `console`'s layout, with its navigation; `None` when the
    /// layout cannot be read (the store failing): the bare page then.
    async fn render_signed_in(
        &self,
        console: &Console,
        back: &str,
        back_label: &str,
    ) -> Option<String> {
        let mut frame = console.frame("").await.ok()?;
        frame.refused = true;
        Some(
            console
                .render(frame, self.title, &self.main(back, back_label))
                .0,
        )
    }

    fn main(&self, back: &str, back_label: &str) -> String {
        let mut body = format!(
            "<div class=\"error\" role=\"alert\"><p>{}</p>",
            html::esc(&self.message)
        );
        if !self.details.is_empty() {
            body.push_str("<ul>");
            for detail in &self.details {
                body.push_str(&format!("<li>{}</li>", html::esc(detail)));
            }
            body.push_str("</ul>");
        }
        body.push_str(&format!(
            "</div><p><a href=\"{}\" data-autofocus>{back_label}</a></p>",
            html::esc(back)
        ));
        body
    }
}

/// Where the signed-in console of a request is left for [`back_to_the_form`], so that an error
/// page keeps the console's layout (without the session's pending notice, which stays for the
/// next page).
#[derive(Clone, Default)]
struct SignedIn(std::sync::Arc<std::sync::Mutex<Option<Console>>>);

/// Path parameters. One that is not UTF-8 once decoded (`/console/api-tokens/%FF/rotate`) names
/// nothing here: the not-found page, where axum's `Path` answers a plain-text 400.
pub(crate) struct Path<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ConsoleError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(params)| Self(params))
            .map_err(|_| no_such_page())
    }
}

/// The console's 404: for an unknown path, and for a known one naming nothing.
pub(crate) fn no_such_page() -> ConsoleError {
    ConsoleError::page(StatusCode::NOT_FOUND, "There is no such page.")
}

/// A path under `/console` that is no page. Signed in, the 404 in the console's layout (filled
/// in by [`back_to_the_form`]); signed out, not the sign-in redirect of a page that exists but a
/// plain 404 offering to sign in. The answer names nothing from the path, so no id in it (an
/// organization's, say) is told apart from another.
async fn not_found(signed_in: Result<Console, ConsoleError>) -> Response {
    match signed_in {
        Ok(_) => no_such_page().into_response(),
        Err(ConsoleError::SignIn | ConsoleError::SessionEnded) => {
            let page = ErrorPage {
                title: "Not Found",
                message: "There is no such page.".into(),
                details: Vec::new(),
            };
            (
                StatusCode::NOT_FOUND,
                Html(page.render("/console/login", "Sign in")),
            )
                .into_response()
        }
        // The store failing, a rate limit: their own page.
        Err(other) => other.into_response(),
    }
}

// ------------------------------------------------------------------------------------------------
// Cookies

/// The `Set-Cookie` of a new session.
fn session_cookie(app: &App, cookie: &CookieValue) -> HeaderValue {
    set_cookie(app, session_cookie_name(app), &cookie.encode(), false, None)
}

fn session_cookie_name(app: &App) -> &'static str {
    if app.inner().config.console.secure_cookies {
        "__Host-keyplane_session"
    } else {
        "keyplane_session"
    }
}

/// The cookie naming the organization a user last switched to, which their next sign-in opens
/// (an id, not a secret; `Lax` so that it comes back on the issuer's redirect of an OIDC sign-in).
fn organization_cookie_name(app: &App) -> &'static str {
    if app.inner().config.console.secure_cookies {
        "__Host-keyplane_org"
    } else {
        "keyplane_org"
    }
}

/// How long a browser remembers the organization last switched to (400 days, browsers' cap).
const REMEMBERED_ORGANIZATION_SECS: u64 = 400 * 24 * 3600;

/// The organization the browser remembers, read from `headers`.
fn remembered_organization(app: &App, headers: &HeaderMap) -> Option<TenantId> {
    read_cookie(headers, organization_cookie_name(app)).and_then(TenantId::parse)
}

fn login_cookie_name(app: &App) -> &'static str {
    if app.inner().config.console.secure_cookies {
        "__Host-keyplane_login"
    } else {
        "keyplane_login"
    }
}

fn read_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// A `Set-Cookie` value. `SameSite=Strict` unless `lax` (the pending-login cookie must come back
/// on the issuer's redirect, a cross-site navigation).
fn set_cookie(app: &App, name: &str, value: &str, lax: bool, max_age: Option<u64>) -> HeaderValue {
    let mut cookie = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite={}",
        if lax { "Lax" } else { "Strict" }
    );
    if app.inner().config.console.secure_cookies {
        cookie.push_str("; Secure");
    }
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&cookie).expect("cookie names and base64url values are header-safe")
}

fn clear_cookie(app: &App, name: &str) -> HeaderValue {
    set_cookie(app, name, "", false, Some(0))
}

// ------------------------------------------------------------------------------------------------
// Errors

/// What a console request ends with when it does not succeed: back to sign-in, or a message page
/// (never a stack trace; causes go to the log).
pub(crate) enum ConsoleError {
    /// Not signed in.
    SignIn,
    /// The session ended (timed out, signed out elsewhere, its credential refused).
    SessionEnded,
    Page {
        status: StatusCode,
        message: String,
        details: Vec<String>,
        /// The refused fields behind `details`, for a form to show again with each problem at its
        /// field.
        fields: Vec<RefusedField>,
        /// The `Retry-After` of a refusal that passes (429, 503), as the APIs send it.
        retry_after_secs: Option<u64>,
        /// For the request log (never shown): a server error's cause, so the log line says
        /// the request failed, as the APIs' do.
        cause: Option<String>,
    },
}

impl ConsoleError {
    pub(crate) fn page(status: StatusCode, message: &str) -> Self {
        Self::Page {
            status,
            message: message.into(),
            details: Vec::new(),
            fields: Vec::new(),
            retry_after_secs: None,
            cause: None,
        }
    }

    /// The problems of a refused form whose fields are `fields` (the body key, the id of its
    /// element, its label), to show the form again with each at its field; `None` when the
    /// refusal is not about those fields (it gets its own page). A name taken by a live
    /// credential is the name field's problem.
    pub(crate) fn problems(
        &self,
        fields: &[(&str, &str, &str)],
    ) -> Option<Vec<html::FieldProblem>> {
        let ConsoleError::Page {
            status,
            message,
            fields: refused,
            ..
        } = self
        else {
            return None;
        };
        let field = |key: &str| fields.iter().find(|(k, _, _)| *k == key);
        if *status == StatusCode::CONFLICT && message.contains("with this name") {
            let (_, id, label) = field("name")?;
            return Some(vec![html::FieldProblem {
                field: (*id).to_string(),
                label: (*label).to_string(),
                message: message.clone(),
            }]);
        }
        if *status != StatusCode::UNPROCESSABLE_ENTITY || refused.is_empty() {
            return None;
        }
        refused
            .iter()
            .map(|refused| {
                let (_, id, label) = field(&refused.key)?;
                let message = if refused.at.is_empty() {
                    refused.message.clone()
                } else {
                    format!("{}: {}", refused.at, refused.message)
                };
                Some(html::FieldProblem {
                    field: (*id).to_string(),
                    label: (*label).to_string(),
                    message,
                })
            })
            .collect()
    }

    fn csrf() -> Self {
        Self::page(
            StatusCode::FORBIDDEN,
            "This form did not come from this console session (the CSRF check failed). Reload \
             the page and try again.",
        )
    }
}

/// A refused field: the form key it came in (`scopes`), where in it (`#2`), and what was wrong.
#[derive(Clone)]
pub(crate) struct RefusedField {
    key: String,
    at: String,
    message: String,
}

impl RefusedField {
    fn of(error: &keyplane_core::FieldError) -> Self {
        let mut segments = error.path.segments.iter();
        let key = match segments.next() {
            Some(PathSegment::Key(key)) => key.clone(),
            _ => String::new(),
        };
        let at = segments
            .map(|segment| match segment {
                PathSegment::Key(key) => key.replace('_', " "),
                PathSegment::Index(i) => format!("#{}", i + 1),
            })
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            key,
            at,
            message: error.message.clone(),
        }
    }
}

fn field_name(path: &keyplane_core::FieldPath) -> String {
    path.segments
        .iter()
        .map(|segment| match segment {
            PathSegment::Key(key) => key.replace('_', " "),
            PathSegment::Index(i) => format!("#{}", i + 1),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl From<AppError> for ConsoleError {
    fn from(error: AppError) -> Self {
        match error {
            AppError::Unauthenticated(_) => ConsoleError::SignIn,
            AppError::Domain(DomainError::Validation(fields)) => ConsoleError::Page {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: "Some fields need another look.".into(),
                details: fields
                    .iter()
                    .map(|f| format!("{}: {}", field_name(&f.path), f.message))
                    .collect(),
                fields: fields.iter().map(RefusedField::of).collect(),
                retry_after_secs: None,
                cause: None,
            },
            other => {
                let status = other.status();
                let cause = status.is_server_error().then(|| other.to_string());
                let message = match &other {
                    AppError::Domain(DomainError::NotFound) => {
                        "Not found: it does not exist, or you may not see it.".to_string()
                    }
                    AppError::Domain(DomainError::Forbidden(message)) => {
                        format!("You may not do this: {message}.")
                    }
                    other => {
                        let mut text = other.public_message();
                        if let Some(first) = text.get_mut(..1) {
                            first.make_ascii_uppercase();
                        }
                        format!("{text}.")
                    }
                };
                ConsoleError::Page {
                    status,
                    message,
                    details: Vec::new(),
                    fields: Vec::new(),
                    retry_after_secs: other.retry_after_secs(),
                    cause,
                }
            }
        }
    }
}

impl From<DomainError> for ConsoleError {
    fn from(error: DomainError) -> Self {
        AppError::from(error).into()
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        match self {
            ConsoleError::SignIn | ConsoleError::SessionEnded => {
                let ended = matches!(self, ConsoleError::SessionEnded);
                let mut response = Redirect::to("/console/login").into_response();
                response.extensions_mut().insert(SignInNeeded { ended });
                response
            }
            ConsoleError::Page {
                status,
                message,
                details,
                retry_after_secs,
                cause,
                ..
            } => {
                let page = ErrorPage {
                    title: status.canonical_reason().unwrap_or("Error"),
                    message,
                    details,
                };
                let body = page.render("/console", "Back to the console");
                let mut response = (status, Html(body)).into_response();
                response.extensions_mut().insert(page);
                if let Some(cause) = cause {
                    response
                        .extensions_mut()
                        .insert(crate::error::ErrorCause(cause));
                }
                if let Some(seconds) = retry_after_secs {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                }
                response
            }
        }
    }
}

/// An HTML response.
pub(crate) struct Html(pub String);

impl IntoResponse for Html {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            self.0,
        )
            .into_response()
    }
}

// ------------------------------------------------------------------------------------------------
// The signed-in request

/// A request of a signed-in browser: the principal (verified now, from the sealed token), its
/// tenant and the session's CSRF token.
#[derive(Clone)]
pub(crate) struct Console {
    pub app: App,
    pub who: Principal,
    pub tenant: TenantId,
    pub label: String,
    pub csrf: String,
    pub cookie: CookieValue,
    pub context: RequestContext,
    /// The one-time notice the session held when this request began.
    pub notice: Option<String>,
    /// The token the session acts with, and the session's end (to move it to another
    /// organization).
    token: String,
    ends_at: chrono::DateTime<chrono::Utc>,
}

impl FromRequestParts<App> for Console {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ConsoleError> {
        let cookie = read_cookie(&parts.headers, session_cookie_name(app))
            .and_then(CookieValue::parse)
            .ok_or(ConsoleError::SignIn)?;
        let sessions = &app.inner().console_sessions;
        let session = sessions
            .touch(app, &cookie)
            .await?
            .ok_or(ConsoleError::SessionEnded)?;
        let parts_read: &Parts = parts;
        let at = || presentation(parts_read);
        let who = match authenticate(app, &session.token, &at).await {
            Ok(who) => who,
            Err(AppError::Unauthenticated(_)) => {
                // Revoked, suspended or expired since sign-in: the session ends with it.
                let context = crate::audit::request_context(&parts.headers, &parts.extensions);
                let ending = session::Ending {
                    tenant: session.tenant,
                    label: &session.who,
                    recorded: session::Recorded::end(
                        AuditActor::system(),
                        &context,
                        "credential_refused",
                    ),
                };
                sessions.end(app, &cookie, Some(ending)).await?;
                return Err(ConsoleError::SessionEnded);
            }
            Err(other) => return Err(other.into()),
        };
        // A refusal below is recorded as the API's are (`access.denied`), in the session's
        // organization.
        if let Some(slot) = parts.extensions.get::<crate::audit::CallerSlot>() {
            slot.set_in(&who, session.tenant);
        }
        let console = Self {
            app: app.clone(),
            who,
            tenant: session.tenant,
            label: session.who,
            csrf: cookie.csrf(),
            cookie,
            notice: session.notice,
            token: session.token,
            ends_at: session.ends_at,
            context: crate::audit::request_context(&parts.headers, &parts.extensions),
        };
        if let Some(SignedIn(slot)) = parts.extensions.get::<SignedIn>() {
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(Console {
                    notice: None,
                    ..console.clone()
                });
            }
        }
        Ok(console)
    }
}

/// The console authenticates exactly as the management API does: the same verifier, the same
/// rate limit.
/// A canary token pasted here is refused as a revoked one and recorded (`surface` `console`).
async fn authenticate(
    app: &App,
    token: &str,
    at: crate::canary::Presented<'_>,
) -> Result<Principal, AppError> {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| AppError::Unauthenticated("malformed token"))?;
    headers.insert(header::AUTHORIZATION, value);
    // What it creates records that it came through the console.
    let who = app.authenticate_management(&headers, at).await?;
    Ok(who.through(keyplane_core::Channel::Console))
}

/// Describes a console request for a canary's trigger.
fn presentation(parts: &Parts) -> crate::canary::Presentation {
    crate::canary::Presentation::of_parts(crate::canary::CanarySurface::Console, parts)
}

/// A submitted form, its CSRF token checked.
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A trimmed, non-empty value.
    pub(crate) fn text(&self, key: &str) -> Option<&str> {
        self.get(key).map(str::trim).filter(|v| !v.is_empty())
    }

    /// The form to show again with `problems` (without its CSRF token: the page has its own).
    pub(crate) fn refill(&self, problems: Vec<html::FieldProblem>) -> html::Refill {
        html::Refill {
            values: self
                .0
                .iter()
                .filter(|(k, _)| k != "csrf")
                .cloned()
                .collect(),
            problems,
        }
    }

    pub(crate) fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn parse_form(body: &Bytes, csrf: &str) -> Result<Form, ConsoleError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| ConsoleError::page(StatusCode::BAD_REQUEST, "The form could not be read."))?;
    let form = Form(pairs);
    match form.get("csrf") {
        Some(sent) if same_text(sent, csrf) => Ok(form),
        _ => Err(ConsoleError::csrf()),
    }
}

impl Console {
    /// The submitted form, refused (403) unless it carries this session's CSRF token.
    pub(crate) fn form(&self, body: &Bytes) -> Result<Form, ConsoleError> {
        parse_form(body, &self.csrf)
    }

    pub(crate) fn may(&self, capability: Capability) -> bool {
        self.who
            .rights_in(self.tenant)
            .is_some_and(|rights| rights.grants(capability))
    }

    /// The layout around a page: navigation for what this principal may see, and a pending notice.
    pub(crate) async fn frame(&self, current: &'static str) -> Result<FrameData, ConsoleError> {
        let tenant_name = self
            .app
            .store()
            .get_tenant(self.tenant)
            .await
            .map_err(AppError::from)?
            .map_or_else(|| self.tenant.to_string(), |t| t.name);
        let mut nav = vec![html::NavItem {
            href: "/console",
            label: "Overview",
        }];
        let entries = [
            (
                Capability::ApiTokensRead,
                "/console/api-tokens",
                "API tokens",
            ),
            (
                Capability::AuthManage,
                "/console/service-accounts",
                "Service accounts",
            ),
            (Capability::RegistryRead, "/console/registry", "Registry"),
            (Capability::AuditRead, "/console/audit", "Audit log"),
            (Capability::WebhooksManage, webhook_pages::LIST, "Webhooks"),
        ];
        for (capability, href, label) in entries {
            if self.may(capability) {
                nav.push(html::NavItem { href, label });
            }
        }
        // A user may hold rights in several organizations (at most a page of them is offered).
        let mut other_tenants = Vec::new();
        for (tenant, _) in self.who.tenants().iter().take(50) {
            if *tenant == self.tenant {
                continue;
            }
            if let Some(found) = self
                .app
                .store()
                .get_tenant(*tenant)
                .await
                .map_err(AppError::from)?
            {
                other_tenants.push((tenant.as_uuid(), found.name));
            }
        }
        if self.notice.is_some() {
            self.app
                .inner()
                .console_sessions
                .set_notice(&self.app, &self.cookie, None)
                .await?;
        }
        Ok(FrameData {
            tenant_name,
            other_tenants,
            nav,
            current,
            notice: self.notice.clone(),
            refused: false,
        })
    }

    /// Renders a signed-in page.
    pub(crate) fn render(&self, frame: FrameData, title: &str, body: &str) -> Html {
        Html(html::page(
            &html::Frame {
                who: &self.label,
                tenant_name: &frame.tenant_name,
                other_tenants: &frame.other_tenants,
                csrf: &self.csrf,
                nav: frame.nav,
                current: frame.current,
                notice: frame.notice,
                refused: frame.refused,
                idle: self.app.inner().config.console.idle_timeout,
                ends_at: self.ends_at,
            },
            title,
            body,
        ))
    }

    /// Redirects (303) to `to`, showing `notice` there.
    pub(crate) async fn done(&self, to: &str, notice: String) -> Result<Response, ConsoleError> {
        self.app
            .inner()
            .console_sessions
            .set_notice(&self.app, &self.cookie, Some(&notice))
            .await?;
        Ok(Redirect::to(to).into_response())
    }
}

pub(crate) struct FrameData {
    tenant_name: String,
    other_tenants: Vec<(uuid::Uuid, String)>,
    nav: Vec<html::NavItem>,
    current: &'static str,
    notice: Option<String>,
    /// The page shows a refused form again.
    pub refused: bool,
}

// ------------------------------------------------------------------------------------------------
// Sign-in and sign-out

#[derive(serde::Deserialize)]
pub(crate) struct SignInQuery {
    #[serde(default)]
    signed_out: Option<String>,
    /// The session ended: the page says so.
    #[serde(default)]
    ended: Option<String>,
    /// The console page to go back to once signed in.
    #[serde(default)]
    next: Option<String>,
}

/// What the sign-in page says above its form, and where a sign-in leads.
#[derive(Default)]
struct SignInState<'a> {
    signed_out: bool,
    ended: bool,
    next: Option<&'a str>,
}

async fn sign_in_page(
    axum::extract::State(app): axum::extract::State<App>,
    axum::extract::Query(query): axum::extract::Query<SignInQuery>,
    headers: HeaderMap,
) -> Response {
    let held = read_cookie(&headers, login_cookie_name(&app));
    let state = SignInState {
        signed_out: query.signed_out.is_some(),
        ended: query.ended.is_some(),
        next: query.next.as_deref().and_then(way_back),
    };
    sign_in_form(&app, held, &state, None, StatusCode::OK)
}

/// The sign-in page, with a pre-session CSRF token in a cookie and in the form (a login form is a
/// target for CSRF too: it would sign a victim in as the attacker). The token the browser `held`
/// is kept when it is one of ours, so that every sign-in form open in the browser's tabs still
/// works; else a fresh one.
/// A refusal (`error`) is the token field's: announced, and read as its description, with the
/// focus back in it.
fn sign_in_form(
    app: &App,
    held: Option<&str>,
    state: &SignInState<'_>,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    let csrf = held
        .filter(|value| CookieValue::parse(value).is_some())
        .map_or_else(random_text, str::to_string);
    let mut body = String::new();
    if state.signed_out {
        body.push_str("<p class=\"notice\" role=\"status\">You have signed out.</p>");
    }
    if state.ended {
        let console = &app.inner().config.console;
        body.push_str(&format!(
            "<p class=\"notice\" role=\"status\">Your session has ended: a session ends after \
             {idle} minutes without use, {absolute} hours after signing in, when you sign out, or \
             when the token it uses stops working. Sign in again to go back to where you \
             were.</p>",
            idle = console.idle_timeout.as_secs() / 60,
            absolute = console.absolute_timeout.as_secs() / 3600,
        ));
    }
    let (invalid, message) = match error {
        Some(error) => (
            " aria-invalid=\"true\"",
            format!(
                "<p class=\"field-error\" id=\"token-error\" role=\"alert\">\
                 <span class=\"visually-hidden\">Error: </span>{}</p>",
                html::esc(error)
            ),
        ),
        None => ("", String::new()),
    };
    let described = if error.is_some() {
        "token-error token-hint"
    } else {
        "token-hint"
    };
    let next = state.next.map_or(String::new(), |next| {
        format!(
            "<input type=\"hidden\" name=\"next\" value=\"{}\">",
            html::esc(next)
        )
    });
    body.push_str(&format!(
        "<div class=\"signin\"><form method=\"post\" action=\"/console/login\" class=\"stack\">{csrf}{next}\
         <div class=\"field\"><label for=\"token\">API token or service-account token</label>\
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"off\" \
         spellcheck=\"false\" required data-autofocus aria-describedby=\"{described}\"{invalid}>\
         {message}<span class=\"hint\" id=\"token-hint\">The token stays on the server for this \
         session only; the browser keeps just a session cookie.</span></div>\
         <div><button type=\"submit\">Sign in</button></div></form>",
        csrf = html::csrf_field(&csrf)
    ));
    if let Some(oidc) = &app.inner().config.console.oidc {
        // It leads back where the token sign-in would.
        let start = match state
            .next
            .map(|next| serde_urlencoded::to_string([("next", next)]))
        {
            Some(Ok(query)) => format!("/console/oidc/start?{query}"),
            _ => "/console/oidc/start".to_string(),
        };
        body.push_str(&format!(
            "<p class=\"or\">or</p><p><a class=\"button secondary\" href=\"{}\">\
             Sign in with {}</a></p>",
            html::esc(&start),
            html::esc(&oidc.issuer)
        ));
    }
    body.push_str("</div>");
    let cookie = set_cookie(app, login_cookie_name(app), &csrf, false, Some(3600));
    (
        status,
        [(header::SET_COOKIE, cookie)],
        Html(html::bare_page(
            "Sign in to keyplane",
            error.is_some(),
            &body,
        )),
    )
        .into_response()
}

async fn sign_in(
    axum::extract::State(app): axum::extract::State<App>,
    origin: crate::request_id::Origin,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ConsoleError> {
    let expected = read_cookie(&headers, login_cookie_name(&app)).unwrap_or_default();
    if expected.is_empty() {
        return Err(ConsoleError::csrf());
    }
    let form = parse_form(&body, expected)?;
    let state = SignInState {
        next: form.get("next").and_then(way_back),
        ..SignInState::default()
    };
    let Some(token) = form.text("token") else {
        return Ok(sign_in_form(
            &app,
            Some(expected),
            &state,
            Some("Paste a token to sign in."),
            StatusCode::UNPROCESSABLE_ENTITY,
        ));
    };
    let at = || {
        crate::canary::Presentation::of_request(
            crate::canary::CanarySurface::Console,
            "POST /console/login".into(),
            &headers,
            &origin,
        )
    };
    match authenticate(&app, token, &at).await {
        Ok(who) => {
            let context = crate::audit::request_context_of(&headers, &origin);
            let to = state.next.unwrap_or("/console");
            let remembered = remembered_organization(&app, &headers);
            start_session(&app, &who, token, "token", &context, remembered, to).await
        }
        Err(AppError::Unauthenticated(_)) => Ok(sign_in_form(
            &app,
            Some(expected),
            &state,
            Some("That token was not accepted: it is unknown, revoked, suspended or expired."),
            StatusCode::UNAUTHORIZED,
        )),
        Err(other) => Err(other.into()),
    }
}

/// Starts the session of `who`, acting with `token`, signed in by `method` (`token`, `oidc`) in
/// the request `context`, and sends the browser `to` a console page (the overview, or the page a
/// session that ended was on). The session opens in the `remembered` organization while `who`
/// holds rights there, else in the first. A principal without rights in any tenant cannot use
/// the console.
async fn start_session(
    app: &App,
    who: &Principal,
    token: &str,
    method: &'static str,
    context: &RequestContext,
    remembered: Option<TenantId>,
    to: &str,
) -> Result<Response, ConsoleError> {
    let remembered = remembered.filter(|tenant| who.rights_in(*tenant).is_some());
    let Some(tenant) = remembered
        .as_ref()
        .or_else(|| who.tenants().first().map(|(tenant, _)| tenant))
    else {
        return Ok(sign_in_form(
            app,
            None,
            &SignInState::default(),
            Some("You hold no rights in any organization yet: ask an administrator for a grant."),
            StatusCode::FORBIDDEN,
        ));
    };
    let label = match who.user_identity() {
        Some((_, subject)) => subject.to_string(),
        None => match CredentialKind::parse(who.kind()) {
            Some(kind) => app
                .store()
                .get_credential(*tenant, kind, CredentialId::from_uuid(who.id()))
                .await
                .map_err(AppError::from)?
                .map_or_else(|| who.id().to_string(), |c| c.name),
            None => who.id().to_string(),
        },
    };
    let started = session::Recorded {
        action: keyplane_core::audit::actions::CONSOLE_SESSION_STARTED,
        actor: AuditActor::of(who),
        context,
        detail: Some(("method", method)),
    };
    let cookie = app
        .inner()
        .console_sessions
        .create(app, *tenant, token, label, who.expires_at, started)
        .await?;
    tracing::info!(principal.id = %who.id(), tenant.id = %tenant, "console session started");
    let mut response = Redirect::to(to).into_response();
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, session_cookie(app, &cookie));
    headers.append(
        header::SET_COOKIE,
        clear_cookie(app, login_cookie_name(app)),
    );
    Ok(response)
}

/// Moves a principal with rights in several organizations to another one: a new session there
/// (a new cookie), the old one ended.
async fn switch_organization(console: Console, body: Bytes) -> Result<Response, ConsoleError> {
    let form = console.form(&body)?;
    let Some(tenant) = form.text("organization").and_then(TenantId::parse) else {
        return Ok(Redirect::to("/console").into_response());
    };
    if console.who.rights_in(tenant).is_none() {
        return Err(AppError::from(DomainError::NotFound).into());
    }
    let app = &console.app;
    let cookie = app
        .inner()
        .console_sessions
        .replace(
            app,
            &console.cookie,
            console.tenant,
            tenant,
            &console.token,
            console.label.clone(),
            console.ends_at,
            AuditActor::of(&console.who),
            &console.context,
        )
        .await?;
    let mut response = Redirect::to("/console").into_response();
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, session_cookie(app, &cookie));
    headers.append(
        header::SET_COOKIE,
        set_cookie(
            app,
            organization_cookie_name(app),
            &tenant.to_string(),
            true,
            Some(REMEMBERED_ORGANIZATION_SECS),
        ),
    );
    Ok(response)
}

async fn sign_out(console: Console, body: Bytes) -> Result<Response, ConsoleError> {
    console.form(&body)?;
    let app = &console.app;
    let ending = session::Ending {
        tenant: console.tenant,
        label: &console.label,
        recorded: session::Recorded::end(
            AuditActor::of(&console.who),
            &console.context,
            "signed_out",
        ),
    };
    app.inner()
        .console_sessions
        .end(app, &console.cookie, Some(ending))
        .await?;
    tracing::info!(principal.id = %console.who.id(), "console session ended");
    let mut response = Redirect::to("/console/login?signed_out=1").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        clear_cookie(app, session_cookie_name(app)),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::way_back;

    /// After signing in, the browser goes back only to a page of this console: never to another
    /// host (a protocol-relative or backslashed path), nor to the sign-in, sign-out or one-time
    /// secret routes.
    #[test]
    fn a_sign_in_goes_back_only_to_a_console_page() {
        for kept in [
            "/console",
            "/console/audit?outcome=denied",
            "/console/api-tokens#create",
            "/console/webhooks/0c7d3f0e-3b1e-4a8e-9d55-2f4f5f0b8a11/deliveries?status=failed",
        ] {
            assert_eq!(way_back(kept), Some(kept), "{kept}");
        }
        for refused in [
            "",
            "//evil.example/console",
            "https://evil.example/console",
            "/console//evil.example",
            "/console/\\evil.example",
            "/consoles",
            "/api/v1/organizations",
            "/console/login?next=/console",
            "/console/logout",
            "/console/oidc/start",
            "/console/secret",
            "/console/session",
            "/console/audit?q=a b",
            "/console/audit?q=\u{e9}",
            "/console/x/../secret",
            "/console/%2e%2e/api/v1/organizations",
            "/console/%2E./login",
            "/console/./login",
            "/console/..",
        ] {
            assert_eq!(way_back(refused), None, "{refused:?}");
        }
    }
}
