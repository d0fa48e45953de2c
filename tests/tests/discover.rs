//! `holdfast discover` (issue 14): the idle timeout of a path measured from the client's side,
//! through the NAT test bed (a router whose conntrack forgets idle flows after 20 s), with
//! `holdfast echo` on the far side. No agent is involved: the command works on its own.
use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use holdfast_tests::{Agent, NAT_SERVER_IP, NatBed, Netns, Peer, holdfast_bin, require_root};
use serde_json::Value;

const TIMEOUT_S: u64 = 20;

/// Runs `holdfast discover ARGS --json` in `ns`; (exit code, the JSON reply, stderr, wall time).
fn discover(ns: &Netns, args: &[&str]) -> (i32, Value, String, Duration) {
    let t0 = Instant::now();
    let out = ns
        .cmd(&holdfast_bin())
        .arg("discover")
        .args(args)
        .arg("--json")
        .output()
        .expect("run holdfast discover");
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).to_string(),
        took,
    )
}

fn through_the_bed(bed: NatBed, how: &str, agent: Option<&Agent>) {
    let server = format!("{NAT_SERVER_IP}:7007");
    let _echo = Peer::spawn_bin(&bed.server, &holdfast_bin(), &["echo", &server], None);
    let socket = agent.map(|a| a.socket.to_string_lossy().to_string());
    let mut args = vec![server.as_str(), "--max", "60s"];
    if let Some(s) = &socket {
        args.extend(["--socket", s.as_str()]);
    }
    let (code, v, err, took) = discover(&bed.client, &args);
    println!("discover took {took:?}: {v}");
    assert_eq!(code, 0, "{v} {err}");
    let verdict = &v["verdict"];
    assert_eq!(verdict["verdict"], "timeout", "{v}");
    let (survived, broke) = (
        verdict["survived_ms"].as_u64().unwrap(),
        verdict["broke_ms"].as_u64().unwrap(),
    );
    // Within ±2 s of the router's 20 s: the evidence brackets it tightly.
    let t = TIMEOUT_S * 1000;
    assert!(
        survived < t && survived >= t - 2000,
        "survived {survived} ms: {v}"
    );
    assert!(broke >= t - 500 && broke <= t + 2000, "broke {broke} ms: {v}");
    let estimate = verdict["estimate_ms"].as_u64().unwrap();
    assert!(estimate.abs_diff(t) <= 2000, "{v}");
    assert_eq!(verdict["how"], how, "{v}");
    assert!(
        v["rule"]
            .as_str()
            .unwrap()
            .contains(&format!("cidr = \"{NAT_SERVER_IP}/32\"")),
        "{v}"
    );
    // Polite and quick: the ladder (4.5, 9, 18, 36, 60 s) and one batch of 8 open at most, less
    // than 3x the timeout of wall time.
    assert!(v["peak_open"].as_u64().unwrap() <= 5 + 8, "{v}");
    assert!(v["elapsed_ms"].as_u64().unwrap() < 3 * t, "{v}");
    // The local agent keeps the measurement: the path shows it with its evidence.
    match agent {
        Some(agent) => {
            assert!(
                v["recorded"].as_str().is_some_and(|r| r.contains("10.77.2.0/24")),
                "{v}"
            );
            let p = agent.json(&["profiles", "--json"]).expect("profiles");
            let l = p["learned"]
                .as_array()
                .and_then(|a| a.iter().find(|l| l["prefix"] == "10.77.2.0/24").cloned())
                .unwrap_or_default();
            assert_eq!(l["timeout_s"], survived / 1000, "{p}");
            assert!(
                l["evidence"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("discovered: survived"),
                "{l}"
            );
        }
        None => assert!(
            v["not_recorded"].as_str().is_some_and(|r| r.contains("agent")),
            "{v}"
        ),
    }
}

#[test]
fn discover_measures_a_path_that_drops_forgotten_flows() {
    require_root();
    let bed = NatBed::new(TIMEOUT_S as u32);
    let agent = Agent::start(&bed.client, "poll", "");
    through_the_bed(bed, "silence: packets dropped", Some(&agent));
}

#[test]
fn discover_measures_a_path_that_resets_forgotten_flows() {
    require_root();
    through_the_bed(NatBed::rejecting(TIMEOUT_S as u32), "reset", None);
}

#[test]
fn discover_refuses_to_guess() {
    require_root();
    let ns = Netns::new("disc");
    ns.run(&["ip", "link", "set", "lo", "up"]);
    // Nobody listens: a clear error at once, exit 1.
    let (code, _, err, took) = discover(&ns, &["127.0.0.1:7999", "--max", "10s"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot connect to 127.0.0.1:7999") && err.contains("holdfast echo"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A server that closes idle connections itself after 6 s: no number, the reason instead.
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = std::thread::spawn({
        let name = ns.name.clone();
        move || closing_server(&name, tx)
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the closing server listens");
    let (code, v, err, _) = discover(&ns, &["127.0.0.1:7998", "--max", "20s"]);
    assert_eq!(code, 1, "{v} {err}");
    assert_eq!(v["verdict"]["verdict"], "inconclusive", "{v}");
    let summary = v["summary"].as_str().unwrap();
    assert!(
        summary.contains("the server closed idle connections after 6"),
        "{summary}"
    );
    assert!(v["rule"].is_null(), "{v}");
    drop(listener);
    // Bad arguments: usage errors naming the fix.
    let out = ns
        .cmd(&holdfast_bin())
        .args(["discover", "127.0.0.1:7998", "--max", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected 2s to 24h"));
    let out = ns
        .cmd(&holdfast_bin())
        .args(["discover", "no-port-here"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected HOST:PORT"),
        "{out:?}"
    );
}

/// A server in namespace `ns` (entered by this thread) that echoes and closes every connection
/// after 6 s idle, like a server with its own idle limit. Serves for 30 s.
fn closing_server(ns: &str, ready: std::sync::mpsc::Sender<()>) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
    // SAFETY: setns(2) on an fd we own, for this thread only.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let l = std::net::TcpListener::bind("127.0.0.1:7998").expect("bind");
    l.set_nonblocking(true).unwrap();
    let _ = ready.send(());
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        match l.accept() {
            Ok((mut s, _)) => {
                std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
                    let mut buf = [0u8; 512];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
