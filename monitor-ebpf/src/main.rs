//! holdfast's eBPF programs: TCP lifecycle events into a ring buffer, and an `iter/tcp` snapshot.
//!
//! Kernel struct fields are read at offsets resolved from BTF by the agent (`OFFSETS`), because
//! rustc emits no CO-RE relocations. Every record is keyed by the socket cookie.
#![no_std]
#![no_main]

use core::ffi::c_void;
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::seq_file,
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_comm as bpf_get_current_comm_raw, bpf_get_socket_cookie, bpf_getsockopt,
            bpf_jiffies64, bpf_ktime_get_ns, bpf_seq_write, bpf_setsockopt, bpf_sk_storage_get,
            bpf_skc_to_tcp_sock, bpf_sock_from_file,
        },
    },
    macros::{btf_map, btf_tracepoint, map, sock_ops},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use monitor_common::{
    AF_INET, AF_INET6, EventRecord, IPPROTO_TCP, KaTarget, KernelOffsets, OwnerRecord, ProbeWatch,
    ProcRecord, SNAP_FULL, SNAP_KA_TIMER, SNAP_KEEPOPEN, SnapFilter, SnapRecord, WATCH_CB_FLAG,
    WatchFlagRecord, event_flag, kind, proc_kind, sockopt, stat, tcp_state,
};

/// Field offsets, filled in by the agent at load time.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::UNRESOLVED;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
static PROCS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Keepalive changes for the `apply_keepalive` iterator, by socket cookie.
#[map]
static KA_TARGETS: HashMap<u64, KaTarget> = HashMap::with_max_entries(4096, 0);

/// Values the sock_ops program sets at connection establishment (slot 0; `set == 0`: off).
#[map]
static KA_CONNECT: Array<KaTarget> = Array::with_max_entries(1, 0);

/// Filter of the snapshot iterator (slot 0).
#[map]
static SNAP_FILTER: Array<SnapFilter> = Array::with_max_entries(1, 0);

/// What the filtered snapshot remembers of a socket it has already reported with its file (so
/// its owner is known): the jiffies of its last activity at that report (`skip_seen`: an idle
/// socket reported once is not reported again until it moves). Socket-local storage: one small
/// allocation per reported socket, charged to the socket and freed with it, so the memory grows
/// with the host's sockets and nothing has to be sized up front or removed at close. (An LRU map
/// sized at one entry per 64 KiB of RAM held 393k sockets here: at 1M sockets each filtered read
/// reported most of them again and took longer than a complete read, 1.81 s against 1.14 s.)
#[btf_map]
static SEEN: SkStorage<u32> = SkStorage::new();

/// The value SEEN keeps for a full socket (`tp`, from `bpf_skc_to_tcp_sock`), if any; with
/// `create`, made when missing (None when the socket's option memory is exhausted: the socket is
/// then simply reported again).
#[inline(always)]
fn seen(tp: *const u8, create: bool) -> Option<*mut u32> {
    let map = core::ptr::from_ref(&SEEN).cast_mut().cast::<c_void>();
    let mut zero = 0u32;
    let (value, flags) = if create {
        ((&raw mut zero).cast::<c_void>(), 1) // BPF_SK_STORAGE_GET_F_CREATE
    } else {
        (core::ptr::null_mut(), 0)
    };
    // SAFETY: helper call on the map above and a BTF tcp_sock pointer (a struct sock).
    let p = unsafe { bpf_sk_storage_get(map, tp.cast_mut().cast(), value, flags) }.cast::<u32>();
    (!p.is_null()).then_some(p)
}

/// Sockets whose keepalive probes are watched, by cookie (see `ProbeWatch`).
#[map]
static PROBE_WATCH: HashMap<u64, ProbeWatch> = HashMap::with_max_entries(4096, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Per CPU: the jiffy of the last lifecycle record and the bpf_ktime_get_ns() read in it.
#[map]
static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The time of a lifecycle record: CLOCK_MONOTONIC ns, read once per jiffy per CPU and reused
/// for the records after it in the same jiffy (so it may be up to one tick early: 4 ms at
/// HZ=250; per CPU it never goes back). bpf_ktime_get_ns() costs 68 ns per call on this VM's
/// clocksource (the socket programs' run time went from 327 to 259 ns per run without it, 100k
/// connect/accept/close cycles under the agent, kernel BPF statistics); a connection storm makes
/// tens of records per jiffy, and a 4 ms error is far below anything the detectors judge. The
/// agent adds one tick's worth to what it decodes (`LIFECYCLE_STAMP_SLACK_NS`), so that an
/// event's time is never earlier than the event when compared with a table read's start.
#[inline(always)]
fn lifecycle_ns() -> u64 {
    // SAFETY: plain helper call.
    let j = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: plain helper call.
        return unsafe { bpf_ktime_get_ns() };
    };
    // SAFETY: this CPU's slot. Another of these programs may interrupt this one on the CPU
    // (a softirq's record inside a system call's): the time is stored before its jiffy, so a
    // record interrupted between the two stores makes the inner one read the clock itself, and
    // a jiffy is never paired with an older time than its own.
    unsafe {
        if (*c)[0] != j || (*c)[1] == 0 {
            let now = bpf_ktime_get_ns();
            core::ptr::write_volatile(&raw mut (*c)[1], now);
            core::ptr::write_volatile(&raw mut (*c)[0], j);
            return now;
        }
        (*c)[1]
    }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";

/// Reads one offset from the global without letting the compiler constant-fold the default.
macro_rules! off {
    ($f:ident) => {
        // SAFETY: OFFSETS is a plain static; the volatile read keeps the loader-provided value.
        unsafe { core::ptr::read_volatile(&OFFSETS.$f) }
    };
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(p) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// Reads a `T` at `base + off` from kernel memory.
#[inline(always)]
fn rd<T: Copy>(base: *const u8, off: u32) -> Result<T, ()> {
    if off == u32::MAX {
        return Err(());
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) }.map_err(|_| ())
}

/// Loads a `T` at `base + off` directly (no helper call). Only for verifier-typed BTF pointers
/// (tp_btf arguments, iterator sockets) and offsets inside their struct: the offsets come from the
/// frozen `.rodata`, so the verifier sees constants and checks each load against the layout.
#[inline(always)]
fn ld<T: Copy>(base: *const u8, off: u32) -> Result<T, ()> {
    if off == u32::MAX {
        return Err(());
    }
    // SAFETY: see above; the JIT turns these into exception-protected loads.
    Ok(unsafe { core::ptr::read_volatile(base.wrapping_add(off as usize) as *const T) })
}

/// The current task's comm as 16 NUL-padded bytes.
#[inline(always)]
fn current_comm() -> [u64; 2] {
    let mut c = [0u64; 2];
    // SAFETY: the helper writes at most 16 bytes into `c`.
    unsafe { bpf_get_current_comm_raw(c.as_mut_ptr() as *mut c_void, 16) };
    c
}

struct Tuple {
    ipver: u8,
    saddr: [u64; 2],
    daddr: [u64; 2],
    sport: u16,
    dport: u16,
}

/// Reads family, addresses and ports from `struct sock_common`.
#[inline(always)]
fn tuple(sk: *const u8) -> Result<Tuple, ()> {
    let family: u16 = ld(sk, off!(skc_family))?;
    let mut t = Tuple {
        ipver: 0,
        saddr: [0; 2],
        daddr: [0; 2],
        sport: ld(sk, off!(skc_num))?,
        dport: u16::from_be(ld(sk, off!(skc_dport))?),
    };
    if family == AF_INET {
        t.ipver = 4;
        // The 4 address bytes land in the first 4 bytes of the u64 (little-endian BPF).
        t.saddr[0] = u64::from(ld::<u32>(sk, off!(skc_rcv_saddr))?);
        t.daddr[0] = u64::from(ld::<u32>(sk, off!(skc_daddr))?);
    } else if family == AF_INET6 {
        t.ipver = 6;
        t.saddr = rd::<[u64; 2]>(sk, off!(skc_v6_rcv_saddr))?;
        t.daddr = rd::<[u64; 2]>(sk, off!(skc_v6_daddr))?;
    } else {
        return Err(());
    }
    Ok(t)
}

/// The socket's network namespace: `sk->__sk_common.skc_net.net->ns.inum` (0 if unreadable).
#[inline(always)]
fn netns_of(sk: *const u8) -> u32 {
    match ld::<u64>(sk, off!(skc_net)) {
        Ok(net) if net != 0 => ld::<u32>(net as *const u8, off!(net_ns_inum)).unwrap_or(0),
        _ => 0,
    }
}

/// Emits one event record for `sk` (a BTF `struct sock *` from a tp_btf argument).
#[inline(always)]
fn emit(ctx: &BtfTracePointContext, prog: u32, kind: u8, sk: *const c_void, old: u8, new: Option<u8>) {
    if sk.is_null() {
        return;
    }
    // SAFETY: helper call on the BTF socket pointer of the tracepoint.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    emit_for(ctx, prog, kind, sk, cookie, old, new, None);
}

/// Emits one event record for `sk` (a verifier-typed socket pointer) with its cookie; `extra`
/// replaces the `pid` and `err` fields (probe events carry their counts there).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_for<C: EbpfContext>(
    ctx: &C,
    prog: u32,
    kind: u8,
    sk: *const c_void,
    cookie: u64,
    old: u8,
    new: Option<u8>,
    extra: Option<(u32, i32)>,
) {
    let base = sk as *const u8;
    match ld::<u16>(base, off!(sk_protocol)) {
        Ok(p) if p == IPPROTO_TCP => {}
        Ok(_) => return,
        Err(()) => return bump(stat::ERR_BASE + prog),
    }
    let Ok(t) = tuple(base) else {
        // Rare (an IPv6 address the probe read could not reach): say so once per occurrence.
        warn!(
            ctx,
            "holdfast: cannot read the addresses of a socket (program {})", prog
        );
        return bump(stat::ERR_BASE + prog);
    };
    let state = match new {
        Some(s) => s,
        None => ld::<u8>(base, off!(skc_state)).unwrap_or(0),
    };
    // The current task owns the socket only in connect() (-> SYN_SENT) and listen() (->
    // LISTEN): only those records carry its pid and comm (the agent's owner hint). Every
    // other transition runs in softirq or in whatever task the kernel happens to be in, and
    // leaving out the two helper calls there is most of a connection's events.
    let in_process = extra.is_none()
        && kind == kind::STATE
        && (state == tcp_state::SYN_SENT || state == tcp_state::LISTEN);
    let (pid, err) = match extra {
        Some(x) => x,
        None if kind == kind::ERROR_REPORT => (0, ld::<i32>(base, off!(sk_err)).unwrap_or(0)),
        None if in_process => ((bpf_get_current_pid_tgid() >> 32) as u32, 0),
        None => (0, 0),
    };
    let Some(mut entry) = EVENTS.reserve::<EventRecord>(0) else {
        return bump(stat::LOST_BASE + prog);
    };
    // Probe records keep the exact time: the agent times probe answers with them.
    let ts_ns = if extra.is_some() {
        // SAFETY: plain helper call.
        unsafe { bpf_ktime_get_ns() }
    } else {
        lifecycle_ns()
    };
    entry.write(EventRecord {
        kind,
        ipver: t.ipver,
        old_state: if new.is_some() { old } else { state },
        new_state: state,
        pid,
        cookie,
        ts_ns,
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        err,
        // Probe events run in timer or softirq context: no task of interest is current.
        comm: if in_process { current_comm() } else { [0; 2] },
        netns: netns_of(base),
        flags: match ld::<u64>(base, off!(sk_socket)) {
            Ok(sock) if sock != 0 => event_flag::HAD_FILE,
            _ => 0,
        },
    });
    // Never wake the reader per record: it drains on a short timer (see DESIGN: wakeups are the
    // cost that matters under churn).
    // Default wakeup: the reader is woken only by a record that finds the ring drained (once
    // per drain; an idle agent sleeps until then).
    entry.submit(0);
    bump(stat::EVENTS);
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let (old, new) = (old as u8, new as u8);
    // A passive connection's child is born in SYN_RECV (cloned from the listener) and set
    // ESTABLISHED by the same ACK, in the same softirq: that second record opens the flow.
    // Leaving out the first is a tenth of a connection's records. (A Fast Open child waits in
    // SYN_RECV for the handshake's last ACK: it is met at ESTABLISHED or by the next read.)
    if old == tcp_state::LISTEN && new == tcp_state::SYN_RECV {
        return 0;
    }
    emit(&ctx, 0, kind::STATE, sk, old, Some(new));
    if new == tcp_state::CLOSE && !sk.is_null() {
        // The probe watch of this socket ends with it. Only a socket carrying the watch flag
        // can be in PROBE_WATCH past the agent's own pass (which drops entries of sockets it
        // does not find), so the flag is tested before the map. SEEN is freed with the socket.
        // SAFETY: helper call on the tracepoint's BTF socket pointer.
        let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
        if !tp.is_null()
            && matches!(ld::<u8>(tp, off!(tp_cb_flags)), Ok(f) if u32::from(f) & WATCH_CB_FLAG != 0)
        {
            // SAFETY: helper call on the BTF socket pointer of the tracepoint.
            let cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
            let _ = PROBE_WATCH.remove(&cookie);
        }
    }
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    emit(&ctx, 1, kind::RECV_RST, ctx.arg(0), 0, None);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    emit(&ctx, 2, kind::SEND_RST, ctx.arg(0), 0, None);
    0
}

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: BtfTracePointContext) -> i32 {
    emit(&ctx, 3, kind::ERROR_REPORT, ctx.arg(0), 0, None);
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    emit(&ctx, 4, kind::RETRANSMIT, ctx.arg(0), 0, None);
    0
}

/// Emits a process record for task `p` (a BTF `struct task_struct *`).
#[inline(always)]
fn emit_proc(kind: u8, p: *const u8) {
    let Ok(tgid) = rd::<i32>(p, off!(task_tgid)) else {
        return;
    };
    if kind == proc_kind::FREE {
        // Only the thread-group leader's free means the process is gone.
        match rd::<i32>(p, off!(task_pid)) {
            Ok(pid) if pid == tgid => {}
            _ => return,
        }
    }
    let ppid = match rd::<u64>(p, off!(task_real_parent)) {
        Ok(parent) if parent != 0 => rd::<i32>(parent as *const u8, off!(task_tgid)).unwrap_or(0),
        _ => 0,
    };
    let exit_code = rd::<i32>(p, off!(task_exit_code)).unwrap_or(0);
    // sched_process_exit runs in the exiting task: its comm is the current one.
    let comm = if kind == proc_kind::EXIT {
        current_comm()
    } else {
        [0; 2]
    };
    let Some(mut entry) = PROCS.reserve::<ProcRecord>(0) else {
        return bump(stat::PROC_LOST);
    };
    // SAFETY: plain helper call.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    entry.write(ProcRecord {
        kind,
        _pad: [0; 3],
        tgid: tgid as u32,
        ppid: ppid as u32,
        exit_code,
        ts_ns,
        comm,
        _pad2: [0; 8],
    });
    // Default wakeup: the reader is woken only by a record that finds the ring drained (once
    // per drain; an idle agent sleeps until then).
    entry.submit(0);
    bump(stat::PROC_EVENTS);
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let p: *const u8 = ctx.arg(0);
    let group_dead: u64 = ctx.arg(1);
    if !p.is_null() && group_dead & 0xff != 0 {
        emit_proc(proc_kind::EXIT, p);
    }
    0
}

#[btf_tracepoint(function = "sched_process_free")]
pub fn sched_process_free(ctx: BtfTracePointContext) -> i32 {
    let p: *const u8 = ctx.arg(0);
    if !p.is_null() {
        emit_proc(proc_kind::FREE, p);
    }
    0
}

/// `struct bpf_iter_meta` (stable UAPI-like layout of the iterator context).
#[repr(C)]
pub struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__tcp`.
#[repr(C)]
pub struct IterTcp {
    meta: *mut IterMeta,
    sk_common: *mut c_void,
    uid: u32,
}

/// One record per TCP socket of the agent's network namespace, written to the iterator's file.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn snapshot_tcp(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the kernel passes a valid bpf_iter__tcp context.
    let (meta, sk, uid) = unsafe { ((*ctx).meta, (*ctx).sk_common, (*ctx).uid) };
    if sk.is_null() {
        return 0;
    }
    bump(stat::ITER_SOCKETS);
    let base = sk as *const u8;
    // TIME_WAIT and request sockets are not sessions: the agent counts TIME_WAIT from the
    // namespace's sockstat. Leaving them out keeps a read small after a connection storm
    // (hundreds of thousands of TIME_WAIT sockets for a minute).
    let state: u8 = ld(base, off!(skc_state)).unwrap_or(0);
    if state == tcp_state::TIME_WAIT || state == tcp_state::NEW_SYN_RECV {
        return 0;
    }
    // SAFETY: helper calls on the verifier-typed sock_common pointer.
    let (cookie, now) = unsafe { (bpf_get_socket_cookie(sk), bpf_jiffies64()) };
    let (filter, mark) = SNAP_FILTER.get(0).map_or((0, 0), |f| {
        if f.enabled != 0 {
            (f.min_idle_jiffies.max(1), f.min_idle_jiffies.max(1))
        } else {
            (0, f.min_idle_jiffies)
        }
    });
    // SAFETY: helper call; null for time-wait and request sockets.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    if filter != 0
        && !tp.is_null()
        && let Some(reported) = seen(tp, false)
        // SAFETY: a value pointer of this map, read once.
        && skip_seen(base, tp, now as u32, filter, unsafe { *reported })
    {
        bump(stat::ITER_SKIPPED);
        return 0;
    }
    let Ok(t) = tuple(base) else {
        return 0;
    };
    let mut r = SnapRecord {
        cookie,
        inode: 0,
        now_jiffies: now,
        ka_expires: 0,
        rto_expires: 0,
        saddr: t.saddr,
        daddr: t.daddr,
        uid,
        lsndtime: 0,
        lrcvtime: 0,
        rcv_tstamp: 0,
        packets_out: 0,
        retrans_out: 0,
        total_retrans: 0,
        keepalive_time: 0,
        keepalive_intvl: 0,
        sport: t.sport,
        dport: t.dport,
        ipver: t.ipver,
        state,
        retransmits: 0,
        probes_out: 0,
        backoff: 0,
        icsk_pending: 0,
        keepalive_probes: 0,
        _pad: [0; 8],
        flags: 0,
    };
    if !tp.is_null() {
        fill_full(tp, &mut r);
    }
    if mark != 0
        && r.inode != 0
        && !tp.is_null()
        && let Some(slot) = seen(tp, true)
    {
        // Reported with its file: later filtered reads may leave it out while it is calm, or
        // while it has not moved since this report.
        // SAFETY: a value pointer of this socket's storage.
        unsafe { *slot = idle_mark(tp, now as u32, mark) };
    }
    // SAFETY: meta is the verifier-typed iterator meta; the record lives on our stack.
    let ret = unsafe {
        bpf_seq_write(
            (*meta).seq,
            &r as *const SnapRecord as *const c_void,
            size_of::<SnapRecord>() as u32,
        )
    };
    if ret != 0 {
        bump(stat::ITER_OVERFLOW);
    }
    0
}

/// The jiffies of a socket's last activity: the newest of its last send, last data received
/// and last ACK received.
#[inline(always)]
fn last_activity(tp: *const u8, now: u32) -> u32 {
    let age = |off: u32| now.wrapping_sub(ld::<u32>(tp, off).unwrap_or(0));
    let a = age(off!(tp_lsndtime));
    let b = age(off!(icsk_lrcvtime));
    let c = age(off!(tp_rcv_tstamp));
    let newest = if a < b {
        if a < c { a } else { c }
    } else if b < c {
        b
    } else {
        c
    };
    now.wrapping_sub(newest)
}

/// Whether a filtered snapshot may leave out a socket it has already reported: a listener, or an
/// ESTABLISHED socket with no retransmission or probe outstanding that was either calm when
/// reported and active within `min_idle` jiffies since, or idle when reported and has not moved
/// since (`reported`, see `idle_mark`: the agent extrapolates its idle exactly; once it moves it
/// is reported again). Reads only the fields this decision needs.
#[inline(always)]
fn skip_seen(base: *const u8, tp: *const u8, now: u32, min_idle: u32, reported: u32) -> bool {
    let state: u8 = ld(base, off!(skc_state)).unwrap_or(0);
    if state == tcp_state::LISTEN {
        return true;
    }
    if state != tcp_state::ESTABLISHED || tp.is_null() {
        return false;
    }
    let trouble = ld::<u8>(tp, off!(icsk_retransmits)).unwrap_or(1)
        | ld::<u8>(tp, off!(icsk_probes_out)).unwrap_or(1)
        | ld::<u8>(tp, off!(icsk_backoff)).unwrap_or(1);
    if trouble != 0 {
        return false;
    }
    let last = last_activity(tp, now);
    if reported == 0 {
        now.wrapping_sub(last) < min_idle
    } else {
        last | 1 == reported
    }
}

/// What SEEN keeps of a socket reported now: 0 if it was not idle past `min_idle` (left out
/// later while calm), else its last activity with the low bit set (left out later until it
/// moves; the low bit keeps the mark apart from 0).
#[inline(always)]
fn idle_mark(tp: *const u8, now: u32, min_idle: u32) -> u32 {
    if tp.is_null() {
        return 0;
    }
    let last = last_activity(tp, now);
    if now.wrapping_sub(last) < min_idle {
        0
    } else {
        last | 1
    }
}

/// One socket file of a process (task_file iterator; threads sharing the table are skipped).
#[repr(C)]
pub struct IterTaskFile {
    meta: *mut IterMeta,
    task: *mut c_void,
    fd: u32,
    file: *mut c_void,
}

/// Socket inode -> owning process, for every socket file on the host.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn owners_task_file(ctx: *mut IterTaskFile) -> i32 {
    // SAFETY: the kernel passes a valid bpf_iter__task_file context.
    let (meta, task, fd, file) = unsafe { ((*ctx).meta, (*ctx).task, (*ctx).fd, (*ctx).file) };
    if file.is_null() || task.is_null() {
        return 0;
    }
    let Ok(inode) = ld::<u64>(file as *const u8, off!(file_f_inode)) else {
        return 0;
    };
    if inode == 0 {
        return 0;
    }
    let Ok(mode) = ld::<u16>(inode as *const u8, off!(inode_i_mode)) else {
        return 0;
    };
    if u32::from(mode) & 0o170000 != 0o140000 {
        return 0;
    }
    let mut rec = OwnerRecord {
        inode: ld::<u64>(inode as *const u8, off!(inode_i_ino)).unwrap_or(0),
        tgid: ld::<i32>(task as *const u8, off!(task_tgid)).unwrap_or(0) as u32,
        fd,
        family: 0,
        protocol: 0,
        state: 0,
        sport: 0,
        dport: 0,
    };
    // What the socket is: a descriptor to a TCP socket that is in no table any more (CLOSE after
    // a reset or an abort) still holds the session's slot. bpf_sock_from_file gives the socket
    // as a typed pointer (`private_data` is a `void *`), so the sock's fields are direct loads:
    // seven bpf_probe_read_kernel calls per socket file before, about 7 % of a walk of 200k
    // sockets (`perf` on `holdfast probe snapshot --owners`).
    // SAFETY: helper call on the iterator's verifier-typed file pointer.
    let sock = unsafe { bpf_sock_from_file(file as *mut _) } as *const u8;
    let sk = if sock.is_null() {
        0
    } else {
        ld::<u64>(sock, off!(socket_sk)).unwrap_or(0)
    };
    if sk != 0 {
        let sk = sk as *const u8;
        rec.family = ld::<u16>(sk, off!(skc_family)).unwrap_or(0);
        rec.protocol = ld::<u16>(sk, off!(sk_protocol)).unwrap_or(0) as u8;
        rec.state = ld::<u8>(sk, off!(skc_state)).unwrap_or(0);
        rec.sport = ld::<u16>(sk, off!(skc_num)).unwrap_or(0);
        rec.dport = u16::from_be(ld::<u16>(sk, off!(skc_dport)).unwrap_or(0));
    }
    // SAFETY: meta is the verifier-typed iterator meta; the record lives on our stack.
    unsafe {
        bpf_seq_write(
            (*meta).seq,
            &rec as *const OwnerRecord as *const c_void,
            size_of::<OwnerRecord>() as u32,
        )
    };
    0
}

/// Fields that only a full `struct tcp_sock` has.
#[inline(always)]
fn fill_full(base: *const u8, r: &mut SnapRecord) {
    r.flags = SNAP_FULL;
    // The socket is a typed pointer (a direct load); its inode shares the socket's allocation
    // (`struct socket_alloc`) past `struct socket`, out of the verifier's reach: one
    // bpf_probe_read_kernel. (socket -> file -> inode, all direct loads, was no faster: the file
    // is one more cache line per socket.)
    if let Ok(sock) = ld::<u64>(base, off!(sk_socket))
        && sock != 0
    {
        r.inode = rd::<u64>(sock as *const u8, off!(socket_to_ino)).unwrap_or(0);
    }
    if let Ok(flags) = ld::<u64>(base, off!(skc_flags)) {
        if flags & (1 << 3) != 0 {
            // SOCK_KEEPOPEN
            r.flags |= SNAP_KEEPOPEN;
        }
    }
    if let Ok(pprev) = ld::<u64>(base, off!(sk_timer_pprev)) {
        if pprev != 0 {
            r.flags |= SNAP_KA_TIMER;
            r.ka_expires = ld(base, off!(sk_timer_expires)).unwrap_or(0);
        }
    }
    r.retransmits = ld(base, off!(icsk_retransmits)).unwrap_or(0);
    r.icsk_pending = ld(base, off!(icsk_pending)).unwrap_or(0);
    r.backoff = ld(base, off!(icsk_backoff)).unwrap_or(0);
    r.probes_out = ld(base, off!(icsk_probes_out)).unwrap_or(0);
    r.lrcvtime = ld(base, off!(icsk_lrcvtime)).unwrap_or(0);
    if r.icsk_pending != 0 {
        r.rto_expires = ld(base, off!(icsk_rto_expires)).unwrap_or(0);
    }
    r.lsndtime = ld(base, off!(tp_lsndtime)).unwrap_or(0);
    r.rcv_tstamp = ld(base, off!(tp_rcv_tstamp)).unwrap_or(0);
    r.packets_out = ld(base, off!(tp_packets_out)).unwrap_or(0);
    r.retrans_out = ld(base, off!(tp_retrans_out)).unwrap_or(0);
    r.total_retrans = ld(base, off!(tp_total_retrans)).unwrap_or(0);
    r.keepalive_time = ld(base, off!(tp_keepalive_time)).unwrap_or(0);
    r.keepalive_intvl = ld(base, off!(tp_keepalive_intvl)).unwrap_or(0);
    r.keepalive_probes = ld(base, off!(tp_keepalive_probes)).unwrap_or(0);
}

#[inline(always)]
fn getopt(sk: *mut c_void, level: i32, name: i32) -> i32 {
    let mut v: i32 = -1;
    // SAFETY: `sk` is a verifier-typed socket pointer; `v` is a 4-byte stack slot.
    let rc = unsafe { bpf_getsockopt(sk, level, name, &mut v as *mut i32 as *mut c_void, 4) };
    if rc == 0 { v } else { -1 }
}

#[inline(always)]
fn setopt(sk: *mut c_void, level: i32, name: i32, value: i32) -> i32 {
    let mut v = value;
    // SAFETY: as in `getopt`.
    unsafe { bpf_setsockopt(sk, level, name, &mut v as *mut i32 as *mut c_void, 4) as i32 }
}

/// SO_KEEPALIVE, then the interval and count, then TCP_KEEPIDLE last: setting the idle time on
/// a socket with keepalive on re-arms the timer relative to the last activity, so a flow that is
/// already idle longer than the new TCP_KEEPIDLE is probed at once.
#[inline(always)]
fn set_keepalive(sk: *mut c_void, t: &KaTarget) -> i32 {
    let mut rc = setopt(sk, sockopt::SOL_SOCKET, sockopt::SO_KEEPALIVE, 1);
    if rc == 0 {
        rc = setopt(sk, sockopt::SOL_TCP, sockopt::TCP_KEEPINTVL, t.intvl);
    }
    if rc == 0 {
        rc = setopt(sk, sockopt::SOL_TCP, sockopt::TCP_KEEPCNT, t.cnt);
    }
    if rc == 0 {
        rc = setopt(sk, sockopt::SOL_TCP, sockopt::TCP_KEEPIDLE, t.idle);
    }
    rc
}

/// Applies (or reads) keepalive on the sockets named in KA_TARGETS, and only those.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn apply_keepalive(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the kernel passes a valid bpf_iter__tcp context.
    let sk = unsafe { (*ctx).sk_common };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: helper call on the verifier-typed sock_common pointer.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let Some(t) = KA_TARGETS.get_ptr_mut(&cookie) else {
        return 0;
    };
    // SAFETY: `t` points into the map value for this cookie; the iterator runs single-threaded.
    let t = unsafe { &mut *t };
    // SAFETY: helper call; returns null for time-wait and request sockets.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *mut c_void;
    t.done = 1;
    if tp.is_null() {
        t.rc = -1000;
        return 0;
    }
    t.before_on = getopt(tp, sockopt::SOL_SOCKET, sockopt::SO_KEEPALIVE);
    t.before_idle = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_KEEPIDLE);
    t.before_intvl = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_KEEPINTVL);
    t.before_cnt = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_KEEPCNT);
    if t.set == 1 && t.watch == 1 {
        // Watch first: setting TCP_KEEPIDLE on a flow idle past it sends a probe at once.
        let w = ProbeWatch {
            want: 1,
            done: 1,
            flags: -1,
            ..ProbeWatch::default()
        };
        if PROBE_WATCH.insert(&cookie, &w, 1 /* BPF_NOEXIST */).is_ok()
            || PROBE_WATCH.get_ptr(&cookie).is_some()
        {
            let flags = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_BPF_SOCK_OPS_CB_FLAGS);
            if flags >= 0 {
                let _ = setopt(
                    tp,
                    sockopt::SOL_TCP,
                    sockopt::TCP_BPF_SOCK_OPS_CB_FLAGS,
                    (flags as u32 | WATCH_CB_FLAG) as i32,
                );
            }
        }
    }
    if t.set == 1 {
        t.rc = set_keepalive(tp, t);
    }
    t.after_on = getopt(tp, sockopt::SOL_SOCKET, sockopt::SO_KEEPALIVE);
    t.after_idle = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_KEEPIDLE);
    t.after_intvl = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_KEEPINTVL);
    t.after_cnt = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_KEEPCNT);
    0
}

/// Keepalive at connection establishment for the cgroups this program is attached to.
#[sock_ops]
pub fn keepalive_at_connect(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB (4) and BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB (5).
    if op != 4 && op != 5 {
        return 1;
    }
    let Some(t) = KA_CONNECT.get(0) else { return 1 };
    if t.set != 1 {
        return 1;
    }
    let t = *t;
    let rc = set_keepalive(ctx.ops as *mut c_void, &t);
    if rc == 0 {
        bump(stat::SOCKOPS_APPLIED);
    } else {
        warn!(
            &ctx,
            "holdfast: keepalive at connect failed: bpf_setsockopt returned {}", rc
        );
        bump(stat::SOCKOPS_FAILED);
    }
    1
}

/// Sets or clears the watch flag on the sockets named in PROBE_WATCH (bpf_setsockopt of
/// TCP_BPF_SOCK_OPS_CB_FLAGS from the tcp iterator, under the socket lock), and writes one
/// `WatchFlagRecord` for every socket of the namespace that carries the flag afterwards (the
/// census that shows nothing stray is left).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn probe_select(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the kernel passes a valid bpf_iter__tcp context.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: helper call; null for time-wait and request sockets.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *mut c_void;
    if tp.is_null() {
        return 0;
    }
    // SAFETY: helper call on the verifier-typed sock_common pointer.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let entry = PROBE_WATCH.get_ptr_mut(&cookie);
    let mut flags = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_BPF_SOCK_OPS_CB_FLAGS);
    if let Some(w) = entry {
        // SAFETY: `w` points into the map value for this cookie; the iterator runs alone.
        let w = unsafe { &mut *w };
        w.done = 1;
        if flags >= 0 {
            let want = if w.want == 1 {
                flags as u32 | WATCH_CB_FLAG
            } else {
                flags as u32 & !WATCH_CB_FLAG
            };
            if want != flags as u32 {
                w.rc = setopt(
                    tp,
                    sockopt::SOL_TCP,
                    sockopt::TCP_BPF_SOCK_OPS_CB_FLAGS,
                    want as i32,
                );
            }
            flags = getopt(tp, sockopt::SOL_TCP, sockopt::TCP_BPF_SOCK_OPS_CB_FLAGS);
        } else {
            w.rc = flags;
        }
        w.flags = flags;
    }
    if flags > 0 && flags as u32 & WATCH_CB_FLAG != 0 {
        let rec = WatchFlagRecord {
            cookie,
            flags: flags as u32,
            watched: u32::from(entry.is_some()),
        };
        // SAFETY: meta is the verifier-typed iterator meta; the record lives on our stack.
        unsafe {
            bpf_seq_write(
                (*meta).seq,
                &rec as *const WatchFlagRecord as *const c_void,
                size_of::<WatchFlagRecord>() as u32,
            )
        };
    }
    0
}

/// BPF_SOCK_OPS_HDR_OPT_LEN_CB: the kernel is about to send a segment on a socket with the
/// watch flag (and asks how much option space to reserve: none).
const OP_HDR_OPT_LEN: u32 = 14;
/// `args[0]` of HDR_OPT_LEN_CB when the call sizes the MSS, not a segment.
const WRITE_HDR_TCP_CURRENT_MSS: u32 = 1;
/// TCPHDR_ACK.
const TCP_FLAG_ACK: u32 = 0x10;

/// Sees the keepalive probes of watched sockets leave. A keepalive probe is the bare ACK the
/// keepalive timer sends (`tcp_write_wakeup` -> `tcp_xmit_probe_skb`, sequence snd_una - 1)
/// with nothing in flight. It is told from every other bare ACK by where it is sent from: while
/// the keepalive timer's handler runs the timer is not pending (the timer core detaches it
/// first), whereas any other bare ACK of a socket with SO_KEEPALIVE leaves with the timer armed.
/// Attached at the cgroup v2 root (every socket of the host, in every namespace); a socket
/// without the flag never reaches it for these callbacks.
#[sock_ops]
pub fn probe_watch(ctx: SockOpsContext) -> u32 {
    if ctx.op() != OP_HDR_OPT_LEN {
        return 1;
    }
    bump(stat::PROBE_CALLBACKS);
    let ops = ctx.ops;
    // SAFETY: reads of the sock_ops context fields the verifier allows for this program type.
    let (len, tcp_flags, una, nxt, state, sk) = unsafe {
        (
            (*ops).skb_len,
            (*ops).skb_tcp_flags,
            (*ops).snd_una,
            (*ops).snd_nxt,
            (*ops).state,
            (*ops).__bindgen_anon_2.sk,
        )
    };
    if ctx.arg(0) == WRITE_HDR_TCP_CURRENT_MSS || len != 0 || tcp_flags != TCP_FLAG_ACK || una != nxt {
        return 1;
    }
    if state == u32::from(tcp_state::FIN_WAIT2) || sk.is_null() {
        // In FIN_WAIT2 sk_timer is the FIN_WAIT2 timer, not keepalive.
        return 1;
    }
    // SAFETY: helper call on the context's socket pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ops as *mut c_void) };
    let Some(w) = PROBE_WATCH.get_ptr_mut(&cookie) else {
        // Flagged by another loader of these programs (`holdfast probe watch` next to the
        // agent), or left by an agent that was killed: counted, never cleared here (clearing
        // would undo the other loader's watch).
        bump(stat::PROBE_STRAY);
        return 1;
    };
    // SAFETY: helper call; `sk` is the context's full socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    if tp.is_null() {
        return 1;
    }
    let keepopen = ld::<u64>(tp, off!(skc_flags)).map_or(false, |f| f & (1 << 3) != 0);
    let timer_armed = ld::<u64>(tp, off!(sk_timer_pprev)).map_or(true, |p| p != 0);
    if !keepopen || timer_armed {
        return 1;
    }
    let probes_out: u8 = ld(tp, off!(icsk_probes_out)).unwrap_or(0);
    // SAFETY: `w` points into the map value; concurrent updates only lose a count.
    let w = unsafe { &mut *w };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    w.sent = w.sent.wrapping_add(1);
    w.pending = 1;
    w.probes_out = u32::from(probes_out);
    w.last_sent_ns = now;
    bump(stat::PROBE_SENT);
    emit_for(
        &ctx,
        5,
        kind::PROBE_SENT,
        tp as *const c_void,
        cookie,
        0,
        None,
        Some((w.sent, i32::from(probes_out))),
    );
    1
}

/// Sees the answers: any segment arriving on a watched socket while a probe is outstanding
/// proves the peer alive and the path open (`tcp:tcp_probe` runs for every segment an
/// established socket receives, before it is processed). Attached only while some socket is
/// watched; an unwatched socket costs one flag test.
#[btf_tracepoint(function = "tcp_probe")]
pub fn probe_answer(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    // SAFETY: helper call on the tracepoint's BTF socket pointer.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    if tp.is_null() {
        return 0;
    }
    match ld::<u8>(tp, off!(tp_cb_flags)) {
        Ok(f) if u32::from(f) & WATCH_CB_FLAG != 0 => {}
        _ => return 0,
    }
    // SAFETY: helper call on the BTF socket pointer.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    let Some(w) = PROBE_WATCH.get_ptr_mut(&cookie) else {
        return 0;
    };
    // SAFETY: `w` points into the map value.
    let w = unsafe { &mut *w };
    if w.pending == 0 {
        return 0;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    w.pending = 0;
    w.answered = w.answered.wrapping_add(1);
    w.last_answer_ns = now;
    let rtt_us = (now.saturating_sub(w.last_sent_ns) / 1000).min(i32::MAX as u64) as i32;
    bump(stat::PROBE_ANSWERED);
    emit_for(
        &ctx,
        6,
        kind::PROBE_ANSWERED,
        tp as *const c_void,
        cookie,
        0,
        None,
        Some((w.answered, rtt_us)),
    );
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
