//! Producers of observations: the ring-buffer pump (a task), the snapshot thread and the /proc
//! scan thread (they block, so they run on their own threads). Each stops when told or when the
//! state owner goes away, and is joined at shutdown.
use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Msg;
use crate::config::policy::Pacing;
use crate::kernel::netns::NsHandle;
use crate::kernel::owners::OwnerResolver;
use crate::kernel::{ebpf, sockdiag};
use crate::model::eviction::{KaRequest, KaResult};
use crate::model::observe::Snapshot;

/// How often the event pump drains the ring buffer (the programs never wake it per record).
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// Periodic snapshots take at most 1/SNAPSHOT_DUTY of wall time (1 %), whatever the interval.
const SNAPSHOT_DUTY: u32 = 100;
/// Snapshots asked for soon (a new flow of unknown owner) take at most 1/SOON_DUTY of wall time.
const SOON_DUTY: u32 = 10;
const MIN_SNAPSHOT_SPACING: Duration = Duration::from_millis(100);
/// After a new flow of unknown owner appears, wait this long (accept() usually follows) and look.
const OWNER_LOOKUP_DELAY: Duration = Duration::from_millis(50);
/// /proc zombie scans take at most 1/PROC_DUTY of wall time (2 %).
const PROC_DUTY: u32 = 50;

pub enum WorkerMsg {
    /// A flow of unknown owner appeared: read soon (its owner comes with the next read).
    Soon,
    /// Apply or read keepalive on live sockets (in the kernel, or through pidfds).
    Keepalive(Vec<KaRequest>),
    /// A reload changed the pacing (or the keepalive-at-connect values).
    Pacing(Pacing),
    Stop,
}

pub enum Source {
    Ebpf(ebpf::Loaded),
    Poll,
}

fn own_ns() -> NsHandle {
    NsHandle {
        id: crate::kernel::netns::own_id(),
        path: "/proc/self/ns/net".into(),
    }
}

impl Source {
    fn keepalive(&mut self, reqs: &[KaRequest]) -> Vec<KaResult> {
        match self {
            Source::Ebpf(l) => match l.apply_keepalive(reqs, &own_ns()) {
                Ok(v) => v,
                Err(e) => reqs
                    .iter()
                    .map(|r| KaResult {
                        cookie: r.cookie,
                        before: None,
                        after: None,
                        error: Some(e.to_string()),
                        via: "bpf iterator",
                    })
                    .collect(),
            },
            Source::Poll => reqs
                .iter()
                .map(crate::remedy::keepalive::pidfd_keepalive)
                .collect(),
        }
    }

    fn snapshot(&mut self, filter_idle_ms: Option<u64>) -> Result<Snapshot, String> {
        let ns = own_ns();
        match self {
            Source::Ebpf(l) => l.snapshot(filter_idle_ms, &ns).map_err(|e| e.to_string()),
            Source::Poll => sockdiag::dump(ns.id).map_err(|e| e.to_string()),
        }
    }
}

pub fn spawn_pump(
    mut events: ebpf::Events,
    tx: mpsc::Sender<Msg>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_counters = Instant::now() - Duration::from_secs(10);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            events.drain_log();
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
            let msg = Msg::Events {
                events: batch,
                procs,
                undecodable,
                counters,
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    })
}

/// The snapshot thread: reads the TCP tables, resolves owners, runs keepalive changes.
pub fn snapshot_worker(
    mut source: Source,
    mut pacing: Pacing,
    rx: std_mpsc::Receiver<WorkerMsg>,
    tx: mpsc::Sender<Msg>,
) {
    let mut resolver = OwnerResolver::default();
    // Owners come from the task_file iterator (eBPF) or /proc walks (poll); no pid hints: in
    // eBPF mode they would cost one message per connect under a storm for nothing.
    let hints: HashMap<u64, u32> = HashMap::new();
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
                            Err(e) => {
                                tracing::warn!("owner iterator failed, walking /proc instead: {e}");
                                resolver.resolve(&snap.socks, &hints, now);
                            }
                        },
                        Source::Ebpf(_) => {}
                        Source::Poll => resolver.resolve(&snap.socks, &hints, now),
                    }
                    let live: HashSet<u64> = snap.socks.iter().map(|s| s.cookie).collect();
                    if full {
                        no_file_seen.retain(|c| live.contains(c));
                        no_file_seen.shrink_to_fit();
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
            Ok(WorkerMsg::Pacing(p)) => {
                if p.connect_values != pacing.connect_values
                    && let Source::Ebpf(l) = &mut source
                    && let Err(e) = l.set_connect_values(p.connect_values)
                {
                    tracing::warn!("updating keepalive-at-connect values failed: {e}");
                }
                pacing = p;
                due = due.min(Instant::now() + pacing.interval);
            }
            Ok(WorkerMsg::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

pub enum ProcMsg {
    Interval(Duration),
    Stop,
}

/// Scans /proc for zombies: the only zombie source in poll mode, a healer of lost events in eBPF
/// mode (and the finder of zombies that predate the agent in both).
pub fn proc_worker(mut interval: Duration, rx: std_mpsc::Receiver<ProcMsg>, tx: mpsc::Sender<Msg>) {
    loop {
        let started = crate::kernel::sys::monotonic_ns();
        let scan = crate::kernel::procfs::scan();
        let finished = crate::kernel::sys::monotonic_ns();
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
        // Never more than 1/PROC_DUTY of the time scanning, however many processes there are.
        let cost = Duration::from_nanos(finished.saturating_sub(started));
        let until = Instant::now() + interval.max(cost * PROC_DUTY);
        loop {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(ProcMsg::Interval(d)) => interval = d,
                Ok(ProcMsg::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
    }
}
