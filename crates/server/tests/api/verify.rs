//! `/oauth2/introspect`, `/v1/auth/forward`, `/v1/whoami`, the verification cache, and replicas.

use crate::faulty_store::FaultyStore;
use crate::helpers::{both_backends, test_config, unknown_token, Org, TestApp};
use crate::pg_proxy::{Mode, PgProxy};
use keyplane_core::CredentialKind;
use keyplane_server::auth::CacheConfig;
use keyplane_server::Config;
use keyplane_store::testing::Backend;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use std::sync::Arc;
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
    // RFC 7662 §2.2: the answer is `application/json`, and holds nothing to cache.
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(res.headers()["cache-control"], "no-store");
    res.json().await.unwrap()
}

pub(crate) async fn forward(app: &TestApp, token: Option<&str>, query: &str) -> Response {
    app.request(Method::GET, &format!("/v1/auth/forward{query}"), token)
        .send()
        .await
        .unwrap()
}

/// A revoke whose client hangs up after the store made it still reaches the verification cache:
/// hyper drops the request's future with the connection, and the change must run to its end
/// regardless. SQLite only: on PostgreSQL the replica's own NOTIFY would invalidate it anyway.
#[tokio::test]
async fn a_revoke_whose_client_hung_up_still_reaches_the_cache() {
    use tokio::io::AsyncWriteExt;
    let (app, store) = FaultyStore::spawn(Backend::Sqlite, test_config()).await;
    let org = app.create_org("acme").await;
    let created = app
        .create_token(&org, "leaving", &["api_tokens:read"])
        .await;
    let (id, secret) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    assert_eq!(forward(&app, Some(secret), "").await.status(), 200);

    let mut held = store.hold_after_next_revoke();
    let address = app.base.trim_start_matches("http://");
    let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "DELETE {} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\r\n",
        org.path(&format!("/api-tokens/{id}")),
        org.token
    );
    client.write_all(request.as_bytes()).await.unwrap();
    held.reached().await;
    // Committed; the client gives up before the answer.
    drop(client);
    let given_up = held.given_up_within(Duration::from_secs(2)).await;
    held.release();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = forward(&app, Some(secret), "").await.status();
        if status == 401 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revoked token still verifies ({status}; the revoke was given up: {given_up})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stop waits (within its deadline) for a change still running after its client left, rather
/// than closing the store under it.
#[tokio::test]
async fn a_stop_waits_for_a_change_whose_client_left() {
    use tokio::io::AsyncWriteExt;
    let first = TestApp::spawn(Backend::Sqlite).await;
    let org = first.create_org("acme").await;
    let created = first
        .create_token(&org, "leaving", &["api_tokens:read"])
        .await;
    let store = FaultyStore::new(
        keyplane_store::connect(first.database_url())
            .await
            .expect("open the test store"),
    );
    let app = keyplane_server::App::new(store.clone(), test_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut served = tokio::spawn(keyplane_server::serve(listener, app, async move {
        let _ = stopped.await;
    }));

    let mut held = store.hold_after_next_revoke();
    let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "DELETE {} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\r\n",
        org.path(&format!("/api-tokens/{}", created["id"].as_str().unwrap())),
        org.token
    );
    client.write_all(request.as_bytes()).await.unwrap();
    held.reached().await;
    drop(client);
    stop.send(()).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut served)
            .await
            .is_err(),
        "the server stopped while a change was still running"
    );
    held.release();
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the server stops once the change is done")
        .unwrap()
        .unwrap();
}

async fn verifier_token(app: &TestApp, org: &Org) -> String {
    let created = app.create_token(org, "verifier", &["tokens:verify"]).await;
    created["token"].as_str().unwrap().to_string()
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
            "secret": "current",
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

    // A service account's scope comes from its grants.
    let (_, sa_token, _) = app.service_account_with_grant(&org, "auth.manage").await;
    let answer = introspect(&app, &verifier, &sa_token).await;
    assert_eq!(
        (answer["token_type"].as_str(), answer["scope"].as_str()),
        (Some("service_account"), Some("auth.manage"))
    );
    // A robot secret logs in to the registry only: introspected, it is inactive.
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
    assert_eq!(answer, json!({"active": false}));

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
    // The form first: it is what RFC 7662 names.
    assert_eq!(
        res.json::<Value>().await.unwrap()["error_description"],
        "request body must be application/x-www-form-urlencoded or application/json"
    );
    // A form is a form whatever the media type's case and parameters.
    let res = app
        .request(Method::POST, "/oauth2/introspect", Some(&verifier))
        .header(
            "content-type",
            "Application/X-WWW-Form-Urlencoded ; charset=UTF-8",
        )
        .body(format!("token={}", org.token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["active"], true);
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

    // Another organization can mint a credential with the same scope: `org` keeps it out.
    let other = app.create_org("other").await;
    let theirs = app.create_token(&other, "deployer", &["deploy"]).await;
    let theirs = theirs["token"].as_str().unwrap();
    let ours = format!("?scope=deploy&org={}", org.id);
    assert_eq!(forward(&app, Some(token), &ours).await.status(), 200);
    let res = forward(&app, Some(theirs), &ours).await;
    assert_eq!(res.status(), 403);
    assert!(res.headers().get("x-keyplane-org-id").is_none());
    let either = format!("?org={}&org={}", org.id, other.id);
    assert_eq!(forward(&app, Some(theirs), &either).await.status(), 200);
    let res = forward(&app, Some(token), "?org=acme").await;
    assert_eq!(res.status(), 400);

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
        json!({"kind": "api_token", "id": me["id"], "org_id": org.id, "name": "me", "scopes": ["deploy"], "expires_at": "2099-01-01T00:00:00Z", "secret": "current"})
    );
    let (sa_id, sa_token, _) = app.service_account_with_grant(&org, "auth.manage").await;
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

    let (_, sa_token, grant_id) = app.service_account_with_grant(&org, "deploy").await;
    assert_eq!(
        forward(&app, Some(&sa_token), "?scope=deploy")
            .await
            .status(),
        200
    );
    app.revoke_grant(&org, &grant_id).await;
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
    first.await_listeners(3).await;
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

    let (_, sa_token, grant_id) = first.service_account_with_grant(&org, "deploy").await;
    for replica in &replicas {
        assert_eq!(
            forward(replica, Some(&sa_token), "?scope=deploy")
                .await
                .status(),
            200
        );
    }
    replicas[1].revoke_grant(&org, &grant_id).await;
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

/// Robot secrets authenticate at the registry token service only.
async fn robot_secrets_verify_only_at_the_registry(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let enabled: Value = app
        .request(Method::POST, &org.path("/registry"), Some(&org.token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (username, robot) = (
        enabled["credentials"]["username"].as_str().unwrap(),
        enabled["credentials"]["password"].as_str().unwrap(),
    );
    let res = forward(&app, Some(robot), "").await;
    assert_eq!(res.status(), 401, "forward-auth");
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert!(res.headers().get("x-keyplane-subject").is_none());
    assert_eq!(app.get("/v1/whoami", robot).await.status(), 401, "whoami");
    let res = introspect_form(&app, robot, &org.token).await;
    assert_eq!(res.status(), 401, "introspection as the caller");
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "invalid_token");
    let verifier = verifier_token(&app, &org).await;
    assert_eq!(
        introspect(&app, &verifier, robot).await,
        json!({"active": false})
    );
    // Where it belongs, it still logs in.
    let res = app
        .request(
            Method::GET,
            "/registry/token?service=keyplane-registry&scope=repository:acme/app:pull",
            None,
        )
        .basic_auth(username, Some(robot))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// The `last_used_at` of a credential, read through the API of its own org.
async fn last_used_at(app: &TestApp, org: &Org, id: &str) -> Value {
    app.app.flush_usage().await;
    let record: Value = app
        .get(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await
        .json()
        .await
        .unwrap();
    record["last_used_at"].clone()
}

async fn introspecting_another_tenants_token_leaves_its_last_used_at(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let theirs = app.create_org("theirs").await;
    let ours = app.create_org("ours").await;
    let target = app.create_token(&theirs, "target", &["deploy"]).await;
    let (id, token) = (
        target["id"].as_str().unwrap(),
        target["token"].as_str().unwrap(),
    );
    let our_verifier = verifier_token(&app, &ours).await;
    for _ in 0..3 {
        assert_eq!(
            introspect(&app, &our_verifier, token).await,
            json!({"active": false})
        );
    }
    assert_eq!(last_used_at(&app, &theirs, id).await, Value::Null);
    // Its own org's introspection is a use.
    let their_verifier = verifier_token(&app, &theirs).await;
    assert_eq!(
        introspect(&app, &their_verifier, token).await["active"],
        true
    );
    assert!(last_used_at(&app, &theirs, id).await.is_string());
}

/// `keyplane_verify_cache_lookups_total` by result, from `/metrics`.
async fn cache_lookups(app: &TestApp, result: &str) -> u64 {
    let text = app.metrics().await;
    let series = format!("keyplane_verify_cache_lookups_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
        .parse()
        .unwrap()
}

/// `keyplane_verify_cache_lookups_total`'s hits and misses so far.
async fn cache_hits_and_misses(app: &TestApp) -> (u64, u64) {
    (
        cache_lookups(app, "hit").await,
        cache_lookups(app, "miss").await,
    )
}

/// Forward-auths every token once; returns (cache hits, misses) it caused.
async fn verify_all(app: &TestApp, tokens: &[String]) -> (u64, u64) {
    let (hits, misses) = cache_hits_and_misses(app).await;
    for token in tokens {
        assert_eq!(forward(app, Some(token), "").await.status(), 200);
    }
    let (now_hits, now_misses) = cache_hits_and_misses(app).await;
    (now_hits - hits, now_misses - misses)
}

/// A tenant flooding introspection with random well-formed tokens evicts nobody's cached
/// verifications: unknown secrets are cached apart from known ones.
async fn random_token_floods_do_not_evict_other_tenants(backend: Backend) {
    let capacity = 100;
    let config = Config {
        verify_cache: CacheConfig {
            capacity,
            negative_capacity: 20,
            ..CacheConfig::default()
        },
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let victim = app.create_org("victim").await;
    let attacker = app.create_org("attacker").await;
    let mut victims = Vec::new();
    for i in 0..capacity / 2 {
        let created = app
            .create_token(&victim, &format!("t{i}"), &["deploy"])
            .await;
        victims.push(created["token"].as_str().unwrap().to_string());
    }
    let (_, misses) = verify_all(&app, &victims).await;
    assert_eq!(
        misses,
        victims.len() as u64,
        "the first verification loads each"
    );
    let verifier = verifier_token(&app, &attacker).await;
    for _ in 0..capacity * 10 {
        assert_eq!(
            introspect(&app, &verifier, &unknown_token(CredentialKind::ApiToken)).await,
            json!({"active": false})
        );
    }
    let (hits, misses) = verify_all(&app, &victims).await;
    assert_eq!(
        (hits, misses),
        (victims.len() as u64, 0),
        "after {} random tokens, the victim's entries are all still cached",
        capacity * 10
    );
}

/// How the test takes the store away from the server under test.
enum Outage {
    /// PostgreSQL through a proxy that refuses connections.
    Proxy(PgProxy),
    /// SQLite behind a store that can be switched off.
    Switch(Arc<FaultyStore>),
}

impl Outage {
    fn set(&self, down: bool) {
        match self {
            Outage::Proxy(proxy) => proxy.set(if down { Mode::Refuse } else { Mode::Forward }),
            Outage::Switch(store) => store.set_down(down),
        }
    }
}

/// Stale-if-error: while the store is away, a cached valid credential keeps verifying past its
/// cache lifetime, up to `positive_ttl + stale_if_error` after it was loaded; revoked, unknown and
/// uncached ones fail closed all along.
async fn cached_credentials_outlive_a_store_outage_for_a_bound(backend: Backend) {
    let cache = CacheConfig {
        positive_ttl: Duration::from_secs(1),
        stale_if_error: Duration::from_secs(3),
        ..CacheConfig::default()
    };
    let config = Config {
        verify_cache: cache.clone(),
        ..test_config()
    };
    // `writer` creates and revokes; `app` (behind the outage) verifies.
    let (writer, app, outage) = match backend {
        Backend::Postgres => {
            let writer = TestApp::spawn_with(backend, config.clone()).await;
            let proxy = PgProxy::start(writer.database_url()).await;
            let app = writer.replica_at(&proxy.url, config).await;
            (writer, Some(app), Outage::Proxy(proxy))
        }
        Backend::Sqlite => {
            let (app, switch) = FaultyStore::spawn(backend, config).await;
            (app, None, Outage::Switch(switch))
        }
    };
    let app = app.as_ref().unwrap_or(&writer);
    let org = writer.create_org("acme").await;
    let token_of = |created: Value| created["token"].as_str().unwrap().to_string();
    let kept = token_of(writer.create_token(&org, "kept", &[]).await);
    let uncached = token_of(writer.create_token(&org, "uncached", &[]).await);
    let revoked = writer.create_token(&org, "revoked", &[]).await;
    let revoked_id = revoked["id"].as_str().unwrap().to_string();
    let revoked = token_of(revoked);
    // The writer's and the replica's listeners, so the revocation below reaches it.
    writer.await_listeners(2).await;
    assert_eq!(forward(app, Some(&revoked), "").await.status(), 200);
    assert_eq!(
        writer
            .delete(&org.path(&format!("/api-tokens/{revoked_id}")), &org.token)
            .await
            .status(),
        204
    );
    time_until(Duration::from_secs(5), 401, async || {
        forward(app, Some(&revoked), "").await.status().as_u16()
    })
    .await;
    let caller = verifier_token(&writer, &org).await;
    let stale_mark = |answer: &Response| answer.headers().get("x-keyplane-stale").cloned();
    let confirmed = introspect_form(app, &caller, &kept).await;
    assert_eq!(stale_mark(&confirmed), None, "the store answered");
    assert_eq!(forward(app, Some(&kept), "").await.status(), 200);
    let loaded = Instant::now();

    outage.set(true);
    tokio::time::sleep(cache.positive_ttl + Duration::from_millis(500)).await;
    assert_eq!(
        forward(app, Some(&kept), "").await.status(),
        200,
        "a cached valid credential verifies past its cache lifetime during the outage"
    );
    // An embedded verifier is told the answer is unconfirmed: it may know of a change since.
    let unconfirmed = introspect_form(app, &caller, &kept).await;
    assert_eq!(unconfirmed.status(), 200);
    assert_eq!(
        stale_mark(&unconfirmed).as_ref().map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let unconfirmed: Value = unconfirmed.json().await.unwrap();
    assert_eq!(unconfirmed["active"], true);
    for (what, token) in [
        ("uncached", &uncached),
        ("revoked", &revoked),
        ("unknown", &unknown_token(CredentialKind::ApiToken)),
    ] {
        let status = forward(app, Some(token), "").await.status();
        assert!(
            status == 401 || status == 503,
            "{what} fails closed during the outage, got {status}"
        );
    }
    let bound = cache.positive_ttl + cache.stale_if_error;
    time_until(bound + Duration::from_secs(3), 503, async || {
        forward(app, Some(&kept), "").await.status().as_u16()
    })
    .await;
    let served = loaded.elapsed();
    eprintln!(
        "stale-if-error ({backend:?}): a cached token verified for {:.2} s after its last load while the store was away (bound: positive_ttl {:?} + stale_if_error {:?})",
        served.as_secs_f64(),
        cache.positive_ttl,
        cache.stale_if_error
    );
    assert!(
        served + Duration::from_millis(300) >= bound,
        "stopped early, after {served:?}"
    );
    assert!(
        served <= bound + Duration::from_secs(2),
        "served {served:?}"
    );

    outage.set(false);
    time_until(Duration::from_secs(10), 200, async || {
        forward(app, Some(&kept), "").await.status().as_u16()
    })
    .await;
    assert_eq!(forward(app, Some(&revoked), "").await.status(), 401);
}

/// During a store outage whose lookups take the store's timeout to fail, cached credentials past
/// their lifetime answer stale at once: one reload at a time asks the store whether it is back,
/// not every verification.
async fn an_outage_makes_one_verification_at_a_time_wait_for_the_store(backend: Backend) {
    let cache = CacheConfig {
        positive_ttl: Duration::from_millis(500),
        stale_if_error: Duration::from_secs(60),
        ..CacheConfig::default()
    };
    let config = Config {
        verify_cache: cache.clone(),
        ..test_config()
    };
    let (app, store) = FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    let token = app.create_token(&org, "kept", &[]).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(forward(&app, Some(&token), "").await.status(), 200);

    let failing_lookup = Duration::from_secs(2);
    store.fail_lookups_after(failing_lookup);
    store.set_down(true);
    tokio::time::sleep(cache.positive_ttl + Duration::from_millis(100)).await;
    // The first reload finds the store away (it could not know before).
    assert_eq!(forward(&app, Some(&token), "").await.status(), 200);
    let lookups_before = store.hash_lookups();

    // Thirty, one every 100 ms, each not waiting for the others: past the retry interval (1 s)
    // and through a failing lookup's whole time.
    let verifications = (0..30u64).map(|i| {
        let (app, token) = (&app, &token);
        async move {
            tokio::time::sleep(Duration::from_millis(100 * i)).await;
            let started = Instant::now();
            let status = forward(app, Some(token), "").await.status();
            (status, started.elapsed())
        }
    });
    let answers = futures::future::join_all(verifications).await;
    for (status, _) in &answers {
        assert_eq!(
            *status, 200,
            "a cached credential answers during the outage"
        );
    }
    let lookups = store.hash_lookups() - lookups_before;
    let waited = answers
        .iter()
        .filter(|(_, took)| *took >= failing_lookup)
        .count();
    assert!(
        lookups <= 2 && waited <= 2,
        "{lookups} of 30 verifications asked the store, {waited} waited for it to fail"
    );

    store.set_down(false);
    time_until(Duration::from_secs(5), 200, async || {
        forward(&app, Some(&token), "").await.status().as_u16()
    })
    .await;
}

/// Verifications of one credential whose cached entry is past its lifetime, arriving while its
/// reload reads the store (held here, as a slow store would), read the store once: they take
/// that reload's answer.
async fn concurrent_reloads_of_one_credential_read_the_store_once(backend: Backend) {
    let cache = CacheConfig {
        positive_ttl: Duration::from_secs(2),
        ..CacheConfig::default()
    };
    let config = Config {
        verify_cache: cache.clone(),
        ..test_config()
    };
    let (app, store) = FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    let token = app.create_token(&org, "busy", &[]).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(forward(&app, Some(&token), "").await.status(), 200);
    tokio::time::sleep(cache.positive_ttl + Duration::from_millis(100)).await;

    let mut held = store.hold_next_hash_lookup();
    let lookups_before = store.hash_lookups();
    let verifications = futures::future::join_all((0..16).map(|_| forward(&app, Some(&token), "")));
    let release = async move {
        held.reached().await;
        // The others arrive meanwhile (one arriving after the release finds the entry fresh).
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.release();
    };
    let (answers, ()) = tokio::join!(verifications, release);
    let statuses: Vec<u16> = answers.iter().map(|res| res.status().as_u16()).collect();
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    assert_eq!(
        store.hash_lookups() - lookups_before,
        1,
        "store reads for 16 verifications"
    );
}

/// An address over its failed-authentication budget costs no store lookups: its secrets the caches
/// do not hold are refused (429) without one, while its valid cached credential still verifies.
async fn an_address_over_its_failure_budget_gets_no_store_lookups(backend: Backend) {
    let budget = 5;
    let config = Config {
        failed_auth_per_minute: budget,
        ..test_config()
    };
    let (app, store) = FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    let cached = app.create_token(&org, "cached", &[]).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let uncached = app.create_token(&org, "uncached", &[]).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(forward(&app, Some(&cached), "").await.status(), 200);
    let lookups_before = store.hash_lookups();

    let mut statuses = Vec::new();
    for _ in 0..3 * budget {
        let answer = forward(&app, Some(&unknown_token(CredentialKind::ApiToken)), "").await;
        if answer.status() == 429 {
            assert!(answer.headers().contains_key("retry-after"));
        }
        statuses.push(answer.status().as_u16());
    }
    let lookups = store.hash_lookups() - lookups_before;
    assert!(
        lookups <= u64::from(budget) + 1,
        "{lookups} store lookups for {} unknown secrets on a budget of {budget}: {statuses:?}",
        3 * budget
    );
    assert_eq!(statuses.last(), Some(&429));
    assert_eq!(forward(&app, Some(&cached), "").await.status(), 200);
    // Not in the caches: refused as unknown secrets are, without asking the store.
    assert_eq!(forward(&app, Some(&uncached), "").await.status(), 429);
    assert_eq!(store.hash_lookups() - lookups_before, lookups);
}

/// A replica whose LISTEN connection freezes (stops delivering without closing) notices through
/// its heartbeat and resets its cache: a token revoked elsewhere is refused within seconds, not
/// after the 30 s cache lifetime. Prints each round's time (the `frozen-listener` measurement;
/// `FROZEN_LISTENER_ROUNDS`, default 3).
#[tokio::test]
async fn a_frozen_listener_is_detected_and_revocations_still_arrive() {
    let writer = TestApp::spawn(Backend::Postgres).await;
    let proxy = PgProxy::start(writer.database_url()).await;
    let replica = writer.replica_at(&proxy.url, test_config()).await;
    let org = writer.create_org("acme").await;
    let rounds: usize = std::env::var("FROZEN_LISTENER_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    // Stated bound: the heartbeat deadline (3 s) plus one heartbeat interval (1 s), the time from
    // the last heartbeat heard to the check that notices; the assertion allows 1 s for the reload.
    let bound = Duration::from_secs(4);
    let mut samples = Vec::new();
    for round in 0..rounds {
        proxy.set(Mode::Forward);
        // A fresh, unfrozen listener connection hears its heartbeats again.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let created = writer
            .create_token(&org, &format!("doomed-{round}"), &[])
            .await;
        let (id, token) = (
            created["id"].as_str().unwrap().to_string(),
            created["token"].as_str().unwrap().to_string(),
        );
        assert_eq!(forward(&replica, Some(&token), "").await.status(), 200);
        proxy.set(Mode::FreezeListeners);
        assert_eq!(
            writer
                .delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
                .await
                .status(),
            204
        );
        let took = time_until(bound + Duration::from_secs(2), 401, async || {
            forward(&replica, Some(&token), "").await.status().as_u16()
        })
        .await;
        eprintln!("frozen-listener round {round}: revoked token refused on the frozen replica after {:.0} ms", took.as_secs_f64() * 1e3);
        samples.push(took);
    }
    samples.sort();
    eprintln!(
        "frozen-listener: n={} max={:.0} ms (stated bound {bound:?}, cache TTL 30 s)",
        samples.len(),
        samples.last().unwrap().as_secs_f64() * 1e3
    );
    assert!(
        samples
            .iter()
            .all(|took| *took <= bound + Duration::from_secs(1)),
        "{samples:?}"
    );
}

/// A replica whose listener is lost and cannot listen again (its reconnects refused while the
/// pooled connections still work, as at PostgreSQL's connection limit; or its LISTEN hanging)
/// counts nothing it loads meanwhile as fresh: a token first verified after the loss and revoked
/// elsewhere is refused within seconds, not after the 30 s cache lifetime.
async fn revocations_arrive_while_the_listener_cannot_listen(mode: Mode, noticed_within: Duration) {
    let writer = TestApp::spawn(Backend::Postgres).await;
    let proxy = PgProxy::start(writer.database_url()).await;
    let replica = writer.replica_at(&proxy.url, test_config()).await;
    let org = writer.create_org("acme").await;
    let token_of = |created: Value| created["token"].as_str().unwrap().to_string();
    // A verification before the loss, so the replica's reader pool holds a connection.
    let before = token_of(writer.create_token(&org, "before", &[]).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(forward(&replica, Some(&before), "").await.status(), 200);

    proxy.set(mode);
    // The listener's loss is noticed (a closed connection at once, a frozen one by its heartbeat).
    tokio::time::sleep(noticed_within).await;
    let created = writer.create_token(&org, "after", &[]).await;
    let id = created["id"].as_str().unwrap().to_string();
    let after = token_of(created);
    assert_eq!(
        forward(&replica, Some(&after), "").await.status(),
        200,
        "loaded through a pooled connection"
    );
    assert_eq!(
        writer
            .delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await
            .status(),
        204
    );
    let took = time_until(Duration::from_secs(3), 401, async || {
        forward(&replica, Some(&after), "").await.status().as_u16()
    })
    .await;
    eprintln!(
        "listener down ({mode:?}): revoked token refused after {:.0} ms",
        took.as_secs_f64() * 1e3
    );
}

#[tokio::test]
async fn revocations_arrive_while_the_listener_cannot_reconnect() {
    revocations_arrive_while_the_listener_cannot_listen(
        Mode::DropListeners,
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test]
async fn revocations_arrive_while_the_listeners_listen_hangs() {
    // Frozen: noticed by the heartbeat within 4 s; the new connection's LISTEN then hangs.
    revocations_arrive_while_the_listener_cannot_listen(
        Mode::FreezeListeners,
        Duration::from_secs(5),
    )
    .await;
}

/// A listener whose heartbeats cannot be sent (the shared pool saturated; here its connections
/// frozen) keeps its connection and leaves the cache alone: only a heartbeat sent and not heard
/// back marks the listener dead. A reset would send every cached credential to the stuck store.
#[tokio::test]
async fn heartbeats_that_cannot_be_sent_do_not_reset_the_cache() {
    let writer = TestApp::spawn(Backend::Postgres).await;
    let proxy = PgProxy::start(writer.database_url()).await;
    let replica = writer.replica_at(&proxy.url, test_config()).await;
    let org = writer.create_org("acme").await;
    let created = writer.create_token(&org, "cached", &[]).await;
    let token = created["token"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(forward(&replica, Some(&token), "").await.status(), 200);
    let reloads = cache_lookups(&replica, "reload").await;

    proxy.set(Mode::FreezeOthers);
    // Past the heartbeat deadline and an interval, with no heartbeat sent all along.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let answer = tokio::time::timeout(Duration::from_secs(2), forward(&replica, Some(&token), ""))
        .await
        .map(|answer| answer.status());
    let reloaded = cache_lookups(&replica, "reload").await - reloads;
    proxy.set(Mode::Forward);
    assert_eq!(
        answer.ok(),
        Some(reqwest::StatusCode::OK),
        "answered from the cache"
    );
    assert_eq!(reloaded, 0, "the cache was reset");
}

/// The invalidation listener ends with `serve`: it lets its PostgreSQL connection go instead of
/// listening, heartbeating and reconnecting for as long as the process runs.
#[tokio::test]
async fn the_invalidation_listener_stops_with_the_server() {
    let writer = TestApp::spawn(Backend::Postgres).await;
    let store = keyplane_store::connect(writer.database_url())
        .await
        .expect("open the test store");
    let app = keyplane_server::App::new(store, test_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(keyplane_server::serve(listener, app.clone(), async move {
        let _ = stopped.await;
    }));
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(writer.database_url())
        .await
        .unwrap();
    let mut listeners = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN %'",
        )
        .fetch_one(&mut db)
        .await
        .unwrap()
    };
    // The writer's listener and this server's.
    let started = Instant::now();
    while listeners().await < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "no listener");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
    let stopped = Instant::now();
    while listeners().await > 1 {
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "the listener outlived serve"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nor does it come back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(listeners().await, 1);
    drop(app);
}

/// The verification routes are served without the router for their one method (`GET` forward-auth
/// and whoami, `POST` introspection); every other method on their paths still goes through it.
/// Both ways answer alike: the same headers (HEAD forward-auth is the router's), request ids,
/// `Cache-Control`, metrics labels and body limit.
async fn verification_routes_answer_alike_with_or_without_the_router(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let deployer = app.create_token(&org, "deployer", &["deploy"]).await;
    let token = deployer["token"].as_str().unwrap();
    let verifier = verifier_token(&app, &org).await;

    let direct = forward(&app, Some(token), "").await;
    let routed = app
        .request(Method::HEAD, "/v1/auth/forward", Some(token))
        .header("x-request-id", "routed-1")
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    assert_eq!(routed.status(), 200);
    let names = |res: &Response| {
        let mut names: Vec<String> = res
            .headers()
            .keys()
            .map(|name| name.to_string())
            .filter(|name| name != "date")
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&direct), names(&routed));
    for name in [
        "x-keyplane-org-id",
        "x-keyplane-subject",
        "x-keyplane-credential-kind",
        "x-keyplane-scopes",
        "x-keyplane-secret",
        "cache-control",
    ] {
        assert_eq!(direct.headers()[name], routed.headers()[name], "{name}");
    }
    assert_eq!(direct.headers()["cache-control"], "no-store");
    assert_eq!(routed.headers()["x-request-id"], "routed-1");
    let generated = direct.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");

    // Other methods: the router's 405, naming the method that is served.
    for (method, path, allowed) in [
        (Method::POST, "/v1/auth/forward", "GET,HEAD"),
        (Method::GET, "/oauth2/introspect", "POST"),
        (Method::DELETE, "/v1/whoami", "GET,HEAD"),
    ] {
        let res = app
            .request(method.clone(), path, Some(token))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 405, "{method} {path}");
        assert_eq!(res.headers()["allow"], allowed, "{method} {path}");
    }
    // Only the exact path is served directly; the router does not match a trailing slash.
    assert_eq!(forward(&app, Some(token), "/").await.status(), 404);

    // The body limit holds for introspection as for any route.
    let padding = "x".repeat(70 * 1024);
    let res = app
        .request(Method::POST, "/oauth2/introspect", Some(&verifier))
        .form(&[("token", token), ("padding", padding.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    // In the verification endpoints' error format, as their OpenAPI document says.
    assert_eq!(res.headers()["content-type"], "application/json");
    let refused: Value = res.json().await.unwrap();
    assert_eq!(refused["error"], "invalid_request", "{refused}");
    assert_eq!(introspect(&app, &verifier, token).await["active"], true);
    assert_eq!(app.get("/v1/whoami", token).await.status(), 200);

    let text = app.metrics().await;
    for counted in [
        r#"keyplane_http_requests_total{method="GET",route="/v1/auth/forward",status="200"} 1"#,
        r#"keyplane_http_requests_total{method="HEAD",route="/v1/auth/forward",status="200"} 1"#,
        r#"keyplane_http_requests_total{method="POST",route="/oauth2/introspect",status="200"} 1"#,
        r#"keyplane_http_requests_total{method="POST",route="/oauth2/introspect",status="413"} 1"#,
        r#"keyplane_http_requests_total{method="GET",route="/v1/whoami",status="200"} 1"#,
    ] {
        assert!(text.contains(counted), "{counted} in\n{text}");
    }
}

/// A forward-auth answer without headers that differ per request (`date`, `x-request-id`): its
/// status, its other headers, and its body.
async fn forward_answer(
    app: &TestApp,
    token: &str,
    query: &str,
) -> (u16, Vec<(String, String)>, String) {
    let res = forward(app, Some(token), query).await;
    let status = res.status().as_u16();
    let mut headers: Vec<(String, String)> = res
        .headers()
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "date" | "x-request-id"))
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_string()))
        .collect();
    headers.sort();
    (status, headers, res.text().await.unwrap())
}

/// Forward-auth answers from the verification caches without the handler's future, and from the
/// store through it: the two give the same answers, accepted or refused, and each counts one cache
/// lookup.
async fn forward_auth_answers_alike_from_the_store_and_from_the_cache(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    for (n, (query, status)) in [("", 200), ("?scope=deploy", 200), ("?scope=admin", 403)]
        .into_iter()
        .enumerate()
    {
        let name = format!("t{n}");
        let created = app
            .create_token(&org, &name, &["deploy", "logs:read"])
            .await;
        let token = created["token"].as_str().unwrap();
        let lookups = cache_hits_and_misses(&app).await;
        let stored = forward_answer(&app, token, query).await;
        let after_store = cache_hits_and_misses(&app).await;
        let cached = forward_answer(&app, token, query).await;
        let after_cache = cache_hits_and_misses(&app).await;
        assert_eq!(
            [after_store, after_cache].map(|(h, m)| (h - lookups.0, m - lookups.1)),
            [(0, 1), (1, 1)],
            "a new credential's first check asks the store, the second the cache ({query})"
        );
        assert_eq!(stored.0, status, "{query}: {stored:?}");
        assert_eq!(stored, cached, "{query}");
        if status == 200 {
            let subject = stored
                .1
                .iter()
                .find(|(name, _)| name == "x-keyplane-subject");
            assert_eq!(subject.unwrap().1, created["id"].as_str().unwrap());
        }
    }
    // An unknown secret: refused by the store, then by the cache of unknown secrets.
    let unknown = unknown_token(CredentialKind::ApiToken);
    let (stored, cached) = (
        forward_answer(&app, &unknown, "").await,
        forward_answer(&app, &unknown, "").await,
    );
    assert_eq!(stored.0, 401, "{stored:?}");
    assert_eq!(stored, cached);
    // A revoked one: refused alike once its revocation reached the cache.
    let created = app.create_token(&org, "r", &["deploy"]).await;
    let token = created["token"].as_str().unwrap();
    assert_eq!(forward_answer(&app, token, "").await.0, 200);
    let revoke = org.path(&format!("/api-tokens/{}", created["id"].as_str().unwrap()));
    assert_eq!(app.delete(&revoke, &org.token).await.status(), 204);
    let refused = forward_answer(&app, token, "").await;
    assert_eq!(refused.0, 401, "{refused:?}");
    assert_eq!(refused, forward_answer(&app, token, "").await);
}

both_backends!(
    verification_routes_answer_alike_with_or_without_the_router,
    forward_auth_answers_alike_from_the_store_and_from_the_cache,
    robot_secrets_verify_only_at_the_registry,
    introspecting_another_tenants_token_leaves_its_last_used_at,
    random_token_floods_do_not_evict_other_tenants,
    cached_credentials_outlive_a_store_outage_for_a_bound,
    an_outage_makes_one_verification_at_a_time_wait_for_the_store,
    concurrent_reloads_of_one_credential_read_the_store_once,
    an_address_over_its_failure_budget_gets_no_store_lookups,
    introspection_describes_live_credentials_of_its_own_org,
    introspection_callers_need_tokens_verify,
    verification_is_not_rate_limited,
    forward_auth_answers_with_identity_headers,
    whoami_describes_the_caller,
    cached_verifications_die_with_their_credential,
);

/// In a store outage every uncached verification fails: the failures are logged a line a second
/// (saying how many were left out), not a line each, so the log does not flood while the caches
/// go on serving.
#[tokio::test]
async fn verification_failures_in_an_outage_are_logged_a_line_a_second() {
    let (app, store) = FaultyStore::spawn(Backend::Sqlite, test_config()).await;
    let org = app.create_org("acme").await;
    let tokens: Vec<String> = {
        let mut made = Vec::new();
        for i in 0..20 {
            let created = app.create_token(&org, &format!("t{i}"), &[]).await;
            made.push(created["token"].as_str().unwrap().to_string());
        }
        made
    };
    store.set_down(true);
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let started = std::time::Instant::now();
    for (i, token) in tokens.iter().enumerate() {
        let answer = app
            .request(Method::GET, "/v1/auth/forward", Some(token))
            .header("x-request-id", format!("{marker}-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 503);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let lines = crate::logs::captured()
        .lines()
        .filter(|line| line.contains(&marker) && line.contains("request failed"))
        .count() as u64;
    assert!(
        lines <= seconds + 1,
        "{lines} failure lines for 20 failed verifications in under {seconds} s"
    );
}

/// A verification its client gives up on before the answer (a proxy's timeout while the store
/// is slow) is still counted, as `499`, and timed: the slowest requests do not vanish from the
/// metrics exactly when something is slow.
#[tokio::test]
async fn a_verification_given_up_by_its_client_is_counted() {
    let (app, store) = FaultyStore::spawn(Backend::Sqlite, test_config()).await;
    let org = app.create_org("acme").await;
    let token = app.create_token(&org, "slow", &[]).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    store.fail_lookups_after(Duration::from_millis(1500));
    store.set_down(true);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let given_up = impatient
        .get(format!("{}/v1/auth/forward", app.base))
        .bearer_auth(&token)
        .send()
        .await;
    assert!(given_up.is_err(), "answered within 200 ms: {given_up:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counted =
        r#"keyplane_http_requests_total{method="GET",route="/v1/auth/forward",status="499"} 1"#;
    let text = app.metrics().await;
    assert!(text.contains(counted), "{text}");
}
