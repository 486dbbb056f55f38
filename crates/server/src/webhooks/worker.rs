//! Each replica's delivery loop: keep up to [`MAX_IN_FLIGHT`] attempts going, leasing due
//! deliveries from the store as slots free (each attempt bounded by the timeout), record every
//! attempt, and schedule the retry or give up. A replica killed mid-attempt leaves its leases to
//! run out; another (or itself, restarted) sends those deliveries again: at least once.

use super::target::{literal_refusal, FilteringResolver, TargetRefused};
use super::{disabled_event, retry_at, WebhookConfig};
use crate::aether::AuditEventView;
use crate::app::App;
use crate::config::BackgroundJob;
use crate::ops::now;
use crate::wire::rfc3339;
use chrono::TimeDelta;
use keyplane_core::ChainedEvent;
use keyplane_store::{AttemptNext, AttemptRecorded, DeliveryAttempt, DeliveryClaim, DeliveryJob};
use rand::Rng;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Attempts one replica has in flight at most. Slots are refilled as attempts end, not batch by
/// batch, so an endpoint that never answers holds its own slot for the timeout and nobody else's.
const MAX_IN_FLIGHT: usize = 64;
/// A webhook's deliveries in flight at once, across replicas (the store counts leases): the rest
/// of its due deliveries wait behind them, so one slow endpoint cannot take the slots. Two, not
/// one: a healthy endpoint behind a bulk change (thousands of events) is served twice as fast.
const PER_WEBHOOK: u32 = 2;
/// An organization's deliveries in flight at once, across its webhooks and replicas: its
/// [`super::MAX_WEBHOOKS`] (20) endpoints hanging would otherwise hold 40 of [`MAX_IN_FLIGHT`], and
/// two such organizations every slot. Its other due deliveries wait in the store and take no
/// place in a claim, so the others' are claimed meanwhile.
const PER_TENANT: u32 = 16;
/// How much of a receiver's answer is read (and then dropped).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Finished deliveries deleted per transaction, the pause between transactions (so that a large
/// prune never holds the store, nor SQLite's one writer, for long), and how often the prune runs.
const PRUNE_BATCH: u32 = 1000;
const PRUNE_PAUSE: Duration = Duration::from_millis(50);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How soon a prune held by the clock check asks again.
const PRUNE_HELD_RETRY: Duration = Duration::from_secs(30);
/// How long the loop waits after the store failed a claim.
const CLAIM_BACKOFF: Duration = Duration::from_secs(5);
const USER_AGENT: &str = concat!("keyplane-webhooks/", env!("CARGO_PKG_VERSION"));

/// The lease on a claimed delivery: longer than an attempt can take (the timeout) plus recording
/// it, so that no other replica sends it meanwhile. A claim takes only what starts at once, and
/// renews the lease from the time it has read what sending takes.
fn lease(config: &WebhookConfig) -> TimeDelta {
    TimeDelta::from_std(config.timeout + config.lease_margin).unwrap_or(TimeDelta::minutes(1))
}

/// The webhook HTTP client: no redirects, no proxy (a proxy would resolve names where this
/// replica cannot check them), the address filter, system root certificates for https.
fn client(config: &WebhookConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .user_agent(USER_AGENT)
        .dns_resolver(Arc::new(FilteringResolver {
            allow_private: config.allow_private_targets,
        }))
        .tls_built_in_webpki_certs(false)
        .tls_built_in_native_certs(true)
        .build()
}

/// Runs until `stop` turns true, then finishes the attempts in flight.
pub(crate) async fn run(app: App, mut stop: tokio::sync::watch::Receiver<bool>) {
    let config = Arc::new(app.inner().config.webhooks.clone());
    let client = match client(&config) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the webhook HTTP client: no webhook is delivered by this replica");
            return;
        }
    };
    // Its own task: a large prune must not hold up the claims.
    let pruning = tokio::spawn(prune_every_hour(app.clone(), config.clone(), stop.clone()));
    let counting = tokio::spawn(count_backlog(app.clone(), config.clone(), stop.clone()));
    let mut in_flight = JoinSet::new();
    // Not before then: the store failed the last claim.
    let mut claim_after = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        let free = MAX_IN_FLIGHT - in_flight.len();
        if free > 0 && Instant::now() >= claim_after {
            // Abandoned at its deadline, as a failed claim: what it leased is claimed again once
            // the lease runs out.
            let claimed = crate::jobs::bounded(
                &app,
                BackgroundJob::WebhookClaim,
                claim(&app, &config, free),
            );
            match claimed.await.ok().flatten() {
                Some((lease_id, jobs)) => {
                    for job in jobs {
                        in_flight.spawn(deliver(
                            app.clone(),
                            client.clone(),
                            config.clone(),
                            lease_id,
                            job,
                        ));
                    }
                }
                // The store is failing: try again later, without a warning every poll.
                None => claim_after = Instant::now() + config.poll_interval.max(CLAIM_BACKOFF),
            }
        }
        // An attempt that ends frees a slot, and its webhook's next delivery: claim again then.
        // Otherwise look again after the poll interval (or the backoff).
        let wait = claim_after
            .checked_duration_since(Instant::now())
            .unwrap_or(config.poll_interval);
        tokio::select! {
            Some(ended) = in_flight.join_next(), if !in_flight.is_empty() => {
                ended_attempt(ended);
                while let Some(ended) = in_flight.try_join_next() {
                    ended_attempt(ended);
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
    }
    while let Some(ended) = in_flight.join_next().await {
        ended_attempt(ended);
    }
    if let Err(error) = pruning.await {
        tracing::error!(%error, "the webhook delivery prune panicked");
    }
    if let Err(error) = counting.await {
        tracing::error!(%error, "the webhook backlog count panicked");
    }
}

/// Counts the pending deliveries for `/metrics` every `backlog_interval`, until `stop`. A count
/// the store fails keeps the last one (the store's own faults are in `/readyz`).
async fn count_backlog(
    app: App,
    config: Arc<WebhookConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        match app.store().webhook_backlog().await {
            Ok(backlog) => app
                .inner()
                .metrics
                .webhook_backlog(backlog.pending, backlog.oldest_queued_at),
            Err(error) => tracing::debug!(%error, "cannot count the pending webhook deliveries"),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.backlog_interval) => {}
            _ = stop.changed() => return,
        }
    }
}

fn ended_attempt(ended: Result<(), tokio::task::JoinError>) {
    if let Err(error) = ended {
        // Its lease runs out and the delivery is attempted again: at least once.
        tracing::error!(%error, "a webhook delivery attempt panicked");
    }
}

/// Leases up to `free` due deliveries; `None` when the store failed, or was too slow to leave a
/// lease an attempt fits in.
async fn claim(
    app: &App,
    config: &WebhookConfig,
    free: usize,
) -> Option<(uuid::Uuid, Vec<DeliveryJob>)> {
    let started = now();
    let claim = DeliveryClaim {
        now: started,
        lease_until: started + lease(config),
        lease_id: uuid::Uuid::new_v4(),
        limit: u32::try_from(free).unwrap_or(u32::MAX),
        max_per_webhook: PER_WEBHOOK,
        max_per_tenant: PER_TENANT,
    };
    let jobs = match app.store().claim_webhook_deliveries(&claim).await {
        Ok(jobs) if jobs.is_empty() => return Some((claim.lease_id, jobs)),
        Ok(jobs) => jobs,
        Err(error) => {
            tracing::warn!(%error, "cannot claim webhook deliveries; retrying");
            return None;
        }
    };
    // The lease ran while the claim read the jobs, which a slow store takes seconds for: renewed
    // from now, it covers each attempt and its record. Once it had run out, another claim may
    // have taken a delivery: that one is the other claim's to send.
    let until = now() + lease(config);
    let renewed = match app.store().renew_webhook_lease(claim.lease_id, until).await {
        Ok(renewed) => renewed.into_iter().collect::<HashSet<_>>(),
        Err(error) => {
            // They are claimed again once the lease runs out.
            tracing::warn!(%error, "cannot renew the lease of claimed webhook deliveries; retrying");
            return None;
        }
    };
    // The renewal too may have been slow: an attempt starts only if it ends within the lease.
    let timeout = TimeDelta::from_std(config.timeout).unwrap_or(TimeDelta::MAX);
    if until - now() < timeout {
        tracing::warn!(
            deliveries = jobs.len(),
            "the store took so long to claim webhook deliveries that their lease would run out during the attempts; they are claimed again once it runs out"
        );
        return None;
    }
    let claimed = jobs.len();
    let jobs: Vec<DeliveryJob> = jobs
        .into_iter()
        .filter(|job| renewed.contains(&(job.webhook.id, job.event_id)))
        .collect();
    if jobs.len() < claimed {
        tracing::warn!(
            taken = claimed - jobs.len(),
            "the store took so long to claim webhook deliveries that their lease ran out and another claim took some; that claim sends those"
        );
    }
    Some((claim.lease_id, jobs))
}

async fn deliver(
    app: App,
    client: reqwest::Client,
    config: Arc<WebhookConfig>,
    lease_id: uuid::Uuid,
    job: DeliveryJob,
) {
    let config = config.as_ref();
    let outcome = match &job.event {
        Some(event) => send(&client, config, &job, event).await,
        None => Outcome {
            status_code: None,
            latency_ms: 0,
            error: Some("the event was pruned from the audit trail".into()),
            permanent: true,
        },
    };
    let at = now();
    let next = if job.event.is_none() {
        AttemptNext::Abandoned
    } else if outcome.error.is_none() {
        AttemptNext::Succeeded
    } else if outcome.permanent {
        AttemptNext::Failed
    } else {
        let jitter = rand::thread_rng().gen_range(0.0..0.2);
        match retry_at(&config.retry_schedule, job.schedule_step, at, jitter) {
            Some(when) => AttemptNext::RetryAt(when),
            None => AttemptNext::Failed,
        }
    };
    let webhook = &job.webhook;
    match &outcome.error {
        None => {
            tracing::debug!(tenant.id = %webhook.tenant_id, webhook.id = %webhook.id, event.id = %job.event_id, http.status = outcome.status_code, "webhook delivered")
        }
        // A delivery given up for good is a lost event for the receiver: warn, so that it stands
        // out among the routine failed attempts.
        Some(error) if matches!(next, AttemptNext::Failed | AttemptNext::Abandoned) => {
            tracing::warn!(tenant.id = %webhook.tenant_id, webhook.id = %webhook.id, event.id = %job.event_id, attempt = job.attempts + 1, http.status = outcome.status_code, %error, "webhook delivery failed for good: no further attempt (a retry through the deliveries API sends it again)")
        }
        Some(error) => {
            let next_attempt_at = match next {
                AttemptNext::RetryAt(at) => Some(at.to_rfc3339()),
                _ => None,
            };
            tracing::info!(tenant.id = %webhook.tenant_id, webhook.id = %webhook.id, event.id = %job.event_id, attempt = job.attempts + 1, http.status = outcome.status_code, %error, next_attempt_at, "webhook delivery attempt failed")
        }
    }
    let attempt = DeliveryAttempt {
        webhook_id: webhook.id,
        event_id: job.event_id,
        lease_id,
        at,
        status_code: outcome.status_code,
        latency_ms: outcome.latency_ms,
        error: outcome.error,
        next,
    };
    // A clock ahead would disable a webhook before it has failed that long, and one behind would
    // date the start of its failures too early: while this replica's clock is off by more than an
    // hour (`ClockJob::WebhookDisable`: five days are not decided by less), its failures neither
    // start a webhook's failing period nor disable it (a replica with a good clock's do).
    let failing_since = if app
        .inner()
        .clock_check
        .allows_now(&app, crate::clock_check::ClockJob::WebhookDisable)
    {
        at - TimeDelta::from_std(config.disable_after).unwrap_or(TimeDelta::days(5))
    } else {
        chrono::DateTime::<chrono::Utc>::MIN_UTC
    };
    let disabled = disabled_event(webhook, config.disable_after);
    let recorded = crate::jobs::bounded(
        &app,
        BackgroundJob::WebhookRecord,
        app.store()
            .record_webhook_attempt(&attempt, failing_since, &disabled),
    );
    match recorded.await.unwrap_or_else(|late| Err(late.into())) {
        Ok(AttemptRecorded::Recorded) => {}
        Ok(AttemptRecorded::Recovered { brought_forward }) => {
            tracing::info!(tenant.id = %webhook.tenant_id, webhook.id = %webhook.id, brought_forward, "webhook answers again: its deliveries waiting for a retry are sent now")
        }
        Ok(AttemptRecorded::Disabled) => {
            tracing::warn!(tenant.id = %webhook.tenant_id, webhook.id = %webhook.id, "webhook disabled: every delivery attempt failed for too long")
        }
        // Sent, but its outcome is not kept: the claim that took it sends it again (at least once).
        Ok(AttemptRecorded::NotLeased) => {
            tracing::warn!(tenant.id = %webhook.tenant_id, webhook.id = %webhook.id, event.id = %job.event_id, "a webhook delivery attempt was not recorded: its lease had run out and another claim had taken the delivery, or it had ended meanwhile (its webhook disabled or deleted)")
        }
        // The lease runs out and the delivery is attempted again: at least once.
        Err(error) => {
            tracing::warn!(%error, webhook.id = %webhook.id, event.id = %job.event_id, "cannot record a webhook delivery attempt")
        }
    }
}

struct Outcome {
    status_code: Option<u16>,
    latency_ms: u64,
    /// `None`: delivered (a 2xx answer).
    error: Option<String>,
    /// No retry can succeed.
    permanent: bool,
}

/// The body every receiver gets: `{"type", "timestamp", "data"}`, `data` being the event as
/// `GET .../audit-events` shows it.
pub fn payload(event: &ChainedEvent) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": event.event.action,
        "timestamp": rfc3339(&event.event.occurred_at),
        "data": AuditEventView::from(event),
    }))
    .expect("an audit event serializes")
}

async fn send(
    client: &reqwest::Client,
    config: &WebhookConfig,
    job: &DeliveryJob,
    event: &ChainedEvent,
) -> Outcome {
    let refused = |error: String| Outcome {
        status_code: None,
        latency_ms: 0,
        error: Some(error),
        permanent: false,
    };
    let Ok(url) = reqwest::Url::parse(&job.webhook.url) else {
        return refused("the stored URL does not parse".into());
    };
    // Names are checked by the resolver; address literals never reach it.
    if !config.allow_private_targets {
        if let Some(refusal) = literal_refusal(&url) {
            return refused(format!("refused: {refusal}"));
        }
    }
    let body = payload(event);
    let message_id = job.event_id.to_string();
    let timestamp = chrono::Utc::now().timestamp();
    let signature = job
        .webhook
        .signatures(&message_id, timestamp, &body, chrono::Utc::now());
    let started = Instant::now();
    let attempt = async {
        let mut response = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &message_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        // Read a bounded part of the answer, so a receiver cannot make this replica buffer much.
        let mut read = 0;
        while read < MAX_RESPONSE_BYTES {
            match response.chunk().await? {
                Some(chunk) => read += chunk.len(),
                None => break,
            }
        }
        Ok::<_, reqwest::Error>(status)
    };
    let answered = tokio::time::timeout(config.timeout, attempt).await;
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match answered {
        Ok(Ok(status)) => Outcome {
            status_code: Some(status.as_u16()),
            latency_ms,
            error: (!status.is_success()).then(|| match status.as_u16() {
                300..=399 => format!("answered {status}; redirects are not followed"),
                _ => format!("answered {status}"),
            }),
            permanent: false,
        },
        Ok(Err(error)) => Outcome {
            status_code: None,
            latency_ms,
            error: Some(describe(&error, config.timeout)),
            permanent: false,
        },
        Err(_) => Outcome {
            status_code: None,
            latency_ms,
            error: Some(format!("no answer within {:?}", config.timeout)),
            permanent: false,
        },
    }
}

/// Why a request failed, without its URL (which may carry a receiver's token): reqwest's own
/// message names the URL, so only the causes under it are told.
fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    let mut source = std::error::Error::source(error);
    let mut causes = Vec::new();
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<TargetRefused>() {
            return format!("refused: {refused}");
        }
        causes.push(cause.to_string());
        source = cause.source();
    }
    if error.is_timeout() {
        return format!("no answer within {timeout:?}");
    }
    let what = if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "the answer broke off"
    } else {
        "the request failed"
    };
    causes.dedup();
    let mut text = match causes.last() {
        Some(cause) => format!("{what}: {cause}"),
        None => what.to_string(),
    };
    if text.len() > 300 {
        let mut end = 300;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Prunes finished deliveries past the retention at start and then hourly, until `stop`.
async fn prune_every_hour(
    app: App,
    config: Arc<WebhookConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let wait = if prune(&app, &config, &mut stop).await {
            PRUNE_EVERY
        } else {
            PRUNE_HELD_RETRY
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Deletes every finished delivery past the retention, in batches until one comes back short
/// (a fixed number of batches would let one busy organization's deliveries outgrow it, and the
/// table grow without bound). `false` when it was held by the clock check, to be tried again
/// soon; stops between batches at `stop`.
async fn prune(
    app: &App,
    config: &WebhookConfig,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    // Not while this replica's clock is off: it cuts by it.
    let clock = &app.inner().clock_check;
    if !clock
        .allows(app, crate::clock_check::ClockJob::WebhookDeliveryPrune)
        .await
    {
        return false;
    }
    let retention = TimeDelta::from_std(config.delivery_retention).unwrap_or(TimeDelta::days(30));
    loop {
        if *stop.borrow() {
            return true;
        }
        // The clock may have been found off since: held, as at the start.
        if !clock.allows_now(app, crate::clock_check::ClockJob::WebhookDeliveryPrune) {
            return false;
        }
        let at = now();
        let batch = crate::jobs::bounded(
            app,
            BackgroundJob::WebhookPrune,
            app.store()
                .prune_webhook_deliveries(at, at - retention, PRUNE_BATCH),
        );
        match batch.await.unwrap_or_else(|late| Err(late.into())) {
            Ok(deleted) if deleted == u64::from(PRUNE_BATCH) => {}
            Ok(_) => return true,
            Err(error) => {
                tracing::warn!(%error, "cannot prune old webhook deliveries; retrying later");
                return true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_PAUSE) => {}
            _ = stop.changed() => return true,
        }
    }
}
