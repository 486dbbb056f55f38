//! `keyplane admin delete-org`: offboarding an organization for good, through the real binary,
//! against a `keyplane serve` running on the same store (either backend).

mod common;

use common::{both_stores, string_field, CommandOutput, Keyplane, Org, TestStore};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The bound on each command and request.
const TIMEOUT: Duration = Duration::from_secs(30);
const REASON: &str = "OFF-812: contract ended, erasure requested";
const OPERATOR: &str = "Oncall Olga";
const USER: &str = "3c90c3cc-0d44-4b50-8888-8dd25736052a";

both_stores!(delete_org_offboards_one_organization_for_good);

/// `keyplane admin <args> <store flags>`.
async fn admin(store: &TestStore, args: &[&str]) -> CommandOutput {
    common::admin(store, args, "", TIMEOUT).await
}

/// `keyplane admin --operator OPERATOR delete-org --org ORG --reason REASON --confirm-name NAME
/// <args>`.
async fn delete_org(store: &TestStore, org: &str, name: &str, args: &[&str]) -> CommandOutput {
    let mut all = vec![
        "--operator",
        OPERATOR,
        "delete-org",
        "--org",
        org,
        "--reason",
        REASON,
        "--confirm-name",
        name,
    ];
    all.extend_from_slice(args);
    admin(store, &all).await
}

/// `keyplane admin grant`: USER becomes the organization's account owner.
async fn grant_owner(store: &TestStore, org: &str) -> CommandOutput {
    admin(
        store,
        &["grant", "--org", org, "--user-id", USER, "--account-owner"],
    )
    .await
}

fn json_of(output: &CommandOutput) -> Value {
    assert!(output.status.success(), "{}", output.describe());
    serde_json::from_str(output.stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {}", output.describe()))
}

/// The organization's audit events, newest first, as `admin audit` prints them.
async fn audit(store: &TestStore, org: &str) -> Vec<Value> {
    let output = admin(store, &["audit", "--org", org]).await;
    assert!(output.status.success(), "{}", output.describe());
    output
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

impl Keyplane {
    /// `GET /v1/auth/forward` with `token`.
    async fn forward_auth(&self, token: &str) -> StatusCode {
        self.http
            .get(self.url("/v1/auth/forward"))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /v1/auth/forward")
            .status()
    }

    /// POSTs `body` to `path` with `token`: the status and JSON answer.
    async fn post(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Enables the organization's registry: its project's name.
    async fn enable_registry(&self, org: &Org) -> String {
        let path = format!("/api/v1/organizations/{}/registry", org.id);
        let (status, body) = self.post(&org.token, &path, json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "POST {path}: {body}");
        string_field(&body["registry"], "harbor_project")
    }
}

async fn delete_org_offboards_one_organization_for_good(backend: Backend) {
    let store = TestStore::new(backend).await;
    let mut server = Keyplane::start(&store, &[], TIMEOUT).await;
    let other = store.bootstrap_org();
    let created = admin(&store, &["create-org", "--name", "acme", "--json"]).await;
    let acme = Org::from_json(&json_of(&created).to_string());
    let ci = server
        .create_token(&acme, "ci", &["deploy:read"], None)
        .await;
    let accounts = format!("/v1/public/accounts/{}/auth", acme.id);
    let (status, canary) = server
        .post(
            &acme.token,
            &format!("{accounts}/service-accounts"),
            json!({"name": "decoy", "canary": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{canary}");
    // The account owner, who could otherwise mint tokens again.
    let granted = grant_owner(&store, &acme.id).await;
    assert!(granted.status.success(), "{}", granted.describe());
    let project = server.enable_registry(&acme).await;
    assert_eq!(project, "acme");
    for token in [&acme.token, &ci.secret, &other.token] {
        assert_eq!(server.forward_auth(token).await, StatusCode::OK);
    }

    // Refusals: an unknown id, a name that is not the organization's. Nothing changes.
    let unknown = delete_org(&store, &uuid::Uuid::new_v4().to_string(), "acme", &[]).await;
    assert_eq!(unknown.status.code(), Some(1), "{}", unknown.describe());
    assert!(
        unknown.stderr.contains("no organization with id"),
        "{}",
        unknown.describe()
    );
    let before = audit(&store, &acme.id).await;
    let mismatch = delete_org(&store, &acme.id, "acme-corp", &[]).await;
    assert_eq!(mismatch.status.code(), Some(2), "{}", mismatch.describe());
    assert!(
        mismatch.stderr.contains("--confirm-name") && mismatch.stderr.contains("\"acme\""),
        "{}",
        mismatch.describe()
    );

    // A dry run counts, and writes nothing.
    let dry = json_of(&delete_org(&store, &acme.id, "acme", &["--dry-run", "--json"]).await);
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(
        dry["would_revoke"],
        json!({"api_token": 2, "service_account": 0, "robot_account": 1, "canary": 1, "authorization": 1}),
        "{dry}"
    );
    assert_eq!(dry["would_delete"]["credential"], 4, "{dry}");
    assert_eq!(dry["kept"]["registry_project"], "acme", "{dry}");
    assert_eq!(
        audit(&store, &acme.id).await,
        before,
        "the dry run wrote nothing"
    );
    assert_eq!(server.forward_auth(&acme.token).await, StatusCode::OK);

    let output = delete_org(&store, &acme.id, "acme", &["--json"]).await;
    let done = json_of(&output);
    assert_eq!(
        done["revoked"],
        json!({"api_token": 2, "service_account": 0, "robot_account": 1, "canary": 1, "authorization": 1}),
        "{done}"
    );
    assert_eq!(
        done["deleted"],
        json!({"credential": 4, "authorization": 1, "webhook": 0, "console_session": 0,
               "idempotency_record": 0, "credential_policy": 0}),
        "{done}"
    );
    assert_eq!(done["kept"]["registry_project"], "acme", "{done}");
    assert!(done["kept"]["audit_events"].as_u64().unwrap() > 0, "{done}");
    assert!(output.stderr.contains("acme/*"), "{}", output.describe());

    // The running server refuses the organization's tokens: at once on PostgreSQL (the
    // revocations' notifications); on SQLite nothing tells it, so it is restarted instead of
    // waiting out its cache.
    if backend == Backend::Sqlite {
        drop(server);
        server = Keyplane::start(&store, &[], TIMEOUT).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for token in [&acme.token, &ci.secret] {
        loop {
            let status = server.forward_auth(token).await;
            if status == StatusCode::UNAUTHORIZED {
                break;
            }
            assert!(Instant::now() < deadline, "{backend:?}: still {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(server.forward_auth(&other.token).await, StatusCode::OK);

    // Nothing is left to review; the trail ends with the deletion, the operator's.
    let review = admin(
        &store,
        &["access-review", "--org", &acme.id, "--include-revoked"],
    )
    .await;
    assert!(review.status.success(), "{}", review.describe());
    assert_eq!(review.stdout.trim(), "", "{}", review.describe());
    let events = audit(&store, &acme.id).await;
    let newest = &events[0];
    assert_eq!(newest["action"], "organization.deleted", "{newest}");
    assert_eq!(newest["actor"]["type"], "system", "{newest}");
    assert_eq!(newest["details"]["reason"], REASON, "{newest}");
    assert_eq!(newest["details"]["operator"], OPERATOR, "{newest}");
    assert_eq!(newest["details"]["via"], "admin delete-org", "{newest}");
    assert!(
        events
            .iter()
            .any(|e| e["action"] == "authorization.revoked"
                && e["details"]["via"] == "admin delete-org"),
        "the account owner's grant is revoked first"
    );

    // Again: its tombstone, exit 0.
    let again = delete_org(&store, &acme.id, "acme", &[]).await;
    assert!(again.status.success(), "{}", again.describe());
    assert!(
        again.stdout.contains("was deleted at"),
        "{}",
        again.describe()
    );
    assert_eq!(
        audit(&store, &acme.id).await,
        events,
        "the re-run wrote nothing"
    );

    // Nothing more is given to it.
    let regrant = grant_owner(&store, &acme.id).await;
    assert!(
        !regrant.status.success() && regrant.stderr.contains("no organization with id"),
        "{}",
        regrant.describe()
    );
    // A new organization of the same name gets a project of its own, not the old tenant's.
    let created = admin(&store, &["create-org", "--name", "acme", "--json"]).await;
    let acme2 = Org::from_json(&json_of(&created).to_string());
    let project2 = server.enable_registry(&acme2).await;
    assert_ne!(project2, "acme");
    assert!(project2.starts_with("acme-"), "{project2}");
    assert!(server.forward_auth(&acme2.token).await == StatusCode::OK);
}
