//! The flow table: one entry per TCP socket cookie, merged from events and snapshots.
//!
//! Events are immediate but can be lost; snapshots are complete but periodic. A snapshot heals the
//! table (adds what events missed, drops what closed unseen) without undoing newer events: a flow
//! is dropped only if it was last confirmed before the snapshot started, and a closed cookie is
//! remembered (tombstone) so that a snapshot taken before the close cannot resurrect it.
use std::collections::HashMap;
use std::net::SocketAddr;

use monitor_common::tcp_state;
use serde::Serialize;

use crate::observe::{Event, EventKind, Nanos, Owner, PidHint, Snapshot, TcpSample, state_name};

/// How long a closed cookie is remembered. Longer than any snapshot can take.
const TOMBSTONE_NS: Nanos = 60_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    /// When the flow entered `state`; None if that happened before holdfast saw it.
    pub state_since: Option<Nanos>,
    pub first_seen: Nanos,
    /// Last time an event or snapshot confirmed the flow.
    pub last_seen: Nanos,
    pub inode: u64,
    pub uid: u32,
    /// Shared by every flow of the process.
    pub owner: Option<std::sync::Arc<Owner>>,
    pub pid_hint: Option<PidHint>,
    pub tcp: Option<TcpSample>,
    /// When `tcp` was sampled.
    pub tcp_at: Nanos,
    pub resets_recv: u32,
    pub resets_sent: u32,
    pub retransmit_events: u32,
    pub last_error: Option<i32>,
}

/// Counters of what the table has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TableCounters {
    pub opened: u64,
    pub closed: u64,
    pub time_wait: u64,
}

#[derive(Default)]
pub struct FlowTable {
    flows: HashMap<u64, Flow>,
    tombstones: HashMap<u64, Nanos>,
    /// Flows closed since the detectors last looked (for post-mortems), bounded.
    closed: std::collections::VecDeque<(Flow, Nanos)>,
    pub counters: TableCounters,
}

/// Closed flows kept for the detectors between two evaluations.
const CLOSED_KEEP: usize = 4096;

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

    fn close(&mut self, cookie: u64, at: Nanos) {
        if let Some(f) = self.flows.remove(&cookie) {
            self.counters.closed += 1;
            if self.closed.len() >= CLOSED_KEEP {
                self.closed.pop_front();
            }
            self.closed.push_back((f, at));
        }
        self.tombstones.insert(cookie, at);
    }

    /// Flows closed since the last call, with their close time.
    pub fn take_closed(&mut self) -> Vec<(Flow, Nanos)> {
        self.closed.drain(..).collect()
    }

    /// Finds a flow by `cookie:N`, a bare cookie, or its local address (`10.0.0.1:5000`).
    pub fn find(&self, spec: &str) -> Option<&Flow> {
        let spec = spec.trim();
        if let Some(c) = spec.strip_prefix("cookie:").and_then(|c| c.parse::<u64>().ok()) {
            return self.flows.get(&c);
        }
        if let Ok(addr) = spec.parse::<SocketAddr>() {
            let mut m = self
                .flows
                .values()
                .filter(|f| f.local == addr && f.state != tcp_state::LISTEN);
            let first = m.next()?;
            return m.next().is_none().then_some(first);
        }
        None
    }

    fn new_flow(e_cookie: u64, local: SocketAddr, remote: SocketAddr, state: u8, at: Nanos) -> Flow {
        Flow {
            cookie: e_cookie,
            local,
            remote,
            state,
            state_since: None,
            first_seen: at,
            last_seen: at,
            inode: 0,
            uid: 0,
            owner: None,
            pid_hint: None,
            tcp: None,
            tcp_at: 0,
            resets_recv: 0,
            resets_sent: 0,
            retransmit_events: 0,
            last_error: None,
        }
    }

    /// Applies one kernel event. Returns true if it created a flow whose owner is unknown.
    pub fn apply_event(&mut self, e: &Event) -> bool {
        if self.tombstones.contains_key(&e.cookie) {
            return false;
        }
        if e.kind == EventKind::State && !tracked(e.state) {
            if e.state == tcp_state::TIME_WAIT {
                self.counters.time_wait += 1;
            }
            self.close(e.cookie, e.ts);
            return false;
        }
        let mut created = false;
        let flow = self.flows.entry(e.cookie).or_insert_with(|| {
            created = true;
            Self::new_flow(e.cookie, e.local, e.remote, e.state, e.ts)
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

    /// Merges a complete snapshot. `owners` maps socket inode -> owner.
    pub fn apply_snapshot(&mut self, snap: &Snapshot, owners: &HashMap<u64, std::sync::Arc<Owner>>) {
        let at = snap.finished;
        let mut time_wait = 0;
        for s in &snap.socks {
            if !tracked(s.state) {
                time_wait += u64::from(s.state == tcp_state::TIME_WAIT);
                continue;
            }
            if self.tombstones.contains_key(&s.cookie) {
                continue;
            }
            let flow = self
                .flows
                .entry(s.cookie)
                .or_insert_with(|| Self::new_flow(s.cookie, s.local, s.remote, s.state, at));
            if flow.state != s.state {
                // Changed between snapshots without an event (poll mode, or a lost event).
                if flow.last_seen < snap.started {
                    flow.state = s.state;
                    flow.state_since = Some(at);
                }
            }
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
            let listed: std::collections::HashSet<u64> = snap.socks.iter().map(|s| s.cookie).collect();
            let cap = min_idle.min(u64::from(u32::MAX)) as u32;
            for f in self
                .flows
                .values_mut()
                .filter(|f| f.state == tcp_state::ESTABLISHED && !listed.contains(&f.cookie))
            {
                if let Some(t) = f.tcp.as_mut() {
                    let grown = ((at.saturating_sub(f.tcp_at)) / 1_000_000).min(u64::from(u32::MAX)) as u32;
                    t.last_data_sent_ms = t.last_data_sent_ms.saturating_add(grown).min(cap);
                    t.last_data_recv_ms = t.last_data_recv_ms.saturating_add(grown).min(cap);
                    t.last_ack_recv_ms = t.last_ack_recv_ms.saturating_add(grown).min(cap);
                    f.tcp_at = at;
                }
                f.last_seen = f.last_seen.max(at);
            }
            self.tombstones
                .retain(|_, t| at.saturating_sub(*t) < TOMBSTONE_NS);
            return;
        }
        let gone: Vec<u64> = self
            .flows
            .values()
            .filter(|f| f.last_seen < snap.started)
            .map(|f| f.cookie)
            .collect();
        for c in gone {
            self.close(c, at);
        }
        self.counters.time_wait = time_wait;
        self.tombstones
            .retain(|_, t| at.saturating_sub(*t) < TOMBSTONE_NS);
    }
}

/// A flow as the CLI sees it, with ages computed for `now`.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct FlowView {
    pub cookie: u64,
    pub local: String,
    pub remote: String,
    pub state: String,
    /// Milliseconds in this state; null if it entered it before holdfast saw it.
    pub state_age_ms: Option<u64>,
    pub seen_for_ms: u64,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub unit: Option<String>,
    pub cgroup: Option<String>,
    pub uid: u32,
    pub inode: u64,
    pub last_data_sent_ms: Option<u64>,
    pub last_data_recv_ms: Option<u64>,
    pub last_ack_recv_ms: Option<u64>,
    /// Time since the last packet either way.
    pub idle_ms: Option<u64>,
    pub retransmits: Option<u8>,
    pub total_retrans: Option<u32>,
    pub unacked: Option<u32>,
    pub probes: Option<u8>,
    pub keepalive: Option<bool>,
    pub timer: Option<String>,
    pub timer_expires_ms: Option<i64>,
    pub keepalive_idle_s: Option<u32>,
    pub keepalive_intvl_s: Option<u32>,
    pub keepalive_cnt: Option<u32>,
    pub resets_recv: u32,
    pub resets_sent: u32,
    pub retransmit_events: u32,
    pub last_error: Option<i32>,
    /// Eviction risk, where a middlebox applies (filled in by the agent).
    #[serde(default)]
    pub risk: Option<RiskView>,
}

/// A flow's eviction forecast.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct RiskView {
    pub profile: String,
    pub timeout_s: u64,
    pub verdict: String,
    /// Milliseconds until the middlebox forgets the flow (negative: overdue); null if keepalive
    /// refreshes it in time.
    pub eta_ms: Option<i64>,
}

impl Flow {
    /// Milliseconds since the last data sent, data received and ACK received, aged to `now`
    /// (no allocation: the detectors call this for every flow).
    pub fn ages_ms(&self, now: Nanos) -> Option<(u64, u64, u64)> {
        let t = self.tcp.as_ref()?;
        let grown = now.saturating_sub(self.tcp_at) / 1_000_000;
        Some((
            u64::from(t.last_data_sent_ms) + grown,
            u64::from(t.last_data_recv_ms) + grown,
            u64::from(t.last_ack_recv_ms) + grown,
        ))
    }

    /// Time since the last packet either way; None for listeners and flows without a sample.
    pub fn idle_ms(&self, now: Nanos) -> Option<u64> {
        if self.state == tcp_state::LISTEN {
            return None;
        }
        self.ages_ms(now).map(|(s, r, a)| s.min(r).min(a))
    }

    pub fn view(&self, now: Nanos) -> FlowView {
        let ms = |ns: u64| ns / 1_000_000;
        let aged = |v: u32| -> u64 { u64::from(v) + ms(now.saturating_sub(self.tcp_at)) };
        let t = self.tcp.as_ref();
        let (pid, comm) = match (&self.owner, &self.pid_hint) {
            (Some(o), _) => (Some(o.pid), Some(o.comm.clone())),
            (None, Some(h)) => (Some(h.pid), Some(h.comm.clone())),
            (None, None) => (None, None),
        };
        let idle = t.map(|t| {
            aged(
                t.last_data_sent_ms
                    .min(t.last_data_recv_ms)
                    .min(t.last_ack_recv_ms),
            )
        });
        FlowView {
            cookie: self.cookie,
            local: self.local.to_string(),
            remote: self.remote.to_string(),
            state: state_name(self.state).to_string(),
            state_age_ms: self.state_since.map(|s| ms(now.saturating_sub(s))),
            seen_for_ms: ms(now.saturating_sub(self.first_seen)),
            pid,
            comm,
            unit: self.owner.as_ref().and_then(|o| o.unit.clone()),
            cgroup: self.owner.as_ref().and_then(|o| o.cgroup.clone()),
            uid: self.uid,
            inode: self.inode,
            last_data_sent_ms: t.map(|t| aged(t.last_data_sent_ms)),
            last_data_recv_ms: t.map(|t| aged(t.last_data_recv_ms)),
            last_ack_recv_ms: t.map(|t| aged(t.last_ack_recv_ms)),
            idle_ms: if self.state == tcp_state::LISTEN {
                None
            } else {
                idle
            },
            retransmits: t.map(|t| t.retransmits),
            total_retrans: t.map(|t| t.total_retrans),
            unacked: t.map(|t| t.unacked),
            probes: t.map(|t| t.probes),
            keepalive: t.and_then(|t| t.keepalive),
            timer: t.map(|t| {
                serde_json::to_value(t.timer)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            }),
            timer_expires_ms: t.and_then(|t| t.timer_expires_ms),
            keepalive_idle_s: t.and_then(|t| t.keepalive_idle_s),
            keepalive_intvl_s: t.and_then(|t| t.keepalive_intvl_s),
            keepalive_cnt: t.and_then(|t| t.keepalive_cnt),
            resets_recv: self.resets_recv,
            resets_sent: self.resets_sent,
            retransmit_events: self.retransmit_events,
            last_error: self.last_error,
            risk: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::SockSample;

    const S: Nanos = 1_000_000_000;

    fn ev(cookie: u64, state: u8, ts: Nanos) -> Event {
        Event {
            kind: EventKind::State,
            cookie,
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
            started: 101 * S,
            finished: 101 * S,
            socks: vec![],
            filtered_idle_ms: Some(2_000),
        };
        t.apply_snapshot(&filtered, &HashMap::new());
        let v = t.get(1).expect("kept").view(101 * S);
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
        assert_eq!(f.view(5 * S).pid, Some(9));
        t.apply_event(&ev(1, tcp_state::CLOSE, 3 * S));
        assert!(t.get(1).is_none());
        assert_eq!(
            t.counters,
            TableCounters {
                opened: 1,
                closed: 1,
                time_wait: 0
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
        let v = t.get(7).unwrap().view(13 * S);
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
        assert_eq!(t.counters.time_wait, 1);
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
}
