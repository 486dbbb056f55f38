//! Request extractors shared by the surfaces: the authenticated caller, JSON bodies that speak the
//! surface's error dialect, and field-by-field JSON reading that reports every bad field at once.

use crate::app::App;
use crate::error::{ApiError, AppError, Surface};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts};
use chrono::{DateTime, Utc};
use keyplane_core::error::codes;
use keyplane_core::validate;
use keyplane_core::{Error as DomainError, FieldError, FieldPath, Principal};
use serde_json::{Map, Value};
use std::marker::PhantomData;

/// A caller authenticated for surface `S`'s management API, rate limit applied, and where its
/// request came from (for the audit trail).
pub struct Authenticated<S>(
    pub Principal,
    pub PhantomData<S>,
    pub keyplane_core::RequestContext,
);

impl<S: Surface> FromRequestParts<App> for Authenticated<S> {
    type Rejection = ApiError<S>;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let principal = {
            let parts: &Parts = parts;
            let at = || {
                crate::canary::Presentation::of_parts(
                    crate::canary::CanarySurface::ManagementApi,
                    parts,
                )
            };
            app.authenticate_management(&parts.headers, &at).await?
        };
        if let Some(slot) = parts.extensions.get::<crate::audit::CallerSlot>() {
            slot.set(&principal);
        }
        let context = crate::audit::request_context(&parts.headers, &parts.extensions);
        Ok(Self(principal, PhantomData, context))
    }
}

/// A request body of type `T`, read as JSON and validated field by field.
pub struct ApiJson<S, T>(pub T, pub PhantomData<S>);

/// A request type built from a JSON object. Implementations read every field through the reader
/// (which records each problem) and return `None` when any field was unusable.
pub trait FromJsonBody: Sized {
    fn from_json(reader: &mut ObjectReader, now: DateTime<Utc>) -> Option<Self>;
}

impl<S: Surface, T: FromJsonBody> FromRequest<App> for ApiJson<S, T> {
    type Rejection = ApiError<S>;

    async fn from_request(request: Request, app: &App) -> Result<Self, Self::Rejection> {
        Self::with_bytes(request, app).await.map(|(json, _)| json)
    }
}

impl<S: Surface, T: FromJsonBody> ApiJson<S, T> {
    /// Reads and validates the body, and also returns it as sent (what an idempotency fingerprint
    /// covers).
    pub(crate) async fn with_bytes(
        request: Request,
        app: &App,
    ) -> Result<(Self, Bytes), ApiError<S>> {
        if !is_json(request.headers()) {
            return Err(AppError::UnsupportedMediaType("application/json").into());
        }
        let bytes = read_body(request, app).await?;
        let value = read_json_body(&bytes, crate::ops::now())?;
        Ok((Self(value, PhantomData), bytes))
    }
}

/// A body that may be left out (a rotation): no body at all reads as `T::default()`; a body
/// present is JSON like any other. Read through `idempotency::IdempotentOptionalJson`, which also
/// needs the bytes.
pub struct OptionalApiJson<S, T>(pub T, pub PhantomData<S>);

impl<S: Surface, T: FromJsonBody + Default> OptionalApiJson<S, T> {
    pub(crate) async fn with_bytes(
        request: Request,
        app: &App,
    ) -> Result<(Self, Bytes), ApiError<S>> {
        let json = is_json(request.headers());
        let bytes = read_body(request, app).await?;
        if bytes.is_empty() {
            return Ok((Self(T::default(), PhantomData), bytes));
        }
        if !json {
            return Err(AppError::UnsupportedMediaType("application/json").into());
        }
        let value = read_json_body(&bytes, crate::ops::now())?;
        Ok((Self(value, PhantomData), bytes))
    }
}

/// The whole body as sent, within the body limit (413 past it). The limit is applied here rather
/// than left to the router's `DefaultBodyLimit` layer, which the verification routes, served
/// without the router, do not pass through.
pub(crate) async fn read_body(request: Request, app: &App) -> Result<Bytes, AppError> {
    read_limited(request.into_body(), app.inner().config.max_body_bytes).await
}

async fn read_limited(body: axum::body::Body, limit: usize) -> Result<Bytes, AppError> {
    use axum::body::HttpBody;
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, limit);
    let mut whole = Bytes::new();
    let mut joined: Option<Vec<u8>> = None;
    // Done once the declared length has arrived, not only when the connection closes the body: that
    // comes a turn of the connection's task later.
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                AppError::PayloadTooLarge
            } else {
                AppError::InvalidJson("the body could not be read".into())
            }
        })?;
        // Trailers, if any, are not part of the body.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match joined.as_mut() {
            // Most bodies come whole: kept as they are, not copied.
            None if whole.is_empty() => whole = data,
            None => joined = Some([whole.as_ref(), data.as_ref()].concat()),
            Some(joined) => joined.extend_from_slice(&data),
        }
    }
    Ok(joined.map_or(whole, Bytes::from))
}

/// Parses a request body as JSON and reads it as a `T`, with every bad field reported.
pub(crate) fn read_json_body<T: FromJsonBody>(
    bytes: &[u8],
    now: DateTime<Utc>,
) -> Result<T, AppError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| AppError::InvalidJson(e.to_string()))?;
    let mut reader = ObjectReader::new(value).map_err(DomainError::from)?;
    let parsed = T::from_json(&mut reader, now);
    let errors = reader.finish();
    match parsed {
        Some(value) if errors.is_empty() => Ok(value),
        _ => Err(DomainError::Validation(errors).into()),
    }
}

pub(crate) fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// How a surface reads an expiry: [`validate::expires_at`] or a more lenient reading of it.
type ExpiryRule = fn(FieldPath, &str, DateTime<Utc>) -> Result<DateTime<Utc>, FieldError>;

/// Reads the fields of a JSON object, recording every missing, mistyped or unknown field.
pub struct ObjectReader {
    /// Where this object sits in the body (the root, or a nested object's member path).
    base: FieldPath,
    object: Map<String, Value>,
    known: Vec<&'static str>,
    errors: Vec<FieldError>,
}

impl ObjectReader {
    pub fn new(value: Value) -> Result<Self, FieldError> {
        match value {
            Value::Object(object) => Ok(Self {
                base: FieldPath::body_root(),
                object,
                known: Vec::new(),
                errors: Vec::new(),
            }),
            _ => Err(FieldError::new(
                FieldPath::body_root(),
                codes::INVALID_TYPE,
                "the request body must be a JSON object",
            )),
        }
    }

    /// An optional nested object (absent or null: `Ok(None)`), read with its own reader whose
    /// problems join this one's through [`ObjectReader::absorb`].
    pub fn nested_object(&mut self, key: &'static str) -> Result<Option<ObjectReader>, ()> {
        match self.take(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(object)) => Ok(Some(ObjectReader {
                base: self.base.key(key),
                object,
                known: Vec::new(),
                errors: Vec::new(),
            })),
            Some(_) => {
                self.type_error(key, "an object or null");
                Err(())
            }
        }
    }

    /// Takes a nested reader's problems (its unknown fields included) into this one's.
    pub fn absorb(&mut self, nested: ObjectReader) {
        let errors = nested.unchecked_errors();
        self.errors.extend(errors);
    }

    /// An optional whole number in `min..=max` (absent or null: none). `None` when invalid.
    pub fn optional_u32(&mut self, key: &'static str, min: u32, max: u32) -> Option<Option<u32>> {
        match self.take(key) {
            None | Some(Value::Null) => Some(None),
            Some(Value::Number(n))
                if n.as_u64()
                    .is_some_and(|v| (u64::from(min)..=u64::from(max)).contains(&v)) =>
            {
                n.as_u64().and_then(|v| u32::try_from(v).ok()).map(Some)
            }
            Some(Value::Number(_)) => {
                self.errors.push(FieldError::new(
                    self.base.key(key),
                    codes::OUT_OF_RANGE,
                    format!("must be a whole number from {min} to {max}"),
                ));
                None
            }
            Some(_) => {
                self.type_error(key, "a whole number or null");
                None
            }
        }
    }

    /// An optional boolean (absent or null: `default`). `None` when invalid.
    pub fn optional_bool(&mut self, key: &'static str, default: bool) -> Option<bool> {
        match self.take(key) {
            None | Some(Value::Null) => Some(default),
            Some(Value::Bool(b)) => Some(b),
            Some(_) => {
                self.type_error(key, "true or false");
                None
            }
        }
    }

    fn take(&mut self, key: &'static str) -> Option<Value> {
        self.known.push(key);
        self.object.remove(key)
    }

    fn type_error(&mut self, key: &str, expected: &str) {
        self.errors.push(FieldError::new(
            self.base.key(key),
            codes::INVALID_TYPE,
            format!("must be {expected}"),
        ));
    }

    /// A required string.
    pub fn string(&mut self, key: &'static str) -> Option<String> {
        match self.take(key) {
            Some(Value::String(text)) => Some(text),
            None => {
                self.errors.push(FieldError::new(
                    self.base.key(key),
                    codes::REQUIRED,
                    "is required",
                ));
                None
            }
            Some(_) => {
                self.type_error(key, "a string");
                None
            }
        }
    }

    /// An optional string that may also be `null`. `Ok(None)`: absent or null.
    pub fn nullable_string(&mut self, key: &'static str) -> Result<Option<String>, ()> {
        match self.take(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => {
                self.type_error(key, "a string or null");
                Err(())
            }
        }
    }

    /// An optional string (absent or null: none) checked by `rule`. `None` when invalid.
    pub fn nullable_checked(
        &mut self,
        key: &'static str,
        rule: fn(FieldPath, &str) -> Result<String, FieldError>,
    ) -> Option<Option<String>> {
        match self.nullable_string(key) {
            Ok(Some(raw)) => self.check(rule(self.base.key(key), &raw)).map(Some),
            Ok(None) => Some(None),
            Err(()) => None,
        }
    }

    /// An optional array of strings (`null` counts as absent). `Ok(None)`: absent.
    pub fn string_list(&mut self, key: &'static str) -> Result<Option<Vec<String>>, ()> {
        let items = match self.take(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.type_error(key, "an array of strings");
                return Err(());
            }
        };
        let mut strings = Vec::with_capacity(items.len());
        let mut ok = true;
        for (index, item) in items.into_iter().enumerate() {
            match item {
                Value::String(text) => strings.push(text),
                _ => {
                    ok = false;
                    self.errors.push(FieldError::new(
                        self.base.key(key).index(index),
                        codes::INVALID_TYPE,
                        "must be a string",
                    ));
                }
            }
        }
        if ok {
            Ok(Some(strings))
        } else {
            Err(())
        }
    }

    /// A required string that must be one of a fixed set of values.
    pub fn choice<T>(
        &mut self,
        key: &'static str,
        parse: fn(&str) -> Option<T>,
        allowed: &[&str],
    ) -> Option<T> {
        let text = self.string(key)?;
        let parsed = parse(&text);
        if parsed.is_none() {
            self.errors.push(FieldError::new(
                self.base.key(key),
                codes::INVALID_CHOICE,
                format!("must be one of: {}", allowed.join(", ")),
            ));
        }
        parsed
    }

    /// A required UUID string.
    pub fn uuid(&mut self, key: &'static str) -> Option<uuid::Uuid> {
        let text = self.string(key)?;
        let parsed = uuid::Uuid::parse_str(&text).ok();
        if parsed.is_none() {
            self.errors.push(FieldError::new(
                self.base.key(key),
                codes::INVALID_UUID,
                "must be a UUID",
            ));
        }
        parsed
    }

    /// An optional expiry (absent or null: none): an RFC 3339 date-time in the future.
    /// `None` when invalid; `Some(None)` when there is no expiry.
    pub fn expires_at(
        &mut self,
        key: &'static str,
        now: DateTime<Utc>,
    ) -> Option<Option<DateTime<Utc>>> {
        self.expiry(key, now, validate::expires_at)
    }

    /// [`Self::expires_at`] that also takes a date-time without an offset, as UTC (Hybridbox).
    pub fn expires_at_utc_if_naive(
        &mut self,
        key: &'static str,
        now: DateTime<Utc>,
    ) -> Option<Option<DateTime<Utc>>> {
        self.expiry(key, now, validate::expires_at_utc_if_naive)
    }

    fn expiry(
        &mut self,
        key: &'static str,
        now: DateTime<Utc>,
        parse: ExpiryRule,
    ) -> Option<Option<DateTime<Utc>>> {
        match self.nullable_string(key) {
            Ok(Some(raw)) => self.check(parse(self.base.key(key), &raw, now)).map(Some),
            Ok(None) => Some(None),
            Err(()) => None,
        }
    }

    /// Records the outcome of a domain rule; `None` if it failed.
    pub fn check<T>(&mut self, result: Result<T, FieldError>) -> Option<T> {
        result.map_err(|e| self.errors.push(e)).ok()
    }

    pub fn check_all<T>(&mut self, result: Result<T, Vec<FieldError>>) -> Option<T> {
        result.map_err(|e| self.errors.extend(e)).ok()
    }

    /// Every error recorded, plus one per unknown field: a typo must not silently drop a
    /// restriction. At most [`validate::MAX_FIELD_ERRORS`] are listed, the last counting the rest.
    pub fn finish(self) -> Vec<FieldError> {
        validate::cap_field_errors(self.unchecked_errors())
    }

    fn unchecked_errors(mut self) -> Vec<FieldError> {
        let mut unknown: Vec<&String> = self
            .object
            .keys()
            .filter(|k| !self.known.contains(&k.as_str()))
            .collect();
        unknown.sort();
        for key in unknown {
            self.errors.push(FieldError::new(
                self.base.key(key),
                codes::UNKNOWN_FIELD,
                "is not a known field",
            ));
        }
        self.errors
    }
}

/// A boolean query parameter, read as FastAPI/pydantic read them (`true`/`false`, `1`/`0`,
/// `yes`/`no`, `on`/`off`); absent is `default`.
pub fn query_bool(
    query: &std::collections::HashMap<String, String>,
    name: &str,
    default: bool,
) -> Result<bool, FieldError> {
    let Some(raw) = query.get(name) else {
        return Ok(default);
    };
    match raw.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Ok(true),
        "false" | "0" | "no" | "off" | "f" | "n" => Ok(false),
        _ => Err(FieldError::new(
            FieldPath::query(name),
            codes::INVALID_BOOL,
            "must be a boolean (true or false)",
        )),
    }
}

/// Days ahead for `?expiring_within_days=N` (1–3650): the list keeps live credentials expiring
/// within that many days. Absent: `None`.
pub fn expiring_within_days(
    query: &std::collections::HashMap<String, String>,
) -> Result<Option<u32>, FieldError> {
    const NAME: &str = "expiring_within_days";
    let Some(raw) = query.get(NAME) else {
        return Ok(None);
    };
    match raw.parse::<u32>() {
        Ok(days) if (1..=MAX_EXPIRING_WITHIN_DAYS).contains(&days) => Ok(Some(days)),
        _ => Err(FieldError::new(
            FieldPath::query(NAME),
            codes::OUT_OF_RANGE,
            format!("must be a whole number of days from 1 to {MAX_EXPIRING_WITHIN_DAYS}"),
        )),
    }
}

pub const MAX_EXPIRING_WITHIN_DAYS: u32 = 3650;

/// A route's path parameters, raw, for a handler of surface `S`: where axum's `Path` answers a
/// segment that is not UTF-8 once percent-decoded (`/organizations/%FF/...`) in plain text, this
/// answers the 422 of a malformed id ([`path_id`]) in the surface's error format. Every path
/// parameter is a UUID, parsed by the handler.
pub struct PathParams<S, T>(pub T, pub PhantomData<S>);

impl<S: Surface, T: serde::de::DeserializeOwned + Send> FromRequestParts<App> for PathParams<S, T> {
    type Rejection = ApiError<S>;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        use axum::extract::path::{ErrorKind, Path};
        use axum::extract::rejection::PathRejection;
        match Path::<T>::from_request_parts(parts, app).await {
            Ok(Path(params)) => Ok(Self(params, PhantomData)),
            Err(PathRejection::FailedToDeserializePathParams(failed)) => match failed.kind() {
                ErrorKind::InvalidUtf8InPathParam { key } => Err(malformed_id(key).into()),
                _ => Err(AppError::Internal(anyhow::anyhow!("{}", failed.body_text())).into()),
            },
            Err(other) => Err(AppError::Internal(anyhow::anyhow!("{}", other.body_text())).into()),
        }
    }
}

/// Parses a UUID path segment; a bad one is a 422 naming the parameter as the docs spell it.
pub fn path_id<T>(name: &str, raw: &str, parse: fn(&str) -> Option<T>) -> Result<T, DomainError> {
    parse(raw).ok_or_else(|| malformed_id(name))
}

fn malformed_id(name: &str) -> DomainError {
    FieldError::new(FieldPath::path(name), codes::INVALID_UUID, "must be a UUID").into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn chunked(chunks: &[&'static str]) -> Body {
        let frames = chunks
            .iter()
            .map(|chunk| Ok::<_, std::convert::Infallible>(Bytes::from_static(chunk.as_bytes())));
        Body::from_stream(futures::stream::iter(frames.collect::<Vec<_>>()))
    }

    #[tokio::test]
    async fn a_body_is_read_whole_in_however_many_frames_and_refused_past_the_limit() {
        for (chunks, read) in [
            (&[][..], ""),
            (&["token=abc"][..], "token=abc"),
            (&["", "token=abc"][..], "token=abc"),
            (&["token=", "abc"][..], "token=abc"),
            (&["to", "ken=", "abc"][..], "token=abc"),
        ] {
            let bytes = read_limited(chunked(chunks), 16).await.unwrap();
            assert_eq!(bytes, read.as_bytes(), "{chunks:?}");
        }
        assert_eq!(
            read_limited(Body::from("x".repeat(16)), 16)
                .await
                .unwrap()
                .len(),
            16
        );
        for over in [
            Body::from("x".repeat(17)),
            chunked(&["0123456789", "0123456789"]),
        ] {
            let refused = read_limited(over, 16).await;
            assert!(
                matches!(refused, Err(AppError::PayloadTooLarge)),
                "{refused:?}"
            );
        }
    }
}
