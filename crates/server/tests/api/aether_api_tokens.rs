//! `/api/v1/organizations/{orgID}/api-tokens`, every status path.

use crate::helpers::{
    assert_error, both_backends, eventually, fields, retry_after_secs, test_config, TestApp,
};
use keyplane_server::Config;
use keyplane_store::testing::Backend;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;

const FIELDS: [&str; 12] = [
    "id",
    "org_id",
    "name",
    "prefix",
    "scopes",
    "last_used_at",
    "expires_at",
    "created_at",
    // The lifecycle (rotation with a grace period, suspension).
    "previous_secret_expires_at",
    "previous_secret_last_used_at",
    "suspended_at",
    // Always present: true only for a canary.
    "canary",
];

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

fn documented(with_token: bool) -> BTreeSet<String> {
    let mut set: BTreeSet<String> = FIELDS.iter().map(|s| s.to_string()).collect();
    if with_token {
        set.insert("token".into());
    }
    set
}

async fn create_returns_the_documented_fields_and_a_one_time_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "  ci deploy  ", "scopes": ["api_tokens:read", "deploy:prod"], "expires_at": "2099-01-01T00:00:00+02:00"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(keys(&body), documented(true));
    let token = body["token"].as_str().unwrap();
    assert_eq!(token.len(), 63);
    assert!(
        token.starts_with("aether_")
            && token[7..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_eq!(body["prefix"], &token[..15]);
    assert_eq!(body["org_id"], org.id);
    assert_eq!(body["name"], "ci deploy");
    assert_eq!(body["scopes"], json!(["api_tokens:read", "deploy:prod"]));
    assert_eq!(body["expires_at"], "2098-12-31T22:00:00Z");
    assert_eq!(body["last_used_at"], Value::Null);
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
    uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap();

    // The new token works, and a read never shows a secret again.
    let listed = app.get(&org.path("/api-tokens"), token).await;
    assert_eq!(listed.status(), 200);
    let text = listed.text().await.unwrap();
    assert!(!text.contains(token) && !text.contains(&org.token) && !text.contains("\"token\""));
    let one = app
        .get(
            &org.path(&format!("/api-tokens/{}", body["id"].as_str().unwrap())),
            token,
        )
        .await;
    assert_eq!(one.status(), 200);
    let one: Value = one.json().await.unwrap();
    assert_eq!(keys(&one), documented(false));
    assert_eq!(one["prefix"], body["prefix"]);
}

async fn scopes_default_to_none_and_null_expiry_is_allowed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "bare", "expires_at": null}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["scopes"], json!([]));
    assert_eq!(body["expires_at"], Value::Null);
    // A token with no scopes authenticates but may do nothing.
    assert_error(
        app.get(&org.path("/api-tokens"), body["token"].as_str().unwrap())
            .await,
        403,
        "forbidden",
    )
    .await;
}

async fn list_pages_with_cursor_and_limit(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    for i in 0..5 {
        app.create_token(&org, &format!("t{i}"), &[]).await;
    }
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => org.path(&format!("/api-tokens?limit=2&cursor={c}")),
            None => org.path("/api-tokens?limit=2"),
        };
        let res = app.get(&path, &org.token).await;
        assert_eq!(res.status(), 200);
        let page: Value = res.json().await.unwrap();
        assert_eq!(
            keys(&page),
            ["items", "next_cursor"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        names.extend(
            items
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_string()),
        );
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(names, ["bootstrap", "t0", "t1", "t2", "t3", "t4"]);
    assert_eq!(pages, 3);

    let all: Value = app
        .get(&org.path("/api-tokens"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 6);
    assert_eq!(all["next_cursor"], Value::Null);

    for bad in ["limit=0", "limit=101", "limit=abc", "limit=-1"] {
        let details = assert_error(
            app.get(&org.path(&format!("/api-tokens?{bad}")), &org.token)
                .await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(
            fields(&details),
            [("limit".to_string(), "out_of_range".to_string())],
            "{bad}"
        );
    }
    let details = assert_error(
        app.get(&org.path("/api-tokens?cursor=nope"), &org.token)
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        fields(&details),
        [("cursor".to_string(), "invalid_uuid".to_string())]
    );
    assert_eq!(
        app.get(&org.path("/api-tokens?limit=100"), &org.token)
            .await
            .status(),
        200
    );
}

async fn get_unknown_or_malformed_ids(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let unknown = uuid::Uuid::new_v4();
    assert_error(
        app.get(&org.path(&format!("/api-tokens/{unknown}")), &org.token)
            .await,
        404,
        "not_found",
    )
    .await;
    let details = assert_error(
        app.get(&org.path("/api-tokens/not-a-uuid"), &org.token)
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        fields(&details),
        [("id".to_string(), "invalid_uuid".to_string())]
    );
    // `%FF` is not UTF-8 once decoded: the same answer, not a plain-text 400.
    for bad in ["xyz", "%FF"] {
        let details = assert_error(
            app.get(
                &format!("/api/v1/organizations/{bad}/api-tokens"),
                &org.token,
            )
            .await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(
            fields(&details),
            [("orgID".to_string(), "invalid_uuid".to_string())],
            "{bad}"
        );
    }
    let details = assert_error(
        app.get(&org.path("/api-tokens/%C3%28"), &org.token).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        fields(&details),
        [("id".to_string(), "invalid_uuid".to_string())]
    );
    // Path UUIDs are accepted in upper case, as the docs' examples write them.
    let upper = org
        .path("/api-tokens")
        .replace(&org.id, &org.id.to_uppercase());
    assert_eq!(app.get(&upper, &org.token).await.status(), 200);
}

/// A token with `api_tokens:write` cannot revoke a token holding more than it does (the org's
/// `*`), and the refusal says so in terms of managing, not of granting.
async fn a_narrow_writer_cannot_revoke_a_broader_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let writer = app
        .create_token(&org, "writer", &["api_tokens:write", "api_tokens:read"])
        .await;
    let writer = writer["token"].as_str().unwrap();
    let admin = app.create_token(&org, "admin", &["*"]).await;
    let admin_id = admin["id"].as_str().unwrap();

    let refused = app
        .delete(&org.path(&format!("/api-tokens/{admin_id}")), writer)
        .await;
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    assert_eq!(
        body["error"]["message"],
        "cannot manage a credential holding scopes this caller does not hold: *"
    );
    assert_eq!(
        app.get(&org.path("/api-tokens"), admin["token"].as_str().unwrap())
            .await
            .status(),
        200,
        "the broader token still works"
    );
}

async fn delete_revokes_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "doomed", &["api_tokens:read"]).await;
    let (id, token) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    assert_eq!(app.get(&org.path("/api-tokens"), token).await.status(), 200);

    let res = app
        .delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await;
    assert_eq!(res.status(), 204);
    assert!(res.bytes().await.unwrap().is_empty());

    let refused = app.get(&org.path("/api-tokens"), token).await;
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    assert_error(refused, 401, "unauthorized").await;
    assert_error(
        app.get(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
            .await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({}),
        )
        .await,
        404,
        "not_found",
    )
    .await;
    let list: Value = app
        .get(&org.path("/api-tokens"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["id"] != id));
    // The name is free again.
    app.create_token(&org, "doomed", &[]).await;
}

async fn rotate_keeps_the_id_and_kills_the_old_secret(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = app
        .create_token(&org, "rotating", &["api_tokens:read"])
        .await;
    let (id, old) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let res = app
        .request(
            Method::POST,
            &org.path(&format!("/api-tokens/{id}/rotate")),
            Some(&org.token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rotated: Value = res.json().await.unwrap();
    assert_eq!(keys(&rotated), documented(true));
    assert_eq!(rotated["id"], id);
    assert_eq!(rotated["name"], "rotating");
    assert_eq!(rotated["scopes"], json!(["api_tokens:read"]));
    let new = rotated["token"].as_str().unwrap();
    assert_ne!(new, old);
    assert_eq!(rotated["prefix"], &new[..15]);
    assert_error(
        app.get(&org.path("/api-tokens"), old).await,
        401,
        "unauthorized",
    )
    .await;
    assert_eq!(app.get(&org.path("/api-tokens"), new).await.status(), 200);
}

async fn unauthenticated_requests_get_401(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.path("/api-tokens");
    let mut forged = org.token.clone();
    forged.replace_range(20..21, if &forged[20..21] == "a" { "b" } else { "a" });
    // Well-formed (checksum valid) but never issued.
    let unknown = {
        let other = TestApp::spawn(Backend::Sqlite).await;
        other.create_org("elsewhere").await.token
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("empty bearer", Some("Bearer ".into())),
        ("garbage", Some("Bearer hello".into())),
        ("bad checksum", Some(format!("Bearer {forged}"))),
        ("never issued", Some(format!("Bearer {unknown}"))),
        ("wrong scheme", Some(format!("Basic {}", org.token))),
        ("no scheme", Some(org.token.clone())),
    ];
    for (what, header) in cases {
        let mut request = app.request(Method::GET, &path, None);
        if let Some(header) = header {
            request = request.header("authorization", header);
        }
        let res = request.send().await.unwrap();
        assert_eq!(
            res.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "{what}"
        );
        assert_error(res, 401, "unauthorized").await;
    }
    // 401 comes before any other check: even a bad body or a foreign org.
    let res = app
        .request(
            Method::POST,
            "/api/v1/organizations/not-a-uuid/api-tokens",
            None,
        )
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "unauthorized").await;
    // The scheme is case-insensitive.
    let res = app
        .request(Method::GET, &path, None)
        .header("authorization", format!("bearer {}", org.token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

async fn expired_tokens_are_rejected(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let expires = chrono::Utc::now() + chrono::TimeDelta::milliseconds(1500);
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "short", "scopes": ["api_tokens:read"], "expires_at": expires.to_rfc3339()}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let token = res.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        app.get(&org.path("/api-tokens"), &token).await.status(),
        200
    );
    tokio::time::sleep(
        (expires - chrono::Utc::now()).to_std().unwrap_or_default()
            + std::time::Duration::from_millis(100),
    )
    .await;
    assert_error(
        app.get(&org.path("/api-tokens"), &token).await,
        401,
        "unauthorized",
    )
    .await;
}

async fn scopes_limit_what_a_token_may_do(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let reader = app.create_token(&org, "reader", &["api_tokens:read"]).await;
    let reader = reader["token"].as_str().unwrap();
    let writer = app
        .create_token(&org, "writer", &["api_tokens:write", "deploy"])
        .await;
    let writer_id = writer["id"].as_str().unwrap().to_string();
    let writer = writer["token"].as_str().unwrap();
    let custom = app
        .create_token(&org, "custom", &["deploy", "api_tokens:admin"])
        .await;
    let custom = custom["token"].as_str().unwrap();

    // read, not write
    assert_eq!(
        app.get(&org.path("/api-tokens"), reader).await.status(),
        200
    );
    assert_error(
        app.post(&org.path("/api-tokens"), reader, json!({"name": "x"}))
            .await,
        403,
        "forbidden",
    )
    .await;
    // write, not read
    assert_error(
        app.get(&org.path("/api-tokens"), writer).await,
        403,
        "forbidden",
    )
    .await;
    // Other scope strings confer nothing.
    assert_error(
        app.get(&org.path("/api-tokens"), custom).await,
        403,
        "forbidden",
    )
    .await;
    assert_error(
        app.post(&org.path("/api-tokens"), custom, json!({"name": "x"}))
            .await,
        403,
        "forbidden",
    )
    .await;

    // A writer may mint only what it holds.
    let ok = app
        .post(
            &org.path("/api-tokens"),
            writer,
            json!({"name": "child", "scopes": ["deploy"]}),
        )
        .await;
    assert_eq!(ok.status(), 201);
    for escalation in [
        json!(["*"]),
        json!(["api_tokens:read"]),
        json!(["deploy", "billing"]),
    ] {
        let res = app
            .post(
                &org.path("/api-tokens"),
                writer,
                json!({"name": "escalate", "scopes": escalation}),
            )
            .await;
        assert_error(res, 403, "forbidden").await;
    }
    // Rotating hands out the new secret, so a writer cannot rotate a more powerful token...
    let list: Value = app
        .get(&org.path("/api-tokens"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    let bootstrap_id = list["items"][0]["id"].as_str().unwrap();
    assert_error(
        app.post(
            &org.path(&format!("/api-tokens/{bootstrap_id}/rotate")),
            writer,
            json!({}),
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    // ...nor revoke it (managing a credential needs every right it holds)...
    assert_error(
        app.delete(&org.path(&format!("/api-tokens/{bootstrap_id}")), writer)
            .await,
        403,
        "forbidden",
    )
    .await;
    assert_eq!(
        app.get(&org.path("/api-tokens"), &org.token).await.status(),
        200
    );
    // ...nor revoke it (managing a credential needs every right it holds)...
    assert_error(
        app.delete(&org.path(&format!("/api-tokens/{bootstrap_id}")), writer)
            .await,
        403,
        "forbidden",
    )
    .await;
    assert_eq!(
        app.get(&org.path("/api-tokens"), &org.token).await.status(),
        200
    );
    // ...but may rotate itself.
    assert_eq!(
        app.post(
            &org.path(&format!("/api-tokens/{writer_id}/rotate")),
            writer,
            json!({})
        )
        .await
        .status(),
        200
    );
}

async fn other_tenants_resources_answer_404(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mine = app.create_org("mine").await;
    let theirs = app.create_org("theirs").await;
    let their_token = app.create_token(&theirs, "victim", &[]).await;
    let their_id = their_token["id"].as_str().unwrap();

    // My `*` token against their org: 404 on every route, never 403.
    assert_error(
        app.get(&theirs.path("/api-tokens"), &mine.token).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.post(
            &theirs.path("/api-tokens"),
            &mine.token,
            json!({"name": "x"}),
        )
        .await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.get(
            &theirs.path(&format!("/api-tokens/{their_id}")),
            &mine.token,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.delete(
            &theirs.path(&format!("/api-tokens/{their_id}")),
            &mine.token,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.post(
            &theirs.path(&format!("/api-tokens/{their_id}/rotate")),
            &mine.token,
            json!({}),
        )
        .await,
        404,
        "not_found",
    )
    .await;
    // Their token id under my org: not found either.
    assert_error(
        app.get(&mine.path(&format!("/api-tokens/{their_id}")), &mine.token)
            .await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.delete(&mine.path(&format!("/api-tokens/{their_id}")), &mine.token)
            .await,
        404,
        "not_found",
    )
    .await;
    // A made-up org looks exactly the same as a real foreign one.
    let made_up = format!("/api/v1/organizations/{}/api-tokens", uuid::Uuid::new_v4());
    assert_error(app.get(&made_up, &mine.token).await, 404, "not_found").await;
    // And their token is untouched.
    assert_eq!(
        app.get(
            &theirs.path(&format!("/api-tokens/{their_id}")),
            &theirs.token
        )
        .await
        .status(),
        200
    );
}

async fn validation_reports_every_bad_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.path("/api-tokens");
    let cases = [
        (json!({}), vec![("name", "required")]),
        (json!({"name": "   "}), vec![("name", "too_short")]),
        (json!({"name": "x".repeat(121)}), vec![("name", "too_long")]),
        (
            json!({"name": "a\nb"}),
            vec![("name", "invalid_characters")],
        ),
        (json!({"name": 5}), vec![("name", "invalid_type")]),
        (
            json!({"name": "ok", "scopes": "api_tokens:read"}),
            vec![("scopes", "invalid_type")],
        ),
        (
            json!({"name": "ok", "scopes": ["good", "has space", "", "good"]}),
            vec![
                ("scopes[1]", "invalid_scope"),
                ("scopes[2]", "invalid_scope"),
                ("scopes[3]", "duplicate"),
            ],
        ),
        (
            json!({"name": "ok", "scopes": ["a", 7]}),
            vec![("scopes[1]", "invalid_type")],
        ),
        (
            json!({"name": "ok", "expires_at": "next tuesday"}),
            vec![("expires_at", "invalid_format")],
        ),
        (
            json!({"name": "ok", "expires_at": "2001-01-01T00:00:00Z"}),
            vec![("expires_at", "not_in_future")],
        ),
        (
            json!({"name": "ok", "expires_at": 1893456000}),
            vec![("expires_at", "invalid_type")],
        ),
        (
            json!({"name": "ok", "scope": ["typo"]}),
            vec![("scope", "unknown_field")],
        ),
        (
            json!({"name": "", "scopes": ["x y"], "expires_at": "2001-01-01T00:00:00Z", "extra": true}),
            vec![
                ("name", "too_short"),
                ("scopes[0]", "invalid_scope"),
                ("expires_at", "not_in_future"),
                ("extra", "unknown_field"),
            ],
        ),
        (json!(["name"]), vec![("body", "invalid_type")]),
    ];
    for (body, expected) in cases {
        let details = assert_error(
            app.post(&path, &org.token, body.clone()).await,
            422,
            "validation_failed",
        )
        .await;
        let expected: Vec<(String, String)> = expected
            .into_iter()
            .map(|(f, c)| (f.to_string(), c.to_string()))
            .collect();
        assert_eq!(fields(&details), expected, "body {body}");
    }
    // Nothing was created by any of them.
    let list: Value = app.get(&path, &org.token).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

async fn malformed_bodies_get_their_own_statuses(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.path("/api-tokens");
    let send = |content_type: Option<&'static str>, body: Vec<u8>| {
        let mut request = app
            .request(Method::POST, &path, Some(&org.token))
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send()
    };
    assert_error(
        send(Some("application/json"), b"{\"name\": ".to_vec())
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        send(Some("application/json"), Vec::new()).await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        send(None, b"{\"name\":\"x\"}".to_vec()).await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    assert_error(
        send(Some("text/plain"), b"{\"name\":\"x\"}".to_vec())
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    let mut huge = b"{\"name\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 70 * 1024));
    huge.extend(b"\"}");
    assert_error(
        send(Some("application/json"), huge).await.unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    let res = send(
        Some("application/json; charset=utf-8"),
        b"{\"name\":\"fine\"}".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
}

async fn duplicate_live_names_conflict(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    app.create_token(&org, "ci", &[]).await;
    assert_error(
        app.post(&org.path("/api-tokens"), &org.token, json!({"name": "ci"}))
            .await,
        409,
        "conflict",
    )
    .await;
    // Names are compared after trimming.
    assert_error(
        app.post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": " ci "}),
        )
        .await,
        409,
        "conflict",
    )
    .await;
    // Another org may use the same name.
    app.create_token(&other, "ci", &[]).await;
}

async fn last_used_at_is_recorded_in_batches(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "used", &["api_tokens:read"]).await;
    let token = created["token"].as_str().unwrap().to_string();
    let path = org.path(&format!("/api-tokens/{}", created["id"].as_str().unwrap()));
    let before = chrono::Utc::now();
    for _ in 0..5 {
        assert_eq!(
            app.get(&org.path("/api-tokens"), &token).await.status(),
            200
        );
    }
    eventually("last_used_at is set", || async {
        let body: Value = app.get(&path, &org.token).await.json().await.unwrap();
        body["last_used_at"].as_str().is_some_and(|at| {
            chrono::DateTime::parse_from_rfc3339(at).unwrap()
                >= before - chrono::TimeDelta::seconds(1)
        })
    })
    .await;
}

/// Two replicas flush their uses of one token, the one whose use is newer first: the older use
/// written after it does not move `last_used_at` backwards.
async fn last_used_at_never_moves_backwards(backend: Backend) {
    let config = test_config();
    let clock = config.clock.clone();
    let ahead = TestApp::spawn_with(backend, config).await;
    // Its own clock (`test_config` makes a new one), which the test does not move.
    let behind = ahead.replica_at(ahead.database_url(), test_config()).await;
    let org = ahead.create_org("acme").await;
    let created = ahead.create_token(&org, "used", &["api_tokens:read"]).await;
    let token = created["token"].as_str().unwrap().to_string();
    let path = org.path(&format!("/api-tokens/{}", created["id"].as_str().unwrap()));
    let last_used = || async {
        let body: Value = ahead.get(&path, &org.token).await.json().await.unwrap();
        let at = body["last_used_at"].as_str().map(str::to_string);
        at.map(|at| chrono::DateTime::parse_from_rfc3339(&at).unwrap())
    };
    clock.advance(std::time::Duration::from_secs(3600));
    let hour_ahead = chrono::Utc::now() + chrono::TimeDelta::minutes(59);
    assert_eq!(
        ahead.get(&org.path("/api-tokens"), &token).await.status(),
        200
    );
    ahead.app.flush_usage().await;
    let newest = last_used().await.expect("the newer use is recorded");
    assert!(newest > hour_ahead, "{newest}");
    assert_eq!(
        behind.get(&org.path("/api-tokens"), &token).await.status(),
        200
    );
    behind.app.flush_usage().await;
    assert_eq!(last_used().await, Some(newest));
}

async fn the_rate_limit_answers_429_with_retry_after(backend: Backend) {
    let config = Config {
        rate_limit_per_minute: 60,
        rate_limit_burst: 3,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let path = org.path("/api-tokens");
    for _ in 0..3 {
        assert_eq!(app.get(&path, &org.token).await.status(), 200);
    }
    let limited = app.get(&path, &org.token).await;
    retry_after_secs(&limited);
    assert_error(limited, 429, "rate_limited").await;
    // Per credential: another token is not affected, and operations endpoints are not counted.
    assert_eq!(
        app.get(&other.path("/api-tokens"), &other.token)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.request(Method::GET, "/healthz", None)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Tokens minted by a token each have a bucket of their own; the organization's limit counts them
/// together, so minting cannot multiply a budget.
async fn the_organization_limit_counts_all_its_credentials(backend: Backend) {
    let config = Config {
        // A burst of 2, then one request every 3 s: far longer than this test's requests take.
        tenant_rate_limit_per_minute: 20,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let mut minted = Vec::new();
    for name in ["a", "b"] {
        let token = app.create_token(&org, name, &["api_tokens:read"]).await;
        minted.push(token["token"].as_str().unwrap().to_string());
    }
    // Each minted token has never been used, and still its organization's budget is spent.
    let path = org.path("/api-tokens?limit=1");
    for token in minted.iter().chain([&org.token]) {
        assert_error(app.get(&path, token).await, 429, "rate_limited").await;
    }
    assert_eq!(
        app.get(&other.path("/api-tokens"), &other.token)
            .await
            .status(),
        200,
        "another organization has its own budget"
    );
}

async fn the_rate_limit_can_be_turned_off(backend: Backend) {
    let app = TestApp::spawn(backend).await; // test_config: rate_limit_per_minute = 0
    let org = app.create_org("acme").await;
    for _ in 0..150 {
        assert_eq!(
            app.get(&org.path("/api-tokens?limit=1"), &org.token)
                .await
                .status(),
            200
        );
    }
}

both_backends!(
    create_returns_the_documented_fields_and_a_one_time_token,
    last_used_at_never_moves_backwards,
    scopes_default_to_none_and_null_expiry_is_allowed,
    list_pages_with_cursor_and_limit,
    get_unknown_or_malformed_ids,
    delete_revokes_at_once,
    a_narrow_writer_cannot_revoke_a_broader_token,
    rotate_keeps_the_id_and_kills_the_old_secret,
    unauthenticated_requests_get_401,
    expired_tokens_are_rejected,
    scopes_limit_what_a_token_may_do,
    other_tenants_resources_answer_404,
    validation_reports_every_bad_field,
    malformed_bodies_get_their_own_statuses,
    duplicate_live_names_conflict,
    last_used_at_is_recorded_in_batches,
    the_rate_limit_answers_429_with_retry_after,
    the_organization_limit_counts_all_its_credentials,
    the_rate_limit_can_be_turned_off,
);

/// Past the failure budget, an address's failures answer 429 on every surface until the budget
/// refills, while its requests with a valid cached credential are served as usual.
async fn failed_authentications_are_limited_per_address(backend: Backend) {
    let config = Config {
        failed_auth_per_minute: 3,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let path = org.path("/api-tokens");
    assert_eq!(app.get(&path, &org.token).await.status(), 200);
    for _ in 0..3 {
        assert_error(app.get(&path, "aether_guess").await, 401, "unauthorized").await;
    }
    let refused = app.get(&path, "aether_guess").await;
    retry_after_secs(&refused);
    assert_error(refused, 429, "rate_limited").await;
    let res = app
        .get(&org.account_path("/service-accounts"), "hbx_guess")
        .await;
    assert_eq!(res.status(), 429);
    assert!(res.json::<Value>().await.unwrap()["detail"].is_string());
    let res = app
        .request(Method::GET, "/registry/token", None)
        .basic_auth("robot$acme+ci", Some("kprobot_guess"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.json::<Value>().await.unwrap()["errors"][0]["code"],
        "TOOMANYREQUESTS"
    );
    // The same address's valid credential, cached (in use above), is never refused for those failures.
    assert_eq!(app.get(&path, &org.token).await.status(), 200);
    let res = app
        .get(&org.account_path("/service-accounts"), &org.token)
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(app.get("/v1/auth/forward", &org.token).await.status(), 200);
    assert_eq!(
        app.request(Method::GET, "/healthz", None)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

both_backends!(failed_authentications_are_limited_per_address);
