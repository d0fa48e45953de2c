//! Human output of the CLI: aligned tables and short summaries.
use crate::flows::FlowView;
use crate::human::fmt_ms;
use crate::ipc::Status;

/// Left-aligned columns, each as wide as its widest cell (capped), two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>], caps: &[usize]) -> String {
    let cut = |s: &str, cap: usize| -> String {
        if s.chars().count() <= cap {
            s.to_string()
        } else {
            s.chars().take(cap.saturating_sub(1)).chain(['…']).collect()
        }
    };
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
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

fn opt_ms(v: Option<u64>) -> String {
    v.map_or("-".into(), fmt_ms)
}

fn keepalive(f: &FlowView) -> String {
    match (f.keepalive, f.timer.as_deref(), f.timer_expires_ms) {
        (Some(true), Some("keepalive"), Some(ms)) => format!("on ({})", fmt_ms(ms.max(0) as u64)),
        (Some(true), _, _) => "on".into(),
        (Some(false), _, _) => "off".into(),
        (None, _, _) => "?".into(),
    }
}

pub fn flows(v: &[FlowView]) -> String {
    if v.is_empty() {
        return "no flows\n".into();
    }
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|f| {
            vec![
                f.state.clone(),
                f.local.clone(),
                f.remote.clone(),
                match (&f.pid, &f.comm) {
                    (Some(p), Some(c)) => format!("{p}/{c}"),
                    (Some(p), None) => p.to_string(),
                    _ => "-".into(),
                },
                f.unit.clone().unwrap_or_else(|| "-".into()),
                f.state_age_ms
                    .map_or_else(|| format!(">{}", fmt_ms(f.seen_for_ms)), fmt_ms),
                opt_ms(f.idle_ms),
                f.total_retrans.map_or("-".into(), |r| r.to_string()),
                keepalive(f),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "STATE",
            "LOCAL",
            "REMOTE",
            "PID/COMM",
            "UNIT",
            "AGE",
            "IDLE",
            "RETR",
            "KEEPALIVE",
        ],
        &rows,
        &[12, 47, 47, 24, 28, 10, 10, 6, 14],
    );
    out.push_str(&format!(
        "{} flow{}\n",
        v.len(),
        if v.len() == 1 { "" } else { "s" }
    ));
    out
}

pub fn status(s: &Status) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        "holdfast {} — agent pid {}, up {}\n",
        s.version,
        s.pid,
        fmt_ms(s.uptime_ms)
    ));
    o.push_str(&format!("mode:       {} ({})\n", s.mode, s.mode_reason));
    o.push_str(&format!("kernel:     {}\n", s.kernel));
    o.push_str(&format!(
        "flows:      {} tracked (opened {}, closed {}; {} in TIME-WAIT)\n",
        s.flows, s.table.opened, s.table.closed, s.table.time_wait
    ));
    o.push_str(&format!(
        "events:     {} (lost {}, undecodable {}, program errors {})\n",
        s.events, s.events_lost, s.events_undecodable, s.program_errors
    ));
    o.push_str(&format!(
        "snapshots:  {} every {}, last took {:.2} ms for {} sockets\n",
        s.snapshots,
        fmt_ms(s.snapshot_interval_ms),
        s.last_snapshot_ms,
        s.last_snapshot_sockets
    ));
    o.push_str(&format!(
        "owners:     {} full /proc walks, {} targeted\n",
        s.owner_full_walks, s.owner_targeted_walks
    ));
    o.push_str(&format!("config:     {}\n", s.config));
    o
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
    }
}
