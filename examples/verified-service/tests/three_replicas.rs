//! The example service verifying through `keyplane-verifier` against three keyplane replicas on
//! one PostgreSQL, with a TCP proxy between the service and keyplane that the test can cut:
//! a revoke through replica 1 is refused by the service within the stated bound; a cut stream
//! resumes with `Last-Event-ID` and misses nothing; with keyplane unreachable, cached valid
//! credentials keep working until `max_staleness`, then the chosen policy applies; a stream
//! resumed on an audit chain that went back (a failover, a restore) and grew past its
//! `Last-Event-ID` again is reset, and the verifier drops what it cached.

use keyplane_server::{ops, App, Config};
use keyplane_store::testing::{Backend, TestDatabase};
use keyplane_verifier::{StalePolicy, Verifier, VerifierConfig};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// The crate's stated bound while the stream is connected: the stream replica's poll interval
/// (1 s; NOTIFY usually wakes it in milliseconds) plus delivery; with margin for a loaded machine.
const BOUND: Duration = Duration::from_secs(3);
const MAX_STALENESS: Duration = Duration::from_secs(3);

struct Replica {
    base: String,
    _stop: oneshot::Sender<()>,
}

async fn replica(db: &TestDatabase) -> Replica {
    let store = keyplane_store::connect(&db.url)
        .await
        .expect("open the store");
    let config = Config {
        rate_limit_per_minute: 0,
        revocation_heartbeat: Duration::from_millis(500),
        ..Config::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(keyplane_server::serve(
        listener,
        App::new(store, config),
        async move {
            let _ = stopped.await;
        },
    ));
    Replica { base, _stop: stop }
}

/// A TCP proxy on loopback in front of one replica, which the test can cut (every connection
/// closed, new ones refused) and restore.
struct Proxy {
    base: String,
    up: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (up, watcher) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*watcher.borrow() {
                    continue;
                }
                let (upstream, mut watcher) = (upstream.clone(), watcher.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watcher.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { base, up }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

struct World {
    _db: TestDatabase,
    replicas: Vec<Replica>,
    proxy: Proxy,
    service: String,
    verifier: Verifier,
    http: reqwest::Client,
    org: (String, String),
}

impl World {
    async fn start(policy: StalePolicy) -> Self {
        let db = TestDatabase::new(Backend::Postgres).await;
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(replica(&db).await);
        }
        let store = keyplane_store::connect(&db.url).await.unwrap();
        let created = ops::create_org(store.as_ref(), "acme", &operator())
            .await
            .unwrap();
        let org = (
            created.tenant.id.to_string(),
            created.token.secret.expose_secret().to_string(),
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let proxy = Proxy::start(&replicas[1].base).await;
        // The service verifies through replica 2 (behind the proxy); changes go through 1 and 3.
        let verify_token = create_token(
            &http,
            &replicas[0].base,
            &org,
            "verifier",
            &["tokens:verify"],
        )
        .await
        .1;
        let mut config = VerifierConfig::new(proxy.base.clone(), verify_token);
        config.max_staleness = MAX_STALENESS;
        config.stale_policy = policy;
        config.request_timeout = Duration::from_secs(2);
        let verifier = Verifier::new(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service = format!("http://{}", listener.local_addr().unwrap());
        let app = keyplane_example_verified_service::app(verifier.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let world = Self {
            _db: db,
            replicas,
            proxy,
            service,
            verifier,
            http,
            org,
        };
        world
            .until(
                "the verifier follows the stream",
                Duration::from_secs(10),
                |w| {
                    let connected = w.verifier.metrics().stream_connected;
                    async move { connected }
                },
            )
            .await;
        world
    }

    /// (id, secret) of a new API token, created through replica 1.
    async fn create_token(&self, name: &str, scopes: &[&str]) -> (String, String) {
        create_token(&self.http, &self.replicas[0].base, &self.org, name, scopes).await
    }

    async fn revoke(&self, replica: usize, id: &str) {
        let res = self
            .http
            .delete(format!(
                "{}/api/v1/organizations/{}/api-tokens/{id}",
                self.replicas[replica].base, self.org.0
            ))
            .bearer_auth(&self.org.1)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204);
    }

    /// The example service's answer to `/hello` with `token`.
    async fn hello(&self, token: &str) -> u16 {
        self.http
            .get(format!("{}/hello", self.service))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Polls `/hello` with `token` every 20 ms until it answers `status`; fails after `limit`.
    /// Returns the time it took.
    async fn until_hello(&self, token: &str, status: u16, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.hello(token).await == status {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "/hello did not answer {status} within {limit:?}: {:?}",
                self.verifier.metrics()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `check` every 20 ms until it holds; fails after `limit`. Returns the time it took.
    async fn until<F, Fut>(&self, what: &str, limit: Duration, mut check: F) -> Duration
    where
        F: FnMut(&Self) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        loop {
            if check(self).await {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// (id, secret) of a new API token, created through the replica at `base`.
async fn create_token(
    http: &reqwest::Client,
    base: &str,
    org: &(String, String),
    name: &str,
    scopes: &[&str],
) -> (String, String) {
    let res = http
        .post(format!("{base}/api/v1/organizations/{}/api-tokens", org.0))
        .bearer_auth(&org.1)
        .json(&json!({"name": name, "scopes": scopes}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    (
        created["id"].as_str().unwrap().into(),
        created["token"].as_str().unwrap().into(),
    )
}

#[tokio::test]
async fn a_revoke_anywhere_is_refused_within_the_bound_and_a_cut_stream_misses_nothing() {
    let world = World::start(StalePolicy::FailClosed).await;
    let (a_id, a) = world.create_token("a", &["read"]).await;
    let (b_id, b) = world.create_token("b", &["read"]).await;

    assert_eq!(world.hello(&a).await, 200);
    assert_eq!(world.hello(&a).await, 200);
    assert_eq!(world.hello(&b).await, 200);
    let before = world.verifier.metrics();
    assert!(before.cache_hits >= 1, "{before:?}");
    assert_eq!(world.hello("aether_not-even-close").await, 401);
    let anonymous = world
        .http
        .get(format!("{}/hello", world.service))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let lower_case = world
        .http
        .get(format!("{}/hello", world.service))
        .header("authorization", format!("bearer {a}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower_case.status(), 200);
    assert!(lower_case.text().await.unwrap().contains(&a_id));
    let malformed_before = world.verifier.metrics().malformed;
    assert!(malformed_before >= 1 && world.verifier.metrics().introspections <= 3);

    // Revoked through replica 1; the service verifies through replica 2.
    world.revoke(0, &a_id).await;
    let took = world.until_hello(&a, 401, BOUND).await;
    eprintln!("revocation reached the service in {took:?}");
    assert_eq!(world.hello(&b).await, 200);

    // The stream is cut; a revoke through replica 3 happens meanwhile; the stream comes back and
    // resumes from its Last-Event-ID: the revoke is delivered, nothing is reset.
    let events_before = world.verifier.metrics().stream_events;
    world.proxy.cut();
    world
        .until(
            "the verifier sees the stream end",
            Duration::from_secs(5),
            |w| {
                let connected = w.verifier.metrics().stream_connected;
                async move { !connected }
            },
        )
        .await;
    world.revoke(2, &b_id).await;
    world.proxy.restore();
    world.until_hello(&b, 401, BOUND).await;
    let after = world.verifier.metrics();
    assert_eq!(after.stream_events, events_before + 1, "{after:?}");
    assert_eq!(after.stream_resets, 0, "{after:?}");
    assert!(
        after.stream_connects >= 2 && after.stream_connected,
        "{after:?}"
    );
    assert!(!after.stale, "{after:?}");
}

async fn keyplane_down(policy: StalePolicy) {
    let world = World::start(policy).await;
    let (_, cached) = world.create_token("cached", &["read"]).await;
    let (_, never_seen) = world.create_token("never-seen", &["read"]).await;
    assert_eq!(world.hello(&cached).await, 200);

    // keyplane unreachable from the service.
    world.proxy.cut();
    let down = Instant::now();
    // Within max_staleness: the cached credential keeps working; one never verified cannot be.
    assert_eq!(world.hello(&cached).await, 200);
    assert_eq!(world.hello(&never_seen).await, 503);
    tokio::time::sleep(MAX_STALENESS / 2).await;
    assert_eq!(world.hello(&cached).await, 200);
    assert!(!world.verifier.metrics().stale);

    // Past max_staleness the verifier says it is stale and the policy applies.
    world
        .until("the verifier turns stale", MAX_STALENESS * 2, |w| {
            let stale = w.verifier.metrics().stale;
            async move { stale }
        })
        .await;
    assert!(down.elapsed() >= MAX_STALENESS - Duration::from_millis(600));
    let before = world.verifier.metrics();
    assert_eq!(world.hello(&cached).await, 503);
    assert_eq!(world.hello(&cached).await, 503);
    let after = world.verifier.metrics();
    match policy {
        StalePolicy::FailClosed => {
            // Refused without asking anyone.
            assert_eq!(after.stale_refusals, before.stale_refusals + 2, "{after:?}");
            assert_eq!(after.introspections, before.introspections, "{after:?}");
        }
        StalePolicy::Recheck => {
            // Each request asked keyplane (which could not answer) instead of the cache.
            assert_eq!(after.stale_rechecks, before.stale_rechecks + 2, "{after:?}");
            assert_eq!(after.introspections, before.introspections + 2, "{after:?}");
        }
    }

    // keyplane is back: the stream reconnects and the credential works again.
    world.proxy.restore();
    world
        .until_hello(&cached, 200, Duration::from_secs(10))
        .await;
    world
        .until(
            "the verifier is fresh again",
            Duration::from_secs(10),
            |w| {
                let stale = w.verifier.metrics().stale;
                async move { !stale }
            },
        )
        .await;
    let metrics: Value = world
        .http
        .get(format!("{}/verifier", world.service))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metrics["stale"], false, "{metrics}");
}

#[tokio::test]
async fn keyplane_down_then_fail_closed_after_max_staleness() {
    keyplane_down(StalePolicy::FailClosed).await;
}

#[tokio::test]
async fn keyplane_down_then_recheck_after_max_staleness() {
    keyplane_down(StalePolicy::Recheck).await;
}

/// Who the organization is created by (`keyplane admin create-org` records its operator).
fn operator() -> keyplane_core::Operator {
    keyplane_core::Operator {
        os_user: "test".into(),
        name: None,
    }
}

/// The tenant's audit chain as another history has it (a failover to a standby that lost the last
/// commits, then new ones; a restore): its events after `seq` differ (their hashes do), and it has
/// one more, so it is already past where the verifier stopped.
async fn fork_chain_after(db: &TestDatabase, tenant: &str, seq: u64) {
    use sqlx::Connection;
    let tenant: uuid::Uuid = tenant.parse().unwrap();
    let other = "substr(chain_hash, 2) || substr(chain_hash, 1, 1)";
    let statements = [
        format!("UPDATE audit_events SET chain_hash = {other} WHERE tenant_id = $1 AND seq > {seq}"),
        format!(
            "INSERT INTO audit_events (tenant_id, seq, id, occurred_at, action, outcome, \
             actor_type, actor_id, actor_issuer, actor_sub, target_type, target_id, target_name, \
             request_id, client_ip, user_agent, details, chain_hash) \
             SELECT tenant_id, seq + 1, gen_random_uuid(), occurred_at, action, outcome, \
             actor_type, actor_id, actor_issuer, actor_sub, target_type, target_id, target_name, \
             request_id, client_ip, user_agent, details, {other} FROM audit_events \
             WHERE tenant_id = $1 AND seq = (SELECT seq FROM audit_chain_heads WHERE tenant_id = $1)"
        ),
        "UPDATE audit_chain_heads SET seq = seq + 1, chain_hash = \
         (SELECT e.chain_hash FROM audit_events e WHERE e.tenant_id = $1 AND e.seq = audit_chain_heads.seq + 1) \
         WHERE tenant_id = $1"
            .to_string(),
    ];
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx = connection.begin().await.unwrap();
    for sql in &statements {
        sqlx::query(sql)
            .bind(tenant)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_stream_resumed_on_a_chain_that_went_back_and_grew_again_is_reset() {
    let world = World::start(StalePolicy::FailClosed).await;
    let (_, cached) = world.create_token("cached", &["read"]).await;
    let (doomed, _) = world.create_token("doomed", &["read"]).await;
    world.revoke(0, &doomed).await;
    world
        .until("the revocation is delivered", BOUND, |w| {
            let events = w.verifier.metrics().stream_events;
            async move { events >= 1 }
        })
        .await;
    assert_eq!(world.hello(&cached).await, 200);
    let introspections = world.verifier.metrics().introspections;
    assert_eq!(world.hello(&cached).await, 200);
    assert_eq!(world.verifier.metrics().introspections, introspections);

    world.proxy.cut();
    world
        .until(
            "the verifier sees the stream end",
            Duration::from_secs(5),
            |w| {
                let connected = w.verifier.metrics().stream_connected;
                async move { !connected }
            },
        )
        .await;
    let last_seen = world.verifier.metrics().last_event_id;
    fork_chain_after(&world._db, &world.org.0, last_seen - 1).await;
    world.proxy.restore();
    world
        .until(
            "the resumed stream is reset",
            Duration::from_secs(10),
            |w| {
                let resets = w.verifier.metrics().stream_resets;
                async move { resets == 1 }
            },
        )
        .await;
    // Nothing cached survived it: the credential is asked about again.
    assert_eq!(world.hello(&cached).await, 200);
    assert_eq!(
        world.verifier.metrics().introspections,
        introspections + 1,
        "{:?}",
        world.verifier.metrics()
    );
}
