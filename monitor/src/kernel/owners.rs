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

/// Socket inode -> owner, compact: socket inodes are the kernel's `get_next_ino()` numbers (32
/// bits), each mapped to a slot of `owners`, one per owner found (8-byte entries where
/// inode -> `Arc` took 16: at 200k sockets about 22 -> 11 bytes a socket, heaptrack).
#[derive(Default)]
struct OwnerCache {
    by_inode: HashMap<u32, u32>,
    /// Inodes past 32 bits (none on Linux today: kept right all the same).
    wide: HashMap<u64, u32>,
    /// Each owner with the number of inodes mapped to it (freed at 0).
    owners: Vec<Option<(Arc<Owner>, u32)>>,
    free: Vec<u32>,
}

impl OwnerCache {
    fn slot_of(&self, inode: u64) -> Option<u32> {
        match u32::try_from(inode) {
            Ok(i) => self.by_inode.get(&i).copied(),
            Err(_) => self.wide.get(&inode).copied(),
        }
    }

    fn get(&self, inode: u64) -> Option<&Arc<Owner>> {
        let slot = self.slot_of(inode)?;
        self.owners.get(slot as usize)?.as_ref().map(|(o, _)| o)
    }

    fn contains(&self, inode: u64) -> bool {
        self.slot_of(inode).is_some()
    }

    /// A slot for `owner`, with no inode yet (`release_if_unused` it if none is added).
    fn slot(&mut self, owner: Arc<Owner>) -> u32 {
        match self.free.pop() {
            Some(s) => {
                self.owners[s as usize] = Some((owner, 0));
                s
            }
            None => {
                self.owners.push(Some((owner, 0)));
                (self.owners.len() - 1) as u32
            }
        }
    }

    /// Frees `slot` if no inode is mapped to it.
    fn release_if_unused(&mut self, slot: u32) {
        if let Some(e) = self.owners.get_mut(slot as usize)
            && e.as_ref().is_some_and(|(_, n)| *n == 0)
        {
            *e = None;
            self.free.push(slot);
        }
    }

    /// Maps `inode` to the owner in `slot` unless it has one already (the first holder wins).
    fn insert(&mut self, inode: u64, slot: u32) {
        let added = match u32::try_from(inode) {
            Ok(i) => match self.by_inode.entry(i) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(slot);
                    true
                }
            },
            Err(_) => match self.wide.entry(inode) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(slot);
                    true
                }
            },
        };
        if added && let Some(Some((_, n))) = self.owners.get_mut(slot as usize) {
            *n += 1;
        }
    }

    /// Keeps the inodes `keep` says; owners left with none are dropped.
    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        let owners = &mut self.owners;
        let mut drop_one = |slot: u32| {
            if let Some(Some((_, n))) = owners.get_mut(slot as usize) {
                *n = n.saturating_sub(1);
            }
        };
        self.by_inode.retain(|i, s| {
            let k = keep(u64::from(*i));
            if !k {
                drop_one(*s);
            }
            k
        });
        self.wide.retain(|i, s| {
            let k = keep(*i);
            if !k {
                drop_one(*s);
            }
            k
        });
        for slot in 0..self.owners.len() as u32 {
            self.release_if_unused(slot);
        }
        if self.by_inode.capacity() > 4 * self.by_inode.len() + 4096 {
            self.by_inode.shrink_to_fit();
        }
    }
}

#[derive(Default)]
pub struct OwnerResolver {
    cache: OwnerCache,
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
    pub fn owner(&self, inode: u64) -> Option<&Arc<Owner>> {
        self.cache.get(inode)
    }

    /// Adds what `pid` holds among `wanted` to the cache (`held_by`: the socket inodes a process
    /// holds); returns how many it added.
    fn scan(&mut self, pid: u32, wanted: &HashSet<u64>, held_by: &mut HeldBy<'_>) -> usize {
        let found: Vec<u64> = held_by(pid).into_iter().filter(|i| wanted.contains(i)).collect();
        if found.is_empty() {
            return 0;
        }
        let Some(owner) = describe(pid).map(Arc::new) else {
            return 0;
        };
        let slot = self.cache.slot(owner);
        for i in &found {
            // The first holder wins; a socket shared after fork() keeps its earliest owner.
            self.cache.insert(*i, slot);
        }
        self.cache.release_if_unused(slot);
        found.len()
    }

    /// Socket inodes still without an owner (nothing to do when empty).
    pub fn missing(&self, socks: &[&SockSample]) -> bool {
        socks
            .iter()
            .any(|s| s.inode != 0 && !self.cache.contains(s.inode) && !self.unfindable.contains(&s.inode))
    }

    /// Remembers the owners of the listeners among `socks`.
    fn note_listeners(&mut self, socks: &[&SockSample]) {
        for s in socks {
            if s.state == monitor_common::tcp_state::LISTEN
                && let Some(o) = self.cache.get(s.inode)
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
            left.retain(|i| !self.cache.contains(*i));
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
            .filter(|&i| i != 0 && !self.cache.contains(i) && !self.unfindable.contains(&i))
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
        // Each pid described once: its owner's slot (None: it is gone).
        let mut described: HashMap<u32, Option<u32>> = HashMap::new();
        for i in live {
            if self.cache.contains(i) {
                continue;
            }
            match map.get(&i) {
                Some(pid) => {
                    let cache = &mut self.cache;
                    if let Some(slot) = *described
                        .entry(*pid)
                        .or_insert_with(|| describe(*pid).map(|o| cache.slot(Arc::new(o))))
                    {
                        self.cache.insert(i, slot);
                    }
                }
                None => {
                    self.unfindable.insert(i);
                }
            }
        }
        for slot in described.into_values().flatten() {
            self.cache.release_if_unused(slot);
        }
        self.note_listeners(socks);
        self.full_walks += 1;
    }

    /// Drops what no longer exists (called with complete snapshots only).
    pub fn prune(&mut self, socks: &[&SockSample]) {
        let live: HashSet<u64> = socks.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
        self.cache.retain(|i| live.contains(&i));
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
        self.cache.retain(|i| live.contains(&i));
        self.unfindable.retain(|i| live.contains(i));
        let missing: HashSet<u64> = live
            .iter()
            .copied()
            .filter(|i| !self.cache.contains(*i) && !self.unfindable.contains(i))
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
                left.retain(|i| !self.cache.contains(*i));
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
    fn the_owner_cache_shares_one_owner_and_frees_it_with_its_last_socket() {
        let owner = |pid: u32| {
            Arc::new(Owner {
                pid,
                comm: "srv".into(),
                cgroup: None,
                unit: None,
            })
        };
        let mut c = OwnerCache::default();
        let a = c.slot(owner(10));
        let wide = u64::from(u32::MAX) + 5;
        for i in [1, 2, wide] {
            c.insert(i, a);
        }
        let b = c.slot(owner(20));
        c.insert(2, b);
        c.insert(3, b);
        assert_eq!(c.get(2).map(|o| o.pid), Some(10), "the first holder wins");
        assert_eq!(c.get(3).map(|o| o.pid), Some(20));
        assert_eq!(c.get(wide).map(|o| o.pid), Some(10), "a wide inode");
        assert!(
            Arc::ptr_eq(c.get(1).unwrap(), c.get(wide).unwrap()),
            "one Arc per owner"
        );
        assert!(!c.contains(4));
        // An owner whose every socket has gone is dropped, and its slot reused.
        c.retain(|i| i != 3);
        assert_eq!((c.get(3).is_none(), c.free.as_slice()), (true, &[b][..]));
        let d = c.slot(owner(30));
        assert_eq!(d, b);
        c.release_if_unused(d);
        assert_eq!(c.free, vec![b], "a slot given no socket goes back");
        c.retain(|i| i == 1);
        assert_eq!(c.get(1).map(|o| o.pid), Some(10));
        assert_eq!(c.get(wide), None);
        c.retain(|_| false);
        assert!(c.owners.iter().all(Option::is_none));
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
