//! Public revocation: whoever finds a keyplane token (in a paste, a log, a public repository) may
//! kill it without authenticating, as GitHub's `POST /credentials/revoke` allows for GitHub's.
//!
//! No oracle: the answer (`202` with counts computed from the request alone: how many strings
//! were sent and how many have a keyplane token's shape and checksum, which anyone can compute
//! offline) is sent before the store is consulted, and the reported tokens are worked off in the
//! background. So neither the answer nor its timing says whether a token existed, was live, or
//! belonged to anyone. Requests are limited per client address (`--public-revoke-per-minute`).

use super::{find_reported, respond_to_leak, LeakReport, LeakSource, TAG};
use crate::app::App;
use crate::client_addr::ClientAddr;
use crate::error::{ApiError, AppError};
use crate::extract::{ApiJson, FromJsonBody, ObjectReader};
use crate::verify::Verification;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
pub use keyplane_api_types::leaks::{RevokeAccepted, RevokeCredentialsRequest};
use keyplane_core::error::codes;
use keyplane_core::token::ParsedToken;
use keyplane_core::{FieldError, FieldPath, RequestContext};
use keyplane_store::{StoreFault, Unavailable};

pub use keyplane_api_types::leaks::MAX_CREDENTIALS;

/// A write failure at most this old means the store's writes are failing now: a report is then
/// refused (503) rather than accepted and left waiting. An older one is not trusted (nothing may
/// have written since), so a report is accepted and its own attempt tells.
const RECENT_WRITE_FAILURE: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

impl FromJsonBody for RevokeCredentialsRequest {
    fn from_json(r: &mut ObjectReader, _now: DateTime<Utc>) -> Option<Self> {
        let path = || FieldPath::body("credentials");
        let credentials = match r.string_list("credentials") {
            Ok(Some(list)) if list.is_empty() => {
                r.check::<()>(Err(FieldError::new(
                    path(),
                    codes::TOO_SHORT,
                    "must list at least one credential",
                )));
                None
            }
            Ok(Some(list)) if list.len() > MAX_CREDENTIALS => {
                r.check::<()>(Err(FieldError::new(
                    path(),
                    codes::TOO_MANY,
                    format!("at most {MAX_CREDENTIALS} credentials per request"),
                )));
                None
            }
            Ok(Some(list)) => Some(list),
            Ok(None) => {
                r.check::<()>(Err(FieldError::new(path(), codes::REQUIRED, "is required")));
                None
            }
            Err(()) => None,
        };
        Some(Self {
            credentials: credentials?,
        })
    }
}

/// Revoke leaked credentials
///
/// For anyone who finds a keyplane token where it should not be: lists up to 100 tokens to
/// revoke, with no authentication. Strings that are not keyplane tokens are ignored without any
/// lookup; each real credential is revoked shortly after the answer, and `credential.leaked` is
/// recorded in its organization's audit trail with the reporter's address. The answer is the same
/// whether or not any token existed, and is sent before any lookup. Limited per client address.
/// While the store's writes are failing the answer is 503 with `Retry-After` (send the report
/// again then); a report accepted is retried through a store outage for up to an hour.
#[utoipa::path(
    post, path = "/v1/credentials/revoke", tag = TAG,
    request_body(content = RevokeCredentialsRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: every listed keyplane credential is being revoked.", body = RevokeAccepted),
        (status = 400, description = "`invalid_request`: not a JSON object with 1–100 `credentials` strings.", body = crate::openapi::OAuthError),
        (status = 429, description = "Too many requests from this address; see Retry-After.", body = crate::openapi::OAuthError),
        (status = 503, description = "Too many reports are being worked off, or the store's writes are failing; send the report again later (see Retry-After).", body = crate::openapi::OAuthError),
    ),
    security(()),
)]
pub(crate) async fn revoke_credentials(
    State(app): State<App>,
    request: Request,
) -> Result<(StatusCode, Json<RevokeAccepted>), ApiError<Verification>> {
    // Charged before the body is read, so that malformed floods cost their sender too.
    if let (Some(limiter), Some(client)) = (
        &app.inner().public_revoke_limiter,
        request.extensions().get::<ClientAddr>().copied(),
    ) {
        limiter.check(client.limit_key())?;
    }
    let context = crate::audit::request_context(request.headers(), request.extensions());
    let (ApiJson(body, _), _) =
        ApiJson::<Verification, RevokeCredentialsRequest>::with_bytes(request, &app).await?;
    let mut tokens: Vec<ParsedToken> = Vec::new();
    let mut well_formed = 0;
    for text in &body.credentials {
        if let Ok(parsed) = keyplane_core::token::parse(text) {
            well_formed += 1;
            if !tokens.contains(&parsed) {
                tokens.push(parsed);
            }
        }
    }
    if !tokens.is_empty() {
        // Refused now rather than accepted and lost: the reporter retries. Says nothing about the
        // tokens (the same for any).
        let writes = app.store().write_health();
        if let (true, Some((fault, at))) = (writes.failing, writes.last_failure) {
            if Utc::now() - at < RECENT_WRITE_FAILURE {
                return Err(AppError::Unavailable(Unavailable::new(
                    fault,
                    "the store's writes are failing; public revocation reports are refused",
                ))
                .into());
            }
        }
        let permit = app.inner().leak_jobs.try_start().ok_or_else(|| {
            AppError::Unavailable(Unavailable::new(
                StoreFault::Busy,
                "too many public revocation reports in progress",
            ))
        })?;
        let worker = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            work_off(&worker, tokens, context).await;
        });
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(RevokeAccepted {
            received: body.credentials.len(),
            well_formed,
        }),
    ))
}

/// Looks up each reported token and responds to the real ones. The reporter was told its tokens
/// are being revoked, so a transient store fault is retried until the store is back, for up to an
/// hour ([`crate::jobs::Backoff`]). Logged once per report when an outage delays it, and once more
/// if it is given up. Never logs a token.
async fn work_off(app: &App, tokens: Vec<ParsedToken>, context: RequestContext) {
    let report = LeakReport {
        source: LeakSource::PublicRevoke,
        url: None,
        found_in: None,
        token_type: None,
        context,
    };
    let mut backoff = app.inner().leak_jobs.backoff();
    let request_id = report.context.request_id.as_deref();
    for (done, token) in tokens.iter().enumerate() {
        loop {
            let outcome = match find_reported(app, token).await {
                Ok(Some(credential)) => respond_to_leak(app, &credential, &token.hash, &report)
                    .await
                    .map(|_| ()),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => break,
                Err(AppError::Unavailable(unavailable)) => {
                    if backoff.is_first() {
                        tracing::warn!(error = %unavailable, request.id = request_id, "a public revocation report waits for the store; retrying until it is back");
                    }
                    if !backoff.wait(unavailable.fault).await {
                        tracing::error!(error = %unavailable, request.id = request_id, tokens.left = tokens.len() - done, "a public revocation report was given up: the store stayed unavailable");
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, request.id = request_id, "a public revocation report could not be worked off");
                    break;
                }
            }
        }
    }
    if !backoff.is_first() {
        tracing::info!(
            request.id = request_id,
            "a public revocation report delayed by the store was worked off"
        );
    }
}
