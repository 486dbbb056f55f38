//! `tls-hello`: the axum hello world of the peers recipe (`GET /` and `GET /verify` answer 200
//! "ok") over TLS, terminated the way `keyplane serve --tls-cert --tls-key` terminates it, so that
//! `bench/run.sh` (`PARTS=tls`) can put keyplane over TLS beside a hello world over TLS:
//!
//! - the rustls configuration is keyplane's own: [`TlsFiles::load`] (versions, provider, ALPN);
//! - each connection is accepted and served by `tls_front` (bench/src/tls_front.rs): keyplane's
//!   HTTP builder settings at its default limits, HTTP/2 or HTTP/1.1 as ALPN chose.
//!
//! What it leaves out is keyplane's own per-connection work (connection cap, watchdog, body
//! deadline), which the comparison is meant to measure. It keeps the system allocator, as the
//! plain-HTTP hello world does, so the hello-over-TLS / hello-plain ratio varies TLS alone.
//!
//!   tls-hello cert DIR                          # DIR/cert.pem, DIR/key.pem (self-signed)
//!   BIND=127.0.0.1:8444 tls-hello serve --cert DIR/cert.pem --key DIR/key.pem

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use clap::{Parser, Subcommand};
use keyplane_server::tls::TlsFiles;
use std::path::PathBuf;
use tokio::net::TcpListener;

#[path = "../tls_front.rs"]
mod tls_front;

#[derive(Parser)]
#[command(about = "The axum hello world over TLS, terminated as keyplane terminates it")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a self-signed certificate for localhost and 127.0.0.1 to DIR/cert.pem and its
    /// private key to DIR/key.pem.
    Cert { dir: PathBuf },
    /// Serve GET / and GET /verify over TLS on env BIND (default 127.0.0.1:8443).
    Serve {
        #[arg(long, value_name = "PEM")]
        cert: PathBuf,
        #[arg(long, value_name = "PEM")]
        key: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Cert { dir } => write_cert(&dir),
        Command::Serve { cert, key } => serve(TlsFiles { cert, key }),
    }
}

fn write_cert(dir: &std::path::Path) -> anyhow::Result<()> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("cannot make a certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, pem: String, mode: u32| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut file| file.write_all(pem.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write("cert.pem", made.cert.pem(), 0o644)?;
    // A throwaway key, but a private key all the same: readable by its owner only.
    write("key.pem", made.signing_key.serialize_pem(), 0o600)?;
    eprintln!("wrote cert.pem and key.pem in {}", dir.display());
    Ok(())
}

/// The same runtime as `keyplane` (multi-threaded, one worker per CPU it may run on).
#[tokio::main]
async fn serve(files: TlsFiles) -> anyhow::Result<()> {
    let config = files.load()?;
    let addr = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8443".into());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/verify", get(|| async { "ok" }));
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!("tls-hello listening on https://{addr}");
    tls_front::serve(listener, config, |_| app.clone()).await
}
