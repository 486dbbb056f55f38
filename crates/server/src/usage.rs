//! `last_used_at`, coalesced: a use is an atomic store into the cached verification it hit, and a
//! credential joins the flush queue only on its first use since the last flush. One batch per flush
//! period reaches the store, never one write per request, and the hot path touches no shared map.

use crate::auth::Verified;
use chrono::DateTime;
use keyplane_store::{CredentialUse, Store};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// The per-credential use marker, part of each cached verification.
#[derive(Default)]
pub(crate) struct LastUse {
    /// Microseconds since the epoch of the latest use; 0 = none yet.
    at_micros: AtomicI64,
    queued: AtomicBool,
}

pub(crate) struct UsageRecorder {
    store: Arc<dyn Store>,
    queue: Mutex<Vec<Arc<Verified>>>,
    /// Held while a batch is written, so that a flush returns only once every use recorded before
    /// it is in the store, even when another flush had already taken part of the queue.
    flushing: tokio::sync::Mutex<()>,
}

impl UsageRecorder {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            queue: Mutex::new(Vec::new()),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// A use of `verified` at `at_micros` (microseconds since the Unix epoch).
    pub fn record(&self, verified: &Arc<Verified>, at_micros: i64) {
        let marker = &verified.last_use;
        marker.at_micros.fetch_max(at_micros, Ordering::Relaxed);
        // Read before swapping: the common case (already queued) stays a shared cache line.
        if !marker.queued.load(Ordering::Relaxed) && !marker.queued.swap(true, Ordering::AcqRel) {
            self.queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(verified.clone());
        }
    }

    pub async fn flush(&self) {
        let _one_at_a_time = self.flushing.lock().await;
        let queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        if queued.is_empty() {
            return;
        }
        let batch: Vec<_> = queued
            .iter()
            .filter_map(|verified| {
                // Clear first: a use racing with this flush re-queues itself.
                verified.last_use.queued.store(false, Ordering::Release);
                let micros = verified.last_use.at_micros.load(Ordering::Relaxed);
                DateTime::from_timestamp_micros(micros).map(|at| CredentialUse {
                    id: verified.credential.id,
                    at,
                    previous_secret: verified.previous_hash(),
                })
            })
            .collect();
        if let Err(error) = self.store.record_last_used(&batch).await {
            // Requeue so the next flush retries, keeping any newer uses.
            tracing::warn!(error = %error, count = batch.len(), "could not record last_used_at; will retry");
            for verified in queued {
                if !verified.last_use.queued.swap(true, Ordering::AcqRel) {
                    self.queue
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(verified);
                }
            }
        }
    }
}
