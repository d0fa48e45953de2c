//! What the state owner keeps, grouped by job: the tracked world, the detectors, the remedies,
//! the finding store, the runtime policy, and the agent's own health counters.
use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::config::policy::Policy;
use crate::detect::eviction::EvictionDetector;
use crate::detect::ledger::Ledger;
use crate::detect::zombies::ZombieDetector;
use crate::findings::FindingStore;
use crate::kernel::routes::Router;
use crate::model::eviction::{KaRequest, NetFacts};
use crate::model::health::{Feature, KernelCounters};
use crate::model::observe::NetnsId;
use crate::remedy::close::CloseRemedy;
use crate::remedy::keepalive::KeepaliveRemedy;
use crate::remedy::sigchld::SigchldRemedy;
use crate::track::flows::FlowTable;
use crate::track::zombies::ZombieTracker;

/// The detectors' own memory.
#[derive(Default)]
pub struct Detectors {
    pub eviction: EvictionDetector,
    pub zombies: ZombieDetector,
    pub ledger: Ledger,
}

/// The remedies' own memory (what they did, what they wait for).
#[derive(Default)]
pub struct Remedies {
    pub keepalive: KeepaliveRemedy,
    pub close: CloseRemedy,
    pub sigchld: SigchldRemedy,
    pub restart: crate::remedy::restart::RestartRemedy,
}

/// A network namespace as the state owner knows it.
#[derive(Clone, Debug)]
pub struct NetnsInfo {
    pub id: NetnsId,
    pub name: String,
    pub facts: NetFacts,
    pub error: Option<String>,
    /// How to enter it (no descriptor is held).
    pub handle: crate::kernel::netns::NsHandle,
}

/// Facts that do not change while the agent runs.
pub struct Info {
    pub mode: &'static str,
    pub mode_reason: String,
    pub features: Vec<Feature>,
    pub sockops: String,
    pub started: Instant,
    pub config_desc: String,
    pub socket: std::path::PathBuf,
}

/// Counters of what the agent did, for `status` and metrics.
#[derive(Default)]
pub struct Stats {
    pub kernel: KernelCounters,
    pub events: u64,
    pub undecodable: u64,
    pub snapshots: u64,
    /// Of which complete (every socket of every namespace).
    pub complete_reads: u64,
    pub last_snapshot: Duration,
    pub last_snapshot_sockets: usize,
    pub snapshot_failures: u64,
    pub last_snapshot_error: Option<String>,
    pub full_walks: u64,
    pub targeted_walks: u64,
    pub proc_scans: u64,
    pub last_proc_scan: Duration,
    pub processes: usize,
    pub reloads: u64,
    pub last_reload_error: Option<String>,
    pub socket_ok: bool,
    pub clients: usize,
    pub clients_refused: u64,
    pub rounds: crate::ipc::Rounds,
    pub fresh: crate::ipc::FreshReads,
    /// The longest the state owner was busy with one step, and with what, over the last
    /// minute (a step delays everything queued behind it, `status` included).
    pub slowest: (Duration, &'static str, Option<Instant>),
}

impl Stats {
    pub fn note_step(&mut self, step: &'static str, took: Duration) {
        let stale = self
            .slowest
            .2
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60));
        if stale || took > self.slowest.0 {
            self.slowest = (took, step, Some(Instant::now()));
        }
    }
}

/// Everything the state owner keeps.
pub struct State {
    pub table: FlowTable,
    /// Descriptors held to dead TCP sockets.
    pub held: crate::track::held::HeldTracker,
    pub zombies: ZombieTracker,
    pub detect: Detectors,
    pub remedies: Remedies,
    pub store: FindingStore,
    pub router: Router,
    pub netns: std::collections::BTreeMap<NetnsId, NetnsInfo>,
    /// Which namespaces are watched, in words.
    pub netns_scope: String,
    pub policy: Policy,
    pub info: Info,
    pub stats: Stats,
    /// Keepalive requests queued by queries (manual remedies), sent by the main loop.
    pub outbox: Vec<KaRequest>,
    /// Sockets whose keepalive probes the kernel watches (eBPF mode).
    pub watch: crate::track::watch::WatchSet,
    /// Cookies counted as leaked at the last ledger count.
    pub leaked: HashSet<u64>,
    /// What the host's flows taught about each path's idle timeout.
    pub paths: crate::track::paths::PathBook,
    /// The timeouts learnt from `paths` (seconds, evidence), as the forecasts use them.
    pub learned: std::collections::HashMap<crate::track::paths::PathKey, (u64, String)>,
    /// Shared with the snapshot thread: whether a filtered read can find anything (eBPF mode).
    pub gate: std::sync::Arc<super::workers::ReadGate>,
    /// The table's count of closed flows at the last `prune` (None: never pruned).
    pruned_at_closed: Option<u64>,
    /// eBPF mode: flows that appeared with no owner known, looked up exactly at the next tick
    /// (see `take_owner_lookups`).
    pub owner_pending: Vec<PendingOwner>,
}

/// A flow that appeared with no owner known.
#[derive(Clone, Copy, Debug)]
pub struct PendingOwner {
    pub cookie: u64,
    /// The pid seen at connect() or listen().
    pub pid: Option<u32>,
    /// Already waited one tick for a complete tuple.
    pub waited: bool,
}

impl State {
    pub fn new(policy: Policy, info: Info) -> Self {
        State {
            table: FlowTable::default(),
            held: Default::default(),
            zombies: ZombieTracker::default(),
            detect: Detectors::default(),
            remedies: Remedies::default(),
            store: FindingStore::default(),
            router: Router::default(),
            netns: Default::default(),
            netns_scope: String::new(),
            policy,
            info,
            stats: Stats {
                socket_ok: true,
                ..Default::default()
            },
            outbox: Vec::new(),
            watch: Default::default(),
            leaked: HashSet::new(),
            paths: Default::default(),
            learned: Default::default(),
            gate: Default::default(),
            pruned_at_closed: None,
            owner_pending: Vec::new(),
        }
    }

    /// The flows of `owner_pending` that can be read exactly now (their tuple is complete: a
    /// connect() is first seen before its local port is chosen) with the pid hints, and whether
    /// some pending flow must be found by a filtered read instead (the list overflowed, or a
    /// flow's tuple stayed incomplete since the last tick). Flows gone or owned are dropped.
    pub fn take_owner_lookups(&mut self) -> OwnerLookups {
        let mut out = OwnerLookups::default();
        let mut keep = Vec::new();
        for p in std::mem::take(&mut self.owner_pending) {
            let Some(f) = self.table.get(p.cookie) else {
                continue;
            };
            if f.owner.is_some() {
                continue;
            }
            let listener = f.state == monitor_common::tcp_state::LISTEN;
            if f.local().port() == 0 || (f.remote().port() == 0 && !listener) {
                // Waits one tick for its handshake's record; then a filtered read finds it.
                if p.waited {
                    out.read = true;
                    out.hints.extend(p.pid.map(|pid| (p.cookie, pid)));
                } else {
                    keep.push(PendingOwner { waited: true, ..p });
                }
                continue;
            }
            out.hints.extend(p.pid.map(|pid| (p.cookie, pid)));
            let id = crate::kernel::sockdiag::SockId {
                cookie: p.cookie,
                local: f.local().addr(),
                remote: f.remote().addr(),
            };
            out.ids.push((f.netns, id));
        }
        self.owner_pending = keep;
        out
    }
}

/// What `State::take_owner_lookups` hands the snapshot thread.
#[derive(Default)]
pub struct OwnerLookups {
    pub ids: Vec<(NetnsId, crate::kernel::sockdiag::SockId)>,
    pub hints: Vec<(u64, u32)>,
    /// Some flow needs a filtered read to be found.
    pub read: bool,
}

impl State {
    /// Recomputes the timeouts learnt per path; logs each change and returns whether any.
    pub fn relearn(&mut self) -> bool {
        use crate::track::paths::Learned;
        let mut now = std::collections::HashMap::new();
        if self.policy.learning.enabled {
            for (k, e) in self.paths.iter() {
                // Between 1 s and 7 days: anything else (a hand-edited file) is not a timeout.
                if let Learned::Timeout { ms, evidence } =
                    e.learned(self.policy.learning.min_evictions as usize)
                    && (1000..=7 * 86_400_000).contains(&ms)
                {
                    now.insert(k.clone(), (ms / 1000, evidence));
                }
            }
        }
        if now == self.learned {
            return false;
        }
        for (k, (t, ev)) in &now {
            if self.learned.get(k).map(|v| v.0) != Some(*t) {
                tracing::info!(path = %k, timeout_s = t, evidence = %ev, "learnt the idle timeout of a path: flows there without a rule are forecast with it");
            }
        }
        for k in self.learned.keys().filter(|k| !now.contains_key(*k)) {
            let why = match self.paths.get(k) {
                Some(e) => match e.learned(self.policy.learning.min_evictions as usize) {
                    Learned::Not { reason } => reason,
                    Learned::Timeout { .. } => "learning is off".into(),
                },
                None => "the path was forgotten".into(),
            };
            tracing::warn!(path = %k, reason = %why, "no longer using a learnt idle timeout for a path");
        }
        self.learned = now;
        true
    }

    /// The shortest timeout not from the configuration: the namespaces' conntrack and the
    /// timeouts learnt per path (flows may be cut by either). A path learnt in a namespace
    /// that is not watched now (a container gone, a test namespace deleted) cuts no flow here:
    /// it stays in the book, since a namespace of that name may come back, but it does not
    /// shorten the policy, and so the eBPF read filter, for every namespace.
    pub fn shortest_external_s(&self) -> Option<u64> {
        let ct = self.netns.values().filter_map(|n| n.facts.conntrack_s).min();
        // The names once, not a walk of the namespaces per learnt path.
        let names: HashSet<&str> = if self.learned.is_empty() {
            HashSet::new()
        } else {
            self.netns.values().map(|n| n.name.as_str()).collect()
        };
        let learned = self
            .learned
            .iter()
            .filter(|(k, _)| names.contains(k.netns.as_str()))
            .map(|(_, v)| v.0)
            .min();
        match (ct, learned) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Forgets what detectors and remedies remember about flows that are gone without a close
    /// record reaching them (a connection storm overflows the closed-flow queue): their memory
    /// is bounded by the live table.
    /// Nothing to do while no flow has closed since the last time (a walk of every flow, 6 % of
    /// an idle agent's time at 100k flows when it ran every 10 s).
    pub fn prune(&mut self) {
        let closed = self.table.counters.closed;
        if self.pruned_at_closed == Some(closed) {
            return;
        }
        self.pruned_at_closed = Some(closed);
        let live: HashSet<u64> = self.table.iter().map(|f| f.cookie).collect();
        self.detect.eviction.forget(&live);
        self.remedies.keepalive.retain(&live);
        self.remedies.close.retain(&live);
    }

    /// Whether a namespace of this name is watched now (learnt paths are keyed by name).
    pub fn netns_present(&self, name: &str) -> bool {
        self.netns.values().any(|n| n.name == name)
    }

    /// The namespace in words (see [`netns_name`]).
    pub fn netns_name(&self, id: NetnsId) -> Option<String> {
        netns_name(&self.netns, id)
    }
}

/// A namespace in words: its `ip netns`/container/pod name, else `net:[inode]`; None only when
/// the kernel did not say (id 0). The agent's own namespace is named like any other.
pub fn netns_name(known: &std::collections::BTreeMap<NetnsId, NetnsInfo>, id: NetnsId) -> Option<String> {
    (id != 0).then(|| {
        known
            .get(&id)
            .map_or_else(|| format!("net:[{id}]"), |n| n.name.clone())
    })
}
