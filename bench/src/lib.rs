//! Shared helpers for keyplane's benchmarks.

use keyplane_core::{CredentialKind, NewCredential, Plaintext, ScopeSet, TenantId};
use keyplane_store::Store;
use rand::rngs::OsRng;

/// Mints `count` API tokens in `tenant` and imports them in batches; returns their plaintexts and
/// the time spent in the store (the rest is minting: random secrets and their hashes).
pub async fn seed_api_tokens(
    store: &dyn Store,
    tenant: TenantId,
    count: usize,
) -> anyhow::Result<(Vec<Plaintext>, std::time::Duration)> {
    const BATCH: usize = 50_000;
    let now = keyplane_server::ops::now();
    let scopes = ScopeSet::parse_list(
        &keyplane_core::FieldPath::body("scopes"),
        &["deploy".to_string()],
    )
    .map_err(|_| anyhow::anyhow!("bad scope"))?;
    let mut secrets = Vec::with_capacity(count);
    let mut in_store = std::time::Duration::ZERO;
    let mut start = 0;
    while start < count {
        let end = (start + BATCH).min(count);
        let mut batch = Vec::with_capacity(end - start);
        for i in start..end {
            let (credential, secret) = NewCredential {
                tenant_id: tenant,
                kind: CredentialKind::ApiToken,
                name: format!("seed-{i}"),
                scopes: scopes.clone(),
                permissions: Vec::new(),
                expires_at: None,
                created_by: keyplane_core::CreatedBy::system(keyplane_core::Channel::Admin),
                canary: false,
            }
            .issue(now, &mut OsRng);
            batch.push(credential);
            secrets.push(secret);
        }
        let event = keyplane_server::ops::import_event(
            tenant,
            CredentialKind::ApiToken,
            batch.len() as u64,
            "bench",
            None,
        );
        let importing = std::time::Instant::now();
        store
            .import_credentials(&batch, std::slice::from_ref(&event))
            .await?;
        in_store += importing.elapsed();
        start = end;
    }
    Ok((secrets, in_store))
}

/// Percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latencies of a long run without keeping every sample: nanosecond buckets below
/// [`Histogram::FINE_NS`] (where a cache hit falls), the rare slower samples kept as they are.
pub struct Histogram {
    fine: Vec<u64>,
    slow: Vec<std::time::Duration>,
    count: u64,
    max: std::time::Duration,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            fine: vec![0; Self::FINE_NS as usize],
            slow: Vec::new(),
            count: 0,
            max: std::time::Duration::ZERO,
        }
    }
}

impl Histogram {
    pub const FINE_NS: u64 = 65_536;

    pub fn record(&mut self, took: std::time::Duration) {
        self.count += 1;
        self.max = self.max.max(took);
        match u64::try_from(took.as_nanos()) {
            Ok(ns) if ns < Self::FINE_NS => self.fine[ns as usize] += 1,
            _ => self.slow.push(took),
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds `other`'s samples, as if they had been recorded here.
    pub fn merge(&mut self, other: Histogram) {
        self.count += other.count;
        self.max = self.max.max(other.max);
        for (mine, theirs) in self.fine.iter_mut().zip(other.fine) {
            *mine += theirs;
        }
        self.slow.extend(other.slow);
    }

    pub fn max(&self) -> std::time::Duration {
        self.max
    }

    /// Nearest rank, as [`percentile`].
    pub fn percentile(&mut self, p: f64) -> std::time::Duration {
        if self.count == 0 {
            return std::time::Duration::ZERO;
        }
        let rank = (((p / 100.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (ns, n) in self.fine.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return std::time::Duration::from_nanos(ns as u64);
            }
        }
        self.slow.sort_unstable();
        self.slow[(rank - seen - 1) as usize]
    }
}

/// Who the benchmarks' organizations are created by (`ops::create_org` records its operator).
pub fn operator() -> keyplane_core::Operator {
    keyplane_core::Operator {
        os_user: "bench".into(),
        name: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_percentiles_match_the_sorted_samples() {
        let mut samples: Vec<Duration> = (0..10_000u64)
            .map(|i| Duration::from_nanos((i * 7919) % 90_000 + 1))
            .collect();
        let mut histogram = Histogram::default();
        for sample in &samples {
            histogram.record(*sample);
        }
        samples.sort();
        for p in [0.0, 1.0, 50.0, 72.5, 99.0, 99.9, 100.0] {
            assert_eq!(histogram.percentile(p), percentile(&samples, p), "p{p}");
        }
        assert_eq!(histogram.count(), 10_000);
        assert_eq!(histogram.max(), *samples.last().unwrap());
        assert_eq!(Histogram::default().percentile(50.0), Duration::ZERO);
    }

    #[test]
    fn merged_histograms_match_all_their_samples() {
        let samples: Vec<Duration> = (0..10_000u64)
            .map(|i| Duration::from_nanos((i * 7919) % 90_000 + 1))
            .collect();
        // Three threads' histograms, split unevenly, both sides of the fine range in each.
        let mut parts = [
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        ];
        for (i, sample) in samples.iter().enumerate() {
            parts[i % 5 % 3].record(*sample);
        }
        let mut merged = Histogram::default();
        for part in parts {
            merged.merge(part);
        }
        let mut sorted = samples.clone();
        sorted.sort();
        for p in [0.0, 50.0, 99.0, 99.9, 100.0] {
            assert_eq!(merged.percentile(p), percentile(&sorted, p), "p{p}");
        }
        assert_eq!(merged.count(), 10_000);
        assert_eq!(merged.max(), *sorted.last().unwrap());
    }
}
