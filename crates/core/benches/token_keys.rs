//! What a verification pays to key a presented token: the SHA-256 the store keeps against the
//! caches' keyed hash (`cargo bench -p keyplane-core --bench token_keys`; figures in
//! BENCHMARKS.md, "Twelfth sitting").

use criterion::{criterion_group, criterion_main, Criterion};
use keyplane_core::{token, CacheKeyer, CredentialKind, TokenHash};
use std::hint::black_box;

fn token_keys(c: &mut Criterion) {
    let minted = token::mint(CredentialKind::ApiToken, &mut rand::rngs::OsRng);
    let presented = minted.plaintext.expose_secret();
    let keys = CacheKeyer::random();
    let mut group = c.benchmark_group("token_keys");
    group.bench_function("format_check", |b| {
        b.iter(|| token::kind_of(black_box(presented)))
    });
    group.bench_function("sha256", |b| b.iter(|| TokenHash::of(black_box(presented))));
    group.bench_function("cache_key", |b| b.iter(|| keys.key(black_box(presented))));
    group.finish();
}

criterion_group!(benches, token_keys);
criterion_main!(benches);
