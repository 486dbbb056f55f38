//! One method per route, each a thin HTTP call that sends and reads the server's wire types.

use crate::error::{ApiFailure, Error};
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
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::{Duration, Instant};
use uuid::Uuid;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Creates and rotates carry an `Idempotency-Key`, so a retry after a lost answer or a 503 is
/// safe: the server replays the first answer (secret included) instead of minting twice.
const ATTEMPTS: u32 = 3;
const LONGEST_RETRY_WAIT: Duration = Duration::from_secs(5);

/// A connection to one keyplane, with one credential.
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// `None` for the one route anyone may call (public revocation of leaked tokens).
    token: Option<Plaintext>,
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
}

struct Call<'a> {
    method: Method,
    path: String,
    query: Vec<(&'a str, String)>,
    body: Body,
    /// Send an `Idempotency-Key` and retry a lost answer or a 503 with it.
    idempotent: bool,
}

impl<'a> Call<'a> {
    fn new(method: Method, path: String) -> Self {
        Self {
            method,
            path,
            query: Vec::new(),
            body: Body::None,
            idempotent: false,
        }
    }

    fn json(mut self, body: &impl Serialize) -> Self {
        self.body = Body::Json(serde_json::to_value(body).expect("request types are JSON"));
        self
    }

    fn idempotent(mut self) -> Self {
        self.idempotent = true;
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
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("keyplane-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Local(format!("cannot set up HTTP: {e}")))?;
        Ok(Self {
            http,
            base,
            token,
            verbose,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
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

    /// Sends `call` (retrying an idempotent one), returns the body of a 2xx answer.
    async fn send_raw(&self, call: Call<'_>) -> Result<Vec<u8>, Error> {
        let url = format!("{}{}", self.base, call.path);
        let key = call.idempotent.then(|| Uuid::new_v4().to_string());
        let attempts = if call.idempotent { ATTEMPTS } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self
                .http
                .request(call.method.clone(), &url)
                .query(&call.query);
            if let Some(token) = &self.token {
                request =
                    request.header(AUTHORIZATION, format!("Bearer {}", token.expose_secret()));
            }
            if let Some(key) = &key {
                request = request.header("idempotency-key", key);
            }
            request = match &call.body {
                Body::None => request,
                Body::Json(value) | Body::SecretJson(value) => request.json(value),
                Body::IntrospectionForm(token) => request.form(&[("token", token.expose_secret())]),
            };
            let request = request
                .build()
                .map_err(|e| Error::Usage(format!("cannot build a request for {url}: {e}")))?;
            if self.verbose {
                self.dump_request(&request, &call.body);
            }
            let started = Instant::now();
            let outcome = self.http.execute(request).await;
            let retry_after = match outcome {
                Err(e) => {
                    // Not connected: nothing was sent, retrying cannot help.
                    if e.is_connect() || attempt >= attempts {
                        return Err(unreachable(&self.base, e));
                    }
                    if self.verbose {
                        eprintln!("< no answer ({}); retrying", describe(&e));
                    }
                    Duration::from_secs(1)
                }
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    if self.verbose {
                        dump_response(status, &headers, started.elapsed());
                    }
                    let body = response
                        .bytes()
                        .await
                        .map_err(|e| unreachable(&self.base, e))?;
                    if status.is_success() {
                        return Ok(body.to_vec());
                    }
                    if status == StatusCode::SERVICE_UNAVAILABLE && attempt < attempts {
                        retry_wait(&headers)
                    } else {
                        let request_id = header_text(&headers, "x-request-id");
                        let failure = ApiFailure::read(status.as_u16(), &body, request_id);
                        return Err(match status {
                            StatusCode::UNAUTHORIZED => Error::Unauthenticated(failure),
                            _ => Error::Refused(failure),
                        });
                    }
                }
            };
            tokio::time::sleep(retry_after).await;
        }
    }

    fn dump_request(&self, request: &reqwest::Request, body: &Body) {
        eprintln!("> {} {}", request.method(), request.url());
        for (name, value) in request.headers() {
            let shown = if name == AUTHORIZATION {
                "Bearer <redacted>".to_string()
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
        self.send(call.json(request).idempotent()).await
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
        self.send(Call::new(Method::PUT, path).json(request)).await
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
    ) -> Result<Vec<ServiceAccountView>, Error> {
        let mut call = Call::new(Method::GET, account_path(account, "/service-accounts"));
        if include_revoked {
            call.query.push(("include_revoked", "true".into()));
        }
        self.send(call).await
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

/// `Retry-After` in seconds, capped: a CLI waits a little, then reports the 503.
fn retry_wait(headers: &HeaderMap) -> Duration {
    header_text(headers, "retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
        .min(LONGEST_RETRY_WAIT)
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
