//! `holdfast status`: the mode and why, what the kernel allows, the namespaces watched, counters.
use std::path::Path;
use std::process::ExitCode;

use super::{json_out, query};
use crate::ipc::{Request, Status};
use crate::model::time::fmt_ms;

pub fn run(socket: &Path, json: bool, check: bool) -> Result<(), ExitCode> {
    let s: Status = query(socket, Request::Status {})?;
    if json {
        json_out(&s);
    } else {
        print!("{}", render(&s));
    }
    if check && s.findings_active > 0 {
        return Err(ExitCode::from(1));
    }
    Ok(())
}

pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("{k:<11} {v}\n"));
    line(
        "holdfast",
        format!(
            "{} — agent pid {}, up {}, {} MiB",
            s.version,
            s.pid,
            fmt_ms(s.uptime_ms),
            s.rss_bytes >> 20
        ),
    );
    line("mode:", format!("{} ({})", s.mode, s.mode_reason));
    line("kernel:", s.kernel.clone());
    let missing: Vec<String> = s
        .features
        .iter()
        .filter(|f| !f.available)
        .map(|f| format!("{} ({})", f.name, f.detail))
        .collect();
    let have: Vec<&str> = s
        .features
        .iter()
        .filter(|f| f.available)
        .map(|f| f.name.as_str())
        .collect();
    line("features:", have.join(" "));
    if !missing.is_empty() {
        line("missing:", missing.join("; "));
    }
    line(
        "flows:",
        format!(
            "{} tracked (opened {}, closed {}; {} in TIME-WAIT)",
            s.flows, s.table.opened, s.table.closed, s.table.time_wait_now
        ),
    );
    let ns: Vec<String> = s
        .netns
        .iter()
        .map(|n| {
            let err = n
                .error
                .as_ref()
                .map_or(String::new(), |e| format!(", error: {e}"));
            format!("{} {}{err}", n.name, n.flows)
        })
        .collect();
    const SHOWN: usize = 12;
    let more = ns.len().saturating_sub(SHOWN);
    let mut listed = ns.into_iter().take(SHOWN).collect::<Vec<_>>().join("; ");
    if more > 0 {
        listed.push_str(&format!("; and {more} more (holdfast status --json lists all)"));
    }
    line(
        "netns:",
        format!("{} watched ({}): {listed}", s.netns.len(), s.netns_scope),
    );
    line(
        "events:",
        format!(
            "{} (lost {}, undecodable {}, program errors {}, iterator overflows {})",
            s.events, s.events_lost, s.events_undecodable, s.program_errors, s.kernel_counters.iter_overflow
        ),
    );
    if s.fresh.reads + s.fresh.not_read > 0 {
        let mut v = format!(
            "{} `flows` queries read their {} sockets at the query",
            s.fresh.reads, s.fresh.sockets
        );
        if s.fresh.not_read > 0 {
            v.push_str(&format!(
                "; {} answered from the last read ({})",
                s.fresh.not_read,
                s.fresh.last_reason.as_deref().unwrap_or("no reason kept")
            ));
        }
        line("fresh:", v);
    }
    line(
        "snapshots:",
        format!(
            "{} every {}{} ({} complete){}, last took {:.2} ms for {} sockets in {} namespaces ({} left out by the kernel filter){}",
            s.snapshots,
            fmt_ms(s.snapshot_interval_ms),
            if s.snapshot_paced_ms > s.snapshot_interval_ms {
                format!(
                    " (now {} apart: a read of this many sockets is paced to its share of a core)",
                    fmt_ms(s.snapshot_paced_ms)
                )
            } else {
                String::new()
            },
            s.complete_reads,
            if s.snapshots_skipped > 0 {
                format!(
                    " ({} filtered reads skipped: nothing new could be found)",
                    s.snapshots_skipped
                )
            } else {
                String::new()
            },
            s.last_snapshot_ms,
            s.last_snapshot_sockets,
            s.netns.len(),
            s.kernel_counters.iter_skipped,
            match &s.last_snapshot_error {
                Some(e) => format!("; FAILING ({} failures): {e}", s.snapshot_failures),
                None if s.snapshot_failures > 0 => format!("; {} failures earlier", s.snapshot_failures),
                None => String::new(),
            }
        ),
    );
    line(
        "owners:",
        format!(
            "{} full lookups (task_file iterator or /proc walk), {} targeted (the likely owner's descriptors)",
            s.owner_full_walks, s.owner_targeted_walks
        ),
    );
    line("connect:", s.keepalive_at_connect.clone());
    line("probes:", s.probe_watch.clone());
    line(
        "config:",
        format!(
            "{} (reloaded {} times{})",
            s.config,
            s.config_reloads,
            s.last_reload_error
                .as_ref()
                .map_or(String::new(), |e| format!("; last reload refused: {e}"))
        ),
    );
    line(
        "socket:",
        format!(
            "{} {}; {} client(s) now, {} refused",
            s.socket,
            if s.socket_ok {
                "ok"
            } else {
                "MISSING (recreation failed)"
            },
            s.clients,
            s.clients_refused
        ),
    );
    line(
        "findings:",
        format!(
            "{} active; journald {}",
            s.findings_active,
            if s.journal {
                "on"
            } else {
                "off (not running or disabled)"
            }
        ),
    );
    o
}
