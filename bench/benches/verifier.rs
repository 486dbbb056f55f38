//! keyplane-verifier in-process on a warm cache: the cost of `Verifier::verify` for a cached, live
//! API token (parse + CRC32 + the cache key + one clock read + one locked map lookup), no
//! HTTP: what a service embedding the verifier pays per request instead of a forward-auth hop.
//!
//! `KEYPLANE_BENCH_VERIFIER_TOKENS` (default 10,000) live credentials are imported into a SQLite
//! store served by keyplane on 127.0.0.1; the verifier follows its revocation stream and each
//! token is verified once (an introspection) to fill the cache before measuring.

use criterion::{criterion_group, criterion_main, Criterion};
use futures::stream::{self, StreamExt};
use keyplane_server::{ops, App, Config};
use keyplane_verifier::{Verifier, VerifierConfig};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// keyplane with `count` seeded tokens, and a verifier with all of them cached.
async fn warm_verifier(dir: &std::path::Path, count: usize) -> (Verifier, Vec<String>) {
    let store = keyplane_store::connect(&keyplane_store::sqlite_url_for_data_dir(dir))
        .await
        .unwrap();
    let org = ops::create_org(store.as_ref(), "bench", &keyplane_bench::operator())
        .await
        .unwrap();
    let (secrets, _) = keyplane_bench::seed_api_tokens(store.as_ref(), org.tenant.id, count)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = Config {
        rate_limit_per_minute: 0,
        ..Config::default()
    };
    tokio::spawn(keyplane_server::serve(
        listener,
        App::new(store, config),
        std::future::pending::<()>(),
    ));
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!(
            "{base}/api/v1/organizations/{}/api-tokens",
            org.tenant.id
        ))
        .bearer_auth(org.token.secret.expose_secret())
        .json(&serde_json::json!({"name": "verifier", "scopes": ["tokens:verify"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut config = VerifierConfig::new(base, created["token"].as_str().unwrap());
    config.max_entries = count + count / 10 + 16;
    config.cache_ttl = Duration::from_secs(3600);
    let verifier = Verifier::new(config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while verifier.is_stale() {
        assert!(
            Instant::now() < deadline,
            "the verifier did not reach the stream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tokens: Vec<String> = secrets
        .iter()
        .map(|s| s.expose_secret().to_string())
        .collect();
    let warmed: Vec<bool> = stream::iter(&tokens)
        .map(|token| {
            let verifier = &verifier;
            async move { verifier.verify(token).await.is_ok() }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(warmed.iter().all(|ok| *ok), "seeded tokens verify");
    (verifier, tokens)
}

fn verifier(c: &mut Criterion) {
    let count: usize = std::env::var("KEYPLANE_BENCH_VERIFIER_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // keyplane and the verifier's stream task live on their own thread, so heartbeats keep the
    // verifier fresh while the measuring thread never yields (a cache hit never waits).
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (verifier, tokens) = background.block_on(warm_verifier(dir.path(), count));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = verifier.metrics();

    let next = AtomicUsize::new(0);
    let mut group = c.benchmark_group("verifier");
    group.bench_function(format!("cached_api_token_{count}"), |b| {
        b.to_async(&runtime).iter(|| {
            // A stride through the whole set, so lookups do not stay in the CPU cache.
            let i = next.fetch_add(7919, Ordering::Relaxed) % tokens.len();
            let verifier = &verifier;
            let token = tokens[i].as_str();
            async move { black_box(verifier.verify(black_box(token)).await.is_ok()) }
        })
    });
    group.bench_function("reject_bad_checksum", |b| {
        let forged = format!("{}0000", &tokens[0][..tokens[0].len() - 4]);
        b.to_async(&runtime)
            .iter(|| async { black_box(verifier.verify(black_box(&forged)).await.is_err()) })
    });
    group.finish();
    let after = verifier.metrics();
    // Every measured verify was a cache hit: a refusal or an introspection would be another path.
    assert_eq!(after.introspections, before.introspections, "{after:?}");
    assert_eq!(after.refused, before.refused, "{after:?}");
    eprintln!(
        "verifier bench: {count} tokens cached, {} cache hits measured",
        after.cache_hits - before.cache_hits
    );
}

criterion_group!(benches, verifier);
criterion_main!(benches);
