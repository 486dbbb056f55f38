//! `keyplane admin import-credentials`: credentials brought over from another system by the hash
//! of their secrets (a home-grown API-key table, another keyplane), so that the keys customers
//! hold keep working while they move to keyplane's own at their pace.
//!
//! The whole file is read and checked first, against itself and against the store (ids, secret
//! hashes, live names): a bad file writes nothing. Then it is written in transactions of
//! [`BATCH`] credentials, each with its own `*.imported` event; an interrupted run leaves whole
//! batches, and running the same file again imports only what is missing (an id already there
//! with the same hash, or rotated or revoked since, is "present").
//!
//! The file holds hashes, not secrets, but a hash is what a lookup matches: no line, and no field
//! of one that could be a hash, is ever printed or logged; errors name the line and the field.

use crate::StoreArgs;
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use keyplane_core::error::FieldPath;
use keyplane_core::{
    validate, CreatedBy, Credential, CredentialId, CredentialKind, Operator, RobotPermission,
    ScopeSet, TenantId, TokenDisplay, TokenHash,
};
use keyplane_server::ops;
use keyplane_store::{ListCredentials, Store};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::PathBuf;

/// Credentials written per transaction: large enough that a million take a hundred commits,
/// small enough that one transaction stays short on a store serving traffic.
const BATCH: usize = 10_000;
/// Rows read per store query while learning what the organization already holds.
const PAGE: u32 = 1_000;
/// Errors printed before the rest are only counted.
const MAX_REPORTED: usize = 20;
/// The longest line read: a credential's fields fit in far less, and a line past it is not one.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// The longest `source_id`, `display_prefix` and `last4`.
const MAX_SOURCE_ID_CHARS: usize = 256;
const MAX_DISPLAY_PREFIX_CHARS: usize = 32;
const MAX_LAST4_CHARS: usize = 4;
/// What the audit trail records as the way the credentials came in.
const VIA: &str = "admin import-credentials";

/// Ids derived from `source_id` are UUIDv5s in this namespace, over `org/kind/source_id`: the
/// same line imports to the same id every time, and two organizations never collide.
const ID_NAMESPACE: uuid::Uuid = uuid::uuid!("6d1c8a5e-3b9f-5e0a-9c41-2f7b8e6d4a10");

#[derive(Args)]
pub struct ImportArgs {
    /// The organization (tenant) id to import into.
    #[arg(long, value_name = "ORG_ID", value_parser = crate::admin::parse_tenant)]
    org: TenantId,
    /// What every line of the file is.
    #[arg(long, value_enum)]
    kind: ImportKind,
    /// Check the file against the store and print the counts; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the counts as one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// A name already live in the organization (or earlier in the file): `error` refuses the
    /// file naming the line; `suffix` imports it as `NAME-2` (`-3`, ...).
    #[arg(long, value_enum, default_value_t = OnDuplicateName::Error)]
    on_duplicate_name: OnDuplicateName,
    /// JSON lines, one credential each (`-`: standard input). See README, "Migrating to keyplane".
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum ImportKind {
    ApiToken,
    ServiceAccount,
    Robot,
}

impl ImportKind {
    fn kind(self) -> CredentialKind {
        match self {
            ImportKind::ApiToken => CredentialKind::ApiToken,
            ImportKind::ServiceAccount => CredentialKind::ServiceAccount,
            ImportKind::Robot => CredentialKind::RobotAccount,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnDuplicateName {
    Error,
    Suffix,
}

/// One line, checked on its own.
struct Line {
    number: usize,
    id: CredentialId,
    /// Given as `id`, not derived from `source_id` (derived ids name the org and kind).
    explicit_id: bool,
    name: String,
    hash: TokenHash,
    display: TokenDisplay,
    scopes: ScopeSet,
    permissions: Vec<RobotPermission>,
    expires_at: Option<DateTime<Utc>>,
    created_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

/// Errors by line, the first [`MAX_REPORTED`] kept.
#[derive(Default)]
struct Problems {
    kept: Vec<String>,
    total: usize,
}

impl Problems {
    fn add(&mut self, line: usize, field: &str, message: impl std::fmt::Display) {
        self.total += 1;
        if self.kept.len() < MAX_REPORTED {
            self.kept.push(if field.is_empty() {
                format!("line {line}: {message}")
            } else {
                format!("line {line}: {field}: {message}")
            });
        }
    }

    fn into_result(self) -> anyhow::Result<()> {
        if self.total == 0 {
            return Ok(());
        }
        let mut text = self.kept.join("\n");
        if self.total > self.kept.len() {
            text.push_str(&format!("\n... and {} more", self.total - self.kept.len()));
        }
        anyhow::bail!("{text}\nnothing was imported: fix the file and run it again");
    }
}

/// What an import found and did.
#[derive(Default)]
struct Counts {
    new: u64,
    present: u64,
    /// Of `present`: rotated since the import (the file's key is no longer its secret).
    rotated: u64,
    /// Of `present`: revoked, and not imported again.
    revoked: u64,
    renamed: u64,
}

pub async fn run(args: ImportArgs, operator: &Operator) -> anyhow::Result<()> {
    let kind = args.kind.kind();
    let now = ops::now();
    let mut problems = Problems::default();
    let lines = read_lines(&args, kind, now, &mut problems)?;
    problems.into_result()?;

    // A dry run only reads, and so must not migrate a shared store either.
    let store = if args.dry_run {
        args.store.open_read_only().await?
    } else {
        crate::admin::open_to_write(&args.store).await?
    };
    let Some(tenant) = store.get_tenant(args.org).await? else {
        anyhow::bail!("no organization with id {}", args.org);
    };
    if kind == CredentialKind::RobotAccount && store.get_registry(args.org).await?.is_none() {
        anyhow::bail!(
            "the registry of organization {} is not enabled: enable it first (POST \
             /api/v1/organizations/{}/registry), then import its robots",
            args.org,
            args.org
        );
    }
    let (credentials, counts) = plan(store.as_ref(), &args, kind, lines, now, operator).await?;
    if !args.dry_run {
        write(store.as_ref(), args.org, kind, &credentials, operator).await?;
    }
    report(&args, &tenant.name, kind, &counts);
    Ok(())
}

/// Reads and checks every line, recording what is wrong with each in `problems`.
fn read_lines(
    args: &ImportArgs,
    kind: CredentialKind,
    now: DateTime<Utc>,
    problems: &mut Problems,
) -> anyhow::Result<Vec<Line>> {
    let reader: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut lines = Vec::new();
    let mut ids: HashMap<CredentialId, usize> = HashMap::new();
    let mut hashes: HashMap<[u8; 32], usize> = HashMap::new();
    let mut buffer = Vec::new();
    let mut reader = reader;
    let mut number = 0;
    loop {
        buffer.clear();
        let read = std::io::Read::take(&mut reader, MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buffer)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
        if read == 0 {
            break;
        }
        number += 1;
        if buffer.len() > MAX_LINE_BYTES && !buffer.ends_with(b"\n") {
            problems.add(
                number,
                "",
                format_args!("longer than {MAX_LINE_BYTES} bytes"),
            );
            // The rest of the overlong line is not a line of its own.
            let mut rest = Vec::new();
            reader
                .read_until(b'\n', &mut rest)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
            continue;
        }
        let Ok(text) = std::str::from_utf8(&buffer) else {
            problems.add(number, "", "not UTF-8");
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        let Some(line) = parse_line(number, text, args.org, kind, now, problems) else {
            continue;
        };
        if let Some(first) = ids.insert(line.id, number) {
            problems.add(
                number,
                "id",
                format_args!("the same credential as line {first}"),
            );
            continue;
        }
        if let Some(first) = hashes.insert(*line.hash.as_bytes(), number) {
            problems.add(
                number,
                "sha256",
                format_args!("the same secret as line {first}"),
            );
            continue;
        }
        lines.push(line);
    }
    if number == 0 {
        anyhow::bail!("{} holds no line", args.file.display());
    }
    Ok(lines)
}

/// One line's fields, checked with the rules the API applies to the same fields.
fn parse_line(
    number: usize,
    text: &str,
    org: TenantId,
    kind: CredentialKind,
    now: DateTime<Utc>,
    problems: &mut Problems,
) -> Option<Line> {
    // Parsed as a value first: serde's messages for a typed field would quote the value, which
    // may be a hash.
    let object = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => {
            problems.add(number, "", "must be a JSON object");
            return None;
        }
        Err(e) => {
            problems.add(number, "", format_args!("not JSON (column {})", e.column()));
            return None;
        }
    };
    let before = problems.total;
    let rights_field = match kind {
        CredentialKind::ApiToken => Some("scopes"),
        CredentialKind::RobotAccount => Some("permissions"),
        CredentialKind::ServiceAccount => None,
    };
    for key in object.keys() {
        let known = matches!(
            key.as_str(),
            "id" | "source_id"
                | "name"
                | "sha256"
                | "display_prefix"
                | "last4"
                | "expires_at"
                | "created_at"
                | "last_used_at"
        ) || Some(key.as_str()) == rights_field;
        if known {
            continue;
        }
        let message = match key.as_str() {
            "scopes" | "permissions" if kind == CredentialKind::ServiceAccount => {
                "a service account holds no scopes: it acts through grants (`keyplane admin \
                 grant`, or the authorizations API) once imported"
                    .to_string()
            }
            "scopes" => "robots take `permissions`".to_string(),
            "permissions" => "API tokens take `scopes`".to_string(),
            _ => "unknown field".to_string(),
        };
        problems.add(number, &shown_key(key), message);
    }
    let mut field = |key: &str| -> Option<String> {
        match object.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            Some(_) => {
                problems.add(number, key, "must be a string");
                None
            }
        }
    };
    let id_text = field("id");
    let explicit_id = id_text.is_some();
    let source_id = field("source_id");
    let name = field("name");
    let sha256 = field("sha256");
    let display_prefix = field("display_prefix");
    let last4 = field("last4");
    let expires_at = field("expires_at");
    let created_at = field("created_at");
    let last_used_at = field("last_used_at");

    let id = match (id_text, source_id) {
        (Some(text), _) => match uuid::Uuid::parse_str(&text) {
            Ok(uuid) => Some(CredentialId::from_uuid(uuid)),
            Err(_) => {
                problems.add(number, "id", "must be a UUID");
                None
            }
        },
        (None, Some(source)) => match checked_text(&source, MAX_SOURCE_ID_CHARS) {
            Ok(()) => Some(CredentialId::from_uuid(uuid::Uuid::new_v5(
                &ID_NAMESPACE,
                format!("{org}/{}/{source}", kind.as_str()).as_bytes(),
            ))),
            Err(message) => {
                problems.add(number, "source_id", message);
                None
            }
        },
        (None, None) => {
            problems.add(
                number,
                "source_id",
                "is required without `id`: the credential's id in the system it comes from",
            );
            None
        }
    };
    let name = match name {
        None => {
            problems.add(number, "name", "is required");
            None
        }
        Some(raw) => {
            let checked = match kind {
                CredentialKind::RobotAccount => {
                    keyplane_core::registry::robot_name(FieldPath::body("name"), &raw)
                }
                _ => validate::name(FieldPath::body("name"), &raw),
            };
            checked
                .map_err(|e| problems.add(number, "name", e.message))
                .ok()
        }
    };
    let hash = match sha256 {
        None => {
            problems.add(
                number,
                "sha256",
                "is required: the hex SHA-256 of the whole key as clients present it",
            );
            None
        }
        Some(text) => {
            let hash = (text.len() == 64)
                .then(|| TokenHash::from_hex(&text))
                .flatten();
            if hash.is_none() {
                problems.add(number, "sha256", "must be 64 hex digits");
            }
            hash
        }
    };
    let mut display_part = |key: &str, value: Option<String>, max: usize| match value {
        None => String::new(),
        Some(value) => match checked_text(&value, max) {
            Ok(()) if value.chars().all(|c| c.is_ascii_graphic()) => value,
            Ok(()) => {
                problems.add(
                    number,
                    key,
                    "must be printable ASCII without spaces (what lists show)",
                );
                String::new()
            }
            Err(message) => {
                problems.add(number, key, message);
                String::new()
            }
        },
    };
    let display = TokenDisplay {
        prefix: display_part("display_prefix", display_prefix, MAX_DISPLAY_PREFIX_CHARS),
        public_id: None,
        last4: display_part("last4", last4, MAX_LAST4_CHARS),
    };
    let (scopes, permissions) = rights(number, &object, kind, problems);
    let expires_at = expires_at.and_then(|raw| {
        validate::expires_at(FieldPath::body("expires_at"), &raw, now)
            .map_err(|e| problems.add(number, "expires_at", e.message))
            .ok()
    });
    let mut past = |key: &str, raw: Option<String>| {
        let raw = raw?;
        match DateTime::parse_from_rfc3339(&raw) {
            Ok(at) if at.with_timezone(&Utc) <= now => {
                Some(validate::truncate_to_micros(at.with_timezone(&Utc)))
            }
            Ok(_) => {
                problems.add(number, key, "must not be in the future");
                None
            }
            Err(_) => {
                problems.add(
                    number,
                    key,
                    "must be an RFC 3339 date-time, e.g. 2024-01-01T00:00:00Z",
                );
                None
            }
        }
    };
    let created_at = past("created_at", created_at);
    let last_used_at = past("last_used_at", last_used_at);
    if let (Some(created), Some(used)) = (created_at, last_used_at) {
        if used < created {
            problems.add(number, "last_used_at", "must not be before created_at");
        }
    }
    if problems.total != before {
        return None;
    }
    Some(Line {
        number,
        id: id?,
        explicit_id,
        name: name?,
        hash: hash?,
        display,
        scopes: scopes?,
        permissions: permissions?,
        expires_at,
        created_at,
        last_used_at,
    })
}

/// A field name as an error shows it: a name that is not one of ours is shown only if it is
/// short and plain, so that a misplaced value (a hash as a key) is not printed.
fn shown_key(key: &str) -> String {
    if key.len() <= 32
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
        && !key.chars().all(|c| c.is_ascii_hexdigit())
    {
        key.to_string()
    } else {
        "(a field)".to_string()
    }
}

/// A short free text: not empty, at most `max` characters, nothing that could disguise it.
fn checked_text(text: &str, max: usize) -> Result<(), String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.chars().count() > max {
        return Err(format!("must have at most {max} characters"));
    }
    if text.chars().any(validate::is_disguising) {
        return Err(
            "must not contain control, format (such as bidi override or zero-width) or line \
             separator characters"
                .into(),
        );
    }
    Ok(())
}

/// The kind's rights: an API token's `scopes` (none when absent, as the API), a robot's
/// `permissions` (`pull` when absent, as the API), a service account's none (it acts through
/// grants).
fn rights(
    number: usize,
    object: &Map<String, Value>,
    kind: CredentialKind,
    problems: &mut Problems,
) -> (Option<ScopeSet>, Option<Vec<RobotPermission>>) {
    let list = |key: &str, problems: &mut Problems| -> Option<Option<Vec<String>>> {
        match object.get(key) {
            None | Some(Value::Null) => Some(None),
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => Some(Some(
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
            )),
            Some(_) => {
                problems.add(number, key, "must be a list of strings");
                None
            }
        }
    };
    let report = |problems: &mut Problems, errors: Vec<keyplane_core::FieldError>| {
        for error in errors {
            problems.add(number, &error.path.to_string(), error.message);
        }
    };
    match kind {
        CredentialKind::ApiToken => {
            let scopes = match list("scopes", problems) {
                None => None,
                Some(None) => Some(ScopeSet::empty()),
                Some(Some(raw)) => ScopeSet::parse_list(&FieldPath::body("scopes"), &raw)
                    .map_err(|errors| report(problems, errors))
                    .ok(),
            };
            (scopes, Some(Vec::new()))
        }
        CredentialKind::RobotAccount => {
            let permissions = match list("permissions", problems) {
                None => None,
                Some(None) => Some(vec![RobotPermission {
                    action: keyplane_core::registry::RegistryAction::Pull,
                    repository: None,
                }]),
                Some(Some(raw)) => {
                    RobotPermission::parse_list(&FieldPath::body("permissions"), &raw)
                        .map_err(|errors| report(problems, errors))
                        .ok()
                }
            };
            (Some(ScopeSet::empty()), permissions)
        }
        CredentialKind::ServiceAccount => (Some(ScopeSet::empty()), Some(Vec::new())),
    }
}

/// What an import finds of a credential already in the organization under a line's id.
struct Known {
    secret_hash: TokenHash,
    previous_hash: Option<TokenHash>,
    rotated: bool,
    revoked: bool,
}

impl Known {
    fn of(credential: &Credential) -> Self {
        Known {
            secret_hash: credential.secret_hash,
            previous_hash: credential.previous_secret.as_ref().map(|p| p.hash),
            rotated: credential.rotated_at.is_some(),
            revoked: credential.is_revoked(),
        }
    }
}

/// What the organization holds of `kind`: each credential by id, and the live names.
async fn existing(
    store: &dyn Store,
    org: TenantId,
    kind: CredentialKind,
) -> anyhow::Result<(HashMap<CredentialId, Known>, HashSet<String>)> {
    let mut known = HashMap::new();
    let mut live_names = HashSet::new();
    let mut after = None;
    loop {
        let page = store
            .list_credentials(&ListCredentials {
                tenant_id: org,
                kind,
                after,
                limit: Some(PAGE),
                include_revoked: true,
                expiring: None,
                include_canaries: true,
            })
            .await?;
        for credential in &page {
            known.insert(credential.id, Known::of(credential));
            if !credential.is_revoked() {
                live_names.insert(credential.name.clone());
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => after = Some(last.id),
            _ => return Ok((known, live_names)),
        }
    }
}

/// The credentials elsewhere in the store (another organization or kind) that hold the id or the
/// secret of a line the organization does not hold yet: looked up many per query, as a line at
/// a time a million lines took a million round trips.
struct Holders {
    /// Of the lines with an explicit id (a derived one names the organization and kind).
    by_id: HashMap<CredentialId, Credential>,
    /// By current and by previous secret.
    by_hash: HashMap<[u8; 32], Credential>,
}

impl Holders {
    async fn of_new(
        store: &dyn Store,
        lines: &[Line],
        known: &HashMap<CredentialId, Known>,
    ) -> anyhow::Result<Self> {
        let new = || lines.iter().filter(|line| !known.contains_key(&line.id));
        let ids: Vec<CredentialId> = new()
            .filter(|line| line.explicit_id)
            .map(|line| line.id)
            .collect();
        let hashes: Vec<TokenHash> = new().map(|line| line.hash).collect();
        let by_id = store
            .find_credentials_by_ids(&ids)
            .await?
            .into_iter()
            .map(|holder| (holder.id, holder))
            .collect();
        let mut by_hash = HashMap::new();
        for holder in store.find_credentials_by_hashes(&hashes).await? {
            if let Some(previous) = &holder.previous_secret {
                by_hash.insert(*previous.hash.as_bytes(), holder.clone());
            }
            by_hash.insert(*holder.secret_hash.as_bytes(), holder);
        }
        Ok(Holders { by_id, by_hash })
    }
}

/// The credentials to write, checked against what the store holds; every conflict is an error
/// naming its line, and then nothing is written.
async fn plan(
    store: &dyn Store,
    args: &ImportArgs,
    kind: CredentialKind,
    lines: Vec<Line>,
    now: DateTime<Utc>,
    operator: &Operator,
) -> anyhow::Result<(Vec<Credential>, Counts)> {
    let policy = ops::credential_policy(store, args.org)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the organization's credential policy: {e}"))?;
    let (known, mut names) = existing(store, args.org, kind).await?;
    let holders = Holders::of_new(store, &lines, &known).await?;
    let mut problems = Problems::default();
    let mut counts = Counts::default();
    let mut credentials = Vec::new();
    for line in lines {
        match known.get(&line.id) {
            // Rotated since the import (the README's cutover): the file's key is now the
            // previous secret, or already retired; either way the credential is the line's.
            Some(found)
                if found.secret_hash.matches(&line.hash)
                    || found.rotated
                    || found.previous_hash.is_some_and(|p| p.matches(&line.hash)) =>
            {
                counts.present += 1;
                // Revoked is what matters most: it is not brought back by importing it again.
                if found.revoked {
                    counts.revoked += 1;
                } else if !found.secret_hash.matches(&line.hash) {
                    counts.rotated += 1;
                }
                continue;
            }
            Some(_) => {
                problems.add(
                    line.number,
                    "sha256",
                    "differs from the secret this credential was imported with (same id): \
                     another key under the same id, or a changed source id",
                );
                continue;
            }
            None => {}
        }
        // Ids are unique across organizations and kinds: one taken elsewhere would fail the
        // write after earlier batches committed.
        if line.explicit_id {
            if let Some(holder) = holders.by_id.get(&line.id) {
                problems.add(
                    line.number,
                    "id",
                    format_args!(
                        "is taken by another credential ({} in organization {})",
                        holder.kind.as_str(),
                        holder.tenant_id
                    ),
                );
                continue;
            }
        }
        if let Some(holder) = holders.by_hash.get(line.hash.as_bytes()) {
            problems.add(
                line.number,
                "sha256",
                format_args!(
                    "already the secret of another credential ({} {} in organization {})",
                    holder.kind.as_str(),
                    holder.id,
                    holder.tenant_id
                ),
            );
            continue;
        }
        let expires_at =
            match policy.expiry_for(kind, line.expires_at, now, FieldPath::body("expires_at")) {
                Ok(at) => at,
                Err(e) => {
                    problems.add(line.number, "expires_at", e.message);
                    continue;
                }
            };
        let name = if names.contains(&line.name) {
            match args.on_duplicate_name {
                OnDuplicateName::Error => {
                    problems.add(
                        line.number,
                        "name",
                        format_args!(
                            "a live {} with this name already exists in the organization or \
                             earlier in the file (--on-duplicate-name suffix imports it as \
                             NAME-2)",
                            kind.as_str().replace('_', " ")
                        ),
                    );
                    continue;
                }
                OnDuplicateName::Suffix => match suffixed(&line.name, kind, &names) {
                    Some(name) => {
                        counts.renamed += 1;
                        name
                    }
                    None => {
                        problems.add(line.number, "name", "taken, and too long to take a suffix");
                        continue;
                    }
                },
            }
        } else {
            line.name
        };
        names.insert(name.clone());
        let created_at = line.created_at.unwrap_or(now);
        credentials.push(Credential {
            id: line.id,
            tenant_id: args.org,
            kind,
            name,
            secret_hash: line.hash,
            display: line.display,
            scopes: line.scopes,
            permissions: line.permissions,
            expires_at,
            created_at,
            updated_at: now.max(created_at),
            last_used_at: line.last_used_at,
            revoked_at: None,
            created_by_user_id: None,
            created_by: Some(CreatedBy::operator(operator)),
            revoked_by_user_id: None,
            suspended_at: None,
            rotated_at: None,
            previous_secret: None,
            expiry_notice_days: None,
            canary: false,
        });
        counts.new += 1;
    }
    problems.into_result()?;
    Ok((credentials, counts))
}

/// `name-2`, `name-3`, ...: the first free one the kind's name rule accepts.
fn suffixed(name: &str, kind: CredentialKind, taken: &HashSet<String>) -> Option<String> {
    (2..).take(1_000).find_map(|n| {
        let candidate = format!("{name}-{n}");
        let valid = match kind {
            CredentialKind::RobotAccount => {
                keyplane_core::registry::robot_name(FieldPath::body("name"), &candidate).is_ok()
            }
            _ => validate::name(FieldPath::body("name"), &candidate).is_ok(),
        };
        if !valid {
            // Longer suffixes will not fit either.
            return Some(None);
        }
        (!taken.contains(&candidate)).then_some(Some(candidate))
    })?
}

/// Writes `credentials` in transactions of [`BATCH`], each with its `*.imported` event.
async fn write(
    store: &dyn Store,
    org: TenantId,
    kind: CredentialKind,
    credentials: &[Credential],
    operator: &Operator,
) -> anyhow::Result<()> {
    let mut written = 0;
    for batch in credentials.chunks(BATCH) {
        let event = ops::import_event(org, kind, batch.len() as u64, VIA, Some(operator));
        if let Err(e) = store
            .import_credentials(batch, std::slice::from_ref(&event))
            .await
        {
            anyhow::bail!(
                "cannot import: {e}. {written} of {} new credentials were imported before it \
                 (whole batches); run the same file again: it goes on with what is missing",
                credentials.len()
            );
        }
        written += batch.len();
    }
    Ok(())
}

fn report(args: &ImportArgs, org_name: &str, kind: CredentialKind, counts: &Counts) {
    if args.json {
        let mut answer = serde_json::json!({
            "org_id": args.org.to_string(),
            "kind": kind.as_str(),
            "dry_run": args.dry_run,
            "present": counts.present,
            "present_rotated": counts.rotated,
            "present_revoked": counts.revoked,
            "renamed": counts.renamed,
        });
        // Named for what it is, so that no reader takes a dry run's count for an import.
        answer[if args.dry_run { "would_import" } else { "new" }] = counts.new.into();
        println!("{answer}");
    } else {
        let verb = if args.dry_run {
            "would import (dry run: nothing written)"
        } else {
            "imported"
        };
        let renamed = if counts.renamed > 0 {
            format!(" ({} renamed with a suffix)", counts.renamed)
        } else {
            String::new()
        };
        let present = match (counts.rotated, counts.revoked) {
            (0, 0) => String::new(),
            (rotated, 0) => format!(" ({rotated} rotated since)"),
            (0, revoked) => format!(" ({revoked} revoked, not imported again)"),
            (rotated, revoked) => {
                format!(" ({rotated} rotated since, {revoked} revoked, not imported again)")
            }
        };
        println!(
            "organization {} ({org_name}), {}: {verb} {} new{renamed}, {} present{present}",
            args.org,
            kind.as_str(),
            counts.new,
            counts.present
        );
    }
}
