//! Bearer authentication: parse and checksum with no I/O, hash, look up, check revocation and
//! expiry, record use. Every failure answers the same 401; the reason goes to the log and metrics.

use crate::error::AppError;
use crate::metrics::Metrics;
use crate::usage::UsageRecorder;
use axum::http::{header, HeaderMap};
use keyplane_core::{token, Credential, CredentialKind, Principal, Registry};
use keyplane_store::Store;
use std::sync::Arc;

pub(crate) struct Verifier {
    store: Arc<dyn Store>,
    usage: Arc<UsageRecorder>,
    metrics: Metrics,
}

impl Verifier {
    pub fn new(store: Arc<dyn Store>, usage: Arc<UsageRecorder>, metrics: Metrics) -> Self {
        Self {
            store,
            usage,
            metrics,
        }
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AppError> {
        let result = self.verify(headers).await;
        match &result {
            Ok(principal) => self.metrics.credential_verified(principal.kind),
            Err(AppError::Unauthenticated(reason)) => self.metrics.credential_rejected(reason),
            Err(_) => {}
        }
        result
    }

    async fn verify(&self, headers: &HeaderMap) -> Result<Principal, AppError> {
        let presented = bearer_token(headers)?;
        let parsed = token::parse(presented).map_err(|_| AppError::Unauthenticated("malformed"))?;
        let credential = self
            .store
            .find_credential_by_hash(&parsed.hash)
            .await?
            .filter(|c| c.secret_hash.matches(&parsed.hash) && c.kind == parsed.kind)
            .ok_or(AppError::Unauthenticated("unknown"))?;
        let now = crate::ops::now();
        credential
            .usable_at(now)
            .map_err(|why| AppError::Unauthenticated(why.as_str()))?;
        if credential.kind == CredentialKind::RobotAccount {
            // Robot secrets log in to the registry only.
            return Err(AppError::Unauthenticated("robot secret"));
        }
        let principal = Principal::for_credential(
            &credential,
            crate::ops::rights_of(self.store.as_ref(), &credential).await?,
        );
        self.usage.record(credential.id, now);
        Ok(principal)
    }
}

impl Verifier {
    /// A robot's registry login: the secret must be a live robot secret, and its tenant must have a
    /// registry. The caller checks that the login name matches.
    pub async fn authenticate_robot(
        &self,
        secret: &str,
    ) -> Result<(Credential, Registry), AppError> {
        let result = self.verify_robot(secret).await;
        match &result {
            Ok((robot, _)) => self.metrics.credential_verified(robot.kind),
            Err(AppError::Unauthenticated(reason)) => self.metrics.credential_rejected(reason),
            Err(_) => {}
        }
        result
    }

    async fn verify_robot(&self, secret: &str) -> Result<(Credential, Registry), AppError> {
        let parsed = token::parse(secret).map_err(|_| AppError::Unauthenticated("malformed"))?;
        if parsed.kind != CredentialKind::RobotAccount {
            return Err(AppError::Unauthenticated("not a robot secret"));
        }
        let robot = self
            .store
            .find_credential_by_hash(&parsed.hash)
            .await?
            .filter(|c| {
                c.secret_hash.matches(&parsed.hash) && c.kind == CredentialKind::RobotAccount
            })
            .ok_or(AppError::Unauthenticated("unknown"))?;
        let now = crate::ops::now();
        robot
            .usable_at(now)
            .map_err(|why| AppError::Unauthenticated(why.as_str()))?;
        let registry = self
            .store
            .get_registry(robot.tenant_id)
            .await?
            .ok_or(AppError::Unauthenticated("no registry"))?;
        self.usage.record(robot.id, now);
        Ok((robot, registry))
    }
}

/// The token from `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Result<&str, AppError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AppError::Unauthenticated("missing"))?
        .to_str()
        .map_err(|_| AppError::Unauthenticated("malformed"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AppError::Unauthenticated("malformed"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AppError::Unauthenticated("not a bearer credential"));
    }
    Ok(token.trim())
}
