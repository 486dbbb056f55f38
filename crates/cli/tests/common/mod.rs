//! What the black-box tests of the `keyplane` binary share (`cli.rs`, `admin_grant.rs`,
//! `nginx_interop.rs`, `registry_interop.rs`): the binary with a clean environment, a fresh store
//! for it on either backend, short commands run to completion, a `keyplane serve` on 127.0.0.1
//! that is killed when dropped, and the request reader of a stand-in HTTP server.
//!
//! Every wait here is bounded by a limit the caller passes: the test files allow different times
//! (the registry interop tests drive slower peers than the rest).

// Each test binary compiles this module on its own and uses only part of it, so what one binary
// leaves unused would otherwise warn there although another one needs it.
#![allow(dead_code)]

use chrono::{DateTime, SecondsFormat, Utc};
use keyplane_store::testing::{Backend, TestDatabase};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub const KEYPLANE: &str = env!("CARGO_BIN_EXE_keyplane");

/// `both_stores!(name, ..)` runs `async fn name(Backend)` as `name::sqlite` and `name::postgres`.
// Not every test binary starts a store.
#[allow(unused_macros)]
macro_rules! both_stores {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(::keyplane_store::testing::Backend::Sqlite).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$name(::keyplane_store::testing::Backend::Postgres).await;
            }
        }
    )+};
}
#[allow(unused_imports)]
pub(crate) use both_stores;

// ------------------------------------------------------------------------------------------------
// The store

/// A fresh database on one backend, and the arguments that point the binary at it.
pub struct TestStore {
    pub backend: Backend,
    pub db: TestDatabase,
}

impl TestStore {
    pub async fn new(backend: Backend) -> Self {
        Self {
            backend,
            db: TestDatabase::new(backend).await,
        }
    }

    /// `--data-dir DIR`, and `--database-url URL` on Postgres.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = vec!["--data-dir".into(), self.db.data_dir.clone().into()];
        if self.backend == Backend::Postgres {
            args.extend(["--database-url".into(), self.db.url.clone().into()]);
        }
        args
    }

    pub fn data_dir_has(&self, name: &str) -> bool {
        self.db.data_dir.join(name).exists()
    }

    pub fn bootstrap_path(&self) -> PathBuf {
        self.db.data_dir.join("bootstrap.json")
    }

    /// The `default` org that `serve` created on this store.
    pub fn bootstrap_org(&self) -> Org {
        let path = self.bootstrap_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Org::from_json(&text)
    }
}

/// The database a PostgreSQL URL names.
pub fn database_name(url: &str) -> String {
    let path = url.rsplit('/').next().expect("a database in the URL");
    path.split('?').next().unwrap().to_owned()
}

/// Runs `sql` on the test database directly, as someone tampering with it would.
pub async fn tamper(store: &TestStore, sql: &str) {
    match store.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&store.db.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&store.db.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
}

/// The organization's first 100 events as the store holds them, oldest first.
pub async fn stored_events(store: &TestStore, org: &Org) -> Vec<keyplane_core::ChainedEvent> {
    let store_handle = keyplane_store::connect(&store.db.url).await.unwrap();
    let tenant = keyplane_core::TenantId::parse(&org.id).unwrap();
    store_handle
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(tenant, 0, 100))
        .await
        .unwrap()
}

/// A connection to the test PostgreSQL server's admin database (to create, copy or drop a test's
/// database, or change its settings).
pub async fn admin_connection() -> sqlx::PgConnection {
    use sqlx::Connection;
    let url = std::env::var("KEYPLANE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| keyplane_store::testing::DEFAULT_TEST_DATABASE_URL.to_owned());
    sqlx::PgConnection::connect(&url)
        .await
        .expect("connect to the test PostgreSQL")
}

/// An organization and its `*` token, as in bootstrap.json and `admin create-org --json`.
pub struct Org {
    pub id: String,
    pub token: String,
}

impl Org {
    pub fn from_json(text: &str) -> Self {
        let value: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        Self {
            id: string_field(&value, "org_id"),
            token: string_field(&value, "token"),
        }
    }
}

/// An API token created over HTTP, with its one-time secret.
pub struct Token {
    pub id: String,
    pub name: String,
    pub secret: String,
}

/// The value of `series` (its name and labels as exposed) in a `/metrics` answer.
pub fn metric_sample<T>(exposition: &str, series: &str) -> T
where
    T: std::str::FromStr,
    T::Err: std::fmt::Debug,
{
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{exposition}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{series}: not a number: {e:?}"))
}

pub fn string_field(value: &Value, field: &str) -> String {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string `{field}` in {value}"))
        .to_owned()
}

// ------------------------------------------------------------------------------------------------
// Processes

/// The `keyplane` binary, with no `KEYPLANE_*` setting inherited from whoever runs the tests, and
/// nothing on its stdin.
pub fn keyplane() -> Command {
    let mut command = Command::new(KEYPLANE);
    clean_environment(&mut command);
    command
}

fn clean_environment(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KEYPLANE_") {
            command.env_remove(key);
        }
    }
    // Recorded with the OS user by `keyplane admin`: tests run under `sudo` see what they set.
    command.env_remove("SUDO_USER");
    command.stdin(Stdio::null());
}

/// [`keyplane`] run by `sh` under `umask`, which tests cannot set for a child otherwise.
pub fn keyplane_with_umask(umask: u32) -> Command {
    let mut command = Command::new("sh");
    command.args([
        "-c",
        &format!("umask {umask:03o} && exec \"$0\" \"$@\""),
        KEYPLANE,
    ]);
    clean_environment(&mut command);
    command
}

/// A child process that is killed and reaped when dropped, so no test leaves one behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls until `child` exits; `None` if it still runs after `limit`.
pub async fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    tokio::time::timeout(limit, async {
        loop {
            if let Some(status) = child.try_wait().expect("poll a child process") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .ok()
}

pub struct CommandOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\nstdout: {}\nstderr: {}",
            self.command,
            self.status,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// The JSON lines of `output`, which must have succeeded.
pub fn json_lines(output: &CommandOutput) -> Vec<Value> {
    assert!(output.status.success(), "{}", output.describe());
    output
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// `keyplane admin <args> <the store's flags>`, `input` on its stdin, within `limit`: how the
/// admin commands' tests run one against their store.
pub async fn admin(
    store: &TestStore,
    args: &[&str],
    input: &str,
    limit: Duration,
) -> CommandOutput {
    run_with_input(
        keyplane().arg("admin").args(args).args(store.args()),
        input,
        limit,
    )
    .await
}

/// Runs a command to completion within `limit` (killed otherwise), its output captured in
/// anonymous files so that no pipe can fill up.
pub async fn run(command: &mut Command, limit: Duration) -> CommandOutput {
    run_with_input(command, "", limit).await
}

/// [`run`] with `input` on the command's stdin.
pub async fn run_with_input(command: &mut Command, input: &str, limit: Duration) -> CommandOutput {
    use std::io::Write;
    let described = format!("{command:?}");
    let mut stdout = tempfile::tempfile().expect("create a temporary file");
    let mut stderr = tempfile::tempfile().expect("create a temporary file");
    let mut stdin = tempfile::tempfile().expect("create a temporary file");
    stdin
        .write_all(input.as_bytes())
        .and_then(|()| stdin.rewind())
        .expect("write the command's input");
    let child = command
        .stdin(stdin)
        .stdout(stdout.try_clone().expect("clone a file handle"))
        .stderr(stderr.try_clone().expect("clone a file handle"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {described}: {e}"));
    let mut process = KillOnDrop(child);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = process.0.try_wait().expect("poll a child process") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{described} did not finish within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let read = |file: &mut File| {
        let mut text = String::new();
        file.rewind().expect("rewind an output file");
        file.read_to_string(&mut text).expect("read an output file");
        text
    };
    CommandOutput {
        command: described,
        status,
        stdout: read(&mut stdout),
        stderr: read(&mut stderr),
    }
}

/// The value of cookie `name` in a response's `Set-Cookie` headers, and its attributes.
pub fn set_cookie(response: &reqwest::Response, name: &str) -> (String, String) {
    let line = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no Set-Cookie {name} in {:?}", response.headers()))
        .to_owned();
    let value = line[name.len() + 1..].split(';').next().unwrap().to_owned();
    (value, line)
}

/// A client that ignores proxy settings and gives up on a request after `limit`.
pub fn http_client(limit: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(limit)
        .build()
        .expect("build an HTTP client")
}

/// A request as a stand-in server on 127.0.0.1 received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lower-cased names; a repeated header keeps its last value.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// Reads one HTTP/1.1 request from `stream`: the head, then a `Content-Length` body. `None` if
/// the connection ends first or the request passes 64 KiB.
pub async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Seen> {
    use tokio::io::AsyncReadExt;
    const MAX_REQUEST: usize = 64 * 1024;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buffer.len() > MAX_REQUEST {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if length > MAX_REQUEST {
        return None;
    }
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(length);
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

/// A port nobody listens on right now (bound on 127.0.0.1, then released for a peer to bind).
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free port on 127.0.0.1")
        .port()
}

// ------------------------------------------------------------------------------------------------
// keyplane serve

/// A running `keyplane serve` on 127.0.0.1:0, killed when dropped (or when the test ends without
/// stopping it). Its log is collected as it runs.
pub struct Keyplane {
    pub process: KillOnDrop,
    /// Everything the server wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    /// Fills `log`; done once the server's stderr closes.
    pub reader: JoinHandle<()>,
    /// `127.0.0.1:port`
    pub addr: String,
    pub http: reqwest::Client,
}

impl Keyplane {
    /// `keyplane serve` on `store` with rate limiting off, plus `extra_args`; returns once it
    /// listens on 127.0.0.1 and `/readyz` answers. `limit` bounds the start and every request.
    pub async fn start(store: &TestStore, extra_args: &[&str], limit: Duration) -> Self {
        Self::start_from(keyplane(), store, extra_args, limit).await
    }

    /// [`Keyplane::start`] from `command` (e.g. [`keyplane_with_umask`]) instead of the bare binary.
    pub async fn start_from(
        mut command: Command,
        store: &TestStore,
        extra_args: &[&str],
        limit: Duration,
    ) -> Self {
        let child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(store.args())
            .args(extra_args)
            .env("KEYPLANE_LOG", "info")
            // Unlimited unless a test's own flag says otherwise (a flag overrides its variable).
            .env("KEYPLANE_RATE_LIMIT_PER_MINUTE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keyplane serve");
        let mut process = KillOnDrop(child);
        let stderr = process.0.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (address_tx, address_rx) = oneshot::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || read_log(stderr, address_tx, &log))
        };

        let addr = match tokio::time::timeout(limit, address_rx).await {
            Ok(Ok(address)) => address,
            Ok(Err(_)) => {
                let status = wait_for_exit(&mut process.0, limit).await;
                let _ = reader.join();
                panic!(
                    "keyplane serve exited ({status:?}) before listening:\n{}",
                    lock(&log)
                );
            }
            Err(_) => panic!("keyplane serve did not log `listening` within {limit:?}"),
        };
        assert!(
            addr.starts_with("127.0.0.1:"),
            "keyplane listens on {addr}, not on loopback"
        );
        let keyplane = Self {
            process,
            log,
            reader,
            addr,
            http: http_client(limit),
        };
        // Over TLS, the test knows which certificate to trust and checks readiness itself.
        if extra_args.contains(&"--tls-cert") {
            return keyplane;
        }
        let ready = keyplane
            .http
            .get(keyplane.url("/readyz"))
            .send()
            .await
            .expect("GET /readyz");
        assert_eq!(ready.status(), StatusCode::OK, "/readyz");
        keyplane
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        lock(&self.log).clone()
    }

    /// The value of `series` (as [`metric_sample`] names it) in this server's `/metrics` now.
    pub async fn metric<T>(&self, series: &str) -> T
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Debug,
    {
        let metrics = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("read /metrics");
        metric_sample(&metrics, series)
    }

    pub fn tokens_url(&self, org_id: &str) -> String {
        self.url(&format!("/api/v1/organizations/{org_id}/api-tokens"))
    }

    /// `POST api-tokens` with `scopes` (and `expires_at`), which must succeed.
    pub async fn create_token(
        &self,
        org: &Org,
        name: &str,
        scopes: &[&str],
        expires_at: Option<DateTime<Utc>>,
    ) -> Token {
        let mut body = json!({ "name": name, "scopes": scopes });
        if let Some(at) = expires_at {
            body["expires_at"] = json!(at.to_rfc3339_opts(SecondsFormat::Millis, true));
        }
        let response = self
            .http
            .post(self.tokens_url(&org.id))
            .bearer_auth(&org.token)
            .json(&body)
            .send()
            .await
            .expect("POST api-tokens");
        let status = response.status();
        let text = response.text().await.expect("read the created token");
        assert_eq!(status, StatusCode::CREATED, "creating {name}: {text}");
        let created: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the created token is not JSON ({e}): {text}"));
        Token {
            id: string_field(&created, "id"),
            name: name.to_owned(),
            secret: string_field(&created, "token"),
        }
    }

    /// Every live API token of `org`, which must fit in one page of 100.
    pub async fn list_tokens(&self, org: &Org) -> Vec<Value> {
        let response = self
            .http
            .get(format!("{}?limit=100", self.tokens_url(&org.id)))
            .bearer_auth(&org.token)
            .send()
            .await
            .expect("GET api-tokens");
        assert_eq!(response.status(), StatusCode::OK, "listing tokens");
        let page: Value = response.json().await.expect("the token list is JSON");
        assert!(
            page["next_cursor"].is_null(),
            "expected a single page: {page}"
        );
        page["items"]
            .as_array()
            .expect("`items` is an array")
            .clone()
    }

    /// The organization's audit events (`GET audit-events?{query}`), newest first: one page.
    pub async fn audit_events(&self, org: &Org, query: &str) -> Vec<Value> {
        let response = self
            .http
            .get(self.url(&format!(
                "/api/v1/organizations/{}/audit-events?{query}",
                org.id
            )))
            .bearer_auth(&org.token)
            .send()
            .await
            .expect("GET audit-events");
        assert_eq!(response.status(), StatusCode::OK);
        let page: Value = response.json().await.expect("a JSON page");
        page["items"].as_array().expect("items").clone()
    }

    /// POSTs `body` (none: no body) to `path` with `bearer`; the answer's JSON, which must come
    /// with `expected`.
    pub async fn post_json(
        &self,
        bearer: &str,
        path: &str,
        body: Option<&Value>,
        expected: StatusCode,
    ) -> Value {
        let mut request = self.http.post(self.url(path)).bearer_auth(bearer);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, expected, "POST {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
    }

    pub async fn revoke_token(&self, org: &Org, id: &str) -> StatusCode {
        self.http
            .delete(format!("{}/{id}", self.tokens_url(&org.id)))
            .bearer_auth(&org.token)
            .send()
            .await
            .expect("DELETE api-token")
            .status()
    }
}

/// The log, even if a reader panicked while holding it.
pub fn lock(log: &Mutex<String>) -> MutexGuard<'_, String> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Collects the server's stderr into `log` until it closes, and sends the address from the
/// `listening` line as soon as it appears. Reads to the end so the server never blocks on a full
/// pipe.
fn read_log(stderr: ChildStderr, address: oneshot::Sender<String>, log: &Mutex<String>) {
    let mut address = Some(address);
    for line in BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        if let Some(found) = listening_address(&line) {
            if let Some(sender) = address.take() {
                let _ = sender.send(found);
            }
        }
        let mut log = lock(log);
        log.push_str(&line);
        log.push('\n');
    }
}

fn listening_address(line: &str) -> Option<String> {
    let event: Value = serde_json::from_str(line).ok()?;
    if event["message"] != "listening" {
        return None;
    }
    event["address"].as_str().map(str::to_owned)
}

/// A webhook receiver on loopback: answers every request 204 and counts them.
pub struct Receiver {
    pub url: String,
    received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Each connection is read for at most `limit`.
    pub async fn start(limit: Duration) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    // Reads the head and a Content-Length body (bounded), then answers.
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    let complete = loop {
                        let Ok(Ok(n)) = tokio::time::timeout(limit, stream.read(&mut buffer)).await
                        else {
                            break false;
                        };
                        if n == 0 || request.len() > 1 << 20 {
                            break false;
                        }
                        request.extend_from_slice(&buffer[..n]);
                        let text = String::from_utf8_lossy(&request).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text[..end]
                                .lines()
                                .find_map(|line| line.strip_prefix("content-length:"))
                                .and_then(|value| value.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if request.len() >= end + 4 + length {
                                break true;
                            }
                        }
                    };
                    if complete {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let answer = "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n";
                        let _ = stream.write_all(answer.as_bytes()).await;
                    }
                });
            }
        });
        Self {
            url,
            received,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.received.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
