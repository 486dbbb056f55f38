//! The HTTP edge of the real binary: many slow clients cannot starve `/healthz` or verification,
//! are closed by the timeouts, do not grow memory without bound, and cannot hold a stop past its
//! deadline; the text log cannot be forged through a client's input.

mod common;

use common::{
    both_stores, free_loopback_port, http_client, keyplane, Keyplane, KillOnDrop, TestStore,
};
use keyplane_store::testing::Backend;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(30);
/// Slow connections held at once: enough to matter, bounded so the test stays cheap.
const SLOW_CLIENTS: usize = 2000;
const PARTIAL_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: keyplane\r\nx-slow: ";

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

async fn open_slow(addr: &str, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for n in 0..count {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // Half start a head they will send byte by byte, half never send anything.
        if n % 2 == 0 {
            stream.write_all(&PARTIAL_HEAD[..1]).await.expect("write");
        }
        held.push(stream);
    }
    held
}

/// One more byte of the head on every connection that is sending one.
async fn trickle(held: &mut [TcpStream], byte: usize) {
    for stream in held.iter_mut().step_by(2) {
        let _ = stream
            .write_all(&[PARTIAL_HEAD[byte % PARTIAL_HEAD.len()]])
            .await;
    }
}

/// How many of `held` the server has closed (read sees EOF or a reset), waiting up to `limit`.
async fn closed_count(held: &mut [TcpStream], limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut closed = 0;
    let mut buffer = [0u8; 256];
    for stream in held.iter_mut() {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed += 1;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
    }
    closed
}

both_stores!(slow_clients_cannot_starve_the_server);

async fn slow_clients_cannot_starve_the_server(backend: Backend) {
    let store = TestStore::new(backend).await;
    let keyplane = Keyplane::start(
        &store,
        &[
            "--header-read-timeout-seconds",
            "3",
            "--idle-timeout-seconds",
            "3",
            "--revocation-heartbeat-seconds",
            "2",
            // The slow clients and the probes all come from 127.0.0.1: past the per-address cap
            // (its own test) a probe whose pooled connection the idle timeout closed would be
            // refused. Slow clients from many addresses are what this measures.
            "--max-connections-per-client",
            "0",
        ],
        TIMEOUT,
    )
    .await;
    let org = store.bootstrap_org();
    let pid = keyplane.process.0.id();
    let forward = || {
        keyplane
            .http
            .get(keyplane.url("/v1/auth/forward"))
            .bearer_auth(&org.token)
            .send()
    };
    assert_eq!(forward().await.unwrap().status(), 200);
    let rss_before = rss_kib(pid);

    let started = Instant::now();
    let mut held = open_slow(&keyplane.addr, SLOW_CLIENTS).await;
    let opened_in = started.elapsed();
    let mut slowest = Duration::ZERO;
    let mut byte = 1;
    // While they are held (within the header timeout), health checks and verification answer.
    while started.elapsed() < opened_in + Duration::from_millis(1500) {
        trickle(&mut held, byte).await;
        byte += 1;
        let asked = Instant::now();
        let health = keyplane
            .http
            .get(keyplane.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        assert_eq!(forward().await.unwrap().status(), 200);
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        slowest < Duration::from_secs(2),
        "slowest answer {slowest:?}"
    );
    let rss_held = rss_kib(pid);
    // A held connection costs a socket, a task and a small read buffer: a few tens of KiB.
    let per_connection = rss_held.saturating_sub(rss_before) / SLOW_CLIENTS as u64;
    assert!(
        per_connection < 64,
        "RSS grew from {rss_before} KiB to {rss_held} KiB with {SLOW_CLIENTS} slow clients"
    );
    // The header timeout closes every one of them.
    let closed = closed_count(&mut held, Duration::from_secs(8)).await;
    assert_eq!(
        closed, SLOW_CLIENTS,
        "slow connections closed by the server"
    );
    assert_eq!(forward().await.unwrap().status(), 200);
}

/// A stop with connections held open (which would never finish their requests) exits within the
/// shutdown deadline.
#[tokio::test]
async fn sigterm_with_held_connections_exits_within_the_shutdown_deadline() {
    let store = TestStore::new(Backend::Sqlite).await;
    let mut keyplane = Keyplane::start(
        &store,
        &[
            "--header-read-timeout-seconds",
            "600",
            "--idle-timeout-seconds",
            "600",
            "--shutdown-timeout-seconds",
            "2",
        ],
        TIMEOUT,
    )
    .await;
    let mut held = open_slow(&keyplane.addr, 200).await;
    trickle(&mut held, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = keyplane.process.0.id().to_string();
    let asked = Instant::now();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status = common::wait_for_exit(&mut keyplane.process.0, Duration::from_secs(10))
        .await
        .expect("keyplane exits after SIGTERM despite held connections");
    let took = asked.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "exited {took:?} after SIGTERM"
    );
    assert!(keyplane.log().contains("shutdown deadline reached"));
}

/// A client's text reaches the log (here in a refusal's cause), but it cannot start a line of its
/// own: control characters are escaped in every field of the text log.
#[tokio::test]
async fn client_input_cannot_forge_a_text_log_line() {
    let store = TestStore::new(Backend::Sqlite).await;
    let port = free_loopback_port();
    let log_path = store.db.data_dir.join("keyplane.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let _server = KillOnDrop(
        keyplane()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--log-format", "text"])
            .args(store.args())
            .env("KEYPLANE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    );
    let http = http_client(TIMEOUT);
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while http.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(started.elapsed() < TIMEOUT, "keyplane did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let org = store.bootstrap_org();
    let forged = "x\n2026-01-01T00:00:00.000000Z  INFO forged: admin logged in\r\u{1b}[2K";
    let res = http
        .get(format!("{base}/v1/auth/forward"))
        .query(&[("scope", forged)])
        .bearer_auth(&org.token)
        .header("x-request-id", "forge\tline")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let mut log = String::new();
    for _ in 0..100 {
        log = std::fs::read_to_string(&log_path).unwrap();
        if log.contains("lacks the") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        log.contains(r"x\n2026-01-01T00:00:00.000000Z  INFO forged"),
        "{log}"
    );
    assert!(log.contains(r"\r\u{1b}[2K"), "{log}");
    assert!(
        !log.lines()
            .any(|line| line.contains("INFO forged") && !line.contains("lacks the")),
        "a forged line: {log}"
    );
    assert!(!log.contains('\u{1b}') && !log.contains('\r'));
}

#[tokio::test]
async fn a_bad_trusted_proxy_range_is_refused_with_a_clear_message() {
    let store = TestStore::new(Backend::Sqlite).await;
    let output = common::run(
        keyplane()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--trusted-proxies", "10.0.0.0/8,proxy.internal"])
            .args(store.args()),
        TIMEOUT,
    )
    .await;
    assert!(!output.status.success(), "{}", output.describe());
    assert!(
        output.stderr.contains("--trusted-proxies")
            && output
                .stderr
                .contains("`proxy.internal` is not an IP address or CIDR range"),
        "{}",
        output.describe()
    );
}

/// The `keyplane_connections_open` sample in a `/metrics` answer.
fn connections_open(metrics: &str) -> u64 {
    common::metric_sample(metrics, "keyplane_connections_open")
}

/// At `--max-connections`, more connections wait for a slot: the server says so in its log (once
/// a minute at most, not once per connection), and `/metrics` counts the connections open.
#[tokio::test]
async fn the_connection_cap_is_logged_and_counted() {
    let store = TestStore::new(Backend::Sqlite).await;
    let keyplane = Keyplane::start(&store, &["--max-connections", "2"], TIMEOUT).await;
    // Over the connection the start's readiness probe left open in the client's pool.
    let metrics = |keyplane: &Keyplane| {
        let request = keyplane.http.get(keyplane.url("/metrics")).send();
        async move { request.await.expect("GET /metrics").text().await.unwrap() }
    };
    assert_eq!(connections_open(&metrics(&keyplane).await), 1);

    // The second slot; the third connection waits in the backlog with its request written.
    let held = TcpStream::connect(&keyplane.addr).await.expect("connect");
    let mut waiting = TcpStream::connect(&keyplane.addr).await.expect("connect");
    waiting
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: keyplane\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early = tokio::time::timeout(
        Duration::from_millis(1500),
        waiting.read_to_end(&mut answer),
    )
    .await;
    assert!(early.is_err(), "answered past the connection cap");
    const WARNING: &str = "connection limit reached";
    assert_eq!(
        keyplane.log().matches(WARNING).count(),
        1,
        "{}",
        keyplane.log()
    );

    // A freed slot takes the waiting connection; the cap is reached again at once, unlogged.
    drop(held);
    tokio::time::timeout(TIMEOUT, waiting.read_to_end(&mut answer))
        .await
        .expect("answered once a slot is free")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(connections_open(&answer), 2, "{answer}");
    // The log is read by a thread: give it a moment to catch up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        keyplane.log().matches(WARNING).count(),
        1,
        "{}",
        keyplane.log()
    );
}
