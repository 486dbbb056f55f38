//! A replica whose clock is off: on PostgreSQL it is measured against the database's, shown by
//! `/readyz` and `/metrics`, logged once on entering and once on leaving, and the jobs that change
//! the shared store by that clock are held meanwhile. SQLite has no other clock to compare with.

use crate::helpers::{eventually, sample, test_config, Org, TestApp};
use chrono::TimeDelta;
use keyplane_store::testing::Backend;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// `/readyz`'s answer (a 200).
pub(crate) async fn readiness(app: &TestApp) -> Value {
    let res = app
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// `/readyz`'s status code and answer, whichever.
pub(crate) async fn readyz(app: &TestApp) -> (u16, Value) {
    let res = app
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

/// `keyplane_clock_skew_seconds` as `/metrics` shows it.
async fn skew_metric(app: &TestApp) -> f64 {
    let text = app.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix("keyplane_clock_skew_seconds "))
        .unwrap_or_else(|| panic!("no keyplane_clock_skew_seconds in:\n{text}"))
        .parse()
        .unwrap()
}

/// Waits (at most 10 s) until `/readyz` on `app` shows a clock that `wanted` accepts.
async fn clock_until(app: &TestApp, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let clock = readiness(app).await["clock"].clone();
        if wanted(&clock) {
            return clock;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s; last {clock}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids of the credentials whose previous secret the store still holds.
async fn holding_a_previous_secret(app: &TestApp) -> Vec<String> {
    app.app
        .store()
        .credentials_with_previous_secret(100)
        .await
        .expect("read the credentials holding a previous secret")
        .iter()
        .map(|c| c.id.to_string())
        .collect()
}

async fn forward(app: &TestApp, token: &str) -> u16 {
    app.request(Method::GET, "/v1/auth/forward", Some(token))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn rotate_with_grace(app: &TestApp, org: &Org, id: &str, grace_seconds: u64) -> Value {
    let res = app
        .post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({ "grace_seconds": grace_seconds }),
        )
        .await;
    assert_eq!(res.status(), 200, "rotation");
    res.json().await.unwrap()
}

/// The captured log lines (every test's) that contain each of `needles`.
fn log_lines_with(needles: &[&str]) -> usize {
    crate::logs::captured()
        .lines()
        .filter(|line| needles.iter().all(|needle| line.contains(needle)))
        .count()
}

/// One replica two hours ahead of PostgreSQL, one right, on one database. The one ahead would end
/// a rotation's one-hour grace at once and announce a token expiring in half an hour as expired:
/// its sweep is held, `/readyz` and the metric show the difference, the log says so once. Set
/// right, it is back to normal (logged once), and the right replica ends the grace at its real end.
#[tokio::test]
async fn a_replica_whose_clock_is_off_holds_the_jobs_that_cut_by_it() {
    let right_config = test_config();
    let right_clock = right_config.clock.clone();
    let right = TestApp::spawn_with(Backend::Postgres, right_config).await;
    let ahead_config = test_config();
    let ahead_clock = ahead_config.clock.clone();
    ahead_clock.set_wrong_by(TimeDelta::hours(2));
    let ahead = right.replica_at(right.database_url(), ahead_config).await;

    let org = right.create_org("acme").await;
    let created = right.create_token(&org, "deployer", &[]).await;
    let id = created["id"].as_str().unwrap().to_string();
    let old = created["token"].as_str().unwrap().to_string();
    let new = rotate_with_grace(&right, &org, &id, 3600).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let soon = (chrono::Utc::now() + TimeDelta::minutes(30)).to_rfc3339();
    let res = right
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({"name": "short-lived", "expires_at": soon}),
        )
        .await;
    assert_eq!(res.status(), 201);

    // The replica ahead sweeps: nothing changes.
    keyplane_server::ops::lifecycle_sweep(&ahead.app)
        .await
        .expect("sweep");
    assert!(
        holding_a_previous_secret(&right).await.contains(&id),
        "the replica ahead ended the grace period two hours early"
    );
    assert_eq!(forward(&right, &old).await, 200, "the previous secret");
    assert_eq!(forward(&right, &new).await, 200, "the current secret");
    assert_eq!(
        right.audit_events(&org, "credential.expired").await.len(),
        0,
        "a false credential.expired"
    );

    // Shown by `/readyz` and the metric, on the replica ahead only.
    let clock = readiness(&ahead).await["clock"].clone();
    assert_eq!(clock["status"], "skewed", "{clock}");
    assert_eq!(clock["limit_seconds"], 5.0, "{clock}");
    let skew = clock["skew_seconds"].as_f64().expect("a skew");
    assert!((skew - 7200.0).abs() < 2.0, "{clock}");
    assert!(clock["checked_at"].is_string(), "{clock}");
    assert!((skew_metric(&ahead).await - 7200.0).abs() < 2.0);
    let clock = readiness(&right).await["clock"].clone();
    assert_eq!(clock["status"], "ok", "{clock}");
    assert!(
        clock["skew_seconds"].as_f64().unwrap().abs() < 1.0,
        "{clock}"
    );
    assert!(skew_metric(&right).await.abs() < 1.0);

    // Measured again and again (the background work does every second at most), logged once.
    let first = readiness(&ahead).await["clock"]["checked_at"].clone();
    let later = clock_until(&ahead, "measured again", |clock| {
        clock["checked_at"] != first
    })
    .await;
    clock_until(&ahead, "measured a third time", |clock| {
        clock["checked_at"] != later["checked_at"]
    })
    .await;
    assert_eq!(
        // Its own line: other tests' clocks are off by other amounts.
        log_lines_with(&[
            "clock is 7",
            "s ahead of the database's (more than --max-clock-skew-seconds"
        ]),
        1,
        "one warning on entering"
    );

    // Set right: back to normal, logged once, and its sweep runs again (nothing has ended).
    ahead_clock.set_wrong_by(TimeDelta::zero());
    let clock = clock_until(&ahead, "the clock set right", |clock| {
        clock["status"] == "ok"
    })
    .await;
    assert!(
        clock["skew_seconds"].as_f64().unwrap().abs() < 1.0,
        "{clock}"
    );
    assert!(skew_metric(&ahead).await.abs() < 1.0);
    assert_eq!(
        log_lines_with(&["clock agrees with the database's again"]),
        1,
        "one line on leaving"
    );
    keyplane_server::ops::lifecycle_sweep(&ahead.app)
        .await
        .expect("sweep");
    assert!(holding_a_previous_secret(&right).await.contains(&id));
    assert_eq!(
        right.audit_events(&org, "credential.expired").await.len(),
        0
    );

    // A right clock ends the grace at its real end, not before: time passes for everyone.
    let sweep_right = || async {
        keyplane_server::ops::lifecycle_sweep(&right.app)
            .await
            .expect("sweep")
    };
    let passes = |by: Duration| {
        right_clock.advance(by);
        ahead_clock.advance(by);
    };
    passes(Duration::from_secs(3590));
    sweep_right().await;
    assert!(holding_a_previous_secret(&right).await.contains(&id));
    passes(Duration::from_secs(11));
    sweep_right().await;
    assert!(!holding_a_previous_secret(&right).await.contains(&id));
    // Time passing is no error of either clock (an hour passed since their last measurement:
    // `unknown` until the next one).
    clock_until(&ahead, "measured after the hour", |clock| {
        clock["status"] == "ok"
    })
    .await;
    clock_until(&right, "measured after the hour", |clock| {
        clock["status"] == "ok"
    })
    .await;
}

/// A clock found right, then no longer measured (the database's clock cannot be read): the
/// verdict does not stand for good. Once it is a minute old the clock is `unknown`, shown with
/// the old measurement, logged once, and the jobs that cut by it are held; a measurement that
/// succeeds again frees them.
#[tokio::test]
async fn a_verdict_no_measurement_renews_turns_unknown_and_holds_the_jobs() {
    let config = test_config();
    let clock = config.clock.clone();
    let (app, store) = crate::faulty_store::FaultyStore::spawn(Backend::Postgres, config).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "deployer", &[]).await;
    let id = created["id"].as_str().unwrap().to_string();
    rotate_with_grace(&app, &org, &id, 60).await;
    clock_until(&app, "measured", |clock| clock["status"] == "ok").await;

    store.set_clock_reads_down(true);
    // The grace period ends, and the last measurement is more than a minute old.
    clock.advance(Duration::from_secs(61));
    keyplane_server::ops::lifecycle_sweep(&app.app)
        .await
        .expect("sweep");
    assert!(
        holding_a_previous_secret(&app).await.contains(&id),
        "the sweep cut by a clock last measured over a minute ago"
    );
    let shown = readiness(&app).await["clock"].clone();
    assert_eq!(shown["status"], "unknown", "{shown}");
    let checked_at = chrono::DateTime::parse_from_rfc3339(shown["checked_at"].as_str().unwrap())
        .expect("the last measurement's time");
    assert!(
        app.app.now() - checked_at.to_utc() >= TimeDelta::seconds(60),
        "{shown}"
    );
    assert!(
        shown["skew_seconds"].as_f64().unwrap().abs() < 1.0,
        "{shown}"
    );
    let stale_line = "no measurement of this replica's clock has succeeded for 60 s";
    clock_until(&app, "measured and failed again", |_| {
        log_lines_with(&[stale_line]) > 0
    })
    .await;

    store.set_clock_reads_down(false);
    clock_until(&app, "measured again", |clock| clock["status"] == "ok").await;
    keyplane_server::ops::lifecycle_sweep(&app.app)
        .await
        .expect("sweep");
    assert!(!holding_a_previous_secret(&app).await.contains(&id));
}

/// A clock behind is off too: shown with its sign, and the jobs are held the same.
#[tokio::test]
async fn a_replica_behind_the_database_is_skewed_too() {
    let config = test_config();
    config.clock.set_wrong_by(TimeDelta::seconds(-90));
    let behind = TestApp::spawn_with(Backend::Postgres, config).await;
    let clock = readiness(&behind).await["clock"].clone();
    assert_eq!(clock["status"], "skewed", "{clock}");
    let skew = clock["skew_seconds"].as_f64().expect("a skew");
    assert!((skew + 90.0).abs() < 2.0, "{clock}");
    assert!((skew_metric(&behind).await + 90.0).abs() < 2.0);
    assert!(crate::logs::captured()
        .lines()
        .any(|line| line.contains("s behind the database's (more than --max-clock-skew-seconds")));
}

/// SQLite is one process on one machine: its clock is not checked, and nothing is held.
#[tokio::test]
async fn on_sqlite_the_clock_is_not_checked() {
    let config = test_config();
    let clock = config.clock.clone();
    clock.set_wrong_by(TimeDelta::hours(2));
    let app = TestApp::spawn_with(Backend::Sqlite, config).await;
    assert_eq!(
        readiness(&app).await["clock"],
        json!({"status": "not_checked", "skew_seconds": null, "limit_seconds": 5.0, "unready_limit_seconds": null, "checked_at": null})
    );
    assert_eq!(skew_metric(&app).await, 0.0);
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "deployer", &[]).await;
    let id = created["id"].as_str().unwrap().to_string();
    rotate_with_grace(&app, &org, &id, 60).await;
    // Its clock, however wrong, is the only one the store knows: the sweep runs by it.
    clock.advance(Duration::from_secs(61));
    keyplane_server::ops::lifecycle_sweep(&app.app)
        .await
        .expect("sweep");
    assert!(!holding_a_previous_secret(&app).await.contains(&id));
}

/// A replica 30 s ahead of PostgreSQL: past the limit for the jobs a few seconds decide, well
/// within what those that cut at days tolerate. Two days on (for everyone), its sweep leaves the
/// previous secret whose one-hour grace ended (held) and a token that ended ten minutes ago
/// unannounced, but sends the 7-day warning and the notice of a token that ended a day ago; its
/// audit retention prunes. `keyplane_clock_jobs_held` says which is which.
#[tokio::test]
async fn a_clock_off_by_seconds_holds_only_the_jobs_seconds_decide() {
    let right_config = keyplane_server::Config {
        // Its own sweep would end the grace, two days on.
        lifecycle_sweep_interval: Duration::from_secs(86400),
        ..test_config()
    };
    let time = right_config.clock.clone();
    let right = TestApp::spawn_with(Backend::Postgres, right_config).await;
    let org = right.create_org("acme").await;
    let created = right.create_token(&org, "deployer", &[]).await;
    let id = created["id"].as_str().unwrap().to_string();
    rotate_with_grace(&right, &org, &id, 3600).await;
    let mut names = std::collections::HashMap::new();
    let now = chrono::Utc::now();
    for (name, expires_at) in [
        ("in-a-week", now + TimeDelta::days(8) + TimeDelta::hours(12)),
        ("ended-a-day-ago", now + TimeDelta::days(1)),
        (
            "just-ended",
            now + TimeDelta::days(2) - TimeDelta::minutes(10),
        ),
    ] {
        let res = right
            .post(
                &org.path("/api-tokens"),
                &org.token,
                json!({"name": name, "expires_at": expires_at.to_rfc3339()}),
            )
            .await;
        assert_eq!(res.status(), 201, "{name}");
        let created: Value = res.json().await.unwrap();
        names.insert(created["id"].as_str().unwrap().to_string(), name);
    }
    time.advance(Duration::from_secs(2 * 86400));

    let ahead_by_seconds = || {
        let config = test_config();
        config.clock.set_wrong_by(TimeDelta::seconds(30));
        // The same time as the others', then 30 s off.
        config.clock.advance(Duration::from_secs(2 * 86400));
        config
    };
    let ahead = right
        .replica_at(
            right.database_url(),
            keyplane_server::Config {
                audit_retention_days: 0,
                ..ahead_by_seconds()
            },
        )
        .await;
    assert_eq!(readiness(&ahead).await["clock"]["status"], "skewed");
    keyplane_server::ops::lifecycle_sweep(&ahead.app)
        .await
        .expect("sweep");
    assert!(
        holding_a_previous_secret(&right).await.contains(&id),
        "a clock 30 s off ended a grace period"
    );
    let mut announced: Vec<_> = right
        .audit_events(&org, "credential.*")
        .await
        .iter()
        .map(|event| {
            (
                names[event["target"]["id"].as_str().unwrap()],
                event["action"].as_str().unwrap().to_string(),
                event["details"]["days_before"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    announced.sort();
    assert_eq!(
        announced,
        [
            ("ended-a-day-ago", "credential.expired".to_string(), 0),
            ("in-a-week", "credential.expiring".to_string(), 7),
        ]
    );
    let exposition = ahead.metrics().await;
    for (job, held) in [
        ("grace_period_end", 1),
        ("unused_secret_cutover", 1),
        ("expired_notice", 1),
        ("expiring_notice", 0),
    ] {
        let series = format!("keyplane_clock_jobs_held{{job=\"{job}\"}}");
        assert_eq!(sample(&exposition, &series), held, "{series}");
    }

    // Retention (a day, here) prunes what is two days old, at its start.
    let pruning = right
        .replica_at(
            right.database_url(),
            keyplane_server::Config {
                audit_retention_days: 1,
                ..ahead_by_seconds()
            },
        )
        .await;
    eventually("audit retention pruned", || async {
        !right.audit_events(&org, "audit.pruned").await.is_empty()
    })
    .await;
    assert_eq!(
        pruning
            .metric("keyplane_clock_jobs_held{job=\"audit_retention\"}")
            .await,
        0
    );
    assert!(holding_a_previous_secret(&right).await.contains(&id));
}

/// A replica 4 s behind is within the limit (not held, not flagged) and dates the uses it records
/// by its clock, 4 s in the past. The cutover of a replica with a right clock allows for that: a
/// previous secret presented there 57 s ago is not retired as unused for 60 s (it would be, read
/// as quiet for 61 s, were only the flush interval allowed for); 62 s after, it is.
async fn the_cutover_allows_for_a_replica_behind_within_the_limit(backend: Backend) {
    // Only the test sweeps.
    let quiet = || keyplane_server::Config {
        lifecycle_sweep_interval: Duration::from_secs(86400),
        ..test_config()
    };
    let right_config = quiet();
    let right_clock = right_config.clock.clone();
    let right = TestApp::spawn_with(backend, right_config).await;
    let behind_config = quiet();
    let behind_clock = behind_config.clock.clone();
    behind_clock.set_wrong_by(TimeDelta::seconds(-4));
    let behind = right.replica_at(right.database_url(), behind_config).await;
    let passes = |by: Duration| {
        right_clock.advance(by);
        behind_clock.advance(by);
    };
    let sweep = || async {
        keyplane_server::ops::lifecycle_sweep(&right.app)
            .await
            .expect("sweep")
    };

    let org = right.create_org("acme").await;
    let created = right.create_token(&org, "deployer", &[]).await;
    let id = created["id"].as_str().unwrap().to_string();
    let old = created["token"].as_str().unwrap().to_string();
    let res = right
        .post(
            &org.path(&format!("/api-tokens/{id}/rotate")),
            &org.token,
            json!({"grace_seconds": 86400, "retire_when_unused_seconds": 60}),
        )
        .await;
    assert_eq!(res.status(), 200, "rotation");
    let new = res.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(forward(&right, &new).await, 200);
    right.app.flush_usage().await;
    passes(Duration::from_secs(10));
    assert_eq!(forward(&behind, &old).await, 200, "the previous secret");
    behind.app.flush_usage().await;

    passes(Duration::from_secs(57));
    sweep().await;
    assert!(
        holding_a_previous_secret(&right).await.contains(&id),
        "retired a secret presented 57 s ago as unused for 60 s"
    );
    passes(Duration::from_secs(5));
    sweep().await;
    assert!(!holding_a_previous_secret(&right).await.contains(&id));
}

crate::helpers::both_backends!(the_cutover_allows_for_a_replica_behind_within_the_limit);

/// `--unready-clock-skew-seconds 60`: a replica three hours ahead of PostgreSQL answers `/readyz`
/// 503 (`unavailable`, reason `clock skewed`, the clock shown), so that a load balancer takes it
/// out, while it still verifies and serves the changes that reach it. Set to 20 s off, within half
/// the limit, it is ready again (while still `skewed` past `--max-clock-skew-seconds`, which holds
/// its jobs: the two limits are independent). SQLite has no other clock: ready whatever its clock.
async fn a_clock_off_past_the_unready_limit_fails_readiness(backend: Backend) {
    let config = keyplane_server::Config {
        unready_clock_skew: Some(Duration::from_secs(60)),
        ..test_config()
    };
    let clock = config.clock.clone();
    // Not the two hours of the first test, whose log lines it counts.
    clock.set_wrong_by(TimeDelta::hours(3));
    let app = TestApp::spawn_with(backend, config).await;
    let org = app.create_org("acme").await;
    let created = app.create_token(&org, "deployer", &[]).await;
    let token = created["token"].as_str().unwrap().to_string();

    let (status, body) = readyz(&app).await;
    let clock_shown = &body["clock"];
    assert_eq!(clock_shown["unready_limit_seconds"], 60.0, "{body}");
    if backend == Backend::Sqlite {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "ready", "{body}");
        assert_eq!(clock_shown["status"], "not_checked", "{body}");
        assert_eq!(forward(&app, &token).await, 200);
        return;
    }
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["reason"], "clock skewed", "{body}");
    assert_eq!(clock_shown["status"], "skewed", "{body}");
    let skew = clock_shown["skew_seconds"].as_f64().expect("a skew");
    assert!((skew - 10800.0).abs() < 2.0, "{body}");
    // Its reads are fine: verification goes on.
    assert_eq!(forward(&app, &token).await, 200);
    assert_eq!(
        log_lines_with(&["more than --unready-clock-skew-seconds, 60 s"]),
        1,
        "one warning on entering"
    );

    // Not set right: the first test counts the lines of clocks that agree again.
    clock.set_wrong_by(TimeDelta::seconds(20));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readyz(&app).await;
        if status == 200 {
            assert_eq!(body["status"], "ready", "{body}");
            assert_eq!(body.get("reason"), None, "{body}");
            assert_eq!(body["clock"]["status"], "skewed", "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready within 10 s of the clock set within 30 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        log_lines_with(&["of the database's again: /readyz answers 200"]),
        1,
        "one line on leaving"
    );
}

crate::helpers::both_backends!(a_clock_off_past_the_unready_limit_fails_readiness);
