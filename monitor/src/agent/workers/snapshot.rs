//! The snapshot thread: finds the network namespaces, reads each one's TCP table (the tcp iterator
//! or sock_diag, created inside the namespace by entering it for a moment), resolves owners across
//! all of them, reads each namespace's sysctls, and runs keepalive changes in the right namespace.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{ReadGate, WorkerMsg};
use crate::agent::{FreshRead, Msg};
use crate::config::policy::Pacing;
use crate::kernel::netns::discover::{Discovery, Found};
use crate::kernel::netns::{self, NsHandle, SockstatFiles, TcpCounts};
use crate::kernel::owners::{OwnerResolver, PidHints, Recent, proc_sockets};
use crate::kernel::sockdiag::SockId;
use crate::kernel::{ebpf, tables};
use crate::model::eviction::{KaRequest, KaResult, NetFacts};
use crate::model::observe::{NetnsId, Snapshot};

/// The iterator's own early sample of new flows (eBPF mode) takes at most 1/SAMPLE_DUTY of the
/// time. Periodic reads are paced by `Pacing::read_duty` (`config::policy::POLL_DUTY`).
const SAMPLE_DUTY: u32 = 100;
/// A socket with no file that may still get one: in an accept queue (ESTABLISHED, or
/// CLOSE_WAIT when the peer closed first; SYN_RECV and NEW_SYN_RECV are the handshake). A
/// socket its program closed (FIN_WAIT1/2, CLOSING, LAST_ACK, TIME_WAIT) has no file for good:
/// looking again finds no owner, yet under a connection storm every read found such orphans
/// and asked for another read (see `SoonBackoff`).
fn awaits_accept(s: &crate::model::observe::SockSample) -> bool {
    use monitor_common::tcp_state::{CLOSE_WAIT, ESTABLISHED, NEW_SYN_RECV, SYN_RECV};
    s.inode == 0 && matches!(s.state, ESTABLISHED | SYN_RECV | NEW_SYN_RECV | CLOSE_WAIT)
}

/// Snapshots asked for soon (a new flow of unknown owner) take at most 1/SOON_DUTY of wall time.
const SOON_DUTY: u32 = 10;
const MIN_SNAPSHOT_SPACING: Duration = Duration::from_millis(100);
/// After a new flow of unknown owner appears, wait this long (accept() usually follows) and look.
const OWNER_LOOKUP_DELAY: Duration = Duration::from_millis(50);
/// eBPF mode: how often namespaces are looked for at most (sooner when an event names an unknown
/// one, and every snapshot interval when that is shorter). Poll mode: every snapshot interval.
const DISCOVER_EVERY: Duration = Duration::from_secs(5);
/// Discoveries at most this often (one is a /proc listing plus a stat per new process).
const DISCOVER_SPACING: Duration = Duration::from_millis(500);

/// How often namespaces are looked for: a namespace created after the agent started is read
/// within one snapshot interval (eBPF mode: sooner, on its first socket event).
fn discover_every(pacing: &Pacing, ebpf: bool) -> Duration {
    let every = if ebpf {
        pacing.interval.min(DISCOVER_EVERY)
    } else {
        pacing.interval
    };
    every.max(DISCOVER_SPACING)
}
/// After a socket died under its program (eBPF), look for held descriptors this much later (a
/// program that notices closes it within this time and is not reported).
const HELD_AFTER_DEATH: Duration = Duration::from_secs(1);
/// While dead descriptors are known, look again this often (releases, growth).
const HELD_WATCH: Duration = Duration::from_secs(10);
/// The held-descriptor walk runs at most 1/this of the time while dead descriptors are known.
const HELD_DUTY_INVERSE: u32 = 100;
/// eBPF mode: what only heals (the complete read, the held-descriptor walk while none is known)
/// takes at most 1/this of the time each: at least `full_interval` apart, and further apart when
/// one costs more than 0.1 % of a core (a complete round, its merge counted: at 200k sockets the
/// read alone takes about 0.2 s, so one every several minutes; 1M sockets, over 20 min). Events and filtered reads see everything else as it happens; a lost event
/// brings the next complete read forward.
const HEAL_DUTY_INVERSE: u32 = 1000;

/// How long after a complete read the next one comes (eBPF mode), given what it cost.
fn heal_every(full_every: Duration, full_cost: Duration) -> Duration {
    full_every.max(full_cost * HEAL_DUTY_INVERSE)
}
/// Poll mode: how often the watched processes' descriptors are looked at.
const HELD_POLL_EVERY: Duration = Duration::from_secs(5);
/// Pid hints kept at most (a connection storm), and sockets remembered as not yet accepted.
const MAX_HINTS: usize = 65_536;
/// Pid hints and sockets not yet accepted are kept one to two of this (or of the periodic
/// interval, if longer): the reads asked for them come sooner.
const HINT_AGE: Duration = Duration::from_secs(10);
/// Fresh reads for queries take at most 1/FRESH_DUTY of the time (10 %).
const FRESH_DUTY: u32 = 10;
/// How often each namespace's sysctls are read.
const FACTS_EVERY: Duration = Duration::from_secs(10);

/// The share of the snapshot thread's time that queries' fresh reads may take: after a read
/// that took `cost`, the next waits `cost * (duty - 1)`, however often clients ask (any local
/// client may); until then the last read's values answer.
struct FreshBudget {
    free_at: Instant,
    cost: Duration,
}

impl FreshBudget {
    fn new(now: Instant) -> Self {
        FreshBudget {
            free_at: now,
            cost: Duration::ZERO,
        }
    }

    /// Why a read asked for `now` is refused, if it is.
    fn refusal(&self, now: Instant) -> Option<String> {
        (now < self.free_at).then(|| {
            format!(
                "fresh reads are limited to 1/{FRESH_DUTY} of the agent's time (the last one took {} ms)",
                self.cost.as_millis()
            )
        })
    }

    /// A read that took `cost` ended at `now`.
    fn spent(&mut self, cost: Duration, now: Instant) {
        self.cost = cost;
        self.free_at = now + cost * (FRESH_DUTY - 1);
    }
}

/// Reads asked for soon, back to back: a storm of new connections. Under one every read finds
/// new flows of unknown owner (or not yet accepted) and asks for the next, and each read of a
/// table full of TIME_WAIT sockets walks the whole hash table: two churn loops on 2 cores made
/// 35 reads and 25 walks of every socket file in 8 s, 5.7 % of a core, most of it for flows
/// gone microseconds later. Each read asked soon within twice `calm` of the last doubles the
/// spacing of the next, up to `calm` (the periodic interval); twice `calm` quiet starts over.
/// A session opened in a storm gets its owner within one periodic interval, as the periodic
/// read finds it.
#[derive(Default)]
struct SoonBackoff {
    last: Option<Instant>,
    streak: u32,
}

impl SoonBackoff {
    /// A read asked for soon started at `now`. Within twice `calm` of the last is still the
    /// storm (at the cap, reads come `calm` apart plus their own time).
    fn read(&mut self, now: Instant, calm: Duration) {
        let close = self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) <= calm.saturating_mul(2));
        self.streak = if close { (self.streak + 1).min(16) } else { 0 };
        self.last = Some(now);
    }

    /// How far after the last read the next read asked for soon may come, at `now`: the
    /// storm is over once no read was asked for in twice `calm`.
    fn spacing(&self, now: Instant, spacing: Duration, calm: Duration) -> Duration {
        let storm = self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) <= calm.saturating_mul(2));
        if !storm || self.streak == 0 {
            return spacing;
        }
        spacing
            .saturating_mul(1 << self.streak.min(16))
            .min(calm.max(spacing))
    }
}

/// A namespace as the snapshot thread keeps it.
#[derive(Clone, Debug)]
pub struct NsEntry {
    pub found: Found,
    pub facts: NetFacts,
    facts_at: Option<Instant>,
    /// The last error reading it (reported once per streak).
    pub error: Option<String>,
}

pub enum Source {
    // Boxed: the loaded programs are far larger than the other variant.
    Ebpf(Box<ebpf::Loaded>),
    Poll,
}

impl Source {
    /// Keepalive changes, each in its socket's namespace (the bpf iterator) or through a pidfd
    /// (which reaches every namespace without entering it).
    fn keepalive(&mut self, reqs: &[KaRequest], spaces: &[NsEntry]) -> Vec<KaResult> {
        match self {
            Source::Poll => reqs
                .iter()
                .map(crate::remedy::keepalive::pidfd_keepalive)
                .collect(),
            Source::Ebpf(l) => {
                let mut by_ns: HashMap<NetnsId, Vec<KaRequest>> = HashMap::new();
                for r in reqs {
                    by_ns.entry(r.netns).or_default().push(r.clone());
                }
                let mut out = Vec::new();
                for (ns, reqs) in by_ns {
                    let handle = handle_of(spaces, ns);
                    match handle.map(|h| l.apply_keepalive(&reqs, &h)) {
                        Some(Ok(v)) => out.extend(v),
                        // Not enterable (gone, or no CAP_SYS_ADMIN): the owner's pidfd still works.
                        Some(Err(_)) | None => {
                            out.extend(reqs.iter().map(crate::remedy::keepalive::pidfd_keepalive))
                        }
                    }
                }
                out
            }
        }
    }

    /// Sets and clears the probe-watch flag, each socket in its namespace.
    fn watch(
        &mut self,
        plan: &crate::track::watch::Plan,
        spaces: &[NsEntry],
    ) -> Vec<crate::track::watch::WatchOutcome> {
        let Source::Ebpf(l) = self else {
            return Vec::new();
        };
        let on = ebpf::watch::by_netns(&plan.0);
        let off = ebpf::watch::by_netns(&plan.1);
        let spaces_touched: HashSet<NetnsId> = on.keys().chain(off.keys()).copied().collect();
        let mut out = Vec::new();
        for ns in spaces_touched {
            let on = on.get(&ns).cloned().unwrap_or_default();
            let off = off.get(&ns).cloned().unwrap_or_default();
            let res = match handle_of(spaces, ns) {
                Some(h) => l.select(&on, &off, &h).map_err(|e| e.to_string()),
                None => Err("the socket's namespace is gone".into()),
            };
            out.push(match res {
                Ok(r) => r,
                Err(e) => {
                    // The sockets went with their namespace: nothing is left flagged.
                    l.forget_watched(&off);
                    crate::track::watch::WatchOutcome {
                        netns: ns,
                        released: off,
                        failed: on.into_iter().map(|c| (c, format!("gone: {e}"))).collect(),
                        ..Default::default()
                    }
                }
            });
        }
        // Sockets that closed left the kernel map by themselves: detach what only they needed.
        l.forget_watched(&[]);
        out
    }

    /// Exactly the sockets `ids`, each in its namespace (see `kernel::tables::read_of`).
    fn fresh(&mut self, ids: &[(NetnsId, SockId)], spaces: &[NsEntry]) -> (Vec<Snapshot>, FreshRead) {
        let mut by_ns: HashMap<NetnsId, Vec<SockId>> = HashMap::new();
        for (ns, id) in ids {
            by_ns.entry(*ns).or_default().push(*id);
        }
        let mut out = FreshRead::default();
        let mut snaps = Vec::with_capacity(by_ns.len());
        for (ns, ids) in by_ns {
            let Some(h) = handle_of(spaces, ns) else {
                continue;
            };
            let loaded = match self {
                Source::Ebpf(l) => Some(&mut **l),
                Source::Poll => None,
            };
            match tables::read_of(loaded, &ids, &h) {
                Ok(s) => {
                    out.found += s.socks.len();
                    snaps.push(s);
                }
                Err(e) => out.not_read = Some(format!("reading namespace {ns}: {e}")),
            }
        }
        (snaps, out)
    }

    /// One namespace's table (see `kernel::tables::read`).
    fn snapshot(
        &mut self,
        filter_idle_ms: Option<u64>,
        ns: &NsHandle,
        counts: Option<TcpCounts>,
    ) -> Result<Snapshot, String> {
        match self {
            Source::Ebpf(l) => tables::read(Some(l), filter_idle_ms, ns, counts),
            Source::Poll => tables::read(None, filter_idle_ms, ns, counts),
        }
    }
}

fn own_handle() -> NsHandle {
    NsHandle {
        id: netns::own_id(),
        path: "/proc/self/ns/net".into(),
    }
}

/// The handle of namespace `ns` (0 or the agent's own: the agent's).
fn handle_of(spaces: &[NsEntry], ns: NetnsId) -> Option<NsHandle> {
    if ns == 0 || ns == netns::own_id() {
        return Some(own_handle());
    }
    spaces
        .iter()
        .find(|e| e.found.handle.id == ns)
        .map(|e| e.found.handle.clone())
}

/// Which namespaces are watched: every one when the configuration asks and the agent may enter
/// them (setns needs CAP_SYS_ADMIN), else the agent's own.
struct Scope {
    all: bool,
    words: String,
    /// Not yet reported.
    changed: bool,
}

impl Scope {
    fn new(want_all: bool, can_enter: &Result<(), String>) -> Self {
        let (all, words) = match (want_all, can_enter) {
            (true, Ok(())) => (true, "every network namespace on the host".to_string()),
            (true, Err(why)) => (false, format!("only the agent's own: {why}")),
            (false, _) => (false, "only the agent's own (namespaces = \"own\")".to_string()),
        };
        Scope {
            all,
            words,
            changed: true,
        }
    }
}

/// Finds namespaces and reports what changed (names, facts, errors, new and gone ones). Returns
/// whether a new one was found, or None when the agent is shutting down.
fn rediscover(
    discovery: &mut Discovery,
    scope: &Scope,
    spaces: &mut Vec<NsEntry>,
    tx: &mpsc::Sender<Msg>,
) -> Option<bool> {
    let found = if scope.all {
        discovery.run(netns::own_id())
    } else {
        vec![Found {
            handle: own_handle(),
            name: netns::name_of(netns::own_id()),
        }]
    };
    let before: Vec<(Found, NetFacts, Option<String>)> = spaces
        .iter()
        .map(|e| (e.found.clone(), e.facts, e.error.clone()))
        .collect();
    let now_ids: HashSet<NetnsId> = found.iter().map(|f| f.handle.id).collect();
    let gone: Vec<NetnsId> = spaces
        .iter()
        .map(|e| e.found.handle.id)
        .filter(|id| !now_ids.contains(id))
        .collect();
    let mut next = Vec::with_capacity(found.len());
    let mut new = false;
    for f in found {
        match spaces.iter().position(|e| e.found.handle.id == f.handle.id) {
            Some(i) => {
                let mut e = spaces.swap_remove(i);
                e.found = f;
                next.push(e);
            }
            None => {
                new = true;
                next.push(NsEntry {
                    found: f,
                    facts: NetFacts::default(),
                    facts_at: None,
                    error: None,
                })
            }
        }
    }
    *spaces = next;
    refresh_facts(spaces);
    let after: Vec<(Found, NetFacts, Option<String>)> = spaces
        .iter()
        .map(|e| (e.found.clone(), e.facts, e.error.clone()))
        .collect();
    if before == after && gone.is_empty() && !scope.changed {
        return Some(false);
    }
    tx.blocking_send(Msg::Namespaces {
        scope: scope.words.clone(),
        spaces: spaces.clone(),
        gone,
    })
    .ok()
    .map(|_| new)
}

/// Reads the sysctls of namespaces whose facts are old, each inside its namespace.
fn refresh_facts(spaces: &mut [NsEntry]) {
    for e in spaces.iter_mut() {
        if e.facts_at.is_some_and(|t| t.elapsed() < FACTS_EVERY) {
            continue;
        }
        match e.found.handle.within(netns::read_facts) {
            Ok(f) => {
                e.facts = f;
                e.facts_at = Some(Instant::now());
            }
            Err(err) => e.error = Some(err.to_string()),
        }
    }
}

/// A read for the state owner, with the owners found since the last of its sockets (the state
/// owner keeps each on its flow).
fn snapshot_msg(snap: Snapshot, resolver: &mut OwnerResolver, first_of_round: bool) -> Msg {
    let owners = resolver.take_found(&snap.socks);
    Msg::Snapshot {
        snap,
        owners,
        full_walks: resolver.full_walks,
        targeted_walks: resolver.targeted_walks,
        first_of_round,
    }
}

/// The snapshot thread: reads the TCP tables, resolves owners, runs keepalive changes.
pub fn snapshot_worker(
    mut source: Source,
    mut pacing: Pacing,
    gate: std::sync::Arc<ReadGate>,
    rx: std_mpsc::Receiver<WorkerMsg>,
    tx: mpsc::Sender<Msg>,
) {
    let mut resolver = OwnerResolver::default();
    // The pid seen at connect()/listen() of flows of unknown owner (eBPF mode; by cookie), to
    // look at first, and the sockets seen not yet accepted. Bounded; what no read used within
    // `HINT_AGE` (or the periodic interval, if longer) to twice that is dropped, and at each
    // complete read what is not live.
    let mut hints = PidHints::new(MAX_HINTS, Instant::now());
    let mut no_file_seen: Recent<()> = Recent::new(MAX_HINTS, Instant::now());
    let mut due = Instant::now();
    let mut spacing = MIN_SNAPSHOT_SPACING;
    let mut soon_reads = SoonBackoff::default();
    // What the last read of every table cost.
    let mut last_cost = Duration::ZERO;
    let mut last_start = Instant::now();
    let mut last_full: Option<Instant> = None;
    // What the last complete read cost (every namespace), and the lost records counted then.
    let mut full_cost = Duration::ZERO;
    let mut lost_at_full = gate.lost();
    let mut discovery = Discovery::default();
    let probe = crate::kernel::probes::setns();
    let can_enter = if probe.available {
        Ok(())
    } else {
        Err(probe.detail)
    };
    let mut scope = Scope::new(pacing.all_netns, &can_enter);
    let mut spaces: Vec<NsEntry> = Vec::new();
    let mut counters: HashMap<NetnsId, SockstatFiles> = HashMap::new();
    // Namespaces whose last table sent was empty: another empty one changes nothing and is not
    // sent (50 idle namespaces cost no messages), except in complete rounds.
    let mut quiet: HashSet<NetnsId> = HashSet::new();
    let mut last_heal: Option<Instant> = None;
    // Descriptors held to dead sockets.
    let mut held_probe = crate::kernel::held::HeldProbe::default();
    let mut held_pids: Vec<u32> = Vec::new();
    let mut held_due: Option<Instant> = Some(Instant::now() + HELD_AFTER_DEATH);
    let mut live_inodes = crate::kernel::held::LiveInodes::default();
    let mut discovered: Option<Instant> = None;
    let mut discover_asked = false;
    let ebpf = matches!(source, Source::Ebpf(_));
    // Socket events counted at the last read, and whether the next read was asked for (a new
    // namespace, a flow of unknown owner, a reload): such a read is never skipped.
    let mut events_at_read = gate.events();
    let mut asked = true;
    let mut fresh_budget = FreshBudget::new(Instant::now());
    // Exact reads of new flows for their owners: at most a tenth of the time too (a storm of
    // new sessions is found by reads instead).
    let mut owners_budget = FreshBudget::new(Instant::now());
    if let Source::Ebpf(l) = &mut source {
        l.seen_mark_ms = pacing.filter_idle_ms;
    }
    loop {
        let now = Instant::now();
        let hint_age = HINT_AGE.max(pacing.interval);
        hints.age(now, hint_age);
        no_file_seen.age(now, hint_age);
        let discover_due = discovered.is_none_or(|t| {
            t.elapsed() >= discover_every(&pacing, ebpf)
                || (discover_asked && t.elapsed() >= DISCOVER_SPACING)
        });
        if discover_due {
            discover_asked = false;
            discovered = Some(now);
            let found = rediscover(&mut discovery, &scope, &mut spaces, &tx);
            scope.changed = false;
            // The open sockstat files keep their namespace alive: close those of namespaces gone.
            counters.retain(|id, _| spaces.iter().any(|e| e.found.handle.id == *id));
            quiet.retain(|id| spaces.iter().any(|e| e.found.handle.id == *id));
            match found {
                None => return,
                // A namespace found now is read at once.
                Some(true) => {
                    due = due.min(now);
                    asked = true;
                }
                Some(false) => {}
            }
        }
        let heal_every = heal_every(pacing.full_every, full_cost);
        let full = !ebpf
            || pacing.filter_idle_ms.is_none()
            || last_full.is_none_or(|t| t.elapsed() >= heal_every)
            || gate.lost() != lost_at_full;
        if now >= due && !full && !asked && gate.may_skip(crate::kernel::sys::monotonic_ns(), events_at_read)
        {
            // Nothing a filtered read would report has happened: look again in an interval.
            due = now + pacing.interval;
        } else if now >= due {
            let round_start = Instant::now();
            last_start = now;
            if asked {
                soon_reads.read(now, pacing.interval);
            }
            asked = false;
            events_at_read = gate.events();
            let lost_now = gate.lost();
            let filter = if full { None } else { pacing.filter_idle_ms };
            // Every heal interval, empty tables are sent too (heals a flow a lost event left).
            let heal = last_heal.is_none_or(|t| t.elapsed() >= heal_every);
            if heal {
                last_heal = Some(now);
            }
            let mut snaps = Vec::with_capacity(spaces.len());
            let mut cost = Duration::ZERO;
            let mut errors_changed = false;
            for e in spaces.iter_mut() {
                // Socket counts through the namespace's open sockstat files (opened once).
                let id = e.found.handle.id;
                if !counters.contains_key(&id)
                    && let Ok(f) = SockstatFiles::open(&e.found.handle)
                {
                    counters.insert(id, f);
                }
                let counts = counters.get(&id).and_then(SockstatFiles::read);
                match source.snapshot(filter, &e.found.handle, counts) {
                    Ok(s) => {
                        cost += Duration::from_nanos(s.finished.saturating_sub(s.started));
                        if e.error.take().is_some() {
                            errors_changed = true;
                        }
                        if !s.socks.is_empty() {
                            quiet.remove(&id);
                            snaps.push(s);
                        } else if quiet.insert(id) || heal {
                            snaps.push(s);
                        }
                    }
                    Err(err) => {
                        if e.error.as_ref() != Some(&err) {
                            errors_changed = true;
                            let _ = tx.blocking_send(Msg::SnapshotFailed {
                                netns: Some(e.found.handle.id),
                                error: format!("{}: {err}", e.found.name),
                            });
                        }
                        e.error = Some(err);
                    }
                }
            }
            if errors_changed
                && tx
                    .blocking_send(Msg::Namespaces {
                        scope: scope.words.clone(),
                        spaces: spaces.clone(),
                        gone: vec![],
                    })
                    .is_err()
            {
                return;
            }
            let all_socks: Vec<&crate::model::observe::SockSample> =
                snaps.iter().flat_map(|s| s.socks.iter()).collect();
            if full && !ebpf {
                live_inodes =
                    crate::kernel::held::LiveInodes::new(all_socks.iter().map(|s| s.inode), all_socks.len());
            }
            if full && !snaps.is_empty() {
                last_full = Some(now);
                resolver.prune(&all_socks);
            }
            if full {
                lost_at_full = lost_now;
            }
            let walks_before = resolver.full_walks;
            let resolve_start = Instant::now();
            match &mut source {
                // The likely owners first (one process's descriptors); the walk of every socket
                // file on the host only for what they do not hold.
                Source::Ebpf(l) => {
                    if resolver.resolve_likely(&all_socks, &hints, &mut |pid| l.sockets_of_or_proc(pid)) {
                        match l.owners() {
                            Ok(map) => resolver.resolve_from(&all_socks, &map),
                            Err(e) => {
                                tracing::warn!("owner iterator failed, walking /proc instead: {e}");
                                resolver.resolve(&all_socks, &hints, now);
                            }
                        }
                    }
                }
                Source::Poll => resolver.resolve(&all_socks, &hints, now),
            }
            // A walk of every process's descriptors has its own budget (`OwnerResolver`).
            let walked = if resolver.full_walks != walks_before {
                resolve_start.elapsed()
            } else {
                Duration::ZERO
            };
            if full {
                let live: HashSet<u64> = all_socks.iter().map(|s| s.cookie).collect();
                no_file_seen.retain(|c| live.contains(&c));
                hints.clear();
            }
            // A socket not yet accepted has no file: look again soon, once per socket.
            let fresh_no_file = all_socks
                .iter()
                .filter(|s| s.tcp.is_some() && awaits_accept(s))
                .filter(|s| no_file_seen.insert(s.cookie, ()))
                .count();
            let sent = !snaps.is_empty();
            for (i, snap) in snaps.into_iter().enumerate() {
                if tx
                    .blocking_send(snapshot_msg(snap, &mut resolver, i == 0))
                    .is_err()
                {
                    return;
                }
            }
            resolver.drop_untaken();
            // Periodic reads are paced by what a round costs: reading every table, the owners'
            // bookkeeping and the messages here, and the state owner's merge of the last round
            // (poll mode at 200k sockets: the merge and the bookkeeping cost about half as much
            // again as the read, `perf`). Owner walks have their own budget. Reads asked for soon
            // (a flow of unknown owner) are paced by the read alone.
            let round = round_start.elapsed().saturating_sub(walked) + gate.applied();
            if full && sent && ebpf {
                full_cost = round;
            }
            last_cost = round;
            spacing = (cost * SOON_DUTY).max(MIN_SNAPSHOT_SPACING);
            let periodic = (round * pacing.read_duty).max(pacing.interval);
            gate.set_paced(periodic);
            let soon = soon_reads.spacing(Instant::now(), spacing, pacing.interval);
            due = Instant::now() + if fresh_no_file > 0 { soon } else { periodic };
            asked |= fresh_no_file > 0;
            if !sent {
                due = Instant::now() + pacing.interval.max(spacing);
            }
        }
        if held_due.is_some_and(|t| Instant::now() >= t) {
            let walk_started = Instant::now();
            let (found, scope) = match &mut source {
                Source::Ebpf(l) => {
                    let mut dead = Vec::new();
                    match l.each_socket_file(|f| dead.extend(crate::kernel::decode::dead_fd(&f))) {
                        Ok(()) => (dead, Some(crate::track::held::HeldScope::Host)),
                        Err(e) => {
                            tracing::warn!("the socket-file iterator failed: {e}");
                            (Vec::new(), None)
                        }
                    }
                }
                Source::Poll => (
                    held_probe.check(&held_pids, &live_inodes),
                    Some(crate::track::held::HeldScope::Pids(held_pids.clone())),
                ),
            };
            let held_known = !found.is_empty();
            let owners: std::collections::HashMap<u32, std::sync::Arc<crate::model::observe::Owner>> = found
                .iter()
                .map(|d| d.pid)
                .collect::<HashSet<u32>>()
                .into_iter()
                .filter_map(|p| Some((p, std::sync::Arc::new(crate::kernel::procfs::describe(p)?))))
                .collect();
            if let Some(scope) = scope
                && tx.blocking_send(Msg::Held { found, scope, owners }).is_err()
            {
                return;
            }
            // A walk of every socket file costs about 0.13 s at 200k sockets (cargo xtask bench):
            // at most 1 % of the time goes to it while dead descriptors are known, however many,
            // and 0.1 % while it only heals (a death under a program asks for it at once).
            let duty = walk_started.elapsed() * HELD_DUTY_INVERSE;
            held_due = Some(
                Instant::now()
                    + if !ebpf {
                        HELD_POLL_EVERY.max(duty)
                    } else if held_known {
                        HELD_WATCH.max(duty)
                    } else {
                        pacing.full_every.max(walk_started.elapsed() * HEAL_DUTY_INVERSE)
                    },
            );
        }
        let next_discovery = discovered.map_or(Duration::ZERO, |t| {
            let every = if discover_asked {
                DISCOVER_SPACING
            } else {
                discover_every(&pacing, ebpf)
            };
            every.saturating_sub(t.elapsed())
        });
        let next_held = held_due.map_or(Duration::MAX, |t| t.saturating_duration_since(Instant::now()));
        let wait = due
            .saturating_duration_since(Instant::now())
            .min(next_discovery)
            .min(next_held);
        match rx.recv_timeout(wait) {
            Ok(WorkerMsg::Keepalive(reqs)) => {
                let results = source.keepalive(&reqs, &spaces);
                if tx.blocking_send(Msg::Keepalive(results)).is_err() {
                    return;
                }
                // Verify soon with a complete snapshot (a filtered one may leave an active flow out).
                last_full = None;
                due = due.min(Instant::now() + OWNER_LOOKUP_DELAY);
            }
            Ok(WorkerMsg::Soon(new_hints)) => {
                for (c, pid) in new_hints {
                    hints.insert(c, pid);
                }
                let next = soon_reads.spacing(Instant::now(), spacing, pacing.interval);
                let soon = (last_start + next).max(Instant::now() + OWNER_LOOKUP_DELAY);
                due = due.min(soon);
                asked = true;
            }
            Ok(WorkerMsg::Owners {
                ids,
                hints: new_hints,
                read,
            }) => {
                for (c, pid) in new_hints {
                    hints.insert(c, pid);
                }
                let mut soon = read;
                // A new flow that may have keepalive on: its per-socket settings (which sock_diag
                // does not have) come with the iterator's own sample.
                let mut sample = false;
                if !ids.is_empty() && owners_budget.refusal(Instant::now()).is_some() {
                    soon = true;
                } else if !ids.is_empty() {
                    let t0 = Instant::now();
                    let (snaps, _) = source.fresh(&ids, &spaces);
                    owners_budget.spent(t0.elapsed(), Instant::now());
                    let socks: Vec<&crate::model::observe::SockSample> =
                        snaps.iter().flat_map(|s| s.socks.iter()).collect();
                    // Not accepted yet (no file), or held by none of its likely owners: a read
                    // soon (with the walk of every socket file if need be).
                    soon |= socks.iter().any(|s| awaits_accept(s));
                    soon |= match &mut source {
                        Source::Ebpf(l) => {
                            resolver.resolve_likely(&socks, &hints, &mut |pid| l.sockets_of_or_proc(pid))
                        }
                        Source::Poll => resolver.resolve_likely(&socks, &hints, &mut proc_sockets),
                    };
                    // sock_diag shows keepalive off (an ESTABLISHED socket with no keepalive timer
                    // armed) for most sessions: those wait for the periodic read. At 2 new
                    // connections a second that spares a read of the whole table each: 82
                    // iterator reads a minute at 2k sockets, 1.45 % of a core (`cargo xtask bench`).
                    sample = socks.iter().any(|s| {
                        s.state != monitor_common::tcp_state::LISTEN
                            && s.tcp.as_ref().is_none_or(|t| t.keepalive != Some(false))
                    });
                    for snap in snaps {
                        if tx
                            .blocking_send(snapshot_msg(snap, &mut resolver, false))
                            .is_err()
                        {
                            return;
                        }
                    }
                    resolver.drop_untaken();
                }
                if soon || sample {
                    let next = if soon {
                        soon_reads.spacing(Instant::now(), spacing, pacing.interval)
                    } else {
                        // The iterator's own sample follows at no more than 1 % of the time.
                        (last_cost * SAMPLE_DUTY).max(MIN_SNAPSHOT_SPACING)
                    };
                    due = due.min((last_start + next).max(Instant::now() + OWNER_LOOKUP_DELAY));
                    asked = true;
                }
            }
            Ok(WorkerMsg::Unowned(inodes)) => resolver.forget(&inodes),
            Ok(WorkerMsg::Discover) => discover_asked = true,
            Ok(WorkerMsg::HeldSoon) => {
                let soon = Instant::now() + HELD_AFTER_DEATH;
                held_due = Some(held_due.map_or(soon, |t| t.min(soon)));
            }
            Ok(WorkerMsg::HeldPids(p)) => held_pids = p,
            Ok(WorkerMsg::Watch(plan)) => {
                let reports = source.watch(&plan, &spaces);
                if tx.blocking_send(Msg::Watched(reports)).is_err() {
                    return;
                }
            }
            Ok(WorkerMsg::Pacing(p)) => {
                if p.connect_values != pacing.connect_values
                    && let Source::Ebpf(l) = &mut source
                    && let Err(e) = l.set_connect_values(p.connect_values)
                {
                    tracing::warn!("updating keepalive-at-connect values failed: {e}");
                }
                if p.all_netns != pacing.all_netns {
                    scope = Scope::new(p.all_netns, &can_enter);
                    discovered = None;
                }
                pacing = p;
                if let Source::Ebpf(l) = &mut source {
                    l.seen_mark_ms = pacing.filter_idle_ms;
                }
                due = due.min(Instant::now() + pacing.interval);
                // The filter may have changed: the state owner's bound was for the old one.
                gate.set_calm_until(None);
                asked = true;
            }
            Ok(WorkerMsg::Fresh { ids, reply }) => {
                let (snaps, outcome) = if let Some(not_read) = fresh_budget.refusal(Instant::now()) {
                    (
                        Vec::new(),
                        FreshRead {
                            found: 0,
                            not_read: Some(not_read),
                        },
                    )
                } else {
                    let t0 = Instant::now();
                    let r = source.fresh(&ids, &spaces);
                    fresh_budget.spent(t0.elapsed(), Instant::now());
                    r
                };
                if tx
                    .blocking_send(Msg::Fresh {
                        snaps,
                        outcome,
                        reply,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Ok(WorkerMsg::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                // Nothing stays flagged when the programs go.
                if let Source::Ebpf(l) = &mut source {
                    let mut handles = vec![own_handle()];
                    handles.extend(spaces.iter().map(|e| e.found.handle.clone()));
                    let left = l.release_all(&handles);
                    if left > 0 {
                        tracing::warn!(left, "sockets still carry the probe-watch flag at shutdown");
                    }
                }
                return;
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healing_reads_take_at_most_a_thousandth_of_the_time() {
        let every = Duration::from_secs(120);
        // A small table: the configured interval.
        assert_eq!(heal_every(every, Duration::from_millis(3)), every);
        // 200k sockets (0.2 s a read): 200 s apart; 1M (1.2 s): 20 min.
        assert_eq!(
            heal_every(every, Duration::from_millis(200)),
            Duration::from_secs(200)
        );
        assert_eq!(
            heal_every(every, Duration::from_millis(1200)),
            Duration::from_secs(1200)
        );
        // A longer configured interval stands.
        let long = Duration::from_secs(3600);
        assert_eq!(heal_every(long, Duration::from_millis(1200)), long);
    }

    #[test]
    fn reads_asked_back_to_back_back_off_to_the_periodic_interval() {
        let t0 = Instant::now();
        let (spacing, calm) = (Duration::from_millis(150), Duration::from_secs(2));
        let mut b = SoonBackoff::default();
        assert_eq!(b.spacing(t0, spacing, calm), spacing, "no storm yet");
        b.read(t0, calm);
        assert_eq!(b.spacing(t0, spacing, calm), spacing, "one read is no storm");
        // A storm: every read asks for the next.
        let mut now = t0;
        let mut reads = 1;
        let end = t0 + Duration::from_secs(8);
        loop {
            now += b.spacing(now, spacing, calm);
            if now >= end {
                break;
            }
            b.read(now, calm);
            reads += 1;
        }
        // 150, 300, 600, 1200 ms, then every 2 s: 7 reads in 8 s instead of 53.
        assert_eq!(reads, 7);
        assert_eq!(
            b.spacing(now, spacing, calm),
            calm,
            "capped at the periodic interval"
        );
        // Quiet for twice the interval: the next new flow is read at the short spacing again.
        assert_eq!(b.spacing(now + calm, spacing, calm), calm, "still the storm");
        let later = now + calm * 2 + Duration::from_millis(1);
        assert_eq!(b.spacing(later, spacing, calm), spacing);
        b.read(later, calm);
        assert_eq!(b.spacing(later, spacing, calm), spacing);
        // A spacing longer than the interval (a huge table) is kept, not shortened.
        let long = Duration::from_secs(5);
        b.read(later + Duration::from_millis(10), calm);
        assert_eq!(b.spacing(later, long, calm), long);
    }

    #[test]
    fn fresh_reads_take_at_most_a_tenth_of_the_time() {
        let t0 = Instant::now();
        let mut b = FreshBudget::new(t0);
        assert_eq!(b.refusal(t0), None, "the first read is free");
        // A read of 20 ms: the next may come 180 ms after it ended, not before.
        b.spent(Duration::from_millis(20), t0 + Duration::from_millis(20));
        let why = b.refusal(t0 + Duration::from_millis(100)).expect("refused");
        assert!(why.contains("1/10") && why.contains("20 ms"), "{why}");
        assert!(b.refusal(t0 + Duration::from_millis(199)).is_some());
        assert_eq!(b.refusal(t0 + Duration::from_millis(200)), None);
        // Clients asking as fast as they can get at most 10 % of the time.
        let (mut now, mut busy) = (t0 + Duration::from_millis(200), Duration::ZERO);
        let end = now + Duration::from_secs(10);
        while now < end {
            if b.refusal(now).is_none() {
                let cost = Duration::from_millis(7);
                busy += cost;
                now += cost;
                b.spent(cost, now);
            }
            now += Duration::from_millis(1);
        }
        assert!(busy <= Duration::from_millis(1_010), "{busy:?} of 10 s");
        assert!(busy >= Duration::from_millis(900), "{busy:?}: the budget is used");
    }
}
