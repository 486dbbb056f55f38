//! Operations endpoints: health, readiness, metrics, the OpenAPI document and the API reference.

use crate::app::App;
use crate::error::AppError;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use keyplane_core::Error as DomainError;
use keyplane_store::StoreFault;
use serde::Serialize;
use std::time::Duration;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const TAG: &str = "Operations";

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(docs))
}

/// `/healthz`'s answer.
#[derive(Serialize, ToSchema)]
pub struct Health {
    status: Alive,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Alive {
    Ok,
}

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = TAG, responses((status = 200, description = "Alive.", body = Health)))]
async fn healthz() -> impl IntoResponse {
    axum::Json(Health { status: Alive::Ok })
}

/// `/readyz`'s answer.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`; `degraded`: reads work, writes are failing; `unavailable` (503): reads fail, or
    /// this replica's clock is off past `--unready-clock-skew-seconds` (`reason` says which).
    status: ReadinessStatus,
    /// This replica's keyplane version (e.g. `0.1.0`).
    #[schema(value_type = String)]
    version: &'static str,
    /// The store schema this replica knows: its latest migration. It started on a store at that
    /// schema (migrating an older one, or refusing it with `serve --migrate never`); a newer
    /// replica may have migrated the store further since.
    schema: i64,
    /// The store's kind: `sqlite` or `postgres`.
    #[schema(value_type = String)]
    store: &'static str,
    /// Whether writes are failing now.
    writes: WriteHealth,
    /// The last transient fault a write met; it stays after writes recover. `null` if none did
    /// since the start.
    #[schema(required = true)]
    last_write_failure: Option<WriteFailure>,
    /// This replica's clock against the database's.
    clock: ClockHealth,
    /// The store against what the `--audit-log` export wrote.
    audit: AuditHealth,
    /// The background jobs.
    background: BackgroundHealth,
    /// PostgreSQL only: whether this replica hears other replicas' changes (`listening`), or lost
    /// the connection it hears them on and is reconnecting (`reconnecting`: meanwhile every cached
    /// verification is reloaded at least every second). It does not change `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    listener: Option<ListenerHealth>,
    /// On 503 only: why reads fail (`unreachable`, `busy`, `timed out`, `disk full`,
    /// `read-only`, `I/O error`, or `error`), or `clock skewed`: they work, but this replica's
    /// clock is off from the database's by more than `--unready-clock-skew-seconds` (`clock`
    /// shows by how much).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    reason: Option<&'static str>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum ListenerHealth {
    Listening,
    Reconnecting,
}

impl ListenerHealth {
    /// `None` where one process owns the store (SQLite): nothing to hear.
    fn of(app: &App) -> Option<Self> {
        (app.store().backend() == "postgres").then(|| {
            if app.inner().metrics.invalidation_listener_up() {
                ListenerHealth::Listening
            } else {
                ListenerHealth::Reconnecting
            }
        })
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum ReadinessStatus {
    Ready,
    Degraded,
    Unavailable,
}

/// This replica's clock against the database's (PostgreSQL only: replicas sharing the store
/// change it by their own clocks). While it is `unknown`, the jobs that change the store by this
/// clock are held: the lifecycle sweep (grace ends, the unused-secret cutover, expiry notices),
/// audit retention, and the pruning of Idempotency-Key records, console sessions, webhook
/// deliveries and public revocation reports. While it is `skewed`, those that seconds decide
/// (grace ends, the cutover, `credential.expired`, console sessions) are held, and the others
/// too once `skew_seconds` is past an hour (or `limit_seconds`, if larger):
/// `keyplane_clock_jobs_held` tells which.
#[derive(Serialize, ToSchema)]
pub struct ClockHealth {
    /// `ok`; `skewed`: off by more than `limit_seconds`; `unknown`: not measured yet, or no
    /// measurement has succeeded for a minute (`skew_seconds` and `checked_at` then show the
    /// last that did); `not_checked`: SQLite, one process on one machine.
    status: ClockHealthStatus,
    /// This replica's clock less the database's at the last measurement, in seconds (positive:
    /// ahead); `null` if none.
    #[schema(required = true)]
    skew_seconds: Option<f64>,
    /// `--max-clock-skew-seconds`.
    limit_seconds: f64,
    /// `--unready-clock-skew-seconds`: past it `/readyz` answers 503, `reason` `clock skewed`,
    /// until a measurement finds the clock within half of it; `null` if not set.
    #[schema(required = true)]
    unready_limit_seconds: Option<f64>,
    /// When it was last measured (RFC 3339, milliseconds, UTC, on this replica's clock); `null`
    /// if never.
    #[schema(required = true, value_type = Option<String>, format = DateTime)]
    checked_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum ClockHealthStatus {
    Ok,
    Skewed,
    Unknown,
    NotChecked,
}

impl ClockHealth {
    fn of(app: &App) -> Self {
        use crate::clock_check::ClockStatus;
        let check = &app.inner().clock_check;
        let state = check.state();
        Self {
            status: match state.status {
                ClockStatus::Ok => ClockHealthStatus::Ok,
                ClockStatus::Skewed => ClockHealthStatus::Skewed,
                ClockStatus::Unknown => ClockHealthStatus::Unknown,
                ClockStatus::NotChecked => ClockHealthStatus::NotChecked,
            },
            // To the millisecond: what a reading over the network can tell.
            skew_seconds: state
                .last
                .map(|m| (m.skew_seconds() * 1000.0).round() / 1000.0),
            limit_seconds: check.limit().as_secs_f64(),
            unready_limit_seconds: check.unready_above().map(|above| above.as_secs_f64()),
            checked_at: state
                .last
                .map(|m| m.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        }
    }
}

/// The background jobs. A job whose last step was abandoned at its deadline (the store did not
/// answer it in time) is listed until a step of it ends in time; the other jobs go on meanwhile,
/// and it does not change `status`: one slow step is no reason to take the replica out of
/// rotation (`keyplane_background_step_timeouts_total` counts them, for alerts).
#[derive(Serialize, ToSchema)]
pub struct BackgroundHealth {
    /// The jobs whose last step was abandoned at its deadline, by their
    /// `keyplane_background_step_timeouts_total` label (`last_used_flush`, `idempotency_prune`,
    /// ...); empty when none.
    #[schema(value_type = Vec<String>)]
    stalled: Vec<&'static str>,
}

impl BackgroundHealth {
    fn of(app: &App) -> Self {
        Self {
            stalled: app
                .inner()
                .stalled_jobs
                .now()
                .into_iter()
                .map(crate::config::BackgroundJob::label)
                .collect(),
        }
    }
}

/// The store against what the `--audit-log` export wrote. An organization whose chain the store
/// holds less of than the log (the store restored from a backup, recovered to an earlier point,
/// failed over to a standby missing commits, or lost) is counted until the process ends; it does
/// not change `status` or the answer's code: the store is what is served from, and the log says
/// what it lost. So is an organization some of whose events were gone from the store before the
/// export wrote them: neither holds them. Counts only: `/readyz` is unauthenticated and names no
/// organization; the log names each (at `error`), and `admin audit verify --against` tells the
/// same from the exported trail.
#[derive(Serialize, ToSchema)]
pub struct AuditHealth {
    /// `ok`; `behind_export`: the store was found behind the audit log for
    /// `organizations_behind` organizations; `missing_events`: none is behind, but the export found
    /// events gone before it wrote them; `not_exported`: no `--audit-log`, nothing to compare.
    status: AuditHealthStatus,
    /// Organizations found behind since the start.
    organizations_behind: usize,
    /// Organizations whose events the export found gone before it wrote them, since the start.
    organizations_missing_events: usize,
    /// How many events those gaps left out, in all.
    events_missing: u64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum AuditHealthStatus {
    Ok,
    BehindExport,
    MissingEvents,
    NotExported,
}

impl AuditHealth {
    fn of(app: &App) -> Self {
        let organizations_behind = app.inner().export_behind.list().len();
        let gaps = app.inner().export_gaps.list();
        Self {
            status: if organizations_behind > 0 {
                AuditHealthStatus::BehindExport
            } else if !gaps.is_empty() {
                AuditHealthStatus::MissingEvents
            } else if app.inner().config.audit_log.is_some() {
                AuditHealthStatus::Ok
            } else {
                AuditHealthStatus::NotExported
            },
            organizations_behind,
            organizations_missing_events: gaps.len(),
            events_missing: gaps.iter().map(|gap| gap.missing).sum(),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum WriteHealth {
    Ok,
    Failing,
}

/// A write's transient fault.
#[derive(Serialize, ToSchema)]
pub struct WriteFailure {
    /// `unreachable`, `busy`, `timed out`, `disk full`, `read-only` or `I/O error`.
    #[schema(value_type = String)]
    kind: &'static str,
    /// What it means, for a person.
    #[schema(value_type = String)]
    message: &'static str,
    /// When it happened (RFC 3339, milliseconds, UTC).
    #[schema(value_type = String, format = DateTime)]
    at: String,
}

/// How long `/readyz` waits for the store: a load balancer must get an answer even when the store
/// hangs.
const READINESS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one check of the store's reads answers every `/readyz`.
const READ_CHECK_REUSE: Duration = Duration::from_secs(1);

/// Whether the store answers reads: `Err((fault kind, detail))` if not.
type ReadCheck = Result<(), (&'static str, String)>;

/// The last check of the store's reads, shared by every `/readyz`: anyone may ask, as often as they
/// like, and a store that is slow or refusing is pinged (and, then, dialled directly) once a second
/// at most, its failure logged once. Those who ask during a check wait for it (at most
/// [`READINESS_TIMEOUT`]) and take its answer.
#[derive(Default)]
pub(crate) struct ReadChecks(tokio::sync::Mutex<Option<(std::time::Instant, ReadCheck)>>);

impl ReadChecks {
    async fn check(&self, store: &dyn keyplane_store::Store) -> ReadCheck {
        let mut last = self.0.lock().await;
        if let Some((_, check)) = last
            .as_ref()
            .filter(|(at, _)| at.elapsed() < READ_CHECK_REUSE)
        {
            return check.clone();
        }
        let check = match tokio::time::timeout(READINESS_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err((
                error.fault().map_or("error", StoreFault::as_str),
                error.to_string(),
            )),
            Err(_) => Err((
                StoreFault::TimedOut.as_str(),
                "no answer within 1 s".to_string(),
            )),
        };
        if let Err((kind, detail)) = &check {
            tracing::warn!(store.fault = kind, error = %detail, "readiness check failed");
        }
        *last = Some((std::time::Instant::now(), check.clone()));
        check
    }
}

/// Readiness: the store answers reads (within a second). `status` is `ready`, `degraded` (reads
/// work, writes are failing: verification keeps serving, changes answer 503) or `unavailable`.
/// `last_write_failure` names the last transient fault a write met (`disk full`, `read-only`,
/// `busy`, `unreachable`, ...), and stays after writes recover. `clock` compares this replica's
/// clock with the database's (PostgreSQL), and says whether the jobs that cut by it are held.
/// With `--unready-clock-skew-seconds`, a clock off by more than that answers 503 (`reason`
/// `clock skewed`) while the store's reads work: the replica dates what it writes by its clock,
/// and the load balancer is to take it out (what reaches it is still served).
/// `audit` says whether the store was found behind what the `--audit-log` export wrote (a
/// restore, a failover); that does not change `status` either, nor does `background`, the jobs
/// whose last step was abandoned at its deadline. `version` and `schema` say which
/// keyplane this replica runs, and which store schema it knows.
#[utoipa::path(get, path = "/readyz", tag = TAG, responses(
    (status = 200, description = "Ready, or degraded: reads work, writes are failing.", body = Readiness),
    (status = 503, description = "The store does not answer reads (unreachable, failing, or slower than a second), or this replica's clock is off past `--unready-clock-skew-seconds` (`clock skewed`); `reason` says which.", body = Readiness),
))]
async fn readyz(State(app): State<App>) -> Response {
    let store = app.store();
    let writes = store.write_health();
    let reads = app.inner().read_checks.check(store.as_ref()).await;
    let mut readiness = Readiness {
        status: if writes.failing {
            ReadinessStatus::Degraded
        } else {
            ReadinessStatus::Ready
        },
        version: crate::VERSION,
        schema: keyplane_store::latest_schema(),
        store: store.backend(),
        writes: if writes.failing {
            WriteHealth::Failing
        } else {
            WriteHealth::Ok
        },
        last_write_failure: writes.last_failure.map(|(fault, at)| WriteFailure {
            kind: fault.as_str(),
            message: fault.public_message(),
            at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }),
        clock: ClockHealth::of(&app),
        audit: AuditHealth::of(&app),
        background: BackgroundHealth::of(&app),
        listener: ListenerHealth::of(&app),
        reason: None,
    };
    match reads {
        Ok(()) if app.inner().clock_check.unready() => {
            readiness.status = ReadinessStatus::Unavailable;
            readiness.reason = Some("clock skewed");
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(readiness)).into_response()
        }
        Ok(()) => axum::Json(readiness).into_response(),
        Err((kind, _)) => {
            readiness.status = ReadinessStatus::Unavailable;
            readiness.reason = Some(kind);
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(readiness)).into_response()
        }
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prometheus metrics (OpenMetrics 1.0 text format).
#[utoipa::path(get, path = "/metrics", tag = TAG, responses((status = 200, description = "Metrics.", content_type = OPENMETRICS, body = String)))]
async fn metrics(State(app): State<App>) -> Response {
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        app.inner().metrics.render(),
    )
        .into_response()
}

/// This OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = TAG, responses((status = 200, description = "OpenAPI document.", content_type = "application/json")))]
async fn openapi_json(State(app): State<App>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.inner().openapi_json.clone(),
    )
        .into_response()
}

/// The API reference, rendered from the OpenAPI document.
#[utoipa::path(get, path = "/docs", tag = TAG, responses((status = 200, description = "HTML API reference.", content_type = "text/html")))]
async fn docs(State(app): State<App>) -> Html<axum::body::Bytes> {
    Html(app.inner().docs_html.clone())
}

/// Unknown routes answer in the dialect of the surface the path belongs to.
pub(crate) async fn not_found(uri: axum::http::Uri) -> Response {
    crate::error::render_for_path(uri.path(), AppError::Domain(DomainError::NotFound))
}

pub(crate) async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    crate::error::render_for_path(uri.path(), AppError::MethodNotAllowed)
}
