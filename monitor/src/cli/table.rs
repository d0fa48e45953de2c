//! Aligned text tables and the small formatting helpers every command shares.
use crate::model::time::fmt_ms;

/// Left-aligned columns, each as wide as its widest cell (capped), two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>], caps: &[usize]) -> String {
    let cut = |s: &str, cap: usize| -> String {
        if s.chars().count() <= cap {
            s.to_string()
        } else {
            s.chars().take(cap.saturating_sub(1)).chain(['…']).collect()
        }
    };
    let columns = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(header.len());
    let mut width: Vec<usize> = (0..columns)
        .map(|i| header.get(i).map_or(0, |h| h.len()))
        .collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, c)| cut(c, caps.get(i).copied().unwrap_or(40)))
                .collect()
        })
        .collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(&c);
            if i + 1 < n {
                s.push_str(&" ".repeat(width[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

pub fn opt_ms(v: Option<u64>) -> String {
    v.map_or("-".into(), fmt_ms)
}

pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |x| x.to_string())
}

/// `1 flow`, `3 flows`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_truncate() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxxx".into(), "y".into()],
                vec!["z".into(), "0123456789".into()],
            ],
            &[10, 5],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A     BB");
        assert_eq!(lines[1], "xxxx  y");
        assert_eq!(lines[2], "z     0123…");
        assert_eq!(count(1, "flow", "flows"), "1 flow");
    }
}
