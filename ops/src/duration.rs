//! Human durations in flags and config files: `30s`, `10m`, `1h30m`, `7d`, `250ms`.
//!
//! One or more `<number><unit>` parts, units `ms`, `s`, `m`, `h`, `d`, summed; white space around
//! the whole is ignored. Everything else is refused with a [`DurationError`] that says what is
//! wrong, never clamped: a sign, a fraction, a missing or unknown unit, or a total too large.
//! [`format_duration`] shows a duration back in the same syntax, so messages quote what a user
//! could have written.

use std::fmt;
use std::time::Duration;

/// Why a human duration (`30s`, `10m`, `1h30m`, `7d`) does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing was given.
    #[error("empty duration; use e.g. `30s`, `10m`, `1h`")]
    Empty,
    /// A number had no unit after it.
    #[error("`{0}` has no unit; use `s`, `m`, `h` or `d` (e.g. `{0}s`)")]
    NoUnit(String),
    /// A unit other than `ms`, `s`, `m`, `h`, `d`.
    #[error("unknown unit `{0}`; use `ms`, `s`, `m`, `h` or `d`")]
    UnknownUnit(String),
    /// A unit with no number before it, or a stray character.
    #[error("expected a number at `{0}`")]
    ExpectedNumber(String),
    /// The total does not fit.
    #[error("duration is too long")]
    Overflow,
}

/// Parses a human duration: one or more `<number><unit>` parts, units `ms`, `s`, `m`, `h`, `d`
/// (`30s`, `10m`, `1h30m`, `7d`).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (number, after) = rest.split_at(digits);
        if number.is_empty() {
            return Err(DurationError::ExpectedNumber(rest.to_owned()));
        }
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, next) = after.split_at(letters);
        let value: u64 = number.parse().map_err(|_| DurationError::Overflow)?;
        let unit_len = match unit {
            "" => return Err(DurationError::NoUnit(number.to_owned())),
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(60 * 60),
            "d" => Duration::from_secs(24 * 60 * 60),
            other => return Err(DurationError::UnknownUnit(other.to_owned())),
        };
        let part = unit_len
            .checked_mul(u32::try_from(value).map_err(|_| DurationError::Overflow)?)
            .ok_or(DurationError::Overflow)?;
        total = total.checked_add(part).ok_or(DurationError::Overflow)?;
        rest = next;
    }
    Ok(total)
}

/// Shows a duration the way [`parse_duration`] reads it (`90s` -> `1m30s`, `1.5s` -> `1s500ms`).
/// Below a millisecond is not shown: no setting is that fine.
pub fn format_duration(d: Duration) -> String {
    Shown(d).to_string()
}

struct Shown(Duration);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut secs = self.0.as_secs();
        let millis = self.0.subsec_millis();
        if secs == 0 {
            return write!(f, "{millis}ms");
        }
        for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
            if secs >= len {
                write!(f, "{}{unit}", secs / len)?;
                secs %= len;
            }
        }
        if millis > 0 {
            write!(f, "{millis}ms")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
