//! The state owner's loop: observations in, evaluation rounds on their cadences, queries answered,
//! reload on SIGHUP, until SIGINT or SIGTERM.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::workers::WorkerMsg;
use super::{Msg, Runtime, State, evaluate, reload};
use crate::ipc::{Reply, Request};
use crate::kernel::{sockdiag, sys};
use crate::model::observe::{Event, EventKind, ProcEventKind};
use crate::remedy::close::{LiveHolders, SockDiagCloser};
use crate::remedy::sigchld::{LiveProc, PidfdNudger};
use crate::sinks::metrics::MetricsView;

/// How often the main tick runs (zombies every tick; flows and the ledger at their cadences).
const TICK: Duration = Duration::from_millis(200);
/// Flows of unknown owner waiting for the next tick's exact lookup, at most (more in one tick,
/// a connection storm, are found by a read).
const MAX_OWNER_PENDING: usize = 4096;
/// Below this many flows every walk is cheap: detectors and ledger run every 500 ms.
const SMALL_TABLE: usize = 10_000;
const SMALL_PERIOD: Duration = Duration::from_millis(500);
/// How often the snapshot thread is told when a filtered read can next find something (a walk
/// of the flows when they changed; the reads it gates are 10 s apart by default).
const CALM_EVERY: Duration = Duration::from_secs(5);
/// How often the session ledger is recounted on large tables.
const LEDGER_EVERY: Duration = Duration::from_secs(5);
/// After an exit event, when to check /proc for the zombie (exit_notify has run by then).
const ZOMBIE_CHECK_AFTER: Duration = Duration::from_millis(25);
/// How often routes and sysctls are re-read, and memory given back after storms.
const REFRESH_EVERY: Duration = Duration::from_secs(10);

pub async fn run(
    state: &mut State,
    rt: &mut Runtime,
    mut rx: mpsc::Receiver<Msg>,
    mut status_rx: mpsc::Receiver<oneshot::Sender<Reply>>,
) -> anyhow::Result<()> {
    let notify = crate::sinks::notify::Notifier::from_env();
    notify.send(&format!("READY=1\nSTATUS=mode {}: starting", state.info.mode));
    let watchdog = crate::sinks::notify::watchdog_interval();
    let mut last_notify = Instant::now();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nudger = PidfdNudger;
    let mut zombie_due: Option<tokio::time::Instant> = None;
    let mut flows_evaluated = Instant::now();
    let mut ledger_updated = Instant::now();
    let mut calm_told: Option<Instant> = None;
    let mut held_watched: Vec<u32> = Vec::new();
    // Restarts run off this loop; their answers come back here (one per service at a time).
    let (restart_tx, mut restart_rx) = mpsc::unbounded_channel::<(String, Result<String, String>)>();
    let mut refreshed = Instant::now();
    let mut paths_saved = Instant::now();
    loop {
        let mut step: &str;
        let t0: Instant;
        tokio::select! {
            // `status` first, whatever else is going on.
            biased;
            Some(reply) = status_rx.recv() => {
                t0 = Instant::now();
                step = "status";
                let _ = reply.send(Reply::ok(&status(state, rt)));
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                t0 = Instant::now();
                step = msg_name(&msg);
                on_msg(state, rt, msg, &mut zombie_due);
            }
            _ = async { tokio::time::sleep_until(zombie_due.unwrap_or_else(tokio::time::Instant::now)).await }, if zombie_due.is_some() => {
                t0 = Instant::now();
                step = "zombie round";
                zombie_due = None;
                let changes = evaluate::zombies(sys::monotonic_ns(), state, &LiveProc, &mut nudger);
                state.stats.rounds.zombies += 1;
                rt.sinks.publish(&state.store, changes);
            }
            _ = tick.tick() => {
                t0 = Instant::now();
                step = "tick";
                let now = sys::monotonic_ns();
                if last_notify.elapsed() >= watchdog.unwrap_or(Duration::from_secs(5)).min(Duration::from_secs(5)) {
                    last_notify = Instant::now();
                    let line = format!("STATUS={} mode: {} flows, {} active findings", state.info.mode, state.table.len(), state.store.active().count());
                    notify.send(&if watchdog.is_some() { format!("WATCHDOG=1\n{line}") } else { line });
                }
                let changes = evaluate::zombies(now, state, &LiveProc, &mut nudger);
                state.stats.rounds.zombies += 1;
                rt.sinks.publish(&state.store, changes);
                if !state.owner_pending.is_empty() {
                    let l = state.take_owner_lookups();
                    if !l.ids.is_empty() || l.read {
                        let _ = rt.workers.send(WorkerMsg::Owners { ids: l.ids, hints: l.hints, read: l.read });
                    }
                }
                // The flow detectors walk every flow: small tables often, large ones at the period.
                let period = if state.table.len() < SMALL_TABLE { SMALL_PERIOD } else { state.policy.flows_period };
                if flows_evaluated.elapsed() < period {
                    state.stats.note_step(step, t0.elapsed());
                    continue;
                }
                step = "flows round";
                flows_evaluated = Instant::now();
                if refreshed.elapsed() >= REFRESH_EVERY {
                    refreshed = Instant::now();
                    refresh(state, rt, now);
                }
                // SOCK_DESTROY goes through a sock_diag socket opened in the flow's namespace.
                let handles: HashMap<_, _> = state.netns.iter().map(|(id, n)| (*id, n.handle.clone())).collect();
                let mut destroy = |f: &crate::model::flow::Flow| {
                    let h = handles
                        .get(&f.netns)
                        .or_else(|| handles.get(&crate::kernel::netns::own_id()))
                        .ok_or_else(|| std::io::Error::other("the flow's namespace is not known"))?;
                    let sock = h
                        .within(sockdiag::socket)
                        .map_err(|e| std::io::Error::other(e.to_string()))?
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    sockdiag::destroy_on(&sock, f.local().addr(), f.remote().addr(), f.state, f.cookie)
                };
                let mut closer = SockDiagCloser { destroy: &mut destroy };
                let (changes, mut requests) = evaluate::flows(now, state, &mut closer, &mut LiveHolders);
                state.stats.rounds.flows += 1;
                if rt.ebpf
                    && let Some(idle) = state.policy.pacing.filter_idle_ms
                    && calm_told.is_none_or(|t| t.elapsed() >= CALM_EVERY)
                {
                    calm_told = Some(Instant::now());
                    state.gate.set_calm_until(state.table.calm_until(idle));
                }
                rt.sinks.publish(&state.store, changes);
                // What the flows taught about their paths: a new or changed timeout changes which
                // flows need a look (the policy's shortest timeout and the kernel filter).
                if state.relearn() {
                    repolicy(state, rt, true);
                }
                if state.paths.dirty && paths_saved.elapsed() >= SAVE_PATHS_EVERY {
                    paths_saved = Instant::now();
                    save_paths(state, rt);
                }
                if !rt.ebpf && !rt.cfg.keepalive.cgroups.is_empty() && rt.cfg.keepalive.mode == crate::config::RemedyMode::Enforce
                    && let Some(v) = state.policy.pacing.connect_values {
                        let cgroups = rt.cfg.keepalive.cgroups.clone();
                        requests.extend(state.remedies.keepalive.preventive(state.table.iter(), &cgroups, v));
                    }
                if !requests.is_empty() {
                    let _ = rt.workers.send(WorkerMsg::Keepalive(requests));
                }
                // Probes on the wire for the sockets the keepalive remedy acted on, then for
                // half-open suspects whose keepalive is on (their next probe or answer decides).
                let suspects = state
                    .store
                    .open_in(crate::findings::Family::HalfOpen)
                    .filter_map(|(k, _)| match k.scope {
                        crate::findings::Scope::Flow(c) => Some(c),
                        _ => None,
                    });
                let mut want: Vec<(u64, crate::model::observe::NetnsId)> = state
                    .remedies
                    .keepalive
                    .wire_wanted()
                    .into_iter()
                    .filter_map(|c| state.table.get(c).map(|f| (c, f.netns)))
                    .collect();
                for c in suspects {
                    if let Some(f) = state.table.get(c)
                        && f.tcp.as_ref().is_some_and(|t| t.keepalive == Some(true))
                        && !want.iter().any(|(w, _)| *w == c)
                    {
                        want.push((c, f.netns));
                    }
                }
                if let Some(plan) = state.watch.plan(&want) {
                    let _ = rt.workers.send(WorkerMsg::Watch(plan));
                }
                if state.table.len() < SMALL_TABLE || ledger_updated.elapsed() >= LEDGER_EVERY {
                    step = "flows and ledger round";
                    ledger_updated = Instant::now();
                    let changes = evaluate::ledger(now, state);
                    state.stats.rounds.ledger += 1;
                    rt.sinks.publish(&state.store, changes);
                    // The restart remedy: decide, run off the loop, check from the service's side.
                    let rows = state.detect.ledger.rows(&state.policy.services);
                    let (changes, jobs) = state.remedies.restart.act(now, &rows, &state.policy.services, &mut state.store, std::process::id());
                    rt.sinks.publish(&state.store, changes);
                    for job in jobs {
                        let tx = restart_tx.clone();
                        tokio::spawn(async move {
                            let r = crate::remedy::restart::run::run(&job.how).await;
                            let _ = tx.send((job.service, r));
                        });
                    }
                    let changes = state.remedies.restart.verify(now, &rows, &crate::kernel::procfs::alive, &mut state.store);
                    rt.sinks.publish(&state.store, changes);
                    if !rt.ebpf {
                        let pids = evaluate::held_watch(state);
                        if pids != held_watched {
                            held_watched = pids.clone();
                            let _ = rt.workers.send(WorkerMsg::HeldPids(pids));
                        }
                    }
                }
            }
            Some((service, result)) = restart_rx.recv() => {
                t0 = Instant::now();
                step = "restart result";
                match &result {
                    Ok(how) => tracing::info!(service = %service, "restart requested: {how}"),
                    Err(e) => warn!(service = %service, "restart failed: {e}"),
                }
                let changes = state.remedies.restart.done(&service, result, &mut state.store);
                rt.sinks.publish(&state.store, changes);
            }
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                t0 = Instant::now();
                step = "reload";
                let _ = reload::apply(state, rt);
            }
        }
        state.stats.note_step(step, t0.elapsed());
    }
    Ok(())
}

/// Routes and sysctls can change under a running agent; memory of a past storm goes back.
fn refresh(state: &mut State, rt: &mut Runtime, now: u64) {
    state.router.forget();
    // A quiet flow was judged on its path: where routes or rules changed, judge again.
    let netns = &state.netns;
    for id in state
        .router
        .changed(now, &|id| netns.get(&id).map(|n| n.handle.clone()))
    {
        let flows = state.table.unquiet_netns(id);
        tracing::debug!(
            netns = id,
            flows,
            "routes or rules changed: the flows there are judged again"
        );
    }
    let own = crate::kernel::netns::own_id();
    let mut facts_changed = false;
    if let Some(n) = state.netns.get_mut(&own) {
        let facts = crate::kernel::netns::read_facts();
        facts_changed = facts != n.facts;
        n.facts = facts;
    }
    repolicy(state, rt, facts_changed);
    state.prune();
    state.table.maintain(now);
    // glibc keeps freed pages (in every thread's arena) until asked: after a storm, give them back.
    sys::trim_heap();
}

/// Rebuilds the policy with the shortest timeouts known outside the configuration (conntrack,
/// learnt paths) and tells the snapshot thread if its pacing changed.
fn repolicy(state: &mut State, rt: &mut Runtime, rejudge: bool) {
    let before = state.policy.pacing;
    let timeouts = (
        state.policy.eviction.min_timeout_ms,
        state.policy.eviction.margin_ms,
    );
    state.policy = crate::config::policy::Policy::build(&rt.cfg, rt.ebpf, state.shortest_external_s());
    // Forecasts judged quiet hold until a timeout they depend on changes.
    if rejudge
        || timeouts
            != (
                state.policy.eviction.min_timeout_ms,
                state.policy.eviction.margin_ms,
            )
    {
        state.table.unquiet(None);
    }
    if state.policy.pacing != before {
        let _ = rt.workers.send(WorkerMsg::Pacing(state.policy.pacing));
    }
}

/// How often learnt path evidence is written (and at shutdown).
const SAVE_PATHS_EVERY: Duration = Duration::from_secs(10);

/// Writes the path evidence; a failure is logged once per distinct error.
pub fn save_paths(state: &mut State, rt: &mut Runtime) {
    if !rt.cfg.learning.enabled || !state.paths.dirty {
        return;
    }
    match state.paths.save(&rt.cfg.learning.state_file) {
        Ok(()) => rt.paths_error = None,
        Err(e) => {
            if rt.paths_error.as_deref() != Some(e.as_str()) {
                warn!(
                    "cannot keep learnt idle timeouts across restarts: {e} (learning.state_file; the unit's StateDirectory=holdfast provides /var/lib/holdfast)"
                );
                rt.paths_error = Some(e);
            }
        }
    }
}

fn status(state: &State, rt: &Runtime) -> crate::ipc::Status {
    let mut s = state.status();
    s.journal = rt.sinks.journal.is_some();
    s.socket_ok = rt.socket_ok.load(Ordering::Relaxed);
    s.clients = rt.clients.connected.load(Ordering::Relaxed);
    s.clients_refused = rt.clients.refused.load(Ordering::Relaxed);
    s
}

fn metrics(state: &State, rt: &Runtime) -> String {
    let mut v = MetricsView {
        mode: state.info.mode.into(),
        events: state.stats.events,
        events_lost: state.stats.kernel.lost + state.stats.kernel.proc_lost,
        snapshot_seconds: state.stats.last_snapshot.as_secs_f64(),
        snapshots: state.stats.snapshots,
        complete_reads: state.stats.complete_reads,
        snapshot_failures: state.stats.snapshot_failures,
        ipc_refused: rt.clients.refused.load(Ordering::Relaxed),
        rss_bytes: crate::sinks::metrics::rss_bytes(),
        remedies: rt.sinks.remedies.clone(),
        ..Default::default()
    };
    // Counted by (namespace id, state) first: one name per namespace, not one per flow.
    let mut counts: std::collections::HashMap<(crate::model::observe::NetnsId, u8), usize> =
        std::collections::HashMap::new();
    for f in state.table.iter() {
        *counts.entry((f.netns, f.state)).or_default() += 1;
    }
    for ((ns, st), n) in counts {
        let name = state.netns_name(ns).unwrap_or_else(|| "unknown".into());
        *v.flows
            .entry((name, crate::model::observe::state_name(st).to_string()))
            .or_default() += n as u64;
    }
    for f in state.store.active() {
        *v.findings_active.entry(f.kind).or_default() += 1;
    }
    crate::sinks::metrics::render(&v)
}

fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Events { .. } => "events",
        Msg::Snapshot { .. } => "snapshot",
        Msg::SnapshotFailed { .. } => "snapshot failed",
        Msg::Namespaces { .. } => "namespaces",
        Msg::Held { .. } => "held descriptors",
        Msg::ProcScan { .. } => "proc scan",
        Msg::Query { .. } => "query",
        Msg::FlowIds { .. } => "flows query (select)",
        Msg::FlowPage { .. } => "flows query (page)",
        Msg::Keepalive(_) => "keepalive results",
        Msg::Watched(_) => "probe watch results",
        Msg::Refresh { .. } => "flows query (fresh read asked)",
        Msg::Fresh { .. } => "flows query (fresh values)",
        Msg::Metrics(_) => "metrics",
    }
}

fn on_msg(state: &mut State, rt: &mut Runtime, msg: Msg, zombie_due: &mut Option<tokio::time::Instant>) {
    match msg {
        Msg::Events {
            events,
            procs,
            undecodable,
            counters,
        } => {
            state.stats.undecodable += undecodable;
            state.stats.events += (events.len() + procs.len()) as u64;
            if let Some(c) = counters {
                state.gate.note_lost(c.lost);
                state.stats.kernel = c;
            }
            let mut unknown_owner = false;
            let mut hints = Vec::new();
            let mut unknown_netns = false;
            let (all, own) = (state.policy.pacing.all_netns, crate::kernel::netns::own_id());
            let mut socket_events = 0;
            for e in &events {
                if !all && e.netns != 0 && e.netns != own {
                    continue;
                }
                socket_events += u64::from(calls_for_read(e));
                if state.table.apply_event(e) {
                    // A flow of unknown owner: looked up exactly at the next tick, or, past the
                    // bound, found by a read soon.
                    let pid = e.pid_hint.as_ref().map(|h| h.pid);
                    if state.owner_pending.len() < MAX_OWNER_PENDING {
                        state.owner_pending.push(crate::agent::state::PendingOwner {
                            cookie: e.cookie,
                            pid,
                            waited: false,
                        });
                    } else {
                        unknown_owner = true;
                        if let Some(pid) = pid
                            && hints.len() < super::workers::MAX_SOON_HINTS
                        {
                            hints.push((e.cookie, pid));
                        }
                    }
                }
                unknown_netns |= e.netns != 0 && !state.netns.contains_key(&e.netns);
            }
            state.gate.note_events(socket_events);
            if unknown_owner {
                let _ = rt.workers.send(WorkerMsg::Soon(hints));
            }
            // A socket that reached CLOSE while its program still held it died under the program
            // (a reset, an abort): see whether the program lets go of it.
            if events.iter().any(|e| {
                e.had_file
                    && e.kind == crate::model::observe::EventKind::State
                    && e.state == monitor_common::tcp_state::CLOSE
            }) {
                let _ = rt.workers.send(WorkerMsg::HeldSoon);
            }
            if unknown_netns {
                // A namespace the agent does not know yet (a container just started).
                let _ = rt.workers.send(WorkerMsg::Discover);
            }
            for p in &procs {
                state.zombies.on_event(p);
            }
            // An exit is checked against /proc right after exit_notify, not at the next tick.
            if procs.iter().any(|p| p.kind == ProcEventKind::Exit) && zombie_due.is_none() {
                *zombie_due = Some(tokio::time::Instant::now() + ZOMBIE_CHECK_AFTER);
            }
        }
        Msg::Snapshot {
            snap,
            owners,
            full_walks,
            targeted_walks,
            first_of_round,
        } => {
            let s = &mut state.stats;
            let took = Duration::from_nanos(snap.finished.saturating_sub(snap.started));
            // A round's figures: every namespace's read summed (an exact read of new flows for
            // their owners is not a round).
            let round = snap.coverage != crate::model::observe::Coverage::Targeted;
            if round && first_of_round {
                s.snapshots += 1;
                s.complete_reads += u64::from(snap.coverage == crate::model::observe::Coverage::Complete);
                s.last_snapshot = took;
                s.last_snapshot_sockets = snap.socks.len();
            } else if round {
                s.last_snapshot += took;
                s.last_snapshot_sockets += snap.socks.len();
            }
            s.full_walks = full_walks;
            s.targeted_walks = targeted_walks;
            s.last_snapshot_error = None;
            let t0 = std::time::Instant::now();
            state.table.apply_snapshot(&snap, &owners);
            let unowned = state.table.take_unowned();
            if !unowned.is_empty() {
                let _ = rt.workers.send(WorkerMsg::Unowned(unowned));
            }
            if round {
                let took = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                state.gate.note_applied(first_of_round, took);
            }
        }
        Msg::SnapshotFailed { netns, error } => {
            let s = &mut state.stats;
            s.snapshot_failures += 1;
            // The worker reports a namespace's failure once per streak: log each report.
            warn!(failures = s.snapshot_failures, netns = ?netns, "reading a TCP table failed: {error}");
            s.last_snapshot_error = Some(error);
        }
        Msg::Held { found, scope, owners } => {
            let now = sys::monotonic_ns();
            let table = &state.table;
            state
                .held
                .apply(now, &found, &scope, &owners, &|inode| table.addrs_of_inode(inode));
        }
        Msg::Namespaces { scope, spaces, gone } => {
            let now = sys::monotonic_ns();
            if scope != state.netns_scope {
                tracing::info!(scope = %scope, "network namespaces watched");
                state.netns_scope = scope;
            }
            for id in gone {
                if let Some(n) = state.netns.remove(&id) {
                    let flows = state.table.drop_netns(id, now);
                    state.router.forget_netns(id);
                    tracing::info!(netns = %n.name, flows, "network namespace gone");
                }
            }
            for e in spaces {
                let id = e.found.handle.id;
                let name = e.found.name.clone();
                let info = crate::agent::state::NetnsInfo {
                    id,
                    name: e.found.name,
                    facts: e.facts,
                    error: e.error,
                    handle: e.found.handle,
                };
                if state.netns.insert(id, info).is_none() {
                    tracing::info!(netns = %name, id, "watching network namespace");
                }
            }
            // Names, sysctls or the set changed: forecasts judged quiet are judged again, and
            // the shortest timeout may have come or gone with a namespace (its conntrack, the
            // paths learnt there).
            state.table.unquiet(None);
            repolicy(state, rt, false);
        }
        Msg::ProcScan {
            scan,
            started,
            finished,
        } => {
            state.stats.proc_scans += 1;
            state.stats.last_proc_scan = Duration::from_nanos(finished.saturating_sub(started));
            state.stats.processes = scan.processes;
            state.zombies.on_scan(&scan.zombies, finished, started);
        }
        Msg::Query {
            req: Request::Reload {},
            admin,
            reply,
        } => {
            let r = if !admin {
                Reply::err(
                    "permission denied: reloading the configuration needs root or the admin group (agent.admin_group)",
                )
            } else {
                match reload::apply(state, rt) {
                    Ok(r) => Reply::ok(&r),
                    Err(e) => Reply::err(e),
                }
            };
            let _ = reply.send(r);
        }
        Msg::Query {
            req: Request::Events { .. },
            reply,
            ..
        } => {
            let _ = reply.send(Reply::ok(&rt.sinks.recent));
        }
        Msg::Query { req, admin, reply } => {
            let _ = reply.send(state.answer(&req, admin));
            if !state.outbox.is_empty() {
                let _ = rt
                    .workers
                    .send(WorkerMsg::Keepalive(std::mem::take(&mut state.outbox)));
            }
        }
        Msg::FlowIds { filter, reply } => {
            let _ = reply.send(state.flow_ids(&filter));
        }
        Msg::FlowPage { cookies, reply, .. } => {
            let _ = reply.send(state.flow_page(&cookies));
        }
        Msg::Refresh { cookies, reply } => {
            // In eBPF mode a flow's first sample comes from the iterator (it alone reads the
            // socket's keepalive settings; the read asked for a new flow follows within
            // ~100 ms): a query's exact read, through sock_diag, refreshes flows already sampled.
            let ids: Vec<_> = cookies
                .iter()
                .filter_map(|&c| state.table.get(c))
                .filter(|f| !rt.ebpf || f.tcp.is_some())
                .map(|f| {
                    let id = sockdiag::SockId {
                        cookie: f.cookie,
                        local: f.local().addr(),
                        remote: f.remote().addr(),
                    };
                    (f.netns, id)
                })
                .collect();
            if ids.is_empty() {
                let _ = reply.send(Default::default());
            } else if let Err(e) = rt.workers.send(WorkerMsg::Fresh { ids, reply })
                && let WorkerMsg::Fresh { reply, .. } = e.0
            {
                state.stats.fresh.not_read += 1;
                state.stats.fresh.last_reason = Some("the snapshot thread is gone".into());
                let _ = reply.send(Default::default());
            }
        }
        Msg::Fresh {
            snaps,
            outcome,
            reply,
        } => {
            let none = foldhash::HashMap::default();
            for snap in &snaps {
                state.table.apply_snapshot(snap, &none);
            }
            let f = &mut state.stats.fresh;
            match &outcome.not_read {
                Some(why) if outcome.found == 0 => {
                    f.not_read += 1;
                    f.last_reason = Some(why.clone());
                }
                _ => {
                    f.reads += 1;
                    f.sockets += outcome.found as u64;
                }
            }
            let _ = reply.send(outcome);
        }
        Msg::Metrics(reply) => {
            let _ = reply.send(metrics(state, rt));
        }
        Msg::Watched(reports) => {
            for r in &reports {
                let stray_before = state.watch.census.get(&r.netns).map_or(0, |c| c.1);
                for (c, why) in state.watch.apply(r) {
                    tracing::warn!(
                        flow = c,
                        "keepalive probes of this socket cannot be watched: {why}; its keepalive is judged from the timer"
                    );
                }
                if r.stray > stray_before {
                    tracing::warn!(
                        netns = r.netns,
                        stray = r.stray,
                        "sockets carry the probe-watch flag without this agent watching them (another `holdfast probe watch`, or an agent that was killed): each costs one callback per segment it sends until it closes"
                    );
                }
            }
        }
        Msg::Keepalive(results) => {
            let now = sys::monotonic_ns();
            let mut changes = Vec::new();
            for r in &results {
                state.detect.eviction.learn(
                    r.cookie,
                    r.after.or(r.before).filter(|_| r.error.is_none()).map(|x| x.1),
                );
                state.table.unquiet(Some(r.cookie));
                match state.remedies.keepalive.on_result(r, now, &mut state.store) {
                    Some(c) => changes.push(c),
                    None if r.error.is_none() && r.before.is_some_and(|b| !b.0) => tracing::info!(
                        flow = r.cookie, via = r.via, before = ?r.before, after = ?r.after,
                        "keepalive at first sight applied (configured cgroup)"
                    ),
                    None => {}
                }
            }
            rt.sinks.publish(&state.store, changes);
        }
    }
}

/// Whether an event can change what eBPF mode's filtered read would report, so that the next
/// one must not be skipped (`ReadGate`). Probes are not socket changes. A flow opening (to
/// SYN-SENT, SYN-RECV or ESTABLISHED) or ending (CLOSE, TIME-WAIT) does not call for one
/// either: an ended flow is in no read, and a new one is read exactly with its owner, or, while
/// it has no sample, keeps `FlowTable::calm_until` at "read now" until a read samples it. At
/// 200k sockets a filtered read is 0.15 s: with one new connection every 0.5 s, the reads that
/// opens let through were about half the agent's CPU (docs/bench.md, new connections).
fn calls_for_read(e: &Event) -> bool {
    use monitor_common::tcp_state as st;
    match e.kind {
        EventKind::ProbeSent | EventKind::ProbeAnswered => false,
        EventKind::State => !matches!(
            e.state,
            st::SYN_SENT | st::SYN_RECV | st::ESTABLISHED | st::CLOSE | st::TIME_WAIT
        ),
        EventKind::RecvRst | EventKind::SendRst | EventKind::Error | EventKind::Retransmit => true,
    }
}
