//! Webhooks: a tenant's endpoints that receive its audit events, signed as Standard Webhooks
//! defines. The use cases here (authorize, decide, call the store with the change's audit event)
//! serve the Aether routes; [`worker`] sends what the store queued; [`target`] decides which
//! addresses may be sent to.

pub mod target;
pub(crate) mod worker;

use crate::app::App;
use crate::error::AppError;
use crate::ops::{audit_event, now};
use chrono::{DateTime, TimeDelta, Utc};
use keyplane_core::audit::{actions, AuditActor};
use keyplane_core::{
    ActionPattern, AuditEvent, Capability, DeliveryStatus, Error as DomainError, FieldPath,
    Principal, RequestContext, TenantId, Webhook, WebhookSecret,
};
use keyplane_store::{DeliveryQuery, StoreError, WebhookDelivery};
use rand::rngs::OsRng;
use std::time::Duration;

/// Webhooks one organization may have.
pub const MAX_WEBHOOKS: u32 = 20;

/// How deliveries are made. `serve` sets `allow_private_targets` and `retry_schedule` from flags;
/// tests shorten the rest.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Lets webhooks target loopback, private and link-local addresses (tests, closed networks).
    pub allow_private_targets: bool,
    /// The delay before each retry after a failed attempt; once used up, the delivery has failed.
    /// Each delay is stretched by a random 0–20 % (jitter), never shortened.
    pub retry_schedule: Vec<Duration>,
    /// One attempt (resolving, connecting, sending, reading the answer) takes at most this.
    pub timeout: Duration,
    /// A claimed delivery is leased for the timeout and this much more, to record the attempt;
    /// the lease is renewed once the claim has read what sending takes.
    pub lease_margin: Duration,
    /// How often each replica looks for due deliveries when it found none.
    pub poll_interval: Duration,
    /// A webhook whose every attempt has failed for this long is disabled.
    pub disable_after: Duration,
    /// After a secret rotation, deliveries carry a signature with the old secret too for this long.
    pub secret_overlap: Duration,
    /// Finished deliveries are forgotten after this long.
    pub delivery_retention: Duration,
    /// How often each replica counts the pending deliveries for `/metrics`
    /// (`keyplane_webhook_deliveries_pending`).
    pub backlog_interval: Duration,
}

/// The default schedule: attempts at 0, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h after each
/// failure (8 attempts over at least 27 h 35 min), as Svix does.
pub const DEFAULT_RETRY_SCHEDULE: &str = "5s,5m,30m,2h,5h,10h,10h";

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            allow_private_targets: false,
            retry_schedule: parse_schedule(DEFAULT_RETRY_SCHEDULE)
                .expect("the default schedule parses"),
            timeout: Duration::from_secs(5),
            lease_margin: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            disable_after: Duration::from_secs(5 * 24 * 3600),
            secret_overlap: Duration::from_secs(24 * 3600),
            delivery_retention: Duration::from_secs(30 * 24 * 3600),
            backlog_interval: Duration::from_secs(15),
        }
    }
}

/// A comma-separated list of delays, each a whole number with a unit: `ms`, `s`, `m` or `h`
/// (`5s,5m,30m,2h`). At most 20 of them, each at most 48 h.
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, String> {
    let delays = text
        .split(',')
        .map(|item| {
            let item = item.trim();
            let split = item
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(|| format!("{item:?} has no unit (ms, s, m or h)"))?;
            let (number, unit) = item.split_at(split);
            let number: u64 = number
                .parse()
                .map_err(|_| format!("{item:?} does not start with a whole number"))?;
            let millis = match unit {
                "ms" => Some(number),
                "s" => number.checked_mul(1000),
                "m" => number.checked_mul(60_000),
                "h" => number.checked_mul(3_600_000),
                _ => return Err(format!("{item:?}: the unit is ms, s, m or h")),
            };
            match millis {
                Some(ms) if ms <= 48 * 3_600_000 => Ok(Duration::from_millis(ms)),
                _ => Err(format!("{item:?} is longer than 48h")),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if delays.len() > 20 {
        return Err("at most 20 retries".into());
    }
    Ok(delays)
}

/// What a caller asks for, validated by the surface (the address check is [`target`]'s, here).
pub struct WebhookSpec {
    pub url: reqwest::Url,
    pub events: Vec<ActionPattern>,
    pub description: String,
    pub enabled: bool,
}

/// The URL's scheme, host and port: without its path and query, which may carry a receiver's
/// token.
fn endpoint_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .map(|url| url.origin().ascii_serialization())
        .unwrap_or_default()
}

/// The first 8 bytes of the SHA-256 of the whole URL, in hex: tells an auditor that the URL
/// changed (a path moved to another receiver at the same host) without recording its path or
/// query.
fn url_fingerprint(url: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(url.as_bytes())[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn enabled_text(enabled: bool) -> &'static str {
    if enabled {
        "true"
    } else {
        "false"
    }
}

pub(crate) fn webhook_event(
    action: &str,
    actor: AuditActor,
    context: &RequestContext,
    webhook: &Webhook,
) -> AuditEvent {
    let name = (!webhook.description.is_empty()).then_some(webhook.description.as_str());
    audit_event(webhook.tenant_id, action, actor, context)
        .target("webhook", webhook.id, name)
        .text("endpoint", endpoint_of(&webhook.url))
        .text("url_fingerprint", url_fingerprint(&webhook.url))
        .list("events", webhook.events.iter().map(ActionPattern::to_wire))
        .text("enabled", enabled_text(webhook.enabled))
}

/// An update's event also carries the values it replaced, as `old_*` (as a rotation's
/// `old_display_prefix`), for each field it changed.
fn with_old_values(mut event: AuditEvent, before: &Webhook, after: &Webhook) -> AuditEvent {
    if before.url != after.url {
        event = event.text("old_url_fingerprint", url_fingerprint(&before.url));
        let old_endpoint = endpoint_of(&before.url);
        if old_endpoint != endpoint_of(&after.url) {
            event = event.text("old_endpoint", old_endpoint);
        }
    }
    let wire = |webhook: &Webhook| -> Vec<String> {
        webhook.events.iter().map(ActionPattern::to_wire).collect()
    };
    if wire(before) != wire(after) {
        event = event.list("old_events", wire(before));
    }
    if before.enabled != after.enabled {
        event = event.text("old_enabled", enabled_text(before.enabled));
    }
    if before.description != after.description {
        event = event.text("old_description", before.description.clone());
    }
    event
}

/// The event of a webhook that keyplane turned off.
pub(crate) fn disabled_event(webhook: &Webhook, failing_for: Duration) -> AuditEvent {
    let mut disabled = webhook.clone();
    disabled.enabled = false;
    webhook_event(
        actions::WEBHOOK_DISABLED,
        AuditActor::system(),
        &RequestContext::default(),
        &disabled,
    )
    .text(
        "reason",
        format!(
            "every delivery attempt failed for {} hours",
            failing_for.as_secs() / 3600
        ),
    )
}

async fn check_spec(app: &App, spec: &WebhookSpec) -> Result<(), AppError> {
    target::check_target(
        FieldPath::body("url"),
        &spec.url,
        app.inner().config.webhooks.allow_private_targets,
    )
    .await
    .map_err(|e| AppError::from(DomainError::from(e)))
}

/// What choosing a webhook's URL and events needs: `webhooks:manage`, and `audit:read`, since a
/// subscription sends the audit trail out (a manager without it could read it from a receiver).
fn require_subscriber(who: &Principal, tenant: TenantId) -> Result<(), AppError> {
    who.require(tenant, Capability::WebhooksManage)?;
    Ok(who.require(tenant, Capability::AuditRead)?)
}

/// A new webhook and its signing secret (the caller shows it once).
pub async fn create_webhook(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    spec: WebhookSpec,
    answer: crate::ops::Answer<'_, Webhook>,
) -> Result<Webhook, AppError> {
    require_subscriber(who, tenant)?;
    check_spec(app, &spec).await?;
    let now = now();
    let webhook = Webhook {
        id: uuid::Uuid::now_v7(),
        tenant_id: tenant,
        url: spec.url.to_string(),
        events: spec.events,
        description: spec.description,
        enabled: spec.enabled,
        secret: WebhookSecret::generate(&mut OsRng),
        previous_secret: None,
        failing_since: None,
        created_at: now,
        updated_at: now,
    };
    let event = webhook_event(
        actions::WEBHOOK_CREATED,
        AuditActor::of(who),
        context,
        &webhook,
    );
    let seal = answer.map(|answer| move |stored: &Webhook| answer(stored.clone()));
    app.store()
        .create_webhook(
            &webhook,
            MAX_WEBHOOKS,
            &event,
            seal.as_ref().map(|s| s as _),
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict(message) => DomainError::Conflict(message).into(),
            other => AppError::from(other),
        })?;
    tracing::info!(tenant.id = %tenant, webhook.id = %webhook.id, principal.id = %who.id(), "webhook created");
    Ok(webhook)
}

pub async fn list_webhooks(
    app: &App,
    who: &Principal,
    tenant: TenantId,
) -> Result<Vec<Webhook>, AppError> {
    who.require(tenant, Capability::WebhooksManage)?;
    Ok(app.store().list_webhooks(tenant).await?)
}

pub async fn get_webhook(
    app: &App,
    who: &Principal,
    tenant: TenantId,
    id: uuid::Uuid,
) -> Result<Webhook, AppError> {
    who.require(tenant, Capability::WebhooksManage)?;
    app.store()
        .get_webhook(tenant, id)
        .await?
        .ok_or_else(|| DomainError::NotFound.into())
}

/// Replaces what a caller may change; the secret stays.
pub async fn update_webhook(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    id: uuid::Uuid,
    spec: WebhookSpec,
) -> Result<Webhook, AppError> {
    require_subscriber(who, tenant)?;
    let mut webhook = get_webhook(app, who, tenant, id).await?;
    check_spec(app, &spec).await?;
    let before = webhook.clone();
    webhook.url = spec.url.to_string();
    webhook.events = spec.events;
    webhook.description = spec.description;
    if spec.enabled && !webhook.enabled {
        webhook.failing_since = None;
    }
    webhook.enabled = spec.enabled;
    webhook.updated_at = now();
    let event = with_old_values(
        webhook_event(
            actions::WEBHOOK_UPDATED,
            AuditActor::of(who),
            context,
            &webhook,
        ),
        &before,
        &webhook,
    );
    app.store().update_webhook(&webhook, &event).await?;
    tracing::info!(tenant.id = %tenant, webhook.id = %id, principal.id = %who.id(), "webhook updated");
    Ok(webhook)
}

pub async fn delete_webhook(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    id: uuid::Uuid,
) -> Result<(), AppError> {
    let webhook = get_webhook(app, who, tenant, id).await?;
    let event = webhook_event(
        actions::WEBHOOK_DELETED,
        AuditActor::of(who),
        context,
        &webhook,
    );
    app.store().delete_webhook(tenant, id, &event).await?;
    tracing::info!(tenant.id = %tenant, webhook.id = %id, principal.id = %who.id(), "webhook deleted");
    Ok(())
}

/// A new signing secret; deliveries carry a signature with the one it replaces too for
/// `secret_overlap` (24 h), so receivers can switch without losing any.
pub async fn rotate_webhook_secret(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    id: uuid::Uuid,
    answer: crate::ops::Answer<'_, Webhook>,
) -> Result<Webhook, AppError> {
    let webhook = get_webhook(app, who, tenant, id).await?;
    let now = now();
    let overlap = TimeDelta::from_std(app.inner().config.webhooks.secret_overlap)
        .unwrap_or(TimeDelta::hours(24));
    let event = webhook_event(
        actions::WEBHOOK_SECRET_ROTATED,
        AuditActor::of(who),
        context,
        &webhook,
    )
    .text(
        "previous_secret_valid_until",
        keyplane_core::audit::canonical_time(now + overlap),
    );
    let secret = WebhookSecret::generate(&mut OsRng);
    // The answer shows the webhook as the rotation left it (read in its transaction).
    let seal = answer.map(|answer| move |stored: &Webhook| answer(stored.clone()));
    let rotated = app
        .store()
        .rotate_webhook_secret(
            tenant,
            id,
            &secret,
            now + overlap,
            now,
            &event,
            seal.as_ref().map(|s| s as _),
        )
        .await?;
    tracing::info!(tenant.id = %tenant, webhook.id = %id, principal.id = %who.id(), "webhook secret rotated");
    Ok(rotated)
}

/// A page of the webhook's deliveries (newest event first) and the cursor of the next page.
pub async fn list_deliveries(
    app: &App,
    who: &Principal,
    tenant: TenantId,
    webhook_id: uuid::Uuid,
    before: Option<uuid::Uuid>,
    status: Option<DeliveryStatus>,
    limit: u32,
) -> Result<(Vec<WebhookDelivery>, Option<uuid::Uuid>), AppError> {
    get_webhook(app, who, tenant, webhook_id).await?;
    let mut page = app
        .store()
        .list_webhook_deliveries(&DeliveryQuery {
            tenant_id: tenant,
            webhook_id,
            before,
            status,
            limit: limit + 1,
        })
        .await?;
    let next = if page.len() > limit as usize {
        page.truncate(limit as usize);
        page.last().map(|d| d.event_id)
    } else {
        None
    };
    Ok((page, next))
}

/// Attempts a delivery again now, once (whatever its state); a failure leaves it failed.
pub async fn retry_delivery(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    webhook_id: uuid::Uuid,
    event_id: uuid::Uuid,
) -> Result<WebhookDelivery, AppError> {
    let webhook = get_webhook(app, who, tenant, webhook_id).await?;
    // The store checks again, in the retry's transaction.
    if !webhook.enabled {
        return Err(DomainError::Conflict(keyplane_store::RETRY_OF_DISABLED_WEBHOOK.into()).into());
    }
    let event = audit_event(
        tenant,
        actions::WEBHOOK_DELIVERY_RETRIED,
        AuditActor::of(who),
        context,
    )
    .target("webhook", webhook_id, None)
    .text("event_id", event_id.to_string());
    let last_step = app.inner().config.webhooks.retry_schedule.len() as u32;
    let delivery = app
        .store()
        .retry_webhook_delivery(tenant, webhook_id, event_id, now(), last_step, &event)
        .await?;
    tracing::info!(tenant.id = %tenant, webhook.id = %webhook_id, event.id = %event_id, principal.id = %who.id(), "webhook delivery retried");
    Ok(delivery)
}

/// When `now`'s retry after `step` failures is due: the schedule's delay stretched by 0–20 %.
pub(crate) fn retry_at(
    schedule: &[Duration],
    step: u32,
    now: DateTime<Utc>,
    jitter: f64,
) -> Option<DateTime<Utc>> {
    let delay = schedule.get(step as usize)?;
    let stretched = delay.mul_f64(1.0 + jitter.clamp(0.0, 0.2));
    Some(now + TimeDelta::from_std(stretched).unwrap_or(TimeDelta::hours(48)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_retries_for_more_than_a_day() {
        let schedule = WebhookConfig::default().retry_schedule;
        let total: Duration = schedule.iter().sum();
        assert!(total >= Duration::from_secs(24 * 3600), "{total:?}");
        assert_eq!(schedule.len(), 7);
    }

    #[test]
    fn schedules_parse_with_units() {
        assert_eq!(
            parse_schedule("100ms, 2s,1m,1h").unwrap(),
            vec![
                Duration::from_millis(100),
                Duration::from_secs(2),
                Duration::from_secs(60),
                Duration::from_secs(3600)
            ]
        );
        for bad in ["", "5", "5d", "s", "49h", "-1s"] {
            assert!(parse_schedule(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn retries_are_stretched_never_shortened() {
        let schedule = [Duration::from_secs(10)];
        let now = Utc::now();
        let at = retry_at(&schedule, 0, now, 0.15).unwrap();
        assert_eq!((at - now).num_milliseconds(), 11_500);
        assert_eq!(
            retry_at(&schedule, 0, now, -1.0).unwrap(),
            now + TimeDelta::seconds(10)
        );
        assert_eq!(retry_at(&schedule, 1, now, 0.0), None);
    }
}
