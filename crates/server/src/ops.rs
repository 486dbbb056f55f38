//! Use cases: one async function each, shared by every surface and the CLI. Each one authorizes,
//! makes the core decision and calls the store; none knows about HTTP.

use crate::app::App;
use crate::error::AppError;
use chrono::{DateTime, Utc};
use keyplane_core::audit::{actions, credential_action, AuditActor, CredentialChange};
use keyplane_core::error::codes;
use keyplane_core::grant::rights_from_grants;
use keyplane_core::registry::{self, RegistryAction};
use keyplane_core::validate::truncate_to_micros;
use keyplane_core::{
    AuditEvent, Capability, Credential, CredentialId, CredentialKind, Error as DomainError,
    FieldError, FieldPath, Grant, GrantId, NewCredential, NewGrant, Plaintext, Principal, Registry,
    RequestContext, RobotPermission, Rotation, ScopeSet, SubjectType, Tenant, TenantId, UserId,
};
use keyplane_store::{GrantFilter, ListCredentials, Store, StoreError};
use rand::rngs::OsRng;

/// The clock, at the precision both stores keep.
pub fn now() -> DateTime<Utc> {
    truncate_to_micros(Utc::now())
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
fn credential_event(
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

fn organization_created(created: &OrgCreated, via: &str) -> AuditEvent {
    audit_event(
        created.tenant.id,
        actions::ORGANIZATION_CREATED,
        AuditActor::system(),
        &RequestContext::default(),
    )
    .target(
        "organization",
        created.tenant.id.as_uuid(),
        Some(&created.tenant.name),
    )
    .text("via", via)
    .text(
        "api_token_id",
        created.token.credential.id.as_uuid().to_string(),
    )
    .text(
        "display_prefix",
        created.token.credential.display.prefix.clone(),
    )
    .list("scopes", created.token.credential.scopes.to_strings())
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

/// The event of a bulk import of `count` credentials into `tenant` by the operator.
pub fn import_event(tenant: TenantId, kind: CredentialKind, count: u64) -> AuditEvent {
    audit_event(
        tenant,
        actions::API_TOKEN_IMPORTED,
        AuditActor::system(),
        &RequestContext::default(),
    )
    .text("kind", kind.as_str())
    .detail("count", keyplane_core::audit::DetailValue::Count(count))
}

/// A credential and its plaintext secret, which the caller shows exactly once.
pub struct Issued {
    pub credential: Credential,
    pub secret: Plaintext,
}

/// A new tenant and its first `*`-scoped API token.
pub struct OrgCreated {
    pub tenant: Tenant,
    pub token: Issued,
}

/// Mints a tenant and its first `*` token without storing them.
pub fn mint_first_org(name: &str) -> Result<OrgCreated, AppError> {
    let name =
        keyplane_core::validate::name(FieldPath::body("name"), name).map_err(DomainError::from)?;
    let now = now();
    let tenant = Tenant {
        id: TenantId::new(),
        name,
        created_at: now,
    };
    let (credential, secret) = NewCredential {
        tenant_id: tenant.id,
        kind: CredentialKind::ApiToken,
        name: "bootstrap".into(),
        scopes: ScopeSet::wildcard(),
        permissions: Vec::new(),
        expires_at: None,
        created_by_user_id: None,
    }
    .issue(now, &mut OsRng);
    Ok(OrgCreated {
        tenant,
        token: Issued { credential, secret },
    })
}

/// `keyplane admin create-org`: a tenant and a `*` token, in one transaction.
pub async fn create_org(store: &dyn Store, name: &str) -> Result<OrgCreated, AppError> {
    let created = mint_first_org(name)?;
    store
        .create_tenant_with_credential(
            &created.tenant,
            &created.token.credential,
            &organization_created(&created, "admin create-org"),
        )
        .await?;
    Ok(created)
}

/// `serve` on an empty store: stores `created` (from [`mint_first_org`]) if and only if this store
/// was never bootstrapped and holds no tenant. Returns whether it did.
pub async fn bootstrap(store: &dyn Store, created: &OrgCreated) -> Result<bool, AppError> {
    Ok(store
        .bootstrap_once(
            &created.tenant,
            &created.token.credential,
            &organization_created(created, "bootstrap"),
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
) -> Result<Issued, AppError> {
    who.require(tenant, rights.write)?;
    who.may_delegate(tenant, &spec.scopes)?;
    let (credential, secret) = NewCredential {
        tenant_id: tenant,
        kind: rights.kind,
        name: spec.name,
        scopes: spec.scopes,
        permissions: spec.permissions,
        expires_at: spec.expires_at,
        created_by_user_id: who.user_id(),
    }
    .issue(now(), &mut OsRng);
    let event = credential_event(
        credential_action(rights.kind, CredentialChange::Created),
        AuditActor::of(who),
        context,
        &credential,
    );
    app.store()
        .insert_credential(&credential, &event)
        .await
        .map_err(|e| conflict_on_name(e, rights.kind))?;
    tracing::info!(tenant.id = %tenant, credential.id = %credential.id, credential.kind = rights.kind.as_str(), principal.id = %who.id(), "credential created");
    Ok(Issued { credential, secret })
}

/// One page of live credentials after `after`, and the cursor of the next page if there is one.
pub async fn list_credentials(
    app: &App,
    who: &Principal,
    tenant: TenantId,
    rights: KindRights,
    after: Option<CredentialId>,
    limit: Option<u32>,
    include_revoked: bool,
) -> Result<(Vec<Credential>, Option<CredentialId>), AppError> {
    who.require(tenant, rights.read)?;
    let mut page = app
        .store()
        .list_credentials(&ListCredentials {
            tenant_id: tenant,
            kind: rights.kind,
            after,
            limit: limit.map(|l| l + 1),
            include_revoked,
        })
        .await?;
    let next = match limit {
        Some(limit) if page.len() > limit as usize => {
            page.truncate(limit as usize);
            page.last().map(|c| c.id)
        }
        _ => None,
    };
    Ok((page, next))
}

/// A live credential; revoked ones are `NotFound` here.
pub async fn get_live_credential(
    app: &App,
    who: &Principal,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
) -> Result<Credential, AppError> {
    who.require(tenant, rights.read)?;
    app.store()
        .get_credential(tenant, rights.kind, id)
        .await?
        .filter(|c| !c.is_revoked())
        .ok_or(DomainError::NotFound.into())
}

/// New secret, same id; the old secret stops working at once. Rotating hands out the new secret, so
/// the caller must hold every scope of the credential it rotates. Of concurrent rotations exactly
/// one succeeds (the store swaps the secret only if it is still the one read here); the others,
/// and rotations of revoked or expired credentials, are `Conflict`: a secret that does not work
/// is never handed out.
pub async fn rotate_credential(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
) -> Result<Issued, AppError> {
    rotate(app, who, context, tenant, rights, id, || {
        DomainError::Conflict("the credential is revoked".into())
    })
    .await
}

/// [`rotate_credential`] where a revoked credential is `NotFound`: to an Aether client, a deleted
/// resource is gone. Races and expiry are still `Conflict`.
pub async fn rotate_live_credential(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
) -> Result<Issued, AppError> {
    rotate(app, who, context, tenant, rights, id, || {
        DomainError::NotFound
    })
    .await
}

async fn rotate(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    rights: KindRights,
    id: CredentialId,
    revoked: fn() -> DomainError,
) -> Result<Issued, AppError> {
    who.require(tenant, rights.write)?;
    let current = app
        .store()
        .get_credential(tenant, rights.kind, id)
        .await?
        .ok_or(DomainError::NotFound)?;
    let now = now();
    match current.usable_at(now) {
        Err(keyplane_core::Unusable::Revoked) => return Err(revoked().into()),
        Err(keyplane_core::Unusable::Expired) => {
            return Err(DomainError::Conflict(
                "the credential has expired: create a new one".into(),
            )
            .into())
        }
        Ok(()) => {}
    }
    who.may_delegate(
        tenant,
        &rights_to_hand_on(app.store().as_ref(), &current).await?,
    )?;
    let (rotation, secret) = Rotation::mint(rights.kind, now, &mut OsRng);
    let event = credential_event(
        credential_action(rights.kind, CredentialChange::Rotated),
        AuditActor::of(who),
        context,
        &current,
    )
    .text("old_display_prefix", current.display.prefix.clone())
    .text("display_prefix", rotation.display.prefix.clone());
    let credential = app
        .store()
        .rotate_credential(
            tenant,
            rights.kind,
            id,
            &current.secret_hash,
            &rotation,
            &event,
        )
        .await?;
    app.invalidate(id.as_uuid());
    tracing::info!(tenant.id = %tenant, credential.id = %id, principal.id = %who.id(), "credential rotated");
    Ok(Issued { credential, secret })
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
    // Managing a credential (rotating or revoking it) needs every right it holds: an
    // `api_tokens:write` token cannot take down the org's `*` token.
    let target = app
        .store()
        .get_credential(tenant, rights.kind, id)
        .await?
        .ok_or(DomainError::NotFound)?;
    if !target.is_revoked() {
        let needed = rights_to_hand_on(app.store().as_ref(), &target).await?;
        who.may_delegate(tenant, &needed)?;
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
        .revoke_credential(tenant, rights.kind, id, at, who.user_id(), &event)
        .await?;
    app.invalidate(id.as_uuid());
    let revoked_now = credential.revoked_at == Some(at);
    if revoked_now {
        tracing::info!(tenant.id = %tenant, credential.id = %id, principal.id = %who.id(), "credential revoked");
    }
    Ok((credential, revoked_now))
}

/// Grants a right. Needs `auth.manage`, and the grantor must hold what it grants. A service-account
/// subject must be a live service account of the same tenant.
pub async fn create_grant(
    app: &App,
    who: &Principal,
    context: &RequestContext,
    tenant: TenantId,
    grant: NewGrant,
) -> Result<Grant, AppError> {
    who.require(tenant, Capability::AuthManage)?;
    who.may_grant(tenant, &grant)?;
    check_grant_subject(app.store().as_ref(), tenant, &grant).await?;
    let grant = grant.issue(tenant, now(), who.user_id());
    let event = grant_event(
        actions::AUTHORIZATION_CREATED,
        AuditActor::of(who),
        context,
        &grant,
    );
    app.store().insert_grant(&grant, &event).await?;
    app.invalidate(grant.subject_id);
    tracing::info!(tenant.id = %tenant, grant.id = %grant.id, grant.kind = grant.kind.as_str(), principal.id = %who.id(), "grant created");
    Ok(grant)
}

/// A service-account subject must be a live service account of the grant's tenant. Users and groups
/// live at the identity provider: any id is accepted.
async fn check_grant_subject(
    store: &dyn Store,
    tenant: TenantId,
    grant: &NewGrant,
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
    if subject.is_none_or(|s| s.is_revoked()) {
        return Err(DomainError::from(FieldError::new(
            FieldPath::body("subject_id"),
            codes::NOT_FOUND,
            "no live service account with this id in this account",
        ))
        .into());
    }
    Ok(())
}

/// `keyplane admin grant`: the platform operator, who works on the store directly and so has no
/// principal, gives a subject a right in a tenant (typically a first user `account_owner`, who can
/// then grant others through the API). `NotFound` if the tenant does not exist. Other replicas on
/// PostgreSQL hear of it at once; a server on the same SQLite file within its cache lifetime.
pub async fn grant_as_operator(
    store: &dyn Store,
    tenant: TenantId,
    grant: NewGrant,
) -> Result<Grant, AppError> {
    grant.check_shape().map_err(DomainError::from)?;
    store
        .get_tenant(tenant)
        .await?
        .ok_or(DomainError::NotFound)?;
    check_grant_subject(store, tenant, &grant).await?;
    let grant = grant.issue(tenant, now(), None);
    let event = grant_event(
        actions::AUTHORIZATION_CREATED,
        AuditActor::system(),
        &RequestContext::default(),
        &grant,
    );
    store.insert_grant(&grant, &event).await?;
    tracing::info!(tenant.id = %tenant, grant.id = %grant.id, grant.kind = grant.kind.as_str(), "grant created by the operator");
    Ok(grant)
}

pub async fn list_grants(
    app: &App,
    who: &Principal,
    filter: GrantFilter,
) -> Result<Vec<Grant>, AppError> {
    who.require(filter.tenant_id, Capability::AuthManage)?;
    Ok(app.store().list_grants(&filter).await?)
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
    app.invalidate(grant.subject_id);
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
        expires_at: None,
        created_by_user_id: who.user_id(),
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
    if let Err(StoreError::Conflict(_)) = store
        .create_registry(&registry, &robot, &event(&registry))
        .await
    {
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
            .create_registry(&registry, &robot, &event(&registry))
            .await?;
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
) -> Result<Issued, AppError> {
    who.require(tenant, Capability::RegistryWrite)?;
    require_registry(app, tenant).await?;
    create_credential(app, who, context, tenant, ROBOTS, spec).await
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
    let current = app
        .store()
        .get_credential(tenant, CredentialKind::RobotAccount, id)
        .await?
        .filter(|robot| !robot.is_revoked())
        .ok_or(DomainError::NotFound)?;
    let event = audit_event(
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
    );
    let robot = app
        .store()
        .update_robot_permissions(tenant, id, &permissions, now(), &event)
        .await?;
    app.invalidate(id.as_uuid());
    tracing::info!(tenant.id = %tenant, credential.id = %id, principal.id = %who.id(), "robot permissions changed");
    Ok(robot)
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
    let next = if page.len() > limit as usize {
        page.truncate(limit as usize);
        page.last().map(|e| e.event.id)
    } else {
        None
    };
    Ok((page, next))
}
