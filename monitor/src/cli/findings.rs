//! `holdfast findings` and `holdfast events [--follow]`.
use std::path::Path;
use std::process::ExitCode;

use super::{json_out, query};
use crate::ipc::{Request, client};
use crate::model::finding::{ActionValues, Finding, FindingKind};
use crate::sinks::Notice;

pub fn findings(socket: &Path, json: bool, all: bool, kind: Option<FindingKind>) -> Result<(), ExitCode> {
    let v: Vec<Finding> = query(socket, Request::Findings { all, kind })?;
    if json {
        json_out(&v);
    } else {
        print!("{}", render(&v));
    }
    Ok(())
}

fn values(v: &Option<ActionValues>) -> String {
    match v {
        None => "-".into(),
        Some(ActionValues::Keepalive {
            so_keepalive,
            idle_s,
            intvl_s,
            cnt,
        }) => format!(
            "keepalive {} {idle_s}/{intvl_s}/{cnt}",
            if *so_keepalive { "on" } else { "off" }
        ),
        Some(ActionValues::Socket {
            local, remote, state, ..
        }) => format!("{state} {local} → {remote}"),
        Some(ActionValues::SocketState { state }) => state.clone(),
        Some(ActionValues::Zombies { zombies, .. }) => format!("{zombies} zombies"),
        Some(ActionValues::Sessions { live, held, .. }) => format!("{live} live, {held} held"),
    }
}

/// Findings, oldest first, each with its actions.
pub fn render(v: &[Finding]) -> String {
    if v.is_empty() {
        return "no findings\n".into();
    }
    let mut out = String::new();
    for f in v {
        let state = if f.active { "active" } else { "resolved" };
        out.push_str(&format!(
            "#{} {} [{state}] {} — {}\n",
            f.id, f.kind, f.subject, f.summary
        ));
        if let Some(r) = &f.resolution {
            out.push_str(&format!("    resolved: {r}\n"));
        }
        for a in &f.actions {
            out.push_str(&format!(
                "    {} {} ({}): {}\n",
                a.action.as_str(),
                a.mode.as_str(),
                values(&a.before),
                a.outcome
            ));
        }
    }
    out
}

/// One notice as a line: time, kind, transition, message.
pub fn notice(n: &Notice) -> String {
    let secs = n.time_ms / 1000;
    let (h, m, sec) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    format!(
        "{h:02}:{m:02}:{sec:02}Z {:<20} {:<8} {}",
        n.kind.as_str(),
        n.transition.as_str(),
        n.message
    )
}

pub fn events(
    socket: &Path,
    follow: bool,
    json: bool,
    kind: Option<FindingKind>,
    pid: Option<u32>,
) -> Result<(), ExitCode> {
    let keep = |n: &Notice| kind.is_none_or(|k| n.kind == k) && pid.is_none_or(|p| n.pid == Some(p));
    let show = |n: &Notice| {
        if json {
            println!("{}", serde_json::to_string(n).unwrap_or_default());
        } else {
            println!("{}", notice(n));
        }
    };
    if follow {
        client::follow(socket, |n| {
            if keep(&n) {
                show(&n);
            }
        })
        .map_err(|e| {
            eprintln!("holdfast: {e}");
            ExitCode::from(e.exit_code())
        })
    } else {
        let v: Vec<Notice> = query(socket, Request::Events { follow: false })?;
        v.iter().filter(|n| keep(n)).for_each(show);
        Ok(())
    }
}
