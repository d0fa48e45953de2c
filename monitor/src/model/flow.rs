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
    /// The local and remote addresses, 16 bytes each (an IPv4 address in the first 4; which
    /// are IPv6 is in `bits`), and ports: 36 bytes where two `Endpoint`s took 40
    /// (`local()`, `remote()`).
    ips: [[u8; 16]; 2],
    ports: [u16; 2],
    pub state: u8,
    /// `BIT_*`: which address is IPv6, `sample_aged`, `quiet_read`.
    bits: u8,
    /// When the flow entered `state`; `Nanos::MAX` if that happened before holdfast saw it
    /// (8 bytes where an `Option` takes 16: `state_since()`).
    entered: Nanos,
    pub first_seen: Nanos,
    /// Last time an event or snapshot confirmed the flow.
    pub last_seen: Nanos,
    /// The socket's inode: the kernel's `get_next_ino()`, 32 bits (sock_diag's `idiag_inode`
    /// is 32 bits too); 0 if unknown (`inode()`).
    inode: u32,
    pub uid: u32,
    /// Shared by every flow of the process.
    pub owner: Option<Arc<Owner>>,
    pub tcp: Option<TcpSample>,
    /// When `tcp` was sampled.
    pub tcp_at: Nanos,
    /// The idle (since the last ACK received) in the last real sample that showed the flow calm:
    /// when a later sample shows less, the path survived that idle (path learning).
    pub seen_idle_ms: u32,
    /// What few flows have (a hint of the owner, probes on the wire, resets, retransmissions,
    /// an error): boxed, 8 bytes for a flow without any (`Rare`).
    rare: Option<Box<Rare>>,
    /// The eviction forecast found the flow calm and not at risk before this time (no
    /// middlebox, kept by keepalive, or idle short of the warn point); it is not assessed again
    /// before then. 0 whenever the flow changes (a new sample, an event), the policy or the
    /// namespaces change, or keepalive values are learnt.
    pub quiet_until: Nanos,
    /// How the session ledger counts it (`detect::ledger`).
    pub tally: Tally,
}

const BIT_LOCAL_V6: u8 = 1;
const BIT_REMOTE_V6: u8 = 2;
/// `tcp` was aged by a filtered read that left the flow out (its idle values are capped
/// estimates, not the kernel's): not evidence for path learning.
const BIT_SAMPLE_AGED: u8 = 4;
/// The quiet judgement holds only while the flow stays as sampled: a read must confirm it
/// before `quiet_until` (eBPF mode's filtered reads are skipped otherwise).
const BIT_QUIET_READ: u8 = 8;

fn ip_bytes(ip: IpAddr) -> ([u8; 16], bool) {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, false)
        }
        IpAddr::V6(a) => (a.octets(), true),
    }
}

fn ip_of(b: &[u8; 16], v6: bool) -> IpAddr {
    if v6 {
        IpAddr::from(*b)
    } else {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    }
}

/// How the session ledger counts a flow: the service it was counted as opened by, its service
/// now, and the process it is counted under. Kept on the flow (12 bytes, in what was padding
/// but for 8): a map beside the table cost about 33 bytes a flow at 200k flows, and its
/// per-round lookup cache 16 more (heaptrack, 200k sockets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tally {
    /// The service id plus one; 0: not counted.
    opened_as: u32,
    svc: u32,
    pid: u32,
}

impl Tally {
    pub const NONE: Tally = Tally {
        opened_as: 0,
        svc: 0,
        pid: 0,
    };

    /// Counted as opened by service `opened_as`, now of service `svc`, under process `pid`.
    /// Service ids up to `u32::MAX - 1`.
    pub fn counted(opened_as: u32, svc: u32, pid: u32) -> Self {
        Tally {
            opened_as: opened_as.saturating_add(1),
            svc,
            pid,
        }
    }

    /// (opened as, service now, pid), if counted.
    pub fn get(&self) -> Option<(u32, u32, u32)> {
        (self.opened_as != 0).then(|| (self.opened_as - 1, self.svc, self.pid))
    }

    /// The service it is counted under now, if counted.
    pub fn svc(&self) -> Option<u32> {
        self.get().map(|(_, s, _)| s)
    }
}

/// The part of a flow that few flows have: a flow keeps it boxed, and drops the box when
/// nothing in it is left (32 bytes a flow before, on every flow).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rare {
    /// Who called connect()/listen(), until the owner is known.
    pid_hint: Option<PidHint>,
    /// Keepalive probes seen on the wire (watched sockets, eBPF mode).
    wire: Option<ProbeLog>,
    /// The errno of the last error report (never 0).
    error: Option<NonZeroI32>,
    /// RSTs received and sent (saturating: a flow sees one or two).
    resets_recv: u16,
    resets_sent: u16,
    retransmit_events: u32,
    /// Set when the flow first retransmits after being calm: an upper bound of how long it had
    /// idled before the send that went unanswered (the idle since the last ACK at the first
    /// retransmit event less the minimum RTO, or at the first sample showing the retransmission).
    /// 0 while calm. Note: lsndtime (tcpi_last_data_sent) moves with every retransmission, so it
    /// cannot date the original send.
    trouble_idle_ms: u32,
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
        let mut f = Flow {
            cookie,
            netns,
            ips: [[0; 16]; 2],
            ports: [0; 2],
            state,
            bits: BIT_QUIET_READ,
            entered: Nanos::MAX,
            first_seen: at,
            last_seen: at,
            inode: 0,
            uid: 0,
            owner: None,
            tcp: None,
            tcp_at: 0,
            seen_idle_ms: 0,
            rare: None,
            quiet_until: 0,
            tally: Tally::NONE,
        };
        f.set_ends(local, remote);
        f
    }

    pub fn local(&self) -> Endpoint {
        Endpoint {
            ip: ip_of(&self.ips[0], self.bits & BIT_LOCAL_V6 != 0),
            port: self.ports[0],
        }
    }

    pub fn remote(&self) -> Endpoint {
        Endpoint {
            ip: ip_of(&self.ips[1], self.bits & BIT_REMOTE_V6 != 0),
            port: self.ports[1],
        }
    }

    pub fn set_ends(&mut self, local: SocketAddr, remote: SocketAddr) {
        self.set_local(local);
        self.set_remote(remote);
    }

    pub fn set_local(&mut self, a: SocketAddr) {
        let (ip, v6) = ip_bytes(a.ip());
        self.ips[0] = ip;
        self.ports[0] = a.port();
        self.set_bit(BIT_LOCAL_V6, v6);
    }

    pub fn set_remote(&mut self, a: SocketAddr) {
        let (ip, v6) = ip_bytes(a.ip());
        self.ips[1] = ip;
        self.ports[1] = a.port();
        self.set_bit(BIT_REMOTE_V6, v6);
    }

    fn set_bit(&mut self, bit: u8, on: bool) {
        if on {
            self.bits |= bit;
        } else {
            self.bits &= !bit;
        }
    }

    /// `tcp` was aged by a filtered read that left the flow out (its idle values are capped
    /// estimates, not the kernel's): not evidence for path learning.
    pub fn sample_aged(&self) -> bool {
        self.bits & BIT_SAMPLE_AGED != 0
    }

    pub fn set_sample_aged(&mut self, on: bool) {
        self.set_bit(BIT_SAMPLE_AGED, on);
    }

    /// The quiet judgement holds only while the flow stays as sampled: a read must confirm it
    /// before `quiet_until` (eBPF mode's filtered reads are skipped otherwise).
    pub fn quiet_read(&self) -> bool {
        self.bits & BIT_QUIET_READ != 0
    }

    pub fn set_quiet_read(&mut self, on: bool) {
        self.set_bit(BIT_QUIET_READ, on);
    }

    /// The socket's inode (0: unknown).
    pub fn inode(&self) -> u64 {
        u64::from(self.inode)
    }

    /// Keeps a socket inode; one past 32 bits (which the kernel does not make for sockets)
    /// is kept as unknown.
    pub fn set_inode(&mut self, inode: u64) {
        self.inode = u32::try_from(inode).unwrap_or(0);
    }

    /// When the flow entered its state; None if before holdfast saw it.
    pub fn state_since(&self) -> Option<Nanos> {
        (self.entered != Nanos::MAX).then_some(self.entered)
    }

    pub fn set_state_since(&mut self, at: Nanos) {
        self.entered = at;
    }

    /// The rare part, made on first use.
    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Drops the rare part when nothing is left in it.
    fn tidy(&mut self) {
        if self.rare.as_deref().is_some_and(|r| *r == Rare::default()) {
            self.rare = None;
        }
    }

    /// The errno of the last error the kernel reported on the socket (eBPF mode).
    pub fn last_error(&self) -> Option<i32> {
        self.rare.as_ref()?.error.map(NonZeroI32::get)
    }

    /// Records an error report (0, which no report carries, clears it).
    pub fn set_last_error(&mut self, errno: i32) {
        self.rare_mut().error = NonZeroI32::new(errno);
        self.tidy();
    }

    /// Who called connect()/listen() (kept until the owner is known).
    pub fn pid_hint(&self) -> Option<&PidHint> {
        self.rare.as_ref()?.pid_hint.as_ref()
    }

    pub fn set_pid_hint(&mut self, hint: Option<PidHint>) {
        if hint.is_some() || self.rare.is_some() {
            self.rare_mut().pid_hint = hint;
            self.tidy();
        }
    }

    /// Keepalive probes seen on the wire (watched sockets, eBPF mode).
    pub fn wire(&self) -> Option<&ProbeLog> {
        self.rare.as_ref()?.wire.as_ref()
    }

    /// The probe log, made on first use.
    pub fn wire_mut(&mut self) -> &mut ProbeLog {
        self.rare_mut().wire.get_or_insert_with(ProbeLog::default)
    }

    /// RSTs received (saturating).
    pub fn resets_recv(&self) -> u16 {
        self.rare.as_ref().map_or(0, |r| r.resets_recv)
    }

    pub fn resets_sent(&self) -> u16 {
        self.rare.as_ref().map_or(0, |r| r.resets_sent)
    }

    pub fn count_reset_recv(&mut self) {
        let r = self.rare_mut();
        r.resets_recv = r.resets_recv.saturating_add(1);
    }

    pub fn count_reset_sent(&mut self) {
        let r = self.rare_mut();
        r.resets_sent = r.resets_sent.saturating_add(1);
    }

    /// Retransmission events seen (eBPF mode).
    pub fn retransmit_events(&self) -> u32 {
        self.rare.as_ref().map_or(0, |r| r.retransmit_events)
    }

    pub fn count_retransmit(&mut self) {
        let r = self.rare_mut();
        r.retransmit_events = r.retransmit_events.saturating_add(1);
    }

    /// How long the flow had idled before the send that went unanswered (`Rare`); 0 while calm.
    pub fn trouble_idle_ms(&self) -> u32 {
        self.rare.as_ref().map_or(0, |r| r.trouble_idle_ms)
    }

    pub fn set_trouble_idle_ms(&mut self, idle_ms: u32) {
        if idle_ms != 0 || self.rare.is_some() {
            self.rare_mut().trouble_idle_ms = idle_ms;
            self.tidy();
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
        match (&self.owner, self.pid_hint()) {
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
            local: self.local().addr(),
            remote: self.remote().addr(),
            state: state_name(self.state).to_string(),
            state_age_ms: self.state_since().map(|s| ms(now.saturating_sub(s))),
            seen_for_ms: ms(now.saturating_sub(self.first_seen)),
            pid,
            comm,
            unit: self.owner.as_ref().and_then(|o| o.unit.clone()),
            cgroup: self.owner.as_ref().and_then(|o| o.cgroup.clone()),
            uid: self.uid,
            inode: self.inode(),
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
                .and_then(TcpSample::timer_expires)
                .map(|e| i64::from(e).saturating_sub(ms(now.saturating_sub(self.tcp_at)) as i64)),
            keepalive_idle_s: t.and_then(|t| t.keepalive_idle_s).map(|s| u32::from(s.get())),
            keepalive_intvl_s: t.and_then(|t| t.keepalive_intvl_s).map(|s| u32::from(s.get())),
            keepalive_cnt: t.and_then(|t| t.keepalive_cnt).map(|n| u32::from(n.get())),
            resets_recv: u32::from(self.resets_recv()),
            resets_sent: u32::from(self.resets_sent()),
            retransmit_events: self.retransmit_events(),
            last_error: self.last_error(),
            sample_age_ms: t.map(|_| ms(now.saturating_sub(self.tcp_at))),
            risk: None,
            wire_probes: self.wire().map(|w| w.view(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flow table holds one `Flow` per socket: its size is most of the agent's memory per
    /// flow (docs/bench.md, `B/flow`). Grows past this only on purpose (200 bytes before the rare
    /// fields went into `Rare` and the sample's options into niches; 168 still with the
    /// ledger's `Tally`, moved in from a map of its own that cost 33 bytes a flow, by keeping
    /// addresses in 36 bytes, the inode in 4 and the flags in one byte).
    #[test]
    fn a_flow_stays_compact() {
        let size = std::mem::size_of::<Flow>();
        println!(
            "Flow: {size} bytes, TcpSample: {} bytes",
            std::mem::size_of::<TcpSample>()
        );
        assert!(size <= 168, "Flow is {size} bytes");
        assert_eq!(std::mem::size_of::<Tally>(), 12);
        assert_eq!(std::mem::size_of::<Option<TcpSample>>(), 36);
        assert_eq!(std::mem::size_of::<Endpoint>(), 20);
    }

    /// Addresses, inode and flags packed into the flow come back as they went in.
    #[test]
    fn a_packed_flow_gives_back_its_addresses_inode_and_flags() {
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let v4: SocketAddr = "10.1.2.3:5060".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        let mut f = Flow::new(1, 0, v4, v6, 1, 0);
        assert_eq!((f.local().addr(), f.remote().addr()), (v4, v6));
        f.set_ends(v6, mapped);
        assert_eq!((f.local().addr(), f.remote().addr()), (v6, mapped));
        f.set_local(v4);
        assert_eq!((f.local().addr(), f.remote().addr()), (v4, mapped));
        assert!(f.quiet_read() && !f.sample_aged(), "a new flow");
        f.set_sample_aged(true);
        f.set_quiet_read(false);
        assert!(!f.quiet_read() && f.sample_aged());
        assert_eq!((f.local().addr(), f.remote().addr()), (v4, mapped), "flags apart");
        f.set_inode(4_000_000_000);
        assert_eq!(f.inode(), 4_000_000_000);
        f.set_inode(u64::from(u32::MAX) + 1);
        assert_eq!(f.inode(), 0, "past 32 bits: unknown");
    }

    /// The rare part exists only while something is in it: a flow whose owner hint was
    /// replaced by its owner carries no box.
    #[test]
    fn the_rare_part_comes_and_goes_with_its_contents() {
        let mut f = Flow::new(
            1,
            0,
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
            1,
            0,
        );
        assert!(f.rare.is_none());
        f.set_pid_hint(None);
        f.set_trouble_idle_ms(0);
        assert!(f.rare.is_none(), "clearing what is not there makes nothing");
        f.set_pid_hint(Some(PidHint {
            pid: 7,
            comm: "sshd".into(),
        }));
        f.set_trouble_idle_ms(1500);
        assert_eq!(f.pid_comm(), Some((7, "sshd")));
        assert_eq!(f.trouble_idle_ms(), 1500);
        f.set_pid_hint(None);
        assert!(f.rare.is_some(), "the trouble mark is still in it");
        f.set_trouble_idle_ms(0);
        assert!(f.rare.is_none());
        f.count_reset_recv();
        f.set_last_error(104);
        f.wire_mut().on_sent(5, 1);
        f.set_last_error(0);
        assert_eq!(
            (f.resets_recv(), f.last_error(), f.wire().map(|w| w.sent)),
            (1, None, Some(1))
        );
        for _ in 0..70_000 {
            f.count_reset_sent();
        }
        assert_eq!(f.resets_sent(), u16::MAX, "saturates");
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
