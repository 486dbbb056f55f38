//! `last_used_at`, coalesced: a use is an atomic store into the cached verification it hit, and a
//! credential joins the flush queue only on its first use since the last flush. Once per flush
//! period the queue reaches the store, in batches of at most [`FLUSH_CHUNK`] uses, never one write
//! per request, and the hot path touches no shared map.

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

/// At most this many uses per store write. A batch is built as it is written: a backlog (the store
/// writing slower than credentials are used) costs its queue, a pointer per credential, and not a
/// copy of every pending use at once, which with a million credentials was a spike of ~90 MiB
/// (BENCHMARKS.md, "Twelfth sitting").
const FLUSH_CHUNK: usize = 4096;

pub(crate) struct UsageRecorder {
    store: Arc<dyn Store>,
    queue: Mutex<Vec<Arc<Verified>>>,
    /// Uses per store write: [`FLUSH_CHUNK`], smaller in tests.
    chunk: usize,
    /// Held while a batch is written, so that a flush returns only once every use recorded before
    /// it is in the store, even when another flush had already taken part of the queue.
    flushing: tokio::sync::Mutex<()>,
}

impl UsageRecorder {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_chunk(store, FLUSH_CHUNK)
    }

    fn with_chunk(store: Arc<dyn Store>, chunk: usize) -> Self {
        Self {
            store,
            queue: Mutex::new(Vec::new()),
            chunk,
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// A use of `verified` at `at_micros` (microseconds since the Unix epoch).
    pub fn record(&self, verified: &Arc<Verified>, at_micros: i64) {
        let marker = &verified.last_use;
        // SeqCst, here and in `flush`: each side writes one field, then reads the other. With
        // weaker orders both reads may see the old values (the flush the old time, this the old
        // `queued`) and the use would be neither written nor queued. (On x86 these compile to
        // the same instructions as Relaxed; only the flush's store becomes an `xchg`.)
        marker.at_micros.fetch_max(at_micros, Ordering::SeqCst);
        // Read before swapping: the common case (already queued) stays a shared cache line.
        if !marker.queued.load(Ordering::SeqCst) && !marker.queued.swap(true, Ordering::AcqRel) {
            self.lock_queue().push(verified.clone());
        }
    }

    /// Writes every use queued. What it does not write (the store failed, or the flush was
    /// abandoned at its deadline: its future dropped) is queued again for the next.
    pub async fn flush(&self) {
        let _one_at_a_time = self.flushing.lock().await;
        let mut queued = std::mem::take(&mut *self.lock_queue());
        // In id order, which is creation order: consecutive updates find their rows on the same
        // store pages.
        queued.sort_unstable_by_key(|verified| verified.credential.id);
        let mut left = Unwritten {
            recorder: self,
            queued: &queued,
            written: 0,
            cleared: 0,
        };
        while left.written < queued.len() {
            let end = queued.len().min(left.written + self.chunk);
            let chunk = &queued[left.written..end];
            left.cleared = end;
            let batch: Vec<_> = chunk
                .iter()
                .filter_map(|verified| {
                    // Clear first: a use racing with this write re-queues itself.
                    verified.last_use.queued.store(false, Ordering::SeqCst);
                    let micros = verified.last_use.at_micros.load(Ordering::SeqCst);
                    DateTime::from_timestamp_micros(micros).map(|at| CredentialUse {
                        id: verified.credential.id,
                        at,
                        secret: verified.presented(),
                    })
                })
                .collect();
            if let Err(error) = self.store.record_last_used(&batch).await {
                tracing::warn!(error = %error, count = queued.len() - left.written, "could not record last_used_at; will retry");
                return;
            }
            left.written = end;
        }
    }

    /// Queues again what a failed flush did not write, keeping any newer uses: `failed`, whose
    /// markers that flush cleared (unless a use queued one again meanwhile), and `unread`, which
    /// are still marked queued.
    fn requeue(&self, failed: &[Arc<Verified>], unread: &[Arc<Verified>]) {
        let mut queue = self.lock_queue();
        for verified in failed {
            if !verified.last_use.queued.swap(true, Ordering::AcqRel) {
                queue.push(verified.clone());
            }
        }
        queue.extend_from_slice(unread);
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Verified>>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A flush's uses not written yet, queued again when it ends, however it ends: a flush abandoned
/// mid-write (dropped at its deadline, or at a stop) loses none. A batch whose write was
/// abandoned may have been made: written again, it sets the same times.
struct Unwritten<'a> {
    recorder: &'a UsageRecorder,
    queued: &'a [Arc<Verified>],
    /// `queued[..written]` is in the store.
    written: usize,
    /// `queued[written..cleared]`'s markers were cleared for the batch being written.
    cleared: usize,
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if self.written < self.queued.len() {
            let cleared = self.cleared.max(self.written);
            self.recorder
                .requeue(&self.queued[self.written..cleared], &self.queued[cleared..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tests::{sqlite_store, token};

    /// `count` API tokens of one organization, each verified once: their cache entries, with the
    /// app's own recorder flushed, so that no use is queued.
    async fn used(store: &Arc<dyn Store>, count: usize) -> (crate::App, Vec<Arc<Verified>>) {
        let tenant = crate::ops::create_org(store.as_ref(), "one", &crate::ops::tests_operator())
            .await
            .unwrap();
        let app = crate::App::new(store.clone(), crate::Config::default());
        let mut verified = Vec::new();
        for _ in 0..count {
            let secret = token(store.as_ref(), tenant.tenant.id, &["deploy"]).await;
            verified.push(app.verify_secret(secret.expose_secret()).await.unwrap());
        }
        app.flush_usage().await;
        (app, verified)
    }

    /// A recorder writing batches of two, holding a use of each of `verified` at one time.
    fn recording(
        store: &Arc<dyn Store>,
        verified: &[Arc<Verified>],
    ) -> (UsageRecorder, DateTime<chrono::Utc>) {
        let recorder = UsageRecorder::with_chunk(store.clone(), 2);
        let at = DateTime::from_timestamp(1_900_000_000, 0).unwrap();
        for entry in verified {
            recorder.record(entry, at.timestamp_micros());
        }
        (recorder, at)
    }

    /// Every one of `verified` stored as last used `at`.
    async fn assert_last_used(
        store: &Arc<dyn Store>,
        verified: &[Arc<Verified>],
        at: DateTime<chrono::Utc>,
    ) {
        for entry in verified {
            let identity = &entry.credential;
            let stored = store
                .get_credential(identity.tenant_id, identity.kind, identity.id)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(stored.last_used_at, Some(at), "{}", entry.credential.id);
        }
    }

    /// Seven uses in batches of two: four writes, the last one short, and every use recorded.
    #[tokio::test]
    async fn a_flush_writes_every_use_in_batches() {
        let (_dir, store) = sqlite_store().await;
        let (_app, verified) = used(&store, 7).await;
        let (recorder, at) = recording(&store, &verified);
        recorder.flush().await;
        assert!(recorder.lock_queue().is_empty());
        assert_last_used(&store, &verified, at).await;
    }

    /// A flush abandoned while its first batch waits for the store (as at its deadline) keeps
    /// every use queued, and the next flush writes them all.
    #[tokio::test]
    async fn an_abandoned_flush_keeps_every_use_queued() {
        use sqlx::{Connection, Executor};
        let (dir, store) = sqlite_store().await;
        let (_app, verified) = used(&store, 5).await;
        let (recorder, at) = recording(&store, &verified);
        // Another writer holds the database: the first batch waits.
        let url = keyplane_store::sqlite_url_for_data_dir(dir.path());
        let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
        holder.execute("BEGIN IMMEDIATE").await.unwrap();
        let abandoned =
            tokio::time::timeout(std::time::Duration::from_millis(200), recorder.flush()).await;
        assert!(abandoned.is_err(), "the flush was abandoned mid-write");
        let mut queued: Vec<_> = recorder
            .lock_queue()
            .iter()
            .map(|v| v.credential.id)
            .collect();
        queued.sort();
        let mut expected: Vec<_> = verified.iter().map(|v| v.credential.id).collect();
        expected.sort();
        assert_eq!(queued, expected);
        holder.execute("ROLLBACK").await.unwrap();
        holder.close().await.unwrap();
        recorder.flush().await;
        assert_last_used(&store, &verified, at).await;
    }

    /// A flush that cannot write keeps every use queued, the batch it tried and the ones after it,
    /// each once.
    #[tokio::test]
    async fn a_failed_flush_keeps_every_use_queued() {
        let (_dir, store) = sqlite_store().await;
        let (_app, verified) = used(&store, 5).await;
        let recorder = UsageRecorder::with_chunk(store.clone(), 2);
        for entry in &verified {
            recorder.record(entry, 1_900_000_000_000_000);
        }
        store.close().await;
        recorder.flush().await;
        let mut queued: Vec<_> = recorder
            .lock_queue()
            .iter()
            .map(|v| v.credential.id)
            .collect();
        queued.sort();
        let mut expected: Vec<_> = verified.iter().map(|v| v.credential.id).collect();
        expected.sort();
        assert_eq!(queued, expected);
        assert!(verified
            .iter()
            .all(|v| v.last_use.queued.load(Ordering::Acquire)));
    }
}
