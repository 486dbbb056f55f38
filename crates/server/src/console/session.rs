//! Server-side console sessions, in the store (`console_sessions`), so every replica knows them
//! and a restart signs no one out. The browser holds only a random cookie value; the store keeps
//! its SHA-256 and, sealed with a key derived from the cookie value (HKDF-SHA256 →
//! ChaCha20-Poly1305), the credential the user signed in with and the one-time secrets waiting to
//! be shown (each kept in the transaction of the change that made it, [`SecretHome`]): a copy of
//! the store (a backup) holds no usable token. Every request unseals the token
//! and authenticates it through the normal `Verifier`, so a revocation, suspension or expiry of
//! that credential ends the console session at once. The CSRF token is derived from the cookie
//! value too, so nothing else is stored.
//!
//! Pending "Sign in with …" logins (ten minutes at most) stay in this process: behind several
//! replicas, the issuer's redirect must reach the replica that started the login.

use crate::app::App;
use crate::error::AppError;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use chrono::{DateTime, TimeDelta, Utc};
use data_encoding::BASE64URL_NOPAD;
use hkdf::Hkdf;
use keyplane_core::audit::{actions, AuditActor};
use keyplane_core::{AuditEvent, CredentialKind, RequestContext, TenantId};
use keyplane_store::{ConsoleSecret, ConsoleSession, KeptAnswer, StoreError};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Pending "Sign in with …" logins kept at once, and how long each may take.
const MAX_PENDING: usize = 1_000;
/// Sign-ins one client address may have started and not finished (a person with a few tabs).
const MAX_PENDING_PER_CLIENT: usize = 10;
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

    /// The session's CSRF token: derived from the cookie value, so the page can carry it while
    /// the cookie itself stays out of reach of scripts.
    pub(crate) fn csrf(&self) -> String {
        let mut token = [0u8; 32];
        Hkdf::<Sha256>::new(None, &self.0)
            .expand(b"keyplane console csrf v1", &mut token)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        BASE64URL_NOPAD.encode(&token)
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

impl Sealed {
    /// Nonce, then ciphertext: how the store keeps it.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        [&self.nonce[..], &self.ciphertext].concat()
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (nonce, ciphertext) = bytes.split_first_chunk::<12>()?;
        Some(Self {
            nonce: *nonce,
            ciphertext: ciphertext.to_vec(),
        })
    }
}

/// The id a session's audit events name it by (target `console_session`): derived from the id
/// the store keeps, so that a session's start and end share it, while neither the cookie value
/// nor the store's key for it is written out.
fn audit_id(id_hash: &[u8; 32]) -> uuid::Uuid {
    let digest = Sha256::new()
        .chain_update(b"keyplane console session audit id v1")
        .chain_update(id_hash)
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// How a session's start or end is recorded: its action, who acted, from where, and the one
/// detail it carries (`method` of a start, `reason` of an end).
pub(crate) struct Recorded<'a> {
    pub action: &'static str,
    pub actor: AuditActor,
    pub context: &'a RequestContext,
    pub detail: Option<(&'static str, &'static str)>,
}

impl Recorded<'_> {
    /// An end (`console.session_ended`) for `reason`.
    pub(crate) fn end<'c>(
        actor: AuditActor,
        context: &'c RequestContext,
        reason: &'static str,
    ) -> Recorded<'c> {
        Recorded {
            action: actions::CONSOLE_SESSION_ENDED,
            actor,
            context,
            detail: Some(("reason", reason)),
        }
    }

    fn event(&self, tenant: TenantId, id_hash: &[u8; 32], label: &str) -> AuditEvent {
        session_event(
            crate::ops::audit_event(tenant, self.action, self.actor.clone(), self.context),
            id_hash,
            label,
            self.detail,
        )
    }
}

fn session_event(
    event: AuditEvent,
    id_hash: &[u8; 32],
    label: &str,
    detail: Option<(&str, &str)>,
) -> AuditEvent {
    let event = event.target("console_session", audit_id(id_hash), Some(label));
    match detail {
        Some((key, value)) => event.text(key, value),
        None => event,
    }
}

/// A session that ends: its organization and label, and how its end is recorded.
pub(crate) struct Ending<'a> {
    pub tenant: TenantId,
    pub label: &'a str,
    pub recorded: Recorded<'a>,
}

/// A secret to show once, on the next visit of the secret page.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct SecretFlash {
    pub kind: String,
    pub id: uuid::Uuid,
    pub name: String,
    pub secret: String,
    /// What the secret page says it came from ("Created.", "Rotated. The previous secret …").
    pub note: String,
}

impl SecretFlash {
    pub(crate) fn kind(&self) -> Option<CredentialKind> {
        CredentialKind::parse(&self.kind)
    }
}

fn open_flash(cookie: &CookieValue, sealed: &[u8]) -> Option<SecretFlash> {
    Sealed::from_bytes(sealed)
        .and_then(|s| cookie.open(&s))
        .and_then(|json| serde_json::from_str(&json).ok())
}

/// What a session moving to a new credential keeps: its organization, label and end.
#[derive(Clone)]
pub(crate) struct Move {
    pub tenant: TenantId,
    pub who: String,
    pub ends_at: DateTime<Utc>,
}

/// Where a console change keeps the secret it makes ([`Sessions::home`]).
#[derive(Clone)]
pub(crate) struct SecretHome {
    /// The session that shows it.
    cookie: CookieValue,
    /// The move to a new session, and the secrets it carries over (sealed for it).
    moved: Option<(Move, Vec<Vec<u8>>)>,
}

impl SecretHome {
    /// What the change keeps in its transaction ([`keyplane_store::AnswerOf`]): `flash` sealed for
    /// the session, which must not have ended by `now`; a moving session starts there, acting
    /// with the new secret.
    pub(crate) fn keep(
        &self,
        flash: &SecretFlash,
        now: DateTime<Utc>,
    ) -> Result<KeptAnswer, StoreError> {
        let json = serde_json::to_string(flash)
            .map_err(|e| StoreError::Other(anyhow::anyhow!("serialize a console secret: {e}")))?;
        let sealed = self.cookie.seal(&json).to_bytes();
        let (start, sealed) = match &self.moved {
            None => (None, vec![sealed]),
            Some((moving, carried)) => {
                let session = ConsoleSession {
                    id_hash: self.cookie.id(),
                    tenant_id: moving.tenant,
                    sealed_token: self.cookie.seal(&flash.secret).to_bytes(),
                    label: moving.who.clone(),
                    created_at: now,
                    last_seen_at: now,
                    ends_at: moving.ends_at,
                    notice: None,
                };
                let mut all = carried.clone();
                all.push(sealed);
                (Some(session), all)
            }
        };
        Ok(KeptAnswer::ConsoleSecret(ConsoleSecret {
            session: self.cookie.id(),
            sealed,
            at: now,
            start,
        }))
    }

    /// The new session's cookie, if the change moved the session.
    pub(crate) fn moved_to(&self) -> Option<&CookieValue> {
        self.moved.as_ref().map(|_| &self.cookie)
    }
}

/// A live session, as a request sees it.
pub(crate) struct Session {
    pub tenant: TenantId,
    /// The credential (API token, service-account secret or user access token) it acts with.
    pub token: String,
    /// Who signed in, for the header: a token's name or a user's subject.
    pub who: String,
    pub notice: Option<String>,
    pub ends_at: DateTime<Utc>,
}

/// A started "Sign in with …": what the callback must match.
pub(crate) struct PendingLogin {
    pub state: String,
    pub nonce: String,
    pub code_verifier: String,
    pub started: Instant,
    /// Where the sign-in was started from, as a [`crate::client_addr::ClientAddr::limit_key`]
    /// (`None`: through no listener, as in-process tests).
    pub client: Option<std::net::IpAddr>,
    /// The console page to go back to once signed in (checked by `way_back` when the sign-in
    /// started and again when it ends).
    pub next: Option<String>,
}

/// [`Sessions::start_pending`] holds as many sign-ins under way as it keeps: try again later.
#[derive(Debug)]
pub(crate) struct SignInsBusy;

pub(crate) struct Sessions {
    pending: Mutex<HashMap<[u8; 32], PendingLogin>>,
    idle: Duration,
    absolute: Duration,
}

/// Sessions pruned per store call (the background work calls it every few seconds).
const PRUNE_BATCH: u32 = 500;

pub(crate) fn random_text() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    BASE64URL_NOPAD.encode(&bytes)
}

/// Constant-time equality of two texts (CSRF tokens, OAuth `state`).
pub(crate) fn same_text(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}

impl Sessions {
    pub(crate) fn new(idle: Duration, absolute: Duration) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            idle,
            absolute,
        }
    }

    /// Starts a session acting with `token` in `tenant`, ending at the absolute timeout or at
    /// `token_ends` (an access token's expiry), whichever comes first, and records its start as
    /// `started` says, in the same transaction. Returns the cookie value for the browser.
    pub(crate) async fn create(
        &self,
        app: &App,
        tenant: TenantId,
        token: &str,
        who: String,
        token_ends: Option<DateTime<Utc>>,
        started: Recorded<'_>,
    ) -> Result<CookieValue, AppError> {
        let cookie = CookieValue::fresh();
        let now = app.now();
        let absolute = now + delta(self.absolute);
        let event = started.event(tenant, &cookie.id(), &who);
        app.store()
            .insert_console_session(
                &ConsoleSession {
                    id_hash: cookie.id(),
                    tenant_id: tenant,
                    sealed_token: cookie.seal(token).to_bytes(),
                    label: who,
                    created_at: now,
                    last_seen_at: now,
                    ends_at: token_ends.map_or(absolute, |end| end.min(absolute)),
                    notice: None,
                },
                &event,
            )
            .await?;
        Ok(cookie)
    }

    /// Replaces the session of `old` (in `from`) by one in `tenant` acting with `token`, labelled
    /// `who`, ending when `old` would have (a move extends nothing), and ends `old`: a switch of
    /// organization, by `actor`. Recorded in each organization's trail: the arrival
    /// (`console.organization_switched`) in `tenant`, the end (`switched_organization`) in
    /// `from`. Returns the new cookie value.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn replace(
        &self,
        app: &App,
        old: &CookieValue,
        from: TenantId,
        tenant: TenantId,
        token: &str,
        who: String,
        ends_at: DateTime<Utc>,
        actor: AuditActor,
        context: &RequestContext,
    ) -> Result<CookieValue, AppError> {
        let label = who.clone();
        let arrived = Recorded {
            action: actions::CONSOLE_ORGANIZATION_SWITCHED,
            actor: actor.clone(),
            context,
            detail: None,
        };
        let cookie = self
            .create(app, tenant, token, who, Some(ends_at), arrived)
            .await?;
        let left = Ending {
            tenant: from,
            label: &label,
            recorded: Recorded::end(actor, context, "switched_organization"),
        };
        self.end(app, old, Some(left)).await?;
        Ok(cookie)
    }

    /// The live session of `cookie`, touched (its idle timer restarts); `None` when there is none
    /// or it timed out.
    pub(crate) async fn touch(
        &self,
        app: &App,
        cookie: &CookieValue,
    ) -> Result<Option<Session>, AppError> {
        let now = app.now();
        let Some(stored) = app
            .store()
            .touch_console_session(&cookie.id(), now, now - delta(self.idle))
            .await?
        else {
            return Ok(None);
        };
        let Some(token) = Sealed::from_bytes(&stored.sealed_token).and_then(|s| cookie.open(&s))
        else {
            return Ok(None);
        };
        Ok(Some(Session {
            tenant: stored.tenant_id,
            token,
            who: stored.label,
            notice: stored.notice,
            ends_at: stored.ends_at,
        }))
    }

    /// Ends the session of `cookie`, recording its end as `ending` says (`None`: it goes on in
    /// another session, which records its end). Returns whether there was one to end.
    pub(crate) async fn end(
        &self,
        app: &App,
        cookie: &CookieValue,
        ending: Option<Ending<'_>>,
    ) -> Result<bool, AppError> {
        let id = cookie.id();
        let event = ending.map(|e| e.recorded.event(e.tenant, &id, e.label));
        Ok(app
            .store()
            .delete_console_session(&id, event.as_ref())
            .await?)
    }

    pub(crate) async fn set_notice(
        &self,
        app: &App,
        cookie: &CookieValue,
        notice: Option<&str>,
    ) -> Result<(), AppError> {
        Ok(app
            .store()
            .set_console_session_notice(&cookie.id(), notice)
            .await?)
    }

    /// The secrets waiting in the session of `cookie`, oldest first, taken out of the store: of
    /// two requests, each secret goes to one, and a reload finds nothing.
    pub(crate) async fn take_secrets(
        &self,
        app: &App,
        cookie: &CookieValue,
    ) -> Result<Vec<SecretFlash>, AppError> {
        let sealed = app
            .store()
            .take_console_session_secrets(&cookie.id())
            .await?;
        Ok(sealed
            .iter()
            .filter_map(|bytes| open_flash(cookie, bytes))
            .collect())
    }

    /// Where a change the session of `cookie` makes keeps its new secret: in that session, or,
    /// with `moving` (the session's own credential is rotated, so its sealed token is about to
    /// stop working and the session with it), in a new session acting with the new secret, which
    /// takes along the secrets still waiting in the old one. The store keeps no way to reseal a
    /// session in place, and a credential change earns a fresh session id anyway.
    pub(crate) async fn home(
        &self,
        app: &App,
        cookie: &CookieValue,
        moving: Option<Move>,
    ) -> Result<SecretHome, AppError> {
        let Some(moving) = moving else {
            return Ok(SecretHome {
                cookie: cookie.clone(),
                moved: None,
            });
        };
        let new = CookieValue::fresh();
        let carried = app
            .store()
            .console_session_secrets(&cookie.id())
            .await?
            .iter()
            .filter_map(|bytes| Sealed::from_bytes(bytes).and_then(|s| cookie.open(&s)))
            .map(|json| new.seal(&json).to_bytes())
            .collect();
        Ok(SecretHome {
            cookie: new,
            moved: Some((moving, carried)),
        })
    }

    /// Forgets ended and idle sessions (the background work), recording each end (`expired` or
    /// `idle`, actor `system`).
    pub(crate) async fn prune(&self, app: &App) {
        let now = app.now();
        let unattended = RequestContext::default();
        let ended = |session: &ConsoleSession| {
            let reason = if session.ends_at <= now {
                "expired"
            } else {
                "idle"
            };
            let event = crate::ops::audit_event(
                session.tenant_id,
                actions::CONSOLE_SESSION_ENDED,
                AuditActor::system(),
                &unattended,
            );
            session_event(
                event,
                &session.id_hash,
                &session.label,
                Some(("reason", reason)),
            )
        };
        if let Err(error) = app
            .store()
            .prune_console_sessions(now, now - delta(self.idle), PRUNE_BATCH, &ended)
            .await
        {
            tracing::warn!(error = %error, "pruning console sessions failed; the next round retries");
        }
    }

    /// Remembers a started OIDC login under the browser's pending-login cookie. Anyone may start
    /// one, so each client address holds at most [`MAX_PENDING_PER_CLIENT`]: past it, that
    /// address's oldest goes. Past [`MAX_PENDING`] in all, the oldest of the address holding the
    /// most goes, if it holds more than one: a person has one or two under way, a flood from a few
    /// hundred addresses ten each, so the flood pays. Only when every address holds one (a flood
    /// from a thousand addresses, cheap as IPv6 /64s) is a new sign-in refused rather than ending
    /// another's before its callback.
    pub(crate) fn start_pending(
        &self,
        cookie: &CookieValue,
        login: PendingLogin,
    ) -> Result<(), SignInsBusy> {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, p| now.duration_since(p.started) < PENDING_TTL);
        let client = login.client;
        let same_client = pending.values().filter(|p| p.client == client).count();
        if same_client >= MAX_PENDING_PER_CLIENT {
            if let Some(oldest) = pending
                .iter()
                .filter(|(_, p)| p.client == client)
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| *k)
            {
                pending.remove(&oldest);
            }
        } else if pending.len() >= MAX_PENDING {
            let mut held: HashMap<Option<std::net::IpAddr>, usize> = HashMap::new();
            for p in pending.values() {
                *held.entry(p.client).or_default() += 1;
            }
            let busiest = held
                .into_iter()
                .max_by_key(|(_, count)| *count)
                .filter(|(_, count)| *count > 1)
                .map(|(client, _)| client)
                .ok_or(SignInsBusy)?;
            if let Some(oldest) = pending
                .iter()
                .filter(|(_, p)| p.client == busiest)
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| *k)
            {
                pending.remove(&oldest);
            }
        }
        pending.insert(cookie.id(), login);
        Ok(())
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

    fn login_from(client: [u8; 4], started: Instant) -> PendingLogin {
        PendingLogin {
            state: random_text(),
            nonce: random_text(),
            code_verifier: random_text(),
            started,
            client: Some(std::net::IpAddr::from(client)),
            next: None,
        }
    }

    /// `/console/oidc/start` needs no sign-in: one address starting sign-ins in a loop must not
    /// push out a sign-in someone else has under way.
    #[test]
    fn one_address_cannot_push_out_others_pending_sign_ins() {
        let sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(600));
        let start = Instant::now();
        let theirs = CookieValue::fresh();
        sessions
            .start_pending(&theirs, login_from([192, 0, 2, 1], start))
            .expect("room");
        let mine: Vec<CookieValue> = (0..(MAX_PENDING as u32 * 2))
            .map(|n| {
                let cookie = CookieValue::fresh();
                let at = start + Duration::from_millis(u64::from(n) + 1);
                // Past its own bound, an address's oldest makes room: never refused.
                sessions
                    .start_pending(&cookie, login_from([198, 51, 100, 7], at))
                    .expect("its own oldest goes");
                cookie
            })
            .collect();
        assert!(
            sessions.take_pending(&theirs).is_some(),
            "the other address's sign-in stays"
        );
        let kept: Vec<bool> = mine
            .iter()
            .map(|c| sessions.take_pending(c).is_some())
            .collect();
        let newest = kept.len() - MAX_PENDING_PER_CLIENT;
        assert!(
            kept[newest..].iter().all(|k| *k),
            "the address's newest stay"
        );
        assert!(!kept[..newest].iter().any(|k| *k), "and only they");
    }

    /// Sessions with one person's sign-in under way (from 192.0.2.1), started at the time given.
    fn one_sign_in_under_way() -> (Sessions, Instant, CookieValue) {
        let sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(600));
        let start = Instant::now();
        let theirs = CookieValue::fresh();
        assert!(sessions
            .start_pending(&theirs, login_from([192, 0, 2, 1], start))
            .is_ok());
        (sessions, start, theirs)
    }

    /// Past the overall bound, made of many addresses' sign-ins (cheap to have: an IPv6 /64
    /// each), new sign-ins are refused: none pushes out a sign-in someone else has under way.
    #[test]
    fn past_the_overall_bound_new_sign_ins_wait() {
        let (sessions, start, theirs) = one_sign_in_under_way();
        let many: Vec<CookieValue> = (0..2 * MAX_PENDING as u32)
            .map(|n| {
                let cookie = CookieValue::fresh();
                let address = [10, (n >> 16) as u8, (n >> 8) as u8, n as u8];
                let at = start + Duration::from_millis(u64::from(n) + 1);
                let started = sessions.start_pending(&cookie, login_from(address, at));
                assert_eq!(started.is_ok(), n < MAX_PENDING as u32 - 1, "start {n}");
                cookie
            })
            .collect();
        assert!(
            sessions.take_pending(&theirs).is_some(),
            "the sign-in under way stays"
        );
        let kept: Vec<bool> = many
            .iter()
            .map(|c| sessions.take_pending(c).is_some())
            .collect();
        assert!(
            kept[..MAX_PENDING - 1].iter().all(|k| *k),
            "up to the bound"
        );
        assert!(!kept[MAX_PENDING - 1..].iter().any(|k| *k), "none past it");
    }

    /// A flood from a hundred addresses fills the bound ten each: a new sign-in pushes out the
    /// oldest of one of them, never one of a person's, and is never refused.
    #[test]
    fn past_the_overall_bound_a_few_addresses_pay_for_their_flood() {
        let (sessions, start, theirs) = one_sign_in_under_way();
        for n in 0..2 * MAX_PENDING as u32 {
            let address = [10, 0, 0, (n % 100) as u8];
            let at = start + Duration::from_millis(u64::from(n) + 1);
            assert!(sessions
                .start_pending(&CookieValue::fresh(), login_from(address, at))
                .is_ok());
        }
        let late = CookieValue::fresh();
        let at = start + Duration::from_secs(5);
        assert!(sessions
            .start_pending(&late, login_from([192, 0, 2, 2], at))
            .is_ok());
        assert!(sessions.take_pending(&theirs).is_some(), "the first stays");
        assert!(sessions.take_pending(&late).is_some(), "a new one is taken");
    }

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
    fn sealed_bytes_round_trip_and_csrf_is_per_cookie() {
        let cookie = CookieValue::fresh();
        let bytes = cookie.seal("t").to_bytes();
        let sealed = Sealed::from_bytes(&bytes).expect("nonce and ciphertext");
        assert_eq!(cookie.open(&sealed).as_deref(), Some("t"));
        assert!(Sealed::from_bytes(&bytes[..5]).is_none());
        assert_eq!(cookie.csrf(), cookie.csrf());
        assert_ne!(cookie.csrf(), CookieValue::fresh().csrf());
    }
}
