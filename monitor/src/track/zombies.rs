//! Zombies: exited-but-unreaped processes, from exit/free events (eBPF) and /proc scans (both
//! modes). A scan heals lost events; remembered reaps keep a scan that started before the reap
//! from bringing a zombie back.
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::model::observe::{ProcEvent, ProcEventKind};
use crate::model::process::{ProcSignals, ProcStat, ZombieView};
use crate::model::time::{Nanos, SEC, ms};

/// An exit event is checked against /proc after this long (exit_notify has run by then).
const CONFIRM_AFTER: Nanos = 20_000_000;

/// Reads the kernel's view of a process.
pub trait ProcView {
    fn stat(&self, pid: u32) -> Option<ProcStat>;
    fn signals(&self, pid: u32) -> Option<ProcSignals>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Zombie {
    pid: u32,
    ppid: u32,
    comm: String,
    /// When it exited; None if it was a zombie before holdfast looked.
    exited_at: Option<Nanos>,
    first_seen: Nanos,
    confirmed: bool,
}

/// Exited-but-unreaped processes, from exit/free events and /proc scans.
#[derive(Default)]
pub struct ZombieTracker {
    zombies: HashMap<u32, Zombie>,
    /// Pids reaped (free events) with the time: a /proc scan that started before the reap must
    /// not bring them back.
    freed: HashMap<u32, Nanos>,
    scanned: bool,
}

/// How long a reaped pid is remembered (longer than any /proc scan takes).
const FREED_KEEP: Nanos = 60 * SEC;

impl ZombieTracker {
    pub fn on_event(&mut self, e: &ProcEvent) {
        match e.kind {
            ProcEventKind::Exit => {
                self.freed.remove(&e.pid);
                self.zombies.insert(
                    e.pid,
                    Zombie {
                        pid: e.pid,
                        ppid: e.ppid,
                        comm: e.comm.clone(),
                        exited_at: Some(e.ts),
                        first_seen: e.ts,
                        confirmed: false,
                    },
                );
            }
            ProcEventKind::Free => {
                self.zombies.remove(&e.pid);
                self.freed.insert(e.pid, e.ts);
            }
        }
    }

    /// A complete list of the zombies at `at` (heals lost events; the only source in poll mode).
    pub fn on_scan(&mut self, zombies: &[ProcStat], at: Nanos, started: Nanos) {
        let live: HashSet<u32> = zombies.iter().map(|z| z.pid).collect();
        // Reaped since (or lost events); keep exits newer than the scan's start.
        self.zombies
            .retain(|pid, z| live.contains(pid) || z.first_seen >= started);
        self.freed.retain(|_, t| at.saturating_sub(*t) < FREED_KEEP);
        for st in zombies {
            if self.freed.get(&st.pid).is_some_and(|t| *t >= started) {
                // Reaped while the scan ran: the scan saw it before the reap.
                continue;
            }
            let first = !self.scanned;
            let z = self.zombies.entry(st.pid).or_insert_with(|| Zombie {
                pid: st.pid,
                ppid: st.ppid,
                comm: st.comm.clone(),
                // Appeared since the previous scan: its exit is dated by this scan.
                exited_at: (!first).then_some(at),
                first_seen: at,
                confirmed: true,
            });
            z.ppid = st.ppid;
            z.confirmed = true;
        }
        self.scanned = true;
    }

    /// Forgets a pid that /proc shows is no longer a zombie (reaped, events lost or late).
    pub fn forget(&mut self, pid: u32) {
        self.zombies.remove(&pid);
    }

    /// Checks exit events against /proc: a zombie is confirmed, anything else dropped.
    pub fn confirm(&mut self, now: Nanos, view: &dyn ProcView) {
        let due: Vec<u32> = self
            .zombies
            .values()
            .filter(|z| !z.confirmed && now.saturating_sub(z.first_seen) >= CONFIRM_AFTER)
            .map(|z| z.pid)
            .collect();
        for pid in due {
            match view.stat(pid) {
                Some(st) if st.state == 'Z' => {
                    if let Some(z) = self.zombies.get_mut(&pid) {
                        z.confirmed = true;
                        z.ppid = st.ppid;
                    }
                }
                _ => {
                    self.zombies.remove(&pid);
                }
            }
        }
    }

    fn age(z: &Zombie, now: Nanos) -> (u64, bool) {
        match z.exited_at {
            Some(t) => (ms(now.saturating_sub(t)), true),
            None => (ms(now.saturating_sub(z.first_seen)), false),
        }
    }

    /// Confirmed zombies per parent, for the parents whose oldest is at least `min_age` old.
    /// Such a parent's younger zombies are listed too: they are part of the same pile, and a
    /// nudge reaps them with the rest (a parent whose children exit a few ms apart must not be
    /// reported, nudged and verified for only some of them).
    pub fn by_parent(&self, now: Nanos, min_age: Nanos) -> BTreeMap<u32, Vec<ZombieView>> {
        let mut out: BTreeMap<u32, Vec<ZombieView>> = BTreeMap::new();
        for z in self.zombies.values().filter(|z| z.confirmed) {
            let (age_ms, age_exact) = Self::age(z, now);
            out.entry(z.ppid).or_default().push(ZombieView {
                pid: z.pid,
                comm: z.comm.clone(),
                age_ms,
                age_exact,
            });
        }
        // A zombie of unknown age is watched for min_age too before it is reported.
        out.retain(|_, v| v.iter().any(|z| z.age_ms >= ms(min_age)));
        for v in out.values_mut() {
            v.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.pid.cmp(&b.pid)));
        }
        out
    }

    pub fn len(&self) -> usize {
        self.zombies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.zombies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(pid: u32, ppid: u32, ts: Nanos) -> ProcEvent {
        ProcEvent {
            kind: ProcEventKind::Exit,
            pid,
            ppid,
            exit_code: 0,
            ts,
            comm: "child".into(),
        }
    }

    fn zombie(pid: u32) -> ProcStat {
        ProcStat {
            pid,
            comm: "child".into(),
            state: 'Z',
            ppid: 10,
            starttime: 1,
        }
    }

    #[test]
    fn a_scan_that_started_before_a_reap_does_not_bring_the_zombie_back() {
        let mut t = ZombieTracker::default();
        t.on_event(&exit(11, 10, SEC));
        // The scan starts at 2 s and sees the zombie; the parent reaps it at 3 s; the scan's
        // result arrives at 4 s.
        t.on_event(&ProcEvent {
            kind: ProcEventKind::Free,
            ..exit(11, 10, 3 * SEC)
        });
        t.on_scan(&[zombie(11)], 4 * SEC, 2 * SEC);
        assert!(t.is_empty(), "the reaped child stays gone");
        // A later scan that really sees it (pid reused by a new zombie) counts it.
        t.on_scan(&[zombie(11)], 10 * SEC, 5 * SEC);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn preexisting_zombies_have_a_lower_bound_age() {
        let mut t = ZombieTracker::default();
        t.on_scan(&[zombie(11)], SEC, SEC);
        assert!(
            t.by_parent(3 * SEC, 5 * SEC).is_empty(),
            "watched for min_age first"
        );
        let g = t.by_parent(6 * SEC, 5 * SEC);
        assert!(
            !g[&10][0].age_exact,
            "predates holdfast: the age is a lower bound"
        );
        assert_eq!(g[&10][0].age_ms, 5000);
    }

    #[test]
    fn zombies_appearing_between_scans_are_dated_by_the_scan() {
        let mut t = ZombieTracker::default();
        t.on_scan(&[], 0, 0);
        t.on_scan(&[zombie(11)], SEC, SEC);
        let g = t.by_parent(7 * SEC, 0);
        assert!(g[&10][0].age_exact);
        assert_eq!(g[&10][0].age_ms, 6000);
    }

    #[test]
    fn a_reported_parent_lists_its_younger_zombies_too() {
        let mut t = ZombieTracker::default();
        t.on_event(&exit(11, 10, SEC));
        t.on_event(&exit(12, 10, SEC + 5_000_000));
        t.on_scan(&[zombie(11), zombie(12)], SEC + 10_000_000, SEC);
        struct AllZombies;
        impl ProcView for AllZombies {
            fn stat(&self, pid: u32) -> Option<ProcStat> {
                Some(zombie(pid))
            }
            fn signals(&self, _: u32) -> Option<ProcSignals> {
                None
            }
        }
        t.confirm(2 * SEC, &AllZombies);
        // At 2 s the first is 1000 ms old, the second 995 ms: both belong to the report.
        let g = t.by_parent(2 * SEC, SEC);
        let pids: Vec<u32> = g[&10].iter().map(|z| z.pid).collect();
        assert_eq!(pids, vec![11, 12]);
        assert!(
            t.by_parent(2 * SEC - 1_000_000, SEC).is_empty(),
            "none old enough yet"
        );
    }
}
