//! Field rules both surfaces share.

use crate::error::{codes, FieldError, FieldPath};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

pub const MAX_NAME_CHARS: usize = 120;

/// The most field errors one response reports; the rest are counted in a last entry, so an error
/// response stays about as small as the request that caused it.
pub const MAX_FIELD_ERRORS: usize = 20;

/// Characters no name may hold: controls (Cc), format characters (Cf: the bidi controls U+061C,
/// U+200E/F, U+202A–202E, U+2066–2069, zero-width ones, soft hyphen, …) and the line and paragraph
/// separators. They can make one name look like another in a list or a console.
pub fn is_disguising(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// Names are at most 120 characters as sent (the documented `maxLength` counts what the client
/// sends, whitespace included), at least 1 after trimming, with no control, format (bidi) or
/// line-separator characters. Returns the trimmed name.
pub fn name(path: FieldPath, raw: &str) -> Result<String, FieldError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(FieldError::new(
            path,
            codes::TOO_SHORT,
            "must have at least 1 character after trimming whitespace",
        ));
    }
    if raw.chars().count() > MAX_NAME_CHARS {
        return Err(FieldError::new(
            path,
            codes::TOO_LONG,
            format!("must have at most {MAX_NAME_CHARS} characters"),
        ));
    }
    if trimmed.chars().any(is_disguising) {
        return Err(FieldError::new(
            path,
            codes::INVALID_CHARACTERS,
            "must not contain control, format (such as bidi override or zero-width) or line separator characters",
        ));
    }
    Ok(trimmed.to_string())
}

/// The latest instant both stores keep exactly: SQLite holds timestamps as text, whose order is
/// time order only for four-digit years; PostgreSQL `timestamptz` goes far beyond.
pub fn max_timestamp() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
        .single()
        .map(|at| at + TimeDelta::microseconds(999_999))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// An RFC 3339 timestamp that lies in the future and no later than 9999-12-31T23:59:59.999999Z
/// (in UTC), normalized to UTC with microsecond precision (what both stores keep).
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
    future_expiry(path, parsed.with_timezone(&Utc), now)
}

/// [`expires_at`] as Hybridbox's FastAPI reads a "UTC timestamp": a date-time without an offset
/// (`2030-01-01T00:00:00`, what Python's `datetime.utcnow().isoformat()` sends) is taken as UTC.
pub fn expires_at_utc_if_naive(
    path: FieldPath,
    raw: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, FieldError> {
    let parsed = DateTime::parse_from_rfc3339(raw)
        .map(|at| at.with_timezone(&Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f")
                .or_else(|_| chrono::NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S%.f"))
                .map(|naive| naive.and_utc())
        })
        .map_err(|_| {
            FieldError::new(
                path.clone(),
                codes::INVALID_FORMAT,
                "must be a date-time, e.g. 2030-01-01T00:00:00Z (without an offset: UTC)",
            )
        })?;
    future_expiry(path, parsed, now)
}

/// An expiry that lies in the future and no later than [`max_timestamp`], at microsecond
/// precision (what both stores keep).
pub fn future_expiry(
    path: FieldPath,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, FieldError> {
    let at = truncate_to_micros(at);
    if at > max_timestamp() {
        return Err(FieldError::new(
            path,
            codes::OUT_OF_RANGE,
            "must be no later than 9999-12-31T23:59:59.999999Z",
        ));
    }
    if at <= now {
        return Err(FieldError::new(
            path,
            codes::NOT_IN_FUTURE,
            "must be in the future",
        ));
    }
    Ok(at)
}

/// Keeps the first [`MAX_FIELD_ERRORS`] errors and replaces the rest with one entry counting them.
pub fn cap_field_errors(mut errors: Vec<FieldError>) -> Vec<FieldError> {
    if errors.len() > MAX_FIELD_ERRORS {
        let omitted = errors.len() - (MAX_FIELD_ERRORS - 1);
        errors.truncate(MAX_FIELD_ERRORS - 1);
        errors.push(FieldError::new(
            FieldPath::body_root(),
            codes::MORE_ERRORS_OMITTED,
            format!("{omitted} more errors were found and are not listed"),
        ));
    }
    errors
}

/// The system clock moved by `offset_micros`, at the microseconds both stores keep: read as a
/// count of microseconds and made a time once (a read, an addition and a rounding of a `DateTime`
/// each redo its calendar arithmetic, which was most of a clock read on the verification path).
pub fn now_micros(offset_micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(unix_micros_now(offset_micros))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// [`now_micros`] as microseconds since the Unix epoch, for a comparison or a record that needs no
/// calendar (the verification path: making a `DateTime` of it and back cost more than the read).
pub fn unix_micros_now(offset_micros: i64) -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_micros())
        .unwrap_or(i64::MAX)
        .saturating_add(offset_micros)
}

/// Both stores keep microseconds; truncating up front makes what is returned equal what is stored.
/// A leap second (`23:59:60`, which chrono takes at any minute) becomes the next minute's first:
/// PostgreSQL would store it so, SQLite would keep `:60`, and many clients cannot parse that.
pub fn truncate_to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 8, 0, 0).unwrap()
    }

    #[test]
    fn the_clock_reads_whole_microseconds_moved_by_the_offset() {
        let before = truncate_to_micros(Utc::now());
        let read = now_micros(0);
        let moved = now_micros(90_000_000);
        let after = Utc::now();
        assert_eq!(read.timestamp_subsec_nanos() % 1_000, 0);
        assert!(
            before <= read && read <= after,
            "{before} <= {read} <= {after}"
        );
        assert!(moved - read >= TimeDelta::seconds(90));
        assert!(moved - after <= TimeDelta::seconds(90));
        assert_eq!(now_micros(i64::MAX), DateTime::<Utc>::MAX_UTC);
    }

    #[test]
    fn hybridbox_reads_a_time_without_an_offset_as_utc() {
        let path = || FieldPath::body("expires_at");
        for raw in [
            "2030-11-07T05:31:56",
            "2030-11-07 05:31:56",
            "2030-11-07T05:31:56Z",
            "2030-11-07T07:31:56+02:00",
        ] {
            assert_eq!(
                expires_at_utc_if_naive(path(), raw, now()).unwrap(),
                Utc.with_ymd_and_hms(2030, 11, 7, 5, 31, 56).unwrap(),
                "{raw}"
            );
        }
        assert_eq!(
            expires_at_utc_if_naive(path(), "2030-11-07T05:31:56.120", now())
                .unwrap()
                .timestamp_subsec_micros(),
            120_000
        );
        for raw in ["2030-11-07", "tomorrow", "2030-11-07T25:00:00"] {
            assert_eq!(
                expires_at_utc_if_naive(path(), raw, now())
                    .unwrap_err()
                    .code,
                codes::INVALID_FORMAT,
                "{raw}"
            );
        }
        assert_eq!(
            expires_at(path(), "2030-11-07T05:31:56", now())
                .unwrap_err()
                .code,
            codes::INVALID_FORMAT,
            "Aether stays RFC 3339"
        );
    }

    #[test]
    fn a_leap_second_is_the_next_minutes_first() {
        let at = expires_at(
            FieldPath::body("expires_at"),
            "2030-06-30T23:59:60.5Z",
            now(),
        )
        .unwrap();
        assert_eq!(
            at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "2030-07-01T00:00:00.500Z"
        );
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
        // Surrounding whitespace counts toward the limit: a schema-checking client sees the raw
        // string, so accepting it would break the published `maxLength`.
        assert_eq!(
            name(FieldPath::body("name"), &format!("\r{}", "a".repeat(120)))
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
    fn names_refuse_characters_that_disguise_them() {
        for hidden in [
            "\u{202E}",
            "\u{202A}",
            "\u{2066}",
            "\u{2069}",
            "\u{200E}",
            "\u{200F}",
            "\u{061C}",
            "\u{200B}",
            "\u{FEFF}",
            "\u{00AD}",
            "\u{2028}",
            "\u{2029}",
            "\u{0000}",
            "\u{E0041}",
        ] {
            assert_eq!(
                name(FieldPath::body("name"), &format!("ci{hidden}bot"))
                    .unwrap_err()
                    .code,
                codes::INVALID_CHARACTERS,
                "{hidden:?}"
            );
        }
        assert!(name(FieldPath::body("name"), "déploiement 日本 ci-bot").is_ok());
    }

    #[test]
    fn expiry_beyond_year_9999_is_out_of_range() {
        let path = || FieldPath::body("expires_at");
        assert!(expires_at(path(), "9999-12-31T23:59:59.999999Z", now()).is_ok());
        // A negative offset carries the instant into year 10000 UTC.
        assert_eq!(
            expires_at(path(), "9999-12-31T23:00:00-05:00", now())
                .unwrap_err()
                .code,
            codes::OUT_OF_RANGE
        );
    }

    #[test]
    fn field_errors_are_capped_with_a_count_of_the_rest() {
        let many: Vec<FieldError> = (0..1000)
            .map(|i| {
                FieldError::new(
                    FieldPath::body("scopes").index(i),
                    codes::INVALID_SCOPE,
                    "bad",
                )
            })
            .collect();
        let capped = cap_field_errors(many);
        assert_eq!(capped.len(), MAX_FIELD_ERRORS);
        assert_eq!(capped[MAX_FIELD_ERRORS - 2].path.to_string(), "scopes[18]");
        let last = capped.last().unwrap();
        assert_eq!(last.code, codes::MORE_ERRORS_OMITTED);
        assert!(last.message.starts_with("981 more"), "{}", last.message);
        let few = vec![FieldError::new(
            FieldPath::body("name"),
            codes::REQUIRED,
            "is required",
        )];
        assert_eq!(cap_field_errors(few.clone()), few);
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
