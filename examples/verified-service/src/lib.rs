//! An example service whose `/hello` only answers callers holding a live keyplane credential,
//! checked in-process by `keyplane-verifier`; `/verifier` shows the verifier's metrics. It answers
//! anyone, for the example's test; the last event id there is the organization's audit sequence
//! (its activity volume), so a real service keeps such metrics on an internal listener.

use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json, Router};
use keyplane_verifier::{Identity, Verifier, VerifyLayer};
use std::sync::Arc;

pub fn app(verifier: Verifier) -> Router {
    let protected = Router::new()
        .route("/hello", get(hello))
        .layer(VerifyLayer::new(verifier.clone()));
    Router::new()
        .route("/verifier", get(metrics))
        .with_state(verifier)
        .merge(protected)
}

async fn hello(Extension(identity): Extension<Arc<Identity>>) -> String {
    format!("hello, {} ({})\n", identity.name, identity.credential_id)
}

async fn metrics(State(verifier): State<Verifier>) -> Json<serde_json::Value> {
    let m = verifier.metrics();
    Json(serde_json::json!({
        "accepted": m.accepted,
        "refused": m.refused,
        "malformed": m.malformed,
        "cache_hits": m.cache_hits,
        "introspections": m.introspections,
        "introspection_errors": m.introspection_errors,
        "stale_refusals": m.stale_refusals,
        "stale_rechecks": m.stale_rechecks,
        "stream_connects": m.stream_connects,
        "stream_disconnects": m.stream_disconnects,
        "stream_events": m.stream_events,
        "stream_resets": m.stream_resets,
        "last_event_id": m.last_event_id,
        "stream_connected": m.stream_connected,
        "stale": m.stale,
    }))
}
