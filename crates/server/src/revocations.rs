//! `GET /v1/revocations/stream`: every change that can make a verification answer differently
//! (revoke, rotate, suspend, resume, a retired previous secret, expiry, a leak, grant and robot
//! permission changes) of the caller's tenant, as Server-Sent Events, in commit order.
//!
//! Built on the audit trail, with no table of its own: an event's `id` is its audit `seq`, which
//! is per tenant, gap-free and in commit order (ARCHITECTURE.md, "Audit trail"), so
//! `Last-Event-ID` resumes exactly where a client stopped. A stream wakes when this replica
//! invalidates its verification cache (its own writes at once, other replicas' through the
//! store's notifications) and at the latest every `revocation_poll_interval`; it then reads the
//! tenant's chain head and, when that moved, the events after its cursor. This replica's own
//! writes wake only their tenant's streams, and so do other replicas' (their notifications name
//! the tenant: `Invalidation::InTenant`); one that names none (from a replica of an older
//! release) and a reset wake every stream; the echo of this replica's own
//! write (PostgreSQL delivers a NOTIFY to its sender's listener too, which the store tells apart
//! by the sending backend: `Invalidation::Echo`) wakes none, its tenant's streams having been
//! woken already.
//!
//! Event ids: the audit `seq`; with `?ids=seq_hash`, `<seq>-<tag>`, the tag a short hash of that
//! event's chain hash (`keyplane_core::audit_position`). A bare seq cannot tell the event a client saw from another at
//! that seq once the chain went back and grew past it again; a tag can (`reset`). Opt-in: clients
//! from before parse an id as a number. Both forms resume.
//!
//! Events: `ready` first (`id` = where the stream starts), then one `revocation` per change;
//! `reset` when the client's `Last-Event-ID` can no longer be resumed (the events were pruned,
//! or the id is ahead of the chain), when retention prunes events the stream has not sent yet,
//! or when the chain no longer holds the event at the stream's cursor (it went back: a failover
//! to a standby that lost the last commits, a restore from a backup; its next events take the
//! seqs the stream already sent). Both are checked at each read of the chain state (every
//! wake-up, and after each read of events): the client must forget what it cached, and the
//! stream goes on from the head. The check is cheap: the stream keeps the chain hash of the
//! event at its cursor, compared with the head's when the head has not moved, and with the event
//! read by its seq only when the head moved past it (there are events to read anyway).
//!
//! A heartbeat comment after `revocation_heartbeat` without an event, sent right after a
//! successful read of the head, says the stream is alive and up to date (a stuck store stops the
//! heartbeats too); one also follows the missed events of a resumed stream whose last event is
//! short of the head. A stream ends when the store cannot be read (the client reconnects with
//! `Last-Event-ID`), when the caller's own credential stops verifying or loses `tokens:verify`,
//! or when the server stops.

use crate::app::App;
use crate::audit_positions::chain_hash_at;
use crate::auth::bearer_token;
use crate::error::{ApiError, AppError};
use crate::jobs::{TenantShare, TenantShares};
use crate::verify::Verification;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use keyplane_core::audit::actions;
use keyplane_core::audit_position::EventPosition;
use keyplane_core::{Capability, ChainedEvent, Error as DomainError, TenantId};
use keyplane_store::{AuditChainState, AuditQuery};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// Events read from the store at once.
const BATCH: u32 = 100;

/// The actions a stream carries: those after which a cached verification may be wrong.
pub const STREAMED_ACTIONS: &[&str] = &[
    actions::API_TOKEN_ROTATED,
    actions::API_TOKEN_REVOKED,
    actions::API_TOKEN_SUSPENDED,
    actions::API_TOKEN_RESUMED,
    actions::API_TOKEN_PREVIOUS_SECRET_RETIRED,
    actions::SERVICE_ACCOUNT_ROTATED,
    actions::SERVICE_ACCOUNT_REVOKED,
    actions::SERVICE_ACCOUNT_SUSPENDED,
    actions::SERVICE_ACCOUNT_RESUMED,
    actions::SERVICE_ACCOUNT_PREVIOUS_SECRET_RETIRED,
    actions::ROBOT_ACCOUNT_ROTATED,
    actions::ROBOT_ACCOUNT_REVOKED,
    actions::ROBOT_ACCOUNT_SUSPENDED,
    actions::ROBOT_ACCOUNT_RESUMED,
    actions::ROBOT_ACCOUNT_PREVIOUS_SECRET_RETIRED,
    actions::ROBOT_ACCOUNT_PERMISSIONS_UPDATED,
    actions::AUTHORIZATION_CREATED,
    actions::AUTHORIZATION_REVOKED,
    actions::CREDENTIAL_EXPIRED,
    actions::CREDENTIAL_LEAKED,
];

/// The streams open on this replica: their number is bounded, in all and per organization (one
/// tenant cannot take every slot), and they end when it stops.
pub(crate) struct RevocationStreams {
    slots: Arc<Semaphore>,
    per_org: TenantShares,
    /// Per tenant with open streams, bumped on this replica's changes in it: its streams look at
    /// the store at once.
    tenant_wakes: Mutex<HashMap<TenantId, watch::Sender<u64>>>,
    /// Bumped on a change the store told of that cannot be placed in a tenant: every stream looks.
    wake_all: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

/// A stream's slots, in all and in its organization: given back when the stream ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _share: TenantShare,
}

impl RevocationStreams {
    pub(crate) fn new(max_streams: usize, max_per_org: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_streams)),
            per_org: TenantShares::new(max_per_org),
            tenant_wakes: Mutex::new(HashMap::new()),
            wake_all: watch::Sender::new(0),
            stop: watch::Sender::new(false),
        }
    }

    /// A slot for one more stream of `tenant`; `None` when the replica or the organization has
    /// as many open as allowed.
    fn take_slot(&self, tenant: TenantId) -> Option<Slot> {
        let share = self.per_org.take(tenant)?;
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _permit: permit,
            _share: share,
        })
    }

    /// This replica changed something in `tenant`: that tenant's streams read their heads.
    pub(crate) fn wake_tenant(&self, tenant: TenantId) {
        if let Some(wake) = self
            .tenant_wakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tenant)
        {
            wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The store told of a change: another replica's wakes its tenant's streams, or every stream
    /// when the notification names no tenant (a replica of an older release) or is a reset; the
    /// echo of this replica's own wakes none, its tenant's streams having been woken when it was
    /// made. (Should that wake have been missed, the commit's answer lost, the streams find the
    /// change at their next poll.) So a busy organization's changes cost only its own streams a
    /// read of their chain head, not every organization's.
    pub(crate) fn heard(&self, event: keyplane_store::Invalidation) {
        use keyplane_store::Invalidation;
        match event {
            Invalidation::Echo(_) | Invalidation::Listening(_) => {}
            Invalidation::InTenant(tenant, _) => self.wake_tenant(tenant),
            Invalidation::Subject(_) | Invalidation::Reset => {
                self.wake_all.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// What wakes a stream of `tenant`: its tenant's changes here, and changes the store told of.
    fn subscribe(&self, tenant: TenantId) -> (watch::Receiver<u64>, watch::Receiver<u64>) {
        let mut wakes = self.tenant_wakes.lock().unwrap_or_else(|p| p.into_inner());
        // Tenants whose streams all ended.
        wakes.retain(|_, wake| wake.receiver_count() > 0);
        let own = wakes
            .entry(tenant)
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        (own, self.wake_all.subscribe())
    }

    /// The server stops: every stream ends, so that connections can close.
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// The stream answers errors in the verification endpoints' OAuth dialect.
pub(crate) fn owns_path(path: &str) -> bool {
    path == "/v1/revocations/stream"
}

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new().routes(routes!(revocation_stream))
}

/// One `revocation` event's data. No secret, no hash: what changed, for which credential.
#[derive(Serialize, ToSchema)]
pub struct RevocationEvent {
    /// The audit event's `seq` (also the SSE `id`, or its part before the `-` with
    /// `ids=seq_hash`).
    pub seq: u64,
    /// The audit action, e.g. `api_token.revoked`, `authorization.created`.
    pub action: String,
    /// The affected credential's kind (`api_token`, `service_account`, `robot_account`; for a
    /// grant change, the grant's subject type).
    pub kind: String,
    /// The affected credential (for a grant change: the grant's subject).
    #[schema(value_type = String, format = Uuid)]
    pub credential_id: String,
    #[schema(value_type = String, format = DateTime)]
    pub occurred_at: String,
}

/// The data of `ready` and `reset`.
#[derive(Serialize, ToSchema)]
pub struct StreamPosition {
    /// The seq the stream continues after.
    pub seq: u64,
    /// Seconds between heartbeat comments: a client that hears nothing for longer than this
    /// should take the stream for dead.
    pub heartbeat_seconds: u64,
    /// The newest seq of the chain when the stream opened: a client is up to date once it has
    /// seen events up to here or a heartbeat. Equal to `seq` unless resuming; it may name an event
    /// the stream does not carry, which a heartbeat then vouches for.
    pub head: u64,
}

/// How the stream writes its events' ids (`?ids=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventIds {
    /// The audit `seq` alone, a whole number (the default, as every release has sent).
    #[default]
    Seq,
    /// `<seq>-<tag>`: the seq and 16 lowercase hex digits of a hash of the event's chain hash.
    SeqHash,
}

impl EventIds {
    /// The id of the event at `seq`, whose chain hash is `hash`.
    fn of(self, seq: u64, hash: &[u8; 32]) -> String {
        match self {
            Self::Seq => seq.to_string(),
            Self::SeqHash => EventPosition::of(seq, hash).to_string(),
        }
    }

    /// The `ids` query parameter; other parameters are ignored, as they always were.
    fn of_query(uri: &Uri) -> Result<Self, AppError> {
        #[derive(Deserialize)]
        struct StreamQuery {
            #[serde(default)]
            ids: EventIds,
        }
        let Some(query) = uri.query() else {
            return Ok(Self::default());
        };
        match serde_urlencoded::from_str::<StreamQuery>(query) {
            Ok(read) => Ok(read.ids),
            Err(_) => Err(AppError::Domain(DomainError::Validation(vec![
                keyplane_core::FieldError::new(
                    keyplane_core::FieldPath::query("ids"),
                    keyplane_core::error::codes::INVALID_FORMAT,
                    "must be `seq` or `seq_hash`, once",
                ),
            ]))),
        }
    }
}

/// Where a client resumes (`Last-Event-ID`): a seq, and the event it saw there when the id was in
/// the `seq_hash` form. Either form is taken, whatever `ids` asks for now.
struct Resume {
    seq: u64,
    saw: Option<EventPosition>,
}

impl Resume {
    fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        if !value.contains('-') {
            return Some(Self {
                seq: value.parse().ok()?,
                saw: None,
            });
        }
        let saw = EventPosition::parse(value)?;
        Some(Self {
            seq: saw.seq,
            saw: Some(saw),
        })
    }

    /// Whether the event with chain hash `hash` at this seq is the one the client saw, as far as
    /// its id tells (a bare seq cannot).
    fn saw(&self, hash: &[u8; 32]) -> bool {
        self.saw.as_ref().is_none_or(|saw| saw.names(hash))
    }
}

/// Revocation stream (Server-Sent Events)
///
/// Every change of the caller's organization that can change a verification answer, as it
/// commits: `revoked`, `rotated`, `suspended`, `resumed`, `previous_secret_retired` of API tokens,
/// service accounts and robot accounts, robot permission changes, grants created or revoked,
/// `credential.expired` and `credential.leaked`. The caller needs `tokens:verify`.
///
/// Events: `ready` (first; data: a `StreamPosition`, `{seq, heartbeat_seconds, head}`),
/// `revocation` (data: a `RevocationEvent`, `{seq, action, kind, credential_id, occurred_at}`),
/// and `reset` (the `Last-Event-ID` cannot be resumed, retention deleted events before the stream
/// sent them, or the audit trail went back, as after a database failover or restore that lost its
/// last commits: drop every cached verification; data: a `StreamPosition`; it may come at any
/// point of the stream); both schemas are in the document's components. Each carries `id:` = the
/// audit `seq`, increasing (a `reset` after the trail went back names a lower one, and the ids go
/// on from it); send the last one seen as `Last-Event-ID` to resume without missing or repeating a
/// change. With `ids=seq_hash`, an id is `<seq>-<tag>` (the tag: 16 lowercase hex digits of a
/// hash of the event's chain hash) and its seq the number before the `-`: resuming with such an
/// id after the trail went back and grew past it again answers `reset`, where a bare seq would
/// resume on events the client never saw. Both forms are accepted as `Last-Event-ID` either way.
/// Comments (`: `) are heartbeats, each sent right after the chain's head was
/// read with every event up to it before: a client is up to date once it has had one, or events
/// up to `head` (on resumption, `ready` comes before the missed events; a stream that ends
/// before them has not caught up).
#[utoipa::path(
    get, path = "/v1/revocations/stream", tag = "Verification",
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id: an audit seq, or `<seq>-<tag>` as sent with `ids=seq_hash`."),
        ("ids" = inline(Option<EventIds>), Query, description = "How event ids are written: `seq` (default), or `seq_hash` (`<seq>-<tag>`, which lets a resumption after the audit trail went back be told `reset`). Other query parameters are ignored."),
    ),
    responses(
        (status = 200, description = "The event stream; it stays open. Each event's `data` is one line of JSON: a `StreamPosition` (`#/components/schemas/StreamPosition`) for `ready` and `reset`, a `RevocationEvent` (`#/components/schemas/RevocationEvent`) for `revocation`.", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_request`: `Last-Event-ID` is neither a seq nor `<seq>-<tag>`, or `ids` is neither `seq` nor `seq_hash`."),
        (status = 401, description = "Missing, unknown, expired or revoked credential, or a robot secret."),
        (status = 403, description = "The caller lacks `tokens:verify`."),
        (status = 429, description = "Too many streams are open on this server, or of the caller's organization, or too many failed authentications from this address; retry after `Retry-After`."),
    ),
    security(("bearer" = [])),
)]
async fn revocation_stream(
    State(app): State<App>,
    origin: crate::request_id::Origin,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError<Verification>> {
    let presented = bearer_token(&headers)?.to_string();
    let at = || {
        crate::canary::Presentation::of_request(
            crate::canary::CanarySurface::RevocationStream,
            "GET /v1/revocations/stream".into(),
            &headers,
            &origin,
        )
    };
    let caller = app.inner().verifier.verify_bearer(&presented, &at).await?;
    if !caller.rights.scopes.grants(Capability::TokensVerify) {
        return Err(AppError::Domain(DomainError::Forbidden(
            "the revocation stream needs a credential with the `tokens:verify` capability".into(),
        ))
        .into());
    }
    let ids = EventIds::of_query(&uri)?;
    let resume = match headers.get(LAST_EVENT_ID) {
        None => None,
        Some(value) => Some(value.to_str().ok().and_then(Resume::parse).ok_or_else(|| {
            AppError::Domain(DomainError::Validation(vec![
                keyplane_core::FieldError::new(
                    keyplane_core::FieldPath::header("Last-Event-ID"),
                    keyplane_core::error::codes::INVALID_FORMAT,
                    "must be an event id of this stream (a whole number, or `<seq>-<tag>`)",
                ),
            ]))
        })?),
    };
    let streams = &app.inner().revocation_streams;
    let tenant = caller.credential.tenant_id;
    let Some(slot) = streams.take_slot(tenant) else {
        return Err(AppError::RateLimited {
            retry_after_secs: 5,
        }
        .into());
    };
    let state = app.store().audit_chain_state(tenant).await?;
    let config = &app.inner().config;
    let heartbeat = config.revocation_heartbeat;
    let position = |seq| StreamPosition {
        seq,
        heartbeat_seconds: heartbeat_seconds(heartbeat),
        head: state.head_seq,
    };
    // Where the stream starts, and the chain hash there: the head, or the client's
    // `Last-Event-ID` while the chain holds an event there (the events after it are all still
    // there: pruning deletes only up to the anchor) and, for an id with a tag, it is the event the
    // client saw. (Of a bare seq, that cannot be told.)
    let start = match resume {
        None => Some((state.head_seq, state.head_hash)),
        Some(resume) => chain_hash_at(app.store().as_ref(), tenant, &state, resume.seq)
            .await?
            .filter(|hash| resume.saw(hash))
            .map(|hash| (resume.seq, hash)),
    };
    let (name, (cursor, cursor_hash)) = match start {
        Some(start) => ("ready", start),
        None => ("reset", (state.head_seq, state.head_hash)),
    };
    let first = position_event(name, &position(cursor), ids.of(cursor, &cursor_hash))
        .map_err(|e| AppError::Internal(anyhow::anyhow!("render an event: {e}")))?;
    let (wake, wake_all) = streams.subscribe(tenant);
    let stream = Stream {
        app: app.clone(),
        presented,
        tenant,
        ids,
        cursor,
        cursor_hash,
        head: state.head_seq,
        head_hash: state.head_hash,
        pending: VecDeque::from([first]),
        wake,
        wake_all,
        stop: streams.stop.subscribe(),
        poll: config.revocation_poll_interval,
        heartbeat,
        last_sent: tokio::time::Instant::now(),
        _slot: slot,
    };
    let events = futures::stream::unfold(stream, |mut stream| async move {
        let event = stream.next().await?;
        Some((Ok::<_, std::convert::Infallible>(event), stream))
    });
    Ok(Sse::new(events).into_response())
}

/// One open stream: where it is in its tenant's chain and the events read but not yet sent.
struct Stream {
    app: App,
    /// The caller's own secret, re-verified (from the cache) at each wake-up, so a stream ends
    /// once its credential is revoked or loses `tokens:verify`.
    presented: String,
    tenant: TenantId,
    ids: EventIds,
    /// Every streamed event up to this seq has been queued.
    cursor: u64,
    /// The chain hash of the event at `cursor`: the chain the stream follows is still the one
    /// it sent from while the event there has this hash.
    cursor_hash: [u8; 32],
    /// The chain head last read, and its hash.
    head: u64,
    head_hash: [u8; 32],
    pending: VecDeque<Event>,
    /// Bumped on this replica's changes in the stream's tenant.
    wake: watch::Receiver<u64>,
    /// Bumped on changes the store told of, which may be in any tenant.
    wake_all: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    poll: Duration,
    /// A heartbeat is sent when nothing else was for this long, and only right after the head
    /// was read: it tells the client the stream is alive *and* up to date.
    heartbeat: Duration,
    last_sent: tokio::time::Instant,
    _slot: Slot,
}

impl Stream {
    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.last_sent = tokio::time::Instant::now();
                return Some(event);
            }
            if self.head <= self.cursor {
                let heartbeat_due = self.last_sent + self.heartbeat;
                if heartbeat_due <= tokio::time::Instant::now() {
                    self.last_sent = tokio::time::Instant::now();
                    return Some(Event::default().comment("heartbeat"));
                }
                let next_read = (tokio::time::Instant::now() + self.poll).min(heartbeat_due);
                tokio::select! {
                    _ = self.wake.changed() => {}
                    _ = self.wake_all.changed() => {}
                    () = tokio::time::sleep_until(next_read) => {}
                    _ = self.stop.wait_for(|stop| *stop) => return None,
                }
                // A canary never opened a stream (refused above, and never stops being one): this
                // description is for form's sake.
                let at = || {
                    crate::canary::Presentation::new(
                        crate::canary::CanarySurface::RevocationStream,
                        "GET /v1/revocations/stream".into(),
                        Default::default(),
                    )
                };
                // A caller that lost `tokens:verify` (a grant removed) is refused as a new one is.
                let still_allowed = match self
                    .app
                    .inner()
                    .verifier
                    .verify_bearer(&self.presented, &at)
                    .await
                {
                    Ok(caller) => caller.rights.scopes.grants(Capability::TokensVerify),
                    Err(_) => false,
                };
                if !still_allowed {
                    return None;
                }
                let state = self.chain_state().await?;
                self.observe(&state).await?;
                continue;
            }
            let mut query = AuditQuery::after_seq(self.tenant, self.cursor, BATCH);
            query.actions = STREAMED_ACTIONS.iter().map(|a| a.to_string()).collect();
            let events = match self.app.store().list_audit_events(&query).await {
                Ok(events) => events,
                Err(error) => {
                    tracing::warn!(%error, tenant.id = %self.tenant, "revocation stream ends: the store cannot be read");
                    return None;
                }
            };
            // Retention may have deleted events after the cursor before the query read them (a
            // resumed stream catching up from just above the anchor): the query then skipped
            // them without a trace. The anchor only moves forward, so one read after the query
            // tells: at or below the cursor, the query saw every event after it.
            let state = self.chain_state().await?;
            if state.anchor_seq > self.cursor {
                self.reset(&state);
                continue;
            }
            let full = events.len() == BATCH as usize;
            let mut last_rendered = None;
            for chained in &events {
                if let Some(event) = render(chained, self.ids) {
                    self.pending.push_back(event);
                    last_rendered = Some(chained.seq);
                }
            }
            // Caught up to a head the client cannot see in the ids (the newest events are not
            // streamed ones): a heartbeat after these says so now rather than a heartbeat
            // interval later. A resumed client counts itself up to date only then.
            let heartbeat = !full && last_rendered.is_none_or(|seq| seq < self.head);
            // Every streamed event up to the head read before this query has been seen (seq order
            // is commit order); a full batch continues from its last event.
            (self.cursor, self.cursor_hash) = match events.last() {
                Some(last) if full || last.seq > self.head => (last.seq, last.chain_hash),
                _ => (self.head, self.head_hash),
            };
            // Not after a reset: that names the head itself.
            if self.observe(&state).await? && heartbeat {
                self.pending
                    .push_back(Event::default().comment("heartbeat"));
            }
        }
    }

    /// Takes in a read of the chain state: `reset` when the chain no longer holds what the stream
    /// went past (pruned past the cursor, or gone back), else its head is where to read up to.
    /// `Some(false)` after a reset; `None` (the stream ends) when the store cannot be read.
    async fn observe(&mut self, state: &AuditChainState) -> Option<bool> {
        if state.anchor_seq > self.cursor {
            self.reset(state);
            return Some(false);
        }
        let at_cursor = match chain_hash_at(
            self.app.store().as_ref(),
            self.tenant,
            state,
            self.cursor,
        )
        .await
        {
            Ok(hash) => hash,
            Err(error) => {
                tracing::warn!(%error, tenant.id = %self.tenant, "revocation stream ends: the store cannot be read");
                return None;
            }
        };
        let kept = at_cursor == Some(self.cursor_hash);
        if kept {
            self.head = state.head_seq;
            self.head_hash = state.head_hash;
        } else {
            tracing::warn!(
                tenant.id = %self.tenant,
                stream.seq = self.cursor,
                chain.head = state.head_seq,
                "the audit chain no longer holds the events a revocation stream sent (a failover or a restore lost them?): the stream is reset"
            );
            self.reset(state);
        }
        Some(kept)
    }

    /// The tenant's chain state; `None` (the stream ends) when the store cannot be read.
    async fn chain_state(&self) -> Option<AuditChainState> {
        match self.app.store().audit_chain_state(self.tenant).await {
            Ok(state) => Some(state),
            Err(error) => {
                tracing::warn!(%error, tenant.id = %self.tenant, "revocation stream ends: the store cannot be read");
                None
            }
        }
    }

    /// The stream cannot go on from its cursor (events after it were pruned before the stream
    /// read them, or the chain went back): `reset`, as for a `Last-Event-ID` that cannot be
    /// resumed, and go on from the head.
    fn reset(&mut self, state: &AuditChainState) {
        let position = StreamPosition {
            seq: state.head_seq,
            heartbeat_seconds: heartbeat_seconds(self.heartbeat),
            head: state.head_seq,
        };
        match position_event(
            "reset",
            &position,
            self.ids.of(state.head_seq, &state.head_hash),
        ) {
            Ok(event) => self.pending.push_back(event),
            Err(error) => tracing::error!(%error, "cannot render a reset event"),
        }
        (self.cursor, self.cursor_hash) = (state.head_seq, state.head_hash);
        (self.head, self.head_hash) = (state.head_seq, state.head_hash);
    }
}

fn heartbeat_seconds(heartbeat: Duration) -> u64 {
    heartbeat.as_secs().max(1)
}

/// `ready` or `reset`: where the stream goes on from (`id`: that event's).
fn position_event(
    name: &'static str,
    position: &StreamPosition,
    id: String,
) -> Result<Event, axum::Error> {
    Event::default()
        .event(name)
        .id(id)
        .retry(Duration::from_secs(1))
        .json_data(position)
}

fn render(chained: &ChainedEvent, ids: EventIds) -> Option<Event> {
    let event = &chained.event;
    let target = event.target.as_ref()?;
    let (kind, credential_id) = if target.target_type == "authorization" {
        let text = |key: &str| match event.details.get(key) {
            Some(keyplane_core::audit::DetailValue::Text(text)) => Some(text.clone()),
            _ => None,
        };
        (text("subject_type")?, text("subject_id")?)
    } else {
        (target.target_type.clone(), target.id.to_string())
    };
    let data = RevocationEvent {
        seq: chained.seq,
        action: event.action.clone(),
        kind,
        credential_id,
        occurred_at: crate::wire::rfc3339(&event.occurred_at),
    };
    Event::default()
        .event("revocation")
        .id(ids.of(chained.seq, &chained.chain_hash))
        .json_data(&data)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyplane_store::Invalidation;

    /// Another replica's change in one organization costs no other organization's streams a
    /// read; a notification that names no tenant (an older release's) and a reset wake them all.
    #[test]
    fn another_replicas_change_wakes_only_its_tenants_streams() {
        let streams = RevocationStreams::new(10, 10);
        let (a, b) = (TenantId::new(), TenantId::new());
        let (mut a_own, mut a_all) = streams.subscribe(a);
        let (mut b_own, mut b_all) = streams.subscribe(b);
        let woken = |own: &watch::Receiver<u64>, all: &watch::Receiver<u64>| {
            own.has_changed().unwrap() || all.has_changed().unwrap()
        };

        streams.heard(Invalidation::InTenant(a, uuid::Uuid::new_v4()));
        assert!(woken(&a_own, &a_all), "its tenant's stream looks");
        assert!(!woken(&b_own, &b_all), "another tenant's stream sleeps on");

        for event in [
            Invalidation::Subject(uuid::Uuid::new_v4()),
            Invalidation::Reset,
        ] {
            for receiver in [&mut a_own, &mut a_all, &mut b_own, &mut b_all] {
                receiver.mark_unchanged();
            }
            streams.heard(event);
            assert!(woken(&a_own, &a_all) && woken(&b_own, &b_all), "{event:?}");
        }
        for receiver in [&mut a_own, &mut a_all, &mut b_own, &mut b_all] {
            receiver.mark_unchanged();
        }
        streams.heard(Invalidation::Echo(uuid::Uuid::new_v4()));
        assert!(!woken(&a_own, &a_all) && !woken(&b_own, &b_all), "an echo");
    }
}
