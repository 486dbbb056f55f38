//! `Store::revoke_credentials`: a page of one tenant's credentials revoked in one transaction
//! (`admin revoke-org`, `admin delete-org`), each with what `revoke_credential` gives it.

use super::*;
use keyplane_store::CredentialRevocation;

/// A credential's revocation event in `tenant`'s trail.
fn revoked_event(tenant: TenantId, credential: &Credential) -> keyplane_core::AuditEvent {
    action_event(tenant, "api_token.revoked").target(
        credential.kind.as_str(),
        credential.id.as_uuid(),
        Some(credential.name.as_str()),
    )
}

/// The event of a grant revoked with its service account.
fn grant_revoked_event(grant: &Grant) -> keyplane_core::AuditEvent {
    action_event(grant.tenant_id, "authorization.revoked").target(
        "authorization",
        grant.id.as_uuid(),
        None,
    )
}

/// `events` as a batch: each credential with its event.
fn batch<'a>(
    events: &'a [(&Credential, keyplane_core::AuditEvent)],
) -> Vec<CredentialRevocation<'a>> {
    events
        .iter()
        .map(|(credential, event)| CredentialRevocation {
            kind: credential.kind,
            id: credential.id,
            event,
        })
        .collect()
}

/// The tenant's events after `seq`: (action, target id).
async fn events_after(store: &dyn Store, tenant: TenantId, seq: u64) -> Vec<(String, uuid::Uuid)> {
    store
        .list_audit_events(&keyplane_store::AuditQuery::after_seq(tenant, seq, 1000))
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event.action, e.event.target.unwrap().id))
        .collect()
}

async fn stored(store: &dyn Store, credential: &Credential) -> Credential {
    store
        .get_credential(credential.tenant_id, credential.kind, credential.id)
        .await
        .unwrap()
        .expect("stored")
}

/// Two tokens, a service account with two grants (and another account with one, not in the
/// batch), a token revoked before the batch (as by a concurrent revoke) and another tenant's
/// token: the batch revokes the tenant's live three, each with its event (the account's grants'
/// after it, in creation order), in the batch's order in the chain, each event queued to the
/// tenant's webhook; it skips the revoked one and the other tenant's with no event, and the chain
/// still verifies. The same batch again revokes nothing and writes nothing.
async fn a_batch_revokes_each_credential_as_its_revoke_does(backend: Backend) {
    let f = fixture(backend).await;
    let store = f.store.as_ref();
    let tenant = f.tenant.id;
    let hook = webhook(tenant, &["*"], true);
    add_webhook(store, &hook).await;
    let (first, _) = new_token(tenant, "first");
    let (second, _) = new_token(tenant, "second");
    let (gone, _) = new_token(tenant, "gone");
    let sa = service_account(tenant, "sa");
    let other_sa = service_account(tenant, "other-sa");
    for credential in [&first, &second, &gone, &sa, &other_sa] {
        store
            .insert_credential(credential, &event_in(tenant, now()), None)
            .await
            .unwrap();
    }
    let mut grants = Vec::new();
    for (subject, key) in [(&sa, "deploy"), (&sa, "audit:read"), (&other_sa, "deploy")] {
        let grant = capability_grant(tenant, subject.id.as_uuid(), key);
        store
            .insert_grant(&grant, &event_in(tenant, now()), None)
            .await
            .unwrap();
        grants.push(grant);
    }
    let (other_tenant, foreign) = another_tenant(store, "other").await;
    let earlier = now();
    store
        .revoke_credential(
            tenant,
            CredentialKind::ApiToken,
            gone.id,
            earlier,
            None,
            &event_in(tenant, earlier),
            &grant_revoked_event,
            None,
        )
        .await
        .unwrap();
    let head = store.audit_chain_state(tenant).await.unwrap().head_seq;
    let deliveries_before = deliveries_of(store, &hook).await.len();

    // Not in id order: the chain follows the batch.
    let events = [
        (&second, revoked_event(tenant, &second)),
        (&gone, revoked_event(tenant, &gone)),
        (&sa, revoked_event(tenant, &sa)),
        (&foreign, revoked_event(tenant, &foreign)),
        (&first, revoked_event(tenant, &first)),
    ];
    let at = now() + TimeDelta::seconds(1);
    let revoked = store
        .revoke_credentials(tenant, &batch(&events), at, &grant_revoked_event)
        .await
        .unwrap();
    let ids: Vec<_> = revoked.iter().map(|c| c.id).collect();
    assert_eq!(ids, [second.id, sa.id, first.id], "the live ones, in order");
    for credential in [&second, &sa, &first] {
        let now_stored = stored(store, credential).await;
        assert_eq!(now_stored.revoked_at, Some(at), "{}", credential.name);
        assert_eq!(
            revoked.iter().find(|c| c.id == credential.id),
            Some(&now_stored),
            "the answer is the stored row"
        );
    }
    assert_eq!(
        stored(store, &gone).await.revoked_at,
        Some(earlier),
        "the earlier revoke stands"
    );
    assert_eq!(stored(store, &foreign).await.revoked_at, None);
    assert_eq!(stored(store, &other_sa).await.revoked_at, None);

    let mut sa_grants: Vec<&Grant> = grants[..2].iter().collect();
    sa_grants.sort_by_key(|g| g.id);
    let revoked_ = |action: &str, id: uuid::Uuid| (action.to_string(), id);
    assert_eq!(
        events_after(store, tenant, head).await,
        [
            revoked_("api_token.revoked", second.id.as_uuid()),
            revoked_("api_token.revoked", sa.id.as_uuid()),
            revoked_("authorization.revoked", sa_grants[0].id.as_uuid()),
            revoked_("authorization.revoked", sa_grants[1].id.as_uuid()),
            revoked_("api_token.revoked", first.id.as_uuid()),
        ]
    );
    let all_grants = store
        .list_grants(&GrantFilter {
            include_revoked: true,
            ..GrantFilter::live_for(tenant, SubjectType::ServiceAccount, sa.id.as_uuid())
        })
        .await
        .unwrap();
    assert_eq!(all_grants.len(), 2);
    assert!(all_grants.iter().all(|g| g.revoked_at == Some(at)));
    let others = store
        .list_grants(&GrantFilter::live_for(
            tenant,
            SubjectType::ServiceAccount,
            other_sa.id.as_uuid(),
        ))
        .await
        .unwrap();
    assert_eq!(others.len(), 1, "another account's grant is untouched");
    assert_eq!(
        deliveries_of(store, &hook).await.len(),
        deliveries_before + 5,
        "each event queued to the webhook"
    );
    verify_chain(store, tenant).await;
    assert!(
        events_after(store, other_tenant.id, 0)
            .await
            .iter()
            .all(|(action, _)| action != "api_token.revoked"),
        "nothing in the other tenant's trail"
    );

    let again = store
        .revoke_credentials(
            tenant,
            &batch(&events),
            at + TimeDelta::seconds(1),
            &grant_revoked_event,
        )
        .await
        .unwrap();
    assert_eq!(again, Vec::<Credential>::new());
    assert_eq!(
        store.audit_chain_state(tenant).await.unwrap().head_seq,
        head + 5
    );
    assert_eq!(
        store
            .revoke_credentials(tenant, &[], at, &grant_revoked_event)
            .await
            .unwrap(),
        Vec::<Credential>::new()
    );
}

/// PostgreSQL: a batch sends each credential's notifications as `revoke_credential` sends one's,
/// `t:<tenant>:<id>` then `<id>`, pair after pair in the batch's order (so a replica of the
/// previous release, which reads only the bare id, invalidates each), and another store's
/// listener hears each credential in its tenant.
async fn a_batch_notifies_each_credential_as_its_revoke_does() {
    use keyplane_store::Invalidation;
    let f = fixture(Backend::Postgres).await;
    let tenant = f.tenant.id;
    let tokens: Vec<Credential> = ["a", "b", "c", "single"]
        .into_iter()
        .map(|name| new_token(tenant, name).0)
        .collect();
    for token in &tokens {
        f.store
            .insert_credential(token, &event_in(tenant, now()), None)
            .await
            .unwrap();
    }
    let mut raw = sqlx::postgres::PgListener::connect(&f._db.url)
        .await
        .unwrap();
    raw.listen("keyplane_invalidation").await.unwrap();
    let other = keyplane_store::connect(&f._db.url).await.expect("connect");
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = heard.clone();
    other.listen_invalidations(
        Arc::new(move |event| {
            if matches!(event, Invalidation::InTenant(..) | Invalidation::Subject(_)) {
                into.lock().unwrap().push(event);
            }
        }),
        stopped,
    );
    until_listening(&f._db.url, 2).await;

    // The batch in reverse id order, then one revoke on its own.
    let mut batched: Vec<&Credential> = tokens[..3].iter().collect();
    batched.sort_by_key(|c| std::cmp::Reverse(c.id));
    let events: Vec<_> = batched
        .iter()
        .map(|c| (*c, revoked_event(tenant, c)))
        .collect();
    let revoked = f
        .store
        .revoke_credentials(tenant, &batch(&events), now(), &grant_revoked_event)
        .await
        .unwrap();
    assert_eq!(revoked.len(), 3);
    let single = &tokens[3];
    f.store
        .revoke_credential(
            tenant,
            single.kind,
            single.id,
            now(),
            None,
            &revoked_event(tenant, single),
            &grant_revoked_event,
            None,
        )
        .await
        .unwrap();

    let mut payloads = Vec::new();
    // Bounded in all, not per notification: the other listener's heartbeats come every second.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while payloads.len() < 8 {
        let notification = tokio::time::timeout_at(deadline, raw.recv())
            .await
            .unwrap_or_else(|_| panic!("heard only {payloads:?}"))
            .unwrap();
        // The other store's listener's heartbeats.
        if !notification.payload().starts_with("heartbeat:") {
            payloads.push(notification.payload().to_owned());
        }
    }
    let pair = |c: &Credential| {
        let id = c.id.as_uuid();
        [format!("t:{}:{id}", tenant.as_uuid()), id.to_string()]
    };
    let wanted: Vec<String> = batched
        .iter()
        .copied()
        .chain([single])
        .flat_map(pair)
        .collect();
    assert_eq!(payloads, wanted);

    for attempt in 0.. {
        if heard.lock().unwrap().len() >= 4 {
            break;
        }
        assert!(attempt < 400, "heard {:?}", heard.lock().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let placed: Vec<Invalidation> = batched
        .iter()
        .copied()
        .chain([single])
        .map(|c| Invalidation::InTenant(tenant, c.id.as_uuid()))
        .collect();
    assert_eq!(*heard.lock().unwrap(), placed);
}

/// PostgreSQL: another transaction revokes a credential of the batch while the batch runs, as
/// `revoke_credential` does: its row, then (migration 0021's trigger) the tenant's live count,
/// then the tenant's audit head. The batch, waiting for that row, holds neither the count nor the
/// head, so neither deadlocks; it then skips the credential (the other revoke's, with its event)
/// and revokes the rest.
async fn a_revoke_under_way_during_a_batch_is_skipped_without_a_deadlock() {
    let f = fixture(Backend::Postgres).await;
    let tenant = f.tenant.id;
    let mut tokens: Vec<Credential> = ["a", "b", "c"]
        .into_iter()
        .map(|name| new_token(tenant, name).0)
        .collect();
    tokens.sort_by_key(|c| c.id);
    for token in &tokens {
        f.store
            .insert_credential(token, &event_in(tenant, now()), None)
            .await
            .unwrap();
    }
    let head = f.store.audit_chain_state(tenant).await.unwrap().head_seq;
    let pool = sqlx::PgPool::connect(&f._db.url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    // The middle one: the batch could have revoked the first when it reaches it.
    let taken = &tokens[1];
    lock_credential(&mut other, taken).await;
    let batch_run = {
        let (store, tokens) = (f.store.clone(), tokens.clone());
        tokio::spawn(async move {
            let events: Vec<_> = tokens
                .iter()
                .map(|c| (c, revoked_event(tenant, c)))
                .collect();
            store
                .revoke_credentials(tenant, &batch(&events), now(), &grant_revoked_event)
                .await
        })
    };
    wait_for_a_lock_wait(&pool).await;
    let earlier = now();
    sqlx::query("UPDATE credentials SET revoked_at = $2, updated_at = $2 WHERE id = $1")
        .bind(taken.id.as_uuid())
        .bind(earlier)
        .execute(&mut *other)
        .await
        .expect("the other revoke takes the live count");
    lock_audit_head(&mut other, tenant).await;
    other.commit().await.unwrap();
    let revoked = batch_run.await.unwrap().expect("no deadlock");
    let ids: Vec<_> = revoked.iter().map(|c| c.id).collect();
    assert_eq!(ids, [tokens[0].id, tokens[2].id]);
    assert_eq!(
        f.store
            .get_credential(tenant, taken.kind, taken.id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        Some(earlier)
    );
    let written: Vec<uuid::Uuid> = events_after(f.store.as_ref(), tenant, head)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(written, [tokens[0].id.as_uuid(), tokens[2].id.as_uuid()]);
    verify_chain(f.store.as_ref(), tenant).await;
    pool.close().await;
}

store_suite! {
    a_batch_revokes_each_credential_as_its_revoke_does,
}

postgres_suite! {
    a_batch_notifies_each_credential_as_its_revoke_does,
    a_revoke_under_way_during_a_batch_is_skipped_without_a_deadlock,
}
