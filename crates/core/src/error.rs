//! Domain errors. Nothing here knows about HTTP: each surface renders these in its own dialect.

use std::fmt;

/// Where in a request a field lives; Hybridbox's FastAPI dialect puts it first in `loc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldLocation {
    Body,
    Query,
    Path,
    Header,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

/// A field's address, e.g. body `scopes[1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    pub location: FieldLocation,
    pub segments: Vec<PathSegment>,
}

impl FieldPath {
    fn at(location: FieldLocation, key: &str) -> Self {
        Self {
            location,
            segments: vec![PathSegment::Key(key.to_string())],
        }
    }

    pub fn body(key: &str) -> Self {
        Self::at(FieldLocation::Body, key)
    }

    /// The request body as a whole (e.g. it is not a JSON object).
    pub fn body_root() -> Self {
        Self {
            location: FieldLocation::Body,
            segments: Vec::new(),
        }
    }

    pub fn query(key: &str) -> Self {
        Self::at(FieldLocation::Query, key)
    }

    pub fn path(key: &str) -> Self {
        Self::at(FieldLocation::Path, key)
    }

    pub fn header(name: &str) -> Self {
        Self::at(FieldLocation::Header, name)
    }

    /// A key inside this field (an object's member).
    pub fn key(&self, key: &str) -> Self {
        let mut next = self.clone();
        next.segments.push(PathSegment::Key(key.to_string()));
        next
    }

    pub fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.segments.push(PathSegment::Index(index));
        next
    }
}

/// Renders the JSON-path form Aether uses: `scopes[1]`, `name`; the whole body is `body`.
impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            return f.write_str("body");
        }
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                PathSegment::Key(key) if i == 0 => f.write_str(key)?,
                PathSegment::Key(key) => write!(f, ".{key}")?,
                PathSegment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// One invalid field. `code` is stable and machine-readable; `message` is for people and never
/// contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: FieldPath,
    pub code: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(path: FieldPath, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            path,
            code,
            message: message.into(),
        }
    }
}

/// Stable `code` values of field errors.
pub mod codes {
    pub const REQUIRED: &str = "required";
    /// The value is well-formed but the tenant's credential policy forbids it.
    pub const POLICY_VIOLATION: &str = "policy_violation";
    pub const INVALID_TYPE: &str = "invalid_type";
    pub const UNKNOWN_FIELD: &str = "unknown_field";
    pub const TOO_SHORT: &str = "too_short";
    pub const TOO_LONG: &str = "too_long";
    pub const INVALID_CHARACTERS: &str = "invalid_characters";
    pub const INVALID_FORMAT: &str = "invalid_format";
    pub const NOT_IN_FUTURE: &str = "not_in_future";
    pub const INVALID_SCOPE: &str = "invalid_scope";
    pub const DUPLICATE: &str = "duplicate";
    pub const TOO_MANY: &str = "too_many";
    pub const OUT_OF_RANGE: &str = "out_of_range";
    pub const INVALID_UUID: &str = "invalid_uuid";
    pub const NOT_FOUND: &str = "not_found";
    pub const INVALID_CHOICE: &str = "invalid_choice";
    pub const INVALID_BOOL: &str = "invalid_bool";
    /// The last entry of a capped error list: how many more were found and not reported.
    pub const MORE_ERRORS_OMITTED: &str = "more_errors_omitted";
    /// An `Idempotency-Key` already used with a different request.
    pub const IDEMPOTENCY_KEY_REUSED: &str = "idempotency_key_reused";
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("request validation failed")]
    Validation(Vec<FieldError>),
    /// Also the answer for another tenant's resources, so tenant ids cannot be probed.
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
}

impl From<FieldError> for Error {
    fn from(error: FieldError) -> Self {
        Error::Validation(vec![error])
    }
}

impl From<Vec<FieldError>> for Error {
    fn from(errors: Vec<FieldError>) -> Self {
        Error::Validation(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_render_as_json_paths() {
        assert_eq!(FieldPath::body("scopes").index(1).to_string(), "scopes[1]");
        assert_eq!(FieldPath::body("name").to_string(), "name");
        assert_eq!(FieldPath::body_root().to_string(), "body");
        assert_eq!(FieldPath::query("limit").to_string(), "limit");
    }
}
