//! Sessions held by descriptors, and the restart remedy (issue 11). The servers here leak the way
//! real ones do: `hf-leaky deaf` never touches a session again after the peer's FIN (not even to
//! notice an error), so only closing the descriptor or a restart frees its slot. Outcomes are
//! judged from the service's side: is a new client served, did its process change.
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use holdfast_tests::{
    Agent, CgroupDir, Netns, Peer, about_pid, both_modes, helper_bin, outcome, require_root, skip, wait_for,
};
use serde_json::Value;

const LIMIT: usize = 3;
const PORT: u16 = 7100;

fn findings(agent: &Agent, kind: &str) -> Vec<Value> {
    agent.findings(kind)
}

/// A client that connects, round-trips and leaves; true if the server served it.
fn visit(ns: &Netns, server: &str) -> bool {
    let mut c = Peer::spawn(ns, "connect", server);
    let served = c.tell("send") == "sent true";
    assert_eq!(c.tell("close"), "closed");
    served
}

fn ledger_row(agent: &Agent, service: &str) -> Result<Value, String> {
    agent
        .json(&["ledger", "--json"])?
        .as_array()
        .and_then(|v| v.iter().find(|r| r["service"] == service))
        .cloned()
        .ok_or_else(|| "no ledger row yet".to_string())
}

/// The restart actions on every session-budget finding of the service.
fn restarts(agent: &Agent) -> Vec<Value> {
    findings(agent, "session-budget")
        .into_iter()
        .flat_map(|f| f["actions"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["action"] == "restart")
        .collect()
}

/// The first restart verified from the service's side (waits up to 30 s).
fn restart_verified(agent: &Agent) -> Value {
    wait_for(Duration::from_secs(30), "the restart verified", || {
        let r = restarts(agent);
        match r.iter().find(|a| a["outcome"]["status"] == "succeeded") {
            Some(a) => Ok(a.clone()),
            None => Err(format!("{r:?}")),
        }
    })
}

/// The pid of the process whose command line matches `pattern` (pgrep -f).
fn pid_of(pattern: &str) -> Option<u32> {
    let o = Command::new("pgrep").args(["-f", pattern]).output().ok()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// A deaf server under a supervisor loop (as a service under systemd with Restart=always): when
/// its process is killed, a new one starts on the same address. Stopped with its group on drop.
struct Supervised {
    child: std::process::Child,
    pattern: String,
}

impl Supervised {
    fn start(ns: &Netns) -> Self {
        let bin = helper_bin("hf-leaky");
        let child = Command::new("sh")
            .arg("-c")
            .arg("while :; do nsenter --net=/run/netns/\"$0\" -- \"$@\"; sleep 0.2; done")
            .arg(&ns.name)
            .arg(&bin)
            .arg(format!("127.0.0.1:{PORT}"))
            .arg(LIMIT.to_string())
            .args(["deaf", "detached"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("supervisor");
        let s = Supervised {
            child,
            pattern: format!("^{} 127.0.0.1:{PORT}", bin.display()),
        };
        wait_for(Duration::from_secs(5), "the supervised server", || {
            s.pid().ok_or_else(|| "not yet".to_string())
        });
        s
    }

    /// The server's pid (the supervisor's child after nsenter exec'd it).
    fn pid(&self) -> Option<u32> {
        pid_of(&self.pattern)
    }

    /// The restart command an operator would configure: stop the server process (the supervisor
    /// starts a new one). argv, no shell.
    fn restart_command(&self) -> String {
        format!("[\"/usr/bin/pkill\", \"-f\", \"{}\"]", self.pattern)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the supervisor's own process group (it was made its leader).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A server that never touches its leaked sessions: aborting them (SOCK_DESTROY) does not free
/// its slots, and holdfast says so: the closes are "ineffective", `dead-socket-held` names the
/// descriptors, the ledger counts them, and nothing claims the service is back within budget.
fn a_deaf_server_keeps_its_slots_and_holdfast_says_so(mode: &str) {
    require_root();
    let ns = Netns::new("deaf");
    let cfg = format!(
        "[leaks]\nclose_wait_after = \"2s\"\nquiet_for = \"1s\"\nclose = \"enforce\"\nrelease_grace = \"2s\"\nheld_after = \"3s\"\n\n[ledger]\nwarn_ratio = 0.75\n\n[[services]]\nname = \"deaf\"\ncomm = \"hf-leaky\"\nmax_sessions = {LIMIT}\n"
    );
    let agent = Agent::start(&ns, mode, &cfg);
    let server = Peer::spawn_bin(
        &ns,
        &helper_bin("hf-leaky"),
        &["127.0.0.1:0", &LIMIT.to_string(), "deaf"],
        None,
    );
    let addr = server.addr();
    for _ in 0..LIMIT {
        assert!(visit(&ns, &addr), "served while below the limit");
    }
    assert!(!visit(&ns, &addr), "at its limit, the server refuses");
    let pid = server.pid();
    // Every close is judged from the owner's side: aborted, but the descriptor is still held.
    let closes = wait_for(Duration::from_secs(20), "closes judged ineffective", || {
        let closes: Vec<Value> = findings(&agent, "close-wait-leak")
            .iter()
            .filter(|f| about_pid(f, pid))
            .flat_map(|f| f["actions"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["outcome"]["status"] == "ineffective")
            .collect();
        if closes.len() >= LIMIT {
            Ok(closes)
        } else {
            Err(format!("{closes:?}"))
        }
    });
    assert!(
        closes
            .iter()
            .all(|a| outcome(a).contains(&format!("pid {pid} still holds fd"))
                && outcome(a).contains("slot is not free")),
        "{closes:?}"
    );
    // The descriptors to the dead sockets, per process.
    let held = wait_for(Duration::from_secs(20), "dead-socket-held", || {
        findings(&agent, "dead-socket-held")
            .into_iter()
            .find(|f| about_pid(f, pid) && f["active"] == true && f["details"]["count"] == LIMIT)
            .ok_or_else(|| format!("{:?}", findings(&agent, "dead-socket-held")))
    });
    assert!(
        held["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("holds {LIMIT} descriptor(s)")),
        "{held}"
    );
    assert_eq!(held["subject"]["netns"], ns.name.as_str(), "{held}");
    let row = wait_for(Duration::from_secs(10), "the ledger's held count", || {
        let r = ledger_row(&agent, "deaf")?;
        if r["held"] == LIMIT {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    });
    assert_eq!(
        row["live"], LIMIT,
        "held descriptors are sessions the service pays for: {row}"
    );
    let (code, out, _) = agent.cli(&["ledger"]);
    assert_eq!(code, 0);
    assert!(out.contains("HELD"), "{out}");
    let (code, out, _) = agent.cli(&["explain", &pid.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("dead sockets held: {LIMIT}")), "{out}");
    // From the service's side: still full.
    assert!(!visit(&ns, &addr), "the slots are still taken");
    agent.wait_rounds("ledger", 3);
    for f in findings(&agent, "session-budget") {
        assert_ne!(f["resolution"], "back within budget", "{f}");
    }
    assert!(
        findings(&agent, "session-budget")
            .iter()
            .any(|f| f["active"] == true),
        "the budget stays exhausted"
    );
}
both_modes!(a_deaf_server_keeps_its_slots_and_holdfast_says_so);

/// The service's configuration for the restart tests: leaks are not closed; the budget is 3.
fn restart_config(restart: &str, how: &str) -> String {
    format!(
        "[leaks]\nclose_wait_after = \"2s\"\nclose = \"off\"\n\n[ledger]\nwarn_ratio = 0.75\n\n[[services]]\nname = \"leaky\"\ncomm = \"hf-leaky\"\nmax_sessions = {LIMIT}\nrestart = \"{restart}\"\n{how}\n"
    )
}

/// A supervised deaf server in a new namespace and an agent whose policy restarts it with
/// `restart_command` in `restart` mode: (namespace, server, agent, address, first pid).
fn supervised_with_restart(mode: &str, tag: &str, restart: &str) -> (Netns, Supervised, Agent, String, u32) {
    let ns = Netns::new(tag);
    let server = Supervised::start(&ns);
    let cfg = restart_config(
        restart,
        &format!("restart_command = {}", server.restart_command()),
    );
    let agent = Agent::start(&ns, mode, &cfg);
    let first = server.pid().expect("server");
    (ns, server, agent, format!("127.0.0.1:{PORT}"), first)
}

/// A leaking service with a restart policy (`restart_command`): restarted once, only when its
/// live sessions reach the threshold (0), after which new clients are served; not again within
/// `restart_min_interval` although it leaks again.
fn a_leaking_service_is_restarted_at_its_quiet_moment(mode: &str) {
    require_root();
    let (ns, server, agent, addr, first) = supervised_with_restart(mode, "rst", "enforce");
    for _ in 0..LIMIT - 1 {
        assert!(visit(&ns, &addr));
    }
    // One user stays connected: the service is at its limit but not quiet.
    let mut user = Peer::spawn(&ns, "connect", &addr);
    assert_eq!(user.tell("send"), "sent true");
    let row = wait_for(
        Duration::from_secs(15),
        "the restart waiting for a quiet moment",
        || {
            let r = ledger_row(&agent, "leaky")?;
            if r["restart"]
                .as_str()
                .is_some_and(|s| s.starts_with("waiting for a quiet moment: 1 live"))
            {
                Ok(r)
            } else {
                Err(r.to_string())
            }
        },
    );
    assert_eq!(row["live"], LIMIT, "{row}");
    agent.wait_rounds("ledger", 3);
    assert_eq!(server.pid(), Some(first), "not restarted under a live session");
    assert!(restarts(&agent).is_empty());
    // The user leaves (the deaf server leaks that session too): quiet, restart.
    assert_eq!(user.tell("close"), "closed");
    let done = restart_verified(&agent);
    assert!(
        outcome(&done).contains(&format!("pids [{first}] replaced by")),
        "{done}"
    );
    assert_eq!(done["before"]["live"], LIMIT, "{done}");
    let second = server.pid().expect("restarted server");
    assert_ne!(second, first);
    assert!(visit(&ns, &addr), "a new client is served after the restart");
    // It leaks again to its limit: no second restart within the interval.
    for _ in 0..LIMIT - 1 {
        assert!(visit(&ns, &addr));
    }
    wait_for(Duration::from_secs(15), "the interval named", || {
        let r = ledger_row(&agent, "leaky")?;
        if r["restart"].as_str().is_some_and(|s| s.starts_with("not before")) {
            Ok(())
        } else {
            Err(r.to_string())
        }
    });
    agent.wait_rounds("ledger", 3);
    assert_eq!(restarts(&agent).len(), 1, "{:?}", restarts(&agent));
    assert_eq!(server.pid(), Some(second), "no second restart");
}
both_modes!(a_leaking_service_is_restarted_at_its_quiet_moment);

/// A restart command that leaves a child behind in its group (`sleep &`, which also keeps the
/// command's stderr open) neither holds the restart up nor leaves the child running: the restart
/// is verified as soon as the service is back, the outcome names the child it killed, and no such
/// process is left. The executor is the same in both modes, so this runs in poll mode only.
#[test]
fn a_restart_command_cannot_leave_children_behind() {
    require_root();
    let ns = Netns::new("rstkid");
    let server = Supervised::start(&ns);
    let cmd = format!(
        "[\"/bin/sh\", \"-c\", \"/usr/bin/pkill -f '{}'; sleep 171 & exit 0\"]",
        server.pattern
    );
    let agent = Agent::start(
        &ns,
        "poll",
        &restart_config("enforce", &format!("restart_command = {cmd}")),
    );
    let first = server.pid().expect("server");
    let addr = format!("127.0.0.1:{PORT}");
    for _ in 0..LIMIT {
        assert!(visit(&ns, &addr));
    }
    // Verified within 30 s: the child's 171 s did not hold it up.
    let done = restart_verified(&agent);
    assert!(
        outcome(&done).contains("left 1 process(es) behind in its group"),
        "{done}"
    );
    assert!(
        pid_of("^sleep 171$").is_none(),
        "the child was killed with its group"
    );
    assert_ne!(server.pid(), Some(first));
    assert!(visit(&ns, &addr), "a new client is served after the restart");
}

/// Dry-run plans the restart (once) and does nothing.
fn a_dry_run_restart_plans_and_does_nothing(mode: &str) {
    require_root();
    let (ns, server, agent, addr, first) = supervised_with_restart(mode, "rstdry", "dry-run");
    for _ in 0..LIMIT {
        assert!(visit(&ns, &addr));
    }
    let planned = wait_for(Duration::from_secs(20), "the planned restart", || {
        let r = restarts(&agent);
        r.first().cloned().ok_or_else(|| "none yet".to_string())
    });
    assert_eq!(planned["mode"], "dry-run");
    assert_eq!(planned["outcome"]["status"], "planned");
    assert!(
        outcome(&planned).starts_with("planned: restart via `/usr/bin/pkill"),
        "{planned}"
    );
    agent.wait_rounds("ledger", 4);
    assert_eq!(restarts(&agent).len(), 1, "planned once");
    assert_eq!(server.pid(), Some(first), "nothing was restarted");
    assert!(!visit(&ns, &addr), "still full");
}
both_modes!(a_dry_run_restart_plans_and_does_nothing);

/// A test system bus (dbus-daemon from Debian) on a private socket, stopped on drop.
struct Bus {
    child: std::process::Child,
    dir: std::path::PathBuf,
    pub address: String,
}

impl Bus {
    fn start(tag: &str) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("hf-dbus-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let socket = dir.join("bus");
        let conf = dir.join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .ok()?;
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let b = Bus {
            child,
            dir,
            address: format!("unix:path={}", socket.display()),
        };
        wait_for(Duration::from_secs(5), "the bus socket", || {
            socket.exists().then_some(()).ok_or_else(|| "not yet".to_string())
        });
        Some(b)
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The D-Bus path: the service has a systemd unit, so holdfast calls RestartUnit on the system
/// bus (here a real dbus-daemon with a stand-in implementing systemd's Manager.RestartUnit,
/// since systemd cannot run as PID 1 on the test machines). The unit's process is replaced and
/// new clients are served.
fn a_unit_is_restarted_over_dbus(mode: &str) {
    require_root();
    let Some(cg) = CgroupDir::new(&format!("dbus-{mode}")) else {
        skip(
            "a_unit_is_restarted_over_dbus",
            "this kernel has no cgroup2 mount",
        );
        return;
    };
    let bus = Bus::start(mode).expect("dbus-daemon (cargo xtask setup installs it)");
    let ns = Netns::new("dbus");
    // The unit's cgroup, named as systemd names it: the agent reads the unit from the path.
    let unit_dir = cg.path.join("leaky.service");
    std::fs::create_dir_all(&unit_dir).expect("unit cgroup");
    let systemd = Peer::spawn_bin(
        &Netns::host(),
        &helper_bin("hf-systemd"),
        &[
            &bus.address,
            "leaky.service",
            unit_dir.to_str().unwrap(),
            "nsenter",
            &format!("--net=/run/netns/{}", ns.name),
            "--",
            helper_bin("hf-leaky").to_str().unwrap(),
            &format!("127.0.0.1:{PORT}"),
            &LIMIT.to_string(),
            "deaf",
            "detached",
        ],
        None,
    );
    let first: u32 = systemd
        .first
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ready PID");
    let cfg = restart_config("enforce", "unit = \"leaky.service\"").replace("comm = \"hf-leaky\"\n", "");
    let agent = Agent::start_env(&ns, mode, "", &cfg, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)]);
    let addr = format!("127.0.0.1:{PORT}");
    wait_for(Duration::from_secs(5), "the unit's server", || {
        visit(&ns, &addr)
            .then_some(())
            .ok_or_else(|| "not serving yet".to_string())
    });
    for _ in 0..LIMIT - 1 {
        assert!(visit(&ns, &addr));
    }
    assert!(!visit(&ns, &addr), "at its limit");
    let done = restart_verified(&agent);
    assert!(
        outcome(&done).contains("RestartUnit(leaky.service) over D-Bus"),
        "{done}"
    );
    // From the service's side: its process was replaced, and a new client is served.
    let pattern = format!("^{} 127.0.0.1:{PORT}", helper_bin("hf-leaky").display());
    let now = wait_for(Duration::from_secs(5), "the unit's new process", || {
        pid_of(&pattern)
            .filter(|p| *p != first)
            .ok_or_else(|| "not yet".to_string())
    });
    assert_ne!(now, first);
    assert!(visit(&ns, &addr), "a new client is served after the restart");
    drop(systemd);
    let _ = std::fs::remove_dir(&unit_dir);
}
both_modes!(a_unit_is_restarted_over_dbus);
