//! Revoking what an organization holds, as the operator's act: `admin revoke-org`, and phase 1 of
//! `admin delete-org` (which asks for its canaries and grants to users and groups too). One paged
//! walk; each page's credentials revoked in one transaction (`Store::revoke_credentials`), each
//! with what the API's revoke gives it.

use super::{credential_event, cursor_after, grant_event, now};
use crate::error::AppError;
use keyplane_core::audit::{actions, credential_action, AuditActor, CredentialChange};
use keyplane_core::{
    AuditEvent, Credential, CredentialKind, Error as DomainError, Grant, Operator, RequestContext,
    SubjectType, TenantId,
};
use keyplane_store::{CredentialRevocation, GrantFilter, ListCredentials, Store};
use std::sync::atomic::{AtomicU64, Ordering};

/// Rows read at once by the commands: what bounds the walk's memory.
pub const REVOKE_ORG_PAGE: u32 = 500;
/// Passes over the organization at most: a pass that revoked something is followed by another,
/// since a credential (or a person's grant) not yet revoked may have created more meanwhile.
const REVOKE_ORG_PASSES: usize = 5;
/// The `via` of every event `admin revoke-org` writes.
pub const REVOKE_ORG_VIA: &str = "admin revoke-org";

/// How an organization is revoked, and what of it besides the credentials that grant access
/// (API tokens, service accounts with their grants, robot accounts).
#[derive(Debug, Clone, Copy)]
pub struct RevokeOrgSpec<'a> {
    /// The command, recorded as `via` on every event.
    pub via: &'a str,
    /// Why, recorded on every event.
    pub reason: &'a str,
    /// Who ran the command, named on every event (whose actor is `system`).
    pub operator: &'a Operator,
    /// Count what it would revoke, and write nothing.
    pub dry_run: bool,
    /// Revoke the live canaries too; otherwise they stay armed, only counted.
    pub canaries: bool,
    /// Revoke the live grants to users and groups too; otherwise they stay, only counted.
    pub user_and_group_grants: bool,
    /// Rows read at once: [`REVOKE_ORG_PAGE`] (tests use small pages).
    pub page_rows: u32,
}

impl RevokeOrgSpec<'_> {
    /// `event` as the operator's act through this command, with its reason.
    pub(crate) fn stamp(&self, event: AuditEvent) -> AuditEvent {
        event
            .text("via", self.via)
            .text("reason", self.reason)
            .operated_by(self.operator)
    }
}

/// What [`revoke_organization`] revoked (or, in a dry run, would revoke) and what it left.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OrgRevocation {
    pub api_tokens: u64,
    pub service_accounts: u64,
    pub robot_accounts: u64,
    /// The service accounts' live grants, revoked with them.
    pub service_account_grants: u64,
    /// Live canaries: revoked if the spec asks for them; otherwise left armed (they never
    /// verify, and a presentation still raises the alarm), as the last pass found them.
    pub canaries: u64,
    /// Live grants to users and groups: revoked if the spec asks for them; otherwise left
    /// (people who sign in at the identity provider, not credentials the organization holds), as
    /// the last pass found them.
    pub user_and_group_grants: u64,
    /// False when the last pass allowed still revoked something: credentials were being created
    /// while it ran.
    pub settled: bool,
}

impl OrgRevocation {
    /// One credential revoked (or to be); its grants are counted apart.
    fn count(&mut self, credential: &Credential) {
        if credential.canary {
            self.canaries += 1;
            return;
        }
        match credential.kind {
            CredentialKind::ApiToken => self.api_tokens += 1,
            CredentialKind::ServiceAccount => self.service_accounts += 1,
            CredentialKind::RobotAccount => self.robot_accounts += 1,
        }
    }
}

/// Revokes `tenant`'s live credentials (API tokens first, then service accounts with their
/// grants, then robot accounts), and what else `spec` asks for, each with what the API's revoke
/// gives it: its audit event(s), its webhook deliveries and, on PostgreSQL, its NOTIFY to every
/// replica. Reads `spec.page_rows` rows at a time and revokes each page's in one transaction
/// (one commit a page, not one a credential: an fsync each), so its memory and each transaction
/// stay small however large the tenant; an interrupted run leaves the pages it committed, and
/// another run goes on with what is still live. Passes over the organization until
/// one revokes nothing (at most `REVOKE_ORG_PASSES`). With `spec.dry_run` it only counts, once.
/// Progress is kept in `done`, also when it fails part way. `NotFound` if the tenant does not
/// exist.
pub async fn revoke_organization(
    store: &dyn Store,
    tenant: TenantId,
    spec: &RevokeOrgSpec<'_>,
    done: &mut OrgRevocation,
) -> Result<(), AppError> {
    store
        .get_tenant(tenant)
        .await?
        .ok_or(DomainError::NotFound)?;
    for _ in 0..REVOKE_ORG_PASSES {
        let revoked = revoke_pass(store, tenant, spec, done).await?;
        if spec.dry_run || revoked == 0 {
            done.settled = true;
            break;
        }
    }
    if !spec.dry_run {
        tracing::info!(tenant.id = %tenant, via = spec.via, revoked = done.api_tokens + done.service_accounts + done.robot_accounts + done.canaries, "organization's credentials revoked by the operator");
    }
    Ok(())
}

/// One pass over the organization: its credentials kind by kind, then its grants to users and
/// groups. How many it revoked (in a dry run: would revoke). What is left is counted afresh each
/// pass; what is revoked adds up.
async fn revoke_pass(
    store: &dyn Store,
    tenant: TenantId,
    spec: &RevokeOrgSpec<'_>,
    done: &mut OrgRevocation,
) -> Result<u64, AppError> {
    let mut revoked = 0;
    if !spec.canaries {
        done.canaries = 0;
    }
    if !spec.user_and_group_grants {
        done.user_and_group_grants = 0;
    }
    for kind in CredentialKind::ALL {
        let mut after = None;
        loop {
            let page = store
                .list_credentials(&ListCredentials {
                    tenant_id: tenant,
                    kind,
                    after,
                    limit: Some(spec.page_rows),
                    include_revoked: false,
                    expiring: None,
                    include_canaries: true,
                })
                .await?;
            let mut to_revoke = Vec::with_capacity(page.len());
            for credential in &page {
                if credential.canary && !spec.canaries {
                    done.canaries += 1;
                } else {
                    to_revoke.push(credential);
                }
            }
            revoked += revoke_credentials_once(store, tenant, spec, &to_revoke, done).await?;
            // Revoking moves no page boundary: the next page is read past this one's last id.
            match cursor_after(&page, spec.page_rows, |c| c.id) {
                Some(last) => after = Some(last),
                None => break,
            }
        }
    }
    for subject_type in [SubjectType::User, SubjectType::Group] {
        let mut after = None;
        loop {
            let page = store
                .list_grants(&GrantFilter {
                    tenant_id: tenant,
                    subject_type: Some(subject_type),
                    subject_id: None,
                    kind: None,
                    capability_key: None,
                    include_revoked: false,
                    after,
                    limit: Some(spec.page_rows),
                })
                .await?;
            for grant in &page {
                if !spec.user_and_group_grants {
                    done.user_and_group_grants += 1;
                } else if revoke_grant_once(store, spec, grant).await? {
                    done.user_and_group_grants += 1;
                    revoked += 1;
                }
            }
            match cursor_after(&page, spec.page_rows, |g| g.id) {
                Some(last) => after = Some(last),
                None => break,
            }
        }
    }
    Ok(revoked)
}

/// Revokes `credentials` (one page of `tenant`'s) as the operator's act, in one transaction, and
/// counts them in `done` with the grants revoked with them: how many this call revoked (one
/// revoked by someone else meanwhile is skipped: their event, not ours). In a dry run: counts what
/// it would revoke.
async fn revoke_credentials_once(
    store: &dyn Store,
    tenant: TenantId,
    spec: &RevokeOrgSpec<'_>,
    credentials: &[&Credential],
    done: &mut OrgRevocation,
) -> Result<u64, AppError> {
    if spec.dry_run {
        for credential in credentials {
            if credential.kind == CredentialKind::ServiceAccount {
                // At most `MAX_LIVE_GRANTS_PER_SUBJECT`, all in this tenant.
                let grants = store
                    .list_grants_of_subject(SubjectType::ServiceAccount, credential.id.as_uuid())
                    .await?;
                done.service_account_grants += grants.len() as u64;
            }
            done.count(credential);
        }
        return Ok(credentials.len() as u64);
    }
    if credentials.is_empty() {
        return Ok(0);
    }
    let context = RequestContext::default();
    let grants_revoked = AtomicU64::new(0);
    let grant_revoked = |grant: &Grant| {
        grants_revoked.fetch_add(1, Ordering::Relaxed);
        spec.stamp(grant_event(
            actions::AUTHORIZATION_REVOKED,
            AuditActor::system(),
            &context,
            grant,
        ))
    };
    let at = now();
    let events: Vec<AuditEvent> = credentials
        .iter()
        .map(|credential| {
            spec.stamp(credential_event(
                credential_action(credential.kind, CredentialChange::Revoked),
                AuditActor::system(),
                &context,
                credential,
            ))
        })
        .collect();
    let revocations: Vec<CredentialRevocation<'_>> = credentials
        .iter()
        .zip(&events)
        .map(|(credential, event)| CredentialRevocation {
            kind: credential.kind,
            id: credential.id,
            event,
        })
        .collect();
    let revoked = store
        .revoke_credentials(tenant, &revocations, at, &grant_revoked)
        .await?;
    for credential in &revoked {
        done.count(credential);
    }
    done.service_account_grants += grants_revoked.load(Ordering::Relaxed);
    Ok(revoked.len() as u64)
}

/// Revokes a grant to a user or group as the operator's act: whether this call did (false:
/// someone else revoked it meanwhile, their event). In a dry run: true.
async fn revoke_grant_once(
    store: &dyn Store,
    spec: &RevokeOrgSpec<'_>,
    grant: &Grant,
) -> Result<bool, AppError> {
    if spec.dry_run {
        return Ok(true);
    }
    let at = now();
    let event = spec.stamp(grant_event(
        actions::AUTHORIZATION_REVOKED,
        AuditActor::system(),
        &RequestContext::default(),
        grant,
    ));
    let stored = store
        .revoke_grant(grant.tenant_id, grant.id, at, &event)
        .await?;
    Ok(stored.revoked_at == Some(at))
}
