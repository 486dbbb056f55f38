//! `/api/v1/organizations/{orgID}/audit-events`: every change leaves one event, refused attempts
//! are recorded (aggregated), and the list pages and filters like the other lists.

use crate::faulty_store::FaultyStore;
use crate::helpers::{assert_error, both_backends, eventually, fields, test_config, Org, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

both_backends!(
    every_change_is_recorded_with_its_actor_target_and_request,
    refused_attempts_are_recorded_once_per_window_with_a_count,
    refused_attempts_outlive_a_store_outage,
    a_refusal_flush_whose_acknowledgement_was_lost_counts_once,
    pages_filters_and_tenant_isolation,
    first_credentials_have_their_own_created_events,
    the_export_writes_the_events_of_a_chain_that_went_back,
    a_failing_cursor_save_does_not_repeat_exported_lines,
    a_policy_update_records_the_values_it_replaced,
    a_stalled_export_says_so_once_and_again_when_it_goes_on,
    retention_keeps_what_the_export_has_not_written,
    the_export_reports_events_pruned_before_it_wrote_them,
);

async fn events(app: &TestApp, org: &Org, token: &str, query: &str) -> Value {
    let res = app
        .get(&org.path(&format!("/audit-events{query}")), token)
        .await;
    assert_eq!(res.status(), 200, "listing audit events {query}");
    res.json().await.unwrap()
}

fn actions(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect()
}

fn text(value: &Value, key: &str) -> String {
    value[key].as_str().unwrap().to_string()
}

async fn ok_json(res: reqwest::Response, status: u16, what: &str) -> Value {
    assert_eq!(res.status(), status, "{what}");
    res.json().await.unwrap()
}

async fn every_change_is_recorded_with_its_actor_target_and_request(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let mut secrets = vec![org.token.clone()];

    // API token: created (with a request id and user agent we choose), rotated, revoked.
    let res = app
        .request(Method::POST, &org.path("/api-tokens"), Some(&org.token))
        .header("x-request-id", "req-create-1")
        .header("user-agent", "audit-test/1.0")
        .json(&json!({"name": "ci", "scopes": ["api_tokens:read", "deploy"]}))
        .send()
        .await
        .unwrap();
    let token = ok_json(res, 201, "create token").await;
    secrets.push(text(&token, "token"));
    let token_id = text(&token, "id");
    let token_rotated = ok_json(
        app.post_empty(
            &org.path(&format!("/api-tokens/{token_id}/rotate")),
            &org.token,
        )
        .await,
        200,
        "rotate token",
    )
    .await;
    secrets.push(text(&token_rotated, "token"));
    let res = app
        .delete(&org.path(&format!("/api-tokens/{token_id}")), &org.token)
        .await;
    assert_eq!(res.status(), 204);

    // Service account and a grant to it.
    let sa = ok_json(
        app.post(
            &org.account_path("/service-accounts"),
            &org.token,
            json!({"name": "deployer"}),
        )
        .await,
        201,
        "create service account",
    )
    .await;
    secrets.push(text(&sa, "token"));
    let sa_id = text(&sa, "id");
    let grant = ok_json(
        app.post(
            &org.account_path("/authorizations"),
            &org.token,
            json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": sa_id, "capability_key": "api_tokens:read"}),
        )
        .await,
        201,
        "grant",
    )
    .await;
    let grant_id = text(&grant, "id");
    app.revoke_grant(&org, &grant_id).await;
    let rotated = ok_json(
        app.post_empty(
            &org.account_path(&format!("/service-accounts/{sa_id}/rotate")),
            &org.token,
        )
        .await,
        200,
        "rotate service account",
    )
    .await;
    secrets.push(text(&rotated, "token"));
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{sa_id}")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    // Revoking again changes nothing and records nothing.
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{sa_id}")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);

    // Registry and a robot: enabled, created, permissions changed, rotated, revoked.
    let registry = ok_json(
        app.post_empty(&org.path("/registry"), &org.token).await,
        201,
        "enable registry",
    )
    .await;
    secrets.push(
        registry
            .to_string()
            .split('"')
            .find(|s| s.starts_with("kprobot_"))
            .unwrap_or("kprobot_")
            .to_string(),
    );
    let robot = ok_json(
        app.post(
            &org.path("/registry/robot-accounts"),
            &org.token,
            json!({"name": "builder"}),
        )
        .await,
        201,
        "create robot",
    )
    .await;
    let robot_id = text(&robot, "id");
    let res = app
        .request(
            Method::PUT,
            &org.path(&format!("/registry/robot-accounts/{robot_id}")),
            Some(&org.token),
        )
        .json(&json!({"permissions": ["pull", "push:team-a/*"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "update robot");
    let res = app
        .post_empty(
            &org.path(&format!("/registry/robot-accounts/{robot_id}/rotate")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200, "rotate robot");
    let res = app
        .delete(
            &org.path(&format!("/registry/robot-accounts/{robot_id}")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 204);

    let page = events(&app, &org, &org.token, "?limit=100").await;
    let mut recorded = actions(&page);
    recorded.reverse();
    assert_eq!(
        recorded,
        [
            "organization.created",
            "api_token.created",
            "api_token.created",
            "api_token.rotated",
            "api_token.revoked",
            "service_account.created",
            "authorization.created",
            "authorization.revoked",
            "service_account.rotated",
            "service_account.revoked",
            "registry.enabled",
            "robot_account.created",
            "robot_account.created",
            "robot_account.permissions_updated",
            "robot_account.rotated",
            "robot_account.revoked",
        ]
    );
    let items = page["items"].as_array().unwrap();
    let by_action = |action: &str| {
        items
            .iter()
            .find(|e| e["action"] == action)
            .unwrap_or_else(|| panic!("no {action}"))
            .clone()
    };
    let created = by_action("api_token.created");
    assert_eq!(created["org_id"], org.id.as_str());
    assert_eq!(created["outcome"], "success");
    assert_eq!(created["actor"]["type"], "api_token");
    assert!(created["actor"]["id"].is_string());
    assert_eq!(created["target"]["type"], "api_token");
    assert_eq!(created["target"]["id"], token_id.as_str());
    assert_eq!(created["target"]["name"], "ci");
    assert_eq!(created["request_id"], "req-create-1");
    assert_eq!(created["user_agent"], "audit-test/1.0");
    assert_eq!(created["client_ip"], "127.0.0.1");
    assert_eq!(
        created["details"]["scopes"],
        json!(["api_tokens:read", "deploy"])
    );
    assert_eq!(created["chain_hash"].as_str().unwrap().len(), 64);
    let rotation = by_action("api_token.rotated");
    assert_eq!(rotation["details"]["old_display_prefix"], token["prefix"]);
    assert_eq!(
        rotation["details"]["display_prefix"],
        token_rotated["prefix"]
    );
    assert_ne!(
        rotation["details"]["old_display_prefix"],
        rotation["details"]["display_prefix"]
    );
    let granted = by_action("authorization.created");
    assert_eq!(granted["target"]["id"], grant_id.as_str());
    assert_eq!(granted["details"]["capability_key"], "api_tokens:read");
    assert_eq!(granted["details"]["subject_id"], sa_id.as_str());
    let perms = by_action("robot_account.permissions_updated");
    assert_eq!(
        perms["details"]["permissions"],
        json!(["pull", "push:team-a/*"])
    );
    let org_created = by_action("organization.created");
    assert_eq!(org_created["actor"]["type"], "system");
    assert!(org_created["actor"]["id"].is_null());
    assert!(by_action("registry.enabled")["target"]["name"].is_string());

    // Ids are time-ordered (UUIDv7) and seqs count up from 1 without a gap.
    let mut seqs: Vec<u64> = items.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    seqs.reverse();
    assert_eq!(seqs, (1..=16).collect::<Vec<_>>());
    assert!(items
        .iter()
        .all(|e| e["id"].as_str().unwrap().as_bytes()[14] == b'7'));

    // Never a secret, nor the bearer.
    let body = page.to_string();
    for secret in &secrets {
        assert!(
            !body.contains(secret.as_str()),
            "a secret leaked into the audit trail"
        );
    }
}

async fn refused_attempts_are_recorded_once_per_window_with_a_count(
    backend: keyplane_store::testing::Backend,
) {
    let config = keyplane_server::Config {
        audit_refusal_window: Duration::from_millis(200),
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let reader = app.create_token(&org, "reader", &["api_tokens:read"]).await;
    let reader_token = text(&reader, "token");
    let reader_id = text(&reader, "id");

    // A caller hammering a refused call: ten 403s, one event.
    for _ in 0..10 {
        let res = app
            .post(
                &org.path("/api-tokens"),
                &reader_token,
                json!({"name": "x", "scopes": []}),
            )
            .await;
        assert_eq!(res.status(), 403);
    }
    let denied = |app: &TestApp| {
        let app_base = app.base.clone();
        let org_path = org.path("/audit-events?outcome=denied");
        let token = org.token.clone();
        async move {
            let res = reqwest::Client::new()
                .get(format!("{app_base}{org_path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let page: Value = res.json().await.unwrap();
            page["items"].as_array().unwrap().clone()
        }
    };
    eventually("the refusals are flushed", || async {
        denied(&app)
            .await
            .iter()
            .any(|e| e["actor"]["id"] == reader_id.as_str())
    })
    .await;
    let items = denied(&app).await;
    let hammering: Vec<_> = items
        .iter()
        .filter(|e| e["actor"]["id"] == reader_id.as_str())
        .collect();
    assert_eq!(hammering.len(), 1, "one aggregated event: {items:?}");
    let event = hammering[0];
    assert_eq!(event["action"], "access.denied");
    assert_eq!(event["outcome"], "denied");
    assert_eq!(event["details"]["count"], 10);
    assert_eq!(event["details"]["status"], 403);
    assert_eq!(
        event["details"]["attempted"],
        "POST /api/v1/organizations/{orgID}/api-tokens"
    );
    assert_eq!(event["client_ip"], "127.0.0.1");
    assert_eq!(event["target"]["type"], "organization");
    assert_eq!(event["target"]["id"], org.id.as_str());

    // An attempt on one resource is found by its id, as its changes are.
    let victim = text(&app.create_token(&org, "victim", &[]).await, "id");
    let res = app
        .delete(&org.path(&format!("/api-tokens/{victim}")), &reader_token)
        .await;
    assert_eq!(res.status(), 403);
    let about_victim = org.path(&format!("/audit-events?outcome=denied&target_id={victim}"));
    eventually("the attempt on the token is found by its id", || async {
        let page: Value = app
            .get(&about_victim, &org.token)
            .await
            .json()
            .await
            .unwrap();
        page["items"].as_array().unwrap().iter().any(|e| {
            e["action"] == "access.denied"
                && e["actor"]["id"] == reader_id.as_str()
                && e["target"]["type"] == "api_token"
                && e["details"]["attempted"]
                    == "DELETE /api/v1/organizations/{orgID}/api-tokens/{id}"
        })
    })
    .await;

    // A known but revoked credential presented: recorded against it, by id.
    let res = app
        .delete(&org.path(&format!("/api-tokens/{reader_id}")), &org.token)
        .await;
    assert_eq!(res.status(), 204);
    let res = reqwest::Client::new()
        .get(format!("{}{}", app.base, org.path("/api-tokens")))
        .bearer_auth(&reader_token)
        .header("user-agent", "leaky-ci/1.0")
        .header("x-request-id", "revoked-use-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    eventually("the revoked credential's refusal is recorded", || async {
        denied(&app)
            .await
            .iter()
            .any(|e| e["target"]["id"] == reader_id.as_str() && e["details"]["reason"] == "revoked")
    })
    .await;
    // With where it came from: an auditor can find who still uses it.
    let items = denied(&app).await;
    let revoked_use = items
        .iter()
        .find(|e| e["target"]["id"] == reader_id.as_str() && e["details"]["reason"] == "revoked")
        .unwrap();
    assert_eq!(revoked_use["client_ip"], "127.0.0.1", "{revoked_use}");
    assert_eq!(revoked_use["user_agent"], "leaky-ci/1.0", "{revoked_use}");
    assert_eq!(revoked_use["request_id"], "revoked-use-1", "{revoked_use}");

    // Garbage tokens are only counted in metrics.
    for _ in 0..3 {
        let res = app.get(&org.path("/api-tokens"), "aether_garbage").await;
        assert_eq!(res.status(), 401);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = denied(&app).await;
    assert!(
        after
            .iter()
            .all(|e| e["target"]["id"] == reader_id.as_str()
                || e["actor"]["id"] == reader_id.as_str())
    );

    // Another org's caller probing this org: 404, recorded in the caller's own org.
    let other = app.create_org("other").await;
    let res = app.get(&org.path("/api-tokens"), &other.token).await;
    assert_eq!(res.status(), 404);
    eventually("the probe is recorded in the prober's org", || async {
        let page = events(&app, &other, &other.token, "?outcome=denied").await;
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["details"]["org_id"] == org.id.as_str() && e["details"]["status"] == 404)
    })
    .await;
    assert!(denied(&app).await.iter().all(
        |e| e["details"]["org_id"] != org.id.as_str() || e["actor"]["id"] == reader_id.as_str()
    ));
}

async fn refused_attempts_outlive_a_store_outage(backend: keyplane_store::testing::Backend) {
    let config = keyplane_server::Config {
        audit_refusal_window: Duration::from_millis(100),
        ..test_config()
    };
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    let reader = app.create_token(&org, "reader", &["api_tokens:read"]).await;
    let (reader_token, reader_id) = (text(&reader, "token"), text(&reader, "id"));
    // Verified once while the store answers: its refusals below need no store.
    let res = app.get(&org.path("/api-tokens"), &reader_token).await;
    assert_eq!(res.status(), 200);

    let refuse = |times: usize| {
        let (app, org, token) = (&app, &org, &reader_token);
        async move {
            for _ in 0..times {
                let res = app
                    .post(
                        &org.path("/api-tokens"),
                        token,
                        json!({"name": "x", "scopes": []}),
                    )
                    .await;
                assert_eq!(res.status(), 403);
            }
        }
    };
    store.set_down(true);
    refuse(3).await;
    // Flushes fail meanwhile, and the same refusal comes again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    refuse(2).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.set_down(false);

    let mine = || async {
        let page = events(&app, &org, &org.token, "?outcome=denied").await;
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["actor"]["id"] == reader_id.as_str())
            .cloned()
            .collect::<Vec<Value>>()
    };
    eventually(
        "the refusals are recorded once the store is back",
        || async { !mine().await.is_empty() },
    )
    .await;
    // Every attempt counted, in one event: kept and merged, none lost.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recorded = mine().await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["details"]["count"], 5, "{recorded:?}");
}

/// A flush whose event committed but whose acknowledgement was lost (the connection dropped
/// before the commit's answer) is retried; the retry must not count the refusals again, neither
/// by writing the event a second time nor by adding its count to refusals that came meanwhile.
async fn a_refusal_flush_whose_acknowledgement_was_lost_counts_once(
    backend: keyplane_store::testing::Backend,
) {
    let config = keyplane_server::Config {
        audit_refusal_window: Duration::from_millis(100),
        ..test_config()
    };
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    let reader = app.create_token(&org, "reader", &["api_tokens:read"]).await;
    let (reader_token, reader_id) = (text(&reader, "token"), text(&reader, "id"));
    let refuse = || async {
        let res = app
            .post(
                &org.path("/api-tokens"),
                &reader_token,
                json!({"name": "x", "scopes": []}),
            )
            .await;
        assert_eq!(res.status(), 403);
    };
    store.lose_next_audit_append_ack();
    store.hold_audit_appends(true);
    refuse().await;
    eventually("the flush of the first refusal is on its way", || async {
        store.audit_appends_waiting() > 0
    })
    .await;
    // The same refusal again while that flush runs.
    refuse().await;
    store.hold_audit_appends(false);

    let counted = || async {
        let page = events(&app, &org, &org.token, "?outcome=denied").await;
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["actor"]["id"] == reader_id.as_str())
            .map(|e| e["details"]["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    eventually("both refusals are recorded", || async {
        counted().await >= 2
    })
    .await;
    assert_eq!(counted().await, 2);
    // The retry found its event written (the same flush wrote it before the second refusal's):
    // nothing was refused by the store, nor reported lost.
    let metrics = app.metrics().await;
    let dropped = metrics
        .lines()
        .find(|line| line.starts_with("keyplane_audit_refusals_dropped"))
        .unwrap_or_default();
    assert!(dropped.ends_with(" 0"), "{dropped}");
}

async fn pages_filters_and_tenant_isolation(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(text(
            &app.create_token(&org, &format!("t{i}"), &["deploy"]).await,
            "id",
        ));
    }
    let res = app
        .delete(&org.path(&format!("/api-tokens/{}", ids[0])), &org.token)
        .await;
    assert_eq!(res.status(), 204);
    // 1 org + its token + 5 creates + 1 revoke = 8 events; pages of 3, newest first.
    let first = events(&app, &org, &org.token, "?limit=3").await;
    assert_eq!(
        actions(&first),
        [
            "api_token.revoked",
            "api_token.created",
            "api_token.created"
        ]
    );
    let cursor = text(&first, "next_cursor");
    let second = events(&app, &org, &org.token, &format!("?limit=3&cursor={cursor}")).await;
    assert_eq!(second["items"].as_array().unwrap().len(), 3);
    let third = events(
        &app,
        &org,
        &org.token,
        &format!("?limit=3&cursor={}", text(&second, "next_cursor")),
    )
    .await;
    assert_eq!(
        actions(&third),
        ["api_token.created", "organization.created"]
    );
    assert!(third["next_cursor"].is_null());

    // Filters: exact action (repeatable), prefix, target, actor, outcome, time.
    let created = events(&app, &org, &org.token, "?action=api_token.created").await;
    assert_eq!(created["items"].as_array().unwrap().len(), 6);
    let both = events(
        &app,
        &org,
        &org.token,
        "?action=api_token.revoked&action=organization.created",
    )
    .await;
    assert_eq!(
        actions(&both),
        ["api_token.revoked", "organization.created"]
    );
    let prefixed = events(&app, &org, &org.token, "?action=api_token.*").await;
    assert_eq!(
        prefixed["items"].as_array().unwrap().len(),
        7,
        "the organization's token's creation too"
    );
    // A webhook's patterns pass as they are: `*` filters nothing, and as many as it may hold (50).
    let every = events(
        &app,
        &org,
        &org.token,
        "?action=*&action=api_token.created&limit=100",
    )
    .await;
    assert_eq!(every["items"].as_array().unwrap().len(), 8, "{every}");
    let many: String = (0..49)
        .map(|i| format!("&action=nothing_{}.created", (b'a' + i as u8 % 26) as char))
        .collect();
    let fifty = events(
        &app,
        &org,
        &org.token,
        &format!("?action=api_token.*{many}"),
    )
    .await;
    assert_eq!(fifty["items"].as_array().unwrap().len(), 7, "{fifty}");
    let res = app
        .get(
            &org.path(&format!(
                "/audit-events?action=api_token.*&action=x.y{many}"
            )),
            &org.token,
        )
        .await;
    let details = assert_error(res, 422, "validation_failed").await;
    assert_eq!(
        fields(&details)
            .into_iter()
            .map(|(f, _)| f)
            .collect::<Vec<_>>(),
        ["action"]
    );
    let about = events(&app, &org, &org.token, &format!("?target_id={}", ids[0])).await;
    assert_eq!(actions(&about), ["api_token.revoked", "api_token.created"]);
    let by_actor = events(&app, &org, &org.token, &format!("?actor_id={}", ids[1])).await;
    assert!(by_actor["items"].as_array().unwrap().is_empty());
    let denied = events(&app, &org, &org.token, "?outcome=denied").await;
    assert!(denied["items"].as_array().unwrap().is_empty());
    let future = events(&app, &org, &org.token, "?since=2999-01-01T00:00:00Z").await;
    assert!(future["items"].as_array().unwrap().is_empty());
    let past = events(
        &app,
        &org,
        &org.token,
        "?until=2999-01-01T00:00:00Z&limit=100",
    )
    .await;
    assert_eq!(past["items"].as_array().unwrap().len(), 8);

    // Bad filters: every one reported.
    let res = app
        .get(
            &org.path("/audit-events?limit=0&cursor=x&action=API&outcome=maybe&since=yesterday"),
            &org.token,
        )
        .await;
    let details = assert_error(res, 422, "validation_failed").await;
    let mut reported: Vec<String> = fields(&details).into_iter().map(|(f, _)| f).collect();
    reported.sort();
    assert_eq!(reported, ["action", "cursor", "limit", "outcome", "since"]);

    // Forward from a `seq`, oldest first, whatever the events' times: how a follower misses none.
    let seqs = |page: &Value| -> Vec<u64> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    let mut oldest_first = seqs(&past);
    oldest_first.reverse();
    let forward = events(
        &app,
        &org,
        &org.token,
        &format!("?after_seq={}&limit=2", oldest_first[1]),
    )
    .await;
    assert_eq!(seqs(&forward), oldest_first[2..4]);
    assert!(forward["next_cursor"].is_null(), "{forward}");
    for bad in [
        "after_seq=-1",
        "after_seq=9223372036854775808",
        "after_seq=3&cursor=0190aaaa-0000-7000-8000-000000000000",
    ] {
        let res = app
            .get(&org.path(&format!("/audit-events?{bad}")), &org.token)
            .await;
        let details = assert_error(res, 422, "validation_failed").await;
        let reported: Vec<String> = fields(&details).into_iter().map(|(f, _)| f).collect();
        assert_eq!(reported, ["after_seq"], "{bad}");
    }

    // `audit:read` is needed; another org's caller gets 404.
    let deployer = app
        .create_token(&org, "deployer", &["api_tokens:read"])
        .await;
    let res = app
        .get(
            &org.path("/audit-events"),
            deployer["token"].as_str().unwrap(),
        )
        .await;
    assert_error(res, 403, "forbidden").await;
    let auditor = app.create_token(&org, "auditor", &["audit:read"]).await;
    let res = app
        .get(
            &org.path("/audit-events"),
            auditor["token"].as_str().unwrap(),
        )
        .await;
    assert_eq!(res.status(), 200);
    let other = app.create_org("other").await;
    let res = app.get(&org.path("/audit-events"), &other.token).await;
    assert_error(res, 404, "not_found").await;
    let theirs = events(&app, &other, &other.token, "").await;
    assert_eq!(
        actions(&theirs),
        ["api_token.created", "organization.created"]
    );
}

/// Two replicas on one PostgreSQL, creating at once in one org: one chain, no gap, no fork.
#[tokio::test]
async fn concurrent_replicas_write_one_unbroken_chain() {
    let first = TestApp::spawn(keyplane_store::testing::Backend::Postgres).await;
    let second = first.replica().await;
    let org = first.create_org("acme").await;
    let path = org.path("/api-tokens");
    let creates = (0..30).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        app.post(
            &path,
            &org.token,
            json!({"name": format!("t{i}"), "scopes": []}),
        )
    });
    for res in futures::future::join_all(creates).await {
        assert_eq!(res.status(), 201);
    }
    let store = first.app.store();
    let tenant = keyplane_core::TenantId::parse(&org.id).unwrap();
    let state = store.audit_chain_state(tenant).await.unwrap();
    assert_eq!(state.head_seq, 32);
    let events = store
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(tenant, 0, 100))
        .await
        .unwrap();
    let mut verifier =
        keyplane_core::audit::ChainVerifier::from_anchor(0, keyplane_core::audit::GENESIS);
    for event in &events {
        verifier.check(event).unwrap();
    }
    assert_eq!(verifier.finish(state.head_seq, state.head_hash), Ok(32));
}

/// The token an organization is created with and the robot enabling its registry creates are
/// credentials like the others: each has its own `*.created` event, found by its `target_id`.
async fn first_credentials_have_their_own_created_events(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let by_target = |id: String| {
        let (app, org) = (&app, &org);
        async move {
            let page = events(app, org, &org.token, &format!("?target_id={id}")).await;
            page["items"].as_array().unwrap().clone()
        }
    };
    let org_created = app.audit_events(&org, "organization.created").await;
    let first_token = text(&org_created[0]["details"], "api_token_id");
    let token_events = by_target(first_token).await;
    assert_eq!(
        actions(&json!({ "items": token_events })),
        ["api_token.created"]
    );
    assert_eq!(token_events[0]["details"]["scopes"], json!(["*"]));
    assert_eq!(token_events[0]["details"]["via"], "admin create-org");

    // The bootstrap of an empty store: the same two events.
    let bootstrapped = TestApp::spawn(backend).await;
    let created = keyplane_server::ops::mint_first_org(
        "first",
        keyplane_core::CreatedBy::system(keyplane_core::Channel::Bootstrap),
    )
    .unwrap();
    assert!(
        keyplane_server::ops::bootstrap(bootstrapped.app.store().as_ref(), &created)
            .await
            .unwrap()
    );
    let bootstrap_events = bootstrapped
        .app
        .store()
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(
            created.tenant.id,
            0,
            10,
        ))
        .await
        .unwrap();
    let seen: Vec<_> = bootstrap_events
        .iter()
        .map(|e| (e.event.action.as_str(), e.event.target.as_ref().unwrap().id))
        .collect();
    assert_eq!(
        seen,
        [
            ("organization.created", created.tenant.id.as_uuid()),
            ("api_token.created", created.token.credential.id.as_uuid())
        ]
    );

    ok_json(
        app.post_empty(&org.path("/registry"), &org.token).await,
        201,
        "enable registry",
    )
    .await;
    let enabled = app.audit_events(&org, "registry.enabled").await;
    let robot_id = text(&enabled[0]["details"], "default_robot_id");
    let robot_events = by_target(robot_id).await;
    assert_eq!(
        actions(&json!({ "items": robot_events })),
        ["robot_account.created"]
    );
    assert_eq!(
        robot_events[0]["details"]["permissions"],
        json!(["pull", "push"])
    );
}

/// A server exporting to a new file in `dir`, with its store behind a [`FaultyStore`].
async fn exporting(
    backend: keyplane_store::testing::Backend,
    dir: &std::path::Path,
) -> (TestApp, std::sync::Arc<FaultyStore>, std::path::PathBuf) {
    let log = dir.join("audit.log");
    let mut config = test_config();
    config.audit_log = Some(keyplane_server::audit::AuditLogTarget::File(log.clone()));
    let (app, store) = FaultyStore::spawn(backend, config).await;
    (app, store, log)
}

/// The ids in the exported file, each with how many times it was written.
fn exported(log: &std::path::Path) -> std::collections::HashMap<String, usize> {
    let mut ids = std::collections::HashMap::new();
    let text_of_log = std::fs::read_to_string(log).unwrap_or_default();
    // A line being written is not whole yet.
    for event in text_of_log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
    {
        *ids.entry(text(&event, "id")).or_default() += 1;
    }
    ids
}

/// Every event of `org` listed by the API: (seq, id, chain_hash), oldest first.
async fn chain(app: &TestApp, org: &Org) -> Vec<(u64, String, String)> {
    let page = events(app, org, &org.token, "?limit=100").await;
    let mut chain: Vec<_> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                text(e, "id"),
                text(e, "chain_hash"),
            )
        })
        .collect();
    chain.reverse();
    chain
}

async fn exported_within(log: &std::path::Path, ids: &[String], what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let written = exported(log);
        if ids.iter().all(|id| written.contains_key(id)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn every_event_exported(app: &TestApp, org: &Org, log: &std::path::Path, what: &str) {
    let ids: Vec<String> = chain(app, org)
        .await
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    exported_within(log, &ids, what).await;
}

/// The chain goes back after the export wrote it (a failover to a standby that lost the last
/// commits, a restore): the new events take the seqs already exported, and are exported too.
async fn the_export_writes_the_events_of_a_chain_that_went_back(
    backend: keyplane_store::testing::Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let (app, _store, log) = exporting(backend, dir.path()).await;
    let org = app.create_org("acme").await;
    for i in 0..4 {
        app.create_token(&org, &format!("t{i}"), &[]).await;
    }
    let before = chain(&app, &org).await;
    assert_eq!(before.len(), 6);
    let ids: Vec<String> = before.iter().map(|(_, id, _)| id.clone()).collect();
    exported_within(&log, &ids, "the first events exported").await;

    // Back to seq 3, as a standby missing the last three commits would be.
    let (seq, _, hash) = &before[2];
    app.execute_sql(&format!("DELETE FROM audit_events WHERE seq > {seq}"))
        .await;
    app.execute_sql(&format!(
        "UPDATE audit_chain_heads SET seq = {seq}, chain_hash = '{hash}'"
    ))
    .await;
    // Three events reuse seqs 4..6, the fourth goes past where the export was.
    for i in 0..4 {
        app.create_token(&org, &format!("after{i}"), &[]).await;
    }
    let after = chain(&app, &org).await;
    assert_eq!(after.len(), 7);
    let new: Vec<String> = after[3..].iter().map(|(_, id, _)| id.clone()).collect();
    exported_within(&log, &new, "the events after the chain went back").await;
}

/// While the cursor cannot be saved, what was written is not written again at every poll.
async fn a_failing_cursor_save_does_not_repeat_exported_lines(
    backend: keyplane_store::testing::Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let (app, store, log) = exporting(backend, dir.path()).await;
    let org = app.create_org("acme").await;
    store.set_cursor_saves_down(true);
    app.create_token(&org, "t0", &[]).await;
    every_event_exported(&app, &org, &log, "the events exported").await;
    // Five polls and more.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    store.set_cursor_saves_down(false);
    app.create_token(&org, "t1", &[]).await;
    every_event_exported(&app, &org, &log, "the later events exported").await;
    let written = exported(&log);
    assert!(
        written.values().all(|count| *count == 1),
        "lines written again: {written:?}"
    );
}

/// Each `credential_policy.updated` carries the policy it replaced, as `old_*`.
async fn a_policy_update_records_the_values_it_replaced(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    for body in [
        json!({"all": {"max_lifetime_days": 90}, "api_tokens": {"require_expiry": true}}),
        json!({"all": {"max_lifetime_days": 30}, "on_leak": "suspend"}),
    ] {
        crate::lifecycle::put_policy(&app, &org, body).await;
    }
    let updates = app.audit_events(&org, "credential_policy.updated").await;
    let (second, first) = (&updates[0]["details"], &updates[1]["details"]);
    for key in ["all", "on_leak", "api_tokens"] {
        assert_eq!(second[format!("old_{key}")], first[key], "{key}: {second}");
    }
    assert!(second.get("api_tokens").is_none(), "{second}");
    assert_eq!(second["on_leak"], "suspend");
    assert_eq!(
        first["old_all"],
        "max_lifetime_days=none require_expiry=false default_lifetime_days=none"
    );
}

/// An export stalled by a store outage says so once (naming its log), not at every 200 ms pass,
/// and says when it goes on.
async fn a_stalled_export_says_so_once_and_again_when_it_goes_on(
    backend: keyplane_store::testing::Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let (app, store, log) = exporting(backend, dir.path()).await;
    let org = app.create_org("acme").await;
    let named = log.display().to_string();
    let lines_saying = |what: &str| {
        crate::logs::captured()
            .lines()
            .filter(|line| line.contains(what) && line.contains(&named))
            .count()
    };
    store.set_down(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lines_saying("audit export stalled"), 1);
    store.set_down(false);
    app.create_token(&org, "after", &[]).await;
    every_event_exported(&app, &org, &log, "the events written after the outage").await;
    // The pass that wrote those lines still saves its cursors before it says it goes on.
    eventually("the export says it goes on", || async {
        lines_saying("audit export goes on") > 0
    })
    .await;
    assert_eq!(lines_saying("audit export stalled"), 1);
    assert_eq!(lines_saying("audit export goes on"), 1);
}

/// The name the export to `log` keeps its cursors under, and the cursor of `org` saved there at
/// `seq`: as the export leaves them once it wrote that far.
async fn exported_through(app: &TestApp, log: &std::path::Path, org: &Org, seq: u64) -> String {
    let consumer = format!("file:{}", log.display());
    let tenant = keyplane_core::TenantId::from_uuid(org.id.parse().unwrap());
    app.app
        .store()
        .save_audit_export_cursors(&consumer, &[(tenant, seq)])
        .await
        .expect("save the export's cursor");
    consumer
}

/// A server (no export) with an organization whose chain holds six events; its chain.
async fn six_events(
    backend: keyplane_store::testing::Backend,
) -> (TestApp, Org, Vec<(u64, String, String)>) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    for i in 0..4 {
        app.create_token(&org, &format!("t{i}"), &[]).await;
    }
    let events = chain(&app, &org).await;
    assert_eq!(events.len(), 6);
    (app, org, events)
}

/// The export is the archive: retention prunes no event it has not written. Its log cannot be
/// written (its directory is gone, as a full or lost volume) for longer than the retention:
/// events it wrote are pruned, those after its cursor stay for it.
async fn retention_keeps_what_the_export_has_not_written(
    backend: keyplane_store::testing::Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let (app, org, before) = six_events(backend).await;
    let log = dir.path().join("gone").join("audit.log");
    let cursor = before[2].0;
    exported_through(&app, &log, &org, cursor).await;

    // Two days on, a server keeping a day (at its start) and exporting to that log.
    let mut config = test_config();
    config.audit_log = Some(keyplane_server::audit::AuditLogTarget::File(log));
    config.audit_retention_days = 1;
    config.clock.advance(Duration::from_secs(2 * 86400));
    let _pruning = app.replica_at(app.database_url(), config).await;
    eventually("retention pruned", || async {
        !app.audit_events(&org, "audit.pruned").await.is_empty()
    })
    .await;
    let pruned = app.audit_events(&org, "audit.pruned").await;
    assert_eq!(pruned.len(), 1, "{pruned:?}");
    assert_eq!(
        pruned[0]["details"]["through_seq"], cursor,
        "pruned past the export's cursor: {pruned:?}"
    );
    let left: Vec<u64> = chain(&app, &org)
        .await
        .iter()
        .map(|(seq, ..)| *seq)
        .collect();
    assert_eq!(
        left,
        [4, 5, 6, 7],
        "the unexported events and the pruning's record"
    );
}

/// Events pruned before the export wrote them (by a replica without the export, here the
/// store's own prune): the export notices the gap after its cursor, says so (an error naming the
/// organization), counts the events and lists them on `/readyz`, and writes on from what is there.
async fn the_export_reports_events_pruned_before_it_wrote_them(
    backend: keyplane_store::testing::Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let (app, org, _) = six_events(backend).await;
    let log = dir.path().join("audit.log");
    exported_through(&app, &log, &org, 2).await;
    let future = chrono::Utc::now() + chrono::TimeDelta::days(1);
    let record = keyplane_server::ops::audit_pruned(future, 1);
    while app
        .app
        .store()
        .prune_audit_events(future, 1000, None, &record)
        .await
        .unwrap()
        > 0
    {}
    let left = chain(&app, &org).await;
    assert_eq!(left.len(), 1, "only the pruning's record: {left:?}");
    assert_eq!(left[0].0, 7);

    let mut config = test_config();
    config.audit_log = Some(keyplane_server::audit::AuditLogTarget::File(log.clone()));
    let exporting = app.replica_at(app.database_url(), config).await;
    exported_within(&log, &[left[0].1.clone()], "the events after the gap").await;
    let ready = crate::clock_skew::readiness(&exporting).await;
    let audit = &ready["audit"];
    assert_eq!(audit["status"], "missing_events", "{ready}");
    assert_eq!(
        (
            &audit["organizations_behind"],
            &audit["organizations_missing_events"],
            &audit["events_missing"]
        ),
        (&json!(0), &json!(1), &json!(4)),
        "{ready}"
    );
    // It names no organization: the log does (below), with where the gap is.
    assert!(!ready.to_string().contains(&org.id), "{ready}");
    assert_eq!(
        exporting
            .metric("keyplane_audit_export_missed_events_total")
            .await,
        4
    );
    assert!(crate::logs::captured().lines().any(|line| line
        .contains("audit events missing from the audit log")
        && line.contains(&org.id)
        && line.contains("after seq 2 and before seq 7")));
}
