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
    b[84..88].copy_from_slice(&r.flags.to_ne_bytes());
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
        flags: monitor_common::event_flag::HAD_FILE,
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
    assert!(e.had_file);
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
    assert_eq!(t.timer_expires(), Some(1000));
    assert_eq!(t.keepalive, Some(true));
    assert_eq!(t.keepalive_idle_s, NonZeroU16::new(30));
    assert_eq!(t.keepalive_intvl_s, None);
    assert_eq!(t.keepalive_cnt, NonZeroU16::new(4));
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

#[test]
fn a_lifecycle_stamp_is_never_earlier_than_its_event_and_a_probe_stamp_is_exact() {
    // Lifecycle records carry the clock read at the first record of their jiffy (up to a tick
    // early): decoded, their time is an upper bound. Probe records carry the exact clock.
    let e = event(&ev_bytes(&rec(kind::STATE, tcp_state::ESTABLISHED))).unwrap();
    assert_eq!(e.ts, 5 + LIFECYCLE_STAMP_SLACK_NS);
    let e = event(&ev_bytes(&rec(kind::RECV_RST, tcp_state::ESTABLISHED))).unwrap();
    assert_eq!(e.ts, 5 + LIFECYCLE_STAMP_SLACK_NS);
    let e = event(&ev_bytes(&rec(kind::PROBE_SENT, tcp_state::ESTABLISHED))).unwrap();
    assert_eq!(e.ts, 5);
}
