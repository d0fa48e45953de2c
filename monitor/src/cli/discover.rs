//! `holdfast discover HOST:PORT` measures a path's idle timeout with a few idle TCP connections
//! (the plan and the verdict are in detect::discover), and `holdfast echo ADDR:PORT` is the far
//! side that keeps idle connections open and answers probes. Polite: one ladder of connections
//! plus one batch of detect::discover::BATCH at a time, each probe one short line, each step
//! printed; no scanning.
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::detect::discover::{self, Fate, Observation, Verdict};
use crate::model::time::fmt_ms;

/// The probe line (any answer counts; `holdfast echo` sends it back).
const PROBE: &[u8] = b"holdfast discover probe\n";
const CONNECT_LIMIT: Duration = Duration::from_secs(5);
/// Connections `holdfast echo` serves at once (more are closed at accept).
const ECHO_MAX: usize = 1024;
/// Connections one client address may hold on `holdfast echo` (a discover run holds the ladder
/// plus one batch: about 20 for --max 24h).
const ECHO_PER_PEER: usize = 64;
/// `holdfast echo` closes a connection idle longer than this (discover's --max is at most 24h).
const ECHO_IDLE: Duration = Duration::from_secs(25 * 3600);
/// An echo the client has not taken within this ends its connection.
const ECHO_WRITE: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct DiscoverArgs {
    /// The peer: HOST:PORT of a server that keeps idle connections open (`holdfast echo` there).
    pub target: String,
    /// The longest idle to try (2s to 24h).
    #[arg(long, default_value = "30m", value_parser = super::parse_human_duration)]
    pub max: Duration,
    /// How long a probe may wait for its answer before the connection counts as silently dropped.
    #[arg(long, default_value = "3s", value_parser = super::parse_human_duration)]
    pub answer_wait: Duration,
    /// Do not hand the result to the local agent (by default a measured timeout is kept by the
    /// agent as the path's evidence, if one runs and you may change it: root or admin group).
    #[arg(long)]
    pub no_record: bool,
    #[arg(long)]
    pub json: bool,
}

fn fail(msg: String) -> ExitCode {
    eprintln!("holdfast: {msg}");
    ExitCode::from(1)
}

pub fn run(a: DiscoverArgs, socket: &std::path::Path) -> Result<(), ExitCode> {
    if a.max < Duration::from_secs(2) || a.max > Duration::from_secs(86_400) {
        eprintln!(
            "holdfast: --max {}: expected 2s to 24h",
            fmt_ms(a.max.as_millis() as u64)
        );
        return Err(ExitCode::from(2));
    }
    if a.answer_wait < Duration::from_millis(100) || a.answer_wait > Duration::from_secs(60) {
        eprintln!("holdfast: --answer-wait: expected 100ms to 60s");
        return Err(ExitCode::from(2));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("starting the runtime: {e}")))?;
    rt.block_on(discover(a, socket))
}

/// Hands a measured timeout to the local agent; Ok(what it says) or Err(why not).
fn record(socket: &std::path::Path, addr: SocketAddr, v: &Verdict) -> Result<String, String> {
    let Verdict::Timeout {
        survived_ms,
        broke_ms,
        ..
    } = v
    else {
        return Err("no timeout to keep".into());
    };
    let req = crate::ipc::Request::Discovered {
        netns: crate::kernel::netns::own_id(),
        target: addr.ip(),
        survived_ms: *survived_ms,
        broke_ms: *broke_ms,
    };
    crate::ipc::client::call::<String>(socket, &req).map_err(|e| e.to_string())
}

/// Connects with a time limit; the error names the target and a fix.
async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    match tokio::time::timeout(CONNECT_LIMIT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!(
            "cannot connect to {addr}: {e} (is a server listening there? `holdfast echo {addr}` on the far side keeps idle connections open)"
        )),
        Err(_) => Err(format!(
            "cannot connect to {addr}: no answer within {CONNECT_LIMIT:?} (unreachable, or a firewall drops it)"
        )),
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Aborts the connection (RST, no lingering retransmissions into a dead path).
fn abort(s: TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// One connection: idle `idle` (the clock restarts if the server speaks), then probe. A server
/// that keeps speaking gets twice the idle and the answer wait, then the connection is `Chatter`.
async fn idle_then_probe(mut s: TcpStream, idle: Duration, answer_wait: Duration) -> Observation {
    let mut buf = [0u8; 512];
    let mut last = Instant::now();
    let give_up = last + idle * 2 + answer_wait;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(last + idle) => break,
            _ = tokio::time::sleep_until(give_up) => {
                abort(s);
                return obs(last, Fate::Chatter);
            }
            r = s.read(&mut buf) => match r {
                Ok(0) => return obs(last, Fate::PeerClosed),
                Ok(_) => last = Instant::now(),
                Err(_) => return obs(last, Fate::ResetWhileIdle),
            },
        }
    }
    let idle_ms = last.elapsed().as_millis() as u64;
    let fate = match s.write_all(PROBE).await {
        Err(e) if is_reset(&e) => Fate::Reset,
        Err(_) => Fate::Reset,
        Ok(()) => match tokio::time::timeout(answer_wait, s.read(&mut buf)).await {
            // Data, or a FIN in answer to the probe: the path still knows the connection.
            Ok(Ok(_)) => Fate::Answered,
            Ok(Err(_)) => Fate::Reset,
            Err(_) => Fate::Silence,
        },
    };
    abort(s);
    Observation { idle_ms, fate }
}

fn obs(last: Instant, fate: Fate) -> Observation {
    Observation {
        idle_ms: last.elapsed().as_millis() as u64,
        fate,
    }
}

struct Run {
    addr: SocketAddr,
    t0: Instant,
    answer_wait: Duration,
    json: bool,
    obs: Vec<Observation>,
    connections: usize,
    /// Connections open now (a task's guard counts down when it ends or is stopped), and the peak.
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    peak_open: usize,
    /// The whole run ends by then (twice --max, the answer wait and a margin for connecting).
    deadline: Instant,
    /// The deadline ended the run.
    timed_out: bool,
}

/// Counts a connection as open for as long as its task lives.
struct OpenGuard(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Run {
    async fn spawn(&mut self, idle_ms: u64) -> Result<JoinHandle<Observation>, String> {
        let s = connect(self.addr).await?;
        self.connections += 1;
        let n = self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.peak_open = self.peak_open.max(n);
        let guard = OpenGuard(self.open.clone());
        let wait = self.answer_wait;
        Ok(tokio::spawn(async move {
            let _guard = guard;
            idle_then_probe(s, Duration::from_millis(idle_ms), wait).await
        }))
    }

    async fn spawn_all(&mut self, idles: &[u64]) -> Result<Vec<JoinHandle<Observation>>, String> {
        let mut v = Vec::with_capacity(idles.len());
        for &i in idles {
            v.push(self.spawn(i).await?);
        }
        Ok(v)
    }

    /// Waits for one connection's result, with a progress line on a terminal; None when the
    /// run's deadline passed first (the connection is stopped).
    async fn wait(&mut self, h: &mut JoinHandle<Observation>, what: &str) -> Option<Observation> {
        let tty = !self.json && std::io::stderr().is_terminal();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let o = loop {
            tokio::select! {
                r = &mut *h => break r.unwrap_or(Observation { idle_ms: 0, fate: Fate::Reset }),
                _ = tokio::time::sleep_until(self.deadline) => {
                    h.abort();
                    self.timed_out = true;
                    if tty {
                        eprint!("\r{:78}\r", "");
                    }
                    return None;
                }
                _ = tick.tick(), if tty => eprint!(
                    "\r  waiting for {what} ({} elapsed, {} connections so far)   ",
                    fmt_ms(self.t0.elapsed().as_millis() as u64 / 1000 * 1000),
                    self.connections
                ),
            }
        };
        if tty {
            eprint!("\r{:78}\r", "");
        }
        self.record(o);
        Some(o)
    }

    fn record(&mut self, o: Observation) {
        if !self.json {
            let what = match o.fate {
                Fate::Answered => "answered".to_string(),
                Fate::Silence => format!(
                    "no answer within {} (silently dropped)",
                    fmt_ms(self.answer_wait.as_millis() as u64)
                ),
                Fate::Reset => "reset".to_string(),
                Fate::PeerClosed => "the server closed it while idle".to_string(),
                Fate::ResetWhileIdle => "reset while idle, before any probe".to_string(),
                Fate::Chatter => "the server kept sending: it never idled".to_string(),
            };
            println!(
                "  +{:<8} idle {:<8} {what}",
                fmt_ms(self.t0.elapsed().as_millis() as u64),
                fmt_ms(o.idle_ms)
            );
        }
        self.obs.push(o);
    }

    /// Takes the results of finished connections and stops the others.
    async fn harvest(&mut self, hs: Vec<JoinHandle<Observation>>) {
        for h in hs {
            if h.is_finished() {
                if let Ok(o) = h.await {
                    self.record(o);
                }
            } else {
                h.abort();
            }
        }
    }
}

async fn resolve(target: &str) -> Result<SocketAddr, String> {
    let mut addrs = tokio::net::lookup_host(target)
        .await
        .map_err(|e| format!("{target}: {e} (expected HOST:PORT, e.g. 10.0.0.5:22)"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{target}: the name has no address"))
}

async fn discover(a: DiscoverArgs, socket: &std::path::Path) -> Result<(), ExitCode> {
    let addr = resolve(&a.target).await.map_err(fail)?;
    let max_ms = a.max.as_millis() as u64;
    let ladder = discover::ladder(max_ms);
    let mut run = Run {
        addr,
        t0: Instant::now(),
        answer_wait: a.answer_wait,
        json: a.json,
        obs: Vec::new(),
        connections: 0,
        open: Default::default(),
        peak_open: 0,
        deadline: Instant::now() + a.max * 2 + a.answer_wait + CONNECT_LIMIT * 2,
        timed_out: false,
    };
    if !a.json {
        println!(
            "holdfast discover {addr}: idle connections probed after {} (and {} more between a survivor and the next step); the far side must keep idle connections open",
            ladder.iter().map(|g| fmt_ms(*g)).collect::<Vec<_>>().join(", "),
            discover::BATCH
        );
    }
    let mut pending = run.spawn_all(&ladder).await.map_err(fail)?.into_iter();
    let mut batch: Vec<JoinHandle<Observation>> = Vec::new();
    let mut batch_idles: Vec<u64> = Vec::new();
    let mut mid_run_error = None;
    for (i, mut h) in pending.by_ref().enumerate() {
        let Some(o) = run
            .wait(&mut h, &format!("the probe after {} idle", fmt_ms(ladder[i])))
            .await
        else {
            break;
        };
        match o.fate {
            Fate::Answered => {
                run.harvest(std::mem::take(&mut batch)).await;
                if let Some(&next) = ladder.get(i + 1) {
                    batch_idles = discover::batch(ladder[i], next);
                    match run.spawn_all(&batch_idles).await {
                        Ok(b) => batch = b,
                        Err(e) => {
                            mid_run_error = Some(e);
                            break;
                        }
                    }
                }
            }
            Fate::Silence | Fate::Reset => {
                if batch.is_empty() && i == 0 {
                    batch_idles = discover::batch(0, ladder[0]);
                    match run.spawn_all(&batch_idles).await {
                        Ok(b) => batch = b,
                        Err(e) => {
                            mid_run_error = Some(e);
                            break;
                        }
                    }
                }
                // The batch resolves the step: in increasing idle, up to the first break.
                let mut rest = std::mem::take(&mut batch).into_iter().zip(batch_idles.iter());
                while let Some((mut h, idle)) = rest.next() {
                    let b = run
                        .wait(&mut h, &format!("the probe after {} idle", fmt_ms(*idle)))
                        .await;
                    if b.is_none_or(|b| b.fate != Fate::Answered) {
                        run.harvest(rest.map(|(h, _)| h).collect()).await;
                        break;
                    }
                }
                break;
            }
            Fate::PeerClosed | Fate::ResetWhileIdle | Fate::Chatter => break,
        }
    }
    run.harvest(pending.collect()).await;
    run.harvest(batch).await;
    let verdict = match mid_run_error {
        Some(e) => Verdict::Inconclusive {
            reason: format!("a new connection failed mid-run: {e}"),
        },
        None if run.timed_out => match discover::judge(&run.obs) {
            v @ Verdict::Inconclusive { .. } if run.obs.iter().any(|o| o.fate == Fate::Chatter) => v,
            _ => Verdict::Inconclusive {
                reason: format!(
                    "the run reached its limit of {} (twice --max and the waits) before a probe decided it: the server or the path held connections without answering; nothing was measured",
                    fmt_ms((run.deadline - run.t0).as_millis() as u64)
                ),
            },
        },
        None => discover::judge(&run.obs),
    };
    let (ip, port) = (addr.ip(), addr.port());
    let cidr = if ip.is_ipv4() {
        format!("{ip}/32")
    } else {
        format!("{ip}/128")
    };
    let rule = discover::rule(&verdict, &cidr, port);
    let elapsed_ms = run.t0.elapsed().as_millis() as u64;
    let recorded = match (&verdict, a.no_record) {
        (Verdict::Timeout { .. }, false) => {
            let s = socket.to_path_buf();
            let v = verdict.clone();
            Some(
                tokio::task::spawn_blocking(move || record(&s, addr, &v))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string())),
            )
        }
        _ => None,
    };
    if a.json {
        let v = serde_json::json!({
            "target": addr.to_string(),
            "verdict": verdict,
            "summary": verdict.summary(),
            "observations": run.obs,
            "connections": run.connections,
            "peak_open": run.peak_open,
            "elapsed_ms": elapsed_ms,
            "rule": rule,
            "recorded": recorded.as_ref().and_then(|r| r.as_ref().ok()),
            "not_recorded": recorded.as_ref().and_then(|r| r.as_ref().err()),
        });
        println!("{v}");
    } else {
        println!("{}", verdict.summary());
        println!(
            "took {}, {} connections ({} open at most)",
            fmt_ms(elapsed_ms),
            run.connections,
            run.peak_open
        );
        match &recorded {
            Some(Ok(what)) => {
                println!("the agent {what}: flows on this path without a rule use it (holdfast profiles)")
            }
            Some(Err(why)) => println!("not kept by the agent: {why}"),
            None => {}
        }
        if let Some(r) = &rule {
            println!(
                "to pin it in /etc/holdfast/holdfast.toml (the longest idle that survived, rounded down):\n{r}"
            );
        }
    }
    match verdict {
        Verdict::Inconclusive { .. } => Err(ExitCode::from(1)),
        _ => Ok(()),
    }
}

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    /// Where to listen: ADDR:PORT (e.g. 0.0.0.0:7007).
    pub listen: SocketAddr,
}

/// `holdfast echo`: keeps every connection open however long it idles (up to ECHO_IDLE) and sends
/// back what it receives. Bounded: ECHO_MAX connections at once and ECHO_PER_PEER per client
/// address (more are closed at accept, which `discover` reports as a refusal, not an idle
/// limit); an echo the client does not take within ECHO_WRITE ends its connection, so a client
/// that sends and never reads holds at most one socket buffer.
pub fn echo(a: EchoArgs) -> Result<(), ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("starting the runtime: {e}")))?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(a.listen)
            .await
            .map_err(|e| fail(format!("cannot listen on {}: {e}", a.listen)))?;
        let local = l.local_addr().map_err(|e| fail(e.to_string()))?;
        println!("listening {local}");
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(ECHO_MAX));
        let peers: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
            Default::default();
        loop {
            let (mut s, from) = match l.accept().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue; // dropped: closed at once
            };
            let ip = from.ip();
            {
                let Ok(mut m) = peers.lock() else { continue };
                let n = m.entry(ip).or_default();
                if *n >= ECHO_PER_PEER {
                    continue; // this client has enough: closed at once
                }
                *n += 1;
            }
            let peers = peers.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut buf = [0u8; 4096];
                loop {
                    let n = match tokio::time::timeout(ECHO_IDLE, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => break,
                    };
                    match tokio::time::timeout(ECHO_WRITE, s.write_all(&buf[..n])).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
                if let Ok(mut m) = peers.lock()
                    && let Some(n) = m.get_mut(&ip)
                {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&ip);
                    }
                }
            });
        }
    })
}
