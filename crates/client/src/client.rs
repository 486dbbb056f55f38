//! One method per route, each a thin HTTP call that sends and reads the server's wire types.

use crate::error::{ApiFailure, Error};
use crate::profile::{create_private_dir, private_file};
use keyplane_api_types::aether::{
    ApiTokenCreated, ApiTokenPage, ApiTokenView, CreateApiTokenRequest, CreateRobotAccountRequest,
    CredentialPolicyView, PutCredentialPolicyRequest, RegistryEnabled, RegistryState,
    RobotAccountCreated, RobotAccountPage, RobotAccountView, UpdateRobotAccountRequest,
};
use keyplane_api_types::audit::AuditEventPage;
use keyplane_api_types::hybridbox::{
    AuthorizationView, CreateAuthorizationRequest, CreateServiceAccountRequest,
    ServiceAccountCreated, ServiceAccountView,
};
use keyplane_api_types::leaks::{RevokeAccepted, RevokeCredentialsRequest};
use keyplane_api_types::verify::{IntrospectionResponse, WhoAmI};
use keyplane_api_types::webhooks::{
    WebhookCreated, WebhookDeliveryPage, WebhookDeliveryView, WebhookList, WebhookRequest,
    WebhookView,
};
use keyplane_api_types::wire::RotateRequest;
use keyplane_core::Plaintext;
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The header of idempotent calls (creates and rotates).
const IDEMPOTENCY_KEY: &str = "idempotency-key";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// No retry of a call starts later than this after its first attempt. The server holds an
/// `Idempotency-Key` for 60 s (`LOCK` in keyplane-server's idempotency.rs, which this crate
/// cannot see) from its claim, which comes after our first send; if the replica that claimed it
/// dies before committing, retries meet 409 until then. So this must exceed 60 s: the 15 s
/// margin lets a retry take the key over and do the change, rather than report "may have been
/// done" for one never made. It also leaves room for public revocation's longest wait.
const RETRY_DEADLINE: Duration = Duration::from_secs(75);
/// The longest `Retry-After` waited for: one asking for more is reported at once (a CLI does not
/// sleep for minutes), one asking for less is honoured.
const LONGEST_RETRY_WAIT: Duration = Duration::from_secs(10);
/// Public revocation's: the server's per-address limit (`--public-revoke-per-minute`, 10 by
/// default: 6 s) asks for up to a minute, and `revoke-leaked` promises to wait it out.
const LONGEST_REVOKE_WAIT: Duration = Duration::from_secs(60);
/// The longest pause between attempts that no `Retry-After` paced.
const LONGEST_BACKOFF: Duration = Duration::from_secs(5);

/// A connection to one keyplane, with one credential.
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// `None` for the one route anyone may call (public revocation of leaked tokens).
    token: Option<Plaintext>,
    /// Sent as the `Idempotency-Key` of idempotent calls instead of a fresh one each.
    idempotency_key: Option<String>,
    /// Where the key of a call whose outcome stays unknown is saved, for the user to send again.
    key_dir: Option<PathBuf>,
    verbose: bool,
}

/// Which page of a paginated list.
#[derive(Default, Clone)]
pub struct Page {
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

/// `GET .../auth/authorizations` filters, as the API names them.
#[derive(Default)]
pub struct GrantFilter {
    pub subject_type: Option<String>,
    pub subject_id: Option<String>,
    pub grant_kind: Option<String>,
    pub capability_key: Option<String>,
    pub include_revoked: bool,
}

/// `GET .../audit-events` filters, as the API names them.
#[derive(Default, Clone)]
pub struct AuditFilter {
    pub actions: Vec<String>,
    pub actor_id: Option<String>,
    pub target_id: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// Only events after the newest of these (`<seq>-<tag>`, `keyplane_core::audit_position`),
    /// oldest first (not with a page's `cursor`); the server answers 409 `audit_chain_diverged`
    /// (`ApiFailure::audit_chain_diverged`) when its trail no longer holds that event.
    pub after: Vec<String>,
}

/// A credential's lifecycle step without a body: `POST .../{id}/<step>`.
#[derive(Clone, Copy, Debug)]
pub enum Transition {
    Suspend,
    Resume,
    RetirePrevious,
}

impl Transition {
    fn path(self) -> &'static str {
        match self {
            Transition::Suspend => "suspend",
            Transition::Resume => "resume",
            Transition::RetirePrevious => "retire-previous",
        }
    }
}

enum Body {
    None,
    Json(serde_json::Value),
    /// RFC 7662's form: `token=...`, never shown.
    IntrospectionForm(Plaintext),
    /// JSON that lists secrets (leaked tokens to revoke): sent, never shown.
    SecretJson(serde_json::Value),
    /// A webhook's JSON: its `url`'s path and query may carry a receiver's token, so only the
    /// origin is shown (as the audit trail names an endpoint).
    WebhookJson(serde_json::Value),
}

/// Whether a call may be sent again when its answer is lost or says "later". Whatever it says,
/// an attempt the server certainly did not carry out (a limit's 429) is sent again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Only when certainly not done: sent twice, it could be done twice (and a read answered
    /// 503 is reported, not retried).
    Never,
    /// With one `Idempotency-Key` for every attempt: the server does it at most once and replays
    /// its answer (secret included) to a retry.
    WithKey,
    /// As it is: done twice, it is done once (public revocation).
    Harmless,
}

struct Call<'a> {
    method: Method,
    path: String,
    query: Vec<(&'a str, String)>,
    body: Body,
    retry: Retry,
    /// The longest `Retry-After` waited for before another attempt.
    longest_wait: Duration,
}

impl<'a> Call<'a> {
    fn new(method: Method, path: String) -> Self {
        Self {
            method,
            path,
            query: Vec::new(),
            body: Body::None,
            retry: Retry::Never,
            longest_wait: LONGEST_RETRY_WAIT,
        }
    }

    fn json(mut self, body: &impl Serialize) -> Self {
        self.body = Body::Json(serde_json::to_value(body).expect("request types are JSON"));
        self
    }

    fn webhook_json(mut self, body: &WebhookRequest) -> Self {
        self.body = Body::WebhookJson(serde_json::to_value(body).expect("request types are JSON"));
        self
    }

    /// Sends an `Idempotency-Key` and retries a lost answer, a "still in progress" or a
    /// gateway's failure with it.
    fn idempotent(mut self) -> Self {
        self.retry = Retry::WithKey;
        self
    }

    fn expiring_within(mut self, days: Option<u32>) -> Self {
        if let Some(days) = days {
            self.query.push(("expiring_within_days", days.to_string()));
        }
        self
    }

    fn page(mut self, page: &Page) -> Self {
        if let Some(cursor) = &page.cursor {
            self.query.push(("cursor", cursor.clone()));
        }
        if let Some(limit) = page.limit {
            self.query.push(("limit", limit.to_string()));
        }
        self
    }
}

fn org_path(org: Uuid, rest: &str) -> String {
    format!("/api/v1/organizations/{org}{rest}")
}

fn account_path(account: Uuid, rest: &str) -> String {
    format!("/v1/public/accounts/{account}/auth{rest}")
}

impl Client {
    /// `base` is the server's URL (`http://127.0.0.1:8080`); `verbose` dumps each request and
    /// answer's head to stderr, the credential redacted.
    pub fn new(base: &str, token: Option<Plaintext>, verbose: bool) -> Result<Self, Error> {
        let base = base.trim_end_matches('/').to_string();
        match reqwest::Url::parse(&base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(Error::Usage(format!(
                    "--url {base} is not an http:// or https:// URL"
                )))
            }
        }
        let http = reqwest::Client::builder()
            // A redirect is reported, never followed: following would send the token (and a
            // body of secrets) to wherever a server or proxy points, https to http included.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("keyplane-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Local(format!("cannot set up HTTP: {e}")))?;
        Ok(Self {
            http,
            base,
            token,
            idempotency_key: None,
            key_dir: None,
            verbose,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends `key` as the `Idempotency-Key` of the idempotent calls (creates and rotates) instead
    /// of a fresh one each: to get, within the server's 24 hours, the answer of an earlier
    /// identical request whose outcome was lost. `None` goes back to fresh keys.
    pub fn set_idempotency_key(&mut self, key: Option<String>) {
        self.idempotency_key = key;
    }

    /// Where to save, each in a new file (0600; the directory 0700), the `Idempotency-Key` of a
    /// call whose outcome stays unknown ([`Error::MaybeDone`]).
    pub fn keep_idempotency_keys_in(&mut self, dir: PathBuf) {
        self.key_dir = Some(dir);
    }

    /// Saves `key` in a new file under `key_dir`: its path, or why not.
    fn save_key(&self, key: &str) -> Result<PathBuf, String> {
        let dir = self.key_dir.as_ref().ok_or("no directory to keep it in")?;
        create_private_dir(dir).map_err(|e| e.to_string())?;
        // The time for the user to tell files apart, a random part so two runs never collide.
        let name = format!(
            "{}-{}.key",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let path = dir.join(name);
        private_file(&path)
            .and_then(|mut file| {
                file.write_all(key.as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()
            })
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }

    async fn send<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, Error> {
        let body = self.send_raw(call).await?;
        serde_json::from_slice(&body).map_err(|e| {
            Error::Protocol(format!(
                "the answer from {} is not what keyplane sends: {e}",
                self.base
            ))
        })
    }

    /// Sends `call` (retrying it as its [`Retry`] allows, within [`RETRY_DEADLINE`]), returns the
    /// body of a 2xx answer.
    async fn send_raw(&self, call: Call<'_>) -> Result<Vec<u8>, Error> {
        let url = format!("{}{}", self.base, call.path);
        let key = (call.retry == Retry::WithKey).then(|| {
            self.idempotency_key
                .clone()
                .unwrap_or_else(|| Uuid::new_v4().to_string())
        });
        let deadline = Instant::now() + RETRY_DEADLINE;
        let mut attempt = 0;
        // Whether some attempt may have reached the server without its answer reaching us: until a
        // later one is answered, the change may have been made.
        let mut unsure = false;
        loop {
            attempt += 1;
            let request = self.request(&call, &url, key.as_deref())?;
            let (error, wait, sent) = match self.attempt(request, &call, attempt).await {
                Attempt::Answered(body) => return Ok(body),
                Attempt::Final(error) => return Err(error),
                Attempt::Transient { error, wait, sent } => {
                    unsure |= sent;
                    (error, wait, sent)
                }
            };
            let again = (call.retry != Retry::Never || !sent)
                && wait <= call.longest_wait
                && Instant::now() + wait < deadline;
            if !again {
                return Err(match key {
                    Some(idempotency_key) if unsure => Error::MaybeDone {
                        cause: Box::new(error),
                        key_file: self.save_key(&idempotency_key),
                        idempotency_key,
                        retry_flags: String::new(),
                    },
                    _ => error,
                });
            }
            if self.verbose {
                eprintln!("< retrying in {} ms ({error})", wait.as_millis());
            } else if wait > LONGEST_RETRY_WAIT {
                // Longer than a command line is silent for.
                eprintln!(
                    "keyplane at {} asked to wait {} s (a rate limit); retrying then",
                    self.base,
                    wait.as_secs()
                );
            }
            tokio::time::sleep(wait).await;
        }
    }

    fn request(
        &self,
        call: &Call<'_>,
        url: &str,
        key: Option<&str>,
    ) -> Result<reqwest::Request, Error> {
        let mut request = self
            .http
            .request(call.method.clone(), url)
            .query(&call.query);
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {}", token.expose_secret()));
        }
        if let Some(key) = key {
            request = request.header(IDEMPOTENCY_KEY, key);
        }
        request = match &call.body {
            Body::None => request,
            Body::Json(value) | Body::SecretJson(value) | Body::WebhookJson(value) => {
                request.json(value)
            }
            Body::IntrospectionForm(token) => request.form(&[("token", token.expose_secret())]),
        };
        let request = request
            .build()
            .map_err(|e| Error::Usage(format!("cannot build a request for {url}: {e}")))?;
        if self.verbose {
            self.dump_request(&request, &call.body);
        }
        Ok(request)
    }

    /// One attempt, and whether another may help.
    async fn attempt(&self, request: reqwest::Request, call: &Call<'_>, attempt: u32) -> Attempt {
        let sent_to = request.url().clone();
        let started = Instant::now();
        let response = match self.http.execute(request).await {
            Ok(response) => response,
            Err(e) => {
                // Not connected at first: a wrong URL or a server down, which waiting rarely mends.
                // Later (a restart under way) it may.
                if e.is_connect() && attempt == 1 {
                    return Attempt::Final(unreachable(&self.base, e));
                }
                return Attempt::Transient {
                    sent: !e.is_connect(),
                    error: unreachable(&self.base, e),
                    wait: backoff(attempt),
                };
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        if self.verbose {
            dump_response(status, &headers, started.elapsed());
        }
        if status.is_redirection() {
            return Attempt::Final(redirected(
                &self.base, &sent_to, &call.path, status, &headers,
            ));
        }
        let body = match response.bytes().await {
            Ok(body) => body,
            // A success cut short: done, but its answer (perhaps a secret) is lost.
            Err(e) if status.is_success() => {
                return Attempt::Transient {
                    sent: true,
                    error: unreachable(&self.base, e),
                    wait: backoff(attempt),
                }
            }
            // The status says enough.
            Err(_) => Default::default(),
        };
        if status.is_success() {
            return Attempt::Answered(body.to_vec());
        }
        let failure = ApiFailure::read(
            status.as_u16(),
            &body,
            header_text(&headers, "x-request-id"),
        );
        let error = match status {
            StatusCode::UNAUTHORIZED => Error::Unauthenticated(failure),
            _ => Error::Refused(failure),
        };
        let transient = match status {
            StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => true,
            // "Still in progress": an earlier attempt holds the key, and its answer will be
            // replayed to a retry.
            StatusCode::CONFLICT => {
                call.retry == Retry::WithKey && headers.contains_key(RETRY_AFTER)
            }
            _ => false,
        };
        if !transient {
            return Attempt::Final(error);
        }
        Attempt::Transient {
            // A limit refuses before anything is done; a gateway may have passed it on.
            sent: status != StatusCode::TOO_MANY_REQUESTS,
            error,
            wait: retry_wait(&headers, attempt),
        }
    }

    fn dump_request(&self, request: &reqwest::Request, body: &Body) {
        eprintln!("> {} {}", request.method(), request.url());
        for (name, value) in request.headers() {
            let shown = if name == AUTHORIZATION {
                "Bearer <redacted>".to_string()
            } else if name == IDEMPOTENCY_KEY {
                // The server derives from it the key sealing the stored answer (secret included).
                "<redacted>".to_string()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            eprintln!("> {name}: {shown}");
        }
        match body {
            Body::None => {}
            // Request bodies carry names, scopes and expiry: never a secret.
            Body::Json(value) => eprintln!("> {value}"),
            Body::IntrospectionForm(_) => eprintln!("> token=<redacted>"),
            Body::SecretJson(_) => eprintln!("> <a body of secrets, redacted>"),
            Body::WebhookJson(value) => {
                let mut shown = value.clone();
                if let Some(url) = shown.get_mut("url") {
                    let origin = url
                        .as_str()
                        .and_then(|text| Url::parse(text).ok())
                        .map(|url| url.origin().ascii_serialization())
                        .unwrap_or_default();
                    *url = format!("{origin}/<redacted>").into();
                }
                eprintln!("> {shown}");
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Verification

    pub async fn whoami(&self) -> Result<WhoAmI, Error> {
        self.send(Call::new(Method::GET, "/v1/whoami".into())).await
    }

    pub async fn introspect(&self, token: Plaintext) -> Result<IntrospectionResponse, Error> {
        let mut call = Call::new(Method::POST, "/oauth2/introspect".into());
        call.body = Body::IntrospectionForm(token);
        self.send(call).await
    }

    /// Public revocation: anyone may report leaked tokens (at most
    /// `keyplane_api_types::leaks::MAX_CREDENTIALS` a request); the answer never says which were
    /// real.
    pub async fn revoke_leaked(
        &self,
        request: &RevokeCredentialsRequest,
    ) -> Result<RevokeAccepted, Error> {
        let mut call = Call::new(Method::POST, "/v1/credentials/revoke".into());
        // Revoking twice is revoking once: a limit's 429 or a lost answer is simply retried.
        call.retry = Retry::Harmless;
        call.longest_wait = LONGEST_REVOKE_WAIT;
        call.body = Body::SecretJson(serde_json::to_value(request).expect("strings are JSON"));
        self.send(call).await
    }

    // ----------------------------------------------------------------------------------------
    // Aether: API tokens

    /// `expiring_within_days`: only tokens not expired yet that expire within that many days.
    pub async fn list_api_tokens(
        &self,
        org: Uuid,
        page: &Page,
        expiring_within_days: Option<u32>,
    ) -> Result<ApiTokenPage, Error> {
        let call = Call::new(Method::GET, org_path(org, "/api-tokens")).page(page);
        self.send(call.expiring_within(expiring_within_days)).await
    }

    pub async fn create_api_token(
        &self,
        org: Uuid,
        request: &CreateApiTokenRequest,
    ) -> Result<ApiTokenCreated, Error> {
        let call = Call::new(Method::POST, org_path(org, "/api-tokens"));
        self.send(call.json(request).idempotent()).await
    }

    pub async fn get_api_token(&self, org: Uuid, id: Uuid) -> Result<ApiTokenView, Error> {
        let path = org_path(org, &format!("/api-tokens/{id}"));
        self.send(Call::new(Method::GET, path)).await
    }

    pub async fn rotate_api_token(
        &self,
        org: Uuid,
        id: Uuid,
        request: &RotateRequest,
    ) -> Result<ApiTokenCreated, Error> {
        let path = org_path(org, &format!("/api-tokens/{id}/rotate"));
        self.send(Call::new(Method::POST, path).json(request).idempotent())
            .await
    }

    pub async fn transition_api_token(
        &self,
        org: Uuid,
        id: Uuid,
        step: Transition,
    ) -> Result<ApiTokenView, Error> {
        let path = org_path(org, &format!("/api-tokens/{id}/{}", step.path()));
        self.send(Call::new(Method::POST, path)).await
    }

    /// 204 on success: there is no body to return.
    pub async fn revoke_api_token(&self, org: Uuid, id: Uuid) -> Result<(), Error> {
        let path = org_path(org, &format!("/api-tokens/{id}"));
        self.send_raw(Call::new(Method::DELETE, path))
            .await
            .map(drop)
    }

    // ----------------------------------------------------------------------------------------
    // Aether: registry and robot accounts

    pub async fn get_registry(&self, org: Uuid) -> Result<RegistryState, Error> {
        self.send(Call::new(Method::GET, org_path(org, "/registry")))
            .await
    }

    pub async fn enable_registry(&self, org: Uuid) -> Result<RegistryEnabled, Error> {
        let call = Call::new(Method::POST, org_path(org, "/registry"));
        self.send(call.idempotent()).await
    }

    pub async fn list_robots(
        &self,
        org: Uuid,
        expiring_within_days: Option<u32>,
    ) -> Result<RobotAccountPage, Error> {
        let path = org_path(org, "/registry/robot-accounts");
        self.send(Call::new(Method::GET, path).expiring_within(expiring_within_days))
            .await
    }

    pub async fn create_robot(
        &self,
        org: Uuid,
        request: &CreateRobotAccountRequest,
    ) -> Result<RobotAccountCreated, Error> {
        let call = Call::new(Method::POST, org_path(org, "/registry/robot-accounts"));
        self.send(call.json(request).idempotent()).await
    }

    pub async fn get_robot(&self, org: Uuid, id: Uuid) -> Result<RobotAccountView, Error> {
        let path = org_path(org, &format!("/registry/robot-accounts/{id}"));
        self.send(Call::new(Method::GET, path)).await
    }

    pub async fn update_robot(
        &self,
        org: Uuid,
        id: Uuid,
        request: &UpdateRobotAccountRequest,
    ) -> Result<RobotAccountView, Error> {
        let path = org_path(org, &format!("/registry/robot-accounts/{id}"));
        self.send(Call::new(Method::PUT, path).json(request)).await
    }

    pub async fn rotate_robot(
        &self,
        org: Uuid,
        id: Uuid,
        request: &RotateRequest,
    ) -> Result<RobotAccountCreated, Error> {
        let path = org_path(org, &format!("/registry/robot-accounts/{id}/rotate"));
        self.send(Call::new(Method::POST, path).json(request).idempotent())
            .await
    }

    pub async fn transition_robot(
        &self,
        org: Uuid,
        id: Uuid,
        step: Transition,
    ) -> Result<RobotAccountView, Error> {
        let path = org_path(
            org,
            &format!("/registry/robot-accounts/{id}/{}", step.path()),
        );
        self.send(Call::new(Method::POST, path)).await
    }

    // ----------------------------------------------------------------------------------------
    // Aether: credential policy

    pub async fn get_credential_policy(&self, org: Uuid) -> Result<CredentialPolicyView, Error> {
        self.send(Call::new(Method::GET, org_path(org, "/credential-policy")))
            .await
    }

    pub async fn put_credential_policy(
        &self,
        org: Uuid,
        request: &PutCredentialPolicyRequest,
    ) -> Result<CredentialPolicyView, Error> {
        let call = Call::new(Method::PUT, org_path(org, "/credential-policy"));
        self.send(call.json(request)).await
    }

    pub async fn revoke_robot(&self, org: Uuid, id: Uuid) -> Result<(), Error> {
        let path = org_path(org, &format!("/registry/robot-accounts/{id}"));
        self.send_raw(Call::new(Method::DELETE, path))
            .await
            .map(drop)
    }

    // ----------------------------------------------------------------------------------------
    // Aether: audit events

    pub async fn list_audit_events(
        &self,
        org: Uuid,
        filter: &AuditFilter,
        page: &Page,
    ) -> Result<AuditEventPage, Error> {
        let mut call = Call::new(Method::GET, org_path(org, "/audit-events")).page(page);
        for action in &filter.actions {
            call.query.push(("action", action.clone()));
        }
        let optional = [
            ("actor_id", &filter.actor_id),
            ("target_id", &filter.target_id),
            ("outcome", &filter.outcome),
            ("since", &filter.since),
            ("until", &filter.until),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                call.query.push((name, value.clone()));
            }
        }
        for position in &filter.after {
            call.query.push(("after", position.clone()));
        }
        self.send(call).await
    }

    // ----------------------------------------------------------------------------------------
    // Aether: webhooks

    pub async fn list_webhooks(&self, org: Uuid) -> Result<WebhookList, Error> {
        self.send(Call::new(Method::GET, org_path(org, "/webhooks")))
            .await
    }

    pub async fn create_webhook(
        &self,
        org: Uuid,
        request: &WebhookRequest,
    ) -> Result<WebhookCreated, Error> {
        let call = Call::new(Method::POST, org_path(org, "/webhooks"));
        self.send(call.webhook_json(request).idempotent()).await
    }

    pub async fn get_webhook(&self, org: Uuid, id: Uuid) -> Result<WebhookView, Error> {
        let path = org_path(org, &format!("/webhooks/{id}"));
        self.send(Call::new(Method::GET, path)).await
    }

    /// A PUT: replaces every field the request carries (the secret stays).
    pub async fn update_webhook(
        &self,
        org: Uuid,
        id: Uuid,
        request: &WebhookRequest,
    ) -> Result<WebhookView, Error> {
        let path = org_path(org, &format!("/webhooks/{id}"));
        self.send(Call::new(Method::PUT, path).webhook_json(request))
            .await
    }

    /// 204 on success: there is no body to return.
    pub async fn delete_webhook(&self, org: Uuid, id: Uuid) -> Result<(), Error> {
        let path = org_path(org, &format!("/webhooks/{id}"));
        self.send_raw(Call::new(Method::DELETE, path))
            .await
            .map(drop)
    }

    pub async fn rotate_webhook_secret(
        &self,
        org: Uuid,
        id: Uuid,
    ) -> Result<WebhookCreated, Error> {
        let path = org_path(org, &format!("/webhooks/{id}/rotate-secret"));
        self.send(Call::new(Method::POST, path).idempotent()).await
    }

    /// `status`: only `pending`, `succeeded` or `failed` deliveries.
    pub async fn list_webhook_deliveries(
        &self,
        org: Uuid,
        id: Uuid,
        status: Option<&str>,
        page: &Page,
    ) -> Result<WebhookDeliveryPage, Error> {
        let path = org_path(org, &format!("/webhooks/{id}/deliveries"));
        let mut call = Call::new(Method::GET, path).page(page);
        if let Some(status) = status {
            call.query.push(("status", status.to_string()));
        }
        self.send(call).await
    }

    pub async fn retry_webhook_delivery(
        &self,
        org: Uuid,
        id: Uuid,
        delivery: Uuid,
    ) -> Result<WebhookDeliveryView, Error> {
        let path = org_path(org, &format!("/webhooks/{id}/deliveries/{delivery}/retry"));
        self.send(Call::new(Method::POST, path)).await
    }

    // ----------------------------------------------------------------------------------------
    // Hybridbox: service accounts and authorizations

    pub async fn list_service_accounts(
        &self,
        account: Uuid,
        include_revoked: bool,
        expiring_within_days: Option<u32>,
    ) -> Result<Vec<ServiceAccountView>, Error> {
        let mut call = Call::new(Method::GET, account_path(account, "/service-accounts"));
        if include_revoked {
            call.query.push(("include_revoked", "true".into()));
        }
        self.send(call.expiring_within(expiring_within_days)).await
    }

    pub async fn create_service_account(
        &self,
        account: Uuid,
        request: &CreateServiceAccountRequest,
    ) -> Result<ServiceAccountCreated, Error> {
        let call = Call::new(Method::POST, account_path(account, "/service-accounts"));
        self.send(call.json(request).idempotent()).await
    }

    pub async fn rotate_service_account(
        &self,
        account: Uuid,
        id: Uuid,
        request: &RotateRequest,
    ) -> Result<ServiceAccountCreated, Error> {
        let path = account_path(account, &format!("/service-accounts/{id}/rotate"));
        self.send(Call::new(Method::POST, path).json(request).idempotent())
            .await
    }

    pub async fn transition_service_account(
        &self,
        account: Uuid,
        id: Uuid,
        step: Transition,
    ) -> Result<ServiceAccountView, Error> {
        let path = account_path(account, &format!("/service-accounts/{id}/{}", step.path()));
        self.send(Call::new(Method::POST, path)).await
    }

    pub async fn revoke_service_account(
        &self,
        account: Uuid,
        id: Uuid,
    ) -> Result<ServiceAccountView, Error> {
        let path = account_path(account, &format!("/service-accounts/{id}"));
        self.send(Call::new(Method::DELETE, path)).await
    }

    pub async fn list_authorizations(
        &self,
        account: Uuid,
        filter: &GrantFilter,
    ) -> Result<Vec<AuthorizationView>, Error> {
        let mut call = Call::new(Method::GET, account_path(account, "/authorizations"));
        let optional = [
            ("subject_type", &filter.subject_type),
            ("subject_id", &filter.subject_id),
            ("grant_kind", &filter.grant_kind),
            ("capability_key", &filter.capability_key),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                call.query.push((name, value.clone()));
            }
        }
        if filter.include_revoked {
            call.query.push(("include_revoked", "true".into()));
        }
        self.send(call).await
    }

    pub async fn create_authorization(
        &self,
        account: Uuid,
        request: &CreateAuthorizationRequest,
    ) -> Result<AuthorizationView, Error> {
        let call = Call::new(Method::POST, account_path(account, "/authorizations"));
        self.send(call.json(request).idempotent()).await
    }

    pub async fn revoke_authorization(
        &self,
        account: Uuid,
        id: Uuid,
    ) -> Result<AuthorizationView, Error> {
        let path = account_path(account, &format!("/authorizations/{id}"));
        self.send(Call::new(Method::DELETE, path)).await
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What one attempt came to.
enum Attempt {
    Answered(Vec<u8>),
    /// An answer another attempt would not change.
    Final(Error),
    /// Worth another attempt after `wait`; `sent` when it may have reached the server and been
    /// carried out.
    Transient {
        error: Error,
        wait: Duration,
        sent: bool,
    },
}

/// 1 s, 2 s, 4 s, ... up to [`LONGEST_BACKOFF`], after attempt `attempt`.
fn backoff(attempt: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(attempt.saturating_sub(1))).min(LONGEST_BACKOFF)
}

/// `Retry-After` in seconds (at least 1), else [`backoff`]. Not capped here: the caller gives up
/// rather than wait longer than its call's `longest_wait`.
fn retry_wait(headers: &HeaderMap, attempt: u32) -> Duration {
    header_text(headers, "retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or_else(|| backoff(attempt), |secs| Duration::from_secs(secs.max(1)))
}

/// A 3xx: where it pointed (without credentials or query, which may carry anything), and the
/// `--url` that would reach it, for the user to judge; nothing was sent there.
fn redirected(
    base: &str,
    sent_to: &Url,
    path: &str,
    status: StatusCode,
    headers: &HeaderMap,
) -> Error {
    let target = header_text(headers, LOCATION.as_str()).and_then(|to| sent_to.join(&to).ok());
    let Some(mut target) = target else {
        return Error::Protocol(format!(
            "keyplane at {base} answered HTTP {status} (a redirect) without a usable Location; \
             check --url or KEYPLANE_URL"
        ));
    };
    let _ = target.set_username("");
    let _ = target.set_password(None);
    target.set_query(None);
    target.set_fragment(None);
    let shown = target.to_string();
    // The server's own base: the redirect's path without this route's, else its origin.
    let suggested = match target.path().strip_suffix(path) {
        Some(prefix) => format!("{}{prefix}", target.origin().ascii_serialization()),
        None => target.origin().ascii_serialization(),
    };
    Error::Protocol(format!(
        "keyplane at {base} redirected (HTTP {status}) to {shown}; redirects are not followed, \
         so nothing was sent there: if that is your keyplane, use --url {} (or KEYPLANE_URL)",
        suggested.trim_end_matches('/')
    ))
}

fn dump_response(status: StatusCode, headers: &HeaderMap, took: Duration) {
    eprintln!("< HTTP {status} in {} ms", took.as_millis());
    for (name, value) in headers {
        if name == CONTENT_TYPE || name.as_str().starts_with("x-") || name == "retry-after" {
            eprintln!("< {name}: {}", String::from_utf8_lossy(value.as_bytes()));
        }
    }
    // Bodies are not dumped: create and rotate answers hold a secret.
}

/// reqwest's error without its source chain's noise, and never the request (which holds no
/// secret in its URL anyway: tokens travel in headers and bodies only).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn unreachable(base: &str, error: reqwest::Error) -> Error {
    let what = if error.is_timeout() {
        "did not answer in time"
    } else {
        "cannot be reached"
    };
    Error::Unreachable(format!(
        "keyplane at {base} {what} ({}); check --url or KEYPLANE_URL",
        describe(&error.without_url())
    ))
}
