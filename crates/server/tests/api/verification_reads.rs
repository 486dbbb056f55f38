//! Verification's reads against a slow or stuck store: they have connections of their own, which
//! slow queries elsewhere cannot take, and a deadline, past which a cached entry answers stale and
//! an uncached secret 503, as for any other store fault.

use crate::helpers::{test_config, Org, TestApp};
use crate::pg_proxy::{Mode, PgProxy};
use crate::verify::forward;
use keyplane_server::auth::CacheConfig;
use keyplane_server::Config;
use keyplane_store::testing::Backend;
use reqwest::Method;
use sqlx::{Connection, Executor};
use std::sync::Arc;
use std::time::Duration;

/// The general readers' connections on PostgreSQL.
const GENERAL_READERS: usize = 16;
/// More audit searches than that.
const SEARCHES: usize = 20;

/// A test connection holding `LOCK TABLE <table> IN ACCESS EXCLUSIVE MODE` until released (or
/// dropped, which closes it): every query on the table waits.
struct TableLock(sqlx::PgConnection);

impl TableLock {
    async fn hold(app: &TestApp, table: &str) -> Self {
        let mut connection = sqlx::PgConnection::connect(app.database_url())
            .await
            .expect("connect to PostgreSQL");
        connection
            .execute(format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE").as_str())
            .await
            .expect("lock the table");
        Self(connection)
    }

    async fn release(mut self) {
        self.0.execute("ROLLBACK").await.expect("unlock");
        self.0.close().await.expect("close");
    }
}

async fn readyz_status(app: &TestApp) -> u16 {
    app.request(Method::GET, "/readyz", None)
        .send()
        .await
        .expect("/readyz answers")
        .status()
        .as_u16()
}

fn secret(created: serde_json::Value) -> String {
    created["token"].as_str().unwrap().to_string()
}

/// A verification's lookups while every general reader waits: an API token's, and a service
/// account's with its grants.
async fn assert_uncached_secrets_verify(app: &TestApp, token: &str, sa_token: &str) {
    assert_eq!(forward(app, Some(token), "").await.status(), 200);
    assert_eq!(
        forward(app, Some(sa_token), "?scope=deploy").await.status(),
        200
    );
    assert_eq!(readyz_status(app).await, 200, "/readyz");
}

/// Audit searches stuck behind a lock on `audit_events` hold every general reader: an uncached
/// secret still verifies, and `/readyz` still answers ready.
#[tokio::test]
async fn slow_audit_searches_leave_verification_its_connections() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let org = app.create_org("acme").await;
    let token = secret(app.create_token(&org, "uncached", &[]).await);
    let (_, sa_token, _) = app.service_account_with_grant(&org, "deploy").await;
    // The auditor's own token, cached before its searches.
    assert_eq!(forward(&app, Some(&org.token), "").await.status(), 200);
    let lock = TableLock::hold(&app, "audit_events").await;
    let searches = hold_audit_searches(&app, &org).await;
    assert_uncached_secrets_verify(&app, &token, &sa_token).await;
    lock.release().await;
    for search in searches {
        let status = search.await.unwrap();
        assert!(
            status == 200 || status == 503,
            "a search: 200 once the lock is gone, or 503 without a connection; got {status}"
        );
    }
}

/// [`SEARCHES`] searches of `org`'s audit trail at once, each on a task of its own, waiting on
/// `lock`; returned once the general readers are all taken (16 searches wait, and one more found
/// no connection in time: 503), with their statuses to come.
async fn hold_audit_searches(app: &TestApp, org: &Org) -> Vec<tokio::task::JoinHandle<u16>> {
    let searches: Vec<_> = (0..SEARCHES)
        .map(|_| {
            let search = app.request(
                Method::GET,
                &org.path("/audit-events?outcome=denied&limit=100"),
                Some(&org.token),
            );
            tokio::spawn(async move { search.send().await.unwrap().status().as_u16() })
        })
        .collect();
    for _ in 0..200 {
        if searches.iter().filter(|s| !s.is_finished()).count() < GENERAL_READERS {
            panic!("the searches did not all wait on the lock");
        }
        if searches.iter().any(|s| s.is_finished()) {
            return searches;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no search was refused a connection: the general readers were not all taken");
}

/// SQLite: no lock holds a WAL reader, so the test itself takes every general reader.
#[tokio::test]
async fn verification_has_connections_the_general_readers_do_not_share() {
    let mut opened = None;
    let app = TestApp::spawn_opening(Backend::Sqlite, test_config(), async |url| {
        let store = Arc::new(
            keyplane_store::SqliteStore::connect(url)
                .await
                .expect("open the test store"),
        );
        opened = Some(store.clone());
        store as Arc<dyn keyplane_store::Store>
    })
    .await;
    let store = opened.expect("the store was opened");
    let org = app.create_org("acme").await;
    let token = secret(app.create_token(&org, "uncached", &[]).await);
    let (_, sa_token, _) = app.service_account_with_grant(&org, "deploy").await;
    let held = keyplane_store::testing::hold_general_readers(&store).await;
    assert_uncached_secrets_verify(&app, &token, &sa_token).await;
    drop(held);
}

/// A cache that reloads after half a second, and may answer stale for a minute.
fn short_lived_cache() -> Config {
    Config {
        verify_cache: CacheConfig {
            positive_ttl: Duration::from_millis(500),
            stale_if_error: Duration::from_secs(60),
            ..CacheConfig::default()
        },
        ..test_config()
    }
}

/// A lock on `credentials` (a migration, an operator's session) holds a verification's lookup:
/// it gives up, and a cached entry past its lifetime answers stale while an uncached secret gets
/// 503, rather than both waiting for the lock.
#[tokio::test]
async fn a_locked_credentials_table_answers_stale_or_503() {
    let app = TestApp::spawn_with(Backend::Postgres, short_lived_cache()).await;
    let org = app.create_org("acme").await;
    let kept = secret(app.create_token(&org, "kept", &[]).await);
    let uncached = secret(app.create_token(&org, "uncached", &[]).await);
    assert_eq!(forward(&app, Some(&kept), "").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let lock = TableLock::hold(&app, "credentials").await;
    let stale = forward(&app, Some(&kept), "").await;
    assert_eq!(stale.status(), 200, "the cached entry, stale");
    assert_eq!(forward(&app, Some(&uncached), "").await.status(), 503);
    lock.release().await;
}

/// A connection that goes silent in the middle of a verification's lookup (a failover with the
/// old primary gone without a word: PostgreSQL never sees the query, so its own timeouts cannot
/// end it): the lookup gives up, the cached entry answers stale and an uncached secret 503, and
/// the silent connections are let go rather than kept waiting in the pool, so other secrets
/// verify on new ones.
#[tokio::test]
async fn a_lookup_on_a_silent_connection_gives_up() {
    let config = short_lived_cache();
    let writer = TestApp::spawn_with(Backend::Postgres, config.clone()).await;
    let proxy = PgProxy::start(writer.database_url()).await;
    let app = writer.replica_at(&proxy.url, config).await;
    let org = writer.create_org("acme").await;
    let kept = secret(writer.create_token(&org, "kept", &[]).await);
    let uncached = secret(writer.create_token(&org, "uncached", &[]).await);
    let other = secret(writer.create_token(&org, "other", &[]).await);
    assert_eq!(forward(&app, Some(&kept), "").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let hash = |secret: &str| -> &'static [u8] {
        Box::leak(Box::new(*keyplane_core::TokenHash::of(secret).as_bytes()))
    };

    proxy.set(Mode::FreezeSending(hash(&kept)));
    assert_eq!(forward(&app, Some(&kept), "").await.status(), 200, "stale");
    // As many at once as verification has connections: each is lost to a silent lookup.
    proxy.set(Mode::FreezeSending(hash(&uncached)));
    let lookups = (0..4).map(|_| forward(&app, Some(&uncached), ""));
    for refused in futures::future::join_all(lookups).await {
        assert_eq!(refused.status(), 503);
    }
    assert_eq!(forward(&app, Some(&other), "").await.status(), 200);
    proxy.set(Mode::Forward);
}
