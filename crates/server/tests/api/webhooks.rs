//! Webhooks: the API, and deliveries to a real receiver that verifies every signature with the
//! `standardwebhooks` package (`tests/webhook-receiver/`), goes down and comes back. The server
//! runs with `webhooks.allow_private_targets` (the receiver is on 127.0.0.1) and a retry schedule
//! in milliseconds, except where the address check itself is tested.

#[path = "../webhook-receiver/receiver.rs"]
mod receiver;

use crate::helpers::{assert_error, both_backends, fields, test_config, Org, TestApp};
use keyplane_server::webhooks::WebhookConfig;
use keyplane_server::Config;
use receiver::{Behaviour, Receiver};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

both_backends!(
    a_canary_trigger_is_delivered_at_once,
    deliveries_are_signed_and_carry_the_matching_events,
    management_validation_capability_and_tenant_isolation,
    private_targets_are_refused_without_the_flag,
    a_receiver_that_goes_down_gets_every_event_when_it_is_back,
    the_backlog_of_a_receiver_that_is_down_shows_in_the_metrics,
    a_receiver_back_gets_the_deliveries_waiting_for_a_retry_at_its_first_answer,
    a_rotated_secret_signs_alongside_the_old_one_for_the_overlap,
    exhausted_deliveries_fail_and_a_failing_endpoint_is_disabled,
    https_targets_must_present_a_certificate_the_system_trusts,
    a_black_hole_endpoint_does_not_hold_up_other_organizations,
    organizations_whose_endpoints_all_hang_do_not_hold_up_the_others,
    an_unreadable_webhook_or_event_fails_alone,
    a_store_slower_than_the_lease_to_claim_sends_each_delivery_once,
    disabling_a_webhook_fails_its_waiting_deliveries_and_enabling_it_sends_only_new_events,
    an_update_records_what_it_changed_without_the_url,
    a_delivery_whose_event_was_pruned_fails_without_blaming_the_endpoint,
    retrying_a_delivery_already_queued_again_changes_nothing,
    every_finished_delivery_past_the_retention_is_pruned_at_once,
);

/// The `last_error` of a delivery that was waiting when its webhook was disabled.
const DISABLED_ERROR: &str = "the webhook was disabled before the delivery was made";

fn fast(config: WebhookConfig) -> Config {
    Config {
        webhooks: WebhookConfig {
            allow_private_targets: true,
            retry_schedule: vec![Duration::from_millis(200); 30],
            poll_interval: Duration::from_millis(25),
            ..config
        },
        ..test_config()
    }
}

/// Waits (at most `limit`) until `check` holds.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

async fn create_webhook(app: &TestApp, org: &Org, url: &str, events: &[&str]) -> Value {
    let res = app
        .post(
            &org.path("/webhooks"),
            &org.token,
            json!({"url": url, "events": events, "description": "test receiver"}),
        )
        .await;
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 201, "create webhook: {body}");
    body
}

/// A receiver verifying signatures with the secret of a new webhook of `org` for `events`.
async fn verifying_receiver(app: &TestApp, org: &Org, events: &[&str]) -> Receiver {
    webhook_with_receiver(app, org, events, Duration::ZERO)
        .await
        .1
}

/// A new webhook of `org` for `events` and a receiver verifying its signatures that answers
/// after `delay`: the webhook's id and the receiver.
async fn webhook_with_receiver(
    app: &TestApp,
    org: &Org,
    events: &[&str],
    delay: Duration,
) -> (String, Receiver) {
    let port = free_port();
    let hook = create_webhook(app, org, &format!("http://127.0.0.1:{port}/"), events).await;
    let behaviour = Behaviour {
        delay,
        ..Behaviour::verifying(&[hook["secret"].as_str().unwrap()])
    };
    let id = hook["id"].as_str().unwrap().to_string();
    (id, Receiver::start(&behaviour, port))
}

async fn deliveries(app: &TestApp, org: &Org, webhook: &str) -> Vec<Value> {
    let res = app
        .get(
            &org.path(&format!("/webhooks/{webhook}/deliveries?limit=100")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    page["items"].as_array().unwrap().clone()
}

/// Waits (at most 10 s) until one of the webhook's deliveries has `status`.
async fn until_a_delivery_is(app: &TestApp, org: &Org, webhook: &str, status: &str) {
    wait_until(
        &format!("a delivery {status}"),
        Duration::from_secs(10),
        || async {
            deliveries(app, org, webhook)
                .await
                .iter()
                .any(|d| d["status"] == status)
        },
    )
    .await;
}

/// The `type`s received (verified or not), by event id.
fn received_by_id(receiver: &Receiver) -> HashMap<String, Vec<Value>> {
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for delivery in receiver.deliveries() {
        by_id
            .entry(delivery["id"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(delivery);
    }
    by_id
}

async fn create_tokens(app: &TestApp, org: &Org, prefix: &str, count: usize) -> Vec<Value> {
    let mut made = Vec::new();
    for i in 0..count {
        made.push(app.create_token(org, &format!("{prefix}-{i}"), &[]).await);
    }
    made
}

async fn deliveries_are_signed_and_carry_the_matching_events(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("http://127.0.0.1:{port}/hooks"),
        &["api_token.*"],
    )
    .await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let receiver = Receiver::start(&Behaviour::verifying(&[&secret]), port);

    let token = app.create_token(&org, "ci", &["api_tokens:read"]).await;
    let id = token["id"].as_str().unwrap();
    let res = app
        .post_empty(&org.path(&format!("/api-tokens/{id}/rotate")), &org.token)
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await;
    assert_eq!(res.status(), 204);
    // Not subscribed: a service account's event.
    let res = app
        .post(
            &org.account_path("/service-accounts"),
            &org.token,
            json!({"name": "sa"}),
        )
        .await;
    assert_eq!(res.status(), 201);

    wait_until(
        "three api_token deliveries",
        Duration::from_secs(15),
        || async { received_by_id(&receiver).len() >= 3 },
    )
    .await;
    let received = receiver.deliveries();
    let types: Vec<&str> = received
        .iter()
        .map(|d| d["payload"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([
            "api_token.created",
            "api_token.rotated",
            "api_token.revoked"
        ]),
        "{received:?}"
    );
    // What the audit trail shows is what was delivered, field for field.
    let trail = app.audit_events(&org, "api_token.*").await;
    for delivery in &received {
        assert_eq!(delivery["verified"], json!([0]), "signature: {delivery}");
        assert_eq!(delivery["signatures"], 1);
        let payload = &delivery["payload"];
        assert_eq!(
            payload["data"]["id"], delivery["id"],
            "webhook-id is the event id"
        );
        assert_eq!(payload["data"]["action"], payload["type"]);
        assert_eq!(payload["timestamp"], payload["data"]["occurred_at"]);
        assert_eq!(payload["data"]["org_id"], json!(org.id));
        let listed = trail
            .iter()
            .find(|e| e["id"] == payload["data"]["id"])
            .expect("the delivered event is in the audit trail");
        assert_eq!(&payload["data"], listed);
        assert!(!delivery.to_string().contains(&secret));
    }
    let hook_id = hook["id"].as_str().unwrap();
    wait_until(
        "the deliveries are recorded",
        Duration::from_secs(5),
        || async {
            deliveries(&app, &org, hook_id)
                .await
                .iter()
                .all(|d| d["status"] == "succeeded")
        },
    )
    .await;
    let listed = deliveries(&app, &org, hook_id).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    for delivery in &listed {
        assert_eq!(delivery["last_response_code"], 204);
        assert!(delivery["last_latency_ms"].is_u64());
        assert!(delivery["next_attempt_at"].is_null());
        assert!(delivery["attempts"].as_u64().unwrap() >= 1);
    }
    assert!(
        !crate::logs::captured().contains(&secret[6..]),
        "a webhook secret was logged"
    );
}

async fn management_validation_capability_and_tenant_isolation(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("globex").await;
    let hook = create_webhook(&app, &org, "http://127.0.0.1:9/a?x=1", &["*"]).await;
    let id = hook["id"].as_str().unwrap().to_string();
    let secret = hook["secret"].as_str().unwrap().to_string();
    assert_eq!(hook["events"], json!(["*"]));
    assert_eq!(hook["enabled"], true);
    assert_eq!(hook["org_id"], json!(org.id));

    // Read back: never the secret.
    let got: Value = app
        .get(&org.path(&format!("/webhooks/{id}")), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert!(got.get("secret").is_none(), "{got}");
    assert_eq!(got["url"], "http://127.0.0.1:9/a?x=1");
    let list: Value = app
        .get(&org.path("/webhooks"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&secret));

    // Replace.
    let res = app
        .request(Method::PUT, &org.path(&format!("/webhooks/{id}")), Some(&org.token))
        .json(&json!({"url": "https://127.0.0.1:9/b", "events": ["api_token.created", "webhook.*"], "enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let updated: Value = res.json().await.unwrap();
    assert_eq!(updated["events"], json!(["api_token.created", "webhook.*"]));
    assert_eq!(updated["enabled"], false);
    assert_eq!(updated["description"], "");

    // Bad bodies: every problem at once, in the Aether dialect.
    let res = app
        .post(
            &org.path("/webhooks"),
            &org.token,
            json!({"url": "ftp://x", "events": ["api_token*", "*", "*"], "enabled": "yes", "colour": 1}),
        )
        .await;
    let details = assert_error(res, 422, "validation_failed").await;
    let found = fields(&details);
    for expected in [
        ("url", "invalid_format"),
        ("events[0]", "invalid_format"),
        ("events[2]", "duplicate"),
        ("enabled", "invalid_type"),
        ("colour", "unknown_field"),
    ] {
        assert!(
            found.contains(&(expected.0.to_string(), expected.1.to_string())),
            "{expected:?} not in {found:?}"
        );
    }
    for body in [
        json!({"url": "http://127.0.0.1:9/", "events": []}),
        json!({"url": "http://127.0.0.1:9/"}),
        json!({"url": "https://u:p@example.com/", "events": ["*"]}),
        json!({"url": "not a url", "events": ["*"]}),
    ] {
        let res = app
            .post(&org.path("/webhooks"), &org.token, body.clone())
            .await;
        assert_error(res, 422, "validation_failed").await;
    }

    // The capability, and another tenant: 403 and 404.
    let reader = app
        .create_token(&org, "reader", &["api_tokens:read", "audit:read"])
        .await;
    let reader = reader["token"].as_str().unwrap();
    let res = app.get(&org.path("/webhooks"), reader).await;
    assert_error(res, 403, "forbidden").await;
    let manager = app
        .create_token(&org, "manager", &["webhooks:manage"])
        .await;
    let manager = manager["token"].as_str().unwrap();
    assert_eq!(
        app.get(&org.path(&format!("/webhooks/{id}")), manager)
            .await
            .status(),
        200
    );
    // A subscription sends the audit trail out: choosing one also needs `audit:read`.
    let subscription = json!({"url": "https://127.0.0.1:9/c", "events": ["*"], "enabled": false});
    let res = app
        .post(&org.path("/webhooks"), manager, subscription.clone())
        .await;
    assert_error(res, 403, "forbidden").await;
    let res = app
        .request(
            Method::PUT,
            &org.path(&format!("/webhooks/{id}")),
            Some(manager),
        )
        .json(&subscription)
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "forbidden").await;
    let subscriber = app
        .create_token(&org, "subscriber", &["webhooks:manage", "audit:read"])
        .await;
    let res = app
        .request(
            Method::PUT,
            &org.path(&format!("/webhooks/{id}")),
            subscriber["token"].as_str(),
        )
        .json(&subscription)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for (method, path) in [
        (Method::GET, format!("/webhooks/{id}")),
        (Method::DELETE, format!("/webhooks/{id}")),
        (Method::POST, format!("/webhooks/{id}/rotate-secret")),
        (Method::GET, format!("/webhooks/{id}/deliveries")),
    ] {
        // The other org's token on this org's webhook, and on its own org's path.
        let res = app
            .request(method.clone(), &org.path(&path), Some(&other.token))
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "not_found").await;
        let res = app
            .request(method, &other.path(&path), Some(&other.token))
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "not_found").await;
    }
    let res = app
        .post_empty(
            &org.path(&format!(
                "/webhooks/{id}/deliveries/{}/retry",
                uuid::Uuid::now_v7()
            )),
            &org.token,
        )
        .await;
    assert_error(res, 409, "conflict").await; // disabled above
    let res = app.get(&org.path("/webhooks/not-a-uuid"), &org.token).await;
    assert_error(res, 422, "validation_failed").await;
    let res = app
        .get(
            &org.path(&format!("/webhooks/{id}/deliveries?status=lost&limit=0")),
            &org.token,
        )
        .await;
    let details = assert_error(res, 422, "validation_failed").await;
    assert_eq!(fields(&details).len(), 2);

    // Rotation shows the new secret once; the old one is kept for the overlap only.
    let res = app
        .post_empty(
            &org.path(&format!("/webhooks/{id}/rotate-secret")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let rotated: Value = res.json().await.unwrap();
    let new_secret = rotated["secret"].as_str().unwrap();
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    assert!(rotated["previous_secret_expires_at"].is_string());

    // Every change is in the audit trail, without a secret.
    let res = app
        .delete(&org.path(&format!("/webhooks/{id}")), &org.token)
        .await;
    assert_eq!(res.status(), 204);
    assert_error(
        app.get(&org.path(&format!("/webhooks/{id}")), &org.token)
            .await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.delete(&org.path(&format!("/webhooks/{id}")), &org.token)
            .await,
        404,
        "not_found",
    )
    .await;
    let audit = app.audit_events(&org, "webhook.*").await;
    let actions: Vec<&str> = audit
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "webhook.deleted",
            "webhook.secret_rotated",
            "webhook.updated",
            "webhook.updated",
            "webhook.created"
        ]
    );
    let text = Value::from(audit).to_string();
    assert!(!text.contains(&secret) && !text.contains(new_secret));
    assert!(
        !text.contains("x=1"),
        "the URL's query is not recorded: {text}"
    );
    let logged = crate::logs::captured();
    assert!(!logged.contains(&secret[6..]) && !logged.contains(&new_secret[6..]));

    // At most 20 per organization.
    for i in 0..20 {
        create_webhook(&app, &org, &format!("http://127.0.0.1:9/{i}"), &["*"]).await;
    }
    let res = app
        .post(
            &org.path("/webhooks"),
            &org.token,
            json!({"url": "http://127.0.0.1:9/x", "events": ["*"]}),
        )
        .await;
    assert_error(res, 409, "conflict").await;
}

async fn private_targets_are_refused_without_the_flag(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://localhost:9000/",
        "http://10.0.0.8/",
        "http://2130706433/",
        "https://[::ffff:169.254.169.254]/",
    ] {
        let res = app
            .post(
                &org.path("/webhooks"),
                &org.token,
                json!({"url": url, "events": ["*"]}),
            )
            .await;
        let details = assert_error(res, 422, "validation_failed").await;
        assert_eq!(
            fields(&details),
            [("url".to_string(), "invalid_format".to_string())],
            "{url}"
        );
        let message = details[0]["message"].as_str().unwrap();
        assert!(
            message.contains("--webhook-allow-private-targets"),
            "{message}"
        );
    }
    // And on update: a webhook with a public address cannot be pointed inward.
    // Disabled: nothing is ever sent to this public address.
    let res = app
        .post(
            &org.path("/webhooks"),
            &org.token,
            json!({"url": "https://192.0.43.10/hook", "events": ["*"], "enabled": false}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let hook: Value = res.json().await.unwrap();
    let id = hook["id"].as_str().unwrap();
    let res = app
        .request(
            Method::PUT,
            &org.path(&format!("/webhooks/{id}")),
            Some(&org.token),
        )
        .json(&json!({"url": "http://169.254.169.254/", "events": ["*"]}))
        .send()
        .await
        .unwrap();
    assert_error(res, 422, "validation_failed").await;
    let got: Value = app
        .get(&org.path(&format!("/webhooks/{id}")), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["url"], "https://192.0.43.10/hook");
}

/// `keyplane_webhook_oldest_pending_delivery_age_seconds` in `/metrics`.
async fn oldest_pending_age(app: &TestApp) -> f64 {
    let series = "keyplane_webhook_oldest_pending_delivery_age_seconds ";
    let metrics = app.metrics().await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series}in /metrics:\n{metrics}"))
        .parse()
        .unwrap()
}

/// While a receiver is down its deliveries wait, and `/metrics` shows how many and how old the
/// oldest is; once it is back and has them, both go back to 0.
async fn the_backlog_of_a_receiver_that_is_down_shows_in_the_metrics(
    backend: keyplane_store::testing::Backend,
) {
    let config = fast(WebhookConfig {
        backlog_interval: Duration::from_millis(50),
        ..WebhookConfig::default()
    });
    let app = TestApp::spawn_with(backend, config).await;
    let pending = "keyplane_webhook_deliveries_pending";
    assert_eq!(app.metric(pending).await, 0);
    assert_eq!(oldest_pending_age(&app).await, 0.0);
    let org = app.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("http://127.0.0.1:{port}/"),
        &["api_token.created"],
    )
    .await;
    create_tokens(&app, &org, "while-down", 3).await;
    wait_until(
        "3 pending deliveries, the oldest a second old",
        Duration::from_secs(15),
        || async { app.metric(pending).await == 3 && oldest_pending_age(&app).await >= 1.0 },
    )
    .await;

    let behaviour = Behaviour::verifying(&[hook["secret"].as_str().unwrap()]);
    let _receiver = Receiver::start(&behaviour, port);
    wait_until("no pending delivery", Duration::from_secs(15), || async {
        app.metric(pending).await == 0 && oldest_pending_age(&app).await == 0.0
    })
    .await;
}

async fn a_receiver_that_goes_down_gets_every_event_when_it_is_back(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("http://127.0.0.1:{port}/"),
        &["api_token.created"],
    )
    .await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    let behaviour = Behaviour::verifying(&[hook["secret"].as_str().unwrap()]);
    let mut receiver = Receiver::start(&behaviour, port);

    create_tokens(&app, &org, "before", 5).await;
    // Answered and recorded, so that the outage below fails only the events made during it.
    wait_until("5 deliveries while up", Duration::from_secs(15), || async {
        let listed = deliveries(&app, &org, &hook_id).await;
        listed.len() == 5 && listed.iter().all(|d| d["status"] == "succeeded")
    })
    .await;

    receiver.stop();
    create_tokens(&app, &org, "while-down", 5).await;
    wait_until(
        "failed attempts while down",
        Duration::from_secs(15),
        || async {
            let listed = deliveries(&app, &org, &hook_id).await;
            listed
                .iter()
                .filter(|d| d["status"] == "pending" && d["attempts"].as_u64() >= Some(2))
                .count()
                == 5
        },
    )
    .await;
    let listed = deliveries(&app, &org, &hook_id).await;
    let waiting = listed.iter().find(|d| d["status"] == "pending").unwrap();
    assert!(
        waiting["last_error"].as_str().unwrap().contains("connect"),
        "{waiting}"
    );
    assert!(waiting["last_response_code"].is_null());
    assert!(waiting["next_attempt_at"].is_string());

    receiver.restart(&behaviour);
    create_tokens(&app, &org, "after", 2).await;
    let expected: HashSet<String> = app
        .audit_events(&org, "api_token.created")
        .await
        .iter()
        // The organization's first token was created before the webhook.
        .filter(|e| e["target"]["name"] != "bootstrap")
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(expected.len(), 12);
    wait_until(
        "all 12 events at the receiver",
        Duration::from_secs(20),
        || async {
            let got: HashSet<String> = received_by_id(&receiver).into_keys().collect();
            expected.is_subset(&got)
        },
    )
    .await;
    assert!(receiver
        .deliveries()
        .iter()
        .all(|d| d["verified"] == json!([0])));
    wait_until(
        "every delivery recorded as succeeded",
        Duration::from_secs(5),
        || async {
            deliveries(&app, &org, &hook_id)
                .await
                .iter()
                .all(|d| d["status"] == "succeeded")
        },
    )
    .await;
    let listed = deliveries(&app, &org, &hook_id).await;
    assert_eq!(listed.len(), 12);
    assert_eq!(
        listed
            .iter()
            .filter(|d| d["attempts"].as_u64().unwrap() > 1)
            .count(),
        5,
        "the events sent while it was down took several attempts: {listed:?}"
    );
}

/// After a long outage the retry schedule's steps are hours apart: the receiver's first answer
/// makes the deliveries waiting for a retry due at once, rather than one by one hours later.
async fn a_receiver_back_gets_the_deliveries_waiting_for_a_retry_at_its_first_answer(
    backend: keyplane_store::testing::Backend,
) {
    let mut config = fast(WebhookConfig::default());
    config.webhooks.retry_schedule = vec![
        Duration::from_millis(100),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    ];
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("http://127.0.0.1:{port}/"),
        &["api_token.created"],
    )
    .await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    let behaviour = Behaviour::verifying(&[hook["secret"].as_str().unwrap()]);

    // Down: each delivery fails twice, then waits an hour.
    create_tokens(&app, &org, "while-down", 3).await;
    wait_until(
        "three deliveries waiting an hour",
        Duration::from_secs(15),
        || async {
            deliveries(&app, &org, &hook_id)
                .await
                .iter()
                .filter(|d| d["status"] == "pending" && d["attempts"] == 2)
                .count()
                == 3
        },
    )
    .await;

    let receiver = Receiver::start(&behaviour, port);
    create_tokens(&app, &org, "after", 1).await;
    wait_until(
        "all four events at the receiver",
        Duration::from_secs(15),
        || async { received_by_id(&receiver).len() == 4 },
    )
    .await;
    wait_until(
        "every delivery recorded as succeeded",
        Duration::from_secs(5),
        || async {
            deliveries(&app, &org, &hook_id)
                .await
                .iter()
                .all(|d| d["status"] == "succeeded")
        },
    )
    .await;
    let listed = deliveries(&app, &org, &hook_id).await;
    assert_eq!(listed.len(), 4);
    assert_eq!(
        listed.iter().filter(|d| d["attempts"] == 3).count(),
        3,
        "the outage's deliveries took one more attempt each: {listed:?}"
    );
}

async fn a_rotated_secret_signs_alongside_the_old_one_for_the_overlap(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(
        backend,
        fast(WebhookConfig {
            secret_overlap: Duration::from_millis(1500),
            ..WebhookConfig::default()
        }),
    )
    .await;
    let org = app.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("http://127.0.0.1:{port}/"),
        &["api_token.created"],
    )
    .await;
    let id = hook["id"].as_str().unwrap();
    let old = hook["secret"].as_str().unwrap().to_string();
    let res = app
        .post_empty(
            &org.path(&format!("/webhooks/{id}/rotate-secret")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let new = res.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    // A receiver that knows only the old secret, and one that knows only the new one, both
    // accept what is sent during the overlap.
    let receiver = Receiver::start(&Behaviour::verifying(&[&old, &new]), port);
    let during = app.create_token(&org, "during", &[]).await;
    wait_until(
        "the delivery during the overlap",
        Duration::from_secs(10),
        || async { !receiver.deliveries().is_empty() },
    )
    .await;
    let first = &receiver.deliveries()[0];
    assert_eq!(first["payload"]["data"]["target"]["id"], during["id"]);
    assert_eq!(first["signatures"], 2);
    assert_eq!(first["verified"], json!([0, 1]));

    tokio::time::sleep(Duration::from_millis(1600)).await;
    app.create_token(&org, "after", &[]).await;
    wait_until(
        "the delivery after the overlap",
        Duration::from_secs(10),
        || async { receiver.deliveries().len() >= 2 },
    )
    .await;
    let second = &receiver.deliveries()[1];
    assert_eq!(second["signatures"], 1);
    assert_eq!(
        second["verified"],
        json!([1]),
        "only the new secret signs now"
    );
    let got: Value = app
        .get(&org.path(&format!("/webhooks/{id}")), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert!(got["previous_secret_expires_at"].is_null());
}

async fn exhausted_deliveries_fail_and_a_failing_endpoint_is_disabled(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(
        backend,
        Config {
            webhooks: WebhookConfig {
                allow_private_targets: true,
                retry_schedule: vec![Duration::from_millis(50), Duration::from_millis(50)],
                poll_interval: Duration::from_millis(25),
                disable_after: Duration::from_millis(700),
                ..WebhookConfig::default()
            },
            ..test_config()
        },
    )
    .await;
    let org = app.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("http://127.0.0.1:{port}/"),
        &["api_token.*"],
    )
    .await;
    let id = hook["id"].as_str().unwrap().to_string();
    let secret = hook["secret"].as_str().unwrap().to_string();
    let failing = Behaviour {
        status: 503,
        ..Behaviour::verifying(&[&secret])
    };
    let mut receiver = Receiver::start(&failing, port);

    app.create_token(&org, "first", &[]).await;
    wait_until(
        "the first delivery gives up",
        Duration::from_secs(10),
        || async {
            deliveries(&app, &org, &id)
                .await
                .iter()
                .any(|d| d["status"] == "failed")
        },
    )
    .await;
    let listed = deliveries(&app, &org, &id).await;
    let failed = &listed[0];
    assert_eq!(
        failed["attempts"], 3,
        "the first attempt and two retries: {failed}"
    );
    assert_eq!(failed["last_response_code"], 503);
    assert!(failed["next_attempt_at"].is_null());
    assert_eq!(receiver.deliveries().len(), 3);
    let failed_id = failed["id"].as_str().unwrap().to_string();

    // Still failing past `disable_after`: the next failure disables it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    app.create_token(&org, "second", &[]).await;
    wait_until(
        "the webhook is disabled",
        Duration::from_secs(10),
        || async {
            let got: Value = app
                .get(&org.path(&format!("/webhooks/{id}")), &org.token)
                .await
                .json()
                .await
                .unwrap();
            got["enabled"] == false
        },
    )
    .await;
    let got: Value = app
        .get(&org.path(&format!("/webhooks/{id}")), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert!(got["failing_since"].is_string());
    let audit = app.audit_events(&org, "webhook.disabled").await;
    let disabled = &audit[0];
    assert_eq!(disabled["actor"]["type"], "system");
    assert_eq!(disabled["target"]["id"], json!(id));
    // The delivery that was waiting for a retry failed with it, saying why.
    let listed = deliveries(&app, &org, &id).await;
    assert!(listed.iter().all(|d| d["status"] == "failed"), "{listed:?}");
    assert!(
        listed.iter().any(|d| d["last_error"] == DISABLED_ERROR),
        "{listed:?}"
    );
    let received_when_disabled = receiver.deliveries().len();
    app.create_token(&org, "while-disabled", &[]).await;
    let res = app
        .post_empty(
            &org.path(&format!("/webhooks/{id}/deliveries/{failed_id}/retry")),
            &org.token,
        )
        .await;
    assert_error(res, 409, "conflict").await;

    // Enabled again and healthy: a retried delivery goes through once more.
    receiver.restart(&Behaviour::verifying(&[&secret]));
    let res = app
        .request(
            Method::PUT,
            &org.path(&format!("/webhooks/{id}")),
            Some(&org.token),
        )
        .json(&json!({"url": format!("http://127.0.0.1:{port}/"), "events": ["api_token.*"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = app
        .post_empty(
            &org.path(&format!("/webhooks/{id}/deliveries/{failed_id}/retry")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 202);
    let queued: Value = res.json().await.unwrap();
    assert_eq!(queued["status"], "pending");
    assert_eq!(queued["id"], json!(failed_id));
    wait_until(
        "the retried delivery succeeds",
        Duration::from_secs(10),
        || async {
            deliveries(&app, &org, &id)
                .await
                .iter()
                .any(|d| d["id"] == json!(failed_id) && d["status"] == "succeeded")
        },
    )
    .await;
    let retried = deliveries(&app, &org, &id)
        .await
        .into_iter()
        .find(|d| d["id"] == json!(failed_id))
        .unwrap();
    assert_eq!(retried["attempts"], 4);
    assert_eq!(retried["last_response_code"], 204);
    // No event of the disabled time was queued for it, and the one that was waiting is not sent.
    let after: Vec<Value> = receiver.deliveries()[received_when_disabled..].to_vec();
    assert!(
        after.iter().all(|d| {
            let name = &d["payload"]["data"]["target"]["name"];
            name != "while-disabled" && name != "second"
        }),
        "{after:?}"
    );
    let audit = app.audit_events(&org, "webhook.delivery_retried").await;
    assert_eq!(audit.len(), 1);
}

async fn https_targets_must_present_a_certificate_the_system_trusts(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("https://127.0.0.1:{port}/"),
        &["api_token.created"],
    )
    .await;
    let id = hook["id"].as_str().unwrap();
    // A receiver with a self-signed certificate for 127.0.0.1: nobody the system trusts signed it.
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let receiver = Receiver::start(
        &Behaviour {
            tls: Some((cert_file, key_file)),
            ..Behaviour::verifying(&[hook["secret"].as_str().unwrap()])
        },
        port,
    );
    app.create_token(&org, "ci", &[]).await;
    wait_until("a refused handshake", Duration::from_secs(10), || async {
        deliveries(&app, &org, id)
            .await
            .iter()
            .any(|d| d["attempts"].as_u64() >= Some(1))
    })
    .await;
    let delivery = &deliveries(&app, &org, id).await[0];
    assert_eq!(delivery["status"], "pending");
    let error = delivery["last_error"].as_str().unwrap();
    assert!(error.contains("certificate"), "{error}");
    assert!(
        receiver.deliveries().is_empty(),
        "a request went through an untrusted connection"
    );
}

/// Several replicas on one PostgreSQL: each delivery is leased by one of them at a time, so a
/// healthy receiver gets every event exactly once.
#[tokio::test]
async fn replicas_on_postgres_send_each_delivery_once() {
    let config = fast(WebhookConfig::default());
    let first = TestApp::spawn_with(keyplane_store::testing::Backend::Postgres, config).await;
    let _second = first.replica().await;
    let _third = first.replica().await;
    let org = first.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &first,
        &org,
        &format!("http://127.0.0.1:{port}/"),
        &["api_token.created"],
    )
    .await;
    let receiver = Receiver::start(
        &Behaviour {
            delay: Duration::from_millis(100),
            ..Behaviour::verifying(&[hook["secret"].as_str().unwrap()])
        },
        port,
    );
    create_tokens(&first, &org, "t", 30).await;
    wait_until("30 deliveries", Duration::from_secs(20), || async {
        received_by_id(&receiver).len() >= 30
    })
    .await;
    // A little longer, for any duplicate to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let by_id = received_by_id(&receiver);
    assert_eq!(by_id.len(), 30);
    for (id, copies) in by_id {
        assert_eq!(
            copies.len(),
            1,
            "event {id} was sent {} times",
            copies.len()
        );
    }
}

/// A canary presented anywhere reaches a subscribed receiver within moments: its trigger is
/// written at once (not aggregated like refusals), and delivered like any event.
async fn a_canary_trigger_is_delivered_at_once(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    let receiver = verifying_receiver(&app, &org, &["credential.canary_triggered"]).await;
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "bait", "canary": true}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let canary: Value = res.json().await.unwrap();
    let res = app
        .request(Method::GET, "/v1/auth/forward", None)
        .bearer_auth(canary["token"].as_str().unwrap())
        .header("user-agent", "intruder/1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    wait_until(
        "the canary trigger's delivery",
        Duration::from_secs(15),
        || async { !receiver.deliveries().is_empty() },
    )
    .await;
    let delivered = receiver.deliveries();
    assert_eq!(delivered.len(), 1, "{delivered:#?}");
    assert_eq!(delivered[0]["verified"], json!([0]), "signature");
    let payload = &delivered[0]["payload"];
    assert_eq!(payload["type"], "credential.canary_triggered", "{payload}");
    assert!(
        payload.to_string().contains(canary["id"].as_str().unwrap()),
        "{payload}"
    );
    assert!(payload.to_string().contains("intruder/1"), "{payload}");
}

/// An endpoint that accepts every connection and never answers (a black-holed or hung server).
struct BlackHole {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            // Held open, never read from nor written to.
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        Self {
            port,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An endpoint that never answers holds one of the worker's slots for the timeout, not the
/// worker: another organization's deliveries, queued behind many of its own, arrive at once.
async fn a_black_hole_endpoint_does_not_hold_up_other_organizations(
    backend: keyplane_store::testing::Backend,
) {
    let timeout = Duration::from_secs(10);
    let app = TestApp::spawn_with(
        backend,
        fast(WebhookConfig {
            timeout,
            ..WebhookConfig::default()
        }),
    )
    .await;
    let stuck = app.create_org("stuck").await;
    let org = app.create_org("acme").await;
    let hole = BlackHole::start().await;
    create_webhook(
        &app,
        &stuck,
        &format!("http://127.0.0.1:{}/", hole.port),
        &["api_token.*"],
    )
    .await;
    let receiver = verifying_receiver(&app, &org, &["api_token.created"]).await;
    // More than a batch (32) of deliveries to the black hole, all due before the others.
    create_tokens(&app, &stuck, "stuck", 40).await;
    wait_until(
        "attempts at the black hole",
        Duration::from_secs(10),
        || async { hole.accepted() >= 2 },
    )
    .await;
    let expected: HashSet<String> = create_tokens(&app, &org, "healthy", 5)
        .await
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    // Well within one attempt's timeout: no delivery waits for the black hole's.
    wait_until(
        "the other organization's deliveries",
        timeout / 4,
        || async {
            let got: HashSet<String> = receiver
                .deliveries()
                .iter()
                .filter_map(|d| d["payload"]["data"]["target"]["id"].as_str())
                .map(str::to_string)
                .collect();
            expected.is_subset(&got)
        },
    )
    .await;
    // Its deliveries wait behind each other: two connections at a time.
    assert_eq!(hole.accepted(), 2, "attempts at once to one endpoint");
}

/// Organizations whose every endpoint hangs (each its 20 webhooks, each webhook two deliveries at
/// a time: together more than a replica's 64 slots) hold at most their share of the slots for the
/// timeout: another organization's delivery arrives at once.
async fn organizations_whose_endpoints_all_hang_do_not_hold_up_the_others(
    backend: keyplane_store::testing::Backend,
) {
    let timeout = Duration::from_secs(10);
    let app = TestApp::spawn_with(
        backend,
        fast(WebhookConfig {
            timeout,
            ..WebhookConfig::default()
        }),
    )
    .await;
    let hole = BlackHole::start().await;
    let hung = format!("http://127.0.0.1:{}/", hole.port);
    for name in ["stuck", "jammed"] {
        let stuck = app.create_org(name).await;
        for _ in 0..20 {
            create_webhook(&app, &stuck, &hung, &["api_token.*"]).await;
        }
        // Two deliveries per webhook: 40 due for each organization, all before the others'.
        create_tokens(&app, &stuck, name, 2).await;
    }
    let org = app.create_org("acme").await;
    let receiver = verifying_receiver(&app, &org, &["api_token.created"]).await;
    wait_until(
        "attempts at the hanging endpoints",
        Duration::from_secs(10),
        || async { hole.accepted() >= 32 },
    )
    .await;
    let token = app.create_token(&org, "healthy", &[]).await;
    let id = token["id"].as_str().unwrap().to_string();
    // Well within one attempt's timeout: no slot this delivery needs is held by the others.
    wait_until("the other organization's delivery", timeout / 4, || async {
        receiver
            .deliveries()
            .iter()
            .any(|d| d["payload"]["data"]["target"]["id"] == id.as_str())
    })
    .await;
    // Each hanging organization holds 16 attempts at once, not every slot its webhooks could.
    assert_eq!(
        hole.accepted(),
        32,
        "attempts at once to the hanging endpoints"
    );
}

/// Runs `sql` with the id `id` on the test's database directly: damage from outside.
async fn damage(app: &TestApp, sql: &str, id: &str) {
    let id = uuid::Uuid::parse_str(id).unwrap();
    let changed = if app.database_url().starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(app.database_url()).await.unwrap();
        sqlx::query(sql)
            .bind(id)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected()
    } else {
        let pool = sqlx::PgPool::connect(app.database_url()).await.unwrap();
        sqlx::query(sql)
            .bind(id)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected()
    };
    assert_eq!(changed, 1, "{sql}");
}

/// Each stored delivery of the webhook `id`: status and last error, read from the database (the
/// API cannot read a webhook that does not decode).
async fn stored_deliveries(app: &TestApp, id: &str) -> Vec<(String, Option<String>)> {
    let id = uuid::Uuid::parse_str(id).unwrap();
    let sql = "SELECT status, last_error FROM webhook_deliveries WHERE webhook_id = $1";
    if app.database_url().starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(app.database_url()).await.unwrap();
        sqlx::query_as(sql).bind(id).fetch_all(&pool).await.unwrap()
    } else {
        let pool = sqlx::PgPool::connect(app.database_url()).await.unwrap();
        sqlx::query_as(sql).bind(id).fetch_all(&pool).await.unwrap()
    }
}

/// A webhook or an event that no longer decodes fails its own deliveries, for good; every other
/// delivery goes on.
async fn an_unreadable_webhook_or_event_fails_alone(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let damaged = app.create_org("damaged").await;
    let org = app.create_org("acme").await;
    // A webhook whose stored secret no longer decodes.
    let broken = create_webhook(&app, &damaged, "http://127.0.0.1:9/", &["api_token.*"]).await;
    let broken_id = broken["id"].as_str().unwrap();
    let broken_secret = broken["secret"].as_str().unwrap();
    damage(
        &app,
        "UPDATE webhooks SET secret = secret || '!' WHERE id = $1",
        broken_id,
    )
    .await;
    create_tokens(&app, &damaged, "lost", 3).await;

    // An event that no longer decodes, damaged while its delivery waits for the receiver.
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("http://127.0.0.1:{port}/"),
        &["api_token.created"],
    )
    .await;
    let hook_id = hook["id"].as_str().unwrap();
    app.create_token(&org, "doomed", &[]).await;
    wait_until(
        "a failed attempt while the receiver is down",
        Duration::from_secs(10),
        || async {
            deliveries(&app, &org, hook_id)
                .await
                .iter()
                .any(|d| d["attempts"].as_u64() >= Some(1))
        },
    )
    .await;
    let doomed = deliveries(&app, &org, hook_id).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    damage(
        &app,
        "UPDATE audit_events SET details = 'not json' WHERE id = $1",
        &doomed,
    )
    .await;
    wait_until(
        "the delivery of the damaged event fails",
        Duration::from_secs(10),
        || async {
            deliveries(&app, &org, hook_id)
                .await
                .iter()
                .any(|d| d["id"] == json!(doomed) && d["status"] == "failed")
        },
    )
    .await;
    let failed = deliveries(&app, &org, hook_id).await;
    assert_eq!(failed[0]["last_error"], "the stored event cannot be read");

    // The rest is delivered.
    let receiver = Receiver::start(
        &Behaviour::verifying(&[hook["secret"].as_str().unwrap()]),
        port,
    );
    create_tokens(&app, &org, "fine", 3).await;
    wait_until(
        "the readable deliveries",
        Duration::from_secs(10),
        || async { received_by_id(&receiver).len() >= 3 },
    )
    .await;
    wait_until(
        "the broken webhook's deliveries fail",
        Duration::from_secs(10),
        || async {
            let stored = stored_deliveries(&app, broken_id).await;
            stored.len() == 3 && stored.iter().all(|(status, _)| status == "failed")
        },
    )
    .await;
    for (_, error) in stored_deliveries(&app, broken_id).await {
        assert_eq!(
            error.as_deref(),
            Some("the stored delivery or its webhook cannot be read")
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = received_by_id(&receiver);
    assert_eq!(received.len(), 3, "{received:?}");
    assert!(!received.contains_key(&doomed));
    let logged = crate::logs::captured();
    assert!(logged.contains(broken_id), "the broken webhook is named");
    assert!(
        !logged.contains(&broken_secret[6..]),
        "a webhook secret was logged"
    );
}

/// A store that takes longer than the lease to claim (to read what sending takes) still gets each
/// delivery sent once and recorded: the lease is renewed once the claim has answered, so the next
/// claim does not take the deliveries in flight.
async fn a_store_slower_than_the_lease_to_claim_sends_each_delivery_once(
    backend: keyplane_store::testing::Backend,
) {
    let config = fast(WebhookConfig {
        timeout: Duration::from_secs(1),
        lease_margin: Duration::from_secs(1),
        ..WebhookConfig::default()
    });
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    // Two webhooks with two deliveries each: one claim takes all four.
    let mut hooks = Vec::new();
    for _ in 0..2 {
        // Answering a little late, so that the worker's next claim runs while these are in flight.
        let delay = Duration::from_millis(200);
        hooks.push(webhook_with_receiver(&app, &org, &["api_token.created"], delay).await);
    }
    // Longer than the lease (the 1 s timeout and 1 s more).
    store.slow_webhook_claims(Duration::from_millis(2500));
    create_tokens(&app, &org, "slow", 2).await;
    for (id, _) in &hooks {
        wait_until(
            "both deliveries of each webhook succeed",
            Duration::from_secs(8),
            || async {
                let listed = deliveries(&app, &org, id).await;
                listed.len() == 2 && listed.iter().all(|d| d["status"] == "succeeded")
            },
        )
        .await;
    }
    // A claim that took them again would have sent them again by now.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    for (id, receiver) in &hooks {
        let received = received_by_id(receiver);
        assert_eq!(received.len(), 2, "{received:?}");
        assert!(
            received.values().all(|got| got.len() == 1),
            "each delivery is received once: {received:?}"
        );
        for delivery in deliveries(&app, &org, id).await {
            assert_eq!(delivery["attempts"], 1, "{delivery}");
        }
    }
}

/// `PUT` with `enabled: false` fails the webhook's waiting deliveries (the deliveries API says
/// why), and enabling it again sends only the events that come after.
async fn disabling_a_webhook_fails_its_waiting_deliveries_and_enabling_it_sends_only_new_events(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    // Nobody listens yet: every attempt fails and is retried.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let hook = create_webhook(&app, &org, &url, &["api_token.*"]).await;
    let id = hook["id"].as_str().unwrap().to_string();
    create_tokens(&app, &org, "waiting", 2).await;
    wait_until(
        "both deliveries failed an attempt",
        Duration::from_secs(10),
        || async {
            let listed = deliveries(&app, &org, &id).await;
            listed.len() == 2 && listed.iter().all(|d| d["attempts"].as_u64() >= Some(1))
        },
    )
    .await;
    let put = |enabled: bool| {
        app.request(
            Method::PUT,
            &org.path(&format!("/webhooks/{id}")),
            Some(&org.token),
        )
        .json(&json!({"url": url, "events": ["api_token.*"], "enabled": enabled}))
        .send()
    };
    assert_eq!(put(false).await.unwrap().status(), 200);
    let listed = deliveries(&app, &org, &id).await;
    for delivery in &listed {
        assert_eq!(delivery["status"], "failed", "{delivery}");
        assert_eq!(delivery["last_error"], DISABLED_ERROR, "{delivery}");
        assert!(delivery["next_attempt_at"].is_null(), "{delivery}");
    }
    let res = app
        .get(
            &org.path(&format!("/webhooks/{id}/deliveries?status=pending")),
            &org.token,
        )
        .await;
    let pending: Value = res.json().await.unwrap();
    assert_eq!(pending["items"], json!([]));
    app.create_token(&org, "while-disabled", &[]).await;

    // Enabled again with a receiver: only what comes after is sent.
    let receiver = Receiver::start(
        &Behaviour::verifying(&[hook["secret"].as_str().unwrap()]),
        port,
    );
    assert_eq!(put(true).await.unwrap().status(), 200);
    app.create_token(&org, "after", &[]).await;
    wait_until(
        "the new event's delivery",
        Duration::from_secs(10),
        || async { !receiver.deliveries().is_empty() },
    )
    .await;
    // Several polls and retry delays: a waiting delivery would have been sent by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let names: Vec<Value> = receiver
        .deliveries()
        .iter()
        .map(|d| d["payload"]["data"]["target"]["name"].clone())
        .collect();
    assert_eq!(names, [json!("after")]);
}

/// A webhook moved to another receiver at the same host (only the path changes): the update's
/// event tells, by the URL's fingerprint, old and new, without the path or query themselves.
async fn an_update_records_what_it_changed_without_the_url(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    let ours = "http://127.0.0.1:9/services/T0/B0/ours?token=first";
    let theirs = "http://127.0.0.1:9/services/T9/B9/theirs?token=second";
    let hook = create_webhook(&app, &org, ours, &["api_token.*"]).await;
    let id = hook["id"].as_str().unwrap();
    let put = |url: &'static str, events: &'static [&'static str]| {
        let app = &app;
        let org = &org;
        async move {
            let res = app
                .request(
                    Method::PUT,
                    &org.path(&format!("/webhooks/{id}")),
                    Some(&org.token),
                )
                .json(&json!({"url": url, "events": events, "description": "test receiver"}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
    };
    put(theirs, &["api_token.*"]).await;
    put(theirs, &["robot_account.*"]).await;
    let updates = app.audit_events(&org, "webhook.updated").await;
    let (events_changed, url_changed) = (&updates[0]["details"], &updates[1]["details"]);
    let created = &app.audit_events(&org, "webhook.created").await[0]["details"];

    assert_eq!(url_changed["endpoint"], "http://127.0.0.1:9");
    assert_eq!(
        url_changed["old_url_fingerprint"],
        created["url_fingerprint"]
    );
    assert_ne!(
        url_changed["url_fingerprint"],
        url_changed["old_url_fingerprint"]
    );
    assert_eq!(url_changed["url_fingerprint"].as_str().unwrap().len(), 16);
    assert!(
        url_changed.get("old_endpoint").is_none(),
        "the same host: {url_changed}"
    );
    assert!(url_changed.get("old_events").is_none(), "{url_changed}");

    assert_eq!(events_changed["events"], json!(["robot_account.*"]));
    assert_eq!(events_changed["old_events"], json!(["api_token.*"]));
    assert_eq!(
        events_changed["url_fingerprint"],
        url_changed["url_fingerprint"]
    );
    assert!(
        events_changed.get("old_url_fingerprint").is_none(),
        "{events_changed}"
    );

    let trail = app
        .get(&org.path("/audit-events?limit=100"), &org.token)
        .await
        .text()
        .await
        .unwrap();
    // Whole path pieces: a bare `T0` is in every time written between 00:00 and 09:59.
    for part in ["/services/", "T0/B0", "T9/B9", "/ours", "/theirs", "token="] {
        assert!(!trail.contains(part), "{part} in the audit trail: {trail}");
    }
}

/// A delivery retried after its event left the audit trail fails, saying so, without sending
/// anything; its endpoint did not fail, so the webhook is not marked failing (which would count
/// towards disabling it).
async fn a_delivery_whose_event_was_pruned_fails_without_blaming_the_endpoint(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    let port = free_port();
    let hook = create_webhook(
        &app,
        &org,
        &format!("http://127.0.0.1:{port}/"),
        &["api_token.created"],
    )
    .await;
    let id = hook["id"].as_str().unwrap().to_string();
    let receiver = Receiver::start(
        &Behaviour::verifying(&[hook["secret"].as_str().unwrap()]),
        port,
    );
    app.create_token(&org, "soon-pruned", &[]).await;
    until_a_delivery_is(&app, &org, &id, "succeeded").await;
    let delivered = deliveries(&app, &org, &id).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    damage(&app, "DELETE FROM audit_events WHERE id = $1", &delivered).await;
    let res = app
        .post_empty(
            &org.path(&format!("/webhooks/{id}/deliveries/{delivered}/retry")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 202);
    until_a_delivery_is(&app, &org, &id, "failed").await;
    let failed = deliveries(&app, &org, &id).await;
    assert_eq!(
        failed[0]["last_error"], "the event was pruned from the audit trail",
        "{failed:?}"
    );
    assert_eq!(
        receiver.deliveries().len(),
        1,
        "sent again without its event"
    );
    let res = app
        .get(&org.path(&format!("/webhooks/{id}")), &org.token)
        .await;
    let webhook: Value = res.json().await.unwrap();
    assert!(webhook["failing_since"].is_null(), "{webhook}");
}

/// A client whose retry was answered 503 after it committed (or whose connection dropped) sends it
/// again while the delivery is still queued: the repeat answers the same delivery and records no
/// second event (which webhooks on `*` would also receive), and the delivery is sent once.
async fn retrying_a_delivery_already_queued_again_changes_nothing(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    // Each attempt takes this long: the retry's attempt is still running when it is repeated
    // (well within the timeout, so it succeeds).
    let (id, receiver) =
        webhook_with_receiver(&app, &org, &["api_token.created"], Duration::from_secs(2)).await;
    app.create_token(&org, "sent-twice", &[]).await;
    until_a_delivery_is(&app, &org, &id, "succeeded").await;
    let delivered = deliveries(&app, &org, &id).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let retry = org.path(&format!("/webhooks/{id}/deliveries/{delivered}/retry"));
    let first = app.post_empty(&retry, &org.token).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "pending", "{first}");
    let again = app.post_empty(&retry, &org.token).await;
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["status"], "pending", "{again}");
    assert_eq!(again["id"], first["id"]);
    until_a_delivery_is(&app, &org, &id, "succeeded").await;
    let events = app.audit_events(&org, "webhook.delivery_retried").await;
    assert_eq!(events.len(), 1, "{events:?}");
    // The first attempt and the retry's: received before they were answered.
    assert_eq!(receiver.deliveries().len(), 2);
}

/// Runs `sql`, given the webhook `$1` and organization `$2`: the rows it changed, or (`read`)
/// the one number it reads.
async fn with_webhook(
    app: &TestApp,
    sql: &str,
    webhook: uuid::Uuid,
    org: uuid::Uuid,
    read: bool,
) -> i64 {
    if app.database_url().starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(app.database_url()).await.unwrap();
        let answer = if read {
            let query = sqlx::query_scalar(sql).bind(webhook).bind(org);
            query.fetch_one(&pool).await.unwrap()
        } else {
            let query = sqlx::query(sql).bind(webhook).bind(org);
            query.execute(&pool).await.unwrap().rows_affected() as i64
        };
        pool.close().await;
        answer
    } else {
        let pool = sqlx::PgPool::connect(app.database_url()).await.unwrap();
        let answer = if read {
            let query = sqlx::query_scalar(sql).bind(webhook).bind(org);
            query.fetch_one(&pool).await.unwrap()
        } else {
            let query = sqlx::query(sql).bind(webhook).bind(org);
            query.execute(&pool).await.unwrap().rows_affected() as i64
        };
        pool.close().await;
        answer
    }
}

/// A busy organization's finished deliveries past the 30-day retention all go at the next prune,
/// however many there are: a fixed number of batches an hour would let the table grow without
/// bound once it outgrew them.
async fn every_finished_delivery_past_the_retention_is_pruned_at_once(
    backend: keyplane_store::testing::Backend,
) {
    const OLD: i64 = 25_000;
    let app = TestApp::spawn_with(backend, fast(WebhookConfig::default())).await;
    let org = app.create_org("acme").await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let hook = create_webhook(&app, &org, &url, &["api_token.created"]).await;
    let hook = uuid::Uuid::parse_str(hook["id"].as_str().unwrap()).unwrap();
    let tenant = uuid::Uuid::parse_str(&org.id).unwrap();
    let created_ms = (chrono::Utc::now() - chrono::TimeDelta::days(31)).timestamp_millis();
    let (numbers, new_id) = if app.database_url().starts_with("sqlite:") {
        (
            format!(
                "WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {OLD})"
            ),
            "randomblob(16)",
        )
    } else {
        (
            format!("WITH n (i) AS (SELECT generate_series(1, {OLD}))"),
            "gen_random_uuid()",
        )
    };
    let seed = format!(
        "{numbers} INSERT INTO webhook_deliveries (webhook_id, event_id, tenant_id, action, status, \
         attempts, schedule_step, created_ms, next_attempt_ms, locked_until_ms, last_attempt_ms, \
         last_status_code, last_latency_ms) SELECT $1, {new_id}, $2, 'api_token.created', \
         'succeeded', 1, 1, {created_ms} - i, {created_ms} - i, 0, {created_ms} - i, 204, 12 FROM n"
    );
    let count = "SELECT COUNT(*) FROM webhook_deliveries WHERE webhook_id = $1 AND tenant_id = $2";
    assert_eq!(with_webhook(&app, &seed, hook, tenant, false).await, OLD);
    assert_eq!(with_webhook(&app, count, hook, tenant, true).await, OLD);

    // A replica prunes as it starts.
    let _replica = app.replica().await;
    wait_until(
        "every old delivery pruned",
        Duration::from_secs(60),
        || async { with_webhook(&app, count, hook, tenant, true).await == 0 },
    )
    .await;
}
