//! The operator's administration of organizations through the real binary, on either store:
//! `admin issue-token` lets an organization that revoked its only `*` token back in (against a
//! running `serve`), `admin create-org` refuses a name taken (unless told) and keeps a migrated
//! organization's id (`--id`, `--no-token`), `admin list-orgs` finds organizations by name.

mod common;

use common::{both_stores, string_field, CommandOutput, Keyplane, Org, Receiver, TestStore};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// The bound on each command and request.
const TIMEOUT: Duration = Duration::from_secs(30);
const OPERATOR: &str = "Oncall Olga";

both_stores!(
    issue_token_lets_a_locked_out_org_back_in,
    create_org_refuses_a_taken_name_unless_allowed,
    create_org_keeps_a_migrated_id_without_a_token,
);

/// `keyplane admin <args> <store flags>`.
async fn admin(store: &TestStore, args: &[&str]) -> CommandOutput {
    common::admin(store, args, "", TIMEOUT).await
}

/// [`admin`], which must succeed: its stdout.
async fn admin_ok(store: &TestStore, args: &[&str]) -> String {
    let output = admin(store, args).await;
    assert!(output.status.success(), "{}", output.describe());
    output.stdout
}

/// [`admin`], which must fail with exit status `code`, print nothing on stdout and say `says`.
async fn admin_refused(store: &TestStore, args: &[&str], code: i32, says: &str) -> String {
    let output = admin(store, args).await;
    assert_eq!(output.status.code(), Some(code), "{}", output.describe());
    assert!(output.stdout.is_empty(), "{}", output.describe());
    assert!(
        output.stderr.contains(says),
        "stderr does not say {says:?}: {}",
        output.describe()
    );
    output.stderr
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// `admin issue-token --org ORG <args> --json` by [`OPERATOR`], which must succeed: the created
/// token as the API shows it, with its `token`.
async fn issue_token(store: &TestStore, org: &str, args: &[&str]) -> Value {
    let mut all = vec![
        "--operator",
        OPERATOR,
        "issue-token",
        "--org",
        org,
        "--json",
    ];
    all.extend_from_slice(args);
    let stdout = admin_ok(store, &all).await;
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn os_user() -> String {
    let output = Command::new("id").arg("-un").output().expect("run id -un");
    assert!(output.status.success(), "id -un failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

impl Keyplane {
    /// `GET /api/v1/organizations/{org}/api-tokens` with `token`: the status and the JSON body.
    async fn list_tokens_as(&self, org: &str, token: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.tokens_url(org))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET api-tokens");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `method path` with `token` and `body` (none when null), which must answer `expected`: the
    /// JSON answer.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Value,
        expected: StatusCode,
    ) -> Value {
        let mut request = self
            .http
            .request(method.clone(), self.url(path))
            .bearer_auth(token);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, expected, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}

async fn issue_token_lets_a_locked_out_org_back_in(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &["--webhook-allow-private-targets"], TIMEOUT).await;
    let created = admin_ok(&store, &["create-org", "--name", "acme", "--json"]).await;
    let acme = Org::from_json(&created);

    // Its webhook hears of every token created, the operator's too.
    let receiver = Receiver::start(TIMEOUT).await;
    let webhook = server
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/organizations/{}/webhooks", acme.id),
            &acme.token,
            json!({"url": receiver.url, "events": ["api_token.created"]}),
            StatusCode::CREATED,
        )
        .await;

    // The organization's only token revokes itself: nothing it holds gets back in.
    let (status, page) = server.list_tokens_as(&acme.id, &acme.token).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let own = string_field(&page["items"][0], "id");
    assert_eq!(
        server.revoke_token(&acme, &own).await,
        StatusCode::NO_CONTENT
    );
    let (status, _) = server.list_tokens_as(&acme.id, &acme.token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The operator issues a new one; by default with scope `*` and no expiry, as create-org's.
    let issued = issue_token(&store, &acme.id, &["--name", "recovery"]).await;
    assert_eq!(issued["org_id"], acme.id.as_str());
    assert_eq!(issued["name"], "recovery");
    assert_eq!(issued["scopes"], json!(["*"]));
    assert_eq!(issued["expires_at"], Value::Null);
    let recovery = string_field(&issued, "token");
    let recovery_id = string_field(&issued, "id");
    let (status, page) = server.list_tokens_as(&acme.id, &recovery).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let listed: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [recovery_id.as_str()]);

    // The trail: the operator's act, by whom, as an `api_token.created` like the API's.
    let events = json_lines(
        &admin_ok(
            &store,
            &["audit", "--org", &acme.id, "--action", "api_token.created"],
        )
        .await,
    );
    let event = events
        .iter()
        .find(|e| e["target"]["id"] == recovery_id.as_str())
        .unwrap_or_else(|| panic!("no api_token.created for the issued token: {events:?}"));
    assert_eq!(event["actor"]["type"], "system");
    assert_eq!(event["details"]["via"], "admin issue-token");
    assert_eq!(event["details"]["operator"], OPERATOR);
    assert_eq!(event["details"]["os_user"], os_user());
    assert_eq!(event["details"]["scopes"], json!(["*"]));
    let review = json_lines(&admin_ok(&store, &["access-review", "--org", &acme.id]).await);
    let row = review
        .iter()
        .find(|r| r["id"] == recovery_id.as_str())
        .unwrap_or_else(|| panic!("the issued token is not reviewed: {review:?}"));
    assert_eq!(row["created_by"]["via"], "admin");
    assert_eq!(row["created_by"]["operator"], OPERATOR);
    // ... and the webhook's delivery of that event, queued in the same transaction.
    let deliveries_path = format!(
        "/api/v1/organizations/{}/webhooks/{}/deliveries",
        acme.id,
        string_field(&webhook, "id")
    );
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let page = server
            .call(
                reqwest::Method::GET,
                &deliveries_path,
                &recovery,
                Value::Null,
                StatusCode::OK,
            )
            .await;
        let delivered = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == event["id"] && d["status"] == "succeeded");
        if delivered && receiver.count() >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not delivered: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The API's rules: a live name is taken, scopes are checked, the policy bounds the expiry.
    let refused = |args: &'static [&'static str], says: &'static str| {
        let mut all = vec!["issue-token", "--org", acme.id.as_str()];
        all.extend_from_slice(args);
        let store = &store;
        async move { admin_refused(store, &all, 1, says).await }
    };
    refused(
        &["--name", "recovery"],
        "a live api token with this name already exists",
    )
    .await;
    refused(&["--name", "reader", "--scope", "no spaces"], "--scope").await;
    server
        .call(
            reqwest::Method::PUT,
            &format!("/api/v1/organizations/{}/credential-policy", acme.id),
            &recovery,
            json!({"api_tokens": {"max_lifetime_days": 30, "default_lifetime_days": 7}}),
            StatusCode::OK,
        )
        .await;
    refused(
        &["--name", "long", "--expires-in", "60d"],
        "--expires-in/--expires-at: the organization's credential policy",
    )
    .await;
    let reader = issue_token(
        &store,
        &acme.id,
        &["--name", "reader", "--scope", "api_tokens:read"],
    )
    .await;
    assert_eq!(reader["scopes"], json!(["api_tokens:read"]));
    let expires_at: chrono::DateTime<chrono::Utc> =
        string_field(&reader, "expires_at").parse().unwrap();
    let in_a_week = chrono::Utc::now() + chrono::TimeDelta::days(7);
    assert!(
        (expires_at - in_a_week).num_seconds().abs() < 60,
        "the policy's default lifetime: {expires_at}"
    );
    let reader_token = string_field(&reader, "token");
    assert_eq!(
        server.list_tokens_as(&acme.id, &reader_token).await.0,
        StatusCode::OK
    );

    // Only into an organization that exists.
    let nowhere = "00000000-0000-4000-8000-000000000000";
    admin_refused(
        &store,
        &["issue-token", "--org", nowhere, "--name", "x"],
        1,
        &format!("no organization with id {nowhere}"),
    )
    .await;

    // `list-orgs` shows the organization's registry project once it has one.
    server
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/organizations/{}/registry", acme.id),
            &recovery,
            Value::Null,
            StatusCode::CREATED,
        )
        .await;
    let orgs = json_lines(&admin_ok(&store, &["list-orgs", "--name", "acme", "--json"]).await);
    assert_eq!(orgs.len(), 1, "{orgs:?}");
    assert_eq!(orgs[0]["id"], acme.id.as_str());
    assert_eq!(orgs[0]["registry_project"], "acme");
}

async fn create_org_refuses_a_taken_name_unless_allowed(backend: Backend) {
    let store = TestStore::new(backend).await;
    let first =
        Org::from_json(&admin_ok(&store, &["create-org", "--name", "acme", "--json"]).await);
    admin_ok(&store, &["create-org", "--name", "globex", "--json"]).await;

    // Names are compared as stored: trimmed.
    for name in ["acme", "  acme "] {
        let said = admin_refused(
            &store,
            &["create-org", "--name", name],
            1,
            "--allow-duplicate-name",
        )
        .await;
        assert!(
            said.contains(&first.id),
            "does not name {}: {said}",
            first.id
        );
    }
    let second = Org::from_json(
        &admin_ok(
            &store,
            &[
                "create-org",
                "--name",
                "acme",
                "--allow-duplicate-name",
                "--json",
            ],
        )
        .await,
    );
    assert_ne!(second.id, first.id);

    let named = json_lines(&admin_ok(&store, &["list-orgs", "--name", "acme", "--json"]).await);
    let ids: Vec<&str> = named.iter().map(|o| o["id"].as_str().unwrap()).collect();
    // In creation order.
    assert_eq!(ids, [first.id.as_str(), second.id.as_str()]);
    for org in &named {
        assert_eq!(org["name"], "acme");
        assert_eq!(org["registry_project"], Value::Null);
        assert!(org["created_at"].as_str().unwrap().ends_with('Z'), "{org}");
    }
    let all = json_lines(&admin_ok(&store, &["list-orgs", "--json"]).await);
    let names: Vec<&str> = all.iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme", "globex", "acme"]);
    let table = admin_ok(&store, &["list-orgs", "--name", "acme"]).await;
    assert_eq!(table.lines().count(), 3, "a header and two rows: {table}");
    assert!(
        table.contains(&first.id) && table.contains(&second.id),
        "{table}"
    );
    assert!(
        admin_ok(&store, &["list-orgs", "--name", "initech"])
            .await
            .lines()
            .count()
            == 1,
        "no row for a name nobody has"
    );
    admin_refused(&store, &["list-orgs", "--name", " "], 1, "--name").await;
}

async fn create_org_keeps_a_migrated_id_without_a_token(backend: Backend) {
    let store = TestStore::new(backend).await;
    let kept = "4b1e7f3a-9c2d-4e8f-a1b3-c5d7e9f0a2b4";
    let created = admin_ok(
        &store,
        &[
            "--operator",
            OPERATOR,
            "create-org",
            "--name",
            "migrated",
            "--id",
            kept,
            "--no-token",
            "--json",
        ],
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(created.trim()).unwrap(),
        json!({ "org_id": kept })
    );
    admin_refused(
        &store,
        &[
            "create-org",
            "--name",
            "other",
            "--id",
            kept,
            "--allow-duplicate-name",
        ],
        1,
        &format!("organization \"migrated\" already has the id {kept}"),
    )
    .await;
    admin_refused(
        &store,
        &[
            "create-org",
            "--name",
            "nil",
            "--id",
            "00000000-0000-0000-0000-000000000000",
        ],
        2,
        "nil UUID",
    )
    .await;

    // A store with an organization is bootstrapped: `serve` makes no `default` one.
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    assert!(
        !store.bootstrap_path().exists(),
        "serve bootstrapped a store that has an organization"
    );
    let orgs = json_lines(&admin_ok(&store, &["list-orgs", "--json"]).await);
    assert_eq!(orgs.len(), 1, "{orgs:?}");
    assert_eq!(orgs[0]["id"], kept);

    let issued = issue_token(&store, kept, &["--name", "admin"]).await;
    let (status, page) = server
        .list_tokens_as(kept, &string_field(&issued, "token"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");

    let events = json_lines(&admin_ok(&store, &["audit", "--org", kept]).await);
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["api_token.created", "organization.created"]);
    let organization = &events[1];
    assert_eq!(organization["target"]["id"], kept);
    assert_eq!(organization["details"]["via"], "admin create-org");
    assert_eq!(organization["details"]["operator"], OPERATOR);
    assert_eq!(organization["details"].get("api_token_id"), None);
}
