//! Helpers for holdfast's privileged scenario tests: network namespaces, the agent, test peers.
//!
//! Every namespace, agent and peer is torn down on drop, so a failing test leaves nothing behind.
use std::io::{BufRead, BufReader, Write};

use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod users;

/// The holdfast binary under test (xtask sets HOLDFAST_BIN to the release build).
pub fn holdfast_bin() -> PathBuf {
    let p = std::env::var_os("HOLDFAST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/holdfast"));
    assert!(
        p.exists(),
        "{} does not exist: build it with `cargo xtask build` (or run `cargo xtask test`)",
        p.display()
    );
    p
}

/// A helper binary of this crate, built next to the test executables (target/<profile>/NAME).
pub fn helper_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(name);
    assert!(
        p.exists(),
        "{} does not exist: `cargo build -p holdfast-tests` builds it",
        p.display()
    );
    p
}

/// The test peer (src/bin/hf-peer.rs).
pub fn peer_bin() -> PathBuf {
    helper_bin("hf-peer")
}

/// Makes this test process the reaper of orphans below it (PID 1 here does not reap), so that
/// zombies left by a killed test parent can be reaped with [`reap`].
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER failed");
}

/// Reaps these (orphaned, now ours) pids; waits up to 10 s for each to be reparented.
pub fn reap(pids: &[u32]) {
    for &pid in pids {
        let t0 = Instant::now();
        loop {
            // SAFETY: waitpid on a specific pid with WNOHANG; the status is not needed.
            let rc = unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
            let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
            if rc == pid as i32 || gone || t0.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A test parent with broken SIGCHLD handling (src/bin/hf-parent.rs) and its zombie children.
pub struct Parent {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub children: Vec<u32>,
}

impl Parent {
    pub fn spawn(mode: &str, n: usize) -> Self {
        become_subreaper();
        let mut child = Command::new(helper_bin("hf-parent"))
            .args([mode, &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn hf-parent");
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().expect("hf-parent printed nothing").expect("read");
        let children = first
            .strip_prefix("children ")
            .expect("children line")
            .split_whitespace()
            .map(|p| p.parse().expect("pid"))
            .collect();
        assert_eq!(lines.next().expect("ready").expect("read"), "ready");
        Parent {
            child,
            stdin,
            children,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many of its children are still zombies.
    pub fn zombies_left(&self) -> usize {
        self.children
            .iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
                    .unwrap_or(false)
            })
            .count()
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its zombies are now orphans of this subreaper: reap them so the host does not drift.
        reap(&self.children);
    }
}

/// The scenario tests create namespaces and load eBPF: they need root.
pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().next().map(String::from))
    });
    assert_eq!(
        uid.as_deref(),
        Some("0"),
        "scenario tests need root: run `sudo cargo xtask test`"
    );
}

/// Polls `f` until it returns Some, or fails after `timeout` with `what` and the last value seen.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let t0 = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if t0.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) -> Result<String, String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&o.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A network namespace with loopback up, deleted on drop; or the test's own namespace
/// ([`Netns::host`]), where an installed agent runs, left alone on drop.
pub struct Netns {
    pub name: String,
    /// The test's own namespace (not created, not deleted).
    pub host: bool,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "hf-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name]).expect("ip netns add");
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]).expect("lo up");
        Netns { name, host: false }
    }

    /// The namespace the test itself runs in: the host's, as far as the agent can tell.
    pub fn host() -> Self {
        let name = format!(
            "hf-host-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        Netns { name, host: true }
    }

    /// The namespace's inode (what the agent calls `net:[inode]` when it has no other name).
    pub fn inode(&self) -> u64 {
        let path = if self.host {
            "/proc/self/ns/net".to_string()
        } else {
            format!("/run/netns/{}", self.name)
        };
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).expect("namespace file"))
    }

    /// A command that runs inside the namespace. `nsenter` joins only the network namespace (unlike
    /// `ip netns exec`, which also remounts /sys and hides the cgroup mounts).
    pub fn cmd(&self, program: &std::path::Path) -> Command {
        if self.host {
            return Command::new(program);
        }
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `ip`/`sysctl`/`nft` style commands in the namespace; panics with the error.
    pub fn run(&self, args: &[&str]) {
        assert!(!self.host, "tests never change the host's network");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        let o = c.output().expect("spawn");
        assert!(
            o.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Three namespaces client – router – server. The router masquerades the client's network,
/// forgets established flows after `ct_timeout_s` idle, and drops packets of flows it does not
/// know (`ct state invalid drop`, with `nf_conntrack_tcp_loose=0` so that a mid-stream packet is
/// not adopted as a new flow): an evicted connection really breaks, silently, as behind
/// GCP Cloud NAT or an Azure load balancer.
pub struct NatBed {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
}

pub const NAT_CLIENT_NET: &str = "10.77.1.0/24";
pub const NAT_SERVER_NET: &str = "10.77.2.0/24";
pub const NAT_SERVER_IP: &str = "10.77.2.2";

impl NatBed {
    pub fn new(ct_timeout_s: u32) -> Self {
        Self::build(ct_timeout_s, false)
    }

    /// The same bed, but the router answers packets of flows it forgot with a TCP reset (as
    /// some firewalls and load balancers do) instead of dropping them.
    pub fn rejecting(ct_timeout_s: u32) -> Self {
        Self::build(ct_timeout_s, true)
    }

    fn build(ct_timeout_s: u32, reset: bool) -> Self {
        let (client, router, server) = (Netns::new("nc"), Netns::new("nr"), Netns::new("ns"));
        sh(&[
            "ip",
            "-n",
            &client.name,
            "link",
            "add",
            "c0",
            "type",
            "veth",
            "peer",
            "name",
            "rc0",
            "netns",
            &router.name,
        ])
        .expect("veth c");
        sh(&[
            "ip",
            "-n",
            &server.name,
            "link",
            "add",
            "s0",
            "type",
            "veth",
            "peer",
            "name",
            "rs0",
            "netns",
            &router.name,
        ])
        .expect("veth s");
        client.run(&["ip", "addr", "add", "10.77.1.2/24", "dev", "c0"]);
        client.run(&["ip", "link", "set", "c0", "up"]);
        client.run(&["ip", "route", "add", "default", "via", "10.77.1.1"]);
        server.run(&["ip", "addr", "add", "10.77.2.2/24", "dev", "s0"]);
        server.run(&["ip", "link", "set", "s0", "up"]);
        server.run(&["ip", "route", "add", "default", "via", "10.77.2.1"]);
        router.run(&["ip", "addr", "add", "10.77.1.1/24", "dev", "rc0"]);
        router.run(&["ip", "addr", "add", "10.77.2.1/24", "dev", "rs0"]);
        router.run(&["ip", "link", "set", "rc0", "up"]);
        router.run(&["ip", "link", "set", "rs0", "up"]);
        router.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        router.run(&[
            "sysctl",
            "-qw",
            &format!("net.netfilter.nf_conntrack_tcp_timeout_established={ct_timeout_s}"),
        ]);
        router.run(&["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"]);
        let verdict = if reset { "reject with tcp reset" } else { "drop" };
        let rules = format!(
            "table ip hfnat {{\n chain postrouting {{ type nat hook postrouting priority 100; oifname \"rs0\" masquerade; }}\n}}\n\
             table inet hffilter {{\n chain forward {{ type filter hook forward priority 0; ct state invalid {verdict}; }}\n}}\n"
        );
        let mut nft = Command::new("ip");
        nft.args(["netns", "exec", &router.name, "nft", "-f", "-"])
            .stdin(Stdio::piped());
        let mut child = nft.spawn().expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("rules");
        assert!(child.wait().expect("nft").success(), "nft rules failed");
        NatBed {
            client,
            router,
            server,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.host {
            return;
        }
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A test peer process (see src/bin/hf-peer.rs) with its first output line.
pub struct Peer {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    pub first: String,
}

impl Peer {
    pub fn spawn(ns: &Netns, mode: &str, addr: &str) -> Self {
        Self::spawn_with(ns, &[mode, addr], None)
    }

    /// Spawns with extra arguments; with `cgroup`, the peer joins that cgroup v2 directory first.
    pub fn spawn_with(ns: &Netns, args: &[&str], cgroup: Option<&std::path::Path>) -> Self {
        Self::spawn_bin(ns, &peer_bin(), args, cgroup)
    }

    /// Spawns another helper binary of this crate (`hf-leaky`) with the same plumbing.
    pub fn spawn_bin(
        ns: &Netns,
        bin: &std::path::Path,
        args: &[&str],
        cgroup: Option<&std::path::Path>,
    ) -> Self {
        let mut cmd = match cgroup {
            None => ns.cmd(bin),
            Some(_) if ns.host => panic!("cgroup peers run in a test namespace"),
            Some(dir) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0/cgroup.procs\" && ns=\"$1\" && shift && exec nsenter --net=/run/netns/\"$ns\" -- \"$@\"")
                    .arg(dir)
                    .arg(&ns.name)
                    .arg(bin);
                c
            }
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn hf-peer");
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().expect("hf-peer printed nothing").expect("read");
        Peer {
            child,
            stdin,
            lines,
            first,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address printed after the verb (`listening ADDR` / `connected ADDR`).
    pub fn addr(&self) -> String {
        self.first
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// Sends a command line and returns the peer's answer line.
    pub fn tell(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to peer");
        stdin.flush().expect("flush");
        self.lines
            .next()
            .map(|l| l.unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `holdfast agent` inside a namespace.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub stderr_path: PathBuf,
}

impl Agent {
    /// Starts an agent in `ns` with `mode` and extra config TOML, and waits until it answers.
    pub fn start(ns: &Netns, mode: &str, extra_config: &str) -> Self {
        Self::start_env(ns, mode, "", extra_config, &[])
    }

    /// As `start`, with extra `[agent]` lines and environment variables for the agent.
    pub fn start_env(
        ns: &Netns,
        mode: &str,
        agent_lines: &str,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-agent", ns.name));
        std::fs::create_dir_all(&dir).expect("agent dir");
        // The socket's directory is the agent's to create (it changes no directory it did not
        // make): a leftover of an earlier run goes first.
        let run_dir = dir.join("run");
        let _ = std::fs::remove_dir_all(&run_dir);
        let socket = run_dir.join("holdfast.sock");
        let config = dir.join("holdfast.toml");
        // Learnt paths stay with the test (never in the host's /var/lib/holdfast).
        let learning = if extra_config.contains("[learning]") {
            String::new()
        } else {
            format!(
                "\n[learning]\nstate_file = \"{}\"\n",
                dir.join("learned-paths.json").display()
            )
        };
        // Quick reads unless the test sets its own. A read of a nearly empty namespace walks
        // the kernel's whole TCP hash table (about 3 ms per address family on these machines),
        // so at the default share of a core (0.5 % in poll mode) reads would be about 1.4 s apart
        // per namespace: the tests give reads 20 %, as an operator who wants them fresh can.
        let snapshot = if extra_config.contains("[snapshot]") {
            ""
        } else {
            "\n[snapshot]\npoll_interval = \"200ms\"\nebpf_interval = \"2s\"\nread_cpu_percent = 20\n"
        };
        std::fs::write(
            &config,
            format!("[agent]\nmode = \"{mode}\"\n{agent_lines}{snapshot}{extra_config}{learning}"),
        )
        .expect("write config");
        let stderr_path = dir.join("agent.stderr");
        let err = std::fs::File::create(&stderr_path).expect("stderr file");
        // The agent runs with the capabilities the shipped unit grants, not as full root.
        let child = ns
            .cmd(std::path::Path::new("setpriv"))
            .arg(format!("--bounding-set=-all,{}", unit_capabilities()))
            .arg("--")
            .arg(holdfast_bin())
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn agent");
        let mut agent = Agent {
            child,
            socket,
            config,
            stderr_path,
        };
        wait_for(Duration::from_secs(20), "the agent to answer `status`", || {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("agent exited early ({st}): {}", agent.stderr());
            }
            agent.json(&["status", "--json"])
        });
        agent
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs the CLI against this agent: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let o = Command::new(holdfast_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run holdfast");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Runs the CLI and parses its JSON output.
    pub fn json(&self, args: &[&str]) -> Result<Value, String> {
        let (code, out, err) = self.cli(args);
        if code != 0 {
            return Err(format!("exit {code}: {err}"));
        }
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }

    /// Every finding of `kind`, active or resolved (empty if the agent does not answer).
    pub fn findings(&self, kind: &str) -> Vec<Value> {
        self.json(&["findings", "--json", "--all", "--kind", kind])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Findings of `kind` (open and resolved) about the flow with local address `local`.
    pub fn flow_findings(&self, kind: &str, local: &str) -> Vec<Value> {
        self.findings(kind)
            .into_iter()
            .filter(|f| about_flow(f, local))
            .collect()
    }

    /// The flow with local address `local`, as `flows --json` lists it.
    pub fn flow_at(&self, local: &str) -> Option<Value> {
        self.flows().into_iter().find(|f| f["local"] == local)
    }

    pub fn status(&self) -> Value {
        self.json(&["status", "--json"]).expect("status")
    }

    /// How far apart the agent's periodic reads are, once it has made one: the configured
    /// interval, or more where reads are paced to their cost (`snapshot_paced_ms`, within the
    /// share of a core `snapshot.read_cpu_percent` gives them). In poll mode a socket opened now
    /// is in the table within one spacing.
    pub fn read_spacing(&self) -> Duration {
        wait_for(Duration::from_secs(10), "a first read", || {
            let st = self.status();
            if st["snapshots"].as_u64().unwrap_or(0) >= 1 {
                Ok(())
            } else {
                Err(st.to_string())
            }
        });
        let st = self.status();
        let ms = |k: &str| st[k].as_u64().unwrap_or(0);
        Duration::from_millis(ms("snapshot_paced_ms").max(ms("snapshot_interval_ms")))
    }

    /// How many evaluation rounds of `kind` (zombies, flows, ledger) the agent has completed.
    pub fn rounds(&self, kind: &str) -> u64 {
        self.status()["rounds"][kind].as_u64().unwrap_or(0)
    }

    /// Waits until the agent has completed `n` more rounds of `kind` than now: the positive signal
    /// a negative check waits for ("nothing happened" means something was looked at).
    pub fn wait_rounds(&self, kind: &str, n: u64) {
        let start = self.rounds(kind);
        wait_for(
            Duration::from_secs(30),
            &format!("{n} more {kind} rounds"),
            || {
                let now = self.rounds(kind);
                if now >= start + n {
                    Ok(())
                } else {
                    Err(format!("{} of {n}", now - start))
                }
            },
        );
    }

    pub fn flows(&self) -> Vec<Value> {
        self.json(&["flows", "--json"])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }
}

/// The capabilities of packaging/holdfast.service (its CapabilityBoundingSet), as setpriv's
/// list (`+bpf,+perfmon,...`).
pub fn unit_capabilities() -> String {
    let unit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/holdfast.service");
    let text = std::fs::read_to_string(&unit).expect("packaging/holdfast.service");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit names its capabilities");
    line.split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's open descriptors (the fewest of three looks: a CLI connection that is closing
    /// may still be counted once).
    pub fn fd_count(&self) -> usize {
        (0..3)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .min()
            .unwrap_or(0)
    }

    /// Entries in each BPF map the agent holds (by map name), counted with the bpf syscall.
    pub fn map_entries(&self) -> std::collections::BTreeMap<String, usize> {
        bpf_map_entries(self.pid())
    }
}

/// Entries in each BPF map process `pid` holds a descriptor of, by map name: the maps are found
/// through /proc/PID/fdinfo (`map_id:`), opened by id and walked with BPF_MAP_GET_NEXT_KEY.
pub fn bpf_map_entries(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    let mut ids = std::collections::BTreeSet::new();
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.insert(id);
        }
    }
    for id in ids {
        if let Some((name, n)) = bpf::count_entries(id) {
            out.insert(name, n);
        }
    }
    out
}

mod bpf {
    //! The three bpf() commands the map count needs, by hand (the tests do not link aya).
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
        // SAFETY: attr is a zero-initialised 128-byte union as the kernel expects; pointers in it
        // refer to live buffers of the caller.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128usize) }
    }

    /// (name, entries) of map `id`; None when it cannot be opened.
    pub fn count_entries(id: u32) -> Option<(String, usize)> {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            return None;
        }
        let fd = fd as i32;
        // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16].
        let mut info = [0u8; 128];
        let mut attr = [0u64; 16];
        attr[0] = fd as u64 | ((info.len() as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        let name = if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) == 0 {
            let raw = &info[24..40];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(16);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        } else {
            format!("map{id}")
        };
        let key_size = u32::from_ne_bytes(info[8..12].try_into().expect("4 bytes")) as usize;
        let map_type = u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes"));
        // Only hash-like maps have a meaningful entry count (arrays are always full, ring buffers
        // have no keys): hash 1, percpu hash 5, lru hash 9, lru percpu hash 10.
        let n = if matches!(map_type, 1 | 5 | 9 | 10) && key_size > 0 && key_size <= 64 {
            let mut key = vec![0u8; key_size];
            let mut next = vec![0u8; key_size];
            let mut n = 0usize;
            let mut first = true;
            loop {
                let mut attr = [0u64; 16];
                attr[0] = fd as u64;
                attr[1] = if first { 0 } else { key.as_ptr() as u64 };
                attr[2] = next.as_mut_ptr() as u64;
                if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) != 0 {
                    break;
                }
                first = false;
                n += 1;
                std::mem::swap(&mut key, &mut next);
            }
            n
        } else {
            0
        };
        // SAFETY: closing the descriptor this function opened.
        unsafe { libc::close(fd) };
        Some((name, n))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first so the agent removes its socket; kill if it does not stop.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Failed or not, the test leaves no socket directory, config or log behind.
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Finds the flow with this local and remote address.
pub fn find_flow<'a>(flows: &'a [Value], local: &str, remote: &str) -> Option<&'a Value> {
    flows
        .iter()
        .find(|f| f["local"] == local && f["remote"] == remote)
}

/// Turns `fn name(mode: &str)` into two tests, `name::poll` and `name::ebpf`.
#[macro_export]
macro_rules! both_modes {
    ($name:ident) => {
        mod $name {
            #[test]
            fn poll() {
                super::$name("poll");
            }
            #[test]
            fn ebpf() {
                super::$name("ebpf");
            }
        }
    };
}

/// Records a skipped test (allowed only when the kernel lacks a feature): printed, and appended
/// to the file named by HOLDFAST_SKIPS so that `cargo xtask test` counts and names it.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIP: {test}: {reason}");
    if let Some(path) = std::env::var_os("HOLDFAST_SKIPS")
        && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(f, "{test}: {reason}");
    }
}

/// An action's outcome sentence.
pub fn outcome(a: &Value) -> &str {
    a["outcome"]["text"].as_str().unwrap_or("")
}

/// Whether a finding is about the flow with this local (or remote) address.
pub fn about_flow(f: &Value, addr: &str) -> bool {
    f["subject"]["local"] == addr || f["subject"]["remote"] == addr
}

/// Whether a finding is about this process (its subject or its flow's owner).
pub fn about_pid(f: &Value, pid: u32) -> bool {
    f["subject"]["pid"] == pid || f["subject"]["owner"]["pid"] == pid
}

/// A cgroup v2 directory for a test, removed on drop (with its processes moved out first).
pub struct CgroupDir {
    pub name: String,
    pub path: PathBuf,
}

impl CgroupDir {
    /// None when the kernel has no cgroup2 mount (the caller skips, saying so).
    pub fn new(tag: &str) -> Option<Self> {
        let mount = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|mi| {
                mi.lines()
                    .find(|l| l.contains(" - cgroup2 "))
                    .and_then(|l| l.split_whitespace().nth(4).map(PathBuf::from))
            })?;
        let name = format!("holdfast-test-{}-{tag}", std::process::id());
        let path = mount.join(&name);
        std::fs::create_dir_all(&path).expect("create test cgroup");
        Some(CgroupDir { name, path })
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        // Processes left inside (a failed test) go back to the parent cgroup before rmdir.
        if let (Ok(procs), Some(parent)) = (
            std::fs::read_to_string(self.path.join("cgroup.procs")),
            self.path.parent(),
        ) {
            for p in procs.lines() {
                let _ = std::fs::write(parent.join("cgroup.procs"), p);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
