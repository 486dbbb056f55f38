//! One organization cannot hurt the others on a shared keyplane: its live credentials are
//! bounded (`serve --max-live-credentials-per-org`), and so are its introspections of tokens no
//! one knows (`serve --introspect-misses-per-minute`).

use crate::helpers::{both_backends, retry_after_secs, test_config, unknown_token, Org, TestApp};
use keyplane_server::Config;
use keyplane_store::testing::Backend;
use reqwest::{Method, Response};
use serde_json::{json, Value};

/// Refused by the live credential limit in Aether's error format: 409 `conflict`, naming the limit,
/// without `Retry-After` (only a revocation makes room).
async fn assert_aether_limit(res: Response) {
    assert_eq!(res.status(), 409);
    assert_no_retry_after(&res);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("--max-live-credentials-per-org") && message.contains("revoke"),
        "{message}"
    );
}

/// The same in Hybridbox's: 409 `{"detail": ...}`.
async fn assert_hybridbox_limit(res: Response) {
    assert_eq!(res.status(), 409);
    assert_no_retry_after(&res);
    let body: Value = res.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(
        detail.contains("--max-live-credentials-per-org"),
        "{detail}"
    );
}

fn assert_no_retry_after(res: &Response) {
    assert_eq!(res.headers().get("retry-after"), None, "{}", res.url());
}

async fn create_api_token(app: &TestApp, org: &Org, name: &str) -> Response {
    app.post(
        &org.path("/api-tokens"),
        &org.token,
        json!({ "name": name }),
    )
    .await
}

async fn create_service_account(app: &TestApp, org: &Org, name: &str) -> Response {
    app.post(
        &org.account_path("/service-accounts"),
        &org.token,
        json!({ "name": name }),
    )
    .await
}

async fn create_robot(app: &TestApp, org: &Org, name: &str) -> Response {
    app.post(
        &org.path("/registry/robot-accounts"),
        &org.token,
        json!({ "name": name, "permissions": ["pull"] }),
    )
    .await
}

async fn created(res: Response) -> Value {
    assert_eq!(res.status(), 201);
    res.json().await.unwrap()
}

/// With a limit of 4 (the organization's own `*` token is one), each kind's create through each
/// API is refused once the organization holds 4, in that API's error format; a rotation keeping
/// the previous secret working does not make room nor take any; a revocation makes room for one.
async fn creates_past_the_live_limit_are_refused(backend: Backend) {
    let config = Config {
        max_live_credentials_per_org: Some(4),
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    created(app.post_empty(&org.path("/registry"), &org.token).await).await;
    let token = created(create_api_token(&app, &org, "first").await).await;
    created(create_service_account(&app, &org, "first").await).await;

    assert_aether_limit(create_api_token(&app, &org, "second").await).await;
    assert_aether_limit(create_robot(&app, &org, "second").await).await;
    assert_hybridbox_limit(create_service_account(&app, &org, "second").await).await;
    // With an Idempotency-Key too: its in-progress 409 says when to retry, this one does not.
    let keyed = app
        .request(Method::POST, &org.path("/api-tokens"), Some(&org.token))
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(&json!({ "name": "second" }))
        .send()
        .await
        .unwrap();
    assert_aether_limit(keyed).await;

    let id = token["id"].as_str().unwrap();
    let rotated = app
        .post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({ "grace_seconds": 3600 }),
        )
        .await;
    assert_eq!(rotated.status(), 200);
    assert_aether_limit(create_api_token(&app, &org, "second").await).await;

    let revoked = app
        .delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await;
    assert_eq!(revoked.status(), 204);
    created(create_robot(&app, &org, "second").await).await;
    assert_hybridbox_limit(create_service_account(&app, &org, "second").await).await;

    // Another organization's creates are its own.
    let other = app.create_org("other").await;
    created(create_service_account(&app, &other, "first").await).await;
}

/// Enabling the registry creates its default robot: refused, and nothing enabled, at the limit.
async fn enabling_the_registry_at_the_live_limit_is_refused(backend: Backend) {
    let config = Config {
        max_live_credentials_per_org: Some(2),
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    created(create_api_token(&app, &org, "first").await).await;
    assert_aether_limit(app.post_empty(&org.path("/registry"), &org.token).await).await;
    let registry: Value = app
        .get(&org.path("/registry"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(registry, json!({ "enabled": false }));
}

async fn introspect(app: &TestApp, caller: &str, token: &str) -> Response {
    app.request(Method::POST, "/oauth2/introspect", Some(caller))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
}

async fn active(res: Response) -> bool {
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    answer["active"].as_bool().unwrap()
}

async fn store_misses(app: &TestApp) -> u64 {
    app.metric("keyplane_verify_cache_lookups_total{result=\"miss\"}")
        .await
}

/// A server allowing 3 introspection misses a minute, an organization, and its `tokens:verify`
/// token.
async fn with_a_budget_of_3(backend: Backend) -> (TestApp, Org, String) {
    let config = Config {
        introspect_misses_per_minute: 3,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let verifier = app.create_token(&org, "verifier", &["tokens:verify"]).await;
    let verifier = verifier["token"].as_str().unwrap().to_owned();
    (app, org, verifier)
}

/// Past 3 introspected tokens the store did not know in a minute, the caller's organization gets
/// 429 with `Retry-After` in the OAuth error format, and no store lookup; a token the cache holds
/// still introspects active, and another organization has a budget of its own.
async fn introspecting_unknown_tokens_past_the_budget_answers_429(backend: Backend) {
    let (app, org, verifier) = with_a_budget_of_3(backend).await;
    let verifier = verifier.as_str();
    assert!(active(introspect(&app, verifier, &org.token).await).await);

    for _ in 0..3 {
        assert!(
            !active(
                introspect(
                    &app,
                    verifier,
                    &unknown_token(keyplane_core::CredentialKind::ApiToken)
                )
                .await
            )
            .await
        );
    }
    let refused = introspect(
        &app,
        verifier,
        &unknown_token(keyplane_core::CredentialKind::ApiToken),
    )
    .await;
    assert_eq!(refused.status(), 429);
    retry_after_secs(&refused);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(body["error_description"].is_string(), "{body}");

    let misses = store_misses(&app).await;
    let refused = introspect(
        &app,
        verifier,
        &unknown_token(keyplane_core::CredentialKind::ApiToken),
    )
    .await;
    assert_eq!(refused.status(), 429);
    assert_eq!(store_misses(&app).await, misses, "refused without a lookup");

    assert!(active(introspect(&app, verifier, &org.token).await).await);

    let other = app.create_org("other").await;
    let theirs = app
        .create_token(&other, "verifier", &["tokens:verify"])
        .await;
    let theirs = theirs["token"].as_str().unwrap();
    assert!(
        !active(
            introspect(
                &app,
                theirs,
                &unknown_token(keyplane_core::CredentialKind::ApiToken)
            )
            .await
        )
        .await
    );
}

/// Revoked credentials count against no limit, so an organization may hold any number and each
/// is a store lookup once its brief negative cache entry is gone: introspecting them is charged
/// to the same budget as unknown tokens (the 4th of 3 answers 429 without a lookup).
async fn introspecting_revoked_tokens_past_the_budget_answers_429(backend: Backend) {
    let (app, org, verifier) = with_a_budget_of_3(backend).await;
    let verifier = verifier.as_str();
    let mut revoked = Vec::new();
    for n in 0..5 {
        let made = app
            .create_token(&org, &format!("gone-{n}"), &["api_tokens:read"])
            .await;
        let id = made["id"].as_str().unwrap();
        let res = app
            .delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await;
        assert!(res.status().is_success(), "{}", res.status());
        revoked.push(made["token"].as_str().unwrap().to_owned());
    }

    for token in &revoked[..3] {
        assert!(!active(introspect(&app, verifier, token).await).await);
    }
    let refused = introspect(&app, verifier, &revoked[3]).await;
    assert_eq!(refused.status(), 429);
    retry_after_secs(&refused);
    let misses = store_misses(&app).await;
    let refused = introspect(&app, verifier, &revoked[4]).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(store_misses(&app).await, misses, "refused without a lookup");
    // A token the cache holds still introspects active.
    assert!(active(introspect(&app, verifier, &org.token).await).await);
}

both_backends!(
    creates_past_the_live_limit_are_refused,
    enabling_the_registry_at_the_live_limit_is_refused,
    introspecting_unknown_tokens_past_the_budget_answers_429,
    introspecting_revoked_tokens_past_the_budget_answers_429,
);
