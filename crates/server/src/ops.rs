//! Use cases: one async function each, shared by every surface and the CLI. Each one authorizes,
//! makes the core decision and calls the store; none knows about HTTP.

use crate::app::App;
use crate::error::AppError;
use chrono::{DateTime, Utc};
use keyplane_core::audit::{actions, credential_action, AuditActor, CredentialChange, DetailValue};
use keyplane_core::error::codes;
use keyplane_core::grant::rights_from_grants;
use keyplane_core::registry::{self, RegistryAction};
use keyplane_core::{
    AuditEvent, Capability, Credential, CredentialId, CredentialKind, Error as DomainError,
    FieldError, FieldPath, Grant, GrantId, NewCredential, NewGrant, Plaintext, Principal, Registry,
    RequestContext, RobotPermission, Rotation, ScopeSet, SubjectType, Tenant, TenantId, UserId,
};
use keyplane_core::{CreatedBy, CredentialPolicy, Operator, RotationOptions};
use keyplane_store::{ExpiryWindow, GrantFilter, KeptAnswer, ListCredentials, Store, StoreError};
use rand::rngs::OsRng;

mod org_revocation;
pub use org_revocation::{
    revoke_organization, OrgRevocation, RevokeOrgSpec, REVOKE_ORG_PAGE, REVOKE_ORG_VIA,
};

/// The cursor of the page after a full `page` (its last row's id, or whatever `id` reads from
/// it); `None` after a short one, the last.
fn cursor_after<T, C>(page: &[T], page_rows: u32, id: impl Fn(&T) -> C) -> Option<C> {
    if page.len() < page_rows as usize {
        return None;
    }
    page.last().map(id)
}

/// The clock, at the precision both stores keep.
pub fn now() -> DateTime<Utc> {
    keyplane_core::validate::now_micros(0)
}

/// The one place audit events of changes are started: a time-ordered id, the clock, the action,
/// who acted and the request it came with.
pub(crate) fn audit_event(
    tenant: TenantId,
    action: &str,
    actor: AuditActor,
    context: &RequestContext,
) -> AuditEvent {
    AuditEvent::new(
        uuid::Uuid::now_v7(),
        tenant,
        now(),
        action,
        actor,
        context.clone(),
    )
}

/// A credential as an event's target, with what identifies it without its secret.
pub(crate) fn credential_event(
    action: &str,
    actor: AuditActor,
    context: &RequestContext,
    credential: &Credential,
) -> AuditEvent {
    let mut event = audit_event(credential.tenant_id, action, actor, context)
        .target(
            credential.kind.as_str(),
            credential.id.as_uuid(),
            Some(&credential.name),
        )
        .text("display_prefix", credential.display.prefix.clone());
    match credential.kind {
        CredentialKind::RobotAccount => {
            event = event.list(
                "permissions",
                credential.permissions.iter().map(RobotPermission::to_wire),
            )
        }
        _ => event = event.list("scopes", credential.scopes.to_strings()),
    }
    if let Some(expires_at) = credential.expires_at {
        event = event.text(
            "expires_at",
            keyplane_core::audit::canonical_time(expires_at),
        );
    }
    event
}

/// A new organization's events: the organization, then its first token (an `api_token.created`
/// like any other, so that whoever follows tokens, by action or by `target_id`, hears of it); both
/// name the `operator` of an admin command.
fn organization_created(
    created: &OrgCreated,
    via: &str,
    operator: Option<&Operator>,
) -> [AuditEvent; 2] {
    let organization = tenant_created_event(&created.tenant, via)
        .text(
            "api_token_id",
            created.token.credential.id.as_uuid().to_string(),
        )
        .text(
            "display_prefix",
            created.token.credential.display.prefix.clone(),
        )
        .list("scopes", created.token.credential.scopes.to_strings());
    let token = credential_event(
        actions::API_TOKEN_CREATED,
        AuditActor::system(),
        &RequestContext::default(),
        &created.token.credential,
    )
    .text("via", via);
    match operator {
        Some(operator) => [
            organization.operated_by(operator),
            token.operated_by(operator),
        ],
        None => [organization, token],
    }
}

fn grant_event(
    action: &str,
    actor: AuditActor,
    context: &RequestContext,
    grant: &Grant,
) -> AuditEvent {
    let mut event = audit_event(grant.tenant_id, action, actor, context)
        .target("authorization", grant.id.as_uuid(), None)
        .text("grant_kind", grant.kind.as_str())
        .text("subject_type", grant.subject_type.as_str())
        .text("subject_id", grant.subject_id.to_string());
    if let Some(key) = &grant.capability_key {
        event = event.text("capability_key", key.as_str());
    }
    if let Some(resource_type) = &grant.resource.resource_type {
        event = event.text("resource_type", resource_type.clone());
    }
    if let Some(resource_id) = &grant.resource.resource_id {
        event = event.text("resource_id", resource_id.clone());
    }
    event
}

/// The events of the grants a service account's revocation revokes with it: by the same actor,
/// in the same request.
pub(crate) fn grants_revoked_with(
    actor: AuditActor,
    context: &RequestContext,
) -> impl Fn(&Grant) -> AuditEvent + Send + Sync + '_ {
    move |grant| {
        grant_event(
            actions::AUTHORIZATION_REVOKED,
            actor.clone(),
            context,
            grant,
        )
    }
}

/// The event of one batch of a bulk import: `count` credentials of `kind` into `tenant`, by the
/// operator (`via`: the command; `operator`: who ran it, when known), with the kind's own action.
pub fn import_event(
    tenant: TenantId,
    kind: CredentialKind,
    count: u64,
    via: &str,
    operator: Option<&Operator>,
) -> AuditEvent {
    let event = audit_event(
        tenant,
        credential_action(kind, CredentialChange::Imported),
        AuditActor::system(),
        &RequestContext::default(),
    )
    .text("kind", kind.as_str())
    .text("via", via)
    .detail("count", keyplane_core::audit::DetailValue::Count(count));
    match operator {
        Some(operator) => event.operated_by(operator),
        None => event,
    }
}

/// The events of a registry signing-key change (`action`), one per organization with a registry:
/// the operator's act (`via`: the command, or `serve` for the key made on first use; `operator`:
/// who ran the command), naming the keys. `forced`: a retirement's `--force`.
pub fn signing_key_event(
    action: &'static str,
    via: &'static str,
    forced: Option<bool>,
    operator: Option<&Operator>,
) -> impl Fn(&keyplane_store::SigningKeyChange) -> AuditEvent + Send + Sync {
    let operator = operator.cloned();
    move |change| {
        let mut event = audit_event(
            change.tenant_id,
            action,
            AuditActor::system(),
            &RequestContext::default(),
        )
        .target("registry", change.registry_id, Some(&change.project))
        .text("via", via)
        .text("key_id", change.key_id.clone());
        if let Some(previous) = &change.previous_key_id {
            event = event.text("previous_key_id", previous.clone());
        }
        if let Some(forced) = forced {
            event = event.text("forced", forced.to_string());
        }
        match &operator {
            Some(operator) => event.operated_by(operator),
            None => event,
        }
    }
}

/// The `audit.pruned` event retention appends to each chain it prunes, in the same transaction:
/// it vouches for the anchor the pruning left (`through_seq`, `through_chain_hash`), so that
/// `admin audit verify`, the export and webhooks tell pruning from deletion.
pub fn audit_pruned(
    cutoff: DateTime<Utc>,
    retention_days: u32,
) -> impl Fn(&keyplane_store::PrunedPrefix) -> AuditEvent + Send + Sync {
    move |pruned| {
        audit_event(
            pruned.tenant_id,
            actions::AUDIT_PRUNED,
            AuditActor::system(),
            &RequestContext::default(),
        )
        .target("organization", pruned.tenant_id.as_uuid(), None)
        .detail("through_seq", DetailValue::Count(pruned.through_seq))
        .text(
            "through_chain_hash",
            keyplane_core::audit::hash_hex(&pruned.through_chain_hash),
        )
        .text("cutoff", keyplane_core::audit::canonical_time(cutoff))
        .detail(
            "retention_days",
            DetailValue::Count(u64::from(retention_days)),
        )
        .detail("count", DetailValue::Count(pruned.count))
    }
}

/// A credential and its plaintext secret, which the caller shows exactly once.
pub struct Issued {
    pub credential: Credential,
    pub secret: Plaintext,
}

impl Issued {
    /// The record the store wrote, with `secret`: what an idempotent answer is made of. The copy
    /// of the secret lives only as long as the answer being sealed.
    fn as_stored(credential: &Credential, secret: &Plaintext) -> Self {
        Self {
            credential: credential.clone(),
            secret: Plaintext::received(secret.expose_secret().to_owned()),
        }
    }
}

/// Seals the answer of a request made with an `Idempotency-Key` from what its change stored (a
/// `T` the use case builds of the record the store hands [`keyplane_store::AnswerOf`], inside the
/// change's transaction), so that the store keeps it with the change: made by
/// [`crate::idempotency`], handed down to the store by the create and rotate use cases. `None`
/// without a key.
pub type Answer<'a, T> = Option<&'a AnswerSeal<T>>;

/// What an [`Answer`] calls: renders what a change made and seals it (or, from the console, seals
/// the new secret for the session to show).
pub type AnswerSeal<T> = dyn Fn(T) -> Result<KeptAnswer, StoreError> + Send + Sync;

/// A new tenant and its first `*`-scoped API token.
pub struct OrgCreated {
    pub tenant: Tenant,
    pub token: Issued,
}

/// Mints a tenant and its first `*` token without storing them; `created_by` the system, `via`
/// an admin command or the bootstrap.
pub fn mint_first_org(name: &str, created_by: CreatedBy) -> Result<OrgCreated, AppError> {
    Ok(with_first_token(
        mint_tenant(TenantId::new(), name)?,
        created_by,
    ))
}

/// `tenant` and its first `*` token (named `bootstrap`), minted, not stored.
fn with_first_token(tenant: Tenant, created_by: CreatedBy) -> OrgCreated {
    let now = tenant.created_at;
    let (credential, secret) = NewCredential {
        tenant_id: tenant.id,
        kind: CredentialKind::ApiToken,
        name: "bootstrap".into(),
        scopes: ScopeSet::wildcard(),
        permissions: Vec::new(),
        expires_at: None,
        created_by,
        canary: false,
    }
    .issue(now, &mut OsRng);
    OrgCreated {
        tenant,
        token: Issued { credential, secret },
    }
}

/// A tenant and a `*` token, in one transaction, recorded as `admin create-org` run by
/// `operator`, without the command's checks of the name ([`create_organization`] is the
/// command's): what tests build their organizations with.
pub async fn create_org(
    store: &dyn Store,
    name: &str,
    operator: &Operator,
) -> Result<OrgCreated, AppError> {
    let created = mint_first_org(name, CreatedBy::operator(operator))?;
    // Without the name check, nothing but an error keeps it from being created.
    store
        .create_tenant(&keyplane_store::NewTenant {
            tenant: &created.tenant,
            credential: Some(&created.token.credential),
            events: &organization_created(&created, "admin create-org", Some(operator)),
            unique_name: false,
        })
        .await?;
    Ok(created)
}

/// Who the unit tests' organizations are created by.
#[cfg(test)]
pub(crate) fn tests_operator() -> Operator {
    Operator {
        os_user: "test".into(),
        name: None,
    }
}

/// `serve` on an empty store: stores `created` (from [`mint_first_org`]) if and only if this store
/// was never bootstrapped and holds no tenant. Returns whether it did.
pub async fn bootstrap(store: &dyn Store, created: &OrgCreated) -> Result<bool, AppError> {
    Ok(store
        .bootstrap_once(
            &created.tenant,
            &created.token.credential,
            &organization_created(created, "bootstrap", None),
        )
        .await?)
}

/// What a caller asks for when creating a credential, validated by the surface.
pub struct CredentialSpec {
    pub name: String,
    pub scopes: ScopeSet,
    /// Robot accounts only.
    pub permissions: Vec<keyplane_core::RobotPermission>,
    pub expires_at: Option<DateTime<Utc>>,
    /// A canary ([`crate::canary`]): its scopes, permissions or later grants are kept and shown
    /// (a believable bait) but never honoured, since it never authenticates.
    pub canary: bool,
}

/// The capabilities that read and write one kind of credential.
#[derive(Clone, Copy)]
pub struct KindRights {
    pub kind: CredentialKind,
    pub read: Capability,
    pub write: Capability,
}

pub const API_TOKENS: KindRights = KindRights {
    kind: CredentialKind::ApiToken,
    read: Capability::ApiTokensRead,
    write: Capability::ApiTokensWrite,
};

/// Service accounts are managed with `auth.manage`, as Hybridbox documents.
pub const SERVICE_ACCOUNTS: KindRights = KindRights {
    kind: CredentialKind::ServiceAccount,
    read: Capability::AuthManage,
    write: Capability::AuthManage,
};

/// What a credential may do in its tenant: an API token holds its scopes; a service account holds
/// what its live grants confer, and nothing without one.
pub async fn rights_of(store: &dyn Store, credential: &Credential) -> Result<ScopeSet, AppError> {
    match credential.kind {
        CredentialKind::ApiToken => Ok(credential.scopes.clone()),
        CredentialKind::ServiceAccount => Ok(rights_from_grants(
            &live_grants_of_service_account(store, credential).await?,
        )),
        CredentialKind::RobotAccount => Ok(ScopeSet::empty()),
    }
}

async fn live_grants_of_service_account(
    store: &dyn Store,
    credential: &Credential,
) -> Result<Vec<Grant>, AppError> {
    Ok(store
        .list_grants(&GrantFilter::live_for(
            credential.tenant_id,
            SubjectType::ServiceAccount,
            credential.id.as_uuid(),
        ))
        .await?)
}

/// What a user may do: in each tenant where it holds live grants, what they confer.
pub async fn rights_of_user(
    store: &dyn Store,
    user: UserId,
) -> Result<Vec<(TenantId, ScopeSet)>, AppError> {
    let grants = store
        .list_grants_of_subject(SubjectType::User, user.as_uuid())
        .await?;
    // The store sorts by tenant: each run of one tenant id is that tenant's grants.
    Ok(grants
        .chunk_by(|a, b| a.tenant_id == b.tenant_id)
        .map(|run| (run[0].tenant_id, rights_from_grants(run)))
        .collect())
}

/// Robots are registry credentials: read with `registry:read`, managed with `registry:write`.
pub const ROBOTS: KindRights = KindRights {
    kind: CredentialKind::RobotAccount,
    read: Capability::RegistryRead,
    write: Capability::RegistryWrite,
};

/// What a caller must hold to rotate `credential` (rotation hands its secret on): an API token's
/// scopes; every right a service account's live grants stand for, narrowed ones included.
async fn rights_to_hand_on(
    store: &dyn Store,
    credential: &Credential,
) -> Result<ScopeSet, AppError> {
    match credential.kind {
        CredentialKind::ServiceAccount => Ok(keyplane_core::grant::rights_to_hand_on(
            &live_grants_of_service_account(store, credential).await?,
        )),
        _ => rights_of(store, credential).await,
    }
}

/// `error`, logged when it is the refusal of a create past `serve --max-live-credentials-per-org`
/// (the organization's client sees a 409; the operator learns who is at the limit).
fn noted_live_limit(error: StoreError, tenant: TenantId, kind: CredentialKind) -> StoreError {
    if let StoreError::LiveCredentialLimit { limit } = &error {
        tracing::info!(tenant.id = %tenant, credential.kind = kind.as_str(), limit, "create refused: the organization is at its live credential limit");
    }
    error
}

fn conflict_on_name(error: StoreError, kind: CredentialKind) -> AppError {
    match error {
        StoreError::Conflict(_) => DomainError::Conflict(format!(
            "a live {} with this name already exists",
            kind.as_str().replace('_', " ")
        ))
        .into(),
        other => other.into(),
    }
}

pub async fn create_credential(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    spec: CredentialSpec,
    answer: Answer<'_, Issued>,
) -> Result<Issued, AppError> {
    who.require(tenant, rights.write)?;
    who.may_delegate(tenant, &spec.scopes)?;
    let issued_at = now();
    let expires_at = credential_policy(app.store().as_ref(), tenant)
        .await?
        .expiry_for(
            rights.kind,
            spec.expires_at,
            app.now(),
            FieldPath::body("expires_at"),
        )
        .map_err(DomainError::from)?;
    let (credential, secret) = NewCredential {
        tenant_id: tenant,
        kind: rights.kind,
        name: spec.name,
        scopes: spec.scopes,
        permissions: spec.permissions,
        expires_at,
        created_by: CreatedBy::new(&AuditActor::of(who), who.channel()),
        canary: spec.canary,
    }
    .issue(issued_at, &mut OsRng);
    // A canary's creation reads as any other's: `audit:read` (and a webhook receiver) must not
    // learn which credentials are bait; only the kind's write right shows it (views).
    let event = credential_event(
        credential_action(rights.kind, CredentialChange::Created),
        AuditActor::of(who),
        context,
        &credential,
    );
    let seal =
        answer.map(|answer| |stored: &Credential| answer(Issued::as_stored(stored, &secret)));
    app.store()
        .insert_credential_within_limit(
            &credential,
            app.inner().config.max_live_credentials_per_org,
            &event,
            seal.as_ref().map(|s| s as _),
        )
        .await
        .map_err(|e| conflict_on_name(noted_live_limit(e, tenant, rights.kind), rights.kind))?;
    tracing::info!(tenant.id = %tenant, credential.id = %credential.id, credential.kind = rights.kind.as_str(), principal.id = %who.id(), "credential created");
    Ok(Issued { credential, secret })
}

/// Which credentials of a kind a list shows; the default is every live one.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListSpec {
    /// Only those created after this one (a page cursor).
    pub after: Option<CredentialId>,
    /// At most this many; `None`: all.
    pub limit: Option<u32>,
    pub include_revoked: bool,
    /// Only live ones that have not expired and expire within this many days.
    pub expiring_within_days: Option<u32>,
}

/// One page of credentials, and the cursor of the next page if there is one.
pub async fn list_credentials(
    app: &App,
    who: &Principal,
    tenant: TenantId,
    rights: KindRights,
    spec: ListSpec,
) -> Result<(Vec<Credential>, Option<CredentialId>), AppError> {
    who.require(tenant, rights.read)?;
    let now = app.now();
    let include_canaries = sees_canaries(who, tenant, rights);
    let mut page = app
        .store()
        .list_credentials(&ListCredentials {
            tenant_id: tenant,
            kind: rights.kind,
            after: spec.after,
            limit: spec.limit.map(|l| l + 1),
            include_revoked: spec.include_revoked,
            expiring: spec.expiring_within_days.map(|days| ExpiryWindow {
                after: now,
                until: now + chrono::TimeDelta::days(i64::from(days)),
            }),
            include_canaries,
        })
        .await?;
    let next = cut_page(&mut page, spec.limit, |c| c.id);
    Ok((page.into_iter().map(|c| c.as_of(now)).collect(), next))
}

/// Cuts a page read with one row more than `limit` back to `limit`; if there was more, the cursor
/// of the next page (the id of its last row).
fn cut_page<T, C>(page: &mut Vec<T>, limit: Option<u32>, id: impl Fn(&T) -> C) -> Option<C> {
    let limit = limit? as usize;
    if page.len() <= limit {
        return None;
    }
    page.truncate(limit);
    page.last().map(id)
}

/// Canaries are shown only to callers who hold the kind's write right (who could have made
/// them); to others they do not exist.
fn sees_canaries(who: &Principal, tenant: TenantId, rights: KindRights) -> bool {
    who.rights_in(tenant)
        .is_some_and(|held| held.grants(rights.write))
}

/// A live credential; revoked ones, and canaries for callers without the kind's write right, are
/// `NotFound` here.
pub async fn get_live_credential(
    app: &App,
    who: &Principal,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
) -> Result<Credential, AppError> {
    who.require(tenant, rights.read)?;
    let sees_canaries = sees_canaries(who, tenant, rights);
    app.store()
        .get_credential(tenant, rights.kind, id)
        .await?
        .filter(|c| !c.is_revoked() && (sees_canaries || !c.canary))
        .map(|c| c.as_of(app.now()))
        .ok_or(DomainError::NotFound.into())
}

/// What a rotation asks for besides the new secret.
#[derive(Debug, Clone, Copy, Default)]
pub struct RotateSpec {
    pub options: RotationOptions,
    /// A new expiry; `None`: the credential keeps its own.
    pub expires_at: Option<DateTime<Utc>>,
}

/// New secret, same id. The old secret stops working at once, or after the grace period `spec`
/// asks for (and an earlier previous secret ends at once: at most two live secrets). Rotating
/// hands out the new secret, so the caller must hold every scope of the credential it rotates.
/// The expiry it ends up with must fit the tenant's credential policy (422 otherwise). Of
/// concurrent rotations exactly one succeeds (the store swaps the secret only if it is still the
/// one read here); the others, and rotations of revoked or expired credentials, are `Conflict`: a
/// secret that does not work is never handed out. A suspended credential may be rotated (and stays
/// suspended): the usual answer to a suspected leak.
#[allow(clippy::too_many_arguments)] // who rotates what, how, and where its answer goes
pub async fn rotate_credential(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
    spec: RotateSpec,
    answer: Answer<'_, Issued>,
) -> Result<Issued, AppError> {
    rotate(app, who, context, tenant, rights, id, spec, answer, || {
        DomainError::Conflict("the credential is revoked".into())
    })
    .await
}

/// [`rotate_credential`] where a revoked credential is `NotFound`: to an Aether client, a deleted
/// resource is gone. Races and expiry are still `Conflict`.
#[allow(clippy::too_many_arguments)] // who rotates what, how, and where its answer goes
pub async fn rotate_live_credential(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
    spec: RotateSpec,
    answer: Answer<'_, Issued>,
) -> Result<Issued, AppError> {
    rotate(app, who, context, tenant, rights, id, spec, answer, || {
        DomainError::NotFound
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn rotate(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
    spec: RotateSpec,
    answer: Answer<'_, Issued>,
    revoked: fn() -> DomainError,
) -> Result<Issued, AppError> {
    who.require(tenant, rights.write)?;
    let current = app
        .store()
        .get_credential(tenant, rights.kind, id)
        .await?
        .ok_or(DomainError::NotFound)?;
    let now = app.now();
    // Each on its own, not through `usable_at`'s first reason: a suspended credential that has
    // expired is expired all the same.
    if current.is_revoked() {
        return Err(revoked().into());
    }
    if current.has_expired(now) {
        return Err(
            DomainError::Conflict("the credential has expired: create a new one".into()).into(),
        );
    }
    if current.canary {
        return Err(DomainError::Conflict(CANARY_IS_FIXED.into()).into());
    }
    who.may_delegate(
        tenant,
        &rights_to_hand_on(app.store().as_ref(), &current).await?,
    )?;
    let policy = credential_policy(app.store().as_ref(), tenant).await?;
    let requested = spec.expires_at.or(current.expires_at);
    // A rotation keeps the credential's own expiry, none included: the policy's default lifetime
    // is for creates, unless the policy requires credentials to expire.
    let expires_at = if requested.is_none() && !policy.requires_expiry(rights.kind) {
        None
    } else {
        policy
            .expiry_for(rights.kind, requested, now, FieldPath::body("expires_at"))
            .map_err(DomainError::from)?
    };
    let (rotation, secret) = Rotation::mint(&current, spec.options, expires_at, now, &mut OsRng);
    let mut event = credential_event(
        credential_action(rights.kind, CredentialChange::Rotated),
        AuditActor::of(who),
        context,
        &current,
    )
    .text("old_display_prefix", current.display.prefix.clone())
    .text("display_prefix", rotation.display.prefix.clone())
    .detail(
        "grace_seconds",
        DetailValue::Count(u64::from(spec.options.grace_seconds)),
    );
    if let Some(previous) = &rotation.previous {
        event = event.text(
            "previous_secret_expires_at",
            keyplane_core::audit::canonical_time(previous.expires_at),
        );
        if let Some(seconds) = previous.retire_when_unused_seconds {
            event = event.detail(
                "retire_when_unused_seconds",
                DetailValue::Count(u64::from(seconds)),
            );
        }
    }
    if current.live_previous_secret(now).is_some() {
        // The secret before the one replaced now stops at once.
        event = event.text("earlier_previous_secret", "ended");
    }
    if expires_at != current.expires_at {
        event = event.text(
            "new_expires_at",
            expires_at.map_or("none".into(), keyplane_core::audit::canonical_time),
        );
    }
    // The answer shows the row as the rotation left it (another request may have changed what it
    // shows, `last_used_at` or a suspension, since `current` was read).
    let seal =
        answer.map(|answer| |rotated: &Credential| answer(Issued::as_stored(rotated, &secret)));
    let credential = app
        .store()
        .rotate_credential(
            tenant,
            rights.kind,
            id,
            &current.secret_hash,
            &rotation,
            &event,
            seal.as_ref().map(|s| s as _),
        )
        .await?;
    app.invalidate(tenant, id.as_uuid());
    tracing::info!(tenant.id = %tenant, credential.id = %id, principal.id = %who.id(), grace_seconds = spec.options.grace_seconds, "credential rotated");
    Ok(Issued { credential, secret })
}

/// A canary's secret and state never change (no rotation, no suspension): what was planted stays
/// what triggers, until it is revoked.
const CANARY_IS_FIXED: &str =
    "a canary credential cannot be rotated, suspended or resumed: revoke it and create a new one";

/// What managing `target` (revoking, suspending, resuming, retiring its previous secret) needs:
/// the kind's write right and every right the credential holds, so an `api_tokens:write` token
/// cannot take down the org's `*` token.
async fn require_manage(
    app: &App,
    who: &Principal,
    tenant: TenantId,
    rights: KindRights,
    target: &Credential,
) -> Result<(), AppError> {
    who.require(tenant, rights.write)?;
    let needed = rights_to_hand_on(app.store().as_ref(), target).await?;
    Ok(who.may_manage(tenant, &needed)?)
}

/// The live credential a suspend, resume or retire-previous acts on, once the caller may manage it
/// ([`require_manage`]); a revoked one answers `revoked()`.
async fn live_target(
    app: &App,
    who: &Principal,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
    revoked: fn() -> DomainError,
) -> Result<Credential, AppError> {
    who.require(tenant, rights.write)?;
    let target = app
        .store()
        .get_credential(tenant, rights.kind, id)
        .await?
        .ok_or(DomainError::NotFound)?;
    if target.is_revoked() {
        return Err(revoked().into());
    }
    require_manage(app, who, tenant, rights, &target).await?;
    Ok(target)
}

/// Suspends (`suspend`) or resumes a credential: reversible, unlike revocation. A suspended
/// credential authenticates nowhere but keeps its id, grants and secret. Repeating either is a
/// no-op that records nothing. A revoked credential answers `revoked()`.
#[allow(clippy::too_many_arguments)]
pub async fn set_suspended(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
    suspend: bool,
    revoked: fn() -> DomainError,
) -> Result<Credential, AppError> {
    let target = live_target(app, who, tenant, rights, id, revoked).await?;
    if target.canary {
        return Err(DomainError::Conflict(CANARY_IS_FIXED.into()).into());
    }
    let change = if suspend {
        CredentialChange::Suspended
    } else {
        CredentialChange::Resumed
    };
    let at = now();
    let event = credential_event(
        credential_action(rights.kind, change),
        AuditActor::of(who),
        context,
        &target,
    );
    let (credential, changed) = app
        .store()
        .set_credential_suspended(
            tenant,
            rights.kind,
            id,
            suspend.then_some(at),
            at,
            &event,
            None,
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => AppError::from(revoked()),
            other => other.into(),
        })?;
    app.invalidate(tenant, id.as_uuid());
    if changed {
        tracing::info!(tenant.id = %tenant, credential.id = %id, principal.id = %who.id(), suspended = suspend, "credential suspension changed");
    }
    Ok(credential.as_of(app.now()))
}

/// Ends the previous secret of a rotation with a grace period now. Without one (none was kept,
/// or it ended) the record is returned unchanged and nothing is recorded.
pub async fn retire_previous_secret(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
    revoked: fn() -> DomainError,
) -> Result<Credential, AppError> {
    let target = live_target(app, who, tenant, rights, id, revoked).await?;
    let Some(previous) = target.live_previous_secret(app.now()).cloned() else {
        return Ok(target.as_of(app.now()));
    };
    let event = previous_retired_event(&target, "on_demand", AuditActor::of(who), context);
    let retired = app
        .store()
        .retire_previous_secret(tenant, rights.kind, id, &previous.hash, now(), &event)
        .await?;
    app.invalidate(tenant, id.as_uuid());
    match retired {
        Some(credential) => Ok(credential),
        // A rotation or another retirement came first: show what is there now.
        None => Ok(app
            .store()
            .get_credential(tenant, rights.kind, id)
            .await?
            .ok_or(DomainError::NotFound)?
            .as_of(app.now())),
    }
}

fn previous_retired_event(
    credential: &Credential,
    reason: &str,
    actor: AuditActor,
    context: &RequestContext,
) -> AuditEvent {
    let mut event = credential_event(
        credential_action(credential.kind, CredentialChange::PreviousSecretRetired),
        actor,
        context,
        credential,
    )
    .text("reason", reason);
    if let Some(previous) = &credential.previous_secret {
        event = event.text(
            "previous_secret_expires_at",
            keyplane_core::audit::canonical_time(previous.expires_at),
        );
        if let Some(used) = previous.last_used_at {
            event = event.text(
                "previous_secret_last_used_at",
                keyplane_core::audit::canonical_time(used),
            );
        }
    }
    event
}

/// The tenant's credential policy; the empty policy (no rules, leaks revoke) when none was set.
pub async fn credential_policy(
    store: &dyn Store,
    tenant: TenantId,
) -> Result<CredentialPolicy, AppError> {
    Ok(store
        .get_credential_policy(tenant)
        .await?
        .map(|(policy, _)| policy)
        .unwrap_or_default())
}

/// The policy, when it was set (`None`: never), and how many live credentials of each kind break
/// it now.
pub struct PolicyReport {
    pub policy: CredentialPolicy,
    pub updated_at: Option<DateTime<Utc>>,
    pub exceeding: Vec<(CredentialKind, u64)>,
}

pub async fn get_credential_policy(
    app: &App,
    who: &Principal,
    tenant: TenantId,
) -> Result<PolicyReport, AppError> {
    who.require_owner(tenant)?;
    policy_report(app, tenant).await
}

async fn policy_report(app: &App, tenant: TenantId) -> Result<PolicyReport, AppError> {
    let (policy, updated_at) = match app.store().get_credential_policy(tenant).await? {
        Some((policy, at)) => (policy, Some(at)),
        None => (CredentialPolicy::default(), None),
    };
    let now = app.now();
    let mut exceeding = Vec::with_capacity(CredentialKind::ALL.len());
    for kind in CredentialKind::ALL {
        let (rule, _) = policy.rule_for(kind);
        let count = if rule.is_empty() {
            0
        } else {
            app.store()
                .count_credentials_exceeding(tenant, kind, rule, now)
                .await?
        };
        exceeding.push((kind, count));
    }
    Ok(PolicyReport {
        policy,
        updated_at,
        exceeding,
    })
}

/// `policy` as an event's details, each name after `prefix` (`old_`: the values replaced).
fn policy_details(mut event: AuditEvent, prefix: &str, policy: &CredentialPolicy) -> AuditEvent {
    let rule_text = |rule: &keyplane_core::LifetimeRule| {
        format!(
            "max_lifetime_days={} require_expiry={} default_lifetime_days={}",
            rule.max_lifetime_days
                .map_or("none".into(), |d| d.to_string()),
            rule.require_expiry,
            rule.default_lifetime_days
                .map_or("none".into(), |d| d.to_string()),
        )
    };
    event = event
        .text(&format!("{prefix}all"), rule_text(&policy.all))
        .text(&format!("{prefix}on_leak"), policy.on_leak.as_str());
    for (key, rule) in [
        ("api_tokens", &policy.api_tokens),
        ("service_accounts", &policy.service_accounts),
        ("robot_accounts", &policy.robot_accounts),
    ] {
        if let Some(rule) = rule {
            event = event.text(&format!("{prefix}{key}"), rule_text(rule));
        }
    }
    event
}

/// Replaces the tenant's policy. Existing credentials are not changed; the answer counts those
/// that break the new policy. Setting the policy in force again changes nothing and records
/// nothing (like a repeated revoke): a client retrying a PUT whose answer it lost (a 503 after the
/// commit, a dropped connection) gets the same answer without a second event.
pub async fn put_credential_policy(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    policy: CredentialPolicy,
) -> Result<PolicyReport, AppError> {
    who.require_owner(tenant)?;
    // Read before the write, not in its transaction (the store offers no read-and-replace): a
    // concurrent change by another owner in between (recorded by its own event) is not among
    // this event's old values.
    let stored = app.store().get_credential_policy(tenant).await?;
    // Not in a transaction either: a read that found this policy in force is as if this PUT had
    // been applied then. A policy never set is set (its `updated_at` says since when).
    if stored.as_ref().is_some_and(|(stored, _)| *stored == policy) {
        return policy_report(app, tenant).await;
    }
    let before = stored.map(|(policy, _)| policy).unwrap_or_default();
    let event = audit_event(
        tenant,
        actions::CREDENTIAL_POLICY_UPDATED,
        AuditActor::of(who),
        context,
    )
    .target("credential_policy", tenant.as_uuid(), None);
    let event = policy_details(event, "", &policy);
    let event = policy_details(event, "old_", &before);
    app.store()
        .put_credential_policy(tenant, &policy, now(), &event)
        .await?;
    tracing::info!(tenant.id = %tenant, principal.id = %who.id(), "credential policy updated");
    policy_report(app, tenant).await
}

/// Where the usage-aware cutover's sweep continues: the last candidate it read, as
/// `(previous secret's expires_at, id)`; `None` starts from the soonest-ending. Per replica.
#[derive(Default)]
pub(crate) struct RetirementCursor(std::sync::Mutex<Option<(DateTime<Utc>, CredentialId)>>);

impl RetirementCursor {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(DateTime<Utc>, CredentialId)>> {
        // A poisoned cursor is still a valid position: at worst the sweep rereads a page.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Most credentials one sweep step reads at once.
const SWEEP_BATCH: u32 = 500;
/// Batches per stage and sweep: a bound, so that a sweep always ends; the next one continues.
const SWEEP_MAX_BATCHES: usize = 20;

/// The lifecycle sweep, run by every replica (each step is a compare-and-set, so replicas never
/// repeat each other's work): forgets previous secrets whose grace ended, retires unused ones
/// (usage-aware cutover), and announces expiries: `credential.expiring` 30, 7 and 1 days before
/// `expires_at` and `credential.expired` after it, each once per credential and stage. Each step
/// is held while this replica's clock is not known to be within the error it tolerates
/// (`clock_check::ClockJob`): the grace ends, the cutover and `credential.expired` by seconds, the
/// 30/7/1-day warnings by an hour.
pub async fn lifecycle_sweep(app: &App) -> Result<(), AppError> {
    lifecycle_sweep_in_pages(app, SWEEP_BATCH).await
}

/// [`lifecycle_sweep`] reading at most `page` credentials at once: tests make it small.
#[doc(hidden)]
pub async fn lifecycle_sweep_in_pages(app: &App, page: u32) -> Result<(), AppError> {
    use crate::clock_check::ClockJob;
    // Every step below cuts by this replica's clock, for every tenant and for good: each asks
    // whether the clock is close enough for it, by one measurement.
    let clock = &app.inner().clock_check;
    clock.measure(app).await;
    let store = app.store().as_ref();
    let now = app.now();
    if clock.allows_now(app, ClockJob::GracePeriodEnd) {
        end_grace_periods(store, now).await?;
    }
    if clock.allows_now(app, ClockJob::UnusedSecretCutover) {
        retire_unused_previous_secrets(app, page, now).await?;
    }
    if clock.allows_now(app, ClockJob::ExpiringNotice) {
        // Seconds decide only whether a credential that ended lately has: one that ended more
        // than the warnings' tolerance ago has by any clock within it.
        let expired_before = if clock.allows_now(app, ClockJob::ExpiredNotice) {
            now
        } else {
            let tolerance = chrono::TimeDelta::from_std(clock.tolerance(ClockJob::ExpiringNotice))
                .unwrap_or(chrono::TimeDelta::MAX);
            now.checked_sub_signed(tolerance)
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        announce_expiries(app, page, now, expired_before).await?;
    }
    Ok(())
}

/// Forgets the previous secrets whose grace ended by `now`.
async fn end_grace_periods(store: &dyn Store, now: DateTime<Utc>) -> Result<(), AppError> {
    // The soonest-ending previous secret tells whether any has ended. Only reads when there is
    // nothing to do: a replica on a read-only store stays healthy.
    let soonest = store.credentials_with_previous_secret(1).await?;
    let any_ended = soonest.iter().any(|c| {
        c.previous_secret
            .as_ref()
            .is_some_and(|p| p.expires_at <= now)
    });
    if any_ended {
        store.clear_ended_previous_secrets(now).await?;
    }
    Ok(())
}

/// The usage-aware cutover: a page of candidates at a time, from where the last sweep stopped.
async fn retire_unused_previous_secrets(
    app: &App,
    page: u32,
    now: DateTime<Utc>,
) -> Result<(), AppError> {
    let store = app.store().as_ref();
    // Candidates stay after a look that does not retire them (still in use, or not yet unused
    // long enough), so this pages with a cursor, up to the same bound as each expiry stage, and
    // the next sweep continues after the last one read, starting over once it reached the end:
    // candidates ending sooner (another tenant's, possibly many) cannot keep the later ones
    // from ever being looked at.
    // This replica's uses not yet written would otherwise look like quiet (a flush with nothing
    // queued writes nothing).
    app.flush_usage().await;
    let mut after = *app.inner().retirement_cursor.lock();
    for _ in 0..SWEEP_MAX_BATCHES {
        let candidates = store
            .credentials_retiring_previous_when_unused(after, page)
            .await?;
        for candidate in &candidates {
            retire_if_unused(app, candidate, now).await?;
        }
        after = cursor_after(&candidates, page, |last| {
            let previous = last.previous_secret.as_ref()?;
            Some((previous.expires_at, last.id))
        })
        .flatten();
        *app.inner().retirement_cursor.lock() = after;
        if after.is_none() {
            break;
        }
    }
    Ok(())
}

/// `credential.expiring` and `credential.expired` where due by `now`; `credential.expired` only
/// for credentials that ended by `expired_before` (the others wait for a clock close enough).
async fn announce_expiries(
    app: &App,
    page: u32,
    now: DateTime<Utc>,
    expired_before: DateTime<Utc>,
) -> Result<(), AppError> {
    let store = app.store().as_ref();
    // Nearest stage first, so a credential past several thresholds at once is announced only at
    // the nearest one. Each is announced at the stage it has reached, not the one whose query
    // found it: a credential created while another sweep is between stages is found at a further
    // stage than its own.
    for stage in
        std::iter::once(0).chain(keyplane_core::policy::EXPIRY_WARNING_DAYS.into_iter().rev())
    {
        let due_before = if stage == 0 {
            expired_before
        } else {
            now + chrono::TimeDelta::days(i64::from(stage))
        };
        for _ in 0..SWEEP_MAX_BATCHES {
            let due = store
                .credentials_due_for_expiry_notice(stage, due_before, page)
                .await?;
            let mut announced = 0;
            for credential in &due {
                let reached = credential
                    .expires_at
                    .and_then(|at| keyplane_core::policy::expiry_stage(at, now))
                    .map_or(stage, |reached| reached.min(stage));
                // Ended, but too lately for this clock to tell: left for the expired notice.
                if reached == 0 && credential.expires_at.is_some_and(|at| at > expired_before) {
                    continue;
                }
                let action = if reached == 0 {
                    actions::CREDENTIAL_EXPIRED
                } else {
                    actions::CREDENTIAL_EXPIRING
                };
                let mut event = credential_event(
                    action,
                    AuditActor::system(),
                    &RequestContext::default(),
                    credential,
                )
                .text("kind", credential.kind.as_str());
                if reached > 0 {
                    event = event.detail("days_before", DetailValue::Count(u64::from(reached)));
                }
                if store
                    .record_expiry_notice(credential, reached, &event)
                    .await?
                {
                    announced += 1;
                }
            }
            if due.len() < page as usize || announced == 0 {
                break;
            }
        }
    }
    Ok(())
}

/// How long ago the cutover judges quiet as of. Other replicas write their uses up to one flush
/// interval late, and date them by their own clocks, which may be up to `--max-clock-skew-seconds`
/// behind this one's and still count as agreeing (the cutover runs on each): a use held back, or
/// dated that far in the past, must not count as quiet.
fn cutover_lag(config: &crate::Config) -> std::time::Duration {
    config
        .last_used_flush_interval
        .saturating_add(config.max_clock_skew)
}

/// The usage-aware cutover of one candidate: retires its previous secret if it has gone unused.
async fn retire_if_unused(
    app: &App,
    candidate: &Credential,
    now: DateTime<Utc>,
) -> Result<(), AppError> {
    let lag = chrono::TimeDelta::from_std(cutover_lag(&app.inner().config))
        .unwrap_or(chrono::TimeDelta::MAX);
    let (Some(previous), true) = (
        candidate.previous_secret.as_ref(),
        now.checked_sub_signed(lag)
            .is_some_and(|then| candidate.previous_secret_unused(then)),
    ) else {
        return Ok(());
    };
    let event = previous_retired_event(
        candidate,
        "unused",
        AuditActor::system(),
        &RequestContext::default(),
    );
    let retired = app
        .store()
        .retire_previous_secret(
            candidate.tenant_id,
            candidate.kind,
            candidate.id,
            &previous.hash,
            now,
            &event,
        )
        .await?;
    if retired.is_some() {
        app.invalidate(candidate.tenant_id, candidate.id.as_uuid());
        tracing::info!(tenant.id = %candidate.tenant_id, credential.id = %candidate.id, "previous secret retired: unused");
    }
    Ok(())
}

/// Revokes for good. Returns the record and whether this call revoked it (false: it already was).
pub async fn revoke_credential(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
) -> Result<(Credential, bool), AppError> {
    who.require(tenant, rights.write)?;
    let target = app
        .store()
        .get_credential(tenant, rights.kind, id)
        .await?
        .ok_or(DomainError::NotFound)?;
    if !target.is_revoked() {
        require_manage(app, who, tenant, rights, &target).await?;
    }
    let at = now();
    let event = credential_event(
        credential_action(rights.kind, CredentialChange::Revoked),
        AuditActor::of(who),
        context,
        &target,
    );
    let credential = app
        .store()
        .revoke_credential(
            tenant,
            rights.kind,
            id,
            at,
            who.user_id(),
            &event,
            &grants_revoked_with(AuditActor::of(who), context),
            None,
        )
        .await?;
    app.invalidate(tenant, id.as_uuid());
    let revoked_now = credential.revoked_at == Some(at);
    if revoked_now {
        tracing::info!(tenant.id = %tenant, credential.id = %id, principal.id = %who.id(), "credential revoked");
    }
    Ok((credential.as_of(app.now()), revoked_now))
}

/// Grants a right. Needs `auth.manage`, and the grantor must hold what it grants. A service-account
/// subject must be a live service account of the same tenant.
pub async fn create_grant(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    grant: NewGrant,
    answer: Answer<'_, Grant>,
) -> Result<Grant, AppError> {
    who.require(tenant, Capability::AuthManage)?;
    who.may_grant(tenant, &grant)?;
    check_grant_subject(app.store().as_ref(), tenant, &grant, app.now()).await?;
    let actor = AuditActor::of(who);
    let grant = grant.issue(tenant, now(), CreatedBy::new(&actor, who.channel()));
    let event = grant_event(actions::AUTHORIZATION_CREATED, actor, context, &grant);
    let seal = answer.map(|answer| move |stored: &Grant| answer(stored.clone()));
    app.store()
        .insert_grant(&grant, &event, seal.as_ref().map(|s| s as _))
        .await?;
    app.invalidate(tenant, grant.subject_id);
    tracing::info!(tenant.id = %tenant, grant.id = %grant.id, grant.kind = grant.kind.as_str(), principal.id = %who.id(), "grant created");
    Ok(grant)
}

/// A service-account subject must be a live service account of the grant's tenant. Users and groups
/// live at the identity provider: any id is accepted.
async fn check_grant_subject(
    store: &dyn Store,
    tenant: TenantId,
    grant: &NewGrant,
    now: DateTime<Utc>,
) -> Result<(), AppError> {
    if grant.subject_type != SubjectType::ServiceAccount {
        return Ok(());
    }
    let subject = store
        .get_credential(
            tenant,
            CredentialKind::ServiceAccount,
            CredentialId::from_uuid(grant.subject_id),
        )
        .await?;
    let Some(subject) = subject else {
        return Err(DomainError::from(FieldError::new(
            FieldPath::body("subject_id"),
            codes::NOT_FOUND,
            "no service account with this id in this account",
        ))
        .into());
    };
    // The store checks again under the account's row lock; this answers the common case clearly.
    if let Err(why) = subject.usable_at(now) {
        return Err(DomainError::Conflict(format!(
            "the service account is {}: it cannot receive a grant",
            why.as_str()
        ))
        .into());
    }
    Ok(())
}

/// `keyplane admin grant`: the platform operator, who works on the store directly and so has no
/// principal, gives a subject a right in a tenant (typically a first user `account_owner`, who can
/// then grant others through the API); `subject` is a user's OIDC issuer and `sub` when the
/// operator named it so. `NotFound` if the tenant does not exist. Other replicas on
/// PostgreSQL hear of it at once; a server on the same SQLite file within its cache lifetime.
pub async fn grant_as_operator(
    store: &dyn Store,
    tenant: TenantId,
    grant: NewGrant,
    subject: Option<(&str, &str)>,
    operator: &Operator,
) -> Result<Grant, AppError> {
    grant.check_shape().map_err(DomainError::from)?;
    store
        .get_tenant(tenant)
        .await?
        .ok_or(DomainError::NotFound)?;
    check_grant_subject(store, tenant, &grant, now()).await?;
    let grant = grant.issue(tenant, now(), CreatedBy::operator(operator));
    // The operator has no principal: the event says which command acted, who ran it, and for whom
    // by the issuer's own names (the user id is a hash of them).
    let mut event = grant_event(
        actions::AUTHORIZATION_CREATED,
        AuditActor::system(),
        &RequestContext::default(),
        &grant,
    )
    .text("via", "admin grant")
    .operated_by(operator);
    if let Some((issuer, sub)) = subject {
        event = event
            .text("subject_issuer", issuer)
            .text("subject_sub", sub);
    }
    store.insert_grant(&grant, &event, None).await?;
    tracing::info!(tenant.id = %tenant, grant.id = %grant.id, grant.kind = grant.kind.as_str(), "grant created by the operator");
    Ok(grant)
}

/// One page of the grants `filter` matches (at most `filter.limit`, after `filter.after`), and the
/// cursor of the next page if there is one.
pub async fn list_grants(
    app: &App,
    who: &Principal,
    filter: GrantFilter,
) -> Result<(Vec<Grant>, Option<GrantId>), AppError> {
    who.require(filter.tenant_id, Capability::AuthManage)?;
    let limit = filter.limit;
    let mut page = app
        .store()
        .list_grants(&GrantFilter {
            limit: limit.map(|l| l + 1),
            ..filter
        })
        .await?;
    let next = cut_page(&mut page, limit, |g| g.id);
    Ok((page, next))
}

/// Revokes a grant; idempotent. The subject loses the right on its next request.
pub async fn revoke_grant(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    id: GrantId,
) -> Result<Grant, AppError> {
    who.require(tenant, Capability::AuthManage)?;
    // Like granting: only what the caller could have given itself.
    let existing = app
        .store()
        .get_grant(tenant, id)
        .await?
        .ok_or(DomainError::NotFound)?;
    who.may_delegate(
        tenant,
        &keyplane_core::grant::rights_to_hand_on(std::slice::from_ref(&existing)),
    )?;
    let event = grant_event(
        actions::AUTHORIZATION_REVOKED,
        AuditActor::of(who),
        context,
        &existing,
    );
    let grant = app.store().revoke_grant(tenant, id, now(), &event).await?;
    app.invalidate(tenant, grant.subject_id);
    tracing::info!(tenant.id = %tenant, grant.id = %id, principal.id = %who.id(), "grant revoked");
    Ok(grant)
}

/// The tenant's registry, if enabled.
pub async fn get_registry(
    app: &App,
    who: &Principal,
    tenant: TenantId,
) -> Result<Option<Registry>, AppError> {
    who.require(tenant, Capability::RegistryRead)?;
    Ok(app.store().get_registry(tenant).await?)
}

/// Enables the tenant's registry: its project (named after the organization) and a default robot
/// that may pull and push, whose secret the caller sees once. `Conflict` if already enabled.
pub async fn enable_registry(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    answer: Answer<'_, (Registry, Issued)>,
) -> Result<(Registry, Issued), AppError> {
    who.require(tenant, Capability::RegistryWrite)?;
    let store = app.store();
    if store.get_registry(tenant).await?.is_some() {
        return Err(DomainError::Conflict("the registry is already enabled".into()).into());
    }
    let org = store
        .get_tenant(tenant)
        .await?
        .ok_or(DomainError::NotFound)?;
    let base = registry::project_slug(&org.name).unwrap_or_else(|| "org".into());
    // Project names are global: a second "acme" gets a suffix, never the first one's repositories.
    let project = if store.project_taken(&base).await? {
        format!("{base}-{}", &tenant.as_uuid().simple().to_string()[..8])
    } else {
        base
    };
    let now = now();
    let mut registry = Registry {
        id: uuid::Uuid::now_v7(),
        tenant_id: tenant,
        project,
        quota_gb: -1,
        created_at: now,
        updated_at: now,
    };
    let (robot, secret) = NewCredential {
        tenant_id: tenant,
        kind: CredentialKind::RobotAccount,
        name: registry::DEFAULT_ROBOT_NAME.into(),
        scopes: ScopeSet::empty(),
        permissions: vec![
            RobotPermission {
                action: RegistryAction::Pull,
                repository: None,
            },
            RobotPermission {
                action: RegistryAction::Push,
                repository: None,
            },
        ],
        expires_at: {
            // No caller chooses its expiry (the request has no body): the policy's default
            // lifetime, else the latest expiry the policy allows, so that a policy bounding
            // lifetimes without a default does not make the registry impossible to enable.
            let policy = credential_policy(store.as_ref(), tenant).await?;
            let at = app.now();
            let kind = CredentialKind::RobotAccount;
            policy
                .expiry_for(
                    kind,
                    policy.unrequested_expiry(kind, at),
                    at,
                    FieldPath::body("expires_at"),
                )
                .map_err(DomainError::from)?
        },
        created_by: CreatedBy::new(&AuditActor::of(who), who.channel()),
        canary: false,
    }
    .issue(now, &mut OsRng);
    let event = |registry: &Registry| {
        audit_event(
            tenant,
            actions::REGISTRY_ENABLED,
            AuditActor::of(who),
            context,
        )
        .target("registry", registry.id, Some(&registry.project))
        .text("default_robot_id", robot.id.as_uuid().to_string())
        .list(
            "default_robot_permissions",
            robot.permissions.iter().map(RobotPermission::to_wire),
        )
    };
    // The default robot is a robot account like any other: its own `robot_account.created`, so
    // that whoever follows robots, by action or by `target_id`, hears of it.
    let robot_created = credential_event(
        actions::ROBOT_ACCOUNT_CREATED,
        AuditActor::of(who),
        context,
        &robot,
    );
    let events = |registry: &Registry| [event(registry), robot_created.clone()];
    let seal = answer.map(|answer| {
        |stored: &Registry| answer((stored.clone(), Issued::as_stored(&robot, &secret)))
    });
    let seal = seal.as_ref().map(|s| s as _);
    let max_live = app.inner().config.max_live_credentials_per_org;
    let robot_kind = CredentialKind::RobotAccount;
    match store
        .create_registry(&registry, &robot, max_live, &events(&registry), seal)
        .await
        .map_err(|e| noted_live_limit(e, tenant, robot_kind))
    {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            // Lost a race: either this tenant just enabled it, or another took the project name.
            if store.get_registry(tenant).await?.is_some() {
                return Err(DomainError::Conflict("the registry is already enabled".into()).into());
            }
            registry.project = format!(
                "{}-{}",
                registry.project,
                &tenant.as_uuid().simple().to_string()[..8]
            );
            store
                .create_registry(&registry, &robot, max_live, &events(&registry), seal)
                .await
                .map_err(|e| noted_live_limit(e, tenant, robot_kind))?;
        }
        // Anything else stored nothing: answering 201 would hand out a password that never works.
        Err(other) => return Err(other.into()),
    }
    tracing::info!(tenant.id = %tenant, registry.project = %registry.project, principal.id = %who.id(), "registry enabled");
    Ok((
        registry,
        Issued {
            credential: robot,
            secret,
        },
    ))
}

async fn require_registry(app: &App, tenant: TenantId) -> Result<Registry, AppError> {
    app.store().get_registry(tenant).await?.ok_or_else(|| {
        DomainError::Conflict("the registry is not enabled: POST /registry first".into()).into()
    })
}

/// A robot in the tenant's registry project.
pub async fn create_robot(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    spec: CredentialSpec,
    answer: Answer<'_, Issued>,
) -> Result<Issued, AppError> {
    who.require(tenant, Capability::RegistryWrite)?;
    require_registry(app, tenant).await?;
    create_credential(app, who, context, tenant, ROBOTS, spec, answer).await
}

pub async fn update_robot_permissions(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    id: CredentialId,
    permissions: Vec<RobotPermission>,
) -> Result<Credential, AppError> {
    who.require(tenant, Capability::RegistryWrite)?;
    // Built from the robot as the store's write finds it under its row lock: a copy read before
    // could be a concurrent update's old value.
    let event = |current: &Credential| {
        audit_event(
            tenant,
            actions::ROBOT_ACCOUNT_PERMISSIONS_UPDATED,
            AuditActor::of(who),
            context,
        )
        .target(
            CredentialKind::RobotAccount.as_str(),
            id.as_uuid(),
            Some(&current.name),
        )
        .list(
            "old_permissions",
            current.permissions.iter().map(RobotPermission::to_wire),
        )
        .list(
            "permissions",
            permissions.iter().map(RobotPermission::to_wire),
        )
    };
    let robot = app
        .store()
        .update_robot_permissions(tenant, id, &permissions, now(), &event)
        .await?;
    app.invalidate(tenant, id.as_uuid());
    tracing::info!(tenant.id = %tenant, credential.id = %id, principal.id = %who.id(), "robot permissions changed");
    Ok(robot.as_of(app.now()))
}

/// One page of the tenant's audit events (newest first) and the cursor of the next page. Needs
/// `audit:read`.
pub async fn list_audit_events(
    app: &App,
    who: &Principal,
    mut query: keyplane_store::AuditQuery,
) -> Result<(Vec<keyplane_core::ChainedEvent>, Option<uuid::Uuid>), AppError> {
    who.require(query.tenant_id, Capability::AuditRead)?;
    let limit = query.limit;
    query.limit = limit + 1;
    let mut page = app.store().list_audit_events(&query).await?;
    let next = cut_page(&mut page, Some(limit), |e| e.event.id);
    // Forward pages continue from their last `seq`, which the caller has; a cursor pages back.
    let pages_back = matches!(query.order, keyplane_store::AuditOrder::NewestBefore(_));
    Ok((page, next.filter(|_| pages_back)))
}

// `keyplane admin restore-replay`: changes a restore from backup undid, made again. The CLI
// (crates/cli/src/restore_replay.rs) finds them in the exported trail; these make them.

/// What `admin restore-replay` does again to one target, from the lost event that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Revoked, rotated (the new secret went with the restore) or revoked on a leak.
    Revoke(CredentialKind),
    /// Suspended (not resumed since), or suspended on a leak.
    Suspend(CredentialKind),
    /// Its previous secret was retired before its grace period ended.
    RetirePrevious(CredentialKind),
    /// An authorization revoked.
    RevokeGrant,
}

/// What one [`replay_lost_change`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    /// Made now (in a dry run: would be made).
    Done,
    /// The store already is so: replayed by an earlier run, or changed again since the restore.
    Already,
    /// The target is not in the store: created after the backup, so gone with the restore.
    NotFound,
}

/// The `via` of every event `admin restore-replay` writes.
const RESTORE_REPLAY_VIA: &str = "admin restore-replay";

/// Makes `replay` again to `target` of `tenant`, through the store call the API's change uses (its
/// own transaction, its events, its webhooks and, on PostgreSQL, the notification to every replica),
/// as the operator's (`system`) act: each event names the lost event (`replayed_event_id`,
/// `replayed_action`), `via`, `reason` and who ran it. Idempotent: what the store already shows
/// writes nothing and answers [`Replayed::Already`]. With `dry_run` it only reads.
pub async fn replay_lost_change(
    store: &dyn Store,
    tenant: TenantId,
    target: uuid::Uuid,
    replay: Replay,
    lost: (uuid::Uuid, &str),
    operator: &Operator,
    dry_run: bool,
) -> Result<Replayed, AppError> {
    let (lost_id, lost_action) = lost;
    let reason = format!("{lost_action} {lost_id} was undone by a restore from backup");
    let stamp = |event: AuditEvent| {
        event
            .text("via", RESTORE_REPLAY_VIA)
            .text("reason", reason.as_str())
            .text("replayed_event_id", lost_id.to_string())
            .text("replayed_action", lost_action)
            .operated_by(operator)
    };
    let context = RequestContext::default();
    let kind = match replay {
        Replay::RevokeGrant => {
            let id = GrantId::from_uuid(target);
            let Some(grant) = store.get_grant(tenant, id).await? else {
                return Ok(Replayed::NotFound);
            };
            if grant.revoked_at.is_some() {
                return Ok(Replayed::Already);
            }
            if !dry_run {
                let event = stamp(grant_event(
                    actions::AUTHORIZATION_REVOKED,
                    AuditActor::system(),
                    &context,
                    &grant,
                ));
                let at = now();
                // Revoked meanwhile by someone else: theirs is the record.
                if store.revoke_grant(tenant, id, at, &event).await?.revoked_at != Some(at) {
                    return Ok(Replayed::Already);
                }
            }
            return Ok(Replayed::Done);
        }
        Replay::Revoke(kind) | Replay::Suspend(kind) | Replay::RetirePrevious(kind) => kind,
    };
    let id = CredentialId::from_uuid(target);
    let Some(credential) = store.get_credential(tenant, kind, id).await? else {
        return Ok(Replayed::NotFound);
    };
    if credential.is_revoked() {
        // Revocation is final: nothing short of it is left to make again either.
        return Ok(Replayed::Already);
    }
    let at = now();
    match replay {
        // (A grant was handled above.)
        Replay::Revoke(_) | Replay::RevokeGrant => {
            if !dry_run {
                let event = stamp(credential_event(
                    credential_action(kind, CredentialChange::Revoked),
                    AuditActor::system(),
                    &context,
                    &credential,
                ));
                let grant_revoked = |grant: &Grant| {
                    stamp(grant_event(
                        actions::AUTHORIZATION_REVOKED,
                        AuditActor::system(),
                        &context,
                        grant,
                    ))
                };
                let stored = store
                    .revoke_credential(tenant, kind, id, at, None, &event, &grant_revoked, None)
                    .await?;
                if stored.revoked_at != Some(at) {
                    return Ok(Replayed::Already);
                }
            }
        }
        Replay::Suspend(_) => {
            if credential.suspended_at.is_some() {
                return Ok(Replayed::Already);
            }
            if !dry_run {
                let event = stamp(credential_event(
                    credential_action(kind, CredentialChange::Suspended),
                    AuditActor::system(),
                    &context,
                    &credential,
                ));
                match store
                    .set_credential_suspended(tenant, kind, id, Some(at), at, &event, None)
                    .await
                {
                    Ok((_, true)) => {}
                    // Suspended or revoked by someone else meanwhile.
                    Ok((_, false)) | Err(StoreError::Conflict(_)) => return Ok(Replayed::Already),
                    Err(other) => return Err(other.into()),
                }
            }
        }
        Replay::RetirePrevious(_) => {
            let Some(previous) = credential.live_previous_secret(at).cloned() else {
                return Ok(Replayed::Already);
            };
            if !dry_run {
                let event = stamp(previous_retired_event(
                    &credential,
                    "restore_replay",
                    AuditActor::system(),
                    &context,
                ));
                let retired = store
                    .retire_previous_secret(tenant, kind, id, &previous.hash, at, &event)
                    .await?;
                if retired.is_none() {
                    return Ok(Replayed::Already);
                }
            }
        }
    }
    if !dry_run {
        tracing::info!(tenant.id = %tenant, credential.id = %id, replayed_event.id = %lost_id, "change undone by a restore made again");
    }
    Ok(Replayed::Done)
}

/// What one organization's replay found and did, for its `audit.restored` event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReplayed {
    pub lost_from_seq: u64,
    pub lost_through_seq: u64,
    /// The lost events at those two seqs: what tells a later run that this loss is recorded.
    pub lost_from_event_id: uuid::Uuid,
    pub lost_through_event_id: uuid::Uuid,
    pub lost_events: u64,
    pub revoked: u64,
    pub suspended: u64,
    pub retired: u64,
    pub already: u64,
    pub not_found: u64,
    /// Lost changes left to the operator (created, policy, webhook, signing-key, permissions).
    pub reported: u64,
}

/// Appends `audit.restored` to `tenant`'s trail: events `lost_from_seq..=lost_through_seq` of the
/// exported trail are not in the store (a restore from backup took them back), so seqs from
/// there on name other events than the exported ones; what was made again and left to review.
pub async fn record_restore_replayed(
    store: &dyn Store,
    tenant: TenantId,
    replayed: &RestoreReplayed,
    operator: &Operator,
) -> Result<(), AppError> {
    let count = |key: &str, n: u64| (key.to_owned(), DetailValue::Count(n));
    let mut event = audit_event(
        tenant,
        actions::AUDIT_RESTORED,
        AuditActor::system(),
        &RequestContext::default(),
    )
    .target("organization", tenant.as_uuid(), None)
    .text("via", RESTORE_REPLAY_VIA)
    .text(
        "lost_from_event_id",
        replayed.lost_from_event_id.to_string(),
    )
    .text(
        "lost_through_event_id",
        replayed.lost_through_event_id.to_string(),
    );
    for (key, value) in [
        count("lost_from_seq", replayed.lost_from_seq),
        count("lost_through_seq", replayed.lost_through_seq),
        count("lost_events", replayed.lost_events),
        count("revoked", replayed.revoked),
        count("suspended", replayed.suspended),
        count("retired", replayed.retired),
        count("already", replayed.already),
        count("not_found", replayed.not_found),
        count("reported", replayed.reported),
    ] {
        event = event.detail(&key, value);
    }
    store
        .append_audit_event(&event.operated_by(operator))
        .await?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Tenant administration: `keyplane admin create-org`, `list-orgs` and `issue-token`, the platform
// operator's acts on the store directly (no principal: actor `system`, with who ran the command).

/// A tenant with this id named `name` (validated as every name is), created now; not stored.
fn mint_tenant(id: TenantId, name: &str) -> Result<Tenant, AppError> {
    let name =
        keyplane_core::validate::name(FieldPath::body("name"), name).map_err(DomainError::from)?;
    Ok(Tenant {
        id,
        name,
        created_at: now(),
    })
}

/// The `organization.created` event of `tenant`, created `via` an admin command or the bootstrap.
fn tenant_created_event(tenant: &Tenant, via: &str) -> AuditEvent {
    audit_event(
        tenant.id,
        actions::ORGANIZATION_CREATED,
        AuditActor::system(),
        &RequestContext::default(),
    )
    .target("organization", tenant.id.as_uuid(), Some(&tenant.name))
    .text("via", via)
}

/// What `admin create-org` asks for.
pub struct OrgSpec<'a> {
    pub name: &'a str,
    /// Keep this id (an organization migrated from another system, whose clients name it in
    /// their URLs); `None`: a new random one.
    pub id: Option<TenantId>,
    /// Mint its first `*` token with it (`false`: `admin issue-token` issues one later).
    pub with_token: bool,
    /// Create it although an organization already has this name.
    pub allow_duplicate_name: bool,
}

/// What `admin create-org` created: the tenant, and its first `*` token unless it was asked for
/// none.
pub struct OrgMade {
    pub tenant: Tenant,
    pub token: Option<Issued>,
}

/// Why `admin create-org` created nothing.
#[derive(Debug, thiserror::Error)]
pub enum OrgRefused {
    /// An organization already has the name: its id.
    #[error("organization {0} is already named {1:?}")]
    NameTaken(TenantId, String),
    /// The id is an organization's already: its name.
    #[error("the id {0} is already organization {1:?}'s")]
    IdTaken(TenantId, String),
    #[error(transparent)]
    Failed(#[from] AppError),
}

impl From<StoreError> for OrgRefused {
    fn from(error: StoreError) -> Self {
        Self::Failed(error.into())
    }
}

/// `keyplane admin create-org`, run by `operator`: a tenant (with its first `*` token unless
/// `spec` says otherwise) and its events, in one transaction. Refuses an id already taken and,
/// unless allowed, a name a live organization already has: checked in the store's transaction, so
/// of two operators creating one name at once only one succeeds (names are not unique in the
/// schema: organizations named alike before this check existed stay valid).
pub async fn create_organization(
    store: &dyn Store,
    spec: &OrgSpec<'_>,
    operator: &Operator,
) -> Result<OrgMade, OrgRefused> {
    const VIA: &str = "admin create-org";
    let tenant = mint_tenant(spec.id.unwrap_or_default(), spec.name)?;
    // A deleted organization's id stays taken (its tombstone and trail keep it): say so.
    let id_taken = |taken: keyplane_store::TenantRecord| {
        let name = match taken.deleted_at {
            Some(at) => format!("{} (deleted {})", taken.tenant.name, at.to_rfc3339()),
            None => taken.tenant.name,
        };
        OrgRefused::IdTaken(taken.tenant.id, name)
    };
    if let Some(taken) = store.get_tenant_record(tenant.id).await? {
        return Err(id_taken(taken));
    }
    let (made, events) = if spec.with_token {
        let created = with_first_token(tenant, CreatedBy::operator(operator));
        let events = organization_created(&created, VIA, Some(operator)).to_vec();
        let made = OrgMade {
            tenant: created.tenant,
            token: Some(created.token),
        };
        (made, events)
    } else {
        let events = vec![tenant_created_event(&tenant, VIA).operated_by(operator)];
        let made = OrgMade {
            tenant,
            token: None,
        };
        (made, events)
    };
    let stored = store
        .create_tenant(&keyplane_store::NewTenant {
            tenant: &made.tenant,
            credential: made.token.as_ref().map(|token| &token.credential),
            events: &events,
            unique_name: !spec.allow_duplicate_name,
        })
        .await;
    match stored {
        Ok(keyplane_store::TenantCreated::Created) => {}
        Ok(keyplane_store::TenantCreated::NameTaken(same)) => {
            return Err(OrgRefused::NameTaken(same.id, same.name))
        }
        // The id was taken meanwhile (the only unique key a new tenant has, bar the token's
        // random secret).
        Err(StoreError::Conflict(_)) => match store.get_tenant_record(made.tenant.id).await? {
            Some(taken) => return Err(id_taken(taken)),
            None => return Err(StoreError::Conflict("the organization conflicts".into()).into()),
        },
        Err(other) => return Err(other.into()),
    }
    tracing::info!(tenant.id = %made.tenant.id, with_token = spec.with_token, "organization created by the operator");
    Ok(made)
}

/// `keyplane admin list-orgs`: a page of organizations in creation order (`after` the last one
/// of the previous page), only those named `name` when given (validated as names are, so trimmed
/// as they were when stored).
pub async fn list_organizations(
    store: &dyn Store,
    name: Option<&str>,
    after: Option<&Tenant>,
    limit: u32,
) -> Result<Vec<keyplane_store::TenantListing>, AppError> {
    let name = name
        .map(|raw| keyplane_core::validate::name(FieldPath::body("name"), raw))
        .transpose()
        .map_err(DomainError::from)?;
    Ok(store
        .list_tenants(&keyplane_store::TenantPage {
            name: name.as_deref(),
            after,
            limit,
        })
        .await?)
}

/// `keyplane admin issue-token`, run by `operator`: an API token in an existing organization, as
/// the API creates one (the same name and expiry rules, the organization's credential policy, its
/// `api_token.created` event with its webhook deliveries, in one transaction), but with no caller
/// whose scopes bound it: the way back into an organization that lost its last `*` token.
/// `NotFound` if the tenant does not exist.
pub async fn issue_token_as_operator(
    store: &dyn Store,
    tenant: TenantId,
    name: &str,
    scopes: ScopeSet,
    expires_at: Option<DateTime<Utc>>,
    operator: &Operator,
) -> Result<Issued, AppError> {
    store
        .get_tenant(tenant)
        .await?
        .ok_or(DomainError::NotFound)?;
    let name =
        keyplane_core::validate::name(FieldPath::body("name"), name).map_err(DomainError::from)?;
    let at = now();
    let path = || FieldPath::body("expires_at");
    let requested = expires_at
        .map(|expires_at| keyplane_core::validate::future_expiry(path(), expires_at, at))
        .transpose()
        .map_err(DomainError::from)?;
    let kind = CredentialKind::ApiToken;
    let expires_at = credential_policy(store, tenant)
        .await?
        .expiry_for(kind, requested, at, path())
        .map_err(DomainError::from)?;
    let (credential, secret) = NewCredential {
        tenant_id: tenant,
        kind,
        name,
        scopes,
        permissions: Vec::new(),
        expires_at,
        created_by: CreatedBy::operator(operator),
        canary: false,
    }
    .issue(at, &mut OsRng);
    let event = credential_event(
        actions::API_TOKEN_CREATED,
        AuditActor::system(),
        &RequestContext::default(),
        &credential,
    )
    .text("via", "admin issue-token")
    .operated_by(operator);
    store
        .insert_credential(&credential, &event, None)
        .await
        .map_err(|e| conflict_on_name(e, kind))?;
    tracing::info!(tenant.id = %tenant, credential.id = %credential.id, "API token issued by the operator");
    Ok(Issued { credential, secret })
}

/// What `keyplane admin delete-org` did (or, in a dry run, would do), phase by phase.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OrgDeletion {
    /// Phase 1: the credentials `revoke-org` revokes, and the canaries (the organization is
    /// gone, nothing is left to watch) and grants to users and groups it leaves.
    pub revoked: OrgRevocation,
    /// Phase 3: what the purge deleted (phase 2's webhooks included in `webhooks`), and the audit
    /// events kept.
    pub deleted: keyplane_store::TenantRows,
    /// The registry's project: its row stays, so the name stays taken; its storage is the
    /// operator's to delete.
    pub registry_project: Option<String>,
}

/// The `via` of every event `admin delete-org` writes.
pub const DELETE_ORG_VIA: &str = "admin delete-org";

/// `keyplane admin delete-org`: offboards `tenant` in three phases, each safe to run again. (1)
/// Revokes everything that grants access, each with what the API's revoke gives it (its event,
/// its webhook deliveries, and on PostgreSQL the NOTIFY that makes every replica refuse it at
/// once), a page of credentials a transaction, before any row disappears: [`revoke_organization`] with the canaries and the grants
/// to users and groups too. (2) Deletes every webhook through the
/// store's delete (its `webhook.deleted` event; pending deliveries dropped), so no later event
/// reaches the former customer. (3) [`Store::purge_tenant`]: deletes the rest and leaves a
/// tombstone, with `organization.deleted` as its trail's last event. With `dry_run` it only
/// counts. Progress is kept in `done`, also when it fails part way. `NotFound` for no live tenant.
pub async fn delete_organization(
    store: &dyn Store,
    tenant: TenantId,
    reason: &str,
    operator: &Operator,
    dry_run: bool,
    done: &mut OrgDeletion,
) -> Result<(), AppError> {
    let org = store
        .get_tenant(tenant)
        .await?
        .ok_or(DomainError::NotFound)?;
    let spec = RevokeOrgSpec {
        via: DELETE_ORG_VIA,
        reason,
        operator,
        dry_run,
        canaries: true,
        user_and_group_grants: true,
        page_rows: REVOKE_ORG_PAGE,
    };
    let context = RequestContext::default();
    revoke_organization(store, tenant, &spec, &mut done.revoked).await?;
    if !done.revoked.settled {
        return Err(DomainError::Conflict(
            "credentials or grants were still being created in the organization: run it again"
                .into(),
        )
        .into());
    }
    let mut webhooks = 0;
    for webhook in store.list_webhooks(tenant).await? {
        webhooks += 1;
        if dry_run {
            continue;
        }
        let event = spec.stamp(crate::webhooks::webhook_event(
            actions::WEBHOOK_DELETED,
            AuditActor::system(),
            &context,
            &webhook,
        ));
        match store.delete_webhook(tenant, webhook.id, &event).await {
            // Deleted meanwhile (an API call, another run): gone all the same.
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    done.registry_project = store.get_registry(tenant).await?.map(|r| r.project);
    if dry_run {
        done.deleted = store.count_tenant_rows(tenant).await?;
        return Ok(());
    }
    let phases = done.clone();
    let event_of = |rows: &keyplane_store::TenantRows| {
        organization_deleted(&org, &phases, webhooks, rows, &spec)
    };
    let purged = store
        .purge_tenant(tenant, now(), spec.page_rows, &event_of)
        .await?;
    // `None`: another run finished it meanwhile; its event holds the counts.
    if let Some(mut rows) = purged {
        rows.webhooks += webhooks;
        done.deleted = rows;
    }
    tracing::info!(tenant.id = %tenant, "organization deleted by the operator");
    Ok(())
}

/// The last event of a deleted organization's trail: what each phase did.
fn organization_deleted(
    org: &Tenant,
    done: &OrgDeletion,
    webhooks: u64,
    rows: &keyplane_store::TenantRows,
    spec: &RevokeOrgSpec<'_>,
) -> AuditEvent {
    let count = |event: AuditEvent, key: &str, n: u64| event.detail(key, DetailValue::Count(n));
    let mut event = audit_event(
        org.id,
        actions::ORGANIZATION_DELETED,
        AuditActor::system(),
        &RequestContext::default(),
    )
    .target("organization", org.id.as_uuid(), Some(&org.name));
    for (key, n) in [
        ("revoked_api_tokens", done.revoked.api_tokens),
        ("revoked_service_accounts", done.revoked.service_accounts),
        ("revoked_robot_accounts", done.revoked.robot_accounts),
        ("revoked_canaries", done.revoked.canaries),
        (
            "revoked_authorizations",
            done.revoked.service_account_grants + done.revoked.user_and_group_grants,
        ),
        ("deleted_credentials", rows.credentials),
        ("deleted_authorizations", rows.grants),
        ("deleted_webhooks", rows.webhooks + webhooks),
        ("deleted_console_sessions", rows.console_sessions),
        ("deleted_idempotency_records", rows.idempotency_records),
        ("deleted_credential_policies", rows.credential_policies),
        ("kept_audit_events", rows.audit_events),
    ] {
        event = count(event, key, n);
    }
    spec.stamp(event)
}
