//! The `keyplane` binary. The only crate that reads process arguments and environment, and the one
//! place the tracing subscriber is installed.

mod admin;
mod audit_against;
mod delete_org;
mod follow;
mod import;
mod remote;
mod restore_replay;
mod serve;
mod tenant_admin;
mod tty;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use remote::{example, exit_codes, Environment, Target};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// mimalloc: the request path allocates small, short-lived buffers (headers, futures); a faster
/// allocator is a measured throughput gain on verification (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: keyplane_server::allocator::Allocator = keyplane_server::allocator::Allocator;

/// `--version`: the package version, and the store schema this binary brings a store to (which an
/// older store is migrated to, and a newer one is refused over).
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        format!(
            "{} (store schema {})",
            env!("CARGO_PKG_VERSION"),
            keyplane_store::latest_schema()
        )
    })
}

#[derive(Parser)]
#[command(
    name = "keyplane",
    version = version(),
    propagate_version = true,
    about = "Issue, rotate, revoke and verify machine credentials",
    after_help = concat!(
        "Example:\n",
        "  keyplane serve\n",
        "  keyplane login --url http://127.0.0.1:8080\n",
        "  keyplane tokens create --name ci --scope api_tokens:read --expires-in 30d\n\n",
        "The client commands take a token from --token-file, KEYPLANE_TOKEN, or the profile saved by \
         `keyplane login` (under $XDG_CONFIG_HOME/keyplane; its token is sent only to the URL it was \
         saved with), and the server from --url or KEYPLANE_URL (which KEYPLANE_TOKEN needs: it is never \
         sent to a profile's server).\n\n",
        exit_codes!(),
    )
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and moved out at once: the size of the serve flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve(serve::ServeArgs),
    /// Administrative commands that work directly on the store (safe while a server runs).
    Admin(admin::AdminArgs),
    /// Save a server URL and token as a profile for the client commands (checked with whoami).
    #[command(after_help = concat!(
        "Asks for the token without echo on a terminal; otherwise pass --token-stdin.\n\n",
        "Example:\n  keyplane login --url https://keyplane.example.com\n",
        "  jq -r .token keyplane-data/bootstrap.json | keyplane login --token-stdin --profile local\n\n",
        exit_codes!()
    ))]
    Login {
        #[command(flatten)]
        target: Target,
        /// Read the token from stdin instead of asking for it.
        #[arg(long)]
        token_stdin: bool,
    },
    /// Forget a saved profile's URL and token.
    #[command(after_help = concat!("Example:\n  keyplane logout --profile local\n\n", exit_codes!()))]
    Logout {
        #[command(flatten)]
        target: Target,
    },
    /// Describe the calling credential (kind, id, organization, scopes).
    #[command(after_help = concat!("Example:\n  keyplane whoami -o json | jq -r .org_id\n\n", exit_codes!()))]
    Whoami {
        #[command(flatten)]
        target: Target,
    },
    /// Ask whether a token is active (RFC 7662; the caller needs tokens:verify).
    #[command(after_help = concat!(
        "Example:\n  keyplane introspect - < token.txt\n",
        "  printf %s \"$TOKEN\" | keyplane introspect -\n\n",
        exit_codes!()
    ))]
    Introspect {
        /// `-`: the token to check is read from stdin. A token given here is refused: `ps` and
        /// the shell's history would show it.
        #[arg(value_name = "-")]
        stdin: String,
        #[command(flatten)]
        target: Target,
    },
    /// Report leaked tokens (found in a paste, a log, a repository) for revocation; needs no
    /// credential. Each distinct token is sent once, 100 a request, waiting out the server's
    /// per-address limit. The answer only counts what was sent, never which tokens were real.
    #[command(after_help = concat!(
        "Example:\n  keyplane revoke-leaked - < found-tokens.txt\n",
        "  grep -ohE 'aether_[0-9a-f]{56}' build.log | keyplane revoke-leaked -\n\n",
        exit_codes!()
    ))]
    RevokeLeaked {
        /// The tokens, or `-` to read them from stdin (whitespace-separated).
        #[arg(required = true, value_name = "TOKEN")]
        tokens: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Organization API tokens: list, create, get, rotate, suspend, resume, retire-previous, revoke.
    #[command(after_help = example!("keyplane tokens create --name ci --scope api_tokens:read --expires-in 30d", "keyplane tokens list -o json | jq -r '.items[].name'"))]
    Tokens {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: remote::TokensCommand,
    },
    /// Service accounts (Hybridbox): list, create, rotate, suspend, resume, retire-previous, revoke.
    #[command(after_help = example!("keyplane service-accounts create --name billing-sync --secret-file sa.token"))]
    ServiceAccounts {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: remote::ServiceAccountsCommand,
    },
    /// Grants (Hybridbox authorizations): list, create, revoke.
    #[command(after_help = example!("keyplane grants create --subject-type service_account --subject-id ID --capability-key auth.manage"))]
    Grants {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: remote::GrantsCommand,
    },
    /// The organization's container registry project: show, enable.
    #[command(after_help = example!("keyplane registry enable --secret-file robot.password", "keyplane registry show"))]
    Registry {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: remote::RegistryCommand,
    },
    /// Registry robot accounts: list, create, get, update, rotate, suspend, resume,
    /// retire-previous, revoke.
    #[command(after_help = example!("keyplane robots create --name ci --permission pull --permission 'push:team-a/*'"))]
    Robots {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: remote::RobotsCommand,
    },
    /// The organization's credential policy (lifetimes, leak action): show, set.
    #[command(after_help = example!("keyplane policy set --max-lifetime-days 90 --require-expiry", "keyplane policy show"))]
    Policy {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: remote::PolicyCommand,
    },
    /// The organization's webhooks and their deliveries: list, create, get, update, delete,
    /// rotate-secret, deliveries, retry.
    #[command(after_help = example!(
        "keyplane webhooks create --endpoint https://hooks.example.com/keyplane --event 'api_token.*'",
        "keyplane webhooks deliveries WEBHOOK_ID --status failed"
    ))]
    Webhooks {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: remote::WebhooksCommand,
    },
    /// The organization's audit events over the API: list, tail [--follow].
    #[command(after_help = example!("keyplane audit tail --follow", "keyplane audit list --action 'api_token.*' -o jsonl"))]
    Audit {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: remote::AuditCommand,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  keyplane completion bash > /etc/bash_completion.d/keyplane\n  keyplane completion zsh > \"${fpath[1]}/_keyplane\"\n  keyplane completion fish > ~/.config/fish/completions/keyplane.fish"
    )]
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Where the state lives; shared by `serve` and every `admin` command.
#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Directory for the embedded SQLite database (WAL) and bootstrap.json. Created readable by
    /// its owner only (0700), as are the database files (0600).
    #[arg(long, env = "KEYPLANE_DATA_DIR", default_value = "./keyplane-data")]
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`; overrides --data-dir for the database.
    #[arg(long, env = "KEYPLANE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Open a SQLite store even if group or others may access its directory or files. They hold
    /// every credential hash and the registry signing key, so by default that refuses to start.
    #[arg(long, env = "KEYPLANE_ALLOW_INSECURE_PERMISSIONS")]
    pub allow_insecure_permissions: bool,
}

impl StoreArgs {
    pub fn url(&self) -> anyhow::Result<String> {
        let url = match &self.database_url {
            Some(url) => url.clone(),
            None => {
                create_private_dir(&self.data_dir)?;
                keyplane_store::sqlite_url_for_data_dir(&self.data_dir)
            }
        };
        if let Some(database) = sqlite_file(&url) {
            self.check_private(&database)?;
        }
        Ok(url)
    }

    /// Opens the store only if it is at this keyplane's schema (or new): the read-only admin
    /// commands, which must not migrate a shared store under the older replicas serving it.
    pub async fn open_read_only(
        &self,
    ) -> anyhow::Result<std::sync::Arc<dyn keyplane_store::Store>> {
        let opened = self
            .open_with(keyplane_store::PendingMigrations::Refuse)
            .await?;
        Ok(opened.store)
    }

    /// Opens the store, doing with pending migrations what `pending` says: `serve`, `admin
    /// migrate` and the admin commands that write apply them.
    pub async fn open_with(
        &self,
        pending: keyplane_store::PendingMigrations,
    ) -> anyhow::Result<keyplane_store::Opened> {
        keyplane_store::open(&self.url()?, pending)
            .await
            .map_err(|e| match e {
                keyplane_store::StoreError::SchemaBehind { at, latest } => anyhow::anyhow!(
                    "cannot open the store: its schema is at {at}, older than this keyplane's \
                     {latest}, and this command does not migrate it. Back the store up and run \
                     `keyplane admin migrate` (or start this keyplane's `serve --migrate auto`) to \
                     migrate it to {latest}; older keyplane replicas already running keep serving \
                     it, one that restarts is refused"
                ),
                e => anyhow::anyhow!("cannot open the store: {e}"),
            })
    }

    /// Refuses a SQLite database whose directory or files group or others may access, unless
    /// --allow-insecure-permissions.
    fn check_private(&self, database: &Path) -> anyhow::Result<()> {
        let directory = match database.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut files = vec![(directory.clone(), 0o700)];
        for suffix in ["", "-wal", "-shm"] {
            let mut name = database.as_os_str().to_owned();
            name.push(suffix);
            files.push((PathBuf::from(name), 0o600));
        }
        for (path, private_mode) in files {
            let Some(mode) = shared_mode(&path)? else {
                continue;
            };
            let problem = format!(
                "{} can be accessed by group or others (mode {mode:04o}), and it holds every \
                 credential hash and the registry signing key",
                path.display()
            );
            if self.allow_insecure_permissions {
                tracing::warn!(path = %path.display(), mode = format!("{mode:04o}"), "{problem}; starting anyway (--allow-insecure-permissions)");
            } else {
                anyhow::bail!(
                    "{problem}: run `chmod {private_mode:o} {}`, or pass --allow-insecure-permissions \
                     (KEYPLANE_ALLOW_INSECURE_PERMISSIONS=true) to open it anyway",
                    path.display()
                );
            }
        }
        Ok(())
    }
}

/// The mode of `path` if it exists and grants group or others any access.
fn shared_mode(path: &Path) -> anyhow::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(metadata) => {
                let mode = metadata.permissions().mode() & 0o7777;
                Ok((mode & 0o077 != 0).then_some(mode))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!(
                "cannot read the mode of {}: {e}",
                path.display()
            )),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(None)
    }
}

/// The database file a `sqlite:` URL names (`None` for other URLs and in-memory databases).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Creates `dir` (and missing parents) accessible by its owner only, whatever the umask. An
/// existing directory keeps its mode: [`StoreArgs::check_private`] judges it.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    let created = {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
    };
    #[cfg(not(unix))]
    let created = builder.create(dir);
    created.map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", dir.display()))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the log; a `KEYPLANE_LOG` that does not parse is refused, not replaced by `info`
/// unsaid (someone raising the level to diagnose would see nothing more, and not know why).
fn install_tracing(format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var_os("KEYPLANE_LOG") {
        None => tracing_subscriber::EnvFilter::new("info"),
        Some(_) => tracing_subscriber::EnvFilter::try_from_env("KEYPLANE_LOG").map_err(|e| {
            anyhow::anyhow!(
                "KEYPLANE_LOG is not a log filter ({e}); write e.g. `info`, `debug` or `info,keyplane_server=debug`"
            )
        })?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.fmt_fields(EscapedFields).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// The text log's field formatter: the default one's layout, with every control character (and
/// the Unicode line separators) escaped in every field, so that no value a client influences (a
/// cause, a name, a header) can end a line or forge one. (JSON escapes by itself.)
struct EscapedFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'writer> {
    writer: tracing_subscriber::fmt::format::Writer<'writer>,
    result: std::fmt::Result,
    first: bool,
}

impl tracing::field::Visit for EscapingVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if self.result.is_err() {
            return;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = match field.name() {
            "message" => write!(self.writer, "{separator}"),
            name => write!(self.writer, "{separator}{name}="),
        }
        .and_then(|()| write!(Escaping(&mut self.writer), "{value:?}"));
    }
}

/// Writes through, escaping control characters as `\n`, `\u{1b}`...
struct Escaping<'a, W: std::fmt::Write>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let mut rest = text;
        while let Some(at) =
            rest.find(|c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
        {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found at `at`");
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                other => write!(self.0, "\\u{{{:x}}}", other as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Why a command failed: the server side's errors exit 1, the client commands' say their status.
enum Failure {
    Local(anyhow::Error),
    Client(keyplane_client::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Local(e)
    }
}

impl From<keyplane_client::Error> for Failure {
    fn from(e: keyplane_client::Error) -> Self {
        Failure::Client(e)
    }
}

async fn run_client(command: Command) -> Result<(), keyplane_client::Error> {
    use remote::Session;
    let env = Environment::from_process();
    match command {
        Command::Login {
            target,
            token_stdin,
        } => remote::login(target, token_stdin, &env).await,
        Command::Logout { target } => remote::logout(&target, &env),
        Command::Whoami { target } => remote::whoami(Session::open(&target, &env)?).await,
        Command::Introspect { stdin, target } => {
            // Refused before a credential is looked for, whatever else is wrong.
            remote::stdin_marker(&stdin)?;
            remote::introspect(Session::open(&target, &env)?).await
        }
        Command::RevokeLeaked { tokens, target } => {
            remote::revoke_leaked(Session::anonymous(&target, &env)?, tokens).await
        }
        Command::Tokens { target, command } => {
            remote::tokens(Session::open(&target, &env)?, command).await
        }
        Command::ServiceAccounts { target, command } => {
            remote::service_accounts(Session::open(&target, &env)?, command).await
        }
        Command::Grants { target, command } => {
            remote::grants(Session::open(&target, &env)?, command).await
        }
        Command::Registry { target, command } => {
            remote::registry(Session::open(&target, &env)?, command).await
        }
        Command::Robots { target, command } => {
            remote::robots(Session::open(&target, &env)?, command).await
        }
        Command::Policy { target, command } => {
            remote::policy(Session::open(&target, &env)?, command).await
        }
        Command::Webhooks { target, command } => {
            remote::webhooks(Session::open(&target, &env)?, command).await
        }
        Command::Audit { target, command } => {
            remote::audit(Session::open(&target, &env)?, command).await
        }
        Command::Serve(_) | Command::Admin(_) | Command::Completion { .. } => {
            unreachable!("not a client command")
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "keyplane",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), Failure> = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                install_tracing(args.log_format)?;
                Ok(serve::run(args).await?)
            }
            Command::Admin(command) => Ok(admin::run(command).await?),
            client => Ok(run_client(client).await?),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Local(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(Failure::Client(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_status() as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        use std::fmt::Write;
        let mut out = String::new();
        write!(Escaping(&mut out), "a\nINFO forged\r\u{1b}[31m\u{2028}é\t").unwrap();
        assert_eq!(out, r"a\nINFO forged\r\u{1b}[31m\u{2028}é\t");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every client command's `--help` ends with an example and the exit statuses.
    #[test]
    fn client_commands_have_examples_and_exit_statuses() {
        fn check(command: &clap::Command, path: &str) {
            let path = format!("{path} {}", command.get_name());
            let help = command.get_after_help().map(|h| h.to_string());
            let help = help.unwrap_or_default();
            assert!(help.contains("Example:\n  keyplane "), "{path}: no example");
            if !path.contains("completion") {
                assert!(
                    help.contains("4 cannot reach the server"),
                    "{path}: no exit statuses"
                );
            }
            for sub in command.get_subcommands() {
                check(sub, &path);
            }
        }
        let cli = Cli::command();
        let server_side = ["serve", "admin", "help"];
        for command in cli.get_subcommands() {
            if !server_side.contains(&command.get_name()) {
                check(command, "keyplane");
            }
        }
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(
            sqlite_file("sqlite:///var/lib/kp/keyplane.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/kp/keyplane.db"))
        );
        assert_eq!(sqlite_file("sqlite:kp.db"), Some(PathBuf::from("kp.db")));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://h/db"), None);
    }
}
