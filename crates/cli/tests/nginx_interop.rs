//! Interop with a real reverse proxy: Debian's nginx guards an upstream with `auth_request`, and its
//! subrequest asks `keyplane serve` (`GET /v1/auth/forward`) whether the request's own
//! `Authorization: Bearer` credential may pass. The identity keyplane answers with travels to the
//! upstream in the `X-Keyplane-*` headers, the way an operator would wire it.
//!
//! These tests never skip: without `/usr/sbin/nginx` they fail and say how to install it. Every
//! process they start listens on 127.0.0.1 only, every wait is bounded, and every process (keyplane,
//! nginx, the upstream) is stopped when the test ends, however it ends.

mod common;

use chrono::{TimeDelta, Utc};
use common::{
    both_stores, free_loopback_port, http_client, read_request, string_field, Keyplane, KillOnDrop,
    Org, Seen, TestStore,
};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const NGINX_BIN: &str = "/usr/sbin/nginx";
const INSTALL: &str = "apt-get install -y nginx";
/// The bound on every wait: a process start, an HTTP request, a poll.
const TIMEOUT: Duration = Duration::from_secs(20);
/// What the upstream answers first, so a response can be told apart from one of nginx's own pages.
const UPSTREAM_OK: &str = "upstream ok";
/// The identity headers nginx hands to the upstream, as the upstream echoes them.
const ORG_ID: &str = "x-keyplane-org-id";
const SUBJECT: &str = "x-keyplane-subject";
const KIND: &str = "x-keyplane-credential-kind";
const SCOPES: &str = "x-keyplane-scopes";
const SECRET: &str = "x-keyplane-secret";
const IDENTITY_HEADERS: [&str; 5] = [ORG_ID, SUBJECT, KIND, SCOPES, SECRET];
/// `serve` flags of the README's nginx set-up: nginx (on loopback) names the client.
const KEYPLANE_BEHIND_NGINX: &[&str] = &["--trusted-proxies", "127.0.0.1/32"];

both_stores!(
    nginx_passes_live_tokens_with_their_identity,
    nginx_refuses_missing_bad_expired_and_revoked_tokens,
    garbage_from_one_client_does_not_lock_out_honest_ones,
);

/// Live API tokens pass nginx, and the upstream learns who they are from keyplane, not the client.
async fn nginx_passes_live_tokens_with_their_identity(backend: Backend) {
    let stack = Stack::start(backend).await;
    let org = stack.store.bootstrap_org();
    let bootstrap_id = stack.keyplane.token_id_named(&org, "bootstrap").await;
    let deployer = stack
        .keyplane
        .create_token(&org, "deployer", &["deploy"], None)
        .await;
    let reader = stack
        .keyplane
        .create_token(&org, "reader", &["api_tokens:read"], None)
        .await;

    // (1) Each token reaches `/` as itself.
    for (what, secret, subject, scopes) in [
        ("the bootstrap token", &org.token, &bootstrap_id, "*"),
        ("the deploy token", &deployer.secret, &deployer.id, "deploy"),
        (
            "the token without `deploy`",
            &reader.secret,
            &reader.id,
            "api_tokens:read",
        ),
    ] {
        let seen = stack.passes("/app/status", Some(secret), what).await;
        assert_eq!(
            seen,
            identity(&org.id, subject, scopes),
            "what the upstream learned about {what}"
        );
    }

    // (2) Identity headers a client sends itself are replaced by keyplane's answer.
    let response = stack
        .nginx
        .get("/app/status")
        .bearer_auth(&reader.secret)
        .header(ORG_ID, "00000000-0000-0000-0000-000000000000")
        .header(SUBJECT, "someone-else")
        .header(KIND, "service_account")
        .header(SCOPES, "*")
        .header(SCOPES, "admin")
        .header("X-KEYPLANE-SCOPES", "deploy")
        .header(SECRET, "previous")
        .send()
        .await
        .expect("GET through nginx with spoofed identity headers");
    let seen = stack
        .upstream_answer(response, "the reader with spoofed identity headers")
        .await;
    assert_eq!(
        seen,
        identity(&org.id, &reader.id, "api_tokens:read"),
        "the client's own X-Keyplane-* headers reached the upstream"
    );

    // (3) `/deploy/` asks for `?scope=deploy`: the deploy token and the `*` token pass ...
    for (what, secret, subject, scopes) in [
        ("the deploy token", &deployer.secret, &deployer.id, "deploy"),
        ("the bootstrap (`*`) token", &org.token, &bootstrap_id, "*"),
    ] {
        let seen = stack.passes("/deploy/run", Some(secret), what).await;
        assert_eq!(
            seen,
            identity(&org.id, subject, scopes),
            "what the upstream learned about {what} on /deploy/"
        );
    }
    // ... a valid token without it is forbidden (nginx turns the subrequest's 403 into a 403).
    let before = stack.upstream.seen().len();
    stack
        .refused(
            "/deploy/run",
            Some(&reader.secret),
            StatusCode::FORBIDDEN,
            "the token without `deploy` on /deploy/",
        )
        .await;
    assert_eq!(
        stack.upstream.seen().len(),
        before,
        "a forbidden request reached the upstream"
    );

    // (4) Not only GET: nginx's subrequest for a POST with a body passes too, and the upstream
    // gets the body.
    let response = stack
        .nginx
        .post("/deploy/run")
        .bearer_auth(&deployer.secret)
        .body("{\"release\":\"v1\"}")
        .header("content-type", "application/json")
        .send()
        .await
        .expect("POST through nginx");
    let seen = stack
        .upstream_answer(response, "a POST with the deploy token")
        .await;
    assert_eq!(seen, identity(&org.id, &deployer.id, "deploy"));
    let last = stack
        .upstream
        .seen()
        .pop()
        .expect("the upstream saw the POST");
    assert_eq!(
        (
            last.method.as_str(),
            last.path.as_str(),
            last.body.as_slice()
        ),
        ("POST", "/deploy/run", b"{\"release\":\"v1\"}".as_slice()),
        "the POST as the upstream saw it"
    );
    assert_eq!(
        last.headers.get("content-type").map(String::as_str),
        Some("application/json"),
        "the POST's headers as the upstream saw them"
    );
}

/// Whatever keyplane's forward-auth refuses, nginx refuses, and the upstream never sees it.
async fn nginx_refuses_missing_bad_expired_and_revoked_tokens(backend: Backend) {
    let stack = Stack::start(backend).await;
    let org = stack.store.bootstrap_org();

    // (1) No credential, or nothing keyplane issued.
    let tampered = tamper(&org.token);
    let presented: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("a garbage bearer token", Some("Bearer garbage".into())),
        ("an empty bearer token", Some("Bearer ".into())),
        (
            "the bootstrap token as Basic credentials",
            Some(format!("Basic {}", org.token)),
        ),
        (
            "the bootstrap token with one character changed",
            Some(format!("Bearer {tampered}")),
        ),
        (
            "the bootstrap token without a scheme",
            Some(org.token.clone()),
        ),
    ];
    for (what, authorization) in &presented {
        for path in ["/app/status", "/deploy/run"] {
            let mut request = stack.nginx.get(path);
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let response = request.send().await.expect("GET through nginx");
            expect_unauthorized(response, &format!("{what} on {path}")).await;
        }
    }

    // (2) An expired token: it passes until its expiry, and is refused after it.
    let expires_at = Utc::now() + TimeDelta::seconds(2);
    let expiring = stack
        .keyplane
        .create_token(&org, "expiring", &["deploy"], Some(expires_at))
        .await;
    let seen = stack
        .passes(
            "/deploy/run",
            Some(&expiring.secret),
            "the expiring token before its expiry",
        )
        .await;
    assert_eq!(seen, identity(&org.id, &expiring.id, "deploy"));
    let after_expiry = (expires_at + TimeDelta::milliseconds(300) - Utc::now())
        .to_std()
        .unwrap_or_default();
    assert!(
        after_expiry <= TIMEOUT,
        "waiting {after_expiry:?} for expiry"
    );
    tokio::time::sleep(after_expiry).await;
    let passed = stack.upstream.seen().len();
    for path in ["/app/status", "/deploy/run"] {
        stack
            .refused(
                path,
                Some(&expiring.secret),
                StatusCode::UNAUTHORIZED,
                &format!("the expired token on {path}"),
            )
            .await;
    }

    // (3) A revoked token: refused on the very next request, though it was just verified.
    let revoked = stack
        .keyplane
        .create_token(&org, "revoked", &["deploy"], None)
        .await;
    stack
        .passes(
            "/deploy/run",
            Some(&revoked.secret),
            "the token before its revocation",
        )
        .await;
    let passed = passed + 1;
    assert_eq!(
        stack.keyplane.revoke_token(&org, &revoked.id).await,
        StatusCode::NO_CONTENT,
        "DELETE the token"
    );
    for path in ["/deploy/run", "/app/status"] {
        stack
            .refused(
                path,
                Some(&revoked.secret),
                StatusCode::UNAUTHORIZED,
                &format!("the revoked token on {path}"),
            )
            .await;
    }

    // Only the two requests made before expiry and before revocation reached the upstream.
    let seen = stack.upstream.seen();
    assert_eq!(
        seen.len(),
        passed,
        "refused requests reached the upstream: {seen:#?}"
    );
    assert!(
        seen.iter().all(|request| request.path == "/deploy/run"),
        "{seen:#?}"
    );
}

/// One client behind nginx sending garbage past its failure budget: honest clients on other
/// addresses, and the same address's own valid requests, keep passing; its failures keep being
/// refused. (Clients on 127.0.0.2 and 127.0.0.3: Linux routes all of 127/8 to loopback.)
async fn garbage_from_one_client_does_not_lock_out_honest_ones(backend: Backend) {
    require_nginx();
    let store = TestStore::new(backend).await;
    let mut flags = KEYPLANE_BEHIND_NGINX.to_vec();
    flags.extend(["--failed-auth-per-minute", "20"]);
    let keyplane = Keyplane::start(&store, &flags, TIMEOUT).await;
    let upstream = Upstream::start().await;
    let nginx = Nginx::start(&keyplane.addr, &upstream.addr).await;
    let org = store.bootstrap_org();
    let from = |address: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(address))
            .timeout(TIMEOUT)
            .build()
            .expect("an HTTP client on a loopback address")
    };
    let (noisy, honest) = (from([127, 0, 0, 2]), from([127, 0, 0, 3]));
    let url = format!("{}/app/status", nginx.base_url);
    let mut refusals = Vec::new();
    for n in 0..40 {
        let response = noisy
            .get(&url)
            .bearer_auth(format!("aether_garbage{n}"))
            // A client cannot pass itself off as another one.
            .header("x-forwarded-for", "127.0.0.3")
            .send()
            .await
            .expect("GET through nginx");
        refusals.push(response.status().as_u16());
    }
    // Past the budget keyplane answers the subrequest 429, which `auth_request` reports as 500.
    assert_eq!(&refusals[..20], &[401; 20], "{refusals:?}");
    assert!(refusals[20..].iter().all(|s| *s == 500), "{refusals:?}");
    for (what, client) in [("another client", &honest), ("the noisy client", &noisy)] {
        for _ in 0..20 {
            let response = client
                .get(&url)
                .bearer_auth(&org.token)
                .send()
                .await
                .expect("GET through nginx");
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "{what}'s valid token was refused\n{}",
                nginx.error_log()
            );
        }
    }
    let response = honest
        .get(&url)
        .bearer_auth("aether_garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        upstream.seen().len(),
        40,
        "only the valid requests reached the upstream"
    );
    // The limit's warning names the real client, not nginx.
    let log = keyplane.log();
    assert!(log.contains(r#""client.ip":"127.0.0.2""#), "{log}");
}

/// The headers the upstream should see for a credential.
fn identity(org_id: &str, subject: &str, scopes: &str) -> BTreeMap<String, String> {
    [
        (ORG_ID, org_id),
        (SUBJECT, subject),
        (KIND, "api_token"),
        (SCOPES, scopes),
        (SECRET, "current"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect()
}

/// `token` with one character of its secret part changed, keeping its shape.
fn tamper(token: &str) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let at = chars.len() / 2 + 2;
    chars[at] = if chars[at] == 'a' { 'b' } else { 'a' };
    chars.into_iter().collect()
}

async fn expect_unauthorized(response: reqwest::Response, what: &str) {
    let status = response.status();
    let server = header(&response, "server");
    let challenge = header(&response, "www-authenticate");
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    assert!(
        server.starts_with("nginx"),
        "{what}: the 401 did not come from nginx (Server: {server:?})"
    );
    assert!(
        !body.contains(UPSTREAM_OK),
        "{what}: the upstream answered: {body}"
    );
    assert_eq!(
        challenge, "Bearer",
        "{what}: nginx relays keyplane's WWW-Authenticate challenge"
    );
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .unwrap_or_default()
}

/// keyplane, the upstream, and nginx in front of the upstream asking keyplane.
struct Stack {
    // Dropped in this order: the proxy first, then what it talks to.
    nginx: Nginx,
    upstream: Upstream,
    keyplane: Keyplane,
    store: TestStore,
}

impl Stack {
    async fn start(backend: Backend) -> Self {
        require_nginx();
        let store = TestStore::new(backend).await;
        let keyplane = Keyplane::start(&store, KEYPLANE_BEHIND_NGINX, TIMEOUT).await;
        let upstream = Upstream::start().await;
        let nginx = Nginx::start(&keyplane.addr, &upstream.addr).await;
        Self {
            nginx,
            upstream,
            keyplane,
            store,
        }
    }

    /// A GET through nginx that must reach the upstream; what the upstream was told.
    async fn passes(
        &self,
        path: &str,
        secret: Option<&str>,
        what: &str,
    ) -> BTreeMap<String, String> {
        let mut request = self.nginx.get(path);
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        let response = request.send().await.expect("GET through nginx");
        self.upstream_answer(response, &format!("{what} on {path}"))
            .await
    }

    /// A 200 from the upstream, relayed by nginx; the identity headers the upstream echoed.
    async fn upstream_answer(
        &self,
        response: reqwest::Response,
        what: &str,
    ) -> BTreeMap<String, String> {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(
            status,
            StatusCode::OK,
            "{what}: nginx answered {status}: {body}\n{}",
            self.nginx.error_log()
        );
        let mut lines = body.lines();
        assert_eq!(lines.next(), Some(UPSTREAM_OK), "{what}: body {body:?}");
        lines
            .filter_map(|line| line.split_once(": "))
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }

    /// A GET through nginx that must be refused with `status` before the upstream sees it.
    async fn refused(&self, path: &str, secret: Option<&str>, status: StatusCode, what: &str) {
        let before = self.upstream.seen().len();
        let mut request = self.nginx.get(path);
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        let response = request.send().await.expect("GET through nginx");
        if status == StatusCode::UNAUTHORIZED {
            expect_unauthorized(response, what).await;
        } else {
            let got = response.status();
            let server = header(&response, "server");
            let body = response.text().await.unwrap_or_default();
            assert_eq!(got, status, "{what}: {body}");
            assert!(server.starts_with("nginx"), "{what}: Server: {server:?}");
            assert!(!body.contains(UPSTREAM_OK), "{what}: {body}");
        }
        assert_eq!(
            self.upstream.seen().len(),
            before,
            "{what}: the refused request reached the upstream"
        );
    }
}

fn require_nginx() {
    assert!(
        Path::new(NGINX_BIN).is_file(),
        "{NGINX_BIN} is missing: the nginx interop tests need Debian's nginx. Install it with \
         '{INSTALL}' (or run scripts/test as root, which installs it)."
    );
}

impl Keyplane {
    /// The id of the org's live token called `name`.
    async fn token_id_named(&self, org: &Org, name: &str) -> String {
        let response = self
            .http
            .get(format!("{}?limit=100", self.tokens_url(&org.id)))
            .bearer_auth(&org.token)
            .send()
            .await
            .expect("GET api-tokens");
        assert_eq!(response.status(), StatusCode::OK, "listing tokens");
        let page: Value = response.json().await.expect("the token list is JSON");
        let items = page["items"].as_array().expect("`items` is an array");
        let item = items
            .iter()
            .find(|item| item["name"] == name)
            .unwrap_or_else(|| panic!("no token named {name}: {page}"));
        string_field(item, "id")
    }
}

/// The protected application: a minimal HTTP/1.1 responder on 127.0.0.1 that answers every
/// request with 200, `upstream ok` and the identity headers it received, one `name: value` a line.
/// Its accept loop is aborted when it is dropped.
struct Upstream {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream on 127.0.0.1");
        let addr = listener.local_addr().expect("upstream address").to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    // A connection that stalls is dropped; the request through nginx then fails
                    // with a clear status instead of hanging.
                    let _ = tokio::time::timeout(TIMEOUT, serve_one(stream, record)).await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request, records it and answers it.
async fn serve_one(mut stream: TcpStream, record: Arc<Mutex<Vec<Seen>>>) {
    let Some(seen) = read_request(&mut stream).await else {
        return;
    };
    let mut text = format!("{UPSTREAM_OK}\n");
    for name in IDENTITY_HEADERS {
        let value = seen
            .headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_default();
        text.push_str(&format!("{name}: {value}\n"));
    }
    record.lock().unwrap_or_else(|p| p.into_inner()).push(seen);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// nginx in the foreground, single process, everything it writes inside its own temporary prefix.
struct Nginx {
    // Killed before its prefix directory is removed.
    _process: KillOnDrop,
    prefix: tempfile::TempDir,
    base_url: String,
    http: reqwest::Client,
}

impl Nginx {
    async fn start(keyplane: &str, upstream: &str) -> Self {
        let prefix = tempfile::Builder::new()
            .prefix("keyplane-nginx-")
            .tempdir()
            .expect("create the nginx prefix");
        let dir = prefix.path();
        let listen = format!("127.0.0.1:{}", free_loopback_port());
        std::fs::write(
            dir.join("nginx.conf"),
            nginx_conf(dir, &listen, keyplane, upstream),
        )
        .expect("write nginx.conf");
        let error_log = dir.join("error.log");
        let child = Command::new(NGINX_BIN)
            .arg("-p")
            .arg(dir)
            .args(["-c", "nginx.conf", "-e"])
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {NGINX_BIN} ({e}); install it with '{INSTALL}'"));
        let mut process = KillOnDrop(child);

        let up = tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Some(status) = process.0.try_wait().expect("poll nginx") {
                    return Err(status);
                }
                if TcpStream::connect(&listen).await.is_ok() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let log = || std::fs::read_to_string(&error_log).unwrap_or_default();
        match up {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!("nginx exited ({status}) before listening:\n{}", log()),
            Err(_) => panic!(
                "nginx did not listen on {listen} within {TIMEOUT:?}:\n{}",
                log()
            ),
        }
        Self {
            _process: process,
            prefix,
            base_url: format!("http://{listen}"),
            http: http_client(TIMEOUT),
        }
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.base_url))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.base_url))
    }

    fn error_log(&self) -> String {
        let text =
            std::fs::read_to_string(self.prefix.path().join("error.log")).unwrap_or_default();
        format!("nginx error.log:\n{text}")
    }
}

/// `location /` and `location /deploy/` guarded by `auth_request`; the subrequests call keyplane's
/// forward-auth (the latter with `?scope=deploy`), and the identity it answers with goes upstream.
fn nginx_conf(dir: &Path, listen: &str, keyplane: &str, upstream: &str) -> String {
    let dir = dir.display();
    let identity = "\
            auth_request_set $kp_org $upstream_http_x_keyplane_org_id;
            auth_request_set $kp_subject $upstream_http_x_keyplane_subject;
            auth_request_set $kp_kind $upstream_http_x_keyplane_credential_kind;
            auth_request_set $kp_scopes $upstream_http_x_keyplane_scopes;
            auth_request_set $kp_secret $upstream_http_x_keyplane_secret;
            proxy_set_header X-Keyplane-Org-Id $kp_org;
            proxy_set_header X-Keyplane-Subject $kp_subject;
            proxy_set_header X-Keyplane-Credential-Kind $kp_kind;
            proxy_set_header X-Keyplane-Scopes $kp_scopes;
            proxy_set_header X-Keyplane-Secret $kp_secret;";
    let forward = "\
            internal;
            proxy_pass_request_body off;
            proxy_set_header Content-Length \"\";
            proxy_set_header Authorization $http_authorization;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;";
    format!(
        "\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 64;
}}

http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    proxy_connect_timeout 20s;
    proxy_send_timeout 20s;
    proxy_read_timeout 20s;

    server {{
        listen {listen};
        server_name localhost;

        location / {{
            auth_request /_auth;
{identity}
            proxy_pass http://{upstream};
        }}

        location /deploy/ {{
            auth_request /_auth_deploy;
{identity}
            proxy_pass http://{upstream};
        }}

        location = /_auth {{
{forward}
            proxy_pass http://{keyplane}/v1/auth/forward;
        }}

        location = /_auth_deploy {{
{forward}
            proxy_pass http://{keyplane}/v1/auth/forward?scope=deploy;
        }}
    }}
}}
"
    )
}
