//! The registry token signing key: ES256 (P-256), created on first use, kept in the store so every
//! replica signs with the same key, and identified by its libtrust key id (the JWT `kid` the
//! registry matches against its `rootcertbundle`). `keyplane admin registry-key` rotates it in
//! two phases (stage a `next` key the registry learns to trust, then promote it); each replica
//! re-reads the current key every `--registry-key-refresh-seconds` ([`refresh_signer`]).

use crate::error::AppError;
use crate::App;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keyplane_core::registry::libtrust_key_id;
use keyplane_core::PrivateKeyPem;
use keyplane_store::{SigningKey, Store};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;

pub struct Signer {
    header: Header,
    key: EncodingKey,
    certificate_pem: String,
    /// When the key was created: a promotion moves to a newer one, never to an older one.
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Signer {
    /// The self-signed certificate of the signing key: the registry's `rootcertbundle`.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    pub fn key_id(&self) -> &str {
        self.header.kid.as_deref().unwrap_or("")
    }

    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, AppError> {
        jsonwebtoken::encode(&self.header, claims, &self.key)
            .map_err(|e| AppError::Internal(anyhow::anyhow!("signing a registry token: {e}")))
    }
}

/// A new key pair and its self-signed certificate, for the store to keep (or to drop when a racing
/// caller's was kept first).
pub fn mint_candidate() -> Result<SigningKey, AppError> {
    let internal = |e: rcgen::Error| {
        AppError::Internal(anyhow::anyhow!("creating the registry signing key: {e}"))
    };
    let key_pair =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keyplane registry token signer");
    let certificate = params.self_signed(&key_pair).map_err(internal)?;
    Ok(SigningKey {
        key_id: libtrust_key_id(&rcgen::PublicKeyData::subject_public_key_info(&key_pair)),
        private_key: PrivateKeyPem::new(key_pair.serialize_pem()),
        certificate_pem: certificate.pem(),
        created_at: crate::ops::now(),
        signed_until: None,
    })
}

/// The store's signing key, created on first use. Racing callers (replicas, `admin registry-cert`)
/// all end up with the one the store kept; the one whose key it kept records
/// `registry.signing_key_created` in every organization with a registry, `via` it (the command,
/// or `serve`), naming the `operator` of a command.
pub async fn load_or_create_signing_key(
    store: &dyn Store,
    via: &'static str,
    operator: Option<&keyplane_core::Operator>,
) -> Result<Signer, AppError> {
    let created = crate::ops::signing_key_event(
        keyplane_core::audit::actions::REGISTRY_SIGNING_KEY_CREATED,
        via,
        None,
        operator,
    );
    signer_of(
        store
            .signing_key_or_insert(&mint_candidate()?, &created)
            .await?,
    )
}

fn signer_of(stored: SigningKey) -> Result<Signer, AppError> {
    let key =
        EncodingKey::from_ec_pem(stored.private_key.expose_secret().as_bytes()).map_err(|e| {
            AppError::Internal(anyhow::anyhow!("loading the registry signing key: {e}"))
        })?;
    // Distribution 3.x matches `rootcertbundle` keys by JWK thumbprint, never by libtrust `kid`:
    // it (and 2.8, which reads it first) trusts the token by the certificate in `x5c` instead.
    let certificate =
        CertificateDer::from_pem_slice(stored.certificate_pem.as_bytes()).map_err(|e| {
            AppError::Internal(anyhow::anyhow!(
                "reading the registry signing certificate: {e}"
            ))
        })?;
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some("JWT".into());
    header.kid = Some(stored.key_id);
    header.x5c = Some(vec![data_encoding::BASE64.encode(&certificate)]);
    Ok(Signer {
        header,
        key,
        certificate_pem: stored.certificate_pem,
        created_at: stored.created_at,
    })
}

/// How the store's current key replaced the one held.
#[derive(Debug, PartialEq, Eq)]
enum KeyChange {
    /// A newer key: `admin registry-key promote`.
    Promoted,
    /// An older key: the store went back (restored from a backup, recovered to an earlier point,
    /// failed over) to before a promotion.
    WentBack,
}

fn key_change(
    held: chrono::DateTime<chrono::Utc>,
    current: chrono::DateTime<chrono::Utc>,
) -> KeyChange {
    if current < held {
        KeyChange::WentBack
    } else {
        KeyChange::Promoted
    }
}

/// Re-reads the store's current key every `interval` until `stop` turns true, and signs with it
/// from then on when a promotion changed it. A failed read keeps the key held.
pub(crate) async fn refresh_signer(
    app: App,
    interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut every = crate::jobs::Every::new(interval, stop);
    while every.tick().await {
        let current = match app.store().signing_keys().await {
            Ok(keys) => keys.current,
            Err(error) => {
                tracing::warn!(%error, "cannot re-read the registry signing key; signing with the one held");
                continue;
            }
        };
        // None until the first token or `admin registry-cert` creates one.
        let Some(current) = current else { continue };
        if app
            .held_registry_signer()
            .is_some_and(|held| held.key_id() == current.key_id)
        {
            continue;
        }
        let key_id = current.key_id.clone();
        match signer_of(current) {
            Ok(signer) => {
                let created_at = signer.created_at;
                // Signing with the store's key all the same: every replica, and every one started
                // from now on, signs with it.
                let Some(replaced) = app.swap_registry_signer(Arc::new(signer)) else {
                    continue;
                };
                match key_change(replaced.created_at, created_at) {
                    KeyChange::Promoted => {
                        tracing::info!(key.id = %key_id, replaced.key.id = %replaced.key_id(), "registry signing key promoted: signing registry tokens with it now");
                    }
                    KeyChange::WentBack => {
                        tracing::warn!(key.id = %key_id, replaced.key.id = %replaced.key_id(), "registry signing key went back: the store's current key is older than the one signed with until now (the store restored from a backup or recovered to an earlier point, from before a promotion?); signing with it now, which the registry accepts only while its rootcertbundle holds it: compare `keyplane admin registry-key show` with the bundle, and if the newer key replaced a compromised one, stage, promote and retire again");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, key.id = %key_id, "cannot load the promoted registry signing key; signing with the one held");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_current_key_is_the_store_going_back_not_a_promotion() {
        let held = chrono::DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .to_utc();
        let older = held - chrono::TimeDelta::days(30);
        let newer = held + chrono::TimeDelta::seconds(1);
        assert_eq!(key_change(held, older), KeyChange::WentBack);
        assert_eq!(key_change(held, newer), KeyChange::Promoted);
        // Two keys created in the same instant: nothing says it went back.
        assert_eq!(key_change(held, held), KeyChange::Promoted);
    }

    #[test]
    fn a_signer_keeps_its_keys_creation_time() {
        let stored = mint_candidate().unwrap();
        let created_at = stored.created_at;
        assert_eq!(signer_of(stored).unwrap().created_at, created_at);
    }
}
