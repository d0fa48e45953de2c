//! The state owner's answers to CLI queries, from typed state to typed replies.
use std::collections::HashMap;

use monitor_common::tcp_state;

use super::evaluate::AgentEnv;
use super::state::State;
use crate::detect::eviction::{assess, kind_of};
use crate::findings::{Family, Key, Scope, Verdict};
use crate::ipc::{
    Explanation, FlowExplanation, FlowFilter, NetnsStatus, ProcRow, ProcessExplanation, RemedyReply, Reply,
    Request, Status,
};
use crate::kernel::{procfs, sys};
use crate::model::eviction::Assessment;
use crate::model::finding::{Details, FindingKind, Severity};
use crate::model::flow::{Flow, FlowView};
use crate::model::observe::parse_state;
use crate::model::time::Nanos;

impl State {
    pub fn status(&self) -> Status {
        let mut flows_by_ns: HashMap<u32, usize> = HashMap::new();
        for f in self.table.iter() {
            *flows_by_ns.entry(f.netns).or_default() += 1;
        }
        let own = crate::kernel::netns::own_id();
        let mut netns: Vec<NetnsStatus> = self
            .netns
            .values()
            .map(|n| NetnsStatus {
                id: n.id,
                name: if n.id == own {
                    format!("{} (the agent's)", n.name)
                } else {
                    n.name.clone()
                },
                flows: flows_by_ns.get(&n.id).copied().unwrap_or(0),
                error: n.error.clone(),
            })
            .collect();
        netns.sort_by(|a, b| b.flows.cmp(&a.flows).then(a.name.cmp(&b.name)));
        let s = &self.stats;
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: self.info.mode.into(),
            mode_reason: self.info.mode_reason.clone(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .into(),
            pid: std::process::id(),
            uptime_ms: self.info.started.elapsed().as_millis() as u64,
            features: self.info.features.clone(),
            netns_scope: self.netns_scope.clone(),
            netns,
            flows: self.table.len(),
            tombstones: self.table.tombstones(),
            table: self.table.counters.clone(),
            events: s.events,
            events_lost: s.kernel.lost + s.kernel.proc_lost,
            events_undecodable: s.undecodable,
            program_errors: s.kernel.errors,
            kernel_counters: s.kernel.clone(),
            snapshots: s.snapshots,
            complete_reads: s.complete_reads,
            snapshots_skipped: self.gate.skipped(),
            fresh: s.fresh.clone(),
            snapshot_interval_ms: self.policy.pacing.interval.as_millis() as u64,
            snapshot_paced_ms: self.gate.paced_ms(),
            last_snapshot_ms: s.last_snapshot.as_secs_f64() * 1000.0,
            last_snapshot_sockets: s.last_snapshot_sockets,
            snapshot_failures: s.snapshot_failures,
            last_snapshot_error: s.last_snapshot_error.clone(),
            owner_full_walks: s.full_walks,
            owner_targeted_walks: s.targeted_walks,
            proc_scans: s.proc_scans,
            proc_scan_interval_ms: self.policy.proc_interval.as_millis() as u64,
            last_proc_scan_ms: s.last_proc_scan.as_secs_f64() * 1000.0,
            processes: s.processes,
            zombies_tracked: self.zombies.len(),
            findings_active: self.store.active().count(),
            rounds: s.rounds.clone(),
            slowest_step_ms: s.slowest.0.as_secs_f64() * 1000.0,
            slowest_step: s.slowest.1.to_string(),
            keepalive_at_connect: self.info.sockops.clone(),
            probe_watch: if self.watch.enabled {
                self.watch.describe()
            } else if self.info.mode == "poll" {
                "off: poll mode cannot see probes on the wire; keepalive is judged from its timer and tcpi_probes".into()
            } else {
                "off: the kernel cannot do it (see missing features); keepalive is judged from its timer"
                    .into()
            },
            config: self.info.config_desc.clone(),
            config_reloads: s.reloads,
            last_reload_error: s.last_reload_error.clone(),
            journal: false,
            socket: self.info.socket.display().to_string(),
            socket_ok: s.socket_ok,
            clients: s.clients,
            clients_refused: s.clients_refused,
            rss_bytes: crate::sinks::metrics::rss_bytes(),
        }
    }

    /// Records a timeout measured by `holdfast discover` for the path from namespace `netns` to
    /// `target`; answers with the path in words.
    fn discovered(
        &mut self,
        netns: u32,
        target: std::net::IpAddr,
        survived_ms: u64,
        broke_ms: u64,
    ) -> Result<String, String> {
        if !self.policy.learning.enabled {
            return Err("learning is off ([learning] enabled = false): add the printed rule instead".into());
        }
        if survived_ms == 0 || broke_ms <= survived_ms || broke_ms > 7 * 86_400_000 {
            return Err(format!(
                "expected 0 < survived_ms < broke_ms <= 7 days, got {survived_ms} and {broke_ms}"
            ));
        }
        let info = self
            .netns
            .get(&netns)
            .ok_or_else(|| format!("the namespace net:[{netns}] is not watched by this agent"))?;
        let handle = info.handle.clone();
        let gw = match self.router.path(&handle, target) {
            crate::model::eviction::RoutePath::Gateway(gw) => gw,
            other => {
                let how = match other {
                    crate::model::eviction::RoutePath::Local => "it is a local address",
                    crate::model::eviction::RoutePath::OnLink => "it is on-link",
                    _ => "there is no route to classify",
                };
                return Err(format!(
                    "{target} is not reached through a gateway from that namespace ({how}): no middlebox timeout to keep"
                ));
            }
        };
        let key = crate::track::paths::PathKey {
            netns: super::state::netns_name(&self.netns, netns).unwrap_or_else(|| format!("net:[{netns}]")),
            gateway: gw,
            prefix: crate::track::paths::prefix_of(target),
        };
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.paths.discovered(key.clone(), survived_ms, broke_ms, unix);
        tracing::info!(path = %key, survived_ms, broke_ms, "holdfast discover measured a path's idle timeout");
        Ok(format!("kept for {key}"))
    }

    /// The profiles and the paths learnt (or being learnt).
    pub fn profiles_view(&self) -> crate::model::eviction::ProfilesView {
        use crate::track::paths::Learned;
        let min = self.policy.learning.min_evictions as usize;
        let mut learned: Vec<_> = self
            .paths
            .iter()
            .map(|(k, e)| {
                let (timeout_s, evidence) = match e.learned(min) {
                    Learned::Timeout { ms, evidence } if self.policy.learning.enabled => {
                        (Some(ms / 1000), evidence)
                    }
                    Learned::Timeout { evidence, .. } => (None, format!("{evidence} (learning is off)")),
                    Learned::Not { reason } => (None, reason),
                };
                let weight = e.broke_ms.len() as u64 + e.survived;
                (
                    weight,
                    crate::model::eviction::LearnedPath {
                        netns: k.netns.clone(),
                        gateway: k.gateway.clone(),
                        prefix: k.prefix.clone(),
                        timeout_s,
                        evidence,
                        netns_present: self.netns_present(&k.netns),
                    },
                )
            })
            .collect();
        learned.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.prefix.cmp(&b.1.prefix)));
        learned.truncate(1000);
        crate::model::eviction::ProfilesView {
            profiles: self.policy.eviction.profiles.clone(),
            learned: learned.into_iter().map(|(_, l)| l).collect(),
            learning: self.policy.learning.enabled,
        }
    }

    /// The eviction assessment of an ESTABLISHED flow (None for other states).
    pub fn assess(&mut self, f: &Flow, now: Nanos) -> Option<Assessment> {
        if f.state != tcp_state::ESTABLISHED || f.tcp.is_none() {
            return None;
        }
        let known = self.detect.eviction.known(f.cookie);
        let mut env = AgentEnv {
            router: &mut self.router,
            netns: &self.netns,
            learned: &self.learned,
        };
        Some(assess(f, now, &self.policy.eviction, known, &mut env))
    }

    fn netns_matches(&self, f: &Flow, want: &str) -> bool {
        let name = self.netns.get(&f.netns).map_or("", |n| n.name.as_str());
        crate::model::observe::netns_matches(name, f.netns, want)
    }

    /// `flows`, first stage: the selected cookies, in display order (state, local, remote).
    pub fn flow_ids(&mut self, f: &FlowFilter) -> Result<Vec<u64>, String> {
        let want_state = match &f.state {
            Some(s) => Some(parse_state(s).ok_or_else(|| {
                format!("unknown state `{s}`: use one of estab, syn-sent, syn-recv, fin-wait-1, fin-wait-2, close-wait, last-ack, listen, closing")
            })?),
            None => None,
        };
        let now = sys::monotonic_ns();
        let leaked = if f.leaked {
            crate::detect::leaks::leaked(self.table.iter(), now, &self.policy.leaks)
        } else {
            Default::default()
        };
        let mut picked: Vec<&Flow> = Vec::new();
        for fl in self.table.iter() {
            let keep = (f.all || want_state.is_some() || fl.state != tcp_state::LISTEN)
                && want_state.is_none_or(|s| fl.state == s)
                && f.port
                    .is_none_or(|p| fl.local().port() == p || fl.remote().port() == p)
                && (!f.leaked || leaked.contains(&fl.cookie))
                && f.pid.is_none_or(|p| fl.pid_comm().map(|x| x.0) == Some(p))
                && f.unit
                    .as_ref()
                    .is_none_or(|u| fl.owner.as_ref().and_then(|o| o.unit.as_ref()) == Some(u))
                && f.idle_over_ms
                    .is_none_or(|min| fl.idle_ms(now).is_some_and(|i| i >= min))
                && f.netns.as_ref().is_none_or(|n| self.netns_matches(fl, n));
            if keep {
                picked.push(fl);
            }
        }
        picked.sort_by(|a, b| {
            (a.state, a.local(), a.remote(), a.cookie).cmp(&(b.state, b.local(), b.remote(), b.cookie))
        });
        let ids: Vec<u64> = picked.iter().map(|f| f.cookie).collect();
        if !f.at_risk {
            return Ok(ids);
        }
        let mut out = Vec::new();
        for c in ids {
            let Some(fl) = self.table.get(c).cloned() else {
                continue;
            };
            if self.assess(&fl, now).is_some_and(|a| a.at_risk()) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// `flows`, second stage: the views of a page of cookies, as JSON array items joined by commas
    /// (flows that closed since the first stage are left out).
    pub fn flow_page(&mut self, cookies: &[u64]) -> Vec<u8> {
        let now = sys::monotonic_ns();
        let mut out = Vec::with_capacity(cookies.len() * 700);
        for c in cookies {
            let Some(fl) = self.table.get(*c).cloned() else {
                continue;
            };
            let v = self.view(&fl, now);
            if !out.is_empty() {
                out.push(b',');
            }
            if serde_json::to_writer(&mut out, &v).is_err() {
                out.truncate(out.len().saturating_sub(1));
            }
        }
        out
    }

    fn view(&mut self, fl: &Flow, now: Nanos) -> FlowView {
        let mut v = fl.view(now, self.netns_name(fl.netns));
        v.risk = self.assess(fl, now).and_then(|a| a.risk());
        v
    }

    fn explain_pid(&mut self, pid: u32) -> ProcessExplanation {
        let st = procfs::read_stat(pid);
        let findings: Vec<_> = self.store.about_pid(pid).cloned().collect();
        let zombie_of = findings.iter().find_map(|f| match &f.details {
            Details::Zombie(c) if c.children.iter().any(|k| k.pid == pid) => Some(c.ppid),
            _ => None,
        });
        let zombie_parent = findings.iter().find_map(|f| match &f.details {
            Details::Zombie(c) if c.ppid == pid && f.active => Some(c.clone()),
            _ => None,
        });
        let now = sys::monotonic_ns();
        // What the process holds dead now (also before a finding opens for it).
        let dead_sockets = self
            .held
            .by_pid(now)
            .remove(&pid)
            .map(|h| h.sockets)
            .unwrap_or_default();
        let mine: Vec<Flow> = self
            .table
            .iter()
            .filter(|f| f.pid_comm().map(|x| x.0) == Some(pid))
            .cloned()
            .collect();
        let flows = mine.iter().map(|f| self.view(f, now)).collect();
        ProcessExplanation {
            pid,
            comm: st.as_ref().map(|s| s.comm.clone()),
            state: st.as_ref().map(|s| s.state),
            ppid: st.as_ref().map(|s| s.ppid),
            zombie_of,
            zombie_parent,
            dead_sockets,
            findings,
            flows,
        }
    }

    fn explain_flow(&mut self, spec: &str) -> Result<FlowExplanation, String> {
        let f = self.table.find(spec)?.clone();
        let now = sys::monotonic_ns();
        let assessment = self.assess(&f, now);
        let mut flow = f.view(now, self.netns_name(f.netns));
        flow.risk = assessment.as_ref().and_then(|a| a.risk());
        let findings = self.store.about_flow(f.cookie).cloned().collect();
        Ok(FlowExplanation {
            flow,
            assessment,
            findings,
        })
    }

    fn remedy(&mut self, action: &str, target: &str, dry_run: bool) -> Result<RemedyReply, String> {
        if action != "keepalive" {
            return Err(format!(
                "unknown remedy `{action}`: holdfast can apply `keepalive` to a flow by hand (sigchld, close and restart run by policy)"
            ));
        }
        let f = self.table.find(target)?.clone();
        let now = sys::monotonic_ns();
        let a = self
            .assess(&f, now)
            .ok_or("only ESTABLISHED flows with TCP state can get keepalive")?;
        let app = a.applicable.clone().ok_or_else(|| {
            format!(
                "no idle timeout applies to this flow ({}); add a [[rules]] entry for it",
                a.no_middlebox_reason.clone().unwrap_or_default()
            )
        })?;
        let values = crate::config::policy::plan(app.timeout_s, &self.policy.eviction.keepalive)?;
        let mut reply = RemedyReply {
            cookie: f.cookie,
            values,
            planned: dry_run,
            finding: None,
            profile: app.profile.clone(),
            timeout_s: app.timeout_s,
        };
        if dry_run {
            return Ok(reply);
        }
        // Recorded on the flow's open finding, or on a new one that says it was done by hand.
        let open = [
            FindingKind::IdleNearEviction,
            FindingKind::KeepaliveTooSlow,
            FindingKind::LikelyEvicted,
        ]
        .into_iter()
        .find_map(|kind| {
            self.store.id_of(&Key {
                family: Family::Eviction,
                kind,
                scope: Scope::Flow(f.cookie),
            })
        });
        let id = match open {
            Some(id) => id,
            None => {
                let kind = kind_of(a.verdict).unwrap_or(FindingKind::IdleNearEviction);
                let env = AgentEnv {
                    router: &mut self.router,
                    netns: &self.netns,
                    learned: &self.learned,
                };
                let (id, _) = self.store.upsert(
                    Verdict {
                        key: Key {
                            family: Family::Eviction,
                            kind,
                            scope: Scope::Flow(f.cookie),
                        },
                        severity: Severity::Info,
                        subject: crate::detect::eviction::flow_subject(
                            &f,
                            crate::detect::Env::netns_name(&env, f.netns),
                        ),
                        summary: format!(
                            "manual keepalive for the {}s idle timeout of {}",
                            app.timeout_s, app.profile
                        ),
                        details: Details::Eviction {
                            assessment: a.clone(),
                        },
                        notable: false,
                    },
                    now,
                );
                id
            }
        };
        reply.finding = Some(id);
        let req = self.remedies.keepalive.manual(now, &f, values, id, &a);
        self.outbox.push(req);
        Ok(reply)
    }

    fn procs(&self) -> Vec<ProcRow> {
        let mut rows: Vec<ProcRow> = Vec::new();
        for f in self.store.active() {
            let Some(p) = f.subject.process() else { continue };
            let row = match rows.iter_mut().find(|r| r.pid == p.pid) {
                Some(r) => r,
                None => {
                    rows.push(ProcRow {
                        pid: p.pid,
                        comm: p.comm.clone(),
                        zombies: None,
                        dead_sockets: 0,
                    });
                    rows.last_mut().expect("pushed")
                }
            };
            match &f.details {
                Details::Zombie(c) => row.zombies = Some(c.clone()),
                Details::Held { count, .. } => row.dead_sockets = *count,
                _ => {}
            }
        }
        rows.retain(|r| r.zombies.is_some() || r.dead_sockets > 0);
        rows.sort_by_key(|r| r.pid);
        rows
    }

    /// Answers every request except `status`, `flows`, `events --follow` and `reload`, which the
    /// server and the main loop handle.
    pub fn answer(&mut self, req: &Request, admin: bool) -> Reply {
        match req {
            Request::Procs { zombies } => {
                let mut rows = self.procs();
                if *zombies {
                    rows.retain(|r| r.zombies.is_some());
                }
                Reply::ok(&rows)
            }
            Request::Findings { all, kind } => {
                let v: Vec<_> = self
                    .store
                    .all()
                    .iter()
                    .filter(|f| *all || f.active)
                    .filter(|f| kind.is_none_or(|k| f.kind == k))
                    .collect();
                Reply::ok(&v)
            }
            Request::Explain { target } => match target.trim().parse::<u32>() {
                Ok(pid) if !target.trim().starts_with("cookie:") => {
                    if procfs::read_stat(pid).is_none() && self.store.about_pid(pid).next().is_none() {
                        return Reply::err(format!(
                            "no process {pid}, and no finding about it: for a flow use cookie:N or its local ADDR:PORT"
                        ));
                    }
                    Reply::ok(&Explanation::Process(Box::new(self.explain_pid(pid))))
                }
                _ => match self.explain_flow(target) {
                    Ok(e) => Reply::ok(&Explanation::Flow(Box::new(e))),
                    Err(e) => Reply::err(e),
                },
            },
            Request::Profiles {} => Reply::ok(&self.profiles_view()),
            Request::Ledger {} => {
                let mut rows = self.detect.ledger.rows(&self.policy.services);
                for r in &mut rows {
                    r.restart = self.remedies.restart.notes.get(&r.service).cloned();
                }
                Reply::ok(&rows)
            }
            Request::Remedy {
                action,
                target,
                dry_run,
            } => {
                if !admin && !dry_run {
                    return Reply::err(
                        "permission denied: remedies change other processes' sockets; run as root or as a member of the admin group (agent.admin_group), or use --dry-run",
                    );
                }
                match self.remedy(action, target, *dry_run) {
                    Ok(v) => Reply::ok(&v),
                    Err(e) => Reply::err(e),
                }
            }
            Request::Discovered {
                netns,
                target,
                survived_ms,
                broke_ms,
            } => {
                if !admin {
                    return Reply::err(
                        "permission denied: a measured timeout changes how flows are protected; run as root or as a member of the admin group (agent.admin_group)",
                    );
                }
                match self.discovered(*netns, *target, *survived_ms, *broke_ms) {
                    Ok(v) => Reply::ok(&v),
                    Err(e) => Reply::err(e),
                }
            }
            other => Reply::err(format!("internal: `{}` is not answered here", other.op())),
        }
    }
}
