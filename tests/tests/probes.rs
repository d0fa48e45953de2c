//! Keepalive probes on the wire (issue 16), through the masquerading router of the NAT bed (20 s
//! conntrack timeout). In eBPF mode holdfast watches the probes of the sockets it put keepalive
//! on: each probe leaving and the segment answering it. Poll mode cannot see probes on the wire;
//! each scenario checks what poll mode does instead and that it says so.
//!
//! The wire is checked independently of holdfast with nftables counters in the client's
//! namespace: an idle flow exchanges only keepalive probes (bare ACKs, 52-byte IP packets with
//! the timestamp option) and their answers.
use std::time::{Duration, Instant};

use holdfast_tests::{
    Agent, NAT_SERVER_IP, NatBed, Netns, Peer, both_modes, holdfast_bin, outcome, require_root, wait_for,
};
use serde_json::Value;

/// The router's conntrack established timeout.
const TIMEOUT_S: u64 = 20;

fn config(profile_timeout_s: u64) -> String {
    format!(
        "[keepalive]\nmode = \"enforce\"\nfloor = \"2s\"\n\n[[profiles]]\nname = \"lab-nat\"\nidle_timeout = \"{profile_timeout_s}s\"\n\n[[rules]]\ncidr = \"10.77.2.2/32\"\nprofile = \"lab-nat\"\n"
    )
}

/// Counts bare ACKs of the session on the client's interface: sent to the server (probes) and
/// received from it (answers).
struct WireCount {
    ns: String,
}

impl WireCount {
    fn new(client: &Netns) -> Self {
        let rules = "table ip hfwire {\n chain out { type filter hook output priority 0; tcp dport 5432 tcp flags == ack ip length 52 counter; }\n chain in { type filter hook input priority 0; tcp sport 5432 tcp flags == ack ip length 52 counter; }\n}\n";
        let mut c = std::process::Command::new("ip")
            .args(["netns", "exec", &client.name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        c.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success(), "nft counters");
        WireCount {
            ns: client.name.clone(),
        }
    }

    fn packets(&self, chain: &str) -> u64 {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "nft", "list", "chain", "ip", "hfwire", chain,
            ])
            .output()
            .expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {text}"))
    }

    /// (bare ACKs sent to the server, received from it).
    fn now(&self) -> (u64, u64) {
        (self.packets("out"), self.packets("in"))
    }
}

struct Session {
    bed: NatBed,
    _server: Peer,
    client: Peer,
}

fn session() -> Session {
    let bed = NatBed::new(TIMEOUT_S as u32);
    let server = Peer::spawn(&bed.server, "listen", &format!("{NAT_SERVER_IP}:5432"));
    let mut client = Peer::spawn_with(&bed.client, &["connect", "10.77.2.2:5432"], None);
    assert_eq!(client.tell("send"), "sent true", "a fresh flow round-trips");
    Session {
        bed,
        _server: server,
        client,
    }
}

/// The keepalive action of the flow's idle-near-eviction finding, once applied.
fn applied(agent: &Agent, local: &str, within: Duration) -> Value {
    wait_for(within, "the keepalive remedy applied", || {
        let f = agent
            .flow_findings("idle-near-eviction", local)
            .into_iter()
            .next()
            .ok_or("no finding yet")?;
        let a = f["actions"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["action"] == "keepalive").cloned())
            .ok_or_else(|| f.to_string())?;
        if outcome(&a).starts_with("applied") {
            Ok(a)
        } else {
            Err(a.to_string())
        }
    })
}

/// A remedied idle flow: every refresh interval a probe leaves and is answered, for 60 s; what
/// holdfast reports matches the wire; the session still answers afterwards.
fn a_remedied_flow_shows_its_probes_answered(mode: &str) {
    require_root();
    let mut s = session();
    let wire = WireCount::new(&s.bed.client);
    // The first exchange's ACKs are done: from here on only probes and answers are bare ACKs.
    std::thread::sleep(Duration::from_millis(500));
    let base = wire.now();
    let agent = Agent::start(&s.bed.client, mode, &config(TIMEOUT_S));
    let local = s.client.addr();
    let a = applied(&agent, &local, Duration::from_secs(TIMEOUT_S));
    let refresh_s = a["after"]["idle_s"].as_u64().expect("idle_s");
    assert!(refresh_s < TIMEOUT_S, "{a}");
    // 60 s of idle with keepalive on.
    let watch_from = Instant::now();
    let want = if mode == "ebpf" {
        "verified on the wire: a probe sent"
    } else {
        "verified: keepalive on and armed"
    };
    wait_for(Duration::from_secs(refresh_s + 5), "the remedy verified", || {
        let f = agent
            .flow_findings("idle-near-eviction", &local)
            .into_iter()
            .next()
            .ok_or("gone")?;
        let text = outcome(&f["actions"][0]).to_string();
        if text.contains(want) && f["active"] == false {
            Ok(())
        } else {
            Err(f.to_string())
        }
    });
    std::thread::sleep(Duration::from_secs(60).saturating_sub(watch_from.elapsed()));
    let (sent_wire, answered_wire) = {
        let n = wire.now();
        (n.0 - base.0, n.1 - base.1)
    };
    let expected = 60 / refresh_s;
    assert!(
        sent_wire >= expected && answered_wire + 1 >= sent_wire,
        "the wire shows a probe answered every {refresh_s} s: {sent_wire} sent, {answered_wire} answered"
    );
    let f = agent.flow_at(&local).expect("flow listed");
    if mode == "ebpf" {
        let p = &f["wire_probes"];
        let sent = p["sent"].as_u64().expect("probes seen") as i64;
        let answered = p["answered"].as_u64().unwrap() as i64;
        eprintln!(
            "wire: holdfast {sent} sent / {answered} answered (last RTT {} µs); nftables on the client's interface {sent_wire} / {answered_wire}",
            p["last_rtt_us"]
        );
        // The counters run from the first probe after the watch began (the wire's from start).
        assert!(
            (sent - sent_wire as i64).abs() <= 1 && (answered - answered_wire as i64).abs() <= 1,
            "holdfast saw {sent} sent / {answered} answered; the wire {sent_wire} / {answered_wire}: {f}"
        );
        assert!(sent >= expected as i64, "{f}");
        assert_eq!(p["unanswered"], 0, "{f}");
        assert!(
            p["last_sent_ago_ms"].as_u64().unwrap() <= (refresh_s + 3) * 1000,
            "a probe every refresh interval: {f}"
        );
        let rtt = p["last_rtt_us"].as_u64().unwrap();
        assert!(rtt < 100_000, "an answer within a LAN round trip: {rtt} µs");
        let (code, out, _) = agent.cli(&["explain", &local]);
        assert_eq!(code, 0);
        assert!(
            out.contains("probes:") && out.contains("answered") && out.contains("seen on the wire"),
            "{out}"
        );
        let st = agent.status();
        assert!(
            st["probe_watch"]
                .as_str()
                .unwrap()
                .starts_with("1 socket(s) watched"),
            "{st}"
        );
    } else {
        assert_eq!(
            f["wire_probes"],
            Value::Null,
            "poll mode does not see probes: {f}"
        );
        let st = agent.status();
        assert!(
            st["probe_watch"]
                .as_str()
                .unwrap()
                .contains("poll mode cannot see probes"),
            "{st}"
        );
    }
    assert_eq!(
        s.client.tell("send"),
        "sent true",
        "the session answers after 60 s idle"
    );
    if mode == "ebpf" {
        // A stopped agent leaves no socket flagged (getsockopt through the tcp iterator).
        drop(agent);
        let out = s
            .bed
            .client
            .cmd(&holdfast_bin())
            .args(["probe", "watch", "--census"])
            .output()
            .expect("holdfast probe watch --census");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert_eq!(text.trim(), r#"{"flagged":0}"#, "after the agent stopped");
    }
}
both_modes!(a_remedied_flow_shows_its_probes_answered);

/// A peer that vanishes (every packet dropped, no FIN or RST) before keepalive is applied: the
/// probes go unanswered, the kernel ends the connection (ETIMEDOUT), and holdfast reports all of
/// it; the keepalive finding is not resolved as if keepalive had worked.
fn a_vanished_peer_is_found_dead(mode: &str) {
    require_root();
    let mut s = session();
    let agent = Agent::start(&s.bed.client, mode, &config(TIMEOUT_S));
    let local = s.client.addr();
    // The server's side goes silent: the router drops everything from now on.
    s.bed
        .router
        .run(&["nft", "add", "rule", "inet", "hffilter", "forward", "drop"]);
    let a = applied(&agent, &local, Duration::from_secs(TIMEOUT_S));
    let t = &a["after"];
    let death = Duration::from_secs(t["intvl_s"].as_u64().unwrap() * t["cnt"].as_u64().unwrap() + 10);
    // The program sees its connection dead (read without sending: data would be retransmitted
    // and keepalive would stand aside).
    wait_for(death, "the connection timed out", || {
        let st = s.client.tell("state");
        if st == "state 7 err 110" { Ok(()) } else { Err(st) }
    });
    let ev = wait_for(
        Duration::from_secs(15),
        "the resolution says the connection ended",
        || {
            let f = agent
                .flow_findings("idle-near-eviction", &local)
                .into_iter()
                .next()
                .ok_or("no finding")?;
            let ended = f["resolution"]
                .as_str()
                .is_some_and(|w| w.contains("the connection ended"));
            if ended { Ok(f) } else { Err(f.to_string()) }
        },
    );
    let why = ev["resolution"].as_str().unwrap_or_default();
    assert!(!why.contains("verified") && !why.contains("refreshed"), "{ev}");
    let half_open = agent.flow_findings("half-open", &local);
    if mode == "ebpf" {
        assert!(why.contains("before any probe was answered"), "{ev}");
        let act = &ev["actions"][0];
        assert_eq!(act["outcome"]["status"], "ineffective", "{act}");
        assert!(outcome(act).contains("none answered"), "{act}");
        // The unanswered probes, while the connection still existed...
        assert!(
            half_open.iter().any(|f| f["summary"]
                .as_str()
                .is_some_and(|s| s.contains("unanswered on the wire"))),
            "{half_open:?}"
        );
        // ...and the post-mortem: the first probe went unanswered before the router's timeout,
        // so the middlebox still had the flow: the peer is gone.
        let pm = wait_for(Duration::from_secs(5), "the dead-peer post-mortem", || {
            agent
                .flow_findings("half-open", &local)
                .into_iter()
                .find(|f| {
                    f["summary"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("dead peer found by keepalive"))
                })
                .ok_or_else(|| format!("{:?}", agent.flow_findings("half-open", &local)))
        });
        let summary = pm["summary"].as_str().unwrap();
        assert!(
            summary.contains("timed out") && summary.contains("unanswered"),
            "{pm}"
        );
        wait_for(Duration::from_secs(5), "nothing left watched", || {
            let st = agent.status();
            let w = st["probe_watch"].as_str().unwrap_or_default().to_string();
            if w.starts_with("0 socket(s) watched") && w.contains(", 0 stray") {
                Ok(())
            } else {
                Err(w)
            }
        });
        assert!(agent.flow_findings("likely-evicted", &local).is_empty());
    } else {
        // Poll mode: keepalive was seen armed (all it can see); the kernel's probe counter
        // (tcpi_probes) gives the half-open evidence.
        assert!(
            outcome(&ev["actions"][0]).contains("not visible in this mode"),
            "{ev}"
        );
        assert!(
            half_open.iter().any(|f| f["summary"]
                .as_str()
                .is_some_and(|s| s.contains("keepalive probes unanswered"))),
            "{half_open:?}"
        );
    }
}
both_modes!(a_vanished_peer_is_found_dead);

/// Drop mode, and keepalive too late: the rule says 40 s but the router forgets after 20 s, so
/// the first probe goes to a NAT that no longer knows the flow. eBPF mode reports the first
/// unanswered probe as half-open evidence within one probe interval, before any data is sent.
fn a_late_keepalive_meets_silence(mode: &str) {
    require_root();
    let s = session();
    let agent = Agent::start(&s.bed.client, mode, &config(2 * TIMEOUT_S));
    let local = s.client.addr();
    let a = applied(&agent, &local, Duration::from_secs(2 * TIMEOUT_S));
    let applied_at = Instant::now();
    let intvl = a["after"]["intvl_s"].as_u64().unwrap();
    let cnt = a["after"]["cnt"].as_u64().unwrap();
    let limit = if mode == "ebpf" {
        // The first probe leaves at once (the flow idled past the new TCP_KEEPIDLE); it is
        // unanswered after 1 s, reported at the next evaluation.
        Duration::from_secs(intvl + 2)
    } else {
        // Poll mode: tcpi_probes >= 2 and the silence threshold.
        Duration::from_secs(intvl * cnt + 10)
    };
    let f = wait_for(limit, "half-open evidence", || {
        agent
            .flow_findings("half-open", &local)
            .into_iter()
            .next()
            .ok_or_else(|| "none yet".to_string())
    });
    eprintln!(
        "{mode}: half-open {:.1} s after keepalive was applied (probe interval {intvl} s): {}",
        applied_at.elapsed().as_secs_f64(),
        f["summary"]
    );
    if mode == "ebpf" {
        assert!(
            f["summary"].as_str().unwrap().contains("unanswered on the wire"),
            "{f}"
        );
        assert!(applied_at.elapsed() <= Duration::from_secs(intvl + 2), "{f}");
    }
    // No data was sent by the program: the evidence came from keepalive alone.
    let fl = agent.flow_at(&local);
    if let Some(fl) = fl {
        assert_eq!(fl["unacked"], 0, "{fl}");
    }
}
both_modes!(a_late_keepalive_meets_silence);

/// Selecting and releasing 1000 sockets leaves no callback flag set, as getsockopt through the
/// tcp iterator reads it (`holdfast probe watch`, in a namespace of its own). Poll mode has no
/// flags to set: it says the probe watch needs eBPF.
#[test]
fn selecting_and_releasing_1000_sockets_leaves_no_flag() {
    require_root();
    let ns = Netns::new("pw");
    ns.run(&["ip", "link", "set", "lo", "up"]);
    let out = ns
        .cmd(&holdfast_bin())
        .args(["probe", "watch", "--sockets", "1000"])
        .output()
        .expect("holdfast probe watch");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(text.trim()).expect("json");
    assert_eq!(v["watching"], 1000, "{v}");
    assert_eq!(v["flagged_while_watched"], 1000, "{v}");
    assert_eq!(v["stray_while_watched"], 0, "{v}");
    assert_eq!(v["released"], 1000, "{v}");
    assert_eq!(v["flagged_after_release"], 0, "{v}");
    eprintln!(
        "probe watch: {} ns per callback, {} callbacks per segment, select {:.1} ms, release {:.1} ms for 1000 sockets",
        v["ns_per_callback"],
        v["callbacks_per_segment"],
        v["select_s"].as_f64().unwrap() * 1e3,
        v["release_s"].as_f64().unwrap() * 1e3
    );
}
