//! `holdfast explain PID | cookie:N | ADDR:PORT | local ADDR:PORT`.
use std::path::Path;
use std::process::ExitCode;

use super::{json_out, query};
use crate::ipc::{Explanation, FlowExplanation, ProcessExplanation, Request};
use crate::model::time::fmt_ms;

pub fn run(socket: &Path, target: &[String], json: bool) -> Result<(), ExitCode> {
    let target = match target {
        [one] => one.clone(),
        [word, addr] if word == "local" => addr.clone(),
        _ => {
            eprintln!("holdfast: explain takes a PID, cookie:N, a local ADDR:PORT, or `local ADDR:PORT`");
            return Err(ExitCode::from(2));
        }
    };
    let e: Explanation = query(socket, Request::Explain { target })?;
    if json {
        json_out(&e);
        return Ok(());
    }
    match e {
        Explanation::Process(p) => print!("{}", process(&p)),
        Explanation::Flow(f) => print!("{}", flow(&f)),
    }
    Ok(())
}

fn process(v: &ProcessExplanation) -> String {
    let mut o = format!(
        "pid {} ({}), state {}, parent {}\n",
        v.pid,
        v.comm.as_deref().unwrap_or("-"),
        v.state.map_or("-".into(), |s| s.to_string()),
        v.ppid.map_or("-".into(), |p| p.to_string())
    );
    if let Some(p) = v.zombie_of {
        o.push_str(&format!(
            "a zombie: its parent pid {p} has not reaped it (see `holdfast explain {p}`)\n"
        ));
    }
    if let Some(c) = &v.zombie_parent {
        o.push_str(&format!(
            "zombie children: {} (oldest {}, {:.1}/min)\ndiagnosis: {} — {}\nnudges: {}{}\n",
            c.count,
            fmt_ms(c.oldest_ms),
            c.rate_per_min,
            c.diagnosis.as_str(),
            c.explanation,
            c.nudges,
            if c.stopped {
                " (stopped: they did not help)"
            } else {
                ""
            }
        ));
        let kids: Vec<String> = c
            .children
            .iter()
            .take(10)
            .map(|k| format!("{}/{}", k.pid, k.comm))
            .collect();
        o.push_str(&format!("children: {}\n", kids.join(" ")));
    }
    if !v.dead_sockets.is_empty() {
        o.push_str(&format!(
            "dead sockets held: {} (descriptors to TCP sockets that are in no TCP table any more)\n",
            v.dead_sockets.len()
        ));
        for s in v.dead_sockets.iter().take(20) {
            let was = match (s.local, s.remote) {
                (Some(l), Some(r)) => format!(", was {l} → {r}"),
                _ => String::new(),
            };
            o.push_str(&format!(
                "  fd {} (socket inode {}), dead for {}{was}\n",
                s.fd,
                s.inode,
                fmt_ms(s.age_ms)
            ));
        }
    }
    if !v.findings.is_empty() {
        o.push_str(&super::findings::render(&v.findings));
    }
    if !v.flows.is_empty() {
        o.push_str(&format!("flows: {}\n", v.flows.len()));
    }
    o
}

fn flow(v: &FlowExplanation) -> String {
    let f = &v.flow;
    let mut o = format!(
        "flow cookie:{} {} → {} {} owner {}/{}{}\n",
        f.cookie,
        f.local,
        f.remote,
        f.state,
        f.pid.map_or("-".into(), |p| p.to_string()),
        f.comm.as_deref().unwrap_or("-"),
        f.netns.as_ref().map_or(String::new(), |n| format!(" in {n}"))
    );
    o.push_str(&format!("idle:       {}\n", f.idle_ms.map_or("-".into(), fmt_ms)));
    if let Some(a) = &v.assessment {
        match &a.applicable {
            Some(app) => o.push_str(&format!(
                "timeout:    {} ({}) — {}\n",
                fmt_ms(app.timeout_s.saturating_mul(1000)),
                app.profile,
                app.why
            )),
            None => o.push_str(&format!(
                "timeout:    none — {}\n",
                a.no_middlebox_reason.as_deref().unwrap_or("")
            )),
        }
        let k = &a.keepalive;
        o.push_str(&format!(
            "keepalive:  {} (idle {}s, intvl {}s, cnt {}, from {})\n",
            match k.on {
                Some(true) => "on",
                Some(false) => "off",
                None => "?",
            },
            k.values.idle_s,
            k.values.intvl_s,
            k.values.cnt,
            k.source.as_str()
        ));
        if let Some(d) = a.detection_s {
            o.push_str(&format!(
                "dead peer:  found {} after the last activity\n",
                fmt_ms(u64::from(d) * 1000)
            ));
        }
        o.push_str(&format!(
            "forecast:   {}{}\n",
            a.verdict.as_str(),
            a.eta_ms.map_or(String::new(), |e| format!(
                ", eviction in {}",
                if e <= 0 {
                    "0s (overdue)".into()
                } else {
                    fmt_ms(e as u64)
                }
            ))
        ));
    }
    if let Some(w) = &f.wire_probes {
        let last = match (w.last_answer_ago_ms, w.last_rtt_us) {
            (Some(ago), Some(rtt)) => format!(
                ", last answered {} ago in {}",
                fmt_ms(ago),
                crate::model::probe::rtt_words(rtt)
            ),
            _ => ", none answered yet".into(),
        };
        o.push_str(&format!(
            "probes:     {} sent, {} answered, {} unanswered{last}{} (seen on the wire)\n",
            w.sent,
            w.answered,
            w.unanswered,
            w.last_sent_ago_ms
                .map_or(String::new(), |s| format!(", last sent {} ago", fmt_ms(s)))
        ));
    }
    if !v.findings.is_empty() {
        o.push_str(&super::findings::render(&v.findings));
    }
    o
}
