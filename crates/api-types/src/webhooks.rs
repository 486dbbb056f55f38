//! Webhook wire shapes (`/api/v1/organizations/{orgID}/webhooks`): the endpoint, its one-time
//! signing secret, and its deliveries.

use crate::wire::{
    one_time_webhook_secret, optional_timestamp, received_webhook_secret, timestamp,
};
use chrono::{DateTime, Utc};
use keyplane_core::{ActionPattern, Webhook, WebhookSecret};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;
use uuid::Uuid;

/// The URL type of [`WebhookRequest::url`] (reqwest's own), for callers that build one.
pub use url::Url;

/// `POST /webhooks` and `PUT /webhooks/{id}` body.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"url": "https://hooks.example.invalid/keyplane", "events": ["api_token.*", "credential.expiring"], "description": "security team"}))]
pub struct WebhookRequest {
    /// Where deliveries are POSTed: an `http` or `https` URL, at most 2048 characters, without a
    /// user name, password or fragment. Its host must resolve to public addresses only (loopback,
    /// private, link-local and metadata addresses are refused, now and at every attempt) unless
    /// the server runs with `--webhook-allow-private-targets`.
    #[schema(value_type = String, max_length = 2048)]
    #[serde(serialize_with = "url_text")]
    pub url: Url,
    /// 1–50 audit actions to deliver: an action (`api_token.created`), every action under a prefix
    /// (`api_token.*`), or `*` for every event.
    #[schema(value_type = Vec<String>, min_items = 1, max_items = 50)]
    #[serde(serialize_with = "pattern_list")]
    pub events: Vec<ActionPattern>,
    /// Free text, at most 500 characters, without control or format characters. Default empty.
    #[schema(value_type = Option<String>, max_length = 500)]
    pub description: String,
    /// Whether events are delivered. Default true. Disabling fails the pending deliveries (their
    /// `last_error` says so), and no delivery is queued while disabled: enabling again delivers
    /// only the events that come after (the audit events API has the ones between).
    #[schema(value_type = Option<bool>)]
    pub enabled: bool,
}

fn url_text<S: Serializer>(url: &Url, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(url.as_str())
}

fn pattern_list<S: Serializer>(
    patterns: &[ActionPattern],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(patterns.iter().map(ActionPattern::to_wire))
}

/// A webhook, without its secret.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = Webhook)]
pub struct WebhookView {
    pub id: Uuid,
    pub org_id: Uuid,
    pub url: String,
    /// The action patterns, as given.
    pub events: Vec<String>,
    pub description: String,
    /// False when turned off by a caller, or by keyplane after 5 days of failed attempts (a
    /// `webhook.disabled` audit event says so).
    pub enabled: bool,
    /// Since when every attempt has failed; null after a success.
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub failing_since: Option<DateTime<Utc>>,
    /// After a rotation: until when deliveries also carry a signature with the previous secret.
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
}

impl From<&Webhook> for WebhookView {
    fn from(webhook: &Webhook) -> Self {
        Self {
            id: webhook.id,
            org_id: webhook.tenant_id.as_uuid(),
            url: webhook.url.clone(),
            events: webhook.events.iter().map(ActionPattern::to_wire).collect(),
            description: webhook.description.clone(),
            enabled: webhook.enabled,
            failing_since: webhook.failing_since,
            previous_secret_expires_at: webhook
                .previous_secret
                .as_ref()
                .map(|(_, until)| *until)
                .filter(|until| *until > Utc::now()),
            created_at: webhook.created_at,
            updated_at: webhook.updated_at,
        }
    }
}

/// Create and rotate-secret answer: the webhook and its signing secret, shown only this once.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = WebhookWithSecret)]
pub struct WebhookCreated {
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// `whsec_` and the base64 signing key, as Standard Webhooks libraries take it. Shown only at
    /// creation and rotation.
    #[serde(
        serialize_with = "one_time_webhook_secret",
        deserialize_with = "received_webhook_secret"
    )]
    #[schema(value_type = String)]
    pub secret: WebhookSecret,
}

impl From<Webhook> for WebhookCreated {
    fn from(webhook: Webhook) -> Self {
        Self {
            webhook: WebhookView::from(&webhook),
            secret: webhook.secret,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct WebhookList {
    /// Oldest first; at most 20.
    pub items: Vec<WebhookView>,
}

/// One event sent (or to be sent) to one webhook.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = WebhookDelivery)]
pub struct WebhookDeliveryView {
    /// The audit event's id: the `webhook-id` header of every attempt.
    pub id: Uuid,
    pub webhook_id: Uuid,
    /// The event's action (the payload's `type`).
    #[serde(rename = "type")]
    pub event_type: String,
    /// `pending` (queued or waiting for a retry), `succeeded` or `failed`: the retry schedule is
    /// used up, the event can no longer be read, or the webhook was disabled (by `PUT` or after
    /// failing for too long) while the delivery waited; `last_error` says which.
    pub status: String,
    pub attempts: u32,
    #[serde(serialize_with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// Pending deliveries: when the next attempt is due.
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The HTTP status of the last answer; null when none came.
    pub last_response_code: Option<u16>,
    pub last_latency_ms: Option<u64>,
    /// Why the last attempt failed, or why the delivery failed without another attempt (`the
    /// webhook was disabled before the delivery was made`).
    pub last_error: Option<String>,
}

/// A page of deliveries, newest event first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct WebhookDeliveryPage {
    pub items: Vec<WebhookDeliveryView>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<Uuid>,
}
