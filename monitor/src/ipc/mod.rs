//! The CLI <-> agent protocol: one JSON object per line over a unix socket, request then reply.
//!
//! Requests are strict: a duplicate key, an unknown key or an unknown op is an error reply that
//! names it, and the connection stays usable. Large replies (`flows`) are streamed in bounded
//! chunks inside the one reply line. The client (`client`) trusts only an agent running as root
//! or as its own user.
pub mod client;
mod strict;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::eviction::{Assessment, KaValues};
use crate::model::finding::{Finding, FindingKind};
use crate::model::flow::{FlowView, TableCounters};
pub use crate::model::health::{Feature, KernelCounters};
use crate::model::leaks::HeldSocket;
use crate::model::process::ZombieCase;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the agent reads.
pub const MAX_LINE: usize = 64 * 1024;

/// Filters for `flows`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlowFilter {
    /// Include listening sockets.
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub pid: Option<u32>,
    /// Only flows with an eviction risk (near eviction, keepalive too slow, likely evicted).
    #[serde(default)]
    pub at_risk: bool,
    /// Only flows idle at least this long.
    #[serde(default)]
    pub idle_over_ms: Option<u64>,
    /// Only leaked sessions (half-open, or stuck in CLOSE_WAIT / FIN_WAIT2 / LAST_ACK).
    #[serde(default)]
    pub leaked: bool,
    /// Only flows of processes in this systemd unit.
    #[serde(default)]
    pub unit: Option<String>,
    /// Only flows of this network namespace (name, container, or net:[inode]).
    #[serde(default)]
    pub netns: Option<String>,
    /// Read the kernel for the selected flows first (fresh idle and keepalive timer values).
    #[serde(default)]
    pub fresh: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {},
    Flows {
        #[serde(default)]
        filter: FlowFilter,
    },
    /// Processes with findings (parents of zombies, holders of dead sockets).
    Procs {
        #[serde(default)]
        zombies: bool,
    },
    Findings {
        /// Include resolved findings.
        #[serde(default)]
        all: bool,
        #[serde(default)]
        kind: Option<FindingKind>,
    },
    Explain {
        target: String,
    },
    Profiles {},
    /// The session ledger per service.
    Ledger {},
    /// Finding transitions and remedy outcomes; with `follow` the connection streams them.
    Events {
        #[serde(default)]
        follow: bool,
    },
    /// Re-read the configuration file (needs root or the admin group).
    Reload {},
    /// A path's idle timeout measured by `holdfast discover` (needs root or the admin group):
    /// the agent keeps it as the path's evidence. `netns` is the inode of the namespace the
    /// measurement ran in.
    Discovered {
        netns: u32,
        target: std::net::IpAddr,
        survived_ms: u64,
        broke_ms: u64,
    },
    /// Apply a remedy now (needs root or the admin group, except with dry_run).
    Remedy {
        action: String,
        target: String,
        #[serde(default)]
        dry_run: bool,
    },
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status {} => "status",
            Request::Flows { .. } => "flows",
            Request::Procs { .. } => "procs",
            Request::Findings { .. } => "findings",
            Request::Explain { .. } => "explain",
            Request::Profiles {} => "profiles",
            Request::Ledger {} => "ledger",
            Request::Events { .. } => "events",
            Request::Reload {} => "reload",
            Request::Discovered { .. } => "discovered",
            Request::Remedy { .. } => "remedy",
        }
    }
}

/// One network namespace the agent watches.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetnsStatus {
    pub id: u32,
    pub name: String,
    pub flows: usize,
    /// The last error reading it, if any.
    pub error: Option<String>,
}

/// Evaluation rounds completed, by kind: the positive signal that "nothing happened" means
/// something was looked at.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rounds {
    pub zombies: u64,
    pub flows: u64,
    pub ledger: u64,
    /// Flows the eviction forecast judged, in all rounds: what changed or fell due, not every
    /// flow every round (a figure that grows with the table says something wakes them all).
    #[serde(default)]
    pub judged: u64,
}

/// `flows` queries' own reads of the kernel (`status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FreshReads {
    pub reads: u64,
    /// Sockets read fresh, in all.
    pub sockets: u64,
    /// Queries answered from the last read instead, and the last reason.
    pub not_read: u64,
    pub last_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub mode: String,
    pub mode_reason: String,
    pub kernel: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub features: Vec<Feature>,
    /// Which namespaces are watched, in words (every one, or only the agent's and why).
    pub netns_scope: String,
    pub netns: Vec<NetnsStatus>,
    pub flows: usize,
    /// Closed flows remembered so that a snapshot taken before the close cannot bring them back.
    pub tombstones: usize,
    pub table: TableCounters,
    /// Kernel events decoded by the agent (eBPF mode).
    pub events: u64,
    pub events_lost: u64,
    pub events_undecodable: u64,
    pub program_errors: u64,
    pub kernel_counters: KernelCounters,
    pub snapshots: u64,
    /// Of `snapshots`, the complete reads (eBPF mode: the others are filtered by the kernel).
    #[serde(default)]
    pub complete_reads: u64,
    /// Filtered reads skipped: no socket event since the last read, and no flow left out could
    /// have reached the kernel filter's threshold yet (eBPF mode).
    #[serde(default)]
    pub snapshots_skipped: u64,
    /// Reads of the flows a `flows` query selected, made at the query.
    #[serde(default)]
    pub fresh: FreshReads,
    pub snapshot_interval_ms: u64,
    /// How far apart periodic reads are now: the interval, or more where a read costs more than
    /// its share of a core (large tables). 0: not paced yet.
    #[serde(default)]
    pub snapshot_paced_ms: u64,
    pub last_snapshot_ms: f64,
    pub last_snapshot_sockets: usize,
    pub snapshot_failures: u64,
    pub last_snapshot_error: Option<String>,
    pub owner_full_walks: u64,
    pub owner_targeted_walks: u64,
    pub proc_scans: u64,
    pub proc_scan_interval_ms: u64,
    pub last_proc_scan_ms: f64,
    pub processes: usize,
    pub zombies_tracked: usize,
    pub findings_active: usize,
    pub rounds: Rounds,
    /// The longest single step of the state owner in the last minute (ms), and what it was.
    pub slowest_step_ms: f64,
    pub slowest_step: String,
    pub keepalive_at_connect: String,
    /// Keepalive probes watched on the wire (eBPF mode): how many sockets, and the last census.
    #[serde(default)]
    pub probe_watch: String,
    pub config: String,
    pub config_reloads: u64,
    pub last_reload_error: Option<String>,
    /// Findings are written to journald.
    pub journal: bool,
    /// The CLI socket: its path and whether the agent found it intact at the last check.
    pub socket: String,
    pub socket_ok: bool,
    pub clients: usize,
    pub clients_refused: u64,
    pub rss_bytes: u64,
}

/// `explain <pid>`: what holdfast knows about one process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProcessExplanation {
    pub pid: u32,
    pub comm: Option<String>,
    pub state: Option<char>,
    pub ppid: Option<u32>,
    /// If the process is a zombie: its parent.
    pub zombie_of: Option<u32>,
    /// If the process has zombie children: the case.
    pub zombie_parent: Option<ZombieCase>,
    /// Descriptors it holds to TCP sockets that are in no TCP table any more.
    pub dead_sockets: Vec<HeldSocket>,
    pub findings: Vec<Finding>,
    pub flows: Vec<FlowView>,
}

/// `explain <flow>`: the flow, its forecast and what was done.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FlowExplanation {
    pub flow: FlowView,
    pub assessment: Option<Assessment>,
    pub findings: Vec<Finding>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "about", rename_all = "kebab-case")]
pub enum Explanation {
    Process(Box<ProcessExplanation>),
    Flow(Box<FlowExplanation>),
}

/// A parent of zombies or a holder of dead sockets, for `procs`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProcRow {
    pub pid: u32,
    pub comm: String,
    pub zombies: Option<ZombieCase>,
    pub dead_sockets: usize,
}

/// The answer to `remedy keepalive`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RemedyReply {
    pub cookie: u64,
    pub values: KaValues,
    /// True: only planned (dry-run).
    pub planned: bool,
    pub finding: Option<u64>,
    pub profile: String,
    pub timeout_s: u64,
}

/// The answer to `reload`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReloadReply {
    pub config: String,
    /// Changed keys that take effect only at the next restart.
    pub restart_needed: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Something the asker should know about how this reply was made (e.g. answered from the
    /// table because the user's queries are over their share of the agent's time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Reply {
    pub fn ok<T: Serialize>(data: &T) -> Self {
        match serde_json::to_value(data) {
            Ok(v) => Reply {
                ok: true,
                data: Some(v),
                error: None,
                note: None,
            },
            Err(e) => Reply::err(format!("internal: cannot encode reply: {e}")),
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Reply {
            ok: false,
            data: None,
            error: Some(msg.into()),
            note: None,
        }
    }
    pub fn with_note(mut self, note: Option<String>) -> Self {
        self.note = note;
        self
    }
    pub fn to_line(&self) -> String {
        let mut s =
            serde_json::to_string(self).unwrap_or_else(|_| r#"{"ok":false,"error":"internal"}"#.into());
        s.push('\n');
        s
    }
}

/// The opening and closing of a streamed `{"ok":true,"data":[...]}` reply line.
pub const STREAM_OPEN: &str = r#"{"ok":true,"data":["#;
pub const STREAM_CLOSE: &str = "]}\n";

/// The closing of a streamed reply, with a note when there is one.
pub fn stream_close(note: Option<&str>) -> String {
    match note {
        None => STREAM_CLOSE.to_string(),
        Some(n) => format!("],\"note\":{}}}\n", serde_json::Value::String(n.to_string())),
    }
}

const OPS: &str = "status, flows, procs, findings, explain, profiles, ledger, events, reload, remedy";

/// Parses one request line into a request or the error reply to send back.
pub fn parse_request(line: &str) -> Result<Request, Reply> {
    let mut map: BTreeMap<String, serde_json::Value> = strict::object(line).map_err(|e| {
        Reply::err(format!(
            "malformed request (expected one JSON object per line, each key once): {e}"
        ))
    })?;
    let version = map.remove("v");
    if version.as_ref().and_then(|v| v.as_u64()) != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(Reply::err(format!(
            "unsupported protocol version {}: this agent speaks v{PROTOCOL_VERSION}; use a holdfast CLI of the same release",
            version.map_or("(missing)".to_string(), |v| v.to_string())
        )));
    }
    let value = serde_json::Value::Object(map.into_iter().collect());
    serde_json::from_value::<Request>(value).map_err(|e| Reply::err(format!("bad request: {e} (ops: {OPS})")))
}

/// The request line for `req`.
pub fn request_line(req: &Request) -> String {
    let mut v = serde_json::to_value(req).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("v".into(), PROTOCOL_VERSION.into());
    }
    let mut s = v.to_string();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests;
