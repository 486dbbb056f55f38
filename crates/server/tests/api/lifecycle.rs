//! The credential lifecycle: rotation with a grace period (and its usage-aware cutover),
//! suspension, the tenant's credential policy, expiry warnings, and the service-account loose
//! ends, on every surface. Time is moved with the server's test clock, never slept through.

use crate::helpers::{assert_error, both_backends, fields, test_config, Org, TestApp};
use keyplane_server::config::Clock;
use keyplane_store::testing::Backend;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use std::time::Duration;

both_backends!(
    a_grace_rotation_keeps_both_secrets_working_until_it_ends,
    rotating_again_during_grace_ends_the_earlier_previous_secret,
    retire_previous_ends_the_old_secret_now,
    an_unused_previous_secret_is_retired_early,
    the_cutover_pages_past_secrets_it_may_not_retire,
    another_tenants_candidates_do_not_hold_back_a_retirement,
    rotation_bodies_are_validated,
    suspension_stops_a_token_everywhere_and_resume_restores_it,
    service_accounts_rotate_with_grace_and_suspend,
    revoking_a_service_account_revokes_its_grants,
    only_a_usable_service_account_receives_grants,
    robots_log_in_with_the_previous_secret_during_grace_only,
    the_policy_bounds_creates_and_rotations,
    a_default_lifetime_is_for_creates_not_rotations,
    a_policy_without_a_default_lifetime_still_lets_the_registry_be_enabled,
    the_policy_needs_an_owner_and_checks_its_body,
    a_policy_put_again_with_the_same_values_records_nothing,
    expiry_warnings_go_out_once_per_stage,
    a_sweep_racing_a_create_announces_the_stage_reached,
    lists_filter_what_is_about_to_expire,
);

/// A test server whose clock the test moves.
async fn spawn(backend: Backend) -> (TestApp, Clock) {
    let config = test_config();
    let clock = config.clock.clone();
    (TestApp::spawn_with(backend, config).await, clock)
}

async fn ok(res: Response, status: u16, what: &str) -> Value {
    let code = res.status();
    let body = res.text().await.unwrap();
    assert_eq!(code, status, "{what}: {body}");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

fn text(value: &Value, key: &str) -> String {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {value}"))
        .to_string()
}

async fn forward(app: &TestApp, token: &str) -> Response {
    app.request(Method::GET, "/v1/auth/forward", Some(token))
        .send()
        .await
        .unwrap()
}

async fn introspect(app: &TestApp, caller: &str, token: &str) -> Value {
    let res = app
        .request(Method::POST, "/oauth2/introspect", Some(caller))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    ok(res, 200, "introspection").await
}

/// The token's view once the uses made so far have reached the store (`last_used_at` lags by the
/// flush period, and a background flush may be writing when the test's own one finds nothing).
async fn used(app: &TestApp, org: &Org, id: &str, fields: &[&str]) -> Value {
    app.app.flush_usage().await;
    for _ in 0..100 {
        let view = ok(
            app.get(&org.path(&format!("/api-tokens/{id}")), &org.token)
                .await,
            200,
            "get",
        )
        .await;
        if fields.iter().all(|field| view[*field].is_string()) {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the uses of {id} were not recorded: {fields:?}");
}

async fn rotate(app: &TestApp, path: &str, token: &str, body: Value) -> Value {
    ok(app.post(path, token, body).await, 200, "rotation").await
}

fn assert_close(at: &Value, expected: chrono::DateTime<chrono::Utc>, what: &str) {
    let at: chrono::DateTime<chrono::Utc> = at
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a timestamp: {at}"))
        .parse()
        .unwrap();
    let off = (at - expected).num_seconds().abs();
    assert!(off <= 5, "{what}: {at} is not about {expected}");
}

/// Rotation with `grace_seconds`: during the grace period both secrets authenticate on every
/// path (management API, forward-auth, introspection, whoami), and verification says which one
/// was used; after it, the old one is refused everywhere and the record shows no previous secret.
async fn a_grace_rotation_keeps_both_secrets_working_until_it_ends(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let verifier = app.create_token(&org, "verifier", &["tokens:verify"]).await;
    let verifier = text(&verifier, "token");
    let created = app
        .create_token(&org, "deployer", &["api_tokens:read"])
        .await;
    let (id, old) = (text(&created, "id"), text(&created, "token"));
    assert!(created["previous_secret_expires_at"].is_null());
    assert!(created["previous_secret_last_used_at"].is_null());
    assert!(created["suspended_at"].is_null());
    assert_eq!(forward(&app, &old).await.status(), 200, "warm the cache");

    let path = org.path(&format!("/api-tokens/{id}/rotate"));
    let rotated = rotate(&app, &path, &org.token, json!({"grace_seconds": 3600})).await;
    let new = text(&rotated, "token");
    assert_ne!(new, old);
    assert_eq!(rotated["id"], id.as_str());
    assert_close(
        &rotated["previous_secret_expires_at"],
        chrono::Utc::now() + chrono::TimeDelta::seconds(3600),
        "previous_secret_expires_at",
    );

    for (secret, which) in [(&old, "previous"), (&new, "current")] {
        let res = forward(&app, secret).await;
        assert_eq!(res.status(), 200, "{which} secret at forward-auth");
        assert_eq!(res.headers()["x-keyplane-secret"], which);
        let me = ok(
            app.get("/v1/whoami", secret).await,
            200,
            "whoami during grace",
        )
        .await;
        assert_eq!(me["secret"], which);
        let answer = introspect(&app, &verifier, secret).await;
        assert_eq!(answer["active"], true, "{which}: {answer}");
        assert_eq!(answer["secret"], which);
        assert_eq!(answer["sub"], id.as_str());
        // A verifier caching the answer must not take the old secret past its grace end.
        let grace_end = chrono::DateTime::parse_from_rfc3339(
            rotated["previous_secret_expires_at"].as_str().unwrap(),
        )
        .unwrap();
        let exp = (which == "previous").then(|| grace_end.timestamp());
        assert_eq!(answer["exp"].as_i64(), exp, "{which}: {answer}");
        let listed = app.get(&org.path("/api-tokens"), secret).await;
        assert_eq!(listed.status(), 200, "{which} secret on the management API");
    }

    // The previous secret's own last use is recorded apart from the current one's.
    let view = used(
        &app,
        &org,
        &id,
        &["previous_secret_last_used_at", "last_used_at"],
    )
    .await;
    assert!(view["previous_secret_last_used_at"].is_string(), "{view}");

    clock.advance(Duration::from_secs(3601));
    assert_eq!(forward(&app, &old).await.status(), 401, "after the grace");
    assert_eq!(
        app.get(&org.path("/api-tokens"), &old).await.status(),
        401,
        "old secret on the management API after the grace"
    );
    assert_eq!(
        app.get("/v1/whoami", &old).await.status(),
        401,
        "whoami after the grace"
    );
    assert_eq!(introspect(&app, &verifier, &old).await["active"], false);
    assert_eq!(forward(&app, &new).await.status(), 200);
    let view = ok(
        app.get(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await,
        200,
        "get after grace",
    )
    .await;
    assert!(view["previous_secret_expires_at"].is_null(), "{view}");
    assert!(view["previous_secret_last_used_at"].is_null(), "{view}");

    let rotations = app.audit_events(&org, "api_token.rotated").await;
    assert_eq!(rotations.len(), 1);
    assert_eq!(rotations[0]["details"]["grace_seconds"], 3600);
    assert!(rotations[0]["details"]["previous_secret_expires_at"].is_string());
}

/// At most two live secrets: a rotation during a grace period ends the earlier previous secret.
async fn rotating_again_during_grace_ends_the_earlier_previous_secret(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "t", &[]).await;
    let (id, first) = (text(&created, "id"), text(&created, "token"));
    let path = org.path(&format!("/api-tokens/{id}/rotate"));
    let second = text(
        &rotate(&app, &path, &org.token, json!({"grace_seconds": 600})).await,
        "token",
    );
    assert_eq!(forward(&app, &first).await.status(), 200);
    let third = text(
        &rotate(&app, &path, &org.token, json!({"grace_seconds": 600})).await,
        "token",
    );
    assert_eq!(forward(&app, &first).await.status(), 401, "the first ended");
    assert_eq!(forward(&app, &second).await.status(), 200, "now previous");
    assert_eq!(forward(&app, &third).await.status(), 200, "current");
    let rotations = app.audit_events(&org, "api_token.rotated").await;
    // Newest first: [0] is the second rotation.
    assert_eq!(rotations[0]["details"]["earlier_previous_secret"], "ended");

    // Without a grace period (no body at all, the documented call) the old secret stops at once.
    let fourth = text(
        &ok(app.post_empty(&path, &org.token).await, 200, "bare rotate").await,
        "token",
    );
    for ended in [&second, &third] {
        assert_eq!(forward(&app, ended).await.status(), 401);
    }
    assert_eq!(forward(&app, &fourth).await.status(), 200);
}

async fn retire_previous_ends_the_old_secret_now(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "t", &[]).await;
    let (id, old) = (text(&created, "id"), text(&created, "token"));
    let new = text(
        &rotate(
            &app,
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({"grace_seconds": 3600}),
        )
        .await,
        "token",
    );
    assert_eq!(forward(&app, &old).await.status(), 200);
    let retire = org.path(&format!("/api-tokens/{id}/retire-previous"));
    let view = ok(
        app.post_empty(&retire, &org.token).await,
        200,
        "retire-previous",
    )
    .await;
    assert!(view["previous_secret_expires_at"].is_null(), "{view}");
    assert!(view.get("token").is_none(), "no secret in the answer");
    assert_eq!(forward(&app, &old).await.status(), 401);
    assert_eq!(forward(&app, &new).await.status(), 200);
    // Again: nothing left to retire, nothing recorded.
    ok(app.post_empty(&retire, &org.token).await, 200, "again").await;
    let retired = app
        .audit_events(&org, "api_token.previous_secret_retired")
        .await;
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0]["details"]["reason"], "on_demand");
    assert_eq!(retired[0]["target"]["id"], id.as_str());
    // Unknown and cross-tenant ids are 404.
    let other = app.create_org("other").await;
    assert_error(
        app.post_empty(
            &other.path(&format!("/api-tokens/{id}/retire-previous")),
            &other.token,
        )
        .await,
        404,
        "not_found",
    )
    .await;
}

/// `retire_when_unused_seconds`: once the new secret has been used and the old one has not been
/// presented for that long, the sweep retires it; not before the new one is used, and not while
/// the old one is still in use, even by a use not yet written to the store.
async fn an_unused_previous_secret_is_retired_early(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "t", &[]).await;
    let (id, old) = (text(&created, "id"), text(&created, "token"));
    let new = text(
        &rotate(
            &app,
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({"grace_seconds": 86400, "retire_when_unused_seconds": 600}),
        )
        .await,
        "token",
    );
    let sweep = || async {
        keyplane_server::ops::lifecycle_sweep(&app.app)
            .await
            .expect("sweep")
    };
    // Unused for long, but the new secret has not been used yet: the old one stays.
    clock.advance(Duration::from_secs(601));
    sweep().await;
    assert_eq!(forward(&app, &old).await.status(), 200, "new one unused");
    // Both in use: the old one was just presented.
    assert_eq!(forward(&app, &new).await.status(), 200);
    used(
        &app,
        &org,
        &id,
        &["previous_secret_last_used_at", "last_used_at"],
    )
    .await;
    clock.advance(Duration::from_secs(300));
    sweep().await;
    assert_eq!(forward(&app, &old).await.status(), 200, "used 300 s ago");
    // 601 s after the last use the store holds, but 301 s after that one, which this replica has
    // not written yet (its periodic flush has not run; the test drives it): still in use.
    clock.advance(Duration::from_secs(301));
    sweep().await;
    assert_eq!(forward(&app, &old).await.status(), 200, "used 301 s ago");
    // Quiet for 606 s after its last use: the 600 asked and what the cutover allows for other
    // replicas' uses written late or dated by a clock behind (a flush interval and
    // --max-clock-skew-seconds): retired.
    clock.advance(Duration::from_secs(606));
    sweep().await;
    assert_eq!(forward(&app, &old).await.status(), 401, "retired as unused");
    assert_eq!(forward(&app, &new).await.status(), 200);
    let retired = app
        .audit_events(&org, "api_token.previous_secret_retired")
        .await;
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert_eq!(retired[0]["details"]["reason"], "unused");
    assert_eq!(retired[0]["actor"]["type"], "system");
}

/// The sweep reads retirement candidates a page at a time (here 2), skipping previous secrets
/// that asked for no usage-aware cutover even when they end sooner, and reads every page: each
/// of the later-ending unused secrets is retired.
async fn the_cutover_pages_past_secrets_it_may_not_retire(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let rotate_token = |id: String, body: Value| {
        let path = org.path(&format!("/api-tokens/{id}/rotate"));
        let app = &app;
        let token = org.token.clone();
        async move { text(&rotate(app, &path, &token, body).await, "token") }
    };
    // Soonest-ending, and not to be retired when unused.
    for i in 0..3 {
        let id = text(
            &app.create_token(&org, &format!("kept{i}"), &[]).await,
            "id",
        );
        rotate_token(id, json!({"grace_seconds": 3600})).await;
    }
    let mut retiring = Vec::new();
    for i in 0..3 {
        let created = app.create_token(&org, &format!("retiring{i}"), &[]).await;
        let (id, old) = (text(&created, "id"), text(&created, "token"));
        let new = rotate_token(
            id.clone(),
            json!({"grace_seconds": 86400, "retire_when_unused_seconds": 600}),
        )
        .await;
        assert_eq!(forward(&app, &new).await.status(), 200);
        retiring.push((id, old));
    }
    for (id, _) in &retiring {
        used(&app, &org, id, &["last_used_at"]).await;
    }
    // 600 s, and the cutover's allowance for other replicas' late uses (a flush interval and the
    // clock skew limit).
    clock.advance(Duration::from_secs(606));
    keyplane_server::ops::lifecycle_sweep_in_pages(&app.app, 2)
        .await
        .expect("sweep");
    for (id, old) in &retiring {
        assert_eq!(forward(&app, old).await.status(), 401, "{id} retired");
    }
    let retired = app
        .audit_events(&org, "api_token.previous_secret_retired")
        .await;
    assert_eq!(retired.len(), 3, "{retired:?}");
}

/// One sweep reads a bounded number of candidates; the next continues where it stopped, so
/// another tenant's many candidates ending sooner (here more than one sweep reads, each still
/// in its retire window) cannot keep a due retirement waiting until the grace period ends.
async fn another_tenants_candidates_do_not_hold_back_a_retirement(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let busy = app.create_org("busy").await;
    let quiet = app.create_org("quiet").await;
    // A token rotated with `body` whose new secret was used: a candidate. Its old secret.
    async fn candidate(app: &TestApp, org: &Org, name: &str, body: Value) -> String {
        let created = app.create_token(org, name, &[]).await;
        let (id, old) = (text(&created, "id"), text(&created, "token"));
        let path = org.path(&format!("/api-tokens/{id}/rotate"));
        let new = text(&rotate(app, &path, &org.token, body).await, "token");
        assert_eq!(forward(app, &new).await.status(), 200);
        used(app, org, &id, &["last_used_at"]).await;
        old
    }
    // Pages of one and 20 pages per sweep: 25 candidates ending sooner, each still in its retire
    // window, are more than a sweep reads.
    for i in 0..25 {
        let body = json!({"grace_seconds": 3600, "retire_when_unused_seconds": 3000});
        candidate(&app, &busy, &format!("t{i}"), body).await;
    }
    let body = json!({"grace_seconds": 86400, "retire_when_unused_seconds": 600});
    let old = candidate(&app, &quiet, "t", body).await;
    // 600 s, and the cutover's allowance for other replicas' late uses.
    clock.advance(Duration::from_secs(606));
    for _ in 0..3 {
        keyplane_server::ops::lifecycle_sweep_in_pages(&app.app, 1)
            .await
            .expect("sweep");
    }
    assert_eq!(forward(&app, &old).await.status(), 401, "retired as unused");
    let retired = app
        .audit_events(&quiet, "api_token.previous_secret_retired")
        .await;
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert!(
        app.audit_events(&busy, "api_token.previous_secret_retired")
            .await
            .is_empty(),
        "the busy tenant's are still in their retire window"
    );
}

async fn rotation_bodies_are_validated(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "t", &[]).await;
    let (id, old) = (text(&created, "id"), text(&created, "token"));
    let path = org.path(&format!("/api-tokens/{id}/rotate"));
    for (body, field, code) in [
        (
            json!({"grace_seconds": 604801}),
            "grace_seconds",
            "out_of_range",
        ),
        (
            json!({"grace_seconds": -1}),
            "grace_seconds",
            "out_of_range",
        ),
        (
            json!({"grace_seconds": "60"}),
            "grace_seconds",
            "invalid_type",
        ),
        (
            json!({"retire_when_unused_seconds": 60}),
            "retire_when_unused_seconds",
            "invalid_format",
        ),
        (
            json!({"grace_seconds": 60, "retire_when_unused_seconds": 0}),
            "retire_when_unused_seconds",
            "out_of_range",
        ),
        // The grace period ends before it could go unused that long: it would never retire.
        (
            json!({"grace_seconds": 600, "retire_when_unused_seconds": 600}),
            "retire_when_unused_seconds",
            "out_of_range",
        ),
        (
            json!({"grace_seconds": 600, "retire_when_unused_seconds": 3600}),
            "retire_when_unused_seconds",
            "out_of_range",
        ),
        (json!({"grace": 60}), "grace", "unknown_field"),
        (
            json!({"expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
            "in_the_past",
        ),
    ] {
        let details = assert_error(
            app.post(&path, &org.token, body.clone()).await,
            422,
            "validation_failed",
        )
        .await;
        let got = fields(&details);
        assert_eq!(got[0].0, field, "{body}: {got:?}");
        if code != "in_the_past" {
            assert_eq!(got[0].1, code, "{body}: {got:?}");
        }
    }
    // A body that is not JSON is refused, and nothing changed.
    let res = app
        .request(Method::POST, &path, Some(&org.token))
        .header("content-type", "text/plain")
        .body("grace_seconds=60")
        .send()
        .await
        .unwrap();
    assert_error(res, 415, "unsupported_media_type").await;
    assert_eq!(forward(&app, &old).await.status(), 200, "not rotated");
    // A new expiry may be set with the rotation.
    let rotated = rotate(
        &app,
        &path,
        &org.token,
        json!({"expires_at": "2031-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(rotated["expires_at"], "2031-01-01T00:00:00Z");
}

/// Suspension: 401 everywhere, `active: false`, the record keeps everything; resume restores it.
/// Repeats change nothing; both are audited once; it needs what revoking needs.
async fn suspension_stops_a_token_everywhere_and_resume_restores_it(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let verifier = text(
        &app.create_token(&org, "verifier", &["tokens:verify"]).await,
        "token",
    );
    let created = app.create_token(&org, "ci", &["api_tokens:read"]).await;
    let (id, token) = (text(&created, "id"), text(&created, "token"));
    assert_eq!(forward(&app, &token).await.status(), 200, "warm the cache");

    let suspend = org.path(&format!("/api-tokens/{id}/suspend"));
    let view = ok(app.post_empty(&suspend, &org.token).await, 200, "suspend").await;
    assert!(view["suspended_at"].is_string(), "{view}");
    assert_eq!(view["scopes"], json!(["api_tokens:read"]));
    assert_eq!(forward(&app, &token).await.status(), 401);
    assert_eq!(app.get("/v1/whoami", &token).await.status(), 401);
    assert_eq!(
        app.get(&org.path("/api-tokens"), &token).await.status(),
        401
    );
    assert_eq!(introspect(&app, &verifier, &token).await["active"], false);
    // Still listed, with its id and scopes; suspending again changes nothing.
    let again = ok(app.post_empty(&suspend, &org.token).await, 200, "again").await;
    assert_eq!(again["suspended_at"], view["suspended_at"]);
    let listed = ok(
        app.get(&org.path("/api-tokens"), &org.token).await,
        200,
        "list",
    )
    .await;
    assert!(listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == id.as_str() && t["suspended_at"].is_string()));

    // Managing it needs what revoking needs: a write token without its scope may not.
    let writer = text(
        &app.create_token(&org, "writer", &["api_tokens:write"])
            .await,
        "token",
    );
    assert_error(
        app.post_empty(&org.path(&format!("/api-tokens/{id}/resume")), &writer)
            .await,
        403,
        "forbidden",
    )
    .await;
    let resumed = ok(
        app.post_empty(&org.path(&format!("/api-tokens/{id}/resume")), &org.token)
            .await,
        200,
        "resume",
    )
    .await;
    assert!(resumed["suspended_at"].is_null());
    assert_eq!(forward(&app, &token).await.status(), 200, "the same secret");
    ok(
        app.post_empty(&org.path(&format!("/api-tokens/{id}/resume")), &org.token)
            .await,
        200,
        "resume again",
    )
    .await;
    assert_eq!(app.audit_events(&org, "api_token.suspended").await.len(), 1);
    assert_eq!(app.audit_events(&org, "api_token.resumed").await.len(), 1);

    // A suspended token can be rotated (and stays suspended).
    ok(app.post_empty(&suspend, &org.token).await, 200, "suspend").await;
    let rotated = rotate(
        &app,
        &org.path(&format!("/api-tokens/{id}/rotate")),
        &org.token,
        json!({}),
    )
    .await;
    assert!(rotated["suspended_at"].is_string());
    assert_eq!(
        forward(&app, &text(&rotated, "token")).await.status(),
        401,
        "still suspended"
    );
    // An expired token stays expired: suspending it first does not let a rotation with a new
    // expiry bring it back.
    let soon = (chrono::Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    let expiring = ok(
        app.post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "short", "expires_at": soon}),
        )
        .await,
        201,
        "create",
    )
    .await;
    let expiring = text(&expiring, "id");
    ok(
        app.post_empty(
            &org.path(&format!("/api-tokens/{expiring}/suspend")),
            &org.token,
        )
        .await,
        200,
        "suspend",
    )
    .await;
    clock.advance(Duration::from_secs(7200));
    assert_error(
        app.post(
            &org.path(&format!("/api-tokens/{expiring}/rotate")),
            &org.token,
            json!({"expires_at": "2031-01-01T00:00:00Z"}),
        )
        .await,
        409,
        "conflict",
    )
    .await;

    // Revoked: gone, as for any Aether call.
    assert_eq!(
        app.delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await
            .status(),
        204
    );
    assert_error(app.post_empty(&suspend, &org.token).await, 404, "not_found").await;
}

async fn service_account(app: &TestApp, org: &Org, name: &str, body: Value) -> (String, String) {
    let mut body = body;
    body["name"] = json!(name);
    let created = ok(
        app.post(&org.account_path("/service-accounts"), &org.token, body)
            .await,
        201,
        "create service account",
    )
    .await;
    (text(&created, "id"), text(&created, "token"))
}

async fn grant(app: &TestApp, org: &Org, subject: &str, capability: &str) -> Response {
    app.post(
        &org.account_path("/authorizations"),
        &org.token,
        json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": subject, "capability_key": capability}),
    )
    .await
}

async fn service_accounts_rotate_with_grace_and_suspend(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let (id, old) = service_account(&app, &org, "svc", json!({})).await;
    assert_eq!(grant(&app, &org, &id, "deploy").await.status(), 201);
    let rotated = ok(
        app.post(
            &org.account_path(&format!("/service-accounts/{id}/rotate")),
            &org.token,
            json!({"grace_seconds": 120}),
        )
        .await,
        200,
        "rotate",
    )
    .await;
    let new = text(&rotated, "token");
    assert!(rotated["previous_secret_expires_at"].is_string());
    for secret in [&old, &new] {
        let res = app
            .request(Method::GET, "/v1/auth/forward?scope=deploy", Some(secret))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "both tokens keep the grants");
    }
    clock.advance(Duration::from_secs(121));
    assert_eq!(forward(&app, &old).await.status(), 401);

    let suspended = ok(
        app.post_empty(
            &org.account_path(&format!("/service-accounts/{id}/suspend")),
            &org.token,
        )
        .await,
        200,
        "suspend",
    )
    .await;
    assert!(suspended["suspended_at"].is_string());
    assert!(suspended["revoked_at"].is_null());
    assert_eq!(forward(&app, &new).await.status(), 401);
    ok(
        app.post_empty(
            &org.account_path(&format!("/service-accounts/{id}/resume")),
            &org.token,
        )
        .await,
        200,
        "resume",
    )
    .await;
    assert_eq!(forward(&app, &new).await.status(), 200, "grants kept");
    // retire-previous without a previous token: the record, unchanged.
    let same = ok(
        app.post_empty(
            &org.account_path(&format!("/service-accounts/{id}/retire-previous")),
            &org.token,
        )
        .await,
        200,
        "retire-previous",
    )
    .await;
    assert!(same["previous_secret_expires_at"].is_null());
    // Revoked: 409 in the Hybridbox dialect.
    ok(
        app.delete(
            &org.account_path(&format!("/service-accounts/{id}")),
            &org.token,
        )
        .await,
        200,
        "revoke",
    )
    .await;
    let res = app
        .post_empty(
            &org.account_path(&format!("/service-accounts/{id}/suspend")),
            &org.token,
        )
        .await;
    let body = ok(res, 409, "suspend revoked").await;
    assert!(body["detail"].is_string(), "{body}");
    assert_eq!(
        app.audit_events(&org, "service_account.suspended")
            .await
            .len(),
        1
    );
}

async fn revoking_a_service_account_revokes_its_grants(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let (id, _) = service_account(&app, &org, "svc", json!({})).await;
    let (other, _) = service_account(&app, &org, "other", json!({})).await;
    let mut grant_ids = Vec::new();
    for (subject, capability) in [(&id, "deploy"), (&id, "audit:read"), (&other, "deploy")] {
        let granted = ok(grant(&app, &org, subject, capability).await, 201, "grant").await;
        if subject == &id {
            grant_ids.push(text(&granted, "id"));
        }
    }
    let revoked = ok(
        app.delete(
            &org.account_path(&format!("/service-accounts/{id}")),
            &org.token,
        )
        .await,
        200,
        "revoke",
    )
    .await;
    let listed = ok(
        app.get(
            &org.account_path("/authorizations?include_revoked=true"),
            &org.token,
        )
        .await,
        200,
        "grants",
    )
    .await;
    let grants = listed.as_array().unwrap();
    let of = |subject: &str| {
        grants
            .iter()
            .filter(|g| g["subject_id"] == subject)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of(&id).len(), 2);
    for g in of(&id) {
        assert_eq!(g["revoked_at"], revoked["revoked_at"], "same instant: {g}");
    }
    assert!(
        of(&other)[0]["revoked_at"].is_null(),
        "other account's grant"
    );
    let live = ok(
        app.get(&org.account_path("/authorizations"), &org.token)
            .await,
        200,
        "live grants",
    )
    .await;
    assert!(live
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["subject_id"] != id.as_str()));

    // Each grant's revocation is on the record, by the same caller in the same request.
    let account_revoked = app.audit_events(&org, "service_account.revoked").await;
    assert_eq!(account_revoked.len(), 1, "{account_revoked:?}");
    let cause = &account_revoked[0];
    let events = app.audit_events(&org, "authorization.revoked").await;
    let mut targets: Vec<String> = events.iter().map(|e| text(&e["target"], "id")).collect();
    targets.sort();
    grant_ids.sort();
    assert_eq!(targets, grant_ids, "{events:?}");
    for event in &events {
        assert_eq!(event["actor"], cause["actor"], "{event}");
        assert_eq!(event["request_id"], cause["request_id"], "{event}");
        assert_eq!(event["details"]["subject_id"], id.as_str(), "{event}");
        assert!(event["seq"].as_u64() > cause["seq"].as_u64(), "{event}");
    }
    let by_target = ok(
        app.get(
            &org.path(&format!(
                "/audit-events?action=authorization.revoked&target_id={}",
                grant_ids[0]
            )),
            &org.token,
        )
        .await,
        200,
        "events of one grant",
    )
    .await;
    assert_eq!(by_target["items"].as_array().unwrap().len(), 1);
}

/// An expired, suspended or revoked service account cannot receive a grant (409); an unknown one
/// is a field error as before.
async fn only_a_usable_service_account_receives_grants(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let soon = (chrono::Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    let (expiring, _) = service_account(&app, &org, "expiring", json!({"expires_at": soon})).await;
    let (suspended, _) = service_account(&app, &org, "suspended", json!({})).await;
    let (revoked, _) = service_account(&app, &org, "revoked", json!({})).await;
    ok(
        app.post_empty(
            &org.account_path(&format!("/service-accounts/{suspended}/suspend")),
            &org.token,
        )
        .await,
        200,
        "suspend",
    )
    .await;
    ok(
        app.delete(
            &org.account_path(&format!("/service-accounts/{revoked}")),
            &org.token,
        )
        .await,
        200,
        "revoke",
    )
    .await;
    assert_eq!(grant(&app, &org, &expiring, "deploy").await.status(), 201);
    clock.advance(Duration::from_secs(3601));
    for subject in [&expiring, &suspended, &revoked] {
        let res = grant(&app, &org, subject, "audit:read").await;
        let body = ok(res, 409, "grant to an unusable account").await;
        assert!(body["detail"].as_str().unwrap().contains("service account"));
    }
    let res = grant(&app, &org, &uuid::Uuid::new_v4().to_string(), "deploy").await;
    assert_eq!(res.status(), 422, "unknown subject");
}

async fn robot_token(app: &TestApp, username: &str, secret: &str) -> u16 {
    app.request(Method::GET, "/registry/token", None)
        .basic_auth(username, Some(secret))
        .query(&[
            ("service", "keyplane-registry"),
            ("scope", "repository:acme/app:pull"),
        ])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn robots_log_in_with_the_previous_secret_during_grace_only(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    ok(
        app.post_empty(&org.path("/registry"), &org.token).await,
        201,
        "enable registry",
    )
    .await;
    let robot = ok(
        app.post(
            &org.path("/registry/robot-accounts"),
            &org.token,
            json!({"name": "ci", "permissions": ["pull"]}),
        )
        .await,
        201,
        "robot",
    )
    .await;
    let (id, old) = (text(&robot, "id"), text(&robot, "token"));
    let user = "robot$acme+ci";
    assert_eq!(robot_token(&app, user, &old).await, 200);
    let rotated = rotate(
        &app,
        &org.path(&format!("/registry/robot-accounts/{id}/rotate")),
        &org.token,
        json!({"grace_seconds": 300}),
    )
    .await;
    let new = text(&rotated, "token");
    assert!(rotated["previous_secret_expires_at"].is_string());
    assert_eq!(robot_token(&app, user, &old).await, 200, "old during grace");
    assert_eq!(robot_token(&app, user, &new).await, 200, "new");
    clock.advance(Duration::from_secs(301));
    assert_eq!(robot_token(&app, user, &old).await, 401, "old after grace");
    assert_eq!(robot_token(&app, user, &new).await, 200);

    let robot_path = org.path(&format!("/registry/robot-accounts/{id}"));
    // The grace period is over: no view shows the previous secret's end any more.
    let updated = app
        .request(Method::PUT, &robot_path, Some(&org.token))
        .json(&json!({"permissions": ["pull", "push"]}))
        .send()
        .await
        .unwrap();
    let updated = ok(updated, 200, "update permissions").await;
    assert!(updated["previous_secret_expires_at"].is_null(), "{updated}");
    ok(
        app.post_empty(&format!("{robot_path}/suspend"), &org.token)
            .await,
        200,
        "suspend robot",
    )
    .await;
    assert_eq!(robot_token(&app, user, &new).await, 401, "suspended");
    let view = ok(app.get(&robot_path, &org.token).await, 200, "get robot").await;
    assert!(view["suspended_at"].is_string());
    ok(
        app.post_empty(&format!("{robot_path}/resume"), &org.token)
            .await,
        200,
        "resume robot",
    )
    .await;
    assert_eq!(robot_token(&app, user, &new).await, 200, "resumed");
    assert_eq!(
        app.audit_events(&org, "robot_account.suspended")
            .await
            .len(),
        1
    );
}

pub(crate) async fn put_policy(app: &TestApp, org: &Org, body: Value) -> Value {
    ok(
        app.request(
            Method::PUT,
            &org.path("/credential-policy"),
            Some(&org.token),
        )
        .json(&body)
        .send()
        .await
        .unwrap(),
        200,
        "put policy",
    )
    .await
}

/// A client whose PUT was answered 503 after it committed (or whose connection dropped) sends it
/// again: the repeat changes nothing, so it answers the same policy and records no second event
/// (which webhooks on `*` would also receive).
async fn a_policy_put_again_with_the_same_values_records_nothing(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let body = json!({"api_tokens": {"max_lifetime_days": 5}, "on_leak": "suspend"});
    let first = put_policy(&app, &org, body.clone()).await;
    let again = put_policy(&app, &org, body).await;
    assert_eq!(first, again);
    let events = app.audit_events(&org, "credential_policy.updated").await;
    assert_eq!(events.len(), 1, "{events:?}");
    // Absent fields take their defaults: the same policy spelled out is the same policy.
    put_policy(
        &app,
        &org,
        json!({"api_tokens": {"max_lifetime_days": 5, "require_expiry": false}, "on_leak": "suspend"}),
    )
    .await;
    assert_eq!(
        app.audit_events(&org, "credential_policy.updated")
            .await
            .len(),
        1
    );
    // A real change is still recorded.
    put_policy(&app, &org, json!({"on_leak": "suspend"})).await;
    assert_eq!(
        app.audit_events(&org, "credential_policy.updated")
            .await
            .len(),
        2
    );
}

async fn the_policy_bounds_creates_and_rotations(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    // Before any policy: the default, which asks nothing.
    let policy = ok(
        app.get(&org.path("/credential-policy"), &org.token).await,
        200,
        "get policy",
    )
    .await;
    assert!(policy["updated_at"].is_null());
    assert_eq!(policy["all"]["require_expiry"], false);
    assert_eq!(policy["on_leak"], "revoke");
    // Credentials made before the policy are counted, not changed.
    let forever = app.create_token(&org, "forever", &[]).await;
    let far = (chrono::Utc::now() + chrono::TimeDelta::days(200)).to_rfc3339();
    ok(
        app.post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "far", "expires_at": far}),
        )
        .await,
        201,
        "far",
    )
    .await;

    let policy = put_policy(
        &app,
        &org,
        json!({"all": {"max_lifetime_days": 90, "require_expiry": true},
               "robot_accounts": {"default_lifetime_days": 10}}),
    )
    .await;
    assert!(policy["updated_at"].is_string());
    assert_eq!(policy["all"]["max_lifetime_days"], 90);
    assert!(policy["api_tokens"].is_null());
    assert_eq!(policy["robot_accounts"]["default_lifetime_days"], 10);
    // The bootstrap token, "forever" and "far" break it.
    assert_eq!(policy["exceeding"]["api_tokens"], 3, "{policy}");
    assert_eq!(policy["exceeding"]["service_accounts"], 0);

    // No expiry and no default: refused, naming the policy.
    let details = assert_error(
        app.post(&org.path("/api-tokens"), &org.token, json!({"name": "x"}))
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        fields(&details),
        [("expires_at".to_string(), "policy_violation".to_string())]
    );
    assert!(details[0]["message"]
        .as_str()
        .unwrap()
        .contains("credential policy"));
    let too_far = (chrono::Utc::now() + chrono::TimeDelta::days(91)).to_rfc3339();
    assert_error(
        app.post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "x", "expires_at": too_far}),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    let fine = (chrono::Utc::now() + chrono::TimeDelta::days(30)).to_rfc3339();
    ok(
        app.post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "x", "expires_at": fine}),
        )
        .await,
        201,
        "within the policy",
    )
    .await;
    // The Hybridbox surface says it in its own dialect.
    let res = app
        .post(
            &org.account_path("/service-accounts"),
            &org.token,
            json!({"name": "svc"}),
        )
        .await;
    let body = ok(res, 422, "service account without expiry").await;
    assert_eq!(body["detail"][0]["loc"], json!(["body", "expires_at"]));
    assert_eq!(body["detail"][0]["type"], "policy_violation");

    // Robots have their own rule: the default lifetime fills a missing expiry.
    ok(
        app.post_empty(&org.path("/registry"), &org.token).await,
        201,
        "enable registry",
    )
    .await;
    let robot = ok(
        app.post(
            &org.path("/registry/robot-accounts"),
            &org.token,
            json!({"name": "ci"}),
        )
        .await,
        201,
        "robot",
    )
    .await;
    assert_close(
        &robot["expires_at"],
        chrono::Utc::now() + chrono::TimeDelta::days(10),
        "robot default lifetime",
    );

    // Rotating a credential whose expiry breaks the policy needs a new one that fits.
    let path = org.path(&format!("/api-tokens/{}/rotate", text(&forever, "id")));
    let details = assert_error(
        app.post_empty(&path, &org.token).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(details[0]["code"], "policy_violation");
    let rotated = rotate(&app, &path, &org.token, json!({"expires_at": fine})).await;
    assert_eq!(
        rotated["expires_at"].as_str().map(|s| &s[..10]),
        Some(&fine[..10])
    );
    let policy = ok(
        app.get(&org.path("/credential-policy"), &org.token).await,
        200,
        "get policy",
    )
    .await;
    assert_eq!(policy["exceeding"]["api_tokens"], 2, "{policy}");

    let updates = app.audit_events(&org, "credential_policy.updated").await;
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["target"]["type"], "credential_policy");
}

/// A policy's default lifetime fills a create's missing expiry; a rotation keeps the credential's
/// own, none included, unless the policy requires or bounds expiries.
async fn a_default_lifetime_is_for_creates_not_rotations(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let open = app.create_token(&org, "open", &[]).await;
    assert!(open["expires_at"].is_null());
    put_policy(&app, &org, json!({"all": {"default_lifetime_days": 30}})).await;
    let created = app.create_token(&org, "new", &[]).await;
    assert_close(
        &created["expires_at"],
        chrono::Utc::now() + chrono::TimeDelta::days(30),
        "a create gets the default lifetime",
    );
    let path = org.path(&format!("/api-tokens/{}/rotate", text(&open, "id")));
    let rotated = rotate(&app, &path, &org.token, json!({})).await;
    assert!(
        rotated["expires_at"].is_null(),
        "a rotation keeps no expiry: {}",
        rotated["expires_at"]
    );
    // Once the policy requires an expiry, a rotation without one gets the default.
    put_policy(
        &app,
        &org,
        json!({"all": {"default_lifetime_days": 30, "require_expiry": true}}),
    )
    .await;
    let rotated = rotate(&app, &path, &org.token, json!({})).await;
    assert_close(
        &rotated["expires_at"],
        chrono::Utc::now() + chrono::TimeDelta::days(30),
        "a required expiry is filled in",
    );
}

/// The default robot has no caller to choose its expiry: under a policy that bounds or requires
/// expiries but names no default lifetime, it gets the latest expiry the policy allows.
async fn a_policy_without_a_default_lifetime_still_lets_the_registry_be_enabled(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    for (name, rule, days) in [
        ("bounded", json!({"max_lifetime_days": 90}), 90),
        ("required", json!({"require_expiry": true}), 36_500),
    ] {
        let org = app.create_org(name).await;
        put_policy(&app, &org, json!({ "all": rule })).await;
        ok(
            app.post_empty(&org.path("/registry"), &org.token).await,
            201,
            &format!("enable registry under the {name} policy"),
        )
        .await;
        let robots = ok(
            app.get(&org.path("/registry/robot-accounts"), &org.token)
                .await,
            200,
            "robots",
        )
        .await;
        assert_close(
            &robots["items"][0]["expires_at"],
            chrono::Utc::now() + chrono::TimeDelta::days(days),
            &format!("default robot's expiry under the {name} policy"),
        );
    }
}

async fn the_policy_needs_an_owner_and_checks_its_body(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let writer = text(
        &app.create_token(&org, "writer", &["api_tokens:write"])
            .await,
        "token",
    );
    assert_error(
        app.get(&org.path("/credential-policy"), &writer).await,
        403,
        "forbidden",
    )
    .await;
    assert_error(
        app.get(&org.path("/credential-policy"), &other.token).await,
        404,
        "not_found",
    )
    .await;
    for (body, field, code) in [
        (
            json!({"all": {"max_lifetime_days": 0}}),
            "all.max_lifetime_days",
            "out_of_range",
        ),
        (
            json!({"all": {"max_lifetime_days": 10, "default_lifetime_days": 11}}),
            "all.default_lifetime_days",
            "out_of_range",
        ),
        (
            json!({"all": {"max_days": 10}}),
            "all.max_days",
            "unknown_field",
        ),
        (json!({"api_tokens": "90d"}), "api_tokens", "invalid_type"),
        (json!({"on_leak": "delete"}), "on_leak", "invalid_choice"),
        (json!({"extra": true}), "extra", "unknown_field"),
        (
            json!({"robot_accounts": {"require_expiry": "yes"}}),
            "robot_accounts.require_expiry",
            "invalid_type",
        ),
    ] {
        let res = app
            .request(
                Method::PUT,
                &org.path("/credential-policy"),
                Some(&org.token),
            )
            .json(&body)
            .send()
            .await
            .unwrap();
        let details = assert_error(res, 422, "validation_failed").await;
        assert_eq!(
            fields(&details),
            [(field.to_string(), code.to_string())],
            "{body}"
        );
    }
    // Nothing was stored by the refused bodies.
    let policy = ok(
        app.get(&org.path("/credential-policy"), &org.token).await,
        200,
        "get",
    )
    .await;
    assert!(policy["updated_at"].is_null());
    // A PUT replaces the whole policy.
    put_policy(
        &app,
        &org,
        json!({"api_tokens": {"max_lifetime_days": 5}, "on_leak": "suspend"}),
    )
    .await;
    let policy = put_policy(&app, &org, json!({"all": {"require_expiry": true}})).await;
    assert!(policy["api_tokens"].is_null());
    assert_eq!(policy["on_leak"], "revoke");
    assert_eq!(policy["all"]["require_expiry"], true);
}

/// The sweep announces `credential.expiring` at 30, 7 and 1 days and `credential.expired` after,
/// each once per credential and stage: a credential found past several thresholds at once gets the
/// nearest only, a repeated sweep or another server adds nothing, and a new expiry starts over.
async fn expiry_warnings_go_out_once_per_stage(backend: Backend) {
    let (app, clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let in_days = |days: i64| {
        (chrono::Utc::now() + chrono::TimeDelta::days(days) + chrono::TimeDelta::minutes(1))
            .to_rfc3339()
    };
    let mut ids = std::collections::HashMap::new();
    for (name, days) in [("d40", 40), ("d20", 20), ("d5", 5)] {
        let created = ok(
            app.post(
                &org.path("/api-tokens"),
                &org.token,
                json!({"name": name, "expires_at": in_days(days)}),
            )
            .await,
            201,
            "create",
        )
        .await;
        ids.insert(text(&created, "id"), name);
    }
    let half_day = (chrono::Utc::now() + chrono::TimeDelta::hours(12)).to_rfc3339();
    let (sa, _) = service_account(&app, &org, "svc", json!({"expires_at": half_day})).await;
    ids.insert(sa, "svc");

    let sweep = |app: &TestApp| {
        let app = app.app.clone();
        async move {
            keyplane_server::ops::lifecycle_sweep(&app)
                .await
                .expect("sweep")
        }
    };
    // What was announced, as (name, action, days_before), in order.
    let announced = || async {
        let mut seen = Vec::new();
        for event in app.audit_events(&org, "credential.*").await {
            let name = ids[event["target"]["id"].as_str().unwrap()];
            assert_eq!(event["actor"]["type"], "system");
            seen.push((
                name,
                text(&event, "action"),
                event["details"]["days_before"].as_u64().unwrap_or(0),
            ));
        }
        seen.sort();
        seen
    };
    sweep(&app).await;
    sweep(&app).await;
    let expiring = "credential.expiring".to_string();
    let expired = "credential.expired".to_string();
    assert_eq!(
        announced().await,
        [
            ("d20", expiring.clone(), 30),
            ("d5", expiring.clone(), 7),
            ("svc", expiring.clone(), 1),
        ]
    );

    // Eleven days on: d40 enters its 30-day window, d5 and svc expire; d20 (9 days left) stays.
    clock.advance(Duration::from_secs(11 * 86400));
    // A restarted server (another process on the same store) and this one, at the same time.
    let restarted = app.replica().await;
    tokio::join!(sweep(&app), sweep(&restarted), sweep(&app));
    assert_eq!(
        announced().await,
        [
            ("d20", expiring.clone(), 30),
            ("d40", expiring.clone(), 30),
            ("d5", expired.clone(), 0),
            ("d5", expiring.clone(), 7),
            ("svc", expired.clone(), 0),
            ("svc", expiring.clone(), 1),
        ]
    );
    // The oldest (the list is newest first).
    let expired_events = app.audit_events(&org, "credential.expired").await;
    let event = expired_events.last().expect("a credential.expired event");
    assert!(event["details"]["expires_at"].is_string(), "{event}");
    assert!(event["details"]["kind"].is_string(), "{event}");
    // Three more days: d20 reaches 7 days.
    clock.advance(Duration::from_secs(3 * 86400));
    sweep(&restarted).await;
    assert_eq!(announced().await.len(), 7);
}

/// A credential created while a sweep is between stages is found by a further stage's query
/// (30 days) than the one it has reached (7): it is announced at 7, once, as if the sweep had seen
/// it from the start. (The server's own sweep at start-up raced the test's creates this way.)
async fn a_sweep_racing_a_create_announces_the_stage_reached(backend: Backend) {
    let (app, switch) = crate::faulty_store::FaultyStore::spawn(backend, test_config()).await;
    let org = app.create_org("acme").await;
    let expires_at = (chrono::Utc::now() + chrono::TimeDelta::days(5)).to_rfc3339();
    let created = ok(
        app.post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "d5", "expires_at": expires_at}),
        )
        .await,
        201,
        "create",
    )
    .await;
    let sweep = || async {
        keyplane_server::ops::lifecycle_sweep(&app.app)
            .await
            .expect("sweep")
    };
    // The 7-day query ran before the create; the 30-day one after it.
    switch.hide_expiry_stage(Some(7));
    sweep().await;
    switch.hide_expiry_stage(None);
    sweep().await;
    let announced = app.audit_events(&org, "credential.*").await;
    assert_eq!(announced.len(), 1, "{announced:?}");
    let event = &announced[0];
    assert_eq!(event["target"]["id"], created["id"]);
    assert_eq!(event["action"], "credential.expiring");
    assert_eq!(event["details"]["days_before"], 7, "{event}");
}

async fn lists_filter_what_is_about_to_expire(backend: Backend) {
    let (app, _clock) = spawn(backend).await;
    let org = app.create_org("acme").await;
    let in_days = |days: i64| (chrono::Utc::now() + chrono::TimeDelta::days(days)).to_rfc3339();
    for (name, days) in [("soon", 3), ("later", 20)] {
        ok(
            app.post(
                &org.path("/api-tokens"),
                &org.token,
                json!({"name": name, "expires_at": in_days(days)}),
            )
            .await,
            201,
            "create",
        )
        .await;
        service_account(&app, &org, name, json!({"expires_at": in_days(days)})).await;
    }
    ok(
        app.post_empty(&org.path("/registry"), &org.token).await,
        201,
        "enable registry",
    )
    .await;
    ok(
        app.post(
            &org.path("/registry/robot-accounts"),
            &org.token,
            json!({"name": "soon", "expires_at": in_days(2)}),
        )
        .await,
        201,
        "robot",
    )
    .await;
    let names = |page: &Value| {
        let items = page.get("items").unwrap_or(page);
        let mut names: Vec<String> = items
            .as_array()
            .unwrap()
            .iter()
            .map(|c| text(c, "name"))
            .collect();
        names.sort();
        names
    };
    for (path, expected) in [
        (org.path("/api-tokens?expiring_within_days=7"), vec!["soon"]),
        (
            org.path("/api-tokens?expiring_within_days=30"),
            vec!["later", "soon"],
        ),
        (
            org.account_path("/service-accounts?expiring_within_days=7"),
            vec!["soon"],
        ),
        (
            org.path("/registry/robot-accounts?expiring_within_days=7"),
            vec!["soon"],
        ),
        (
            org.path("/registry/robot-accounts?expiring_within_days=1"),
            vec![],
        ),
    ] {
        let page = ok(app.get(&path, &org.token).await, 200, &path).await;
        assert_eq!(names(&page), expected, "{path}");
    }
    for bad in ["0", "3651", "x", ""] {
        assert_error(
            app.get(
                &org.path(&format!("/api-tokens?expiring_within_days={bad}")),
                &org.token,
            )
            .await,
            422,
            "validation_failed",
        )
        .await;
        let res = app
            .get(
                &org.account_path(&format!("/service-accounts?expiring_within_days={bad}")),
                &org.token,
            )
            .await;
        let body = ok(res, 422, "hybridbox filter").await;
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["query", "expiring_within_days"])
        );
    }
}

/// Three replicas on one PostgreSQL, sharing a clock: a grace period ends on all of them at once,
/// and a retire-previous, a suspension and a resume through one reach the others within the
/// revocation bound.
#[tokio::test]
async fn three_replicas_on_postgres_agree_on_the_lifecycle() {
    let (first, clock) = spawn(Backend::Postgres).await;
    let replicas = [first.replica().await, first.replica().await];
    let org = first.create_org("acme").await;
    first.await_listeners(3).await;
    let bound = Duration::from_secs(5);
    let all = || std::iter::once(&first).chain(replicas.iter());
    let refused_everywhere = |token: String, what: &'static str| {
        let all: Vec<&TestApp> = all().collect();
        async move {
            for app in all {
                let started = std::time::Instant::now();
                while forward(app, &token).await.status() != 401 {
                    assert!(
                        started.elapsed() < bound,
                        "{what}: not refused within {bound:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    };

    // Grace expiry.
    let created = first.create_token(&org, "graceful", &[]).await;
    let (id, old) = (text(&created, "id"), text(&created, "token"));
    let new = text(
        &rotate(
            &replicas[0],
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({"grace_seconds": 60}),
        )
        .await,
        "token",
    );
    for app in all() {
        assert_eq!(forward(app, &old).await.status(), 200, "old during grace");
        assert_eq!(forward(app, &new).await.status(), 200);
    }
    clock.advance(Duration::from_secs(61));
    refused_everywhere(old, "grace expiry").await;

    // retire-previous through one replica.
    let old = new;
    let new = text(
        &rotate(
            &first,
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({"grace_seconds": 3600}),
        )
        .await,
        "token",
    );
    for app in all() {
        assert_eq!(forward(app, &old).await.status(), 200, "cache the old one");
    }
    ok(
        replicas[1]
            .post_empty(
                &org.path(&format!("/api-tokens/{id}/retire-previous")),
                &org.token,
            )
            .await,
        200,
        "retire-previous",
    )
    .await;
    refused_everywhere(old, "retire-previous").await;

    // Suspension and resumption through different replicas.
    for app in all() {
        assert_eq!(forward(app, &new).await.status(), 200);
    }
    ok(
        replicas[0]
            .post_empty(&org.path(&format!("/api-tokens/{id}/suspend")), &org.token)
            .await,
        200,
        "suspend",
    )
    .await;
    refused_everywhere(new.clone(), "suspension").await;
    ok(
        first
            .post_empty(&org.path(&format!("/api-tokens/{id}/resume")), &org.token)
            .await,
        200,
        "resume",
    )
    .await;
    for app in all() {
        let started = std::time::Instant::now();
        while forward(app, &new).await.status() != 200 {
            assert!(
                started.elapsed() < bound,
                "resume not seen within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A use of the old secret on a replica that still held it as current when another rotated it
/// counts as the previous secret's use, never as the new one's (whose first use lets the old one
/// be retired early). SQLite only: there a replica hears of another's change only when its cache
/// entry ages out, which holds the window open; PostgreSQL's NOTIFY closes it in milliseconds.
#[tokio::test]
async fn a_use_of_the_old_secret_on_a_replica_behind_the_rotation_is_the_old_secrets() {
    let writer = TestApp::spawn(Backend::Sqlite).await;
    let behind = writer.replica().await;
    let org = writer.create_org("acme").await;
    let created = writer
        .create_token(&org, "rolled", &["api_tokens:read"])
        .await;
    let old = text(&created, "token");
    let path = org.path(&format!("/api-tokens/{}", text(&created, "id")));
    let listing = org.path("/api-tokens");
    assert_eq!(behind.get(&listing, &old).await.status(), 200);
    behind.app.flush_usage().await;

    let before_rotation = chrono::Utc::now();
    ok(
        writer
            .post(
                &format!("{path}/rotate"),
                &org.token,
                json!({"grace_seconds": 3600, "retire_when_unused_seconds": 60}),
            )
            .await,
        200,
        "rotate",
    )
    .await;
    // The replica answers from the entry it cached before the rotation.
    assert_eq!(behind.get(&listing, &old).await.status(), 200);
    behind.app.flush_usage().await;

    let view = ok(writer.get(&path, &org.token).await, 200, "get").await;
    let at = |field: &str| {
        view[field]
            .as_str()
            .map(|at| chrono::DateTime::parse_from_rfc3339(at).unwrap())
    };
    let current = at("last_used_at");
    assert!(
        current.is_none_or(|used| used < before_rotation),
        "the new secret was never presented: {view}"
    );
    let previous = at("previous_secret_last_used_at")
        .unwrap_or_else(|| panic!("the old secret's use is recorded: {view}"));
    assert!(previous >= before_rotation, "{view}");
}
