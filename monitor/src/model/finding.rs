//! Findings, typed end to end: what holdfast concluded (kind, subject, details), what it did
//! about it (action, mode, outcome), and how each change is announced (transition). The agent,
//! the sinks, the IPC protocol and the CLI share these types; nothing parses them back out of text.
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use super::action::{
    ActionRecord, ActionValues, Outcome, OutcomeClass, OutcomeStatus, RemedyAction, RemedyMode,
};
use super::eviction::{Applicable, Assessment};
use super::leaks::{Evidence, HeldSocket, LedgerRow, StuckSocket};
use super::process::ZombieCase;

/// Stable finding kinds. Each has a fixed journald MESSAGE_ID, a catalog entry and a docs page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    IdleNearEviction,
    KeepaliveTooSlow,
    LikelyEvicted,
    HalfOpen,
    CloseWaitLeak,
    SessionBudget,
    Zombie,
    DeadSocketHeld,
}

impl FindingKind {
    pub const ALL: [FindingKind; 8] = [
        FindingKind::IdleNearEviction,
        FindingKind::KeepaliveTooSlow,
        FindingKind::LikelyEvicted,
        FindingKind::HalfOpen,
        FindingKind::CloseWaitLeak,
        FindingKind::SessionBudget,
        FindingKind::Zombie,
        FindingKind::DeadSocketHeld,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::IdleNearEviction => "idle-near-eviction",
            FindingKind::KeepaliveTooSlow => "keepalive-too-slow",
            FindingKind::LikelyEvicted => "likely-evicted",
            FindingKind::HalfOpen => "half-open",
            FindingKind::CloseWaitLeak => "close-wait-leak",
            FindingKind::SessionBudget => "session-budget",
            FindingKind::Zombie => "zombie",
            FindingKind::DeadSocketHeld => "dead-socket-held",
        }
    }

    /// The journald MESSAGE_ID (explained by packaging/holdfast.catalog).
    pub fn message_id(self) -> &'static str {
        match self {
            FindingKind::IdleNearEviction => "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f21",
            FindingKind::KeepaliveTooSlow => "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f22",
            FindingKind::LikelyEvicted => "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f23",
            FindingKind::HalfOpen => "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f24",
            FindingKind::CloseWaitLeak => "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f25",
            FindingKind::SessionBudget => "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f26",
            FindingKind::Zombie => "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f27",
            FindingKind::DeadSocketHeld => "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f28",
        }
    }

    /// Parses a kind as the CLI and the protocol spell it.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown finding kind `{s}`: use one of {}", all.join(", "))
        })
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// A process as findings name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: u32,
    pub comm: String,
}

/// What a finding is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Subject {
    Flow {
        cookie: u64,
        local: SocketAddr,
        remote: SocketAddr,
        /// The flow's network namespace, in words (`ip netns` name, container, or `net:[inode]`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<ProcRef>,
    },
    Process {
        pid: u32,
        comm: String,
        /// The network namespace of the sockets the finding is about (leaks), in words.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    Service {
        name: String,
    },
}

impl Subject {
    /// The process the finding is about or that owns its flow.
    pub fn process(&self) -> Option<ProcRef> {
        match self {
            Subject::Flow { owner, .. } => owner.clone(),
            Subject::Process { pid, comm, .. } => Some(ProcRef {
                pid: *pid,
                comm: comm.clone(),
            }),
            Subject::Service { .. } => None,
        }
    }

    pub fn cookie(&self) -> Option<u64> {
        match self {
            Subject::Flow { cookie, .. } => Some(*cookie),
            _ => None,
        }
    }

    pub fn netns(&self) -> Option<&str> {
        match self {
            Subject::Flow { netns, .. } | Subject::Process { netns, .. } => netns.as_deref(),
            Subject::Service { .. } => None,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Flow {
                local,
                remote,
                netns,
                owner,
                ..
            } => {
                write!(f, "flow {local} → {remote}")?;
                if let Some(n) = netns {
                    write!(f, " in {n}")?;
                }
                if let Some(o) = owner {
                    write!(f, " pid {} ({})", o.pid, o.comm)?;
                }
                Ok(())
            }
            Subject::Process { pid, comm, netns } => {
                write!(f, "pid {pid} ({comm})")?;
                if let Some(n) = netns {
                    write!(f, " in {n}")?;
                }
                Ok(())
            }
            Subject::Service { name } => write!(f, "service {name}"),
        }
    }
}

/// A change worth one log entry, one journal entry and one `events` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transition {
    New,
    Updated,
    Resolved,
    Action,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::New => "new",
            Transition::Updated => "updated",
            Transition::Resolved => "resolved",
            Transition::Action => "action",
        }
    }
}

/// The evidence behind a finding, by what it is about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "about", rename_all = "kebab-case")]
pub enum Details {
    /// A live flow's eviction forecast.
    Eviction {
        assessment: Assessment,
    },
    /// A flow that died after idling past its middlebox's timeout.
    PostMortem {
        profile: Applicable,
        silent_ms: u64,
        resets_recv: u32,
        error: Option<i32>,
        cause: String,
    },
    HalfOpen {
        evidence: Evidence,
    },
    /// Sockets stuck in a closing state, per owning process.
    Stuck {
        count: usize,
        by_state: std::collections::BTreeMap<String, usize>,
        oldest_ms: u64,
        sockets: Vec<StuckSocket>,
    },
    /// Descriptors a process holds to TCP sockets that are in no TCP table any more.
    Held {
        count: usize,
        oldest_ms: u64,
        per_min: f64,
        sockets: Vec<HeldSocket>,
    },
    Budget {
        ledger: LedgerRow,
    },
    Zombie(ZombieCase),
}

/// A finding id (unique within one agent run).
pub type FindingId = u64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub id: FindingId,
    pub kind: FindingKind,
    pub severity: Severity,
    pub subject: Subject,
    pub summary: String,
    pub active: bool,
    pub opened_ms: u64,
    pub updated_ms: u64,
    pub resolved_ms: Option<u64>,
    /// Why it resolved.
    pub resolution: Option<String>,
    pub details: Details,
    pub actions: Vec<ActionRecord>,
}

impl Finding {
    /// The eviction assessment, for findings that carry one.
    pub fn assessment(&self) -> Option<&Assessment> {
        match &self.details {
            Details::Eviction { assessment } => Some(assessment),
            _ => None,
        }
    }

    /// The profile that applied, for flow findings.
    pub fn profile(&self) -> Option<&str> {
        match &self.details {
            Details::Eviction { assessment } => assessment.applicable.as_ref().map(|a| a.profile.as_str()),
            Details::PostMortem { profile, .. } => Some(profile.profile.as_str()),
            _ => None,
        }
    }

    /// The process the finding concerns: the subject's, or a zombie case's parent.
    pub fn process(&self) -> Option<ProcRef> {
        self.subject.process()
    }
}

#[cfg(test)]
mod tests;
