//! Who is calling and what they may do. One model for every surface: a principal holds rights
//! (scopes) per tenant — a credential in its own tenant only, a user wherever it has grants. A check
//! against a tenant where the principal holds nothing is `NotFound`, never `Forbidden`, so tenant ids
//! cannot be probed.

use crate::created_by::Channel;
use crate::credential::{CredentialIdentity, CredentialKind};
use crate::error::Error;
use crate::ids::{CredentialId, TenantId, UserId};
use crate::scope::{Capability, Scope, ScopeSet};
use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    Credential {
        id: CredentialId,
        kind: CredentialKind,
    },
    /// A person, from an OAuth/OIDC access token.
    User(UserId),
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub actor: Actor,
    /// Rights per tenant; a credential has exactly one entry, its own tenant.
    rights: Vec<(TenantId, ScopeSet)>,
    pub expires_at: Option<DateTime<Utc>>,
    /// A user's OIDC issuer and `sub`, for the audit trail.
    user_identity: Option<(String, String)>,
    /// How it came in: the API unless [`Principal::through`] says otherwise. Recorded on what it
    /// creates.
    channel: Channel,
}

impl Principal {
    /// A credential acting with `rights` in its tenant (an API token's scopes, a service account's
    /// grants).
    pub fn for_credential(credential: &CredentialIdentity, rights: ScopeSet) -> Self {
        Self {
            actor: Actor::Credential {
                id: credential.id,
                kind: credential.kind,
            },
            rights: vec![(credential.tenant_id, rights)],
            expires_at: credential.expires_at,
            user_identity: None,
            channel: Channel::Api,
        }
    }

    /// A user acting with what its grants give it in each tenant.
    pub fn for_user(
        user: UserId,
        rights: Vec<(TenantId, ScopeSet)>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            actor: Actor::User(user),
            rights,
            expires_at,
            user_identity: None,
            channel: Channel::Api,
        }
    }

    /// Records which issuer and `sub` a user principal came from.
    pub fn with_user_identity(mut self, issuer: String, subject: String) -> Self {
        self.user_identity = Some((issuer, subject));
        self
    }

    /// The same principal, come in through `channel` (the console).
    pub fn through(mut self, channel: Channel) -> Self {
        self.channel = channel;
        self
    }

    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// The issuer and `sub` of a user principal, when known.
    pub fn user_identity(&self) -> Option<(&str, &str)> {
        self.user_identity
            .as_ref()
            .map(|(issuer, subject)| (issuer.as_str(), subject.as_str()))
    }

    /// The credential or user id: the rate-limit key and `principal.id` in logs.
    pub fn id(&self) -> uuid::Uuid {
        match self.actor {
            Actor::Credential { id, .. } => id.as_uuid(),
            Actor::User(user) => user.as_uuid(),
        }
    }

    /// Set when a person acts; `created_by_user_id` / `revoked_by_user_id` come from here.
    pub fn user_id(&self) -> Option<UserId> {
        match self.actor {
            Actor::User(user) => Some(user),
            Actor::Credential { .. } => None,
        }
    }

    /// `api_token`, `service_account`, `robot_account` or `user`.
    pub fn kind(&self) -> &'static str {
        match self.actor {
            Actor::Credential { kind, .. } => kind.as_str(),
            Actor::User(_) => "user",
        }
    }

    /// The tenants this principal holds anything in, and what.
    pub fn tenants(&self) -> &[(TenantId, ScopeSet)] {
        &self.rights
    }

    pub fn rights_in(&self, tenant: TenantId) -> Option<&ScopeSet> {
        self.rights
            .iter()
            .find(|(t, _)| *t == tenant)
            .map(|(_, rights)| rights)
    }

    /// `NotFound` where the principal holds nothing; `Forbidden` when it lacks the capability.
    pub fn require(&self, tenant: TenantId, capability: Capability) -> Result<(), Error> {
        let rights = self.rights_in(tenant).ok_or(Error::NotFound)?;
        if !rights.grants(capability) {
            return Err(Error::Forbidden(format!(
                "this caller lacks the `{}` capability",
                capability.key()
            )));
        }
        Ok(())
    }

    /// Tenant-wide settings (the credential policy) need every right: `*`, or an `account_owner`
    /// grant. `NotFound` where the principal holds nothing.
    pub fn require_owner(&self, tenant: TenantId) -> Result<(), Error> {
        let rights = self.rights_in(tenant).ok_or(Error::NotFound)?;
        if !rights.holds_everything() {
            return Err(Error::Forbidden(
                "this needs `*` or an `account_owner` grant in the organization".into(),
            ));
        }
        Ok(())
    }

    /// A principal can never mint a credential with rights it does not hold itself.
    pub fn may_delegate(&self, tenant: TenantId, requested: &ScopeSet) -> Result<(), Error> {
        self.holds_all(
            tenant,
            requested,
            "cannot grant scopes this caller does not hold",
        )
    }

    /// Nor take down (revoke, suspend, resume, retire a previous secret of) a credential that
    /// holds rights it does not hold: an `api_tokens:write` token cannot revoke the org's `*`.
    pub fn may_manage(&self, tenant: TenantId, target_holds: &ScopeSet) -> Result<(), Error> {
        self.holds_all(
            tenant,
            target_holds,
            "cannot manage a credential holding scopes this caller does not hold",
        )
    }

    fn holds_all(&self, tenant: TenantId, needed: &ScopeSet, refusal: &str) -> Result<(), Error> {
        let held = self.rights_in(tenant).ok_or(Error::NotFound)?;
        let missing = held.not_covered(needed);
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = missing.into_iter().map(Scope::as_str).collect();
        Err(Error::Forbidden(format!("{refusal}: {}", names.join(", "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldPath;

    fn scopes(list: &[&str]) -> ScopeSet {
        let raw: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        ScopeSet::parse_list(&FieldPath::body("scopes"), &raw).unwrap()
    }

    fn principal(list: &[&str]) -> (Principal, TenantId) {
        let tenant = TenantId::new();
        let principal = Principal {
            actor: Actor::Credential {
                id: CredentialId::new(),
                kind: CredentialKind::ApiToken,
            },
            rights: vec![(tenant, scopes(list))],
            expires_at: None,
            user_identity: None,
            channel: Channel::Api,
        };
        (principal, tenant)
    }

    #[test]
    fn other_tenant_is_not_found_even_with_wildcard() {
        let (p, tenant) = principal(&["*"]);
        assert_eq!(
            p.require(TenantId::new(), Capability::ApiTokensRead),
            Err(Error::NotFound)
        );
        assert_eq!(p.require(tenant, Capability::ApiTokensRead), Ok(()));
    }

    #[test]
    fn missing_capability_is_forbidden() {
        let (p, tenant) = principal(&["api_tokens:read"]);
        assert!(matches!(
            p.require(tenant, Capability::ApiTokensWrite),
            Err(Error::Forbidden(_))
        ));
    }

    #[test]
    fn cannot_delegate_more_than_held() {
        let (p, tenant) = principal(&["api_tokens:write", "deploy"]);
        assert!(p.may_delegate(tenant, &scopes(&["deploy"])).is_ok());
        assert!(
            matches!(p.may_delegate(tenant, &ScopeSet::wildcard()), Err(Error::Forbidden(m)) if m.contains('*'))
        );
        assert_eq!(
            p.may_delegate(TenantId::new(), &scopes(&["deploy"])),
            Err(Error::NotFound)
        );
    }

    #[test]
    fn a_user_holds_rights_per_tenant() {
        let user = UserId::from_subject("https://idp", "alice");
        let (a, b) = (TenantId::new(), TenantId::new());
        let p = Principal::for_user(
            user,
            vec![(a, ScopeSet::wildcard()), (b, scopes(&["auth.manage"]))],
            None,
        );
        assert_eq!(p.user_id(), Some(user));
        assert_eq!(p.kind(), "user");
        assert!(p.require(a, Capability::ApiTokensWrite).is_ok());
        assert!(p.require(b, Capability::AuthManage).is_ok());
        assert!(matches!(
            p.require(b, Capability::ApiTokensWrite),
            Err(Error::Forbidden(_))
        ));
        assert_eq!(
            p.require(TenantId::new(), Capability::AuthManage),
            Err(Error::NotFound)
        );
    }
}
