//! Secret-bearing types. Neither implements `Display` or `Serialize`, and `Debug` redacts, so a
//! secret cannot reach a log line, an error message or a panic by accident.

use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

/// A credential's plaintext secret. It exists only between minting and the create/rotate response.
pub struct Plaintext(String);

impl Plaintext {
    pub(crate) fn new(text: String) -> Self {
        Self(text)
    }

    /// A secret a client received in a create or rotate response (the `keyplane` CLI): typed
    /// from the moment it is read, so it redacts like a minted one.
    pub fn received(text: String) -> Self {
        Self(text)
    }

    /// The one door out: used to hash, and to put the secret in a create or rotate response.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Plaintext(<redacted>)")
    }
}

/// SHA-256 of a full token: what the store keeps. Secrets carry at least 192 random bits, so a
/// slow password hash would add nothing but latency on the verification path.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time comparison, for every place a presented secret meets a stored one.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(<redacted>)")
    }
}

/// A private key in PEM form (the registry token signing key). Redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let p = Plaintext::new("aether_supersecret".into());
        assert!(!format!("{p:?}").contains("supersecret"));
        assert!(!format!("{:?}", p.hash()).contains(&hex::encode(p.hash().as_bytes())));
    }

    #[test]
    fn hash_matches_itself_only() {
        let a = TokenHash::of("a");
        assert!(a.matches(&TokenHash::of("a")));
        assert!(!a.matches(&TokenHash::of("b")));
    }
}
