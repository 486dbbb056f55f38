//! One suite, both backends: every case runs against SQLite and against PostgreSQL, but for the
//! few races only PostgreSQL has (`postgres_suite!`), which run against PostgreSQL alone.

use chrono::{DateTime, TimeDelta, Utc};
use keyplane_core::validate::truncate_to_micros;
use keyplane_core::{
    Credential, CredentialKind, CredentialPolicy, Grant, GrantKind, GrantResource, LeakAction,
    LifetimeRule, NewCredential, NewGrant, Rotation, RotationOptions, Scope, ScopeSet, SubjectType,
    Tenant, TenantId, UserId,
};
use keyplane_store::testing::{Backend, TestDatabase};
use keyplane_store::{
    CredentialUse, GrantFilter, IdempotencyClaim, IdempotencyRecord, IdempotentAnswer, KeptAnswer,
    ListCredentials, NewTenant, Store, StoreError, StoredResponse, TenantCreated,
};
use rand::rngs::OsRng;
use std::sync::Arc;

/// An event to go with a write; its tenant and content do not matter to these cases.
fn ev() -> keyplane_core::AuditEvent {
    keyplane_core::AuditEvent::new(
        uuid::Uuid::now_v7(),
        TenantId::new(),
        now(),
        keyplane_core::audit::actions::API_TOKEN_CREATED,
        keyplane_core::AuditActor::system(),
        Default::default(),
    )
}

fn now() -> DateTime<Utc> {
    truncate_to_micros(Utc::now())
}

struct Fixture {
    store: Arc<dyn Store>,
    tenant: Tenant,
    _db: TestDatabase,
}

impl Fixture {
    /// The stored API token `id` of the fixture's tenant.
    async fn api_token(&self, id: keyplane_core::CredentialId) -> Credential {
        self.store
            .get_credential(self.tenant.id, CredentialKind::ApiToken, id)
            .await
            .unwrap()
            .expect("the token is stored")
    }
}

async fn fixture(backend: Backend) -> Fixture {
    let db = TestDatabase::new(backend).await;
    let store = keyplane_store::connect(&db.url).await.expect("connect");
    let tenant = Tenant {
        id: TenantId::new(),
        name: "acme".into(),
        created_at: now(),
    };
    let (first, _) = new_token(tenant.id, "bootstrap");
    create_tenant(store.as_ref(), &tenant, Some(&first), false)
        .await
        .unwrap();
    Fixture {
        store,
        tenant,
        _db: db,
    }
}

fn new_token(tenant_id: TenantId, name: &str) -> (Credential, keyplane_core::Plaintext) {
    NewCredential {
        tenant_id,
        kind: CredentialKind::ApiToken,
        name: name.into(),
        scopes: ScopeSet::wildcard(),
        permissions: Vec::new(),
        expires_at: Some(now() + TimeDelta::days(1)),
        created_by: keyplane_core::CreatedBy::system(keyplane_core::Channel::Api),
        canary: false,
    }
    .issue(now(), &mut OsRng)
}

/// PostgreSQL answers its clock (with the round trip it took to read it); SQLite has no other
/// clock than the process's own and answers none.
async fn the_database_clock_is_read_on_postgres_only(backend: Backend) {
    let f = fixture(backend).await;
    let before = Utc::now();
    let reading = f.store.database_clock().await.expect("read the clock");
    let after = Utc::now();
    match backend {
        Backend::Sqlite => assert!(reading.is_none()),
        Backend::Postgres => {
            let reading = reading.expect("PostgreSQL's clock");
            // The same host's clock, read between the two.
            let slack = TimeDelta::milliseconds(500);
            assert!(
                reading.at >= before - slack && reading.at <= after + slack,
                "{} not within {before} .. {after}",
                reading.at
            );
            assert!(reading.sent <= reading.midpoint() && reading.midpoint() <= reading.received);
            assert!(reading.round_trip() < std::time::Duration::from_secs(5));
        }
    }
}

async fn created_credential_round_trips(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, plaintext) = new_token(f.tenant.id, "ci");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let got = f.api_token(credential.id).await;
    assert_eq!(got, credential);
    let by_hash = f
        .store
        .find_credential_by_hash(&plaintext.hash())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_hash.id, credential.id);
    assert_eq!(
        f.store.get_tenant(f.tenant.id).await.unwrap(),
        Some(f.tenant.clone())
    );
}

async fn names_are_unique_among_live_credentials(backend: Backend) {
    let f = fixture(backend).await;
    let (first, _) = new_token(f.tenant.id, "deploy");
    f.store
        .insert_credential(&first, &ev(), None)
        .await
        .unwrap();
    let (second, _) = new_token(f.tenant.id, "deploy");
    assert!(matches!(
        f.store.insert_credential(&second, &ev(), None).await,
        Err(StoreError::Conflict(_))
    ));
    f.store
        .revoke_credential(
            f.tenant.id,
            CredentialKind::ApiToken,
            first.id,
            now(),
            None,
            &ev(),
            &|_| ev(),
            None,
        )
        .await
        .unwrap();
    f.store
        .insert_credential(&second, &ev(), None)
        .await
        .unwrap();
}

async fn rotation_keeps_the_id_and_replaces_the_hash(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, old) = new_token(f.tenant.id, "rotating");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let (rotation, new) = Rotation::mint(&credential, Default::default(), None, now(), &mut OsRng);
    let rotated = f
        .store
        .rotate_credential(
            f.tenant.id,
            CredentialKind::ApiToken,
            credential.id,
            &credential.secret_hash,
            &rotation,
            &ev(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(rotated.id, credential.id);
    assert!(f
        .store
        .find_credential_by_hash(&old.hash())
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        f.store
            .find_credential_by_hash(&new.hash())
            .await
            .unwrap()
            .unwrap()
            .id,
        credential.id
    );
}

async fn revocation_is_permanent_and_idempotent(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, _) = new_token(f.tenant.id, "revoked");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let user = UserId::from_subject("https://idp", "alice");
    let first = f
        .store
        .revoke_credential(
            f.tenant.id,
            CredentialKind::ApiToken,
            credential.id,
            now(),
            Some(user),
            &ev(),
            &|_| ev(),
            None,
        )
        .await
        .unwrap();
    let again = f
        .store
        .revoke_credential(
            f.tenant.id,
            CredentialKind::ApiToken,
            credential.id,
            now() + TimeDelta::seconds(5),
            None,
            &ev(),
            &|_| ev(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(first.revoked_at, again.revoked_at);
    assert_eq!(again.revoked_by_user_id, Some(user));
    let (rotation, _) = Rotation::mint(&credential, Default::default(), None, now(), &mut OsRng);
    assert!(matches!(
        f.store
            .rotate_credential(
                f.tenant.id,
                CredentialKind::ApiToken,
                credential.id,
                &credential.secret_hash,
                &rotation,
                &ev(),
                None
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
}

async fn other_tenants_and_kinds_are_invisible(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, _) = new_token(f.tenant.id, "mine");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let other = TenantId::new();
    assert!(f
        .store
        .get_credential(other, CredentialKind::ApiToken, credential.id)
        .await
        .unwrap()
        .is_none());
    assert!(f
        .store
        .get_credential(f.tenant.id, CredentialKind::ServiceAccount, credential.id)
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        f.store
            .revoke_credential(
                other,
                CredentialKind::ApiToken,
                credential.id,
                now(),
                None,
                &ev(),
                &|_| ev(),
                None,
            )
            .await,
        Err(StoreError::NotFound)
    ));
}

async fn listing_pages_in_creation_order(backend: Backend) {
    let f = fixture(backend).await;
    for i in 0..5 {
        let (credential, _) = new_token(f.tenant.id, &format!("t{i}"));
        f.store
            .insert_credential(&credential, &ev(), None)
            .await
            .unwrap();
    }
    let query = |after, include_revoked| ListCredentials {
        tenant_id: f.tenant.id,
        kind: CredentialKind::ApiToken,
        after,
        limit: Some(3),
        include_revoked,
        expiring: None,
        include_canaries: true,
    };
    let first = f.store.list_credentials(&query(None, false)).await.unwrap();
    let names: Vec<_> = first.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["bootstrap", "t0", "t1"]);
    let second = f
        .store
        .list_credentials(&query(Some(first[2].id), false))
        .await
        .unwrap();
    let names: Vec<_> = second.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["t2", "t3", "t4"]);
    f.store
        .revoke_credential(
            f.tenant.id,
            CredentialKind::ApiToken,
            second[0].id,
            now(),
            None,
            &ev(),
            &|_| ev(),
            None,
        )
        .await
        .unwrap();
    let live = f
        .store
        .list_credentials(&query(Some(first[2].id), false))
        .await
        .unwrap();
    assert_eq!(live.len(), 2);
    let all = f
        .store
        .list_credentials(&query(Some(first[2].id), true))
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
}

async fn last_used_batches_are_applied(backend: Backend) {
    let f = fixture(backend).await;
    let (a, _) = new_token(f.tenant.id, "a");
    let (b, _) = new_token(f.tenant.id, "b");
    f.store.insert_credential(&a, &ev(), None).await.unwrap();
    f.store.insert_credential(&b, &ev(), None).await.unwrap();
    let at = now();
    f.store
        .record_last_used(&[
            CredentialUse {
                id: a.id,
                at,
                secret: a.secret_hash.prefix(),
            },
            CredentialUse {
                id: b.id,
                at,
                secret: b.secret_hash.prefix(),
            },
        ])
        .await
        .unwrap();
    for id in [a.id, b.id] {
        let got = f.api_token(id).await;
        assert_eq!(got.last_used_at, Some(at));
    }
}

/// A new API token of the fixture's tenant, rotated with an hour's grace: the token, its previous
/// secret and the rotation (its current secret).
async fn rotated_within_an_hours_grace(
    f: &Fixture,
    name: &str,
) -> (Credential, keyplane_core::Plaintext, Rotation) {
    let (credential, previous) = new_token(f.tenant.id, name);
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let (rotation, _) = Rotation::mint(
        &credential,
        grace(3600),
        credential.expires_at,
        now(),
        &mut OsRng,
    );
    rotate(f, &credential, &rotation).await;
    (credential, previous, rotation)
}

/// An older use written after a newer one (another replica's flush) leaves the newer one, for the
/// current and the previous secret alike. The times differ below the second, where SQLite's text
/// has 0, 3 or 6 fractional digits.
async fn last_uses_only_move_forward(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, old, rotation) = rotated_within_an_hours_grace(&f, "used").await;
    let whole = DateTime::from_timestamp(1_900_000_000, 0).unwrap();
    let millis = whole + TimeDelta::milliseconds(500);
    let micros = millis + TimeDelta::microseconds(1);
    let later = whole + TimeDelta::seconds(1);
    for (at, expected) in [
        (millis, millis),
        (whole, millis),
        (micros, micros),
        (millis, micros),
        (whole, micros),
        (later, later),
    ] {
        f.store
            .record_last_used(&[
                CredentialUse {
                    id: credential.id,
                    at,
                    secret: rotation.secret_hash.prefix(),
                },
                CredentialUse {
                    id: credential.id,
                    at,
                    secret: old.hash().prefix(),
                },
            ])
            .await
            .unwrap();
        let got = f.api_token(credential.id).await;
        assert_eq!(got.last_used_at, Some(expected), "after a use at {at}");
        assert_eq!(
            got.previous_secret.unwrap().last_used_at,
            Some(expected),
            "previous secret, after a use at {at}"
        );
    }
}

/// One batch may hold a credential's uses under its current and its previous secret, several of
/// each, and a secret that is neither any more, in any order: each secret keeps its own latest use,
/// and the stranger's counts for nothing.
async fn a_batch_credits_each_secret_its_latest_use(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, previous, rotation) = rotated_within_an_hours_grace(&f, "rotated").await;
    let (other, _) = new_token(f.tenant.id, "other");
    f.store
        .insert_credential(&other, &ev(), None)
        .await
        .unwrap();
    let (stranger, _) = new_token(f.tenant.id, "stranger");
    let at = |seconds: i64| DateTime::from_timestamp(1_900_000_000 + seconds, 0).unwrap();
    let current = rotation.secret_hash.prefix();
    let previous = previous.hash().prefix();
    let uses = [
        (credential.id, at(2), current),
        (credential.id, at(9), stranger.secret_hash.prefix()),
        (other.id, at(4), other.secret_hash.prefix()),
        (credential.id, at(5), previous),
        (credential.id, at(7), current),
        (credential.id, at(1), previous),
        (other.id, at(6), other.secret_hash.prefix()),
        (credential.id, at(3), current),
        (other.id, at(5), other.secret_hash.prefix()),
    ]
    .map(|(id, at, secret)| CredentialUse { id, at, secret });
    f.store.record_last_used(&uses).await.unwrap();
    let got = f.api_token(credential.id).await;
    assert_eq!(got.last_used_at, Some(at(7)));
    assert_eq!(got.previous_secret.unwrap().last_used_at, Some(at(5)));
    assert_eq!(f.api_token(other.id).await.last_used_at, Some(at(6)));
}

/// Records a migration newer than any this keyplane has as applied, as a newer keyplane would;
/// returns the highest one that was applied before.
async fn record_a_newer_migration(url: &str, version: i64) -> i64 {
    let highest = "SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE";
    let record =
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a newer keyplane', TRUE, $2, 0)";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let known = sqlx::query_scalar(highest).fetch_one(&pool).await.unwrap();
        let recorded = sqlx::query(record)
            .bind(version)
            .bind([0_u8; 48].as_slice());
        recorded.execute(&pool).await.unwrap();
        known
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let known = sqlx::query_scalar(highest).fetch_one(&pool).await.unwrap();
        sqlx::query(record)
            .bind(version)
            .bind([0_u8; 48].as_slice())
            .execute(&pool)
            .await
            .unwrap();
        known
    }
}

/// Why opening the store at `url` fails, if it does.
async fn connect_error(url: &str) -> Option<String> {
    keyplane_store::connect(url)
        .await
        .err()
        .map(|e| e.to_string())
}

/// Creates the store at `url` at this keyplane's schema, and closes it.
async fn create_store(url: &str) {
    keyplane_store::connect(url).await.unwrap().close().await;
}

/// A rollback: a database that a newer keyplane has migrated is refused, by `serve` and `admin`
/// alike (both open it with `connect`), rather than served without the columns this one does not
/// know. A database at this keyplane's own schema opens again as before.
async fn a_schema_from_a_newer_keyplane_is_refused(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    create_store(&db.url).await;
    keyplane_store::connect(&db.url)
        .await
        .expect("a re-connect at the same schema")
        .close()
        .await;
    let known = record_a_newer_migration(&db.url, 9999).await;
    let refused = connect_error(&db.url).await;
    let expected = format!(
        "the database's schema is at 9999, written by a newer keyplane; this one knows up to {known}"
    );
    assert!(
        refused.as_deref().is_some_and(|e| e.contains(&expected)),
        "{refused:?}"
    );
}

/// The console statements of the release before migration 0016 (e45e23c, `sql.rs`), verbatim:
/// such replicas keep serving a store a newer one has migrated, during a rolling upgrade.
const PREVIOUS_SET_CONSOLE_SESSION_SECRET: &str =
    "UPDATE console_sessions SET sealed_secret = $2 WHERE id_hash = $1";
const PREVIOUS_TOUCH_CONSOLE_SESSION: &str = "UPDATE console_sessions SET last_seen_at_ms = $2 WHERE id_hash = $1 AND ends_at_ms > $2 AND last_seen_at_ms > $3 \
     RETURNING id_hash, tenant_id, sealed_token, label, created_at_ms, last_seen_at_ms, ends_at_ms, notice, sealed_secret";
const PREVIOUS_TAKE_CONSOLE_SESSION_SECRET: &str =
    "UPDATE console_sessions SET sealed_secret = NULL WHERE id_hash = $1 AND sealed_secret = $2";

/// A replica of the previous release, still running on a store the current one migrated, keeps
/// its console working: it keeps a one-time secret, finds it on the next page and takes it; and
/// the session stays usable by the current release.
async fn previous_release_console_statements_run_on_the_current_schema(backend: Backend) {
    let f = fixture(backend).await;
    let t = now();
    let session = console_session(f.tenant.id, 7, t);
    f.store
        .insert_console_session(&session, &started(&session))
        .await
        .unwrap();
    let id = [7_u8; 32];
    let sealed = b"sealed one-time secret".to_vec();
    let (now_ms, idle_since_ms) = (
        (t + TimeDelta::minutes(1)).timestamp_millis(),
        (t - TimeDelta::minutes(29)).timestamp_millis(),
    );
    // A write of the session's secret by the previous release, which must change its row.
    macro_rules! secret_write {
        ($pool:expr, $statement:expr, $what:literal) => {
            let done = sqlx::query($statement)
                .bind(id.as_slice())
                .bind(sealed.as_slice())
                .execute($pool)
                .await
                .expect(concat!("the previous release ", $what));
            assert_eq!(done.rows_affected(), 1, $what);
        };
    }
    macro_rules! previous_release {
        ($pool:expr) => {{
            let pool = $pool;
            secret_write!(&pool, PREVIOUS_SET_CONSOLE_SESSION_SECRET, "keeps a secret");
            let touched = sqlx::query(PREVIOUS_TOUCH_CONSOLE_SESSION)
                .bind(id.as_slice())
                .bind(now_ms)
                .bind(idle_since_ms)
                .fetch_optional(&pool)
                .await
                .expect("the previous release touches a session")
                .expect("a live session");
            let shown: Option<Vec<u8>> = sqlx::Row::get(&touched, "sealed_secret");
            assert_eq!(shown.as_ref(), Some(&sealed));
            secret_write!(
                &pool,
                PREVIOUS_TAKE_CONSOLE_SESSION_SECRET,
                "takes a secret"
            );
            pool.close().await;
        }};
    }
    if backend == Backend::Sqlite {
        previous_release!(sqlx::SqlitePool::connect(&f._db.url).await.unwrap());
    } else {
        previous_release!(sqlx::PgPool::connect(&f._db.url).await.unwrap());
    }
    let later = t + TimeDelta::minutes(2);
    let touched = f
        .store
        .touch_console_session(&id, later, later - TimeDelta::minutes(30))
        .await
        .unwrap()
        .expect("the current release still serves the session");
    assert_eq!(touched.sealed_token, session.sealed_token);
}

/// A creator of each kind: a user through the console, a credential through the API, an operator
/// (with and without a name) through an admin command.
fn creators() -> Vec<keyplane_core::CreatedBy> {
    use keyplane_core::audit::ActorType;
    use keyplane_core::{Channel, CreatedBy, Operator};
    let user = UserId::from_subject("https://idp.example", "alice");
    vec![
        CreatedBy {
            actor_type: ActorType::User,
            actor_id: Some(user.as_uuid()),
            via: Channel::Console,
            operator: None,
        },
        CreatedBy {
            actor_type: ActorType::ServiceAccount,
            actor_id: Some(uuid::Uuid::new_v4()),
            via: Channel::Api,
            operator: None,
        },
        CreatedBy::operator(&Operator {
            os_user: "root".into(),
            name: Some("Alice Ops".into()),
        }),
        CreatedBy::operator(&Operator {
            os_user: "uid 1000".into(),
            name: None,
        }),
        CreatedBy::system(Channel::Bootstrap),
    ]
}

/// Who created a credential or grant is kept on its row, through every way of writing one, and
/// read back as it was written (`created_by_user_id` still set for a user).
async fn credentials_and_grants_keep_their_creator(backend: Backend) {
    let f = fixture(backend).await;
    for (i, by) in creators().into_iter().enumerate() {
        let (mut credential, _) = new_token(f.tenant.id, &format!("made-{i}"));
        credential.created_by_user_id = by.user_id();
        credential.created_by = Some(by.clone());
        f.store
            .insert_credential(&credential, &ev(), None)
            .await
            .unwrap();
        let stored = f.api_token(credential.id).await;
        assert_eq!(stored.created_by.as_ref(), Some(&by), "{by:?}");
        assert_eq!(stored.created_by_user_id, by.user_id());

        let (mut imported, _) = new_token(f.tenant.id, &format!("imported-{i}"));
        imported.created_by = Some(by.clone());
        f.store
            .import_credentials(&[imported.clone()], &[])
            .await
            .unwrap();
        assert_eq!(f.api_token(imported.id).await.created_by, Some(by.clone()));

        let grant = NewGrant {
            kind: GrantKind::Capability,
            subject_type: SubjectType::User,
            subject_id: uuid::Uuid::new_v4(),
            capability_key: Some(Scope::parse("audit:read").unwrap()),
            resource: GrantResource {
                resource_type: None,
                resource_id: None,
            },
        }
        .issue(f.tenant.id, now(), by.clone());
        f.store.insert_grant(&grant, &ev(), None).await.unwrap();
        let stored = f
            .store
            .get_grant(f.tenant.id, grant.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored, grant);
        assert_eq!(stored.created_by, Some(by.clone()));
        assert_eq!(stored.created_by_user_id, by.user_id());
    }
    // A new organization's first token, and a registry's default robot.
    let tenant = Tenant {
        id: TenantId::new(),
        name: "second".into(),
        created_at: now(),
    };
    let (mut first, _) = new_token(tenant.id, "bootstrap");
    let by = creators().remove(2);
    first.created_by = Some(by.clone());
    create_tenant(f.store.as_ref(), &tenant, Some(&first), false)
        .await
        .unwrap();
    let stored = f
        .store
        .get_credential(tenant.id, CredentialKind::ApiToken, first.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.created_by, Some(by));
}

/// A creator a later release records (an actor type or channel this one does not know) reads as
/// unknown: the row itself, which a verification needs, still reads, during a rolling upgrade or
/// after a rollback.
async fn a_creator_a_later_release_recorded_reads_as_unknown(backend: Backend) {
    let f = fixture(backend).await;
    let (mut credential, plaintext) = new_token(f.tenant.id, "made-later");
    credential.created_by = Some(creators().remove(0));
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let later = "UPDATE credentials SET created_by_actor_type = 'workload', \
                 created_by_via = 'federation'";
    if backend == Backend::Sqlite {
        let pool = sqlx::SqlitePool::connect(&f._db.url).await.unwrap();
        sqlx::query(later).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
        sqlx::query(later).execute(&pool).await.unwrap();
        pool.close().await;
    }
    let found = f
        .store
        .find_credential_by_hash(&plaintext.hash())
        .await
        .expect("a verification still reads the row")
        .expect("found");
    assert_eq!(found.id, credential.id);
    assert_eq!(found.created_by, None);
    assert_eq!(f.api_token(credential.id).await.created_by, None);
}

/// The previous release's writes of credentials and grants, which know no `created_by_*`
/// column (0019), still run on a store the current release migrated, during a rolling upgrade;
/// the current release reads their creator as unknown. And the previous release still reads a
/// row the current one wrote.
const PREVIOUS_INSERT_CREDENTIAL: &str = "INSERT INTO credentials (id, tenant_id, kind, name, secret_hash, display_prefix, public_id, last4, scopes, permissions, expires_at, created_at, updated_at, last_used_at, revoked_at, created_by_user_id, revoked_by_user_id, canary) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)";
const PREVIOUS_INSERT_GRANT: &str = "INSERT INTO grants (id, tenant_id, grant_kind, subject_type, subject_id, capability_key, resource_type, resource_id, created_at, revoked_at, created_by_user_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
const PREVIOUS_SELECT_CREDENTIAL: &str = "SELECT id, tenant_id, kind, name, secret_hash, display_prefix, public_id, last4, scopes, permissions, expires_at, created_at, updated_at, last_used_at, revoked_at, created_by_user_id, revoked_by_user_id, suspended_at, rotated_at, previous_secret_hash, previous_secret_expires_at, previous_secret_last_used_at, retire_previous_when_unused_seconds, expiry_notice_days, canary FROM credentials WHERE id = $1";

async fn previous_release_writes_credentials_and_grants_without_a_creator(backend: Backend) {
    let f = fixture(backend).await;
    let (theirs, _) = new_token(f.tenant.id, "theirs");
    let user = UserId::from_subject("https://idp.example", "alice");
    let grant_id = uuid::Uuid::now_v7();
    let (ours, _) = new_token(f.tenant.id, "ours");
    f.store.insert_credential(&ours, &ev(), None).await.unwrap();
    macro_rules! previous_release {
        ($pool:expr) => {{
            let pool = $pool;
            sqlx::query(PREVIOUS_INSERT_CREDENTIAL)
                .bind(theirs.id.as_uuid())
                .bind(f.tenant.id.as_uuid())
                .bind("api_token")
                .bind(&theirs.name)
                .bind(&theirs.secret_hash.as_bytes()[..])
                .bind(&theirs.display.prefix)
                .bind(&theirs.display.public_id)
                .bind(&theirs.display.last4)
                .bind("[]")
                .bind(None::<String>)
                .bind(theirs.expires_at)
                .bind(theirs.created_at)
                .bind(theirs.updated_at)
                .bind(None::<DateTime<Utc>>)
                .bind(None::<DateTime<Utc>>)
                .bind(Some(user.as_uuid()))
                .bind(None::<uuid::Uuid>)
                .bind(false)
                .execute(&pool)
                .await
                .expect("the previous release inserts a credential");
            sqlx::query(PREVIOUS_INSERT_GRANT)
                .bind(grant_id)
                .bind(f.tenant.id.as_uuid())
                .bind("capability")
                .bind("user")
                .bind(uuid::Uuid::new_v4())
                .bind("audit:read")
                .bind(None::<String>)
                .bind(None::<String>)
                .bind(now())
                .bind(None::<DateTime<Utc>>)
                .bind(Some(user.as_uuid()))
                .execute(&pool)
                .await
                .expect("the previous release inserts a grant");
            let read = sqlx::query(PREVIOUS_SELECT_CREDENTIAL)
                .bind(ours.id.as_uuid())
                .fetch_optional(&pool)
                .await
                .expect("the previous release reads a credential");
            assert!(
                read.is_some(),
                "the previous release finds the current one's row"
            );
            pool.close().await;
        }};
    }
    if backend == Backend::Sqlite {
        previous_release!(sqlx::SqlitePool::connect(&f._db.url).await.unwrap());
    } else {
        previous_release!(sqlx::PgPool::connect(&f._db.url).await.unwrap());
    }
    let stored = f.api_token(theirs.id).await;
    assert_eq!(stored.created_by, None, "unknown");
    assert_eq!(stored.created_by_user_id, Some(user));
    let grant = f
        .store
        .get_grant(f.tenant.id, keyplane_core::GrantId::from_uuid(grant_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(grant.created_by, None, "unknown");
    assert_eq!(grant.created_by_user_id, Some(user));
    assert!(f.api_token(ours.id).await.created_by.is_some());
}

/// Sets the checksum sqlx recorded for migration `version` to another one, as a store migrated
/// with a different migration under that number has it.
async fn modify_applied_migration(url: &str, version: i64) {
    let modify = "UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2";
    let zeros = [0_u8; 48];
    let modified = if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let query = sqlx::query(modify).bind(zeros.as_slice()).bind(version);
        let done = query.execute(&pool).await.unwrap();
        pool.close().await;
        done.rows_affected()
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let query = sqlx::query(modify).bind(zeros.as_slice()).bind(version);
        let done = query.execute(&pool).await.unwrap();
        pool.close().await;
        done.rows_affected()
    };
    assert_eq!(modified, 1, "migration {version} was applied");
}

/// A store that ran another migration 14 than this keyplane's is refused, and the error says
/// which migration and what is wrong with it (not only that migrations were being applied).
async fn a_modified_migration_is_named_when_the_store_opens(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    create_store(&db.url).await;
    modify_applied_migration(&db.url, 14).await;
    let refused = connect_error(&db.url).await;
    assert!(
        refused.as_deref().is_some_and(
            |e| e.contains("migration 14 was previously applied but has been modified")
        ),
        "{refused:?}"
    );
}

/// A store at the schema of an older release: opened to read it is refused, naming both schema
/// versions, and left as it was; opened to migrate it, it is brought to this release's schema,
/// and the open says from which version.
async fn an_older_schema_is_migrated_only_when_asked(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    keyplane_store::testing::migrate_to(&db.url, 13).await;
    let latest = keyplane_store::testing::latest_schema();
    let refused = keyplane_store::open(&db.url, keyplane_store::PendingMigrations::Refuse)
        .await
        .err();
    assert!(
        matches!(refused, Some(StoreError::SchemaBehind { at: 13, latest: l }) if l == latest),
        "{refused:?}"
    );
    assert_eq!(keyplane_store::testing::schema_version(&db.url).await, 13);
    let opened = keyplane_store::open(&db.url, keyplane_store::PendingMigrations::Apply)
        .await
        .unwrap();
    assert_eq!((opened.migrated_from, opened.schema), (Some(13), latest));
    opened.store.close().await;
    assert_eq!(
        keyplane_store::testing::schema_version(&db.url).await,
        latest
    );
    // Up to date: opened to read it, nothing to do.
    let opened = keyplane_store::open(&db.url, keyplane_store::PendingMigrations::Refuse)
        .await
        .unwrap();
    assert_eq!((opened.migrated_from, opened.schema), (None, latest));
    opened.store.close().await;
    // A new store is created whatever the open is for: nothing can be serving it yet.
    let new = TestDatabase::new(backend).await;
    let opened = keyplane_store::open(&new.url, keyplane_store::PendingMigrations::Refuse)
        .await
        .unwrap();
    assert_eq!((opened.migrated_from, opened.schema), (Some(0), latest));
    opened.store.close().await;
}

/// Two processes opening one new store at once (e.g. `serve` and an `admin` command) both start:
/// one applies the migrations and the other finds them applied.
async fn two_processes_migrating_one_new_store_both_start(backend: Backend) {
    for attempt in 0..5 {
        let db = TestDatabase::new(backend).await;
        let (first, second) = tokio::join!(
            keyplane_store::connect(&db.url),
            keyplane_store::connect(&db.url)
        );
        for store in [first, second] {
            match store {
                Ok(store) => store.close().await,
                Err(error) => panic!("attempt {attempt}: {error}"),
            }
        }
    }
}

async fn bootstrap_happens_once(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = keyplane_store::connect(&db.url).await.unwrap();
    let tenant = Tenant {
        id: TenantId::new(),
        name: "default".into(),
        created_at: now(),
    };
    let (credential, _) = new_token(tenant.id, "bootstrap");
    assert!(store
        .bootstrap_once(&tenant, &credential, &[ev()])
        .await
        .unwrap());
    let tenant2 = Tenant {
        id: TenantId::new(),
        name: "default".into(),
        created_at: now(),
    };
    let (credential2, _) = new_token(tenant2.id, "bootstrap");
    assert!(!store
        .bootstrap_once(&tenant2, &credential2, &[ev()])
        .await
        .unwrap());
    // Reopening (a restart) applies migrations again without harm.
    let reopened = keyplane_store::connect(&db.url).await.unwrap();
    assert!(reopened.get_tenant(tenant.id).await.unwrap().is_some());
    assert!(reopened.get_tenant(tenant2.id).await.unwrap().is_none());
}

async fn a_store_with_tenants_is_never_bootstrapped(backend: Backend) {
    let f = fixture(backend).await;
    let tenant = Tenant {
        id: TenantId::new(),
        name: "default".into(),
        created_at: now(),
    };
    let (credential, _) = new_token(tenant.id, "bootstrap");
    assert!(!f
        .store
        .bootstrap_once(&tenant, &credential, &[ev()])
        .await
        .unwrap());
}

/// A new service account without scopes, not stored yet.
fn service_account(tenant_id: TenantId, name: &str) -> Credential {
    NewCredential {
        tenant_id,
        kind: CredentialKind::ServiceAccount,
        name: name.into(),
        scopes: ScopeSet::empty(),
        permissions: Vec::new(),
        expires_at: None,
        created_by: keyplane_core::CreatedBy::system(keyplane_core::Channel::Api),
        canary: false,
    }
    .issue(now(), &mut OsRng)
    .0
}

fn capability_grant(tenant_id: TenantId, subject: uuid::Uuid, key: &str) -> Grant {
    NewGrant {
        kind: GrantKind::Capability,
        subject_type: SubjectType::ServiceAccount,
        subject_id: subject,
        capability_key: Some(Scope::parse(key).unwrap()),
        resource: GrantResource {
            resource_type: None,
            resource_id: None,
        },
    }
    .issue(
        tenant_id,
        now(),
        keyplane_core::CreatedBy::system(keyplane_core::Channel::Api),
    )
}

async fn grants_filter_conflict_and_revoke(backend: Backend) {
    let f = fixture(backend).await;
    let (sa, sb) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let a_manage = capability_grant(f.tenant.id, sa, "auth.manage");
    let a_read = capability_grant(f.tenant.id, sa, "api_tokens:read");
    let b_manage = capability_grant(f.tenant.id, sb, "auth.manage");
    for g in [&a_manage, &a_read, &b_manage] {
        f.store.insert_grant(g, &ev(), None).await.unwrap();
    }
    assert!(matches!(
        f.store
            .insert_grant(
                &capability_grant(f.tenant.id, sa, "auth.manage"),
                &ev(),
                None
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    let of_a = f
        .store
        .list_grants(&GrantFilter::live_for(
            f.tenant.id,
            SubjectType::ServiceAccount,
            sa,
        ))
        .await
        .unwrap();
    assert_eq!(of_a, vec![a_manage.clone(), a_read.clone()]);
    let manage = f
        .store
        .list_grants(&GrantFilter {
            capability_key: Some("auth.manage".into()),
            ..GrantFilter::live_for(f.tenant.id, SubjectType::ServiceAccount, sa)
        })
        .await
        .unwrap();
    assert_eq!(manage, vec![a_manage.clone()]);
    let all = GrantFilter {
        subject_type: None,
        subject_id: None,
        ..GrantFilter::live_for(f.tenant.id, SubjectType::User, sa)
    };
    assert_eq!(f.store.list_grants(&all).await.unwrap().len(), 3);
    // A page at a time from a cursor: the same grants in the same order.
    let everything = f.store.list_grants(&all).await.unwrap();
    let first_page = GrantFilter {
        limit: Some(2),
        ..all.clone()
    };
    let first = f.store.list_grants(&first_page).await.unwrap();
    let after_first = GrantFilter {
        after: Some(first[1].id),
        ..all.clone()
    };
    let rest = f.store.list_grants(&after_first).await.unwrap();
    assert_eq!((first.len(), rest.len()), (2, 1));
    assert_eq!([first, rest].concat(), everything);

    let at = now();
    let revoked = f
        .store
        .revoke_grant(f.tenant.id, a_manage.id, at, &ev())
        .await
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(at));
    let again = f
        .store
        .revoke_grant(f.tenant.id, a_manage.id, at + TimeDelta::seconds(3), &ev())
        .await
        .unwrap();
    assert_eq!(again.revoked_at, Some(at));
    assert_eq!(f.store.list_grants(&all).await.unwrap().len(), 2);
    assert_eq!(
        f.store
            .list_grants(&GrantFilter {
                include_revoked: true,
                ..all
            })
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        f.store
            .get_grant(f.tenant.id, a_manage.id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        Some(at)
    );
    assert_eq!(
        f.store.get_grant(f.tenant.id, a_read.id).await.unwrap(),
        Some(a_read.clone())
    );
    assert_eq!(
        f.store.get_grant(TenantId::new(), a_read.id).await.unwrap(),
        None
    );
    // A revoked grant no longer blocks an identical new one.
    f.store
        .insert_grant(
            &capability_grant(f.tenant.id, sa, "auth.manage"),
            &ev(),
            None,
        )
        .await
        .unwrap();
    assert!(matches!(
        f.store
            .revoke_grant(TenantId::new(), a_read.id, at, &ev())
            .await,
        Err(StoreError::NotFound)
    ));
}

async fn import_is_all_or_nothing(backend: Backend) {
    let f = fixture(backend).await;
    let batch: Vec<_> = (0..1234)
        .map(|i| new_token(f.tenant.id, &format!("bulk{i}")))
        .collect();
    let credentials: Vec<Credential> = batch.iter().map(|(c, _)| c.clone()).collect();
    f.store
        .import_credentials(&credentials, &[ev()])
        .await
        .unwrap();
    let (sample, secret) = &batch[777];
    assert_eq!(
        f.store
            .find_credential_by_hash(&secret.hash())
            .await
            .unwrap()
            .as_ref(),
        Some(sample)
    );
    // A second batch with one duplicate live name imports nothing.
    let mut again: Vec<Credential> = (0..3)
        .map(|i| new_token(f.tenant.id, &format!("again{i}")).0)
        .collect();
    again.push(new_token(f.tenant.id, "bulk5").0);
    assert!(matches!(
        f.store.import_credentials(&again, &[ev()]).await,
        Err(StoreError::Conflict(_))
    ));
    let listed = f
        .store
        .list_credentials(&ListCredentials {
            tenant_id: f.tenant.id,
            kind: CredentialKind::ApiToken,
            after: None,
            limit: None,
            include_revoked: true,
            expiring: None,
            include_canaries: true,
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1235);
    // The failed import's connection was given up, not broken: the next writes go through.
    let (late, late_secret) = new_token(f.tenant.id, "after-the-conflict");
    f.store
        .import_credentials(std::slice::from_ref(&late), &[ev()])
        .await
        .unwrap();
    assert_eq!(
        f.store
            .find_credential_by_hash(&late_secret.hash())
            .await
            .unwrap(),
        Some(late)
    );
}

/// The lookups by many ids or secrets (`admin import-credentials`'s check of a file) find what
/// the lookups by one find, past a query's worth (500): by id in any tenant, by current or
/// previous secret; and nothing for the rest.
async fn lookups_by_many_find_what_lookups_by_one_find(backend: Backend) {
    let f = fixture(backend).await;
    let (other, _) = another_tenant(f.store.as_ref(), "other").await;
    let batch: Vec<_> = (0..1200)
        .map(|i| {
            new_token(
                if i % 2 == 0 { f.tenant.id } else { other.id },
                &format!("b{i}"),
            )
        })
        .collect();
    let credentials: Vec<Credential> = batch.iter().map(|(c, _)| c.clone()).collect();
    f.store
        .import_credentials(&credentials, &[ev()])
        .await
        .unwrap();
    let (rotated, previous, rotation) = rotated_within_an_hours_grace(&f, "rotated").await;
    let sorted = |mut found: Vec<Credential>| {
        found.sort_by_key(|c| c.id);
        found.into_iter().map(|c| c.id).collect::<Vec<_>>()
    };
    let strangers = [
        new_token(f.tenant.id, "stranger").0,
        new_token(other.id, "stranger").0,
    ];

    let mut ids: Vec<_> = strangers.iter().map(|c| c.id).collect();
    ids.extend(credentials.iter().skip(3).map(|c| c.id));
    ids.push(rotated.id);
    let mut expected: Vec<_> = credentials.iter().skip(3).map(|c| c.id).collect();
    expected.push(rotated.id);
    expected.sort();
    assert_eq!(
        sorted(f.store.find_credentials_by_ids(&ids).await.unwrap()),
        expected
    );

    let mut hashes: Vec<_> = strangers.iter().map(|c| c.secret_hash).collect();
    hashes.extend(batch.iter().skip(3).map(|(_, secret)| secret.hash()));
    hashes.push(previous.hash());
    assert_eq!(
        sorted(f.store.find_credentials_by_hashes(&hashes).await.unwrap()),
        expected
    );
    assert_eq!(
        sorted(
            f.store
                .find_credentials_by_hashes(&[rotation.secret_hash])
                .await
                .unwrap()
        ),
        [rotated.id]
    );
    assert!(f
        .store
        .find_credentials_by_ids(&[])
        .await
        .unwrap()
        .is_empty());
    assert!(f
        .store
        .find_credentials_by_hashes(&[])
        .await
        .unwrap()
        .is_empty());
}

async fn a_subjects_live_grants_span_tenants(backend: Backend) {
    let f = fixture(backend).await;
    let (other, _) = another_tenant(f.store.as_ref(), "globex").await;
    let user = UserId::from_subject("https://idp.example", "alice").as_uuid();
    let user_grant = |tenant_id: TenantId, kind: GrantKind, key: Option<&str>| {
        NewGrant {
            kind,
            subject_type: SubjectType::User,
            subject_id: user,
            capability_key: key.map(|k| Scope::parse(k).unwrap()),
            resource: GrantResource {
                resource_type: None,
                resource_id: None,
            },
        }
        .issue(
            tenant_id,
            now(),
            keyplane_core::CreatedBy::system(keyplane_core::Channel::Api),
        )
    };
    let here = user_grant(f.tenant.id, GrantKind::Capability, Some("auth.manage"));
    let there = user_grant(other.id, GrantKind::AccountOwner, None);
    let revoked = user_grant(other.id, GrantKind::Capability, Some("audit:read"));
    // Same uuid, other subject type: not the user's.
    let service_account = capability_grant(f.tenant.id, user, "api_tokens:read");
    let someone_else = user_grant(f.tenant.id, GrantKind::AccountOwner, None);
    let someone_else = Grant {
        subject_id: uuid::Uuid::new_v4(),
        ..someone_else
    };
    for g in [&here, &there, &revoked, &service_account, &someone_else] {
        f.store.insert_grant(g, &ev(), None).await.unwrap();
    }
    f.store
        .revoke_grant(other.id, revoked.id, now(), &ev())
        .await
        .unwrap();

    let mut expected = vec![here, there];
    expected.sort_by_key(|g| (g.tenant_id, g.id));
    assert_eq!(
        f.store
            .list_grants_of_subject(SubjectType::User, user)
            .await
            .unwrap(),
        expected
    );
    assert_eq!(
        f.store
            .list_grants_of_subject(SubjectType::ServiceAccount, user)
            .await
            .unwrap(),
        vec![service_account]
    );
    assert!(f
        .store
        .list_grants_of_subject(SubjectType::User, uuid::Uuid::new_v4())
        .await
        .unwrap()
        .is_empty());
}

/// Of two rotations that read the same secret, the second changes nothing and is `Conflict`.
async fn a_rotation_that_lost_the_race_changes_nothing(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, _) = new_token(f.tenant.id, "contested");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let (first, first_secret) =
        Rotation::mint(&credential, Default::default(), None, now(), &mut OsRng);
    let (second, second_secret) =
        Rotation::mint(&credential, Default::default(), None, now(), &mut OsRng);
    let rotate = |rotation: Rotation| {
        let store = f.store.clone();
        let (tenant, id, seen) = (f.tenant.id, credential.id, credential.secret_hash);
        async move {
            store
                .rotate_credential(
                    tenant,
                    CredentialKind::ApiToken,
                    id,
                    &seen,
                    &rotation,
                    &ev(),
                    None,
                )
                .await
        }
    };
    rotate(first).await.unwrap();
    let lost = rotate(second).await;
    assert!(
        matches!(lost, Err(StoreError::Conflict(_))),
        "the second rotation of the same secret: {lost:?}"
    );
    let by_first = f
        .store
        .find_credential_by_hash(&first_secret.hash())
        .await
        .unwrap();
    assert_eq!(by_first.map(|c| c.id), Some(credential.id));
    assert!(f
        .store
        .find_credential_by_hash(&second_secret.hash())
        .await
        .unwrap()
        .is_none());
}

async fn is_bootstrapped_says_whether_bootstrap_could_run(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = keyplane_store::connect(&db.url).await.unwrap();
    assert!(!store.is_bootstrapped().await.unwrap());
    let tenant = Tenant {
        id: TenantId::new(),
        name: "default".into(),
        created_at: now(),
    };
    let (credential, _) = new_token(tenant.id, "bootstrap");
    assert!(store
        .bootstrap_once(&tenant, &credential, &[ev()])
        .await
        .unwrap());
    assert!(store.is_bootstrapped().await.unwrap());
    // A store with tenants made another way counts too: bootstrap_once would do nothing there.
    assert!(fixture(backend)
        .await
        .store
        .is_bootstrapped()
        .await
        .unwrap());
}

/// Another connection holds the write lock: writes answer `Busy` in bounded time, reads go on, and
/// the store's write health says so until a write succeeds again.
async fn a_locked_store_answers_busy_while_reads_go_on(backend: Backend) {
    use sqlx::{Connection, Executor};
    let f = fixture(backend).await;
    let (kept, _) = new_token(f.tenant.id, "kept");
    f.store.insert_credential(&kept, &ev(), None).await.unwrap();
    assert_eq!(f.store.write_health(), Default::default());

    let lock: Box<dyn std::any::Any> = match backend {
        Backend::Sqlite => {
            let mut holder = sqlx::SqliteConnection::connect(&f._db.url).await.unwrap();
            holder.execute("BEGIN EXCLUSIVE").await.unwrap();
            Box::new(holder)
        }
        Backend::Postgres => {
            let mut holder = sqlx::PgConnection::connect(&f._db.url).await.unwrap();
            holder
                .execute("BEGIN; LOCK TABLE credentials IN EXCLUSIVE MODE")
                .await
                .unwrap();
            Box::new(holder)
        }
    };
    let (blocked, _) = new_token(f.tenant.id, "blocked");
    let started = std::time::Instant::now();
    let outcome = f.store.insert_credential(&blocked, &ev(), None).await;
    assert!(
        matches!(&outcome, Err(e) if e.fault() == Some(keyplane_store::StoreFault::Busy)),
        "a write behind a held lock: {outcome:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the write waited {:?}",
        started.elapsed()
    );
    let health = f.store.write_health();
    assert!(health.failing);
    assert_eq!(
        health.last_failure.map(|(fault, _)| fault),
        Some(keyplane_store::StoreFault::Busy)
    );
    // Reads are not behind the lock.
    let read = f
        .store
        .get_credential(f.tenant.id, CredentialKind::ApiToken, kept.id)
        .await
        .unwrap();
    assert!(read.is_some());
    f.store.ping().await.unwrap();
    // Background work that finds nothing to write (PostgreSQL lets it past the lock on
    // `credentials`; SQLite makes it wait like any write) says nothing of writes.
    let ended = |_: &keyplane_store::ConsoleSession| ev();
    let pruned = f
        .store
        .prune_console_sessions(now(), now() - TimeDelta::days(1), 10, &ended)
        .await;
    assert!(matches!(pruned, Ok(0) | Err(_)), "{pruned:?}");
    let health = f.store.write_health();
    assert!(health.failing, "a prune of nothing: {health:?}");

    drop(lock);
    // A probe writes a row: writes work again, with no client's write.
    f.store.probe_writes().await.unwrap();
    let health = f.store.write_health();
    assert!(!health.failing, "a probe succeeded: {health:?}");
    assert!(health.last_failure.is_some(), "the last failure is kept");
    f.store
        .insert_credential(&blocked, &ev(), None)
        .await
        .unwrap();
    assert!(!f.store.write_health().failing);
}

async fn a_closed_store_answers_unavailable(backend: Backend) {
    let f = fixture(backend).await;
    f.store.close().await;
    let ping = f.store.ping().await;
    assert!(
        matches!(ping, Err(StoreError::Unavailable(_))),
        "ping after close: {ping:?}"
    );
    let (late, _) = new_token(f.tenant.id, "late");
    assert!(matches!(
        f.store.insert_credential(&late, &ev(), None).await,
        Err(StoreError::Unavailable(_))
    ));
}

fn claim(tenant: TenantId, lookup: u8, fingerprint: u8, now: DateTime<Utc>) -> IdempotencyClaim {
    IdempotencyClaim {
        lookup_id: [lookup; 32],
        tenant_id: tenant,
        principal_id: uuid::Uuid::from_u128(7),
        fingerprint: [fingerprint; 32],
        claim_id: uuid::Uuid::new_v4(),
        now,
        locked_until: now + TimeDelta::seconds(60),
        expired_before: now - TimeDelta::hours(24),
    }
}

fn stored(status: u16) -> StoredResponse {
    StoredResponse {
        status,
        nonce: vec![1; 12],
        ciphertext: b"sealed".to_vec(),
    }
}

/// The answer `response` for the record `lookup`, kept under `claim_id`.
fn sealed_answer(lookup: u8, claim_id: uuid::Uuid, response: StoredResponse) -> KeptAnswer {
    KeptAnswer::Idempotent(IdempotentAnswer {
        lookup_id: [lookup; 32],
        claim_id,
        response,
    })
}

/// Completes the record `lookup` held by `claim_id` the one way the store has: in the transaction
/// of a change (a new API token), which is stored if and only if the answer is.
async fn complete_with_a_change(
    f: &Fixture,
    lookup: u8,
    claim_id: uuid::Uuid,
    response: StoredResponse,
) -> Result<(), StoreError> {
    create_keeping(f, move |_| {
        Ok(sealed_answer(lookup, claim_id, response.clone()))
    })
    .await
}

/// Creates a token whose transaction keeps `answer`; `Ok` if and only if both are stored.
async fn create_keeping(
    f: &Fixture,
    answer: impl Fn(&Credential) -> Result<KeptAnswer, StoreError> + Send + Sync,
) -> Result<(), StoreError> {
    let name = format!("answered-{}", uuid::Uuid::new_v4().simple());
    let (credential, _) = new_token(f.tenant.id, &name);
    let outcome = f
        .store
        .insert_credential(&credential, &ev(), Some(&answer))
        .await;
    let stored = f
        .store
        .get_credential(f.tenant.id, CredentialKind::ApiToken, credential.id)
        .await
        .unwrap();
    assert_eq!(stored.is_some(), outcome.is_ok(), "{outcome:?}");
    outcome
}

fn assert_claim_lost<T: std::fmt::Debug>(outcome: Result<T, StoreError>) {
    assert!(
        matches!(outcome, Err(StoreError::IdempotencyClaimLost)),
        "{outcome:?}"
    );
}

async fn an_idempotency_key_is_claimed_once_then_replayed(backend: Backend) {
    let f = fixture(backend).await;
    let t = now();
    let first = claim(f.tenant.id, 1, 9, t);
    assert_eq!(
        f.store.claim_idempotency_key(&first).await.unwrap(),
        IdempotencyRecord::Claimed
    );
    // A second attempt while the first runs, with the same request or another one.
    for fingerprint in [9, 8] {
        assert_eq!(
            f.store
                .claim_idempotency_key(&claim(f.tenant.id, 1, fingerprint, t))
                .await
                .unwrap(),
            IdempotencyRecord::InFlight {
                fingerprint: [9; 32]
            }
        );
    }
    // Only the holder completes it, once.
    assert_claim_lost(complete_with_a_change(&f, 1, uuid::Uuid::new_v4(), stored(201)).await);
    complete_with_a_change(&f, 1, first.claim_id, stored(201))
        .await
        .unwrap();
    assert_claim_lost(complete_with_a_change(&f, 1, first.claim_id, stored(200)).await);
    let later = claim(f.tenant.id, 1, 9, t + TimeDelta::hours(23));
    assert_eq!(
        f.store.claim_idempotency_key(&later).await.unwrap(),
        IdempotencyRecord::Completed {
            fingerprint: [9; 32],
            response: stored(201)
        }
    );
    // A completed record does not expire with its lock, only after a day.
    let expired = claim(f.tenant.id, 1, 8, t + TimeDelta::hours(25));
    assert_eq!(
        f.store.claim_idempotency_key(&expired).await.unwrap(),
        IdempotencyRecord::Claimed
    );
}

async fn a_crashed_claim_expires_and_a_released_one_frees_the_key(backend: Backend) {
    let f = fixture(backend).await;
    let t = now();
    let crashed = claim(f.tenant.id, 2, 9, t);
    assert_eq!(
        f.store.claim_idempotency_key(&crashed).await.unwrap(),
        IdempotencyRecord::Claimed
    );
    let retry = claim(f.tenant.id, 2, 9, t + TimeDelta::seconds(61));
    assert_eq!(
        f.store.claim_idempotency_key(&retry).await.unwrap(),
        IdempotencyRecord::Claimed
    );
    // The crashed attempt, were it to wake up, can neither complete nor release the retry's claim.
    assert_claim_lost(complete_with_a_change(&f, 2, crashed.claim_id, stored(201)).await);
    f.store
        .release_idempotency_key(&[2; 32], crashed.claim_id)
        .await
        .unwrap();
    assert!(matches!(
        f.store
            .claim_idempotency_key(&claim(f.tenant.id, 2, 9, retry.now))
            .await
            .unwrap(),
        IdempotencyRecord::InFlight { .. }
    ));
    f.store
        .release_idempotency_key(&[2; 32], retry.claim_id)
        .await
        .unwrap();
    assert_eq!(
        f.store
            .claim_idempotency_key(&claim(f.tenant.id, 2, 8, retry.now))
            .await
            .unwrap(),
        IdempotencyRecord::Claimed
    );
}

/// An answer under a claim that is lost: another attempt took its key over.
fn lost<T>(lookup: u8) -> impl Fn(&T) -> Result<KeptAnswer, StoreError> + Send + Sync {
    move |_| Ok(sealed_answer(lookup, uuid::Uuid::new_v4(), stored(201)))
}

/// Every write that answers an idempotent request completes its record in its own transaction:
/// with the record as that transaction wrote it, and not at all (nothing changed, no event) once
/// its claim is lost.
async fn each_change_keeps_its_answer_in_its_own_transaction(backend: Backend) {
    let f = fixture(backend).await;
    let tenant = f.tenant.id;
    let event = || event_in(tenant, now());
    let f = &f;
    let head = || async move { f.store.audit_chain_state(tenant).await.unwrap().head_seq };
    let claimed = |lookup: u8| async move {
        let claim = claim(tenant, lookup, 9, now());
        assert_eq!(
            f.store.claim_idempotency_key(&claim).await.unwrap(),
            IdempotencyRecord::Claimed
        );
        claim
    };
    let completed = |claim: IdempotencyClaim| async move {
        assert_eq!(
            f.store.claim_idempotency_key(&claim).await.unwrap(),
            IdempotencyRecord::Completed {
                fingerprint: [9; 32],
                response: stored(201),
            }
        );
    };

    // A credential, then its rotation.
    let claim = claimed(30).await;
    let (token, _) = new_token(tenant, "answered");
    let before = head().await;
    assert_claim_lost(
        f.store
            .insert_credential(&token, &event(), Some(&lost::<Credential>(30)))
            .await,
    );
    assert!(f
        .store
        .get_credential(tenant, CredentialKind::ApiToken, token.id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(head().await, before, "no event");
    let kept = |stored_token: &Credential| {
        assert_eq!(stored_token, &token);
        Ok(sealed_answer(30, claim.claim_id, stored(201)))
    };
    f.store
        .insert_credential(&token, &event(), Some(&kept))
        .await
        .unwrap();
    completed(claim).await;

    let claim = claimed(31).await;
    let (rotation, _) = Rotation::mint(&token, Default::default(), None, now(), &mut OsRng);
    let before = head().await;
    assert_claim_lost(
        f.store
            .rotate_credential(
                tenant,
                CredentialKind::ApiToken,
                token.id,
                &token.secret_hash,
                &rotation,
                &event(),
                Some(&lost::<Credential>(31)),
            )
            .await,
    );
    assert_eq!(f.api_token(token.id).await.secret_hash, token.secret_hash);
    assert_eq!(head().await, before, "no event");
    let kept = |rotated: &Credential| {
        assert_eq!(
            rotated.secret_hash, rotation.secret_hash,
            "the row as rotated"
        );
        Ok(sealed_answer(31, claim.claim_id, stored(201)))
    };
    let rotated = f
        .store
        .rotate_credential(
            tenant,
            CredentialKind::ApiToken,
            token.id,
            &token.secret_hash,
            &rotation,
            &event(),
            Some(&kept),
        )
        .await
        .unwrap();
    assert_eq!(rotated.secret_hash, rotation.secret_hash);
    completed(claim).await;

    // A grant.
    let claim = claimed(32).await;
    let grant = capability_grant(tenant, uuid::Uuid::new_v4(), "auth.manage");
    let before = head().await;
    assert_claim_lost(
        f.store
            .insert_grant(&grant, &event(), Some(&lost::<Grant>(32)))
            .await,
    );
    assert!(f.store.get_grant(tenant, grant.id).await.unwrap().is_none());
    assert_eq!(head().await, before, "no event");
    let kept = |_: &Grant| Ok(sealed_answer(32, claim.claim_id, stored(201)));
    f.store
        .insert_grant(&grant, &event(), Some(&kept))
        .await
        .unwrap();
    completed(claim).await;

    // A registry and its default robot.
    let claim = claimed(33).await;
    let registry = keyplane_core::Registry {
        id: uuid::Uuid::now_v7(),
        tenant_id: tenant,
        project: format!("p-{}", uuid::Uuid::new_v4().simple()),
        quota_gb: -1,
        created_at: now(),
        updated_at: now(),
    };
    let (robot, _) = new_token(tenant, "robot");
    let before = head().await;
    assert_claim_lost(
        f.store
            .create_registry(
                &registry,
                &robot,
                None,
                &[event()],
                Some(&lost::<keyplane_core::Registry>(33)),
            )
            .await,
    );
    assert_eq!(f.store.get_registry(tenant).await.unwrap(), None);
    assert_eq!(head().await, before, "no event");
    let kept = |_: &keyplane_core::Registry| Ok(sealed_answer(33, claim.claim_id, stored(201)));
    f.store
        .create_registry(&registry, &robot, None, &[event()], Some(&kept))
        .await
        .unwrap();
    completed(claim).await;

    // A webhook, then its secret's rotation.
    let claim = claimed(34).await;
    let hook = webhook(tenant, &["*"], true);
    let before = head().await;
    assert_claim_lost(
        f.store
            .create_webhook(
                &hook,
                20,
                &event(),
                Some(&lost::<keyplane_core::Webhook>(34)),
            )
            .await,
    );
    assert!(f
        .store
        .get_webhook(tenant, hook.id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(head().await, before, "no event");
    let kept = |_: &keyplane_core::Webhook| Ok(sealed_answer(34, claim.claim_id, stored(201)));
    f.store
        .create_webhook(&hook, 20, &event(), Some(&kept))
        .await
        .unwrap();
    completed(claim).await;

    let claim = claimed(35).await;
    let fresh = keyplane_core::WebhookSecret::generate(&mut OsRng);
    let until = now() + TimeDelta::hours(1);
    let before = head().await;
    assert_claim_lost(
        f.store
            .rotate_webhook_secret(
                tenant,
                hook.id,
                &fresh,
                until,
                now(),
                &event(),
                Some(&lost::<keyplane_core::Webhook>(35)),
            )
            .await,
    );
    let unchanged = f.store.get_webhook(tenant, hook.id).await.unwrap().unwrap();
    assert_eq!(
        unchanged.secret.expose_secret(),
        hook.secret.expose_secret()
    );
    assert_eq!(head().await, before, "no event");
    let kept = |rotated: &keyplane_core::Webhook| {
        assert_eq!(rotated.secret.expose_secret(), fresh.expose_secret());
        Ok(sealed_answer(35, claim.claim_id, stored(201)))
    };
    f.store
        .rotate_webhook_secret(tenant, hook.id, &fresh, until, now(), &event(), Some(&kept))
        .await
        .unwrap();
    completed(claim).await;
}

async fn racing_claims_have_one_winner(backend: Backend) {
    let f = fixture(backend).await;
    let t = now();
    let attempts = (0..8).map(|_| {
        let store = f.store.clone();
        let attempt = claim(f.tenant.id, 3, 9, t);
        tokio::spawn(async move { store.claim_idempotency_key(&attempt).await.unwrap() })
    });
    let outcomes = results_of(attempts).await;
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == IdempotencyRecord::Claimed)
            .count(),
        1,
        "{outcomes:?}"
    );
}

async fn results_of<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.unwrap());
    }
    out
}

async fn idempotency_records_are_pruned_in_batches(backend: Backend) {
    let f = fixture(backend).await;
    let t = now();
    for lookup in 10..15 {
        let old = claim(f.tenant.id, lookup, 9, t - TimeDelta::hours(25));
        f.store.claim_idempotency_key(&old).await.unwrap();
        complete_with_a_change(&f, lookup, old.claim_id, stored(201))
            .await
            .unwrap();
    }
    let fresh = claim(f.tenant.id, 20, 9, t);
    f.store.claim_idempotency_key(&fresh).await.unwrap();
    let cutoff = t - TimeDelta::hours(24);
    assert_eq!(f.store.prune_idempotency_keys(cutoff, 3).await.unwrap(), 3);
    assert_eq!(f.store.prune_idempotency_keys(cutoff, 3).await.unwrap(), 2);
    assert_eq!(f.store.prune_idempotency_keys(cutoff, 3).await.unwrap(), 0);
    assert!(matches!(
        f.store
            .claim_idempotency_key(&claim(f.tenant.id, 20, 9, t))
            .await
            .unwrap(),
        IdempotencyRecord::InFlight { .. }
    ));
}

fn console_session(tenant: TenantId, id: u8, at: DateTime<Utc>) -> keyplane_store::ConsoleSession {
    keyplane_store::ConsoleSession {
        id_hash: [id; 32],
        tenant_id: tenant,
        sealed_token: vec![id, 1, 2, 3],
        label: format!("token {id}"),
        created_at: at,
        last_seen_at: at,
        ends_at: at + TimeDelta::hours(12),
        notice: None,
    }
}

/// A console event in `tenant` about the session labelled `label`.
fn console_event(tenant: TenantId, action: &str, label: &str) -> keyplane_core::AuditEvent {
    keyplane_core::AuditEvent {
        action: action.to_string(),
        ..event_in(tenant, now())
    }
    .target("console_session", uuid::Uuid::new_v4(), Some(label))
}

fn started(session: &keyplane_store::ConsoleSession) -> keyplane_core::AuditEvent {
    console_event(
        session.tenant_id,
        keyplane_core::audit::actions::CONSOLE_SESSION_STARTED,
        &session.label,
    )
}

fn ended(session: &keyplane_store::ConsoleSession) -> keyplane_core::AuditEvent {
    console_event(
        session.tenant_id,
        keyplane_core::audit::actions::CONSOLE_SESSION_ENDED,
        &session.label,
    )
}

/// The names of the sessions whose `action` events `tenant`'s trail holds, oldest first.
async fn console_events(store: &dyn Store, tenant: TenantId, action: &str) -> Vec<String> {
    store
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(tenant, 0, 1000))
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event.action == action)
        .filter_map(|e| e.event.target.and_then(|t| t.name))
        .collect()
}

async fn console_sessions_live_until_idle_or_ended(backend: Backend) {
    let f = fixture(backend).await;
    let t = now();
    let idle = TimeDelta::minutes(30);
    let session = console_session(f.tenant.id, 1, t);
    f.store
        .insert_console_session(&session, &started(&session))
        .await
        .unwrap();
    assert_eq!(
        f.store
            .insert_console_session(&session, &started(&session))
            .await
            .err()
            .map(|e| matches!(e, StoreError::Conflict(_))),
        Some(true),
        "one row per session id"
    );
    let later = t + TimeDelta::minutes(20);
    let touched = f
        .store
        .touch_console_session(&[1; 32], later, later - idle)
        .await
        .unwrap()
        .expect("a live session");
    assert_eq!(touched.last_seen_at, truncate_to_millis(later));
    assert_eq!(touched.sealed_token, session.sealed_token);
    assert_eq!(touched.tenant_id, f.tenant.id);
    assert_eq!(touched.label, "token 1");
    // 40 minutes after the first touch, but 20 after the second: still live.
    let t40 = t + TimeDelta::minutes(40);
    assert!(f
        .store
        .touch_console_session(&[1; 32], t40, t40 - idle)
        .await
        .unwrap()
        .is_some());
    // Idle for 31 minutes: gone.
    let t71 = t40 + TimeDelta::minutes(31);
    assert!(f
        .store
        .touch_console_session(&[1; 32], t71, t71 - idle)
        .await
        .unwrap()
        .is_none());
    // Past its absolute end, however busy.
    let busy = console_session(f.tenant.id, 2, t);
    f.store
        .insert_console_session(&busy, &started(&busy))
        .await
        .unwrap();
    let past_end = t + TimeDelta::hours(12);
    assert!(f
        .store
        .touch_console_session(&[2; 32], past_end, past_end - idle)
        .await
        .unwrap()
        .is_none());
    assert!(f
        .store
        .touch_console_session(&[9; 32], t, t - idle)
        .await
        .unwrap()
        .is_none());

    // Signing out.
    f.store
        .insert_console_session(
            &console_session(f.tenant.id, 3, t),
            &started(&console_session(f.tenant.id, 3, t)),
        )
        .await
        .unwrap();
    let signed_out = ended(&console_session(f.tenant.id, 3, t));
    assert!(f
        .store
        .delete_console_session(&[3; 32], Some(&signed_out))
        .await
        .unwrap());
    assert!(
        !f.store
            .delete_console_session(&[3; 32], Some(&signed_out))
            .await
            .unwrap(),
        "ended once"
    );
    assert!(f
        .store
        .touch_console_session(&[3; 32], t, t - idle)
        .await
        .unwrap()
        .is_none());

    // Pruning: idle and ended sessions go, live ones stay.
    let fresh = console_session(f.tenant.id, 4, t + TimeDelta::minutes(60));
    f.store
        .insert_console_session(&fresh, &started(&fresh))
        .await
        .unwrap();
    let finished = keyplane_store::ConsoleSession {
        ends_at: t + TimeDelta::minutes(70),
        ..console_session(f.tenant.id, 6, t + TimeDelta::minutes(65))
    };
    f.store
        .insert_console_session(&finished, &started(&finished))
        .await
        .unwrap();
    assert_eq!(
        f.store
            .prune_console_sessions(t71, t71 - idle, 2, &ended)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        f.store
            .prune_console_sessions(t71, t71 - idle, 2, &ended)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        f.store
            .prune_console_sessions(t71, t71 - idle, 2, &ended)
            .await
            .unwrap(),
        0
    );
    assert!(f
        .store
        .touch_console_session(&[4; 32], t71, t71 - idle)
        .await
        .unwrap()
        .is_some());
    // Each start and each end recorded once, with its change: not the refused second insert,
    // not the second sign-out.
    let store = f.store.as_ref();
    use keyplane_core::audit::actions::{CONSOLE_SESSION_ENDED, CONSOLE_SESSION_STARTED};
    let starts = console_events(store, f.tenant.id, CONSOLE_SESSION_STARTED).await;
    assert_eq!(
        starts,
        ["token 1", "token 2", "token 3", "token 4", "token 6"]
    );
    let mut ends = console_events(store, f.tenant.id, CONSOLE_SESSION_ENDED).await;
    ends.sort();
    assert_eq!(ends, ["token 1", "token 2", "token 3", "token 6"]);
    assert_eq!(verify_chain(store, f.tenant.id).await, 9);
}

/// Creates a token whose secret `sealed` the console session `session` keeps, in the create's
/// transaction.
async fn create_with_a_console_secret(
    f: &Fixture,
    session: u8,
    sealed: &[u8],
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let kept = keyplane_store::ConsoleSecret {
        session: [session; 32],
        sealed: vec![sealed.to_vec()],
        at,
        start: None,
    };
    create_keeping(f, move |_| Ok(KeptAnswer::ConsoleSecret(kept.clone()))).await
}

/// Secrets kept for a console session wait side by side, oldest first, and each is taken once;
/// none is kept, and nothing changes, for a session that has ended.
async fn a_console_secret_is_taken_once(backend: Backend) {
    let f = fixture(backend).await;
    let t = now();
    let idle = t - TimeDelta::minutes(30);
    f.store
        .insert_console_session(
            &console_session(f.tenant.id, 5, t),
            &started(&console_session(f.tenant.id, 5, t)),
        )
        .await
        .unwrap();
    f.store
        .set_console_session_notice(&[5; 32], Some("Revoked."))
        .await
        .unwrap();
    for sealed in [[7u8, 7, 7], [8, 8, 8]] {
        create_with_a_console_secret(&f, 5, &sealed, t)
            .await
            .unwrap();
    }
    let seen = f
        .store
        .touch_console_session(&[5; 32], t, idle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.notice.as_deref(), Some("Revoked."));
    assert_eq!(
        f.store.console_session_secrets(&[5; 32]).await.unwrap(),
        vec![vec![7u8, 7, 7], vec![8, 8, 8]],
        "both wait, oldest first, and a look takes none"
    );
    let takers = (0..4).map(|_| {
        let store = f.store.clone();
        tokio::spawn(async move { store.take_console_session_secrets(&[5; 32]).await.unwrap() })
    });
    let mut taken = Vec::new();
    for taker in takers.collect::<Vec<_>>() {
        taken.extend(taker.await.unwrap());
    }
    assert_eq!(
        taken,
        vec![vec![7u8, 7, 7], vec![8, 8, 8]],
        "each secret goes to exactly one reader"
    );

    // Ended (or signed out): the change fails with nothing stored.
    let ended = t + TimeDelta::hours(12);
    assert!(matches!(
        create_with_a_console_secret(&f, 5, &[9], ended).await,
        Err(StoreError::ConsoleSessionEnded)
    ));
    f.store
        .delete_console_session(&[5; 32], None)
        .await
        .unwrap();
    assert!(matches!(
        create_with_a_console_secret(&f, 5, &[9], t).await,
        Err(StoreError::ConsoleSessionEnded)
    ));
    assert!(f
        .store
        .take_console_session_secrets(&[5; 32])
        .await
        .unwrap()
        .is_empty());
}

fn truncate_to_millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap()
}

/// A registry signing key as the store sees it (it never parses the PEM).
fn signing_key(key_id: &str) -> keyplane_store::SigningKey {
    keyplane_store::SigningKey {
        key_id: key_id.into(),
        private_key: keyplane_core::PrivateKeyPem::new(format!("private key of {key_id}")),
        certificate_pem: format!("certificate of {key_id}"),
        created_at: now(),
        signed_until: None,
    }
}

/// A registry signing-key change's event, in the organization with the registry.
fn key_event(change: &keyplane_store::SigningKeyChange) -> keyplane_core::AuditEvent {
    event_in(change.tenant_id, now())
}

/// The key ids in the current, next and previous slots.
async fn key_slots(store: &dyn Store) -> [Option<String>; 3] {
    let keys = store.signing_keys().await.unwrap();
    [keys.current, keys.next, keys.previous].map(|key| key.map(|key| key.key_id))
}

fn slots(current: &str, next: Option<&str>, previous: Option<&str>) -> [Option<String>; 3] {
    [Some(current), next, previous].map(|id| id.map(str::to_owned))
}

async fn registry_keys_are_staged_promoted_and_retired(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    assert_eq!(
        store
            .signing_key_or_insert(&signing_key("k1"), &key_event)
            .await
            .unwrap()
            .key_id,
        "k1"
    );
    assert!(
        matches!(
            store.promote_signing_key(now(), &key_event).await,
            Err(StoreError::NotFound)
        ),
        "a promotion with nothing staged must be refused"
    );
    assert_eq!(key_slots(store).await, slots("k1", None, None));

    let staged = store
        .stage_signing_key(&signing_key("k2"), &key_event)
        .await
        .unwrap();
    assert_eq!(staged.key_id, "k2");
    assert_eq!(staged.certificate_pem, "certificate of k2");
    let again = store
        .stage_signing_key(&signing_key("k3"), &key_event)
        .await
        .unwrap();
    assert_eq!(again.key_id, "k2", "staging again keeps the staged key");
    assert_eq!(key_slots(store).await, slots("k1", Some("k2"), None));

    let at = now();
    let promoted = store.promote_signing_key(at, &key_event).await.unwrap();
    assert_eq!(promoted.key_id, "k2");
    assert_eq!(
        promoted.private_key.expose_secret(),
        "private key of k2",
        "the promoted key signs with its own private key"
    );
    assert_eq!(key_slots(store).await, slots("k2", None, Some("k1")));
    let keys = store.signing_keys().await.unwrap();
    assert_eq!(keys.previous.unwrap().signed_until, Some(at));
    assert_eq!(keys.current.unwrap().signed_until, None);
    assert_eq!(
        store
            .signing_key_or_insert(&signing_key("k9"), &key_event)
            .await
            .unwrap()
            .key_id,
        "k2",
        "the promoted key is the one tokens are signed with"
    );

    // A second rotation replaces the older previous key.
    store
        .stage_signing_key(&signing_key("k3"), &key_event)
        .await
        .unwrap();
    store.promote_signing_key(now(), &key_event).await.unwrap();
    assert_eq!(key_slots(store).await, slots("k3", None, Some("k2")));

    assert!(
        !store
            .retire_previous_signing_key("k1", &key_event)
            .await
            .unwrap(),
        "retiring a key that is no longer the previous one changes nothing"
    );
    assert_eq!(key_slots(store).await, slots("k3", None, Some("k2")));
    assert!(store
        .retire_previous_signing_key("k2", &key_event)
        .await
        .unwrap());
    assert_eq!(key_slots(store).await, slots("k3", None, None));
    assert!(!store
        .retire_previous_signing_key("k2", &key_event)
        .await
        .unwrap());
}

async fn racing_stages_keep_one_next_key(backend: Backend) {
    let f = fixture(backend).await;
    f.store
        .signing_key_or_insert(&signing_key("current"), &key_event)
        .await
        .unwrap();
    let attempts = (0..8).map(|i| {
        let store = f.store.clone();
        tokio::spawn(async move {
            store
                .stage_signing_key(&signing_key(&format!("candidate-{i}")), &key_event)
                .await
                .unwrap()
                .key_id
        })
    });
    let staged = results_of(attempts).await;
    let next = f.store.signing_keys().await.unwrap().next.unwrap().key_id;
    assert!(
        staged.iter().all(|id| *id == next),
        "every stage must answer the one staged key {next}: {staged:?}"
    );
}

async fn racing_promotions_move_the_staged_key_once(backend: Backend) {
    let f = fixture(backend).await;
    f.store
        .signing_key_or_insert(&signing_key("k1"), &key_event)
        .await
        .unwrap();
    f.store
        .stage_signing_key(&signing_key("k2"), &key_event)
        .await
        .unwrap();
    let attempts = (0..6).map(|_| {
        let store = f.store.clone();
        tokio::spawn(async move { store.promote_signing_key(now(), &key_event).await })
    });
    let outcomes = results_of(attempts).await;
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.is_ok() || matches!(o, Err(StoreError::NotFound))),
        "{outcomes:?}"
    );
    assert_eq!(
        key_slots(f.store.as_ref()).await,
        slots("k2", None, Some("k1"))
    );
}

macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::*;
                #[tokio::test]
                async fn sqlite() {
                    super::$case(Backend::Sqlite).await
                }
                #[tokio::test]
                async fn postgres() {
                    super::$case(Backend::Postgres).await
                }
            }
        )*
    };
}

store_suite! {
    the_database_clock_is_read_on_postgres_only,
    created_credential_round_trips,
    names_are_unique_among_live_credentials,
    rotation_keeps_the_id_and_replaces_the_hash,
    revocation_is_permanent_and_idempotent,
    other_tenants_and_kinds_are_invisible,
    listing_pages_in_creation_order,
    last_used_batches_are_applied,
    last_uses_only_move_forward,
    a_batch_credits_each_secret_its_latest_use,
    a_schema_from_a_newer_keyplane_is_refused,
    previous_release_console_statements_run_on_the_current_schema,
    credentials_and_grants_keep_their_creator,
    a_creator_a_later_release_recorded_reads_as_unknown,
    previous_release_writes_credentials_and_grants_without_a_creator,
    a_modified_migration_is_named_when_the_store_opens,
    an_older_schema_is_migrated_only_when_asked,
    two_processes_migrating_one_new_store_both_start,
    bootstrap_happens_once,
    a_store_with_tenants_is_never_bootstrapped,
    grants_filter_conflict_and_revoke,
    a_subjects_live_grants_span_tenants,
    import_is_all_or_nothing,
    lookups_by_many_find_what_lookups_by_one_find,
    a_rotation_that_lost_the_race_changes_nothing,
    is_bootstrapped_says_whether_bootstrap_could_run,
    a_locked_store_answers_busy_while_reads_go_on,
    a_closed_store_answers_unavailable,
    an_idempotency_key_is_claimed_once_then_replayed,
    a_crashed_claim_expires_and_a_released_one_frees_the_key,
    racing_claims_have_one_winner,
    idempotency_records_are_pruned_in_batches,
    each_change_keeps_its_answer_in_its_own_transaction,
    pruning_keeps_the_rest_of_the_chain_verifiable,
    pruning_passes_over_a_chain_that_begins_young,
    pruning_for_an_export_stops_at_its_cursor,
    pruning_records_itself_in_the_chain,
    pruning_a_deleted_tenants_trail_appends_nothing,
    a_failed_change_writes_no_event,
    console_sessions_live_until_idle_or_ended,
    a_console_secret_is_taken_once,
    registry_keys_are_staged_promoted_and_retired,
    racing_stages_keep_one_next_key,
    racing_promotions_move_the_staged_key_once,
    leak_reports_are_leased_claimed_once_and_forgotten,
}

fn leak_report(hashes: &[u8], at: DateTime<Utc>) -> keyplane_store::LeakReportRecord {
    keyplane_store::LeakReportRecord {
        id: uuid::Uuid::now_v7(),
        token_hashes: hashes
            .iter()
            .map(|b| keyplane_core::TokenHash::from_bytes(&[*b; 32]).unwrap())
            .collect(),
        context: keyplane_core::RequestContext::new(
            Some("req-1"),
            Some("192.0.2.7".into()),
            Some("curl/8"),
        ),
        received_at: truncate_to_millis(at),
        attempts: 1,
    }
}

/// A stored report is held by its lease: nobody claims it until that runs out, then exactly one
/// claim gets it (with its hashes and request as stored, and its attempts counted), and so on.
/// Finished, it is gone; the store keeps at most the bound; old ones are pruned, young ones kept.
async fn leak_reports_are_leased_claimed_once_and_forgotten(backend: Backend) {
    let f = fixture(backend).await;
    let t = truncate_to_millis(now());
    let lease = TimeDelta::seconds(15);
    let first = leak_report(&[1, 2, 3], t);
    assert!(f
        .store
        .insert_leak_report(&first, uuid::Uuid::new_v4(), t + lease, 10)
        .await
        .unwrap());

    // Leased to the replica that received it.
    let claim = |at: DateTime<Utc>| {
        let store = f.store.clone();
        async move {
            store
                .claim_leak_reports(uuid::Uuid::new_v4(), at, at + lease, 10)
                .await
                .unwrap()
        }
    };
    assert!(claim(t + TimeDelta::seconds(5)).await.is_empty());
    // Its lease ran out: taken once, as stored.
    let after = t + TimeDelta::seconds(16);
    let taken = claim(after).await;
    assert_eq!(
        taken,
        vec![keyplane_store::LeakReportRecord {
            attempts: 2,
            ..first.clone()
        }]
    );
    assert!(claim(after).await.is_empty(), "held by the new lease");
    let again = claim(after + lease).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 3);

    // Worked off: gone for good.
    f.store.finish_leak_report(first.id).await.unwrap();
    assert!(claim(after + lease * 10).await.is_empty());

    // At most the bound is stored.
    for i in 0..2u8 {
        assert!(f
            .store
            .insert_leak_report(&leak_report(&[i], t), uuid::Uuid::new_v4(), t, 2)
            .await
            .unwrap());
    }
    assert!(!f
        .store
        .insert_leak_report(&leak_report(&[9], t), uuid::Uuid::new_v4(), t, 2)
        .await
        .unwrap());

    // Pruning takes those received before the cut, oldest first, in batches.
    let young = leak_report(&[7], t + TimeDelta::hours(2));
    assert!(f
        .store
        .insert_leak_report(&young, uuid::Uuid::new_v4(), t, 10)
        .await
        .unwrap());
    let cut = t + TimeDelta::hours(1);
    assert_eq!(f.store.prune_leak_reports(cut, 1).await.unwrap(), 1);
    assert_eq!(f.store.prune_leak_reports(cut, 10).await.unwrap(), 1);
    assert_eq!(f.store.prune_leak_reports(cut, 10).await.unwrap(), 0);
    let left = claim(t + TimeDelta::hours(3)).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, young.id);
}

fn event_in(tenant: TenantId, at: DateTime<Utc>) -> keyplane_core::AuditEvent {
    keyplane_core::AuditEvent {
        tenant_id: tenant,
        occurred_at: at,
        ..ev()
    }
}

async fn verify_chain(store: &dyn Store, tenant: TenantId) -> u64 {
    let state = store.audit_chain_state(tenant).await.unwrap();
    let mut verifier =
        keyplane_core::audit::ChainVerifier::from_anchor(state.anchor_seq, state.anchor_hash);
    let events = store
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(
            tenant,
            state.anchor_seq,
            1000,
        ))
        .await
        .unwrap();
    for event in &events {
        verifier.check(event).unwrap();
    }
    verifier.finish(state.head_seq, state.head_hash).unwrap()
}

async fn pruning_keeps_the_rest_of_the_chain_verifiable(backend: Backend) {
    let f = fixture(backend).await;
    let tenant = f.tenant.id;
    let old = now() - TimeDelta::days(500);
    for i in 0..5 {
        let at = if i < 3 { old } else { now() };
        f.store
            .append_audit_event(&event_in(tenant, at))
            .await
            .unwrap();
    }
    let before = verify_chain(f.store.as_ref(), tenant).await;
    // Bounded batches: two, then the last old one, then nothing (the young ones stay).
    let cutoff = now() - TimeDelta::days(400);
    let prune = || f.store.prune_audit_events(cutoff, 2, None, &pruned_event);
    assert_eq!(prune().await.unwrap(), 2);
    assert_eq!(prune().await.unwrap(), 1);
    assert_eq!(prune().await.unwrap(), 0);
    let state = f.store.audit_chain_state(tenant).await.unwrap();
    assert_eq!(state.anchor_seq, 3);
    // Less the three pruned, plus each batch's `audit.pruned`.
    assert_eq!(verify_chain(f.store.as_ref(), tenant).await, before - 3 + 2);
}

/// Pruning for an export (`exported_by`) deletes no event past that export's cursor for its
/// tenant, and none of a tenant it has no cursor for, which does not keep it from another's.
async fn pruning_for_an_export_stops_at_its_cursor(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let (exported, unexported) = (TenantId::new(), TenantId::new());
    for tenant in [unexported, exported] {
        for _ in 0..4 {
            store
                .append_audit_event(&event_in(tenant, now() - TimeDelta::days(500)))
                .await
                .unwrap();
        }
    }
    store
        .save_audit_export_cursors("file:/var/log/a", &[(exported, 2)])
        .await
        .unwrap();
    // Another export's cursor is not this one's.
    store
        .save_audit_export_cursors("file:/var/log/b", &[(exported, 4), (unexported, 4)])
        .await
        .unwrap();
    let cutoff = now() - TimeDelta::days(400);
    let mut pruned = Vec::new();
    for _ in 0..10 {
        match store
            .prune_audit_events(cutoff, 1000, Some("file:/var/log/a"), &pruned_event)
            .await
            .unwrap()
        {
            0 => break,
            deleted => pruned.push(deleted),
        }
    }
    assert_eq!(pruned, [2], "up to the cursor, once");
    assert_eq!(
        store.audit_chain_state(exported).await.unwrap().anchor_seq,
        2
    );
    assert_eq!(
        store
            .audit_chain_state(unexported)
            .await
            .unwrap()
            .anchor_seq,
        0
    );
    assert_eq!(
        verify_chain(store, exported).await,
        2 + 1,
        "the unexported two and the record"
    );
}

/// A tenant whose chain begins with an event younger than the cutoff, followed by older ones
/// (times need not follow the chain), has nothing to prune; it neither stops the pruning of
/// other tenants nor is chosen over and over.
async fn pruning_passes_over_a_chain_that_begins_young(backend: Backend) {
    let f = fixture(backend).await;
    let (young_first, other) = (TenantId::new(), TenantId::new());
    let store = f.store.as_ref();
    let append = |tenant, at| async move {
        store
            .append_audit_event(&event_in(tenant, at))
            .await
            .unwrap();
    };
    append(young_first, now()).await;
    for _ in 0..3 {
        append(young_first, now() - TimeDelta::days(500)).await;
    }
    for _ in 0..2 {
        append(other, now() - TimeDelta::days(450)).await;
    }
    append(other, now()).await;
    let cutoff = now() - TimeDelta::days(400);
    let mut pruned = Vec::new();
    for _ in 0..10 {
        match store
            .prune_audit_events(cutoff, 1000, None, &pruned_event)
            .await
            .unwrap()
        {
            0 => break,
            deleted => pruned.push(deleted),
        }
    }
    assert_eq!(pruned, [2], "the other tenant's old events, once");
    assert_eq!(store.audit_chain_state(other).await.unwrap().anchor_seq, 2);
    assert_eq!(
        store
            .audit_chain_state(young_first)
            .await
            .unwrap()
            .anchor_seq,
        0
    );
    assert_eq!(
        verify_chain(store, other).await,
        1 + 1,
        "the young one and the record"
    );
    assert_eq!(verify_chain(store, young_first).await, 4);
}

/// A deleted organization's trail ends with its `organization.deleted`: retention prunes its old
/// events as any (the rest stays verifiable from the anchor) but appends no `audit.pruned` after
/// that end; once the deletion's own event is old, the rest of the trail goes, and still nothing
/// is appended.
async fn pruning_a_deleted_tenants_trail_appends_nothing(backend: Backend) {
    use keyplane_core::audit::actions::ORGANIZATION_DELETED;
    let db = TestDatabase::new(backend).await;
    let store = keyplane_store::connect(&db.url).await.unwrap();
    let store = store.as_ref();
    let old = now() - TimeDelta::days(500);
    let tenant = Tenant {
        id: TenantId::new(),
        name: "gone".into(),
        created_at: old,
    };
    create_tenant(store, &tenant, None, false).await.unwrap();
    for _ in 0..3 {
        store
            .append_audit_event(&event_in(tenant.id, old))
            .await
            .unwrap();
    }
    store
        .purge_tenant(tenant.id, now(), 2, &deleted_event(tenant.id))
        .await
        .unwrap()
        .expect("deleted now");
    let prune_all = |cutoff| async move {
        let mut deleted = Vec::new();
        for _ in 0..10 {
            match store
                .prune_audit_events(cutoff, 2, None, &pruned_event)
                .await
                .unwrap()
            {
                0 => return deleted,
                n => deleted.push(n),
            }
        }
        panic!("pruning does not end: {deleted:?}");
    };

    // The old events, two at a time; the deletion's event stays, last.
    assert_eq!(prune_all(now() - TimeDelta::days(400)).await, [2, 1]);
    assert!(pruning_records(store, tenant.id).await.is_empty());
    let state = store.audit_chain_state(tenant.id).await.unwrap();
    assert_eq!(state.anchor_seq, 3);
    let left = store
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(tenant.id, 0, 100))
        .await
        .unwrap();
    let actions: Vec<_> = left
        .iter()
        .map(|e| (e.seq, e.event.action.as_str()))
        .collect();
    assert_eq!(actions, [(state.head_seq, ORGANIZATION_DELETED)]);
    assert_eq!(verify_chain(store, tenant.id).await, 1);

    // The deletion's event old too (and the other tenant's, whose pruning is recorded there).
    assert_eq!(prune_all(now() + TimeDelta::days(1)).await, [1, 1]);
    let state = store.audit_chain_state(tenant.id).await.unwrap();
    assert_eq!(state.anchor_seq, state.head_seq);
    assert_eq!(verify_chain(store, tenant.id).await, 0);
    assert!(pruning_records(store, tenant.id).await.is_empty());
}

/// A pruning's `audit.pruned` event, as retention makes it.
fn pruned_event(pruned: &keyplane_store::PrunedPrefix) -> keyplane_core::AuditEvent {
    use keyplane_core::audit::DetailValue;
    keyplane_core::AuditEvent {
        action: keyplane_core::audit::actions::AUDIT_PRUNED.into(),
        ..event_in(pruned.tenant_id, now())
    }
    .detail("through_seq", DetailValue::Count(pruned.through_seq))
    .text(
        "through_chain_hash",
        keyplane_core::audit::hash_hex(&pruned.through_chain_hash),
    )
    .detail("count", DetailValue::Count(pruned.count))
}

/// The `audit.pruned` events of the tenant's chain, oldest first.
async fn pruning_records(store: &dyn Store, tenant: TenantId) -> Vec<keyplane_core::ChainedEvent> {
    let query = keyplane_store::AuditQuery {
        actions: vec![keyplane_core::audit::actions::AUDIT_PRUNED.into()],
        ..keyplane_store::AuditQuery::after_seq(tenant, 0, 100)
    };
    store.list_audit_events(&query).await.unwrap()
}

/// Each pruning records itself in the chain it pruned, in its own transaction: an `audit.pruned`
/// event naming the anchor it left (seq and hash) and how many events it deleted. Those records
/// are pruned only along with older events of other kinds: pruning them alone would append
/// another each time, and never end.
async fn pruning_records_itself_in_the_chain(backend: Backend) {
    use keyplane_core::audit::DetailValue;
    let f = fixture(backend).await;
    let (tenant, store) = (f.tenant.id, f.store.as_ref());
    let old = now() - TimeDelta::days(500);
    for at in [old, old, old, now()] {
        store
            .append_audit_event(&event_in(tenant, at))
            .await
            .unwrap();
    }
    let third = store
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(tenant, 2, 1))
        .await
        .unwrap()
        .remove(0);
    let cutoff = now() - TimeDelta::days(400);
    assert_eq!(
        store
            .prune_audit_events(cutoff, 1000, None, &pruned_event)
            .await
            .unwrap(),
        3
    );
    let records = pruning_records(store, tenant).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let state = store.audit_chain_state(tenant).await.unwrap();
    assert_eq!((state.anchor_seq, state.anchor_hash), (3, third.chain_hash));
    assert_eq!(
        records[0].seq, state.head_seq,
        "appended to the chain it pruned"
    );
    let details = &records[0].event.details;
    assert_eq!(details["through_seq"], DetailValue::Count(3));
    assert_eq!(
        details["through_chain_hash"],
        DetailValue::Text(keyplane_core::audit::hash_hex(&third.chain_hash))
    );
    assert_eq!(details["count"], DetailValue::Count(3));
    assert_eq!(verify_chain(store, tenant).await, 2);

    // With a cutoff in the future the young event goes too (and the fixture's other tenant's),
    // once; the record left after it stays (nothing older of another kind goes with it), and a
    // new one vouches for the anchor.
    let future = now() + TimeDelta::days(1);
    let mut batches = 0;
    while store
        .prune_audit_events(future, 1000, None, &pruned_event)
        .await
        .unwrap()
        > 0
    {
        batches += 1;
        assert!(batches < 5, "pruning does not end");
    }
    let state = store.audit_chain_state(tenant).await.unwrap();
    assert_eq!(state.anchor_seq, 4);
    let records = pruning_records(store, tenant).await;
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [5, 6],
        "{records:?}"
    );
    assert_eq!(
        records[1].event.details["through_seq"],
        DetailValue::Count(4)
    );
    assert_eq!(verify_chain(store, tenant).await, 2);
}

async fn a_failed_change_writes_no_event(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, _) = new_token(f.tenant.id, "ci");
    f.store
        .insert_credential(&credential, &event_in(f.tenant.id, now()), None)
        .await
        .unwrap();
    let (duplicate, _) = new_token(f.tenant.id, "ci");
    assert!(matches!(
        f.store
            .insert_credential(&duplicate, &event_in(f.tenant.id, now()), None)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let state = f.store.audit_chain_state(f.tenant.id).await.unwrap();
    assert_eq!(state.head_seq, 1, "only the committed change has an event");
    assert_eq!(verify_chain(f.store.as_ref(), f.tenant.id).await, 1);
}

store_suite! {
    a_grace_rotation_keeps_the_previous_secret_findable,
    retiring_a_previous_secret_is_a_compare_and_set,
    suspension_changes_state_once,
    leak_writes_act_only_while_the_reported_secret_is_live,
    expiry_notices_are_claimed_once_per_stage,
    policies_round_trip_and_count_what_exceeds_them,
    revoking_a_service_account_revokes_its_grants,
}

fn grace(seconds: u32) -> RotationOptions {
    RotationOptions {
        grace_seconds: seconds,
        retire_when_unused_seconds: Some(30),
    }
}

async fn rotate(f: &Fixture, current: &Credential, rotation: &Rotation) -> Credential {
    f.store
        .rotate_credential(
            f.tenant.id,
            current.kind,
            current.id,
            &current.secret_hash,
            rotation,
            &ev(),
            None,
        )
        .await
        .unwrap()
}

async fn a_grace_rotation_keeps_the_previous_secret_findable(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, old) = new_token(f.tenant.id, "graceful");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let at = now();
    let (rotation, new) = Rotation::mint(
        &credential,
        grace(60),
        credential.expires_at,
        at,
        &mut OsRng,
    );
    let rotated = rotate(&f, &credential, &rotation).await;
    let previous = rotated.previous_secret.clone().expect("a previous secret");
    assert!(previous.hash.matches(&old.hash()));
    assert_eq!(previous.expires_at, at + TimeDelta::seconds(60));
    assert_eq!(previous.retire_when_unused_seconds, Some(30));
    assert_eq!(rotated.rotated_at, Some(at));
    for secret in [&old, &new] {
        let found = f
            .store
            .find_credential_by_hash(&secret.hash())
            .await
            .unwrap()
            .expect("both secrets find the credential");
        assert_eq!(found.id, credential.id);
    }
    // A use of the previous secret is its own; the credential's last_used_at is the current one's.
    f.store
        .record_last_used(&[CredentialUse {
            id: credential.id,
            at,
            secret: old.hash().prefix(),
        }])
        .await
        .unwrap();
    let got = f.api_token(credential.id).await;
    assert_eq!(got.previous_secret.unwrap().last_used_at, Some(at));
    assert_eq!(got.last_used_at, None);
    // Rotating again without a grace period ends the previous secret.
    let (rotation, _) = Rotation::mint(
        &rotated,
        Default::default(),
        rotated.expires_at,
        now(),
        &mut OsRng,
    );
    let again = rotate(&f, &rotated, &rotation).await;
    assert!(again.previous_secret.is_none());
    for ended in [&old, &new] {
        assert!(f
            .store
            .find_credential_by_hash(&ended.hash())
            .await
            .unwrap()
            .is_none());
    }
}

async fn retiring_a_previous_secret_is_a_compare_and_set(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, old) = new_token(f.tenant.id, "retiring");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let (rotation, new) = Rotation::mint(
        &credential,
        grace(600),
        credential.expires_at,
        now(),
        &mut OsRng,
    );
    let rotated = rotate(&f, &credential, &rotation).await;
    let retire = |previous: keyplane_core::TokenHash| {
        let store = f.store.clone();
        let (tenant, id) = (f.tenant.id, credential.id);
        async move {
            store
                .retire_previous_secret(
                    tenant,
                    CredentialKind::ApiToken,
                    id,
                    &previous,
                    now(),
                    &ev(),
                )
                .await
                .unwrap()
        }
    };
    assert!(
        retire(new.hash()).await.is_none(),
        "not the previous secret"
    );
    let retired = retire(old.hash()).await.expect("retired");
    assert!(retired.previous_secret.is_none());
    assert_eq!(retired.id, rotated.id);
    assert!(retire(old.hash()).await.is_none(), "already retired");
    assert!(f
        .store
        .find_credential_by_hash(&old.hash())
        .await
        .unwrap()
        .is_none());

    // A grace period that has ended is forgotten by the sweep's clean-up.
    let (credential, old) = new_token(f.tenant.id, "ended");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let long_ago = now() - TimeDelta::seconds(120);
    let (rotation, _) = Rotation::mint(
        &credential,
        grace(60),
        credential.expires_at,
        long_ago,
        &mut OsRng,
    );
    rotate(&f, &credential, &rotation).await;
    assert_eq!(
        f.store
            .credentials_with_previous_secret(100)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        f.store.clear_ended_previous_secrets(now()).await.unwrap(),
        1
    );
    assert!(f
        .store
        .find_credential_by_hash(&old.hash())
        .await
        .unwrap()
        .is_none());
    assert!(f
        .store
        .credentials_with_previous_secret(100)
        .await
        .unwrap()
        .is_empty());
}

/// A leak's suspend or revoke acts only while the reported secret is the credential's as of the
/// write: its current secret, or its previous one within the grace period; never a secret it no
/// longer has.
async fn leak_writes_act_only_while_the_reported_secret_is_live(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, old) = new_token(f.tenant.id, "leaky");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let at = now();
    let (rotation, new) = Rotation::mint(
        &credential,
        grace(60),
        credential.expires_at,
        at,
        &mut OsRng,
    );
    rotate(&f, &credential, &rotation).await;
    let (kind, id) = (credential.kind, credential.id);
    let (_, stranger) = new_token(f.tenant.id, "stranger");
    let after_grace = at + TimeDelta::seconds(61);
    for (secret, write_at) in [(stranger.hash(), at), (old.hash(), after_grace)] {
        let (unchanged, changed) = f
            .store
            .set_credential_suspended(
                f.tenant.id,
                kind,
                id,
                Some(write_at),
                write_at,
                &ev(),
                Some(&secret),
            )
            .await
            .unwrap();
        assert!(!changed && unchanged.suspended_at.is_none());
        let unchanged = f
            .store
            .revoke_credential(
                f.tenant.id,
                kind,
                id,
                write_at,
                None,
                &ev(),
                &|_| ev(),
                Some(&secret),
            )
            .await
            .unwrap();
        assert!(!unchanged.is_revoked());
    }
    let in_grace = at + TimeDelta::seconds(1);
    let (suspended, changed) = f
        .store
        .set_credential_suspended(
            f.tenant.id,
            kind,
            id,
            Some(in_grace),
            in_grace,
            &ev(),
            Some(&old.hash()),
        )
        .await
        .unwrap();
    assert!(changed && suspended.suspended_at == Some(in_grace));
    let revoked = f
        .store
        .revoke_credential(
            f.tenant.id,
            kind,
            id,
            in_grace,
            None,
            &ev(),
            &|_| ev(),
            Some(&new.hash()),
        )
        .await
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(in_grace));
}

async fn suspension_changes_state_once(backend: Backend) {
    let f = fixture(backend).await;
    let (credential, _) = new_token(f.tenant.id, "suspendable");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let set = |suspended: Option<DateTime<Utc>>| {
        let store = f.store.clone();
        let (tenant, id) = (f.tenant.id, credential.id);
        async move {
            store
                .set_credential_suspended(
                    tenant,
                    CredentialKind::ApiToken,
                    id,
                    suspended,
                    now(),
                    &ev(),
                    None,
                )
                .await
        }
    };
    let at = now();
    let (suspended, changed) = set(Some(at)).await.unwrap();
    assert!(changed);
    assert_eq!(suspended.suspended_at, Some(at));
    let (again, changed) = set(Some(now())).await.unwrap();
    assert!(!changed, "suspending twice changes nothing");
    assert_eq!(again.suspended_at, Some(at), "the first suspension stands");
    let (resumed, changed) = set(None).await.unwrap();
    assert!(changed);
    assert_eq!(resumed.suspended_at, None);
    assert!(
        !set(None).await.unwrap().1,
        "resuming twice changes nothing"
    );
    f.store
        .revoke_credential(
            f.tenant.id,
            CredentialKind::ApiToken,
            credential.id,
            now(),
            None,
            &ev(),
            &|_| ev(),
            None,
        )
        .await
        .unwrap();
    assert!(matches!(
        set(Some(now())).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        f.store
            .set_credential_suspended(
                f.tenant.id,
                CredentialKind::ApiToken,
                keyplane_core::CredentialId::new(),
                None,
                now(),
                &ev(),
                None
            )
            .await,
        Err(StoreError::NotFound)
    ));
}

async fn expiry_notices_are_claimed_once_per_stage(backend: Backend) {
    let f = fixture(backend).await;
    let (mut credential, _) = new_token(f.tenant.id, "expiring");
    credential.expires_at = Some(now() + TimeDelta::days(5));
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let due = |stage: u32, days: i64| {
        let store = f.store.clone();
        async move {
            store
                .credentials_due_for_expiry_notice(stage, now() + TimeDelta::days(days), 100)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.name)
                // The fixture's bootstrap token expires in a day.
                .filter(|name| name != "bootstrap")
                .collect::<Vec<_>>()
        }
    };
    assert!(due(1, 1).await.is_empty());
    assert_eq!(due(7, 7).await, ["expiring"]);
    assert!(f
        .store
        .record_expiry_notice(&credential, 7, &ev())
        .await
        .unwrap());
    assert!(
        !f.store
            .record_expiry_notice(&credential, 7, &ev())
            .await
            .unwrap(),
        "once"
    );
    assert!(
        !f.store
            .record_expiry_notice(&credential, 30, &ev())
            .await
            .unwrap(),
        "never a further stage"
    );
    assert!(due(7, 7).await.is_empty());
    assert!(due(30, 30).await.is_empty());
    // A rotation that moves the expiry starts the warnings over; one that keeps it does not.
    let (rotation, _) = Rotation::mint(
        &credential,
        Default::default(),
        credential.expires_at,
        now(),
        &mut OsRng,
    );
    let kept = rotate(&f, &credential, &rotation).await;
    assert_eq!(kept.expiry_notice_days, Some(7));
    let (rotation, _) = Rotation::mint(
        &kept,
        Default::default(),
        Some(now() + TimeDelta::days(6)),
        now(),
        &mut OsRng,
    );
    let moved = rotate(&f, &kept, &rotation).await;
    assert_eq!(moved.expiry_notice_days, None);
    assert_eq!(due(7, 7).await, ["expiring"]);
    // The stale record (the old expiry) cannot claim the new one's stage.
    assert!(!f.store.record_expiry_notice(&kept, 7, &ev()).await.unwrap());
    assert!(f
        .store
        .record_expiry_notice(&moved, 7, &ev())
        .await
        .unwrap());
}

async fn policies_round_trip_and_count_what_exceeds_them(backend: Backend) {
    let f = fixture(backend).await;
    assert!(f
        .store
        .get_credential_policy(f.tenant.id)
        .await
        .unwrap()
        .is_none());
    let policy = CredentialPolicy {
        all: LifetimeRule {
            max_lifetime_days: Some(10),
            require_expiry: true,
            default_lifetime_days: Some(5),
        },
        robot_accounts: Some(LifetimeRule::default()),
        on_leak: LeakAction::Suspend,
        ..Default::default()
    };
    let at = now();
    f.store
        .put_credential_policy(f.tenant.id, &policy, at, &ev())
        .await
        .unwrap();
    assert_eq!(
        f.store.get_credential_policy(f.tenant.id).await.unwrap(),
        Some((policy.clone(), at))
    );
    // The bootstrap token expires in a day: within the rule. Add one too far, one without expiry.
    let (mut far, _) = new_token(f.tenant.id, "far");
    far.expires_at = Some(now() + TimeDelta::days(20));
    let (mut forever, _) = new_token(f.tenant.id, "forever");
    forever.expires_at = None;
    for credential in [&far, &forever] {
        f.store
            .insert_credential(credential, &ev(), None)
            .await
            .unwrap();
    }
    let count = |rule: LifetimeRule| {
        let store = f.store.clone();
        let tenant = f.tenant.id;
        async move {
            store
                .count_credentials_exceeding(tenant, CredentialKind::ApiToken, &rule, now())
                .await
                .unwrap()
        }
    };
    assert_eq!(count(policy.all).await, 2);
    assert_eq!(
        count(LifetimeRule {
            require_expiry: true,
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(count(LifetimeRule::default()).await, 0);
    f.store
        .revoke_credential(
            f.tenant.id,
            CredentialKind::ApiToken,
            far.id,
            now(),
            None,
            &ev(),
            &|_| ev(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(count(policy.all).await, 1, "revoked ones do not count");
}

async fn revoking_a_service_account_revokes_its_grants(backend: Backend) {
    let f = fixture(backend).await;
    let account = |name: &str| service_account(f.tenant.id, name);
    let (sa, suspended, other) = (account("sa"), account("suspended"), account("other"));
    for credential in [&sa, &suspended, &other] {
        f.store
            .insert_credential(credential, &ev(), None)
            .await
            .unwrap();
    }
    for (subject, key) in [(&sa, "deploy"), (&sa, "audit:read"), (&other, "deploy")] {
        f.store
            .insert_grant(
                &capability_grant(f.tenant.id, subject.id.as_uuid(), key),
                &ev(),
                None,
            )
            .await
            .unwrap();
    }
    let at = now();
    f.store
        .revoke_credential(
            f.tenant.id,
            CredentialKind::ServiceAccount,
            sa.id,
            at,
            None,
            &ev(),
            &|_| ev(),
            None,
        )
        .await
        .unwrap();
    let grants = f
        .store
        .list_grants(&GrantFilter {
            include_revoked: true,
            ..GrantFilter::live_for(f.tenant.id, SubjectType::ServiceAccount, sa.id.as_uuid())
        })
        .await
        .unwrap();
    assert_eq!(grants.len(), 2);
    assert!(grants.iter().all(|g| g.revoked_at == Some(at)));
    let others = f
        .store
        .list_grants(&GrantFilter::live_for(
            f.tenant.id,
            SubjectType::ServiceAccount,
            other.id.as_uuid(),
        ))
        .await
        .unwrap();
    assert_eq!(others.len(), 1, "another account's grant is untouched");
    f.store
        .set_credential_suspended(
            f.tenant.id,
            CredentialKind::ServiceAccount,
            suspended.id,
            Some(now()),
            now(),
            &ev(),
            None,
        )
        .await
        .unwrap();
    for subject in [&sa, &suspended] {
        assert!(matches!(
            f.store
                .insert_grant(
                    &capability_grant(f.tenant.id, subject.id.as_uuid(), "tokens:verify"),
                    &ev(),
                    None
                )
                .await,
            Err(StoreError::Conflict(_))
        ));
    }
}

store_suite! {
    canaries_round_trip_and_are_listed_only_when_asked_for,
}

async fn canaries_round_trip_and_are_listed_only_when_asked_for(backend: Backend) {
    let f = fixture(backend).await;
    let (mut canary, secret) = new_token(f.tenant.id, "bait");
    canary.canary = true;
    f.store
        .insert_credential(&canary, &ev(), None)
        .await
        .unwrap();
    let (mut imported, _) = new_token(f.tenant.id, "imported-bait");
    imported.canary = true;
    let (plain, _) = new_token(f.tenant.id, "plain");
    f.store
        .import_credentials(&[imported.clone(), plain.clone()], &[ev()])
        .await
        .unwrap();
    let found = f
        .store
        .find_credential_by_hash(&secret.hash())
        .await
        .unwrap()
        .expect("the canary is found by its hash");
    assert!(found.canary);
    assert_eq!(found, canary);
    let got = |id| {
        let store = f.store.clone();
        let tenant = f.tenant.id;
        async move {
            store
                .get_credential(tenant, CredentialKind::ApiToken, id)
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert!(got(imported.id).await.canary);
    assert!(!got(plain.id).await.canary);
    let list = |include_canaries| ListCredentials {
        tenant_id: f.tenant.id,
        kind: CredentialKind::ApiToken,
        after: None,
        limit: None,
        include_revoked: false,
        expiring: None,
        include_canaries,
    };
    let names = |credentials: Vec<Credential>| -> Vec<String> {
        credentials.into_iter().map(|c| c.name).collect()
    };
    let mut without = names(f.store.list_credentials(&list(false)).await.unwrap());
    without.sort();
    assert_eq!(without, ["bootstrap", "plain"]);
    let mut with = names(f.store.list_credentials(&list(true)).await.unwrap());
    with.sort();
    assert_eq!(with, ["bait", "bootstrap", "imported-bait", "plain"]);
}

// ------------------------------------------------------------------------------------------------
// Webhooks

store_suite! {
    deliveries_are_queued_with_each_event_for_matching_enabled_webhooks,
    a_lone_event_appended_again_is_written_once,
    a_change_whose_event_id_is_in_the_trail_fails_without_a_name_conflict,
    deliveries_are_leased_to_one_claim_and_recorded_by_it,
    a_webhook_failing_too_long_is_disabled_with_its_event,
    webhooks_update_rotate_retry_delete_prune_and_limit,
    a_claim_takes_each_webhooks_oldest_due_deliveries_up_to_its_share,
    a_claim_takes_each_tenants_deliveries_up_to_its_share,
    a_claim_prefers_the_tenant_with_the_fewest_deliveries_in_flight,
    an_unreadable_delivery_fails_alone,
    a_renewed_lease_keeps_only_the_deliveries_still_under_it,
    a_webhook_disabled_by_an_update_fails_its_pending_deliveries,
    a_delivery_whose_attempt_was_never_recorded_fails_with_its_disabled_webhook,
}

fn action_event(tenant: TenantId, action: &str) -> keyplane_core::AuditEvent {
    keyplane_core::AuditEvent {
        action: action.into(),
        ..event_in(tenant, now())
    }
}

fn webhook(tenant: TenantId, patterns: &[&str], enabled: bool) -> keyplane_core::Webhook {
    keyplane_core::Webhook {
        id: uuid::Uuid::now_v7(),
        tenant_id: tenant,
        url: "https://hooks.example.com/in".into(),
        events: patterns
            .iter()
            .map(|p| keyplane_core::ActionPattern::parse(p).unwrap())
            .collect(),
        description: String::new(),
        enabled,
        secret: keyplane_core::WebhookSecret::generate(&mut OsRng),
        previous_secret: None,
        failing_since: None,
        created_at: now(),
        updated_at: now(),
    }
}

async fn add_webhook(store: &dyn Store, hook: &keyplane_core::Webhook) {
    store
        .create_webhook(
            hook,
            20,
            &action_event(hook.tenant_id, "webhook.created"),
            None,
        )
        .await
        .unwrap();
}

async fn deliveries_of(
    store: &dyn Store,
    hook: &keyplane_core::Webhook,
) -> Vec<keyplane_store::WebhookDelivery> {
    store
        .list_webhook_deliveries(&keyplane_store::DeliveryQuery {
            tenant_id: hook.tenant_id,
            webhook_id: hook.id,
            before: None,
            status: None,
            limit: 100,
        })
        .await
        .unwrap()
}

fn claim_at(at: DateTime<Utc>) -> keyplane_store::DeliveryClaim {
    keyplane_store::DeliveryClaim {
        now: at,
        lease_until: at + TimeDelta::seconds(15),
        lease_id: uuid::Uuid::new_v4(),
        limit: 10,
        max_per_webhook: 10,
        max_per_tenant: 10,
    }
}

fn attempt(
    job: &keyplane_store::DeliveryJob,
    lease_id: uuid::Uuid,
    next: keyplane_store::AttemptNext,
) -> keyplane_store::DeliveryAttempt {
    keyplane_store::DeliveryAttempt {
        webhook_id: job.webhook.id,
        event_id: job.event_id,
        lease_id,
        at: now(),
        status_code: Some(if next == keyplane_store::AttemptNext::Succeeded {
            204
        } else {
            503
        }),
        latency_ms: 12,
        error: (next != keyplane_store::AttemptNext::Succeeded).then(|| "answered 503".into()),
        next,
    }
}

async fn deliveries_are_queued_with_each_event_for_matching_enabled_webhooks(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let tenant = f.tenant.id;
    let tokens = webhook(tenant, &["api_token.*"], true);
    let created = webhook(tenant, &["api_token.created", "registry.enabled"], true);
    let disabled = webhook(tenant, &["*"], false);
    let accounts = webhook(tenant, &["service_account.*"], true);
    let (other, _) = another_tenant(store, "globex").await;
    let elsewhere = webhook(other.id, &["*"], true);
    for hook in [&tokens, &created, &disabled, &accounts, &elsewhere] {
        add_webhook(store, hook).await;
    }
    // `elsewhere` got its own creation event; clear the slate for the counts below.
    let base_elsewhere = deliveries_of(store, &elsewhere).await.len();

    let (credential, _) = new_token(tenant, "ci");
    let event = action_event(tenant, "api_token.created");
    store
        .insert_credential(&credential, &event, None)
        .await
        .unwrap();
    store
        .append_audit_event(&action_event(tenant, "api_token.revoked"))
        .await
        .unwrap();
    // A change that fails queues nothing: its event never commits.
    let (duplicate, _) = new_token(tenant, "ci");
    assert!(store
        .insert_credential(&duplicate, &action_event(tenant, "api_token.created"), None)
        .await
        .is_err());

    let queued = deliveries_of(store, &tokens).await;
    assert_eq!(
        queued.iter().map(|d| d.action.as_str()).collect::<Vec<_>>(),
        ["api_token.revoked", "api_token.created"]
    );
    let first = &queued[1];
    assert_eq!(first.event_id, event.id);
    assert_eq!(first.status, keyplane_core::DeliveryStatus::Pending);
    assert_eq!(first.attempts, 0);
    assert!(first.next_attempt_at.is_some());
    let exact = deliveries_of(store, &created).await;
    assert_eq!(exact.len(), 1);
    assert_eq!(exact[0].event_id, event.id);
    assert!(deliveries_of(store, &disabled).await.is_empty());
    assert!(deliveries_of(store, &accounts).await.is_empty());
    assert_eq!(deliveries_of(store, &elsewhere).await.len(), base_elsewhere);
}

/// A claim renews its lease once it has read its jobs: the renewed deliveries are no other
/// claim's until the new end, and one another claim took once the lease ran out stays that one's.
async fn a_renewed_lease_keeps_only_the_deliveries_still_under_it(backend: Backend) {
    use keyplane_store::{AttemptNext, AttemptRecorded};
    let f = fixture(backend).await;
    let store = f.store.clone();
    let hook = webhook(f.tenant.id, &["api_token.*"], true);
    add_webhook(store.as_ref(), &hook).await;
    for _ in 0..2 {
        let event = action_event(f.tenant.id, "api_token.created");
        store.append_audit_event(&event).await.unwrap();
    }
    let first = claim_at(now());
    let jobs = store.claim_webhook_deliveries(&first).await.unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|job| job.event.is_some()));

    // The first lease ran out before it was renewed: another claim took one delivery.
    let second = keyplane_store::DeliveryClaim {
        limit: 1,
        ..claim_at(now() + TimeDelta::seconds(20))
    };
    let taken = store.claim_webhook_deliveries(&second).await.unwrap();
    assert_eq!(taken.len(), 1);
    let renewed = store
        .renew_webhook_lease(first.lease_id, now() + TimeDelta::seconds(40))
        .await
        .unwrap();
    let kept: Vec<_> = jobs
        .iter()
        .filter(|job| job.event_id != taken[0].event_id)
        .map(|job| (job.webhook.id, job.event_id))
        .collect();
    assert_eq!(renewed, kept);

    // Past the first lease's old end, within its new one: no claim takes either delivery.
    assert!(store
        .claim_webhook_deliveries(&claim_at(now() + TimeDelta::seconds(30)))
        .await
        .unwrap()
        .is_empty());
    let mine = jobs.iter().find(|job| job.event_id == kept[0].1).unwrap();
    let done = attempt(mine, first.lease_id, AttemptNext::Succeeded);
    assert_eq!(
        store
            .record_webhook_attempt(&done, now() - TimeDelta::days(5), &ev())
            .await
            .unwrap(),
        AttemptRecorded::Recorded
    );
    let lost = attempt(&taken[0], first.lease_id, AttemptNext::Succeeded);
    assert_eq!(
        store
            .record_webhook_attempt(&lost, now() - TimeDelta::days(5), &ev())
            .await
            .unwrap(),
        AttemptRecorded::NotLeased
    );
}

async fn deliveries_are_leased_to_one_claim_and_recorded_by_it(backend: Backend) {
    use keyplane_store::AttemptNext;
    let f = fixture(backend).await;
    let store = f.store.clone();
    let hook = webhook(f.tenant.id, &["api_token.*"], true);
    add_webhook(store.as_ref(), &hook).await;
    let mut events = Vec::new();
    for _ in 0..3 {
        let event = action_event(f.tenant.id, "api_token.created");
        store.append_audit_event(&event).await.unwrap();
        events.push(event.id);
    }

    // Racing claims share the due deliveries out: each is leased once.
    let at = now();
    let racing = results_of((0..4).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.claim_webhook_deliveries(&claim_at(at)).await })
    }))
    .await;
    let mut claimed: Vec<uuid::Uuid> = Vec::new();
    for jobs in racing {
        claimed.extend(jobs.unwrap().iter().map(|j| j.event_id));
    }
    claimed.sort();
    assert_eq!(claimed, events, "each delivery leased exactly once");
    assert!(store
        .claim_webhook_deliveries(&claim_at(now()))
        .await
        .unwrap()
        .is_empty());

    // Once the leases run out another claim takes them; the first claim's record is refused.
    let later = claim_at(now() + TimeDelta::seconds(20));
    let jobs = store.claim_webhook_deliveries(&later).await.unwrap();
    assert_eq!(jobs.len(), 3);
    let job = &jobs[0];
    assert_eq!(job.webhook.secret, hook.secret);
    assert_eq!(job.webhook.url, hook.url);
    let event = job.event.as_ref().expect("the event travels with the job");
    assert_eq!(event.event.id, job.event_id);
    let stale = attempt(job, uuid::Uuid::new_v4(), AttemptNext::Succeeded);
    assert_eq!(
        store
            .record_webhook_attempt(&stale, now() - TimeDelta::days(5), &ev())
            .await
            .unwrap(),
        keyplane_store::AttemptRecorded::NotLeased
    );
    let pending = deliveries_of(store.as_ref(), &hook).await;
    assert!(pending.iter().all(|d| d.attempts == 0));

    // Succeeded, retried later, failed for good.
    let done = attempt(&jobs[0], later.lease_id, AttemptNext::Succeeded);
    store
        .record_webhook_attempt(&done, now() - TimeDelta::days(5), &ev())
        .await
        .unwrap();
    let retry_at = now() + TimeDelta::seconds(60);
    let retried = attempt(&jobs[1], later.lease_id, AttemptNext::RetryAt(retry_at));
    store
        .record_webhook_attempt(&retried, now() - TimeDelta::days(5), &ev())
        .await
        .unwrap();
    let failed = attempt(&jobs[2], later.lease_id, AttemptNext::Failed);
    store
        .record_webhook_attempt(&failed, now() - TimeDelta::days(5), &ev())
        .await
        .unwrap();
    let listed = deliveries_of(store.as_ref(), &hook).await;
    let by_id = |id: uuid::Uuid| listed.iter().find(|d| d.event_id == id).unwrap();
    let ok = by_id(jobs[0].event_id);
    assert_eq!(
        (
            ok.status,
            ok.attempts,
            ok.last_status_code,
            ok.last_latency_ms
        ),
        (
            keyplane_core::DeliveryStatus::Succeeded,
            1,
            Some(204),
            Some(12)
        )
    );
    assert_eq!(ok.next_attempt_at, None);
    let waiting = by_id(jobs[1].event_id);
    assert_eq!(waiting.status, keyplane_core::DeliveryStatus::Pending);
    assert_eq!(
        waiting.next_attempt_at.map(|t| t.timestamp_millis()),
        Some(retry_at.timestamp_millis())
    );
    assert_eq!(waiting.last_error.as_deref(), Some("answered 503"));
    assert_eq!(
        by_id(jobs[2].event_id).status,
        keyplane_core::DeliveryStatus::Failed
    );

    // Only the retry is due, and only once its time has come.
    assert!(store
        .claim_webhook_deliveries(&claim_at(now() + TimeDelta::seconds(30)))
        .await
        .unwrap()
        .is_empty());
    let due = store
        .claim_webhook_deliveries(&claim_at(retry_at + TimeDelta::seconds(1)))
        .await
        .unwrap();
    assert_eq!(
        due.iter().map(|j| j.event_id).collect::<Vec<_>>(),
        [jobs[1].event_id]
    );
    assert_eq!(due[0].schedule_step, 1);
    assert_eq!(due[0].attempts, 1);
}

async fn a_webhook_failing_too_long_is_disabled_with_its_event(backend: Backend) {
    use keyplane_store::AttemptNext;
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let hook = webhook(f.tenant.id, &["*"], true);
    add_webhook(store, &hook).await;
    store
        .append_audit_event(&action_event(f.tenant.id, "api_token.created"))
        .await
        .unwrap();
    store
        .append_audit_event(&action_event(f.tenant.id, "api_token.created"))
        .await
        .unwrap();
    let lease = claim_at(now());
    let jobs = store.claim_webhook_deliveries(&lease).await.unwrap();
    // Its own creation event and the tokens'.
    assert_eq!(jobs.len(), 3);
    let head = store.audit_chain_state(f.tenant.id).await.unwrap().head_seq;
    let disabled_event = action_event(f.tenant.id, "webhook.disabled");

    // Recorded by a replica whose clock is not trusted: its failure starts no failing period.
    let untrusted = attempt(&jobs[2], lease.lease_id, AttemptNext::RetryAt(now()));
    assert_eq!(
        store
            .record_webhook_attempt(&untrusted, DateTime::<Utc>::MIN_UTC, &disabled_event)
            .await
            .unwrap(),
        keyplane_store::AttemptRecorded::Recorded
    );
    let got = store
        .get_webhook(f.tenant.id, hook.id)
        .await
        .unwrap()
        .unwrap();
    assert!(got.enabled);
    assert_eq!(got.failing_since, None);

    // Failing since this attempt: not for long enough yet.
    let first = attempt(&jobs[0], lease.lease_id, AttemptNext::RetryAt(now()));
    assert_eq!(
        store
            .record_webhook_attempt(&first, now() - TimeDelta::days(5), &disabled_event)
            .await
            .unwrap(),
        keyplane_store::AttemptRecorded::Recorded
    );
    let got = store
        .get_webhook(f.tenant.id, hook.id)
        .await
        .unwrap()
        .unwrap();
    assert!(got.enabled);
    assert!(got.failing_since.is_some());
    // Failing since before the cutoff: disabled, with its event, in the same transaction.
    let second = attempt(&jobs[1], lease.lease_id, AttemptNext::RetryAt(now()));
    assert_eq!(
        store
            .record_webhook_attempt(&second, now() + TimeDelta::seconds(1), &disabled_event)
            .await
            .unwrap(),
        keyplane_store::AttemptRecorded::Disabled
    );
    let got = store
        .get_webhook(f.tenant.id, hook.id)
        .await
        .unwrap()
        .unwrap();
    assert!(!got.enabled);
    assert_eq!(
        store.audit_chain_state(f.tenant.id).await.unwrap().head_seq,
        head + 1
    );
    // Its pending deliveries (the two retried and the one that disabled it) failed with it, and
    // new events queue none.
    assert_disabled_deliveries_failed(store, &hook, 3).await;
    store
        .append_audit_event(&action_event(f.tenant.id, "api_token.revoked"))
        .await
        .unwrap();
    assert!(store
        .claim_webhook_deliveries(&claim_at(now() + TimeDelta::hours(1)))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(deliveries_of(store, &hook).await.len(), 3);
    // Enabled again: failing_since is cleared, and only new events are delivered.
    let mut enabled = got.clone();
    enabled.enabled = true;
    store.update_webhook(&enabled, &ev()).await.unwrap();
    let got = store
        .get_webhook(f.tenant.id, hook.id)
        .await
        .unwrap()
        .unwrap();
    assert!(got.enabled && got.failing_since.is_none());
    let later = claim_at(now() + TimeDelta::seconds(1));
    assert!(store
        .claim_webhook_deliveries(&later)
        .await
        .unwrap()
        .is_empty());
    let new = action_event(f.tenant.id, "api_token.created");
    store.append_audit_event(&new).await.unwrap();
    let jobs = store
        .claim_webhook_deliveries(&claim_at(now() + TimeDelta::seconds(1)))
        .await
        .unwrap();
    assert_eq!(
        jobs.iter().map(|job| job.event_id).collect::<Vec<_>>(),
        [new.id]
    );
}

/// Every delivery of `hook` failed (`count` of them), the pending ones with the disable's error.
async fn assert_disabled_deliveries_failed(
    store: &dyn Store,
    hook: &keyplane_core::Webhook,
    count: usize,
) {
    assert_disabled_deliveries_failed_but(store, hook, count, None).await;
}

/// [`assert_disabled_deliveries_failed`], but for the delivery of `in_flight`'s event, if given.
async fn assert_disabled_deliveries_failed_but(
    store: &dyn Store,
    hook: &keyplane_core::Webhook,
    count: usize,
    in_flight: Option<uuid::Uuid>,
) {
    let listed = deliveries_of(store, hook).await;
    assert_eq!(listed.len(), count);
    for delivery in listed.into_iter().filter(|d| Some(d.event_id) != in_flight) {
        assert_eq!(
            (delivery.status, delivery.last_error.as_deref()),
            (
                keyplane_core::DeliveryStatus::Failed,
                Some(keyplane_store::DISABLED_WEBHOOK_ERROR)
            ),
            "{delivery:?}"
        );
        assert!(delivery.next_attempt_at.is_none());
    }
}

/// Disabling a webhook by an update fails its pending deliveries in the same transaction, but for
/// one being sent: that one ends as its receiver answered, failed rather than retried (a disabled
/// webhook has no pending delivery). The prune removes them all after the retention.
async fn a_webhook_disabled_by_an_update_fails_its_pending_deliveries(backend: Backend) {
    use keyplane_store::{AttemptNext, AttemptRecorded};
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let hook = webhook(f.tenant.id, &["api_token.*"], true);
    add_webhook(store, &hook).await;
    for _ in 0..3 {
        store
            .append_audit_event(&action_event(f.tenant.id, "api_token.created"))
            .await
            .unwrap();
    }
    // One in flight, under a lease, when the webhook is disabled.
    let lease = keyplane_store::DeliveryClaim {
        limit: 1,
        ..claim_at(now())
    };
    let in_flight = store.claim_webhook_deliveries(&lease).await.unwrap();
    assert_eq!(in_flight.len(), 1);
    let mut disabled = hook.clone();
    disabled.enabled = false;
    store.update_webhook(&disabled, &ev()).await.unwrap();
    let sent = Some(in_flight[0].event_id);
    assert_disabled_deliveries_failed_but(store, &hook, 3, sent).await;
    let done = attempt(&in_flight[0], lease.lease_id, AttemptNext::RetryAt(now()));
    assert_eq!(
        store
            .record_webhook_attempt(&done, now() - TimeDelta::days(5), &ev())
            .await
            .unwrap(),
        AttemptRecorded::Recorded
    );
    let recorded = deliveries_of(store, &hook)
        .await
        .into_iter()
        .find(|d| Some(d.event_id) == sent)
        .unwrap();
    assert_eq!(
        (
            recorded.status,
            recorded.attempts,
            recorded.last_error.as_deref()
        ),
        (
            keyplane_core::DeliveryStatus::Failed,
            1,
            Some("answered 503")
        ),
        "{recorded:?}"
    );
    assert_disabled_deliveries_failed_but(store, &hook, 3, sent).await;
    // Nor is one retried while the webhook is disabled.
    assert!(matches!(
        store
            .retry_webhook_delivery(f.tenant.id, hook.id, in_flight[0].event_id, now(), 0, &ev())
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_disabled_deliveries_failed_but(store, &hook, 3, sent).await;
    // Finished, so pruned after the retention like any other.
    assert_eq!(
        store
            .prune_webhook_deliveries(now(), now() + TimeDelta::seconds(1), 100)
            .await
            .unwrap(),
        3
    );
}

/// A delivery being sent when its webhook is disabled, whose attempt is never recorded (its
/// replica died mid-attempt), must not stay pending on the disabled webhook: it would be sent
/// when the webhook is enabled again, and never pruned while it is not. Once its lease has ended,
/// enabling the webhook (or the prune, while it stays disabled) fails it as the disable failed
/// the others.
async fn a_delivery_whose_attempt_was_never_recorded_fails_with_its_disabled_webhook(
    backend: Backend,
) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let after_the_lease =
        |lease: &keyplane_store::DeliveryClaim| lease.lease_until + TimeDelta::seconds(1);
    // Enabled again, then left disabled for the prune.
    for enabled_again in [true, false] {
        // Each webhook its own action: the first is enabled again when the second's is queued.
        let action = format!("stranded.{enabled_again}");
        let hook = webhook(f.tenant.id, &[&action], true);
        add_webhook(store, &hook).await;
        store
            .append_audit_event(&action_event(f.tenant.id, &action))
            .await
            .unwrap();
        let lease = claim_at(now());
        assert_eq!(
            store.claim_webhook_deliveries(&lease).await.unwrap().len(),
            1
        );
        let disabled = keyplane_core::Webhook {
            enabled: false,
            updated_at: now(),
            ..hook.clone()
        };
        store.update_webhook(&disabled, &ev()).await.unwrap();
        // No attempt is recorded under `lease`.
        let later = after_the_lease(&lease);
        if enabled_again {
            let enabled = keyplane_core::Webhook {
                updated_at: later,
                ..hook.clone()
            };
            store.update_webhook(&enabled, &ev()).await.unwrap();
            let sent = store
                .claim_webhook_deliveries(&claim_at(later))
                .await
                .unwrap();
            assert!(
                sent.is_empty(),
                "sent on enabling the webhook again: {sent:?}"
            );
        } else {
            // Finished deliveries are kept; only the stranded one changes.
            store
                .prune_webhook_deliveries(later, later - TimeDelta::days(30), 100)
                .await
                .unwrap();
        }
        assert_disabled_deliveries_failed(store, &hook, 1).await;
    }
}

async fn webhooks_update_rotate_retry_delete_prune_and_limit(backend: Backend) {
    use keyplane_store::AttemptNext;
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let tenant = f.tenant.id;
    let hook = webhook(tenant, &["api_token.created"], true);
    assert!(matches!(
        store
            .create_webhook(&webhook(tenant, &["*"], true), 0, &ev(), None)
            .await,
        Err(StoreError::Conflict(_))
    ));
    add_webhook(store, &hook).await;
    assert_eq!(store.list_webhooks(tenant).await.unwrap().len(), 1);
    assert!(store
        .get_webhook(TenantId::new(), hook.id)
        .await
        .unwrap()
        .is_none());

    // New patterns apply to the next event.
    let mut changed = hook.clone();
    changed.events = vec![keyplane_core::ActionPattern::parse("grant.*").unwrap()];
    changed.url = "https://hooks.example.com/other".into();
    store.update_webhook(&changed, &ev()).await.unwrap();
    store
        .append_audit_event(&action_event(tenant, "api_token.created"))
        .await
        .unwrap();
    store
        .append_audit_event(&action_event(tenant, "grant.created"))
        .await
        .unwrap();
    let listed = deliveries_of(store, &hook).await;
    assert_eq!(
        listed.iter().map(|d| d.action.as_str()).collect::<Vec<_>>(),
        ["grant.created"]
    );
    let got = store.get_webhook(tenant, hook.id).await.unwrap().unwrap();
    assert_eq!(got.url, changed.url);
    assert_eq!(got.secret, hook.secret, "an update keeps the secret");
    let mut foreign = changed.clone();
    foreign.tenant_id = TenantId::new();
    assert!(matches!(
        store.update_webhook(&foreign, &ev()).await,
        Err(StoreError::NotFound)
    ));

    // Rotation: the old secret becomes the previous one.
    let fresh = keyplane_core::WebhookSecret::generate(&mut OsRng);
    let until = now() + TimeDelta::hours(24);
    let rotated = store
        .rotate_webhook_secret(tenant, hook.id, &fresh, until, now(), &ev(), None)
        .await
        .unwrap();
    assert_eq!(rotated.secret, fresh);
    let (previous, previous_until) = rotated.previous_secret.expect("a previous secret");
    assert_eq!(previous, hook.secret);
    assert_eq!(previous_until.timestamp_millis(), until.timestamp_millis());

    // A failed delivery retried: pending, due now, at the given schedule step.
    let lease = claim_at(now());
    let jobs = store.claim_webhook_deliveries(&lease).await.unwrap();
    let failed = attempt(&jobs[0], lease.lease_id, AttemptNext::Failed);
    store
        .record_webhook_attempt(&failed, now() - TimeDelta::days(5), &ev())
        .await
        .unwrap();
    let retried = store
        .retry_webhook_delivery(tenant, hook.id, jobs[0].event_id, now(), 7, &ev())
        .await
        .unwrap();
    assert_eq!(retried.status, keyplane_core::DeliveryStatus::Pending);
    assert_eq!(retried.attempts, 1);
    let due_claim = claim_at(now() + TimeDelta::seconds(1));
    let due = store.claim_webhook_deliveries(&due_claim).await.unwrap();
    assert_eq!(due[0].schedule_step, 7);
    assert!(matches!(
        store
            .retry_webhook_delivery(tenant, hook.id, uuid::Uuid::now_v7(), now(), 0, &ev())
            .await,
        Err(StoreError::NotFound)
    ));

    // Pruning takes finished deliveries queued before the cutoff only.
    let prune = |before| store.prune_webhook_deliveries(now(), before, 10);
    assert_eq!(
        prune(now() + TimeDelta::days(1)).await.unwrap(),
        0,
        "a pending one stays"
    );
    let done = attempt(&due[0], due_claim.lease_id, AttemptNext::Succeeded);
    store
        .record_webhook_attempt(&done, now() - TimeDelta::days(5), &ev())
        .await
        .unwrap();
    assert_eq!(
        prune(now() - TimeDelta::days(1)).await.unwrap(),
        0,
        "too young"
    );
    assert_eq!(prune(now() + TimeDelta::days(1)).await.unwrap(), 1);
    assert!(deliveries_of(store, &hook).await.is_empty());
    store
        .append_audit_event(&action_event(tenant, "grant.revoked"))
        .await
        .unwrap();

    // Deleting takes its deliveries along.
    assert!(matches!(
        store.delete_webhook(TenantId::new(), hook.id, &ev()).await,
        Err(StoreError::NotFound)
    ));
    store.delete_webhook(tenant, hook.id, &ev()).await.unwrap();
    assert!(store.get_webhook(tenant, hook.id).await.unwrap().is_none());
    assert!(deliveries_of(store, &hook).await.is_empty());
}

/// A webhook whose deliveries pile up (a slow or dead endpoint, many events) gets no more than
/// `max_per_webhook` of them leased at once, however old they are: the others' come first.
async fn a_claim_takes_each_webhooks_oldest_due_deliveries_up_to_its_share(backend: Backend) {
    use keyplane_store::AttemptNext;
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let tenant = f.tenant.id;
    let hog = webhook(tenant, &["api_token.*"], true);
    let quiet = webhook(tenant, &["grant.*"], true);
    add_webhook(store, &hog).await;
    add_webhook(store, &quiet).await;
    // Every one of the hog's deliveries is due before any of the quiet one's.
    let base = now() - TimeDelta::minutes(1);
    let (mut hogs, mut quiets) = (Vec::new(), Vec::new());
    for second in 0..14 {
        let (action, ids) = match second {
            0..12 => ("api_token.created", &mut hogs),
            _ => ("grant.created", &mut quiets),
        };
        let event = keyplane_core::AuditEvent {
            action: action.into(),
            ..event_in(tenant, base + TimeDelta::seconds(second))
        };
        store.append_audit_event(&event).await.unwrap();
        ids.push(event.id);
    }
    let claim = |at: DateTime<Utc>, max_per_webhook| keyplane_store::DeliveryClaim {
        now: at,
        lease_until: at + TimeDelta::seconds(15),
        lease_id: uuid::Uuid::new_v4(),
        limit: 10,
        max_per_webhook,
        max_per_tenant: 10,
    };
    let ids = |jobs: &[keyplane_store::DeliveryJob]| -> Vec<uuid::Uuid> {
        jobs.iter().map(|j| j.event_id).collect()
    };

    // One of each, the oldest due first.
    let first = claim(now(), 1);
    let jobs = store.claim_webhook_deliveries(&first).await.unwrap();
    assert_eq!(ids(&jobs), [hogs[0], quiets[0]]);
    // Both are at their share while those leases last.
    assert!(store
        .claim_webhook_deliveries(&claim(now(), 1))
        .await
        .unwrap()
        .is_empty());
    // The quiet one's attempt ends: its next delivery is claimed; the hog's still wait.
    let done = attempt(&jobs[1], first.lease_id, AttemptNext::Succeeded);
    store
        .record_webhook_attempt(&done, now() - TimeDelta::days(5), &ev())
        .await
        .unwrap();
    let jobs = store
        .claim_webhook_deliveries(&claim(now(), 1))
        .await
        .unwrap();
    assert_eq!(ids(&jobs), [quiets[1]]);
    // A share of 3 counts the hog's delivery still leased: two more, in due order.
    let jobs = store
        .claim_webhook_deliveries(&claim(now(), 3))
        .await
        .unwrap();
    assert_eq!(ids(&jobs), [hogs[1], hogs[2]]);
    // Once the leases run out, they count no more: the oldest again, one each.
    let jobs = store
        .claim_webhook_deliveries(&claim(now() + TimeDelta::seconds(20), 1))
        .await
        .unwrap();
    assert_eq!(ids(&jobs), [hogs[0], quiets[1]]);
}

/// A tenant whose many webhooks' deliveries pile up (slow endpoints, many events) gets no more
/// than `max_per_tenant` of them leased at once, however old they are: another tenant's, due
/// later, are claimed meanwhile, and the first tenant's rest wait without taking a place.
async fn a_claim_takes_each_tenants_deliveries_up_to_its_share(backend: Backend) {
    use keyplane_store::AttemptNext;
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let busy = f.tenant.id;
    let (other, _) = another_tenant(store, "globex").await;
    for _ in 0..3 {
        add_webhook(store, &webhook(busy, &["api_token.*"], true)).await;
    }
    add_webhook(store, &webhook(other.id, &["api_token.*"], true)).await;
    // Two events of the busy tenant (six deliveries, two per webhook), then the other's, due last.
    let base = now() - TimeDelta::minutes(1);
    for second in 0..2 {
        let event = keyplane_core::AuditEvent {
            action: "api_token.created".into(),
            ..event_in(busy, base + TimeDelta::seconds(second))
        };
        store.append_audit_event(&event).await.unwrap();
    }
    let late = keyplane_core::AuditEvent {
        action: "api_token.created".into(),
        ..event_in(other.id, base + TimeDelta::seconds(10))
    };
    store.append_audit_event(&late).await.unwrap();
    let claim = |at: DateTime<Utc>| keyplane_store::DeliveryClaim {
        now: at,
        lease_until: at + TimeDelta::seconds(15),
        lease_id: uuid::Uuid::new_v4(),
        limit: 10,
        max_per_webhook: 2,
        max_per_tenant: 4,
    };
    let of = |jobs: &[keyplane_store::DeliveryJob], tenant: TenantId| {
        jobs.iter()
            .filter(|j| j.webhook.tenant_id == tenant)
            .count()
    };

    // The busy tenant's share, and the other's delivery.
    let first = claim(now());
    let jobs = store.claim_webhook_deliveries(&first).await.unwrap();
    assert_eq!((of(&jobs, busy), of(&jobs, other.id)), (4, 1));
    assert!(jobs.iter().any(|j| j.event_id == late.id));
    // While those leases last, the busy tenant's two others wait.
    assert!(store
        .claim_webhook_deliveries(&claim(now()))
        .await
        .unwrap()
        .is_empty());
    // One of its attempts ends: one more of its deliveries is claimed.
    let done = jobs.iter().find(|j| j.webhook.tenant_id == busy).unwrap();
    let done = attempt(done, first.lease_id, AttemptNext::Succeeded);
    store
        .record_webhook_attempt(&done, now() - TimeDelta::days(5), &ev())
        .await
        .unwrap();
    let jobs = store.claim_webhook_deliveries(&claim(now())).await.unwrap();
    assert_eq!((of(&jobs, busy), of(&jobs, other.id)), (1, 0));
    // Once the leases run out, they count no more: its share again.
    let jobs = store
        .claim_webhook_deliveries(&claim(now() + TimeDelta::seconds(20)))
        .await
        .unwrap();
    assert_eq!(of(&jobs, busy), 4);
}

/// Tenants whose slow receivers keep deliveries in flight do not take the next free place ahead of
/// one with none in flight, even with older deliveries due: a claim goes to the tenant with the
/// fewest of its deliveries leased, and only then to the oldest.
async fn a_claim_prefers_the_tenant_with_the_fewest_deliveries_in_flight(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let mut busy = vec![f.tenant.id];
    for name in ["globex", "initech", "umbrella", "quiet"] {
        let (tenant, _) = another_tenant(store, name).await;
        busy.push(tenant.id);
    }
    let quiet = busy.pop().unwrap();
    for tenant in busy.iter().chain([&quiet]) {
        add_webhook(store, &webhook(*tenant, &["api_token.*"], true)).await;
    }
    // Two events each of the busy tenants, interleaved; the quiet tenant's one, due last.
    let base = now() - TimeDelta::minutes(1);
    let mut second = 0;
    for _ in 0..2 {
        for tenant in &busy {
            let event = keyplane_core::AuditEvent {
                action: "api_token.created".into(),
                ..event_in(*tenant, base + TimeDelta::seconds(second))
            };
            store.append_audit_event(&event).await.unwrap();
            second += 1;
        }
    }
    let late = keyplane_core::AuditEvent {
        action: "api_token.created".into(),
        ..event_in(quiet, base + TimeDelta::seconds(30))
    };
    store.append_audit_event(&late).await.unwrap();
    let claim = |limit: u32| keyplane_store::DeliveryClaim {
        limit,
        ..claim_at(now())
    };

    // Each busy tenant's oldest is sent (and its receiver is slow: the lease lasts).
    let first = store.claim_webhook_deliveries(&claim(4)).await.unwrap();
    let mut tenants: Vec<TenantId> = first.iter().map(|j| j.webhook.tenant_id).collect();
    tenants.sort();
    let mut expected = busy.clone();
    expected.sort();
    assert_eq!(tenants, expected);
    // One place frees: the quiet tenant's delivery takes it, not a busy one's older second.
    let next = store.claim_webhook_deliveries(&claim(1)).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].event_id, late.id);
    // Then the busy tenants' seconds, oldest first.
    let rest = store.claim_webhook_deliveries(&claim(1)).await.unwrap();
    assert_eq!(rest[0].webhook.tenant_id, busy[0]);
}

/// Runs `sql` with `id` on the fixture's database directly, as damage from outside would.
async fn damage(f: &Fixture, sql: &str, id: uuid::Uuid) {
    let changed = if f._db.url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(&f._db.url).await.unwrap();
        let done = sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
        pool.close().await;
        done.rows_affected()
    } else {
        let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
        let done = sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
        pool.close().await;
        done.rows_affected()
    };
    assert_eq!(changed, 1, "{sql}");
}

/// A delivery whose webhook or event no longer decodes fails for good, alone; the claim hands
/// out the rest.
async fn an_unreadable_delivery_fails_alone(backend: Backend) {
    use keyplane_core::DeliveryStatus;
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let tenant = f.tenant.id;
    let good = webhook(tenant, &["api_token.*"], true);
    let broken = webhook(tenant, &["api_token.*"], true);
    // A column sqlx itself cannot decode (SQLite keeps any text in any column).
    let odd = webhook(tenant, &["api_token.*"], true);
    add_webhook(store, &good).await;
    add_webhook(store, &broken).await;
    add_webhook(store, &odd).await;
    let readable = action_event(tenant, "api_token.created");
    store.append_audit_event(&readable).await.unwrap();
    let unreadable = action_event(tenant, "api_token.revoked");
    store.append_audit_event(&unreadable).await.unwrap();
    damage(
        &f,
        "UPDATE webhooks SET secret = secret || '!' WHERE id = $1",
        broken.id,
    )
    .await;
    damage(
        &f,
        "UPDATE audit_events SET details = 'not json' WHERE id = $1",
        unreadable.id,
    )
    .await;
    if backend == Backend::Sqlite {
        damage(
            &f,
            "UPDATE webhooks SET created_at = 'not a time' WHERE id = $1",
            odd.id,
        )
        .await;
    } else {
        store.delete_webhook(tenant, odd.id, &ev()).await.unwrap();
    }

    let at = now();
    let jobs = store.claim_webhook_deliveries(&claim_at(at)).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].webhook.id, jobs[0].event_id),
        (good.id, readable.id)
    );
    assert!(jobs[0].event.is_some());
    let to_good = deliveries_of(store, &good).await;
    let of = |list: &[keyplane_store::WebhookDelivery], id| {
        list.iter().find(|d| d.event_id == id).unwrap().clone()
    };
    assert_eq!(of(&to_good, readable.id).status, DeliveryStatus::Pending);
    let failed = of(&to_good, unreadable.id);
    assert_eq!(
        (failed.status, failed.attempts, failed.next_attempt_at),
        (DeliveryStatus::Failed, 1, None)
    );
    assert_eq!(
        failed.last_error.as_deref(),
        Some("the stored event cannot be read")
    );
    let mut to_broken = deliveries_of(store, &broken).await;
    to_broken.extend(deliveries_of(store, &odd).await);
    let expected = if backend == Backend::Sqlite { 4 } else { 2 };
    assert_eq!(to_broken.len(), expected);
    for delivery in &to_broken {
        assert_eq!(delivery.status, DeliveryStatus::Failed);
        assert_eq!(
            delivery.last_error.as_deref(),
            Some("the stored delivery or its webhook cannot be read")
        );
    }
    // Failed for good: once the lease runs out, only the readable delivery is claimed again.
    let again = store
        .claim_webhook_deliveries(&claim_at(at + TimeDelta::seconds(20)))
        .await
        .unwrap();
    assert_eq!(
        again.iter().map(|j| j.event_id).collect::<Vec<_>>(),
        [readable.id]
    );
}

store_suite! {
    concurrent_creates_keep_to_the_webhook_cap,
    concurrent_grants_keep_to_the_subject_cap,
}

/// Of grants racing to one subject one short of its cap (PostgreSQL runs them at once under READ
/// COMMITTED), only as many succeed as there is room for, the others told why; a service account
/// (serialized by its row) and a user (by the tenant's audit head) alike. Another subject is not
/// held back.
async fn concurrent_grants_keep_to_the_subject_cap(backend: Backend) {
    const CAP: usize = keyplane_core::grant::MAX_LIVE_GRANTS_PER_SUBJECT;
    let f = fixture(backend).await;
    let tenant = f.tenant.id;
    let sa = service_account(tenant, "granted");
    f.store.insert_credential(&sa, &ev(), None).await.unwrap();
    let to = |subject_type: SubjectType, subject: uuid::Uuid, key: &str| Grant {
        subject_type,
        ..capability_grant(tenant, subject, key)
    };
    for (subject_type, subject) in [
        (SubjectType::ServiceAccount, sa.id.as_uuid()),
        (SubjectType::User, uuid::Uuid::new_v4()),
    ] {
        for i in 0..CAP - 2 {
            let grant = to(subject_type, subject, &format!("custom.right{i}"));
            f.store.insert_grant(&grant, &ev(), None).await.unwrap();
        }
        let racing = (0..8).map(|i| {
            let (store, grant) = (
                f.store.clone(),
                to(subject_type, subject, &format!("custom.racing{i}")),
            );
            tokio::spawn(async move { store.insert_grant(&grant, &ev(), None).await })
        });
        let outcomes = results_of(racing).await;
        assert_eq!(
            outcomes.iter().filter(|o| o.is_ok()).count(),
            2,
            "{subject_type:?}: {outcomes:?}"
        );
        for outcome in outcomes.iter().filter(|o| o.is_err()) {
            assert!(
                matches!(outcome, Err(StoreError::Conflict(m)) if m.contains(&format!("{CAP} live grants"))),
                "{subject_type:?}: {outcome:?}"
            );
        }
        let live = f
            .store
            .list_grants(&GrantFilter::live_for(tenant, subject_type, subject))
            .await
            .unwrap();
        assert_eq!(live.len(), CAP, "{subject_type:?}");
        // The same live grant again is still a duplicate, not over the cap.
        let again = f
            .store
            .insert_grant(&to(subject_type, subject, "custom.right0"), &ev(), None)
            .await;
        assert!(
            matches!(&again, Err(StoreError::Conflict(m)) if m == "the same live grant already exists"),
            "{again:?}"
        );
    }
    let other = capability_grant(tenant, uuid::Uuid::new_v4(), "custom.right0");
    f.store.insert_grant(&other, &ev(), None).await.unwrap();
}

/// Races only PostgreSQL has (SQLite has one writer): a PostgreSQL test alone, rather than a
/// SQLite one that could only pass.
macro_rules! postgres_suite {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test]
                async fn postgres() {
                    super::$case().await
                }
            }
        )*
    };
}

postgres_suite! {
    a_database_that_refuses_connections_is_unreachable,
    a_slow_database_is_not_called_unreachable,
    a_replica_waits_for_another_replicas_migrations,
    a_migration_behind_a_long_transaction_lets_the_replicas_through_until_it_has_its_lock,
    a_migration_whose_lock_stays_taken_fails_the_start_naming_who_holds_it,
    a_store_whose_migrations_cannot_be_read_says_why,
    last_use_flushes_lock_their_credentials_in_id_order,
    the_sweep_clears_ended_previous_secrets_without_holding_one_while_waiting,
    deleting_a_webhook_while_another_write_queues_to_it_does_not_deadlock,
    webhook_writes_take_the_audit_head_before_the_webhook,
    prunes_keep_rows_renewed_while_they_wait,
    a_sign_out_during_a_console_change_does_not_deadlock,
    a_grant_made_while_the_same_one_is_revoked_does_not_deadlock,
    webhook_deliveries_are_locked_in_event_order,
    a_stores_own_notifications_come_back_as_echoes_and_no_other,
    a_lone_event_two_replicas_append_at_once_is_written_once,
    revoking_a_revoked_grant_notifies_no_other_replica,
    an_import_waits_for_a_deletion_under_way_and_is_refused,
}

/// Two credentials of the fixture's tenant, the one with the lower id second.
async fn two_tokens_higher_id_first(f: &Fixture) -> (Credential, Credential) {
    let (one, _) = new_token(f.tenant.id, "one");
    let (two, _) = new_token(f.tenant.id, "two");
    let (low, high) = if one.id < two.id {
        (one, two)
    } else {
        (two, one)
    };
    for credential in [&high, &low] {
        f.store
            .insert_credential(credential, &ev(), None)
            .await
            .unwrap();
    }
    (low, high)
}

/// Locks a credential's row in `tx`, as a write of it would.
async fn lock_credential(tx: &mut sqlx::PgConnection, credential: &Credential) {
    sqlx::query("UPDATE credentials SET updated_at = updated_at WHERE id = $1")
        .bind(credential.id.as_uuid())
        .execute(tx)
        .await
        .unwrap();
}

/// PostgreSQL: another replica's flush holds the lower id and will take the higher; a flush whose
/// uses came in the other order must not hold the higher one while it waits, or they deadlock and
/// one fails (`/readyz` then says degraded until the next write).
async fn last_use_flushes_lock_their_credentials_in_id_order() {
    let f = fixture(Backend::Postgres).await;
    let (low, high) = two_tokens_higher_id_first(&f).await;
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    lock_credential(&mut other, &low).await;
    let flush = {
        let store = f.store.clone();
        let uses = [&high, &low].map(|c| CredentialUse {
            id: c.id,
            at: now(),
            secret: c.secret_hash.prefix(),
        });
        tokio::spawn(async move { store.record_last_used(&uses).await })
    };
    wait_for_a_lock_wait(&pool).await;
    lock_credential(&mut other, &high).await;
    other.commit().await.unwrap();
    flush.await.unwrap().unwrap();
    for credential in [&low, &high] {
        let stored = f
            .store
            .get_credential(f.tenant.id, credential.kind, credential.id)
            .await
            .unwrap()
            .unwrap();
        assert!(stored.last_used_at.is_some(), "{}", stored.name);
    }
    pool.close().await;
}

/// PostgreSQL: a flush (in id order) holds the lower id of two credentials whose grace periods have
/// ended and will take the higher, which the table holds first. The sweep's clear-up must not hold
/// the higher one while it waits for the lower.
async fn the_sweep_clears_ended_previous_secrets_without_holding_one_while_waiting() {
    let f = fixture(Backend::Postgres).await;
    let (low, high) = two_tokens_higher_id_first(&f).await;
    let long_ago = now() - TimeDelta::seconds(120);
    for (credential, started) in [(&high, long_ago), (&low, long_ago + TimeDelta::seconds(1))] {
        let (rotation, _) = Rotation::mint(
            credential,
            grace(60),
            credential.expires_at,
            started,
            &mut OsRng,
        );
        rotate(&f, credential, &rotation).await;
    }
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    lock_credential(&mut other, &low).await;
    let clear = {
        let store = f.store.clone();
        tokio::spawn(async move { store.clear_ended_previous_secrets(now()).await })
    };
    wait_for_a_lock_wait(&pool).await;
    lock_credential(&mut other, &high).await;
    other.commit().await.unwrap();
    assert_eq!(clear.await.unwrap().unwrap(), 2);
    assert!(f
        .store
        .credentials_with_previous_secret(100)
        .await
        .unwrap()
        .is_empty());
    pool.close().await;
}

/// A webhook of the fixture's tenant with two pending deliveries of `action` (which no other
/// webhook receives), the one of the higher event id queued first (so first in the table and
/// first due); returns it and the two event ids, lower first.
async fn webhook_with_deliveries_higher_event_first(
    f: &Fixture,
    action: &str,
) -> (keyplane_core::Webhook, uuid::Uuid, uuid::Uuid) {
    let hook = webhook(f.tenant.id, &[action], true);
    add_webhook(f.store.as_ref(), &hook).await;
    let (low, high) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    for id in [high, low] {
        let event = keyplane_core::AuditEvent {
            id,
            ..action_event(f.tenant.id, action)
        };
        f.store.append_audit_event(&event).await.unwrap();
    }
    (hook, low, high)
}

/// Locks a delivery's row in `tx`, as a claim, a lease renewal or a disable writing it would.
async fn lock_delivery(
    tx: &mut sqlx::PgConnection,
    hook: &keyplane_core::Webhook,
    event: uuid::Uuid,
) {
    sqlx::query(
        "UPDATE webhook_deliveries SET attempts = attempts WHERE webhook_id = $1 AND event_id = $2",
    )
    .bind(hook.id)
    .bind(event)
    .execute(tx)
    .await
    .unwrap();
}

/// PostgreSQL: disabling a webhook (which fails its unleased pending deliveries), deleting it,
/// a claim, a lease renewal and the prune (of finished ones) write the same delivery rows. Another of them holds the lower
/// event's row and will take the higher one's: each must not hold the higher one while it waits
/// for the lower, or the two deadlock and one fails (a 503, a claim or renewal lost for a round).
/// The rows are queued higher event first, so a write that locks them in the table's or the due
/// order rather than the event's deadlocks.
async fn webhook_deliveries_are_locked_in_event_order() {
    let f = fixture(Backend::Postgres).await;
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let mut failed = Vec::new();
    // The prune first: it deletes every finished delivery, and a disable that failed would leave
    // more.
    for write in ["prune", "disable", "delete", "claim", "renew"] {
        let action = format!("race.{write}");
        let (hook, low, high) = webhook_with_deliveries_higher_event_first(&f, &action).await;
        let lease = claim_at(now());
        if write == "prune" {
            sqlx::query("UPDATE webhook_deliveries SET status = 'succeeded' WHERE webhook_id = $1")
                .bind(hook.id)
                .execute(&pool)
                .await
                .unwrap();
        }
        if write == "renew" {
            let jobs = f.store.claim_webhook_deliveries(&lease).await.unwrap();
            assert_eq!(jobs.iter().filter(|j| j.webhook.id == hook.id).count(), 2);
            // Back in the table's order, higher event first, as the claim found them.
            for event in [high, low] {
                sqlx::query(
                    "UPDATE webhook_deliveries SET attempts = attempts WHERE webhook_id = $1 AND event_id = $2",
                )
                .bind(hook.id)
                .bind(event)
                .execute(&pool)
                .await
                .unwrap();
            }
        }
        let mut other = pool.begin().await.unwrap();
        lock_delivery(&mut other, &hook, low).await;
        let writing = {
            let (store, hook, tenant) = (f.store.clone(), hook.clone(), f.tenant.id);
            let lease = lease.clone();
            tokio::spawn(async move {
                let event = action_event(tenant, "webhook.updated");
                match write {
                    "disable" => {
                        let disabled = keyplane_core::Webhook {
                            enabled: false,
                            updated_at: now(),
                            ..hook
                        };
                        store.update_webhook(&disabled, &event).await.map(|_| 2)
                    }
                    "delete" => store
                        .delete_webhook(tenant, hook.id, &event)
                        .await
                        .map(|_| 2),
                    "prune" => store
                        .prune_webhook_deliveries(now(), now() + TimeDelta::seconds(1), 10)
                        .await
                        .map(|deleted| deleted as usize),
                    // This webhook's: a disable that failed left the last one's pending.
                    "claim" => store
                        .claim_webhook_deliveries(&lease)
                        .await
                        .map(|jobs| jobs.iter().filter(|j| j.webhook.id == hook.id).count()),
                    _ => store
                        .renew_webhook_lease(lease.lease_id, lease.lease_until)
                        .await
                        .map(|renewed| renewed.iter().filter(|(w, _)| *w == hook.id).count()),
                }
            })
        };
        wait_for_a_lock_wait(&pool).await;
        lock_delivery(&mut other, &hook, high).await;
        let committed = other.commit().await.map_err(|e| e.to_string());
        let written = writing.await.unwrap().map_err(|e| e.to_string());
        if committed.is_err() || written != Ok(2) {
            failed.push(format!("{write}: {committed:?}, {written:?}"));
        }
    }
    pool.close().await;
    assert!(failed.is_empty(), "{failed:#?}");
}

/// Takes `tenant`'s audit head in `tx`, as appending an event does.
async fn lock_audit_head(tx: &mut sqlx::PgConnection, tenant: TenantId) {
    sqlx::query("UPDATE audit_chain_heads SET seq = seq WHERE tenant_id = $1")
        .bind(tenant.as_uuid())
        .execute(tx)
        .await
        .unwrap();
}

/// PostgreSQL: a console change appends its event (the tenant's audit head), then keeps a secret
/// for its session, whose foreign key locks the session's row. A sign-out in another tab meanwhile
/// must not hold that row while it waits for the head, or the two deadlock and one answers 503.
async fn a_sign_out_during_a_console_change_does_not_deadlock() {
    let f = fixture(Backend::Postgres).await;
    let session = console_session(f.tenant.id, 9, now());
    f.store
        .insert_console_session(&session, &started(&session))
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let mut change = pool.begin().await.unwrap();
    lock_audit_head(&mut change, f.tenant.id).await;
    let sign_out = {
        let (store, event) = (f.store.clone(), ended(&session));
        let id = session.id_hash;
        tokio::spawn(async move { store.delete_console_session(&id, Some(&event)).await })
    };
    wait_for_a_lock_wait(&pool).await;
    // The secret's foreign key check.
    sqlx::query("SELECT 1 FROM console_sessions WHERE id_hash = $1 FOR KEY SHARE")
        .bind(&session.id_hash[..])
        .execute(&mut *change)
        .await
        .expect("the change keeps its secret");
    change.commit().await.unwrap();
    assert!(sign_out.await.unwrap().expect("signed out"));
    pool.close().await;
}

/// PostgreSQL: a revoke locks its grant's row, then the tenant's audit head. Granting the same
/// right to the same user meanwhile waits for that row (the live-grant unique index) and must not
/// hold the head while it does, or the two deadlock and one answers 503.
async fn a_grant_made_while_the_same_one_is_revoked_does_not_deadlock() {
    let f = fixture(Backend::Postgres).await;
    let user = uuid::Uuid::new_v4();
    let to_user = || Grant {
        subject_type: SubjectType::User,
        ..capability_grant(f.tenant.id, user, "audit:read")
    };
    let first = to_user();
    f.store
        .insert_grant(&first, &event_in(f.tenant.id, now()), None)
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let mut revoke = pool.begin().await.unwrap();
    sqlx::query("UPDATE grants SET revoked_at = $2 WHERE id = $1")
        .bind(first.id.as_uuid())
        .bind(now())
        .execute(&mut *revoke)
        .await
        .unwrap();
    let again = {
        let (store, grant, event) = (f.store.clone(), to_user(), event_in(f.tenant.id, now()));
        tokio::spawn(async move { store.insert_grant(&grant, &event, None).await })
    };
    wait_for_a_lock_wait(&pool).await;
    lock_audit_head(&mut revoke, f.tenant.id).await;
    revoke.commit().await.unwrap();
    again.await.unwrap().expect("granted again once revoked");
    pool.close().await;
}

/// Returns once a session of the test's PostgreSQL database waits for a lock.
async fn wait_for_a_lock_wait(pool: &sqlx::PgPool) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("nobody waits for a lock");
}

/// PostgreSQL: an import into an organization whose deletion is under way (its final transaction
/// has updated the tenant's row, the first thing it does, and not committed) waits for it and is
/// refused: it neither commits rows into the deleted organization nor makes the deletion fail.
async fn an_import_waits_for_a_deletion_under_way_and_is_refused() {
    let f = fixture(Backend::Postgres).await;
    let (other, _) = another_tenant(f.store.as_ref(), "other").await;
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let mut deleting = pool.begin().await.unwrap();
    sqlx::query("UPDATE tenants SET deleted_at = now() WHERE id = $1")
        .bind(other.id.as_uuid())
        .execute(&mut *deleting)
        .await
        .unwrap();
    let import = {
        let store = f.store.clone();
        let batch: Vec<Credential> = (0..3)
            .map(|i| new_token(other.id, &format!("late{i}")).0)
            .collect();
        tokio::spawn(async move { store.import_credentials(&batch, &[ev()]).await })
    };
    wait_for_a_lock_wait(&pool).await;
    deleting.commit().await.unwrap();
    let imported = import.await.unwrap();
    assert!(
        matches!(imported, Err(StoreError::NotFound)),
        "{imported:?}"
    );
    assert_eq!(
        f.store
            .count_tenant_rows(other.id)
            .await
            .unwrap()
            .credentials,
        1,
        "its first token only"
    );
    pool.close().await;
}

/// PostgreSQL: `renew` (another transaction) takes the row out of the prune's reach, and commits
/// while the prune, started by `prune`, waits for that row. Returns how many rows it deleted.
async fn prune_while_renewed(
    url: &str,
    renew: sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>,
    prune: impl FnOnce() -> tokio::task::JoinHandle<Result<u64, StoreError>>,
) -> u64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    assert_eq!(renew.execute(&mut *other).await.unwrap().rows_affected(), 1);
    let pruning = prune();
    wait_for_a_lock_wait(&pool).await;
    other.commit().await.unwrap();
    let deleted = pruning.await.unwrap().unwrap();
    pool.close().await;
    deleted
}

/// A bounded prune picks its rows, then deletes them: one renewed in between (an expired
/// idempotency key claimed again, a finished delivery retried, an idle session touched) stays.
/// SQLite has one writer: nothing changes in between.
async fn prunes_keep_rows_renewed_while_they_wait() {
    use keyplane_store::AttemptNext;
    let f = fixture(Backend::Postgres).await;
    let t = now();
    let url = f._db.url.clone();

    let old = claim(f.tenant.id, 30, 9, t - TimeDelta::hours(25));
    f.store.claim_idempotency_key(&old).await.unwrap();
    // As a claim of the expired key does.
    let renew = sqlx::query(
        "UPDATE idempotency_keys SET created_at_ms = $1, locked_until_ms = $2 WHERE lookup_id = $3",
    )
    .bind(t.timestamp_millis())
    .bind((t + TimeDelta::seconds(60)).timestamp_millis())
    .bind(old.lookup_id.to_vec());
    let store = f.store.clone();
    let prune = move || {
        tokio::spawn(async move {
            store
                .prune_idempotency_keys(t - TimeDelta::hours(24), 10)
                .await
        })
    };
    let key_pruned = prune_while_renewed(&url, renew, prune).await;

    let session = console_session(f.tenant.id, 31, t - TimeDelta::hours(1));
    f.store
        .insert_console_session(&session, &started(&session))
        .await
        .unwrap();
    let renew = sqlx::query("UPDATE console_sessions SET last_seen_at_ms = $1 WHERE id_hash = $2")
        .bind(t.timestamp_millis())
        .bind(session.id_hash.to_vec());
    let store = f.store.clone();
    let prune = move || {
        tokio::spawn(async move {
            store
                .prune_console_sessions(t, t - TimeDelta::minutes(30), 10, &ended)
                .await
        })
    };
    let session_pruned = prune_while_renewed(&url, renew, prune).await;

    let hook = webhook(f.tenant.id, &["*"], true);
    add_webhook(f.store.as_ref(), &hook).await;
    f.store
        .append_audit_event(&action_event(f.tenant.id, "grant.created"))
        .await
        .unwrap();
    let lease = claim_at(now());
    let jobs = f.store.claim_webhook_deliveries(&lease).await.unwrap();
    f.store
        .record_webhook_attempt(
            &attempt(&jobs[0], lease.lease_id, AttemptNext::Failed),
            now() - TimeDelta::days(5),
            &ev(),
        )
        .await
        .unwrap();
    let renew = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'pending' WHERE webhook_id = $1 AND event_id = $2",
    )
    .bind(hook.id)
    .bind(jobs[0].event_id);
    let store = f.store.clone();
    let prune = move || {
        tokio::spawn(async move {
            store
                .prune_webhook_deliveries(t, t + TimeDelta::days(1), 10)
                .await
        })
    };
    let delivery_pruned = prune_while_renewed(&url, renew, prune).await;

    // Deleted by the idempotency, console session and delivery prunes: none.
    assert_eq!([key_pruned, session_pruned, delivery_pruned], [0, 0, 0]);

    assert!(matches!(
        f.store
            .claim_idempotency_key(&claim(f.tenant.id, 30, 9, t))
            .await
            .unwrap(),
        IdempotencyRecord::InFlight { .. }
    ));
    assert!(f
        .store
        .touch_console_session(&session.id_hash, t, t - TimeDelta::minutes(30))
        .await
        .unwrap()
        .is_some());
    assert!(deliveries_of(f.store.as_ref(), &hook)
        .await
        .iter()
        .any(|d| d.event_id == jobs[0].event_id));
}

/// Of creates racing in one tenant (PostgreSQL runs them at once under READ COMMITTED), no more
/// than the cap succeed, and those that do not are told so.
async fn concurrent_creates_keep_to_the_webhook_cap(backend: Backend) {
    const CAP: u32 = 2;
    let f = fixture(backend).await;
    for _ in 0..4 {
        let tenant = TenantId::new();
        let creates = (0..8).map(|_| {
            let store = f.store.clone();
            tokio::spawn(async move {
                let hook = webhook(tenant, &["*"], true);
                let event = action_event(tenant, "webhook.created");
                store.create_webhook(&hook, CAP, &event, None).await
            })
        });
        let outcomes = results_of(creates).await;
        let created = outcomes.iter().filter(|o| o.is_ok()).count();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Ok(()) | Err(StoreError::Conflict(_)))),
            "{outcomes:?}"
        );
        assert_eq!(created, CAP as usize, "{outcomes:?}");
        assert_eq!(f.store.list_webhooks(tenant).await.unwrap().len(), created);
    }
}

/// PostgreSQL: another write of the tenant holds its audit head and then queues its event's
/// delivery to the webhook being deleted (which takes a share lock on the webhook's row). The
/// delete must not take the webhook's row before the head, or the two deadlock and one fails.
/// SQLite has one writer: nothing to race.
async fn deleting_a_webhook_while_another_write_queues_to_it_does_not_deadlock() {
    let f = fixture(Backend::Postgres).await;
    let tenant = f.tenant.id;
    let hook = webhook(tenant, &["*"], true);
    add_webhook(f.store.as_ref(), &hook).await;
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    // The other write's event: it takes the head first...
    sqlx::query("UPDATE audit_chain_heads SET seq = seq + 1 WHERE tenant_id = $1")
        .bind(tenant.as_uuid())
        .execute(&mut *other)
        .await
        .unwrap();
    let delete = {
        let store = f.store.clone();
        tokio::spawn(async move {
            let event = action_event(tenant, "webhook.deleted");
            store.delete_webhook(tenant, hook.id, &event).await
        })
    };
    wait_for_a_lock_wait(&pool).await;
    // ...then queues the event's delivery to every matching webhook, this one included.
    let queued = sqlx::query(
        "INSERT INTO webhook_deliveries (webhook_id, event_id, tenant_id, action, status, attempts, \
         schedule_step, created_ms, next_attempt_ms, locked_until_ms) \
         VALUES ($1, $2, $3, 'grant.created', 'pending', 0, 0, 0, 0, 0)",
    )
    .bind(hook.id)
    .bind(uuid::Uuid::now_v7())
    .bind(tenant.as_uuid())
    .execute(&mut *other)
    .await;
    let committed = match queued {
        Ok(_) => other.commit().await.map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let deleted = delete.await.unwrap();
    assert!(committed.is_ok(), "{committed:?}");
    assert!(deleted.is_ok(), "{deleted:?}");
    assert!(f
        .store
        .get_webhook(tenant, hook.id)
        .await
        .unwrap()
        .is_none());
    assert!(deliveries_of(f.store.as_ref(), &hook).await.is_empty());
    pool.close().await;
}

/// PostgreSQL: an update or a secret rotation waiting for the tenant's audit head (held by another
/// write) holds no lock on the webhook yet. Had it locked the webhook's row first, it and a delete
/// (head first, then the row) would deadlock.
async fn webhook_writes_take_the_audit_head_before_the_webhook() {
    let f = fixture(Backend::Postgres).await;
    let tenant = f.tenant.id;
    let hook = webhook(tenant, &["*"], true);
    add_webhook(f.store.as_ref(), &hook).await;
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    for write in ["update", "rotate"] {
        let mut other = pool.begin().await.unwrap();
        sqlx::query("UPDATE audit_chain_heads SET seq = seq WHERE tenant_id = $1")
            .bind(tenant.as_uuid())
            .execute(&mut *other)
            .await
            .unwrap();
        let waiting = {
            let (store, hook) = (f.store.clone(), hook.clone());
            tokio::spawn(async move {
                let event = action_event(tenant, "webhook.updated");
                match write {
                    "update" => store.update_webhook(&hook, &event).await.map(|_| ()),
                    _ => store
                        .rotate_webhook_secret(
                            tenant,
                            hook.id,
                            &keyplane_core::WebhookSecret::generate(&mut OsRng),
                            Utc::now(),
                            Utc::now(),
                            &event,
                            None,
                        )
                        .await
                        .map(|_| ()),
                }
            })
        };
        wait_for_a_lock_wait(&pool).await;
        let mut probe = pool.begin().await.unwrap();
        let row = sqlx::query("SELECT id FROM webhooks WHERE id = $1 FOR UPDATE NOWAIT")
            .bind(hook.id)
            .execute(&mut *probe)
            .await;
        assert!(
            row.is_ok(),
            "{write} locked the webhook before the head: {row:?}"
        );
        probe.rollback().await.unwrap();
        other.commit().await.unwrap();
        assert!(waiting.await.unwrap().is_ok(), "{write}");
    }
    pool.close().await;
}

/// PostgreSQL: a role that may use keyplane's tables but not read `_sqlx_migrations` (a runtime
/// role kept apart from the migrating one) is told so, rather than the store being taken for a new
/// one and migrated from scratch.
async fn a_store_whose_migrations_cannot_be_read_says_why() {
    let db = TestDatabase::new(Backend::Postgres).await;
    keyplane_store::connect(&db.url)
        .await
        .unwrap()
        .close()
        .await;
    let role = format!("kp_runtime_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("REVOKE ALL ON _sqlx_migrations FROM {role}"),
    ] {
        sqlx::query(&statement).execute(&admin).await.unwrap();
    }
    let options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
    let as_role = sqlx::ConnectOptions::to_url_lossy(&options.username(&role)).to_string();
    let refused = keyplane_store::connect(&as_role)
        .await
        .err()
        .map(|e| e.to_string());
    for statement in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(&statement).execute(&admin).await.unwrap();
    }
    admin.close().await;
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("_sqlx_migrations") && e.contains("permission denied")),
        "{refused:?}"
    );
}

/// PostgreSQL: a replica starting while another holds the migration lock (running a migration that
/// takes longer than the writers' 5 s `lock_timeout`) waits for it and starts, instead of failing.
async fn a_replica_waits_for_another_replicas_migrations() {
    let db = TestDatabase::new(Backend::Postgres).await;
    let mut other = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut other)
        .await
        .unwrap();
    // sqlx's migration lock: its id is derived from the database's name (sqlx-postgres migrate.rs).
    let lock_id = 0x3d32ad9e_i64 * i64::from(crc32fast::hash(name.as_bytes()));
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(lock_id)
        .execute(&mut other)
        .await
        .unwrap();
    let url = db.url.clone();
    let starting = tokio::spawn(async move { keyplane_store::connect(&url).await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    assert!(
        !starting.is_finished(),
        "it waits for the lock (and does not fail)"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(lock_id)
        .execute(&mut other)
        .await
        .unwrap();
    let started = tokio::time::timeout(std::time::Duration::from_secs(30), starting)
        .await
        .expect("it starts once the lock is released")
        .unwrap();
    assert!(started.is_ok(), "{started:?}");
}

/// A store at schema 19, whose migration 20 alters `tenants`, and a transaction holding the
/// lock `pg_dump` takes on it (ACCESS SHARE, which only ALTER TABLE's ACCESS EXCLUSIVE waits for),
/// on a connection named as `pg_dump` names its own.
async fn a_store_behind_a_dump_of_tenants() -> (TestDatabase, sqlx::PgConnection) {
    use std::str::FromStr;
    let db = TestDatabase::new(Backend::Postgres).await;
    keyplane_store::testing::migrate_to(&db.url, 19).await;
    let options = sqlx::postgres::PgConnectOptions::from_str(&db.url)
        .unwrap()
        .application_name("pg_dump");
    let mut dump = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    for statement in ["BEGIN", "LOCK TABLE tenants IN ACCESS SHARE MODE"] {
        sqlx::query(statement).execute(&mut dump).await.unwrap();
    }
    (db, dump)
}

/// A migration queued for `tenants` behind a long transaction (a `pg_dump`) queues every other
/// query on it behind itself, the serving replicas' too; it gives up its place after a few seconds
/// (`lock_timeout`) and tries again, so a replica's read gets through meanwhile, and the
/// migration is applied once the transaction ends.
async fn a_migration_behind_a_long_transaction_lets_the_replicas_through_until_it_has_its_lock() {
    let (db, mut dump) = a_store_behind_a_dump_of_tenants().await;
    let url = db.url.clone();
    let starting = tokio::spawn(async move { keyplane_store::connect(&url).await.map(|_| ()) });
    let mut replica = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let waiting =
        "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND relation = 'tenants'::regclass";
    let mut queued = false;
    for _ in 0..200 {
        let count: i64 = sqlx::query_scalar(waiting)
            .fetch_one(&mut replica)
            .await
            .unwrap();
        if count > 0 {
            queued = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(queued, "the migration never waited for tenants");
    // A replica's read, each refused after 200 ms in the queue: before the migration gives up its
    // place, every one is.
    sqlx::query("SET lock_timeout = '200ms'")
        .execute(&mut replica)
        .await
        .unwrap();
    let mut read = false;
    for _ in 0..60 {
        if sqlx::query("SELECT COUNT(*) FROM tenants")
            .execute(&mut replica)
            .await
            .is_ok()
        {
            read = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        read,
        "the migration held every read of tenants up behind it"
    );
    assert!(!starting.is_finished(), "it waits (and does not fail)");
    sqlx::query("COMMIT").execute(&mut dump).await.unwrap();
    let started = tokio::time::timeout(std::time::Duration::from_secs(30), starting)
        .await
        .expect("it starts once the lock is released")
        .unwrap();
    assert!(started.is_ok(), "{started:?}");
    assert_eq!(
        keyplane_store::testing::schema_version(&db.url).await,
        keyplane_store::testing::latest_schema()
    );
}

/// The long transaction does not end: after its tries the start fails, saying which migration
/// waited for which table's lock, held by which process; the store stays where it was, and the
/// next start, once the transaction ended, migrates it.
async fn a_migration_whose_lock_stays_taken_fails_the_start_naming_who_holds_it() {
    let (db, mut dump) = a_store_behind_a_dump_of_tenants().await;
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        keyplane_store::connect(&db.url),
    )
    .await
    .expect("the start gives up")
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    for expected in [
        "migration 20 (deleted tenants) waited 5s for a lock on a table it changes, 3 times",
        "AccessShareLock on table tenants held by process",
        "(pg_dump)",
    ] {
        assert!(refused.contains(expected), "{expected:?} in {refused:?}");
    }
    assert_eq!(keyplane_store::testing::schema_version(&db.url).await, 19);
    sqlx::query("COMMIT").execute(&mut dump).await.unwrap();
    create_store(&db.url).await;
    assert_eq!(
        keyplane_store::testing::schema_version(&db.url).await,
        keyplane_store::testing::latest_schema()
    );
}

/// A port that forwards every connection to the test PostgreSQL until it is closed, and then
/// refuses connections, as a stopped PostgreSQL does.
struct ClosingProxy {
    /// The test database's URL, through the proxy.
    url: String,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// How long a new connection waits before it is forwarded (milliseconds), as to a database
    /// slow to take one.
    connect_delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl ClosingProxy {
    async fn to(url: &str) -> Self {
        use std::str::FromStr;
        let upstream = sqlx::postgres::PgConnectOptions::from_str(url).unwrap();
        let upstream = format!("{}:{}", upstream.get_host(), upstream.get_port());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let through = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        assert!(url.contains(&upstream), "{url} names {upstream}");
        let tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let url = url.replacen(&upstream, &through, 1);
        let connect_delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let accepting = {
            let tasks = tasks.clone();
            let connect_delay_ms = connect_delay_ms.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let upstream = upstream.clone();
                    let delay = connect_delay_ms.load(std::sync::atomic::Ordering::SeqCst);
                    let forwarding = tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                        if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    tasks.lock().unwrap().push(forwarding);
                }
            })
        };
        tasks.lock().unwrap().push(accepting);
        Self {
            url,
            tasks,
            connect_delay_ms,
        }
    }

    /// New connections from now on wait `delay` before they reach the database.
    fn delay_new_connections(&self, delay: std::time::Duration) {
        self.connect_delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Stops listening and drops every forwarded connection.
    fn close(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// A test PostgreSQL database, a [`ClosingProxy`] to it, and a store connected (and pinged)
/// through the proxy.
async fn store_through_a_proxy() -> (TestDatabase, ClosingProxy, Arc<dyn Store>) {
    let db = TestDatabase::new(Backend::Postgres).await;
    let proxy = ClosingProxy::to(&db.url).await;
    let store = keyplane_store::connect(&proxy.url).await.unwrap();
    store.ping().await.unwrap();
    (db, proxy, store)
}

/// PostgreSQL slow, both to answer (a lock the ping waits on) and to take a new connection: the
/// readiness ping's direct attempt to connect does not finish in time, which says nothing of
/// whether it is reachable, so the ping goes on waiting for its pooled answer.
async fn a_slow_database_is_not_called_unreachable() {
    let (db, proxy, store) = store_through_a_proxy().await;
    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::Executor::execute(
        &mut holder,
        "BEGIN; LOCK TABLE meta IN ACCESS EXCLUSIVE MODE",
    )
    .await
    .unwrap();
    proxy.delay_new_connections(std::time::Duration::from_secs(3));
    let ping = {
        let store = store.clone();
        tokio::spawn(async move { store.ping().await })
    };
    // Past the ping's 200 ms and its direct attempt's 500 ms.
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    sqlx::Executor::execute(&mut holder, "ROLLBACK")
        .await
        .unwrap();
    let pinged = ping.await.unwrap();
    assert!(pinged.is_ok(), "{pinged:?}");
    proxy.close();
}

/// PostgreSQL stopped: its pools retry the refused connections until their timeout and said only
/// that they timed out (`busy`). The readiness ping says, within `/readyz`'s second, that it is
/// unreachable and why; a failed write says unreachable; and so does a start-up.
async fn a_database_that_refuses_connections_is_unreachable() {
    let (_db, proxy, store) = store_through_a_proxy().await;
    proxy.close();
    // The connection the ping had is gone (a stopped PostgreSQL ends them): unreachable, whatever
    // the words.
    let dropped = store.ping().await.err();
    assert_eq!(
        dropped.as_ref().and_then(StoreError::fault),
        Some(keyplane_store::StoreFault::Unreachable),
        "{dropped:?}"
    );
    let started = std::time::Instant::now();
    let ping = store.ping().await.err();
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let refused = |error: &Option<StoreError>| {
        error.as_ref().is_some_and(|e| {
            e.fault() == Some(keyplane_store::StoreFault::Unreachable)
                && e.to_string().contains("refused")
        })
    };
    assert!(refused(&ping), "{ping:?}");
    let tenant = Tenant {
        id: TenantId::new(),
        name: "late".into(),
        created_at: now(),
    };
    let (credential, _) = new_token(tenant.id, "late");
    let write = create_tenant(store.as_ref(), &tenant, Some(&credential), false)
        .await
        .err();
    assert_eq!(
        write.as_ref().and_then(StoreError::fault),
        Some(keyplane_store::StoreFault::Unreachable),
        "{write:?}"
    );
    let starting = keyplane_store::connect(&proxy.url).await.err();
    assert!(refused(&starting), "{starting:?}");
}

/// PostgreSQL delivers a NOTIFY to every listener, its sender's too: a store's listener tells its
/// own changes (`Echo`) from other processes' (`Subject`), whichever comes first and however close
/// together, and a write that changes nothing sends nothing.
async fn a_stores_own_notifications_come_back_as_echoes_and_no_other() {
    use keyplane_store::Invalidation;
    let f = fixture(Backend::Postgres).await;
    let other = keyplane_store::connect(&f._db.url).await.expect("connect");
    let (credential, _) = new_token(f.tenant.id, "toggled");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let listen = |store: &Arc<dyn Store>| {
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = heard.clone();
        store.listen_invalidations(
            Arc::new(move |event| {
                // The listener's (re)connections are not what this is about.
                if !matches!(event, Invalidation::Reset | Invalidation::Listening(_)) {
                    into.lock().unwrap().push(event);
                }
            }),
            stopped.clone(),
        );
        heard
    };
    let (mine, theirs) = (listen(&f.store), listen(&other));
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    for attempt in 0.. {
        let listening: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN %'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if listening >= 2 {
            break;
        }
        assert!(attempt < 400, "{listening} of 2 listeners");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    pool.close().await;
    let suspend = |store: &Arc<dyn Store>, suspended: bool| {
        let (store, tenant, id) = (store.clone(), f.tenant.id, credential.id);
        async move {
            let at = now();
            store
                .set_credential_suspended(
                    tenant,
                    CredentialKind::ApiToken,
                    id,
                    suspended.then_some(at),
                    at,
                    &ev(),
                    None,
                )
                .await
                .unwrap()
                .1
        }
    };
    assert!(suspend(&f.store, true).await);
    assert!(!suspend(&f.store, true).await, "already suspended");
    assert!(suspend(&other, false).await);

    let subject = credential.id.as_uuid();
    for heard in [&mine, &theirs] {
        for _ in 0..400 {
            if heard.lock().unwrap().len() >= 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
    // Another process's change names its tenant.
    let placed = Invalidation::InTenant(f.tenant.id, subject);
    assert_eq!(*mine.lock().unwrap(), [Invalidation::Echo(subject), placed]);
    assert_eq!(
        *theirs.lock().unwrap(),
        [placed, Invalidation::Echo(subject)]
    );

    // A replica of a release from before sends the subject alone: heard, with no tenant. A tenant
    // notice followed by another subject's places neither.
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let (old, unmatched) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let notify = |payload: String| {
        let pool = pool.clone();
        async move {
            sqlx::query("SELECT pg_notify('keyplane_invalidation', $1)")
                .bind(payload)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    notify(old.to_string()).await;
    let mut tx = pool.begin().await.unwrap();
    for payload in [format!("t:{}:{}", f.tenant.id, old), unmatched.to_string()] {
        sqlx::query("SELECT pg_notify('keyplane_invalidation', $1)")
            .bind(payload)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    for _ in 0..400 {
        if theirs.lock().unwrap().len() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        theirs.lock().unwrap()[2..],
        [Invalidation::Subject(old), Invalidation::Subject(unmatched)]
    );
    pool.close().await;
}

/// A lone event written again (a retry of a write whose commit's acknowledgement was lost) is
/// already in the trail: the retry succeeds and writes nothing, neither a second event in the
/// chain nor a second delivery.
async fn a_lone_event_appended_again_is_written_once(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let hook = webhook(f.tenant.id, &["access.*"], true);
    add_webhook(store, &hook).await;
    let event = action_event(f.tenant.id, "access.denied");
    store.append_audit_event(&event).await.unwrap();
    let head = store.audit_chain_state(f.tenant.id).await.unwrap();
    store.append_audit_event(&event).await.unwrap();
    let again = store.audit_chain_state(f.tenant.id).await.unwrap();
    assert_eq!(
        (again.head_seq, again.head_hash),
        (head.head_seq, head.head_hash)
    );
    assert_eq!(deliveries_of(store, &hook).await.len(), 1);
}

/// A change that comes with an event whose id the trail holds already (a writer's mistake) is not
/// made, and the error says what happened: not the conflict a duplicate credential name gets,
/// which a caller would show as a 409 about a name.
async fn a_change_whose_event_id_is_in_the_trail_fails_without_a_name_conflict(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let event = action_event(f.tenant.id, "credential_policy.updated");
    store.append_audit_event(&event).await.unwrap();
    let head = store.audit_chain_state(f.tenant.id).await.unwrap();
    let policy = CredentialPolicy {
        on_leak: LeakAction::Suspend,
        ..Default::default()
    };
    let outcome = store
        .put_credential_policy(f.tenant.id, &policy, now(), &event)
        .await;
    let Err(error) = outcome else {
        panic!("a change with an event already in the trail was made");
    };
    assert!(!matches!(error, StoreError::Conflict(_)), "{error:?}");
    assert!(
        error.to_string().contains("already in"),
        "the error says the event is in the trail already: {error}"
    );
    assert!(store
        .get_credential_policy(f.tenant.id)
        .await
        .unwrap()
        .is_none());
    let after = store.audit_chain_state(f.tenant.id).await.unwrap();
    assert_eq!(after.head_seq, head.head_seq);
}

/// Waits (bounded) until `count` sessions of the test database wait for a lock.
async fn until_waiting_for_locks(pool: &sqlx::PgPool, count: i64) {
    for attempt in 0.. {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting >= count {
            return;
        }
        assert!(
            attempt < 400,
            "{waiting} of {count} sessions wait for a lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Two replicas append the same lone event at once (a leak report's canary trigger worked off
/// twice, a retry racing the attempt whose commit was still on its way): both looked for it before
/// either wrote it. One writes it; the other finds it written, and succeeds without a second one.
async fn a_lone_event_two_replicas_append_at_once_is_written_once() {
    use sqlx::Connection;
    let f = fixture(Backend::Postgres).await;
    let other = keyplane_store::connect(&f._db.url).await.expect("connect");
    let tenant = f.tenant.id;
    f.store
        .append_audit_event(&action_event(tenant, "access.denied"))
        .await
        .unwrap();
    let head = f.store.audit_chain_state(tenant).await.unwrap();
    // The head's row held: both appends read that the event is not there, then wait.
    let mut holder = sqlx::PgConnection::connect(&f._db.url).await.unwrap();
    let mut held = holder.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM audit_chain_heads WHERE tenant_id = $1 FOR UPDATE")
        .bind(tenant.as_uuid())
        .execute(&mut *held)
        .await
        .unwrap();
    let event = action_event(tenant, "credential.canary_triggered");
    let appends = [f.store.clone(), other.clone()].map(|store| {
        let event = event.clone();
        tokio::spawn(async move { store.append_audit_event(&event).await })
    });
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    until_waiting_for_locks(&pool, 2).await;
    held.commit().await.unwrap();
    for append in appends {
        let outcome = append.await.unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let after = f.store.audit_chain_state(tenant).await.unwrap();
    assert_eq!(after.head_seq, head.head_seq + 1, "one event written");
    assert_eq!(verify_chain(f.store.as_ref(), tenant).await, after.head_seq);
}

/// Revoking a grant tells the other replicas (their caches hold its subject's verifications);
/// revoking it again changes nothing, and tells them nothing.
async fn revoking_a_revoked_grant_notifies_no_other_replica() {
    use keyplane_store::Invalidation;
    let f = fixture(Backend::Postgres).await;
    let other = keyplane_store::connect(&f._db.url).await.expect("connect");
    let (credential, _) = new_token(f.tenant.id, "toggled");
    f.store
        .insert_credential(&credential, &ev(), None)
        .await
        .unwrap();
    let subject = uuid::Uuid::new_v4();
    let grant = capability_grant(f.tenant.id, subject, "auth.manage");
    f.store.insert_grant(&grant, &ev(), None).await.unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = heard.clone();
    other.listen_invalidations(
        Arc::new(move |event| {
            if !matches!(event, Invalidation::Reset | Invalidation::Listening(_)) {
                into.lock().unwrap().push(event);
            }
        }),
        stopped,
    );
    until_listening(&f._db.url, 1).await;
    let at = now();
    f.store
        .revoke_grant(f.tenant.id, grant.id, at, &ev())
        .await
        .unwrap();
    let again = f
        .store
        .revoke_grant(f.tenant.id, grant.id, at + TimeDelta::seconds(1), &ev())
        .await
        .unwrap();
    assert_eq!(again.revoked_at, Some(at));
    // A change after both: once its notification is heard, any the second revoke sent was too.
    f.store
        .set_credential_suspended(
            f.tenant.id,
            CredentialKind::ApiToken,
            credential.id,
            Some(at),
            at,
            &ev(),
            None,
        )
        .await
        .unwrap();
    let marker = Invalidation::InTenant(f.tenant.id, credential.id.as_uuid());
    for attempt in 0.. {
        if heard.lock().unwrap().contains(&marker) {
            break;
        }
        assert!(attempt < 400, "heard {:?}", heard.lock().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        *heard.lock().unwrap(),
        [Invalidation::InTenant(f.tenant.id, subject), marker]
    );
}

/// `list_tenants` pages through every organization in creation order (ties of `created_at` by
/// id) without a repeat or a gap, alone or filtered by name, with each one's registry project.
async fn tenants_page_in_creation_order_and_by_name(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = keyplane_store::connect(&db.url).await.unwrap();
    let early = now() - TimeDelta::hours(1);
    let late = now();
    let mut made = Vec::new();
    // Several at one instant: the cursor must tell them apart by id.
    for (name, at) in [
        ("acme", late),
        ("globex", early),
        ("acme", early),
        ("initech", early),
        ("acme", late),
    ] {
        let tenant = Tenant {
            id: TenantId::new(),
            name: name.into(),
            created_at: at,
        };
        let created = create_tenant(store.as_ref(), &tenant, None, false).await;
        assert_eq!(created.unwrap(), TenantCreated::Created);
        made.push(tenant);
    }
    made.sort_by_key(|t| (t.created_at, t.id.as_uuid()));
    let read_all = |name: Option<&'static str>| {
        let store = store.clone();
        async move {
            let mut all: Vec<Tenant> = Vec::new();
            loop {
                let page = store
                    .list_tenants(&keyplane_store::TenantPage {
                        name,
                        after: all.last(),
                        limit: 2,
                    })
                    .await
                    .unwrap();
                let done = page.len() < 2;
                all.extend(page.into_iter().map(|listed| {
                    assert_eq!(listed.registry_project, None);
                    listed.tenant
                }));
                if done {
                    return all;
                }
            }
        }
    };
    assert_eq!(read_all(None).await, made);
    let acmes: Vec<Tenant> = made.iter().filter(|t| t.name == "acme").cloned().collect();
    assert_eq!(read_all(Some("acme")).await, acmes);
    assert_eq!(read_all(Some("ACME")).await, []);

    // A tenant without a credential is a tenant: the store is bootstrapped, and its id is taken.
    assert!(store.is_bootstrapped().await.unwrap());
    let (credential, _) = new_token(TenantId::new(), "bootstrap");
    let default = Tenant {
        id: credential.tenant_id,
        name: "default".into(),
        created_at: now(),
    };
    assert!(!store
        .bootstrap_once(&default, &credential, &[ev()])
        .await
        .unwrap());
    let again = Tenant {
        name: "other".into(),
        ..made[0].clone()
    };
    assert!(matches!(
        create_tenant(store.as_ref(), &again, None, false).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.get_tenant(made[0].id).await.unwrap(),
        Some(made[0].clone())
    );
}

/// `create_tenant` with one event, and `credential` as its first (`None`: `admin create-org
/// --no-token`).
async fn create_tenant(
    store: &dyn Store,
    tenant: &Tenant,
    credential: Option<&Credential>,
    unique_name: bool,
) -> Result<TenantCreated, StoreError> {
    store
        .create_tenant(&NewTenant {
            tenant,
            credential,
            events: &[ev()],
            unique_name,
        })
        .await
}

/// Two operators running `admin create-org --name N` at once: two processes, each with a store of
/// its own on one database. Of each pair exactly one creates the organization and the other is
/// told which one has the name. Then a name taken only by a deleted organization is free, and
/// without `unique_name` (`--allow-duplicate-name`) a taken one is created again.
async fn one_name_created_at_once_is_created_once(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let one = keyplane_store::connect(&db.url).await.unwrap();
    let other = keyplane_store::connect(&db.url).await.unwrap();
    let named = |name: &str| Tenant {
        id: TenantId::new(),
        name: name.into(),
        created_at: now(),
    };
    // Each pair's check and insert are fractions of a millisecond: several pairs, so that
    // without serialisation some pair interleaves.
    for attempt in 0..40 {
        let name = format!("acme-{attempt}");
        let (a, b) = (named(&name), named(&name));
        let (first, second) = tokio::join!(
            create_tenant(one.as_ref(), &a, None, true),
            create_tenant(other.as_ref(), &b, None, true)
        );
        match (first.unwrap(), second.unwrap()) {
            (TenantCreated::Created, TenantCreated::NameTaken(taken)) => assert_eq!(taken, a),
            (TenantCreated::NameTaken(taken), TenantCreated::Created) => assert_eq!(taken, b),
            both => panic!("attempt {attempt}: {both:?}"),
        }
        let listed = one
            .list_tenants(&keyplane_store::TenantPage {
                name: Some(&name),
                after: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "attempt {attempt}: {listed:?}");
    }

    let first = named("initech");
    let created = create_tenant(one.as_ref(), &first, None, true).await;
    assert_eq!(created.unwrap(), TenantCreated::Created);
    let same = named("initech");
    let refused = create_tenant(other.as_ref(), &same, None, true).await;
    assert_eq!(refused.unwrap(), TenantCreated::NameTaken(first.clone()));
    assert_eq!(other.get_tenant(same.id).await.unwrap(), None);
    let allowed = create_tenant(other.as_ref(), &same, None, false).await;
    assert_eq!(allowed.unwrap(), TenantCreated::Created);
    // Both deleted: the name is free again.
    for tenant in [first.id, same.id] {
        one.purge_tenant(tenant, now(), 3, &deleted_event(tenant))
            .await
            .unwrap()
            .expect("deleted now");
    }
    let again = named("initech");
    let created = create_tenant(other.as_ref(), &again, None, true).await;
    assert_eq!(created.unwrap(), TenantCreated::Created);
}

store_suite! {
    tenants_page_in_creation_order_and_by_name,
    one_name_created_at_once_is_created_once,
}

store_suite! {
    purging_a_tenant_leaves_a_tombstone_and_nothing_to_use,
    a_store_of_deleted_tenants_is_never_bootstrapped_again,
    a_bulk_import_takes_nothing_for_a_deleted_organization,
}

/// A second tenant of the fixture's store, with its first token.
async fn another_tenant(store: &dyn Store, name: &str) -> (Tenant, Credential) {
    let tenant = Tenant {
        id: TenantId::new(),
        name: name.into(),
        created_at: now(),
    };
    let (first, _) = new_token(tenant.id, "bootstrap");
    create_tenant(store, &tenant, Some(&first), false)
        .await
        .unwrap();
    (tenant, first)
}

/// The fixture tenant's live API tokens.
async fn live_api_tokens(f: &Fixture) -> Vec<Credential> {
    f.store
        .list_credentials(&ListCredentials {
            tenant_id: f.tenant.id,
            kind: CredentialKind::ApiToken,
            after: None,
            limit: None,
            include_revoked: false,
            expiring: None,
            include_canaries: true,
        })
        .await
        .unwrap()
}

/// The organization's deletion event, as `admin delete-org` makes it: any event will do.
fn deleted_event(
    tenant: TenantId,
) -> impl Fn(&keyplane_store::TenantRows) -> keyplane_core::AuditEvent + Send + Sync {
    move |_| action_event(tenant, keyplane_core::audit::actions::ORGANIZATION_DELETED)
}

/// `purge_tenant` refuses while anything of the tenant is live; once all is revoked it deletes
/// the tenant's rows (the bulk in batches), leaves its tombstone, its registry row (the project
/// name stays taken) and its audit trail (ending with the deletion's event), and from then on the
/// store takes nothing more for it and tells no signing-key change to it. Another tenant is
/// untouched.
async fn purging_a_tenant_leaves_a_tombstone_and_nothing_to_use(backend: Backend) {
    let f = fixture(backend).await;
    let tenant = f.tenant.id;
    let (other, other_token) = another_tenant(f.store.as_ref(), "other").await;
    // Seven tokens (more than a batch of 3), a service account with a grant, a user's grant, a
    // registry with its robot, a webhook, a credential policy.
    for i in 0..6 {
        let (token, _) = new_token(tenant, &format!("t{i}"));
        f.store
            .insert_credential(&token, &ev(), None)
            .await
            .unwrap();
    }
    let sa = service_account(tenant, "worker");
    f.store.insert_credential(&sa, &ev(), None).await.unwrap();
    let sa_grant = capability_grant(tenant, sa.id.as_uuid(), "api_tokens:read");
    f.store.insert_grant(&sa_grant, &ev(), None).await.unwrap();
    let user_grant = Grant {
        subject_type: SubjectType::User,
        ..capability_grant(tenant, uuid::Uuid::new_v4(), "api_tokens:read")
    };
    f.store
        .insert_grant(&user_grant, &ev(), None)
        .await
        .unwrap();
    let project = format!("p-{}", uuid::Uuid::new_v4().simple());
    let registry = keyplane_core::Registry {
        id: uuid::Uuid::now_v7(),
        tenant_id: tenant,
        project: project.clone(),
        quota_gb: -1,
        created_at: now(),
        updated_at: now(),
    };
    let (robot, _) = new_token(tenant, "robot");
    f.store
        .create_registry(&registry, &robot, None, &[ev()], None)
        .await
        .unwrap();
    add_webhook(f.store.as_ref(), &webhook(tenant, &["*"], true)).await;
    f.store
        .put_credential_policy(tenant, &CredentialPolicy::default(), now(), &ev())
        .await
        .unwrap();
    // The other tenant has a registry too: signing-key changes still reach it.
    let other_registry = keyplane_core::Registry {
        id: uuid::Uuid::now_v7(),
        tenant_id: other.id,
        project: format!("p-{}", uuid::Uuid::new_v4().simple()),
        ..registry.clone()
    };
    let (other_robot, _) = new_token(other.id, "robot");
    f.store
        .create_registry(&other_registry, &other_robot, None, &[ev()], None)
        .await
        .unwrap();

    // Anything live: refused, nothing deleted.
    let refused = f
        .store
        .purge_tenant(tenant, now(), 3, &deleted_event(tenant))
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("run it again")),
        "{refused:?}"
    );
    assert!(f.store.get_tenant(tenant).await.unwrap().is_some());

    let mut credentials = Vec::new();
    let first = live_api_tokens(&f).await;
    credentials.extend(first.iter().map(|c| (c.kind, c.id)));
    credentials.push((CredentialKind::ServiceAccount, sa.id));
    credentials.push((robot.kind, robot.id));
    for (kind, id) in credentials {
        f.store
            .revoke_credential(tenant, kind, id, now(), None, &ev(), &|_| ev(), None)
            .await
            .unwrap();
    }
    // The user's grant alone live: still refused.
    let refused = f
        .store
        .purge_tenant(tenant, now(), 3, &deleted_event(tenant))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    // The revoked ones went in batches all the same (they stay deleted: a run goes on from there).
    let left = f.store.count_tenant_rows(tenant).await.unwrap();
    assert_eq!((left.credentials, left.grants), (0, 1), "{left:?}");
    assert!(f.store.get_tenant(tenant).await.unwrap().is_some());
    f.store
        .revoke_grant(tenant, user_grant.id, now(), &ev())
        .await
        .unwrap();

    let at = now();
    let rows = f
        .store
        .purge_tenant(tenant, at, 3, &deleted_event(tenant))
        .await
        .unwrap()
        .expect("deleted now");
    assert_eq!(
        (
            rows.credentials,
            rows.grants,
            rows.webhooks,
            rows.credential_policies
        ),
        (0, 1, 1, 1),
        "{rows:?}"
    );
    assert!(rows.audit_events > 0);
    assert_eq!(f.store.get_tenant(tenant).await.unwrap(), None);
    let record = f.store.get_tenant_record(tenant).await.unwrap().unwrap();
    assert_eq!(
        (record.tenant, record.deleted_at),
        (f.tenant.clone(), Some(at))
    );
    let empty = f.store.count_tenant_rows(tenant).await.unwrap();
    assert_eq!(
        keyplane_store::TenantRows {
            audit_events: 0,
            ..empty
        },
        keyplane_store::TenantRows::default()
    );
    assert_eq!(
        empty.audit_events,
        rows.audit_events + 1,
        "kept, and the deletion's"
    );
    let newest = f
        .store
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(tenant, 0, 1000))
        .await
        .unwrap();
    assert_eq!(
        newest.last().unwrap().event.action,
        keyplane_core::audit::actions::ORGANIZATION_DELETED
    );
    assert!(f.store.list_webhooks(tenant).await.unwrap().is_empty());
    // The project name stays taken; the registry row stays.
    assert!(f.store.project_taken(&project).await.unwrap());
    assert!(f.store.get_registry(tenant).await.unwrap().is_some());

    // Nothing more is taken for it, whichever way.
    let (late, _) = new_token(tenant, "late");
    let refused = f.store.insert_credential(&late, &ev(), None).await;
    assert!(matches!(refused, Err(StoreError::NotFound)), "{refused:?}");
    let grant = Grant {
        subject_type: SubjectType::User,
        ..capability_grant(tenant, uuid::Uuid::new_v4(), "api_tokens:read")
    };
    let refused = f.store.insert_grant(&grant, &ev(), None).await;
    assert!(matches!(refused, Err(StoreError::NotFound)), "{refused:?}");
    let refused = f
        .store
        .create_webhook(&webhook(tenant, &["*"], true), 20, &ev(), None)
        .await;
    assert!(matches!(refused, Err(StoreError::NotFound)), "{refused:?}");
    // A signing-key change is told to the other tenant's registry alone.
    let told = std::sync::Mutex::new(Vec::new());
    f.store
        .signing_key_or_insert(&signing_key("k1"), &|change| {
            told.lock().unwrap().push(change.tenant_id);
            key_event(change)
        })
        .await
        .unwrap();
    assert_eq!(*told.lock().unwrap(), [other.id]);

    // Again: nothing to do.
    let again = f
        .store
        .purge_tenant(tenant, now(), 3, &deleted_event(tenant))
        .await
        .unwrap();
    assert_eq!(again, None);
    // The other tenant is untouched.
    assert_eq!(
        f.store
            .get_credential(other.id, CredentialKind::ApiToken, other_token.id)
            .await
            .unwrap()
            .map(|c| c.revoked_at),
        Some(None)
    );
    assert!(f.store.get_tenant(other.id).await.unwrap().is_some());
    let unknown = f
        .store
        .purge_tenant(TenantId::new(), now(), 3, &deleted_event(tenant))
        .await;
    assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");
}

/// Revokes `credential` now, with placeholder events.
async fn revoke(store: &dyn Store, credential: &Credential) {
    store
        .revoke_credential(
            credential.tenant_id,
            credential.kind,
            credential.id,
            now(),
            None,
            &ev(),
            &|_| ev(),
            None,
        )
        .await
        .unwrap();
}

/// Another tenant of the fixture's store, deleted (`purge_tenant`) once its token is revoked.
async fn deleted_tenant(store: &dyn Store) -> TenantId {
    let (tenant, token) = another_tenant(store, "deleted").await;
    revoke(store, &token).await;
    store
        .purge_tenant(tenant.id, now(), 100, &deleted_event(tenant.id))
        .await
        .unwrap()
        .expect("deleted now");
    tenant.id
}

/// The bulk import checks its organizations once, not row by row (SQLite: once per import, with
/// 0020's row trigger set aside in its transaction; PostgreSQL: once per statement), and still
/// takes nothing for a deleted one, alone or beside a live one's rows past a statement's worth;
/// and every other insert is still checked after imports that went through and one that failed
/// after its check.
async fn a_bulk_import_takes_nothing_for_a_deleted_organization(backend: Backend) {
    let f = fixture(backend).await;
    let deleted = deleted_tenant(f.store.as_ref()).await;
    let late: Vec<Credential> = (0..3)
        .map(|i| new_token(deleted, &format!("late{i}")).0)
        .collect();
    let refused = f.store.import_credentials(&late, &[ev()]).await;
    assert!(matches!(refused, Err(StoreError::NotFound)), "{refused:?}");
    let mut mixed: Vec<Credential> = (0..600)
        .map(|i| new_token(f.tenant.id, &format!("bulk{i}")).0)
        .collect();
    mixed.push(late[0].clone());
    let refused = f.store.import_credentials(&mixed, &[ev()]).await;
    assert!(matches!(refused, Err(StoreError::NotFound)), "{refused:?}");
    assert_eq!(live_api_tokens(&f).await.len(), 1, "the fixture's own only");

    mixed.pop();
    f.store.import_credentials(&mixed, &[ev()]).await.unwrap();
    assert_eq!(live_api_tokens(&f).await.len(), 601);
    let taken_name = new_token(f.tenant.id, "bulk0").0;
    let refused = f.store.import_credentials(&[taken_name], &[ev()]).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    let refused = f.store.insert_credential(&late[1], &ev(), None).await;
    assert!(matches!(refused, Err(StoreError::NotFound)), "{refused:?}");
    assert_eq!(
        f.store
            .count_tenant_rows(deleted)
            .await
            .unwrap()
            .credentials,
        0
    );
}

/// A store whose tenants came from `create-org` alone (which does not mark it bootstrapped) and
/// are all deleted is not a new store: `serve` must not bootstrap a `default` organization with a
/// `*` token into it.
async fn a_store_of_deleted_tenants_is_never_bootstrapped_again(backend: Backend) {
    let f = fixture(backend).await;
    let tenant = f.tenant.id;
    let first = live_api_tokens(&f).await;
    for token in first {
        f.store
            .revoke_credential(
                tenant,
                token.kind,
                token.id,
                now(),
                None,
                &ev(),
                &|_| ev(),
                None,
            )
            .await
            .unwrap();
    }
    f.store
        .purge_tenant(tenant, now(), 100, &deleted_event(tenant))
        .await
        .unwrap()
        .expect("deleted now");
    assert!(f.store.is_bootstrapped().await.unwrap());
    let default = Tenant {
        id: TenantId::new(),
        name: "default".into(),
        created_at: now(),
    };
    let (token, _) = new_token(default.id, "bootstrap");
    assert!(!f
        .store
        .bootstrap_once(&default, &token, &[ev()])
        .await
        .unwrap());
}

/// Waits (at most 10 s) until `listeners` connections to the database at `url` have run their
/// `LISTEN`: a notification sent before would not reach them.
async fn until_listening(url: &str, listeners: i64) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    for attempt in 0.. {
        let listening: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN %'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if listening >= listeners {
            break;
        }
        assert!(attempt < 400, "{listening} of {listeners} listeners listen");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    pool.close().await;
}

#[path = "suite/live_limit.rs"]
mod live_limit;
#[path = "suite/revoke_batch.rs"]
mod revoke_batch;
