//! `body-wake`: how many times hyper's HTTP/1 server polls a connection's task per request, for
//! a request without a body and one with a small body, with nothing of keyplane's in between.
//!
//! With hyper 1.12/1.13 a request with a body costs two polls: the dispatcher registers the
//! connection task's waker as the body channel's sender waker, sends the whole body, drops its
//! sender, and when the handler takes the chunk, `Receiver::poll_next` (`src/body/chan.rs`) wakes
//! that waker though no sender is left; the task, woken during its own poll, is run again for
//! nothing. keyplane's introspection pays it on every request (BENCHMARKS.md, "Sixteenth
//! sitting"). This is the upstream report's reproduction, and tells when a hyper release fixes it
//! (`cargo update -p hyper`, then a body request is polled once, as a request without one is).
//!
//!   body-wake [--requests N]    # prints one line per kind: requests, polls, polls per request

use anyhow::{bail, Context as _};
use clap::Parser;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Polls of hyper's connection task per request, without and with a body")]
struct Cli {
    /// Requests of each kind, one after another on one kept-alive connection.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    requests: u32,
}

const ANSWER: &[u8] = b"ok";
const BODY: &[u8] = b"token=kp_example";

/// A future counting its polls.
struct Counted<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicU64>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Relaxed);
        self.inner.as_mut().poll(cx)
    }
}

/// Serves one connection on a current-thread runtime; returns (requests, polls).
async fn serve_one(listener: tokio::net::TcpListener) -> anyhow::Result<(u64, u64)> {
    // Bounded: were the client never to connect, the server thread would otherwise wait forever.
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .context("no client connected within 10 s")??;
    let served = Arc::new(AtomicU64::new(0));
    let polls = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let counter = counter.clone();
        async move {
            let sent = if request.method() == hyper::Method::POST {
                BODY.len()
            } else {
                0
            };
            // The whole body, as a handler taking a form reads it.
            let read = axum::body::to_bytes(axum::body::Body::new(request.into_body()), 1024)
                .await?
                .len();
            if read != sent {
                bail!("read {read} body bytes, sent {sent}");
            }
            counter.fetch_add(1, Relaxed);
            Ok::<_, anyhow::Error>(Response::new(axum::body::Body::from(ANSWER)))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    Counted {
        inner: Box::pin(connection),
        polls: polls.clone(),
    }
    .await
    .context("serving the connection")?;
    Ok((served.load(Relaxed), polls.load(Relaxed)))
}

/// Sends `requests` requests on one connection, each after the previous answer, then closes it.
fn drive(address: std::net::SocketAddr, requests: u32, with_body: bool) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    let request = if with_body {
        let mut request = format!(
            "POST /oauth2/introspect HTTP/1.1\r\nhost: 127.0.0.1\r\n\
             content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n",
            BODY.len()
        )
        .into_bytes();
        request.extend_from_slice(BODY);
        request
    } else {
        b"GET /verify HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".to_vec()
    };
    let mut answer = Vec::with_capacity(256);
    let mut buffer = [0u8; 1024];
    for _ in 0..requests {
        stream.write_all(&request)?;
        answer.clear();
        // The answer is a head and the two bytes of `ANSWER`.
        loop {
            let read = stream.read(&mut buffer)?;
            if read == 0 {
                bail!("the server closed the connection");
            }
            answer.extend_from_slice(&buffer[..read]);
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                if answer.len() >= end + 4 + ANSWER.len() {
                    break;
                }
            }
        }
        if !answer.starts_with(b"HTTP/1.1 200 ") {
            bail!(
                "unexpected answer: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(64)])
            );
        }
    }
    Ok(())
}

/// One kind of request: a server task on its own current-thread runtime, the client on this
/// thread.
fn measure(requests: u32, with_body: bool) -> anyhow::Result<(u64, u64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let address = listener.local_addr()?;
    let server = std::thread::spawn(move || runtime.block_on(serve_one(listener)));
    let driven = drive(address, requests, with_body);
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
    driven?;
    Ok(served)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    for (kind, with_body) in [("without a body", false), ("with a body", true)] {
        let (served, polls) = measure(cli.requests, with_body)?;
        if served != u64::from(cli.requests) {
            bail!("served {served} of {} requests", cli.requests);
        }
        println!(
            "hyper connection task, requests {kind}: {served} requests, {polls} polls, {:.2} polls per request",
            polls as f64 / served as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_request_is_answered_and_counted_with_its_polls() {
        for with_body in [false, true] {
            let (served, polls) = super::measure(200, with_body).unwrap();
            assert_eq!(served, 200, "with a body: {with_body}");
            // One poll at least per request; hyper's count beyond that is what the tool reports.
            assert!(polls >= served, "{polls} polls for {served} requests");
        }
    }
}
