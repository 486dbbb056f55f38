//! The TLS and HTTP front of the benchmarks' TLS peers: `tls-hello` and `bench/peers/kanidm`
//! (which includes this file by path: it cannot link keyplane's crates, whose SQLite clashes
//! with kanidm's). Each connection is accepted with [`tokio_rustls::TlsAcceptor`], then served
//! by hyper's HTTP/2 builder when ALPN chose `h2`, its HTTP/1.1 builder otherwise, with the
//! builder settings of keyplane's connection loop at its default limits.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// keyplane's defaults (`HttpLimits::default()` and `connection::MAX_CONCURRENT_STREAMS`).
const MAX_HEADER_BYTES: usize = 32 * 1024;
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// keyplane's default `header_read_timeout`, which bounds its handshakes too.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener`'s connections over TLS with `tls`, each with the router `app_for` gives
/// for its client's address.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    app_for: impl Fn(SocketAddr) -> Router,
) -> ! {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES)
        .header_read_timeout(None);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, say: wait rather than spin.
                eprintln!("accept: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, http1, http2, app) = (
            acceptor.clone(),
            http1.clone(),
            http2.clone(),
            app_for(client),
        );
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
