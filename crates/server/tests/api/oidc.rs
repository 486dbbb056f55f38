//! Users: JWT access tokens from a real OpenID provider (panva's certified `oidc-provider`, in
//! `tests/oidc-provider/`, run with Node.js on 127.0.0.1) authenticate on the management APIs and
//! act through grants. The provider's packages are installed with `npm ci` on first use; a machine
//! without node or npm fails these tests rather than skipping them.

use crate::helpers::{both_backends, eventually, test_config, TestApp};
use keyplane_core::{GrantKind, GrantResource, NewGrant, Scope, SubjectType, TenantId, UserId};
use keyplane_server::oidc::OidcConfig;
use keyplane_server::{ops, Config};
use keyplane_store::testing::Backend;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const AUDIENCE: &str = "https://api.keyplane.test";
/// Tokens for this resource are RS256-signed, for the same audience.
const RS256_RESOURCE: &str = "https://rs256.keyplane.test";
/// Tokens for this resource carry another audience.
const OTHER_RESOURCE: &str = "https://other.keyplane.test";
/// The bound on every wait for the provider: startup, a token, a helper run.
const TIMEOUT: Duration = Duration::from_secs(20);

both_backends!(
    a_user_without_grants_sees_nothing_and_acts_once_granted,
    operator_grants_give_users_capabilities,
    invalid_tokens_are_rejected_with_401,
    unknown_keys_refetch_the_jwks_at_most_once_per_interval,
    a_key_rotation_is_picked_up_without_restarting,
    a_provider_that_is_down_breaks_no_other_credential,
    users_get_503_while_their_providers_keys_were_never_loaded,
    an_unknown_key_gets_503_while_the_refetch_fails,
    tokens_wait_for_the_key_fetch_under_way,
    jwts_are_refused_when_no_issuer_is_configured,
    one_issuer_can_never_act_as_another_issuers_users,
    a_users_console_refusals_are_recorded_in_the_sessions_organization,
    a_users_console_switch_of_organization_is_recorded_in_both,
    the_console_reopens_the_organization_last_switched_to,
    an_address_over_its_failure_budget_gets_no_jwt_validated,
);

fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc-provider")
}

/// Runs `command` to completion within `timeout`; its stdout, or why it failed.
fn run_bounded(command: &mut Command, timeout: Duration) -> Result<String, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {timeout:?}"));
            }
        }
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!("{status}: {stderr}"))
    }
}

/// Node.js and the provider's pinned packages, checked and installed once per test binary.
fn node_ready() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(problem) = READY.get_or_init(install_provider) {
        panic!("{problem}");
    }
}

fn install_provider() -> Result<(), String> {
    for tool in ["node", "npm"] {
        run_bounded(Command::new(tool).arg("--version"), TIMEOUT).map_err(|e| {
            format!(
                "the OIDC tests run a real identity provider on Node.js, and `{tool} --version` \
                 failed ({e}); install Node.js 20 or later with npm"
            )
        })?;
    }
    let dir = provider_dir();
    let installed = ["oidc-provider", "jose"].iter().all(|package| {
        dir.join("node_modules")
            .join(package)
            .join("package.json")
            .exists()
    });
    if installed {
        return Ok(());
    }
    run_bounded(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir),
        Duration::from_secs(300),
    )
    .map(drop)
    .map_err(|e| {
        format!(
            "`npm ci` in {} failed ({e}); the OIDC tests need the npm registry once",
            dir.display()
        )
    })
}

/// A running `provider.mjs`. Killed on drop.
struct Provider {
    child: Child,
    issuer: String,
    port: u16,
    keys_file: PathBuf,
    output: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
}

impl Provider {
    /// Starts the provider on `port` (0: any free one) with the private key set in `keys_file`,
    /// which it creates with fresh keys if missing.
    fn start(keys_file: &Path, port: u16) -> Self {
        node_ready();
        let mut child = Command::new("node")
            .arg("provider.mjs")
            .current_dir(provider_dir())
            .env("PORT", port.to_string())
            .env("KEYS_FILE", keys_file)
            .env("AUDIENCE", AUDIENCE)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node provider.mjs");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (ready, listening) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            let ready = ready.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(issuer) = line.strip_prefix("listening on ") {
                        let _ = ready.send(issuer.to_string());
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        let issuer = match listening.recv_timeout(TIMEOUT) {
            Ok(issuer) => issuer,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the OIDC provider did not start within {TIMEOUT:?}:\n{}",
                    output.lock().unwrap().join("\n")
                );
            }
        };
        let port = issuer.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            child,
            issuer,
            port,
            keys_file: keys_file.to_path_buf(),
            output,
            http: reqwest::Client::builder().timeout(TIMEOUT).build().unwrap(),
        }
    }

    /// A client-credentials access token for `user` (each client is a user; `sub` = its id).
    async fn token(&self, user: &str, resource: Option<&str>) -> String {
        let mut form = vec![("grant_type", "client_credentials"), ("scope", "keyplane")];
        if let Some(resource) = resource {
            form.push(("resource", resource));
        }
        let res = self
            .http
            .post(format!("{}/token", self.issuer))
            .basic_auth(user, Some(format!("{user}-secret")))
            .form(&form)
            .send()
            .await
            .expect("the provider answers /token");
        assert_eq!(res.status(), 200, "token for {user}");
        let body: Value = res.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_string()
    }

    /// How many requests for `path` the provider has served.
    fn requests(&self, path: &str) -> usize {
        let wanted = format!("request GET {path}");
        self.output
            .lock()
            .unwrap()
            .iter()
            .filter(|line| **line == wanted)
            .count()
    }

    fn user(&self, sub: &str) -> UserId {
        UserId::from_subject(&self.issuer, sub)
    }

    /// Signs hand-made tokens with this provider's keys, as this issuer.
    fn signer(&self) -> Signer {
        Signer {
            keys_file: self.keys_file.clone(),
            issuer: self.issuer.clone(),
        }
    }

    /// Stops the provider and waits for it to exit, so its port is free again.
    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Hand-made tokens, signed by `sign.mjs` with a provider's key file (which outlives the provider).
struct Signer {
    keys_file: PathBuf,
    issuer: String,
}

impl Signer {
    /// The claims of a token for `sub` valid for 5 minutes.
    fn claims(&self, sub: &str) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300,
            "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    /// Signs per `spec` (see `sign.mjs`); ES256 and `claims("alice")` unless `spec` says otherwise.
    fn sign(&self, spec: Value) -> String {
        let mut full =
            json!({"alg": "ES256", "keys_file": self.keys_file, "claims": self.claims("alice")});
        for (key, value) in spec.as_object().unwrap() {
            full[key] = value.clone();
        }
        node_ready();
        run_bounded(
            Command::new("node")
                .arg("sign.mjs")
                .arg(full.to_string())
                .current_dir(provider_dir()),
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("sign.mjs failed: {e}"))
        .trim()
        .to_string()
    }

    /// `claims("alice")` with `overrides` applied.
    fn claims_with(&self, overrides: Value) -> Value {
        let mut claims = self.claims("alice");
        for (key, value) in overrides.as_object().unwrap() {
            claims[key] = value.clone();
        }
        claims
    }
}

fn keys_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("keyplane-oidc-")
        .tempdir()
        .unwrap()
}

fn oidc(issuers: &[&str]) -> OidcConfig {
    OidcConfig::new(
        issuers.iter().map(|i| i.to_string()).collect(),
        AUDIENCE.into(),
    )
    .unwrap()
}

async fn keyplane(backend: Backend, oidc: OidcConfig) -> TestApp {
    TestApp::spawn_with(
        backend,
        Config {
            oidc: Some(oidc),
            ..test_config()
        },
    )
    .await
}

/// The decoded JOSE header of a compact JWS.
fn jose_header(token: &str) -> Value {
    let segment = token.split('.').next().unwrap();
    serde_json::from_slice(
        &data_encoding::BASE64URL_NOPAD
            .decode(segment.as_bytes())
            .unwrap(),
    )
    .unwrap()
}

fn b64(value: &Value) -> String {
    data_encoding::BASE64URL_NOPAD.encode(value.to_string().as_bytes())
}

fn user_grant(kind: &str, user: UserId, key: Option<&str>) -> Value {
    json!({
        "grant_kind": kind, "subject_type": "user", "subject_id": user.to_string(),
        "capability_key": key,
    })
}

/// Grants `body` in `org` with the org's `*` token; returns the authorization.
async fn grant(app: &TestApp, org: &crate::helpers::Org, body: Value) -> Value {
    let res = app
        .post(&org.account_path("/authorizations"), &org.token, body)
        .await;
    assert_eq!(res.status(), 201);
    res.json().await.unwrap()
}

/// `acme`, whose `account_owner` is the provider's `alice`, and its service accounts' path.
async fn alices_org(app: &TestApp, provider: &Provider) -> (crate::helpers::Org, String) {
    let org = app.create_org("acme").await;
    grant(
        app,
        &org,
        user_grant("account_owner", provider.user("alice"), None),
    )
    .await;
    let accounts = org.account_path("/service-accounts");
    (org, accounts)
}

async fn status(app: &TestApp, path: &str, token: &str) -> u16 {
    app.get(path, token).await.status().as_u16()
}

async fn a_user_without_grants_sees_nothing_and_acts_once_granted(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    let app = keyplane(backend, oidc(&[&provider.issuer])).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("globex").await;
    let alice = provider.user("alice");
    let token = provider.token("alice", None).await;
    assert_eq!(jose_header(&token)["alg"], "ES256");

    // A valid user with no grant: the tenant does not exist for her, on either surface.
    let accounts = org.account_path("/service-accounts");
    assert_eq!(status(&app, &accounts, &token).await, 404);
    assert_eq!(status(&app, &org.path("/api-tokens"), &token).await, 404);

    // The org's owner makes her account_owner; the same token (cached) sees it at once.
    let granted = grant(&app, &org, user_grant("account_owner", alice, None)).await;
    assert_eq!(status(&app, &accounts, &token).await, 200);
    assert_eq!(status(&app, &org.path("/api-tokens"), &token).await, 200);
    assert_eq!(
        status(&app, &other.account_path("/service-accounts"), &token).await,
        404
    );

    let res = app
        .post(&accounts, &token, json!({"name": "deployer"}))
        .await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["created_by_user_id"], alice.to_string());
    assert!(created["token"].as_str().unwrap().starts_with("hbx_sa_"));

    let id = created["id"].as_str().unwrap();
    let res = app.delete(&format!("{accounts}/{id}"), &token).await;
    assert_eq!(res.status(), 200);
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(revoked["revoked_by_user_id"], alice.to_string());
    assert!(revoked["revoked_at"].is_string());

    // The audit trail names her by user id, issuer and `sub`.
    let created_events = app.audit_events(&org, "service_account.created").await;
    let actor = &created_events[0]["actor"];
    assert_eq!(actor["type"], "user");
    assert_eq!(actor["id"], alice.to_string());
    assert_eq!(actor["issuer"], provider.issuer.as_str());
    assert_eq!(actor["sub"], "alice");

    // An RS256 token from the same provider is the same user.
    let rs256 = provider.token("alice", Some(RS256_RESOURCE)).await;
    assert_eq!(jose_header(&rs256)["alg"], "RS256");
    assert_eq!(status(&app, &accounts, &rs256).await, 200);

    // Revoking her grant takes the tenant away again, cached principal or not.
    let grant_id = granted["id"].as_str().unwrap();
    app.revoke_grant(&org, grant_id).await;
    assert_eq!(status(&app, &accounts, &token).await, 404);
    assert_eq!(status(&app, &accounts, &rs256).await, 404);
}

async fn operator_grants_give_users_capabilities(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    let app = keyplane(backend, oidc(&[&provider.issuer])).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("globex").await;
    let bob = provider.user("bob");

    // What `keyplane admin grant --capability auth.manage` runs.
    ops::grant_as_operator(
        app.app.store().as_ref(),
        TenantId::parse(&org.id).unwrap(),
        NewGrant {
            kind: GrantKind::Capability,
            subject_type: SubjectType::User,
            subject_id: bob.as_uuid(),
            capability_key: Some(Scope::parse("auth.manage").unwrap()),
            resource: GrantResource {
                resource_type: None,
                resource_id: None,
            },
        },
        None,
        &crate::helpers::operator(),
    )
    .await
    .unwrap();

    let token = provider.token("bob", None).await;
    let accounts = org.account_path("/service-accounts");
    assert_eq!(status(&app, &accounts, &token).await, 200);
    let res = app.post(&accounts, &token, json!({"name": "ci"})).await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["created_by_user_id"], bob.to_string());
    // auth.manage is not api_tokens:read, and another tenant stays invisible.
    assert_eq!(status(&app, &org.path("/api-tokens"), &token).await, 403);
    assert_eq!(
        status(&app, &other.account_path("/service-accounts"), &token).await,
        404
    );

    // He can hand on what he holds, and nothing more.
    let carol = provider.user("carol");
    let authorizations = org.account_path("/authorizations");
    let res = app
        .post(
            &authorizations,
            &token,
            user_grant("capability", carol, Some("auth.manage")),
        )
        .await;
    assert_eq!(res.status(), 201);
    let res = app
        .post(
            &authorizations,
            &token,
            user_grant("account_owner", carol, None),
        )
        .await;
    assert_eq!(res.status(), 403);
    let carol_token = provider.token("carol", None).await;
    assert_eq!(status(&app, &accounts, &carol_token).await, 200);
}

async fn invalid_tokens_are_rejected_with_401(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    let app = keyplane(backend, oidc(&[&provider.issuer])).await;
    let (org, accounts) = alices_org(&app, &provider).await;
    let valid = provider.token("alice", None).await;
    assert_eq!(status(&app, &accounts, &valid).await, 200);

    let now = chrono::Utc::now().timestamp();
    let signer = provider.signer();
    let claims = |overrides: Value| signer.claims_with(overrides);
    let signed = |spec: Value| signer.sign(spec);
    // The hand-made path itself is sound: a well-formed token signed with the real key passes.
    let hand_made = signed(json!({}));
    assert_eq!(status(&app, &accounts, &hand_made).await, 200);

    let [header, payload, signature]: [&str; 3] =
        valid.split('.').collect::<Vec<_>>().try_into().unwrap();
    let mut tampered_signature = signature.to_string().into_bytes();
    tampered_signature[10] = if tampered_signature[10] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered_signature = String::from_utf8(tampered_signature).unwrap();
    let bob_payload = provider
        .token("bob", None)
        .await
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    let none_header = b64(&json!({"alg": "none", "typ": "at+jwt"}));
    let mut rs256_header = jose_header(&valid);
    rs256_header["alg"] = json!("RS256");
    let rs256_header = b64(&rs256_header);
    let mut no_sub = claims(json!({}));
    no_sub.as_object_mut().unwrap().remove("sub");

    // Each case, and the reason the request log must give for it.
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "expired beyond the leeway",
            "jwt expired",
            signed(json!({"claims": claims(json!({"iat": now - 900, "exp": now - 120}))})),
        ),
        (
            "not valid yet",
            "jwt not yet valid",
            signed(json!({"claims": claims(json!({"nbf": now + 600}))})),
        ),
        (
            "wrong audience, from the real provider",
            "jwt wrong audience",
            provider.token("alice", Some(OTHER_RESOURCE)).await,
        ),
        (
            "wrong audience",
            "jwt wrong audience",
            signed(json!({"claims": claims(json!({"aud": "https://elsewhere.test"}))})),
        ),
        (
            "wrong issuer, signed with the real key",
            "jwt unknown issuer",
            signed(json!({"claims": claims(json!({"iss": "http://127.0.0.1:9/other"}))})),
        ),
        (
            "issuer spelled differently",
            "jwt unknown issuer",
            signed(json!({"claims": claims(json!({"iss": format!("{}/", provider.issuer)}))})),
        ),
        (
            "tampered signature",
            "jwt bad signature",
            format!("{header}.{payload}.{tampered_signature}"),
        ),
        (
            "payload swapped for another user's",
            "jwt bad signature",
            format!("{header}.{bob_payload}.{signature}"),
        ),
        (
            "alg none",
            "jwt alg none",
            format!("{none_header}.{payload}."),
        ),
        (
            "alg none with a signature",
            "jwt alg none",
            format!("{none_header}.{payload}.{signature}"),
        ),
        (
            "HS256 keyed with the provider's public key",
            "jwt alg not allowed",
            signed(json!({"alg": "RS256", "hmac_with_public_key": true})),
        ),
        (
            "a published kid, another key",
            "jwt bad signature",
            signed(json!({"fresh_key": true})),
        ),
        (
            "an unknown kid",
            "jwt unknown key",
            signed(json!({"fresh_key": true, "header": {"kid": "unknown"}})),
        ),
        (
            "RS256 named with the EC key's kid",
            "jwt unknown key",
            format!("{rs256_header}.{payload}.{signature}"),
        ),
        (
            "no sub",
            "jwt missing claim",
            signed(json!({"claims": no_sub})),
        ),
        (
            "not an access token typ",
            "jwt typ not an access token",
            signed(json!({"header": {"typ": "dpop+jwt"}})),
        ),
        (
            "a critical extension",
            "jwt crit header",
            signed(json!({"header": {"crit": ["b64"], "b64": true}})),
        ),
        (
            "three garbage segments",
            "jwt malformed header",
            "abc.def.ghi".to_string(),
        ),
    ];
    for (case, reason, token) in &cases {
        for path in [accounts.clone(), org.path("/api-tokens")] {
            let request_id = uuid::Uuid::new_v4().to_string();
            let res = app
                .request(reqwest::Method::GET, &path, Some(token))
                .header("x-request-id", &request_id)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 401, "{case} on {path}");
            assert_eq!(
                res.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{case}"
            );
            let logged = logged_cause(&request_id).await;
            assert!(
                logged.contains(&format!("authentication failed: {reason}")),
                "{case}: expected `{reason}`, the log says {logged:?}"
            );
        }
    }
    // The valid token still works, and no token reached the logs.
    assert_eq!(status(&app, &accounts, &valid).await, 200);
    let logs = crate::logs::captured();
    for token in cases
        .iter()
        .map(|(_, _, t)| t.as_str())
        .chain([valid.as_str()])
    {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            signature.len() < 8 || !logs.contains(signature),
            "a token was logged"
        );
    }
}

/// The request log line of the request with `request_id` (bounded wait: it is written as the
/// response leaves).
async fn logged_cause(request_id: &str) -> String {
    for _ in 0..100 {
        if let Some(line) = crate::logs::captured()
            .lines()
            .find(|line| line.contains(request_id) && line.contains("request refused"))
        {
            return line.to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no request log line for request {request_id}");
}

async fn unknown_keys_refetch_the_jwks_at_most_once_per_interval(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    // The default interval (10 s) is what is checked here.
    let app = keyplane(backend, oidc(&[&provider.issuer])).await;
    let (_, accounts) = alices_org(&app, &provider).await;
    let valid = provider.token("alice", None).await;
    assert_eq!(status(&app, &accounts, &valid).await, 200);

    let before = provider.requests("/jwks");
    assert!(before >= 1, "the keys were fetched");
    let signer = provider.signer();
    let forged: Vec<String> = (0..12)
        .map(|i| signer.sign(json!({"fresh_key": true, "header": {"kid": format!("forged-{i}")}})))
        .collect();
    let started = Instant::now();
    let answers =
        futures::future::join_all(forged.iter().map(|t| status(&app, &accounts, t))).await;
    assert!(answers.iter().all(|s| *s == 401), "{answers:?}");
    if started.elapsed() < Duration::from_secs(10) {
        assert!(
            provider.requests("/jwks") <= before + 1,
            "{} JWKS fetches for 12 unknown kids",
            provider.requests("/jwks") - before
        );
    }
}

async fn a_key_rotation_is_picked_up_without_restarting(backend: Backend) {
    let keys = keys_dir();
    let keys_file = keys.path().join("jwks.json");
    let provider = Provider::start(&keys_file, 0);
    let config = OidcConfig {
        // Short, so the test need not wait out the default 10 s between fetches.
        min_refresh_interval: Duration::from_millis(500),
        ..oidc(&[&provider.issuer])
    };
    let app = keyplane(backend, config).await;
    let (_, accounts) = alices_org(&app, &provider).await;
    let before = provider.token("alice", None).await;
    assert_eq!(status(&app, &accounts, &before).await, 200);

    // New keys under the same issuer: delete the key file and restart on the same port.
    let old_keys = keys.path().join("old.json");
    std::fs::rename(&keys_file, &old_keys).unwrap();
    let port = provider.port;
    provider.stop();
    let provider = Provider::start(&keys_file, port);
    let after = provider.token("alice", None).await;
    assert_ne!(jose_header(&after)["kid"], jose_header(&before)["kid"]);
    let app_ref = &app;
    let (accounts_ref, after_ref) = (&accounts, &after);
    eventually(
        "a token signed with the new key is accepted",
        move || async move { status(app_ref, accounts_ref, after_ref).await == 200 },
    )
    .await;

    // A key the provider withdrew is no longer trusted (a fresh token, so no cache answers).
    let withdrawn = Signer {
        keys_file: old_keys,
        issuer: provider.issuer.clone(),
    };
    let old_signed = withdrawn.sign(json!({}));
    assert_eq!(status(&app, &accounts, &old_signed).await, 401);
}

async fn a_provider_that_is_down_breaks_no_other_credential(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    let config = OidcConfig {
        // A token naming an unknown key always refetches: whether the provider answers is what
        // is checked, not how long ago the keys were fetched.
        min_refresh_interval: Duration::ZERO,
        ..oidc(&[&provider.issuer])
    };
    let app = keyplane(backend, config).await;
    let (org, accounts) = alices_org(&app, &provider).await;
    assert_eq!(
        status(&app, &accounts, &provider.token("alice", None).await).await,
        200
    );
    let created: Value = app
        .post(&accounts, &org.token, json!({"name": "ci"}))
        .await
        .json()
        .await
        .unwrap();
    let sa_id = created["id"].as_str().unwrap();
    let sa_token = created["token"].as_str().unwrap();
    grant(
        &app,
        &org,
        json!({"grant_kind": "capability", "subject_type": "service_account",
               "subject_id": sa_id, "capability_key": "auth.manage"}),
    )
    .await;

    // The provider goes away. Hand-made tokens are signed with its key file, which outlives it.
    let signer = provider.signer();
    provider.stop();
    assert_eq!(
        status(&app, &org.path("/api-tokens"), &org.token).await,
        200
    );
    assert_eq!(status(&app, &accounts, sa_token).await, 200);
    // Keys already fetched keep working; a token naming another key fails fast, with a 503: the
    // provider may have rotated to it.
    assert_eq!(status(&app, &accounts, &signer.sign(json!({}))).await, 200);
    let started = Instant::now();
    let unknown = signer.sign(json!({"fresh_key": true, "header": {"kid": "unknown"}}));
    assert_eq!(status(&app, &accounts, &unknown).await, 503);
    assert!(started.elapsed() < Duration::from_secs(10));

    // A keyplane started while its only provider is down starts and serves its own credentials.
    let dead = format!("http://127.0.0.1:{}", unused_port());
    let cold = keyplane(backend, oidc(&[&dead])).await;
    let org = cold.create_org("acme").await;
    assert_eq!(
        status(&cold, &org.path("/api-tokens"), &org.token).await,
        200
    );
    let forged = Signer {
        keys_file: signer.keys_file.clone(),
        issuer: dead,
    }
    .sign(json!({}));
    // No key was ever loaded: nothing can be told about the token, so not a 401.
    assert_eq!(status(&cold, &org.path("/api-tokens"), &forged).await, 503);
}

/// An identity provider that answers every request with a 500, on 127.0.0.1: its issuer URL and
/// how many requests it has served.
async fn failing_provider() -> (String, Arc<AtomicUsize>) {
    let served = Arc::new(AtomicUsize::new(0));
    let counted = served.clone();
    let router = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (issuer, served)
}

async fn users_get_503_while_their_providers_keys_were_never_loaded(backend: Backend) {
    let (issuer, served) = failing_provider().await;
    let config = OidcConfig {
        // No second fetch may happen during the test.
        min_refresh_interval: Duration::from_secs(3600),
        ..oidc(&[&issuer])
    };
    let app = keyplane(backend, config).await;
    let org = app.create_org("acme").await;
    // Its signature is never checked: there is no key to check it with.
    let header = b64(&json!({"alg": "ES256", "typ": "at+jwt", "kid": "k"}));
    let payload = b64(&json!({"iss": issuer, "aud": AUDIENCE, "sub": "alice",
                               "exp": chrono::Utc::now().timestamp() + 300}));
    let jwt = format!("{header}.{payload}.c2ln");
    for attempt in ["first", "second"] {
        let res = app.get(&org.path("/api-tokens"), &jwt).await;
        let retry_after: u64 = res
            .headers()
            .get("retry-after")
            .unwrap_or_else(|| panic!("{attempt} answer has a Retry-After: {res:?}"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3600).contains(&retry_after), "{retry_after}");
        crate::helpers::assert_error(res, 503, "unavailable").await;
    }
    // One fetch (the warm-up's, or the first request's): the second request waited for none.
    assert_eq!(served.load(Ordering::SeqCst), 1, "requests to the provider");
    // keyplane's own credentials are unaffected.
    assert_eq!(
        status(&app, &org.path("/api-tokens"), &org.token).await,
        200
    );
}

/// Once an issuer's keys were loaded, a token naming a key they lack is answered 503 with
/// Retry-After (Aether's unavailable error) while the refetch it causes fails, as when no key was
/// ever loaded: the provider may have rotated to that key. The refetch stays rate limited (a
/// second such token within the interval causes none), keys held keep working, and each failed
/// fetch is counted in `/metrics` for the issuer.
async fn an_unknown_key_gets_503_while_the_refetch_fails(backend: Backend) {
    let keys = keys_dir();
    let keys_file = keys.path().join("jwks.json");
    Provider::start(&keys_file, 0).stop();
    let server = KeyServer::start(&keys_file).await;
    server.failing.store(false, Ordering::SeqCst);
    server.gate.send_replace(true);
    let interval = Duration::from_secs(2);
    let config = OidcConfig {
        min_refresh_interval: interval,
        ..oidc(&[&server.issuer])
    };
    let app = keyplane(backend, config).await;
    let org = app.create_org("acme").await;
    let alice = UserId::from_subject(&server.issuer, "alice");
    grant(&app, &org, user_grant("account_owner", alice, None)).await;
    let accounts = org.account_path("/service-accounts");
    let signer = Signer {
        keys_file: keys_file.clone(),
        issuer: server.issuer.clone(),
    };
    let held = signer.sign(json!({}));
    let (app_ref, accounts_ref, held_ref) = (&app, &accounts, &held);
    eventually("the keys are loaded", move || async move {
        status(app_ref, accounts_ref, held_ref).await == 200
    })
    .await;
    let failures = format!(
        "keyplane_oidc_key_fetch_failures_total{{issuer=\"{}\"}}",
        server.issuer
    );
    assert_eq!(app.metric(&failures).await, 0);

    // The provider fails from now on, once the keys may be fetched again.
    server.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(interval + Duration::from_millis(100)).await;
    let asked = server.asked();
    let rotated = |kid: &str| signer.sign(json!({"fresh_key": true, "header": {"kid": kid}}));
    let (first, second) = (rotated("rotated-1"), rotated("rotated-2"));
    let started = Instant::now();
    let res = app.get(&org.path("/api-tokens"), &first).await;
    let retry_after = crate::helpers::retry_after_secs(&res);
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    crate::helpers::assert_error(res, 503, "unavailable").await;
    assert_eq!(server.asked(), asked + 1, "the key was refetched");
    assert_eq!(app.metric(&failures).await, 1);

    let res = app.get(&org.path("/api-tokens"), &second).await;
    assert!(res.headers().contains_key("retry-after"), "{res:?}");
    crate::helpers::assert_error(res, 503, "unavailable").await;
    if started.elapsed() < interval {
        assert_eq!(server.asked(), asked + 1, "no refetch within the interval");
    }
    // A token whose key is held is not affected.
    assert_eq!(status(&app, &accounts, &held).await, 200);
}

/// An identity provider on 127.0.0.1 that the test steers. Its discovery document always
/// answers; its JWKS (the public half of a key file `provider.mjs` made) answers 500 while
/// `failing`, and otherwise once `gate` is open.
struct KeyServer {
    issuer: String,
    failing: Arc<std::sync::atomic::AtomicBool>,
    gate: tokio::sync::watch::Sender<bool>,
    /// JWKS requests received, answered or waiting at the gate.
    jwks_asked: Arc<AtomicUsize>,
}

impl KeyServer {
    async fn start(keys_file: &Path) -> Self {
        let private: Value =
            serde_json::from_str(&std::fs::read_to_string(keys_file).unwrap()).unwrap();
        let public: Vec<Value> = private["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|key| {
                let mut key = key.clone();
                for member in ["d", "p", "q", "dp", "dq", "qi"] {
                    key.as_object_mut().unwrap().remove(member);
                }
                key
            })
            .collect();
        let jwks = json!({ "keys": public });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")});
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (gate, opened) = tokio::sync::watch::channel(false);
        let jwks_asked = Arc::new(AtomicUsize::new(0));
        let (failing_seen, asked) = (failing.clone(), jwks_asked.clone());
        let router = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let discovery = discovery.clone();
                    async move { axum::Json(discovery) }
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || {
                    let (failing, asked) = (failing_seen.clone(), asked.clone());
                    let (jwks, mut opened) = (jwks.clone(), opened.clone());
                    async move {
                        asked.fetch_add(1, Ordering::SeqCst);
                        if failing.load(Ordering::SeqCst) {
                            return Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
                        }
                        let _ = opened.wait_for(|open| *open).await;
                        Ok(axum::Json(jwks))
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            issuer,
            failing,
            gate,
            jwks_asked,
        }
    }

    fn asked(&self) -> usize {
        self.jwks_asked.load(Ordering::SeqCst)
    }
}

/// A keyplane trusting `server`, whose warm-up fetch of its keys failed and whose every fetch
/// since failed too (the server is still failing); `acme` with alice as its account owner, its
/// service accounts' path, and tokens for alice.
async fn after_a_failed_warm_up(
    backend: Backend,
    server: &KeyServer,
    keys_file: &Path,
    max_fetch_wait: Duration,
) -> (TestApp, String, Vec<String>) {
    let config = OidcConfig {
        // A fetch may start whenever none is under way: only the one in flight holds tokens.
        min_refresh_interval: Duration::ZERO,
        max_fetch_wait,
        ..oidc(&[&server.issuer])
    };
    let app = keyplane(backend, config).await;
    let org = app.create_org("acme").await;
    let alice = UserId::from_subject(&server.issuer, "alice");
    grant(&app, &org, user_grant("account_owner", alice, None)).await;
    let accounts = org.account_path("/service-accounts");
    let signer = Signer {
        keys_file: keys_file.to_path_buf(),
        issuer: server.issuer.clone(),
    };
    // Each with its own `jti`: no cache answers one for another.
    let tokens: Vec<String> = (0..3).map(|_| signer.sign(json!({}))).collect();
    let (app_ref, accounts_ref, probe) = (&app, &accounts, &tokens[2]);
    eventually("a failed fetch answers 503", move || async move {
        status(app_ref, accounts_ref, probe).await == 503
    })
    .await;
    (app, accounts, tokens)
}

/// While the first fetch of an issuer's keys after a failed one is under way, other users' tokens
/// wait for it rather than answer 503, and are served with the keys it brings. One that would wait
/// longer than `max_fetch_wait` answers 503 with Retry-After; the token whose fetch it is still
/// gets its answer.
async fn tokens_wait_for_the_key_fetch_under_way(backend: Backend) {
    let keys = keys_dir();
    let keys_file = keys.path().join("jwks.json");
    // provider.mjs makes the key file; the test's own server publishes it.
    Provider::start(&keys_file, 0).stop();

    for (max_fetch_wait, waiting_answer) in [
        (Duration::from_secs(30), 200),
        (Duration::from_millis(200), 503),
    ] {
        let server = KeyServer::start(&keys_file).await;
        let (app, accounts, tokens) =
            after_a_failed_warm_up(backend, &server, &keys_file, max_fetch_wait).await;
        server.failing.store(false, Ordering::SeqCst);
        let asked = server.asked();
        let first = status(&app, &accounts, &tokens[0]);
        let second = async {
            eventually("the first token's fetch is under way", || async {
                server.asked() > asked
            })
            .await;
            let second = app.get(&accounts, &tokens[1]);
            tokio::pin!(second);
            if waiting_answer == 200 {
                // Not answered while the fetch is held: it waits (a 503 would come at once).
                let early = tokio::time::timeout(Duration::from_secs(1), &mut second).await;
                assert!(
                    early.is_err(),
                    "answered {:?} during the fetch",
                    early.map(|res| res.status())
                );
            } else {
                let res = (&mut second).await;
                assert_eq!(res.status(), 503);
                assert!(res.headers().contains_key("retry-after"), "{res:?}");
            }
            server.gate.send_replace(true);
            if waiting_answer == 200 {
                (&mut second).await.status().as_u16()
            } else {
                503
            }
        };
        let (first, second) = tokio::join!(first, second);
        assert_eq!(
            (first, second),
            (200, waiting_answer),
            "waiting at most {max_fetch_wait:?}"
        );
        // The fetch happened once, for both.
        assert_eq!(server.asked(), asked + 1);
    }
}

/// A loopback port nothing listens on (bound, then released).
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn jwts_are_refused_when_no_issuer_is_configured(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let header = b64(&json!({"alg": "ES256", "typ": "at+jwt", "kid": "k"}));
    let payload = b64(
        &json!({"iss": "http://127.0.0.1:9", "aud": AUDIENCE, "sub": "alice",
                              "exp": chrono::Utc::now().timestamp() + 300}),
    );
    let jwt = format!("{header}.{payload}.c2ln");
    let res = app.get(&org.path("/api-tokens"), &jwt).await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        status(&app, &org.path("/api-tokens"), &org.token).await,
        200
    );
}

/// Two issuers, one of them (`--oidc-uuid-subjects`) naming users by UUID: a `sub` is the user id as
/// it is only from that issuer and only in canonical form; every other `sub` is hashed with its
/// issuer, so neither issuer can produce a user of the other.
async fn one_issuer_can_never_act_as_another_issuers_users(backend: Backend) {
    let (keys_a, keys_b) = (keys_dir(), keys_dir());
    let trusted = Provider::start(&keys_a.path().join("jwks.json"), 0);
    let other = Provider::start(&keys_b.path().join("jwks.json"), 0);
    let config = oidc(&[&trusted.issuer, &other.issuer])
        .with_uuid_subjects(trusted.issuer.clone())
        .unwrap();
    let app = keyplane(backend, config).await;
    let org = app.create_org("acme").await;
    let accounts = org.account_path("/service-accounts");

    // A user named by UUID at the trusted issuer, granted by that id.
    let uuid = uuid::Uuid::new_v4().to_string();
    let by_uuid = UserId::parse(&uuid).unwrap();
    grant(&app, &org, user_grant("account_owner", by_uuid, None)).await;
    let token_for = |provider: &Provider, sub: &str| {
        let signer = provider.signer();
        signer.sign(json!({"claims": signer.claims(sub)}))
    };
    assert_eq!(
        status(&app, &accounts, &token_for(&trusted, &uuid)).await,
        200
    );
    // The same sub from the other issuer is another user, without grants.
    assert_eq!(
        status(&app, &accounts, &token_for(&other, &uuid)).await,
        404
    );
    // Not in canonical form: hashed like any other sub, so not the granted user.
    let upper = uuid.to_uppercase();
    assert_eq!(
        status(&app, &accounts, &token_for(&trusted, &upper)).await,
        404
    );

    // The other issuer's users are hashed with its name; the trusted one cannot produce them,
    // not even by sending their id as a UUID sub.
    let bob = UserId::from_subject(&other.issuer, "bob");
    grant(&app, &org, user_grant("account_owner", bob, None)).await;
    assert_eq!(
        status(&app, &accounts, &token_for(&other, "bob")).await,
        200
    );
    assert_eq!(
        status(&app, &accounts, &token_for(&trusted, "bob")).await,
        404
    );
    assert_eq!(
        status(&app, &accounts, &token_for(&trusted, &bob.to_string())).await,
        404,
        "the trusted issuer names only its own users"
    );
    let res = app
        .post(&accounts, &token_for(&other, "bob"), json!({"name": "ci"}))
        .await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["created_by_user_id"], bob.to_string());
}

/// A user signed in to the console (with an access token, as the sign-in form takes it) and
/// refused there: recorded in the session's organization, as the same refusal on the API is.
async fn a_users_console_refusals_are_recorded_in_the_sessions_organization(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    let app = TestApp::spawn_with(
        backend,
        Config {
            oidc: Some(oidc(&[&provider.issuer])),
            audit_refusal_window: Duration::from_millis(100),
            ..test_config()
        },
    )
    .await;
    let org = app.create_org("acme").await;
    let dave = provider.user("dave");
    grant(
        &app,
        &org,
        user_grant("capability", dave, Some("api_tokens:read")),
    )
    .await;
    let token = provider.token("dave", None).await;
    let console = crate::console::sign_in(&app, &token).await;

    let id = uuid::Uuid::new_v4().to_string();
    let res = console
        .post(&app, &format!("/console/api-tokens/{id}/revoke"), &[])
        .await;
    assert!(
        matches!(res.status().as_u16(), 403 | 404),
        "{}",
        res.status()
    );
    eventually("the console refusal is recorded", || async {
        !crate::console::refusals_of(&app, &org, &id)
            .await
            .is_empty()
    })
    .await;
    let events = crate::console::refusals_of(&app, &org, &id).await;
    let event = &events[0];
    assert_eq!(event["actor"]["type"], "user", "{event}");
    assert_eq!(event["actor"]["id"], dave.to_string(), "{event}");
    assert_eq!(event["target"]["type"], "api_token", "{event}");
    assert_eq!(event["details"]["org_id"], org.id.as_str(), "{event}");
    assert_eq!(
        event["details"]["attempted"], "POST /console/api-tokens/{id}/revoke",
        "{event}"
    );
}

/// A user with rights in two organizations signs in to the console and moves to the other one:
/// each organization's trail says so, as the user, from the browser's address: the one left
/// that the session ended there, the one reached that it arrived.
async fn a_users_console_switch_of_organization_is_recorded_in_both(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    let app = keyplane(backend, oidc(&[&provider.issuer])).await;
    let orgs = [app.create_org("acme").await, app.create_org("globex").await];
    let carol = provider.user("carol");
    for org in &orgs {
        grant(
            &app,
            org,
            user_grant("capability", carol, Some("api_tokens:read")),
        )
        .await;
    }
    let token = provider.token("carol", None).await;
    let console = crate::console::sign_in(&app, &token).await;
    let mut started = Vec::new();
    for org in &orgs {
        started.push(app.audit_events(org, "console.session_started").await.len());
    }
    let (left, reached) = match started[..] {
        [1, 0] => (&orgs[0], &orgs[1]),
        [0, 1] => (&orgs[1], &orgs[0]),
        _ => panic!("one sign-in recorded, in one organization: {started:?}"),
    };
    let start = &app.audit_events(left, "console.session_started").await[0];
    assert_eq!(start["actor"]["type"], "user", "{start}");
    assert_eq!(start["actor"]["id"], carol.to_string(), "{start}");

    let switched = console
        .post(
            &app,
            "/console/organization",
            &[("organization", reached.id.as_str())],
        )
        .await;
    assert_eq!(switched.status(), 303);
    let ended = app.audit_events(left, "console.session_ended").await;
    assert_eq!(ended.len(), 1, "{ended:#?}");
    assert_eq!(ended[0]["details"]["reason"], "switched_organization");
    assert_eq!(ended[0]["actor"]["id"], carol.to_string());
    assert_eq!(ended[0]["target"]["id"], start["target"]["id"]);
    let arrived = app
        .audit_events(reached, "console.organization_switched")
        .await;
    assert_eq!(arrived.len(), 1, "{arrived:#?}");
    assert_eq!(arrived[0]["actor"]["id"], carol.to_string());
    assert_eq!(arrived[0]["client_ip"], "127.0.0.1");
    assert!(app
        .audit_events(reached, "console.session_started")
        .await
        .is_empty());
}

/// A user's next sign-in opens the organization they last switched to, while they still hold
/// rights there; without them it opens the first one again. The browser keeps only that
/// organization's id.
async fn the_console_reopens_the_organization_last_switched_to(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    let app = keyplane(backend, oidc(&[&provider.issuer])).await;
    let orgs = [app.create_org("acme").await, app.create_org("globex").await];
    let carol = provider.user("carol");
    let mut grants = Vec::new();
    for org in &orgs {
        grants.push(
            grant(
                &app,
                org,
                user_grant("capability", carol, Some("api_tokens:read")),
            )
            .await,
        );
    }
    let sign_ins = || async {
        let mut counts = Vec::new();
        for org in &orgs {
            counts.push(app.audit_events(org, "console.session_started").await.len());
        }
        counts
    };
    let token = provider.token("carol", None).await;
    let console = crate::console::sign_in(&app, &token).await;
    let (first, other) = match sign_ins().await[..] {
        [1, 0] => (0, 1),
        [0, 1] => (1, 0),
        ref counts => panic!("one sign-in recorded, in one organization: {counts:?}"),
    };
    let switched = console
        .post(
            &app,
            "/console/organization",
            &[("organization", orgs[other].id.as_str())],
        )
        .await;
    assert_eq!(switched.status(), 303);
    let cookie = switched
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("keyplane_org="))
        .expect("the organization is remembered")
        .to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let remembered = cookie.split(';').next().unwrap().to_string();
    assert_eq!(remembered, format!("keyplane_org={}", orgs[other].id));
    let signed_out = console.post(&app, "/console/logout", &[]).await;
    assert_eq!(signed_out.status(), 303);

    crate::console::sign_in_remembering(&app, &token, Some(&remembered)).await;
    let mut expected = [0, 0];
    expected[first] = 1;
    expected[other] = 1;
    assert_eq!(
        sign_ins().await,
        expected,
        "the next sign-in opens the one switched to"
    );

    let revoked = app
        .delete(
            &orgs[other].account_path(&format!(
                "/authorizations/{}",
                grants[other]["id"].as_str().unwrap()
            )),
            &orgs[other].token,
        )
        .await;
    assert_eq!(revoked.status(), 200);
    crate::console::sign_in_remembering(&app, &token, Some(&remembered)).await;
    expected[first] = 2;
    assert_eq!(
        sign_ins().await,
        expected,
        "without rights there, the first again"
    );
}

/// An address over its failed-authentication budget gets a user's JWT the cache does not hold
/// refused (429) before its signature is checked, as its unknown secrets are: a blocked client
/// cannot make keyplane verify signatures (or fetch keys) for it. A JWT it had validated before
/// still works.
async fn an_address_over_its_failure_budget_gets_no_jwt_validated(backend: Backend) {
    let keys = keys_dir();
    let provider = Provider::start(&keys.path().join("jwks.json"), 0);
    let budget = 3;
    let app = TestApp::spawn_with(
        backend,
        Config {
            oidc: Some(oidc(&[&provider.issuer])),
            failed_auth_per_minute: budget,
            ..test_config()
        },
    )
    .await;
    let (_, accounts) = alices_org(&app, &provider).await;
    let validated = provider.token("alice", None).await;
    assert_eq!(status(&app, &accounts, &validated).await, 200);
    let unvalidated = provider.signer().sign(json!({}));

    let unknown = keyplane_core::token::mint(
        keyplane_core::CredentialKind::ApiToken,
        &mut rand::rngs::OsRng,
    );
    let mut statuses = Vec::new();
    for _ in 0..2 * budget {
        statuses.push(status(&app, &accounts, unknown.plaintext.expose_secret()).await);
    }
    assert_eq!(statuses.last(), Some(&429), "never blocked: {statuses:?}");

    let refused = app.get(&accounts, &unvalidated).await;
    assert_eq!(
        refused.status(),
        429,
        "a JWT from a blocked address was validated"
    );
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(status(&app, &accounts, &validated).await, 200);
}
