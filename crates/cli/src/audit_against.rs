//! `keyplane admin audit verify --against FILE`: the store's chain of an organization compared
//! with the trail `serve --audit-log` exported, which a restore from a backup does not take back.
//!
//! The chain alone is not keyed: a tail deleted with the head set back, or a rewrite with every
//! hash recomputed, verifies. The export tells. Each exported event is looked for at its seq in the
//! store, by id and chain hash; what the store does not hold is told apart:
//! - **went back**: from some seq on, the store holds none of the exported events (no event, or
//!   other ones, whose ids the export never had at another seq): what a restore from a backup, or
//!   a failover that lost the last commits, leaves (its new events take the seqs of lost ones);
//!   the newest events deleted with the head set back look the same, and are named as such too;
//! - **changed**: an exported event is in the store under the same id with another chain hash or
//!   at another seq: edited, or renumbered around a deleted event, whatever the hashes say.
//!
//! The exported file may hold both histories at the reused seqs (the export writes the new events
//! too): the lost ones are listed, the new ones are held.

use crate::restore_replay::{read_exported, Exported};
use keyplane_core::TenantId;
use keyplane_store::{AuditQuery, Store};
use std::collections::HashMap;
use uuid::Uuid;

/// Exit status when the store's chain went back behind the export (a restore, most likely).
pub const WENT_BACK_EXIT: i32 = 4;
/// Exit status when an exported event was changed or moved in the store (as for a broken chain).
pub const CHANGED_EXIT: i32 = 1;

/// Store events read at once.
const PAGE: u32 = 1000;

/// What the comparison found.
pub struct Comparison {
    /// Exported events compared with the store's.
    compared: u64,
    /// Exported events at or before the store's pruning anchor: gone from the store by retention.
    pruned: u64,
    /// The store's chain head, and the newest exported seq.
    store_head: u64,
    exported_head: u64,
    verdict: Verdict,
}

enum Verdict {
    Agree,
    /// The store holds no exported event at `from_seq` or after it but those of a new history;
    /// `lost` are the exported events it does not hold, oldest first.
    WentBack {
        from_seq: u64,
        lost: Vec<Exported>,
    },
    /// Exported events found in the store under their id but changed or moved: one line each.
    Changed(Vec<String>),
}

/// Compares the chain of `org` in `store` with the exported `files`.
pub async fn compare(
    store: &dyn Store,
    org: TenantId,
    files: &[String],
) -> anyhow::Result<Comparison> {
    let read = read_exported("--against", files, Some(org))?;
    let mut exported = read.by_org.into_values().next().unwrap_or_default();
    if exported.is_empty() {
        anyhow::bail!("--against: no audit event of {org} in {}", files.join(", "));
    }
    exported.sort_by_key(|e| (e.seq, e.id));
    let chain = store.audit_chain_state(org).await?;
    let hex = keyplane_core::audit::hash_hex;

    // The store's events from the oldest exported one it may hold to its head: by seq (to compare)
    // and by id (to find an exported event moved to another seq).
    let by_id: HashMap<Uuid, &Exported> = exported.iter().map(|e| (e.id, e)).collect();
    let mut at_seq: HashMap<u64, (Uuid, String)> = HashMap::new();
    let mut changed = Vec::new();
    let oldest = exported[0].seq.max(chain.anchor_seq + 1);
    let mut after = oldest - 1;
    while after < chain.head_seq {
        let page = store
            .list_audit_events(&AuditQuery::after_seq(org, after, PAGE))
            .await?;
        let Some(last) = page.last().map(|e| e.seq) else {
            break;
        };
        for stored in page.iter().filter(|e| e.seq <= chain.head_seq) {
            let hash = hex(&stored.chain_hash);
            if let Some(export) = by_id.get(&stored.event.id) {
                if export.seq != stored.seq || export.chain_hash != hash {
                    changed.push(format!(
                        "event {id} ({action}) is at seq {seq} in the store with chain hash \
                         {hash}; the export has it at seq {exported_seq} with chain hash \
                         {exported_hash}: changed or moved in the store",
                        id = stored.event.id,
                        action = stored.event.action,
                        seq = stored.seq,
                        exported_seq = export.seq,
                        exported_hash = export.chain_hash,
                    ));
                }
            }
            at_seq.insert(stored.seq, (stored.event.id, hash));
        }
        after = last;
    }

    let (mut compared, mut pruned) = (0, 0);
    let exported_head = exported.last().map_or(0, |e| e.seq);
    let mut lost = Vec::new();
    for event in exported {
        let held = if event.seq > chain.head_seq {
            false
        } else if event.seq > chain.anchor_seq {
            at_seq
                .get(&event.seq)
                .is_some_and(|(id, hash)| *id == event.id && *hash == event.chain_hash)
        } else if event.seq == chain.anchor_seq && chain.anchor_seq > 0 {
            event.chain_hash == hex(&chain.anchor_hash)
        } else {
            pruned += 1;
            continue;
        };
        compared += 1;
        if !held {
            lost.push(event);
        }
    }
    // A lost event before a held one is of another history than the store's (the held one's
    // chain hash covers every event before it), which the export also wrote: a store that went
    // back and grew again, exported on.
    let verdict = match lost.first() {
        _ if !changed.is_empty() => Verdict::Changed(changed),
        None => Verdict::Agree,
        Some(first) => Verdict::WentBack {
            from_seq: first.seq,
            lost,
        },
    };
    Ok(Comparison {
        compared,
        pruned,
        store_head: chain.head_seq,
        exported_head,
        verdict,
    })
}

impl Comparison {
    /// Prints what was found (stdout); the exit status it calls for, if not 0.
    pub fn report(&self, org: TenantId) -> Option<i32> {
        let pruned = match self.pruned {
            0 => String::new(),
            n => format!(" ({n} older ones pruned from the store by retention, not compared)"),
        };
        match &self.verdict {
            Verdict::Agree => {
                println!(
                    "audit chain of {org} holds the exported trail: {} exported events compared, \
                     up to seq {}{pruned}",
                    self.compared, self.exported_head
                );
                None
            }
            Verdict::Changed(lines) => {
                println!(
                    "audit chain of {org} disagrees with the exported trail: exported events were \
                     changed or moved in the store (tampering, or a deletion with the chain \
                     rewritten), not lost to a restore:"
                );
                for line in lines {
                    println!("  {line}");
                }
                Some(CHANGED_EXIT)
            }
            Verdict::WentBack { from_seq, lost } => {
                let how = if *from_seq > self.store_head {
                    format!(
                        "is behind the exported trail: it ends at seq {}, the export goes on to \
                         seq {}",
                        self.store_head, self.exported_head
                    )
                } else {
                    format!(
                        "diverged from the exported trail at seq {from_seq}: from there the store \
                         holds other events (up to its head, seq {}) than the {} exported ones",
                        self.store_head,
                        lost.len()
                    )
                };
                println!(
                    "audit chain of {org} {how}. The store went back, as a restore from a backup \
                     or a failover that lost its last commits leaves it (or its newest events \
                     were deleted with the head set back); `keyplane admin restore-replay` makes \
                     again what it can. The {} exported events the store does not hold:",
                    lost.len()
                );
                for event in lost {
                    let target = event
                        .target
                        .as_ref()
                        .map(|(kind, id)| format!(" {kind} {id}"))
                        .unwrap_or_default();
                    println!("  seq {} {} {}{target}", event.seq, event.id, event.action);
                }
                Some(WENT_BACK_EXIT)
            }
        }
    }
}
