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
//! that moves when a token is presented would tell a canary from a revoked credential. Events are
//! written on tasks of their own, at most [`MAX_PENDING_WRITES`] at once and
//! [`MAX_PENDING_WRITES_PER_TENANT`] of one organization's; a trigger past either is logged (at
//! error level) and not recorded.

use crate::jobs::{Jobs, TenantShares};
use axum::extract::MatchedPath;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use keyplane_core::audit::{actions, ActorType, AuditActor};
use keyplane_core::{AuditEvent, Credential, CredentialId, RequestContext};
use keyplane_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

impl Presentation {
    pub fn new(surface: CanarySurface, route: String, context: RequestContext) -> Self {
        Self {
            surface,
            route,
            context,
            details: Vec::new(),
            introspected_by: None,
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
        Self::new(
            surface,
            format!("{} {route}", parts.method),
            crate::audit::request_context_of(&parts.headers, origin),
        )
    }

    pub fn detail(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.details.push((key, value.into()));
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

/// The recent triggers of one canary: which addresses, when.
#[derive(Default)]
struct Recent(Vec<(Option<String>, DateTime<Utc>)>);

/// Records canary triggers, within the bound.
pub(crate) struct CanaryAlarm {
    store: Arc<dyn Store>,
    clock: crate::config::Clock,
    recent: Mutex<HashMap<CredentialId, Recent>>,
    writes: Jobs,
    /// Trigger events being written, per organization.
    writing: TenantShares,
}

impl CanaryAlarm {
    pub(crate) fn new(store: Arc<dyn Store>, clock: crate::config::Clock) -> Self {
        Self {
            store,
            clock,
            recent: Mutex::new(HashMap::new()),
            writes: Jobs::new(MAX_PENDING_WRITES, "canary trigger events"),
            writing: TenantShares::new(MAX_PENDING_WRITES_PER_TENANT),
        }
    }

    /// The trigger event for `canary` presented as `presentation` says, or `None` when the bound
    /// leaves it out.
    pub(crate) fn admit(
        &self,
        canary: &Credential,
        presentation: Presentation,
        actor: AuditActor,
    ) -> Option<AuditEvent> {
        let now = self.clock.now();
        let window = chrono::TimeDelta::from_std(TRIGGER_WINDOW).unwrap_or(chrono::TimeDelta::MAX);
        let address = presentation.context.client_ip.clone();
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() >= MAX_TRACKED && !recent.contains_key(&canary.id) {
                recent.retain(|_, seen| seen.0.iter().any(|(_, at)| now - *at < window));
            }
            let seen = if recent.len() < MAX_TRACKED {
                Some(recent.entry(canary.id).or_default())
            } else {
                recent.get_mut(&canary.id)
            };
            if let Some(seen) = seen {
                seen.0.retain(|(_, at)| now - *at < window);
                if seen.0.len() >= MAX_TRIGGERS_PER_WINDOW
                    || seen.0.iter().any(|(seen_from, _)| *seen_from == address)
                {
                    tracing::debug!(tenant.id = %canary.tenant_id, credential.id = %canary.id, "canary presented again within the bound: not recorded");
                    return None;
                }
                seen.0.push((address, now));
            }
        }
        tracing::warn!(tenant.id = %canary.tenant_id, credential.id = %canary.id, credential.kind = canary.kind.as_str(), canary.surface = presentation.surface.as_str(), http.route = %presentation.route, "canary credential presented");
        let mut event = crate::ops::credential_event(
            actions::CREDENTIAL_CANARY_TRIGGERED,
            actor,
            &presentation.context,
            canary,
        )
        .denied()
        .text("surface", presentation.surface.as_str());
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
        Some(event)
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
        let Some(event) = self.admit(canary, presentation, actor) else {
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
        tokio::spawn(async move {
            let _held = (permit, share);
            if let Err(error) = store.append_audit_event(&event).await {
                tracing::error!(%error, tenant.id = %event.tenant_id, "canary trigger could not be recorded");
            }
        });
    }

    /// Waits (at most `limit`) for trigger events being written: `serve` calls it before the
    /// store is closed.
    pub(crate) async fn drain(&self, limit: Duration) {
        self.writes.drain(limit).await;
    }
}
