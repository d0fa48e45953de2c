//! The agent: picks the mode, owns the state, serves the CLI.
//!
//! One task (the state owner) owns the flow table; the event pump, the snapshot worker and the IPC
//! connections send it messages over a bounded channel. Snapshots and /proc walks block, so they
//! run on their own thread.
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{Config, Mode};
use crate::ebpf::{self, KernelCounters};
use crate::flows::{FlowTable, FlowView};
use crate::ipc::{self, FlowFilter, Reply, Request, Status};
use crate::observe::{Event, Owner, Snapshot, parse_state};
use crate::owners::OwnerResolver;
use crate::sys;

/// How often the event pump drains the ring buffer (the programs never wake it per record).
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// Snapshots take at most 1/SNAPSHOT_DUTY of wall time, whatever the configured interval.
const SNAPSHOT_DUTY: u32 = 10;
const MIN_SNAPSHOT_SPACING: Duration = Duration::from_millis(100);
/// After a new flow of unknown owner appears, wait this long (accept() usually follows) and look.
const OWNER_LOOKUP_DELAY: Duration = Duration::from_millis(50);

enum Msg {
    Events {
        events: Vec<Event>,
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
    Query {
        req: Request,
        reply: oneshot::Sender<Reply>,
    },
}

enum WorkerMsg {
    Hint { cookie: u64, pid: u32 },
    Soon,
}

enum Source {
    Ebpf(ebpf::Loaded),
    Poll,
}

impl Source {
    fn snapshot(&mut self) -> Result<Snapshot, String> {
        match self {
            Source::Ebpf(l) => l.snapshot().map_err(|e| e.to_string()),
            Source::Poll => crate::sockdiag::dump().map_err(|e| e.to_string()),
        }
    }
}

/// Who may talk to the agent.
#[derive(Clone, Debug)]
pub struct Access {
    pub agent_uid: u32,
    /// The read group's name and, if it exists on this host, its gid.
    pub group: (String, Option<u32>),
}

/// The gid of `name` from /etc/group.
pub fn group_gid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

fn supplementary_groups(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        })
        .unwrap_or_default()
}

impl Access {
    /// Ok, or the refusal to send back.
    pub fn check(&self, cred: sys::PeerCred) -> Result<(), String> {
        if cred.uid == 0 || cred.uid == self.agent_uid {
            return Ok(());
        }
        let (name, gid) = &self.group;
        if let Some(gid) = gid {
            if cred.gid == *gid || supplementary_groups(cred.pid).contains(gid) {
                return Ok(());
            }
        }
        let fix = match gid {
            Some(_) => format!("ask an admin to run `usermod -aG {name} <user>`"),
            None => format!(
                "group `{name}` does not exist on this host: an admin can create it with `groupadd --system {name}` and add users to it"
            ),
        };
        Err(format!(
            "permission denied: uid {} is neither root nor in group `{name}`; {fix}",
            cred.uid
        ))
    }
}

/// Everything the state owner keeps besides the table.
struct State {
    table: FlowTable,
    mode: &'static str,
    mode_reason: String,
    started: Instant,
    kernel: KernelCounters,
    undecodable: u64,
    events: u64,
    snapshots: u64,
    last_snapshot: Duration,
    last_snapshot_sockets: usize,
    snapshot_interval: Duration,
    full_walks: u64,
    targeted_walks: u64,
    config_desc: String,
    netns: u64,
}

impl State {
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
            events_lost: self.kernel.lost,
            events_undecodable: self.undecodable,
            program_errors: self.kernel.errors,
            lost_by_program: self.kernel.lost_by_program.clone(),
            snapshots: self.snapshots,
            snapshot_interval_ms: self.snapshot_interval.as_millis() as u64,
            last_snapshot_ms: self.last_snapshot.as_secs_f64() * 1000.0,
            last_snapshot_sockets: self.last_snapshot_sockets,
            owner_full_walks: self.full_walks,
            owner_targeted_walks: self.targeted_walks,
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

    fn answer(&self, req: &Request) -> Reply {
        match req {
            Request::Status => Reply::ok(&self.status()),
            Request::Flows { filter } => match self.flows(filter) {
                Ok(v) => Reply::ok(&v),
                Err(e) => Reply::err(e),
            },
        }
    }
}

/// Runs the agent in the foreground until SIGINT or SIGTERM.
pub fn run(cfg: Config, config_desc: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(cfg, config_desc))
}

fn select_mode(mode: Mode) -> anyhow::Result<(Option<(ebpf::Loaded, ebpf::Events)>, String)> {
    let uid = sys::geteuid();
    let load = || {
        ebpf::load().map_err(|e| {
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
                "ebpf mode requested: 5 tp_btf tracepoints + iter/tcp loaded".into(),
            )),
            Err(e) => anyhow::bail!(
                "eBPF mode was requested but the programs cannot load: {e}. Run as root on a kernel with BTF, or use --mode poll"
            ),
        },
        Mode::Auto => match load() {
            Ok(l) => Ok((Some(l), "auto: 5 tp_btf tracepoints + iter/tcp loaded".into())),
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

/// Binds the CLI socket: refuses to steal one a live agent serves, replaces a stale one.
fn bind_socket(path: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another holdfast agent is already serving {}; stop it first or use --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group {
        sys::lchown(path, None, Some(gid))
            .with_context(|| format!("chown {} to gid {gid}", path.display()))?;
    }
    Ok(l)
}

async fn run_async(cfg: Config, config_desc: String) -> anyhow::Result<()> {
    let (loaded, mode_reason) = select_mode(cfg.agent.mode)?;
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
    let listener = bind_socket(&cfg.agent.socket, gid)?;
    let (tx, mut rx) = mpsc::channel::<Msg>(256);
    let (wtx, wrx) = std_mpsc::channel::<WorkerMsg>();

    let (source, mode, interval) = match loaded {
        Some((l, events)) => {
            spawn_pump(events, tx.clone());
            (Source::Ebpf(l), "ebpf", cfg.snapshot.ebpf_interval)
        }
        None => (Source::Poll, "poll", cfg.snapshot.poll_interval),
    };
    let wtx_worker = tx.clone();
    std::thread::Builder::new()
        .name("holdfast-snapshot".into())
        .spawn(move || snapshot_worker(source, interval, wrx, wtx_worker))
        .context("spawning the snapshot thread")?;

    let netns = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0)
    };
    let mut state = State {
        table: FlowTable::default(),
        mode,
        mode_reason: mode_reason.clone(),
        started: Instant::now(),
        kernel: KernelCounters::default(),
        undecodable: 0,
        events: 0,
        snapshots: 0,
        last_snapshot: Duration::ZERO,
        last_snapshot_sockets: 0,
        snapshot_interval: interval,
        full_walks: 0,
        targeted_walks: 0,
        config_desc,
        netns,
    };
    info!(mode, reason = %mode_reason, socket = %cfg.agent.socket.display(), "holdfast agent started");

    let qtx = tx.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_conn(stream, qtx.clone(), access.clone()));
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
    let mut snapshot_failures = 0u64;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    Msg::Events { events, undecodable, counters } => {
                        state.undecodable += undecodable;
                        state.events += events.len() as u64;
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
                    Msg::Query { req, reply } => {
                        let _ = reply.send(state.answer(&req));
                    }
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

fn spawn_pump(mut events: ebpf::Events, tx: mpsc::Sender<Msg>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_counters = Instant::now() - Duration::from_secs(10);
        loop {
            tick.tick().await;
            let mut batch = Vec::new();
            let undecodable = events.drain(&mut batch);
            let counters = (last_counters.elapsed() >= Duration::from_millis(500)).then(|| {
                last_counters = Instant::now();
                events.counters()
            });
            if batch.is_empty() && undecodable == 0 && counters.is_none() {
                continue;
            }
            if tx
                .send(Msg::Events {
                    events: batch,
                    undecodable,
                    counters,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
}

fn snapshot_worker(
    mut source: Source,
    interval: Duration,
    rx: std_mpsc::Receiver<WorkerMsg>,
    tx: mpsc::Sender<Msg>,
) {
    let mut resolver = OwnerResolver::default();
    let mut hints: HashMap<u64, u32> = HashMap::new();
    let mut no_file_seen: HashSet<u64> = HashSet::new();
    let mut due = Instant::now();
    let mut spacing = MIN_SNAPSHOT_SPACING;
    let mut last_start = Instant::now();
    loop {
        let now = Instant::now();
        if now >= due {
            last_start = now;
            let msg = match source.snapshot() {
                Ok(snap) => {
                    resolver.resolve(&snap.socks, &hints, now);
                    let live: HashSet<u64> = snap.socks.iter().map(|s| s.cookie).collect();
                    hints.retain(|c, _| live.contains(c));
                    // A socket not yet accepted has no file: look again soon, once per socket.
                    let fresh_no_file = snap
                        .socks
                        .iter()
                        .filter(|s| {
                            s.inode == 0 && s.tcp.is_some() && s.state != monitor_common::tcp_state::LISTEN
                        })
                        .filter(|s| no_file_seen.insert(s.cookie))
                        .count();
                    no_file_seen.retain(|c| live.contains(c));
                    let owners = snap
                        .socks
                        .iter()
                        .filter_map(|s| Some((s.inode, resolver.owner(s.inode)?.clone())))
                        .collect();
                    spacing = (now.elapsed() * SNAPSHOT_DUTY).max(MIN_SNAPSHOT_SPACING);
                    due = Instant::now()
                        + if fresh_no_file > 0 {
                            spacing
                        } else {
                            interval.max(spacing)
                        };
                    Msg::Snapshot {
                        snap,
                        owners,
                        full_walks: resolver.full_walks,
                        targeted_walks: resolver.targeted_walks,
                    }
                }
                Err(e) => {
                    due = Instant::now() + interval.max(spacing);
                    Msg::SnapshotFailed(e)
                }
            };
            if tx.blocking_send(msg).is_err() {
                return;
            }
        }
        match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Ok(WorkerMsg::Hint { cookie, pid }) => {
                hints.insert(cookie, pid);
            }
            Ok(WorkerMsg::Soon) => {
                let soon = (last_start + spacing).max(Instant::now() + OWNER_LOOKUP_DELAY);
                due = due.min(soon);
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

async fn serve_conn(stream: UnixStream, tx: mpsc::Sender<Msg>, access: Access) {
    use std::os::fd::AsFd;
    let verdict = sys::peer_cred(stream.as_fd())
        .map_err(|e| format!("cannot read peer credentials: {e}"))
        .and_then(|c| access.check(c));
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    if let Err(refusal) = verdict {
        // Read the request first so that the refusal is its reply (the client may still be writing).
        let mut limited = (&mut reader).take(ipc::MAX_LINE as u64);
        let _ = tokio::time::timeout(Duration::from_secs(2), limited.read_until(b'\n', &mut buf)).await;
        let _ = w.write_all(Reply::err(refusal).to_line().as_bytes()).await;
        return;
    }
    loop {
        buf.clear();
        let n = match (&mut reader)
            .take(ipc::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if buf.len() > ipc::MAX_LINE {
            let msg = format!("request line longer than {} bytes; closing", ipc::MAX_LINE);
            let _ = w.write_all(Reply::err(msg).to_line().as_bytes()).await;
            return;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let reply = match ipc::parse_request(line) {
            Err(r) => r,
            Ok(req) => {
                let (otx, orx) = oneshot::channel();
                if tx.send(Msg::Query { req, reply: otx }).await.is_err() {
                    return;
                }
                orx.await
                    .unwrap_or_else(|_| Reply::err("the agent is shutting down"))
            }
        };
        if w.write_all(reply.to_line().as_bytes()).await.is_err() {
            return;
        }
    }
}
