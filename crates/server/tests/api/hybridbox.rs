//! `/v1/public/accounts/{account_id}/auth/...`: Hybridbox service accounts and authorizations,
//! every status path, errors in the FastAPI dialect the Hybridbox docs come from.

use crate::helpers::{
    assert_error, both_backends, eventually, more_than_a_page, seeded_ids, streamed_list, Org,
    TestApp,
};
use keyplane_store::testing::Backend;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const SERVICE_ACCOUNT_FIELDS: [&str; 17] = [
    "account_id",
    "id",
    "name",
    "token_prefix",
    "token_public_id",
    "token_last4",
    "created_at",
    "updated_at",
    "created_by_user_id",
    "expires_at",
    "last_used_at",
    "revoked_at",
    "revoked_by_user_id",
    // The lifecycle (rotation with a grace period, suspension).
    "previous_secret_expires_at",
    "previous_secret_last_used_at",
    "suspended_at",
    // Always present: true only for a canary.
    "canary",
];

const AUTHORIZATION_FIELDS: [&str; 9] = [
    "id",
    "grant_kind",
    "subject_type",
    "subject_id",
    "capability_key",
    "resource_type",
    "resource_id",
    "created_at",
    "revoked_at",
];

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn service_account_fields(with_token: bool) -> BTreeSet<String> {
    let mut fields = set(&SERVICE_ACCOUNT_FIELDS);
    if with_token {
        fields.insert("token".into());
    }
    fields
}

fn is_uuid(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok())
}

/// An RFC 3339 timestamp in UTC, written with `Z` as the docs show them.
fn timestamp(value: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"));
    assert!(text.ends_with('Z'), "not UTC with Z: {text}");
    chrono::DateTime::parse_from_rfc3339(text).unwrap()
}

fn is_lower_hex(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

fn text(value: &Value, key: &str) -> String {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {value}"))
        .to_string()
}

/// Asserts a non-validation error: `status` and `{"detail": "<message>"}`; returns the message.
async fn assert_detail(res: Response, status: u16) -> String {
    assert_eq!(res.status(), status, "status");
    let body: Value = res.json().await.expect("error body is JSON");
    assert_eq!(keys(&body), set(&["detail"]), "{body}");
    let detail = body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("detail is not a string: {body}"));
    assert!(!detail.is_empty());
    detail.to_string()
}

/// Asserts a 422 `{"detail":[{"loc","msg","type"}]}` and returns its `(loc, type)` pairs.
async fn assert_422(res: Response) -> Vec<(Value, String)> {
    assert_eq!(res.status(), 422, "status");
    let body: Value = res.json().await.expect("error body is JSON");
    assert_eq!(keys(&body), set(&["detail"]), "{body}");
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("detail is not a list: {body}"))
        .iter()
        .map(|item| {
            assert_eq!(keys(item), set(&["loc", "msg", "type"]), "{item}");
            assert!(item["msg"].as_str().is_some_and(|m| !m.is_empty()));
            (item["loc"].clone(), text(item, "type"))
        })
        .collect()
}

fn errors(expected: &[(Value, &str)]) -> Vec<(Value, String)> {
    expected
        .iter()
        .map(|(loc, kind)| (loc.clone(), kind.to_string()))
        .collect()
}

fn capability(subject_id: &str, key: &str) -> Value {
    json!({
        "grant_kind": "capability",
        "subject_type": "service_account",
        "subject_id": subject_id,
        "capability_key": key,
    })
}

fn account_owner(subject_id: &str) -> Value {
    json!({"grant_kind": "account_owner", "subject_type": "service_account", "subject_id": subject_id})
}

fn super_admin(subject_id: &str) -> Value {
    json!({"grant_kind": "super_admin", "subject_type": "service_account", "subject_id": subject_id})
}

/// The `name`s of a list answer, in order.
fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a bare array: {list}"))
        .iter()
        .map(|item| text(item, "name"))
        .collect()
}

/// The `id`s of a list answer, in order.
fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a bare array: {list}"))
        .iter()
        .map(|item| text(item, "id"))
        .collect()
}

/// GET `path` with `token`, asserting 200; returns the body.
async fn get_ok(app: &TestApp, path: &str, token: &str) -> Value {
    let res = app.get(path, token).await;
    assert_eq!(res.status(), 200, "GET {path}");
    res.json().await.unwrap()
}

/// Creates a service account with `token`, asserting 201; returns the body, `token` included.
async fn create_sa(app: &TestApp, org: &Org, token: &str, name: &str) -> Value {
    let res = app
        .post(
            &org.account_path("/service-accounts"),
            token,
            json!({ "name": name }),
        )
        .await;
    assert_eq!(res.status(), 201, "creating service account {name}");
    res.json().await.unwrap()
}

/// Grants `body` with `token`, asserting 201; returns the authorization.
async fn grant(app: &TestApp, org: &Org, token: &str, body: Value) -> Value {
    let res = app
        .post(&org.account_path("/authorizations"), token, body.clone())
        .await;
    assert_eq!(res.status(), 201, "granting {body}");
    res.json().await.unwrap()
}

/// A service account made with the org's `*` token and given `rights` (capability keys, or
/// `account_owner`). Returns its id and token.
async fn service_account(
    app: &TestApp,
    org: &Org,
    name: &str,
    rights: &[&str],
) -> (String, String) {
    let created = create_sa(app, org, &org.token, name).await;
    let id = text(&created, "id");
    for right in rights {
        let body = match *right {
            "account_owner" => account_owner(&id),
            key => capability(&id, key),
        };
        grant(app, org, &org.token, body).await;
    }
    (id, text(&created, "token"))
}

/// Sends `method path` with an optional bearer token and an optional JSON body.
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Response {
    let mut request = app.request(method, path, token);
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.unwrap()
}

/// Every Hybridbox route under `account`, with a valid body where the route takes one.
fn every_route(
    account: &str,
    service_account_id: &str,
    authorization_id: &str,
    subject_id: &str,
) -> Vec<(Method, String, Option<Value>)> {
    let base = format!("/v1/public/accounts/{account}/auth");
    vec![
        (Method::GET, format!("{base}/service-accounts"), None),
        (
            Method::POST,
            format!("{base}/service-accounts"),
            Some(json!({"name": "probe"})),
        ),
        (
            Method::POST,
            format!("{base}/service-accounts/{service_account_id}/rotate"),
            None,
        ),
        (
            Method::DELETE,
            format!("{base}/service-accounts/{service_account_id}"),
            None,
        ),
        (Method::GET, format!("{base}/authorizations"), None),
        (
            Method::POST,
            format!("{base}/authorizations"),
            Some(capability(subject_id, "auth.manage")),
        ),
        (
            Method::DELETE,
            format!("{base}/authorizations/{authorization_id}"),
            None,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Service accounts
// ---------------------------------------------------------------------------------------------

async fn create_returns_the_documented_fields_and_a_one_time_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.account_path("/service-accounts");
    let res = app
        .post(
            &path,
            &org.token,
            json!({"name": "  deployer  ", "expires_at": "2099-01-01T00:00:00+02:00"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(keys(&body), service_account_fields(true));
    assert_eq!(body["account_id"], org.id);
    assert!(is_uuid(&body["id"]), "{body}");
    assert_eq!(body["name"], "deployer");
    assert_eq!(body["token_prefix"], "hbx_sa");
    let public_id = text(&body, "token_public_id");
    assert!(is_lower_hex(&public_id), "{public_id}");
    let token = text(&body, "token");
    let secret = token
        .strip_prefix(&format!("hbx_sa_{public_id}_"))
        .unwrap_or_else(|| panic!("{token} is not hbx_sa_<token_public_id>_<secret>"));
    // At least 192 random bits, hex-encoded.
    assert!(secret.len() >= 48 && is_lower_hex(secret), "{secret}");
    let last4 = text(&body, "token_last4");
    assert_eq!(last4.chars().count(), 4);
    assert!(token.ends_with(&last4));
    let created_at = timestamp(&body["created_at"]);
    assert_eq!(timestamp(&body["updated_at"]), created_at);
    assert!(
        (chrono::Utc::now() - created_at.to_utc())
            .num_seconds()
            .abs()
            < 60
    );
    assert_eq!(body["expires_at"], "2098-12-31T22:00:00Z");
    // Nullable fields are present as null; token actors are no users.
    for field in [
        "created_by_user_id",
        "last_used_at",
        "revoked_at",
        "revoked_by_user_id",
    ] {
        assert_eq!(body[field], Value::Null, "{field}");
    }

    // The token is shown this once: a read never returns it.
    let listed = app.get(&path, &org.token).await;
    assert_eq!(listed.status(), 200);
    let listed = listed.text().await.unwrap();
    assert!(!listed.contains(&token) && !listed.contains("\"token\""));
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let mut without_token = body.clone();
    without_token.as_object_mut().unwrap().remove("token");
    assert_eq!(listed, json!([without_token]));

    // A null or absent expiry means none.
    for request in [
        json!({"name": "null expiry", "expires_at": null}),
        json!({"name": "no expiry"}),
    ] {
        let res = app.post(&path, &org.token, request.clone()).await;
        assert_eq!(res.status(), 201, "{request}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(keys(&body), service_account_fields(true));
        assert_eq!(body["expires_at"], Value::Null);
    }
    // A time without an offset (Python's `datetime.utcnow().isoformat()`) is UTC, as the docs'
    // "UTC token expiry timestamp" says; the answer names it with `Z`.
    let res = app
        .post(
            &path,
            &org.token,
            json!({"name": "naive expiry", "expires_at": "2099-01-01T00:00:00.250"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["expires_at"], "2099-01-01T00:00:00.250000Z");
    // Made by a service account, it still names no user.
    let (_, manager) = service_account(&app, &org, "manager", &["auth.manage"]).await;
    let made = create_sa(&app, &org, &manager, "made by a service account").await;
    assert_eq!(made["created_by_user_id"], Value::Null);
    assert_ne!(made["token"], body["token"]);
}

async fn list_is_a_bare_array_without_revoked_by_default(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.account_path("/service-accounts");
    // The org's API token is not a service account.
    assert_eq!(get_ok(&app, &path, &org.token).await, json!([]));
    let mut created = Vec::new();
    for name in ["first", "second", "third"] {
        created.push(text(&create_sa(&app, &org, &org.token, name).await, "id"));
    }
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{}", created[1])),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);

    let live = get_ok(&app, &path, &org.token).await;
    assert_eq!(names(&live), ["first", "third"]);
    for item in live.as_array().unwrap() {
        assert_eq!(keys(item), service_account_fields(false));
        assert_eq!(item["revoked_at"], Value::Null);
    }
    let all = get_ok(&app, &format!("{path}?include_revoked=true"), &org.token).await;
    assert_eq!(names(&all), ["first", "second", "third"]);
    assert_eq!(ids(&all), created);
    timestamp(&all[1]["revoked_at"]);
    assert_eq!(all[0]["revoked_at"], Value::Null);
    for item in all.as_array().unwrap() {
        assert_eq!(keys(item), service_account_fields(false));
    }
    // Booleans as FastAPI reads them.
    for (raw, count) in [
        ("false", 2),
        ("False", 2),
        ("0", 2),
        ("no", 2),
        ("off", 2),
        ("TRUE", 3),
        ("1", 3),
        ("yes", 3),
        ("on", 3),
    ] {
        let list = get_ok(&app, &format!("{path}?include_revoked={raw}"), &org.token).await;
        assert_eq!(
            list.as_array().unwrap().len(),
            count,
            "include_revoked={raw}"
        );
    }
    for raw in ["maybe", "", "2"] {
        assert_eq!(
            assert_422(
                app.get(&format!("{path}?include_revoked={raw}"), &org.token)
                    .await
            )
            .await,
            errors(&[(json!(["query", "include_revoked"]), "bool_parsing")]),
            "include_revoked={raw}"
        );
    }
}

async fn revoke_returns_the_record_and_is_idempotent(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (id, token) = service_account(&app, &org, "doomed", &["auth.manage"]).await;
    let list_path = org.account_path("/service-accounts");
    assert_eq!(app.get(&list_path, &token).await.status(), 200);
    // Write that use's `last_used_at` now: a flush landing between the two revokes below would
    // make the records differ.
    app.app.flush_usage().await;

    let path = org.account_path(&format!("/service-accounts/{id}"));
    let res = app.delete(&path, &org.token).await;
    assert_eq!(res.status(), 200);
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(keys(&revoked), service_account_fields(false));
    assert_eq!(revoked["id"], id);
    assert_eq!(revoked["account_id"], org.id);
    assert_eq!(revoked["name"], "doomed");
    assert!(timestamp(&revoked["revoked_at"]) >= timestamp(&revoked["created_at"]));
    assert_eq!(revoked["revoked_by_user_id"], Value::Null);

    // Its token dies on its very next request.
    let refused = app.get(&list_path, &token).await;
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    assert_detail(refused, 401).await;

    // Idempotent: the same record, the first revoked_at.
    let again = app.delete(&path, &org.token).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap(), revoked);

    // A revoked account cannot be rotated back to life.
    let rotate = org.account_path(&format!("/service-accounts/{id}/rotate"));
    assert_detail(app.post_empty(&rotate, &org.token).await, 409).await;
    assert_detail(app.get(&list_path, &token).await, 401).await;

    // It stays listable for audit, unchanged.
    let all = get_ok(
        &app,
        &format!("{list_path}?include_revoked=true"),
        &org.token,
    )
    .await;
    assert_eq!(all, json!([revoked]));
    assert_eq!(get_ok(&app, &list_path, &org.token).await, json!([]));

    // Unknown ids.
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(
        assert_detail(
            app.delete(
                &org.account_path(&format!("/service-accounts/{unknown}")),
                &org.token
            )
            .await,
            404
        )
        .await,
        "not found"
    );
    assert_detail(
        app.post_empty(
            &org.account_path(&format!("/service-accounts/{unknown}/rotate")),
            &org.token,
        )
        .await,
        404,
    )
    .await;

    // The name is free again.
    let reborn = create_sa(&app, &org, &org.token, "doomed").await;
    assert_ne!(reborn["id"], revoked["id"]);
}

async fn rotate_keeps_the_id_and_kills_the_old_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = create_sa(&app, &org, &org.token, "rotating").await;
    let id = text(&created, "id");
    grant(&app, &org, &org.token, capability(&id, "auth.manage")).await;
    let old = text(&created, "token");
    let list_path = org.account_path("/service-accounts");
    assert_eq!(app.get(&list_path, &old).await.status(), 200);

    let res = app
        .post_empty(
            &org.account_path(&format!("/service-accounts/{id}/rotate")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let rotated: Value = res.json().await.unwrap();
    assert_eq!(keys(&rotated), service_account_fields(true));
    assert_eq!(rotated["id"], id);
    assert_eq!(rotated["account_id"], org.id);
    assert_eq!(rotated["name"], "rotating");
    assert_eq!(rotated["token_prefix"], "hbx_sa");
    assert_eq!(rotated["created_at"], created["created_at"]);
    assert!(timestamp(&rotated["updated_at"]) >= timestamp(&created["updated_at"]));
    assert_eq!(rotated["revoked_at"], Value::Null);
    let new = text(&rotated, "token");
    assert_ne!(new, old);
    let public_id = text(&rotated, "token_public_id");
    assert!(new.starts_with(&format!("hbx_sa_{public_id}_")), "{new}");
    assert!(new.ends_with(&text(&rotated, "token_last4")));

    // At once: the old token is refused, the new one works with the same grants.
    let refused = app.get(&list_path, &old).await;
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    assert_detail(refused, 401).await;
    let listed = get_ok(&app, &list_path, &new).await;
    let text = serde_json::to_string(&listed).unwrap();
    assert!(!text.contains(&new) && !text.contains("\"token\""));
    assert_eq!(listed[0]["token_public_id"], rotated["token_public_id"]);
    assert_eq!(listed[0]["token_last4"], rotated["token_last4"]);

    // Rotating twice: each new token replaces the one before.
    let res = app
        .post_empty(
            &org.account_path(&format!("/service-accounts/{id}/rotate")),
            &new,
        )
        .await;
    assert_eq!(res.status(), 200);
    let newest = res.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_detail(app.get(&list_path, &new).await, 401).await;
    assert_eq!(app.get(&list_path, &newest).await.status(), 200);
}

async fn duplicate_live_names_conflict(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let path = org.account_path("/service-accounts");
    let first = create_sa(&app, &org, &org.token, "ci").await;
    for name in ["ci", "  ci  "] {
        assert_detail(
            app.post(&path, &org.token, json!({ "name": name })).await,
            409,
        )
        .await;
    }
    assert_eq!(
        names(&get_ok(&app, &path, &org.token).await),
        ["ci"],
        "the refused ones were not created"
    );
    // Another account, or another kind of credential, may use the same name.
    create_sa(&app, &other, &other.token, "ci").await;
    app.create_token(&org, "ci", &[]).await;
    // Once revoked, the name is free.
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{}", text(&first, "id"))),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    create_sa(&app, &org, &org.token, "ci").await;
}

async fn service_account_validation_reports_every_bad_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.account_path("/service-accounts");
    let name = || json!(["body", "name"]);
    let expires = || json!(["body", "expires_at"]);
    let cases = [
        (json!({}), vec![(name(), "missing")]),
        (json!({"expires_at": null}), vec![(name(), "missing")]),
        (json!({"name": null}), vec![(name(), "invalid_type")]),
        (json!({"name": ""}), vec![(name(), "string_too_short")]),
        (json!({"name": "   "}), vec![(name(), "string_too_short")]),
        (
            json!({"name": "x".repeat(121)}),
            vec![(name(), "string_too_long")],
        ),
        (
            json!({"name": "é".repeat(121)}),
            vec![(name(), "string_too_long")],
        ),
        (
            json!({"name": "a\nb"}),
            vec![(name(), "invalid_characters")],
        ),
        (json!({"name": 5}), vec![(name(), "invalid_type")]),
        (json!({"name": ["x"]}), vec![(name(), "invalid_type")]),
        (
            json!({"name": "ok", "expires_at": "next tuesday"}),
            vec![(expires(), "invalid_format")],
        ),
        (
            json!({"name": "ok", "expires_at": "2001-01-01T00:00:00Z"}),
            vec![(expires(), "not_in_future")],
        ),
        (
            json!({"name": "ok", "expires_at": 1893456000}),
            vec![(expires(), "invalid_type")],
        ),
        (
            json!({"name": "ok", "scopes": ["auth.manage"]}),
            vec![(json!(["body", "scopes"]), "extra_forbidden")],
        ),
        (
            json!({"name": "", "expires_at": "2001-01-01T00:00:00Z", "zeta": 1, "alpha": true}),
            vec![
                (name(), "string_too_short"),
                (expires(), "not_in_future"),
                (json!(["body", "alpha"]), "extra_forbidden"),
                (json!(["body", "zeta"]), "extra_forbidden"),
            ],
        ),
        (json!(["name"]), vec![(json!(["body"]), "invalid_type")]),
        (json!("name"), vec![(json!(["body"]), "invalid_type")]),
    ];
    for (body, expected) in cases {
        assert_eq!(
            assert_422(app.post(&path, &org.token, body.clone()).await).await,
            errors(&expected),
            "body {body}"
        );
    }
    // Nothing was created by any of them.
    assert_eq!(get_ok(&app, &path, &org.token).await, json!([]));
    // The bounds themselves are fine: 1 and 120 characters (not bytes).
    for name in ["x".to_string(), "é".repeat(120)] {
        let created = create_sa(&app, &org, &org.token, &name).await;
        assert_eq!(created["name"], name.as_str());
    }
}

async fn malformed_bodies_get_their_own_statuses(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (subject, _) = service_account(&app, &org, "subject", &[]).await;
    let routes = [
        (
            org.account_path("/service-accounts"),
            json!({"name": "fine"}),
        ),
        (
            org.account_path("/authorizations"),
            capability(&subject, "auth.manage"),
        ),
    ];
    for (path, valid) in routes {
        let send = |content_type: Option<&'static str>, body: Vec<u8>| {
            let mut request = app
                .request(Method::POST, &path, Some(&org.token))
                .body(body);
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            request.send()
        };
        let valid = serde_json::to_vec(&valid).unwrap();
        // As FastAPI answers a body that is not JSON: a 422 validation error of the body.
        for malformed in [b"{\"name\": ".to_vec(), Vec::new()] {
            let res = send(Some("application/json"), malformed).await.unwrap();
            assert_eq!(res.status(), 422);
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["detail"][0]["type"], "json_invalid", "{body}");
            assert_eq!(body["detail"][0]["loc"], json!(["body"]), "{body}");
            assert!(body["detail"][0]["msg"]
                .as_str()
                .unwrap()
                .starts_with("JSON decode error"));
        }
        assert_detail(send(None, valid.clone()).await.unwrap(), 415).await;
        assert_detail(send(Some("text/plain"), valid.clone()).await.unwrap(), 415).await;
        assert_detail(
            send(
                Some("application/x-www-form-urlencoded"),
                b"name=fine".to_vec(),
            )
            .await
            .unwrap(),
            415,
        )
        .await;
        let mut huge = b"{\"name\":\"".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 70 * 1024));
        huge.extend(b"\"}");
        assert_detail(send(Some("application/json"), huge).await.unwrap(), 413).await;
        let res = send(Some("application/json; charset=utf-8"), valid)
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{path}");
    }
}

async fn last_used_at_is_recorded_after_use(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (id, token) = service_account(&app, &org, "used", &["auth.manage"]).await;
    service_account(&app, &org, "idle", &[]).await;
    let path = org.account_path("/service-accounts");
    let before = chrono::Utc::now();
    for _ in 0..3 {
        assert_eq!(app.get(&path, &token).await.status(), 200);
    }
    eventually("last_used_at is set", || async {
        let list = get_ok(&app, &path, &org.token).await;
        let used = list
            .as_array()
            .unwrap()
            .iter()
            .find(|sa| sa["id"] == id.as_str())
            .unwrap()
            .clone();
        used["last_used_at"].as_str().is_some_and(|_| {
            timestamp(&used["last_used_at"]) >= before - chrono::TimeDelta::seconds(1)
        })
    })
    .await;
    // Only the one that was used.
    let list = get_ok(&app, &path, &org.token).await;
    let idle = list
        .as_array()
        .unwrap()
        .iter()
        .find(|sa| sa["name"] == "idle")
        .unwrap();
    assert_eq!(idle["last_used_at"], Value::Null);
}

async fn expired_service_accounts_are_rejected(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let expires = chrono::Utc::now() + chrono::TimeDelta::milliseconds(1500);
    let res = app
        .post(
            &org.account_path("/service-accounts"),
            &org.token,
            json!({"name": "short", "expires_at": expires.to_rfc3339()}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    grant(
        &app,
        &org,
        &org.token,
        capability(&text(&created, "id"), "auth.manage"),
    )
    .await;
    let token = text(&created, "token");
    let path = org.account_path("/service-accounts");
    assert_eq!(app.get(&path, &token).await.status(), 200);
    tokio::time::sleep(
        (expires - chrono::Utc::now()).to_std().unwrap_or_default()
            + std::time::Duration::from_millis(100),
    )
    .await;
    let refused = app.get(&path, &token).await;
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    assert_detail(refused, 401).await;
}

// ---------------------------------------------------------------------------------------------
// Authorizations
// ---------------------------------------------------------------------------------------------

async fn authorizations_are_granted_listed_filtered_and_revoked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let a = text(&create_sa(&app, &org, &org.token, "a").await, "id");
    let b = text(&create_sa(&app, &org, &org.token, "b").await, "id");
    let user = uuid::Uuid::new_v4().to_string();
    let group = uuid::Uuid::new_v4().to_string();
    let path = org.account_path("/authorizations");
    assert_eq!(get_ok(&app, &path, &org.token).await, json!([]));

    let res = app
        .post(&path, &org.token, capability(&a, "auth.manage"))
        .await;
    assert_eq!(res.status(), 201);
    let g1: Value = res.json().await.unwrap();
    assert_eq!(keys(&g1), set(&AUTHORIZATION_FIELDS));
    assert!(is_uuid(&g1["id"]));
    assert_eq!(g1["grant_kind"], "capability");
    assert_eq!(g1["subject_type"], "service_account");
    assert_eq!(g1["subject_id"], a.as_str());
    assert_eq!(g1["capability_key"], "auth.manage");
    assert_eq!(g1["resource_type"], Value::Null);
    assert_eq!(g1["resource_id"], Value::Null);
    assert!((chrono::Utc::now() - timestamp(&g1["created_at"]).to_utc()).num_seconds() < 60);
    assert_eq!(g1["revoked_at"], Value::Null);

    let g2 = grant(&app, &org, &org.token, account_owner(&b)).await;
    assert_eq!(keys(&g2), set(&AUTHORIZATION_FIELDS));
    assert_eq!(g2["grant_kind"], "account_owner");
    assert_eq!(g2["capability_key"], Value::Null);
    let g3 = grant(
        &app,
        &org,
        &org.token,
        json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": b, "capability_key": "api_tokens:read", "resource_type": null, "resource_id": null}),
    )
    .await;
    // Users and groups are the platform's; they need not exist here.
    let g4 = grant(
        &app,
        &org,
        &org.token,
        json!({"grant_kind": "capability", "subject_type": "user", "subject_id": user, "capability_key": "registry:read"}),
    )
    .await;
    assert_eq!(g4["subject_type"], "user");
    let g5 = grant(
        &app,
        &org,
        &org.token,
        json!({"grant_kind": "capability", "subject_type": "group", "subject_id": group, "capability_key": "registry:write", "resource_type": "project", "resource_id": "p1"}),
    )
    .await;
    assert_eq!(g5["subject_type"], "group");
    assert_eq!(g5["resource_type"], "project");
    assert_eq!(g5["resource_id"], "p1");
    let id = |g: &Value| text(g, "id");
    let (g1_id, g2_id, g3_id, g4_id, g5_id) = (id(&g1), id(&g2), id(&g3), id(&g4), id(&g5));

    // The full list: a bare array, oldest first, each exactly as created.
    let all = get_ok(&app, &path, &org.token).await;
    assert_eq!(all, json!([g1, g2, g3, g4, g5]));

    let filtered = |query: &'static str| {
        let app = &app;
        let path = &path;
        let token = &org.token;
        async move { ids(&get_ok(app, &format!("{path}?{query}"), token).await) }
    };
    assert_eq!(
        filtered("subject_type=service_account").await,
        [g1_id.as_str(), g2_id.as_str(), g3_id.as_str()]
    );
    assert_eq!(filtered("subject_type=user").await, [g4_id.as_str()]);
    assert_eq!(filtered("subject_type=group").await, [g5_id.as_str()]);
    assert_eq!(
        ids(&get_ok(&app, &format!("{path}?subject_id={b}"), &org.token).await),
        [g2_id.as_str(), g3_id.as_str()]
    );
    assert_eq!(
        ids(&get_ok(
            &app,
            &format!("{path}?subject_id={}", b.to_uppercase()),
            &org.token
        )
        .await),
        [g2_id.as_str(), g3_id.as_str()],
        "a UUID matches in any case"
    );
    assert_eq!(filtered("grant_kind=account_owner").await, [g2_id.as_str()]);
    assert_eq!(
        filtered("grant_kind=capability").await,
        [
            g1_id.as_str(),
            g3_id.as_str(),
            g4_id.as_str(),
            g5_id.as_str()
        ]
    );
    assert!(filtered("grant_kind=super_admin").await.is_empty());
    assert_eq!(
        filtered("capability_key=registry:write").await,
        [g5_id.as_str()]
    );
    assert_eq!(
        filtered("capability_key=auth.manage").await,
        [g1_id.as_str()]
    );
    assert!(filtered("capability_key=audit:read").await.is_empty());
    assert_eq!(
        ids(&get_ok(
            &app,
            &format!("{path}?subject_id={b}&grant_kind=capability&subject_type=service_account"),
            &org.token
        )
        .await),
        [g3_id.as_str()]
    );
    assert!(ids(&get_ok(
        &app,
        &format!("{path}?subject_id={b}&subject_type=user"),
        &org.token
    )
    .await)
    .is_empty());

    // Revoke: 200 with the record, idempotent.
    let revoke_path = org.account_path(&format!("/authorizations/{g3_id}"));
    let res = app.delete(&revoke_path, &org.token).await;
    assert_eq!(res.status(), 200);
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(keys(&revoked), set(&AUTHORIZATION_FIELDS));
    let mut expected = g3.clone();
    expected["revoked_at"] = revoked["revoked_at"].clone();
    assert_eq!(revoked, expected);
    assert!(timestamp(&revoked["revoked_at"]) >= timestamp(&g3["created_at"]));
    let again = app.delete(&revoke_path, &org.token).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap(), revoked);

    // Revoked grants are hidden unless asked for.
    assert_eq!(
        ids(&get_ok(&app, &format!("{path}?subject_id={b}"), &org.token).await),
        [g2_id.as_str()]
    );
    let with_revoked = get_ok(
        &app,
        &format!("{path}?subject_id={b}&include_revoked=true"),
        &org.token,
    )
    .await;
    assert_eq!(with_revoked, json!([g2, revoked]));
    assert_eq!(
        get_ok(&app, &format!("{path}?include_revoked=true"), &org.token)
            .await
            .as_array()
            .unwrap()
            .len(),
        5
    );

    // The same live grant twice: 409; a narrower resource is another grant.
    for duplicate in [
        capability(&a, "auth.manage"),
        account_owner(&b),
        json!({"grant_kind": "capability", "subject_type": "user", "subject_id": user, "capability_key": "registry:read"}),
        json!({"grant_kind": "capability", "subject_type": "group", "subject_id": group, "capability_key": "registry:write", "resource_type": "project", "resource_id": "p1"}),
    ] {
        assert_detail(app.post(&path, &org.token, duplicate.clone()).await, 409).await;
    }
    grant(
        &app,
        &org,
        &org.token,
        json!({"grant_kind": "capability", "subject_type": "group", "subject_id": group, "capability_key": "registry:write", "resource_type": "project", "resource_id": "p2"}),
    )
    .await;
    // A revoked grant can be given again, as a new grant.
    let regranted = grant(&app, &org, &org.token, capability(&b, "api_tokens:read")).await;
    assert_ne!(regranted["id"], g3["id"]);

    // super_admin is the platform operator's, even for a `*` token.
    let detail = assert_detail(app.post(&path, &org.token, super_admin(&a)).await, 403).await;
    assert!(detail.contains("super_admin"), "{detail}");
    assert!(filtered("grant_kind=super_admin").await.is_empty());

    // Unknown grant id.
    assert_eq!(
        assert_detail(
            app.delete(
                &org.account_path(&format!("/authorizations/{}", uuid::Uuid::new_v4())),
                &org.token
            )
            .await,
            404
        )
        .await,
        "not found"
    );
}

/// A subject holds at most 64 live grants in an account (its rights are rebuilt from all of them on
/// every load): the next is refused with 409 naming the limit, the same grant again is still the
/// duplicate's 409, another subject is not held back, and a revoked grant makes room. For a
/// service account and for a user (any user id may be named).
async fn grants_to_one_subject_are_capped(backend: Backend) {
    const CAP: usize = 64;
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.account_path("/authorizations");
    let sa = text(&create_sa(&app, &org, &org.token, "granted").await, "id");
    let user = uuid::Uuid::new_v4().to_string();
    for (subject, subject_id) in [("service_account", &sa), ("user", &user)] {
        let body = |key: &str| json!({"grant_kind": "capability", "subject_type": subject, "subject_id": subject_id, "capability_key": key});
        let mut granted = Vec::new();
        for i in 0..CAP {
            granted.push(grant(&app, &org, &org.token, body(&format!("custom.right{i}"))).await);
        }
        let over = body("custom.one-too-many");
        let detail = assert_detail(app.post(&path, &org.token, over.clone()).await, 409).await;
        assert!(
            detail.contains(&format!("{CAP} live grants")),
            "{subject}: {detail}"
        );
        // The same live grant again is refused as a duplicate, as it always was.
        let detail = assert_detail(
            app.post(&path, &org.token, body("custom.right0")).await,
            409,
        )
        .await;
        assert_eq!(detail, "the same live grant already exists", "{subject}");
        let listed = get_ok(
            &app,
            &format!("{path}?subject_id={}", text(&granted[0], "subject_id")),
            &org.token,
        )
        .await;
        assert_eq!(listed.as_array().unwrap().len(), CAP, "{subject}");
        // A revoked grant makes room for one more.
        let revoked = org.account_path(&format!("/authorizations/{}", text(&granted[7], "id")));
        assert_eq!(app.delete(&revoked, &org.token).await.status(), 200);
        let admitted = grant(&app, &org, &org.token, over.clone()).await;
        assert_eq!(admitted["capability_key"], "custom.one-too-many");
        let detail = assert_detail(
            app.post(&path, &org.token, body("custom.right7")).await,
            409,
        )
        .await;
        assert!(
            detail.contains(&format!("{CAP} live grants")),
            "{subject}: {detail}"
        );
    }
    // Another subject of the same account is not held back by the first one's grants.
    let other = text(&create_sa(&app, &org, &org.token, "other").await, "id");
    grant(&app, &org, &org.token, capability(&other, "custom.right0")).await;
}

async fn authorization_validation_reports_every_bad_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let path = org.account_path("/authorizations");
    let sa = text(&create_sa(&app, &org, &org.token, "subject").await, "id");
    let gone = text(&create_sa(&app, &org, &org.token, "gone").await, "id");
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{gone}")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let foreign = text(
        &create_sa(&app, &other, &other.token, "foreign").await,
        "id",
    );
    let api_token = text(
        &app.create_token(&org, "not a service account", &[]).await,
        "id",
    );
    let body = |key: &str| json!(["body", key]);
    let with = |changes: Value| {
        let mut valid = capability(&sa, "auth.manage");
        for (k, v) in changes.as_object().unwrap() {
            valid[k] = v.clone();
        }
        valid
    };
    let cases = [
        (
            json!({}),
            vec![
                (body("grant_kind"), "missing"),
                (body("subject_type"), "missing"),
                (body("subject_id"), "missing"),
            ],
        ),
        (
            with(json!({"grant_kind": "owner"})),
            vec![(body("grant_kind"), "enum")],
        ),
        (
            with(json!({"grant_kind": 1})),
            vec![(body("grant_kind"), "invalid_type")],
        ),
        (
            with(json!({"subject_type": "robot"})),
            vec![(body("subject_type"), "enum")],
        ),
        (
            with(json!({"subject_id": "not-a-uuid"})),
            vec![(body("subject_id"), "uuid_parsing")],
        ),
        (
            with(json!({"subject_id": 42})),
            vec![(body("subject_id"), "invalid_type")],
        ),
        (
            with(json!({"capability_key": "has space"})),
            vec![(body("capability_key"), "invalid_scope")],
        ),
        (
            with(json!({"capability_key": ""})),
            vec![(body("capability_key"), "invalid_scope")],
        ),
        (
            with(json!({"capability_key": ["auth.manage"]})),
            vec![(body("capability_key"), "invalid_type")],
        ),
        (
            with(json!({"resource_type": 5, "resource_id": false})),
            vec![
                (body("resource_type"), "invalid_type"),
                (body("resource_id"), "invalid_type"),
            ],
        ),
        // capability_key goes with grant_kind=capability, and only with it.
        (
            with(json!({"capability_key": null})),
            vec![(body("capability_key"), "missing")],
        ),
        (
            json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": sa}),
            vec![(body("capability_key"), "missing")],
        ),
        (
            with(json!({"grant_kind": "account_owner"})),
            vec![(body("capability_key"), "invalid_format")],
        ),
        (
            with(json!({"capability": "auth.manage"})),
            vec![(body("capability"), "extra_forbidden")],
        ),
        (
            json!({"grant_kind": "admin", "subject_type": "robot", "subject_id": "x", "capability_key": "a b", "extra": 1}),
            vec![
                (body("grant_kind"), "enum"),
                (body("subject_type"), "enum"),
                (body("subject_id"), "uuid_parsing"),
                (body("capability_key"), "invalid_scope"),
                (body("extra"), "extra_forbidden"),
            ],
        ),
        (json!([]), vec![(json!(["body"]), "invalid_type")]),
        // A service-account subject must be a live service account of this account.
        (
            with(json!({"subject_id": uuid::Uuid::new_v4().to_string()})),
            vec![(body("subject_id"), "not_found")],
        ),
        (
            with(json!({"subject_id": foreign})),
            vec![(body("subject_id"), "not_found")],
        ),
        (
            with(json!({"subject_id": api_token})),
            vec![(body("subject_id"), "not_found")],
        ),
    ];
    // A revoked one is no unknown subject but one that can no longer receive grants: 409.
    assert!(assert_detail(
        app.post(&path, &org.token, with(json!({"subject_id": gone})))
            .await,
        409
    )
    .await
    .contains("revoked"));
    for (request, expected) in cases {
        assert_eq!(
            assert_422(app.post(&path, &org.token, request.clone()).await).await,
            errors(&expected),
            "body {request}"
        );
    }
    // Nothing was granted by any of them, here or in the other account.
    assert_eq!(
        get_ok(&app, &format!("{path}?include_revoked=true"), &org.token).await,
        json!([])
    );
    assert_eq!(
        get_ok(&app, &other.account_path("/authorizations"), &other.token).await,
        json!([])
    );
    // The valid request itself is fine.
    grant(&app, &org, &org.token, with(json!({}))).await;
}

// ---------------------------------------------------------------------------------------------
// Paths, query parameters, authentication, tenancy
// ---------------------------------------------------------------------------------------------

async fn bad_path_and_query_parameters_are_422(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let sa = text(&create_sa(&app, &org, &org.token, "sa").await, "id");
    let granted = grant(&app, &org, &org.token, capability(&sa, "auth.manage")).await;
    let authorization = text(&granted, "id");

    // A bad account id, on every route; `%FF` is not UTF-8 once decoded.
    let bad_accounts = ["not-a-uuid", "%FF"];
    for (method, path, body) in bad_accounts
        .iter()
        .flat_map(|bad| every_route(bad, &sa, &authorization, &sa))
    {
        let res = send(&app, method.clone(), &path, Some(&org.token), body.as_ref()).await;
        assert_eq!(
            assert_422(res).await,
            errors(&[(json!(["path", "account_id"]), "uuid_parsing")]),
            "{method} {path}"
        );
    }
    // Bad service account and authorization ids.
    for (method, rest, param) in [
        (
            Method::POST,
            "/service-accounts/123/rotate",
            "service_account_id",
        ),
        (
            Method::DELETE,
            "/service-accounts/123",
            "service_account_id",
        ),
        (Method::DELETE, "/authorizations/abc", "authorization_id"),
    ] {
        let res = send(
            &app,
            method,
            &org.account_path(rest),
            Some(&org.token),
            None,
        )
        .await;
        assert_eq!(
            assert_422(res).await,
            errors(&[(json!(["path", param]), "uuid_parsing")]),
            "{rest}"
        );
    }
    // Path UUIDs are accepted in any case.
    let upper = org.account_path(&format!("/service-accounts/{}/rotate", sa.to_uppercase()));
    let upper = upper.replace(&org.id, &org.id.to_uppercase());
    assert_eq!(app.post_empty(&upper, &org.token).await.status(), 200);
    let upper = org
        .account_path(&format!("/authorizations/{}", authorization.to_uppercase()))
        .replace(&org.id, &org.id.to_uppercase());
    assert_eq!(app.delete(&upper, &org.token).await.status(), 200);

    // Bad query parameters, each named, all reported at once.
    let authorizations = org.account_path("/authorizations");
    let query = |q: &str| format!("{authorizations}?{q}");
    let cases = [
        (
            "include_revoked=maybe",
            vec![(json!(["query", "include_revoked"]), "bool_parsing")],
        ),
        (
            "subject_type=robot",
            vec![(json!(["query", "subject_type"]), "enum")],
        ),
        (
            "grant_kind=owner",
            vec![(json!(["query", "grant_kind"]), "enum")],
        ),
        (
            "subject_id=nope",
            vec![(json!(["query", "subject_id"]), "uuid_parsing")],
        ),
        (
            "capability_key=a%20b",
            vec![(json!(["query", "capability_key"]), "invalid_scope")],
        ),
        (
            "subject_type=x&grant_kind=y&subject_id=z&include_revoked=w",
            vec![
                (json!(["query", "subject_type"]), "enum"),
                (json!(["query", "grant_kind"]), "enum"),
                (json!(["query", "subject_id"]), "uuid_parsing"),
                (json!(["query", "include_revoked"]), "bool_parsing"),
            ],
        ),
    ];
    for (q, expected) in cases {
        assert_eq!(
            assert_422(app.get(&query(q), &org.token).await).await,
            errors(&expected),
            "{q}"
        );
    }
    assert_eq!(
        assert_422(
            app.get(
                &org.account_path("/service-accounts?include_revoked=maybe"),
                &org.token
            )
            .await
        )
        .await,
        errors(&[(json!(["query", "include_revoked"]), "bool_parsing")])
    );
}

async fn unauthenticated_requests_get_401(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (sa, sa_token) = service_account(&app, &org, "sa", &["auth.manage"]).await;
    let granted = get_ok(&app, &org.account_path("/authorizations"), &org.token).await;
    let authorization = text(&granted[0], "id");
    let mut forged = sa_token.clone();
    let at = forged.len() - 20;
    forged.replace_range(
        at..at + 1,
        if &forged[at..at + 1] == "a" { "b" } else { "a" },
    );
    // Well-formed (checksum valid) but never issued here.
    let never_issued = {
        let elsewhere = TestApp::spawn(Backend::Sqlite).await;
        let org = elsewhere.create_org("elsewhere").await;
        text(&create_sa(&elsewhere, &org, &org.token, "x").await, "token")
    };
    let headers: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("empty bearer", Some("Bearer ".into())),
        ("garbage", Some("Bearer hello".into())),
        ("bad checksum", Some(format!("Bearer {forged}"))),
        ("never issued", Some(format!("Bearer {never_issued}"))),
        ("wrong scheme", Some(format!("Basic {sa_token}"))),
        ("no scheme", Some(sa_token.clone())),
    ];
    for (method, path, body) in every_route(&org.id, &sa, &authorization, &sa) {
        for (what, header) in &headers {
            let mut request = app.request(method.clone(), &path, None);
            if let Some(header) = header {
                request = request.header("authorization", header);
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            let res = request.send().await.unwrap();
            assert_eq!(
                res.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{what}: {method} {path}"
            );
            assert_eq!(
                assert_detail(res, 401).await,
                "missing or invalid credentials",
                "{what}: {method} {path}"
            );
        }
    }
    // 401 comes before any other check: a bad body, a bad content type, a bad account id.
    let res = app
        .request(
            Method::POST,
            "/v1/public/accounts/not-a-uuid/auth/service-accounts",
            None,
        )
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_detail(res, 401).await;
    // Nothing was changed by any of them, and the real token still works (scheme in any case).
    let res = app
        .request(Method::GET, &org.account_path("/service-accounts"), None)
        .header("authorization", format!("bearer {sa_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(names(&res.json().await.unwrap()), ["sa"]);
    assert_eq!(
        get_ok(&app, &org.account_path("/authorizations"), &org.token).await,
        granted
    );
}

async fn other_tenants_answer_404(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mine = app.create_org("mine").await;
    let theirs = app.create_org("theirs").await;
    let (my_sa, my_sa_token) = service_account(&app, &mine, "mine", &["auth.manage"]).await;
    let my_grants = get_ok(&app, &mine.account_path("/authorizations"), &mine.token).await;
    let my_grant = text(&my_grants[0], "id");
    let (their_sa, their_sa_token) =
        service_account(&app, &theirs, "theirs", &["auth.manage"]).await;
    let their_grants = get_ok(&app, &theirs.account_path("/authorizations"), &theirs.token).await;
    let their_grant = text(&their_grants[0], "id");

    // Their `*` token and their service account against my account, on every route: 404, never
    // 403; and so is an account that does not exist at all.
    let made_up = uuid::Uuid::new_v4().to_string();
    let probes = [
        (mine.id.as_str(), theirs.token.as_str(), "their * token"),
        (
            mine.id.as_str(),
            their_sa_token.as_str(),
            "their service account",
        ),
        (made_up.as_str(), mine.token.as_str(), "a made-up account"),
    ];
    for (account, token, who) in probes {
        for (method, path, body) in every_route(account, &my_sa, &my_grant, &my_sa) {
            let res = send(&app, method.clone(), &path, Some(token), body.as_ref()).await;
            assert_eq!(
                assert_detail(res, 404).await,
                "not found",
                "{who}: {method} {path}"
            );
        }
    }

    // Their service account and grant under my account: not found either.
    assert_detail(
        app.post_empty(
            &mine.account_path(&format!("/service-accounts/{their_sa}/rotate")),
            &mine.token,
        )
        .await,
        404,
    )
    .await;
    assert_detail(
        app.delete(
            &mine.account_path(&format!("/service-accounts/{their_sa}")),
            &mine.token,
        )
        .await,
        404,
    )
    .await;
    assert_detail(
        app.delete(
            &mine.account_path(&format!("/authorizations/{their_grant}")),
            &mine.token,
        )
        .await,
        404,
    )
    .await;
    assert_eq!(
        get_ok(
            &app,
            &mine.account_path(&format!("/authorizations?subject_id={their_sa}")),
            &mine.token
        )
        .await,
        json!([])
    );
    assert!(!ids(&get_ok(
        &app,
        &mine.account_path("/service-accounts?include_revoked=true"),
        &mine.token
    )
    .await)
    .contains(&their_sa));

    // Nothing of either side was touched.
    assert_eq!(
        get_ok(
            &app,
            &theirs.account_path("/authorizations"),
            &their_sa_token
        )
        .await,
        their_grants
    );
    assert_eq!(
        names(
            &get_ok(
                &app,
                &theirs.account_path("/service-accounts"),
                &their_sa_token
            )
            .await
        ),
        ["theirs"]
    );
    assert_eq!(
        get_ok(&app, &mine.account_path("/authorizations"), &my_sa_token).await,
        my_grants
    );
    assert_eq!(
        names(&get_ok(&app, &mine.account_path("/service-accounts"), &mine.token).await),
        ["mine"]
    );
}

async fn the_rate_limit_answers_429_with_retry_after(backend: Backend) {
    let config = keyplane_server::Config {
        rate_limit_per_minute: 60,
        rate_limit_burst: 3,
        ..crate::helpers::test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let path = org.account_path("/service-accounts");
    for _ in 0..3 {
        assert_eq!(app.get(&path, &org.token).await.status(), 200);
    }
    let limited = app.get(&path, &org.token).await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_detail(limited, 429).await;
    // Per credential, across both surfaces.
    assert_error(
        app.get(&org.path("/api-tokens"), &org.token).await,
        429,
        "rate_limited",
    )
    .await;
    assert_eq!(
        app.get(&other.account_path("/service-accounts"), &other.token)
            .await
            .status(),
        200
    );
}

// ---------------------------------------------------------------------------------------------
// Rights: grants, delegation, both surfaces
// ---------------------------------------------------------------------------------------------

async fn a_service_account_without_grants_may_do_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (id, token) = service_account(&app, &org, "bare", &[]).await;
    let (other, _) = service_account(&app, &org, "other", &["auth.manage"]).await;
    let granted = get_ok(&app, &org.account_path("/authorizations"), &org.token).await;
    let authorization = text(&granted[0], "id");

    // It authenticates (403, not 401) but may do nothing on either surface.
    for (method, path, body) in every_route(&org.id, &other, &authorization, &id) {
        let res = send(&app, method.clone(), &path, Some(&token), body.as_ref()).await;
        assert_eq!(
            res.headers().get("www-authenticate"),
            None,
            "{method} {path}"
        );
        let detail = assert_detail(res, 403).await;
        assert!(detail.contains("auth.manage"), "{method} {path}: {detail}");
    }
    // Not even on itself.
    assert_detail(
        app.post_empty(
            &org.account_path(&format!("/service-accounts/{id}/rotate")),
            &token,
        )
        .await,
        403,
    )
    .await;
    assert_error(
        app.get(&org.path("/api-tokens"), &token).await,
        403,
        "forbidden",
    )
    .await;
    assert_error(
        app.post(&org.path("/api-tokens"), &token, json!({"name": "x"}))
            .await,
        403,
        "forbidden",
    )
    .await;
    // Nothing changed.
    assert_eq!(
        get_ok(&app, &org.account_path("/authorizations"), &org.token).await,
        granted
    );
    assert_eq!(
        names(&get_ok(&app, &org.account_path("/service-accounts"), &org.token).await),
        ["bare", "other"]
    );

    // Granted auth.manage, it manages service accounts and grants...
    grant(&app, &org, &org.token, capability(&id, "auth.manage")).await;
    assert_eq!(
        names(&get_ok(&app, &org.account_path("/service-accounts"), &token).await),
        ["bare", "other"]
    );
    let made = create_sa(&app, &org, &token, "made by bare").await;
    assert_eq!(made["created_by_user_id"], Value::Null);
    let made_id = text(&made, "id");
    assert_eq!(
        get_ok(&app, &org.account_path("/authorizations"), &token)
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    grant(&app, &org, &token, capability(&made_id, "auth.manage")).await;
    let res = app
        .post_empty(
            &org.account_path(&format!("/service-accounts/{made_id}/rotate")),
            &token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{made_id}")),
            &token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(revoked["revoked_by_user_id"], Value::Null);
    timestamp(&revoked["revoked_at"]);
    // ...and nothing else: Aether API tokens need their own capabilities.
    assert_error(
        app.get(&org.path("/api-tokens"), &token).await,
        403,
        "forbidden",
    )
    .await;
}

async fn revoking_a_grant_or_the_account_takes_effect_on_the_next_request(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = create_sa(&app, &org, &org.token, "subject").await;
    let (id, token) = (text(&created, "id"), text(&created, "token"));
    let path = org.account_path("/service-accounts");
    let granted = grant(&app, &org, &org.token, capability(&id, "auth.manage")).await;
    assert_eq!(app.get(&path, &token).await.status(), 200);

    let res = app
        .delete(
            &org.account_path(&format!("/authorizations/{}", text(&granted, "id"))),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    // The very next request, no waiting.
    assert_detail(app.get(&path, &token).await, 403).await;
    assert_detail(
        app.post(&path, &token, json!({"name": "after revoke"}))
            .await,
        403,
    )
    .await;

    // Granted again, it works again.
    let regranted = grant(&app, &org, &org.token, account_owner(&id)).await;
    assert_ne!(regranted["id"], granted["id"]);
    assert_eq!(app.get(&path, &token).await.status(), 200);
    assert_eq!(
        app.get(&org.path("/api-tokens"), &token).await.status(),
        200
    );

    // Revoking the account kills the token at once, whatever its grants.
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{id}")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let refused = app.get(&path, &token).await;
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    assert_detail(refused, 401).await;
    assert_error(
        app.get(&org.path("/api-tokens"), &token).await,
        401,
        "unauthorized",
    )
    .await;
}

async fn a_grant_never_gives_more_than_its_grantor_holds(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (_, manager) = service_account(&app, &org, "manager", &["auth.manage"]).await;
    let (peer, peer_token) = service_account(&app, &org, "peer", &[]).await;
    let path = org.account_path("/authorizations");

    for escalation in [
        capability(&peer, "api_tokens:write"),
        capability(&peer, "api_tokens:read"),
        capability(&peer, "registry:write"),
        capability(&peer, "deploy"),
        account_owner(&peer),
        super_admin(&peer),
    ] {
        assert_detail(app.post(&path, &manager, escalation.clone()).await, 403).await;
    }
    // Everything is granted as account_owner, never as a `*` capability (one spelling per right).
    let errors = assert_422(app.post(&path, &org.token, capability(&peer, "*")).await).await;
    assert_eq!(
        errors,
        [(
            json!(["body", "capability_key"]),
            "invalid_scope".to_string()
        )]
    );
    assert!(ids(&get_ok(
        &app,
        &format!("{path}?subject_id={peer}&include_revoked=true"),
        &org.token
    )
    .await)
    .is_empty());

    // What it holds, it may hand on.
    let given = grant(&app, &org, &manager, capability(&peer, "auth.manage")).await;
    assert_eq!(given["capability_key"], "auth.manage");
    assert_eq!(given["subject_id"], peer.as_str());
    assert_eq!(
        get_ok(&app, &format!("{path}?subject_id={peer}"), &org.token).await,
        json!([given])
    );
    assert_eq!(
        app.get(&org.account_path("/service-accounts"), &peer_token)
            .await
            .status(),
        200
    );
    // Still nothing more.
    assert_detail(
        app.post(&path, &peer_token, account_owner(&peer)).await,
        403,
    )
    .await;
    assert_error(
        app.get(&org.path("/api-tokens"), &peer_token).await,
        403,
        "forbidden",
    )
    .await;

    // An account owner may give anything in the account, except super_admin.
    let (_, owner) = service_account(&app, &org, "owner", &["account_owner"]).await;
    grant(&app, &org, &owner, capability(&peer, "api_tokens:write")).await;
    grant(&app, &org, &owner, account_owner(&peer)).await;
    assert_detail(app.post(&path, &owner, super_admin(&peer)).await, 403).await;
}

async fn rotating_a_more_privileged_service_account_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (manager_id, manager) = service_account(&app, &org, "manager", &["auth.manage"]).await;
    let (owner_id, owner) = service_account(&app, &org, "owner", &["account_owner"]).await;
    let (reader_id, reader) =
        service_account(&app, &org, "reader", &["auth.manage", "api_tokens:read"]).await;
    let (peer_id, _) = service_account(&app, &org, "peer", &["auth.manage"]).await;
    let (bare_id, _) = service_account(&app, &org, "bare", &[]).await;
    let rotate = |id: &str| org.account_path(&format!("/service-accounts/{id}/rotate"));

    // Rotation hands out a secret: the caller must hold every right the account holds.
    for target in [&owner_id, &reader_id] {
        assert_detail(app.post_empty(&rotate(target), &manager).await, 403).await;
    }
    // A grant narrowed to one resource is a right too: one the manager could not grant.
    let (narrowed_id, narrowed) = service_account(&app, &org, "narrowed", &[]).await;
    let narrowed_grant = json!({
        "grant_kind": "capability",
        "subject_type": "service_account",
        "subject_id": narrowed_id,
        "capability_key": "registry:write",
        "resource_type": "project",
        "resource_id": "p1",
    });
    assert_detail(
        app.post(
            &org.account_path("/authorizations"),
            &manager,
            narrowed_grant.clone(),
        )
        .await,
        403,
    )
    .await;
    grant(&app, &org, &org.token, narrowed_grant).await;
    assert_detail(app.post_empty(&rotate(&narrowed_id), &manager).await, 403).await;
    assert_eq!(
        app.get(&org.path("/api-tokens"), &narrowed).await.status(),
        403,
        "narrowed grants confer nothing here, but the token is still the same"
    );
    // The refused rotations changed nothing: the old tokens still work.
    assert_eq!(
        app.get(&org.path("/api-tokens"), &owner).await.status(),
        200
    );
    assert_eq!(
        app.get(&org.path("/api-tokens"), &reader).await.status(),
        200
    );

    // Equal or fewer rights: fine.
    for target in [&peer_id, &bare_id] {
        assert_eq!(
            app.post_empty(&rotate(target), &manager).await.status(),
            200
        );
    }
    // The owner may rotate anyone; a `*` API token too.
    assert_eq!(
        app.post_empty(&rotate(&reader_id), &owner).await.status(),
        200
    );
    assert_error(
        app.get(&org.path("/api-tokens"), &reader).await,
        401,
        "unauthorized",
    )
    .await;
    let res = app.post_empty(&rotate(&owner_id), &org.token).await;
    assert_eq!(res.status(), 200);
    assert_detail(
        app.get(&org.account_path("/service-accounts"), &owner)
            .await,
        401,
    )
    .await;
    // A manager may rotate itself; its old token dies, the new one works.
    let res = app.post_empty(&rotate(&manager_id), &manager).await;
    assert_eq!(res.status(), 200);
    let new = text(&res.json().await.unwrap(), "token");
    assert_detail(
        app.get(&org.account_path("/service-accounts"), &manager)
            .await,
        401,
    )
    .await;
    assert_eq!(
        app.get(&org.account_path("/service-accounts"), &new)
            .await
            .status(),
        200
    );
}

async fn account_owner_may_do_everything_in_the_account(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let (owner_id, owner) = service_account(&app, &org, "owner", &["account_owner"]).await;

    // Service accounts and grants...
    let made = create_sa(&app, &org, &owner, "made by owner").await;
    grant(
        &app,
        &org,
        &owner,
        capability(&text(&made, "id"), "auth.manage"),
    )
    .await;
    assert_eq!(
        get_ok(&app, &org.account_path("/authorizations"), &owner)
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // ...and Aether API tokens, on the other surface.
    let res = app
        .post(
            &org.path("/api-tokens"),
            &owner,
            json!({"name": "from a service account", "scopes": ["api_tokens:read", "deploy"]}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let minted: Value = res.json().await.unwrap();
    assert_eq!(minted["org_id"], org.id);
    let minted_token = text(&minted, "token");
    let listed = get_ok(&app, &org.path("/api-tokens"), &owner).await;
    assert!(listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == minted["id"]));
    assert_eq!(
        app.get(&org.path("/api-tokens"), &minted_token)
            .await
            .status(),
        200
    );
    // Only in its own account.
    assert_error(
        app.get(&other.path("/api-tokens"), &owner).await,
        404,
        "not_found",
    )
    .await;
    assert_detail(
        app.get(&other.account_path("/service-accounts"), &owner)
            .await,
        404,
    )
    .await;
    // Its own grants are what it is: revoking them takes everything away.
    let grants = get_ok(
        &app,
        &org.account_path(&format!("/authorizations?subject_id={owner_id}")),
        &org.token,
    )
    .await;
    let res = app
        .delete(
            &org.account_path(&format!("/authorizations/{}", text(&grants[0], "id"))),
            &owner,
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_error(
        app.get(&org.path("/api-tokens"), &owner).await,
        403,
        "forbidden",
    )
    .await;
    assert_detail(
        app.get(&org.account_path("/service-accounts"), &owner)
            .await,
        403,
    )
    .await;
}

async fn api_tokens_act_here_as_far_as_their_scopes_go(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let manager = text(
        &app.create_token(&org, "manager", &["auth.manage"]).await,
        "token",
    );
    let reader = text(
        &app.create_token(&org, "reader", &["api_tokens:read"]).await,
        "token",
    );
    let writer = text(
        &app.create_token(
            &org,
            "writer",
            &["api_tokens:read", "api_tokens:write", "deploy"],
        )
        .await,
        "token",
    );

    // auth.manage manages service accounts and grants.
    let made = create_sa(&app, &org, &manager, "by token").await;
    assert_eq!(made["created_by_user_id"], Value::Null);
    let id = text(&made, "id");
    assert_eq!(
        names(&get_ok(&app, &org.account_path("/service-accounts"), &manager).await),
        ["by token"]
    );
    let granted = grant(&app, &org, &manager, capability(&id, "auth.manage")).await;
    assert_eq!(
        get_ok(&app, &org.account_path("/authorizations"), &manager).await,
        json!([granted])
    );
    assert_eq!(
        app.post_empty(
            &org.account_path(&format!("/service-accounts/{id}/rotate")),
            &manager
        )
        .await
        .status(),
        200
    );
    // Not more than it holds.
    for escalation in [account_owner(&id), capability(&id, "api_tokens:read")] {
        assert_detail(
            app.post(&org.account_path("/authorizations"), &manager, escalation)
                .await,
            403,
        )
        .await;
    }

    // Other scopes give nothing here, and on each route it is 403 (the token is valid).
    for token in [&reader, &writer] {
        for (method, path, body) in every_route(&org.id, &id, &text(&granted, "id"), &id) {
            let res = send(&app, method.clone(), &path, Some(token), body.as_ref()).await;
            assert_detail(res, 403).await;
        }
    }
    // A `*` token acts here.
    assert_eq!(
        get_ok(&app, &org.account_path("/service-accounts"), &org.token)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let res = app
        .delete(
            &org.account_path(&format!("/service-accounts/{id}")),
            &manager,
        )
        .await;
    assert_eq!(res.status(), 200);
}

async fn tokens_cross_surfaces_only_as_far_as_their_rights_go(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;

    // A service account granted api_tokens:read lists Aether API tokens but cannot create one.
    let (_, sa_reader) = service_account(&app, &org, "reader", &["api_tokens:read"]).await;
    let listed = get_ok(&app, &org.path("/api-tokens"), &sa_reader).await;
    assert_eq!(listed["items"][0]["name"], "bootstrap");
    // Refused in the dialect of the surface it called.
    assert_error(
        app.post(&org.path("/api-tokens"), &sa_reader, json!({"name": "x"}))
            .await,
        403,
        "forbidden",
    )
    .await;
    assert_detail(
        app.get(&org.account_path("/service-accounts"), &sa_reader)
            .await,
        403,
    )
    .await;

    // With api_tokens:write as well it mints, but only what it holds.
    let (_, sa_writer) = service_account(
        &app,
        &org,
        "writer",
        &["api_tokens:read", "api_tokens:write"],
    )
    .await;
    let res = app
        .post(
            &org.path("/api-tokens"),
            &sa_writer,
            json!({"name": "child", "scopes": ["api_tokens:read"]}),
        )
        .await;
    assert_eq!(res.status(), 201);
    for escalation in [json!(["auth.manage"]), json!(["*"]), json!(["deploy"])] {
        assert_error(
            app.post(
                &org.path("/api-tokens"),
                &sa_writer,
                json!({"name": "escalate", "scopes": escalation}),
            )
            .await,
            403,
            "forbidden",
        )
        .await;
    }

    // An Aether token with auth.manage creates service accounts but cannot list Aether tokens.
    let aether = text(
        &app.create_token(&org, "aether manager", &["auth.manage"])
            .await,
        "token",
    );
    create_sa(&app, &org, &aether, "from aether").await;
    assert_error(
        app.get(&org.path("/api-tokens"), &aether).await,
        403,
        "forbidden",
    )
    .await;
    assert_error(
        app.post(&org.path("/api-tokens"), &aether, json!({"name": "x"}))
            .await,
        403,
        "forbidden",
    )
    .await;
    // The api-token list holds what was made above, and nothing refused slipped through.
    let all = get_ok(&app, &org.path("/api-tokens"), &org.token).await;
    let names: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bootstrap", "child", "aether manager"]);
}

// ---------------------------------------------------------------------------------------------
// Reference
// ---------------------------------------------------------------------------------------------

async fn openapi_and_docs_list_the_hybridbox_routes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let doc: Value = app.openapi().await;
    let base = "/v1/public/accounts/{account_id}/auth";
    let operations = [
        (
            "/service-accounts",
            "get",
            vec!["account_id", "include_revoked", "expiring_within_days"],
        ),
        (
            "/service-accounts",
            "post",
            vec!["account_id", "Idempotency-Key"],
        ),
        (
            "/service-accounts/{service_account_id}/rotate",
            "post",
            vec!["account_id", "service_account_id", "Idempotency-Key"],
        ),
        (
            "/service-accounts/{service_account_id}",
            "delete",
            vec!["account_id", "service_account_id"],
        ),
        (
            "/service-accounts/{service_account_id}/suspend",
            "post",
            vec!["account_id", "service_account_id"],
        ),
        (
            "/service-accounts/{service_account_id}/resume",
            "post",
            vec!["account_id", "service_account_id"],
        ),
        (
            "/service-accounts/{service_account_id}/retire-previous",
            "post",
            vec!["account_id", "service_account_id"],
        ),
        (
            "/authorizations",
            "get",
            vec![
                "account_id",
                "subject_type",
                "subject_id",
                "grant_kind",
                "capability_key",
                "include_revoked",
            ],
        ),
        (
            "/authorizations",
            "post",
            vec!["account_id", "Idempotency-Key"],
        ),
        (
            "/authorizations/{authorization_id}",
            "delete",
            vec!["account_id", "authorization_id"],
        ),
    ];
    for (rest, method, params) in &operations {
        let path = format!("{base}{rest}");
        let op = &doc["paths"][&path][method];
        assert!(op.is_object(), "{method} {path} is documented");
        let documented: Vec<&str> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(&documented, params, "{method} {path}");
        assert!(op["responses"]["401"].is_object() && op["responses"]["422"].is_object());
        assert!(op["security"].is_array(), "{method} {path}");
    }
    // Nothing else under the Hybridbox prefix.
    let hybridbox: usize = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(p, _)| p.starts_with("/v1/public/"))
        .map(|(_, item)| item.as_object().unwrap().len())
        .sum();
    assert_eq!(hybridbox, operations.len());
    assert!(
        doc["paths"][format!("{base}/service-accounts")]["post"]["responses"]["201"].is_object()
    );
    assert!(doc["paths"][format!("{base}/authorizations")]["post"]["responses"]["201"].is_object());
    let service_account = &doc["components"]["schemas"]["ServiceAccount"];
    for field in SERVICE_ACCOUNT_FIELDS {
        assert!(
            service_account["properties"][field].is_object(),
            "ServiceAccount.{field}"
        );
    }
    let required: BTreeSet<String> = service_account["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        required,
        set(&[
            "account_id",
            "id",
            "name",
            "token_prefix",
            "token_public_id",
            "token_last4",
            "created_at",
            "updated_at",
            "canary"
        ])
    );
    // The create body as the docs state it; the create and rotate answers add the token.
    let create = &doc["components"]["schemas"]["ServiceAccountCreate"];
    assert_eq!(create["required"], json!(["name"]));
    assert_eq!(create["properties"]["name"]["minLength"], 1);
    assert_eq!(create["properties"]["name"]["maxLength"], 120);
    assert_eq!(create["properties"]["expires_at"]["format"], "date-time");
    let with_token = doc["components"]["schemas"]["ServiceAccountWithToken"].to_string();
    assert!(
        with_token.contains("#/components/schemas/ServiceAccount\"")
            && with_token.contains("\"token\""),
        "{with_token}"
    );
    let authorization = &doc["components"]["schemas"]["Authorization"];
    for field in AUTHORIZATION_FIELDS {
        assert!(
            authorization["properties"][field].is_object(),
            "Authorization.{field}"
        );
    }

    let html = app
        .request(Method::GET, "/docs", None)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (rest, _, _) in &operations {
        assert!(
            html.contains(&format!("{base}{rest}")),
            "/docs shows {rest}"
        );
    }
    for title in [
        "Create Service Account",
        "Rotate Service Account",
        "Revoke Service Account",
        "Create Authorization",
    ] {
        assert!(html.contains(title), "/docs shows {title}");
    }
}

/// A tenant with thousands of service accounts, half of them revoked (kept forever), gets every
/// one in id order, as before, without the server holding the list whole: the answer is written
/// a page at a time (chunked), and is still one bare JSON array.
async fn long_service_account_lists_are_answered_whole_a_page_at_a_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.account_path("/service-accounts");
    let count = 2 * more_than_a_page();
    let seeded = app
        .import_credentials(
            &org,
            keyplane_core::CredentialKind::ServiceAccount,
            count,
            |i| i % 2 == 1,
        )
        .await;

    let res = app
        .get(&format!("{path}?include_revoked=true"), &org.token)
        .await;
    let all = streamed_list(res).await;
    assert_eq!(ids(&all), seeded_ids(&seeded, |_| true));
    for (item, (_, revoked)) in all.as_array().unwrap().iter().zip(&seeded) {
        assert_eq!(keys(item), service_account_fields(false));
        assert_eq!(item["revoked_at"].is_string(), *revoked, "{item}");
    }

    let live = streamed_list(app.get(&path, &org.token).await).await;
    let live_ids = seeded_ids(&seeded, |revoked| !revoked);
    assert_eq!(live_ids.len(), count / 2);
    assert_eq!(ids(&live), live_ids);
    assert!(live
        .as_array()
        .unwrap()
        .iter()
        .all(|item| item["revoked_at"].is_null()));

    // A short list is answered as it always was, with its length.
    let other = app.create_org("small").await;
    let res = app
        .get(&other.account_path("/service-accounts"), &other.token)
        .await;
    assert_eq!(res.headers()["content-length"], "2");
    assert_eq!(res.text().await.unwrap(), "[]");
}

/// A page read after the answer began that fails ends the body early: the client cannot take a
/// truncated list for the whole one. A failure on the first page is answered as before (503).
async fn a_list_page_that_cannot_be_read_cuts_the_answer_short(backend: Backend) {
    let (app, store) =
        crate::faulty_store::FaultyStore::spawn(backend, crate::helpers::test_config()).await;
    let org = app.create_org("acme").await;
    let path = org.account_path("/service-accounts");
    app.import_credentials(
        &org,
        keyplane_core::CredentialKind::ServiceAccount,
        more_than_a_page(),
        |_| false,
    )
    .await;

    store.fail_credential_lists_after(1);
    let res = app.get(&path, &org.token).await;
    assert_eq!(res.status(), 200);
    assert!(res.bytes().await.is_err(), "the body ends early");

    store.fail_credential_lists_after(0);
    assert_eq!(app.get(&path, &org.token).await.status(), 503);

    store.fail_credential_lists_after(u32::MAX);
    let whole = streamed_list(app.get(&path, &org.token).await).await;
    assert_eq!(whole.as_array().unwrap().len(), more_than_a_page());
}

/// Grants, `count` of them to users, every other one revoked, straight into the store; their ids
/// and whether each is revoked, in id order.
async fn seed_grants(app: &TestApp, org: &Org, count: usize) -> Vec<(String, bool)> {
    let tenant = keyplane_core::TenantId::from_uuid(org.id.parse().unwrap());
    let now = keyplane_server::ops::now();
    let mut seeded = Vec::new();
    for i in 0..count {
        let mut grant = keyplane_core::NewGrant {
            kind: keyplane_core::GrantKind::Capability,
            subject_type: keyplane_core::SubjectType::User,
            subject_id: uuid::Uuid::now_v7(),
            capability_key: Some(keyplane_core::Scope::parse("auth.manage").unwrap()),
            resource: keyplane_core::GrantResource {
                resource_type: None,
                resource_id: None,
            },
        }
        .issue(
            tenant,
            now,
            keyplane_core::CreatedBy::system(keyplane_core::Channel::Admin),
        );
        if i % 2 == 1 {
            grant.revoked_at = Some(now);
        }
        let event = keyplane_core::AuditEvent::new(
            uuid::Uuid::now_v7(),
            tenant,
            now,
            keyplane_core::audit::actions::AUTHORIZATION_CREATED,
            keyplane_core::AuditActor::system(),
            Default::default(),
        );
        app.app
            .store()
            .insert_grant(&grant, &event, None)
            .await
            .expect("store the grant");
        seeded.push((grant.id.to_string(), grant.revoked_at.is_some()));
    }
    seeded.sort();
    seeded
}

/// Thousands of grants are listed whole, in id order, as before, written a page at a time, with
/// and without the revoked ones, and filtered as asked.
async fn long_authorization_lists_are_answered_whole_a_page_at_a_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let path = org.account_path("/authorizations");
    let seeded = seed_grants(&app, &org, more_than_a_page()).await;
    let every_id = seeded_ids(&seeded, |_| true);
    let live_ids = seeded_ids(&seeded, |revoked| !revoked);

    for query in [
        "include_revoked=true",
        "include_revoked=true&subject_type=user",
    ] {
        let res = app.get(&format!("{path}?{query}"), &org.token).await;
        let all = streamed_list(res).await;
        assert_eq!(ids(&all), every_id, "{query}");
        for (item, (_, revoked)) in all.as_array().unwrap().iter().zip(&seeded) {
            assert_eq!(keys(item), set(&AUTHORIZATION_FIELDS));
            assert_eq!(item["revoked_at"].is_string(), *revoked, "{item}");
        }
    }
    // Live ones only: more than a page still.
    let live = streamed_list(app.get(&path, &org.token).await).await;
    assert_eq!(ids(&live), live_ids);
    // A filter that matches none is an empty array, as before.
    let none = get_ok(&app, &format!("{path}?subject_type=group"), &org.token).await;
    assert_eq!(none, json!([]));
}

both_backends!(
    a_retire_window_the_grace_period_ends_first_is_refused,
    long_service_account_lists_are_answered_whole_a_page_at_a_time,
    a_list_page_that_cannot_be_read_cuts_the_answer_short,
    long_authorization_lists_are_answered_whole_a_page_at_a_time,
    create_returns_the_documented_fields_and_a_one_time_token,
    list_is_a_bare_array_without_revoked_by_default,
    revoke_returns_the_record_and_is_idempotent,
    rotate_keeps_the_id_and_kills_the_old_token,
    duplicate_live_names_conflict,
    service_account_validation_reports_every_bad_field,
    malformed_bodies_get_their_own_statuses,
    last_used_at_is_recorded_after_use,
    expired_service_accounts_are_rejected,
    authorizations_are_granted_listed_filtered_and_revoked,
    authorization_validation_reports_every_bad_field,
    grants_to_one_subject_are_capped,
    bad_path_and_query_parameters_are_422,
    unauthenticated_requests_get_401,
    other_tenants_answer_404,
    the_rate_limit_answers_429_with_retry_after,
    a_service_account_without_grants_may_do_nothing,
    revoking_a_grant_or_the_account_takes_effect_on_the_next_request,
    a_grant_never_gives_more_than_its_grantor_holds,
    rotating_a_more_privileged_service_account_is_refused,
    account_owner_may_do_everything_in_the_account,
    api_tokens_act_here_as_far_as_their_scopes_go,
    tokens_cross_surfaces_only_as_far_as_their_rights_go,
    openapi_and_docs_list_the_hybridbox_routes,
);

/// `retire_when_unused_seconds` at or past `grace_seconds` could never retire anything (the grace
/// period ends first): refused in FastAPI's dialect, and nothing is rotated.
async fn a_retire_window_the_grace_period_ends_first_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let created = create_sa(&app, &org, &org.token, "rotating").await;
    let id = text(&created, "id");
    let path = org.account_path(&format!("/service-accounts/{id}/rotate"));
    for retire in [600, 601] {
        let body = json!({"grace_seconds": 600, "retire_when_unused_seconds": retire});
        assert_eq!(
            assert_422(app.post(&path, &org.token, body.clone()).await).await,
            errors(&[(
                json!(["body", "retire_when_unused_seconds"]),
                "out_of_range"
            )]),
            "body {body}"
        );
    }
    let listed = get_ok(&app, &org.account_path("/service-accounts"), &org.token).await;
    assert_eq!(
        listed[0]["token_public_id"], created["token_public_id"],
        "not rotated"
    );
    let res = app
        .post(
            &path,
            &org.token,
            json!({"grace_seconds": 600, "retire_when_unused_seconds": 599}),
        )
        .await;
    assert_eq!(res.status(), 200);
}
