//! The state owner's data and its answers to CLI queries.
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ebpf::KernelCounters;
use crate::findings::{Finding, FindingStore};
use crate::flows::{FlowTable, FlowView};
use crate::ipc::{FlowFilter, Reply, Request, Status};
use crate::observe::parse_state;
use crate::procs;
use crate::sys;
use crate::zombies::{ParentCase, ZombieDetector};

/// Everything the state owner keeps.
pub struct State {
    pub table: FlowTable,
    pub zombies: ZombieDetector,
    pub findings: FindingStore,
    pub mode: &'static str,
    pub mode_reason: String,
    pub started: Instant,
    pub kernel: KernelCounters,
    pub undecodable: u64,
    pub events: u64,
    pub snapshots: u64,
    pub last_snapshot: Duration,
    pub last_snapshot_sockets: usize,
    pub snapshot_interval: Duration,
    pub proc_interval: Duration,
    pub full_walks: u64,
    pub targeted_walks: u64,
    pub proc_scans: u64,
    pub last_proc_scan: Duration,
    pub processes: usize,
    pub config_desc: String,
    pub netns: u64,
}

/// `explain <pid>`: what holdfast knows about one process.
#[derive(Serialize)]
struct ProcessExplanation {
    pid: u32,
    comm: Option<String>,
    state: Option<String>,
    ppid: Option<u32>,
    /// If the process is a zombie: its parent's case.
    zombie_of: Option<u32>,
    /// If the process has zombie children: the case and its finding.
    zombie_parent: Option<ParentCase>,
    findings: Vec<Finding>,
    flows: Vec<FlowView>,
}

impl State {
    pub fn new(
        mode: &'static str,
        mode_reason: String,
        snapshot_interval: Duration,
        proc_interval: Duration,
        config_desc: String,
    ) -> Self {
        use std::os::unix::fs::MetadataExt;
        State {
            table: FlowTable::default(),
            zombies: ZombieDetector::default(),
            findings: FindingStore::default(),
            mode,
            mode_reason,
            started: Instant::now(),
            kernel: KernelCounters::default(),
            undecodable: 0,
            events: 0,
            snapshots: 0,
            last_snapshot: Duration::ZERO,
            last_snapshot_sockets: 0,
            snapshot_interval,
            proc_interval,
            full_walks: 0,
            targeted_walks: 0,
            proc_scans: 0,
            last_proc_scan: Duration::ZERO,
            processes: 0,
            config_desc,
            netns: std::fs::metadata("/proc/self/ns/net")
                .map(|m| m.ino())
                .unwrap_or(0),
        }
    }

    fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: self.mode.into(),
            mode_reason: self.mode_reason.clone(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .into(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            netns_inode: self.netns,
            flows: self.table.len(),
            table: self.table.counters.clone(),
            events: self.events,
            events_lost: self.kernel.lost + self.kernel.proc_lost,
            events_undecodable: self.undecodable,
            program_errors: self.kernel.errors,
            lost_by_program: self.kernel.lost_by_program.clone(),
            snapshots: self.snapshots,
            snapshot_interval_ms: self.snapshot_interval.as_millis() as u64,
            last_snapshot_ms: self.last_snapshot.as_secs_f64() * 1000.0,
            last_snapshot_sockets: self.last_snapshot_sockets,
            owner_full_walks: self.full_walks,
            owner_targeted_walks: self.targeted_walks,
            proc_scans: self.proc_scans,
            proc_scan_interval_ms: self.proc_interval.as_millis() as u64,
            last_proc_scan_ms: self.last_proc_scan.as_secs_f64() * 1000.0,
            processes: self.processes,
            zombies_tracked: self.zombies.tracker.len(),
            findings_active: self.findings.active().count(),
            config: self.config_desc.clone(),
        }
    }

    fn flows(&self, f: &FlowFilter) -> Result<Vec<FlowView>, String> {
        let want_state = match &f.state {
            Some(s) => Some(parse_state(s).ok_or_else(|| {
                format!("unknown state `{s}`: use one of estab, syn-sent, syn-recv, fin-wait-1, fin-wait-2, close-wait, last-ack, listen, closing")
            })?),
            None => None,
        };
        let now = sys::monotonic_ns();
        let mut out: Vec<FlowView> = self
            .table
            .iter()
            .filter(|fl| f.all || want_state.is_some() || fl.state != monitor_common::tcp_state::LISTEN)
            .filter(|fl| want_state.is_none_or(|s| fl.state == s))
            .filter(|fl| {
                f.port
                    .is_none_or(|p| fl.local.port() == p || fl.remote.port() == p)
            })
            .map(|fl| fl.view(now))
            .filter(|v| f.pid.is_none_or(|p| v.pid == Some(p)))
            .collect();
        out.sort_by(|a, b| (&a.state, &a.local, &a.remote).cmp(&(&b.state, &b.local, &b.remote)));
        Ok(out)
    }

    fn explain_pid(&self, pid: u32) -> ProcessExplanation {
        let st = procs::read_stat(pid);
        let zombie_of = self
            .zombies
            .parents
            .values()
            .find(|c| c.children.iter().any(|k| k.pid == pid))
            .map(|c| c.ppid);
        let zombie_parent = self.zombies.parents.get(&pid).cloned();
        let subject = format!("pid {pid} ");
        let findings = self
            .findings
            .items
            .iter()
            .filter(|f| {
                f.subject.starts_with(&subject)
                    || zombie_of.is_some_and(|p| f.subject.starts_with(&format!("pid {p} ")))
            })
            .cloned()
            .collect();
        let flows = self
            .flows(&FlowFilter {
                all: true,
                pid: Some(pid),
                ..Default::default()
            })
            .unwrap_or_default();
        ProcessExplanation {
            pid,
            comm: st.as_ref().map(|s| s.comm.clone()),
            state: st.as_ref().map(|s| s.state.to_string()),
            ppid: st.as_ref().map(|s| s.ppid),
            zombie_of,
            zombie_parent,
            findings,
            flows,
        }
    }

    pub fn answer(&self, req: &Request) -> Reply {
        match req {
            Request::Status => Reply::ok(&self.status()),
            Request::Flows { filter } => match self.flows(filter) {
                Ok(v) => Reply::ok(&v),
                Err(e) => Reply::err(e),
            },
            Request::Procs { .. } => Reply::ok(&self.zombies.parents.values().collect::<Vec<_>>()),
            Request::Findings { all, kind } => {
                let v: Vec<&Finding> = self
                    .findings
                    .items
                    .iter()
                    .filter(|f| *all || f.active)
                    .filter(|f| kind.as_ref().is_none_or(|k| &f.kind == k))
                    .collect();
                Reply::ok(&v)
            }
            Request::Explain { target } => match target.parse::<u32>() {
                Ok(pid) => Reply::ok(&self.explain_pid(pid)),
                Err(_) => Reply::err(format!(
                    "cannot explain `{target}`: give a pid (flows are explained by pid of their owner for now)"
                )),
            },
        }
    }
}
