//! `/v1/public/accounts/{account_id}/auth/authorizations`

use super::service_accounts::account_id;
use super::wire::{
    AuthorizationView, CreateAuthorizationRequest, ErrorMessage, ValidationErrorBody,
};
use super::Path;
use super::{ApiError, Hybridbox, TAG_AUTHORIZATIONS};
use crate::app::App;
use crate::extract::PathParams;
use crate::extract::{path_id, query_bool, Authenticated};
use crate::idempotency::{IdempotencyKeyHeader, IdempotentJson};
use crate::ops;
use crate::streamed_list;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use keyplane_core::error::codes;
use keyplane_core::{
    Capability, Error as DomainError, FieldError, FieldPath, GrantId, GrantKind, Scope, SubjectType,
};
use keyplane_store::GrantFilter;
use std::collections::HashMap;

type Caller = Authenticated<Hybridbox>;

fn parse_filter(
    account: keyplane_core::TenantId,
    query: &HashMap<String, String>,
) -> Result<GrantFilter, DomainError> {
    let mut errors = Vec::new();
    let mut choice = |name: &str, allowed: &[&str]| -> Option<String> {
        let raw = query.get(name)?;
        if allowed.contains(&raw.as_str()) {
            Some(raw.clone())
        } else {
            errors.push(FieldError::new(
                FieldPath::query(name),
                codes::INVALID_CHOICE,
                format!("must be one of: {}", allowed.join(", ")),
            ));
            None
        }
    };
    let subject_type = choice("subject_type", &["user", "group", "service_account"])
        .and_then(|s| SubjectType::parse(&s));
    let kind = choice(
        "grant_kind",
        &["capability", "account_owner", "super_admin"],
    )
    .and_then(|s| GrantKind::parse(&s));
    let subject_id = query.get("subject_id").and_then(|raw| {
        let parsed = uuid::Uuid::parse_str(raw).ok();
        if parsed.is_none() {
            errors.push(FieldError::new(
                FieldPath::query("subject_id"),
                codes::INVALID_UUID,
                "must be a UUID",
            ));
        }
        parsed
    });
    let capability_key = query
        .get("capability_key")
        .and_then(|raw| match Scope::parse(raw) {
            Ok(_) => Some(raw.clone()),
            Err(message) => {
                errors.push(FieldError::new(
                    FieldPath::query("capability_key"),
                    codes::INVALID_SCOPE,
                    message,
                ));
                None
            }
        });
    let include_revoked = query_bool(query, "include_revoked", false).unwrap_or_else(|e| {
        errors.push(e);
        false
    });
    if !errors.is_empty() {
        return Err(DomainError::Validation(errors));
    }
    Ok(GrantFilter {
        tenant_id: account,
        subject_type,
        subject_id,
        kind,
        capability_key,
        include_revoked,
        after: None,
        limit: None,
    })
}

/// List Authorizations
///
/// Grants in the account, oldest first, filtered by any of the query parameters. Needs
/// `auth.manage`.
#[utoipa::path(
    get, path = "/v1/public/accounts/{account_id}/auth/authorizations", tag = TAG_AUTHORIZATIONS,
    params(
        ("account_id" = Uuid, Path),
        ("subject_type" = Option<keyplane_api_types::hybridbox::SubjectTypeName>, Query, description = "user, group or service_account"),
        ("subject_id" = Option<Uuid>, Query),
        ("grant_kind" = Option<keyplane_api_types::hybridbox::GrantKindName>, Query, description = "capability, account_owner or super_admin"),
        ("capability_key" = Option<String>, Query),
        ("include_revoked" = Option<bool>, Query, description = "Include revoked grants (default false)."),
    ),
    responses(
        (status = 200, description = "Successful Response", body = Vec<AuthorizationView>),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage`.", body = ErrorMessage),
        (status = 404, description = "No such account for this caller.", body = ErrorMessage),
        (status = 422, description = "Validation Error", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn list_authorizations(
    State(app): State<App>,
    Authenticated(who, ..): Caller,
    PathParams(account, _): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let account = account_id(&account)?;
    let filter = parse_filter(account, &query)?;
    let listing = streamed_list::json_array(streamed_list::BARE, move |after| {
        let (app, who) = (app.clone(), who.clone());
        let page = GrantFilter {
            after,
            limit: Some(streamed_list::LIST_PAGE_ROWS),
            ..filter.clone()
        };
        async move {
            let (grants, next) = ops::list_grants(&app, &who, page).await?;
            Ok((
                grants.into_iter().map(AuthorizationView::from).collect(),
                next,
            ))
        }
    });
    Ok(listing.await?)
}

/// Create Authorization
///
/// Grants a subject a right in the account: one capability (`capability_key`, e.g. `auth.manage`)
/// or everything (`account_owner`). This is how a service account receives rights. A grant can
/// never give more than the caller holds; `super_admin` is reserved to the platform operator.
/// A subject holds at most 64 live grants in an account (narrowed ones included). Needs
/// `auth.manage`.
#[utoipa::path(
    post, path = "/v1/public/accounts/{account_id}/auth/authorizations", tag = TAG_AUTHORIZATIONS,
    params(("account_id" = Uuid, Path), IdempotencyKeyHeader),
    request_body = CreateAuthorizationRequest,
    responses(
        (status = 201, description = "The grant.", body = AuthorizationView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage` or the right it grants.", body = ErrorMessage),
        (status = 404, description = "No such account for this caller.", body = ErrorMessage),
        (status = 409, description = "The same live grant exists, the subject already holds 64 live grants in the account (the most one subject may hold; revoke one first), the service account is revoked, suspended or expired, or a request with this Idempotency-Key is still in progress.", body = ErrorMessage),
        (status = 422, description = "Validation Error (also a body that is not JSON, `json_invalid`; a malformed Idempotency-Key, or one used with a different request)", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn create_authorization(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams(account, _): Path<String>,
    IdempotentJson(idempotency, request): IdempotentJson<Hybridbox, CreateAuthorizationRequest>,
) -> Result<Response, ApiError> {
    let account = account_id(&account)?;
    let grant = request.into_domain().map_err(DomainError::from)?;
    let render = |grant| (StatusCode::CREATED, AuthorizationView::from(grant));
    Ok(idempotency
        .run(
            app,
            who,
            account,
            &[Capability::AuthManage],
            render,
            move |app, who, seal| async move {
                Ok(ops::create_grant(&app, &who, &context, account, grant, seal.answer()).await?)
            },
        )
        .await)
}

/// Revoke Authorization
///
/// Revokes the grant; its subject loses the right on its next request. Idempotent. Needs
/// `auth.manage`.
#[utoipa::path(
    delete, path = "/v1/public/accounts/{account_id}/auth/authorizations/{authorization_id}",
    tag = TAG_AUTHORIZATIONS,
    params(("account_id" = Uuid, Path), ("authorization_id" = Uuid, Path)),
    responses(
        (status = 200, description = "The revoked grant.", body = AuthorizationView),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorMessage),
        (status = 403, description = "The caller lacks `auth.manage`.", body = ErrorMessage),
        (status = 404, description = "No such grant.", body = ErrorMessage),
        (status = 422, description = "Validation Error", body = ValidationErrorBody),
    ),
    security(("bearer" = [])),
)]
pub async fn revoke_authorization(
    State(app): State<App>,
    Authenticated(who, _, context): Caller,
    PathParams((account, id), _): Path<(String, String)>,
) -> Result<Json<AuthorizationView>, ApiError> {
    let account = account_id(&account)?;
    let id = path_id("authorization_id", &id, GrantId::parse)?;
    let grant = ops::revoke_grant(&app, &who, &context, account, id).await?;
    Ok(Json(grant.into()))
}
