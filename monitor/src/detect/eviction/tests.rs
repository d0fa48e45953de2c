use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::policy::EvictionPolicy;
use crate::config::profiles::Profile;
use crate::config::{KeepaliveSection, Rule};
use crate::detect::FakeEnv;
use crate::model::eviction::{NetFacts, RoutePath};
use crate::model::observe::{Owner, TcpSample};
use std::num::NonZeroU16;

const S: Nanos = SEC;

pub fn policy() -> EvictionPolicy {
    let mut profiles = crate::config::profiles::builtin();
    profiles.push(Profile {
        name: "lab".into(),
        idle_timeout_s: 20,
        keepalive_resets: true,
        on_expiry: String::new(),
        source: String::new(),
    });
    EvictionPolicy {
        profiles,
        rules: vec![Rule {
            cidr: Some("10.77.0.0/16".parse().unwrap()),
            profile: Some("lab".into()),
            ..Default::default()
        }],
        default_profile: "home-router".into(),
        warn_ratio: 0.8,
        margin_ms: 0,
        keepalive: KeepaliveSection {
            floor: Duration::from_secs(2),
            ..Default::default()
        },
        min_timeout_ms: 20_000,
    }
}

pub fn flow(remote: &str, idle_ms: u32, ka: Option<bool>) -> Flow {
    let mut f = Flow::new(
        9,
        0,
        "10.77.1.2:40000".parse().unwrap(),
        remote.parse().unwrap(),
        1,
        0,
    );
    f.set_state_since(0);
    f.set_inode(5);
    f.owner = Some(Arc::new(Owner {
        pid: 77,
        comm: "psql".into(),
        cgroup: None,
        unit: None,
    }));
    f.tcp = Some(TcpSample {
        last_data_sent_ms: idle_ms,
        last_data_recv_ms: idle_ms,
        last_ack_recv_ms: idle_ms,
        keepalive: ka,
        ..Default::default()
    });
    f.tcp_at = 100 * S;
    f
}

#[test]
fn rules_then_routes_pick_the_timeout() {
    let pol = policy();
    let mut env = FakeEnv::default();
    let a = applicable(&flow("10.77.2.2:5432", 0, None), &pol, &mut env).unwrap();
    assert_eq!((a.profile.as_str(), a.timeout_s), ("lab", 20));
    let a = applicable(&flow("192.0.2.9:22", 0, None), &pol, &mut env).unwrap();
    assert_eq!((a.profile.as_str(), a.timeout_s), ("home-router", 600));
    let mut onlink = FakeEnv {
        path: RoutePath::OnLink,
        ..Default::default()
    };
    assert!(
        applicable(&flow("192.0.2.9:22", 0, None), &pol, &mut onlink)
            .unwrap_err()
            .contains("on-link")
    );
    let mut ct = FakeEnv {
        facts: NetFacts {
            conntrack_s: Some(300),
            ..Default::default()
        },
        ..Default::default()
    };
    let a = applicable(&flow("192.0.2.9:22", 0, None), &pol, &mut ct).unwrap();
    assert_eq!((a.profile.as_str(), a.timeout_s), ("host-conntrack", 300));
}

#[test]
fn rules_can_match_a_namespace_by_name_or_inode() {
    let mut pol = policy();
    pol.rules = vec![Rule {
        netns: Some("net:[4026532000]".into()),
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    }];
    let mut env = FakeEnv::default();
    let mut f = flow("192.0.2.9:22", 0, None);
    assert_eq!(
        applicable(&f, &pol, &mut env).unwrap().timeout_s,
        600,
        "other namespace"
    );
    f.netns = 4_026_532_000;
    assert_eq!(applicable(&f, &pol, &mut env).unwrap().timeout_s, 30);
}

#[test]
fn verdicts() {
    let pol = policy();
    let mut env = FakeEnv::default();
    let mut at = |idle, ka| assess(&flow("10.77.2.2:80", idle, ka), 100 * S, &pol, None, &mut env).verdict;
    assert_eq!(at(5_000, Some(false)), Forecast::Idle);
    assert_eq!(at(16_000, Some(false)), Forecast::NearEviction);
    // Keepalive on with the sysctl defaults (7200 s) is too slow for a 20 s middlebox.
    assert_eq!(at(1_000, Some(true)), Forecast::KeepaliveTooSlow);
    let near = assess(
        &flow("10.77.2.2:80", 16_000, Some(false)),
        100 * S,
        &pol,
        None,
        &mut env,
    );
    assert_eq!(near.eta_ms, Some(4_000));
    let slow = assess(
        &flow("10.77.2.2:80", 1_000, Some(true)),
        100 * S,
        &pol,
        None,
        &mut env,
    );
    assert_eq!(slow.refresh_s, Some(7200));
    assert_eq!(slow.detection_s, Some(7200 + 75 * 9));
    let v = |i, n, c| KaValues {
        idle_s: i,
        intvl_s: n,
        cnt: c,
    };
    let safe = assess(
        &flow("10.77.2.2:80", 16_000, Some(true)),
        100 * S,
        &pol,
        Some(v(10, 2, 4)),
        &mut env,
    );
    assert_eq!((safe.verdict, safe.eta_ms), (Forecast::Safe, None));
    // Refresh is max(idle, intvl): an interval at or above the timeout is too slow.
    let slow_intvl = assess(
        &flow("10.77.2.2:80", 0, Some(true)),
        100 * S,
        &pol,
        Some(v(10, 30, 4)),
        &mut env,
    );
    assert_eq!(slow_intvl.verdict, Forecast::KeepaliveTooSlow);
    // ALB: keepalive does not reset it.
    let mut alb = pol.clone();
    alb.rules[0].profile = Some("aws-alb".into());
    let a = assess(
        &flow("10.77.2.2:80", 50_000, Some(false)),
        100 * S,
        &alb,
        None,
        &mut env,
    );
    assert_eq!(a.verdict, Forecast::KeepaliveCannotHelp);
    let mut stuck = flow("10.77.2.2:80", 25_000, Some(false));
    let t = stuck.tcp.as_mut().unwrap();
    t.unacked = 1;
    t.retransmits = 2;
    t.last_data_sent_ms = 500;
    assert_eq!(
        assess(&stuck, 100 * S, &pol, None, &mut env).verdict,
        Forecast::LikelyEvicted
    );
}

#[test]
fn the_margin_moves_the_warning_earlier_for_short_timeouts() {
    let mut pol = policy();
    pol.margin_ms = 6_000;
    let mut env = FakeEnv::default();
    // 20 s timeout: 80 % is 16 s, the 6 s margin makes it 14 s.
    let a = assess(
        &flow("10.77.2.2:80", 14_500, Some(false)),
        100 * S,
        &pol,
        None,
        &mut env,
    );
    assert_eq!(a.verdict, Forecast::NearEviction);
}

#[test]
fn a_finding_judged_on_an_unchanged_sample_does_not_flap() {
    let pol = policy();
    let mut env = FakeEnv::default();
    let mut d = EvictionDetector::default();
    // Keepalive on with sysctl values (too slow), recently active: judged once, then quick-rejected.
    let mut f = flow("10.77.2.2:80", 100, Some(true));
    f.tcp.as_mut().unwrap().keepalive_idle_s = NonZeroU16::new(30);
    let no = |_: u64| false;
    for i in 0..5 {
        let p = d.evaluate(100 * S + i * S / 2, [&f].into_iter(), &[], &pol, &mut env, &no);
        assert_eq!(p.verdicts.len(), 1, "pass {i}: the verdict holds");
        assert_eq!(p.verdicts[0].key.kind, FindingKind::KeepaliveTooSlow);
    }
}

#[test]
fn poll_mode_reads_keepalive_values_before_judging() {
    let pol = policy();
    let mut env = FakeEnv::default();
    let mut d = EvictionDetector::default();
    let f = flow("10.77.2.2:80", 100, Some(true));
    let no = |_: u64| false;
    let p = d.evaluate(100 * S, [&f].into_iter(), &[], &pol, &mut env, &no);
    assert_eq!((p.reads.as_slice(), p.verdicts.len()), (&[9u64][..], 0));
    let p = d.evaluate(101 * S, [&f].into_iter(), &[], &pol, &mut env, &no);
    assert!(p.reads.is_empty(), "one read at a time");
    d.learn(
        9,
        Some(KaValues {
            idle_s: 10,
            intvl_s: 2,
            cnt: 4,
        }),
    );
    let p = d.evaluate(102 * S, [&f].into_iter(), &[], &pol, &mut env, &no);
    assert!(p.verdicts.is_empty(), "safe with the values read");
}

#[test]
fn postmortem_after_reset_past_the_timeout() {
    let pol = policy();
    let mut env = FakeEnv::default();
    let mut d = EvictionDetector::default();
    let no = |_: u64| false;
    let mut f = flow("10.77.2.2:80", 30_000, Some(false));
    f.set_last_error(postmortem::ETIMEDOUT);
    let p = d.evaluate(
        105 * S,
        std::iter::empty(),
        &[(f.clone(), 104 * S)],
        &pol,
        &mut env,
        &no,
    );
    assert_eq!(p.postmortems.len(), 1);
    assert_eq!(p.postmortems[0].key.kind, FindingKind::LikelyEvicted);
    assert!(
        p.postmortems[0].summary.contains("timed out"),
        "{}",
        p.postmortems[0].summary
    );
    assert!(
        p.postmortems[0].summary.contains("after 34s"),
        "{}",
        p.postmortems[0].summary
    );
    assert!(p.closed[&9].contains("timed out"));
    // A reset after a short idle is not blamed on the middlebox.
    let mut g = flow("10.77.2.2:80", 1_000, Some(false));
    g.cookie = 10;
    g.count_reset_recv();
    let p = d.evaluate(106 * S, std::iter::empty(), &[(g, 100 * S)], &pol, &mut env, &no);
    assert!(p.postmortems.is_empty());
    // Post-mortems expire after an hour, with a key to resolve.
    let p = d.evaluate(104 * S + 3601 * S, std::iter::empty(), &[], &pol, &mut env, &no);
    assert_eq!(p.expired.len(), 1);
}

#[test]
fn a_flow_that_broke_bounds_its_path_and_a_learnt_timeout_applies_without_a_rule() {
    let mut pol = policy();
    pol.rules.clear();
    let mut env = FakeEnv::default();
    let mut d = EvictionDetector::default();
    let no = |_: u64| false;
    // Timed out while retransmitting; it had idled 25 s when it first retransmitted.
    let mut f = flow("10.77.2.2:80", 31_000, Some(false));
    f.set_last_error(postmortem::ETIMEDOUT);
    f.set_trouble_idle_ms(25_000);
    if let Some(t) = f.tcp.as_mut() {
        t.retransmits = 3;
        t.unacked = 1;
    }
    let p = d.evaluate(
        105 * S,
        std::iter::empty(),
        &[(f.clone(), 104 * S)],
        &pol,
        &mut env,
        &no,
    );
    assert_eq!(
        p.breaks,
        vec![(
            9,
            0,
            "10.77.1.1".to_string(),
            "10.77.2.2".parse().unwrap(),
            25_000
        )]
    );
    // Poll mode: no error is reported; vanishing while retransmitting is a break too.
    f.set_last_error(0);
    assert_eq!(postmortem::idle_before_break(&f, 104 * S), Some(25_000));
    // Closed by the application after a calm sample: no evidence.
    let calm = flow("10.77.2.2:80", 30_000, Some(false));
    assert_eq!(postmortem::idle_before_break(&calm, 104 * S), None);
    // A reset answering the first send after a calm sample: the idle up to the reset.
    let mut r = flow("10.77.2.2:80", 21_000, Some(false));
    r.count_reset_recv();
    assert_eq!(postmortem::idle_before_break(&r, 101 * S), Some(22_000));
    // With a learnt timeout for the path, a flow without a rule gets it.
    struct Learnt(FakeEnv);
    impl Env for Learnt {
        fn route(&mut self, n: NetnsId, d: std::net::IpAddr) -> RoutePath {
            self.0.route(n, d)
        }
        fn facts(&self, n: NetnsId) -> NetFacts {
            self.0.facts(n)
        }
        fn netns_name(&self, n: NetnsId) -> Option<String> {
            self.0.netns_name(n)
        }
        fn learned(&self, _: NetnsId, gw: &str, _: std::net::IpAddr) -> Option<(u64, String)> {
            (gw == "10.77.1.1").then(|| (18, "evicted after 25s idle (2 flows)".into()))
        }
    }
    let mut env = Learnt(FakeEnv::default());
    let a = forecast::applicable(&flow("10.77.2.2:80", 1_000, None), &pol, &mut env).unwrap();
    assert_eq!((a.profile.as_str(), a.timeout_s), ("learned", 18));
    assert!(
        a.why
            .contains("learned for 10.77.2.0/24: evicted after 25s idle (2 flows)"),
        "{}",
        a.why
    );
}

#[test]
fn a_quiet_flow_is_skipped_until_its_warn_point() {
    let pol = policy();
    let mut env = FakeEnv::default();
    let mut d = EvictionDetector::default();
    let no = |_: u64| false;
    // home-router (600 s, warn at 480 s): idle 470 s at its sample, 10 s short of the warn point.
    let mut f = flow("192.0.2.9:22", 470_000, None);
    let p = d.evaluate(100 * S, [&f].into_iter(), &[], &pol, &mut env, &no);
    assert!(p.verdicts.is_empty());
    assert_eq!(
        p.quiet,
        vec![(9, 110 * S, true)],
        "quiet until the warn point, confirmed by a read"
    );
    f.quiet_until = 110 * S;
    let p = d.evaluate(105 * S, [&f].into_iter(), &[], &pol, &mut env, &no);
    assert!(
        p.verdicts.is_empty() && p.quiet.is_empty(),
        "skipped, not assessed"
    );
    // Followed by the keepalive remedy: always assessed.
    let yes = |_: u64| true;
    let p = d.evaluate(105 * S, [&f].into_iter(), &[], &pol, &mut env, &yes);
    assert_eq!(p.quiet.len(), 1, "assessed");
    let p = d.evaluate(110 * S, [&f].into_iter(), &[], &pol, &mut env, &no);
    assert_eq!(p.verdicts.len(), 1, "at the warn point");
    assert_eq!(p.verdicts[0].key.kind, FindingKind::IdleNearEviction);
    assert!(p.quiet.is_empty(), "at risk is never quiet");
    // No middlebox: quiet for QUIET_MAX (routes may change).
    let mut onlink = FakeEnv {
        path: RoutePath::OnLink,
        ..Default::default()
    };
    let f = flow("192.0.2.9:22", 470_000, None);
    let p = d.evaluate(100 * S, [&f].into_iter(), &[], &pol, &mut onlink, &no);
    assert_eq!(
        p.quiet,
        vec![(9, 100 * S + QUIET_MAX, false)],
        "no read needed without keepalive"
    );
    // A loopback session: no route change can put a middlebox on it; quiet until it changes.
    let mut local = FakeEnv {
        path: RoutePath::Local,
        ..Default::default()
    };
    let f = flow("127.0.0.1:5432", 470_000, None);
    let p = d.evaluate(100 * S, [&f].into_iter(), &[], &pol, &mut local, &no);
    assert_eq!(
        p.quiet,
        vec![(9, Nanos::MAX, false)],
        "loopback: until it changes"
    );
    let f = flow("127.0.0.1:5432", 470_000, Some(true));
    let p = d.evaluate(100 * S, [&f].into_iter(), &[], &pol, &mut local, &no);
    assert_eq!(
        p.quiet.first().map(|q| q.1),
        Some(100 * S + QUIET_MAX),
        "with keepalive on, looked at again (a probe may go unanswered): {:?}",
        p.quiet
    );
}
