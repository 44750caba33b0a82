//! Durations as operators write them (`500ms`, `5s`, `2m`, `1h`, `7d`): one parser and one
//! format for the relay's flags and the `dlq` CLI's ages, so that both read the same units.

use std::time::Duration;

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Digits without a unit (or nothing at all).
    #[error("a unit is required: ms, s, m, h or d")]
    MissingUnit,
    /// Not digits followed by a unit.
    #[error("{text:?} is not a duration like 500ms, 5s, 2m, 1h")]
    NotANumber {
        /// What was given.
        text: String,
    },
    /// Digits followed by something other than `ms`, `s`, `m`, `h` or `d`.
    #[error("{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)")]
    UnknownUnit {
        /// What was given.
        text: String,
        /// The unit part of it.
        unit: String,
    },
    /// More seconds than a `u64` holds.
    #[error("{text:?} is too large")]
    TooLarge {
        /// What was given.
        text: String,
    },
}

/// Parses `0` or a whole number with a unit: `ms`, `s`, `m`, `h` or `d` (surrounding
/// whitespace is ignored). Never panics and never wraps: too large a value is
/// [`DurationError::TooLarge`].
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or(DurationError::MissingUnit)?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(DurationError::NotANumber { text: text.into() });
    }
    let too_large = || DurationError::TooLarge { text: text.into() };
    // All ASCII digits: parsing fails only when the number does not fit.
    let n: u64 = number.parse().map_err(|_| too_large())?;
    let seconds = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(too_large)
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        _ => Err(DurationError::UnknownUnit {
            text: text.into(),
            unit: unit.into(),
        }),
    }
}

/// Writes `duration` in the largest unit that shows it exactly (`0`, `1500ms`, `90s`, `2m`,
/// `1h`, `2d`); [`parse`] reads it back to the same value (sub-millisecond parts are dropped).
pub fn format(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms == 0 {
        return "0".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match s {
        _ if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_in_the_units_they_parse_from() {
        for text in [
            "0", "1ms", "100ms", "1500ms", "5s", "90s", "2m", "1h", "36h", "2d",
        ] {
            let parsed = parse(text).expect(text);
            let shown = format(parsed);
            assert_eq!(parse(&shown).expect(&shown), parsed, "{text} -> {shown}");
        }
        assert_eq!(format(Duration::from_secs(90)), "90s");
        assert_eq!(format(Duration::from_secs(3600)), "1h");
        assert_eq!(parse(" 7d ").expect("7d"), Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn bad_input_is_a_typed_refusal_never_a_wrap() {
        assert_eq!(parse("5"), Err(DurationError::MissingUnit));
        assert_eq!(parse(""), Err(DurationError::MissingUnit));
        assert!(matches!(parse("h"), Err(DurationError::NotANumber { .. })));
        assert!(matches!(parse("5x"), Err(DurationError::UnknownUnit { unit, .. }) if unit == "x"));
        assert!(matches!(
            parse("-5s"),
            Err(DurationError::NotANumber { .. })
        ));
        assert!(matches!(
            parse("99999999999999999999s"),
            Err(DurationError::TooLarge { .. })
        ));
        assert!(matches!(
            parse(&format!("{}d", u64::MAX / 1000)),
            Err(DurationError::TooLarge { .. })
        ));
    }
}
