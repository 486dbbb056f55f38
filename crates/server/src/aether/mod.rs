//! The Aether platform API: `/api/v1/organizations/{orgID}/...`, errors as
//! `{"error":{"code","message","details"}}`.

mod api_tokens;
mod audit;
mod policy;
mod registry;
mod server_wire;
pub(crate) mod webhooks;

/// The wire shapes, shared with the client; the server's half is in `server_wire`.
pub use keyplane_api_types::aether as wire;

pub use audit::{parse_audit_query, AuditEventPage, AuditEventView};

use crate::app::App;
use crate::error::{AppError, Surface};
use keyplane_core::Error as DomainError;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Marker for the Aether surface's error dialect.
pub struct Aether;

pub type ApiError = crate::error::ApiError<Aether>;
/// Path parameters, rejected in this surface's error format.
type Path<T> = crate::extract::PathParams<Aether, T>;

pub const TAG_API_TOKENS: &str = "Aether: API tokens";
pub const TAG_REGISTRY: &str = "Aether: registry and robot accounts";
pub const TAG_AUDIT: &str = "Aether: audit events";
pub const TAG_POLICY: &str = "Aether: credential policy";
pub const TAG_WEBHOOKS: &str = "Aether: webhooks";

fn org_id(raw: &str) -> Result<keyplane_core::TenantId, DomainError> {
    crate::extract::path_id("orgID", raw, keyplane_core::TenantId::parse)
}

fn resource_id(raw: &str) -> Result<keyplane_core::CredentialId, DomainError> {
    crate::extract::path_id("id", raw, keyplane_core::CredentialId::parse)
}

impl Surface for Aether {
    fn error_body(error: &AppError) -> serde_json::Value {
        let code = match error {
            AppError::Unauthenticated(_) => "unauthorized",
            AppError::Domain(DomainError::Validation(_)) => "validation_failed",
            AppError::Domain(DomainError::NotFound) => "not_found",
            AppError::Domain(DomainError::Forbidden(_)) => "forbidden",
            AppError::Domain(DomainError::Conflict(_)) | AppError::IdempotencyKeyInFlight => {
                "conflict"
            }
            AppError::InvalidJson(_) => "invalid_json",
            AppError::UnsupportedMediaType(_) => "unsupported_media_type",
            AppError::PayloadTooLarge => "payload_too_large",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::RateLimited { .. } => "rate_limited",
            AppError::Unavailable(_)
            | AppError::UpstreamUnavailable { .. }
            | AppError::OverBudget { .. } => "unavailable",
            AppError::Internal(_) => "internal",
        };
        let mut body = json!({ "code": code, "message": error.public_message() });
        if let AppError::Domain(DomainError::Validation(fields)) = error {
            body["details"] = fields
                .iter()
                .map(|f| json!({ "field": f.path.to_string(), "code": f.code, "message": f.message }))
                .collect();
        }
        json!({ "error": body })
    }
}

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(
            api_tokens::list_api_tokens,
            api_tokens::create_api_token
        ))
        .routes(routes!(
            api_tokens::get_api_token,
            api_tokens::delete_api_token
        ))
        .routes(routes!(api_tokens::rotate_api_token))
        .routes(routes!(api_tokens::suspend_api_token))
        .routes(routes!(api_tokens::resume_api_token))
        .routes(routes!(api_tokens::retire_previous_api_token_secret))
        .routes(routes!(
            policy::get_credential_policy,
            policy::put_credential_policy
        ))
        .routes(routes!(registry::get_registry, registry::enable_registry))
        .routes(routes!(
            registry::list_robot_accounts,
            registry::create_robot_account
        ))
        .routes(routes!(
            registry::get_robot_account,
            registry::update_robot_account,
            registry::delete_robot_account
        ))
        .routes(routes!(registry::rotate_robot_account))
        .routes(routes!(registry::suspend_robot_account))
        .routes(routes!(registry::resume_robot_account))
        .routes(routes!(registry::retire_previous_robot_secret))
        .routes(routes!(audit::list_audit_events))
        .routes(routes!(webhooks::list_webhooks, webhooks::create_webhook))
        .routes(routes!(
            webhooks::get_webhook,
            webhooks::update_webhook,
            webhooks::delete_webhook
        ))
        .routes(routes!(webhooks::rotate_webhook_secret))
        .routes(routes!(webhooks::list_webhook_deliveries))
        .routes(routes!(webhooks::retry_webhook_delivery))
}
