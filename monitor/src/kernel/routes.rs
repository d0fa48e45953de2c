//! Which path a destination takes from a network namespace (rtnetlink RTM_GETROUTE through
//! netlink-packet-route): local, on-link, or via a gateway; and whether a namespace's routes
//! changed (a digest of its route and rule tables, compared on a timer).
use std::collections::HashMap;
use std::hash::Hasher;
use std::net::IpAddr;

use netlink_packet_core::{
    Emitable, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::rule::RuleMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use super::netns::NsHandle;
use crate::model::eviction::RoutePath;
use crate::model::observe::NetnsId;
use crate::model::time::{Nanos, SEC};

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

/// Route and rule entries a digest reads at most: a namespace with more (a full BGP table) is
/// not followed by digest; its quiet flows are judged again every `REJUDGE_MIN` instead.
const DUMP_MAX: usize = 20_000;

/// A dump request (routes or rules, every table and family).
fn dump_request(msg: RouteNetlinkMessage, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Adds one dumped entry to the digest. The kernel's counters
/// and ages in a route (its cache info, expiry, multicast statistics) are left out: they move
/// without the path moving.
fn digest_entry(msg: RouteNetlinkMessage, h: &mut impl Hasher, scratch: &mut Vec<u8>) {
    let mut emit = |e: &dyn Emitable| {
        scratch.clear();
        scratch.resize(e.buffer_len(), 0);
        e.emit(scratch);
        h.write(scratch);
    };
    match msg {
        RouteNetlinkMessage::NewRoute(mut rm) => {
            rm.attributes.retain(|a| {
                !matches!(
                    a,
                    RouteAttribute::CacheInfo(_)
                        | RouteAttribute::Expires(_)
                        | RouteAttribute::MulticastExpires(_)
                        | RouteAttribute::MfcStats(_)
                )
            });
            emit(&rm);
        }
        RouteNetlinkMessage::NewRule(r) => emit(&r),
        _ => {}
    }
}

/// A digest of every route and policy rule of the socket's namespace (what decides a
/// destination's path): equal digests, same paths. None when the tables hold more than
/// `DUMP_MAX` entries. A few reads of a few kilobytes on an ordinary host.
pub fn digest(s: &Socket, seq: u32) -> std::io::Result<Option<u64>> {
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 32 * 1024];
    let mut scratch = Vec::new();
    let mut entries = 0usize;
    let requests = [
        RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        RouteNetlinkMessage::GetRule(RuleMessage::default()),
    ];
    for (i, req) in requests.into_iter().enumerate() {
        let seq = seq.wrapping_add(i as u32);
        s.send(&dump_request(req, seq), 0)?;
        'reply: loop {
            let n = s.recv(&mut &mut buf[..], 0)?.min(buf.len());
            if n == 0 {
                return Err(std::io::Error::other("rtnetlink dump ended early"));
            }
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
                if len < 16 || off + len > n {
                    return Err(std::io::Error::other("rtnetlink dump: a truncated message"));
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len])
                    .map_err(|e| std::io::Error::other(format!("rtnetlink dump: {e}")))?;
                off += len.next_multiple_of(4);
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => break 'reply,
                    NetlinkPayload::Error(e) => {
                        return Err(std::io::Error::other(format!("rtnetlink dump refused: {e:?}")));
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        entries += 1;
                        if entries > DUMP_MAX {
                            // The rest of the dump is left unread: the socket is dropped.
                            return Ok(None);
                        }
                        digest_entry(m, &mut h, &mut scratch);
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(Some(h.finish()))
}

/// A quiet flow's judgement rests on its path: when a namespace's routes change, its flows are
/// judged again, but at most this often (routes that flap cost one round of judgements a
/// minute, as a namespace too large to follow does).
pub const REJUDGE_MIN: Nanos = 60 * SEC;

/// A namespace whose flows go beyond loopback: its routes' digest, followed on a timer.
struct Followed {
    handle: NsHandle,
    /// None: not known (the tables are too large, or the last read failed).
    digest: Option<u64>,
    /// When its flows were last sent to be judged again.
    last_change: Nanos,
}

/// Route lookups per namespace, with a cache (routes change rarely; the cache is dropped on a
/// timer and when it grows too large), and which namespaces' routes changed (`changed`). A
/// lookup in another namespace opens its rtnetlink socket there (entering the namespace for a
/// moment); no socket is kept, so no namespace is kept alive by one.
#[derive(Default)]
pub struct Router {
    cache: HashMap<(NetnsId, IpAddr), RoutePath>,
    seq: u32,
    /// Namespaces where a destination was looked up (loopback needs none).
    followed: HashMap<NetnsId, Followed>,
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
        self.seq = self.seq.wrapping_add(3);
        let seq = self.seq;
        // The first lookup in a namespace also takes its routes' digest, in the same visit.
        let first = !self.followed.contains_key(&netns);
        let (path, digest) = ns
            .within(|| {
                let s = own_socket().ok()?;
                let digest = if first {
                    digest(&s, seq.wrapping_add(1)).ok().flatten()
                } else {
                    None
                };
                Some((query(&s, dst, seq).ok()?, digest))
            })
            .ok()
            .flatten()
            .unwrap_or((RoutePath::Unknown, None));
        if first {
            self.followed.insert(
                netns,
                Followed {
                    handle: ns.clone(),
                    digest,
                    last_change: 0,
                },
            );
        }
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
        self.followed.remove(&netns);
    }

    /// The namespaces whose routes or rules changed since the last call (each at most once per
    /// `REJUDGE_MIN`; a change within it is found again at a later call), or whose tables
    /// cannot be followed (too large, unreadable, or the namespace could not be entered: once
    /// per `REJUDGE_MIN`). Their cached paths are dropped. `handle_of` gives each namespace's
    /// current handle (the process a handle names may have ended while the namespace lives
    /// on); a namespace it no longer knows is skipped (discovery forgets it).
    pub fn changed(&mut self, now: Nanos, handle_of: &dyn Fn(NetnsId) -> Option<NsHandle>) -> Vec<NetnsId> {
        let mut out = Vec::new();
        for (&id, f) in self.followed.iter_mut() {
            if f.last_change != 0 && now.saturating_sub(f.last_change) < REJUDGE_MIN {
                continue;
            }
            let Some(handle) = handle_of(id) else {
                continue;
            };
            f.handle = handle;
            self.seq = self.seq.wrapping_add(3);
            let seq = self.seq;
            let d = match f.handle.within(|| own_socket().and_then(|s| digest(&s, seq))) {
                Ok(read) => read.ok().flatten(),
                Err(_) => None,
            };
            if d.is_none() || d != f.digest {
                f.digest = d;
                f.last_change = now;
                out.push(id);
            }
        }
        if !out.is_empty() {
            self.cache.retain(|(n, _), _| !out.contains(n));
        }
        out
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

    /// A namespace of its own, held by a parked thread until dropped, and a command in it.
    struct Scratch {
        handle: NsHandle,
        _stop: std::sync::mpsc::Sender<()>,
    }

    impl Scratch {
        fn new() -> Scratch {
            let (stop, parked) = std::sync::mpsc::channel::<()>();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
                let path = format!(
                    "/proc/{}/task/{}/ns/net",
                    std::process::id(),
                    nix::unistd::gettid()
                );
                let id = std::fs::metadata(&path)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .unwrap();
                tx.send(NsHandle {
                    id: id as NetnsId,
                    path: path.into(),
                })
                .unwrap();
                let _ = parked.recv();
            });
            Scratch {
                handle: rx.recv().unwrap(),
                _stop: stop,
            }
        }

        fn ip(&self, args: &[&str]) {
            let o = std::process::Command::new("nsenter")
                .arg(format!("--net={}", self.handle.path.display()))
                .arg("--")
                .arg("ip")
                .args(args)
                .output()
                .expect("nsenter ip");
            assert!(
                o.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }

        fn digest(&self) -> Option<u64> {
            self.handle
                .within(|| digest(&own_socket().unwrap(), 9))
                .unwrap()
                .unwrap()
        }
    }

    #[test]
    fn the_digest_follows_routes_and_rules_and_nothing_else() {
        let ns = Scratch::new();
        let d0 = ns.digest().expect("a small table");
        assert_eq!(ns.digest(), Some(d0), "the same tables, the same digest");
        ns.ip(&["link", "set", "lo", "up"]);
        let d1 = ns.digest().unwrap();
        assert_ne!(d1, d0, "loopback up adds its local routes");
        ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        ns.ip(&["link", "set", "d1", "up"]);
        assert_eq!(ns.digest(), Some(d1), "a link without addresses routes nothing");
        ns.ip(&["link", "set", "d0", "up"]);
        ns.ip(&["addr", "add", "10.9.0.1/24", "dev", "d0"]);
        let d2 = ns.digest().unwrap();
        assert_ne!(d2, d1);
        ns.ip(&["route", "add", "10.10.0.0/16", "via", "10.9.0.2"]);
        let d3 = ns.digest().unwrap();
        assert_ne!(d3, d2, "a route");
        ns.ip(&["rule", "add", "to", "10.11.0.0/16", "table", "100"]);
        let d4 = ns.digest().unwrap();
        assert_ne!(d4, d3, "a policy rule");
        ns.ip(&["link", "set", "d0", "down"]);
        assert_ne!(
            ns.digest(),
            Some(d4),
            "a link down takes its routes (IPv4 says nothing)"
        );
    }

    #[test]
    fn a_namespace_whose_routes_change_is_reported_once_a_minute_at_most() {
        let ns = Scratch::new();
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        ns.ip(&["link", "set", "d1", "up"]);
        ns.ip(&["link", "set", "d0", "up"]);
        ns.ip(&["addr", "add", "10.9.0.1/24", "dev", "d0"]);
        let mut r = Router::default();
        let dst: IpAddr = "10.10.0.5".parse().unwrap();
        assert_eq!(r.path(&ns.handle, "127.0.0.1".parse().unwrap()), RoutePath::Local);
        assert!(r.followed.is_empty(), "loopback asks nothing and follows nothing");
        assert_eq!(r.path(&ns.handle, "10.9.0.7".parse().unwrap()), RoutePath::OnLink);
        let t = 1000 * SEC;
        let known = |id: NetnsId| (id == ns.handle.id).then(|| ns.handle.clone());
        assert!(
            r.changed(t, &known).is_empty(),
            "nothing changed since the first lookup"
        );
        ns.ip(&["route", "add", "10.10.0.0/16", "via", "10.9.0.2"]);
        assert!(
            r.changed(t + SEC, &|_| None).is_empty(),
            "a namespace no longer known: skipped"
        );
        assert_eq!(r.changed(t + SEC, &known), vec![ns.handle.id]);
        assert_eq!(
            r.path(&ns.handle, dst),
            RoutePath::Gateway("10.9.0.2".into()),
            "the new route answers"
        );
        ns.ip(&["route", "del", "10.10.0.0/16"]);
        assert!(
            r.changed(t + 2 * SEC, &known).is_empty(),
            "within a minute of the last: later"
        );
        assert_eq!(
            r.changed(t + SEC + REJUDGE_MIN, &known),
            vec![ns.handle.id],
            "then reported"
        );
        assert!(r.changed(t + 3 * REJUDGE_MIN, &known).is_empty(), "and once");
        // The handle named a process that ended (here: a file that is not a namespace): the
        // namespace cannot be entered and is reported, once a minute, until a handle works.
        let stale = |id: NetnsId| {
            Some(NsHandle {
                id,
                path: "/proc/self/status".into(),
            })
        };
        assert_eq!(r.changed(t + 4 * REJUDGE_MIN, &stale), vec![ns.handle.id]);
        assert!(r.changed(t + 4 * REJUDGE_MIN + SEC, &stale).is_empty());
        assert_eq!(
            r.changed(t + 5 * REJUDGE_MIN, &known),
            vec![ns.handle.id],
            "readable again"
        );
        assert!(r.changed(t + 6 * REJUDGE_MIN, &known).is_empty());
        r.forget_netns(ns.handle.id);
        assert!(r.followed.is_empty());
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
        // The host's tables (IPv6 routes carry ages and expiries, left out) digest the same twice.
        let d = digest(&s, 3).unwrap();
        assert!(d.is_some());
        assert_eq!(digest(&s, 7).unwrap(), d);
    }
}
