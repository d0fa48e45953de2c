//! Dead and leaked sessions: half-open evidence, sockets stuck closing, descriptors held to dead
//! sockets, and the per-service session ledger.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Why a flow is believed dead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub silence_ms: u64,
    pub unanswered_probes: u8,
    pub retransmits: u8,
    pub unacked: u32,
    pub zero_window_probing: bool,
    pub keepalive_probing: bool,
    pub reasons: Vec<String>,
    /// Keepalive probes seen on the wire (eBPF mode, watched sockets).
    #[serde(default)]
    pub wire: Option<super::probe::ProbeView>,
}

/// One socket stuck in a closing state, as a close-wait-leak finding lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StuckSocket {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: String,
    pub age_ms: u64,
}

/// One descriptor a process holds to a TCP socket that is in no TCP table any more (closed after
/// a reset, an abort or SOCK_DESTROY): the session's slot is still taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldSocket {
    pub fd: u32,
    pub inode: u64,
    /// How long holdfast has seen it held dead.
    pub age_ms: u64,
    /// Where it was connected, if holdfast knew the flow before it died.
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
}

/// One service's sessions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LedgerRow {
    pub service: String,
    pub pids: Vec<u32>,
    pub opened: u64,
    pub closed: u64,
    /// Sessions in a TCP table (not LISTEN), plus descriptors held to dead sockets.
    pub live: u64,
    /// Of `live`: half-open, stuck closing, or held dead.
    pub leaked: u64,
    /// Of `live`: descriptors held to sockets that are in no TCP table any more.
    #[serde(default)]
    pub held: u64,
    pub limit: Option<u64>,
    /// Where the limit comes from: `config` (max_sessions) or `RLIMIT_NOFILE`.
    pub limit_source: Option<String>,
    /// Net sessions per minute over the trend window (live growth).
    pub growth_per_min: f64,
    pub opened_per_min: f64,
    /// Seconds until the limit at the current trend.
    pub exhaustion_eta_s: Option<u64>,
    /// A restart planned or last done by the restart remedy, in words.
    #[serde(default)]
    pub restart: Option<String>,
}
