//! The `keyplane` binary. The only crate that reads process arguments and environment, and the one
//! place the tracing subscriber is installed.

mod admin;
mod serve;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc: the request path allocates small, short-lived buffers (headers, futures); a faster
/// allocator is a measured throughput gain on verification (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "keyplane",
    version,
    about = "Issue, rotate, revoke and verify machine credentials"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve(serve::ServeArgs),
    /// Administrative commands that work directly on the store (safe while a server runs).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

/// Where the state lives; shared by `serve` and every `admin` command.
#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Directory for the embedded SQLite database (WAL) and bootstrap.json.
    #[arg(long, env = "KEYPLANE_DATA_DIR", default_value = "./keyplane-data")]
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`; overrides --data-dir for the database.
    #[arg(long, env = "KEYPLANE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

impl StoreArgs {
    pub fn url(&self) -> anyhow::Result<String> {
        match &self.database_url {
            Some(url) => Ok(url.clone()),
            None => {
                std::fs::create_dir_all(&self.data_dir).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot create data directory {}: {e}",
                        self.data_dir.display()
                    )
                })?;
                Ok(keyplane_store::sqlite_url_for_data_dir(&self.data_dir))
            }
        }
    }

    pub async fn open(&self) -> anyhow::Result<std::sync::Arc<dyn keyplane_store::Store>> {
        keyplane_store::connect(&self.url()?)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the store: {e}"))
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn install_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYPLANE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                install_tracing(args.log_format);
                serve::run(args).await
            }
            Command::Admin(command) => admin::run(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
