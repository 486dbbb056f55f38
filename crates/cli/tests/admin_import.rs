//! `keyplane admin import-credentials`: credentials migrated from another system by the SHA-256
//! of their keys, through the real binary, on a store a `keyplane serve` shares (either backend).

mod common;

use common::{both_stores, string_field, CommandOutput, Keyplane, Org, TestStore};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

/// The bound on each command and request.
const TIMEOUT: Duration = Duration::from_secs(30);
const OPERATOR: &str = "Migrating Mia";

/// The keys a home-grown system handed out, in its own format; keyplane gets only their hashes.
const LEGACY_KEYS: [&str; 3] = [
    "acme_live_4f9c2e7a1b3d5f60718293a4b5c6d7e8",
    "acme_live_0a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "acme_live_ffeeddccbbaa99887766554433221100",
];
const CREATED_AT: &str = "2023-05-01T10:00:00Z";
const LAST_USED_AT: &str = "2024-11-02T03:04:05Z";

both_stores!(import_checks_the_file_is_idempotent_and_audited);

/// `keyplane admin --operator OPERATOR <args> <store flags>`, `input` on stdin.
async fn admin(store: &TestStore, args: &[&str], input: &str) -> CommandOutput {
    common::admin(
        store,
        &[&["--operator", OPERATOR], args].concat(),
        input,
        TIMEOUT,
    )
    .await
}

/// `admin import-credentials --org ORG --kind KIND <args> -` with `file` on stdin.
async fn import(
    store: &TestStore,
    org: &str,
    kind: &str,
    args: &[&str],
    file: &str,
) -> CommandOutput {
    let mut all = vec!["import-credentials", "--org", org, "--kind", kind];
    all.extend_from_slice(args);
    all.push("-");
    admin(store, &all, file).await
}

/// [`import`] with `--json`, which must succeed: its answer.
async fn imported(store: &TestStore, org: &str, kind: &str, args: &[&str], file: &str) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = import(store, org, kind, &all, file).await;
    assert!(output.status.success(), "{}", output.describe());
    serde_json::from_str(output.stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {}", output.describe()))
}

/// The lowercase hex SHA-256 of `key`: what the other system stored.
fn sha256_hex(key: &str) -> String {
    keyplane_core::TokenHash::of(key)
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The import file of [`LEGACY_KEYS`]: API tokens `ci`, `deploy` and `billing`.
fn legacy_file() -> String {
    ["ci", "deploy", "billing"]
        .iter()
        .zip(LEGACY_KEYS)
        .enumerate()
        .map(|(i, (name, key))| {
            json!({
                "source_id": format!("key_{i}"),
                "name": name,
                "sha256": sha256_hex(key),
                "display_prefix": &key[..14],
                "last4": &key[key.len() - 4..],
                "scopes": ["deploy:read"],
                "created_at": CREATED_AT,
                "last_used_at": LAST_USED_AT,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// Imports `file` (API tokens) into `org` again, which must succeed and find all `count` lines
/// already there: what the text summary says.
async fn all_present(store: &TestStore, org: &str, file: &str, count: usize) {
    let again = import(store, org, "api-token", &[], file).await;
    assert!(again.status.success(), "{}", again.describe());
    assert!(
        again.stdout.contains(&format!("0 new, {count} present")),
        "{}",
        again.describe()
    );
}

fn time(value: &Value) -> chrono::DateTime<chrono::Utc> {
    value
        .as_str()
        .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
        .unwrap_or_else(|| panic!("not a time: {value}"))
        .to_utc()
}

async fn create_org(store: &TestStore, name: &str) -> Org {
    let created = admin(store, &["create-org", "--name", name, "--json"], "").await;
    assert!(created.status.success(), "{}", created.describe());
    Org::from_json(&created.stdout)
}

/// The organization's events, newest first, as `admin audit` prints them.
async fn audit(store: &TestStore, org: &str) -> Vec<Value> {
    common::json_lines(&admin(store, &["audit", "--org", org], "").await)
}

async fn import_checks_the_file_is_idempotent_and_audited(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let acme = create_org(&store, "acme").await;
    let file = legacy_file();

    // A dry run counts, and writes nothing.
    let dry = imported(&store, &acme.id, "api-token", &["--dry-run"], &file).await;
    assert_eq!(dry["would_import"], 3, "{dry}");
    assert_eq!(dry["present"], 0, "{dry}");
    assert_eq!(
        server.list_tokens(&acme).await.len(),
        1,
        "only acme's first token"
    );

    let done = imported(&store, &acme.id, "api-token", &[], &file).await;
    assert_eq!(done["new"], 3, "{done}");
    assert_eq!(done["present"], 0, "{done}");
    assert_eq!(done["kind"], "api_token", "{done}");

    // What the API shows of each is what the old system knew.
    let listed = server.list_tokens(&acme).await;
    for (name, key) in ["ci", "deploy", "billing"].iter().zip(LEGACY_KEYS) {
        let token = listed
            .iter()
            .find(|t| t["name"] == *name)
            .unwrap_or_else(|| panic!("{name} is not listed: {listed:?}"));
        let id = string_field(token, "id");
        let got: Value = server
            .http
            .get(format!("{}/{id}", server.tokens_url(&acme.id)))
            .bearer_auth(&acme.token)
            .send()
            .await
            .expect("GET api-token")
            .json()
            .await
            .expect("a JSON token");
        assert_eq!(time(&got["created_at"]), time(&json!(CREATED_AT)), "{got}");
        assert_eq!(
            time(&got["last_used_at"]),
            time(&json!(LAST_USED_AT)),
            "{got}"
        );
        assert_eq!(got["prefix"], &key[..14], "{got}");
        assert_eq!(got["scopes"], json!(["deploy:read"]), "{got}");
    }

    // The same file again: everything is already there.
    all_present(&store, &acme.id, &file, 3).await;
    assert_eq!(server.list_tokens(&acme).await.len(), 4);

    // One `api_token.imported` event: the operator's, with the count.
    let events = audit(&store, &acme.id).await;
    let imports: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "api_token.imported")
        .collect();
    assert_eq!(imports.len(), 1, "{events:?}");
    let event = imports[0];
    assert_eq!(event["actor"]["type"], "system", "{event}");
    assert_eq!(event["details"]["count"], 3, "{event}");
    assert_eq!(
        event["details"]["via"], "admin import-credentials",
        "{event}"
    );
    assert_eq!(event["details"]["operator"], OPERATOR, "{event}");
    assert!(event["details"]["os_user"].is_string(), "{event}");
    assert!(
        !event.to_string().contains(&sha256_hex(LEGACY_KEYS[0])),
        "an event holds no hash: {event}"
    );

    // A bad file: each error names its line and field, and nothing of it is written, its good
    // lines neither.
    let fresh = |name: &str, key: &str, extra: Value| {
        let mut line = json!({"source_id": name, "name": name, "sha256": sha256_hex(key)});
        line.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        line.to_string() + "\n"
    };
    let bad = fresh("good", "acme_live_1", json!({}))
        + &fresh(
            "spaced",
            "acme_live_2",
            json!({"scopes": ["deploy:read", "not a scope"]}),
        )
        + "\n"
        + &fresh("short", "acme_live_3", json!({"sha256": "abc123"}))
        + &fresh("ci", "acme_live_4", json!({}))
        + "{not json\n";
    let refused = import(&store, &acme.id, "api-token", &[], &bad).await;
    assert!(!refused.status.success(), "{}", refused.describe());
    for expected in ["line 2: scopes[1]:", "line 4: sha256:", "line 6:"] {
        assert!(
            refused.stderr.contains(expected),
            "{expected}: {}",
            refused.describe()
        );
    }
    assert!(
        !refused.stderr.contains(&sha256_hex("acme_live_2")),
        "no hash is printed: {}",
        refused.describe()
    );
    assert_eq!(
        server.list_tokens(&acme).await.len(),
        4,
        "nothing was written"
    );

    // Checked against the store: a name live in the organization (line 2 after a good line 1),
    // then a known id with another hash.
    let clash = fresh("fine", "acme_live_5", json!({})) + &fresh("ci", "acme_live_6", json!({}));
    let refused = import(&store, &acme.id, "api-token", &[], &clash).await;
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(
        refused.stderr.contains("line 2: name:"),
        "{}",
        refused.describe()
    );
    assert_eq!(
        server.list_tokens(&acme).await.len(),
        4,
        "nothing was written"
    );
    let renamed = imported(
        &store,
        &acme.id,
        "api-token",
        &["--on-duplicate-name", "suffix"],
        &clash,
    )
    .await;
    assert_eq!(renamed["new"], 2, "{renamed}");
    assert_eq!(renamed["renamed"], 1, "{renamed}");
    assert!(
        server
            .list_tokens(&acme)
            .await
            .iter()
            .any(|t| t["name"] == "ci-2"),
        "the duplicate is imported as ci-2"
    );
    let changed = fresh("key_0", "acme_live_7", json!({}));
    let refused = import(&store, &acme.id, "api-token", &[], &changed).await;
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(
        refused.stderr.contains("line 1: sha256:"),
        "{}",
        refused.describe()
    );

    // Service accounts and robots have their own action.
    let accounts = fresh("worker", "acme_sa_1", json!({}));
    let done = imported(&store, &acme.id, "service-account", &[], &accounts).await;
    assert_eq!(done["new"], 1, "{done}");
    let events = audit(&store, &acme.id).await;
    let event = events
        .iter()
        .find(|e| e["action"] == "service_account.imported")
        .unwrap_or_else(|| panic!("no service_account.imported: {events:?}"));
    assert_eq!(event["details"]["count"], 1, "{event}");
    assert_eq!(event["details"]["operator"], OPERATOR, "{event}");
    let scoped = fresh("scoped", "acme_sa_2", json!({"scopes": ["*"]}));
    let refused = import(&store, &acme.id, "service-account", &[], &scoped).await;
    assert!(
        !refused.status.success() && refused.stderr.contains("line 1: scopes:"),
        "{}",
        refused.describe()
    );

    // Without `serve --legacy-token-prefix`, a key in another format is refused before any
    // lookup, imported or not.
    let forward = server
        .http
        .get(server.url("/v1/auth/forward"))
        .bearer_auth(LEGACY_KEYS[0])
        .send()
        .await
        .expect("GET /v1/auth/forward");
    assert_eq!(forward.status(), StatusCode::UNAUTHORIZED);
}

both_stores!(legacy_prefix_verifies_imported_keys_until_rotated);

/// `GET /v1/auth/forward` with `token`: the status and the identity headers.
async fn forward(server: &Keyplane, token: &str) -> (StatusCode, [String; 3]) {
    let response = server
        .http
        .get(server.url("/v1/auth/forward"))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET /v1/auth/forward");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let headers = [
        header("x-keyplane-credential-kind"),
        header("x-keyplane-subject"),
        header("x-keyplane-secret"),
    ];
    (response.status(), headers)
}

async fn legacy_prefix_verifies_imported_keys_until_rotated(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(
        &store,
        &[
            "--legacy-token-prefix",
            "acme_live_=api-token",
            "--legacy-token-prefix",
            "acme_sa_=service-account",
        ],
        TIMEOUT,
    )
    .await;
    let acme = create_org(&store, "acme").await;
    let done = imported(&store, &acme.id, "api-token", &[], &legacy_file()).await;
    assert_eq!(done["new"], 3, "{done}");
    let account =
        json!({"source_id": "sa_1", "name": "worker", "sha256": sha256_hex("acme_sa_0123456789")});
    let done = imported(
        &store,
        &acme.id,
        "service-account",
        &[],
        &(account.to_string() + "\n"),
    )
    .await;
    assert_eq!(done["new"], 1, "{done}");
    let listed = server.list_tokens(&acme).await;
    let ci = listed
        .iter()
        .find(|t| t["name"] == "ci")
        .map(|t| string_field(t, "id"))
        .expect("ci is listed");

    // Each imported key verifies as the kind its prefix is configured for.
    for key in LEGACY_KEYS {
        let (status, [kind, _, secret]) = forward(&server, key).await;
        assert_eq!(status, StatusCode::OK, "{key}");
        assert_eq!(kind, "api_token");
        assert_eq!(secret, "current");
    }
    let (status, [kind, subject, _]) = forward(&server, LEGACY_KEYS[0]).await;
    assert_eq!((status, subject.as_str()), (StatusCode::OK, ci.as_str()));
    assert_eq!(kind, "api_token");
    let (status, [kind, _, _]) = forward(&server, "acme_sa_0123456789").await;
    assert_eq!((status, kind.as_str()), (StatusCode::OK, "service_account"));
    // A key under the prefix that was never imported, one under no configured prefix, and one
    // past the length cap are refused; keyplane's own tokens verify as ever.
    for refused in [
        "acme_live_0000000000000000000000000000000".to_string(),
        "other_live_4f9c2e7a1b3d5f60718293a4b5c6d7e8".to_string(),
        format!("acme_live_{}", "0".repeat(130)),
    ] {
        assert_eq!(forward(&server, &refused).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(forward(&server, &acme.token).await.0, StatusCode::OK);

    // Rotation issues a keyplane secret; the imported key keeps working as the previous one
    // during the grace period.
    let response = server
        .http
        .post(format!("{}/{ci}/rotate", server.tokens_url(&acme.id)))
        .bearer_auth(&acme.token)
        .json(&json!({"grace_seconds": 3600}))
        .send()
        .await
        .expect("POST rotate");
    assert_eq!(response.status(), StatusCode::OK);
    let rotated: Value = response.json().await.expect("a JSON answer");
    let native = string_field(&rotated, "token");
    assert!(native.starts_with("aether_"), "a keyplane token");
    let (status, [kind, subject, secret]) = forward(&server, &native).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (kind.as_str(), subject.as_str(), secret.as_str()),
        ("api_token", ci.as_str(), "current")
    );
    let (status, [_, subject, secret]) = forward(&server, LEGACY_KEYS[0]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (subject.as_str(), secret.as_str()),
        (ci.as_str(), "previous")
    );

    // The same store served without the flag: imported keys are malformed there.
    drop(server);
    let plain = Keyplane::start(&store, &[], TIMEOUT).await;
    assert_eq!(
        forward(&plain, LEGACY_KEYS[1]).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(forward(&plain, &native).await.0, StatusCode::OK);
}

both_stores!(rerun_after_cutover_and_ids_taken_elsewhere);

/// The id of `org`'s token named `name`.
async fn token_id(server: &Keyplane, org: &Org, name: &str) -> String {
    let listed = server.list_tokens(org).await;
    listed
        .iter()
        .find(|t| t["name"] == name)
        .map(|t| string_field(t, "id"))
        .unwrap_or_else(|| panic!("{name} is not listed: {listed:?}"))
}

async fn rerun_after_cutover_and_ids_taken_elsewhere(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let acme = create_org(&store, "acme").await;
    let file = legacy_file();
    let done = imported(&store, &acme.id, "api-token", &[], &file).await;
    assert_eq!(done["new"], 3, "{done}");

    // The README's cutover: `ci` rotated with a grace period (the imported key is now its
    // previous secret), `deploy` rotated twice (the imported key is gone from it), `billing`
    // revoked. None of them is imported again, and the file still runs.
    let ci = token_id(&server, &acme, "ci").await;
    let deploy = token_id(&server, &acme, "deploy").await;
    let billing = token_id(&server, &acme, "billing").await;
    for (id, grace) in [(&ci, 3600), (&deploy, 3600), (&deploy, 0)] {
        server
            .post_json(
                &acme.token,
                &format!("/api/v1/organizations/{}/api-tokens/{id}/rotate", acme.id),
                Some(&json!({"grace_seconds": grace})),
                StatusCode::OK,
            )
            .await;
    }
    assert!(server.revoke_token(&acme, &billing).await.is_success());
    all_present(&store, &acme.id, &file, 3).await;
    let counts = imported(&store, &acme.id, "api-token", &["--dry-run"], &file).await;
    assert_eq!(
        (&counts["would_import"], &counts["present"]),
        (&json!(0), &json!(3)),
        "{counts}"
    );
    assert_eq!(counts["present_rotated"], 2, "{counts}");
    assert_eq!(counts["present_revoked"], 1, "{counts}");
    assert_eq!(
        server.list_tokens(&acme).await.len(),
        3,
        "billing is revoked"
    );

    // An explicit id that is another organization's credential, or this one's of another kind:
    // refused naming the line before anything is written, the good line 1 neither.
    let globex = create_org(&store, "globex").await;
    let line = |name: &str, key: &str, id: Option<&str>| {
        let mut line = json!({"source_id": name, "name": name, "sha256": sha256_hex(key)});
        if let Some(id) = id {
            line["id"] = json!(id);
        }
        line.to_string() + "\n"
    };
    let taken = line("fine", "globex_1", None) + &line("stolen", "globex_2", Some(&ci));
    let refused = import(&store, &globex.id, "api-token", &[], &taken).await;
    assert_eq!(refused.status.code(), Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("line 2: id:") && refused.stderr.contains("taken by another"),
        "{}",
        refused.describe()
    );
    assert_eq!(
        server.list_tokens(&globex).await.len(),
        1,
        "nothing written"
    );
    let refused = import(&store, &acme.id, "service-account", &[], &taken).await;
    assert_eq!(refused.status.code(), Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("line 2: id:"),
        "{}",
        refused.describe()
    );
    let first = line("fine", "globex_1", None);
    let counts = imported(&store, &acme.id, "service-account", &["--dry-run"], &first).await;
    assert_eq!(
        (&counts["would_import"], &counts["present"]),
        (&json!(1), &json!(0)),
        "nothing written: {counts}"
    );

    // A key that is another organization's credential's secret: `ci`'s previous one (within its
    // grace), or revoked `billing`'s. Refused naming the line, the good line 1 neither written.
    for key in [LEGACY_KEYS[0], LEGACY_KEYS[2]] {
        let copied = first.clone() + &line("copied", key, None);
        let refused = import(&store, &globex.id, "api-token", &[], &copied).await;
        assert_eq!(refused.status.code(), Some(1), "{}", refused.describe());
        assert!(
            refused
                .stderr
                .contains("line 2: sha256: already the secret of another"),
            "{}",
            refused.describe()
        );
    }
    assert_eq!(
        server.list_tokens(&globex).await.len(),
        1,
        "nothing written"
    );
}
