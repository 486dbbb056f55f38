//! `/api/v1/organizations/{orgID}/audit-events`. The one JSON shape of an audit event (the API,
//! `serve --audit-log`, `keyplane admin audit` and `keyplane audit` all print it) is
//! `keyplane_api_types::audit::AuditEventView`.

use super::wire::ErrorEnvelope;
use super::Path;
use super::{org_id, Aether, ApiError, TAG_AUDIT};
use crate::app::App;
use crate::audit_positions::{check_positions, Diverged, MAX_POSITIONS};
use crate::extract::Authenticated;
use crate::extract::PathParams;
use crate::ops;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use keyplane_api_types::audit::{
    AuditChainDivergedEnvelope, AuditChainDivergedError, AUDIT_CHAIN_DIVERGED,
};
pub use keyplane_api_types::audit::{AuditEventPage, AuditEventView};
use keyplane_core::audit::Outcome;
use keyplane_core::audit_position::EventPosition;
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

/// Reads the `after` cursor: the events a reader had, each `<seq>-<tag>` (at most
/// [`MAX_POSITIONS`]), the newest first or in any order. Not with `cursor` or `after_seq`.
fn parse_after(pairs: &[(String, String)]) -> Result<Vec<EventPosition>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut positions = Vec::new();
    for (_, raw) in pairs.iter().filter(|(name, _)| name == "after") {
        match EventPosition::parse(raw) {
            Some(position) if i64::try_from(position.seq).is_ok() => positions.push(position),
            _ => errors.push(FieldError::new(
                FieldPath::query("after"),
                codes::INVALID_FORMAT,
                "must be an event's position, `<seq>-<tag>` (the tag: 16 lowercase hex digits of the SHA-256 of its `chain_hash`)",
            )),
        }
    }
    if positions.len() > MAX_POSITIONS {
        errors.push(FieldError::new(
            FieldPath::query("after"),
            codes::TOO_MANY,
            format!("at most {MAX_POSITIONS} positions"),
        ));
    }
    let given = |name: &str| pairs.iter().any(|(n, _)| n == name);
    if !positions.is_empty() && (given("cursor") || given("after_seq")) {
        errors.push(FieldError::new(
            FieldPath::query("after"),
            codes::INVALID_FORMAT,
            "cannot be combined with `cursor` or `after_seq`",
        ));
    }
    if errors.is_empty() {
        Ok(positions)
    } else {
        Err(errors)
    }
}

/// The 409 that tells a reader its `after` names an event the trail no longer holds.
fn diverged_answer(diverged: &Diverged) -> Response {
    let Diverged {
        diverged_seq,
        head_seq,
        resume_after,
    } = diverged;
    let message = format!(
        "the audit trail no longer holds the event at seq {diverged_seq} that `after` names (it \
         holds another there, or none; its newest seq is {head_seq}): it went back, as after a \
         restore from a backup or a failover that lost the last commits, and its new events may \
         have taken the seqs of events you had. Go on after seq {seq} (`after={resume_after}`): \
         the events after it may be new to you, and some may repeat ones you had",
        seq = resume_after.seq,
    );
    let body = AuditChainDivergedEnvelope {
        error: AuditChainDivergedError {
            code: AUDIT_CHAIN_DIVERGED.to_string(),
            message,
            details: None,
            diverged_seq: *diverged_seq,
            head_seq: *head_seq,
            resume_after_seq: resume_after.seq,
            resume_after: resume_after.to_string(),
        },
    };
    (StatusCode::CONFLICT, Json(body)).into_response()
}

/// List audit events
///
/// The organization's recorded changes and refused attempts, newest first, `limit` (1–100,
/// default 50) at a time; pass `next_cursor` back as `cursor` for older events. With `after`, the
/// events after the one it names, oldest first (no `next_cursor`: ask again with the last event's
/// position): the way to follow the trail without gaps, since `occurred_at` does not follow `seq`.
/// `after` is `<seq>-<tag>`, the tag the first 8 bytes of the SHA-256 of the event's `chain_hash`
/// in lowercase hex (the revocation stream's `ids=seq_hash` form); it may be given up to 16 times,
/// the newest event you had and some older ones. When the trail no longer holds the newest (a
/// restore from a backup or a failover took it back, and new events took the seqs of lost ones),
/// the answer is 409 `audit_chain_diverged` with `resume_after`: the newest of them it still holds,
/// else the oldest point it has; page on from there, and nothing is skipped. `after_seq` pages by
/// seq alone, as before: it cannot notice that, and silently skips the events that took seqs it
/// had seen. Needs `audit:read`.
#[utoipa::path(
    get, path = "/api/v1/organizations/{orgID}/audit-events", tag = TAG_AUDIT,
    params(
        ("orgID" = Uuid, Path, description = "Organization UUID."),
        ("cursor" = Option<Uuid>, Query, description = "`next_cursor` of the previous page (a UUID; an empty value is refused)."),
        ("after" = Option<Vec<String>>, Query, description = "Repeatable, at most 16. The events after the newest event named, oldest first, each named `<seq>-<tag>` (the tag: 16 lowercase hex digits, the first 8 bytes of the SHA-256 of the event's `chain_hash`); 409 `audit_chain_diverged` when the trail no longer holds it. Not with `cursor` or `after_seq`."),
        ("after_seq" = Option<u64>, Query, description = "Only events with a greater `seq`, oldest first; not with `cursor`. Cannot tell that the trail went back (a restore): events that took seqs already read are skipped. Prefer `after`."),
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
        (status = 409, description = "`audit_chain_diverged`: the trail no longer holds the newest event `after` names (a restore or failover took it back); go on with `after` = `resume_after`.", body = AuditChainDivergedEnvelope),
        (status = 422, description = "A bad filter, `cursor`, `after` or `limit`.", body = ErrorEnvelope),
        (status = 429, description = "Rate limited; see Retry-After.", body = ErrorEnvelope),
    ),
    security(("bearer" = [])),
)]
pub async fn list_audit_events(
    State(app): State<App>,
    Authenticated(who, ..): Authenticated<Aether>,
    PathParams(org, _): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let org = org_id(&org)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|_| {
            DomainError::from(FieldError::new(
                FieldPath::query("query"),
                codes::INVALID_FORMAT,
                "the query string is not URL-encoded",
            ))
        })?;
    let (mut query, positions) = match (parse_audit_query(org, &pairs), parse_after(&pairs)) {
        (Ok(query), Ok(positions)) => (query, positions),
        (query, positions) => {
            let mut errors = match query {
                Err(DomainError::Validation(errors)) => errors,
                Err(other) => return Err(other.into()),
                Ok(_) => Vec::new(),
            };
            errors.extend(positions.err().unwrap_or_default());
            return Err(DomainError::Validation(errors).into());
        }
    };
    if let Some(newest) = positions.iter().map(|p| p.seq).max() {
        query.order = AuditOrder::OldestAfterSeq(newest);
    }
    let (page, next) = ops::list_audit_events(&app, &who, query).await?;
    // Checked after the page was read: a chain gone back before that read is seen here (one
    // gone back after it did not change what the page holds).
    if let Some(diverged) = check_positions(app.store().as_ref(), org, &positions).await? {
        return Ok(diverged_answer(&diverged));
    }
    Ok(Json(AuditEventPage {
        items: page.iter().map(AuditEventView::from).collect(),
        next_cursor: next,
    })
    .into_response())
}
