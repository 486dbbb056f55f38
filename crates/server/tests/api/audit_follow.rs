//! Following `/audit-events` across a restore: `after` names the events a follower had, by seq
//! and chain hash, and a trail gone back under it answers 409 `audit_chain_diverged` with where to
//! go on from, so that the events that took the seqs it had seen are not skipped.

use crate::helpers::{assert_error, both_backends, fields, Org, TestApp};
use serde_json::Value;
use sha2::{Digest, Sha256};

both_backends!(
    a_follower_past_a_restore_is_told_and_then_gets_every_new_event,
    after_is_checked_and_documented,
);

/// Every event of `org` after `query`'s position (`?after=...` or `?after_seq=...`): the page.
async fn page(app: &TestApp, org: &Org, query: &str) -> reqwest::Response {
    app.get(
        &org.path(&format!("/audit-events?limit=100&{query}")),
        &org.token,
    )
    .await
}

async fn items(app: &TestApp, org: &Org, query: &str) -> Vec<Value> {
    let res = page(app, org, query).await;
    assert_eq!(res.status(), 200, "{query}");
    let body: Value = res.json().await.unwrap();
    body["items"].as_array().unwrap().clone()
}

/// `after=` the position of `event`, as the document describes it: `<seq>-<tag>`, the tag the
/// first 8 bytes of the SHA-256 of its `chain_hash`, in lowercase hex.
fn after(event: &Value) -> String {
    let chain_hash = data_encoding::HEXLOWER
        .decode(event["chain_hash"].as_str().unwrap().as_bytes())
        .unwrap();
    let tag = data_encoding::HEXLOWER.encode(&Sha256::digest(&chain_hash)[..8]);
    format!("after={}-{tag}", event["seq"])
}

fn target_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["target"]["id"].as_str().map(str::to_owned))
        .collect()
}

/// Takes the organization's trail back to `seq`, as a restore from a backup taken then leaves
/// it: the events after it gone, the head back at it.
async fn restore_trail_to(app: &TestApp, event: &Value) {
    let seq = event["seq"].as_u64().unwrap();
    let hash = event["chain_hash"].as_str().unwrap();
    app.execute_sql(&format!("DELETE FROM audit_events WHERE seq > {seq}"))
        .await;
    app.execute_sql(&format!(
        "UPDATE audit_chain_heads SET seq = {seq}, chain_hash = '{hash}'"
    ))
    .await;
}

async fn a_follower_past_a_restore_is_told_and_then_gets_every_new_event(
    backend: keyplane_store::testing::Backend,
) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    for i in 0..5 {
        app.create_token(&org, &format!("before{i}"), &[]).await;
    }
    // The follower printed everything: seqs 1..=7.
    let seen = items(&app, &org, "after_seq=0").await;
    assert_eq!(seen.len(), 7);
    let (third, fourth, newest) = (&seen[2], &seen[3], &seen[6]);
    assert_eq!(items(&app, &org, &after(newest)).await.len(), 0);

    // Restored to a backup taken at seq 4: the follower is past the trail's head.
    restore_trail_to(&app, fourth).await;
    let res = page(&app, &org, &after(newest)).await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "audit_chain_diverged", "{body}");
    assert_eq!(body["error"]["diverged_seq"], 7, "{body}");
    assert_eq!(body["error"]["head_seq"], 4, "{body}");

    // Five new events: three take the seqs 5..=7 the follower saw.
    let mut new = Vec::new();
    for i in 0..5 {
        new.push(
            app.create_token(&org, &format!("after{i}"), &[]).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // By seq alone, the first three new events are skipped: `after_seq`'s known limit.
    let by_seq = items(&app, &org, "after_seq=7").await;
    assert_eq!(target_ids(&by_seq), new[3..].to_vec());

    // By position, the follower is told; with only its newest, it goes on from the start.
    let res = page(&app, &org, &after(newest)).await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    let error = &body["error"];
    assert_eq!(error["code"], "audit_chain_diverged", "{body}");
    assert!(
        error["message"].as_str().unwrap().contains("seq 7"),
        "{body}"
    );
    assert_eq!(error["details"], Value::Null, "{body}");
    assert_eq!(error["diverged_seq"], 7, "{body}");
    assert_eq!(error["head_seq"], 9, "{body}");
    assert_eq!(error["resume_after_seq"], 0, "{body}");

    // With an older event it had too, it goes on from the newest the trail still holds.
    let res = page(&app, &org, &format!("{}&{}", after(newest), after(third))).await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["resume_after_seq"], 3, "{body}");
    let resume = body["error"]["resume_after"].as_str().unwrap().to_owned();
    assert_eq!(format!("after={resume}"), after(third));

    // From there: the event at seq 4 again, then every new one.
    let rest = items(&app, &org, &format!("after={resume}")).await;
    let seqs: Vec<u64> = rest.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [4, 5, 6, 7, 8, 9]);
    assert_eq!(target_ids(&rest[1..]), new);
    assert_eq!(items(&app, &org, &after(&rest[5])).await.len(), 0);
}

async fn after_is_checked_and_documented(backend: keyplane_store::testing::Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let first = items(&app, &org, "after_seq=0").await[0].clone();
    for query in [
        "after=12".to_string(),
        "after=1-ABCDEF0123456789".to_string(),
        format!("{}&after_seq=0", after(&first)),
        format!("{}&cursor={}", after(&first), first["id"].as_str().unwrap()),
        (0..17).map(|_| after(&first)).collect::<Vec<_>>().join("&"),
    ] {
        let details = assert_error(page(&app, &org, &query).await, 422, "validation_failed").await;
        assert!(
            fields(&details).iter().any(|(field, _)| field == "after"),
            "{query}: {details:?}"
        );
    }

    let doc = app.openapi().await;
    let operation = &doc["paths"]["/api/v1/organizations/{orgID}/audit-events"]["get"];
    assert!(
        operation["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "after" && p["in"] == "query"),
        "{operation}"
    );
    let conflict = &operation["responses"]["409"]["content"]["application/json"]["schema"];
    assert_eq!(
        conflict["$ref"], "#/components/schemas/AuditChainDivergedEnvelope",
        "{operation}"
    );
    let schema = &doc["components"]["schemas"]["AuditChainDivergedError"];
    for field in [
        "code",
        "diverged_seq",
        "head_seq",
        "resume_after_seq",
        "resume_after",
    ] {
        assert!(
            schema["properties"][field].is_object(),
            "{field} in {schema}"
        );
    }
}
