//! The HTTP edge: the client address behind trusted proxies, the failed-authentication limit that
//! limits failures and not people, request ids, and the connection limits and timeouts.

use crate::helpers::{both_backends, sample, test_config, TestApp};
use keyplane_server::client_addr::{ForwardedHeader, TrustedProxies};
use keyplane_server::config::HttpLimits;
use keyplane_server::{App, Config};
use keyplane_store::testing::{Backend, TestDatabase};
use reqwest::Method;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn behind_local_proxy(failed_auth_per_minute: u32) -> Config {
    Config {
        failed_auth_per_minute,
        trusted_proxies: TrustedProxies::parse(
            &["127.0.0.1/32".to_string()],
            ForwardedHeader::XForwardedFor,
        )
        .unwrap(),
        ..test_config()
    }
}

async fn get_from(app: &TestApp, path: &str, token: &str, forwarded_for: &str) -> u16 {
    app.request(Method::GET, path, Some(token))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Behind a trusted proxy each client has its own failure budget, and a client over its budget
/// still gets its requests with a valid credential the caches hold served.
async fn failures_are_counted_per_client_behind_trusted_proxies(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind_local_proxy(3)).await;
    let org = app.create_org("acme").await;
    let path = org.path("/api-tokens");
    // In use, so cached: an address over its budget gets no store lookups for what is not.
    assert_eq!(get_from(&app, &path, &org.token, "203.0.113.40").await, 200);
    // The leftmost entry is the client's own claim; the proxy appended the real address.
    let noisy = "6.6.6.6, 203.0.113.41";
    let statuses: Vec<u16> = futures_statuses(&app, &path, "aether_guess", noisy, 5).await;
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    assert_eq!(get_from(&app, &path, &org.token, noisy).await, 200);
    assert_eq!(
        get_from(&app, "/v1/auth/forward", &org.token, noisy).await,
        200
    );
    // Another client behind the same proxy is not affected at all.
    assert_eq!(
        get_from(&app, &path, "aether_guess", "203.0.113.42").await,
        401
    );
    assert_eq!(get_from(&app, &path, &org.token, "203.0.113.42").await, 200);
    let log = crate::logs::captured();
    assert!(log.contains("client.ip=203.0.113.41"), "{log}");
    assert!(!log.contains("client.ip=6.6.6.6"));
}

/// An IPv6 client can take a new address from its /64 for every request: the budget is the /64's.
async fn an_ipv6_client_is_counted_by_its_64(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind_local_proxy(3)).await;
    let org = app.create_org("acme").await;
    let path = org.path("/api-tokens");
    let mut statuses = Vec::new();
    for host in 1..=5 {
        let address = format!("2001:db8:7:1::{host:x}");
        statuses.push(get_from(&app, &path, "aether_guess", &address).await);
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    // The next /64 is someone else.
    assert_eq!(
        get_from(&app, &path, "aether_guess", "2001:db8:7:2::1").await,
        401
    );
}

async fn futures_statuses(
    app: &TestApp,
    path: &str,
    token: &str,
    forwarded_for: &str,
    count: usize,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..count {
        statuses.push(get_from(app, path, token, forwarded_for).await);
    }
    statuses
}

/// Without trusted proxies, a client cannot pick its own address: every forged
/// `X-Forwarded-For` is charged to the TCP peer.
async fn forwarding_headers_of_untrusted_peers_are_ignored(backend: Backend) {
    let config = Config {
        failed_auth_per_minute: 3,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let path = org.path("/api-tokens");
    let mut statuses = Vec::new();
    for n in 0..4 {
        statuses.push(get_from(&app, &path, "aether_guess", &format!("198.51.100.{n}")).await);
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
    assert!(!crate::logs::captured().contains("client.ip=198.51.100."));
}

/// An authenticated caller holding `tokens:verify` that introspects revoked, unknown or malformed
/// tokens gets `{"active": false}` every time, however many: an embedded verifier re-checks
/// revoked tokens as its job, and secrets are not guessable. Its address's 401s still count.
async fn inactive_introspections_are_not_failures_of_the_caller(backend: Backend) {
    let budget = 3;
    let config = Config {
        failed_auth_per_minute: budget,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let verifier = app.create_token(&org, "verifier", &["tokens:verify"]).await;
    let verifier = verifier["token"].as_str().unwrap();
    let revoked = app.create_token(&org, "revoked", &["deploy"]).await;
    let revoked_path = org.path(&format!("/api-tokens/{}", revoked["id"].as_str().unwrap()));
    assert_eq!(app.delete(&revoked_path, &org.token).await.status(), 204);
    let revoked = revoked["token"].as_str().unwrap().to_string();
    let unknown = keyplane_core::token::mint(
        keyplane_core::CredentialKind::ApiToken,
        &mut rand::rngs::OsRng,
    )
    .plaintext
    .expose_secret()
    .to_string();
    let introspect = |token: String| {
        app.request(Method::POST, "/oauth2/introspect", Some(verifier))
            .form(&[("token", token)])
            .send()
    };
    // Ten times the budget, of each kind.
    for n in 0..budget * 10 {
        for token in [
            revoked.clone(),
            unknown.clone(),
            format!("aether_unknown{n}"),
        ] {
            let res = introspect(token).await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(
                res.json::<Value>().await.unwrap(),
                serde_json::json!({"active": false})
            );
        }
    }
    let res = introspect(org.token.clone()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["active"], true);

    // The same address's failed authentications are still limited, on introspection too.
    let mut statuses = Vec::new();
    for _ in 0..budget {
        let res = app
            .request(Method::POST, "/oauth2/introspect", Some("aether_guess"))
            .form(&[("token", org.token.as_str())])
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    let res = app.get(&org.path("/api-tokens"), "aether_guess").await;
    statuses.push(res.status().as_u16());
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(statuses, [401, 401, 401, 429]);
    // And its valid calls are still served.
    let res = introspect(revoked.clone()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(app.get("/v1/auth/forward", verifier).await.status(), 200);
}

both_backends!(
    failures_are_counted_per_client_behind_trusted_proxies,
    an_ipv6_client_is_counted_by_its_64,
    forwarding_headers_of_untrusted_peers_are_ignored,
    inactive_introspections_are_not_failures_of_the_caller,
);

#[tokio::test]
async fn request_ids_are_kept_only_when_short_and_plain() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let echoed = |id: String| {
        let request = app.request(Method::GET, "/healthz", None);
        let id = reqwest::header::HeaderValue::from_bytes(id.as_bytes()).unwrap();
        async move {
            let res = request.header("x-request-id", id).send().await.unwrap();
            assert_eq!(res.status(), 200);
            res.headers()["x-request-id"].to_str().unwrap().to_string()
        }
    };
    for plain in [
        "abc-123".to_string(),
        "trace:01HZX.span_9".to_string(),
        "a".repeat(128),
    ] {
        assert_eq!(echoed(plain.clone()).await, plain);
    }
    for bad in [
        "a".repeat(129),
        "has space".to_string(),
        "quote\"d".to_string(),
        "<script>".to_string(),
        "café".to_string(),
        "line\tbreak".to_string(),
    ] {
        let replaced = echoed(bad.clone()).await;
        assert_ne!(replaced, bad);
        assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
    }
    let res = app
        .request(Method::GET, "/healthz", None)
        .send()
        .await
        .unwrap();
    assert!(uuid::Uuid::parse_str(res.headers()["x-request-id"].to_str().unwrap()).is_ok());
}

/// A server with `limits`, and the handle that stops it.
struct LimitedServer {
    address: String,
    /// A `*` token of org `acme`.
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    _db: TestDatabase,
}

impl LimitedServer {
    async fn start(limits: HttpLimits) -> Self {
        Self::start_with(Config {
            http: limits,
            ..test_config()
        })
        .await
    }

    async fn start_with(config: Config) -> Self {
        crate::logs::capture();
        let db = TestDatabase::new(Backend::Sqlite).await;
        let store = keyplane_store::connect(&db.url).await.unwrap();
        let org =
            keyplane_server::ops::create_org(store.as_ref(), "acme", &crate::helpers::operator())
                .await
                .unwrap();
        let token = org.token.secret.expose_secret().to_string();
        let app = App::new(store, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(keyplane_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        Self {
            address,
            token,
            stop: Some(stop),
            served,
            _db: db,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(&self.address).await.unwrap()
    }

    /// The `/metrics` exposition, fetched from 127.0.0.3: an address of its own, which no cap
    /// 127.0.0.1 reached holds back.
    async fn metrics(&self) -> String {
        reqwest::Client::builder()
            .local_address("127.0.0.3".parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
            .get(format!("http://{}/metrics", self.address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A connection from `source`, another loopback address than 127.0.0.1.
    async fn connect_from(&self, source: &str) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(self.address.parse().unwrap()).await.unwrap()
    }
}

fn limits() -> HttpLimits {
    HttpLimits {
        header_read_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(3),
        max_header_bytes: 4096,
        max_connections: 100,
        max_connections_per_client: 0,
        shutdown_timeout: Duration::from_secs(2),
    }
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: keyplane\r\n\r\n";

/// Reads one response head (and what came with it), or `None` if the server closed the
/// connection first; bounded by `limit`.
async fn read_response(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut buffer = vec![0u8; 8192];
    match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
        Ok(Ok(0)) | Ok(Err(_)) => None,
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buffer[..n]).into_owned()),
        Err(_) => panic!("no answer and no close within {limit:?}"),
    }
}

/// Waits (bounded) for the server to close `stream`, discarding anything it sends first.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buffer = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_is_cut_off() {
    let server = LimitedServer::start(limits()).await;
    // Never sends anything.
    let mut silent = server.connect().await;
    // Sends its head byte by byte, slower than the header timeout allows.
    let mut trickling = server.connect().await;
    let started = Instant::now();
    let trickle = async {
        for byte in HEALTH.iter().take(20) {
            if trickling.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    trickle.await;
    assert!(closed_within(&mut trickling, Duration::from_secs(3)).await);
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A prompt client is served meanwhile.
    let mut prompt = server.connect().await;
    prompt.write_all(HEALTH).await.unwrap();
    let answer = read_response(&mut prompt, Duration::from_secs(5)).await;
    assert!(answer.unwrap().starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn idle_kept_alive_connections_are_closed_after_the_idle_timeout() {
    let server = LimitedServer::start(limits()).await;
    let mut stream = server.connect().await;
    stream.write_all(HEALTH).await.unwrap();
    let first = read_response(&mut stream, Duration::from_secs(5)).await;
    assert!(first.unwrap().starts_with("HTTP/1.1 200"));
    // Idle longer than the header timeout but within the idle one: still open.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    stream.write_all(HEALTH).await.unwrap();
    let second = read_response(&mut stream, Duration::from_secs(5)).await;
    assert!(second.unwrap().starts_with("HTTP/1.1 200"));
    let idle_from = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(6)).await);
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(2500), "closed after {idle:?}");
}

/// Asks for `/healthz` on `stream` until `busy` has passed, `pause` between answers, each 200.
async fn ask_health_for(stream: &mut TcpStream, busy: Duration, pause: Duration) {
    let busy_from = Instant::now();
    while busy_from.elapsed() < busy {
        stream.write_all(HEALTH).await.unwrap();
        let answer = read_response(stream, Duration::from_secs(5)).await;
        assert!(answer.unwrap().starts_with("HTTP/1.1 200"));
        tokio::time::sleep(pause).await;
    }
}

/// The watchdog keeps watching a connection it has seen busy for longer than its timeouts:
/// after many requests, an idle spell and then a slow head are each still cut off in time.
#[tokio::test]
async fn a_busy_connection_is_still_watched_when_it_falls_idle_or_slows_down() {
    let server = LimitedServer::start(limits()).await;
    let mut stream = server.connect().await;
    // 4 s of requests: past the idle timeout (3 s) and the header timeout (1 s).
    ask_health_for(
        &mut stream,
        Duration::from_secs(4),
        Duration::from_millis(50),
    )
    .await;
    let idle_from = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(6)).await);
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(2500) && idle < Duration::from_millis(4500),
        "closed after {idle:?} idle"
    );

    let mut stream = server.connect().await;
    ask_health_for(&mut stream, Duration::from_secs(2), Duration::ZERO).await;
    // Half a head, then nothing: due within the header timeout (1 s), not the idle one.
    stream.write_all(&HEALTH[..10]).await.unwrap();
    let slow_from = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(6)).await);
    let slow = slow_from.elapsed();
    assert!(slow < Duration::from_millis(2500), "closed after {slow:?}");
}

#[tokio::test]
async fn a_request_body_sent_too_slowly_is_cut_off() {
    let server = LimitedServer::start(limits()).await;
    let mut stream = server.connect().await;
    let started = Instant::now();
    // A valid caller, so the body is what the server waits for.
    let head = format!(
        "POST /oauth2/introspect HTTP/1.1\r\nhost: keyplane\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{",
        server.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..30 {
        if stream.write_all(b" ").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_millis(2500) {
            break;
        }
    }
    assert!(closed_within(&mut stream, Duration::from_secs(3)).await);
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test]
async fn an_oversized_request_head_is_refused_with_431() {
    let server = LimitedServer::start(limits()).await;
    let mut stream = server.connect().await;
    let head = format!(
        "GET /healthz HTTP/1.1\r\nhost: keyplane\r\nx-padding: {}\r\n\r\n",
        "a".repeat(5000)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_response(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.unwrap().starts_with("HTTP/1.1 431"));
}

#[tokio::test]
async fn connections_past_the_limit_wait_for_a_free_slot() {
    let server = LimitedServer::start(HttpLimits {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(30),
        ..limits()
    })
    .await;
    let held = [server.connect().await, server.connect().await];
    let mut third = server.connect().await;
    third.write_all(HEALTH).await.unwrap();
    let mut buffer = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buffer)).await;
    assert!(waited.is_err(), "served past the connection limit");
    drop(held);
    let answer = read_response(&mut third, Duration::from_secs(5)).await;
    assert!(answer.unwrap().starts_with("HTTP/1.1 200"));
    // Counted each time every slot is taken (once so far, or again if the scrape's own
    // connection took the last one): a sign for whoever missed the log line.
    let reached = sample(
        &server.metrics().await,
        "keyplane_connection_limit_reached_total",
    );
    assert!(reached >= 1, "the limit was reached {reached} times");
    // A wait is not a refusal.
    assert_eq!(
        sample(
            &server.metrics().await,
            r#"keyplane_connections_refused_total{reason="max_connections_per_client"}"#
        ),
        0
    );
}

/// Whether `stream` is served: `/healthz` answers 200 on it.
async fn served(stream: &mut TcpStream) -> bool {
    if stream.write_all(HEALTH).await.is_err() {
        return false;
    }
    read_response(stream, Duration::from_secs(5))
        .await
        .is_some_and(|answer| answer.starts_with("HTTP/1.1 200"))
}

/// One address cannot hold every connection slot: past its share its new connections are closed
/// at once (they do not wait, so they hold nothing), while other addresses are served and the
/// address gets its slots back as its connections close. A trusted proxy, whose connections
/// carry many clients, is not held to the cap.
#[tokio::test]
async fn one_address_cannot_hold_every_connection_slot() {
    let capped = HttpLimits {
        max_connections_per_client: 2,
        header_read_timeout: Duration::from_secs(30),
        ..limits()
    };
    let server = LimitedServer::start(capped.clone()).await;
    let mut held = vec![server.connect().await, server.connect().await];
    let refused = r#"keyplane_connections_refused_total{reason="max_connections_per_client"}"#;
    assert_eq!(sample(&server.metrics().await, refused), 0);
    let mut past_the_cap = server.connect().await;
    assert!(
        !served(&mut past_the_cap).await,
        "a third connection from 127.0.0.1 was served"
    );
    // Counted before it was closed, so the close seen means counted.
    assert_eq!(sample(&server.metrics().await, refused), 1);
    let mut other = server.connect_from("127.0.0.2").await;
    assert!(served(&mut other).await, "another address is served");
    // The held ones are served (they were admitted), and once one closes its slot is free again.
    assert!(served(&mut held[0]).await);
    held.pop();
    let server = &server;
    crate::helpers::eventually("127.0.0.1 gets a slot back", || async move {
        served(&mut server.connect().await).await
    })
    .await;

    let behind_proxy = LimitedServer::start_with(Config {
        http: capped,
        trusted_proxies: TrustedProxies::parse(
            &["127.0.0.1/32".to_string()],
            ForwardedHeader::XForwardedFor,
        )
        .unwrap(),
        ..test_config()
    })
    .await;
    let mut proxied = Vec::new();
    for _ in 0..4 {
        proxied.push(behind_proxy.connect().await);
    }
    for (n, stream) in proxied.iter_mut().enumerate() {
        assert!(served(stream).await, "the trusted proxy's connection {n}");
    }
    assert_eq!(sample(&behind_proxy.metrics().await, refused), 0);
}

#[tokio::test]
async fn a_stop_closes_held_connections_at_the_shutdown_deadline() {
    let mut server = LimitedServer::start(HttpLimits {
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(60),
        shutdown_timeout: Duration::from_secs(1),
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut stream = server.connect().await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhos")
            .await
            .unwrap();
        held.push(stream);
    }
    // An idle kept-alive connection closes at once on a stop.
    let mut idle = server.connect().await;
    idle.write_all(HEALTH).await.unwrap();
    assert!(read_response(&mut idle, Duration::from_secs(5))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = Instant::now();
    server.stop.take().unwrap().send(()).unwrap();
    assert!(closed_within(&mut idle, Duration::from_millis(800)).await);
    tokio::time::timeout(Duration::from_secs(4), &mut server.served)
        .await
        .expect("serve returns after the shutdown deadline")
        .unwrap()
        .unwrap();
    let took = stopping.elapsed();
    assert!(took >= Duration::from_millis(900), "stopped after {took:?}");
    for stream in &mut held {
        assert!(closed_within(stream, Duration::from_secs(1)).await);
    }
}
