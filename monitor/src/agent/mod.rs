//! The agent: picks the mode, starts the workers, owns the state, serves the CLI, and shuts down
//! by cancellation that joins every task and thread.
//!
//! One task (the state owner, `main_loop`) owns every table; the event pump, the snapshot and
//! /proc threads and the IPC connections send it messages over a bounded channel (and `status`
//! over a channel of its own, answered first).
mod budget;
pub mod evaluate;
mod main_loop;
mod mode;
mod publish;
mod queries;
mod reload;
mod server;
mod socket;
pub mod state;
mod workers;

use foldhash::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

pub use server::Access;
pub use state::State;

use crate::config::Config;
use crate::config::policy::Policy;
use crate::ipc::{FlowFilter, Reply, Request};
use crate::kernel::{cgroups, ebpf, netns, procfs::ProcScan, sys};
use crate::model::eviction::KaResult;
use crate::model::observe::{Event, Owner, ProcEvent, Snapshot};
use crate::model::time::Nanos;

/// What a refresh for a query read: how many of the sockets asked for were found, or why none was
/// read (the values shown are then those of the last read, with their age).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FreshRead {
    pub found: usize,
    pub not_read: Option<String>,
}

pub enum Msg {
    Events {
        events: Vec<Event>,
        procs: Vec<ProcEvent>,
        undecodable: u64,
        counters: Option<ebpf::KernelCounters>,
    },
    Snapshot {
        snap: Snapshot,
        owners: HashMap<u64, Arc<Owner>>,
        full_walks: u64,
        targeted_walks: u64,
        /// The first namespace's table of a snapshot round (each round reads every namespace).
        first_of_round: bool,
    },
    SnapshotFailed {
        netns: Option<crate::model::observe::NetnsId>,
        error: String,
    },
    /// Descriptors held to dead TCP sockets: every process's (eBPF) or the watched ones' (poll).
    Held {
        found: Vec<crate::model::observe::DeadFd>,
        scope: crate::track::held::HeldScope,
        owners: std::collections::HashMap<u32, Arc<crate::model::observe::Owner>>,
    },
    /// What the probe-watch selection did, per namespace.
    Watched(Vec<crate::track::watch::WatchOutcome>),
    /// `flows` with fresh values: read these flows from the kernel before the pages are written.
    Refresh {
        cookies: Vec<u64>,
        reply: oneshot::Sender<FreshRead>,
    },
    /// The snapshot thread's answer to a refresh: the named sockets, per namespace.
    Fresh {
        snaps: Vec<Snapshot>,
        outcome: FreshRead,
        reply: oneshot::Sender<FreshRead>,
    },
    /// The namespaces found (with their sysctls and last errors), and those that are gone.
    Namespaces {
        /// Which namespaces are watched, in words.
        scope: String,
        spaces: Vec<workers::snapshot::NsEntry>,
        gone: Vec<crate::model::observe::NetnsId>,
    },
    ProcScan {
        scan: ProcScan,
        started: Nanos,
        finished: Nanos,
    },
    Query {
        req: Request,
        /// The caller may change things (root, the agent's uid, or the admin group).
        admin: bool,
        reply: oneshot::Sender<Reply>,
    },
    /// `flows`, first stage: the selected cookies in display order.
    FlowIds {
        filter: FlowFilter,
        reply: oneshot::Sender<Result<Vec<u64>, String>>,
    },
    /// `flows`, second stage: one page of views as JSON.
    FlowPage {
        cookies: Vec<u64>,
        filter: FlowFilter,
        reply: oneshot::Sender<Vec<u8>>,
    },
    Keepalive(Vec<KaResult>),
    /// A Prometheus scrape.
    Metrics(oneshot::Sender<String>),
}

/// What the main loop needs besides the state.
pub struct Runtime {
    pub cfg: Config,
    pub config_path: Option<PathBuf>,
    pub workers: std_mpsc::Sender<workers::WorkerMsg>,
    pub procs: std_mpsc::Sender<workers::ProcMsg>,
    pub sinks: publish::Sinks,
    pub clients: Arc<server::ClientCounters>,
    pub socket_ok: Arc<AtomicBool>,
    pub ebpf: bool,
    /// The last error writing the learnt paths (reported once).
    pub paths_error: Option<String>,
}

/// The learnt path evidence from the state file: a missing file is an empty book; an unreadable
/// one is moved aside (kept, not overwritten) and learning starts afresh.
fn load_paths(cfg: &Config) -> crate::track::paths::PathBook {
    use crate::track::paths::PathBook;
    if !cfg.learning.enabled {
        return PathBook::default();
    }
    let file = &cfg.learning.state_file;
    match PathBook::load(file) {
        Ok(b) => {
            if !b.is_empty() {
                info!(paths = b.len(), file = %file.display(), "path evidence loaded");
            }
            if b.dropped() > 0 {
                warn!(
                    dropped = b.dropped(),
                    file = %file.display(),
                    "{} path(s) in the state file held values no flow could produce (an idle under 2 s or over 30 days); they were left out",
                    b.dropped()
                );
            }
            b
        }
        Err(e) => {
            let aside = file.with_extension("json.bad");
            let moved = e.content && std::fs::rename(file, &aside).is_ok();
            warn!(
                "{e}{}",
                if moved {
                    format!("; kept as {} and learning afresh", aside.display())
                } else {
                    String::new()
                }
            );
            PathBook::default()
        }
    }
}

/// Runs the agent in the foreground until SIGINT or SIGTERM.
pub fn run(cfg: Config, config_desc: String, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    sys::tune_heap();
    // Two workers: the state owner is one task; CLI connections, the accept loop and the event
    // pump run beside it, so a request waits for at most the state owner's current step.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("holdfast-rt")
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let r = rt.block_on(run_async(cfg, config_desc, config_path));
    // Nothing left on the runtime (a client's connection, a D-Bus call) may hold up the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}

async fn run_async(cfg: Config, config_desc: String, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    match sys::raise_nofile() {
        Ok(n) if n < 4096 => warn!("RLIMIT_NOFILE is {n}: set LimitNOFILE higher for many CLI clients"),
        Ok(_) => {}
        Err(e) => warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    let own_facts = netns::read_facts();
    let policy = Policy::build(
        &cfg,
        cfg.agent.mode != crate::config::Mode::Poll,
        own_facts.conntrack_s,
    );
    let cgroup_dirs = match (cfg.keepalive.cgroups.is_empty(), cgroups::mount()) {
        (true, _) => Vec::new(),
        (false, Some(m)) => cfg
            .keepalive
            .cgroups
            .iter()
            .map(|c| cgroups::resolve(&m, c))
            .collect(),
        (false, None) => {
            warn!("keepalive.cgroups is set but no cgroup2 mount was found: keepalive at connect is off");
            Vec::new()
        }
    };
    let load_opts = ebpf::LoadOptions {
        cgroups: cgroup_dirs,
        connect_values: policy.pacing.connect_values,
    };
    // Loading parses the kernel's BTF three times (offsets, aya's loader, program loads): 27 MB
    // at its peak, in many small blocks. Done on a thread of its own, that garbage lies in that
    // thread's arena, not among the main heap's long-lived blocks, and trimming gives it back.
    let mode = cfg.agent.mode;
    let chosen = std::thread::scope(|s| {
        s.spawn(|| mode::select(mode, &load_opts))
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })?;
    sys::trim_heap();
    let ebpf_mode = chosen.loaded.is_some();
    // The policy of the mode that runs (auto may have fallen back to poll).
    let policy = Policy::build(&cfg, ebpf_mode, own_facts.conntrack_s);
    let gid = sys::group_gid(&cfg.agent.read_group);
    if gid.is_none() {
        info!(
            "group `{}` does not exist: only root may query the agent",
            cfg.agent.read_group
        );
    }
    let admin_gid = cfg.agent.admin_group.as_deref().and_then(sys::group_gid);
    let access = Access {
        agent_uid: sys::geteuid(),
        group: (cfg.agent.read_group.clone(), gid),
        admin: cfg
            .agent
            .admin_group
            .as_ref()
            .map(|g| (g.clone(), sys::group_gid(g))),
    };
    let listener = socket::bind_socket(&cfg.agent.socket, gid, admin_gid)?;
    let (tx, rx) = mpsc::channel::<Msg>(256);
    let (status_tx, status_rx) = mpsc::channel::<oneshot::Sender<Reply>>(64);
    let (wtx, wrx) = std_mpsc::channel::<workers::WorkerMsg>();
    let (ptx, prx) = std_mpsc::channel::<workers::ProcMsg>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let sockops = match &chosen.loaded {
        Some((l, _)) => l.sockops.clone(),
        None if cfg.keepalive.cgroups.is_empty() => "no cgroups configured (keepalive.cgroups)".into(),
        None => "poll mode: new flows of the cgroups get keepalive through a pidfd when first seen (no sock_ops without eBPF)".into(),
    };
    let mut tasks = Vec::new();
    let source = match chosen.loaded {
        Some((l, events)) => {
            tasks.push(workers::spawn_pump(events, tx.clone(), stop_rx.clone()));
            workers::Source::Ebpf(Box::new(l))
        }
        None => workers::Source::Poll,
    };
    let snap_tx = tx.clone();
    let pacing = policy.pacing;
    let gate = Arc::new(workers::ReadGate::default());
    let snap_gate = gate.clone();
    let snapshot_thread = std::thread::Builder::new()
        .name("holdfast-snapshot".into())
        .spawn(move || workers::snapshot_worker(source, pacing, snap_gate, wrx, snap_tx))
        .context("spawning the snapshot thread")?;
    let proc_tx = tx.clone();
    let proc_interval = policy.proc_interval;
    let proc_thread = std::thread::Builder::new()
        .name("holdfast-procs".into())
        .spawn(move || workers::proc_worker(proc_interval, prx, proc_tx))
        .context("spawning the /proc scan thread")?;

    let own = netns::own_id();
    let mut state = State::new(
        policy,
        state::Info {
            mode: chosen.mode,
            mode_reason: chosen.reason.clone(),
            features: chosen.features,
            sockops,
            started: Instant::now(),
            config_desc,
            socket: cfg.agent.socket.clone(),
        },
    );
    state.gate = gate;
    // Probes on the wire: eBPF mode, where loading proved the kernel can do it.
    let wire = state
        .info
        .features
        .iter()
        .any(|f| f.name == "probe_watch" && f.available);
    state.watch = crate::track::watch::WatchSet::new(wire);
    state.remedies.keepalive.wire = wire;
    state.netns.insert(
        own,
        state::NetnsInfo {
            id: own,
            name: netns::name_of(own),
            facts: own_facts,
            error: None,
            handle: netns::NsHandle {
                id: own,
                path: "/proc/self/ns/net".into(),
            },
        },
    );
    let journal = if cfg.agent.journal {
        crate::sinks::journal::Journal::open(std::path::Path::new(crate::sinks::journal::SOCKET))
    } else {
        None
    };
    let sinks = publish::Sinks::new(journal);
    let clients = Arc::new(server::ClientCounters::default());
    let socket_ok = Arc::new(AtomicBool::new(true));
    let ctx = server::Ctx {
        tx: tx.clone(),
        status: status_tx,
        access,
        notices: sinks.notices.clone(),
        counters: clients.clone(),
        budgets: Default::default(),
    };
    tasks.push(tokio::spawn(server::accept_loop(
        listener,
        cfg.agent.socket.clone(),
        (gid, admin_gid),
        cfg.agent.max_clients,
        ctx,
        socket_ok.clone(),
        stop_rx.clone(),
    )));
    let mut metrics_listeners = Vec::new();
    if let Some(addr) = cfg.agent.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener on {addr}"))?;
        info!(%addr, "Prometheus metrics at http://{addr}/metrics (any local user can read them; agent.metrics_socket serves them to the read group only)");
        metrics_listeners.push(crate::sinks::metrics::Listener::Tcp(l));
    }
    if cfg.agent.metrics_socket {
        let path = cfg.agent.metrics_socket_path();
        let l = socket::bind_socket(&path, gid, admin_gid)?;
        info!(socket = %path.display(), "Prometheus metrics on a unix socket (read group)");
        metrics_listeners.push(crate::sinks::metrics::Listener::Unix(l));
    }
    if !metrics_listeners.is_empty() {
        let (scrape_tx, mut scrape_rx) = mpsc::channel::<oneshot::Sender<String>>(8);
        let mtx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(reply) = scrape_rx.recv().await {
                if mtx.send(Msg::Metrics(reply)).await.is_err() {
                    return;
                }
            }
        }));
        for l in metrics_listeners {
            tasks.push(tokio::spawn(crate::sinks::metrics::serve(
                l,
                scrape_tx.clone(),
                stop_rx.clone(),
            )));
        }
    }
    drop(tx);
    info!(mode = chosen.mode, reason = %chosen.reason, socket = %cfg.agent.socket.display(), "holdfast agent started");
    let socket = cfg.agent.socket.clone();
    let mut rt = Runtime {
        cfg,
        config_path,
        workers: wtx,
        procs: ptx,
        sinks,
        clients,
        socket_ok,
        ebpf: ebpf_mode,
        paths_error: None,
    };
    // What earlier runs learnt about paths applies from the first round.
    state.paths = load_paths(&rt.cfg);
    if state.relearn() {
        state.policy = Policy::build(&rt.cfg, ebpf_mode, state.shortest_external_s());
        let _ = rt.workers.send(workers::WorkerMsg::Pacing(state.policy.pacing));
    }
    let result = main_loop::run(&mut state, &mut rt, rx, status_rx).await;
    main_loop::save_paths(&mut state, &mut rt);
    // Shutdown: tell everyone, then join every task and thread.
    let _ = stop_tx.send(true);
    let _ = rt.workers.send(workers::WorkerMsg::Stop);
    let _ = rt.procs.send(workers::ProcMsg::Stop);
    for t in tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), t).await;
    }
    // The threads may be blocked sending into the channel the loop no longer reads: it is gone
    // (dropped with `main_loop::run`), so their sends fail and they return.
    for (name, h) in [("snapshot", snapshot_thread), ("procs", proc_thread)] {
        if h.join().is_err() {
            warn!("the {name} thread panicked");
        }
    }
    let _ = std::fs::remove_file(&socket);
    info!("holdfast agent stopped");
    result
}
