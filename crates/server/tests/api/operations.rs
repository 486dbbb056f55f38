//! `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, `/docs`.

use crate::helpers::{assert_error, both_backends, TestApp};
use keyplane_store::testing::Backend;
use reqwest::Method;
use serde_json::Value;

async fn health_and_readiness(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let health = app
        .request(Method::GET, "/healthz", None)
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("x-request-id"));
    let ready = app
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    let expected = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(body["store"], expected);
}

async fn metrics_count_requests_and_verifications(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    assert_eq!(
        app.get(&org.path("/api-tokens"), &org.token).await.status(),
        200
    );
    assert_eq!(
        app.get(&org.path("/api-tokens"), "aether_garbage")
            .await
            .status(),
        401
    );
    let text = app.metrics().await;
    assert!(text.contains(r#"keyplane_http_requests_total{method="GET",route="/api/v1/organizations/{orgID}/api-tokens",status="200"} 1"#), "{text}");
    assert!(text.contains(r#"route="/api/v1/organizations/{orgID}/api-tokens",status="401"} 1"#));
    assert!(text.contains("keyplane_http_request_duration_seconds_bucket"));
    assert!(text.contains(r#"keyplane_credentials_verified_total{kind="api_token"} 1"#));
    assert!(text.contains(r#"keyplane_credentials_rejected_total{reason="malformed"} 1"#));
    // Raw paths (with org ids) never become label values.
    assert!(!text.contains(&org.id));
}

async fn openapi_covers_every_route_with_the_docs_spelling(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let doc: Value = app
        .request(Method::GET, "/openapi.json", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let expected = [
        ("/api/v1/organizations/{orgID}/api-tokens", "get"),
        ("/api/v1/organizations/{orgID}/api-tokens", "post"),
        ("/api/v1/organizations/{orgID}/api-tokens/{id}", "get"),
        ("/api/v1/organizations/{orgID}/api-tokens/{id}", "delete"),
        (
            "/api/v1/organizations/{orgID}/api-tokens/{id}/rotate",
            "post",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/service-accounts",
            "get",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/service-accounts",
            "post",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/rotate",
            "post",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}",
            "delete",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/authorizations",
            "get",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/authorizations",
            "post",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/authorizations/{authorization_id}",
            "delete",
        ),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/docs", "get"),
        ("/api/v1/organizations/{orgID}/registry", "get"),
        ("/api/v1/organizations/{orgID}/registry", "post"),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts",
            "get",
        ),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts",
            "post",
        ),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}",
            "get",
        ),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}",
            "put",
        ),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}",
            "delete",
        ),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/rotate",
            "post",
        ),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/suspend",
            "post",
        ),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/resume",
            "post",
        ),
        (
            "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/retire-previous",
            "post",
        ),
        (
            "/api/v1/organizations/{orgID}/api-tokens/{id}/suspend",
            "post",
        ),
        (
            "/api/v1/organizations/{orgID}/api-tokens/{id}/resume",
            "post",
        ),
        (
            "/api/v1/organizations/{orgID}/api-tokens/{id}/retire-previous",
            "post",
        ),
        ("/api/v1/organizations/{orgID}/credential-policy", "get"),
        ("/api/v1/organizations/{orgID}/credential-policy", "put"),
        (
            "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/suspend",
            "post",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/resume",
            "post",
        ),
        (
            "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/retire-previous",
            "post",
        ),
        ("/api/v1/organizations/{orgID}/audit-events", "get"),
        ("/api/v1/organizations/{orgID}/webhooks", "get"),
        ("/api/v1/organizations/{orgID}/webhooks", "post"),
        ("/api/v1/organizations/{orgID}/webhooks/{id}", "get"),
        ("/api/v1/organizations/{orgID}/webhooks/{id}", "put"),
        ("/api/v1/organizations/{orgID}/webhooks/{id}", "delete"),
        (
            "/api/v1/organizations/{orgID}/webhooks/{id}/rotate-secret",
            "post",
        ),
        (
            "/api/v1/organizations/{orgID}/webhooks/{id}/deliveries",
            "get",
        ),
        (
            "/api/v1/organizations/{orgID}/webhooks/{id}/deliveries/{delivery_id}/retry",
            "post",
        ),
        ("/registry/token", "get"),
        ("/registry/token", "post"),
        ("/oauth2/introspect", "post"),
        ("/v1/auth/forward", "get"),
        ("/v1/whoami", "get"),
        ("/v1/secret-scanning/github", "post"),
        ("/v1/credentials/revoke", "post"),
        ("/v1/revocations/stream", "get"),
    ];
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((path.clone(), method.clone()));
        }
    }
    documented.sort();
    let mut expected: Vec<(String, String)> = expected
        .iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    expected.sort();
    assert_eq!(documented, expected);
    let create = &doc["paths"]["/api/v1/organizations/{orgID}/api-tokens"]["post"];
    assert_eq!(create["parameters"][0]["name"], "orgID");
    assert!(create["responses"]["201"].is_object() && create["responses"]["422"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let event_schema = &doc["components"]["schemas"]["AuditEvent"]["properties"];
    for field in [
        "id",
        "org_id",
        "occurred_at",
        "action",
        "outcome",
        "actor",
        "target",
        "request_id",
        "client_ip",
        "user_agent",
        "details",
        "chain_hash",
    ] {
        assert!(event_schema[field].is_object(), "AuditEvent.{field}");
    }
    let token_schema = &doc["components"]["schemas"]["ApiToken"]["properties"];
    for field in [
        "id",
        "org_id",
        "name",
        "prefix",
        "scopes",
        "last_used_at",
        "expires_at",
        "created_at",
    ] {
        assert!(token_schema[field].is_object(), "ApiToken.{field}");
    }
}

async fn docs_page_renders_the_reference(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let res = app
        .request(Method::GET, "/docs", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = res.text().await.unwrap();
    assert!(html.contains("/api/v1/organizations/{orgID}/api-tokens/{id}/rotate"));
    assert!(html.contains("Create an API token"));
    assert!(html.contains("id=\"schema-ApiToken\""));
    assert!(!html.contains("<script"), "the page needs no JavaScript");
}

async fn unknown_routes_are_404_in_json(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let res = app
        .request(Method::GET, "/api/v1/nothing-here", None)
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "not_found").await;
    // Each surface answers in its own dialect, for unknown paths and wrong methods alike.
    let res = app
        .request(Method::GET, "/v1/public/nothing", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert!(res.json::<Value>().await.unwrap()["detail"].is_string());
    let res = app
        .request(Method::PUT, "/api/v1/organizations/x/api-tokens", None)
        .send()
        .await
        .unwrap();
    assert_error(res, 405, "method_not_allowed").await;
    let res = app
        .request(
            Method::PUT,
            "/v1/public/accounts/x/auth/service-accounts",
            None,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert!(res.json::<Value>().await.unwrap()["detail"].is_string());
}

both_backends!(
    health_and_readiness,
    metrics_count_requests_and_verifications,
    openapi_covers_every_route_with_the_docs_spelling,
    docs_page_renders_the_reference,
    unknown_routes_are_404_in_json,
);
