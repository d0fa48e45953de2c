//! The state owner's data and its answers to CLI queries.
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ebpf::KernelCounters;
use crate::eviction::{Assessment, EvictionDetector, EvictionPolicy, KaRequest, assess, plan};
use crate::findings::{Finding, FindingStore, Severity};
use crate::flows::{Flow, FlowTable, FlowView};
use crate::ipc::{FlowFilter, Reply, Request, Status};
use crate::observe::parse_state;
use crate::procs;
use crate::routes::Router;
use crate::sys;
use crate::zombies::{ParentCase, ZombieDetector};

/// Everything the state owner keeps.
pub struct State {
    pub table: FlowTable,
    pub zombies: ZombieDetector,
    pub eviction: EvictionDetector,
    pub leaks: crate::leaks::LeakDetector,
    pub ledger: crate::ledger::Ledger,
    /// Cookies counted as leaked at the last evaluation.
    pub leaked: std::collections::HashSet<u64>,
    pub services: Vec<crate::config::ServiceConfig>,
    pub leaks_cfg: crate::config::LeaksSection,
    /// How often the flow detectors run (see `flows_every`).
    pub flows_period: Duration,
    pub evpol: EvictionPolicy,
    pub router: Router,
    pub findings: FindingStore,
    /// Keepalive requests queued by queries (manual remedies), sent by the main loop.
    pub outbox: Vec<KaRequest>,
    pub mode: &'static str,
    pub mode_reason: String,
    pub sockops: String,
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
    pub journal: Option<crate::journal::Journal>,
    pub journal_failed: bool,
    pub notices: Option<tokio::sync::broadcast::Sender<crate::sinks::Notice>>,
    /// (kind, transition, action, outcome class) -> count, for metrics.
    pub counts: std::collections::BTreeMap<(String, String, String, String), u64>,
    /// The last notices, for `holdfast events` without --follow.
    pub recent: std::collections::VecDeque<crate::sinks::Notice>,
    pub reloads: u64,
    pub last_reload_error: Option<String>,
    /// Flows closed since the ledger last counted.
    pub pending_closed: Vec<(Flow, u64)>,
}

/// The eviction assessment of an ESTABLISHED flow (None for other states).
fn assess_flow(
    evpol: &EvictionPolicy,
    eviction: &EvictionDetector,
    router: &mut Router,
    f: &Flow,
    now: u64,
) -> Option<Assessment> {
    if f.state != monitor_common::tcp_state::ESTABLISHED || f.tcp.is_none() {
        return None;
    }
    Some(assess(
        f,
        now,
        evpol,
        eviction.known.get(&f.cookie).copied(),
        &mut |ip| router.path(ip),
    ))
}

/// `explain <pid>`: what holdfast knows about one process.
#[derive(Serialize)]
struct ProcessExplanation {
    pid: u32,
    comm: Option<String>,
    state: Option<String>,
    ppid: Option<u32>,
    /// If the process is a zombie: its parent.
    zombie_of: Option<u32>,
    /// If the process has zombie children: the case.
    zombie_parent: Option<ParentCase>,
    findings: Vec<Finding>,
    flows: Vec<FlowView>,
}

/// `explain <flow>`: the flow, its forecast and what was done.
#[derive(Serialize)]
struct FlowExplanation {
    flow: FlowView,
    assessment: Option<Assessment>,
    findings: Vec<Finding>,
}

impl State {
    pub fn new(
        mode: &'static str,
        mode_reason: String,
        evpol: EvictionPolicy,
        intervals: (Duration, Duration),
        config_desc: String,
    ) -> Self {
        use std::os::unix::fs::MetadataExt;
        State {
            table: FlowTable::default(),
            zombies: ZombieDetector::default(),
            eviction: EvictionDetector::default(),
            leaks: Default::default(),
            ledger: Default::default(),
            leaked: Default::default(),
            services: Vec::new(),
            leaks_cfg: Default::default(),
            flows_period: Duration::from_secs(1),
            evpol,
            router: Router::default(),
            findings: FindingStore::default(),
            outbox: Vec::new(),
            mode,
            mode_reason,
            sockops: String::new(),
            started: Instant::now(),
            kernel: KernelCounters::default(),
            undecodable: 0,
            events: 0,
            snapshots: 0,
            last_snapshot: Duration::ZERO,
            last_snapshot_sockets: 0,
            snapshot_interval: intervals.0,
            proc_interval: intervals.1,
            full_walks: 0,
            targeted_walks: 0,
            proc_scans: 0,
            last_proc_scan: Duration::ZERO,
            processes: 0,
            config_desc,
            netns: std::fs::metadata("/proc/self/ns/net")
                .map(|m| m.ino())
                .unwrap_or(0),
            journal: None,
            journal_failed: false,
            notices: None,
            counts: Default::default(),
            recent: Default::default(),
            reloads: 0,
            last_reload_error: None,
            pending_closed: Vec::new(),
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
            keepalive_at_connect: self.sockops.clone(),
            sockops_applied: self.kernel.sockops_applied,
            config: self.config_desc.clone(),
            config_reloads: self.reloads,
            last_reload_error: self.last_reload_error.clone(),
            journal: self.journal.is_some(),
        }
    }

    fn assess(&mut self, f: &Flow, now: u64) -> Option<Assessment> {
        assess_flow(&self.evpol, &self.eviction, &mut self.router, f, now)
    }

    fn flows(&mut self, f: &FlowFilter) -> Result<Vec<FlowView>, String> {
        let want_state = match &f.state {
            Some(s) => Some(parse_state(s).ok_or_else(|| {
                format!("unknown state `{s}`: use one of estab, syn-sent, syn-recv, fin-wait-1, fin-wait-2, close-wait, last-ack, listen, closing")
            })?),
            None => None,
        };
        let now = sys::monotonic_ns();
        // Borrow the table while the router is borrowed mutably: no copy of the flows.
        let (table, router, evpol, eviction) = (&self.table, &mut self.router, &self.evpol, &self.eviction);
        let selected = || {
            table
                .iter()
                .filter(|fl| f.all || want_state.is_some() || fl.state != monitor_common::tcp_state::LISTEN)
                .filter(|fl| want_state.is_none_or(|s| fl.state == s))
                .filter(|fl| {
                    f.port
                        .is_none_or(|p| fl.local.port() == p || fl.remote.port() == p)
                })
        };
        let leaked = if f.leaked {
            self.leaks.leaked(selected(), now, &self.leaks_cfg)
        } else {
            Default::default()
        };
        let mut out = Vec::new();
        for fl in selected() {
            if f.leaked && !leaked.contains(&fl.cookie) {
                continue;
            }
            let mut v = fl.view(now);
            if f.unit.as_ref().is_some_and(|u| v.unit.as_ref() != Some(u))
                || f.pid.is_some_and(|p| v.pid != Some(p))
                || f.idle_over_ms
                    .is_some_and(|min| v.idle_ms.is_none_or(|i| i < min))
            {
                continue;
            }
            let a = assess_flow(evpol, eviction, router, fl, now);
            if f.at_risk && !a.as_ref().is_some_and(|a| a.at_risk()) {
                continue;
            }
            v.risk = a.and_then(|a| a.risk());
            out.push(v);
        }
        out.sort_by(|a, b| (&a.state, &a.local, &a.remote).cmp(&(&b.state, &b.local, &b.remote)));
        Ok(out)
    }

    fn explain_pid(&mut self, pid: u32) -> ProcessExplanation {
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
                    || f.subject.contains(&format!(" pid {pid} "))
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

    fn explain_flow(&mut self, spec: &str) -> Result<FlowExplanation, String> {
        let f = self.table.find(spec).cloned().ok_or_else(|| {
            format!(
                "no single flow matches `{spec}`: use cookie:N or the local ADDR:PORT from `holdfast flows`"
            )
        })?;
        let now = sys::monotonic_ns();
        let assessment = self.assess(&f, now);
        let mut flow = f.view(now);
        flow.risk = assessment.as_ref().and_then(|a| a.risk());
        let findings = self
            .findings
            .items
            .iter()
            .filter(|x| x.details["cookie"] == f.cookie)
            .cloned()
            .collect();
        Ok(FlowExplanation {
            flow,
            assessment,
            findings,
        })
    }

    fn remedy(&mut self, action: &str, target: &str, dry_run: bool) -> Result<serde_json::Value, String> {
        if action != "keepalive" {
            return Err(format!(
                "unknown remedy `{action}`: holdfast can apply `keepalive` to a flow (sigchld runs on its own)"
            ));
        }
        let f = self.table.find(target).cloned().ok_or_else(|| {
            format!("no single flow matches `{target}`: use cookie:N or the local ADDR:PORT")
        })?;
        let now = sys::monotonic_ns();
        let a = self
            .assess(&f, now)
            .ok_or("only ESTABLISHED flows with TCP state can get keepalive")?;
        let app = a.applicable.as_ref().ok_or_else(|| {
            format!(
                "no idle timeout applies to this flow ({}); add a [[rules]] entry for it",
                a.no_middlebox_reason.clone().unwrap_or_default()
            )
        })?;
        let values = plan(app.timeout_s, &self.evpol.keepalive)?;
        if dry_run {
            return Ok(
                serde_json::json!({ "planned": values, "cookie": f.cookie, "profile": app.profile, "timeout_s": app.timeout_s }),
            );
        }
        let finding = match self.eviction.finding_of(f.cookie) {
            Some(id) => id,
            None => {
                let id = self.findings.open(
                    "idle-near-eviction",
                    Severity::Info,
                    format!("flow {} → {}", f.local, f.remote),
                    format!(
                        "manual keepalive for the {}s idle timeout of {}",
                        app.timeout_s, app.profile
                    ),
                    serde_json::json!({ "cookie": f.cookie, "assessment": a }),
                    now,
                );
                self.eviction.adopt(f.cookie, id);
                id
            }
        };
        let req = self.eviction.manual(&f, values, finding, now);
        self.outbox.push(req);
        Ok(serde_json::json!({ "queued": values, "cookie": f.cookie, "finding": finding }))
    }

    pub fn answer(&mut self, req: &Request, admin: bool) -> Reply {
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
                Err(_) => match self.explain_flow(target) {
                    Ok(e) => Reply::ok(&e),
                    Err(e) => Reply::err(e),
                },
            },
            Request::Profiles => Reply::ok(&self.evpol.profiles),
            Request::Ledger => Reply::ok(&self.ledger.rows(&self.services)),
            Request::Events { .. } => Reply::ok(&self.recent),
            Request::Reload => Reply::err("internal: reload is handled by the agent loop"),
            Request::Remedy {
                action,
                target,
                dry_run,
            } => {
                if !admin && !dry_run {
                    return Reply::err(
                        "permission denied: remedies change other processes' sockets; run as root (or use --dry-run)",
                    );
                }
                match self.remedy(action, target, *dry_run) {
                    Ok(v) => Reply::ok(&v),
                    Err(e) => Reply::err(e),
                }
            }
        }
    }
}
