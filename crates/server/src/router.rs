//! Router construction: every route is registered through utoipa-axum, so the router and the
//! OpenAPI document come from one list.

use crate::app::App;
use crate::client_addr::ClientAddr;
use crate::error::ErrorCause;
use crate::metrics::RouteMetrics;
use crate::request_id::{Origin, RequestId, REQUEST_ID};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use futures::future::{ready, BoxFuture, Either, Ready};
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::net::TcpListener;
use tower::layer::util::{Identity, Stack};
use tower::ServiceBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

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
        .merge(crate::leaks::routes())
        .merge(crate::revocations::routes())
}

pub(crate) fn openapi_document() -> OpenApiDoc {
    let mut document = api_routes().split_for_parts().1;
    crate::openapi::CommonResponses.modify(&mut document);
    document
}

/// The full application router, ready to serve.
pub fn router(app: App) -> Router {
    let (mut routes, _) = api_routes().split_for_parts();
    if app.inner().config.console.enabled {
        routes = routes.merge(crate::console::routes(&app.inner().config.console));
    }
    // One `ServiceBuilder` stack, applied once: each separate `Router::layer` call would box (and
    // clone, per request) the route's service again.
    let layers = layers(&app);
    routes
        .fallback(crate::system::not_found)
        .method_not_allowed_fallback(crate::system::method_not_allowed)
        .layer(layers)
        .with_state(app)
}

/// A request's answer, as a tower service gives it.
pub(crate) type Answer = Result<Response, Infallible>;

/// What [`Front::serve`] gives for a request: its answer at once (a verification answered from
/// the caches), or a future of it (boxed: the router's is large, and a direct route's would make
/// every request's future as large as the largest). The connection tells the two apart: an answer
/// given at once ends its request without a future around it.
pub(crate) type Served = Either<Ready<Answer>, BoxFuture<'static, Answer>>;

/// What each connection serves. The verification routes, most of a deployment's traffic, are
/// served without the router: its routing table, the boxed service each route is behind and the
/// layers rebuilt around it per request cost them more than anything else around their handler
/// (BENCHMARKS.md, "Fourth sitting", "Fifth sitting"). They run the same [`Observer`] and handlers
/// as through the router (the body limit is the handler's: `extract::read_body`), which serves
/// everything else, and any other method on their paths.
#[derive(Clone)]
pub(crate) struct Front {
    app: App,
    router: Router,
    /// One per [`crate::verify::DirectRoute`], in `DirectRoute::ALL`'s order, its metrics
    /// resolved once.
    direct: Arc<[Observer]>,
}

impl Front {
    pub(crate) fn new(app: App) -> Self {
        use crate::verify::DirectRoute;
        let direct = DirectRoute::ALL
            .iter()
            .enumerate()
            .map(|(index, route)| {
                assert_eq!(
                    *route as usize, index,
                    "DirectRoute::ALL is in declaration order"
                );
                Observer {
                    app: app.clone(),
                    route: Some(app.inner().metrics.route(route.path())),
                }
            })
            .collect();
        Self {
            router: router(app.clone()),
            app,
            direct,
        }
    }

    /// The process's metrics: the server loop counts its connections there.
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.app.inner().metrics
    }

    /// Serves `request` from `client`: the client and the request id ([`Origin`]) are extensions
    /// of the request for the router's handlers, an argument for the direct routes' (a request's
    /// first extension costs three allocations).
    pub(crate) fn serve(&self, mut request: Request, client: ClientAddr) -> Served {
        use tower::ServiceExt;
        let Some(route) = crate::verify::DirectRoute::of(request.method(), request.uri().path())
        else {
            request.extensions_mut().insert(client);
            let reads_only = matches!(*request.method(), Method::GET | Method::HEAD);
            let call = self.router.clone().oneshot(request);
            if reads_only {
                return Either::Right(Box::pin(call));
            }
            // A change runs to its end on a task of its own: hyper drops a request's future when
            // its client hangs up, which would cut a change between its commit and what follows
            // it (the local caches' invalidation: SQLite has no notification to fall back on;
            // an idempotent answer's completion), however briefly the client waited. Such tasks
            // are bounded (past `MAX_CHANGES`, a change is cut with its connection, as a read
            // is), and a stop waits for them before the store closes.
            let Some(slot) = self.app.inner().changes.try_start() else {
                return Either::Right(Box::pin(call));
            };
            let routed: BoxFuture<'static, Answer> = Box::pin(async move {
                let change = tokio::spawn(async move {
                    let answer = call.await;
                    drop(slot);
                    answer
                });
                match change.await {
                    Ok(answer) => answer,
                    Err(failed) => {
                        if failed.is_panic() {
                            tracing::error!("a request's handler panicked");
                        }
                        Ok(axum::response::IntoResponse::into_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                        ))
                    }
                }
            });
            return Either::Right(routed);
        };
        self.direct[route as usize].observe_direct(request, client, |request, request_id| {
            let origin = Origin {
                client: Some(client),
                request_id: Some(request_id),
            };
            route.serve(&self.app, request, origin)
        })
    }
}

/// What runs around every route matched by the router, outermost first: the body limit, then
/// [`Observer`].
fn layers(app: &App) -> ServiceBuilder<Stack<ObserveLayer, Stack<DefaultBodyLimit, Identity>>> {
    ServiceBuilder::new()
        .layer(DefaultBodyLimit::max(app.inner().config.max_body_bytes))
        .layer(ObserveLayer(Observer {
            app: app.clone(),
            route: None,
        }))
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

/// A UUID as a header value (hyphenated, lowercase), rendered on the stack.
pub(crate) fn uuid_header(id: uuid::Uuid) -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// Puts [`Observation`] around a route's response (and the failed-authentication limit,
/// [`crate::failed_auth::FailureWatch`]). Its future is a plain struct around the route's: no box,
/// no clone of the route, nothing moved but the response.
#[derive(Clone)]
struct Observer {
    app: App,
    /// The route served, resolved once when it is known before the request
    /// ([`Front`]'s direct routes); `None`: the one the router names in `MatchedPath`.
    route: Option<Arc<RouteMetrics>>,
}

impl Observer {
    /// `client`: the [`ClientAddr`] the request comes from (`None`: through no listener).
    fn observe<F>(
        &self,
        request: Request,
        client: Option<ClientAddr>,
        call: impl FnOnce(Request, RequestId) -> F,
    ) -> Observed<F> {
        let (watch, response) = self.begin(request, client, call);
        Observed {
            response,
            finish: Some(watch.into_owned()),
        }
    }

    /// [`Self::observe`] for a direct route, which may answer at once: then the observation is
    /// concluded here and no future is left around the answer but a ready one (a few hundred
    /// bytes fewer for hyper to move, and no observed future to poll).
    fn observe_direct(
        &self,
        request: Request,
        client: ClientAddr,
        call: impl FnOnce(Request, RequestId) -> Either<Response, BoxFuture<'static, Answer>>,
    ) -> Served {
        match self.begin(request, Some(client), call) {
            (watch, Either::Left(response)) => Either::Left(ready(Ok(watch.conclude(response)))),
            (watch, Either::Right(response)) => Either::Right(Box::pin(Observed {
                response,
                finish: Some(watch.into_owned()),
            })),
        }
    }

    /// The observation started and `call` made under its span.
    fn begin<T>(
        &self,
        mut request: Request,
        client: Option<ClientAddr>,
        call: impl FnOnce(Request, RequestId) -> T,
    ) -> (Watch<'_>, T) {
        let route = match &self.route {
            Some(known) => Cow::Borrowed(known),
            // Unmatched paths share one label, so probing cannot grow the metrics without bound.
            None => Cow::Owned(
                self.app.inner().metrics.route(
                    request
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", MatchedPath::as_str),
                ),
            ),
        };
        let observation = Observation::start(route.route, &mut request, client);
        let failures = crate::failed_auth::FailureWatch::of(&self.app, &request, client);
        let called = {
            let _entered = observation.span.enter();
            call(request, observation.request_id.clone())
        };
        (
            Watch {
                app: Cow::Borrowed(&self.app),
                route,
                observation,
                failures,
            },
            called,
        )
    }
}

/// What an [`Observer`] keeps of a request until its response: the observation, the
/// failed-authentication watch, and where they report. Borrowed from the observer for an answer
/// given at once, as most verifications are (two reference counts fewer to take and drop, on a
/// path where nothing else is shared); owned by a future that answers later.
struct Watch<'a> {
    app: Cow<'a, App>,
    route: Cow<'a, Arc<RouteMetrics>>,
    observation: Observation,
    failures: Option<crate::failed_auth::FailureWatch>,
}

impl Watch<'_> {
    fn into_owned(self) -> Watch<'static> {
        Watch {
            app: Cow::Owned(self.app.into_owned()),
            route: Cow::Owned(self.route.into_owned()),
            observation: self.observation,
            failures: self.failures,
        }
    }

    /// The request was given up before its answer (the client hung up, or a proxy's timeout):
    /// counted and logged as `499`, so that the slowest requests do not vanish from the latency
    /// and the error counts exactly when something is slow.
    fn abandon(self) {
        self.observation.abandon(&self.app, &self.route);
    }

    fn conclude(self, response: Response) -> Response {
        let response = match self.failures {
            Some(failures) => failures.finish(&self.app, response),
            None => response,
        };
        self.observation.finish(&self.app, &self.route, response)
    }
}

/// [`Observer`] as a tower layer, for the router. A layer of its own rather than
/// `middleware::from_fn`, which per request splits the request to extract its state, boxes a
/// clone of the inner service, and moves the larger futures that makes.
#[derive(Clone)]
struct ObserveLayer(Observer);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            observer: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
struct Observe<S> {
    observer: Observer,
    inner: S,
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let inner = &mut self.inner;
        // Set by `Front::serve` (`None` for a request that came through no listener).
        let client = request.extensions().get::<ClientAddr>().copied();
        // Ready: our own `poll_ready` was its `poll_ready`.
        self.observer
            .observe(request, client, |mut request, request_id| {
                // For handlers, as `Origin` reads it.
                request.extensions_mut().insert(request_id);
                inner.call(request)
            })
    }
}

pin_project_lite::pin_project! {
    /// A route's response under way, observed when it is ready, or when dropped before that
    /// (its client went away: hyper drops the future).
    struct Observed<F> {
        #[pin]
        response: F,
        finish: Option<Watch<'static>>,
    }
    impl<F> PinnedDrop for Observed<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(watch) = this.project().finish.take() {
                watch.abandon();
            }
        }
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Observed<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let watch = this.finish.as_ref().expect("polled after completion");
        let polled = {
            let _entered = watch.observation.span.enter();
            this.response.poll(cx)
        };
        let Ok(response) = std::task::ready!(polled);
        let watch = this.finish.take().expect("polled after completion");
        Poll::Ready(Ok(watch.conclude(response)))
    }
}

/// Lets at most one line a second through (an atomic per check): for a failure every request of a
/// high-rate route may meet at once, such as a store outage.
struct LineThrottle {
    /// The coarse clock's second of the last line let through, plus one (0: none yet).
    last_second: AtomicU64,
    left_out: AtomicU64,
}

impl LineThrottle {
    const fn new() -> Self {
        Self {
            last_second: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now.
    fn admit(&self) -> Option<u64> {
        let second = crate::coarse_clock::reading().as_secs() + 1;
        let last = self.last_second.load(Ordering::Relaxed);
        if last != second
            && self
                .last_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::Relaxed));
        }
        self.left_out.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The hot routes' failure lines.
static HOT_FAILURE_LINES: LineThrottle = LineThrottle::new();

/// One log line and one metrics observation per request, under a span carrying the request id
/// and the client's address (the [`ClientAddr`] the connection set), around the
/// failed-authentication limit. Works out the request id ([`RequestId`]: the client's when plain,
/// else a fresh UUID), which the route is called with and the response carries, and sets
/// `Cache-Control: no-store` on a response that names no other policy. The log names the matched
/// route, never the raw URI or any header value but the request id.
struct Observation {
    started: Instant,
    method: &'static str,
    request_id: RequestId,
    /// Logged at debug level: a verification route.
    hot: bool,
    /// For a hot route's failure line, which its (disabled) span cannot carry.
    client: Option<ClientAddr>,
    span: tracing::Span,
    audit: Option<crate::audit::Watched>,
}

impl Observation {
    /// `route`: the label of the route served.
    fn start(route: &'static str, request: &mut Request, client: Option<ClientAddr>) -> Self {
        let started = Instant::now();
        let method = method_label(request.method());
        let request_id = RequestId::of(request.headers());
        let client_ip = client.map(|c| tracing::field::display(c.0));
        // Rendered only by a span that is enabled (the hot routes' are not, at the default level).
        let id_text = || tracing::field::display(&request_id);
        let audit = crate::audit::watch_request(request).map(|slot| crate::audit::Watched {
            slot,
            context: crate::audit::request_context_of(
                request.headers(),
                &Origin {
                    client,
                    request_id: Some(request_id.clone()),
                },
            ),
            method,
            route,
            path: request.uri().path().to_string(),
        });
        // Other services' traffic, at high rates: logged at debug level, so the default `info`
        // log stays readable and the hot path stays cheap.
        let hot = crate::verify::DirectRoute::serves_path(route);
        let span = if hot {
            tracing::debug_span!(
                "request",
                request.id = id_text(),
                http.method = method,
                http.route = route,
                client.ip = client_ip
            )
        } else {
            tracing::info_span!(
                "request",
                request.id = id_text(),
                http.method = method,
                http.route = route,
                client.ip = client_ip
            )
        };
        Self {
            started,
            method,
            request_id,
            hot,
            client,
            span,
            audit,
        }
    }

    /// Reported as given up: the status nginx logs for a client that closed the request.
    fn abandon(self, app: &App, route: &RouteMetrics) {
        const CLIENT_CLOSED_REQUEST: u16 = 499;
        let elapsed = self.started.elapsed();
        app.inner().metrics.observe_request(
            route,
            self.method,
            CLIENT_CLOSED_REQUEST,
            elapsed.as_secs_f64(),
        );
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let _entered = self.span.enter();
        if self.hot {
            tracing::debug!(
                http.status = CLIENT_CLOSED_REQUEST,
                duration_ms,
                "request abandoned: the client went away"
            );
        } else {
            tracing::info!(
                http.status = CLIENT_CLOSED_REQUEST,
                duration_ms,
                "request abandoned: the client went away"
            );
        }
    }

    /// Reported to `app`'s log and metrics, under `route`.
    fn finish(self, app: &App, route: &RouteMetrics, mut response: Response) -> Response {
        let elapsed = self.started.elapsed();
        let status = response.status();
        if let Some(watched) = self.audit {
            crate::audit::after_response(app, watched, status);
        }
        app.inner().metrics.observe_request(
            route,
            self.method,
            status.as_u16(),
            elapsed.as_secs_f64(),
        );
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        {
            let _entered = self.span.enter();
            let cause = response.extensions().get::<ErrorCause>();
            match cause {
                // The hot routes' span is off at the default level: the line names the request
                // itself. In an outage every uncached verification fails, so their lines are
                // kept to one a second (with how many were left out), not one a request.
                Some(cause) if status.is_server_error() && self.hot => {
                    if let Some(left_out) = HOT_FAILURE_LINES.admit() {
                        tracing::error!(
                            request.id = %self.request_id,
                            http.route = route.route,
                            client.ip = self.client.map(|c| tracing::field::display(c.0)),
                            http.status = status.as_u16(),
                            duration_ms,
                            cause = %cause.0,
                            similar_left_out = left_out,
                            "request failed"
                        )
                    }
                }
                Some(cause) if status.is_server_error() => {
                    tracing::error!(http.status = status.as_u16(), duration_ms, cause = %cause.0, "request failed")
                }
                _ if self.hot => tracing::debug!(
                    http.status = status.as_u16(),
                    duration_ms,
                    cause = cause.map(|c| c.0.as_str()),
                    "request served"
                ),
                Some(cause) => {
                    tracing::info!(http.status = status.as_u16(), duration_ms, cause = %cause.0, "request refused")
                }
                None => {
                    tracing::info!(http.status = status.as_u16(), duration_ms, "request served")
                }
            }
        }
        let headers = response.headers_mut();
        // Replacing a slot a handler left for it (`verify::forward_answer_headers`).
        headers.insert(REQUEST_ID, self.request_id.into_header_value());
        // Credentials and their metadata must not sit in shared caches.
        headers
            .entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
        response
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then in-flight requests, leak responses
/// and canary alarms finish, the background jobs stop (a step under way abandoned), pending
/// `last_used_at` updates are written, and the audit work makes its last pass, within
/// `config.http.shutdown_timeout` of the signal, whatever the store does (leak responses and
/// canary alarms get at least [`LEAST_FOR_ALARMS`]). Every connection is bounded by
/// `config.http` (see `connection`).
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // First, so that a certificate that does not load stops `serve` before anything starts.
    let (stop_background, stopped) = tokio::sync::watch::channel(false);
    let (tls, tls_watch) = match app.inner().config.tls.clone() {
        Some(files) => {
            let (current, task) = crate::tls::watch_files(
                files,
                app.inner().reload_tls.clone(),
                app.inner().config.tls_check_interval,
                app.inner().metrics.clone(),
                stopped.clone(),
            )
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            (Some(current), Some(task))
        }
        None => (None, None),
    };
    let verifier_app = app.clone();
    // Stopped with the rest of the background work: it holds the App and a connection.
    app.store().listen_invalidations(
        std::sync::Arc::new(move |event| {
            verifier_app.inner().metrics.invalidation_heard(event);
            verifier_app.inner().verifier.invalidate(event);
            verifier_app.inner().revocation_streams.heard(event);
        }),
        stopped.clone(),
    );
    // Before any job that cuts by this clock starts (at most 2 s, for a store that does not
    // answer: the jobs then wait for a measurement that succeeds).
    app.inner().clock_check.measure(&app).await;
    let background = spawn_background_work(&app, &stopped);
    let audit_tasks = spawn_audit_tasks(&app, &stopped);
    let key_refresh = tokio::spawn(crate::registry::refresh_signer(
        app.clone(),
        app.inner().config.registry.key_refresh,
        stopped.clone(),
    ));
    let streams_app = app.clone();
    let signalled = std::sync::Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let signalled = signalled.clone();
        async move {
            shutdown.await;
            let _ = signalled.set(tokio::time::Instant::now());
            // Open streams never finish on their own: end them so their connections can close.
            streams_app.inner().revocation_streams.stop();
        }
    };
    crate::connection::serve_http(
        listener,
        Front::new(app.clone()),
        &app.inner().config.http,
        &app.inner().config.trusted_proxies,
        tls,
        shutdown,
    )
    .await;
    // One deadline for everything after the signal, the time an orchestrator's grace period must
    // exceed; each step below gets what is left of it.
    let deadline = signalled
        .get()
        .copied()
        .unwrap_or_else(tokio::time::Instant::now)
        + app.inner().config.http.shutdown_timeout;
    // Changes whose client left run on after their connection closed; what they start (leak
    // responses, canary alarms, last uses) is drained below.
    app.inner().changes.drain(left_until(deadline)).await;
    // Leak responses and canary alarms first: they revoke credentials and record events, which
    // the audit tasks' last pass then carries. Canary alarms are queued in memory only (a leak
    // report abandoned here stays stored), so they get at least `LEAST_FOR_ALARMS` even when the
    // connections took the whole deadline.
    // Both at once: each gets the whole of it, and together they take no longer.
    let for_alarms = left_until(deadline).max(LEAST_FOR_ALARMS);
    tokio::join!(
        app.inner().leak_jobs.drain(for_alarms),
        app.inner().verifier.canaries().drain(for_alarms),
    );
    // The background jobs end at once, a step under way abandoned (what it did not write is
    // kept: a flush's batch is queued again); then the rest is written, last-use times before
    // anything that may run out the deadline, since a kill loses them. Bounded like the rest: a
    // store that does not answer must not hold the stop past its deadline.
    let _ = stop_background.send(true);
    for mut task in background {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
        }
    }
    let last_uses = crate::jobs::bounded(
        &app,
        crate::config::BackgroundJob::LastUsedFlush,
        app.flush_usage(),
    );
    if tokio::time::timeout_at(deadline, last_uses).await.is_err() {
        tracing::warn!(
            "last_used_at updates still unwritten at the shutdown deadline were dropped"
        );
    }
    // Aborted at the deadline, not left running: what they hold (store connections) goes, so
    // closing the store does not wait for them. The export resumes from its saved cursors.
    let mut tasks = audit_tasks
        .into_iter()
        .chain(tls_watch)
        .chain([key_refresh])
        .collect::<Vec<_>>();
    for task in &mut tasks {
        if tokio::time::timeout_at(deadline, &mut *task).await.is_err() {
            tracing::warn!("audit work still running at the shutdown deadline was stopped; the next start resumes it");
            break;
        }
    }
    for task in &tasks {
        task.abort();
    }
    // Dropped now, not with the runtime: the export says what it left mid-write. No task blocks
    // a worker (the audit log's file work has a thread of its own), so this is quick; bounded
    // all the same.
    // (A finished one may have been awaited to its end above: not polled again.)
    for task in tasks.into_iter().filter(|task| !task.is_finished()) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), task).await;
    }
    Ok(())
}

/// Changes running on their own task at once (`Front::serve`); past it a change is cut with its
/// connection, as a read is: so clients that hang up at once cannot pile up work.
pub(crate) const MAX_CHANGES: usize = 1024;

/// What leak responses and canary alarms get after a stop's signal, however little of its
/// deadline the connections left: canary alarms are queued in memory only.
const LEAST_FOR_ALARMS: std::time::Duration = std::time::Duration::from_secs(5);

fn left_until(deadline: tokio::time::Instant) -> std::time::Duration {
    deadline.saturating_duration_since(tokio::time::Instant::now())
}

/// The audit trail's background work: refusal flushing, the `--audit-log` export, webhook
/// deliveries, retention, the lifecycle sweep and stored leak reports (whose events go to the
/// trail).
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
    tasks.push(tokio::spawn(lifecycle_sweeps(
        app.clone(),
        config.lifecycle_sweep_interval,
        stop.clone(),
    )));
    tasks.push(tokio::spawn(crate::webhooks::worker::run(
        app.clone(),
        stop.clone(),
    )));
    tasks.push(tokio::spawn(crate::leaks::work_off_stored_reports(
        app.clone(),
        stop.clone(),
    )));
    if config.audit_retention_days > 0 {
        tasks.push(tokio::spawn(crate::audit::retention(
            app.clone(),
            config.audit_retention_days,
            stop.clone(),
        )));
    }
    tasks
}

/// The lifecycle sweep (`ops::lifecycle_sweep`: expiry warnings, usage-aware cutover, ended
/// previous secrets) every `interval` until `stop` turns true, starting at once so that a restart
/// catches up on what passed while it was down.
async fn lifecycle_sweeps(
    app: App,
    interval: std::time::Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut every = crate::jobs::Every::new(interval, stop);
    while every.tick().await {
        // Abandoned at its deadline: each of its changes is a transaction of its own, and the
        // next sweep finds what this one did not reach.
        let sweep = crate::jobs::bounded(
            &app,
            crate::config::BackgroundJob::LifecycleSweep,
            crate::ops::lifecycle_sweep(&app),
        );
        if let Ok(Err(error)) = sweep.await {
            tracing::warn!(error = %error, "lifecycle sweep failed; the next one retries");
        }
    }
}

/// How often the store's planner statistics are refreshed (the store refreshes them at open).
const STATISTICS_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// How often, at most, a store whose writes fail is probed with a write of its own.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Periodic work until `stop` turns true, each job on a task of its own, so that a step that
/// hangs holds no other: probe writes while they fail, flush coalesced `last_used_at`, measure
/// the clock against the database's, prune expired records (unless the clock is off), refresh
/// the store's planner statistics hourly; and, touching no store, forget idle rate-limit buckets
/// and expired cache entries. Each store step runs under its job's deadline (`jobs::periodic`).
fn spawn_background_work(
    app: &App,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use crate::clock_check::ClockJob;
    use crate::config::BackgroundJob;
    use crate::jobs::{periodic, Every};
    let interval = app.inner().config.last_used_flush_interval;
    let every = || Every::new(interval, stop.clone());
    vec![
        tokio::spawn(memory_prunes(app.clone(), every())),
        tokio::spawn(periodic(
            app.clone(),
            BackgroundJob::LastUsedFlush,
            every(),
            |app: App| async move { app.flush_usage().await },
        )),
        // While writes fail, a write of its own (at most every PROBE_EVERY, however short the
        // tick: it writes a MiB to a store already in trouble): background work mostly writes
        // nothing (which tells nothing), and a degraded replica may get no client writes, so
        // without it `/readyz` would not see the store take writes again.
        tokio::spawn(periodic(
            app.clone(),
            BackgroundJob::WriteProbe,
            Every::new(interval.max(PROBE_EVERY), stop.clone()),
            |app: App| async move {
                if app.store().write_health().failing {
                    if let Err(error) = app.store().probe_writes().await {
                        tracing::debug!(%error, "the store's writes are still failing");
                    }
                }
            },
        )),
        tokio::spawn(periodic(
            app.clone(),
            BackgroundJob::PlannerStatistics,
            Every::later(STATISTICS_EVERY, stop.clone()),
            |app: App| async move {
                if let Err(error) = app.store().refresh_statistics().await {
                    tracing::warn!(%error, "cannot refresh the store's planner statistics");
                }
            },
        )),
        // Periodically, so that `/readyz`, the metric and the log follow the clock even while no
        // job asks (each job asks again before it runs). Bounded by its own job's deadline
        // (`ClockCheck::measure`).
        tokio::spawn(measure_clock(app.clone(), every())),
        tokio::spawn(periodic(
            app.clone(),
            BackgroundJob::IdempotencyPrune,
            every(),
            |app: App| async move {
                let clock = &app.inner().clock_check;
                if clock.allows(&app, ClockJob::IdempotencyPrune).await {
                    crate::idempotency::prune(&app).await;
                }
            },
        )),
        // Whether or not the console is on now: sessions signed in while it was keep a label
        // and a sealed token until pruned.
        tokio::spawn(periodic(
            app.clone(),
            BackgroundJob::ConsoleSessionPrune,
            every(),
            |app: App| async move {
                let clock = &app.inner().clock_check;
                if clock.allows(&app, ClockJob::ConsoleSessionPrune).await {
                    app.inner().console_sessions.prune(&app).await;
                }
            },
        )),
    ]
}

async fn measure_clock(app: App, mut every: crate::jobs::Every) {
    while every.tick().await {
        app.inner().clock_check.measure(&app).await;
    }
}

/// What the background work forgets in memory, at each tick until its stop: never behind a
/// store step, so that a store that does not answer cannot let these grow.
async fn memory_prunes(app: App, mut every: crate::jobs::Every) {
    while every.tick().await {
        let inner = app.inner();
        inner.verifier.prune();
        if let Some(limiter) = &inner.failed_auth {
            limiter.prune();
        }
        if let Some(limiter) = &inner.rate_limiter {
            limiter.prune();
        }
        if let Some(limiter) = &inner.public_revoke_limiter {
            limiter.prune();
        }
        if let Some(limiter) = &inner.console_sign_in_limiter {
            limiter.prune();
        }
        if let Some(limiter) = &inner.tenant_rate_limiter {
            limiter.prune();
        }
    }
}
