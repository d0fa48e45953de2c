//! The flow table: one entry per TCP socket cookie, merged from events and snapshots.
//!
//! Events are immediate but can be lost; snapshots are complete but periodic. A snapshot heals the
//! table (adds what events missed, drops what closed unseen) without undoing newer events: a flow
//! is dropped only if it was last confirmed before the snapshot started, and a closed cookie is
//! remembered (tombstone) so that a snapshot taken before the close cannot resurrect it.
//! Snapshots are per network namespace: one namespace's complete read never drops another's flows.
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use monitor_common::tcp_state;

use crate::model::flow::{Flow, TableCounters};
use crate::model::observe::{Event, EventKind, NetnsId, Owner, Snapshot};
use crate::model::time::{Nanos, SEC};

/// Closed flows kept for the detectors between two evaluations (post-mortems, the ledger).
const CLOSED_KEEP: usize = 4096;
/// A closed flow waits this long before the detectors see it, so that the error report that
/// follows the close event (ETIMEDOUT about 40 µs later) joins its record.
const CLOSE_SETTLE: Nanos = 50_000_000;
/// Tombstones live at least this long, and at least twice the longest snapshot seen.
const TOMBSTONE_MIN: Nanos = 5 * SEC;
/// At most this many tombstones (under a connection storm the oldest go first; a flow they would
/// have kept out is healed by the next complete snapshot).
const TOMBSTONE_MAX: usize = 500_000;

#[derive(Default)]
pub struct FlowTable {
    flows: HashMap<u64, Flow>,
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
}

/// States that are not sessions: TIME_WAIT (a closed connection's 2MSL wait, no owner) and
/// request socks. They are counted, not tracked.
fn tracked(state: u8) -> bool {
    state != tcp_state::TIME_WAIT && state != tcp_state::NEW_SYN_RECV && state != tcp_state::CLOSE
}

impl FlowTable {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn get(&self, cookie: u64) -> Option<&Flow> {
        self.flows.get(&cookie)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Flow> + Clone {
        self.flows.values()
    }

    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    fn close(&mut self, cookie: u64, at: Nanos) {
        if let Some(f) = self.flows.remove(&cookie) {
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
                .get(&c)
                .ok_or_else(|| format!("no flow with cookie {c} (it may have closed)"));
        }
        let addr = spec.parse::<SocketAddr>().map_err(|_| {
            format!("`{spec}` is neither cookie:N nor a local ADDR:PORT such as 10.0.0.1:5000")
        })?;
        let mut m = self
            .flows
            .values()
            .filter(|f| f.local == addr && f.state != tcp_state::LISTEN);
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

    /// Applies one kernel event. Returns true if it created a flow whose owner is unknown.
    pub fn apply_event(&mut self, e: &Event) -> bool {
        if self.tombstones.contains_key(&e.cookie) {
            // The error report and reset that end a flow can follow its close event: they
            // belong to the flow's last record (its post-mortem reads them).
            if matches!(e.kind, EventKind::Error | EventKind::RecvRst)
                && let Some((f, _)) = self.closed.iter_mut().rev().find(|(f, _)| f.cookie == e.cookie)
            {
                match e.kind {
                    EventKind::Error => f.last_error = Some(e.err),
                    _ => f.resets_recv += 1,
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
        let flow = self.flows.entry(e.cookie).or_insert_with(|| {
            created = true;
            Flow::new(e.cookie, e.netns, e.local, e.remote, e.state, e.ts)
        });
        if created && e.kind == EventKind::State {
            self.counters.opened += 1;
        }
        // connect() runs before the local port is chosen: keep the best tuple seen.
        if e.local.port() != 0 || flow.local.port() == 0 {
            flow.local = e.local;
        }
        if e.remote.port() != 0 {
            flow.remote = e.remote;
        }
        if e.netns != 0 {
            flow.netns = e.netns;
        }
        flow.last_seen = flow.last_seen.max(e.ts);
        match e.kind {
            EventKind::State => {
                if flow.state != e.state || created {
                    flow.state = e.state;
                    flow.state_since = Some(e.ts);
                }
            }
            EventKind::RecvRst => flow.resets_recv += 1,
            EventKind::SendRst => flow.resets_sent += 1,
            EventKind::Retransmit => flow.retransmit_events += 1,
            EventKind::Error => flow.last_error = Some(e.err),
        }
        if let Some(h) = &e.pid_hint {
            flow.pid_hint = Some(h.clone());
        }
        created && flow.owner.is_none()
    }

    /// Merges a snapshot of one namespace. `owners` maps socket inode -> owner.
    pub fn apply_snapshot(&mut self, snap: &Snapshot, owners: &HashMap<u64, Arc<Owner>>) {
        let at = snap.finished;
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
            let mut created = false;
            let flow = self.flows.entry(s.cookie).or_insert_with(|| {
                created = true;
                Flow::new(s.cookie, snap.netns, s.local, s.remote, s.state, at)
            });
            if created {
                self.counters.opened += 1;
            }
            if flow.state != s.state {
                // Changed between snapshots without an event (poll mode, or a lost event).
                if flow.last_seen < snap.started {
                    flow.state = s.state;
                    flow.state_since = Some(at);
                }
            }
            flow.netns = snap.netns;
            flow.local = s.local;
            flow.remote = s.remote;
            if s.inode != 0 {
                flow.inode = s.inode;
            }
            flow.uid = s.uid;
            if s.tcp.is_some() {
                flow.tcp = s.tcp.clone();
                flow.tcp_at = at;
            }
            if let Some(o) = owners.get(&s.inode) {
                flow.owner = Some(o.clone());
            }
            flow.last_seen = flow.last_seen.max(at);
        }
        if let Some(min_idle) = snap.filtered_idle_ms {
            // Left out by the kernel: active within `min_idle` of the snapshot. Age the sample
            // no further than that, and keep the flow (its close will come as an event).
            let listed: HashSet<u64> = snap.socks.iter().map(|s| s.cookie).collect();
            let cap = min_idle.min(u64::from(u32::MAX)) as u32;
            for f in self.flows.values_mut().filter(|f| {
                f.netns == snap.netns && f.state == tcp_state::ESTABLISHED && !listed.contains(&f.cookie)
            }) {
                if let Some(t) = f.tcp.as_mut() {
                    let grown = ((at.saturating_sub(f.tcp_at)) / 1_000_000).min(u64::from(u32::MAX)) as u32;
                    t.last_data_sent_ms = t.last_data_sent_ms.saturating_add(grown).min(cap);
                    t.last_data_recv_ms = t.last_data_recv_ms.saturating_add(grown).min(cap);
                    t.last_ack_recv_ms = t.last_ack_recv_ms.saturating_add(grown).min(cap);
                    f.tcp_at = at;
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

    /// Drops a namespace that disappeared, with its flows (they closed with it).
    pub fn drop_netns(&mut self, netns: NetnsId, at: Nanos) -> usize {
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
        if self.flows.capacity() > 4 * self.flows.len() + 4096 {
            self.flows.shrink_to_fit();
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
mod tests {
    use super::*;
    use crate::model::flow::TableCounters;
    use crate::model::observe::{PidHint, SockSample, TcpSample};

    const S: Nanos = 1_000_000_000;

    fn ev(cookie: u64, state: u8, ts: Nanos) -> Event {
        Event {
            kind: EventKind::State,
            cookie,
            netns: 0,
            ts,
            old_state: 0,
            state,
            local: "10.0.0.1:4000".parse().unwrap(),
            remote: "10.0.0.2:22".parse().unwrap(),
            pid_hint: None,
            err: 0,
        }
    }

    fn sock(cookie: u64, state: u8, inode: u64) -> SockSample {
        SockSample {
            cookie,
            state,
            local: "10.0.0.1:4000".parse().unwrap(),
            remote: "10.0.0.2:22".parse().unwrap(),
            inode,
            uid: 0,
            tcp: Some(TcpSample {
                last_data_sent_ms: 500,
                last_data_recv_ms: 700,
                last_ack_recv_ms: 600,
                ..Default::default()
            }),
        }
    }

    fn snap(started: Nanos, finished: Nanos, socks: Vec<SockSample>) -> Snapshot {
        Snapshot {
            netns: 0,
            started,
            finished,
            socks,
            filtered_idle_ms: None,
        }
    }

    #[test]
    fn filtered_snapshots_keep_absent_flows_and_bound_their_idle() {
        let mut t = FlowTable::default();
        t.apply_snapshot(
            &snap(S, S, vec![sock(1, tcp_state::ESTABLISHED, 5)]),
            &HashMap::new(),
        );
        // 100 s later the kernel leaves flow 1 out: it was active within 2 s.
        let filtered = Snapshot {
            netns: 0,
            started: 101 * S,
            finished: 101 * S,
            socks: vec![],
            filtered_idle_ms: Some(2_000),
        };
        t.apply_snapshot(&filtered, &HashMap::new());
        let v = t.get(1).expect("kept").view(101 * S, None);
        assert_eq!(v.idle_ms, Some(2_000), "bounded by the filter, not 100 s");
    }

    #[test]
    fn events_open_and_close_flows() {
        let mut t = FlowTable::default();
        let mut e = ev(1, tcp_state::SYN_SENT, S);
        e.local.set_port(0);
        e.pid_hint = Some(PidHint {
            pid: 9,
            comm: "ssh".into(),
        });
        assert!(t.apply_event(&e));
        assert!(!t.apply_event(&ev(1, tcp_state::ESTABLISHED, 2 * S)));
        let f = t.get(1).unwrap();
        assert_eq!(f.state, tcp_state::ESTABLISHED);
        assert_eq!(f.local.port(), 4000, "the tuple is completed by later events");
        assert_eq!(f.state_since, Some(2 * S));
        assert_eq!(f.view(5 * S, None).pid, Some(9));
        t.apply_event(&ev(1, tcp_state::CLOSE, 3 * S));
        assert!(t.get(1).is_none());
        assert_eq!(
            t.counters,
            TableCounters {
                opened: 1,
                closed: 1,
                time_wait_now: 0,
                time_wait_total: 0,
            }
        );
    }

    #[test]
    fn snapshot_adds_preexisting_flows_with_unknown_state_age() {
        let mut t = FlowTable::default();
        let owners = HashMap::from([(
            50u64,
            std::sync::Arc::new(Owner {
                pid: 3,
                comm: "sshd".into(),
                cgroup: None,
                unit: None,
            }),
        )]);
        t.apply_snapshot(
            &snap(10 * S, 11 * S, vec![sock(7, tcp_state::ESTABLISHED, 50)]),
            &owners,
        );
        let v = t.get(7).unwrap().view(13 * S, None);
        assert_eq!(v.state_age_ms, None);
        assert_eq!(v.pid, Some(3));
        assert_eq!(
            v.last_data_sent_ms,
            Some(2500),
            "ages advance from the sample time"
        );
        assert_eq!(v.idle_ms, Some(2500));
    }

    #[test]
    fn snapshot_drops_flows_closed_unseen_but_not_newer_ones() {
        let mut t = FlowTable::default();
        t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
        t.apply_event(&ev(2, tcp_state::ESTABLISHED, 5 * S)); // born while the snapshot ran
        t.apply_snapshot(&snap(4 * S, 6 * S, vec![]), &HashMap::new());
        assert!(t.get(1).is_none(), "closed without an event (lost or poll mode)");
        assert!(t.get(2).is_some(), "newer than the snapshot's start");
    }

    #[test]
    fn stale_snapshot_cannot_resurrect_a_closed_flow() {
        let mut t = FlowTable::default();
        t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
        t.apply_event(&ev(1, tcp_state::CLOSE, 3 * S));
        t.apply_snapshot(
            &snap(2 * S, 4 * S, vec![sock(1, tcp_state::ESTABLISHED, 0)]),
            &HashMap::new(),
        );
        assert!(t.get(1).is_none());
        // Tombstones expire.
        t.apply_snapshot(&snap(100 * S, 100 * S, vec![]), &HashMap::new());
        assert!(t.tombstones.is_empty());
    }

    #[test]
    fn time_wait_is_counted_not_tracked() {
        let mut t = FlowTable::default();
        t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
        t.apply_event(&ev(1, tcp_state::TIME_WAIT, 2 * S));
        assert!(t.is_empty());
        t.apply_snapshot(
            &snap(3 * S, 3 * S, vec![sock(1, tcp_state::TIME_WAIT, 0)]),
            &HashMap::new(),
        );
        assert!(t.is_empty());
        assert_eq!((t.counters.time_wait_now, t.counters.time_wait_total), (1, 1));
    }

    #[test]
    fn poll_mode_state_changes_are_dated_by_the_snapshot() {
        let mut t = FlowTable::default();
        t.apply_snapshot(
            &snap(S, S, vec![sock(4, tcp_state::ESTABLISHED, 1)]),
            &HashMap::new(),
        );
        t.apply_snapshot(
            &snap(2 * S, 2 * S, vec![sock(4, tcp_state::CLOSE_WAIT, 1)]),
            &HashMap::new(),
        );
        let f = t.get(4).unwrap();
        assert_eq!(f.state, tcp_state::CLOSE_WAIT);
        assert_eq!(f.state_since, Some(2 * S));
    }

    #[test]
    fn resets_and_errors_are_counted() {
        let mut t = FlowTable::default();
        t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
        let mut r = ev(1, tcp_state::ESTABLISHED, 2 * S);
        r.kind = EventKind::RecvRst;
        t.apply_event(&r);
        r.kind = EventKind::Error;
        r.err = 104;
        t.apply_event(&r);
        let f = t.get(1).unwrap();
        assert_eq!((f.resets_recv, f.last_error), (1, Some(104)));
    }

    #[test]
    fn a_snapshot_of_one_namespace_never_drops_another_namespaces_flows() {
        let mut t = FlowTable::default();
        let mut a = ev(1, tcp_state::ESTABLISHED, S);
        a.netns = 10;
        let mut b = ev(2, tcp_state::ESTABLISHED, S);
        b.netns = 20;
        t.apply_event(&a);
        t.apply_event(&b);
        let mut s = snap(4 * S, 5 * S, vec![]);
        s.netns = 10;
        t.apply_snapshot(&s, &HashMap::new());
        assert!(t.get(1).is_none(), "closed unseen in its own namespace");
        assert!(t.get(2).is_some(), "another namespace's flow stays");
        assert_eq!(t.drop_netns(20, 6 * S), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn an_error_after_the_close_event_joins_the_closed_record() {
        let mut t = FlowTable::default();
        t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
        t.apply_event(&ev(1, tcp_state::CLOSE, 2 * S));
        let mut err = ev(1, tcp_state::CLOSE, 2 * S + 40_000);
        err.kind = EventKind::Error;
        err.err = 110;
        t.apply_event(&err);
        assert!(t.take_closed(2 * S + 1_000_000).is_empty(), "settling");
        let closed = t.take_closed(3 * S);
        assert_eq!(closed.len(), 1);
        assert_eq!(
            closed[0].0.last_error,
            Some(110),
            "ETIMEDOUT after the close is kept"
        );
    }

    #[test]
    fn tombstones_expire_and_storm_memory_comes_back() {
        let mut t = FlowTable::default();
        for c in 0..50_000u64 {
            t.apply_event(&ev(c, tcp_state::ESTABLISHED, S));
            t.apply_event(&ev(c, tcp_state::CLOSE, S));
        }
        assert_eq!(t.tombstones(), 50_000);
        t.take_closed(10 * S);
        assert!(t.maintain(100 * S), "shrinks after the storm");
        assert_eq!(t.tombstones(), 0);
        assert!(t.flows.capacity() < 8192 && t.tombstones.capacity() < 8192);
    }

    #[test]
    fn find_by_cookie_or_unique_local_address() {
        let mut t = FlowTable::default();
        t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
        assert_eq!(t.find("cookie:1").unwrap().cookie, 1);
        assert_eq!(t.find("1").unwrap().cookie, 1);
        assert_eq!(t.find("10.0.0.1:4000").unwrap().cookie, 1);
        let mut other = ev(2, tcp_state::ESTABLISHED, S);
        other.netns = 7;
        t.apply_event(&other);
        assert!(t.find("10.0.0.1:4000").unwrap_err().contains("2 flows"));
        assert!(t.find("nonsense").unwrap_err().contains("neither cookie:N"));
        assert!(
            t.find("cookie:99")
                .unwrap_err()
                .contains("no flow with cookie 99")
        );
    }
}
