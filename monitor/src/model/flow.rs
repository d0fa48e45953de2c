//! A TCP flow as holdfast tracks it (one per socket cookie), and its view for the CLI.
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroI32;
use std::sync::Arc;

use monitor_common::tcp_state;
use serde::{Deserialize, Serialize};

use super::eviction::RiskView;
use super::observe::{NetnsId, Owner, PidHint, TcpSample, Timer, state_name};
use super::probe::{ProbeLog, ProbeView};
use super::time::{Nanos, ms};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub cookie: u64,
    /// The socket's network namespace (cookies are unique across namespaces; addresses are not).
    pub netns: NetnsId,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub state: u8,
    /// When the flow entered `state`; `Nanos::MAX` if that happened before holdfast saw it
    /// (8 bytes where an `Option` takes 16: `state_since()`).
    entered: Nanos,
    pub first_seen: Nanos,
    /// Last time an event or snapshot confirmed the flow.
    pub last_seen: Nanos,
    pub inode: u64,
    pub uid: u32,
    /// Shared by every flow of the process.
    pub owner: Option<Arc<Owner>>,
    /// Boxed: only flows whose owner is not known yet have one.
    pub pid_hint: Option<Box<PidHint>>,
    pub tcp: Option<TcpSample>,
    /// When `tcp` was sampled.
    pub tcp_at: Nanos,
    /// RSTs received and sent (saturating: a flow sees one or two).
    pub resets_recv: u16,
    pub resets_sent: u16,
    pub retransmit_events: u32,
    /// The errno of the last error report (`last_error()`; never 0).
    error: Option<NonZeroI32>,
    /// The idle (since the last ACK received) in the last real sample that showed the flow calm:
    /// when a later sample shows less, the path survived that idle (path learning).
    pub seen_idle_ms: u32,
    /// Set when the flow first retransmits after being calm: an upper bound of how long it had
    /// idled before the send that went unanswered (the idle since the last ACK at the first
    /// retransmit event less the minimum RTO, or at the first sample showing the retransmission).
    /// 0 while calm. Note: lsndtime (tcpi_last_data_sent) moves with every retransmission, so it
    /// cannot date the original send.
    pub trouble_idle_ms: u32,
    /// `tcp` was aged by a filtered read that left the flow out (its idle values are capped
    /// estimates, not the kernel's): not evidence for path learning.
    pub sample_aged: bool,
    /// Keepalive probes seen on the wire (watched sockets, eBPF mode); boxed: few flows have it.
    pub wire: Option<Box<ProbeLog>>,
    /// The eviction forecast found the flow calm and not at risk before this time (no
    /// middlebox, kept by keepalive, or idle short of the warn point); it is not assessed again
    /// before then. 0 whenever the flow changes (a new sample, an event), the policy or the
    /// namespaces change, or keepalive values are learnt.
    pub quiet_until: Nanos,
    /// The quiet judgement holds only while the flow stays as sampled: a read must confirm it
    /// before `quiet_until` (eBPF mode's filtered reads are skipped otherwise).
    pub quiet_read: bool,
}

/// A socket address as a flow keeps it: 20 bytes where a `SocketAddr` takes 32 (two per flow).
/// Nothing is lost: holdfast builds every address from an IP and a port (the kernel's socket
/// tables), never with an IPv6 flow label or scope id.
/// Ordered as `SocketAddr` is (IPv4 first, then address, then port).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    ip: IpAddr,
    port: u16,
}

impl Endpoint {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Endpoint {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

impl From<Endpoint> for SocketAddr {
    fn from(e: Endpoint) -> Self {
        e.addr()
    }
}

impl PartialEq<SocketAddr> for Endpoint {
    fn eq(&self, other: &SocketAddr) -> bool {
        self.ip == other.ip() && self.port == other.port()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.addr(), f)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.addr(), f)
    }
}

/// Counters of what the flow table has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCounters {
    /// Flows that appeared (connect, accept, or first seen in a snapshot).
    pub opened: u64,
    pub closed: u64,
    /// Sockets in TIME-WAIT at the last complete read (a gauge).
    pub time_wait_now: u64,
    /// Transitions into TIME-WAIT seen as kernel events (a counter; eBPF mode only).
    pub time_wait_total: u64,
}

/// A flow as the CLI sees it, with ages computed for `now`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FlowView {
    pub cookie: u64,
    /// The network namespace in words (`ip netns` name, container, or `net:[inode]`).
    #[serde(default)]
    pub netns: Option<String>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
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
    pub timer: Option<Timer>,
    pub timer_expires_ms: Option<i64>,
    pub keepalive_idle_s: Option<u32>,
    pub keepalive_intvl_s: Option<u32>,
    pub keepalive_cnt: Option<u32>,
    pub resets_recv: u32,
    pub resets_sent: u32,
    pub retransmit_events: u32,
    pub last_error: Option<i32>,
    /// How old the kernel values above are (ms since they were read).
    #[serde(default)]
    pub sample_age_ms: Option<u64>,
    /// Eviction risk, where a middlebox applies (filled in by the agent).
    #[serde(default)]
    pub risk: Option<RiskView>,
    /// Keepalive probes seen on the wire, for a socket holdfast watches (eBPF mode).
    #[serde(default)]
    pub wire_probes: Option<ProbeView>,
}

impl Flow {
    pub fn new(
        cookie: u64,
        netns: NetnsId,
        local: SocketAddr,
        remote: SocketAddr,
        state: u8,
        at: Nanos,
    ) -> Self {
        Flow {
            cookie,
            netns,
            local: local.into(),
            remote: remote.into(),
            state,
            entered: Nanos::MAX,
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
            seen_idle_ms: 0,
            trouble_idle_ms: 0,
            sample_aged: false,
            error: None,
            wire: None,
            quiet_until: 0,
            quiet_read: true,
        }
    }

    /// When the flow entered its state; None if before holdfast saw it.
    pub fn state_since(&self) -> Option<Nanos> {
        (self.entered != Nanos::MAX).then_some(self.entered)
    }

    pub fn set_state_since(&mut self, at: Nanos) {
        self.entered = at;
    }

    /// The errno of the last error the kernel reported on the socket (eBPF mode).
    pub fn last_error(&self) -> Option<i32> {
        self.error.map(NonZeroI32::get)
    }

    /// Records an error report (0, which no report carries, clears it).
    pub fn set_last_error(&mut self, errno: i32) {
        self.error = NonZeroI32::new(errno);
    }

    /// Milliseconds since the last data sent, data received and ACK received, aged to `now`
    /// (no allocation: the detectors call this for every flow).
    pub fn ages_ms(&self, now: Nanos) -> Option<(u64, u64, u64)> {
        let t = self.tcp.as_ref()?;
        let grown = ms(now.saturating_sub(self.tcp_at));
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

    /// The owning process (or the one seen at connect()/listen()).
    pub fn pid_comm(&self) -> Option<(u32, &str)> {
        match (&self.owner, &self.pid_hint) {
            (Some(o), _) => Some((o.pid, o.comm.as_str())),
            (None, Some(h)) => Some((h.pid, h.comm.as_str())),
            (None, None) => None,
        }
    }

    pub fn view(&self, now: Nanos, netns: Option<String>) -> FlowView {
        let t = self.tcp.as_ref();
        let aged = |v: u32| -> u64 { u64::from(v) + ms(now.saturating_sub(self.tcp_at)) };
        let (pid, comm) = match self.pid_comm() {
            Some((p, c)) => (Some(p), Some(c.to_string())),
            None => (None, None),
        };
        FlowView {
            cookie: self.cookie,
            netns,
            local: self.local.addr(),
            remote: self.remote.addr(),
            state: state_name(self.state).to_string(),
            state_age_ms: self.state_since().map(|s| ms(now.saturating_sub(s))),
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
            idle_ms: self.idle_ms(now),
            retransmits: t.map(|t| t.retransmits),
            total_retrans: t.map(|t| t.total_retrans),
            unacked: t.map(|t| t.unacked),
            probes: t.map(|t| t.probes),
            keepalive: t.and_then(|t| t.keepalive),
            timer: t.map(|t| t.timer),
            // The timer counted down since the sample (negative: it fired since; when the
            // sample is fresh, as `flows` asks by default, this is the kernel's value).
            timer_expires_ms: t
                .and_then(|t| t.timer_expires_ms)
                .map(|e| i64::from(e).saturating_sub(ms(now.saturating_sub(self.tcp_at)) as i64)),
            keepalive_idle_s: t.and_then(|t| t.keepalive_idle_s).map(u32::from),
            keepalive_intvl_s: t.and_then(|t| t.keepalive_intvl_s).map(u32::from),
            keepalive_cnt: t.and_then(|t| t.keepalive_cnt).map(u32::from),
            resets_recv: u32::from(self.resets_recv),
            resets_sent: u32::from(self.resets_sent),
            retransmit_events: self.retransmit_events,
            last_error: self.last_error(),
            sample_age_ms: t.map(|_| ms(now.saturating_sub(self.tcp_at))),
            risk: None,
            wire_probes: self.wire.as_ref().map(|w| w.view(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flow table holds one `Flow` per socket: its size is most of the agent's memory per
    /// flow (docs/bench.md, `B/flow`). Grows past this only on purpose.
    #[test]
    fn a_flow_stays_compact() {
        let size = std::mem::size_of::<Flow>();
        println!(
            "Flow: {size} bytes, TcpSample: {} bytes",
            std::mem::size_of::<TcpSample>()
        );
        assert!(size <= 200, "Flow is {size} bytes");
        assert_eq!(std::mem::size_of::<Endpoint>(), 20);
    }

    #[test]
    fn endpoints_order_and_print_as_socket_addresses() {
        let addrs: Vec<SocketAddr> = ["[::1]:80", "10.0.0.2:1", "10.0.0.1:9", "10.0.0.1:10"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let mut eps: Vec<Endpoint> = addrs.iter().map(|a| Endpoint::from(*a)).collect();
        let mut sorted = addrs.clone();
        sorted.sort();
        eps.sort();
        assert_eq!(eps.iter().map(Endpoint::addr).collect::<Vec<_>>(), sorted);
        for a in &addrs {
            assert_eq!(Endpoint::from(*a).to_string(), a.to_string());
            assert_eq!(Endpoint::from(*a), *a);
        }
    }
}
