//! The agent: picks the mode, owns the state, serves the CLI.
//!
//! One task (the state owner) owns every table; the event pump, the snapshot and /proc threads and
//! the IPC connections send it messages over a bounded channel. Snapshots and /proc walks block,
//! so they run on their own threads.
mod server;
pub mod state;
mod workers;

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

pub use server::{Access, group_gid};
pub use state::State;
use workers::{Source, WorkerMsg};

use crate::config::{Config, Mode};
use crate::ebpf::{self, KernelCounters};
use crate::eviction::{EvictionPolicy, KaResult};
use crate::findings::Transition;
use crate::ipc::{Reply, Request};
use crate::observe::{Event, Nanos, Owner, ProcEvent, Snapshot};
use crate::procs::ProcScan;
use crate::remedy::{LiveProc, PidfdNudger, SockDiagCloser};
use crate::sys;
use crate::zombies::ZombiePolicy;

/// How often detectors run over the state.
const EVALUATE_EVERY: Duration = Duration::from_millis(200);
/// How often the session ledger is recounted on large tables.
const LEDGER_EVERY: Duration = Duration::from_secs(5);
/// Below this many flows every walk is cheap: detectors and ledger run every 500 ms.
const SMALL_TABLE: usize = 10_000;

/// How often the flow detectors (eviction, leaks) walk the flow table: often enough to act within
/// half of the margin between the warning and the shortest idle timeout, at most every 2 s.
fn flows_every(cfg: &Config) -> Duration {
    let margin_ms = min_timeout_ms(cfg) as f64 * (1.0 - cfg.eviction.warn_ratio) / 2.0;
    Duration::from_millis(margin_ms as u64).clamp(Duration::from_millis(200), Duration::from_secs(2))
}
/// After an exit event, when to check /proc for the zombie (exit_notify has run by then).
const ZOMBIE_CHECK_AFTER: Duration = Duration::from_millis(25);

pub enum Msg {
    Events {
        events: Vec<Event>,
        procs: Vec<ProcEvent>,
        undecodable: u64,
        counters: Option<KernelCounters>,
    },
    Snapshot {
        snap: Snapshot,
        owners: HashMap<u64, std::sync::Arc<Owner>>,
        full_walks: u64,
        targeted_walks: u64,
    },
    SnapshotFailed(String),
    ProcScan {
        scan: ProcScan,
        started: Nanos,
        finished: Nanos,
    },
    Query {
        req: Request,
        /// The caller may change things (root or the agent's uid).
        admin: bool,
        reply: oneshot::Sender<Reply>,
    },
    Keepalive(Vec<KaResult>),
    /// A Prometheus scrape.
    Metrics(oneshot::Sender<String>),
}

/// Runs the agent in the foreground until SIGINT or SIGTERM.
pub fn run(cfg: Config, config_desc: String, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(cfg, config_desc, config_path))
}

fn select_mode(
    mode: Mode,
    opts: &ebpf::LoadOptions,
) -> anyhow::Result<(Option<(ebpf::Loaded, ebpf::Events)>, String)> {
    let uid = sys::geteuid();
    let load = || {
        ebpf::load(opts).map_err(|e| {
            if uid == 0 {
                e.to_string()
            } else {
                format!(
                    "{e}; the agent runs as uid {uid}: eBPF needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)"
                )
            }
        })
    };
    match mode {
        Mode::Poll => Ok((None, "poll mode requested: sock_diag + procfs".into())),
        Mode::Ebpf => match load() {
            Ok(l) => Ok((
                Some(l),
                "ebpf mode requested: 7 tp_btf tracepoints, tcp and task_file iterators loaded".into(),
            )),
            Err(e) => anyhow::bail!(
                "eBPF mode was requested but the programs cannot load: {e}. Run as root on a kernel with BTF, or use --mode poll"
            ),
        },
        Mode::Auto => match load() {
            Ok(l) => Ok((
                Some(l),
                "auto: 7 tp_btf tracepoints, tcp and task_file iterators loaded".into(),
            )),
            Err(e) => {
                warn!("eBPF unavailable, running in poll mode (sock_diag + procfs): {e}");
                Ok((
                    None,
                    format!("auto: eBPF unavailable ({e}); using sock_diag + procfs"),
                ))
            }
        },
    }
}

async fn run_async(
    mut cfg: Config,
    config_desc: String,
    config_path: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let cgroup_values = crate::eviction::plan(cfg.keepalive.cgroup_timeout.as_secs(), &cfg.keepalive).ok();
    let cgroup_dirs = match (cfg.keepalive.cgroups.is_empty(), crate::cgroups::mount()) {
        (true, _) => Vec::new(),
        (false, Some(m)) => cfg
            .keepalive
            .cgroups
            .iter()
            .map(|c| crate::cgroups::resolve(&m, c))
            .collect(),
        (false, None) => {
            warn!("keepalive.cgroups is set but no cgroup2 mount was found: keepalive at connect is off");
            Vec::new()
        }
    };
    let load_opts = ebpf::LoadOptions {
        cgroups: cgroup_dirs,
        connect_values: cgroup_values,
    };
    let (loaded, mode_reason) = select_mode(cfg.agent.mode, &load_opts)?;
    let gid = group_gid(&cfg.agent.read_group);
    if gid.is_none() {
        info!(
            "group `{}` does not exist: only root may query the agent",
            cfg.agent.read_group
        );
    }
    let access = Access {
        agent_uid: sys::geteuid(),
        group: (cfg.agent.read_group.clone(), gid),
        admin: cfg.agent.admin_group.as_ref().map(|g| (g.clone(), group_gid(g))),
    };
    let listener = server::bind_socket(&cfg.agent.socket, gid)?;
    let (tx, mut rx) = mpsc::channel::<Msg>(256);
    let (wtx, wrx) = std_mpsc::channel::<WorkerMsg>();

    let sockops = match &loaded {
        Some((l, _)) => l.sockops.clone(),
        None if cfg.keepalive.cgroups.is_empty() => "no cgroups configured (keepalive.cgroups)".into(),
        None => "poll mode: new flows of the cgroups get keepalive through a pidfd when first seen (no sock_ops without eBPF)".into(),
    };
    let (source, mode, interval, proc_interval) = match loaded {
        Some((l, events)) => {
            workers::spawn_pump(events, tx.clone());
            (
                Source::Ebpf(l),
                "ebpf",
                cfg.snapshot.ebpf_interval,
                cfg.zombies.heal_interval,
            )
        }
        None => (
            Source::Poll,
            "poll",
            cfg.snapshot.poll_interval,
            cfg.zombies.scan_interval,
        ),
    };
    let pacing = workers::Pacing {
        interval,
        full_every: cfg.snapshot.full_interval,
        filter_idle_ms: filter_idle_ms(&cfg, interval),
    };
    let snap_tx = tx.clone();
    std::thread::Builder::new()
        .name("holdfast-snapshot".into())
        .spawn(move || workers::snapshot_worker(source, pacing, wrx, snap_tx))
        .context("spawning the snapshot thread")?;
    let proc_tx = tx.clone();
    std::thread::Builder::new()
        .name("holdfast-procs".into())
        .spawn(move || workers::proc_worker(proc_interval, proc_tx))
        .context("spawning the /proc scan thread")?;

    let mut state = State::new(
        mode,
        mode_reason.clone(),
        eviction_policy(&cfg),
        (interval, proc_interval),
        config_desc,
    );
    state.sockops = sockops;
    state.services = cfg.services.clone();
    state.leaks_cfg = cfg.leaks.clone();
    state.flows_period = flows_every(&cfg);
    state.journal = if cfg.agent.journal {
        crate::journal::Journal::open(std::path::Path::new(crate::journal::SOCKET))
    } else {
        None
    };
    let (ntx, _) = tokio::sync::broadcast::channel::<crate::sinks::Notice>(1024);
    state.notices = Some(ntx.clone());
    let mut policy_read = std::time::Instant::now();
    let mut policy = ZombiePolicy {
        min_age: cfg.zombies.min_age.as_nanos() as u64,
        sigchld: cfg.remedies.sigchld,
    };
    info!(mode, reason = %mode_reason, socket = %cfg.agent.socket.display(), "holdfast agent started");

    let qtx = tx.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(server::serve_conn(
                        stream,
                        qtx.clone(),
                        access.clone(),
                        ntx.clone(),
                    ));
                }
                Err(e) => {
                    warn!("accept on the CLI socket failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    if let Some(addr) = cfg.agent.metrics {
        let mtx = tx.clone();
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener on {addr}"))?;
        info!(%addr, "Prometheus metrics at http://{addr}/metrics");
        tokio::spawn(crate::metrics::serve(l, mtx));
    }
    let notify = crate::notify::Notifier::from_env();
    notify.send(&format!("READY=1\nSTATUS=mode {mode}: starting"));
    let watchdog = crate::notify::watchdog_interval();
    let mut last_notify = std::time::Instant::now();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut tick = tokio::time::interval(EVALUATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_failures = 0u64;
    let mut nudger = PidfdNudger;
    let mut zombie_due: Option<tokio::time::Instant> = None;
    let mut flows_evaluated = std::time::Instant::now();
    let mut ledger_updated = std::time::Instant::now();
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    Msg::Events { events, procs, undecodable, counters } => {
                        state.undecodable += undecodable;
                        state.events += (events.len() + procs.len()) as u64;
                        if let Some(c) = counters {
                            state.kernel = c;
                        }
                        let mut unknown_owner = false;
                        for e in &events {
                            unknown_owner |= state.table.apply_event(e);
                            if let Some(h) = &e.pid_hint {
                                let _ = wtx.send(WorkerMsg::Hint { cookie: e.cookie, pid: h.pid });
                            }
                        }
                        if unknown_owner {
                            let _ = wtx.send(WorkerMsg::Soon);
                        }
                        for p in &procs {
                            state.zombies.tracker.on_event(p);
                        }
                        // An exit is checked against /proc right after exit_notify, not at the next tick.
                        if procs.iter().any(|p| p.kind == crate::observe::ProcEventKind::Exit) && zombie_due.is_none() {
                            zombie_due = Some(tokio::time::Instant::now() + ZOMBIE_CHECK_AFTER);
                        }
                    }
                    Msg::Snapshot { snap, owners, full_walks, targeted_walks } => {
                        state.snapshots += 1;
                        state.last_snapshot = Duration::from_nanos(snap.finished.saturating_sub(snap.started));
                        state.last_snapshot_sockets = snap.socks.len();
                        state.full_walks = full_walks;
                        state.targeted_walks = targeted_walks;
                        state.table.apply_snapshot(&snap, &owners);
                        snapshot_failures = 0;
                    }
                    Msg::SnapshotFailed(e) => {
                        snapshot_failures += 1;
                        // Report the first failure and then every 100th, never every tick.
                        if snapshot_failures == 1 || snapshot_failures % 100 == 0 {
                            warn!(failures = snapshot_failures, "reading the TCP table failed: {e}");
                        }
                    }
                    Msg::ProcScan { scan, started, finished } => {
                        state.proc_scans += 1;
                        state.last_proc_scan = Duration::from_nanos(finished.saturating_sub(started));
                        state.processes = scan.processes;
                        state.zombies.tracker.on_scan(&scan.zombies, finished, started);
                    }
                    Msg::Query { req: Request::Reload, admin, reply } => {
                        let r = if !admin {
                            Reply::err("permission denied: reloading the configuration needs root or the admin group (agent.admin_group)")
                        } else {
                            match reload(&mut state, &mut cfg, config_path.as_deref(), &mut policy) {
                                Ok(()) => Reply::ok(&serde_json::json!({ "reloaded": state.config_desc })),
                                Err(e) => Reply::err(e),
                            }
                        };
                        let _ = reply.send(r);
                    }
                    Msg::Metrics(reply) => {
                        let _ = reply.send(crate::metrics::render(&state));
                    }
                    Msg::Query { req, admin, reply } => {
                        let _ = reply.send(state.answer(&req, admin));
                        if !state.outbox.is_empty() {
                            let _ = wtx.send(WorkerMsg::Keepalive(std::mem::take(&mut state.outbox)));
                        }
                    }
                    Msg::Keepalive(results) => {
                        let now = sys::monotonic_ns();
                        for r in &results {
                            match state.eviction.on_result(r, now, &mut state.findings) {
                                Some((id, t)) => log_transition(&mut state, id, &t),
                                None if r.error.is_none() && r.before.is_some_and(|b| !b.0) => info!(
                                    flow = r.cookie, via = r.via, before = ?r.before, after = ?r.after,
                                    "keepalive at first sight applied (configured cgroup)"
                                ),
                                None => {}
                            }
                        }
                    }
                }
            }
            _ = async { tokio::time::sleep_until(zombie_due.unwrap_or_else(tokio::time::Instant::now)).await }, if zombie_due.is_some() => {
                zombie_due = None;
                let transitions = state.zombies.evaluate(sys::monotonic_ns(), policy, &LiveProc, &mut nudger, &mut state.findings);
                for (id, t) in transitions {
                    log_transition(&mut state, id, &t);
                }
            }
            _ = tick.tick() => {
                let now = sys::monotonic_ns();
                if last_notify.elapsed() >= watchdog.unwrap_or(Duration::from_secs(5)).min(Duration::from_secs(5)) {
                    last_notify = std::time::Instant::now();
                    let status = format!("STATUS={} mode: {} flows, {} active findings", state.mode, state.table.len(), state.findings.active().count());
                    notify.send(&if watchdog.is_some() { format!("WATCHDOG=1\n{status}") } else { status });
                }
                let transitions = state.zombies.evaluate(now, policy, &LiveProc, &mut nudger, &mut state.findings);
                for (id, t) in transitions {
                    log_transition(&mut state, id, &t);
                }
                // The flow detectors walk every flow: once per FLOWS_EVERY, not every tick.
                // Small tables are cheap to walk: evaluate them often; large ones at the period.
                let period = if state.table.len() < SMALL_TABLE { Duration::from_millis(500) } else { state.flows_period };
                if flows_evaluated.elapsed() < period {
                    continue;
                }
                flows_evaluated = std::time::Instant::now();
                if policy_read.elapsed() > Duration::from_secs(10) {
                    // Sysctls and routes can change under a running agent.
                    state.evpol = eviction_policy(&cfg);
                    state.router.forget();
                    policy_read = std::time::Instant::now();
                }
                let closed = state.table.take_closed();
                let router = &mut state.router;
                let (transitions, mut requests) = state.eviction.evaluate(
                    now, state.table.iter(), &closed, &state.evpol, &mut |ip| router.path(ip), &mut state.findings,
                );
                for (id, t) in transitions {
                    log_transition(&mut state, id, &t);
                }
                if mode == "poll" && !cfg.keepalive.cgroups.is_empty() && cfg.keepalive.mode == crate::config::RemedyMode::Enforce {
                    if let Some(v) = cgroup_values {
                        requests.extend(state.eviction.preventive(state.table.iter(), &cfg.keepalive.cgroups, v));
                    }
                }
                if !requests.is_empty() {
                    let _ = wtx.send(WorkerMsg::Keepalive(requests));
                }
                // The ledger walks every flow with map lookups: every LEDGER_EVERY (closes are
                // buffered in between so that none is missed).
                state.pending_closed.extend(closed.iter().cloned());
                if state.table.len() < SMALL_TABLE || ledger_updated.elapsed() >= LEDGER_EVERY {
                    ledger_updated = std::time::Instant::now();
                    let leaked = state.leaks.leaked(state.table.iter(), now, &cfg.leaks);
                    let pending = std::mem::take(&mut state.pending_closed);
                    state.ledger.update(now, state.table.iter(), &pending, &leaked, &cfg.services);
                    state.leaked = leaked;
                }
                let mut transitions = state.leaks.evaluate(now, state.table.iter(), &cfg.leaks, &cfg.services, &mut SockDiagCloser, &mut state.findings);
                transitions.extend(state.ledger.evaluate(now, &cfg.services, &cfg.ledger, &mut state.findings));
                state.leaks.forget(closed.iter().map(|(f, _)| f.cookie));
                for (id, t) in transitions {
                    log_transition(&mut state, id, &t);
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                let _ = reload(&mut state, &mut cfg, config_path.as_deref(), &mut policy);
            }
        }
    }
    let _ = std::fs::remove_file(&cfg.agent.socket);
    info!("holdfast agent stopped");
    Ok(())
}

/// The idle time below which no flow can be at risk before the next snapshot: the kernel may leave
/// such flows out of filtered snapshots. None disables filtering (nothing would be left out).
fn filter_idle_ms(cfg: &Config, interval: Duration) -> Option<u64> {
    // Warn at warn_ratio x timeout; leave two snapshot intervals of margin.
    let threshold = (min_timeout_ms(cfg) as f64 * cfg.eviction.warn_ratio) as u64;
    let t = threshold.saturating_sub(2 * interval.as_millis() as u64);
    (t >= 1000).then_some(t)
}

/// The shortest idle timeout a flow can get from this config and host.
fn min_timeout_ms(cfg: &Config) -> u64 {
    let profiles = cfg.profiles();
    let timeout = |name: &str| {
        profiles
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.idle_timeout_s * 1000)
    };
    let mut min = timeout(&cfg.eviction.default_profile).unwrap_or(600_000);
    for r in &cfg.rules {
        let t = r
            .timeout
            .map(|t| t.as_millis() as u64)
            .or_else(|| r.profile.as_deref().and_then(timeout));
        min = min.min(t.unwrap_or(min));
    }
    if let Some(ct) = read_u64("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established") {
        min = min.min(ct * 1000);
    }
    min.min(cfg.keepalive.cgroup_timeout.as_millis() as u64)
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The eviction policy from the config and this namespace's sysctls.
fn eviction_policy(cfg: &Config) -> EvictionPolicy {
    let ka = |name: &str, default: u64| {
        read_u64(&format!("/proc/sys/net/ipv4/tcp_keepalive_{name}")).unwrap_or(default) as u32
    };
    // Conntrack counts only where it is tracking connections in this namespace.
    let ct_active = read_u64("/proc/sys/net/netfilter/nf_conntrack_count").is_some_and(|n| n > 0);
    EvictionPolicy {
        profiles: cfg.profiles(),
        rules: cfg.rules.clone(),
        default_profile: cfg.eviction.default_profile.clone(),
        warn_ratio: cfg.eviction.warn_ratio,
        keepalive: cfg.keepalive.clone(),
        host_conntrack_s: ct_active
            .then(|| read_u64("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"))
            .flatten(),
        sysctl_keepalive: (ka("time", 7200), ka("intvl", 75), ka("probes", 9)),
        min_timeout_ms: min_timeout_ms(cfg),
    }
}

/// One log entry, one journal entry and one `events` line per finding transition or remedy
/// outcome (never one per tick).
fn log_transition(state: &mut State, id: u64, t: &Transition) {
    let Some(f) = state.findings.get(id).cloned() else {
        return;
    };
    let n = crate::sinks::notice(&f, t);
    if let Some(j) = &state.journal {
        if let Err(e) = j.send(&crate::sinks::journal_fields(&n)) {
            if !state.journal_failed {
                warn!("writing to journald failed (reported once): {e}");
                state.journal_failed = true;
            }
        }
    }
    *state
        .counts
        .entry((
            n.kind.clone(),
            n.transition.clone(),
            n.action.clone().unwrap_or_default(),
            outcome_class(n.outcome.as_deref()),
        ))
        .or_default() += 1;
    state.recent.push_back(n.clone());
    if state.recent.len() > 200 {
        state.recent.pop_front();
    }
    if let Some(tx) = &state.notices {
        let _ = tx.send(n);
    }
    let transition = t.as_str();
    match t {
        Transition::Action => {
            let Some(a) = f.actions.last() else { return };
            info!(kind = %f.kind, finding = id, subject = %f.subject, action = %a.action, mode = %a.mode,
                  outcome = %a.outcome, before = %a.before, after = %a.after, "remedy {}: {}", a.action, a.outcome);
        }
        Transition::Resolved => {
            info!(kind = %f.kind, finding = id, transition, subject = %f.subject, "resolved: {}", f.summary)
        }
        _ => warn!(kind = %f.kind, finding = id, transition, subject = %f.subject, "{}", f.summary),
    }
}

/// The outcome class counted in metrics: planned, ok, failed.
fn outcome_class(o: Option<&str>) -> String {
    match o {
        None => String::new(),
        Some(o) if o.starts_with("planned") => "planned".into(),
        Some(o)
            if o.starts_with("failed")
                || o.starts_with("refused")
                || o.starts_with("not ")
                || o.starts_with("stopped") =>
        {
            "failed".into()
        }
        Some(_) => "ok".into(),
    }
}

/// Re-reads the configuration. A bad file is refused and the old configuration stays in force;
/// keys that need a restart are named.
fn reload(
    state: &mut State,
    cfg: &mut Config,
    path: Option<&std::path::Path>,
    policy: &mut ZombiePolicy,
) -> Result<(), String> {
    let Some(path) = path else {
        let e = "no configuration file was loaded at start (defaults in force); start with --config FILE to reload".to_string();
        warn!("{e}");
        return Err(e);
    };
    match Config::load(path, true) {
        Err(e) => {
            let msg = format!("configuration reload refused, the previous configuration stays in force: {e}");
            tracing::error!("{msg}");
            state.last_reload_error = Some(e.to_string());
            Err(msg)
        }
        Ok((new, _)) => {
            let mut restart = Vec::new();
            if new.agent.mode != cfg.agent.mode {
                restart.push("agent.mode");
            }
            if new.agent.socket != cfg.agent.socket {
                restart.push("agent.socket");
            }
            if new.agent.metrics != cfg.agent.metrics {
                restart.push("agent.metrics");
            }
            if new.snapshot != cfg.snapshot {
                restart.push("snapshot.*");
            }
            if new.keepalive.cgroups != cfg.keepalive.cgroups {
                restart.push("keepalive.cgroups");
            }
            *cfg = new;
            state.evpol = eviction_policy(cfg);
            state.services = cfg.services.clone();
            state.leaks_cfg = cfg.leaks.clone();
            state.flows_period = flows_every(cfg);
            *policy = ZombiePolicy {
                min_age: cfg.zombies.min_age.as_nanos() as u64,
                sigchld: cfg.remedies.sigchld,
            };
            state.reloads += 1;
            state.last_reload_error = None;
            if restart.is_empty() {
                info!(path = %path.display(), "configuration reloaded");
            } else {
                warn!(path = %path.display(), "configuration reloaded; changes to {} take effect at the next restart", restart.join(", "));
            }
            Ok(())
        }
    }
}
