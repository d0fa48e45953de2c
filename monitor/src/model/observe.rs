//! What the agent learns from the kernel, independent of where it came from (eBPF or poll).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU16;

use serde::{Deserialize, Serialize};

pub use super::time::Nanos;

/// A network namespace: the inode number of its nsfs file (`net:[4026531840]`), as the kernel's
/// `net->ns.inum` holds it. 0 means "not known".
pub type NetnsId = u32;

/// What kind of kernel event this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    State,
    RecvRst,
    SendRst,
    Error,
    Retransmit,
    /// A keepalive probe left a watched socket; `count` is its number, `err` the probes already
    /// outstanding (icsk_probes_out) when it left.
    ProbeSent,
    /// A segment answered the outstanding probe of a watched socket; `count` is the number of
    /// answered probes, `err` the time since the probe left, in microseconds.
    ProbeAnswered,
}

/// A process seen as current when an event happened in process context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidHint {
    pub pid: u32,
    pub comm: String,
}

/// One kernel event about one socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub cookie: u64,
    /// The socket's network namespace.
    pub netns: NetnsId,
    pub ts: Nanos,
    pub old_state: u8,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Set only where the event is known to run in the owner's process context.
    pub pid_hint: Option<PidHint>,
    pub err: i32,
    /// A process still held a descriptor to the socket at the event.
    pub had_file: bool,
    /// Probe events: see [`EventKind::ProbeSent`] and [`EventKind::ProbeAnswered`].
    pub count: u32,
}

/// Which timer the kernel has armed on a socket (inet_diag `idiag_timer` semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Timer {
    #[default]
    None,
    Retransmit,
    /// sk_timer: keepalive in ESTABLISHED, FIN_WAIT2 timeout otherwise.
    Keepalive,
    TimeWait,
    ZeroWindowProbe,
}

impl Timer {
    pub fn as_str(self) -> &'static str {
        match self {
            Timer::None => "none",
            Timer::Retransmit => "retransmit",
            Timer::Keepalive => "keepalive",
            Timer::TimeWait => "time-wait",
            Timer::ZeroWindowProbe => "zero-window-probe",
        }
    }

    pub fn from_diag(code: u8) -> Self {
        match code {
            1 => Timer::Retransmit,
            2 => Timer::Keepalive,
            3 => Timer::TimeWait,
            4 => Timer::ZeroWindowProbe,
            _ => Timer::None,
        }
    }
}

/// TCP internals of a full socket at the time of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize)]
pub struct TcpSample {
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    /// Consecutive unanswered retransmits of the head segment (icsk_retransmits).
    pub retransmits: u8,
    /// Unanswered keepalive / zero-window probes (icsk_probes_out).
    pub probes: u8,
    pub backoff: u8,
    pub unacked: u32,
    pub total_retrans: u32,
    pub timer: Timer,
    /// Milliseconds until `timer` fires (negative: overdue), within ±24 days (`expires_ms`);
    /// 0 and meaningless without a timer (`timer_expires()`). 32 bits and no `Option` (which
    /// would take 8): a sample is kept per flow.
    pub timer_expires_ms: i32,
    /// SO_KEEPALIVE: `Some` where the source knows it (eBPF), else inferred from the timer.
    pub keepalive: Option<bool>,
    /// Per-socket TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT where set on the socket (eBPF only).
    /// 16 bits: the kernel takes at most 32767 s, 32767 s and 127 (MAX_TCP_KEEPIDLE,
    /// MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT in include/net/tcp.h), and at least 1 (0 is "not set
    /// on the socket"): 2 bytes each where an `Option<u16>` takes 4, a sample is kept per flow.
    pub keepalive_idle_s: Option<NonZeroU16>,
    pub keepalive_intvl_s: Option<NonZeroU16>,
    pub keepalive_cnt: Option<NonZeroU16>,
}

impl TcpSample {
    /// Milliseconds until the timer fires, if one is pending.
    pub fn timer_expires(&self) -> Option<i32> {
        (self.timer != Timer::None).then_some(self.timer_expires_ms)
    }

    /// A timer's distance in ms as kept in a sample (clamped to ±24 days; no TCP timer is
    /// that far: TCP_KEEPIDLE is at most 32767 s).
    pub fn expires_ms(ms: i64) -> i32 {
        i32::try_from(ms).unwrap_or(if ms < 0 { i32::MIN } else { i32::MAX })
    }
}

/// One socket from a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockSample {
    pub cookie: u64,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Inode of the socket file; 0 if none (TIME_WAIT, not yet accepted, orphaned).
    pub inode: u64,
    pub uid: u32,
    pub tcp: Option<TcpSample>,
}

/// A whole TCP table of one network namespace at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The namespace whose table this is.
    pub netns: NetnsId,
    pub started: Nanos,
    pub finished: Nanos,
    pub socks: Vec<SockSample>,
    /// Which sockets the read reports.
    pub coverage: Coverage,
    /// TIME_WAIT sockets in the namespace (left out of `socks`; counted from sockstat).
    pub time_wait: Option<u64>,
}

impl Snapshot {
    /// A read of namespace `netns` (its TIME_WAIT count not known yet).
    pub fn taken(
        netns: NetnsId,
        (started, finished): (Nanos, Nanos),
        socks: Vec<SockSample>,
        coverage: Coverage,
    ) -> Self {
        Snapshot {
            netns,
            started,
            finished,
            socks,
            coverage,
            time_wait: None,
        }
    }
}

/// Which sockets of its namespace a [`Snapshot`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Coverage {
    /// Every socket (but TIME_WAIT and request sockets): a socket not listed is gone.
    #[default]
    Complete,
    /// Only sockets worth a look: every socket the kernel left out was ESTABLISHED and active
    /// within `idle_ms` milliseconds, or has not moved since it was last reported (and is not
    /// gone: closes come as events).
    Filtered { idle_ms: u64 },
    /// Only the sockets a query named (fresh values for `flows`): says nothing of the others; a
    /// named socket not listed is gone or no longer in the table.
    Targeted,
}

impl Coverage {
    pub fn filtered(idle_ms: Option<u64>) -> Self {
        idle_ms.map_or(Coverage::Complete, |idle_ms| Coverage::Filtered { idle_ms })
    }
}

/// A descriptor a process holds to a TCP socket that is in no TCP table any more: state CLOSE
/// after a reset, an abort or SOCK_DESTROY, but once connected (lsof: "can't identify
/// protocol"; ss does not show it). The session's slot is still taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeadFd {
    pub pid: u32,
    pub fd: u32,
    pub inode: u64,
    /// Local and remote port while it was connected (0 if unknown).
    pub sport: u16,
    pub dport: u16,
}

/// The owner of a socket: the process holding its file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    /// cgroup v2 path of the process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// systemd unit (the last `.service` or `.scope` of the cgroup path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// Builds a socket address from a 16-byte kernel address (IPv4 in the first 4 bytes).
pub fn sockaddr(ipver: u8, addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if ipver == 4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        let v6 = Ipv6Addr::from(*addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    };
    SocketAddr::new(ip, port)
}

/// TCP state name as `ss` prints it.
pub fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTAB",
        2 => "SYN-SENT",
        3 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        7 => "CLOSE",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW-SYN-RECV",
        _ => "UNKNOWN",
    }
}

/// Parses a state name (as printed, case-insensitive, `-` or `_`) back to the kernel value.
pub fn parse_state(s: &str) -> Option<u8> {
    let norm = s.to_ascii_uppercase().replace('_', "-");
    let norm = if norm == "ESTABLISHED" {
        "ESTAB".to_string()
    } else {
        norm
    };
    (1..=12).find(|&v| state_name(v) == norm)
}

/// What happened to a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcEventKind {
    /// The whole thread group exited: a zombie until its parent reaps it.
    Exit,
    /// The thread-group leader was freed: reaped.
    Free,
}

/// One process lifecycle event from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcEvent {
    pub kind: ProcEventKind,
    pub pid: u32,
    pub ppid: u32,
    pub exit_code: i32,
    pub ts: Nanos,
    pub comm: String,
}

/// Whether `want` (from a rule or `flows --netns`) names the namespace called `name` with id
/// `id`: the whole name, the part after a `kind:` prefix, `net:[inode]`, or the bare inode.
pub fn netns_matches(name: &str, id: NetnsId, want: &str) -> bool {
    name == want
        || name.split_once(':').is_some_and(|(_, n)| n == want)
        || want == format!("net:[{id}]")
        || want == id.to_string()
}
