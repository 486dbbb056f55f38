//! Secret-bearing types. Neither implements `Display` or `Serialize`, and `Debug` redacts, so a
//! secret cannot reach a log line, an error message or a panic by accident.

use rand::RngCore;
use sha2::{Digest, Sha256};
use siphasher::sip128::{Hasher128, SipHasher24};
use std::fmt;
use std::hash::Hasher;
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

    /// A digest written as 64 hex digits (either case), as another system exports the SHA-256
    /// of its keys (`admin import-credentials`); `None` for anything else.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 bytes: enough to tell a credential's current secret from its previous one
    /// (a presented secret's use is credited by them), where the whole hash would not fit a cache
    /// entry's size.
    pub fn prefix(&self) -> [u8; 8] {
        let mut prefix = [0; 8];
        prefix.copy_from_slice(&self.0[..8]);
        prefix
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

/// A presented token's key in an in-memory verification cache: SipHash-2-4's 128-bit output under
/// the cache's own random key ([`CacheKeyer`]). A cache hit is decided by this key alone, so what
/// it rests on is that nobody without the key can find a token whose key equals a cached one's: a
/// keyed pseudo-random function, where a collision costs about 2^128 / (cached entries) guesses,
/// each one a request. SHA-256 ([`TokenHash`]) stays what the store keeps and what a miss looks up;
/// this key spares a cache hit, almost every verification, SHA-256's two blocks (BENCHMARKS.md,
/// "Twelfth sitting"). Unlike a hash kept in the store, it means nothing outside its process.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(u128);

impl CacheKey {
    /// Which of `shards` parts of a cache holds this key: as evenly spread as the keys are.
    pub fn shard(&self, shards: usize) -> usize {
        (self.0 % shards.max(1) as u128) as usize
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CacheKey(<redacted>)")
    }
}

/// Makes one cache's [`CacheKey`]s. Its key is drawn from the OS when it is made and never leaves
/// the process: every cache (and every replica) has its own.
pub struct CacheKeyer {
    key: (u64, u64),
}

impl CacheKeyer {
    pub fn random() -> Self {
        let mut os = rand::rngs::OsRng;
        Self {
            key: (os.next_u64(), os.next_u64()),
        }
    }

    /// The key of a presented credential, or `None` when it is longer than any credential (not
    /// hashed). Its format is not checked: a cache that admits only keys of well-formed tokens
    /// (checked by [`crate::token::kind_of`] on a miss) makes a hit vouch for the format too,
    /// since a hit is decided by the key alone (above), and a verification that hits skips the
    /// check.
    pub fn key_of_presented(&self, presented: &str) -> Option<CacheKey> {
        (presented.len() <= crate::token::MAX_TOKEN_LEN).then(|| self.key(presented))
    }

    pub fn key(&self, token: &str) -> CacheKey {
        let mut hasher = SipHasher24::new_with_keys(self.key.0, self.key.1);
        // The bytes alone (`write_str` would add a terminator): tokens are compared whole.
        hasher.write(token.as_bytes());
        CacheKey(hasher.finish128().as_u128())
    }
}

impl fmt::Debug for CacheKeyer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CacheKeyer(<redacted>)")
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

    #[test]
    fn a_cache_key_is_the_token_s_under_its_keyer_only() {
        let keys = CacheKeyer::random();
        let token = "aether_0123456789abcdef0123456789abcdef0123456789abcdef12345678";
        assert_eq!(keys.key(token), keys.key(token));
        // One character apart, or a prefix of it: another key.
        assert_ne!(keys.key(token), keys.key(&token.replace('0', "1")));
        assert_ne!(keys.key(token), keys.key(&token[..token.len() - 1]));
        // Another cache's key for the same token says nothing about this one's.
        assert_ne!(keys.key(token), CacheKeyer::random().key(token));
    }

    #[test]
    fn cache_keys_spread_evenly_over_shards() {
        let keys = CacheKeyer::random();
        let mut counts = [0u32; 16];
        // Tokens that differ in one place only, as a run of minted ones may.
        for n in 0..16_000 {
            counts[keys.key(&format!("aether_{n:056}")).shard(16)] += 1;
        }
        // 1,000 expected in each; a shard outside 850-1,150 is nearly five deviations off.
        assert!(
            counts.iter().all(|c| (850..=1_150).contains(c)),
            "{counts:?}"
        );
        assert_eq!(keys.key("a").shard(1), 0);
        assert_eq!(
            keys.key("a").shard(0),
            0,
            "no shards is one shard, not a panic"
        );
    }

    #[test]
    fn debug_never_shows_a_cache_key_or_the_keyer_s_key() {
        let keys = CacheKeyer::random();
        let shown = format!("{keys:?} {:?}", keys.key("aether_x"));
        assert_eq!(shown, "CacheKeyer(<redacted>) CacheKey(<redacted>)");
    }
}
