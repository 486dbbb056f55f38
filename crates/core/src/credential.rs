//! Credential records as the domain sees them, whatever the surface or the store.

use crate::ids::{CredentialId, TenantId, UserId};
use crate::registry::RobotPermission;
use crate::scope::ScopeSet;
use crate::secret::TokenHash;
use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    ApiToken,
    ServiceAccount,
    RobotAccount,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 3] = [
        CredentialKind::ApiToken,
        CredentialKind::ServiceAccount,
        CredentialKind::RobotAccount,
    ];

    /// The stable name used in storage, logs, metrics and verification answers.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiToken => "api_token",
            CredentialKind::ServiceAccount => "service_account",
            CredentialKind::RobotAccount => "robot_account",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// The non-secret parts of a token that may be shown: `prefix` (Aether's display prefix, or
/// Hybridbox's `token_prefix`), `public_id` (Hybridbox's `token_public_id`), and the last 4 chars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDisplay {
    pub prefix: String,
    pub public_id: Option<String>,
    pub last4: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// One credential of any kind. `secret_hash` is the only trace of the secret.
#[derive(Debug, Clone, PartialEq)]
pub struct Credential {
    pub id: CredentialId,
    pub tenant_id: TenantId,
    pub kind: CredentialKind,
    pub name: String,
    pub secret_hash: TokenHash,
    pub display: TokenDisplay,
    pub scopes: ScopeSet,
    /// Robot accounts only: what the robot may do in the registry.
    pub permissions: Vec<RobotPermission>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_by_user_id: Option<UserId>,
    pub revoked_by_user_id: Option<UserId>,
}

/// Why a credential that exists cannot be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    Revoked,
    Expired,
}

impl Unusable {
    pub fn as_str(self) -> &'static str {
        match self {
            Unusable::Revoked => "revoked",
            Unusable::Expired => "expired",
        }
    }
}

impl Credential {
    /// Revocation and expiry, checked everywhere a credential is used.
    pub fn usable_at(&self, now: DateTime<Utc>) -> Result<(), Unusable> {
        if self.revoked_at.is_some() {
            return Err(Unusable::Revoked);
        }
        match self.expires_at {
            Some(expires_at) if expires_at <= now => Err(Unusable::Expired),
            _ => Ok(()),
        }
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// What a caller asks for when issuing a credential, already validated.
#[derive(Debug, Clone)]
pub struct NewCredential {
    pub tenant_id: crate::TenantId,
    pub kind: CredentialKind,
    pub name: String,
    pub scopes: ScopeSet,
    pub permissions: Vec<RobotPermission>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_by_user_id: Option<UserId>,
}

impl NewCredential {
    /// Mints the secret and builds the record. The plaintext goes back to the caller exactly once.
    pub fn issue(
        self,
        now: DateTime<Utc>,
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> (Credential, crate::Plaintext) {
        let minted = crate::token::mint(self.kind, rng);
        let credential = Credential {
            id: CredentialId::new(),
            tenant_id: self.tenant_id,
            kind: self.kind,
            name: self.name,
            secret_hash: minted.hash,
            display: minted.display,
            scopes: self.scopes,
            permissions: self.permissions,
            expires_at: self.expires_at,
            created_at: now,
            updated_at: now,
            last_used_at: None,
            revoked_at: None,
            created_by_user_id: self.created_by_user_id,
            revoked_by_user_id: None,
        };
        (credential, minted.plaintext)
    }
}

/// A replacement secret for an existing credential: same id, new hash and display parts.
#[derive(Debug)]
pub struct Rotation {
    pub secret_hash: TokenHash,
    pub display: TokenDisplay,
    pub rotated_at: DateTime<Utc>,
}

impl Rotation {
    pub fn mint(
        kind: CredentialKind,
        now: DateTime<Utc>,
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> (Self, crate::Plaintext) {
        let minted = crate::token::mint(kind, rng);
        (
            Self {
                secret_hash: minted.hash,
                display: minted.display,
                rotated_at: now,
            },
            minted.plaintext,
        )
    }
}
