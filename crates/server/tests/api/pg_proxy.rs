//! A TCP proxy on 127.0.0.1 in front of the test PostgreSQL, so a test can take the database away
//! from one server without touching the shared PostgreSQL: refuse every connection (an outage),
//! freeze the connections that issued `LISTEN` (bytes stop flowing, nothing closes: a frozen
//! backend or a dropped network path, as a listener sees it) or all the others (a saturated
//! pool, as the listener's heartbeat sees it), or close the listeners and refuse new connections
//! while the pooled ones work (PostgreSQL at its connection limit after a listener's loss), or
//! freeze a connection in the middle of a query that sends given bytes (a primary gone silently
//! while the connection was in use).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    /// Connections that sent `LISTEN` stop forwarding in both directions, without closing.
    FreezeListeners,
    /// Connections that did not send `LISTEN` (new ones too) stop forwarding, without closing.
    FreezeOthers,
    /// Connections that sent `LISTEN` are closed, and new ones are closed as soon as they are
    /// accepted; the others keep forwarding.
    DropListeners,
    /// Every connection is closed, and new ones are closed as soon as they are accepted.
    Refuse,
    /// Connections that send these bytes (a bound parameter: a hash, an id) stop forwarding in
    /// both directions, without closing, from that message on; the others keep forwarding.
    FreezeSending(&'static [u8]),
}

/// What `mode` does to a connection that has (`listener`) or has not sent `LISTEN`, and has or
/// has not sent the bytes of a [`Mode::FreezeSending`] (`sent`).
#[derive(PartialEq, Eq)]
enum Action {
    Forward,
    Hold,
    Close,
}

fn action(mode: Mode, listener: bool, sent: &[&'static [u8]]) -> Action {
    match (mode, listener) {
        (Mode::FreezeSending(bytes), _) if sent.contains(&bytes) => Action::Hold,
        (Mode::FreezeSending(_), _) => Action::Forward,
        (Mode::Forward, _) | (Mode::FreezeListeners, false) | (Mode::FreezeOthers, true) => {
            Action::Forward
        }
        (Mode::DropListeners, false) => Action::Forward,
        (Mode::FreezeListeners, true) | (Mode::FreezeOthers, false) => Action::Hold,
        (Mode::DropListeners, true) | (Mode::Refuse, _) => Action::Close,
    }
}

pub struct PgProxy {
    /// `url` with its host and port replaced by the proxy's.
    pub url: String,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl PgProxy {
    /// A proxy in front of the PostgreSQL server `url` names (a `postgres://user@host:port/db`).
    pub async fn start(url: &str) -> Self {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let (user, rest) = rest.split_once('@').expect("user@host in the URL");
        let (authority, path) = rest.split_once('/').expect("a database in the URL");
        let upstream = authority.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let (mode, watcher) = watch::channel(Mode::Forward);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if matches!(*watcher.borrow(), Mode::Refuse | Mode::DropListeners) {
                    drop(client);
                    continue;
                }
                let (upstream, watcher) = (upstream.clone(), watcher.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        relay(client, server, watcher).await;
                    }
                });
            }
        });
        Self {
            url: format!("{scheme}://{user}@{local}/{path}"),
            mode,
            task,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The [`Mode::FreezeSending`] bytes a connection has sent.
type SentBytes = Arc<Mutex<Vec<&'static [u8]>>>;

async fn relay(client: TcpStream, server: TcpStream, mode: watch::Receiver<Mode>) {
    let is_listener = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let upstream = pump(
        client_read,
        server_write,
        mode.clone(),
        (is_listener.clone(), sent.clone()),
        true,
    );
    let downstream = pump(server_read, client_write, mode, (is_listener, sent), false);
    // Either side ending (or a refusal) ends both: dropping the halves closes the sockets.
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<Mode>,
    (is_listener, sent): (Arc<AtomicBool>, SentBytes),
    from_client: bool,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let listening = || is_listener.load(Ordering::Acquire);
    let act = |m: &Mode| action(*m, listening(), &sent.lock().unwrap());
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = mode.wait_for(|m| act(m) == Action::Close) => return,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if from_client && buffer[..n].windows(7).any(|w| w == b"LISTEN ") {
            is_listener.store(true, Ordering::Release);
        }
        if let Mode::FreezeSending(bytes) = *mode.borrow() {
            if from_client && buffer[..n].windows(bytes.len()).any(|w| w == bytes) {
                sent.lock().unwrap().push(bytes);
            }
        }
        // A frozen connection holds what it read and forwards nothing, until unfrozen or closed.
        let resumed = mode
            .wait_for(|m| act(m) != Action::Hold)
            .await
            .map(|m| act(&m));
        if resumed.ok() != Some(Action::Forward) {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
