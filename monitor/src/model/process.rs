//! Processes as holdfast sees them: the /proc fields it uses, why a parent does not reap, and
//! the zombie case of one parent.
use serde::{Deserialize, Serialize};

/// The fields of /proc/PID/stat holdfast uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    /// Start time in clock ticks since boot (identifies a pid incarnation).
    pub starttime: u64,
}

/// Signal dispositions and state of a process (/proc/PID/status).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcSignals {
    pub state: char,
    pub blocked: u64,
    pub ignored: u64,
    pub caught: u64,
    pub pending: u64,
}

/// Why a parent does not reap its zombie children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Diagnosis {
    /// SIGCHLD is blocked: the signal stays pending; a nudge cannot help.
    SigchldBlocked,
    /// SIGCHLD is ignored now (it was not when the children exited): a nudge cannot help.
    SigchldIgnored,
    /// Default disposition and the parent never calls wait(): the signal is discarded.
    NoHandler,
    /// A handler is installed but zombies persist: a lost or coalesced SIGCHLD. A nudge can help.
    HandlerLostSignal,
    /// The parent is stopped (SIGSTOP/SIGTSTP): it runs no handler until continued.
    ParentStopped,
    /// The parent is being traced and stopped by a debugger.
    ParentTraced,
    /// The parent is PID 1 of this namespace and does not reap orphans.
    InitDoesNotReap,
    /// The parent could not be read (gone, or not visible).
    Unknown,
}

impl Diagnosis {
    /// Whether sending SIGCHLD to the parent can get the zombies reaped.
    pub fn nudge_can_help(self) -> bool {
        self == Diagnosis::HandlerLostSignal
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Diagnosis::SigchldBlocked => "sigchld-blocked",
            Diagnosis::SigchldIgnored => "sigchld-ignored",
            Diagnosis::NoHandler => "no-handler",
            Diagnosis::HandlerLostSignal => "handler-lost-signal",
            Diagnosis::ParentStopped => "parent-stopped",
            Diagnosis::ParentTraced => "parent-traced",
            Diagnosis::InitDoesNotReap => "init-does-not-reap",
            Diagnosis::Unknown => "unknown",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            Diagnosis::SigchldBlocked => {
                "the parent blocks SIGCHLD, so its handler never runs; fix the parent's signal mask"
            }
            Diagnosis::SigchldIgnored => {
                "the parent ignores SIGCHLD now but did not when these children exited; only wait() by the parent or its exit frees them"
            }
            Diagnosis::NoHandler => {
                "the parent has no SIGCHLD handler and never calls wait(); fix the parent to reap (or set SIGCHLD to SIG_IGN)"
            }
            Diagnosis::HandlerLostSignal => {
                "the parent has a SIGCHLD handler but zombies persist: a lost or coalesced SIGCHLD; a nudge can trigger the handler"
            }
            Diagnosis::ParentStopped => {
                "the parent is stopped and runs no handler until it is continued (SIGCONT)"
            }
            Diagnosis::ParentTraced => "the parent is stopped under a tracer (debugger)",
            Diagnosis::InitDoesNotReap => {
                "the zombies were orphaned to PID 1, which does not reap here; only a reboot or a reaping init frees them"
            }
            Diagnosis::Unknown => "the parent could not be inspected",
        }
    }
}

/// One zombie child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZombieView {
    pub pid: u32,
    pub comm: String,
    pub age_ms: u64,
    /// False when the zombie predates holdfast: `age_ms` is then a lower bound.
    pub age_exact: bool,
}

/// What is known about one parent with zombie children (`procs`, `explain`, finding details).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZombieCase {
    pub ppid: u32,
    pub parent_comm: String,
    pub diagnosis: Diagnosis,
    pub explanation: String,
    pub nudge_can_help: bool,
    pub count: usize,
    pub oldest_ms: u64,
    /// Zombies seen per minute since the finding opened.
    pub rate_per_min: f64,
    /// The oldest first; at most 50.
    pub children: Vec<ZombieView>,
    /// Age of the oldest zombie when the finding opened: the detection latency when min_age is 0.
    pub age_at_report_ms: u64,
    /// SIGCHLD nudges sent so far, and whether holdfast stopped nudging.
    pub nudges: u32,
    pub stopped: bool,
}
