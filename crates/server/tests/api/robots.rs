//! `/api/v1/organizations/{orgID}/registry` and its robot accounts, every status path, plus what
//! the registry token service makes of the robots they manage.

use crate::helpers::{
    assert_error, both_backends, eventually, fields, more_than_a_page, retry_after_secs,
    seeded_ids, streamed_list, test_config, Org, TestApp,
};
use keyplane_store::testing::Backend;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const REGISTRY_FIELDS: [&str; 9] = [
    "id",
    "org_id",
    "harbor_project",
    "endpoint",
    "enabled",
    "quota_gb",
    "used_gb",
    "created_at",
    "updated_at",
];

const ROBOT_FIELDS: [&str; 13] = [
    "id",
    "org_id",
    "name",
    "permissions",
    "harbor_id",
    "last_used_at",
    "created_at",
    "updated_at",
    "expires_at",
    // The lifecycle (rotation with a grace period, suspension).
    "previous_secret_expires_at",
    "previous_secret_last_used_at",
    "suspended_at",
    // Always present: true only for a canary.
    "canary",
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

fn robot_fields(with_token: bool) -> BTreeSet<String> {
    let mut fields = set(&ROBOT_FIELDS);
    if with_token {
        fields.insert("token".into());
    }
    fields
}

fn robots(org: &Org) -> String {
    org.path("/registry/robot-accounts")
}

fn robot(org: &Org, id: &str) -> String {
    org.path(&format!("/registry/robot-accounts/{id}"))
}

fn rotate(org: &Org, id: &str) -> String {
    org.path(&format!("/registry/robot-accounts/{id}/rotate"))
}

fn str_of<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string `{field}` in {value}"))
}

async fn json_of(res: Response, status: u16, what: &str) -> Value {
    let actual = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(actual, status, "{what}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

async fn put(app: &TestApp, path: &str, token: &str, body: Value) -> Response {
    app.request(Method::PUT, path, Some(token))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A POST with no body, as rotate takes.
async fn post_nothing(app: &TestApp, path: &str, token: &str) -> Response {
    app.request(Method::POST, path, Some(token))
        .send()
        .await
        .unwrap()
}

/// `POST /registry` with the org's `*` token, asserting 201.
async fn enable(app: &TestApp, org: &Org) -> Value {
    json_of(
        post_nothing(app, &org.path("/registry"), &org.token).await,
        201,
        "enabling the registry",
    )
    .await
}

/// Creates a robot, asserting 201; returns the body (with its `token`).
async fn create_robot(app: &TestApp, org: &Org, body: Value) -> Value {
    json_of(
        app.post(&robots(org), &org.token, body.clone()).await,
        201,
        &format!("creating robot {body}"),
    )
    .await
}

fn list_names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no `items` array in {list}"))
        .iter()
        .map(|item| str_of(item, "name").to_string())
        .collect()
}

/// `GET /registry/token` with HTTP Basic, as skopeo asks; returns the status and the JWT's payload
/// (null when refused).
async fn registry_token(app: &TestApp, username: &str, secret: &str, scope: &str) -> (u16, Value) {
    let (status, _, claims) = registry_answer(app, username, secret, scope).await;
    (status, claims)
}

/// [`registry_token`] with the answer's body too.
async fn registry_answer(
    app: &TestApp,
    username: &str,
    secret: &str,
    scope: &str,
) -> (u16, Value, Value) {
    let res = app
        .request(Method::GET, "/registry/token", None)
        .basic_auth(username, Some(secret))
        .query(&[("service", "keyplane-registry"), ("scope", scope)])
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    let claims = match body["token"].as_str() {
        Some(jwt) => {
            let payload = jwt.split('.').nth(1).expect("a compact JWS");
            serde_json::from_slice(
                &data_encoding::BASE64URL_NOPAD
                    .decode(payload.as_bytes())
                    .expect("base64url JWT payload"),
            )
            .expect("JSON JWT payload")
        }
        None => Value::Null,
    };
    (status, body, claims)
}

async fn registry_is_disabled_until_enabled(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;

    let before = json_of(
        app.get(&org.path("/registry"), &org.token).await,
        200,
        "GET /registry before enabling",
    )
    .await;
    assert_eq!(before, json!({"enabled": false}));

    let enabled = enable(&app, &org).await;
    assert_eq!(keys(&enabled), set(&["registry", "credentials"]));
    let registry = &enabled["registry"];
    assert_eq!(keys(registry), set(&REGISTRY_FIELDS));
    uuid::Uuid::parse_str(str_of(registry, "id")).unwrap();
    assert_eq!(registry["org_id"], org.id.as_str());
    assert_eq!(registry["harbor_project"], "acme");
    assert_eq!(registry["endpoint"], "localhost:5000");
    assert_eq!(registry["enabled"], true);
    assert!(registry["quota_gb"].is_i64(), "quota_gb in {registry}");
    assert_eq!(registry["used_gb"], Value::Null);
    for at in ["created_at", "updated_at"] {
        let text = str_of(registry, at);
        assert!(text.ends_with('Z'), "{at} {text}");
        chrono::DateTime::parse_from_rfc3339(text).unwrap();
    }
    let credentials = &enabled["credentials"];
    assert_eq!(keys(credentials), set(&["username", "password"]));
    assert_eq!(credentials["username"], "robot$acme+default");
    let password = str_of(credentials, "password");
    assert!(password.starts_with("kprobot_"), "password {password}");

    // GET returns the same record, never the password again.
    let res = app.get(&org.path("/registry"), &org.token).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains(password));
    let got: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(&got, registry);

    // The default robot is an ordinary robot account: listed, pull and push, no secret shown.
    let res = app.get(&robots(&org), &org.token).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains(password) && !text.contains("\"token\""));
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(keys(&list), set(&["items"]));
    assert_eq!(list_names(&list), ["default"]);
    let default = &list["items"][0];
    assert_eq!(keys(default), robot_fields(false));
    assert_eq!(default["permissions"], json!(["pull", "push"]));
    // Its password logs in to the registry.
    let (status, claims) = registry_token(
        &app,
        "robot$acme+default",
        password,
        "repository:acme/app:pull,push",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(claims["access"][0]["actions"], json!(["pull", "push"]));

    // Enabling twice is a conflict, and changes nothing.
    assert_error(
        post_nothing(&app, &org.path("/registry"), &org.token).await,
        409,
        "conflict",
    )
    .await;
    let after: Value = app
        .get(&org.path("/registry"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(&after, registry);
    let list: Value = app
        .get(&robots(&org), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list_names(&list), ["default"]);
}

/// A store failure while enabling answers 503 (never a 201 whose password was not stored), seals
/// nothing under the Idempotency-Key, and the same request succeeds once the store is back.
async fn a_failed_enable_answers_503_and_can_be_retried(backend: Backend) {
    let (app, switch) =
        crate::faulty_store::FaultyStore::spawn(backend, crate::helpers::test_config()).await;
    let org = app.create_org("acme").await;
    let enable_with_key = || {
        app.request(Method::POST, &org.path("/registry"), Some(&org.token))
            .header("Idempotency-Key", "enable-registry-1")
            .send()
    };
    switch.set_registry_down(true);
    let res = enable_with_key().await.unwrap();
    assert!(res.headers().contains_key("retry-after"), "{res:?}");
    assert_error(res, 503, "unavailable").await;
    switch.set_registry_down(false);
    let before = json_of(
        app.get(&org.path("/registry"), &org.token).await,
        200,
        "GET /registry after the failed enable",
    )
    .await;
    assert_eq!(before, json!({"enabled": false}));
    // The retry is served anew, and its password is the stored one.
    let enabled = json_of(enable_with_key().await.unwrap(), 201, "the retry").await;
    let (status, _) = registry_token(
        &app,
        str_of(&enabled["credentials"], "username"),
        str_of(&enabled["credentials"], "password"),
        "repository:acme/app:pull",
    )
    .await;
    assert_eq!(status, 200);
    let events = app.audit_events(&org, "registry.enabled").await;
    assert_eq!(events.len(), 1, "{events:?}");
}

/// Permission updates racing each other: each event's `old_permissions` is what the update
/// before it (in the trail's order) set, never a value another update had already replaced.
async fn concurrent_permission_updates_record_what_each_replaced(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let created = create_robot(&app, &org, json!({"name": "ci", "permissions": ["pull"]})).await;
    let path = robot(&org, str_of(&created, "id"));
    for round in 0..3 {
        let updates: Vec<_> = (0..12)
            .map(|i| {
                tokio::spawn(
                    app.request(Method::PUT, &path, Some(&org.token))
                        .json(&json!({"permissions": [format!("pull:r{round}-{i}/*")]}))
                        .send(),
                )
            })
            .collect();
        for update in updates {
            assert_eq!(update.await.unwrap().unwrap().status(), 200);
        }
    }
    let mut events = app
        .audit_events(&org, "robot_account.permissions_updated")
        .await;
    assert_eq!(events.len(), 36);
    events.sort_by_key(|event| event["seq"].as_u64());
    let mut current = json!(["pull"]);
    for event in &events {
        assert_eq!(event["details"]["old_permissions"], current, "{event}");
        current = event["details"]["permissions"].clone();
    }
}

async fn robots_need_an_enabled_registry(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    assert_error(
        app.post(&robots(&org), &org.token, json!({"name": "ci"}))
            .await,
        409,
        "conflict",
    )
    .await;
    let list = json_of(
        app.get(&robots(&org), &org.token).await,
        200,
        "listing robots before enabling",
    )
    .await;
    assert_eq!(list, json!({"items": []}));
    // Once enabled, the same request works.
    enable(&app, &org).await;
    create_robot(&app, &org, json!({"name": "ci"})).await;
}

async fn robot_crud_with_the_documented_fields(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;

    let created = create_robot(
        &app,
        &org,
        json!({"name": "ci", "permissions": ["pull", "push", "delete", "push:team-a/*"]}),
    )
    .await;
    assert_eq!(keys(&created), robot_fields(true));
    let id = str_of(&created, "id").to_string();
    uuid::Uuid::parse_str(&id).unwrap();
    assert_eq!(created["org_id"], org.id.as_str());
    assert_eq!(created["name"], "ci");
    assert_eq!(
        created["permissions"],
        json!(["pull", "push", "delete", "push:team-a/*"])
    );
    assert_eq!(created["harbor_id"], Value::Null);
    assert_eq!(created["last_used_at"], Value::Null);
    assert!(str_of(&created, "created_at").ends_with('Z'));
    assert_eq!(created["created_at"], created["updated_at"]);
    let secret = str_of(&created, "token").to_string();
    assert!(secret.starts_with("kprobot_"), "robot secret {secret}");

    // Permissions default to pull.
    let reader = create_robot(&app, &org, json!({"name": "reader"})).await;
    assert_eq!(reader["permissions"], json!(["pull"]));
    let reader = create_robot(&app, &org, json!({"name": "reader.2", "permissions": null})).await;
    assert_eq!(reader["permissions"], json!(["pull"]));

    // Reads: the record without its secret.
    let one = json_of(
        app.get(&robot(&org, &id), &org.token).await,
        200,
        "GET robot",
    )
    .await;
    assert_eq!(keys(&one), robot_fields(false));
    let mut expected = created.clone();
    expected.as_object_mut().unwrap().remove("token");
    assert_eq!(one, expected);
    let res = app.get(&robots(&org), &org.token).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains(&secret));
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list_names(&list), ["default", "ci", "reader", "reader.2"]);
    for item in list["items"].as_array().unwrap() {
        assert_eq!(keys(item), robot_fields(false));
    }

    // A login before the change, so that a cached verification must not outlive it.
    let (status, claims) = registry_token(
        &app,
        "robot$acme+ci",
        &secret,
        "repository:acme/app:pull,push",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(claims["access"][0]["actions"], json!(["pull", "push"]));
    // Its last_used_at is written now, not between the two reads compared below.
    app.app.flush_usage().await;

    // PUT replaces the permissions.
    let updated = json_of(
        put(
            &app,
            &robot(&org, &id),
            &org.token,
            json!({"permissions": ["pull", "pull:team-b/**"]}),
        )
        .await,
        200,
        "PUT permissions",
    )
    .await;
    assert_eq!(keys(&updated), robot_fields(false));
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(updated["name"], "ci");
    assert_eq!(updated["permissions"], json!(["pull", "pull:team-b/**"]));
    assert_eq!(updated["created_at"], created["created_at"]);
    let at = |value: &Value, field: &str| {
        chrono::DateTime::parse_from_rfc3339(str_of(value, field))
            .unwrap_or_else(|e| panic!("{field} of {value}: {e}"))
    };
    assert!(
        at(&updated, "updated_at") > at(&created, "updated_at"),
        "updated_at did not move: {updated}"
    );
    let one: Value = app
        .get(&robot(&org, &id), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one, updated);
    for (body, expected) in [
        (json!({}), vec![("permissions", "required")]),
        (
            json!({"permissions": null}),
            vec![("permissions", "required")],
        ),
        (
            json!({"permissions": ["admin"]}),
            vec![("permissions[0]", "invalid_format")],
        ),
        (
            json!({"permissions": []}),
            vec![("permissions", "too_short")],
        ),
        (
            json!({"permissions": ["pull"], "name": "renamed"}),
            vec![("name", "unknown_field")],
        ),
    ] {
        let details = assert_error(
            put(&app, &robot(&org, &id), &org.token, body.clone()).await,
            422,
            "validation_failed",
        )
        .await;
        let expected: Vec<(String, String)> = expected
            .into_iter()
            .map(|(f, c)| (f.to_string(), c.to_string()))
            .collect();
        assert_eq!(fields(&details), expected, "PUT {body}");
    }
    let one: Value = app
        .get(&robot(&org, &id), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one, updated, "a refused PUT changed the robot");

    // The registry sees the new permissions on the next login.
    let (status, claims) = registry_token(
        &app,
        "robot$acme+ci",
        &secret,
        "repository:acme/app:pull,push repository:acme/team-b/x/y:pull",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        claims["access"],
        json!([
            {"type": "repository", "name": "acme/app", "actions": ["pull"]},
            {"type": "repository", "name": "acme/team-b/x/y", "actions": ["pull"]},
        ])
    );

    // Tokens are only issued for the configured registry service.
    let res = app
        .request(Method::GET, "/registry/token", None)
        .basic_auth("robot$acme+ci", Some(&secret))
        .query(&[
            ("service", "some-other-registry"),
            ("scope", "repository:acme/app:pull"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNSUPPORTED");

    // Rotate: same id, new secret; the old one no longer logs in.
    let rotated = json_of(
        post_nothing(&app, &rotate(&org, &id), &org.token).await,
        200,
        "rotate",
    )
    .await;
    assert_eq!(keys(&rotated), robot_fields(true));
    assert_eq!(rotated["id"], id.as_str());
    assert_eq!(rotated["permissions"], updated["permissions"]);
    let new_secret = str_of(&rotated, "token").to_string();
    assert!(new_secret.starts_with("kprobot_"));
    assert_ne!(new_secret, secret);
    let scope = "repository:acme/app:pull";
    assert_eq!(
        registry_token(&app, "robot$acme+ci", &secret, scope)
            .await
            .0,
        401
    );
    assert_eq!(
        registry_token(&app, "robot$acme+ci", &new_secret, scope)
            .await
            .0,
        200
    );

    // DELETE: 204 with no body, then the robot is gone everywhere.
    let res = app.delete(&robot(&org, &id), &org.token).await;
    assert_eq!(res.status(), 204);
    assert!(res.bytes().await.unwrap().is_empty());
    assert_eq!(
        registry_token(&app, "robot$acme+ci", &new_secret, scope)
            .await
            .0,
        401
    );
    assert_error(
        app.get(&robot(&org, &id), &org.token).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.delete(&robot(&org, &id), &org.token).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        post_nothing(&app, &rotate(&org, &id), &org.token).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        put(
            &app,
            &robot(&org, &id),
            &org.token,
            json!({"permissions": ["pull"]}),
        )
        .await,
        404,
        "not_found",
    )
    .await;
    let list: Value = app
        .get(&robots(&org), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list_names(&list), ["default", "reader", "reader.2"]);
    // The name is free again.
    let again = create_robot(&app, &org, json!({"name": "ci"})).await;
    assert_ne!(again["id"], id.as_str());

    // Unknown and malformed ids.
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_error(
        app.get(&robot(&org, &unknown), &org.token).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        put(
            &app,
            &robot(&org, &unknown),
            &org.token,
            json!({"permissions": ["pull"]}),
        )
        .await,
        404,
        "not_found",
    )
    .await;
    let details = assert_error(
        app.get(&robot(&org, "not-a-uuid"), &org.token).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        fields(&details),
        [("id".to_string(), "invalid_uuid".to_string())]
    );
    // An API token's id is not a robot's.
    let api_token = app.create_token(&org, "not-a-robot", &[]).await;
    let api_token_id = str_of(&api_token, "id");
    for res in [
        app.get(&robot(&org, api_token_id), &org.token).await,
        put(
            &app,
            &robot(&org, api_token_id),
            &org.token,
            json!({"permissions": ["pull"]}),
        )
        .await,
        post_nothing(&app, &rotate(&org, api_token_id), &org.token).await,
        app.delete(&robot(&org, api_token_id), &org.token).await,
    ] {
        assert_error(res, 404, "not_found").await;
    }
    assert_eq!(
        app.get(
            &org.path(&format!("/api-tokens/{api_token_id}")),
            &org.token
        )
        .await
        .status(),
        200,
        "the API token was touched through the robot routes"
    );
}

async fn robot_validation_reports_every_bad_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let too_many: Vec<String> = (0..51).map(|i| format!("pull:r{i}")).collect();
    let cases = [
        (json!({}), vec![("name", "required")]),
        (json!({"name": ""}), vec![("name", "too_short")]),
        (json!({"name": "a".repeat(121)}), vec![("name", "too_long")]),
        (json!({"name": 5}), vec![("name", "invalid_type")]),
        (json!({"name": "CI"}), vec![("name", "invalid_format")]),
        (json!({"name": "a--b"}), vec![("name", "invalid_format")]),
        (json!({"name": "-ci"}), vec![("name", "invalid_format")]),
        (json!({"name": "ci."}), vec![("name", "invalid_format")]),
        (json!({"name": "c i"}), vec![("name", "invalid_format")]),
        (json!({"name": "robot$x"}), vec![("name", "invalid_format")]),
        (json!({"name": " ci "}), vec![("name", "invalid_format")]),
        (
            json!({"name": "ok", "permissions": ["admin"]}),
            vec![("permissions[0]", "invalid_format")],
        ),
        (
            json!({"name": "ok", "permissions": ["pull", "push:Team-A/*"]}),
            vec![("permissions[1]", "invalid_format")],
        ),
        (
            json!({"name": "ok", "permissions": ["pull:", "push:a//b", "delete:/x"]}),
            vec![
                ("permissions[0]", "invalid_format"),
                ("permissions[1]", "invalid_format"),
                ("permissions[2]", "invalid_format"),
            ],
        ),
        (
            json!({"name": "ok", "permissions": ["pull", "push", "pull"]}),
            vec![("permissions[2]", "duplicate")],
        ),
        (
            json!({"name": "ok", "permissions": "pull"}),
            vec![("permissions", "invalid_type")],
        ),
        (
            json!({"name": "ok", "permissions": ["pull", 7]}),
            vec![("permissions[1]", "invalid_type")],
        ),
        (
            json!({"name": "ok", "permissions": too_many}),
            vec![("permissions", "too_many")],
        ),
        (
            json!({"name": "ok", "permission": ["pull"]}),
            vec![("permission", "unknown_field")],
        ),
        (
            json!({"name": "ok", "scopes": ["registry:write"]}),
            vec![("scopes", "unknown_field")],
        ),
        (
            json!({"name": "CI", "permissions": ["pull", "admin"], "extra": true}),
            vec![
                ("name", "invalid_format"),
                ("permissions[1]", "invalid_format"),
                ("extra", "unknown_field"),
            ],
        ),
        (json!(["name"]), vec![("body", "invalid_type")]),
    ];
    for (body, expected) in cases {
        let details = assert_error(
            app.post(&robots(&org), &org.token, body.clone()).await,
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
    // Malformed bodies get their own statuses.
    let res = app
        .request(Method::POST, &robots(&org), Some(&org.token))
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "invalid_json").await;
    let res = app
        .request(Method::POST, &robots(&org), Some(&org.token))
        .header("content-type", "text/plain")
        .body("{\"name\": \"ci\"}")
        .send()
        .await
        .unwrap();
    assert_error(res, 415, "unsupported_media_type").await;
    // Nothing was created by any of them.
    let list: Value = app
        .get(&robots(&org), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list_names(&list), ["default"]);
    // Harbor-valid names are accepted.
    for name in ["a", "ci-bot", "a.b_c-d", "x1", &"a".repeat(120)] {
        create_robot(&app, &org, json!({"name": name})).await;
    }
}

async fn duplicate_live_robot_names_conflict(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    enable(&app, &org).await;
    enable(&app, &other).await;
    create_robot(&app, &org, json!({"name": "ci"})).await;
    for name in ["ci", "default"] {
        assert_error(
            app.post(
                &robots(&org),
                &org.token,
                json!({"name": name, "permissions": ["push"]}),
            )
            .await,
            409,
            "conflict",
        )
        .await;
    }
    // Another org may use the same name.
    create_robot(&app, &other, json!({"name": "ci"})).await;
    let list: Value = app
        .get(&robots(&org), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list_names(&list), ["default", "ci"]);
}

async fn registry_scopes_limit_what_a_token_may_do(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let reader = app.create_token(&org, "reader", &["registry:read"]).await;
    let reader = str_of(&reader, "token").to_string();
    let writer = app.create_token(&org, "writer", &["registry:write"]).await;
    let writer = str_of(&writer, "token").to_string();
    let tokens_only = app
        .create_token(&org, "tokens", &["api_tokens:read", "api_tokens:write"])
        .await;
    let tokens_only = str_of(&tokens_only, "token").to_string();
    let nothing = app.create_token(&org, "nothing", &["deploy"]).await;
    let nothing = str_of(&nothing, "token").to_string();

    // Enabling needs registry:write.
    for token in [&reader, &tokens_only, &nothing] {
        assert_error(
            post_nothing(&app, &org.path("/registry"), token).await,
            403,
            "forbidden",
        )
        .await;
    }
    assert_eq!(
        app.get(&org.path("/registry"), &reader).await.status(),
        200,
        "registry:read reads the (disabled) registry"
    );
    let enabled = json_of(
        post_nothing(&app, &org.path("/registry"), &writer).await,
        201,
        "enabling with registry:write",
    )
    .await;
    assert_eq!(enabled["registry"]["harbor_project"], "acme");
    let ci = create_robot(&app, &org, json!({"name": "ci"})).await;
    let id = str_of(&ci, "id").to_string();

    // registry:read reads, never writes.
    for path in [org.path("/registry"), robots(&org), robot(&org, &id)] {
        assert_eq!(app.get(&path, &reader).await.status(), 200, "GET {path}");
    }
    let refused = [
        app.post(&robots(&org), &reader, json!({"name": "x"})).await,
        put(
            &app,
            &robot(&org, &id),
            &reader,
            json!({"permissions": ["push"]}),
        )
        .await,
        post_nothing(&app, &rotate(&org, &id), &reader).await,
        app.delete(&robot(&org, &id), &reader).await,
        post_nothing(&app, &org.path("/registry"), &reader).await,
    ];
    for res in refused {
        assert_error(res, 403, "forbidden").await;
    }

    // registry:write writes (any permission: robots are not API tokens) but does not read.
    let pusher = json_of(
        app.post(
            &robots(&org),
            &writer,
            json!({"name": "pusher", "permissions": ["pull", "push", "delete"]}),
        )
        .await,
        201,
        "registry:write creates a robot",
    )
    .await;
    let pusher_id = str_of(&pusher, "id");
    assert_eq!(
        put(
            &app,
            &robot(&org, pusher_id),
            &writer,
            json!({"permissions": ["pull"]})
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        post_nothing(&app, &rotate(&org, pusher_id), &writer)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.delete(&robot(&org, pusher_id), &writer).await.status(),
        204
    );
    assert_error(app.get(&robots(&org), &writer).await, 403, "forbidden").await;

    // API-token scopes or custom scopes confer nothing here.
    for token in [&tokens_only, &nothing] {
        for res in [
            app.get(&org.path("/registry"), token).await,
            app.get(&robots(&org), token).await,
            app.get(&robot(&org, &id), token).await,
            app.post(&robots(&org), token, json!({"name": "x"})).await,
            put(
                &app,
                &robot(&org, &id),
                token,
                json!({"permissions": ["push"]}),
            )
            .await,
            post_nothing(&app, &rotate(&org, &id), token).await,
            app.delete(&robot(&org, &id), token).await,
        ] {
            assert_error(res, 403, "forbidden").await;
        }
    }
    // None of the refused writes changed ci.
    let one: Value = app
        .get(&robot(&org, &id), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["permissions"], json!(["pull"]));
    assert_eq!(one["updated_at"], ci["updated_at"]);
}

async fn other_tenants_registries_answer_404(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mine = app.create_org("mine").await;
    let theirs = app.create_org("theirs").await;
    enable(&app, &mine).await;
    enable(&app, &theirs).await;
    let victim = create_robot(
        &app,
        &theirs,
        json!({"name": "victim", "permissions": ["pull"]}),
    )
    .await;
    let their_id = str_of(&victim, "id").to_string();

    // My `*` token against their org: 404 on every route, never 403.
    let responses = [
        app.get(&theirs.path("/registry"), &mine.token).await,
        post_nothing(&app, &theirs.path("/registry"), &mine.token).await,
        app.get(&robots(&theirs), &mine.token).await,
        app.post(&robots(&theirs), &mine.token, json!({"name": "x"}))
            .await,
        app.get(&robot(&theirs, &their_id), &mine.token).await,
        put(
            &app,
            &robot(&theirs, &their_id),
            &mine.token,
            json!({"permissions": ["push"]}),
        )
        .await,
        post_nothing(&app, &rotate(&theirs, &their_id), &mine.token).await,
        app.delete(&robot(&theirs, &their_id), &mine.token).await,
    ];
    for res in responses {
        assert_error(res, 404, "not_found").await;
    }
    // Their robot's id under my org: not found either.
    let responses = [
        app.get(&robot(&mine, &their_id), &mine.token).await,
        put(
            &app,
            &robot(&mine, &their_id),
            &mine.token,
            json!({"permissions": ["push"]}),
        )
        .await,
        post_nothing(&app, &rotate(&mine, &their_id), &mine.token).await,
        app.delete(&robot(&mine, &their_id), &mine.token).await,
    ];
    for res in responses {
        assert_error(res, 404, "not_found").await;
    }
    // A made-up org looks exactly like a real foreign one.
    let made_up = format!("/api/v1/organizations/{}/registry", uuid::Uuid::new_v4());
    assert_error(app.get(&made_up, &mine.token).await, 404, "not_found").await;
    assert_error(
        post_nothing(&app, &made_up, &mine.token).await,
        404,
        "not_found",
    )
    .await;
    // Their robot is untouched and still logs in.
    let one = json_of(
        app.get(&robot(&theirs, &their_id), &theirs.token).await,
        200,
        "their robot",
    )
    .await;
    assert_eq!(one["permissions"], json!(["pull"]));
    assert_eq!(one["updated_at"], victim["updated_at"]);
    let (status, _) = registry_token(
        &app,
        "robot$theirs+victim",
        str_of(&victim, "token"),
        "repository:theirs/app:pull",
    )
    .await;
    assert_eq!(status, 200);
}

async fn robot_secrets_do_not_open_management_apis(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let enabled = enable(&app, &org).await;
    let default_secret = str_of(&enabled["credentials"], "password").to_string();
    let ci = create_robot(
        &app,
        &org,
        json!({"name": "ci", "permissions": ["pull", "push", "delete"]}),
    )
    .await;
    let ci_secret = str_of(&ci, "token").to_string();
    let ci_id = str_of(&ci, "id").to_string();
    for secret in [&default_secret, &ci_secret] {
        let requests = [
            app.request(Method::GET, &org.path("/registry"), Some(secret)),
            app.request(Method::POST, &org.path("/registry"), Some(secret)),
            app.request(Method::GET, &robots(&org), Some(secret)),
            app.request(Method::POST, &robots(&org), Some(secret))
                .json(&json!({"name": "climb", "permissions": ["push"]})),
            app.request(Method::GET, &robot(&org, &ci_id), Some(secret)),
            app.request(Method::POST, &rotate(&org, &ci_id), Some(secret)),
            app.request(Method::GET, &org.path("/api-tokens"), Some(secret)),
            app.request(Method::POST, &org.path("/api-tokens"), Some(secret))
                .json(&json!({"name": "climb", "scopes": ["*"]})),
        ];
        for request in requests {
            let res = request.send().await.unwrap();
            let what = format!("{} {}", res.url().path(), res.status());
            assert_eq!(
                res.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{what}"
            );
            assert_error(res, 401, "unauthorized").await;
        }
        // The Hybridbox surface is a management API too (its own error dialect).
        let path = org.account_path("/service-accounts");
        let res = app.get(&path, secret).await;
        assert_eq!(res.status(), 401, "robot secret as Bearer on {path}");
    }
    // Nothing was created, and the robot still works where it belongs.
    let list: Value = app
        .get(&robots(&org), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list_names(&list), ["default", "ci"]);
    let (status, claims) = registry_token(
        &app,
        "robot$acme+ci",
        &ci_secret,
        "repository:acme/app:delete",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(claims["access"][0]["actions"], json!(["delete"]));
}

async fn same_named_orgs_get_different_projects(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let first = app.create_org("acme").await;
    let second = app.create_org("acme").await;
    let third = app.create_org("Acme Corp!").await;
    let first_project = enable(&app, &first).await["registry"]["harbor_project"].clone();
    let second_enabled = enable(&app, &second).await;
    let second_project = second_enabled["registry"]["harbor_project"].clone();
    let third_project = enable(&app, &third).await["registry"]["harbor_project"].clone();
    assert_eq!(first_project, "acme");
    assert_ne!(second_project, first_project);
    let second_project = second_project.as_str().unwrap().to_string();
    assert!(
        second_project.starts_with("acme-"),
        "second acme's project {second_project}"
    );
    assert_eq!(third_project, "acme-corp");
    assert_eq!(
        second_enabled["credentials"]["username"],
        format!("robot${second_project}+default")
    );
    // The second acme's robots get nothing in the first acme's project, and vice versa.
    let second_secret = str_of(&second_enabled["credentials"], "password");
    let (status, claims) = registry_token(
        &app,
        &format!("robot${second_project}+default"),
        second_secret,
        "repository:acme/app:pull,push",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(claims["access"], json!([]));
    let (status, claims) = registry_token(
        &app,
        &format!("robot${second_project}+default"),
        second_secret,
        &format!("repository:{second_project}/app:pull,push"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(claims["access"][0]["actions"], json!(["pull", "push"]));
    // The first acme's robot name cannot be borrowed with the second one's secret.
    let (status, _) = registry_token(
        &app,
        "robot$acme+default",
        second_secret,
        "repository:acme/app:pull",
    )
    .await;
    assert_eq!(status, 401);
}

/// Only a complete login (right secret under the robot's own name) counts as a use.
async fn a_refused_login_does_not_count_as_use(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let created = create_robot(&app, &org, json!({"name": "ci"})).await;
    let (id, secret) = (
        str_of(&created, "id").to_string(),
        str_of(&created, "token").to_string(),
    );
    let (status, _) = registry_token(
        &app,
        "robot$acme+someone-else",
        &secret,
        "repository:acme/app:pull",
    )
    .await;
    assert_eq!(status, 401);
    // Admitted, then refused for what it asked: no token, so no use either.
    let (status, _) =
        registry_token(&app, "robot$acme+ci", &secret, "repository:acme/App:pull").await;
    assert_eq!(status, 400);
    let res = app
        .request(Method::GET, "/registry/token", None)
        .basic_auth("robot$acme+ci", Some(&secret))
        .query(&[
            ("service", "another-registry"),
            ("scope", "repository:acme/app:pull"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    app.app.flush_usage().await;
    let unused: Value = app
        .get(&robot(&org, &id), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(unused["last_used_at"], Value::Null);
    let (status, _) =
        registry_token(&app, "robot$acme+ci", &secret, "repository:acme/app:pull").await;
    assert_eq!(status, 200);
    app.app.flush_usage().await;
    let used: Value = app
        .get(&robot(&org, &id), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert!(used["last_used_at"].is_string());
}

/// A login whose grant is costly (wildcard-heavy permissions against many long names: up to ~10 ms
/// of a core) is charged to the robot's rate limit; cheap ones, a CI fleet's bursts, are not.
async fn costly_robot_logins_are_rate_limited(backend: Backend) {
    let burst = 3;
    let config = keyplane_server::Config {
        rate_limit_per_minute: 60,
        rate_limit_burst: burst,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let plain = str_of(
        &create_robot(&app, &org, json!({"name": "ci"})).await,
        "token",
    )
    .to_string();
    for _ in 0..burst * 2 {
        let (status, _) =
            registry_token(&app, "robot$acme+ci", &plain, "repository:acme/app:pull").await;
        assert_eq!(status, 200, "a cheap login");
    }
    let wild = format!("pull:{}b", "*a".repeat(16));
    let costly = str_of(
        &create_robot(&app, &org, json!({"name": "wild", "permissions": [wild]})).await,
        "token",
    )
    .to_string();
    let many: Vec<String> = (0..32)
        .map(|i| format!("repository:acme/{}{i:02}:pull", "a".repeat(248)))
        .collect();
    let many = many.join(" ");
    for _ in 0..burst {
        let (status, _) = registry_token(&app, "robot$acme+wild", &costly, &many).await;
        assert_eq!(status, 200, "a costly login within the burst");
    }
    let refused = app
        .request(Method::GET, "/registry/token", None)
        .basic_auth("robot$acme+wild", Some(&costly))
        .query(&[("service", "keyplane-registry"), ("scope", many.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    retry_after_secs(&refused);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
}

/// A costly login takes a place in its organization's share before it waits for a turn: past the
/// share (one here) another of the same organization answers 429 at once, in the registry's
/// format, while another organization's costly login still waits its turn and succeeds.
async fn one_organizations_costly_logins_leave_turns_to_others(backend: Backend) {
    let mut config = test_config();
    config.registry.costly_grants_per_org = Some(1);
    let app = TestApp::spawn_with(backend, config).await;
    let wild = format!("pull:{}b", "*a".repeat(16));
    let mut logins = Vec::new();
    for name in ["acme", "zeta"] {
        let org = app.create_org(name).await;
        let project = str_of(&enable(&app, &org).await["registry"], "harbor_project").to_string();
        let secret = str_of(
            &create_robot(&app, &org, json!({"name": "wild", "permissions": [wild]})).await,
            "token",
        )
        .to_string();
        // Names of 255 bytes, the longest: as costly as the permission makes it.
        let long = "a".repeat(255 - project.len() - 3);
        let many: Vec<String> = (0..32)
            .map(|i| format!("repository:{project}/{long}{i:02}:pull"))
            .collect();
        logins.push((format!("robot${project}+wild"), secret, many.join(" ")));
    }
    let login = |(user, secret, scope): &(String, String, String)| {
        app.request(Method::GET, "/registry/token", None)
            .basic_auth(user, Some(secret))
            .query(&[("service", "keyplane-registry"), ("scope", scope.as_str())])
            .send()
    };

    // Every turn taken: acme's first costly login holds acme's place while it waits for one.
    let turns = app.app.hold_costly_grant_turns().await;
    let acme_first = tokio::spawn(login(&logins[0]));
    eventually("acme's login holds its place", || async {
        app.app.costly_grant_places_held() == 1
    })
    .await;
    let refused = tokio::time::timeout(std::time::Duration::from_secs(10), login(&logins[0]))
        .await
        .expect("acme's second costly login answers at once")
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("organization"),
        "{body}"
    );
    // zeta's costly login is not refused: it waits its turn beside acme's.
    let zeta = tokio::spawn(login(&logins[1]));
    eventually("zeta's login holds its place", || async {
        app.app.costly_grant_places_held() == 2
    })
    .await;
    drop(turns);
    for (name, waiting) in [("acme", acme_first), ("zeta", zeta)] {
        let answer = waiting.await.unwrap().unwrap();
        assert_eq!(answer.status(), 200, "{name}'s costly login");
        let body: Value = answer.json().await.unwrap();
        assert!(body["token"].is_string(), "{name}: {body}");
    }
    // The places are given back with the work: acme logs in again.
    eventually("every place given back", || async {
        app.app.costly_grant_places_held() == 0
    })
    .await;
    assert_eq!(login(&logins[0]).await.unwrap().status(), 200);
}

/// Aether create and update refuse a glob over the bounds, or whose literal parts cannot be those
/// of a canonical repository name, with one field error each; the largest allowed one is accepted.
async fn robot_globs_are_bounded_and_canonical(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let longest = format!("pull:{}", "a".repeat(255));
    let wildest = format!("pull:{}b", "*a".repeat(16));
    let cases = [
        (format!("pull:{}", "a".repeat(256)), "too_long"),
        (format!("pull:{}b", "*a".repeat(17)), "too_many"),
        (format!("push:{}", "a/**".repeat(17)), "too_many"),
        ("pull:a..b".to_string(), "invalid_format"),
        ("pull:team/../other".to_string(), "invalid_format"),
        ("pull:team/./app".to_string(), "invalid_format"),
        ("pull:.*".to_string(), "invalid_format"),
        ("pull:team-/*".to_string(), "invalid_format"),
        ("pull:a__-b".to_string(), "invalid_format"),
        ("pull:team/".to_string(), "invalid_format"),
        ("pull:***".to_string(), "invalid_format"),
    ];
    let ci = create_robot(&app, &org, json!({"name": "ci"})).await;
    let ci_id = str_of(&ci, "id").to_string();
    for (glob, code) in &cases {
        let create = app
            .post(
                &robots(&org),
                &org.token,
                json!({"name": "globbed", "permissions": ["pull", glob]}),
            )
            .await;
        let update = put(
            &app,
            &robot(&org, &ci_id),
            &org.token,
            json!({"permissions": [glob, "push"]}),
        )
        .await;
        for (res, field) in [(create, "permissions[1]"), (update, "permissions[0]")] {
            let details = assert_error(res, 422, "validation_failed").await;
            assert_eq!(
                fields(&details),
                [(field.to_string(), code.to_string())],
                "{glob}"
            );
        }
    }
    let list: Value = app
        .get(&robots(&org), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list_names(&list), ["default", "ci"]);
    let one: Value = app
        .get(&robot(&org, &ci_id), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["permissions"], json!(["pull"]));
    let created = create_robot(
        &app,
        &org,
        json!({"name": "bounded", "permissions": [longest, wildest, "push:team-*/**"]}),
    )
    .await;
    assert_eq!(
        created["permissions"],
        json!([longest, wildest, "push:team-*/**"])
    );
}

/// Bounded time for any question: `/registry/token` with a glob that a backtracking matcher
/// never finishes (`*a` × 16 then `b` against `a` × 249), and with a 300-byte name. The case runs
/// on its own thread and runtime so that a handler pinning its thread fails the test instead of
/// hanging it.
async fn pathological_globs_answer_at_once(backend: Backend) {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(pathological_globs_case(backend))
        });
        let _ = done.send(outcome);
    });
    match finished.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("/registry/token did not answer within two minutes"),
    }
}

async fn pathological_globs_case(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let glob = format!("pull:{}b", "*a".repeat(16));
    let robot = create_robot(
        &app,
        &org,
        json!({"name": "ci", "permissions": [glob, "push:**a**a**a**a**a**a**a**a**b"]}),
    )
    .await;
    let secret = str_of(&robot, "token").to_string();
    let almost = format!("acme/{}", "a".repeat(249));
    let ask = |scope: String| {
        let (app, secret) = (&app, &secret);
        async move { registry_token(app, "robot$acme+ci", secret, &scope).await }
    };
    let (status, claims) = ask(format!("repository:{almost}:pull,push,*")).await;
    assert_eq!(status, 200);
    assert_eq!(claims["access"], json!([]));
    let (status, claims) = ask(format!("repository:{almost}b:pull")).await;
    assert_eq!(status, 200);
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": format!("{almost}b"), "actions": ["pull"]}])
    );
    // 32 such scopes at once, the most one request may ask (matched off the async workers).
    let many: Vec<String> = (0..32)
        .map(|i| format!("repository:acme/{}{i:02}:*", "a".repeat(248)))
        .collect();
    let (status, claims) = ask(many.join(" ")).await;
    assert_eq!(status, 200);
    assert_eq!(claims["access"], json!([]));
    // A 300-byte name is no repository name: refused before any matching.
    let (status, _) = ask(format!("repository:acme/{}:pull", "a".repeat(295))).await;
    assert_eq!(status, 400);

    // A robot stored before the bounds (60 wildcards) still loads and answers at once.
    let legacy =
        keyplane_core::RobotPermission::parse_stored(&format!("pull:{}b", "*a".repeat(60)))
            .unwrap();
    let old = create_robot(&app, &org, json!({"name": "old"})).await;
    app.app
        .store()
        .update_robot_permissions(
            keyplane_core::TenantId::from_uuid(org.id.parse().unwrap()),
            keyplane_core::CredentialId::from_uuid(str_of(&old, "id").parse().unwrap()),
            &[legacy],
            chrono::Utc::now(),
            &|_| {
                keyplane_core::AuditEvent::new(
                    uuid::Uuid::now_v7(),
                    keyplane_core::TenantId::from_uuid(org.id.parse().unwrap()),
                    chrono::Utc::now(),
                    keyplane_core::audit::actions::ROBOT_ACCOUNT_PERMISSIONS_UPDATED,
                    keyplane_core::AuditActor::system(),
                    Default::default(),
                )
            },
        )
        .await
        .unwrap();
    let (status, claims) = registry_token(
        &app,
        "robot$acme+old",
        str_of(&old, "token"),
        &format!("repository:{almost}:pull"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(claims["access"], json!([]));
}

/// A `scope` outside the Distribution grammar, or naming no canonical repository, is refused with
/// 400 (GET: the registry's error envelope; POST: RFC 6749 `invalid_scope`) and no token; a
/// well-formed scope the robot may not use is still just left out.
async fn bad_requested_scopes_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let robot = create_robot(
        &app,
        &org,
        json!({"name": "ci", "permissions": ["pull", "push"]}),
    )
    .await;
    let secret = str_of(&robot, "token").to_string();
    let get = |scopes: Vec<String>| {
        let app = &app;
        let secret = secret.clone();
        async move {
            let mut query = vec![("service".to_string(), "keyplane-registry".to_string())];
            query.extend(scopes.into_iter().map(|s| ("scope".to_string(), s)));
            let res = app
                .request(Method::GET, "/registry/token", None)
                .basic_auth("robot$acme+ci", Some(&secret))
                .query(&query)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    let too_many: Vec<String> = (0..33)
        .map(|i| format!("repository:acme/r{i}:pull"))
        .collect();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["repository:acme/../other/app:pull".into()],
            "NAME_INVALID",
        ),
        (vec!["repository:acme//app:pull".into()], "NAME_INVALID"),
        (vec!["repository:acme/app/:pull".into()], "NAME_INVALID"),
        (vec!["repository:Acme/App:pull".into()], "NAME_INVALID"),
        (vec!["repository:acme/a..b:pull".into()], "NAME_INVALID"),
        (vec!["repository:acme/-app:pull".into()], "NAME_INVALID"),
        (
            vec![format!("repository:acme/{}:pull", "a".repeat(251))],
            "NAME_INVALID",
        ),
        (vec!["repository:acme/app".into()], "UNSUPPORTED"),
        (vec!["bogus".into()], "UNSUPPORTED"),
        (vec!["repository:acme/app:pull;push".into()], "UNSUPPORTED"),
        (
            vec![
                "repository:acme/app:pull".into(),
                "repository:acme/x:pull repository:..:pull".into(),
            ],
            "NAME_INVALID",
        ),
        (too_many, "UNSUPPORTED"),
    ];
    for (scopes, code) in cases {
        let (status, body) = get(scopes.clone()).await;
        assert_eq!(status, 400, "{scopes:?}: {body}");
        assert_eq!(body["errors"][0]["code"], code, "{scopes:?}: {body}");
        assert!(body["errors"][0]["message"].is_string());
        assert!(body.get("token").is_none(), "{body}");
    }
    // The message says which scope, without echoing it.
    let (_, body) = get(vec![
        "repository:acme/app:pull".into(),
        "repository:acme/x:pull repository:..:pull".into(),
    ])
    .await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("scope 3 "),
        "{body}"
    );

    // The OAuth2 form answers in RFC 6749's dialect.
    let res = app
        .request(Method::POST, "/registry/token", None)
        .form(&[
            ("grant_type", "password"),
            ("username", "robot$acme+ci"),
            ("password", &secret),
            ("service", "keyplane-registry"),
            ("scope", "repository:acme/../other/app:pull,push"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "invalid_scope", "{body}");
    assert!(body["error_description"].is_string());

    // Bad credentials still answer 401 first.
    let res = app
        .request(Method::GET, "/registry/token", None)
        .basic_auth("robot$acme+ci", Some("wrong"))
        .query(&[("scope", "repository:acme/../x:pull")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // Well-formed scopes it may not use are left out, not refused; canonical ones are granted.
    let (status, claims) = registry_token(
        &app,
        "robot$acme+ci",
        &secret,
        "repository:other/app:pull registry:catalog:* repository:acme/a.b_c__d--e/f:pull,admin",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "acme/a.b_c__d--e/f", "actions": ["pull"]}])
    );
}

/// `POST /registry/token` refuses a body it cannot read as HTTP says, in the Distribution shape:
/// 415 for one that is not labelled a form, 413 for one over the size limit. Neither is a 400: a
/// client told to fix its request's syntax could not.
async fn the_token_form_refuses_what_it_cannot_read(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let robot = create_robot(&app, &org, json!({"name": "ci"})).await;
    let form = format!(
        "grant_type=password&username=robot%24acme%2Bci&password={}&service=keyplane-registry",
        str_of(&robot, "token")
    );
    let post = |content_type: Option<&str>, body: String| {
        let mut request = app.request(Method::POST, "/registry/token", None);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        async move { request.body(body).send().await.unwrap() }
    };
    let refused = |res: Response, status: u16| async move {
        assert_eq!(res.status(), status);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNSUPPORTED", "{body}");
        body["errors"][0]["message"].as_str().unwrap().to_string()
    };
    for content_type in [Some("text/plain"), Some("application/json"), None] {
        let message = refused(post(content_type, form.clone()).await, 415).await;
        assert_eq!(
            message, "request body must be application/x-www-form-urlencoded",
            "{content_type:?}"
        );
    }
    let oversized = format!("{form}&scope={}", "a".repeat(70 * 1024));
    let message = refused(post(Some(FORM), oversized).await, 413).await;
    assert_eq!(message, "request body is too large");
    // The same form, labelled as one and within the limit, is served.
    let res = post(Some(FORM), form.clone()).await;
    assert_eq!(res.status(), 200);
}

const FORM: &str = "application/x-www-form-urlencoded";

/// An organization with more robots than a list reads at a time gets every live one, in id order
/// as before, in one `{"items": [...]}`, written a page at a time (chunked).
async fn long_robot_lists_are_answered_whole_a_page_at_a_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let before = json_of(
        app.get(&robots(&org), &org.token).await,
        200,
        "the default robot",
    )
    .await;
    let default_robot = str_of(&before["items"][0], "id").to_string();
    let kind = keyplane_core::CredentialKind::RobotAccount;
    let seeded = app
        .import_credentials(&org, kind, more_than_a_page(), |i| i % 10 == 0)
        .await;
    let mut live = seeded_ids(&seeded, |revoked| !revoked);
    live.push(default_robot);
    live.sort();

    let list = streamed_list(app.get(&robots(&org), &org.token).await).await;
    assert_eq!(keys(&list), set(&["items"]));
    let items = list["items"].as_array().unwrap();
    let listed: Vec<&str> = items.iter().map(|item| str_of(item, "id")).collect();
    assert_eq!(listed, live);
    for item in items {
        assert_eq!(keys(item), robot_fields(false));
    }
}

both_backends!(
    long_robot_lists_are_answered_whole_a_page_at_a_time,
    the_token_form_refuses_what_it_cannot_read,
    a_refused_login_does_not_count_as_use,
    costly_robot_logins_are_rate_limited,
    one_organizations_costly_logins_leave_turns_to_others,
    registry_is_disabled_until_enabled,
    a_failed_enable_answers_503_and_can_be_retried,
    concurrent_permission_updates_record_what_each_replaced,
    robots_need_an_enabled_registry,
    robot_crud_with_the_documented_fields,
    robot_validation_reports_every_bad_field,
    duplicate_live_robot_names_conflict,
    registry_scopes_limit_what_a_token_may_do,
    other_tenants_registries_answer_404,
    robot_secrets_do_not_open_management_apis,
    same_named_orgs_get_different_projects,
    robot_globs_are_bounded_and_canonical,
    pathological_globs_answer_at_once,
    bad_requested_scopes_are_refused,
    a_registry_token_ends_when_its_robot_does,
    a_cached_robot_logs_in_through_a_store_outage,
    a_promotion_after_a_store_outage_is_picked_up,
);

/// The signing key refresh lives through a store outage (it warns and keeps its key) and still
/// picks up a promotion once the store answers, without a restart.
async fn a_promotion_after_a_store_outage_is_picked_up(backend: Backend) {
    let mut config = test_config();
    config.registry.key_refresh = std::time::Duration::from_secs(1);
    let (app, faults) = crate::faulty_store::FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let robot = create_robot(&app, &org, json!({"name": "ci"})).await;
    let secret = str_of(&robot, "token").to_string();
    let kid = || async {
        let (status, body, _) =
            registry_answer(&app, "robot$acme+ci", &secret, "repository:acme/app:pull").await;
        assert_eq!(status, 200, "{body}");
        let header = str_of(&body, "token").split('.').next().unwrap().to_owned();
        let header: Value = serde_json::from_slice(
            &data_encoding::BASE64URL_NOPAD
                .decode(header.as_bytes())
                .unwrap(),
        )
        .unwrap();
        str_of(&header, "kid").to_owned()
    };
    let old = kid().await;

    faults.set_down(true);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    faults.set_down(false);
    assert!(
        crate::logs::captured().contains("cannot re-read the registry signing key"),
        "a failed re-read must be logged"
    );
    assert_eq!(kid().await, old, "the key held signs on after the outage");

    let store = app.app.store();
    let candidate = keyplane_server::registry::mint_candidate().unwrap();
    let staged =
        keyplane_server::ops::signing_key_event("registry.signing_key_staged", "test", None, None);
    let staged = store.stage_signing_key(&candidate, &staged).await.unwrap();
    let promoted = keyplane_server::ops::signing_key_event(
        "registry.signing_key_promoted",
        "test",
        None,
        None,
    );
    store
        .promote_signing_key(chrono::Utc::now(), &promoted)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while kid().await != staged.key_id {
        assert!(
            std::time::Instant::now() < deadline,
            "the promotion was not picked up within 10 s (refresh every 1 s)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        crate::logs::captured()
            .lines()
            .any(|line| line.contains("registry signing key promoted")
                && line.contains(&staged.key_id)),
        "the pick-up must be logged with the key id"
    );
}

async fn a_registry_token_ends_when_its_robot_does(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let expires_at = chrono::Utc::now() + chrono::TimeDelta::seconds(90);
    let robot = create_robot(
        &app,
        &org,
        json!({"name": "brief", "expires_at": expires_at.to_rfc3339()}),
    )
    .await;
    let pull = |name: &str, robot: &Value| {
        let (username, secret) = (
            format!("robot$acme+{name}"),
            str_of(robot, "token").to_string(),
        );
        let app = &app;
        async move {
            let (status, body, claims) =
                registry_answer(app, &username, &secret, "repository:acme/app:pull").await;
            assert_eq!(status, 200, "{body}");
            (body, claims)
        }
    };
    let (body, claims) = pull("brief", &robot).await;
    // Not the token lifetime (300 s): the registry would take it long after the robot expired.
    // Nor the robot's expiry: Distribution takes a token until 60 s past its `exp`.
    let exp = claims["exp"].as_i64().unwrap();
    assert!(
        exp + 60 <= expires_at.timestamp(),
        "the registry takes it until {} past {expires_at}",
        exp + 60
    );
    assert!(exp > claims["iat"].as_i64().unwrap(), "{claims}");
    // The answer's lifetime says the same.
    let issued = chrono::DateTime::parse_from_rfc3339(body["issued_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        issued.timestamp() + body["expires_in"].as_i64().unwrap(),
        exp,
        "{body}"
    );

    // A robot without expiry gets the full lifetime.
    let lasting = create_robot(&app, &org, json!({"name": "lasting"})).await;
    let (body, claims) = pull("lasting", &lasting).await;
    assert_eq!(body["expires_in"], 300);
    assert_eq!(
        claims["exp"].as_i64().unwrap(),
        claims["iat"].as_i64().unwrap() + 300
    );
}

/// A robot whose secret the verification cache holds logs in while the store is down, as any
/// cached credential verifies (stale-if-error): its organization's registry is remembered too.
async fn a_cached_robot_logs_in_through_a_store_outage(backend: Backend) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, test_config()).await;
    let org = app.create_org("acme").await;
    enable(&app, &org).await;
    let created = create_robot(&app, &org, json!({"name": "ci"})).await;
    let secret = str_of(&created, "token").to_string();
    let (status, before) =
        registry_token(&app, "robot$acme+ci", &secret, "repository:acme/app:pull").await;
    assert_eq!(status, 200);
    store.set_down(true);
    let (status, during) =
        registry_token(&app, "robot$acme+ci", &secret, "repository:acme/app:pull").await;
    assert_eq!(status, 200, "a cached robot refused in a store outage");
    assert_eq!(during["access"], before["access"]);
    assert_eq!(during["access"][0]["actions"], json!(["pull"]), "{during}");
}
