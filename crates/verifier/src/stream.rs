//! Following keyplane's revocation stream: connect, apply each event to the cache, note every
//! sign of life, and reconnect with `Last-Event-ID` when the connection ends or goes silent.

use crate::sse::{Block, SseReader};
use crate::{lock, Inner, StreamError};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
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

/// The first reconnection's delay; each failure in a row doubles it, up to [`max_backoff`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between two attempts, and the longest `Retry-After` believed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The longest wait between two attempts: half of `max_staleness`, within [`FIRST_BACKOFF`] and
/// [`MAX_BACKOFF`]. Staleness is measured from the stream's last contact whatever the attempts
/// do, so a longer wait would not weaken the contract; it would keep the verifier stale longer
/// after keyplane is back.
fn max_backoff(max_staleness: Duration) -> Duration {
    (max_staleness / 2).clamp(FIRST_BACKOFF, MAX_BACKOFF)
}

/// The wait before the next attempt after `failures` in a row (at least 1): [`FIRST_BACKOFF`]
/// doubled per failure up to `cap`, of which a random half or more, so that verifiers cut off
/// together do not come back in step; and never less than keyplane's `Retry-After` (up to
/// [`MAX_BACKOFF`]).
fn delay(failures: u32, cap: Duration, retry_after: Option<Duration>) -> Duration {
    let full = FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(20))
        .min(cap);
    let jittered = full / 2 + (full / 2).mul_f64(rand::random::<f64>());
    jittered.max(retry_after.unwrap_or_default().min(MAX_BACKOFF))
}

/// Why a connection attempt ended.
struct Ended {
    error: StreamError,
    /// keyplane asked for this long before the next attempt.
    retry_after: Option<Duration>,
}

impl Ended {
    fn new(status: Option<u16>, reason: String) -> Self {
        Self {
            error: StreamError { status, reason },
            retry_after: None,
        }
    }

    /// keyplane (or what answers at its address) answered `response` instead of a stream.
    fn refused(response: &reqwest::Response) -> Self {
        let status = response.status();
        let reason = match status.as_u16() {
            401 | 403 => format!(
                "keyplane refused the stream ({status}): the verify token must be a live \
                 credential of the organization holding `tokens:verify`"
            ),
            429 => format!("keyplane has no stream slot free ({status})"),
            _ => format!("the stream answered {status}"),
        };
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse().ok())
            .map(Duration::from_secs);
        Self {
            retry_after,
            ..Self::new(Some(status.as_u16()), reason)
        }
    }
}

impl From<String> for Ended {
    fn from(reason: String) -> Self {
        Self::new(None, reason)
    }
}

impl From<&str> for Ended {
    fn from(reason: &str) -> Self {
        reason.to_string().into()
    }
}

/// Runs until `stop` turns true or the verifier is dropped.
pub(crate) async fn follow(inner: Weak<Inner>, url: String, mut stop: watch::Receiver<bool>) {
    let mut last_id: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let Some(verifier) = inner.upgrade() else {
            return;
        };
        let mut caught_up = false;
        let ended = tokio::select! {
            ended = session(&verifier, &url, &mut last_id, &mut caught_up) => ended,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        verifier.counters.stream_connected.store(false, Relaxed);
        verifier.counters.stream_disconnects.fetch_add(1, Relaxed);
        if ended.error.status == Some(400) {
            if let Some(refused) = last_id.take() {
                // Each refusal shortens the id (`<seq>-<tag>`, then `<seq>`, then none), so these
                // immediate retries end; a 400 without an id is an ordinary failure below.
                last_id = fall_back(&verifier, refused);
                *lock(&verifier.last_stream_error) = Some(ended.error);
                continue;
            }
        }
        // A connection that was up to date worked: only the failures since count.
        if caught_up {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let cap = max_backoff(verifier.config.max_staleness);
        let wait = delay(failures, cap, ended.retry_after);
        tracing::warn!(
            status = ?ended.error.status,
            reason = %ended.error.reason,
            retry_in = ?wait,
            "keyplane revocation stream interrupted; reconnecting"
        );
        *lock(&verifier.last_stream_error) = Some(ended.error);
        drop(verifier);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// keyplane answered 400 to the stream resumed after `refused`: the id to resume with instead.
///
/// A keyplane from before hashed ids (`?ids=seq_hash`, which it ignores) reads `Last-Event-ID` as
/// a whole number only, and refuses the `<seq>-<tag>` that a newer replica gave us (a rollback, a
/// canary among older replicas): resume from the bare seq, which it understands, as it and every
/// keyplane did before the tags. Its ids are bare seqs, so we go on sending those until a newer
/// replica sends tagged ids again. A bare seq cannot tell the events we saw from another
/// history's (a restore, a failover) and any 400 (a proxy's too) brings us here, so every cached
/// answer is dropped, as a `reset` does. A bare seq refused too cannot be resumed from: start
/// afresh, the cache dropped likewise.
fn fall_back(inner: &Inner, refused: String) -> Option<String> {
    inner.counters.stream_ids_refused.fetch_add(1, Relaxed);
    inner.reset();
    inner.counters.stream_resets.fetch_add(1, Relaxed);
    let bare_seq = refused
        .split_once('-')
        .map(|(seq, _)| seq)
        .filter(|seq| seq.parse::<u64>().is_ok());
    let Some(seq) = bare_seq else {
        tracing::warn!(
            last_event_id = %refused,
            "keyplane refused the revocation stream's Last-Event-ID (400); starting afresh and \
             dropping every cached answer"
        );
        return None;
    };
    tracing::warn!(
        last_event_id = %refused,
        resume_from = seq,
        "keyplane refused the revocation stream's tagged Last-Event-ID (400: a keyplane from \
         before `?ids=seq_hash`?); resuming from the bare seq and dropping every cached answer"
    );
    Some(seq.to_string())
}

/// One connection, until it ends; `caught_up` turns true once it is up to date.
async fn session(
    inner: &Inner,
    url: &str,
    last_id: &mut Option<String>,
    caught_up: &mut bool,
) -> Ended {
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
        Ok(Ok(response)) => return Ended::refused(&response),
        Ok(Err(e)) => return format!("cannot connect: {}", e.without_url()).into(),
        Err(_) => return "cannot connect: timed out".into(),
    };
    // Anything else (a proxy's sign-in page, another service at `base_url`) is no stream.
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("text/event-stream") {
        let shown: String = content_type.chars().take(64).collect();
        return Ended::new(
            Some(response.status().as_u16()),
            format!(
                "the stream answered {} with content type {shown:?}, not text/event-stream \
                 (is keyplane at base_url, with no proxy in between answering?)",
                response.status()
            ),
        );
    }
    inner.counters.stream_connects.fetch_add(1, Relaxed);
    let resumed = last_id.is_some();
    let mut reader = SseReader::default();
    // Until `ready` says otherwise, silence past `max_staleness` means a dead connection.
    let mut silence = inner.config.max_staleness;
    // Contact counts only once this connection is up to date: a resumed `ready` comes before the
    // missed events, and a stream that keeps ending there would otherwise look fresh forever.
    // `None`: no `ready` yet; then the seq to reach, `u64::MAX` meaning a heartbeat alone will do.
    let mut catch_up_to: Option<u64> = None;
    // Up to date: alive, and whatever failed before is over.
    let up_to_date = |caught_up: &mut bool| {
        if !std::mem::replace(caught_up, true) {
            *lock(&inner.last_stream_error) = None;
        }
        inner.heard_from_stream();
    };
    loop {
        let chunk = match tokio::time::timeout(silence, response.chunk()).await {
            Err(_) => return "the stream went silent".into(),
            Ok(Err(e)) => return format!("read failed: {}", e.without_url()).into(),
            Ok(Ok(None)) => return "the stream ended".into(),
            Ok(Ok(Some(chunk))) => chunk,
        };
        let Ok(blocks) = reader.push(&chunk) else {
            return "an oversized event".into();
        };
        for block in blocks {
            let Block::Event(event) = block else {
                // A heartbeat: sent right after the server read the head, with every event up to
                // it sent before: alive and up to date.
                if catch_up_to.is_some() {
                    up_to_date(caught_up);
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
                        let heartbeat = Duration::from_secs(position.heartbeat_seconds);
                        // Two heartbeats missed: take the connection for dead.
                        silence =
                            silence.min(heartbeat.saturating_mul(2).max(Duration::from_secs(1)));
                        let max_staleness = inner.config.max_staleness;
                        if max_staleness < heartbeat.saturating_mul(2)
                            && !inner.warned_of_heartbeat.swap(true, Relaxed)
                        {
                            tracing::warn!(
                                ?max_staleness,
                                ?heartbeat,
                                "max_staleness is under twice keyplane's heartbeat interval: \
                                 one late heartbeat makes the verifier stale"
                            );
                        }
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
                        return "an unreadable revocation event".into();
                    };
                    inner.apply(&revocation.action, &revocation.credential_id);
                    inner.counters.stream_events.fetch_add(1, Relaxed);
                }
                _ => {}
            }
            let mut reached = *caught_up;
            if let Some(id) = event.id {
                // `<seq>` or `<seq>-<tag>`; sent back whole, the tag lets keyplane tell whether
                // its chain still holds the event we saw.
                if let Ok(seq) = id.split('-').next().unwrap_or_default().parse::<u64>() {
                    inner.counters.last_event_id.store(seq, Relaxed);
                    reached |= catch_up_to.is_some_and(|head| seq >= head);
                }
                *last_id = Some(id);
            }
            // Once caught up, every event is news: a steady flow of them keeps the verifier
            // fresh though the server sends no heartbeat between them.
            if reached {
                up_to_date(caught_up);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::{
        active, api_token, fake_config, fake_verifier, hashed, position, revocation, until,
        FakeKeyplane, RawServer, StreamConn, HEARTBEAT,
    };
    use crate::{lock, StalePolicy, Verifier, VerifyError};
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;
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
        until("it keeps reconnecting", MAX_STALENESS * 4, || {
            verifier.metrics().stream_connects >= connects + 3
        })
        .await;
        let metrics = verifier.metrics();
        assert!(metrics.stale, "{metrics:?}");
        assert_eq!(metrics.last_event_id, 7, "{metrics:?}");
        // The policy applies.
        assert!(matches!(
            verifier.verify(&api_token()).await,
            Err(VerifyError::Stale(_))
        ));
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

    /// The verifier asks for ids that name their event's chain hash (`<seq>-<hex>`), takes their
    /// seq for its position (caught up once an event reaches the head its `ready` named), and
    /// resumes with the whole id, so that keyplane can tell a chain that went back and grew past
    /// it again (and answer `reset`).
    #[tokio::test]
    async fn asks_for_hashed_ids_and_resumes_with_the_whole_id() {
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let end_first = Arc::new(AtomicBool::new(false));
        let (recorded, ending) = (requests.clone(), end_first.clone());
        let fake = FakeKeyplane::start(
            move |conn: &mut StreamConn| {
                lock(&recorded).push((conn.target.clone(), conn.sent_last_event_id.clone()));
                match conn.last_event_id {
                    // Behind the head at first; no heartbeat: only the event's id says caught up.
                    None => {
                        conn.send(&hashed(&position("ready", 5, Some(7))));
                        conn.send(&hashed(&revocation(7, "api_token.revoked", "A")));
                        let started = Instant::now();
                        while !ending.load(SeqCst) && started.elapsed() < Duration::from_secs(30) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    Some(from) => {
                        conn.send(&hashed(&position("ready", from, Some(from))));
                    }
                }
            },
            || r#"{"active":false}"#.into(),
        );
        let verifier = fake_verifier(&fake, Duration::from_secs(10), StalePolicy::FailClosed);
        until("caught up", Duration::from_secs(5), || !verifier.is_stale()).await;
        let metrics = verifier.metrics();
        assert_eq!(
            (metrics.last_event_id, metrics.stream_events),
            (7, 1),
            "{metrics:?}"
        );
        end_first.store(true, SeqCst);
        until("resumed", Duration::from_secs(5), || {
            lock(&requests).len() >= 2
        })
        .await;
        let stream = "/v1/revocations/stream?ids=seq_hash".to_string();
        assert_eq!(
            lock(&requests)[..2],
            [
                (stream.clone(), None),
                (stream, Some(format!("7-{:016x}", 7)))
            ]
        );
    }

    /// How a keyplane from before `?ids=seq_hash` answers a `Last-Event-ID` that is not a whole
    /// number.
    fn refused_as_by_an_older_keyplane(conn: &mut StreamConn) {
        conn.answer(&answer(
            "400 Bad Request",
            "content-type: application/json\r\n",
            r#"{"error":"invalid_request","error_description":"Last-Event-ID: must be a whole number (an event id of this stream)"}"#,
        ));
    }

    /// The stream's requests' `Last-Event-ID`s, in order, as a fake's script records them.
    type SentIds = Arc<std::sync::Mutex<Vec<Option<String>>>>;

    /// A rollback, or a newer replica beside older ones: the first connection reaches a keyplane
    /// that sends tagged ids; every later one a keyplane from before them, which ignores `ids`,
    /// sends bare seqs and answers 400 to a `<seq>-<tag>` `Last-Event-ID`. The verifier resumes
    /// from the bare seq at once and never turns stale; it resumes with bare seqs from then on.
    /// Without the tag it cannot tell whether the chain went back, so it drops its cached answers
    /// once (a reset).
    #[tokio::test]
    async fn an_older_keyplane_refusing_a_tagged_id_is_resumed_from_the_bare_seq() {
        let sent: SentIds = Arc::default();
        let recorded = sent.clone();
        let fake = FakeKeyplane::start(
            move |conn: &mut StreamConn| {
                let first = {
                    let mut sent = lock(&recorded);
                    sent.push(conn.sent_last_event_id.clone());
                    sent.len() == 1
                };
                if first {
                    // The newer replica, at its head; then it goes away.
                    conn.send(&hashed(&position("ready", 5, Some(5))));
                    return;
                }
                match conn.sent_last_event_id.as_deref() {
                    Some(id) if id.contains('-') => refused_as_by_an_older_keyplane(conn),
                    _ => {
                        let from = conn.last_event_id.unwrap_or(5);
                        conn.send(&position("ready", from, Some(from + 1)));
                        conn.send(&revocation(from + 1, "api_token.revoked", "B"));
                        // Ends after a while: the next resumption is from the old one's bare id.
                        send_for(
                            conn,
                            Duration::from_millis(100),
                            Duration::from_secs(1),
                            |_| HEARTBEAT.into(),
                        );
                    }
                }
            },
            || active("A"),
        );
        let max_staleness = Duration::from_secs(3);
        let verifier = fake_verifier(&fake, max_staleness, StalePolicy::FailClosed);
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        stays_fresh(&verifier, max_staleness * 2).await;
        assert!(verifier.verify(&api_token()).await.is_ok());
        let sent = lock(&sent).clone();
        assert_eq!(
            sent[..4],
            [
                None,
                Some(format!("5-{:016x}", 5)),
                Some("5".into()),
                Some("6".into())
            ]
        );
        let metrics = verifier.metrics();
        assert_eq!(
            (metrics.stream_ids_refused, metrics.stream_resets),
            (1, 1),
            "{metrics:?}"
        );
    }

    /// A bare seq refused with 400 cannot be resumed from: the verifier starts afresh, without an
    /// id, and drops every cached answer, since what happened in between is unknown.
    #[tokio::test]
    async fn a_refused_bare_seq_starts_afresh_without_the_cache() {
        let sent: SentIds = Arc::default();
        let end_first = Arc::new(AtomicBool::new(false));
        let (recorded, ending) = (sent.clone(), end_first.clone());
        let fake = FakeKeyplane::start(
            move |conn: &mut StreamConn| {
                let first = {
                    let mut sent = lock(&recorded);
                    sent.push(conn.sent_last_event_id.clone());
                    sent.len() == 1
                };
                if conn.sent_last_event_id.is_some() {
                    refused_as_by_an_older_keyplane(conn);
                    return;
                }
                conn.send(&position("ready", 5, Some(5)));
                let started = Instant::now();
                while !(first && ending.load(SeqCst)) && started.elapsed() < Duration::from_secs(30)
                {
                    if !conn.send(HEARTBEAT) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            },
            || active("A"),
        );
        let verifier = fake_verifier(&fake, Duration::from_secs(10), StalePolicy::FailClosed);
        until("fresh", Duration::from_secs(5), || !verifier.is_stale()).await;
        let token = api_token();
        for _ in 0..2 {
            assert!(verifier.verify(&token).await.is_ok());
        }
        assert_eq!(verifier.metrics().introspections, 1);

        end_first.store(true, SeqCst);
        until("started afresh", Duration::from_secs(10), || {
            lock(&sent).len() >= 3 && verifier.metrics().stream_connects >= 2
        })
        .await;
        assert_eq!(lock(&sent)[..3], [None, Some("5".into()), None]);
        assert!(verifier.verify(&token).await.is_ok());
        let metrics = verifier.metrics();
        assert_eq!(
            (
                metrics.introspections,
                metrics.stream_ids_refused,
                metrics.stream_resets
            ),
            (2, 1, 1),
            "{metrics:?}"
        );
    }

    /// keyplane refuses the stream (a wrong verify token): that is kept for monitoring and a
    /// stale refusal names it, rather than calling keyplane down; a connection that catches up
    /// clears it.
    #[tokio::test]
    async fn a_refused_stream_says_why() {
        let refuse = Arc::new(AtomicBool::new(true));
        let refusing = refuse.clone();
        let fake = FakeKeyplane::start(
            move |conn: &mut StreamConn| {
                if refusing.load(SeqCst) {
                    conn.answer("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    return;
                }
                conn.send(&position("ready", 5, Some(5)));
                send_for(
                    conn,
                    Duration::from_millis(100),
                    Duration::from_secs(30),
                    |_| HEARTBEAT.into(),
                );
            },
            || active("A"),
        );
        let verifier = fake_verifier(&fake, Duration::from_secs(10), StalePolicy::FailClosed);
        until("refused", Duration::from_secs(5), || {
            verifier
                .last_stream_error()
                .is_some_and(|e| e.status == Some(401))
        })
        .await;
        let refusal = verifier.verify(&api_token()).await.unwrap_err();
        assert!(matches!(refusal, VerifyError::Stale(_)), "{refusal:?}");
        let message = refusal.to_string();
        assert!(
            message.contains("401") && !message.contains("down"),
            "{message}"
        );

        refuse.store(false, SeqCst);
        until("caught up", Duration::from_secs(10), || {
            !verifier.is_stale()
        })
        .await;
        assert_eq!(verifier.last_stream_error(), None);
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

    // Reconnection: when, and what counts as a connection.

    /// A raw HTTP answer that closes the connection.
    fn answer(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A verifier following the stream at `server` (`max_staleness` 10 s: backoff up to 5 s).
    fn verifier(server: &RawServer) -> Verifier {
        let config = fake_config(
            &server.base,
            Duration::from_secs(10),
            StalePolicy::FailClosed,
        );
        Verifier::new(config).unwrap()
    }

    /// The times between the first `n` stream requests, once they came.
    async fn gaps(server: &RawServer, n: usize) -> Vec<Duration> {
        until("the attempts", Duration::from_secs(30), || {
            server.count("GET /v1/revocations/stream") >= n
        })
        .await;
        let times: Vec<Instant> = lock(&server.requests)
            .iter()
            .map(|(at, _)| *at)
            .take(n)
            .collect();
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// keyplane answers 429 with `Retry-After` when its stream slots are full: the verifier
    /// leaves it alone that long.
    #[tokio::test]
    async fn a_busy_server_is_left_alone_for_its_retry_after() {
        let server =
            RawServer::start(|_, _| answer("429 Too Many Requests", "retry-after: 1\r\n", ""));
        let _verifier = verifier(&server);
        let gaps = gaps(&server, 3).await;
        assert!(
            gaps.iter().all(|g| *g >= Duration::from_secs(1)),
            "{gaps:?}"
        );
    }

    /// A 200 that is not an event stream (a proxy's sign-in page, another service at
    /// `base_url`) is a failed attempt, retried later each time, not a connection.
    #[tokio::test]
    async fn an_answer_that_is_not_an_event_stream_is_a_failure() {
        let server = RawServer::start(|_, _| {
            answer(
                "200 OK",
                "content-type: text/html\r\n",
                "<html>sign in</html>",
            )
        });
        let verifier = verifier(&server);
        let gaps = gaps(&server, 5).await;
        // Doubling from 100 ms, of which at least half: the fourth wait is 400 ms at least.
        assert!(gaps[3] >= Duration::from_millis(400), "{gaps:?}");
        let metrics = verifier.metrics();
        assert_eq!(metrics.stream_connects, 0, "{metrics:?}");
        assert!(metrics.stream_disconnects >= 4, "{metrics:?}");
        let error = verifier.last_stream_error().unwrap();
        assert!(error.reason.contains("text/html"), "{error:?}");
    }

    /// Failures in a row wait ever longer; a connection that caught up forgives them, so the
    /// next attempt after it comes soon.
    #[tokio::test]
    async fn failures_before_a_connection_that_caught_up_are_forgiven() {
        let server = RawServer::start(|n, _| match n {
            5 => answer(
                "200 OK",
                "content-type: text/event-stream\r\n",
                &position("ready", 5, Some(5)),
            ),
            _ => answer("503 Service Unavailable", "", ""),
        });
        let _verifier = verifier(&server);
        let gaps = gaps(&server, 7).await;
        // The fifth failure in a row waits 800 ms at least; the first after the connection
        // that caught up, 100 ms at most (and the time to connect).
        assert!(gaps[4] >= Duration::from_millis(800), "{gaps:?}");
        assert!(gaps[5] < Duration::from_millis(800), "{gaps:?}");
    }
}
