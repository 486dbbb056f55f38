//! What the CLI prints: a table for people, or the API's JSON for scripts (`json`: one
//! document, as the server sent it; `jsonl`: one line per item of a list). Times are RFC 3339
//! everywhere; tables add a relative hint.

use crate::error::printable;
use crate::profile::private_file;
use crate::Error;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use keyplane_api_types::aether::{
    ApiTokenView, CredentialPolicyView, LifetimeRuleView, RegistryEnabled, RegistryState,
    RegistryView, RobotAccountView,
};
use keyplane_api_types::audit::AuditEventView;
use keyplane_api_types::hybridbox::{AuthorizationView, ServiceAccountView};
use keyplane_api_types::leaks::RevokeAccepted;
use keyplane_api_types::verify::{IntrospectionResponse, WhoAmI};
use keyplane_api_types::webhooks::{WebhookDeliveryView, WebhookView};
use keyplane_core::Plaintext;
use serde::Serialize;
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Jsonl,
}

/// How one kind of record shows in a table: a row of a list, and the fields of a detail view.
pub trait Record {
    const COLUMNS: &'static [&'static str];
    /// Least widths of the leading columns of a stream (`audit tail`), which cannot be measured
    /// from rows not yet seen.
    const STREAM_WIDTHS: &'static [usize] = &[];
    fn cells(&self, now: DateTime<Utc>) -> Vec<String>;
    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)>;
}

/// Renders for one format, relative hints measured from `now`.
pub struct Output {
    pub format: Format,
    pub now: DateTime<Utc>,
}

/// What a create or rotate prints: `stdout` (the secret in it unless it went to a file) and a
/// one-line `note` for stderr.
pub struct Created {
    pub stdout: String,
    pub note: String,
}

impl Output {
    /// A list: `document` is the API's answer (a page or an array), `items` its records.
    pub fn list<R: Record + Serialize>(&self, document: &impl Serialize, items: &[R]) -> String {
        match self.format {
            Format::Table => table(
                R::COLUMNS,
                items.iter().map(|item| item.cells(self.now)).collect(),
            ),
            Format::Json => pretty(document),
            Format::Jsonl => items.iter().map(line).collect(),
        }
    }

    /// One record.
    pub fn one<R: Record + Serialize>(&self, item: &R) -> String {
        match self.format {
            Format::Table => details(item.fields(self.now)),
            Format::Json => pretty(item),
            Format::Jsonl => line(item),
        }
    }

    /// One record of a stream (`audit tail`), as soon as it arrives: a row whose cells are
    /// printable-escaped and two spaces apart (no alignment with rows not yet seen), or a JSON
    /// line in either JSON format (a stream has no single document).
    pub fn stream<R: Record + Serialize>(&self, item: &R) -> String {
        match self.format {
            Format::Table => stream_row(R::STREAM_WIDTHS, item.cells(self.now)),
            Format::Json | Format::Jsonl => line(item),
        }
    }

    /// The header line of a stream's table; nothing in the JSON formats.
    pub fn stream_header<R: Record>(&self) -> String {
        match self.format {
            Format::Table => stream_row(
                R::STREAM_WIDTHS,
                R::COLUMNS.iter().map(|c| c.to_string()).collect(),
            ),
            Format::Json | Format::Jsonl => String::new(),
        }
    }

    /// A create or rotate answer: `document` holds the secret at `secret_at` (a path of object
    /// keys). With `file`, the secret goes there and nowhere else.
    pub fn created<R: Record>(
        &self,
        document: &impl Serialize,
        record: &R,
        secret: &Plaintext,
        secret_at: &[&'static str],
        file: Option<SecretFile>,
    ) -> Result<Created, Error> {
        let what = secret_at.last().copied().unwrap_or("secret");
        let mut value = serde_json::to_value(document).expect("answers are JSON");
        let note = match file {
            Some(file) => {
                remove_at(&mut value, secret_at);
                let path = file.write(secret)?;
                format!(
                    "The {what} was written to {} (mode 0600); it is not shown again.",
                    path.display()
                )
            }
            None => format!(
                "Warning: the {what} is shown only this once; store it now (or use --secret-file)."
            ),
        };
        let stdout = match self.format {
            Format::Table => {
                let mut fields = record.fields(self.now);
                if value_at(&value, secret_at).is_some() {
                    fields.push((what, secret.expose_secret().to_string()));
                }
                details(fields)
            }
            Format::Json => pretty(&value),
            Format::Jsonl => line(&value),
        };
        Ok(Created { stdout, note })
    }
}

fn value_at<'v>(value: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(value, |at, key| at.get(key))
}

fn remove_at(value: &mut Value, path: &[&str]) {
    if let Some((last, parents)) = path.split_last() {
        let parent = parents.iter().try_fold(value, |at, key| at.get_mut(key));
        if let Some(Value::Object(object)) = parent {
            object.remove(*last);
        }
    }
}

fn pretty(value: &impl Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("answers are JSON");
    text.push('\n');
    text
}

fn line(value: &impl Serialize) -> String {
    let mut text = serde_json::to_string(value).expect("answers are JSON");
    text.push('\n');
    text
}

/// Columns padded to their widest cell, two spaces apart.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|cell| printable(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(&rows) {
        let mut text = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&" ".repeat(width - cell.chars().count() + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn stream_row(widths: &[usize], cells: Vec<String>) -> String {
    let count = cells.len();
    let mut text = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let cell = printable(cell);
        text.push_str(&cell);
        if i + 1 < count {
            let width = widths.get(i).copied().unwrap_or(0);
            text.push_str(&" ".repeat(width.saturating_sub(cell.chars().count()) + 2));
        }
    }
    text.push('\n');
    text
}

/// One record as `field  value` lines.
fn details(fields: Vec<(&'static str, String)>) -> String {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    fields
        .into_iter()
        .map(|(key, value)| format!("{key:width$}  {}\n", printable(&value)))
        .collect()
}

/// RFC 3339 to the second, with a hint such as `(3h ago)` or `(in 29d)`.
pub fn time(at: &DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (*at - now).num_seconds();
    let magnitude = seconds.unsigned_abs();
    let amount = match magnitude {
        0..=59 => return format!("{} (now)", rfc3339(at)),
        60..=3_599 => format!("{}m", magnitude / 60),
        3_600..=86_399 => format!("{}h", magnitude / 3_600),
        _ => format!("{}d", magnitude / 86_400),
    };
    match seconds < 0 {
        true => format!("{} ({amount} ago)", rfc3339(at)),
        false => format!("{} (in {amount})", rfc3339(at)),
    }
}

fn rfc3339(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn optional_time(at: &Option<DateTime<Utc>>, now: DateTime<Utc>, none: &str) -> String {
    at.as_ref().map_or(none.to_string(), |at| time(at, now))
}

fn or_dash(text: &Option<String>) -> String {
    text.clone().unwrap_or_else(|| "-".into())
}

fn list_or_dash(items: &[String]) -> String {
    match items.is_empty() {
        true => "-".into(),
        false => items.join(","),
    }
}

/// One word for a list: `suspended`, `rotating` (a previous secret still works) or `active`.
fn status(suspended_at: &Option<DateTime<Utc>>, previous_until: &Option<DateTime<Utc>>) -> String {
    match (suspended_at, previous_until) {
        (Some(_), _) => "suspended".into(),
        (None, Some(_)) => "rotating".into(),
        (None, None) => "active".into(),
    }
}

/// A credential's status cell: a canary says so (it is never suspended or rotating), and one past
/// its expiry is `expired` whatever else is true of it (lists include expired credentials, and
/// the console calls them so at the same instant).
fn credential_status(
    canary: bool,
    expires_at: &Option<DateTime<Utc>>,
    suspended_at: &Option<DateTime<Utc>>,
    previous_until: &Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> String {
    if canary {
        "canary".into()
    } else if expires_at.is_some_and(|at| at <= now) {
        "expired".into()
    } else {
        status(suspended_at, previous_until)
    }
}

/// The lifecycle fields every credential view carries, for a detail view.
fn lifecycle_fields(
    now: DateTime<Utc>,
    suspended_at: &Option<DateTime<Utc>>,
    previous_until: &Option<DateTime<Utc>>,
    previous_used: &Option<DateTime<Utc>>,
) -> [(&'static str, String); 3] {
    [
        ("suspended_at", optional_time(suspended_at, now, "-")),
        (
            "previous_secret_expires_at",
            optional_time(previous_until, now, "-"),
        ),
        (
            "previous_secret_last_used_at",
            optional_time(previous_used, now, "-"),
        ),
    ]
}

/// `--secret-file PATH`: created (0600, never over an existing file) before the request is
/// sent, so a bad path fails before a secret is minted; removed again if no secret arrives.
pub struct SecretFile {
    path: PathBuf,
    file: Option<File>,
}

impl SecretFile {
    pub fn create(path: &Path) -> Result<Self, Error> {
        let file = private_file(path).map_err(|e| {
            let reason = match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    "it exists (a secret file is never overwritten)".to_string()
                }
                _ => e.to_string(),
            };
            Error::Local(format!(
                "cannot create --secret-file {}: {reason}",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    fn write(mut self, secret: &Plaintext) -> Result<PathBuf, Error> {
        let mut file = self.file.take().expect("written once");
        let written = file
            .write_all(secret.expose_secret().as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all());
        match written {
            Ok(()) => Ok(std::mem::take(&mut self.path)),
            Err(e) => {
                // The secret is lost: say so, and leave no half-written file.
                self.file = Some(file);
                Err(secret_lost(
                    &format!("--secret-file {}", self.path.display()),
                    &e,
                ))
            }
        }
    }
}

/// A secret minted but not delivered to `place`: only another rotation gets one, so say so.
pub fn secret_lost(place: &str, error: &std::io::Error) -> Error {
    Error::Local(format!(
        "cannot write {place}: {error}; the credential was created or rotated, but its secret \
         could not be shown: rotate it again"
    ))
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Records

impl Record for ApiTokenView {
    const COLUMNS: &'static [&'static str] = &[
        "ID",
        "NAME",
        "PREFIX",
        "SCOPES",
        "STATUS",
        "EXPIRES",
        "LAST USED",
    ];

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.prefix.clone(),
            list_or_dash(&self.scopes),
            credential_status(
                self.canary,
                &self.expires_at,
                &self.suspended_at,
                &self.previous_secret_expires_at,
                now,
            ),
            optional_time(&self.expires_at, now, "never"),
            optional_time(&self.last_used_at, now, "never"),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("id", self.id.to_string()),
            ("org_id", self.org_id.to_string()),
            ("name", self.name.clone()),
            ("prefix", self.prefix.clone()),
            ("scopes", list_or_dash(&self.scopes)),
            ("expires_at", optional_time(&self.expires_at, now, "never")),
            (
                "last_used_at",
                optional_time(&self.last_used_at, now, "never"),
            ),
            ("created_at", time(&self.created_at, now)),
        ];
        fields.extend(lifecycle_fields(
            now,
            &self.suspended_at,
            &self.previous_secret_expires_at,
            &self.previous_secret_last_used_at,
        ));
        if self.canary {
            fields.push(("canary", "true".into()));
        }
        fields
    }
}

impl Record for ServiceAccountView {
    const COLUMNS: &'static [&'static str] = &[
        "ID",
        "NAME",
        "TOKEN",
        "STATUS",
        "EXPIRES",
        "LAST USED",
        "REVOKED",
    ];

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        let state = match self.revoked_at {
            Some(_) => "revoked".into(),
            None => credential_status(
                self.canary,
                &self.expires_at,
                &self.suspended_at,
                &self.previous_secret_expires_at,
                now,
            ),
        };
        vec![
            self.id.to_string(),
            self.name.clone(),
            token_hint(self),
            state,
            optional_time(&self.expires_at, now, "never"),
            optional_time(&self.last_used_at, now, "never"),
            optional_time(&self.revoked_at, now, "-"),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("id", self.id.to_string()),
            ("account_id", self.account_id.to_string()),
            ("name", self.name.clone()),
            ("token_hint", token_hint(self)),
            ("expires_at", optional_time(&self.expires_at, now, "never")),
            (
                "last_used_at",
                optional_time(&self.last_used_at, now, "never"),
            ),
            ("created_at", time(&self.created_at, now)),
            ("updated_at", time(&self.updated_at, now)),
            ("revoked_at", optional_time(&self.revoked_at, now, "-")),
        ];
        fields.extend(lifecycle_fields(
            now,
            &self.suspended_at,
            &self.previous_secret_expires_at,
            &self.previous_secret_last_used_at,
        ));
        if self.canary {
            fields.push(("canary", "true".into()));
        }
        fields
    }
}

/// What identifies a service account's token without being it: `hbx_sa_<public id>_…<last 4>`.
fn token_hint(account: &ServiceAccountView) -> String {
    format!(
        "{}_{}_…{}",
        account.token_prefix, account.token_public_id, account.token_last4
    )
}

impl Record for AuthorizationView {
    const COLUMNS: &'static [&'static str] = &[
        "ID",
        "KIND",
        "SUBJECT",
        "CAPABILITY",
        "RESOURCE",
        "CREATED",
        "REVOKED",
    ];

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.grant_kind.clone(),
            format!("{}:{}", self.subject_type, self.subject_id),
            or_dash(&self.capability_key),
            resource(self),
            optional_time(&self.created_at, now, "-"),
            optional_time(&self.revoked_at, now, "-"),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.to_string()),
            ("grant_kind", self.grant_kind.clone()),
            ("subject_type", self.subject_type.clone()),
            ("subject_id", self.subject_id.to_string()),
            ("capability_key", or_dash(&self.capability_key)),
            ("resource", resource(self)),
            ("created_at", optional_time(&self.created_at, now, "-")),
            ("revoked_at", optional_time(&self.revoked_at, now, "-")),
        ]
    }
}

fn resource(grant: &AuthorizationView) -> String {
    match (&grant.resource_type, &grant.resource_id) {
        (Some(kind), Some(id)) => format!("{kind}:{id}"),
        _ => "(whole account)".into(),
    }
}

impl Record for RobotAccountView {
    const COLUMNS: &'static [&'static str] = &[
        "ID",
        "NAME",
        "PERMISSIONS",
        "STATUS",
        "EXPIRES",
        "LAST USED",
    ];

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            list_or_dash(&self.permissions),
            credential_status(
                self.canary,
                &self.expires_at,
                &self.suspended_at,
                &self.previous_secret_expires_at,
                now,
            ),
            optional_time(&self.expires_at, now, "never"),
            optional_time(&self.last_used_at, now, "never"),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("id", self.id.to_string()),
            ("org_id", self.org_id.to_string()),
            ("name", self.name.clone()),
            ("permissions", list_or_dash(&self.permissions)),
            ("expires_at", optional_time(&self.expires_at, now, "never")),
            (
                "last_used_at",
                optional_time(&self.last_used_at, now, "never"),
            ),
            ("created_at", time(&self.created_at, now)),
            ("updated_at", time(&self.updated_at, now)),
        ];
        fields.extend(lifecycle_fields(
            now,
            &self.suspended_at,
            &self.previous_secret_expires_at,
            &self.previous_secret_last_used_at,
        ));
        if self.canary {
            fields.push(("canary", "true".into()));
        }
        fields
    }
}

impl Record for RegistryView {
    const COLUMNS: &'static [&'static str] = &["ID", "PROJECT", "ENDPOINT", "ENABLED"];

    fn cells(&self, _now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.harbor_project.clone(),
            self.endpoint.clone(),
            self.enabled.to_string(),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.to_string()),
            ("org_id", self.org_id.to_string()),
            ("enabled", self.enabled.to_string()),
            ("harbor_project", self.harbor_project.clone()),
            ("endpoint", self.endpoint.clone()),
            ("quota_gb", self.quota_gb.to_string()),
            ("created_at", time(&self.created_at, now)),
            ("updated_at", time(&self.updated_at, now)),
        ]
    }
}

impl Record for RegistryState {
    const COLUMNS: &'static [&'static str] = RegistryView::COLUMNS;

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        match self {
            RegistryState::Enabled(registry) => registry.cells(now),
            RegistryState::Disabled(_) => vec!["-".into(), "-".into(), "-".into(), "false".into()],
        }
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        match self {
            RegistryState::Enabled(registry) => registry.fields(now),
            RegistryState::Disabled(_) => vec![("enabled", "false".into())],
        }
    }
}

/// `registry enable`: the registry and its default robot's login name (its password is the
/// secret, added by [`Output::created`]).
impl Record for RegistryEnabled {
    const COLUMNS: &'static [&'static str] = RegistryView::COLUMNS;

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        self.registry.cells(now)
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let mut fields = self.registry.fields(now);
        fields.push(("username", self.credentials.username.clone()));
        fields
    }
}

/// A lifetime rule in words: `max 90d, default 30d, expiry required`.
fn rule_text(rule: &LifetimeRuleView) -> String {
    let mut parts = Vec::new();
    if let Some(days) = rule.max_lifetime_days {
        parts.push(format!("max {days}d"));
    }
    if let Some(days) = rule.default_lifetime_days {
        parts.push(format!("default {days}d"));
    }
    if rule.require_expiry {
        parts.push("expiry required".into());
    }
    match parts.is_empty() {
        true => "no rule".into(),
        false => parts.join(", "),
    }
}

impl Record for CredentialPolicyView {
    const COLUMNS: &'static [&'static str] = &["ORG", "ALL", "ON LEAK", "UPDATED"];

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.org_id.to_string(),
            rule_text(&self.all),
            self.on_leak.clone(),
            optional_time(&self.updated_at, now, "never"),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let own =
            |rule: &Option<LifetimeRuleView>| rule.as_ref().map_or("as all".to_string(), rule_text);
        let exceeding = &self.exceeding;
        vec![
            ("org_id", self.org_id.to_string()),
            ("all", rule_text(&self.all)),
            ("api_tokens", own(&self.api_tokens)),
            ("service_accounts", own(&self.service_accounts)),
            ("robot_accounts", own(&self.robot_accounts)),
            ("on_leak", self.on_leak.clone()),
            ("updated_at", optional_time(&self.updated_at, now, "never")),
            (
                "exceeding",
                format!(
                    "api_tokens={} service_accounts={} robot_accounts={}",
                    exceeding.api_tokens, exceeding.service_accounts, exceeding.robot_accounts
                ),
            ),
        ]
    }
}

impl Record for RevokeAccepted {
    const COLUMNS: &'static [&'static str] = &["RECEIVED", "WELL FORMED"];

    fn cells(&self, _now: DateTime<Utc>) -> Vec<String> {
        vec![self.received.to_string(), self.well_formed.to_string()]
    }

    fn fields(&self, _now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        vec![
            ("received", self.received.to_string()),
            ("well_formed", self.well_formed.to_string()),
        ]
    }
}

impl Record for AuditEventView {
    const COLUMNS: &'static [&'static str] =
        &["SEQ", "TIME", "ACTION", "OUTCOME", "ACTOR", "TARGET"];
    // seq, an RFC 3339 time with its hint, most actions, `success`/`denied`, a typed UUID.
    const STREAM_WIDTHS: &'static [usize] = &[5, 30, 24, 7, 47];

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.seq.to_string(),
            time(&self.occurred_at, now),
            self.action.clone(),
            self.outcome.clone(),
            actor_text(self),
            target_text(self),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.to_string()),
            ("seq", self.seq.to_string()),
            ("occurred_at", time(&self.occurred_at, now)),
            ("action", self.action.clone()),
            ("outcome", self.outcome.clone()),
            ("actor", actor_text(self)),
            ("target", target_text(self)),
            ("request_id", or_dash(&self.request_id)),
            ("client_ip", or_dash(&self.client_ip)),
            ("details", Value::Object(self.details.clone()).to_string()),
        ]
    }
}

/// `type:id`, or the type alone; an admin command's (`system`) with who ran it, from its details:
/// `system (operator alice, os user root)`.
fn actor_text(event: &AuditEventView) -> String {
    let detail = |key: &str| event.details.get(key).and_then(Value::as_str);
    match (event.actor.id, detail("os_user")) {
        (Some(id), _) => format!("{}:{id}", event.actor.actor_type),
        (None, Some(os_user)) => match detail("operator") {
            Some(operator) => format!(
                "{} (operator {operator}, os user {os_user})",
                event.actor.actor_type
            ),
            None => format!("{} (os user {os_user})", event.actor.actor_type),
        },
        (None, None) => event.actor.actor_type.clone(),
    }
}

fn target_text(event: &AuditEventView) -> String {
    match &event.target {
        Some(target) => match &target.name {
            Some(name) => format!("{}:{name}", target.target_type),
            None => format!("{}:{}", target.target_type, target.id),
        },
        None => "-".into(),
    }
}

impl Record for WhoAmI {
    const COLUMNS: &'static [&'static str] = &["KIND", "ID", "ORG", "NAME", "SCOPES"];

    fn cells(&self, _now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.kind.clone(),
            self.id.clone(),
            self.org_id.clone(),
            self.name.clone(),
            list_or_dash(&self.scopes),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let expires = self
            .expires_at
            .as_deref()
            .and_then(|raw| DateTime::parse_from_rfc3339(raw).ok())
            .map(|at| time(&at.with_timezone(&Utc), now));
        vec![
            ("kind", self.kind.clone()),
            ("id", self.id.clone()),
            ("org_id", self.org_id.clone()),
            ("name", self.name.clone()),
            ("scopes", list_or_dash(&self.scopes)),
            ("expires_at", expires.unwrap_or_else(|| "never".into())),
            ("secret", self.secret.clone()),
        ]
    }
}

impl Record for IntrospectionResponse {
    const COLUMNS: &'static [&'static str] = &["ACTIVE", "TYPE", "SUB", "USERNAME", "SCOPE"];

    fn cells(&self, _now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.active.to_string(),
            or_dash(&self.token_type),
            or_dash(&self.sub),
            or_dash(&self.username),
            or_dash(&self.scope),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let epoch = |seconds: &Option<i64>| {
            seconds
                .and_then(|s| Utc.timestamp_opt(s, 0).single())
                .map(|at| time(&at, now))
        };
        let mut fields = vec![("active", self.active.to_string())];
        if self.active {
            fields.extend([
                ("token_type", or_dash(&self.token_type)),
                ("sub", or_dash(&self.sub)),
                ("org_id", or_dash(&self.org_id)),
                ("username", or_dash(&self.username)),
                ("scope", or_dash(&self.scope)),
                ("exp", epoch(&self.exp).unwrap_or_else(|| "never".into())),
                ("iat", epoch(&self.iat).unwrap_or_else(|| "-".into())),
                ("secret", or_dash(&self.secret)),
            ]);
        }
        fields
    }
}

/// `webhooks create|rotate-secret` add the signing secret through [`Output::created`].
impl Record for WebhookView {
    const COLUMNS: &'static [&'static str] = &[
        "ID",
        "URL",
        "EVENTS",
        "ENABLED",
        "FAILING SINCE",
        "DESCRIPTION",
    ];

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.url.clone(),
            list_or_dash(&self.events),
            self.enabled.to_string(),
            optional_time(&self.failing_since, now, "-"),
            self.description.clone(),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.to_string()),
            ("org_id", self.org_id.to_string()),
            ("url", self.url.clone()),
            ("events", list_or_dash(&self.events)),
            ("description", self.description.clone()),
            ("enabled", self.enabled.to_string()),
            (
                "failing_since",
                optional_time(&self.failing_since, now, "-"),
            ),
            (
                "previous_secret_expires_at",
                optional_time(&self.previous_secret_expires_at, now, "-"),
            ),
            ("created_at", time(&self.created_at, now)),
            ("updated_at", time(&self.updated_at, now)),
        ]
    }
}

impl Record for WebhookDeliveryView {
    const COLUMNS: &'static [&'static str] = &[
        "ID",
        "TYPE",
        "STATUS",
        "ATTEMPTS",
        "LAST CODE",
        "CREATED",
        "NEXT ATTEMPT",
    ];

    fn cells(&self, now: DateTime<Utc>) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.event_type.clone(),
            self.status.clone(),
            self.attempts.to_string(),
            self.last_response_code
                .map_or("-".into(), |code| code.to_string()),
            time(&self.created_at, now),
            optional_time(&self.next_attempt_at, now, "-"),
        ]
    }

    fn fields(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.to_string()),
            ("webhook_id", self.webhook_id.to_string()),
            ("type", self.event_type.clone()),
            ("status", self.status.clone()),
            ("attempts", self.attempts.to_string()),
            ("created_at", time(&self.created_at, now)),
            (
                "next_attempt_at",
                optional_time(&self.next_attempt_at, now, "-"),
            ),
            (
                "last_attempt_at",
                optional_time(&self.last_attempt_at, now, "-"),
            ),
            (
                "last_response_code",
                self.last_response_code
                    .map_or("-".into(), |code| code.to_string()),
            ),
            (
                "last_latency_ms",
                self.last_latency_ms.map_or("-".into(), |ms| ms.to_string()),
            ),
            ("last_error", or_dash(&self.last_error)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn tables_align_and_escape() {
        let text = table(
            &["ID", "NAME"],
            vec![
                vec!["1".into(), "a\u{1b}b".into()],
                vec!["22".into(), "c".into()],
            ],
        );
        assert_eq!(text, "ID  NAME\n1   a\\u{1b}b\n22  c\n");
    }

    #[test]
    fn an_admin_commands_event_shows_who_ran_it() {
        let event = |actor: Value, details: Value| -> AuditEventView {
            serde_json::from_value(serde_json::json!({
                "id": "0190f0a4-0d4e-7a53-9d0c-0e8f1f5a7a11",
                "org_id": "0b9f1c1e-7d7a-4c0e-8d57-3f3b2b1d2e4f",
                "seq": 1,
                "occurred_at": "2030-01-01T00:00:00Z",
                "action": "authorization.created",
                "outcome": "success",
                "actor": actor,
                "target": null,
                "request_id": null,
                "client_ip": null,
                "user_agent": null,
                "details": details,
                "chain_hash": "00",
            }))
            .unwrap()
        };
        let system = serde_json::json!({"type": "system", "id": null});
        let actor = |event: &AuditEventView| {
            let now = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
            event.cells(now)[4].clone()
        };
        let named =
            serde_json::json!({"os_user": "root", "operator": "alice", "via": "admin grant"});
        assert_eq!(
            actor(&event(system.clone(), named)),
            "system (operator alice, os user root)"
        );
        let unnamed = serde_json::json!({"os_user": "root"});
        assert_eq!(
            actor(&event(system.clone(), unnamed)),
            "system (os user root)"
        );
        // Events from before operators were recorded, and the server's own.
        assert_eq!(actor(&event(system, serde_json::json!({}))), "system");
        let token =
            serde_json::json!({"type": "api_token", "id": "6c3ac0a4-0d4e-4a53-9d0c-0e8f1f5a7a11"});
        assert_eq!(
            actor(&event(token, serde_json::json!({}))),
            "api_token:6c3ac0a4-0d4e-4a53-9d0c-0e8f1f5a7a11"
        );
    }

    #[test]
    fn times_are_rfc3339_with_a_hint() {
        let now = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            time(&(now - Duration::hours(3)), now),
            "2029-12-31T21:00:00Z (3h ago)"
        );
        assert_eq!(
            time(&(now + Duration::days(30)), now),
            "2030-01-31T00:00:00Z (in 30d)"
        );
    }

    #[test]
    fn lists_call_a_credential_past_its_expiry_expired() {
        let now = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
        let token = |expires_at: &str| -> ApiTokenView {
            serde_json::from_value(serde_json::json!({
                "id": "6c3ac0a4-0d4e-4a53-9d0c-0e8f1f5a7a11",
                "org_id": "0b9f1c1e-7d7a-4c0e-8d57-3f3b2b1d2e4f",
                "name": "ci",
                "prefix": "aet_ab12",
                "scopes": ["deploy"],
                "last_used_at": null,
                "expires_at": expires_at,
                "created_at": "2029-01-01T00:00:00Z",
                "previous_secret_expires_at": null,
                "previous_secret_last_used_at": null,
                "suspended_at": null,
                "canary": false,
            }))
            .unwrap()
        };
        let status = ApiTokenView::COLUMNS
            .iter()
            .position(|c| *c == "STATUS")
            .unwrap();
        assert_eq!(token("2029-12-31T23:00:00Z").cells(now)[status], "expired");
        // The boundary counts as expired, as it does when the token is verified.
        assert_eq!(token("2030-01-01T00:00:00Z").cells(now)[status], "expired");
        assert_eq!(token("2030-01-02T00:00:00Z").cells(now)[status], "active");
        // Expiry wins over a suspension or a rotation in progress; a canary stays a canary.
        let past = Some(now - Duration::hours(1));
        let future = Some(now + Duration::hours(1));
        assert_eq!(
            credential_status(false, &past, &past, &future, now),
            "expired"
        );
        assert_eq!(
            credential_status(false, &future, &past, &None, now),
            "suspended"
        );
        assert_eq!(credential_status(true, &past, &None, &None, now), "canary");
    }
}
