//! `/api/v1/organizations/{orgID}/credential-policy`: the tenant's lifetime rules and leak action.

use super::wire::{CredentialPolicyView, ErrorEnvelope, PutCredentialPolicyRequest};
use super::Path;
use super::{org_id, Aether, ApiError, TAG_POLICY};
use crate::app::App;
use crate::extract::PathParams;
use crate::extract::{ApiJson, Authenticated};
use crate::ops;
use axum::extract::State;
use axum::Json;

type Caller = Authenticated<Aether>;

/// Get the credential policy
///
/// The organization's credential policy (the default one, with no rules, until one is set) and how
/// many live credentials of each kind break it now. Needs `*` or an `account_owner` grant.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/credential-policy", tag = TAG_POLICY,
    params(("orgID" = Uuid, Path, description = "Organization UUID.")),
    responses(
        (status = 200, description = "The policy.", body = CredentialPolicyView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller holds neither `*` nor `account_owner`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 422, description = "The organization id is not a UUID.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn get_credential_policy(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams(org, _): Path<String>,
) -> Result<Json<CredentialPolicyView>, ApiError> {
    let org = org_id(&org)?;
    let report = ops::get_credential_policy(&app, &who, org).await?;
    Ok(Json(super::server_wire::policy_view(org, report)))
}

/// Set the credential policy
///
/// Replaces the whole policy (absent fields take their defaults). From now on, creates and
/// rotations whose expiry breaks it get 422 with a `policy_violation` field error naming the rule,
/// and a create without `expires_at` gets the default lifetime. Existing credentials are not
/// changed; `exceeding` counts the live ones that break the new policy. Setting the policy already
/// in force changes nothing (not even `updated_at`) and records nothing, so a PUT whose answer was
/// lost can safely be sent again. Needs `*` or an `account_owner` grant.
#[utoipa::path(
    put, path = "/api/v1/organizations/{orgID}/credential-policy", tag = TAG_POLICY,
    params(("orgID" = Uuid, Path, description = "Organization UUID.")),
    request_body = PutCredentialPolicyRequest,
    responses(
        (status = 200, description = "The policy now in force.", body = CredentialPolicyView),
        (status = 400, description = "Malformed JSON.", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller holds neither `*` nor `account_owner`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 413, description = "Body over 64 KiB.", body = ErrorEnvelope),
        (status = 415, description = "Body is not application/json.", body = ErrorEnvelope),
        (status = 422, description = "A rule is invalid (out of range, or a default above the maximum).", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn put_credential_policy(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams(org, _): Path<String>,
    ApiJson(request, ..): ApiJson<Aether, PutCredentialPolicyRequest>,
) -> Result<Json<CredentialPolicyView>, ApiError> {
    let org = org_id(&org)?;
    let report =
        ops::put_credential_policy(&app, &who, &context, org, request.into_policy()).await?;
    Ok(Json(super::server_wire::policy_view(org, report)))
}
