//! Black-box tests of `keyplane serve` when its store misbehaves: a held lock, a full disk, a
//! read-only database, a PostgreSQL restart, a hanging store, and racing writers. Every transient
//! fault must answer 503 `unavailable` with `Retry-After` in the caller's dialect, reads and
//! verification must keep going where the store lets them, and writes recover by themselves.

mod common;

use common::{
    admin_connection, both_stores, database_name, free_loopback_port, http_client, Keyplane, Org,
    TestStore,
};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, Executor};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The bound on startup and on every request.
const TIMEOUT: Duration = Duration::from_secs(30);

both_stores!(
    a_locked_store_answers_503_with_retry_after_in_each_dialect,
    waiting_writers_do_not_starve_readers,
    of_concurrent_rotations_exactly_one_succeeds,
    rotating_an_expired_credential_is_a_conflict,
);

// ------------------------------------------------------------------------------------------------
// Helpers

/// Another connection holding the store's write lock until released: SQLite `BEGIN EXCLUSIVE`
/// (WAL readers pass), PostgreSQL an EXCLUSIVE lock on `credentials` (reads pass, writes wait).
enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    async fn hold(store: &TestStore) -> Self {
        match store.backend {
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(&store.db.url)
                    .await
                    .expect("open the SQLite database");
                connection
                    .execute("BEGIN EXCLUSIVE")
                    .await
                    .expect("take SQLite's write lock");
                WriteLock::Sqlite(connection)
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&store.db.url)
                    .await
                    .expect("connect to PostgreSQL");
                connection
                    .execute("BEGIN; LOCK TABLE credentials IN EXCLUSIVE MODE")
                    .await
                    .expect("lock the credentials table");
                WriteLock::Postgres(connection)
            }
        }
    }

    async fn release(self) {
        match self {
            WriteLock::Sqlite(mut connection) => {
                connection.execute("ROLLBACK").await.expect("release");
                connection.close().await.expect("close");
            }
            WriteLock::Postgres(mut connection) => {
                connection.execute("ROLLBACK").await.expect("release");
                connection.close().await.expect("close");
            }
        }
    }
}

/// A response's status, `Retry-After` and JSON body.
struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Value,
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("Retry-After is text").to_owned());
    let text = response.text().await.expect("read the body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        retry_after,
        body,
    }
}

fn account_url(server: &Keyplane, org: &Org, rest: &str) -> String {
    server.url(&format!("/v1/public/accounts/{}/auth{rest}", org.id))
}

async fn post(server: &Keyplane, url: String, bearer: &str, body: Value) -> Answer {
    answer(
        server
            .http
            .post(url)
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .await
            .expect("POST"),
    )
    .await
}

async fn create_api_token(server: &Keyplane, org: &Org, name: &str) -> Answer {
    post(
        server,
        server.tokens_url(&org.id),
        &org.token,
        json!({ "name": name, "scopes": ["api_tokens:read"] }),
    )
    .await
}

async fn create_service_account(server: &Keyplane, org: &Org, name: &str) -> Answer {
    post(
        server,
        account_url(server, org, "/service-accounts"),
        &org.token,
        json!({ "name": name }),
    )
    .await
}

async fn forward_auth(server: &Keyplane, bearer: &str) -> StatusCode {
    server
        .http
        .get(server.url("/v1/auth/forward"))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("GET /v1/auth/forward")
        .status()
}

async fn readyz(server: &Keyplane) -> Answer {
    answer(
        server
            .http
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("GET /readyz"),
    )
    .await
}

/// An Aether 503: `unavailable`, a `Retry-After`, and a message naming `what`.
fn assert_aether_unavailable(answer: &Answer, what: &str) {
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    assert!(
        answer.retry_after.is_some(),
        "no Retry-After: {}",
        answer.body
    );
    assert_eq!(
        answer.body["error"]["code"], "unavailable",
        "{}",
        answer.body
    );
    let message = answer.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(what),
        "the message should say `{what}`: {message}"
    );
}

/// A Hybridbox (FastAPI) 503: `{"detail": "..."}` naming `what`, with a `Retry-After`.
fn assert_hybridbox_unavailable(answer: &Answer, what: &str) {
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    assert!(
        answer.retry_after.is_some(),
        "no Retry-After: {}",
        answer.body
    );
    let detail = answer.body["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains(what),
        "the detail should say `{what}`: {}",
        answer.body
    );
}

// ------------------------------------------------------------------------------------------------
// A held lock

async fn a_locked_store_answers_503_with_retry_after_in_each_dialect(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();

    let lock = WriteLock::hold(&store).await;
    let (aether, hybridbox) = tokio::join!(
        create_api_token(&server, &org, "behind-a-lock"),
        create_service_account(&server, &org, "behind-a-lock"),
    );
    assert_aether_unavailable(&aether, "busy");
    assert_hybridbox_unavailable(&hybridbox, "busy");
    let ready = readyz(&server).await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "reads still work: {}",
        ready.body
    );
    assert_eq!(ready.body["status"], "degraded", "{}", ready.body);
    assert_eq!(
        ready.body["last_write_failure"]["kind"], "busy",
        "{}",
        ready.body
    );

    lock.release().await;
    let created = create_api_token(&server, &org, "after-the-lock").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let ready = readyz(&server).await;
    assert_eq!(ready.body["status"], "ready", "{}", ready.body);
    assert_eq!(ready.body["writes"], "ok", "{}", ready.body);
}

// ------------------------------------------------------------------------------------------------
// Writers and readers

/// More writes wait on a held lock than any pool has connections; an uncached verification, a list
/// and `/readyz` still answer while every one of those writes is pending.
async fn waiting_writers_do_not_starve_readers(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    // Never verified, so never cached: verifying it reads the store.
    let unused = server
        .create_token(&org, "unused", &["api_tokens:read"], None)
        .await;

    let lock = WriteLock::hold(&store).await;
    let writes: Vec<_> = (0..24)
        .map(|i| {
            let http = server.http.clone();
            let url = server.tokens_url(&org.id);
            let bearer = org.token.clone();
            tokio::spawn(async move {
                http.post(url)
                    .bearer_auth(bearer)
                    .json(&json!({ "name": format!("queued-{i:02}"), "scopes": [] }))
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    // Let them reach the store and queue.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        writes.iter().all(|w| !w.is_finished()),
        "a write passed the lock"
    );

    let reads = tokio::time::timeout(Duration::from_secs(4), async {
        tokio::join!(
            forward_auth(&server, &unused.secret),
            async {
                server
                    .http
                    .get(server.tokens_url(&org.id))
                    .bearer_auth(&org.token)
                    .send()
                    .await
                    .expect("GET api-tokens")
                    .status()
            },
            async { readyz(&server).await.status },
        )
    })
    .await
    .expect("reads waited behind the queued writes");
    let pending = writes.iter().filter(|w| !w.is_finished()).count();
    assert_eq!(
        reads,
        (StatusCode::OK, StatusCode::OK, StatusCode::OK),
        "verify, list, readyz"
    );
    assert_eq!(
        pending,
        writes.len(),
        "the reads must answer while the writes wait"
    );

    lock.release().await;
    for write in writes {
        let status = write.await.expect("a write task").expect("a write answers");
        assert!(
            status == StatusCode::CREATED || status == StatusCode::SERVICE_UNAVAILABLE,
            "a queued write answered {status}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Rotation races

/// 16 rotations of one credential at once, on each surface: exactly one 200, whose secret works;
/// the others 409. The write lock is held while they arrive, so all of them read the same secret.
async fn of_concurrent_rotations_exactly_one_succeeds(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();

    let token = create_api_token(&server, &org, "contested").await;
    assert_eq!(token.status, StatusCode::CREATED, "{}", token.body);
    let account = create_service_account(&server, &org, "contested").await;
    assert_eq!(account.status, StatusCode::CREATED, "{}", account.body);
    let enabled = post(
        &server,
        server.url(&format!("/api/v1/organizations/{}/registry", org.id)),
        &org.token,
        json!({}),
    )
    .await;
    assert_eq!(enabled.status, StatusCode::CREATED, "{}", enabled.body);
    let robot = post(
        &server,
        server.url(&format!(
            "/api/v1/organizations/{}/registry/robot-accounts",
            org.id
        )),
        &org.token,
        json!({ "name": "contested" }),
    )
    .await;
    assert_eq!(robot.status, StatusCode::CREATED, "{}", robot.body);

    let cases = [
        (
            format!(
                "{}/{}/rotate",
                server.tokens_url(&org.id),
                token.body["id"].as_str().unwrap()
            ),
            Some(&token),
        ),
        (
            account_url(
                &server,
                &org,
                &format!(
                    "/service-accounts/{}/rotate",
                    account.body["id"].as_str().unwrap()
                ),
            ),
            Some(&account),
        ),
        (
            server.url(&format!(
                "/api/v1/organizations/{}/registry/robot-accounts/{}/rotate",
                org.id,
                robot.body["id"].as_str().unwrap()
            )),
            None,
        ),
    ];
    for (url, verifiable) in cases {
        let lock = WriteLock::hold(&store).await;
        let rotations: Vec<_> = (0..16)
            .map(|_| {
                let http = server.http.clone();
                let (url, bearer) = (url.clone(), org.token.clone());
                tokio::spawn(async move {
                    answer(
                        http.post(url)
                            .bearer_auth(bearer)
                            .send()
                            .await
                            .expect("POST rotate"),
                    )
                    .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        lock.release().await;
        let mut won = Vec::new();
        for rotation in rotations {
            let answer = rotation.await.expect("a rotation task");
            match answer.status {
                StatusCode::OK => won.push(answer.body),
                StatusCode::CONFLICT => {}
                other => panic!("{url}: a rotation answered {other}: {}", answer.body),
            }
        }
        assert_eq!(
            won.len(),
            1,
            "{url}: exactly one rotation succeeds, got {won:?}"
        );
        if let Some(created) = verifiable {
            let new_secret = won[0]["token"].as_str().expect("the rotated secret");
            assert_eq!(
                forward_auth(&server, new_secret).await,
                StatusCode::OK,
                "{url}: the winner's secret works"
            );
            let old_secret = created.body["token"].as_str().unwrap();
            assert_eq!(
                forward_auth(&server, old_secret).await,
                StatusCode::UNAUTHORIZED,
                "{url}: the old secret is dead"
            );
        }
    }
}

async fn rotating_an_expired_credential_is_a_conflict(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    let expires_at = chrono::Utc::now() + chrono::TimeDelta::seconds(2);
    let token = server
        .create_token(&org, "short-lived", &["api_tokens:read"], Some(expires_at))
        .await;
    let account = post(
        &server,
        account_url(&server, &org, "/service-accounts"),
        &org.token,
        json!({
            "name": "short-lived",
            "expires_at": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }),
    )
    .await;
    assert_eq!(account.status, StatusCode::CREATED, "{}", account.body);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let rotated = answer(
        server
            .http
            .post(format!(
                "{}/{}/rotate",
                server.tokens_url(&org.id),
                token.id
            ))
            .bearer_auth(&org.token)
            .send()
            .await
            .expect("POST rotate"),
    )
    .await;
    assert_eq!(rotated.status, StatusCode::CONFLICT, "{}", rotated.body);
    assert_eq!(
        rotated.body["error"]["code"], "conflict",
        "{}",
        rotated.body
    );
    let id = account.body["id"].as_str().unwrap();
    let rotated = post(
        &server,
        account_url(&server, &org, &format!("/service-accounts/{id}/rotate")),
        &org.token,
        json!({}),
    )
    .await;
    assert_eq!(rotated.status, StatusCode::CONFLICT, "{}", rotated.body);
    assert!(
        rotated.body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("expired"),
        "{}",
        rotated.body
    );
}

// ------------------------------------------------------------------------------------------------
// A full disk (SQLite on a small tmpfs)

/// A small tmpfs mounted over `dir`, unmounted when dropped. Tests run as root on CI; a machine
/// where mounting is impossible fails the test with a message saying so.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "this test needs to mount a small tmpfs (run it as root, as CI does): mount failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes a file until the disk refuses, and returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::StorageFull,
                    "filling the disk: {e}"
                );
                break;
            }
        }
        // The last bytes too: a 64 KiB chunk may not fit where a page would.
        while file
            .write_all(&[0u8; 512])
            .and_then(|()| file.sync_all())
            .is_ok()
        {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A background tick of the servers these tests start (`--last-used-flush-ms`): its work (prunes
/// that mostly delete nothing, a write probe while writes fail) must not pass for a write that
/// worked, and must notice when writes work again.
const TICK_FLAGS: [&str; 2] = ["--last-used-flush-ms", "100"];

/// Lets the background work run several ticks ([`TICK_FLAGS`]).
async fn past_background_ticks() {
    tokio::time::sleep(Duration::from_millis(1000)).await;
}

/// Polls `/readyz` until it says `ready` (writes work again) with no client write meanwhile (the
/// default background tick is 5 s).
async fn ready_again_by_itself(server: &Keyplane) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = readyz(server).await;
        if ready.body["status"] == "ready" {
            assert_eq!(ready.body["writes"], "ok", "{}", ready.body);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not become ready without a client write: {}",
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/readyz` still degraded, writes failing with `kind`, after background ticks.
async fn still_degraded_after_ticks(server: &Keyplane, kind: &str) {
    past_background_ticks().await;
    let ready = readyz(server).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(
        ready.body["status"], "degraded",
        "background work that wrote nothing passed for a working write: {}",
        ready.body
    );
    assert_eq!(ready.body["writes"], "failing", "{}", ready.body);
    assert_eq!(
        ready.body["last_write_failure"]["kind"], kind,
        "{}",
        ready.body
    );
}

/// The disk fills under a running server: writes answer 503 naming the full disk, `/readyz` says
/// so, verification and reads go on. A server restarted on the full disk starts (it writes
/// nothing at start) and does the same. Freeing space brings writes back by themselves, and
/// `/readyz` sees it before any client writes. (Not checked past a background tick: SQLite may
/// take writes again on the full disk by itself, reusing its WAL's space, seen here.)
#[tokio::test]
async fn a_full_disk_answers_503_and_recovers_by_itself() {
    let store = TestStore::new(Backend::Sqlite).await;
    let disk = SmallDisk::mount(&store.db.data_dir, "8m");
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    let before = server
        .create_token(&org, "before", &["api_tokens:read"], None)
        .await;
    let after_restart = server
        .create_token(&org, "after-restart", &["api_tokens:read"], None)
        .await;

    let filler = disk.fill();
    assert_aether_unavailable(&create_api_token(&server, &org, "no-room").await, "disk");
    assert_hybridbox_unavailable(
        &create_service_account(&server, &org, "no-room").await,
        "disk",
    );
    let ready = readyz(&server).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(ready.body["status"], "degraded", "{}", ready.body);
    assert_eq!(
        ready.body["last_write_failure"]["kind"], "disk full",
        "{}",
        ready.body
    );
    assert_eq!(
        forward_auth(&server, &before.secret).await,
        StatusCode::OK,
        "verification goes on"
    );

    // A restart on the full disk.
    drop(server);
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    assert_eq!(
        forward_auth(&server, &after_restart.secret).await,
        StatusCode::OK
    );
    let listed = server
        .http
        .get(server.tokens_url(&org.id))
        .bearer_auth(&org.token)
        .send()
        .await
        .expect("GET api-tokens");
    assert_eq!(listed.status(), StatusCode::OK);
    assert_aether_unavailable(
        &create_api_token(&server, &org, "still-no-room").await,
        "disk",
    );

    std::fs::remove_file(&filler).expect("free the space");
    ready_again_by_itself(&server).await;
    let created = create_api_token(&server, &org, "room-again").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let ready = readyz(&server).await;
    assert_eq!(ready.body["status"], "ready", "{}", ready.body);
    drop(server);
    drop(disk);
}

// ------------------------------------------------------------------------------------------------
// PostgreSQL: read-only, hanging, restarting

/// Makes the test's database read-only (or writable again) for every new session, and ends the
/// sessions open on it so the server's pools reconnect under the new setting.
async fn set_read_only(store: &TestStore, read_only: bool) {
    let name = database_name(&store.db.url);
    let mut admin = admin_connection().await;
    let setting = if read_only { "on" } else { "off" };
    admin
        .execute(
            format!("ALTER DATABASE {name} SET default_transaction_read_only = {setting}").as_str(),
        )
        .await
        .expect("ALTER DATABASE");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&name)
        .execute(&mut admin)
        .await
        .expect("end the database's sessions");
}

/// Writes a server sends after its store's sessions were ended: each one 503 until one is 201.
async fn create_until_created(server: &Keyplane, org: &Org, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = create_api_token(server, org, name).await;
        if answer.status == StatusCode::CREATED {
            return;
        }
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.body
        );
        assert!(answer.retry_after.is_some(), "{}", answer.body);
        assert!(
            Instant::now() < deadline,
            "writes did not recover: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// PostgreSQL turns read-only under a running server, then a server starts on it: reads and
/// verification work, writes answer 503 naming the read-only store (and `/readyz` goes on saying
/// so while background work runs); then it is writable again, which `/readyz` sees by itself.
#[tokio::test]
async fn a_read_only_postgres_serves_reads_and_refuses_writes() {
    let store = TestStore::new(Backend::Postgres).await;
    let server = Keyplane::start(&store, &TICK_FLAGS, TIMEOUT).await;
    let org = store.bootstrap_org();
    let unused = server
        .create_token(&org, "unused", &["api_tokens:read"], None)
        .await;

    set_read_only(&store, true).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The first writes may meet the ended sessions (503 too); then the read-only refusal.
        let answer = create_api_token(&server, &org, "refused").await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.body
        );
        if answer.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("read-only")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never refused as read-only: {}",
            answer.body
        );
    }
    drop(server);

    let server = Keyplane::start(&store, &TICK_FLAGS, TIMEOUT).await;
    assert_eq!(forward_auth(&server, &unused.secret).await, StatusCode::OK);
    let listed = server
        .http
        .get(server.tokens_url(&org.id))
        .bearer_auth(&org.token)
        .send()
        .await
        .expect("GET api-tokens");
    assert_eq!(listed.status(), StatusCode::OK);
    assert_aether_unavailable(
        &create_api_token(&server, &org, "refused").await,
        "read-only",
    );
    assert_hybridbox_unavailable(
        &create_service_account(&server, &org, "refused").await,
        "read-only",
    );
    still_degraded_after_ticks(&server, "read-only").await;

    set_read_only(&store, false).await;
    ready_again_by_itself(&server).await;
    create_until_created(&server, &org, "writable-again").await;
}

/// A store that stops answering (here: a lock `/readyz`'s read waits on) gets a 503 from
/// `/readyz` within about a second, not after the pool's timeout.
#[tokio::test]
async fn readyz_answers_within_a_second_when_the_store_hangs() {
    let store = TestStore::new(Backend::Postgres).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let mut holder = sqlx::PgConnection::connect(&store.db.url)
        .await
        .expect("connect");
    holder
        .execute("BEGIN; LOCK TABLE meta IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock meta");
    // The check the start-up's readiness probe made answers every caller for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    let ready = readyz(&server).await;
    let waited = started.elapsed();
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.body
    );
    assert_eq!(ready.body["reason"], "timed out", "{}", ready.body);
    assert!(
        waited < Duration::from_millis(2500),
        "/readyz took {waited:?}"
    );
    holder.execute("ROLLBACK").await.expect("unlock");
    // Once the failed check's second is over.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(readyz(&server).await.status, StatusCode::OK);
}

/// A PostgreSQL cluster of the test's own (initdb + pg_ctl on a temporary directory, a random
/// port), so that it can be restarted without touching the shared server. Stopped when dropped.
struct ThrowawayPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl ThrowawayPostgres {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries in /usr/lib/postgresql")
            .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
            .find(|bin| bin.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::Builder::new()
            .prefix("keyplane-pg-")
            .tempdir()
            .expect("create a temporary directory");
        // PostgreSQL refuses to run as root: the cluster belongs to `postgres`.
        let chown = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown the cluster directory to postgres");
        let cluster = Self {
            dir,
            bin,
            port: free_loopback_port(),
        };
        cluster.run_as_postgres(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        cluster.pg_ctl(&["start"]);
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, action: &[&str]) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        let mut args = vec![
            "-D",
            &self.data(),
            "-l",
            &log,
            "-o",
            &options,
            "-w",
            "-t",
            "30",
            "-m",
            "fast",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        args.extend(action.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run_as_postgres("pg_ctl", &args);
    }

    fn run_as_postgres(&self, program: &str, args: &[&str]) {
        let output = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .output()
            .expect("run runuser");
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// PostgreSQL restarts while writers keep writing: every write answers 201 or 503 `unavailable`
/// with `Retry-After` (never 500), and writes succeed again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_writes_answers_503_then_recovers() {
    let postgres = ThrowawayPostgres::start();
    // The data dir (for bootstrap.json) of a SQLite test store; the database is the cluster's.
    let store = TestStore::new(Backend::Sqlite).await;
    let url = postgres.url();
    let server = Keyplane::start(&store, &["--database-url", &url], TIMEOUT).await;
    let org = store.bootstrap_org();
    let client = http_client(TIMEOUT);

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // 503s seen so far: a restart that no write happened to meet (the pool replaces connections
    // that died while idle) proves nothing, so the restart is repeated until one does.
    let met = std::sync::Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let (client, url, token) = (
                client.clone(),
                server.tokens_url(&org.id),
                org.token.clone(),
            );
            let (stop, met) = (stop.clone(), met.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                for i in 0..4000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let response = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&json!({ "name": format!("w{writer}-{i}"), "scopes": [] }))
                        .send()
                        .await
                        .expect("POST api-tokens");
                    let answer = answer(response).await;
                    if answer.status == StatusCode::SERVICE_UNAVAILABLE {
                        met.fetch_add(1, Ordering::Relaxed);
                    }
                    answers.push(answer);
                }
                answers
            })
        })
        .collect();
    for restart in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| postgres.pg_ctl(&["restart"]));
        // Writes after the restart: they must succeed again by themselves.
        create_until_created(&server, &org, &format!("after-restart-{restart}")).await;
        if met.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);

    let mut unavailable = 0;
    for writer in writers {
        for answer in writer.await.expect("a writer task") {
            match answer.status {
                StatusCode::CREATED => {}
                StatusCode::SERVICE_UNAVAILABLE => {
                    unavailable += 1;
                    assert!(
                        answer.retry_after.is_some(),
                        "503 without Retry-After: {}",
                        answer.body
                    );
                    assert_eq!(
                        answer.body["error"]["code"], "unavailable",
                        "{}",
                        answer.body
                    );
                }
                other => panic!(
                    "a write during the restart answered {other}: {}",
                    answer.body
                ),
            }
        }
    }
    assert!(
        unavailable > 0,
        "no write met the restart: the test proved nothing"
    );

    // The verification endpoints answer a store outage in their own dialect.
    let unused = server
        .create_token(&org, "unused", &["api_tokens:read"], None)
        .await;
    tokio::task::block_in_place(|| postgres.pg_ctl(&["stop"]));
    let refused = answer(
        server
            .http
            .get(server.url("/v1/auth/forward"))
            .bearer_auth(&unused.secret)
            .send()
            .await
            .expect("GET /v1/auth/forward"),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert!(refused.retry_after.is_some(), "{}", refused.body);
    assert_eq!(
        refused.body["error"], "temporarily_unavailable",
        "{}",
        refused.body
    );
    tokio::task::block_in_place(|| postgres.pg_ctl(&["start"]));
    let deadline = Instant::now() + Duration::from_secs(15);
    while forward_auth(&server, &unused.secret).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "verification did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(server);
}

/// `keyplane serve` on PostgreSQL at a "database" that accepts connections and never answers,
/// once it is connecting to it: its start is past its first steps. The data directory and the
/// held connection live as long as the caller keeps them.
async fn serve_connecting_to_a_silent_store(
) -> (common::KillOnDrop, tempfile::TempDir, tokio::net::TcpStream) {
    // A "database" that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let url = format!(
        "postgres://postgres@{}/never",
        silent.local_addr().expect("its address")
    );
    let data_dir = tempfile::tempdir().expect("a temporary directory");
    let serve = common::KillOnDrop(
        common::keyplane()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &url,
                "--data-dir",
            ])
            .arg(data_dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start keyplane serve"),
    );
    let (held, _) = tokio::time::timeout(TIMEOUT, silent.accept())
        .await
        .expect("serve connects to the store in time")
        .expect("accept");
    (serve, data_dir, held)
}

/// A SIGTERM (or Ctrl-C) while the store is still connecting ends `serve` cleanly and at once: it
/// does not kill the process, nor wait for the store.
#[tokio::test]
async fn a_sigterm_while_the_store_connects_ends_serve_cleanly() {
    let (mut serve, data_dir, _held) = serve_connecting_to_a_silent_store().await;
    let pid = serve.0.id().to_string();
    let term = common::run(Command::new("kill").args(["-TERM", &pid]), TIMEOUT).await;
    assert!(term.status.success(), "{}", term.describe());

    let status = common::wait_for_exit(&mut serve.0, Duration::from_secs(5))
        .await
        .expect("serve stops within 5 s of SIGTERM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        None,
        "serve was ended by a signal: {status}"
    );
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!data_dir.path().join("bootstrap.json.pending").exists());
}

/// A SIGHUP (`logrotate`, `systemctl reload`) while the store is still connecting must not end
/// `serve`: the start goes on, and here fails on its own, with the store's error.
#[tokio::test]
async fn a_sighup_while_the_store_connects_does_not_end_serve() {
    let (mut serve, _data_dir, _held) = serve_connecting_to_a_silent_store().await;
    let pid = serve.0.id().to_string();
    let hup = common::run(Command::new("kill").args(["-HUP", &pid]), TIMEOUT).await;
    assert!(hup.status.success(), "{}", hup.describe());

    let status = common::wait_for_exit(&mut serve.0, TIMEOUT)
        .await
        .expect("serve gives up on a silent store in time");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        None,
        "serve was ended by a signal: {status}"
    );
    assert_eq!(status.code(), Some(1), "{status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(serve.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("PostgreSQL") || stderr.contains("store"),
        "{stderr}"
    );
}

/// A public revocation report answered 202 is a promise that outlives the process: SIGKILLed
/// while the report's revocation waits for the store (another connection holds `credentials`), the
/// server leaves the report stored, and the next start works it off once its lease runs out. The
/// token stops verifying, with exactly one `credential.leaked` event.
#[tokio::test]
async fn a_report_accepted_before_a_sigkill_is_worked_off_after_the_restart() {
    let store = TestStore::new(Backend::Postgres).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    let leaked = server.create_token(&org, "leaked", &[], None).await;
    let whoami = |server: &Keyplane| {
        server
            .http
            .get(server.url("/v1/whoami"))
            .bearer_auth(&leaked.secret)
            .send()
    };
    assert_eq!(whoami(&server).await.unwrap().status(), StatusCode::OK);

    let lock = WriteLock::hold(&store).await;
    let reported = server
        .http
        .post(server.url("/v1/credentials/revoke"))
        .json(&json!({ "credentials": [leaked.secret] }))
        .send()
        .await
        .expect("POST /v1/credentials/revoke");
    assert_eq!(reported.status(), StatusCode::ACCEPTED);
    // The revocation reaches the store and waits for the lock.
    let mut watcher = sqlx::PgConnection::connect(&store.db.url).await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revocation never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(server.process); // SIGKILL
    lock.release().await;

    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    // The dead process's lease (15 s) runs out first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while whoami(&server).await.unwrap().status() != StatusCode::UNAUTHORIZED {
        assert!(
            Instant::now() < deadline,
            "the accepted report was never worked off:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = server.audit_events(&org, "action=credential.leaked").await;
    assert_eq!(events.len(), 1, "{events:?}");
}
