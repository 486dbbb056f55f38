//! The client commands: `keyplane tokens|service-accounts|grants|registry|robots|policy|webhooks|
//! audit|whoami|introspect|revoke-leaked|login|logout` against a running keyplane, local or remote. Each is a thin call of
//! one route through `keyplane_client::Client`; this module only reads the command line and the
//! environment, and prints.

use crate::follow::{went_back_warning, Printed};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use keyplane_api_types::aether::{
    ApiTokenPage, CreateApiTokenRequest, CreateRobotAccountRequest, PutCredentialPolicyRequest,
    UpdateRobotAccountRequest,
};
use keyplane_api_types::audit::AuditEventView;
use keyplane_api_types::hybridbox::{CreateAuthorizationRequest, CreateServiceAccountRequest};
use keyplane_api_types::leaks::{RevokeAccepted, RevokeCredentialsRequest, MAX_CREDENTIALS};
use keyplane_api_types::webhooks::{Url, WebhookRequest, WebhookView};
use keyplane_api_types::wire::RotateRequest;
use keyplane_client::output::{Format, Output, Record, SecretFile};
use keyplane_client::profile::{Profile, Profiles};
use keyplane_client::{
    ApiFailure, AuditFilter, Client, Error, GrantFilter, Page, Plaintext, Transition, DEFAULT_URL,
};
use keyplane_core::audit_position::EventPosition;
use keyplane_core::{
    ActionPattern, FieldError, FieldPath, GrantKind, LeakAction, LifetimeRule, RobotPermission,
    Scope, ScopeSet, SubjectType,
};
use serde::Serialize;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// The exit statuses, shown in every client command's help.
macro_rules! exit_codes {
    () => {
        "Exit status: 0 ok, 1 the API refused (its message and code on stderr), 2 usage error, \
         3 cannot authenticate (no credential, or 401), 4 cannot reach the server, \
         5 the token is not active (introspect)."
    };
}
pub(crate) use exit_codes;

/// `after_help` for a command: its example, then the exit statuses.
macro_rules! example {
    ($($line:literal),+ $(,)?) => {
        concat!("Example:\n", $("  ", $line, "\n",)+ "\n", exit_codes!())
    };
}
pub(crate) use example;

/// Where to connect, with which credential, and how to print: every client command takes these.
#[derive(Args, Clone)]
pub struct Target {
    /// The keyplane server [default: the profile's URL (never with KEYPLANE_TOKEN, which needs
    /// its own), else http://127.0.0.1:8080].
    #[arg(long, env = "KEYPLANE_URL", global = true, value_name = "URL")]
    pub url: Option<String>,
    /// Read the bearer token from this file [default: KEYPLANE_TOKEN, else the profile's].
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The saved login to use (see `keyplane login`); its token is sent only to the URL it was
    /// saved with [default: default].
    #[arg(long, env = "KEYPLANE_PROFILE", global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// The organization (Hybridbox account) to act on [default: the credential's own, from
    /// whoami].
    #[arg(long, env = "KEYPLANE_ORG", global = true, value_name = "ORG_ID")]
    pub org: Option<Uuid>,
    /// `table` (the default on a terminal), `json` (the API's JSON, one document; the default
    /// otherwise) or `jsonl` (one JSON line per item of a list).
    #[arg(long, short = 'o', global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,
    /// Print each request and each answer's status and headers to stderr (the credential and any
    /// secret redacted; answer bodies are never printed).
    #[arg(long, short = 'v', global = true)]
    pub verbose: bool,
}

impl Target {
    /// The profile named by `--profile` or KEYPLANE_PROFILE, else `default`.
    fn profile_name(&self) -> &str {
        self.profile.as_deref().unwrap_or("default")
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Jsonl,
}

/// What the client commands read from the process environment (the CLI's main reads it).
pub struct Environment {
    /// `KEYPLANE_TOKEN`.
    pub token: Option<String>,
    /// `$XDG_CONFIG_HOME`, else `$HOME/.config`.
    pub config_dir: Option<PathBuf>,
}

impl Environment {
    pub fn from_process() -> Self {
        let config_dir = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")));
        Self {
            token: std::env::var("KEYPLANE_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
            config_dir,
        }
    }

    fn profiles(&self) -> Result<Profiles, Error> {
        let dir = self.config_dir.as_ref().ok_or_else(|| {
            Error::Local("neither XDG_CONFIG_HOME nor HOME is set: no place for profiles".into())
        })?;
        Ok(Profiles::at(dir.join("keyplane").join("profiles.json")))
    }

    /// Where a run that cannot tell whether it was done saves its Idempotency-Key, beside the
    /// profiles (which hold secrets too).
    fn idempotency_key_dir(&self) -> Option<PathBuf> {
        let dir = self.config_dir.as_ref()?;
        Some(dir.join("keyplane").join("idempotency-keys"))
    }
}

#[derive(Args)]
pub struct SecretArgs {
    /// Write the secret to this new file (mode 0600; an existing file is never overwritten)
    /// instead of printing it.
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,
    #[command(flatten)]
    idempotency: IdempotencyArgs,
}

impl SecretArgs {
    /// Before the request: the secret file (created first, so that a bad path fails before a
    /// secret is minted), and the Idempotency-Key to send.
    fn open(&self, s: &mut Session) -> Result<Option<SecretFile>, Error> {
        self.idempotency.apply(s)?;
        self.secret_file
            .as_deref()
            .map(SecretFile::create)
            .transpose()
    }
}

#[derive(Args)]
pub struct IdempotencyArgs {
    /// Send the Idempotency-Key in this file (16–255 visible ASCII characters; whitespace around
    /// it ignored) instead of a fresh one. When a run fails without knowing whether it was done,
    /// it saves its key in a new file (mode 0600, under $XDG_CONFIG_HOME/keyplane/) and names it:
    /// run the same command again with it, within 24 hours, to get that request's answer (secret
    /// included) rather than doing it twice.
    #[arg(long, value_name = "PATH", conflicts_with = "idempotency_key")]
    idempotency_key_file: Option<PathBuf>,
    /// The Idempotency-Key itself; other users of the machine see it (`ps`) and the shell keeps
    /// it in its history, and it unlocks the stored answer: prefer --idempotency-key-file.
    #[arg(long, value_name = "KEY", value_parser = parse_idempotency_key)]
    idempotency_key: Option<String>,
}

impl IdempotencyArgs {
    fn apply(&self, s: &mut Session) -> Result<(), Error> {
        let key = match &self.idempotency_key_file {
            Some(path) => Some(read_idempotency_key_file(path)?),
            None => self.idempotency_key.clone(),
        };
        s.client.set_idempotency_key(key);
        Ok(())
    }
}

/// `--idempotency-key-file`'s key, held to the same rule as `--idempotency-key`'s (not quoted).
fn read_idempotency_key_file(path: &std::path::Path) -> Result<String, Error> {
    let text = read_flag_file("--idempotency-key-file", path)?;
    parse_idempotency_key(&text).map_err(|reason| {
        Error::Usage(format!(
            "--idempotency-key-file {}: the key {reason}",
            path.display()
        ))
    })
}

/// The server's rule for the header, checked before anything is sent.
fn parse_idempotency_key(text: &str) -> Result<String, String> {
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII characters only (no spaces)".into());
    }
    match text.len() {
        0..=15 => Err("must be at least 16 characters".into()),
        16..=255 => Ok(text.to_string()),
        _ => Err("must be at most 255 characters".into()),
    }
}

#[derive(Args)]
#[group(multiple = false)]
pub struct Expiry {
    /// Expire this long from now: 90s, 15m, 12h, 30d, 2w, 1h30m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    expires_in: Option<Duration>,
    /// Expire at this time (RFC 3339, e.g. 2030-01-01T00:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    expires_at: Option<DateTime<Utc>>,
}

impl Expiry {
    pub(crate) fn at(&self, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, Error> {
        match (self.expires_in, self.expires_at) {
            (Some(after), _) => chrono::Duration::from_std(after)
                .ok()
                .and_then(|after| now.checked_add_signed(after))
                .map(Some)
                .ok_or_else(|| Error::Usage("--expires-in is too far in the future".into())),
            (None, at) => Ok(at),
        }
    }

    /// A request repeated with its Idempotency-Key must be the same, but --expires-in would
    /// come to another time: tell the user the time to give instead.
    fn keep(&self, error: Error, at: Option<DateTime<Utc>>) -> Error {
        match (self.expires_in, at) {
            (Some(_), Some(at)) => error.retry_also(&format!(
                " --expires-at {} (in place of --expires-in)",
                keyplane_api_types::wire::rfc3339(&at)
            )),
            _ => error,
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    keyplane_client::duration::parse(text)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| format!("`{text}` is not an RFC 3339 time such as 2030-01-01T00:00:00Z"))
}

// ------------------------------------------------------------------------------------------------
// Commands

#[derive(Subcommand)]
pub enum TokensCommand {
    /// List the organization's live API tokens (never their secrets).
    #[command(after_help = example!(
        "keyplane tokens list",
        "keyplane tokens list --expiring-within 14d -o jsonl | jq -r .name"
    ))]
    List(ListArgs),
    /// Create an API token; its secret is printed once.
    #[command(after_help = example!(
        "keyplane tokens create --name ci-reader --scope api_tokens:read --expires-in 30d",
        "keyplane tokens create --name deploy --scope deploy:prod --secret-file ./deploy.token"
    ))]
    Create {
        /// 1–120 characters, unique among the organization's live tokens.
        #[arg(long)]
        name: String,
        /// A scope the token holds (repeatable): api_tokens:read, api_tokens:write,
        /// registry:read, registry:write, auth.manage, audit:read, tokens:verify,
        /// webhooks:manage, `*`, or your own
        /// (deploy:prod). At most the caller's own.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// A canary: it looks like any API token but authenticates nowhere, and every presentation
        /// of it is recorded as `credential.canary_triggered` (then delivered by webhooks).
        #[arg(long)]
        canary: bool,
        #[command(flatten)]
        expiry: Expiry,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Show one API token.
    #[command(after_help = example!("keyplane tokens get 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Get {
        /// The token's id.
        id: Uuid,
    },
    /// Replace a token's secret (same id); the new secret is printed once. With --grace the old
    /// one keeps working for that long.
    #[command(after_help = example!(
        "keyplane tokens rotate 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f --secret-file new.token",
        "keyplane tokens rotate ID --grace 1h --retire-when-unused 10m"
    ))]
    Rotate {
        /// The token's id.
        id: Uuid,
        #[command(flatten)]
        rotation: RotateArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Stop it authenticating anywhere until resumed (keeps its id, rights and secret).
    #[command(after_help = example!("keyplane tokens suspend 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Suspend {
        /// The token's id.
        id: Uuid,
    },
    /// End a suspension: it authenticates again.
    #[command(after_help = example!("keyplane tokens resume 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Resume {
        /// The token's id.
        id: Uuid,
    },
    /// End, now, the previous secret a rotation with --grace kept working.
    #[command(after_help = example!("keyplane tokens retire-previous 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    RetirePrevious {
        /// The token's id.
        id: Uuid,
    },
    /// Revoke a token for good.
    #[command(after_help = example!("keyplane tokens revoke 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Revoke {
        /// The token's id.
        id: Uuid,
    },
}

#[derive(Args)]
pub struct ListArgs {
    /// Fetch one page of this many (1–100) instead of every page.
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
    /// Start after this `next_cursor` of a previous page (one page only).
    #[arg(long, value_name = "CURSOR")]
    cursor: Option<String>,
    #[command(flatten)]
    expiring: ExpiringArgs,
}

#[derive(Args)]
pub struct ExpiringArgs {
    /// Only those not expired yet that expire within this long, in whole days, rounded up
    /// (7d, 2w; the API counts days).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    expiring_within: Option<Duration>,
}

impl ExpiringArgs {
    fn days(&self) -> Option<u32> {
        self.expiring_within
            .map(|within| u32::try_from(within.as_secs().div_ceil(86_400)).unwrap_or(u32::MAX))
    }
}

/// `rotate`'s options: a grace period for the old secret, and a new expiry.
#[derive(Args)]
pub struct RotateArgs {
    /// Keep the old secret working beside the new one for this long (up to 7d): 1h, 30m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    grace: Option<Duration>,
    /// With --grace, and shorter than it: retire the old secret earlier, once it has gone unused
    /// this long and the new one has been used.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    retire_when_unused: Option<Duration>,
    #[command(flatten)]
    expiry: Expiry,
}

impl RotateArgs {
    fn request(&self) -> Result<RotateRequest, Error> {
        let seconds = |flag: &str, duration: Option<Duration>| {
            duration
                .map(|d| {
                    u32::try_from(d.as_secs())
                        .map_err(|_| Error::Usage(format!("{flag} is too long")))
                })
                .transpose()
        };
        Ok(RotateRequest {
            grace_seconds: seconds("--grace", self.grace)?,
            retire_when_unused_seconds: seconds("--retire-when-unused", self.retire_when_unused)?,
            expires_at: self.expiry.at(Utc::now())?,
        })
    }
}

#[derive(Subcommand)]
pub enum ServiceAccountsCommand {
    /// List the account's service accounts.
    #[command(after_help = example!(
        "keyplane service-accounts list --include-revoked",
        "keyplane service-accounts list --expiring-within 14d"
    ))]
    List {
        /// Also list revoked ones.
        #[arg(long)]
        include_revoked: bool,
        #[command(flatten)]
        expiring: ExpiringArgs,
    },
    /// Create a service account (it holds no right until granted one); its token is printed once.
    #[command(after_help = example!(
        "keyplane service-accounts create --name billing-sync --expires-in 90d",
        "keyplane grants create --subject-type service_account --subject-id ID --capability-key auth.manage"
    ))]
    Create {
        /// 1–120 characters, unique among the account's live service accounts.
        #[arg(long)]
        name: String,
        /// A canary: it looks like any service account but authenticates nowhere, and every
        /// presentation of it is recorded as `credential.canary_triggered` (then delivered by
        /// webhooks).
        #[arg(long)]
        canary: bool,
        #[command(flatten)]
        expiry: Expiry,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Replace a service account's token; the new one is printed once.
    #[command(after_help = example!("keyplane service-accounts rotate 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Rotate {
        /// The service account's id.
        id: Uuid,
        #[command(flatten)]
        rotation: RotateArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Stop it authenticating anywhere until resumed (keeps its id, rights and secret).
    #[command(after_help = example!("keyplane service-accounts suspend 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Suspend {
        /// The service account's id.
        id: Uuid,
    },
    /// End a suspension: it authenticates again.
    #[command(after_help = example!("keyplane service-accounts resume 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Resume {
        /// The service account's id.
        id: Uuid,
    },
    /// End, now, the previous secret a rotation with --grace kept working.
    #[command(after_help = example!("keyplane service-accounts retire-previous 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    RetirePrevious {
        /// The service account's id.
        id: Uuid,
    },
    /// Revoke a service account and its token for good.
    #[command(after_help = example!("keyplane service-accounts revoke 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Revoke {
        /// The service account's id.
        id: Uuid,
    },
}

#[derive(Subcommand)]
pub enum GrantsCommand {
    /// List the account's grants (authorizations), filtered.
    #[command(after_help = example!("keyplane grants list --subject-type service_account"))]
    List {
        /// user, group or service_account.
        #[arg(long, value_name = "TYPE")]
        subject_type: Option<String>,
        #[arg(long, value_name = "UUID")]
        subject_id: Option<String>,
        /// capability, account_owner or super_admin.
        #[arg(long, value_name = "KIND")]
        grant_kind: Option<String>,
        #[arg(long, value_name = "KEY")]
        capability_key: Option<String>,
        /// Also list revoked grants.
        #[arg(long)]
        include_revoked: bool,
    },
    /// Grant a right to a user, group or service account (never more than you hold).
    #[command(after_help = example!(
        "keyplane grants create --subject-type service_account --subject-id ID --capability-key auth.manage",
        "keyplane grants create --grant-kind account_owner --subject-type user --subject-id UUID"
    ))]
    Create {
        /// capability, account_owner or super_admin.
        #[arg(long, value_name = "KIND", default_value = "capability", value_parser = parse_grant_kind)]
        grant_kind: GrantKind,
        /// user, group or service_account.
        #[arg(long, value_name = "TYPE", value_parser = parse_subject_type)]
        subject_type: SubjectType,
        #[arg(long, value_name = "UUID")]
        subject_id: Uuid,
        /// The capability of a `capability` grant: auth.manage, api_tokens:read, ...
        #[arg(long, value_name = "KEY", value_parser = parse_scope)]
        capability_key: Option<Scope>,
        /// Narrow the grant to one resource: its type (project) ...
        #[arg(long, value_name = "TYPE", requires = "resource_id")]
        resource_type: Option<String>,
        /// ... and id (team-a/app).
        #[arg(long, value_name = "ID", requires = "resource_type")]
        resource_id: Option<String>,
        #[command(flatten)]
        idempotency: IdempotencyArgs,
    },
    /// Revoke a grant; its subject loses the right on its next request.
    #[command(after_help = example!("keyplane grants revoke 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Revoke {
        /// The grant's id.
        id: Uuid,
    },
}

fn parse_grant_kind(text: &str) -> Result<GrantKind, String> {
    GrantKind::parse(text).ok_or_else(|| "must be capability, account_owner or super_admin".into())
}

fn parse_subject_type(text: &str) -> Result<SubjectType, String> {
    SubjectType::parse(text).ok_or_else(|| "must be user, group or service_account".into())
}

fn parse_scope(text: &str) -> Result<Scope, String> {
    Scope::parse(text).map_err(str::to_string)
}

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Show the organization's registry project, or `enabled: false`.
    #[command(after_help = example!("keyplane registry show"))]
    Show,
    /// Enable the registry project; the default robot's password is printed once.
    #[command(after_help = example!("keyplane registry enable --secret-file robot.password"))]
    Enable {
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Subcommand)]
pub enum RobotsCommand {
    /// List the registry's robot accounts.
    #[command(after_help = example!("keyplane robots list --expiring-within 14d"))]
    List {
        #[command(flatten)]
        expiring: ExpiringArgs,
    },
    /// Create a robot account; its secret (the registry password) is printed once.
    #[command(after_help = example!(
        "keyplane robots create --name ci --permission pull --permission 'push:team-a/*'"
    ))]
    Create {
        /// `^[a-z0-9]+(?:[._-][a-z0-9]+)*$`; the login is robot$<project>+<name>.
        #[arg(long)]
        name: String,
        /// pull, push or delete, optionally narrowed to a repository glob (push:team-a/*);
        /// repeatable [default: pull].
        #[arg(long = "permission", value_name = "PERMISSION")]
        permissions: Vec<String>,
        /// A canary: it looks like any robot but authenticates nowhere, and every presentation of
        /// it is recorded as `credential.canary_triggered` (then delivered by webhooks).
        #[arg(long)]
        canary: bool,
        #[command(flatten)]
        expiry: Expiry,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Show one robot account.
    #[command(after_help = example!("keyplane robots get 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Get {
        /// The robot's id.
        id: Uuid,
    },
    /// Replace a robot's permissions.
    #[command(after_help = example!("keyplane robots update ID --permission pull --permission 'push:team-b/**'"))]
    Update {
        /// The robot's id.
        id: Uuid,
        /// The new permissions (repeatable, at least one), replacing the old ones.
        #[arg(long = "permission", value_name = "PERMISSION", required = true)]
        permissions: Vec<String>,
    },
    /// Replace a robot's secret; the new one is printed once.
    #[command(after_help = example!("keyplane robots rotate 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Rotate {
        /// The robot's id.
        id: Uuid,
        #[command(flatten)]
        rotation: RotateArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Stop it authenticating anywhere until resumed (keeps its id, rights and secret).
    #[command(after_help = example!("keyplane robots suspend 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Suspend {
        /// The robot's id.
        id: Uuid,
    },
    /// End a suspension: it authenticates again.
    #[command(after_help = example!("keyplane robots resume 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Resume {
        /// The robot's id.
        id: Uuid,
    },
    /// End, now, the previous secret a rotation with --grace kept working.
    #[command(after_help = example!("keyplane robots retire-previous 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    RetirePrevious {
        /// The robot's id.
        id: Uuid,
    },
    /// Revoke a robot account for good.
    #[command(after_help = example!("keyplane robots revoke 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Revoke {
        /// The robot's id.
        id: Uuid,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Show the organization's credential policy and how many live credentials break it.
    #[command(after_help = example!("keyplane policy show"))]
    Show,
    /// Replace the whole policy, as the API's PUT does: what is not given is no rule (leaks
    /// revoke). Needs `*` or account_owner.
    #[command(after_help = example!(
        "keyplane policy set --max-lifetime-days 90 --require-expiry --default-lifetime-days 30",
        "keyplane policy set --robot-accounts max=365,require --on-leak suspend",
        "keyplane policy set                # back to the default: no rules"
    ))]
    Set {
        /// The rule for every kind without its own: the longest lifetime, in days (1–36500).
        #[arg(long, value_name = "DAYS")]
        max_lifetime_days: Option<u32>,
        /// ... every credential must have an expiry.
        #[arg(long)]
        require_expiry: bool,
        /// ... the lifetime, in days, of one created without an expiry.
        #[arg(long, value_name = "DAYS")]
        default_lifetime_days: Option<u32>,
        /// API tokens' own rule, e.g. `max=90,default=30,require`.
        #[arg(long, value_name = "RULE", value_parser = parse_rule)]
        api_tokens: Option<LifetimeRule>,
        /// Service accounts' own rule.
        #[arg(long, value_name = "RULE", value_parser = parse_rule)]
        service_accounts: Option<LifetimeRule>,
        /// Robot accounts' own rule.
        #[arg(long, value_name = "RULE", value_parser = parse_rule)]
        robot_accounts: Option<LifetimeRule>,
        /// What a reported leak does: revoke (default) or suspend.
        #[arg(long, value_name = "ACTION", value_parser = parse_leak_action)]
        on_leak: Option<LeakAction>,
    },
}

/// `max=DAYS,default=DAYS,require`, each part optional.
fn parse_rule(text: &str) -> Result<LifetimeRule, String> {
    let mut rule = LifetimeRule::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let days = |value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| format!("`{value}` is not a number of days"))
        };
        match part.split_once('=') {
            Some(("max", value)) => rule.max_lifetime_days = Some(days(value)?),
            Some(("default", value)) => rule.default_lifetime_days = Some(days(value)?),
            None if part == "require" => rule.require_expiry = true,
            _ => return Err(format!("`{part}` is not max=DAYS, default=DAYS or require")),
        }
    }
    Ok(rule)
}

fn parse_leak_action(text: &str) -> Result<LeakAction, String> {
    LeakAction::parse(text).ok_or_else(|| "must be revoke or suspend".into())
}

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// List the organization's webhooks (never their secrets).
    #[command(after_help = example!("keyplane webhooks list", "keyplane webhooks list -o jsonl | jq -r .url"))]
    List,
    /// Create a webhook; its signing secret is printed once. Needs webhooks:manage.
    #[command(after_help = example!(
        "keyplane webhooks create --endpoint https://hooks.example.com/keyplane --event 'api_token.*'",
        "keyplane webhooks create --endpoint-file siem-endpoint.txt --event '*' --secret-file whsec.txt"
    ))]
    Create {
        #[command(flatten)]
        fields: WebhookFields,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Show one webhook.
    #[command(after_help = example!("keyplane webhooks get 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Get {
        /// The webhook's id.
        id: Uuid,
    },
    /// Change a webhook: what is given replaces its value, the rest (and the secret) stays.
    #[command(after_help = example!(
        "keyplane webhooks update ID --disabled",
        "keyplane webhooks update ID --event 'api_token.*' --event credential.expiring --enabled"
    ))]
    Update {
        /// The webhook's id.
        id: Uuid,
        #[command(flatten)]
        fields: WebhookFields,
    },
    /// Delete a webhook, its pending deliveries and its delivery history.
    #[command(after_help = example!("keyplane webhooks delete 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f"))]
    Delete {
        /// The webhook's id.
        id: Uuid,
    },
    /// Replace a webhook's signing secret; the new one is printed once. For 24 hours deliveries
    /// carry a signature with each secret.
    #[command(after_help = example!("keyplane webhooks rotate-secret 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f --secret-file whsec.txt"))]
    RotateSecret {
        /// The webhook's id.
        id: Uuid,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// List a webhook's deliveries, newest first, one page.
    #[command(after_help = example!(
        "keyplane webhooks deliveries 0b9c2d7e-4f1a-4c3b-9e2d-7a6b5c4d3e2f --status failed",
        "keyplane webhooks deliveries ID --limit 100 -o jsonl"
    ))]
    Deliveries {
        /// The webhook's id.
        webhook_id: Uuid,
        /// Only pending, succeeded or failed deliveries.
        #[arg(long, value_parser = ["pending", "succeeded", "failed"])]
        status: Option<String>,
        /// Page size, 1–100 [default: the server's, 50].
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// `next_cursor` of the previous page, for older deliveries.
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Attempt a delivery once more, now, whatever its status.
    #[command(after_help = example!("keyplane webhooks retry WEBHOOK_ID DELIVERY_ID"))]
    Retry {
        /// The webhook's id.
        webhook_id: Uuid,
        /// The delivery's id (its event's id).
        delivery_id: Uuid,
    },
}

/// A webhook's fields, as the API names them (its `url` is `--endpoint`: `--url` names the
/// keyplane server).
#[derive(Args)]
pub struct WebhookFields {
    /// Where deliveries are POSTed: an http or https URL whose host has public addresses only
    /// (unless the server allows private targets). Create needs it or --endpoint-file. Other
    /// users of the machine see it (`ps`) and the shell keeps it in its history: a URL whose
    /// path or query carries a token belongs in --endpoint-file.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Read --endpoint's URL from this file (whitespace around it ignored).
    #[arg(long, value_name = "PATH", conflicts_with = "endpoint")]
    endpoint_file: Option<PathBuf>,
    /// An audit action to deliver (api_token.created), every action under a prefix
    /// (api_token.*), or `*`; repeatable. Required by create.
    #[arg(long = "event", value_name = "PATTERN")]
    events: Vec<String>,
    /// Free text, at most 500 characters.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Deliver events (the default of create): those from then on, not those missed while
    /// disabled.
    #[arg(long, conflicts_with = "disabled")]
    enabled: bool,
    /// Stop delivering events; the pending deliveries fail.
    #[arg(long)]
    disabled: bool,
}

impl WebhookFields {
    fn given(&self) -> bool {
        self.endpoint.is_some()
            || self.endpoint_file.is_some()
            || !self.events.is_empty()
            || self.description.is_some()
            || self.enabled
            || self.disabled
    }

    /// The PUT body: what was given over `current` (a create's is the API's defaults).
    fn request(self, current: Option<WebhookView>) -> Result<WebhookRequest, Error> {
        let given = match (self.endpoint, &self.endpoint_file) {
            (Some(endpoint), _) => Some(("--endpoint", endpoint)),
            (None, Some(path)) => Some(("--endpoint-file", read_endpoint_file(path)?)),
            (None, None) => None,
        };
        let (source, endpoint) = match (given, &current) {
            (Some(given), _) => given,
            (None, Some(current)) => ("the webhook's url", current.url.clone()),
            (None, None) => {
                return Err(Error::Usage(
                    "--endpoint or --endpoint-file is required".into(),
                ))
            }
        };
        // Not quoted: its path or query may hold a receiver's token.
        let url = Url::parse(&endpoint)
            .map_err(|e| Error::Usage(format!("{source}: not an absolute URL: {e}")))?;
        let events = match (self.events.is_empty(), &current) {
            (false, _) => self.events,
            (true, Some(current)) => current.events.clone(),
            (true, None) => {
                return Err(Error::Usage(
                    "--event is required (repeatable; `*` for every event)".into(),
                ))
            }
        };
        let events = ActionPattern::parse_list(&FieldPath::body("events"), &events)
            .map_err(|e| usage("--event", e))?;
        let enabled = match (self.enabled, self.disabled) {
            (true, _) => true,
            (_, true) => false,
            _ => current.as_ref().is_none_or(|current| current.enabled),
        };
        Ok(WebhookRequest {
            url,
            events,
            description: self
                .description
                .or_else(|| current.map(|current| current.description))
                .unwrap_or_default(),
            enabled,
        })
    }
}

#[derive(Args, Clone)]
pub struct AuditFilterArgs {
    /// Only this action (api_token.created) or prefix (api_token.*); repeatable.
    #[arg(long, value_name = "ACTION")]
    action: Vec<String>,
    /// Only events by this credential or user.
    #[arg(long, value_name = "UUID")]
    actor_id: Option<String>,
    /// Only events about this resource.
    #[arg(long, value_name = "UUID")]
    target_id: Option<String>,
    /// success or denied.
    #[arg(long)]
    outcome: Option<String>,
    /// RFC 3339: events at or after it.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// RFC 3339: events before it.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
}

impl AuditFilterArgs {
    fn filter(&self) -> AuditFilter {
        AuditFilter {
            actions: self.action.clone(),
            actor_id: self.actor_id.clone(),
            target_id: self.target_id.clone(),
            outcome: self.outcome.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            after: Vec::new(),
        }
    }
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// List audit events, newest first, one page (needs audit:read).
    #[command(after_help = example!(
        "keyplane audit list --action 'api_token.*' --since 2030-01-01T00:00:00Z",
        "keyplane audit list --outcome denied -o jsonl"
    ))]
    List {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Page size, 1–100 [default: the server's, 50].
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// `next_cursor` of the previous page, for older events.
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Print the latest events oldest first; with --follow, keep printing new ones as they
    /// commit (polling), one per line (JSON lines with -o json or jsonl).
    #[command(after_help = example!("keyplane audit tail --follow --action 'access.*'"))]
    Tail {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// How many of the latest events to print first (0–100).
        #[arg(long, short = 'n', default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
        lines: u32,
        /// Keep polling for new events until interrupted; a failed poll (the server restarting,
        /// a 503) is retried, backing off up to 30 s, with a notice on stderr.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Time between polls with --follow.
        #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
        interval: Duration,
    },
}

// ------------------------------------------------------------------------------------------------
// Running them

/// A connected client, the output format, and the organization once known.
pub struct Session {
    client: Client,
    output: Output,
    org: Option<Uuid>,
}

impl Session {
    /// Resolves URL and credential: `--url`/KEYPLANE_URL, else the profile's, else the default;
    /// `--token-file`, else KEYPLANE_TOKEN, else the profile's token, which goes to the profile's
    /// URL only. KEYPLANE_TOKEN never goes to a profile's URL.
    pub fn open(target: &Target, env: &Environment) -> Result<Self, Error> {
        let name = target.profile_name();
        // Two credentials named: which one was meant cannot be told, and KEYPLANE_TOKEN (often
        // exported for another server) would go to the profile's server.
        if let (None, Some(_), Some(profile)) = (&target.token_file, &env.token, &target.profile) {
            return Err(Error::Usage(format!(
                "KEYPLANE_TOKEN is set and --profile (or KEYPLANE_PROFILE) names `{profile}`: \
                 unset KEYPLANE_TOKEN to use the profile's login, or drop the profile to use \
                 KEYPLANE_TOKEN"
            )));
        }
        // The profile is read only when something must come from it, so a flag or the
        // environment works even beside a broken profiles file.
        let needs_profile =
            target.url.is_none() || (target.token_file.is_none() && env.token.is_none());
        let profile = match env.profiles() {
            Ok(profiles) if needs_profile => profiles.load(name)?,
            _ => None,
        };
        // KEYPLANE_TOKEN, exported for one server, would otherwise go to whatever server the
        // `default` profile was saved for.
        if let (None, None, Some(_), Some(profile)) =
            (&target.url, &target.token_file, &env.token, &profile)
        {
            return Err(Error::Usage(format!(
                "KEYPLANE_TOKEN is set without --url or KEYPLANE_URL, and profile `{name}` was \
                 saved for {}: KEYPLANE_TOKEN is never sent to a profile's server. Pass --url \
                 (or set KEYPLANE_URL) for the server KEYPLANE_TOKEN belongs to, or unset \
                 KEYPLANE_TOKEN to use the profile's login",
                profile.url
            )));
        }
        let url = target
            .url
            .clone()
            .or_else(|| profile.as_ref().map(|p| p.url.clone()))
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        let token = match (&target.token_file, &env.token, &profile) {
            (Some(path), _, _) => read_token_file(path)?,
            (None, Some(token), _) => Plaintext::received(token.trim().to_string()),
            (None, None, Some(profile)) if profile.serves(&url) => {
                Plaintext::received(profile.token.expose_secret().to_string())
            }
            (None, None, Some(profile)) => {
                return Err(Error::NoCredential(format!(
                    "no credential for {url}: profile `{name}` was saved for {}, and its token \
                     is sent nowhere else; run `keyplane login --url {url} --profile NAME` and \
                     use that profile, set KEYPLANE_TOKEN, or pass --token-file",
                    profile.url
                )))
            }
            (None, None, None) => {
                return Err(Error::NoCredential(format!(
                "no credential: run `keyplane login{}`, set KEYPLANE_TOKEN, or pass --token-file",
                profile_flag(name)
            )))
            }
        };
        let mut client = Client::new(&url, Some(token), target.verbose)?;
        if let Some(dir) = env.idempotency_key_dir() {
            client.keep_idempotency_keys_in(dir);
        }
        Ok(Self {
            client,
            output: Output {
                format: format_of(target.output),
                now: Utc::now(),
            },
            org: target.org,
        })
    }

    /// A session without a credential, for the one route anyone may call.
    pub fn anonymous(target: &Target, env: &Environment) -> Result<Self, Error> {
        let profile = match (&target.url, env.profiles()) {
            (None, Ok(profiles)) => profiles.load(target.profile_name())?,
            _ => None,
        };
        let url = target
            .url
            .clone()
            .or_else(|| profile.map(|p| p.url))
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        Ok(Self {
            client: Client::new(&url, None, target.verbose)?,
            output: Output {
                format: format_of(target.output),
                now: Utc::now(),
            },
            org: target.org,
        })
    }

    /// The organization to act on: `--org`, else the credential's own.
    async fn org(&mut self) -> Result<Uuid, Error> {
        if let Some(org) = self.org {
            return Ok(org);
        }
        let me = self.client.whoami().await?;
        let org = Uuid::parse_str(&me.org_id).map_err(|_| {
            Error::Protocol(format!(
                "whoami answered an org_id that is not a UUID: {}",
                me.org_id
            ))
        })?;
        self.org = Some(org);
        Ok(org)
    }

    fn print_list<R: Record + Serialize>(
        &self,
        document: &impl Serialize,
        items: &[R],
    ) -> Result<(), Error> {
        emit(&self.output.list(document, items))
    }

    /// One page of a list, and on stderr, in every format, how to get the next one: a script
    /// reading JSON lines learns it got a page of several, and stdout stays pure data.
    fn print_page<R: Record + Serialize>(
        &self,
        document: &impl Serialize,
        items: &[R],
        next_cursor: Option<Uuid>,
    ) -> Result<(), Error> {
        self.print_list(document, items)?;
        if let Some(next) = next_cursor {
            eprintln!("More: --cursor {next}");
        }
        Ok(())
    }

    fn print_one<R: Record + Serialize>(&self, item: &R) -> Result<(), Error> {
        emit(&self.output.one(item))
    }

    fn print_created<R: Record>(
        &self,
        document: &impl Serialize,
        record: &R,
        secret: &Plaintext,
        secret_at: &[&'static str],
        file: Option<SecretFile>,
    ) -> Result<(), Error> {
        // Without a file, stdout is the secret's only way out: it must get there.
        let on_stdout = file.is_none();
        let created = self
            .output
            .created(document, record, secret, secret_at, file)?;
        match on_stdout {
            true => write_stdout(&created.stdout)
                .map_err(|e| keyplane_client::output::secret_lost("the secret to stdout", &e))?,
            false => emit(&created.stdout)?,
        }
        eprintln!("{}", created.note);
        Ok(())
    }

    /// What a revoke with no answer body prints: a line for people, nothing for scripts.
    fn print_done(&self, what: &str) -> Result<(), Error> {
        match self.output.format {
            Format::Table => emit(&format!("{what}\n")),
            Format::Json | Format::Jsonl => Ok(()),
        }
    }
}

fn profile_flag(profile: &str) -> String {
    match profile {
        "default" => String::new(),
        other => format!(" --profile {other}"),
    }
}

fn format_of(flag: Option<OutputFormat>) -> Format {
    match flag {
        Some(OutputFormat::Table) => Format::Table,
        Some(OutputFormat::Json) => Format::Json,
        Some(OutputFormat::Jsonl) => Format::Jsonl,
        None if std::io::stdout().is_terminal() => Format::Table,
        None => Format::Json,
    }
}

/// Writes to stdout; a reader that went away (`| head`) is not an error (but see
/// [`Session::print_created`]).
fn emit(text: &str) -> Result<(), Error> {
    emit_while_read(text).map(drop)
}

/// [`emit`], and whether stdout still has a reader: a stream stops once it has none.
fn emit_while_read(text: &str) -> Result<bool, Error> {
    match write_stdout(text) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Error::Local(format!("cannot write to stdout: {e}"))),
    }
}

fn write_stdout(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
}

fn read_token_file(path: &std::path::Path) -> Result<Plaintext, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::NoCredential(format!("cannot read --token-file {}: {e}", path.display()))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Error::NoCredential(format!(
            "--token-file {} is empty",
            path.display()
        )));
    }
    Ok(Plaintext::received(token.to_string()))
}

/// The text of the file `flag` names, whitespace around it dropped.
fn read_flag_file(flag: &str, path: &std::path::Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Local(format!("cannot read {flag} {}: {e}", path.display())))?;
    Ok(text.trim().to_string())
}

fn read_endpoint_file(path: &std::path::Path) -> Result<String, Error> {
    match read_flag_file("--endpoint-file", path)?.as_str() {
        "" => Err(Error::Usage(format!(
            "--endpoint-file {} is empty",
            path.display()
        ))),
        endpoint => Ok(endpoint.to_string()),
    }
}

/// Domain rules broken by an argument, as a usage error naming the flag.
fn usage(flag: &str, errors: Vec<FieldError>) -> Error {
    let lines: Vec<String> = errors
        .iter()
        .map(|e| format!("{flag}: {}: {}", e.path, e.message))
        .collect();
    Error::Usage(lines.join("\n"))
}

pub async fn tokens(mut s: Session, command: TokensCommand) -> Result<(), Error> {
    let org = s.org().await?;
    match command {
        TokensCommand::List(ListArgs {
            limit,
            cursor,
            expiring,
        }) => {
            let expiring = expiring.days();
            let page = if limit.is_some() || cursor.is_some() {
                s.client
                    .list_api_tokens(org, &Page { cursor, limit }, expiring)
                    .await?
            } else {
                // Every page, as one page with no next one: the same shape for scripts.
                let mut all = ApiTokenPage {
                    items: Vec::new(),
                    next_cursor: None,
                };
                let mut page = Page {
                    cursor: None,
                    limit: Some(100),
                };
                loop {
                    let next = s.client.list_api_tokens(org, &page, expiring).await?;
                    all.items.extend(next.items);
                    match next.next_cursor {
                        Some(cursor) => page.cursor = Some(cursor.to_string()),
                        None => break all,
                    }
                }
            };
            s.print_page(&page, &page.items, page.next_cursor)
        }
        TokensCommand::Create {
            name,
            scopes,
            canary,
            expiry,
            secret,
        } => {
            let scopes = ScopeSet::parse_list(&FieldPath::body("scopes"), &scopes)
                .map_err(|e| usage("--scope", e))?;
            let request = CreateApiTokenRequest {
                name,
                scopes,
                expires_at: expiry.at(Utc::now())?,
                canary,
            };
            let file = secret.open(&mut s)?;
            let created = (s.client.create_api_token(org, &request).await)
                .map_err(|e| expiry.keep(e, request.expires_at))?;
            s.print_created(
                &created,
                &created.api_token,
                &created.token,
                &["token"],
                file,
            )
        }
        TokensCommand::Get { id } => {
            let token = s.client.get_api_token(org, id).await?;
            s.print_one(&token)
        }
        TokensCommand::Rotate {
            id,
            rotation,
            secret,
        } => {
            let request = rotation.request()?;
            let file = secret.open(&mut s)?;
            let rotated = (s.client.rotate_api_token(org, id, &request).await)
                .map_err(|e| rotation.expiry.keep(e, request.expires_at))?;
            s.print_created(
                &rotated,
                &rotated.api_token,
                &rotated.token,
                &["token"],
                file,
            )
        }
        TokensCommand::Suspend { id } => {
            let token = s
                .client
                .transition_api_token(org, id, Transition::Suspend)
                .await?;
            s.print_one(&token)
        }
        TokensCommand::Resume { id } => {
            let token = s
                .client
                .transition_api_token(org, id, Transition::Resume)
                .await?;
            s.print_one(&token)
        }
        TokensCommand::RetirePrevious { id } => {
            let step = Transition::RetirePrevious;
            let token = s.client.transition_api_token(org, id, step).await?;
            s.print_one(&token)
        }
        TokensCommand::Revoke { id } => {
            s.client.revoke_api_token(org, id).await?;
            s.print_done(&format!("Revoked API token {id}."))
        }
    }
}

pub async fn service_accounts(
    mut s: Session,
    command: ServiceAccountsCommand,
) -> Result<(), Error> {
    let account = s.org().await?;
    match command {
        ServiceAccountsCommand::List {
            include_revoked,
            expiring,
        } => {
            let accounts = s
                .client
                .list_service_accounts(account, include_revoked, expiring.days())
                .await?;
            s.print_list(&accounts, &accounts)
        }
        ServiceAccountsCommand::Create {
            name,
            canary,
            expiry,
            secret,
        } => {
            let request = CreateServiceAccountRequest {
                name,
                expires_at: expiry.at(Utc::now())?,
                canary,
            };
            let file = secret.open(&mut s)?;
            let created = (s.client.create_service_account(account, &request).await)
                .map_err(|e| expiry.keep(e, request.expires_at))?;
            s.print_created(
                &created,
                &created.service_account,
                &created.token,
                &["token"],
                file,
            )
        }
        ServiceAccountsCommand::Rotate {
            id,
            rotation,
            secret,
        } => {
            let request = rotation.request()?;
            let file = secret.open(&mut s)?;
            let rotated = (s.client.rotate_service_account(account, id, &request).await)
                .map_err(|e| rotation.expiry.keep(e, request.expires_at))?;
            s.print_created(
                &rotated,
                &rotated.service_account,
                &rotated.token,
                &["token"],
                file,
            )
        }
        ServiceAccountsCommand::Suspend { id } => {
            let step = Transition::Suspend;
            let account = s
                .client
                .transition_service_account(account, id, step)
                .await?;
            s.print_one(&account)
        }
        ServiceAccountsCommand::Resume { id } => {
            let step = Transition::Resume;
            let account = s
                .client
                .transition_service_account(account, id, step)
                .await?;
            s.print_one(&account)
        }
        ServiceAccountsCommand::RetirePrevious { id } => {
            let step = Transition::RetirePrevious;
            let account = s
                .client
                .transition_service_account(account, id, step)
                .await?;
            s.print_one(&account)
        }
        ServiceAccountsCommand::Revoke { id } => {
            let revoked = s.client.revoke_service_account(account, id).await?;
            s.print_one(&revoked)
        }
    }
}

pub async fn grants(mut s: Session, command: GrantsCommand) -> Result<(), Error> {
    let account = s.org().await?;
    match command {
        GrantsCommand::List {
            subject_type,
            subject_id,
            grant_kind,
            capability_key,
            include_revoked,
        } => {
            let filter = GrantFilter {
                subject_type,
                subject_id,
                grant_kind,
                capability_key,
                include_revoked,
            };
            let grants = s.client.list_authorizations(account, &filter).await?;
            s.print_list(&grants, &grants)
        }
        GrantsCommand::Create {
            grant_kind,
            subject_type,
            subject_id,
            capability_key,
            resource_type,
            resource_id,
            idempotency,
        } => {
            idempotency.apply(&mut s)?;
            let request = CreateAuthorizationRequest {
                grant_kind,
                subject_type,
                subject_id,
                capability_key,
                resource_type,
                resource_id,
            };
            let grant = s.client.create_authorization(account, &request).await?;
            s.print_one(&grant)
        }
        GrantsCommand::Revoke { id } => {
            let grant = s.client.revoke_authorization(account, id).await?;
            s.print_one(&grant)
        }
    }
}

pub async fn registry(mut s: Session, command: RegistryCommand) -> Result<(), Error> {
    let org = s.org().await?;
    match command {
        RegistryCommand::Show => {
            let state = s.client.get_registry(org).await?;
            s.print_one(&state)
        }
        RegistryCommand::Enable { secret } => {
            let file = secret.open(&mut s)?;
            let enabled = s.client.enable_registry(org).await?;
            s.print_created(
                &enabled,
                &enabled,
                &enabled.credentials.password,
                &["credentials", "password"],
                file,
            )
        }
    }
}

fn permissions(raw: &[String]) -> Result<Vec<RobotPermission>, Error> {
    RobotPermission::parse_list(&FieldPath::body("permissions"), raw)
        .map_err(|e| usage("--permission", e))
}

pub async fn robots(mut s: Session, command: RobotsCommand) -> Result<(), Error> {
    let org = s.org().await?;
    match command {
        RobotsCommand::List { expiring } => {
            let page = s.client.list_robots(org, expiring.days()).await?;
            s.print_list(&page, &page.items)
        }
        RobotsCommand::Create {
            name,
            permissions: raw,
            canary,
            expiry,
            secret,
        } => {
            let request = CreateRobotAccountRequest {
                name,
                // None given: the server's default (pull).
                permissions: if raw.is_empty() {
                    Vec::new()
                } else {
                    permissions(&raw)?
                },
                expires_at: expiry.at(Utc::now())?,
                canary,
            };
            let file = secret.open(&mut s)?;
            let created = (s.client.create_robot(org, &request).await)
                .map_err(|e| expiry.keep(e, request.expires_at))?;
            s.print_created(
                &created,
                &created.robot_account,
                &created.token,
                &["token"],
                file,
            )
        }
        RobotsCommand::Get { id } => {
            let robot = s.client.get_robot(org, id).await?;
            s.print_one(&robot)
        }
        RobotsCommand::Update {
            id,
            permissions: raw,
        } => {
            let request = UpdateRobotAccountRequest {
                permissions: permissions(&raw)?,
            };
            let robot = s.client.update_robot(org, id, &request).await?;
            s.print_one(&robot)
        }
        RobotsCommand::Rotate {
            id,
            rotation,
            secret,
        } => {
            let request = rotation.request()?;
            let file = secret.open(&mut s)?;
            let rotated = (s.client.rotate_robot(org, id, &request).await)
                .map_err(|e| rotation.expiry.keep(e, request.expires_at))?;
            s.print_created(
                &rotated,
                &rotated.robot_account,
                &rotated.token,
                &["token"],
                file,
            )
        }
        RobotsCommand::Suspend { id } => {
            let robot = s
                .client
                .transition_robot(org, id, Transition::Suspend)
                .await?;
            s.print_one(&robot)
        }
        RobotsCommand::Resume { id } => {
            let robot = s
                .client
                .transition_robot(org, id, Transition::Resume)
                .await?;
            s.print_one(&robot)
        }
        RobotsCommand::RetirePrevious { id } => {
            let step = Transition::RetirePrevious;
            let robot = s.client.transition_robot(org, id, step).await?;
            s.print_one(&robot)
        }
        RobotsCommand::Revoke { id } => {
            s.client.revoke_robot(org, id).await?;
            s.print_done(&format!("Revoked robot account {id}."))
        }
    }
}

pub async fn policy(mut s: Session, command: PolicyCommand) -> Result<(), Error> {
    let org = s.org().await?;
    match command {
        PolicyCommand::Show => {
            let policy = s.client.get_credential_policy(org).await?;
            s.print_one(&policy)
        }
        PolicyCommand::Set {
            max_lifetime_days,
            require_expiry,
            default_lifetime_days,
            api_tokens,
            service_accounts,
            robot_accounts,
            on_leak,
        } => {
            let request = PutCredentialPolicyRequest {
                all: Some(LifetimeRule {
                    max_lifetime_days,
                    require_expiry,
                    default_lifetime_days,
                }),
                api_tokens,
                service_accounts,
                robot_accounts,
                on_leak,
            };
            let policy = s.client.put_credential_policy(org, &request).await?;
            s.print_one(&policy)
        }
    }
}

/// A webhook secret as the printing code takes every secret.
fn webhook_secret(secret: &keyplane_core::WebhookSecret) -> Plaintext {
    Plaintext::received(secret.expose_secret().to_string())
}

pub async fn webhooks(mut s: Session, command: WebhooksCommand) -> Result<(), Error> {
    let org = s.org().await?;
    match command {
        WebhooksCommand::List => {
            let list = s.client.list_webhooks(org).await?;
            s.print_list(&list, &list.items)
        }
        WebhooksCommand::Create { fields, secret } => {
            let request = fields.request(None)?;
            let file = secret.open(&mut s)?;
            let created = s.client.create_webhook(org, &request).await?;
            let shown = webhook_secret(&created.secret);
            s.print_created(&created, &created.webhook, &shown, &["secret"], file)
        }
        WebhooksCommand::Get { id } => {
            let webhook = s.client.get_webhook(org, id).await?;
            s.print_one(&webhook)
        }
        WebhooksCommand::Update { id, fields } => {
            if !fields.given() {
                return Err(Error::Usage(
                    "nothing to change: give --endpoint (or --endpoint-file), --event, --description, \
                     --enabled or --disabled"
                        .into(),
                ));
            }
            // The API replaces the whole webhook: what is not given keeps its current value.
            let current = s.client.get_webhook(org, id).await?;
            let request = fields.request(Some(current))?;
            let webhook = s.client.update_webhook(org, id, &request).await?;
            s.print_one(&webhook)
        }
        WebhooksCommand::Delete { id } => {
            s.client.delete_webhook(org, id).await?;
            s.print_done(&format!("Deleted webhook {id}."))
        }
        WebhooksCommand::RotateSecret { id, secret } => {
            let file = secret.open(&mut s)?;
            let rotated = s.client.rotate_webhook_secret(org, id).await?;
            let shown = webhook_secret(&rotated.secret);
            s.print_created(&rotated, &rotated.webhook, &shown, &["secret"], file)
        }
        WebhooksCommand::Deliveries {
            webhook_id,
            status,
            limit,
            cursor,
        } => {
            let page = s
                .client
                .list_webhook_deliveries(
                    org,
                    webhook_id,
                    status.as_deref(),
                    &Page { cursor, limit },
                )
                .await?;
            s.print_page(&page, &page.items, page.next_cursor)
        }
        WebhooksCommand::Retry {
            webhook_id,
            delivery_id,
        } => {
            let delivery = s
                .client
                .retry_webhook_delivery(org, webhook_id, delivery_id)
                .await?;
            s.print_one(&delivery)
        }
    }
}

pub async fn audit(mut s: Session, command: AuditCommand) -> Result<(), Error> {
    let org = s.org().await?;
    match command {
        AuditCommand::List {
            filter,
            limit,
            cursor,
        } => {
            let page = s
                .client
                .list_audit_events(org, &filter.filter(), &Page { cursor, limit })
                .await?;
            s.print_page(&page, &page.items, page.next_cursor)
        }
        AuditCommand::Tail {
            filter,
            lines,
            follow,
            interval,
        } => tail(&mut s, org, filter.filter(), lines, follow, interval).await,
    }
}

async fn tail(
    s: &mut Session,
    org: Uuid,
    filter: AuditFilter,
    lines: u32,
    follow: bool,
    interval: Duration,
) -> Result<(), Error> {
    // A reader gone (`| grep -m1 ...`) ends the tail: Rust ignores SIGPIPE, so without this
    // --follow would poll on for nobody.
    if !emit_while_read(&s.output.stream_header::<AuditEventView>())? {
        return Ok(());
    }
    let mut printed = Printed::new();
    if lines > 0 {
        let page = s
            .client
            .list_audit_events(
                org,
                &filter,
                &Page {
                    cursor: None,
                    limit: Some(lines),
                },
            )
            .await?;
        if !print_stream(s, page.items.into_iter().rev().collect(), &mut printed)? {
            return Ok(());
        }
    } else {
        // Start from the newest event without printing it.
        let page = s
            .client
            .list_audit_events(
                org,
                &filter,
                &Page {
                    cursor: None,
                    limit: Some(1),
                },
            )
            .await?;
        if let Some(newest) = page.items.first() {
            printed.record(position_of(newest)?);
        }
    }
    if !follow {
        return Ok(());
    }
    // Failed polls in a row: a restart or a 503 pauses the tail, it does not end it.
    let mut failures: u32 = 0;
    loop {
        let pause = match failures {
            0 => interval,
            n => follow_backoff(n),
        };
        tokio::time::sleep(pause).await;
        let still_read = match poll(s, org, &filter, &mut printed).await {
            Ok(still_read) => still_read,
            Err(e) if e.is_transient() => {
                failures += 1;
                let first_line = e.to_string().lines().next().unwrap_or_default().to_string();
                let wait = follow_backoff(failures).as_secs();
                eprintln!("audit tail: {first_line}; reconnecting in {wait} s");
                continue;
            }
            Err(e) => return Err(e),
        };
        if failures > 0 {
            eprintln!("audit tail: reconnected");
            failures = 0;
        }
        if !still_read {
            return Ok(());
        }
    }
}

/// `audit tail --follow`'s wait after `failures` failed polls in a row: 1 s, doubling, at most
/// 30 s.
fn follow_backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// The position `after` names `event` by.
fn position_of(event: &AuditEventView) -> Result<EventPosition, Error> {
    EventPosition::of_hex(event.seq, &event.chain_hash).ok_or_else(|| {
        Error::Protocol(format!(
            "audit event {} has a `chain_hash` that is not a SHA-256 in hex",
            event.seq
        ))
    })
}

/// Prints the events after the newest printed, oldest first, every page of them; whether stdout
/// still has a reader. By `seq`, not time: an event's time is taken before its transaction
/// commits (an aggregated refusal's, at the first refusal, up to a window earlier), so one
/// committed later can carry an earlier time. Each page is asked for `after` the printed events
/// (the newest and some older ones): when the trail went back under the tail (a restore), the
/// server answers 409 with the newest of them it still holds, and the events after it are
/// printed again rather than skipped.
async fn poll(
    s: &mut Session,
    org: Uuid,
    filter: &AuditFilter,
    printed: &mut Printed,
) -> Result<bool, Error> {
    const PAGE: u32 = 100;
    let mut filter = filter.clone();
    let page = Page {
        cursor: None,
        limit: Some(PAGE),
    };
    loop {
        let after = printed.newest().seq;
        filter.after = printed.positions().iter().map(|p| p.to_string()).collect();
        let answer = match s.client.list_audit_events(org, &filter, &page).await {
            Ok(answer) => answer,
            Err(Error::Refused(ApiFailure {
                audit_chain_diverged: Some(diverged),
                ..
            })) => {
                let resume_after = EventPosition::parse(&diverged.resume_after)
                    .filter(|p| p.seq == diverged.resume_after_seq)
                    .ok_or_else(|| {
                        Error::Protocol(
                            "the server's `resume_after` is not an event position".into(),
                        )
                    })?;
                eprintln!(
                    "{}",
                    went_back_warning(
                        "audit tail",
                        diverged.diverged_seq,
                        diverged.head_seq,
                        diverged.resume_after_seq
                    )
                );
                printed.went_back(resume_after);
                // At the next poll: a trail going back again and again is not read in a loop.
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let full = answer.items.len() >= PAGE as usize;
        // In order and past `after` even from a server that ignores `after`.
        let mut new: Vec<AuditEventView> =
            answer.items.into_iter().filter(|e| e.seq > after).collect();
        new.sort_by_key(|e| e.seq);
        let progressed = !new.is_empty();
        if !print_stream(s, new, printed)? {
            return Ok(false);
        }
        if !full || !progressed {
            return Ok(true);
        }
    }
}

/// Prints `events`, recording each; whether stdout still has a reader.
fn print_stream(
    s: &mut Session,
    events: Vec<AuditEventView>,
    printed: &mut Printed,
) -> Result<bool, Error> {
    s.output.now = Utc::now();
    let mut text = String::new();
    let mut positions = Vec::with_capacity(events.len());
    for event in events {
        text.push_str(&s.output.stream(&event));
        positions.push(position_of(&event)?);
    }
    let still_read = emit_while_read(&text)?;
    for position in positions {
        printed.record(position);
    }
    Ok(still_read)
}

pub async fn whoami(s: Session) -> Result<(), Error> {
    let me = s.client.whoami().await?;
    s.print_one(&me)
}

/// `introspect -`'s argument: only `-`. A live token on the command line would be seen by every
/// user of the machine (`ps`) and kept in the shell's history; the error does not repeat it.
pub fn stdin_marker(given: &str) -> Result<(), Error> {
    if given == "-" {
        return Ok(());
    }
    Err(Error::Usage(
        "introspect takes the token on stdin, never as an argument (`ps` and the shell's \
         history would show it): give `-`, as in `keyplane introspect - < token.txt` or \
         `printf %s \"$TOKEN\" | keyplane introspect -`"
            .into(),
    ))
}

/// `introspect -`: the token from stdin.
pub async fn introspect(s: Session) -> Result<(), Error> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| Error::Local(format!("cannot read the token from stdin: {e}")))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(Error::Usage("no token to introspect".into()));
    }
    let answer = s.client.introspect(Plaintext::received(token)).await?;
    s.print_one(&answer)?;
    if answer.active {
        Ok(())
    } else {
        Err(Error::Inactive)
    }
}

/// `revoke-leaked TOKEN...|-`: reports tokens found where they should not be, with no
/// credential, each once, 100 per request (the client waits out the server's per-address limit);
/// prints what the server received (never which were real).
pub async fn revoke_leaked(s: Session, tokens: Vec<String>) -> Result<(), Error> {
    let mut found = Vec::new();
    for token in tokens {
        if token == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Error::Local(format!("cannot read tokens from stdin: {e}")))?;
            found.extend(text.split_whitespace().map(str::to_string));
        } else {
            found.push(token);
        }
    }
    if found.is_empty() {
        return Err(Error::Usage("no token to revoke".into()));
    }
    // A token reported twice costs a request of the limited budget for nothing.
    let mut seen = std::collections::HashSet::new();
    found.retain(|token| seen.insert(token.clone()));
    let mut total = RevokeAccepted {
        received: 0,
        well_formed: 0,
    };
    let mut sent = 0;
    for batch in found.chunks(MAX_CREDENTIALS) {
        let request = RevokeCredentialsRequest {
            credentials: batch.to_vec(),
        };
        match s.client.revoke_leaked(&request).await {
            Ok(accepted) => {
                sent += batch.len();
                total.received += accepted.received;
                total.well_formed += accepted.well_formed;
            }
            // Say what was reported already, so that a rerun can leave it out.
            Err(e) if found.len() > MAX_CREDENTIALS => {
                eprintln!(
                    "Reported the first {sent} of {} distinct tokens (received {}, well_formed {}) \
                     before this failure; the rest were not sent.",
                    found.len(),
                    total.received,
                    total.well_formed
                );
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
    s.print_one(&total)
}

/// `keyplane login`: asks for the token (no echo) or reads it from stdin, checks it with whoami,
/// and saves URL and token as a profile readable only by its owner.
pub async fn login(target: Target, token_stdin: bool, env: &Environment) -> Result<(), Error> {
    let profiles = env.profiles()?;
    let name = target.profile_name();
    let existing = profiles.load(name).ok().flatten();
    let url = target
        .url
        .clone()
        .or_else(|| existing.as_ref().map(|p| p.url.clone()))
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let token = if let Some(path) = &target.token_file {
        read_token_file(path)?
    } else if token_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Error::Local(format!("cannot read the token from stdin: {e}")))?;
        Plaintext::received(text.trim().to_string())
    } else {
        let typed = crate::tty::read_hidden(&format!("Token for {url}: "))?.ok_or_else(|| {
            Error::Usage(
                "no terminal to ask for the token on: pass --token-stdin (or --token-file)".into(),
            )
        })?;
        Plaintext::received(typed.trim().to_string())
    };
    if token.expose_secret().is_empty() {
        return Err(Error::NoCredential("no token given".into()));
    }
    let client = Client::new(
        &url,
        Some(Plaintext::received(token.expose_secret().to_string())),
        target.verbose,
    )?;
    let me = client.whoami().await?;
    profiles.save(
        name,
        &Profile {
            url: client.base_url().to_string(),
            token,
        },
    )?;
    // Everything the server said is escaped: none of it may drive the terminal.
    let printable = keyplane_client::printable;
    eprintln!(
        "Logged in to {} as {} `{}` ({}) in organization {}; saved as profile `{name}` in {}.",
        client.base_url(),
        printable(&me.kind),
        printable(&me.name),
        printable(&me.id),
        printable(&me.org_id),
        profiles.path().display()
    );
    Ok(())
}

pub fn logout(target: &Target, env: &Environment) -> Result<(), Error> {
    let profiles = env.profiles()?;
    let name = target.profile_name();
    if profiles.remove(name)? {
        eprintln!(
            "Removed profile `{name}` from {}.",
            profiles.path().display()
        );
    } else {
        eprintln!("No profile `{name}`: nothing to remove.");
    }
    Ok(())
}
