//! Findings, typed end to end: what holdfast concluded (kind, subject, details), what it did
//! about it (action, mode, outcome), and how each change is announced (transition). The agent,
//! the sinks, the IPC protocol and the CLI share these types; nothing parses them back out of text.
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

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
            Subject::Process { pid, comm } => Some(ProcRef {
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
            Subject::Flow { netns, .. } => netns.as_deref(),
            _ => None,
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
            Subject::Process { pid, comm } => write!(f, "pid {pid} ({comm})"),
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
    Sessions { live: u64, held: u64, pids: Vec<u32> },
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
mod tests {
    use super::*;

    #[test]
    fn kinds_have_unique_ids_and_parse_back() {
        let mut ids: Vec<&str> = FindingKind::ALL.iter().map(|k| k.message_id()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), FindingKind::ALL.len());
        assert!(
            ids.iter()
                .all(|i| i.len() == 32 && i.chars().all(|c| c.is_ascii_hexdigit()))
        );
        for k in FindingKind::ALL {
            assert_eq!(FindingKind::parse(k.as_str()), Ok(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        assert!(
            FindingKind::parse("zombies")
                .unwrap_err()
                .contains("zombie, dead-socket-held")
        );
    }

    #[test]
    fn the_shipped_catalog_and_docs_explain_every_kind() {
        let cat = include_str!("../../../packaging/holdfast.catalog");
        for k in FindingKind::ALL {
            assert!(
                cat.contains(&format!("-- {}\nSubject: ", k.message_id())),
                "catalog entry for {k}"
            );
            let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../docs/findings/{}.md", k.as_str()));
            assert!(page.exists(), "docs page for {k}");
        }
    }

    #[test]
    fn one_classifier_for_outcomes() {
        use OutcomeStatus::*;
        assert_eq!(Planned.class(), OutcomeClass::Planned);
        assert_eq!(Pending.class(), OutcomeClass::Pending);
        assert_eq!(Succeeded.class(), OutcomeClass::Ok);
        for s in [Ineffective, Failed, Refused, Stopped] {
            assert_eq!(s.class(), OutcomeClass::Failed, "{s:?}");
        }
    }

    #[test]
    fn subjects_read_as_words_and_carry_their_process() {
        let s = Subject::Flow {
            cookie: 9,
            local: "10.0.0.1:5".parse().unwrap(),
            remote: "10.0.0.2:22".parse().unwrap(),
            netns: Some("blue".into()),
            owner: Some(ProcRef {
                pid: 7,
                comm: "ssh".into(),
            }),
        };
        assert_eq!(s.to_string(), "flow 10.0.0.1:5 → 10.0.0.2:22 in blue pid 7 (ssh)");
        assert_eq!(s.process().map(|p| p.pid), Some(7));
        let back: Subject = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
