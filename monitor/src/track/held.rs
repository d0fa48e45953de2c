//! Descriptors held to dead TCP sockets, as the kernel views report them: what each process
//! holds, since when holdfast has seen it, and how the count grows.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::model::leaks::HeldSocket;
use crate::model::observe::{DeadFd, Owner};
use crate::model::time::{Nanos, SEC};

/// Trend samples per process: one every SAMPLE_EVERY over TREND_WINDOW.
const SAMPLE_EVERY: Nanos = 2 * SEC;
const TREND_WINDOW: Nanos = 300 * SEC;

/// Which processes a report covers: every process on the host (the task_file iterator), or the
/// ones listed (poll mode's bounded look).
#[derive(Clone, Debug, PartialEq)]
pub enum HeldScope {
    Host,
    Pids(Vec<u32>),
}

#[derive(Clone, Debug)]
struct Entry {
    fd: DeadFd,
    first_seen: Nanos,
    /// Where it was connected, if holdfast knew the flow before it died.
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
}

/// One process's dead descriptors.
#[derive(Clone, Debug)]
pub struct PidHeld {
    pub owner: Option<Arc<Owner>>,
    pub sockets: Vec<HeldSocket>,
    pub oldest_ms: u64,
    /// Net change per minute over the trend window.
    pub per_min: f64,
}

#[derive(Default)]
pub struct HeldTracker {
    /// (pid, inode) -> entry.
    entries: HashMap<(u32, u64), Entry>,
    owners: HashMap<u32, Arc<Owner>>,
    samples: HashMap<u32, VecDeque<(Nanos, usize)>>,
    last_sample: Option<Nanos>,
    /// Reports applied (a positive signal for tests and `status`).
    pub reports: u64,
}

impl HeldTracker {
    /// Applies a report: what the covered processes hold now. `addrs` tells where a socket inode
    /// was connected when its flow was known.
    pub fn apply(
        &mut self,
        now: Nanos,
        found: &[DeadFd],
        scope: &HeldScope,
        owners: &HashMap<u32, Arc<Owner>>,
        addrs: &dyn Fn(u64) -> Option<(SocketAddr, SocketAddr)>,
    ) {
        self.reports += 1;
        let covered = |pid: u32| match scope {
            HeldScope::Host => true,
            HeldScope::Pids(p) => p.contains(&pid),
        };
        let now_held: HashMap<(u32, u64), &DeadFd> = found.iter().map(|d| ((d.pid, d.inode), d)).collect();
        self.entries
            .retain(|k, _| !covered(k.0) || now_held.contains_key(k));
        for (k, d) in now_held {
            self.entries.entry(k).or_insert_with(|| {
                let a = addrs(d.inode);
                Entry {
                    fd: *d,
                    first_seen: now,
                    local: a.map(|x| x.0),
                    remote: a.map(|x| x.1),
                }
            });
        }
        for (pid, o) in owners {
            self.owners.insert(*pid, o.clone());
        }
        let pids: std::collections::HashSet<u32> = self.entries.keys().map(|k| k.0).collect();
        self.owners.retain(|p, _| pids.contains(p));
        // Trend samples per process (kept while it holds something, and one last zero).
        if self
            .last_sample
            .is_none_or(|t| now.saturating_sub(t) >= SAMPLE_EVERY)
        {
            self.last_sample = Some(now);
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for k in self.entries.keys() {
                *counts.entry(k.0).or_default() += 1;
            }
            for p in counts.keys() {
                self.samples.entry(*p).or_default();
            }
            self.samples.retain(|pid, s| {
                let n = counts.get(pid).copied().unwrap_or(0);
                s.push_back((now, n));
                while s
                    .front()
                    .is_some_and(|(t, _)| now.saturating_sub(*t) > TREND_WINDOW)
                {
                    s.pop_front();
                }
                n > 0
            });
        }
    }

    /// Whether `pid` is known to hold socket `inode` dead.
    pub fn holds(&self, pid: u32, inode: u64) -> bool {
        self.entries.contains_key(&(pid, inode))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Processes holding dead sockets, with their descriptors (oldest first).
    pub fn by_pid(&self, now: Nanos) -> BTreeMap<u32, PidHeld> {
        let mut out: BTreeMap<u32, PidHeld> = BTreeMap::new();
        for ((pid, _), e) in &self.entries {
            let p = out.entry(*pid).or_insert_with(|| PidHeld {
                owner: self.owners.get(pid).cloned(),
                sockets: Vec::new(),
                oldest_ms: 0,
                per_min: 0.0,
            });
            let age_ms = now.saturating_sub(e.first_seen) / 1_000_000;
            p.oldest_ms = p.oldest_ms.max(age_ms);
            p.sockets.push(HeldSocket {
                fd: e.fd.fd,
                inode: e.fd.inode,
                age_ms,
                local: e.local,
                remote: e.remote,
            });
        }
        for (pid, p) in out.iter_mut() {
            p.sockets.sort_by_key(|s| (std::cmp::Reverse(s.age_ms), s.fd));
            if let Some(s) = self.samples.get(pid)
                && let (Some(f), Some(b)) = (s.front(), s.back())
                && b.0 > f.0
            {
                p.per_min = (b.1 as f64 - f.1 as f64) * 60.0 * SEC as f64 / (b.0 - f.0) as f64;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(pid: u32, fd: u32, inode: u64) -> DeadFd {
        DeadFd {
            pid,
            fd,
            inode,
            sport: 7000,
            dport: 40000,
        }
    }

    #[test]
    fn keeps_first_sight_drops_released_and_respects_scope() {
        let mut t = HeldTracker::default();
        let none = HashMap::new();
        let addr = |i: u64| {
            (i == 11).then(|| {
                (
                    "10.0.0.1:7000".parse().unwrap(),
                    "10.0.0.2:40000".parse().unwrap(),
                )
            })
        };
        t.apply(SEC, &[d(1, 5, 11), d(2, 6, 12)], &HeldScope::Host, &none, &addr);
        t.apply(
            40 * SEC,
            &[d(1, 5, 11), d(1, 7, 13), d(2, 6, 12)],
            &HeldScope::Host,
            &none,
            &addr,
        );
        let by = t.by_pid(41 * SEC);
        assert_eq!(by[&1].sockets.len(), 2);
        assert_eq!(by[&1].oldest_ms, 40_000, "first sight kept");
        assert_eq!(by[&1].sockets[0].remote.unwrap().to_string(), "10.0.0.2:40000");
        assert!(by[&1].per_min > 0.0, "growing: {}", by[&1].per_min);
        // A poll-mode report about pid 2 only: pid 1's entries stay.
        t.apply(42 * SEC, &[], &HeldScope::Pids(vec![2]), &none, &addr);
        assert!(t.holds(1, 11) && !t.holds(2, 12));
        // The host-wide report without pid 1's socket 11: released.
        t.apply(43 * SEC, &[d(1, 7, 13)], &HeldScope::Host, &none, &addr);
        assert!(!t.holds(1, 11) && t.holds(1, 13));
    }
}
