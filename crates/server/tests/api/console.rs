//! The web console over plain HTTP (no browser: `cli/tests/console_e2e.rs` drives one): signing
//! in with a token, and its refusals recorded as the API's are.

use crate::helpers::{both_backends, eventually, test_config, Org, TestApp};
use reqwest::{Method, Response};
use serde_json::Value;
use std::time::Duration;

both_backends!(
    console_refusals_are_recorded_in_the_sessions_organization,
    a_console_page_the_store_cannot_serve_says_when_to_retry,
    two_creates_before_the_secret_page_show_both_secrets_once,
    a_console_secret_outlives_a_store_failure_right_after_its_change,
    a_create_under_way_when_its_session_ends_makes_nothing,
    console_expiry_choices_follow_the_credential_policy,
    the_overview_and_search_see_past_the_first_thousand_tokens,
    a_canary_shows_as_one_and_offers_no_rotation,
    two_open_sign_in_forms_both_work,
    a_policy_lifetime_past_ten_years_can_be_chosen,
    signing_in_and_out_of_the_console_is_recorded,
    sessions_end_on_time_on_a_server_with_the_console_off,
    service_account_and_robot_lists_page_past_the_first_thousand,
    a_refused_form_links_back_to_itself,
    a_grant_past_the_cap_is_refused_in_the_console_with_the_limit,
    a_credential_records_whether_the_console_or_the_api_made_it,
    the_console_says_who_created_each_credential_and_grant,
    a_refused_rotation_comes_back_as_sent,
    refused_robot_permissions_come_back_as_sent,
    a_refused_grant_comes_back_at_its_account,
    a_webhook_refused_after_the_forms_checks_comes_back_as_sent,
    a_signed_in_error_page_keeps_the_consoles_navigation,
    an_unknown_console_page_is_the_consoles_own_not_found_page,
    an_expiry_no_form_offers_comes_back_as_sent,
);

/// A signed-in console: its session cookie and CSRF token.
pub struct ConsoleSession {
    cookie: String,
    pub csrf: String,
}

/// The hidden CSRF field's value in a page.
fn csrf_in(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[start..start + html[start..].find('"').unwrap()].to_owned()
}

/// The value of the cookie `name` an answer sets.
pub fn cookie_set(res: &Response, name: &str) -> String {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("a {name} cookie"))
        .to_string()
}

/// Signs in to the console with `token`, as the sign-in form does.
pub async fn sign_in(app: &TestApp, token: &str) -> ConsoleSession {
    sign_in_remembering(app, token, None).await
}

/// Signs in as [`sign_in`] does, from a browser holding `remembered` (`name=value`), the cookie
/// naming the organization last switched to.
pub async fn sign_in_remembering(
    app: &TestApp,
    token: &str,
    remembered: Option<&str>,
) -> ConsoleSession {
    let login = app
        .request(Method::GET, "/console/login", None)
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let login_cookie = cookie_set(&login, "keyplane_login");
    let signed_in = app
        .request(Method::POST, "/console/login", None)
        .header(
            "cookie",
            match remembered {
                Some(remembered) => format!("keyplane_login={login_cookie}; {remembered}"),
                None => format!("keyplane_login={login_cookie}"),
            },
        )
        .form(&[("csrf", login_cookie.as_str()), ("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303, "signing in to the console");
    let cookie = format!(
        "keyplane_session={}",
        cookie_set(&signed_in, "keyplane_session")
    );
    let overview = app
        .request(Method::GET, "/console", None)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    let csrf = csrf_in(&overview.text().await.unwrap());
    ConsoleSession { cookie, csrf }
}

impl ConsoleSession {
    /// Submits a console form at `path`, with the session's CSRF token and `fields`.
    pub async fn post(&self, app: &TestApp, path: &str, fields: &[(&str, &str)]) -> Response {
        let mut form = vec![("csrf", self.csrf.as_str())];
        form.extend_from_slice(fields);
        app.request(Method::POST, path, None)
            .header("cookie", &self.cookie)
            .form(&form)
            .send()
            .await
            .unwrap()
    }
}

impl ConsoleSession {
    /// The page at `path` in this session, asserting 200.
    pub async fn page(&self, app: &TestApp, path: &str) -> String {
        let res = self.get(app, path).await;
        assert_eq!(res.status(), 200, "GET {path}");
        res.text().await.unwrap()
    }

    /// `GET path` in this session.
    pub async fn get(&self, app: &TestApp, path: &str) -> Response {
        app.request(Method::GET, path, None)
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
    }
}

/// The secrets a secret page shows, in order.
fn secrets_in(html: &str) -> Vec<String> {
    html.split("class=\"secret\" value=\"")
        .skip(1)
        .map(|rest| rest[..rest.find('"').unwrap()].to_owned())
        .collect()
}

/// Creates an API token named `name` through the console's form, not following the redirect.
async fn console_create_token(app: &TestApp, console: &ConsoleSession, name: &str) -> Response {
    console
        .post(
            app,
            "/console/api-tokens",
            &[("name", name), ("scopes", "api_tokens:read")],
        )
        .await
}

/// `org`'s `access.denied` events about `target_id`.
pub async fn refusals_of(app: &TestApp, org: &Org, target_id: &str) -> Vec<Value> {
    let page: Value = app
        .get(
            &org.path(&format!(
                "/audit-events?action=access.denied&target_id={target_id}"
            )),
            &org.token,
        )
        .await
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

/// A console path names no organization: a refusal there is the session's organization's, its
/// target the resource the path names (as the API's refusal of the same action is).
async fn console_refusals_are_recorded_in_the_sessions_organization(
    backend: keyplane_store::testing::Backend,
) {
    let config = keyplane_server::Config {
        audit_refusal_window: Duration::from_millis(100),
        ..test_config()
    };
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let reader = app.create_token(&org, "reader", &["api_tokens:read"]).await;
    let console = sign_in(&app, reader["token"].as_str().unwrap()).await;

    let checks = [
        ("api-tokens", "rotate", "api_token"),
        ("service-accounts", "revoke", "service_account"),
        ("robots", "rotate", "robot_account"),
        ("webhooks", "delete", "webhook"),
    ];
    let mut attempted = Vec::new();
    for (kind, action, target_type) in checks {
        let id = uuid::Uuid::new_v4().to_string();
        let path = format!("/console/{kind}/{id}/{action}");
        let res = console.post(&app, &path, &[]).await;
        let status = res.status().as_u16();
        assert!(status == 403 || status == 404, "{path}: {status}");
        attempted.push((
            id,
            format!("POST /console/{kind}/{{id}}/{action}"),
            target_type,
        ));
    }
    for (id, route, target_type) in &attempted {
        eventually(&format!("the refusal of {route} is recorded"), || async {
            !refusals_of(&app, &org, id).await.is_empty()
        })
        .await;
        let events = refusals_of(&app, &org, id).await;
        assert_eq!(events.len(), 1, "{events:#?}");
        let event = &events[0];
        assert_eq!(event["target"]["type"], *target_type, "{event}");
        assert_eq!(event["details"]["org_id"], org.id.as_str(), "{event}");
        assert_eq!(event["details"]["attempted"], route.as_str(), "{event}");
        assert_eq!(event["actor"]["id"], reader["id"], "{event}");
    }
    // Nothing recorded as if the resource's id were an organization.
    let page: Value = app
        .get(&org.path("/audit-events?action=access.denied"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    for event in page["items"].as_array().unwrap() {
        assert_eq!(event["details"]["org_id"], org.id.as_str(), "{event}");
    }
}

/// A console page refused because the store is unavailable says when to try again
/// (`Retry-After`), as the APIs' 503 does: a browser or a proxy in front can wait and retry. And
/// the request log records it as a failure.
async fn a_console_page_the_store_cannot_serve_says_when_to_retry(
    backend: keyplane_store::testing::Backend,
) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, test_config()).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    store.set_down(true);
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let page = app
        .request(Method::GET, "/console/api-tokens", None)
        .header("cookie", &console.cookie)
        .header("x-request-id", &request_id)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 503);
    // Logged as a failure, with its cause, as the APIs' 503s are.
    let logged = crate::logs::captured();
    assert!(
        logged.lines().any(|line| line.contains(&request_id)
            && line.contains("request failed")
            && line.contains("http.status=503")),
        "no failure logged for request {request_id}"
    );
    let retry_after: u64 = page
        .headers()
        .get("retry-after")
        .expect("a Retry-After on the console's 503")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    assert!(page.text().await.unwrap().contains("role=\"alert\""));
}

/// Two creates in one session before its secret page is seen (two tabs, a double click): each
/// secret is kept, the secret page shows both, once, and each works.
async fn two_creates_before_the_secret_page_show_both_secrets_once(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    for name in ["first-tab", "second-tab"] {
        let res = console_create_token(&app, &console, name).await;
        assert_eq!(res.status(), 303, "creating {name}");
        assert_eq!(res.headers()["location"], "/console/secret");
    }
    let page = console.get(&app, "/console/secret").await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let secrets = secrets_in(&html);
    assert_eq!(secrets.len(), 2, "{html}");
    assert!(
        html.find("first-tab").unwrap() < html.find("second-tab").unwrap(),
        "each secret says whose it is, oldest first: {html}"
    );
    for secret in &secrets {
        let res = app.get(&org.path("/api-tokens"), secret).await;
        assert_eq!(res.status(), 200, "a shown secret works");
    }
    let again = console.get(&app, "/console/secret").await;
    assert_eq!(again.status(), 410, "shown once");
    assert!(secrets_in(&again.text().await.unwrap()).is_empty());
}

/// The store failing right after a create committed loses nothing: the secret was kept with the
/// change, and the secret page shows it once the store is back.
async fn a_console_secret_outlives_a_store_failure_right_after_its_change(
    backend: keyplane_store::testing::Backend,
) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, test_config()).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    store.go_down_after_next_change();
    let res = console_create_token(&app, &console, "kept").await;
    assert_eq!(
        res.headers()["location"],
        "/console/secret",
        "{}",
        res.status()
    );
    store.set_down(false);
    let page = console.get(&app, "/console/secret").await;
    assert_eq!(page.status(), 200);
    let secrets = secrets_in(&page.text().await.unwrap());
    assert_eq!(secrets.len(), 1);
    let res = app.get(&org.path("/api-tokens"), &secrets[0]).await;
    assert_eq!(res.status(), 200, "the shown secret is the live one");
}

/// Signing out (in another tab) while a create is under way: the create fails and no credential
/// is made whose secret nobody could see.
async fn a_create_under_way_when_its_session_ends_makes_nothing(
    backend: keyplane_store::testing::Backend,
) {
    let (app, store) = crate::faulty_store::FaultyStore::spawn(backend, test_config()).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    let mut held = store.hold_next_change();
    let (res, ()) = tokio::join!(console_create_token(&app, &console, "orphan"), async {
        held.reached().await;
        let out = console.post(&app, "/console/logout", &[]).await;
        assert_eq!(out.status(), 303, "signed out");
        held.release();
    });
    assert_ne!(
        res.headers().get("location").map(|l| l.to_str().unwrap()),
        Some("/console/secret"),
        "no secret page for a session that ended"
    );
    let again = sign_in(&app, &org.token).await;
    let list = again.get(&app, "/console/api-tokens").await;
    assert_eq!(list.status(), 200);
    let html = list.text().await.unwrap();
    assert!(
        html.contains("bootstrap") && !html.contains("orphan"),
        "{html}"
    );
}

/// A new API token named `name` of `org`, expiring `days` days from now, as the API answers it.
async fn token_expiring_in(app: &TestApp, org: &Org, name: &str, days: i64) -> Value {
    let at = (chrono::Utc::now() + chrono::TimeDelta::days(days)).to_rfc3339();
    let body = serde_json::json!({"name": name, "scopes": ["api_tokens:read"], "expires_at": at});
    crate::canary::create_api_token(app, org, body).await
}

/// The value a page's `<select name="name">` has preselected.
fn selected_in(html: &str, name: &str) -> String {
    let select = &html[html
        .find(&format!("<select id=\"{name}\" name=\"{name}\">"))
        .unwrap_or_else(|| panic!("a {name} choice: {html}"))..];
    let select = &select[..select.find("</select>").unwrap()];
    let chosen = select
        .split("<option ")
        .find(|o| o.contains(" selected>"))
        .unwrap_or_else(|| panic!("a preselected {name}: {select}"));
    let start = chosen.find("value=\"").unwrap() + 7;
    chosen[start..start + chosen[start..].find('"').unwrap()].to_owned()
}

/// The console's expiry choices follow the organization's credential policy: a token whose
/// expiry the policy no longer allows can be rotated with the choice the rotate form preselects,
/// and a create with the form's preselected expiry succeeds under a short maximum lifetime.
async fn console_expiry_choices_follow_the_credential_policy(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let token = token_expiring_in(&app, &org, "long-lived", 365).await;
    crate::lifecycle::put_policy(
        &app,
        &org,
        serde_json::json!({"all": {"max_lifetime_days": 90}}),
    )
    .await;
    let console = sign_in(&app, &org.token).await;
    let path = format!(
        "/console/api-tokens/{}/rotate",
        token["id"].as_str().unwrap()
    );
    let page = console.page(&app, &path).await;
    let expiry = selected_in(&page, "expires_in_days");
    let rotated = console
        .post(
            &app,
            &path,
            &[("grace_seconds", "0"), ("expires_in_days", &expiry)],
        )
        .await;
    assert_eq!(rotated.status(), 303, "rotating with {expiry}");
    assert_eq!(rotated.headers()["location"], "/console/secret");

    crate::lifecycle::put_policy(
        &app,
        &org,
        serde_json::json!({"all": {"max_lifetime_days": 30}}),
    )
    .await;
    let page = console.page(&app, "/console/api-tokens").await;
    let expiry = selected_in(&page, "expires_in_days");
    assert!(
        !page.contains("value=\"never\""),
        "never is no choice under a maximum"
    );
    let created = create_expiring(&app, &console, "short-lived", &expiry).await;
    assert_eq!(created.status(), 303, "creating with {expiry}");
}

/// Creates an API token named `name` expiring as the form's `expires_in_days` choice says.
async fn create_expiring(
    app: &TestApp,
    console: &ConsoleSession,
    name: &str,
    expiry: &str,
) -> Response {
    let fields = [
        ("name", name),
        ("scopes", "api_tokens:read"),
        ("expires_in_days", expiry),
    ];
    console.post(app, "/console/api-tokens", &fields).await
}

/// An organization with more than a thousand tokens: the newest, expiring in 5 days, is on the
/// overview's expiring list and is found by name; the list pages on to it.
async fn the_overview_and_search_see_past_the_first_thousand_tokens(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    app.import_credentials(&org, keyplane_core::CredentialKind::ApiToken, 1000, |_| {
        false
    })
    .await;
    token_expiring_in(&app, &org, "needle-token", 5).await;
    let console = sign_in(&app, &org.token).await;

    let overview = console.page(&app, "/console").await;
    let expiring = &overview[overview.find("id=\"expiring\"").unwrap()..];
    assert!(expiring.contains("needle-token"), "{expiring}");

    let found = console.page(&app, "/console/api-tokens?q=needle").await;
    assert!(found.contains(">needle-token</a></td>"), "{found}");

    // Without a search, the first page links to the next, which holds the newest.
    let first = console.page(&app, "/console/api-tokens").await;
    assert!(!first.contains("needle-token"));
    let link = "<a rel=\"next\" href=\"";
    let start = first.find(link).expect("a next page") + link.len();
    let next = first[start..start + first[start..].find('"').unwrap()].replace("&amp;", "&");
    let second = console.page(&app, &next).await;
    assert!(second.contains(">needle-token</a></td>"));
}

/// A canary token is listed as a canary, with no Rotate link (rotating one is always refused),
/// and can still be revoked.
async fn a_canary_shows_as_one_and_offers_no_rotation(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    crate::canary::create_api_token(
        &app,
        &org,
        serde_json::json!({"name": "bait", "canary": true}),
    )
    .await;
    let console = sign_in(&app, &org.token).await;
    let page = console.page(&app, "/console/api-tokens").await;
    let row = &page[page.find(">bait</a></td>").expect("the canary listed")..];
    let row = &row[..row.find("</tr>").unwrap()];
    let status = &row[row.find("data-label=\"Status\">").unwrap()..];
    assert!(status.starts_with("data-label=\"Status\">canary"), "{row}");
    assert!(!row.contains("Rotate"), "{row}");
    assert!(row.contains("aria-label=\"Revoke bait\""), "{row}");
}

/// Two sign-in forms open at once (two tabs): the older one still signs in.
async fn two_open_sign_in_forms_both_work(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let first = app
        .request(Method::GET, "/console/login", None)
        .send()
        .await
        .unwrap();
    let login_cookie = cookie_set(&first, "keyplane_login");
    let first_csrf = csrf_in(&first.text().await.unwrap());
    let second = app
        .request(Method::GET, "/console/login", None)
        .header("cookie", format!("keyplane_login={login_cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    // The browser now holds what the second page set.
    let held = cookie_set(&second, "keyplane_login");
    let signed_in = app
        .request(Method::POST, "/console/login", None)
        .header("cookie", format!("keyplane_login={held}"))
        .form(&[("csrf", first_csrf.as_str()), ("token", org.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303, "the first form signs in");
}

/// A policy may name lifetimes up to 100 years: the create form preselects its default of 5000
/// days, and submitting it makes a token expiring then.
async fn a_policy_lifetime_past_ten_years_can_be_chosen(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    crate::lifecycle::put_policy(
        &app,
        &org,
        serde_json::json!({"all": {"default_lifetime_days": 5000}}),
    )
    .await;
    let console = sign_in(&app, &org.token).await;
    let page = console.page(&app, "/console/api-tokens").await;
    let expiry = selected_in(&page, "expires_in_days");
    assert_eq!(expiry, "5000", "the policy's default is preselected");
    let created = create_expiring(&app, &console, "long-lived", &expiry).await;
    assert_eq!(created.status(), 303, "creating with {expiry} days");
    assert_eq!(created.headers()["location"], "/console/secret");
    let token = listed_token(&app, &org, "long-lived").await;
    let expires_at: chrono::DateTime<chrono::Utc> =
        token["expires_at"].as_str().unwrap().parse().unwrap();
    let expected = chrono::Utc::now() + chrono::TimeDelta::days(5000);
    assert!(
        (expires_at - expected).num_minutes().abs() < 5,
        "expires {expires_at}, about {expected} expected"
    );
}

/// `org`'s token named `name`, as the API lists it.
async fn listed_token(app: &TestApp, org: &Org, name: &str) -> Value {
    let listed: Value = app
        .get(&org.path("/api-tokens"), &org.token)
        .await
        .json()
        .await
        .unwrap();
    listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} listed: {listed}"))
        .clone()
}

/// The id of `org`'s token named `name`.
async fn token_id(app: &TestApp, org: &Org, name: &str) -> String {
    listed_token(app, org, name).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A sign-in to the console is in the organization's trail, as who signed in, from where and
/// how; the sign-out too, about the same session.
async fn signing_in_and_out_of_the_console_is_recorded(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let bootstrap = token_id(&app, &org, "bootstrap").await;
    let console = sign_in(&app, &org.token).await;

    let started = app.audit_events(&org, "console.session_started").await;
    assert_eq!(started.len(), 1, "{started:#?}");
    let start = &started[0];
    assert_eq!(start["actor"]["type"], "api_token", "{start}");
    assert_eq!(start["actor"]["id"], bootstrap.as_str(), "{start}");
    assert_eq!(start["client_ip"], "127.0.0.1", "{start}");
    assert_eq!(start["details"]["method"], "token", "{start}");
    assert_eq!(start["target"]["type"], "console_session", "{start}");
    assert_eq!(start["target"]["name"], "bootstrap", "{start}");
    assert!(app
        .audit_events(&org, "console.session_ended")
        .await
        .is_empty());

    let out = console.post(&app, "/console/logout", &[]).await;
    assert_eq!(out.status(), 303, "signed out");
    let ended = app.audit_events(&org, "console.session_ended").await;
    assert_eq!(ended.len(), 1, "{ended:#?}");
    let end = &ended[0];
    assert_eq!(end["actor"]["id"], bootstrap.as_str(), "{end}");
    assert_eq!(end["client_ip"], "127.0.0.1", "{end}");
    assert_eq!(end["details"]["reason"], "signed_out", "{end}");
    assert_eq!(
        end["target"]["id"], start["target"]["id"],
        "the same session"
    );
}

/// A session signed in while the console was on ends on time, its end recorded and its row (a
/// label and a sealed token) gone, on a server started later with the console turned off.
async fn sessions_end_on_time_on_a_server_with_the_console_off(
    backend: keyplane_store::testing::Backend,
) {
    let config = test_config();
    let clock = config.clock.clone();
    let mut app = TestApp::spawn_with(backend, config.clone()).await;
    let org = app.create_org("acme").await;
    sign_in(&app, &org.token).await;
    app.stop().await;
    let console = keyplane_server::console::ConsoleConfig {
        enabled: false,
        ..Default::default()
    };
    let absolute = console.absolute_timeout;
    let off = app
        .replica_at(
            app.database_url(),
            keyplane_server::Config { console, ..config },
        )
        .await;
    clock.advance(absolute + Duration::from_secs(60));
    eventually("the session's end is recorded", || async {
        !off.audit_events(&org, "console.session_ended")
            .await
            .is_empty()
    })
    .await;
    let ended = off.audit_events(&org, "console.session_ended").await;
    assert_eq!(ended.len(), 1, "{ended:#?}");
    assert_eq!(ended[0]["details"]["reason"], "expired", "{}", ended[0]);
    assert_eq!(ended[0]["actor"]["type"], "system", "{}", ended[0]);
    // Nothing is left for a prune to find, however late.
    let later = clock.now() + chrono::TimeDelta::days(365);
    let left = off
        .app
        .store()
        .prune_console_sessions(
            later,
            later,
            1000,
            &|_: &keyplane_store::ConsoleSession| -> keyplane_core::AuditEvent {
                panic!("no console session should be left to prune")
            },
        )
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// The first page of `list` does not show `name`; its next page does, and links back.
async fn found_on_the_next_page(app: &TestApp, console: &ConsoleSession, list: &str, name: &str) {
    let first = console.page(app, list).await;
    assert!(!first.contains(name), "{name} on the first page");
    let link = "<a rel=\"next\" href=\"";
    let start = first.find(link).expect("a next page") + link.len();
    let next = first[start..start + first[start..].find('"').unwrap()].replace("&amp;", "&");
    let second = console.page(app, &next).await;
    assert!(second.contains(name), "{name} on the second page: {second}");
    assert!(
        second.contains(&format!("<a href=\"{list}\">First page</a>")),
        "{second}"
    );
    assert!(!second.contains(link), "no third page");
}

/// More than a thousand service accounts, and robots: the newest of each is a page further.
async fn service_account_and_robot_lists_page_past_the_first_thousand(
    backend: keyplane_store::testing::Backend,
) {
    use keyplane_core::CredentialKind;
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    crate::canary::enable_registry(&app, &org).await;
    for kind in [CredentialKind::ServiceAccount, CredentialKind::RobotAccount] {
        app.import_credentials(&org, kind, 1000, |_| false).await;
    }
    let account = serde_json::json!({"name": "needle-account"});
    crate::canary::create_service_account(&app, &org, account).await;
    let robot = serde_json::json!({"name": "needle-robot", "permissions": ["pull"]});
    crate::canary::create_robot(&app, &org, robot).await;
    let console = sign_in(&app, &org.token).await;
    found_on_the_next_page(
        &app,
        &console,
        "/console/service-accounts",
        "needle-account",
    )
    .await;
    found_on_the_next_page(&app, &console, "/console/registry", "needle-robot").await;
}

/// The link an error page offers.
fn back_link(html: &str) -> String {
    let start = html.find("data-autofocus").expect("a link back");
    let anchor = &html[..start];
    let href = &anchor[anchor.rfind("<a href=\"").expect("an anchor") + 9..];
    href[..href.find('"').unwrap()].to_owned()
}

/// A form refused on a page of its own (here: a stale CSRF token, from a form of an earlier
/// session) links back to that form; a refusal about something that is not there links to the
/// overview.
async fn a_refused_form_links_back_to_itself(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    let stale = |path: &str, fields: &[(&str, &str)]| {
        let mut form = vec![("csrf", "from-an-earlier-session")];
        form.extend_from_slice(fields);
        app.request(Method::POST, path, None)
            .header("cookie", &console.cookie)
            .form(&form)
            .send()
    };
    let refused = stale("/console/api-tokens", &[("name", "stale")])
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let html = refused.text().await.unwrap();
    assert_eq!(back_link(&html), "/console/api-tokens#create", "{html}");

    let rotate = format!(
        "/console/api-tokens/{}/rotate",
        token_id(&app, &org, "bootstrap").await
    );
    let refused = stale(&rotate, &[("expires_in_days", "30")]).await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(back_link(&refused.text().await.unwrap()), rotate);

    let missing = format!("/console/api-tokens/{}/revoke", uuid::Uuid::new_v4());
    let refused = console.post(&app, &missing, &[]).await;
    assert_eq!(refused.status(), 404);
    assert_eq!(back_link(&refused.text().await.unwrap()), "/console");
}

/// A service account holding the most live grants one subject may hold (64, made through the API)
/// is given no more from the console either: the page says why, naming the limit.
async fn a_grant_past_the_cap_is_refused_in_the_console_with_the_limit(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let created: Value = app
        .post(
            &org.account_path("/service-accounts"),
            &org.token,
            serde_json::json!({"name": "deployer"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    for i in 0..keyplane_core::grant::MAX_LIVE_GRANTS_PER_SUBJECT {
        let body = serde_json::json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": id, "capability_key": format!("custom.right{i}")});
        let res = app
            .post(&org.account_path("/authorizations"), &org.token, body)
            .await;
        assert_eq!(res.status(), 201, "grant {i}");
    }
    let console = sign_in(&app, &org.token).await;
    let res = console
        .post(
            &app,
            &format!("/console/service-accounts/{id}/grants"),
            &[("right", "auth.manage")],
        )
        .await;
    assert_eq!(res.status(), 409);
    let page = res.text().await.unwrap();
    assert!(page.contains("64 live grants"), "{page}");
}

/// A credential keeps who made it and which way: the console's and the API's creations by the
/// same token differ only in `via`.
async fn a_credential_records_whether_the_console_or_the_api_made_it(
    backend: keyplane_store::testing::Backend,
) {
    use keyplane_core::{audit::ActorType, Channel, CredentialId, CredentialKind, TenantId};
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    assert_eq!(
        console_create_token(&app, &console, "by-console")
            .await
            .status(),
        303
    );
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            serde_json::json!({"name": "by-api"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let tenant = TenantId::parse(&org.id).unwrap();
    let stored = |name: &'static str| {
        let app = &app;
        let org = &org;
        async move {
            let id = CredentialId::parse(&token_id(app, org, name).await).unwrap();
            app.app
                .store()
                .get_credential(tenant, CredentialKind::ApiToken, id)
                .await
                .unwrap()
                .unwrap()
                .created_by
                .unwrap_or_else(|| panic!("{name} has no creator"))
        }
    };
    let by_console = stored("by-console").await;
    let by_api = stored("by-api").await;
    assert_eq!(by_console.via, Channel::Console);
    assert_eq!(by_api.via, Channel::Api);
    let bootstrap = token_id(&app, &org, "bootstrap").await;
    for by in [&by_console, &by_api] {
        assert_eq!(by.actor_type, ActorType::ApiToken);
        assert_eq!(
            by.actor_id.map(|id| id.to_string()),
            Some(bootstrap.clone())
        );
        assert_eq!(by.operator, None);
    }
}

/// `html` without its tags, runs of white space made one space.
fn text_of(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The text of the cell labelled `label` in the table row of `name` (its name links to its page).
fn cell_of(html: &str, name: &str, label: &str) -> String {
    let start = html
        .find(&format!(">{name}</a></td>"))
        .unwrap_or_else(|| panic!("a row of {name}: {html}"));
    let row = &html[start..];
    let row = &row[..row.find("</tr>").expect("the row's end")];
    let opening = format!("<td data-label=\"{label}\">");
    let cell = &row[row
        .find(&opening)
        .unwrap_or_else(|| panic!("a {label} cell in the row of {name}: {row}"))
        + opening.len()..];
    text_of(&cell[..cell.find("</td>").expect("the cell's end")])
}

/// An access review reads who made each credential and grant in the console: a token created
/// through the API or in the console (the creator named, as the page lists it), by an admin
/// command (its operator and OS user), or before creators were recorded; and each grant.
async fn the_console_says_who_created_each_credential_and_grant(
    backend: keyplane_store::testing::Backend,
) {
    use keyplane_core::{Channel, CreatedBy, CredentialKind, NewCredential, Operator, ScopeSet};
    let app = TestApp::spawn(backend).await;
    let alice = Operator {
        os_user: "root".into(),
        name: Some("alice".into()),
    };
    let created = keyplane_server::ops::create_org(app.app.store().as_ref(), "acme", &alice)
        .await
        .unwrap();
    let org = Org {
        id: created.tenant.id.to_string(),
        token: created.token.secret.expose_secret().to_string(),
    };
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            serde_json::json!({"name": "by-api"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    // A row from before creators were recorded.
    let (mut legacy, _) = NewCredential {
        tenant_id: created.tenant.id,
        kind: CredentialKind::ApiToken,
        name: "legacy".into(),
        scopes: ScopeSet::empty(),
        permissions: Vec::new(),
        expires_at: None,
        created_by: CreatedBy::system(Channel::Admin),
        canary: false,
    }
    .issue(keyplane_server::ops::now(), &mut rand::rngs::OsRng);
    legacy.created_by = None;
    app.app
        .store()
        .import_credentials(&[legacy], &[])
        .await
        .unwrap();
    let console = sign_in(&app, &org.token).await;
    assert_eq!(
        console_create_token(&app, &console, "by-console")
            .await
            .status(),
        303
    );
    let tokens = console.page(&app, "/console/api-tokens").await;
    for (name, creator) in [
        ("by-api", "API token bootstrap via API"),
        ("by-console", "API token bootstrap via console"),
        (
            "bootstrap",
            "system via admin (operator alice, OS user root)",
        ),
        ("legacy", "unknown (created before this was recorded)"),
    ] {
        assert_eq!(cell_of(&tokens, name, "Created by"), creator, "{name}");
    }
    assert!(
        tokens.contains("<th scope=\"col\">Created by</th>"),
        "the column is labelled"
    );
    // The name field stops no one short of the rule's 120 characters, which a browser's
    // `maxlength` counts in UTF-16 units (two for a character past U+FFFF, an emoji).
    let max_name = format!(
        "maxlength=\"{}\"",
        2 * keyplane_core::validate::MAX_NAME_CHARS
    );
    assert!(
        tokens.contains(&max_name),
        "the API token form's name field: {tokens}"
    );
    // Nor do the webhook form's fields: a description of 500 characters, a URL of 2048 bytes
    // (never fewer UTF-16 units than bytes).
    let hooks = console.page(&app, "/console/webhooks").await;
    for (field, max) in [("description", "1000"), ("url", "2048")] {
        let start = hooks.find(&format!("id=\"{field}\"")).expect(field);
        let input = &hooks[start..start + hooks[start..].find('>').unwrap()];
        assert!(input.contains(&format!("maxlength=\"{max}\"")), "{input}");
    }

    // The service account is made by another token, which its page does not list.
    let ci: Value = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            serde_json::json!({"name": "ci-deploy", "scopes": ["*"]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let account: Value = app
        .post(
            &org.account_path("/service-accounts"),
            ci["token"].as_str().unwrap(),
            serde_json::json!({"name": "deployer"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = account["id"].as_str().unwrap();
    let body = serde_json::json!({"grant_kind": "capability", "subject_type": "service_account", "subject_id": id, "capability_key": "audit:read"});
    let res = app
        .post(&org.account_path("/authorizations"), &org.token, body)
        .await;
    assert_eq!(res.status(), 201);
    let res = console
        .post(
            &app,
            &format!("/console/service-accounts/{id}/grants"),
            &[("right", "registry:read")],
        )
        .await;
    assert_eq!(res.status(), 303);
    let accounts = console.page(&app, "/console/service-accounts").await;
    assert!(
        accounts.contains(&max_name),
        "the service-account form's name field"
    );
    assert_eq!(
        cell_of(&accounts, "deployer", "Created by"),
        format!("API token {} via API", ci["id"].as_str().unwrap()),
        "a creator the page does not list is shown by its id"
    );
    let grants = cell_of(&accounts, "deployer", "Grants");
    for grant in [
        "audit:read created by API token bootstrap via API",
        "registry:read created by API token bootstrap via console",
    ] {
        assert!(grants.contains(grant), "{grant:?} in {grants:?}");
    }

    // A credential's own page reads its creator once, for its name, and lists its grants.
    let detail = console
        .page(&app, &format!("/console/service-accounts/{id}"))
        .await;
    assert_eq!(
        fact_of(&detail, "Created by"),
        "API token ci-deploy via API"
    );
    let grants = fact_of(&detail, "Grants");
    for grant in [
        "audit:read created by API token bootstrap via API",
        "registry:read created by API token bootstrap via console",
    ] {
        assert!(grants.contains(grant), "{grant:?} in {grants:?}");
    }
    let by_api = token_id(&app, &org, "by-api").await;
    let detail = console
        .page(&app, &format!("/console/api-tokens/{by_api}"))
        .await;
    assert_eq!(
        fact_of(&detail, "Created by"),
        "API token bootstrap via API"
    );
    assert!(
        tokens.contains(&format!("href=\"/console/api-tokens/{by_api}\">by-api</a>")),
        "the list links to it"
    );
}

/// The text of the definition of `term` in a page's definition list.
fn fact_of(html: &str, term: &str) -> String {
    let opening = format!("<dt>{term}</dt><dd>");
    let start = html
        .find(&opening)
        .unwrap_or_else(|| panic!("a {term} fact: {html}"))
        + opening.len();
    text_of(&html[start..start + html[start..].find("</dd>").expect("its end")])
}

/// A form shown again after a refusal (422): the summary, announced, names `label` and links to
/// the field `id`, which is marked invalid and described by its problem; `sent` is on the page.
fn assert_refilled(html: &str, id: &str, label: &str, sent: &str) {
    assert!(
        html.contains("class=\"error error-summary\" role=\"alert\""),
        "a summary: {html}"
    );
    assert!(
        html.contains(&format!("<a href=\"#{id}\">{label}: ")),
        "the summary names {label}: {html}"
    );
    assert!(
        html.contains(&format!("id=\"{id}\"")) && html.contains(&format!("id=\"{id}-error\"")),
        "the field {id} and its problem: {html}"
    );
    let described = "aria-invalid=\"true\" aria-describedby=\"";
    let marked = html.split(&described).skip(1).any(|rest| {
        rest[..rest.find('"').unwrap()]
            .split(' ')
            .any(|id_of| id_of == format!("{id}-error"))
    });
    assert!(marked, "{id} is marked invalid: {html}");
    assert!(html.contains(sent), "{sent} comes back: {html}");
}

/// A rotation refused for its expiry, or for a grace period no form offers, comes back as the
/// rotate form with what was chosen, each problem at its field.
async fn a_refused_rotation_comes_back_as_sent(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    let rotate = format!(
        "/console/api-tokens/{}/rotate",
        token_id(&app, &org, "bootstrap").await
    );
    let refused = console
        .post(
            &app,
            &rotate,
            &[("grace_seconds", "3600"), ("expires_on", "2020-01-01")],
        )
        .await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(&html, "expires_on", "Expiry date", "value=\"2020-01-01\"");
    assert!(
        html.contains("value=\"3600\" checked"),
        "the grace chosen: {html}"
    );

    let refused = console.post(&app, &rotate, &[("grace_seconds", "5")]).await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(
        &html,
        "grace_seconds",
        "The current secret keeps working",
        "Choose a grace period from the list.",
    );
    assert!(
        html.contains(&format!("action=\"{rotate}\"")),
        "the rotate form: {html}"
    );
}

/// A robot's permissions refused come back in the permissions form as typed.
async fn refused_robot_permissions_come_back_as_sent(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    crate::canary::enable_registry(&app, &org).await;
    let robot = serde_json::json!({"name": "builder", "permissions": ["pull"]});
    let robot = crate::canary::create_robot(&app, &org, robot).await;
    let console = sign_in(&app, &org.token).await;
    let path = format!(
        "/console/robots/{}/permissions",
        robot["id"].as_str().unwrap()
    );
    let refused = console
        .post(&app, &path, &[("permissions", "pull\nfly:team/*")])
        .await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(
        &html,
        "permissions",
        "Permissions",
        "pull\nfly:team/*</textarea>",
    );
    assert!(html.contains(&format!("action=\"{path}\"")), "{html}");
}

/// A grant refused for its right comes back on the service accounts page, the summary naming the
/// account's grant field.
async fn a_refused_grant_comes_back_at_its_account(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let account = serde_json::json!({"name": "deployer"});
    let account = crate::canary::create_service_account(&app, &org, account).await;
    let id = account["id"].as_str().unwrap();
    let console = sign_in(&app, &org.token).await;
    let refused = console
        .post(
            &app,
            &format!("/console/service-accounts/{id}/grants"),
            &[("right", "flying")],
        )
        .await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(
        &html,
        &format!("grant-{id}"),
        "Grant a right to deployer",
        "Choose a right from the list.",
    );
    assert!(html.contains("Create a service account"), "{html}");
}

/// A webhook URL the form accepts but the target check refuses (a loopback name) comes back in
/// the create form and in the edit form, as typed.
async fn a_webhook_refused_after_the_forms_checks_comes_back_as_sent(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    let fields = [
        ("url", "https://localhost/hook"),
        ("events", "*"),
        ("description", "mine"),
    ];
    let refused = console.post(&app, "/console/webhooks", &fields).await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(&html, "url", "URL", "value=\"https://localhost/hook\"");
    assert!(html.contains("value=\"mine\""), "{html}");

    let created = app
        .post(
            &org.path("/webhooks"),
            &org.token,
            serde_json::json!({"url": "https://93.184.215.14/hook", "events": ["*"]}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let edit = format!("/console/webhooks/{}", created["id"].as_str().unwrap());
    let refused = console.post(&app, &edit, &fields).await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(&html, "url", "URL", "value=\"https://localhost/hook\"");
    assert!(html.contains("Save webhook"), "the edit form: {html}");
}

/// A refusal that is not about a field keeps its own page, and for a signed-in user that page
/// keeps the console's header and navigation; signed out, it stays bare.
async fn a_signed_in_error_page_keeps_the_consoles_navigation(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let console = sign_in(&app, &org.token).await;
    let nav = "<nav aria-label=\"Console\">";
    let missing = format!("/console/api-tokens/{}/revoke", uuid::Uuid::new_v4());
    let refused = console.post(&app, &missing, &[]).await;
    assert_eq!(refused.status(), 404);
    let html = refused.text().await.unwrap();
    assert!(html.contains(nav), "{html}");
    assert!(html.contains("<title>Error: "), "{html}");
    assert_eq!(back_link(&html), "/console");

    let signed_out = app
        .request(Method::GET, "/console/nowhere", None)
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), 404);
    assert!(!signed_out.text().await.unwrap().contains(nav));
}

/// A console page's answer to `method path` with `cookie` (none: signed out): status, the headers
/// asked for, body.
async fn answer(
    app: &TestApp,
    method: Method,
    path: &str,
    cookie: Option<&str>,
) -> (u16, String, String, String) {
    let mut request = app.request(method, path, None);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let res = request.send().await.unwrap();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (content_type, cache) = (header("content-type"), header("cache-control"));
    (
        res.status().as_u16(),
        content_type,
        cache,
        res.text().await.unwrap(),
    )
}

/// A path under `/console` that is no page is the console's own 404: signed in, with the
/// console's navigation; signed out, a plain console page with a way to sign in. Whether a path
/// names an organization that exists, or one the user may not see, makes no difference.
async fn an_unknown_console_page_is_the_consoles_own_not_found_page(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let other = app.create_org("globex").await;
    let console = sign_in(&app, &org.token).await;
    let nav = "<nav aria-label=\"Console\">";
    let cookie = Some(console.cookie.as_str());

    for path in ["/console/nope", "/console/api-tokens/x/y/z"] {
        let (status, content_type, cache, html) = answer(&app, Method::GET, path, cookie).await;
        assert_eq!(status, 404, "{path}");
        assert!(
            content_type.starts_with("text/html"),
            "{path}: {content_type}"
        );
        assert_eq!(cache, "no-store", "{path}");
        assert!(html.contains(nav), "{path} keeps the navigation: {html}");
        assert!(html.contains("<title>Error: Not Found"), "{html}");
        assert!(html.contains("There is no such page."), "{html}");
        assert_eq!(back_link(&html), "/console");
    }
    let (status, content_type, _, body) = answer(&app, Method::HEAD, "/console/nope", cookie).await;
    assert_eq!((status, body.as_str()), (404, ""));
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let posted = console.post(&app, "/console/nope", &[]).await;
    assert_eq!(posted.status(), 404);
    assert!(posted.text().await.unwrap().contains(nav), "a POST too");

    // Its own organization, another one, none: the same answer.
    let mine = answer(
        &app,
        Method::GET,
        &format!("/console/orgs/{}/nonsense", org.id),
        cookie,
    )
    .await;
    for id in [other.id.clone(), uuid::Uuid::new_v4().to_string()] {
        let theirs = answer(
            &app,
            Method::GET,
            &format!("/console/orgs/{id}/nonsense"),
            cookie,
        )
        .await;
        assert_eq!(theirs, mine, "no org id tells apart from another");
    }
    assert_eq!(mine.0, 404);

    // Signed out: no navigation, a link to sign in, no redirect that would say more.
    let in_org = format!("/console/orgs/{}/nonsense", org.id);
    for path in ["/console/nope", in_org.as_str()] {
        let (status, content_type, cache, html) = answer(&app, Method::GET, path, None).await;
        assert_eq!(status, 404, "{path}");
        assert!(
            content_type.starts_with("text/html"),
            "{path}: {content_type}"
        );
        assert_eq!(cache, "no-store", "{path}");
        assert!(!html.contains(nav), "{html}");
        assert!(html.contains("There is no such page."), "{html}");
        assert_eq!(
            back_link(&html),
            "/console/login",
            "a way to sign in: {html}"
        );
    }
    let signed_out = answer(
        &app,
        Method::GET,
        &format!("/console/orgs/{}/x", other.id),
        None,
    )
    .await;
    let unknown = answer(
        &app,
        Method::GET,
        &format!("/console/orgs/{}/x", uuid::Uuid::new_v4()),
        None,
    )
    .await;
    assert_eq!(signed_out, unknown);
}

/// An expiry no form offers (a crafted or stale form: a number of days out of range, a word, a
/// date that is none) comes back in its form as sent, the problem under the expiry field, on
/// every form that takes an expiry.
async fn an_expiry_no_form_offers_comes_back_as_sent(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    crate::canary::enable_registry(&app, &org).await;
    let console = sign_in(&app, &org.token).await;
    for days in ["0", "soon", "99999999"] {
        let refused = create_expiring(&app, &console, "kept-name", days).await;
        assert_eq!(refused.status(), 422, "{days}");
        let html = refused.text().await.unwrap();
        assert_refilled(&html, "expires_in_days", "Expires", "value=\"kept-name\"");
        assert!(html.contains("Choose an expiry from the list."), "{html}");
    }
    let fields = [
        ("name", "kept-name"),
        ("scopes", "api_tokens:read"),
        ("expires_on", "31/01/2030"),
    ];
    let refused = console.post(&app, "/console/api-tokens", &fields).await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(&html, "expires_on", "Expiry date", "value=\"31/01/2030\"");
    assert!(html.contains("value=\"kept-name\""), "{html}");

    let fields = [("name", "kept-account"), ("expires_in_days", "soon")];
    let refused = console
        .post(&app, "/console/service-accounts", &fields)
        .await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(
        &html,
        "expires_in_days",
        "Expires",
        "value=\"kept-account\"",
    );

    let fields = [
        ("name", "kept-robot"),
        ("permissions", "pull"),
        ("expires_in_days", "-1"),
    ];
    let refused = console.post(&app, "/console/robots", &fields).await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(&html, "expires_in_days", "Expires", "value=\"kept-robot\"");

    let rotate = format!(
        "/console/api-tokens/{}/rotate",
        token_id(&app, &org, "bootstrap").await
    );
    let refused = console
        .post(
            &app,
            &rotate,
            &[("grace_seconds", "3600"), ("expires_in_days", "soon")],
        )
        .await;
    assert_eq!(refused.status(), 422);
    let html = refused.text().await.unwrap();
    assert_refilled(
        &html,
        "expires_in_days",
        "Expires",
        "value=\"3600\" checked",
    );
    assert!(html.contains(&format!("action=\"{rotate}\"")), "{html}");
}
