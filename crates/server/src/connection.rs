//! The HTTP server loop under `router::serve`: every connection is bounded in number, in time
//! and in memory, so slow or idle clients cannot exhaust file descriptors or keep a stop waiting.
//! Plain TCP speaks HTTP/1.1; with TLS (`crate::tls`) ALPN picks HTTP/2 or HTTP/1.1.
//!
//! - at most `max_connections` at once (a semaphore; more wait in the listen backlog, which is
//!   logged, once a minute at most, and counted in `connection_limit_reached`; the
//!   `connections_open` gauge counts them);
//! - at most `max_connections_per_client` of them from one client address (an IPv6 address's
//!   /64), so that one address cannot take every slot and make everyone else wait: one past it is
//!   closed as soon as it is accepted (logged once a minute at most, each counted in
//!   `connections_refused`). The TCP peer is the client here, before any request: trusted proxies
//!   are not capped, since each of their connections carries many clients' requests;
//! - a request head must arrive within `header_read_timeout` (from accept, so the TLS handshake
//!   counts, then from the first byte of each next request) and stay under `max_header_bytes`
//!   (431 on HTTP/1.1; on HTTP/2 the header list limit);
//! - a kept-alive connection that moves no byte for `idle_timeout` between requests is closed, and
//!   so is one whose client stops reading a response; on HTTP/2, idle means no request started or
//!   ended and no response body moved: the protocol's own frames (window updates, settings
//!   acknowledgements, pings) are neither a request's start nor activity, so they neither cut the
//!   idle timeout to the header one nor keep a connection open; an HTTP/2 connection closed for
//!   either is sent a GOAWAY first, and closed a second later;
//! - a streamed response (the revocation stream) keeps its connection open as long as it moves
//!   bytes, whatever the client sends meanwhile (HTTP/2 window updates and pings);
//! - a request body must arrive within `body_timeout` of the request's start ([`DeadlineBody`]);
//! - on shutdown, idle connections close at once, busy ones after their request (HTTP/2: a GOAWAY,
//!   then its open streams, without waiting for a client that no longer answers), and whatever
//!   is still open at `shutdown_timeout` is closed.
//!
//! One watchdog timer per connection enforces the first three: the connection's I/O and its
//! requests record when they last made progress ([`Activity`]), and the timer re-arms itself from
//! that instead of being reset on every read. On HTTP/1.1 it counts TCP bytes, under TLS; on
//! HTTP/2 requests and response body frames.

use crate::client_addr::{ClientAddr, TrustedProxies};
use crate::config::HttpLimits;
use crate::tls::CurrentTls;
use axum::http::Request;
use futures::future::Either;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulConnection;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{unconstrained, JoinSet};
use tokio::time::Instant;

/// Streams one HTTP/2 connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// How long an HTTP/2 connection closed for being idle or too slow has, after its GOAWAY, to
/// flush it and end; a client that reads nothing does not keep it longer. Streams the client
/// opened before it saw the GOAWAY are still served: the connection is looked at again every
/// `CLOSE_GRACE` until they are done, at most the body timeout.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How often, at most, the server logs that connections wait for a slot.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Serves `front` on `listener` until `shutdown` resolves, then drains connections until
/// `limits.shutdown_timeout`. With `tls`, every connection is accepted with the configuration
/// current at its accept. Each request carries its [`crate::client_addr::ClientAddr`]: the peer,
/// or the client a trusted proxy names.
pub(crate) async fn serve_http(
    listener: TcpListener,
    front: crate::router::Front,
    limits: &HttpLimits,
    trusted_proxies: &TrustedProxies,
    tls: Option<CurrentTls>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = Arc::new(limits.clone());
    let trusted_proxies = Arc::new(trusted_proxies.clone());
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = front.metrics().connections_open();
    let per_client = PerClient::new(limits.max_connections_per_client);
    let mut cap_warned: Option<Instant> = None;
    let mut client_cap_warned: Option<Instant> = None;
    let (stop, stopping) = watch::channel(false);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .max_header_size(limits.max_header_bytes)
        // hyper's minimum; the head cannot grow past `max_header_size` anyway.
        .max_buf_size(limits.max_header_bytes.max(8 * 1024))
        // Enforced by the watchdog, which tells idle from slow (hyper's starts when idle).
        .header_read_timeout(None)
        // One buffer and one `write` per response rather than a `writev` of head and body: the
        // copy is smaller than what vectored writes cost in hyper and the kernel, for the small
        // answers that are most of the traffic (BENCHMARKS.md, "Fifth sitting"), and under TLS.
        .writev(false);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                front.metrics().connection_limit_reached();
                // Silent, this would look like a hung server: probes queue too.
                if cap_warned.is_none_or(|at| at.elapsed() >= CAP_WARNING_INTERVAL) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait for one to close"
                    );
                    cap_warned = Some(Instant::now());
                }
                tokio::select! {
                    permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        while connections.try_join_next().is_some() {}
        let peer_ip = peer.ip().to_canonical();
        let client_slot = match &per_client {
            Some(per_client) if !trusted_proxies.trusts(peer_ip) => {
                let key = ClientAddr(peer_ip).limit_key();
                match per_client.admit(key) {
                    Some(client_slot) => Some(client_slot),
                    None => {
                        // Every one counted: the log line is once a minute at most.
                        front.metrics().connection_refused_per_client();
                        if client_cap_warned.is_none_or(|at| at.elapsed() >= CAP_WARNING_INTERVAL) {
                            tracing::warn!(
                                client.peer = %peer_ip,
                                client.limit_key = %key,
                                max_connections_per_client = limits.max_connections_per_client,
                                "one address holds its share of connections: closing its new ones"
                            );
                            client_cap_warned = Some(Instant::now());
                        }
                        // Closed before any byte is read: the refusal costs an accept and a close,
                        // and gives the slot back at once.
                        drop(stream);
                        continue;
                    }
                }
            }
            _ => None,
        };
        let slot = Slot::new(permit, &open);
        let connection = Connection {
            http1: http1.clone(),
            http2: http2.clone(),
            tls: tls.as_ref().map(|current| current.borrow().clone()),
            front: front.clone(),
            limits: limits.clone(),
            trusted_proxies: trusted_proxies.clone(),
            peer,
            stopping: stopping.clone(),
        };
        connections.spawn(async move {
            connection.serve(stream).await;
            drop(client_slot);
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "shutdown deadline reached: closing the connections still open"
        );
        connections.shutdown().await;
    }
}

/// A connection's place under `max_connections`, counted in the `connections_open` gauge until
/// dropped (also when a stop aborts the connection).
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: &Gauge) -> Self {
        open.inc();
        Self {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Connections open per client address (`ClientAddr::limit_key` of the TCP peer), for
/// `max_connections_per_client`.
struct PerClient {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerClient {
    /// `None` when `cap` is 0 (off).
    fn new(cap: usize) -> Option<Arc<Self>> {
        (cap > 0).then(|| {
            Arc::new(Self {
                cap,
                open: Mutex::new(HashMap::new()),
            })
        })
    }

    /// A place for one more connection from `key`, unless it has `cap` open.
    fn admit(self: &Arc<Self>, key: IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            per_client: self.clone(),
            key,
        })
    }
}

/// A connection's place under its address's `max_connections_per_client`, until dropped.
struct ClientSlot {
    per_client: Arc<PerClient>,
    key: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .per_client
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Forgotten at zero, so the map holds only addresses with connections open.
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Out of file descriptors or memory: wait a little rather than spin; anything else concerns one
/// connection only.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    ) {
        return;
    }
    tracing::warn!(%error, "cannot accept a connection; retrying shortly");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

struct Connection {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// The TLS configuration this connection is accepted with; `None`: plain HTTP/1.1.
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    front: crate::router::Front,
    limits: Arc<HttpLimits>,
    trusted_proxies: Arc<TrustedProxies>,
    peer: SocketAddr,
    stopping: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(self, stream: TcpStream) {
        let activity = Arc::new(Activity::new());
        let tracked = Tracked {
            stream,
            activity: activity.clone(),
        };
        let (front, peer, body_timeout) = (self.front.clone(), self.peer, self.limits.body_timeout);
        let trusted_proxies = self.trusted_proxies.clone();
        let requests = activity.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let http2 = requests.http2.load(Relaxed);
            requests.request_started();
            let client = trusted_proxies.client_of(peer, request.headers());
            let request = request.map(|body| {
                // Most requests have no body: nothing to wait for, so no deadline to keep.
                if body.is_end_stream() {
                    axum::body::Body::empty()
                } else {
                    axum::body::Body::new(DeadlineBody::new(body, body_timeout))
                }
            });
            match front.serve(request, client) {
                // Answered at once, as most verifications are: nothing to wait for (HTTP/2 waits
                // for the body, sent as the client's flow control allows).
                Either::Left(answered) if !http2 => {
                    requests.request_finished();
                    Either::Left(answered)
                }
                answering => {
                    // Finished when dropped: HTTP/2 drops a request's future when the client
                    // cancels the stream, and a count left up would suspend every deadline.
                    let handling = Handling(requests.clone());
                    Either::Right(async move {
                        let answer = answering.await;
                        answer.map(|response| handling.into_response(response))
                    })
                }
            }
        });
        let Some(config) = self.tls.clone() else {
            let connection = self.http1.serve_connection(TokioIo::new(tracked), service);
            return self.drive(connection, &activity, false).await;
        };
        // The handshake is part of the first request's head time.
        let due = activity
            .deadline(&self.limits)
            .unwrap_or_else(|| Instant::now() + self.limits.header_read_timeout);
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tracked);
        let stream = match tokio::time::timeout_at(due, accept).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(client.peer = %peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(client.peer = %peer, "TLS handshake too slow");
                return;
            }
        };
        if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
            activity.http2.store(true, Relaxed);
            let connection = self.http2.serve_connection(TokioIo::new(stream), service);
            self.drive(connection, &activity, true).await
        } else {
            let connection = self.http1.serve_connection(TokioIo::new(stream), service);
            self.drive(connection, &activity, false).await
        }
    }

    /// Runs `connection` under the watchdog until it ends, is too slow or idle, or the server
    /// stops (gracefully: the request in progress finishes).
    async fn drive<C: GracefulConnection>(self, connection: C, activity: &Activity, goaway: bool) {
        let first = wake_at(activity.deadline(&self.limits), &self.limits);
        let mut stopping = self.stopping.clone();
        Watchdog {
            connection,
            timer: tokio::time::sleep_until(first),
            stop: Box::pin(async move { stopping.changed().await.is_ok() }),
            stopping: self.stopping,
            draining: false,
            goaway,
            closing: None,
            registered: None,
            activity,
            limits: &self.limits,
            peer: self.peer,
        }
        .await
    }
}

/// When the watchdog looks next at a connection due at `due` ([`Activity::deadline`]): then, or,
/// while a request is being handled, one idle timeout from now.
fn wake_at(due: Option<Instant>, limits: &HttpLimits) -> Instant {
    due.unwrap_or_else(|| Instant::now() + limits.idle_timeout)
}

pin_project_lite::pin_project! {
    /// A connection under its watchdog timer and the server's stop signal. Each wake of the
    /// connection's task (one or more per request) polls the connection; the timer and the stop
    /// signal are polled only when they may have fired, or to register the task's waker with
    /// them: once registered, they wake the task themselves. Polling them on every wake, as a
    /// `select!` does, re-registers the waker each time, which costs a request more than the
    /// watchdog's own bookkeeping (BENCHMARKS.md, "Thirteenth sitting").
    struct Watchdog<'a, C> {
        #[pin]
        connection: C,
        #[pin]
        timer: tokio::time::Sleep,
        // Resolves when the server stops (`true`) or its stop signal is gone (`false`).
        stop: Pin<Box<dyn Future<Output = bool> + Send>>,
        // Read, without registering, for whether `stop` may be ready.
        stopping: watch::Receiver<bool>,
        draining: bool,
        // HTTP/2: a connection due to close is first told so (GOAWAY), then given `CLOSE_GRACE`.
        goaway: bool,
        // Told to close: when it is closed whatever it still serves.
        closing: Option<Instant>,
        // The waker `timer` and `stop` were last polled with.
        registered: Option<Waker>,
        activity: &'a Activity,
        limits: &'a HttpLimits,
        peer: SocketAddr,
    }
}

impl<C: GracefulConnection> Future for Watchdog<'_, C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            if this.connection.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            let registered = this
                .registered
                .as_ref()
                .is_some_and(|waker| waker.will_wake(cx.waker()));
            let stop_may_be_ready =
                !registered || !matches!(this.stopping.has_changed(), Ok(false));
            // Unconstrained: a poll refused for lack of the task's cooperative budget would
            // register nothing, and the next wake would take the waker for registered.
            if !*this.draining && stop_may_be_ready {
                if let Poll::Ready(stopped) =
                    Pin::new(&mut unconstrained(this.stop.as_mut())).poll(cx)
                {
                    *this.draining = true;
                    // Already closing (HTTP/2): told so, and looked at every `CLOSE_GRACE`.
                    if stopped && this.closing.is_none() {
                        this.connection.as_mut().graceful_shutdown();
                        if *this.goaway {
                            // HTTP/2 closes an idle connection only once the peer answers the
                            // GOAWAY's ping, which one that stopped reading never does: the
                            // GOAWAY is sent, so it is closed once nothing is in flight.
                            let now = Instant::now();
                            *this.closing = Some(now + this.limits.shutdown_timeout);
                            this.timer.as_mut().reset(now + CLOSE_GRACE);
                            *this.registered = None;
                        }
                    }
                    if stopped {
                        continue;
                    }
                }
            }
            let timer_may_be_ready = !registered || this.timer.is_elapsed();
            if timer_may_be_ready
                && Pin::new(&mut unconstrained(this.timer.as_mut()))
                    .poll(cx)
                    .is_ready()
            {
                if let Some(until) = *this.closing {
                    let now = Instant::now();
                    if until <= now || this.activity.settled(this.limits) {
                        return Poll::Ready(());
                    }
                    this.timer.as_mut().reset(now + CLOSE_GRACE);
                    *this.registered = None;
                    continue;
                }
                let due = this.activity.deadline(this.limits);
                if due.is_some_and(|due| due <= Instant::now()) {
                    tracing::debug!(client.peer = %this.peer, "closing a connection that is too slow or idle");
                    if !*this.goaway {
                        return Poll::Ready(());
                    }
                    // A GOAWAY tells the client not to send more on this connection: a request
                    // it sends meanwhile would otherwise be lost with the connection, unanswered.
                    let now = Instant::now();
                    *this.closing = Some(now + this.limits.body_timeout);
                    this.connection.as_mut().graceful_shutdown();
                    this.timer.as_mut().reset(now + CLOSE_GRACE);
                    *this.registered = None;
                    continue;
                }
                this.timer.as_mut().reset(wake_at(due, this.limits));
                // To register the new deadline.
                *this.registered = None;
                continue;
            }
            if !registered {
                *this.registered = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
    }
}

const UNSET: u64 = u64::MAX;

/// When a connection last made progress, in milliseconds since it was accepted. One task drives
/// a connection, so relaxed atomics suffice (they only make the state shareable with the service).
struct Activity {
    /// The coarse clock's [`reading`](crate::coarse_clock::reading) at accept.
    accepted: Duration,
    last_io: AtomicU64,
    /// When the request head being read started; `UNSET` between requests.
    head_started: AtomicU64,
    /// Requests whose handler runs: no deadline meanwhile (their bodies have their own).
    in_flight: AtomicU32,
    /// Responses being streamed ([`StreamedBody`]): the connection lives while bytes move.
    streaming: AtomicU32,
    /// HTTP/2, where TCP bytes are not progress (set once ALPN chose it): between requests the
    /// peer sends window updates, settings acknowledgements and pings, and the server a GOAWAY
    /// and pings. Requests and response bodies are counted instead, every body as streamed.
    http2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            accepted: crate::coarse_clock::reading(),
            last_io: AtomicU64::new(0),
            // The first request's head is due from accept.
            head_started: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            streaming: AtomicU32::new(0),
            http2: AtomicBool::new(false),
        }
    }

    /// Read three times a request: the coarse clock (milliseconds against deadlines of seconds).
    fn now(&self) -> u64 {
        let reading = crate::coarse_clock::reading();
        reading.saturating_sub(self.accepted).as_millis() as u64
    }

    fn read_some(&self) {
        if self.http2.load(Relaxed) {
            return;
        }
        let now = self.now();
        self.last_io.store(now, Relaxed);
        if self.in_flight.load(Relaxed) == 0
            && self.streaming.load(Relaxed) == 0
            && self.head_started.load(Relaxed) == UNSET
        {
            self.head_started.store(now, Relaxed);
        }
    }

    fn wrote_some(&self) {
        if !self.http2.load(Relaxed) {
            self.progressed();
        }
    }

    fn progressed(&self) {
        self.last_io.store(self.now(), Relaxed);
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.head_started.store(UNSET, Relaxed);
    }

    fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.last_io.store(self.now(), Relaxed);
    }

    /// Whether a connection told to close (GOAWAY) may be closed now: no handler runs, and no
    /// response body still moves (one stalled past the idle timeout does not count).
    fn settled(&self, limits: &HttpLimits) -> bool {
        self.deadline(limits)
            .is_some_and(|due| self.streaming.load(Relaxed) == 0 || due <= Instant::now())
    }

    /// When the connection is due to be closed; `None` while a request is being handled (its body
    /// has its own deadline).
    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        let at = |ms: u64, limit: Duration| {
            let reading = self.accepted + Duration::from_millis(ms);
            Instant::from_std(crate::coarse_clock::instant_at(reading)) + limit
        };
        let started = self.head_started.load(Relaxed);
        Some(if started == UNSET || self.streaming.load(Relaxed) > 0 {
            at(self.last_io.load(Relaxed), limits.idle_timeout)
        } else {
            at(started, limits.header_read_timeout)
        })
    }
}

/// A request whose handler runs, counted in [`Activity::in_flight`] until dropped.
struct Handling(Arc<Activity>);

impl Handling {
    /// The handler's answer; a streamed body (no known length: the revocation stream; on HTTP/2
    /// any body) is counted in [`Activity::streaming`] until it ends or is dropped.
    fn into_response(self, response: axum::response::Response) -> axum::response::Response {
        let body = response.body();
        let http2 = self.0.http2.load(Relaxed);
        if body.is_end_stream() || (!http2 && body.size_hint().exact().is_some()) {
            return response;
        }
        // Counted before the handler's count is released, so the connection never looks idle
        // in between.
        self.0.streaming.fetch_add(1, Relaxed);
        let streaming = Streaming(self.0.clone());
        response.map(|body| axum::body::Body::new(StreamedBody { body, streaming }))
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A streamed response, counted in [`Activity::streaming`] until dropped.
struct Streaming(Arc<Activity>);

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Relaxed);
        self.0.progressed();
    }
}

struct StreamedBody {
    body: axum::body::Body,
    streaming: Streaming,
}

impl Body for StreamedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        // HTTP/2 asks for a frame once the client's window has room: it read the previous ones.
        // (On HTTP/1.1 the TCP writes count.)
        let activity = &self.streaming.0;
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && activity.http2.load(Relaxed) {
            activity.progressed();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The TCP stream, recording progress in [`Activity`].
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote_some();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote_some();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body that must be complete by a deadline set when the request started: a client
/// trickling a body byte by byte cannot hold a connection (tower-http's body timeout restarts on
/// every frame, so it would).
pub(crate) struct DeadlineBody {
    body: Incoming,
    deadline: Instant,
    /// Armed on the first wait only: a body is most often here with its head (and a request
    /// without one gets no `DeadlineBody`).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl DeadlineBody {
    fn new(body: Incoming, timeout: Duration) -> Self {
        Self {
            body,
            // Seconds away: the coarse clock will do.
            deadline: Instant::from_std(crate::coarse_clock::now()) + timeout,
            timer: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl Body for DeadlineBody {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimedOut.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
