//! One error type for the whole service ([`AppError`]) and one renderer per surface. Handlers
//! return [`ApiError<S>`] for their surface `S`, so none can answer in another surface's dialect.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keyplane_core::Error as DomainError;
use keyplane_store::{StoreError, Unavailable};
use std::marker::PhantomData;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Missing, malformed, unknown, expired or revoked credentials. The reason is for the request
    /// log only; the client always reads the same message.
    #[error("authentication failed: {0}")]
    Unauthenticated(&'static str),
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("malformed JSON: {0}")]
    InvalidJson(String),
    /// The body's `Content-Type` is not one the route reads; the media types it does read, as the
    /// client is told (`application/json`).
    #[error("unsupported media type")]
    UnsupportedMediaType(&'static str),
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    /// A transient store fault (any cause: a restart, a lock, a full disk): 503 with
    /// `Retry-After`, whichever surface answers.
    #[error("store unavailable: {0}")]
    Unavailable(Unavailable),
    /// Another request holds the `Idempotency-Key` (it is running, or took the key over from this
    /// one after its lock ran out, in which case this one's change rolled back): 409 with
    /// `Retry-After`.
    #[error("a request with this Idempotency-Key is in flight")]
    IdempotencyKeyInFlight,
    /// Something outside keyplane the answer depends on cannot be reached (GitHub's keys
    /// document): 503 with `Retry-After`.
    #[error("{what} cannot be fetched")]
    UpstreamUnavailable {
        what: &'static str,
        retry_after_secs: u64,
    },
    /// A budget this replica shares among all clients is spent (stored public revocation reports
    /// per minute): 503 with `Retry-After` the wait until it has room again.
    #[error("over budget: {why}")]
    OverBudget {
        why: &'static str,
        retry_after_secs: u64,
    },
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

impl From<StoreError> for AppError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => AppError::Domain(DomainError::NotFound),
            StoreError::Conflict(message) => AppError::Domain(DomainError::Conflict(message)),
            StoreError::LiveCredentialLimit { limit } => {
                AppError::Domain(DomainError::Conflict(format!(
                    "the organization has {limit} live credentials, the most this server allows \
                     (`keyplane serve --max-live-credentials-per-org`): revoke credentials it no \
                     longer uses (expired ones count until revoked), or ask the operator to raise \
                     the limit"
                )))
            }
            StoreError::Unavailable(message) => AppError::Unavailable(message),
            StoreError::IdempotencyClaimLost => AppError::IdempotencyKeyInFlight,
            // Signed out (in another tab) while a change was under way: it did not happen.
            StoreError::ConsoleSessionEnded => AppError::Unauthenticated("the session has ended"),
            StoreError::Config(message) => AppError::Internal(anyhow::anyhow!(message)),
            error @ StoreError::SchemaBehind { .. } => AppError::Internal(error.into()),
            StoreError::Other(error) => AppError::Internal(error),
        }
    }
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AppError::Domain(DomainError::Validation(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Domain(DomainError::NotFound) => StatusCode::NOT_FOUND,
            AppError::Domain(DomainError::Forbidden(_)) => StatusCode::FORBIDDEN,
            AppError::Domain(DomainError::Conflict(_)) | AppError::IdempotencyKeyInFlight => {
                StatusCode::CONFLICT
            }
            AppError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            AppError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_)
            | AppError::UpstreamUnavailable { .. }
            | AppError::OverBudget { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client reads. Internal causes never leave the process.
    pub fn public_message(&self) -> String {
        match self {
            AppError::Unauthenticated(_) => "missing or invalid credentials".into(),
            AppError::Domain(DomainError::Validation(_)) => "request validation failed".into(),
            AppError::Domain(DomainError::NotFound) => "not found".into(),
            AppError::Domain(DomainError::Forbidden(message)) => message.clone(),
            AppError::Domain(DomainError::Conflict(message)) => message.clone(),
            AppError::InvalidJson(message) => format!("request body is not valid JSON: {message}"),
            AppError::UnsupportedMediaType(expected) => format!("request body must be {expected}"),
            AppError::PayloadTooLarge => "request body is too large".into(),
            AppError::MethodNotAllowed => "this method is not allowed on this path".into(),
            AppError::RateLimited { .. } => "too many requests".into(),
            AppError::Unavailable(unavailable) => unavailable.fault.public_message().into(),
            AppError::UpstreamUnavailable { what, .. } => {
                format!("{what} cannot be fetched; retry later")
            }
            AppError::IdempotencyKeyInFlight => {
                "a request with this Idempotency-Key is still in progress; retry it shortly".into()
            }
            AppError::OverBudget { .. } => {
                "the server takes no more of these requests for now; retry later".into()
            }
            AppError::Internal(_) => "internal server error".into(),
        }
    }
}

/// A wait as a `Retry-After` value: whole seconds rounded up (a client coming back after a
/// rounded-down value arrives early and is refused again), at least 1.
pub(crate) fn retry_after_secs(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl AppError {
    /// The `Retry-After` (seconds) this error's response carries, if any. None on a conflict
    /// (the live-credential limit's too): waiting does not change its answer.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            AppError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            AppError::Unavailable(unavailable) => Some(unavailable.fault.retry_after_secs()),
            AppError::IdempotencyKeyInFlight => Some(1),
            AppError::UpstreamUnavailable {
                retry_after_secs, ..
            }
            | AppError::OverBudget {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

/// The cause of an error response, attached as a response extension for the request log.
#[derive(Debug, Clone)]
pub struct ErrorCause(pub String);

/// An API surface: how it renders an error body.
pub trait Surface: Send + Sync + 'static {
    /// The JSON body for `error`; status and common headers are set by [`ApiError`].
    fn error_body(error: &AppError) -> serde_json::Value;

    /// The status for `error`; a surface whose protocol fixes another one overrides it.
    fn status(error: &AppError) -> StatusCode {
        error.status()
    }

    /// The `WWW-Authenticate` challenge of a 401; `None` for a route that takes no credential in
    /// `Authorization` (a challenge there would ask for a scheme it does not use).
    const CHALLENGE: Option<&'static str> = Some("Bearer");
}

/// An [`AppError`] that renders in surface `S`'s dialect.
pub struct ApiError<S>(pub AppError, PhantomData<S>);

impl<S> std::fmt::Debug for ApiError<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<S> From<AppError> for ApiError<S> {
    fn from(error: AppError) -> Self {
        Self(error, PhantomData)
    }
}

impl<S> From<DomainError> for ApiError<S> {
    fn from(error: DomainError) -> Self {
        Self(error.into(), PhantomData)
    }
}

impl<S> From<StoreError> for ApiError<S> {
    fn from(error: StoreError) -> Self {
        Self(error.into(), PhantomData)
    }
}

impl<S: Surface> IntoResponse for ApiError<S> {
    fn into_response(self) -> Response {
        let error = self.0;
        let status = S::status(&error);
        let mut response = (status, axum::Json(S::error_body(&error))).into_response();
        let headers = response.headers_mut();
        if let (AppError::Unauthenticated(_), Some(challenge)) = (&error, S::CHALLENGE) {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Some(seconds) = error.retry_after_secs() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
            .extensions_mut()
            .insert(ErrorCause(error.to_string()));
        response
    }
}

/// The error format of the surface that owns a path, for answers given before or around any
/// handler (unknown path, wrong method, refused client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorDialect {
    Registry,
    Hybridbox,
    Verification,
    Aether,
}

impl ErrorDialect {
    pub(crate) fn of_path(path: &str) -> Self {
        if path.starts_with("/registry/token") {
            Self::Registry
        } else if path.starts_with("/v1/public/") {
            Self::Hybridbox
        } else if path.starts_with("/oauth2/")
            || path.starts_with("/v1/auth/")
            || path == "/v1/whoami"
            || crate::leaks::owns_path(path)
            || crate::revocations::owns_path(path)
        {
            Self::Verification
        } else {
            Self::Aether
        }
    }

    pub(crate) fn render(self, error: AppError) -> Response {
        match self {
            Self::Registry => crate::registry::error_response(error),
            Self::Hybridbox => ApiError::<crate::hybridbox::Hybridbox>::from(error).into_response(),
            Self::Verification => {
                ApiError::<crate::verify::Verification>::from(error).into_response()
            }
            Self::Aether => ApiError::<crate::aether::Aether>::from(error).into_response(),
        }
    }
}

/// Renders `error` in the dialect of the surface that owns `path`.
pub fn render_for_path(path: &str, error: AppError) -> Response {
    ErrorDialect::of_path(path).render(error)
}

#[cfg(test)]
mod tests {
    use super::retry_after_secs;
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_a_wait_up_to_whole_seconds() {
        // 4.3 s rounded down would bring the client back before the wait ends, to be refused again.
        assert_eq!(retry_after_secs(Duration::from_millis(4300)), 5);
        assert_eq!(retry_after_secs(Duration::from_secs(4)), 4);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
