//! Remedy actions, typed: which remedy, in which mode, with what outcome (and the one classifier
//! journald priority, metrics and the CLI share), and the values before and after.
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The remedies holdfast can apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemedyAction {
    Sigchld,
    Keepalive,
    Close,
    Restart,
}

impl RemedyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RemedyAction::Sigchld => "sigchld",
            RemedyAction::Keepalive => "keepalive",
            RemedyAction::Close => "close",
            RemedyAction::Restart => "restart",
        }
    }
}

/// How a remedy is configured to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum RemedyMode {
    /// Never act.
    Off,
    /// Report the planned action once; change nothing.
    DryRun,
    /// Act (policy-gated, rate-limited, logged with before/after).
    Enforce,
}

impl RemedyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RemedyMode::Off => "off",
            RemedyMode::DryRun => "dry-run",
            RemedyMode::Enforce => "enforce",
        }
    }
}

/// Where a remedy attempt stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeStatus {
    /// Dry-run: what would be done; nothing was touched.
    Planned,
    /// Done, its effect not seen yet (a nudge sent, keepalive set, a socket aborted).
    Pending,
    /// Its effect was seen (zombies reaped, a probe answered, the slot freed).
    Succeeded,
    /// Done, but the effect did not come (nothing reaped, the owner still holds the fd).
    Ineffective,
    /// It could not be done (an error); not retried.
    Failed,
    /// The kernel or policy refused (EPERM, an LSM); reported once, never retried.
    Refused,
    /// holdfast gave up after repeated attempts.
    Stopped,
}

/// The class that journald priority, metrics and the CLI use: one classifier for all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeClass {
    Planned,
    Pending,
    Ok,
    Failed,
}

impl OutcomeClass {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeClass::Planned => "planned",
            OutcomeClass::Pending => "pending",
            OutcomeClass::Ok => "ok",
            OutcomeClass::Failed => "failed",
        }
    }
}

impl OutcomeStatus {
    pub fn class(self) -> OutcomeClass {
        match self {
            OutcomeStatus::Planned => OutcomeClass::Planned,
            OutcomeStatus::Pending => OutcomeClass::Pending,
            OutcomeStatus::Succeeded => OutcomeClass::Ok,
            OutcomeStatus::Ineffective
            | OutcomeStatus::Failed
            | OutcomeStatus::Refused
            | OutcomeStatus::Stopped => OutcomeClass::Failed,
        }
    }
}

/// A remedy attempt's result: a typed status and the sentence an operator reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: OutcomeStatus,
    pub text: String,
}

impl Outcome {
    pub fn new(status: OutcomeStatus, text: impl Into<String>) -> Self {
        Outcome {
            status,
            text: text.into(),
        }
    }
    pub fn class(&self) -> OutcomeClass {
        self.status.class()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Values recorded before and after an action, so that it can be understood and undone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "of", rename_all = "kebab-case")]
pub enum ActionValues {
    /// A socket's keepalive settings.
    Keepalive {
        so_keepalive: bool,
        idle_s: u32,
        intvl_s: u32,
        cnt: u32,
    },
    /// A socket to abort, with why it is believed dead.
    Socket {
        cookie: u64,
        local: SocketAddr,
        remote: SocketAddr,
        state: String,
        evidence: String,
        quiet_ms: u64,
    },
    /// A socket's state after an action.
    SocketState { state: String },
    /// Zombie children of a parent.
    Zombies { zombies: usize, pids: Vec<u32> },
    /// A service's sessions around a restart.
    Sessions {
        live: u64,
        leaked: u64,
        held: u64,
        pids: Vec<u32>,
    },
}

/// One remedy attempt (or plan, in dry-run) and its result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub at_ms: u64,
    pub action: RemedyAction,
    pub mode: RemedyMode,
    pub outcome: Outcome,
    pub before: Option<ActionValues>,
    pub after: Option<ActionValues>,
}
