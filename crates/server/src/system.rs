//! Operations endpoints: health, readiness, metrics, the OpenAPI document and the API reference.

use crate::app::App;
use crate::error::AppError;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use keyplane_core::Error as DomainError;
use serde_json::json;
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

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = TAG, responses((status = 200, description = "Alive.")))]
async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = TAG, responses(
    (status = 200, description = "Ready."),
    (status = 503, description = "The store is unreachable."),
))]
async fn readyz(State(app): State<App>) -> Response {
    let backend = app.store().backend();
    match app.store().ping().await {
        Ok(()) => axum::Json(json!({ "status": "ready", "store": backend })).into_response(),
        Err(error) => {
            tracing::warn!(error = %error, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({ "status": "unavailable", "store": backend })),
            )
                .into_response()
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
async fn docs(State(app): State<App>) -> Html<String> {
    Html(crate::docs::render(&app.inner().openapi_json))
}

/// Unknown routes answer in the dialect of the surface the path belongs to.
pub(crate) async fn not_found(uri: axum::http::Uri) -> Response {
    crate::error::render_for_path(uri.path(), AppError::Domain(DomainError::NotFound))
}

pub(crate) async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    crate::error::render_for_path(uri.path(), AppError::MethodNotAllowed)
}
