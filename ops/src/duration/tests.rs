use super::*;

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration(" 24h "), Ok(Duration::from_secs(86_400)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
}

#[test]
fn bad_durations_are_refused() {
    assert_eq!(parse_duration(""), Err(DurationError::Empty));
    assert_eq!(parse_duration("   "), Err(DurationError::Empty));
    assert_eq!(
        parse_duration("30"),
        Err(DurationError::NoUnit("30".into()))
    );
    assert_eq!(parse_duration("5"), Err(DurationError::NoUnit("5".into())));
    assert_eq!(
        parse_duration("1m30"),
        Err(DurationError::NoUnit("30".into()))
    );
    assert_eq!(
        parse_duration("3w"),
        Err(DurationError::UnknownUnit("w".into()))
    );
    assert_eq!(
        parse_duration("5sec"),
        Err(DurationError::UnknownUnit("sec".into()))
    );
    assert_eq!(
        parse_duration("5S"),
        Err(DurationError::UnknownUnit("S".into()))
    );
    assert_eq!(
        parse_duration("h"),
        Err(DurationError::ExpectedNumber("h".into()))
    );
    assert_eq!(
        parse_duration("s"),
        Err(DurationError::ExpectedNumber("s".into()))
    );
    assert_eq!(
        parse_duration("ten"),
        Err(DurationError::ExpectedNumber("ten".into()))
    );
    assert_eq!(
        parse_duration("1h-2m"),
        Err(DurationError::ExpectedNumber("-2m".into()))
    );
    assert_eq!(
        parse_duration("-1s"),
        Err(DurationError::ExpectedNumber("-1s".into()))
    );
    assert_eq!(
        parse_duration("+1s"),
        Err(DurationError::ExpectedNumber("+1s".into()))
    );
    assert_eq!(
        // A fraction is refused at its point: write `1s500ms`.
        parse_duration("1.5s"),
        Err(DurationError::NoUnit("1".into()))
    );
    assert_eq!(
        parse_duration("1h 30m"),
        Err(DurationError::ExpectedNumber(" 30m".into()))
    );
    assert_eq!(
        parse_duration("99999999999999999999s"),
        Err(DurationError::Overflow)
    );
    assert_eq!(
        parse_duration("99999999999999999999999s"),
        Err(DurationError::Overflow)
    );
    assert_eq!(parse_duration("5000000000d"), Err(DurationError::Overflow));
    // Each part fits; the sum does not.
    let parts = "4000000000d".repeat(60_000);
    assert_eq!(parse_duration(&parts), Err(DurationError::Overflow));
}

#[test]
fn errors_say_what_is_wrong_on_one_line() {
    let cases = [
        ("", "empty duration; use e.g. `30s`, `10m`, `1h`"),
        ("5", "`5` has no unit; use `s`, `m`, `h` or `d` (e.g. `5s`)"),
        ("3w", "unknown unit `w`; use `ms`, `s`, `m`, `h` or `d`"),
        ("s", "expected a number at `s`"),
        ("99999999999999999999s", "duration is too long"),
    ];
    for (text, message) in cases {
        assert_eq!(parse_duration(text).unwrap_err().to_string(), message);
    }
}

#[test]
fn durations_round_trip_through_display() {
    for d in [30, 90, 3600, 5400, 86_400, 90_061] {
        let d = Duration::from_secs(d);
        assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }
    for ms in [1, 250, 1500, 90_001] {
        let d = Duration::from_millis(ms);
        assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }
    assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    assert_eq!(format_duration(Duration::from_secs(5)), "5s");
    assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
    assert_eq!(format_duration(Duration::from_millis(10)), "10ms");
    assert_eq!(format_duration(Duration::ZERO), "0ms");
}
