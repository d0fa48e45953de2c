//! Scenario tests for the flow table (issue 2), each in a fresh network namespace, in both modes.
use std::time::Duration;

use holdfast_tests::{Agent, Netns, Peer, both_modes, find_flow, require_root, wait_for};

/// A client/server pair connects: both ends appear within 1 s with the right tuple, ESTABLISHED
/// and the right owner pid; the client closes: both ends leave within 1 s.
fn connect_then_close(mode: &str) {
    require_root();
    let ns = Netns::new("flows");
    let agent = Agent::start(&ns, mode, "");
    let status = agent.json(&["status", "--json"]).unwrap();
    assert_eq!(status["mode"], mode, "status: {status}");

    let server = Peer::spawn(&ns, "listen", "127.0.0.1:0");
    let server_addr = server.addr();
    let mut client = Peer::spawn(&ns, "connect", &server_addr);
    let client_addr = client.addr();

    let (c, s) = wait_for(
        Duration::from_secs(1),
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
    let (code, table, _) = agent.cli(&[
        "flows",
        "--port",
        &server_addr.rsplit(':').next().unwrap().to_string(),
    ]);
    assert_eq!(code, 0);
    assert!(
        table.contains(&client_addr) && table.contains(&format!("{}/hf-peer", client.pid())),
        "{table}"
    );

    assert_eq!(client.tell("close"), "closed");
    wait_for(Duration::from_secs(1), "both ends to leave the table", || {
        let flows = agent.flows();
        match (
            find_flow(&flows, &client_addr, &server_addr),
            find_flow(&flows, &server_addr, &client_addr),
        ) {
            (None, None) => Ok(()),
            (a, b) => Err(format!("still listed: {a:?} {b:?}")),
        }
    });
    let status = agent.json(&["status", "--json"]).unwrap();
    assert!(status["snapshots"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(status["events_lost"], 0, "{status}");
    if mode == "ebpf" {
        assert!(
            status["events"].as_u64().unwrap() >= 4,
            "state events were counted: {status}"
        );
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

/// Keepalive state and timer are reported per socket.
fn keepalive_is_visible(mode: &str) {
    require_root();
    let ns = Netns::new("ka");
    let agent = Agent::start(&ns, mode, "");
    let server = Peer::spawn(&ns, "listen", "127.0.0.1:0");
    let client = Peer::spawn(&ns, "connect", &server.addr());
    let (server_addr, client_addr) = (server.addr(), client.addr());
    let f = wait_for(Duration::from_secs(3), "the flow with tcp_info", || {
        let flows = agent.flows();
        let f = find_flow(&flows, &client_addr, &server_addr)
            .cloned()
            .ok_or("missing")?;
        if f["keepalive"].is_boolean() {
            Ok(f)
        } else {
            Err(f.to_string())
        }
    });
    assert_eq!(
        f["keepalive"], false,
        "the test peer does not set SO_KEEPALIVE: {f}"
    );
}
both_modes!(keepalive_is_visible);
