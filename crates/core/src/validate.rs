//! Field rules both surfaces share.

use crate::error::{codes, FieldError, FieldPath};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};

pub const MAX_NAME_CHARS: usize = 120;

/// Names are 1–120 characters after trimming, with no control characters. Returns the trimmed name.
pub fn name(path: FieldPath, raw: &str) -> Result<String, FieldError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(FieldError::new(
            path,
            codes::TOO_SHORT,
            "must have at least 1 character after trimming whitespace",
        ));
    }
    if trimmed.chars().count() > MAX_NAME_CHARS {
        return Err(FieldError::new(
            path,
            codes::TOO_LONG,
            format!("must have at most {MAX_NAME_CHARS} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(FieldError::new(
            path,
            codes::INVALID_CHARACTERS,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_string())
}

/// An RFC 3339 timestamp that lies in the future, normalized to UTC with microsecond precision
/// (what both stores keep).
pub fn expires_at(
    path: FieldPath,
    raw: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, FieldError> {
    let parsed = DateTime::parse_from_rfc3339(raw).map_err(|_| {
        FieldError::new(
            path.clone(),
            codes::INVALID_FORMAT,
            "must be an RFC 3339 date-time, e.g. 2030-01-01T00:00:00Z",
        )
    })?;
    let at = truncate_to_micros(parsed.with_timezone(&Utc));
    if at <= now {
        return Err(FieldError::new(
            path,
            codes::NOT_IN_FUTURE,
            "must be in the future",
        ));
    }
    Ok(at)
}

/// Both stores keep microseconds; truncating up front makes what is returned equal what is stored.
pub fn truncate_to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 8, 0, 0).unwrap()
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(name(FieldPath::body("name"), "  ci  ").unwrap(), "ci");
        assert_eq!(
            name(FieldPath::body("name"), "   ").unwrap_err().code,
            codes::TOO_SHORT
        );
        assert!(name(FieldPath::body("name"), &"é".repeat(120)).is_ok());
        assert_eq!(
            name(FieldPath::body("name"), &"é".repeat(121))
                .unwrap_err()
                .code,
            codes::TOO_LONG
        );
        assert_eq!(
            name(FieldPath::body("name"), "a\u{0007}b")
                .unwrap_err()
                .code,
            codes::INVALID_CHARACTERS
        );
    }

    #[test]
    fn expiry_must_be_rfc3339_and_future() {
        let path = || FieldPath::body("expires_at");
        let at = expires_at(path(), "2030-01-01T01:00:00+01:00", now()).unwrap();
        assert_eq!(at, Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap());
        assert_eq!(
            expires_at(path(), "2020-01-01T00:00:00Z", now())
                .unwrap_err()
                .code,
            codes::NOT_IN_FUTURE
        );
        assert_eq!(
            expires_at(path(), "tomorrow", now()).unwrap_err().code,
            codes::INVALID_FORMAT
        );
        assert_eq!(
            expires_at(path(), "2030-01-01", now()).unwrap_err().code,
            codes::INVALID_FORMAT
        );
    }
}
