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

/// Time to eviction: `-` when no middlebox applies, `ok (profile)` when keepalive refreshes it.
fn eta(f: &FlowView) -> String {
    match &f.risk {
        None => "-".into(),
        Some(r) => match r.eta_ms {
            None => format!("ok ({})", r.profile),
            Some(ms) if ms <= 0 => format!("overdue ({})", r.profile),
            Some(ms) => format!("{} ({})", fmt_ms(ms as u64), r.profile),
        },
    }
}

/// One notice as a line: time, kind, transition, message.
pub fn notice(n: &serde_json::Value) -> String {
    let secs = n["time_ms"].as_u64().unwrap_or(0) / 1000;
    let (h, m, sec) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    format!(
        "{h:02}:{m:02}:{sec:02}Z {:<20} {:<8} {}",
        s(&n["kind"]),
        s(&n["transition"]),
        s(&n["message"])
    )
}

/// The session ledger.
pub fn ledger(v: &[crate::ledger::LedgerRow]) -> String {
    if v.is_empty() {
        return "no sessions\n".into();
    }
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|r| {
            vec![
                r.service.clone(),
                r.pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
                r.live.to_string(),
                r.leaked.to_string(),
                r.opened.to_string(),
                r.closed.to_string(),
                r.limit.map_or("-".into(), |l| {
                    format!("{l} ({})", r.limit_source.as_deref().unwrap_or("?"))
                }),
                format!("{:+.1}/min", r.growth_per_min),
                r.exhaustion_eta_s.map_or("-".into(), |e| fmt_ms(e * 1000)),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "PIDS",
            "LIVE",
            "LEAKED",
            "OPENED",
            "CLOSED",
            "LIMIT",
            "TREND",
            "EXHAUSTED IN",
        ],
        &rows,
        &[28, 20, 6, 6, 8, 8, 24, 12, 12],
    )
}

/// The profile table.
pub fn profiles(v: &[crate::profiles::Profile]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                fmt_ms(p.idle_timeout_s * 1000),
                if p.keepalive_resets {
                    "yes".into()
                } else {
                    "no: needs app pings".into()
                },
                p.source.clone(),
            ]
        })
        .collect();
    table(
        &["PROFILE", "IDLE TIMEOUT", "KEEPALIVE RESETS", "SOURCE"],
        &rows,
        &[20, 12, 22, 80],
    )
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
                eta(f),
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
            "ETA",
        ],
        &rows,
        &[12, 47, 47, 24, 28, 10, 10, 6, 14, 24],
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
        "owners:     {} full lookups (task_file iterator or /proc walk), {} targeted\n",
        s.owner_full_walks, s.owner_targeted_walks
    ));
    o.push_str(&format!(
        "config:     {} (reloaded {} times{})\n",
        s.config,
        s.config_reloads,
        s.last_reload_error
            .as_ref()
            .map_or(String::new(), |e| format!("; last reload refused: {e}"))
    ));
    o.push_str(&format!(
        "findings:   {} active; journald {}\n",
        s.findings_active,
        if s.journal {
            "on"
        } else {
            "off (not running or disabled)"
        }
    ));
    o
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn ms_of(v: &serde_json::Value) -> String {
    v.as_u64().map_or("-".into(), fmt_ms)
}

/// Parents of zombies.
pub fn procs(v: &[serde_json::Value]) -> String {
    if v.is_empty() {
        return "no processes with zombie children\n".into();
    }
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|c| {
            vec![
                s(&c["ppid"]),
                s(&c["comm"]),
                s(&c["count"]),
                ms_of(&c["oldest_ms"]),
                format!("{:.1}/min", c["rate_per_min"].as_f64().unwrap_or(0.0)),
                s(&c["diagnosis"]),
                format!(
                    "{}{}",
                    s(&c["nudges"]),
                    if c["stopped"] == true { " (stopped)" } else { "" }
                ),
            ]
        })
        .collect();
    table(
        &["PID", "COMM", "ZOMBIES", "OLDEST", "RATE", "DIAGNOSIS", "NUDGES"],
        &rows,
        &[8, 16, 8, 10, 10, 22, 14],
    )
}

/// Findings, newest last.
pub fn findings(v: &[serde_json::Value]) -> String {
    if v.is_empty() {
        return "no findings\n".into();
    }
    let mut out = String::new();
    for f in v {
        let state = if f["active"] == true { "active" } else { "resolved" };
        out.push_str(&format!(
            "#{} {} [{}] {} — {}\n",
            s(&f["id"]),
            s(&f["kind"]),
            state,
            s(&f["subject"]),
            s(&f["summary"])
        ));
        for a in f["actions"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "    {} {} ({}): {}\n",
                s(&a["action"]),
                s(&a["mode"]),
                s(&a["before"]),
                s(&a["outcome"])
            ));
        }
    }
    out
}

/// `explain <pid>`.
pub fn explain(v: &serde_json::Value) -> String {
    if v.get("flow").is_some() {
        return explain_flow(v);
    }
    let mut o = format!(
        "pid {} ({}), state {}, parent {}\n",
        s(&v["pid"]),
        s(&v["comm"]),
        s(&v["state"]),
        s(&v["ppid"])
    );
    if let Some(p) = v["zombie_of"].as_u64() {
        o.push_str(&format!(
            "a zombie: its parent pid {p} has not reaped it (see `holdfast explain {p}`)\n"
        ));
    }
    let c = &v["zombie_parent"];
    if c.is_object() {
        o.push_str(&format!(
            "zombie children: {} (oldest {}, {:.1}/min)\ndiagnosis: {} — {}\nnudges: {}{}\n",
            s(&c["count"]),
            ms_of(&c["oldest_ms"]),
            c["rate_per_min"].as_f64().unwrap_or(0.0),
            s(&c["diagnosis"]),
            crate::procs::Diagnosis::explain_str(c["diagnosis"].as_str().unwrap_or("")),
            s(&c["nudges"]),
            if c["stopped"] == true {
                " (stopped: they did not help)"
            } else {
                ""
            }
        ));
        let kids: Vec<String> = c["children"]
            .as_array()
            .into_iter()
            .flatten()
            .take(10)
            .map(|k| format!("{}/{}", s(&k["pid"]), s(&k["comm"])))
            .collect();
        o.push_str(&format!("children: {}\n", kids.join(" ")));
    }
    if let Some(f) = v["findings"].as_array().filter(|f| !f.is_empty()) {
        o.push_str(&findings(f));
    }
    if let Some(fl) = v["flows"].as_array().filter(|f| !f.is_empty()) {
        o.push_str(&format!("flows: {}\n", fl.len()));
    }
    o
}

fn explain_flow(v: &serde_json::Value) -> String {
    let f = &v["flow"];
    let mut o = format!(
        "flow cookie:{} {} → {} {} owner {}/{}\n",
        s(&f["cookie"]),
        s(&f["local"]),
        s(&f["remote"]),
        s(&f["state"]),
        s(&f["pid"]),
        s(&f["comm"])
    );
    o.push_str(&format!("idle:       {}\n", ms_of(&f["idle_ms"])));
    let a = &v["assessment"];
    if a.is_object() {
        let app = &a["applicable"];
        if app.is_object() {
            o.push_str(&format!(
                "timeout:    {} ({}) — {}\n",
                ms_of(&(app["timeout_s"].as_u64().unwrap_or(0) * 1000).into()),
                s(&app["profile"]),
                s(&app["why"])
            ));
        } else {
            o.push_str(&format!("timeout:    none — {}\n", s(&a["no_middlebox_reason"])));
        }
        let k = &a["keepalive"];
        o.push_str(&format!(
            "keepalive:  {} (idle {}s, intvl {}s, cnt {}, from {})\n",
            match k["on"].as_bool() {
                Some(true) => "on",
                Some(false) => "off",
                None => "?",
            },
            s(&k["values"]["idle_s"]),
            s(&k["values"]["intvl_s"]),
            s(&k["values"]["cnt"]),
            s(&k["source"])
        ));
        if let Some(d) = a["detection_s"].as_u64() {
            o.push_str(&format!(
                "dead peer:  found {} after the last activity\n",
                fmt_ms(d * 1000)
            ));
        }
        o.push_str(&format!(
            "forecast:   {}{}\n",
            s(&a["verdict"]),
            a["eta_ms"].as_i64().map_or(String::new(), |e| format!(
                ", eviction in {}",
                if e <= 0 {
                    "0s (overdue)".into()
                } else {
                    fmt_ms(e as u64)
                }
            ))
        ));
    }
    if let Some(fs) = v["findings"].as_array().filter(|f| !f.is_empty()) {
        o.push_str(&findings(fs));
    }
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

#[cfg(test)]
mod flow_table_tests {
    use super::*;

    #[test]
    fn renders_flows_with_a_forecast() {
        let v: FlowView = serde_json::from_value(serde_json::json!({
            "cookie": 1, "local": "10.77.1.2:40000", "remote": "10.77.2.2:5432", "state": "ESTAB",
            "state_age_ms": 9000, "seen_for_ms": 9000, "pid": 5, "comm": "psql", "unit": null, "cgroup": null,
            "uid": 0, "inode": 3, "last_data_sent_ms": 9000, "last_data_recv_ms": 9000, "last_ack_recv_ms": 9000,
            "idle_ms": 9000, "retransmits": 0, "total_retrans": 0, "unacked": 0, "probes": 0, "keepalive": false,
            "timer": "none", "timer_expires_ms": null, "keepalive_idle_s": null, "keepalive_intvl_s": null,
            "keepalive_cnt": null, "resets_recv": 0, "resets_sent": 0, "retransmit_events": 0, "last_error": null,
            "risk": { "profile": "lab-nat", "timeout_s": 10, "verdict": "near-eviction", "eta_ms": 1000 }
        }))
        .unwrap();
        let out = flows(&[v]);
        assert!(out.contains("1s (lab-nat)"), "{out}");
    }
}
