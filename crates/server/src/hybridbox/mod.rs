//! The Hybridbox public API: `/v1/public/accounts/{account_id}/auth/...`, errors in the FastAPI
//! dialect its docs come from: 422 `{"detail":[{"loc","msg","type"}]}` (a body that is not JSON
//! included, as `json_invalid`), otherwise `{"detail": "..."}`.

mod authorizations;
mod server_wire;
mod service_accounts;

/// The wire shapes, shared with the client; the server's half is in `server_wire`.
pub use keyplane_api_types::hybridbox as wire;

use crate::app::App;
use crate::error::{AppError, Surface};
use keyplane_core::error::codes;
use keyplane_core::{Error as DomainError, FieldError, FieldLocation, PathSegment};
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Marker for the Hybridbox surface's error dialect.
pub struct Hybridbox;

pub type ApiError = crate::error::ApiError<Hybridbox>;
/// Path parameters, rejected in this surface's error format.
type Path<T> = crate::extract::PathParams<Hybridbox, T>;

pub const TAG_SERVICE_ACCOUNTS: &str = "Hybridbox: service accounts";
pub const TAG_AUTHORIZATIONS: &str = "Hybridbox: authorizations";

/// pydantic's error `type` where one matches ours; otherwise keyplane's stable code.
fn error_type(code: &'static str) -> &'static str {
    match code {
        codes::REQUIRED => "missing",
        codes::UNKNOWN_FIELD => "extra_forbidden",
        codes::TOO_SHORT => "string_too_short",
        codes::TOO_LONG => "string_too_long",
        codes::INVALID_UUID => "uuid_parsing",
        codes::INVALID_CHOICE => "enum",
        codes::INVALID_BOOL => "bool_parsing",
        other => other,
    }
}

fn loc(error: &FieldError) -> Value {
    let location = match error.path.location {
        FieldLocation::Body => "body",
        FieldLocation::Query => "query",
        FieldLocation::Path => "path",
        FieldLocation::Header => "header",
    };
    let mut parts = vec![json!(location)];
    parts.extend(error.path.segments.iter().map(|segment| match segment {
        PathSegment::Key(key) => json!(key),
        PathSegment::Index(index) => json!(index),
    }));
    Value::Array(parts)
}

impl Surface for Hybridbox {
    fn error_body(error: &AppError) -> Value {
        match error {
            AppError::Domain(DomainError::Validation(fields)) => json!({
                "detail": fields
                    .iter()
                    .map(|f| json!({ "loc": loc(f), "msg": f.message, "type": error_type(f.code) }))
                    .collect::<Vec<_>>()
            }),
            // FastAPI's answer to a body that is not JSON: a validation error of the body.
            AppError::InvalidJson(cause) => json!({
                "detail": [{
                    "loc": ["body"],
                    "msg": format!("JSON decode error: {cause}"),
                    "type": "json_invalid",
                }]
            }),
            other => json!({ "detail": other.public_message() }),
        }
    }

    fn status(error: &AppError) -> axum::http::StatusCode {
        match error {
            AppError::InvalidJson(_) => axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            other => other.status(),
        }
    }
}

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(
            service_accounts::list_service_accounts,
            service_accounts::create_service_account
        ))
        .routes(routes!(service_accounts::revoke_service_account))
        .routes(routes!(service_accounts::rotate_service_account))
        .routes(routes!(service_accounts::suspend_service_account))
        .routes(routes!(service_accounts::resume_service_account))
        .routes(routes!(
            service_accounts::retire_previous_service_account_token
        ))
        .routes(routes!(
            authorizations::list_authorizations,
            authorizations::create_authorization
        ))
        .routes(routes!(authorizations::revoke_authorization))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyplane_core::FieldPath;

    #[test]
    fn validation_errors_render_as_fastapi_detail_lists() {
        let error = AppError::Domain(DomainError::Validation(vec![
            FieldError::new(FieldPath::body("name"), codes::REQUIRED, "is required"),
            FieldError::new(
                FieldPath::body("scopes").index(2),
                codes::INVALID_SCOPE,
                "bad",
            ),
            FieldError::new(
                FieldPath::query("include_revoked"),
                codes::INVALID_BOOL,
                "bool",
            ),
        ]));
        assert_eq!(
            Hybridbox::error_body(&error),
            json!({"detail": [
                {"loc": ["body", "name"], "msg": "is required", "type": "missing"},
                {"loc": ["body", "scopes", 2], "msg": "bad", "type": "invalid_scope"},
                {"loc": ["query", "include_revoked"], "msg": "bool", "type": "bool_parsing"},
            ]})
        );
    }

    #[test]
    fn other_errors_render_as_a_detail_string() {
        let cases = [
            (AppError::Unauthenticated("unknown"), 401),
            (AppError::Domain(DomainError::NotFound), 404),
            (
                AppError::Domain(DomainError::Conflict("revoked".into())),
                409,
            ),
            (AppError::PayloadTooLarge, 413),
            (
                AppError::RateLimited {
                    retry_after_secs: 3,
                },
                429,
            ),
            (AppError::Internal(anyhow::anyhow!("secret cause")), 500),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status);
            let body = Hybridbox::error_body(&error);
            assert!(body["detail"].is_string(), "{body}");
            assert!(!body.to_string().contains("secret cause"));
        }
    }
}
