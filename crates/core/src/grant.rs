//! Grants: how service accounts (and, later, users and groups) receive rights in a tenant, as
//! Hybridbox's `/auth/authorizations` exposes them.

use crate::error::{codes, Error, FieldError, FieldPath};
use crate::ids::{GrantId, TenantId, UserId};
use crate::scope::{Scope, ScopeSet};
use crate::Principal;
use chrono::{DateTime, Utc};
use std::collections::HashSet;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantKind {
    /// One capability key.
    Capability,
    /// Everything in the account (`*`).
    AccountOwner,
    /// Platform operator. Only a super admin may grant it; in its tenant it means `*`.
    SuperAdmin,
}

impl GrantKind {
    pub const ALL: [GrantKind; 3] = [
        GrantKind::Capability,
        GrantKind::AccountOwner,
        GrantKind::SuperAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Capability => "capability",
            GrantKind::AccountOwner => "account_owner",
            GrantKind::SuperAdmin => "super_admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectType {
    User,
    Group,
    ServiceAccount,
}

impl SubjectType {
    pub const ALL: [SubjectType; 3] = [
        SubjectType::User,
        SubjectType::Group,
        SubjectType::ServiceAccount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubjectType::User => "user",
            SubjectType::Group => "group",
            SubjectType::ServiceAccount => "service_account",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// An optional narrowing of a grant to one resource. keyplane checks no resource-level rights yet,
/// so a narrowed grant confers nothing tenant-wide; it is stored and listed for the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantResource {
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
}

impl GrantResource {
    pub fn is_tenant_wide(&self) -> bool {
        self.resource_type.is_none() && self.resource_id.is_none()
    }
}

/// Live grants one subject may hold in one tenant, narrowed ones included: its rights are
/// rebuilt from all of them on every load, so one tenant granting without end could otherwise
/// stall the replica. As many as a credential's scopes ([`crate::scope::MAX_SCOPES`]).
pub const MAX_LIVE_GRANTS_PER_SUBJECT: usize = crate::scope::MAX_SCOPES;

/// What a grant past [`MAX_LIVE_GRANTS_PER_SUBJECT`] is refused with (a conflict: the subject's
/// grants as they stand).
pub fn too_many_grants_message() -> String {
    format!(
        "the subject already holds {MAX_LIVE_GRANTS_PER_SUBJECT} live grants here, the most it \
         may hold: revoke one before granting another"
    )
}

pub const MAX_RESOURCE_TYPE_LEN: usize = 64;
pub const MAX_RESOURCE_ID_LEN: usize = 255;

/// A grant's `resource_type`: 1–64 characters of `[a-z0-9_.:-]` starting with a lower-case letter
/// (`project`, `registry.repository`).
pub fn resource_type(path: FieldPath, raw: &str) -> Result<String, FieldError> {
    bounded(path.clone(), raw, MAX_RESOURCE_TYPE_LEN)?;
    let mut chars = raw.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.:-".contains(c));
    if first_ok && rest_ok {
        Ok(raw.to_string())
    } else {
        Err(FieldError::new(
            path,
            codes::INVALID_FORMAT,
            "must start with a lower-case letter followed by lower-case letters, digits and `_.:-`",
        ))
    }
}

/// A grant's `resource_id`: 1–255 printable ASCII characters without spaces (a UUID, a slug, a
/// path such as `team-a/app`), so it reads the same everywhere it is shown.
pub fn resource_id(path: FieldPath, raw: &str) -> Result<String, FieldError> {
    bounded(path.clone(), raw, MAX_RESOURCE_ID_LEN)?;
    if raw.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(raw.to_string())
    } else {
        Err(FieldError::new(
            path,
            codes::INVALID_CHARACTERS,
            "must be printable ASCII without spaces",
        ))
    }
}

fn bounded(path: FieldPath, raw: &str, max: usize) -> Result<(), FieldError> {
    if raw.is_empty() {
        return Err(FieldError::new(
            path,
            codes::TOO_SHORT,
            "must not be empty (use null for none)",
        ));
    }
    if raw.len() > max {
        return Err(FieldError::new(
            path,
            codes::TOO_LONG,
            format!("must have at most {max} characters"),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub id: GrantId,
    pub tenant_id: TenantId,
    pub kind: GrantKind,
    pub subject_type: SubjectType,
    pub subject_id: Uuid,
    /// Set exactly when `kind` is `Capability`.
    pub capability_key: Option<Scope>,
    pub resource: GrantResource,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_by_user_id: Option<UserId>,
    /// Who created it, and how; `None` for rows created before this was recorded.
    pub created_by: Option<crate::CreatedBy>,
}

/// A validated request for a grant.
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub kind: GrantKind,
    pub subject_type: SubjectType,
    pub subject_id: Uuid,
    pub capability_key: Option<Scope>,
    pub resource: GrantResource,
}

impl NewGrant {
    /// Checks the shape rules that tie fields together (`capability_key` iff `capability`).
    pub fn check_shape(&self) -> Result<(), FieldError> {
        match (self.kind, &self.capability_key) {
            (GrantKind::Capability, None) => Err(FieldError::new(
                FieldPath::body("capability_key"),
                codes::REQUIRED,
                "is required when grant_kind is capability",
            )),
            (GrantKind::AccountOwner | GrantKind::SuperAdmin, Some(_)) => Err(FieldError::new(
                FieldPath::body("capability_key"),
                codes::INVALID_FORMAT,
                "must be null unless grant_kind is capability",
            )),
            _ => Ok(()),
        }
    }

    /// `created_by`: from the same actor as the grant's `authorization.created` event.
    pub fn issue(
        self,
        tenant_id: TenantId,
        now: DateTime<Utc>,
        created_by: crate::CreatedBy,
    ) -> Grant {
        Grant {
            id: GrantId::new(),
            tenant_id,
            kind: self.kind,
            subject_type: self.subject_type,
            subject_id: self.subject_id,
            capability_key: self.capability_key,
            resource: self.resource,
            created_at: now,
            revoked_at: None,
            created_by_user_id: created_by.user_id(),
            created_by: Some(created_by),
        }
    }
}

/// The scope a grant stands for (`*` for owners); `None` for a capability grant without a key,
/// which `NewGrant::check_shape` never lets into the store.
fn scope_of(grant: &Grant) -> Option<String> {
    match (grant.kind, &grant.capability_key) {
        (GrantKind::AccountOwner | GrantKind::SuperAdmin, _) => {
            Some(crate::scope::WILDCARD.to_string())
        }
        (GrantKind::Capability, Some(key)) => Some(key.as_str().to_string()),
        (GrantKind::Capability, None) => None,
    }
}

/// The scopes in their first-seen order, each once. A set finds the repeats: a subject's rights
/// are rebuilt from its grants on every load, so the cost must stay linear in them.
fn distinct(scopes: impl Iterator<Item = String>) -> ScopeSet {
    let mut seen: HashSet<String> = HashSet::new();
    let distinct: Vec<String> = scopes.filter(|scope| seen.insert(scope.clone())).collect();
    ScopeSet::from_trusted(distinct)
}

/// The scopes a set of live, tenant-wide grants confers.
pub fn rights_from_grants(grants: &[Grant]) -> ScopeSet {
    distinct(
        grants
            .iter()
            .filter(|g| g.revoked_at.is_none() && g.resource.is_tenant_wide())
            .filter_map(scope_of),
    )
}

/// Every right a set of live grants stands for, narrowed ones included: what someone must hold to
/// hand the subject's secret on (by rotating it), since they could not have granted these either.
/// A grant whose right is unknown stands for everything.
pub fn rights_to_hand_on(grants: &[Grant]) -> ScopeSet {
    distinct(
        grants
            .iter()
            .filter(|g| g.revoked_at.is_none())
            .map(|g| scope_of(g).unwrap_or_else(|| crate::scope::WILDCARD.to_string())),
    )
}

impl Principal {
    /// A grant can never give more than its grantor holds in that tenant.
    pub fn may_grant(&self, tenant: TenantId, grant: &NewGrant) -> Result<(), Error> {
        let needed = match (grant.kind, &grant.capability_key) {
            (GrantKind::SuperAdmin, _) => {
                return Err(Error::Forbidden(
                    "super_admin can only be granted by the platform operator".into(),
                ))
            }
            (GrantKind::AccountOwner, _) => ScopeSet::wildcard(),
            (GrantKind::Capability, Some(key)) => {
                ScopeSet::from_trusted(vec![key.as_str().to_string()])
            }
            (GrantKind::Capability, None) => ScopeSet::empty(),
        };
        self.may_delegate(tenant, &needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Capability;

    fn grant(kind: GrantKind, key: Option<&str>, resource: Option<&str>) -> Grant {
        NewGrant {
            kind,
            subject_type: SubjectType::ServiceAccount,
            subject_id: Uuid::new_v4(),
            capability_key: key.map(|k| Scope::parse(k).unwrap()),
            resource: GrantResource {
                resource_type: resource.map(str::to_string),
                resource_id: None,
            },
        }
        .issue(
            TenantId::new(),
            Utc::now(),
            crate::CreatedBy::system(crate::Channel::Api),
        )
    }

    #[test]
    fn rights_are_the_union_of_live_tenant_wide_grants() {
        let mut revoked = grant(GrantKind::Capability, Some("api_tokens:write"), None);
        revoked.revoked_at = Some(Utc::now());
        let grants = vec![
            grant(GrantKind::Capability, Some("auth.manage"), None),
            grant(GrantKind::Capability, Some("auth.manage"), None),
            grant(
                GrantKind::Capability,
                Some("registry:write"),
                Some("project"),
            ),
            revoked,
        ];
        let rights = rights_from_grants(&grants);
        assert_eq!(rights.to_strings(), ["auth.manage"]);
        assert!(rights.grants(Capability::AuthManage));
        assert!(!rights.grants(Capability::ApiTokensWrite));
        assert!(!rights.grants(Capability::RegistryWrite));
        assert!(
            rights_from_grants(&[grant(GrantKind::AccountOwner, None, None)])
                .grants(Capability::ApiTokensWrite)
        );
        assert!(rights_from_grants(&[]).to_strings().is_empty());
    }

    /// Rights rebuilt from a subject's grants in a store written before the cap (or from many
    /// narrowed grants): every distinct right once, in the order first granted.
    #[test]
    fn many_grants_give_each_right_once_in_grant_order() {
        let keys: Vec<String> = (0..50_000).map(|i| format!("custom.right{i}")).collect();
        let mut grants: Vec<Grant> = keys
            .iter()
            .map(|key| grant(GrantKind::Capability, Some(key), None))
            .collect();
        grants.extend(
            keys.iter()
                .rev()
                .step_by(7)
                .map(|key| grant(GrantKind::Capability, Some(key), None)),
        );
        grants.push(grant(
            GrantKind::Capability,
            Some("audit:read"),
            Some("project"),
        ));
        assert_eq!(rights_from_grants(&grants).to_strings(), keys);
        let mut on_hand = keys.clone();
        on_hand.push("audit:read".into());
        assert_eq!(rights_to_hand_on(&grants).to_strings(), on_hand);
    }

    #[test]
    fn a_grantor_gives_only_what_it_holds() {
        let tenant = TenantId::new();
        let principal = |scopes: ScopeSet| {
            Principal::for_user(
                UserId::from_subject("https://idp", "u"),
                vec![(tenant, scopes)],
                None,
            )
        };
        let manager = principal(ScopeSet::from_trusted(vec!["auth.manage".into()]));
        let new = |kind, key: Option<&str>| NewGrant {
            kind,
            subject_type: SubjectType::ServiceAccount,
            subject_id: Uuid::new_v4(),
            capability_key: key.map(|k| Scope::parse(k).unwrap()),
            resource: GrantResource {
                resource_type: None,
                resource_id: None,
            },
        };
        assert!(manager
            .may_grant(tenant, &new(GrantKind::Capability, Some("auth.manage")))
            .is_ok());
        assert!(manager
            .may_grant(
                tenant,
                &new(GrantKind::Capability, Some("api_tokens:write"))
            )
            .is_err());
        assert!(manager
            .may_grant(tenant, &new(GrantKind::AccountOwner, None))
            .is_err());
        let owner = principal(ScopeSet::wildcard());
        assert!(owner
            .may_grant(tenant, &new(GrantKind::AccountOwner, None))
            .is_ok());
        assert!(owner
            .may_grant(tenant, &new(GrantKind::SuperAdmin, None))
            .is_err());
    }

    #[test]
    fn resource_fields_have_a_grammar_and_a_length() {
        let path = || FieldPath::body("resource_type");
        assert_eq!(resource_type(path(), "project").unwrap(), "project");
        assert!(resource_type(path(), "registry.repository:v2").is_ok());
        assert!(resource_type(path(), &"a".repeat(64)).is_ok());
        for (bad, code) in [
            ("", codes::TOO_SHORT),
            (&*"a".repeat(65), codes::TOO_LONG),
            ("Project", codes::INVALID_FORMAT),
            ("1project", codes::INVALID_FORMAT),
            ("pro ject", codes::INVALID_FORMAT),
            ("pro\0ject", codes::INVALID_FORMAT),
        ] {
            assert_eq!(
                resource_type(path(), bad).unwrap_err().code,
                code,
                "{bad:?}"
            );
        }
        let path = || FieldPath::body("resource_id");
        assert!(resource_id(path(), "team-a/app@sha256:0f").is_ok());
        assert!(resource_id(path(), &"x".repeat(255)).is_ok());
        for (bad, code) in [
            ("", codes::TOO_SHORT),
            (&*"x".repeat(256), codes::TOO_LONG),
            ("a\0b", codes::INVALID_CHARACTERS),
            ("a b", codes::INVALID_CHARACTERS),
            ("caf\u{e9}", codes::INVALID_CHARACTERS),
            ("a\u{202e}b", codes::INVALID_CHARACTERS),
        ] {
            assert_eq!(resource_id(path(), bad).unwrap_err().code, code, "{bad:?}");
        }
    }

    #[test]
    fn capability_key_goes_with_capability_grants_only() {
        let shape = |kind, key: Option<&str>| {
            NewGrant {
                kind,
                subject_type: SubjectType::User,
                subject_id: Uuid::new_v4(),
                capability_key: key.map(|k| Scope::parse(k).unwrap()),
                resource: GrantResource {
                    resource_type: None,
                    resource_id: None,
                },
            }
            .check_shape()
        };
        assert!(shape(GrantKind::Capability, Some("auth.manage")).is_ok());
        assert!(shape(GrantKind::Capability, None).is_err());
        assert!(shape(GrantKind::AccountOwner, Some("auth.manage")).is_err());
        assert!(shape(GrantKind::AccountOwner, None).is_ok());
    }
}
