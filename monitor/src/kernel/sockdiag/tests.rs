use super::*;

fn msg(state: u8, timer: u8, with_info: bool) -> Vec<u8> {
    let mut m = vec![0u8; DIAG_MSG];
    m[0] = AF_INET;
    m[1] = state;
    m[2] = timer;
    m[4..6].copy_from_slice(&22u16.to_be_bytes());
    m[6..8].copy_from_slice(&50000u16.to_be_bytes());
    m[8..12].copy_from_slice(&[10, 1, 0, 1]);
    m[24..28].copy_from_slice(&[10, 1, 0, 2]);
    m[44..48].copy_from_slice(&7u32.to_ne_bytes());
    m[48..52].copy_from_slice(&1u32.to_ne_bytes());
    m[52..56].copy_from_slice(&1500u32.to_ne_bytes());
    m[68..72].copy_from_slice(&999u32.to_ne_bytes());
    if with_info {
        let mut info = vec![0u8; 232];
        info[44..48].copy_from_slice(&3000u32.to_ne_bytes());
        info[52..56].copy_from_slice(&4000u32.to_ne_bytes());
        info[56..60].copy_from_slice(&100u32.to_ne_bytes());
        info[100..104].copy_from_slice(&9u32.to_ne_bytes());
        m.extend_from_slice(&((info.len() + 4) as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        m.extend_from_slice(&info);
    }
    m
}

fn wrap(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&((NLMSG_HDR + payload.len()) as u32).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(payload);
    while b.len() % 4 != 0 {
        b.push(0);
    }
    b
}

#[test]
fn parses_a_socket_with_tcp_info() {
    let s = parse_msg(&msg(1, 2, true)).unwrap();
    assert_eq!(s.cookie, (1 << 32) | 7);
    assert_eq!(s.local.to_string(), "10.1.0.1:22");
    assert_eq!(s.remote.to_string(), "10.1.0.2:50000");
    assert_eq!(s.inode, 999);
    let t = s.tcp.unwrap();
    assert_eq!(
        (t.last_data_sent_ms, t.last_data_recv_ms, t.last_ack_recv_ms),
        (3000, 4000, 100)
    );
    assert_eq!(t.total_retrans, 9);
    assert_eq!(t.timer, Timer::Keepalive);
    assert_eq!(t.timer_expires(), Some(1500));
    assert_eq!(t.keepalive, Some(true));
}

#[test]
fn batches_end_on_done_and_surface_errors() {
    let mut dgram = wrap(SOCK_DIAG_BY_FAMILY, 1, &msg(1, 0, true));
    dgram.extend(wrap(SOCK_DIAG_BY_FAMILY, 1, &msg(10, 0, false)));
    let mut out = Vec::new();
    assert_eq!(parse_batch(&dgram, 1, &mut out).unwrap(), Batch::More);
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].tcp, None);
    assert_eq!(
        parse_batch(&wrap(NLMSG_DONE, 1, &[0; 4]), 1, &mut out).unwrap(),
        Batch::Done
    );
    let err = wrap(NLMSG_ERROR, 1, &(-13i32).to_ne_bytes());
    assert!(matches!(
        parse_batch(&err, 1, &mut out),
        Err(DiagError::Kernel(13))
    ));
}

#[test]
fn destroys_a_real_socket_by_tuple_and_cookie() {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut a, _) = l.accept().unwrap();
    let snap = dump(0).unwrap();
    let me = snap
        .socks
        .iter()
        .find(|x| x.local == a.local_addr().unwrap() && x.remote == a.peer_addr().unwrap())
        .unwrap();
    let sock = socket().unwrap();
    // A wrong cookie never hits the socket.
    let wrong = destroy_on(&sock, me.local, me.remote, me.state, me.cookie ^ 1);
    if wrong.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EOPNOTSUPP) {
        crate::testing::skip(
            "destroys_a_real_socket_by_tuple_and_cookie",
            "this kernel lacks CONFIG_INET_DIAG_DESTROY",
        );
        return;
    }
    assert!(wrong.is_err());
    destroy_on(&sock, me.local, me.remote, me.state, me.cookie).unwrap();
    let e = a.read(&mut [0u8; 1]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED));
    drop(c);
}

#[test]
fn rejects_truncated_messages() {
    let m = msg(1, 0, true);
    assert!(parse_msg(&m[..40]).is_err());
    assert!(parse_msg(&m[..DIAG_MSG + 10]).is_err(), "attribute cut in half");
    let dgram = wrap(SOCK_DIAG_BY_FAMILY, 1, &m);
    assert!(parse_batch(&dgram[..dgram.len() - 8], 1, &mut Vec::new()).is_err());
}

#[test]
fn looks_up_exactly_the_sockets_named() {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (_a, _) = l.accept().unwrap();
    // A dual-stack listener: its accepted socket is AF_INET6 with v4-mapped addresses, which
    // holdfast keeps as IPv4.
    let l6 = std::net::TcpListener::bind("[::]:0");
    let six = l6.ok().and_then(|l6| {
        let port = l6.local_addr().ok()?.port();
        let c6 = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        let (a6, _) = l6.accept().ok()?;
        Some((l6, c6, a6))
    });
    let table = dump(0).unwrap();
    let find = |local: SocketAddr, remote: SocketAddr| {
        table
            .socks
            .iter()
            .find(|x| x.local == local && x.remote == remote)
            .cloned()
            .unwrap()
    };
    let me = find(c.local_addr().unwrap(), c.peer_addr().unwrap());
    c.write_all(b"x").unwrap();
    let mut ids = vec![
        SockId {
            cookie: me.cookie,
            local: me.local,
            remote: me.remote,
        },
        // A cookie that is not this tuple's: never reported.
        SockId {
            cookie: me.cookie ^ 1,
            local: me.local,
            remote: me.remote,
        },
    ];
    let mapped = six.as_ref().map(|(_, _, a6)| {
        let v4 = |a: SocketAddr| SocketAddr::new("127.0.0.1".parse().unwrap(), a.port());
        let s = find(v4(a6.local_addr().unwrap()), v4(a6.peer_addr().unwrap()));
        ids.push(SockId {
            cookie: s.cookie,
            local: s.local,
            remote: s.remote,
        });
        s.cookie
    });
    let got = lookup_on(&socket().unwrap(), 0, &ids).unwrap();
    assert_eq!(got.coverage, Coverage::Targeted);
    let cookies: Vec<u64> = got.socks.iter().map(|s| s.cookie).collect();
    let mut want = vec![me.cookie];
    want.extend(mapped);
    assert_eq!(
        cookies, want,
        "the named sockets, each once; the wrong cookie matched none"
    );
    assert!(got.socks[0].tcp.is_some(), "with tcp_info");
}
