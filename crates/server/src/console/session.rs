//! Server-side console sessions. The browser holds only a random cookie value; the server keeps
//! its SHA-256 and, sealed with a key derived from the cookie value (HKDF-SHA256 →
//! ChaCha20-Poly1305), the credential the user signed in with. Every request unseals it and
//! authenticates it through the normal `Verifier`, so a revocation, suspension or expiry of that
//! credential ends the console session at once, and a copy of the server's memory without the
//! browser's cookie holds no usable token.
//!
//! Sessions live in this process (a restart signs everyone out; several replicas behind one name
//! need sticky sessions): the console is for people, at human rates, and keeping the sealed token
//! out of the store keeps it out of backups.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use data_encoding::BASE64URL_NOPAD;
use hkdf::Hkdf;
use keyplane_core::{CredentialId, CredentialKind, TenantId};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// More live sessions than this: the oldest are dropped first (a flood of sign-ins cannot grow
/// memory without bound).
const MAX_SESSIONS: usize = 10_000;
/// Pending "Sign in with …" logins kept at once, and how long each may take.
const MAX_PENDING: usize = 1_000;
pub(crate) const PENDING_TTL: Duration = Duration::from_secs(600);

/// The random value a browser holds (cookie), 32 bytes.
#[derive(Clone)]
pub(crate) struct CookieValue([u8; 32]);

impl CookieValue {
    pub(crate) fn fresh() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        let bytes = BASE64URL_NOPAD.decode(text.as_bytes()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    pub(crate) fn encode(&self) -> String {
        BASE64URL_NOPAD.encode(&self.0)
    }

    /// What the server indexes sessions by: never the value itself.
    fn id(&self) -> [u8; 32] {
        Sha256::digest(self.0).into()
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(None, &self.0)
            .expand(b"keyplane console session seal v1", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        ChaCha20Poly1305::new(&key.into())
    }

    /// Seals `secret` so that only a request bearing this cookie can read it back.
    pub(crate) fn seal(&self, secret: &str) -> Sealed {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher()
            .encrypt(&nonce.into(), secret.as_bytes())
            .expect("ChaCha20-Poly1305 seals any secret this size");
        Sealed { nonce, ciphertext }
    }

    pub(crate) fn open(&self, sealed: &Sealed) -> Option<String> {
        let plain = self
            .cipher()
            .decrypt(&sealed.nonce.into(), sealed.ciphertext.as_slice())
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

#[derive(Clone)]
pub(crate) struct Sealed {
    nonce: [u8; 12],
    ciphertext: Vec<u8>,
}

/// A secret to show once, on the next visit of the secret page.
#[derive(Clone)]
pub(crate) struct SecretFlash {
    pub kind: CredentialKind,
    pub id: CredentialId,
    pub name: String,
    pub sealed: Sealed,
    /// What the secret page says it came from ("created", "rotated; the old secret works until …").
    pub note: String,
    /// Robots: the login lines for docker and skopeo (they read the secret from stdin).
    pub commands: Vec<String>,
}

#[derive(Clone)]
pub(crate) struct Session {
    pub tenant: TenantId,
    /// The credential (API token, service-account secret or user access token) it acts with.
    pub sealed_token: Sealed,
    pub csrf: String,
    /// Who signed in, for the header: a token's name or a user's subject.
    pub who: String,
    pub created: Instant,
    pub last_seen: Instant,
    /// The absolute end: the absolute timeout, or earlier when the signed-in token expires.
    pub ends: Instant,
    /// A one-time message for the next page.
    pub notice: Option<String>,
    pub secret: Option<SecretFlash>,
}

/// A started "Sign in with …": what the callback must match.
pub(crate) struct PendingLogin {
    pub state: String,
    pub nonce: String,
    pub code_verifier: String,
    pub started: Instant,
}

pub(crate) struct Sessions {
    live: Mutex<HashMap<[u8; 32], Session>>,
    pending: Mutex<HashMap<[u8; 32], PendingLogin>>,
    idle: Duration,
    absolute: Duration,
}

pub(crate) fn random_text() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    BASE64URL_NOPAD.encode(&bytes)
}

/// Constant-time equality of two texts (CSRF tokens, OAuth `state`).
pub(crate) fn same_text(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Sessions {
    pub(crate) fn new(idle: Duration, absolute: Duration) -> Self {
        Self {
            live: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            idle,
            absolute,
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session acting with `token` in `tenant`; `token_ends` bounds it further (an access
    /// token's expiry). Returns the cookie value for the browser.
    pub(crate) fn create(
        &self,
        tenant: TenantId,
        token: &str,
        who: String,
        token_ends: Option<Instant>,
    ) -> CookieValue {
        let cookie = CookieValue::fresh();
        let now = Instant::now();
        let absolute = now + self.absolute;
        let session = Session {
            tenant,
            sealed_token: cookie.seal(token),
            csrf: random_text(),
            who,
            created: now,
            last_seen: now,
            ends: token_ends.map_or(absolute, |end| end.min(absolute)),
            notice: None,
            secret: None,
        };
        let mut live = self.live();
        live.retain(|_, s| self.is_alive(s, now));
        while live.len() >= MAX_SESSIONS {
            let Some(oldest) = live.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k) else {
                break;
            };
            live.remove(&oldest);
        }
        live.insert(cookie.id(), session);
        cookie
    }

    fn is_alive(&self, session: &Session, now: Instant) -> bool {
        now < session.ends && now.duration_since(session.last_seen) < self.idle
    }

    /// The live session of `cookie`, touched (its idle timer restarts). An expired one is removed.
    pub(crate) fn touch(&self, cookie: &CookieValue) -> Option<Session> {
        let now = Instant::now();
        let mut live = self.live();
        let id = cookie.id();
        let session = live.get_mut(&id)?;
        if !self.is_alive(session, now) {
            live.remove(&id);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    pub(crate) fn end(&self, cookie: &CookieValue) {
        self.live().remove(&cookie.id());
    }

    pub(crate) fn set_notice(&self, cookie: &CookieValue, notice: String) {
        if let Some(session) = self.live().get_mut(&cookie.id()) {
            session.notice = Some(notice);
        }
    }

    pub(crate) fn take_notice(&self, cookie: &CookieValue) -> Option<String> {
        self.live().get_mut(&cookie.id())?.notice.take()
    }

    pub(crate) fn set_secret(&self, cookie: &CookieValue, secret: SecretFlash) {
        if let Some(session) = self.live().get_mut(&cookie.id()) {
            session.secret = Some(secret);
        }
    }

    /// The secret waiting to be shown, removed: a reload finds nothing.
    pub(crate) fn take_secret(&self, cookie: &CookieValue) -> Option<SecretFlash> {
        self.live().get_mut(&cookie.id())?.secret.take()
    }

    /// Remembers a started OIDC login under the browser's pending-login cookie.
    pub(crate) fn start_pending(&self, cookie: &CookieValue, login: PendingLogin) {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, p| now.duration_since(p.started) < PENDING_TTL);
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| *k)
            {
                pending.remove(&oldest);
            }
        }
        pending.insert(cookie.id(), login);
    }

    /// The pending login of this cookie, removed (a callback is used once).
    pub(crate) fn take_pending(&self, cookie: &CookieValue) -> Option<PendingLogin> {
        let login = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie.id())?;
        (login.started.elapsed() < PENDING_TTL).then_some(login)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_opens_only_with_its_cookie() {
        let cookie = CookieValue::fresh();
        let sealed = cookie.seal("aether_secret");
        assert_eq!(cookie.open(&sealed).as_deref(), Some("aether_secret"));
        assert_eq!(CookieValue::fresh().open(&sealed), None);
        let parsed = CookieValue::parse(&cookie.encode()).expect("round trip");
        assert_eq!(parsed.open(&sealed).as_deref(), Some("aether_secret"));
    }

    #[test]
    fn idle_and_absolute_timeouts_end_a_session() {
        let sessions = Sessions::new(Duration::from_millis(50), Duration::from_secs(60));
        let tenant = TenantId::from_uuid(uuid::Uuid::new_v4());
        let cookie = sessions.create(tenant, "t", "who".into(), None);
        assert!(sessions.touch(&cookie).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(sessions.touch(&cookie).is_none(), "idle timeout");

        let sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(60));
        let ended = sessions.create(tenant, "t", "who".into(), Some(Instant::now()));
        assert!(
            sessions.touch(&ended).is_none(),
            "the token's end bounds it"
        );
        let cookie = sessions.create(tenant, "t", "who".into(), None);
        sessions.end(&cookie);
        assert!(sessions.touch(&cookie).is_none(), "signed out");
    }
}
