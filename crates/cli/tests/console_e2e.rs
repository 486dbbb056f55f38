//! The web console end to end: `keyplane serve` on 127.0.0.1 (either store) and a real OpenID
//! provider (panva's `oidc-provider`, `../server/tests/oidc-provider/`, with its development login
//! page), driven in Debian's Chromium by `playwright-core` (`tests/console/console.spec.mjs`).
//! The spec signs in with a token and through the provider, creates a token and reads its secret
//! once, rotates with a grace period, revokes, manages a webhook (secret once, edit, deliveries
//! to a loopback receiver and a retry, rotation, deletion), checks a read-only token and CSRF
//! refusals, and signs out. It saves screenshots of each page at 375 and 1440 px under
//! `target/console-screenshots/`; with `KEYPLANE_UPDATE_SCREENSHOTS=1` the SQLite run refreshes
//! the README's, in `docs/console/`.
//!
//! Needs /usr/bin/chromium (Debian's `chromium`; `scripts/test` installs it) and Node.js with
//! npm (the packages are installed with `npm ci` on first use). Without them these tests fail,
//! they never skip.

mod common;

use common::*;
use keyplane_store::testing::Backend;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);
/// The whole browser run: a few dozen page loads and two dozen screenshots.
const SPEC_LIMIT: Duration = Duration::from_secs(240);
const CHROMIUM: &str = "/usr/bin/chromium";
const AUDIENCE: &str = "https://api.keyplane.test";
const OIDC_USER: &str = "e2e-user";
/// What the browser specs import (`tests/console/package.json`).
const CONSOLE_PACKAGES: &[&str] = &["playwright-core", "axe-core"];

both_stores!(
    console_end_to_end,
    console_can_be_turned_off,
    console_http_rules,
    console_rotating_own_credential
);

/// `/console/oidc/start` needs no sign-in: starting sign-ins over and over must not make
/// keyplane fetch the issuer's discovery document each time.
#[tokio::test]
async fn starting_sign_ins_fetches_the_discovery_document_once() {
    let issuer = FakeIssuer::start().await;
    let store = TestStore::new(Backend::Sqlite).await;
    // Twenty starts from one address: more than it may start (tested below).
    let keyplane = signing_in_at(
        &issuer,
        &store,
        &["--console-oidc-sign-ins-per-minute", "0"],
    )
    .await;
    // The API's own key loading reads the document too, at start; wait for it to finish.
    let deadline = std::time::Instant::now() + LIMIT;
    while issuer.fetched("/jwks") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the key set was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = issuer.fetched("/.well-known/openid-configuration");
    let client = manual_client();
    for _ in 0..20 {
        let started = client
            .get(keyplane.url("/console/oidc/start"))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 303);
        let location = header(&started, "location");
        assert!(
            location.starts_with(&format!("{}/authorize?", issuer.url)),
            "{location}"
        );
    }
    assert_eq!(
        issuer.fetched("/.well-known/openid-configuration") - before,
        1,
        "twenty sign-ins, one fetch of the discovery document"
    );
}

/// `/console/oidc/start` needs no sign-in, and many client addresses are cheap (an IPv6 /64
/// each): a flood of starts from a thousand addresses fills the pending sign-ins, after which
/// new starts are refused (503, Retry-After) instead of ending a sign-in someone has under way.
#[tokio::test]
async fn a_flood_of_sign_ins_from_many_addresses_ends_no_one_elses() {
    let issuer = FakeIssuer::start().await;
    let store = TestStore::new(Backend::Sqlite).await;
    let keyplane = signing_in_at(&issuer, &store, &["--trusted-proxies", "127.0.0.1/32"]).await;
    let client = manual_client();
    let start_from = |address: String| {
        client
            .get(keyplane.url("/console/oidc/start"))
            .header("x-forwarded-for", address)
            .send()
    };
    let mine = start_from("192.0.2.1".into()).await.unwrap();
    assert_eq!(mine.status(), 303);
    let (cookie, _) = set_cookie(&mine, "keyplane_oidc");
    let mut refused = 0;
    for n in 0..1_100u32 {
        let started = start_from(format!("2001:db8:{n:x}::1")).await.unwrap();
        match started.status().as_u16() {
            303 => assert_eq!(refused, 0, "start {n} after a refusal"),
            503 => {
                assert_eq!(header(&started, "retry-after"), "30");
                assert!(header(&started, "set-cookie").is_empty());
                let page = started.text().await.unwrap();
                assert!(page.contains("Too many sign-ins are under way"), "{page}");
                refused += 1;
            }
            other => panic!("start {n}: {other}"),
        }
    }
    assert_eq!(refused, 101, "the 1,000 kept include mine");
    // The issuer sends the browser back: the pending sign-in is still there to answer it (here
    // with a refusal from the issuer, so no token exchange is needed to tell).
    let back = client
        .get(keyplane.url("/console/oidc/callback?error=access_denied"))
        .header("cookie", format!("keyplane_oidc={cookie}"))
        .header("x-forwarded-for", "192.0.2.1")
        .send()
        .await
        .unwrap();
    assert_eq!(back.status(), 400);
    let page = back.text().await.unwrap();
    assert!(
        page.contains("The identity provider did not sign you in."),
        "my sign-in was still pending: {page}"
    );
}

/// Anyone may start a sign-in, and each may end in a code exchange at the issuer, whose rate
/// limit every user's sign-in shares: one address may start 10 a minute (the default), then the
/// console answers 429 with `Retry-After`, sets no cookie and costs the issuer nothing.
#[tokio::test]
async fn one_address_cannot_spend_the_issuers_token_endpoint() {
    let issuer = FakeIssuer::start().await;
    let store = TestStore::new(Backend::Sqlite).await;
    let keyplane = signing_in_at(&issuer, &store, &[]).await;
    let client = manual_client();
    let mut limited = 0;
    for round in 0..30 {
        let started = client
            .get(keyplane.url("/console/oidc/start"))
            .send()
            .await
            .unwrap();
        if started.status() == 429 {
            let retry_after: u64 = header(&started, "retry-after").parse().unwrap();
            assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
            assert!(header(&started, "set-cookie").is_empty());
            let page = started.text().await.unwrap();
            assert!(page.contains("Too many sign-ins were started"), "{page}");
            limited += 1;
            continue;
        }
        assert_eq!(started.status(), 303, "round {round}");
        let (cookie, _) = set_cookie(&started, "keyplane_oidc");
        let location = reqwest::Url::parse(&header(&started, "location")).unwrap();
        let state = location
            .query_pairs()
            .find(|(name, _)| name == "state")
            .map(|(_, value)| value.into_owned())
            .expect("a state in the authorization URL");
        let back = client
            .get(keyplane.url("/console/oidc/callback"))
            .query(&[("code", "made-up"), ("state", state.as_str())])
            .header("cookie", format!("keyplane_oidc={cookie}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            back.status(),
            502,
            "round {round}: the issuer refused the code"
        );
    }
    let exchanges = issuer.fetched("/token");
    // Ten at once, then one every 6 s: an eleventh only if the rounds took that long.
    assert!((10..=11).contains(&exchanges), "{exchanges} code exchanges");
    assert_eq!(limited, 30 - exchanges, "the other starts were refused");
}

/// keyplane with "Sign in with" at `issuer`, and `more` flags.
async fn signing_in_at(issuer: &FakeIssuer, store: &TestStore, more: &[&str]) -> Keyplane {
    let mut args = vec![
        "--oidc-issuer",
        &issuer.url,
        "--oidc-audience",
        AUDIENCE,
        "--console-oidc-client-id",
        "keyplane-console",
    ];
    args.extend_from_slice(more);
    Keyplane::start(store, &args, LIMIT).await
}

/// An issuer that serves its discovery document and an empty key set on 127.0.0.1, refuses
/// every code exchange (`POST /token`: 400 `invalid_grant`), and counts the requests for each
/// path.
struct FakeIssuer {
    url: String,
    hits: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeIssuer {
    async fn start() -> Self {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let document = serde_json::json!({
            "issuer": url,
            "authorization_endpoint": format!("{url}/authorize"),
            "token_endpoint": format!("{url}/token"),
            "jwks_uri": format!("{url}/jwks"),
        })
        .to_string();
        let counted = hits.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                // Read whole (a code exchange's form body too) before the answer, so that
                // closing the connection does not reset it under the client.
                let Some(request) = read_request(&mut stream).await else {
                    continue;
                };
                let path = request.path;
                let (status, body) = match path.as_str() {
                    "/.well-known/openid-configuration" => ("200 OK", document.clone()),
                    "/token" => ("400 Bad Request", r#"{"error":"invalid_grant"}"#.to_owned()),
                    _ => ("200 OK", r#"{"keys":[]}"#.to_owned()),
                };
                *counted.lock().unwrap().entry(path).or_insert(0) += 1;
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        Self {
            url,
            hits,
            _server: server,
        }
    }

    fn fetched(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// A client that shows redirects instead of following them, and ignores proxies.
fn manual_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(LIMIT)
        .build()
        .expect("build an HTTP client")
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The hidden CSRF field's value in a page.
fn csrf_in(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[start..start + html[start..].find('"').unwrap()].to_owned()
}

/// The console's HTTP rules without a browser: headers, cookies (with `--console-https`: `Secure`
/// and `__Host-`), assets, CSRF on sign-in and sign-out, errors as pages, paging of the audit log
/// and of a webhook's deliveries.
async fn console_http_rules(backend: Backend) {
    let store = TestStore::new(backend).await;
    let keyplane = Keyplane::start(&store, &["--console-https"], LIMIT).await;
    let org = store.bootstrap_org();
    let http = manual_client();
    let url = |path: &str| keyplane.url(path);

    let first = http.get(url("/console")).send().await.unwrap();
    assert_eq!(first.status(), 303);
    assert_eq!(header(&first, "location"), "/console/login");
    let csp = header(&first, "content-security-policy");
    for rule in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(rule), "CSP {csp:?} lacks {rule}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(header(&first, "x-frame-options"), "DENY");
    assert_eq!(header(&first, "cache-control"), "no-store");
    assert_eq!(
        header(&first, "strict-transport-security"),
        "max-age=31536000",
        "reached over https, the console keeps browsers to it"
    );

    let login = http.get(url("/console/login")).send().await.unwrap();
    assert_eq!(login.status(), 200);
    let (login_cookie, attributes) = set_cookie(&login, "__Host-keyplane_login");
    for attribute in ["Path=/", "HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(attributes.contains(attribute), "{attributes}");
    }
    let page = login.text().await.unwrap();
    assert_eq!(csrf_in(&page), login_cookie);
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "no inline script or style"
    );

    let css = &page[page.find("/console/assets/console-").unwrap()..];
    let css = &css[..css.find('"').unwrap()];
    let asset = http.get(url(css)).send().await.unwrap();
    assert_eq!(asset.status(), 200, "{css}");
    assert!(header(&asset, "content-type").starts_with("text/"));
    assert!(header(&asset, "cache-control").contains("immutable"));
    let stale = http
        .get(url("/console/assets/console-0000000000000000.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 404);

    let sign_in = |cookie: Option<String>, csrf: &str, token: &str| {
        let mut request = http
            .post(url("/console/login"))
            .form(&[("csrf", csrf), ("token", token)]);
        if let Some(cookie) = cookie {
            request = request.header("cookie", format!("__Host-keyplane_login={cookie}"));
        }
        request.send()
    };
    let no_cookie = sign_in(None, &login_cookie, &org.token).await.unwrap();
    assert_eq!(no_cookie.status(), 403, "sign-in without its CSRF cookie");
    let other = sign_in(Some(login_cookie.clone()), "forged", &org.token)
        .await
        .unwrap();
    assert_eq!(other.status(), 403, "sign-in with another CSRF token");
    let bad = sign_in(
        Some(login_cookie.clone()),
        &login_cookie,
        "aether_not_a_token",
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), 401);
    let text = bad.text().await.unwrap();
    assert!(
        text.contains("was not accepted") && !text.contains("panicked"),
        "{text}"
    );

    // A canary pasted here is refused exactly as a revoked token is, and recorded.
    let tokens = url(&format!("/api/v1/organizations/{}/api-tokens", org.id));
    let create = |body: serde_json::Value| {
        http.post(tokens.clone())
            .bearer_auth(&org.token)
            .json(&body)
            .send()
    };
    let canary: serde_json::Value = create(serde_json::json!({"name": "bait", "canary": true}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let old: serde_json::Value = create(serde_json::json!({"name": "old"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let revoked = http
        .delete(format!("{tokens}/{}", old["id"].as_str().unwrap()))
        .bearer_auth(&org.token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let secret = |v: &serde_json::Value| v["token"].as_str().unwrap().to_string();
    let with_canary = sign_in(Some(login_cookie.clone()), &login_cookie, &secret(&canary))
        .await
        .unwrap();
    let with_revoked = sign_in(Some(login_cookie.clone()), &login_cookie, &secret(&old))
        .await
        .unwrap();
    assert_eq!(with_canary.status(), 401);
    assert_eq!(with_canary.status(), with_revoked.status());
    // The same page, but for the fresh CSRF token each answer carries.
    let page = |html: String| html.replace(&csrf_in(&html), "CSRF");
    assert_eq!(
        page(with_canary.text().await.unwrap()),
        page(with_revoked.text().await.unwrap())
    );
    let events = url(&format!(
        "/api/v1/organizations/{}/audit-events?action=credential.canary_triggered",
        org.id
    ));
    let mut recorded = serde_json::Value::Null;
    for _ in 0..100 {
        let page: serde_json::Value = http
            .get(events.clone())
            .bearer_auth(&org.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(event) = page["items"].get(0) {
            recorded = event.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(recorded["details"]["surface"], "console", "{recorded}");
    assert_eq!(
        recorded["details"]["route"], "POST /console/login",
        "{recorded}"
    );
    assert_eq!(recorded["target"]["id"], canary["id"], "{recorded}");

    let signed_in = sign_in(Some(login_cookie.clone()), &login_cookie, &org.token)
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    assert_eq!(header(&signed_in, "location"), "/console");
    let (session, attributes) = set_cookie(&signed_in, "__Host-keyplane_session");
    for attribute in ["Path=/", "HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(attributes.contains(attribute), "{attributes}");
    }
    assert!(!header(&signed_in, "set-cookie").contains(&org.token));
    let cookie = format!("__Host-keyplane_session={session}");

    let overview = http
        .get(url("/console"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    let page = overview.text().await.unwrap();
    assert!(page.contains("<h1>Overview</h1>") && !page.contains(&org.token));
    let csrf = csrf_in(&page);
    // An id that is not UTF-8 once decoded names nothing: the console's own not-found page.
    for path in ["/console/api-tokens/%FF/rotate", "/console/webhooks/%C3%28"] {
        let odd = http
            .get(url(path))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(odd.status(), 404, "{path}");
        assert!(
            header(&odd, "content-type").starts_with("text/html"),
            "{path}"
        );
        assert_eq!(header(&odd, "x-frame-options"), "DENY", "{path}");
    }

    let invalid = http
        .post(url("/console/api-tokens"))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("name", "   "),
            ("scopes", "api_tokens:read"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 422);
    assert!(header(&invalid, "content-type").starts_with("text/html"));
    // The form again, the problem in its summary and at its field.
    let refused = invalid.text().await.unwrap();
    assert!(
        refused.contains("<title>Error: API tokens")
            && refused.contains("Name: must have at least 1 character")
            && refused.contains("aria-invalid=\"true\" aria-describedby=\"name-error\""),
        "{refused}"
    );

    // Sessions live in the store: a restarted server (or another replica) knows this one.
    drop(keyplane);
    let restarted = Keyplane::start(
        &store,
        &["--console-https", "--webhook-allow-private-targets"],
        LIMIT,
    )
    .await;
    let again = http
        .get(restarted.url("/console/api-tokens"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "the session outlives a restart");

    // A webhook for the tokens below: its deliveries page as the audit log does.
    let receiver = Receiver::start(LIMIT).await;
    let hook: serde_json::Value = restarted
        .http
        .post(restarted.url(&format!("/api/v1/organizations/{}/webhooks", org.id)))
        .bearer_auth(&org.token)
        .json(&serde_json::json!({"url": receiver.url, "events": ["api_token.*"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hook_id = hook["id"].as_str().expect("a webhook id").to_owned();

    // The audit log pages 50 events at a time, newest first.
    for i in 0..55 {
        restarted
            .create_token(&org, &format!("paged-{i:02}"), &["api_tokens:read"], None)
            .await;
    }
    let audit_page = |query: String| {
        http.get(restarted.url(&format!("/console/audit{query}")))
            .header("cookie", &cookie)
            .send()
    };
    let newest = audit_page(String::new())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(newest.matches("<tr><td data-label=\"When\">").count(), 50);
    assert!(
        newest.contains("paged-54") && !newest.contains("paged-04"),
        "newest first"
    );
    let older = newest
        .split("before=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("an \"Older events\" link");
    let oldest = audit_page(format!("?before={older}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(oldest.contains("paged-04") && oldest.contains("organization.created"));
    assert!(
        !oldest.contains("paged-54") && !oldest.contains("rel=\"next\""),
        "the last page"
    );
    let filtered = audit_page("?action=organization.&outcome=success".into())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        filtered.matches("<tr><td data-label=\"When\">").count(),
        1,
        "the action filter"
    );

    // A webhook's deliveries: 50 a page, newest first, then the older ones; a bad filter is a
    // message page.
    let deliveries = |query: String| {
        http.get(restarted.url(&format!("/console/webhooks/{hook_id}/deliveries{query}")))
            .header("cookie", &cookie)
            .send()
    };
    let first_page = deliveries(String::new()).await.unwrap();
    assert_eq!(first_page.status(), 200);
    let first_page = first_page.text().await.unwrap();
    assert_eq!(first_page.matches("<td data-label=\"Status\">").count(), 50);
    let cursor = first_page
        .split("cursor=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("an \"Older deliveries\" link");
    let last_page = deliveries(format!("?cursor={cursor}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(last_page.matches("<td data-label=\"Status\">").count(), 5);
    assert!(!last_page.contains("rel=\"next\""), "the last page");
    let bad = deliveries("?status=lost".into()).await.unwrap();
    assert_eq!(bad.status(), 422);
    assert!(bad.text().await.unwrap().contains("Choose a status filter"));
    drop(receiver);

    let logout = |csrf: &str| {
        http.post(restarted.url("/console/logout"))
            .header("cookie", &cookie)
            .form(&[("csrf", csrf)])
            .send()
    };
    assert_eq!(
        logout("").await.unwrap().status(),
        403,
        "sign-out without CSRF"
    );
    let out = logout(&csrf).await.unwrap();
    assert_eq!(out.status(), 303);
    assert_eq!(header(&out, "location"), "/console/login?signed_out=1");
    let after = http
        .get(restarted.url("/console"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 303, "the session ended on the server");
}

/// The one-time secret on the secret page.
fn secret_in(html: &str) -> String {
    let field = "class=\"secret\" value=\"";
    let start = html.find(field).expect("the secret on the page") + field.len();
    html[start..start + html[start..].find('"').unwrap()].to_owned()
}

/// A browser without JavaScript: one session cookie (`keyplane_session`, plain http), updated from
/// every answer's `Set-Cookie` as a browser would, and redirects shown rather than followed.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: Option<String>,
}

impl Browser {
    fn new(keyplane: &Keyplane) -> Self {
        Self {
            http: manual_client(),
            base: keyplane.url(""),
            session: None,
        }
    }

    fn keep_cookie(&mut self, response: &reqwest::Response) {
        for line in response.headers().get_all("set-cookie") {
            let line = line.to_str().unwrap();
            if let Some(rest) = line.strip_prefix("keyplane_session=") {
                let value = rest.split(';').next().unwrap();
                self.session =
                    (!value.is_empty() && !line.contains("Max-Age=0")).then(|| value.to_owned());
            }
        }
    }

    fn with_cookie(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.session {
            Some(session) => request.header("cookie", format!("keyplane_session={session}")),
            None => request,
        }
    }

    async fn get(&mut self, path: &str) -> reqwest::Response {
        let request = self.with_cookie(self.http.get(format!("{}{path}", self.base)));
        let response = request.send().await.unwrap();
        self.keep_cookie(&response);
        response
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let request = self.with_cookie(self.http.post(format!("{}{path}", self.base)).form(form));
        let response = request.send().await.unwrap();
        self.keep_cookie(&response);
        response
    }

    /// Signs in with `token` through the sign-in form (its CSRF cookie sent by hand).
    async fn sign_in(&mut self, token: &str) {
        let login = self.get("/console/login").await;
        let (csrf, _) = set_cookie(&login, "keyplane_login");
        let signed_in = self
            .http
            .post(format!("{}/console/login", self.base))
            .header("cookie", format!("keyplane_login={csrf}"))
            .form(&[("csrf", csrf.as_str()), ("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(signed_in.status(), 303, "signing in");
        self.keep_cookie(&signed_in);
        assert!(self.session.is_some(), "a session cookie");
    }

    /// Rotates `path` (`/console/<kind>/<id>/rotate`) with the pre-selected grace, "it stops
    /// now", and reads the secret page it leads to; checks the secret stays out of URLs and
    /// cookies.
    async fn rotate_now(&mut self, path: &str) -> String {
        let form = self.get(path).await;
        assert_eq!(form.status(), 200, "the rotate page");
        let form = form.text().await.unwrap();
        assert!(
            form.contains("value=\"0\" checked"),
            "\"it stops now\" is pre-selected"
        );
        let rotated = self
            .post(path, &[("csrf", &csrf_in(&form)), ("grace_seconds", "0")])
            .await;
        assert_eq!(rotated.status(), 303, "rotating");
        assert_eq!(header(&rotated, "location"), "/console/secret");
        let cookies = header(&rotated, "set-cookie");
        let shown = self.get("/console/secret").await;
        assert_eq!(
            shown.status(),
            200,
            "the secret page, not {:?}",
            header(&shown, "location")
        );
        let page = shown.text().await.unwrap();
        let secret = secret_in(&page);
        assert!(secret.len() > 20, "{secret:?}");
        assert!(
            !cookies.contains(&secret),
            "the secret stays out of cookies"
        );
        assert_eq!(page.matches(&secret).count(), 1, "shown once on the page");
        let again = self.get("/console/secret").await;
        assert_eq!(again.status(), 410, "the secret page shows it only once");
        assert!(!again.text().await.unwrap().contains(&secret));
        secret
    }
}

/// Rotating, with "it stops now", the very credential the session signed in with: the session
/// moves to the new secret, so the secret page shows it (once) and the user stays signed in. For
/// an API token and a service account, the kinds one signs in with.
async fn console_rotating_own_credential(backend: Backend) {
    let store = TestStore::new(backend).await;
    let keyplane = Keyplane::start(&store, &[], LIMIT).await;
    let org = store.bootstrap_org();
    let status = |token: String, path: String| {
        let request = keyplane.http.get(keyplane.url(&path)).bearer_auth(token);
        async move { request.send().await.unwrap().status() }
    };

    let token = keyplane
        .create_token(
            &org,
            "console-self",
            &["api_tokens:read", "api_tokens:write", "auth.manage"],
            None,
        )
        .await;
    let mut browser = Browser::new(&keyplane);
    browser.sign_in(&token.secret).await;
    let new = browser
        .rotate_now(&format!("/console/api-tokens/{}/rotate", token.id))
        .await;
    assert_ne!(new, token.secret);
    let tokens = keyplane.tokens_url(&org.id).replace(&keyplane.url(""), "");
    assert_eq!(
        status(new.clone(), tokens.clone()).await,
        200,
        "the new secret"
    );
    assert_eq!(status(token.secret.clone(), tokens.clone()).await, 401);
    let still = browser.get("/console/api-tokens").await;
    assert_eq!(still.status(), 200, "still signed in");
    assert!(still.text().await.unwrap().contains("console-self"));

    // A service account with `auth.manage`, created and granted in the console, signs in with
    // its own secret and rotates it.
    let page = browser
        .get("/console/service-accounts")
        .await
        .text()
        .await
        .unwrap();
    let created = browser
        .post(
            "/console/service-accounts",
            &[
                ("csrf", &csrf_in(&page)),
                ("name", "console-account-self"),
                ("expires_in_days", "30"),
            ],
        )
        .await;
    assert_eq!(header(&created, "location"), "/console/secret");
    let page = browser.get("/console/secret").await.text().await.unwrap();
    let account_secret = secret_in(&page);
    let account_id = page[page.find("(<code>").unwrap() + 7..]
        .split('<')
        .next()
        .unwrap()
        .to_owned();
    let granted = browser
        .post(
            &format!("/console/service-accounts/{account_id}/grants"),
            &[("csrf", &csrf_in(&page)), ("right", "auth.manage")],
        )
        .await;
    assert_eq!(granted.status(), 303, "granting auth.manage");

    let mut account = Browser::new(&keyplane);
    account.sign_in(&account_secret).await;
    let new_account_secret = account
        .rotate_now(&format!("/console/service-accounts/{account_id}/rotate"))
        .await;
    assert_ne!(new_account_secret, account_secret);
    let accounts = format!("/v1/public/accounts/{}/auth/service-accounts", org.id);
    assert_eq!(
        status(new_account_secret, accounts.clone()).await,
        200,
        "the service account's new secret"
    );
    assert_eq!(status(account_secret, accounts).await, 401);
    let still = account.get("/console/service-accounts").await;
    assert_eq!(
        still.status(),
        200,
        "the service account is still signed in"
    );
}

/// `--console=false`: no console routes at all; the API is unaffected.
async fn console_can_be_turned_off(backend: Backend) {
    let store = TestStore::new(backend).await;
    let keyplane = Keyplane::start(&store, &["--console=false"], LIMIT).await;
    for path in ["/console", "/console/login", "/console/api-tokens"] {
        let response = keyplane.http.get(keyplane.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path} with the console off");
    }
    let org = store.bootstrap_org();
    let listed = keyplane
        .http
        .get(keyplane.tokens_url(&org.id))
        .bearer_auth(&org.token)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    drop(keyplane);

    let on = Keyplane::start(&store, &[], LIMIT).await;
    let response = on.http.get(on.url("/console/login")).send().await.unwrap();
    assert_eq!(response.status(), 200, "the console is on by default");
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none(),
        "over plain http, no HSTS"
    );
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn console_dir() -> PathBuf {
    manifest_dir().join("tests/console")
}

fn provider_dir() -> PathBuf {
    manifest_dir().join("../server/tests/oidc-provider")
}

/// `npm ci` in `dir` unless each of `packages` is installed there already.
async fn npm_ci(dir: &Path, packages: &[&str]) {
    // The tests run in parallel: without the lock one finds `package` half written by the
    // other's `npm ci` and node fails to parse its files.
    static INSTALLING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _installing = INSTALLING.lock().await;
    let installed = |package: &&str| {
        dir.join("node_modules")
            .join(package)
            .join("package.json")
            .exists()
    };
    if packages.iter().all(installed) {
        return;
    }
    let output = run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
            .current_dir(dir),
        Duration::from_secs(300),
    )
    .await;
    assert!(
        output.status.success(),
        "`npm ci` in {} failed; the console tests need Node.js with npm and the npm registry \
         once:\n{}",
        dir.display(),
        output.describe()
    );
}

fn require_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "the console tests drive Debian's Chromium at {CHROMIUM}, which is missing: install it \
         with `apt-get install chromium` (scripts/test does when run as root)"
    );
}

/// The OIDC provider with the console's client, killed when dropped.
struct Provider {
    _process: KillOnDrop,
    issuer: String,
}

impl Provider {
    fn start(port: u16, keys_file: &Path, console_callback: &str) -> Self {
        let mut child = Command::new("node")
            .arg("provider.mjs")
            .current_dir(provider_dir())
            .env("PORT", port.to_string())
            .env("KEYS_FILE", keys_file)
            .env("AUDIENCE", AUDIENCE)
            .env("CONSOLE_REDIRECT_URI", console_callback)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node provider.mjs");
        let stdout = child.stdout.take().expect("piped stdout");
        let process = KillOnDrop(child);
        let (ready, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(issuer) = line.strip_prefix("listening on ") {
                    let _ = ready.send(issuer.to_string());
                }
            }
        });
        let issuer = listening
            .recv_timeout(LIMIT)
            .expect("the OIDC provider prints `listening on` within the limit");
        Self {
            _process: process,
            issuer,
        }
    }
}

async fn console_end_to_end(backend: Backend) {
    require_chromium();
    npm_ci(&console_dir(), CONSOLE_PACKAGES).await;
    npm_ci(&provider_dir(), &["oidc-provider"]).await;

    let store = TestStore::new(backend).await;
    let provider_port = free_loopback_port();
    let issuer = format!("http://127.0.0.1:{provider_port}");
    let keyplane = Keyplane::start(
        &store,
        &[
            "--webhook-allow-private-targets",
            "--oidc-issuer",
            &issuer,
            "--oidc-audience",
            AUDIENCE,
            "--console-oidc-client-id",
            "keyplane-console",
            "--console-oidc-scope",
            "openid keyplane",
        ],
        LIMIT,
    )
    .await;
    let keys = tempfile::tempdir().expect("a temporary directory");
    let provider = Provider::start(
        provider_port,
        &keys.path().join("keys.json"),
        &keyplane.url("/console/oidc/callback"),
    );
    assert_eq!(provider.issuer, issuer);

    let org = store.bootstrap_org();
    let reader = keyplane
        .create_token(&org, "reader", &["api_tokens:read"], None)
        .await;
    let mut grant = keyplane_command(&["admin", "grant", "--org", &org.id]);
    grant
        .args([
            "--user-sub",
            OIDC_USER,
            "--issuer",
            &issuer,
            "--account-owner",
        ])
        .args(store.args());
    let granted = run(&mut grant, LIMIT).await;
    assert!(granted.status.success(), "{}", granted.describe());
    // A second organization where the user may only read tokens: the console offers to switch.
    let mut create = keyplane_command(&["admin", "create-org", "--name", "second", "--json"]);
    create.args(store.args());
    let created = run(&mut create, LIMIT).await;
    assert!(created.status.success(), "{}", created.describe());
    let second = Org::from_json(created.stdout.trim());
    let mut grant = keyplane_command(&["admin", "grant", "--org", &second.id]);
    grant
        .args(["--user-sub", OIDC_USER, "--issuer", &issuer])
        .args(["--capability", "api_tokens:read"])
        .args(store.args());
    let granted = run(&mut grant, LIMIT).await;
    assert!(granted.status.success(), "{}", granted.describe());

    let receiver = Receiver::start(LIMIT).await;

    let mut spec = Command::new("node");
    spec.arg("console.spec.mjs")
        .current_dir(console_dir())
        .env("KP_URL", keyplane.url(""))
        .env("KP_ORG", &org.id)
        .env("KP_ROOT", &org.token)
        .env("KP_READER", &reader.secret)
        .env("KP_HOOK_URL", &receiver.url)
        .env("KP_OIDC_USER", OIDC_USER);
    // Every run keeps its screenshots under target/; the README's (docs/console/) are refreshed
    // on request, so a test run leaves the tree as it was.
    let shots = if backend == Backend::Sqlite
        && std::env::var_os("KEYPLANE_UPDATE_SCREENSHOTS").is_some()
    {
        manifest_dir().join("../../docs/console")
    } else {
        manifest_dir().join(format!("../../target/console-screenshots/{backend:?}"))
    };
    spec.env("KP_SHOTS", &shots);
    let output = run(&mut spec, SPEC_LIMIT).await;
    println!("{}", output.stdout);
    assert!(
        output.status.success(),
        "the console spec failed:\n{}\nserver log:\n{}",
        output.describe(),
        keyplane.log()
    );
    // The delivery the spec saw, and its retry, reached the receiver (the rotation and deletion
    // events do not match the webhook's `api_token.*`).
    assert_eq!(receiver.count(), 2, "deliveries the receiver answered");
    for secret in [&org.token, &reader.secret] {
        assert!(
            !keyplane.log().contains(secret.as_str()),
            "a token reached the server log"
        );
    }
}

/// The console as a keyboard-only or screen-reader user meets it (`tests/console/a11y.spec.mjs`):
/// signing in, creating a token (a refused form summarised and tied to its fields), reaching and
/// selecting its one-time secret, rotating and revoking it by controls that name it, and signing in
/// again after the session ended, all with the keyboard; each page's landmarks, headings, title,
/// tables and focus ring, and axe-core's WCAG 2.2 A/AA rules. Markup, not storage: SQLite only.
#[tokio::test]
async fn console_accessibility() {
    require_chromium();
    npm_ci(&console_dir(), CONSOLE_PACKAGES).await;
    let store = TestStore::new(Backend::Sqlite).await;
    let keyplane = Keyplane::start(&store, &[], LIMIT).await;
    let org = store.bootstrap_org();
    let mut spec = Command::new("node");
    spec.arg("a11y.spec.mjs")
        .current_dir(console_dir())
        .env("KP_URL", keyplane.url(""))
        .env("KP_ROOT", &org.token);
    let output = run(&mut spec, SPEC_LIMIT).await;
    println!("{}", output.stdout);
    assert!(
        output.status.success(),
        "the accessibility spec failed:\n{}\nserver log:\n{}",
        output.describe(),
        keyplane.log()
    );
}

/// `keyplane <args>` with a clean environment.
fn keyplane_command(args: &[&str]) -> Command {
    let mut command = keyplane();
    command.args(args);
    command
}
