//! The agent: picks the mode, owns the state, serves the CLI.
//!
//! One task (the state owner) owns every table; the event pump, the snapshot and /proc threads and
//! the IPC connections send it messages over a bounded channel. Snapshots and /proc walks block,
//! so they run on their own threads.
mod server;
mod state;
mod workers;

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

pub use server::{Access, group_gid};
use state::State;
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

pub(crate) enum Msg {
    Events {
        events: Vec<Event>,
        procs: Vec<ProcEvent>,
        undecodable: u64,
        counters: Option<KernelCounters>,
    },
    Snapshot {
        snap: Snapshot,
        owners: HashMap<u64, Owner>,
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
}

/// Runs the agent in the foreground until SIGINT or SIGTERM.
pub fn run(cfg: Config, config_desc: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(cfg, config_desc))
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
                "ebpf mode requested: 7 tp_btf tracepoints + 2 tcp iterators loaded".into(),
            )),
            Err(e) => anyhow::bail!(
                "eBPF mode was requested but the programs cannot load: {e}. Run as root on a kernel with BTF, or use --mode poll"
            ),
        },
        Mode::Auto => match load() {
            Ok(l) => Ok((
                Some(l),
                "auto: 7 tp_btf tracepoints + 2 tcp iterators loaded".into(),
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

async fn run_async(cfg: Config, config_desc: String) -> anyhow::Result<()> {
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
    let mut policy_read = std::time::Instant::now();
    let policy = ZombiePolicy {
        min_age: cfg.zombies.min_age.as_nanos() as u64,
        sigchld: cfg.remedies.sigchld,
    };
    info!(mode, reason = %mode_reason, socket = %cfg.agent.socket.display(), "holdfast agent started");

    let qtx = tx.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(server::serve_conn(stream, qtx.clone(), access.clone()));
                }
                Err(e) => {
                    warn!("accept on the CLI socket failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut tick = tokio::time::interval(EVALUATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_failures = 0u64;
    let mut nudger = PidfdNudger;
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
                                Some((id, t)) => log_transition(&state, id, &t),
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
            _ = tick.tick() => {
                let now = sys::monotonic_ns();
                let transitions = state.zombies.evaluate(now, policy, &LiveProc, &mut nudger, &mut state.findings);
                for (id, t) in transitions {
                    log_transition(&state, id, &t);
                }
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
                    log_transition(&state, id, &t);
                }
                if mode == "poll" && !cfg.keepalive.cgroups.is_empty() && cfg.keepalive.mode == crate::config::RemedyMode::Enforce {
                    if let Some(v) = cgroup_values {
                        requests.extend(state.eviction.preventive(state.table.iter(), &cfg.keepalive.cgroups, v));
                    }
                }
                if !requests.is_empty() {
                    let _ = wtx.send(WorkerMsg::Keepalive(requests));
                }
                let leaked = state.leaks.leaked(state.table.iter(), now, &cfg.leaks);
                state.ledger.update(now, state.table.iter(), &closed, &leaked, &cfg.services);
                let mut transitions = state.leaks.evaluate(now, state.table.iter(), &cfg.leaks, &cfg.services, &mut SockDiagCloser, &mut state.findings);
                transitions.extend(state.ledger.evaluate(now, &cfg.services, &cfg.ledger, &mut state.findings));
                state.leaks.forget(closed.iter().map(|(f, _)| f.cookie));
                state.leaked = leaked;
                for (id, t) in transitions {
                    log_transition(&state, id, &t);
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                warn!("SIGHUP: configuration reload is not implemented yet; restart the agent to apply a new config");
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
    min = min.min(cfg.keepalive.cgroup_timeout.as_millis() as u64);
    // Warn at warn_ratio x timeout; leave two snapshot intervals of margin.
    let threshold = (min as f64 * cfg.eviction.warn_ratio) as u64;
    let t = threshold.saturating_sub(2 * interval.as_millis() as u64);
    (t >= 1000).then_some(t)
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
    }
}

/// One log entry per finding transition or remedy outcome (never one per tick).
fn log_transition(state: &State, id: u64, t: &Transition) {
    let Some(f) = state.findings.get(id) else { return };
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
