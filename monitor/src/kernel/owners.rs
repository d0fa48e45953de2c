//! Which process holds a socket: socket inode -> (pid, comm, cgroup, unit) from /proc.
//!
//! Walking every /proc/PID/fd costs about 3.5 µs per descriptor, so the resolver walks only when a
//! socket of unknown owner appears, tries the likely owners first (the pid seen at connect(), the
//! owner of the listener on the same port, remembered from earlier reads) and bounds full walks
//! to a small duty cycle. In eBPF mode the full walk is the task_file iterator over every socket
//! file on the host (about 0.2 s at 200k sockets): the likely owners are tried first there too,
//! so a new session accepted by a known server or connected by a hinted pid costs one process's
//! descriptors, and the walk of every descriptor is left to what they do not hold.
// foldhash, not SipHash: the keys are the kernel's (inodes, pids), and a poll-mode round at 200k
// sockets spent about half of its user time hashing them with SipHash (`perf`: the hashing
// symbols 9-10 % of the samples, the snapshot thread's user time about 15 %).
use foldhash::{HashMap, HashMapExt, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::procfs::{all_pids, describe, socket_fds};
use crate::model::observe::{Owner, SockSample};

/// Full walks take at most this share of wall time (interval >= cost / share).
const FULL_WALK_DUTY: u32 = 10;
const MIN_FULL_WALK_INTERVAL: Duration = Duration::from_millis(200);

/// The socket inodes a process holds: `proc_sockets`, or in eBPF mode the task_file iterator
/// limited to that process.
pub type HeldBy<'a> = dyn FnMut(u32) -> Vec<u64> + 'a;

/// The socket inodes `pid` holds, from /proc/PID/fd (about 3.5 µs per descriptor).
pub fn proc_sockets(pid: u32) -> Vec<u64> {
    socket_fds(pid).into_iter().map(|(_, i)| i).collect()
}

/// Recent facts by socket cookie, forgotten after one to two `age`s: two generations, the older
/// dropped whole (its memory with it) when the younger has aged. For what is about sockets just
/// opened and used by the next reads (the pid seen at connect(), a socket not yet accepted):
/// what no read used within that age is about a socket gone. Kept until a complete read
/// before, a storm of new connections left 65 536 pid hints (2.2 MB) for minutes in eBPF mode.
pub struct Recent<V> {
    young: HashMap<u64, V>,
    old: HashMap<u64, V>,
    aged_at: Instant,
    max: usize,
}

/// cookie -> pid seen at connect()/listen().
pub type PidHints = Recent<u32>;

impl<V> Recent<V> {
    /// At most `max` entries (more are not kept).
    pub fn new(max: usize, now: Instant) -> Self {
        Recent {
            young: HashMap::new(),
            old: HashMap::new(),
            aged_at: now,
            max,
        }
    }

    /// Keeps `v` for `cookie`; false when it was known already or there is no room.
    pub fn insert(&mut self, cookie: u64, v: V) -> bool {
        if self.old.contains_key(&cookie)
            || self.young.contains_key(&cookie)
            || self.young.len() + self.old.len() >= self.max
        {
            return false;
        }
        self.young.insert(cookie, v);
        true
    }

    pub fn get(&self, cookie: &u64) -> Option<&V> {
        self.young.get(cookie).or_else(|| self.old.get(cookie))
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the older generation once `age` has passed since the last time.
    pub fn age(&mut self, now: Instant, age: Duration) {
        if now.saturating_duration_since(self.aged_at) >= age {
            self.old = std::mem::take(&mut self.young);
            self.aged_at = now;
        }
    }

    /// Forgets everything, memory included.
    pub fn clear(&mut self) {
        self.young = HashMap::new();
        self.old = HashMap::new();
    }

    /// Keeps what `keep` says (a complete read: only live sockets).
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.young.retain(|c, _| keep(*c));
        self.old.retain(|c, _| keep(*c));
        self.young.shrink_to_fit();
        self.old.shrink_to_fit();
    }
}

/// The socket inodes whose owner was found and handed to the state owner (which keeps it on
/// the flow): socket inodes are the kernel's `get_next_ino()` numbers (32 bits), kept in a set
/// of 4-byte keys. An inode -> owner map here (8-byte entries, one `Arc` per owner) cost about
/// 12 bytes a socket at 200k sockets (heaptrack); the owners now live only on the flows.
#[derive(Default)]
struct Known {
    narrow: HashSet<u32>,
    /// Inodes past 32 bits (none on Linux today: kept right all the same).
    wide: HashSet<u64>,
}

impl Known {
    fn contains(&self, inode: u64) -> bool {
        match u32::try_from(inode) {
            Ok(i) => self.narrow.contains(&i),
            Err(_) => self.wide.contains(&inode),
        }
    }

    /// False if it was known already.
    fn insert(&mut self, inode: u64) -> bool {
        match u32::try_from(inode) {
            Ok(i) => self.narrow.insert(i),
            Err(_) => self.wide.insert(inode),
        }
    }

    fn remove(&mut self, inode: u64) {
        match u32::try_from(inode) {
            Ok(i) => self.narrow.remove(&i),
            Err(_) => self.wide.remove(&inode),
        };
    }

    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.narrow.retain(|i| keep(u64::from(*i)));
        self.wide.retain(|i| keep(*i));
        if self.narrow.capacity() > 4 * self.narrow.len() + 4096 {
            self.narrow.shrink_to_fit();
        }
    }
}

/// Finds the owners of sockets. Each owner found is handed out once (`take_found`, with the
/// read that showed its socket) and the socket is then known: the state owner keeps the owner on
/// the flow, and says which flows still have none (`forget`).
#[derive(Default)]
pub struct OwnerResolver {
    known: Known,
    /// Owners found and not yet handed out, by socket inode.
    found: HashMap<u64, Arc<Owner>>,
    /// Inodes a full walk did not find (fd in flight, or held outside our /proc view).
    unfindable: HashSet<u64>,
    last_full: Option<Instant>,
    last_full_cost: Duration,
    /// Listening port -> the pid holding the listener, from reads that showed it with its owner
    /// (a filtered read does not list listeners again: they are kept until a complete read no
    /// longer shows them).
    listeners: HashMap<u16, u32>,
    pub full_walks: u64,
    pub targeted_walks: u64,
}

impl OwnerResolver {
    /// The owner found for `inode` and not yet handed out.
    pub fn owner(&self, inode: u64) -> Option<&Arc<Owner>> {
        self.found.get(&inode)
    }

    /// Hands out the owners found for `socks` (each once: the socket is known from then on).
    pub fn take_found(&mut self, socks: &[SockSample]) -> HashMap<u64, Arc<Owner>> {
        let mut out = HashMap::new();
        if self.found.is_empty() {
            return out;
        }
        for s in socks {
            if let Some(o) = self.found.remove(&s.inode) {
                out.insert(s.inode, o);
            }
        }
        out
    }

    /// Owners found but handed out with no read (none, unless a read was dropped): their
    /// sockets are looked up again.
    /// Called after each read's messages: also gives back the room of a large batch (the first
    /// read at 200k sockets finds 200k owners: kept, the empty map held 6 MB).
    pub fn drop_untaken(&mut self) {
        for (i, _) in self.found.drain() {
            self.known.remove(i);
        }
        if self.found.capacity() > 1024 {
            self.found = HashMap::new();
        }
    }

    /// The state owner has flows of these sockets with no owner (an owner handed out that found
    /// no flow to land on, e.g. a socket first read in a state that is not tracked): look them
    /// up again, unless no process was found holding them.
    pub fn forget(&mut self, inodes: &[u64]) {
        for &i in inodes {
            if !self.found.contains_key(&i) {
                self.known.remove(i);
            }
        }
    }

    /// Sockets known (their owner handed out).
    pub fn known(&self) -> usize {
        self.known.narrow.len() + self.known.wide.len()
    }

    /// Adds what `pid` holds among `wanted` to the owners found (`held_by`: the socket inodes a process
    /// holds); returns how many it added.
    fn scan(&mut self, pid: u32, wanted: &HashSet<u64>, held_by: &mut HeldBy<'_>) -> usize {
        let found: Vec<u64> = held_by(pid).into_iter().filter(|i| wanted.contains(i)).collect();
        if found.is_empty() {
            return 0;
        }
        let Some(owner) = describe(pid).map(Arc::new) else {
            return 0;
        };
        for i in &found {
            // The first holder wins; a socket shared after fork() keeps its earliest owner.
            if self.known.insert(*i) {
                self.found.insert(*i, owner.clone());
            }
        }
        found.len()
    }

    /// Socket inodes still without an owner (nothing to do when empty).
    pub fn missing(&self, socks: &[&SockSample]) -> bool {
        socks
            .iter()
            .any(|s| s.inode != 0 && !self.known.contains(s.inode) && !self.unfindable.contains(&s.inode))
    }

    /// Remembers the owners of the listeners among `socks`.
    fn note_listeners(&mut self, socks: &[&SockSample]) {
        for s in socks {
            if s.state == monitor_common::tcp_state::LISTEN
                && let Some(o) = self.found.get(&s.inode)
            {
                self.listeners.insert(s.local.port(), o.pid);
            }
        }
    }

    /// Scans the likely owners of the sockets in `missing` (the connect()/listen() pid in
    /// `hints`, by cookie; else the owner of the listener on the socket's local port, which
    /// accepted it): returns the inodes they do not hold.
    fn likely(
        &mut self,
        socks: &[&SockSample],
        hints: &PidHints,
        missing: HashSet<u64>,
        held_by: &mut HeldBy<'_>,
    ) -> HashSet<u64> {
        self.note_listeners(socks);
        let mut candidates: Vec<u32> = socks
            .iter()
            .filter(|s| missing.contains(&s.inode))
            .filter_map(|s| {
                hints
                    .get(&s.cookie)
                    .copied()
                    .or_else(|| self.listeners.get(&s.local.port()).copied())
            })
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        let mut left = missing;
        for pid in candidates {
            if left.is_empty() {
                break;
            }
            self.targeted_walks += 1;
            self.scan(pid, &left, held_by);
            left.retain(|i| !self.known.contains(*i));
        }
        left
    }

    /// eBPF mode, before the task_file walk: resolves what the likely owners hold (see
    /// `likely`). Returns whether some socket is still without an owner (the walk is needed).
    pub fn resolve_likely(
        &mut self,
        socks: &[&SockSample],
        hints: &PidHints,
        held_by: &mut HeldBy<'_>,
    ) -> bool {
        let missing: HashSet<u64> = socks
            .iter()
            .map(|s| s.inode)
            .filter(|&i| i != 0 && !self.known.contains(i) && !self.unfindable.contains(&i))
            .collect();
        if missing.is_empty() {
            return false;
        }
        let left = self.likely(socks, hints, missing, held_by);
        self.note_listeners(socks);
        !left.is_empty()
    }

    /// Resolves owners from a complete inode -> pid map (eBPF mode's task_file iterator).
    pub fn resolve_from(&mut self, socks: &[&SockSample], map: &HashMap<u64, u32>) {
        let live: HashSet<u64> = socks.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
        // Each pid described once (None: it is gone).
        let mut described: HashMap<u32, Option<Arc<Owner>>> = HashMap::new();
        for i in live {
            if self.known.contains(i) {
                continue;
            }
            match map.get(&i) {
                Some(pid) => {
                    if let Some(o) = described
                        .entry(*pid)
                        .or_insert_with(|| describe(*pid).map(Arc::new))
                    {
                        self.known.insert(i);
                        self.found.insert(i, o.clone());
                    }
                }
                None => {
                    self.unfindable.insert(i);
                }
            }
        }
        self.note_listeners(socks);
        self.full_walks += 1;
    }

    /// Drops what no longer exists (called with complete snapshots only).
    pub fn prune(&mut self, socks: &[&SockSample]) {
        let live: HashSet<u64> = socks.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
        self.known.retain(|i| live.contains(&i));
        self.found.retain(|i, _| live.contains(i));
        self.unfindable.retain(|i| live.contains(i));
        let listening: HashSet<u16> = socks
            .iter()
            .filter(|s| s.state == monitor_common::tcp_state::LISTEN)
            .map(|s| s.local.port())
            .collect();
        self.listeners.retain(|p, _| listening.contains(p));
    }

    /// Resolves the owners of `socks`. `hints` maps cookie -> pid seen at connect()/listen().
    pub fn resolve(&mut self, socks: &[&SockSample], hints: &PidHints, now: Instant) {
        let live: HashSet<u64> = socks.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
        self.known.retain(|i| live.contains(&i));
        self.found.retain(|i, _| live.contains(i));
        self.unfindable.retain(|i| live.contains(i));
        let missing: HashSet<u64> = live
            .iter()
            .copied()
            .filter(|i| !self.known.contains(*i) && !self.unfindable.contains(i))
            .collect();
        if missing.is_empty() {
            self.note_listeners(socks);
            return;
        }
        // Likely owners first: the connect()/listen() pid, and the listener's owner for accepted sockets.
        let mut left = self.likely(socks, hints, missing, &mut proc_sockets);
        if left.is_empty() {
            return;
        }
        let spacing = (self.last_full_cost * FULL_WALK_DUTY).max(MIN_FULL_WALK_INTERVAL);
        if self.last_full.is_some_and(|t| now.duration_since(t) < spacing) {
            return;
        }
        let t0 = Instant::now();
        for pid in all_pids() {
            if self.scan(pid, &left, &mut proc_sockets) > 0 {
                left.retain(|i| !self.known.contains(*i));
                if left.is_empty() {
                    break;
                }
            }
        }
        self.unfindable.extend(left);
        self.note_listeners(socks);
        self.full_walks += 1;
        self.last_full = Some(now);
        self.last_full_cost = t0.elapsed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_facts_are_forgotten_after_one_to_two_ages() {
        let t0 = Instant::now();
        let age = Duration::from_secs(10);
        let mut r: Recent<u32> = Recent::new(3, t0);
        assert!(r.insert(1, 10));
        assert!(!r.insert(1, 11), "known already");
        r.age(t0 + Duration::from_secs(5), age);
        assert_eq!(r.get(&1), Some(&10), "younger than an age");
        r.age(t0 + Duration::from_secs(10), age);
        assert!(r.insert(2, 20));
        assert_eq!(
            (r.get(&1), r.get(&2)),
            (Some(&10), Some(&20)),
            "one generation old"
        );
        assert!(!r.insert(1, 12), "known in the older generation");
        assert!(r.insert(3, 30));
        assert!(!r.insert(4, 40), "full");
        r.age(t0 + Duration::from_secs(20), age);
        assert_eq!(r.get(&1), None, "two ages: forgotten");
        assert_eq!(r.get(&2), Some(&20));
        assert_eq!(r.len(), 2);
        r.retain(|c| c == 3);
        assert_eq!((r.get(&2), r.get(&3)), (None, Some(&30)));
        r.clear();
        assert!(r.is_empty());
    }

    #[test]
    fn an_owner_is_handed_out_once_and_looked_up_again_when_forgotten() {
        use monitor_common::tcp_state::ESTABLISHED;
        let me = std::process::id();
        let wide = u64::from(u32::MAX) + 5;
        let sample = |cookie, inode| SockSample {
            cookie,
            state: ESTABLISHED,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            inode,
            uid: 0,
            tcp: None,
        };
        let (a, b, w) = (sample(1, 11), sample(2, 12), sample(3, wide));
        let mut hints = PidHints::new(16, Instant::now());
        for c in [1, 2, 3] {
            hints.insert(c, me);
        }
        let looked = std::cell::Cell::new(0);
        let mut held = |pid: u32| {
            looked.set(looked.get() + 1);
            if pid == me { vec![11, 12, wide] } else { vec![] }
        };
        let mut r = OwnerResolver::default();
        assert!(!r.resolve_likely(&[&a, &b, &w], &hints, &mut held));
        let got = r.take_found(&[a.clone(), b.clone()]);
        assert_eq!((got.len(), got[&11].pid), (2, me));
        assert!(
            Arc::ptr_eq(&got[&11], &got[&12]),
            "one Arc per owner found at once"
        );
        assert!(
            r.take_found(std::slice::from_ref(&a)).is_empty(),
            "handed out once"
        );
        assert_eq!(
            r.owner(wide).map(|o| o.pid),
            Some(me),
            "a wide inode, not handed out yet"
        );
        // Found but never handed out (its read was dropped): looked up again.
        r.drop_untaken();
        assert_eq!(r.known(), 2);
        let before = looked.get();
        assert!(!r.resolve_likely(&[&a, &b], &hints, &mut held));
        assert_eq!(looked.get(), before, "known sockets are not looked up");
        // The state owner says 11's flow has no owner: found and handed out again.
        r.forget(&[11]);
        assert!(!r.resolve_likely(&[&a, &b, &w], &hints, &mut held));
        let again = r.take_found(&[a.clone(), b.clone(), w.clone()]);
        let mut inodes: Vec<u64> = again.keys().copied().collect();
        inodes.sort_unstable();
        assert_eq!(inodes, vec![11, wide]);
        // A complete read without 11 and the wide one forgets them.
        r.prune(&[&b]);
        assert_eq!(r.known(), 1);
    }

    #[test]
    fn finds_the_owner_of_its_own_socket() {
        use std::os::unix::fs::MetadataExt;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&l));
        let inode = std::fs::metadata(&fd_path).unwrap().ino();
        let sock = SockSample {
            cookie: 1,
            state: monitor_common::tcp_state::LISTEN,
            local: l.local_addr().unwrap(),
            remote: "0.0.0.0:0".parse().unwrap(),
            inode,
            uid: 0,
            tcp: None,
        };
        let mut r = OwnerResolver::default();
        let mut hints = PidHints::new(16, Instant::now());
        hints.insert(1, std::process::id());
        r.resolve(&[&sock], &hints, Instant::now());
        assert_eq!(r.owner(inode).map(|o| o.pid), Some(std::process::id()));
        assert_eq!(r.full_walks, 0, "the hint made a full walk unnecessary");
    }

    #[test]
    fn an_accepted_socket_is_found_at_its_listeners_owner() {
        use monitor_common::tcp_state::{ESTABLISHED, LISTEN};
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let inode = |fd: &dyn AsRawFd| {
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let sample = |cookie, state, local, remote, inode| SockSample {
            cookie,
            state,
            local,
            remote,
            inode,
            uid: 0,
            tcp: None,
        };
        let any = "0.0.0.0:0".parse().unwrap();
        let (la, ca) = (l.local_addr().unwrap(), c.local_addr().unwrap());
        let listener = sample(1, LISTEN, la, any, inode(&l));
        let accepted = sample(2, ESTABLISHED, la, ca, inode(&a));
        let client = sample(3, ESTABLISHED, ca, la, inode(&c));
        let me = std::process::id();
        let mut r = OwnerResolver::default();
        let none = PidHints::new(0, Instant::now());
        let mut hints = PidHints::new(16, Instant::now());
        hints.insert(1, me);
        // The listener's owner comes from the pid seen at listen().
        assert!(!r.resolve_likely(&[&listener], &hints, &mut proc_sockets));
        // A later read lists only the accepted socket (a filtered read leaves listeners out):
        // the listener's owner, remembered, holds it.
        assert!(!r.resolve_likely(&[&accepted], &none, &mut proc_sockets));
        assert_eq!(r.owner(inode(&a)).map(|o| o.pid), Some(me));
        // A socket no hint and no listener points at needs the walk of every descriptor.
        assert!(r.resolve_likely(&[&client], &none, &mut proc_sockets));
        assert_eq!(r.owner(inode(&c)), None);
        assert_eq!((r.full_walks, r.targeted_walks), (0, 2));
        // A complete read without the listener forgets it.
        r.prune(&[&accepted, &client]);
        assert!(r.listeners.is_empty());
    }
}
