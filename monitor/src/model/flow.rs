//! A TCP flow as holdfast tracks it (one per socket cookie), and its view for the CLI.
use std::net::SocketAddr;
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
    pub owner: Option<Arc<Owner>>,
    /// Boxed: only flows whose owner is not known yet have one.
    pub pid_hint: Option<Box<PidHint>>,
    pub tcp: Option<TcpSample>,
    /// When `tcp` was sampled.
    pub tcp_at: Nanos,
    pub resets_recv: u32,
    pub resets_sent: u32,
    pub retransmit_events: u32,
    pub last_error: Option<i32>,
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
            seen_idle_ms: 0,
            trouble_idle_ms: 0,
            sample_aged: false,
            last_error: None,
            wire: None,
            quiet_until: 0,
            quiet_read: true,
        }
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
            local: self.local,
            remote: self.remote,
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
            keepalive_idle_s: t.and_then(|t| t.keepalive_idle_s),
            keepalive_intvl_s: t.and_then(|t| t.keepalive_intvl_s),
            keepalive_cnt: t.and_then(|t| t.keepalive_cnt),
            resets_recv: self.resets_recv,
            resets_sent: self.resets_sent,
            retransmit_events: self.retransmit_events,
            last_error: self.last_error,
            sample_age_ms: t.map(|_| ms(now.saturating_sub(self.tcp_at))),
            risk: None,
            wire_probes: self.wire.as_ref().map(|w| w.view(now)),
        }
    }
}
