//! Events the `--audit-log` export found gone from the store before it wrote them: the next event
//! it read for an organization was past the one after its cursor (retention on a replica without
//! this export, retention before the export existed, or an operator's delete). Neither the store
//! nor the log holds them any more; the export writes on from what is there, and says so.

use keyplane_core::TenantId;
use std::collections::BTreeMap;

/// The last gap found in one organization's chain, and how many events its gaps left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) tenant: TenantId,
    /// The export's cursor: every event up to it was written.
    pub(crate) exported_seq: u64,
    /// The first event the store still held after it.
    pub(crate) next_seq: u64,
    /// Events left out by every gap found in this organization's chain since the start.
    pub(crate) missing: u64,
    pub(crate) noticed_at: chrono::DateTime<chrono::Utc>,
}

/// What the export found missing since the start, for `/readyz`: kept until the process ends
/// (one entry per organization).
#[derive(Default)]
pub(crate) struct ExportGaps(std::sync::Mutex<BTreeMap<TenantId, Gap>>);

impl ExportGaps {
    /// Records the events between `exported_seq` and `next_seq` as missing; how many those are.
    pub(crate) fn record(
        &self,
        tenant: TenantId,
        exported_seq: u64,
        next_seq: u64,
        noticed_at: chrono::DateTime<chrono::Utc>,
    ) -> u64 {
        let missing = next_seq.saturating_sub(exported_seq).saturating_sub(1);
        let mut found = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = found.get(&tenant).map_or(0, |gap| gap.missing);
        found.insert(
            tenant,
            Gap {
                tenant,
                exported_seq,
                next_seq,
                missing: before.saturating_add(missing),
                noticed_at,
            },
        );
        missing
    }

    pub(crate) fn list(&self) -> Vec<Gap> {
        let found = self.0.lock().unwrap_or_else(|p| p.into_inner());
        found.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_add_up_per_organization() {
        let gaps = ExportGaps::default();
        let tenant = TenantId::from_uuid(uuid::Uuid::new_v4());
        let at = chrono::Utc::now();
        assert_eq!(gaps.record(tenant, 3, 10, at), 6);
        assert_eq!(gaps.record(tenant, 12, 14, at), 1);
        let list = gaps.list();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].exported_seq, list[0].next_seq, list[0].missing),
            (12, 14, 7)
        );
    }
}
