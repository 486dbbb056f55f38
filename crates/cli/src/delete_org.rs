//! `keyplane admin delete-org`: offboarding an organization (a churned customer, an erasure
//! request) for good, in phases each safe to run again (`ops::delete_organization`).

use crate::admin::{counted, open_to_write, parse_tenant, reason};
use crate::StoreArgs;
use clap::Args;
use keyplane_core::{Operator, TenantId};
use keyplane_server::ops;

/// The exit status for a `--confirm-name` that is not the organization's: neither 0 nor 1
/// (every other error), so a script can tell a wrong id or name from a failed deletion.
const NAME_MISMATCH_EXIT: i32 = 2;

#[derive(Args)]
pub struct DeleteOrgArgs {
    /// The organization (tenant) id.
    #[arg(long, value_name = "ORG_ID", value_parser = parse_tenant)]
    org: TenantId,
    /// Why, recorded on every event it writes (e.g. the ticket of the offboarding or erasure
    /// request).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// The organization's name, exactly: a guard against deleting the wrong id.
    #[arg(long, value_name = "NAME")]
    confirm_name: String,
    /// Count what it would revoke and delete, and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print what it did as one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

pub async fn run(args: DeleteOrgArgs, operator: &Operator) -> anyhow::Result<()> {
    let reason = reason(&args.reason)?;
    // A dry run only reads, and so must not migrate a shared store either.
    let store = if args.dry_run {
        args.store.open_read_only().await?
    } else {
        open_to_write(&args.store).await?
    };
    let org = args.org;
    let Some(record) = store.get_tenant_record(org).await? else {
        anyhow::bail!("no organization with id {org}");
    };
    if record.tenant.name != args.confirm_name {
        eprintln!(
            "error: --confirm-name does not match: organization {org} is named {:?}, not {:?}; \
             nothing was changed",
            record.tenant.name, args.confirm_name
        );
        std::process::exit(NAME_MISMATCH_EXIT);
    }
    if let Some(deleted_at) = record.deleted_at {
        let at = keyplane_core::audit::canonical_time(deleted_at);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "org_id": org.to_string(),
                    "name": record.tenant.name,
                    "deleted_at": at,
                    "already_deleted": true,
                })
            );
        } else {
            println!(
                "organization {org} ({}) was deleted at {at}; `keyplane admin audit --org {org}` \
                 shows its organization.deleted event",
                record.tenant.name
            );
        }
        return Ok(());
    }
    let mut done = ops::OrgDeletion::default();
    let outcome = ops::delete_organization(
        store.as_ref(),
        org,
        &reason,
        operator,
        args.dry_run,
        &mut done,
    )
    .await;
    if let Err(e) = outcome {
        anyhow::bail!(
            "cannot delete organization {org}: {e}. Nothing is lost: what it revoked or deleted \
             so far stays so; run it again to go on"
        );
    }
    let revoked = serde_json::json!({
        "api_token": done.revoked.api_tokens,
        "service_account": done.revoked.service_accounts,
        "robot_account": done.revoked.robot_accounts,
        "canary": done.revoked.canaries,
        "authorization": done.revoked.service_account_grants
            + done.revoked.user_and_group_grants,
    });
    let deleted = serde_json::json!({
        "credential": done.deleted.credentials,
        "authorization": done.deleted.grants,
        "webhook": done.deleted.webhooks,
        "console_session": done.deleted.console_sessions,
        "idempotency_record": done.deleted.idempotency_records,
        "credential_policy": done.deleted.credential_policies,
    });
    if args.json {
        let mut answer = serde_json::json!({
            "org_id": org.to_string(),
            "name": record.tenant.name,
            "dry_run": args.dry_run,
            "kept": {
                "audit_events": done.deleted.audit_events,
                "registry_project": done.registry_project,
            },
        });
        // Named for what they are, so that no reader takes a dry run's counts for changes.
        let (revoked_key, deleted_key) = if args.dry_run {
            ("would_revoke", "would_delete")
        } else {
            ("revoked", "deleted")
        };
        answer[revoked_key] = revoked;
        answer[deleted_key] = deleted;
        println!("{answer}");
    } else {
        let (revoked_verb, deleted_verb) = if args.dry_run {
            ("would revoke", "would delete (dry run: nothing written)")
        } else {
            ("revoked", "deleted")
        };
        let d = &done.deleted;
        println!(
            "organization {org} ({}): {revoked_verb} {}, {}, {}, {}, {}; {deleted_verb} {}, {}, \
             {}, {}, {}, {}; kept {} (until audit retention prunes them)",
            record.tenant.name,
            counted(done.revoked.api_tokens, "API token", "API tokens"),
            counted(
                done.revoked.service_accounts,
                "service account",
                "service accounts"
            ),
            counted(
                done.revoked.robot_accounts,
                "robot account",
                "robot accounts"
            ),
            counted(done.revoked.canaries, "canary", "canaries"),
            counted(
                done.revoked.service_account_grants + done.revoked.user_and_group_grants,
                "authorization",
                "authorizations"
            ),
            counted(d.credentials, "credential", "credentials"),
            counted(d.grants, "authorization", "authorizations"),
            counted(d.webhooks, "webhook", "webhooks"),
            counted(d.console_sessions, "console session", "console sessions"),
            counted(
                d.idempotency_records,
                "idempotency record",
                "idempotency records"
            ),
            counted(
                d.credential_policies,
                "credential policy",
                "credential policies"
            ),
            counted(d.audit_events, "audit event", "audit events"),
        );
    }
    if let Some(project) = &done.registry_project {
        eprintln!(
            "note: the registry project {project:?} stays reserved (no other organization gets \
             its name), but keyplane does not hold its images: delete the registry's storage \
             under `{project}/*` yourself"
        );
    }
    if !args.dry_run {
        eprintln!(
            "note: keyplane servers sharing this store refuse the organization's credentials at \
             once on PostgreSQL; on SQLite within 30 s (a running server's verification cache); \
             registry bearer tokens already issued stay valid until they expire (at most \
             --registry-token-ttl-seconds)"
        );
    }
    Ok(())
}
