use keyplane_server::{ops, App, Config};
use keyplane_store::testing::{Backend, TestDatabase};
use keyplane_store::Store;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Emits one `#[tokio::test]` per backend for each listed `async fn case(Backend)`.
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test]
                async fn sqlite() {
                    super::$case(keyplane_store::testing::Backend::Sqlite).await
                }
                #[tokio::test]
                async fn postgres() {
                    super::$case(keyplane_store::testing::Backend::Postgres).await
                }
            }
        )*
    };
}
pub(crate) use both_backends;

/// A well-formed token of `kind` (real format and checksum) that names no credential.
pub fn unknown_token(kind: keyplane_core::CredentialKind) -> String {
    keyplane_core::token::mint(kind, &mut rand::rngs::OsRng)
        .plaintext
        .expose_secret()
        .to_string()
}

/// More rows than a streamed list reads at a time: two full pages and a partial one.
pub fn more_than_a_page() -> usize {
    2 * keyplane_server::streamed_list::LIST_PAGE_ROWS as usize + 200
}

/// The ids of seeded rows (as [`TestApp::import_credentials`] returns them) that `keep` picks by
/// whether each is revoked, in id order.
pub fn seeded_ids(seeded: &[(String, bool)], keep: impl Fn(bool) -> bool) -> Vec<String> {
    seeded
        .iter()
        .filter(|(_, revoked)| keep(*revoked))
        .map(|(id, _)| id.clone())
        .collect()
}

/// A list answered whole but written a page at a time: 200, JSON, chunked (no `Content-Length`),
/// and complete; its body.
pub async fn streamed_list(res: Response) -> Value {
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(
        res.headers().get("content-length"),
        None,
        "a long list is not held whole to be measured"
    );
    assert_eq!(res.headers()["transfer-encoding"], "chunked");
    let body = res.bytes().await.expect("the whole list");
    serde_json::from_slice(&body).expect("one JSON document")
}

/// The value of `series` (a metric's name and labels, as exposed: `name{label="value"}`) in a
/// `/metrics` exposition; a missing series fails the test.
pub fn sample(exposition: &str, series: &str) -> u64 {
    let prefix = format!("{series} ");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{exposition}"))
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// A 429's `Retry-After`, asserted to be whole seconds within a minute.
pub fn retry_after_secs(refused: &Response) -> u64 {
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    retry_after
}

/// Who the tests' admin use cases (`ops::create_org`, `ops::grant_as_operator`) record.
pub fn operator() -> keyplane_core::Operator {
    keyplane_core::Operator {
        os_user: "test".into(),
        name: None,
    }
}

/// The defaults tests run with: no rate limit (tests send bursts), fast `last_used_at` flushes.
pub fn test_config() -> Config {
    Config {
        rate_limit_per_minute: 0,
        last_used_flush_interval: Duration::from_millis(100),
        ..Config::default()
    }
}

pub struct TestApp {
    pub base: String,
    pub app: App,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    /// `serve`, ending after a stop.
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    db: std::sync::Arc<TestDatabase>,
    config: Config,
}

/// An organization and its `*` token, made by the code `admin create-org` runs.
pub struct Org {
    pub id: String,
    pub token: String,
}

impl Org {
    pub fn path(&self, rest: &str) -> String {
        format!("/api/v1/organizations/{}{rest}", self.id)
    }

    /// The same tenant as a Hybridbox account: `/v1/public/accounts/{account_id}/auth{rest}`.
    pub fn account_path(&self, rest: &str) -> String {
        format!("/v1/public/accounts/{}/auth{rest}", self.id)
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, test_config()).await
    }

    pub async fn spawn_with(backend: Backend, config: Config) -> Self {
        crate::logs::capture();
        let db = std::sync::Arc::new(TestDatabase::new(backend).await);
        Self::serve_on(db, config).await
    }

    /// Another server on the same database: a replica, with its own cache and connections.
    pub async fn replica(&self) -> Self {
        Self::serve_on(self.db.clone(), self.config.clone()).await
    }

    /// A server whose store is this test's database as `wrap` presents it (a fault injector).
    pub async fn spawn_wrapped(
        backend: Backend,
        config: Config,
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> Self {
        Self::spawn_opening(backend, config, async |url| {
            wrap(
                keyplane_store::connect(url)
                    .await
                    .expect("open the test store"),
            )
        })
        .await
    }

    /// A server whose store `open` opens from this test's database URL: a test that keeps a
    /// handle of the store's own type.
    pub async fn spawn_opening(
        backend: Backend,
        config: Config,
        open: impl AsyncFnOnce(&str) -> Arc<dyn Store>,
    ) -> Self {
        crate::logs::capture();
        let db = Arc::new(TestDatabase::new(backend).await);
        let store = open(&db.url).await;
        Self::serve_store(db, store, config).await
    }

    /// Another server on the same database, reaching it through `url` (a proxy in front of it).
    pub async fn replica_at(&self, url: &str, config: Config) -> Self {
        let store = keyplane_store::connect(url)
            .await
            .expect("open the test store through the given URL");
        Self::serve_store(self.db.clone(), store, config).await
    }

    /// The server's OpenAPI document (`GET /openapi.json`).
    pub async fn openapi(&self) -> Value {
        self.request(Method::GET, "/openapi.json", None)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// What `serve --database-url` is given for this test's database.
    pub fn database_url(&self) -> &str {
        &self.db.url
    }

    /// Runs `sql` on this test's database directly, as an operator (or a restore) would.
    pub async fn execute_sql(&self, sql: &str) {
        if self.database_url().starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(self.database_url())
                .await
                .unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        } else {
            let pool = sqlx::PgPool::connect(self.database_url()).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }

    /// Waits (at most 10 s) until `count` invalidation listeners are connected to this PostgreSQL
    /// database, so that a change made now reaches every replica. SQLite has none to wait for.
    pub async fn await_listeners(&self, count: i64) {
        if !self.db.url.starts_with("postgres") {
            return;
        }
        let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&self.db.url)
            .await
            .expect("connect to count the listeners");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE 'LISTEN %'",
            )
            .fetch_one(&mut db)
            .await
            .expect("count the listeners");
            if listening >= count {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{listening} of {count} invalidation listeners after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn serve_on(db: std::sync::Arc<TestDatabase>, config: Config) -> Self {
        let store = keyplane_store::connect(&db.url)
            .await
            .expect("open the test store");
        Self::serve_store(db, store, config).await
    }

    async fn serve_store(db: Arc<TestDatabase>, store: Arc<dyn Store>, config: Config) -> Self {
        let app = App::new(store, config.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, stop) = oneshot::channel::<()>();
        let served = tokio::spawn(keyplane_server::serve(listener, app.clone(), async move {
            let _ = stop.await;
        }));
        Self {
            base,
            app,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            shutdown: Some(shutdown),
            served: Some(served),
            db,
            config,
        }
    }

    pub async fn create_org(&self, name: &str) -> Org {
        let created = ops::create_org(self.app.store().as_ref(), name, &operator())
            .await
            .expect("create org");
        Org {
            id: created.tenant.id.to_string(),
            token: created.token.secret.expose_secret().to_string(),
        }
    }

    /// `count` credentials of `kind` imported into `org` at once, as a tenant that made (and
    /// revoked) many over the years has them; those `revoked(i)` picks are revoked. Their ids and
    /// whether each is revoked, in id order (the order lists answer them in).
    pub async fn import_credentials(
        &self,
        org: &Org,
        kind: keyplane_core::CredentialKind,
        count: usize,
        revoked: impl Fn(usize) -> bool,
    ) -> Vec<(String, bool)> {
        let tenant = keyplane_core::TenantId::from_uuid(org.id.parse().unwrap());
        let now = ops::now();
        let credentials: Vec<_> = (0..count)
            .map(|i| {
                let (mut credential, _) = keyplane_core::NewCredential {
                    tenant_id: tenant,
                    kind,
                    name: format!("bulk-{i:05}"),
                    scopes: keyplane_core::ScopeSet::empty(),
                    permissions: Vec::new(),
                    expires_at: None,
                    created_by: keyplane_core::CreatedBy::system(keyplane_core::Channel::Admin),
                    canary: false,
                }
                .issue(now, &mut rand::rngs::OsRng);
                if revoked(i) {
                    credential.revoked_at = Some(now);
                }
                credential
            })
            .collect();
        self.app
            .store()
            .import_credentials(&credentials, &[])
            .await
            .expect("import the credentials");
        let mut seeded: Vec<_> = credentials
            .iter()
            .map(|c| (c.id.to_string(), c.revoked_at.is_some()))
            .collect();
        seeded.sort();
        seeded
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let builder = self.client.request(method, format!("{}{path}", self.base));
        match token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// The `/metrics` exposition, as text.
    pub async fn metrics(&self) -> String {
        self.request(Method::GET, "/metrics", None)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of `series` (name and labels, as exposed) in `/metrics`.
    pub async fn metric(&self, series: &str) -> u64 {
        sample(&self.metrics().await, series)
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.request(Method::GET, path, Some(token))
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, path: &str, token: &str) -> Response {
        self.request(Method::DELETE, path, Some(token))
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.request(Method::POST, path, Some(token))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// A POST with no body at all (rotate endpoints take none).
    pub async fn post_empty(&self, path: &str, token: &str) -> Response {
        self.request(Method::POST, path, Some(token))
            .send()
            .await
            .unwrap()
    }

    /// Creates an API token in `org` with `scopes`, asserting 201; returns the response body.
    pub async fn create_token(&self, org: &Org, name: &str, scopes: &[&str]) -> Value {
        let res = self
            .post(
                &org.path("/api-tokens"),
                &org.token,
                serde_json::json!({ "name": name, "scopes": scopes }),
            )
            .await;
        assert_eq!(res.status(), 201, "creating token {name}");
        res.json().await.unwrap()
    }

    /// Creates a service account in `org` and grants it `capability`, asserting 201; returns its
    /// id, its secret and the grant's id.
    pub async fn service_account_with_grant(
        &self,
        org: &Org,
        capability: &str,
    ) -> (String, String, String) {
        let res = self
            .post(
                &org.account_path("/service-accounts"),
                &org.token,
                serde_json::json!({"name": "svc"}),
            )
            .await;
        assert_eq!(res.status(), 201, "creating a service account");
        let sa: Value = res.json().await.unwrap();
        let id = sa["id"].as_str().unwrap().to_string();
        let grant = self
            .post(
                &org.account_path("/authorizations"),
                &org.token,
                serde_json::json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": id, "capability_key": capability}),
            )
            .await;
        assert_eq!(grant.status(), 201, "granting {capability}");
        let grant: Value = grant.json().await.unwrap();
        (
            id,
            sa["token"].as_str().unwrap().to_string(),
            grant["id"].as_str().unwrap().to_string(),
        )
    }

    /// Revokes the grant `grant_id` of `org`, asserting 200.
    pub async fn revoke_grant(&self, org: &Org, grant_id: &str) {
        let res = self
            .delete(
                &org.account_path(&format!("/authorizations/{grant_id}")),
                &org.token,
            )
            .await;
        assert_eq!(res.status(), 200, "revoking grant {grant_id}");
    }

    /// `org`'s audit events with `action` (or a `prefix.*`), newest first as the API lists them,
    /// asserting 200: the one way tests read the trail, so a failed listing is never read as empty.
    pub async fn audit_events(&self, org: &Org, action: &str) -> Vec<Value> {
        let res = self
            .get(
                &org.path(&format!("/audit-events?action={action}&limit=100")),
                &org.token,
            )
            .await;
        let status = res.status();
        let body = res.text().await.unwrap();
        assert_eq!(status, 200, "listing {action} audit events: {body}");
        let page: Value = serde_json::from_str(&body).expect("audit events are JSON");
        page["items"]
            .as_array()
            .unwrap_or_else(|| panic!("items in {page}"))
            .clone()
    }
}

impl TestApp {
    /// Stops the server as a signal does, and returns once `serve` has ended (its drains and
    /// last writes done).
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(served) = self.served.take() {
            served
                .await
                .expect("serve ends without a panic")
                .expect("serve ends cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Asserts the Aether error envelope and returns its `details` (empty if absent).
pub async fn assert_error(res: Response, status: u16, code: &str) -> Vec<Value> {
    assert_eq!(res.status(), status, "status");
    let body: Value = res.json().await.expect("error body is JSON");
    assert_eq!(body["error"]["code"], code, "error code in {body}");
    assert!(body["error"]["message"].is_string(), "message in {body}");
    body["error"]["details"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The `(field, code)` pairs of an error's details.
pub fn fields(details: &[Value]) -> Vec<(String, String)> {
    details
        .iter()
        .map(|d| {
            assert!(d["message"].is_string());
            (
                d["field"].as_str().unwrap().to_string(),
                d["code"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits (bounded) until `check` holds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}
