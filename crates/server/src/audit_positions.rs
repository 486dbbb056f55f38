//! Whether the store's audit chain still holds the events a reader of it had: the revocation
//! stream's resumption, and the `after` cursor of `GET .../audit-events` that `audit tail
//! --follow` and `admin audit --follow` page with.
//!
//! A restore from a backup or a failover that lost the last commits takes a tenant's chain back,
//! and its next events take the seqs of the lost ones: a reader that pages by seq alone skips
//! them. A reader that names the last event it had by seq and tag
//! ([`keyplane_core::audit_position::EventPosition`]) is told instead, with where to go on from:
//! the newest of the events it names that the chain still holds (each chain hash covers the whole
//! chain before it, so everything up to there is what it had), else the chain's anchor.

use keyplane_core::audit_position::EventPosition;
use keyplane_core::TenantId;
use keyplane_store::{AuditChainState, Store, StoreError};

/// How many positions a reader may name at once.
pub const MAX_POSITIONS: usize = 16;

/// The chain hash of the tenant's event at `seq` in the chain `state` describes; `None` when the
/// chain holds no event there (pruned, or past its head). Read from the store only for an event
/// strictly between the anchor and the head.
pub(crate) async fn chain_hash_at(
    store: &dyn Store,
    tenant: TenantId,
    state: &AuditChainState,
    seq: u64,
) -> Result<Option<[u8; 32]>, StoreError> {
    if seq == state.head_seq {
        return Ok(Some(state.head_hash));
    }
    if seq == state.anchor_seq {
        return Ok(Some(state.anchor_hash));
    }
    if seq < state.anchor_seq || seq > state.head_seq {
        return Ok(None);
    }
    // Pruned since `state` was read, or a chain gone back since: no event at `seq`.
    crate::audit::event_hash_at(store, tenant, seq).await
}

/// The chain no longer holds the newest event a reader named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diverged {
    /// The seq of that event: the store holds another event there, or none.
    pub diverged_seq: u64,
    /// The chain's head now.
    pub head_seq: u64,
    /// Where the reader goes on from: the newest event it named that the chain holds, else the
    /// chain's anchor (seq 0 before any pruning). Every event after it may be new to the reader.
    pub resume_after: EventPosition,
}

/// Checks the reader's `positions` (any order, at least one) against the tenant's chain now:
/// `None` while it holds the newest of them.
pub async fn check_positions(
    store: &dyn Store,
    tenant: TenantId,
    positions: &[EventPosition],
) -> Result<Option<Diverged>, StoreError> {
    let mut newest_first: Vec<&EventPosition> = positions.iter().collect();
    newest_first.sort_by_key(|position| std::cmp::Reverse(position.seq));
    let Some(&newest) = newest_first.first() else {
        return Ok(None);
    };
    // The chain's start: a reader that had no event yet misses none, pruned or not.
    if newest.seq == 0 && newest.names(&keyplane_core::audit::GENESIS) {
        return Ok(None);
    }
    let state = store.audit_chain_state(tenant).await?;
    let held = |hash: Option<[u8; 32]>, position: &EventPosition| {
        hash.is_some_and(|hash| position.names(&hash))
    };
    if held(
        chain_hash_at(store, tenant, &state, newest.seq).await?,
        newest,
    ) {
        return Ok(None);
    }
    let mut resume_after = EventPosition::of(state.anchor_seq, &state.anchor_hash);
    for &older in newest_first.iter().skip(1) {
        if older.seq < state.anchor_seq {
            break;
        }
        if held(
            chain_hash_at(store, tenant, &state, older.seq).await?,
            older,
        ) {
            resume_after = older.clone();
            break;
        }
    }
    Ok(Some(Diverged {
        diverged_seq: newest.seq,
        head_seq: state.head_seq,
        resume_after,
    }))
}
