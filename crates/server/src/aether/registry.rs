//! `/api/v1/organizations/{orgID}/registry` and its robot accounts.

use super::wire::{
    CreateRobotAccountRequest, ErrorEnvelope, RegistryCredentials, RegistryDisabled,
    RegistryEnabled, RegistryState, RegistryView, RobotAccountCreated, RobotAccountPage,
    RobotAccountView, UpdateRobotAccountRequest,
};
use super::Path;
use super::{org_id, resource_id, Aether, ApiError, TAG_REGISTRY};
use crate::app::App;
use crate::extract::PathParams;
use crate::extract::{ApiJson, Authenticated};
use crate::idempotency::{
    Idempotency, IdempotencyKeyHeader, IdempotentJson, IdempotentOptionalJson,
};
use crate::ops::{self, CredentialSpec, ROBOTS};
use crate::streamed_list;
use crate::wire::RotateRequest;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyplane_core::registry::robot_username;
use keyplane_core::{Capability, Error as DomainError, Registry, ScopeSet};
use std::collections::HashMap;

type Caller = Authenticated<Aether>;

/// Get the registry
///
/// The organization's registry, or `{"enabled": false}` when none is provisioned. Needs
/// `registry:read`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/registry", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID.")),
    responses(
        (status = 200, description = "The registry, or `{\"enabled\": false}`.", body = RegistryState),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:read`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 422, description = "The organization id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn get_registry(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams(org, _): Path<String>,
) -> Result<Response, ApiError> {
    let org = org_id(&org)?;
    Ok(match ops::get_registry(&app, &who, org).await? {
        Some(registry) => Json(RegistryView::new(
            registry,
            &app.inner().config.registry.endpoint,
        ))
        .into_response(),
        None => Json(RegistryDisabled { enabled: false }).into_response(),
    })
}

/// Enable the registry
///
/// Provisions the organization's registry project (named after the organization) and a default
/// robot (`robot$<harbor_project>+default`, may pull and push) whose password is returned only in
/// this response. The robot expires as the organization's credential policy says: its default
/// lifetime, else the latest expiry it allows, else never. Enabling twice answers 409. Needs
/// `registry:write`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/registry", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), IdempotencyKeyHeader),
    responses(
        (status = 201, description = "Enabled. Contains the default robot's one-time password.", body = RegistryEnabled),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:write`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 409, description = "Already enabled (a retry with the first request's Idempotency-Key replays its answer instead), the organization holds the most live credentials the server allows (`--max-live-credentials-per-org`: the default robot would be one more), or a request with this Idempotency-Key is still in progress.", body = ErrorEnvelope),
        (status = 422, description = "The Idempotency-Key is malformed or was used with a different request.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn enable_registry(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams(org, _): Path<String>,
    idempotency: Idempotency<Aether>,
) -> Result<Response, ApiError> {
    let org = org_id(&org)?;
    let endpoint = app.inner().config.registry.endpoint.clone();
    let render = move |(registry, robot): (Registry, ops::Issued)| {
        let username = robot_username(&registry.project, &robot.credential.name);
        (
            StatusCode::CREATED,
            RegistryEnabled {
                registry: RegistryView::new(registry, &endpoint),
                credentials: RegistryCredentials {
                    username,
                    password: robot.secret,
                },
            },
        )
    };
    Ok(idempotency
        .run(
            app,
            who,
            org,
            &[Capability::RegistryWrite],
            render,
            move |app, who, seal| async move {
                Ok(ops::enable_registry(&app, &who, &context, org, seal.answer()).await?)
            },
        )
        .await)
}

/// List robot accounts
///
/// Live robot accounts in creation order. Needs `registry:read`; canary robots are listed (with
/// `canary: true`) only to callers holding `registry:write`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/registry/robot-accounts", tag = TAG_REGISTRY,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("expiring_within_days" = Option<u32>, Query, minimum = 1, maximum = 3650, description = "Only robots that have not expired yet and expire within this many days (1–3650)."),
    ),
    responses(
        (status = 200, description = "The robot accounts.", body = RobotAccountPage),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:read`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 422, description = "Bad `expiring_within_days`.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn list_robot_accounts(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams(org, _): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let org = org_id(&org)?;
    let expiring = crate::extract::expiring_within_days(&query).map_err(DomainError::from)?;
    let spec = ops::ListSpec {
        expiring_within_days: expiring,
        ..Default::default()
    };
    // `RobotAccountPage`, written a page of robots at a time.
    Ok(streamed_list::credentials(
        app,
        who,
        org,
        ROBOTS,
        spec,
        streamed_list::ITEMS,
        RobotAccountView::from,
    )
    .await?)
}

/// Create a registry robot account
///
/// Creates a robot account. The one-time token secret is returned only in this response: it is the
/// registry password of `robot$<harbor_project>+<name>`. The registry must be enabled (409
/// otherwise). Needs `registry:write`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/registry/robot-accounts", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), IdempotencyKeyHeader),
    request_body = CreateRobotAccountRequest,
    responses(
        (status = 201, description = "Robot account created. Contains the one-time token.", body = RobotAccountCreated),
        (status = 400, description = "Malformed JSON.", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:write`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 409, description = "The registry is not enabled, a live robot has this name, the organization holds the most live credentials the server allows (`--max-live-credentials-per-org`; revoke one, or the operator raises it), or a request with this Idempotency-Key is still in progress.", body = ErrorEnvelope),
        (status = 413, description = "Body over 64 KiB.", body = ErrorEnvelope),
        (status = 415, description = "Body is not application/json.", body = ErrorEnvelope),
        (status = 422, description = "Request validation failed, or the Idempotency-Key is malformed or was used with a different request.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn create_robot_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams(org, _): Path<String>,
    IdempotentJson(idempotency, request): IdempotentJson<Aether, CreateRobotAccountRequest>,
) -> Result<Response, ApiError> {
    let org = org_id(&org)?;
    let spec = CredentialSpec {
        name: request.name,
        scopes: ScopeSet::empty(),
        permissions: request.permissions,
        expires_at: request.expires_at,
        canary: request.canary,
    };
    let render = |issued| (StatusCode::CREATED, RobotAccountCreated::from(issued));
    Ok(idempotency
        .run(
            app,
            who,
            org,
            &[Capability::RegistryWrite],
            render,
            move |app, who, seal| async move {
                Ok(ops::create_robot(&app, &who, &context, org, spec, seal.answer()).await?)
            },
        )
        .await)
}

/// Get a robot account
///
/// Needs `registry:read`; a canary robot is not found without `registry:write`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), ("id" = Uuid, Path, description = "Robot account id.")),
    responses(
        (status = 200, description = "The robot account (no secret).", body = RobotAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:read`.", body = ErrorEnvelope),
        (status = 404, description = "No such live robot account.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn get_robot_account(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<RobotAccountView>, ApiError> {
    let (org, id) = (org_id(&org)?, resource_id(&id)?);
    Ok(Json(
        ops::get_live_credential(&app, &who, org, ROBOTS, id)
            .await?
            .into(),
    ))
}

/// Update a robot account's permissions
///
/// Replaces the robot's permissions; tokens it obtains from then on carry the new ones. Needs
/// `registry:write`.
#[utoipa::path(
    put, path = "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), ("id" = Uuid, Path, description = "Robot account id.")),
    request_body = UpdateRobotAccountRequest,
    responses(
        (status = 200, description = "The updated robot account.", body = RobotAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:write`.", body = ErrorEnvelope),
        (status = 404, description = "No such live robot account.", body = ErrorEnvelope),
        (status = 422, description = "Request validation failed.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn update_robot_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
    ApiJson(request, ..): ApiJson<Aether, UpdateRobotAccountRequest>,
) -> Result<Json<RobotAccountView>, ApiError> {
    let (org, id) = (org_id(&org)?, resource_id(&id)?);
    let robot =
        ops::update_robot_permissions(&app, &who, &context, org, id, request.permissions).await?;
    Ok(Json(robot.into()))
}

/// Delete a robot account
///
/// Revokes the robot: its secret stops working at once, for good. Needs `registry:write`.
#[utoipa::path(
    delete, path = "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), ("id" = Uuid, Path, description = "Robot account id.")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:write`.", body = ErrorEnvelope),
        (status = 404, description = "No such live robot account.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn delete_robot_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (org, id) = (org_id(&org)?, resource_id(&id)?);
    let (_, revoked_now) = ops::revoke_credential(&app, &who, &context, org, ROBOTS, id).await?;
    if revoked_now {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(DomainError::NotFound.into())
    }
}

/// Rotate a robot account's secret
///
/// Replaces the secret and keeps the id. Without a body (or with `grace_seconds` 0) the old secret
/// stops working at once; with `{"grace_seconds": N}` both log in to the registry for N seconds
/// (and `retire_when_unused_seconds` ends the old one earlier once it goes unused). The new secret
/// is returned only in this response. Needs `registry:write`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/rotate", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), ("id" = Uuid, Path, description = "Robot account id."), IdempotencyKeyHeader),
    request_body(content = Option<RotateRequest>, description = "Optional: the grace period and cutover (no body: the old secret stops at once)."),
    responses(
        (status = 200, description = "Rotated. Contains the new one-time secret.", body = RobotAccountCreated),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:write`.", body = ErrorEnvelope),
        (status = 404, description = "No such live robot account.", body = ErrorEnvelope),
        (status = 409, description = "The robot account is a canary (canaries are never rotated), has expired, another rotation of it happened at the same time, or a request with this Idempotency-Key is still in progress.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID, a body field is invalid, the resulting expiry breaks the organization's credential policy (`policy_violation`), or the Idempotency-Key is malformed or was used with a different request.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn rotate_robot_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
    IdempotentOptionalJson(idempotency, request): IdempotentOptionalJson<Aether, RotateRequest>,
) -> Result<Response, ApiError> {
    let (org, id) = (org_id(&org)?, resource_id(&id)?);
    let spec = crate::wire::rotate_spec(&request);
    let render = |issued| (StatusCode::OK, RobotAccountCreated::from(issued));
    Ok(idempotency
        .run(
            app,
            who,
            org,
            &[Capability::RegistryWrite],
            render,
            move |app, who, seal| async move {
                let answer = seal.answer();
                Ok(
                    ops::rotate_live_credential(
                        &app, &who, &context, org, ROBOTS, id, spec, answer,
                    )
                    .await?,
                )
            },
        )
        .await)
}

/// Suspend a robot account
///
/// The robot can no longer log in to the registry (its token requests answer 401) but keeps its
/// id, permissions and secret: `resume` brings it back. Suspending a suspended robot changes
/// nothing. Needs `registry:write`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/suspend", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), ("id" = Uuid, Path, description = "Robot account id.")),
    responses(
        (status = 200, description = "Suspended (`suspended_at` is set).", body = RobotAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:write`.", body = ErrorEnvelope),
        (status = 404, description = "No such live robot account.", body = ErrorEnvelope),
        (status = 409, description = "The robot account is a canary: canaries are never suspended or resumed.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn suspend_robot_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<RobotAccountView>, ApiError> {
    let (org, id) = (org_id(&org)?, resource_id(&id)?);
    let robot = ops::set_suspended(&app, &who, &context, org, ROBOTS, id, true, || {
        DomainError::NotFound
    })
    .await?;
    Ok(Json(robot.into()))
}

/// Resume a robot account
///
/// Ends a suspension: the robot logs in again. Resuming a robot that is not suspended changes
/// nothing. Needs `registry:write`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/resume", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), ("id" = Uuid, Path, description = "Robot account id.")),
    responses(
        (status = 200, description = "Active again (`suspended_at` is null).", body = RobotAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:write`.", body = ErrorEnvelope),
        (status = 404, description = "No such live robot account.", body = ErrorEnvelope),
        (status = 409, description = "The robot account is a canary: canaries are never suspended or resumed.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn resume_robot_account(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<RobotAccountView>, ApiError> {
    let (org, id) = (org_id(&org)?, resource_id(&id)?);
    let robot = ops::set_suspended(&app, &who, &context, org, ROBOTS, id, false, || {
        DomainError::NotFound
    })
    .await?;
    Ok(Json(robot.into()))
}

/// Retire a robot account's previous secret
///
/// Ends, now, the previous secret a rotation with a grace period kept working. Without one the
/// robot is returned unchanged. Needs `registry:write`.
#[utoipa::path(
    post, path = "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/retire-previous", tag = TAG_REGISTRY,
    params(("orgID" = Uuid, Path, description = "Organization UUID."), ("id" = Uuid, Path, description = "Robot account id.")),
    responses(
        (status = 200, description = "The robot; `previous_secret_expires_at` is null.", body = RobotAccountView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `registry:write`.", body = ErrorEnvelope),
        (status = 404, description = "No such live robot account.", body = ErrorEnvelope),
        (status = 422, description = "A path id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn retire_previous_robot_secret(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((org, id), _): Path<(String, String)>,
) -> Result<Json<RobotAccountView>, ApiError> {
    let (org, id) = (org_id(&org)?, resource_id(&id)?);
    let robot = ops::retire_previous_secret(&app, &who, &context, org, ROBOTS, id, || {
        DomainError::NotFound
    })
    .await?;
    Ok(Json(robot.into()))
}
