//! Passive learning of a path's idle timeout (issue 14), in the NAT test bed (the router's
//! conntrack forgets idle flows after 20 s and drops their packets). No rule names the path:
//! what holdfast knows about it comes from two connections it saw evicted.
use std::time::{Duration, Instant};

use holdfast_tests::{Agent, NAT_SERVER_IP, NatBed, Peer, both_modes, require_root, wait_for};
use serde_json::Value;

const TIMEOUT_S: u64 = 20;
/// How long the first two connections idle before they send (past the router's timeout).
const IDLE_S: u64 = 25;

fn config(state_file: &str) -> String {
    format!("[keepalive]\nmode = \"enforce\"\nfloor = \"2s\"\n\n[learning]\nstate_file = \"{state_file}\"\n")
}

/// The learnt path towards the server, once it has a timeout.
fn learnt(agent: &Agent) -> Result<Value, String> {
    let v = agent.json(&["profiles", "--json"])?;
    v["learned"]
        .as_array()
        .and_then(|a| a.iter().find(|l| l["prefix"] == "10.77.2.0/24").cloned())
        .filter(|l| !l["timeout_s"].is_null())
        .ok_or_else(|| v["learned"].to_string())
}

fn a_path_learnt_from_two_evictions_protects_the_next_connection(mode: &str) {
    require_root();
    let bed = NatBed::new(TIMEOUT_S as u32);
    let server = format!("{NAT_SERVER_IP}:5432");
    let _srv = Peer::spawn(&bed.server, "listen", &server);
    let dir = std::env::temp_dir().join(format!("hf-learn-{}-{mode}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state_file = dir.join("learned-paths.json");
    let cfg = config(state_file.to_str().unwrap());
    let agent = Agent::start(&bed.client, mode, &cfg);
    // Two sessions idle past the router's timeout, then send: the NAT has forgotten them.
    let mut a = Peer::spawn_with(&bed.client, &["connect", &server, "8000"], None);
    let mut b = Peer::spawn_with(&bed.client, &["connect", &server, "8000"], None);
    assert_eq!(a.tell("send"), "sent true");
    assert_eq!(b.tell("send"), "sent true");
    std::thread::sleep(Duration::from_secs(IDLE_S));
    assert_eq!(a.tell("send"), "sent false", "evicted after {IDLE_S} s idle");
    assert_eq!(b.tell("send"), "sent false", "evicted after {IDLE_S} s idle");
    // Learnt, conservatively: below what broke, about the router's timeout.
    let l = wait_for(Duration::from_secs(15), "a learnt timeout for the path", || {
        learnt(&agent)
    });
    let t = l["timeout_s"].as_u64().unwrap();
    assert!(
        (15..=TIMEOUT_S).contains(&t),
        "learnt {t} s: {l}\nagent log:\n{}",
        agent.stderr()
    );
    assert!(l["evidence"].as_str().unwrap().contains("evicted after 2"), "{l}");
    let (code, out, _) = agent.cli(&["profiles"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("10.77.2.0/24 via 10.77.1.1") && out.contains("(2 flows)"),
        "{out}"
    );
    // A third connection, with no rule at all, is protected: it survives 3x the timeout idle.
    let mut c = Peer::spawn_with(&bed.client, &["connect", &server], None);
    let local = c.addr();
    assert_eq!(c.tell("send"), "sent true");
    let idle_from = Instant::now();
    let f = wait_for(
        Duration::from_secs(TIMEOUT_S),
        "the third flow forecast with the learnt timeout",
        || {
            agent
                .flows()
                .into_iter()
                .find(|f| f["local"] == local.as_str() && f["risk"]["profile"] == "learned")
                .ok_or_else(|| "not yet".to_string())
        },
    );
    assert_eq!(f["risk"]["timeout_s"], t, "{f}");
    std::thread::sleep(Duration::from_secs(3 * TIMEOUT_S).saturating_sub(idle_from.elapsed()));
    assert_eq!(
        c.tell("send"),
        "sent true",
        "protected by keepalive from the learnt timeout"
    );
    let (code, out, _) = agent.cli(&["explain", &local]);
    assert_eq!(code, 0);
    assert!(out.contains("learned for 10.77.2.0/24"), "{out}");
    // The evidence survives a restart of the agent.
    drop(agent);
    assert!(state_file.exists(), "written at shutdown at the latest");
    let agent = Agent::start(&bed.client, mode, &cfg);
    let again = learnt(&agent).expect("learnt before any new evidence");
    assert_eq!(again["timeout_s"], t, "{again}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
both_modes!(a_path_learnt_from_two_evictions_protects_the_next_connection);
