//! The registry glob matcher at its worst allowed input next to a typical one, and a whole
//! token request's grant at the request bounds (`cargo bench -p keyplane-core --bench
//! registry_glob`; figures in BENCHMARKS.md, "Registry glob worst case").

use criterion::{criterion_group, criterion_main, Criterion};
use keyplane_core::glob::{self, MAX_GLOB_LEN, MAX_WILDCARDS};
use keyplane_core::registry::{
    grant_access, parse_scopes, RobotPermission, MAX_PERMISSIONS, MAX_REPOSITORY_NAME,
    MAX_REQUESTED_SCOPES,
};
use std::hint::black_box;

/// `MAX_WILDCARDS` copies of `wildcard` followed by runs of `a`, padded with `a` to
/// `MAX_GLOB_LEN` bytes and ending in `b`: every wildcard keeps every position of an all-`a` name
/// alive, and each literal is compared in full at each of them before the last byte fails.
fn worst_glob(wildcard: &str) -> String {
    let literal_bytes = MAX_GLOB_LEN - MAX_WILDCARDS * wildcard.len() - 1;
    let per_wildcard = literal_bytes / MAX_WILDCARDS;
    let mut glob = String::new();
    for i in 0..MAX_WILDCARDS {
        glob.push_str(wildcard);
        let extra = usize::from(i < literal_bytes % MAX_WILDCARDS);
        glob.push_str(&"a".repeat(per_wildcard + extra));
    }
    glob.push('b');
    assert_eq!(glob.len(), MAX_GLOB_LEN);
    assert_eq!(glob::wildcard_count(&glob), MAX_WILDCARDS);
    glob
}

/// One long literal after all the wildcards.
fn worst_glob_one_literal() -> String {
    let mut glob = "a**".repeat(MAX_WILDCARDS);
    glob.push_str(&"a".repeat(MAX_GLOB_LEN - glob.len() - 1));
    glob.push('b');
    glob
}

fn matcher(c: &mut Criterion) {
    let almost = "a".repeat(MAX_REPOSITORY_NAME);
    let mut group = c.benchmark_group("registry_glob");
    group.bench_function("typical: team-a/* ~ team-a/web-app", |b| {
        b.iter(|| glob::matches(black_box("team-a/*"), black_box("team-a/web-app")))
    });
    group.bench_function("typical: team/** ~ team/x/y/app", |b| {
        b.iter(|| glob::matches(black_box("team/**"), black_box("team/x/y/app")))
    });
    for (label, glob) in [
        ("worst: 16 x (* + 14 a) + b", worst_glob("*")),
        ("worst: 16 x (** + 13 a) + b", worst_glob("**")),
        ("worst: 16 x (a + **) + 206 a + b", worst_glob_one_literal()),
    ] {
        assert!(
            RobotPermission::parse(&format!("pull:{glob}")).is_ok(),
            "{glob}"
        );
        assert!(!glob::matches(&glob, &almost));
        group.bench_function(format!("{label} ~ 255 x a"), |b| {
            b.iter(|| glob::matches(black_box(&glob), black_box(&almost)))
        });
    }
    group.finish();
}

/// A robot with `MAX_PERMISSIONS` worst globs asked for `MAX_REQUESTED_SCOPES` almost-matching
/// repositories: the most glob work one token request can cause.
fn whole_request(c: &mut Criterion) {
    let glob = worst_glob("*");
    let permissions: Vec<RobotPermission> = (0..MAX_PERMISSIONS)
        .map(|i| {
            let action = ["pull", "push", "delete"][i % 3];
            // Distinct globs (a permission may not repeat), all worst.
            let mut glob = glob.clone();
            glob.replace_range(
                MAX_GLOB_LEN - 2..MAX_GLOB_LEN - 1,
                &((b'a' + (i / 3) as u8) as char).to_string(),
            );
            RobotPermission::parse_stored(&format!("{action}:{glob}")).unwrap()
        })
        .collect();
    let project = "p";
    let scopes: Vec<String> = (0..MAX_REQUESTED_SCOPES)
        .map(|i| {
            let repository = format!(
                "{}{i:02}",
                "a".repeat(MAX_REPOSITORY_NAME - project.len() - 3)
            );
            format!("repository:{project}/{repository}:*")
        })
        .collect();
    let requested = parse_scopes(scopes.iter().map(String::as_str)).unwrap();
    let typical_permissions = vec![
        RobotPermission::parse("pull").unwrap(),
        RobotPermission::parse("push:team-a/*").unwrap(),
    ];
    let typical = parse_scopes(["repository:p/team-a/app:pull,push"]).unwrap();
    let mut group = c.benchmark_group("registry_grant");
    group.bench_function("typical: 2 permissions, 1 scope", |b| {
        b.iter(|| {
            grant_access(
                black_box(&typical_permissions),
                project,
                black_box(&typical),
            )
        })
    });
    group.sample_size(20);
    group.bench_function("worst: 50 worst globs x 32 almost-matching scopes", |b| {
        b.iter(|| grant_access(black_box(&permissions), project, black_box(&requested)))
    });
    group.finish();
}

criterion_group!(benches, matcher, whole_request);
criterion_main!(benches);
