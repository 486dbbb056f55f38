//! `GET /v1/revocations/stream`: Server-Sent Events of every change that can alter a verification,
//! resumable with `Last-Event-ID`, heartbeats, bounded in number, tenant-scoped.

use crate::helpers::{both_backends, test_config, Org, TestApp};
use keyplane_store::testing::Backend;
use serde_json::{json, Value};
use std::time::Duration;

both_backends!(
    stream_carries_each_change_once_in_order_and_resumes,
    stream_refuses_bad_callers_and_bad_ids,
    stream_count_is_bounded_and_heartbeats_flow,
    stream_ends_when_its_caller_loses_tokens_verify,
    a_stream_catching_up_is_reset_when_retention_prunes_past_it,
    a_stream_is_reset_when_its_chain_goes_back,
    one_organization_cannot_take_every_stream,
    another_organizations_changes_do_not_wake_a_stream,
    hashed_ids_tell_a_chain_that_went_back_and_grew_again,
);

const STREAM: &str = "/v1/revocations/stream";
/// The stream with ids that also name their event's chain hash.
const HASHED: &str = "/v1/revocations/stream?ids=seq_hash";
const WAIT: Duration = Duration::from_secs(10);

/// One Server-Sent Event (or a comment, as `event == ":"`).
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

/// Reads events off an open stream.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(app: &TestApp, token: &str, last_event_id: Option<&str>) -> reqwest::Response {
        Self::open_at(app, STREAM, token, last_event_id).await
    }

    async fn open_at(
        app: &TestApp,
        path: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        let mut request = app
            .request(reqwest::Method::GET, path, Some(token))
            .timeout(Duration::from_secs(120));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request.send().await.expect("GET the stream")
    }

    async fn connect(app: &TestApp, token: &str, last_event_id: Option<&str>) -> Self {
        Self::connect_at(app, STREAM, token, last_event_id).await
    }

    async fn connect_at(
        app: &TestApp,
        path: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let response = Self::open_at(app, path, token, last_event_id).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event or comment, within `WAIT`.
    async fn next_any(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut sse = Sse {
                    event: "message".into(),
                    id: None,
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        sse.event = ":".into();
                        sse.data = json!(comment.trim());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        sse.event = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        sse.id = Some(v.trim().into());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if !data.is_empty() {
                    sse.data = serde_json::from_str(&data).expect("event data is JSON");
                }
                return sse;
            }
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .expect("an event within the wait")
                .expect("read the stream")
                .expect("the stream stays open");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event, skipping heartbeats, within `WAIT`: heartbeats alone fail the test rather
    /// than keep it waiting.
    async fn next(&mut self) -> Sse {
        tokio::time::timeout(WAIT, async {
            loop {
                let sse = self.next_any().await;
                if sse.event != ":" {
                    return sse;
                }
            }
        })
        .await
        .expect("an event (not only heartbeats) within the wait")
    }

    /// Asserts that no event (other than heartbeats) arrives for `quiet`.
    async fn nothing_for(&mut self, quiet: Duration) {
        if let Ok(sse) = tokio::time::timeout(quiet, self.next()).await {
            panic!("unexpected event: {sse:?}");
        }
    }
}

async fn verifier_token(app: &TestApp, org: &Org) -> String {
    let created = app.create_token(org, "verifier", &["tokens:verify"]).await;
    created["token"].as_str().unwrap().to_string()
}

async fn token_id(app: &TestApp, org: &Org, name: &str) -> String {
    app.create_token(org, name, &[]).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn assert_revocation(sse: &Sse, action: &str, kind: &str, credential_id: &str) {
    assert_eq!(sse.event, "revocation", "{sse:?}");
    assert_eq!(sse.data["action"], action, "{sse:?}");
    assert_eq!(sse.data["kind"], kind, "{sse:?}");
    assert_eq!(sse.data["credential_id"], credential_id, "{sse:?}");
    assert_eq!(
        sse.id.as_deref(),
        Some(sse.data["seq"].to_string().as_str()),
        "{sse:?}"
    );
    assert!(sse.data["occurred_at"].is_string(), "{sse:?}");
    // What changed, never a secret or a hash.
    let fields: Vec<&str> = sse
        .data
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        ["action", "credential_id", "kind", "occurred_at", "seq"],
        "{sse:?}"
    );
}

fn seq(sse: &Sse) -> u64 {
    sse.id.as_deref().unwrap().parse().unwrap()
}

async fn stream_carries_each_change_once_in_order_and_resumes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("other").await;
    let verifier = verifier_token(&app, &org).await;
    let (revoked, rotated, suspended) = (
        token_id(&app, &org, "revoked").await,
        token_id(&app, &org, "rotated").await,
        token_id(&app, &org, "suspended").await,
    );

    let mut stream = SseReader::connect(&app, &verifier, None).await;
    let ready = stream.next().await;
    assert_eq!(ready.event, "ready", "{ready:?}");
    let start = seq(&ready);
    assert_eq!(ready.data["seq"], start);
    // A new stream starts at the head: up to date at once.
    assert_eq!(ready.data["head"], start);

    // Another organization's changes never show here; creations are not revocations.
    let foreign = token_id(&app, &other, "foreign").await;
    let res = app
        .delete(&other.path(&format!("/api-tokens/{foreign}")), &other.token)
        .await;
    assert_eq!(res.status(), 204);

    let res = app
        .delete(&org.path(&format!("/api-tokens/{revoked}")), &org.token)
        .await;
    assert_eq!(res.status(), 204);
    let first = stream.next().await;
    assert_revocation(&first, "api_token.revoked", "api_token", &revoked);
    assert!(seq(&first) > start);

    let res = app
        .post_empty(
            &org.path(&format!("/api-tokens/{rotated}/rotate")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .post_empty(
            &org.path(&format!("/api-tokens/{suspended}/suspend")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let second = stream.next().await;
    assert_revocation(&second, "api_token.rotated", "api_token", &rotated);
    let third = stream.next().await;
    assert_revocation(&third, "api_token.suspended", "api_token", &suspended);
    assert!(seq(&first) < seq(&second) && seq(&second) < seq(&third));

    // A grant change names the service account it changes.
    let sa: Value = app
        .post(
            &org.account_path("/service-accounts"),
            &org.token,
            json!({"name": "svc"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let sa_id = sa["id"].as_str().unwrap();
    let res = app
        .post(
            &org.account_path("/authorizations"),
            &org.token,
            json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": sa_id, "capability_key": "audit:read"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let grant = stream.next().await;
    assert_revocation(&grant, "authorization.created", "service_account", sa_id);
    stream.nothing_for(Duration::from_millis(600)).await;
    drop(stream);

    // Changes made while no one listens are delivered on resumption, from Last-Event-ID on,
    // none twice.
    let res = app
        .post_empty(
            &org.path(&format!("/api-tokens/{suspended}/resume")),
            &org.token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .delete(&org.path(&format!("/api-tokens/{rotated}")), &org.token)
        .await;
    assert_eq!(res.status(), 204);
    let last = seq(&grant).to_string();
    let mut resumed = SseReader::connect(&app, &verifier, Some(&last)).await;
    let ready = resumed.next().await;
    assert_eq!(
        (ready.event.as_str(), ready.id.as_deref()),
        ("ready", Some(last.as_str()))
    );
    assert_eq!(ready.data["seq"], seq(&grant));
    assert_revocation(
        &resumed.next().await,
        "api_token.resumed",
        "api_token",
        &suspended,
    );
    let newest = resumed.next().await;
    assert_revocation(&newest, "api_token.revoked", "api_token", &rotated);
    // A resumed `ready` comes before the missed events and names the head they lead to: the
    // client is up to date only once it has seen them.
    assert_eq!(ready.data["head"], seq(&newest));
    resumed.nothing_for(Duration::from_millis(600)).await;

    // Resuming from the start replays everything after it, in the same order with the same ids.
    let mut replay = SseReader::connect(&app, &verifier, Some(&start.to_string())).await;
    assert_eq!(replay.next().await.event, "ready");
    for expected in [&first, &second, &third, &grant] {
        let got = replay.next().await;
        assert_eq!(
            (got.id.clone(), got.data.clone()),
            (expected.id.clone(), expected.data.clone())
        );
    }

    // The stream ends when its caller's own credential is revoked.
    let verifier_id = app
        .app
        .verify_secret(&verifier)
        .await
        .unwrap()
        .credential
        .id;
    let res = app
        .delete(&org.path(&format!("/api-tokens/{verifier_id}")), &org.token)
        .await;
    assert_eq!(res.status(), 204);
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match replay.response.chunk().await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream of a revoked caller must end");
}

async fn stream_refuses_bad_callers_and_bad_ids(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let verifier = verifier_token(&app, &org).await;
    let plain = app.create_token(&org, "plain", &["api_tokens:read"]).await;

    let res = app
        .request(reqwest::Method::GET, STREAM, None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token");
    let res = SseReader::open(&app, plain["token"].as_str().unwrap(), None).await;
    assert_eq!(res.status(), 403);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "insufficient_scope");
    let res = SseReader::open(&app, &verifier, Some("twelve")).await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    // An id ahead of the chain cannot be resumed: the client is told to start over.
    let mut stream = SseReader::connect(&app, &verifier, Some("999999")).await;
    let reset = stream.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    let head = seq(&reset);
    assert!(head < 999_999);
    assert_eq!(
        (&reset.data["seq"], &reset.data["head"]),
        (&json!(head), &json!(head))
    );
    let id = token_id(&app, &org, "doomed").await;
    app.delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await;
    let event = stream.next().await;
    assert_revocation(&event, "api_token.revoked", "api_token", &id);
    assert!(seq(&event) > head);

    // An id whose events were pruned (retention) cannot be resumed either.
    let store = app.app.store();
    let future = chrono::Utc::now() + chrono::TimeDelta::days(1);
    let record = keyplane_server::ops::audit_pruned(future, 1);
    while store
        .prune_audit_events(future, 1000, None, &record)
        .await
        .unwrap()
        > 0
    {}
    let mut pruned = SseReader::connect(&app, &verifier, Some("1")).await;
    // The head is the pruning's own record (`audit.pruned`), right after the revocation.
    let head = seq(&event) + 1;
    let reset = pruned.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(seq(&reset), head);
    assert_eq!(reset.data["head"], head);
    // While an id still inside the chain (here its anchor) resumes as usual.
    let mut current = SseReader::connect(&app, &verifier, Some(&seq(&event).to_string())).await;
    let ready = current.next().await;
    assert_eq!(ready.event, "ready");
    assert_eq!(
        (&ready.data["seq"], &ready.data["head"]),
        (&json!(seq(&event)), &json!(head))
    );
}

async fn stream_count_is_bounded_and_heartbeats_flow(backend: Backend) {
    let config = keyplane_server::Config {
        max_revocation_streams: 1,
        revocation_heartbeat: Duration::from_millis(200),
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let verifier = verifier_token(&app, &org).await;

    let mut stream = SseReader::connect(&app, &verifier, None).await;
    assert_eq!(stream.next().await.event, "ready");
    let second = SseReader::open(&app, &verifier, None).await;
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after"));
    for _ in 0..3 {
        let beat = stream.next_any().await;
        assert_eq!(
            (beat.event.as_str(), &beat.data),
            (":", &json!("heartbeat"))
        );
    }
    drop(stream);
    // The slot is free again once the client is gone.
    crate::helpers::eventually("a stream slot is released", || async {
        SseReader::open(&app, &verifier, None).await.status() == 200
    })
    .await;
}

async fn one_organization_cannot_take_every_stream(backend: Backend) {
    let config = keyplane_server::Config {
        max_revocation_streams: 4,
        max_revocation_streams_per_org: 2,
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let (a, b, c) = (
        app.create_org("a").await,
        app.create_org("b").await,
        app.create_org("c").await,
    );
    let (verifier_a, verifier_b, verifier_c) = (
        verifier_token(&app, &a).await,
        verifier_token(&app, &b).await,
        verifier_token(&app, &c).await,
    );
    let mut first_a = SseReader::connect(&app, &verifier_a, None).await;
    assert_eq!(first_a.next().await.event, "ready");
    let _second_a = SseReader::connect(&app, &verifier_a, None).await;
    let at_org_cap = SseReader::open(&app, &verifier_a, None).await;
    assert_eq!(at_org_cap.status(), 429);
    // The other organizations still get theirs, up to the server's bound.
    let _first_b = SseReader::connect(&app, &verifier_b, None).await;
    let _second_b = SseReader::connect(&app, &verifier_b, None).await;
    let at_server_cap = SseReader::open(&app, &verifier_c, None).await;
    assert_eq!(at_server_cap.status(), 429);
    // Either refusal reads the same.
    let refusal = |res: reqwest::Response| async move {
        let retry_after = res.headers()["retry-after"].to_str().unwrap().to_string();
        assert!(retry_after.parse::<u64>().is_ok(), "{retry_after}");
        let body: Value = res.json().await.unwrap();
        (retry_after, body["error"].clone())
    };
    assert_eq!(refusal(at_org_cap).await, refusal(at_server_cap).await);

    // A slot given back is the organization's again.
    drop(first_a);
    crate::helpers::eventually("an organization's stream slot is released", || async {
        SseReader::open(&app, &verifier_a, None).await.status() == 200
    })
    .await;
}

async fn stream_ends_when_its_caller_loses_tokens_verify(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (_, sa_token, grant_id) = app.service_account_with_grant(&org, "tokens:verify").await;
    let mut stream = SseReader::connect(&app, &sa_token, None).await;
    assert_eq!(stream.next().await.event, "ready");

    app.revoke_grant(&org, &grant_id).await;
    let ended = tokio::time::timeout(WAIT, async {
        while let Ok(Some(_)) = stream.response.chunk().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream of a caller without tokens:verify must end"
    );
    // The service account itself still verifies: it is the capability that went.
    let res = SseReader::open(&app, &sa_token, None).await;
    assert_eq!(res.status(), 403);
}

async fn a_stream_catching_up_is_reset_when_retention_prunes_past_it(backend: Backend) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, test_config()).await;
    let org = app.create_org("acme").await;
    let verifier = verifier_token(&app, &org).await;
    let spun = token_id(&app, &org, "spun").await;
    let mut stream = SseReader::connect(&app, &verifier, None).await;
    let start = seq(&stream.next().await);
    drop(stream);
    // More changes than the stream reads at once (100), then one more after `cutoff`.
    for _ in 0..150 {
        let res = app
            .post_empty(&org.path(&format!("/api-tokens/{spun}/rotate")), &org.token)
            .await;
        assert_eq!(res.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = token_id(&app, &org, "late").await;
    revoke(&app, &org, &late).await;

    // A client resumes just above the anchor; between its first and second page, retention
    // deletes every rotation.
    store.prune_when_read_after(start + 1, cutoff);
    let mut resumed = SseReader::connect(&app, &verifier, Some(&start.to_string())).await;
    let ready = resumed.next().await;
    assert_eq!((ready.event.as_str(), seq(&ready)), ("ready", start));
    for _ in 0..100 {
        let rotated = resumed.next().await;
        assert_revocation(&rotated, "api_token.rotated", "api_token", &spun);
    }
    // The other 50 are gone: the client is told so, rather than handed the revocation after
    // them as if it came next.
    let reset = resumed.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    let head = seq(&reset);
    assert_eq!(
        (&reset.data["seq"], &reset.data["head"]),
        (&json!(head), &json!(head))
    );
    // And it goes on from the head.
    let after = token_id(&app, &org, "after").await;
    revoke(&app, &org, &after).await;
    let event = resumed.next().await;
    assert_revocation(&event, "api_token.revoked", "api_token", &after);
    assert!(seq(&event) > head);
}

/// An id of the `?ids=seq_hash` form (`<seq>-<16 lowercase hex>`), as its seq.
fn hashed_seq(sse: &Sse) -> u64 {
    let id = sse.id.as_deref().unwrap();
    let (seq, tag) = id
        .split_once('-')
        .unwrap_or_else(|| panic!("{id}: no hash"));
    assert!(
        tag.len() == 16 && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{id}"
    );
    assert_eq!(sse.data["seq"].to_string(), seq, "{sse:?}");
    seq.parse().unwrap()
}

/// A bare seq cannot tell the event a client saw from another history's event at that seq: with
/// `?ids=seq_hash` each id also names its event's chain hash, and a client resuming with one after
/// the chain went back and grew past it again is told `reset`. Bare seqs still resume.
async fn hashed_ids_tell_a_chain_that_went_back_and_grew_again(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let tenant: uuid::Uuid = org.id.parse().unwrap();
    let verifier = verifier_token(&app, &org).await;
    let doomed = token_id(&app, &org, "doomed").await;

    let mut stream = SseReader::connect_at(&app, HASHED, &verifier, None).await;
    let ready = stream.next().await;
    assert_eq!(ready.event, "ready", "{ready:?}");
    hashed_seq(&ready);
    revoke(&app, &org, &doomed).await;
    let event = stream.next().await;
    assert_eq!(event.data["credential_id"], doomed.as_str(), "{event:?}");
    let seen = hashed_seq(&event);
    let id = event.id.clone().unwrap();
    drop(stream);

    // The id resumes, and so does its bare seq (a client from before).
    for resume_from in [id.clone(), seen.to_string()] {
        let mut resumed = SseReader::connect_at(&app, HASHED, &verifier, Some(&resume_from)).await;
        let ready = resumed.next().await;
        assert_eq!(
            (ready.event.as_str(), ready.id.as_deref()),
            ("ready", Some(id.as_str())),
            "from {resume_from}"
        );
    }

    // Another history (a failover, a restore) whose event at that seq is another one, and which
    // already goes past it: the hashed id is told to start over.
    edit_chain(&app, tenant, &fork_after(backend, seen - 1)).await;
    let mut resumed = SseReader::connect_at(&app, HASHED, &verifier, Some(&id)).await;
    let reset = resumed.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(hashed_seq(&reset), seen + 1);
    assert_eq!(reset.data["head"], seen + 1);
    // The bare seq cannot tell.
    let mut bare = SseReader::connect_at(&app, HASHED, &verifier, Some(&seen.to_string())).await;
    assert_eq!(bare.next().await.event, "ready");

    for bad in [
        "7-",
        "7-xyz",
        "-0123456789abcdef",
        "7-0123456789ABCDEF",
        "7-0123456789abcdef0",
    ] {
        let res = SseReader::open_at(&app, HASHED, &verifier, Some(bad)).await;
        assert_eq!(res.status(), 400, "{bad}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request", "{bad}");
    }
    let res = SseReader::open_at(&app, &format!("{STREAM}?ids=hashes"), &verifier, None).await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    // The document says so.
    let doc = app.openapi().await;
    let operation = &doc["paths"][STREAM]["get"];
    let ids = operation["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "ids")
        .expect("the `ids` parameter is documented");
    assert_eq!(
        (&ids["in"], &ids["required"]),
        (&json!("query"), &json!(false))
    );
    let schema = &ids["schema"];
    let schema = match schema["$ref"].as_str() {
        Some(name) => &doc["components"]["schemas"][name.rsplit('/').next().unwrap()],
        None => schema,
    };
    assert_eq!(schema["enum"], json!(["seq", "seq_hash"]), "{ids}");
    assert!(operation["responses"]["400"].is_object());
}

async fn a_stream_is_reset_when_its_chain_goes_back(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let tenant: uuid::Uuid = org.id.parse().unwrap();
    let verifier = verifier_token(&app, &org).await;
    let doomed = token_id(&app, &org, "doomed").await;
    // Events to lose.
    for name in ["one", "two", "three"] {
        token_id(&app, &org, name).await;
    }
    let mut stream = SseReader::connect(&app, &verifier, None).await;
    let head = seq(&stream.next().await);
    assert!(head > 4, "{head}");

    // A failover to a standby that lost the last three commits (or a restore from a backup): the
    // chain ends short of what the stream has sent, and its next events take those seqs again.
    edit_chain(&app, tenant, &roll_back_to(head - 3)).await;
    let reset = stream.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(
        (seq(&reset), &reset.data["head"]),
        (head - 3, &json!(head - 3))
    );
    revoke(&app, &org, &doomed).await;
    let event = stream.next().await;
    assert_revocation(&event, "api_token.revoked", "api_token", &doomed);
    assert_eq!(seq(&event), head - 2);

    // The same, and the other history already longer than the stream's position when the stream
    // reads it: the event at that position is not the one the stream sent.
    edit_chain(&app, tenant, &fork_after(backend, head - 4)).await;
    let reset = stream.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(
        (seq(&reset), &reset.data["head"]),
        (head - 1, &json!(head - 1))
    );
}

/// The tenant's chain as a standby that never received its events after `seq` has it.
fn roll_back_to(seq: u64) -> Vec<String> {
    vec![
        format!("DELETE FROM audit_events WHERE tenant_id = $1 AND seq > {seq}"),
        format!(
            "UPDATE audit_chain_heads SET seq = {seq}, chain_hash = \
             (SELECT chain_hash FROM audit_events WHERE tenant_id = $1 AND seq = {seq}) \
             WHERE tenant_id = $1"
        ),
    ]
}

/// The tenant's chain as another history has it: its events after `seq` differ (their hashes do),
/// and it has one more, a copy of the last.
fn fork_after(backend: Backend, seq: u64) -> Vec<String> {
    let new_id = match backend {
        Backend::Sqlite => "randomblob(16)",
        Backend::Postgres => "gen_random_uuid()",
    };
    let other = "substr(chain_hash, 2) || substr(chain_hash, 1, 1)";
    vec![
        format!("UPDATE audit_events SET chain_hash = {other} WHERE tenant_id = $1 AND seq > {seq}"),
        format!(
            "INSERT INTO audit_events (tenant_id, seq, id, occurred_at, action, outcome, \
             actor_type, actor_id, actor_issuer, actor_sub, target_type, target_id, target_name, \
             request_id, client_ip, user_agent, details, chain_hash) \
             SELECT tenant_id, seq + 1, {new_id}, occurred_at, action, outcome, actor_type, \
             actor_id, actor_issuer, actor_sub, target_type, target_id, target_name, request_id, \
             client_ip, user_agent, details, {other} FROM audit_events \
             WHERE tenant_id = $1 AND seq = (SELECT seq FROM audit_chain_heads WHERE tenant_id = $1)"
        ),
        "UPDATE audit_chain_heads SET seq = seq + 1, chain_hash = \
         (SELECT e.chain_hash FROM audit_events e WHERE e.tenant_id = $1 AND e.seq = audit_chain_heads.seq + 1) \
         WHERE tenant_id = $1"
            .to_string(),
    ]
}

/// Runs `statements` (`$1`: the tenant) in one transaction on the test database, behind the
/// server's back: nothing wakes a stream, which finds the change at its next read.
async fn edit_chain(app: &TestApp, tenant: uuid::Uuid, statements: &[String]) {
    macro_rules! run {
        ($connection:ty) => {{
            use sqlx::Connection;
            let mut db = <$connection>::connect(app.database_url())
                .await
                .expect("connect to the test database");
            let mut tx = db.begin().await.unwrap();
            for sql in statements {
                sqlx::query(sql)
                    .bind(tenant)
                    .execute(&mut *tx)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            tx.commit().await.unwrap();
        }};
    }
    if app.database_url().starts_with("postgres") {
        run!(sqlx::PgConnection)
    } else {
        run!(sqlx::SqliteConnection)
    }
}

async fn revoke(app: &TestApp, org: &Org, id: &str) {
    let res = app
        .delete(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await;
    assert_eq!(res.status(), 204, "revoking {id}");
}

/// Streams that neither poll nor send heartbeats within a test: each read of their chain, and
/// each event they deliver, follows a wake-up.
fn woken_only() -> keyplane_server::Config {
    keyplane_server::Config {
        revocation_poll_interval: Duration::from_secs(600),
        revocation_heartbeat: Duration::from_secs(600),
        ..test_config()
    }
}

async fn another_organizations_changes_do_not_wake_a_stream(backend: Backend) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, woken_only()).await;
    let busy = app.create_org("busy").await;
    let quiet = app.create_org("quiet").await;
    let quiet_tenant = keyplane_core::TenantId::from_uuid(quiet.id.parse().unwrap());
    let verifier = verifier_token(&app, &quiet).await;
    let later = token_id(&app, &quiet, "later").await;
    let toggled = token_id(&app, &busy, "toggled").await;
    let mut stream = SseReader::connect(&app, &verifier, None).await;
    assert_eq!(stream.next().await.event, "ready");

    let before = store.chain_state_reads(quiet_tenant);
    for round in 0..15 {
        for change in ["suspend", "resume"] {
            let res = app
                .post_empty(
                    &busy.path(&format!("/api-tokens/{toggled}/{change}")),
                    &busy.token,
                )
                .await;
            assert_eq!(res.status(), 200, "{change} in round {round}");
        }
    }
    // A reset of the PostgreSQL listener wakes every stream: a few reads, not one per change.
    let woken = store.chain_state_reads(quiet_tenant) - before;
    assert!(
        woken <= 3,
        "30 changes elsewhere made {woken} reads of this stream's chain"
    );

    // Its own organization's changes still reach it at once, not at the next poll.
    revoke(&app, &quiet, &later).await;
    assert_revocation(
        &stream.next().await,
        "api_token.revoked",
        "api_token",
        &later,
    );
}

/// A change through another replica wakes the stream through the store's notification, not at
/// its next poll: the notification cannot say which organization changed, so it wakes every one.
#[tokio::test]
async fn a_stream_hears_another_replicas_changes_at_once() {
    let first = TestApp::spawn_with(Backend::Postgres, woken_only()).await;
    let replica = first.replica().await;
    let org = first.create_org("acme").await;
    first.await_listeners(2).await;
    let verifier = verifier_token(&first, &org).await;
    let doomed = token_id(&first, &org, "doomed").await;
    let mut stream = SseReader::connect(&replica, &verifier, None).await;
    assert_eq!(stream.next().await.event, "ready");

    revoke(&first, &org, &doomed).await;
    assert_revocation(
        &stream.next().await,
        "api_token.revoked",
        "api_token",
        &doomed,
    );
}

/// A change through this replica that changes nothing (suspending a suspended token) sends no
/// notification: it must not make this replica take another replica's real change of the same
/// credential, right after, for the echo of its own and leave its streams asleep.
#[tokio::test]
async fn another_replicas_change_after_a_local_no_op_still_wakes_the_stream() {
    let first = TestApp::spawn_with(Backend::Postgres, woken_only()).await;
    let replica = first.replica().await;
    let org = first.create_org("acme").await;
    first.await_listeners(2).await;
    let verifier = verifier_token(&first, &org).await;
    let toggled = token_id(&first, &org, "toggled").await;
    async fn change(app: &TestApp, org: &Org, id: &str, change: &str) {
        let res = app
            .post_empty(&org.path(&format!("/api-tokens/{id}/{change}")), &org.token)
            .await;
        assert_eq!(res.status(), 200, "{change}");
    }
    change(&first, &org, &toggled, "suspend").await;
    let mut stream = SseReader::connect(&replica, &verifier, None).await;
    assert_eq!(stream.next().await.event, "ready");

    // Suspended already: nothing changes, nothing is recorded or sent.
    change(&replica, &org, &toggled, "suspend").await;
    change(&first, &org, &toggled, "resume").await;
    assert_revocation(
        &stream.next().await,
        "api_token.resumed",
        "api_token",
        &toggled,
    );
}
