//! Black-box tests of the `keyplane` binary: each test runs the real executable as a subprocess on
//! its own store and talks HTTP to it, the way an operator and a client would.

mod common;

use chrono::{DateTime, TimeDelta, Utc};
use common::{
    both_stores, keyplane, keyplane_with_umask, run, wait_for_exit, Keyplane, Org, TestStore,
};
use keyplane_store::testing::Backend;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, ExitStatus};
use std::time::Duration;

/// The bound on every wait: startup, a CLI command, an HTTP request.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful shutdown may take after SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

both_stores!(
    serve_bootstraps_default_org_once,
    admin_create_org_while_server_runs,
    sigkill_keeps_every_acknowledged_write,
    sigterm_flushes_last_used_at,
    bootstrap_replaces_a_stale_file_with_a_private_one,
    a_bootstrap_token_left_pending_is_moved_into_place_at_the_next_start,
    read_only_admin_commands_leave_an_older_schema_to_admin_migrate,
    serve_migrates_an_older_schema_and_says_from_which,
    a_modified_migration_is_named_on_stderr,
    serve_with_migrate_never_leaves_an_older_schema_to_admin_migrate,
);

/// `keyplane --version` (and a command's, e.g. `keyplane serve --version`) names the package
/// version and the store schema the binary brings a store to: which binary a replica runs, and
/// whether it would migrate the shared store, are known before it is started.
#[tokio::test]
async fn version_names_the_package_and_its_store_schema() {
    let version = format!(
        "{} (store schema {})",
        env!("CARGO_PKG_VERSION"),
        keyplane_store::testing::latest_schema()
    );
    for (args, program) in [
        (&["--version"][..], "keyplane"),
        (&["serve", "--version"], "keyplane-serve"),
    ] {
        let output = run(keyplane().args(args), TIMEOUT).await;
        assert!(output.status.success(), "{}", output.describe());
        assert_eq!(
            output.stdout.trim(),
            format!("{program} {version}"),
            "{}",
            output.describe()
        );
    }
}

/// `serve --migrate never` (a replica of a fleet sharing the store, where one new replica must
/// not migrate it under the older ones): a store one migration behind is refused at start with
/// the read-only commands' message, which names `admin migrate`, and left as it was; so is it with
/// `KEYPLANE_MIGRATE=never`. Once `admin migrate` has run, it serves.
async fn serve_with_migrate_never_leaves_an_older_schema_to_admin_migrate(backend: Backend) {
    let store = TestStore::new(backend).await;
    let latest = keyplane_store::testing::latest_schema();
    let behind = latest - 1;
    keyplane_store::testing::migrate_to(&store.db.url, behind).await;
    let serve = || {
        let mut command = keyplane();
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(store.args());
        command
    };
    let (mut by_flag, mut by_environment) = (serve(), serve());
    by_flag.args(["--migrate", "never"]);
    by_environment.env("KEYPLANE_MIGRATE", "never");
    for mut refusing in [by_flag, by_environment] {
        let refused = run(&mut refusing, TIMEOUT).await;
        assert!(!refused.status.success(), "{}", refused.describe());
        for expected in [
            format!("its schema is at {behind}, older than this keyplane's {latest}"),
            "keyplane admin migrate".to_owned(),
        ] {
            assert!(refused.stderr.contains(&expected), "{}", refused.describe());
        }
        assert_eq!(
            keyplane_store::testing::schema_version(&store.db.url).await,
            behind,
            "serve --migrate never migrated the store"
        );
    }

    let migrated = run(
        keyplane().args(["admin", "migrate"]).args(store.args()),
        TIMEOUT,
    )
    .await;
    assert!(migrated.status.success(), "{}", migrated.describe());
    let server = Keyplane::start(&store, &["--migrate", "never"], TIMEOUT).await;
    assert!(server.stop_term().await.status.success());
}

/// The schema of the release before the console secrets' migration (e45e23c).
const OLDER_SCHEMA: i64 = 13;

/// Running a newer CLI against a shared store must not migrate it under the older replicas still
/// serving it: a command that only reads refuses, naming both schemas and the way to migrate, and
/// leaves the store as it was; `admin migrate` migrates it and says from which schema to which.
async fn read_only_admin_commands_leave_an_older_schema_to_admin_migrate(backend: Backend) {
    let store = TestStore::new(backend).await;
    keyplane_store::testing::migrate_to(&store.db.url, OLDER_SCHEMA).await;
    let latest = keyplane_store::testing::latest_schema();
    let show = || {
        let mut command = keyplane();
        command
            .args(["admin", "registry-key", "show"])
            .args(store.args());
        command
    };
    let refused = run(&mut show(), TIMEOUT).await;
    assert!(!refused.status.success(), "{}", refused.describe());
    for expected in [
        format!("its schema is at {OLDER_SCHEMA}, older than this keyplane's {latest}"),
        "keyplane admin migrate".to_owned(),
    ] {
        assert!(refused.stderr.contains(&expected), "{}", refused.describe());
    }
    assert_eq!(
        keyplane_store::testing::schema_version(&store.db.url).await,
        OLDER_SCHEMA,
        "a read-only command migrated the store"
    );

    let mut migrate = keyplane();
    migrate.args(["admin", "migrate"]).args(store.args());
    let migrated = run(&mut migrate, TIMEOUT).await;
    assert!(migrated.status.success(), "{}", migrated.describe());
    assert_eq!(
        migrated.stdout.trim(),
        format!("migrated the store from schema {OLDER_SCHEMA} to {latest}")
    );
    assert_eq!(
        keyplane_store::testing::schema_version(&store.db.url).await,
        latest
    );
    let again = run(&mut migrate, TIMEOUT).await;
    assert!(again.status.success(), "{}", again.describe());
    assert_eq!(
        again.stdout.trim(),
        format!("the store is at schema {latest}: nothing to migrate")
    );

    let shown = run(&mut show(), TIMEOUT).await;
    assert!(shown.status.success(), "{}", shown.describe());
}

/// `serve` migrates a store at an older schema as it starts (the first newer replica of a rolling
/// upgrade), and its log says from which schema to which, before and after.
async fn serve_migrates_an_older_schema_and_says_from_which(backend: Backend) {
    let store = TestStore::new(backend).await;
    keyplane_store::testing::migrate_to(&store.db.url, OLDER_SCHEMA).await;
    let latest = keyplane_store::testing::latest_schema();
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let exited = server.stop_term().await;
    let messages: Vec<Value> = exited
        .log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .collect();
    let position = |message: &str| {
        messages
            .iter()
            .position(|event| event["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} in the log:\n{}", exited.log))
    };
    let migrating = position(&format!(
        "migrating the store from schema {OLDER_SCHEMA} to {latest}"
    ));
    let migrated = position(&format!(
        "migrated the store from schema {OLDER_SCHEMA} to {latest}"
    ));
    let ready = position("store ready");
    assert!(migrating < migrated && migrated < ready, "{}", exited.log);
    assert_eq!(messages[ready]["schema"], latest, "{}", exited.log);
    assert_eq!(
        keyplane_store::testing::schema_version(&store.db.url).await,
        latest
    );
}

/// A store that ran another migration 14 than this keyplane's: the command says which migration
/// and what is wrong, not only that it could not open the store.
async fn a_modified_migration_is_named_on_stderr(backend: Backend) {
    let store = TestStore::new(backend).await;
    keyplane_store::testing::migrate_to(&store.db.url, 14).await;
    let modify = "UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 14";
    let zeros = [0_u8; 48];
    if backend == Backend::Sqlite {
        let pool = sqlx::SqlitePool::connect(&store.db.url).await.unwrap();
        let query = sqlx::query(modify).bind(zeros.as_slice());
        query.execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(&store.db.url).await.unwrap();
        let query = sqlx::query(modify).bind(zeros.as_slice());
        query.execute(&pool).await.unwrap();
        pool.close().await;
    }
    for command in [
        &["admin", "migrate"][..],
        &["admin", "registry-key", "show"],
    ] {
        let output = run(keyplane().args(command).args(store.args()), TIMEOUT).await;
        assert!(!output.status.success(), "{}", output.describe());
        assert!(
            output
                .stderr
                .contains("migration 14 was previously applied but has been modified"),
            "{}",
            output.describe()
        );
    }
}

async fn serve_bootstraps_default_org_once(backend: Backend) {
    let store = TestStore::new(backend).await;
    let path = store.bootstrap_path();

    let server = Keyplane::start(&store, &[], TIMEOUT).await;
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

    let server = Keyplane::start(&store, &[], TIMEOUT).await;
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

    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let org = Org::from_json(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(names(&server.list_tokens(&org).await), ["bootstrap"]);
    let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pending"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    server.stop_term().await;
}

/// A start that died between the store's commit and moving the token into place left it in its
/// pending file: the next start puts it where the operator looks, and removes the pending files of
/// attempts the store did not take.
async fn a_bootstrap_token_left_pending_is_moved_into_place_at_the_next_start(backend: Backend) {
    let store = TestStore::new(backend).await;
    let path = store.bootstrap_path();
    Keyplane::start(&store, &[], TIMEOUT)
        .await
        .stop_term()
        .await;
    let org = store.bootstrap_org();
    let dir = path.parent().unwrap();
    let pending = format!("bootstrap.{}.json.pending", org.id);
    std::fs::rename(&path, dir.join(&pending)).unwrap();
    let lost = "bootstrap.00000000-0000-4000-8000-000000000000.json.pending";
    std::fs::write(
        dir.join(lost),
        format!(
            "{{\"org_id\":\"x\",\"token\":\"aether_{}\"}}",
            "0".repeat(56)
        ),
    )
    .unwrap();

    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    assert_eq!(store.bootstrap_org().token, org.token);
    assert!(!store.data_dir_has(&pending));
    assert!(
        !store.data_dir_has(lost),
        "an attempt the store did not take"
    );
    assert_eq!(names(&server.list_tokens(&org).await), ["bootstrap"]);
    server.stop_term().await;

    // A bootstrap file left from a wiped store holds a dead token: the pending one replaces it.
    std::fs::rename(&path, dir.join(&pending)).unwrap();
    std::fs::write(&path, "{\"org_id\":\"stale\",\"token\":\"stale\"}").unwrap();
    Keyplane::start(&store, &[], TIMEOUT)
        .await
        .stop_term()
        .await;
    assert_eq!(store.bootstrap_org().token, org.token);
    assert!(!store.data_dir_has(&pending));
}

async fn admin_create_org_while_server_runs(backend: Backend) {
    let store = TestStore::new(backend).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let default_org = store.bootstrap_org();

    let output = run(
        keyplane()
            .args(["admin", "create-org", "--name", "acme", "--json"])
            .args(store.args()),
        TIMEOUT,
    )
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
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();

    let mut created = Vec::new();
    for i in 0..20 {
        created.push(
            server
                .create_token(&org, &format!("token-{i:02}"), TOKEN_SCOPES, None)
                .await,
        );
    }
    let (revoked, kept) = created.split_first().expect("tokens were created");
    assert_eq!(
        server.revoke_token(&org, &revoked.id).await,
        StatusCode::NO_CONTENT
    );
    server.kill();

    let server = Keyplane::start(&store, &[], TIMEOUT).await;
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
    let server = Keyplane::start(&store, &["--last-used-flush-ms", "600000"], TIMEOUT).await;
    let org = store.bootstrap_org();
    let token = server
        .create_token(&org, "used-once", TOKEN_SCOPES, None)
        .await;

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

    let server = Keyplane::start(&store, &[], TIMEOUT).await;
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

/// A stop waits for an in-flight request up to `--shutdown-timeout-seconds`; a second SIGTERM
/// ends it at once, with status 1.
#[tokio::test]
async fn a_second_sigterm_ends_a_stop_at_once() {
    use tokio::io::AsyncWriteExt;
    let store = TestStore::new(Backend::Sqlite).await;
    let mut server = Keyplane::start(&store, &["--shutdown-timeout-seconds", "60"], TIMEOUT).await;
    let org = store.bootstrap_org();
    // A create whose body never finishes arriving: in flight until the stop gives up on it.
    let mut held = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/organizations/{}/api-tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":",
        org.id, org.token
    );
    held.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.process.0.id().to_string();
    let term = || {
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    };
    term();
    assert!(
        wait_for_exit(&mut server.process.0, Duration::from_secs(2))
            .await
            .is_none(),
        "the stop waits for the request in flight"
    );
    term();
    let status = wait_for_exit(&mut server.process.0, Duration::from_secs(5))
        .await
        .expect("a second SIGTERM ends the stop at once");
    assert_eq!(status.code(), Some(1));
    drop(held);
}

#[tokio::test]
async fn serve_help_documents_every_flag_with_its_env_var() {
    let output = run(keyplane().args(["serve", "--help"]), TIMEOUT).await;
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
        (
            "--allow-insecure-permissions",
            "KEYPLANE_ALLOW_INSECURE_PERMISSIONS",
        ),
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
    // clap's own `--help` and `--version` (propagated to each subcommand) read no variable.
    for option in options
        .iter()
        .filter(|option| !option.contains("--help") && !option.contains("--version"))
    {
        assert!(
            option.contains("[env: KEYPLANE_"),
            "an option without an env var:\n{option}"
        );
    }
}

#[tokio::test]
async fn bad_database_url_fails_with_one_clear_line() {
    let data_dir = tempfile::tempdir().expect("create a temporary directory");
    let output = run(
        keyplane()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                "mysql://x",
                "--data-dir",
            ])
            .arg(data_dir.path()),
        TIMEOUT,
    )
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

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Under the common umask 022, `serve` creates its data directory 0700 and the database, its WAL
/// and its shared-memory file 0600: they hold every credential hash and the registry signing key.
#[tokio::test]
async fn data_dir_and_database_files_are_private_whatever_the_umask() {
    let store = TestStore::new(Backend::Sqlite).await;
    let dir = store.db.data_dir.clone();
    std::fs::remove_dir(&dir).expect("remove the empty data directory, for serve to create it");

    let server = Keyplane::start_from(keyplane_with_umask(0o022), &store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    server
        .create_token(&org, "written", TOKEN_SCOPES, None)
        .await;
    assert_eq!(mode_of(&dir), 0o700, "the data directory");
    for name in [
        "keyplane.db",
        "keyplane.db-wal",
        "keyplane.db-shm",
        "bootstrap.json",
    ] {
        assert_eq!(mode_of(&dir.join(name)), 0o600, "{name}");
    }
    server.stop_term().await;
}

/// A data directory or database file that group or others may read stops `serve` and `admin`
/// with a message saying what to do, unless --allow-insecure-permissions (or its env twin).
#[tokio::test]
async fn serve_and_admin_refuse_a_store_others_can_read() {
    let store = TestStore::new(Backend::Sqlite).await;
    let dir = store.db.data_dir.clone();
    Keyplane::start(&store, &[], TIMEOUT)
        .await
        .stop_term()
        .await;

    let refused = |output: &common::CommandOutput, path: &std::path::Path| {
        assert!(
            !output.status.success(),
            "started anyway: {}",
            output.describe()
        );
        let said = &output.stderr;
        assert!(
            said.contains(&path.display().to_string())
                && said.contains("chmod")
                && said.contains("--allow-insecure-permissions"),
            "the refusal should name {} and the fix: {said}",
            path.display()
        );
    };
    let serve = || {
        let mut command = keyplane();
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(store.args());
        command
    };
    let create_org = |name: &str| {
        let mut command = keyplane();
        command
            .args(["admin", "create-org", "--name", name, "--json"])
            .args(store.args());
        command
    };

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused(&run(&mut serve(), TIMEOUT).await, &dir);
    refused(&run(&mut create_org("acme"), TIMEOUT).await, &dir);
    let allowed = run(
        create_org("acme").arg("--allow-insecure-permissions"),
        TIMEOUT,
    )
    .await;
    assert!(allowed.status.success(), "{}", allowed.describe());
    Keyplane::start(&store, &["--allow-insecure-permissions"], TIMEOUT)
        .await
        .stop_term()
        .await;

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let database = dir.join("keyplane.db");
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(&run(&mut serve(), TIMEOUT).await, &database);
    let allowed = run(
        create_org("globex").env("KEYPLANE_ALLOW_INSECURE_PERMISSIONS", "true"),
        TIMEOUT,
    )
    .await;
    assert!(allowed.status.success(), "{}", allowed.describe());
}

/// A `KEYPLANE_LOG` that is not a log filter stops `serve` with a message that says so, rather
/// than logging at `info` as if it had not been set.
#[tokio::test]
async fn serve_refuses_a_log_filter_it_cannot_read() {
    let store = TestStore::new(Backend::Sqlite).await;
    let output = run(
        keyplane()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(store.args())
            .env("KEYPLANE_LOG", "keyplane_server=debg"),
        TIMEOUT,
    )
    .await;
    assert!(
        !output.status.success(),
        "started anyway: {}",
        output.describe()
    );
    assert!(
        output.stderr.contains("KEYPLANE_LOG is not a log filter"),
        "{}",
        output.describe()
    );
}

/// SIGTERM closes the store after the last flush: SQLite checkpoints its WAL into the database
/// and removes it, instead of leaving megabytes behind.
#[tokio::test]
async fn sigterm_closes_the_store_and_leaves_no_wal() {
    let store = TestStore::new(Backend::Sqlite).await;
    let server = Keyplane::start(&store, &[], TIMEOUT).await;
    let org = store.bootstrap_org();
    for i in 0..30 {
        server
            .create_token(&org, &format!("token-{i:02}"), TOKEN_SCOPES, None)
            .await;
    }
    let wal = store.db.data_dir.join("keyplane.db-wal");
    let size = |path: &std::path::Path| std::fs::metadata(path).map_or(0, |m| m.len());
    assert!(size(&wal) > 0, "the running server writes through its WAL");
    let exited = server.stop_term().await;
    assert!(
        exited.status.success(),
        "serve exited with {}",
        exited.status
    );
    assert_eq!(size(&wal), 0, "SIGTERM left a WAL of {} bytes", size(&wal));
}

/// The scope of the tokens these tests create: one that may list its org's tokens, so that the
/// token can show it authenticates.
const TOKEN_SCOPES: &[&str] = &["api_tokens:read"];

fn names(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|item| common::string_field(item, "name"))
        .collect()
}

/// How a server ended: its exit status and everything it logged.
struct Exited {
    status: ExitStatus,
    log: String,
}

impl Keyplane {
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
        self.reader.join().expect("the log reader panicked");
        let log = common::lock(&self.log).clone();
        Exited { status, log }
    }

    /// SIGKILL: the process gets no chance to clean up.
    fn kill(self) {
        drop(self.process);
    }

    async fn get_tokens(&self, org_id: &str, bearer: &str) -> reqwest::Response {
        self.http
            .get(format!("{}?limit=100", self.tokens_url(org_id)))
            .bearer_auth(bearer)
            .send()
            .await
            .expect("GET api-tokens")
    }
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

/// GitHub's keys fetched in the clear from anywhere but loopback would let anyone on the path
/// forge GitHub's leak reports: `serve` refuses such a URL at start, in one line naming the flag.
#[tokio::test]
async fn plain_http_keys_url_off_loopback_fails_with_one_clear_line() {
    let data_dir = tempfile::tempdir().expect("create a temporary directory");
    let output = run(
        keyplane()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--github-secret-scanning-keys-url",
                "http://keys.example/secret_scanning",
                "--data-dir",
            ])
            .arg(data_dir.path()),
        TIMEOUT,
    )
    .await;
    assert!(!output.status.success(), "serve accepted a plain-http URL");
    let lines: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{}", output.stderr);
    assert!(
        lines[0].contains("--github-secret-scanning-keys-url") && lines[0].contains("https"),
        "{}",
        lines[0]
    );
}

/// Flag combinations `serve` would not honour are refused at start, in one line naming both flags:
/// a revocation heartbeat at or past the idle timeout (every idle stream would be cut before its
/// heartbeat), and a burst of 0 or above the per-minute rate (once silently made 1 or the rate).
/// A per-minute rate below the default burst, alone, is not a contradiction: the burst follows it.
#[tokio::test]
async fn a_low_rate_limit_alone_lowers_the_default_burst() {
    let store = common::TestStore::new(Backend::Sqlite).await;
    let keyplane = common::Keyplane::start(
        &store,
        &["--rate-limit-per-minute", "3"],
        Duration::from_secs(30),
    )
    .await;
    let org = store.bootstrap_org();
    let statuses: Vec<u16> = {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let answer = keyplane
                .http
                .get(keyplane.tokens_url(&org.id))
                .bearer_auth(&org.token)
                .send()
                .await
                .unwrap();
            statuses.push(answer.status().as_u16());
        }
        statuses
    };
    assert_eq!(statuses, [200, 200, 200, 429, 429], "a burst of 3");
}

/// The per-organization default (100) follows a lower --max-revocation-streams rather than
/// contradict it.
#[tokio::test]
async fn a_low_stream_limit_alone_starts_and_bounds_the_streams() {
    let store = common::TestStore::new(Backend::Sqlite).await;
    let keyplane = common::Keyplane::start(
        &store,
        &["--max-revocation-streams", "2"],
        Duration::from_secs(30),
    )
    .await;
    let org = store.bootstrap_org();
    let mut open = Vec::new();
    for _ in 0..3 {
        let answer = keyplane
            .http
            .get(keyplane.url("/v1/revocations/stream"))
            .bearer_auth(&org.token)
            .send()
            .await
            .unwrap();
        open.push(answer);
    }
    let statuses: Vec<u16> = open.iter().map(|a| a.status().as_u16()).collect();
    assert_eq!(statuses, [200, 200, 429], "two streams, all the server has");
}

#[tokio::test]
async fn contradictory_limits_fail_with_one_clear_line() {
    for (flags, named) in [
        (
            &["--revocation-heartbeat-seconds", "90"][..],
            &["--revocation-heartbeat-seconds", "--idle-timeout-seconds"][..],
        ),
        (
            &["--idle-timeout-seconds", "10"][..],
            &["--revocation-heartbeat-seconds", "--idle-timeout-seconds"][..],
        ),
        (
            &["--idle-timeout-seconds", "15"][..],
            &["--revocation-heartbeat-seconds", "--idle-timeout-seconds"][..],
        ),
        (
            &["--rate-limit-burst", "101"][..],
            &["--rate-limit-burst", "--rate-limit-per-minute"][..],
        ),
        (
            &["--rate-limit-burst", "0"][..],
            &["--rate-limit-burst"][..],
        ),
        (
            &["--max-revocation-streams-per-org", "1001"][..],
            &[
                "--max-revocation-streams-per-org",
                "--max-revocation-streams",
            ][..],
        ),
        (
            &[
                "--max-revocation-streams",
                "10",
                "--max-revocation-streams-per-org",
                "11",
            ][..],
            &[
                "--max-revocation-streams-per-org",
                "--max-revocation-streams",
            ][..],
        ),
    ] {
        let data_dir = tempfile::tempdir().expect("create a temporary directory");
        // Private, so nothing but the flags could stop the start.
        std::fs::set_permissions(data_dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let output = run(
            keyplane()
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(flags)
                .arg("--data-dir")
                .arg(data_dir.path()),
            // Refused before the store is opened: at once.
            Duration::from_secs(10),
        )
        .await;
        assert!(!output.status.success(), "serve accepted {flags:?}");
        let lines: Vec<&str> = output.stderr.lines().collect();
        assert!(
            named.iter().all(|flag| output.stderr.contains(flag)),
            "{flags:?}: {}",
            output.stderr
        );
        assert!(
            !data_dir.path().join("bootstrap.json").exists(),
            "{flags:?}: started anyway"
        );
        if named.len() == 2 {
            assert_eq!(
                lines.len(),
                1,
                "{flags:?}: expected one line, got:\n{}",
                output.stderr
            );
        }
    }
}

/// `--registry-costly-grants-per-org` takes 1 up to the server's costly-grant turns (2 per core):
/// 0, or more than the server has, is refused at start with a line that names the flag and the
/// bound; a share within them starts.
#[tokio::test]
async fn the_costly_grant_share_is_checked_at_start() {
    for (value, bound) in [("0", "1.."), ("100000", "2 per core")] {
        let data_dir = tempfile::tempdir().expect("create a temporary directory");
        std::fs::set_permissions(data_dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let output = run(
            keyplane()
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(["--registry-costly-grants-per-org", value])
                .arg("--data-dir")
                .arg(data_dir.path()),
            Duration::from_secs(10),
        )
        .await;
        assert!(!output.status.success(), "serve accepted {value}");
        assert!(
            output.stderr.contains("--registry-costly-grants-per-org")
                && output.stderr.contains(bound)
                && !output.stderr.contains("unexpected argument"),
            "{value}: {}",
            output.stderr
        );
        assert!(!data_dir.path().join("bootstrap.json").exists());
    }
    let store = common::TestStore::new(Backend::Sqlite).await;
    let keyplane = Keyplane::start(
        &store,
        &["--registry-costly-grants-per-org", "1"],
        Duration::from_secs(30),
    )
    .await;
    let health = keyplane
        .http
        .get(keyplane.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

/// `--max-clock-skew-seconds` takes 1 to 3600: 0 (every measurement would hold the jobs) or more
/// than an hour (the guard would let grace periods end an hour early) is refused at start with a
/// line naming the flag; a value within starts, and `/readyz` shows it.
#[tokio::test]
async fn the_clock_skew_limit_is_checked_at_start() {
    for value in ["0", "3601"] {
        let data_dir = tempfile::tempdir().expect("create a temporary directory");
        std::fs::set_permissions(data_dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let output = run(
            keyplane()
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(["--max-clock-skew-seconds", value])
                .arg("--data-dir")
                .arg(data_dir.path()),
            Duration::from_secs(10),
        )
        .await;
        assert!(!output.status.success(), "serve accepted {value}");
        assert!(
            output.stderr.contains("--max-clock-skew-seconds")
                && output.stderr.contains("1..=3600"),
            "{value}: {}",
            output.stderr
        );
        assert!(!data_dir.path().join("bootstrap.json").exists());
    }
    let store = common::TestStore::new(Backend::Sqlite).await;
    let keyplane = Keyplane::start(
        &store,
        &["--max-clock-skew-seconds", "2"],
        Duration::from_secs(30),
    )
    .await;
    let ready: serde_json::Value = keyplane
        .http
        .get(keyplane.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["clock"]["limit_seconds"], 2.0, "{ready}");
    assert_eq!(ready["clock"]["status"], "not_checked", "{ready}");
}

/// `--max-connections-per-client` caps the connections one address holds: past it a new one is
/// closed unserved, while the address's admitted connections are served.
#[tokio::test]
async fn the_per_client_connection_cap_is_a_serve_flag() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let store = common::TestStore::new(Backend::Sqlite).await;
    let keyplane = Keyplane::start(
        &store,
        &["--max-connections-per-client", "1"],
        Duration::from_secs(30),
    )
    .await;
    async fn health_on(stream: &mut tokio::net::TcpStream) -> Option<String> {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: keyplane\r\n\r\n")
            .await
            .ok()?;
        let mut buffer = vec![0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buffer[..n]).into_owned()),
            Ok(_) => None,
            Err(_) => panic!("no answer and no close within 10 s"),
        }
    }
    // From 127.0.0.2: the test's HTTP client keeps its own connections from 127.0.0.1.
    let connect = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socket
            .connect(keyplane.addr.parse().unwrap())
            .await
            .unwrap()
    };
    let mut held = connect().await;
    let mut refused = connect().await;
    assert_eq!(health_on(&mut refused).await, None, "served past the cap");
    let answer = health_on(&mut held)
        .await
        .expect("the held connection is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// `admin registry-key ARGS` on `store`.
async fn registry_key(store: &TestStore, args: &[&str]) -> common::CommandOutput {
    run(
        keyplane()
            .args(["admin", "registry-key"])
            .args(args)
            .args(store.args()),
        TIMEOUT,
    )
    .await
}

/// A promotion `ago` (the staged key made current then), through the store: the binary promotes
/// now only.
async fn promoted_ago(store: &TestStore, ago: TimeDelta) {
    let staged = registry_key(store, &["stage"]).await;
    assert!(staged.status.success(), "{}", staged.describe());
    let handle = keyplane_store::connect(&store.db.url).await.unwrap();
    let recorded = keyplane_server::ops::signing_key_event(
        keyplane_core::audit::actions::REGISTRY_SIGNING_KEY_PROMOTED,
        "test",
        None,
        None,
    );
    handle
        .promote_signing_key(Utc::now() - ago, &recorded)
        .await
        .expect("promote");
    handle.close().await;
}

/// `admin registry-key retire-previous` waits until the registry can accept no token the previous
/// key signed: the last one a replica signed before it reloaded (30 s, the default refresh
/// interval, after the promotion) lives 24 h, and Distribution accepts it 60 s past its `exp`.
/// 30 s before that it is refused (exit status 1, naming the leeway and --force), the bundle
/// keeping both certificates; 30 s after, it retires the key.
async fn retire_previous_waits_out_the_registry_leeway(backend: Backend) {
    let store = TestStore::new(backend).await;
    let past_ttl_and_refresh = TimeDelta::seconds(86_400 + 30);
    promoted_ago(&store, past_ttl_and_refresh + TimeDelta::seconds(30)).await;
    let previous = || async {
        let shown = registry_key(&store, &["show", "--json"]).await;
        assert!(shown.status.success(), "{}", shown.describe());
        serde_json::from_str::<Value>(&shown.stdout).unwrap()["previous"]["key_id"].clone()
    };
    let kept = previous().await;
    assert!(kept.is_string(), "a previous key after the promotion");
    let refused = registry_key(&store, &["retire-previous"]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("60 s leeway")
            && refused.stderr.contains("--force")
            && refused.stderr.contains(kept.as_str().unwrap()),
        "{}",
        refused.describe()
    );
    assert_eq!(previous().await, kept, "still in the bundle");

    promoted_ago(&store, past_ttl_and_refresh + TimeDelta::seconds(90)).await;
    let replaced = previous().await;
    let retired = registry_key(&store, &["retire-previous"]).await;
    assert!(retired.status.success(), "{}", retired.describe());
    assert_eq!(retired.stdout.trim(), replaced.as_str().unwrap());
    assert_eq!(previous().await, Value::Null);
}

both_stores!(retire_previous_waits_out_the_registry_leeway);
