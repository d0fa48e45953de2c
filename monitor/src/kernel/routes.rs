//! Which path a destination takes from a network namespace (rtnetlink RTM_GETROUTE through
//! netlink-packet-route): local, on-link, or via a gateway.
use std::collections::HashMap;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use super::netns::NsHandle;
use crate::model::eviction::RoutePath;
use crate::model::observe::NetnsId;

/// The RTM_GETROUTE request for one destination.
pub fn request(dst: IpAddr, seq: u32) -> Vec<u8> {
    let mut rm = RouteMessage::default();
    rm.header.address_family = match dst {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    rm.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
    rm.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(rm)),
    );
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Classifies the kernel's reply.
pub fn parse(reply: &[u8]) -> RoutePath {
    let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(reply) else {
        return RoutePath::Unknown;
    };
    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(rm)) = msg.payload else {
        return RoutePath::Unknown;
    };
    match rm.header.kind {
        RouteType::Local => return RoutePath::Local,
        RouteType::Unicast => {}
        _ => return RoutePath::Unknown,
    }
    for a in &rm.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => return RoutePath::Gateway(ip.to_string()),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => return RoutePath::Gateway(ip.to_string()),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => return RoutePath::Gateway("via".into()),
            _ => {}
        }
    }
    RoutePath::OnLink
}

/// Asks the kernel through `s` which path `dst` takes.
pub fn query(s: &Socket, dst: IpAddr, seq: u32) -> std::io::Result<RoutePath> {
    s.send(&request(dst, seq), 0)?;
    let mut buf = vec![0u8; 8192];
    let n = s.recv(&mut &mut buf[..], 0)?;
    Ok(parse(&buf[..n.min(buf.len())]))
}

/// A socket in the calling thread's namespace.
pub fn own_socket() -> std::io::Result<Socket> {
    Socket::new(NETLINK_ROUTE)
}

/// Route lookups per namespace, with a cache (routes change rarely; the cache is dropped on a
/// timer and when it grows too large). A lookup in another namespace opens its rtnetlink socket
/// there (entering the namespace for a moment).
#[derive(Default)]
pub struct Router {
    cache: HashMap<(NetnsId, IpAddr), RoutePath>,
    seq: u32,
}

/// Cached lookups at most (about 100 bytes each).
const CACHE_MAX: usize = 100_000;

impl Router {
    pub fn path(&mut self, ns: &NsHandle, dst: IpAddr) -> RoutePath {
        let netns = ns.id;
        if dst.is_loopback() {
            return RoutePath::Local;
        }
        if let Some(p) = self.cache.get(&(netns, dst)) {
            return p.clone();
        }
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let path = ns
            .within(own_socket)
            .ok()
            .and_then(|s| s.ok())
            .and_then(|s| query(&s, dst, seq).ok())
            .unwrap_or(RoutePath::Unknown);
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert((netns, dst), path.clone());
        path
    }

    pub fn forget(&mut self) {
        self.cache.clear();
        self.cache.shrink_to_fit();
    }

    /// Drops the cache of a namespace that disappeared.
    pub fn forget_netns(&mut self, netns: NetnsId) {
        self.cache.retain(|(n, _), _| *n != netns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;

    fn reply(kind: RouteType, attrs: Vec<RouteAttribute>) -> Vec<u8> {
        let mut rm = RouteMessage::default();
        rm.header.address_family = AddressFamily::Inet;
        rm.header.destination_prefix_length = 32;
        rm.header.kind = kind;
        rm.attributes = attrs;
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(rm)),
        );
        msg.finalize();
        let mut b = vec![0u8; msg.buffer_len()];
        msg.emit(&mut b);
        b
    }

    #[test]
    fn classifies_routes() {
        let dst = RouteAttribute::Destination(RouteAddress::Inet([2, 0, 0, 0].into()));
        assert_eq!(parse(&reply(RouteType::Local, vec![])), RoutePath::Local);
        assert_eq!(
            parse(&reply(RouteType::Unicast, vec![dst.clone()])),
            RoutePath::OnLink
        );
        assert_eq!(
            parse(&reply(
                RouteType::Unicast,
                vec![
                    dst,
                    RouteAttribute::Gateway(RouteAddress::Inet([10, 0, 0, 1].into()))
                ]
            )),
            RoutePath::Gateway("10.0.0.1".into())
        );
        assert_eq!(parse(&reply(RouteType::BlackHole, vec![])), RoutePath::Unknown);
        assert_eq!(parse(&[0u8; 10]), RoutePath::Unknown);
        let req = request("192.0.2.1".parse().unwrap(), 3);
        assert_eq!(req.len(), 36);
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()), 36);
    }

    #[test]
    fn loopback_is_local_without_asking_and_real_routes_answer() {
        let mut r = Router::default();
        let own = NsHandle {
            id: super::super::netns::own_id(),
            path: "/proc/self/ns/net".into(),
        };
        assert_eq!(r.path(&own, "127.0.0.1".parse().unwrap()), RoutePath::Local);
        assert_eq!(r.path(&own, "::1".parse().unwrap()), RoutePath::Local);
        // The real kernel, through netlink-packet-route: 127.0.0.1 is a local route.
        let s = own_socket().expect("rtnetlink socket");
        assert_eq!(
            query(&s, "127.0.0.1".parse().unwrap(), 1).unwrap(),
            RoutePath::Local
        );
    }
}
