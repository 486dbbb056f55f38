//! The `keyplane` client commands, black-box: the binary against a real `keyplane serve` on both
//! stores, every command in table and JSON output, exit statuses, secrets only where they
//! belong, and `keyplane login` typed into a real pseudo-terminal.
//!
//! One server per backend runs the whole tour (the CI budget); each resource's commands are one
//! step function, so a failure names its step.

mod common;

use common::{
    both_stores, free_loopback_port, keyplane, CommandOutput, Keyplane, KillOnDrop, Receiver,
    TestStore,
};
use keyplane_store::testing::Backend;
use serde_json::Value;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

both_stores!(every_client_command);

/// The binary pointed at one server with one credential, its profiles in a private temp dir.
struct Cli {
    url: String,
    token: String,
    home: tempfile::TempDir,
}

impl Cli {
    fn command(&self) -> Command {
        let mut command = keyplane();
        command
            .env("KEYPLANE_URL", &self.url)
            .env("KEYPLANE_TOKEN", &self.token)
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("HOME", self.home.path());
        command
    }

    fn path(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }

    /// Runs `keyplane ARGS` (stdin from `input`); the caller's token never shows on stderr.
    async fn run_with(&self, mut command: Command, args: &[&str], input: &str) -> CommandOutput {
        command.args(args);
        let output = run_with_stdin(&mut command, input).await;
        assert!(
            !output.stderr.contains(&self.token),
            "the credential leaked to stderr:\n{}",
            output.describe()
        );
        output
    }

    async fn run(&self, args: &[&str]) -> CommandOutput {
        self.run_with(self.command(), args, "").await
    }

    async fn ok(&self, args: &[&str]) -> CommandOutput {
        let output = self.run(args).await;
        assert!(output.status.success(), "{}", output.describe());
        output
    }

    /// `keyplane ARGS -o json`, which must succeed with one JSON document.
    async fn json(&self, args: &[&str]) -> Value {
        let output = self.ok(&[args, &["-o", "json"]].concat()).await;
        serde_json::from_str(&output.stdout)
            .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{}", output.describe()))
    }

    /// `keyplane ARGS -o jsonl`: one JSON document per line.
    async fn jsonl(&self, args: &[&str]) -> Vec<Value> {
        let output = self.ok(&[args, &["-o", "jsonl"]].concat()).await;
        output
            .stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    async fn table(&self, args: &[&str]) -> String {
        self.ok(&[args, &["-o", "table"]].concat()).await.stdout
    }

    /// Runs `ARGS`, which must exit with `status`.
    async fn fails(&self, args: &[&str], status: i32) -> CommandOutput {
        let output = self.run(args).await;
        assert_eq!(output.status.code(), Some(status), "{}", output.describe());
        assert!(
            output.stderr.starts_with("error: "),
            "{}",
            output.describe()
        );
        output
    }

    /// The same CLI with another credential.
    fn with_token(&self, token: &str) -> Cli {
        Cli {
            url: self.url.clone(),
            token: token.to_string(),
            home: tempfile::tempdir().expect("create a temporary directory"),
        }
    }
}

async fn run_with_stdin(command: &mut Command, input: &str) -> CommandOutput {
    common::run_with_input(command, input, TIMEOUT).await
}

fn str_of<'v>(value: &'v Value, field: &str) -> &'v str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string `{field}` in {value}"))
}

/// The value of `key` in a detail table (`key  value` lines, the keys padded to one width).
fn field(table: &str, key: &str) -> String {
    table
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(key)?;
            rest.starts_with("  ").then(|| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no `{key}` in:\n{table}"))
}

fn names(items: &[Value]) -> Vec<&str> {
    items.iter().map(|item| str_of(item, "name")).collect()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

async fn every_client_command(backend: Backend) {
    let store = TestStore::new(backend).await;
    // Private targets: the webhooks step's receiver listens on loopback.
    let server = Keyplane::start(&store, &["--webhook-allow-private-targets"], TIMEOUT).await;
    let org = store.bootstrap_org();
    let cli = Cli {
        url: server.url(""),
        token: org.token.clone(),
        home: tempfile::tempdir().expect("create a temporary directory"),
    };
    whoami_and_introspect(&cli, &org.id).await;
    tokens(&cli, &org.id).await;
    secrets_stay_out_of_stderr_and_verbose(&cli).await;
    service_accounts_and_grants(&cli).await;
    registry_and_robots(&cli).await;
    audit(&cli).await;
    exit_statuses(&cli).await;
    lifecycle(&cli).await;
    credential_policy(&cli).await;
    revoke_leaked(&cli).await;
    webhooks(&cli).await;
    login_through_a_terminal(&cli).await;
}

async fn whoami_and_introspect(cli: &Cli, org_id: &str) {
    let me = cli.json(&["whoami"]).await;
    assert_eq!(str_of(&me, "org_id"), org_id);
    assert_eq!(me["scopes"], serde_json::json!(["*"]));
    let table = cli.table(&["whoami"]).await;
    assert_eq!(field(&table, "kind"), "api_token");
    assert_eq!(field(&table, "expires_at"), "never");

    // `-` reads the token from stdin, so it stays out of argv.
    let answer = cli
        .run_with(
            cli.command(),
            &["introspect", "-", "-o", "json"],
            &cli.token,
        )
        .await;
    assert!(answer.status.success(), "{}", answer.describe());
    let answer: Value = serde_json::from_str(&answer.stdout).unwrap();
    assert_eq!(answer["active"], true);
    assert_eq!(str_of(&answer, "org_id"), org_id);
    // Not active: the answer is printed, and the status (5) lets a script test it.
    let unknown = format!("aether_{}", "0".repeat(56));
    let inactive = cli
        .run_with(cli.command(), &["introspect", "-", "-o", "json"], &unknown)
        .await;
    assert_eq!(inactive.status.code(), Some(5), "{}", inactive.describe());
    let inactive: Value = serde_json::from_str(&inactive.stdout).unwrap();
    assert_eq!(inactive, serde_json::json!({"active": false}));
    let table = cli
        .run_with(cli.command(), &["introspect", "-", "-o", "table"], &unknown)
        .await;
    assert_eq!(table.status.code(), Some(5), "{}", table.describe());
    assert_eq!(table.stdout.trim(), "active  false");
    assert!(table.stderr.contains("not active"), "{}", table.describe());
}

async fn tokens(cli: &Cli, org_id: &str) {
    let created = cli
        .run(&[
            "tokens",
            "create",
            "--name",
            "ci-reader",
            "--scope",
            "api_tokens:read",
            "--expires-in",
            "30d",
            "-o",
            "json",
        ])
        .await;
    assert!(created.status.success(), "{}", created.describe());
    let token: Value = serde_json::from_str(&created.stdout).unwrap();
    let secret = str_of(&token, "token").to_string();
    assert!(secret.starts_with("aether_"), "{token}");
    assert_eq!(str_of(&token, "org_id"), org_id);
    assert_eq!(token["scopes"], serde_json::json!(["api_tokens:read"]));
    let expires: chrono::DateTime<chrono::Utc> = str_of(&token, "expires_at").parse().unwrap();
    let in_30_days = chrono::Utc::now() + chrono::Duration::days(30);
    assert!(
        (expires - in_30_days).num_seconds().abs() < 120,
        "{expires}"
    );
    // The secret goes to stdout once; stderr warns in one line and never holds it.
    assert!(!created.stderr.contains(&secret));
    assert_eq!(created.stderr.lines().count(), 1, "{}", created.describe());
    assert!(
        created.stderr.contains("shown only this once"),
        "{}",
        created.describe()
    );
    let id = str_of(&token, "id").to_string();

    // The new token acts within its scope: it may list, not create (403: exit 1, the API's code).
    let reader = cli.with_token(&secret);
    let listed = reader.json(&["tokens", "list"]).await;
    assert!(names(listed["items"].as_array().unwrap()).contains(&"ci-reader"));
    let refused = reader.fails(&["tokens", "create", "--name", "x"], 1).await;
    assert!(
        refused.stderr.contains("(forbidden, HTTP 403)"),
        "{}",
        refused.describe()
    );

    let table = cli
        .table(&[
            "tokens",
            "create",
            "--name",
            "deploy",
            "--scope",
            "deploy:prod",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ])
        .await;
    assert_eq!(field(&table, "name"), "deploy");
    assert!(
        field(&table, "expires_at").starts_with("2030-01-01T00:00:00Z (in "),
        "{table}"
    );
    let table_secret = field(&table, "token");
    assert!(table_secret.starts_with("aether_"), "{table}");

    // list: every page by default, one page with --limit, then --cursor.
    let all = cli.json(&["tokens", "list"]).await;
    assert_eq!(
        names(all["items"].as_array().unwrap()),
        ["bootstrap", "ci-reader", "deploy"]
    );
    assert_eq!(all["next_cursor"], Value::Null);
    let first = cli.json(&["tokens", "list", "--limit", "1"]).await;
    assert_eq!(names(first["items"].as_array().unwrap()), ["bootstrap"]);
    let cursor = str_of(&first, "next_cursor").to_string();
    let rest = cli
        .json(&["tokens", "list", "--limit", "5", "--cursor", &cursor])
        .await;
    assert_eq!(
        names(rest["items"].as_array().unwrap()),
        ["ci-reader", "deploy"]
    );
    // Not a terminal: JSON unless told otherwise.
    let piped = cli.ok(&["tokens", "list"]).await.stdout;
    assert_eq!(serde_json::from_str::<Value>(&piped).unwrap(), all);
    let lines = cli.jsonl(&["tokens", "list"]).await;
    assert_eq!(names(&lines), ["bootstrap", "ci-reader", "deploy"]);
    assert!(
        lines.iter().all(|line| line.get("token").is_none()),
        "a list holds no secret"
    );
    let table = cli.table(&["tokens", "list"]).await;
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("NAME") && header.contains("EXPIRES"),
        "{table}"
    );
    assert!(table.contains("api_tokens:read"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");

    let got = cli.json(&["tokens", "get", &id]).await;
    assert_eq!(str_of(&got, "name"), "ci-reader");
    assert!(got.get("token").is_none());
    let table = cli.table(&["tokens", "get", &id]).await;
    assert_eq!(field(&table, "id"), id);

    // rotate: same id, new secret; the old one stops working (401: exit 3).
    let rotated = cli.json(&["tokens", "rotate", &id]).await;
    assert_eq!(str_of(&rotated, "id"), id);
    let new_secret = str_of(&rotated, "token").to_string();
    assert_ne!(new_secret, secret);
    let old = reader.fails(&["whoami"], 3).await;
    assert!(old.stderr.contains("HTTP 401"), "{}", old.describe());
    cli.with_token(&new_secret).ok(&["whoami"]).await;

    // --secret-file: the secret goes there (0600) and nowhere else; never over a file.
    let file = cli.path("rotated.token");
    let file_arg = file.to_str().unwrap();
    let rotated = cli
        .run(&[
            "tokens",
            "rotate",
            &id,
            "--secret-file",
            file_arg,
            "-o",
            "json",
        ])
        .await;
    assert!(rotated.status.success(), "{}", rotated.describe());
    let from_file = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(from_file.starts_with("aether_"));
    assert!(!rotated.stdout.contains(&from_file) && !rotated.stderr.contains(&from_file));
    let document: Value = serde_json::from_str(&rotated.stdout).unwrap();
    assert!(document.get("token").is_none(), "{document}");
    assert_eq!(str_of(&document, "id"), id);
    #[cfg(unix)]
    assert_eq!(mode(&file), 0o600);
    let again = cli
        .fails(&["tokens", "rotate", &id, "--secret-file", file_arg], 1)
        .await;
    assert!(
        again.stderr.contains("never overwritten"),
        "{}",
        again.describe()
    );
    // Refused before the request: the secret in the file still works.
    cli.with_token(&from_file).ok(&["whoami"]).await;

    // revoke: a line for people, nothing for scripts; then it is gone (404: exit 1).
    let deploy = str_of(&all["items"][2], "id").to_string();
    assert_eq!(
        cli.table(&["tokens", "revoke", &deploy]).await.trim(),
        format!("Revoked API token {deploy}.")
    );
    let revoke = cli.ok(&["tokens", "revoke", &id, "-o", "json"]).await;
    assert_eq!(revoke.stdout, "");
    let gone = cli.fails(&["tokens", "get", &id], 1).await;
    assert!(
        gone.stderr.contains("(not_found, HTTP 404)"),
        "{}",
        gone.describe()
    );
    cli.with_token(&from_file).fails(&["whoami"], 3).await;

    // --canary: a token like any other that authenticates nowhere (401: exit 3), shown as such.
    let bait = cli
        .json(&[
            "tokens", "create", "--name", "bait", "--scope", "*", "--canary",
        ])
        .await;
    assert_eq!(bait["canary"], true, "{bait}");
    let bait_secret = str_of(&bait, "token").to_string();
    assert!(bait_secret.starts_with("aether_"));
    cli.with_token(&bait_secret).fails(&["whoami"], 3).await;
    let table = cli.table(&["tokens", "list"]).await;
    let row = table.lines().find(|line| line.contains("bait")).unwrap();
    assert!(row.contains("canary"), "{table}");
}

async fn secrets_stay_out_of_stderr_and_verbose(cli: &Cli) {
    let created = cli
        .run(&[
            "tokens",
            "create",
            "--name",
            "verbose",
            "--verbose",
            "-o",
            "json",
        ])
        .await;
    assert!(created.status.success(), "{}", created.describe());
    let secret = str_of(&serde_json::from_str(&created.stdout).unwrap(), "token").to_string();
    assert!(created.stderr.contains("> POST "), "{}", created.describe());
    assert!(
        created.stderr.contains("authorization: Bearer <redacted>"),
        "{}",
        created.describe()
    );
    assert!(
        created.stderr.contains("idempotency-key: <redacted>"),
        "{}",
        created.describe()
    );
    assert!(
        created.stderr.contains("< HTTP 201 Created"),
        "{}",
        created.describe()
    );
    assert!(!created.stderr.contains(&secret), "{}", created.describe());
    // The token under introspection is redacted too.
    let introspected = cli
        .run_with(cli.command(), &["introspect", "-", "--verbose"], &secret)
        .await;
    assert!(introspected.status.success(), "{}", introspected.describe());
    assert!(
        introspected.stderr.contains("> token=<redacted>"),
        "{}",
        introspected.describe()
    );
    assert!(
        !introspected.stderr.contains(&secret),
        "{}",
        introspected.describe()
    );
    // Errors carry the API's message, never a secret.
    let failed = cli
        .with_token(&secret)
        .run(&["tokens", "create", "--name", "verbose", "--verbose"])
        .await;
    assert_eq!(failed.status.code(), Some(1), "{}", failed.describe());
    assert!(
        failed.stderr.contains("(forbidden, HTTP 403)"),
        "{}",
        failed.describe()
    );
    assert!(!failed.stderr.contains(&secret), "{}", failed.describe());
}

async fn service_accounts_and_grants(cli: &Cli) {
    let created = cli
        .json(&[
            "service-accounts",
            "create",
            "--name",
            "billing-sync",
            "--expires-in",
            "2w",
        ])
        .await;
    let secret = str_of(&created, "token").to_string();
    assert!(secret.starts_with("hbx_sa_"), "{created}");
    let id = str_of(&created, "id").to_string();
    let account_token = cli.with_token(&secret);
    // No rights yet: the Hybridbox dialect's `detail` comes through.
    let refused = account_token.fails(&["service-accounts", "list"], 1).await;
    assert!(
        refused.stderr.contains("(HTTP 403)"),
        "{}",
        refused.describe()
    );

    let grant = cli
        .json(&[
            "grants",
            "create",
            "--subject-type",
            "service_account",
            "--subject-id",
            &id,
            "--capability-key",
            "auth.manage",
        ])
        .await;
    assert_eq!(str_of(&grant, "grant_kind"), "capability");
    assert_eq!(str_of(&grant, "capability_key"), "auth.manage");
    let grant_id = str_of(&grant, "id").to_string();
    let listed = account_token.json(&["service-accounts", "list"]).await;
    assert_eq!(names(listed.as_array().unwrap()), ["billing-sync"]);
    let grants = cli
        .json(&["grants", "list", "--subject-type", "service_account"])
        .await;
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");
    let table = cli.table(&["grants", "list", "--subject-id", &id]).await;
    assert!(
        table.contains(&format!("service_account:{id}")) && table.contains("auth.manage"),
        "{table}"
    );
    let lines = cli.jsonl(&["grants", "list"]).await;
    assert_eq!(lines.len(), 1);

    let table = cli.table(&["service-accounts", "list"]).await;
    assert!(
        table.contains("billing-sync") && table.contains("hbx_sa_"),
        "{table}"
    );
    assert!(!table.contains(&secret), "{table}");
    let lines = cli.jsonl(&["service-accounts", "list"]).await;
    assert_eq!(names(&lines), ["billing-sync"]);

    let rotated = cli.table(&["service-accounts", "rotate", &id]).await;
    assert!(
        rotated.contains("token_hint") && rotated.contains("\ntoken "),
        "{rotated}"
    );
    account_token.fails(&["whoami"], 3).await;

    // A Hybridbox validation error lists its fields.
    let invalid = cli
        .fails(&["service-accounts", "create", "--name", " "], 1)
        .await;
    assert!(
        invalid.stderr.contains("body.name:"),
        "{}",
        invalid.describe()
    );

    let revoked_grant = cli.json(&["grants", "revoke", &grant_id]).await;
    assert!(revoked_grant["revoked_at"].is_string(), "{revoked_grant}");
    let revoked = cli.json(&["service-accounts", "revoke", &id]).await;
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    assert_eq!(
        cli.json(&["service-accounts", "list"]).await,
        serde_json::json!([])
    );
    let all = cli
        .json(&["service-accounts", "list", "--include-revoked"])
        .await;
    assert_eq!(names(all.as_array().unwrap()), ["billing-sync"]);
    let conflict = cli.fails(&["service-accounts", "rotate", &id], 1).await;
    assert!(
        conflict.stderr.contains("(HTTP 409)"),
        "{}",
        conflict.describe()
    );
    let table = cli.table(&["service-accounts", "revoke", &id]).await;
    assert!(field(&table, "revoked_at").starts_with("20"), "{table}");
}

async fn registry_and_robots(cli: &Cli) {
    assert_eq!(
        cli.json(&["registry", "show"]).await,
        serde_json::json!({"enabled": false})
    );
    assert_eq!(
        cli.table(&["registry", "show"]).await.trim(),
        "enabled  false"
    );
    let enabled = cli.json(&["registry", "enable"]).await;
    let password = str_of(&enabled["credentials"], "password");
    assert!(password.starts_with("kprobot_"), "{enabled}");
    let project = str_of(&enabled["registry"], "harbor_project").to_string();
    let shown = cli.json(&["registry", "show"]).await;
    assert_eq!(str_of(&shown, "harbor_project"), project);
    assert_eq!(shown["enabled"], true);
    let table = cli.table(&["registry", "show"]).await;
    assert_eq!(field(&table, "harbor_project"), project);

    let created = cli
        .json(&[
            "robots",
            "create",
            "--name",
            "ci",
            "--permission",
            "pull",
            "--permission",
            "push:team-a/*",
        ])
        .await;
    assert!(str_of(&created, "token").starts_with("kprobot_"));
    assert_eq!(
        created["permissions"],
        serde_json::json!(["pull", "push:team-a/*"])
    );
    let id = str_of(&created, "id").to_string();
    let default = cli.table(&["robots", "create", "--name", "reader"]).await;
    assert_eq!(field(&default, "permissions"), "pull");
    assert!(
        field(&default, "token").starts_with("kprobot_"),
        "{default}"
    );

    let listed = cli.json(&["robots", "list"]).await;
    assert_eq!(
        names(listed["items"].as_array().unwrap()),
        ["default", "ci", "reader"]
    );
    assert_eq!(
        names(&cli.jsonl(&["robots", "list"]).await),
        ["default", "ci", "reader"]
    );
    let table = cli.table(&["robots", "list"]).await;
    assert!(table.contains("pull,push:team-a/*"), "{table}");

    assert_eq!(
        str_of(&cli.json(&["robots", "get", &id]).await, "name"),
        "ci"
    );
    assert_eq!(
        field(&cli.table(&["robots", "get", &id]).await, "name"),
        "ci"
    );
    let updated = cli
        .json(&["robots", "update", &id, "--permission", "pull"])
        .await;
    assert_eq!(updated["permissions"], serde_json::json!(["pull"]));
    let table = cli
        .table(&["robots", "update", &id, "--permission", "delete"])
        .await;
    assert_eq!(field(&table, "permissions"), "delete");
    // A malformed permission is a usage error, found before anything is sent.
    let bad = cli
        .fails(&["robots", "update", &id, "--permission", "fly"], 2)
        .await;
    assert!(bad.stderr.contains("--permission"), "{}", bad.describe());

    let rotated = cli.json(&["robots", "rotate", &id]).await;
    assert_ne!(str_of(&rotated, "token"), str_of(&created, "token"));
    cli.ok(&["robots", "revoke", &id]).await;
    cli.fails(&["robots", "get", &id], 1).await;
}

async fn audit(cli: &Cli) {
    let page = cli
        .json(&["audit", "list", "--action", "api_token.*"])
        .await;
    let actions: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| str_of(e, "action"))
        .collect();
    assert!(
        actions.contains(&"api_token.created") && actions.contains(&"api_token.revoked"),
        "{actions:?}"
    );
    assert!(
        actions.iter().all(|a| a.starts_with("api_token.")),
        "{actions:?}"
    );
    let lines = cli.jsonl(&["audit", "list", "--limit", "2"]).await;
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0]["seq"].as_u64() > lines[1]["seq"].as_u64(),
        "newest first"
    );
    let table = cli
        .ok(&["audit", "list", "--limit", "2", "-o", "table"])
        .await;
    assert!(table.stdout.starts_with("SEQ"), "{}", table.describe());
    assert!(
        table.stderr.contains("More: --cursor "),
        "{}",
        table.describe()
    );
    let bad = cli.fails(&["audit", "list", "--outcome", "maybe"], 1).await;
    assert!(
        bad.stderr.contains("validation_failed"),
        "{}",
        bad.describe()
    );

    let tail = cli.jsonl(&["audit", "tail", "-n", "3"]).await;
    assert_eq!(tail.len(), 3);
    assert!(
        tail[0]["seq"].as_u64() < tail[2]["seq"].as_u64(),
        "oldest first"
    );
    let table = cli.table(&["audit", "tail", "-n", "2"]).await;
    assert_eq!(table.lines().count(), 3, "{table}");

    // --follow prints events as they commit.
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut follow = cli.command();
    follow
        .args([
            "audit",
            "tail",
            "-n",
            "0",
            "--follow",
            "--interval",
            "1s",
            "-o",
            "jsonl",
        ])
        .stdout(out.reopen().unwrap())
        .stderr(Stdio::null());
    let _follower = KillOnDrop(follow.spawn().expect("spawn audit tail --follow"));
    let created = || {
        let text = std::fs::read_to_string(out.path()).unwrap();
        let names: Vec<String> = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|e| e["action"] == "api_token.created")
            .map(|e| e["target"]["name"].as_str().unwrap_or_default().to_string())
            .collect();
        (names, text)
    };
    // Markers until one is printed: then it follows (one that starts late takes the events
    // before it for history, which `-n 0` leaves out).
    let deadline = Instant::now() + TIMEOUT;
    for marker in 1.. {
        cli.ok(&["tokens", "create", "--name", &format!("marker-{marker}")])
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (names, text) = created();
        if !names.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "tail --follow printed:\n{text}");
    }
    for name in ["followed-1", "followed-2"] {
        cli.ok(&["tokens", "create", "--name", name, "-o", "json"])
            .await;
    }
    loop {
        let (names, text) = created();
        let followed: Vec<&String> = names.iter().filter(|n| !n.starts_with("marker-")).collect();
        if followed == ["followed-1", "followed-2"] {
            break;
        }
        assert!(Instant::now() < deadline, "tail --follow printed:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn exit_statuses(cli: &Cli) {
    // 2: usage (clap's, and ours).
    cli.fails(&["tokens", "create"], 2).await;
    cli.fails(
        &["tokens", "create", "--name", "x", "--expires-in", "soon"],
        2,
    )
    .await;
    cli.fails(
        &[
            "tokens",
            "create",
            "--name",
            "x",
            "--expires-in",
            "1d",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ],
        2,
    )
    .await;
    cli.fails(&["tokens", "get", "not-a-uuid"], 2).await;
    // 3: no credential at all, or one the server refuses.
    let mut bare = cli.command();
    bare.env_remove("KEYPLANE_TOKEN");
    let none = cli.run_with(bare, &["whoami"], "").await;
    assert_eq!(none.status.code(), Some(3), "{}", none.describe());
    assert!(
        none.stderr.contains("keyplane login"),
        "{}",
        none.describe()
    );
    let unknown = cli.with_token(&format!("aether_{}", "0".repeat(56)));
    let refused = unknown.fails(&["tokens", "list"], 3).await;
    assert!(
        refused.stderr.contains("HTTP 401"),
        "{}",
        refused.describe()
    );
    let file = cli.path("empty.token");
    std::fs::write(&file, "\n").unwrap();
    cli.fails(&["whoami", "--token-file", file.to_str().unwrap()], 3)
        .await;
    // 4: nobody listens there.
    let nowhere = format!("http://127.0.0.1:{}", free_loopback_port());
    let unreachable = cli.fails(&["whoami", "--url", &nowhere], 4).await;
    assert!(
        unreachable.stderr.contains("cannot be reached"),
        "{}",
        unreachable.describe()
    );
    // 1: another organization's id answers 404.
    let other = uuid::Uuid::new_v4().to_string();
    cli.fails(&["tokens", "list", "--org", &other], 1).await;
    // `--help` documents them.
    let help = cli.ok(&["tokens", "list", "--help"]).await.stdout;
    assert!(
        help.contains("Example:") && help.contains("4 cannot reach the server"),
        "{help}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let script = cli.ok(&["completion", shell]).await.stdout;
        assert!(script.contains("service-accounts"), "{shell}: {script}");
    }
}

/// Seconds from now to an RFC 3339 time in `value[field]`.
fn seconds_until(value: &Value, field: &str) -> i64 {
    let at: chrono::DateTime<chrono::Utc> = str_of(value, field).parse().unwrap();
    (at - chrono::Utc::now()).num_seconds()
}

/// Rotation with a grace period, retire-previous, suspend and resume on every kind, and the
/// expiring-within filter.
async fn lifecycle(cli: &Cli) {
    let created = cli
        .json(&[
            "tokens",
            "create",
            "--name",
            "graceful",
            "--expires-in",
            "3d",
        ])
        .await;
    let (id, old) = (
        str_of(&created, "id").to_string(),
        str_of(&created, "token").to_string(),
    );
    cli.json(&[
        "tokens",
        "create",
        "--name",
        "long-lived",
        "--expires-in",
        "30d",
    ])
    .await;

    // --grace: both secrets work for an hour; whoami says which one was presented.
    let rotated = cli.json(&["tokens", "rotate", &id, "--grace", "1h"]).await;
    let grace = seconds_until(&rotated, "previous_secret_expires_at");
    assert!((3_500..=3_600).contains(&grace), "{rotated}");
    let new = str_of(&rotated, "token").to_string();
    let me = cli.with_token(&old).json(&["whoami"]).await;
    assert_eq!(str_of(&me, "secret"), "previous");
    assert_eq!(
        str_of(&cli.with_token(&new).json(&["whoami"]).await, "secret"),
        "current"
    );
    let table = cli.table(&["tokens", "get", &id]).await;
    let until = field(&table, "previous_secret_expires_at");
    assert!(
        until.starts_with("20") && until.ends_with("(in 59m)"),
        "{table}"
    );
    let list = cli.table(&["tokens", "list"]).await;
    assert!(
        list.lines()
            .any(|l| l.contains("graceful") && l.contains("rotating")),
        "{list}"
    );
    // retire-previous ends the old secret now.
    let retired = cli.json(&["tokens", "retire-previous", &id]).await;
    assert_eq!(
        retired["previous_secret_expires_at"],
        Value::Null,
        "{retired}"
    );
    cli.with_token(&old).fails(&["whoami"], 3).await;
    // The API's own checks come through: a cutover needs a grace period.
    let refused = cli
        .fails(&["tokens", "rotate", &id, "--retire-when-unused", "10m"], 1)
        .await;
    assert!(
        refused.stderr.contains("retire_when_unused_seconds"),
        "{}",
        refused.describe()
    );
    let rotated = cli
        .json(&[
            "tokens",
            "rotate",
            &id,
            "--grace",
            "10m",
            "--retire-when-unused",
            "1m",
            "--expires-in",
            "5d",
        ])
        .await;
    assert!(
        (4 * 86_400..=5 * 86_400).contains(&seconds_until(&rotated, "expires_at")),
        "{rotated}"
    );
    let current = str_of(&rotated, "token").to_string();

    // suspend / resume
    let suspended = cli.json(&["tokens", "suspend", &id]).await;
    assert!(suspended["suspended_at"].is_string(), "{suspended}");
    cli.with_token(&current).fails(&["whoami"], 3).await;
    let list = cli.table(&["tokens", "list"]).await;
    assert!(
        list.lines()
            .any(|l| l.contains("graceful") && l.contains("suspended")),
        "{list}"
    );
    let table = cli.table(&["tokens", "resume", &id]).await;
    assert_eq!(field(&table, "suspended_at"), "-");
    cli.with_token(&current).ok(&["whoami"]).await;

    // --expiring-within: whole days, only live credentials expiring by then.
    let soon = cli
        .json(&["tokens", "list", "--expiring-within", "7d"])
        .await;
    assert_eq!(names(soon["items"].as_array().unwrap()), ["graceful"]);
    let lines = cli
        .jsonl(&["tokens", "list", "--expiring-within", "60d"])
        .await;
    assert_eq!(names(&lines), ["graceful", "long-lived"]);

    // Service accounts.
    let account = cli
        .json(&["service-accounts", "create", "--name", "graceful-sa"])
        .await;
    cli.json(&[
        "service-accounts",
        "create",
        "--name",
        "expiring-sa",
        "--expires-in",
        "2d",
    ])
    .await;
    let soon = cli
        .json(&["service-accounts", "list", "--expiring-within", "3d"])
        .await;
    assert_eq!(names(soon.as_array().unwrap()), ["expiring-sa"]);
    let (sa, sa_old) = (
        str_of(&account, "id").to_string(),
        str_of(&account, "token").to_string(),
    );
    let rotated = cli
        .json(&["service-accounts", "rotate", &sa, "--grace", "30m"])
        .await;
    assert!(
        rotated["previous_secret_expires_at"].is_string(),
        "{rotated}"
    );
    let table = cli.table(&["service-accounts", "list"]).await;
    assert!(
        table
            .lines()
            .any(|l| l.contains("graceful-sa") && l.contains("rotating")),
        "{table}"
    );
    let retired = cli
        .json(&["service-accounts", "retire-previous", &sa])
        .await;
    assert_eq!(retired["previous_secret_expires_at"], Value::Null);
    let suspended = cli.json(&["service-accounts", "suspend", &sa]).await;
    assert!(suspended["suspended_at"].is_string(), "{suspended}");
    let resumed = cli.table(&["service-accounts", "resume", &sa]).await;
    assert_eq!(field(&resumed, "suspended_at"), "-");
    cli.with_token(&sa_old).fails(&["whoami"], 3).await;

    // Robots.
    let robot = cli
        .json(&[
            "robots",
            "create",
            "--name",
            "expiring",
            "--expires-in",
            "2d",
        ])
        .await;
    let robot_id = str_of(&robot, "id").to_string();
    assert!(robot["expires_at"].is_string(), "{robot}");
    let soon = cli
        .json(&["robots", "list", "--expiring-within", "3d"])
        .await;
    assert_eq!(names(soon["items"].as_array().unwrap()), ["expiring"]);
    let rotated = cli
        .json(&["robots", "rotate", &robot_id, "--grace", "1h"])
        .await;
    assert!(
        rotated["previous_secret_expires_at"].is_string(),
        "{rotated}"
    );
    let retired = cli.json(&["robots", "retire-previous", &robot_id]).await;
    assert_eq!(retired["previous_secret_expires_at"], Value::Null);
    let suspended = cli.json(&["robots", "suspend", &robot_id]).await;
    assert!(suspended["suspended_at"].is_string());
    let table = cli.table(&["robots", "list"]).await;
    assert!(
        table
            .lines()
            .any(|l| l.contains("expiring") && l.contains("suspended")),
        "{table}"
    );
    let resumed = cli.json(&["robots", "resume", &robot_id]).await;
    assert_eq!(resumed["suspended_at"], Value::Null);
}

async fn credential_policy(cli: &Cli) {
    let default = cli.json(&["policy", "show"]).await;
    assert_eq!(str_of(&default, "on_leak"), "revoke");
    assert_eq!(default["updated_at"], Value::Null);
    let set = cli
        .json(&[
            "policy",
            "set",
            "--max-lifetime-days",
            "90",
            "--require-expiry",
            "--default-lifetime-days",
            "30",
            "--robot-accounts",
            "max=365,require",
            "--on-leak",
            "suspend",
        ])
        .await;
    assert_eq!(
        set["all"],
        serde_json::json!({"max_lifetime_days": 90, "require_expiry": true, "default_lifetime_days": 30})
    );
    assert_eq!(set["robot_accounts"]["max_lifetime_days"], 365);
    assert_eq!(set["api_tokens"], Value::Null);
    assert_eq!(str_of(&set, "on_leak"), "suspend");
    let table = cli.table(&["policy", "show"]).await;
    assert_eq!(
        field(&table, "all"),
        "max 90d, default 30d, expiry required"
    );
    assert_eq!(field(&table, "api_tokens"), "as all");
    // The policy applies: a default lifetime, and a refusal past the maximum (exit 1).
    let token = cli.json(&["tokens", "create", "--name", "policed"]).await;
    assert!(
        (29 * 86_400..=30 * 86_400).contains(&seconds_until(&token, "expires_at")),
        "{token}"
    );
    let refused = cli
        .fails(
            &[
                "tokens",
                "create",
                "--name",
                "too-long",
                "--expires-in",
                "200d",
            ],
            1,
        )
        .await;
    assert!(
        refused.stderr.contains("policy_violation"),
        "{}",
        refused.describe()
    );
    // A malformed rule is a usage error; `policy set` alone restores the default.
    cli.fails(&["policy", "set", "--api-tokens", "max=soon"], 2)
        .await;
    let reset = cli.json(&["policy", "set"]).await;
    assert_eq!(str_of(&reset, "on_leak"), "revoke");
    assert_eq!(reset["all"]["max_lifetime_days"], Value::Null);
}

/// Public revocation: no credential is sent, the tokens never show on stderr, and the token dies.
async fn revoke_leaked(cli: &Cli) {
    let leaked = cli.json(&["tokens", "create", "--name", "leaked"]).await;
    let secret = str_of(&leaked, "token").to_string();
    let mut anonymous = cli.command();
    anonymous.env_remove("KEYPLANE_TOKEN");
    let args = ["revoke-leaked", "-", "--verbose", "-o", "json"];
    let output = cli
        .run_with(anonymous, &args, &format!("{secret}\nnot-a-token\n"))
        .await;
    assert!(output.status.success(), "{}", output.describe());
    let accepted: Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(
        accepted,
        serde_json::json!({"received": 2, "well_formed": 1})
    );
    assert!(!output.stderr.contains(&secret), "{}", output.describe());
    assert!(
        !output.stderr.to_lowercase().contains("authorization"),
        "{}",
        output.describe()
    );
    assert!(output.stderr.contains("redacted"), "{}", output.describe());
    // Worked off in the background: the token stops working within moments.
    let deadline = Instant::now() + TIMEOUT;
    while cli.with_token(&secret).run(&["whoami"]).await.status.code() != Some(3) {
        assert!(Instant::now() < deadline, "the reported token still works");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let table = cli.table(&["revoke-leaked", "not-a-token"]).await;
    assert_eq!(
        (field(&table, "received"), field(&table, "well_formed")),
        ("1".into(), "0".into())
    );
}

/// Asserts a create or rotate-secret answer printed its secret once on stdout and warned on
/// stderr in one line without it.
fn secret_once(output: &CommandOutput, secret: &str) {
    assert!(secret.starts_with("whsec_"), "{}", output.describe());
    assert_eq!(
        output.stdout.matches(secret).count(),
        1,
        "{}",
        output.describe()
    );
    assert!(!output.stderr.contains(secret), "{}", output.describe());
    assert_eq!(output.stderr.lines().count(), 1, "{}", output.describe());
    assert!(
        output.stderr.contains("shown only this once"),
        "{}",
        output.describe()
    );
}

/// `keyplane webhooks ...`: every command in table and JSON, the signing secret printed only by
/// create and rotate-secret, and a real delivery to a receiver on loopback, listed and retried.
async fn webhooks(cli: &Cli) {
    let receiver = Receiver::start(TIMEOUT).await;
    assert_eq!(
        cli.json(&["webhooks", "list"]).await,
        serde_json::json!({"items": []})
    );

    // create, JSON: the secret once on stdout.
    let args = [
        "webhooks",
        "create",
        "--endpoint",
        &receiver.url,
        "--event",
        "api_token.*",
        "--description",
        "cli tour",
        "-o",
        "json",
    ];
    let created = cli.run(&args).await;
    assert!(created.status.success(), "{}", created.describe());
    let hook: Value = serde_json::from_str(&created.stdout).unwrap();
    let first_secret = str_of(&hook, "secret").to_string();
    secret_once(&created, &first_secret);
    assert_eq!(str_of(&hook, "url"), receiver.url);
    assert_eq!(hook["events"], serde_json::json!(["api_token.*"]));
    assert_eq!(str_of(&hook, "description"), "cli tour");
    assert_eq!(hook["enabled"], true);
    let id = str_of(&hook, "id").to_string();

    // create, table, --disabled, the secret to a file and nowhere else.
    let file = cli.path("webhook.secret");
    let output = cli
        .run(&[
            "webhooks",
            "create",
            "--endpoint",
            &receiver.url,
            "--event",
            "*",
            "--disabled",
            "--secret-file",
            file.to_str().unwrap(),
            "-o",
            "table",
        ])
        .await;
    assert!(output.status.success(), "{}", output.describe());
    let written = std::fs::read_to_string(&file).unwrap();
    let file_secret = written.trim();
    assert!(file_secret.starts_with("whsec_"), "{written}");
    #[cfg(unix)]
    assert_eq!(mode(&file), 0o600);
    assert!(
        !output.stdout.contains(file_secret),
        "{}",
        output.describe()
    );
    assert!(
        !output.stderr.contains(file_secret),
        "{}",
        output.describe()
    );
    assert!(
        output.stderr.contains("written to"),
        "{}",
        output.describe()
    );
    assert!(
        !output.stdout.lines().any(|line| line.starts_with("secret")),
        "{}",
        output.describe()
    );
    assert_eq!(field(&output.stdout, "enabled"), "false");
    assert_eq!(field(&output.stdout, "events"), "*");
    let second = field(&output.stdout, "id");

    // list and get: never a secret.
    let list = cli.json(&["webhooks", "list"]).await;
    let items = list["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|item| str_of(item, "id")).collect();
    assert_eq!(ids, [id.as_str(), second.as_str()]);
    assert!(
        items.iter().all(|item| item.get("secret").is_none()),
        "{list}"
    );
    let lines = cli.jsonl(&["webhooks", "list"]).await;
    assert_eq!(lines.len(), 2);
    let table = cli.table(&["webhooks", "list"]).await;
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("URL") && header.contains("EVENTS"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        table.contains("api_token.*") && table.contains("cli tour"),
        "{table}"
    );
    assert!(!table.contains("whsec_"), "{table}");
    let got = cli.json(&["webhooks", "get", &id]).await;
    assert_eq!(str_of(&got, "url"), receiver.url);
    assert!(got.get("secret").is_none(), "{got}");
    let table = cli.table(&["webhooks", "get", &id]).await;
    assert_eq!(field(&table, "id"), id);
    assert_eq!(field(&table, "description"), "cli tour");
    assert!(!table.contains("whsec_"), "{table}");

    // update: what is given changes, the rest stays.
    let updated = cli
        .json(&["webhooks", "update", &second, "--description", "all events"])
        .await;
    assert_eq!(str_of(&updated, "description"), "all events");
    assert_eq!(updated["events"], serde_json::json!(["*"]));
    assert_eq!(updated["enabled"], false);
    assert_eq!(str_of(&updated, "url"), receiver.url);
    let updated = cli
        .json(&[
            "webhooks",
            "update",
            &second,
            "--event",
            "credential.*",
            "--enabled",
        ])
        .await;
    assert_eq!(updated["events"], serde_json::json!(["credential.*"]));
    assert_eq!(updated["enabled"], true);
    assert_eq!(str_of(&updated, "description"), "all events");
    let table = cli
        .table(&["webhooks", "update", &second, "--disabled"])
        .await;
    assert_eq!(field(&table, "enabled"), "false");
    assert_eq!(field(&table, "events"), "credential.*");
    cli.fails(&["webhooks", "update", &second], 2).await;
    cli.fails(&["webhooks", "update", &second, "--event", "Bad*"], 2)
        .await;
    cli.fails(
        &["webhooks", "update", &second, "--enabled", "--disabled"],
        2,
    )
    .await;
    cli.fails(&["webhooks", "create", "--event", "*"], 2).await;
    // The server's own checks answer with its code (exit 1).
    let refused = cli
        .fails(
            &[
                "webhooks",
                "update",
                &second,
                "--endpoint",
                "ftp://example.com/",
            ],
            1,
        )
        .await;
    assert!(
        refused.stderr.contains("HTTP 422"),
        "{}",
        refused.describe()
    );

    // rotate-secret: a new secret, once; --verbose never shows it.
    let rotated = cli
        .run(&["webhooks", "rotate-secret", &id, "--verbose", "-o", "json"])
        .await;
    assert!(rotated.status.success(), "{}", rotated.describe());
    let answer: Value = serde_json::from_str(&rotated.stdout).unwrap();
    let rotated_secret = str_of(&answer, "secret").to_string();
    assert_ne!(rotated_secret, first_secret);
    assert_eq!(str_of(&answer, "id"), id);
    assert!(answer["previous_secret_expires_at"].is_string(), "{answer}");
    assert!(rotated.stderr.contains("> POST "), "{}", rotated.describe());
    assert!(
        !rotated.stderr.contains(&rotated_secret),
        "{}",
        rotated.describe()
    );
    assert!(
        !rotated.stderr.contains(&first_secret),
        "{}",
        rotated.describe()
    );
    assert_eq!(
        rotated.stdout.matches(&rotated_secret).count(),
        1,
        "{}",
        rotated.describe()
    );
    let output = cli
        .run(&["webhooks", "rotate-secret", &id, "-o", "table"])
        .await;
    assert!(output.status.success(), "{}", output.describe());
    let table_secret = field(&output.stdout, "secret");
    secret_once(&output, &table_secret);
    assert_ne!(table_secret, rotated_secret);

    // A token created now is an `api_token.created` event: delivered to the receiver.
    cli.json(&["tokens", "create", "--name", "hooked", "--expires-in", "1d"])
        .await;
    let deadline = Instant::now() + TIMEOUT;
    let delivery = loop {
        let page = cli.json(&["webhooks", "deliveries", &id]).await;
        let done = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|item| item["type"] == "api_token.created" && item["status"] == "succeeded");
        if let Some(done) = done {
            break done.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no delivery succeeded in time: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(receiver.count() >= 1);
    assert_eq!(str_of(&delivery, "webhook_id"), id);
    assert_eq!(delivery["last_response_code"], 204);
    assert_eq!(delivery["attempts"], 1);
    let delivery_id = str_of(&delivery, "id").to_string();
    let table = cli.table(&["webhooks", "deliveries", &id]).await;
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("TYPE") && header.contains("STATUS"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|line| line.starts_with(&delivery_id))
        .unwrap_or_else(|| panic!("no row for {delivery_id}:\n{table}"));
    assert!(
        row.contains("api_token.created") && row.contains("succeeded") && row.contains("204"),
        "{table}"
    );
    let failed = cli
        .json(&["webhooks", "deliveries", &id, "--status", "failed"])
        .await;
    assert_eq!(failed["items"], serde_json::json!([]));
    let one = cli
        .jsonl(&["webhooks", "deliveries", &id, "--limit", "1"])
        .await;
    assert_eq!(one.len(), 1);
    cli.fails(&["webhooks", "deliveries", &id, "--status", "lost"], 2)
        .await;

    // retry: queued now, then attempted again.
    let before = receiver.count();
    let retried = cli.json(&["webhooks", "retry", &id, &delivery_id]).await;
    assert_eq!(str_of(&retried, "id"), delivery_id);
    assert_eq!(str_of(&retried, "webhook_id"), id);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let page = cli.json(&["webhooks", "deliveries", &id]).await;
        let again = page["items"].as_array().unwrap().iter().any(|item| {
            item["id"] == delivery_id.as_str()
                && item["status"] == "succeeded"
                && item["attempts"].as_u64() >= Some(2)
        });
        if again && receiver.count() > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the retry was not attempted: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let table = cli.table(&["webhooks", "retry", &id, &delivery_id]).await;
    assert_eq!(field(&table, "id"), delivery_id);
    assert_eq!(field(&table, "type"), "api_token.created");
    // A disabled webhook's deliveries are not retried (409: exit 1).
    cli.json(&["webhooks", "update", &id, "--disabled"]).await;
    let refused = cli
        .fails(&["webhooks", "retry", &id, &delivery_id], 1)
        .await;
    assert!(
        refused.stderr.contains("HTTP 409"),
        "{}",
        refused.describe()
    );

    // delete: a line for people, nothing for scripts; then it is gone (404: exit 1).
    let table = cli.table(&["webhooks", "delete", &second]).await;
    assert_eq!(table.trim(), format!("Deleted webhook {second}."));
    let quiet = cli.ok(&["webhooks", "delete", &id, "-o", "json"]).await;
    assert_eq!(quiet.stdout, "");
    let gone = cli.fails(&["webhooks", "get", &id], 1).await;
    assert!(gone.stderr.contains("HTTP 404"), "{}", gone.describe());
    assert_eq!(
        cli.json(&["webhooks", "list"]).await,
        serde_json::json!({"items": []})
    );
    let help = cli
        .ok(&["webhooks", "rotate-secret", "--help"])
        .await
        .stdout;
    assert!(
        help.contains("Example:") && help.contains("4 cannot reach the server"),
        "{help}"
    );
}

/// `keyplane login` in a real pseudo-terminal: the prompt, the token typed with echo off, the
/// profile saved 0600 and used by later commands, then `logout`.
#[cfg(unix)]
async fn login_through_a_terminal(cli: &Cli) {
    let mut command = cli.command();
    command
        .env_remove("KEYPLANE_TOKEN")
        .env_remove("KEYPLANE_URL");
    command.args(["login", "--url", &cli.url, "--profile", "pty"]);
    let mut terminal = Pty::spawn(command);
    terminal.expect("Token for ").await;
    terminal.type_line(&cli.token);
    let status = terminal.exit_status().await;
    let screen = terminal.screen();
    assert!(status.success(), "login failed:\n{screen}");
    assert!(
        !screen.contains(&cli.token),
        "the token was echoed:\n{screen}"
    );
    assert!(screen.contains("Logged in to"), "{screen}");

    let profiles = cli.home.path().join("config/keyplane/profiles.json");
    assert_eq!(mode(&profiles), 0o600);
    assert_eq!(mode(profiles.parent().unwrap()), 0o700);
    // The saved profile is the credential and the URL now.
    let mut with_profile = cli.command();
    with_profile
        .env_remove("KEYPLANE_TOKEN")
        .env_remove("KEYPLANE_URL");
    let me = cli
        .run_with(
            with_profile,
            &["whoami", "--profile", "pty", "-o", "json"],
            "",
        )
        .await;
    assert!(me.status.success(), "{}", me.describe());

    // --token-stdin with a token the server refuses saves nothing (exit 3).
    let mut refused = cli.command();
    refused.env_remove("KEYPLANE_TOKEN");
    let bad = format!("aether_{}", "0".repeat(56));
    let output = cli
        .run_with(
            refused,
            &["login", "--token-stdin", "--profile", "other"],
            &bad,
        )
        .await;
    assert_eq!(output.status.code(), Some(3), "{}", output.describe());
    assert!(!std::fs::read_to_string(&profiles)
        .unwrap()
        .contains("\"other\""));
    // Without a terminal and without --token-stdin, login says what to do (exit 2).
    let mut headless = cli.command();
    headless.args(["login", "--profile", "other"]);
    let output = setsid_without_terminal(headless).await;
    assert_eq!(output.status.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("--token-stdin"),
        "{}",
        output.describe()
    );

    cli.ok(&["logout", "--profile", "pty"]).await;
    let mut after = cli.command();
    after.env_remove("KEYPLANE_TOKEN");
    let output = cli
        .run_with(after, &["whoami", "--profile", "pty"], "")
        .await;
    assert_eq!(output.status.code(), Some(3), "{}", output.describe());
}

/// Ctrl-C at `login`'s hidden prompt ends it as SIGINT does, with the terminal's echo back on.
#[cfg(unix)]
#[tokio::test]
async fn ctrl_c_at_the_token_prompt_turns_echo_back_on() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::ExitStatusExt;
    let home = tempfile::tempdir().expect("create a temporary directory");
    let mut command = keyplane();
    command
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("HOME", home.path())
        // Nothing is sent: the prompt comes first.
        .args(["login", "--url", "http://127.0.0.1:9", "--profile", "pty"]);
    // A user's shell starts a command with SIGINT at its default; this test may run under one
    // that ignores it (a script's `cmd &`), which the login keeps as it finds it.
    // SAFETY: signal() is async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut terminal = Pty::spawn(command);
    terminal.expect("Token for ").await;
    terminal.master.write_all(&[0x03]).unwrap();
    let status = terminal.exit_status().await;
    assert_eq!(status.signal(), Some(libc::SIGINT), "{}", terminal.screen());
    // SAFETY: termios is plain data, filled in by tcgetattr (a pty's master reads its slave's).
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    let read = unsafe { libc::tcgetattr(terminal.master.as_raw_fd(), &mut termios) };
    assert_eq!(read, 0, "tcgetattr: {}", std::io::Error::last_os_error());
    assert_ne!(termios.c_lflag & libc::ECHO, 0, "echo is still off");
}

/// Runs `command` in a new session with no controlling terminal (so /dev/tty cannot open).
#[cfg(unix)]
async fn setsid_without_terminal(mut command: Command) -> CommandOutput {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_with_stdin(&mut command, "").await
}

/// A child process on the slave side of a pseudo-terminal, as its controlling terminal.
#[cfg(unix)]
struct Pty {
    child: KillOnDrop,
    master: File,
    screen: std::sync::Arc<std::sync::Mutex<String>>,
}

#[cfg(unix)]
impl Pty {
    fn spawn(mut command: Command) -> Self {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors into the integers it is given.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned here alone.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        command
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: setsid and ioctl are async-signal-safe; the child makes the pty (its stdin)
        // its controlling terminal, as a login shell's terminal would be.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = KillOnDrop(command.spawn().expect("spawn in a pty"));
        // The parent's copies of the slave are gone with `command`'s stdio (dropped here), so
        // reading the master ends when the child exits.
        drop(command);
        let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = screen.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 1024];
            // Ends with EIO once the child has exited and the slave is closed.
            while let Ok(n @ 1..) = reader.read(&mut buffer) {
                common::lock(&sink).push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Self {
            child,
            master,
            screen,
        }
    }

    fn screen(&self) -> String {
        common::lock(&self.screen).clone()
    }

    async fn expect(&self, text: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.screen().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} on the terminal:\n{}",
                self.screen()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    async fn exit_status(&mut self) -> std::process::ExitStatus {
        let status = common::wait_for_exit(&mut self.child.0, TIMEOUT).await;
        // Let the reader drain what the child wrote last.
        tokio::time::sleep(Duration::from_millis(100)).await;
        status.unwrap_or_else(|| panic!("login did not finish:\n{}", self.screen()))
    }
}
