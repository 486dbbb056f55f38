//! `ops::revoke_organization` (`keyplane admin revoke-org`) over more credentials than a page:
//! every live one of the organization revoked once, with its event, and nothing else.
//! The black-box test against a running server is `crates/cli/tests/admin_revoke_org.rs`.

use crate::helpers::{both_backends, Org, TestApp};
use keyplane_core::audit::DetailValue;
use keyplane_core::{CredentialKind, Operator, TenantId};
use keyplane_server::ops::{self, OrgRevocation};
use keyplane_store::testing::Backend;
use keyplane_store::{AuditQuery, ListCredentials};
use serde_json::json;

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

/// `org`'s `*.revoked` events: (action, target id, reason).
async fn revoke_events(app: &TestApp, org: &Org) -> Vec<(String, String, Option<DetailValue>)> {
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
                e.event.details.get("reason").cloned(),
            )
        })
        .collect()
}

async fn run(app: &TestApp, org: &Org, dry_run: bool) -> OrgRevocation {
    let operator = Operator {
        os_user: "test".into(),
        name: Some("olga".into()),
    };
    let mut done = OrgRevocation::default();
    ops::revoke_organization_in_pages(
        app.app.store().as_ref(),
        tenant(org),
        "INC-1",
        &operator,
        dry_run,
        &mut done,
        3,
    )
    .await
    .unwrap();
    done
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
    let res = app
        .post(
            &acme.account_path("/authorizations"),
            &acme.token,
            json!({"grant_kind": "capability", "subject_type": "service_account",
                   "subject_id": account, "capability_key": "api_tokens:write"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let second: serde_json::Value = res.json().await.unwrap();
    let granted = [grant, second["id"].as_str().unwrap().to_owned()];
    let res = app
        .post(
            &acme.path("/api-tokens"),
            &acme.token,
            json!({"name": "decoy", "scopes": ["deploy:read"], "canary": true}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let before = revoke_events(&app, &acme).await;
    assert!(before.is_empty(), "{before:?}");
    // The first token and four imported; four imported and one with two grants; four imported.
    let wanted = OrgRevocation {
        api_tokens: 5,
        service_accounts: 5,
        robot_accounts: 4,
        service_account_grants: 2,
        canaries: 1,
        user_and_group_grants: 0,
        settled: true,
    };

    assert_eq!(run(&app, &acme, true).await, wanted, "dry run");
    assert!(
        revoke_events(&app, &acme).await.is_empty(),
        "a dry run writes nothing"
    );
    assert_eq!(live(&app, &acme, CredentialKind::ApiToken).await.len(), 6);

    assert_eq!(run(&app, &acme, false).await, wanted);
    let events = revoke_events(&app, &acme).await;
    assert_eq!(events.len(), 5 + 5 + 4 + 2, "{events:#?}");
    let mut targets: Vec<&String> = events.iter().map(|(_, id, _)| id).collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), events.len(), "one event each: {events:#?}");
    for (_, id, reason) in &events {
        assert_eq!(reason, &Some(DetailValue::Text("INC-1".into())));
        assert!(
            !already.iter().any(|(seeded, _)| seeded == id),
            "{id} was revoked before: no second event"
        );
    }
    for grant in &granted {
        assert!(
            events
                .iter()
                .any(|(action, id, _)| action == "authorization.revoked" && id == grant),
            "the grant {grant} goes with its account"
        );
    }
    // Only the canary stays live; the other organization keeps everything.
    for kind in KINDS {
        let left = live(&app, &acme, kind).await;
        let canaries = usize::from(kind == CredentialKind::ApiToken);
        assert_eq!(left.len(), canaries, "{kind:?}: {left:?}");
        let others = live(&app, &other, kind).await.len();
        let first_token = usize::from(kind == CredentialKind::ApiToken);
        assert_eq!(
            others,
            2 + first_token,
            "{kind:?} of the other organization"
        );
    }

    // Again, as after an interruption: nothing left, nothing written.
    let again = run(&app, &acme, false).await;
    assert_eq!(
        again,
        OrgRevocation {
            canaries: 1,
            settled: true,
            ..OrgRevocation::default()
        }
    );
    assert_eq!(revoke_events(&app, &acme).await, events);
}
