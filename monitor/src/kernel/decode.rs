//! Pure decoders for the records the eBPF programs emit (`&[u8] -> Result<_, DecodeError>`).
use std::mem::size_of;

use monitor_common::{
    EventRecord, ProcRecord, SNAP_FULL, SNAP_KA_TIMER, SNAP_KEEPOPEN, SnapRecord, kind, proc_kind,
};

use crate::model::observe::{
    Event, EventKind, PidHint, ProcEvent, ProcEventKind, SockSample, TcpSample, Timer, sockaddr,
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
        other => return Err(DecodeError::Kind(other)),
    };
    let ipver = b[1];
    if ipver != 4 && ipver != 6 {
        return Err(DecodeError::IpVersion(ipver));
    }
    let (old_state, state) = (b[2], b[3]);
    let pid = u32_at(b, 4);
    let comm_raw = &b[64..80];
    let end = comm_raw.iter().position(|&c| c == 0).unwrap_or(16);
    let comm = String::from_utf8_lossy(&comm_raw[..end]).into_owned();
    // The pid is the owner's only when the transition runs in the owner's system call:
    // connect() (-> SYN_SENT) and listen() (-> LISTEN). Others may run in softirq context.
    let in_process = kind == EventKind::State
        && (state == monitor_common::tcp_state::SYN_SENT || state == monitor_common::tcp_state::LISTEN);
    Ok(Event {
        kind,
        cookie: u64_at(b, 8),
        netns: u32_at(b, 80),
        ts: u64_at(b, 16),
        old_state,
        state,
        local: sockaddr(ipver, &arr16(b, 24), u16_at(b, 56)),
        remote: sockaddr(ipver, &arr16(b, 40), u16_at(b, 58)),
        pid_hint: (in_process && pid != 0).then_some(PidHint { pid, comm }),
        err: u32_at(b, 60) as i32,
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
    let until = |exp: u64| -> i64 { (exp as i64).wrapping_sub(now as i64) * 1000 / hz as i64 };
    let secs = |j: u32| -> Option<u32> { (j != 0).then(|| (u64::from(j) / hz) as u32) };
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
            timer_expires_ms: expires,
            keepalive: Some(flags & SNAP_KEEPOPEN != 0),
            keepalive_idle_s: secs(u32_at(b, o!(keepalive_time))),
            keepalive_intvl_s: secs(u32_at(b, o!(keepalive_intvl))),
            keepalive_cnt: (b[o!(keepalive_probes)] != 0).then_some(u32::from(b[o!(keepalive_probes)])),
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
mod tests {
    use super::*;
    use monitor_common::tcp_state;

    fn ev_bytes(r: &EventRecord) -> Vec<u8> {
        // SAFETY-free: build bytes field by field in the ABI layout.
        let mut b = vec![0u8; 88];
        b[0] = r.kind;
        b[1] = r.ipver;
        b[2] = r.old_state;
        b[3] = r.new_state;
        b[4..8].copy_from_slice(&r.pid.to_ne_bytes());
        b[8..16].copy_from_slice(&r.cookie.to_ne_bytes());
        b[16..24].copy_from_slice(&r.ts_ns.to_ne_bytes());
        b[24..40].copy_from_slice(&words(r.saddr));
        b[40..56].copy_from_slice(&words(r.daddr));
        b[56..58].copy_from_slice(&r.sport.to_ne_bytes());
        b[58..60].copy_from_slice(&r.dport.to_ne_bytes());
        b[60..64].copy_from_slice(&r.err.to_ne_bytes());
        b[64..80].copy_from_slice(&words(r.comm));
        b[80..84].copy_from_slice(&r.netns.to_ne_bytes());
        b
    }

    fn words(w: [u64; 2]) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&w[0].to_ne_bytes());
        b[8..].copy_from_slice(&w[1].to_ne_bytes());
        b
    }

    fn unwords(b: [u8; 16]) -> [u64; 2] {
        [
            u64::from_ne_bytes(b[..8].try_into().unwrap()),
            u64::from_ne_bytes(b[8..].try_into().unwrap()),
        ]
    }

    fn rec(kind: u8, new_state: u8) -> EventRecord {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        EventRecord {
            kind,
            ipver: 4,
            old_state: 7,
            new_state,
            pid: 42,
            cookie: 0xdead_beef,
            ts_ns: 5,
            saddr: unwords(saddr),
            daddr: unwords(daddr),
            sport: 40000,
            dport: 22,
            err: 0,
            comm: unwords(comm),
            netns: 4_026_531_840,
            _pad: 0,
        }
    }

    #[test]
    fn decodes_a_connect_with_its_owner() {
        let e = event(&ev_bytes(&rec(kind::STATE, tcp_state::SYN_SENT))).unwrap();
        assert_eq!(e.kind, EventKind::State);
        assert_eq!(e.cookie, 0xdead_beef);
        assert_eq!(e.local.to_string(), "10.0.0.1:40000");
        assert_eq!(e.remote.to_string(), "10.0.0.2:22");
        assert_eq!(e.netns, 4_026_531_840);
        assert_eq!(
            e.pid_hint,
            Some(PidHint {
                pid: 42,
                comm: "curl".into()
            })
        );
    }

    #[test]
    fn softirq_transitions_carry_no_owner() {
        let e = event(&ev_bytes(&rec(kind::STATE, tcp_state::ESTABLISHED))).unwrap();
        assert_eq!(e.pid_hint, None);
        let e = event(&ev_bytes(&rec(kind::RECV_RST, tcp_state::ESTABLISHED))).unwrap();
        assert_eq!(e.kind, EventKind::RecvRst);
        assert_eq!(e.pid_hint, None);
    }

    #[test]
    fn decodes_ipv6_and_mapped_v4() {
        let mut r = rec(kind::STATE, tcp_state::ESTABLISHED);
        r.ipver = 6;
        r.saddr = unwords(std::net::Ipv6Addr::LOCALHOST.octets());
        r.daddr = unwords(std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().octets());
        let e = event(&ev_bytes(&r)).unwrap();
        assert_eq!(e.local.to_string(), "[::1]:40000");
        assert_eq!(e.remote.to_string(), "192.0.2.1:22");
    }

    #[test]
    fn rejects_truncated_oversized_and_unknown() {
        let b = ev_bytes(&rec(kind::STATE, 1));
        assert_eq!(
            event(&b[..87]),
            Err(DecodeError::Size {
                expected: 88,
                found: 87
            })
        );
        let mut big = b.clone();
        big.push(0);
        assert!(matches!(event(&big), Err(DecodeError::Size { .. })));
        assert_eq!(
            event(&[]),
            Err(DecodeError::Size {
                expected: 88,
                found: 0
            })
        );
        let mut unknown = b.clone();
        unknown[0] = kind::MAX + 1;
        assert_eq!(event(&unknown), Err(DecodeError::Kind(kind::MAX + 1)));
        let mut zero = b.clone();
        zero[0] = 0;
        assert_eq!(event(&zero), Err(DecodeError::Kind(0)));
        let mut badver = b;
        badver[1] = 5;
        assert_eq!(event(&badver), Err(DecodeError::IpVersion(5)));
    }

    fn snap_bytes(state: u8, flags: u8) -> Vec<u8> {
        let mut b = vec![0u8; 128];
        b[0..8].copy_from_slice(&77u64.to_ne_bytes());
        b[8..16].copy_from_slice(&12345u64.to_ne_bytes());
        let now: u64 = (1 << 32) + 1000;
        b[16..24].copy_from_slice(&now.to_ne_bytes());
        b[24..32].copy_from_slice(&(now + 250).to_ne_bytes()); // keepalive fires in 1 s at HZ 250
        b[40..44].copy_from_slice(&[127, 0, 0, 1]);
        b[56..60].copy_from_slice(&[127, 0, 0, 2]);
        b[72..76].copy_from_slice(&1000u32.to_ne_bytes());
        b[76..80].copy_from_slice(&((now as u32).wrapping_sub(500)).to_ne_bytes()); // sent 2 s ago
        b[80..84].copy_from_slice(&((now as u32).wrapping_sub(2000)).to_ne_bytes()); // wraps
        b[84..88].copy_from_slice(&(now as u32).to_ne_bytes());
        b[100..104].copy_from_slice(&(30 * 250u32).to_ne_bytes());
        b[108..110].copy_from_slice(&5000u16.to_ne_bytes());
        b[110..112].copy_from_slice(&80u16.to_ne_bytes());
        b[112] = 4;
        b[113] = state;
        b[118] = 4; // keepalive_probes
        b[127] = flags;
        b
    }

    #[test]
    fn decodes_iterator_records_with_jiffies_wraparound() {
        let s = snap(
            &snap_bytes(tcp_state::ESTABLISHED, SNAP_FULL | SNAP_KEEPOPEN | SNAP_KA_TIMER),
            250,
        )
        .unwrap();
        assert_eq!(s.cookie, 77);
        assert_eq!(s.inode, 12345);
        assert_eq!(s.local.to_string(), "127.0.0.1:5000");
        assert_eq!(s.remote.to_string(), "127.0.0.2:80");
        let t = s.tcp.unwrap();
        assert_eq!(t.last_data_sent_ms, 2000);
        assert_eq!(t.last_data_recv_ms, 8000);
        assert_eq!(t.last_ack_recv_ms, 0);
        assert_eq!(t.timer, Timer::Keepalive);
        assert_eq!(t.timer_expires_ms, Some(1000));
        assert_eq!(t.keepalive, Some(true));
        assert_eq!(t.keepalive_idle_s, Some(30));
        assert_eq!(t.keepalive_intvl_s, None);
        assert_eq!(t.keepalive_cnt, Some(4));
    }

    #[test]
    fn time_wait_records_have_no_tcp_fields() {
        let s = snap(&snap_bytes(tcp_state::TIME_WAIT, 0), 250).unwrap();
        assert_eq!(s.tcp, None);
        assert!(matches!(
            snap(&snap_bytes(1, 0)[..100], 250),
            Err(DecodeError::Size { .. })
        ));
    }

    #[test]
    fn decodes_process_records() {
        let mut b = vec![0u8; 48];
        b[0] = proc_kind::EXIT;
        b[4..8].copy_from_slice(&1234u32.to_ne_bytes());
        b[8..12].copy_from_slice(&99u32.to_ne_bytes());
        b[16..24].copy_from_slice(&7u64.to_ne_bytes());
        b[24..28].copy_from_slice(b"true");
        let e = proc_event(&b).unwrap();
        assert_eq!(
            (e.kind, e.pid, e.ppid, e.ts, e.comm.as_str()),
            (ProcEventKind::Exit, 1234, 99, 7, "true")
        );
        assert!(matches!(proc_event(&b[..47]), Err(DecodeError::Size { .. })));
        b[0] = 9;
        assert_eq!(proc_event(&b), Err(DecodeError::Kind(9)));
    }

    #[test]
    fn hz_from_the_jiffies_rate() {
        // Readings 100 ms apart, one jiffy of jitter either way.
        for hz in [100u32, 250, 300, 1000] {
            let j0 = (1u64 << 32) - 300 * u64::from(hz);
            for jitter in [-1i64, 0, 1] {
                let j1 = (j0 as i64 + i64::from(hz) / 10 + jitter) as u64;
                assert_eq!(
                    hz_from_rate(j0, 300.0, j1, 300.1),
                    Some(hz),
                    "hz {hz} jitter {jitter}"
                );
            }
        }
        assert_eq!(hz_from_rate(10, 1.0, 5, 2.0), None);
        assert_eq!(hz_from_rate(10, 1.0, 20, 1.0), None);
    }
}
