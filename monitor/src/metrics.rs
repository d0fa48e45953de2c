//! Prometheus text exposition on a loopback address (off by default).
use std::fmt::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::agent::State;
use crate::observe::state_name;

/// Renders the agent's metrics in the Prometheus text format (version 0.0.4).
pub fn render(s: &State) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let mut by_state = std::collections::BTreeMap::new();
    for f in s.table.iter() {
        *by_state.entry(state_name(f.state)).or_insert(0u64) += 1;
    }
    metric(
        "holdfast_flows",
        "gauge",
        "Tracked TCP flows by state.",
        &by_state
            .iter()
            .map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v as f64))
            .collect::<Vec<_>>(),
    );
    let mut by_kind = std::collections::BTreeMap::new();
    for (k, _) in crate::findings::KINDS {
        by_kind.insert(k.to_string(), 0u64);
    }
    for f in s.findings.active() {
        *by_kind.entry(f.kind.clone()).or_insert(0) += 1;
    }
    metric(
        "holdfast_findings_active",
        "gauge",
        "Active findings by kind.",
        &by_kind
            .iter()
            .map(|(k, v)| (format!("{{kind=\"{k}\"}}"), *v as f64))
            .collect::<Vec<_>>(),
    );
    let remedies: Vec<(String, f64)> = s
        .counts
        .iter()
        .filter(|((_, t, _, _), _)| t == "action")
        .map(|((kind, _, action, outcome), v)| {
            (
                format!("{{kind=\"{kind}\",action=\"{action}\",outcome=\"{outcome}\"}}"),
                *v as f64,
            )
        })
        .collect();
    metric(
        "holdfast_remedies_total",
        "counter",
        "Remedy outcomes (planned, ok, failed).",
        &remedies,
    );
    metric(
        "holdfast_events_total",
        "counter",
        "Kernel events decoded.",
        &[(String::new(), s.events as f64)],
    );
    metric(
        "holdfast_events_lost_total",
        "counter",
        "Kernel events lost (ring buffer full).",
        &[(String::new(), (s.kernel.lost + s.kernel.proc_lost) as f64)],
    );
    metric(
        "holdfast_snapshot_seconds",
        "gauge",
        "Duration of the last TCP table read.",
        &[(String::new(), s.last_snapshot.as_secs_f64())],
    );
    metric(
        "holdfast_snapshots_total",
        "counter",
        "TCP table reads.",
        &[(String::new(), s.snapshots as f64)],
    );
    metric(
        "holdfast_mode",
        "gauge",
        "1 for the mode the agent runs in.",
        &[(format!("{{mode=\"{}\"}}", s.mode), 1.0)],
    );
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024;
    metric(
        "holdfast_agent_rss_bytes",
        "gauge",
        "Resident memory of the agent.",
        &[(String::new(), rss as f64)],
    );
    o
}

/// Serves GET /metrics (any path) with minimal HTTP/1.1.
pub async fn serve(l: tokio::net::TcpListener, tx: mpsc::Sender<crate::agent::Msg>) {
    loop {
        let Ok((mut c, _)) = l.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), c.read(&mut buf)).await;
            let (otx, orx) = oneshot::channel();
            if tx.send(crate::agent::Msg::Metrics(otx)).await.is_err() {
                return;
            }
            let body = orx.await.unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(head.as_bytes()).await;
            let _ = c.write_all(body.as_bytes()).await;
        });
    }
}
