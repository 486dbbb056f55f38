//! `keyplane admin restore-replay`: a store restored from a backup, and the revocation, suspension
//! and rotation made after the backup made again from the exported trail, through the real binary
//! and a real `keyplane serve` on either backend.

mod common;

use common::{both_stores, string_field, CommandOutput, Keyplane, Org, TestStore, Token};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The bound on each command and request.
const TIMEOUT: Duration = Duration::from_secs(30);
const OPERATOR: &str = "Restorer Rita";

both_stores!(
    restore_replay_makes_again_what_the_restore_undid,
    restore_replay_deletes_nothing_back_and_reads_only_logs,
);

/// `keyplane admin --operator OPERATOR <args> <store flags>`, fed `input` on stdin.
async fn admin(store: &TestStore, args: &[&str], input: &str) -> CommandOutput {
    common::admin(
        store,
        &[&["--operator", OPERATOR], args].concat(),
        input,
        TIMEOUT,
    )
    .await
}

/// `admin restore-replay --json <args>`, which must succeed: its JSON lines, and its stderr.
async fn restore_replay(store: &TestStore, args: &[&str], input: &str) -> (Vec<Value>, String) {
    let mut all = vec!["restore-replay", "--json"];
    all.extend_from_slice(args);
    let output = admin(store, &all, input).await;
    (common::json_lines(&output), output.stderr)
}

/// The organization's audit events in the store, newest first, as `admin audit` prints them.
async fn audit(store: &TestStore, org: &str) -> Vec<Value> {
    common::json_lines(&admin(store, &["audit", "--org", org], "").await)
}

/// The exported events, oldest first as written.
fn exported(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The id of the exported `action` event on `target`; it must be there once.
fn exported_event(log: &Path, action: &str, target: &str) -> String {
    let found: Vec<String> = exported(log)
        .iter()
        .filter(|e| e["action"] == action && e["target"]["id"] == target)
        .map(|e| string_field(e, "id"))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{action} of {target} in the export: {found:?}"
    );
    found[0].clone()
}

/// Waits until the export holds an `action` event on `target`.
async fn exported_soon(log: &Path, action: &str, target: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !exported(log)
        .iter()
        .any(|e| e["action"] == action && e["target"]["id"] == target)
    {
        assert!(
            Instant::now() < deadline,
            "{action} of {target} never exported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Keyplane {
    /// The status `GET /v1/auth/forward` answers `secret`.
    async fn verifies(&self, secret: &str) -> StatusCode {
        self.http
            .get(self.url("/v1/auth/forward"))
            .bearer_auth(secret)
            .send()
            .await
            .expect("GET /v1/auth/forward")
            .status()
    }

    /// `POST api-tokens/{id}/{verb}` with the organization's token; the answer's JSON.
    async fn token_action(&self, org: &Org, id: &str, verb: &str) -> Value {
        let path = format!("/api/v1/organizations/{}/api-tokens/{id}/{verb}", org.id);
        self.post_json(&org.token, &path, None, StatusCode::OK)
            .await
    }

    /// SIGTERM, and a clean exit: SQLite leaves the one database file.
    async fn stop(mut self) {
        let pid = self.process.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill")
            .success());
        let status = common::wait_for_exit(&mut self.process.0, TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("serve did not stop:\n{}", self.log()));
        assert!(status.success(), "serve exited {status}:\n{}", self.log());
    }
}

/// A copy of the whole store, taken while `serve` runs, as the README says.
enum Backup {
    Sqlite(PathBuf),
    /// A `pg_dump` file.
    Postgres(PathBuf),
}

impl Backup {
    fn take(store: &TestStore, dir: &Path) -> Self {
        match store.backend {
            Backend::Sqlite => {
                let backup = dir.join("backup.db");
                let database = store.db.data_dir.join("keyplane.db");
                let status = Command::new("sqlite3")
                    .arg(&database)
                    .arg(format!("VACUUM INTO '{}'", backup.display()))
                    .status()
                    .expect("run sqlite3");
                assert!(status.success(), "sqlite3 VACUUM INTO failed");
                Backup::Sqlite(backup)
            }
            Backend::Postgres => {
                let dump = dir.join("backup.sql");
                let status = Command::new("pg_dump")
                    .args(["--no-owner", "--file"])
                    .arg(&dump)
                    .arg(&store.db.url)
                    .status()
                    .expect("run pg_dump");
                assert!(status.success(), "pg_dump failed");
                Backup::Postgres(dump)
            }
        }
    }

    /// Restores the backup over the store, `serve` stopped.
    fn restore(&self, store: &TestStore) {
        match self {
            Backup::Sqlite(backup) => {
                let data_dir = &store.db.data_dir;
                for stale in ["keyplane.db-wal", "keyplane.db-shm"] {
                    let _ = std::fs::remove_file(data_dir.join(stale));
                }
                let database = data_dir.join("keyplane.db");
                std::fs::copy(backup, &database).expect("copy the backup");
                std::fs::set_permissions(
                    &database,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
            }
            Backup::Postgres(dump) => {
                // Empty the database, then load the dump into it.
                psql(
                    &store.db.url,
                    &["-c", "DROP SCHEMA public CASCADE; CREATE SCHEMA public;"],
                );
                psql(&store.db.url, &["-f", dump.to_str().unwrap()]);
            }
        }
    }
}

fn psql(url: &str, args: &[&str]) {
    let output = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", url])
        .args(args)
        .output()
        .expect("run psql");
    assert!(
        output.status.success(),
        "psql {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `(target id, did)` of each line, and each line's `from_event` by target.
fn did(lines: &[Value]) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut did = BTreeMap::new();
    let mut from = BTreeMap::new();
    for line in lines {
        let target = string_field(&line["target"], "id");
        assert_eq!(line["target"]["type"], "api_token", "{line}");
        assert!(
            did.insert(target.clone(), string_field(line, "did"))
                .is_none(),
            "two lines for {target}: {lines:?}"
        );
        from.insert(target, string_field(line, "from_event"));
    }
    (did, from)
}

fn expected(pairs: &[(&Token, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(token, did)| (token.id.clone(), did.to_string()))
        .collect()
}

async fn restore_replay_makes_again_what_the_restore_undid(backend: Backend) {
    let store = TestStore::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let log_arg = log.to_str().unwrap().to_owned();
    let serve_args = ["--audit-log", log_arg.as_str()];
    let server = Keyplane::start(&store, &serve_args, TIMEOUT).await;
    let org = store.bootstrap_org();
    let revoked = server.create_token(&org, "to-revoke", &[], None).await;
    let suspended = server.create_token(&org, "to-suspend", &[], None).await;
    let rotated = server.create_token(&org, "to-rotate", &[], None).await;
    exported_soon(&log, "api_token.created", &rotated.id).await;

    let backup = Backup::take(&store, dir.path());

    // After the backup: the three changes a restore undoes.
    assert_eq!(
        server.revoke_token(&org, &revoked.id).await,
        StatusCode::NO_CONTENT
    );
    server.token_action(&org, &suspended.id, "suspend").await;
    let new_secret = string_field(
        &server.token_action(&org, &rotated.id, "rotate").await,
        "token",
    );
    assert_eq!(server.verifies(&new_secret).await, StatusCode::OK);
    exported_soon(&log, "api_token.rotated", &rotated.id).await;
    server.stop().await;

    backup.restore(&store);
    // The restore brought them back; new events take the lost ones' seqs.
    let server = Keyplane::start(&store, &serve_args, TIMEOUT).await;
    for token in [&revoked, &suspended, &rotated] {
        assert_eq!(
            server.verifies(&token.secret).await,
            StatusCode::OK,
            "{} verifies again after the restore",
            token.name
        );
    }
    let later = server.create_token(&org, "after-restore", &[], None).await;
    assert_eq!(
        server.revoke_token(&org, &later.id).await,
        StatusCode::NO_CONTENT
    );
    exported_soon(&log, "api_token.revoked", &later.id).await;
    server.stop().await;
    let lost = [
        (
            &revoked,
            exported_event(&log, "api_token.revoked", &revoked.id),
        ),
        (
            &suspended,
            exported_event(&log, "api_token.suspended", &suspended.id),
        ),
        (
            &rotated,
            exported_event(&log, "api_token.rotated", &rotated.id),
        ),
    ];
    let lost_from: BTreeMap<String, String> = lost
        .iter()
        .map(|(token, event)| (token.id.clone(), event.clone()))
        .collect();
    // Reused seqs: the event after the restore at a lost event's seq is another one.
    let seq_of = |id: &str| {
        exported(&log).into_iter().find(|e| e["id"] == id).unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    let later_revoked = exported_event(&log, "api_token.revoked", &later.id);
    assert!(
        seq_of(&later_revoked) <= seq_of(&lost[2].1),
        "the test means new events to reuse the lost ones' seqs"
    );
    let before = audit(&store, &org.id).await;

    let (lines, _) = restore_replay(&store, &["--audit-log", &log_arg, "--dry-run"], "").await;
    let (did_now, from) = did(&lines);
    assert_eq!(
        did_now,
        expected(&[
            (&revoked, "would_revoke"),
            (&suspended, "would_suspend"),
            (&rotated, "would_revoke"),
        ]),
        "{lines:?}"
    );
    assert_eq!(from, lost_from);
    assert_eq!(
        audit(&store, &org.id).await,
        before,
        "a dry run writes nothing"
    );
    // As text: a line per target naming the lost event, and a summary per organization.
    let text = admin(
        &store,
        &["restore-replay", "--audit-log", &log_arg, "--dry-run"],
        "",
    )
    .await;
    assert!(text.status.success(), "{}", text.describe());
    for (token, event) in &lost {
        assert!(
            text.stdout
                .contains(&format!("api_token {} (lost", token.id))
                && text.stdout.contains(event.as_str()),
            "{}",
            text.describe()
        );
    }
    assert!(
        text.stdout.contains(&format!(
            "organization {}: 3 events lost by the restore",
            org.id
        )) && text.stdout.contains("dry run: nothing written"),
        "{}",
        text.describe()
    );

    let (lines, _) = restore_replay(&store, &["--audit-log", &log_arg], "").await;
    let (did_now, from) = did(&lines);
    assert_eq!(
        did_now,
        expected(&[
            (&revoked, "revoked"),
            (&suspended, "suspended"),
            (&rotated, "revoked"),
        ]),
        "{lines:?}"
    );
    assert_eq!(from, lost_from);

    // Each change again as an event naming the lost one, and the loss recorded once.
    let after = audit(&store, &org.id).await;
    let written = &after[..after.len() - before.len()];
    assert_eq!(written.len(), 4, "{written:?}");
    for (token, lost_event) in &lost {
        let event = written
            .iter()
            .find(|e| e["target"]["id"] == token.id.as_str())
            .unwrap_or_else(|| panic!("no event on {}: {written:?}", token.name));
        assert_eq!(event["actor"]["type"], "system");
        assert_eq!(event["details"]["replayed_event_id"], lost_event.as_str());
        assert_eq!(event["details"]["via"], "admin restore-replay");
        assert_eq!(event["details"]["operator"], OPERATOR);
    }
    let restored = &written[0];
    assert_eq!(restored["action"], "audit.restored", "{written:?}");
    assert_eq!(
        restored["details"]["lost_from_seq"].as_u64(),
        Some(seq_of(&lost[0].1))
    );
    assert_eq!(
        restored["details"]["lost_through_seq"].as_u64(),
        Some(seq_of(&lost[2].1))
    );
    assert_eq!(restored["details"]["revoked"], 2);
    assert_eq!(restored["details"]["suspended"], 1);

    let server = Keyplane::start(&store, &serve_args, TIMEOUT).await;
    for token in [&revoked, &suspended, &rotated, &later] {
        assert_eq!(
            server.verifies(&token.secret).await,
            StatusCode::UNAUTHORIZED,
            "{} is refused again",
            token.name
        );
    }
    server.stop().await;

    // Again, from stdin with a torn last line: all done, nothing written.
    let settled = audit(&store, &org.id).await;
    let mut input = std::fs::read_to_string(&log).unwrap();
    input.push_str("{\"id\":\"0190");
    let (lines, stderr) = restore_replay(&store, &["--audit-log", "-"], &input).await;
    let (did_now, _) = did(&lines);
    assert_eq!(
        did_now,
        expected(&[
            (&revoked, "already"),
            (&suspended, "already"),
            (&rotated, "already"),
        ]),
        "{lines:?}"
    );
    assert!(stderr.contains("skipped 1 line"), "{stderr}");
    assert_eq!(
        audit(&store, &org.id).await,
        settled,
        "a second run writes nothing"
    );

    // A file that is not there: a clear error, exit 1.
    let missing = dir.path().join("missing.jsonl");
    let output = admin(
        &store,
        &["restore-replay", "--audit-log", missing.to_str().unwrap()],
        "",
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(
        output.stderr.contains("--audit-log: cannot read"),
        "{}",
        output.describe()
    );
}

/// `admin delete-org` of the organization `acme`, which must succeed.
async fn delete_acme(store: &TestStore, org: &Org) {
    let args = [
        "delete-org",
        "--org",
        &org.id,
        "--confirm-name",
        "acme",
        "--reason",
        "OFF-1",
    ];
    let output = admin(store, &args, "").await;
    assert!(output.status.success(), "{}", output.describe());
}

/// An organization deleted after the backup comes back whole, webhooks included: the command
/// makes nothing of it again and says to delete it again, exit 1, until that is done. And what
/// a glob over the log's directory also brings is skipped (the `.heads` file) or refused (a
/// compressed rotation, a file of no event), naming it.
async fn restore_replay_deletes_nothing_back_and_reads_only_logs(backend: Backend) {
    let store = TestStore::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let created = admin(&store, &["create-org", "--name", "acme", "--json"], "").await;
    assert!(created.status.success(), "{}", created.describe());
    let org = Org::from_json(&created.stdout);
    let backup = Backup::take(&store, dir.path());
    delete_acme(&store, &org).await;
    // The trail as the export wrote it: oldest first.
    let mut trail = audit(&store, &org.id).await;
    trail.reverse();
    assert_eq!(trail.last().unwrap()["action"], "organization.deleted");
    let log = dir.path().join("audit.jsonl");
    let lines: Vec<String> = trail.iter().map(Value::to_string).collect();
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let heads = dir.path().join("audit.jsonl.heads");
    std::fs::write(&heads, format!("{{\"{}\": {{\"seq\": 9}}}}\n", org.id)).unwrap();
    backup.restore(&store);

    let log = log.to_str().unwrap();
    let heads = heads.to_str().unwrap();
    let output = admin(
        &store,
        &["restore-replay", "--json", "--audit-log", log, heads],
        "",
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    let lines: Vec<Value> = output
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line, the organization: {}",
        output.stdout
    );
    assert_eq!(lines[0]["did"], "delete_again");
    assert_eq!(lines[0]["target"]["id"], org.id.as_str());
    assert!(
        output
            .stderr
            .contains(&format!("delete-org --org {}", org.id))
            && output.stderr.contains("skipped")
            && output.stderr.contains(heads),
        "{}",
        output.stderr
    );
    // Nothing was made again: the restored token still there, no event written.
    let restored = audit(&store, &org.id).await;
    assert_ne!(restored[0]["action"], "organization.deleted");
    assert!(restored.iter().all(|e| e["action"] != "api_token.revoked"));

    delete_acme(&store, &org).await;
    let (lines, _) = restore_replay(&store, &["--audit-log", log], "").await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["did"], "already");

    let gzip = dir.path().join("audit.jsonl.1.gz");
    std::fs::write(&gzip, [0x1f, 0x8b, 0x08, 0x00, 0x00]).unwrap();
    let not_a_log = dir.path().join("notes.txt");
    std::fs::write(&not_a_log, "rotated on Tuesday\n").unwrap();
    for (path, says) in [(&gzip, "compressed"), (&not_a_log, "holds no audit event")] {
        let path = path.to_str().unwrap();
        let output = admin(&store, &["restore-replay", "--audit-log", log, path], "").await;
        assert_eq!(output.status.code(), Some(1), "{}", output.describe());
        assert!(
            output.stderr.contains(path) && output.stderr.contains(says),
            "{}",
            output.stderr
        );
    }
}
