//! The finding store: owns every finding's lifecycle. Detectors hand it verdicts; it opens a
//! finding on the first, updates it silently after that, resolves the ones a detector no longer
//! reports, and says which of these changes deserve a log entry (transitions only, never one per
//! tick). Remedies record their actions here.
use std::collections::HashMap;

use crate::model::finding::{
    ActionRecord, Details, Finding, FindingId, FindingKind, RemedyAction, Severity, Subject, Transition,
};
use crate::model::time::{Nanos, ms};

/// Which detector (and which of its judgements) a finding belongs to. A detector's full pass
/// reconciles exactly its own family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Live eviction forecasts (idle-near-eviction, keepalive-too-slow, likely-evicted).
    Eviction,
    /// likely-evicted post-mortems of flows that already died.
    PostMortem,
    HalfOpen,
    Stuck,
    Held,
    Budget,
    Zombie,
}

/// What a finding is keyed by within its family.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Flow(u64),
    Pid(u32),
    Service(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub family: Family,
    pub kind: FindingKind,
    pub scope: Scope,
}

/// One detector judgement: "this holds now".
#[derive(Clone, Debug)]
pub struct Verdict {
    pub key: Key,
    pub severity: Severity,
    pub subject: Subject,
    pub summary: String,
    pub details: Details,
    /// Announce this update (an `updated` transition) if the finding is already open.
    pub notable: bool,
}

/// A change to announce: one log line, one journal entry, one `events` line.
pub type Change = (FindingId, Transition);

/// Resolved findings kept for the CLI.
const KEEP_RESOLVED: usize = 200;

#[derive(Default)]
pub struct FindingStore {
    next_id: FindingId,
    items: Vec<Finding>,
    /// Open findings by key.
    open: HashMap<Key, FindingId>,
    keys: HashMap<FindingId, Key>,
}

impl FindingStore {
    /// Opens the finding for `v.key`, or updates it. Returns the id and the change to announce.
    pub fn upsert(&mut self, v: Verdict, now: Nanos) -> (FindingId, Option<Transition>) {
        if let Some(&id) = self.open.get(&v.key) {
            if let Some(f) = self.get_mut(id) {
                f.summary = v.summary;
                f.details = v.details;
                f.subject = v.subject;
                f.severity = f.severity.max(v.severity);
                f.updated_ms = ms(now);
            }
            return (id, v.notable.then_some(Transition::Updated));
        }
        self.next_id += 1;
        let id = self.next_id;
        self.items.push(Finding {
            id,
            kind: v.key.kind,
            severity: v.severity,
            subject: v.subject,
            summary: v.summary,
            active: true,
            opened_ms: ms(now),
            updated_ms: ms(now),
            resolved_ms: None,
            resolution: None,
            details: v.details,
            actions: Vec::new(),
        });
        self.keys.insert(id, v.key.clone());
        self.open.insert(v.key, id);
        (id, Some(Transition::New))
    }

    /// A detector's full pass over `family`: upserts every verdict and resolves every open
    /// finding of the family that is not among them, with the reason `why_gone` gives.
    pub fn reconcile(
        &mut self,
        family: Family,
        verdicts: Vec<Verdict>,
        now: Nanos,
        mut why_gone: impl FnMut(&Key, &Finding) -> String,
    ) -> Vec<Change> {
        self.reconcile_until(family, verdicts, now, |k, f| Some(why_gone(k, f)))
    }

    /// As [`Self::reconcile`], but a finding whose verdict is gone stays open while `why_gone`
    /// says None (a remedy whose effect is not yet seen).
    pub fn reconcile_until(
        &mut self,
        family: Family,
        verdicts: Vec<Verdict>,
        now: Nanos,
        mut why_gone: impl FnMut(&Key, &Finding) -> Option<String>,
    ) -> Vec<Change> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for v in verdicts {
            seen.insert(v.key.clone());
            let (id, t) = self.upsert(v, now);
            if let Some(t) = t {
                out.push((id, t));
            }
        }
        let stale: Vec<(Key, FindingId)> = self
            .open
            .iter()
            .filter(|(k, _)| k.family == family && !seen.contains(*k))
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        for (key, id) in stale {
            let why = match self.get(id).and_then(|f| why_gone(&key, f)) {
                Some(w) => w,
                None => continue,
            };
            if let Some(c) = self.resolve(&key, why, now) {
                out.push(c);
            }
        }
        out
    }

    /// Resolves the open finding of `key`, if any.
    pub fn resolve(&mut self, key: &Key, why: String, now: Nanos) -> Option<Change> {
        let id = self.open.remove(key)?;
        self.keys.remove(&id);
        let f = self.get_mut(id)?;
        f.active = false;
        f.resolved_ms = Some(ms(now));
        f.updated_ms = ms(now);
        f.resolution = Some(why);
        self.trim();
        Some((id, Transition::Resolved))
    }

    fn trim(&mut self) {
        let resolved = self.items.iter().filter(|f| !f.active).count();
        if resolved > KEEP_RESOLVED
            && let Some(pos) = self.items.iter().position(|f| !f.active)
        {
            self.items.remove(pos);
        }
    }

    /// Records a remedy attempt on a finding.
    pub fn act(&mut self, id: FindingId, action: ActionRecord) -> Option<Change> {
        let f = self.get_mut(id)?;
        f.updated_ms = f.updated_ms.max(action.at_ms);
        f.actions.push(action);
        Some((id, Transition::Action))
    }

    /// Completes the last `action` of a finding with what was verified later.
    pub fn amend_action(
        &mut self,
        id: FindingId,
        action: RemedyAction,
        amend: impl FnOnce(&mut ActionRecord),
    ) -> Option<Change> {
        self.amend_where(id, |a| a.action == action, amend)
    }

    /// Completes the last action of a finding that `which` picks.
    pub fn amend_where(
        &mut self,
        id: FindingId,
        which: impl Fn(&ActionRecord) -> bool,
        amend: impl FnOnce(&mut ActionRecord),
    ) -> Option<Change> {
        let f = self.get_mut(id)?;
        let a = f.actions.iter_mut().rev().find(|a| which(a))?;
        amend(a);
        Some((id, Transition::Action))
    }

    pub fn get(&self, id: FindingId) -> Option<&Finding> {
        // Ids grow with position: a binary search finds them without a map.
        self.items
            .binary_search_by_key(&id, |f| f.id)
            .ok()
            .map(|i| &self.items[i])
    }

    /// Adds what was learnt later to a resolved finding's resolution (a remedy that seemed to
    /// work, and then the connection died anyway).
    pub fn annotate_resolution(&mut self, id: FindingId, extra: &str) -> Option<Change> {
        let f = self.get_mut(id)?;
        let r = f.resolution.as_mut()?;
        if r.contains(extra) {
            return None;
        }
        r.push_str("; ");
        r.push_str(extra);
        Some((id, Transition::Action))
    }

    fn get_mut(&mut self, id: FindingId) -> Option<&mut Finding> {
        self.items
            .binary_search_by_key(&id, |f| f.id)
            .ok()
            .map(|i| &mut self.items[i])
    }

    /// The open finding of `key`.
    pub fn id_of(&self, key: &Key) -> Option<FindingId> {
        self.open.get(key).copied()
    }

    pub fn key_of(&self, id: FindingId) -> Option<&Key> {
        self.keys.get(&id)
    }

    /// Open findings of a family, with their keys.
    pub fn open_in(&self, family: Family) -> impl Iterator<Item = (&Key, FindingId)> {
        self.open
            .iter()
            .filter(move |(k, _)| k.family == family)
            .map(|(k, id)| (k, *id))
    }

    /// Every finding kept (active and recently resolved), oldest first.
    pub fn all(&self) -> &[Finding] {
        &self.items
    }

    pub fn active(&self) -> impl Iterator<Item = &Finding> {
        self.items.iter().filter(|f| f.active)
    }

    /// Findings about a flow.
    pub fn about_flow(&self, cookie: u64) -> impl Iterator<Item = &Finding> {
        self.items
            .iter()
            .filter(move |f| f.subject.cookie() == Some(cookie))
    }

    /// Findings about a process: its own, its flows', and (for a zombie) its parent's.
    pub fn about_pid(&self, pid: u32) -> impl Iterator<Item = &Finding> {
        self.items.iter().filter(move |f| {
            f.subject.process().is_some_and(|p| p.pid == pid)
                || match &f.details {
                    Details::Zombie(c) => c.children.iter().any(|k| k.pid == pid),
                    Details::Budget { ledger } => ledger.pids.contains(&pid),
                    _ => false,
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::finding::{ActionValues, Outcome, OutcomeStatus, RemedyMode};
    use crate::model::process::{Diagnosis, ZombieCase};

    fn zombie_verdict(pid: u32, count: usize, notable: bool) -> Verdict {
        Verdict {
            key: Key {
                family: Family::Zombie,
                kind: FindingKind::Zombie,
                scope: Scope::Pid(pid),
            },
            severity: Severity::Warning,
            subject: Subject::Process {
                pid,
                comm: "p".into(),
                netns: None,
            },
            summary: format!("{count} zombies"),
            details: Details::Zombie(ZombieCase {
                ppid: pid,
                parent_comm: "p".into(),
                diagnosis: Diagnosis::NoHandler,
                explanation: String::new(),
                nudge_can_help: false,
                count,
                oldest_ms: 0,
                rate_per_min: 0.0,
                children: vec![],
                age_at_report_ms: 0,
                nudges: 0,
                stopped: false,
            }),
            notable,
        }
    }

    #[test]
    fn opens_once_updates_silently_resolves_what_was_not_seen() {
        let mut s = FindingStore::default();
        let c = s.reconcile(
            Family::Zombie,
            vec![zombie_verdict(1, 3, false)],
            5_000_000,
            |_, _| "x".into(),
        );
        assert_eq!(c, vec![(1, Transition::New)]);
        let c = s.reconcile(
            Family::Zombie,
            vec![zombie_verdict(1, 4, false)],
            6_000_000,
            |_, _| "x".into(),
        );
        assert!(c.is_empty(), "a silent update");
        assert_eq!(s.get(1).unwrap().summary, "4 zombies");
        let c = s.reconcile(
            Family::Zombie,
            vec![zombie_verdict(1, 8, true)],
            7_000_000,
            |_, _| "x".into(),
        );
        assert_eq!(c, vec![(1, Transition::Updated)]);
        // Another family's pass never touches it.
        assert!(
            s.reconcile(Family::Stuck, vec![], 8_000_000, |_, _| "no".into())
                .is_empty()
        );
        let c = s.reconcile(Family::Zombie, vec![], 9_000_000, |k, _| {
            format!("gone {:?}", k.scope)
        });
        assert_eq!(c, vec![(1, Transition::Resolved)]);
        let f = s.get(1).unwrap();
        assert!(!f.active);
        assert_eq!(
            (f.resolved_ms, f.resolution.as_deref()),
            (Some(9), Some("gone Pid(1)"))
        );
        // The same key later opens a new finding.
        let c = s.reconcile(
            Family::Zombie,
            vec![zombie_verdict(1, 1, false)],
            10_000_000,
            |_, _| "x".into(),
        );
        assert_eq!(c, vec![(2, Transition::New)]);
    }

    #[test]
    fn actions_are_recorded_and_amended() {
        let mut s = FindingStore::default();
        let (id, _) = s.upsert(zombie_verdict(4, 1, false), 0);
        let rec = ActionRecord {
            at_ms: 1,
            action: RemedyAction::Sigchld,
            mode: RemedyMode::Enforce,
            outcome: Outcome::new(OutcomeStatus::Pending, "sent"),
            before: Some(ActionValues::Zombies {
                zombies: 1,
                pids: vec![5],
            }),
            after: None,
        };
        assert_eq!(s.act(id, rec), Some((id, Transition::Action)));
        s.amend_action(id, RemedyAction::Sigchld, |a| {
            a.outcome = Outcome::new(OutcomeStatus::Succeeded, "reaped 1 of 1")
        });
        assert_eq!(s.get(id).unwrap().actions[0].outcome.text, "reaped 1 of 1");
        assert_eq!(s.about_pid(4).count(), 1);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = FindingStore::default();
        for i in 0..(KEEP_RESOLVED as u32 + 10) {
            let v = zombie_verdict(i, 1, false);
            let key = v.key.clone();
            s.upsert(v, 0);
            s.resolve(&key, "done".into(), 0);
        }
        assert_eq!(s.all().len(), KEEP_RESOLVED);
        assert!(s.get(KEEP_RESOLVED as u64 + 10).is_some());
    }
}
