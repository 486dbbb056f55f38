//! Canary credentials: on every surface a canary is answered byte for byte as a revoked credential
//! is, and each presentation is recorded as `credential.canary_triggered` (within its bound); it
//! never authorizes anything, and only holders of the kind's write right see it listed.

use crate::helpers::{both_backends, eventually, test_config, Org, TestApp};
use keyplane_server::client_addr::{ForwardedHeader, TrustedProxies};
use keyplane_server::Config;
use keyplane_store::testing::Backend;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

both_backends!(
    canaries_answer_as_revoked_credentials_on_every_surface,
    triggers_are_bounded_per_canary_and_address,
    canaries_are_shown_only_to_holders_of_the_write_right,
    canaries_are_revoked_but_never_rotated_or_suspended,
    a_reported_canary_is_recorded_and_left_armed,
    another_organizations_introspection_of_a_canary_is_recorded_without_its_ids,
    audit_events_name_the_request_id_their_answer_carried,
    canaries_move_the_metrics_as_revoked_credentials_do,
    canaries_answer_as_revoked_credentials_while_the_store_is_away,
    one_organizations_flood_of_triggers_leaves_room_for_anothers,
    a_trigger_is_recorded_once_through_a_write_outage,
    a_reported_canary_is_recorded_through_a_write_outage,
    an_organizations_trigger_events_are_held_to_its_rate_limit,
);

const TRIGGERED: &str = "credential.canary_triggered";

/// Behind a trusted proxy on 127.0.0.1, so each request can come from its own client address.
fn behind_proxy() -> Config {
    Config {
        trusted_proxies: TrustedProxies::parse(
            &["127.0.0.1/32".to_string()],
            ForwardedHeader::XForwardedFor,
        )
        .unwrap(),
        ..test_config()
    }
}

/// A request from `client` (through the trusted proxy) with its own user agent.
fn from(app: &TestApp, method: Method, path: &str, client: &str, agent: &str) -> RequestBuilder {
    app.request(method, path, None)
        .header("x-forwarded-for", client)
        .header("user-agent", agent)
}

/// What a client can observe of an answer, but for the request id.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

async fn answer(res: Response) -> Answer {
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (www_authenticate, content_type) = (header("www-authenticate"), header("content-type"));
    Answer {
        status: res.status().as_u16(),
        www_authenticate,
        content_type,
        body: res.bytes().await.unwrap().to_vec(),
    }
}

async fn created(res: Response, what: &str) -> Value {
    assert_eq!(res.status(), 201, "creating {what}");
    res.json().await.unwrap()
}

fn text(value: &Value, key: &str) -> String {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {value}"))
        .to_string()
}

pub(crate) async fn create_api_token(app: &TestApp, org: &Org, body: Value) -> Value {
    created(
        app.post(&org.path("/api-tokens"), &org.token, body).await,
        "an API token",
    )
    .await
}

pub(crate) async fn create_service_account(app: &TestApp, org: &Org, body: Value) -> Value {
    created(
        app.post(&org.account_path("/service-accounts"), &org.token, body)
            .await,
        "a service account",
    )
    .await
}

pub(crate) async fn create_robot(app: &TestApp, org: &Org, body: Value) -> Value {
    created(
        app.post(&org.path("/registry/robot-accounts"), &org.token, body)
            .await,
        "a robot",
    )
    .await
}

pub(crate) async fn enable_registry(app: &TestApp, org: &Org) {
    let res = app
        .request(Method::POST, &org.path("/registry"), Some(&org.token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "enabling the registry");
}

/// Waits until exactly `count` triggers are recorded, and checks that no more follow.
async fn expect_triggers(app: &TestApp, org: &Org, count: usize) -> Vec<Value> {
    eventually(&format!("{count} canary triggers"), || async {
        app.audit_events(org, TRIGGERED).await.len() >= count
    })
    .await;
    // Trigger events are written at once, on their own task: give a stray one time to land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = app.audit_events(org, TRIGGERED).await;
    assert_eq!(events.len(), count, "canary triggers: {events:#?}");
    events
}

/// The one trigger recorded for `client`.
fn trigger_from<'a>(events: &'a [Value], client: &str) -> &'a Value {
    let found: Vec<&Value> = events.iter().filter(|e| e["client_ip"] == client).collect();
    assert_eq!(found.len(), 1, "one trigger from {client} in {events:#?}");
    found[0]
}

fn assert_trigger(event: &Value, canary_id: &str, surface: &str, route: &str, agent: &str) {
    assert_eq!(event["action"], TRIGGERED, "{event}");
    assert_eq!(event["outcome"], "denied", "{event}");
    assert_eq!(event["target"]["id"], canary_id, "{event}");
    assert_eq!(event["actor"]["id"], canary_id, "{event}");
    assert_eq!(event["details"]["surface"], surface, "{event}");
    assert_eq!(event["details"]["route"], route, "{event}");
    assert_eq!(event["user_agent"], agent, "{event}");
}

/// For each surface, a canary and a revoked credential of the same kind get the same status,
/// body and `WWW-Authenticate`; the canary's presentation is recorded with the client's address,
/// user agent and route, the revoked one's is not. The canaries hold every right they could be
/// given (scope `*`, an `account_owner` grant, pull and push) and still authorize nothing.
async fn canaries_answer_as_revoked_credentials_on_every_surface(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind_proxy()).await;
    let org = app.create_org("acme").await;
    enable_registry(&app, &org).await;

    let canary = create_api_token(
        &app,
        &org,
        json!({"name": "bait", "scopes": ["*"], "canary": true}),
    )
    .await;
    let revoked = create_api_token(&app, &org, json!({"name": "old", "scopes": ["*"]})).await;
    let sa_canary =
        create_service_account(&app, &org, json!({"name": "bait-sa", "canary": true})).await;
    let sa_revoked = create_service_account(&app, &org, json!({"name": "old-sa"})).await;
    let robot_canary = create_robot(
        &app,
        &org,
        json!({"name": "bait-robot", "permissions": ["pull", "push"], "canary": true}),
    )
    .await;
    let robot_revoked = create_robot(
        &app,
        &org,
        json!({"name": "old-robot", "permissions": ["pull", "push"]}),
    )
    .await;
    // The canary service account holds everything a grant can give (kept, never honoured).
    let res = app
        .post(
            &org.account_path("/authorizations"),
            &org.token,
            json!({"grant_kind": "account_owner", "subject_type": "service_account",
                   "subject_id": sa_canary["id"]}),
        )
        .await;
    assert_eq!(res.status(), 201, "granting the canary account_owner");
    for path in [
        org.path(&format!("/api-tokens/{}", text(&revoked, "id"))),
        org.path(&format!(
            "/registry/robot-accounts/{}",
            text(&robot_revoked, "id")
        )),
    ] {
        assert_eq!(app.delete(&path, &org.token).await.status(), 204);
    }
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{}", text(&sa_revoked, "id"))),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200, "revoking a service account");
    let resource_server = create_api_token(
        &app,
        &org,
        json!({"name": "rs", "scopes": ["tokens:verify"]}),
    )
    .await;
    let verifier = text(&resource_server, "token");

    let (token, old) = (text(&canary, "token"), text(&revoked, "token"));
    let (sa_token, sa_old) = (text(&sa_canary, "token"), text(&sa_revoked, "token"));
    let (robot_secret, robot_old) = (text(&robot_canary, "token"), text(&robot_revoked, "token"));

    // Each surface from its own client address, so the per-address bound records each.
    type Surface<'a> = (&'a str, &'a str, &'a str, &'a str, Method, String);
    let bearer_surfaces: Vec<Surface> = vec![
        (
            "203.0.113.1",
            "management_api",
            "GET /api/v1/organizations/{orgID}/api-tokens",
            "aether-cli/1",
            Method::GET,
            org.path("/api-tokens"),
        ),
        (
            "203.0.113.2",
            "forward_auth",
            "GET /v1/auth/forward",
            "nginx/1.25",
            Method::GET,
            "/v1/auth/forward?scope=deploy".into(),
        ),
        (
            "203.0.113.3",
            "whoami",
            "GET /v1/whoami",
            "curl/8.5",
            Method::GET,
            "/v1/whoami".into(),
        ),
    ];
    for (client, surface, _, agent, method, path) in &bearer_surfaces {
        let present = |secret: &str| {
            from(&app, method.clone(), path, client, agent)
                .bearer_auth(secret)
                .send()
        };
        let canary_answer = answer(present(&token).await.unwrap()).await;
        let revoked_answer = answer(present(&old).await.unwrap()).await;
        assert_eq!(canary_answer.status, 401, "{surface}");
        assert_eq!(
            canary_answer, revoked_answer,
            "{surface}: canary vs revoked"
        );
    }
    // The Hybridbox management API, with the service accounts.
    let hybridbox = |secret: &str| {
        from(
            &app,
            Method::GET,
            &org.account_path("/service-accounts"),
            "203.0.113.4",
            "hbx/2",
        )
        .bearer_auth(secret.to_string())
        .send()
    };
    let canary_answer = answer(hybridbox(&sa_token).await.unwrap()).await;
    assert_eq!(canary_answer.status, 401);
    assert_eq!(
        canary_answer,
        answer(hybridbox(&sa_old).await.unwrap()).await,
        "hybridbox"
    );
    // Introspection: the canary as the caller, and as the token asked about.
    let introspect = |client: &str, caller: &str, token: &str| {
        from(
            &app,
            Method::POST,
            "/oauth2/introspect",
            client,
            "resource-server/3",
        )
        .bearer_auth(caller.to_string())
        .form(&[("token", token.to_string())])
        .send()
    };
    let canary_answer = answer(introspect("203.0.113.5", &token, &verifier).await.unwrap()).await;
    assert_eq!(canary_answer.status, 401);
    let revoked_answer = answer(introspect("203.0.113.5", &old, &verifier).await.unwrap()).await;
    assert_eq!(canary_answer, revoked_answer, "introspection caller");
    for (canary_secret, revoked_secret) in [(&token, &old), (&sa_token, &sa_old)] {
        let canary_answer = answer(
            introspect("203.0.113.6", &verifier, canary_secret)
                .await
                .unwrap(),
        )
        .await;
        let revoked_answer = answer(
            introspect("203.0.113.6", &verifier, revoked_secret)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(canary_answer.status, 200);
        assert_eq!(
            serde_json::from_slice::<Value>(&canary_answer.body).unwrap(),
            json!({"active": false})
        );
        assert_eq!(canary_answer, revoked_answer, "introspected token");
    }
    // The registry token service, both forms.
    let login = |name: &str, secret: &str| {
        from(
            &app,
            Method::GET,
            "/registry/token",
            "203.0.113.7",
            "skopeo/1.13",
        )
        .basic_auth(format!("robot$acme+{name}"), Some(secret.to_string()))
        .query(&[
            ("service", "keyplane-registry"),
            ("scope", "repository:acme/app:pull,push"),
        ])
        .send()
    };
    let canary_answer = answer(login("bait-robot", &robot_secret).await.unwrap()).await;
    assert_eq!(canary_answer.status, 401);
    let revoked_answer = answer(login("old-robot", &robot_old).await.unwrap()).await;
    assert_eq!(canary_answer, revoked_answer, "registry token (GET)");
    let oauth = |name: &str, secret: &str| {
        from(
            &app,
            Method::POST,
            "/registry/token",
            "203.0.113.8",
            "docker/27",
        )
        .form(&[
            ("grant_type", "password"),
            ("username", &format!("robot$acme+{name}")),
            ("password", secret),
            ("service", "keyplane-registry"),
        ])
        .send()
    };
    let canary_answer = answer(oauth("bait-robot", &robot_secret).await.unwrap()).await;
    assert_eq!(canary_answer.status, 401);
    assert_eq!(
        canary_answer,
        answer(oauth("old-robot", &robot_old).await.unwrap()).await,
        "registry token (POST)"
    );

    // One trigger per surface and canary (the introspected service account comes from the same
    // address as the introspected token, but is bounded apart: it is another canary).
    let events = expect_triggers(&app, &org, 9).await;
    let canary_id = text(&canary, "id");
    for (client, surface, route, agent, _, _) in &bearer_surfaces {
        assert_trigger(
            trigger_from(&events, client),
            &canary_id,
            surface,
            route,
            agent,
        );
    }
    assert_trigger(
        trigger_from(&events, "203.0.113.4"),
        &text(&sa_canary, "id"),
        "management_api",
        "GET /v1/public/accounts/{account_id}/auth/service-accounts",
        "hbx/2",
    );
    assert_trigger(
        trigger_from(&events, "203.0.113.5"),
        &canary_id,
        "introspection_caller",
        "POST /oauth2/introspect",
        "resource-server/3",
    );
    let introspected: Vec<&Value> = events
        .iter()
        .filter(|e| e["client_ip"] == "203.0.113.6")
        .collect();
    assert_eq!(introspected.len(), 2, "{events:#?}");
    let verifier_id = resource_server["id"].clone();
    for event in &introspected {
        assert_eq!(event["details"]["surface"], "introspected_token");
        assert_eq!(event["details"]["client"], "introspection_caller");
        assert_eq!(event["details"]["introspected_by"], verifier_id);
        assert_eq!(event["details"]["route"], "POST /oauth2/introspect");
    }
    let ids: BTreeSet<&str> = introspected
        .iter()
        .map(|e| e["target"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([canary_id.as_str(), sa_canary["id"].as_str().unwrap()])
    );
    let robot_id = text(&robot_canary, "id");
    assert_trigger(
        trigger_from(&events, "203.0.113.7"),
        &robot_id,
        "registry_token",
        "GET /registry/token",
        "skopeo/1.13",
    );
    assert_trigger(
        trigger_from(&events, "203.0.113.8"),
        &robot_id,
        "registry_token",
        "POST /registry/token",
        "docker/27",
    );
    // The canary's scopes are in its events (what it would have held), its grants never applied.
    let first = trigger_from(&events, "203.0.113.1");
    assert_eq!(first["details"]["scopes"], json!(["*"]), "{first}");

    // Nothing worked with a canary: no use was recorded.
    app.app.flush_usage().await;
    let listed = app.get(&org.path("/api-tokens"), &org.token).await;
    let listed: Value = listed.json().await.unwrap();
    let bait = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == canary["id"])
        .unwrap();
    assert!(bait["last_used_at"].is_null(), "{bait}");
}

/// At most one event per canary per client address per 60 s, and at most 20 per canary in any
/// 60 s, however many presentations.
async fn triggers_are_bounded_per_canary_and_address(backend: Backend) {
    let config = behind_proxy();
    let clock = config.clock.clone();
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let canary = create_api_token(&app, &org, json!({"name": "bait", "canary": true})).await;
    let token = text(&canary, "token");
    let present = |client: &str| {
        from(&app, Method::GET, "/v1/auth/forward", client, "flood/1")
            .bearer_auth(token.clone())
            .send()
    };
    for _ in 0..10 {
        assert_eq!(present("100.64.0.1").await.unwrap().status(), 401);
    }
    expect_triggers(&app, &org, 1).await;
    assert_eq!(present("100.64.0.2").await.unwrap().status(), 401);
    expect_triggers(&app, &org, 2).await;

    // A minute later the first address is recorded again.
    clock.advance(Duration::from_secs(61));
    assert_eq!(present("100.64.0.1").await.unwrap().status(), 401);
    expect_triggers(&app, &org, 3).await;
    // Many addresses within that minute: 20 events in all, then nothing more.
    for i in 0..30 {
        let client = format!("100.64.0.{}", 10 + i);
        assert_eq!(present(&client).await.unwrap().status(), 401);
    }
    let events = expect_triggers(&app, &org, 3 + 19).await;
    assert!(events.iter().all(|e| e["target"]["id"] == canary["id"]));
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

/// A canary is created like any credential (same answer shape, same token format), and shown only
/// to callers holding the kind's write right, marked `canary: true`; for others it does not exist.
async fn canaries_are_shown_only_to_holders_of_the_write_right(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable_registry(&app, &org).await;
    let plain = create_api_token(
        &app,
        &org,
        json!({"name": "plain", "scopes": ["deploy:prod"]}),
    )
    .await;
    let canary = create_api_token(
        &app,
        &org,
        json!({"name": "bait", "scopes": ["deploy:prod"], "canary": true}),
    )
    .await;
    assert_eq!(
        keys(&plain),
        keys(&canary),
        "the create answer has one shape"
    );
    assert_eq!(plain["canary"], false);
    assert_eq!(canary["canary"], true);
    // The audit trail, readable with `audit:read` alone (and sent to webhooks), does not tell
    // them apart either: a creation event has the same details.
    let created = app.audit_events(&org, "api_token.created").await;
    let created_event = |id: &Value| {
        created
            .iter()
            .find(|e| e["target"]["id"] == *id)
            .unwrap_or_else(|| panic!("{id} in {created:?}"))
    };
    let details = |event: &Value| -> Vec<String> {
        event["details"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(
        details(created_event(&plain["id"])),
        details(created_event(&canary["id"])),
        "{created:?}"
    );
    let (plain_token, canary_token) = (text(&plain, "token"), text(&canary, "token"));
    assert!(canary_token.starts_with("aether_") && canary_token.len() == plain_token.len());
    assert_eq!(text(&canary, "prefix").len(), text(&plain, "prefix").len());

    let reader = text(
        &create_api_token(
            &app,
            &org,
            json!({"name": "reader", "scopes": ["api_tokens:read", "registry:read"]}),
        )
        .await,
        "token",
    );
    let writer = text(
        &create_api_token(
            &app,
            &org,
            json!({"name": "writer", "scopes": ["api_tokens:read", "api_tokens:write"]}),
        )
        .await,
        "token",
    );
    let names = |page: &Value| -> Vec<(String, bool)> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (text(t, "name"), t["canary"].as_bool().unwrap()))
            .collect()
    };
    let page: Value = app
        .get(&org.path("/api-tokens"), &reader)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        !names(&page).iter().any(|(name, _)| name == "bait"),
        "{page}"
    );
    assert!(names(&page).iter().all(|(_, canary)| !canary));
    let page: Value = app
        .get(&org.path("/api-tokens"), &writer)
        .await
        .json()
        .await
        .unwrap();
    assert!(names(&page).contains(&("bait".into(), true)), "{page}");
    assert!(names(&page).contains(&("plain".into(), false)), "{page}");
    let one = org.path(&format!("/api-tokens/{}", text(&canary, "id")));
    assert_eq!(app.get(&one, &reader).await.status(), 404);
    let shown: Value = app.get(&one, &writer).await.json().await.unwrap();
    assert_eq!(shown["canary"], true);
    assert_eq!(
        shown["scopes"],
        json!(["deploy:prod"]),
        "its scopes are shown, for realism"
    );

    // Robots: registry:read does not see them, registry:write does.
    let robot = create_robot(&app, &org, json!({"name": "bait-robot", "canary": true})).await;
    assert_eq!(robot["canary"], true);
    assert!(text(&robot, "token").starts_with("kprobot_"));
    let registry_writer = text(
        &create_api_token(
            &app,
            &org,
            json!({"name": "rw", "scopes": ["registry:read", "registry:write"]}),
        )
        .await,
        "token",
    );
    let robots = |token: String| {
        let app = &app;
        let path = org.path("/registry/robot-accounts");
        async move {
            let page: Value = app.get(&path, &token).await.json().await.unwrap();
            names(&page)
        }
    };
    assert_eq!(
        robots(reader.clone()).await,
        vec![("default".to_string(), false)]
    );
    assert_eq!(
        robots(registry_writer.clone()).await,
        vec![
            ("default".to_string(), false),
            ("bait-robot".to_string(), true)
        ]
    );
    let one = org.path(&format!("/registry/robot-accounts/{}", text(&robot, "id")));
    assert_eq!(app.get(&one, &reader).await.status(), 404);
    assert_eq!(app.get(&one, &registry_writer).await.status(), 200);

    // Service accounts are read and managed with auth.manage: its holders see the canary.
    let sa = create_service_account(&app, &org, json!({"name": "bait-sa", "canary": true})).await;
    assert!(text(&sa, "token").starts_with("hbx_sa_"));
    let listed: Value = app
        .get(&org.account_path("/service-accounts"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["canary"], true, "{listed}");

    // `canary` must be a boolean.
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "x", "canary": "yes"}),
        )
        .await;
    let details = crate::helpers::assert_error(res, 422, "validation_failed").await;
    assert_eq!(
        crate::helpers::fields(&details),
        vec![("canary".to_string(), "invalid_type".to_string())]
    );
}

/// A canary is retired by revoking it, like any credential; its secret never changes (rotation and
/// suspension are refused), and once revoked it is a revoked credential: no more triggers.
async fn canaries_are_revoked_but_never_rotated_or_suspended(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind_proxy()).await;
    let org = app.create_org("acme").await;
    let canary = create_api_token(&app, &org, json!({"name": "bait", "canary": true})).await;
    let one = org.path(&format!("/api-tokens/{}", text(&canary, "id")));
    for action in ["/rotate", "/suspend", "/resume"] {
        let res = app.post_empty(&format!("{one}{action}"), &org.token).await;
        crate::helpers::assert_error(res, 409, "conflict").await;
    }
    let sa = create_service_account(&app, &org, json!({"name": "bait-sa", "canary": true})).await;
    let sa_path = org.account_path(&format!("/service-accounts/{}", text(&sa, "id")));
    let res = app
        .post_empty(&format!("{sa_path}/rotate"), &org.token)
        .await;
    assert_eq!(res.status(), 409);

    let token = text(&canary, "token");
    assert_eq!(app.get("/v1/whoami", &token).await.status(), 401);
    expect_triggers(&app, &org, 1).await;
    assert_eq!(app.delete(&one, &org.token).await.status(), 204);
    assert_eq!(app.get("/v1/whoami", &token).await.status(), 401);
    let res = app
        .request(Method::GET, "/v1/whoami", Some(&token))
        .header("x-forwarded-for", "192.0.2.1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    expect_triggers(&app, &org, 1).await;
}

/// `token` reported through `/v1/credentials/revoke`, from 192.0.2.77.
async fn report_publicly(app: &TestApp, token: &str) -> Response {
    from(
        app,
        Method::POST,
        "/v1/credentials/revoke",
        "192.0.2.77",
        "finder/1",
    )
    .json(&json!({"credentials": [token]}))
    .send()
    .await
    .unwrap()
}

/// A reported canary is the point of a canary: the report is recorded as a trigger (source,
/// reporter's address), and the canary stays armed rather than revoked.
async fn a_reported_canary_is_recorded_and_left_armed(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind_proxy()).await;
    let org = app.create_org("acme").await;
    let canary = create_api_token(&app, &org, json!({"name": "bait", "canary": true})).await;
    let token = text(&canary, "token");
    assert_eq!(report_publicly(&app, &token).await.status(), 202);
    let events = expect_triggers(&app, &org, 1).await;
    let event = &events[0];
    assert_eq!(event["client_ip"], "192.0.2.77");
    assert_eq!(event["details"]["surface"], "public_revoke");
    assert_eq!(event["details"]["source"], "public_revoke");
    assert_eq!(event["details"]["reported_by"], "anonymous");
    assert_eq!(event["actor"]["type"], "system");
    assert_eq!(event["target"]["id"], canary["id"]);
    let leaked = app.audit_events(&org, "credential.leaked").await;
    assert!(
        leaked.is_empty(),
        "a canary is not revoked as leaked: {leaked:#?}"
    );
    let one = org.path(&format!("/api-tokens/{}", text(&canary, "id")));
    assert_eq!(app.get(&one, &org.token).await.status(), 200, "still armed");
    // Whoever copies it from where it leaked is caught next.
    let res = from(&app, Method::GET, "/v1/whoami", "198.18.0.9", "attacker/0")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let events = expect_triggers(&app, &org, 2).await;
    assert_eq!(
        trigger_from(&events, "198.18.0.9")["details"]["surface"],
        "whoami"
    );
}

/// A resource server of another organization that introspects a canary learns nothing (inactive,
/// as for any credential not its own); the canary's organization learns that it was presented
/// and from where, but not the other organization's credential id.
async fn another_organizations_introspection_of_a_canary_is_recorded_without_its_ids(
    backend: Backend,
) {
    let app = TestApp::spawn_with(backend, behind_proxy()).await;
    let acme = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let canary = create_api_token(&app, &acme, json!({"name": "bait", "canary": true})).await;
    let resource_server = create_api_token(
        &app,
        &other,
        json!({"name": "rs", "scopes": ["tokens:verify"]}),
    )
    .await;
    let res = from(
        &app,
        Method::POST,
        "/oauth2/introspect",
        "192.0.2.200",
        "rs/1",
    )
    .bearer_auth(text(&resource_server, "token"))
    .form(&[("token", text(&canary, "token"))])
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"active": false}));
    let events = expect_triggers(&app, &acme, 1).await;
    let event = &events[0];
    assert_eq!(event["client_ip"], "192.0.2.200");
    assert_eq!(event["details"]["surface"], "introspected_token");
    assert_eq!(event["details"]["introspected_by"], "another organization");
    assert!(!event
        .to_string()
        .contains(resource_server["id"].as_str().unwrap()));
    assert!(app.audit_events(&other, TRIGGERED).await.is_empty());
}

/// The request id an audit event names is the one its answer carried: made by the server when the
/// client sent none or one that is not plain, the client's own otherwise; on a route the router
/// serves and on the verification routes served without it.
async fn audit_events_name_the_request_id_their_answer_carried(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind_proxy()).await;
    let org = app.create_org("acme").await;
    enable_registry(&app, &org).await;
    let id_of = |res: &Response| res.headers()["x-request-id"].to_str().unwrap().to_string();

    // A change through the management API, with no id from the client.
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "ci", "scopes": ["deploy"]}),
        )
        .await;
    let created_id = id_of(&res);
    let token = created(res, "an API token").await;
    assert!(uuid::Uuid::parse_str(&created_id).is_ok(), "{created_id}");
    let created_events = app.audit_events(&org, "api_token.created").await;
    let event = created_events.first().expect("an api_token.created event");
    assert_eq!(event["target"]["id"], token["id"], "{event}");
    assert_eq!(event["request_id"], created_id.as_str(), "{event}");

    // A canary presented on each kind of route, with a request id of each kind.
    let canary = create_api_token(&app, &org, json!({"name": "bait", "canary": true})).await;
    let robot = create_robot(
        &app,
        &org,
        json!({"name": "bait-robot", "permissions": ["pull"], "canary": true}),
    )
    .await;
    let secret = text(&canary, "token");
    let mut expected = Vec::new();
    for (client, path, sent) in [
        ("203.0.113.91", "/v1/auth/forward", None),
        ("203.0.113.92", "/v1/whoami", Some("not plain")),
        ("203.0.113.93", "/v1/auth/forward", Some("trace-7:span.1")),
    ] {
        let mut request = from(&app, Method::GET, path, client, "probe/1").bearer_auth(&secret);
        if let Some(sent) = sent {
            request = request.header("x-request-id", sent);
        }
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
        expected.push((client, id_of(&res), sent));
    }
    let res = from(
        &app,
        Method::GET,
        "/registry/token",
        "203.0.113.94",
        "skopeo/1.13",
    )
    .basic_auth("robot$acme+bait-robot", Some(text(&robot, "token")))
    .query(&[("service", "keyplane-registry")])
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 401, "registry token");
    expected.push(("203.0.113.94", id_of(&res), None));

    let events = expect_triggers(&app, &org, expected.len()).await;
    for (client, answered, sent) in expected {
        match sent {
            Some(plain) if !plain.contains(' ') => assert_eq!(answered, plain),
            _ => assert!(uuid::Uuid::parse_str(&answered).is_ok(), "{answered}"),
        }
        let event = trigger_from(&events, client);
        assert_eq!(event["request_id"], answered.as_str(), "{event}");
    }
}

/// The secrets of a canary API token and of a revoked one, neither presented yet, in a new
/// organization.
async fn canary_and_revoked(app: &TestApp) -> (String, String) {
    let org = app.create_org("acme").await;
    let canary = create_api_token(app, &org, json!({"name": "bait", "canary": true})).await;
    let revoked = create_api_token(app, &org, json!({"name": "old"})).await;
    let res = app
        .delete(
            &org.path(&format!("/api-tokens/{}", text(&revoked, "id"))),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 204);
    (text(&canary, "token"), text(&revoked, "token"))
}

/// The verification counters of `/metrics` (public): rejections by reason, cache lookups by
/// outcome.
async fn verification_counters(app: &TestApp) -> std::collections::BTreeMap<String, f64> {
    app.metrics()
        .await
        .lines()
        .filter(|line| {
            line.starts_with("keyplane_credentials_rejected")
                || line.starts_with("keyplane_verify_cache_lookups")
        })
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// What presenting `token` to whoami `times` times, then again once the negative cache has
/// forgotten it, adds to the verification counters.
async fn counted(app: &TestApp, token: &str) -> Vec<(String, f64)> {
    let before = verification_counters(app).await;
    for _ in 0..2 {
        let res = app.get("/v1/whoami", token).await;
        assert_eq!(res.status(), 401);
    }
    tokio::time::sleep(
        keyplane_server::auth::CacheConfig::default().negative_ttl + Duration::from_millis(300),
    )
    .await;
    assert_eq!(app.get("/v1/whoami", token).await.status(), 401);
    let after = verification_counters(app).await;
    after
        .into_iter()
        .map(|(name, value)| {
            let added = value - before.get(&name).copied().unwrap_or(0.0);
            (name, added)
        })
        .filter(|(_, added)| *added != 0.0)
        .collect()
}

/// `/metrics` needs no credential: a thief presenting a token a few times and reading it must
/// not learn that the token is a canary rather than merely revoked (the reasons and cache
/// outcomes counted, and when the store is asked again).
async fn canaries_move_the_metrics_as_revoked_credentials_do(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (canary, revoked) = canary_and_revoked(&app).await;
    let as_revoked = counted(&app, &revoked).await;
    let as_canary = counted(&app, &canary).await;
    assert!(!as_revoked.is_empty());
    assert_eq!(as_canary, as_revoked);
}

/// While the store cannot answer, a revoked secret fails closed as unavailable (its negative
/// entry does not outlive its time): a canary, cached or not, must answer the same, not a 401
/// from a cache entry served stale.
async fn canaries_answer_as_revoked_credentials_while_the_store_is_away(backend: Backend) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, test_config()).await;
    let (canary, revoked) = canary_and_revoked(&app).await;
    // Both presented once, so both are known to this replica's caches.
    for token in [&canary, &revoked] {
        assert_eq!(app.get("/v1/whoami", token).await.status(), 401);
    }
    store.set_down(true);
    tokio::time::sleep(
        keyplane_server::auth::CacheConfig::default().negative_ttl + Duration::from_millis(300),
    )
    .await;
    let during: Vec<Answer> = {
        let mut answers = Vec::new();
        for token in [&canary, &revoked] {
            answers.push(answer(app.get("/v1/whoami", token).await).await);
        }
        answers
    };
    store.set_down(false);
    assert_eq!(during[0].status, 503, "{:?}", during[0]);
    assert_eq!(during[0], during[1]);
}

/// An organization presenting many of its own canaries while trigger events cannot be written
/// (a slow store) takes at most its share of the slots: another organization's canary, presented
/// then, is recorded once the store answers.
async fn one_organizations_flood_of_triggers_leaves_room_for_anothers(backend: Backend) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, behind_proxy()).await;
    let flooder = app.create_org("flooder").await;
    let victim = app.create_org("acme").await;
    // 16 canaries presented from 20 addresses each: 320 triggers, more than all the slots (256).
    let mut baits = Vec::new();
    for i in 0..16 {
        let canary = json!({"name": format!("bait-{i}"), "canary": true});
        baits.push(text(
            &create_api_token(&app, &flooder, canary).await,
            "token",
        ));
    }
    let alarm = create_api_token(&app, &victim, json!({"name": "bait", "canary": true})).await;

    store.hold_audit_appends(true);
    for (i, bait) in baits.iter().enumerate() {
        for address in 0..20 {
            let res = from(
                &app,
                Method::GET,
                "/v1/auth/forward",
                &format!("100.64.{i}.{address}"),
                "flood/1",
            )
            .bearer_auth(bait)
            .send()
            .await
            .unwrap();
            assert_eq!(res.status(), 401);
        }
    }
    let res = from(
        &app,
        Method::GET,
        "/v1/auth/forward",
        "100.65.0.1",
        "intruder/1",
    )
    .bearer_auth(text(&alarm, "token"))
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 401);
    store.hold_audit_appends(false);

    let events = expect_triggers(&app, &victim, 1).await;
    assert_trigger(
        &events[0],
        alarm["id"].as_str().unwrap(),
        "forward_auth",
        "GET /v1/auth/forward",
        "intruder/1",
    );
    // The flooder's share was written; the rest of its triggers were not recorded.
    expect_triggers(&app, &flooder, 64).await;
}

/// A server behind a proxy on a [`crate::faulty_store::FaultyStore`], an organization, and its
/// canary's token.
async fn canary_on_faulty_store(
    backend: Backend,
) -> (
    TestApp,
    std::sync::Arc<crate::faulty_store::FaultyStore>,
    Org,
    String,
) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, behind_proxy()).await;
    let org = app.create_org("acme").await;
    let canary = create_api_token(&app, &org, json!({"name": "bait", "canary": true})).await;
    let token = text(&canary, "token");
    (app, store, org, token)
}

/// A trigger whose event cannot be written at first (the store refuses writes for a while) is
/// retried until it is recorded, once: the same address presenting the canary again, during the
/// outage or after, within the window, adds nothing.
async fn a_trigger_is_recorded_once_through_a_write_outage(backend: Backend) {
    let (app, store, org, token) = canary_on_faulty_store(backend).await;
    let present = || async {
        from(
            &app,
            Method::GET,
            "/v1/auth/forward",
            "100.64.0.1",
            "thief/1",
        )
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status()
    };

    store.fail_audit_appends(true);
    assert_eq!(present().await, 401);
    // The first write and its first retry fail.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(present().await, 401);
    store.fail_audit_appends(false);
    let events = expect_triggers(&app, &org, 1).await;
    assert_eq!(events[0]["client_ip"], "100.64.0.1");
    assert_eq!(present().await, 401);
    expect_triggers(&app, &org, 1).await;
    // The waiting alarm's log line names its canary and the request that set it off: on a task of
    // its own, outside the request's span, nothing else would.
    let canary_id = events[0]["target"]["id"].as_str().unwrap();
    let request_id = events[0]["request_id"].as_str().unwrap();
    assert!(
        crate::logs::captured()
            .lines()
            .any(|line| line.contains("a canary trigger waits for the store")
                && line.contains(canary_id)
                && line.contains(request_id)),
        "the waiting trigger's log line names neither canary {canary_id} nor request {request_id}"
    );
}

/// A canary reported through `/v1/credentials/revoke` while the store refuses writes is recorded
/// once the store takes them again (the report's retry is not mistaken for the same address's
/// trigger already recorded).
async fn a_reported_canary_is_recorded_through_a_write_outage(backend: Backend) {
    let (app, store, org, token) = canary_on_faulty_store(backend).await;

    store.fail_audit_appends(true);
    assert_eq!(report_publicly(&app, &token).await.status(), 202);
    // The first attempt and its first retry fail.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    store.fail_audit_appends(false);
    let events = expect_triggers(&app, &org, 1).await;
    assert_eq!(events[0]["client_ip"], "192.0.2.77");
    assert_eq!(events[0]["details"]["surface"], "public_revoke");
}

/// With `--tenant-rate-limit-per-minute`, an organization's canaries cannot write trigger events
/// past that many a minute (one address each escapes the per-canary bound): the rest are counted
/// in one `credential.canary_triggered` per window (actor `system`, `reason`
/// `tenant_rate_limit`, `count`, `canary_ids`), so every presentation is accounted for. The
/// budget is the trigger events' own: the organization's management requests are not spent.
async fn an_organizations_trigger_events_are_held_to_its_rate_limit(backend: Backend) {
    let limited = Config {
        tenant_rate_limit_per_minute: 10,
        audit_refusal_window: Duration::from_millis(200),
        ..behind_proxy()
    };
    let app = TestApp::spawn_with(backend, limited).await;
    // The trail is read through a replica without the limit, so that reading spends nothing.
    let reader = app.replica_at(app.database_url(), behind_proxy()).await;
    let org = app.create_org("acme").await;
    // Twenty canaries, put in place by the store (creating them would spend the budget).
    let tenant = keyplane_core::TenantId::from_uuid(org.id.parse().unwrap());
    let now = keyplane_server::ops::now();
    let (canaries, tokens): (Vec<_>, Vec<_>) = (0..20)
        .map(|i| {
            keyplane_core::NewCredential {
                tenant_id: tenant,
                kind: keyplane_core::CredentialKind::ApiToken,
                name: format!("bait-{i}"),
                scopes: keyplane_core::ScopeSet::empty(),
                permissions: Vec::new(),
                expires_at: None,
                created_by: keyplane_core::CreatedBy::system(keyplane_core::Channel::Admin),
                canary: true,
            }
            .issue(now, &mut rand::rngs::OsRng)
        })
        .unzip();
    app.app
        .store()
        .import_credentials(&canaries, &[])
        .await
        .expect("import the canaries");
    for (i, token) in tokens.iter().enumerate() {
        let client = format!("100.64.1.{i}");
        let res = from(&app, Method::GET, "/v1/auth/forward", &client, "flood/1")
            .bearer_auth(token.expose_secret())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    let ids: BTreeSet<String> = canaries.iter().map(|c| c.id.to_string()).collect();
    let accounted = |events: &[Value]| -> u64 {
        events
            .iter()
            .map(|e| e["details"]["count"].as_u64().unwrap_or(1))
            .sum()
    };
    eventually("every presentation accounted for", || async {
        accounted(&reader.audit_events(&org, TRIGGERED).await) >= 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = reader.audit_events(&org, TRIGGERED).await;
    assert_eq!(accounted(&events), 20, "{events:#?}");
    let (one_by_one, summaries): (Vec<&Value>, Vec<&Value>) = events
        .iter()
        .partition(|e| e["details"].get("count").is_none());
    assert!(
        (1..=10).contains(&one_by_one.len()),
        "{} trigger events written one by one",
        one_by_one.len()
    );
    for event in &one_by_one {
        assert!(
            ids.contains(text(&event["target"], "id").as_str()),
            "{event}"
        );
    }
    assert!(!summaries.is_empty());
    for summary in &summaries {
        assert_eq!(summary["actor"]["type"], "system", "{summary}");
        assert_eq!(summary["outcome"], "denied", "{summary}");
        assert_eq!(
            summary["details"]["reason"], "tenant_rate_limit",
            "{summary}"
        );
        let named = summary["details"]["canary_ids"].as_array().unwrap();
        assert!(!named.is_empty(), "{summary}");
        assert!(
            named.iter().all(|id| ids.contains(id.as_str().unwrap())),
            "{summary}"
        );
    }
    // The organization's own requests have their budget whole.
    let res = app.get(&org.path("/api-tokens"), &org.token).await;
    assert_eq!(res.status(), 200, "the organization's management request");
}
