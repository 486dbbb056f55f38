use crate::follow::{went_back_warning, Printed};
use crate::StoreArgs;
use clap::{Args, Subcommand};
use keyplane_core::audit::{actions, DetailValue};
use keyplane_core::audit_position::EventPosition;
use keyplane_core::{
    CreatedBy, Credential, CredentialKind, Grant, GrantKind, GrantResource, NewGrant, Operator,
    Scope, SubjectType, TenantId, UserId,
};
use keyplane_server::aether::{parse_audit_query, AuditEventView};
use keyplane_server::audit_positions::check_positions;
use keyplane_server::hybridbox::wire::AuthorizationView;
use keyplane_server::ops;
use keyplane_store::AuditOrder;

/// `keyplane admin`: a command, and who runs it.
#[derive(Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
    /// Your name, recorded with the OS user that runs the command on every audit event it writes
    /// (details `operator` and `os_user`; the actor stays `system`) and on every credential or
    /// grant it creates. Not verified: the OS user is what the machine vouches for (not the
    /// `SUDO_USER` recorded with it, which is as declared).
    #[arg(long, global = true, env = "KEYPLANE_OPERATOR", value_name = "NAME")]
    operator: Option<String>,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create an organization (tenant) and an API token with scope `*` for it (printed once).
    /// Refuses a name another organization has (unless --allow-duplicate-name); --id keeps the id
    /// of an organization migrated from elsewhere, --no-token creates no token.
    CreateOrg(crate::tenant_admin::CreateOrgArgs),
    /// List the organizations (id, creation time, registry project, name) in creation order, or
    /// find them by --name. Safe while a server runs.
    ListOrgs(crate::tenant_admin::ListOrgsArgs),
    /// Issue an API token in an existing organization (scope `*` unless --scope), printed once:
    /// the way back into an organization whose last `*` token was revoked or leaked. Recorded as
    /// `api_token.created` (actor `system`, `via: "admin issue-token"`, `os_user`, `operator`)
    /// with its webhooks; the organization's credential policy bounds its expiry.
    IssueToken(crate::tenant_admin::IssueTokenArgs),
    /// Print the registry's `rootcertbundle`: the certificates (PEM) of the signing key, of a
    /// staged next key and of the previous key while it is not retired, creating the signing key
    /// on first use. The private keys stay in the store.
    RegistryCert {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Rotate the registry token signing key without downtime: `stage`, give the registry the new
    /// `registry-cert` bundle, `promote`, and a day later `retire-previous`.
    #[command(subcommand)]
    RegistryKey(RegistryKeyCommand),
    /// Give a user a right in an organization, as the platform operator: typically its first
    /// `account_owner`, who then grants others through the API. Prints the authorization as JSON.
    /// A server sharing the store sees it at once on PostgreSQL, within 30 s on SQLite.
    Grant(GrantArgs),
    /// Migrate the store to this keyplane's schema, and print the schema versions from and to.
    /// `serve` and the admin commands that write migrate it too as they open it; the ones that
    /// only read refuse a store at an older schema. Back the store up first: an older keyplane
    /// refuses a store a newer one has migrated (one already running keeps serving it).
    Migrate {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// An access review of an organization: its live credentials (API tokens, service accounts,
    /// robot accounts, canaries included) and grants as JSON lines, each with `created_by`: the
    /// actor that created it (`type`, `id`; the id is null for `system`), `via` (`api`,
    /// `console`, `admin`, `bootstrap`) and, for an admin command, `os_user` and `operator`. Kept
    /// on the row, so it outlives audit retention; null for what a keyplane that did not record
    /// it yet created (only the audit export says who). Safe while a server runs.
    AccessReview {
        /// The organization (tenant) id.
        #[arg(long, value_name = "ORG_ID", value_parser = parse_tenant)]
        org: TenantId,
        /// Also list revoked credentials and grants.
        #[arg(long)]
        include_revoked: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print an organization's audit events as JSON lines, newest first (`--follow`: oldest first,
    /// then new ones as they commit), or `verify` its hash chain. Safe while a server runs.
    Audit(AuditArgs),
    /// Break glass: revoke every live credential of an organization (API tokens, service
    /// accounts with their grants, registry robot accounts), each as the API revokes it: its own
    /// transaction with its `*.revoked` event (actor `system`, with `reason`, `via`, `os_user` and
    /// `operator`), its webhooks and, on PostgreSQL, the notification that makes every server
    /// sharing the store refuse it at once (on SQLite a running server refuses it within 30 s, its
    /// cache's lifetime). Canaries stay armed; grants to users and groups are left, and counted.
    /// Prints what it revoked by kind (stdout) and what stays valid for a while (stderr).
    /// Interrupted, run it again: it goes on with what is still live. Safe while a server runs.
    RevokeOrg {
        /// The organization (tenant) id.
        #[arg(long, value_name = "ORG_ID", value_parser = parse_tenant)]
        org: TenantId,
        /// Why, recorded on every revoke event (e.g. the incident's id).
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Count what would be revoked, and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the counts as one JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// After a restore from backup: make again what the restore undid, from the trail `serve
    /// --audit-log` exported. An exported event the store does not hold (past its organization's
    /// head, or another event at its seq) was lost; per target, in seq order: revoked, rotated
    /// (its new secret is gone) and leaked-and-revoked credentials are revoked, suspended ones
    /// (not resumed since) suspended, retired previous secrets retired, revoked authorizations
    /// revoked, each with its event (actor `system`, `replayed_event_id`, `via`, `os_user`,
    /// `operator`); other lost changes are listed to review by hand. Records `audit.restored` in
    /// each organization that lost events. A second run finds it done and writes nothing. Run it
    /// before `serve` starts on the restored store; safe while a server runs.
    RestoreReplay(crate::restore_replay::RestoreReplayArgs),
    /// Offboard an organization for good (a churned customer, an erasure request): revoke
    /// everything in it (credentials, canaries, grants to users and groups; each with its event
    /// and, on PostgreSQL, the notification every server acts on at once), delete its webhooks,
    /// then its credentials, grants, console sessions, idempotency records and credential
    /// policy, and record `organization.deleted`. Kept: a tombstone (its id and name, for
    /// `admin audit` and the access review), its audit events until retention prunes them, and
    /// its registry project's name (never given to another organization). Interrupted, run it
    /// again. Exit 2 if --confirm-name is not its name; an organization already deleted is
    /// printed (exit 0). Safe while a server runs.
    DeleteOrg(crate::delete_org::DeleteOrgArgs),
    /// Import credentials from another system by the SHA-256 of their keys (JSON lines, one
    /// credential each; README, "Migrating to keyplane"), so that the keys clients hold keep
    /// working (with `serve --legacy-token-prefix` for keys not in keyplane's format) until they
    /// are rotated to keyplane's own. The whole file is checked first (errors name the line) and
    /// a bad file writes nothing; running it again imports only what is missing.
    ImportCredentials(crate::import::ImportArgs),
}

#[derive(Subcommand)]
pub enum RegistryKeyCommand {
    /// Create the next signing key, or keep the one already staged; prints its key id. Tokens
    /// are still signed with the current key; `registry-cert` now prints both certificates.
    Stage {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Sign with the staged key: it becomes current, and the current key becomes the previous
    /// one (replacing an older previous). Every `serve` picks it up within its
    /// --registry-key-refresh-seconds. Prints the new key id.
    Promote {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Drop the previous key from the bundle. Refused (exit status 1) while tokens it signed may
    /// still be accepted by the registry: for the longest registry token lifetime (24 h), plus
    /// the refresh interval, plus the registry's 60 s leeway past a token's `exp`, after the
    /// promotion; unless --force.
    RetirePrevious {
        /// Retire it now: registry tokens it signed are refused from the registry's next reload.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        refresh: RegistryKeyRefresh,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The signing keys by slot (current, next, previous) with their key ids and dates.
    Show {
        /// Print `{"current": {...}, "next": null, "previous": {...}}` instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `--registry-key-refresh-seconds`, shared by `serve` (how often it re-reads the signing key) and
/// `registry-key retire-previous` (how long a promotion may take to reach every `serve`).
#[derive(Args)]
pub struct RegistryKeyRefresh {
    /// Seconds between re-reads of the registry signing key by `serve`: how long a promotion takes
    /// to reach every replica.
    #[arg(
        id = "registry_key_refresh_seconds",
        long = "registry-key-refresh-seconds",
        value_name = "REGISTRY_KEY_REFRESH_SECONDS",
        env = "KEYPLANE_REGISTRY_KEY_REFRESH_SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    seconds: u64,
}

impl RegistryKeyRefresh {
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.seconds)
    }
}

/// The longest `serve --registry-token-ttl-seconds`: how long a token may be valid after it was
/// signed.
pub const MAX_REGISTRY_TOKEN_TTL_SECONDS: u64 = 86_400;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    #[command(flatten)]
    list: AuditListArgs,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the organization's hash chain: prints how many events it checked (and, when its
    /// start was pruned, up to which seq and the `audit.pruned` event that records it, or that
    /// none does: exit status 3), or the first event that was changed, deleted or reordered, or a
    /// chain head that does not match (exit status 1). The chain is not keyed: someone with write
    /// access who rewrites it whole from the first changed event to the head passes; compare with
    /// the `serve --audit-log` export: --against.
    Verify {
        #[arg(long, value_name = "ORG_ID", value_parser = parse_tenant)]
        org: TenantId,
        /// Also compare the chain with the trail `serve --audit-log` exported (JSON lines; one
        /// file or several, rotated logs in any order; `-` reads standard input). Tells a store
        /// that went back (restored from a backup, or failed over: it ends before the export, or
        /// holds other events from some seq on; the exported events it lost are listed; exit
        /// status 4) from exported events changed or moved in it (tampering; exit status 1).
        #[arg(long, value_name = "FILE", num_args = 1..)]
        against: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct AuditListArgs {
    /// The organization (tenant) id.
    #[arg(long, value_name = "ORG_ID", value_parser = parse_tenant)]
    org: Option<TenantId>,
    /// Only this action (`api_token.created`) or prefix (`api_token.*`); repeatable.
    #[arg(long, value_name = "ACTION")]
    action: Vec<String>,
    /// Only events by this credential or user.
    #[arg(long, value_name = "UUID")]
    actor_id: Option<String>,
    /// Only events about this resource.
    #[arg(long, value_name = "UUID")]
    target_id: Option<String>,
    /// `success` or `denied`.
    #[arg(long)]
    outcome: Option<String>,
    /// RFC 3339: events at or after it.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// RFC 3339: events before it.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Keep running and print new events as they commit.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    store: StoreArgs,
}

impl AuditListArgs {
    /// The same filters, and the same rules, as the API's query string.
    fn query(&self, org: TenantId) -> anyhow::Result<keyplane_store::AuditQuery> {
        let mut pairs: Vec<(String, String)> = self
            .action
            .iter()
            .map(|a| ("action".to_string(), a.clone()))
            .collect();
        for (name, value) in [
            ("actor_id", &self.actor_id),
            ("target_id", &self.target_id),
            ("outcome", &self.outcome),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if let Some(value) = value {
                pairs.push((name.to_string(), value.clone()));
            }
        }
        parse_audit_query(org, &pairs).map_err(|e| match e {
            keyplane_core::Error::Validation(fields) => anyhow::anyhow!(
                "{}",
                fields
                    .iter()
                    .map(|f| format!("--{}: {}", f.path.to_string().replace('_', "-"), f.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            other => anyhow::anyhow!("{other}"),
        })
    }
}

/// Events read per store query.
const AUDIT_PAGE: u32 = 100;
/// How often `--follow` looks for new events.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);

async fn print_audit(args: AuditListArgs) -> anyhow::Result<()> {
    let org = args
        .org
        .ok_or_else(|| anyhow::anyhow!("--org is required"))?;
    let mut query = args.query(org)?;
    let store = args.store.open_read_only().await?;
    // A deleted organization's trail and review stay readable (its tombstone).
    if store.get_tenant_record(org).await?.is_none() {
        anyhow::bail!("no organization with id {org}");
    }
    let mut out = std::io::stdout();
    let mut printed = Printed::new();
    let mut print =
        |events: &[keyplane_core::ChainedEvent], printed: &mut Printed| -> anyhow::Result<()> {
            use std::io::Write;
            for event in events {
                serde_json::to_writer(&mut out, &AuditEventView::from(event))?;
                writeln!(out)?;
            }
            out.flush()?;
            for event in events {
                printed.record(EventPosition::of(event.seq, &event.chain_hash));
            }
            Ok(())
        };
    query.limit = AUDIT_PAGE;
    if !args.follow {
        loop {
            let page = store.list_audit_events(&query).await?;
            print(&page, &mut printed)?;
            match page.last() {
                Some(last) if page.len() == AUDIT_PAGE as usize => {
                    query.order = AuditOrder::NewestBefore(Some(last.event.id))
                }
                _ => return Ok(()),
            }
        }
    }
    // Pages by seq, checking after each read that the trail still holds the newest event printed
    // (and, when not, which older one): a store restored from a backup under the follow reuses
    // the seqs of the events it lost, and those new events are printed, not skipped.
    loop {
        query.order = AuditOrder::OldestAfterSeq(printed.newest().seq);
        let page = store.list_audit_events(&query).await?;
        let positions = printed.positions();
        if let Some(diverged) = check_positions(store.as_ref(), org, &positions).await? {
            eprintln!(
                "{}",
                went_back_warning(
                    "admin audit",
                    diverged.diverged_seq,
                    diverged.head_seq,
                    diverged.resume_after.seq
                )
            );
            printed.went_back(diverged.resume_after);
            continue;
        }
        print(&page, &mut printed)?;
        if page.is_empty() {
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// Rows read per store query by `access-review`.
const REVIEW_PAGE: u32 = 500;

/// `admin access-review`: every credential of each kind, then every grant, one JSON line each,
/// read a page at a time.
async fn access_review(
    store: &StoreArgs,
    org: TenantId,
    include_revoked: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let store = store.open_read_only().await?;
    // A deleted organization's trail and review stay readable (its tombstone).
    if store.get_tenant_record(org).await?.is_none() {
        anyhow::bail!("no organization with id {org}");
    }
    let mut out = std::io::stdout().lock();
    for kind in [
        CredentialKind::ApiToken,
        CredentialKind::ServiceAccount,
        CredentialKind::RobotAccount,
    ] {
        let mut after = None;
        loop {
            let page = store
                .list_credentials(&keyplane_store::ListCredentials {
                    tenant_id: org,
                    kind,
                    after,
                    limit: Some(REVIEW_PAGE),
                    include_revoked,
                    expiring: None,
                    include_canaries: true,
                })
                .await?;
            for credential in &page {
                writeln!(out, "{}", reviewed_credential(credential))?;
            }
            match page.last() {
                Some(last) if page.len() == REVIEW_PAGE as usize => after = Some(last.id),
                _ => break,
            }
        }
    }
    let mut after = None;
    loop {
        let page = store
            .list_grants(&keyplane_store::GrantFilter {
                tenant_id: org,
                subject_type: None,
                subject_id: None,
                kind: None,
                capability_key: None,
                include_revoked,
                after,
                limit: Some(REVIEW_PAGE),
            })
            .await?;
        for grant in &page {
            writeln!(out, "{}", reviewed_grant(grant))?;
        }
        match page.last() {
            Some(last) if page.len() == REVIEW_PAGE as usize => after = Some(last.id),
            _ => break,
        }
    }
    out.flush()?;
    Ok(())
}

fn review_time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `{"actor": {"type", "id"}, "via", "os_user", "operator"}` (the actor as audit events show it),
/// or null when the row predates the record.
fn created_by_json(created_by: Option<&CreatedBy>) -> serde_json::Value {
    let Some(by) = created_by else {
        return serde_json::Value::Null;
    };
    let operator = by.operator.as_ref();
    serde_json::json!({
        "actor": {"type": by.actor_type.as_str(), "id": by.actor_id},
        "via": by.via.as_str(),
        "os_user": operator.map(|o| o.os_user.as_str()),
        "operator": operator.and_then(|o| o.name.as_deref()),
    })
}

fn reviewed_credential(credential: &Credential) -> serde_json::Value {
    let mut line = serde_json::json!({
        "type": credential.kind.as_str(),
        "id": credential.id.to_string(),
        "name": credential.name,
        "prefix": credential.display.prefix,
        "created_at": review_time(credential.created_at),
        "created_by": created_by_json(credential.created_by.as_ref()),
        "expires_at": credential.expires_at.map(review_time),
        "suspended_at": credential.suspended_at.map(review_time),
        "revoked_at": credential.revoked_at.map(review_time),
        "canary": credential.canary,
    });
    let rights = match credential.kind {
        CredentialKind::RobotAccount => (
            "permissions",
            credential
                .permissions
                .iter()
                .map(keyplane_core::RobotPermission::to_wire)
                .collect(),
        ),
        _ => ("scopes", credential.scopes.to_strings()),
    };
    line[rights.0] = serde_json::Value::from(rights.1);
    line
}

fn reviewed_grant(grant: &Grant) -> serde_json::Value {
    serde_json::json!({
        "type": "authorization",
        "id": grant.id.to_string(),
        "grant_kind": grant.kind.as_str(),
        "subject_type": grant.subject_type.as_str(),
        "subject_id": grant.subject_id,
        "capability_key": grant.capability_key.as_ref().map(|k| k.as_str()),
        "resource_type": grant.resource.resource_type,
        "resource_id": grant.resource.resource_id,
        "created_at": review_time(grant.created_at),
        "created_by": created_by_json(grant.created_by.as_ref()),
        "revoked_at": grant.revoked_at.map(review_time),
    })
}

/// Events read at once by `verify`.
const VERIFY_PAGE: u32 = 1000;

/// Recomputes the chain from its anchor up to the head read first (events committed meanwhile are
/// left for the next run). Returns how many events it checked, or the first break.
async fn verify_audit(
    store: &dyn keyplane_store::Store,
    org: TenantId,
) -> anyhow::Result<Result<u64, keyplane_core::audit::ChainBreak>> {
    verify_chain(store, org, VERIFY_PAGE).await
}

/// Whether the start of a chain was pruned, and what says so.
enum Pruning {
    /// Nothing was pruned: the chain starts at seq 1.
    Never,
    /// The `audit.pruned` event `by` vouches for the anchor (seq and hash) the pruning left.
    Recorded {
        anchor: keyplane_store::AuditChainState,
        by: Box<keyplane_core::ChainedEvent>,
    },
    /// Events up to the anchor are gone and no `audit.pruned` event says why.
    Unrecorded {
        anchor: keyplane_store::AuditChainState,
    },
}

/// Finds the `audit.pruned` event that vouches for the chain's anchor. Each pruning moves the
/// anchor and appends that event in one transaction, so it is the newest `audit.pruned` (and
/// after the anchor); a pruning between the two reads moves the anchor, and they are read again.
async fn pruning_record(
    store: &dyn keyplane_store::Store,
    org: TenantId,
) -> anyhow::Result<Pruning> {
    let mut state = store.audit_chain_state(org).await?;
    loop {
        if state.anchor_seq == 0 {
            return Ok(Pruning::Never);
        }
        let newest = keyplane_store::AuditQuery {
            order: AuditOrder::NewestBefore(None),
            actions: vec![actions::AUDIT_PRUNED.to_owned()],
            ..keyplane_store::AuditQuery::after_seq(org, 0, 1)
        };
        let by = store.list_audit_events(&newest).await?.into_iter().next();
        let vouches = |event: &keyplane_core::ChainedEvent| {
            let details = &event.event.details;
            event.seq > state.anchor_seq
                && details.get("through_seq") == Some(&DetailValue::Count(state.anchor_seq))
                && details.get("through_chain_hash")
                    == Some(&DetailValue::Text(keyplane_core::audit::hash_hex(
                        &state.anchor_hash,
                    )))
        };
        if let Some(by) = by.filter(|by| vouches(by)) {
            return Ok(Pruning::Recorded {
                anchor: state,
                by: Box::new(by),
            });
        }
        let again = store.audit_chain_state(org).await?;
        if again.anchor_seq == state.anchor_seq {
            return Ok(Pruning::Unrecorded { anchor: state });
        }
        state = again;
    }
}

/// What `verify` reads: a trait so that a test can prune between its reads.
trait ChainReader {
    async fn state(
        &self,
        org: TenantId,
    ) -> Result<keyplane_store::AuditChainState, keyplane_store::StoreError>;
    async fn events_after(
        &self,
        org: TenantId,
        seq: u64,
        limit: u32,
    ) -> Result<Vec<keyplane_core::ChainedEvent>, keyplane_store::StoreError>;
}

impl ChainReader for dyn keyplane_store::Store + '_ {
    async fn state(
        &self,
        org: TenantId,
    ) -> Result<keyplane_store::AuditChainState, keyplane_store::StoreError> {
        self.audit_chain_state(org).await
    }

    async fn events_after(
        &self,
        org: TenantId,
        seq: u64,
        limit: u32,
    ) -> Result<Vec<keyplane_core::ChainedEvent>, keyplane_store::StoreError> {
        self.list_audit_events(&keyplane_store::AuditQuery::after_seq(org, seq, limit))
            .await
    }
}

async fn verify_chain<R: ChainReader + ?Sized>(
    reader: &R,
    org: TenantId,
    page: u32,
) -> anyhow::Result<Result<u64, keyplane_core::audit::ChainBreak>> {
    let state = reader.state(org).await?;
    if !state.head_recorded {
        // Every event is appended under its tenant's head row, so events (or an anchor left by
        // pruning them) without one mean the row was deleted: nothing says where the chain ends.
        let any = !reader.events_after(org, 0, 1).await?.is_empty();
        if any || state.anchor_seq > 0 {
            return Ok(Err(keyplane_core::audit::ChainBreak::HeadMissing {
                anchor: state.anchor_seq,
            }));
        }
    }
    let mut verifier =
        keyplane_core::audit::ChainVerifier::from_anchor(state.anchor_seq, state.anchor_hash);
    let mut after = state.anchor_seq;
    'pages: loop {
        let events = reader.events_after(org, after, page).await?;
        let mut gap = None;
        for event in &events {
            if event.seq > state.head_seq {
                break;
            }
            match verifier.check(event) {
                Ok(()) => after = event.seq,
                Err(missing @ keyplane_core::audit::ChainBreak::Missing { .. }) => {
                    gap = Some(missing);
                    break;
                }
                Err(broken) => return Ok(Err(broken)),
            }
        }
        let read_to_head = after >= state.head_seq;
        // Past the head read first there are only events committed since (a pruning's
        // `audit.pruned` among them): the chain up to the head ends in this page.
        let page_ended =
            events.len() < page as usize || events.last().is_some_and(|e| e.seq > state.head_seq);
        if gap.is_none() && (read_to_head || !page_ended) {
            if read_to_head {
                break;
            }
            continue;
        }
        // A gap, or an end before the head: retention pruning may have deleted the events after
        // the last one checked while this read. If the anchor has moved past that event, the
        // missing ones are pruned, not removed: go on from the anchor.
        let now = reader.state(org).await?;
        if now.anchor_seq > after {
            verifier.resume_from_anchor(now.anchor_seq, now.anchor_hash);
            after = now.anchor_seq;
            continue 'pages;
        }
        if let Some(broken) = gap {
            return Ok(Err(broken));
        }
        break;
    }
    Ok(verifier.finish(state.head_seq, state.head_hash))
}

#[derive(Args)]
pub struct GrantArgs {
    /// The organization (tenant) id.
    #[arg(long, value_name = "ORG_ID", value_parser = parse_tenant)]
    org: TenantId,
    #[command(flatten)]
    user: GrantUser,
    /// The issuer of --user-sub, exactly as its tokens spell `iss`.
    #[arg(
        long,
        value_name = "URL",
        requires = "user_sub",
        conflicts_with = "user_id"
    )]
    issuer: Option<String>,
    /// The issuer whose canonical UUID `sub`s are user ids as they are: the same value as `serve
    /// --oidc-uuid-subjects`, so both derive the same user id from --user-sub.
    #[arg(long, env = "KEYPLANE_OIDC_UUID_SUBJECTS", value_name = "ISSUER")]
    oidc_uuid_subjects: Option<String>,
    #[command(flatten)]
    right: GrantRight,
    #[command(flatten)]
    store: StoreArgs,
}

/// Who receives the grant: one of the two.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct GrantUser {
    /// The user's `sub` at --issuer; its user id is derived as keyplane derives it from tokens.
    #[arg(long, value_name = "SUB", requires = "issuer")]
    user_sub: Option<String>,
    /// The user id itself (what `created_by_user_id` shows).
    #[arg(long, value_name = "UUID", value_parser = parse_user)]
    user_id: Option<UserId>,
}

/// What the grant gives: one of the two.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct GrantRight {
    /// Everything in the organization.
    #[arg(long)]
    account_owner: bool,
    /// One capability key, e.g. `auth.manage` or `api_tokens:write`.
    #[arg(long, value_name = "KEY")]
    capability: Option<String>,
}

pub(crate) fn parse_tenant(text: &str) -> Result<TenantId, String> {
    TenantId::parse(text).ok_or_else(|| "not a UUID".to_string())
}

fn parse_user(text: &str) -> Result<UserId, String> {
    UserId::parse(text).ok_or_else(|| "not a UUID".to_string())
}

impl GrantArgs {
    fn user(&self) -> UserId {
        match (&self.user.user_id, &self.user.user_sub, &self.issuer) {
            (Some(user), _, _) => *user,
            (None, Some(sub), Some(issuer)) => {
                keyplane_server::oidc::user_id(issuer, sub, self.oidc_uuid_subjects.as_deref())
            }
            // clap requires one of the two forms.
            _ => unreachable!("--user-id or --user-sub with --issuer"),
        }
    }

    fn new_grant(&self) -> anyhow::Result<NewGrant> {
        let (kind, capability_key) = match &self.right.capability {
            Some(key) => (
                GrantKind::Capability,
                Some(Scope::parse(key).map_err(|e| anyhow::anyhow!("--capability: {e}"))?),
            ),
            None => (GrantKind::AccountOwner, None),
        };
        Ok(NewGrant {
            kind,
            subject_type: SubjectType::User,
            subject_id: self.user().as_uuid(),
            capability_key,
            resource: GrantResource {
                resource_type: None,
                resource_id: None,
            },
        })
    }
}

/// The bootstrap document: the only place outside an HTTP response where a token is written out.
pub fn org_json(created: &ops::OrgCreated) -> String {
    serde_json::json!({
        "org_id": created.tenant.id.to_string(),
        "token": created.token.secret.expose_secret(),
    })
    .to_string()
}

/// `VAR=value` for a user name declared in the environment (`USER`, `LOGNAME`, `SUDO_USER`);
/// `None` when empty. Anyone can set these: a value that could disguise itself in a listing
/// (control, format or separator characters) or blur the `os_user` text it goes into (`(`, `)`,
/// `,`, `=`), or longer than any user name, is recorded as unreadable rather than as given.
fn declaration(var: &str, value: &str) -> Option<String> {
    const LONGEST_USER_NAME: usize = 256;
    if value.is_empty() {
        return None;
    }
    let readable = value.chars().count() <= LONGEST_USER_NAME
        && !value.chars().any(|c| {
            keyplane_core::validate::is_disguising(c) || matches!(c, '(' | ')' | ',' | '=')
        });
    Some(if readable {
        format!("{var}={value}")
    } else {
        format!("{var} unreadable")
    })
}

/// Who runs this command: the OS user of the process's real uid (its name; without a passwd entry,
/// as in containers run under an arbitrary uid, `uid N`, followed by `$USER` or `$LOGNAME` as
/// set, which anyone can set: `uid 1000680000 (USER=alice)`), with `$SUDO_USER` when set, since
/// under `sudo` the uid is root's: `root (SUDO_USER=alice)`. `SUDO_USER` is what sudo set, or
/// what the caller did: as self-declared as `USER`. And the name given with --operator.
fn operator(given: Option<String>) -> anyhow::Result<Operator> {
    let name = given
        .map(|raw| {
            keyplane_core::validate::name(keyplane_core::FieldPath::body("operator"), &raw)
                .map_err(|e| anyhow::anyhow!("--operator (KEYPLANE_OPERATOR): {}", e.message))
        })
        .transpose()?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let declared = |var: &str| declaration(var, &std::env::var(var).ok()?);
    let (os_user, mut declarations) = match user_name(uid) {
        Some(name) => (name, Vec::new()),
        None => (
            format!("uid {uid}"),
            ["USER", "LOGNAME"]
                .into_iter()
                .find_map(declared)
                .into_iter()
                .collect(),
        ),
    };
    declarations.extend(declared("SUDO_USER"));
    let os_user = if declarations.is_empty() {
        os_user
    } else {
        format!("{os_user} ({})", declarations.join(", "))
    };
    // Bounded as the event bounds it, so that the row and the event say the same.
    let os_user = os_user
        .chars()
        .take(keyplane_core::audit::MAX_CONTEXT_CHARS)
        .collect();
    Ok(Operator { os_user, name })
}

/// The name of `uid` in the user database, if it has one.
fn user_name(uid: libc::uid_t) -> Option<String> {
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids), filled in by getpwuid_r.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, the buffer's length is its own; the strings
    // `entry` points at live in `buffer`, read before it is dropped.
    let status = unsafe {
        libc::getpwuid_r(
            uid,
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() || entry.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r found an entry: `pw_name` is a NUL-terminated string in `buffer`.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
    name.to_str()
        .ok()
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let operator = operator(args.operator)?;
    match args.command {
        AdminCommand::CreateOrg(args) => crate::tenant_admin::create_org(args, &operator).await,
        AdminCommand::ListOrgs(args) => crate::tenant_admin::list_orgs(args).await,
        AdminCommand::IssueToken(args) => crate::tenant_admin::issue_token(args, &operator).await,
        AdminCommand::RegistryCert { store } => {
            let store = store.open_read_only().await?;
            let keys = signing_keys(store.as_ref(), "admin registry-cert", &operator).await?;
            for key in [keys.current, keys.next, keys.previous]
                .into_iter()
                .flatten()
            {
                print!("{}", key.certificate_pem);
            }
            Ok(())
        }
        AdminCommand::RegistryKey(command) => registry_key(command, &operator).await,
        AdminCommand::AccessReview {
            org,
            include_revoked,
            store,
        } => access_review(&store, org, include_revoked).await,
        AdminCommand::Migrate { store } => {
            let opened = store
                .open_with(keyplane_store::PendingMigrations::Apply)
                .await?;
            opened.store.close().await;
            println!("{}", migration_report(opened.migrated_from, opened.schema));
            Ok(())
        }
        AdminCommand::Grant(args) => {
            let grant = args.new_grant()?;
            let store = open_to_write(&args.store).await?;
            // The user as the operator named them: issuer and `sub` (with --user-sub).
            let subject = args.issuer.as_deref().zip(args.user.user_sub.as_deref());
            let grant = ops::grant_as_operator(store.as_ref(), args.org, grant, subject, &operator)
                .await
                .map_err(|e| match e {
                    keyplane_server::error::AppError::Domain(keyplane_core::Error::NotFound) => {
                        anyhow::anyhow!("no organization with id {}", args.org)
                    }
                    e => anyhow::anyhow!("cannot grant: {e}"),
                })?;
            println!(
                "{}",
                serde_json::to_string(&AuthorizationView::from(grant))?
            );
            Ok(())
        }
        AdminCommand::Audit(AuditArgs {
            command:
                Some(AuditCommand::Verify {
                    org,
                    against,
                    store,
                }),
            ..
        }) => {
            let store = store.open_read_only().await?;
            // A deleted organization's trail and review stay readable (its tombstone).
            let Some(record) = store.get_tenant_record(org).await? else {
                anyhow::bail!("no organization with id {org}");
            };
            match verify_audit(store.as_ref(), org).await? {
                Ok(checked) => {
                    match pruning_record(store.as_ref(), org).await? {
                        Pruning::Never => {
                            println!("audit chain of {org} intact: {checked} events checked")
                        }
                        Pruning::Recorded { anchor, by } => {
                            let detail = |key: &str| match by.event.details.get(key) {
                                Some(DetailValue::Text(text)) => text.clone(),
                                Some(DetailValue::Count(count)) => count.to_string(),
                                _ => "?".into(),
                            };
                            println!(
                                "audit chain of {org} intact: {checked} events checked after seq \
                                 {through}; events up to seq {through} were pruned by retention \
                                 (anchor {hash}), as the audit.pruned event {id} (seq {seq}, \
                                 {at}: retention {days} days, cutoff {cutoff}) records",
                                through = anchor.anchor_seq,
                                hash = keyplane_core::audit::hash_hex(&anchor.anchor_hash),
                                id = by.event.id,
                                seq = by.seq,
                                at = keyplane_core::audit::canonical_time(by.event.occurred_at),
                                days = detail("retention_days"),
                                cutoff = detail("cutoff"),
                            );
                        }
                        // Retention prunes a deleted organization's trail without an
                        // `audit.pruned`: its trail ends with `organization.deleted`.
                        Pruning::Unrecorded { anchor } if record.deleted_at.is_some() => {
                            println!(
                                "audit chain of {org} intact: {checked} events checked after seq \
                                 {through}; events up to seq {through} are gone (anchor {hash}): \
                                 the organization was deleted ({at}), and retention prunes a \
                                 deleted organization's trail without an audit.pruned event",
                                through = anchor.anchor_seq,
                                hash = keyplane_core::audit::hash_hex(&anchor.anchor_hash),
                                at = record
                                    .deleted_at
                                    .map(keyplane_core::audit::canonical_time)
                                    .unwrap_or_default(),
                            );
                        }
                        Pruning::Unrecorded { anchor } => {
                            println!(
                                "audit chain of {org}: {checked} events after seq {through} \
                                 intact, but events up to seq {through} are gone (anchor {hash}) \
                                 and no audit.pruned event records their pruning: deleted outside \
                                 retention with the anchor set to match, or pruned by a keyplane \
                                 from before pruning was recorded; compare with the \
                                 `serve --audit-log` export",
                                through = anchor.anchor_seq,
                                hash = keyplane_core::audit::hash_hex(&anchor.anchor_hash),
                            );
                            std::process::exit(UNRECORDED_PRUNING_EXIT);
                        }
                    }
                    if against.is_empty() {
                        eprintln!(
                            "note: the chain is not keyed: a rewrite of it whole, from the first changed event to the head, by someone with write access to the store passes; compare with the events `serve --audit-log` exported (--against)"
                        );
                        return Ok(());
                    }
                    let comparison =
                        crate::audit_against::compare(store.as_ref(), org, &against).await?;
                    if let Some(status) = comparison.report(org) {
                        std::process::exit(status);
                    }
                    Ok(())
                }
                Err(broken) => {
                    println!("audit chain of {org} broken: {broken}");
                    std::process::exit(1);
                }
            }
        }
        AdminCommand::Audit(AuditArgs { list, .. }) => print_audit(list).await,
        AdminCommand::RevokeOrg {
            org,
            reason,
            dry_run,
            json,
            store,
        } => revoke_org(&store, org, &reason, dry_run, json, &operator).await,
        AdminCommand::RestoreReplay(args) => crate::restore_replay::run(args, &operator).await,
        AdminCommand::DeleteOrg(args) => crate::delete_org::run(args, &operator).await,
        AdminCommand::ImportCredentials(args) => crate::import::run(args, &operator).await,
    }
}

/// The longest `--reason`: as much as the audit trail keeps of a request's context.
const MAX_REASON_CHARS: usize = keyplane_core::audit::MAX_CONTEXT_CHARS;

/// `--reason`: trimmed, not empty, at most [`MAX_REASON_CHARS`], with nothing that could disguise
/// it in a listing (the names' rule).
pub(crate) fn reason(raw: &str) -> anyhow::Result<String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        anyhow::bail!("--reason: must say why, with at least 1 character besides whitespace");
    }
    if trimmed.chars().count() > MAX_REASON_CHARS {
        anyhow::bail!("--reason: must have at most {MAX_REASON_CHARS} characters");
    }
    if trimmed.chars().any(keyplane_core::validate::is_disguising) {
        anyhow::bail!(
            "--reason: must not contain control, format (such as bidi override or zero-width) or \
             line separator characters"
        );
    }
    Ok(trimmed.to_owned())
}

/// `n thing` or `n things`.
pub(crate) fn counted(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `admin revoke-org`.
async fn revoke_org(
    store: &StoreArgs,
    org: TenantId,
    reason: &str,
    dry_run: bool,
    json: bool,
    operator: &Operator,
) -> anyhow::Result<()> {
    let reason = self::reason(reason)?;
    // A dry run only reads, and so must not migrate a shared store either.
    let store = if dry_run {
        store.open_read_only().await?
    } else {
        open_to_write(store).await?
    };
    let Some(tenant) = store.get_tenant(org).await? else {
        anyhow::bail!("no organization with id {org}");
    };
    let mut done = ops::OrgRevocation::default();
    let spec = ops::RevokeOrgSpec {
        via: ops::REVOKE_ORG_VIA,
        reason: &reason,
        operator,
        dry_run,
        canaries: false,
        user_and_group_grants: false,
        page_rows: ops::REVOKE_ORG_PAGE,
    };
    let outcome = ops::revoke_organization(store.as_ref(), org, &spec, &mut done).await;
    let kinds = |done: &ops::OrgRevocation| {
        format!(
            "{}, {} (with {} granted to them), {}",
            counted(done.api_tokens, "API token", "API tokens"),
            counted(done.service_accounts, "service account", "service accounts"),
            counted(
                done.service_account_grants,
                "authorization",
                "authorizations"
            ),
            counted(done.robot_accounts, "robot account", "robot accounts"),
        )
    };
    if let Err(e) = outcome {
        anyhow::bail!(
            "cannot revoke: {e}. Revoked so far in organization {org}: {}; run it again: it goes \
             on with what is still live",
            kinds(&done)
        );
    }
    if json {
        let counts = serde_json::json!({
            "api_token": done.api_tokens,
            "service_account": done.service_accounts,
            "robot_account": done.robot_accounts,
            "authorization": done.service_account_grants,
        });
        let mut answer = serde_json::json!({
            "org_id": org.to_string(),
            "dry_run": dry_run,
            "left": {
                "canary": done.canaries,
                "user_or_group_authorization": done.user_and_group_grants,
            },
        });
        // Named for what it is, so that no reader takes a dry run's counts for revocations.
        answer[if dry_run { "would_revoke" } else { "revoked" }] = counts;
        println!("{answer}");
    } else {
        let verb = if dry_run {
            "would revoke (dry run: nothing written)"
        } else {
            "revoked"
        };
        println!(
            "organization {org} ({}): {verb} {}",
            tenant.name,
            kinds(&done)
        );
        println!(
            "left: {} (armed: they never verify, and a use raises the alarm), {} (people who \
             sign in at the identity provider: `keyplane admin access-review --org {org}` lists \
             them; revoke them through the API)",
            counted(done.canaries, "canary", "canaries"),
            counted(
                done.user_and_group_grants,
                "user or group authorization",
                "user or group authorizations"
            ),
        );
    }
    for note in [
        "note: keyplane servers sharing this store refuse the revoked credentials at once on \
         PostgreSQL (each revocation notifies them); on SQLite within 30 s, the lifetime of a \
         running server's verification cache",
        "note: registry bearer tokens already issued to its robots stay valid until they expire: \
         at most the server's --registry-token-ttl-seconds after issue (300 s by default, 24 h \
         at most); the registry does not ask keyplane again",
        "note: services embedding keyplane-verifier refuse them within about a second while their \
         revocation stream is connected, and in every case within their max_staleness (30 s by \
         default); one following the stream with a token of this organization loses it, and \
         once stale refuses everything (FailClosed) or asks keyplane each time (Recheck)",
    ] {
        eprintln!("{note}");
    }
    if !done.settled {
        anyhow::bail!(
            "credentials were still being created in organization {org} after its last pass: \
             run it again, and look for what it does not revoke (a user or group authorization: \
             `keyplane admin access-review --org {org}`)"
        );
    }
    Ok(())
}

/// `admin audit verify`'s exit status for a chain intact after an anchor no `audit.pruned` event
/// records: neither 0 (a script checking only the status would call it intact) nor 1 (broken, and
/// every error).
const UNRECORDED_PRUNING_EXIT: i32 = 3;

/// What opening the store did to its schema, in words.
fn migration_report(migrated_from: Option<i64>, schema: i64) -> String {
    match migrated_from {
        None => format!("the store is at schema {schema}: nothing to migrate"),
        Some(0) => format!("created the store at schema {schema}"),
        Some(from) => format!("migrated the store from schema {from} to {schema}"),
    }
}

/// Opens the store for an admin command that writes: it needs the current schema, so it migrates
/// a store at an older one, and says so.
pub(crate) async fn open_to_write(
    store: &StoreArgs,
) -> anyhow::Result<std::sync::Arc<dyn keyplane_store::Store>> {
    let opened = store
        .open_with(keyplane_store::PendingMigrations::Apply)
        .await?;
    // A new store is created quietly, as ever.
    if opened.migrated_from.is_some_and(|from| from > 0) {
        eprintln!("{}", migration_report(opened.migrated_from, opened.schema));
    }
    Ok(opened.store)
}

/// Every signing key, creating the current one on first use (recorded `via` the command, run by
/// `operator`).
async fn signing_keys(
    store: &dyn keyplane_store::Store,
    via: &'static str,
    operator: &Operator,
) -> anyhow::Result<keyplane_store::SigningKeys> {
    let cannot =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot load the registry signing keys: {e}");
    keyplane_server::registry::load_or_create_signing_key(store, via, Some(operator))
        .await
        .map_err(|e| cannot(&e))?;
    store.signing_keys().await.map_err(|e| cannot(&e))
}

async fn registry_key(command: RegistryKeyCommand, operator: &Operator) -> anyhow::Result<()> {
    match command {
        RegistryKeyCommand::Stage { store } => {
            const VIA: &str = "admin registry-key stage";
            let store = open_to_write(&store).await?;
            signing_keys(store.as_ref(), VIA, operator).await?;
            let candidate = keyplane_server::registry::mint_candidate()
                .map_err(|e| anyhow::anyhow!("cannot create a signing key: {e}"))?;
            let recorded = ops::signing_key_event(
                actions::REGISTRY_SIGNING_KEY_STAGED,
                VIA,
                None,
                Some(operator),
            );
            let staged = store
                .stage_signing_key(&candidate, &recorded)
                .await
                .map_err(|e| anyhow::anyhow!("cannot stage a signing key: {e}"))?;
            println!("{}", staged.key_id);
            eprintln!(
                "staged; put `keyplane admin registry-cert` in the registry's rootcertbundle and \
                 reload the registry, then run `keyplane admin registry-key promote`"
            );
            Ok(())
        }
        RegistryKeyCommand::Promote { store } => {
            let store = open_to_write(&store).await?;
            let recorded = ops::signing_key_event(
                actions::REGISTRY_SIGNING_KEY_PROMOTED,
                "admin registry-key promote",
                None,
                Some(operator),
            );
            let promoted = store
                .promote_signing_key(ops::now(), &recorded)
                .await
                .map_err(|e| match e {
                    keyplane_store::StoreError::NotFound => anyhow::anyhow!(
                        "no key is staged: run `keyplane admin registry-key stage` first, and give \
                         the registry the new `registry-cert` bundle before promoting"
                    ),
                    e => anyhow::anyhow!("cannot promote the staged signing key: {e}"),
                })?;
            println!("{}", promoted.key_id);
            eprintln!(
                "promoted; every `serve` signs with it within its --registry-key-refresh-seconds. \
                 Keep the previous certificate in the registry's bundle until \
                 `keyplane admin registry-key retire-previous` accepts"
            );
            Ok(())
        }
        RegistryKeyCommand::RetirePrevious {
            force,
            refresh,
            store,
        } => {
            const VIA: &str = "admin registry-key retire-previous";
            let store = open_to_write(&store).await?;
            let Some(previous) = signing_keys(store.as_ref(), VIA, operator).await?.previous else {
                println!("no previous key: nothing to retire");
                return Ok(());
            };
            let now = ops::now();
            // A replica may sign with it until it reloads (the refresh interval after the
            // promotion), its token lives up to the longest TTL, and the registry accepts it for
            // its leeway past `exp`.
            let leeway = keyplane_server::registry::REGISTRY_EXP_LEEWAY_SECONDS.unsigned_abs();
            let accepted_until = previous.signed_until.unwrap_or(now)
                + refresh.interval()
                + std::time::Duration::from_secs(MAX_REGISTRY_TOKEN_TTL_SECONDS)
                + std::time::Duration::from_secs(leeway);
            if !force && now < accepted_until {
                anyhow::bail!(
                    "the registry may accept tokens signed by the previous key {} until {} (the \
                     promotion, plus --registry-key-refresh-seconds, the longest token lifetime \
                     of 24 h and the registry's {leeway} s leeway): retire it after that, or now \
                     with --force (robots holding such a token are refused until they log in \
                     again)",
                    previous.key_id,
                    accepted_until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
            }
            let recorded = ops::signing_key_event(
                actions::REGISTRY_SIGNING_KEY_RETIRED,
                VIA,
                Some(force),
                Some(operator),
            );
            let retired = store
                .retire_previous_signing_key(&previous.key_id, &recorded)
                .await
                .map_err(|e| anyhow::anyhow!("cannot retire the previous signing key: {e}"))?;
            if !retired {
                anyhow::bail!(
                    "the previous key changed meanwhile (another promotion): run it again"
                );
            }
            println!("{}", previous.key_id);
            eprintln!(
                "retired; put `keyplane admin registry-cert` in the registry's rootcertbundle"
            );
            Ok(())
        }
        RegistryKeyCommand::Show { json, store } => {
            let store = store.open_read_only().await?;
            let keys = signing_keys(store.as_ref(), "admin registry-key show", operator).await?;
            let slots = [
                ("current", keys.current),
                ("next", keys.next),
                ("previous", keys.previous),
            ];
            let at = |at: chrono::DateTime<chrono::Utc>| {
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            };
            if json {
                let view: serde_json::Map<String, serde_json::Value> = slots
                    .into_iter()
                    .map(|(slot, key)| {
                        let view = key.map(|key| {
                            serde_json::json!({
                                "key_id": key.key_id,
                                "created_at": at(key.created_at),
                                "signed_until": key.signed_until.map(at),
                            })
                        });
                        (slot.to_owned(), view.unwrap_or_default())
                    })
                    .collect();
                println!("{}", serde_json::Value::Object(view));
            } else {
                for (slot, key) in slots {
                    let Some(key) = key else { continue };
                    let until = key
                        .signed_until
                        .map(|until| format!("  signed until {}", at(until)))
                        .unwrap_or_default();
                    println!(
                        "{slot:<8}  {}  created {}{until}",
                        key.key_id,
                        at(key.created_at)
                    );
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyplane_store::testing::{Backend, TestDatabase};
    use keyplane_store::Store;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_declared_user_name_that_could_disguise_itself_is_recorded_as_unreadable() {
        assert_eq!(
            declaration("SUDO_USER", "alice").as_deref(),
            Some("SUDO_USER=alice")
        );
        assert_eq!(declaration("SUDO_USER", ""), None);
        for forged in [
            "alice), operator (bob",
            "eve\u{202e}ecila",
            "mallory\nfake line",
            "a=b",
        ] {
            assert_eq!(
                declaration("SUDO_USER", forged).as_deref(),
                Some("SUDO_USER unreadable"),
                "{forged:?}"
            );
        }
        assert_eq!(
            declaration("USER", &"x".repeat(257)).as_deref(),
            Some("USER unreadable")
        );
    }

    /// Reads the store, and after the first page of events prunes everything older than `before`,
    /// as the server's retention would while `verify` runs.
    struct PruningMidway<'a> {
        store: &'a dyn Store,
        before: chrono::DateTime<chrono::Utc>,
        pruned: AtomicBool,
    }

    impl ChainReader for PruningMidway<'_> {
        async fn state(
            &self,
            org: TenantId,
        ) -> Result<keyplane_store::AuditChainState, keyplane_store::StoreError> {
            self.store.state(org).await
        }

        async fn events_after(
            &self,
            org: TenantId,
            seq: u64,
            limit: u32,
        ) -> Result<Vec<keyplane_core::ChainedEvent>, keyplane_store::StoreError> {
            let page = self.store.events_after(org, seq, limit).await?;
            if !self.pruned.swap(true, Ordering::SeqCst) {
                let record = ops::audit_pruned(self.before, 400);
                while self
                    .store
                    .prune_audit_events(self.before, 2, None, &record)
                    .await?
                    > 0
                {}
            }
            Ok(page)
        }
    }

    /// `old` events older than the retention, then `young` ones, in a new tenant.
    async fn chain(store: &dyn Store, old: usize, young: usize) -> TenantId {
        let org = TenantId::new();
        let now = chrono::Utc::now();
        for i in 0..old + young {
            let at = if i < old {
                now - chrono::TimeDelta::days(500)
            } else {
                now
            };
            let event = keyplane_core::AuditEvent::new(
                uuid::Uuid::now_v7(),
                org,
                at,
                keyplane_core::audit::actions::API_TOKEN_CREATED,
                keyplane_core::AuditActor::system(),
                Default::default(),
            );
            store.append_audit_event(&event).await.unwrap();
        }
        org
    }

    /// Pruning between two pages of `verify` leaves a gap after what it checked (or nothing
    /// before the head): the chain goes on from the new anchor, and is intact.
    #[tokio::test]
    async fn verify_goes_on_from_an_anchor_pruning_moved() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let db = TestDatabase::new(backend).await;
            let store = keyplane_store::connect(&db.url).await.unwrap();
            let before = chrono::Utc::now() - chrono::TimeDelta::days(400);
            for (old, young, checked) in [(8, 4, 3 + 4), (6, 0, 3)] {
                let org = chain(store.as_ref(), old, young).await;
                let reader = PruningMidway {
                    store: store.as_ref(),
                    before,
                    pruned: AtomicBool::new(false),
                };
                let verified = verify_chain(&reader, org, 3).await.unwrap();
                assert_eq!(
                    verified,
                    Ok(checked),
                    "{backend:?}: {old} old, {young} young"
                );
                let state = store.audit_chain_state(org).await.unwrap();
                assert_eq!(state.anchor_seq, old as u64, "{backend:?}: pruned");
                // The last pruning's `audit.pruned` event vouches for the anchor it left.
                match pruning_record(store.as_ref(), org).await.unwrap() {
                    Pruning::Recorded { anchor, by } => {
                        assert_eq!(anchor.anchor_seq, old as u64);
                        assert!(by.seq > state.anchor_seq, "{backend:?}: after the anchor");
                    }
                    _ => panic!("{backend:?}: no audit.pruned event vouches for the anchor"),
                }
            }
        }
    }
}
