//! Public revocation: whoever finds a keyplane token (in a paste, a log, a public repository) may
//! kill it without authenticating, as GitHub's `POST /credentials/revoke` allows for GitHub's.
//!
//! No oracle: the answer (`202` with counts computed from the request alone: how many strings
//! were sent and how many have a keyplane token's shape and checksum, which anyone can compute
//! offline) is sent before any credential is looked up, and the reported tokens are worked off in
//! the background. So neither the answer nor its timing says whether a token existed, was live, or
//! belonged to anyone. Requests are limited per client address (`--public-revoke-per-minute`),
//! and reports the store must keep per replica, all addresses together
//! (`--public-revoke-total-per-minute`).
//!
//! Durable: a report is stored (its tokens' hashes, never a token) before it is answered 202, and
//! forgotten once worked off. The replica that received it works it off at once under a lease; a
//! report whose lease runs out (its replica was killed, or the store failed the work) is taken
//! again by any replica's [`run`] loop, after a restart too. Working a report off twice changes
//! nothing the second time: a revoked credential is not revoked again, and no event is recorded;
//! a canary's trigger event has an id made of the report's and the token's, written once.

use super::{respond_to_report, LeakReport, LeakSource, TAG};
use crate::app::App;
use crate::client_addr::ClientAddr;
use crate::error::{ApiError, AppError};
use crate::extract::{ApiJson, FromJsonBody, ObjectReader};
use crate::metrics::PublicReport;
use crate::verify::Verification;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
pub use keyplane_api_types::leaks::{RevokeAccepted, RevokeCredentialsRequest};
use keyplane_core::error::codes;
use keyplane_core::{FieldError, FieldPath, TokenHash};
use keyplane_store::{LeakReportRecord, StoreFault, Unavailable};
use std::time::{Duration, Instant};

pub use keyplane_api_types::leaks::MAX_CREDENTIALS;

/// How a replica works off stored reports.
#[derive(Debug, Clone)]
pub struct LeakReportsConfig {
    /// A report is leased for this long to the replica working it off (far longer than the work
    /// takes); once it runs out, any replica takes the report again.
    pub lease: Duration,
    /// How often each replica looks for reports whose lease ran out.
    pub poll_interval: Duration,
}

impl Default for LeakReportsConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// Reports stored at once at most, over every replica; past it new reports answer 503. They pile
/// up only while they cannot be worked off.
const MAX_STORED_REPORTS: u32 = 10_000;
/// A report not worked off this long after it was received is given up (logged): the store has
/// been failing its work all that time.
const GIVE_UP_AFTER: chrono::TimeDelta = chrono::TimeDelta::days(1);
/// Given-up reports deleted per transaction, and how often.
const PRUNE_BATCH: u32 = 1000;
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

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
/// whether or not any token existed, and is sent before any lookup. Limited per client address,
/// and per server over all addresses (past that, 503 with `Retry-After`).
/// A report answered 202 is stored first, and worked off even if the server stops or dies
/// meanwhile (after a restart, or by another replica); it is retried through a store outage for up
/// to a day. While the store's writes are failing the answer is 503 with `Retry-After` (send the
/// report again then).
#[utoipa::path(
    post, path = "/v1/credentials/revoke", tag = TAG,
    request_body(content = RevokeCredentialsRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: every listed keyplane credential is being revoked.", body = RevokeAccepted),
        (status = 400, description = "`invalid_request`: not a JSON object with 1–100 `credentials` strings.", body = crate::openapi::OAuthError),
        (status = 429, description = "Too many requests from this address; see Retry-After.", body = crate::openapi::OAuthError),
        (status = 503, description = "Too many reports are waiting to be worked off, the server's budget of reports per minute (all senders together) is spent, or the store's writes are failing (the report was not stored); send the report again later (see Retry-After).", body = crate::openapi::OAuthError),
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
    let mut tokens: Vec<TokenHash> = Vec::new();
    let mut well_formed = 0;
    for text in &body.credentials {
        if let Ok(parsed) = keyplane_core::token::parse(text) {
            well_formed += 1;
            if !tokens.contains(&parsed.hash) {
                tokens.push(parsed.hash);
            }
        }
    }
    let outcome = if tokens.is_empty() {
        PublicReport::NoToken
    } else {
        match store_report(&app, tokens, context).await {
            Ok(()) => PublicReport::Stored,
            Err((outcome, error)) => {
                app.inner().metrics.public_report(outcome);
                return Err(error.into());
            }
        }
    };
    app.inner().metrics.public_report(outcome);
    Ok((
        StatusCode::ACCEPTED,
        Json(RevokeAccepted {
            received: body.credentials.len(),
            well_formed,
        }),
    ))
}

/// Stores a report of `tokens` (at least one) and starts working it off; or why not, as
/// `keyplane_public_revoke_reports` counts it, and the error answered.
async fn store_report(
    app: &App,
    tokens: Vec<TokenHash>,
    context: keyplane_core::RequestContext,
) -> Result<(), (PublicReport, AppError)> {
    // Refused now rather than accepted and lost: the reporter retries. Says nothing about the
    // tokens (the same for any).
    let writes = app.store().write_health();
    if let (true, Some((fault, at))) = (writes.failing, writes.last_failure) {
        if Utc::now() - at < RECENT_WRITE_FAILURE {
            return Err((
                PublicReport::RefusedStoreFailing,
                AppError::Unavailable(Unavailable::new(
                    fault,
                    "the store's writes are failing; public revocation reports are refused",
                )),
            ));
        }
    }
    let busy = |why: &'static str| AppError::Unavailable(Unavailable::new(StoreFault::Busy, why));
    let permit = app.inner().leak_jobs.try_start().ok_or_else(|| {
        (
            PublicReport::RefusedInProgress,
            busy("too many public revocation reports in progress"),
        )
    })?;
    // All addresses together: one sender with many (a /48 holds 65,536 /64s) could otherwise
    // keep the store's writers, which every organization's changes wait for, busy.
    // The sender is told when the budget has room again: a fixed second would bring it (and
    // every other sender) back to be refused until then.
    if let Some(budget) = &app.inner().public_revoke_budget {
        budget.take(()).map_err(|wait| {
            (
                PublicReport::RefusedBudget,
                AppError::OverBudget {
                    why: "this replica's public revocation reports per minute are spent",
                    retry_after_secs: crate::error::retry_after_secs(wait),
                },
            )
        })?;
    }
    let report = LeakReportRecord {
        id: uuid::Uuid::now_v7(),
        token_hashes: tokens,
        context,
        received_at: crate::ops::now(),
        attempts: 1,
    };
    // Stored before the answer: a 202 is a promise that outlives this process. The same write
    // whatever the tokens are.
    let lease_id = uuid::Uuid::new_v4();
    let stored = app
        .store()
        .insert_leak_report(
            &report,
            lease_id,
            lease_until(app, report.received_at),
            MAX_STORED_REPORTS,
        )
        .await
        .map_err(|e| {
            let outcome = if matches!(e, keyplane_store::StoreError::Unavailable(_)) {
                PublicReport::RefusedStoreFailing
            } else {
                PublicReport::Failed
            };
            (outcome, AppError::from(e))
        })?;
    if !stored {
        return Err((
            PublicReport::RefusedStoredLimit,
            busy("too many public revocation reports stored"),
        ));
    }
    spawn_work_off(app, permit, report);
    Ok(())
}

/// Works `report` off on a task of its own, holding `permit` (its place among the replica's
/// reports in progress) until it is done.
fn spawn_work_off(app: &App, permit: tokio::sync::OwnedSemaphorePermit, report: LeakReportRecord) {
    let worker = app.clone();
    tokio::spawn(async move {
        let _permit = permit;
        work_off(&worker, &report).await;
    });
}

fn lease_until(app: &App, from: DateTime<Utc>) -> DateTime<Utc> {
    from + chrono::TimeDelta::from_std(app.inner().config.leak_reports.lease)
        .unwrap_or(chrono::TimeDelta::seconds(15))
}

/// Looks up each reported token and responds to the real ones, then forgets the report. A
/// transient store fault is retried at once and then with growing waits ([`crate::jobs::Backoff`])
/// while the report's lease lasts; then the report is left stored, for any replica to take again
/// once the lease has run out, until the store is back or it is given up ([`GIVE_UP_AFTER`]).
/// Logged once per report when an outage delays it, and once more when it is worked off. Never
/// logs a token.
async fn work_off(app: &App, stored: &LeakReportRecord) {
    let report = LeakReport {
        source: LeakSource::PublicRevoke,
        url: None,
        found_in: None,
        token_type: None,
        context: stored.context.clone(),
        identity: Some(super::ReportIdentity::stored(stored.id, stored.received_at)),
    };
    let request_id = report.context.request_id.as_deref();
    // A fifth of the lease is left for the last attempt: no other replica takes the report while
    // this one may still be working it off.
    let lease = app.inner().config.leak_reports.lease;
    let mut backoff = app
        .inner()
        .leak_jobs
        .backoff()
        .until(tokio::time::Instant::now() + lease * 4 / 5);
    for token in &stored.token_hashes {
        loop {
            match respond_to_report(app, token, &report).await.map(|_| ()) {
                Ok(()) => break,
                Err(AppError::Unavailable(unavailable)) => {
                    if backoff.is_first() && stored.attempts == 1 {
                        tracing::warn!(error = %unavailable, request.id = request_id, leak_report.id = %stored.id, "a public revocation report waits for the store; it is retried until the store is back");
                    }
                    if !backoff.wait(unavailable.fault).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, request.id = request_id, leak_report.id = %stored.id, "a public revocation report could not be worked off for one of its tokens");
                    break;
                }
            }
        }
    }
    // If this fails, the report is worked off once more when its lease runs out: nothing changes.
    if let Err(error) = app.store().finish_leak_report(stored.id).await {
        tracing::warn!(%error, leak_report.id = %stored.id, "a worked-off public revocation report could not be forgotten; it is worked off again, to no effect");
    }
    if stored.attempts > 1 || !backoff.is_first() {
        tracing::info!(
            request.id = request_id,
            leak_report.id = %stored.id,
            "a public revocation report delayed by the store (or by a stop) was worked off"
        );
    }
}

/// Each replica's loop, until `stop` turns true: takes the stored reports whose lease ran out
/// (left by a replica that died or stopped, or whose work the store failed), at once at start and
/// then every [`LeakReportsConfig::poll_interval`], as many as [`super::leak_jobs`] has room
/// for; and gives up reports older than [`GIVE_UP_AFTER`], hourly.
pub(crate) async fn run(app: App, stop: tokio::sync::watch::Receiver<bool>) {
    let mut every = crate::jobs::Every::new(app.inner().config.leak_reports.poll_interval, stop);
    let mut pruned_at: Option<Instant> = None;
    // Whether the last claim failed: logged once per outage, not at every poll.
    let mut failing = false;
    while every.tick().await {
        // Not while this replica's clock is off: one ahead would give up reports early.
        if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY)
            && app
                .inner()
                .clock_check
                .allows(&app, crate::clock_check::ClockJob::LeakReportGiveUp)
                .await
        {
            pruned_at = Some(Instant::now());
            give_up_old_reports(&app).await;
        }
        // Once a stop starts, nothing new is taken: what is left waits in the store.
        while !app.inner().leak_jobs.is_draining() {
            let Some(permit) = app.inner().leak_jobs.try_start() else {
                break;
            };
            let now = crate::ops::now();
            let lease_id = uuid::Uuid::new_v4();
            let claimed = crate::jobs::bounded(
                &app,
                crate::config::BackgroundJob::LeakReports,
                app.store()
                    .claim_leak_reports(lease_id, now, lease_until(&app, now), 1),
            );
            match claimed.await.unwrap_or_else(|late| Err(late.into())) {
                Ok(claimed) => {
                    failing = false;
                    let Some(report) = claimed.into_iter().next() else {
                        break;
                    };
                    spawn_work_off(&app, permit, report);
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "cannot look for public revocation reports left to work off; retrying");
                    }
                    failing = true;
                    break;
                }
            }
        }
    }
}

async fn give_up_old_reports(app: &App) {
    let before = crate::ops::now() - GIVE_UP_AFTER;
    loop {
        let batch = crate::jobs::bounded(
            app,
            crate::config::BackgroundJob::LeakReports,
            app.store().prune_leak_reports(before, PRUNE_BATCH),
        );
        match batch.await.unwrap_or_else(|late| Err(late.into())) {
            Ok(0) => return,
            Ok(given_up) => {
                tracing::error!(given_up, "public revocation reports were given up: the store failed their work for a day")
            }
            Err(error) => {
                tracing::warn!(%error, "cannot give up old public revocation reports");
                return;
            }
        }
    }
}
