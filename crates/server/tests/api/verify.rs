//! `/oauth2/introspect`, `/v1/auth/forward`, `/v1/whoami`, the verification cache, and replicas.

use crate::helpers::{both_backends, test_config, Org, TestApp};
use keyplane_server::Config;
use keyplane_store::testing::Backend;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn introspect_form(app: &TestApp, caller: &str, token: &str) -> Response {
    app.request(Method::POST, "/oauth2/introspect", Some(caller))
        .form(&[("token", token), ("token_type_hint", "access_token")])
        .send()
        .await
        .unwrap()
}

async fn introspect(app: &TestApp, caller: &str, token: &str) -> Value {
    let res = introspect_form(app, caller, token).await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn forward(app: &TestApp, token: Option<&str>, query: &str) -> Response {
    app.request(Method::GET, &format!("/v1/auth/forward{query}"), token)
        .send()
        .await
        .unwrap()
}

async fn verifier_token(app: &TestApp, org: &Org) -> String {
    let created = app.create_token(org, "verifier", &["tokens:verify"]).await;
    created["token"].as_str().unwrap().to_string()
}

async fn service_account_with_grant(
    app: &TestApp,
    org: &Org,
    capability: &str,
) -> (String, String, String) {
    let sa: Value = app
        .post(
            &org.account_path("/service-accounts"),
            &org.token,
            json!({"name": "svc"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = sa["id"].as_str().unwrap().to_string();
    let grant = app
        .post(
            &org.account_path("/authorizations"),
            &org.token,
            json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": id, "capability_key": capability}),
        )
        .await;
    assert_eq!(grant.status(), 201);
    let grant: Value = grant.json().await.unwrap();
    (
        id,
        sa["token"].as_str().unwrap().to_string(),
        grant["id"].as_str().unwrap().to_string(),
    )
}

async fn introspection_describes_live_credentials_of_its_own_org(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let verifier = verifier_token(&app, &org).await;

    let expires = "2099-01-01T00:00:00Z";
    let res = app
        .post(&org.path("/api-tokens"), &org.token, json!({"name": "deployer", "scopes": ["deploy", "api_tokens:read"], "expires_at": expires}))
        .await;
    let deployer: Value = res.json().await.unwrap();
    let answer = introspect(&app, &verifier, deployer["token"].as_str().unwrap()).await;
    assert_eq!(
        answer,
        json!({
            "active": true,
            "token_type": "api_token",
            "scope": "deploy api_tokens:read",
            "sub": deployer["id"],
            "org_id": org.id,
            "username": "deployer",
            "exp": 4070908800i64,
            "iat": chrono::DateTime::parse_from_rfc3339(deployer["created_at"].as_str().unwrap()).unwrap().timestamp(),
        })
    );
    // JSON bodies work too; a credential without expiry has no `exp`.
    let res = app
        .request(Method::POST, "/oauth2/introspect", Some(&verifier))
        .json(&json!({"token": org.token}))
        .send()
        .await
        .unwrap();
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["active"], true);
    assert_eq!(answer["scope"], "*");
    assert!(answer.get("exp").is_none());

    // A service account's scope comes from its grants; a robot's from its permissions.
    let (_, sa_token, _) = service_account_with_grant(&app, &org, "auth.manage").await;
    let answer = introspect(&app, &verifier, &sa_token).await;
    assert_eq!(
        (answer["token_type"].as_str(), answer["scope"].as_str()),
        (Some("service_account"), Some("auth.manage"))
    );
    let enabled: Value = app
        .request(Method::POST, &org.path("/registry"), Some(&org.token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let answer = introspect(
        &app,
        &verifier,
        enabled["credentials"]["password"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        (answer["token_type"].as_str(), answer["scope"].as_str()),
        (Some("robot_account"), Some("pull push"))
    );

    // Unknown, malformed, revoked, and other orgs' credentials are all simply inactive.
    let revoked = app.create_token(&org, "revoked", &[]).await;
    let revoked_id = revoked["id"].as_str().unwrap();
    assert_eq!(
        app.delete(&org.path(&format!("/api-tokens/{revoked_id}")), &org.token)
            .await
            .status(),
        204
    );
    for token in [
        "",
        "garbage",
        &org.token.replace('a', "b"),
        revoked["token"].as_str().unwrap(),
        &other.token,
    ] {
        assert_eq!(
            introspect(&app, &verifier, token).await,
            json!({"active": false}),
            "{token:.12}"
        );
    }
}

async fn introspection_callers_need_tokens_verify(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let reader = app.create_token(&org, "reader", &["api_tokens:read"]).await;
    let res = introspect_form(&app, reader["token"].as_str().unwrap(), &org.token).await;
    assert_eq!(res.status(), 403);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"],
        "insufficient_scope"
    );
    let res = app
        .request(Method::POST, "/oauth2/introspect", None)
        .form(&[("token", org.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let verifier = verifier_token(&app, &org).await;
    let res = app
        .request(Method::POST, "/oauth2/introspect", Some(&verifier))
        .header("content-type", "text/plain")
        .body("token=x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    let res = app
        .request(Method::POST, "/oauth2/introspect", Some(&verifier))
        .form(&[("nothing", "here")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
}

async fn verification_is_not_rate_limited(backend: Backend) {
    let config = Config {
        rate_limit_per_minute: 60,
        rate_limit_burst: 2,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let verifier = verifier_token(&app, &org).await;
    for _ in 0..20 {
        assert_eq!(
            introspect(&app, &verifier, &org.token).await["active"],
            true
        );
        assert_eq!(forward(&app, Some(&org.token), "").await.status(), 200);
        assert_eq!(app.get("/v1/whoami", &org.token).await.status(), 200);
    }
    // ...while the management API still is, for the same credential.
    let statuses: Vec<u16> = {
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(
                app.get(&org.path("/api-tokens"), &org.token)
                    .await
                    .status()
                    .as_u16(),
            );
        }
        statuses
    };
    assert!(statuses.contains(&429), "{statuses:?}");
}

async fn forward_auth_answers_with_identity_headers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let deployer = app
        .create_token(&org, "deployer", &["deploy", "logs:read"])
        .await;
    let token = deployer["token"].as_str().unwrap();

    let res = forward(&app, Some(token), "").await;
    assert_eq!(res.status(), 200);
    let headers = res.headers();
    assert_eq!(headers["x-keyplane-org-id"], org.id.as_str());
    assert_eq!(
        headers["x-keyplane-subject"],
        deployer["id"].as_str().unwrap()
    );
    assert_eq!(headers["x-keyplane-credential-kind"], "api_token");
    assert_eq!(headers["x-keyplane-scopes"], "deploy logs:read");

    assert_eq!(
        forward(&app, Some(token), "?scope=deploy&scope=logs:read")
            .await
            .status(),
        200
    );
    assert_eq!(
        forward(&app, Some(&org.token), "?scope=anything")
            .await
            .status(),
        200
    );
    // A misspelt parameter must not silently drop the check.
    for typo in ["?scopes=deploy", "?Scope=admin"] {
        let res = forward(&app, Some(token), typo).await;
        assert_eq!(res.status(), 400, "{typo}");
        assert_eq!(
            res.json::<Value>().await.unwrap()["error"],
            "invalid_request"
        );
    }
    let res = forward(&app, Some(token), "?scope=deploy&scope=admin").await;
    assert_eq!(res.status(), 403);
    assert!(res.headers().get("x-keyplane-subject").is_none());

    for bad in [
        None,
        Some("garbage"),
        Some("aether_0000000000000000000000000000000000000000000000000000000000"),
    ] {
        let res = forward(&app, bad, "").await;
        assert_eq!(res.status(), 401);
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        assert!(res.headers().get("x-keyplane-org-id").is_none());
    }
}

async fn whoami_describes_the_caller(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "me", "scopes": ["deploy"], "expires_at": "2099-01-01T00:00:00Z"}),
        )
        .await;
    let me: Value = res.json().await.unwrap();
    let who: Value = app
        .get("/v1/whoami", me["token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        who,
        json!({"kind": "api_token", "id": me["id"], "org_id": org.id, "name": "me", "scopes": ["deploy"], "expires_at": "2099-01-01T00:00:00Z"})
    );
    let (sa_id, sa_token, _) = service_account_with_grant(&app, &org, "auth.manage").await;
    let who: Value = app.get("/v1/whoami", &sa_token).await.json().await.unwrap();
    assert_eq!(
        (who["kind"].as_str(), who["id"].as_str()),
        (Some("service_account"), Some(sa_id.as_str()))
    );
    assert_eq!(who["scopes"], json!(["auth.manage"]));
    assert_eq!(app.get("/v1/whoami", "nope").await.status(), 401);
}

/// The cache never outlives a local revoke, rotate or grant change.
async fn cached_verifications_die_with_their_credential(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let doomed = app.create_token(&org, "doomed", &[]).await;
    let (id, token) = (
        doomed["id"].as_str().unwrap(),
        doomed["token"].as_str().unwrap(),
    );
    for _ in 0..3 {
        assert_eq!(forward(&app, Some(token), "").await.status(), 200);
    }
    assert_eq!(
        app.delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await
            .status(),
        204
    );
    assert_eq!(forward(&app, Some(token), "").await.status(), 401);

    let rotating = app.create_token(&org, "rotating", &[]).await;
    let (id, old) = (
        rotating["id"].as_str().unwrap(),
        rotating["token"].as_str().unwrap(),
    );
    assert_eq!(forward(&app, Some(old), "").await.status(), 200);
    let new: Value = app
        .post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(forward(&app, Some(old), "").await.status(), 401);
    assert_eq!(
        forward(&app, Some(new["token"].as_str().unwrap()), "")
            .await
            .status(),
        200
    );

    let (_, sa_token, grant_id) = service_account_with_grant(&app, &org, "deploy").await;
    assert_eq!(
        forward(&app, Some(&sa_token), "?scope=deploy")
            .await
            .status(),
        200
    );
    let res = app
        .delete(
            &org.account_path(&format!("/authorizations/{grant_id}")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        forward(&app, Some(&sa_token), "?scope=deploy")
            .await
            .status(),
        403
    );
}

/// Waits until `check` answers `expected`, returning how long it took; panics after `limit`.
async fn time_until(
    limit: Duration,
    expected: u16,
    mut check: impl AsyncFnMut() -> u16,
) -> Duration {
    let started = Instant::now();
    loop {
        if check().await == expected {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not propagated within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Three replicas on one PostgreSQL: a revoke, rotate or grant change through one is seen by the
/// others through NOTIFY, well within the cache TTL that backs it up.
#[tokio::test]
async fn three_replicas_on_postgres_see_every_change() {
    let first = TestApp::spawn(Backend::Postgres).await;
    let replicas = [first.replica().await, first.replica().await];
    let org = first.create_org("acme").await;
    // Give the replicas' LISTEN connections a moment to be established.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Stated bound: NOTIFY delivery, far below the 30 s cache TTL. Measured in BENCHMARKS.md.
    let bound = Duration::from_secs(5);

    let doomed = first.create_token(&org, "doomed", &[]).await;
    let (id, token) = (
        doomed["id"].as_str().unwrap().to_string(),
        doomed["token"].as_str().unwrap().to_string(),
    );
    for replica in &replicas {
        assert_eq!(
            forward(replica, Some(&token), "").await.status(),
            200,
            "warm the cache"
        );
    }
    assert_eq!(
        first
            .delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await
            .status(),
        204
    );
    for replica in &replicas {
        time_until(bound, 401, async || {
            forward(replica, Some(&token), "").await.status().as_u16()
        })
        .await;
    }

    let rotating = first.create_token(&org, "rotating", &[]).await;
    let (id, old) = (
        rotating["id"].as_str().unwrap().to_string(),
        rotating["token"].as_str().unwrap().to_string(),
    );
    for replica in &replicas {
        assert_eq!(forward(replica, Some(&old), "").await.status(), 200);
    }
    let res = replicas[0]
        .post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);
    time_until(bound, 401, async || {
        forward(&first, Some(&old), "").await.status().as_u16()
    })
    .await;
    time_until(bound, 401, async || {
        forward(&replicas[1], Some(&old), "")
            .await
            .status()
            .as_u16()
    })
    .await;

    let (_, sa_token, grant_id) = service_account_with_grant(&first, &org, "deploy").await;
    for replica in &replicas {
        assert_eq!(
            forward(replica, Some(&sa_token), "?scope=deploy")
                .await
                .status(),
            200
        );
    }
    let res = replicas[1]
        .delete(
            &org.account_path(&format!("/authorizations/{grant_id}")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    time_until(bound, 403, async || {
        forward(&first, Some(&sa_token), "?scope=deploy")
            .await
            .status()
            .as_u16()
    })
    .await;
    time_until(bound, 403, async || {
        forward(&replicas[0], Some(&sa_token), "?scope=deploy")
            .await
            .status()
            .as_u16()
    })
    .await;
}

both_backends!(
    introspection_describes_live_credentials_of_its_own_org,
    introspection_callers_need_tokens_verify,
    verification_is_not_rate_limited,
    forward_auth_answers_with_identity_headers,
    whoami_describes_the_caller,
    cached_verifications_die_with_their_credential,
);
