//! Leaked-token response: GitHub's secret-scanning partner endpoint (signed reports, verified with
//! keys from a keys document this test serves on 127.0.0.1) and the public revocation endpoint.

use crate::helpers::{both_backends, eventually, test_config, unknown_token, Org, TestApp};
use data_encoding::BASE64;
use keyplane_core::CredentialKind;
use keyplane_server::Config;
use keyplane_store::testing::{hold_verification_readers, Backend, VerificationReaders};
use keyplane_store::{PostgresStore, SqliteStore};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

both_backends!(
    a_canary_reported_by_github_is_recorded_and_left_armed,
    a_canary_in_a_report_worked_off_again_after_a_lost_acknowledgement_is_recorded_once,
    a_canary_in_a_report_worked_off_by_the_next_server_is_recorded_once,
    a_canary_in_a_github_report_delivered_again_is_recorded_once,
    a_leaked_service_accounts_grants_are_revoked_on_the_record,
    a_report_overtaken_by_a_rotation_leaves_the_new_secret_alone,
    a_previous_secret_past_its_grace_is_not_the_credential,
    a_suspend_policy_suspends_leaked_credentials_instead,
    github_report_revokes_real_credentials_and_labels_every_match,
    github_refuses_unsigned_and_badly_signed_reports,
    leak_reports_take_no_verification_connection,
    public_revoke_kills_tokens_and_answers_the_same_for_anything,
);

const GITHUB_ROUTE: &str = "/v1/secret-scanning/github";
const REVOKE_ROUTE: &str = "/v1/credentials/revoke";

/// `keyplane_leaked_tokens_total` for reports from `source` answered by `outcome`.
async fn leaked_tokens(app: &TestApp, source: &str, outcome: &str) -> u64 {
    app.metric(&format!(
        r#"keyplane_leaked_tokens_total{{source="{source}",outcome="{outcome}"}}"#
    ))
    .await
}

/// `keyplane_public_revoke_reports_total` of `outcome`.
async fn public_reports(app: &TestApp, outcome: &str) -> u64 {
    app.metric(&format!(
        r#"keyplane_public_revoke_reports_total{{outcome="{outcome}"}}"#
    ))
    .await
}

/// A keys document in GitHub's shape, served on 127.0.0.1, counting its fetches. Like GitHub's
/// API, it refuses a request that does not say who sends it (`User-Agent`): 403.
struct KeysServer {
    url: String,
    document: Arc<RwLock<Value>>,
    hits: Arc<AtomicUsize>,
}

impl KeysServer {
    async fn start(document: Value) -> Self {
        let document = Arc::new(RwLock::new(document));
        let hits = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (document.clone(), hits.clone());
        let router = axum::Router::new().route(
            "/meta/public_keys/secret_scanning",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let (served, counted) = (served.clone(), counted.clone());
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let agent = headers
                        .get(axum::http::header::USER_AGENT)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    if !agent.starts_with("keyplane/") {
                        return Err(axum::http::StatusCode::FORBIDDEN);
                    }
                    Ok(axum::Json(served.read().unwrap().clone()))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/meta/public_keys/secret_scanning",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            url,
            document,
            hits,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.document.write().unwrap() = document(keys);
    }
}

/// A P-256 key pair made by the test, with the identifier it is published under.
struct TestKey {
    id: String,
    signing: SigningKey,
}

impl TestKey {
    fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            signing: SigningKey::random(&mut rand::rngs::OsRng),
        }
    }

    fn pem(&self) -> String {
        self.signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    /// `GITHUB-PUBLIC-KEY-SIGNATURE` of `body`: base64 DER, as GitHub sends it.
    fn sign(&self, body: &[u8]) -> String {
        let signature: Signature = self.signing.sign(body);
        BASE64.encode(signature.to_der().as_bytes())
    }
}

fn document(keys: &[&TestKey]) -> Value {
    json!({
        "public_keys": keys
            .iter()
            .map(|k| json!({"key_identifier": k.id, "key": k.pem(), "is_current": true}))
            .collect::<Vec<_>>()
    })
}

fn config_with_keys(url: &str) -> Config {
    let mut config = test_config();
    config.github_keys.url = url.into();
    config
}

/// Posts `body` as GitHub would, with the given identifier and signature headers (each optional).
async fn post_github(
    app: &TestApp,
    body: &[u8],
    key_id: Option<&str>,
    signature: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .request(Method::POST, GITHUB_ROUTE, None)
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(key_id) = key_id {
        request = request.header("GITHUB-PUBLIC-KEY-IDENTIFIER", key_id);
    }
    if let Some(signature) = signature {
        request = request.header("GITHUB-PUBLIC-KEY-SIGNATURE", signature);
    }
    request.send().await.unwrap()
}

async fn post_signed(app: &TestApp, key: &TestKey, body: &[u8]) -> reqwest::Response {
    post_github(app, body, Some(&key.id), Some(&key.sign(body))).await
}

/// `body` validly signed by `key`, but naming a made-up identifier (anyone can send this).
async fn post_made_up_key(
    app: &TestApp,
    key: &TestKey,
    body: &[u8],
    n: usize,
) -> reqwest::Response {
    let key_id = format!("made-up-{n}");
    post_github(app, body, Some(&key_id), Some(&key.sign(body))).await
}

fn matches_body(tokens: &[(&str, &str)]) -> Vec<u8> {
    let matches: Vec<Value> = tokens
        .iter()
        .map(|(token, token_type)| {
            json!({
                "token": token,
                "type": token_type,
                "url": "https://github.com/octo/leaky/blob/abc123/config.yml",
                "source": "content",
            })
        })
        .collect();
    serde_json::to_vec(&matches).unwrap()
}

/// A keyplane token with its last checksum digit changed.
fn wrong_checksum(token: &str) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let last = bytes.len() - 1;
    bytes[last] = if bytes[last] == b'0' { b'1' } else { b'0' };
    String::from_utf8(bytes).unwrap()
}

/// Live credentials of all three kinds in `org`: (API token, service account token, robot secret).
async fn three_credentials(app: &TestApp, org: &Org) -> (String, String, String) {
    let api = app.create_token(org, "leaky", &["api_tokens:read"]).await;
    let res = app
        .post(
            &org.account_path("/service-accounts"),
            &org.token,
            json!({"name": "leaky-sa"}),
        )
        .await;
    assert_eq!(res.status(), 201, "creating a service account");
    let sa: Value = res.json().await.unwrap();
    let res = app
        .request(Method::POST, &org.path("/registry"), Some(&org.token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "enabling the registry");
    let registry: Value = res.json().await.unwrap();
    (
        api["token"].as_str().unwrap().to_string(),
        sa["token"].as_str().unwrap().to_string(),
        registry["credentials"]["password"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

async fn whoami_status(app: &TestApp, token: &str) -> u16 {
    app.get("/v1/whoami", token).await.status().as_u16()
}

async fn robot_login_status(app: &TestApp, project: &str, secret: &str) -> u16 {
    app.request(Method::GET, "/registry/token", None)
        .basic_auth(format!("robot${project}+default"), Some(secret))
        .query(&[("service", "keyplane-registry")])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn event_count(app: &TestApp, org: &Org) -> usize {
    let res = app
        .get(&org.path("/audit-events?limit=100"), &org.token)
        .await;
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    page["items"].as_array().unwrap().len()
}

async fn assert_oauth_error(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status(), status, "status");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], code, "error code in {body}");
    assert!(body["error_description"].is_string(), "{body}");
    body
}

/// GitHub's own worked example (docs, partner program: Python validation sample) verifies with
/// the key it was made with, through the endpoint; one added byte makes it a 401.
#[tokio::test]
async fn github_documentation_vector_verifies() {
    let vector: Value = serde_json::from_str(include_str!(
        "../fixtures/github-secret-scanning-vector.json"
    ))
    .unwrap();
    let keys = KeysServer::start(vector["public_keys_document"].clone()).await;
    let app = TestApp::spawn_with(Backend::Sqlite, config_with_keys(&keys.url)).await;
    let body = vector["body"].as_str().unwrap().as_bytes();
    let key_id = vector["headers"]["GITHUB-PUBLIC-KEY-IDENTIFIER"]
        .as_str()
        .unwrap();
    let signature = vector["headers"]["GITHUB-PUBLIC-KEY-SIGNATURE"]
        .as_str()
        .unwrap();

    let res = post_github(&app, body, Some(key_id), Some(signature)).await;
    assert_eq!(res.status(), 200, "GitHub's example verifies");
    let feedback: Value = res.json().await.unwrap();
    assert_eq!(
        feedback,
        json!([{"token_raw": "some_token", "token_type": "some_type", "label": "false_positive"}])
    );

    let mut altered = body.to_vec();
    altered.push(b' ');
    let res = post_github(&app, &altered, Some(key_id), Some(signature)).await;
    assert_oauth_error(res, 401, "invalid_token").await;
    assert_eq!(keys.hits(), 1, "the keys were fetched once and cached");
}

async fn github_report_revokes_real_credentials_and_labels_every_match(backend: Backend) {
    let key = TestKey::new("test-key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let app = TestApp::spawn_with(backend, config_with_keys(&keys.url)).await;
    let org = app.create_org("acme").await;
    let (api, sa, robot) = three_credentials(&app, &org).await;
    assert_eq!(whoami_status(&app, &api).await, 200);
    assert_eq!(whoami_status(&app, &sa).await, 200);
    assert_eq!(robot_login_status(&app, "acme", &robot).await, 200);
    let bystander = app.create_token(&org, "bystander", &[]).await;
    let bystander = bystander["token"].as_str().unwrap();

    let bad_checksum = wrong_checksum(&api);
    let unknown = unknown_token(CredentialKind::ApiToken);
    let body = matches_body(&[
        (&api, "keyplane_api_token"),
        (&sa, "keyplane_service_account_token"),
        (&robot, "keyplane_robot_secret"),
        (&bad_checksum, "keyplane_api_token"),
        (&unknown, "keyplane_api_token"),
        ("aether_not_a_token", "keyplane_api_token"),
    ]);
    let res = post_signed(&app, &key, &body).await;
    assert_eq!(res.status(), 200);
    let feedback: Value = res.json().await.unwrap();
    let labels: Vec<(&str, &str, &str)> = feedback
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["token_raw"].as_str().unwrap(),
                f["token_type"].as_str().unwrap(),
                f["label"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        labels,
        vec![
            (api.as_str(), "keyplane_api_token", "true_positive"),
            (
                sa.as_str(),
                "keyplane_service_account_token",
                "true_positive"
            ),
            (robot.as_str(), "keyplane_robot_secret", "true_positive"),
            (
                bad_checksum.as_str(),
                "keyplane_api_token",
                "false_positive"
            ),
            (unknown.as_str(), "keyplane_api_token", "false_positive"),
            ("aether_not_a_token", "keyplane_api_token", "false_positive"),
        ]
    );

    // Counted by what was done with each well-formed token; the malformed ones were never looked
    // up.
    let github = "github_secret_scanning";
    assert_eq!(leaked_tokens(&app, github, "revoked").await, 3);
    assert_eq!(leaked_tokens(&app, github, "unchanged").await, 1);
    assert_eq!(leaked_tokens(&app, github, "suspended").await, 0);
    assert_eq!(leaked_tokens(&app, "public_revoke", "revoked").await, 0);

    // All three kinds are dead at once; the organization's other token is not.
    assert_eq!(whoami_status(&app, &api).await, 401);
    assert_eq!(whoami_status(&app, &sa).await, 401);
    assert_eq!(robot_login_status(&app, "acme", &robot).await, 401);
    assert_eq!(whoami_status(&app, bystander).await, 200);

    // One credential.leaked per credential: where it was found and by whom.
    let events = app.audit_events(&org, "credential.leaked").await;
    assert_eq!(events.len(), 3, "{events:?}");
    let mut targets: Vec<&str> = events
        .iter()
        .map(|e| e["target"]["type"].as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(targets, ["api_token", "robot_account", "service_account"]);
    for event in &events {
        assert_eq!(event["actor"]["type"], "system", "{event}");
        assert_eq!(event["outcome"], "success");
        assert_eq!(event["client_ip"], "127.0.0.1");
        let details = &event["details"];
        assert_eq!(details["source"], "github_secret_scanning", "{event}");
        assert_eq!(details["reported_by"], "github");
        assert_eq!(details["response"], "revoked");
        assert_eq!(
            details["url"],
            "https://github.com/octo/leaky/blob/abc123/config.yml"
        );
        assert_eq!(details["found_in"], "content");
        assert!(details["token_type"]
            .as_str()
            .unwrap()
            .starts_with("keyplane_"));
        let text = event.to_string();
        for secret in [&api, &sa, &robot] {
            assert!(!text.contains(secret.as_str()), "no secret in {text}");
        }
    }
    // GitHub reports the same tokens again (a rescan, a fork): still true positives, nothing new
    // is recorded.
    let before = event_count(&app, &org).await;
    let res = post_signed(&app, &key, &matches_body(&[(&api, "keyplane_api_token")])).await;
    assert_eq!(res.status(), 200);
    let feedback: Value = res.json().await.unwrap();
    assert_eq!(feedback[0]["label"], "true_positive");
    assert_eq!(event_count(&app, &org).await, before);
    assert_eq!(leaked_tokens(&app, github, "unchanged").await, 2);
    assert_eq!(leaked_tokens(&app, github, "revoked").await, 3);

    // Reported tokens, real or not, never reach the log (trace level, everything captured).
    let logged = crate::logs::captured();
    for token in [&api, &sa, &robot, &bad_checksum, &unknown] {
        assert!(
            !logged.contains(token.as_str()),
            "a reported token was logged"
        );
    }
}

async fn github_refuses_unsigned_and_badly_signed_reports(backend: Backend) {
    let key = TestKey::new("test-key-1");
    let impostor = TestKey::new("test-key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let app = TestApp::spawn_with(backend, config_with_keys(&keys.url)).await;
    let org = app.create_org("acme").await;
    let api = app.create_token(&org, "leaky", &[]).await;
    let api = api["token"].as_str().unwrap();
    let before = event_count(&app, &org).await;
    let body = matches_body(&[(api, "keyplane_api_token")]);
    let good_signature = key.sign(&body);
    let mut tampered = body.clone();
    tampered.insert(1, b' ');

    let refused: Vec<(&str, reqwest::Response)> = vec![
        ("no headers", post_github(&app, &body, None, None).await),
        (
            "no signature",
            post_github(&app, &body, Some(&key.id), None).await,
        ),
        (
            "no key identifier",
            post_github(&app, &body, None, Some(&good_signature)).await,
        ),
        (
            "signed by another key under the same identifier",
            post_signed(&app, &impostor, &body).await,
        ),
        (
            "body changed after signing",
            post_github(&app, &tampered, Some(&key.id), Some(&good_signature)).await,
        ),
        (
            "signature not base64",
            post_github(&app, &body, Some(&key.id), Some("%%%not base64%%%")).await,
        ),
        (
            "signature not DER",
            post_github(&app, &body, Some(&key.id), Some(&BASE64.encode(b"garbage"))).await,
        ),
        (
            "unknown key identifier",
            post_github(&app, &body, Some("no-such-key"), Some(&good_signature)).await,
        ),
    ];
    for (what, res) in refused {
        assert_eq!(res.status(), 401, "{what}");
        // GitHub signs the body: a challenge would ask for a credential it never sends.
        assert!(
            res.headers().get("www-authenticate").is_none(),
            "{what}: 401 without a challenge"
        );
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "invalid_token", "{what}: {body}");
    }
    // Nothing changed: the token works and no event was written.
    assert_eq!(whoami_status(&app, api).await, 200);
    assert_eq!(event_count(&app, &org).await, before);

    // Signed but not an array of matches: 400, after the signature was checked.
    let not_matches = br#"{"token": "x"}"#;
    let res = post_signed(&app, &key, not_matches).await;
    assert_oauth_error(res, 400, "invalid_request").await;
    assert_eq!(whoami_status(&app, api).await, 200);
}

/// An identifier the cached document lacks refetches it (GitHub added a key), at most once per
/// `unknown_key_refresh_interval` however many requests name unknown identifiers.
#[tokio::test]
async fn github_unknown_key_refetches_the_keys_at_a_bounded_rate() {
    let first = TestKey::new("key-1");
    let second = TestKey::new("key-2");
    let keys = KeysServer::start(document(&[&first])).await;
    let interval = Duration::from_millis(500);
    let mut config = config_with_keys(&keys.url);
    config.github_keys.unknown_key_refresh_interval = interval;
    let app = TestApp::spawn_with(Backend::Sqlite, config).await;
    let body = matches_body(&[("aether_nothing", "keyplane_api_token")]);

    assert_eq!(post_signed(&app, &first, &body).await.status(), 200);
    assert_eq!(keys.hits(), 1);

    // A flood of unknown identifiers: 401s, and at most one fetch per interval.
    let started = Instant::now();
    for n in 0..30 {
        let res = post_made_up_key(&app, &first, &body, n).await;
        assert_eq!(res.status(), 401);
    }
    let elapsed = started.elapsed();
    let allowed = 1 + (elapsed.as_millis() / interval.as_millis()) as usize + 1;
    assert!(
        keys.hits() <= allowed,
        "{} fetches for 30 unknown identifiers in {elapsed:?}",
        keys.hits()
    );

    // GitHub publishes a new key: once the interval has passed, a request signed with it
    // refetches the document and verifies.
    keys.publish(&[&first, &second]);
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    let hits = keys.hits();
    assert_eq!(post_signed(&app, &second, &body).await.status(), 200);
    assert_eq!(keys.hits(), hits + 1, "one refetch for the new key");
    assert_eq!(post_signed(&app, &first, &body).await.status(), 200);
    assert_eq!(keys.hits(), hits + 1, "known keys come from the cache");
}

/// Once keys are loaded, made-up identifiers (anyone can send them, with any well-formed
/// signature) refetch GitHub's keys document at most once per 5 minutes, not at the pace of the
/// retry a failed first load gets: GitHub allows 60 unauthenticated calls an hour. They answer
/// 401, also when GitHub stops answering.
#[tokio::test]
async fn github_made_up_key_identifiers_do_not_spend_githubs_quota() {
    let key = TestKey::new("key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let mut config = config_with_keys(&keys.url);
    // The retry before any key is loaded, short here; the refetch for unknown identifiers is
    // left at its default.
    config.github_keys.min_refresh_interval = Duration::from_millis(100);
    let app = TestApp::spawn_with(Backend::Sqlite, config).await;
    let body = matches_body(&[("aether_nothing", "keyplane_api_token")]);
    assert_eq!(post_signed(&app, &key, &body).await.status(), 200);
    assert_eq!(keys.hits(), 1, "the first report loads the keys");

    for n in 0..20 {
        if n == 10 {
            // GitHub stops answering: still 401, not a server error.
            *keys.document.write().unwrap() = json!({"public_keys": []});
        }
        let res = post_made_up_key(&app, &key, &body, n).await;
        assert_oauth_error(res, 401, "invalid_token").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        keys.hits() <= 2,
        "{} fetches for 20 made-up identifiers within a second",
        keys.hits() - 1
    );
    assert_eq!(post_signed(&app, &key, &body).await.status(), 200);
}

/// The keys document cannot be fetched and no keys were ever loaded: nothing can be verified, and
/// the answer says so with a 503 and `Retry-After` (GitHub retries) instead of calling GitHub's
/// report forged.
#[tokio::test]
async fn github_report_without_reachable_keys_is_unavailable() {
    let key = TestKey::new("key-1");
    // A port nothing listens on: bind, note it, close.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        config_with_keys(&format!("http://{closed}/keys")),
    )
    .await;
    let body = matches_body(&[("aether_nothing", "keyplane_api_token")]);
    let res = post_signed(&app, &key, &body).await;
    let retry_after = &res.headers()["retry-after"];
    assert!(
        (1..=10).contains(&retry_after.to_str().unwrap().parse::<u64>().unwrap()),
        "Retry-After {retry_after:?}"
    );
    assert_oauth_error(res, 503, "temporarily_unavailable").await;
}

/// Leak reports look credentials up on the general readers: with every verification connection
/// taken (an uncached secret meanwhile cannot verify: 503), a GitHub report is still answered,
/// labelling and revoking what it names, and a public report is worked off.
async fn leak_reports_take_no_verification_connection(backend: Backend) {
    match backend {
        Backend::Sqlite => reports_with_verification_held(backend, SqliteStore::connect).await,
        Backend::Postgres => reports_with_verification_held(backend, PostgresStore::connect).await,
    }
}

async fn reports_with_verification_held<S>(
    backend: Backend,
    connect: impl AsyncFnOnce(&str) -> Result<S, keyplane_store::StoreError>,
) where
    S: keyplane_store::Store + VerificationReaders + 'static,
{
    let key = TestKey::new("test-key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let mut opened = None;
    let app = TestApp::spawn_opening(backend, config_with_keys(&keys.url), async |url| {
        let store = Arc::new(connect(url).await.expect("open the test store"));
        opened = Some(store.clone());
        store as Arc<dyn keyplane_store::Store>
    })
    .await;
    let store = opened.expect("the store was opened");
    let org = app.create_org("acme").await;
    let (api, sa, robot) = three_credentials(&app, &org).await;
    let uncached = app.create_token(&org, "uncached", &[]).await;
    let uncached = uncached["token"].as_str().unwrap();

    let held = hold_verification_readers(store.as_ref()).await;
    assert_eq!(whoami_status(&app, uncached).await, 503, "no verification");
    let body = matches_body(&[
        (&api, "keyplane_api_token"),
        (&robot, "keyplane_robot_secret"),
    ]);
    let res = post_signed(&app, &key, &body).await;
    assert_eq!(res.status(), 200);
    let feedback: Value = res.json().await.unwrap();
    let labels: Vec<&Value> = feedback
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["label"])
        .collect();
    assert_eq!(labels, [&json!("true_positive"), &json!("true_positive")]);
    assert_eq!(
        revoke(&app, json!({ "credentials": [sa] })).await.status(),
        202
    );
    eventually("the public report is worked off", || async {
        leaked_tokens(&app, "public_revoke", "revoked").await == 1
    })
    .await;
    drop(held);

    assert_eq!(whoami_status(&app, &api).await, 401);
    assert_eq!(whoami_status(&app, &sa).await, 401);
    assert_eq!(robot_login_status(&app, "acme", &robot).await, 401);
    assert_eq!(whoami_status(&app, uncached).await, 200);
}

async fn revoke(app: &TestApp, body: Value) -> reqwest::Response {
    app.request(Method::POST, REVOKE_ROUTE, None)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn public_revoke_kills_tokens_and_answers_the_same_for_anything(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (api, sa, robot) = three_credentials(&app, &org).await;
    let bystander = app.create_token(&org, "bystander", &[]).await;
    let bystander = bystander["token"].as_str().unwrap();

    // Four lists of the same shape: real tokens, unknown well-formed ones, wrong checksums, and
    // a mix. The answers are identical.
    let lists = [
        vec![api.clone(), sa.clone(), "not a token".into()],
        vec![
            unknown_token(CredentialKind::ApiToken),
            unknown_token(CredentialKind::ServiceAccount),
            "not a token".into(),
        ],
        vec![
            unknown_token(CredentialKind::RobotAccount),
            unknown_token(CredentialKind::ApiToken),
            wrong_checksum(&robot),
        ],
    ];
    let mut answers = Vec::new();
    for list in &lists {
        let res = revoke(&app, json!({ "credentials": list })).await;
        answers.push((res.status().as_u16(), res.text().await.unwrap()));
    }
    assert_eq!(answers[0].0, 202);
    let expected: Value = json!({"received": 3, "well_formed": 2});
    for (status, body) in &answers {
        assert_eq!(*status, 202);
        assert_eq!(serde_json::from_str::<Value>(body).unwrap(), expected);
    }

    // The real ones die within moments; the wrong-checksum robot secret never reached the store.
    eventually("the reported tokens are revoked", || async {
        whoami_status(&app, &api).await == 401 && whoami_status(&app, &sa).await == 401
    })
    .await;
    assert_eq!(robot_login_status(&app, "acme", &robot).await, 200);
    assert_eq!(whoami_status(&app, bystander).await, 200);
    // Each list had a well-formed token: each was stored. The unknown tokens are counted once
    // their reports are worked off.
    assert_eq!(public_reports(&app, "stored").await, 3);
    assert_eq!(public_reports(&app, "no_token").await, 0);
    eventually("every reported token is counted", || async {
        leaked_tokens(&app, "public_revoke", "unchanged").await == 4
            && leaked_tokens(&app, "public_revoke", "revoked").await == 2
    })
    .await;

    let events = app.audit_events(&org, "credential.leaked").await;
    assert_eq!(events.len(), 2, "{events:?}");
    for event in &events {
        assert_eq!(event["actor"]["type"], "system");
        assert_eq!(event["client_ip"], "127.0.0.1", "the reporter's address");
        assert_eq!(event["details"]["source"], "public_revoke");
        assert_eq!(event["details"]["reported_by"], "anonymous");
        assert_eq!(event["details"]["response"], "revoked");
        assert!(event["details"].get("url").is_none());
    }

    // Reporting the robot secret itself kills it; reporting dead tokens again records nothing.
    let res = revoke(&app, json!({ "credentials": [robot, api] })).await;
    assert_eq!(res.status(), 202);
    eventually("the robot secret is revoked", || async {
        robot_login_status(&app, "acme", &robot).await == 401
    })
    .await;
    let leaked = app.audit_events(&org, "credential.leaked").await;
    assert_eq!(leaked.len(), 3, "{leaked:#?}");
    assert_eq!(public_reports(&app, "stored").await, 4);
    eventually(
        "the robot secret and the dead token reported again are counted",
        || async {
            leaked_tokens(&app, "public_revoke", "unchanged").await == 5
                && leaked_tokens(&app, "public_revoke", "revoked").await == 3
        },
    )
    .await;

    let logged = crate::logs::captured();
    let reported = lists.iter().flatten().chain(std::iter::once(&robot));
    for token in reported.filter(|t| t.len() > 40) {
        assert!(
            !logged.contains(token.as_str()),
            "a reported token was logged"
        );
    }
}

/// A leaked service account is revoked with its grants, and each grant's revocation is recorded
/// as the leak's is: by the system, with the reporter's address.
async fn a_leaked_service_accounts_grants_are_revoked_on_the_record(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let (sa_id, secret, grant_id) = app.service_account_with_grant(&org, "deploy").await;
    let res = revoke(&app, json!({ "credentials": [secret] })).await;
    assert_eq!(res.status(), 202);
    eventually("the leaked service account is revoked", || async {
        whoami_status(&app, &secret).await == 401
    })
    .await;
    let events = app.audit_events(&org, "authorization.revoked").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event["target"]["id"], grant_id.as_str());
    assert_eq!(event["details"]["subject_id"], sa_id.as_str());
    assert_eq!(event["actor"]["type"], "system");
    assert_eq!(event["client_ip"], "127.0.0.1", "the reporter's address");
}

/// An API token named `name`, rotated with `grace_seconds` of overlap: its id, its previous
/// secret and its current one.
async fn rotated_with_grace(
    app: &TestApp,
    org: &Org,
    name: &str,
    grace_seconds: u64,
) -> (String, String, String) {
    let created = app.create_token(org, name, &[]).await;
    let (id, old) = (
        created["id"].as_str().unwrap().to_string(),
        created["token"].as_str().unwrap().to_string(),
    );
    let res = app
        .post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({ "grace_seconds": grace_seconds }),
        )
        .await;
    assert_eq!(res.status(), 200, "rotating {name}");
    let rotated: Value = res.json().await.unwrap();
    let new = rotated["token"].as_str().unwrap().to_string();
    (id, old, new)
}

/// `on_leak: suspend` in the tenant's credential policy: a leak suspends (reversibly) instead of
/// revoking, once; resuming brings the credential back; a previous secret within a rotation's
/// grace period counts as the credential.
async fn a_suspend_policy_suspends_leaked_credentials_instead(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let res = app
        .request(
            Method::PUT,
            &org.path("/credential-policy"),
            Some(&org.token),
        )
        .json(&json!({"on_leak": "suspend"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (id, old, new) = rotated_with_grace(&app, &org, "leaky", 3600).await;
    // The old secret, still valid in its grace period, turns up in public.
    assert_eq!(
        revoke(&app, json!({ "credentials": [old] })).await.status(),
        202
    );
    eventually("the leaked credential is suspended", || async {
        whoami_status(&app, &new).await == 401
    })
    .await;
    let view: Value = app
        .get(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        view["suspended_at"].is_string(),
        "suspended, not revoked: {view}"
    );
    // Reported again: already handled, nothing more recorded.
    assert_eq!(
        revoke(&app, json!({ "credentials": [new] })).await.status(),
        202
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let events = app.audit_events(&org, "credential.leaked").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["details"]["response"], "suspended");
    eventually("both reports are counted", || async {
        leaked_tokens(&app, "public_revoke", "suspended").await == 1
            && leaked_tokens(&app, "public_revoke", "unchanged").await == 1
    })
    .await;
    // A human looked, retired the leaked old secret and resumed: the new secret works again.
    for step in ["retire-previous", "resume"] {
        let res = app
            .post_empty(&org.path(&format!("/api-tokens/{id}/{step}")), &org.token)
            .await;
        assert_eq!(res.status(), 200, "{step}");
    }
    assert_eq!(whoami_status(&app, &new).await, 200);
    assert_eq!(whoami_status(&app, &old).await, 401);
}

/// A previous secret whose grace period is over no longer is the credential: reported, it is a
/// false positive, and the live secret is left alone.
async fn a_previous_secret_past_its_grace_is_not_the_credential(backend: Backend) {
    let key = TestKey::new("test-key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let config = config_with_keys(&keys.url);
    let clock = config.clock.clone();
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let (_, old, new) = rotated_with_grace(&app, &org, "rotated", 60).await;
    clock.advance(std::time::Duration::from_secs(61));
    assert_eq!(whoami_status(&app, &old).await, 401, "the grace is over");

    let res = post_signed(&app, &key, &matches_body(&[(&old, "keyplane_api_token")])).await;
    assert_eq!(res.status(), 200);
    let feedback: Value = res.json().await.unwrap();
    assert_eq!(feedback[0]["label"], "false_positive", "{feedback}");
    assert_eq!(whoami_status(&app, &new).await, 200);
    assert!(app.audit_events(&org, "credential.leaked").await.is_empty());
}

/// A report acts only while the reported secret still is the credential's: rotated without grace
/// (as an owner answering the leak would) between the report's lookup and its write, the new
/// secret never leaked, keeps working, and nothing is recorded as leaked.
async fn a_report_overtaken_by_a_rotation_leaves_the_new_secret_alone(backend: Backend) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, test_config()).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "leaky", &[]).await;
    let (id, old) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );

    let mut before = store.hold_before_next_revoke();
    assert_eq!(
        revoke(&app, json!({ "credentials": [old] })).await.status(),
        202
    );
    // The report has found the credential by the old secret and is about to revoke it.
    before.reached().await;
    let res = app
        .post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({}),
        )
        .await;
    assert_eq!(res.status(), 200, "rotating without grace");
    let rotated: Value = res.json().await.unwrap();
    let new = rotated["token"].as_str().unwrap();
    let mut after = store.hold_after_next_revoke();
    before.release();
    // The report's write has been made (or refused) once it is held after the store.
    after.reached().await;
    after.release();

    assert_eq!(whoami_status(&app, new).await, 200, "the new secret works");
    assert_eq!(whoami_status(&app, old).await, 401);
    let view: Value = app
        .get(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert!(view["revoked_at"].is_null(), "not revoked: {view}");
    assert!(app.audit_events(&org, "credential.leaked").await.is_empty());
    assert!(app.audit_events(&org, "api_token.revoked").await.is_empty());
}

#[tokio::test]
async fn public_revoke_validates_its_body() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let token = unknown_token(CredentialKind::ApiToken);
    let too_many: Vec<String> = (0..101).map(|_| token.clone()).collect();
    let at_most: Vec<String> = (0..100).map(|_| token.clone()).collect();
    for (what, body) in [
        ("empty list", json!({"credentials": []})),
        ("over 100", json!({ "credentials": too_many })),
        ("missing", json!({})),
        ("not strings", json!({"credentials": [1, 2]})),
        (
            "unknown field",
            json!({"credentials": [token], "reason": "x"}),
        ),
        ("not an object", json!([token])),
    ] {
        let res = revoke(&app, body).await;
        assert_oauth_error(res, 400, "invalid_request").await;
        let _ = what;
    }
    let res = revoke(&app, json!({ "credentials": at_most })).await;
    assert_eq!(res.status(), 202, "100 is allowed");
    let res = app
        .request(Method::POST, REVOKE_ROUTE, None)
        .header("content-type", "text/plain")
        .body(format!("credentials={token}"))
        .send()
        .await
        .unwrap();
    assert_oauth_error(res, 415, "invalid_request").await;
}

#[tokio::test]
async fn public_revoke_is_limited_per_address() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Config {
            public_revoke_per_minute: 3,
            ..test_config()
        },
    )
    .await;
    let body = json!({"credentials": ["nothing"]});
    for n in 0..3 {
        assert_eq!(
            revoke(&app, body.clone()).await.status(),
            202,
            "request {n}"
        );
    }
    let res = revoke(&app, body).await;
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_oauth_error(res, 429, "rate_limited").await;
    // No token in them: nothing stored. The refused one is in `keyplane_http_requests_total`
    // (429), not here: its body was never read.
    assert_eq!(public_reports(&app, "no_token").await, 3);
    assert_eq!(public_reports(&app, "stored").await, 0);
    // The limit is the public endpoint's own: verification is not affected.
    let org = app.create_org("acme").await;
    assert_eq!(whoami_status(&app, &org.token).await, 200);
}

/// Many addresses are cheap (an IPv6 /48 holds 65,536 /64s), and every stored report costs the
/// store's writers, which all organizations' changes share: past the server's budget of reports
/// per minute, all addresses together, a report answers 503 with `Retry-After` (the wait until the
/// budget has room) however little its own address sent. Strings that are no token (nothing
/// stored) and GitHub's signed reports are not held to it.
#[tokio::test]
async fn public_reports_from_many_addresses_are_held_to_the_servers_budget() {
    let key = TestKey::new("key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        Config {
            public_revoke_total_per_minute: 5,
            trusted_proxies: keyplane_server::client_addr::TrustedProxies::parse(
                &["127.0.0.1/32".to_string()],
                keyplane_server::client_addr::ForwardedHeader::XForwardedFor,
            )
            .unwrap(),
            ..config_with_keys(&keys.url)
        },
    )
    .await;
    let org = app.create_org("acme").await;
    let reported = unknown_token(CredentialKind::ApiToken);
    let report_from = |n: u32, credential: &str| {
        app.request(Method::POST, REVOKE_ROUTE, None)
            .header("x-forwarded-for", format!("2001:db8:0:{n:x}::1"))
            .json(&json!({ "credentials": [credential] }))
            .send()
    };
    for n in 0..10 {
        let res = report_from(n, &reported).await.unwrap();
        if n < 5 {
            assert_eq!(res.status(), 202, "report {n}, within the budget");
            continue;
        }
        assert_eq!(res.status(), 503, "report {n}, past the budget");
        // The wait until the budget (5 a minute: one every 12 s) has room again, not a fixed
        // second that brings the sender back to be refused again.
        let retry_after = crate::helpers::retry_after_secs(&res);
        assert!(
            (2..=12).contains(&retry_after),
            "report {n}: Retry-After {retry_after}"
        );
        assert_oauth_error(res, 503, "temporarily_unavailable").await;
    }
    let res = report_from(10, "not a token").await.unwrap();
    assert_eq!(res.status(), 202, "nothing to store, nothing charged");
    assert_eq!(public_reports(&app, "stored").await, 5);
    assert_eq!(public_reports(&app, "refused_budget").await, 5);
    assert_eq!(public_reports(&app, "no_token").await, 1);

    let live = app.create_token(&org, "leaky", &[]).await;
    let live = live["token"].as_str().unwrap();
    let res = post_signed(&app, &key, &matches_body(&[(live, "keyplane_api_token")])).await;
    assert_eq!(
        res.status(),
        200,
        "GitHub's report is not held to the budget"
    );
    assert_eq!(whoami_status(&app, live).await, 401);
}

/// The scanner fixture in contrib/ (what the detect-secrets plugin and the gitleaks rules are
/// tested on) is what it says, by keyplane's own parser: its real tokens parse, its
/// wrong-checksum tokens fail on the checksum only, its look-alikes fail.
#[test]
fn scanner_fixture_agrees_with_the_token_format() {
    use keyplane_core::token::{parse, FormatError};
    let fixture: Value = serde_json::from_str(include_str!(
        "../../../../contrib/tests/fixtures/tokens.json"
    ))
    .unwrap();
    let list = |name: &str| -> Vec<String> {
        fixture[name]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let real = list("real");
    let kinds: Vec<CredentialKind> = real.iter().map(|t| parse(t).unwrap().kind).collect();
    for kind in [
        CredentialKind::ApiToken,
        CredentialKind::ServiceAccount,
        CredentialKind::RobotAccount,
    ] {
        assert!(kinds.contains(&kind), "the fixture has a real {kind:?}");
    }
    for token in list("wrong_checksum") {
        assert_eq!(parse(&token), Err(FormatError::Checksum), "{token}");
    }
    for token in list("look_alikes") {
        // Embedded in a longer word, a real token still parses on its own: the scanners must
        // not find it there, which the Python tests check.
        if let Some(inner) = token.strip_prefix("my_") {
            assert!(parse(inner).is_ok());
            continue;
        }
        assert!(parse(&token).is_err(), "{token}");
    }
}

/// Both routes are in the OpenAPI document with every status they answer, need no credential,
/// and speak the verification endpoints' error schema.
#[tokio::test]
async fn leak_routes_are_declared_in_the_openapi_document() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let document = app.openapi().await;
    for (path, statuses) in [
        (
            GITHUB_ROUTE,
            &["200", "400", "401", "413", "415", "429", "500", "503"][..],
        ),
        (
            REVOKE_ROUTE,
            &["202", "400", "413", "415", "429", "500", "503"][..],
        ),
    ] {
        let operation = &document["paths"][path]["post"];
        let mut declared: Vec<&str> = operation["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{path} is declared"))
            .keys()
            .map(String::as_str)
            .collect();
        declared.sort();
        assert_eq!(declared, statuses, "{path}");
        assert_eq!(
            operation["security"],
            json!([{}]),
            "{path} needs no credential"
        );
        for status in statuses.iter().filter(|s| !s.starts_with('2')) {
            assert_eq!(
                operation["responses"][status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/OAuthError",
                "{path} {status}"
            );
        }
    }
    // GitHub signs its reports and sends no credential: its 401 carries no challenge.
    let unsigned = &document["paths"][GITHUB_ROUTE]["post"]["responses"]["401"];
    assert!(
        unsigned["headers"].get("WWW-Authenticate").is_none(),
        "{unsigned}"
    );
    let revoke_body = &document["components"]["schemas"]["RevokeCredentialsRequest"];
    assert_eq!(revoke_body["additionalProperties"], false, "{revoke_body}");
    assert_eq!(revoke_body["properties"]["credentials"]["maxItems"], 100);
}

/// Garbage never reaches the store: with the store switched off, a signed report of strings that
/// are not keyplane tokens (wrong checksum included) is still answered; one well-formed token
/// makes it ask the store (503, GitHub retries).
#[tokio::test]
async fn github_reports_only_well_formed_tokens_reach_the_store() {
    let key = TestKey::new("key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let (app, store) =
        crate::faulty_store::FaultyStore::spawn(Backend::Sqlite, config_with_keys(&keys.url)).await;
    let real = unknown_token(CredentialKind::ServiceAccount);
    store.set_down(true);

    let garbage = matches_body(&[
        (&wrong_checksum(&real), "keyplane_service_account_token"),
        ("aether_short", "keyplane_api_token"),
        ("ghp_somebody_elses", "keyplane_api_token"),
    ]);
    let res = post_signed(&app, &key, &garbage).await;
    assert_eq!(res.status(), 200, "answered without the store");
    let feedback: Value = res.json().await.unwrap();
    assert!(
        feedback
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["label"] == "false_positive"),
        "{feedback}"
    );

    let well_formed = matches_body(&[(&real, "keyplane_service_account_token")]);
    let res = post_signed(&app, &key, &well_formed).await;
    assert_eq!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap(),
        1
    );
    assert_oauth_error(res, 503, "temporarily_unavailable").await;
}

/// A server on a [`crate::faulty_store::FaultyStore`], an organization, and a live API token of it.
async fn token_on_faulty_store() -> (TestApp, Arc<crate::faulty_store::FaultyStore>, Org, String) {
    token_on_faulty_store_with(test_config()).await
}

async fn token_on_faulty_store_with(
    config: keyplane_server::Config,
) -> (TestApp, Arc<crate::faulty_store::FaultyStore>, Org, String) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(Backend::Sqlite, config).await;
    let org = app.create_org("acme").await;
    let leaked = app.create_token(&org, "leaky", &[]).await;
    let leaked = leaked["token"].as_str().unwrap().to_string();
    (app, store, org, leaked)
}

/// A server whose stored reports are taken again soon after their lease runs out.
fn quick_leases() -> keyplane_server::Config {
    let mut config = test_config();
    config.leak_reports.lease = Duration::from_millis(300);
    config.leak_reports.poll_interval = Duration::from_millis(100);
    config
}

/// A report is stored before it is answered, so while the store is down it is refused (503 with
/// `Retry-After`: the reporter sends it again). One accepted just before an outage is retried
/// until the store is back, however many attempts fail meanwhile: the token dies then, with one
/// event.
#[tokio::test]
async fn a_report_accepted_before_an_outage_is_worked_off_once_the_store_is_back() {
    let (app, store, org, leaked) = token_on_faulty_store_with(quick_leases()).await;
    assert_eq!(whoami_status(&app, &leaked).await, 200);

    store.set_down(true);
    let res = revoke(&app, json!({ "credentials": [leaked] })).await;
    assert!(res.headers().contains_key("retry-after"));
    assert_oauth_error(res, 503, "temporarily_unavailable").await;
    store.set_down(false);
    assert_eq!(public_reports(&app, "refused_store_failing").await, 1);
    assert_eq!(public_reports(&app, "stored").await, 0);

    // Stored, then the store goes away before the report is worked off.
    store.go_down_after_next_change();
    let res = revoke(&app, json!({ "credentials": [leaked] })).await;
    assert_eq!(res.status(), 202);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"received": 1, "well_formed": 1})
    );
    // Several leases long: several attempts fail.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    store.set_down(false);
    eventually("the report is retried once the store is back", || async {
        whoami_status(&app, &leaked).await == 401
    })
    .await;
    assert_eq!(app.audit_events(&org, "credential.leaked").await.len(), 1);
}

/// A report answered 202 outlives the server that took it: stopped (or killed) with the report's
/// work unfinished, the next server on the store (another replica, or the same one restarted)
/// works it off once its lease runs out. Worked off twice, it records one event.
#[tokio::test]
async fn a_report_left_by_a_stopped_server_is_worked_off_by_the_next() {
    let mut config = quick_leases();
    config.http.shutdown_timeout = Duration::from_secs(1);
    let (mut app, store, org, leaked) = token_on_faulty_store_with(config).await;
    let mut held = store.hold_before_next_revoke();
    let res = revoke(&app, json!({ "credentials": [leaked] })).await;
    assert_eq!(res.status(), 202);
    held.reached().await;
    // The stop gives up on the work stuck in the store.
    app.stop().await;

    let next = app.replica().await;
    eventually("the next server works the report off", || async {
        whoami_status(&next, &leaked).await == 401
    })
    .await;
    assert_eq!(next.audit_events(&org, "credential.leaked").await.len(), 1);
    // The first server's work, let go at last, finds it revoked: nothing more is recorded.
    held.release();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(next.audit_events(&org, "credential.leaked").await.len(), 1);
}

/// While the store says its writes are failing, a report is refused with 503 and `Retry-After`
/// (the reporter sends it again) instead of being accepted and left waiting; the same answer for
/// any tokens. Once writes work, it is accepted.
#[tokio::test]
async fn public_revoke_is_refused_while_the_stores_writes_fail() {
    let (app, store, _, leaked) = token_on_faulty_store().await;

    store.report_writes_failing(true);
    for body in [
        json!({ "credentials": [leaked] }),
        json!({ "credentials": [unknown_token(CredentialKind::ApiToken)] }),
    ] {
        let res = revoke(&app, body).await;
        assert_eq!(res.headers()["retry-after"], "5");
        assert_oauth_error(res, 503, "temporarily_unavailable").await;
    }
    assert_eq!(whoami_status(&app, &leaked).await, 200);
    assert_eq!(public_reports(&app, "refused_store_failing").await, 2);

    store.report_writes_failing(false);
    assert_eq!(
        revoke(&app, json!({ "credentials": [leaked] }))
            .await
            .status(),
        202
    );
    eventually("the report is worked off", || async {
        whoami_status(&app, &leaked).await == 401
    })
    .await;
    assert_eq!(public_reports(&app, "stored").await, 1);
}

/// A canary found by GitHub is a true positive like any keyplane token, but it is not revoked: the
/// report is recorded as `credential.canary_triggered` with what GitHub said, and the canary stays
/// armed for whoever copies it next.
async fn a_canary_reported_by_github_is_recorded_and_left_armed(backend: Backend) {
    let key = TestKey::new("test-key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let app = TestApp::spawn_with(backend, config_with_keys(&keys.url)).await;
    let org = app.create_org("acme").await;
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "bait", "scopes": ["*"], "canary": true}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let canary: Value = res.json().await.unwrap();
    let token = canary["token"].as_str().unwrap().to_string();
    let body = matches_body(&[(&token, "keyplane_api_token")]);
    let res = post_signed(&app, &key, &body).await;
    assert_eq!(res.status(), 200);
    let feedback: Value = res.json().await.unwrap();
    assert_eq!(feedback[0]["label"], "true_positive", "{feedback}");

    let triggers = || app.audit_events(&org, "credential.canary_triggered");
    let events = triggers().await;
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event["target"]["id"], canary["id"]);
    assert_eq!(event["details"]["surface"], "github_secret_scanning");
    assert_eq!(event["details"]["source"], "github_secret_scanning");
    assert_eq!(event["details"]["reported_by"], "github");
    assert!(event["details"]["url"].is_string(), "{event}");
    assert!(
        app.audit_events(&org, "credential.leaked").await.is_empty(),
        "not revoked as leaked"
    );
    let one = org.path(&format!("/api-tokens/{}", canary["id"].as_str().unwrap()));
    assert_eq!(app.get(&one, &org.token).await.status(), 200, "still armed");
    // GitHub's rescans of the same match are bounded like any presentation from one address.
    let res = post_signed(&app, &key, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(triggers().await.len(), 1);
    // Counted as a revoked credential reported again is: `/metrics` is unauthenticated, and must
    // not tell a canary from one.
    let github = "github_secret_scanning";
    assert_eq!(leaked_tokens(&app, github, "unchanged").await, 2);
    assert_eq!(leaked_tokens(&app, github, "revoked").await, 0);
}

/// A server on a [`crate::faulty_store::FaultyStore`] of `backend` with quick leases, an
/// organization, a canary API token of it and a live API token: the two tokens.
async fn canary_and_token_on_faulty_store(
    backend: Backend,
    config: keyplane_server::Config,
) -> (
    TestApp,
    Arc<crate::faulty_store::FaultyStore>,
    Org,
    String,
    String,
) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, config).await;
    let org = app.create_org("acme").await;
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "bait", "scopes": ["*"], "canary": true}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let canary: Value = res.json().await.unwrap();
    let canary = canary["token"].as_str().unwrap().to_string();
    let leaked = app.create_token(&org, "leaky", &[]).await;
    let leaked = leaked["token"].as_str().unwrap().to_string();
    (app, store, org, canary, leaked)
}

/// The canary trigger of a public report is written, but its acknowledgement is lost: the report
/// is worked off again (the write may not have been made), and the trigger is recorded once.
/// The live token listed after it tells when the report has been worked off.
async fn a_canary_in_a_report_worked_off_again_after_a_lost_acknowledgement_is_recorded_once(
    backend: Backend,
) {
    let (app, store, org, canary, leaked) =
        canary_and_token_on_faulty_store(backend, quick_leases()).await;
    store.lose_next_audit_append_ack();
    let res = revoke(&app, json!({ "credentials": [canary, leaked] })).await;
    assert_eq!(res.status(), 202);
    eventually("the report is worked off", || async {
        whoami_status(&app, &leaked).await == 401
    })
    .await;
    let triggers = app.audit_events(&org, "credential.canary_triggered").await;
    assert_eq!(triggers.len(), 1, "{triggers:#?}");
    assert_eq!(triggers[0]["details"]["source"], "public_revoke");
    assert_eq!(app.audit_events(&org, "credential.leaked").await.len(), 1);
}

/// A server records a report's canary trigger and is stopped before the rest of the report is
/// worked off: the next server works the whole report off again, and the trigger is still
/// recorded once (the next server has not seen it presented).
async fn a_canary_in_a_report_worked_off_by_the_next_server_is_recorded_once(backend: Backend) {
    let mut config = quick_leases();
    config.http.shutdown_timeout = Duration::from_secs(1);
    let (mut app, store, org, canary, leaked) =
        canary_and_token_on_faulty_store(backend, config).await;
    let mut held = store.hold_before_next_revoke();
    let res = revoke(&app, json!({ "credentials": [canary, leaked] })).await;
    assert_eq!(res.status(), 202);
    // The canary came first: its trigger is written by now.
    held.reached().await;
    app.stop().await;

    let next = app.replica().await;
    eventually("the next server works the report off", || async {
        whoami_status(&next, &leaked).await == 401
    })
    .await;
    let triggers = next.audit_events(&org, "credential.canary_triggered").await;
    assert_eq!(triggers.len(), 1, "{triggers:#?}");
    assert_eq!(next.audit_events(&org, "credential.leaked").await.len(), 1);
    held.release();
}

/// GitHub's report of a canary is answered 503 though its trigger was written (the store lost the
/// acknowledgement), so GitHub delivers the same signed report again: the trigger is recorded
/// once, and the second delivery is labelled as any report of a canary is.
async fn a_canary_in_a_github_report_delivered_again_is_recorded_once(backend: Backend) {
    let key = TestKey::new("test-key-1");
    let keys = KeysServer::start(document(&[&key])).await;
    let (app, store, org, canary, _) =
        canary_and_token_on_faulty_store(backend, config_with_keys(&keys.url)).await;
    let body = matches_body(&[(&canary, "keyplane_api_token")]);
    store.lose_next_audit_append_ack();
    let res = post_signed(&app, &key, &body).await;
    assert_oauth_error(res, 503, "temporarily_unavailable").await;
    let res = post_signed(&app, &key, &body).await;
    assert_eq!(res.status(), 200);
    let feedback: Value = res.json().await.unwrap();
    assert_eq!(feedback[0]["label"], "true_positive", "{feedback}");
    let triggers = app.audit_events(&org, "credential.canary_triggered").await;
    assert_eq!(triggers.len(), 1, "{triggers:#?}");
    assert_eq!(triggers[0]["details"]["source"], "github_secret_scanning");
}
