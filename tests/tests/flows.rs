//! Scenario tests for the flow table (issue 2), each in a fresh network namespace, in both modes.
use std::time::Duration;

use holdfast_tests::{Agent, Netns, Peer, both_modes, find_flow, helper_bin, require_root, wait_for};

/// A client/server pair connects: both ends appear within 1 s with the right tuple, ESTABLISHED
/// and the right owner pid; the client closes: both ends leave within 1 s.
fn connect_then_close(mode: &str) {
    require_root();
    let ns = Netns::new("flows");
    let agent = Agent::start(&ns, mode, "");
    let status = agent.json(&["status", "--json"]).unwrap();
    assert_eq!(status["mode"], mode, "status: {status}");

    // eBPF mode sees the sockets from their events; poll mode at its next read.
    let spacing = if mode == "poll" {
        agent.read_spacing()
    } else {
        Duration::ZERO
    };
    let server = Peer::spawn(&ns, "listen", "127.0.0.1:0");
    let server_addr = server.addr();
    let mut client = Peer::spawn(&ns, "connect", &server_addr);
    let client_addr = client.addr();

    let (c, s) = wait_for(
        Duration::from_secs(1) + spacing,
        "both ends ESTAB with their owners",
        || {
            let flows = agent.flows();
            let c = find_flow(&flows, &client_addr, &server_addr)
                .cloned()
                .ok_or("client end missing")?;
            let s = find_flow(&flows, &server_addr, &client_addr)
                .cloned()
                .ok_or("server end missing")?;
            let ready = |f: &serde_json::Value, pid: u32| f["state"] == "ESTAB" && f["pid"] == pid;
            if ready(&c, client.pid()) && ready(&s, server.pid()) {
                Ok((c, s))
            } else {
                Err(format!("client {c}\nserver {s}"))
            }
        },
    );
    assert_eq!(c["comm"], "hf-peer");
    assert_ne!(c["cookie"], s["cookie"], "each end is its own socket");
    assert!(c["inode"].as_u64().unwrap() > 0);

    // The human table shows the same flow.
    let (code, table, _) = agent.cli(&["flows", "--port", server_addr.rsplit(':').next().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        table.contains(&client_addr) && table.contains(&format!("{}/hf-peer", client.pid())),
        "{table}"
    );

    assert_eq!(client.tell("close"), "closed");
    wait_for(
        Duration::from_secs(1) + spacing,
        "both ends to leave the table",
        || {
            let flows = agent.flows();
            match (
                find_flow(&flows, &client_addr, &server_addr),
                find_flow(&flows, &server_addr, &client_addr),
            ) {
                (None, None) => Ok(()),
                (a, b) => Err(format!("still listed: {a:?} {b:?}")),
            }
        },
    );
    let status = agent.json(&["status", "--json"]).unwrap();
    assert!(status["snapshots"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(status["events_lost"], 0, "{status}");
    if mode == "ebpf" {
        assert!(
            status["events"].as_u64().unwrap() >= 4,
            "state events were counted: {status}"
        );
        // The owners came from the likely owner's descriptors, read by the task_file iterator
        // limited to that process (not /proc, and not a walk of every socket file).
        assert!(status["owner_targeted_walks"].as_u64().unwrap() >= 1, "{status}");
        let log = agent.stderr();
        assert!(!log.contains("per-process socket-file iterator failed"), "{log}");
    }
}
both_modes!(connect_then_close);

/// A connection made before the agent started is listed, with its owners.
fn preexisting_connection(mode: &str) {
    require_root();
    let ns = Netns::new("pre");
    let server = Peer::spawn(&ns, "listen", "127.0.0.1:0");
    let client = Peer::spawn(&ns, "connect", &server.addr());
    let agent = Agent::start(&ns, mode, "");
    let (server_addr, client_addr) = (server.addr(), client.addr());
    let f = wait_for(Duration::from_secs(5), "the pre-existing flow", || {
        let flows = agent.flows();
        let f = find_flow(&flows, &client_addr, &server_addr)
            .cloned()
            .ok_or("missing")?;
        if f["pid"] == client.pid() {
            Ok(f)
        } else {
            Err(f.to_string())
        }
    });
    assert_eq!(f["state"], "ESTAB");
    assert!(
        f["state_age_ms"].is_null(),
        "it entered ESTAB before the agent saw it: {f}"
    );
    assert!(f["idle_ms"].as_u64().is_some(), "tcp_info is merged: {f}");
    let flows = agent.flows();
    let s = find_flow(&flows, &server_addr, &client_addr).expect("server end");
    assert_eq!(s["pid"], server.pid());
    // The listener is hidden by default and shown with --all.
    assert!(!flows.iter().any(|f| f["state"] == "LISTEN"));
    let all = agent.json(&["flows", "--json", "--all"]).unwrap();
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|f| f["state"] == "LISTEN" && f["local"] == server_addr.as_str())
    );
}
both_modes!(preexisting_connection);

/// Keepalive state, values and timer are reported per socket: off for a program that does not
/// set it, on with its own values and a running timer for one that does.
fn keepalive_is_visible(mode: &str) {
    require_root();
    let ns = Netns::new("ka");
    let agent = Agent::start(&ns, mode, "");
    let server = Peer::spawn(&ns, "listen", "127.0.0.1:0");
    let plain = Peer::spawn(&ns, "connect", &server.addr());
    let with_ka = Peer::spawn_with(&ns, &["connect", &server.addr(), "ka"], None);
    let server_addr = server.addr();
    // In eBPF mode a new flow's owner comes from an exact sock_diag read, which has no
    // per-socket keepalive settings: the iterator's sample brings them a moment later.
    let seen = |local: &str| {
        let flows = agent.flows();
        let f = find_flow(&flows, local, &server_addr).cloned().ok_or("missing")?;
        let settings = mode != "ebpf" || f["keepalive"] != true || f["keepalive_idle_s"].is_u64();
        if f["keepalive"].is_boolean() && settings {
            Ok(f)
        } else {
            Err(f.to_string())
        }
    };
    let f = wait_for(Duration::from_secs(3), "the plain flow with tcp state", || {
        seen(&plain.addr())
    });
    assert_eq!(f["keepalive"], false, "the program did not set SO_KEEPALIVE: {f}");
    let k = wait_for(
        Duration::from_secs(3),
        "the keepalive flow with tcp state",
        || seen(&with_ka.addr()),
    );
    assert_eq!(k["keepalive"], true, "the program set SO_KEEPALIVE: {k}");
    assert_eq!(k["timer"], "keepalive", "its keepalive timer runs: {k}");
    let left = k["timer_expires_ms"].as_i64().expect("timer expiry");
    assert!(
        left > 0 && left <= 30_000,
        "the next probe within TCP_KEEPIDLE (30 s): {k}"
    );
    if mode == "ebpf" {
        // The iterator reads the per-socket values; sock_diag cannot (a query's own exact read
        // refreshes only flows the iterator has sampled: their settings stand).
        assert_eq!(
            (k["keepalive_idle_s"].as_u64(), k["keepalive_intvl_s"].as_u64()),
            (Some(30), Some(5)),
            "{k}"
        );
    }
}
both_modes!(keepalive_is_visible);

/// `flows` reads the kernel for the flows it shows: a session that moved after the agent's last
/// read shows its true idle time (what the program just did), where `--cached` still shows the
/// last read's value extrapolated. The reads are 60 s apart here, so only the query's own read
/// can know.
fn fresh_values_at_the_query(mode: &str) {
    require_root();
    let ns = Netns::new("fresh");
    // The session exists before the agent: its first read (at start) finds it in both modes.
    let server = Peer::spawn(&ns, "listen", "127.0.0.1:0");
    let mut client = Peer::spawn(&ns, "connect", &server.addr());
    let (server_addr, client_addr) = (server.addr(), client.addr());
    let agent = Agent::start(
        &ns,
        mode,
        "[snapshot]\npoll_interval = \"60s\"\nebpf_interval = \"60s\"\nfull_interval = \"60s\"\n",
    );
    let cached = |agent: &Agent| {
        let v = agent.json(&["flows", "--json", "--cached"]).unwrap();
        find_flow(v.as_array().unwrap(), &client_addr, &server_addr).cloned()
    };
    let first = wait_for(Duration::from_secs(5), "the session with its tcp values", || {
        cached(&agent)
            .filter(|f| f["idle_ms"].is_u64())
            .ok_or_else(|| "not yet".to_string())
    });
    let read_at = std::time::Instant::now();
    // Idle for 4 s, then the program sends and gets its echo: the session is not idle any more.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(client.tell("send"), "sent true");
    let moved = std::time::Instant::now();
    let stale = cached(&agent).expect("the session is still listed");
    assert!(
        stale["idle_ms"].as_u64().unwrap() >= 3_500 && stale["sample_age_ms"].as_u64().unwrap() >= 3_500,
        "no read since the start (reads 60 s apart): the cached value is the old one, extrapolated \
         (first {first}, now {stale})"
    );
    let fresh = agent.flows();
    let f = find_flow(&fresh, &client_addr, &server_addr).expect("the session, fresh");
    let since_send = moved.elapsed().as_millis() as u64;
    assert!(
        f["idle_ms"].as_u64().unwrap() <= since_send + 100,
        "the program sent {since_send} ms ago: the query read that: {f}"
    );
    assert!(
        f["sample_age_ms"].as_u64().unwrap() <= since_send,
        "read at the query: {f}"
    );
    assert!(
        read_at.elapsed() < Duration::from_secs(60),
        "no periodic read could have intervened"
    );
    // The human table shows no stale values, and says so when they are.
    let (_, table, _) = agent.cli(&["flows"]);
    assert!(!table.contains("the agent's last read"), "{table}");
}
both_modes!(fresh_values_at_the_query);

/// A query that selects more sockets of a namespace than are worth one request each (4096) is
/// answered by one read of the whole table: every flow it shows is fresh, none is left out.
fn a_large_selection_is_read_whole(mode: &str) {
    require_root();
    let ns = Netns::new("freshbig");
    // 2100 connections (4200 sockets on port 5077) made before the agent: its first read finds
    // them; later reads are 60 s apart, so only a query's read is fresh.
    let load = Peer::spawn_bin(
        &ns,
        &helper_bin("hf-load"),
        &["conns", "127.0.0.1:5077", "2100"],
        None,
    );
    assert_eq!(load.first, "ready 4200", "the load holds its connections");
    let agent = Agent::start(
        &ns,
        mode,
        "[snapshot]\npoll_interval = \"60s\"\nebpf_interval = \"60s\"\nfull_interval = \"60s\"\n",
    );
    let on_port = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut a = vec!["flows", "--json", "--port", "5077"];
        a.extend_from_slice(args);
        let v = agent.json(&a).ok();
        let flows = v.as_ref().and_then(|v| v.as_array()).cloned().unwrap_or_default();
        flows
            .into_iter()
            .filter(|f| f["state"] == "ESTAB")
            .collect::<Vec<_>>()
    };
    wait_for(
        Duration::from_secs(10),
        "4200 flows with their tcp values",
        || {
            let n = on_port(&["--cached"])
                .iter()
                .filter(|f| f["idle_ms"].is_u64())
                .count();
            if n >= 4200 { Ok(()) } else { Err(format!("{n}")) }
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let stale = on_port(&["--cached"]);
    let oldest = |flows: &[serde_json::Value]| {
        flows
            .iter()
            .map(|f| f["sample_age_ms"].as_u64().unwrap_or(u64::MAX))
            .max()
            .unwrap_or(u64::MAX)
    };
    assert!(oldest(&stale) >= 2_500, "the cached values are the first read's");
    let asked = std::time::Instant::now();
    let fresh = on_port(&[]);
    let took = asked.elapsed().as_millis() as u64;
    assert_eq!(fresh.len(), 4200, "every flow on the port, none left out");
    assert!(
        oldest(&fresh) <= took,
        "all 4200 read at the query ({took} ms ago): oldest value {} ms",
        oldest(&fresh)
    );
    let st = agent.status();
    assert!(
        st["fresh"]["reads"].as_u64() >= Some(1) && st["fresh"]["sockets"].as_u64() >= Some(4200),
        "status counts the read: {}",
        st["fresh"]
    );
}
both_modes!(a_large_selection_is_read_whole);

/// Where waiting on the event rings is not possible (registering them fails; forced here with
/// HOLDFAST_RING_WAIT=off), the pump drains them every 20 ms instead: 2000 connections that each
/// live for well under a read's interval all reach the table, opened and closed, none lost.
/// eBPF mode only: poll mode has no rings.
#[test]
fn events_flow_when_the_rings_are_polled() {
    require_root();
    let ns = Netns::new("ringpoll");
    let agent = Agent::start_env(&ns, "ebpf", "", "", &[("HOLDFAST_RING_WAIT", "off")]);
    let count = |s: &serde_json::Value, k: &str| s["table"][k].as_u64().unwrap_or(0);
    let before = agent.status();
    let o = ns
        .cmd(&helper_bin("hf-load"))
        .args(["churn", "127.0.0.1:7400", "2000"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = wait_for(
        Duration::from_secs(5),
        "both ends of 2000 connections opened and closed",
        || {
            let st = agent.status();
            let opened = count(&st, "opened") - count(&before, "opened");
            let closed = count(&st, "closed") - count(&before, "closed");
            if opened >= 4000 && closed >= 4000 {
                Ok(st)
            } else {
                Err(format!("opened {opened}, closed {closed}: {st}"))
            }
        },
    );
    assert_eq!(st["events_lost"], 0, "{st}");
    let log = agent.stderr();
    assert!(log.contains("draining the event rings every 20 ms"), "{log}");
}
