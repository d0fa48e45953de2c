//! `holdfast procs`, `holdfast ledger`, `holdfast profiles`: tables of what the agent keeps.
use std::path::Path;
use std::process::ExitCode;

use super::table::{opt, table};
use super::{json_out, query};
use crate::config::profiles::Profile;
use crate::ipc::{ProcRow, Request};
use crate::model::eviction::ProfilesView;
use crate::model::leaks::LedgerRow;
use crate::model::time::fmt_ms;

pub fn procs(socket: &Path, json: bool, zombies: bool) -> Result<(), ExitCode> {
    let v: Vec<ProcRow> = query(socket, Request::Procs { zombies })?;
    if json {
        json_out(&v);
        return Ok(());
    }
    if v.is_empty() {
        println!("no processes with zombie children or dead sockets");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|r| {
            let z = r.zombies.as_ref();
            vec![
                r.pid.to_string(),
                r.comm.clone(),
                z.map_or("-".into(), |c| c.count.to_string()),
                z.map_or("-".into(), |c| fmt_ms(c.oldest_ms)),
                z.map_or("-".into(), |c| c.diagnosis.as_str().into()),
                z.map_or("-".into(), |c| {
                    format!("{}{}", c.nudges, if c.stopped { " (stopped)" } else { "" })
                }),
                r.dead_sockets.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "PID",
                "COMM",
                "ZOMBIES",
                "OLDEST",
                "DIAGNOSIS",
                "NUDGES",
                "DEAD SOCKETS"
            ],
            &rows,
            &[8, 16, 8, 10, 22, 14, 12]
        )
    );
    Ok(())
}

pub fn render_ledger(v: &[LedgerRow]) -> String {
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
                r.held.to_string(),
                r.opened.to_string(),
                r.closed.to_string(),
                r.limit.map_or("-".into(), |l| {
                    format!("{l} ({})", r.limit_source.as_deref().unwrap_or("?"))
                }),
                format!("{:+.1}/min", r.growth_per_min),
                r.exhaustion_eta_s
                    .map_or("-".into(), |e| fmt_ms(e.saturating_mul(1000))),
                opt(r.restart.as_deref()),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "PIDS",
            "LIVE",
            "LEAKED",
            "HELD",
            "OPENED",
            "CLOSED",
            "LIMIT",
            "TREND",
            "EXHAUSTED IN",
            "RESTART",
        ],
        &rows,
        &[28, 20, 6, 6, 6, 8, 8, 24, 12, 12, 40],
    )
}

pub fn ledger(socket: &Path, json: bool) -> Result<(), ExitCode> {
    let v: Vec<LedgerRow> = query(socket, Request::Ledger {})?;
    if json {
        json_out(&v);
    } else {
        print!("{}", render_ledger(&v));
    }
    Ok(())
}

pub fn profiles(socket: &Path, json: bool) -> Result<(), ExitCode> {
    let view: ProfilesView = query(socket, Request::Profiles {})?;
    if json {
        json_out(&view);
        return Ok(());
    }
    let v: &[Profile] = &view.profiles;
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                fmt_ms(p.idle_timeout_s.saturating_mul(1000)),
                if p.keepalive_resets {
                    "yes".into()
                } else {
                    "no: needs app pings".into()
                },
                p.source.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["PROFILE", "IDLE TIMEOUT", "KEEPALIVE RESETS", "SOURCE"],
            &rows,
            &[20, 12, 22, 80]
        )
    );
    if !view.learned.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = view
            .learned
            .iter()
            .map(|l| {
                vec![
                    format!("{} via {}", l.prefix, l.gateway),
                    if l.netns_present {
                        l.netns.clone()
                    } else {
                        format!("{} (gone)", l.netns)
                    },
                    l.timeout_s.map_or("-".into(), |t| fmt_ms(t * 1000)),
                    l.evidence.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &["LEARNT PATH", "NETNS", "IDLE TIMEOUT", "EVIDENCE"],
                &rows,
                &[36, 16, 12, 100]
            )
        );
    } else if view.learning {
        println!(
            "\nno path evidence yet: timeouts are learnt from evictions and survivals of flows through a gateway"
        );
    }
    Ok(())
}
