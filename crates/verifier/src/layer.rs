//! `VerifyLayer`: an axum/tower middleware that verifies the request's `Authorization: Bearer`
//! credential and puts the [`Identity`](crate::Identity) in the request's extensions (handlers
//! take `Extension<Arc<Identity>>`), or answers 401 (`WWW-Authenticate: Bearer`) / 503.

use crate::{Verifier, VerifyError};
use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

#[derive(Clone)]
pub struct VerifyLayer {
    verifier: Verifier,
}

impl VerifyLayer {
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
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

#[derive(Clone)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Verifier,
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
                Some(token) => verifier.verify(token).await,
                None => Err(VerifyError::Inactive),
            };
            match verified {
                Ok(identity) => {
                    request.extensions_mut().insert(identity);
                    inner.call(request).await
                }
                Err(error) => Ok(refusal(&error)),
            }
        })
    }
}

fn refusal(error: &VerifyError) -> Response<Body> {
    let (status, text) = match error {
        VerifyError::Malformed | VerifyError::Inactive => {
            (StatusCode::UNAUTHORIZED, "invalid or missing credential")
        }
        VerifyError::Stale(_) | VerifyError::Unavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "credentials cannot be verified right now",
        ),
    };
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    } else {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
