//! Pure decoders for the records the eBPF programs emit (`&[u8] -> Result<_, DecodeError>`).
use std::mem::size_of;
use std::num::NonZeroU16;

use monitor_common::{
    EventRecord, OwnerRecord, ProcRecord, SNAP_FULL, SNAP_KA_TIMER, SNAP_KEEPOPEN, SnapRecord, kind,
    proc_kind, tcp_state,
};

use crate::model::observe::{
    DeadFd, Event, EventKind, PidHint, ProcEvent, ProcEventKind, SockSample, TcpSample, Timer, sockaddr,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {found} bytes, expected {expected}")]
    Size { expected: usize, found: usize },
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown IP version {0}")]
    IpVersion(u8),
}

fn exact<const N: usize>(b: &[u8]) -> Result<&[u8; N], DecodeError> {
    b.try_into().map_err(|_| DecodeError::Size {
        expected: N,
        found: b.len(),
    })
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn arr16(b: &[u8], o: usize) -> [u8; 16] {
    b[o..o + 16].try_into().expect("16 bytes")
}

/// What is added to a lifecycle record's time. The programs read the clock once per jiffy per
/// CPU and stamp the records after it in that jiffy with it, so a stamp is up to one tick early
/// (4 ms at HZ=250, at most 10 ms at any HZ from 100 up). With this added, an event's time is
/// never earlier than the event: a table read that began before it cannot override it (`Flow`'s
/// `last_seen` against the read's start) or close its flow as gone. Probe records keep the
/// exact clock.
pub const LIFECYCLE_STAMP_SLACK_NS: u64 = 10_000_000;

/// Decodes one ring-buffer record.
pub fn event(bytes: &[u8]) -> Result<Event, DecodeError> {
    let b = exact::<{ size_of::<EventRecord>() }>(bytes)?;
    let k = b[0];
    let kind = match k {
        kind::STATE => EventKind::State,
        kind::RECV_RST => EventKind::RecvRst,
        kind::SEND_RST => EventKind::SendRst,
        kind::ERROR_REPORT => EventKind::Error,
        kind::RETRANSMIT => EventKind::Retransmit,
        kind::PROBE_SENT => EventKind::ProbeSent,
        kind::PROBE_ANSWERED => EventKind::ProbeAnswered,
        other => return Err(DecodeError::Kind(other)),
    };
    let ipver = b[1];
    if ipver != 4 && ipver != 6 {
        return Err(DecodeError::IpVersion(ipver));
    }
    let (old_state, state) = (b[2], b[3]);
    let pid = u32_at(b, 4);
    // The pid is the owner's only when the transition runs in the owner's system call:
    // connect() (-> SYN_SENT) and listen() (-> LISTEN). Others may run in softirq context.
    let in_process = kind == EventKind::State
        && (state == monitor_common::tcp_state::SYN_SENT || state == monitor_common::tcp_state::LISTEN);
    Ok(Event {
        kind,
        cookie: u64_at(b, 8),
        netns: u32_at(b, 80),
        ts: match kind {
            EventKind::ProbeSent | EventKind::ProbeAnswered => u64_at(b, 16),
            _ => u64_at(b, 16).saturating_add(LIFECYCLE_STAMP_SLACK_NS),
        },
        old_state,
        state,
        local: sockaddr(ipver, &arr16(b, 24), u16_at(b, 56)),
        remote: sockaddr(ipver, &arr16(b, 40), u16_at(b, 58)),
        // The command name only where it names the owner (a String per event was 2 % of the
        // agent's time under a connection storm, `perf`).
        pid_hint: (in_process && pid != 0).then(|| {
            let comm_raw = &b[64..80];
            let end = comm_raw.iter().position(|&c| c == 0).unwrap_or(16);
            PidHint {
                pid,
                comm: String::from_utf8_lossy(&comm_raw[..end]).into_owned(),
            }
        }),
        err: u32_at(b, 60) as i32,
        had_file: u32_at(b, 84) & monitor_common::event_flag::HAD_FILE != 0,
        count: if matches!(kind, EventKind::ProbeSent | EventKind::ProbeAnswered) {
            pid
        } else {
            0
        },
    })
}

macro_rules! o {
    ($f:ident) => {
        std::mem::offset_of!(SnapRecord, $f)
    };
}

/// Decodes one iterator record. `hz` converts the kernel's jiffies stamps to milliseconds.
pub fn snap(bytes: &[u8], hz: u32) -> Result<SockSample, DecodeError> {
    let b = exact::<{ size_of::<SnapRecord>() }>(bytes)?;
    let ipver = b[o!(ipver)];
    if ipver != 4 && ipver != 6 {
        return Err(DecodeError::IpVersion(ipver));
    }
    let now = u64_at(b, o!(now_jiffies));
    let flags = b[o!(flags)];
    let hz = u64::from(hz.max(1));
    let ago = |stamp: u32| -> u32 {
        let d = u64::from((now as u32).wrapping_sub(stamp));
        (d * 1000 / hz).min(u64::from(u32::MAX)) as u32
    };
    let until = |exp: u64| {
        TcpSample::expires_ms((exp as i64).wrapping_sub(now as i64).saturating_mul(1000) / hz as i64)
    };
    // Within u16: the kernel refuses more than 32767 s (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL).
    let secs = |j: u32| -> Option<NonZeroU16> {
        NonZeroU16::new((u64::from(j) / hz).min(u64::from(u16::MAX)) as u16)
    };
    let tcp = (flags & SNAP_FULL != 0).then(|| {
        let pending = b[o!(icsk_pending)];
        let (timer, expires) = match pending {
            1 | 4 | 5 => (Timer::Retransmit, Some(until(u64_at(b, o!(rto_expires))))),
            3 => (Timer::ZeroWindowProbe, Some(until(u64_at(b, o!(rto_expires))))),
            _ if flags & SNAP_KA_TIMER != 0 => (Timer::Keepalive, Some(until(u64_at(b, o!(ka_expires))))),
            _ => (Timer::None, None),
        };
        TcpSample {
            last_data_sent_ms: ago(u32_at(b, o!(lsndtime))),
            last_data_recv_ms: ago(u32_at(b, o!(lrcvtime))),
            last_ack_recv_ms: ago(u32_at(b, o!(rcv_tstamp))),
            retransmits: b[o!(retransmits)],
            probes: b[o!(probes_out)],
            backoff: b[o!(backoff)],
            unacked: u32_at(b, o!(packets_out)),
            total_retrans: u32_at(b, o!(total_retrans)),
            timer,
            timer_expires_ms: expires.unwrap_or(0),
            keepalive: Some(flags & SNAP_KEEPOPEN != 0),
            keepalive_idle_s: secs(u32_at(b, o!(keepalive_time))),
            keepalive_intvl_s: secs(u32_at(b, o!(keepalive_intvl))),
            keepalive_cnt: NonZeroU16::new(u16::from(b[o!(keepalive_probes)])),
        }
    });
    Ok(SockSample {
        cookie: u64_at(b, o!(cookie)),
        state: b[o!(state)],
        local: sockaddr(ipver, &arr16(b, o!(saddr)), u16_at(b, o!(sport))),
        remote: sockaddr(ipver, &arr16(b, o!(daddr)), u16_at(b, o!(dport))),
        inode: u64_at(b, o!(inode)),
        uid: u32_at(b, o!(uid)),
        tcp,
    })
}

/// Decodes one socket-file record of the task_file iterator.
/// Decodes one census record of the `probe_select` iterator.
pub fn watch_flag(bytes: &[u8]) -> Result<monitor_common::WatchFlagRecord, DecodeError> {
    let b = exact::<{ size_of::<monitor_common::WatchFlagRecord>() }>(bytes)?;
    Ok(monitor_common::WatchFlagRecord {
        cookie: u64_at(b, 0),
        flags: u32_at(b, 8),
        watched: u32_at(b, 12),
    })
}

pub fn owner(bytes: &[u8]) -> Result<OwnerRecord, DecodeError> {
    let b = exact::<{ size_of::<OwnerRecord>() }>(bytes)?;
    Ok(OwnerRecord {
        inode: u64_at(b, 0),
        tgid: u32_at(b, 8),
        fd: u32_at(b, 12),
        family: u16_at(b, 16),
        protocol: b[18],
        state: b[19],
        sport: u16_at(b, 20),
        dport: u16_at(b, 22),
    })
}

/// The descriptor of `r` if it holds a dead TCP socket: an IPv4/IPv6 TCP socket in state CLOSE
/// that was connected (it has a remote port; a socket not yet connected has none).
pub fn dead_fd(r: &OwnerRecord) -> Option<DeadFd> {
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    const IPPROTO_TCP: u8 = 6;
    ((r.family == AF_INET || r.family == AF_INET6)
        && r.protocol == IPPROTO_TCP
        && r.state == tcp_state::CLOSE
        && r.dport != 0)
        .then_some(DeadFd {
            pid: r.tgid,
            fd: r.fd,
            inode: r.inode,
            sport: r.sport,
            dport: r.dport,
        })
}

/// Decodes one process lifecycle record.
pub fn proc_event(bytes: &[u8]) -> Result<ProcEvent, DecodeError> {
    let b = exact::<{ size_of::<ProcRecord>() }>(bytes)?;
    let kind = match b[0] {
        proc_kind::EXIT => ProcEventKind::Exit,
        proc_kind::FREE => ProcEventKind::Free,
        other => return Err(DecodeError::Kind(other)),
    };
    let comm_raw = &b[24..40];
    let end = comm_raw.iter().position(|&c| c == 0).unwrap_or(16);
    Ok(ProcEvent {
        kind,
        pid: u32_at(b, 4),
        ppid: u32_at(b, 8),
        exit_code: u32_at(b, 12) as i32,
        ts: u64_at(b, 16),
        comm: String::from_utf8_lossy(&comm_raw[..end]).into_owned(),
    })
}

/// The kernel's HZ from two (jiffies_64, CLOCK_MONOTONIC seconds) readings: the candidate closest
/// to the rate between them.
///
/// A single reading cannot tell: jiffies_64 starts at INITIAL_JIFFIES = 2^32 - 300*HZ, so every
/// candidate predicts the same value 300 s after boot (seen here: HZ 250 taken for 100 at that
/// uptime). The rate over 100 ms separates 100, 250, 300 and 1000 by several jiffies each.
pub fn hz_from_rate(j0: u64, t0: f64, j1: u64, t1: f64) -> Option<u32> {
    let dt = t1 - t0;
    if dt <= 0.0 || j1 < j0 {
        return None;
    }
    let rate = (j1 - j0) as f64 / dt;
    [100u32, 250, 300, 1000].into_iter().min_by(|a, b| {
        (f64::from(*a) - rate)
            .abs()
            .total_cmp(&(f64::from(*b) - rate).abs())
    })
}

#[cfg(test)]
mod tests;
