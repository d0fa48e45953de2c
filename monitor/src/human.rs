//! Human durations: `350s`, `4m`, `2h`, `1h30m`, `500ms` in config and output.
use std::time::Duration;

/// Parses `500ms`, `30s`, `4m`, `2h`, `1d` and sums like `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{s}` is not a duration like 350s, 4m, 2h or 500ms"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86400),
            "" => return Err(format!("`{s}` needs a unit: ms, s, m, h or d (e.g. 350s)")),
            other => {
                return Err(format!("`{s}`: unknown unit `{other}`; use ms, s, m, h or d"));
            }
        };
        total += d;
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

pub fn fmt_duration(d: Duration) -> String {
    fmt_ms(d.as_millis() as u64)
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
    }
}
