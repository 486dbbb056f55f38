//! In-process verification with a large cache: the cost of `App::verify_secret` for a live, cached
//! API token (parse + CRC32 + SHA-256 + cache lookup + expiry + usage record), no HTTP.
//!
//! `KEYPLANE_BENCH_CREDENTIALS` (default 1,000,000) live credentials are imported into a SQLite
//! store and each is verified once to fill the cache before measuring.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use keyplane_server::auth::CacheConfig;
use keyplane_server::{ops, App, Config};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The server's allocator: where the cache's entries live, and how (mimalloc's arenas, huge pages
/// and all), is part of what a verification costs.
#[global_allocator]
static ALLOCATOR: keyplane_server::allocator::Allocator = keyplane_server::allocator::Allocator;

fn verify(c: &mut Criterion) {
    let count: usize = std::env::var("KEYPLANE_BENCH_CREDENTIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (app, tokens) = runtime.block_on(async {
        let store = keyplane_store::connect(&keyplane_store::sqlite_url_for_data_dir(dir.path()))
            .await
            .unwrap();
        let org = ops::create_org(store.as_ref(), "bench", &keyplane_bench::operator())
            .await
            .unwrap();
        let (secrets, _) = keyplane_bench::seed_api_tokens(store.as_ref(), org.tenant.id, count)
            .await
            .unwrap();
        let config = Config {
            verify_cache: CacheConfig {
                capacity: count + count / 10,
                positive_ttl: std::time::Duration::from_secs(3600),
                ..CacheConfig::default()
            },
            ..Config::default()
        };
        let app = App::new(store, config);
        let tokens: Vec<String> = secrets
            .iter()
            .map(|s| s.expose_secret().to_string())
            .collect();
        for token in &tokens {
            app.verify_secret(token)
                .await
                .expect("seeded tokens verify");
        }
        (app, tokens)
    });
    let peak_rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    eprintln!(
        "verify bench: {} credentials cached; peak RSS {peak_rss}",
        tokens.len()
    );

    let next = AtomicUsize::new(0);
    let mut group = c.benchmark_group("verify");
    group.bench_function(format!("cached_api_token_{count}"), |b| {
        // A stride through the whole set, so the cache's entries are not in the CPU cache. The
        // presented token is (copied untimed just before, as a request's bytes just read from
        // its socket are): the bench's own list of a million tokens is not the server's cost.
        let app = &app;
        b.to_async(&runtime).iter_batched(
            || tokens[next.fetch_add(7919, Ordering::Relaxed) % tokens.len()].clone(),
            |token| async move {
                black_box(app.verify_secret(black_box(&token)).await.is_ok());
                // Returned, so criterion frees it outside the timing.
                token
            },
            BatchSize::SmallInput,
        )
    });
    // The same, also paying for fetching the token out of the bench's list (a cache miss of its
    // own, and a TLB miss): how this was measured before, kept for comparison.
    group.bench_function(format!("cached_api_token_{count}_with_token_fetch"), |b| {
        let app = &app;
        b.to_async(&runtime).iter(|| {
            let token = tokens[next.fetch_add(7919, Ordering::Relaxed) % tokens.len()].as_str();
            async move { black_box(app.verify_secret(black_box(token)).await.is_ok()) }
        })
    });
    group.bench_function("reject_bad_checksum", |b| {
        let forged = format!("{}0000", &tokens[0][..59]);
        b.to_async(&runtime)
            .iter(|| async { black_box(app.verify_secret(black_box(&forged)).await.is_err()) })
    });
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
