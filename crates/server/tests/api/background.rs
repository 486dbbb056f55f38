//! The background work against a store that does not answer one job's step: the step is
//! abandoned at its job's deadline, counted and logged, tried again at the job's next run, and
//! the other jobs go on meanwhile; a stop still ends within its deadline.

use crate::clock_skew::readyz;
use crate::faulty_store::FaultyStore;
use crate::helpers::{both_backends, eventually, test_config, TestApp};
use crate::pg_proxy::{Mode, PgProxy};
use crate::verify::forward;
use keyplane_server::config::{BackgroundJob, HttpLimits, StepDeadlines};
use keyplane_server::Config;
use keyplane_store::testing::Backend;
use serde_json::Value;
use std::time::Duration;

/// The stop's deadline in these tests.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a test waits for a stop before it fails: far past its deadline, so that only a stop
/// that does not end fails (this asserts no duration).
const STOP_WAIT: Duration = Duration::from_secs(60);

/// `job`'s steps abandoned after `deadline`, and a short stop.
fn config_with(job: BackgroundJob, deadline: Duration) -> Config {
    Config {
        background_step_deadlines: StepDeadlines::default().with(job, deadline),
        http: HttpLimits {
            shutdown_timeout: SHUTDOWN_TIMEOUT,
            ..HttpLimits::default()
        },
        ..test_config()
    }
}

fn timeouts_of(job: &str) -> String {
    format!("keyplane_background_step_timeouts_total{{job=\"{job}\"}}")
}

/// Stops `app` as a signal does, failing the test if the stop does not end.
async fn assert_stops(app: &mut TestApp) {
    assert!(
        tokio::time::timeout(STOP_WAIT, app.stop()).await.is_ok(),
        "the stop did not end within {STOP_WAIT:?} (its deadline: {SHUTDOWN_TIMEOUT:?}) while a \
         background step hangs"
    );
}

/// The Idempotency-Key prune never answered: each of its runs is abandoned at its deadline and
/// counted, `/readyz` lists it (and stays ready), the log names it, and another job's effect (a
/// credential's use reaching `last_used_at`) still shows. A stop while it hangs ends.
async fn a_hung_step_holds_no_other_job(backend: Backend) {
    let config = config_with(BackgroundJob::IdempotencyPrune, Duration::from_millis(200));
    let (mut app, store) = FaultyStore::spawn(backend, config).await;
    store.hold_idempotency_prunes(true);
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "used", &[]).await;
    let token = created["token"].as_str().unwrap();
    let path = org.path(&format!("/api-tokens/{}", created["id"].as_str().unwrap()));

    // Abandoned, and tried again at its next run (abandoned again).
    eventually(
        "the prune's runs are abandoned at their deadline",
        || async { app.metric(&timeouts_of("idempotency_prune")).await >= 2 },
    )
    .await;
    assert_eq!(forward(&app, Some(token), "").await.status(), 200);
    eventually("the use reaches last_used_at meanwhile", || async {
        let body: Value = app.get(&path, &org.token).await.json().await.unwrap();
        body["last_used_at"].is_string()
    })
    .await;
    let (status, readiness) = readyz(&app).await;
    assert_eq!(status, 200, "{readiness}");
    assert_eq!(readiness["status"], "ready", "{readiness}");
    let stalled = readiness["background"]["stalled"].as_array().unwrap();
    assert!(
        stalled.contains(&Value::from("idempotency_prune")),
        "{readiness}"
    );
    assert!(
        crate::logs::captured()
            .lines()
            .any(|line| line.contains("WARN")
                && line.contains("background step abandoned at its deadline")
                && line.contains("idempotency_prune")),
        "a warning names the job"
    );
    assert_stops(&mut app).await;
}

both_backends!(a_hung_step_holds_no_other_job);

/// PostgreSQL gone silent in the middle of a last-use flush (a network path dropped without a
/// reset: PostgreSQL never sees the statement, so none of its timeouts ends it): the flush is
/// abandoned at its deadline, counted, and tried again at each run, and a stop still ends within
/// its deadline though the final flush meets the same silence.
#[tokio::test]
async fn a_flush_on_a_silent_connection_is_abandoned_and_the_stop_ends() {
    let writer = TestApp::spawn(Backend::Postgres).await;
    let proxy = PgProxy::start(writer.database_url()).await;
    let config = config_with(BackgroundJob::LastUsedFlush, Duration::from_millis(300));
    let mut app = writer.replica_at(&proxy.url, config).await;
    let org = writer.create_org("acme").await;
    let created = writer.create_token(&org, "used", &[]).await;
    let id: uuid::Uuid = created["id"].as_str().unwrap().parse().unwrap();
    // The flush binds the credential's id (verification sends only the secret's hash).
    proxy.set(Mode::FreezeSending(Box::leak(Box::new(*id.as_bytes()))));
    let token = created["token"].as_str().unwrap();
    assert_eq!(forward(&app, Some(token), "").await.status(), 200);
    eventually(
        "the flush's runs are abandoned at their deadline",
        || async { app.metric(&timeouts_of("last_used_flush")).await >= 2 },
    )
    .await;
    let (status, readiness) = readyz(&app).await;
    assert_eq!(status, 200, "{readiness}");
    let stalled = readiness["background"]["stalled"].as_array().unwrap();
    assert!(
        stalled.contains(&Value::from("last_used_flush")),
        "{readiness}"
    );
    assert_stops(&mut app).await;
}
