//! `keyplane admin grant`: the operator gives a user a right in an organization, on either store,
//! through the real binary.

mod common;

use common::{both_stores, CommandOutput, KillOnDrop, TestStore};
use keyplane_core::{SubjectType, TenantId, UserId};
use keyplane_store::testing::Backend;
use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The bound on each command.
const TIMEOUT: Duration = Duration::from_secs(20);

both_stores!(admin_grant_gives_a_user_a_right_in_an_org);

/// Runs `keyplane args..` (no inherited `KEYPLANE_*` setting) to completion within [`TIMEOUT`].
/// Its output is a JSON line or an error message, which fits in the pipe buffers.
fn keyplane<I, S>(args: I) -> CommandOutput
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut command = common::keyplane();
    command
        .args(args.into_iter().map(Into::into))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let described = format!("{command:?}");
    // Killed and reaped if it outlives TIMEOUT.
    let mut child = KillOnDrop(command.spawn().expect("spawn keyplane"));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("poll keyplane") {
            break status;
        }
        if Instant::now() > deadline {
            panic!("keyplane did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    CommandOutput {
        command: described,
        status,
        stdout,
        stderr,
    }
}

/// `keyplane admin grant --org ORG <args> <store flags>`.
fn grant(store: &[OsString], org: &str, args: &[&str]) -> CommandOutput {
    let mut all: Vec<OsString> = vec!["admin".into(), "grant".into(), "--org".into(), org.into()];
    all.extend(args.iter().map(OsString::from));
    all.extend(store.iter().cloned());
    keyplane(all)
}

fn json_line(output: &CommandOutput) -> Value {
    assert!(output.status.success(), "stderr: {}", output.stderr);
    serde_json::from_str(output.stdout.trim()).expect("one JSON line on stdout")
}

fn assert_fails(output: &CommandOutput, says: &str) {
    assert!(!output.status.success(), "succeeded: {}", output.stdout);
    assert!(output.stdout.is_empty(), "stdout: {}", output.stdout);
    assert!(
        output.stderr.contains(says),
        "stderr does not say {says:?}: {}",
        output.stderr
    );
}

async fn admin_grant_gives_a_user_a_right_in_an_org(backend: Backend) {
    let test_store = TestStore::new(backend).await;
    let store = test_store.args();
    let mut create: Vec<OsString> = ["admin", "create-org", "--name", "acme", "--json"]
        .map(OsString::from)
        .to_vec();
    create.extend(store.iter().cloned());
    let org = json_line(&keyplane(create))["org_id"]
        .as_str()
        .unwrap()
        .to_string();

    let issuer = "https://idp.example/realms/acme";
    let owner = json_line(&grant(
        &store,
        &org,
        &["--user-sub", "alice", "--issuer", issuer, "--account-owner"],
    ));
    let alice = UserId::from_subject(issuer, "alice");
    let fields: BTreeSet<&str> = owner
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "id",
            "grant_kind",
            "subject_type",
            "subject_id",
            "capability_key",
            "resource_type",
            "resource_id",
            "created_at",
            "revoked_at",
        ])
    );
    assert_eq!(owner["grant_kind"], "account_owner");
    assert_eq!(owner["subject_type"], "user");
    assert_eq!(owner["subject_id"], alice.to_string());
    assert_eq!(owner["capability_key"], Value::Null);
    assert_eq!(owner["revoked_at"], Value::Null);

    let bob = "3c90c3cc-0d44-4b50-8888-8dd25736052a";
    let manager = json_line(&grant(
        &store,
        &org,
        &["--user-id", bob, "--capability", "auth.manage"],
    ));
    assert_eq!(manager["grant_kind"], "capability");
    assert_eq!(manager["subject_id"], bob);
    assert_eq!(manager["capability_key"], "auth.manage");

    // The UUID-subject rule is the server's: a UUID sub is the id only from the issuer named by
    // --oidc-uuid-subjects; from any other issuer it is hashed like any other sub.
    let carol = "0b7e6d9c-5f4a-4c3b-9a1e-2d8f7c6b5a49";
    let from_trusted = json_line(&grant(
        &store,
        &org,
        &[
            "--user-sub",
            carol,
            "--issuer",
            issuer,
            "--oidc-uuid-subjects",
            issuer,
            "--capability",
            "auth.manage",
        ],
    ));
    assert_eq!(from_trusted["subject_id"], carol);
    let elsewhere = "https://idp.example/realms/other";
    let from_other = json_line(&grant(
        &store,
        &org,
        &[
            "--user-sub",
            carol,
            "--issuer",
            elsewhere,
            "--oidc-uuid-subjects",
            issuer,
            "--capability",
            "auth.manage",
        ],
    ));
    assert_eq!(
        from_other["subject_id"],
        UserId::from_subject(elsewhere, carol).to_string()
    );

    // Stored as the API stores grants, with no acting user: the operator is not one.
    let opened = keyplane_store::connect(&test_store.db.url).await.unwrap();
    let stored = opened
        .list_grants_of_subject(SubjectType::User, alice.as_uuid())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id.to_string(), owner["id"].as_str().unwrap());
    assert_eq!(stored[0].tenant_id, TenantId::parse(&org).unwrap());
    assert_eq!(stored[0].created_by_user_id, None);

    // The trail says the grant came from `admin grant`, and for whom by the issuer's own names.
    let mut audit: Vec<OsString> = ["admin", "audit", "--org", &org]
        .map(OsString::from)
        .to_vec();
    audit.extend(["--action", "authorization.created"].map(OsString::from));
    audit.extend(store.iter().cloned());
    let output = keyplane(audit);
    assert!(output.status.success(), "stderr: {}", output.stderr);
    let events: Vec<Value> = output
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let event_of = |grant: &Value| {
        events
            .iter()
            .find(|e| e["target"]["id"] == grant["id"])
            .unwrap_or_else(|| panic!("no authorization.created for {grant}: {events:?}"))
            .clone()
    };
    let owner_event = event_of(&owner);
    assert_eq!(owner_event["actor"]["type"], "system");
    assert_eq!(owner_event["details"]["via"], "admin grant");
    assert_eq!(owner_event["details"]["subject_issuer"], issuer);
    assert_eq!(owner_event["details"]["subject_sub"], "alice");
    let manager_event = event_of(&manager);
    assert_eq!(manager_event["details"]["via"], "admin grant");
    assert_eq!(manager_event["details"]["subject_id"], bob);
    assert_eq!(manager_event["details"].get("subject_sub"), None);

    assert_fails(
        &grant(
            &store,
            &org,
            &["--user-sub", "alice", "--issuer", issuer, "--account-owner"],
        ),
        "already exists",
    );
    // A user holds at most 64 live grants in an organization; the operator is told the limit.
    let dave = "6f1d2c3b-4a59-4e68-9d7c-8b9a0f1e2d3c";
    for i in 0..keyplane_core::grant::MAX_LIVE_GRANTS_PER_SUBJECT {
        keyplane_server::ops::grant_as_operator(
            opened.as_ref(),
            TenantId::parse(&org).unwrap(),
            keyplane_core::NewGrant {
                kind: keyplane_core::GrantKind::Capability,
                subject_type: SubjectType::User,
                subject_id: dave.parse().unwrap(),
                capability_key: Some(
                    keyplane_core::Scope::parse(&format!("custom.right{i}")).unwrap(),
                ),
                resource: keyplane_core::GrantResource {
                    resource_type: None,
                    resource_id: None,
                },
            },
            None,
            &keyplane_core::Operator {
                os_user: "test".into(),
                name: None,
            },
        )
        .await
        .expect("a grant within the cap");
    }
    assert_fails(
        &grant(
            &store,
            &org,
            &["--user-id", dave, "--capability", "auth.manage"],
        ),
        "cannot grant: the subject already holds 64 live grants",
    );
    let nowhere = "00000000-0000-4000-8000-000000000000";
    assert_fails(
        &grant(&store, nowhere, &["--user-id", bob, "--account-owner"]),
        &format!("no organization with id {nowhere}"),
    );
    assert_fails(
        &grant(
            &store,
            &org,
            &["--user-id", bob, "--capability", "no spaces"],
        ),
        "--capability",
    );
}

#[test]
fn admin_grant_needs_one_user_and_one_right() {
    let org = "00000000-0000-4000-8000-000000000000";
    let user = "3c90c3cc-0d44-4b50-8888-8dd25736052a";
    let cases: [(&[&str], &str); 6] = [
        (&["--account-owner"], "--user-sub"),
        (&["--user-id", user], "--account-owner"),
        (&["--user-sub", "alice", "--account-owner"], "--issuer"),
        (
            &[
                "--user-id",
                user,
                "--user-sub",
                "a",
                "--issuer",
                "https://i",
                "--account-owner",
            ],
            "cannot be used with",
        ),
        (
            &[
                "--user-id",
                user,
                "--account-owner",
                "--capability",
                "auth.manage",
            ],
            "cannot be used with",
        ),
        (
            &["--user-id", "not-a-uuid", "--account-owner"],
            "not a UUID",
        ),
    ];
    // Never opened (clap refuses first), but a temporary one all the same.
    let dir = tempfile::tempdir().unwrap();
    let store: Vec<OsString> = vec!["--data-dir".into(), dir.path().into()];
    for (args, says) in cases {
        let output = grant(&store, org, args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", output.stderr);
        assert!(output.stderr.contains(says), "{args:?}: {}", output.stderr);
    }
}
