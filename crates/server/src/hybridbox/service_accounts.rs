//! `/v1/public/accounts/{account_id}/auth/service-accounts`

use super::wire::{
    CreateServiceAccountRequest, ErrorMessage, ServiceAccountCreated, ServiceAccountView,
    ValidationErrorBody,
};
use super::Path;
use super::{ApiError, Hybridbox, TAG_SERVICE_ACCOUNTS};
use crate::app::App;
use crate::extract::PathParams;
use crate::extract::{path_id, query_bool, Authenticated};
use crate::idempotency::{IdempotencyKeyHeader, IdempotentJson, IdempotentOptionalJson};
use crate::ops::{self, CredentialSpec, SERVICE_ACCOUNTS};
use crate::streamed_list;
use crate::wire::RotateRequest;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use keyplane_core::{CredentialId, Error as DomainError, ScopeSet, TenantId};
use std::collections::HashMap;

type Caller = Authenticated<Hybridbox>;

pub(super) fn account_id(raw: &str) -> Result<TenantId, DomainError> {
    path_id("account_id", raw, TenantId::parse)
}

fn service_account_id(raw: &str) -> Result<CredentialId, DomainError> {
    path_id("service_account_id", raw, CredentialId::parse)
}

/// List Service Accounts
///
/// Every service account of the account, oldest first; revoked ones only with
/// `include_revoked=true`. Tokens are never returned. Needs `auth.manage`.
#[utoipa::path(
    get, path = "/v1/public/accounts/{account_id}/auth/service-accounts", tag = TAG_SERVICE_ACCOUNTS,
    params(
        ("account_id" = Uuid, Path),
        ("include_revoked" = Option<bool>, Query, description = "Include revoked service accounts (default false)."),
        ("expiring_within_days" = Option<u32>, Query, minimum = 1, maximum = 3650, description = "Only live service accounts that have not expired yet and expire within this many days (1–3650)."),
    ),
    responses(
        (status = 200, description = "Successful Response", body = Vec<ServiceAccountView>),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage`.", body = ErrorMessage),
        (status = 404, description = "No such account for this caller.", body = ErrorMessage),
        (status = 422, description = "Validation Error", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn list_service_accounts(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams(account, _): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let account = account_id(&account)?;
    let include_revoked = query_bool(&query, "include_revoked", false);
    let expiring = crate::extract::expiring_within_days(&query);
    let (include_revoked, expiring) = match (include_revoked, expiring) {
        (Ok(include), Ok(expiring)) => (include, expiring),
        (a, b) => {
            let errors = [a.err(), b.err()].into_iter().flatten().collect();
            return Err(DomainError::Validation(errors).into());
        }
    };
    let spec = ops::ListSpec {
        include_revoked,
        expiring_within_days: expiring,
        ..Default::default()
    };
    Ok(streamed_list::credentials(
        app,
        who,
        account,
        SERVICE_ACCOUNTS,
        spec,
        streamed_list::BARE,
        ServiceAccountView::from,
    )
    .await?)
}

/// Create Service Account
///
/// Creates a service account and its bearer token (`hbx_sa_<public id>_<secret>`), returned only in
/// this response. A new service account can do nothing until it is granted rights through
/// `/auth/authorizations`. Needs `auth.manage`.
#[utoipa::path(
    post, path = "/v1/public/accounts/{account_id}/auth/service-accounts", tag = TAG_SERVICE_ACCOUNTS,
    params(("account_id" = Uuid, Path), IdempotencyKeyHeader),
    request_body = CreateServiceAccountRequest,
    responses(
        (status = 201, description = "Created. Contains the one-time token.", body = ServiceAccountCreated),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage`.", body = ErrorMessage),
        (status = 404, description = "No such account for this caller.", body = ErrorMessage),
        (status = 409, description = "A live service account with this name exists, the account holds the most live credentials the server allows (`--max-live-credentials-per-org`; revoke one, or the operator raises it), or a request with this Idempotency-Key is still in progress.", body = ErrorMessage),
        (status = 413, description = "Body over 64 KiB.", body = ErrorMessage),
        (status = 415, description = "Body is not application/json.", body = ErrorMessage),
        (status = 422, description = "Validation Error (also a body that is not JSON, `json_invalid`; a malformed Idempotency-Key, or one used with a different request)", body = ValidationErrorBody),
        (status = 429, description = "Rate limited; see Retry-After.", body = ErrorMessage),
    ),
    security(("bearer" = [])),
)]
pub async fn create_service_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams(account, _): Path<String>,
    IdempotentJson(idempotency, request): IdempotentJson<Hybridbox, CreateServiceAccountRequest>,
) -> Result<Response, ApiError> {
    let account = account_id(&account)?;
    let spec = CredentialSpec {
        name: request.name,
        scopes: ScopeSet::empty(),
        permissions: Vec::new(),
        expires_at: request.expires_at,
        canary: request.canary,
    };
    let render = |issued| (StatusCode::CREATED, ServiceAccountCreated::from(issued));
    Ok(idempotency
        .run(
            app,
            who,
            account,
            &[SERVICE_ACCOUNTS.write],
            render,
            move |app, who, seal| async move {
                let answer = seal.answer();
                Ok(ops::create_credential(
                    &app,
                    &who,
                    &context,
                    account,
                    SERVICE_ACCOUNTS,
                    spec,
                    answer,
                )
                .await?)
            },
        )
        .await)
}

/// Rotate Service Account
///
/// Replaces the token and keeps the id. Without a body (or with `grace_seconds` 0) the old token
/// stops working at once; with `{"grace_seconds": N}` both work for N seconds (and
/// `retire_when_unused_seconds` ends the old one earlier once it goes unused). The replacement
/// token is returned only in this response. A revoked service account cannot be rotated (409).
/// Needs `auth.manage` and every right the service account holds.
#[utoipa::path(
    post, path = "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/rotate",
    tag = TAG_SERVICE_ACCOUNTS,
    params(("account_id" = Uuid, Path), ("service_account_id" = Uuid, Path), IdempotencyKeyHeader),
    request_body(content = Option<RotateRequest>, description = "Optional: the grace period and cutover (no body: the old token stops at once)."),
    responses(
        (status = 200, description = "Rotated. Contains the replacement token.", body = ServiceAccountCreated),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage` or a right the account holds.", body = ErrorMessage),
        (status = 404, description = "No such service account.", body = ErrorMessage),
        (status = 409, description = "The service account is a canary (canaries are never rotated), revoked or expired, another rotation of it happened at the same time, or a request with this Idempotency-Key is still in progress.", body = ErrorMessage),
        (status = 413, description = "Body over 64 KiB.", body = ErrorMessage),
        (status = 415, description = "A body that is not application/json.", body = ErrorMessage),
        (status = 422, description = "Validation Error (also a body that is not JSON, `json_invalid`; an expiry that breaks the account's credential policy, a malformed Idempotency-Key, or one used with a different request)", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn rotate_service_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((account, id), _): Path<(String, String)>,
    IdempotentOptionalJson(idempotency, request): IdempotentOptionalJson<Hybridbox, RotateRequest>,
) -> Result<Response, ApiError> {
    let (account, id) = (account_id(&account)?, service_account_id(&id)?);
    let spec = crate::wire::rotate_spec(&request);
    let render = |issued| (StatusCode::OK, ServiceAccountCreated::from(issued));
    Ok(idempotency
        .run(
            app,
            who,
            account,
            &[SERVICE_ACCOUNTS.write],
            render,
            move |app, who, seal| async move {
                let answer = seal.answer();
                Ok(ops::rotate_credential(
                    &app,
                    &who,
                    &context,
                    account,
                    SERVICE_ACCOUNTS,
                    id,
                    spec,
                    answer,
                )
                .await?)
            },
        )
        .await)
}

fn revoked_account() -> DomainError {
    DomainError::Conflict("the service account is revoked".into())
}

/// Suspend Service Account
///
/// The token stops authenticating everywhere (401; `active: false` in introspection) but the
/// service account keeps its id, grants and token: `resume` brings it back. Suspending a suspended
/// account changes nothing; a revoked one is 409. Needs `auth.manage` and every right the service
/// account holds.
#[utoipa::path(
    post, path = "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/suspend",
    tag = TAG_SERVICE_ACCOUNTS,
    params(("account_id" = Uuid, Path), ("service_account_id" = Uuid, Path)),
    responses(
        (status = 200, description = "Suspended (`suspended_at` is set).", body = ServiceAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage` or a right the account holds.", body = ErrorMessage),
        (status = 404, description = "No such service account.", body = ErrorMessage),
        (status = 409, description = "The service account is revoked, or is a canary (canaries are never suspended).", body = ErrorMessage),
        (status = 422, description = "Validation Error", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn suspend_service_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((account, id), _): Path<(String, String)>,
) -> Result<Json<ServiceAccountView>, ApiError> {
    let (account, id) = (account_id(&account)?, service_account_id(&id)?);
    let credential = ops::set_suspended(
        &app,
        &who,
        &context,
        account,
        SERVICE_ACCOUNTS,
        id,
        true,
        revoked_account,
    )
    .await?;
    Ok(Json(credential.into()))
}

/// Resume Service Account
///
/// Ends a suspension: the token authenticates again. Resuming an account that is not suspended
/// changes nothing; a revoked one is 409. Needs `auth.manage` and every right the service account
/// holds.
#[utoipa::path(
    post, path = "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/resume",
    tag = TAG_SERVICE_ACCOUNTS,
    params(("account_id" = Uuid, Path), ("service_account_id" = Uuid, Path)),
    responses(
        (status = 200, description = "Active again (`suspended_at` is null).", body = ServiceAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage` or a right the account holds.", body = ErrorMessage),
        (status = 404, description = "No such service account.", body = ErrorMessage),
        (status = 409, description = "The service account is revoked, or is a canary (canaries are never suspended).", body = ErrorMessage),
        (status = 422, description = "Validation Error", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn resume_service_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((account, id), _): Path<(String, String)>,
) -> Result<Json<ServiceAccountView>, ApiError> {
    let (account, id) = (account_id(&account)?, service_account_id(&id)?);
    let credential = ops::set_suspended(
        &app,
        &who,
        &context,
        account,
        SERVICE_ACCOUNTS,
        id,
        false,
        revoked_account,
    )
    .await?;
    Ok(Json(credential.into()))
}

/// Retire Previous Service Account Token
///
/// Ends, now, the previous token a rotation with a grace period kept working. Without one the
/// service account is returned unchanged; a revoked one is 409. Needs `auth.manage` and every
/// right the service account holds.
#[utoipa::path(
    post, path = "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/retire-previous",
    tag = TAG_SERVICE_ACCOUNTS,
    params(("account_id" = Uuid, Path), ("service_account_id" = Uuid, Path)),
    responses(
        (status = 200, description = "The service account; `previous_secret_expires_at` is null.", body = ServiceAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage` or a right the account holds.", body = ErrorMessage),
        (status = 404, description = "No such service account.", body = ErrorMessage),
        (status = 409, description = "The service account is revoked.", body = ErrorMessage),
        (status = 422, description = "Validation Error", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn retire_previous_service_account_token(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((account, id), _): Path<(String, String)>,
) -> Result<Json<ServiceAccountView>, ApiError> {
    let (account, id) = (account_id(&account)?, service_account_id(&id)?);
    let credential = ops::retire_previous_secret(
        &app,
        &who,
        &context,
        account,
        SERVICE_ACCOUNTS,
        id,
        revoked_account,
    )
    .await?;
    Ok(Json(credential.into()))
}

/// Revoke Service Account
///
/// Revokes the service account and its active token, for good, and its live grants with it (at
/// the same `revoked_at`). Idempotent: revoking again returns
/// the same record with its original `revoked_at`. Needs `auth.manage` and every right the service
/// account holds (its revoked record is returned to any `auth.manage` holder).
#[utoipa::path(
    delete, path = "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}",
    tag = TAG_SERVICE_ACCOUNTS,
    params(("account_id" = Uuid, Path), ("service_account_id" = Uuid, Path)),
    responses(
        (status = 200, description = "The revoked service account (no token).", body = ServiceAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage` or a right the account holds.", body = ErrorMessage),
        (status = 404, description = "No such service account.", body = ErrorMessage),
        (status = 422, description = "Validation Error", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn revoke_service_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((account, id), _): Path<(String, String)>,
) -> Result<Json<ServiceAccountView>, ApiError> {
    let (account, id) = (account_id(&account)?, service_account_id(&id)?);
    let (revoked, _) =
        ops::revoke_credential(&app, &who, &context, account, SERVICE_ACCOUNTS, id).await?;
    Ok(Json(revoked.into()))
}
