//! Durations as people type them: `90s`, `15m`, `1h30m`, `30d`, `2w`.

use std::time::Duration;

/// Longest duration accepted (100 years): anything longer is a typo.
const MAX_SECONDS: u64 = 100 * 365 * 86_400;

/// Parses one or more `<number><unit>` parts, unit `s`, `m`, `h`, `d` or `w`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration such as 90s, 15m, 1h30m, 30d or 2w");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let number: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = number
            .checked_mul(unit)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    if total > MAX_SECONDS {
        return Err(format!("`{text}` is longer than 100 years"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_sums() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for bad in [
            "",
            "30",
            "d",
            "1x",
            "0s",
            "-1h",
            "99999999999999999999w",
            "3000w3000w",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
