//! A store that went back in time under a running audit export, through the binary: restored from
//! a backup, or lost with its data directory, while `--audit-log` (and its `.heads` file beside
//! it) kept everything exported since.

mod common;

use common::{admin_connection, both_stores, database_name, Keyplane, Org, TestStore};
use keyplane_store::testing::Backend;
use serde_json::Value;
use sqlx::Executor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

both_stores!(
    a_store_restored_from_a_backup_is_found_behind_the_audit_log,
    an_empty_store_under_a_used_audit_log_is_not_bootstrapped,
    a_new_audit_log_under_saved_cursors_is_warned_about,
);

/// A stopped server's store, copied as a backup is: SQLite's one file (a clean stop leaves no
/// WAL), or a copy of the PostgreSQL database.
async fn back_up(store: &TestStore) {
    match store.backend {
        Backend::Sqlite => copy_in_data_dir(store, "keyplane.db", "backup.db"),
        Backend::Postgres => {
            let name = database_name(&store.db.url);
            on_postgres(&[format!("CREATE DATABASE {name}_backup TEMPLATE {name}")]).await;
        }
    }
}

/// Puts [`back_up`]'s copy back in place of the stopped server's store, as the README says to.
async fn restore(store: &TestStore) {
    match store.backend {
        Backend::Sqlite => {
            for suffix in ["-wal", "-shm"] {
                let _ =
                    std::fs::remove_file(store.db.data_dir.join(format!("keyplane.db{suffix}")));
            }
            copy_in_data_dir(store, "backup.db", "keyplane.db");
        }
        Backend::Postgres => {
            let name = database_name(&store.db.url);
            on_postgres(&[
                format!("DROP DATABASE {name} WITH (FORCE)"),
                format!("CREATE DATABASE {name} TEMPLATE {name}_backup"),
                format!("DROP DATABASE {name}_backup"),
            ])
            .await;
        }
    }
}

/// The stopped server's store lost: its data directory's files (the bootstrap file too), or an
/// empty PostgreSQL database in place of its own.
async fn lose(store: &TestStore) {
    for name in [
        "keyplane.db",
        "keyplane.db-wal",
        "keyplane.db-shm",
        "bootstrap.json",
    ] {
        let _ = std::fs::remove_file(store.db.data_dir.join(name));
    }
    if store.backend == Backend::Postgres {
        let name = database_name(&store.db.url);
        on_postgres(&[
            format!("DROP DATABASE {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ])
        .await;
    }
}

fn copy_in_data_dir(store: &TestStore, from: &str, to: &str) {
    let dir = &store.db.data_dir;
    std::fs::copy(dir.join(from), dir.join(to)).unwrap();
}

async fn on_postgres(statements: &[String]) {
    let mut admin = admin_connection().await;
    for sql in statements {
        admin.execute(sql.as_str()).await.unwrap();
    }
}

fn log_path(store: &TestStore) -> PathBuf {
    store.db.data_dir.join("audit.log")
}

fn serve_args(log: &Path) -> Vec<String> {
    vec!["--audit-log".into(), log.to_str().unwrap().into()]
}

async fn start(store: &TestStore, extra: &[String]) -> Keyplane {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Keyplane::start(store, &extra, TIMEOUT).await
}

/// SIGTERM, and a clean exit: the export's last pass has run, SQLite has its one file.
async fn stop(mut server: Keyplane) -> String {
    let pid = server.process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = common::wait_for_exit(&mut server.process.0, TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("serve did not stop:\n{}", server.log()));
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    // Every line, once stderr is closed.
    let Keyplane { reader, log, .. } = server;
    let _ = reader.join();
    let text = common::lock(&log).clone();
    text
}

/// The seqs and ids of `org`'s events in the audit log, in file order.
fn exported(log: &Path, org: &Org) -> Vec<(u64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["org_id"] == org.id.as_str())
        .map(|event| {
            (
                event["seq"].as_u64().unwrap(),
                event["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Makes `count` events in `org` and waits until the log holds them; the org's last seq.
async fn make_events(server: &Keyplane, log: &Path, org: &Org, count: usize) -> u64 {
    let before = exported(log, org).len();
    for i in 0..count {
        let token = server
            .create_token(org, &format!("t{before}-{i}"), &[], None)
            .await;
        assert_eq!(
            server.revoke_token(org, &token.id).await,
            reqwest::StatusCode::NO_CONTENT
        );
    }
    let newest = server.audit_events(org, "limit=1").await;
    let head = newest[0]["seq"].as_u64().unwrap();
    // By id: after a restore the log already holds another event at that seq.
    let id = newest[0]["id"].as_str().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !exported(log, org)
        .iter()
        .any(|(_, exported)| exported == id)
    {
        assert!(
            Instant::now() < deadline,
            "seq {head} ({id}) was never exported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    head
}

/// The JSON log lines at `level` whose message contains `text`.
fn logged(log: &str, level: &str, text: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| {
            line["level"] == level
                && line["message"]
                    .as_str()
                    .is_some_and(|message| message.contains(text))
        })
        .collect()
}

async fn get_json(server: &Keyplane, path: &str) -> Value {
    let response = server.http.get(server.url(path)).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK, "GET {path}");
    response.json().await.unwrap()
}

async fn behind_metric(server: &Keyplane) -> u64 {
    server
        .metric("keyplane_audit_export_behind_organizations")
        .await
}

/// Waits until the running server's log has a line at `level` containing `text`.
async fn wait_for_log(server: &Keyplane, level: &str, text: &str) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(line) = logged(&server.log(), level, text).pop() {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no {level} `{text}` in:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server on `store` with `--audit-log`, its `default` organization changed `changes` times,
/// the events exported, and stopped: the log, the arguments, the org and its last seq.
async fn exported_then_stopped(
    store: &TestStore,
    changes: usize,
) -> (PathBuf, Vec<String>, Org, u64) {
    let log = log_path(store);
    let args = serve_args(&log);
    let server = start(store, &args).await;
    let org = store.bootstrap_org();
    let seq = make_events(&server, &log, &org, changes).await;
    stop(server).await;
    (log, args, org, seq)
}

async fn a_store_restored_from_a_backup_is_found_behind_the_audit_log(backend: Backend) {
    let store = TestStore::new(backend).await;
    let (log, args, org, backed_up) = exported_then_stopped(&store, 2).await;
    back_up(&store).await;

    let server = start(&store, &args).await;
    let exported_seq = make_events(&server, &log, &org, 3).await;
    assert!(exported_seq > backed_up);
    stop(server).await;
    restore(&store).await;

    let server = start(&store, &args).await;
    let error = wait_for_log(&server, "ERROR", "the store is behind the audit log").await;
    assert_eq!(error["tenant.id"], org.id.as_str(), "{error}");
    assert_eq!(error["export.seq"], exported_seq, "{error}");
    assert_eq!(error["chain.head"], backed_up, "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(&org.id)
            && message.contains(&format!("ends at seq {backed_up}"))
            && message.contains(&format!("up to seq {exported_seq}")),
        "{message}"
    );
    // The export goes back to where the restored store's own cursor is, as for a failover.
    wait_for_log(
        &server,
        "WARN",
        "no longer holds the events the export wrote",
    )
    .await;
    let ready = get_json(&server, "/readyz").await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["audit"]["status"], "behind_export", "{ready}");
    assert_eq!(ready["audit"]["organizations_behind"], 1, "{ready}");
    // Unauthenticated: it names no organization; the log does, with the seqs.
    assert!(!ready.to_string().contains(org.id.as_str()), "{ready}");
    assert_eq!(behind_metric(&server).await, 1);
    // New events reuse the seqs the log already holds, under other ids.
    let head = make_events(&server, &log, &org, 1).await;
    assert!(head <= exported_seq);
    let at_head: Vec<_> = exported(&log, &org)
        .into_iter()
        .filter(|(seq, _)| *seq == head)
        .map(|(_, id)| id)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        at_head.len(),
        2,
        "seq {head} in the log: {at_head:?}; all: {:?}",
        exported(&log, &org)
    );
    stop(server).await;

    // Said once: the heads file follows the store from then on.
    let server = start(&store, &args).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ready = get_json(&server, "/readyz").await;
    assert_eq!(ready["audit"]["status"], "ok", "{ready}");
    assert_eq!(behind_metric(&server).await, 0);
    let log_text = stop(server).await;
    assert!(
        logged(&log_text, "ERROR", "behind the audit log").is_empty(),
        "{log_text}"
    );
}

async fn an_empty_store_under_a_used_audit_log_is_not_bootstrapped(backend: Backend) {
    let store = TestStore::new(backend).await;
    let (log, mut args, org, exported_seq) = exported_then_stopped(&store, 1).await;
    lose(&store).await;

    let output = common::run(
        common::keyplane()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(store.args())
            .args(&args),
        TIMEOUT,
    )
    .await;
    assert!(!output.status.success(), "{}", output.describe());
    let stderr = &output.stderr;
    assert!(
        stderr.contains("the store is empty")
            && stderr.contains(log.to_str().unwrap())
            && stderr.contains("--allow-empty-store"),
        "{stderr}"
    );
    assert!(
        !store.bootstrap_path().exists(),
        "bootstrapped all the same"
    );

    args.push("--allow-empty-store".into());
    let server = start(&store, &args).await;
    let fresh = store.bootstrap_org();
    assert_ne!(fresh.id, org.id);
    let error = wait_for_log(&server, "ERROR", "the store is behind the audit log").await;
    assert_eq!(error["tenant.id"], org.id.as_str(), "{error}");
    assert_eq!(error["export.seq"], exported_seq, "{error}");
    assert_eq!(error["chain.head"], 0, "{error}");
    let ready = get_json(&server, "/readyz").await;
    assert_eq!(ready["audit"]["status"], "behind_export", "{ready}");
    assert_eq!(ready["audit"]["organizations_behind"], 1, "{ready}");
    assert_eq!(behind_metric(&server).await, 1);
    stop(server).await;
}

async fn a_new_audit_log_under_saved_cursors_is_warned_about(backend: Backend) {
    let store = TestStore::new(backend).await;
    let (log, args, org, written) = exported_then_stopped(&store, 1).await;
    std::fs::remove_file(&log).unwrap();
    // (A keyplane from before the heads file has none.)
    let _ = std::fs::remove_file(store.db.data_dir.join("audit.log.heads"));

    let server = start(&store, &args).await;
    let warning = wait_for_log(&server, "WARN", "the audit log is empty").await;
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("point --audit-log at a new path"),
        "{warning}"
    );
    // Only later events are written to it.
    let head = make_events(&server, &log, &org, 1).await;
    let seqs: Vec<u64> = exported(&log, &org)
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert!(
        !seqs.is_empty() && seqs.iter().all(|seq| *seq > written && *seq <= head),
        "{seqs:?}"
    );
    stop(server).await;
}
