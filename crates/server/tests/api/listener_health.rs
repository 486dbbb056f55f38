//! Whether a PostgreSQL replica hears the others' changes: `/readyz`'s `listener` and the
//! `keyplane_invalidation_*` metrics.

use crate::helpers::{eventually, test_config, TestApp};
use crate::pg_proxy::{Mode, PgProxy};
use keyplane_store::testing::Backend;
use reqwest::Method;
use serde_json::Value;

/// `/readyz`'s `listener`, asserting that its status is 200 whatever it says.
async fn listener(app: &TestApp) -> Value {
    let ready = app
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "a lost listener leaves the status alone"
    );
    let body: Value = ready.json().await.unwrap();
    body["listener"].clone()
}

const UP: &str = "keyplane_invalidation_listener_up";
const RESETS: &str = "keyplane_invalidation_resets_total";

/// A replica whose listener lost its connection says so while it reconnects (every cached
/// verification is then reloaded at least every second: the resets are counted), and says it
/// listens again once it does.
#[tokio::test]
async fn a_lost_listener_shows_in_readyz_and_metrics() {
    let writer = TestApp::spawn(Backend::Postgres).await;
    let proxy = PgProxy::start(writer.database_url()).await;
    let replica = writer.replica_at(&proxy.url, test_config()).await;
    eventually("the listener listens", || async {
        listener(&replica).await == "listening"
    })
    .await;
    assert_eq!(replica.metric(UP).await, 1);
    let resets = replica.metric(RESETS).await;
    assert!(resets >= 1, "the connection's own reset");

    proxy.set(Mode::DropListeners);
    eventually("the listener reconnects", || async {
        listener(&replica).await == "reconnecting"
    })
    .await;
    assert_eq!(replica.metric(UP).await, 0);
    eventually("the resets while it reconnects are counted", || async {
        replica.metric(RESETS).await >= resets + 2
    })
    .await;

    proxy.set(Mode::Forward);
    eventually("the listener listens again", || async {
        listener(&replica).await == "listening"
    })
    .await;
    assert_eq!(replica.metric(UP).await, 1);
}
