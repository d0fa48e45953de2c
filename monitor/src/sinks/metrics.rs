//! Prometheus text exposition on a loopback address (off by default). The agent hands a
//! [`MetricsView`] to `render`; the server asks the agent for the text through a channel.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::model::finding::FindingKind;

/// Everything the metrics show, read from the agent's state at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsView {
    pub mode: String,
    /// Tracked flows by (network namespace, state name).
    pub flows: BTreeMap<(String, String), u64>,
    pub findings_active: BTreeMap<FindingKind, u64>,
    /// Remedy outcomes by (kind, action, outcome class).
    pub remedies: BTreeMap<(String, String, String), u64>,
    pub events: u64,
    pub events_lost: u64,
    pub snapshot_seconds: f64,
    pub snapshots: u64,
    pub complete_reads: u64,
    pub snapshot_failures: u64,
    pub ipc_refused: u64,
    pub rss_bytes: u64,
}

/// A label value in the exposition format: backslash, double quote and newline escaped.
pub fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// Renders the metrics in the Prometheus text format (version 0.0.4).
pub fn render(v: &MetricsView) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, x) in samples {
            let _ = writeln!(o, "{name}{labels} {x}");
        }
    };
    let labels = |pairs: &[(&str, &str)]| -> String {
        let inner: Vec<String> = pairs
            .iter()
            .map(|(k, x)| format!("{k}=\"{}\"", escape(x)))
            .collect();
        format!("{{{}}}", inner.join(","))
    };
    metric(
        "holdfast_flows",
        "gauge",
        "Tracked TCP flows by network namespace and state.",
        &v.flows
            .iter()
            .map(|((ns, st), n)| (labels(&[("netns", ns), ("state", st)]), *n as f64))
            .collect::<Vec<_>>(),
    );
    let active: Vec<(String, f64)> = FindingKind::ALL
        .iter()
        .map(|k| {
            (
                labels(&[("kind", k.as_str())]),
                v.findings_active.get(k).copied().unwrap_or(0) as f64,
            )
        })
        .collect();
    metric(
        "holdfast_findings_active",
        "gauge",
        "Active findings by kind.",
        &active,
    );
    metric(
        "holdfast_remedies_total",
        "counter",
        "Remedy outcomes by kind, action and class (planned, pending, ok, failed).",
        &v.remedies
            .iter()
            .map(|((k, a, c), n)| (labels(&[("kind", k), ("action", a), ("outcome", c)]), *n as f64))
            .collect::<Vec<_>>(),
    );
    let one = |x: f64| [(String::new(), x)];
    metric(
        "holdfast_events_total",
        "counter",
        "Kernel events decoded.",
        &one(v.events as f64),
    );
    metric(
        "holdfast_events_lost_total",
        "counter",
        "Kernel events lost (ring buffer full).",
        &one(v.events_lost as f64),
    );
    metric(
        "holdfast_snapshot_seconds",
        "gauge",
        "Duration of the last TCP table read.",
        &one(v.snapshot_seconds),
    );
    metric(
        "holdfast_snapshots_total",
        "counter",
        "TCP table reads.",
        &one(v.snapshots as f64),
    );
    metric(
        "holdfast_complete_reads_total",
        "counter",
        "TCP table reads of every socket (eBPF mode: the others are filtered in the kernel).",
        &one(v.complete_reads as f64),
    );
    metric(
        "holdfast_snapshot_failures_total",
        "counter",
        "TCP table reads that failed.",
        &one(v.snapshot_failures as f64),
    );
    metric(
        "holdfast_ipc_refused_total",
        "counter",
        "CLI connections refused (too many, too slow, not allowed).",
        &one(v.ipc_refused as f64),
    );
    metric(
        "holdfast_mode",
        "gauge",
        "1 for the mode the agent runs in.",
        &[(labels(&[("mode", &v.mode)]), 1.0)],
    );
    metric(
        "holdfast_agent_rss_bytes",
        "gauge",
        "Resident memory of the agent.",
        &one(v.rss_bytes as f64),
    );
    o
}

/// A scrape: the agent answers with the rendered text.
pub type Scrape = mpsc::Sender<oneshot::Sender<String>>;

/// Scrape connections open at most.
const MAX_SCRAPERS: usize = 32;
/// A scraper has this long to send its request; a connection that sends nothing gets nothing.
const REQUEST_WAIT: Duration = Duration::from_secs(1);
/// The answer must be taken within this long.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Where the metrics are served: TCP on loopback, or a unix socket beside the CLI socket (with
/// its group, so that only the read group can scrape).
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Conn for T {}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
            Listener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Serves GET /metrics (any path) with minimal HTTP/1.1, until `stop` fires. Bounded: at most
/// MAX_SCRAPERS connections; when all are taken, the oldest one that has not sent its request
/// yet is closed to make room, so idle connections cannot starve a real scraper; one second to
/// send the request, ten to take the answer.
pub async fn serve(l: Listener, scrape: Scrape, mut stop: tokio::sync::watch::Receiver<bool>) {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    // Connections still waiting for their request, oldest first: (id, what closes it).
    type Waiting = Arc<Mutex<VecDeque<(u64, oneshot::Sender<()>)>>>;
    let waiting: Waiting = Default::default();
    let mut next_id = 0u64;
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            a = l.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok(mut c) = accepted else {
            // EMFILE and friends: back off instead of spinning, and say so once.
            failures += 1;
            if failures == 1 {
                tracing::warn!("accepting a metrics connection failed; backing off");
            }
            tokio::time::sleep(Duration::from_millis(100u64 << failures.min(5))).await;
            continue;
        };
        failures = 0;
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Make room: close the oldest connection that has not asked for anything.
                let oldest = waiting.lock().ok().and_then(|mut w| w.pop_front());
                let Some((_, close)) = oldest else { continue };
                let _ = close.send(());
                match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        next_id += 1;
        let id = next_id;
        let (close_tx, close_rx) = oneshot::channel();
        if let Ok(mut w) = waiting.lock() {
            w.push_back((id, close_tx));
        }
        let scrape = scrape.clone();
        let waiting = waiting.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = [0u8; 2048];
            let asked = tokio::select! {
                r = tokio::time::timeout(REQUEST_WAIT, c.read(&mut buf)) => matches!(r, Ok(Ok(n)) if n > 0),
                _ = close_rx => false,
            };
            if let Ok(mut w) = waiting.lock() {
                w.retain(|(i, _)| *i != id);
            }
            if !asked {
                return;
            }
            let (otx, orx) = oneshot::channel();
            if scrape.send(otx).await.is_err() {
                return;
            }
            let body = orx.await.unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let write = async {
                c.write_all(head.as_bytes()).await?;
                c.write_all(body.as_bytes()).await?;
                c.shutdown().await
            };
            let _ = tokio::time::timeout(ANSWER_WAIT, write).await;
        });
    }
}

/// The agent's resident memory in bytes.
pub fn rss_bytes() -> u64 {
    procfs::process::Process::myself()
        .ok()
        .and_then(|p| p.status().ok())
        .and_then(|s| s.vmrss)
        .unwrap_or(0)
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_escaped_labels_and_every_kind() {
        let mut v = MetricsView {
            mode: "ebpf".into(),
            ..Default::default()
        };
        v.flows.insert(("blue \"ns\"\\x\n".into(), "ESTAB".into()), 3);
        v.findings_active.insert(FindingKind::Zombie, 2);
        v.remedies
            .insert(("zombie".into(), "sigchld".into(), "ok".into()), 1);
        let text = render(&v);
        assert!(
            text.contains("holdfast_flows{netns=\"blue \\\"ns\\\"\\\\x\\n\",state=\"ESTAB\"} 3"),
            "{text}"
        );
        assert!(text.contains("holdfast_findings_active{kind=\"zombie\"} 2"));
        assert!(text.contains("holdfast_findings_active{kind=\"half-open\"} 0"));
        assert!(
            text.contains("holdfast_remedies_total{kind=\"zombie\",action=\"sigchld\",outcome=\"ok\"} 1")
        );
        assert!(text.contains("holdfast_mode{mode=\"ebpf\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("a sample");
            value.parse::<f64>().expect("a number");
        }
        assert!(rss_bytes() > 0);
    }
}
