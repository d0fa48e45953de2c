//! Producers of observations: the ring-buffer pump, the snapshot thread, the /proc scan thread.
use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Msg;
use crate::ebpf;
use crate::observe::Snapshot;
use crate::owners::OwnerResolver;

/// How often the event pump drains the ring buffer (the programs never wake it per record).
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// Periodic snapshots take at most 1/SNAPSHOT_DUTY of wall time (1 %), whatever the interval.
const SNAPSHOT_DUTY: u32 = 100;
/// Snapshots asked for soon (a new flow of unknown owner) take at most 1/SOON_DUTY of wall time.
const SOON_DUTY: u32 = 10;
const MIN_SNAPSHOT_SPACING: Duration = Duration::from_millis(100);
/// After a new flow of unknown owner appears, wait this long (accept() usually follows) and look.
const OWNER_LOOKUP_DELAY: Duration = Duration::from_millis(50);

pub enum WorkerMsg {
    Hint {
        cookie: u64,
        pid: u32,
    },
    Soon,
    /// Apply or read keepalive on live sockets (in the kernel, or through pidfds in poll mode).
    Keepalive(Vec<crate::eviction::KaRequest>),
}

pub enum Source {
    Ebpf(ebpf::Loaded),
    Poll,
}

impl Source {
    fn keepalive(&mut self, reqs: &[crate::eviction::KaRequest]) -> Vec<crate::eviction::KaResult> {
        match self {
            Source::Ebpf(l) => match l.apply_keepalive(reqs) {
                Ok(v) => v,
                Err(e) => reqs
                    .iter()
                    .map(|r| crate::eviction::KaResult {
                        cookie: r.cookie,
                        before: None,
                        after: None,
                        error: Some(e.to_string()),
                        via: "bpf iterator",
                    })
                    .collect(),
            },
            Source::Poll => reqs.iter().map(crate::remedy::pidfd_keepalive).collect(),
        }
    }

    fn snapshot(&mut self, filter_idle_ms: Option<u64>) -> Result<Snapshot, String> {
        match self {
            Source::Ebpf(l) => l.snapshot(filter_idle_ms).map_err(|e| e.to_string()),
            Source::Poll => crate::sockdiag::dump().map_err(|e| e.to_string()),
        }
    }
}

pub fn spawn_pump(mut events: ebpf::Events, tx: mpsc::Sender<Msg>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_counters = Instant::now() - Duration::from_secs(10);
        loop {
            tick.tick().await;
            let mut batch = Vec::new();
            let mut procs = Vec::new();
            let undecodable = events.drain(&mut batch) + events.drain_procs(&mut procs);
            let counters = (last_counters.elapsed() >= Duration::from_millis(500)).then(|| {
                last_counters = Instant::now();
                events.counters()
            });
            if batch.is_empty() && procs.is_empty() && undecodable == 0 && counters.is_none() {
                continue;
            }
            if tx
                .send(Msg::Events {
                    events: batch,
                    procs,
                    undecodable,
                    counters,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
}

/// How the snapshot thread paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    /// Between two snapshots (filtered ones in eBPF mode).
    pub interval: Duration,
    /// eBPF mode: a complete snapshot this often heals what events and filtered snapshots missed.
    pub full_every: Duration,
    /// eBPF mode: the kernel leaves out ESTABLISHED sockets active within this many ms.
    pub filter_idle_ms: Option<u64>,
}

pub fn snapshot_worker(
    mut source: Source,
    pacing: Pacing,
    rx: std_mpsc::Receiver<WorkerMsg>,
    tx: mpsc::Sender<Msg>,
) {
    let mut resolver = OwnerResolver::default();
    let mut hints: HashMap<u64, u32> = HashMap::new();
    let mut no_file_seen: HashSet<u64> = HashSet::new();
    let mut due = Instant::now();
    let mut spacing = MIN_SNAPSHOT_SPACING;
    let mut last_start = Instant::now();
    let mut last_full: Option<Instant> = None;
    let ebpf = matches!(source, Source::Ebpf(_));
    loop {
        let now = Instant::now();
        if now >= due {
            last_start = now;
            let full = !ebpf
                || pacing.filter_idle_ms.is_none()
                || last_full.is_none_or(|t| t.elapsed() >= pacing.full_every);
            let msg = match source.snapshot(if full { None } else { pacing.filter_idle_ms }) {
                Ok(snap) => {
                    if full {
                        last_full = Some(now);
                        resolver.prune(&snap.socks);
                    }
                    match &mut source {
                        Source::Ebpf(l) if resolver.missing(&snap.socks) => match l.owners() {
                            Ok(map) => resolver.resolve_from(&snap.socks, &map),
                            Err(e) => tracing::warn!("owner iterator failed, walking /proc instead: {e}"),
                        },
                        Source::Ebpf(_) => {}
                        Source::Poll => resolver.resolve(&snap.socks, &hints, now),
                    }
                    let live: HashSet<u64> = snap.socks.iter().map(|s| s.cookie).collect();
                    if full {
                        hints.retain(|c, _| live.contains(c));
                        no_file_seen.retain(|c| live.contains(c));
                    }
                    // A socket not yet accepted has no file: look again soon, once per socket.
                    let fresh_no_file = snap
                        .socks
                        .iter()
                        .filter(|s| {
                            s.inode == 0 && s.tcp.is_some() && s.state != monitor_common::tcp_state::LISTEN
                        })
                        .filter(|s| no_file_seen.insert(s.cookie))
                        .count();
                    let owners = snap
                        .socks
                        .iter()
                        .filter_map(|s| Some((s.inode, resolver.owner(s.inode)?.clone())))
                        .collect();
                    // Pace by the cost of reading the table; owner walks have their own budget.
                    let cost = Duration::from_nanos(snap.finished.saturating_sub(snap.started));
                    spacing = (cost * SOON_DUTY).max(MIN_SNAPSHOT_SPACING);
                    let periodic = (cost * SNAPSHOT_DUTY).max(pacing.interval);
                    due = Instant::now() + if fresh_no_file > 0 { spacing } else { periodic };
                    Msg::Snapshot {
                        snap,
                        owners,
                        full_walks: resolver.full_walks,
                        targeted_walks: resolver.targeted_walks,
                    }
                }
                Err(e) => {
                    due = Instant::now() + pacing.interval.max(spacing);
                    Msg::SnapshotFailed(e)
                }
            };
            if tx.blocking_send(msg).is_err() {
                return;
            }
        }
        match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Ok(WorkerMsg::Hint { cookie, pid }) => {
                hints.insert(cookie, pid);
            }
            Ok(WorkerMsg::Keepalive(reqs)) => {
                let results = source.keepalive(&reqs);
                if tx.blocking_send(Msg::Keepalive(results)).is_err() {
                    return;
                }
                // Verify soon with a complete snapshot (a filtered one may leave an active flow out).
                last_full = None;
                due = due.min(Instant::now() + OWNER_LOOKUP_DELAY);
            }
            Ok(WorkerMsg::Soon) => {
                let soon = (last_start + spacing).max(Instant::now() + OWNER_LOOKUP_DELAY);
                due = due.min(soon);
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Scans /proc for zombies: the only zombie source in poll mode, a healer of lost events in eBPF
/// mode (and the finder of zombies that predate the agent in both).
pub fn proc_worker(interval: Duration, tx: mpsc::Sender<Msg>) {
    loop {
        let started = crate::sys::monotonic_ns();
        let scan = crate::procs::scan();
        let finished = crate::sys::monotonic_ns();
        if tx
            .blocking_send(Msg::ProcScan {
                scan,
                started,
                finished,
            })
            .is_err()
        {
            return;
        }
        std::thread::sleep(interval);
    }
}
