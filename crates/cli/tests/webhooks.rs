//! Webhooks through the real binary: `kill -9` in the middle of deliveries loses none, and
//! `--webhook-allow-private-targets` is what lets a webhook reach a loopback address, at creation
//! and at every attempt. The receiver verifies each delivery with the npm `standardwebhooks`
//! package (`crates/server/tests/webhook-receiver/`).

mod common;

#[path = "../../server/tests/webhook-receiver/receiver.rs"]
mod receiver;

use common::{both_stores, free_loopback_port, Keyplane, Org, TestStore};
use keyplane_store::testing::Backend;
use receiver::{Behaviour, Receiver};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The bound on startup and on every request.
const TIMEOUT: Duration = Duration::from_secs(20);
const FAST_RETRIES: &str =
    "200ms,200ms,200ms,200ms,200ms,500ms,500ms,500ms,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s";

both_stores!(
    sigkill_during_deliveries_loses_none,
    private_targets_need_the_flag_at_creation_and_at_every_attempt,
);

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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}

async fn create_webhook(server: &Keyplane, org: &Org, url: &str) -> reqwest::Response {
    server
        .http
        .post(server.url(&format!("/api/v1/organizations/{}/webhooks", org.id)))
        .bearer_auth(&org.token)
        .json(&json!({"url": url, "events": ["api_token.created"]}))
        .send()
        .await
        .expect("POST webhooks")
}

async fn created_webhook(server: &Keyplane, org: &Org, url: &str) -> Value {
    let response = create_webhook(server, org, url).await;
    let status = response.status();
    let body: Value = response.json().await.expect("a JSON answer");
    assert_eq!(
        status,
        StatusCode::CREATED,
        "creating a webhook to {url}: {body}"
    );
    body
}

async fn deliveries(server: &Keyplane, org: &Org, webhook: &str) -> Vec<Value> {
    let response = server
        .http
        .get(server.url(&format!(
            "/api/v1/organizations/{}/webhooks/{webhook}/deliveries?limit=100",
            org.id
        )))
        .bearer_auth(&org.token)
        .send()
        .await
        .expect("GET deliveries");
    assert_eq!(response.status(), StatusCode::OK);
    let page: Value = response.json().await.expect("a JSON page");
    page["items"].as_array().expect("items").clone()
}

/// The credential ids named by the verified `api_token.created` deliveries received.
fn delivered_targets(receiver: &Receiver) -> HashSet<String> {
    receiver
        .deliveries()
        .iter()
        .filter(|d| d["verified"] == json!([0]))
        .filter_map(|d| {
            d["payload"]["data"]["target"]["id"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

async fn sigkill_during_deliveries_loses_none(backend: Backend) {
    let store = TestStore::new(backend).await;
    let flags = [
        "--webhook-allow-private-targets",
        "--webhook-retry-schedule",
        FAST_RETRIES,
    ];
    let server = Keyplane::start(&store, &flags, TIMEOUT).await;
    let org = store.bootstrap_org();
    let port = free_loopback_port();
    let hook = created_webhook(&server, &org, &format!("http://127.0.0.1:{port}/")).await;
    // Slow answers: when the first delivery arrives, it is in flight and not yet recorded.
    let receiver = Receiver::start(
        &Behaviour {
            delay: Duration::from_millis(500),
            ..Behaviour::verifying(&[hook["secret"].as_str().expect("a secret")])
        },
        port,
    );

    let mut tokens = Vec::new();
    for i in 0..40 {
        tokens.push(
            server
                .create_token(&org, &format!("t-{i:02}"), &[], None)
                .await
                .id,
        );
    }
    wait_until("the first deliveries", TIMEOUT, || async {
        !receiver.deliveries().is_empty()
    })
    .await;
    let before_kill = delivered_targets(&receiver).len();
    drop(server.process); // SIGKILL
    assert!(
        before_kill < tokens.len(),
        "every delivery was made before the kill; the test proves nothing"
    );

    // Restarted: what was queued is sent, and what was in flight when it died is sent again once
    // its lease runs out (15 s).
    let server = Keyplane::start(&store, &flags, TIMEOUT).await;
    let expected: HashSet<String> = tokens.into_iter().collect();
    wait_until(
        "every event at the receiver",
        Duration::from_secs(60),
        || async { expected.is_subset(&delivered_targets(&receiver)) },
    )
    .await;
    let hook_id = hook["id"].as_str().expect("an id");
    wait_until("every delivery recorded as succeeded", TIMEOUT, || async {
        let listed = deliveries(&server, &org, hook_id).await;
        listed.len() == expected.len() && listed.iter().all(|d| d["status"] == "succeeded")
    })
    .await;
    assert!(
        receiver
            .deliveries()
            .iter()
            .all(|d| d["verified"] == json!([0])),
        "every delivery verifies with the webhook's secret"
    );
}

async fn private_targets_need_the_flag_at_creation_and_at_every_attempt(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &["--webhook-allow-private-targets"], TIMEOUT).await;
    let org = store.bootstrap_org();
    let port = free_loopback_port();
    let by_address = created_webhook(&server, &org, &format!("http://127.0.0.1:{port}/")).await;
    let by_name = created_webhook(&server, &org, &format!("http://localhost:{port}/")).await;
    let receiver = Receiver::start(
        &Behaviour::verifying(&[
            by_address["secret"].as_str().expect("a secret"),
            by_name["secret"].as_str().expect("a secret"),
        ]),
        port,
    );
    server.create_token(&org, "allowed", &[], None).await;
    wait_until("both deliveries with the flag", TIMEOUT, || async {
        receiver.deliveries().len() >= 2
    })
    .await;
    drop(server.process);

    // Without the flag: the same webhooks are refused at each attempt, by address and once the
    // name is resolved, and nothing reaches the receiver.
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let received = receiver.deliveries().len();
    server.create_token(&org, "refused", &[], None).await;
    for hook in [&by_address, &by_name] {
        let id = hook["id"].as_str().expect("an id");
        wait_until("a refused attempt", TIMEOUT, || async {
            deliveries(&server, &org, id)
                .await
                .iter()
                .any(|d| d["status"] == "pending" && d["attempts"] == 1)
        })
        .await;
        let refused = deliveries(&server, &org, id)
            .await
            .into_iter()
            .find(|d| d["status"] == "pending")
            .expect("the refused delivery");
        let error = refused["last_error"].as_str().expect("an error");
        assert!(
            error.contains("refused") && error.contains("loopback"),
            "{error}"
        );
        assert!(refused["last_response_code"].is_null());
    }
    assert_eq!(
        receiver.deliveries().len(),
        received,
        "a refused target got a request"
    );

    // And at creation.
    for url in [
        format!("http://127.0.0.1:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
    ] {
        let response = create_webhook(&server, &org, &url).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{url}");
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"]["details"][0]["field"], "url", "{body}");
    }
}
