//! The kernel<->user ABI of holdfast: records the eBPF programs emit and the offsets they are given.
//!
//! Everything here is `#[repr(C)]`, plain old data, and checked by const size/offset asserts so
//! that the eBPF crate and the agent can never disagree silently.
#![no_std]

use core::mem::{offset_of, size_of};

/// Kind of an [`EventRecord`].
pub mod kind {
    /// `sock:inet_sock_set_state` (TCP only).
    pub const STATE: u8 = 1;
    /// `tcp:tcp_receive_reset`: the peer sent RST.
    pub const RECV_RST: u8 = 2;
    /// `tcp:tcp_send_reset`: this host sent RST.
    pub const SEND_RST: u8 = 3;
    /// `sock:inet_sk_error_report`: an error was reported to the socket owner (`err` is set).
    pub const ERROR_REPORT: u8 = 4;
    /// `tcp:tcp_retransmit_skb`.
    pub const RETRANSMIT: u8 = 5;
    /// A keepalive probe left a watched socket (sock_ops, from the keepalive timer). `err` holds
    /// icsk_probes_out before it (0: the first of a series; more: earlier probes unanswered),
    /// `pid` the socket's probe count so far.
    pub const PROBE_SENT: u8 = 6;
    /// A segment arrived on a watched socket with a probe outstanding (`tcp:tcp_probe`): the peer
    /// answered. `err` holds the time since the probe left, in microseconds; `pid` the count of
    /// answered probes.
    pub const PROBE_ANSWERED: u8 = 7;
    /// Highest valid kind.
    pub const MAX: u8 = 7;
}

/// Indexes of the per-CPU counter array `STATS` (one slot per program and counter).
pub mod stat {
    /// Records submitted to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Records lost because the ring buffer was full (per program: `LOST_BASE + program`).
    pub const LOST_BASE: u32 = 1;
    /// Records not produced because a kernel read failed (per program: `ERR_BASE + program`).
    pub const ERR_BASE: u32 = 8;
    /// Sockets visited by the tcp iterator.
    pub const ITER_SOCKETS: u32 = 15;
    /// Iterator records that did not fit the seq_file (the kernel retries them).
    pub const ITER_OVERFLOW: u32 = 16;
    /// Process records lost because the PROCS ring buffer was full.
    pub const PROC_LOST: u32 = 17;
    /// Process records submitted.
    pub const PROC_EVENTS: u32 = 18;
    /// Connections given keepalive by the sock_ops program.
    pub const SOCKOPS_APPLIED: u32 = 19;
    /// sock_ops bpf_setsockopt failures.
    pub const SOCKOPS_FAILED: u32 = 20;
    /// Sockets the filtered snapshot skipped (active, nothing to look at).
    pub const ITER_SKIPPED: u32 = 21;
    /// Keepalive probes seen leaving watched sockets.
    pub const PROBE_SENT: u32 = 22;
    /// Probes seen answered.
    pub const PROBE_ANSWERED: u32 = 23;
    /// Probe-watch callbacks of flagged sockets this loader does not watch.
    pub const PROBE_STRAY: u32 = 24;
    /// Runs of the probe-watch sock_ops program (every callback of a watched socket).
    pub const PROBE_CALLBACKS: u32 = 25;
    /// Number of slots.
    pub const COUNT: u32 = 26;
    /// Program index for the counters, in the order of [`crate::kind`] minus one.
    pub const PROGRAMS: [&str; 5] = [
        "inet_sock_set_state",
        "tcp_receive_reset",
        "tcp_send_reset",
        "inet_sk_error_report",
        "tcp_retransmit_skb",
    ];
    /// The probe programs' indexes for the lost/error counters (after [`PROGRAMS`]).
    pub const PROBE_PROGRAMS: [&str; 2] = ["probe_watch", "probe_answer"];
}

/// Address family values as the kernel uses them.
pub const AF_INET: u16 = 2;
/// Address family values as the kernel uses them.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;

/// One kernel event about one socket, keyed by its cookie. 88 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// One of [`kind`].
    pub kind: u8,
    /// 4 or 6 (IP version), 0 if unknown.
    pub ipver: u8,
    /// Old TCP state (STATE events), else the current state.
    pub old_state: u8,
    /// New TCP state (STATE events), else the current state.
    pub new_state: u8,
    /// tgid of the task that was current, only for the transitions that run in the owner's
    /// system call (-> SYN_SENT in connect(), -> LISTEN in listen()); 0 for every other record
    /// (probe records carry a count here instead).
    pub pid: u32,
    /// Socket cookie (same value as sock_diag's idiag_cookie and the iterator's).
    pub cookie: u64,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) at the event.
    pub ts_ns: u64,
    /// Local address: 16 bytes in network order (IPv4 in the first 4). Held as two u64 so that
    /// the eBPF side copies it with two aligned stores instead of a byte loop.
    pub saddr: [u64; 2],
    /// Remote address, as `saddr`.
    pub daddr: [u64; 2],
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    /// sk_err for ERROR_REPORT, else 0.
    pub err: i32,
    /// comm of the current task, NUL-padded bytes; set only where `pid` is, else zeros.
    pub comm: [u64; 2],
    /// The socket's network namespace (`net->ns.inum`, the inode of its nsfs file).
    pub netns: u32,
    /// [`event_flag`] bits.
    pub flags: u32,
}

/// `EventRecord::flags` bits.
pub mod event_flag {
    /// The socket still had its file (a process held a descriptor to it) at the event: a socket
    /// that reaches CLOSE like this died under its program (a reset, an abort), not by close().
    pub const HAD_FILE: u32 = 1;
}

const _: () = assert!(size_of::<EventRecord>() == 88);
const _: () = assert!(offset_of!(EventRecord, cookie) == 8);
const _: () = assert!(offset_of!(EventRecord, saddr) == 24);
const _: () = assert!(offset_of!(EventRecord, sport) == 56);
const _: () = assert!(offset_of!(EventRecord, comm) == 64);
const _: () = assert!(offset_of!(EventRecord, netns) == 80);

/// One socket as the `iter/tcp` program sees it. 128 bytes.
///
/// Times are raw jiffies stamps; `now_jiffies` is the clock they are relative to, so the agent
/// converts them with the kernel's HZ without the program dividing anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapRecord {
    pub cookie: u64,
    /// Inode of the socket file (0 if the socket has no file: TIME_WAIT, not yet accepted, orphaned).
    pub inode: u64,
    /// jiffies_64 when this record was made.
    pub now_jiffies: u64,
    /// Keepalive (sk_timer) expiry, jiffies; valid if `flags & SNAP_KA_TIMER`.
    pub ka_expires: u64,
    /// Retransmit/probe timer expiry, jiffies; valid if `icsk_pending != 0`.
    pub rto_expires: u64,
    /// 16 bytes each, network order (see [`EventRecord::saddr`]).
    pub saddr: [u64; 2],
    pub daddr: [u64; 2],
    pub uid: u32,
    /// tcp_sock.lsndtime (last data sent), jiffies (low 32 bits).
    pub lsndtime: u32,
    /// icsk_ack.lrcvtime (last data received), jiffies (low 32 bits).
    pub lrcvtime: u32,
    /// tcp_sock.rcv_tstamp (last ACK received), jiffies (low 32 bits).
    pub rcv_tstamp: u32,
    pub packets_out: u32,
    pub retrans_out: u32,
    pub total_retrans: u32,
    /// Per-socket TCP_KEEPIDLE in jiffies (0: the namespace sysctl applies).
    pub keepalive_time: u32,
    /// Per-socket TCP_KEEPINTVL in jiffies (0: the namespace sysctl applies).
    pub keepalive_intvl: u32,
    pub sport: u16,
    pub dport: u16,
    pub ipver: u8,
    pub state: u8,
    /// icsk_retransmits
    pub retransmits: u8,
    /// icsk_probes_out
    pub probes_out: u8,
    /// icsk_backoff
    pub backoff: u8,
    /// icsk_pending (ICSK_TIME_*)
    pub icsk_pending: u8,
    /// Per-socket TCP_KEEPCNT (0: the namespace sysctl applies).
    pub keepalive_probes: u8,
    pub _pad: [u8; 8],
    /// [`SNAP_KEEPOPEN`] | [`SNAP_KA_TIMER`] | [`SNAP_FULL`]
    pub flags: u8,
}

/// One socket file held by a process, from the `owners_task_file` iterator. 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerRecord {
    pub inode: u64,
    pub tgid: u32,
    pub fd: u32,
    /// The socket's address family (AF_INET, AF_INET6, ...; 0 if unreadable).
    pub family: u16,
    /// Its protocol (IPPROTO_TCP for TCP) and, for TCP, its state.
    pub protocol: u8,
    pub state: u8,
    /// Local port, and the remote port (0 for a socket never connected).
    pub sport: u16,
    pub dport: u16,
}

const _: () = assert!(size_of::<OwnerRecord>() == 24);

/// How the `snapshot_tcp` iterator filters (map `SNAP_FILTER`, slot 0). With `enabled == 0` it
/// emits every socket (and, with `min_idle_jiffies` set, marks each in SEEN as a filtered read
/// would); otherwise only sockets worth a look: first seen (or still without a file), not
/// ESTABLISHED/LISTEN, retransmitting or probing, or idle at least `min_idle_jiffies` and moved
/// since they were last reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapFilter {
    pub enabled: u32,
    pub min_idle_jiffies: u32,
}

/// SO_KEEPALIVE is set on the socket.
pub const SNAP_KEEPOPEN: u8 = 1;
/// The keepalive timer (sk_timer) is pending.
pub const SNAP_KA_TIMER: u8 = 2;
/// The socket is a full tcp_sock (not TIME_WAIT or a request sock): the tcp fields are valid.
pub const SNAP_FULL: u8 = 4;

const _: () = assert!(size_of::<SnapRecord>() == 128);
const _: () = assert!(offset_of!(SnapRecord, saddr) == 40);
const _: () = assert!(offset_of!(SnapRecord, uid) == 72);
const _: () = assert!(offset_of!(SnapRecord, sport) == 108);
const _: () = assert!(offset_of!(SnapRecord, flags) == 127);

/// Byte offsets of kernel struct fields, resolved from BTF by the agent and passed to the programs
/// as a read-only global (rustc emits no CO-RE relocations). All offsets are from the start of
/// `struct sock` unless named otherwise. 0xffff_ffff means "not found".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_flags: u32,
    /// `struct net` → `ns.inum`
    pub net_ns_inum: u32,
    pub sk_socket: u32,
    pub sk_err: u32,
    pub sk_protocol: u32,
    /// `sk_timer.expires`
    pub sk_timer_expires: u32,
    /// `sk_timer.entry.pprev` (non-null while pending)
    pub sk_timer_pprev: u32,
    pub icsk_retransmits: u32,
    pub icsk_pending: u32,
    pub icsk_backoff: u32,
    pub icsk_probes_out: u32,
    pub icsk_lrcvtime: u32,
    pub icsk_rto_expires: u32,
    pub tp_lsndtime: u32,
    pub tp_rcv_tstamp: u32,
    pub tp_packets_out: u32,
    pub tp_retrans_out: u32,
    pub tp_total_retrans: u32,
    pub tp_keepalive_time: u32,
    pub tp_keepalive_intvl: u32,
    pub tp_keepalive_probes: u32,
    /// `struct socket_alloc`: offset of `vfs_inode.i_ino` minus offset of `socket`
    pub socket_to_ino: u32,
    /// `struct socket` -> `sk`.
    pub socket_sk: u32,
    /// `struct task_struct` fields (from the start of task_struct).
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_exit_code: u32,
    /// `struct file` -> `f_inode`; `struct inode` -> `i_mode`, `i_ino`.
    pub file_f_inode: u32,
    pub inode_i_mode: u32,
    pub inode_i_ino: u32,
    /// `tcp_sock.bpf_sock_ops_cb_flags` (a u8).
    pub tp_cb_flags: u32,
}

const _: () = assert!(size_of::<KernelOffsets>() == 40 * 4);

impl KernelOffsets {
    /// All fields unresolved; the programs refuse to run with this.
    pub const UNRESOLVED: Self = Self {
        skc_daddr: u32::MAX,
        skc_rcv_saddr: u32::MAX,
        skc_dport: u32::MAX,
        skc_num: u32::MAX,
        skc_family: u32::MAX,
        skc_state: u32::MAX,
        skc_net: u32::MAX,
        skc_v6_daddr: u32::MAX,
        skc_v6_rcv_saddr: u32::MAX,
        skc_flags: u32::MAX,
        net_ns_inum: u32::MAX,
        sk_socket: u32::MAX,
        sk_err: u32::MAX,
        sk_protocol: u32::MAX,
        sk_timer_expires: u32::MAX,
        sk_timer_pprev: u32::MAX,
        icsk_retransmits: u32::MAX,
        icsk_pending: u32::MAX,
        icsk_backoff: u32::MAX,
        icsk_probes_out: u32::MAX,
        icsk_lrcvtime: u32::MAX,
        icsk_rto_expires: u32::MAX,
        tp_lsndtime: u32::MAX,
        tp_rcv_tstamp: u32::MAX,
        tp_packets_out: u32::MAX,
        tp_retrans_out: u32::MAX,
        tp_total_retrans: u32::MAX,
        tp_keepalive_time: u32::MAX,
        tp_keepalive_intvl: u32::MAX,
        tp_keepalive_probes: u32::MAX,
        socket_sk: 0,
        socket_to_ino: u32::MAX,
        task_pid: u32::MAX,
        task_tgid: u32::MAX,
        task_real_parent: u32::MAX,
        task_exit_code: u32::MAX,
        file_f_inode: u32::MAX,
        inode_i_mode: u32::MAX,
        inode_i_ino: u32::MAX,
        tp_cb_flags: u32::MAX,
    };
}

/// Kind of a [`ProcRecord`].
pub mod proc_kind {
    /// `sched:sched_process_exit` with group_dead: the process exited and is a zombie until reaped
    /// (or released at once if its parent ignores SIGCHLD).
    pub const EXIT: u8 = 1;
    /// `sched:sched_process_free` of a thread-group leader: the process was reaped.
    pub const FREE: u8 = 2;
}

/// One process lifecycle event. 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcRecord {
    pub kind: u8,
    pub _pad: [u8; 3],
    /// The process (thread-group id).
    pub tgid: u32,
    /// Its parent's thread-group id at the time of the event.
    pub ppid: u32,
    /// task_struct.exit_code (wait status) for EXIT.
    pub exit_code: i32,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// NUL-padded bytes.
    pub comm: [u64; 2],
    pub _pad2: [u8; 8],
}

const _: () = assert!(size_of::<ProcRecord>() == 48);
const _: () = assert!(offset_of!(ProcRecord, ts_ns) == 16);
const _: () = assert!(offset_of!(ProcRecord, comm) == 24);

/// A keepalive change requested of the `apply_keepalive` iterator (map `KA_TARGETS`, keyed by
/// socket cookie) or the values the `keepalive_at_connect` sock_ops program sets (`KA_CONNECT`).
/// The program writes the results back into the same entry. 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KaTarget {
    /// TCP_KEEPIDLE, TCP_KEEPINTVL (seconds), TCP_KEEPCNT to set.
    pub idle: i32,
    pub intvl: i32,
    pub cnt: i32,
    /// 1: set the values; 0: only read them.
    pub set: i32,
    /// Set to 1 by the program once it saw the socket.
    pub done: i32,
    /// 0, or the first negative errno of the helpers (-1000: not a full TCP socket).
    pub rc: i32,
    pub before_on: i32,
    pub before_idle: i32,
    pub before_intvl: i32,
    pub before_cnt: i32,
    pub after_on: i32,
    pub after_idle: i32,
    pub after_intvl: i32,
    pub after_cnt: i32,
    /// 1: also watch the socket's keepalive probes (set the flag and a PROBE_WATCH entry)
    /// before the values change.
    pub watch: i32,
    pub _pad: i32,
}

const _: () = assert!(size_of::<KaTarget>() == 64);

/// One socket whose keepalive probes the kernel watches (map `PROBE_WATCH`, keyed by socket
/// cookie). The agent writes `want`; `probe_select` (iter/tcp) sets or clears the socket's
/// sock_ops callback flag and writes `done`, `rc` and `flags`; `probe_watch` (sock_ops) and
/// `probe_answer` (tp_btf tcp_probe) keep the counters. 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeWatch {
    /// 1: watch (set [`WATCH_CB_FLAG`]); 0: release (clear it).
    pub want: u32,
    /// Set to 1 by `probe_select` once it saw the socket.
    pub done: u32,
    /// 0, or the negative errno of bpf_setsockopt(TCP_BPF_SOCK_OPS_CB_FLAGS).
    pub rc: i32,
    /// The socket's callback flags read back after the change (-1: unreadable).
    pub flags: i32,
    /// Probes sent and answered since the watch began.
    pub sent: u32,
    pub answered: u32,
    /// 1 while the last probe is unanswered.
    pub pending: u32,
    /// icsk_probes_out when the last probe left.
    pub probes_out: u32,
    /// bpf_ktime_get_ns() of the last probe sent, and of the last answer.
    pub last_sent_ns: u64,
    pub last_answer_ns: u64,
}

const _: () = assert!(size_of::<ProbeWatch>() == 48);

/// One socket carrying holdfast's watch flag after a `probe_select` run (its census). 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchFlagRecord {
    pub cookie: u64,
    /// The callback flags as bpf_getsockopt(TCP_BPF_SOCK_OPS_CB_FLAGS) reads them.
    pub flags: u32,
    /// 1 if the socket is in PROBE_WATCH.
    pub watched: u32,
}

const _: () = assert!(size_of::<WatchFlagRecord>() == 16);

/// The sock_ops callback flag holdfast sets on a watched socket: BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG
/// (`1 << 6`), which makes the kernel call the sock_ops program (HDR_OPT_LEN_CB) for every segment
/// the socket sends. holdfast reserves no option space: the callback only looks.
pub const WATCH_CB_FLAG: u32 = 1 << 6;

/// Socket option numbers used with bpf_(get|set)sockopt.
pub mod sockopt {
    /// The socket's sock_ops callback flags (bpf_setsockopt/getsockopt only; Linux 6.12+).
    pub const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;
    pub const SOL_SOCKET: i32 = 1;
    pub const SO_KEEPALIVE: i32 = 9;
    pub const SOL_TCP: i32 = 6;
    pub const TCP_KEEPIDLE: i32 = 4;
    pub const TCP_KEEPINTVL: i32 = 5;
    pub const TCP_KEEPCNT: i32 = 6;
}

/// Kernel TCP states (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: the records are #[repr(C)], contain only integers and byte arrays, have no padding
    // (checked by the const size asserts above) and every bit pattern is valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EventRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SnapRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KaTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OwnerRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SnapFilter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeWatch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WatchFlagRecord {}
}
