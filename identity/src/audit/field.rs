//! The typed scalar fields of a record: [`Timestamp`], [`ChainHash`], [`RecordId`].

use std::fmt;
use std::str::FromStr;

use ring::digest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// A point in time as the audit file writes it: RFC 3339, UTC, microseconds, `Z`
/// (`2026-05-01T12:34:56.123456Z`), always 27 bytes, so the text sorts as the time does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// The current time, to the microsecond.
    pub fn now() -> Self {
        Self::from(OffsetDateTime::now_utc())
    }

    /// The time as a `time` value, in UTC.
    pub fn as_offset_date_time(self) -> OffsetDateTime {
        self.0
    }
}

impl From<OffsetDateTime> for Timestamp {
    /// Converts to UTC and drops sub-microsecond digits. Years before 0 clamp to year 0, which the
    /// four-digit format needs; no certificate or clock reading gets there.
    fn from(t: OffsetDateTime) -> Self {
        let t = t.to_offset(UtcOffset::UTC);
        let t = t.replace_microsecond(t.microsecond()).unwrap_or(t);
        if t.year() < 0 {
            let year_zero = OffsetDateTime::UNIX_EPOCH
                .replace_year(0)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            return Timestamp(year_zero);
        }
        Timestamp(t)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }
}

/// Why a string is not an audit [`Timestamp`], [`ChainHash`] or [`RecordId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditFieldError {
    /// Not `YYYY-MM-DDTHH:MM:SS.ffffffZ`, or not a real date and time.
    #[error(
        "`{0}` is not an audit timestamp: expected RFC 3339 UTC with microseconds, like `2026-05-01T12:34:56.123456Z`"
    )]
    Timestamp(String),
    /// Not 64 lower-case hex digits.
    #[error("`{0}` is not a chain hash: expected 64 lower-case hex digits")]
    ChainHash(String),
    /// Not 32 lower-case hex digits.
    #[error("`{0}` is not a record id: expected 32 lower-case hex digits")]
    RecordId(String),
}

impl FromStr for Timestamp {
    type Err = AuditFieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_timestamp(s).ok_or_else(|| AuditFieldError::Timestamp(s.to_owned()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A link of the chain: the SHA-256 of one record's line (see the module docs), shown as 64
/// lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHash([u8; 32]);

impl ChainHash {
    /// The `prev` of the first record: 64 zeros.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    /// The SHA-256 of `bytes`.
    pub fn digest(bytes: &[u8]) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
        ChainHash(out)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Appends the 64 hex digits to `out`, without allocating (this runs under the log's lock).
    pub(crate) fn push_hex(&self, out: &mut Vec<u8>) {
        let mut digits = [0u8; 64];
        // Cannot fail: 32 bytes always fill exactly 64 digits.
        if hex::encode_to_slice(self.0, &mut digits).is_ok() {
            out.extend_from_slice(&digits);
        }
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({self})")
    }
}

impl FromStr for ChainHash {
    type Err = AuditFieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_lower_hex::<32>(s)
            .map(ChainHash)
            .ok_or_else(|| AuditFieldError::ChainHash(s.to_owned()))
    }
}

impl Serialize for ChainHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A record's unique id: 48 bits of milliseconds since the Unix epoch, then 80 bits unique to the
/// record, shown as 32 lower-case hex digits, so ids sort by time like ULIDs. The proxy names it in a
/// 403 body. A writer draws its 80 bits once from the system's randomness and adds a per-record
/// counter ([`RecordId::sequenced`]): unique within the writer, unrelated across writers, and no
/// `getrandom` call per decision on the proxy's hot path.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId([u8; 16]);

impl RecordId {
    /// An id for the `n`-th record of a writer whose random base is `base`: the low 64 bits of the
    /// base advance by `n` (wrapping), so a writer never repeats an id before 2^64 records.
    pub(crate) fn sequenced(ts: Timestamp, base: &[u8; 10], n: u64) -> Self {
        let mut bytes = [0u8; 16];
        let millis = ts.0.unix_timestamp_nanos().div_euclid(1_000_000);
        let millis = u64::try_from(millis).unwrap_or(0).to_be_bytes();
        let (time_part, unique_part) = bytes.split_at_mut(6);
        time_part.copy_from_slice(millis.get(2..).unwrap_or(&[0; 6]));
        let (high, low) = base.split_at(2);
        let mut low_bytes = [0u8; 8];
        low_bytes.copy_from_slice(low);
        let low = u64::from_be_bytes(low_bytes).wrapping_add(n).to_be_bytes();
        let (unique_high, unique_low) = unique_part.split_at_mut(2);
        unique_high.copy_from_slice(high);
        unique_low.copy_from_slice(&low);
        RecordId(bytes)
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({self})")
    }
}

impl FromStr for RecordId {
    type Err = AuditFieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_lower_hex::<16>(s)
            .map(RecordId)
            .ok_or_else(|| AuditFieldError::RecordId(s.to_owned()))
    }
}

impl Serialize for RecordId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RecordId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn parse_lower_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn parse_timestamp(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    if b.len() != 27 {
        return None;
    }
    let separators = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ];
    if separators.iter().any(|&(i, c)| b.get(i) != Some(&c)) {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<u32> {
        let digits = b.get(from..to)?;
        digits.iter().try_fold(0u32, |acc, &d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    let year = i32::try_from(num(0, 4)?).ok()?;
    let month = Month::try_from(u8::try_from(num(5, 7)?).ok()?).ok()?;
    let day = u8::try_from(num(8, 10)?).ok()?;
    let hour = u8::try_from(num(11, 13)?).ok()?;
    let minute = u8::try_from(num(14, 16)?).ok()?;
    let second = u8::try_from(num(17, 19)?).ok()?;
    let micro = num(20, 26)?;
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let time = Time::from_hms_micro(hour, minute, second, micro).ok()?;
    Some(Timestamp(PrimitiveDateTime::new(date, time).assume_utc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_format_round_trips() {
        let ts: Timestamp = "2026-05-01T12:34:56.123456Z".parse().unwrap();
        assert_eq!(ts.to_string(), "2026-05-01T12:34:56.123456Z");
        let now = Timestamp::now();
        assert_eq!(now.to_string().len(), 27);
        assert_eq!(now.to_string().parse::<Timestamp>().unwrap(), now);
    }

    #[test]
    fn timestamp_rejects_other_forms() {
        for bad in [
            "",
            "2026-05-01T12:34:56Z",
            "2026-05-01T12:34:56.123456+00:00",
            "2026-05-01 12:34:56.123456Z",
            "2026-13-01T12:34:56.123456Z",
            "2026-02-30T12:34:56.123456Z",
            "2026-05-01T24:00:00.000000Z",
            "2026-05-01T12:34:56.12345aZ",
            "+026-05-01T12:34:56.123456Z",
        ] {
            assert!(
                matches!(bad.parse::<Timestamp>(), Err(AuditFieldError::Timestamp(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn chain_hash_parses_only_lower_case_hex() {
        let good = "ab".repeat(32);
        assert_eq!(good.parse::<ChainHash>().unwrap().to_string(), good);
        for bad in [
            "AB".repeat(32),
            "ab".repeat(31),
            "zz".repeat(32),
            String::new(),
        ] {
            assert!(
                matches!(bad.parse::<ChainHash>(), Err(AuditFieldError::ChainHash(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn record_ids_sort_by_time() {
        let base = [7u8; 10];
        // A later record with a smaller counter still sorts after: time comes first.
        let early = RecordId::sequenced("2026-01-01T00:00:00.000000Z".parse().unwrap(), &base, 9);
        let late = RecordId::sequenced("2026-01-01T00:00:01.000000Z".parse().unwrap(), &base, 0);
        assert!(early.to_string() < late.to_string());
        assert_eq!(early.to_string().parse::<RecordId>().unwrap(), early);
        assert!(matches!(
            "xyz".parse::<RecordId>(),
            Err(AuditFieldError::RecordId(_))
        ));
    }

    #[test]
    fn sequenced_ids_are_unique_within_a_millisecond_and_wrap_without_repeating() {
        let ts: Timestamp = "2026-01-01T00:00:00.000000Z".parse().unwrap();
        let base = [0xff_u8; 10];
        let ids: std::collections::HashSet<RecordId> = (0..10_000)
            .map(|n| RecordId::sequenced(ts, &base, n))
            .collect();
        assert_eq!(ids.len(), 10_000);
        // The low 64 bits wrap (base all ones + 1 = 0) while the high 16 bits of the base stay.
        let wrapped = RecordId::sequenced(ts, &base, 1);
        assert_eq!(&wrapped.as_bytes()[6..8], &[0xff, 0xff]);
        assert_eq!(&wrapped.as_bytes()[8..], &[0; 8]);
        // Another writer's base gives other ids for the same counters.
        let other = RecordId::sequenced(ts, &[1; 10], 1);
        assert!(!ids.contains(&other));
    }
}
