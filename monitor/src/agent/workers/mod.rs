//! Producers of observations: the ring-buffer pump (a task), the snapshot thread (`snapshot`)
//! and the /proc scan thread (they block, so they run on their own threads). Each stops when told
//! or when the state owner goes away, and is joined at shutdown.
pub mod snapshot;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub use snapshot::{Source, snapshot_worker};

use super::Msg;
use crate::config::policy::Pacing;
use crate::kernel::ebpf;
use crate::model::eviction::KaRequest;

/// The event pump drains the rings at most this often while records flow (batches: a churn of
/// tens of thousands of connections per second costs 50 wakeups a second, not one per record).
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// A drain that took more events than this was a storm: the next one comes after STORM_DRAIN, not
/// DRAIN_EVERY, so the rings (1 MiB per CPU, about 11k records) do not fill meanwhile: two churn
/// loops on a 2-core VM (29k connections/s each) filled them between 20 ms drains (35-71k of
/// about 5.2M records lost in 20 s, `hostile.rs` memory_comes_back_after_a_storm; 0-2.6k with
/// 5 ms; 1 ms lost more: the pump then competed with the loops for the two cores).
const STORM_EVENTS: usize = 2048;
const STORM_DRAIN: Duration = Duration::from_millis(5);
/// Decoded events per message, at most: 64 KiB of `Event`s, under the 128 KiB above which glibc
/// maps an allocation for itself (`kernel::sys::tune_heap`), so batches reuse heap memory.
const BATCH_EVENTS: usize = (64 << 10) / std::mem::size_of::<crate::model::observe::Event>();
// A cap of 0 would drain nothing and loop.
const _: () = assert!(BATCH_EVENTS > 0);
/// Kernel counters are read at most this often while records flow, and this often when idle.
const COUNTERS_BUSY: Duration = Duration::from_millis(500);
const COUNTERS_IDLE: Duration = Duration::from_secs(5);

/// /proc zombie scans take at most 1/PROC_DUTY of wall time (2 %).
const PROC_DUTY: u32 = 50;

/// What the state owner tells the snapshot thread about filtered reads (eBPF mode). A filtered
/// read reports what the kernel filter lets through: sockets not seen before, sockets not
/// ESTABLISHED, sockets in trouble, and ESTABLISHED ones idle past the threshold. When no socket
/// event arrived since the last read (no open, close, retransmission, reset or error) and no
/// flow left out can have reached the threshold yet, that read would report nothing new: it is
/// skipped (100k sockets cost 64 ms of kernel time per filtered read, `cargo xtask bench`).
#[derive(Default)]
pub struct ReadGate {
    /// Socket events applied (probe events excepted): a read follows any.
    events: AtomicU64,
    /// CLOCK_MONOTONIC ns before which no flow the kernel filter leaves out can reach the
    /// threshold (`FlowTable::calm_until`); 0: unknown, read.
    calm_until: AtomicU64,
    /// Filtered reads skipped because of the two above.
    skipped: AtomicU64,
    /// Records the kernel could not queue (full rings), as last counted: a complete read
    /// follows any rise (it heals what the lost records would have said).
    lost: AtomicU64,
    /// What the state owner spent merging the last round's tables (ns): a round costs its
    /// merge as well as its read, and the reads are paced by both.
    applied: AtomicU64,
    /// How far apart periodic reads are now (ms), for `status`.
    paced_ms: AtomicU64,
}

impl ReadGate {
    pub fn note_events(&self, n: u64) {
        if n > 0 {
            self.events.fetch_add(n, Ordering::Relaxed);
        }
    }
    pub fn set_calm_until(&self, t: Option<u64>) {
        self.calm_until.store(t.unwrap_or(0), Ordering::Relaxed);
    }
    pub fn note_lost(&self, total: u64) {
        self.lost.store(total, Ordering::Relaxed);
    }
    /// The state owner merged one table of a round in `ns` (`first`: the round's first table).
    pub fn note_applied(&self, first: bool, ns: u64) {
        if first {
            self.applied.store(ns, Ordering::Relaxed);
        } else {
            self.applied.fetch_add(ns, Ordering::Relaxed);
        }
    }
    fn set_paced(&self, every: Duration) {
        let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        self.paced_ms.store(ms, Ordering::Relaxed);
    }
    pub fn paced_ms(&self) -> u64 {
        self.paced_ms.load(Ordering::Relaxed)
    }
    fn applied(&self) -> Duration {
        Duration::from_nanos(self.applied.load(Ordering::Relaxed))
    }
    fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
    fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
    /// Whether a filtered read at `now` can be skipped, given the event count at the last read.
    fn may_skip(&self, now: u64, events_at_read: u64) -> bool {
        let skip = self.events() == events_at_read && now < self.calm_until.load(Ordering::Relaxed);
        if skip {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        skip
    }
}

/// Pid hints carried by one `WorkerMsg::Soon`.
pub const MAX_SOON_HINTS: usize = 4096;

pub enum WorkerMsg {
    /// A flow of unknown owner appeared: read soon (its owner comes with the next read). With
    /// the pid seen at connect() or listen() of such flows, by cookie (at most `MAX_SOON_HINTS`
    /// per message), the likely owners to look at first.
    Soon(Vec<(u64, u32)>),
    /// eBPF mode: flows that appeared with no owner known, by tuple and cookie (at most
    /// `MAX_OWNER_PENDING` of the state owner): read exactly (sock_diag), their likely owners
    /// looked at (`hints`: cookie -> pid seen at connect()/listen()); what that does not find,
    /// and `read` (a flow whose tuple is not complete yet), is left to a read soon.
    Owners {
        ids: Vec<(crate::model::observe::NetnsId, crate::kernel::sockdiag::SockId)>,
        hints: Vec<(u64, u32)>,
        read: bool,
    },
    /// Sockets whose flows a complete read left with no owner (`FlowTable::take_unowned`): the
    /// snapshot thread looks their owners up again (it hands each owner out once).
    Unowned(Vec<u64>),
    /// An event came from a namespace the agent does not know yet: look for namespaces now.
    Discover,
    /// Apply or read keepalive on live sockets (in the kernel, or through pidfds).
    Keepalive(Vec<KaRequest>),
    /// A reload changed the pacing (or the keepalive-at-connect values).
    Pacing(Pacing),
    /// eBPF mode: a socket died while a process still held it: look for dead descriptors soon.
    HeldSoon,
    /// Poll mode: the processes whose descriptors to dead sockets are looked for (ledger
    /// services, processes with leak findings or closes).
    HeldPids(Vec<u32>),
    /// eBPF mode: watch the keepalive probes of these sockets and stop watching those
    /// ((cookie, namespace) each).
    Watch(crate::track::watch::Plan),
    /// Read exactly these sockets (fresh values for a query) and answer with `Msg::Fresh`.
    Fresh {
        ids: Vec<(crate::model::observe::NetnsId, crate::kernel::sockdiag::SockId)>,
        reply: tokio::sync::oneshot::Sender<super::FreshRead>,
    },
    Stop,
}

pub fn spawn_pump(
    mut events: ebpf::Events,
    tx: mpsc::Sender<Msg>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Woken by the kernel when a record lands in a drained ring; an idle agent does not poll.
        // Without readiness (registration failed, or HOLDFAST_RING_WAIT=off where waiting on
        // the rings misbehaves) it polls every DRAIN_EVERY.
        let wait = std::env::var("HOLDFAST_RING_WAIT");
        let ready = match (wait.as_deref(), events.readiness()) {
            (Ok("off"), _) => {
                tracing::warn!("HOLDFAST_RING_WAIT=off: draining the event rings every 20 ms");
                None
            }
            (_, Err(e)) => {
                tracing::warn!("waiting on the event rings failed ({e}): draining them every 20 ms instead");
                None
            }
            (w, Ok([a, b])) => {
                match w {
                    Ok("on") | Err(std::env::VarError::NotPresent) => {}
                    Ok(v) => tracing::warn!(
                        "HOLDFAST_RING_WAIT={v:?} is neither \"on\" nor \"off\": waiting on the rings (the default)"
                    ),
                    Err(std::env::VarError::NotUnicode(v)) => tracing::warn!(
                        "HOLDFAST_RING_WAIT={v:?} is not text, let alone \"on\" or \"off\": waiting on the rings (the default)"
                    ),
                }
                Some((a, b))
            }
        };
        let mut last_counters = Instant::now() - COUNTERS_IDLE;
        let mut busy = true;
        loop {
            let counters_in =
                if busy { COUNTERS_BUSY } else { COUNTERS_IDLE }.saturating_sub(last_counters.elapsed());
            match &ready {
                Some((a, b)) => {
                    tokio::select! {
                        r = a.readable() => if let Ok(mut g) = r { g.clear_ready() },
                        r = b.readable() => if let Ok(mut g) = r { g.clear_ready() },
                        _ = tokio::time::sleep(counters_in) => {}
                        _ = stop.changed() => return,
                    }
                }
                None => tokio::select! {
                    _ = tokio::time::sleep(DRAIN_EVERY) => {}
                    _ = stop.changed() => return,
                },
            }
            // Readiness was cleared before the drain: a record landing after it wakes us again.
            events.drain_log();
            let mut procs = Vec::new();
            let mut undecodable = events.drain_procs(&mut procs);
            let mut batch = Vec::new();
            let mut drained = 0usize;
            busy = !procs.is_empty();
            // Batches are capped below glibc's mmap threshold: a whole 20 ms of a storm in one
            // vector (about 0.7 MB at 28k connections/s) was mapped, faulted in page by page and
            // unmapped for every drain, about a tenth of the agent's CPU under two churn loops
            // (`perf`: clear_page, page faults, unmap in the pump and state owner threads).
            loop {
                let (bad, full) = events.drain(&mut batch, BATCH_EVENTS);
                undecodable += bad;
                busy |= !batch.is_empty();
                if !full {
                    break;
                }
                drained += batch.len();
                let part = Msg::Events {
                    events: std::mem::replace(&mut batch, Vec::with_capacity(BATCH_EVENTS)),
                    procs: Vec::new(),
                    undecodable: 0,
                    counters: None,
                };
                if tx.send(part).await.is_err() {
                    return;
                }
            }
            let counters = (last_counters.elapsed() >= if busy { COUNTERS_BUSY } else { COUNTERS_IDLE })
                .then(|| {
                    last_counters = Instant::now();
                    events.counters()
                });
            drained += batch.len();
            if busy || undecodable > 0 || counters.is_some() {
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
            // Batch what comes next (the kernel queues it meanwhile).
            if busy && ready.is_some() {
                let next = if drained > STORM_EVENTS {
                    STORM_DRAIN
                } else {
                    DRAIN_EVERY
                };
                tokio::select! {
                    _ = tokio::time::sleep(next) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    })
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
