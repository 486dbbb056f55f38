//! Canary credentials: created with `"canary": true`, they look like any credential of their kind
//! (same token format, same create answer) but authenticate nowhere. The verifier answers a canary
//! exactly as it answers a revoked credential, on every surface, and [`CanaryAlarm`] records
//! `credential.canary_triggered` with where it was presented.
//!
//! Describing the request costs nothing on the hot path: the verifier takes a [`Presented`]
//! closure and calls it only when the secret is a canary's.
//!
//! Bound: at most one event per canary per client address per [`TRIGGER_WINDOW`], and at most
//! [`MAX_TRIGGERS_PER_WINDOW`] per canary in any window, so a flood of presentations cannot
//! flood the audit trail or its webhooks. Presentations past the bound are logged at debug level
//! only: no metric counts canaries, since `/metrics` answers anyone who can reach it and a counter
//! that moves when a token is presented would tell a canary from a revoked credential. The bound
//! counts a trigger from when it is admitted, so that concurrent presentations make one event, but
//! a trigger whose event is not written after all gives its place back. Events are written on
//! tasks of their own, retried through a store outage (`jobs::Backoff`), at most
//! [`MAX_PENDING_WRITES`] at once and [`MAX_PENDING_WRITES_PER_TENANT`] of one organization's; a
//! trigger past either is logged (at error level) and not recorded.
//!
//! With `--tenant-rate-limit-per-minute`, an organization's trigger events are held to that many
//! a minute too (a budget of their own, beside its management requests': presenting a leaked
//! canary must not lock its organization out of its own API). A trigger past it is not written on
//! its own but counted: every audit refusal window, one `credential.canary_triggered` per
//! organization (actor `system`, `reason` `tenant_rate_limit`) carries how many were left out
//! (`count`) and which canaries (`canary_ids`), so no trigger goes unseen.

use crate::jobs::{Backoff, Jobs, TenantShares};
use crate::ratelimit::TenantRateLimiter;
use axum::extract::MatchedPath;
use axum::http::request::Parts;
use keyplane_core::audit::{actions, ActorType, AuditActor, DetailValue};
use keyplane_core::{AuditEvent, Credential, CredentialId, RequestContext, TenantId};
use keyplane_store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One event per canary per client address within this long.
pub const TRIGGER_WINDOW: Duration = Duration::from_secs(60);
/// Events per canary within [`TRIGGER_WINDOW`], whatever the addresses.
pub const MAX_TRIGGERS_PER_WINDOW: usize = 20;
/// Canaries tracked at once; more (only real canaries, which take management writes to create)
/// are recorded but not bounded until the oldest windows end.
const MAX_TRACKED: usize = 10_000;
/// Trigger events being written at once; past it a trigger is dropped (and logged).
const MAX_PENDING_WRITES: usize = 256;
/// Of those, one organization's at most: presenting its own canaries in a flood while the store
/// is slow, a tenant cannot take the slots another's alarms need.
const MAX_PENDING_WRITES_PER_TENANT: usize = 64;

/// Canaries a left-out summary names at most (its `count` still counts every trigger).
const MAX_NAMED_PER_SUMMARY: usize = 20;
/// Organizations with left-out triggers kept at once until the next summary; past it a left-out
/// trigger is only logged.
const MAX_SUMMARIES: usize = 10_000;

/// Where a canary can be presented: the `surface` detail of its trigger event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanarySurface {
    /// The Aether or Hybridbox management API (the route says which).
    ManagementApi,
    ForwardAuth,
    Whoami,
    /// As the bearer credential of an introspection call.
    IntrospectionCaller,
    /// As the `token` an introspection call asks about: presented by the resource server that
    /// calls introspection, so the event's address is that server's.
    IntrospectedToken,
    RegistryToken,
    GithubSecretScanning,
    PublicRevoke,
    /// The web console: a token pasted to sign in, or a session's token re-verified.
    Console,
    /// As the bearer credential of `GET /v1/revocations/stream`.
    RevocationStream,
    /// `App::verify_secret`, without HTTP.
    InProcess,
}

impl CanarySurface {
    pub fn as_str(self) -> &'static str {
        match self {
            CanarySurface::ManagementApi => "management_api",
            CanarySurface::ForwardAuth => "forward_auth",
            CanarySurface::Whoami => "whoami",
            CanarySurface::IntrospectionCaller => "introspection_caller",
            CanarySurface::IntrospectedToken => "introspected_token",
            CanarySurface::RegistryToken => "registry_token",
            CanarySurface::GithubSecretScanning => "github_secret_scanning",
            CanarySurface::PublicRevoke => "public_revoke",
            CanarySurface::Console => "console",
            CanarySurface::RevocationStream => "revocation_stream",
            CanarySurface::InProcess => "in_process",
        }
    }
}

/// Where a canary was presented, as its trigger event records it.
pub struct Presentation {
    pub surface: CanarySurface,
    /// The method and matched route (`GET /v1/auth/forward`); empty without HTTP.
    pub route: String,
    /// Request id, client address (through trusted proxies) and user agent.
    pub context: RequestContext,
    /// More details, by surface (leak reports: where it was found).
    pub details: Vec<(&'static str, String)>,
    /// The introspection caller that asked about the canary: named in the event only when it is
    /// of the canary's organization (another's ids are none of its business).
    introspected_by: Option<(keyplane_core::TenantId, CredentialId)>,
    /// The address that presented the secret to authenticate itself, for the failed-authentication
    /// limit (`failed_auth`); `None` when no request's own authentication is at stake.
    pub(crate) client: Option<crate::client_addr::ClientAddr>,
    /// The trigger event's id when the presentation can happen again as the same one (a stored
    /// leak report worked off twice): the store writes an event id once.
    event_id: Option<uuid::Uuid>,
}

impl Presentation {
    pub fn new(surface: CanarySurface, route: String, context: RequestContext) -> Self {
        Self {
            surface,
            route,
            context,
            details: Vec::new(),
            introspected_by: None,
            client: None,
            event_id: None,
        }
    }

    /// A request of `route` from `origin` that authenticates with the secret it presents.
    pub(crate) fn of_request(
        surface: CanarySurface,
        route: String,
        headers: &axum::http::HeaderMap,
        origin: &crate::request_id::Origin,
    ) -> Self {
        Self {
            client: origin.client,
            ..Self::new(
                surface,
                route,
                crate::audit::request_context_of(headers, origin),
            )
        }
    }

    /// A request as its parts tell it: method, matched route, request context.
    pub(crate) fn of_parts(surface: CanarySurface, parts: &Parts) -> Self {
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str);
        let origin = crate::request_id::Origin::of(&parts.extensions);
        Self::of_route(surface, route, parts, &origin)
    }

    /// A request of `route` from `origin`, given for one served without the router (no
    /// `MatchedPath` to read, the origin an argument rather than extensions).
    pub(crate) fn of_route(
        surface: CanarySurface,
        route: &str,
        parts: &Parts,
        origin: &crate::request_id::Origin,
    ) -> Self {
        Self::of_request(
            surface,
            format!("{} {route}", parts.method),
            &parts.headers,
            origin,
        )
    }

    pub fn detail(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.details.push((key, value.into()));
        self
    }

    /// Its trigger event is to have this id (a UUIDv7 made for this presentation, the same each
    /// time it is made again): a presentation recorded already is not recorded a second time.
    pub(crate) fn event_id(mut self, id: uuid::Uuid) -> Self {
        self.event_id = Some(id);
        self
    }

    /// An introspected token: the request is the introspection caller's, not the presenter's.
    pub(crate) fn introspected_by(mut self, caller: &keyplane_core::CredentialIdentity) -> Self {
        self.introspected_by = Some((caller.tenant_id, caller.id));
        self.detail("client", "introspection_caller")
    }
}

/// Describes the request a secret came with; called only for a canary.
pub type Presented<'a> = &'a (dyn Fn() -> Presentation + Sync);

/// One admitted trigger of a canary: from which address, when (monotonic), and which admission
/// (so that one not recorded after all can give its place back).
struct Seen {
    address: Option<String>,
    at: Instant,
    admission: u64,
}

/// The recent triggers of one canary.
#[derive(Default)]
struct Recent(Vec<Seen>);

type RecentTriggers = Arc<Mutex<HashMap<CredentialId, Recent>>>;

/// A trigger the bound admitted: its event, and its place in the bound, given back when this is
/// dropped before [`CanaryAlarm::record`] wrote the event.
pub(crate) struct Trigger {
    event: AuditEvent,
    place: Option<Place>,
}

impl Trigger {
    /// Its event is written (or counted in a summary): its place in the bound is kept until
    /// its window ends.
    fn written(mut self) {
        if let Some(place) = &mut self.place {
            place.kept = true;
        }
    }
}

struct Place {
    recent: RecentTriggers,
    canary: CredentialId,
    admission: u64,
    kept: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(seen) = recent.get_mut(&self.canary) {
            seen.0.retain(|s| s.admission != self.admission);
        }
    }
}

/// Records canary triggers, within the bound.
pub(crate) struct CanaryAlarm {
    store: Arc<dyn Store>,
    clock: crate::config::Clock,
    recent: RecentTriggers,
    admissions: AtomicU64,
    writes: Jobs,
    /// Trigger events being written, per organization.
    writing: TenantShares,
    /// Each organization's trigger events per minute (`None`: no limit).
    budget: Option<TenantRateLimiter>,
    /// Triggers past an organization's budget, until the next summary.
    left_out: Mutex<HashMap<TenantId, LeftOut>>,
}

/// An organization's triggers left out of the trail since the last summary.
#[derive(Default)]
struct LeftOut {
    count: u64,
    canaries: Vec<CredentialId>,
}

impl LeftOut {
    /// `count` more triggers, of `canary` (named up to [`MAX_NAMED_PER_SUMMARY`]).
    fn add(&mut self, count: u64, canary: Option<CredentialId>) {
        self.count += count;
        if let Some(canary) = canary {
            if self.canaries.len() < MAX_NAMED_PER_SUMMARY && !self.canaries.contains(&canary) {
                self.canaries.push(canary);
            }
        }
    }
}

impl CanaryAlarm {
    /// `per_minute`: each organization's trigger events per minute (its
    /// `--tenant-rate-limit-per-minute`, a tenth of it at once); 0: no limit.
    pub(crate) fn new(store: Arc<dyn Store>, clock: crate::config::Clock, per_minute: u32) -> Self {
        Self {
            store,
            clock,
            recent: Arc::default(),
            admissions: AtomicU64::new(0),
            writes: Jobs::new(MAX_PENDING_WRITES, "canary trigger events"),
            writing: TenantShares::new(MAX_PENDING_WRITES_PER_TENANT),
            budget: TenantRateLimiter::new(per_minute, crate::ratelimit::tenant_burst(per_minute)),
            left_out: Mutex::default(),
        }
    }

    /// `trigger`, if its organization's budget allows its event; otherwise it is counted for the
    /// next summary ([`Self::flush_left_out`]) and keeps its place in the bound (the same address
    /// presenting again is not counted twice).
    fn within_budget(&self, trigger: Trigger) -> Option<Trigger> {
        let tenant = trigger.event.tenant_id;
        match &self.budget {
            Some(budget) if budget.check(tenant).is_err() => {}
            _ => return Some(trigger),
        }
        let canary = trigger
            .event
            .target
            .as_ref()
            .map(|t| CredentialId::from_uuid(t.id));
        let mut left_out = self.left_out.lock().unwrap_or_else(|p| p.into_inner());
        if left_out.len() >= MAX_SUMMARIES && !left_out.contains_key(&tenant) {
            tracing::error!(tenant.id = %tenant, credential.id = ?canary, "canary trigger not recorded: over its organization's rate limit, and too many organizations' summaries pending");
            return None;
        }
        left_out.entry(tenant).or_default().add(1, canary);
        drop(left_out);
        trigger.written();
        None
    }

    /// Writes one `credential.canary_triggered` per organization whose triggers its budget left
    /// out since the last call, with how many (`count`) and which canaries (`canary_ids`). What the
    /// store cannot take now waits for the next call, but on the `last`.
    pub(crate) async fn flush_left_out(&self, last: bool) {
        let drained: Vec<(TenantId, LeftOut)> = {
            let mut left_out = self.left_out.lock().unwrap_or_else(|p| p.into_inner());
            left_out.drain().collect()
        };
        let mut drained = drained.into_iter();
        while let Some((tenant, summary)) = drained.next() {
            let event = crate::ops::audit_event(
                tenant,
                actions::CREDENTIAL_CANARY_TRIGGERED,
                AuditActor::system(),
                &RequestContext::default(),
            )
            .denied()
            .text("surface", "(various)")
            .text("reason", "tenant_rate_limit")
            .detail("count", DetailValue::Count(summary.count))
            .list(
                "canary_ids",
                summary.canaries.iter().map(|id| id.to_string()),
            );
            match self.store.append_audit_event(&event).await {
                Ok(()) => {}
                Err(StoreError::Unavailable(unavailable)) if !last => {
                    // The store is away: these wait for the next call, with what came meanwhile.
                    let mut left_out = self.left_out.lock().unwrap_or_else(|p| p.into_inner());
                    for (tenant, summary) in std::iter::once((tenant, summary)).chain(drained) {
                        let kept = left_out.entry(tenant).or_default();
                        for canary in summary.canaries {
                            kept.add(0, Some(canary));
                        }
                        kept.add(summary.count, None);
                    }
                    tracing::warn!(error = %unavailable, "canary triggers over their organizations' rate limits wait for the store");
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, tenant.id = %tenant, count = summary.count, "canary triggers over the organization's rate limit could not be recorded");
                }
            }
        }
    }

    /// The trigger for `canary` presented as `presentation` says, or `None` when the bound leaves
    /// it out. It takes its place in the bound until dropped unrecorded.
    pub(crate) fn admit(
        &self,
        canary: &Credential,
        presentation: Presentation,
        actor: AuditActor,
    ) -> Option<Trigger> {
        let now = self.clock.monotonic();
        let in_window = |seen: &Seen| now.saturating_duration_since(seen.at) < TRIGGER_WINDOW;
        let address = presentation.context.client_ip.clone();
        let place = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() >= MAX_TRACKED && !recent.contains_key(&canary.id) {
                recent.retain(|_, seen| seen.0.iter().any(in_window));
            }
            let seen = if recent.len() < MAX_TRACKED {
                Some(recent.entry(canary.id).or_default())
            } else {
                recent.get_mut(&canary.id)
            };
            match seen {
                Some(seen) => {
                    seen.0.retain(in_window);
                    if seen.0.len() >= MAX_TRIGGERS_PER_WINDOW
                        || seen.0.iter().any(|s| s.address == address)
                    {
                        tracing::debug!(tenant.id = %canary.tenant_id, credential.id = %canary.id, "canary presented again within the bound: not recorded");
                        return None;
                    }
                    let admission = self.admissions.fetch_add(1, Ordering::Relaxed);
                    seen.0.push(Seen {
                        address,
                        at: now,
                        admission,
                    });
                    Some(Place {
                        recent: self.recent.clone(),
                        canary: canary.id,
                        admission,
                        kept: false,
                    })
                }
                None => None,
            }
        };
        tracing::warn!(tenant.id = %canary.tenant_id, credential.id = %canary.id, credential.kind = canary.kind.as_str(), canary.surface = presentation.surface.as_str(), http.route = %presentation.route, "canary credential presented");
        let mut event = crate::ops::credential_event(
            actions::CREDENTIAL_CANARY_TRIGGERED,
            actor,
            &presentation.context,
            canary,
        )
        .denied()
        .text("surface", presentation.surface.as_str());
        if let Some(id) = presentation.event_id {
            event.id = id;
        }
        if !presentation.route.is_empty() {
            event = event.text("route", presentation.route);
        }
        for (key, value) in presentation.details {
            event = event.text(key, value);
        }
        if let Some((tenant, caller)) = presentation.introspected_by {
            event = event.text(
                "introspected_by",
                if tenant == canary.tenant_id {
                    caller.to_string()
                } else {
                    "another organization".to_string()
                },
            );
        }
        Some(Trigger { event, place })
    }

    /// Writes `trigger`'s event; on an error it gives its place in the bound back, so that a
    /// retry (or the next presentation) is admitted again.
    pub(crate) async fn record(&self, trigger: Trigger) -> Result<(), StoreError> {
        let Some(trigger) = self.within_budget(trigger) else {
            return Ok(());
        };
        self.store.append_audit_event(&trigger.event).await?;
        trigger.written();
        Ok(())
    }

    /// A canary presented to a verification path: the event is written at once, on its own task,
    /// so that the answer (and its timing) is a revoked credential's.
    pub(crate) fn presented(&self, canary: &Credential, presentation: Presentation) {
        let actor = AuditActor {
            actor_type: ActorType::of_credential(canary.kind),
            id: Some(canary.id.as_uuid()),
            issuer: None,
            subject: None,
        };
        let Some(trigger) = self
            .admit(canary, presentation, actor)
            .and_then(|trigger| self.within_budget(trigger))
        else {
            return;
        };
        let Some(share) = self.writing.take(canary.tenant_id) else {
            tracing::error!(tenant.id = %canary.tenant_id, credential.id = %canary.id, "canary trigger not recorded: too many of its organization's trigger events being written");
            return;
        };
        let Some(permit) = self.writes.try_start() else {
            tracing::error!(tenant.id = %canary.tenant_id, credential.id = %canary.id, "canary trigger not recorded: too many trigger events being written");
            return;
        };
        let store = self.store.clone();
        let backoff = self.writes.backoff();
        tokio::spawn(async move {
            let _held = (permit, share);
            record_through_outage(store.as_ref(), trigger, backoff).await;
        });
    }

    /// Waits (at most `limit`) for trigger events being written: `serve` calls it before the
    /// store is closed.
    pub(crate) async fn drain(&self, limit: Duration) {
        self.writes.drain(limit).await;
        // The triggers left out of the trail are in memory only too: their summary is written
        // now, not left to the audit tasks' last pass, which the stop's deadline may abort.
        self.flush_left_out(true).await;
    }

    /// Forgets organizations whose trigger budgets are full again, so memory stays bounded.
    pub(crate) fn prune(&self) {
        if let Some(budget) = &self.budget {
            budget.prune();
        }
    }
}

/// Writes a trigger's event, retrying a transient store fault with [`crate::jobs::Backoff`]; its
/// place in the bound is held meanwhile (the same address presenting again adds nothing), and
/// given back if the event is not written after all.
async fn record_through_outage(store: &dyn Store, trigger: Trigger, mut backoff: Backoff) {
    // Named in every line: an on-call engineer must be able to tell which alarm was lost (this
    // runs on a task of its own, outside the request's span).
    let event = &trigger.event;
    let tenant = event.tenant_id;
    let credential = event.target.as_ref().map(|target| target.id.to_string());
    let request = event.context.request_id.as_deref();
    loop {
        match store.append_audit_event(event).await {
            Ok(()) => return trigger.written(),
            Err(StoreError::Unavailable(unavailable)) => {
                if backoff.is_first() {
                    tracing::warn!(error = %unavailable, tenant.id = %tenant, credential.id = credential, request.id = request, "a canary trigger waits for the store; retrying until it is back");
                }
                if !backoff.wait(unavailable.fault).await {
                    tracing::error!(error = %unavailable, tenant.id = %tenant, credential.id = credential, request.id = request, "canary trigger could not be recorded: the store stayed unavailable");
                    return;
                }
            }
            Err(error) => {
                tracing::error!(%error, tenant.id = %tenant, credential.id = credential, request.id = request, "canary trigger could not be recorded");
                return;
            }
        }
    }
}
