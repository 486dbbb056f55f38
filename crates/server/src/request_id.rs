//! A request's id and where a request came from, as the request log and the audit trail name them.
//!
//! The id is worked out once per request by the observer (`router::Observation`): the client's
//! `X-Request-Id` when it is plain, else a fresh UUID. It reaches handlers as an [`Origin`] (an
//! argument on the direct routes, an extension of the request on the router's), never through the
//! request's headers, and is rendered as text only where it is shown: the response, an enabled
//! log span, an audit event. Writing it into the request's headers and copying it for the
//! response cost a verification more than anything else the observer does (BENCHMARKS.md,
//! "Twenty-first sitting").

use crate::client_addr::ClientAddr;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, HeaderName, HeaderValue};
use std::convert::Infallible;
use std::fmt;

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A request's id.
#[derive(Debug, Clone)]
pub(crate) enum RequestId {
    /// The client's own, plain by [`is_plain`].
    Given(HeaderValue),
    /// Made here, kept as its 16 bytes until it is shown.
    Fresh(uuid::Uuid),
}

impl RequestId {
    /// The id of a request with these headers.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        match headers.get(REQUEST_ID) {
            Some(given) if is_plain(given.as_bytes()) => Self::Given(given.clone()),
            _ => Self::Fresh(uuid::Uuid::new_v4()),
        }
    }

    /// As the response's `X-Request-Id`.
    pub(crate) fn into_header_value(self) -> HeaderValue {
        match self {
            Self::Given(given) => given,
            Self::Fresh(id) => crate::router::uuid_header(id),
        }
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Plain, so every byte is visible ASCII and `to_str` cannot fail.
            Self::Given(given) => f.write_str(given.to_str().unwrap_or_default()),
            Self::Fresh(id) => fmt::Display::fmt(&id.hyphenated(), f),
        }
    }
}

/// A client's `X-Request-Id` is kept only when it is short and plain, so that it cannot break a
/// log line or a downstream system that copies it.
fn is_plain(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Where a request came from: the client's address (the trusted-proxy rule's answer, see
/// [`crate::client_addr`]) and the request's id. Both are `None` only for a request that reached
/// its handler through no listener and no observer, as in-process tests may drive one.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub client: Option<ClientAddr>,
    pub request_id: Option<RequestId>,
}

/// Read from the extensions the connection and the observer set.
impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Self::of(&parts.extensions))
    }
}

impl Origin {
    /// As the extensions of a request the router served tell it.
    pub(crate) fn of(extensions: &Extensions) -> Self {
        Self {
            client: extensions.get::<ClientAddr>().copied(),
            request_id: extensions.get::<RequestId>().cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_bytes(id).unwrap());
        headers
    }

    #[test]
    fn a_plain_id_is_kept_and_any_other_replaced_by_a_fresh_uuid() {
        let kept = RequestId::of(&headers(b"trace-1.a_b:c"));
        assert_eq!(kept.to_string(), "trace-1.a_b:c");
        assert_eq!(kept.into_header_value(), "trace-1.a_b:c");
        for refused in [&b"has space"[..], b"quote\"", &[b'a'; 129], b"caf\xc3\xa9"] {
            let fresh = RequestId::of(&headers(refused));
            let text = fresh.to_string();
            assert!(uuid::Uuid::parse_str(&text).is_ok(), "{text}");
            assert_eq!(fresh.into_header_value(), text.as_str());
        }
        let absent = RequestId::of(&HeaderMap::new()).to_string();
        assert_eq!(absent.len(), 36);
        assert_eq!(absent, absent.to_lowercase());
    }
}
