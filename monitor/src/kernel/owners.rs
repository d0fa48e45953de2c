//! Which process holds a socket: socket inode -> (pid, comm, cgroup, unit) from /proc.
//!
//! Walking every /proc/PID/fd costs about 3.5 µs per descriptor, so the resolver walks only when a
//! socket of unknown owner appears, tries the likely owners first (the pid seen at connect(), the
//! owner of the listener on the same port) and bounds full walks to a small duty cycle.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::procfs::{all_pids, describe, socket_fds};
use crate::model::observe::{Owner, SockSample};

/// Full walks take at most this share of wall time (interval >= cost / share).
const FULL_WALK_DUTY: u32 = 10;
const MIN_FULL_WALK_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Default)]
pub struct OwnerResolver {
    cache: HashMap<u64, Arc<Owner>>,
    /// Inodes a full walk did not find (fd in flight, or held outside our /proc view).
    unfindable: HashSet<u64>,
    last_full: Option<Instant>,
    last_full_cost: Duration,
    pub full_walks: u64,
    pub targeted_walks: u64,
}

impl OwnerResolver {
    pub fn owner(&self, inode: u64) -> Option<&Arc<Owner>> {
        self.cache.get(&inode)
    }

    /// Adds what `pid` holds among `wanted` to the cache; returns how many it added.
    fn scan(&mut self, pid: u32, wanted: &HashSet<u64>) -> usize {
        let found: Vec<u64> = socket_fds(pid)
            .into_iter()
            .map(|(_, i)| i)
            .filter(|i| wanted.contains(i))
            .collect();
        if found.is_empty() {
            return 0;
        }
        let Some(owner) = describe(pid).map(Arc::new) else {
            return 0;
        };
        for i in &found {
            // The first holder wins; a socket shared after fork() keeps its earliest owner.
            self.cache.entry(*i).or_insert_with(|| owner.clone());
        }
        found.len()
    }

    /// Socket inodes still without an owner (nothing to do when empty).
    pub fn missing(&self, socks: &[&SockSample]) -> bool {
        socks.iter().any(|s| {
            s.inode != 0 && !self.cache.contains_key(&s.inode) && !self.unfindable.contains(&s.inode)
        })
    }

    /// Resolves owners from a complete inode -> pid map (eBPF mode's task_file iterator).
    pub fn resolve_from(&mut self, socks: &[&SockSample], map: &HashMap<u64, u32>) {
        let live: HashSet<u64> = socks.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
        let mut described: HashMap<u32, Option<Arc<Owner>>> = HashMap::new();
        for i in live {
            if self.cache.contains_key(&i) {
                continue;
            }
            match map.get(&i) {
                Some(pid) => {
                    if let Some(o) = described
                        .entry(*pid)
                        .or_insert_with(|| describe(*pid).map(Arc::new))
                    {
                        self.cache.insert(i, o.clone());
                    }
                }
                None => {
                    self.unfindable.insert(i);
                }
            }
        }
        self.full_walks += 1;
    }

    /// Drops what no longer exists (called with complete snapshots only).
    pub fn prune(&mut self, socks: &[&SockSample]) {
        let live: HashSet<u64> = socks.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
        self.cache.retain(|i, _| live.contains(i));
        self.unfindable.retain(|i| live.contains(i));
    }

    /// Resolves the owners of `socks`. `hints` maps cookie -> pid seen at connect()/listen().
    pub fn resolve(&mut self, socks: &[&SockSample], hints: &HashMap<u64, u32>, now: Instant) {
        let live: HashSet<u64> = socks.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
        self.cache.retain(|i, _| live.contains(i));
        self.unfindable.retain(|i| live.contains(i));
        let missing: HashSet<u64> = live
            .iter()
            .copied()
            .filter(|i| !self.cache.contains_key(i) && !self.unfindable.contains(i))
            .collect();
        if missing.is_empty() {
            return;
        }
        // Likely owners first: the connect()/listen() pid, and the listener's owner for accepted sockets.
        let listener_owner: HashMap<u16, u32> = socks
            .iter()
            .filter(|s| s.state == monitor_common::tcp_state::LISTEN)
            .filter_map(|s| Some((s.local.port(), self.cache.get(&s.inode)?.pid)))
            .collect();
        let mut candidates: Vec<u32> = socks
            .iter()
            .filter(|s| missing.contains(&s.inode))
            .filter_map(|s| {
                hints
                    .get(&s.cookie)
                    .copied()
                    .or_else(|| listener_owner.get(&s.local.port()).copied())
            })
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        let mut left = missing.clone();
        for pid in candidates {
            self.targeted_walks += 1;
            self.scan(pid, &left);
            left.retain(|i| !self.cache.contains_key(i));
        }
        if left.is_empty() {
            return;
        }
        let spacing = (self.last_full_cost * FULL_WALK_DUTY).max(MIN_FULL_WALK_INTERVAL);
        if self.last_full.is_some_and(|t| now.duration_since(t) < spacing) {
            return;
        }
        let t0 = Instant::now();
        for pid in all_pids() {
            if self.scan(pid, &left) > 0 {
                left.retain(|i| !self.cache.contains_key(i));
                if left.is_empty() {
                    break;
                }
            }
        }
        self.unfindable.extend(left);
        self.full_walks += 1;
        self.last_full = Some(now);
        self.last_full_cost = t0.elapsed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let hints = HashMap::from([(1u64, std::process::id())]);
        r.resolve(&[&sock], &hints, Instant::now());
        assert_eq!(r.owner(inode).map(|o| o.pid), Some(std::process::id()));
        assert_eq!(r.full_walks, 0, "the hint made a full walk unnecessary");
    }
}
