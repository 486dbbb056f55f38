//! `last_used_at`, coalesced: uses are remembered in memory and written in one batch per flush
//! period, never one store write per request.

use chrono::{DateTime, Utc};
use keyplane_core::CredentialId;
use keyplane_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub(crate) struct UsageRecorder {
    store: Arc<dyn Store>,
    pending: Mutex<HashMap<CredentialId, DateTime<Utc>>>,
}

impl UsageRecorder {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub fn record(&self, id: CredentialId, at: DateTime<Utc>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let entry = pending.entry(id).or_insert(at);
        if *entry < at {
            *entry = at;
        }
    }

    pub async fn flush(&self) {
        let batch: Vec<_> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().collect()
        };
        if batch.is_empty() {
            return;
        }
        if let Err(error) = self.store.record_last_used(&batch).await {
            // Put the batch back so the next flush retries it, without overwriting newer uses.
            tracing::warn!(error = %error, count = batch.len(), "could not record last_used_at; will retry");
            for (id, at) in batch {
                self.record(id, at);
            }
        }
    }
}
