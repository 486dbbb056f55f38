//! `/api/v1/organizations/{orgID}/webhooks`: endpoints that receive the organization's audit
//! events, signed per Standard Webhooks, and their deliveries. The shapes live in
//! `keyplane_api_types::webhooks` (shared with the client); this is the server's half: reading a
//! body field by field, and building answers.

use super::wire::ErrorEnvelope;
use super::Path;
use super::{org_id, Aether, ApiError, TAG_WEBHOOKS};
use crate::app::App;
use crate::extract::PathParams;
use crate::extract::{path_id, ApiJson, Authenticated, FromJsonBody, ObjectReader};
use crate::idempotency::{Idempotency, IdempotencyKeyHeader, IdempotentJson};
use crate::webhooks::{self, target, WebhookSpec};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, Utc};
use keyplane_api_types::webhooks::{
    WebhookCreated, WebhookDeliveryPage, WebhookDeliveryView, WebhookList, WebhookRequest,
    WebhookView,
};
use keyplane_core::error::codes;
use keyplane_core::validate::is_disguising;
use keyplane_core::{
    ActionPattern, Capability, DeliveryStatus, Error as DomainError, FieldError, FieldPath,
};
use keyplane_store::WebhookDelivery;
use std::collections::HashMap;
use uuid::Uuid;

type Caller = Authenticated<Aether>;
pub(crate) const MAX_DESCRIPTION_CHARS: usize = 500;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 100;

fn webhook_id(raw: &str) -> Result<Uuid, DomainError> {
    path_id("id", raw, |text| Uuid::parse_str(text).ok())
}

fn delivery_id(raw: &str) -> Result<Uuid, DomainError> {
    path_id("delivery_id", raw, |text| Uuid::parse_str(text).ok())
}

pub(crate) fn description(path: FieldPath, raw: &str) -> Result<String, FieldError> {
    let trimmed = raw.trim();
    if trimmed.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(FieldError::new(
            path,
            codes::TOO_LONG,
            format!("must have at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    if trimmed.chars().any(is_disguising) {
        return Err(FieldError::new(
            path,
            codes::INVALID_CHARACTERS,
            "must not contain control, format (such as bidi override or zero-width) or line separator characters",
        ));
    }
    Ok(trimmed.to_string())
}

impl FromJsonBody for WebhookRequest {
    fn from_json(r: &mut ObjectReader, _now: DateTime<Utc>) -> Option<Self> {
        let url = r
            .string("url")
            .and_then(|raw| r.check(target::parse_url(FieldPath::body("url"), &raw)));
        let events = match r.string_list("events") {
            Ok(Some(raw)) => {
                r.check_all(ActionPattern::parse_list(&FieldPath::body("events"), &raw))
            }
            Ok(None) => r.check(Err(FieldError::new(
                FieldPath::body("events"),
                codes::REQUIRED,
                "is required",
            ))),
            Err(()) => None,
        };
        let description = r.nullable_checked("description", description);
        let enabled = r.optional_bool("enabled", true);
        Some(Self {
            url: url?,
            events: events?,
            description: description?.unwrap_or_default(),
            enabled: enabled?,
        })
    }
}

impl From<WebhookRequest> for WebhookSpec {
    fn from(request: WebhookRequest) -> Self {
        Self {
            url: request.url,
            events: request.events,
            description: request.description,
            enabled: request.enabled,
        }
    }
}

/// The view of a stored delivery (a free function: both types are other crates').
fn delivery_view(delivery: WebhookDelivery) -> WebhookDeliveryView {
    WebhookDeliveryView {
        id: delivery.event_id,
        webhook_id: delivery.webhook_id,
        event_type: delivery.action,
        status: delivery.status.as_str().to_string(),
        attempts: delivery.attempts,
        created_at: delivery.created_at,
        next_attempt_at: delivery.next_attempt_at,
        last_attempt_at: delivery.last_attempt_at,
        last_response_code: delivery.last_status_code,
        last_latency_ms: delivery.last_latency_ms,
        last_error: delivery.last_error,
    }
}

/// Create a webhook
///
/// The organization's audit events whose action matches `events` are POSTed to `url` as
/// `{"type", "timestamp", "data"}` (`data`: the event as `GET .../audit-events` shows it), signed
/// per Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
/// HMAC-SHA256>`), at least once: retried after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h
/// (each delay stretched by 0–20 % jitter; over 27 h in all), then marked failed. A webhook whose
/// attempts all fail for 5 days is disabled. The signing secret is returned only in this
/// response. Needs `webhooks:manage` and `audit:read` (a subscription sends the audit trail out).
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/webhooks", tag = TAG_WEBHOOKS,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), IdempotencyKeyHeader),
    request_body = WebhookRequest,
    responses(
        (status = 201, description = "Created. Contains the one-time signing secret.", body = WebhookCreated),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `webhooks:manage` or `audit:read`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 409, description = "The organization has 20 webhooks already, or a request with this Idempotency-Key is still in progress.", body = ErrorEnvelope),
        (status = 422, description = "Request validation failed (a refused target address included), or the Idempotency-Key is malformed or was used with a different request.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn create_webhook(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams(org, _): Path<String>,
    IdempotentJson(idempotency, request): IdempotentJson<Aether, WebhookRequest>,
) -> Result<Response, ApiError> {
    let org = org_id(&org)?;
    let render = |webhook| (StatusCode::CREATED, WebhookCreated::from(webhook));
    let needs = [Capability::WebhooksManage, Capability::AuditRead];
    Ok(idempotency
        .run(
            app,
            who,
            org,
            &needs,
            render,
            move |app, who, seal| async move {
                let answer = seal.answer();
                Ok(
                    webhooks::create_webhook(&app, &who, &context, org, request.into(), answer)
                        .await?,
                )
            },
        )
        .await)
}

/// List webhooks
///
/// Every webhook of the organization, oldest first, without secrets. Needs `webhooks:manage`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/webhooks", tag = TAG_WEBHOOKS,
    params(("orgID" = Uuid, Path, description = "Organization UUID.")),
    responses(
        (status = 200, description = "The webhooks.", body = WebhookList),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `webhooks:manage`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 422, description = "The organization id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn list_webhooks(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams(org, _): Path<String>,
) -> Result<Json<WebhookList>, ApiError> {
    let org = org_id(&org)?;
    let list = webhooks::list_webhooks(&app, &who, org).await?;
    Ok(Json(WebhookList {
        items: list.iter().map(WebhookView::from).collect(),
    }))
}

/// Get a webhook
///
/// Needs `webhooks:manage`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/webhooks/{id}", tag = TAG_WEBHOOKS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "Webhook id."),
    ),
    responses(
        (status = 200, description = "The webhook, without its secret.", body = WebhookView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `webhooks:manage`.", body = ErrorEnvelope),
        (status = 404, description = "No such webhook.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn get_webhook(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<WebhookView>, ApiError> {
    let (org, id) = (org_id(&org)?, webhook_id(&id)?);
    let webhook = webhooks::get_webhook(&app, &who, org, id).await?;
    Ok(Json(WebhookView::from(&webhook)))
}

/// Update a webhook
///
/// Replaces `url`, `events`, `description` (default empty) and `enabled` (default true); the
/// secret stays. Needs `webhooks:manage` and `audit:read`.
#[utoipa::path(
    put, path = "/api/v1/organizations/{orgID}/webhooks/{id}", tag = TAG_WEBHOOKS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "Webhook id."),
    ),
    request_body = WebhookRequest,
    responses(
        (status = 200, description = "The updated webhook.", body = WebhookView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `webhooks:manage` or `audit:read`.", body = ErrorEnvelope),
        (status = 404, description = "No such webhook.", body = ErrorEnvelope),
        (status = 422, description = "Request validation failed (a refused target address included).", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn update_webhook(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
    ApiJson(request, ..): ApiJson<Aether, WebhookRequest>,
) -> Result<Json<WebhookView>, ApiError> {
    let (org, id) = (org_id(&org)?, webhook_id(&id)?);
    let webhook = webhooks::update_webhook(&app, &who, &context, org, id, request.into()).await?;
    Ok(Json(WebhookView::from(&webhook)))
}

/// Delete a webhook
///
/// No more deliveries, pending ones included; its delivery history goes with it. Needs
/// `webhooks:manage`.
#[utoipa::path(
    delete, path = "/api/v1/organizations/{orgID}/webhooks/{id}", tag = TAG_WEBHOOKS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "Webhook id."),
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `webhooks:manage`.", body = ErrorEnvelope),
        (status = 404, description = "No such webhook.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn delete_webhook(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (org, id) = (org_id(&org)?, webhook_id(&id)?);
    webhooks::delete_webhook(&app, &who, &context, org, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rotate a webhook's signing secret
///
/// A new secret, returned only in this response. For 24 hours every delivery carries two
/// signatures in `webhook-signature`, one per secret, so receivers verifying with either accept
/// it while they switch. Needs `webhooks:manage`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/webhooks/{id}/rotate-secret", tag = TAG_WEBHOOKS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "Webhook id."),
        IdempotencyKeyHeader,
    ),
    responses(
        (status = 200, description = "Rotated. Contains the new one-time signing secret.", body = WebhookCreated),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `webhooks:manage`.", body = ErrorEnvelope),
        (status = 404, description = "No such webhook.", body = ErrorEnvelope),
        (status = 409, description = "A request with this Idempotency-Key is still in progress.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID, or the Idempotency-Key is malformed or was used with a different request.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn rotate_webhook_secret(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
    idempotency: Idempotency<Aether>,
) -> Result<Response, ApiError> {
    let (org, id) = (org_id(&org)?, webhook_id(&id)?);
    let render = |webhook| (StatusCode::OK, WebhookCreated::from(webhook));
    Ok(idempotency
        .run(
            app,
            who,
            org,
            &[Capability::WebhooksManage],
            render,
            move |app, who, seal| async move {
                let answer = seal.answer();
                Ok(webhooks::rotate_webhook_secret(&app, &who, &context, org, id, answer).await?)
            },
        )
        .await)
}

fn parse_delivery_page(
    query: &HashMap<String, String>,
) -> Result<(Option<Uuid>, Option<DeliveryStatus>, u32), DomainError> {
    let mut errors = Vec::new();
    let cursor = query.get("cursor").and_then(|raw| {
        Uuid::parse_str(raw).ok().or_else(|| {
            errors.push(FieldError::new(
                FieldPath::query("cursor"),
                codes::INVALID_UUID,
                "must be a UUID",
            ));
            None
        })
    });
    let status = query.get("status").and_then(|raw| {
        DeliveryStatus::parse(raw).or_else(|| {
            errors.push(FieldError::new(
                FieldPath::query("status"),
                codes::INVALID_CHOICE,
                "must be one of: pending, succeeded, failed",
            ));
            None
        })
    });
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(raw) => match raw.parse::<u32>() {
            Ok(limit) if (1..=MAX_PAGE).contains(&limit) => limit,
            _ => {
                errors.push(FieldError::new(
                    FieldPath::query("limit"),
                    codes::OUT_OF_RANGE,
                    format!("must be an integer from 1 to {MAX_PAGE}"),
                ));
                DEFAULT_PAGE
            }
        },
    };
    if errors.is_empty() {
        Ok((cursor, status, limit))
    } else {
        Err(DomainError::Validation(errors))
    }
}

/// List a webhook's deliveries
///
/// Newest event first, `limit` (1–100, default 50) at a time; pass `next_cursor` back as `cursor`
/// for older ones. Each shows its status, attempts, the last answer's status code and latency, and
/// when the next attempt is due. Finished deliveries are kept 30 days. Needs `webhooks:manage`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/webhooks/{id}/deliveries", tag = TAG_WEBHOOKS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "Webhook id."),
        ("cursor" = Option<Uuid>, Query, description = "`next_cursor` of the previous page (a UUID; an empty value is refused)."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size, 1–100 (default 50)."),
        ("status" = Option<String>, Query, description = "`pending`, `succeeded` or `failed`."),
    ),
    responses(
        (status = 200, description = "A page of deliveries.", body = WebhookDeliveryPage),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `webhooks:manage`.", body = ErrorEnvelope),
        (status = 404, description = "No such webhook.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID, or a bad `cursor`, `limit` or `status`.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn list_webhook_deliveries(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams((org, id), _): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<WebhookDeliveryPage>, ApiError> {
    let (org, id) = (org_id(&org)?, webhook_id(&id)?);
    let (cursor, status, limit) = parse_delivery_page(&query)?;
    let (page, next) =
        webhooks::list_deliveries(&app, &who, org, id, cursor, status, limit).await?;
    Ok(Json(WebhookDeliveryPage {
        items: page.into_iter().map(delivery_view).collect(),
        next_cursor: next,
    }))
}

/// Retry a delivery
///
/// Attempts the delivery once more, now, whatever its status (a failure then leaves it failed).
/// A delivery already due (queued by an earlier retry, or being attempted) is answered as it is
/// and nothing is recorded, so a retry whose answer was lost can safely be sent again. Needs
/// `webhooks:manage`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/webhooks/{id}/deliveries/{delivery_id}/retry", tag = TAG_WEBHOOKS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "Webhook id."),
        ("delivery_id" = Uuid, Path, description = "Delivery id (the event's id)."),
    ),
    responses(
        (status = 202, description = "Queued for an attempt now; `GET .../deliveries` shows how it went.", body = WebhookDeliveryView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `webhooks:manage`.", body = ErrorEnvelope),
        (status = 404, description = "No such webhook or delivery.", body = ErrorEnvelope),
        (status = 409, description = "The webhook is disabled.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn retry_webhook_delivery(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id, delivery), _): Path<(String, String, String)>,
) -> Result<(StatusCode, Json<WebhookDeliveryView>), ApiError> {
    let (org, id, delivery) = (org_id(&org)?, webhook_id(&id)?, delivery_id(&delivery)?);
    let delivery = webhooks::retry_delivery(&app, &who, &context, org, id, delivery).await?;
    Ok((StatusCode::ACCEPTED, Json(delivery_view(delivery))))
}
