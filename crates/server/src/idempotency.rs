//! Safe retries, as Stripe has them: an `Idempotency-Key` request header on every create and
//! rotate route. The first request with a key runs and its successful answer is kept for 24 h; a
//! retry with the same key and the same request gets that answer again (the one-time secret
//! included) without a second change.
//!
//! The store never holds the key nor a usable secret: HKDF-SHA256 over the key (salted with the
//! tenant and the caller) gives the record's lookup id and, with another `info`, the
//! ChaCha20-Poly1305 key that seals the answer's body.
//!
//! A success is kept in the change's own store transaction: the answer is rendered and sealed
//! inside it (from the record as that transaction wrote it) and completes the claimed record there,
//! so a change is committed if and only if its answer is kept. No crash or store failure after the
//! commit can leave a change whose retry would run it again; and a request whose claim was taken
//! over (its lock ran out while it was still running) changes nothing and answers 409.
//!
//! Only successes are kept. Every refusal of these routes changes nothing (each change is one
//! store transaction), so a refused request releases its key and the client may retry it, with the
//! same key, once the cause is fixed; a 503 in particular is never kept.

use crate::app::App;
use crate::error::{ApiError, AppError, Surface};
use crate::extract::{ApiJson, FromJsonBody};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{request::Parts, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use chrono::TimeDelta;
use hkdf::Hkdf;
use keyplane_core::error::codes;
use keyplane_core::{Capability, Error as DomainError, FieldError, FieldPath, Principal, TenantId};
use keyplane_store::{
    IdempotencyClaim, IdempotencyRecord, IdempotentAnswer, StoreError, StoredResponse,
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

pub const HEADER: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer replayed from an earlier request (Stripe's name).
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const HEADER_DISPLAY: &str = "Idempotency-Key";
const MIN_LEN: usize = 16;
const MAX_LEN: usize = 255;

/// How long an answer is replayed, and kept.
pub const RETENTION: TimeDelta = TimeDelta::hours(24);
/// How long a request holds its key before a retry may take it over: the bound after a crash
/// before the change (which then never happens). Well above the store's own timeouts (10 s), so a
/// slow request is rarely taken over; if one is, its change rolls back.
pub const LOCK: TimeDelta = TimeDelta::seconds(60);
const PRUNE_BATCH: u32 = 500;
/// Batches per background tick: the prune never holds the store for long.
const PRUNE_BATCHES: usize = 10;
/// Far above any create or rotate answer; a cap so a bug cannot buffer without bound.
const MAX_STORED_BODY: usize = 1024 * 1024;

const LOOKUP_INFO: &[u8] = b"keyplane idempotency lookup id v1";
const SEAL_INFO: &[u8] = b"keyplane idempotency response key v1";

/// The `Idempotency-Key` of a create or rotate request (when the client sent one) and the
/// fingerprint of the request it came with.
pub struct Idempotency<S> {
    key: Option<RequestKey>,
    _surface: PhantomData<S>,
}

struct RequestKey {
    value: String,
    /// SHA-256 of method, path and body: a retry must match it.
    fingerprint: [u8; 32],
}

/// The header in the OpenAPI document, for `params(...)` on each create and rotate route.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// Makes the request safe to retry: a random value (a UUID), 16–255 visible ASCII characters,
    /// new for each new request. A retry with the same key, by the same caller, on the same route
    /// and with the same body within 24 h answers the first request's status and body again (the
    /// one-time secret included, `Idempotent-Replayed: true`) without a second change: the answer
    /// is stored in the same transaction as the change, so no change is ever made without it. The
    /// same key with a different request is 422; while the first request is still running, 409
    /// (with `Retry-After`). Only successes are kept: after a refusal the key may be sent again.
    #[param(
        rename = "Idempotency-Key",
        min_length = 16,
        max_length = 255,
        pattern = r"^[!-~]{16,255}$"
    )]
    #[allow(dead_code)] // read from the headers, declared here for the document only
    idempotency_key: Option<String>,
}

/// A request body of type `T` and the request's `Idempotency-Key`: the fingerprint covers the body.
pub struct IdempotentJson<S, T>(pub Idempotency<S>, pub T);

impl<S: Surface> FromRequestParts<App> for Idempotency<S> {
    type Rejection = ApiError<S>;

    /// For routes without a body (rotate, enable): the fingerprint covers method and path.
    async fn from_request_parts(parts: &mut Parts, _app: &App) -> Result<Self, Self::Rejection> {
        Ok(Self::from_parts(parts, b"")?)
    }
}

impl<S: Surface, T: FromJsonBody + Send> FromRequest<App> for IdempotentJson<S, T> {
    type Rejection = ApiError<S>;

    async fn from_request(request: Request, app: &App) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        if header_value(&parts.headers)?.is_none() {
            let ApiJson(value, ..) =
                ApiJson::<S, T>::from_request(Request::from_parts(parts, body), app).await?;
            return Ok(Self(Idempotency::without_key(), value));
        }
        let checked = parts.clone();
        let (ApiJson(value, ..), bytes) =
            ApiJson::<S, T>::with_bytes(Request::from_parts(parts, body), app).await?;
        Ok(Self(Idempotency::from_parts(&checked, &bytes)?, value))
    }
}

/// A body that may be left out ([`crate::extract::OptionalApiJson`]) and the request's
/// `Idempotency-Key`: the fingerprint covers the body as sent (empty when there is none).
pub struct IdempotentOptionalJson<S, T>(pub Idempotency<S>, pub T);

impl<S: Surface, T: FromJsonBody + Default + Send> FromRequest<App>
    for IdempotentOptionalJson<S, T>
{
    type Rejection = ApiError<S>;

    async fn from_request(request: Request, app: &App) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let idempotency_key = header_value(&parts.headers)?.is_some();
        let checked = parts.clone();
        let (crate::extract::OptionalApiJson(value, ..), bytes) =
            crate::extract::OptionalApiJson::<S, T>::with_bytes(
                Request::from_parts(parts, body),
                app,
            )
            .await?;
        let idempotency = if idempotency_key {
            Idempotency::from_parts(&checked, &bytes)?
        } else {
            Idempotency::without_key()
        };
        Ok(Self(idempotency, value))
    }
}

/// The header's value, checked; `None` when absent.
fn header_value(headers: &HeaderMap) -> Result<Option<&str>, DomainError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |code, message: &str| {
        Err(FieldError::new(FieldPath::header(HEADER_DISPLAY), code, message).into())
    };
    if values.next().is_some() {
        return invalid(codes::DUPLICATE, "must be sent once");
    }
    let bytes = value.as_bytes();
    if !bytes.iter().all(|b| (b'!'..=b'~').contains(b)) {
        return invalid(
            codes::INVALID_CHARACTERS,
            "must be visible ASCII characters only (a UUID, for example)",
        );
    }
    if bytes.len() < MIN_LEN {
        return invalid(codes::TOO_SHORT, "must be at least 16 characters");
    }
    if bytes.len() > MAX_LEN {
        return invalid(codes::TOO_LONG, "must be at most 255 characters");
    }
    // Visible ASCII is UTF-8.
    Ok(value.to_str().ok())
}

impl<S: Surface> Idempotency<S> {
    fn without_key() -> Self {
        Self {
            key: None,
            _surface: PhantomData,
        }
    }

    fn from_parts(parts: &Parts, body: &[u8]) -> Result<Self, DomainError> {
        let Some(value) = header_value(&parts.headers)? else {
            return Ok(Self::without_key());
        };
        let mut fingerprint = Sha256::new();
        for part in [
            parts.method.as_str().as_bytes(),
            parts.uri.path().as_bytes(),
        ] {
            fingerprint.update((part.len() as u64).to_be_bytes());
            fingerprint.update(part);
        }
        fingerprint.update(body);
        Ok(Self {
            key: Some(RequestKey {
                value: value.to_string(),
                fingerprint: fingerprint.finalize().into(),
            }),
            _surface: PhantomData,
        })
    }

    /// Runs `work` (the change, as `work(app, caller, seal)`) at most once per key, and answers
    /// what it made as `render` shows it (as JSON). Without a key, just runs it. With one, claims
    /// the key, then replays (if the caller still holds `needs` in `tenant`), refuses, or runs
    /// `work`, which hands [`Seal::answer`] to its
    /// use case: the store renders and seals the answer inside the change's transaction and keeps
    /// it there, and that very answer is sent. A refusal releases the key. (A change runs on a task
    /// of its own, `router::Front::serve`: a client that hangs up mid-request does not cut it.)
    pub async fn run<T, W, R, F, Fut>(
        self,
        app: App,
        caller: Principal,
        tenant: TenantId,
        needs: &[Capability],
        render: R,
        work: F,
    ) -> Response
    where
        W: serde::Serialize,
        R: Fn(T) -> (StatusCode, W) + Send + Sync + 'static,
        F: FnOnce(App, Principal, Seal<T>) -> Fut,
        Fut: Future<Output = Result<T, ApiError<S>>>,
    {
        let Some(key) = self.key else {
            return match work(app, caller, Seal { seal: None }).await {
                Ok(made) => rendered(render(made)),
                Err(error) => error.into_response(),
            };
        };
        let keys = DerivedKeys::new(&key.value, tenant, caller.id());
        let now = crate::ops::now();
        let claim = IdempotencyClaim {
            lookup_id: keys.lookup_id,
            tenant_id: tenant,
            principal_id: caller.id(),
            fingerprint: key.fingerprint,
            claim_id: uuid::Uuid::new_v4(),
            now,
            locked_until: now + LOCK,
            expired_before: now - RETENTION,
        };
        let record = match app.store().claim_idempotency_key(&claim).await {
            Ok(record) => record,
            Err(error) => return ApiError::<S>::from(error).into_response(),
        };
        match record {
            IdempotencyRecord::Claimed => {}
            IdempotencyRecord::InFlight { fingerprint } if fingerprint == key.fingerprint => {
                return in_progress::<S>()
            }
            IdempotencyRecord::Completed {
                fingerprint,
                response,
            } if fingerprint == key.fingerprint => {
                // A replay hands the answer (a secret) out again without `work`, whose use case
                // checks the caller's rights: only to a caller that still holds the route's.
                if let Some(error) = needs
                    .iter()
                    .find_map(|&right| caller.require(tenant, right).err())
                {
                    return ApiError::<S>::from(error).into_response();
                }
                return keys.replay::<S>(&response);
            }
            IdempotencyRecord::InFlight { .. } | IdempotencyRecord::Completed { .. } => {
                return reused::<S>()
            }
        }
        let (store, lookup_id, claim_id) = (app.store().clone(), keys.lookup_id, claim.claim_id);
        let render = Arc::new(render);
        // The answer as last sealed: the one kept, if the change committed.
        let sealed = Arc::new(Mutex::new(None));
        let seal = {
            let (render, sealed) = (render.clone(), sealed.clone());
            move |made: T| keys.seal(claim_id, render(made), &sealed).map(Into::into)
        };
        let change = work(
            app,
            caller,
            Seal {
                seal: Some(Box::new(seal)),
            },
        );
        match change.await {
            Ok(made) => {
                let kept = sealed.lock().unwrap_or_else(|p| p.into_inner()).take();
                match kept {
                    Some(KeptAnswer { status, body }) => kept_answer(status, body),
                    None => {
                        // A use case that did not hand its seal to the store: a bug. The
                        // client still gets what was made; the key stays in flight until its
                        // lock runs out.
                        tracing::error!("an idempotent change was made without keeping its answer");
                        rendered(render(made))
                    }
                }
            }
            Err(error) => {
                // Taken over: the key is another request's now, and nothing changed.
                if !matches!(error.0, AppError::IdempotencyKeyInFlight) {
                    if let Err(error) = store.release_idempotency_key(&lookup_id, claim_id).await {
                        // The claim's lock runs out by itself.
                        tracing::warn!(%error, "cannot release an Idempotency-Key after a refusal");
                    }
                }
                error.into_response()
            }
        }
    }
}

/// What [`Idempotency::run`] hands its work: the use case passes [`Seal::answer`] to the store
/// with its change, which keeps the sealed answer in the change's transaction.
pub struct Seal<T> {
    seal: Option<Box<crate::ops::AnswerSeal<T>>>,
}

impl<T> Seal<T> {
    /// `None` without an `Idempotency-Key`: the change keeps nothing.
    pub fn answer(&self) -> crate::ops::Answer<'_, T> {
        self.seal.as_deref()
    }
}

/// An answer as sealed, in plaintext: sent to the client once its change has committed.
struct KeptAnswer {
    status: StatusCode,
    body: Bytes,
}

/// What a route's `render` made, as JSON: the answer of a request not kept.
fn rendered<W: serde::Serialize>((status, body): (StatusCode, W)) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A kept answer's bytes, as JSON: the first answer sends what was sealed, a replay what opened
/// (and says so).
fn kept_answer(status: StatusCode, body: Bytes) -> Response {
    let mut response = crate::wire::json_response(body.into());
    *response.status_mut() = status;
    response
}

fn in_progress<S: Surface>() -> Response {
    ApiError::<S>::from(AppError::IdempotencyKeyInFlight).into_response()
}

fn reused<S: Surface>() -> Response {
    ApiError::<S>::from(DomainError::from(FieldError::new(
        FieldPath::header(HEADER_DISPLAY),
        codes::IDEMPOTENCY_KEY_REUSED,
        "was already used with a different request (route or body); send a new key for a new request",
    )))
    .into_response()
}

/// What the key gives: the record's id and the key that seals its answer.
struct DerivedKeys {
    lookup_id: [u8; 32],
    cipher: ChaCha20Poly1305,
}

impl DerivedKeys {
    fn new(key: &str, tenant: TenantId, caller: uuid::Uuid) -> Self {
        let mut salt = [0u8; 32];
        salt[..16].copy_from_slice(tenant.as_uuid().as_bytes());
        salt[16..].copy_from_slice(caller.as_bytes());
        let hkdf = Hkdf::<Sha256>::new(Some(&salt), key.as_bytes());
        let mut lookup_id = [0u8; 32];
        let mut seal_key = [0u8; 32];
        hkdf.expand(LOOKUP_INFO, &mut lookup_id)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        hkdf.expand(SEAL_INFO, &mut seal_key)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        Self {
            lookup_id,
            cipher: ChaCha20Poly1305::new(&seal_key.into()),
        }
    }

    /// Binds the ciphertext to its record and status: a sealed body cannot be moved to another.
    fn associated_data(&self, status: u16) -> [u8; 34] {
        let mut aad = [0u8; 34];
        aad[..32].copy_from_slice(&self.lookup_id);
        aad[32..].copy_from_slice(&status.to_be_bytes());
        aad
    }

    /// Renders `answer` as JSON and seals it for the record `claim_id` holds; the plaintext goes
    /// to `kept`, to be sent once the change commits. The store calls this inside the change's
    /// transaction.
    fn seal<W: serde::Serialize>(
        &self,
        claim_id: uuid::Uuid,
        (status, answer): (StatusCode, W),
        kept: &Mutex<Option<KeptAnswer>>,
    ) -> Result<IdempotentAnswer, StoreError> {
        let body = serde_json::to_vec(&answer)
            .map_err(|error| anyhow::anyhow!("cannot render an idempotent answer: {error}"))?;
        if body.len() > MAX_STORED_BODY {
            return Err(
                anyhow::anyhow!("an idempotent answer is over {MAX_STORED_BODY} bytes").into(),
            );
        }
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: &body,
                    aad: &self.associated_data(status.as_u16()),
                },
            )
            .expect("ChaCha20-Poly1305 seals any body this size");
        *kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(KeptAnswer {
            status,
            body: Bytes::from(body),
        });
        Ok(IdempotentAnswer {
            lookup_id: self.lookup_id,
            claim_id,
            response: StoredResponse {
                status: status.as_u16(),
                nonce: nonce.to_vec(),
                ciphertext,
            },
        })
    }

    fn replay<S: Surface>(&self, stored: &StoredResponse) -> Response {
        let opened = <[u8; 12]>::try_from(stored.nonce.as_slice())
            .ok()
            .and_then(|nonce| {
                self.cipher
                    .decrypt(
                        &nonce.into(),
                        Payload {
                            msg: &stored.ciphertext,
                            aad: &self.associated_data(stored.status),
                        },
                    )
                    .ok()
            });
        let (Some(body), Ok(status)) = (opened, StatusCode::from_u16(stored.status)) else {
            return ApiError::<S>::from(AppError::Internal(anyhow::anyhow!(
                "a kept idempotent answer does not open"
            )))
            .into_response();
        };
        let mut response = kept_answer(status, Bytes::from(body));
        response
            .headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
        response
    }
}

/// Deletes records older than [`RETENTION`], in bounded batches (the background loop calls it).
pub(crate) async fn prune(app: &App) {
    let cutoff = crate::ops::now() - RETENTION;
    for _ in 0..PRUNE_BATCHES {
        match app
            .store()
            .prune_idempotency_keys(cutoff, PRUNE_BATCH)
            .await
        {
            Ok(deleted) if deleted == u64::from(PRUNE_BATCH) => continue,
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(%error, "cannot prune expired Idempotency-Key records");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn keys_are_16_to_255_visible_ascii_characters() {
        assert_eq!(header_value(&HeaderMap::new()).unwrap(), None);
        let uuid = uuid::Uuid::new_v4().to_string();
        assert_eq!(
            header_value(&headers(uuid.as_bytes())).unwrap(),
            Some(uuid.as_str())
        );
        assert!(header_value(&headers(&[b'k'; 16])).is_ok());
        assert!(header_value(&headers(&[b'k'; 255])).is_ok());
        for bad in [
            &b"short"[..],
            &[b'k'; 15][..],
            &[b'k'; 256][..],
            &b"has a space inside it"[..],
            "caf\u{e9}-caf\u{e9}-caf\u{e9}-caf\u{e9}".as_bytes(),
        ] {
            assert!(header_value(&headers(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn derivations_differ_by_key_tenant_and_caller() {
        let (tenant, caller) = (TenantId::new(), uuid::Uuid::new_v4());
        let base = DerivedKeys::new("0123456789abcdef", tenant, caller).lookup_id;
        assert_ne!(
            base,
            DerivedKeys::new("0123456789abcdeF", tenant, caller).lookup_id
        );
        assert_ne!(
            base,
            DerivedKeys::new("0123456789abcdef", TenantId::new(), caller).lookup_id
        );
        assert_ne!(
            base,
            DerivedKeys::new("0123456789abcdef", tenant, uuid::Uuid::new_v4()).lookup_id
        );
    }

    #[test]
    fn a_sealed_answer_opens_only_with_its_key() {
        let (tenant, caller) = (TenantId::new(), uuid::Uuid::new_v4());
        let keys = DerivedKeys::new("0123456789abcdef", tenant, caller);
        let nonce = [7u8; 12];
        let sealed = StoredResponse {
            status: 201,
            nonce: nonce.to_vec(),
            ciphertext: keys
                .cipher
                .encrypt(
                    &nonce.into(),
                    Payload {
                        msg: b"{\"token\":\"secret\"}",
                        aad: &keys.associated_data(201),
                    },
                )
                .unwrap(),
        };
        assert_eq!(
            keys.replay::<crate::aether::Aether>(&sealed).status(),
            StatusCode::CREATED
        );
        let other = DerivedKeys::new("0123456789abcdeX", tenant, caller);
        assert_eq!(
            other.replay::<crate::aether::Aether>(&sealed).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let moved = StoredResponse {
            status: 200,
            ..sealed
        };
        assert_eq!(
            keys.replay::<crate::aether::Aether>(&moved).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
