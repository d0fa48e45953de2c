//! The flow table: one entry per TCP socket cookie, merged from events and snapshots.
//!
//! Events are immediate but can be lost; snapshots are complete but periodic. A snapshot heals the
//! table (adds what events missed, drops what closed unseen) without undoing newer events: a flow
//! is dropped only if it was last confirmed before the snapshot started, and a closed cookie is
//! remembered (tombstone) so that a snapshot taken before the close cannot resurrect it.
//! Snapshots are per network namespace: one namespace's complete read never drops another's flows.
use std::collections::VecDeque;

// Keyed by socket cookies (the kernel's, not a client's): foldhash, not SipHash (see
// `kernel::owners`).
use foldhash::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use monitor_common::tcp_state;

use crate::model::flow::{Flow, TableCounters, Tally};
use crate::model::observe::{Coverage, Event, EventKind, NetnsId, Owner, Snapshot, TcpSample, Timer};
use crate::model::time::{Nanos, SEC};

mod slab;
mod wheel;
use slab::FlowSlab;
use wheel::Wheel;

/// Closed flows kept for the detectors between two evaluations (post-mortems, the ledger).
const CLOSED_KEEP: usize = 4096;
/// A closed flow waits this long before the detectors see it, so that the error report that
/// follows the close event (ETIMEDOUT about 40 µs later) joins its record.
const CLOSE_SETTLE: Nanos = 50_000_000;
/// Tombstones live at least this long, and at least twice the longest snapshot seen.
const TOMBSTONE_MIN: Nanos = 5 * SEC;
/// Survivals kept for the path learner between two evaluations (beyond, the rest are dropped:
/// they only narrow what is learnt).
const SURVIVALS_KEEP: usize = 65_536;
/// At most this many tombstones (under a connection storm the oldest go first; a flow they would
/// have kept out is healed by the next complete snapshot).
const TOMBSTONE_MAX: usize = 500_000;

#[derive(Default)]
pub struct FlowTable {
    flows: FlowSlab,
    tombstones: HashMap<u64, Nanos>,
    /// Tombstones in the order they were made, for pruning without a walk.
    tomb_order: VecDeque<(u64, Nanos)>,
    /// Flows closed since the detectors last looked (post-mortems, the ledger), bounded.
    closed: VecDeque<(Flow, Nanos)>,
    /// TIME-WAIT sockets per namespace at its last complete read.
    time_wait: HashMap<NetnsId, u64>,
    /// The longest snapshot seen (tombstones must outlive any snapshot in flight).
    longest_snapshot: Nanos,
    pub counters: TableCounters,
    /// (cookie, idle ms) of flows seen answered after idling that long, for the path learner.
    survivals: Vec<(u64, u64)>,
    /// When the last read of each namespace started.
    read_at: HashMap<NetnsId, Nanos>,
    /// Which flows the detectors must look at, kept as flows change (no walk per round).
    marks: Marks,
    /// `calm_until` as last computed, until a flow changes.
    calm: Option<(u64, Option<Nanos>)>,
    /// Inodes of flows a complete read left with no owner though older than `UNOWNED_AFTER`,
    /// for the snapshot thread to look up again (`take_unowned`), at most `UNOWNED_MAX`.
    unowned: Vec<u64>,
}

/// A flow still without an owner this long after it was first seen is reported (`unowned`): the
/// snapshot thread hands each owner out once, and one that found no flow (a socket first read in
/// a state that is not tracked, a namespace out of scope for a while) is looked up again. Newer
/// flows are still being looked up (accept() pending, the next read).
const UNOWNED_AFTER: Nanos = 10_000_000_000;
pub const UNOWNED_MAX: usize = 1024;

/// Changes kept for the ledger between two counts, at most (beyond: one recount).
const LEDGER_CHANGES_MAX: usize = 262_144;

/// Which flows each detector must look at, kept up to date by every change to a flow, so that
/// a round costs what changed and what fell due, not a walk of every flow. Measured before:
/// at 100k idle flows the walks of the flows and ledger rounds were about 1 % of a core, most
/// of it one cache miss per flow per round (`perf`, this machine).
#[derive(Default)]
struct Marks {
    /// Flows the eviction forecast must judge: changed since it last looked, or not quiet.
    awake: HashSet<u64>,
    /// When quiet flows fall due (`wheel.rs`), soonest first; entries whose flow changed or
    /// moved are skipped.
    wheel: Wheel,
    /// Flows the leak detectors can flag: closing states, a sample in trouble, probes watched.
    notable: HashSet<u64>,
    /// Flows changed since the ledger last counted; `ledger_all`: too many, recount.
    ledger: HashSet<u64>,
    ledger_all: bool,
    /// How the flows closed since the ledger last counted were counted, and how many of each
    /// (a few services and processes: bounded by them, not by the closes of a storm).
    ledger_gone: HashMap<Tally, u64>,
}

impl Marks {
    /// `f` changed: the forecast judges it again; the leak detectors look if it is notable.
    fn changed(&mut self, f: &mut Flow) {
        f.quiet_until = 0;
        self.awake.insert(f.cookie);
        self.ledger_changed(f.cookie);
        if notable(f) {
            self.notable.insert(f.cookie);
        } else {
            self.notable.remove(&f.cookie);
        }
    }

    fn gone(&mut self, f: &Flow) {
        self.awake.remove(&f.cookie);
        self.notable.remove(&f.cookie);
        if f.tally.get().is_some() {
            *self.ledger_gone.entry(f.tally).or_default() += 1;
        }
    }

    fn ledger_changed(&mut self, cookie: u64) {
        if self.ledger_all {
            return;
        }
        // A storm between two counts: recount instead of keeping every cookie.
        if self.ledger.len() >= LEDGER_CHANGES_MAX {
            self.ledger.clear();
            self.ledger_all = true;
            return;
        }
        self.ledger.insert(cookie);
    }
}

/// Whether a leak detector (half-open, stuck closing, probes unanswered) can flag `f` at any
/// time without it changing: not ESTABLISHED (a closing state ages into `stuck`), a sample
/// showing probes, unacknowledged data or retransmissions, or probes watched on the wire.
fn notable(f: &Flow) -> bool {
    (f.state != tcp_state::ESTABLISHED && f.state != tcp_state::LISTEN)
        || f.wire().is_some()
        || f.tcp
            .as_ref()
            .is_some_and(|t| t.probes > 0 || t.unacked > 0 || t.retransmits > 0 || t.backoff > 0)
}

/// States that are not sessions: TIME_WAIT (a closed connection's 2MSL wait, no owner) and
/// request socks. They are counted, not tracked.
fn tracked(state: u8) -> bool {
    state != tcp_state::TIME_WAIT && state != tcp_state::NEW_SYN_RECV && state != tcp_state::CLOSE
}

/// An answered probe is an ACK from the peer at `at`: the flow's sample moves to that moment
/// (the ACK idle restarts, the probes outstanding go to 0, the next probe is one keepalive idle
/// away), so `flows` and the detectors see a watched flow as fresh as the kernel does, without
/// waiting for the next snapshot. The data idles are aged to `at` (upper bounds).
fn fresh_after_answer(flow: &mut Flow, at: Nanos) {
    let Some(t) = flow.tcp.as_mut() else { return };
    if at <= flow.tcp_at {
        return;
    }
    let grown = ((at - flow.tcp_at) / 1_000_000).min(u64::from(u32::MAX)) as u32;
    t.last_data_sent_ms = t.last_data_sent_ms.saturating_add(grown);
    t.last_data_recv_ms = t.last_data_recv_ms.saturating_add(grown);
    t.last_ack_recv_ms = 0;
    t.probes = 0;
    if t.timer == crate::model::observe::Timer::Keepalive
        && let Some(idle) = t.keepalive_idle_s
    {
        t.timer_expires_ms = TcpSample::expires_ms(i64::from(idle.get()) * 1000);
    }
    flow.tcp_at = at;
    flow.quiet_until = 0;
}

/// Whether `new`, taken `elapsed_ms` after `old`, shows the socket exactly as `old` foretold:
/// nothing sent or received since (each idle grew by the time between, less the spread of two
/// reads' timing within `SAMPLE_SPREAD_MS`) and the same counters, timer and keepalive.
fn unmoved(old: &TcpSample, new: &TcpSample, elapsed_ms: u64) -> bool {
    /// A socket's place in a read (up to a second or two at a million sockets) and jiffies.
    const SAMPLE_SPREAD_MS: u64 = 2_000;
    let grew = |o: u32, n: u32| u64::from(n) + SAMPLE_SPREAD_MS >= u64::from(o) + elapsed_ms;
    grew(old.last_data_sent_ms, new.last_data_sent_ms)
        && grew(old.last_data_recv_ms, new.last_data_recv_ms)
        && grew(old.last_ack_recv_ms, new.last_ack_recv_ms)
        && (
            old.retransmits,
            old.probes,
            old.backoff,
            old.unacked,
            old.total_retrans,
        ) == (
            new.retransmits,
            new.probes,
            new.backoff,
            new.unacked,
            new.total_retrans,
        )
        && old.timer == new.timer
        && (
            old.keepalive,
            old.keepalive_idle_s,
            old.keepalive_intvl_s,
            old.keepalive_cnt,
        ) == (
            new.keepalive,
            new.keepalive_idle_s,
            new.keepalive_intvl_s,
            new.keepalive_cnt,
        )
}

/// Whether a sample shows an ESTABLISHED socket the kernel filter reports only when it moves:
/// idle past the filter's threshold and in no trouble (the eBPF program's `idle_mark`).
fn unchanged_idle(t: &TcpSample, filter_idle_ms: u64) -> bool {
    let idle = u64::from(
        t.last_data_sent_ms
            .min(t.last_data_recv_ms)
            .min(t.last_ack_recv_ms),
    );
    idle >= filter_idle_ms && t.retransmits == 0 && t.probes == 0 && t.backoff == 0
}

impl FlowTable {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn get(&self, cookie: u64) -> Option<&Flow> {
        self.flows.get(cookie)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Flow> + Clone {
        self.flows.values()
    }

    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    fn close(&mut self, cookie: u64, at: Nanos) {
        self.calm = None;
        if let Some((f, moved_to)) = self.flows.remove(cookie) {
            self.marks.gone(&f);
            // The flow moved into its place is due at its new position.
            if let Some(p) = moved_to
                && let Some(m) = self.flows.at(p)
                && m.quiet_until != 0
                && m.quiet_until != Nanos::MAX
            {
                self.marks.wheel.push(m.quiet_until, p);
            }
            self.counters.closed += 1;
            if self.closed.len() >= CLOSED_KEEP {
                self.closed.pop_front();
            }
            self.closed.push_back((f, at));
        }
        if self.tombstones.insert(cookie, at).is_none() {
            self.tomb_order.push_back((cookie, at));
        }
    }

    /// Survivals seen since the last call: (cookie, idle ms).
    pub fn take_survivals(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.survivals)
    }

    /// Flows closed at least `CLOSE_SETTLE` before `now`, with their close time.
    pub fn take_closed(&mut self, now: Nanos) -> Vec<(Flow, Nanos)> {
        let n = self
            .closed
            .iter()
            .take_while(|(_, at)| now.saturating_sub(*at) >= CLOSE_SETTLE)
            .count();
        self.closed.drain(..n).collect()
    }

    /// Finds a flow by `cookie:N`, a bare cookie, or its local address (`10.0.0.1:5000`); with
    /// an address, exactly one non-listening flow must match.
    pub fn find(&self, spec: &str) -> Result<&Flow, String> {
        let spec = spec.trim();
        let cookie = spec.strip_prefix("cookie:").unwrap_or(spec).parse::<u64>().ok();
        if let Some(c) = cookie {
            return self
                .flows
                .get(c)
                .ok_or_else(|| format!("no flow with cookie {c} (it may have closed)"));
        }
        let addr = spec.parse::<SocketAddr>().map_err(|_| {
            format!("`{spec}` is neither cookie:N nor a local ADDR:PORT such as 10.0.0.1:5000")
        })?;
        let mut m = self
            .flows
            .values()
            .filter(|f| f.local() == addr && f.state != tcp_state::LISTEN);
        let first = m
            .next()
            .ok_or_else(|| format!("no flow with local address {addr}"))?;
        match m.count() {
            0 => Ok(first),
            n => Err(format!(
                "{} flows have local address {addr} (in different network namespaces): use cookie:N from `holdfast flows`",
                n + 1
            )),
        }
    }

    /// Where the socket with this inode was connected, if a flow (live or recently closed) had it.
    pub fn addrs_of_inode(&self, inode: u64) -> Option<(SocketAddr, SocketAddr)> {
        if inode == 0 {
            return None;
        }
        self.closed
            .iter()
            .rev()
            .map(|(f, _)| f)
            .chain(self.flows.values())
            .find(|f| f.inode() == inode)
            .map(|f| (f.local().addr(), f.remote().addr()))
    }

    /// Applies one kernel event. Returns true if it created a flow whose owner is unknown.
    pub fn apply_event(&mut self, e: &Event) -> bool {
        if matches!(e.kind, EventKind::ProbeSent | EventKind::ProbeAnswered) {
            // Probes never create a flow: they are about sockets already watched.
            let flow = match self.flows.get_mut(e.cookie) {
                Some(f) => f,
                None => match self.closed.iter_mut().rev().find(|(f, _)| f.cookie == e.cookie) {
                    Some((f, _)) => f,
                    None => return false,
                },
            };
            let log = flow.wire_mut();
            match e.kind {
                EventKind::ProbeSent => log.on_sent(e.ts, e.err.max(0) as u32),
                _ => {
                    log.on_answered(e.ts, e.err.max(0) as u32);
                    fresh_after_answer(flow, e.ts);
                }
            }
            // A closed flow's record is marked too; `gone` already forgot it, so unmark it.
            let live = self.flows.contains_key(e.cookie);
            if let Some(f) = self.flows.get_mut(e.cookie) {
                self.marks.changed(f);
            }
            if live {
                self.calm = None;
            }
            return false;
        }
        if self.tombstones.contains_key(&e.cookie) {
            // The error report and reset that end a flow can follow its close event: they
            // belong to the flow's last record (its post-mortem reads them).
            if matches!(e.kind, EventKind::Error | EventKind::RecvRst)
                && let Some((f, _)) = self.closed.iter_mut().rev().find(|(f, _)| f.cookie == e.cookie)
            {
                match e.kind {
                    EventKind::Error => f.set_last_error(e.err),
                    _ => f.count_reset_recv(),
                }
            }
            return false;
        }
        if e.kind == EventKind::State && !tracked(e.state) {
            if e.state == tcp_state::TIME_WAIT {
                self.counters.time_wait_total += 1;
            }
            self.close(e.cookie, e.ts);
            return false;
        }
        let mut created = false;
        let flow = self.flows.or_insert_with(e.cookie, || {
            created = true;
            Flow::new(e.cookie, e.netns, e.local, e.remote, e.state, e.ts)
        });
        if created && e.kind == EventKind::State {
            self.counters.opened += 1;
        }
        // connect() runs before the local port is chosen: keep the best tuple seen.
        if e.local.port() != 0 || flow.local().port() == 0 {
            flow.set_local(e.local);
        }
        if e.remote.port() != 0 {
            flow.set_remote(e.remote);
        }
        if e.netns != 0 {
            flow.netns = e.netns;
        }
        flow.last_seen = flow.last_seen.max(e.ts);
        match e.kind {
            EventKind::State => {
                if flow.state != e.state || created {
                    flow.state = e.state;
                    flow.set_state_since(e.ts);
                }
            }
            EventKind::RecvRst => flow.count_reset_recv(),
            EventKind::SendRst => flow.count_reset_sent(),
            EventKind::Retransmit => {
                flow.count_retransmit();
                // The first retransmission comes at least the minimum RTO (200 ms) after the send.
                if flow.trouble_idle_ms() == 0
                    && !flow.sample_aged()
                    && let Some(t) = &flow.tcp
                {
                    let since_sample = e.ts.saturating_sub(flow.tcp_at) / 1_000_000;
                    let idle = (u64::from(t.last_ack_recv_ms) + since_sample).saturating_sub(200);
                    flow.set_trouble_idle_ms(idle.clamp(1, u64::from(u32::MAX)) as u32);
                }
            }
            EventKind::Error => flow.set_last_error(e.err),
            EventKind::ProbeSent | EventKind::ProbeAnswered => {}
        }
        if let Some(h) = &e.pid_hint {
            flow.set_pid_hint(Some(h.clone()));
        }
        self.marks.changed(flow);
        self.calm = None;
        created && flow.owner.is_none()
    }

    /// The inodes of flows left with no owner by the complete reads since the last call.
    pub fn take_unowned(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.unowned)
    }

    /// Merges a snapshot of one namespace. `owners` maps socket inode -> owner, for the sockets
    /// whose owner was found since they were last read (a flow keeps its owner).
    pub fn apply_snapshot(&mut self, snap: &Snapshot, owners: &HashMap<u64, Arc<Owner>>) {
        let at = snap.finished;
        if snap.coverage != Coverage::Targeted {
            self.read_at.insert(snap.netns, snap.started);
        }
        // `calm` (a walk of every flow) is dropped only by what can bring it closer: a flow
        // created, moved or aged here. A flow gone can only put it later. A table that needed
        // a read, or whose calm moment has come, is looked at again after each read.
        if snap.coverage != Coverage::Targeted
            && matches!(self.calm, Some((_, v)) if v.is_none_or(|t| t <= at))
        {
            self.calm = None;
        }
        self.longest_snapshot = self
            .longest_snapshot
            .max(snap.finished.saturating_sub(snap.started));
        let mut time_wait = 0;
        for s in &snap.socks {
            if !tracked(s.state) {
                time_wait += u64::from(s.state == tcp_state::TIME_WAIT);
                continue;
            }
            if self.tombstones.contains_key(&s.cookie) {
                continue;
            }
            // A query's read: only the flows it named (a socket met here first is left to the
            // next read, which brings its owner).
            let targeted = snap.coverage == Coverage::Targeted;
            if targeted && !self.flows.contains_key(s.cookie) {
                continue;
            }
            let mut created = false;
            let flow = self.flows.or_insert_with(s.cookie, || {
                created = true;
                Flow::new(s.cookie, snap.netns, s.local, s.remote, s.state, at)
            });
            if created {
                self.counters.opened += 1;
            }
            // What the detectors judged before this sample, to tell whether it moved.
            let before = (flow.state, flow.owner.as_ref().map(Arc::as_ptr), flow.inode());
            // sock_diag (a query's exact read, also in eBPF mode) has no per-socket keepalive
            // settings: those of the last iterator read stand (only setsockopt changes them).
            let carried;
            let s = match (&flow.tcp, &s.tcp) {
                (Some(old), Some(new))
                    if targeted && new.keepalive_idle_s.is_none() && old.keepalive_idle_s.is_some() =>
                {
                    let mut c = s.clone();
                    if let Some(t) = c.tcp.as_mut() {
                        t.keepalive_idle_s = old.keepalive_idle_s;
                        t.keepalive_intvl_s = old.keepalive_intvl_s;
                        t.keepalive_cnt = old.keepalive_cnt;
                        t.keepalive = t.keepalive.or(old.keepalive);
                    }
                    carried = c;
                    &carried
                }
                _ => s,
            };
            let moved_sample = match (&flow.tcp, &s.tcp) {
                (Some(old), Some(new)) => {
                    flow.sample_aged() || !unmoved(old, new, at.saturating_sub(flow.tcp_at) / 1_000_000)
                }
                (None, None) => false,
                _ => true,
            };
            if flow.state != s.state {
                // Changed between snapshots without an event (poll mode, or a lost event).
                if flow.last_seen < snap.started {
                    flow.state = s.state;
                    flow.set_state_since(at);
                }
            }
            flow.netns = snap.netns;
            flow.set_ends(s.local, s.remote);
            if s.inode != 0 {
                flow.set_inode(s.inode);
            }
            flow.uid = s.uid;
            if let Some(t) = &s.tcp {
                let calm = t.unacked == 0 && t.retransmits == 0;
                // An ACK arrived since the last calm sample showed the flow idle: the path
                // survived that idle.
                if calm && t.last_ack_recv_ms < flow.seen_idle_ms && self.survivals.len() < SURVIVALS_KEEP {
                    self.survivals.push((flow.cookie, u64::from(flow.seen_idle_ms)));
                }
                flow.seen_idle_ms = if calm { t.last_ack_recv_ms } else { 0 };
                if calm {
                    flow.set_trouble_idle_ms(0);
                } else if flow.trouble_idle_ms() == 0 && t.retransmits > 0 && t.unacked > 0 {
                    flow.set_trouble_idle_ms(t.last_ack_recv_ms.max(1));
                }
                flow.tcp = s.tcp.clone();
                flow.tcp_at = at;
                flow.set_sample_aged(false);
            }
            if let Some(o) = owners.get(&s.inode) {
                flow.owner = Some(o.clone());
                // The owner says who holds it: the hint from connect() is no longer needed (a
                // box and a string per connecting flow, about 80 bytes).
                flow.set_pid_hint(None);
            } else if flow.owner.is_none()
                && s.inode != 0
                && snap.coverage == Coverage::Complete
                && at.saturating_sub(flow.first_seen) >= UNOWNED_AFTER
                && self.unowned.len() < UNOWNED_MAX
            {
                self.unowned.push(s.inode);
            }
            flow.last_seen = flow.last_seen.max(at);
            // A flow exactly as its last sample foretold (idle for the time between, nothing
            // else different) keeps its judgements: a complete read of idle flows wakes none.
            if created
                || moved_sample
                || before != (flow.state, flow.owner.as_ref().map(Arc::as_ptr), flow.inode())
            {
                self.marks.changed(flow);
                self.calm = None;
            }
        }

        if let Some(tw) = snap.time_wait {
            time_wait = tw;
            self.time_wait.insert(snap.netns, tw);
            self.counters.time_wait_now = self.time_wait.values().sum();
        }
        let min_idle = match snap.coverage {
            // The sockets a query named: nothing is said of the others (a named socket that
            // closed comes as an event, or is found gone by the next complete read).
            Coverage::Targeted => return,
            Coverage::Filtered { idle_ms } => Some(idle_ms),
            Coverage::Complete => None,
        };
        if let Some(min_idle) = min_idle {
            // Left out by the kernel: active within `min_idle` of the snapshot. Age the sample
            // no further than that, and keep the flow (its close will come as an event).
            let listed: HashSet<u64> = snap.socks.iter().map(|s| s.cookie).collect();
            let cap = min_idle.min(u64::from(u32::MAX)) as u32;
            for f in self.flows.values_mut().filter(|f| {
                f.netns == snap.netns && f.state == tcp_state::ESTABLISHED && !listed.contains(&f.cookie)
            }) {
                // Idle past the threshold at its last sample, in no trouble, and left out: it
                // has not moved since (the kernel reports an idle socket again once it moves),
                // so its sample, extrapolated, is exact. Left as it is.
                if !f.sample_aged() && f.tcp.as_ref().is_some_and(|t| unchanged_idle(t, min_idle)) {
                    f.last_seen = f.last_seen.max(at);
                    continue;
                }
                let aged = f.sample_aged();
                if let Some(t) = f.tcp.as_mut() {
                    let grown = ((at.saturating_sub(f.tcp_at)) / 1_000_000).min(u64::from(u32::MAX)) as u32;
                    // Left out while its extrapolated idle is still under the threshold: the
                    // kernel said nothing the sample does not already foretell. Nothing to age,
                    // nothing to judge again (at 200k young flows, re-judging every flow at
                    // every filtered read was most of the agent's steady time).
                    let idle = t
                        .last_data_sent_ms
                        .min(t.last_data_recv_ms)
                        .min(t.last_ack_recv_ms);
                    if !aged && idle.saturating_add(grown) <= cap {
                        f.last_seen = f.last_seen.max(at);
                        continue;
                    }
                    let before = (t.last_data_sent_ms, t.last_data_recv_ms, t.last_ack_recv_ms);
                    t.last_data_sent_ms = t.last_data_sent_ms.saturating_add(grown).min(cap);
                    t.last_data_recv_ms = t.last_data_recv_ms.saturating_add(grown).min(cap);
                    t.last_ack_recv_ms = t.last_ack_recv_ms.saturating_add(grown).min(cap);
                    f.tcp_at = at;
                    // Already aged to the cap by the last read: the same bound again, no news
                    // (judged on it, a flow is idle no longer than then: its verdict holds).
                    let news =
                        !aged || before != (t.last_data_sent_ms, t.last_data_recv_ms, t.last_ack_recv_ms);
                    f.set_sample_aged(true);
                    if news {
                        self.marks.changed(f);
                        self.calm = None;
                    }
                }
                f.last_seen = f.last_seen.max(at);
            }
            self.prune_tombstones(at);
            return;
        }
        let gone: Vec<u64> = self
            .flows
            .values()
            .filter(|f| f.netns == snap.netns && f.last_seen < snap.started)
            .map(|f| f.cookie)
            .collect();
        for c in gone {
            self.close(c, at);
        }
        self.time_wait.insert(snap.netns, time_wait);
        self.counters.time_wait_now = self.time_wait.values().sum();
        self.prune_tombstones(at);
    }

    /// Marks flows the eviction forecast judged quiet (see `Flow::quiet_until`): it looks at
    /// them again when they change or their time falls due (`Nanos::MAX`: only on a change).
    pub fn set_quiet(&mut self, quiet: &[(u64, Nanos, bool)]) {
        if quiet.is_empty() {
            return;
        }
        self.calm = None;
        for (c, until, read) in quiet {
            if let Some(p) = self.flows.index_of(*c)
                && let Some(f) = self.flows.at_mut(p)
            {
                f.quiet_until = *until;
                f.set_quiet_read(*read);
                self.marks.awake.remove(c);
                if *until != Nanos::MAX {
                    self.marks.wheel.push(*until, p);
                }
            }
        }
        // Stale entries (flows changed or gone) are dropped when they fall due; a long-quiet
        // table is rebuilt instead of growing.
        if self.marks.wheel.len() > 2 * self.flows.len() + 1024 {
            self.marks.wheel.rebuild(
                self.flows
                    .values()
                    .zip(0u32..)
                    .filter(|(f, _)| f.quiet_until != 0 && f.quiet_until != Nanos::MAX)
                    .map(|(f, p)| (f.quiet_until, p)),
            );
        }
    }

    /// Every flow is assessed again: the policy or the namespaces changed, or `cookie`'s
    /// keepalive values were learnt (`Some`).
    pub fn unquiet(&mut self, cookie: Option<u64>) {
        self.calm = None;
        match cookie {
            Some(c) => {
                if let Some(f) = self.flows.get_mut(c) {
                    f.quiet_until = 0;
                    self.marks.awake.insert(c);
                }
            }
            None => {
                for f in self.flows.values_mut() {
                    f.quiet_until = 0;
                    self.marks.awake.insert(f.cookie);
                }
                self.marks.wheel.clear();
            }
        }
    }

    /// Every flow of one namespace is assessed again (its routes changed); returns how many.
    pub fn unquiet_netns(&mut self, netns: NetnsId) -> usize {
        self.calm = None;
        let mut n = 0;
        for f in self.flows.values_mut().filter(|f| f.netns == netns) {
            f.quiet_until = 0;
            self.marks.awake.insert(f.cookie);
            n += 1;
        }
        n
    }

    /// The flows the eviction forecast must judge at `now`: those changed since it last
    /// looked or not judged quiet, and the quiet ones whose time has come (woken here).
    pub fn to_judge(&mut self, now: Nanos) -> Vec<u64> {
        while let Some((tick, p)) = self.marks.wheel.pop_due(now) {
            if let Some(f) = self.flows.at_mut(p)
                && f.quiet_until != 0
                && f.quiet_until != Nanos::MAX
                && self.marks.wheel.is_at(f.quiet_until, tick)
            {
                f.quiet_until = 0;
                self.marks.awake.insert(f.cookie);
                self.calm = None;
            }
        }
        self.marks.awake.iter().copied().collect()
    }

    /// How the flows closed since the ledger last asked were counted, with how many of each.
    pub fn take_ledger_gone(&mut self) -> Vec<(Tally, u64)> {
        self.marks.ledger_gone.drain().collect()
    }

    /// Sets the ledger's tally of the flows in `cookies` (None: every flow) to what `count`
    /// gives for each, as the flow is now.
    pub fn retally(&mut self, cookies: Option<&[u64]>, mut count: impl FnMut(&Flow) -> Tally) {
        match cookies {
            Some(cs) => {
                for c in cs {
                    if let Some(f) = self.flows.get_mut(*c) {
                        f.tally = count(f);
                    }
                }
            }
            None => {
                for f in self.flows.values_mut() {
                    f.tally = count(f);
                }
            }
        }
    }

    /// What changed for the ledger since it last asked: the cookies (flows gone are in
    /// `take_ledger_gone`), or None when it must recount every flow.
    pub fn take_ledger_changes(&mut self) -> Option<Vec<u64>> {
        if std::mem::take(&mut self.marks.ledger_all) {
            self.marks.ledger.clear();
            return None;
        }
        let v = self.marks.ledger.drain().collect();
        if self.marks.ledger.capacity() > 4096 {
            self.marks.ledger.shrink_to_fit();
        }
        Some(v)
    }

    /// The flows a leak detector can flag (see `notable`), without a walk.
    pub fn notable(&self) -> impl Iterator<Item = &Flow> + Clone {
        self.marks.notable.iter().filter_map(|c| self.flows.get(*c))
    }

    /// eBPF mode: the moment before which no ESTABLISHED flow can reach `filter_idle_ms` of idle
    /// (the kernel filter's threshold), judged from each flow's last sample: a flow idle `i` at
    /// its sample reaches the threshold no sooner than `threshold - i` later, and sooner only
    /// if it was idle longer than sampled, which cannot be. A flow already past it (reported
    /// once, reported again only when it moves) needs a read before its quiet forecast must be
    /// confirmed (`Flow::quiet_read`). None when some flow needs a read now: no sample yet, in
    /// trouble (retransmitting, probing), or past the threshold and not judged quiet. One pass
    /// over the table (about 0.3 ms at 100k flows), kept until a flow or its quiet changes.
    /// Other states need no read: their changes come as events.
    pub fn calm_until(&mut self, filter_idle_ms: u64) -> Option<Nanos> {
        if let Some((ms, v)) = self.calm
            && ms == filter_idle_ms
        {
            return v;
        }
        let v = self.compute_calm_until(filter_idle_ms);
        self.calm = Some((filter_idle_ms, v));
        v
    }

    fn compute_calm_until(&self, filter_idle_ms: u64) -> Option<Nanos> {
        /// The read's own duration and jiffy rounding, with room to spare.
        const SLACK: Nanos = 1_000_000_000;
        let mut until = Nanos::MAX;
        for f in self.flows.values() {
            if f.state != tcp_state::ESTABLISHED {
                continue;
            }
            let Some(t) = f.tcp.as_ref() else {
                // Not read yet: read. Left out by a read that began after it appeared: the
                // kernel no longer lists it (its close was lost); the complete read heals it.
                if self.read_at.get(&f.netns).is_none_or(|r| *r <= f.first_seen) {
                    return None;
                }
                continue;
            };
            if t.retransmits != 0 || t.probes != 0 || t.backoff != 0 {
                return None;
            }
            let idle = u64::from(
                t.last_data_sent_ms
                    .min(t.last_data_recv_ms)
                    .min(t.last_ack_recv_ms),
            );
            // Keepalive on: its probes may go unanswered (a dead peer) once it has idled the
            // keepalive time, and the kernel reports a socket with probes outstanding without
            // any event: from then on every read is needed (unknown per-socket time: now).
            if t.keepalive == Some(true) || t.timer == Timer::Keepalive {
                let ka_ms = t
                    .keepalive_idle_s
                    .map_or(0, |s| u64::from(s.get()))
                    .saturating_mul(1000);
                let left = ka_ms.checked_sub(idle).filter(|l| *l > 0)?;
                until = until.min((f.tcp_at + left * 1_000_000).saturating_sub(SLACK));
            }
            if let Some(left) = filter_idle_ms.checked_sub(idle).filter(|l| *l > 0) {
                until = until.min((f.tcp_at + left * 1_000_000).saturating_sub(SLACK));
                continue;
            }
            // Past the threshold. The kernel reports it again only when it moves: a read is
            // needed only before the forecast that judged it quiet must be confirmed (none for
            // a flow whose verdict cannot change unseen), and at every round while it is not
            // quiet (at risk, or not judged since it changed).
            if f.sample_aged() || !unchanged_idle(t, filter_idle_ms) || f.quiet_until == 0 {
                return None;
            }
            if f.quiet_read() {
                until = until.min(f.quiet_until.saturating_sub(SLACK));
            }
        }
        Some(until)
    }

    /// Drops a namespace that disappeared, with its flows (they closed with it).
    pub fn drop_netns(&mut self, netns: NetnsId, at: Nanos) -> usize {
        self.read_at.remove(&netns);
        let gone: Vec<u64> = self
            .flows
            .values()
            .filter(|f| f.netns == netns)
            .map(|f| f.cookie)
            .collect();
        for c in &gone {
            self.close(*c, at);
        }
        self.time_wait.remove(&netns);
        self.counters.time_wait_now = self.time_wait.values().sum();
        gone.len()
    }

    fn prune_tombstones(&mut self, now: Nanos) {
        let keep = TOMBSTONE_MIN.max(2 * self.longest_snapshot);
        while let Some(&(cookie, at)) = self.tomb_order.front() {
            let expired = now.saturating_sub(at) >= keep;
            if !expired && self.tomb_order.len() <= TOMBSTONE_MAX {
                break;
            }
            self.tomb_order.pop_front();
            if self.tombstones.get(&cookie) == Some(&at) {
                self.tombstones.remove(&cookie);
            }
        }
    }

    /// Periodic upkeep: expires tombstones and gives back the memory of a past storm. Returns
    /// true when it shrank something (the caller may then return freed pages to the system).
    pub fn maintain(&mut self, now: Nanos) -> bool {
        self.prune_tombstones(now);
        let mut shrank = false;
        shrank |= self.flows.shrink_if_sparse();
        // Every flow is awake once (when first seen, after a reload): 12 bytes per flow held
        // for good at 200k flows if not given back.
        if self.marks.awake.capacity() > 4 * self.marks.awake.len() + 4096 {
            self.marks.awake.shrink_to_fit();
            shrank = true;
        }
        if self.tombstones.capacity() > 4 * self.tombstones.len() + 4096 {
            self.tombstones.shrink_to_fit();
            self.tomb_order.shrink_to_fit();
            shrank = true;
        }
        if self.closed.capacity() > 4 * self.closed.len() + 1024 {
            self.closed.shrink_to_fit();
            shrank = true;
        }
        shrank
    }
}

#[cfg(test)]
mod tests;
