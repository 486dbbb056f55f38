//! Router construction: every route is registered through utoipa-axum, so the router and the
//! OpenAPI document come from one list.

use crate::app::App;
use crate::error::ErrorCause;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tracing::Instrument;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keyplane",
        description = "Machine credentials for multi-tenant platforms: the Aether and Hybridbox \
                       APIs on one core. Authenticate with `Authorization: Bearer <token>`.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
    }
}

fn api_routes() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(crate::aether::routes())
        .merge(crate::hybridbox::routes())
        .merge(crate::registry::routes())
        .merge(crate::verify::routes())
        .merge(crate::system::routes())
}

pub(crate) fn openapi_document() -> OpenApiDoc {
    api_routes().split_for_parts().1
}

/// The full application router, ready to serve.
pub fn router(app: App) -> Router {
    let (routes, _) = api_routes().split_for_parts();
    // One `ServiceBuilder` stack, applied once: each separate `Router::layer` call would box (and
    // clone, per request) the route's service again. Outermost first.
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        // Credentials and their metadata must not sit in shared caches.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(DefaultBodyLimit::max(app.inner().config.max_body_bytes))
        .layer(middleware::from_fn_with_state(app.clone(), observe));
    routes
        .fallback(crate::system::not_found)
        .method_not_allowed_fallback(crate::system::method_not_allowed)
        .layer(layers)
        .with_state(app)
}

/// Routes that serve other services' traffic at high rates: their requests are logged at debug
/// level, so the default `info` log stays readable and the hot path stays cheap.
fn is_verification_route(route: &str) -> bool {
    matches!(
        route,
        "/v1/auth/forward" | "/oauth2/introspect" | "/v1/whoami"
    )
}

/// A `'static` copy of a matched route, made once per distinct route (there are a few dozen), so
/// metrics labels cost no allocation per request.
fn interned(route: &str) -> &'static str {
    static ROUTES: std::sync::OnceLock<std::sync::RwLock<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let routes = ROUTES.get_or_init(Default::default);
    if let Some(known) = routes.read().unwrap_or_else(|p| p.into_inner()).get(route) {
        return known;
    }
    let mut routes = routes.write().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = routes.get(route) {
        return known;
    }
    let leaked: &'static str = Box::leak(route.to_string().into_boxed_str());
    routes.insert(leaked);
    leaked
}

fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// One log line and one metrics observation per request, under a span carrying the request id,
/// around the failed-authentication limit (one middleware, not two: each costs a boxed future).
/// The log names the matched route, never the raw URI or any header value.
async fn observe(
    axum::extract::State(app): axum::extract::State<App>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    // Unmatched paths share one label, so probing cannot grow the metrics without bound.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| interned(p.as_str()));
    let mut request = request;
    let audit_slot = crate::audit::watch_request(&mut request);
    let audit_watch = audit_slot.map(|slot| crate::audit::Watched {
        slot,
        context: crate::audit::request_context(request.headers(), request.extensions()),
        method,
        route,
        path: request.uri().path().to_string(),
    });
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let hot = is_verification_route(route);
    let span = if hot {
        tracing::debug_span!("request", request.id = %request_id, http.method = method, http.route = route)
    } else {
        tracing::info_span!("request", request.id = %request_id, http.method = method, http.route = route)
    };
    let response = crate::failed_auth::limit_failed_authentications(&app, request, next)
        .instrument(span.clone())
        .await;
    let elapsed = started.elapsed();
    let status = response.status();
    if let Some(watched) = audit_watch {
        crate::audit::after_response(&app, watched, status);
    }
    app.inner()
        .metrics
        .observe_request(method, route, status.as_u16(), elapsed.as_secs_f64());
    let duration_ms = elapsed.as_secs_f64() * 1000.0;
    let _entered = span.enter();
    let cause = response.extensions().get::<ErrorCause>();
    match cause {
        Some(cause) if status.is_server_error() => {
            tracing::error!(http.status = status.as_u16(), duration_ms, cause = %cause.0, "request failed")
        }
        _ if hot => tracing::debug!(
            http.status = status.as_u16(),
            duration_ms,
            cause = cause.map(|c| c.0.as_str()),
            "request served"
        ),
        Some(cause) => {
            tracing::info!(http.status = status.as_u16(), duration_ms, cause = %cause.0, "request refused")
        }
        None => tracing::info!(http.status = status.as_u16(), duration_ms, "request served"),
    }
    response
}

/// Serves `app` on `listener` until `shutdown` resolves; then in-flight requests finish and pending
/// `last_used_at` updates are written.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let verifier_app = app.clone();
    app.store()
        .listen_invalidations(std::sync::Arc::new(move |event| {
            verifier_app.inner().verifier.invalidate(event)
        }));
    let (stop_background, stopped) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(background_work(app.clone(), stopped.clone()));
    let audit_tasks = spawn_audit_tasks(&app, &stopped);
    let service = router(app.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await;
    // Let a flush in progress finish (aborting it would drop its batch), then write the rest.
    let _ = stop_background.send(true);
    let _ = background.await;
    for task in audit_tasks {
        let _ = task.await;
    }
    app.flush_usage().await;
    served
}

/// The audit trail's background work: refusal flushing, the `--audit-log` export, retention.
fn spawn_audit_tasks(
    app: &App,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let config = &app.inner().config;
    let mut tasks = vec![tokio::spawn(crate::audit::flush_refusals(
        app.clone(),
        config.audit_refusal_window,
        stop.clone(),
    ))];
    if let Some(target) = &config.audit_log {
        tasks.push(tokio::spawn(crate::audit::export(
            app.clone(),
            target.clone(),
            app.inner().reopen_audit_log.clone(),
            stop.clone(),
        )));
    }
    if config.audit_retention_days > 0 {
        tasks.push(tokio::spawn(crate::audit::retention(
            app.clone(),
            config.audit_retention_days,
            stop.clone(),
        )));
    }
    tasks
}

/// Periodic work until `stop` turns true: flush coalesced `last_used_at`, forget idle rate-limit
/// buckets.
async fn background_work(app: App, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(app.inner().config.last_used_flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        app.flush_usage().await;
        app.inner().verifier.prune();
        if let Some(limiter) = &app.inner().failed_auth {
            limiter.prune();
        }
        if let Some(limiter) = &app.inner().rate_limiter {
            limiter.prune();
        }
    }
}
