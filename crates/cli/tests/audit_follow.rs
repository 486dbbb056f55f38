//! Audit followers and `admin audit verify --against` across a restore, through the binary: the
//! trail taken back under them (its newest events deleted and its head set back, as a restore
//! from a backup leaves it), and new events taking the seqs of the lost ones.

mod common;

use common::{both_stores, keyplane, stored_events, tamper, Keyplane, KillOnDrop, Org, TestStore};
use keyplane_store::testing::Backend;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

const TIMEOUT: Duration = Duration::from_secs(20);

both_stores!(
    audit_tail_follow_prints_the_events_a_restore_reused_seqs_for,
    admin_audit_follow_prints_the_events_a_restore_reused_seqs_for,
    verify_against_the_export_tells_a_restore_from_a_changed_event,
);

/// Takes the organization's trail back to `seq` (the store holds one organization): the events
/// after it deleted, its head set back to it.
async fn restore_trail_to(store: &TestStore, seq: u64) {
    tamper(
        store,
        &format!(
            "UPDATE audit_chain_heads SET seq = {seq}, \
             chain_hash = (SELECT chain_hash FROM audit_events WHERE seq = {seq})"
        ),
    )
    .await;
    tamper(
        store,
        &format!("DELETE FROM audit_events WHERE seq > {seq}"),
    )
    .await;
}

/// Creates tokens named `{prefix}{i}`; their ids.
async fn tokens(server: &Keyplane, org: &Org, prefix: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..count {
        ids.push(
            server
                .create_token(org, &format!("{prefix}{i}"), &[], None)
                .await
                .id,
        );
    }
    ids
}

/// A running follower: its stdout's events as they come, its stderr in a file.
struct Follower {
    _process: KillOnDrop,
    events: UnboundedReceiver<Value>,
    printed: Vec<Value>,
    stderr: tempfile::NamedTempFile,
}

impl Follower {
    fn spawn(mut command: Command) -> Self {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut process = KillOnDrop(
            command
                .stdout(Stdio::piped())
                .stderr(stderr.reopen().unwrap())
                .spawn()
                .expect("spawn the follower"),
        );
        let stdout = process.0.stdout.take().unwrap();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Self {
            _process: process,
            events,
            printed: Vec::new(),
            stderr,
        }
    }

    /// Waits until the events printed include `done`.
    async fn until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(&self.printed) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(event)) => self.printed.push(event),
                _ => panic!(
                    "the follower never printed {what}; it printed (seq, target):\n{:?}\nstderr:\n{}",
                    self.printed
                        .iter()
                        .map(|e| (e["seq"].clone(), e["target"]["name"].clone()))
                        .collect::<Vec<_>>(),
                    self.stderr()
                ),
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap()
    }
}

fn has_seq(seq: u64) -> impl Fn(&[Value]) -> bool {
    move |printed| printed.iter().any(|e| e["seq"] == seq)
}

/// The trail goes back from seq 6 to 4 under a follower that printed up to 6, and four new
/// events take seqs 5 to 8: the follower prints all four, each once, and says why on stderr.
/// (Paging by seq alone, it printed only 7 and 8.)
async fn follower_prints_the_events_a_restore_reused_seqs_for(
    backend: Backend,
    follow: impl FnOnce(&TestStore, &Keyplane, &Org) -> Command,
) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    tokens(&server, &org, "before", 4).await;
    let mut follower = Follower::spawn(follow(&store, &server, &org));
    follower.until("seq 6", has_seq(6)).await;

    restore_trail_to(&store, 4).await;
    let new = tokens(&server, &org, "after", 4).await;
    follower
        .until("the four new events", |printed| {
            new.iter()
                .all(|id| printed.iter().any(|e| e["target"]["id"] == id.as_str()))
        })
        .await;
    for id in &new {
        let times = follower
            .printed
            .iter()
            .filter(|e| e["target"]["id"] == id.as_str())
            .count();
        assert_eq!(times, 1, "{id} printed {times} times");
    }
    let stderr = follower.stderr();
    assert!(
        stderr.contains("warning: the audit trail went back")
            && stderr.contains("restore")
            && stderr.contains("printed at seq 6"),
        "{stderr}"
    );
}

async fn audit_tail_follow_prints_the_events_a_restore_reused_seqs_for(backend: Backend) {
    let home = tempfile::tempdir().unwrap();
    follower_prints_the_events_a_restore_reused_seqs_for(backend, |_, server, org| {
        let mut command = keyplane();
        command
            .env("KEYPLANE_URL", server.url(""))
            .env("KEYPLANE_TOKEN", &org.token)
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("HOME", home.path())
            .args([
                "audit",
                "tail",
                "-n",
                "100",
                "--follow",
                "--interval",
                "1s",
                "-o",
                "jsonl",
            ]);
        command
    })
    .await;
}

async fn admin_audit_follow_prints_the_events_a_restore_reused_seqs_for(backend: Backend) {
    follower_prints_the_events_a_restore_reused_seqs_for(backend, |store, _, org| {
        let mut command = keyplane();
        command
            .args(["admin", "audit", "--org", &org.id, "--follow"])
            .args(store.args());
        command
    })
    .await;
}

/// The exported events, as (seq, id).
fn exported(log: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn exported_soon(log: &Path, ids: &[String]) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let written = exported(log);
        if ids.iter().all(|id| written.iter().any(|(_, w)| w == id)) {
            return;
        }
        assert!(Instant::now() < deadline, "not exported: {ids:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn verify_against(store: &TestStore, org: &Org, log: &Path) -> common::CommandOutput {
    common::run(
        keyplane()
            .args(["admin", "audit", "verify", "--org", &org.id, "--against"])
            .arg(log)
            .args(store.args()),
        TIMEOUT,
    )
    .await
}

async fn verify_against_the_export_tells_a_restore_from_a_changed_event(backend: Backend) {
    let store = TestStore::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let server = Keyplane::start(&store, &["--audit-log", log.to_str().unwrap()], TIMEOUT).await;
    let org = store.bootstrap_org();
    tokens(&server, &org, "before", 6).await;
    let events = stored_events(&store, &org).await;
    assert_eq!(events.len(), 8);
    let ids: Vec<String> = events.iter().map(|e| e.event.id.to_string()).collect();
    exported_soon(&log, &ids).await;

    let output = verify_against(&store, &org, &log).await;
    assert!(output.status.success(), "{}", output.describe());
    assert!(
        output
            .stdout
            .contains("holds the exported trail: 8 exported events compared"),
        "{}",
        output.describe()
    );

    // Back to seq 4 under the running export, and two new events at seqs 5 and 6: the export
    // writes them too, beside the four the store lost.
    restore_trail_to(&store, 4).await;
    let new = tokens(&server, &org, "after", 2).await;
    let stored = stored_events(&store, &org).await;
    let new_events: Vec<String> = stored[4..].iter().map(|e| e.event.id.to_string()).collect();
    exported_soon(&log, &new_events).await;
    let output = verify_against(&store, &org, &log).await;
    assert_eq!(output.status.code(), Some(4), "{}", output.describe());
    assert!(
        output
            .stdout
            .contains("diverged from the exported trail at seq 5")
            && output.stdout.contains("restore from a backup"),
        "{}",
        output.describe()
    );
    for lost in &ids[4..] {
        assert!(
            output.stdout.contains(lost.as_str()),
            "{lost}: {}",
            output.describe()
        );
    }
    for kept in ids[..4].iter().chain(&new_events).chain(&new) {
        assert!(
            !output.stdout.contains(kept.as_str()),
            "{kept}: {}",
            output.describe()
        );
    }

    // The newest event changed with its hash and the head's recomputed: the chain verifies, the
    // export does not agree, and it is not a restore. (The server stopped first: its export would
    // write the changed event too.)
    drop(server);
    let mut newest = stored[5].clone();
    newest.event.target.as_mut().unwrap().name = Some("nothing to see".into());
    let rehashed = keyplane_core::audit::chain_hash(&stored[4].chain_hash, &newest.event, 6);
    let hex = keyplane_core::audit::hash_hex(&rehashed);
    tamper(
        &store,
        &format!(
            "UPDATE audit_events SET target_name = 'nothing to see', chain_hash = '{hex}' WHERE seq = 6"
        ),
    )
    .await;
    tamper(
        &store,
        &format!("UPDATE audit_chain_heads SET chain_hash = '{hex}'"),
    )
    .await;
    let output = verify_against(&store, &org, &log).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(
        output.stdout.contains("intact")
            && output.stdout.contains(&newest.event.id.to_string())
            && output.stdout.contains("changed or moved"),
        "{}",
        output.describe()
    );
}
