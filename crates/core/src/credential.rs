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
    /// Who created it, and how; `None` for rows created before this was recorded.
    pub created_by: Option<crate::CreatedBy>,
    pub revoked_by_user_id: Option<UserId>,
    /// Suspended credentials authenticate nowhere until resumed; unlike revocation, reversible.
    pub suspended_at: Option<DateTime<Utc>>,
    /// When the secret was last replaced; `None` if never.
    pub rotated_at: Option<DateTime<Utc>>,
    /// The secret a rotation with a grace period replaced, still accepted until its expiry.
    pub previous_secret: Option<PreviousSecret>,
    /// The expiry warning stage already announced for the current `expires_at` (days before it:
    /// 30, 7, 1; 0 = the expiry itself); `None` when none was. Reset when `expires_at` changes.
    pub expiry_notice_days: Option<u32>,
    /// A canary: it looks like any credential of its kind but authenticates nowhere; every
    /// presentation of it is recorded (`credential.canary_triggered`). Set at creation, never
    /// changed, and not readable from the token.
    pub canary: bool,
}

/// What a verification keeps of a credential: who it is and what its answers show (introspection,
/// whoami, a robot's registry login, a refusal's audit event). The rest of the record stays in
/// the store, so a cache of a million verified credentials holds a million of these, not records.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialIdentity {
    pub id: CredentialId,
    pub tenant_id: TenantId,
    pub kind: CredentialKind,
    pub name: Box<str>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Robot accounts only (empty, unallocated, for the others).
    pub permissions: Box<[RobotPermission]>,
}

/// The secret replaced by a rotation with a grace period: it keeps authenticating, as
/// [`SecretSlot::Previous`], until `expires_at` or until it is retired earlier.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviousSecret {
    pub hash: TokenHash,
    pub expires_at: DateTime<Utc>,
    /// The previous secret's own last use; the credential's `last_used_at` is the current one's.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Usage-aware cutover: retire it once it has gone unused this many seconds, after the new
    /// secret has been used at least once.
    pub retire_when_unused_seconds: Option<u32>,
}

/// Which of a credential's (at most two) live secrets authenticated a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSlot {
    Current,
    Previous,
}

impl SecretSlot {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretSlot::Current => "current",
            SecretSlot::Previous => "previous",
        }
    }
}

/// Why a credential that exists cannot be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    Revoked,
    Expired,
    Suspended,
    /// The secret presented is the previous one, and its grace period is over.
    PreviousSecretEnded,
}

impl Unusable {
    pub fn as_str(self) -> &'static str {
        match self {
            Unusable::Revoked => "revoked",
            Unusable::Expired => "expired",
            Unusable::Suspended => "suspended",
            Unusable::PreviousSecretEnded => "previous secret ended",
        }
    }
}

/// Whether something ending at `end_micros` has ended by `now_micros` (both microseconds since
/// the Unix epoch, the precision both stores keep; [`end_micros`] of no end never arrives): the
/// one rule for expiry and for a previous secret's grace period, reached at the end's own
/// microsecond.
fn ended_micros(end_micros: i64, now_micros: i64) -> bool {
    end_micros <= now_micros
}

/// [`ended_micros`] of times: something ending at `end` (never, if `None`) ended by `now`.
fn ended(end: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    ended_micros(end_micros(end), now.timestamp_micros())
}

/// Everything that decides whether one of a credential's secrets may be used at a given time,
/// copied out of the record: a verification cache keeps it at the head of its entry, so a cached
/// verification reads one small block rather than the whole record. Its ends are microseconds
/// since the Unix epoch (`i64::MAX`: never), so that checking them is two comparisons of integers
/// with no calendar arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretGate {
    pub kind: CredentialKind,
    pub canary: bool,
    revoked: bool,
    suspended: bool,
    expires_at_micros: i64,
    /// When this secret stops authenticating on its own: a previous secret's grace end.
    secret_ends_at_micros: i64,
}

/// An end as a [`SecretGate`] keeps it.
fn end_micros(end: Option<DateTime<Utc>>) -> i64 {
    end.map_or(i64::MAX, |end| end.timestamp_micros())
}

impl SecretGate {
    /// The secret's own end first, then revocation, suspension and expiry, at `now_micros`
    /// (microseconds since the Unix epoch).
    pub fn check(&self, now_micros: i64) -> Result<(), Unusable> {
        if ended_micros(self.secret_ends_at_micros, now_micros) {
            return Err(Unusable::PreviousSecretEnded);
        }
        if self.revoked {
            return Err(Unusable::Revoked);
        }
        if self.suspended {
            return Err(Unusable::Suspended);
        }
        if ended_micros(self.expires_at_micros, now_micros) {
            return Err(Unusable::Expired);
        }
        Ok(())
    }

    /// When this secret stops authenticating on its own, in microseconds since the Unix epoch
    /// (`i64::MAX`: never): the credential's expiry, or a previous secret's grace end if sooner.
    /// What this secret obtains (a registry token) must not outlive it.
    pub fn ends_at_micros(&self) -> i64 {
        self.expires_at_micros.min(self.secret_ends_at_micros)
    }
}

impl Credential {
    /// The gate of the secret in `slot`. A previous secret the record no longer has is ended.
    pub fn gate(&self, slot: SecretSlot) -> SecretGate {
        SecretGate {
            kind: self.kind,
            canary: self.canary,
            revoked: self.revoked_at.is_some(),
            suspended: self.suspended_at.is_some(),
            expires_at_micros: end_micros(self.expires_at),
            secret_ends_at_micros: match slot {
                SecretSlot::Current => i64::MAX,
                SecretSlot::Previous => self
                    .previous_secret
                    .as_ref()
                    .map_or(i64::MIN, |previous| previous.expires_at.timestamp_micros()),
            },
        }
    }

    /// Revocation, suspension and expiry, checked everywhere a credential is used.
    pub fn usable_at(&self, now: DateTime<Utc>) -> Result<(), Unusable> {
        self.gate(SecretSlot::Current).check(now.timestamp_micros())
    }

    /// Which secret `presented` is: the current one, or the previous one within its grace period.
    /// `Ok(None)`: neither (another credential's hash, or a previous secret retired since).
    pub fn secret_slot(
        &self,
        presented: &TokenHash,
        now: DateTime<Utc>,
    ) -> Result<SecretSlot, Option<Unusable>> {
        if self.secret_hash.matches(presented) {
            return Ok(SecretSlot::Current);
        }
        match &self.previous_secret {
            Some(previous) if previous.hash.matches(presented) => {
                if ended(Some(previous.expires_at), now) {
                    Err(Some(Unusable::PreviousSecretEnded))
                } else {
                    Ok(SecretSlot::Previous)
                }
            }
            _ => Err(None),
        }
    }

    /// The previous secret while it still authenticates.
    pub fn live_previous_secret(&self, now: DateTime<Utc>) -> Option<&PreviousSecret> {
        self.previous_secret
            .as_ref()
            .filter(|previous| !ended(Some(previous.expires_at), now))
    }

    /// The credential as of `now`: a previous secret whose grace period has ended is none (the
    /// sweep forgets it in the store a little later).
    pub fn as_of(mut self, now: DateTime<Utc>) -> Self {
        if self.live_previous_secret(now).is_none() {
            self.previous_secret = None;
        }
        self
    }

    /// Usage-aware cutover: whether the previous secret should be retired now. Only when asked
    /// for at rotation, once the new secret has been used since, and the previous one has not been
    /// presented (or not since the rotation) for the asked number of seconds.
    pub fn previous_secret_unused(&self, now: DateTime<Utc>) -> bool {
        let (Some(previous), Some(rotated_at)) = (self.live_previous_secret(now), self.rotated_at)
        else {
            return false;
        };
        let Some(seconds) = previous.retire_when_unused_seconds else {
            return false;
        };
        let new_secret_used = self.last_used_at.is_some_and(|at| at >= rotated_at);
        let quiet_since = previous.last_used_at.unwrap_or(rotated_at).max(rotated_at);
        new_secret_used && now - quiet_since >= chrono::TimeDelta::seconds(i64::from(seconds))
    }

    pub fn identity(&self) -> CredentialIdentity {
        CredentialIdentity {
            id: self.id,
            tenant_id: self.tenant_id,
            kind: self.kind,
            name: self.name.as_str().into(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            permissions: self.permissions.as_slice().into(),
        }
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    /// Whether its expiry has passed, whatever else holds it back (a suspension): an expired
    /// credential stays expired, so nothing (a rotation with a new expiry) may bring it back.
    pub fn has_expired(&self, now: DateTime<Utc>) -> bool {
        ended(self.expires_at, now)
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
    /// From the same actor as the creation's audit event.
    pub created_by: crate::CreatedBy,
    /// A canary credential (see [`Credential::canary`]).
    pub canary: bool,
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
            created_by_user_id: self.created_by.user_id(),
            created_by: Some(self.created_by),
            revoked_by_user_id: None,
            suspended_at: None,
            rotated_at: None,
            previous_secret: None,
            expiry_notice_days: None,
            canary: self.canary,
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
    /// The secret being replaced, when it stays valid for a grace period; `None`: it stops at
    /// once. Either way an earlier previous secret ends now (at most two live secrets).
    pub previous: Option<PreviousSecret>,
    /// The credential's expiry after the rotation.
    pub expires_at: Option<DateTime<Utc>>,
    /// The expiry is unchanged, so the expiry warnings already sent for it stand.
    pub keeps_expiry: bool,
}

/// The most a grace period may last: 7 days.
pub const MAX_GRACE_SECONDS: u32 = 604_800;

/// What a caller asks of a rotation besides the new secret.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationOptions {
    /// How long the replaced secret keeps working; 0: it stops at once.
    pub grace_seconds: u32,
    /// Retire the replaced secret early once it has gone unused this long.
    pub retire_when_unused_seconds: Option<u32>,
}

impl Rotation {
    /// Mints the new secret for `current`, keeping its secret as the previous one for the grace
    /// period `options` asks for.
    pub fn mint(
        current: &Credential,
        options: RotationOptions,
        expires_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> (Self, crate::Plaintext) {
        let minted = crate::token::mint(current.kind, rng);
        let previous = (options.grace_seconds > 0).then(|| PreviousSecret {
            hash: current.secret_hash,
            expires_at: now + chrono::TimeDelta::seconds(i64::from(options.grace_seconds)),
            last_used_at: None,
            retire_when_unused_seconds: options.retire_when_unused_seconds,
        });
        (
            Self {
                secret_hash: minted.hash,
                display: minted.display,
                rotated_at: now,
                previous,
                expires_at,
                keeps_expiry: expires_at == current.expires_at,
            },
            minted.plaintext,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn credential(now: DateTime<Utc>) -> Credential {
        NewCredential {
            tenant_id: crate::TenantId::new(),
            kind: CredentialKind::ApiToken,
            name: "ci".into(),
            scopes: ScopeSet::empty(),
            permissions: Vec::new(),
            expires_at: Some(now + TimeDelta::hours(1)),
            created_by: crate::CreatedBy::system(crate::Channel::Api),
            canary: false,
        }
        .issue(now, &mut rand::rngs::OsRng)
        .0
    }

    #[test]
    fn a_gate_answers_as_the_record_does() {
        let now = crate::validate::truncate_to_micros(Utc::now());
        let mut credential = credential(now);
        let previous = self::credential(now).secret_hash;
        credential.previous_secret = Some(PreviousSecret {
            hash: previous,
            expires_at: now + TimeDelta::minutes(5),
            last_used_at: None,
            retire_when_unused_seconds: None,
        });
        let current = credential.gate(SecretSlot::Current);
        let grace = credential.gate(SecretSlot::Previous);
        for at in [now, now + TimeDelta::minutes(5), now + TimeDelta::hours(1)] {
            assert_eq!(
                current.check(at.timestamp_micros()),
                credential.usable_at(at),
                "at {at}"
            );
            let slot = credential.secret_slot(&previous, at);
            match grace.check(at.timestamp_micros()) {
                Ok(()) => assert_eq!(slot, Ok(SecretSlot::Previous)),
                Err(Unusable::PreviousSecretEnded) => {
                    assert_eq!(slot, Err(Some(Unusable::PreviousSecretEnded)))
                }
                Err(other) => assert_eq!(credential.usable_at(at), Err(other)),
            }
        }
        // The grace period ends at its instant exactly, and before the credential expires.
        assert_eq!(
            grace.check((now + TimeDelta::minutes(5)).timestamp_micros() - 1),
            Ok(())
        );
        assert_eq!(
            grace.check((now + TimeDelta::minutes(5)).timestamp_micros()),
            Err(Unusable::PreviousSecretEnded)
        );
        assert_eq!(
            current.check((now + TimeDelta::minutes(5)).timestamp_micros()),
            Ok(())
        );
        assert_eq!(
            current.check((now + TimeDelta::hours(1)).timestamp_micros()),
            Err(Unusable::Expired)
        );
    }

    #[test]
    fn revocation_and_suspension_close_every_secret() {
        let now = Utc::now();
        let mut credential = credential(now);
        credential.suspended_at = Some(now);
        assert_eq!(
            credential
                .gate(SecretSlot::Current)
                .check(now.timestamp_micros()),
            Err(Unusable::Suspended)
        );
        credential.revoked_at = Some(now);
        assert_eq!(
            credential
                .gate(SecretSlot::Current)
                .check(now.timestamp_micros()),
            Err(Unusable::Revoked)
        );
        // A previous secret the record no longer holds authenticates nothing.
        assert_eq!(
            credential
                .gate(SecretSlot::Previous)
                .check(now.timestamp_micros()),
            Err(Unusable::PreviousSecretEnded)
        );
    }
}
