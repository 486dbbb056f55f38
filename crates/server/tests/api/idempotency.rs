//! `Idempotency-Key` on every create and rotate route of both surfaces: a retry replays the first
//! answer (the one-time secret included) without a second change, and the store keeps nothing a
//! reader of the database could use.

use crate::faulty_store::FaultyStore;
use crate::helpers::{assert_error, both_backends, fields, test_config, Org, TestApp};
use keyplane_store::testing::Backend;
use reqwest::header::HeaderValue;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const KEY_HEADER: &str = "Idempotency-Key";

fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A POST with `key` and, when given, a JSON body.
async fn post_with_key(
    app: &TestApp,
    path: &str,
    token: &str,
    key: &str,
    body: Option<&Value>,
) -> Response {
    let request = app
        .request(Method::POST, path, Some(token))
        .header(KEY_HEADER, key);
    let request = match body {
        Some(body) => request.json(body),
        None => request,
    };
    request.send().await.unwrap()
}

/// Status, whether the answer says it is a replay, and the JSON body.
async fn answer(res: Response) -> (u16, bool, Value) {
    let status = res.status().as_u16();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let text = res.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, replayed, body)
}

/// Sends the same request twice with one key; asserts the second replays the first exactly.
async fn send_twice(
    app: &TestApp,
    path: &str,
    token: &str,
    body: Option<&Value>,
    status: u16,
) -> Value {
    let key = new_key();
    let (first_status, first_replayed, first) =
        answer(post_with_key(app, path, token, &key, body).await).await;
    assert_eq!(first_status, status, "first request to {path}: {first}");
    assert!(!first_replayed, "a first answer is not a replay");
    let (again_status, again_replayed, again) =
        answer(post_with_key(app, path, token, &key, body).await).await;
    assert_eq!(again_status, status, "retry of {path}: {again}");
    assert!(again_replayed, "the retry says it is a replay");
    assert_eq!(again, first, "the retry of {path} answers the first body");
    first
}

fn str_of<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

async fn count(app: &TestApp, path: &str, token: &str, items: Option<&str>) -> usize {
    let res = app.get(path, token).await;
    assert_eq!(res.status(), 200, "listing {path}");
    let body: Value = res.json().await.unwrap();
    let list = match items {
        Some(field) => &body[field],
        None => &body,
    };
    list.as_array()
        .unwrap_or_else(|| panic!("no list in {body}"))
        .len()
}

async fn api_token_count(app: &TestApp, org: &Org) -> usize {
    count(app, &org.path("/api-tokens"), &org.token, Some("items")).await
}

async fn whoami(app: &TestApp, secret: &str) -> u16 {
    app.get("/v1/whoami", secret).await.status().as_u16()
}

/// `GET /registry/token` as a robot; the status.
async fn robot_login(app: &TestApp, username: &str, secret: &str) -> u16 {
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

async fn aether_creates_and_rotates_replay_a_retry(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;

    // API tokens: create.
    let body = json!({"name": "ci", "scopes": ["api_tokens:read"]});
    let created = send_twice(&app, &org.path("/api-tokens"), &org.token, Some(&body), 201).await;
    assert_eq!(
        api_token_count(&app, &org).await,
        2,
        "one token made, not two"
    );
    let token = str_of(&created, "/token");
    assert_eq!(whoami(&app, token).await, 200, "the replayed secret works");

    // API tokens: rotate. A second rotation would have killed the replayed secret.
    let id = str_of(&created, "/id");
    let rotate = org.path(&format!("/api-tokens/{id}/rotate"));
    let rotated = send_twice(&app, &rotate, &org.token, None, 200).await;
    let new_secret = str_of(&rotated, "/token");
    assert_ne!(new_secret, token);
    assert_eq!(whoami(&app, new_secret).await, 200);
    assert_eq!(whoami(&app, token).await, 401);

    // Registry: enabling twice with one key is one enable and one default robot, not a 409.
    let enabled = send_twice(&app, &org.path("/registry"), &org.token, None, 201).await;
    let robots = org.path("/registry/robot-accounts");
    assert_eq!(count(&app, &robots, &org.token, Some("items")).await, 1);
    assert_eq!(
        robot_login(
            &app,
            str_of(&enabled, "/credentials/username"),
            str_of(&enabled, "/credentials/password")
        )
        .await,
        200
    );

    // Robot accounts: create and rotate.
    let body = json!({"name": "ci", "permissions": ["pull"]});
    let robot = send_twice(&app, &robots, &org.token, Some(&body), 201).await;
    assert_eq!(count(&app, &robots, &org.token, Some("items")).await, 2);
    let robot_id = str_of(&robot, "/id");
    let rotated = send_twice(
        &app,
        &org.path(&format!("/registry/robot-accounts/{robot_id}/rotate")),
        &org.token,
        None,
        200,
    )
    .await;
    assert_ne!(rotated["token"], robot["token"]);
    assert_eq!(
        robot_login(&app, "robot$acme+ci", str_of(&rotated, "/token")).await,
        200
    );
    assert_eq!(
        robot_login(&app, "robot$acme+ci", str_of(&robot, "/token")).await,
        401
    );
}

async fn hybridbox_creates_and_rotates_replay_a_retry(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let accounts = org.account_path("/service-accounts");

    let body = json!({"name": "deployer"});
    let created = send_twice(&app, &accounts, &org.token, Some(&body), 201).await;
    assert_eq!(count(&app, &accounts, &org.token, None).await, 1);
    let token = str_of(&created, "/token");
    assert_eq!(whoami(&app, token).await, 200);

    let id = str_of(&created, "/id");
    let rotated = send_twice(
        &app,
        &org.account_path(&format!("/service-accounts/{id}/rotate")),
        &org.token,
        None,
        200,
    )
    .await;
    assert_eq!(whoami(&app, str_of(&rotated, "/token")).await, 200);
    assert_eq!(whoami(&app, token).await, 401);

    let grants = org.account_path("/authorizations");
    let grant = json!({
        "grant_kind": "capability",
        "subject_type": "service_account",
        "subject_id": id,
        "capability_key": "auth.manage",
    });
    // Without a key the same grant twice is a 409; with one, the retry is the first 201.
    send_twice(&app, &grants, &org.token, Some(&grant), 201).await;
    assert_eq!(count(&app, &grants, &org.token, None).await, 1);
}

/// The `(loc, type)` pairs of a FastAPI 422.
async fn hybridbox_422(res: Response) -> Vec<(Value, String)> {
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("no detail list in {body}"))
        .iter()
        .map(|d| {
            assert!(d["msg"].is_string());
            (d["loc"].clone(), d["type"].as_str().unwrap().to_string())
        })
        .collect()
}

async fn the_key_with_another_request_is_422(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let key = new_key();
    let tokens = org.path("/api-tokens");
    let first = json!({"name": "ci", "scopes": ["api_tokens:read"]});
    let res = post_with_key(&app, &tokens, &org.token, &key, Some(&first)).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let reused = [(
        "Idempotency-Key".to_string(),
        "idempotency_key_reused".to_string(),
    )];
    let other_body = json!({"name": "ci-2", "scopes": ["api_tokens:read"]});
    let res = post_with_key(&app, &tokens, &org.token, &key, Some(&other_body)).await;
    assert_eq!(
        fields(&assert_error(res, 422, "validation_failed").await),
        reused
    );
    // Another route with the key: nothing rotated.
    let rotate = org.path(&format!("/api-tokens/{id}/rotate"));
    let res = post_with_key(&app, &rotate, &org.token, &key, None).await;
    assert_eq!(
        fields(&assert_error(res, 422, "validation_failed").await),
        reused
    );
    assert_eq!(api_token_count(&app, &org).await, 2);
    // The first request still replays.
    let (status, replayed, _) =
        answer(post_with_key(&app, &tokens, &org.token, &key, Some(&first)).await).await;
    assert_eq!((status, replayed), (201, true));

    // Hybridbox names the header in its own dialect.
    let accounts = org.account_path("/service-accounts");
    let key = new_key();
    let res = post_with_key(
        &app,
        &accounts,
        &org.token,
        &key,
        Some(&json!({"name": "a"})),
    )
    .await;
    assert_eq!(res.status(), 201);
    let res = post_with_key(
        &app,
        &accounts,
        &org.token,
        &key,
        Some(&json!({"name": "b"})),
    )
    .await;
    assert_eq!(
        hybridbox_422(res).await,
        vec![(
            json!(["header", "Idempotency-Key"]),
            "idempotency_key_reused".to_string()
        )]
    );
    assert_eq!(count(&app, &accounts, &org.token, None).await, 1);
}

async fn a_malformed_key_is_422(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let body = json!({"name": "ci", "scopes": ["api_tokens:read"]});
    // The value, Aether's code, and the pydantic type Hybridbox names.
    let cases: [(HeaderValue, &str, &str); 4] = [
        (
            HeaderValue::from_static("too-short"),
            "too_short",
            "string_too_short",
        ),
        (
            HeaderValue::from_str(&"k".repeat(256)).unwrap(),
            "too_long",
            "string_too_long",
        ),
        (
            HeaderValue::from_static("has spaces in the middle"),
            "invalid_characters",
            "invalid_characters",
        ),
        (
            HeaderValue::from_bytes("caf\u{e9}-caf\u{e9}-caf\u{e9}-caf\u{e9}".as_bytes()).unwrap(),
            "invalid_characters",
            "invalid_characters",
        ),
    ];
    for (value, code, pydantic_type) in &cases {
        let res = app
            .request(Method::POST, &org.path("/api-tokens"), Some(&org.token))
            .header(KEY_HEADER, value.clone())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            fields(&assert_error(res, 422, "validation_failed").await),
            [("Idempotency-Key".to_string(), code.to_string())],
            "{value:?}"
        );
        let res = app
            .request(
                Method::POST,
                &org.account_path("/service-accounts"),
                Some(&org.token),
            )
            .header(KEY_HEADER, value.clone())
            .json(&json!({"name": "sa"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            hybridbox_422(res).await,
            vec![(
                json!(["header", "Idempotency-Key"]),
                pydantic_type.to_string()
            )]
        );
    }
    let res = app
        .request(Method::POST, &org.path("/api-tokens"), Some(&org.token))
        .header(KEY_HEADER, new_key())
        .header(KEY_HEADER, new_key())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        fields(&assert_error(res, 422, "validation_failed").await),
        [("Idempotency-Key".to_string(), "duplicate".to_string())]
    );
    assert_eq!(api_token_count(&app, &org).await, 1, "nothing was created");
}

async fn a_refused_request_does_not_use_up_its_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let tokens = org.path("/api-tokens");
    let key = new_key();
    // Refused by body validation: the key is free for the corrected request.
    let bad = json!({"name": "", "scopes": ["api_tokens:read"]});
    let res = post_with_key(&app, &tokens, &org.token, &key, Some(&bad)).await;
    assert_eq!(res.status(), 422);
    // Refused by the change itself (409): kept refusals would pin it after the cause is gone.
    let existing = app.create_token(&org, "dup", &["api_tokens:read"]).await;
    let body = json!({"name": "dup", "scopes": ["api_tokens:read"]});
    let res = post_with_key(&app, &tokens, &org.token, &key, Some(&body)).await;
    assert_error(res, 409, "conflict").await;
    let res = app
        .delete(
            &org.path(&format!("/api-tokens/{}", str_of(&existing, "/id"))),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 204);
    let (status, replayed, created) =
        answer(post_with_key(&app, &tokens, &org.token, &key, Some(&body)).await).await;
    assert_eq!((status, replayed), (201, false), "{created}");
    let (status, replayed, again) =
        answer(post_with_key(&app, &tokens, &org.token, &key, Some(&body)).await).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, created);
}

async fn another_caller_with_the_key_gets_its_own_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let target = app.create_token(&org, "target", &["api_tokens:read"]).await;
    let second = app
        .create_token(
            &org,
            "second-admin",
            &["api_tokens:read", "api_tokens:write"],
        )
        .await;
    let rotate = org.path(&format!("/api-tokens/{}/rotate", str_of(&target, "/id")));
    let key = new_key();

    let (status, _, first) =
        answer(post_with_key(&app, &rotate, &org.token, &key, None).await).await;
    assert_eq!(status, 200);
    let (status, replayed, theirs) =
        answer(post_with_key(&app, &rotate, str_of(&second, "/token"), &key, None).await).await;
    assert_eq!(
        (status, replayed),
        (200, false),
        "a fresh rotation: {theirs}"
    );
    assert_ne!(
        theirs["token"], first["token"],
        "not the first caller's secret"
    );
    assert_eq!(whoami(&app, str_of(&first, "/token")).await, 401);
    assert_eq!(whoami(&app, str_of(&theirs, "/token")).await, 200);

    // Another tenant with the key and the same body creates its own token.
    let other = app.create_org("other").await;
    let body = json!({"name": "ci", "scopes": ["api_tokens:read"]});
    let key = new_key();
    let (_, _, mine) = answer(
        post_with_key(
            &app,
            &org.path("/api-tokens"),
            &org.token,
            &key,
            Some(&body),
        )
        .await,
    )
    .await;
    let (status, replayed, its) = answer(
        post_with_key(
            &app,
            &other.path("/api-tokens"),
            &other.token,
            &key,
            Some(&body),
        )
        .await,
    )
    .await;
    assert_eq!((status, replayed), (201, false));
    assert_ne!(its["token"], mine["token"]);
    assert_eq!(its["org_id"].as_str(), Some(other.id.as_str()));
}

async fn concurrent_requests_with_one_key_make_one_change(backend: Backend) {
    let app = std::sync::Arc::new(TestApp::spawn(backend).await);
    let org = std::sync::Arc::new(app.create_org("acme").await);
    let key = new_key();
    let body = json!({"name": "ci", "scopes": ["api_tokens:read"]});
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let (app, org, key, body) = (app.clone(), org.clone(), key.clone(), body.clone());
            tokio::spawn(async move {
                let res = post_with_key(
                    &app,
                    &org.path("/api-tokens"),
                    &org.token,
                    &key,
                    Some(&body),
                )
                .await;
                let retry_after = res.headers().contains_key("retry-after");
                let (status, _, body) = answer(res).await;
                (status, retry_after, body)
            })
        })
        .collect();
    let mut secrets = BTreeSet::new();
    let mut created = 0;
    for request in requests {
        let (status, retry_after, body) = request.await.unwrap();
        match status {
            201 => {
                created += 1;
                secrets.insert(str_of(&body, "/token").to_string());
            }
            409 => {
                assert!(retry_after, "an in-progress 409 says when to retry");
                assert_eq!(body["error"]["code"], "conflict");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(created >= 1);
    assert_eq!(secrets.len(), 1, "every 201 carries the same secret");
    assert_eq!(api_token_count(&app, &org).await, 2, "one token made");
    let (status, replayed, body) = answer(
        post_with_key(
            &app,
            &org.path("/api-tokens"),
            &org.token,
            &key,
            Some(&body),
        )
        .await,
    )
    .await;
    assert_eq!((status, replayed), (201, true));
    assert!(secrets.contains(str_of(&body, "/token")));
}

/// `lookup_id`, `fingerprint`, `nonce`, `response`.
type RawRow = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);

/// The raw idempotency table: each row's byte columns.
async fn stored_rows(app: &TestApp) -> Vec<Vec<Vec<u8>>> {
    let sql = "SELECT lookup_id, fingerprint, nonce, response FROM idempotency_keys";
    let rows: Vec<RawRow> = if app.database_url().starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(app.database_url()).await.unwrap();
        sqlx::query_as(sql).fetch_all(&pool).await.unwrap()
    } else {
        let pool = sqlx::PgPool::connect(app.database_url()).await.unwrap();
        sqlx::query_as(sql).fetch_all(&pool).await.unwrap()
    };
    rows.into_iter()
        .map(|(a, b, c, d)| vec![a, b, c.unwrap_or_default(), d.unwrap_or_default()])
        .collect()
}

/// Makes every idempotency record `hours` older, as if that much time had passed.
async fn age_records(app: &TestApp, hours: i64) {
    let ms = hours * 3_600_000;
    execute(
        app,
        &format!("UPDATE idempotency_keys SET created_at_ms = created_at_ms - {ms}, locked_until_ms = locked_until_ms - {ms}"),
    )
    .await;
}

async fn execute(app: &TestApp, sql: &str) {
    app.execute_sql(sql).await
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn the_store_keeps_no_usable_secret(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let key = new_key();
    let body = json!({"name": "ci", "scopes": ["api_tokens:read"]});
    let res = post_with_key(
        &app,
        &org.path("/api-tokens"),
        &org.token,
        &key,
        Some(&body),
    )
    .await;
    let (status, _, created) = answer(res).await;
    assert_eq!(status, 201);
    let token = str_of(&created, "/token");
    let secret_part = token.rsplit('_').next().unwrap();
    assert!(secret_part.len() >= 16, "{token}");

    let rows = stored_rows(&app).await;
    assert_eq!(rows.len(), 1);
    assert!(!rows[0][3].is_empty(), "the answer is kept, sealed");
    for column in &rows[0] {
        for needle in [token.as_bytes(), secret_part.as_bytes(), key.as_bytes()] {
            assert!(!contains(column, needle), "a stored column holds a secret");
        }
    }
    // On SQLite, nothing in the database files holds the secret or the key either.
    if backend == Backend::Sqlite {
        let path = app
            .database_url()
            .trim_start_matches("sqlite://")
            .to_string();
        let dir = std::path::Path::new(&path).parent().unwrap();
        for entry in std::fs::read_dir(dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!contains(&bytes, secret_part.as_bytes()));
            assert!(!contains(&bytes, key.as_bytes()));
        }
    }
}

async fn a_key_is_kept_for_a_day_then_pruned(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let target = app.create_token(&org, "target", &["api_tokens:read"]).await;
    let rotate = org.path(&format!("/api-tokens/{}/rotate", str_of(&target, "/id")));
    let key = new_key();
    let (_, _, first) = answer(post_with_key(&app, &rotate, &org.token, &key, None).await).await;

    age_records(&app, 23).await;
    let (status, replayed, again) =
        answer(post_with_key(&app, &rotate, &org.token, &key, None).await).await;
    assert_eq!((status, replayed), (200, true), "still kept after 23 h");
    assert_eq!(again, first);

    age_records(&app, 2).await;
    crate::helpers::eventually(
        "the background prune deletes the expired record",
        || async { stored_rows(&app).await.is_empty() },
    )
    .await;
    let (status, replayed, fresh) =
        answer(post_with_key(&app, &rotate, &org.token, &key, None).await).await;
    assert_eq!(
        (status, replayed),
        (200, false),
        "after 24 h the key is new"
    );
    assert_ne!(fresh["token"], first["token"]);
    assert_eq!(whoami(&app, str_of(&fresh, "/token")).await, 200);
}

/// Lets every in-flight record's lock run out, as 61 s would.
async fn expire_locks(app: &TestApp) {
    execute(
        app,
        "UPDATE idempotency_keys SET locked_until_ms = locked_until_ms - 61000",
    )
    .await;
}

/// Sends a request with a new key while the store goes away the moment its change is made (as a
/// process that dies then would leave it); once the store is back and the first request's lock
/// has run out, a retry replays the first answer. Returns it.
async fn kept_through_an_outage(
    app: &TestApp,
    store: &FaultyStore,
    path: &str,
    body: Option<&Value>,
    token: &str,
    status: u16,
) -> Value {
    let key = new_key();
    store.go_down_after_next_change();
    let (first_status, replayed, first) =
        answer(post_with_key(app, path, token, &key, body).await).await;
    assert_eq!((first_status, replayed), (status, false), "{path}: {first}");
    store.set_down(false);
    expire_locks(app).await;
    let (again_status, replayed, again) =
        answer(post_with_key(app, path, token, &key, body).await).await;
    assert_eq!(
        (again_status, replayed),
        (status, true),
        "a retry of {path} replays the answer kept with the change: {again}"
    );
    assert_eq!(again, first, "{path}");
    first
}

/// Every create and rotate keeps its answer in the change's own transaction: nothing the server
/// does after the change (it loses its store here) can leave the change without its answer, so a
/// retry never runs it twice, even once the first request's lock has run out.
async fn every_change_keeps_its_answer_in_its_own_transaction(backend: Backend) {
    let mut config = test_config();
    config.webhooks.allow_private_targets = true;
    let (app, store) = FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    let token = org.token.as_str();

    // API tokens: the create is not run again (it would be a 409: the name is taken).
    let body = json!({"name": "ci", "scopes": ["api_tokens:read"]});
    let created = kept_through_an_outage(
        &app,
        &store,
        &org.path("/api-tokens"),
        Some(&body),
        token,
        201,
    )
    .await;
    assert_eq!(api_token_count(&app, &org).await, 2);
    // Nor the rotation: a second one would end at once the secret the first kept alive for its
    // grace period, the one the client still uses.
    let id = str_of(&created, "/id");
    let rotate = org.path(&format!("/api-tokens/{id}/rotate"));
    let grace = json!({"grace_seconds": 3600});
    let rotated = kept_through_an_outage(&app, &store, &rotate, Some(&grace), token, 200).await;
    assert_eq!(whoami(&app, str_of(&created, "/token")).await, 200);
    assert_eq!(whoami(&app, str_of(&rotated, "/token")).await, 200);
    assert_eq!(app.audit_events(&org, "api_token.rotated").await.len(), 1);

    // Registry and robot accounts.
    kept_through_an_outage(&app, &store, &org.path("/registry"), None, token, 201).await;
    let robots = org.path("/registry/robot-accounts");
    let body = json!({"name": "ci", "permissions": ["pull"]});
    let robot = kept_through_an_outage(&app, &store, &robots, Some(&body), token, 201).await;
    let rotate = format!("{robots}/{}/rotate", str_of(&robot, "/id"));
    kept_through_an_outage(&app, &store, &rotate, None, token, 200).await;
    assert_eq!(count(&app, &robots, token, Some("items")).await, 2);
    assert_eq!(
        app.audit_events(&org, "robot_account.rotated").await.len(),
        1
    );

    // Service accounts and authorizations.
    let accounts = org.account_path("/service-accounts");
    let body = json!({"name": "deployer"});
    let account = kept_through_an_outage(&app, &store, &accounts, Some(&body), token, 201).await;
    let id = str_of(&account, "/id");
    let rotate = org.account_path(&format!("/service-accounts/{id}/rotate"));
    kept_through_an_outage(&app, &store, &rotate, None, token, 200).await;
    let grant = json!({
        "grant_kind": "capability",
        "subject_type": "service_account",
        "subject_id": id,
        "capability_key": "auth.manage",
    });
    let grants = org.account_path("/authorizations");
    kept_through_an_outage(&app, &store, &grants, Some(&grant), token, 201).await;
    assert_eq!(count(&app, &grants, token, None).await, 1);

    // Webhooks.
    let body = json!({"url": "http://127.0.0.1:9/in", "events": ["*"]});
    let webhooks = org.path("/webhooks");
    let webhook = kept_through_an_outage(&app, &store, &webhooks, Some(&body), token, 201).await;
    let rotate = format!("{webhooks}/{}/rotate-secret", str_of(&webhook, "/id"));
    kept_through_an_outage(&app, &store, &rotate, None, token, 200).await;
    assert_eq!(
        app.audit_events(&org, "webhook.secret_rotated").await.len(),
        1
    );
}

/// A request whose lock ran out while it was still running, and whose key another request took
/// over, changes nothing: its change rolls back instead of committing with no answer kept, and it
/// answers as a request in flight does.
async fn a_request_whose_key_was_taken_over_changes_nothing(backend: Backend) {
    let (app, store) = FaultyStore::spawn(backend, test_config()).await;
    let app = std::sync::Arc::new(app);
    let org = std::sync::Arc::new(app.create_org("acme").await);
    let key = new_key();
    let overtaken = json!({"name": "overtaken", "scopes": ["api_tokens:read"]});
    let mut held = store.hold_next_change();
    let first = tokio::spawn({
        let (app, org, key, overtaken) = (app.clone(), org.clone(), key.clone(), overtaken.clone());
        async move {
            let res = post_with_key(
                &app,
                &org.path("/api-tokens"),
                &org.token,
                &key,
                Some(&overtaken),
            )
            .await;
            let retry_after = res.headers().get("retry-after").cloned();
            (retry_after, answer(res).await)
        }
    });
    held.reached().await;
    // While it runs, its retry is told to wait.
    let tokens = org.path("/api-tokens");
    let res = post_with_key(&app, &tokens, &org.token, &key, Some(&overtaken)).await;
    assert_eq!(res.headers()["retry-after"], "1");
    assert_error(res, 409, "conflict").await;
    // Once its lock has run out, another request takes the key over and runs.
    expire_locks(&app).await;
    let taker = json!({"name": "taker", "scopes": ["api_tokens:read"]});
    let (status, replayed, taken) =
        answer(post_with_key(&app, &tokens, &org.token, &key, Some(&taker)).await).await;
    assert_eq!((status, replayed), (201, false), "{taken}");

    held.release();
    let (retry_after, (status, replayed, body)) = first.await.unwrap();
    assert_eq!((status, replayed), (409, false), "{body}");
    assert_eq!(body["error"]["code"], "conflict");
    assert_eq!(retry_after.as_ref().map(|v| v.to_str().unwrap()), Some("1"));
    let list = app
        .get(&tokens, &org.token)
        .await
        .json::<Value>()
        .await
        .unwrap();
    let names: BTreeSet<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains("overtaken"), "{names:?}");
    assert!(names.contains("taker"), "{names:?}");
    let events = app.audit_events(&org, "api_token.created").await;
    assert!(
        !events.iter().any(|e| e.to_string().contains("overtaken")),
        "no event of the change rolled back: {events:?}"
    );
    // The key is the request that took it over: its answer replays.
    let (status, replayed, again) =
        answer(post_with_key(&app, &tokens, &org.token, &key, Some(&taker)).await).await;
    assert_eq!((status, replayed, again), (201, true, taken));
}

/// A replay hands a secret out again: a caller that has since lost the route's right gets the
/// refusal any request of its would, not the kept answer.
async fn a_replay_needs_the_rights_of_its_route(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let accounts = org.account_path("/service-accounts");
    let manager = app
        .post(&accounts, &org.token, json!({"name": "manager"}))
        .await;
    let (_, _, manager) = answer(manager).await;
    let grant = app
        .post(
            &org.account_path("/authorizations"),
            &org.token,
            json!({
                "grant_kind": "capability",
                "subject_type": "service_account",
                "subject_id": str_of(&manager, "/id"),
                "capability_key": "auth.manage",
            }),
        )
        .await;
    let (status, _, grant) = answer(grant).await;
    assert_eq!(status, 201, "{grant}");
    let manager = str_of(&manager, "/token");

    let key = new_key();
    let body = json!({"name": "deployer"});
    let res = post_with_key(&app, &accounts, manager, &key, Some(&body)).await;
    assert_eq!(res.status(), 201);
    let revoked = app
        .delete(
            &org.account_path(&format!("/authorizations/{}", str_of(&grant, "/id"))),
            &org.token,
        )
        .await;
    assert_eq!(revoked.status(), 200);
    let (status, replayed, again) =
        answer(post_with_key(&app, &accounts, manager, &key, Some(&body)).await).await;
    assert_eq!((status, replayed), (403, false), "{again}");
    assert!(!again.to_string().contains("hbx_"), "{again}");
}

both_backends! {
    a_replay_needs_the_rights_of_its_route,
    every_change_keeps_its_answer_in_its_own_transaction,
    a_request_whose_key_was_taken_over_changes_nothing,
    aether_creates_and_rotates_replay_a_retry,
    hybridbox_creates_and_rotates_replay_a_retry,
    the_key_with_another_request_is_422,
    a_malformed_key_is_422,
    a_refused_request_does_not_use_up_its_key,
    another_caller_with_the_key_gets_its_own_answer,
    concurrent_requests_with_one_key_make_one_change,
    the_store_keeps_no_usable_secret,
    a_key_is_kept_for_a_day_then_pruned,
}

#[tokio::test]
async fn the_document_declares_the_header_on_every_create_and_rotate() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc: Value = app.openapi().await;
    for path in [
        "/api/v1/organizations/{orgID}/api-tokens",
        "/api/v1/organizations/{orgID}/api-tokens/{id}/rotate",
        "/api/v1/organizations/{orgID}/registry",
        "/api/v1/organizations/{orgID}/registry/robot-accounts",
        "/api/v1/organizations/{orgID}/registry/robot-accounts/{id}/rotate",
        "/v1/public/accounts/{account_id}/auth/service-accounts",
        "/v1/public/accounts/{account_id}/auth/service-accounts/{service_account_id}/rotate",
        "/v1/public/accounts/{account_id}/auth/authorizations",
    ] {
        let operation = &doc["paths"][path]["post"];
        let header = operation["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("no parameters on POST {path}"))
            .iter()
            .find(|p| p["name"] == KEY_HEADER)
            .unwrap_or_else(|| panic!("no Idempotency-Key on POST {path}"));
        assert_eq!(header["in"], "header");
        assert_eq!(header["required"], false);
        assert_eq!(header["schema"]["minLength"], 16);
        assert_eq!(header["schema"]["maxLength"], 255);
        for status in ["409", "422"] {
            assert!(
                operation["responses"][status].is_object(),
                "POST {path} documents {status}"
            );
        }
    }
}
