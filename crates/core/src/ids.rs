//! Identifier newtypes. They are built only by `new`/`parse`/`from_uuid`, so a tenant id can never be
//! passed where a credential id is expected.

use std::fmt;
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// Parses the textual UUID form (any case, hyphenated or not).
            pub fn parse(text: &str) -> Option<Self> {
                Uuid::parse_str(text).ok().map(Self)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }
    };
}

uuid_id!(
    /// An Aether organization and a Hybridbox account at once.
    TenantId
);
uuid_id!(
    /// A credential's stable id: it survives rotation.
    CredentialId
);
uuid_id!(
    /// A human user, from an OAuth/OIDC `sub`.
    UserId
);
uuid_id!(
    /// A grant (Hybridbox "authorization").
    GrantId
);

impl GrantId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for GrantId {
    fn default() -> Self {
        Self::new()
    }
}

impl TenantId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl CredentialId {
    /// Version 7: ids sort by creation time, which makes them a stable pagination cursor.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl UserId {
    /// `UUIDv5(NAMESPACE_URL, issuer + "#" + sub)`: the same person keeps one id per issuer, and
    /// no issuer can produce an id another issuer's `sub` maps to.
    pub fn from_subject(issuer: &str, sub: &str) -> Self {
        Self(Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            format!("{issuer}#{sub}").as_bytes(),
        ))
    }

    /// A `sub` that is a UUID in canonical lower-case hyphenated form, taken as the user id itself
    /// (for the one issuer an operator trusts to name users by their keyplane ids). Not a version 5
    /// UUID: those are what [`UserId::from_subject`] gives every other issuer's users, and taking
    /// one as it is would let this issuer act as them.
    pub fn from_uuid_subject(sub: &str) -> Option<Self> {
        let uuid = Uuid::parse_str(sub).ok()?;
        let canonical = uuid.hyphenated().to_string() == sub;
        (canonical && uuid.get_version_num() != 5).then_some(Self(uuid))
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for CredentialId {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_sub_is_a_user_id_only_in_canonical_form() {
        let sub = "3c90c3cc-0d44-4b50-8888-8dd25736052a";
        assert_eq!(
            UserId::from_uuid_subject(sub).map(|u| u.to_string()),
            Some(sub.to_string())
        );
        for other in [
            "3C90C3CC-0D44-4B50-8888-8DD25736052A",
            "3c90c3cc0d444b5088888dd25736052a",
            "{3c90c3cc-0d44-4b50-8888-8dd25736052a}",
            "urn:uuid:3c90c3cc-0d44-4b50-8888-8dd25736052a",
            "alice",
        ] {
            assert_eq!(UserId::from_uuid_subject(other), None, "{other}");
        }
        let v5 = UserId::from_subject("https://other", "bob").to_string();
        assert_eq!(
            UserId::from_uuid_subject(&v5),
            None,
            "another issuer's user"
        );
        // Without the exception, a UUID sub is hashed like any other.
        assert_ne!(UserId::from_subject("https://idp", sub).to_string(), sub);
    }

    #[test]
    fn user_id_from_other_sub_is_v5_of_issuer_and_sub() {
        let a = UserId::from_subject("https://idp", "alice");
        let expected = Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://idp#alice");
        assert_eq!(a.as_uuid(), expected);
        assert_ne!(a, UserId::from_subject("https://other", "alice"));
    }

    #[test]
    fn credential_ids_sort_by_creation() {
        let first = CredentialId::new();
        let second = CredentialId::new();
        assert!(first < second);
    }
}
