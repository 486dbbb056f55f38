//! `/api/v1/organizations/{orgID}/audit-events`. The one JSON shape of an audit event (the API,
//! `serve --audit-log`, `keyplane admin audit` and `keyplane audit` all print it) is
//! `keyplane_api_types::audit::AuditEventView`.

use super::wire::ErrorEnvelope;
use super::Path;
use super::{org_id, Aether, ApiError, TAG_AUDIT};
use crate::app::App;
use crate::extract::Authenticated;
use crate::extract::PathParams;
use crate::ops;
use axum::extract::{RawQuery, State};
use axum::Json;
use chrono::{DateTime, Utc};
pub use keyplane_api_types::audit::{AuditEventPage, AuditEventView};
use keyplane_core::audit::Outcome;
use keyplane_core::error::codes;
use keyplane_core::{Error as DomainError, FieldError, FieldPath, TenantId};
use keyplane_store::{AuditOrder, AuditQuery};
use uuid::Uuid;

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 100;
/// Longest accepted `action` filter value, and how many may be given: as many as a webhook's
/// patterns, so a receiver catching up can pass its webhook's patterns as they are.
const MAX_ACTION_CHARS: usize = 100;
const MAX_ACTIONS: usize = keyplane_core::webhook::MAX_PATTERNS;

/// Reads the filters of an audit query from `(name, value)` pairs (the query string), reporting
/// every bad one. `action` may repeat; `api_token.*` matches every `api_token.` action.
pub fn parse_audit_query(
    tenant: TenantId,
    pairs: &[(String, String)],
) -> Result<AuditQuery, DomainError> {
    let mut errors = Vec::new();
    let mut query = AuditQuery {
        order: AuditOrder::NewestBefore(None),
        limit: DEFAULT_PAGE,
        ..AuditQuery::after_seq(tenant, 0, DEFAULT_PAGE)
    };
    let uuid_of = |name: &'static str, raw: &str, errors: &mut Vec<FieldError>| {
        Uuid::parse_str(raw).ok().or_else(|| {
            errors.push(FieldError::new(
                FieldPath::query(name),
                codes::INVALID_UUID,
                "must be a UUID",
            ));
            None
        })
    };
    let time_of = |name: &'static str, raw: &str, errors: &mut Vec<FieldError>| {
        DateTime::parse_from_rfc3339(raw)
            .ok()
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| {
                errors.push(FieldError::new(
                    FieldPath::query(name),
                    codes::INVALID_FORMAT,
                    "must be an RFC 3339 timestamp",
                ));
                None
            })
    };
    let mut after_seq = None;
    let mut cursor_given = false;
    // `*` (a webhook's "every event") filters nothing, whatever else is given.
    let mut every_action = false;
    for (name, raw) in pairs {
        match name.as_str() {
            "cursor" => {
                cursor_given = true;
                query.order = AuditOrder::NewestBefore(uuid_of("cursor", raw, &mut errors));
            }
            // The store keeps a seq as a signed 64-bit integer: the document's `int64`.
            "after_seq" => match raw.parse::<u64>() {
                Ok(seq) if i64::try_from(seq).is_ok() => after_seq = Some(seq),
                _ => errors.push(FieldError::new(
                    FieldPath::query("after_seq"),
                    codes::INVALID_FORMAT,
                    "must be an event's `seq`: an integer from 0 to 9223372036854775807",
                )),
            },
            "limit" => match raw.parse::<u32>() {
                Ok(limit) if (1..=MAX_PAGE).contains(&limit) => query.limit = limit,
                _ => errors.push(FieldError::new(
                    FieldPath::query("limit"),
                    codes::OUT_OF_RANGE,
                    format!("must be an integer from 1 to {MAX_PAGE}"),
                )),
            },
            "action" if raw == "*" => every_action = true,
            "action" => {
                let valid = !raw.is_empty()
                    && raw.len() <= MAX_ACTION_CHARS
                    && raw
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.' || b == b'*');
                let wildcard = raw.find('*');
                if !valid || wildcard.is_some_and(|at| at != raw.len() - 1 || !raw.ends_with(".*"))
                {
                    errors.push(FieldError::new(
                        FieldPath::query("action"),
                        codes::INVALID_FORMAT,
                        "must be an action such as `api_token.created`, a prefix such as `api_token.*`, or `*`",
                    ));
                } else if let Some(prefix) = raw.strip_suffix('*') {
                    query.action_prefixes.push(prefix.to_string());
                } else {
                    query.actions.push(raw.clone());
                }
            }
            "actor_id" => query.actor_id = uuid_of("actor_id", raw, &mut errors),
            "target_id" => query.target_id = uuid_of("target_id", raw, &mut errors),
            "outcome" => match Outcome::parse(raw) {
                Some(outcome) => query.outcome = Some(outcome),
                None => errors.push(FieldError::new(
                    FieldPath::query("outcome"),
                    codes::INVALID_CHOICE,
                    "must be `success` or `denied`",
                )),
            },
            "since" => query.since = time_of("since", raw, &mut errors),
            "until" => query.until = time_of("until", raw, &mut errors),
            _ => {}
        }
    }
    if let Some(seq) = after_seq {
        if cursor_given {
            errors.push(FieldError::new(
                FieldPath::query("after_seq"),
                codes::INVALID_FORMAT,
                "cannot be combined with `cursor`: `after_seq` pages forward, `cursor` back",
            ));
        }
        query.order = AuditOrder::OldestAfterSeq(seq);
    }
    if query.actions.len() + query.action_prefixes.len() + usize::from(every_action) > MAX_ACTIONS {
        errors.push(FieldError::new(
            FieldPath::query("action"),
            codes::TOO_MANY,
            format!("at most {MAX_ACTIONS} actions"),
        ));
    }
    if every_action {
        query.actions.clear();
        query.action_prefixes.clear();
    }
    if errors.is_empty() {
        Ok(query)
    } else {
        Err(DomainError::Validation(errors))
    }
}

/// List audit events
///
/// The organization's recorded changes and refused attempts, newest first, `limit` (1–100,
/// default 50) at a time; pass `next_cursor` back as `cursor` for older events. With `after_seq`,
/// the events after that `seq`, oldest first (no `next_cursor`: ask again with the last event's
/// `seq`): the way to follow the trail without gaps, since `occurred_at` does not follow `seq`.
/// Needs `audit:read`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/audit-events", tag = TAG_AUDIT,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("cursor" = Option<Uuid>, Query, description = "`next_cursor` of the previous page (a UUID; an empty value is refused)."),
        ("after_seq" = Option<u64>, Query, description = "Only events with a greater `seq`, oldest first; not with `cursor`."),
        ("limit" = Option<u32>, Query, description = "Page size, 1–100 (default 50)."),
        ("action" = Option<Vec<String>>, Query, description = "Repeatable, at most 50. An action (`api_token.created`), a prefix (`api_token.*`), or `*` (every action: no filter, as a webhook's `*`)."),
        ("actor_id" = Option<Uuid>, Query, description = "Only events by this credential or user."),
        ("target_id" = Option<Uuid>, Query, description = "Only events about this resource."),
        ("outcome" = Option<String>, Query, description = "`success` or `denied`."),
        ("since" = Option<String>, Query, description = "RFC 3339; events at or after it."),
        ("until" = Option<String>, Query, description = "RFC 3339; events before it."),
    ),
    responses(
        (status = 200, description = "A page of events.", body = AuditEventPage),
        (status = 401, description = "Missing or invalid credentials.", body = ErrorEnvelope),
        (status = 403, description = "The caller lacks `audit:read`.", body = ErrorEnvelope),
        (status = 404, description = "No such organization for this caller.", body = ErrorEnvelope),
        (status = 422, description = "A bad filter, `cursor` or `limit`.", body = ErrorEnvelope),
        (status = 429, description = "Rate limited; see Retry-After.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn list_audit_events(
    State(app): State<App>,
    Authenticated(who, ..): Authenticated<Aether>,
    PathParams(org, _): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<AuditEventPage>, ApiError> {
    let org = org_id(&org)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|_| {
            DomainError::from(FieldError::new(
                FieldPath::query("query"),
                codes::INVALID_FORMAT,
                "the query string is not URL-encoded",
            ))
        })?;
    let query = parse_audit_query(org, &pairs)?;
    let (page, next) = ops::list_audit_events(&app, &who, query).await?;
    Ok(Json(AuditEventPage {
        items: page.iter().map(AuditEventView::from).collect(),
        next_cursor: next,
    }))
}
