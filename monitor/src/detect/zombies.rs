//! Zombie children: one `zombie` finding per parent, with why it does not reap (SIGCHLD blocked,
//! ignored, no handler, a lost signal, stopped, traced, or PID 1) and whether a SIGCHLD nudge can
//! help. Pure over the tracker and a [`ProcView`]; the nudge is remedy::sigchld.
use std::collections::{BTreeMap, HashSet};

use crate::findings::{Family, Key, Scope, Verdict};
use crate::model::finding::{Details, FindingKind, Severity, Subject};
use crate::model::process::{Diagnosis, ProcSignals, ZombieCase};
use crate::model::time::{Nanos, fmt_ms};
use crate::track::zombies::{ProcView, ZombieTracker};

/// SIGCHLD's bit in the /proc/PID/status signal masks (signal 17 -> bit 16).
const SIGCHLD_BIT: u64 = 1 << (17 - 1);
/// Children listed in a finding's details.
pub const LIST_CHILDREN: usize = 50;

/// Diagnoses a parent from its status.
pub fn diagnose(ppid: u32, sig: Option<&ProcSignals>) -> Diagnosis {
    let Some(s) = sig else { return Diagnosis::Unknown };
    match s.state {
        'T' => return Diagnosis::ParentStopped,
        't' => return Diagnosis::ParentTraced,
        _ => {}
    }
    if s.blocked & SIGCHLD_BIT != 0 {
        Diagnosis::SigchldBlocked
    } else if s.ignored & SIGCHLD_BIT != 0 {
        Diagnosis::SigchldIgnored
    } else if ppid == 1 {
        Diagnosis::InitDoesNotReap
    } else if s.caught & SIGCHLD_BIT != 0 {
        Diagnosis::HandlerLostSignal
    } else {
        Diagnosis::NoHandler
    }
}

/// What the detector keeps per parent with zombies.
#[derive(Clone, Debug)]
struct Parent {
    comm: String,
    starttime: u64,
    diagnosis: Diagnosis,
    opened: Nanos,
    seen: HashSet<u32>,
    logged_count: usize,
    age_at_report_ms: u64,
}

/// A parent the remedy may nudge.
#[derive(Clone, Debug)]
pub struct NudgeCase {
    pub key: Key,
    pub ppid: u32,
    pub starttime: u64,
    pub diagnosis: Diagnosis,
    pub children: Vec<u32>,
}

#[derive(Debug, Default)]
pub struct ZombiePass {
    pub verdicts: Vec<Verdict>,
    pub cases: Vec<NudgeCase>,
    /// Parents whose zombies are all gone since the last pass.
    pub gone: Vec<u32>,
}

#[derive(Default)]
pub struct ZombieDetector {
    parents: BTreeMap<u32, Parent>,
}

pub fn key(ppid: u32) -> Key {
    Key {
        family: Family::Zombie,
        kind: FindingKind::Zombie,
        scope: Scope::Pid(ppid),
    }
}

impl ZombieDetector {
    /// Judges every parent with confirmed zombies at least `min_age` old. `nudges` gives the
    /// remedy's count and whether it stopped, for the details.
    pub fn evaluate(
        &mut self,
        now: Nanos,
        tracker: &mut ZombieTracker,
        min_age: Nanos,
        view: &dyn ProcView,
        nudges: &dyn Fn(u32) -> (u32, bool),
    ) -> ZombiePass {
        tracker.confirm(now, view);
        let groups = tracker.by_parent(now, min_age);
        let mut pass = ZombiePass {
            gone: self
                .parents
                .keys()
                .copied()
                .filter(|p| !groups.contains_key(p))
                .collect(),
            ..Default::default()
        };
        for p in &pass.gone {
            self.parents.remove(p);
        }
        for (ppid, kids) in groups {
            let oldest = kids.first().map_or(0, |k| k.age_ms);
            let parent = self.parents.entry(ppid).or_insert_with(|| {
                let st = view.stat(ppid);
                Parent {
                    comm: st.as_ref().map_or_else(|| "?".into(), |s| s.comm.clone()),
                    starttime: st.as_ref().map_or(0, |s| s.starttime),
                    diagnosis: diagnose(ppid, view.signals(ppid).as_ref()),
                    opened: now,
                    seen: HashSet::new(),
                    logged_count: kids.len(),
                    age_at_report_ms: oldest,
                }
            });
            if parent.seen.len() < 100_000 {
                parent.seen.extend(kids.iter().map(|k| k.pid));
            }
            // Re-diagnose: a parent may block, unblock or stop SIGCHLD at any time.
            let diagnosis = diagnose(ppid, view.signals(ppid).as_ref());
            let mut notable = diagnosis != parent.diagnosis;
            parent.diagnosis = diagnosis;
            // Announce growth only when the count doubles, never on every tick.
            if kids.len() >= parent.logged_count * 2 {
                parent.logged_count = kids.len();
                notable = true;
            }
            let minutes = (now.saturating_sub(parent.opened) as f64 / 60e9).max(1.0);
            let (n, stopped) = nudges(ppid);
            let case = ZombieCase {
                ppid,
                parent_comm: parent.comm.clone(),
                diagnosis,
                explanation: diagnosis.explain().to_string(),
                nudge_can_help: diagnosis.nudge_can_help(),
                count: kids.len(),
                oldest_ms: oldest,
                rate_per_min: parent.seen.len() as f64 / minutes,
                children: kids.iter().take(LIST_CHILDREN).cloned().collect(),
                age_at_report_ms: parent.age_at_report_ms,
                nudges: n,
                stopped,
            };
            let summary = format!(
                "{} zombie child{} of pid {} ({}), oldest {}: {}",
                case.count,
                if case.count == 1 { "" } else { "ren" },
                ppid,
                case.parent_comm,
                fmt_ms(oldest),
                diagnosis.explain()
            );
            pass.cases.push(NudgeCase {
                key: key(ppid),
                ppid,
                starttime: parent.starttime,
                diagnosis,
                children: kids.iter().map(|k| k.pid).collect(),
            });
            pass.verdicts.push(Verdict {
                key: key(ppid),
                severity: if diagnosis.nudge_can_help() {
                    Severity::Warning
                } else {
                    Severity::Critical
                },
                subject: Subject::Process {
                    pid: ppid,
                    comm: parent.comm.clone(),
                    netns: None,
                },
                summary,
                details: Details::Zombie(case),
                notable,
            });
        }
        pass
    }

    /// The current case of a parent, for `procs` and `explain`.
    pub fn parent_comm(&self, ppid: u32) -> Option<&str> {
        self.parents.get(&ppid).map(|p| p.comm.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::observe::{ProcEvent, ProcEventKind};

    #[test]
    fn diagnoses_every_case() {
        let sig = |state, blocked, ignored, caught| ProcSignals {
            state,
            blocked,
            ignored,
            caught,
            pending: 0,
        };
        let b = SIGCHLD_BIT;
        assert_eq!(diagnose(10, None), Diagnosis::Unknown);
        assert_eq!(diagnose(10, Some(&sig('T', 0, 0, b))), Diagnosis::ParentStopped);
        assert_eq!(diagnose(10, Some(&sig('t', 0, 0, b))), Diagnosis::ParentTraced);
        assert_eq!(diagnose(10, Some(&sig('S', b, 0, b))), Diagnosis::SigchldBlocked);
        assert_eq!(diagnose(10, Some(&sig('S', 0, b, 0))), Diagnosis::SigchldIgnored);
        assert_eq!(diagnose(1, Some(&sig('S', 0, 0, 0))), Diagnosis::InitDoesNotReap);
        assert_eq!(
            diagnose(10, Some(&sig('S', 0, 0, b))),
            Diagnosis::HandlerLostSignal
        );
        assert_eq!(diagnose(10, Some(&sig('S', 0, 0, 0))), Diagnosis::NoHandler);
    }

    struct OneParent;
    impl ProcView for OneParent {
        fn stat(&self, pid: u32) -> Option<crate::model::process::ProcStat> {
            Some(crate::model::process::ProcStat {
                pid,
                comm: format!("p{pid}"),
                state: if pid == 10 { 'S' } else { 'Z' },
                ppid: 10,
                starttime: 1,
            })
        }
        fn signals(&self, _: u32) -> Option<ProcSignals> {
            Some(ProcSignals {
                state: 'S',
                ..Default::default()
            })
        }
    }

    #[test]
    fn one_verdict_per_parent_announced_again_only_when_it_doubles() {
        let mut t = ZombieTracker::default();
        let mut d = ZombieDetector::default();
        let exit = |pid, ts| ProcEvent {
            kind: ProcEventKind::Exit,
            pid,
            ppid: 10,
            exit_code: 0,
            ts,
            comm: "c".into(),
        };
        t.on_event(&exit(11, 0));
        let none = |_: u32| (0, false);
        let p = d.evaluate(1_000_000_000, &mut t, 0, &OneParent, &none);
        assert_eq!(p.verdicts.len(), 1);
        assert!(!p.verdicts[0].notable);
        t.on_event(&exit(12, 1_000_000_000));
        let p = d.evaluate(2_000_000_000, &mut t, 0, &OneParent, &none);
        assert!(p.verdicts[0].notable, "doubled: 1 -> 2");
        let Details::Zombie(c) = &p.verdicts[0].details else {
            panic!()
        };
        assert_eq!((c.count, c.diagnosis), (2, Diagnosis::NoHandler));
        t.forget(11);
        t.forget(12);
        let p = d.evaluate(3_000_000_000, &mut t, 0, &OneParent, &none);
        assert_eq!((p.verdicts.len(), p.gone.as_slice()), (0, &[10u32][..]));
    }
}
