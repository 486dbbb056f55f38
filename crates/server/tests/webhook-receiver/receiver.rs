//! The test webhook receiver (`receiver.mjs`, verifying with the `standardwebhooks` package from
//! npm) as the tests drive it: installed with `npm ci` on first use, started on 127.0.0.1, its
//! deliveries collected. Shared by the server's API tests and the binary's tests (`#[path]`). A
//! machine without node or npm fails these tests rather than skipping them.

// Each test binary that includes this uses only part of it.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn receiver_dir() -> PathBuf {
    // Both test crates sit beside each other under `crates/`.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../server/tests/webhook-receiver")
        .canonicalize()
        .expect("crates/server/tests/webhook-receiver exists")
}

/// Runs `command` to completion within `limit`; why it failed, if it did.
fn run_bounded(command: &mut Command, limit: Duration) -> Result<(), String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let mut stderr = child.stderr.take().expect("piped stderr");
    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {limit:?}"));
            }
        }
    };
    let stderr = drain.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(format!("{status}: {stderr}"))
    }
}

fn install() -> Result<(), String> {
    for tool in ["node", "npm"] {
        run_bounded(Command::new(tool).arg("--version"), Duration::from_secs(30)).map_err(|e| {
            format!(
                "the webhook tests run a receiver on Node.js, and `{tool} --version` failed \
                 ({e}); install Node.js 20 or later with npm"
            )
        })?;
    }
    let dir = receiver_dir();
    if dir
        .join("node_modules/standardwebhooks/package.json")
        .exists()
    {
        return Ok(());
    }
    run_bounded(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir),
        Duration::from_secs(300),
    )
    .map_err(|e| {
        format!(
            "`npm ci` in {} failed ({e}); the webhook tests need the npm registry once",
            dir.display()
        )
    })
}

/// Node.js and the receiver's pinned package, checked and installed once per test binary.
pub fn node_ready() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(problem) = READY.get_or_init(install) {
        panic!("{problem}");
    }
}

/// How a receiver answers.
#[derive(Clone)]
pub struct Behaviour {
    /// The `whsec_...` secrets it verifies each delivery with.
    pub secrets: Vec<String>,
    /// Answered to a delivery that verifies.
    pub status: u16,
    pub delay: Duration,
    /// Certificate and key PEM files: serve https with them.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Behaviour {
    pub fn verifying<S: AsRef<str>>(secrets: &[S]) -> Self {
        Self {
            secrets: secrets.iter().map(|s| s.as_ref().to_string()).collect(),
            status: 204,
            delay: Duration::ZERO,
            tls: None,
        }
    }
}

/// A running `receiver.mjs`. Killed on drop. Its deliveries are kept in `received`, which a
/// restart (on the same port) keeps adding to.
pub struct Receiver {
    child: Option<Child>,
    pub port: u16,
    /// Every request, as `receiver.mjs` printed it.
    pub received: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    /// Starts a receiver on `port` (0: any free one).
    pub fn start(behaviour: &Behaviour, port: u16) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let (child, port) = spawn(behaviour, port, &received);
        Self {
            child: Some(child),
            port,
            received,
        }
    }

    /// Down: connections to its port are refused until [`Receiver::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Up again on the same port, answering as `behaviour` says.
    pub fn restart(&mut self, behaviour: &Behaviour) {
        self.stop();
        let (child, _) = spawn(behaviour, self.port, &self.received);
        self.child = Some(child);
    }

    /// Everything received so far.
    pub fn deliveries(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(behaviour: &Behaviour, port: u16, received: &Arc<Mutex<Vec<Value>>>) -> (Child, u16) {
    node_ready();
    let mut command = Command::new("node");
    if let Some((cert, key)) = &behaviour.tls {
        command.env("TLS_CERT", cert).env("TLS_KEY", key);
    }
    let mut child = command
        .arg("receiver.mjs")
        .current_dir(receiver_dir())
        .env("PORT", port.to_string())
        .env("SECRETS", behaviour.secrets.join(","))
        .env("STATUS", behaviour.status.to_string())
        .env("DELAY_MS", behaviour.delay.as_millis().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node receiver.mjs");
    let (ready, listening) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let log = received.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(port) = line.strip_prefix("listening on ") {
                let _ = ready.send(Ok(port.trim().parse::<u16>().expect("a port")));
            } else if let Some(json) = line.strip_prefix("received ") {
                let value: Value = serde_json::from_str(json).expect("receiver prints JSON");
                log.lock().unwrap().push(value);
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    match listening.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok::<u16, String>(port)) => (child, port),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "receiver.mjs did not start: {}",
                errors.join().unwrap_or_default()
            );
        }
    }
}
