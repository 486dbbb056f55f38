//! The client commands against a scripted stand-in for keyplane on 127.0.0.1, for what a real
//! server does not do on demand: lose an answer, cut one short, hold an `Idempotency-Key`, answer
//! through a failing gateway, redirect, rate limit, restart under `audit tail --follow`, or echo
//! control characters. Each stand-in records every request it received.

mod common;

use common::{keyplane, read_request, wait_for_exit, CommandOutput, KillOnDrop, Seen};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{Read, Seek};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(30);
const TOKEN: &str = "aether_caller_token_that_must_stay_private";
const SECRET: &str = "aether_the_one_time_secret_of_the_created_token";
const ORG: &str = "6f1c2e1a-3b4d-4e5f-8a9b-0c1d2e3f4a5b";

fn header<'s>(seen: &'s Seen, name: &str) -> Option<&'s str> {
    seen.headers.get(name).map(String::as_str)
}

fn body_json(seen: &Seen) -> Value {
    serde_json::from_slice(&seen.body).expect("a JSON request body")
}

type Script = dyn Fn(usize, &Seen) -> Vec<u8> + Send + Sync;

/// A stand-in server: request `n` (counted from 0) gets the bytes `script(n, request)` returns,
/// then the connection is closed (no bytes at all: a lost answer).
struct Fake {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    async fn start(script: impl Fn(usize, &Seen) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve_one(stream, seen.clone(), script.clone()));
                }
            })
        };
        Self { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(mut stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, script: Arc<Script>) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    let n = {
        let mut seen = lock(&seen);
        seen.push(request.clone());
        seen.len() - 1
    };
    let reply = script(n, &request);
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}

/// The requests seen, even if a connection task panicked while holding them.
fn lock(seen: &Mutex<Vec<Seen>>) -> std::sync::MutexGuard<'_, Vec<Seen>> {
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A whole answer, the connection closed after it.
fn answer(status: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.into_bytes()
}

/// A 2xx whose body stops half-way.
fn cut_short(status: &str, body: &str) -> Vec<u8> {
    let mut whole = answer(status, &[], body);
    whole.truncate(whole.len() - body.len() / 2);
    whole
}

const LOST: Vec<u8> = Vec::new();

fn aether_error(code: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message}}).to_string()
}

fn created_token() -> String {
    json!({
        "id": "0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f",
        "org_id": ORG,
        "name": "ci",
        "prefix": "aether_the",
        "scopes": [],
        "last_used_at": null,
        "expires_at": null,
        "created_at": "2030-01-01T00:00:00Z",
        "previous_secret_expires_at": null,
        "previous_secret_last_used_at": null,
        "suspended_at": null,
        "canary": false,
        "token": SECRET,
    })
    .to_string()
}

/// The binary with `args`, its profiles in `home`, KEYPLANE_TOKEN set unless `token` is `None`.
fn client(home: &tempfile::TempDir, token: Option<&str>, args: &[&str]) -> Command {
    let mut command = keyplane();
    command
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("HOME", home.path())
        .args(args);
    if let Some(token) = token {
        command.env("KEYPLANE_TOKEN", token);
    }
    command
}

async fn run(command: &mut Command) -> CommandOutput {
    run_with_input(command, "").await
}

async fn run_with_input(command: &mut Command, input: &str) -> CommandOutput {
    let output = common::run_with_input(command, input, TIMEOUT).await;
    assert!(
        !output.stderr.contains(TOKEN) && !output.stdout.contains(TOKEN),
        "the caller's token was printed:\n{}",
        output.describe()
    );
    output
}

fn idempotency_keys(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| {
            header(s, "idempotency-key")
                .expect("an Idempotency-Key")
                .to_string()
        })
        .collect()
}

/// A create whose first attempt's answer is lost: the retries with its key meet "still in
/// progress", a success cut short and a gateway timeout, and the command still gets the secret.
#[tokio::test]
async fn a_create_is_retried_with_its_key_until_its_answer_arrives() {
    let fake = Fake::start(|n, _| match n {
        0 => LOST,
        1 => answer(
            "409 Conflict",
            &[("retry-after", "1")],
            &aether_error(
                "conflict",
                "a request with this Idempotency-Key is still in progress; retry it shortly",
            ),
        ),
        2 => cut_short("201 Created", &created_token()),
        3 => answer("504 Gateway Timeout", &[], "<html>gateway timeout</html>"),
        _ => answer("201 Created", &[], &created_token()),
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let args = [
        "tokens", "create", "--name", "ci", "--org", ORG, "--url", &url,
    ];
    let output = run(&mut client(
        &home,
        Some(TOKEN),
        &[&args[..], &["-o", "json"]].concat(),
    ))
    .await;
    assert!(output.status.success(), "{}", output.describe());
    let printed: Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(printed["token"], SECRET, "{}", output.describe());

    let seen = fake.seen();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let keys = idempotency_keys(&seen);
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
    assert!(seen.iter().all(|s| s.body == seen[0].body));
}

/// When the retries run out without an answer, the error says the token may exist and names a
/// new 0600 file holding the key (never the key itself: passed as an argument it would show in
/// `ps` and the shell's history); the same command with that file (and the expiry it came to)
/// sends the same request.
#[tokio::test]
async fn an_unknown_outcome_names_the_key_that_gets_its_answer() {
    let fake = Fake::start(|n, _| match n {
        0 => LOST,
        // Longer than a command line waits: reported at once.
        _ => answer(
            "503 Service Unavailable",
            &[("retry-after", "120")],
            &aether_error("unavailable", "the store is unavailable"),
        ),
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let create = [
        "tokens", "create", "--name", "ci", "--org", ORG, "--url", &url,
    ];
    let args = [&create[..], &["--expires-in", "30d"]].concat();
    let output = run(&mut client(&home, Some(TOKEN), &args)).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    let first = fake.seen();
    assert_eq!(first.len(), 2, "{first:?}");
    let key = idempotency_keys(&first)[0].clone();
    assert!(
        output.stderr.contains("may have been done") && !output.stderr.contains(&key),
        "{}",
        output.describe()
    );
    let key_file = output
        .stderr
        .split("--idempotency-key-file ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no key file named: {}", output.describe()))
        .to_string();
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), key);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key_file}");
    }
    let expires_at = body_json(&first[0])["expires_at"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        output.stderr.contains(&format!(
            "--expires-at {expires_at} (in place of --expires-in)"
        )),
        "{}",
        output.describe()
    );

    let retry = Fake::start(|_, _| answer("201 Created", &[], &created_token())).await;
    let url = retry.url();
    let create = [
        "tokens", "create", "--name", "ci", "--org", ORG, "--url", &url,
    ];
    let again = [
        &create[..],
        &[
            "--expires-at",
            &expires_at,
            "--idempotency-key-file",
            &key_file,
        ],
        &["-o", "json"],
    ]
    .concat();
    let output = run(&mut client(&home, Some(TOKEN), &again)).await;
    assert!(output.status.success(), "{}", output.describe());
    let seen = retry.seen();
    assert_eq!(idempotency_keys(&seen), [key]);
    assert_eq!(seen[0].body, first[0].body, "not the same request");

    // A key the server would refuse is refused before anything is sent, given or in a file.
    let short = home.path().join("short.key");
    std::fs::write(&short, "short\n").unwrap();
    for given in [
        ["--idempotency-key", "short"],
        ["--idempotency-key-file", short.to_str().unwrap()],
    ] {
        let bad = [&create[..], &given].concat();
        let output = run(&mut client(&home, Some(TOKEN), &bad)).await;
        assert_eq!(output.status.code(), Some(2), "{}", output.describe());
        assert!(
            output.stderr.contains("at least 16"),
            "{}",
            output.describe()
        );
    }
    assert_eq!(retry.seen().len(), 1);
}

/// A redirect is reported with the URL it points to; neither the token nor a body of secrets
/// follows it.
#[tokio::test]
async fn redirects_are_reported_and_not_followed() {
    let elsewhere = Fake::start(|_, _| answer("200 OK", &[], "{}")).await;
    let target = elsewhere.url();
    let fake = Fake::start(move |_, request| {
        let location = format!("{target}{}", request.path);
        answer("307 Temporary Redirect", &[("location", &location)], "")
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let leaked = "aether_a_token_to_introspect_that_must_not_travel";
    for (args, input) in [
        (vec!["whoami", "--url", &url], ""),
        (vec!["introspect", "-", "--url", &url], leaked),
    ] {
        let output = run_with_input(&mut client(&home, Some(TOKEN), &args), input).await;
        assert_eq!(output.status.code(), Some(1), "{}", output.describe());
        assert!(
            output.stderr.contains("redirected")
                && output
                    .stderr
                    .contains(&format!("use --url {}", elsewhere.url())),
            "{}",
            output.describe()
        );
        assert!(!output.stderr.contains(leaked), "{}", output.describe());
    }
    assert_eq!(fake.seen().len(), 2);
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
}

/// A profile's token is sent only to the URL it was saved with; KEYPLANE_TOKEN beside a named
/// profile is refused as ambiguous. `login` escapes whatever the server says about the caller.
#[tokio::test]
async fn a_profile_token_goes_to_its_own_server_only() {
    let whoami = json!({
        "kind": "api_token\u{1b}[2J",
        "id": "\u{1b}]0;forged title\u{7}",
        "org_id": "org\ninjected line",
        "name": "ci",
        "scopes": ["*"],
        "expires_at": null,
        "secret": "current",
    })
    .to_string();
    let home = tempfile::tempdir().unwrap();
    let saved_for = Fake::start(move |_, _| answer("200 OK", &[], &whoami)).await;
    let other = Fake::start(|_, _| answer("200 OK", &[], "{}")).await;
    let token_file = home.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let url = saved_for.url();
    let login = [
        "login",
        "--url",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
        "--profile",
        "prod",
    ];
    let output = run(&mut client(&home, None, &login)).await;
    assert!(output.status.success(), "{}", output.describe());
    assert!(
        !output.stderr.contains('\u{1b}') && !output.stderr.contains("\ninjected"),
        "control characters reached the terminal:\n{}",
        output.describe()
    );
    assert!(
        output.stderr.contains(r"\u{1b}[2J"),
        "{}",
        output.describe()
    );

    let elsewhere = other.url();
    let output = run(&mut client(
        &home,
        None,
        &["whoami", "--profile", "prod", "--url", &elsewhere],
    ))
    .await;
    assert_eq!(output.status.code(), Some(3), "{}", output.describe());
    assert!(
        output.stderr.contains(&format!("was saved for {url}")),
        "{}",
        output.describe()
    );
    assert!(other.seen().is_empty(), "{:?}", other.seen());
    // The same server, spelled with a trailing slash, is the profile's.
    let output = run(&mut client(
        &home,
        None,
        &["whoami", "--profile", "prod", "--url", &format!("{url}/")],
    ))
    .await;
    assert!(output.status.success(), "{}", output.describe());
    let seen = saved_for.seen();
    let last = seen.last().unwrap();
    assert_eq!(
        header(last, "authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    let output = run(&mut client(
        &home,
        Some("aether_another_token"),
        &["whoami", "--profile", "prod"],
    ))
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("KEYPLANE_TOKEN"),
        "{}",
        output.describe()
    );
    assert_eq!(saved_for.seen().len(), seen.len());
}

/// KEYPLANE_TOKEN never travels to a URL taken from a profile, the implicit `default` one
/// included: exported for another server, it would go to the profile's. With a URL of its own
/// it works beside the profile.
#[tokio::test]
async fn keyplane_token_goes_only_to_a_url_given_beside_it() {
    let home = tempfile::tempdir().unwrap();
    let prod = Fake::start(|_, _| answer("200 OK", &[], &whoami_answer())).await;
    let staging = Fake::start(|_, _| answer("200 OK", &[], &whoami_answer())).await;
    let token_file = home.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let prod_url = prod.url();
    let login = [
        "login",
        "--url",
        &prod_url,
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let output = run(&mut client(&home, None, &login)).await;
    assert!(output.status.success(), "{}", output.describe());
    let logged_in = prod.seen().len();

    let staging_token = "aether_a_staging_token_exported_in_this_shell";
    let output = run(&mut client(
        &home,
        Some(staging_token),
        &["tokens", "list", "--org", ORG],
    ))
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("KEYPLANE_TOKEN")
            && output.stderr.contains("--url")
            && output.stderr.contains("KEYPLANE_URL"),
        "{}",
        output.describe()
    );
    assert!(
        !output.stderr.contains(staging_token),
        "{}",
        output.describe()
    );
    assert_eq!(prod.seen().len(), logged_in, "{:?}", prod.seen());

    // The token's own server, named beside it, is used; the profile stays out of it.
    let staging_url = staging.url();
    let mut command = client(&home, Some(staging_token), &["whoami"]);
    command.env("KEYPLANE_URL", &staging_url);
    let output = run(&mut command).await;
    assert!(output.status.success(), "{}", output.describe());
    let output = run(&mut client(
        &home,
        Some(staging_token),
        &["whoami", "--url", &staging_url],
    ))
    .await;
    assert!(output.status.success(), "{}", output.describe());
    let seen = staging.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(
            header(request, "authorization"),
            Some(format!("Bearer {staging_token}").as_str())
        );
    }
    assert_eq!(prod.seen().len(), logged_in);
}

fn whoami_answer() -> String {
    json!({
        "kind": "api_token",
        "id": "0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f",
        "org_id": ORG,
        "name": "ci",
        "scopes": ["*"],
        "expires_at": null,
        "secret": "current",
    })
    .to_string()
}

/// `--verbose` shows an idempotent request's headers without its Idempotency-Key: the key
/// derives the one that seals the stored answer (secret included) for 24 hours.
#[tokio::test]
async fn verbose_output_redacts_the_idempotency_key() {
    let fake = Fake::start(|_, _| answer("201 Created", &[], &created_token())).await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let key = "a-key-the-verbose-dump-must-not-show";
    let output = run(&mut client(
        &home,
        Some(TOKEN),
        &[
            "tokens",
            "create",
            "-v",
            "--name",
            "x",
            "--idempotency-key",
            key,
            "--org",
            ORG,
            "--url",
            &url,
        ],
    ))
    .await;
    assert!(output.status.success(), "{}", output.describe());
    assert!(
        output.stderr.contains("> idempotency-key: <redacted>"),
        "{}",
        output.describe()
    );
    assert!(!output.stderr.contains(key), "{}", output.describe());
    assert_eq!(idempotency_keys(&fake.seen()), [key]);
}

/// `introspect` takes the token from stdin only: on the command line, a live credential would
/// show in `ps` and the shell's history. Such a run is refused before anything is sent.
#[tokio::test]
async fn introspect_refuses_a_token_on_the_command_line() {
    let fake = Fake::start(|_, _| answer("200 OK", &[], r#"{"active":false}"#)).await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let given = "aether_a_live_token_typed_where_ps_can_see_it";
    let output = run(&mut client(
        &home,
        Some(TOKEN),
        &["introspect", given, "--url", &url],
    ))
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("keyplane introspect - < token.txt"),
        "{}",
        output.describe()
    );
    assert!(!output.stderr.contains(given), "{}", output.describe());
    // Refused before a credential is looked for: the same without one.
    let output = run(&mut client(
        &home,
        None,
        &["introspect", given, "--url", &url],
    ))
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", output.describe());
    assert!(fake.seen().is_empty(), "{:?}", fake.seen());

    let output = run_with_input(
        &mut client(&home, Some(TOKEN), &["introspect", "-", "--url", &url]),
        given,
    )
    .await;
    assert_eq!(output.status.code(), Some(5), "{}", output.describe());
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        String::from_utf8_lossy(&seen[0].body),
        format!("token={given}")
    );
}

const WEBHOOK: &str = "0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f";

fn webhook_json(url: &str, secret: bool) -> String {
    let mut webhook = json!({
        "id": WEBHOOK,
        "org_id": ORG,
        "url": url,
        "events": ["*"],
        "description": "",
        "enabled": true,
        "failing_since": null,
        "previous_secret_expires_at": null,
        "created_at": "2030-01-01T00:00:00Z",
        "updated_at": "2030-01-01T00:00:00Z",
    });
    if secret {
        webhook["secret"] = json!(format!("whsec_{}", "A".repeat(43) + "="));
    }
    webhook.to_string()
}

/// `--endpoint-file` gives a webhook's URL from a file, so a receiver's token in its path or
/// query stays out of `ps` and the shell's history; create and update send it as the `url`, and
/// neither `--verbose` nor an error repeats it.
#[tokio::test]
async fn a_webhook_endpoint_is_read_from_a_file() {
    let fake = Fake::start(|_, request| match request.method.as_str() {
        "POST" => answer(
            "201 Created",
            &[],
            &webhook_json(body_json(request)["url"].as_str().unwrap(), true),
        ),
        "PUT" => answer(
            "200 OK",
            &[],
            &webhook_json(body_json(request)["url"].as_str().unwrap(), false),
        ),
        _ => answer(
            "200 OK",
            &[],
            &webhook_json("https://old.example.com/x", false),
        ),
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let endpoint = "https://hooks.example.com/in/a-receivers-token?key=a-second-secret";
    let file = home.path().join("endpoint");
    std::fs::write(&file, format!("{endpoint}\n")).unwrap();
    let file = file.to_str().unwrap();
    let target = ["--org", ORG, "--url", &url];

    let create = [
        &[
            "webhooks",
            "create",
            "--endpoint-file",
            file,
            "--event",
            "*",
            "-v",
        ],
        &target[..],
    ];
    let output = run(&mut client(&home, Some(TOKEN), &create.concat())).await;
    assert!(output.status.success(), "{}", output.describe());
    // --verbose shows the body with the endpoint's origin only, as the audit trail does.
    assert!(
        output
            .stderr
            .contains(r#""url":"https://hooks.example.com/<redacted>""#),
        "{}",
        output.describe()
    );
    assert!(
        !output.stderr.contains("a-receivers-token"),
        "{}",
        output.describe()
    );
    let seen = fake.seen();
    assert_eq!(
        (seen[0].method.as_str(), body_json(&seen[0])["url"].as_str()),
        ("POST", Some(endpoint))
    );

    let moved = "https://hooks.example.com/in/another-receivers-token";
    let other = home.path().join("moved");
    std::fs::write(&other, moved).unwrap();
    let other = other.to_str().unwrap();
    let update = [
        &["webhooks", "update", WEBHOOK, "--endpoint-file", other],
        &target[..],
    ];
    let output = run(&mut client(&home, Some(TOKEN), &update.concat())).await;
    assert!(output.status.success(), "{}", output.describe());
    let seen = fake.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        (seen[2].method.as_str(), body_json(&seen[2])["url"].as_str()),
        ("PUT", Some(moved))
    );

    // One of the two, and a file that holds no URL is a usage error that does not quote it.
    let both = [
        &[
            "webhooks",
            "create",
            "--endpoint-file",
            file,
            "--endpoint",
            endpoint,
            "--event",
            "*",
        ],
        &target[..],
    ];
    let output = run(&mut client(&home, Some(TOKEN), &both.concat())).await;
    assert_eq!(output.status.code(), Some(2), "{}", output.describe());
    let garbled = home.path().join("garbled");
    std::fs::write(&garbled, "hooks.example.com/in/a-receivers-token").unwrap();
    let create = [
        &[
            "webhooks",
            "create",
            "--endpoint-file",
            garbled.to_str().unwrap(),
            "--event",
            "*",
        ],
        &target[..],
    ];
    let output = run(&mut client(&home, Some(TOKEN), &create.concat())).await;
    assert_eq!(output.status.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("--endpoint-file"),
        "{}",
        output.describe()
    );
    assert!(
        !output.stderr.contains("a-receivers-token"),
        "{}",
        output.describe()
    );
    assert_eq!(fake.seen().len(), 3);
}

/// A one-time secret that cannot reach stdout (its reader is gone) fails the command and says
/// the credential exists and needs a rotation.
#[tokio::test]
async fn a_secret_that_cannot_be_printed_fails_the_command() {
    let fake = Fake::start(|_, _| answer("201 Created", &[], &created_token())).await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    for format in ["json", "table"] {
        let mut command = client(
            &home,
            Some(TOKEN),
            &[
                "tokens", "create", "--name", "ci", "--org", ORG, "--url", &url, "-o", format,
            ],
        );
        let mut stderr = tempfile::tempfile().unwrap();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(stderr.try_clone().unwrap())
            .spawn()
            .unwrap();
        // As `| head -0` would: the reader is gone before anything is written.
        drop(child.stdout.take());
        let mut child = KillOnDrop(child);
        let status = wait_for_exit(&mut child.0, TIMEOUT).await.expect("exits");
        let mut text = String::new();
        stderr.rewind().unwrap();
        stderr.read_to_string(&mut text).unwrap();
        assert_eq!(status.code(), Some(1), "{format}: {text}");
        assert!(text.contains("rotate it again"), "{format}: {text}");
        assert!(!text.contains(SECRET) && !text.contains(TOKEN), "{text}");
    }
}

/// `revoke-leaked` sends each token once, waits out a 429, and on a failure says how far it got.
#[tokio::test]
async fn revoke_leaked_sends_each_token_once_and_waits_out_the_limit() {
    let accepted = |request: &Seen| {
        let count = body_json(request)["credentials"].as_array().unwrap().len();
        answer(
            "202 Accepted",
            &[],
            &json!({"received": count, "well_formed": 0}).to_string(),
        )
    };
    let fake = Fake::start(move |n, request| match n {
        // The server's default limit: a burst of 10 requests per address.
        10 => answer(
            "429 Too Many Requests",
            &[("retry-after", "1")],
            &json!({"error": "rate_limited", "error_description": "too many requests"}).to_string(),
        ),
        _ => accepted(request),
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let tokens: Vec<String> = (0..1100).map(|i| format!("leaked-{i}")).collect();
    // Every token twice, one a line, as `grep -o` finds them.
    let twice: String = tokens
        .iter()
        .chain(&tokens)
        .map(|t| format!("{t}\n"))
        .collect();
    let url = fake.url();
    let args = ["revoke-leaked", "-", "--url", &url, "-o", "json"];
    let output = run_with_input(&mut client(&home, None, &args), &twice).await;
    assert!(output.status.success(), "{}", output.describe());
    let total: Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(total, json!({"received": 1100, "well_formed": 0}));
    let seen = fake.seen();
    assert_eq!(seen.len(), 12, "11 batches and one retry");
    let mut reported: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != 10)
        .flat_map(|(_, s)| body_json(s)["credentials"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    reported.sort();
    reported.dedup();
    assert_eq!(reported.len(), 1100);

    let failing = Fake::start(move |n, request| match n {
        2 => answer(
            "400 Bad Request",
            &[],
            &json!({"error": "invalid_request", "error_description": "no"}).to_string(),
        ),
        _ => accepted(request),
    })
    .await;
    let url = failing.url();
    let args = ["revoke-leaked", "-", "--url", &url];
    let output = run_with_input(&mut client(&home, None, &args), &twice).await;
    assert_eq!(output.status.code(), Some(1), "{}", output.describe());
    assert!(
        output
            .stderr
            .contains("Reported the first 200 of 1100 distinct tokens"),
        "{}",
        output.describe()
    );
}

fn event(seq: u64) -> Value {
    json!({
        "id": format!("00000000-0000-4000-8000-{seq:012}"),
        "org_id": ORG,
        "seq": seq,
        "occurred_at": "2030-01-01T00:00:00Z",
        "action": "api_token.created",
        "outcome": "success",
        "actor": {"type": "api_token", "id": null},
        "target": null,
        "request_id": null,
        "client_ip": null,
        "user_agent": null,
        "details": {},
        "chain_hash": format!("{seq:064x}"),
    })
}

/// `audit tail -n 1 --follow --interval 1s -o jsonl` against `url`.
fn follow_command(home: &tempfile::TempDir, url: &str) -> Command {
    client(
        home,
        Some(TOKEN),
        &[
            "audit",
            "tail",
            "-n",
            "1",
            "--follow",
            "--interval",
            "1s",
            "--org",
            ORG,
            "--url",
            url,
            "-o",
            "jsonl",
        ],
    )
}

/// Runs `audit tail -n 1 --follow` against `url` until it printed `lines` events; their `seq`s,
/// and what it wrote to stderr.
async fn tail_follow(url: &str, lines: usize) -> (Vec<u64>, String) {
    let home = tempfile::tempdir().unwrap();
    let mut command = follow_command(&home, url);
    let mut stdout = tempfile::tempfile().unwrap();
    let mut stderr = tempfile::tempfile().unwrap();
    let mut child = KillOnDrop(
        command
            .stdout(stdout.try_clone().unwrap())
            .stderr(stderr.try_clone().unwrap())
            .spawn()
            .unwrap(),
    );
    let read = |file: &mut File| {
        let mut text = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        text
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let printed = read(&mut stdout);
        if printed.lines().count() >= lines {
            break;
        }
        let exited = child.0.try_wait().unwrap();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "exited: {exited:?}\nstdout: {printed}\nstderr: {}",
            read(&mut stderr)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let printed = read(&mut stdout);
    let seqs: Vec<u64> = printed
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    (seqs, read(&mut stderr))
}

/// `audit tail --follow` keeps following through a 503 and a dropped connection, saying so.
#[tokio::test]
async fn audit_tail_follows_through_a_restart() {
    let fake = Fake::start(|n, _| match n {
        0 => answer(
            "200 OK",
            &[],
            &json!({"items": [event(1)], "next_cursor": null}).to_string(),
        ),
        1 => answer(
            "503 Service Unavailable",
            &[("retry-after", "1")],
            &aether_error("unavailable", "the store is unavailable"),
        ),
        2 => LOST,
        _ => answer(
            "200 OK",
            &[],
            &json!({"items": [event(2), event(1)], "next_cursor": null}).to_string(),
        ),
    })
    .await;
    let (seqs, notices) = tail_follow(&fake.url(), 2).await;
    assert_eq!(seqs, [1, 2]);
    assert!(
        notices.contains("reconnecting in") && notices.contains("reconnected"),
        "{notices}"
    );
    assert!(!notices.contains(TOKEN));
}

/// `audit tail --follow` follows by `seq`: an event committed after one it printed, though stamped
/// over a minute earlier (an aggregated refusal carries its first refusal's time), is printed too.
#[tokio::test]
async fn audit_tail_prints_an_event_committed_late_with_an_earlier_time() {
    let at = |seq: u64, time: &str| {
        let mut event = event(seq);
        event["occurred_at"] = json!(time);
        event
    };
    let fake = Fake::start(move |n, seen| {
        let items = if n == 0 {
            vec![at(2, "2030-01-01T00:01:00Z")]
        } else if seen.path.contains("after=2-") {
            vec![at(3, "2029-12-31T23:58:00Z")]
        } else {
            // What the server answers a `since` a minute before the newest event seen.
            vec![at(2, "2030-01-01T00:01:00Z")]
        };
        answer(
            "200 OK",
            &[],
            &json!({"items": items, "next_cursor": null}).to_string(),
        )
    })
    .await;
    let (seqs, _) = tail_follow(&fake.url(), 2).await;
    assert_eq!(seqs, [2, 3]);
}

/// `audit tail --follow` into a reader that went away (`| grep -m1 ...`, `| head -1`) ends, with
/// status 0, at the next event it cannot write: it does not poll on for nobody.
#[tokio::test]
async fn audit_tail_follow_ends_when_its_reader_is_gone() {
    // Every poll finds one event newer than the last.
    let fake = Fake::start(|n, _| {
        answer(
            "200 OK",
            &[],
            &json!({"items": [event(n as u64 + 1)], "next_cursor": null}).to_string(),
        )
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let mut command = follow_command(&home, &fake.url());
    let mut stderr = tempfile::tempfile().unwrap();
    let mut child = KillOnDrop(
        command
            .stdout(Stdio::piped())
            .stderr(stderr.try_clone().unwrap())
            .spawn()
            .unwrap(),
    );
    let mut stdout = child.0.stdout.take().unwrap();
    // Off the runtime, which serves the stand-in meanwhile. Then gone, as `grep -m1` is once it
    // found its line.
    let read = tokio::task::spawn_blocking(move || stdout.read_exact(&mut [0u8; 1]))
        .await
        .unwrap();
    let status = wait_for_exit(&mut child.0, Duration::from_secs(10)).await;
    let mut notices = String::new();
    stderr.rewind().unwrap();
    stderr.read_to_string(&mut notices).unwrap();
    read.unwrap_or_else(|e| panic!("nothing printed ({e}): {notices}"));
    let status = status.expect("audit tail --follow still runs with nobody reading it");
    assert_eq!(status.code(), Some(0), "{notices}");
}

fn token_view(id: &str) -> Value {
    let mut view: Value = serde_json::from_str(&created_token()).unwrap();
    view.as_object_mut().unwrap().remove("token");
    view["id"] = json!(id);
    view
}

fn rate_limited() -> Vec<u8> {
    answer(
        "429 Too Many Requests",
        &[("retry-after", "1")],
        &aether_error("rate_limited", "too many requests"),
    )
}

const FIRST: &str = "11111111-1111-4111-8111-111111111111";
const LAST: &str = "22222222-2222-4222-8222-222222222222";

/// A 429 means nothing was done: a list's next page and a revoke wait it out like a create does,
/// instead of failing half-way (a long `tokens list` meets the per-credential limit).
#[tokio::test]
async fn a_rate_limited_read_or_revoke_waits_and_goes_on() {
    let fake = Fake::start(|n, _| match n {
        0 => answer(
            "200 OK",
            &[],
            &json!({"items": [token_view(FIRST)], "next_cursor": FIRST}).to_string(),
        ),
        1 => rate_limited(),
        _ => answer(
            "200 OK",
            &[],
            &json!({"items": [token_view(LAST)], "next_cursor": null}).to_string(),
        ),
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let args = ["tokens", "list", "--org", ORG, "--url", &url, "-o", "json"];
    let output = run(&mut client(&home, Some(TOKEN), &args)).await;
    assert!(output.status.success(), "{}", output.describe());
    let printed: Value = serde_json::from_str(&output.stdout).unwrap();
    let ids: Vec<&str> = printed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [FIRST, LAST]);
    let seen = fake.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[1].path, seen[2].path, "the same page asked again");

    let fake = Fake::start(|n, _| match n {
        0 => rate_limited(),
        _ => answer("204 No Content", &[], ""),
    })
    .await;
    let url = fake.url();
    let args = ["tokens", "revoke", FIRST, "--org", ORG, "--url", &url];
    let output = run(&mut client(&home, Some(TOKEN), &args)).await;
    assert!(output.status.success(), "{}", output.describe());
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.method == "DELETE"));
}

/// The "More: --cursor" hint goes to stderr in every format, so a script reading JSON lines
/// learns that it got one page of several; stdout stays pure data.
#[tokio::test]
async fn every_format_says_there_is_another_page() {
    let fake = Fake::start(|_, request| {
        let items = if request.path.contains("/audit-events") {
            json!([event(2), event(1)])
        } else {
            json!([token_view(FIRST)])
        };
        answer(
            "200 OK",
            &[],
            &json!({"items": items, "next_cursor": LAST}).to_string(),
        )
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let target = ["--org", ORG, "--url", &url];
    for (command, format) in [
        (&["audit", "list", "--outcome", "denied"][..], "jsonl"),
        (&["audit", "list"][..], "json"),
        (&["tokens", "list", "--limit", "1"][..], "jsonl"),
        (&["tokens", "list", "--cursor", FIRST][..], "table"),
    ] {
        let args = [command, &target[..], &["-o", format]].concat();
        let output = run(&mut client(&home, Some(TOKEN), &args)).await;
        assert!(output.status.success(), "{}", output.describe());
        assert!(
            output.stderr.contains(&format!("More: --cursor {LAST}")),
            "{}",
            output.describe()
        );
        if format == "jsonl" {
            for line in output.stdout.lines() {
                serde_json::from_str::<Value>(line).expect("a JSON line");
            }
        }
    }
}

/// `revoke-leaked` waits out the public revocation limit even when it asks for longer than other
/// commands wait (`--public-revoke-per-minute` under 6 asks for over 10 s).
#[tokio::test]
async fn revoke_leaked_waits_out_a_long_limit() {
    let fake = Fake::start(|n, _| match n {
        0 => answer(
            "429 Too Many Requests",
            &[("retry-after", "12")],
            &json!({"error": "rate_limited", "error_description": "too many requests"}).to_string(),
        ),
        _ => answer(
            "202 Accepted",
            &[],
            &json!({"received": 1, "well_formed": 0}).to_string(),
        ),
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let args = ["revoke-leaked", "leaked-1", "--url", &url, "-o", "json"];
    let started = Instant::now();
    let output = run(&mut client(&home, None, &args)).await;
    assert!(output.status.success(), "{}", output.describe());
    assert!(started.elapsed() >= Duration::from_secs(12));
    // A wait that long is not silent.
    assert!(
        output.stderr.contains("asked to wait 12 s"),
        "{}",
        output.describe()
    );
    assert_eq!(fake.seen().len(), 2);
}

/// A replica that died between claiming a create's Idempotency-Key and committing holds the key
/// for the server's 60 s lock, counted from its claim: the client retries past it, gets the
/// create done once, and does not report "may have been done" for a change never made.
#[tokio::test]
async fn a_create_is_retried_until_a_dead_replicas_key_lock_ends() {
    const LOCK: Duration = Duration::from_secs(60);
    let claimed: Arc<Mutex<Option<Instant>>> = Arc::default();
    let fake = Fake::start(move |n, _| {
        let mut claimed = claimed.lock().unwrap();
        let at = *claimed.get_or_insert_with(Instant::now);
        match n {
            // The replica that claimed the key dies before answering.
            0 => LOST,
            _ if at.elapsed() < LOCK => answer(
                "409 Conflict",
                &[("retry-after", "1")],
                &aether_error(
                    "conflict",
                    "a request with this Idempotency-Key is still in progress; retry it shortly",
                ),
            ),
            _ => answer("201 Created", &[], &created_token()),
        }
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let url = fake.url();
    let args = [
        "tokens", "create", "--name", "ci", "--org", ORG, "--url", &url, "-o", "json",
    ];
    let output = common::run(
        &mut client(&home, Some(TOKEN), &args),
        Duration::from_secs(120),
    )
    .await;
    assert!(output.status.success(), "{}", output.describe());
    let printed: Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(printed["token"], SECRET);
    let keys = idempotency_keys(&fake.seen());
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
}
