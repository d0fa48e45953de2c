use super::*;
use crate::model::flow::TableCounters;
use crate::model::observe::{Coverage, PidHint, SockSample, TcpSample};
use foldhash::HashMapExt;
use std::num::NonZeroU16;

const S: Nanos = 1_000_000_000;

fn ev(cookie: u64, state: u8, ts: Nanos) -> Event {
    Event {
        kind: EventKind::State,
        cookie,
        netns: 0,
        ts,
        old_state: 0,
        state,
        local: "10.0.0.1:4000".parse().unwrap(),
        remote: "10.0.0.2:22".parse().unwrap(),
        pid_hint: None,
        err: 0,
        had_file: false,
        count: 0,
    }
}

fn sock(cookie: u64, state: u8, inode: u64) -> SockSample {
    SockSample {
        cookie,
        state,
        local: "10.0.0.1:4000".parse().unwrap(),
        remote: "10.0.0.2:22".parse().unwrap(),
        inode,
        uid: 0,
        tcp: Some(TcpSample {
            last_data_sent_ms: 500,
            last_data_recv_ms: 700,
            last_ack_recv_ms: 600,
            ..Default::default()
        }),
    }
}

fn snap(started: Nanos, finished: Nanos, socks: Vec<SockSample>) -> Snapshot {
    Snapshot {
        netns: 0,
        started,
        finished,
        socks,
        coverage: Coverage::Complete,
        time_wait: None,
    }
}

#[test]
fn filtered_snapshots_keep_absent_flows_and_bound_their_idle() {
    let mut t = FlowTable::default();
    t.apply_snapshot(
        &snap(S, S, vec![sock(1, tcp_state::ESTABLISHED, 5)]),
        &HashMap::new(),
    );
    // 100 s later the kernel leaves flow 1 out: it was active within 2 s.
    let filtered = Snapshot {
        netns: 0,
        started: 101 * S,
        finished: 101 * S,
        socks: vec![],
        coverage: Coverage::Filtered { idle_ms: 2_000 },
        time_wait: None,
    };
    t.apply_snapshot(&filtered, &HashMap::new());
    let v = t.get(1).expect("kept").view(101 * S, None);
    assert_eq!(v.idle_ms, Some(2_000), "bounded by the filter, not 100 s");
}

fn idle_sock(cookie: u64, idle_ms: u32) -> SockSample {
    let mut s = sock(cookie, tcp_state::ESTABLISHED, cookie + 100);
    s.tcp = Some(TcpSample {
        last_data_sent_ms: idle_ms,
        last_data_recv_ms: idle_ms,
        last_ack_recv_ms: idle_ms,
        ..Default::default()
    });
    s
}

#[test]
fn a_flow_idle_past_the_filter_and_left_out_keeps_its_exact_idle() {
    let mut t = FlowTable::default();
    // Reported idle 500 s (past the 460 s threshold), then left out: it has not moved.
    t.apply_snapshot(
        &snap(S, S, vec![idle_sock(1, 500_000), idle_sock(2, 1_000)]),
        &HashMap::new(),
    );
    let filtered = Snapshot {
        netns: 0,
        started: 61 * S,
        finished: 61 * S,
        socks: vec![],
        coverage: Coverage::Filtered { idle_ms: 460_000 },
        time_wait: None,
    };
    t.apply_snapshot(&filtered, &HashMap::new());
    let idle = |c: u64| t.get(c).unwrap().view(61 * S, None).idle_ms;
    assert_eq!(
        idle(1),
        Some(560_000),
        "extrapolated exactly, not capped at the threshold"
    );
    assert_eq!(idle(2), Some(61_000), "a calm flow ages as before");
    assert!(
        !t.get(1).unwrap().sample_aged(),
        "the idle flow's sample is the kernel's"
    );
}

#[test]
fn calm_until_is_the_first_moment_a_left_out_flow_can_reach_the_filter() {
    let mut t = FlowTable::default();
    assert_eq!(
        t.calm_until(460_000),
        Some(Nanos::MAX),
        "no flows: nothing can cross"
    );
    t.apply_snapshot(
        &snap(10 * S, 10 * S, vec![idle_sock(1, 100_000), idle_sock(2, 400_000)]),
        &HashMap::new(),
    );
    // Flow 2 reaches 460 s of idle 60 s after its sample; one second of slack.
    assert_eq!(t.calm_until(460_000), Some(10 * S + 59 * S));
    // One already past the threshold needs every read until the forecast judged it quiet...
    t.apply_snapshot(
        &snap(
            20 * S,
            20 * S,
            vec![
                idle_sock(1, 110_000),
                idle_sock(2, 410_000),
                idle_sock(3, 470_000),
            ],
        ),
        &HashMap::new(),
    );
    assert_eq!(t.calm_until(460_000), None);
    t.set_quiet(&[(1, 300 * S, true), (2, 300 * S, true), (3, 30 * S, true)]);
    // ...then a read confirms it before its quiet ends (it may have moved unseen)...
    assert_eq!(t.calm_until(460_000), Some(29 * S));
    // ...or none at all when nothing it does unseen can change its verdict.
    t.set_quiet(&[(3, 50 * S, false)]);
    assert_eq!(t.calm_until(460_000), Some(10 * S + 59 * S));
    // So does one in trouble.
    let mut t = FlowTable::default();
    let mut s = idle_sock(4, 1_000);
    if let Some(x) = s.tcp.as_mut() {
        x.retransmits = 1;
    }
    t.apply_snapshot(&snap(S, S, vec![s]), &HashMap::new());
    assert_eq!(t.calm_until(460_000), None);
    // A flow with keepalive on may be probing a dead peer once it has idled its keepalive
    // time: reads are needed from then on (the kernel reports probes outstanding, no event).
    let mut t = FlowTable::default();
    let mut s = idle_sock(6, 1_000);
    if let Some(x) = s.tcp.as_mut() {
        x.keepalive = Some(true);
        x.keepalive_idle_s = NonZeroU16::new(3);
    }
    t.apply_snapshot(&snap(S, S, vec![s.clone()]), &HashMap::new());
    assert_eq!(
        t.calm_until(460_000),
        Some(S + 2 * S - S),
        "probing no sooner than 2 s on"
    );
    if let Some(x) = s.tcp.as_mut() {
        x.last_ack_recv_ms = 5_000;
        x.last_data_recv_ms = 5_000;
        x.last_data_sent_ms = 5_000;
    }
    t.apply_snapshot(&snap(5 * S, 5 * S, vec![s]), &HashMap::new());
    assert_eq!(t.calm_until(460_000), None, "past its keepalive time");
    // And an ESTABLISHED flow known only from an event (no sample yet)...
    let mut t = FlowTable::default();
    t.apply_event(&ev(5, tcp_state::ESTABLISHED, S));
    assert_eq!(t.calm_until(460_000), None);
    // ...until a read that began after it appeared left it out (the kernel no longer lists it).
    let mut filtered = snap(2 * S, 2 * S, vec![]);
    filtered.coverage = Coverage::Filtered { idle_ms: 460_000 };
    t.apply_snapshot(&filtered, &HashMap::new());
    assert_eq!(t.calm_until(460_000), Some(Nanos::MAX));
}

#[test]
fn a_change_to_the_flow_ends_its_quiet() {
    let mut t = FlowTable::default();
    t.apply_snapshot(&snap(S, S, vec![idle_sock(1, 1_000)]), &HashMap::new());
    t.set_quiet(&[(1, 30 * S, true)]);
    assert_eq!(t.get(1).unwrap().quiet_until, 30 * S);
    let mut e = ev(1, tcp_state::ESTABLISHED, 2 * S);
    e.kind = EventKind::Retransmit;
    t.apply_event(&e);
    assert_eq!(t.get(1).unwrap().quiet_until, 0, "an event");
    t.set_quiet(&[(1, 30 * S, true)]);
    t.apply_snapshot(&snap(3 * S, 3 * S, vec![idle_sock(1, 100)]), &HashMap::new());
    assert_eq!(t.get(1).unwrap().quiet_until, 0, "a sample showing it moved");
    t.set_quiet(&[(1, 30 * S, true)]);
    t.unquiet(None);
    assert_eq!(t.get(1).unwrap().quiet_until, 0, "a new policy");
}

#[test]
fn the_detectors_see_what_changed_and_what_fell_due() {
    let mut t = FlowTable::default();
    t.apply_snapshot(
        &snap(S, S, vec![idle_sock(1, 1_000), idle_sock(2, 1_000)]),
        &HashMap::new(),
    );
    let mut j = t.to_judge(2 * S);
    j.sort_unstable();
    assert_eq!(j, vec![1, 2], "new flows are judged");
    t.set_quiet(&[(1, 10 * S, true), (2, Nanos::MAX, false)]);
    assert!(t.to_judge(5 * S).is_empty(), "quiet flows are not");
    assert_eq!(t.to_judge(10 * S), vec![1], "until their time comes");
    t.set_quiet(&[(1, 20 * S, true)]);
    // A change wakes a flow quiet for good; its stale wheel entry is ignored.
    let mut e = ev(2, tcp_state::CLOSE_WAIT, 11 * S);
    e.netns = 0;
    t.apply_event(&e);
    assert_eq!(t.to_judge(12 * S), vec![2]);
    assert_eq!(
        t.notable().map(|f| f.cookie).collect::<Vec<_>>(),
        vec![2],
        "a closing state is notable"
    );
    // The ledger counted flow 2 (its tally is kept on the flow).
    let counted = crate::model::flow::Tally::counted(0, 3, 77);
    t.retally(Some(&[2]), |_| counted);
    t.apply_event(&ev(2, tcp_state::CLOSE, 13 * S));
    assert_eq!(t.notable().count(), 0, "gone");
    assert!(t.to_judge(14 * S).is_empty());
    // The ledger hears of every change once, and of a close with the tally it counted.
    let mut ch = t.take_ledger_changes().unwrap();
    ch.sort_unstable();
    assert_eq!(ch, vec![1, 2]);
    assert_eq!(t.take_ledger_changes(), Some(vec![]));
    assert_eq!(t.take_ledger_gone(), vec![(counted, 1)]);
    assert_eq!(t.take_ledger_gone(), vec![], "once");
    // A flow the ledger never counted closes without a word to it.
    t.apply_event(&ev(1, tcp_state::CLOSE, 15 * S));
    assert_eq!(t.take_ledger_gone(), vec![]);
}

#[test]
fn a_storm_between_two_counts_makes_the_ledger_recount_and_then_follow_changes_again() {
    let mut t = FlowTable::default();
    // Flows opened and closed between two counts: past the bound, one recount instead.
    let n = super::LEDGER_CHANGES_MAX as u64 + 1;
    for c in 1..n {
        t.apply_event(&ev(c, tcp_state::ESTABLISHED, S));
        t.apply_event(&ev(c, tcp_state::CLOSE, S + 1));
    }
    t.apply_event(&ev(n, tcp_state::ESTABLISHED, 2 * S));
    assert!(
        t.marks.ledger.is_empty(),
        "the storm's cookies are not kept: {}",
        t.marks.ledger.len()
    );
    assert_eq!(t.take_ledger_changes(), None, "a storm: recount");
    assert_eq!(t.take_ledger_changes(), Some(vec![]), "counted: nothing new");
    assert_eq!(
        t.to_judge(3 * S),
        vec![n],
        "the forecast still sees the live flow"
    );
    t.apply_event(&ev(n, tcp_state::CLOSE_WAIT, 3 * S));
    assert_eq!(
        t.take_ledger_changes(),
        Some(vec![n]),
        "changes are followed again"
    );
    assert_eq!(t.notable().map(|f| f.cookie).collect::<Vec<_>>(), vec![n]);
    t.maintain(4 * S);
    let room = (t.marks.awake.capacity(), t.marks.ledger.capacity());
    assert!(
        room.0 < 4096 * 4 && room.1 < 4096 * 4,
        "the storm's marks give their room back: {room:?}"
    );
}

#[test]
fn a_read_showing_a_flow_as_foretold_keeps_its_judgements() {
    let mut t = FlowTable::default();
    t.apply_snapshot(
        &snap(S, S, vec![idle_sock(1, 1_000), idle_sock(2, 1_000)]),
        &HashMap::new(),
    );
    t.to_judge(S);
    t.set_quiet(&[(1, 100 * S, true), (2, 100 * S, true)]);
    let _ = t.take_ledger_changes();
    // 10 s later: flow 1 idle 11 s (it did nothing), flow 2 idle 0.5 s (it moved).
    t.apply_snapshot(
        &snap(11 * S, 11 * S, vec![idle_sock(1, 11_000), idle_sock(2, 500)]),
        &HashMap::new(),
    );
    assert_eq!(t.get(1).unwrap().quiet_until, 100 * S, "unmoved: still quiet");
    assert_eq!(t.get(2).unwrap().quiet_until, 0, "moved: judged again");
    assert_eq!(t.to_judge(12 * S), vec![2]);
    assert_eq!(t.take_ledger_changes(), Some(vec![2]));
    assert_eq!(t.get(1).unwrap().tcp_at, 11 * S, "the sample itself is fresh");
}

#[test]
fn events_open_and_close_flows() {
    let mut t = FlowTable::default();
    let mut e = ev(1, tcp_state::SYN_SENT, S);
    e.local.set_port(0);
    e.pid_hint = Some(PidHint {
        pid: 9,
        comm: "ssh".into(),
    });
    assert!(t.apply_event(&e));
    assert!(!t.apply_event(&ev(1, tcp_state::ESTABLISHED, 2 * S)));
    let f = t.get(1).unwrap();
    assert_eq!(f.state, tcp_state::ESTABLISHED);
    assert_eq!(f.local().port(), 4000, "the tuple is completed by later events");
    assert_eq!(f.state_since(), Some(2 * S));
    assert_eq!(f.view(5 * S, None).pid, Some(9));
    t.apply_event(&ev(1, tcp_state::CLOSE, 3 * S));
    assert!(t.get(1).is_none());
    assert_eq!(
        t.counters,
        TableCounters {
            opened: 1,
            closed: 1,
            time_wait_now: 0,
            time_wait_total: 0,
        }
    );
}

#[test]
fn snapshot_adds_preexisting_flows_with_unknown_state_age() {
    let mut t = FlowTable::default();
    let owners: HashMap<u64, _> = [(
        50u64,
        std::sync::Arc::new(Owner {
            pid: 3,
            comm: "sshd".into(),
            cgroup: None,
            unit: None,
        }),
    )]
    .into_iter()
    .collect();
    t.apply_snapshot(
        &snap(10 * S, 11 * S, vec![sock(7, tcp_state::ESTABLISHED, 50)]),
        &owners,
    );
    let v = t.get(7).unwrap().view(13 * S, None);
    assert_eq!(v.state_age_ms, None);
    assert_eq!(v.pid, Some(3));
    assert_eq!(
        v.last_data_sent_ms,
        Some(2500),
        "ages advance from the sample time"
    );
    assert_eq!(v.idle_ms, Some(2500));
}

#[test]
fn the_connect_hint_goes_once_the_owner_is_known() {
    let mut t = FlowTable::default();
    let mut e = ev(8, tcp_state::SYN_SENT, S);
    e.pid_hint = Some(PidHint {
        pid: 9,
        comm: "ssh".into(),
    });
    t.apply_event(&e);
    assert_eq!(
        t.get(8).unwrap().view(2 * S, None).pid,
        Some(9),
        "the hint until then"
    );
    let owners: HashMap<u64, _> = [(
        60u64,
        std::sync::Arc::new(Owner {
            pid: 9,
            comm: "ssh".into(),
            cgroup: None,
            unit: None,
        }),
    )]
    .into_iter()
    .collect();
    t.apply_snapshot(
        &snap(2 * S, 3 * S, vec![sock(8, tcp_state::ESTABLISHED, 60)]),
        &owners,
    );
    let f = t.get(8).unwrap();
    assert!(f.pid_hint().is_none(), "no box and string kept beside the owner");
    let v = f.view(4 * S, None);
    assert_eq!((v.pid, v.comm.as_deref()), (Some(9), Some("ssh")));
}

#[test]
fn snapshot_drops_flows_closed_unseen_but_not_newer_ones() {
    let mut t = FlowTable::default();
    t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
    t.apply_event(&ev(2, tcp_state::ESTABLISHED, 5 * S)); // born while the snapshot ran
    t.apply_snapshot(&snap(4 * S, 6 * S, vec![]), &HashMap::new());
    assert!(t.get(1).is_none(), "closed without an event (lost or poll mode)");
    assert!(t.get(2).is_some(), "newer than the snapshot's start");
}

#[test]
fn stale_snapshot_cannot_resurrect_a_closed_flow() {
    let mut t = FlowTable::default();
    t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
    t.apply_event(&ev(1, tcp_state::CLOSE, 3 * S));
    assert!(t.tombstones.contains_key(&1), "the close left a tombstone");
    // A read that began before the close still lists the socket: it is not brought back, while
    // the same read's other socket is taken (the read was applied).
    t.apply_snapshot(
        &snap(
            2 * S,
            4 * S,
            vec![
                sock(1, tcp_state::ESTABLISHED, 0),
                sock(2, tcp_state::ESTABLISHED, 0),
            ],
        ),
        &HashMap::new(),
    );
    assert!(t.get(1).is_none());
    assert!(t.get(2).is_some(), "the read was applied");
    // Tombstones expire.
    assert!(t.tombstones.contains_key(&1));
    t.apply_snapshot(&snap(100 * S, 100 * S, vec![]), &HashMap::new());
    assert!(!t.tombstones.contains_key(&1), "expired");
}

#[test]
fn time_wait_is_counted_not_tracked() {
    let mut t = FlowTable::default();
    t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
    t.apply_event(&ev(1, tcp_state::TIME_WAIT, 2 * S));
    assert!(t.is_empty());
    t.apply_snapshot(
        &snap(3 * S, 3 * S, vec![sock(1, tcp_state::TIME_WAIT, 0)]),
        &HashMap::new(),
    );
    assert!(t.is_empty());
    assert_eq!((t.counters.time_wait_now, t.counters.time_wait_total), (1, 1));
}

#[test]
fn poll_mode_state_changes_are_dated_by_the_snapshot() {
    let mut t = FlowTable::default();
    t.apply_snapshot(
        &snap(S, S, vec![sock(4, tcp_state::ESTABLISHED, 1)]),
        &HashMap::new(),
    );
    t.apply_snapshot(
        &snap(2 * S, 2 * S, vec![sock(4, tcp_state::CLOSE_WAIT, 1)]),
        &HashMap::new(),
    );
    let f = t.get(4).unwrap();
    assert_eq!(f.state, tcp_state::CLOSE_WAIT);
    assert_eq!(f.state_since(), Some(2 * S));
}

#[test]
fn resets_and_errors_are_counted() {
    let mut t = FlowTable::default();
    t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
    let mut r = ev(1, tcp_state::ESTABLISHED, 2 * S);
    r.kind = EventKind::RecvRst;
    t.apply_event(&r);
    r.kind = EventKind::Error;
    r.err = 104;
    t.apply_event(&r);
    let f = t.get(1).unwrap();
    assert_eq!((f.resets_recv(), f.last_error()), (1, Some(104)));
}

#[test]
fn a_snapshot_of_one_namespace_never_drops_another_namespaces_flows() {
    let mut t = FlowTable::default();
    let mut a = ev(1, tcp_state::ESTABLISHED, S);
    a.netns = 10;
    let mut b = ev(2, tcp_state::ESTABLISHED, S);
    b.netns = 20;
    t.apply_event(&a);
    t.apply_event(&b);
    let mut s = snap(4 * S, 5 * S, vec![]);
    s.netns = 10;
    t.apply_snapshot(&s, &HashMap::new());
    assert!(t.get(1).is_none(), "closed unseen in its own namespace");
    assert!(t.get(2).is_some(), "another namespace's flow stays");
    assert_eq!(t.drop_netns(20, 6 * S), 1);
    assert!(t.is_empty());
}

#[test]
fn an_error_after_the_close_event_joins_the_closed_record() {
    let mut t = FlowTable::default();
    t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
    t.apply_event(&ev(1, tcp_state::CLOSE, 2 * S));
    let mut err = ev(1, tcp_state::CLOSE, 2 * S + 40_000);
    err.kind = EventKind::Error;
    err.err = 110;
    t.apply_event(&err);
    assert!(t.take_closed(2 * S + 1_000_000).is_empty(), "settling");
    let closed = t.take_closed(3 * S);
    assert_eq!(closed.len(), 1);
    assert_eq!(
        closed[0].0.last_error(),
        Some(110),
        "ETIMEDOUT after the close is kept"
    );
}

#[test]
fn tombstones_expire_and_storm_memory_comes_back() {
    let mut t = FlowTable::default();
    for c in 0..50_000u64 {
        t.apply_event(&ev(c, tcp_state::ESTABLISHED, S));
        t.apply_event(&ev(c, tcp_state::CLOSE, S));
    }
    assert_eq!(t.tombstones(), 50_000);
    t.take_closed(10 * S);
    assert!(t.maintain(100 * S), "shrinks after the storm");
    assert_eq!(t.tombstones(), 0);
    assert!(t.flows.capacity() < 8192 && t.tombstones.capacity() < 8192);
}

#[test]
fn find_by_cookie_or_unique_local_address() {
    let mut t = FlowTable::default();
    t.apply_event(&ev(1, tcp_state::ESTABLISHED, S));
    assert_eq!(t.find("cookie:1").unwrap().cookie, 1);
    assert_eq!(t.find("1").unwrap().cookie, 1);
    assert_eq!(t.find("10.0.0.1:4000").unwrap().cookie, 1);
    let mut other = ev(2, tcp_state::ESTABLISHED, S);
    other.netns = 7;
    t.apply_event(&other);
    assert!(t.find("10.0.0.1:4000").unwrap_err().contains("2 flows"));
    assert!(t.find("nonsense").unwrap_err().contains("neither cookie:N"));
    assert!(
        t.find("cookie:99")
            .unwrap_err()
            .contains("no flow with cookie 99")
    );
}

#[test]
fn samples_record_survived_idles_and_the_idle_before_trouble() {
    let mut t = FlowTable::default();
    let idle = |ack: u32, retx: u8| {
        let mut s = sock(1, tcp_state::ESTABLISHED, 5);
        if let Some(x) = s.tcp.as_mut() {
            x.last_ack_recv_ms = ack;
            x.retransmits = retx;
            x.unacked = u32::from(retx > 0);
        }
        s
    };
    let none = HashMap::new();
    t.apply_snapshot(&snap(S, S, vec![idle(12_000, 0)]), &none);
    // An ACK came since: the path survived 12 s idle.
    t.apply_snapshot(&snap(2 * S, 2 * S, vec![idle(300, 0)]), &none);
    assert_eq!(t.take_survivals(), vec![(1, 12_000)]);
    assert!(t.take_survivals().is_empty());
    // Idle 20 s, then the send goes unanswered: the first retransmission event dates it.
    t.apply_snapshot(&snap(3 * S, 3 * S, vec![idle(20_000, 0)]), &none);
    let mut e = ev(1, tcp_state::ESTABLISHED, 8 * S);
    e.kind = EventKind::Retransmit;
    t.apply_event(&e);
    assert_eq!(t.get(1).unwrap().trouble_idle_ms(), 25_000 - 200);
    // Without events (poll mode) the first sample that shows the retransmission does.
    let mut p = FlowTable::default();
    p.apply_snapshot(&snap(S, S, vec![idle(20_000, 0)]), &none);
    p.apply_snapshot(&snap(2 * S, 2 * S, vec![idle(21_000, 1)]), &none);
    p.apply_snapshot(&snap(3 * S, 3 * S, vec![idle(22_000, 2)]), &none);
    assert_eq!(p.get(1).unwrap().trouble_idle_ms(), 21_000);
    assert!(p.take_survivals().is_empty(), "no ACK came: nothing survived");
    // A sample aged by a filtered read is a capped estimate: a retransmission does not date the
    // send from it; the next real sample (troubled flows are always reported) does.
    let mut q = FlowTable::default();
    q.apply_snapshot(&snap(S, S, vec![idle(1_000, 0)]), &none);
    let filtered = Snapshot {
        coverage: Coverage::Filtered { idle_ms: 10_000 },
        ..snap(30 * S, 30 * S, vec![])
    };
    q.apply_snapshot(&filtered, &none);
    let mut e = ev(1, tcp_state::ESTABLISHED, 31 * S);
    e.kind = EventKind::Retransmit;
    q.apply_event(&e);
    assert_eq!(
        q.get(1).unwrap().trouble_idle_ms(),
        0,
        "not from a capped estimate"
    );
    q.apply_snapshot(&snap(32 * S, 32 * S, vec![idle(31_500, 1)]), &none);
    assert_eq!(q.get(1).unwrap().trouble_idle_ms(), 31_500);
}

#[test]
fn an_answered_probe_makes_the_flow_fresh() {
    let mut t = FlowTable::default();
    let mut s = sock(1, tcp_state::ESTABLISHED, 5);
    {
        let x = s.tcp.as_mut().unwrap();
        x.last_ack_recv_ms = 9_000;
        x.probes = 1;
        x.timer = crate::model::observe::Timer::Keepalive;
        x.keepalive_idle_s = NonZeroU16::new(10);
        x.timer_expires_ms = 0;
    }
    t.apply_snapshot(&snap(0, 10 * S, vec![s]), &HashMap::new());
    let mut sent = ev(1, tcp_state::ESTABLISHED, 10 * S + 1);
    sent.kind = EventKind::ProbeSent;
    t.apply_event(&sent);
    let mut ans = ev(1, tcp_state::ESTABLISHED, 12 * S);
    ans.kind = EventKind::ProbeAnswered;
    ans.err = 80;
    t.apply_event(&ans);
    let f = t.get(1).unwrap();
    let x = f.tcp.as_ref().unwrap();
    assert_eq!(
        (x.last_ack_recv_ms, x.probes, x.timer_expires()),
        (0, 0, Some(10_000))
    );
    assert_eq!(x.last_data_sent_ms, 500 + 2_000, "data idles aged to the answer");
    assert_eq!(f.tcp_at, 12 * S);
    assert_eq!(f.idle_ms(13 * S), Some(1_000));
    let w = f.wire().unwrap();
    assert_eq!((w.sent, w.answered, w.last_rtt_us), (1, 1, Some(80)));
    // Probe events never create a flow.
    let mut stray = ev(2, tcp_state::ESTABLISHED, 12 * S);
    stray.kind = EventKind::ProbeSent;
    t.apply_event(&stray);
    assert!(t.get(2).is_none());
}

#[test]
fn a_query_read_refreshes_only_the_flows_it_named() {
    let mut t = FlowTable::default();
    let mut iter_sample = sock(1, tcp_state::ESTABLISHED, 5);
    if let Some(x) = iter_sample.tcp.as_mut() {
        x.keepalive = Some(true);
        x.keepalive_idle_s = NonZeroU16::new(30);
        x.keepalive_intvl_s = NonZeroU16::new(5);
        x.keepalive_cnt = NonZeroU16::new(3);
    }
    t.apply_snapshot(
        &snap(S, S, vec![iter_sample, sock(2, tcp_state::ESTABLISHED, 6)]),
        &HashMap::new(),
    );
    // The query names flow 1: sock_diag's exact read (no per-socket keepalive settings) shows
    // it moved 40 ms ago. A socket the agent never met comes with it and is left to the next
    // read; flow 2, not named, is neither closed nor aged.
    let mut fresh = sock(1, tcp_state::ESTABLISHED, 5);
    if let Some(x) = fresh.tcp.as_mut() {
        x.last_data_sent_ms = 40;
        x.keepalive = Some(true);
    }
    let mut q = snap(10 * S, 10 * S, vec![fresh, sock(9, tcp_state::ESTABLISHED, 7)]);
    q.coverage = Coverage::Targeted;
    t.apply_snapshot(&q, &HashMap::new());
    let f = t.get(1).unwrap();
    let x = f.tcp.as_ref().unwrap();
    assert_eq!(
        (x.last_data_sent_ms, f.tcp_at),
        (40, 10 * S),
        "the fresh values, read now"
    );
    assert_eq!(
        (x.keepalive_idle_s, x.keepalive_intvl_s, x.keepalive_cnt),
        (NonZeroU16::new(30), NonZeroU16::new(5), NonZeroU16::new(3)),
        "the iterator's settings stand"
    );
    assert!(t.get(9).is_none(), "a socket not named is not created by a query");
    let two = t.get(2).unwrap();
    assert_eq!(two.tcp_at, S, "a flow not named keeps its sample");
    assert_eq!(t.len(), 2);
}

#[test]
fn a_left_out_flow_under_the_threshold_is_not_judged_again() {
    let mut t = FlowTable::default();
    t.apply_snapshot(&snap(S, S, vec![idle_sock(1, 1_000)]), &HashMap::new());
    t.to_judge(S);
    t.set_quiet(&[(1, 400 * S, true)]);
    let filtered = |at: Nanos| Snapshot {
        netns: 0,
        started: at,
        finished: at,
        socks: vec![],
        coverage: Coverage::Filtered { idle_ms: 60_000 },
        time_wait: None,
    };
    // 10 s later, left out: idle 11 s by its sample, under the 60 s threshold. Nothing new.
    t.apply_snapshot(&filtered(11 * S), &HashMap::new());
    assert!(t.to_judge(11 * S).is_empty(), "the sample foretold it");
    assert_eq!(t.get(1).unwrap().view(11 * S, None).idle_ms, Some(11_000));
    // 100 s on, left out again: it was active within 60 s, which its sample did not foretell.
    t.apply_snapshot(&filtered(101 * S), &HashMap::new());
    assert_eq!(t.to_judge(101 * S), vec![1], "bounded, judged again");
    assert_eq!(t.get(1).unwrap().view(101 * S, None).idle_ms, Some(60_000));
    t.set_quiet(&[(1, 400 * S, true)]);
    // And again: the same bound, no news.
    t.apply_snapshot(&filtered(111 * S), &HashMap::new());
    assert!(t.to_judge(111 * S).is_empty(), "the same bound again");
    assert_eq!(t.get(1).unwrap().view(111 * S, None).idle_ms, Some(60_000));
}

#[test]
fn a_quiet_flow_moved_by_a_close_still_falls_due() {
    let mut t = FlowTable::default();
    t.apply_snapshot(
        &snap(
            S,
            S,
            vec![idle_sock(1, 1_000), idle_sock(2, 1_000), idle_sock(3, 1_000)],
        ),
        &HashMap::new(),
    );
    t.to_judge(S);
    t.set_quiet(&[(2, 20 * S, true), (3, 10 * S, true)]);
    // Flow 1 closes: the last flow (3) moves into its place; then 2 closes and 3 moves again.
    t.apply_event(&ev(1, tcp_state::CLOSE, 2 * S));
    t.apply_event(&ev(2, tcp_state::CLOSE, 3 * S));
    assert!(t.to_judge(9 * S).iter().all(|c| *c != 3), "not before its time");
    assert_eq!(t.to_judge(10 * S), vec![3], "due at its time, wherever it is");
    assert_eq!(t.get(3).unwrap().quiet_until, 0);
    t.set_quiet(&[(3, 30 * S, true)]);
    assert!(t.to_judge(25 * S).is_empty(), "its stale entries wake nothing");
}

#[test]
fn a_flow_keeps_its_owner_and_one_long_without_is_reported_for_a_lookup() {
    let mut t = FlowTable::default();
    let owner = std::sync::Arc::new(Owner {
        pid: 3,
        comm: "sshd".into(),
        cgroup: None,
        unit: None,
    });
    let owners: HashMap<u64, _> = [(50u64, owner.clone())].into_iter().collect();
    let socks = |at| {
        snap(
            at,
            at,
            vec![
                sock(7, tcp_state::ESTABLISHED, 50),
                sock(8, tcp_state::ESTABLISHED, 51),
            ],
        )
    };
    t.apply_snapshot(&socks(S), &owners);
    assert!(
        t.take_unowned().is_empty(),
        "flow 8 is young: its owner may still come"
    );
    // Later reads carry no owners (each is handed out once): flow 7 keeps its own.
    t.apply_snapshot(&socks(12 * S), &HashMap::new());
    assert_eq!(t.get(7).and_then(|f| f.owner.as_ref()).map(|o| o.pid), Some(3));
    assert_eq!(t.take_unowned(), vec![51], "flow 8, 11 s without an owner");
    assert!(t.take_unowned().is_empty(), "taken");
    // A filtered read is not a census of owners.
    let filtered = Snapshot {
        coverage: Coverage::Filtered { idle_ms: 100 },
        ..socks(13 * S)
    };
    t.apply_snapshot(&filtered, &HashMap::new());
    assert!(t.take_unowned().is_empty());
    let late: HashMap<u64, _> = [(51u64, owner)].into_iter().collect();
    t.apply_snapshot(&socks(14 * S), &late);
    assert!(t.take_unowned().is_empty(), "found");
    assert_eq!(t.get(8).and_then(|f| f.owner.as_ref()).map(|o| o.pid), Some(3));
}
