//! Poll mode: the TCP table through NETLINK_SOCK_DIAG with tcp_info (what `ss -ti` reads).
//!
//! The request is built and the replies parsed here without allocation per attribute: at 200k
//! sockets the kernel's message building is the floor, and the parser must stay far below it.
use std::net::SocketAddr;

use std::os::fd::OwnedFd;

use super::sys;
use crate::model::observe::{Coverage, NetnsId, Snapshot, SockSample, TcpSample, Timer, sockaddr};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_INFO: u16 = 2;
const NLMSG_HDR: usize = 16;
const DIAG_MSG: usize = 72;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("sock_diag netlink socket: {0} (the kernel needs CONFIG_INET_DIAG)")]
    Socket(std::io::Error),
    #[error("sock_diag {op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("sock_diag dump refused by the kernel: errno {0}")]
    Kernel(i32),
    #[error("malformed sock_diag reply: {0}")]
    Malformed(&'static str),
}

/// The 72-byte inet_diag_req_v2 request wrapped in its netlink header.
pub fn request(family: u8, seq: u32) -> [u8; NLMSG_HDR + 56] {
    let mut b = [0u8; NLMSG_HDR + 56];
    b[0..4].copy_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, id (48 bytes)
    b[16] = family;
    b[17] = IPPROTO_TCP;
    b[18] = 1 << (INET_DIAG_INFO - 1);
    // Every state but TIME_WAIT (6), CLOSE (7) and NEW_SYN_RECV (12): not sessions, and after a
    // connection storm TIME_WAIT alone can be hundreds of thousands of sockets for a minute.
    // TIME_WAIT is counted from the namespace's sockstat instead.
    let states = !((1u32 << 6) | (1 << 7) | (1 << 12));
    b[20..24].copy_from_slice(&states.to_ne_bytes());
    b
}

/// What one datagram of a dump held.
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    More,
    Done,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

/// Parses one `inet_diag_msg` with its attributes.
pub fn parse_msg(m: &[u8]) -> Result<SockSample, DiagError> {
    if m.len() < DIAG_MSG {
        return Err(DiagError::Malformed("inet_diag_msg shorter than 72 bytes"));
    }
    let family = m[0];
    let ipver = match family {
        AF_INET => 4,
        AF_INET6 => 6,
        _ => return Err(DiagError::Malformed("unknown address family")),
    };
    let state = m[1];
    let timer = m[2];
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let dport = u16::from_be_bytes([m[6], m[7]]);
    let src: [u8; 16] = m[8..24].try_into().expect("16");
    let dst: [u8; 16] = m[24..40].try_into().expect("16");
    let cookie = u64::from(u32_at(m, 44)) | (u64::from(u32_at(m, 48)) << 32);
    let expires = u32_at(m, 52);
    let uid = u32_at(m, 64);
    let inode = u64::from(u32_at(m, 68));
    let local: SocketAddr = sockaddr(ipver, &src, sport);
    let remote: SocketAddr = sockaddr(ipver, &dst, dport);
    let mut tcp = None;
    let mut p = DIAG_MSG;
    while p + 4 <= m.len() {
        let len = u16::from_ne_bytes([m[p], m[p + 1]]) as usize;
        let ty = u16::from_ne_bytes([m[p + 2], m[p + 3]]);
        if len < 4 || p + len > m.len() {
            return Err(DiagError::Malformed("attribute overruns the message"));
        }
        if ty == INET_DIAG_INFO {
            tcp = Some(tcp_info(&m[p + 4..p + len], state, timer, expires));
        }
        p += (len + 3) & !3;
    }
    Ok(SockSample {
        cookie,
        state,
        local,
        remote,
        inode,
        uid,
        tcp,
    })
}

/// Reads the fields holdfast uses from `struct tcp_info` (offsets are UAPI and stable).
fn tcp_info(t: &[u8], state: u8, timer: u8, expires: u32) -> TcpSample {
    let at = |o: usize| -> u32 { if t.len() >= o + 4 { u32_at(t, o) } else { 0 } };
    let byte = |o: usize| -> u8 { t.get(o).copied().unwrap_or(0) };
    let timer = Timer::from_diag(timer);
    TcpSample {
        last_data_sent_ms: at(44),
        last_data_recv_ms: at(52),
        last_ack_recv_ms: at(56),
        retransmits: byte(2),
        probes: byte(3),
        backoff: byte(4),
        unacked: at(24),
        total_retrans: at(100),
        timer,
        timer_expires_ms: if timer == Timer::None {
            0
        } else {
            TcpSample::expires_ms(i64::from(expires))
        },
        // sock_diag has no SO_KEEPALIVE flag: an ESTABLISHED socket with sk_timer armed has it.
        keepalive: (state == monitor_common::tcp_state::ESTABLISHED && timer != Timer::Retransmit)
            .then_some(timer == Timer::Keepalive),
        keepalive_idle_s: None,
        keepalive_intvl_s: None,
        keepalive_cnt: None,
    }
}

/// Parses one datagram of netlink messages, appending sockets to `out`.
pub fn parse_batch(buf: &[u8], seq: u32, out: &mut Vec<SockSample>) -> Result<Batch, DiagError> {
    let mut p = 0;
    while p + NLMSG_HDR <= buf.len() {
        let len = u32_at(buf, p) as usize;
        let ty = u16::from_ne_bytes([buf[p + 4], buf[p + 5]]);
        let mseq = u32_at(buf, p + 8);
        if len < NLMSG_HDR || p + len > buf.len() {
            return Err(DiagError::Malformed("netlink message overruns the datagram"));
        }
        if mseq == seq {
            match ty {
                NLMSG_DONE => return Ok(Batch::Done),
                NLMSG_ERROR => {
                    let errno = if len >= NLMSG_HDR + 4 {
                        u32_at(buf, p + NLMSG_HDR) as i32
                    } else {
                        -1
                    };
                    if errno != 0 {
                        return Err(DiagError::Kernel(-errno));
                    }
                }
                SOCK_DIAG_BY_FAMILY => out.push(parse_msg(&buf[p + NLMSG_HDR..p + len])?),
                _ => {}
            }
        }
        p += (len + 3) & !3;
    }
    Ok(Batch::More)
}

/// A sock_diag socket in the calling thread's network namespace.
pub fn socket() -> Result<OwnedFd, DiagError> {
    sys::netlink_socket(nix::sys::socket::SockProtocol::NetlinkSockDiag).map_err(DiagError::Socket)
}

/// Dumps every TCP socket (IPv4 and IPv6) of the namespace `sock` was opened in.
pub fn dump_on(sock: &OwnedFd, netns: NetnsId) -> Result<Snapshot, DiagError> {
    let started = sys::monotonic_ns();
    let mut buf = vec![0u8; 256 * 1024];
    let mut socks = Vec::new();
    for (i, family) in [AF_INET, AF_INET6].into_iter().enumerate() {
        let seq = i as u32 + 1;
        sys::netlink_send(sock, &request(family, seq))
            .map_err(|source| DiagError::Io { op: "send", source })?;
        loop {
            let n =
                sys::netlink_recv(sock, &mut buf).map_err(|source| DiagError::Io { op: "recv", source })?;
            if n == 0 {
                return Err(DiagError::Malformed("the dump ended without NLMSG_DONE"));
            }
            if parse_batch(&buf[..n], seq, &mut socks)? == Batch::Done {
                break;
            }
        }
    }
    Ok(Snapshot::taken(
        netns,
        (started, sys::monotonic_ns()),
        socks,
        Coverage::Complete,
    ))
}

/// Dumps every TCP socket of the calling thread's network namespace.
pub fn dump(netns: NetnsId) -> Result<Snapshot, DiagError> {
    dump_on(&socket()?, netns)
}

const SOCK_DESTROY: u16 = 21;
const NLM_F_ACK: u16 = 0x4;

/// The SOCK_DESTROY request for one socket: the exact tuple plus its cookie, so that a reused
/// tuple can never be hit (the kernel compares the cookie).
pub fn destroy_request(
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    state: u8,
    cookie: u64,
    seq: u32,
) -> [u8; NLMSG_HDR + 56] {
    let family = if local.is_ipv4() && remote.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    let id = SockId {
        cookie,
        local,
        remote,
    };
    exact_request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        0,
        1u32 << state,
        family,
        &id,
        seq,
    )
}

/// One socket named exactly: its tuple and its cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockId {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// A request naming exactly one socket (`inet_diag_req_v2` with the full `inet_diag_sockid`).
/// With `family` AF_INET6, IPv4 addresses are written v4-mapped (a dual-stack socket).
fn exact_request(
    ty: u16,
    flags: u16,
    ext: u8,
    states: u32,
    family: u8,
    id: &SockId,
    seq: u32,
) -> [u8; NLMSG_HDR + 56] {
    let mut b = [0u8; NLMSG_HDR + 56];
    b[0..4].copy_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&ty.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    let v6 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    };
    b[16] = family;
    b[17] = IPPROTO_TCP;
    b[18] = ext;
    b[20..24].copy_from_slice(&states.to_ne_bytes());
    // inet_diag_sockid at 24: sport, dport (network order), src[16], dst[16], if, cookie[2]
    b[24..26].copy_from_slice(&id.local.port().to_be_bytes());
    b[26..28].copy_from_slice(&id.remote.port().to_be_bytes());
    let (src, dst) = if family == AF_INET {
        let four = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(a) => a.octets(),
            std::net::IpAddr::V6(a) => a.to_ipv4_mapped().map_or([0; 4], |x| x.octets()),
        };
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s[..4].copy_from_slice(&four(id.local.ip()));
        d[..4].copy_from_slice(&four(id.remote.ip()));
        (s, d)
    } else {
        (v6(id.local.ip()), v6(id.remote.ip()))
    };
    b[28..44].copy_from_slice(&src);
    b[44..60].copy_from_slice(&dst);
    b[64..68].copy_from_slice(&(id.cookie as u32).to_ne_bytes());
    b[68..72].copy_from_slice(&((id.cookie >> 32) as u32).to_ne_bytes());
    b
}

/// Reads exactly the sockets `ids` with tcp_info, one request each, through `sock` (opened in
/// their namespace): fresh values for a query, without a dump of the whole table. A socket not
/// found (closed since) is left out. An IPv4 tuple is looked up as AF_INET, then as a dual-stack
/// AF_INET6 socket.
pub fn lookup_on(sock: &OwnedFd, netns: NetnsId, ids: &[SockId]) -> Result<Snapshot, DiagError> {
    let started = sys::monotonic_ns();
    let mut buf = vec![0u8; 16 * 1024];
    let mut socks = Vec::with_capacity(ids.len());
    let mut seq = 0u32;
    for id in ids {
        let families: &[u8] = if id.local.is_ipv4() && id.remote.is_ipv4() {
            &[AF_INET, AF_INET6]
        } else {
            &[AF_INET6]
        };
        for &family in families {
            seq = seq.wrapping_add(1);
            let req = exact_request(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST,
                1 << (INET_DIAG_INFO - 1),
                !0,
                family,
                id,
                seq,
            );
            sys::netlink_send(sock, &req).map_err(|source| DiagError::Io { op: "send", source })?;
            let before = socks.len();
            let n =
                sys::netlink_recv(sock, &mut buf).map_err(|source| DiagError::Io { op: "recv", source })?;
            // One reply per request: the socket, or an error (ENOENT: not there).
            match parse_batch(&buf[..n], seq, &mut socks) {
                Ok(_) | Err(DiagError::Kernel(_)) => {}
                Err(e) => return Err(e),
            }
            let found = socks.len() > before;
            if found {
                break;
            }
        }
    }
    Ok(Snapshot::taken(
        netns,
        (started, sys::monotonic_ns()),
        socks,
        Coverage::Targeted,
    ))
}

/// Aborts one TCP socket through sock_diag (CONFIG_INET_DIAG_DESTROY) on a socket opened in the
/// flow's namespace: its owner sees ECONNABORTED. Err carries the errno (EOPNOTSUPP without the
/// kernel option, ENOENT if gone).
pub fn destroy_on(
    sock: &OwnedFd,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    state: u8,
    cookie: u64,
) -> Result<(), std::io::Error> {
    sys::netlink_send(sock, &destroy_request(local, remote, state, cookie, 1))?;
    let mut buf = [0u8; 4096];
    let n = sys::netlink_recv(sock, &mut buf)?;
    if n >= NLMSG_HDR + 4 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let errno = -(u32_at(&buf, NLMSG_HDR) as i32);
        return if errno == 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(errno))
        };
    }
    Err(std::io::Error::other("unexpected SOCK_DESTROY reply"))
}

#[cfg(test)]
mod tests;
