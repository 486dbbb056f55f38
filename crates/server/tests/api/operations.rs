//! `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, `/docs`.

use crate::helpers::{assert_error, both_backends, eventually, TestApp};
use keyplane_store::testing::Backend;
use reqwest::Method;
use serde_json::{json, Value};

async fn health_and_readiness(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let health = app
        .request(Method::GET, "/healthz", None)
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("x-request-id"));
    assert_eq!(
        health.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );
    if backend == Backend::Postgres {
        // Once the invalidation listener has connected (`reconnecting` until then).
        eventually("the invalidation listener listens", || async {
            ready_body(&app).await["listener"] == "listening"
        })
        .await;
    }
    let mut body = ready_body(&app).await;
    let expected = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    // Measured against PostgreSQL's clock before `serve` answers; SQLite has no other clock.
    let clock = body
        .as_object_mut()
        .unwrap()
        .remove("clock")
        .expect("clock");
    match backend {
        Backend::Sqlite => assert_eq!(
            clock,
            json!({"status": "not_checked", "skew_seconds": null, "limit_seconds": 5.0, "unready_limit_seconds": null, "checked_at": null})
        ),
        Backend::Postgres => {
            assert_eq!(clock["status"], "ok", "{clock}");
            assert!(
                clock["skew_seconds"].as_f64().unwrap().abs() < 1.0,
                "{clock}"
            );
            assert_eq!(clock["limit_seconds"], 5.0, "{clock}");
            assert_eq!(clock["unready_limit_seconds"], Value::Null, "{clock}");
            assert!(clock["checked_at"].is_string(), "{clock}");
        }
    }
    // `reason` only on a 503; no `--audit-log` here, nothing to compare the store with; no
    // listener on SQLite. The schema is the one the store ran (the test store is created by this
    // keyplane).
    let schema = keyplane_store::testing::schema_version(app.database_url()).await;
    let mut expected = json!({
        "status": "ready",
        "version": env!("CARGO_PKG_VERSION"),
        "schema": schema,
        "store": expected,
        "writes": "ok",
        "last_write_failure": null,
        "audit": {"status": "not_exported", "organizations_behind": 0, "organizations_missing_events": 0, "events_missing": 0},
        "background": {"stalled": []},
    });
    if backend == Backend::Postgres {
        expected["listener"] = json!("listening");
    }
    assert_eq!(body, expected);
}

/// `/readyz`'s body, asserting 200.
async fn ready_body(app: &TestApp) -> Value {
    let ready = app
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    ready.json().await.unwrap()
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
    let schema = keyplane_store::testing::schema_version(app.database_url()).await;
    let build = format!(
        r#"keyplane_build_info{{version="{}",schema="{schema}"}} 1"#,
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.lines().any(|line| line == build), "{build} in {text}");
    // Raw paths (with org ids) never become label values.
    assert!(!text.contains(&org.id));
}

async fn openapi_covers_every_route_with_the_docs_spelling(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let doc: Value = app.openapi().await;
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

/// The operations endpoints: they answer in no surface's error shape.
const OPERATIONS: [&str; 5] = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"];

/// The document is the contract: every status, header and body shape a route can answer is in
/// it (schemathesis holds the server to it; this holds the document to what the code sends).
#[tokio::test]
async fn the_document_declares_every_answer() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc: Value = app.openapi().await;
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            operations += 1;
            let at = format!("{method} {path}");
            let responses = operation["responses"].as_object().unwrap();
            let api = !OPERATIONS.contains(&path.as_str());
            if api {
                assert!(responses.contains_key("500"), "{at}: 500");
            }
            let takes_key = operation["parameters"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "Idempotency-Key"));
            for (status, response) in responses {
                let at = format!("{at} {status}");
                let headers = &response["headers"];
                assert_eq!(headers["X-Request-Id"]["required"], true, "{at}");
                if api && status.as_str() >= "400" {
                    assert!(
                        response["content"]["application/json"]["schema"].is_object(),
                        "{at}: an error body"
                    );
                }
                match status.as_str() {
                    "401" if path != "/v1/secret-scanning/github" => {
                        let challenge = &headers["WWW-Authenticate"];
                        assert_eq!(challenge["required"], true, "{at}");
                        let expected = if path == "/registry/token" {
                            r#"Basic realm="keyplane registry""#
                        } else {
                            "Bearer"
                        };
                        assert_eq!(challenge["schema"]["enum"], json!([expected]), "{at}");
                        // Past an address's failure budget, its 401s answer 429.
                        assert!(responses.contains_key("429"), "{at}: and 429");
                    }
                    "429" | "503" if api => {
                        assert_eq!(headers["Retry-After"]["required"], true, "{at}");
                        assert_eq!(headers["Retry-After"]["schema"]["type"], "integer");
                    }
                    "409" if takes_key => {
                        // Sent on the key's in-progress 409 only, not on the route's others.
                        let retry_after = &headers["Retry-After"];
                        assert!(retry_after.is_object(), "{at}");
                        assert_ne!(retry_after["required"], true, "{at}");
                        let description = retry_after["description"].as_str().unwrap();
                        assert!(
                            description.contains("only while")
                                && description.contains("live-credential limit"),
                            "{at}: {description}"
                        );
                    }
                    success if takes_key && success.starts_with('2') => {
                        assert!(headers["Idempotent-Replayed"].is_object(), "{at}");
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(operations > 50, "{operations} operations");

    let schemas = &doc["components"]["schemas"];
    let schema_of = |path: &str, method: &str, status: &str| {
        doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
            ["$ref"]
            .clone()
    };
    // Verification: its refusals in the OAuth shape; whoami reads nothing that can be malformed.
    for (path, method, status) in [
        ("/oauth2/introspect", "post", "401"),
        ("/oauth2/introspect", "post", "403"),
        ("/oauth2/introspect", "post", "429"),
        ("/v1/auth/forward", "get", "401"),
        ("/v1/auth/forward", "get", "403"),
        ("/v1/auth/forward", "get", "429"),
        ("/v1/whoami", "get", "401"),
        ("/v1/revocations/stream", "get", "401"),
        ("/v1/revocations/stream", "get", "403"),
        ("/v1/revocations/stream", "get", "429"),
    ] {
        assert_eq!(
            schema_of(path, method, status),
            "#/components/schemas/OAuthError",
            "{method} {path} {status}"
        );
    }
    assert!(doc["paths"]["/v1/whoami"]["get"]["responses"]
        .get("400")
        .is_none());
    let introspect = &doc["paths"]["/oauth2/introspect"]["post"]["requestBody"]["content"];
    for media_type in ["application/x-www-form-urlencoded", "application/json"] {
        assert_eq!(
            introspect[media_type]["schema"]["$ref"], "#/components/schemas/IntrospectionRequest",
            "{media_type}"
        );
    }
    assert_eq!(
        schemas["IntrospectionRequest"]["required"],
        json!(["token"])
    );
    let forward = &doc["paths"]["/v1/auth/forward"]["get"]["responses"]["200"]["headers"];
    for name in [
        "X-Keyplane-Org-Id",
        "X-Keyplane-Subject",
        "X-Keyplane-Credential-Kind",
        "X-Keyplane-Scopes",
        "X-Keyplane-Secret",
    ] {
        assert_eq!(forward[name]["required"], true, "{name}");
    }
    // The registry: its own shape, both of the form's shapes for a 400, every code it answers.
    for (method, status) in [
        ("get", "400"),
        ("get", "401"),
        ("post", "401"),
        ("post", "413"),
    ] {
        assert_eq!(
            schema_of("/registry/token", method, status),
            "#/components/schemas/RegistryErrors",
            "{method} {status}"
        );
    }
    assert_eq!(
        schema_of("/registry/token", "post", "400"),
        "#/components/schemas/RegistryFormRefusal"
    );
    assert_eq!(
        schemas["RegistryFormRefusal"]["oneOf"],
        json!([
            {"$ref": "#/components/schemas/OAuthError"},
            {"$ref": "#/components/schemas/RegistryErrors"},
        ])
    );
    assert_eq!(
        schemas["RegistryErrorCode"]["enum"],
        json!([
            "UNAUTHORIZED",
            "UNSUPPORTED",
            "NAME_INVALID",
            "TOOMANYREQUESTS",
            "UNAVAILABLE"
        ])
    );
    // The operations endpoints' bodies, and the revocation stream's event data.
    assert_eq!(
        schema_of("/healthz", "get", "200"),
        "#/components/schemas/Health"
    );
    for status in ["200", "503"] {
        assert_eq!(
            schema_of("/readyz", "get", status),
            "#/components/schemas/Readiness"
        );
    }
    assert_eq!(
        schemas["Readiness"]["required"],
        json!([
            "status",
            "version",
            "schema",
            "store",
            "writes",
            "last_write_failure",
            "clock",
            "audit",
            "background"
        ])
    );
    assert_eq!(schemas["BackgroundHealth"]["required"], json!(["stalled"]));
    assert_eq!(
        schemas["ListenerHealth"]["enum"],
        json!(["listening", "reconnecting"])
    );
    assert_eq!(
        schemas["AuditHealthStatus"]["enum"],
        json!(["ok", "behind_export", "missing_events", "not_exported"])
    );
    // Counts only: /readyz is unauthenticated and names no organization.
    assert_eq!(
        schemas["AuditHealth"]["required"],
        json!([
            "status",
            "organizations_behind",
            "organizations_missing_events",
            "events_missing"
        ])
    );
    assert!(schemas.get("BehindOrganization").is_none());
    assert_eq!(
        schemas["ClockHealth"]["required"],
        json!([
            "status",
            "skew_seconds",
            "limit_seconds",
            "unready_limit_seconds",
            "checked_at"
        ])
    );
    assert_eq!(
        schemas["ClockHealthStatus"]["enum"],
        json!(["ok", "skewed", "unknown", "not_checked"])
    );
    assert_eq!(
        schemas["ReadinessStatus"]["enum"],
        json!(["ready", "degraded", "unavailable"])
    );
    for name in ["RevocationEvent", "StreamPosition"] {
        assert!(schemas[name]["properties"]["seq"].is_object(), "{name}");
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

/// Anyone may ask `/readyz`, as often as they like: a flood of it costs the store one check a
/// second, up or down (a slow or refusing store is then also dialled directly).
async fn readiness_checks_the_store_once_for_many_askers(backend: Backend) {
    let (app, store) =
        crate::faulty_store::FaultyStore::spawn(backend, crate::helpers::test_config()).await;
    for (down, status) in [(false, 200), (true, 503)] {
        store.set_down(down);
        // Past the last check's reuse.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let before = store.pings();
        let asked = (0..40).map(|_| async {
            app.request(Method::GET, "/readyz", None)
                .send()
                .await
                .unwrap()
                .status()
        });
        let answers = futures::future::join_all(asked).await;
        assert!(answers.iter().all(|s| *s == status), "{answers:?}");
        let pings = store.pings() - before;
        assert!(pings <= 2, "40 askers pinged the store {pings} times");
    }
}

both_backends!(
    readiness_checks_the_store_once_for_many_askers,
    health_and_readiness,
    metrics_count_requests_and_verifications,
    openapi_covers_every_route_with_the_docs_spelling,
    docs_page_renders_the_reference,
    unknown_routes_are_404_in_json,
);
