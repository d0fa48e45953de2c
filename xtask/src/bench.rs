//! `cargo xtask bench`: holdfast's speed, memory and overhead, side by side with `ss` and `ps` on
//! the same sockets and processes in the same run. Loopback only, in a namespace it creates;
//! everything it starts is stopped at the end.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const NS: &str = "hf-bench";
/// Connections per load process (two sockets each; RLIMIT_NOFILE is capped at 20000 here).
const PER_PROC: usize = 8500;

struct Ns;

impl Ns {
    fn new() -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
        run_ok(Command::new("ip").args(["netns", "add", NS]))?;
        run_ok(Command::new("ip").args(["-n", NS, "link", "set", "lo", "up"]))?;
        Ok(Ns)
    }
    fn cmd(program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{NS}")).arg("--").arg(program);
        c
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
    }
}

fn run_ok(c: &mut Command) -> Result<String> {
    let o = c.output().with_context(|| format!("{c:?}"))?;
    if !o.status.success() {
        bail!("{c:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A background process fed through stdin (closing it ends the process).
struct Held {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Kept open so that the process can keep printing.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Held {
    /// Starts `c` with piped stdin/stdout, without waiting for it.
    fn start(mut c: Command) -> Result<Self> {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("{c:?}"))?;
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Held {
            child,
            stdin,
            _stdout: out,
        })
    }

    /// Waits for the first line, which must start with `expect`.
    fn first_line(&mut self, expect: &str) -> Result<String> {
        let mut line = String::new();
        self._stdout.read_line(&mut line)?;
        if !line.starts_with(expect) {
            bail!("pid {} printed {line:?}, expected {expect}", self.child.id());
        }
        Ok(line)
    }

    fn spawn(c: Command, expect: &str) -> Result<(Self, String)> {
        let mut h = Held::start(c)?;
        let line = h.first_line(expect)?;
        Ok((h, line))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stdin.take();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Best wall time of `n` runs of a command inside the namespace (output discarded).
fn time_cmd(args: &[&str], n: usize, timeout: Duration) -> Option<f64> {
    let mut best = f64::MAX;
    for _ in 0..n {
        let t0 = Instant::now();
        let mut c = Ns::cmd(Path::new(args[0]));
        let mut child = c
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Some(best)
}

struct Agent {
    child: Child,
    socket: PathBuf,
    bin: PathBuf,
}

impl Agent {
    fn start(bin: &Path, mode: &str, config: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("hf-bench-{mode}"));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("h.sock");
        let cfg = dir.join("h.toml");
        // Learnt paths of its own, fresh each run: what the host's agent (or a test run) learnt
        // must not shorten the bench agent's timeouts and so its reads.
        let learnt = dir.join("learned-paths.json");
        let _ = std::fs::remove_file(&learnt);
        std::fs::write(
            &cfg,
            format!("{config}\n[learning]\nstate_file = \"{}\"\n", learnt.display()),
        )?;
        let child = Ns::cmd(bin)
            .args(["agent", "--mode", mode, "--config"])
            .arg(&cfg)
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let a = Agent {
            child,
            socket,
            bin: bin.to_path_buf(),
        };
        a.wait(Duration::from_secs(30), |s| s["mode"] == mode)?;
        Ok(a)
    }
    fn status(&self) -> Option<Value> {
        let o = Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(["status", "--json"])
            .output()
            .ok()?;
        serde_json::from_slice(&o.stdout).ok()
    }
    fn query(&self, args: &[&str]) -> Option<Value> {
        let o = Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .ok()?;
        serde_json::from_slice(&o.stdout).ok()
    }
    fn wait(&self, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.status()
                && ok(&s)
            {
                return Ok(s);
            }
            if t0.elapsed() > timeout {
                bail!(
                    "agent did not reach the expected state in {timeout:?}: {:?}",
                    self.status()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    /// (user+system CPU seconds, RSS bytes)
    fn usage(&self) -> (f64, u64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks: u64 = rest.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + rest.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024;
        (ticks as f64 / 100.0, rss)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn probe(bin: &Path, mode: &str) -> Result<Value> {
    // The filter threshold of the default configuration: home-router 600 s x 0.8 - 2 x 10 s.
    let out = run_ok(Ns::cmd(bin).args([
        "probe",
        "snapshot",
        "--mode",
        mode,
        "--owners",
        "--repeat",
        "3",
        "--filtered-ms",
        "460000",
    ]))?;
    Ok(serde_json::from_str(&out)?)
}

fn load(tools: &Path, conns: usize) -> Result<Vec<Held>> {
    // Start every load process first, then wait for each: they connect in parallel.
    let mut started = Vec::new();
    for i in 0..conns.div_ceil(PER_PROC) {
        let n = (conns - i * PER_PROC).min(PER_PROC);
        let mut c = Ns::cmd(&tools.join("hf-load"));
        c.args([
            "conns",
            &format!("127.0.{}.{}:5000", i / 250, i % 250 + 1),
            &n.to_string(),
        ]);
        started.push(Held::start(c)?);
    }
    for h in &mut started {
        h.first_line("ready")?;
    }
    Ok(started)
}

/// The settled window starts this long after every flow is tracked: the first judgement and
/// count of every flow are behind it.
const SETTLE: Duration = Duration::from_secs(60);

/// RSS samples over a window: one every this long.
const RSS_EVERY: Duration = Duration::from_secs(5);

/// CPU % of one core over `window` from now, the reads (all, complete) the agent made in it,
/// the flows its eviction forecast judged in it (what woke: changes and judgements due), and
/// the agent's RSS sampled every `RSS_EVERY` through it (a complete read's buffers live for
/// the read: one sample at a fixed time after tracking could fall on it or not).
fn cpu_window(a: &Agent, window: Duration) -> (f64, u64, u64, u64, Vec<u64>) {
    let reads = |a: &Agent| {
        a.status().map_or((0, 0, 0), |s| {
            (
                s["snapshots"].as_u64().unwrap_or(0),
                s["complete_reads"].as_u64().unwrap_or(0),
                s["rounds"]["judged"].as_u64().unwrap_or(0),
            )
        })
    };
    let (r0, f0, j0) = reads(a);
    let (c0, _) = a.usage();
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed() < window {
        std::thread::sleep(RSS_EVERY.min(window.saturating_sub(t0.elapsed())));
        rss.push(a.usage().1);
    }
    let (c1, _) = a.usage();
    let (r1, f1, j1) = reads(a);
    (
        (c1 - c0) / t0.elapsed().as_secs_f64() * 100.0,
        r1.saturating_sub(r0),
        f1.saturating_sub(f0),
        j1.saturating_sub(j0),
        rss,
    )
}

/// A steady-state agent: CPU over `window` from 3 s after every flow is tracked (its first
/// minute: the first judgement and count of every flow), then, settled, over `settled` from
/// SETTLE after tracking (complete reads are paced to their cost, so a window shows one or none:
/// both the window's figure and the reads in it are kept), then memory and the `flows` query.
fn steady(
    bin: &Path,
    tools: &Path,
    mode: &str,
    sockets: u64,
    (window, settled): (Duration, Duration),
    base_rss: u64,
) -> Result<Value> {
    let a = Agent::start(bin, mode, "")?;
    a.wait(Duration::from_secs(180), |s| {
        s["flows"].as_u64().unwrap_or(0) + 10 >= sockets
    })?;
    let tracked = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let (cpu, _, _, _, _) = cpu_window(&a, window);
    std::thread::sleep(SETTLE.saturating_sub(tracked.elapsed()));
    let (settled_cpu, settled_reads, settled_complete, settled_judged, mut samples) = cpu_window(&a, settled);
    samples.sort_unstable();
    // The settled agent's size: the median of the window's samples; its peak: the largest.
    let rss = samples
        .get(samples.len() / 2)
        .copied()
        .unwrap_or_else(|| a.usage().1);
    let peak = samples.last().copied().unwrap_or(rss);
    let flows = a.status().and_then(|s| s["flows"].as_u64()).unwrap_or(0);
    let per = |bytes: u64| {
        if flows > 0 {
            bytes.saturating_sub(base_rss) as f64 / flows as f64
        } else {
            0.0
        }
    };
    let (per_flow, peak_per_flow) = (per(rss), per(peak));
    let fresh = selected_flows(&a, tools, sockets)?;
    let trickle = trickle(&a, tools)?;
    Ok(
        json!({ "mode": mode, "flows": flows, "cpu_pct": cpu, "rss_bytes": rss, "bytes_per_flow": per_flow, "peak_rss_bytes": peak, "peak_bytes_per_flow": peak_per_flow, "rss_samples": samples.len(), "window_s": window.as_secs(),
            "settled": { "cpu_pct": settled_cpu, "window_s": settled.as_secs(), "from_s": SETTLE.as_secs(), "reads": settled_reads, "complete_reads": settled_complete, "judged": settled_judged },
            "flows_1k": fresh, "trickle": trickle }),
    )
}

/// New long-lived sessions arriving slowly at a large table: one connection every
/// TRICKLE_EVERY_MS, each held, on their own port.
const TRICKLE_EVERY_MS: u64 = 500;
const TRICKLE_PORT: &str = "5002";
const TRICKLE_WINDOW: Duration = Duration::from_secs(60);

/// The settled agent while new connections trickle in: its CPU over TRICKLE_WINDOW (from 5 s
/// after the first), the owner lookups and reads that took (from `status`), and how many of the
/// new flows the agent shows with their owner at the end.
fn trickle(a: &Agent, tools: &Path) -> Result<Value> {
    let mut c = Ns::cmd(&tools.join("hf-load"));
    c.args([
        "trickle",
        &format!("127.0.0.253:{TRICKLE_PORT}"),
        &TRICKLE_EVERY_MS.to_string(),
    ]);
    let (_held, _) = Held::spawn(c, "ready")?;
    std::thread::sleep(Duration::from_secs(5));
    let counts = |a: &Agent| {
        a.status().map_or([0; 3], |s| {
            ["owner_full_walks", "owner_targeted_walks", "snapshots"].map(|k| s[k].as_u64().unwrap_or(0))
        })
    };
    let before = counts(a);
    let (c0, _) = a.usage();
    let t0 = Instant::now();
    std::thread::sleep(TRICKLE_WINDOW);
    let (c1, _) = a.usage();
    let secs = t0.elapsed().as_secs_f64();
    let after = counts(a);
    // Give the last connection its owner lookup (the next tick, then the exact read).
    std::thread::sleep(Duration::from_secs(2));
    let rows = a
        .query(&["flows", "--json", "--cached", "--port", TRICKLE_PORT])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let owned = rows.iter().filter(|f| f["pid"].as_u64().is_some()).count();
    // The sockets there are, as `ss` lists them (both ends of every connection, and the listener).
    let filter = format!("( sport = :{TRICKLE_PORT} or dport = :{TRICKLE_PORT} )");
    let sockets = run_ok(Ns::cmd(Path::new("ss")).args(["-Htan", &filter]))?
        .lines()
        .count();
    Ok(json!({
        "sockets": sockets,
        "every_ms": TRICKLE_EVERY_MS, "window_s": secs, "cpu_pct": (c1 - c0) / secs * 100.0,
        "flows": rows.len(), "with_owner": owned,
        // Counters of one agent only grow; saturating all the same (an agent restarted between).
        "full_walks": after[0].saturating_sub(before[0]), "targeted_walks": after[1].saturating_sub(before[1]),
        "reads": after[2].saturating_sub(before[2]),
    }))
}

/// Connections of the `flows` query row: 500 (1000 sockets) on their own port.
const SELECTED_CONNS: usize = 500;
const SELECTED_PORT: &str = "5001";

/// `holdfast flows --port P` selecting 1000 flows out of all the agent tracks: fresh (the default:
/// the agent reads those sockets from the kernel first) and `--cached`, best and median of 5,
/// a second apart (fresh reads are limited to 10 % of the agent's time); `ss -tin` with the same
/// port filter on the same sockets.
fn selected_flows(a: &Agent, tools: &Path, sockets: u64) -> Result<Value> {
    let mut c = Ns::cmd(&tools.join("hf-load"));
    c.args([
        "conns",
        &format!("127.0.0.254:{SELECTED_PORT}"),
        &SELECTED_CONNS.to_string(),
    ]);
    let (_held, _) = Held::spawn(c, "ready")?;
    let want = sockets + 2 * SELECTED_CONNS as u64;
    // Poll mode finds them at its next read: reads take at most 1 % of the time, so at 1M
    // sockets (2 s a read) they are 200 s apart.
    let read_s = a
        .status()
        .and_then(|s| s["last_snapshot_ms"].as_f64())
        .unwrap_or(0.0)
        / 1000.0;
    let patience = Duration::from_secs_f64((read_s * 100.0 * 2.0).max(120.0));
    a.wait(patience, |s| s["flows"].as_u64().unwrap_or(0) + 10 >= want)?;
    let time = |extra: &[&str]| -> (f64, f64, usize, u64) {
        let mut runs = Vec::new();
        let (mut rows, mut oldest) = (0, 0);
        for _ in 0..5 {
            std::thread::sleep(Duration::from_secs(1));
            // The command alone is timed (the bench's own JSON parsing is not).
            let t0 = Instant::now();
            let out = Command::new(&a.bin)
                .arg("--socket")
                .arg(&a.socket)
                .args([&["flows", "--json", "--port", SELECTED_PORT], extra].concat())
                .output();
            runs.push(t0.elapsed().as_secs_f64());
            let v: Vec<Value> = out
                .ok()
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default();
            rows = v.len();
            oldest = v
                .iter()
                .filter_map(|f| f["sample_age_ms"].as_u64())
                .max()
                .unwrap_or(0);
        }
        runs.sort_by(f64::total_cmp);
        (runs[0], runs[runs.len() / 2], rows, oldest)
    };
    let (fresh_best, fresh_median, rows, fresh_oldest) = time(&[]);
    let (cached_best, cached_median, _, cached_oldest) = time(&["--cached"]);
    let filter = format!("( sport = :{SELECTED_PORT} or dport = :{SELECTED_PORT} )");
    let ss = time_cmd(&["ss", "-tin", &filter], 3, Duration::from_secs(60));
    Ok(json!({
        "rows": rows,
        "fresh_best_s": fresh_best, "fresh_median_s": fresh_median, "fresh_oldest_sample_ms": fresh_oldest,
        "cached_best_s": cached_best, "cached_median_s": cached_median, "cached_oldest_sample_ms": cached_oldest,
        "ss_tin_port_s": ss,
    }))
}

/// Timed churn rounds per configuration (bare, each agent mode, two loops).
const CHURN_ROUNDS: usize = 3;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Turns the kernel's BPF run-time statistics on or off (`kernel.bpf_stats_enabled`).
fn bpf_stats_enabled(on: bool) {
    let _ = Command::new("sysctl")
        .args(["-qw", &format!("kernel.bpf_stats_enabled={}", u8::from(on))])
        .status();
}

fn churn(tools: &Path, cycles: usize) -> Result<f64> {
    let out = run_ok(Ns::cmd(&tools.join("hf-load")).args(["churn", "127.0.0.1:6000", &cycles.to_string()]))?;
    out.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .context("churn output")
}

/// Two churn loops at once (the machine's maximum with 2 cores), each on its own listener: the
/// slower loop's seconds.
fn churn_parallel(tools: &Path, cycles: usize) -> Result<f64> {
    let spawn = |addr: &str| -> Result<Child> {
        Ok(Ns::cmd(&tools.join("hf-load"))
            .args(["churn", addr, &cycles.to_string()])
            .stdout(Stdio::piped())
            .spawn()?)
    };
    let (a, b) = (spawn("127.0.0.1:6001")?, spawn("127.0.0.2:6002")?);
    let mut worst: f64 = 0.0;
    for c in [a, b] {
        let o = c.wait_with_output()?;
        if !o.status.success() {
            bail!("hf-load churn failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        let secs: f64 = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .context("churn output")?;
        worst = worst.max(secs);
    }
    Ok(worst)
}

/// Runs `load` (returning its seconds) with an agent in `mode`: the seconds, the events the agent
/// handled, its lost events, and the socket programs' ns per run (None when the kernel's BPF
/// statistics are off or nothing ran).
fn under_agent(
    bin: &Path,
    mode: &str,
    load: impl Fn() -> Result<f64>,
) -> Result<(f64, u64, Value, Option<f64>)> {
    let a = Agent::start(bin, mode, "")?;
    let (c0, n0) = bpf_stats();
    let s0 = a.status().unwrap_or_default();
    let t = load()?;
    std::thread::sleep(Duration::from_millis(700));
    let s1 = a.status().unwrap_or_default();
    let (c1, n1) = bpf_stats();
    let events = s1["events"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(s0["events"].as_u64().unwrap_or(0));
    let ns = (c1 > c0).then(|| (n1 - n0) as f64 / (c1 - c0) as f64);
    Ok((t, events, s1["events_lost"].clone(), ns))
}

/// Sums run_cnt and run_time_ns of holdfast's socket tracepoint programs (kernel bpf stats).
fn bpf_stats() -> (u64, u64) {
    let Ok(out) = run_ok(Command::new("bpftool").args(["prog", "show", "--json"])) else {
        return (0, 0);
    };
    let v: Value = serde_json::from_str(&out).unwrap_or_default();
    let mut cnt = 0;
    let mut ns = 0;
    for p in v.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("");
        if [
            "inet_sock_set_s",
            "tcp_receive_res",
            "tcp_send_reset",
            "inet_sk_error_r",
            "tcp_retransmit_",
        ]
        .iter()
        .any(|n| name.starts_with(n))
        {
            cnt += p["run_cnt"].as_u64().unwrap_or(0);
            ns += p["run_time_ns"].as_u64().unwrap_or(0);
        }
    }
    (cnt, ns)
}

/// Namespaces made for the namespace rows (`hf-bench-n<i>`), deleted on drop.
struct Spaces(Vec<String>);

impl Spaces {
    fn new(n: usize) -> Result<Self> {
        let mut v = Spaces(Vec::new());
        for i in 0..n {
            let name = format!("{NS}-n{i}");
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
            run_ok(Command::new("ip").args(["netns", "add", &name]))?;
            v.0.push(name.clone());
            run_ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        }
        Ok(v)
    }
}

impl Drop for Spaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Agent CPU (%) over `window` with whatever namespaces exist now.
fn idle_cpu(bin: &Path, mode: &str, window: Duration) -> Result<f64> {
    let a = Agent::start(bin, mode, "")?;
    std::thread::sleep(Duration::from_secs(3));
    let (c0, _) = a.usage();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let (c1, _) = a.usage();
    Ok((c1 - c0) / t0.elapsed().as_secs_f64() * 100.0)
}

/// net.ipv4.tcp_child_ehash_entries: 0 (namespaces share the host's TCP hash table) or the size
/// of the table each namespace created afterwards gets of its own.
fn child_ehash(entries: u32) {
    let _ = Command::new("sysctl")
        .args(["-qw", &format!("net.ipv4.tcp_child_ehash_entries={entries}")])
        .status();
}

/// 50 namespaces x 2000 sockets read as the agent reads them, against the per-socket cost of the
/// largest one-namespace row; then the steady cost of 50 empty namespaces. With `own_hash`, the
/// namespaces are created with TCP hash tables of their own (tcp_child_ehash_entries).
fn namespaces(
    bin: &Path,
    tools: &Path,
    one_ns: Option<(f64, f64, u64)>,
    own_hash: Option<u32>,
) -> Result<Value> {
    const SPACES: usize = 50;
    const CONNS: usize = 1000;
    eprintln!(
        "bench: {SPACES} namespaces x {} sockets ({})",
        2 * CONNS,
        own_hash.map_or("shared TCP hash table".into(), |n| format!(
            "own hash tables of {n}"
        ))
    );
    child_ehash(own_hash.unwrap_or(0));
    let spaces = Spaces::new(SPACES);
    child_ehash(0);
    let spaces = spaces?;
    let mut held = Vec::new();
    for n in &spaces.0 {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{n}"))
            .arg("--")
            .arg(tools.join("hf-load"))
            .args(["conns", "127.0.0.1:5000", &CONNS.to_string()]);
        held.push(Held::start(c)?);
    }
    for h in &mut held {
        h.first_line("ready")?;
    }
    let probe = |mode: &str| -> Result<Value> {
        let out = run_ok(Command::new(bin).args(["probe", "namespaces", "--mode", mode, "--repeat", "3"]))?;
        Ok(serde_json::from_str(&out)?)
    };
    let (ebpf, poll) = (probe("ebpf")?, probe("poll")?);
    drop(held);
    let window = Duration::from_secs(10);
    let idle = if own_hash.is_none() {
        let empty_ebpf = idle_cpu(bin, "ebpf", window)?;
        let empty_poll = idle_cpu(bin, "poll", window)?;
        drop(spaces);
        let none_ebpf = idle_cpu(bin, "ebpf", window)?;
        let none_poll = idle_cpu(bin, "poll", window)?;
        json!({ "ebpf_50_empty": empty_ebpf, "poll_50_empty": empty_poll, "ebpf_none": none_ebpf, "poll_none": none_poll, "window_s": window.as_secs() })
    } else {
        Value::Null
    };
    let per = |v: &Value| v["ns_per_socket"].as_f64().unwrap_or(0.0);
    let one = one_ns.map(|(e, p, socks)| json!({ "sockets": socks, "ebpf_ns_per_socket": e * 1e9 / socks as f64, "poll_ns_per_socket": p * 1e9 / socks as f64 }));
    Ok(json!({
        "spaces": SPACES, "sockets_each": 2 * CONNS,
        "ebpf": ebpf, "poll": poll,
        "one_namespace": one,
        "ebpf_vs_one": one_ns.map(|(e, _, s)| per(&ebpf) / (e * 1e9 / s as f64)),
        "poll_vs_one": one_ns.map(|(_, p, s)| per(&poll) / (p * 1e9 / s as f64)),
        "own_hash_entries": own_hash,
        "idle_cpu_pct": idle,
    }))
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// The bench's stages, each printed as it starts with the time the previous one took.
struct Stages {
    current: Option<(String, Instant)>,
    done: Vec<Value>,
}

impl Stages {
    fn begin(&mut self, name: String) {
        self.end();
        eprintln!("bench: {name}");
        self.current = Some((name, Instant::now()));
    }

    fn end(&mut self) {
        if let Some((name, t0)) = self.current.take() {
            let s = t0.elapsed().as_secs_f64();
            eprintln!("bench:   ({name}: {s:.1}s)");
            self.done.push(json!({ "stage": name, "seconds": s }));
        }
    }
}

/// Figures compared with the previous run: (label, JSON pointer, lower is better).
fn compared_figures(r: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    if let Some(sizes) = r["sizes"].as_array() {
        for (i, s) in sizes.iter().enumerate() {
            let n = s["sockets"].as_u64().unwrap_or(0);
            for (what, path, lower) in [
                ("eBPF read", "holdfast_ebpf/best_read_s", true),
                ("eBPF read with owners", "holdfast_ebpf/best_total_s", true),
                ("at-risk read", "holdfast_ebpf/filtered/best_s", true),
                ("poll read", "holdfast_poll/best_read_s", true),
                ("poll read with owners", "holdfast_poll/best_total_s", true),
                ("eBPF CPU %", "steady_ebpf/cpu_pct", true),
                ("poll CPU %", "steady_poll/cpu_pct", true),
                ("eBPF settled CPU %", "steady_ebpf/settled/cpu_pct", true),
                ("poll settled CPU %", "steady_poll/settled/cpu_pct", true),
                ("eBPF B/flow", "steady_ebpf/bytes_per_flow", true),
                ("flows for 1k, eBPF", "steady_ebpf/flows_1k/fresh_best_s", true),
                ("flows for 1k, poll", "steady_poll/flows_1k/fresh_best_s", true),
                ("poll B/flow", "steady_poll/bytes_per_flow", true),
                ("eBPF peak B/flow", "steady_ebpf/peak_bytes_per_flow", true),
                ("poll peak B/flow", "steady_poll/peak_bytes_per_flow", true),
                ("new connections CPU %, eBPF", "steady_ebpf/trickle/cpu_pct", true),
                ("new connections CPU %, poll", "steady_poll/trickle/cpu_pct", true),
            ] {
                out.push((
                    format!("{n} sockets: {what}"),
                    format!("/sizes/{i}/{path}"),
                    lower,
                ));
            }
        }
    }
    for (what, path) in [
        ("churn eBPF added %", "/churn/ebpf/added_pct"),
        ("churn ns per program run", "/churn/ebpf/ns_per_program_run"),
        ("parallel churn eBPF added %", "/churn/parallel/added_pct"),
        (
            "parallel churn ns per program run",
            "/churn/parallel/ns_per_program_run",
        ),
        ("zombie latency median ms", "/zombie_latency_ms/median"),
        ("/proc scan s", "/procs/holdfast/best_s"),
        ("probe watch ns per callback", "/probe_watch/ns_per_callback"),
        ("idle RSS eBPF", "/agent_rss_empty_bytes/ebpf"),
        ("idle RSS poll", "/agent_rss_empty_bytes/poll"),
    ] {
        out.push((what.into(), path.into(), true));
    }
    out
}

/// Compares with the previous results: every figure both runs have, with a flag where this run
/// is more than 10 % worse. Sizes are matched by position only when their socket counts agree.
fn compare(prev: &Value, now: &Value) -> Value {
    let mut rows = Vec::new();
    for (label, ptr, lower) in compared_figures(now) {
        if ptr.starts_with("/sizes/") {
            let idx = ptr.split('/').nth(2).unwrap_or("");
            let same = prev.pointer(&format!("/sizes/{idx}/sockets"))
                == now.pointer(&format!("/sizes/{idx}/sockets"));
            if !same {
                continue;
            }
        }
        let (Some(a), Some(b)) = (
            prev.pointer(&ptr).and_then(Value::as_f64),
            now.pointer(&ptr).and_then(Value::as_f64),
        ) else {
            continue;
        };
        if a <= 0.0 {
            continue;
        }
        let change = (b - a) / a * 100.0;
        let worse = if lower { change > 10.0 } else { change < -10.0 };
        rows.push(
            json!({ "figure": label, "previous": a, "now": b, "change_pct": change, "regression": worse }),
        );
    }
    json!(rows)
}

pub fn run(bin: &Path, tools: &Path, sizes: &[usize]) -> Result<Value> {
    let _ns = Ns::new()?;
    let mut st = Stages {
        current: None,
        done: Vec::new(),
    };
    st.begin("idle agents (RSS with no flows)".into());
    let mut results = json!({ "machine": { "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim() } });
    // Baseline agent RSS with no flows, per mode.
    let mut base = std::collections::HashMap::new();
    for mode in ["ebpf", "poll"] {
        let a = Agent::start(bin, mode, "")?;
        std::thread::sleep(Duration::from_secs(2));
        base.insert(mode, a.usage().1);
    }
    results["agent_rss_empty_bytes"] = json!(base);
    let mut table = Vec::new();
    let mut sizes_out = Vec::new();
    for &conns in sizes {
        st.begin(format!("{conns} connections ({} sockets)", 2 * conns));
        let held = load(tools, conns)?;
        let sockets = (2 * conns) as u64;
        let ebpf = probe(bin, "ebpf")?;
        let poll = probe(bin, "poll")?;
        let ss_tin = time_cmd(&["ss", "-tin"], 3, Duration::from_secs(120));
        let ss_tino = time_cmd(&["ss", "-tino"], 3, Duration::from_secs(120));
        let ss_tnp = time_cmd(&["ss", "-tnp"], 1, Duration::from_secs(180));
        let window = if conns >= 50_000 {
            (Duration::from_secs(30), Duration::from_secs(180))
        } else {
            (Duration::from_secs(10), Duration::from_secs(60))
        };
        let steady_ebpf = steady(bin, tools, "ebpf", sockets, window, base["ebpf"])?;
        let steady_poll = steady(bin, tools, "poll", sockets, window, base["poll"])?;
        drop(held);
        let e_total = ebpf["best_total_s"].as_f64().unwrap_or(0.0);
        let p_total = poll["best_total_s"].as_f64().unwrap_or(0.0);
        table.push(vec![
            format!("{}", 2 * conns),
            format!("{:.3}", ebpf["best_read_s"].as_f64().unwrap_or(0.0)),
            format!("{:.3}", e_total),
            format!("{:.4}", ebpf["filtered"]["best_s"].as_f64().unwrap_or(0.0)),
            format!("{:.3}", poll["best_read_s"].as_f64().unwrap_or(0.0)),
            format!("{:.3}", p_total),
            ss_tin.map_or("-".into(), |v| format!("{v:.3}")),
            ss_tino.map_or("-".into(), |v| format!("{v:.3}")),
            ss_tnp.map_or("timeout".into(), |v| format!("{v:.2}")),
            ratio(ss_tin.unwrap_or(0.0), e_total),
            ratio(ss_tnp.unwrap_or(0.0), e_total),
            ratio(
                ebpf["filtered"]["best_s"].as_f64().unwrap_or(0.0),
                ss_tino.unwrap_or(0.0),
            ),
            format!(
                "{:.2}/{:.2}",
                steady_ebpf["cpu_pct"].as_f64().unwrap_or(0.0),
                steady_poll["cpu_pct"].as_f64().unwrap_or(0.0)
            ),
            format!(
                "{:.2}/{:.2}",
                steady_ebpf["settled"]["cpu_pct"].as_f64().unwrap_or(0.0),
                steady_poll["settled"]["cpu_pct"].as_f64().unwrap_or(0.0)
            ),
            format!(
                "{:.0}/{:.0}",
                steady_ebpf["bytes_per_flow"].as_f64().unwrap_or(0.0),
                steady_poll["bytes_per_flow"].as_f64().unwrap_or(0.0)
            ),
        ]);
        sizes_out.push(json!({
            "connections": conns, "sockets": sockets,
            "holdfast_ebpf": ebpf, "holdfast_poll": poll,
            "ss_tin_s": ss_tin, "ss_tino_s": ss_tino, "ss_tnp_s": ss_tnp,
            "steady_ebpf": steady_ebpf, "steady_poll": steady_poll,
        }));
    }
    results["sizes"] = json!(sizes_out);
    // The largest one-namespace row is the reference for the namespace rows.
    let one_ns = results["sizes"].as_array().and_then(|a| a.last()).map(|r| {
        (
            r["holdfast_ebpf"]["best_read_s"].as_f64().unwrap_or(0.0),
            r["holdfast_poll"]["best_read_s"].as_f64().unwrap_or(0.0),
            r["sockets"].as_u64().unwrap_or(1).max(1),
        )
    });
    st.begin("50 namespaces, shared TCP hash table".into());
    results["namespaces"] = namespaces(bin, tools, one_ns, None)?;
    st.begin("50 namespaces, own TCP hash tables".into());
    results["namespaces_own_hash"] = namespaces(bin, tools, one_ns, Some(4096))?;
    // Churn: the same loop bare and with the agent in each mode, interleaved over rounds (one
    // bare run against one agent run moved by several percent between runs here); the medians
    // are compared. The kernel's BPF statistics add two clock reads and counters to every program
    // run, so the timed rounds run with them off and the ns per program run comes from one more
    // run each with them on.
    st.begin("churn".into());
    let cycles = 100_000;
    bpf_stats_enabled(false);
    let (mut bare, mut bare2, mut par) = (Vec::new(), Vec::new(), Vec::new());
    // (seconds, events handled, lost events: None when status did not say)
    let mut runs: [Vec<(f64, u64, Option<u64>)>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..CHURN_ROUNDS {
        bare.push(churn(tools, cycles)?);
        for (i, mode) in ["ebpf", "poll"].into_iter().enumerate() {
            let (t, events, lost, _) = under_agent(bin, mode, || churn(tools, cycles))?;
            runs[i].push((t, events, lost.as_u64()));
        }
        // Two loops at once: the most connections per second this machine makes.
        bare2.push(churn_parallel(tools, cycles)?);
        let (t, events, lost, _) = under_agent(bin, "ebpf", || churn_parallel(tools, cycles))?;
        par.push((t, events, lost.as_u64()));
    }
    bpf_stats_enabled(true);
    let ns_one = under_agent(bin, "ebpf", || churn(tools, cycles))?.3;
    let ns_two = under_agent(bin, "ebpf", || churn_parallel(tools, cycles))?.3;
    bpf_stats_enabled(false);
    let bare_s = median(&bare);
    let mut churn_out =
        json!({ "cycles": cycles, "rounds": CHURN_ROUNDS, "bare_s": bare_s, "bare_runs_s": bare });
    for (i, mode) in ["ebpf", "poll"].into_iter().enumerate() {
        let r = &runs[i];
        let t = median(&r.iter().map(|x| x.0).collect::<Vec<_>>());
        let events = r.iter().map(|x| x.1).max().unwrap_or(0);
        churn_out[mode] = json!({
            "seconds": t,
            "runs_s": r.iter().map(|x| x.0).collect::<Vec<_>>(),
            "added_pct": (t / bare_s - 1.0) * 100.0,
            "events": events,
            "events_per_s": events as f64 / t,
            "lost": r.iter().map(|x| x.2).sum::<Option<u64>>(),
            "ns_per_program_run": if mode == "ebpf" { ns_one } else { None },
        });
    }
    let bare2_s = median(&bare2);
    let t = median(&par.iter().map(|x| x.0).collect::<Vec<_>>());
    churn_out["parallel"] = json!({
        "loops": 2,
        "bare_s": bare2_s,
        "bare_runs_s": bare2,
        "connections_per_s": (2 * cycles) as f64 / bare2_s,
        "ebpf_s": t,
        "ebpf_runs_s": par.iter().map(|x| x.0).collect::<Vec<_>>(),
        "added_pct": (t / bare2_s - 1.0) * 100.0,
        "events": par.iter().map(|x| x.1).max().unwrap_or(0),
        "lost": par.iter().map(|x| x.2).sum::<Option<u64>>(),
        "ns_per_program_run": ns_two,
    });
    results["churn"] = churn_out;
    // Zombie exit -> finding latency, eBPF mode, age threshold 0.
    st.begin("zombie latency".into());
    let mut lat = Vec::new();
    {
        let a = Agent::start(bin, "ebpf", "[zombies]\nmin_age = \"0s\"\n")?;
        for _ in 0..5 {
            let (parent, _) = Held::spawn(
                {
                    let mut c = Command::new(tools.join("hf-parent"));
                    c.args(["no-handler", "1"]);
                    c
                },
                "children",
            )?;
            let pid = parent.child.id();
            let t0 = Instant::now();
            loop {
                let f = a
                    .query(&["findings", "--json", "--kind", "zombie"])
                    .unwrap_or_default();
                if let Some(x) = f
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|f| f["details"]["ppid"] == pid)
                {
                    lat.push(x["details"]["age_at_report_ms"].as_u64().unwrap_or(0));
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(parent);
        }
    }
    lat.sort_unstable();
    results["zombie_latency_ms"] =
        json!({ "samples": lat, "median": lat.get(lat.len() / 2), "max": lat.last() });
    // /proc scan with 10k processes (100 zombies) vs ps.
    st.begin("10k processes".into());
    let procs = {
        let mut c = Command::new(tools.join("hf-load"));
        c.args(["procs", "10000", "100"]);
        let held = Held::spawn(c, "ready")?.0;
        let v: Value = serde_json::from_str(&run_ok(
            Command::new(bin).args(["probe", "procs", "--repeat", "3"]),
        )?)?;
        let ps = {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t0 = Instant::now();
                run_ok(Command::new("ps").args(["-eo", "stat"]))?;
                best = best.min(t0.elapsed().as_secs_f64());
            }
            best
        };
        drop(held);
        json!({ "holdfast": v, "ps_eo_stat_s": ps })
    };
    results["procs"] = procs;
    // The keepalive-probe watch: flag 1000 loopback connections, time the callbacks, release.
    st.begin("probe watch".into());
    results["probe_watch"] = serde_json::from_str(&run_ok(Command::new(bin).args([
        "probe",
        "watch",
        "--sockets",
        "1000",
        "--segments",
        "20",
    ]))?)?;
    st.end();
    results["stages"] = json!(st.done);
    // Keep the figures even if printing fails; the previous run's are compared first.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    if let Some(prev) = std::fs::read_to_string(dir.join("results.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    {
        results["compared_with_previous"] = compare(&prev, &results);
    }
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    print_table(&table, &results);
    Ok(results)
}

fn print_table(rows: &[Vec<String>], r: &Value) {
    let header = [
        "sockets",
        "ebpf read",
        "ebpf+own",
        "at-risk",
        "poll read",
        "poll+own",
        "ss -tin",
        "ss -tino",
        "ss -tnp",
        "ss-tin/hf",
        "ss-tnp/hf",
        "at-risk/tino",
        "cpu% e/p",
        "settled e/p",
        "B/flow e/p",
    ];
    let cols = rows.iter().map(Vec::len).chain([header.len()]).max().unwrap_or(0);
    let mut w: Vec<usize> = (0..cols).map(|i| header.get(i).map_or(0, |h| h.len())).collect();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nFull snapshot with tcp_info (seconds, best of 3; owners included in +own), steady-state agent CPU and memory:"
    );
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    let _ = writeln!(
        out,
        "cpu%: from 3 s after every flow is tracked (the first judgement of every flow); settled: from {} s after, with the reads in that window:",
        SETTLE.as_secs()
    );
    for sz in r["sizes"].as_array().into_iter().flatten() {
        for m in ["ebpf", "poll"] {
            let x = &sz[format!("steady_{m}").as_str()]["settled"];
            let _ = writeln!(
                out,
                "  {:>7} sockets {m:4}: {:.2} % over {} s, {} reads ({} complete), {} flows judged",
                sz["sockets"],
                x["cpu_pct"].as_f64().unwrap_or(0.0),
                x["window_s"],
                x["reads"],
                x["complete_reads"],
                x["judged"],
            );
        }
    }
    let _ = writeln!(
        out,
        "B/flow: (median RSS of the settled window, sampled every {} s, - RSS with no flows) / flows; its peak sample:",
        RSS_EVERY.as_secs()
    );
    for sz in r["sizes"].as_array().into_iter().flatten() {
        for m in ["ebpf", "poll"] {
            let x = &sz[format!("steady_{m}").as_str()];
            let _ = writeln!(
                out,
                "  {:>7} sockets {m:4}: {:.0} B/flow ({} KiB), peak {:.0} B/flow ({} KiB), {} samples",
                sz["sockets"],
                x["bytes_per_flow"].as_f64().unwrap_or(0.0),
                x["rss_bytes"].as_u64().unwrap_or(0) / 1024,
                x["peak_bytes_per_flow"].as_f64().unwrap_or(0.0),
                x["peak_rss_bytes"].as_u64().unwrap_or(0) / 1024,
                x["rss_samples"],
            );
        }
    }
    let c = &r["churn"];
    let _ = writeln!(
        out,
        "\nChurn ({} connect/accept/close cycles; medians of {} interleaved rounds, BPF statistics off; ns per run from one more run with them on): bare {:.2}s",
        c["cycles"],
        c["rounds"],
        c["bare_s"].as_f64().unwrap_or(0.0)
    );
    for m in ["ebpf", "poll"] {
        let x = &c[m];
        let _ = writeln!(
            out,
            "  {m:4}: {:.2}s ({:+.1}%), {} events ({:.0}/s), lost {}, {} ns per program run",
            x["seconds"].as_f64().unwrap_or(0.0),
            x["added_pct"].as_f64().unwrap_or(0.0),
            x["events"],
            x["events_per_s"].as_f64().unwrap_or(0.0),
            x["lost"],
            x["ns_per_program_run"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0}"))
        );
    }
    let x = &c["parallel"];
    let _ = writeln!(
        out,
        "  two loops at once: bare {:.2}s ({:.0} connections/s), eBPF {:.2}s ({:+.1}%), {} events, lost {}, {} ns per program run",
        x["bare_s"].as_f64().unwrap_or(0.0),
        x["connections_per_s"].as_f64().unwrap_or(0.0),
        x["ebpf_s"].as_f64().unwrap_or(0.0),
        x["added_pct"].as_f64().unwrap_or(0.0),
        x["events"],
        x["lost"],
        x["ns_per_program_run"]
            .as_f64()
            .map_or("-".into(), |v| format!("{v:.0}"))
    );
    // Per 100k sockets: a row that stays flat as the size grows is linear growth.
    let _ = writeln!(
        out,
        "\nPer 100k sockets (s, and CPU % of one core):\n{:>8}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>11}  {:>11}",
        "sockets", "ebpf+own", "poll+own", "ss -tin", "ss -tnp", "at-risk", "cpu% e/p", "settled e/p"
    );
    for sz in r["sizes"].as_array().into_iter().flatten() {
        let k = sz["sockets"].as_f64().unwrap_or(0.0) / 100_000.0;
        if k <= 0.0 {
            continue;
        }
        let per = |v: &Value| v.as_f64().map_or("-".into(), |v| format!("{:.3}", v / k));
        let _ = writeln!(
            out,
            "{:>8}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>11}  {:>11}",
            sz["sockets"],
            per(&sz["holdfast_ebpf"]["best_total_s"]),
            per(&sz["holdfast_poll"]["best_total_s"]),
            per(&sz["ss_tin_s"]),
            per(&sz["ss_tnp_s"]),
            per(&sz["holdfast_ebpf"]["filtered"]["best_s"]),
            format!(
                "{:.2}/{:.2}",
                sz["steady_ebpf"]["cpu_pct"].as_f64().unwrap_or(0.0) / k,
                sz["steady_poll"]["cpu_pct"].as_f64().unwrap_or(0.0) / k
            ),
            format!(
                "{:.2}/{:.2}",
                sz["steady_ebpf"]["settled"]["cpu_pct"].as_f64().unwrap_or(0.0) / k,
                sz["steady_poll"]["settled"]["cpu_pct"].as_f64().unwrap_or(0.0) / k
            ),
        );
    }
    let _ = writeln!(
        out,
        "\n`holdfast flows --port P` selecting 1000 flows (s; best/median of 5; oldest value shown) vs `ss -tin` with the same filter:"
    );
    for sz in r["sizes"].as_array().into_iter().flatten() {
        for m in ["ebpf", "poll"] {
            let q = &sz[format!("steady_{m}").as_str()]["flows_1k"];
            let f = |k: &str| q[k].as_f64().map_or("-".into(), |v| format!("{v:.3}"));
            let _ = writeln!(
                out,
                "  {:>7} sockets {m:4}: fresh {}/{} ({} ms old), --cached {}/{} ({} ms old), {} rows; ss -tin {} ({})",
                sz["sockets"],
                f("fresh_best_s"),
                f("fresh_median_s"),
                q["fresh_oldest_sample_ms"],
                f("cached_best_s"),
                f("cached_median_s"),
                q["cached_oldest_sample_ms"],
                q["rows"],
                f("ss_tin_port_s"),
                ratio(
                    q["ss_tin_port_s"].as_f64().unwrap_or(0.0),
                    q["fresh_best_s"].as_f64().unwrap_or(0.0)
                ),
            );
        }
    }
    let _ = writeln!(
        out,
        "\nNew long-lived connections at a settled agent (one every {TRICKLE_EVERY_MS} ms, each held; agent CPU over {} s):",
        TRICKLE_WINDOW.as_secs()
    );
    for sz in r["sizes"].as_array().into_iter().flatten() {
        for m in ["ebpf", "poll"] {
            let t = &sz[format!("steady_{m}").as_str()]["trickle"];
            let _ = writeln!(
                out,
                "  {:>7} sockets {m:4}: {:.2} % of a core; {} of {} sockets on the port shown, {} with their owner; {} full owner walks, {} targeted, {} reads",
                sz["sockets"],
                t["cpu_pct"].as_f64().unwrap_or(0.0),
                t["flows"],
                t["sockets"],
                t["with_owner"],
                t["full_walks"],
                t["targeted_walks"],
                t["reads"],
            );
        }
    }
    let z = &r["zombie_latency_ms"];
    let _ = writeln!(
        out,
        "\nZombie exit -> finding (eBPF, min_age 0): median {} ms, max {} ms",
        z["median"], z["max"]
    );
    let p = &r["procs"];
    let _ = writeln!(
        out,
        "/proc zombie scan, {} processes: holdfast {:.3}s vs ps -eo stat {:.3}s ({})",
        p["holdfast"]["processes"],
        p["holdfast"]["best_s"].as_f64().unwrap_or(0.0),
        p["ps_eo_stat_s"].as_f64().unwrap_or(0.0),
        ratio(
            p["ps_eo_stat_s"].as_f64().unwrap_or(0.0),
            p["holdfast"]["best_s"].as_f64().unwrap_or(0.0)
        )
    );
    if let Some(rows) = r["compared_with_previous"].as_array() {
        let bad = rows.iter().filter(|x| x["regression"] == true).count();
        let _ = writeln!(
            out,
            "\nCompared with the previous target/bench/results.json: {} figures, {bad} more than 10 % worse",
            rows.len()
        );
        for x in rows {
            let _ = writeln!(
                out,
                "  {}{}: {:.4} -> {:.4} ({:+.1} %)",
                if x["regression"] == true {
                    "REGRESSION "
                } else {
                    ""
                },
                x["figure"].as_str().unwrap_or(""),
                x["previous"].as_f64().unwrap_or(0.0),
                x["now"].as_f64().unwrap_or(0.0),
                x["change_pct"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(stages) = r["stages"].as_array() {
        let _ = writeln!(out, "\nStages:");
        for s in stages {
            let _ = writeln!(
                out,
                "  {:<45} {:>7.1}s",
                s["stage"].as_str().unwrap_or(""),
                s["seconds"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let w = &r["probe_watch"];
    let _ = writeln!(
        out,
        "Probe watch, {} sockets: select {:.1} ms, release {:.1} ms, {} left flagged; probe_watch {:.0} ns per callback ({:.2} callbacks per segment sent); tcp_probe {:.0} ns per received segment; one core watches {:.1}M sockets sending a segment a second",
        w["sockets"],
        w["select_s"].as_f64().unwrap_or(0.0) * 1e3,
        w["release_s"].as_f64().unwrap_or(0.0) * 1e3,
        w["flagged_after_release"],
        w["ns_per_callback"].as_f64().unwrap_or(0.0),
        w["callbacks_per_segment"].as_f64().unwrap_or(0.0),
        w["answer_ns_per_run"].as_f64().unwrap_or(0.0),
        w["sockets_per_core_at_1_segment_per_s"].as_f64().unwrap_or(0.0) / 1e6
    );
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    for n in [&r["namespaces"], &r["namespaces_own_hash"]] {
        let _ = writeln!(
            out,
            "\n{} namespaces x {} sockets, every table read from inside its namespace, {}:",
            n["spaces"],
            n["sockets_each"],
            n["own_hash_entries"].as_u64().map_or(
                "namespaces sharing the host's TCP hash table (default)".into(),
                |e| format!(
                    "each namespace with a TCP hash table of its own (net.ipv4.tcp_child_ehash_entries={e})"
                )
            )
        );
        for m in ["ebpf", "poll"] {
            let x = &n[m];
            let _ = writeln!(
                out,
                "  {m:4}: discovery {:.1} ms, reads {:.3}s for {} sockets in {} namespaces = {:.0} ns/socket; one namespace of {} sockets: {:.0} ns/socket ({:.2}x)",
                f(&x["best_discovery_s"]) * 1000.0,
                f(&x["best_read_s"]),
                x["sockets"],
                x["namespaces"],
                f(&x["ns_per_socket"]),
                n["one_namespace"]["sockets"],
                f(&n["one_namespace"][format!("{m}_ns_per_socket")]),
                f(&n[format!("{m}_vs_one")]),
            );
        }
        let c = &n["idle_cpu_pct"];
        if !c.is_null() {
            let _ = writeln!(
                out,
                "  agent CPU with 50 empty namespaces: eBPF {:.2}%, poll {:.2}%; with none: eBPF {:.2}%, poll {:.2}%",
                f(&c["ebpf_50_empty"]),
                f(&c["poll_50_empty"]),
                f(&c["ebpf_none"]),
                f(&c["poll_none"])
            );
        }
    }
    let _ = writeln!(
        out,
        "agent RSS with no flows: eBPF {} KiB, poll {} KiB",
        r["agent_rss_empty_bytes"]["ebpf"].as_u64().unwrap_or(0) / 1024,
        r["agent_rss_empty_bytes"]["poll"].as_u64().unwrap_or(0) / 1024
    );
}
