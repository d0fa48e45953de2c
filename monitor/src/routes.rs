//! Which path a destination takes (rtnetlink RTM_GETROUTE): local, on-link, or via a gateway.
//! Only flows via a gateway can cross a NAT or load balancer without a rule saying so.
use std::collections::HashMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::sys;

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RTA_VIA: u16 = 18;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// This host (loopback or a local address): no middlebox.
    Local,
    /// Directly reachable on a link: no middlebox on the way.
    OnLink,
    /// Through a gateway: may cross NATs, firewalls, load balancers.
    Gateway(String),
    /// No route, or a route type holdfast does not classify.
    Unknown,
}

/// The RTM_GETROUTE request for one destination.
pub fn request(dst: IpAddr, seq: u32) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match dst {
        IpAddr::V4(a) => (2, a.octets().to_vec()),
        IpAddr::V6(a) => (10, a.octets().to_vec()),
    };
    let attr_len = 4 + addr.len();
    let len = 16 + 12 + attr_len;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    b.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags(u32)
    b.extend_from_slice(&[family, (addr.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    b.extend_from_slice(&RTA_DST.to_ne_bytes());
    b.extend_from_slice(&addr);
    b
}

/// Classifies the kernel's reply.
pub fn parse(reply: &[u8]) -> Path {
    if reply.len() < 16 + 12 {
        return Path::Unknown;
    }
    let ty = u16::from_ne_bytes([reply[4], reply[5]]);
    if ty == NLMSG_ERROR || ty != RTM_NEWROUTE {
        return Path::Unknown;
    }
    let len = (u32::from_ne_bytes(reply[0..4].try_into().expect("4")) as usize).min(reply.len());
    let family = reply[16];
    let rtype = reply[16 + 7];
    if rtype == RTN_LOCAL {
        return Path::Local;
    }
    if rtype != RTN_UNICAST {
        return Path::Unknown;
    }
    let mut p = 16 + 12;
    while p + 4 <= len {
        let alen = u16::from_ne_bytes([reply[p], reply[p + 1]]) as usize;
        let aty = u16::from_ne_bytes([reply[p + 2], reply[p + 3]]);
        if alen < 4 || p + alen > len {
            break;
        }
        let data = &reply[p + 4..p + alen];
        if aty == RTA_GATEWAY {
            let gw = match (family, data.len()) {
                (2, 4) => IpAddr::from(<[u8; 4]>::try_from(data).expect("4")).to_string(),
                (10, 16) => IpAddr::from(<[u8; 16]>::try_from(data).expect("16")).to_string(),
                _ => "?".into(),
            };
            return Path::Gateway(gw);
        }
        if aty == RTA_VIA {
            return Path::Gateway("via".into());
        }
        p += (alen + 3) & !3;
    }
    Path::OnLink
}

/// Route lookups with a cache (routes change rarely; the cache is dropped on a timer).
#[derive(Default)]
pub struct Router {
    cache: HashMap<IpAddr, Path>,
    seq: u32,
}

impl Router {
    pub fn path(&mut self, dst: IpAddr) -> Path {
        if dst.is_loopback() {
            return Path::Local;
        }
        if let Some(p) = self.cache.get(&dst) {
            return p.clone();
        }
        self.seq = self.seq.wrapping_add(1);
        let path = sys::netlink_socket(libc::NETLINK_ROUTE)
            .and_then(|s| {
                sys::netlink_send(&s, &request(dst, self.seq))?;
                let mut buf = vec![0u8; 8192];
                let n = sys::netlink_recv(&s, &mut buf)?;
                Ok(parse(&buf[..n]))
            })
            .unwrap_or(Path::Unknown);
        if self.cache.len() > 100_000 {
            self.cache.clear();
        }
        self.cache.insert(dst, path.clone());
        path
    }

    pub fn forget(&mut self) {
        self.cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(rtype: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        b.extend_from_slice(&[2, 32, 0, 0, 254, 0, 0, rtype, 0, 0, 0, 0]);
        for (ty, data) in attrs {
            let l = 4 + data.len();
            b.extend_from_slice(&(l as u16).to_ne_bytes());
            b.extend_from_slice(&ty.to_ne_bytes());
            b.extend_from_slice(data);
            while b.len() % 4 != 0 {
                b.push(0);
            }
        }
        let n = b.len() as u32;
        b[0..4].copy_from_slice(&n.to_ne_bytes());
        b
    }

    #[test]
    fn classifies_routes() {
        assert_eq!(parse(&reply(RTN_LOCAL, &[])), Path::Local);
        assert_eq!(parse(&reply(RTN_UNICAST, &[(4, &[2, 0, 0, 0])])), Path::OnLink);
        assert_eq!(
            parse(&reply(
                RTN_UNICAST,
                &[(4, &[2, 0, 0, 0]), (RTA_GATEWAY, &[10, 0, 0, 1])]
            )),
            Path::Gateway("10.0.0.1".into())
        );
        assert_eq!(parse(&reply(7, &[])), Path::Unknown);
        assert_eq!(parse(&[0u8; 10]), Path::Unknown);
        let req = request("192.0.2.1".parse().unwrap(), 3);
        assert_eq!(req.len(), 36);
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()), 36);
    }

    #[test]
    fn loopback_is_local_without_asking() {
        let mut r = Router::default();
        assert_eq!(r.path("127.0.0.1".parse().unwrap()), Path::Local);
        assert_eq!(r.path("::1".parse().unwrap()), Path::Local);
    }
}
