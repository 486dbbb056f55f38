//! The console's webhook pages: the tenant's webhooks, their signing secrets (shown once, as a new
//! token's are) and their deliveries. Each handler calls the `crate::webhooks` use case the Aether
//! routes call, with the session's principal, so `webhooks:manage` is checked there.

use super::html::{code, esc, maybe_time, post_form, time, Refill};
use super::pages::{secret_home, to_secret_page};
use super::session::SecretFlash;
use super::Path;
use super::{Console, ConsoleError, Form};
use crate::webhooks::{self, target, WebhookSpec};
use axum::body::Bytes;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyplane_core::{
    ActionPattern, DeliveryStatus, Error as DomainError, FieldError, FieldPath, Webhook,
};
use std::fmt::Write;

type PageResult = Result<Response, ConsoleError>;

pub(crate) const LIST: &str = "/console/webhooks";
/// The `kind` of a webhook's signing secret waiting in the session (credentials use theirs).
pub(crate) const SECRET_KIND: &str = "webhook";
const DELIVERY_PAGE: u32 = 50;

fn webhook_id(raw: &str) -> Result<uuid::Uuid, ConsoleError> {
    uuid::Uuid::parse_str(raw)
        .map_err(|_| ConsoleError::page(StatusCode::NOT_FOUND, "There is no such webhook."))
}

/// What a webhook is called on a page: its description, or its URL when it has none.
fn label(webhook: &Webhook) -> &str {
    if webhook.description.is_empty() {
        &webhook.url
    } else {
        &webhook.description
    }
}

fn events_text(webhook: &Webhook) -> String {
    webhook
        .events
        .iter()
        .map(ActionPattern::to_wire)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The webhook a create or edit form describes, validated as the API validates its body.
fn spec_from(form: &Form) -> Result<WebhookSpec, ConsoleError> {
    let mut errors: Vec<FieldError> = Vec::new();
    let url = target::parse_url(FieldPath::body("url"), form.get("url").unwrap_or("").trim())
        .map_err(|e| errors.push(e))
        .ok();
    let raw_events: Vec<String> = form
        .get("events")
        .unwrap_or("")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let events = ActionPattern::parse_list(&FieldPath::body("events"), &raw_events)
        .map_err(|e| errors.extend(e))
        .ok();
    let description = crate::aether::webhooks::description(
        FieldPath::body("description"),
        form.get("description").unwrap_or(""),
    )
    .map_err(|e| errors.push(e))
    .ok();
    match (url, events, description) {
        (Some(url), Some(events), Some(description)) if errors.is_empty() => Ok(WebhookSpec {
            url,
            events,
            description,
            enabled: form.get("enabled").is_some(),
        }),
        _ => Err(DomainError::Validation(errors).into()),
    }
}

/// The form's fields: the form key, the id of its element, its label.
const FIELDS: [(&str, &str, &str); 3] = [
    ("url", "url", "URL"),
    ("events", "events", "Events"),
    ("description", "description", "Description"),
];

/// The fields of the create and edit forms, filled with `webhook`'s values when editing, or with
/// those sent and their problems when the form was refused (`refill`).
fn webhook_fields(webhook: Option<&Webhook>, refill: &Refill) -> String {
    let (url, events, description, enabled) = match webhook {
        Some(w) => (
            w.url.as_str(),
            events_text(w),
            w.description.as_str(),
            w.enabled,
        ),
        None => ("", "*".to_string(), "", true),
    };
    let refused = !refill.problems.is_empty();
    let enabled = if refused {
        refill.sent("enabled", "true")
    } else {
        enabled
    };
    let (url_attributes, url_problem) = refill.field("url", "");
    let (events_attributes, events_problem) = refill.field("events", "events-hint");
    let (description_attributes, description_problem) = refill.field("description", "");
    format!(
        "<div class=\"field\"><label for=\"url\">URL</label>\
         <input type=\"url\" id=\"url\" name=\"url\" required maxlength=\"{url_max}\" value=\"{url}\" \
         placeholder=\"https://hooks.example.com/keyplane\" spellcheck=\"false\"{url_attributes}>{url_problem}</div>\
         <div class=\"field\"><label for=\"events\">Events</label>\
         <input type=\"text\" id=\"events\" name=\"events\" required value=\"{events}\" \
         spellcheck=\"false\"{events_attributes}>\
         <span class=\"hint\" id=\"events-hint\">Separated by spaces or commas: an action such as \
         <code>api_token.created</code>, every action under a prefix such as \
         <code>api_token.*</code>, or <code>*</code> for every event.</span>{events_problem}</div>\
         <div class=\"field\"><label for=\"description\">Description \
         <span class=\"hint\">optional</span></label>\
         <input type=\"text\" id=\"description\" name=\"description\" maxlength=\"{description_max}\" \
         value=\"{description}\"{description_attributes}>{description_problem}</div>\
         <label><input type=\"checkbox\" name=\"enabled\" value=\"true\"{checked}> Enabled</label>",
        url = esc(refill.value("url", url)),
        events = esc(refill.value("events", &events)),
        description = esc(refill.value("description", description)),
        checked = if enabled { " checked" } else { "" },
        // The URL's limit counts bytes, never fewer than its UTF-16 units.
        url_max = target::MAX_URL_CHARS,
        description_max = super::html::utf16_room(crate::aether::webhooks::MAX_DESCRIPTION_CHARS),
    )
}

/// What the secret page shows of `webhook`'s signing secret.
fn flash_of(webhook: &Webhook, note: String) -> SecretFlash {
    SecretFlash {
        kind: SECRET_KIND.to_string(),
        id: webhook.id,
        name: label(webhook).to_string(),
        secret: webhook.secret.expose_secret().to_string(),
        note,
    }
}

// ------------------------------------------------------------------------------------------------
// The list, create, edit

pub(crate) async fn list(console: Console) -> PageResult {
    list_page(console, Refill::default()).await
}

/// The webhooks page, its create form shown again with its problems when `refill` has any.
async fn list_page(console: Console, refill: Refill) -> PageResult {
    let hooks = webhooks::list_webhooks(&console.app, &console.who, console.tenant).await?;
    let mut body = String::from(
        "<p>Each webhook receives the organization's audit events whose action matches its \
         events, signed as <a href=\"https://www.standardwebhooks.com/\">Standard Webhooks</a> \
         defines, with retries for over a day.</p>",
    );
    if (hooks.len() as u32) < webhooks::MAX_WEBHOOKS {
        body.push_str("<p><a class=\"button\" href=\"#create\">Create a webhook</a></p>");
    }
    body.push_str(
        "<div class=\"table-wrap\"><table class=\"responsive\"><caption class=\"visually-hidden\">Webhooks</caption><thead><tr>\
         <th scope=\"col\">Webhook</th><th scope=\"col\">URL</th><th scope=\"col\">Events</th>\
         <th scope=\"col\">Enabled</th><th scope=\"col\">Failing since</th>\
         <th scope=\"col\">Actions</th></tr></thead><tbody>",
    );
    for hook in &hooks {
        let name = esc(label(hook));
        let events = hook
            .events
            .iter()
            .map(|e| code(&e.to_wire()))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = write!(
            body,
            "<tr><td data-label=\"Webhook\">{name}</td><td data-label=\"URL\">{url}</td>\
             <td data-label=\"Events\">{events}</td><td data-label=\"Enabled\">{enabled}</td>\
             <td data-label=\"Failing since\">{failing}</td>\
             <td data-label=\"Actions\" class=\"actions\">\
             <a href=\"{LIST}/{id}/deliveries\" aria-label=\"Deliveries of {name}\">Deliveries</a>\
             <a href=\"{LIST}/{id}\" aria-label=\"Edit {name}\">Edit</a>\
             <a href=\"{LIST}/{id}/rotate\" aria-label=\"Rotate the secret of {name}\">Rotate secret</a>\
             <a href=\"{LIST}/{id}/delete\" aria-label=\"Delete {name}\">Delete</a></td></tr>",
            url = code(&hook.url),
            enabled = if hook.enabled { "yes" } else { "<strong>no</strong>" },
            failing = maybe_time(hook.failing_since.as_ref(), "—"),
            id = hook.id,
        );
    }
    if hooks.is_empty() {
        body.push_str("<tr><td colspan=\"6\" class=\"muted\">No webhooks yet.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    if (hooks.len() as u32) < webhooks::MAX_WEBHOOKS {
        let _ = write!(
            body,
            "<h2 id=\"create\">Create a webhook</h2>{}{}",
            refill.summary(),
            post_form(
                LIST,
                &console.csrf,
                "stack",
                &format!(
                    "{}<div><button type=\"submit\">Create webhook</button></div>",
                    webhook_fields(None, &refill)
                ),
            )
        );
    } else {
        let _ = write!(
            body,
            "<p class=\"muted\">An organization may have {} webhooks; delete one to create \
             another.</p>",
            webhooks::MAX_WEBHOOKS
        );
    }
    let mut frame = console.frame(LIST).await?;
    frame.refused = !refill.problems.is_empty();
    Ok(console.render(frame, "Webhooks", &body).into_response())
}

/// A refused form shown again (status 422) by `page`, when the refusal is about its fields.
async fn refused<F, Fut>(console: Console, form: &Form, error: ConsoleError, page: F) -> PageResult
where
    F: FnOnce(Console, Refill) -> Fut,
    Fut: std::future::Future<Output = PageResult>,
{
    let Some(problems) = error.problems(&FIELDS) else {
        return Err(error);
    };
    let mut response = page(console, form.refill(problems)).await?;
    *response.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
    Ok(response)
}

pub(crate) async fn create(console: Console, body: Bytes) -> PageResult {
    let form = console.form(&body)?;
    let spec = match spec_from(&form) {
        Ok(spec) => spec,
        Err(error) => return refused(console, &form, error, list_page).await,
    };
    let home = secret_home(&console, None).await?;
    let now = console.app.now();
    let keep = {
        let home = home.clone();
        move |webhook: Webhook| {
            let note = "Created. Verify each delivery's signature with it.".to_string();
            home.keep(&flash_of(&webhook, note), now)
        }
    };
    // The target check after the form's own (the URL's addresses) refuses a field too.
    let created = webhooks::create_webhook(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        spec,
        Some(&keep),
    )
    .await;
    match created {
        Ok(_) => to_secret_page(&console, &home).await,
        Err(error) => refused(console, &form, error.into(), list_page).await,
    }
}

pub(crate) async fn edit_page(console: Console, Path(id): Path<String>) -> PageResult {
    edit_form(console, webhook_id(&id)?, Refill::default()).await
}

/// The edit page, its form shown again with its problems when `refill` has any.
async fn edit_form(console: Console, id: uuid::Uuid, refill: Refill) -> PageResult {
    let webhook = webhooks::get_webhook(&console.app, &console.who, console.tenant, id).await?;
    let mut body = String::new();
    let previous = webhook
        .previous_secret
        .as_ref()
        .map(|(_, until)| *until)
        .filter(|until| *until > crate::ops::now());
    let _ = write!(
        body,
        "<p>Created {created}. {secret} <a href=\"{LIST}/{id}/deliveries\">Deliveries</a> · \
         <a href=\"{LIST}/{id}/rotate\">Rotate the secret</a> · \
         <a href=\"{LIST}/{id}/delete\">Delete</a></p>",
        created = time(&webhook.created_at),
        secret = match previous {
            Some(until) => format!(
                "Deliveries are signed with the previous secret too until {}.",
                time(&until)
            ),
            None => String::new(),
        },
        id = webhook.id,
    );
    if let Some(since) = &webhook.failing_since {
        let _ = write!(
            body,
            "<div class=\"error\" role=\"alert\"><p>Every delivery attempt has failed since {}.\
             </p></div>",
            time(since)
        );
    }
    body.push_str(&refill.summary());
    body.push_str(&post_form(
        &format!("{LIST}/{}", webhook.id),
        &console.csrf,
        "stack",
        &format!(
            "{}<div><button type=\"submit\">Save webhook</button></div>",
            webhook_fields(Some(&webhook), &refill)
        ),
    ));
    let _ = write!(body, "<p><a href=\"{LIST}\">Cancel</a></p>");
    let mut frame = console.frame(LIST).await?;
    frame.refused = !refill.problems.is_empty();
    Ok(console
        .render(frame, &format!("Edit {}", label(&webhook)), &body)
        .into_response())
}

pub(crate) async fn update(console: Console, Path(id): Path<String>, body: Bytes) -> PageResult {
    let form = console.form(&body)?;
    let id = webhook_id(&id)?;
    let spec = match spec_from(&form) {
        Ok(spec) => spec,
        Err(error) => {
            return refused(console, &form, error, |console, refill| {
                edit_form(console, id, refill)
            })
            .await
        }
    };
    let updated = webhooks::update_webhook(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        id,
        spec,
    )
    .await;
    match updated {
        Ok(webhook) => {
            console
                .done(LIST, format!("Saved the webhook “{}”.", label(&webhook)))
                .await
        }
        Err(error) => {
            refused(console, &form, error.into(), |console, refill| {
                edit_form(console, id, refill)
            })
            .await
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Rotate the secret, delete

pub(crate) async fn rotate_page(console: Console, Path(id): Path<String>) -> PageResult {
    let webhook =
        webhooks::get_webhook(&console.app, &console.who, console.tenant, webhook_id(&id)?).await?;
    let hours = console.app.inner().config.webhooks.secret_overlap.as_secs() / 3600;
    let body = format!(
        "<p>Rotating gives the webhook <strong>{name}</strong> a new signing secret, shown once. \
         For {hours} hours every delivery carries a signature with the current secret too, so the \
         receiver can switch without losing any.</p>{form}<p><a href=\"{LIST}\" data-autofocus>\
         Cancel</a></p>",
        name = esc(label(&webhook)),
        form = post_form(
            &format!("{LIST}/{}/rotate", webhook.id),
            &console.csrf,
            "stack",
            &format!(
                "<div><button type=\"submit\">Rotate the secret of <strong>{}</strong></button></div>",
                esc(label(&webhook))
            ),
        ),
    );
    let frame = console.frame(LIST).await?;
    Ok(console
        .render(
            frame,
            &format!("Rotate the secret of {}", label(&webhook)),
            &body,
        )
        .into_response())
}

pub(crate) async fn rotate(console: Console, Path(id): Path<String>, body: Bytes) -> PageResult {
    console.form(&body)?;
    let home = secret_home(&console, None).await?;
    let now = console.app.now();
    let keep = {
        let home = home.clone();
        move |webhook: Webhook| {
            let note = match &webhook.previous_secret {
                Some((_, until)) => format!(
                "Rotated. Deliveries carry a signature with the previous secret too until {} UTC.",
                until.format("%Y-%m-%d %H:%M")
            ),
                None => "Rotated.".into(),
            };
            home.keep(&flash_of(&webhook, note), now)
        }
    };
    webhooks::rotate_webhook_secret(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        webhook_id(&id)?,
        Some(&keep),
    )
    .await?;
    to_secret_page(&console, &home).await
}

pub(crate) async fn delete_page(console: Console, Path(id): Path<String>) -> PageResult {
    let webhook =
        webhooks::get_webhook(&console.app, &console.who, console.tenant, webhook_id(&id)?).await?;
    let body = format!(
        "<div class=\"error\" role=\"alert\"><p>Delete the webhook <strong>{name}</strong> \
         ({url})? Nothing more is sent to it, pending deliveries included, and its delivery \
         history goes with it. This cannot be undone.</p></div>{form}\
         <p><a href=\"{LIST}\" data-autofocus>Cancel</a></p>",
        name = esc(label(&webhook)),
        url = code(&webhook.url),
        form = post_form(
            &format!("{LIST}/{}/delete", webhook.id),
            &console.csrf,
            "stack",
            &format!(
                "<div><button type=\"submit\" class=\"danger\">Delete the webhook <strong>{}</strong> \
                 for good</button></div>",
                esc(label(&webhook))
            ),
        ),
    );
    let frame = console.frame(LIST).await?;
    Ok(console
        .render(frame, &format!("Delete {}", label(&webhook)), &body)
        .into_response())
}

pub(crate) async fn delete(console: Console, Path(id): Path<String>, body: Bytes) -> PageResult {
    console.form(&body)?;
    let id = webhook_id(&id)?;
    let webhook = webhooks::get_webhook(&console.app, &console.who, console.tenant, id).await?;
    webhooks::delete_webhook(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        id,
    )
    .await?;
    console
        .done(LIST, format!("Deleted the webhook “{}”.", label(&webhook)))
        .await
}

// ------------------------------------------------------------------------------------------------
// Deliveries

#[derive(serde::Deserialize, Default)]
pub(crate) struct DeliveryFilters {
    #[serde(default)]
    status: String,
    #[serde(default)]
    cursor: String,
}

pub(crate) async fn deliveries(
    console: Console,
    Path(id): Path<String>,
    Query(filters): Query<DeliveryFilters>,
) -> PageResult {
    let id = webhook_id(&id)?;
    let status = match filters.status.as_str() {
        "" => None,
        raw => Some(DeliveryStatus::parse(raw).ok_or_else(|| {
            ConsoleError::page(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Choose a status filter from the list.",
            )
        })?),
    };
    let cursor = match filters.cursor.as_str() {
        "" => None,
        raw => Some(uuid::Uuid::parse_str(raw).map_err(|_| {
            ConsoleError::page(
                StatusCode::UNPROCESSABLE_ENTITY,
                "That link to older deliveries is not valid.",
            )
        })?),
    };
    let app = &console.app;
    let webhook = webhooks::get_webhook(app, &console.who, console.tenant, id).await?;
    let (page, next) = webhooks::list_deliveries(
        app,
        &console.who,
        console.tenant,
        id,
        cursor,
        status,
        DELIVERY_PAGE,
    )
    .await?;

    let selected = |value: &str| {
        if filters.status == value {
            " selected"
        } else {
            ""
        }
    };
    let mut body = format!(
        "<p>To {url}{disabled}. Newest event first; finished deliveries are kept 30 days. \
         <a href=\"{LIST}/{id}\">Edit the webhook</a></p>\
         <form method=\"get\" action=\"{LIST}/{id}/deliveries\" class=\"filters\" role=\"search\">\
         <label>Status<select name=\"status\"><option value=\"\"{any}>any</option>\
         <option value=\"pending\"{pending}>pending</option>\
         <option value=\"succeeded\"{succeeded}>succeeded</option>\
         <option value=\"failed\"{failed}>failed</option></select></label>\
         <button type=\"submit\" class=\"secondary\">Filter</button></form>",
        url = code(&webhook.url),
        disabled = if webhook.enabled {
            ""
        } else {
            " (disabled: enable it to retry)"
        },
        any = selected(""),
        pending = selected("pending"),
        succeeded = selected("succeeded"),
        failed = selected("failed"),
    );
    body.push_str(
        "<div class=\"table-wrap\"><table class=\"responsive\"><caption class=\"visually-hidden\">Deliveries</caption><thead><tr>\
         <th scope=\"col\">Event</th><th scope=\"col\">Status</th><th scope=\"col\">Attempts</th>\
         <th scope=\"col\">Last attempt</th><th scope=\"col\">Response</th>\
         <th scope=\"col\">Next attempt</th><th scope=\"col\">Actions</th></tr></thead><tbody>",
    );
    for delivery in &page {
        let response = match (delivery.last_status_code, delivery.last_latency_ms) {
            (Some(code), Some(ms)) => format!("{code} in {ms} ms"),
            (Some(code), None) => code.to_string(),
            (None, _) => match &delivery.last_error {
                Some(error) => esc(error),
                None => "—".into(),
            },
        };
        // A disabled webhook's deliveries cannot be retried (the use case refuses with 409).
        let retry = if !webhook.enabled {
            "<span class=\"muted\">—</span>".to_string()
        } else {
            post_form(
                &format!("{LIST}/{id}/deliveries/{}/retry", delivery.event_id),
                &console.csrf,
                "inline",
                &format!(
                    "<button type=\"submit\" class=\"secondary\" \
                     aria-label=\"Retry the delivery of {action} {event}\">Retry</button>",
                    action = esc(&delivery.action),
                    event = delivery.event_id,
                ),
            )
        };
        let _ = write!(
            body,
            "<tr><td data-label=\"Event\">{action}<br>{event}</td>\
             <td data-label=\"Status\">{status}</td><td data-label=\"Attempts\">{attempts}</td>\
             <td data-label=\"Last attempt\">{last}</td><td data-label=\"Response\">{response}</td>\
             <td data-label=\"Next attempt\">{next}</td>\
             <td data-label=\"Actions\" class=\"actions\">{retry}</td></tr>",
            action = code(&delivery.action),
            event = code(&delivery.event_id.to_string()),
            status = delivery.status.as_str(),
            attempts = delivery.attempts,
            last = maybe_time(delivery.last_attempt_at.as_ref(), "not yet"),
            next = maybe_time(delivery.next_attempt_at.as_ref(), "—"),
        );
    }
    if page.is_empty() {
        body.push_str("<tr><td colspan=\"7\" class=\"muted\">No deliveries.</td></tr>");
    }
    body.push_str("</tbody></table></div><nav class=\"pager\" aria-label=\"Pages\">");
    if cursor.is_some() {
        let _ = write!(
            body,
            "<a href=\"{LIST}/{id}/deliveries?status={}\">Newest deliveries</a>",
            esc(&filters.status)
        );
    }
    if let Some(next) = next {
        let _ = write!(
            body,
            "<a href=\"{LIST}/{id}/deliveries?status={}&amp;cursor={next}\" rel=\"next\">Older \
             deliveries</a>",
            esc(&filters.status)
        );
    }
    body.push_str("</nav>");
    let frame = console.frame(LIST).await?;
    Ok(console
        .render(frame, &format!("Deliveries of {}", label(&webhook)), &body)
        .into_response())
}

pub(crate) async fn retry(
    console: Console,
    Path((id, delivery)): Path<(String, String)>,
    body: Bytes,
) -> PageResult {
    console.form(&body)?;
    let id = webhook_id(&id)?;
    let event = uuid::Uuid::parse_str(&delivery)
        .map_err(|_| ConsoleError::page(StatusCode::NOT_FOUND, "There is no such delivery."))?;
    let delivery = webhooks::retry_delivery(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        id,
        event,
    )
    .await?;
    console
        .done(
            &format!("{LIST}/{id}/deliveries"),
            format!(
                "Queued the delivery of {} for another attempt now.",
                delivery.action
            ),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Form {
        Form(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_form_becomes_the_spec_the_api_would_accept() {
        let spec = spec_from(&form(&[
            ("url", " https://hooks.example.com/in "),
            ("events", "api_token.*, robot_account.created\n*"),
            ("description", " ci "),
        ]))
        .unwrap_or_else(|_| panic!("a valid form"));
        assert_eq!(spec.url.as_str(), "https://hooks.example.com/in");
        assert_eq!(
            spec.events
                .iter()
                .map(ActionPattern::to_wire)
                .collect::<Vec<_>>(),
            ["api_token.*", "robot_account.created", "*"]
        );
        assert_eq!(spec.description, "ci");
        assert!(!spec.enabled, "an unchecked box is not enabled");
    }

    #[test]
    fn every_bad_field_is_reported() {
        let Err(ConsoleError::Page {
            status, details, ..
        }) = spec_from(&form(&[
            ("url", "ftp://x"),
            ("events", "Api.*"),
            ("enabled", "true"),
        ]))
        else {
            panic!("an invalid form was accepted")
        };
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(details.len(), 2, "{details:?}");
        assert!(details[0].starts_with("url:") && details[1].starts_with("events #1:"));
    }
}
