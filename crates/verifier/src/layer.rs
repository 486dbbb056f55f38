//! `VerifyLayer`: an axum/tower middleware that verifies the request's `Authorization: Bearer`
//! credential and puts the [`Identity`](crate::Identity) in the request's extensions (handlers
//! take `Extension<Arc<Identity>>`), or answers 401 (`WWW-Authenticate: Bearer`) / 503.

use crate::{Verifier, VerifyError};
use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Verifies each request's `Authorization: Bearer` credential before the inner service sees
/// it, with a [`Verifier`]; see [`VerifyService`] for what it answers. Handlers behind it take
/// the identity as `Extension<Arc<Identity>>` (not `Extension<Identity>`: that would fail every
/// request at run time).
///
/// ```no_run
/// use axum::{routing::get, Extension, Router};
/// use keyplane_verifier::{Identity, Verifier, VerifyLayer};
/// use std::sync::Arc;
///
/// async fn hello(Extension(identity): Extension<Arc<Identity>>) -> String {
///     format!("hello, {}\n", identity.name)
/// }
///
/// fn app(verifier: Verifier) -> Router {
///     Router::new()
///         .route("/hello", get(hello))
///         .layer(VerifyLayer::new(verifier))
/// }
/// ```
#[derive(Clone)]
pub struct VerifyLayer {
    verifier: Verifier,
}

impl VerifyLayer {
    /// A layer verifying with `verifier` (a clone: they share one cache and stream).
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
    }
}

impl std::fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyLayer")
            .field("verifier", &self.verifier)
            .finish()
    }
}

impl<S> tower::Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// The service [`VerifyLayer`] wraps around `S`. A request whose bearer credential verifies
/// reaches `S` with the `Arc<Identity>` in its extensions; otherwise it is answered here, in
/// plain text: 401 with `WWW-Authenticate: Bearer` when no bearer credential came, or
/// `Bearer error="invalid_token"` when the one presented is not valid (RFC 6750 §3.1); 503 with
/// `Retry-After: 1` when it cannot be verified now ([`VerifyError::Stale`],
/// [`VerifyError::Unavailable`]).
#[derive(Clone)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Verifier,
}

impl<S> std::fmt::Debug for VerifyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyService")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl<S> tower::Service<Request<Body>> for VerifyService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // The clone that was driven to readiness serves this request (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                // The scheme is case-insensitive (RFC 9110 §11.1).
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            let verified = match presented {
                Some(token) => verifier.verify(token).await.map_err(Some),
                None => Err(None),
            };
            match verified {
                Ok(identity) => {
                    request.extensions_mut().insert(identity);
                    inner.call(request).await
                }
                Err(error) => Ok(refusal(error.as_ref())),
            }
        })
    }
}

/// The answer to a request without a bearer credential (`None`) or whose credential was not
/// verified.
fn refusal(error: Option<&VerifyError>) -> Response<Body> {
    let (status, text, challenge) = match error {
        None => (
            StatusCode::UNAUTHORIZED,
            "a bearer credential is needed",
            Some("Bearer"),
        ),
        Some(VerifyError::Malformed | VerifyError::Inactive) => (
            StatusCode::UNAUTHORIZED,
            "invalid credential",
            Some(r#"Bearer error="invalid_token""#),
        ),
        Some(VerifyError::Stale(_) | VerifyError::Unavailable(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "credentials cannot be verified right now",
            None,
        ),
    };
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    match challenge {
        Some(challenge) => headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        ),
        None => headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1")),
    };
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::api_token;
    use crate::{StalePolicy, VerifierConfig};
    use tower::{Layer, ServiceExt};

    /// The layer's answer to a request carrying `authorization`, before a handler that answers
    /// 200; the verifier has never reached keyplane (nothing listens on port 9), so it is stale.
    async fn answer(authorization: Option<String>) -> Response<Body> {
        let mut config = VerifierConfig::new("http://127.0.0.1:9", "unused");
        config.stale_policy = StalePolicy::FailClosed;
        let verifier = Verifier::new(config).unwrap();
        let handler = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
        });
        let mut request = Request::builder().uri("/");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let request = request.body(Body::empty()).unwrap();
        VerifyLayer::new(verifier)
            .layer(handler)
            .oneshot(request)
            .await
            .unwrap()
    }

    /// RFC 6750 §3.1: no credential gets the bare challenge, an invalid one is told so; every
    /// refusal says what its body is.
    #[tokio::test]
    async fn refusals_follow_rfc_6750_and_say_what_their_body_is() {
        for (authorization, challenge) in [
            (None, "Bearer"),
            (Some("Basic dXNlcjpwYXNz".into()), "Bearer"),
            (
                Some("Bearer aether_not-even-close".into()),
                r#"Bearer error="invalid_token""#,
            ),
        ] {
            let refused = answer(authorization.clone()).await;
            assert_eq!(
                refused.status(),
                StatusCode::UNAUTHORIZED,
                "{authorization:?}"
            );
            assert_eq!(refused.headers()[header::WWW_AUTHENTICATE], challenge);
            assert_eq!(
                refused.headers()[header::CONTENT_TYPE],
                "text/plain; charset=utf-8"
            );
        }
        // Well-formed, but the verifier is stale: not the caller's fault.
        let unavailable = answer(Some(format!("Bearer {}", api_token()))).await;
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!unavailable.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(unavailable.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            unavailable.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }
}
