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
                created_by_user_id: None,
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
