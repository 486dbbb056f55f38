//! `tls-hello`: the axum hello world of the peers recipe (`GET /` and `GET /verify` answer 200
//! "ok") over TLS, terminated the way `keyplane serve --tls-cert --tls-key` terminates it, so that
//! `bench/run.sh` (`PARTS=tls`) can put keyplane over TLS beside a hello world over TLS:
//!
//! - the rustls configuration is keyplane's own: [`TlsFiles::load`] (versions, provider, ALPN);
//! - each connection is accepted with [`tokio_rustls::TlsAcceptor`], then served by hyper's
//!   HTTP/2 builder when ALPN chose `h2`, its HTTP/1.1 builder otherwise, with the builder
//!   settings of keyplane's connection loop at its default limits.
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
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyplane_server::tls::TlsFiles;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// keyplane's defaults (`HttpLimits::default()` and `connection::MAX_CONCURRENT_STREAMS`).
const MAX_HEADER_BYTES: usize = 32 * 1024;
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// keyplane's default `header_read_timeout`, which bounds its handshakes too.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES)
        .header_read_timeout(None);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, say: wait rather than spin.
                eprintln!("accept: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, http1, http2, app) =
            (acceptor.clone(), http1.clone(), http2.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            // As keyplane: the router answers each request through `oneshot`.
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                app.clone().oneshot(request)
            });
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            // A connection that ends in an error concerns that client only.
            let _ = if h2 {
                http2.serve_connection(TokioIo::new(stream), service).await
            } else {
                http1.serve_connection(TokioIo::new(stream), service).await
            };
        });
    }
}
