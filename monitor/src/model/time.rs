//! Time: the monotonic clock's nanoseconds, and human durations (`350s`, `4m`, `2h`, `1h30m`,
//! `500ms`) in config, CLI arguments and output.
use std::time::Duration;

/// Nanoseconds of CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns).
pub type Nanos = u64;

pub const SEC: Nanos = 1_000_000_000;

/// Milliseconds of a nanosecond value.
pub fn ms(ns: Nanos) -> u64 {
    ns / 1_000_000
}

/// The longest duration holdfast accepts anywhere (ten years): far beyond any sensible interval
/// or timeout, and small enough that no arithmetic on it can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Parses `500ms`, `30s`, `4m`, `2h`, `1d` and sums like `1h30m`. Never panics: numbers and sums
/// past [`MAX_DURATION`] are errors that say so.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration: expected something like 350s, 4m, 2h or 500ms".into());
    }
    let too_long = || format!("`{s}` is longer than the maximum of 10 years (3650d)");
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{s}` is not a duration like 350s, 4m, 2h or 500ms"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let per_unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("`{s}` needs a unit: ms, s, m, h or d (e.g. 350s)")),
            other => return Err(format!("`{s}`: unknown unit `{other}`; use ms, s, m, h or d")),
        };
        let part = n.checked_mul(per_unit_ms).ok_or_else(too_long)?;
        total = total
            .checked_add(Duration::from_millis(part))
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(too_long)?;
    }
    Ok(total)
}

/// Formats milliseconds compactly: `850ms`, `42s`, `5m50s`, `2h`, `3d4h`.
pub fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    let parts = [(d, "d"), (h, "h"), (m, "m"), (sec, "s")];
    let first = parts.iter().position(|(v, _)| *v != 0).unwrap_or(3);
    // Two most significant units are enough to read at a glance.
    parts[first..]
        .iter()
        .take(2)
        .filter(|(v, _)| *v != 0)
        .map(|(v, u)| format!("{v}{u}"))
        .collect()
}

/// A duration as the config file writes it (`--show`): exact, in the largest unit that divides it.
pub fn fmt_exact(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, per) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= per && ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_duration("350s").unwrap(), Duration::from_secs(350));
        assert_eq!(parse_duration("4m").unwrap(), Duration::from_secs(240));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("10").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ms").is_err());
        assert_eq!(fmt_ms(850), "850ms");
        assert_eq!(fmt_ms(350_000), "5m50s");
        assert_eq!(fmt_ms(7_200_000), "2h");
        assert_eq!(fmt_ms(42_000), "42s");
        assert_eq!(fmt_ms(90_061_000), "1d1h");
        for d in ["350s", "4m", "2h", "1d", "500ms", "90s"] {
            let parsed = parse_duration(d).unwrap();
            assert_eq!(parse_duration(&fmt_exact(parsed)).unwrap(), parsed, "{d}");
        }
    }

    #[test]
    fn overflowing_durations_are_errors_not_panics() {
        for s in [
            "18446744073709551615s18446744073709551615s",
            "18446744073709551615s1s",
            "99999999999999999999999s",
            "3651d",
            "18446744073709551615ms",
        ] {
            let e = parse_duration(s).unwrap_err();
            assert!(e.contains("maximum of 10 years"), "{s}: {e}");
        }
        assert_eq!(parse_duration("3650d").unwrap(), MAX_DURATION);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 5000, .. ProptestConfig::default() })]

        /// Any text: a duration no longer than the maximum, or an error that says what is wrong.
        #[test]
        fn any_text_is_a_bounded_duration_or_an_error(s in "[0-9a-z ]{0,40}") {
            match parse_duration(&s) {
                Ok(d) => prop_assert!(d <= MAX_DURATION),
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }

        /// Formatting and parsing agree.
        #[test]
        fn exact_formatting_round_trips(ms in 0u64..=315_360_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&fmt_exact(d)).unwrap(), d);
        }
    }
}
