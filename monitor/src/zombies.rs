//! Zombie children: which processes exited unreaped, grouped per parent, diagnosed, and nudged.
//!
//! The detector is a pure function of (now, observations, policy) plus a `ProcView` for the few
//! /proc reads it needs and a `Nudger` for the remedy, so unit tests run it with a fake clock and
//! a fake /proc. One finding per parent, not per child.
use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use serde_json::json;

use crate::config::RemedyMode;
use crate::findings::{ActionRecord, FindingStore, Severity, Transition, ms};
use crate::human::fmt_ms;
use crate::observe::{Nanos, ProcEvent, ProcEventKind};
use crate::procs::{Diagnosis, ProcSignals, ProcStat, diagnose};

const SEC: Nanos = 1_000_000_000;
/// A nudge is verified this long after it was sent.
const VERIFY_AFTER: Nanos = SEC;
/// Nudges per parent before holdfast gives up and says so.
const MAX_NUDGES: u32 = 5;
/// Nudges across all parents per minute.
const NUDGES_PER_MINUTE: u32 = 60;
/// An exit event is checked against /proc after this long (exit_notify has run by then).
const CONFIRM_AFTER: Nanos = 20_000_000;
/// Children listed in a finding's details.
const LIST_CHILDREN: usize = 50;

/// Reads the kernel's view of a process.
pub trait ProcView {
    fn stat(&self, pid: u32) -> Option<ProcStat>;
    fn signals(&self, pid: u32) -> Option<ProcSignals>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum NudgeError {
    /// The kernel refused (EPERM, an LSM): report once, never retry.
    Refused(String),
    /// The pid no longer names the process that was diagnosed.
    Gone,
}

/// Sends SIGCHLD to a parent through a pidfd, after checking it is still the same process.
pub trait Nudger {
    fn nudge(&mut self, pid: u32, starttime: u64) -> Result<(), NudgeError>;
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

/// One reportable zombie.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ZombieView {
    pub pid: u32,
    pub comm: String,
    pub age_ms: u64,
    /// False when the zombie predates holdfast: `age_ms` is then a lower bound.
    pub age_exact: bool,
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
    fn confirm(&mut self, now: Nanos, view: &dyn ProcView) {
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

    /// Confirmed zombies at least `min_age` old, per parent.
    pub fn by_parent(&self, now: Nanos, min_age: Nanos) -> BTreeMap<u32, Vec<ZombieView>> {
        let mut out: BTreeMap<u32, Vec<ZombieView>> = BTreeMap::new();
        for z in self.zombies.values().filter(|z| z.confirmed) {
            let (age_ms, age_exact) = Self::age(z, now);
            // A zombie of unknown age is watched for min_age too before it is reported.
            if age_ms >= ms(min_age) {
                out.entry(z.ppid).or_default().push(ZombieView {
                    pid: z.pid,
                    comm: z.comm.clone(),
                    age_ms,
                    age_exact,
                });
            }
        }
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

/// What is known about one parent with zombies.
#[derive(Clone, Debug, Serialize)]
pub struct ParentCase {
    pub ppid: u32,
    pub comm: String,
    #[serde(skip)]
    pub starttime: u64,
    pub diagnosis: Diagnosis,
    pub finding: u64,
    pub count: usize,
    pub oldest_ms: u64,
    /// Zombies seen per minute since the finding opened.
    pub rate_per_min: f64,
    pub children: Vec<ZombieView>,
    pub nudges: u32,
    pub stopped: bool,
    /// Age of the oldest zombie when the finding opened: the detection latency when min_age is 0.
    pub age_at_report_ms: u64,
    #[serde(skip)]
    opened: Nanos,
    #[serde(skip)]
    seen: HashSet<u32>,
    #[serde(skip)]
    next_nudge: Nanos,
    #[serde(skip)]
    verify: Option<(Nanos, Vec<u32>)>,
    #[serde(skip)]
    planned_reported: bool,
    #[serde(skip)]
    logged_count: usize,
}

/// Remedy policy for zombies.
#[derive(Clone, Copy, Debug)]
pub struct ZombiePolicy {
    pub min_age: Nanos,
    pub sigchld: RemedyMode,
}

/// The zombie detector and the SIGCHLD remedy.
#[derive(Default)]
pub struct ZombieDetector {
    pub tracker: ZombieTracker,
    pub parents: BTreeMap<u32, ParentCase>,
    nudge_times: Vec<Nanos>,
}

fn summary(c: &ParentCase) -> String {
    format!(
        "{} zombie child{} of pid {} ({}), oldest {}: {}",
        c.count,
        if c.count == 1 { "" } else { "ren" },
        c.ppid,
        c.comm,
        fmt_ms(c.oldest_ms),
        c.diagnosis.explain()
    )
}

fn details(c: &ParentCase) -> serde_json::Value {
    json!({
        "ppid": c.ppid,
        "parent_comm": c.comm,
        "diagnosis": c.diagnosis,
        "explanation": c.diagnosis.explain(),
        "count": c.count,
        "oldest_ms": c.oldest_ms,
        "rate_per_min": c.rate_per_min,
        "children": c.children.iter().take(LIST_CHILDREN).collect::<Vec<_>>(),
        "nudges": c.nudges,
        "nudge_can_help": c.diagnosis.nudge_can_help(),
        "age_at_report_ms": c.age_at_report_ms,
    })
}

impl ZombieDetector {
    /// Evaluates every parent with zombies; returns the transitions worth a log entry.
    pub fn evaluate(
        &mut self,
        now: Nanos,
        policy: ZombiePolicy,
        view: &dyn ProcView,
        nudger: &mut dyn Nudger,
        store: &mut FindingStore,
    ) -> Vec<(u64, Transition)> {
        self.tracker.confirm(now, view);
        let groups = self.tracker.by_parent(now, policy.min_age);
        let mut out = Vec::new();
        // Parents whose zombies are all gone: resolve.
        let gone: Vec<u32> = self
            .parents
            .keys()
            .copied()
            .filter(|p| !groups.contains_key(p))
            .collect();
        for ppid in gone {
            let Some(c) = self.parents.remove(&ppid) else {
                continue;
            };
            if let Some((_, before)) = &c.verify {
                record_outcome(
                    store,
                    c.finding,
                    format!("reaped {} of {}", before.len(), before.len()),
                    0,
                );
            }
            let nudged = if c.nudges > 0 {
                format!(" after {} nudge(s)", c.nudges)
            } else {
                String::new()
            };
            store.resolve(
                c.finding,
                format!(
                    "all zombie children of pid {} ({}) were reaped{nudged}",
                    c.ppid, c.comm
                ),
                now,
            );
            out.push((c.finding, Transition::Resolved));
        }
        for (ppid, kids) in groups {
            let case = match self.parents.entry(ppid) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let st = view.stat(ppid);
                    let diagnosis = diagnose(ppid, view.signals(ppid).as_ref());
                    let mut c = ParentCase {
                        ppid,
                        comm: st.as_ref().map(|s| s.comm.clone()).unwrap_or_else(|| "?".into()),
                        starttime: st.as_ref().map_or(0, |s| s.starttime),
                        diagnosis,
                        finding: 0,
                        count: kids.len(),
                        oldest_ms: kids.first().map_or(0, |k| k.age_ms),
                        rate_per_min: 0.0,
                        children: kids.clone(),
                        nudges: 0,
                        stopped: false,
                        age_at_report_ms: kids.first().map_or(0, |k| k.age_ms),
                        opened: now,
                        seen: HashSet::new(),
                        next_nudge: now,
                        verify: None,
                        planned_reported: false,
                        logged_count: kids.len(),
                    };
                    c.seen.extend(kids.iter().map(|k| k.pid));
                    let sev = if diagnosis.nudge_can_help() {
                        Severity::Warning
                    } else {
                        Severity::Critical
                    };
                    c.finding = store.open(
                        "zombie",
                        sev,
                        format!("pid {} ({})", c.ppid, c.comm),
                        summary(&c),
                        details(&c),
                        now,
                    );
                    out.push((c.finding, Transition::New));
                    v.insert(c)
                }
            };
            case.count = kids.len();
            case.oldest_ms = kids.first().map_or(0, |k| k.age_ms);
            if case.seen.len() < 100_000 {
                case.seen.extend(kids.iter().map(|k| k.pid));
            }
            let minutes = (now.saturating_sub(case.opened) as f64 / 60e9).max(1.0);
            case.rate_per_min = case.seen.len() as f64 / minutes;
            case.children = kids;
            // Re-diagnose: a parent may block, unblock or stop SIGCHLD at any time.
            let diagnosis = diagnose(ppid, view.signals(ppid).as_ref());
            let mut changed = diagnosis != case.diagnosis;
            case.diagnosis = diagnosis;
            // Log growth only when the count doubles, never on every tick.
            if case.count >= case.logged_count * 2 {
                case.logged_count = case.count;
                changed = true;
            }
            if let Some(f) = store.get_mut(case.finding) {
                f.summary = summary(case);
                f.details = details(case);
                f.updated_ms = ms(now);
            }
            if changed {
                out.push((case.finding, Transition::Updated));
            }
            if let Some(t) = self.remedy(ppid, now, policy, view, nudger, store) {
                out.push(t);
            }
        }
        out
    }

    fn remedy(
        &mut self,
        ppid: u32,
        now: Nanos,
        policy: ZombiePolicy,
        view: &dyn ProcView,
        nudger: &mut dyn Nudger,
        store: &mut FindingStore,
    ) -> Option<(u64, Transition)> {
        let case = self.parents.get_mut(&ppid)?;
        if let Some((at, before)) = case.verify.clone() {
            if now < at {
                return None;
            }
            let (still, reaped): (Vec<u32>, Vec<u32>) = before
                .iter()
                .partition(|p| view.stat(**p).is_some_and(|s| s.state == 'Z'));
            let still = still.len();
            case.verify = None;
            for pid in reaped {
                self.tracker.forget(pid);
            }
            record_outcome(
                store,
                case.finding,
                format!("reaped {} of {}", before.len() - still, before.len()),
                still,
            );
            return Some((case.finding, Transition::Action));
        }
        if policy.sigchld == RemedyMode::Off
            || case.stopped
            || !case.diagnosis.nudge_can_help()
            || now < case.next_nudge
        {
            return None;
        }
        let before: Vec<u32> = case.children.iter().map(|c| c.pid).collect();
        let mut action = ActionRecord {
            at_ms: ms(now),
            action: "sigchld".into(),
            mode: if policy.sigchld == RemedyMode::DryRun {
                "dry-run"
            } else {
                "enforce"
            }
            .into(),
            outcome: String::new(),
            before: json!({ "zombies": before.len(), "pids": before.iter().take(LIST_CHILDREN).collect::<Vec<_>>() }),
            after: serde_json::Value::Null,
        };
        if case.nudges >= MAX_NUDGES {
            case.stopped = true;
            action.outcome = format!(
                "stopped: {MAX_NUDGES} nudges did not get the zombies reaped; the parent needs fixing"
            );
        } else if policy.sigchld == RemedyMode::DryRun {
            if case.planned_reported {
                return None;
            }
            case.planned_reported = true;
            action.outcome =
                format!("planned: SIGCHLD to pid {ppid} through a pidfd (dry-run, nothing sent)");
        } else {
            self.nudge_times.retain(|t| now.saturating_sub(*t) < 60 * SEC);
            if self.nudge_times.len() >= NUDGES_PER_MINUTE as usize {
                return None;
            }
            match nudger.nudge(ppid, case.starttime) {
                Ok(()) => {
                    self.nudge_times.push(now);
                    case.nudges += 1;
                    case.verify = Some((now + VERIFY_AFTER, before));
                    // Exponential backoff: 1 s, 2 s, 4 s, ... between nudges of one parent.
                    case.next_nudge = now + VERIFY_AFTER + SEC * (1u64 << (case.nudges - 1).min(6));
                    action.outcome = "sent".into();
                }
                Err(NudgeError::Refused(e)) => {
                    case.stopped = true;
                    action.outcome = format!("refused: {e}; not retried");
                }
                Err(NudgeError::Gone) => {
                    case.stopped = true;
                    action.outcome = format!("not sent: pid {ppid} is no longer the diagnosed process");
                }
            }
        }
        let finding = case.finding;
        if let Some(f) = store.get_mut(finding) {
            f.actions.push(action);
        }
        Some((finding, Transition::Action))
    }
}

/// Completes the last action of a finding with its verified outcome.
fn record_outcome(store: &mut FindingStore, finding: u64, outcome: String, remaining: usize) {
    if let Some(a) = store.get_mut(finding).and_then(|f| f.actions.last_mut()) {
        a.outcome = outcome;
        a.after = json!({ "zombies": remaining });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct FakeProc {
        procs: RefCell<HashMap<u32, (ProcStat, ProcSignals)>>,
    }

    impl FakeProc {
        fn add(&self, pid: u32, ppid: u32, state: char, caught: u64, blocked: u64) {
            let st = ProcStat {
                pid,
                comm: format!("p{pid}"),
                state,
                ppid,
                starttime: 1000 + u64::from(pid),
            };
            let sig = ProcSignals {
                state,
                blocked,
                ignored: 0,
                caught,
                pending: 0,
            };
            self.procs.borrow_mut().insert(pid, (st, sig));
        }
        fn reap(&self, pid: u32) {
            self.procs.borrow_mut().remove(&pid);
        }
    }

    impl ProcView for FakeProc {
        fn stat(&self, pid: u32) -> Option<ProcStat> {
            self.procs.borrow().get(&pid).map(|p| p.0.clone())
        }
        fn signals(&self, pid: u32) -> Option<ProcSignals> {
            self.procs.borrow().get(&pid).map(|p| p.1.clone())
        }
    }

    /// A nudge reaps every zombie child of the parent (a working handler).
    struct ReapingNudger<'a> {
        view: &'a FakeProc,
        sent: u32,
        refuse: bool,
    }

    impl Nudger for ReapingNudger<'_> {
        fn nudge(&mut self, pid: u32, _starttime: u64) -> Result<(), NudgeError> {
            if self.refuse {
                return Err(NudgeError::Refused("EPERM".into()));
            }
            self.sent += 1;
            let kids: Vec<u32> = self
                .view
                .procs
                .borrow()
                .values()
                .filter(|p| p.0.ppid == pid && p.0.state == 'Z')
                .map(|p| p.0.pid)
                .collect();
            kids.iter().for_each(|k| self.view.reap(*k));
            Ok(())
        }
    }

    struct NoEffect(u32);
    impl Nudger for NoEffect {
        fn nudge(&mut self, _: u32, _: u64) -> Result<(), NudgeError> {
            self.0 += 1;
            Ok(())
        }
    }

    const CGT: u64 = 1 << 16;
    const POLICY: ZombiePolicy = ZombiePolicy {
        min_age: 5 * SEC,
        sigchld: RemedyMode::Enforce,
    };

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

    #[test]
    fn a_scan_that_started_before_a_reap_does_not_bring_the_zombie_back() {
        let mut t = ZombieTracker::default();
        let z = ProcStat {
            pid: 11,
            comm: "child".into(),
            state: 'Z',
            ppid: 10,
            starttime: 1,
        };
        t.on_event(&exit(11, 10, SEC));
        // The scan starts at 2 s and sees the zombie; the parent reaps it at 3 s; the scan's
        // result arrives at 4 s.
        t.on_event(&ProcEvent {
            kind: ProcEventKind::Free,
            ..exit(11, 10, 3 * SEC)
        });
        t.on_scan(std::slice::from_ref(&z), 4 * SEC, 2 * SEC);
        assert!(t.is_empty(), "the reaped child stays gone");
        // A later scan that really sees it (pid reused by a new zombie) counts it.
        t.on_scan(std::slice::from_ref(&z), 10 * SEC, 5 * SEC);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn short_lived_zombies_are_not_reported() {
        let view = FakeProc::default();
        view.add(10, 1, 'S', CGT, 0);
        view.add(11, 10, 'Z', 0, 0);
        let mut d = ZombieDetector::default();
        let mut store = FindingStore::default();
        let mut n = NoEffect(0);
        d.tracker.on_event(&exit(11, 10, SEC));
        assert!(d.evaluate(3 * SEC, POLICY, &view, &mut n, &mut store).is_empty());
        // Reaped before the threshold: never reported.
        d.tracker.on_event(&ProcEvent {
            kind: ProcEventKind::Free,
            ..exit(11, 10, 4 * SEC)
        });
        assert!(d.evaluate(10 * SEC, POLICY, &view, &mut n, &mut store).is_empty());
        assert!(store.items.is_empty());
    }

    #[test]
    fn lost_signal_is_nudged_verified_and_resolved() {
        let view = FakeProc::default();
        view.add(10, 1, 'S', CGT, 0);
        view.add(11, 10, 'Z', 0, 0);
        view.add(12, 10, 'Z', 0, 0);
        let mut d = ZombieDetector::default();
        let mut store = FindingStore::default();
        d.tracker.on_event(&exit(11, 10, 0));
        d.tracker.on_event(&exit(12, 10, 0));
        let mut n = ReapingNudger {
            view: &view,
            sent: 0,
            refuse: false,
        };
        let t = d.evaluate(6 * SEC, POLICY, &view, &mut n, &mut store);
        assert_eq!(
            t.iter().map(|x| x.1.clone()).collect::<Vec<_>>(),
            vec![Transition::New, Transition::Action]
        );
        assert_eq!(n.sent, 1);
        let f = &store.items[0];
        assert_eq!(f.details["count"], 2);
        assert_eq!(f.details["diagnosis"], "handler-lost-signal");
        assert_eq!(f.actions[0].outcome, "sent");
        // The kernel frees them; the finding resolves and the action records the outcome.
        d.tracker.on_event(&ProcEvent {
            kind: ProcEventKind::Free,
            ..exit(11, 10, 6 * SEC)
        });
        d.tracker.on_event(&ProcEvent {
            kind: ProcEventKind::Free,
            ..exit(12, 10, 6 * SEC)
        });
        let t = d.evaluate(6 * SEC + SEC / 2, POLICY, &view, &mut n, &mut store);
        assert_eq!(t, vec![(1, Transition::Resolved)]);
        let f = &store.items[0];
        assert!(!f.active);
        assert_eq!(f.actions[0].outcome, "reaped 2 of 2");
        assert_eq!(f.actions[0].after["zombies"], 0);
    }

    #[test]
    fn blocked_parent_is_diagnosed_and_never_nudged() {
        let view = FakeProc::default();
        view.add(10, 1, 'S', CGT, CGT);
        view.add(11, 10, 'Z', 0, 0);
        let mut d = ZombieDetector::default();
        let mut store = FindingStore::default();
        d.tracker.on_scan(&[view.stat(11).unwrap()], SEC, SEC);
        let mut n = NoEffect(0);
        let mut logged = 0;
        for i in 0..100 {
            logged += d.evaluate((2 + i) * SEC, POLICY, &view, &mut n, &mut store).len();
        }
        assert_eq!(n.0, 0, "no nudge when SIGCHLD is blocked");
        assert_eq!(logged, 1, "reported once, not every tick");
        assert_eq!(store.items[0].details["diagnosis"], "sigchld-blocked");
        assert_eq!(store.items[0].severity, Severity::Critical);
    }

    #[test]
    fn ineffective_nudges_back_off_and_stop() {
        let view = FakeProc::default();
        view.add(10, 1, 'S', CGT, 0);
        view.add(11, 10, 'Z', 0, 0);
        let mut d = ZombieDetector::default();
        let mut store = FindingStore::default();
        d.tracker.on_event(&exit(11, 10, 0));
        let mut n = NoEffect(0);
        let mut sent_at = Vec::new();
        for i in 0..2000u64 {
            let now = 5 * SEC + i * SEC / 10;
            let before = n.0;
            d.evaluate(now, POLICY, &view, &mut n, &mut store);
            if n.0 > before {
                sent_at.push(now);
            }
        }
        assert_eq!(n.0, MAX_NUDGES);
        let gaps: Vec<u64> = sent_at.windows(2).map(|w| (w[1] - w[0]) / (SEC / 10)).collect();
        assert!(gaps.windows(2).all(|g| g[1] > g[0]), "backoff grows: {gaps:?}");
        let f = &store.items[0];
        assert!(
            f.actions.last().unwrap().outcome.starts_with("stopped"),
            "{:?}",
            f.actions
        );
        assert_eq!(
            f.actions
                .iter()
                .filter(|a| a.outcome.starts_with("reaped 0 of 1"))
                .count(),
            MAX_NUDGES as usize
        );
    }

    #[test]
    fn refusal_is_reported_once() {
        let view = FakeProc::default();
        view.add(10, 1, 'S', CGT, 0);
        view.add(11, 10, 'Z', 0, 0);
        let mut d = ZombieDetector::default();
        let mut store = FindingStore::default();
        d.tracker.on_event(&exit(11, 10, 0));
        let mut n = ReapingNudger {
            view: &view,
            sent: 0,
            refuse: true,
        };
        for i in 0..50 {
            d.evaluate(5 * SEC + i * SEC, POLICY, &view, &mut n, &mut store);
        }
        assert_eq!(store.items[0].actions.len(), 1);
        assert!(store.items[0].actions[0].outcome.starts_with("refused: EPERM"));
    }

    #[test]
    fn dry_run_plans_once_and_sends_nothing() {
        let view = FakeProc::default();
        view.add(10, 1, 'S', CGT, 0);
        view.add(11, 10, 'Z', 0, 0);
        let mut d = ZombieDetector::default();
        let mut store = FindingStore::default();
        d.tracker.on_event(&exit(11, 10, 0));
        let mut n = NoEffect(0);
        let dry = ZombiePolicy {
            sigchld: RemedyMode::DryRun,
            ..POLICY
        };
        for i in 0..20 {
            d.evaluate(5 * SEC + i * SEC, dry, &view, &mut n, &mut store);
        }
        assert_eq!(n.0, 0);
        assert_eq!(store.items[0].actions.len(), 1);
        assert_eq!(store.items[0].actions[0].mode, "dry-run");
        assert!(store.items[0].actions[0].outcome.starts_with("planned"));
    }

    #[test]
    fn storm_is_one_finding_with_the_count() {
        let view = FakeProc::default();
        view.add(10, 1, 'S', 0, 0);
        let mut scan = Vec::new();
        for pid in 1000..2000 {
            view.add(pid, 10, 'Z', 0, 0);
            scan.push(view.stat(pid).unwrap());
        }
        let mut d = ZombieDetector::default();
        let mut store = FindingStore::default();
        d.tracker.on_scan(&[], 0, 0);
        d.tracker.on_scan(&scan, SEC, SEC);
        let mut n = NoEffect(0);
        d.evaluate(7 * SEC, POLICY, &view, &mut n, &mut store);
        assert_eq!(store.items.len(), 1);
        assert_eq!(store.items[0].details["count"], 1000);
        assert_eq!(store.items[0].details["diagnosis"], "no-handler");
        assert_eq!(
            store.items[0].details["children"].as_array().unwrap().len(),
            LIST_CHILDREN
        );
        assert_eq!(
            d.parents[&10].oldest_ms, 6000,
            "appeared between scans: dated by the scan"
        );
    }

    #[test]
    fn preexisting_zombies_have_a_lower_bound_age() {
        let view = FakeProc::default();
        view.add(10, 1, 'S', 0, 0);
        view.add(11, 10, 'Z', 0, 0);
        let mut d = ZombieDetector::default();
        d.tracker.on_scan(&[view.stat(11).unwrap()], SEC, SEC);
        assert!(
            d.tracker.by_parent(3 * SEC, 5 * SEC).is_empty(),
            "watched for min_age first"
        );
        let g = d.tracker.by_parent(6 * SEC, 5 * SEC);
        assert!(
            !g[&10][0].age_exact,
            "predates holdfast: the age is a lower bound"
        );
        assert_eq!(g[&10][0].age_ms, 5000);
    }
}
