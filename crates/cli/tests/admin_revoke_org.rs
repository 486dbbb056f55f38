//! `keyplane admin revoke-org`: the break-glass revocation of everything an organization holds,
//! through the real binary, against a `keyplane serve` running on the same store (either backend).

mod common;

use common::{both_stores, string_field, CommandOutput, Keyplane, Org, TestStore};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// The bound on each command and request.
const TIMEOUT: Duration = Duration::from_secs(30);
/// A running server's verification cache keeps a credential it loaded this long before it reads
/// the store again (`auth::CacheConfig::positive_ttl`): the bound on SQLite, where another
/// process's write sends no notification.
const CACHE_LIFETIME: Duration = Duration::from_secs(30);
const REASON: &str = "INC-4711: tenant compromised";
const OPERATOR: &str = "Oncall Olga";

both_stores!(revoke_org_revokes_every_live_credential_of_one_org);

/// `keyplane admin <args> <store flags>`.
async fn admin(store: &TestStore, args: &[&str]) -> CommandOutput {
    common::admin(store, args, "", TIMEOUT).await
}

/// `keyplane admin revoke-org --org ORG --reason REASON <args> --json`, which must succeed: its
/// JSON answer.
async fn revoke_org(store: &TestStore, org: &str, args: &[&str]) -> Value {
    let mut all = vec![
        "--operator",
        OPERATOR,
        "revoke-org",
        "--org",
        org,
        "--reason",
        REASON,
        "--json",
    ];
    all.extend_from_slice(args);
    let output = admin(store, &all).await;
    assert!(output.status.success(), "{}", output.describe());
    serde_json::from_str(output.stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {}", output.describe()))
}

/// The organization's audit events, newest first, as `admin audit` prints them.
async fn audit(store: &TestStore, org: &str) -> Vec<Value> {
    common::json_lines(&admin(store, &["audit", "--org", org]).await)
}

fn os_user() -> String {
    let output = Command::new("id").arg("-un").output().expect("run id -un");
    assert!(output.status.success(), "id -un failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// What is presented to the running server, and how.
enum Presented {
    /// `GET /v1/auth/forward` with the bearer (and these `scope` parameters).
    Bearer(String, Vec<&'static str>),
    /// `GET /registry/token` as a robot logging in (Basic).
    Robot { username: String, secret: String },
}

struct Held {
    name: &'static str,
    presented: Presented,
}

impl Keyplane {
    async fn status_of(&self, held: &Held) -> StatusCode {
        let request = match &held.presented {
            Presented::Bearer(token, scopes) => {
                let query: Vec<(&str, &str)> = scopes.iter().map(|s| ("scope", *s)).collect();
                self.http
                    .get(self.url("/v1/auth/forward"))
                    .query(&query)
                    .bearer_auth(token)
            }
            Presented::Robot { username, secret } => self
                .http
                .get(self.url("/registry/token"))
                .query(&[("service", "keyplane-registry"), ("account", username)])
                .basic_auth(username, Some(secret)),
        };
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", held.name))
            .status()
    }

    /// POSTs `body` to `path` with the organization's token; the created JSON.
    async fn created(&self, org: &Org, path: &str, body: Value) -> Value {
        self.post_json(&org.token, path, Some(&body), StatusCode::CREATED)
            .await
    }
}

/// Polls `held` until the server refuses it (401) or `deadline` passes; whether it did.
async fn refused_by(server: &Keyplane, held: &Held, deadline: Instant) -> bool {
    loop {
        if server.status_of(held).await == StatusCode::UNAUTHORIZED {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The counts of one answer's object, by key.
fn counts(value: &Value) -> BTreeMap<String, u64> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or_else(|| panic!("{k}: {v}"))))
        .collect()
}

fn expected(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

async fn revoke_org_revokes_every_live_credential_of_one_org(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    // No credential of acme is in the server's cache before this.
    let loaded = Instant::now();
    // `serve` bootstrapped the `default` organization: another tenant, left alone.
    let other = store.bootstrap_org();
    let created = admin(&store, &["create-org", "--name", "acme", "--json"]).await;
    assert!(created.status.success(), "{}", created.describe());
    let acme = Org::from_json(&created.stdout);

    let ci = server
        .create_token(&acme, "ci", &["deploy:read"], None)
        .await;
    let accounts = format!("/v1/public/accounts/{}/auth", acme.id);
    let worker = server
        .created(
            &acme,
            &format!("{accounts}/service-accounts"),
            json!({"name": "worker"}),
        )
        .await;
    let grant = server
        .created(
            &acme,
            &format!("{accounts}/authorizations"),
            json!({
                "grant_kind": "capability",
                "subject_type": "service_account",
                "subject_id": worker["id"],
                "capability_key": "api_tokens:read",
            }),
        )
        .await;
    // Left alone: a person's right (signing in through OIDC) and a canary (never verifies).
    server
        .created(
            &acme,
            &format!("{accounts}/authorizations"),
            json!({
                "grant_kind": "capability",
                "subject_type": "user",
                "subject_id": "3c90c3cc-0d44-4b50-8888-8dd25736052a",
                "capability_key": "api_tokens:read",
            }),
        )
        .await;
    let canary = server
        .created(
            &acme,
            &format!("{accounts}/service-accounts"),
            json!({"name": "decoy", "canary": true}),
        )
        .await;
    let registry = server
        .created(
            &acme,
            &format!("/api/v1/organizations/{}/registry", acme.id),
            json!({}),
        )
        .await;
    let project = string_field(&registry["registry"], "harbor_project");
    let builder = server
        .created(
            &acme,
            &format!("/api/v1/organizations/{}/registry/robot-accounts", acme.id),
            json!({"name": "builder"}),
        )
        .await;

    let held = [
        Held {
            name: "acme's first token",
            presented: Presented::Bearer(acme.token.clone(), vec![]),
        },
        Held {
            name: "ci",
            presented: Presented::Bearer(ci.secret.clone(), vec![]),
        },
        Held {
            name: "worker (with its grant)",
            presented: Presented::Bearer(string_field(&worker, "token"), vec!["api_tokens:read"]),
        },
        Held {
            name: "the default robot",
            presented: Presented::Robot {
                username: string_field(&registry["credentials"], "username"),
                secret: string_field(&registry["credentials"], "password"),
            },
        },
        Held {
            name: "builder",
            presented: Presented::Robot {
                username: format!("robot${project}+builder"),
                secret: string_field(&builder, "token"),
            },
        },
    ];
    let others = Held {
        name: "the other organization's token",
        presented: Presented::Bearer(other.token.clone(), vec![]),
    };
    // Verified, so the running server holds each in its cache.
    for held in held.iter().chain([&others]) {
        assert_eq!(
            server.status_of(held).await,
            StatusCode::OK,
            "{}",
            held.name
        );
    }
    let before = audit(&store, &acme.id).await;

    // A dry run counts and writes nothing.
    let dry = revoke_org(&store, &acme.id, &["--dry-run"]).await;
    assert_eq!(dry["org_id"], acme.id.as_str());
    assert_eq!(dry["dry_run"], true);
    let all = expected(&[
        ("api_token", 2),
        ("service_account", 1),
        ("robot_account", 2),
        ("authorization", 1),
    ]);
    assert_eq!(counts(&dry["would_revoke"]), all, "{dry}");
    let left = expected(&[("canary", 1), ("user_or_group_authorization", 1)]);
    assert_eq!(counts(&dry["left"]), left, "{dry}");
    assert_eq!(
        audit(&store, &acme.id).await,
        before,
        "the dry run wrote nothing"
    );
    for held in &held {
        assert_eq!(
            server.status_of(held).await,
            StatusCode::OK,
            "{}",
            held.name
        );
    }

    let done = revoke_org(&store, &acme.id, &[]).await;
    assert_eq!(done["dry_run"], false);
    assert_eq!(counts(&done["revoked"]), all, "{done}");
    assert_eq!(counts(&done["left"]), left, "{done}");

    // The running server refuses each. On PostgreSQL the command's NOTIFYs reach it before any
    // entry it loaded (none before `loaded`) is old enough to be read again anyway; on SQLite
    // nothing tells it, and it reads the store again once an entry is older than its cache
    // lifetime.
    let deadline = match backend {
        Backend::Postgres => loaded + CACHE_LIFETIME - Duration::from_secs(5),
        Backend::Sqlite => Instant::now() + CACHE_LIFETIME + Duration::from_secs(15),
    };
    for held in &held {
        assert!(
            refused_by(&server, held, deadline).await,
            "{backend:?}: {} still verifies",
            held.name
        );
    }
    assert_eq!(
        server.status_of(&others).await,
        StatusCode::OK,
        "another organization's token must still verify"
    );

    // One revoke event per credential (and one for the grant revoked with its account), each the
    // operator's, with the reason.
    let events = audit(&store, &acme.id).await;
    let revokes: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"].as_str().unwrap().ends_with(".revoked"))
        .collect();
    let mut targets: Vec<(String, String)> = revokes
        .iter()
        .map(|e| (string_field(e, "action"), string_field(&e["target"], "id")))
        .collect();
    targets.sort();
    let default_robot = events
        .iter()
        .find(|e| e["action"] == "robot_account.created" && e["target"]["id"] != builder["id"])
        .map(|e| string_field(&e["target"], "id"))
        .expect("the default robot's creation");
    let first_token = events
        .iter()
        .find(|e| e["action"] == "api_token.created" && e["target"]["id"] != ci.id.as_str())
        .map(|e| string_field(&e["target"], "id"))
        .expect("the first token's creation");
    let mut wanted = vec![
        ("api_token.revoked".to_string(), first_token),
        ("api_token.revoked".to_string(), ci.id.clone()),
        (
            "authorization.revoked".to_string(),
            string_field(&grant, "id"),
        ),
        ("robot_account.revoked".to_string(), default_robot),
        (
            "robot_account.revoked".to_string(),
            string_field(&builder, "id"),
        ),
        (
            "service_account.revoked".to_string(),
            string_field(&worker, "id"),
        ),
    ];
    wanted.sort();
    assert_eq!(targets, wanted, "{revokes:#?}");
    let os_user = os_user();
    for event in &revokes {
        assert_eq!(event["actor"]["type"], "system", "{event}");
        assert_eq!(event["details"]["operator"], OPERATOR, "{event}");
        assert_eq!(event["details"]["os_user"], os_user.as_str(), "{event}");
        assert_eq!(event["details"]["reason"], REASON, "{event}");
        assert_eq!(event["details"]["via"], "admin revoke-org", "{event}");
    }
    assert!(
        !targets
            .iter()
            .any(|(_, id)| id == canary["id"].as_str().unwrap()),
        "the canary is left armed"
    );

    // Run again (as after an interruption): nothing is left to revoke, nothing is written.
    let again = revoke_org(&store, &acme.id, &[]).await;
    let none = expected(&[
        ("api_token", 0),
        ("service_account", 0),
        ("robot_account", 0),
        ("authorization", 0),
    ]);
    assert_eq!(counts(&again["revoked"]), none, "{again}");
    assert_eq!(
        audit(&store, &acme.id).await,
        events,
        "the re-run wrote nothing"
    );
    let other_events = audit(&store, &other.id).await;
    assert!(
        !other_events
            .iter()
            .any(|e| e["action"].as_str().unwrap().ends_with(".revoked")),
        "{other_events:#?}"
    );

    // In words: what it revoked, and what stays valid for a while.
    let text = admin(
        &store,
        &["revoke-org", "--org", &acme.id, "--reason", REASON],
    )
    .await;
    assert!(text.status.success(), "{}", text.describe());
    assert!(
        text.stdout
            .contains(&format!("organization {} (acme)", acme.id))
            && text.stdout.contains("0 API tokens"),
        "{}",
        text.describe()
    );
    assert!(
        text.stderr.contains("--registry-token-ttl-seconds")
            && text.stderr.contains("keyplane-verifier"),
        "{}",
        text.describe()
    );
    drop(server);
}

/// An unknown organization, or a missing reason, is refused before anything is written.
#[tokio::test]
async fn revoke_org_refuses_an_unknown_org_and_needs_a_reason() {
    let store = TestStore::new(Backend::Sqlite).await;
    let nowhere = "00000000-0000-4000-8000-000000000000";
    for dry_run in [false, true] {
        let mut args = vec!["revoke-org", "--org", nowhere, "--reason", REASON];
        if dry_run {
            args.push("--dry-run");
        }
        let output = admin(&store, &args).await;
        assert_eq!(output.status.code(), Some(1), "{}", output.describe());
        assert!(output.stdout.is_empty(), "{}", output.describe());
        assert!(
            output
                .stderr
                .contains(&format!("no organization with id {nowhere}")),
            "{}",
            output.describe()
        );
    }
    let refused: [(&[&str], &str); 3] = [
        (&["revoke-org", "--org", nowhere], "--reason"),
        (
            &["revoke-org", "--org", "acme", "--reason", REASON],
            "not a UUID",
        ),
        (
            &["revoke-org", "--org", nowhere, "--reason", " "],
            "--reason",
        ),
    ];
    for (args, says) in refused {
        let output = admin(&store, args).await;
        assert!(!output.status.success(), "{args:?}: {}", output.describe());
        assert!(
            output.stderr.contains(says),
            "{args:?}: {}",
            output.describe()
        );
    }
}
