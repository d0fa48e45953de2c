//! Hostile clients, careless operators and storms (issue 10): bounded cost per client, no crash,
//! no spoofing, memory that comes back. Adversaries are real processes under their own uids.
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast_tests::users::{Group, as_user, held_as, rss_kib};
use holdfast_tests::{Agent, Netns, Peer, both_modes, helper_bin, holdfast_bin, require_root, wait_for};

/// One `status` round trip as root over the socket (no CLI process in the measurement). Fails if
/// there is no answer within `limit`: a hang, not a slow machine.
fn status_latency(agent: &Agent, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .expect("status answered in time");
    let took = t0.elapsed();
    assert!(reply.starts_with("{\"ok\":true"), "{reply}");
    took
}

/// A read-group member opens 2000 idle connections and 10 `flows` requests it never reads,
/// against an agent with 50k flows: root's `status` keeps answering and the agent's memory stays
/// bounded; the hostile client gets clear refusals past its share.
fn hostile_reader_cannot_starve_the_agent(mode: &str) {
    require_root();
    let group = Group::new("rd");
    let ns = Netns::new("hostile");
    let agent = Agent::start_env(&ns, mode, &format!("read_group = \"{}\"", group.name), "", &[]);
    // 25 000 loopback connections: 50 000 sockets (three load processes: RLIMIT_NOFILE).
    let mut loads = Vec::new();
    for i in 0..3 {
        let addr = format!("127.0.0.1:{}", 7100 + i);
        let n = if i < 2 { "8500" } else { "8000" };
        loads.push(Peer::spawn_bin(
            &ns,
            &helper_bin("hf-load"),
            &["conns", &addr, n],
            None,
        ));
    }
    wait_for(Duration::from_secs(90), "50k flows tracked", || {
        let n = agent.status()["flows"].as_u64().unwrap_or(0);
        if n >= 50_000 {
            Ok(())
        } else {
            Err(format!("{n} flows"))
        }
    });
    let rss_before = rss_kib(agent.child.id());
    let socket = agent.socket.to_str().unwrap().to_string();
    let idle = held_as(4242, group.gid, &["ipc-idle", &socket, "2000"]);
    let open: usize = idle.first.trim().strip_prefix("ready ").unwrap().parse().unwrap();
    let readers = held_as(4243, group.gid, &["ipc-flows", &socket, "10"]);
    assert_eq!(readers.first.trim(), "ready");
    let mut took: Vec<Duration> = (0..50)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            status_latency(&agent, Duration::from_secs(2))
        })
        .collect();
    took.sort();
    let (median, worst) = (took[took.len() / 2], took[took.len() - 1]);
    let rss_during = rss_kib(agent.child.id());
    let st = agent.status();
    println!(
        "idle connections kept open: {open} of 2000; status median {median:?}, worst {worst:?} (slowest agent step {} ms: {}); RSS {rss_before} -> {rss_during} KiB; refused {}",
        st["slowest_step_ms"], st["slowest_step"], st["clients_refused"]
    );
    assert!(
        open <= 16,
        "one user holds at most a quarter of agent.max_clients (64): {open}"
    );
    assert!(st["clients_refused"].as_u64().unwrap() >= 1984 - 16, "{st}");
    assert!(
        rss_during < rss_before + 64 * 1024,
        "10 non-reading flows clients cost at most 64 MiB: {rss_before} -> {rss_during} KiB"
    );
    // A non-reading client is dropped after the write timeout; the agent still serves everyone.
    wait_for(
        Duration::from_secs(30),
        "the non-reading clients to be dropped",
        || {
            let c = agent.status()["clients"].as_u64().unwrap_or(0);
            if c <= 17 {
                Ok(())
            } else {
                Err(format!("{c} clients"))
            }
        },
    );
    drop(readers);
    drop(idle);
    assert!(
        agent
            .json(&["flows", "--json", "--port", "7100"])
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            >= 17_000
    );
    drop(loads);
}
both_modes!(hostile_reader_cannot_starve_the_agent);

/// Two loopback churn loops for 20 s; the agent's memory goes back to within 20 % of its
/// pre-storm size within a minute.
fn memory_comes_back_after_a_storm(mode: &str) {
    require_root();
    let ns = Netns::new("storm");
    let agent = Agent::start(&ns, mode, "");
    // Settle: the first snapshots and owner lookups are done.
    agent.wait_rounds("flows", 6);
    let before = rss_kib(agent.child.id());
    let flows_before = agent.status()["flows"].as_u64().unwrap_or(0);
    let storms: Vec<Child> = (0..2)
        .map(|i| {
            ns.cmd(&helper_bin("hf-load"))
                .args(["churn-for", &format!("127.0.0.1:{}", 7300 + i), "20"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut peak = before;
    let mut churned = 0u64;
    for mut s in storms {
        while s.try_wait().unwrap().is_none() {
            peak = peak.max(rss_kib(agent.child.id()));
            std::thread::sleep(Duration::from_millis(200));
        }
        // `churn N SECONDS`: the loop's own count of connections made.
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s.stdout.take().unwrap(), &mut out).unwrap();
        churned += out
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    // The storm ran: the loops made hundreds of thousands of connections.
    assert!(churned >= 200_000, "the churn loops made {churned} connections");
    let t0 = Instant::now();
    let after = wait_for(
        Duration::from_secs(60),
        "RSS back within 20 % of before the storm",
        || {
            let now = rss_kib(agent.child.id());
            if now as f64 <= before as f64 * 1.2 {
                Ok(now)
            } else {
                Err(format!("{before} -> peak {peak} -> {now} KiB"))
            }
        },
    );
    println!(
        "{mode}: RSS before {before} KiB, peak {peak} KiB, back to {after} KiB after {:?}",
        t0.elapsed()
    );
    let st = agent.status();
    let opened = st["table"]["opened"].as_u64().unwrap_or(0);
    // Two churn loops saturate both cores of the test VM (29k connections/s each) and the
    // agent's pump and state owner compete with them for CPU: on this machine kind a few records
    // in ten thousand can be lost (0-2.6k of about 5.2M in runs of this test with the storm
    // drain; 35-71k before it). A loss costs timeliness, not correctness: what was
    // lost is healed by the complete read it triggers, so the table comes back to what it was.
    let lost = st["events_lost"].as_u64().unwrap_or(0);
    let events = st["events"].as_u64().unwrap_or(0).max(1);
    println!(
        "{mode}: {churned} connections made in the storm, {opened} seen opening; {lost} of {events} records lost"
    );
    assert!(lost * 1000 <= events, "at most 0.1 % of records lost: {st}");
    // Sockets the loops left in FIN_WAIT2 live up to tcp_fin_timeout (60 s) after them.
    wait_for(
        Duration::from_secs(120),
        "the table healed back to its flows before the storm",
        || {
            let now = agent.status()["flows"].as_u64().unwrap_or(0);
            if now <= flows_before {
                Ok(())
            } else {
                Err(format!("{flows_before} -> {now}"))
            }
        },
    );
}
both_modes!(memory_comes_back_after_a_storm);

/// Where the socket's directory is writable by others, an unprivileged squatter cannot take the
/// agent's place: the agent refuses that directory, and root's CLI refuses to believe a socket
/// served by anyone but root.
#[test]
fn a_squatter_cannot_impersonate_the_agent() {
    require_root();
    let dir = std::env::temp_dir().join(format!("hf-squat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Command::new("chmod").arg("1777").arg(&dir).status().unwrap();
    let path = dir.join("holdfast.sock");
    let squatter = held_as(65534, 65534, &["squat", path.to_str().unwrap()]);
    assert_eq!(squatter.first.trim(), "listening");
    let o = Command::new(holdfast_bin())
        .args(["agent", "--mode", "poll", "--socket"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("writable by others"), "{err}");
    let o = Command::new(holdfast_bin())
        .arg("--socket")
        .arg(&path)
        .arg("findings")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(3),
        "the fake 'no findings' is not believed: {err}"
    );
    assert!(
        err.contains("runs as uid 65534, not as root: refusing to believe it"),
        "{err}"
    );
    drop(squatter);
    // A symlink at the path of an agent-owned directory is refused too.
    let own = dir.join("own");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", own.join("holdfast.sock")).unwrap();
    let o = Command::new(holdfast_bin())
        .args(["agent", "--mode", "poll", "--socket"])
        .arg(own.join("holdfast.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is a symlink: refusing to follow it"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A member of the admin group only can connect and change things; a read-group member can read
/// but not change; anyone else is refused with the configured groups named.
#[test]
fn groups_grant_what_they_say() {
    require_root();
    let (read, admin) = (Group::new("r"), Group::new("a"));
    let ns = Netns::new("groups");
    let agent = Agent::start_env(
        &ns,
        "poll",
        &format!("read_group = \"{}\"\nadmin_group = \"{}\"", read.name, admin.name),
        "",
        &[],
    );
    let s = &agent.socket;
    let (code, _, err) = as_user(4242, &[admin.gid], s, &["status"]);
    assert_eq!(code, 0, "admin-only member reads: {err}");
    let (code, out, err) = as_user(4242, &[admin.gid], s, &["reload"]);
    assert_eq!(code, 0, "admin-only member reloads: {out}{err}");
    let (code, _, err) = as_user(4343, &[read.gid], s, &["status"]);
    assert_eq!(code, 0, "read member reads: {err}");
    let (code, _, err) = as_user(4343, &[read.gid], s, &["reload"]);
    assert_eq!(code, 1);
    assert!(err.contains("needs root or the admin group"), "{err}");
    let (code, _, err) = as_user(4444, &[], s, &["status"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!("group `{}`", read.name)),
        "the configured group is named: {err}"
    );
}

/// Answers that used to mislead: an unknown pid, `explain local`, a reload that needs a restart,
/// requests with duplicate or unknown keys, a config that overflows, a deleted socket file.
#[test]
fn answers_say_what_happened() {
    require_root();
    let ns = Netns::new("answers");
    let agent = Agent::start(&ns, "poll", "");
    let (code, _, err) = agent.cli(&["explain", "4194300"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no process 4194300"), "{err}");
    let server = Peer::spawn(&ns, "listen", "127.0.0.1:0");
    let client = Peer::spawn(&ns, "connect", &server.addr());
    wait_for(Duration::from_secs(5), "the flow", || {
        let (code, out, err) = agent.cli(&["explain", "local", &client.addr()]);
        if code == 0 && out.contains(&client.addr()) {
            Ok(())
        } else {
            Err(format!("{out}{err}"))
        }
    });
    // A reload that changes a restart-only key says so in its answer.
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace("[agent]\n", "[agent]\nmax_clients = 32\n"),
    )
    .unwrap();
    let (code, out, err) = agent.cli(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("agent.max_clients") && out.contains("after a restart"),
        "{out}"
    );
    // A duration that overflows: refused by reload, the agent keeps running with the old config.
    std::fs::write(
        &agent.config,
        format!("{cfg}\n[zombies]\nheal_interval = \"18446744073709551615s18446744073709551615s\"\n"),
    )
    .unwrap();
    let (code, _, err) = agent.cli(&["reload"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("key `zombies.heal_interval`") && err.contains("maximum of 10 years"),
        "{err}"
    );
    Command::new("kill")
        .args(["-HUP", &agent.child.id().to_string()])
        .status()
        .unwrap();
    wait_for(Duration::from_secs(5), "the refused reload in status", || {
        let s = agent.status();
        if s["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("heal_interval"))
        {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    assert!(agent.child.try_wait_alive(), "the agent survives");
    // Strict requests.
    let ask = |line: &str| -> serde_json::Value {
        let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    };
    let e = ask(r#"{"v":1,"op":"status","op":"reload"}"#);
    assert!(e["error"].as_str().unwrap().contains("duplicate key `op`"), "{e}");
    let e = ask(r#"{"v":1,"op":"status","sudo":true}"#);
    assert!(
        e["error"].as_str().unwrap().contains("unknown field `sudo`"),
        "{e}"
    );
    // The socket file disappears: the agent notices and recreates it.
    std::fs::remove_file(&agent.socket).unwrap();
    wait_for(Duration::from_secs(15), "the socket to be recreated", || {
        agent.json(&["status", "--json"])
    });
}

trait Alive {
    fn try_wait_alive(&self) -> bool;
}

impl Alive for Child {
    fn try_wait_alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.id())).exists()
    }
}
