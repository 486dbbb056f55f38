//! The console's pages. Each handler reads its input, calls the same `ops::*` use case an API
//! route calls with the session's principal, and renders the answer; a refusal there is the
//! refusal here.

use super::html::{self, code, esc, maybe_time, post_form, time, Refill};
use super::session::{Move, SecretFlash, SecretHome};
use super::Path;
use super::{Console, ConsoleError};
use crate::ops::{self, CredentialSpec, KindRights, ListSpec, RotateSpec};
use axum::body::Bytes;
use axum::extract::Query;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use keyplane_core::audit::{ActorType, DetailValue, Outcome};
use keyplane_core::authz::Actor;
use keyplane_core::{
    Capability, Channel, CreatedBy, Credential, CredentialId, CredentialKind, CredentialPolicy,
    FieldPath, RobotPermission, RotationOptions, Scope, ScopeSet, SubjectType,
};
use keyplane_store::{AuditOrder, AuditQuery, GrantFilter};
use std::collections::HashMap;
use std::fmt::Write;

type PageResult = Result<Response, ConsoleError>;

/// The most credentials a list page shows; a search reads on until it has found this many.
const LIST_LIMIT: u32 = 1000;
/// The soonest-expiring credentials the overview lists.
const EXPIRING_SHOWN: usize = 20;
const AUDIT_PAGE: u32 = 50;

/// A kind of credential as the console addresses it: `/console/<slug>/…`.
struct KindPage {
    slug: &'static str,
    list: &'static str,
    singular: &'static str,
    rights: KindRights,
}

const KINDS: [KindPage; 3] = [
    KindPage {
        slug: "api-tokens",
        list: "/console/api-tokens",
        singular: "API token",
        rights: ops::API_TOKENS,
    },
    KindPage {
        slug: "service-accounts",
        list: "/console/service-accounts",
        singular: "service account",
        rights: ops::SERVICE_ACCOUNTS,
    },
    KindPage {
        slug: "robots",
        list: "/console/registry",
        singular: "robot account",
        rights: ops::ROBOTS,
    },
];

/// The kind a `/console/<slug>/{id}/…` route is about.
fn kind_page(uri: &Uri) -> Result<&'static KindPage, ConsoleError> {
    let slug = uri.path().split('/').nth(2).unwrap_or_default();
    KINDS
        .iter()
        .find(|k| k.slug == slug)
        .ok_or_else(super::no_such_page)
}

fn kind_of(kind: CredentialKind) -> &'static KindPage {
    match kind {
        CredentialKind::ApiToken => &KINDS[0],
        CredentialKind::ServiceAccount => &KINDS[1],
        CredentialKind::RobotAccount => &KINDS[2],
    }
}

fn credential_id(raw: &str) -> Result<CredentialId, ConsoleError> {
    CredentialId::parse(raw)
        .ok_or_else(|| ConsoleError::page(StatusCode::NOT_FOUND, "There is no such credential."))
}

/// `aether_AbCd…wxyz`: enough to recognise a token, never its secret.
fn token_hint(credential: &Credential) -> String {
    format!("{}…{}", credential.display.prefix, credential.display.last4)
}

/// A credential's state in words: a canary, suspended, a previous secret still accepted, expired.
fn status(credential: &Credential, now: DateTime<Utc>) -> String {
    let mut parts = Vec::new();
    if credential.canary {
        parts.push("canary (bait: any use of it raises an alert)".to_string());
    }
    if credential.revoked_at.is_some() {
        parts.push("revoked".to_string());
    }
    if credential.suspended_at.is_some() {
        parts.push("suspended".to_string());
    }
    if credential.expires_at.is_some_and(|at| at <= now) {
        parts.push("expired".to_string());
    }
    if let Some(previous) = credential.live_previous_secret(now) {
        parts.push(format!(
            "previous secret accepted until {}",
            time(&previous.expires_at)
        ));
    }
    if parts.is_empty() {
        "active".into()
    } else {
        parts.join("; ")
    }
}

/// The names of creators a page can give without another read: the credentials it lists (a
/// creator it does not list is shown by its id, so no page names a credential its reader may not
/// see) and the signed-in principal, by the name its session shows.
struct KnownNames(HashMap<(&'static str, uuid::Uuid), String>);

impl KnownNames {
    fn of(console: &Console, listed: &[Credential]) -> Self {
        let mut names: HashMap<_, _> = listed
            .iter()
            .map(|c| {
                (
                    (ActorType::of_credential(c.kind).as_str(), c.id.as_uuid()),
                    c.name.clone(),
                )
            })
            .collect();
        let me = match console.who.actor {
            Actor::Credential { kind, .. } => ActorType::of_credential(kind),
            Actor::User(_) => ActorType::User,
        };
        names.insert((me.as_str(), console.who.id()), console.label.clone());
        Self(names)
    }
}

/// Who created a credential or grant, as markup: "API token ci-deploy via API", "system via admin
/// (operator alice, OS user root)"; rows from before creators were recorded say so.
fn creator(created_by: Option<&CreatedBy>, names: &KnownNames) -> String {
    let Some(by) = created_by else {
        return "<span class=\"muted\">unknown (created before this was recorded)</span>".into();
    };
    let noun = match by.actor_type {
        ActorType::ApiToken => "API token",
        ActorType::ServiceAccount => "service account",
        ActorType::RobotAccount => "robot account",
        ActorType::User => "user",
        ActorType::System => "system",
    };
    let mut text = match by.actor_id.filter(|_| by.actor_type != ActorType::System) {
        Some(id) => match names.0.get(&(by.actor_type.as_str(), id)) {
            Some(name) => format!("{noun} {}", esc(name)),
            None => format!("{noun} {}", code(&id.to_string())),
        },
        None => noun.to_string(),
    };
    let via = match by.via {
        Channel::Api => "API",
        Channel::Console => "console",
        Channel::Admin => "admin",
        Channel::Bootstrap => "bootstrap",
    };
    let _ = write!(text, " via {via}");
    if let Some(operator) = &by.operator {
        let os_user = esc(&operator.os_user);
        let _ = match &operator.name {
            Some(name) => write!(text, " (operator {}, OS user {os_user})", esc(name)),
            None => write!(text, " (OS user {os_user})"),
        };
    }
    text
}

/// The expiry a create or rotate form asks for: a date, a number of days, or none (a create's
/// policy may then fill its default or refuse; a rotation keeps the expiry it has). A value no
/// form offers (a stale or crafted form) is the expiry field's problem, as a past date is: the
/// form comes back as sent.
fn expiry_from(
    form: &super::Form,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, ConsoleError> {
    let refused = |message: &str| {
        ConsoleError::from(keyplane_core::Error::Validation(vec![
            keyplane_core::FieldError::new(
                FieldPath::body("expires_at"),
                keyplane_core::error::codes::INVALID_FORMAT,
                message,
            ),
        ]))
    };
    if let Some(date) = form.text("expires_on") {
        let day = NaiveDate::parse_from_str(date, "%Y-%m-%d")
            .map_err(|_| refused("The expiry date must be a date such as 2030-01-31."))?;
        let at = day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc();
        let at = keyplane_core::validate::expires_at(
            FieldPath::body("expires_at"),
            &at.to_rfc3339(),
            now,
        )
        .map_err(keyplane_core::Error::from)?;
        return Ok(Some(at));
    }
    match form.text("expires_in_days") {
        // A rotation given none keeps the expiry it has.
        None | Some("never") | Some("keep") => Ok(None),
        Some(days) => {
            // Any lifetime the form can offer: the policy's default and maximum go up to
            // `MAX_POLICY_DAYS`; the policy then judges it as it judges the API's `expires_at`.
            let days: i64 = days
                .parse()
                .ok()
                .filter(|d| (1..=i64::from(keyplane_core::policy::MAX_POLICY_DAYS)).contains(d))
                .ok_or_else(|| refused("Choose an expiry from the list."))?;
            Ok(Some(now + TimeDelta::days(days)))
        }
    }
}

/// The lifetimes a form offers, in days, before the organization's policy has its say.
const LIFETIME_CHOICES: [u32; 4] = [7, 30, 90, 365];

/// The expiry choices of a form that issues a credential of `kind`, built from the organization's
/// `policy`: none longer than its maximum, its default lifetime preselected (else 90 days, or the
/// maximum when shorter), and "never" only where the policy leaves a credential without expiry.
/// A rotation (`current`: the credential's expiry) offers keeping the expiry it has when the
/// policy allows it, and preselects that, or else the longest lifetime allowed. A refused form
/// (`refill`) keeps the choice sent.
fn expiry_fields(
    policy: &CredentialPolicy,
    kind: CredentialKind,
    now: DateTime<Utc>,
    current: Option<Option<DateTime<Utc>>>,
    refill: &Refill,
) -> String {
    let (rule, _) = policy.rule_for(kind);
    let max = rule.max_lifetime_days;
    let mut days: Vec<u32> = LIFETIME_CHOICES
        .into_iter()
        .chain(rule.default_lifetime_days)
        .chain(max)
        .filter(|d| max.is_none_or(|max| *d <= max))
        .collect();
    days.sort_unstable();
    days.dedup();
    let keep = current.filter(|expiry| !rule.exceeded_by(*expiry, now));
    let selected = match (keep, current) {
        (Some(_), _) => None,
        (None, None) => rule
            .default_lifetime_days
            .or(Some(max.map_or(90, |max| max.min(90)))),
        // The expiry it has, clipped to the policy.
        (None, Some(_)) => max.or(rule.default_lifetime_days).or(Some(90)),
    };
    let sent = refill.value("expires_in_days", "");
    let selected = sent.parse().ok().or(selected);
    let mut options = String::new();
    if let Some(expiry) = keep {
        let _ = write!(
            options,
            "<option value=\"keep\"{}>as now: {}</option>",
            if sent.is_empty() || sent == "keep" {
                " selected"
            } else {
                ""
            },
            expiry.map_or("never".to_string(), |at| {
                format!("{} UTC", at.format("%Y-%m-%d %H:%M"))
            })
        );
    }
    for d in days {
        let label = match d {
            365 => "in 1 year".to_string(),
            d => format!("in {d} days"),
        };
        let _ = write!(
            options,
            "<option value=\"{d}\"{}>{label}{}</option>",
            if Some(d) == selected { " selected" } else { "" },
            if Some(d) == max {
                " (the longest the policy allows)"
            } else {
                ""
            },
        );
    }
    // "Never" is a choice only where it is what happens: a policy's default lifetime would fill
    // it, and a rotation keeps its expiry when given none.
    if current.is_none() && !policy.requires_expiry(kind) && rule.default_lifetime_days.is_none() {
        let _ = write!(
            options,
            "<option value=\"never\"{}>never</option>",
            if sent == "never" { " selected" } else { "" }
        );
    }
    let (choice, choice_problem) = refill.field("expires_in_days", "");
    let (date, date_problem) = refill.field("expires_on", "");
    format!(
        "<div class=\"field\"><label for=\"expires_in_days\">Expires</label>\
         <select id=\"expires_in_days\" name=\"expires_in_days\"{choice}>{options}</select>{choice_problem}</div>\
         <div class=\"field\"><label for=\"expires_on\">or on this date (UTC midnight) \
         <span class=\"hint\">optional; overrides the choice above</span></label>\
         <input type=\"date\" id=\"expires_on\" name=\"expires_on\" value=\"{value}\"{date}>{date_problem}</div>",
        value = esc(refill.value("expires_on", "")),
    )
}

/// The form key of an expiry's problem (`expires_at`) as the fields of `form` name it: the date
/// when one was given, else the choice.
fn expiry_field(form: &super::Form) -> (&'static str, &'static str, &'static str) {
    if form.text("expires_on").is_some() {
        ("expires_at", "expires_on", "Expiry date")
    } else {
        ("expires_at", "expires_in_days", "Expires")
    }
}

/// The organization's credential policy, which the forms' expiry choices follow.
async fn policy(console: &Console) -> Result<CredentialPolicy, ConsoleError> {
    Ok(ops::credential_policy(console.app.store().as_ref(), console.tenant).await?)
}

/// Where the change this request makes keeps the secret it makes, in its own transaction
/// ([`SecretHome`]): this session, or, when `rotated` is the credential the session acts with, a new
/// session acting with the new secret (the old one's sealed secret stops working, at once or when
/// the grace ends, which would end the session and lose what waits in it).
pub(super) async fn secret_home(
    console: &Console,
    rotated: Option<Actor>,
) -> Result<SecretHome, ConsoleError> {
    let moving = (rotated == Some(console.who.actor)).then(|| Move {
        tenant: console.tenant,
        who: console.label.clone(),
        ends_at: console.ends_at,
    });
    let app = &console.app;
    Ok(app
        .inner()
        .console_sessions
        .home(app, &console.cookie, moving)
        .await?)
}

/// The secret page, once a change kept its secret in `home`: in the new session if it moved.
pub(super) async fn to_secret_page(console: &Console, home: &SecretHome) -> PageResult {
    let mut response = Redirect::to("/console/secret").into_response();
    let Some(cookie) = home.moved_to() else {
        return Ok(response);
    };
    let app = &console.app;
    tracing::info!(principal.id = %console.who.id(), "console session moved to the rotated secret");
    // The new session holds the secret: failing here would lose its cookie, and the secret with
    // it. The old session ends anyway once its secret stops working.
    if let Err(error) = app
        .inner()
        .console_sessions
        .end(app, &console.cookie, None)
        .await
    {
        tracing::warn!(error = %error, "ending the console session that moved failed");
    }
    response.headers_mut().append(
        axum::http::header::SET_COOKIE,
        super::session_cookie(app, cookie),
    );
    Ok(response)
}

/// What the secret page shows of `credential` and its new `secret`.
fn flash_of(
    credential: &Credential,
    secret: &keyplane_core::Plaintext,
    note: String,
) -> SecretFlash {
    SecretFlash {
        kind: credential.kind.as_str().to_string(),
        id: credential.id.as_uuid(),
        name: credential.name.clone(),
        secret: secret.expose_secret().to_string(),
        note,
    }
}

/// A create's secret, kept in `home` with the create.
fn created(home: &SecretHome, now: DateTime<Utc>) -> impl Fn(ops::Issued) -> KeptResult {
    let home = home.clone();
    move |issued| {
        home.keep(
            &flash_of(&issued.credential, &issued.secret, "Created.".into()),
            now,
        )
    }
}

type KeptResult = Result<keyplane_store::KeptAnswer, keyplane_store::StoreError>;

// ------------------------------------------------------------------------------------------------
// Overview

pub(crate) async fn overview(console: Console) -> PageResult {
    let app = &console.app;
    let mut body = String::from("<section aria-labelledby=\"counts\"><h2 id=\"counts\">Live credentials</h2><div class=\"cards\">");
    let mut expiring: Vec<Credential> = Vec::new();
    for kind in &KINDS {
        if !console.may(kind.rights.read) {
            continue;
        }
        let (list, more) = ops::list_credentials(
            app,
            &console.who,
            console.tenant,
            kind.rights,
            ListSpec {
                limit: Some(LIST_LIMIT),
                ..ListSpec::default()
            },
        )
        .await?;
        let count = if more.is_some() {
            format!("{LIST_LIMIT}+")
        } else {
            list.len().to_string()
        };
        let _ = write!(
            body,
            "<div class=\"card\"><span class=\"count\">{count}</span><a href=\"{}\">{}s</a></div>",
            kind.list,
            esc(&capitalized(kind.singular))
        );
        // The store picks them, however many credentials the organization has.
        let (soon, _) = ops::list_credentials(
            app,
            &console.who,
            console.tenant,
            kind.rights,
            ListSpec {
                expiring_within_days: Some(30),
                ..ListSpec::default()
            },
        )
        .await?;
        expiring.extend(soon);
    }
    body.push_str("</div></section>");

    expiring.sort_by_key(|c| c.expires_at);
    body.push_str(
        "<section aria-labelledby=\"expiring\"><h2 id=\"expiring\">Expiring within 30 days</h2>",
    );
    if expiring.is_empty() {
        body.push_str("<p class=\"muted\">Nothing expires in the next 30 days.</p>");
    } else {
        body.push_str("<div class=\"table-wrap\"><table class=\"responsive\"><caption class=\"visually-hidden\">Credentials expiring within 30 days</caption><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Kind</th><th scope=\"col\">Expires</th></tr></thead><tbody>");
        for c in expiring.iter().take(EXPIRING_SHOWN) {
            let _ = write!(
                body,
                "<tr><td data-label=\"Name\"><a href=\"{}\">{}</a></td><td data-label=\"Kind\">{}</td><td data-label=\"Expires\">{}</td></tr>",
                kind_of(c.kind).list,
                esc(&c.name),
                kind_of(c.kind).singular,
                maybe_time(c.expires_at.as_ref(), "never")
            );
        }
        body.push_str("</tbody></table></div>");
        if expiring.len() > EXPIRING_SHOWN {
            let _ = write!(
                body,
                "<p class=\"muted\">{} more expire within 30 days, not shown: the soonest are \
                 above. <a href=\"/console/api-tokens?expiring=30\">API tokens expiring within \
                 30 days</a></p>",
                expiring.len() - EXPIRING_SHOWN
            );
        }
    }
    body.push_str("</section>");

    if console.may(Capability::AuditRead) {
        let (events, _) = ops::list_audit_events(
            app,
            &console.who,
            AuditQuery {
                limit: 5,
                ..audit_query(&console, None)
            },
        )
        .await?;
        body.push_str("<section aria-labelledby=\"recent\"><h2 id=\"recent\">Recent activity</h2>");
        body.push_str(&audit_table(&events, false));
        body.push_str("<p><a href=\"/console/audit\">The whole audit log</a></p></section>");
    }
    let frame = console.frame("/console").await?;
    Ok(console.render(frame, "Overview", &body).into_response())
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().collect::<String>() + chars.as_str()
    })
}

// ------------------------------------------------------------------------------------------------
// API tokens

#[derive(serde::Deserialize, Default)]
pub(crate) struct TokenFilters {
    #[serde(default)]
    q: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    expiring: String,
    /// The page after this token (a cursor; not with a search).
    #[serde(default)]
    after: String,
}

/// Where a list page starts (`?after=<id>`: the cursor the previous page's "Next page" link
/// carries).
#[derive(serde::Deserialize, Default)]
pub(crate) struct PageStart {
    #[serde(default)]
    after: String,
}

/// The credential a page starts after, from its link's `after`.
fn page_after(raw: &str) -> Result<Option<CredentialId>, ConsoleError> {
    match raw {
        "" => Ok(None),
        raw => credential_id(raw).map(Some),
    }
}

/// Under a paged list at `list`: how many `what` it shows, and the links to the next page and
/// back to the first.
fn paging(list: &str, shown: usize, what: &str, after: bool, next: Option<CredentialId>) -> String {
    let mut out = String::new();
    if let Some(next) = next {
        let _ = write!(
            out,
            "<p class=\"muted\" role=\"status\">{shown} live {what} shown; more on the next \
             page.</p><p><a rel=\"next\" href=\"{list}?after={}\">Next page</a></p>",
            next.as_uuid()
        );
    }
    if after {
        let _ = write!(out, "<p><a href=\"{list}\">First page</a></p>");
    }
    out
}

/// The credentials of `rights`' kind (within `spec`'s expiry window) that `keep` accepts, read
/// from the store a page at a time so that every one is searched, up to [`LIST_LIMIT`] matches;
/// and whether more matched.
async fn search_credentials(
    console: &Console,
    rights: KindRights,
    spec: ListSpec,
    keep: impl Fn(&Credential) -> bool,
) -> Result<(Vec<Credential>, bool), ConsoleError> {
    let mut found = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = ops::list_credentials(
            &console.app,
            &console.who,
            console.tenant,
            rights,
            ListSpec {
                after,
                limit: Some(LIST_LIMIT),
                ..spec
            },
        )
        .await?;
        for credential in page.into_iter().filter(|c| keep(c)) {
            if found.len() == LIST_LIMIT as usize {
                return Ok((found, true));
            }
            found.push(credential);
        }
        match next {
            Some(next) => after = Some(next),
            None => return Ok((found, false)),
        }
    }
}

pub(crate) async fn api_tokens(
    console: Console,
    Query(filters): Query<TokenFilters>,
) -> PageResult {
    api_tokens_page(console, filters, None).await
}

/// The API tokens page; `refused`: with its create form shown again, as sent, with its problems.
async fn api_tokens_page(
    console: Console,
    filters: TokenFilters,
    refused: Option<Refill>,
) -> PageResult {
    let refill = refused.unwrap_or_default();
    let app = &console.app;
    let now = app.now();
    let expiring_within_days = match filters.expiring.as_str() {
        "" => None,
        days => Some(
            days.parse::<u32>()
                .ok()
                .filter(|d| (1..=3650).contains(d))
                .ok_or_else(|| {
                    ConsoleError::page(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Choose an expiry filter from the list.",
                    )
                })?,
        ),
    };
    let needle = filters.q.trim().to_lowercase();
    let scope = filters.scope.trim();
    let searching = !needle.is_empty() || !scope.is_empty();
    let spec = ListSpec {
        expiring_within_days,
        ..ListSpec::default()
    };
    let (shown, next, more) = if searching {
        let (found, more) = search_credentials(&console, ops::API_TOKENS, spec, |t| {
            (needle.is_empty() || t.name.to_lowercase().contains(&needle))
                && (scope.is_empty() || t.scopes.iter().any(|s| s.as_str() == scope))
        })
        .await?;
        (found, None, more)
    } else {
        let after = page_after(&filters.after)?;
        let (page, next) = ops::list_credentials(
            app,
            &console.who,
            console.tenant,
            ops::API_TOKENS,
            ListSpec {
                after,
                limit: Some(LIST_LIMIT),
                ..spec
            },
        )
        .await?;
        (page, next, false)
    };
    let may_write = console.may(Capability::ApiTokensWrite);

    let mut body = String::new();
    let selected = |value: &str| {
        if filters.expiring == value {
            " selected"
        } else {
            ""
        }
    };
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/console/api-tokens\" class=\"filters\" role=\"search\">\
         <label>Name contains<input type=\"text\" name=\"q\" value=\"{q}\"></label>\
         <label>Holds scope<input type=\"text\" name=\"scope\" value=\"{scope}\" list=\"known-scopes\"></label>\
         <label>Expiring<select name=\"expiring\"><option value=\"\"{any}>any time</option>\
         <option value=\"7\"{d7}>within 7 days</option><option value=\"30\"{d30}>within 30 days</option>\
         <option value=\"90\"{d90}>within 90 days</option></select></label>\
         <button type=\"submit\" class=\"secondary\">Filter</button></form>{datalist}",
        q = esc(&filters.q),
        scope = esc(&filters.scope),
        any = selected(""),
        d7 = selected("7"),
        d30 = selected("30"),
        d90 = selected("90"),
        datalist = known_scopes_datalist(),
    );
    if may_write {
        body.push_str("<p><a class=\"button\" href=\"#create\">Create an API token</a></p>");
    }
    let status_line = if searching && more {
        format!(
            "The first {} matching live tokens shown; narrow the search to see the others.",
            shown.len()
        )
    } else if searching {
        format!("{} matching live tokens.", shown.len())
    } else if next.is_some() {
        format!("{} live tokens shown; more on the next page.", shown.len())
    } else {
        format!("{} live tokens shown.", shown.len())
    };
    let _ = write!(body, "<p class=\"muted\" role=\"status\">{status_line}</p>");
    body.push_str("<div class=\"table-wrap\"><table class=\"responsive\"><caption class=\"visually-hidden\">API tokens</caption><thead><tr>\
        <th scope=\"col\">Name</th><th scope=\"col\">Token</th><th scope=\"col\">Scopes</th>\
        <th scope=\"col\">Expires</th><th scope=\"col\">Last used</th><th scope=\"col\">Status</th>\
        <th scope=\"col\">Created by</th>");
    if may_write {
        body.push_str("<th scope=\"col\">Actions</th>");
    }
    body.push_str("</tr></thead><tbody>");
    let names = KnownNames::of(&console, &shown);
    for token in &shown {
        let scopes = token
            .scopes
            .iter()
            .map(|s| code(s.as_str()))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = write!(
            body,
            "<tr><td data-label=\"Name\">{}</td><td data-label=\"Token\">{}</td><td data-label=\"Scopes\">{}</td>\
             <td data-label=\"Expires\">{}</td><td data-label=\"Last used\">{}</td><td data-label=\"Status\">{}</td>\
             <td data-label=\"Created by\">{}</td>",
            detail_link("api-tokens", token),
            code(&token_hint(token)),
            if scopes.is_empty() { "<span class=\"muted\">none</span>".into() } else { scopes },
            maybe_time(token.expires_at.as_ref(), "never"),
            maybe_time(token.last_used_at.as_ref(), "never"),
            status(token, now),
            creator(token.created_by.as_ref(), &names),
        );
        if may_write {
            body.push_str(&row_actions("api-tokens", token));
        }
        body.push_str("</tr>");
    }
    if shown.is_empty() {
        body.push_str("<tr><td colspan=\"8\" class=\"muted\">No tokens match.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    if let Some(next) = next {
        let _ = write!(
            body,
            "<p><a rel=\"next\" href=\"/console/api-tokens?expiring={}&amp;after={}\">Next page</a></p>",
            esc(&filters.expiring),
            next.as_uuid()
        );
    }

    if may_write {
        let _ = write!(
            body,
            "<h2 id=\"create\">Create an API token</h2>{summary}\
             <form method=\"post\" action=\"/console/api-tokens\" class=\"stack\" novalidate>{csrf}\
             {name}{scopes}{expiry}<div><button type=\"submit\">Create token</button></div></form>",
            summary = refill.summary(),
            csrf = html::csrf_field(&console.csrf),
            name = name_field(
                &refill,
                "",
                html::utf16_room(keyplane_core::validate::MAX_NAME_CHARS),
            ),
            scopes = scope_picker(&console, &refill),
            expiry = expiry_fields(
                &policy(&console).await?,
                CredentialKind::ApiToken,
                now,
                None,
                &refill,
            ),
        );
    }
    let mut frame = console.frame("/console/api-tokens").await?;
    frame.refused = !refill.problems.is_empty();
    Ok(console.render(frame, "API tokens", &body).into_response())
}

/// A create form's name field, with its problem when refused; `hint` is shown under the label,
/// `max`: its `maxlength`, which browsers count in UTF-16 units ([`html::utf16_room`]).
fn name_field(refill: &Refill, hint: &str, max: usize) -> String {
    let (attributes, problem) = refill.field("name", "");
    format!(
        "<div class=\"field\"><label for=\"name\">Name{hint}</label>\
         <input type=\"text\" id=\"name\" name=\"name\" required maxlength=\"{max}\" \
         value=\"{value}\"{attributes}>{problem}</div>",
        value = esc(refill.value("name", "")),
    )
}

/// The refusal of a form whose own checks found `problems`, and whose expiry was refused with
/// `expiry` (`None`: it was not): one refusal of every field, or the expiry's own when it is not
/// about a field.
fn refusal(problems: Vec<keyplane_core::FieldError>, expiry: Option<ConsoleError>) -> ConsoleError {
    let mut error = ConsoleError::from(keyplane_core::Error::Validation(problems));
    match expiry {
        None => error,
        Some(ConsoleError::Page {
            fields: more,
            details: said,
            ..
        }) if !more.is_empty() => {
            if let ConsoleError::Page {
                fields, details, ..
            } = &mut error
            {
                fields.extend(more);
                details.extend(said);
            }
            error
        }
        Some(other) => other,
    }
}

/// A refused create: the page of its form again, with each problem at its field (status 422, or
/// 409 for a name taken), when the refusal is about those fields; else the refusal's own page.
async fn refused_form<F, Fut>(
    console: Console,
    form: &super::Form,
    error: ConsoleError,
    fields: &[(&str, &str, &str)],
    page: F,
) -> PageResult
where
    F: FnOnce(Console, Refill) -> Fut,
    Fut: std::future::Future<Output = PageResult>,
{
    let Some(problems) = error.problems(fields) else {
        return Err(error);
    };
    let status = match &error {
        ConsoleError::Page { status, .. } => *status,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let mut response = page(console, form.refill(problems)).await?;
    *response.status_mut() = status;
    Ok(response)
}

fn known_scopes_datalist() -> String {
    let mut list = String::from("<datalist id=\"known-scopes\"><option value=\"*\">");
    for capability in Capability::ALL {
        let _ = write!(list, "<option value=\"{}\">", capability.key());
    }
    list.push_str("</datalist>");
    list
}

/// Checkboxes for the scopes this principal may hand on, and a field for others; those sent
/// checked again when the form is refused.
fn scope_picker(console: &Console, refill: &Refill) -> String {
    let rights = console.who.rights_in(console.tenant);
    let may_give = |scope: &str| {
        Scope::parse(scope)
            .ok()
            .zip(rights)
            .is_some_and(|(scope, rights)| rights.covers(&scope))
    };
    let mut picker = String::from("<fieldset><legend>Scopes</legend>");
    let mut options: Vec<&str> = vec!["*"];
    options.extend(Capability::ALL.iter().map(|c| c.key()));
    for (i, scope) in options.into_iter().enumerate() {
        if !may_give(scope) {
            continue;
        }
        let label = if scope == "*" {
            "* (everything in this organization)".to_string()
        } else {
            scope.to_string()
        };
        let _ = write!(
            picker,
            "<label><input type=\"checkbox\" name=\"scopes\" value=\"{}\" id=\"scope-{i}\"{}> {}</label>",
            esc(scope),
            if refill.sent("scopes", scope) { " checked" } else { "" },
            esc(&label)
        );
    }
    let (attributes, problem) = refill.field("other_scopes", "");
    let _ = write!(
        picker,
        "<div class=\"field\"><label for=\"other_scopes\">Other scopes \
         <span class=\"hint\">for your own services, separated by spaces</span></label>\
         <input type=\"text\" id=\"other_scopes\" name=\"other_scopes\" \
         placeholder=\"billing/invoices:read\" value=\"{}\"{attributes}>{problem}</div></fieldset>",
        esc(refill.value("other_scopes", ""))
    );
    picker
}

fn row_actions(slug: &str, credential: &Credential) -> String {
    let id = credential.id.as_uuid();
    let name = esc(&credential.name);
    // A canary's secret is fixed (it is bait): rotating it is always refused.
    let mut actions = String::new();
    if credential.kind == CredentialKind::RobotAccount {
        let _ = write!(
            actions,
            "<a href=\"/console/{slug}/{id}/permissions\" aria-label=\"Permissions of {name}\">Permissions</a>"
        );
    }
    if !credential.canary {
        let _ = write!(
            actions,
            "<a href=\"/console/{slug}/{id}/rotate\" aria-label=\"Rotate {name}\">Rotate</a>"
        );
    }
    format!(
        "<td data-label=\"Actions\" class=\"actions\">{actions}\
         <a href=\"/console/{slug}/{id}/revoke\" aria-label=\"Revoke {name}\">Revoke</a></td>"
    )
}

pub(crate) async fn create_api_token(console: Console, body: Bytes) -> PageResult {
    let form = console.form(&body)?;
    match issue_api_token(&console, &form).await {
        Ok(done) => Ok(done),
        Err(error) => {
            let fields = [
                ("name", "name", "Name"),
                ("scopes", "other_scopes", "Scopes"),
                expiry_field(&form),
            ];
            refused_form(console, &form, error, &fields, |console, refill| {
                api_tokens_page(console, TokenFilters::default(), Some(refill))
            })
            .await
        }
    }
}

async fn issue_api_token(console: &Console, form: &super::Form) -> PageResult {
    let app = &console.app;
    // Every field's problem at once, not the first one's.
    let mut problems = Vec::new();
    let name =
        keyplane_core::validate::name(FieldPath::body("name"), form.get("name").unwrap_or(""))
            .map_err(|e| problems.push(e))
            .ok();
    let mut raw_scopes: Vec<String> = form.all("scopes").into_iter().map(str::to_string).collect();
    if let Some(other) = form.text("other_scopes") {
        raw_scopes.extend(
            other
                .split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
    }
    let scopes = ScopeSet::parse_list(&FieldPath::body("scopes"), &raw_scopes)
        .map_err(|e| problems.extend(e))
        .ok();
    let (name, scopes, expires_at) = match (name, scopes, expiry_from(form, app.now())) {
        (Some(name), Some(scopes), Ok(expires_at)) => (name, scopes, expires_at),
        (_, _, expiry) => return Err(refusal(problems, expiry.err())),
    };
    let home = secret_home(console, None).await?;
    let keep = created(&home, app.now());
    ops::create_credential(
        app,
        &console.who,
        &console.context,
        console.tenant,
        ops::API_TOKENS,
        CredentialSpec {
            name,
            scopes,
            permissions: Vec::new(),
            expires_at,
            canary: false,
        },
        Some(&keep),
    )
    .await?;
    to_secret_page(console, &home).await
}

// ------------------------------------------------------------------------------------------------
// The secret, once

pub(crate) async fn secret(console: Console) -> PageResult {
    let app = &console.app;
    let flashes = app
        .inner()
        .console_sessions
        .take_secrets(app, &console.cookie)
        .await?;
    let frame = console.frame("").await?;
    if flashes.is_empty() {
        let body =
            "<div class=\"error\" role=\"alert\"><p>This secret was shown once and is gone. \
                    If it was not stored, rotate it to get a new one.</p></div>\
                    <p><a href=\"/console\" data-autofocus>Back to the console</a></p>";
        return Ok((
            StatusCode::GONE,
            console.render(frame, "Secret no longer shown", body),
        )
            .into_response());
    }
    // Robots' login lines name the registry's project: read once, and only a help, so a failing
    // read shows the secrets without them rather than losing them.
    let project = if flashes
        .iter()
        .any(|f| f.kind() == Some(CredentialKind::RobotAccount))
    {
        match ops::get_registry(app, &console.who, console.tenant).await {
            Ok(registry) => registry.map(|r| r.project),
            Err(error) => {
                tracing::warn!(error = %error, "the registry for robots' login lines could not be read");
                None
            }
        }
    } else {
        None
    };
    let several = flashes.len() > 1;
    let mut body = String::new();
    if several {
        let _ = write!(
            body,
            "<p>{} new secrets are waiting, each shown only now.</p>",
            flashes.len()
        );
    }
    // "Done" leads to the list of the newest secret's kind.
    let mut list = "/console";
    for (n, flash) in flashes.iter().enumerate() {
        let (singular, kind_list) = match flash.kind() {
            Some(kind) => (kind_of(kind).singular, kind_of(kind).list),
            None if flash.kind == super::webhook_pages::SECRET_KIND => {
                ("webhook", super::webhook_pages::LIST)
            }
            None => {
                tracing::warn!(kind = %flash.kind, "a console secret of an unknown kind");
                continue;
            }
        };
        list = kind_list;
        // The first keeps the ids the single-secret page always had.
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{}", n + 1)
        };
        if several {
            let _ = write!(
                body,
                "<h2>{} {}</h2>",
                esc(&capitalized(singular)),
                esc(&flash.name)
            );
        }
        // A read-only field: a keyboard reaches it with Tab and selects it whole (the script
        // selects it on focus), a screen reader reads it character by character and hears that
        // it is shown once. The secret is its value only: never in a title, label or URL.
        let _ = write!(
            body,
            "<p id=\"secret-note{suffix}\">{note} This is the secret of the {singular} <strong>{name}</strong> \
             (<code>{id}</code>). <strong>It is shown only now</strong>: store it where it will be \
             used. Reloading or going back will not show it again.</p>\
             <div class=\"secret-box\"><label for=\"secret{suffix}\">Secret of {singular} {name}</label>\
             <input type=\"text\" id=\"secret{suffix}\" class=\"secret\" value=\"{secret}\" readonly \
             autocomplete=\"off\" autocapitalize=\"off\" spellcheck=\"false\" \
             aria-describedby=\"secret-note{suffix}\"{autofocus}>\
             <button type=\"button\" data-copy=\"secret{suffix}\" data-status=\"copy-status{suffix}\" hidden>\
             Copy<span class=\"visually-hidden\"> the secret of {name}</span></button>\
             <span id=\"copy-status{suffix}\" class=\"copied\" role=\"status\"></span></div>",
            note = esc(&flash.note),
            name = esc(&flash.name),
            id = flash.id,
            secret = esc(&flash.secret),
            autofocus = if n == 0 { " data-autofocus" } else { "" },
        );
        if let (Some(CredentialKind::RobotAccount), Some(project)) = (flash.kind(), &project) {
            for command in robot_commands(&console, project, &flash.name) {
                let _ = write!(body, "<pre class=\"cmd\">{}</pre>", esc(&command));
            }
        }
    }
    let _ = write!(
        body,
        "<form method=\"get\" action=\"{list}\" class=\"stack\">\
         <label><input type=\"checkbox\" id=\"stored\" required data-enables=\"stored-done\"> \
         I have stored {it}</label>\
         <div><button type=\"submit\" id=\"stored-done\">Done</button></div></form>",
        it = if several { "them" } else { "it" },
    );
    let title = if several {
        "Store these secrets now"
    } else {
        "Store this secret now"
    };
    Ok(console.render(frame, title, &body).into_response())
}

/// "Stay signed in" (the script's warning before the idle limit): the `Console` extractor has
/// just marked the session used; a session that ended answers with the way to the sign-in.
pub(crate) async fn keep_alive(_console: Console) -> StatusCode {
    StatusCode::NO_CONTENT
}

// ------------------------------------------------------------------------------------------------
// One credential

/// A list row's name, linking to the credential's page.
fn detail_link(slug: &str, credential: &Credential) -> String {
    format!(
        "<a href=\"/console/{slug}/{}\">{}</a>",
        credential.id.as_uuid(),
        esc(&credential.name)
    )
}

/// The credential that created one, when the creator is a credential this principal may see
/// live: one read, for its name.
async fn creating_credential(
    console: &Console,
    created_by: Option<&CreatedBy>,
) -> Option<Credential> {
    let by = created_by?;
    let kind = match by.actor_type {
        ActorType::ApiToken => &KINDS[0],
        ActorType::ServiceAccount => &KINDS[1],
        ActorType::RobotAccount => &KINDS[2],
        ActorType::User | ActorType::System => return None,
    };
    if !console.may(kind.rights.read) {
        return None;
    }
    let id = CredentialId::from_uuid(by.actor_id?);
    // A creator revoked or gone is shown by its id.
    live_credential(console, kind, id).await.ok()
}

/// One credential, for an access review: what it may do, its dates and who created it (and, for
/// a service account, its grants and who gave each).
pub(crate) async fn detail_page(console: Console, uri: Uri, Path(id): Path<String>) -> PageResult {
    let kind = kind_page(&uri)?;
    let credential = live_credential(&console, kind, credential_id(&id)?).await?;
    let app = &console.app;
    let now = app.now();
    let mut known = vec![credential.clone()];
    known.extend(creating_credential(&console, credential.created_by.as_ref()).await);
    let names = KnownNames::of(&console, &known);
    let mut facts = vec![
        ("Id", code(&credential.id.as_uuid().to_string())),
        ("Token", code(&token_hint(&credential))),
    ];
    match credential.kind {
        CredentialKind::ApiToken => {
            let scopes = credential
                .scopes
                .iter()
                .map(|s| code(s.as_str()))
                .collect::<Vec<_>>()
                .join(" ");
            facts.push((
                "Scopes",
                if scopes.is_empty() {
                    "<span class=\"muted\">none</span>".into()
                } else {
                    scopes
                },
            ));
        }
        CredentialKind::RobotAccount => {
            let permissions = credential
                .permissions
                .iter()
                .map(|p| code(&p.to_wire()))
                .collect::<Vec<_>>()
                .join(" ");
            facts.push(("Permissions", permissions));
        }
        CredentialKind::ServiceAccount => {}
    }
    facts.extend([
        ("Created", time(&credential.created_at)),
        (
            "Created by",
            creator(credential.created_by.as_ref(), &names),
        ),
        (
            "Expires",
            maybe_time(credential.expires_at.as_ref(), "never"),
        ),
        (
            "Last used",
            maybe_time(credential.last_used_at.as_ref(), "never"),
        ),
        (
            "Last rotated",
            maybe_time(credential.rotated_at.as_ref(), "never"),
        ),
        ("Status", status(&credential, now)),
    ]);
    if credential.kind == CredentialKind::ServiceAccount && console.may(Capability::AuthManage) {
        let (grants, _) = ops::list_grants(
            app,
            &console.who,
            GrantFilter {
                tenant_id: console.tenant,
                subject_type: Some(SubjectType::ServiceAccount),
                subject_id: Some(credential.id.as_uuid()),
                kind: None,
                capability_key: None,
                include_revoked: false,
                after: None,
                limit: None,
            },
        )
        .await?;
        let mut list = String::new();
        for grant in &grants {
            let row = GrantRow::of(grant, &names);
            let _ = write!(
                list,
                "<li>{} <span class=\"hint\">created by {}</span></li>",
                code(&row.text),
                row.created_by
            );
        }
        facts.push((
            "Grants",
            if list.is_empty() {
                "<span class=\"muted\">none</span>".into()
            } else {
                format!("<ul class=\"plain\">{list}</ul>")
            },
        ));
    }
    let mut body = String::from("<dl class=\"facts\">");
    for (term, value) in facts {
        let _ = write!(body, "<dt>{term}</dt><dd>{value}</dd>");
    }
    body.push_str("</dl>");
    if console.may(kind.rights.write) {
        let id = credential.id.as_uuid();
        let name = esc(&credential.name);
        body.push_str("<p class=\"actions\">");
        if credential.kind == CredentialKind::RobotAccount {
            let _ = write!(
                body,
                "<a href=\"/console/robots/{id}/permissions\" aria-label=\"Permissions of {name}\">Permissions</a> "
            );
        }
        if !credential.canary {
            let _ = write!(
                body,
                "<a href=\"/console/{}/{id}/rotate\" aria-label=\"Rotate {name}\">Rotate</a> ",
                kind.slug
            );
        }
        let _ = write!(
            body,
            "<a href=\"/console/{}/{id}/revoke\" aria-label=\"Revoke {name}\">Revoke</a></p>",
            kind.slug
        );
    }
    let _ = write!(
        body,
        "<p><a href=\"{}\">All {}s</a></p>",
        kind.list, kind.singular
    );
    let frame = console.frame(kind.list).await?;
    Ok(console
        .render(
            frame,
            &format!("{} {}", capitalized(kind.singular), credential.name),
            &body,
        )
        .into_response())
}

// ------------------------------------------------------------------------------------------------
// Rotate and revoke (every kind)

async fn live_credential(
    console: &Console,
    kind: &KindPage,
    id: CredentialId,
) -> Result<Credential, ConsoleError> {
    Ok(
        ops::get_live_credential(&console.app, &console.who, console.tenant, kind.rights, id)
            .await?,
    )
}

pub(crate) async fn rotate_page(console: Console, uri: Uri, Path(id): Path<String>) -> PageResult {
    rotate_form(
        console,
        kind_page(&uri)?,
        credential_id(&id)?,
        Refill::default(),
    )
    .await
}

/// The grace periods a rotate form offers, in seconds, and how it words them.
const GRACE_CHOICES: [(u32, &str); 4] = [
    (0, "not at all: it stops now"),
    (3600, "for 1 hour"),
    (86_400, "for 1 day"),
    (604_800, "for 7 days"),
];

/// The rotate form, shown again with its problems when `refill` has any.
async fn rotate_form(
    console: Console,
    kind: &'static KindPage,
    id: CredentialId,
    refill: Refill,
) -> PageResult {
    let credential = live_credential(&console, kind, id).await?;
    console.who.require(console.tenant, kind.rights.write)?;
    if credential.canary {
        return Err(ConsoleError::page(
            StatusCode::CONFLICT,
            "A canary's secret is fixed (it is bait): it cannot be rotated.",
        ));
    }
    let expiry = expiry_fields(
        &policy(&console).await?,
        kind.rights.kind,
        console.app.now(),
        Some(credential.expires_at),
        &refill,
    );
    let (grace_attributes, grace_problem) = refill.field("grace_seconds", "");
    // What was sent when it is one of the choices; else (and in a new form) "stops now".
    let chosen = refill.value("grace_seconds", "0");
    let chosen = GRACE_CHOICES
        .iter()
        .map(|(seconds, _)| *seconds)
        .find(|seconds| seconds.to_string() == chosen)
        .unwrap_or(0);
    let mut graces = String::new();
    for (i, (seconds, words)) in GRACE_CHOICES.into_iter().enumerate() {
        // The group's first radio carries the id the error summary links to, and the focus of
        // a new form (a refused one focuses its summary).
        let first = match (i, refill.problems.is_empty()) {
            (0, true) => " id=\"grace_seconds\" data-autofocus",
            (0, false) => " id=\"grace_seconds\"",
            _ => "",
        };
        let _ = write!(
            graces,
            "<label><input type=\"radio\" name=\"grace_seconds\"{first} value=\"{seconds}\"{checked}{grace_attributes}> {words}</label>",
            checked = if seconds == chosen { " checked" } else { "" },
        );
    }
    let body = format!(
        "<p>Rotating gives the {singular} <strong>{name}</strong> a new secret; its id, name and \
         rights stay. Choose how long the current secret keeps working, so whatever uses it can \
         switch over.</p>{summary}{form}<p><a href=\"{list}\">Cancel</a></p>",
        singular = kind.singular,
        name = esc(&credential.name),
        list = kind.list,
        summary = refill.summary(),
        form = post_form(
            &format!("/console/{}/{}/rotate", kind.slug, credential.id.as_uuid()),
            &console.csrf,
            "stack",
            &format!("<fieldset><legend>The current secret keeps working</legend>{graces}{grace_problem}</fieldset>\
             {expiry}<div><button type=\"submit\">Rotate {singular} <strong>{name}</strong></button></div>",
             singular = kind.singular,
             name = esc(&credential.name)),
        ),
    );
    let mut frame = console.frame(kind.list).await?;
    frame.refused = !refill.problems.is_empty();
    Ok(console
        .render(frame, &format!("Rotate {}", credential.name), &body)
        .into_response())
}

pub(crate) async fn rotate(
    console: Console,
    uri: Uri,
    Path(id): Path<String>,
    body: Bytes,
) -> PageResult {
    let form = console.form(&body)?;
    let kind = kind_page(&uri)?;
    let id = credential_id(&id)?;
    match rotate_credential(&console, kind, id, &form).await {
        Ok(done) => Ok(done),
        Err(error) => {
            let fields = [
                (
                    "grace_seconds",
                    "grace_seconds",
                    "The current secret keeps working",
                ),
                expiry_field(&form),
            ];
            refused_form(console, &form, error, &fields, |console, refill| {
                rotate_form(console, kind, id, refill)
            })
            .await
        }
    }
}

async fn rotate_credential(
    console: &Console,
    kind: &KindPage,
    id: CredentialId,
    form: &super::Form,
) -> PageResult {
    let mut problems = Vec::new();
    let sent = form.get("grace_seconds").unwrap_or("0");
    let grace_seconds = GRACE_CHOICES
        .into_iter()
        .map(|(seconds, _)| seconds)
        .find(|seconds| seconds.to_string() == sent);
    if grace_seconds.is_none() {
        problems.push(keyplane_core::FieldError::new(
            FieldPath::body("grace_seconds"),
            keyplane_core::error::codes::INVALID_FORMAT,
            "Choose a grace period from the list.",
        ));
    }
    let (grace_seconds, expires_at) = match (grace_seconds, expiry_from(form, console.app.now())) {
        (Some(grace_seconds), Ok(expires_at)) => (grace_seconds, expires_at),
        (_, expiry) => return Err(refusal(problems, expiry.err())),
    };
    let own = Actor::Credential {
        id,
        kind: kind.rights.kind,
    };
    let home = secret_home(console, Some(own)).await?;
    let now = console.app.now();
    let keep = {
        let home = home.clone();
        move |issued: ops::Issued| {
            let note = match issued.credential.previous_secret.as_ref() {
                Some(previous) if grace_seconds > 0 => format!(
                    "Rotated. The previous secret keeps working until {} UTC.",
                    previous.expires_at.format("%Y-%m-%d %H:%M")
                ),
                _ => "Rotated. The previous secret has stopped working.".into(),
            };
            home.keep(&flash_of(&issued.credential, &issued.secret, note), now)
        }
    };
    ops::rotate_live_credential(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        kind.rights,
        id,
        RotateSpec {
            options: RotationOptions {
                grace_seconds,
                retire_when_unused_seconds: None,
            },
            expires_at,
        },
        Some(&keep),
    )
    .await?;
    to_secret_page(console, &home).await
}

pub(crate) async fn revoke_page(console: Console, uri: Uri, Path(id): Path<String>) -> PageResult {
    let kind = kind_page(&uri)?;
    let credential = live_credential(&console, kind, credential_id(&id)?).await?;
    console.who.require(console.tenant, kind.rights.write)?;
    let body = format!(
        "<div class=\"error\" role=\"alert\"><p>Revoke the {singular} <strong>{name}</strong> \
         (<code>{hint}</code>)? Everything that uses it stops working at once. This cannot be \
         undone.</p></div>{form}<p><a href=\"{list}\" data-autofocus>Cancel</a></p>",
        singular = kind.singular,
        name = esc(&credential.name),
        hint = esc(&token_hint(&credential)),
        list = kind.list,
        form = post_form(
            &format!("/console/{}/{}/revoke", kind.slug, credential.id.as_uuid()),
            &console.csrf,
            "stack",
            &format!(
                "<div><button type=\"submit\" class=\"danger\">Revoke {} <strong>{}</strong> \
                 for good</button></div>",
                kind.singular,
                esc(&credential.name)
            ),
        ),
    );
    let frame = console.frame(kind.list).await?;
    Ok(console
        .render(frame, &format!("Revoke {}", credential.name), &body)
        .into_response())
}

pub(crate) async fn revoke(
    console: Console,
    uri: Uri,
    Path(id): Path<String>,
    body: Bytes,
) -> PageResult {
    console.form(&body)?;
    let kind = kind_page(&uri)?;
    let (credential, _) = ops::revoke_credential(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        kind.rights,
        credential_id(&id)?,
    )
    .await?;
    console
        .done(
            kind.list,
            format!("Revoked {} “{}”.", kind.singular, credential.name),
        )
        .await
}

// ------------------------------------------------------------------------------------------------
// Service accounts and their grants

pub(crate) async fn service_accounts(
    console: Console,
    Query(start): Query<PageStart>,
) -> PageResult {
    service_accounts_page(console, start, None).await
}

/// The service accounts page; `refused`: with its create form, or an account's grant form (its
/// problems' field is `grant-<account id>`), shown again with its problems.
async fn service_accounts_page(
    console: Console,
    start: PageStart,
    refused: Option<Refill>,
) -> PageResult {
    let refused = refused.unwrap_or_default();
    let refused_grant = !refused.problems.is_empty()
        && refused
            .problems
            .iter()
            .all(|p| p.field.starts_with("grant-"));
    let (grant_refill, refill) = if refused_grant {
        (refused, Refill::default())
    } else {
        (Refill::default(), refused)
    };
    let app = &console.app;
    let now = app.now();
    let after = page_after(&start.after)?;
    let (accounts, next) = ops::list_credentials(
        app,
        &console.who,
        console.tenant,
        ops::SERVICE_ACCOUNTS,
        ListSpec {
            after,
            limit: Some(LIST_LIMIT),
            ..ListSpec::default()
        },
    )
    .await?;
    let (grants, _) = ops::list_grants(
        app,
        &console.who,
        GrantFilter {
            tenant_id: console.tenant,
            subject_type: Some(SubjectType::ServiceAccount),
            subject_id: None,
            kind: None,
            capability_key: None,
            include_revoked: false,
            after: None,
            limit: None,
        },
    )
    .await?;
    let names = KnownNames::of(&console, &accounts);
    let mut by_account: HashMap<uuid::Uuid, Vec<GrantRow>> = HashMap::new();
    for grant in &grants {
        by_account
            .entry(grant.subject_id)
            .or_default()
            .push(GrantRow::of(grant, &names));
    }
    // auth.manage reads and writes service accounts (as Hybridbox documents).
    let mut body = grant_refill.summary();
    body.push_str(
        "<p class=\"muted\">A service account holds what its grants confer; you can give only \
         rights you hold yourself.</p>\
         <div class=\"table-wrap\"><table class=\"responsive\"><caption class=\"visually-hidden\">Service accounts</caption><thead><tr>\
         <th scope=\"col\">Name</th><th scope=\"col\">Token</th><th scope=\"col\">Grants</th>\
         <th scope=\"col\">Expires</th><th scope=\"col\">Last used</th><th scope=\"col\">Status</th>\
         <th scope=\"col\">Created by</th><th scope=\"col\">Actions</th></tr></thead><tbody>",
    );
    for account in &accounts {
        let grants = grants_cell(
            &console,
            account,
            by_account.get(&account.id.as_uuid()),
            &grant_refill,
        );
        let _ = write!(
            body,
            "<tr><td data-label=\"Name\">{}</td><td data-label=\"Token\">{}</td><td data-label=\"Grants\">{}</td>\
             <td data-label=\"Expires\">{}</td><td data-label=\"Last used\">{}</td><td data-label=\"Status\">{}</td><td data-label=\"Created by\">{}</td>{}</tr>",
            detail_link("service-accounts", account),
            code(&token_hint(account)),
            grants,
            maybe_time(account.expires_at.as_ref(), "never"),
            maybe_time(account.last_used_at.as_ref(), "never"),
            status(account, now),
            creator(account.created_by.as_ref(), &names),
            row_actions("service-accounts", account),
        );
    }
    if accounts.is_empty() {
        body.push_str("<tr><td colspan=\"8\" class=\"muted\">No service accounts yet.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    body.push_str(&paging(
        KINDS[1].list,
        accounts.len(),
        "service accounts",
        after.is_some(),
        next,
    ));
    let _ = write!(
        body,
        "<h2 id=\"create\">Create a service account</h2>{summary}\
         <form method=\"post\" action=\"/console/service-accounts\" class=\"stack\" novalidate>{csrf}\
         {name}{expiry}<div><button type=\"submit\">Create service account</button></div></form>",
        summary = refill.summary(),
        csrf = html::csrf_field(&console.csrf),
        name = name_field(
            &refill,
            "",
            html::utf16_room(keyplane_core::validate::MAX_NAME_CHARS),
        ),
        expiry = expiry_fields(
            &policy(&console).await?,
            CredentialKind::ServiceAccount,
            now,
            None,
            &refill,
        ),
    );
    let mut frame = console.frame("/console/service-accounts").await?;
    frame.refused = !refill.problems.is_empty() || !grant_refill.problems.is_empty();
    Ok(console
        .render(frame, "Service accounts", &body)
        .into_response())
}

/// A grant as the service-account page shows it: its right in words and its creator (markup).
struct GrantRow {
    id: keyplane_core::GrantId,
    text: String,
    created_by: String,
}

impl GrantRow {
    fn of(grant: &keyplane_core::Grant, names: &KnownNames) -> Self {
        let mut text = match &grant.capability_key {
            Some(key) => key.as_str().to_string(),
            None => grant.kind.as_str().to_string(),
        };
        if let Some(resource) = &grant.resource.resource_type {
            let _ = write!(text, " on {resource}");
            if let Some(id) = &grant.resource.resource_id {
                let _ = write!(text, " {id}");
            }
        }
        Self {
            id: grant.id,
            text,
            created_by: creator(grant.created_by.as_ref(), names),
        }
    }
}

/// A service account's grants, each with a revoke button, and a form to grant one more right
/// (shown again with its problem when `refill` has one for this account's field).
fn grants_cell(
    console: &Console,
    account: &Credential,
    grants: Option<&Vec<GrantRow>>,
    refill: &Refill,
) -> String {
    let mut cell = String::new();
    for GrantRow {
        id,
        text,
        created_by,
    } in grants.into_iter().flatten()
    {
        let _ = write!(
            cell,
            "<div>{} <span class=\"hint\">created by {created_by}</span>{}</div>",
            code(text),
            post_form(
                &format!("/console/grants/{}/revoke", id.as_uuid()),
                &console.csrf,
                "inline",
                &format!(
                    " <button type=\"submit\" class=\"link\" aria-label=\"Revoke grant {} of {}\">revoke</button>",
                    esc(text),
                    esc(&account.name)
                ),
            )
        );
    }
    if cell.is_empty() {
        cell.push_str("<div class=\"muted\">none</div>");
    }
    let id = account.id.as_uuid();
    let field = format!("grant-{id}");
    let (attributes, problem) = refill.field(&field, "");
    let refused = refill.problems.iter().any(|p| p.field == field);
    let selected = |key: &str| {
        if refused && refill.sent("right", key) {
            " selected"
        } else {
            ""
        }
    };
    let rights = console.who.rights_in(console.tenant);
    let mut options = String::new();
    if rights.is_some_and(ScopeSet::holds_everything) {
        let _ = write!(
            options,
            "<option value=\"account_owner\"{}>account owner (everything)</option>",
            selected("account_owner")
        );
    }
    for capability in Capability::ALL {
        if rights.is_some_and(|r| r.grants(capability)) {
            let _ = write!(
                options,
                "<option value=\"{0}\"{1}>{0}</option>",
                capability.key(),
                selected(capability.key())
            );
        }
    }
    let _ = write!(
        cell,
        "{}",
        post_form(
            &format!("/console/service-accounts/{id}/grants"),
            &console.csrf,
            "inline",
            &format!(
                "<label class=\"hint\" for=\"grant-{id}\">Grant<span class=\"visually-hidden\"> a \
                 right to {name}</span></label> \
                 <select id=\"grant-{id}\" name=\"right\"{attributes}>{options}</select> \
                 <button type=\"submit\" class=\"secondary\" aria-label=\"Grant to {name}\">Grant</button>{problem}",
                name = esc(&account.name)
            ),
        )
    );
    cell
}

pub(crate) async fn create_grant(
    console: Console,
    Path(id): Path<String>,
    body: Bytes,
) -> PageResult {
    let form = console.form(&body)?;
    let account = live_credential(&console, &KINDS[1], credential_id(&id)?).await?;
    match grant_right(&console, &account, &form).await {
        Ok(done) => Ok(done),
        Err(error) => {
            let field = format!("grant-{}", account.id.as_uuid());
            let label = format!("Grant a right to {}", account.name);
            let fields = [("right", field.as_str(), label.as_str())];
            refused_form(console, &form, error, &fields, |console, refill| {
                service_accounts_page(console, PageStart::default(), Some(refill))
            })
            .await
        }
    }
}

async fn grant_right(console: &Console, account: &Credential, form: &super::Form) -> PageResult {
    let (kind, capability_key) = match form.get("right").unwrap_or("") {
        "account_owner" => (keyplane_core::GrantKind::AccountOwner, None),
        key => match Capability::from_key(key) {
            Some(capability) => (
                keyplane_core::GrantKind::Capability,
                Some(Scope::parse(capability.key()).expect("capability keys are scopes")),
            ),
            None => {
                return Err(
                    keyplane_core::Error::Validation(vec![keyplane_core::FieldError::new(
                        FieldPath::body("right"),
                        keyplane_core::error::codes::INVALID_FORMAT,
                        "Choose a right from the list.",
                    )])
                    .into(),
                )
            }
        },
    };
    ops::create_grant(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        keyplane_core::NewGrant {
            kind,
            subject_type: SubjectType::ServiceAccount,
            subject_id: account.id.as_uuid(),
            capability_key,
            resource: keyplane_core::GrantResource {
                resource_type: None,
                resource_id: None,
            },
        },
        None,
    )
    .await?;
    console
        .done(
            "/console/service-accounts",
            format!("Granted to “{}”.", account.name),
        )
        .await
}

pub(crate) async fn revoke_grant(
    console: Console,
    Path(id): Path<String>,
    body: Bytes,
) -> PageResult {
    console.form(&body)?;
    let id = keyplane_core::GrantId::parse(&id)
        .ok_or_else(|| ConsoleError::page(StatusCode::NOT_FOUND, "There is no such grant."))?;
    ops::revoke_grant(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        id,
    )
    .await?;
    console
        .done(
            "/console/service-accounts",
            "Revoked the grant.".to_string(),
        )
        .await
}

pub(crate) async fn create_service_account(console: Console, body: Bytes) -> PageResult {
    let form = console.form(&body)?;
    match issue_service_account(&console, &form).await {
        Ok(done) => Ok(done),
        Err(error) => {
            let fields = [("name", "name", "Name"), expiry_field(&form)];
            refused_form(console, &form, error, &fields, |console, refill| {
                service_accounts_page(console, PageStart::default(), Some(refill))
            })
            .await
        }
    }
}

async fn issue_service_account(console: &Console, form: &super::Form) -> PageResult {
    let app = &console.app;
    let name =
        keyplane_core::validate::name(FieldPath::body("name"), form.get("name").unwrap_or(""));
    let (name, expires_at) = match (name, expiry_from(form, app.now())) {
        (Ok(name), Ok(expires_at)) => (name, expires_at),
        (name, expiry) => return Err(refusal(name.err().into_iter().collect(), expiry.err())),
    };
    let home = secret_home(console, None).await?;
    let keep = created(&home, app.now());
    ops::create_credential(
        app,
        &console.who,
        &console.context,
        console.tenant,
        ops::SERVICE_ACCOUNTS,
        CredentialSpec {
            name,
            scopes: ScopeSet::empty(),
            permissions: Vec::new(),
            expires_at,
            canary: false,
        },
        Some(&keep),
    )
    .await?;
    to_secret_page(console, &home).await
}

// ------------------------------------------------------------------------------------------------
// Registry and robot accounts

/// The lines that log the robot `name` of the registry `project` in, reading the secret from
/// standard input (never a command-line argument, which other users of the machine can see).
fn robot_commands(console: &Console, project: &str, name: &str) -> Vec<String> {
    let user = keyplane_core::registry::robot_username(project, name);
    let endpoint = &console.app.inner().config.registry.endpoint;
    vec![
        format!("docker login --username '{user}' --password-stdin {endpoint}"),
        format!("skopeo login --username '{user}' --password-stdin {endpoint}"),
    ]
}

pub(crate) async fn registry(console: Console, Query(start): Query<PageStart>) -> PageResult {
    registry_page(console, start, None).await
}

/// The registry page; `refused`: with its robot form shown again with its problems.
async fn registry_page(console: Console, start: PageStart, refused: Option<Refill>) -> PageResult {
    let refill = refused.unwrap_or_default();
    let app = &console.app;
    let after = page_after(&start.after)?;
    let now = app.now();
    let may_write = console.may(Capability::RegistryWrite);
    let mut body = String::new();
    match ops::get_registry(app, &console.who, console.tenant).await? {
        None => {
            body.push_str("<p>The registry is not enabled for this organization.</p>");
            if may_write {
                body.push_str(&post_form(
                    "/console/registry",
                    &console.csrf,
                    "stack",
                    "<p>Enabling it creates the project and a <code>default</code> robot that may \
                     pull and push; its secret is shown once.</p>\
                     <div><button type=\"submit\">Enable the registry</button></div>",
                ));
            }
        }
        Some(registry) => {
            let endpoint = &app.inner().config.registry.endpoint;
            let _ = write!(
                body,
                "<p>Project <code>{}</code> at <code>{}</code>.</p>",
                esc(&registry.project),
                esc(endpoint)
            );
            let (robots, next) = ops::list_credentials(
                app,
                &console.who,
                console.tenant,
                ops::ROBOTS,
                ListSpec {
                    after,
                    limit: Some(LIST_LIMIT),
                    ..ListSpec::default()
                },
            )
            .await?;
            body.push_str("<h2>Robot accounts</h2><div class=\"table-wrap\"><table class=\"responsive\"><caption class=\"visually-hidden\">Robot accounts</caption><thead><tr>\
                <th scope=\"col\">Login</th><th scope=\"col\">Permissions</th><th scope=\"col\">Expires</th>\
                <th scope=\"col\">Last used</th><th scope=\"col\">Status</th><th scope=\"col\">Created by</th>");
            if may_write {
                body.push_str("<th scope=\"col\">Actions</th>");
            }
            body.push_str("</tr></thead><tbody>");
            let names = KnownNames::of(&console, &robots);
            for robot in &robots {
                let user = keyplane_core::registry::robot_username(&registry.project, &robot.name);
                let permissions = robot
                    .permissions
                    .iter()
                    .map(|p| code(&p.to_wire()))
                    .collect::<Vec<_>>()
                    .join(" ");
                let _ = write!(
                    body,
                    "<tr><td data-label=\"Login\"><a href=\"/console/robots/{}\">{}</a><pre class=\"cmd\">docker login --username '{}' --password-stdin {}</pre></td>\
                     <td data-label=\"Permissions\">{}</td><td data-label=\"Expires\">{}</td>\
                     <td data-label=\"Last used\">{}</td><td data-label=\"Status\">{}</td>\
                     <td data-label=\"Created by\">{}</td>",
                    robot.id.as_uuid(),
                    code(&user),
                    esc(&user),
                    esc(endpoint),
                    permissions,
                    maybe_time(robot.expires_at.as_ref(), "never"),
                    maybe_time(robot.last_used_at.as_ref(), "never"),
                    status(robot, now),
                    creator(robot.created_by.as_ref(), &names),
                );
                if may_write {
                    body.push_str(&row_actions("robots", robot));
                }
                body.push_str("</tr>");
            }
            if robots.is_empty() {
                body.push_str("<tr><td colspan=\"7\" class=\"muted\">No robot accounts.</td></tr>");
            }
            body.push_str("</tbody></table></div>");
            body.push_str(&paging(
                KINDS[2].list,
                robots.len(),
                "robot accounts",
                after.is_some(),
                next,
            ));
            if may_write {
                let _ = write!(
                    body,
                    "<h2 id=\"create\">Create a robot account</h2>{summary}\
                     <form method=\"post\" action=\"/console/robots\" class=\"stack\" novalidate>{csrf}\
                     {name}{permissions}{expiry}<div><button type=\"submit\">Create robot</button></div></form>",
                    summary = refill.summary(),
                    csrf = html::csrf_field(&console.csrf),
                    name = name_field(
                        &refill,
                        " <span class=\"hint\">lowercase letters, digits, <code>._-</code></span>",
                        // Counted in bytes, ASCII only: as many UTF-16 units.
                        keyplane_core::registry::MAX_ROBOT_NAME,
                    ),
                    permissions = permissions_field(refill.value("permissions", ""), &refill),
                    expiry = expiry_fields(
                        &policy(&console).await?,
                        CredentialKind::RobotAccount,
                        now,
                        None,
                        &refill,
                    ),
                );
            }
        }
    }
    let mut frame = console.frame("/console/registry").await?;
    frame.refused = !refill.problems.is_empty();
    Ok(console.render(frame, "Registry", &body).into_response())
}

fn permissions_field(current: &str, refill: &Refill) -> String {
    let (attributes, problem) = refill.field("permissions", "permissions-hint");
    format!(
        "<div class=\"field\"><label for=\"permissions\">Permissions</label>\
         <span class=\"hint\" id=\"permissions-hint\">one per line: <code>pull</code>, \
         <code>push</code> or <code>delete</code>, optionally <code>:repository-glob</code> \
         (<code>pull:team/*</code>)</span>\
         <textarea id=\"permissions\" name=\"permissions\" required{attributes}>{}</textarea>{problem}</div>",
        esc(current)
    )
}

fn parse_permissions(form: &super::Form) -> Result<Vec<RobotPermission>, ConsoleError> {
    Ok(permission_lines(form).map_err(keyplane_core::Error::Validation)?)
}

/// The permissions a form's lines give, or each line's problem.
fn permission_lines(
    form: &super::Form,
) -> Result<Vec<RobotPermission>, Vec<keyplane_core::FieldError>> {
    let lines: Vec<String> = form
        .get("permissions")
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    RobotPermission::parse_list(&FieldPath::body("permissions"), &lines)
}

pub(crate) async fn enable_registry(console: Console, body: Bytes) -> PageResult {
    console.form(&body)?;
    let home = secret_home(&console, None).await?;
    let now = console.app.now();
    let keep = {
        let home = home.clone();
        move |(_, issued): (keyplane_core::Registry, ops::Issued)| {
            let note = "The registry is enabled.".to_string();
            home.keep(&flash_of(&issued.credential, &issued.secret, note), now)
        }
    };
    ops::enable_registry(
        &console.app,
        &console.who,
        &console.context,
        console.tenant,
        Some(&keep),
    )
    .await?;
    to_secret_page(&console, &home).await
}

pub(crate) async fn create_robot(console: Console, body: Bytes) -> PageResult {
    let form = console.form(&body)?;
    match issue_robot(&console, &form).await {
        Ok(done) => Ok(done),
        Err(error) => {
            let fields = [
                ("name", "name", "Name"),
                ("permissions", "permissions", "Permissions"),
                expiry_field(&form),
            ];
            refused_form(console, &form, error, &fields, |console, refill| {
                registry_page(console, PageStart::default(), Some(refill))
            })
            .await
        }
    }
}

async fn issue_robot(console: &Console, form: &super::Form) -> PageResult {
    let app = &console.app;
    let mut problems = Vec::new();
    let name = keyplane_core::registry::robot_name(
        FieldPath::body("name"),
        form.get("name").unwrap_or("").trim(),
    )
    .map_err(|e| problems.push(e))
    .ok();
    let permissions = permission_lines(form).map_err(|e| problems.extend(e)).ok();
    let (name, permissions, expires_at) = match (name, permissions, expiry_from(form, app.now())) {
        (Some(name), Some(permissions), Ok(expires_at)) => (name, permissions, expires_at),
        (_, _, expiry) => return Err(refusal(problems, expiry.err())),
    };
    let home = secret_home(console, None).await?;
    let keep = created(&home, app.now());
    ops::create_robot(
        app,
        &console.who,
        &console.context,
        console.tenant,
        CredentialSpec {
            name,
            scopes: ScopeSet::empty(),
            permissions,
            expires_at,
            canary: false,
        },
        Some(&keep),
    )
    .await?;
    to_secret_page(console, &home).await
}

pub(crate) async fn robot_permissions_page(console: Console, Path(id): Path<String>) -> PageResult {
    robot_permissions_form(console, credential_id(&id)?, Refill::default()).await
}

/// A robot's permissions form, shown again as sent with its problems when `refill` has any.
async fn robot_permissions_form(console: Console, id: CredentialId, refill: Refill) -> PageResult {
    let robot = live_credential(&console, &KINDS[2], id).await?;
    console
        .who
        .require(console.tenant, Capability::RegistryWrite)?;
    let current = robot
        .permissions
        .iter()
        .map(RobotPermission::to_wire)
        .collect::<Vec<_>>()
        .join("\n");
    let body = format!(
        "{}{}<p><a href=\"/console/registry\">Cancel</a></p>",
        refill.summary(),
        post_form(
            &format!("/console/robots/{}/permissions", robot.id.as_uuid()),
            &console.csrf,
            "stack",
            &format!(
                "{}<div><button type=\"submit\">Save permissions</button></div>",
                permissions_field(refill.value("permissions", &current), &refill)
            ),
        )
    );
    let mut frame = console.frame("/console/registry").await?;
    frame.refused = !refill.problems.is_empty();
    Ok(console
        .render(frame, &format!("Permissions of {}", robot.name), &body)
        .into_response())
}

pub(crate) async fn update_robot_permissions(
    console: Console,
    Path(id): Path<String>,
    body: Bytes,
) -> PageResult {
    let form = console.form(&body)?;
    let id = credential_id(&id)?;
    let saved = match parse_permissions(&form) {
        Ok(permissions) => ops::update_robot_permissions(
            &console.app,
            &console.who,
            &console.context,
            console.tenant,
            id,
            permissions,
        )
        .await
        .map_err(ConsoleError::from),
        Err(error) => Err(error),
    };
    match saved {
        Ok(robot) => {
            console
                .done(
                    "/console/registry",
                    format!("Saved the permissions of “{}”.", robot.name),
                )
                .await
        }
        Err(error) => {
            let fields = [("permissions", "permissions", "Permissions")];
            refused_form(console, &form, error, &fields, |console, refill| {
                robot_permissions_form(console, id, refill)
            })
            .await
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Audit log

#[derive(serde::Deserialize, Default)]
pub(crate) struct AuditFilters {
    #[serde(default)]
    action: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    before: String,
}

fn audit_query(console: &Console, before: Option<uuid::Uuid>) -> AuditQuery {
    AuditQuery {
        tenant_id: console.tenant,
        order: AuditOrder::NewestBefore(before),
        limit: AUDIT_PAGE,
        actions: Vec::new(),
        action_prefixes: Vec::new(),
        actor_id: None,
        target_id: None,
        outcome: None,
        since: None,
        until: None,
    }
}

/// Events as a table; `with_details` adds each event's details (the audit page, not the overview).
fn audit_table(events: &[keyplane_core::ChainedEvent], with_details: bool) -> String {
    if events.is_empty() {
        return "<p class=\"muted\">No events.</p>".into();
    }
    let mut table = String::from(
        "<div class=\"table-wrap\"><table class=\"responsive\"><caption class=\"visually-hidden\">Audit events</caption><thead><tr>\
         <th scope=\"col\">When</th><th scope=\"col\">Action</th><th scope=\"col\">Outcome</th>\
         <th scope=\"col\">Actor</th><th scope=\"col\">Target</th>",
    );
    if with_details {
        table.push_str("<th scope=\"col\">Details</th>");
    }
    table.push_str("<th scope=\"col\">From</th></tr></thead><tbody>");
    for chained in events {
        let event = &chained.event;
        let actor = match (event.actor.actor_type, event.actor.id) {
            (ActorType::System, _) => "system".to_string(),
            (kind, Some(id)) => match &event.actor.subject {
                Some(sub) => format!("{} {sub}", kind.as_str()),
                None => format!("{} {id}", kind.as_str()),
            },
            (kind, None) => kind.as_str().to_string(),
        };
        let target = event.target.as_ref().map_or(String::new(), |t| {
            format!(
                "{} {}",
                esc(&t.target_type),
                t.name.as_deref().map_or_else(
                    || code(&t.id.to_string()),
                    |n| format!("<strong>{}</strong>", esc(n))
                )
            )
        });
        let details = if !with_details {
            String::new()
        } else {
            let text = event
                .details
                .iter()
                .map(|(key, value)| {
                    let value = match value {
                        DetailValue::Text(text) => text.clone(),
                        DetailValue::Count(count) => count.to_string(),
                        DetailValue::List(items) => items.join(", "),
                    };
                    format!("{}: {}", esc(key), esc(&value))
                })
                .collect::<Vec<_>>()
                .join("<br>");
            format!("<td data-label=\"Details\">{text}</td>")
        };
        let _ = write!(
            table,
            "<tr><td data-label=\"When\">{}</td><td data-label=\"Action\">{}</td><td data-label=\"Outcome\">{}</td>\
             <td data-label=\"Actor\">{}</td><td data-label=\"Target\">{}</td>{}\
             <td data-label=\"From\">{}</td></tr>",
            time(&event.occurred_at),
            code(&event.action),
            event.outcome.as_str(),
            esc(&actor),
            target,
            details,
            esc(event.context.client_ip.as_deref().unwrap_or("")),
        );
    }
    table.push_str("</tbody></table></div>");
    table
}

pub(crate) async fn audit(console: Console, Query(filters): Query<AuditFilters>) -> PageResult {
    let before = match filters.before.as_str() {
        "" => None,
        raw => Some(uuid::Uuid::parse_str(raw).map_err(|_| {
            ConsoleError::page(
                StatusCode::UNPROCESSABLE_ENTITY,
                "That page link is not valid.",
            )
        })?),
    };
    let mut query = audit_query(&console, before);
    let action = filters.action.trim();
    if !action.is_empty() {
        if action.ends_with('.') {
            query.action_prefixes.push(action.to_string());
        } else {
            query.actions.push(action.to_string());
        }
    }
    if !filters.outcome.is_empty() {
        query.outcome = Some(Outcome::parse(&filters.outcome).ok_or_else(|| {
            ConsoleError::page(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Choose an outcome from the list.",
            )
        })?);
    }
    let (events, next) = ops::list_audit_events(&console.app, &console.who, query).await?;
    let outcome_selected = |v: &str| {
        if filters.outcome == v {
            " selected"
        } else {
            ""
        }
    };
    let mut body = format!(
        "<form method=\"get\" action=\"/console/audit\" class=\"filters\" role=\"search\">\
         <label>Action <span class=\"hint\">exact, or a prefix ending in <code>.</code></span>\
         <input type=\"text\" name=\"action\" value=\"{action}\" list=\"actions\"></label>\
         <datalist id=\"actions\"><option value=\"api_token.\"><option value=\"service_account.\">\
         <option value=\"robot_account.\"><option value=\"authorization.\"><option value=\"registry.\">\
         <option value=\"credential.\"><option value=\"webhook.\"><option value=\"console.\">\
         <option value=\"access.denied\"></datalist>\
         <label>Outcome<select name=\"outcome\"><option value=\"\"{any}>any</option>\
         <option value=\"success\"{ok}>success</option><option value=\"denied\"{denied}>denied</option></select></label>\
         <button type=\"submit\" class=\"secondary\">Filter</button></form>{table}",
        action = esc(action),
        any = outcome_selected(""),
        ok = outcome_selected("success"),
        denied = outcome_selected("denied"),
        table = audit_table(&events, true),
    );
    body.push_str("<nav class=\"pager\" aria-label=\"Pages\">");
    if before.is_some() {
        let _ = write!(
            body,
            "<a href=\"/console/audit?action={}&amp;outcome={}\">Newest</a>",
            esc(&urlencode(action)),
            esc(&urlencode(&filters.outcome))
        );
    }
    if let Some(next) = next {
        let _ = write!(
            body,
            "<a href=\"/console/audit?action={}&amp;outcome={}&amp;before={next}\" rel=\"next\">Older events</a>",
            esc(&urlencode(action)),
            esc(&urlencode(&filters.outcome))
        );
    }
    body.push_str("</nav>");
    let frame = console.frame("/console/audit").await?;
    Ok(console.render(frame, "Audit log", &body).into_response())
}

fn urlencode(text: &str) -> String {
    serde_urlencoded::to_string([("", text)])
        .map(|pair| pair.trim_start_matches('=').to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyplane_core::Operator;

    /// Each creator in words, every name from a user or operator escaped.
    #[test]
    fn a_creator_is_said_in_words_with_what_it_names_escaped() {
        let token = uuid::Uuid::new_v4();
        let user = uuid::Uuid::new_v4();
        let names = KnownNames(HashMap::from([(
            ("api_token", token),
            "<ci>&deploy".to_string(),
        )]));
        let by = |actor_type, actor_id, via| CreatedBy {
            actor_type,
            actor_id,
            via,
            operator: None,
        };
        let operator = CreatedBy::operator(&Operator {
            os_user: "root<".into(),
            name: Some("al\"ice".into()),
        });
        let unnamed = CreatedBy::operator(&Operator {
            os_user: "root".into(),
            name: None,
        });
        for (created_by, said) in [
            (
                Some(by(ActorType::ApiToken, Some(token), Channel::Api)),
                "API token &lt;ci&gt;&amp;deploy via API".to_string(),
            ),
            (
                Some(by(ActorType::ServiceAccount, Some(token), Channel::Console)),
                format!("service account <code>{token}</code> via console"),
            ),
            (
                Some(by(ActorType::User, Some(user), Channel::Console)),
                format!("user <code>{user}</code> via console"),
            ),
            (
                Some(CreatedBy::system(Channel::Bootstrap)),
                "system via bootstrap".to_string(),
            ),
            (
                Some(operator),
                "system via admin (operator al&quot;ice, OS user root&lt;)".to_string(),
            ),
            (Some(unnamed), "system via admin (OS user root)".to_string()),
            (
                None,
                "<span class=\"muted\">unknown (created before this was recorded)</span>"
                    .to_string(),
            ),
        ] {
            assert_eq!(creator(created_by.as_ref(), &names), said);
        }
    }
}
