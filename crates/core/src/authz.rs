//! Who is calling and what they may do. One model for every surface: a principal holds rights
//! (scopes) in its tenant; a capability check against another tenant is `NotFound`, never
//! `Forbidden`, so tenant ids cannot be probed.

use crate::credential::{Credential, CredentialKind};
use crate::error::Error;
use crate::ids::{CredentialId, TenantId, UserId};
use crate::scope::{Capability, Scope, ScopeSet};
use chrono::{DateTime, Utc};

#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub credential_id: CredentialId,
    pub kind: CredentialKind,
    /// The scopes this principal holds in `tenant_id`.
    pub rights: ScopeSet,
    /// Set when a person acts; `created_by_user_id` / `revoked_by_user_id` come from here.
    pub user_id: Option<UserId>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Principal {
    /// A credential acting with `rights` (an API token's scopes, a service account's grants).
    pub fn for_credential(credential: &Credential, rights: ScopeSet) -> Self {
        Self {
            tenant_id: credential.tenant_id,
            credential_id: credential.id,
            kind: credential.kind,
            rights,
            user_id: None,
            expires_at: credential.expires_at,
        }
    }

    /// `NotFound` outside the principal's tenant; `Forbidden` when it lacks the capability.
    pub fn require(&self, tenant: TenantId, capability: Capability) -> Result<(), Error> {
        if tenant != self.tenant_id {
            return Err(Error::NotFound);
        }
        if !self.rights.grants(capability) {
            return Err(Error::Forbidden(format!(
                "this credential lacks the `{}` capability",
                capability.key()
            )));
        }
        Ok(())
    }

    /// A principal can never mint a credential with rights it does not hold itself.
    pub fn may_delegate(&self, requested: &ScopeSet) -> Result<(), Error> {
        let missing = self.rights.not_covered(requested);
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = missing.into_iter().map(Scope::as_str).collect();
        Err(Error::Forbidden(format!(
            "cannot grant scopes this credential does not hold: {}",
            names.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldPath;

    fn principal(scopes: &[&str]) -> Principal {
        let raw: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        Principal {
            tenant_id: TenantId::new(),
            credential_id: CredentialId::new(),
            kind: CredentialKind::ApiToken,
            rights: ScopeSet::parse_list(&FieldPath::body("scopes"), &raw).unwrap(),
            user_id: None,
            expires_at: None,
        }
    }

    #[test]
    fn other_tenant_is_not_found_even_with_wildcard() {
        let p = principal(&["*"]);
        assert_eq!(
            p.require(TenantId::new(), Capability::ApiTokensRead),
            Err(Error::NotFound)
        );
        assert_eq!(p.require(p.tenant_id, Capability::ApiTokensRead), Ok(()));
    }

    #[test]
    fn missing_capability_is_forbidden() {
        let p = principal(&["api_tokens:read"]);
        assert!(matches!(
            p.require(p.tenant_id, Capability::ApiTokensWrite),
            Err(Error::Forbidden(_))
        ));
    }

    #[test]
    fn cannot_delegate_more_than_held() {
        let p = principal(&["api_tokens:write", "deploy"]);
        let ok = ScopeSet::parse_list(&FieldPath::body("s"), &["deploy".to_string()]).unwrap();
        let escalation = ScopeSet::wildcard();
        assert!(p.may_delegate(&ok).is_ok());
        assert!(matches!(p.may_delegate(&escalation), Err(Error::Forbidden(m)) if m.contains('*')));
    }
}
