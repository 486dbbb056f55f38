//! `ops::revoke_organization` (`keyplane admin revoke-org`, and phase 1 of `admin delete-org`)
//! over more credentials and grants than a page: every live one of the organization revoked once,
//! with its event, and nothing else. The black-box tests against a running server are
//! `crates/cli/tests/admin_revoke_org.rs` and `admin_delete_org.rs`.

use crate::helpers::{both_backends, test_config, Org, TestApp};
use crate::verify::forward;
use keyplane_core::audit::DetailValue;
use keyplane_core::{CredentialKind, Operator, SubjectType, TenantId};
use keyplane_server::auth::CacheConfig;
use keyplane_server::ops::{self, OrgRevocation, RevokeOrgSpec};
use keyplane_server::Config;
use keyplane_store::testing::Backend;
use keyplane_store::{AuditQuery, GrantFilter, ListCredentials};
use serde_json::json;
use std::time::Duration;

both_backends!(revoke_org_reads_the_organization_a_page_at_a_time);

const KINDS: [CredentialKind; 3] = [
    CredentialKind::ApiToken,
    CredentialKind::ServiceAccount,
    CredentialKind::RobotAccount,
];

fn tenant(org: &Org) -> TenantId {
    TenantId::from_uuid(org.id.parse().unwrap())
}

/// The ids of `org`'s live credentials of `kind` (canaries too).
async fn live(app: &TestApp, org: &Org, kind: CredentialKind) -> Vec<String> {
    app.app
        .store()
        .list_credentials(&ListCredentials {
            tenant_id: tenant(org),
            kind,
            after: None,
            limit: None,
            include_revoked: false,
            expiring: None,
            include_canaries: true,
        })
        .await
        .unwrap()
        .iter()
        .map(|c| c.id.to_string())
        .collect()
}

/// `org`'s `*.revoked` events: (action, target id, reason, via).
async fn revoke_events(
    app: &TestApp,
    org: &Org,
) -> Vec<(String, String, DetailValue, DetailValue)> {
    let events = app
        .app
        .store()
        .list_audit_events(&AuditQuery::after_seq(tenant(org), 0, 10_000))
        .await
        .unwrap();
    events
        .iter()
        .filter(|e| e.event.action.ends_with(".revoked"))
        .map(|e| {
            (
                e.event.action.clone(),
                e.event.target.as_ref().unwrap().id.to_string(),
                e.event.details["reason"].clone(),
                e.event.details["via"].clone(),
            )
        })
        .collect()
}

/// Which command's walk [`run`] makes.
#[derive(Clone, Copy, PartialEq)]
enum Command {
    /// `admin revoke-org`: canaries and grants to users and groups are left.
    RevokeOrg,
    /// `admin delete-org`'s phase 1: those too.
    DeleteOrg,
}

impl Command {
    fn via(self) -> &'static str {
        match self {
            Command::RevokeOrg => ops::REVOKE_ORG_VIA,
            Command::DeleteOrg => ops::DELETE_ORG_VIA,
        }
    }
}

/// `command`'s revocation of `org`, three rows a page.
async fn run(app: &TestApp, org: &Org, command: Command, dry_run: bool) -> OrgRevocation {
    let operator = Operator {
        os_user: "test".into(),
        name: Some("olga".into()),
    };
    let everything = command == Command::DeleteOrg;
    let spec = RevokeOrgSpec {
        via: command.via(),
        reason: "INC-1",
        operator: &operator,
        dry_run,
        canaries: everything,
        user_and_group_grants: everything,
        page_rows: 3,
    };
    let mut done = OrgRevocation::default();
    ops::revoke_organization(app.app.store().as_ref(), tenant(org), &spec, &mut done)
        .await
        .unwrap();
    done
}

/// Creates `body` at `path` in `org`: its id.
async fn created(app: &TestApp, org: &Org, path: &str, body: serde_json::Value) -> String {
    let res = app.post(path, &org.token, body).await;
    assert_eq!(res.status(), 201, "{path}");
    let created: serde_json::Value = res.json().await.unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// A person's grant in `org`: a user's or a group's (`subject_type`), to someone new.
async fn grant_to_person(app: &TestApp, org: &Org, subject_type: &str) -> String {
    let body = json!({"grant_kind": "capability", "subject_type": subject_type,
                      "subject_id": uuid::Uuid::new_v4(), "capability_key": "api_tokens:read"});
    created(app, org, &org.account_path("/authorizations"), body).await
}

/// The ids of `org`'s live grants to users and groups.
async fn live_people_grants(app: &TestApp, org: &Org) -> Vec<String> {
    let mut ids = Vec::new();
    for subject_type in [SubjectType::User, SubjectType::Group] {
        let grants = app
            .app
            .store()
            .list_grants(&GrantFilter {
                tenant_id: tenant(org),
                subject_type: Some(subject_type),
                subject_id: None,
                kind: None,
                capability_key: None,
                include_revoked: false,
                after: None,
                limit: None,
            })
            .await
            .unwrap();
        ids.extend(grants.iter().map(|g| g.id.to_string()));
    }
    ids
}

async fn revoke_org_reads_the_organization_a_page_at_a_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let acme = app.create_org("acme").await;
    let other = app.create_org("other").await;
    // Seven of each kind, every third revoked already, across three pages of three.
    let mut already = Vec::new();
    for kind in KINDS {
        let seeded = app.import_credentials(&acme, kind, 7, |i| i % 3 == 0).await;
        already.extend(seeded.into_iter().filter(|(_, revoked)| *revoked));
        app.import_credentials(&other, kind, 2, |_| false).await;
    }
    let (account, _, grant) = app
        .service_account_with_grant(&acme, "api_tokens:read")
        .await;
    let second = created(
        &app,
        &acme,
        &acme.account_path("/authorizations"),
        json!({"grant_kind": "capability", "subject_type": "service_account",
               "subject_id": account, "capability_key": "api_tokens:write"}),
    )
    .await;
    let granted = [grant, second];
    // Canaries: four tokens (more than a page) and a service account.
    let mut canaries = Vec::new();
    for i in 0..4 {
        let body = json!({"name": format!("decoy-{i}"), "scopes": ["deploy:read"], "canary": true});
        canaries.push(created(&app, &acme, &acme.path("/api-tokens"), body).await);
    }
    let body = json!({"name": "decoy", "canary": true});
    canaries.push(created(&app, &acme, &acme.account_path("/service-accounts"), body).await);
    // People's grants: four users' (a full page and one) and three groups' (a full page, then
    // an empty one); and one in the other organization.
    let mut people_grants = Vec::new();
    for (subject_type, n) in [("user", 4), ("group", 3)] {
        for _ in 0..n {
            people_grants.push(grant_to_person(&app, &acme, subject_type).await);
        }
    }
    let others_grant = grant_to_person(&app, &other, "user").await;
    let before = revoke_events(&app, &acme).await;
    assert!(before.is_empty(), "{before:?}");
    // The first token and four imported; four imported and one with two grants; four imported.
    let wanted = OrgRevocation {
        api_tokens: 5,
        service_accounts: 5,
        robot_accounts: 4,
        service_account_grants: 2,
        canaries: 5,
        user_and_group_grants: 7,
        settled: true,
    };

    assert_eq!(
        run(&app, &acme, Command::RevokeOrg, true).await,
        wanted,
        "dry run"
    );
    assert!(
        revoke_events(&app, &acme).await.is_empty(),
        "a dry run writes nothing"
    );
    assert_eq!(live(&app, &acme, CredentialKind::ApiToken).await.len(), 9);

    assert_eq!(run(&app, &acme, Command::RevokeOrg, false).await, wanted);
    let events = revoke_events(&app, &acme).await;
    assert_eq!(events.len(), 5 + 5 + 4 + 2, "{events:#?}");
    let mut targets: Vec<&String> = events.iter().map(|(_, id, _, _)| id).collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), events.len(), "one event each: {events:#?}");
    for (_, id, reason, via) in &events {
        assert_eq!(reason, &DetailValue::Text("INC-1".into()));
        assert_eq!(via, &DetailValue::Text(ops::REVOKE_ORG_VIA.into()));
        assert!(
            !already.iter().any(|(seeded, _)| seeded == id),
            "{id} was revoked before: no second event"
        );
    }
    for grant in &granted {
        assert!(
            events
                .iter()
                .any(|(action, id, _, _)| action == "authorization.revoked" && id == grant),
            "the grant {grant} goes with its account"
        );
    }
    // Only the canaries and people's grants stay live; the other organization keeps everything.
    for kind in KINDS {
        let left = live(&app, &acme, kind).await;
        let wanted_left = match kind {
            CredentialKind::ApiToken => 4,
            CredentialKind::ServiceAccount => 1,
            CredentialKind::RobotAccount => 0,
        };
        assert_eq!(left.len(), wanted_left, "{kind:?}: {left:?}");
        let others = live(&app, &other, kind).await.len();
        let first_token = usize::from(kind == CredentialKind::ApiToken);
        assert_eq!(
            others,
            2 + first_token,
            "{kind:?} of the other organization"
        );
    }
    assert_eq!(live_people_grants(&app, &acme).await.len(), 7);

    // Again, as after an interruption: nothing left, nothing written.
    let left = OrgRevocation {
        canaries: 5,
        user_and_group_grants: 7,
        settled: true,
        ..OrgRevocation::default()
    };
    assert_eq!(run(&app, &acme, Command::RevokeOrg, false).await, left);
    assert_eq!(revoke_events(&app, &acme).await, events);

    // `admin delete-org` revokes what `revoke-org` leaves, each once, as its own act.
    assert_eq!(
        run(&app, &acme, Command::DeleteOrg, true).await,
        left,
        "dry run"
    );
    assert_eq!(
        revoke_events(&app, &acme).await,
        events,
        "a dry run writes nothing"
    );
    assert_eq!(run(&app, &acme, Command::DeleteOrg, false).await, left);
    let all = revoke_events(&app, &acme).await;
    assert_eq!(all[..events.len()], events[..]);
    let deleted = &all[events.len()..];
    let mut targets: Vec<String> = deleted.iter().map(|(_, id, _, _)| id.clone()).collect();
    targets.sort();
    let mut wanted_targets = [canaries, people_grants].concat();
    wanted_targets.sort();
    assert_eq!(targets, wanted_targets, "one event each: {deleted:#?}");
    for (_, _, reason, via) in deleted {
        assert_eq!(reason, &DetailValue::Text("INC-1".into()));
        assert_eq!(via, &DetailValue::Text(ops::DELETE_ORG_VIA.into()));
    }
    for kind in KINDS {
        assert_eq!(
            live(&app, &acme, kind).await,
            Vec::<String>::new(),
            "{kind:?}"
        );
    }
    assert_eq!(live_people_grants(&app, &acme).await, Vec::<String>::new());
    assert_eq!(live_people_grants(&app, &other).await, [others_grant]);

    let none = OrgRevocation {
        settled: true,
        ..OrgRevocation::default()
    };
    assert_eq!(run(&app, &acme, Command::DeleteOrg, false).await, none);
    assert_eq!(revoke_events(&app, &acme).await, all);
}

/// PostgreSQL: `admin revoke-org` writes through a store of its own (no server, no cache of its
/// own to clear). Two servers on the database hold every credential of the organization in their
/// caches, for longer than the test runs: each refuses every one once the command's pages commit,
/// told by their notifications alone.
#[tokio::test]
async fn the_replicas_caches_refuse_what_revoke_org_revoked() {
    let config = Config {
        verify_cache: CacheConfig {
            positive_ttl: Duration::from_secs(600),
            ..CacheConfig::default()
        },
        ..test_config()
    };
    let first = TestApp::spawn_with(Backend::Postgres, config).await;
    let replica = first.replica().await;
    let acme = first.create_org("acme").await;
    let other = first.create_org("other").await;
    // The first token and five more: three pages of two.
    let mut held = vec![(acme.token.clone(), "")];
    for i in 0..5 {
        let created = first.create_token(&acme, &format!("ci-{i}"), &[]).await;
        held.push((created["token"].as_str().unwrap().to_owned(), ""));
    }
    let (_, account, _) = first.service_account_with_grant(&acme, "deploy").await;
    held.push((account, "?scope=deploy"));
    first.await_listeners(2).await;
    for server in [&first, &replica] {
        for (token, query) in held.iter().chain([&(other.token.clone(), "")]) {
            assert_eq!(forward(server, Some(token), query).await.status(), 200);
        }
    }

    let command = keyplane_store::connect(first.database_url()).await.unwrap();
    let operator = Operator {
        os_user: "test".into(),
        name: None,
    };
    let spec = RevokeOrgSpec {
        via: ops::REVOKE_ORG_VIA,
        reason: "INC-2",
        operator: &operator,
        dry_run: false,
        canaries: false,
        user_and_group_grants: false,
        page_rows: 2,
    };
    let mut done = OrgRevocation::default();
    ops::revoke_organization(command.as_ref(), tenant(&acme), &spec, &mut done)
        .await
        .unwrap();
    assert_eq!((done.api_tokens, done.service_accounts), (6, 1));

    // Bounded by the attempts, far below the cache lifetime: only a notification refuses them.
    for server in [&first, &replica] {
        for (i, (token, query)) in held.iter().enumerate() {
            let mut attempts = 0;
            while forward(server, Some(token), query).await.status() != 401 {
                attempts += 1;
                assert!(attempts < 200, "credential {i} still verifies");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert_eq!(
            forward(server, Some(&other.token), "").await.status(),
            200,
            "another organization's token"
        );
    }
}
