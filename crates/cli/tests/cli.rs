//! Black-box tests of the `keyplane` binary: each test runs the real executable as a subprocess on
//! its own store and talks HTTP to it, the way an operator and a client would.

use chrono::{DateTime, TimeDelta, Utc};
use keyplane_store::testing::{Backend, TestDatabase};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::oneshot;

const KEYPLANE: &str = env!("CARGO_BIN_EXE_keyplane");
/// The bound on every wait: startup, a CLI command, an HTTP request.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful shutdown may take after SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// `both_stores!(name, ..)` runs `async fn name(Backend)` as `name::sqlite` and `name::postgres`.
macro_rules! both_stores {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$name(super::Backend::Postgres).await;
            }
        }
    )+};
}

both_stores!(
    serve_bootstraps_default_org_once,
    admin_create_org_while_server_runs,
    sigkill_keeps_every_acknowledged_write,
    sigterm_flushes_last_used_at,
    bootstrap_replaces_a_stale_file_with_a_private_one,
);

async fn serve_bootstraps_default_org_once(backend: Backend) {
    let store = TestStore::new(backend).await;
    let path = store.bootstrap_path();

    let server = Server::start(&store, &[]).await;
    let written =
        std::fs::read_to_string(&path).expect("serve writes bootstrap.json on an empty store");
    let metadata = std::fs::metadata(&path).expect("stat bootstrap.json");
    assert_eq!(
        metadata.permissions().mode() & 0o777,
        0o600,
        "bootstrap.json holds a `*` token and must be readable by its owner only"
    );
    let org = Org::from_json(&written);
    assert_eq!(names(&server.list_tokens(&org).await), ["bootstrap"]);
    let first = server.stop_term().await;
    assert!(
        first.status.success(),
        "serve exited with {} after SIGTERM",
        first.status
    );
    assert!(
        first.log.contains(&path.display().to_string()),
        "the log should say where the bootstrap file is:\n{}",
        first.log
    );

    let server = Server::start(&store, &[]).await;
    assert_eq!(
        std::fs::read_to_string(&path).expect("read bootstrap.json again"),
        written,
        "a restart must not rewrite bootstrap.json"
    );
    assert_eq!(
        std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime of bootstrap.json"),
        metadata.modified().expect("mtime of bootstrap.json"),
        "a restart must not touch bootstrap.json"
    );
    assert_eq!(names(&server.list_tokens(&org).await), ["bootstrap"]);
    let second = server.stop_term().await;
    assert!(
        second.status.success(),
        "serve exited with {} after SIGTERM",
        second.status
    );

    for log in [&first.log, &second.log] {
        assert!(
            !log.contains(&org.token),
            "the bootstrap token was logged:\n{log}"
        );
    }
}

/// A `bootstrap.json` left over from a wiped store must not lend its (looser) mode to the new token.
async fn bootstrap_replaces_a_stale_file_with_a_private_one(backend: Backend) {
    let store = TestStore::new(backend).await;
    let path = store.bootstrap_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "{\"org_id\":\"stale\",\"token\":\"stale\"}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    let server = Server::start(&store, &[]).await;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let org = Org::from_json(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(names(&server.list_tokens(&org).await), ["bootstrap"]);
    assert!(!store.data_dir_has("bootstrap.json.pending"));
    server.stop_term().await;
}

async fn admin_create_org_while_server_runs(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Server::start(&store, &[]).await;
    let default_org = store.bootstrap_org();

    let output = run(keyplane()
        .args(["admin", "create-org", "--name", "acme", "--json"])
        .args(store.args()))
    .await;
    assert!(
        output.status.success(),
        "admin create-org failed: {}",
        output.stderr
    );
    let org = Org::from_json(&output.stdout);
    uuid::Uuid::parse_str(&org.id)
        .unwrap_or_else(|e| panic!("org_id {:?} is not a UUID: {e}", org.id));
    assert!(
        org.token.starts_with("aether_"),
        "unexpected token format: {:?}",
        org.token
    );
    assert_ne!(org.id, default_org.id);

    assert_eq!(
        server.get_tokens(&org.id, &org.token).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        server
            .get_tokens(&default_org.id, &org.token)
            .await
            .status(),
        StatusCode::NOT_FOUND,
        "a token must not reach another organization"
    );
    assert_eq!(
        server
            .get_tokens(&org.id, &default_org.token)
            .await
            .status(),
        StatusCode::NOT_FOUND,
        "the bootstrap token must not reach the new organization"
    );
}

async fn sigkill_keeps_every_acknowledged_write(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Server::start(&store, &[]).await;
    let org = store.bootstrap_org();

    let mut created = Vec::new();
    for i in 0..20 {
        created.push(server.create_token(&org, &format!("token-{i:02}")).await);
    }
    let (revoked, kept) = created.split_first().expect("tokens were created");
    assert_eq!(
        server.revoke_token(&org, &revoked.id).await,
        StatusCode::NO_CONTENT
    );
    server.kill();

    let server = Server::start(&store, &[]).await;
    for token in kept {
        assert_eq!(
            server.get_tokens(&org.id, &token.secret).await.status(),
            StatusCode::OK,
            "{} was acknowledged before SIGKILL but does not authenticate after restart",
            token.name
        );
    }
    assert_eq!(
        server.get_tokens(&org.id, &revoked.secret).await.status(),
        StatusCode::UNAUTHORIZED,
        "a token revoked before SIGKILL works again after restart"
    );
    let expected: BTreeSet<String> = kept
        .iter()
        .map(|token| token.name.clone())
        .chain(["bootstrap".to_owned()])
        .collect();
    let listed: BTreeSet<String> = names(&server.list_tokens(&org).await).into_iter().collect();
    assert_eq!(listed, expected);
}

async fn sigterm_flushes_last_used_at(backend: Backend) {
    let store = TestStore::new(backend).await;
    // Only the shutdown flush can write `last_used_at` within this test.
    let server = Server::start(&store, &["--last-used-flush-ms", "600000"]).await;
    let org = store.bootstrap_org();
    let token = server.create_token(&org, "used-once").await;

    let before = Utc::now();
    assert_eq!(
        server.get_tokens(&org.id, &token.secret).await.status(),
        StatusCode::OK
    );
    let after = Utc::now();
    let exited = server.stop_term().await;
    assert!(
        exited.status.success(),
        "serve exited with {} after SIGTERM",
        exited.status
    );

    let server = Server::start(&store, &[]).await;
    let items = server.list_tokens(&org).await;
    let item = items
        .iter()
        .find(|item| item["id"] == token.id.as_str())
        .unwrap_or_else(|| panic!("{} is not listed: {items:?}", token.name));
    let last_used = item["last_used_at"]
        .as_str()
        .unwrap_or_else(|| panic!("last_used_at was not written on SIGTERM: {item}"));
    let last_used = DateTime::parse_from_rfc3339(last_used).expect("last_used_at is RFC 3339");
    let slack = TimeDelta::milliseconds(1);
    assert!(
        (before - slack..=after + slack).contains(&last_used.to_utc()),
        "last_used_at {last_used} is not the time of the request ({before} .. {after})"
    );
}

#[tokio::test]
async fn serve_help_documents_every_flag_with_its_env_var() {
    let output = run(keyplane().args(["serve", "--help"])).await;
    assert!(
        output.status.success(),
        "serve --help failed: {}",
        output.stderr
    );
    let options = option_blocks(&output.stdout);

    for (flag, var) in [
        ("--listen", "KEYPLANE_LISTEN"),
        ("--data-dir", "KEYPLANE_DATA_DIR"),
        ("--database-url", "KEYPLANE_DATABASE_URL"),
        ("--rate-limit-per-minute", "KEYPLANE_RATE_LIMIT_PER_MINUTE"),
        ("--last-used-flush-ms", "KEYPLANE_LAST_USED_FLUSH_MS"),
    ] {
        let option = options
            .iter()
            .find(|option| option.split_whitespace().next() == Some(flag))
            .unwrap_or_else(|| panic!("{flag} is not in serve --help:\n{}", output.stdout));
        assert!(
            option.contains(&format!("[env: {var}")),
            "{flag} does not name {var}:\n{option}"
        );
    }
    for option in options.iter().filter(|option| !option.contains("--help")) {
        assert!(
            option.contains("[env: KEYPLANE_"),
            "an option without an env var:\n{option}"
        );
    }
}

#[tokio::test]
async fn bad_database_url_fails_with_one_clear_line() {
    let data_dir = tempfile::tempdir().expect("create a temporary directory");
    let output = run(keyplane()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "mysql://x",
            "--data-dir",
        ])
        .arg(data_dir.path()))
    .await;
    assert!(!output.status.success(), "serve accepted mysql://");
    let lines: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got:\n{}",
        output.stderr
    );
    assert!(
        lines[0].contains("sqlite://") && lines[0].contains("postgres://"),
        "the error should name the accepted URL schemes: {}",
        lines[0]
    );
}

/// A fresh database on one backend, and the arguments that point the binary at it.
struct TestStore {
    backend: Backend,
    db: TestDatabase,
}

impl TestStore {
    async fn new(backend: Backend) -> Self {
        Self {
            backend,
            db: TestDatabase::new(backend).await,
        }
    }

    fn args(&self) -> Vec<OsString> {
        let mut args = vec!["--data-dir".into(), self.db.data_dir.clone().into()];
        if self.backend == Backend::Postgres {
            args.extend(["--database-url".into(), self.db.url.clone().into()]);
        }
        args
    }

    fn data_dir_has(&self, name: &str) -> bool {
        self.db.data_dir.join(name).exists()
    }

    fn bootstrap_path(&self) -> PathBuf {
        self.db.data_dir.join("bootstrap.json")
    }

    /// The `default` org that `serve` created on this store.
    fn bootstrap_org(&self) -> Org {
        let path = self.bootstrap_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Org::from_json(&text)
    }
}

/// An organization and its `*` token, as in bootstrap.json and `admin create-org --json`.
struct Org {
    id: String,
    token: String,
}

impl Org {
    fn from_json(text: &str) -> Self {
        let value: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        Self {
            id: string_field(&value, "org_id"),
            token: string_field(&value, "token"),
        }
    }
}

/// An API token created over HTTP, with its one-time secret.
struct Token {
    id: String,
    name: String,
    secret: String,
}

fn string_field(value: &Value, field: &str) -> String {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string `{field}` in {value}"))
        .to_owned()
}

fn names(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|item| string_field(item, "name"))
        .collect()
}

/// The `keyplane` binary, with no `KEYPLANE_*` setting inherited from whoever runs the tests.
fn keyplane() -> Command {
    let mut command = Command::new(KEYPLANE);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KEYPLANE_") {
            command.env_remove(key);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// A child process that is killed and reaped when dropped, so no test leaves one behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls until `child` exits; `None` if it still runs after `limit`.
async fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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

struct CommandOutput {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs a short-lived command to completion within [`TIMEOUT`]. Its output must fit in the pipe
/// buffers, which holds for help text, a JSON line and an error message.
async fn run(command: &mut Command) -> CommandOutput {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyplane");
    let mut process = KillOnDrop(child);
    let status = wait_for_exit(&mut process.0, TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("{command:?} did not finish within {TIMEOUT:?}"));
    let mut stdout = String::new();
    let mut stderr = String::new();
    process
        .0
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    process
        .0
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    CommandOutput {
        status,
        stdout,
        stderr,
    }
}

/// How a server ended: its exit status and everything it logged.
struct Exited {
    status: ExitStatus,
    log: String,
}

/// A running `keyplane serve` on 127.0.0.1, killed if the test ends without stopping it.
struct Server {
    process: KillOnDrop,
    log: JoinHandle<String>,
    base_url: String,
    http: reqwest::Client,
}

impl Server {
    async fn start(store: &TestStore, extra_args: &[&str]) -> Self {
        let child = keyplane()
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--rate-limit-per-minute", "0"])
            .args(store.args())
            .args(extra_args)
            .env("KEYPLANE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keyplane serve");
        let mut process = KillOnDrop(child);
        let stderr = process.0.stderr.take().expect("piped stderr");
        let (address_tx, address_rx) = oneshot::channel();
        let log = std::thread::spawn(move || read_log(stderr, address_tx));

        let address = match tokio::time::timeout(TIMEOUT, address_rx).await {
            Ok(Ok(address)) => address,
            Ok(Err(_)) => {
                let status = wait_for_exit(&mut process.0, TIMEOUT).await;
                let log = log.join().unwrap_or_default();
                panic!("keyplane serve exited ({status:?}) before listening:\n{log}");
            }
            Err(_) => panic!("keyplane serve did not log `listening` within {TIMEOUT:?}"),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(TIMEOUT)
            .build()
            .expect("build an HTTP client");
        let server = Self {
            process,
            log,
            base_url: format!("http://{address}"),
            http,
        };
        let ready = server
            .http
            .get(format!("{}/readyz", server.base_url))
            .send()
            .await
            .expect("GET /readyz");
        assert_eq!(ready.status(), StatusCode::OK, "/readyz");
        server
    }

    /// SIGTERM, then wait for a graceful exit within [`SHUTDOWN_TIMEOUT`].
    async fn stop_term(mut self) -> Exited {
        let pid = self.process.0.id().to_string();
        let kill = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -TERM {pid} failed");
        let status = wait_for_exit(&mut self.process.0, SHUTDOWN_TIMEOUT)
            .await
            .unwrap_or_else(|| {
                panic!("keyplane serve did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM")
            });
        // The process has exited, so its stderr is closed and the reader is done.
        let log = self.log.join().expect("the log reader panicked");
        Exited { status, log }
    }

    /// SIGKILL: the process gets no chance to clean up.
    fn kill(self) {
        drop(self.process);
    }

    fn tokens_url(&self, org_id: &str) -> String {
        format!("{}/api/v1/organizations/{org_id}/api-tokens", self.base_url)
    }

    async fn get_tokens(&self, org_id: &str, bearer: &str) -> reqwest::Response {
        self.http
            .get(format!("{}?limit=100", self.tokens_url(org_id)))
            .bearer_auth(bearer)
            .send()
            .await
            .expect("GET api-tokens")
    }

    /// Every live token of `org`, which must fit in one page.
    async fn list_tokens(&self, org: &Org) -> Vec<Value> {
        let response = self.get_tokens(&org.id, &org.token).await;
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

    /// A token that may list its org's tokens, so that it can show it authenticates.
    async fn create_token(&self, org: &Org, name: &str) -> Token {
        let response = self
            .http
            .post(self.tokens_url(&org.id))
            .bearer_auth(&org.token)
            .json(&json!({ "name": name, "scopes": ["api_tokens:read"] }))
            .send()
            .await
            .expect("POST api-tokens");
        assert_eq!(response.status(), StatusCode::CREATED, "creating {name}");
        let created: Value = response.json().await.expect("the created token is JSON");
        Token {
            id: string_field(&created, "id"),
            name: name.to_owned(),
            secret: string_field(&created, "token"),
        }
    }

    async fn revoke_token(&self, org: &Org, id: &str) -> StatusCode {
        self.http
            .delete(format!("{}/{id}", self.tokens_url(&org.id)))
            .bearer_auth(&org.token)
            .send()
            .await
            .expect("DELETE api-token")
            .status()
    }
}

/// Collects the server's stderr until it closes, and sends the address from the `listening` line
/// as soon as it appears. Reads to the end so the server never blocks on a full pipe.
fn read_log(stderr: ChildStderr, address: oneshot::Sender<String>) -> String {
    let mut address = Some(address);
    let mut log = String::new();
    for line in BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        if let Some(found) = listening_address(&line) {
            if let Some(sender) = address.take() {
                let _ = sender.send(found);
            }
        }
        log.push_str(&line);
        log.push('\n');
    }
    log
}

fn listening_address(line: &str) -> Option<String> {
    let event: Value = serde_json::from_str(line).ok()?;
    if event["message"] != "listening" {
        return None;
    }
    event["address"].as_str().map(str::to_owned)
}

/// `--help` text split into one block per option: its flag line and the description below it.
fn option_blocks(help: &str) -> Vec<String> {
    let options = help.split_once("Options:\n").map_or("", |(_, rest)| rest);
    let mut blocks: Vec<String> = Vec::new();
    for line in options.lines() {
        let indent = line.len() - line.trim_start().len();
        let starts_option = line.trim_start().starts_with('-') && indent <= 6;
        match blocks.last_mut() {
            Some(block) if !starts_option => {
                block.push('\n');
                block.push_str(line);
            }
            _ => blocks.push(line.trim_start().to_owned()),
        }
    }
    blocks
}
