//! `/api/v1/organizations/{orgID}/api-tokens`

use super::wire::{
    ApiTokenCreated, ApiTokenPage, ApiTokenView, CreateApiTokenRequest, ErrorEnvelope,
};
use super::Path;
use super::{org_id, resource_id as token_id, Aether, ApiError, TAG_API_TOKENS};
use crate::app::App;
use crate::extract::Authenticated;
use crate::extract::PathParams;
use crate::idempotency::{IdempotencyKeyHeader, IdempotentJson, IdempotentOptionalJson};
use crate::ops::{self, CredentialSpec, ListSpec, API_TOKENS};
use crate::wire::RotateRequest;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use keyplane_core::error::codes;
use keyplane_core::{CredentialId, Error as DomainError, FieldError, FieldPath};
use std::collections::HashMap;

type Caller = Authenticated<Aether>;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 100;

/// Create an API token
///
/// Creates a new API token. The raw token secret is returned only in this response and is never
/// retrievable again. Needs `api_tokens:write`, and the new token's scopes must all be held by the
/// caller. With `"canary": true` it is a canary: it authenticates nowhere, its scopes are shown but
/// never honoured, and every presentation is recorded as `credential.canary_triggered`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/api-tokens", tag = TAG_API_TOKENS,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), IdempotencyKeyHeader),
    request_body = CreateApiTokenRequest,
    responses(
        (status = 201, description = "Token created. Contains the one-time raw secret.", body = ApiTokenCreated),
        (status = 400, description = "Malformed JSON.", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `api_tokens:write` or a requested scope.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 409, description = "A live token with this name exists, the organization holds the most live credentials the server allows (`--max-live-credentials-per-org`; revoke one, or the operator raises it), or a request with this Idempotency-Key is still in progress.", body = ErrorEnvelope),
        (status = 413, description = "Body over 64 KiB.", body = ErrorEnvelope),
        (status = 415, description = "Body is not application/json.", body = ErrorEnvelope),
        (status = 422, description = "Request validation failed, or the Idempotency-Key is malformed or was used with a different request.", body = ErrorEnvelope),
        (status = 429, description = "Rate limited; see Retry-After.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn create_api_token(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams(org, _): Path<String>,
    IdempotentJson(idempotency, request): IdempotentJson<Aether, CreateApiTokenRequest>,
) -> Result<Response, ApiError> {
    let org = org_id(&org)?;
    let spec = CredentialSpec {
        name: request.name,
        scopes: request.scopes,
        permissions: Vec::new(),
        expires_at: request.expires_at,
        canary: request.canary,
    };
    let render = |issued| (StatusCode::CREATED, ApiTokenCreated::from(issued));
    Ok(idempotency
        .run(
            app,
            who,
            org,
            &[API_TOKENS.write],
            render,
            move |app, who, seal| async move {
                let answer = seal.answer();
                Ok(
                    ops::create_credential(&app, &who, &context, org, API_TOKENS, spec, answer)
                        .await?,
                )
            },
        )
        .await)
}

fn parse_page(
    query: &HashMap<String, String>,
) -> Result<(Option<CredentialId>, u32, Option<u32>), DomainError> {
    let mut errors = Vec::new();
    let expiring = crate::extract::expiring_within_days(query).unwrap_or_else(|e| {
        errors.push(e);
        None
    });
    let cursor = match query.get("cursor").map(String::as_str) {
        None => None,
        Some(raw) => CredentialId::parse(raw).or_else(|| {
            errors.push(FieldError::new(
                FieldPath::query("cursor"),
                codes::INVALID_UUID,
                "must be a UUID",
            ));
            None
        }),
    };
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
        Ok((cursor, limit, expiring))
    } else {
        Err(DomainError::Validation(errors))
    }
}

/// List API tokens
///
/// Live tokens in creation order, `limit` (1–100, default 50) at a time; pass `next_cursor` back
/// as `cursor` for the next page. Secrets are never returned. Needs `api_tokens:read`; canary tokens
/// are listed (with `canary: true`) only to callers holding `api_tokens:write`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/api-tokens", tag = TAG_API_TOKENS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("cursor" = Option<Uuid>, Query, description = "`next_cursor` of the previous page (a UUID; an empty value is refused)."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size, 1–100 (default 50)."),
        ("expiring_within_days" = Option<u32>, Query, minimum = 1, maximum = 3650, description = "Only tokens that have not expired yet and expire within this many days (1–3650)."),
    ),
    responses(
        (status = 200, description = "A page of tokens.", body = ApiTokenPage),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `api_tokens:read`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 422, description = "Bad `cursor`, `limit` or `expiring_within_days`.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn list_api_tokens(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams(org, _): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ApiTokenPage>, ApiError> {
    let org = org_id(&org)?;
    let (cursor, limit, expiring) = parse_page(&query)?;
    let spec = ListSpec {
        after: cursor,
        limit: Some(limit),
        expiring_within_days: expiring,
        ..ListSpec::default()
    };
    let (page, next) = ops::list_credentials(&app, &who, org, API_TOKENS, spec).await?;
    Ok(Json(ApiTokenPage {
        items: page.into_iter().map(ApiTokenView::from).collect(),
        next_cursor: next.map(|id| id.as_uuid()),
    }))
}

/// Get an API token
///
/// Needs `api_tokens:read`. Revoked tokens are not found, nor are canaries without
/// `api_tokens:write`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/api-tokens/{id}", tag = TAG_API_TOKENS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "API token id."),
    ),
    responses(
        (status = 200, description = "The token, without its secret.", body = ApiTokenView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `api_tokens:read`.", body = ErrorEnvelope),
        (status = 404, description = "No such live token.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn get_api_token(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<ApiTokenView>, ApiError> {
    let (org, id) = (org_id(&org)?, token_id(&id)?);
    let credential = ops::get_live_credential(&app, &who, org, API_TOKENS, id).await?;
    Ok(Json(credential.into()))
}

/// Revoke an API token
///
/// The token stops working at once, for good. Needs `api_tokens:write` and every scope the token
/// holds (an `api_tokens:write` token cannot revoke a `*` token).
#[utoipa::path(
    delete, path = "/api/v1/organizations/{orgID}/api-tokens/{id}", tag = TAG_API_TOKENS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "API token id."),
    ),
    responses(
        (status = 204, description = "Revoked."),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `api_tokens:write` or a scope the token holds.", body = ErrorEnvelope),
        (status = 404, description = "No such live token.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn delete_api_token(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (org, id) = (org_id(&org)?, token_id(&id)?);
    let (_, revoked_now) =
        ops::revoke_credential(&app, &who, &context, org, API_TOKENS, id).await?;
    if revoked_now {
        Ok(StatusCode::NO_CONTENT)
    } else {
        // Already revoked: to an Aether client, a deleted token is gone.
        Err(DomainError::NotFound.into())
    }
}

/// Rotate an API token
///
/// Replaces the secret and keeps the id. Without a body (or with `grace_seconds` 0) the old secret
/// stops working at once; with `{"grace_seconds": N}` both work for N seconds (and
/// `retire_when_unused_seconds` ends the old one earlier once it goes unused). Rotating again
/// during a grace period ends the earlier previous secret at once. The new raw secret is returned
/// only in this response. Needs `api_tokens:write` and every scope the token holds.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/api-tokens/{id}/rotate", tag = TAG_API_TOKENS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "API token id."),
        IdempotencyKeyHeader,
    ),
    request_body(content = Option<RotateRequest>, description = "Optional: the grace period and cutover (no body: the old secret stops at once)."),
    responses(
        (status = 200, description = "Rotated. Contains the new one-time raw secret.", body = ApiTokenCreated),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `api_tokens:write` or one of the token's scopes.", body = ErrorEnvelope),
        (status = 404, description = "No such live token.", body = ErrorEnvelope),
        (status = 409, description = "The token is a canary (canaries are never rotated), has expired, another rotation of it happened at the same time, or a request with this Idempotency-Key is still in progress.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID, a body field is invalid, the resulting expiry breaks the organization's credential policy (`policy_violation`), or the Idempotency-Key is malformed or was used with a different request.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn rotate_api_token(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
    IdempotentOptionalJson(idempotency, request): IdempotentOptionalJson<Aether, RotateRequest>,
) -> Result<Response, ApiError> {
    let (org, id) = (org_id(&org)?, token_id(&id)?);
    let spec = crate::wire::rotate_spec(&request);
    let render = |issued| (StatusCode::OK, ApiTokenCreated::from(issued));
    Ok(idempotency
        .run(
            app,
            who,
            org,
            &[API_TOKENS.write],
            render,
            move |app, who, seal| async move {
                let answer = seal.answer();
                Ok(ops::rotate_live_credential(
                    &app, &who, &context, org, API_TOKENS, id, spec, answer,
                )
                .await?)
            },
        )
        .await)
}

/// Suspend an API token
///
/// The token stops authenticating everywhere (401; `active: false` in introspection) but keeps its
/// id, scopes and secret: `resume` brings it back. Suspending a suspended token changes nothing.
/// Needs what revoking needs: `api_tokens:write` and every scope the token holds.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/api-tokens/{id}/suspend", tag = TAG_API_TOKENS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "API token id."),
    ),
    responses(
        (status = 200, description = "Suspended (`suspended_at` is set).", body = ApiTokenView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `api_tokens:write` or one of the token's scopes.", body = ErrorEnvelope),
        (status = 404, description = "No such live token.", body = ErrorEnvelope),
        (status = 409, description = "The token is a canary: canaries are never suspended or resumed.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn suspend_api_token(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<ApiTokenView>, ApiError> {
    let (org, id) = (org_id(&org)?, token_id(&id)?);
    let credential = ops::set_suspended(&app, &who, &context, org, API_TOKENS, id, true, || {
        DomainError::NotFound
    })
    .await?;
    Ok(Json(credential.into()))
}

/// Resume an API token
///
/// Ends a suspension: the token authenticates again. Resuming a token that is not suspended
/// changes nothing. Needs `api_tokens:write` and every scope the token holds.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/api-tokens/{id}/resume", tag = TAG_API_TOKENS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "API token id."),
    ),
    responses(
        (status = 200, description = "Active again (`suspended_at` is null).", body = ApiTokenView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `api_tokens:write` or one of the token's scopes.", body = ErrorEnvelope),
        (status = 404, description = "No such live token.", body = ErrorEnvelope),
        (status = 409, description = "The token is a canary: canaries are never suspended or resumed.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn resume_api_token(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<ApiTokenView>, ApiError> {
    let (org, id) = (org_id(&org)?, token_id(&id)?);
    let credential = ops::set_suspended(&app, &who, &context, org, API_TOKENS, id, false, || {
        DomainError::NotFound
    })
    .await?;
    Ok(Json(credential.into()))
}

/// Retire an API token's previous secret
///
/// Ends, now, the previous secret a rotation with a grace period kept working. Without one the
/// token is returned unchanged. Needs `api_tokens:write` and every scope the token holds.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/api-tokens/{id}/retire-previous", tag = TAG_API_TOKENS,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("id" = Uuid, Path, description = "API token id."),
    ),
    responses(
        (status = 200, description = "The token; `previous_secret_expires_at` is null.", body = ApiTokenView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `api_tokens:write` or one of the token's scopes.", body = ErrorEnvelope),
        (status = 404, description = "No such live token.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn retire_previous_api_token_secret(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<ApiTokenView>, ApiError> {
    let (org, id) = (org_id(&org)?, token_id(&id)?);
    let credential = ops::retire_previous_secret(&app, &who, &context, org, API_TOKENS, id, || {
        DomainError::NotFound
    })
    .await?;
    Ok(Json(credential.into()))
}
