//! The SIGCHLD nudge: for a parent whose handler missed a signal, SIGCHLD through a pidfd (after
//! checking the pid is still the diagnosed process), verified a second later, with exponential
//! backoff, a global rate limit, and a stop after a few ineffective nudges.
use std::collections::HashMap;

use super::{RateLimit, record};
use crate::detect::zombies::NudgeCase;
use crate::findings::{Change, FindingStore};
use crate::kernel::{procfs, sys};
use crate::model::finding::{ActionValues, Outcome, OutcomeStatus, RemedyAction, RemedyMode};
use crate::model::process::{ProcSignals, ProcStat};
use crate::model::time::{Nanos, SEC};
use crate::track::zombies::{ProcView, ZombieTracker};

/// A nudge is verified this long after it was sent.
pub const VERIFY_AFTER: Nanos = SEC;
/// Nudges per parent before holdfast gives up and says so.
pub const MAX_NUDGES: u32 = 5;
/// Nudges across all parents per minute.
const NUDGES_PER_MINUTE: usize = 60;
/// Pids listed in an action's before/after values.
const LIST: usize = 50;

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

/// The live /proc.
pub struct LiveProc;

impl ProcView for LiveProc {
    fn stat(&self, pid: u32) -> Option<ProcStat> {
        procfs::read_stat(pid)
    }
    fn signals(&self, pid: u32) -> Option<ProcSignals> {
        procfs::read_signals(pid)
    }
}

/// Sends SIGCHLD through a pidfd after checking the pid is still the diagnosed process.
pub struct PidfdNudger;

fn classify(e: std::io::Error, what: &str) -> NudgeError {
    match e.raw_os_error() {
        Some(libc::ESRCH) => NudgeError::Gone,
        Some(libc::EPERM) => NudgeError::Refused(format!(
            "EPERM on {what} (holdfast needs CAP_KILL or the parent's uid)"
        )),
        _ => NudgeError::Refused(format!("{what}: {e}")),
    }
}

impl Nudger for PidfdNudger {
    fn nudge(&mut self, pid: u32, starttime: u64) -> Result<(), NudgeError> {
        let fd = sys::pidfd_open(pid).map_err(|e| classify(e, "pidfd_open"))?;
        // The pidfd pins one process; make sure it is the incarnation that was diagnosed.
        match procfs::read_stat(pid) {
            Some(st) if st.starttime == starttime => {}
            _ => return Err(NudgeError::Gone),
        }
        fd.send_signal(nix::sys::signal::Signal::SIGCHLD)
            .map_err(|e| classify(e, "pidfd_send_signal"))
    }
}

#[derive(Clone, Debug, Default)]
struct NudgeState {
    nudges: u32,
    stopped: bool,
    next: Nanos,
    /// When to verify, and the zombies the nudge was for.
    verify: Option<(Nanos, Vec<u32>)>,
    planned: bool,
}

#[derive(Default)]
pub struct SigchldRemedy {
    parents: HashMap<u32, NudgeState>,
    limit: Option<RateLimit>,
}

impl SigchldRemedy {
    /// Nudges sent to a parent so far, and whether holdfast stopped.
    pub fn nudges(&self, ppid: u32) -> (u32, bool) {
        self.parents
            .get(&ppid)
            .map_or((0, false), |s| (s.nudges, s.stopped))
    }

    /// Parents whose zombies are all gone: a pending verification counts them all reaped.
    pub fn settle_gone(
        &mut self,
        gone: &[(u32, Option<crate::model::finding::FindingId>)],
        store: &mut FindingStore,
    ) -> Vec<Change> {
        let mut out = Vec::new();
        for (ppid, id) in gone {
            let Some(s) = self.parents.get_mut(ppid) else {
                continue;
            };
            if let (Some((_, before)), Some(id)) = (s.verify.take(), *id) {
                let n = before.len();
                if let Some(c) = store.amend_action(id, RemedyAction::Sigchld, |a| {
                    a.outcome = Outcome::new(OutcomeStatus::Succeeded, format!("reaped {n} of {n}"));
                    a.after = Some(ActionValues::Zombies {
                        zombies: 0,
                        pids: vec![],
                    });
                }) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// Why a parent's finding resolved.
    pub fn resolution(&self, ppid: u32, comm: &str) -> String {
        let nudged = match self.nudges(ppid).0 {
            0 => String::new(),
            n => format!(" after {n} nudge(s)"),
        };
        format!("all zombie children of pid {ppid} ({comm}) were reaped{nudged}")
    }

    /// Forgets parents that have no finding any more.
    pub fn forget(&mut self, ppid: u32) {
        self.parents.remove(&ppid);
    }

    /// One step for one parent: verify the last nudge, or nudge (dry-run: plan once).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        now: Nanos,
        case: &NudgeCase,
        mode: RemedyMode,
        view: &dyn ProcView,
        nudger: &mut dyn Nudger,
        tracker: &mut ZombieTracker,
        store: &mut FindingStore,
    ) -> Option<Change> {
        let id = store.id_of(&case.key)?;
        let s = self.parents.entry(case.ppid).or_default();
        if let Some((at, before)) = s.verify.clone() {
            if now < at {
                return None;
            }
            s.verify = None;
            let (still, reaped): (Vec<u32>, Vec<u32>) = before
                .iter()
                .partition(|p| view.stat(**p).is_some_and(|st| st.state == 'Z'));
            for pid in &reaped {
                tracker.forget(*pid);
            }
            let status = if reaped.is_empty() {
                OutcomeStatus::Ineffective
            } else {
                OutcomeStatus::Succeeded
            };
            return store.amend_action(id, RemedyAction::Sigchld, |a| {
                a.outcome = Outcome::new(status, format!("reaped {} of {}", reaped.len(), before.len()));
                a.after = Some(ActionValues::Zombies {
                    zombies: still.len(),
                    pids: still.iter().take(LIST).copied().collect(),
                });
            });
        }
        if mode == RemedyMode::Off || s.stopped || !case.diagnosis.nudge_can_help() || now < s.next {
            return None;
        }
        let before = Some(ActionValues::Zombies {
            zombies: case.children.len(),
            pids: case.children.iter().take(LIST).copied().collect(),
        });
        let act = |status, text: String| {
            record(
                now,
                RemedyAction::Sigchld,
                mode,
                status,
                text,
                before.clone(),
                None,
            )
        };
        let r = if s.nudges >= MAX_NUDGES {
            s.stopped = true;
            act(
                OutcomeStatus::Stopped,
                format!(
                    "stopped: {MAX_NUDGES} nudges did not get the zombies reaped; the parent needs fixing"
                ),
            )
        } else if mode == RemedyMode::DryRun {
            if s.planned {
                return None;
            }
            s.planned = true;
            act(
                OutcomeStatus::Planned,
                format!(
                    "planned: SIGCHLD to pid {} through a pidfd (dry-run, nothing sent)",
                    case.ppid
                ),
            )
        } else {
            if !self
                .limit
                .get_or_insert_with(|| RateLimit::new(NUDGES_PER_MINUTE, 60 * SEC))
                .take(now)
            {
                return None;
            }
            match nudger.nudge(case.ppid, case.starttime) {
                Ok(()) => {
                    s.nudges += 1;
                    s.verify = Some((now + VERIFY_AFTER, case.children.clone()));
                    // Exponential backoff: 1 s, 2 s, 4 s, ... between nudges of one parent.
                    s.next = now + VERIFY_AFTER + SEC * (1u64 << (s.nudges - 1).min(6));
                    act(OutcomeStatus::Pending, "sent".into())
                }
                Err(NudgeError::Refused(e)) => {
                    s.stopped = true;
                    act(OutcomeStatus::Refused, format!("refused: {e}; not retried"))
                }
                Err(NudgeError::Gone) => {
                    s.stopped = true;
                    act(
                        OutcomeStatus::Failed,
                        format!("not sent: pid {} is no longer the diagnosed process", case.ppid),
                    )
                }
            }
        };
        store.act(id, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_reused_pid() {
        let me = procfs::read_stat(std::process::id()).unwrap();
        let mut n = PidfdNudger;
        assert_eq!(n.nudge(me.pid, me.starttime + 1), Err(NudgeError::Gone));
    }

    #[test]
    fn a_live_parent_gets_sigchld_through_its_pidfd() {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // SIGCHLD blocked in the child (the mask survives exec), so a delivered one stays
        // pending where /proc shows it.
        // SAFETY: sigprocmask is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut set = nix::sys::signal::SigSet::empty();
                set.add(nix::sys::signal::Signal::SIGCHLD);
                set.thread_block().map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().unwrap();
        let st = procfs::read_stat(child.id()).unwrap();
        let mut n = PidfdNudger;
        let sent = n.nudge(st.pid, st.starttime);
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(sent, Ok(()));
        let shd = status
            .lines()
            .find_map(|l| l.strip_prefix("ShdPnd:"))
            .unwrap()
            .trim();
        let pending = u64::from_str_radix(shd, 16).unwrap();
        assert_ne!(pending & (1 << (libc::SIGCHLD - 1)), 0, "SIGCHLD pending: {shd}");
    }

    #[test]
    fn a_missing_process_is_gone() {
        let mut n = PidfdNudger;
        // pid_max is at most 4194304: this pid cannot exist.
        assert_eq!(n.nudge(4_194_305, 0), Err(NudgeError::Gone));
    }
}
