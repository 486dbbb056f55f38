//! The audit trail through the binary: `admin audit` (list, `--follow`, `verify`) and
//! `serve --audit-log` across SIGKILL and log rotation.

mod common;

use common::{
    both_stores, json_lines, keyplane, keyplane_with_umask, run, stored_events, tamper, Keyplane,
    KillOnDrop, Org, TestStore,
};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

both_stores!(
    sigkill_loses_no_event_and_the_export_resumes,
    verify_points_at_the_row_edited_with_sql,
    verify_checks_the_chain_head_it_ends_at,
    follow_prints_events_as_they_commit,
    sighup_reopens_the_audit_log,
    a_torn_last_line_does_not_swallow_the_next_event,
    registry_key_changes_are_in_the_trail_of_each_registry,
    verify_says_an_anchor_no_pruning_recorded,
    verify_says_why_a_deleted_organizations_anchor_has_no_pruning_record,
    creators_outlive_retention_and_admin_events_name_the_operator,
    admin_events_under_sudo_name_who_ran_sudo,
);

/// `keyplane admin ARGS` on `store`, which must succeed; its stdout.
async fn admin(store: &TestStore, args: &[&str]) -> String {
    let output = run(
        keyplane().arg("admin").args(args).args(store.args()),
        TIMEOUT,
    )
    .await;
    assert!(output.status.success(), "{}", output.describe());
    output.stdout
}

/// `keyplane admin audit ...` on `store`, which must succeed; its JSON lines.
async fn admin_audit(store: &TestStore, args: &[&str]) -> Vec<Value> {
    let args: Vec<&str> = ["audit"].iter().chain(args).copied().collect();
    admin(store, &args)
        .await
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn ids_where(events: &[Value], action: &str) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| e["action"] == action)
        .map(|e| e["target"]["id"].as_str().unwrap().to_string())
        .collect()
}

fn event_ids(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// The events of the export file. A line cut by SIGKILL mid-write is not an event, and the export
/// writes it again: such a line must be a beginning of a whole line of the file. A line that is
/// neither (an event glued to a cut one) fails the test, since that event would be lost.
fn read_lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (events, cut): (Vec<_>, Vec<_>) = text
        .lines()
        .map(|line| (line, serde_json::from_str::<Value>(line).ok()))
        .partition(|(_, parsed)| parsed.is_some());
    for (line, _) in cut {
        assert!(
            events.iter().any(|(whole, _)| whole.starts_with(line)),
            "a line of the audit log is neither an event nor the beginning of one: {line}"
        );
    }
    events
        .into_iter()
        .filter_map(|(_, parsed)| parsed)
        .collect()
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sigkill_loses_no_event_and_the_export_resumes(backend: Backend) {
    let store = TestStore::new(backend).await;
    let log = store.db.data_dir.join("audit.log");
    let log_arg = log.to_str().unwrap().to_string();
    let server = Keyplane::start(&store, &["--audit-log", &log_arg], TIMEOUT).await;
    let org = store.bootstrap_org();

    // Four writers create and revoke concurrently; the server dies under them.
    let base = server.url("");
    let mut writers = Vec::new();
    for writer in 0..4 {
        let (base, org_id, token) = (base.clone(), org.id.clone(), org.token.clone());
        writers.push(tokio::spawn(async move {
            let http = common::http_client(TIMEOUT);
            let url = format!("{base}/api/v1/organizations/{org_id}/api-tokens");
            let (mut created, mut revoked) = (Vec::new(), Vec::new());
            for i in 0..200 {
                let Ok(res) = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"name": format!("w{writer}-{i}"), "scopes": []}))
                    .send()
                    .await
                else {
                    break;
                };
                if res.status() != StatusCode::CREATED {
                    break;
                }
                let Ok(body) = res.json::<Value>().await else {
                    break;
                };
                let id = body["id"].as_str().unwrap().to_string();
                created.push(id.clone());
                if i % 2 == 0 {
                    match http
                        .delete(format!("{url}/{id}"))
                        .bearer_auth(&token)
                        .send()
                        .await
                    {
                        Ok(res) if res.status() == StatusCode::NO_CONTENT => revoked.push(id),
                        _ => break,
                    }
                }
            }
            (created, revoked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(server.process); // SIGKILL
    let (mut acked_created, mut acked_revoked) = (BTreeSet::new(), BTreeSet::new());
    for writer in writers {
        let (created, revoked) = writer.await.unwrap();
        acked_created.extend(created);
        acked_revoked.extend(revoked);
    }
    assert!(
        acked_created.len() >= 4,
        "the writers got going before the kill"
    );

    let server = Keyplane::start(&store, &["--audit-log", &log_arg], TIMEOUT).await;
    let events = admin_audit(&store, &["--org", &org.id]).await;
    let created_events = ids_where(&events, "api_token.created");
    let revoked_events = ids_where(&events, "api_token.revoked");
    assert!(
        acked_created.is_subset(&created_events),
        "an acknowledged create has no event"
    );
    assert!(
        acked_revoked.is_subset(&revoked_events),
        "an acknowledged revoke has no event"
    );

    // No event without its change: the store holds exactly the tokens the events say.
    let store_handle = keyplane_store::connect(&store.db.url).await.unwrap();
    let tenant = keyplane_core::TenantId::parse(&org.id).unwrap();
    let all = store_handle
        .list_credentials(&keyplane_store::ListCredentials {
            tenant_id: tenant,
            kind: keyplane_core::CredentialKind::ApiToken,
            after: None,
            limit: None,
            include_revoked: true,
            expiring: None,
            include_canaries: true,
        })
        .await
        .unwrap();
    let in_store: BTreeSet<String> = all.iter().map(|c| c.id.to_string()).collect();
    let revoked_in_store: BTreeSet<String> = all
        .iter()
        .filter(|c| c.is_revoked())
        .map(|c| c.id.to_string())
        .collect();
    assert_eq!(created_events, in_store);
    assert_eq!(revoked_events, revoked_in_store);

    // The restarted export completes the file: every committed event is in it (perhaps twice).
    let committed = event_ids(&events);
    wait_until("the export holds every committed event", || {
        event_ids(&read_lines(&log)).is_superset(&committed)
    })
    .await;
    drop(server);

    let output = run(
        keyplane()
            .args(["admin", "audit", "verify", "--org", &org.id])
            .args(store.args()),
        TIMEOUT,
    )
    .await;
    assert!(output.status.success(), "{}", output.describe());
    assert!(
        output
            .stdout
            .contains(&format!("{} events checked", events.len())),
        "{}",
        output.describe()
    );
}

async fn verify(store: &TestStore, org: &Org) -> common::CommandOutput {
    run(
        keyplane()
            .args(["admin", "audit", "verify", "--org", &org.id])
            .args(store.args()),
        TIMEOUT,
    )
    .await
}

/// A store whose organization has its first token and four more: six events.
async fn four_tokens(backend: Backend) -> (TestStore, Org) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    for i in 0..4 {
        server.create_token(&org, &format!("t{i}"), &[], None).await;
    }
    drop(server);
    (store, org)
}

async fn verify_points_at_the_row_edited_with_sql(backend: Backend) {
    let (store, org) = four_tokens(backend).await;
    let output = verify(&store, &org).await;
    assert!(output.status.success(), "{}", output.describe());
    assert!(
        output.stdout.contains("6 events checked"),
        "{}",
        output.describe()
    );

    let events = admin_audit(&store, &["--org", &org.id]).await;
    let third = events.iter().find(|e| e["seq"] == 3).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    tamper(
        &store,
        "UPDATE audit_events SET target_name = 'nothing to see' WHERE seq = 3",
    )
    .await;
    let output = verify(&store, &org).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(
        output.stdout.contains(&third) && output.stdout.contains("changed"),
        "{}",
        output.describe()
    );

    tamper(&store, "DELETE FROM audit_events WHERE seq = 3").await;
    let output = verify(&store, &org).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(output.stdout.contains("missing"), "{}", output.describe());

    tamper(&store, "DELETE FROM audit_events WHERE seq >= 3").await;
    let output = verify(&store, &org).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(output.stdout.contains("deleted"), "{}", output.describe());
}

/// Edits that the events alone would not show, made with SQL and the chain's (public) hash
/// function: the newest event changed with its own hash recomputed, the newest deleted with the
/// head's seq set back, the head row deleted. Each is named.
async fn verify_checks_the_chain_head_it_ends_at(backend: Backend) {
    let (store, org) = four_tokens(backend).await;
    let events = stored_events(&store, &org).await;
    let n = events.len();
    assert_eq!(n, 6, "the organization, its token and four more");
    let mut newest = events[n - 1].clone();
    newest.event.target.as_mut().unwrap().name = Some("nothing to see".into());
    let rehashed = keyplane_core::audit::chain_hash(&events[n - 2].chain_hash, &newest.event, 6);
    let hex: String = rehashed.iter().map(|b| format!("{b:02x}")).collect();
    tamper(
        &store,
        &format!(
            "UPDATE audit_events SET target_name = 'nothing to see', chain_hash = '{hex}' WHERE seq = 6"
        ),
    )
    .await;
    let output = verify(&store, &org).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(
        output.stdout.contains(&newest.event.id.to_string())
            && output.stdout.contains("does not match the chain head"),
        "{}",
        output.describe()
    );

    // The newest deleted and the head's seq set back to the one before it.
    tamper(&store, "DELETE FROM audit_events WHERE seq = 6").await;
    tamper(&store, "UPDATE audit_chain_heads SET seq = 5").await;
    let output = verify(&store, &org).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(
        output.stdout.contains(&events[n - 2].event.id.to_string())
            && output.stdout.contains("does not match the chain head"),
        "{}",
        output.describe()
    );

    tamper(&store, "DELETE FROM audit_chain_heads").await;
    let output = verify(&store, &org).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(
        output.stdout.contains("head record is missing"),
        "{}",
        output.describe()
    );
}

async fn follow_prints_events_as_they_commit(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    let mut follower = KillOnDrop(
        keyplane()
            .args([
                "admin",
                "audit",
                "--org",
                &org.id,
                "--follow",
                "--action",
                "api_token.*",
            ])
            .args(store.args())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = follower.0.stdout.take().unwrap();
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let line = tokio::time::timeout(TIMEOUT, lines_rx.recv())
        .await
        .expect("--follow printed the existing event in time")
        .unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["action"], "api_token.created");
    assert_eq!(
        event["target"]["name"], "bootstrap",
        "the organization's token first"
    );
    let token = server.create_token(&org, "followed", &[], None).await;
    let line = tokio::time::timeout(TIMEOUT, lines_rx.recv())
        .await
        .expect("--follow printed the new event in time")
        .unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["action"], "api_token.created");
    assert_eq!(event["target"]["id"], token.id.as_str());
    assert_eq!(
        server.revoke_token(&org, &token.id).await,
        StatusCode::NO_CONTENT
    );
    let line = tokio::time::timeout(TIMEOUT, lines_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(line.contains("api_token.revoked"), "{line}");
}

async fn sighup_reopens_the_audit_log(backend: Backend) {
    let store = TestStore::new(backend).await;
    let log = store.db.data_dir.join("audit.log");
    let rotated = store.db.data_dir.join("audit.log.1");
    let server = Keyplane::start(&store, &["--audit-log", log.to_str().unwrap()], TIMEOUT).await;
    let org = store.bootstrap_org();
    let first = server.create_token(&org, "before", &[], None).await;
    wait_until("the first event is exported", || {
        ids_where(&read_lines(&log), "api_token.created").contains(&first.id)
    })
    .await;
    std::fs::rename(&log, &rotated).unwrap();
    let pid = server.process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    // The reopen is asynchronous: wait until the new file exists before the next write.
    wait_until("the log is reopened at its path", || log.exists()).await;
    let second = server.create_token(&org, "after", &[], None).await;
    wait_until("the next event goes to the new file", || {
        ids_where(&read_lines(&log), "api_token.created").contains(&second.id)
    })
    .await;
    assert!(!ids_where(&read_lines(&rotated), "api_token.created").contains(&second.id));
    assert!(ids_where(&read_lines(&rotated), "api_token.created").contains(&first.id));
}

/// A log whose last line was cut (SIGKILL mid-write, node loss before fsync, a full disk) ends
/// without a newline: the export's next line must start a line of its own, not continue the cut
/// one, or that event is lost to every reader of the file.
async fn a_torn_last_line_does_not_swallow_the_next_event(backend: Backend) {
    let store = TestStore::new(backend).await;
    let log = store.db.data_dir.join("audit.log");
    let torn = r#"{"id":"torn"#;
    std::fs::write(&log, torn).unwrap();
    // The store is new and the log is not: a start that is refused without the flag.
    let server = Keyplane::start(
        &store,
        &["--audit-log", log.to_str().unwrap(), "--allow-empty-store"],
        TIMEOUT,
    )
    .await;
    let org = store.bootstrap_org();
    let events = server.audit_events(&org, "limit=100").await;
    let committed = event_ids(&events);
    assert!(
        ids_where(&events, "organization.created").contains(&org.id),
        "{events:?}"
    );
    wait_until("the export holds every committed event", || {
        let text = std::fs::read_to_string(&log).unwrap();
        let whole: Vec<Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        event_ids(&whole).is_superset(&committed)
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(torn), "the cut line is left as it was");
    for line in lines {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not a whole event: {line}"
        );
    }
}

/// `serve` on `store` with `flags`, which must stop before it serves.
async fn serve_refusing(store: &TestStore, flags: &[&std::ffi::OsStr]) -> common::CommandOutput {
    run(
        keyplane()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(store.args())
            .args(flags),
        // Refused before the store is opened: at once (a server that starts never exits).
        Duration::from_secs(10),
    )
    .await
}

/// `serve --audit-log PATH`, which must fail to start; its one stderr line.
async fn start_fails_with(store: &TestStore, path: &std::path::Path) -> String {
    let output = serve_refusing(store, &["--audit-log".as_ref(), path.as_os_str()]).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    let lines: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one clear line: {}", output.describe());
    lines[0].to_string()
}

/// An audit log path the server cannot append to stops the start, in one line naming the flag,
/// the path and the OS error, rather than a server that retries opening it forever.
#[tokio::test]
async fn an_audit_log_that_cannot_be_opened_stops_the_start() {
    let store = TestStore::new(Backend::Sqlite).await;
    let missing = std::path::Path::new("/nonexistent-dir/x.log");
    let line = start_fails_with(&store, missing).await;
    assert!(
        line.starts_with("error: --audit-log: cannot open /nonexistent-dir/x.log")
            && line.contains("No such file or directory"),
        "{line}"
    );
    let line = start_fails_with(&store, &store.db.data_dir).await;
    assert!(
        line.contains(&store.db.data_dir.display().to_string()) && line.contains("Is a directory"),
        "{line}"
    );
    // Nothing was bootstrapped: the start stopped before touching the store.
    assert!(!store.data_dir_has("bootstrap.json"));
}

/// The audit log holds client addresses, user agents, user ids and credential names: a new one is
/// created 0600 whatever the umask, like everything else `serve` writes.
#[tokio::test]
async fn a_new_audit_log_is_private_whatever_the_umask() {
    let store = TestStore::new(Backend::Sqlite).await;
    let log = store.db.data_dir.join("audit.log");
    let server = Keyplane::start_from(
        keyplane_with_umask(0o022),
        &store,
        // The longest retention the flag takes starts.
        &[
            "--audit-log",
            log.to_str().unwrap(),
            "--audit-retention-days",
            "36500",
        ],
        TIMEOUT,
    )
    .await;
    wait_until("the audit log is created", || log.exists()).await;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the audit log's mode is {mode:o}");
    drop(server);
}

/// A retention past 100 years is refused as a usage error (once accepted up to where the
/// cutoff's arithmetic panicked inside the retention task).
#[tokio::test]
async fn audit_retention_days_is_bounded() {
    let store = TestStore::new(Backend::Sqlite).await;
    let output = serve_refusing(
        &store,
        &["--audit-retention-days".as_ref(), "36501".as_ref()],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("--audit-retention-days") && output.stderr.contains("36501"),
        "{}",
        output.describe()
    );
}

/// `keyplane admin registry-key VERB` on `store`, which must succeed; the key id it prints.
async fn registry_key(store: &TestStore, verb: &[&str]) -> String {
    let args: Vec<&str> = ["registry-key"].iter().chain(verb).copied().collect();
    admin(store, &args).await.trim().to_string()
}

/// The registry signing key signs every organization's registry tokens: its creation, staging,
/// promotion and retirement are recorded in the trail of each organization with a registry, as
/// the operator's (`system`) acts, naming the keys.
async fn registry_key_changes_are_in_the_trail_of_each_registry(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    let response = server
        .http
        .post(server.url(&format!("/api/v1/organizations/{}/registry", org.id)))
        .bearer_auth(&org.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let registry: Value = response.json().await.unwrap();
    drop(server);

    let staged = registry_key(&store, &["stage"]).await;
    assert_eq!(registry_key(&store, &["promote"]).await, staged);
    let retired = registry_key(&store, &["retire-previous", "--force"]).await;
    assert_ne!(retired, staged);

    let events = admin_audit(&store, &["--org", &org.id, "--action", "registry.*"]).await;
    let only = |action: &str| {
        let found: Vec<&Value> = events.iter().filter(|e| e["action"] == action).collect();
        assert_eq!(found.len(), 1, "one {action}: {events:?}");
        found[0].clone()
    };
    let created = only("registry.signing_key_created");
    let staged_event = only("registry.signing_key_staged");
    let promoted = only("registry.signing_key_promoted");
    let retired_event = only("registry.signing_key_retired");
    // The first key was made by `stage`, which needs a current key to follow.
    assert_eq!(created["details"]["key_id"], retired.as_str());
    assert_eq!(created["details"]["via"], "admin registry-key stage");
    assert_eq!(staged_event["details"]["key_id"], staged.as_str());
    assert_eq!(staged_event["details"]["previous_key_id"], retired.as_str());
    assert_eq!(staged_event["details"]["via"], "admin registry-key stage");
    assert_eq!(promoted["details"]["key_id"], staged.as_str());
    assert_eq!(promoted["details"]["previous_key_id"], retired.as_str());
    assert_eq!(promoted["details"]["via"], "admin registry-key promote");
    assert_eq!(retired_event["details"]["key_id"], retired.as_str());
    assert_eq!(retired_event["details"]["forced"], "true");
    assert_eq!(
        retired_event["details"]["via"],
        "admin registry-key retire-previous"
    );
    let os_user = os_user();
    for event in [&created, &staged_event, &promoted, &retired_event] {
        assert_eq!(event["actor"]["type"], "system", "{event}");
        // Who ran the command; no --operator was given.
        assert_eq!(event["details"]["os_user"], os_user.as_str(), "{event}");
        assert_eq!(event["details"].get("operator"), None, "{event}");
        assert_eq!(event["target"]["type"], "registry", "{event}");
        assert_eq!(
            event["target"]["name"], registry["registry"]["harbor_project"],
            "{event}"
        );
    }
    // The first token was made by `serve`'s bootstrap, the default robot through the API by it.
    let review = admin(&store, &["access-review", "--org", &org.id]).await;
    let review: Vec<Value> = review
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let bootstrap = review
        .iter()
        .find(|row| row["type"] == "api_token")
        .unwrap_or_else(|| panic!("no token: {review:?}"));
    assert_eq!(
        bootstrap["created_by"],
        serde_json::json!({"actor": {"type": "system", "id": null}, "via": "bootstrap", "os_user": null, "operator": null})
    );
    let robot = review
        .iter()
        .find(|row| row["type"] == "robot_account")
        .unwrap_or_else(|| panic!("no robot: {review:?}"));
    assert_eq!(robot["created_by"]["actor"]["id"], bootstrap["id"]);
    assert_eq!(robot["created_by"]["via"], "api");
    assert_eq!(robot["permissions"], serde_json::json!(["pull", "push"]));
    let seqs: Vec<&Value> = [&created, &staged_event, &promoted, &retired_event]
        .iter()
        .map(|e| &e["seq"])
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0].as_u64() < w[1].as_u64()),
        "in the order they happened: {seqs:?}"
    );
    let output = verify(&store, &org).await;
    assert!(output.status.success(), "{}", output.describe());
}

/// Deletes the organization's first two events and moves the anchor to match, as a pruning
/// would, but with no `audit.pruned` event to record it (the store's only organization).
async fn prune_first_two_unrecorded(store: &TestStore, org: &Org) {
    let hex = keyplane_core::audit::hash_hex(&stored_events(store, org).await[1].chain_hash);
    tamper(store, "DELETE FROM audit_events WHERE seq <= 2").await;
    tamper(
        store,
        &format!(
            "INSERT INTO audit_chain_anchors (tenant_id, seq, chain_hash) \
             SELECT tenant_id, 2, '{hex}' FROM audit_chain_heads"
        ),
    )
    .await;
}

/// Retention prunes a deleted organization's trail without appending `audit.pruned` (the trail
/// ends with `organization.deleted`), so its anchor has no record: `verify` says why, and exits 0.
async fn verify_says_why_a_deleted_organizations_anchor_has_no_pruning_record(backend: Backend) {
    let (store, org) = four_tokens(backend).await;
    admin(
        &store,
        &[
            "delete-org",
            "--org",
            &org.id,
            "--reason",
            "OFF-1",
            "--confirm-name",
            "default",
        ],
    )
    .await;
    prune_first_two_unrecorded(&store, &org).await;
    let output = verify(&store, &org).await;
    assert!(output.status.success(), "{}", output.describe());
    assert!(
        output.stdout.contains("intact")
            && output.stdout.contains("up to seq 2")
            && output.stdout.contains("the organization was deleted"),
        "{}",
        output.describe()
    );
}

/// Events deleted from the start of the chain with an anchor set to match verify as a pruned
/// chain would; but no `audit.pruned` event records that pruning, and `verify` says so rather
/// than "intact".
async fn verify_says_an_anchor_no_pruning_recorded(backend: Backend) {
    let (store, org) = four_tokens(backend).await;
    prune_first_two_unrecorded(&store, &org).await;
    let output = verify(&store, &org).await;
    // A script that checks only the exit status must not read this as intact, nor as broken.
    assert_eq!(output.status.code(), Some(3), "{}", output.describe());
    assert!(
        !output.stdout.contains("intact: 4 events checked"),
        "{}",
        output.describe()
    );
    assert!(
        output.stdout.contains("up to seq 2") && output.stdout.contains("no audit.pruned event"),
        "{}",
        output.describe()
    );
}

/// The OS account the tests run as, as `id -un` names it.
fn os_user() -> String {
    let output = Command::new("id").arg("-un").output().expect("run id -un");
    assert!(output.status.success(), "id -un failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Who created each credential and grant stays on its row after retention pruned the events that
/// said so, and `admin access-review` shows it; events of admin commands keep actor `system` and
/// name the OS user and the operator (`--operator`, or `KEYPLANE_OPERATOR`).
async fn creators_outlive_retention_and_admin_events_name_the_operator(backend: Backend) {
    let store = TestStore::new(backend).await;
    let os_user = os_user();
    let org = Org::from_json(
        &admin(
            &store,
            &[
                "create-org",
                "--name",
                "acme",
                "--json",
                "--operator",
                "Alice Ops",
            ],
        )
        .await,
    );
    let reader = "6f1d2c3b-4a59-4e68-9d7c-8b9a0f1e2d3c";
    let by_admin = json_lines(
        &run(
            keyplane()
                .args(["admin", "grant", "--org", &org.id, "--user-id", reader])
                .args(["--capability", "audit:read"])
                .args(store.args())
                .env("KEYPLANE_OPERATOR", "bob"),
            TIMEOUT,
        )
        .await,
    )
    .remove(0);
    // A name with a control character is refused before anything is written.
    let refused = run(
        keyplane()
            .args([
                "admin",
                "create-org",
                "--name",
                "other",
                "--operator",
                "eve\u{7}",
            ])
            .args(store.args()),
        TIMEOUT,
    )
    .await;
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--operator"),
        "{}",
        refused.describe()
    );

    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let by_api = server
        .create_token(&org, "ci", &["api_tokens:read"], None)
        .await;
    let response = server
        .http
        .post(server.url(&format!(
            "/v1/public/accounts/{}/auth/authorizations",
            org.id
        )))
        .bearer_auth(&org.token)
        .json(&serde_json::json!({
            "grant_kind": "capability",
            "subject_type": "user",
            "subject_id": reader,
            "capability_key": "api_tokens:read",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let granted_by_api: Value = response.json().await.unwrap();
    drop(server);

    // The admin commands' events: actor `system` as before, the operator in the details.
    let events = admin_audit(&store, &["--org", &org.id]).await;
    let event = |action: &str, target: &str| {
        events
            .iter()
            .find(|e| {
                e["action"] == action
                    && (e["target"]["id"] == target || e["target"]["name"] == target)
            })
            .unwrap_or_else(|| panic!("no {action} of {target}: {events:?}"))
            .clone()
    };
    let bootstrap_created = event("api_token.created", "bootstrap");
    let bootstrap_id = bootstrap_created["target"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (recorded, operator) in [
        (event("organization.created", &org.id), "Alice Ops"),
        (bootstrap_created, "Alice Ops"),
        (
            event("authorization.created", by_admin["id"].as_str().unwrap()),
            "bob",
        ),
    ] {
        assert_eq!(recorded["actor"]["type"], "system", "{recorded}");
        assert_eq!(recorded["actor"]["id"], Value::Null, "{recorded}");
        assert_eq!(
            recorded["details"]["os_user"],
            os_user.as_str(),
            "{recorded}"
        );
        assert_eq!(recorded["details"]["operator"], operator, "{recorded}");
    }
    let api_created = event("api_token.created", &by_api.id);
    assert_eq!(api_created["actor"]["type"], "api_token");
    assert_eq!(api_created["actor"]["id"], bootstrap_id.as_str());
    assert_eq!(api_created["details"].get("os_user"), None);

    // Retention prunes every event so far.
    let opened = keyplane_store::connect(&store.db.url).await.unwrap();
    let cutoff = chrono::Utc::now() + chrono::TimeDelta::days(1);
    let record = keyplane_server::ops::audit_pruned(cutoff, 1);
    while opened
        .prune_audit_events(cutoff, 1000, None, &record)
        .await
        .unwrap()
        > 0
    {}
    opened.close().await;
    let created = [
        "--action",
        "organization.created",
        "--action",
        "api_token.created",
        "--action",
        "authorization.created",
    ];
    let left = admin_audit(
        &store,
        &[&["--org", org.id.as_str()][..], &created].concat(),
    )
    .await;
    assert_eq!(left, Vec::<Value>::new(), "pruned");

    // The rows still say who created them.
    let review = json_lines(
        &run(
            keyplane()
                .args(["admin", "access-review", "--org", &org.id])
                .args(store.args()),
            TIMEOUT,
        )
        .await,
    );
    let row = |id: &str| {
        review
            .iter()
            .find(|row| row["id"] == id)
            .unwrap_or_else(|| panic!("{id} is not in the review: {review:?}"))
            .clone()
    };
    let by_operator = |name: &str| {
        serde_json::json!({
            "actor": {"type": "system", "id": null},
            "via": "admin",
            "os_user": os_user,
            "operator": name,
        })
    };
    let by_bootstrap_token = serde_json::json!({
        "actor": {"type": "api_token", "id": bootstrap_id},
        "via": "api",
        "os_user": null,
        "operator": null,
    });
    assert_eq!(review.len(), 4, "two tokens, two grants: {review:?}");
    assert_eq!(row(&bootstrap_id)["type"], "api_token");
    assert_eq!(row(&bootstrap_id)["created_by"], by_operator("Alice Ops"));
    assert_eq!(row(&by_api.id)["created_by"], by_bootstrap_token);
    let admin_grant = row(by_admin["id"].as_str().unwrap());
    assert_eq!(admin_grant["type"], "authorization");
    assert_eq!(admin_grant["subject_id"], reader);
    assert_eq!(admin_grant["created_by"], by_operator("bob"));
    let api_grant = row(granted_by_api["id"].as_str().unwrap());
    assert_eq!(api_grant["capability_key"], "api_tokens:read");
    assert_eq!(api_grant["created_by"], by_bootstrap_token);
}

/// Under `sudo` the OS user is root: who ran `sudo` is recorded with it, as `SUDO_USER` declares
/// (`root (SUDO_USER=alice)`), on the events and on the rows; an empty `SUDO_USER` adds nothing.
async fn admin_events_under_sudo_name_who_ran_sudo(backend: Backend) {
    let store = TestStore::new(backend).await;
    let os_user = os_user();
    let sudoed = format!("{os_user} (SUDO_USER=alice)");
    let created = run(
        keyplane()
            .args(["admin", "create-org", "--name", "acme", "--json"])
            .args(store.args())
            .env("SUDO_USER", "alice"),
        TIMEOUT,
    )
    .await;
    assert!(created.status.success(), "{}", created.describe());
    let org = Org::from_json(&created.stdout);
    let reader = "6f1d2c3b-4a59-4e68-9d7c-8b9a0f1e2d3c";
    let granted = json_lines(
        &run(
            keyplane()
                .args(["admin", "grant", "--org", &org.id, "--user-id", reader])
                .args(["--capability", "audit:read"])
                .args(store.args())
                .env("SUDO_USER", ""),
            TIMEOUT,
        )
        .await,
    )
    .remove(0);
    let events = admin_audit(&store, &["--org", &org.id]).await;
    let os_user_of = |action: &str| {
        events
            .iter()
            .find(|e| e["action"] == action)
            .unwrap_or_else(|| panic!("no {action}: {events:?}"))["details"]["os_user"]
            .clone()
    };
    assert_eq!(os_user_of("organization.created"), sudoed.as_str());
    assert_eq!(os_user_of("api_token.created"), sudoed.as_str());
    assert_eq!(os_user_of("authorization.created"), os_user.as_str());
    let review = json_lines(
        &run(
            keyplane()
                .args(["admin", "access-review", "--org", &org.id])
                .args(store.args()),
            TIMEOUT,
        )
        .await,
    );
    for row in &review {
        let expected = if row["id"] == granted["id"] {
            &os_user
        } else {
            &sudoed
        };
        assert_eq!(row["created_by"]["os_user"], expected.as_str(), "{row}");
    }
    assert_eq!(review.len(), 2, "a token and a grant: {review:?}");
}

/// The `keyplane_audit_export_lag_seconds` sample of a `/metrics` answer.
async fn export_lag(server: &Keyplane) -> f64 {
    server.metric("keyplane_audit_export_lag_seconds").await
}

/// An audit log that takes nothing more (here a FIFO whose buffer is full and which nobody reads;
/// a hung mount does the same): the export says it is stalled, `/metrics` shows its lag growing,
/// the server goes on serving, and a stop still ends within `--shutdown-timeout-seconds`, saying
/// the export was left mid-write.
#[tokio::test]
async fn a_stalled_audit_log_is_reported_and_does_not_hold_up_a_stop() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let store = TestStore::new(Backend::Sqlite).await;
    let fifo = store.db.data_dir.join("audit.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // Held open (read and write, so opening it waits for no peer) and never read; filled until it
    // takes no more, so the server's first line already waits.
    let mut held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the FIFO");
    loop {
        match held.write(&[b'\n'; 4096]) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the FIFO: {e}"),
        }
    }
    let mut server = Keyplane::start(
        &store,
        &[
            "--audit-log",
            fifo.to_str().unwrap(),
            "--shutdown-timeout-seconds",
            "2",
        ],
        TIMEOUT,
    )
    .await;
    let org = store.bootstrap_org();
    server.create_token(&org, "meanwhile", &[], None).await;

    wait_until("the log says the export is stalled", || {
        server.log().contains("audit export stalled")
    })
    .await;
    let first = export_lag(&server).await;
    assert!(first >= 1.0, "the export's lag is {first} s");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let lag = export_lag(&server).await;
        if lag >= first + 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the export's lag stays at {lag} s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The server goes on: the stalled export holds none of its workers.
    server.create_token(&org, "still-served", &[], None).await;

    let pid = server.process.0.id().to_string();
    let asked = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = common::wait_for_exit(&mut server.process.0, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "serve did not stop within 10 s of SIGTERM (deadline 2 s):\n{}",
                server.log()
            )
        });
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "stopped {:?} after SIGTERM",
        asked.elapsed()
    );
    // The log's last lines may still be on their way from the pipe.
    wait_until("the log says the export was left mid-write", || {
        server.log().contains("left mid-write")
    })
    .await;
    drop(held);
}
