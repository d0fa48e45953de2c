use super::*;
use crate::detect::FakeEnv;
use crate::detect::eviction::tests::{flow, policy};
use crate::detect::eviction::{EvictionDetector, Pass};
use crate::findings::Family;
use crate::model::finding::Transition;
use std::time::Duration;

const S: Nanos = SEC;

fn pass(d: &mut EvictionDetector, now: Nanos, f: &Flow, r: &KeepaliveRemedy) -> Pass {
    let pol = policy();
    d.evaluate(now, [f].into_iter(), &[], &pol, &mut FakeEnv::default(), &|c| {
        r.watches(c)
    })
}

#[test]
fn plans_keepalive_below_the_timeout() {
    let k = KeepaliveSection::default();
    let v = |i, n, c| KaValues {
        idle_s: i,
        intvl_s: n,
        cnt: c,
    };
    assert_eq!(plan(350, &k).unwrap(), v(175, 43, 4));
    let x = plan(240, &k).unwrap();
    assert!(x.refresh_s() < 240 && x.detection_s() <= 240);
    assert!(plan(20, &k).unwrap_err().contains("keepalive.floor"));
    let lab = KeepaliveSection {
        floor: Duration::from_secs(2),
        ..Default::default()
    };
    assert_eq!(plan(10, &lab).unwrap(), v(5, 1, 4));
}

#[test]
fn finding_then_remedy_then_verified_resolution() {
    let pol = policy();
    let mut d = EvictionDetector::default();
    let mut r = KeepaliveRemedy::default();
    let mut store = FindingStore::default();
    let f = flow("10.77.2.2:80", 16_000, Some(false));
    let p = pass(&mut d, 100 * S, &f, &r);
    let changes = store.reconcile(Family::Eviction, p.verdicts, 100 * S, |_, _| "gone".into());
    assert_eq!(changes, vec![(1, Transition::New)]);
    let (key, a) = &p.remediable[0];
    let (c, req) = r.consider(100 * S, key, a, &f, &pol.keepalive, &mut store);
    assert!(c.is_none());
    let req = req.expect("a request");
    assert_eq!(
        (req.cookie, req.pid, req.set.map(|v| v.idle_s)),
        (9, Some(77), Some(10))
    );
    // Re-considering while the request is in flight sends nothing more.
    assert_eq!(
        r.consider(100 * S, key, a, &f, &pol.keepalive, &mut store),
        (None, None)
    );
    let before = KaValues {
        idle_s: 7200,
        intvl_s: 75,
        cnt: 9,
    };
    let after = KaValues {
        idle_s: 10,
        intvl_s: 2,
        cnt: 4,
    };
    let res = KaResult {
        cookie: 9,
        before: Some((false, before)),
        after: Some((true, after)),
        error: None,
        via: "test",
    };
    assert_eq!(
        r.on_result(&res, 101 * S, &mut store),
        Some((1, Transition::Action))
    );
    d.learn(9, Some(after));
    let act = &store.get(1).unwrap().actions[0];
    assert!(
        act.outcome.text.starts_with("applied via test"),
        "{}",
        act.outcome.text
    );
    assert!(
        act.outcome.text.contains("before eviction"),
        "the margin is reported"
    );
    assert_eq!(act.outcome.status, OutcomeStatus::Pending);
    // The next sample shows keepalive on: verified, and the finding resolves.
    let mut f2 = flow("10.77.2.2:80", 100, Some(true));
    f2.tcp_at = 102 * S;
    f2.tcp.as_mut().unwrap().timer = crate::model::observe::Timer::Keepalive;
    let p = pass(&mut d, 102 * S, &f2, &r);
    assert!(p.verdicts.is_empty());
    assert_eq!(
        r.verify(102 * S, &f2, None, &mut store),
        Some((1, Transition::Action))
    );
    let changes = store.reconcile(Family::Eviction, p.verdicts, 102 * S, |k, _| {
        r.resolution(match k.scope {
            crate::findings::Scope::Flow(c) => c,
            _ => 0,
        })
        .unwrap_or_default()
    });
    assert_eq!(changes, vec![(1, Transition::Resolved)]);
    let fd = store.get(1).unwrap();
    assert!(fd.actions[0].outcome.text.contains("verified: keepalive on"));
    assert_eq!(fd.actions[0].outcome.status, OutcomeStatus::Succeeded);
    assert!(fd.resolution.as_deref().unwrap().contains("seen armed"));
}

#[test]
fn dry_run_plans_once_and_the_finding_stays_open() {
    let mut pol = policy();
    pol.keepalive.mode = RemedyMode::DryRun;
    let mut d = EvictionDetector::default();
    let mut r = KeepaliveRemedy::default();
    let mut store = FindingStore::default();
    let f = flow("10.77.2.2:80", 17_000, Some(false));
    for i in 0..10 {
        let p = d.evaluate(
            100 * S + i,
            [&f].into_iter(),
            &[],
            &pol,
            &mut FakeEnv::default(),
            &|c| r.watches(c),
        );
        let changes = store.reconcile(Family::Eviction, p.verdicts, 100 * S + i, |_, _| "gone".into());
        assert!(
            changes.iter().all(|c| c.1 != Transition::Resolved),
            "never resolved by a plan"
        );
        for (key, a) in &p.remediable {
            let (_, req) = r.consider(100 * S + i, key, a, &f, &pol.keepalive, &mut store);
            assert!(req.is_none());
        }
    }
    let fd = store.get(1).unwrap();
    assert!(fd.active);
    assert_eq!(fd.actions.len(), 1);
    assert!(
        fd.actions[0]
            .outcome
            .text
            .starts_with("planned: SO_KEEPALIVE=1 TCP_KEEPIDLE=10")
    );
}

#[test]
fn a_failure_is_reported_once_and_not_retried() {
    let pol = policy();
    let mut d = EvictionDetector::default();
    let mut r = KeepaliveRemedy::default();
    let mut store = FindingStore::default();
    let f = flow("10.77.2.2:80", 16_000, Some(false));
    let p = pass(&mut d, 100 * S, &f, &r);
    store.reconcile(Family::Eviction, p.verdicts, 100 * S, |_, _| "gone".into());
    let (key, a) = &p.remediable[0];
    r.consider(100 * S, key, a, &f, &pol.keepalive, &mut store)
        .1
        .unwrap();
    let res = KaResult {
        cookie: 9,
        before: None,
        after: None,
        error: Some("EPERM".into()),
        via: "pidfd",
    };
    r.on_result(&res, 101 * S, &mut store);
    assert_eq!(
        store.get(1).unwrap().actions[0].outcome.status,
        OutcomeStatus::Failed
    );
    assert_eq!(
        r.consider(102 * S, key, a, &f, &pol.keepalive, &mut store),
        (None, None)
    );
    assert_eq!(store.get(1).unwrap().actions.len(), 1);
}

#[test]
fn sets_keepalive_on_a_socket_of_this_process_through_a_pidfd() {
    use std::os::unix::fs::MetadataExt;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&c);
    let inode = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
    let v = KaValues {
        idle_s: 33,
        intvl_s: 7,
        cnt: 3,
    };
    let req = |inode, set| KaRequest {
        cookie: 1,
        netns: 0,
        inode,
        pid: Some(std::process::id()),
        set,
        watch: false,
    };
    let r = pidfd_keepalive(&req(inode, Some(v)));
    if r.error
        .as_deref()
        .is_some_and(|e| e.contains("Operation not permitted"))
    {
        // Not a skip of the feature: without ptrace rights pidfd_getfd cannot work anywhere.
        assert_ne!(
            sys::geteuid(),
            0,
            "root must be able to pidfd_getfd its own fds: {r:?}"
        );
        return;
    }
    assert_eq!(r.error, None);
    assert!(!r.before.unwrap().0);
    assert_eq!(r.after, Some((true, v)));
    assert_eq!(
        sys::keepalive_opts(c.as_fd()).unwrap().1,
        33,
        "the owner's socket changed"
    );
    let missing = pidfd_keepalive(&req(inode + 999_999, None));
    assert!(missing.error.unwrap().contains("no longer holds"));
}

/// With probes watched, the finding stays open until a probe is answered; an unanswered probe is
/// said once; the answer verifies; a death before any answer is said on the action.
/// A flow at risk, keepalive asked for at 100 s (watched on the wire) and applied at 101 s.
fn applied_on_the_wire() -> (KeepaliveRemedy, FindingStore) {
    let pol = policy();
    let mut d = EvictionDetector::default();
    let mut r = KeepaliveRemedy {
        wire: true,
        ..Default::default()
    };
    let mut store = FindingStore::default();
    let f = flow("10.77.2.2:80", 16_000, Some(false));
    let p = pass(&mut d, 100 * S, &f, &r);
    store.reconcile(Family::Eviction, p.verdicts, 100 * S, |_, _| "gone".into());
    let (key, a) = &p.remediable[0];
    let req = r
        .consider(100 * S, key, a, &f, &pol.keepalive, &mut store)
        .1
        .unwrap();
    assert!(req.watch, "watched from the same iterator run");
    assert_eq!(r.wire_wanted(), vec![9]);
    let v = KaValues {
        idle_s: 10,
        intvl_s: 2,
        cnt: 4,
    };
    let res = KaResult {
        cookie: 9,
        before: Some((false, v)),
        after: Some((true, v)),
        error: None,
        via: "test",
    };
    r.on_result(&res, 101 * S, &mut store);
    (r, store)
}

#[test]
fn on_the_wire_a_remedy_is_verified_by_an_answer() {
    let (mut r, mut store) = applied_on_the_wire();
    // A probe left (seen on the wire): armed, not yet verified; the finding stays open.
    let mut g = flow("10.77.2.2:80", 17_000, Some(true));
    g.tcp_at = 100 * S;
    g.wire_mut().on_sent(100 * S + 5, 0);
    assert!(r.verify(101 * S, &g, None, &mut store).is_some());
    assert!(r.awaiting_answer(9));
    let text = |s: &FindingStore| s.get(1).unwrap().actions[0].outcome.text.clone();
    assert!(
        text(&store).contains("waiting for the first probe"),
        "{}",
        text(&store)
    );
    let kept = store.reconcile_until(Family::Eviction, vec![], 101 * S, |_, _| None);
    assert!(
        kept.is_empty() && store.get(1).unwrap().active,
        "open until an answer"
    );
    // Unanswered after the wait: said once.
    assert!(r.verify(102 * S, &g, None, &mut store).is_some());
    assert!(text(&store).contains("1 probe(s) unanswered"), "{}", text(&store));
    assert!(
        r.verify(102 * S + 1, &g, None, &mut store).is_none(),
        "not said twice"
    );
    // The answer verifies.
    g.wire_mut().on_answered(102 * S + 10, 300);
    assert!(r.verify(103 * S, &g, None, &mut store).is_some());
    assert!(text(&store).contains("verified on the wire"), "{}", text(&store));
    assert!(!text(&store).contains("unanswered"), "{}", text(&store));
    assert!(!r.awaiting_answer(9));
    assert!(r.resolution(9).unwrap().contains("verified on the wire"));
}

#[test]
fn a_death_before_any_answer_is_said() {
    let (mut r, mut store) = applied_on_the_wire();
    let mut g = flow("10.77.2.2:80", 17_000, Some(true));
    let mut w = crate::model::probe::ProbeLog::default();
    for i in 0..4 {
        w.on_sent(101 * S + i * 2 * S, i as u32);
    }
    *g.wire_mut() = w;
    assert!(r.on_closed(&g, "timed out", &mut store).is_some());
    let act = &store.get(1).unwrap().actions[0];
    assert_eq!(act.outcome.status, OutcomeStatus::Ineffective);
    assert!(
        act.outcome.text.contains("4 probe(s) sent, none answered"),
        "{}",
        act.outcome.text
    );
}
