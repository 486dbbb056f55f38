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
    /// Absent, the change is taken for one that is not final.
    #[serde(default)]
    action: String,
    credential_id: String,
}

#[derive(Deserialize)]
struct Position {
    seq: u64,
    heartbeat_seconds: u64,
    /// The chain's newest seq when the stream opened; servers before it sent none.
    head: Option<u64>,
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
    let resumed = last_id.is_some();
    let mut reader = SseReader::default();
    // Until `ready` says otherwise, silence past `max_staleness` means a dead connection.
    let mut silence = inner.config.max_staleness;
    // Contact counts only once this connection is up to date: a resumed `ready` comes before the
    // missed events, and a stream that keeps ending there would otherwise look fresh forever.
    // `None`: no `ready` yet; then the seq to reach, `u64::MAX` meaning a heartbeat alone will do.
    let mut catch_up_to: Option<u64> = None;
    let mut caught_up = false;
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
                // A heartbeat: sent right after the server read the head, with every event up to
                // it sent before: alive and up to date.
                if catch_up_to.is_some() {
                    caught_up = true;
                    inner.heard_from_stream();
                }
                continue;
            };
            match event.event.as_str() {
                "ready" | "reset" => {
                    if event.event == "reset" {
                        // The events since our last id are gone: nothing cached can be trusted.
                        inner.reset();
                        inner.counters.stream_resets.fetch_add(1, Relaxed);
                    }
                    let position = serde_json::from_str::<Position>(&event.data).ok();
                    if let Some(position) = &position {
                        // Two heartbeats missed: take the connection for dead.
                        silence = silence.min(Duration::from_secs(
                            position.heartbeat_seconds.saturating_mul(2).max(1),
                        ));
                    }
                    catch_up_to = Some(match position {
                        Some(Position {
                            head: Some(head), ..
                        }) => head,
                        // A server without `head` starts a new stream or a reset at its head; a
                        // resumed one may be behind it, and only a heartbeat tells.
                        Some(Position { seq, .. }) if !resumed || event.event == "reset" => seq,
                        _ => u64::MAX,
                    });
                    inner.counters.stream_connected.store(true, Relaxed);
                }
                "revocation" => {
                    let Ok(revocation) = serde_json::from_str::<Revocation>(&event.data) else {
                        return Err("an unreadable revocation event".into());
                    };
                    inner.apply(&revocation.action, &revocation.credential_id);
                    inner.counters.stream_events.fetch_add(1, Relaxed);
                }
                _ => {}
            }
            if let Some(id) = event.id {
                if let Ok(seq) = id.parse::<u64>() {
                    inner.counters.last_event_id.store(seq, Relaxed);
                    caught_up |= catch_up_to.is_some_and(|head| seq >= head);
                }
                *last_id = Some(id);
            }
            // Once caught up, every event is news: a steady flow of them keeps the verifier
            // fresh though the server sends no heartbeat between them.
            if caught_up {
                inner.heard_from_stream();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::{
        api_token, fake_verifier, position, revocation, until, FakeKeyplane, StreamConn, HEARTBEAT,
    };
    use crate::{StalePolicy, VerifyError};
    use std::time::{Duration, Instant};

    const MAX_STALENESS: Duration = Duration::from_millis(700);

    /// The first connection is up to date (its `ready` is at the head) and ends; every resumed
    /// one runs `resumed` with the client's `Last-Event-ID`.
    fn first_then(
        resumed: impl Fn(&mut StreamConn, u64) + Send + Sync + 'static,
    ) -> impl Fn(&mut StreamConn) + Send + Sync {
        move |conn| match conn.last_event_id {
            None => {
                conn.send(&position("ready", 5, Some(5)));
            }
            Some(from) => resumed(conn, from),
        }
    }

    /// Sends each block `every` apart, for `for_how_long` at most; stops when the client is gone.
    fn send_for(
        conn: &mut StreamConn,
        every: Duration,
        for_how_long: Duration,
        block: impl Fn(u64) -> String,
    ) {
        let started = Instant::now();
        for n in 0.. {
            if started.elapsed() > for_how_long || !conn.send(&block(n)) {
                return;
            }
            std::thread::sleep(every);
        }
    }

    /// Not stale at any moment of `span`.
    async fn stays_fresh(verifier: &crate::Verifier, span: Duration) {
        let started = Instant::now();
        while started.elapsed() < span {
            assert!(!verifier.is_stale(), "{:?}", verifier.metrics());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's store fails right after each resumed `ready`: the stream ends before the
    /// missed events come, the client reconnects, is told `ready` again, and so on. Those
    /// `ready`s say nothing of the missed revocations: the verifier must turn stale.
    #[tokio::test]
    async fn resumed_readys_that_never_catch_up_leave_the_verifier_stale() {
        // The head is ahead of the client; event 7 comes, but 9 never does.
        let fake = FakeKeyplane::start(
            first_then(|conn, from| {
                conn.send(&position("ready", from, Some(9)));
                if from < 7 {
                    conn.send(&revocation(7, "api_token.rotated", "A"));
                }
            }),
            || r#"{"active":false}"#.into(),
        );
        let verifier = fake_verifier(&fake, MAX_STALENESS, StalePolicy::FailClosed);
        until(
            "fresh after the first, current, ready",
            Duration::from_secs(5),
            || !verifier.is_stale(),
        )
        .await;
        until("stale while readys keep coming", MAX_STALENESS * 4, || {
            verifier.is_stale()
        })
        .await;
        let connects = verifier.metrics().stream_connects;
        tokio::time::sleep(MAX_STALENESS).await;
        let metrics = verifier.metrics();
        assert!(metrics.stale, "{metrics:?}");
        assert!(
            metrics.stream_connects >= connects + 3,
            "it kept reconnecting: {metrics:?}"
        );
        assert_eq!(metrics.last_event_id, 7, "{metrics:?}");
        // The policy applies.
        assert_eq!(verifier.verify(&api_token()).await, Err(VerifyError::Stale));
        assert_eq!(verifier.metrics().stale_refusals, 1);
    }

    /// A server from before `head`: its new stream starts at the head, but a resumed `ready`
    /// says nothing of how far behind it is; only a heartbeat does.
    #[tokio::test]
    async fn without_head_a_resumed_ready_waits_for_a_heartbeat() {
        let fake = FakeKeyplane::start(
            move |conn: &mut StreamConn| match conn.last_event_id {
                None => {
                    conn.send(&position("ready", 5, None));
                }
                Some(from) => {
                    conn.send(&position("ready", from, None));
                    conn.send(&revocation(from + 1, "api_token.rotated", "A"));
                }
            },
            || r#"{"active":false}"#.into(),
        );
        let verifier = fake_verifier(&fake, MAX_STALENESS, StalePolicy::FailClosed);
        until(
            "fresh after a new stream's ready",
            Duration::from_secs(5),
            || !verifier.is_stale(),
        )
        .await;
        until("stale on resumed readys alone", MAX_STALENESS * 4, || {
            verifier.is_stale()
        })
        .await;
    }

    /// Events that replay the past while the head is not reached yet are no sign of being up to
    /// date either, however many come.
    #[tokio::test]
    async fn replayed_events_short_of_the_head_do_not_make_it_fresh() {
        let fake = FakeKeyplane::start(
            first_then(|conn, from| {
                conn.send(&position("ready", from, Some(1_000)));
                send_for(
                    conn,
                    Duration::from_millis(50),
                    Duration::from_secs(30),
                    |n| revocation(from + 1 + n, "api_token.rotated", "A"),
                );
            }),
            || r#"{"active":false}"#.into(),
        );
        let verifier = fake_verifier(&fake, MAX_STALENESS, StalePolicy::FailClosed);
        until(
            "fresh after the first ready",
            Duration::from_secs(5),
            || !verifier.is_stale(),
        )
        .await;
        until(
            "stale while old events keep coming",
            MAX_STALENESS * 4,
            || verifier.is_stale(),
        )
        .await;
        let metrics = verifier.metrics();
        assert!(
            metrics.stream_connected && metrics.stream_events > 5,
            "{metrics:?}"
        );
    }

    /// Once a resumed stream has delivered the events up to the head its `ready` named, it is
    /// up to date; then a steady flow of events, with no heartbeat between them, keeps it so.
    #[tokio::test]
    async fn a_caught_up_stream_keeps_the_verifier_fresh_with_events_alone() {
        let fake = FakeKeyplane::start(
            first_then(|conn, from| {
                conn.send(&position("ready", from, Some(9)));
                conn.send(&revocation(7, "api_token.rotated", "A"));
                conn.send(&revocation(9, "api_token.rotated", "B"));
                send_for(
                    conn,
                    Duration::from_millis(150),
                    Duration::from_secs(30),
                    |n| revocation(10 + n, "api_token.rotated", "C"),
                );
            }),
            || r#"{"active":false}"#.into(),
        );
        let verifier = fake_verifier(&fake, MAX_STALENESS, StalePolicy::FailClosed);
        until("resumed", Duration::from_secs(5), || {
            verifier.metrics().last_event_id >= 9
        })
        .await;
        stays_fresh(&verifier, MAX_STALENESS * 3).await;
        assert_eq!(verifier.metrics().stream_connects, 2);
    }

    /// A heartbeat says the server read the head and sent everything up to it: caught up, even
    /// though the head itself is an event the stream does not carry.
    #[tokio::test]
    async fn a_heartbeat_after_a_resumed_ready_makes_it_fresh() {
        let fake = FakeKeyplane::start(
            first_then(|conn, from| {
                conn.send(&position("ready", from, Some(9)));
                conn.send(&revocation(7, "api_token.rotated", "A"));
                send_for(
                    conn,
                    Duration::from_millis(200),
                    Duration::from_secs(30),
                    |_| HEARTBEAT.into(),
                );
            }),
            || r#"{"active":false}"#.into(),
        );
        let verifier = fake_verifier(&fake, MAX_STALENESS, StalePolicy::FailClosed);
        until("resumed", Duration::from_secs(5), || {
            verifier.metrics().last_event_id >= 7
        })
        .await;
        stays_fresh(&verifier, MAX_STALENESS * 3).await;
        assert_eq!(verifier.metrics().stream_connects, 2);
    }
}
