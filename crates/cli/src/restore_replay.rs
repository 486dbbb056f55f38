//! `keyplane admin restore-replay`: after a restore from backup, makes again the revocations,
//! suspensions and retirements the restore undid, from the trail `serve --audit-log` exported.
//!
//! Which events the restore took is read from the store, not from a seq the operator gives: an
//! exported event is lost when its organization's chain in the store does not hold it (its seq is
//! past the store's head, or the store's event at that seq is another one). Seqs are per
//! organization and new events reuse the lost ones' seqs after the restart, so a comparison of
//! ids and chain hashes is what tells the two apart.

use crate::admin::counted;
use crate::StoreArgs;
use clap::Args;
use keyplane_api_types::audit::AuditEventView;
use keyplane_core::audit::{actions, DetailValue};
use keyplane_core::{CredentialKind, Operator, TenantId};
use keyplane_server::ops::{self, Replay, Replayed, RestoreReplayed};
use keyplane_store::{AuditOrder, AuditQuery, Store};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use uuid::Uuid;

#[derive(Args)]
pub struct RestoreReplayArgs {
    /// The trail `serve --audit-log` exported (JSON lines), as one file or several (rotated
    /// logs, in any order); `-` reads standard input. Lines that are not whole events (a write
    /// cut short) are skipped and counted; an event found twice counts once.
    #[arg(long = "audit-log", value_name = "FILE", required = true, num_args = 1..)]
    audit_logs: Vec<String>,
    /// Only this organization (tenant) id.
    #[arg(long, value_name = "ORG_ID", value_parser = crate::admin::parse_tenant)]
    org: Option<TenantId>,
    /// Say what would be done, and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// One JSON line per target instead of text (the summary goes to stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// The part of an exported event the replay (and `admin audit verify --against`) needs.
pub(crate) struct Exported {
    pub(crate) id: Uuid,
    pub(crate) seq: u64,
    pub(crate) action: String,
    pub(crate) target: Option<(String, Uuid)>,
    /// `credential.leaked`'s `response`.
    response: Option<String>,
    /// Lowercase hex.
    pub(crate) chain_hash: String,
}

/// What reading the exported files found.
#[derive(Default)]
pub(crate) struct Read {
    pub(crate) by_org: BTreeMap<TenantId, Vec<Exported>>,
    pub(crate) events: u64,
    pub(crate) torn: u64,
    duplicates: u64,
}

/// Reads every file given with `flag` (`--audit-log`, `--against`), keeping the events of `org`
/// (all without it), each id once.
pub(crate) fn read_exported(
    flag: &str,
    paths: &[String],
    org: Option<TenantId>,
) -> anyhow::Result<Read> {
    if paths.iter().filter(|p| *p == "-").count() > 1 {
        anyhow::bail!("{flag}: `-` (standard input) can be read only once");
    }
    let mut read = Read::default();
    let mut seen = HashSet::new();
    for path in paths {
        // A glob over the log's rotations (`audit.jsonl*`) also takes the export's own state.
        if path.ends_with(".heads") || path.ends_with(".heads.tmp") {
            eprintln!("note: skipped {path}: the export's record of what it wrote, not a log");
            continue;
        }
        let mut reader: Box<dyn BufRead> = if path == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            let file = std::fs::File::open(path)
                .map_err(|e| anyhow::anyhow!("{flag}: cannot read {path}: {e}"))?;
            Box::new(std::io::BufReader::new(file))
        };
        let starts = reader
            .fill_buf()
            .map_err(|e| anyhow::anyhow!("{flag}: cannot read {path}: {e}"))?;
        if starts.starts_with(&[0x1f, 0x8b]) {
            anyhow::bail!(
                "{flag}: {path} is compressed (gzip): pass it decompressed on standard input, \
                 `zcat {path} | keyplane admin … {flag} - …`"
            );
        }
        let (events, torn) = (read.events + read.duplicates, read.torn);
        read_lines(reader, flag, path, org, &mut seen, &mut read)?;
        // Cut writes are a line here and there: a file of nothing else is not an audit log, and
        // the revocations it was taken for would go unreplayed.
        if read.events + read.duplicates == events && read.torn > torn {
            anyhow::bail!(
                "{flag}: {path} holds no audit event, only {} that {} not one: is it an audit log?",
                counted(read.torn - torn, "line", "lines"),
                if read.torn - torn == 1 { "is" } else { "are" }
            );
        }
    }
    Ok(read)
}

fn read_lines(
    mut reader: impl BufRead,
    flag: &str,
    path: &str,
    org: Option<TenantId>,
    seen: &mut HashSet<Uuid>,
    read: &mut Read,
) -> anyhow::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bytes, not a String: a cut write may end inside a UTF-8 sequence.
        if reader
            .read_until(b'\n', &mut line)
            .map_err(|e| anyhow::anyhow!("{flag}: cannot read {path}: {e}"))?
            == 0
        {
            return Ok(());
        }
        if line.trim_ascii().is_empty() {
            continue;
        }
        let Ok(event) = serde_json::from_slice::<AuditEventView>(&line) else {
            read.torn += 1;
            continue;
        };
        let tenant = TenantId::from_uuid(event.org_id);
        if org.is_some_and(|org| org != tenant) {
            continue;
        }
        if !seen.insert(event.id) {
            read.duplicates += 1;
            continue;
        }
        read.events += 1;
        let response = event
            .details
            .get("response")
            .and_then(|r| r.as_str())
            .map(str::to_owned);
        read.by_org.entry(tenant).or_default().push(Exported {
            id: event.id,
            seq: event.seq,
            action: event.action,
            target: event.target.map(|t| (t.target_type, t.id)),
            response,
            chain_hash: event.chain_hash.to_ascii_lowercase(),
        });
    }
}

/// Store events read at once when comparing.
const PAGE: u32 = 500;

/// The events of `exported` (sorted by seq) the store's chain of `org` does not hold, and how
/// many could not be compared (at or before the store's pruning anchor, with no event left).
async fn lost_events(
    store: &dyn Store,
    org: TenantId,
    exported: Vec<Exported>,
) -> anyhow::Result<(Vec<Exported>, u64)> {
    let chain = store.audit_chain_state(org).await?;
    let hex = keyplane_core::audit::hash_hex;
    // The seqs the store may hold an event at, to read; past the head it holds none.
    let mut wanted: Vec<u64> = exported
        .iter()
        .map(|e| e.seq)
        .filter(|seq| *seq > chain.anchor_seq && *seq <= chain.head_seq)
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut held: HashMap<u64, (Uuid, String)> = HashMap::new();
    let mut next = 0;
    while let Some(&from) = wanted.get(next) {
        let page = store
            .list_audit_events(&AuditQuery::after_seq(org, from - 1, PAGE))
            .await?;
        let Some(last) = page.last().map(|e| e.seq) else {
            break;
        };
        for stored in page {
            if wanted.binary_search(&stored.seq).is_ok() {
                held.insert(stored.seq, (stored.event.id, hex(&stored.chain_hash)));
            }
        }
        while wanted.get(next).is_some_and(|seq| *seq <= last) {
            next += 1;
        }
    }
    let anchor_hash = hex(&chain.anchor_hash);
    let mut unchecked = 0;
    let mut lost = Vec::new();
    for event in exported {
        let is_held = if event.seq > chain.head_seq {
            false
        } else if event.seq > chain.anchor_seq {
            held.get(&event.seq)
                .is_some_and(|(id, hash)| *id == event.id && *hash == event.chain_hash)
        } else if event.seq == chain.anchor_seq && chain.anchor_seq > 0 {
            // Pruned, but the anchor keeps its hash: the same event, or another chain.
            event.chain_hash == anchor_hash
        } else {
            unchecked += 1;
            true
        };
        if !is_held {
            lost.push(event);
        }
    }
    lost.sort_by_key(|e| (e.seq, e.id));
    Ok((lost, unchecked))
}

/// What a lost event asks of its target.
enum Effect {
    Change(Change),
    /// A change to look at by hand.
    Report,
    /// No state to make again: refusals, sessions, notices, alarms already raised.
    Informational,
}

/// A change the replay makes again.
enum Change {
    Revoke(CredentialKind),
    Suspend(CredentialKind),
    Resume,
    Retire(CredentialKind),
    RevokeGrant,
}

/// Actions that change nothing a restore takes back that matters, or that keyplane makes again
/// by itself (expiry notices come again from the sweep).
const INFORMATIONAL: &[&str] = &[
    actions::ACCESS_DENIED,
    actions::CONSOLE_SESSION_STARTED,
    actions::CONSOLE_ORGANIZATION_SWITCHED,
    actions::CONSOLE_SESSION_ENDED,
    actions::CREDENTIAL_EXPIRING,
    actions::CREDENTIAL_EXPIRED,
    actions::CREDENTIAL_CANARY_TRIGGERED,
    actions::WEBHOOK_DELIVERY_RETRIED,
    actions::AUDIT_PRUNED,
    actions::AUDIT_RESTORED,
];

fn effect(event: &Exported) -> Effect {
    if INFORMATIONAL.contains(&event.action.as_str()) {
        return Effect::Informational;
    }
    let target_type = event.target.as_ref().map(|(t, _)| t.as_str());
    if event.action == actions::AUTHORIZATION_REVOKED && target_type == Some("authorization") {
        return Effect::Change(Change::RevokeGrant);
    }
    let Some(kind) = target_type.and_then(CredentialKind::parse) else {
        return Effect::Report;
    };
    if event.action == actions::CREDENTIAL_LEAKED {
        return match event.response.as_deref() {
            Some("revoked") => Effect::Change(Change::Revoke(kind)),
            Some("suspended") => Effect::Change(Change::Suspend(kind)),
            _ => Effect::Report,
        };
    }
    // `<kind>.<verb>` for the target's own kind only.
    let change = match event
        .action
        .strip_prefix(kind.as_str())
        .and_then(|a| a.strip_prefix('.'))
    {
        Some("revoked" | "rotated") => Change::Revoke(kind),
        Some("suspended") => Change::Suspend(kind),
        Some("resumed") => Change::Resume,
        Some("previous_secret_retired") => Change::Retire(kind),
        _ => return Effect::Report,
    };
    Effect::Change(change)
}

/// A lost event that decides what is done: its id, action and seq.
#[derive(Clone)]
struct Decider {
    id: Uuid,
    action: String,
    seq: u64,
}

impl From<&Exported> for Decider {
    fn from(event: &Exported) -> Self {
        Self {
            id: event.id,
            action: event.action.clone(),
            seq: event.seq,
        }
    }
}

/// One target's lost changes, folded in seq order into its final state.
#[derive(Default)]
struct Fold {
    revoke: Option<(Replay, Decider)>,
    /// The last suspension or resumption: `true` suspended.
    suspension: Option<(bool, Option<Replay>, Decider)>,
    retire: Option<(Replay, Decider)>,
}

/// One line of the answer.
struct Line {
    target: Option<(String, Uuid)>,
    from: Decider,
    did: &'static str,
}

fn did(replay: Replay, replayed: Replayed, dry_run: bool) -> &'static str {
    match (replayed, replay, dry_run) {
        (Replayed::Already, ..) => "already",
        (Replayed::NotFound, ..) => "not_found",
        (Replayed::Done, Replay::Revoke(_) | Replay::RevokeGrant, false) => "revoked",
        (Replayed::Done, Replay::Revoke(_) | Replay::RevokeGrant, true) => "would_revoke",
        (Replayed::Done, Replay::Suspend(_), false) => "suspended",
        (Replayed::Done, Replay::Suspend(_), true) => "would_suspend",
        (Replayed::Done, Replay::RetirePrevious(_), false) => "retired",
        (Replayed::Done, Replay::RetirePrevious(_), true) => "would_retire",
    }
}

/// Folds `lost` (seq order) per target, and makes each target's final state again.
async fn replay_org(
    store: &dyn Store,
    org: TenantId,
    lost: &[Exported],
    operator: &Operator,
    dry_run: bool,
    lines: &mut Vec<Line>,
    counts: &mut RestoreReplayed,
) -> anyhow::Result<()> {
    // Targets in the order of their first lost change.
    let mut order: Vec<(String, Uuid)> = Vec::new();
    let mut folds: HashMap<(String, Uuid), Fold> = HashMap::new();
    let mut reported = Vec::new();
    for event in lost {
        let (change, target) = match (effect(event), event.target.clone()) {
            (Effect::Informational, _) => continue,
            (Effect::Change(change), Some(target)) => (change, target),
            (Effect::Change(_) | Effect::Report, _) => {
                reported.push(event);
                continue;
            }
        };
        let fold = folds.entry(target.clone()).or_insert_with(|| {
            order.push(target);
            Fold::default()
        });
        let decider = Decider::from(event);
        match change {
            // Revocation is final: the first lost one decides.
            Change::Revoke(kind) => {
                fold.revoke.get_or_insert((Replay::Revoke(kind), decider));
            }
            Change::RevokeGrant => {
                fold.revoke.get_or_insert((Replay::RevokeGrant, decider));
            }
            Change::Suspend(kind) => {
                fold.suspension = Some((true, Some(Replay::Suspend(kind)), decider))
            }
            Change::Resume => fold.suspension = Some((false, None, decider)),
            Change::Retire(kind) => fold.retire = Some((Replay::RetirePrevious(kind), decider)),
        }
    }
    let start = lines.len();
    for target in order {
        let fold = &folds[&target];
        let mut todo = Vec::new();
        match &fold.revoke {
            Some(revoke) => todo.push(revoke.clone()),
            None => {
                match &fold.suspension {
                    Some((true, Some(suspend), decider)) => todo.push((*suspend, decider.clone())),
                    // Resumed after the backup: the restore may have brought back a suspension
                    // someone chose to end; resuming is theirs to do again.
                    Some((_, _, decider)) => {
                        counts.reported += 1;
                        lines.push(Line {
                            target: Some(target.clone()),
                            from: decider.clone(),
                            did: "reported",
                        });
                    }
                    None => {}
                }
                if let Some(retire) = &fold.retire {
                    todo.push(retire.clone());
                }
            }
        }
        for (replay, decider) in todo {
            let replayed = ops::replay_lost_change(
                store,
                org,
                target.1,
                replay,
                (decider.id, &decider.action),
                operator,
                dry_run,
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot make {} {} again (lost event {}): {e}",
                    decider.action,
                    target.1,
                    decider.id
                )
            })?;
            match (replayed, replay) {
                (Replayed::Already, _) => counts.already += 1,
                (Replayed::NotFound, _) => counts.not_found += 1,
                (Replayed::Done, Replay::Revoke(_) | Replay::RevokeGrant) => counts.revoked += 1,
                (Replayed::Done, Replay::Suspend(_)) => counts.suspended += 1,
                (Replayed::Done, Replay::RetirePrevious(_)) => counts.retired += 1,
            }
            lines.push(Line {
                target: Some(target.clone()),
                from: decider,
                did: did(replay, replayed, dry_run),
            });
        }
    }
    for event in reported {
        counts.reported += 1;
        lines.push(Line {
            target: event.target.clone(),
            from: Decider::from(event),
            did: "reported",
        });
    }
    // In seq order of what decided each line, as the trail reads.
    lines[start..].sort_by_key(|l| l.from.seq);
    Ok(())
}

/// Whether `org`'s trail holds an `audit.restored` for this very loss (a run before this one).
async fn loss_recorded(
    store: &dyn Store,
    org: TenantId,
    counts: &RestoreReplayed,
) -> anyhow::Result<bool> {
    let text = |value: Option<&DetailValue>| match value {
        Some(DetailValue::Text(text)) => Some(text.clone()),
        _ => None,
    };
    let mut query = AuditQuery::after_seq(org, 0, PAGE);
    query.order = AuditOrder::NewestBefore(None);
    query.actions = vec![actions::AUDIT_RESTORED.to_owned()];
    loop {
        let page = store.list_audit_events(&query).await?;
        if page.iter().any(|e| {
            text(e.event.details.get("lost_from_event_id"))
                == Some(counts.lost_from_event_id.to_string())
                && text(e.event.details.get("lost_through_event_id"))
                    == Some(counts.lost_through_event_id.to_string())
        }) {
            return Ok(true);
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => {
                query.order = AuditOrder::NewestBefore(Some(last.event.id))
            }
            _ => return Ok(false),
        }
    }
}

/// `admin restore-replay`.
pub async fn run(args: RestoreReplayArgs, operator: &Operator) -> anyhow::Result<()> {
    let read = read_exported("--audit-log", &args.audit_logs, args.org)?;
    // A dry run only reads, and so must not migrate a shared store either.
    let store = if args.dry_run {
        args.store.open_read_only().await?
    } else {
        crate::admin::open_to_write(&args.store).await?
    };
    if read.torn > 0 {
        eprintln!(
            "note: skipped {} that {} not a whole audit event (a write cut short?)",
            counted(read.torn, "line", "lines"),
            if read.torn == 1 { "is" } else { "are" }
        );
    }
    if read.duplicates > 0 {
        eprintln!(
            "note: {} found more than once (the export repeats what it wrote before a crash), counted once",
            counted(read.duplicates, "event", "events")
        );
    }
    if read.events == 0 {
        anyhow::bail!(
            "--audit-log: no audit event{} in {}",
            args.org
                .map(|org| format!(" of organization {org}"))
                .unwrap_or_default(),
            args.audit_logs.join(", ")
        );
    }
    let mut any_lost = false;
    let mut orgs = 0;
    let mut undeleted = 0;
    for (org, exported) in read.by_org {
        orgs += 1;
        let (lost, unchecked) = lost_events(store.as_ref(), org, exported).await?;
        if unchecked > 0 {
            eprintln!(
                "note: organization {org}: {} at or before the store's pruning anchor not compared (retention deleted the store's copy)",
                counted(unchecked, "exported event", "exported events")
            );
        }
        let (Some(first), Some(last)) = (lost.first(), lost.last()) else {
            continue;
        };
        any_lost = true;
        // Deleted after the backup: the restore brought it back whole, webhooks included, and
        // replaying its revocations would send them their events. Deleting it again comes first.
        if let Some(deleted) = lost
            .iter()
            .find(|event| event.action == actions::ORGANIZATION_DELETED)
        {
            let record = store.get_tenant_record(org).await?;
            let again = record.as_ref().is_some_and(|r| r.deleted_at.is_some());
            let line = Line {
                target: Some(("organization".to_owned(), org.as_uuid())),
                from: Decider::from(deleted),
                did: if again { "already" } else { "delete_again" },
            };
            print_lines(org, &[line], args.json);
            if !again {
                let name = record.map_or_else(|| "NAME".to_owned(), |r| r.tenant.name);
                eprintln!(
                    "error: organization {org} was deleted after the backup (lost {} {}, seq {}): \
                     nothing of it was made again; delete it again: keyplane admin delete-org \
                     --org {org} --confirm-name {name:?} --reason \"…\"",
                    deleted.action, deleted.id, deleted.seq
                );
                undeleted += 1;
            }
            continue;
        }
        let mut counts = RestoreReplayed {
            lost_from_seq: first.seq,
            lost_through_seq: last.seq,
            lost_from_event_id: first.id,
            lost_through_event_id: last.id,
            lost_events: lost.len() as u64,
            ..Default::default()
        };
        let tenant = store.get_tenant(org).await?;
        let mut lines = Vec::new();
        let outcome = replay_org(
            store.as_ref(),
            org,
            &lost,
            operator,
            args.dry_run,
            &mut lines,
            &mut counts,
        )
        .await;
        print_lines(org, &lines, args.json);
        if let Err(e) = outcome {
            anyhow::bail!("{e}. What was made again stays; run it again: it goes on with the rest");
        }
        let recorded = if tenant.is_some() && !args.dry_run {
            if loss_recorded(store.as_ref(), org, &counts).await? {
                false
            } else {
                ops::record_restore_replayed(store.as_ref(), org, &counts, operator)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot record audit.restored in {org}: {e}"))?;
                true
            }
        } else {
            false
        };
        let summary = summary(org, tenant.is_some(), &counts, args.dry_run, recorded);
        if args.json {
            eprintln!("{summary}");
        } else {
            println!("{summary}");
        }
    }
    if !any_lost {
        let summary = format!(
            "nothing lost: the store holds every exported event of {} ({} read)",
            counted(orgs, "organization", "organizations"),
            counted(read.events, "event", "events")
        );
        if args.json {
            eprintln!("{summary}");
        } else {
            println!("{summary}");
        }
    } else if !args.dry_run {
        eprintln!(
            "note: keyplane servers sharing this store refuse what was revoked or suspended at \
             once on PostgreSQL; on SQLite a running server within 30 s, its verification \
             cache's lifetime"
        );
    }
    if undeleted > 0 {
        anyhow::bail!(
            "{} deleted after the backup {} back: delete {} again (above), then run this again",
            counted(undeleted, "organization", "organizations"),
            if undeleted == 1 { "is" } else { "are" },
            if undeleted == 1 { "it" } else { "them" }
        );
    }
    Ok(())
}

fn print_lines(org: TenantId, lines: &[Line], json: bool) {
    for line in lines {
        if json {
            let target = line
                .target
                .as_ref()
                .map(|(kind, id)| serde_json::json!({"type": kind, "id": id.to_string()}));
            println!(
                "{}",
                serde_json::json!({
                    "org_id": org.to_string(),
                    "target": target,
                    "from_event": line.from.id.to_string(),
                    "action": line.from.action,
                    "seq": line.from.seq,
                    "did": line.did,
                })
            );
        } else {
            let target = line
                .target
                .as_ref()
                .map(|(kind, id)| format!("{kind} {id}"))
                .unwrap_or_else(|| "(no target)".into());
            let did = match line.did {
                "reported" => "review by hand:".to_owned(),
                "not_found" => "not in the store (created after the backup?):".to_owned(),
                "already" => "already done:".to_owned(),
                other => other.replace('_', " "),
            };
            println!(
                "{did} {target} (lost {} {}, seq {})",
                line.from.action, line.from.id, line.from.seq
            );
        }
    }
}

fn summary(
    org: TenantId,
    in_store: bool,
    counts: &RestoreReplayed,
    dry_run: bool,
    recorded: bool,
) -> String {
    let mut text = format!(
        "organization {org}: {} lost by the restore (seq {} to {}); ",
        counted(counts.lost_events, "event", "events"),
        counts.lost_from_seq,
        counts.lost_through_seq
    );
    let would = if dry_run { "would be " } else { "" };
    text += &format!(
        "{would}revoked {}, {would}suspended {}, previous secret {would}retired {}, already so {}, \
         not in the store {}, to review by hand {}",
        counts.revoked,
        counts.suspended,
        counts.retired,
        counts.already,
        counts.not_found,
        counts.reported
    );
    if !in_store {
        text += "; the organization is not in the store (created after the backup) or deleted in \
                 it: nothing to act on, and no audit.restored recorded";
    } else if dry_run {
        text += " (dry run: nothing written)";
    } else if recorded {
        text += "; recorded as audit.restored";
    } else {
        text += "; audit.restored recorded by an earlier run";
    }
    text
}
