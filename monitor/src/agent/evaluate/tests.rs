//! The rounds as the agent runs them, with a fake /proc and fake executors.
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use super::*;
use crate::agent::state::{Info, State};
use crate::config::Config;
use crate::config::policy::{Policy, ZombiePolicy};
use crate::model::finding::{OutcomeStatus, RemedyMode, Severity, Transition};
use crate::model::observe::{ProcEvent, ProcEventKind};
use crate::model::process::{Diagnosis, ProcSignals, ProcStat};
use crate::model::time::SEC;
use crate::remedy::sigchld::{MAX_NUDGES, NudgeError};

const CGT: u64 = 1 << 16;

fn state(sigchld: RemedyMode) -> State {
    let mut policy = Policy::build(&Config::default(), true, None);
    policy.zombies = ZombiePolicy {
        min_age: 5 * SEC,
        sigchld,
    };
    State::new(
        policy,
        Info {
            mode: "test",
            mode_reason: String::new(),
            features: vec![],
            sockops: String::new(),
            started: Instant::now(),
            config_desc: String::new(),
            socket: "/nonexistent".into(),
        },
    )
}

#[derive(Default)]
struct FakeProc {
    procs: RefCell<HashMap<u32, (ProcStat, ProcSignals)>>,
}

impl FakeProc {
    fn add(&self, pid: u32, ppid: u32, state: char, caught: u64, blocked: u64) {
        let st = ProcStat {
            pid,
            comm: format!("p{pid}"),
            state,
            ppid,
            starttime: 1000 + u64::from(pid),
        };
        let sig = ProcSignals {
            state,
            blocked,
            ignored: 0,
            caught,
            pending: 0,
        };
        self.procs.borrow_mut().insert(pid, (st, sig));
    }
    fn reap(&self, pid: u32) {
        self.procs.borrow_mut().remove(&pid);
    }
}

impl ProcView for FakeProc {
    fn stat(&self, pid: u32) -> Option<ProcStat> {
        self.procs.borrow().get(&pid).map(|p| p.0.clone())
    }
    fn signals(&self, pid: u32) -> Option<ProcSignals> {
        self.procs.borrow().get(&pid).map(|p| p.1.clone())
    }
}

/// A nudge reaps every zombie child of the parent (a working handler).
struct ReapingNudger<'a> {
    view: &'a FakeProc,
    sent: u32,
    refuse: bool,
}

impl Nudger for ReapingNudger<'_> {
    fn nudge(&mut self, pid: u32, _starttime: u64) -> Result<(), NudgeError> {
        if self.refuse {
            return Err(NudgeError::Refused("EPERM".into()));
        }
        self.sent += 1;
        let kids: Vec<u32> = self
            .view
            .procs
            .borrow()
            .values()
            .filter(|p| p.0.ppid == pid && p.0.state == 'Z')
            .map(|p| p.0.pid)
            .collect();
        kids.iter().for_each(|k| self.view.reap(*k));
        Ok(())
    }
}

struct NoEffect(u32);
impl Nudger for NoEffect {
    fn nudge(&mut self, _: u32, _: u64) -> Result<(), NudgeError> {
        self.0 += 1;
        Ok(())
    }
}

fn exit(pid: u32, ppid: u32, ts: Nanos) -> ProcEvent {
    ProcEvent {
        kind: ProcEventKind::Exit,
        pid,
        ppid,
        exit_code: 0,
        ts,
        comm: "child".into(),
    }
}

fn zombie_case(st: &State) -> crate::model::process::ZombieCase {
    match &st.store.all()[0].details {
        crate::model::finding::Details::Zombie(c) => c.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn short_lived_zombies_are_not_reported() {
    let view = FakeProc::default();
    view.add(10, 1, 'S', CGT, 0);
    view.add(11, 10, 'Z', 0, 0);
    let mut st = state(RemedyMode::Enforce);
    let mut n = NoEffect(0);
    st.zombies.on_event(&exit(11, 10, SEC));
    assert!(zombies(3 * SEC, &mut st, &view, &mut n).is_empty());
    // Reaped before the threshold: never reported.
    st.zombies.on_event(&ProcEvent {
        kind: ProcEventKind::Free,
        ..exit(11, 10, 4 * SEC)
    });
    assert!(zombies(10 * SEC, &mut st, &view, &mut n).is_empty());
    assert!(st.store.all().is_empty());
    // The same rounds report one that stays: a sibling exits and is never reaped.
    view.add(12, 10, 'Z', 0, 0);
    st.zombies.on_event(&exit(12, 10, 10 * SEC));
    assert!(
        zombies(12 * SEC, &mut st, &view, &mut n).is_empty(),
        "2 s old: not yet"
    );
    let t = zombies(16 * SEC, &mut st, &view, &mut n);
    assert_eq!(t.first().map(|x| x.1), Some(Transition::New), "{t:?}");
    assert_eq!(zombie_case(&st).count, 1, "only the zombie that stayed");
}

#[test]
fn lost_signal_is_nudged_verified_and_resolved() {
    let view = FakeProc::default();
    view.add(10, 1, 'S', CGT, 0);
    view.add(11, 10, 'Z', 0, 0);
    view.add(12, 10, 'Z', 0, 0);
    let mut st = state(RemedyMode::Enforce);
    st.zombies.on_event(&exit(11, 10, 0));
    st.zombies.on_event(&exit(12, 10, 0));
    let mut n = ReapingNudger {
        view: &view,
        sent: 0,
        refuse: false,
    };
    let t = zombies(6 * SEC, &mut st, &view, &mut n);
    assert_eq!(
        t.iter().map(|x| x.1).collect::<Vec<_>>(),
        vec![Transition::New, Transition::Action]
    );
    assert_eq!(n.sent, 1);
    let c = zombie_case(&st);
    assert_eq!((c.count, c.diagnosis), (2, Diagnosis::HandlerLostSignal));
    assert_eq!(st.store.all()[0].actions[0].outcome.text, "sent");
    // The kernel frees them; the finding resolves and the action records the outcome.
    for pid in [11, 12] {
        st.zombies.on_event(&ProcEvent {
            kind: ProcEventKind::Free,
            ..exit(pid, 10, 6 * SEC)
        });
    }
    let t = zombies(6 * SEC + SEC / 2, &mut st, &view, &mut n);
    assert_eq!(t, vec![(1, Transition::Action), (1, Transition::Resolved)]);
    let f = &st.store.all()[0];
    assert!(!f.active);
    assert_eq!(f.actions[0].outcome.text, "reaped 2 of 2");
    assert_eq!(f.actions[0].outcome.status, OutcomeStatus::Succeeded);
    assert!(f.resolution.as_deref().unwrap().contains("after 1 nudge(s)"));
}

#[test]
fn a_verified_reap_drops_zombies_whose_free_event_was_lost() {
    let view = FakeProc::default();
    view.add(10, 1, 'S', CGT, 0);
    view.add(11, 10, 'Z', 0, 0);
    let mut st = state(RemedyMode::Enforce);
    st.zombies.on_event(&exit(11, 10, 0));
    let mut n = ReapingNudger {
        view: &view,
        sent: 0,
        refuse: false,
    };
    zombies(6 * SEC, &mut st, &view, &mut n);
    // No free event arrives; verification a second later sees it gone from /proc.
    let t = zombies(7 * SEC + 1, &mut st, &view, &mut n);
    assert!(t.contains(&(1, Transition::Action)));
    let t = zombies(8 * SEC, &mut st, &view, &mut n);
    assert_eq!(t, vec![(1, Transition::Resolved)], "resolved, not nudged again");
    assert_eq!(n.sent, 1);
}

#[test]
fn blocked_parent_is_diagnosed_and_never_nudged() {
    let view = FakeProc::default();
    view.add(10, 1, 'S', CGT, CGT);
    view.add(11, 10, 'Z', 0, 0);
    let mut st = state(RemedyMode::Enforce);
    st.zombies.on_scan(&[view.stat(11).unwrap()], SEC, SEC);
    let mut n = NoEffect(0);
    let mut logged = 0;
    for i in 0..100 {
        logged += zombies((2 + i) * SEC, &mut st, &view, &mut n).len();
    }
    assert_eq!(n.0, 0, "no nudge when SIGCHLD is blocked");
    assert_eq!(logged, 1, "reported once, not every tick");
    assert_eq!(zombie_case(&st).diagnosis, Diagnosis::SigchldBlocked);
    assert_eq!(st.store.all()[0].severity, Severity::Critical);
}

#[test]
fn ineffective_nudges_back_off_and_stop() {
    let view = FakeProc::default();
    view.add(10, 1, 'S', CGT, 0);
    view.add(11, 10, 'Z', 0, 0);
    let mut st = state(RemedyMode::Enforce);
    st.zombies.on_event(&exit(11, 10, 0));
    let mut n = NoEffect(0);
    let mut sent_at = Vec::new();
    for i in 0..2000u64 {
        let now = 5 * SEC + i * SEC / 10;
        let before = n.0;
        zombies(now, &mut st, &view, &mut n);
        if n.0 > before {
            sent_at.push(now);
        }
    }
    assert_eq!(n.0, MAX_NUDGES);
    let gaps: Vec<u64> = sent_at.windows(2).map(|w| (w[1] - w[0]) / (SEC / 10)).collect();
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "backoff grows: {gaps:?}");
    let f = &st.store.all()[0];
    let last = f.actions.last().unwrap();
    assert_eq!(last.outcome.status, OutcomeStatus::Stopped, "{:?}", f.actions);
    assert_eq!(
        f.actions
            .iter()
            .filter(|a| a.outcome.text == "reaped 0 of 1" && a.outcome.status == OutcomeStatus::Ineffective)
            .count(),
        MAX_NUDGES as usize
    );
    assert_eq!(
        (zombie_case(&st).nudges, zombie_case(&st).stopped),
        (MAX_NUDGES, true)
    );
}

#[test]
fn refusal_is_reported_once() {
    let view = FakeProc::default();
    view.add(10, 1, 'S', CGT, 0);
    view.add(11, 10, 'Z', 0, 0);
    let mut st = state(RemedyMode::Enforce);
    st.zombies.on_event(&exit(11, 10, 0));
    let mut n = ReapingNudger {
        view: &view,
        sent: 0,
        refuse: true,
    };
    for i in 0..50 {
        zombies(5 * SEC + i * SEC, &mut st, &view, &mut n);
    }
    let acts = &st.store.all()[0].actions;
    assert_eq!(acts.len(), 1);
    assert_eq!(acts[0].outcome.status, OutcomeStatus::Refused);
    assert!(acts[0].outcome.text.starts_with("refused: EPERM"));
}

#[test]
fn dry_run_plans_once_and_sends_nothing() {
    let view = FakeProc::default();
    view.add(10, 1, 'S', CGT, 0);
    view.add(11, 10, 'Z', 0, 0);
    let mut st = state(RemedyMode::DryRun);
    st.zombies.on_event(&exit(11, 10, 0));
    let mut n = NoEffect(0);
    for i in 0..20 {
        zombies(5 * SEC + i * SEC, &mut st, &view, &mut n);
    }
    assert_eq!(n.0, 0);
    let acts = &st.store.all()[0].actions;
    assert_eq!(acts.len(), 1);
    assert_eq!(acts[0].mode, RemedyMode::DryRun);
    assert_eq!(acts[0].outcome.status, OutcomeStatus::Planned);
    assert!(st.store.all()[0].active, "a plan fixes nothing");
}

#[test]
fn storm_is_one_finding_with_the_count() {
    let view = FakeProc::default();
    view.add(10, 1, 'S', 0, 0);
    let mut scan = Vec::new();
    for pid in 1000..2000 {
        view.add(pid, 10, 'Z', 0, 0);
        scan.push(view.stat(pid).unwrap());
    }
    let mut st = state(RemedyMode::Enforce);
    st.zombies.on_scan(&[], 0, 0);
    st.zombies.on_scan(&scan, SEC, SEC);
    let mut n = NoEffect(0);
    zombies(7 * SEC, &mut st, &view, &mut n);
    assert_eq!(st.store.all().len(), 1);
    let c = zombie_case(&st);
    assert_eq!((c.count, c.diagnosis), (1000, Diagnosis::NoHandler));
    assert_eq!(c.children.len(), crate::detect::zombies::LIST_CHILDREN);
    assert_eq!(c.oldest_ms, 6000, "appeared between scans: dated by the scan");
}

#[test]
fn new_flows_of_unknown_owner_are_looked_up_exactly_once_their_tuple_is_complete() {
    use crate::agent::state::PendingOwner;
    use crate::model::observe::{Event, EventKind, PidHint};
    use monitor_common::tcp_state::{ESTABLISHED, LISTEN, SYN_SENT};
    let mut st = state(RemedyMode::Off);
    let ev = |cookie, state, local: &str, remote: &str, pid: Option<u32>| Event {
        kind: EventKind::State,
        cookie,
        netns: 0,
        ts: SEC,
        old_state: 0,
        state,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        pid_hint: pid.map(|pid| PidHint {
            pid,
            comm: "p".into(),
        }),
        err: 0,
        had_file: false,
        count: 0,
    };
    // A listener (its remote is 0:0 for good), a connect() before its port is chosen, and an
    // accepted connection.
    for e in [
        ev(1, LISTEN, "10.0.0.1:80", "0.0.0.0:0", Some(7)),
        ev(2, SYN_SENT, "10.0.0.1:0", "10.0.0.9:22", Some(8)),
        ev(3, ESTABLISHED, "10.0.0.1:80", "10.0.0.5:4000", None),
    ] {
        assert!(st.table.apply_event(&e), "a flow of unknown owner");
        st.owner_pending.push(PendingOwner {
            cookie: e.cookie,
            pid: e.pid_hint.as_ref().map(|h| h.pid),
            waited: false,
        });
    }
    let l = st.take_owner_lookups();
    let ids: Vec<u64> = l.ids.iter().map(|(_, id)| id.cookie).collect();
    assert_eq!(ids, vec![1, 3]);
    assert_eq!(l.hints, vec![(1, 7)]);
    assert!(!l.read);
    assert_eq!(
        st.owner_pending.len(),
        1,
        "the connect() waits a tick for its port"
    );
    // Its handshake's record completes the tuple: looked up exactly, with its hint.
    st.table
        .apply_event(&ev(2, ESTABLISHED, "10.0.0.1:5000", "10.0.0.9:22", None));
    let l = st.take_owner_lookups();
    assert_eq!(l.ids.iter().map(|(_, id)| id.cookie).collect::<Vec<_>>(), vec![2]);
    assert_eq!(l.hints, vec![(2, 8)]);
    assert!(st.owner_pending.is_empty());
    // One whose tuple stays incomplete for a tick is left to a read.
    st.table
        .apply_event(&ev(4, SYN_SENT, "10.0.0.1:0", "10.0.0.9:23", Some(9)));
    st.owner_pending.push(PendingOwner {
        cookie: 4,
        pid: Some(9),
        waited: false,
    });
    assert!(!st.take_owner_lookups().read);
    let l = st.take_owner_lookups();
    assert!(l.read && l.ids.is_empty());
    assert_eq!(l.hints, vec![(4, 9)]);
    assert!(st.owner_pending.is_empty());
}

#[test]
fn a_path_learnt_in_a_namespace_that_is_gone_shortens_nothing() {
    use crate::agent::state::NetnsInfo;
    use crate::kernel::netns::NsHandle;
    use crate::track::paths::{PathKey, prefix_of};
    let mut st = state(RemedyMode::Off);
    let key = |netns: &str| PathKey {
        netns: netns.into(),
        gateway: "10.77.1.1".into(),
        prefix: prefix_of("10.77.2.2".parse().unwrap()),
    };
    st.paths.broke(key("blue"), 24_000, 1);
    st.paths.broke(key("blue"), 24_000, 2);
    assert!(st.relearn(), "two evictions teach a timeout");
    assert_eq!(st.learned.get(&key("blue")).map(|v| v.0), Some(18));
    // No namespace named blue is watched: the path is kept, but shortens nothing.
    assert_eq!(st.shortest_external_s(), None);
    let view = st.profiles_view();
    assert_eq!(view.learned.len(), 1);
    assert!(!view.learned[0].netns_present);
    assert_eq!(view.learned[0].timeout_s, Some(18));
    let blue = NetnsInfo {
        id: 4242,
        name: "blue".into(),
        facts: Default::default(),
        error: None,
        handle: NsHandle {
            id: 4242,
            path: "/run/netns/blue".into(),
        },
    };
    st.netns.insert(4242, blue);
    assert_eq!(
        st.shortest_external_s(),
        Some(18),
        "blue is back: its path counts"
    );
    assert!(st.profiles_view().learned[0].netns_present);
    st.netns.remove(&4242);
    assert_eq!(st.shortest_external_s(), None);
}
