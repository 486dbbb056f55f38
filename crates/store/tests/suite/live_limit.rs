//! `serve --max-live-credentials-per-org` in the store: the count migration 0021's triggers keep,
//! and the check `insert_credential_within_limit` and `create_registry` make of it.

use super::*;

fn refused_at_the_limit(outcome: Result<(), StoreError>, limit: u64) {
    assert!(
        matches!(outcome, Err(StoreError::LiveCredentialLimit { limit: l }) if l == limit),
        "{outcome:?}"
    );
}

async fn live_count(store: &dyn Store, tenant: TenantId) -> usize {
    store
        .list_credentials(&ListCredentials {
            tenant_id: tenant,
            kind: CredentialKind::ApiToken,
            after: None,
            limit: None,
            include_revoked: false,
            expiring: None,
            include_canaries: true,
        })
        .await
        .unwrap()
        .len()
}

/// The fixture's tenant holds its bootstrap token: with a limit of 3, two more fit. A refused
/// create stores nothing; a rotation keeping its previous secret is still one credential; a
/// revocation makes room; the operator's unlimited insert is not held to it, and counts.
async fn creates_past_the_live_limit_are_refused(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let tenant = f.tenant.id;
    let mut tokens = Vec::new();
    for name in ["a", "b"] {
        let (token, _) = new_token(tenant, name);
        store
            .insert_credential_within_limit(&token, Some(3), &ev(), None)
            .await
            .unwrap();
        tokens.push(token);
    }
    let (past, _) = new_token(tenant, "c");
    refused_at_the_limit(
        store
            .insert_credential_within_limit(&past, Some(3), &ev(), None)
            .await,
        3,
    );
    assert_eq!(
        live_count(store, tenant).await,
        3,
        "the refused one is not stored"
    );
    let registry = keyplane_core::Registry {
        id: uuid::Uuid::now_v7(),
        tenant_id: tenant,
        project: format!("p-{}", uuid::Uuid::new_v4().simple()),
        quota_gb: -1,
        created_at: now(),
        updated_at: now(),
    };
    let (robot, _) = new_token(tenant, "robot");
    refused_at_the_limit(
        store
            .create_registry(&registry, &robot, Some(3), &[ev()], None)
            .await,
        3,
    );
    assert_eq!(store.get_registry(tenant).await.unwrap(), None);

    let rotated = &tokens[0];
    let keep_previous = RotationOptions {
        grace_seconds: 3600,
        retire_when_unused_seconds: None,
    };
    let (rotation, _) = Rotation::mint(rotated, keep_previous, None, now(), &mut OsRng);
    store
        .rotate_credential(
            tenant,
            rotated.kind,
            rotated.id,
            &rotated.secret_hash,
            &rotation,
            &ev(),
            None,
        )
        .await
        .unwrap();
    refused_at_the_limit(
        store
            .insert_credential_within_limit(&past, Some(3), &ev(), None)
            .await,
        3,
    );

    let revoked = &tokens[1];
    revoke(store, revoked).await;
    store
        .insert_credential_within_limit(&past, Some(3), &ev(), None)
        .await
        .unwrap();

    // The operator's insert passes the limit, and is counted: the API's next create is refused
    // even under a higher limit.
    let (operators, _) = new_token(tenant, "operator's");
    store
        .insert_credential(&operators, &ev(), None)
        .await
        .unwrap();
    let (one_more, _) = new_token(tenant, "one more");
    refused_at_the_limit(
        store
            .insert_credential_within_limit(&one_more, Some(4), &ev(), None)
            .await,
        4,
    );
    // Another tenant has a count of its own.
    let (other, _) = another_tenant(store, "other").await;
    let (second, _) = new_token(other.id, "second");
    store
        .insert_credential_within_limit(&second, Some(2), &ev(), None)
        .await
        .unwrap();
}

/// Creates racing at the limit: exactly as many succeed as fit, none fails otherwise (no
/// deadlock, no lost update of the count), on PostgreSQL's eight writers as on SQLite's one.
async fn racing_creates_stop_exactly_at_the_live_limit(backend: Backend) {
    const LIMIT: u64 = 10;
    const RACERS: usize = 24;
    let f = fixture(backend).await;
    let tenant = f.tenant.id;
    let racers: Vec<_> = (0..RACERS)
        .map(|i| {
            let store = f.store.clone();
            tokio::spawn(async move {
                let (token, _) = new_token(tenant, &format!("racer {i}"));
                store
                    .insert_credential_within_limit(&token, Some(LIMIT), &ev(), None)
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(()) => created += 1,
            refused => refused_at_the_limit(refused, LIMIT),
        }
    }
    // The bootstrap token is one of the ten.
    assert_eq!(created, LIMIT as usize - 1);
    assert_eq!(live_count(f.store.as_ref(), tenant).await, LIMIT as usize);
}

/// A store migrated to 0021 counts the live credentials it already holds, not the revoked ones.
async fn the_count_starts_from_the_credentials_a_store_holds(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let tenant = f.tenant.id;
    for name in ["kept", "revoked"] {
        let (token, _) = new_token(tenant, name);
        store.insert_credential(&token, &ev(), None).await.unwrap();
        if name == "revoked" {
            revoke(store, &token).await;
        }
    }
    // Back to before 0021, with its credentials: the migration runs again on the next open.
    let undo = match backend {
        Backend::Sqlite => {
            "DROP TRIGGER credentials_counted_on_insert; \
             DROP TRIGGER credentials_counted_on_revoke; \
             DROP TRIGGER credentials_counted_on_delete; \
             DROP TABLE live_credential_counts; \
             DELETE FROM _sqlx_migrations WHERE version = 21"
        }
        Backend::Postgres => {
            "DROP FUNCTION keyplane_count_inserted_credentials() CASCADE; \
             DROP FUNCTION keyplane_count_revoked_credential() CASCADE; \
             DROP FUNCTION keyplane_count_deleted_credential() CASCADE; \
             DROP TABLE live_credential_counts; \
             DELETE FROM _sqlx_migrations WHERE version = 21"
        }
    };
    f.store.close().await;
    execute_raw(&f._db.url, undo).await;
    let store = keyplane_store::connect(&f._db.url).await.unwrap();
    // The bootstrap token and "kept": one more fits under 3, not two.
    let (third, _) = new_token(tenant, "third");
    store
        .insert_credential_within_limit(&third, Some(3), &ev(), None)
        .await
        .unwrap();
    let (fourth, _) = new_token(tenant, "fourth");
    refused_at_the_limit(
        store
            .insert_credential_within_limit(&fourth, Some(3), &ev(), None)
            .await,
        3,
    );
    store.close().await;
}

/// A bulk import counts the live credentials it adds, not the revoked ones (on SQLite it sets the
/// per-row count trigger aside and adds each tenant's count once), and leaves the trigger in place
/// for the inserts after it.
async fn an_import_counts_what_it_adds(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let tenant = f.tenant.id;
    let mut imported: Vec<Credential> = ["a", "b", "c", "gone"]
        .into_iter()
        .map(|name| new_token(tenant, name).0)
        .collect();
    imported[3].revoked_at = Some(now());
    store.import_credentials(&imported, &[]).await.unwrap();
    // The bootstrap token and three imported: one more fits under 5, then none.
    let (fifth, _) = new_token(tenant, "fifth");
    store
        .insert_credential_within_limit(&fifth, Some(5), &ev(), None)
        .await
        .unwrap();
    let (sixth, _) = new_token(tenant, "sixth");
    refused_at_the_limit(
        store
            .insert_credential_within_limit(&sixth, Some(5), &ev(), None)
            .await,
        5,
    );
}

async fn execute_raw(url: &str, statements: &str) {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::raw_sql(statements).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::raw_sql(statements).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

store_suite! {
    creates_past_the_live_limit_are_refused,
    an_import_counts_what_it_adds,
    racing_creates_stop_exactly_at_the_live_limit,
    the_count_starts_from_the_credentials_a_store_holds,
}
