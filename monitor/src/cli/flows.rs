//! `holdfast flows`: the tracked flows, with their idle time, keepalive and eviction forecast.
use std::path::Path;
use std::process::ExitCode;

use super::table::{opt_ms, table};
use super::{json_out, query};
use crate::ipc::{FlowFilter, Request};
use crate::model::flow::FlowView;
use crate::model::observe::Timer;
use crate::model::time::fmt_ms;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    json: bool,
    /// Include listening sockets.
    #[arg(long)]
    all: bool,
    /// Only flows in this state (estab, close-wait, listen, ...).
    #[arg(long)]
    state: Option<String>,
    /// Only flows with this local or remote port.
    #[arg(long)]
    port: Option<u16>,
    /// Only flows owned by this process.
    #[arg(long)]
    pid: Option<u32>,
    /// Only flows of processes in this systemd unit.
    #[arg(long)]
    unit: Option<String>,
    /// Only flows of this network namespace (`ip netns` name, container, or net:[inode]).
    #[arg(long)]
    netns: Option<String>,
    /// Only flows at risk of NAT / load-balancer eviction.
    #[arg(long)]
    at_risk: bool,
    /// Only leaked sessions (half-open, or stuck in CLOSE_WAIT / FIN_WAIT2 / LAST_ACK).
    #[arg(long)]
    leaked: bool,
    /// Only flows idle at least this long (350s, 5m, 2h).
    #[arg(long, value_name = "DURATION", value_parser = super::parse_human_duration)]
    idle_over: Option<std::time::Duration>,
    /// Show the values of the agent's last read instead of reading the selected flows from the
    /// kernel first (cheaper on huge selections; each value's age is in --json `sample_age_ms`).
    #[arg(long)]
    cached: bool,
}

pub fn run(socket: &Path, a: Args) -> Result<(), ExitCode> {
    let filter = FlowFilter {
        all: a.all,
        state: a.state,
        port: a.port,
        pid: a.pid,
        at_risk: a.at_risk,
        idle_over_ms: a.idle_over.map(|d| d.as_millis() as u64),
        leaked: a.leaked,
        unit: a.unit,
        netns: a.netns,
        fresh: !a.cached,
    };
    let v: Vec<FlowView> = query(socket, Request::Flows { filter })?;
    if a.json {
        json_out(&v);
    } else {
        // The NETNS column appears when the host has flows in more than one namespace, even if
        // the rows shown are all from one (a port or pid filter).
        let st: Result<crate::ipc::Status, _> = query(socket, Request::Status {});
        let spread = st.is_ok_and(|s| s.netns.iter().filter(|n| n.flows > 0).count() > 1);
        print!("{}", render(&v, spread));
    }
    Ok(())
}

fn keepalive(f: &FlowView) -> String {
    match (f.keepalive, f.timer, f.timer_expires_ms) {
        // A negative time left: the timer fired after the (old) sample; its next expiry is unknown.
        (Some(true), Some(Timer::Keepalive), Some(ms)) if ms >= 0 => format!("on ({})", fmt_ms(ms as u64)),
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

/// The flows table; a NETNS column when the rows span namespaces or `spread` (the host has flows
/// in more than one).
pub fn render(v: &[FlowView], spread: bool) -> String {
    if v.is_empty() {
        return "no flows\n".into();
    }
    let namespaces: std::collections::BTreeSet<Option<&str>> = v.iter().map(|f| f.netns.as_deref()).collect();
    let with_ns = spread || namespaces.len() > 1;
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|f| {
            let mut r = vec![f.state.clone()];
            if with_ns {
                r.push(f.netns.clone().unwrap_or_else(|| "-".into()));
            }
            r.extend([
                f.local.to_string(),
                f.remote.to_string(),
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
            ]);
            r
        })
        .collect();
    let mut header = vec!["STATE"];
    let mut caps = vec![12];
    if with_ns {
        header.push("NETNS");
        caps.push(24);
    }
    header.extend([
        "LOCAL",
        "REMOTE",
        "PID/COMM",
        "UNIT",
        "AGE",
        "IDLE",
        "RETR",
        "KEEPALIVE",
        "ETA",
    ]);
    caps.extend([47, 47, 24, 28, 10, 10, 6, 14, 24]);
    let mut out = table(&header, &rows, &caps);
    out.push_str(&format!("{}\n", super::table::count(v.len(), "flow", "flows")));
    // Values not read at this query (`--cached`, a selection larger than one fresh read, or the
    // agent's limit on fresh reads): say how old they are.
    let stale: Vec<u64> = v
        .iter()
        .filter_map(|f| f.sample_age_ms)
        .filter(|&a| a >= STALE_MS)
        .collect();
    if let Some(oldest) = stale.iter().max() {
        out.push_str(&format!(
            "IDLE and KEEPALIVE of {} read up to {} ago (the agent's last read)\n",
            super::table::count(stale.len(), "flow were", "flows were"),
            fmt_ms(*oldest)
        ));
    }
    out
}

/// Kernel values older than this are called out under the table.
const STALE_MS: u64 = 1000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::eviction::{Forecast, RiskView};

    fn view(netns: Option<&str>) -> FlowView {
        let mut f = crate::model::flow::Flow::new(
            1,
            0,
            "10.77.1.2:40000".parse().unwrap(),
            "10.77.2.2:5432".parse().unwrap(),
            1,
            0,
        );
        f.tcp = Some(crate::model::observe::TcpSample {
            last_data_sent_ms: 9000,
            last_data_recv_ms: 9000,
            last_ack_recv_ms: 9000,
            keepalive: Some(false),
            ..Default::default()
        });
        let mut v = f.view(0, netns.map(String::from));
        v.risk = Some(RiskView {
            profile: "lab-nat".into(),
            timeout_s: 10,
            verdict: Forecast::NearEviction,
            eta_ms: Some(1000),
        });
        v
    }

    #[test]
    fn renders_flows_with_a_forecast_and_a_netns_column_only_when_needed() {
        let out = render(&[view(Some("blue"))], false);
        assert!(out.contains("1s (lab-nat)") && !out.contains("NETNS"), "{out}");
        let out = render(&[view(Some("red")), view(Some("blue"))], false);
        assert!(out.contains("NETNS") && out.contains("blue"), "{out}");
        let out = render(&[view(Some("blue"))], true);
        assert!(out.contains("NETNS") && out.contains("blue"), "{out}");
    }
}
