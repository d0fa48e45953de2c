//! How holdfast itself is doing: what the kernel allows (feature probes) and the counters the
//! eBPF programs keep.
use serde::{Deserialize, Serialize};

/// A feature probed at start, and what was found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Feature {
    pub name: String,
    pub available: bool,
    pub detail: String,
}

/// Per-program counters kept in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCounters {
    pub events: u64,
    pub lost: u64,
    pub errors: u64,
    pub lost_by_program: Vec<(String, u64)>,
    pub errors_by_program: Vec<(String, u64)>,
    /// Sockets the tcp iterator visited.
    pub iter_sockets: u64,
    /// Iterator records that did not fit the seq_file buffer (the kernel retries them): a health
    /// signal of the snapshot read.
    pub iter_overflow: u64,
    /// Sockets a filtered snapshot left out in the kernel (active, nothing to look at).
    pub iter_skipped: u64,
    pub proc_events: u64,
    pub proc_lost: u64,
    pub sockops_applied: u64,
    pub sockops_failed: u64,
}
