//! Following keyplane's revocation stream: connect, apply each event to the cache, note every
//! sign of life, and reconnect with `Last-Event-ID` when the connection ends or goes silent.

use crate::sse::{Block, SseReader};
use crate::Inner;
use serde::Deserialize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Deserialize)]
struct Revocation {
    credential_id: String,
}

#[derive(Deserialize)]
struct Position {
    heartbeat_seconds: u64,
}

/// How long to wait before reconnecting: short at first (a replica restarting), then at most a
/// second, well under any sensible `max_staleness`.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100 * u64::from(failures.min(10)))
}

/// Runs until `stop` turns true or the verifier is dropped.
pub(crate) async fn follow(inner: Weak<Inner>, url: String, mut stop: watch::Receiver<bool>) {
    let mut last_id: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let Some(verifier) = inner.upgrade() else {
            return;
        };
        tokio::select! {
            outcome = session(&verifier, &url, &mut last_id) => {
                verifier.counters.stream_connected.store(false, Relaxed);
                match outcome {
                    Ok(()) => failures = 1,
                    Err(reason) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(reason, "keyplane revocation stream interrupted; reconnecting");
                    }
                }
                verifier.counters.stream_disconnects.fetch_add(1, Relaxed);
            }
            _ = stop.wait_for(|stop| *stop) => return,
        }
        drop(verifier);
        tokio::select! {
            () = tokio::time::sleep(backoff(failures)) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// One connection, until it ends (`Ok`) or fails.
async fn session(inner: &Inner, url: &str, last_id: &mut Option<String>) -> Result<(), String> {
    let mut request = inner
        .http
        .get(url)
        .bearer_auth(&inner.config.verify_token)
        .header("accept", "text/event-stream");
    if let Some(id) = last_id.as_deref() {
        request = request.header("last-event-id", id);
    }
    let connect = tokio::time::timeout(inner.config.request_timeout, request.send()).await;
    let mut response = match connect {
        Ok(Ok(response)) if response.status().is_success() => response,
        Ok(Ok(response)) => return Err(format!("the stream answered {}", response.status())),
        Ok(Err(e)) => return Err(format!("cannot connect: {}", e.without_url())),
        Err(_) => return Err("cannot connect: timed out".into()),
    };
    inner.counters.stream_connects.fetch_add(1, Relaxed);
    let mut reader = SseReader::default();
    // Until `ready` says otherwise, silence past `max_staleness` means a dead connection.
    let mut silence = inner.config.max_staleness;
    loop {
        let chunk = match tokio::time::timeout(silence, response.chunk()).await {
            Err(_) => return Err("the stream went silent".into()),
            Ok(Err(e)) => return Err(format!("read failed: {}", e.without_url())),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(chunk))) => chunk,
        };
        let blocks = reader
            .push(&chunk)
            .map_err(|()| "an oversized event".to_string())?;
        for block in blocks {
            let Block::Event(event) = block else {
                // A heartbeat: the stream is alive and up to date.
                if inner.counters.stream_connected.load(Relaxed) {
                    inner.heard_from_stream();
                }
                continue;
            };
            match event.event.as_str() {
                "ready" | "reset" => {
                    if event.event == "reset" {
                        // The events since our last id are gone: nothing cached can be trusted.
                        inner.invalidate_all();
                        inner.counters.stream_resets.fetch_add(1, Relaxed);
                    }
                    if let Ok(position) = serde_json::from_str::<Position>(&event.data) {
                        // Two heartbeats missed: take the connection for dead.
                        silence = silence.min(Duration::from_secs(
                            position.heartbeat_seconds.saturating_mul(2).max(1),
                        ));
                    }
                    inner.counters.stream_connected.store(true, Relaxed);
                }
                "revocation" => {
                    let Ok(revocation) = serde_json::from_str::<Revocation>(&event.data) else {
                        return Err("an unreadable revocation event".into());
                    };
                    inner.invalidate(&revocation.credential_id);
                    inner.counters.stream_events.fetch_add(1, Relaxed);
                }
                _ => {}
            }
            if let Some(id) = event.id {
                if let Ok(seq) = id.parse::<u64>() {
                    inner.counters.last_event_id.store(seq, Relaxed);
                }
                *last_id = Some(id);
            }
            if inner.counters.stream_connected.load(Relaxed) {
                inner.heard_from_stream();
            }
        }
    }
}
