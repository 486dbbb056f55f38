//! `keyplane serve --tls-cert --tls-key`: the real binary with a certificate made here (rcgen),
//! clients that trust exactly its CA, TLS 1.2 and 1.3 each pinned, HTTP/2 and HTTP/1.1 by ALPN,
//! a reload while a connection stays open, and a pair that does not belong together.

mod common;

use common::{both_stores, keyplane, run, Keyplane, TestStore};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyplane_store::testing::Backend;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const LIMIT: Duration = Duration::from_secs(20);

/// A CA made for one test, and the server certificates it signs.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

/// A server certificate (for `localhost` and 127.0.0.1) and its key, as PEM files.
struct Leaf {
    der: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
}

impl Authority {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("self-sign the CA");
        Self {
            issuer,
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    fn leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
            .expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        let (cert_path, key_path) = (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        Leaf {
            der: cert.der().clone(),
            cert: cert_path,
            key: key_path,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A rustls client that trusts this CA only, speaking exactly `version` and offering `alpn`.
    fn client(
        &self,
        version: &'static rustls::SupportedProtocolVersion,
        alpn: &[u8],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("trust the CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("a protocol version")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// reqwest trusting this CA only (not the system's roots).
    fn reqwest(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.issuer.pem().as_bytes()).expect("CA PEM");
        reqwest::Client::builder()
            .no_proxy()
            .timeout(LIMIT)
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .expect("an HTTPS client")
    }
}

fn tls_args(leaf: &Leaf) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        leaf.cert.display().to_string(),
        "--tls-key".into(),
        leaf.key.display().to_string(),
    ]
}

async fn start(store: &TestStore, leaf: &Leaf) -> Keyplane {
    let args = tls_args(leaf);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Keyplane::start(store, &args, LIMIT).await
}

async fn connect(
    server: &Keyplane,
    connector: &tokio_rustls::TlsConnector,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(&server.addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("a server name");
    tokio::time::timeout(LIMIT, connector.connect(name, tcp))
        .await
        .expect("the handshake finishes in time")
        .expect("the handshake succeeds with the trusted CA")
}

/// Reads a whole response body.
async fn body_of(mut body: Incoming) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame.expect("a body frame").into_data() {
            out.extend_from_slice(&data);
        }
    }
    out
}

/// An HTTP/1.1 connection over `stream`, kept open for several requests.
async fn http1(stream: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<String> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

async fn get_http1(
    sender: &mut hyper::client::conn::http1::SendRequest<String>,
    path: &str,
) -> (u16, hyper::Version, Vec<u8>) {
    let request = hyper::Request::get(path)
        .header("host", "localhost")
        .body(String::new())
        .expect("a request");
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let (status, version) = (response.status().as_u16(), response.version());
    (status, version, body_of(response.into_body()).await)
}

async fn get_http2(stream: TlsStream<TcpStream>, path: &str) -> (u16, hyper::Version, Vec<u8>) {
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let request = hyper::Request::get(format!("https://localhost{path}"))
        .body(String::new())
        .expect("a request");
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let (status, version) = (response.status().as_u16(), response.version());
    (status, version, body_of(response.into_body()).await)
}

both_stores!(serves_tls_1_2_and_1_3_with_http2_and_http1_by_alpn);

async fn serves_tls_1_2_and_1_3_with_http2_and_http1_by_alpn(backend: Backend) {
    let store = TestStore::new(backend).await;
    let ca = Authority::new();
    let leaf = ca.leaf("server");
    let server = start(&store, &leaf).await;

    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let stream = connect(&server, &ca.client(version, b"h2")).await;
        let (_, session) = stream.get_ref();
        assert_eq!(session.protocol_version(), Some(version.version));
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(session.peer_certificates(), Some(&[leaf.der.clone()][..]));
        let (status, http, body) = get_http2(stream, "/readyz").await;
        assert_eq!(
            (status, http),
            (200, hyper::Version::HTTP_2),
            "{version:?} h2"
        );
        assert!(String::from_utf8_lossy(&body).contains("ready"), "{body:?}");

        let stream = connect(&server, &ca.client(version, b"http/1.1")).await;
        let (_, session) = stream.get_ref();
        assert_eq!(session.protocol_version(), Some(version.version));
        assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
        let mut sender = http1(stream).await;
        let (status, http, _) = get_http1(&mut sender, "/readyz").await;
        assert_eq!(
            (status, http),
            (200, hyper::Version::HTTP_11),
            "{version:?} http/1.1"
        );
    }

    // An ordinary HTTPS client that trusts only this CA, on the API itself.
    let org = store.bootstrap_org();
    let https = ca.reqwest();
    let whoami = https
        .get(format!("https://localhost:{}/v1/whoami", port_of(&server)))
        .bearer_auth(&org.token)
        .send()
        .await
        .expect("GET /v1/whoami over HTTPS");
    assert_eq!(whoami.status(), 200);
    // The same port does not answer plain HTTP.
    let plain = common::http_client(LIMIT)
        .get(format!("http://{}/healthz", server.addr))
        .send()
        .await;
    assert!(
        plain.map(|r| r.status().as_u16()).unwrap_or(0) != 200,
        "plain HTTP must not be served on a TLS port"
    );
}

fn port_of(server: &Keyplane) -> &str {
    server.addr.rsplit(':').next().expect("a port")
}

/// Replaces the files `server` was started with by `leaf`'s contents (the paths stay the same).
fn install(target: &Leaf, leaf: &Leaf) {
    // The key first: while only one file is new, a reload fails and the old pair keeps serving.
    std::fs::copy(&leaf.key, &target.key).expect("replace the key");
    std::fs::copy(&leaf.cert, &target.cert).expect("replace the certificate");
}

async fn peer_certificate(server: &Keyplane, ca: &Authority) -> CertificateDer<'static> {
    let stream = connect(server, &ca.client(&rustls::version::TLS13, b"http/1.1")).await;
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .clone()
}

/// Polls until new connections are served `expected`, for at most `limit`.
async fn wait_for_certificate(server: &Keyplane, ca: &Authority, expected: &Leaf, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if peer_certificate(server, ca).await == expected.der {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "new connections still get the old certificate after {limit:?}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replacement that keeps each file's size and modification time, as `rsync -a` makes it (a
/// new file with the old time, renamed over the old one), is noticed too.
#[tokio::test]
async fn notices_a_replacement_that_keeps_size_and_modification_time() {
    let store = TestStore::new(Backend::Sqlite).await;
    let ca = Authority::new();
    let first = ca.leaf("server");
    let server = start(&store, &first).await;
    let size = |path: &Path| std::fs::metadata(path).expect("metadata").len();
    // ECDSA signatures vary by a byte or two in length: make leaves until one has the same sizes.
    let second = (0..200)
        .map(|i| ca.leaf(&format!("same-size-{i}")))
        .find(|leaf| size(&leaf.cert) == size(&first.cert) && size(&leaf.key) == size(&first.key))
        .expect("a leaf with the same file sizes");
    // Served (so loaded) before the files change.
    assert_eq!(peer_certificate(&server, &ca).await, first.der);
    for (new, old) in [(&second.key, &first.key), (&second.cert, &first.cert)] {
        let modified = std::fs::metadata(old)
            .and_then(|m| m.modified())
            .expect("mtime");
        std::fs::File::options()
            .write(true)
            .open(new)
            .and_then(|file| file.set_modified(modified))
            .expect("keep the old modification time");
        std::fs::rename(new, old).expect("rename over the old file");
    }
    wait_for_certificate(&server, &ca, &second, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn reloads_the_certificate_while_connections_stay_open() {
    let store = TestStore::new(Backend::Sqlite).await;
    let ca = Authority::new();
    let first = ca.leaf("server");
    let second = ca.leaf("second");
    let server = start(&store, &first).await;

    let stream = connect(&server, &ca.client(&rustls::version::TLS13, b"http/1.1")).await;
    assert_eq!(
        stream.get_ref().1.peer_certificates().unwrap()[0],
        first.der
    );
    let mut kept = http1(stream).await;
    assert_eq!(get_http1(&mut kept, "/healthz").await.0, 200);
    let h2_stream = connect(&server, &ca.client(&rustls::version::TLS13, b"h2")).await;
    let (mut kept_h2, h2_connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2_stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(h2_connection);

    // Changed files are picked up (polled every second) without a restart.
    install(&first, &second);
    wait_for_certificate(&server, &ca, &second, Duration::from_secs(10)).await;

    // The connections opened before keep working, on the certificate they began with.
    assert_eq!(get_http1(&mut kept, "/healthz").await.0, 200);
    let response = kept_h2
        .send_request(
            hyper::Request::get("https://localhost/healthz")
                .body(String::new())
                .unwrap(),
        )
        .await
        .expect("the open HTTP/2 connection still answers");
    assert_eq!(response.status(), 200);

    // A key that does not match is refused at reload: the last good pair keeps serving.
    let third = ca.leaf("third");
    std::fs::copy(&third.cert, &first.cert).expect("replace the certificate only");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("not reloaded") {
        assert!(
            Instant::now() < deadline,
            "no reload error logged:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(peer_certificate(&server, &ca).await, second.der);
    assert!(
        server.log().contains("does not belong to the certificate"),
        "{}",
        server.log()
    );

    // Once the matching key arrives, the pair loads.
    std::fs::copy(&third.key, &first.key).expect("replace the key");
    wait_for_certificate(&server, &ca, &third, Duration::from_secs(10)).await;
    assert_eq!(get_http1(&mut kept, "/healthz").await.0, 200);
}

/// With the checks off (`--tls-check-seconds 0`), changed files are read on SIGHUP only.
#[tokio::test]
async fn reloads_on_sighup() {
    let store = TestStore::new(Backend::Sqlite).await;
    let ca = Authority::new();
    let first = ca.leaf("server");
    let second = ca.leaf("second");
    let server = start_with(&store, &first, &["--tls-check-seconds", "0"]).await;

    // Served (so loaded) before the files change.
    assert_eq!(peer_certificate(&server, &ca).await, first.der);
    install(&first, &second);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        peer_certificate(&server, &ca).await,
        first.der,
        "with the checks off, changed files are not read before SIGHUP\n{}",
        server.log()
    );
    signal(&server, "-HUP").await;
    wait_for_certificate(&server, &ca, &second, Duration::from_secs(10)).await;
}

async fn start_fails(store: &TestStore, cert: &Path, key: &Path) -> String {
    let output = run(
        keyplane()
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(store.args())
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key),
        LIMIT,
    )
    .await;
    assert!(!output.status.success(), "{}", output.describe());
    let lines: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one clear line: {}", output.describe());
    lines[0].to_string()
}

#[tokio::test]
async fn a_bad_or_mismatched_pair_stops_the_start_with_one_line() {
    let store = TestStore::new(Backend::Sqlite).await;
    let ca = Authority::new();
    let (one, two) = (ca.leaf("one"), ca.leaf("two"));

    let line = start_fails(&store, &one.cert, &two.key).await;
    assert!(
        line.starts_with("error: --tls-cert / --tls-key: the private key in")
            && line.contains("does not belong to the certificate in"),
        "{line}"
    );
    let missing = ca.path("missing.crt");
    let line = start_fails(&store, &missing, &one.key).await;
    assert!(
        line.contains("cannot read") && line.contains("missing.crt"),
        "{line}"
    );
    let line = start_fails(&store, &one.key, &one.key).await;
    assert!(line.contains("holds no PEM certificate"), "{line}");
    let line = start_fails(&store, &one.cert, &one.cert).await;
    assert!(line.contains("holds no PEM private key"), "{line}");
    // The key never appears in a message.
    let key_text = std::fs::read_to_string(&one.key).unwrap();
    let body = key_text.lines().nth(1).unwrap();
    assert!(!line.contains(body));
    // Nothing was bootstrapped: the start stopped before touching the store.
    assert!(!store.data_dir_has("bootstrap.json"));
}

/// Sends `server` a signal (`kill`'s option: `-HUP`).
async fn signal(server: &Keyplane, signal: &str) {
    let pid = server.process.0.id().to_string();
    let kill = run(
        std::process::Command::new("kill").args([signal, &pid]),
        LIMIT,
    )
    .await;
    assert!(kill.status.success(), "{}", kill.describe());
}

/// Stops `server` (SIGTERM); it must exit, successfully, within `within`.
async fn stop(server: &mut Keyplane, within: Duration) {
    signal(server, "-TERM").await;
    let status = common::wait_for_exit(&mut server.process.0, within)
        .await
        .unwrap_or_else(|| {
            panic!(
                "serve still runs {within:?} after SIGTERM:\n{}",
                server.log()
            )
        });
    assert!(status.success(), "{status}");
}

/// The revocation stream over HTTP/2 with TLS; a stop ends it at once rather than waiting for
/// the shutdown deadline.
#[tokio::test]
async fn revocation_stream_over_http2_ends_when_the_server_stops() {
    let store = TestStore::new(Backend::Sqlite).await;
    let ca = Authority::new();
    let leaf = ca.leaf("server");
    let mut server = start(&store, &leaf).await;
    let org = store.bootstrap_org();

    let stream = connect(&server, &ca.client(&rustls::version::TLS13, b"h2")).await;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let request = hyper::Request::get("https://localhost/v1/revocations/stream")
        .header("authorization", format!("Bearer {}", org.token))
        .body(String::new())
        .unwrap();
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut text = String::new();
    while !text.contains("event: ready") {
        let frame = tokio::time::timeout(
            LIMIT,
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)),
        )
        .await
        .expect("the ready event in time")
        .expect("the stream stays open")
        .expect("a frame");
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }

    // The default shutdown deadline is 20 s: an open stream must not hold the stop that long.
    stop(&mut server, Duration::from_secs(5)).await;
    let ended = tokio::time::timeout(LIMIT, async {
        while let Some(Ok(_)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends with the server");
}

/// `start` with more arguments after the certificate's.
async fn start_with(store: &TestStore, leaf: &Leaf, extra: &[&str]) -> Keyplane {
    let mut args = tls_args(leaf);
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Keyplane::start(store, &args, LIMIT).await
}

/// `start_with` on a new SQLite store, with a certificate from a new CA (kept: it holds the
/// certificate's files).
async fn tls_server(extra: &[&str]) -> (TestStore, Authority, Keyplane) {
    let store = TestStore::new(Backend::Sqlite).await;
    let ca = Authority::new();
    let leaf = ca.leaf("server");
    let server = start_with(&store, &leaf, extra).await;
    (store, ca, server)
}

/// An HTTP/2 client (the `h2` crate: it can cancel a stream and ping) over TLS; the connection is
/// driven by a task that ends when the server closes it.
async fn h2_client(
    server: &Keyplane,
    ca: &Authority,
) -> (
    h2::client::SendRequest<hyper::body::Bytes>,
    h2::PingPong,
    tokio::task::JoinHandle<()>,
) {
    let stream = connect(server, &ca.client(&rustls::version::TLS13, b"h2")).await;
    let (client, mut connection) = h2::client::handshake(stream)
        .await
        .expect("HTTP/2 handshake");
    let pings = connection.ping_pong().expect("the connection's pinger");
    let driven = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, pings, driven)
}

/// SQLite's write lock on `store`, held until dropped: a request that writes waits meanwhile.
async fn write_lock(store: &TestStore) -> sqlx::SqliteConnection {
    use sqlx::{Connection, Executor};
    let mut lock = sqlx::SqliteConnection::connect(&store.db.url)
        .await
        .expect("open the SQLite database");
    lock.execute("BEGIN EXCLUSIVE")
        .await
        .expect("take SQLite's write lock");
    lock
}

/// Sends a request creating an API token in `org`, head and body.
fn create_token(
    client: &mut h2::client::SendRequest<hyper::body::Bytes>,
    org: &common::Org,
) -> (
    h2::client::ResponseFuture,
    h2::SendStream<hyper::body::Bytes>,
) {
    let body = br#"{"name":"over-http2","scopes":[]}"#;
    let request = hyper::Request::post(format!(
        "https://localhost/api/v1/organizations/{}/api-tokens",
        org.id
    ))
    .header("authorization", format!("Bearer {}", org.token))
    .header("content-type", "application/json")
    .header("content-length", body.len().to_string())
    .body(())
    .unwrap();
    let (response, mut sending) = client.send_request(request, false).expect("send the head");
    sending
        .send_data(hyper::body::Bytes::from_static(body), true)
        .expect("send the body");
    (response, sending)
}

/// A stop answers the HTTP/2 requests in flight: their connection, told GOAWAY, is not closed
/// under them a second later.
#[tokio::test]
async fn a_stop_answers_the_http2_requests_in_flight() {
    let (store, ca, mut server) = tls_server(&[]).await;
    let lock = write_lock(&store).await;
    let (mut client, _pings, _driven) = h2_client(&server, &ca).await;
    let (response, _sending) = create_token(&mut client, &store.bootstrap_org());
    // The handler now waits for the write lock, past the stop's GOAWAY and a second more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&server, "-TERM").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(lock);

    let response = tokio::time::timeout(LIMIT, response)
        .await
        .expect("an answer in time")
        .unwrap_or_else(|e| panic!("no answer ({e}):\n{}", server.log()));
    assert_eq!(response.status(), 201);
    let status = common::wait_for_exit(&mut server.process.0, LIMIT)
        .await
        .expect("serve exits after its last request");
    assert!(status.success(), "{status}");
}

/// A request the client cancels (`RST_STREAM`) while its handler waits (here: on the store's
/// write lock) leaves the connection to its idle timeout: HTTP/2 drops the handler's future, and
/// cancelling must not pin a connection (and its slot) open.
#[tokio::test]
async fn a_cancelled_http2_request_leaves_its_connection_to_the_idle_timeout() {
    let (store, ca, server) = tls_server(&[
        "--idle-timeout-seconds",
        "2",
        "--revocation-heartbeat-seconds",
        "1",
    ])
    .await;
    let lock = write_lock(&store).await;
    let (mut client, _pings, driven) = h2_client(&server, &ca).await;
    let (_response, mut sending) = create_token(&mut client, &store.bootstrap_org());
    // The handler now waits for the write lock; the client gives up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sending.send_reset(h2::Reason::CANCEL);
    drop(lock);

    let closed = tokio::time::timeout(Duration::from_secs(10), driven).await;
    assert!(
        closed.is_ok(),
        "an idle connection was still open 10 s after its only request was cancelled \
         (idle timeout: 2 s)\n{}",
        server.log()
    );
    drop(client);
}

/// An idle HTTP/2 connection closed by the server is told so first (GOAWAY, no error), so the
/// client knows no request of its was lost and opens a new connection for the next.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_a_goaway() {
    let (_store, ca, server) = tls_server(&[
        "--idle-timeout-seconds",
        "2",
        "--revocation-heartbeat-seconds",
        "1",
        "--header-read-timeout-seconds",
        "1",
    ])
    .await;
    let (mut client, _pings, driven) = h2_client(&server, &ca).await;
    h2_get(&mut client, "/healthz").await;

    let closed = tokio::time::timeout(Duration::from_secs(10), driven).await;
    assert!(
        closed.is_ok(),
        "the idle connection was still open after 10 s"
    );
    let refused = std::future::poll_fn(|cx| client.poll_ready(cx))
        .await
        .expect_err("the connection is closed");
    assert!(
        refused.is_go_away() && refused.reason() == Some(h2::Reason::NO_ERROR),
        "closed without a GOAWAY: {refused:?}"
    );
}

/// The revocation stream over HTTP/2 stays open past the header-read and idle timeouts while the
/// client sends frames (pings, window updates) and the server its heartbeats.
#[tokio::test]
async fn an_http2_revocation_stream_outlives_the_timeouts_while_frames_flow() {
    let (store, ca, server) = tls_server(&[
        "--header-read-timeout-seconds",
        "1",
        "--idle-timeout-seconds",
        "2",
        "--revocation-heartbeat-seconds",
        "1",
    ])
    .await;
    let org = store.bootstrap_org();
    let (mut client, mut pings, driven) = h2_client(&server, &ca).await;

    let request = hyper::Request::get("https://localhost/v1/revocations/stream")
        .header("authorization", format!("Bearer {}", org.token))
        .body(())
        .unwrap();
    let mut body = h2_ok(&mut client, request).await.into_body();
    let mut text = String::new();
    let mut heartbeats = 0;
    let until = Instant::now() + Duration::from_secs(5);
    let mut ping_every = tokio::time::interval(Duration::from_millis(300));
    while Instant::now() < until {
        tokio::select! {
            data = body.data() => {
                let data = data
                    .unwrap_or_else(|| panic!("the stream ended after {text:?}\n{}", server.log()))
                    .unwrap_or_else(|e| panic!("the stream broke ({e}) after {text:?}\n{}", server.log()));
                let _ = body.flow_control().release_capacity(data.len());
                text.push_str(&String::from_utf8_lossy(&data));
                heartbeats = text.matches("\n: heartbeat\n").count();
            }
            _ = ping_every.tick() => {
                tokio::time::timeout(LIMIT, pings.ping(h2::Ping::opaque()))
                    .await
                    .expect("a pong in time")
                    .expect("a pong");
            }
        }
    }
    assert!(text.contains("event: ready"), "{text}");
    assert!(heartbeats >= 3, "heartbeats in 5 s: {heartbeats}\n{text}");
    assert!(!driven.is_finished(), "the connection was closed");
}

/// Served over TLS, the console's cookies are `Secure` with the `__Host-` prefix without
/// `--console-https`: they must never go out over plain HTTP.
#[tokio::test]
async fn console_cookies_are_secure_over_tls() {
    let store = TestStore::new(Backend::Sqlite).await;
    let ca = Authority::new();
    let leaf = ca.leaf("server");
    let server = start(&store, &leaf).await;
    let url = format!("https://localhost:{}/console/login", port_of(&server));
    let login = ca
        .reqwest()
        .get(url)
        .send()
        .await
        .expect("the sign-in page");
    assert_eq!(login.status(), 200);
    let (_, cookie) = common::set_cookie(&login, "__Host-keyplane_login");
    let attributes: Vec<&str> = cookie.split("; ").skip(1).collect();
    for attribute in ["Path=/", "HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(attributes.contains(&attribute), "{cookie}");
    }
}

/// [`h2_client`] whose connection stops being driven (nothing more is read or written, the
/// socket stays open) when `freeze` is sent: a peer that stopped answering.
async fn h2_client_that_freezes(
    server: &Keyplane,
    ca: &Authority,
) -> (
    h2::client::SendRequest<hyper::body::Bytes>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let stream = connect(server, &ca.client(&rustls::version::TLS13, b"h2")).await;
    let (client, mut connection) = h2::client::handshake(stream)
        .await
        .expect("HTTP/2 handshake");
    let (freeze, frozen) = tokio::sync::oneshot::channel::<()>();
    let driven = tokio::spawn(async move {
        tokio::select! {
            _ = &mut connection => return,
            _ = frozen => {}
        }
        std::future::pending::<()>().await;
        drop(connection);
    });
    (client, freeze, driven)
}

/// The answer to `request` (no body) on `client`, a 200.
async fn h2_ok(
    client: &mut h2::client::SendRequest<hyper::body::Bytes>,
    request: hyper::Request<()>,
) -> hyper::Response<h2::RecvStream> {
    let (response, _) = client.send_request(request, true).expect("send a request");
    let response = tokio::time::timeout(LIMIT, response)
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(response.status(), 200);
    response
}

/// A GET of `path` on `client`, its whole body read (and its flow-control capacity released, so
/// the client sends window updates as a browser would).
async fn h2_get(client: &mut h2::client::SendRequest<hyper::body::Bytes>, path: &str) -> Vec<u8> {
    let request = hyper::Request::get(format!("https://localhost{path}"))
        .body(())
        .unwrap();
    let mut body = h2_ok(client, request).await.into_body();
    let mut out = Vec::new();
    while let Some(data) = tokio::time::timeout(LIMIT, body.data())
        .await
        .expect("the body in time")
    {
        let data = data.expect("a body frame");
        let _ = body.flow_control().release_capacity(data.len());
        out.extend_from_slice(&data);
    }
    out
}

/// An HTTP/2 client that stopped reading (it never answers the GOAWAY's ping) does not hold a
/// stop until the shutdown deadline: its connection is idle, so it closes at once.
#[tokio::test]
async fn an_unresponsive_http2_peer_does_not_hold_a_stop() {
    let (_store, ca, mut server) = tls_server(&["--shutdown-timeout-seconds", "15"]).await;
    let (mut client, freeze, _driven) = h2_client_that_freezes(&server, &ca).await;
    h2_get(&mut client, "/healthz").await;
    freeze.send(()).expect("the connection's task runs");

    stop(&mut server, Duration::from_secs(4)).await;
}

/// Window updates and settings acknowledgements an HTTP/2 client sends after a large response
/// are not the start of a request: the connection stays open for the idle timeout, not the
/// header-read timeout.
#[tokio::test]
async fn http2_frames_after_a_response_leave_the_connection_to_the_idle_timeout() {
    let (_store, ca, server) = tls_server(&[
        "--header-read-timeout-seconds",
        "1",
        "--idle-timeout-seconds",
        "30",
    ])
    .await;
    let (mut client, _pings, driven) = h2_client(&server, &ca).await;
    let document = h2_get(&mut client, "/openapi.json").await;
    assert!(document.len() > 100_000, "{} bytes", document.len());

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !driven.is_finished(),
        "the connection was closed within 5 s of its response (idle timeout: 30 s)\n{}",
        server.log()
    );
    // Still usable.
    h2_get(&mut client, "/healthz").await;
}

/// A leaf like [`Authority::leaf`], with a subject, serial and expiry of the test's choosing.
fn described_leaf(ca: &Authority, name: &str, serial: &[u8], not_after: (i32, u8, u8)) -> Leaf {
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
        .expect("leaf params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name}.keyplane.test"));
    params.serial_number = Some(rcgen::SerialNumber::from(serial.to_vec()));
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let cert = params.signed_by(&key, &ca.issuer).expect("sign the leaf");
    let (cert_path, key_path) = (
        ca.path(&format!("{name}.crt")),
        ca.path(&format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
    Leaf {
        der: cert.der().clone(),
        cert: cert_path,
        key: key_path,
    }
}

/// The log lines of `server` holding `message`.
fn lines_with(server: &Keyplane, message: &str) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|line| line.contains(message))
        .map(str::to_owned)
        .collect()
}

/// Waits until `server` has logged `count` lines holding `message`, for at most `limit`; they.
async fn wait_for_lines(
    server: &Keyplane,
    message: &str,
    count: usize,
    limit: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let lines = lines_with(server, message);
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "not {count} lines `{message}` within {limit:?}:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `keyplane_tls_*` sample of `/metrics`.
async fn tls_metric(ca: &Authority, server: &Keyplane, name: &str) -> i64 {
    let metrics = ca
        .reqwest()
        .get(format!("https://localhost:{}/metrics", port_of(server)))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("read /metrics");
    common::metric_sample(&metrics, name)
}

/// Every load names the certificate (subject, serial, expiry) in the log and sets
/// `keyplane_tls_certificate_not_after_seconds`; a pair that fails to reload is counted, and
/// logged again (with the certificate still served) while the files stay bad, not only once.
#[tokio::test]
async fn reloads_name_the_certificate_and_failures_are_said_again() {
    let store = TestStore::new(Backend::Sqlite).await;
    let ca = Authority::new();
    let first = described_leaf(&ca, "first", &[0x0a, 0x01, 0xff], (2031, 5, 6));
    let server = start(&store, &first).await;
    let loaded = wait_for_lines(&server, "TLS certificate and key loaded", 1, LIMIT).await;
    for said in ["CN=first.keyplane.test", "0A01FF", "2031-05-06T00:00:00Z"] {
        assert!(loaded[0].contains(said), "`{said}` not in {}", loaded[0]);
    }
    let not_after = "keyplane_tls_certificate_not_after_seconds";
    let failures = "keyplane_tls_reload_failures_total";
    assert_eq!(tls_metric(&ca, &server, not_after).await, 1_935_792_000);
    assert_eq!(tls_metric(&ca, &server, failures).await, 0);

    // A certificate whose key does not come: the reload fails, and says so again while it does.
    let second = described_leaf(&ca, "second", &[0x7e, 0x57], (2032, 1, 1));
    // Renamed into place: one change, so a second failure is the retry's, not another change's.
    let staged = ca.path("staged.crt");
    std::fs::copy(&second.cert, &staged).expect("stage the certificate");
    std::fs::rename(&staged, &first.cert).expect("replace the certificate only");
    let failed = wait_for_lines(&server, "not reloaded", 1, LIMIT).await;
    assert!(
        failed[0].contains("0A01FF") && failed[0].contains("2031-05-06T00:00:00Z"),
        "the failure names the certificate still served: {}",
        failed[0]
    );
    assert!(tls_metric(&ca, &server, failures).await >= 1);
    wait_for_lines(&server, "not reloaded", 2, Duration::from_secs(45)).await;
    assert!(tls_metric(&ca, &server, failures).await >= 2);
    assert_eq!(tls_metric(&ca, &server, not_after).await, 1_935_792_000);
    assert_eq!(peer_certificate(&server, &ca).await, first.der);

    // The key arrives: the new pair loads, named, and its expiry replaces the old one's.
    std::fs::copy(&second.key, &first.key).expect("replace the key");
    wait_for_certificate(&server, &ca, &second, LIMIT).await;
    let reloaded = wait_for_lines(&server, "TLS certificate and key reloaded", 1, LIMIT).await;
    let last = reloaded.last().unwrap();
    for said in ["CN=second.keyplane.test", "7E57", "2032-01-01T00:00:00Z"] {
        assert!(last.contains(said), "`{said}` not in {last}");
    }
    let expected = 1_956_528_000;
    assert_eq!(tls_metric(&ca, &server, not_after).await, expected);
}
