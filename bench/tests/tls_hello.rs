//! The `tls-hello` binary: its certificate loads through keyplane's own TLS code, and it answers
//! 200 "ok" over HTTPS to clients that trust exactly that certificate, on TLS 1.2 and 1.3, over
//! HTTP/1.1 and HTTP/2 as ALPN chooses.

use hyper_util::rt::{TokioExecutor, TokioIo};
use keyplane_server::tls::TlsFiles;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const BIN: &str = env!("CARGO_BIN_EXE_tls-hello");
/// Bounds every network wait so that a broken server fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(20);

/// A certificate pair made by `tls-hello cert`.
struct Pair {
    dir: tempfile::TempDir,
}

impl Pair {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let status = Command::new(BIN)
            .arg("cert")
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .expect("run tls-hello cert");
        assert!(status.success(), "tls-hello cert: {status}");
        Self { dir }
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
}

/// A running `tls-hello serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    /// Kept open: the server's later messages must not hit a closed pipe.
    _stderr: std::io::BufReader<ChildStderr>,
}

impl Server {
    fn start(pair: &Pair) -> Self {
        let addr = free_addr();
        let mut child = Command::new(BIN)
            .args(["serve", "--cert"])
            .arg(pair.cert())
            .arg("--key")
            .arg(pair.key())
            .env("BIND", &addr)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tls-hello serve");
        // It says it listens once the socket is bound; if it fails, stderr ends with the reason.
        let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("read its stderr");
        let server = Self {
            child,
            addr,
            _stderr: stderr,
        };
        assert!(
            line.starts_with("tls-hello listening on https://"),
            "tls-hello did not start: {line:?}"
        );
        server
    }

    fn port(&self) -> &str {
        self.addr.rsplit(':').next().expect("a port")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address nothing listens on right now.
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").to_string()
}

fn cert_der(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).expect("a PEM certificate")
}

/// A rustls client trusting only `pair`'s certificate, speaking exactly `version`, offering `alpn`.
fn connector(
    pair: &Pair,
    version: &'static rustls::SupportedProtocolVersion,
    alpn: &[u8],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cert_der(&pair.cert()))
        .expect("trust the certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("a protocol version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn body_text(body: hyper::body::Incoming) -> String {
    let bytes = axum::body::to_bytes(axum::body::Body::new(body), 1024)
        .await
        .expect("the whole body");
    String::from_utf8(bytes.to_vec()).expect("a UTF-8 body")
}

#[test]
fn cert_writes_a_pair_that_keyplane_loads() {
    let pair = Pair::new();
    let config = TlsFiles {
        cert: pair.cert(),
        key: pair.key(),
    }
    .load()
    .expect("keyplane loads the pair");
    assert_eq!(
        config.alpn_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    // Each run makes its own key: two pairs do not belong together.
    let other = Pair::new();
    let crossed = TlsFiles {
        cert: pair.cert(),
        key: other.key(),
    }
    .load();
    assert!(crossed.is_err(), "a key from another pair must not load");
}

#[tokio::test]
async fn answers_ok_over_https_to_reqwest_trusting_its_certificate() {
    let pair = Pair::new();
    let server = Server::start(&pair);
    let pem = std::fs::read(pair.cert()).expect("read cert.pem");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(LIMIT)
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("cert.pem"))
        .build()
        .expect("an HTTPS client");
    // Both names the certificate is for; reqwest is built without HTTP/2, so it offers http/1.1.
    for host in ["127.0.0.1", "localhost"] {
        for path in ["/", "/verify"] {
            let url = format!("https://{host}:{}{path}", server.port());
            let response = client.get(&url).send().await.expect(&url);
            assert_eq!(response.status(), 200, "{url}");
            assert_eq!(response.version(), reqwest::Version::HTTP_11, "{url}");
            assert_eq!(response.text().await.expect("a body"), "ok", "{url}");
        }
    }
    // A client that does not trust the certificate is refused.
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .timeout(LIMIT)
        .tls_built_in_root_certs(false)
        .build()
        .expect("an HTTPS client");
    let url = format!("https://127.0.0.1:{}/", server.port());
    assert!(untrusting.get(&url).send().await.is_err());
}

#[tokio::test]
async fn speaks_http2_and_http1_by_alpn_on_tls_1_2_and_1_3() {
    let pair = Pair::new();
    let server = Server::start(&pair);
    let leaf = cert_der(&pair.cert());
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
            let tcp = TcpStream::connect(&server.addr).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("a server name");
            let stream =
                tokio::time::timeout(LIMIT, connector(&pair, version, alpn).connect(name, tcp))
                    .await
                    .expect("the handshake finishes in time")
                    .expect("the handshake succeeds");
            let (_, session) = stream.get_ref();
            assert_eq!(session.protocol_version(), Some(version.version));
            assert_eq!(session.alpn_protocol(), Some(alpn));
            assert_eq!(session.peer_certificates(), Some(&[leaf.clone()][..]));
            let io = TokioIo::new(stream);
            let response = if alpn == b"h2" {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .expect("HTTP/2 handshake");
                tokio::spawn(connection);
                let request = hyper::Request::get("https://localhost/verify")
                    .body(String::new())
                    .expect("a request");
                tokio::time::timeout(LIMIT, sender.send_request(request)).await
            } else {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("HTTP/1.1 handshake");
                tokio::spawn(connection);
                let request = hyper::Request::get("/verify")
                    .header("host", "localhost")
                    .body(String::new())
                    .expect("a request");
                tokio::time::timeout(LIMIT, sender.send_request(request)).await
            }
            .expect("an answer in time")
            .expect("an answer");
            let want = if alpn == b"h2" {
                hyper::Version::HTTP_2
            } else {
                hyper::Version::HTTP_11
            };
            let context = format!("{version:?} {}", String::from_utf8_lossy(alpn));
            assert_eq!(response.status(), 200, "{context}");
            assert_eq!(response.version(), want, "{context}");
            assert_eq!(body_text(response.into_body()).await, "ok", "{context}");
        }
    }
}
