use super::*;
use crate::detect::FakeEnv;
use crate::detect::leaks::evaluate;
use crate::findings::Family;
use crate::model::observe::TcpSample;
use monitor_common::tcp_state;

const S: Nanos = SEC;

fn flow(cookie: u64, state: u8, since: Nanos, quiet_ms: u32) -> Flow {
    let mut f = Flow::new(
        cookie,
        0,
        "10.0.0.1:7000".parse().unwrap(),
        format!("10.0.0.2:{}", 40000 + cookie).parse().unwrap(),
        state,
        0,
    );
    f.set_state_since(since);
    f.set_inode(cookie);
    f.owner = Some(std::sync::Arc::new(crate::model::observe::Owner {
        pid: 50,
        comm: "bridge".into(),
        cgroup: None,
        unit: None,
    }));
    f.tcp = Some(TcpSample {
        last_data_sent_ms: quiet_ms,
        last_data_recv_ms: quiet_ms,
        last_ack_recv_ms: quiet_ms,
        ..Default::default()
    });
    f.tcp_at = 100 * S;
    f
}

struct FakeCloser(Vec<u64>);
impl Closer for FakeCloser {
    fn close(&mut self, f: &Flow) -> Result<&'static str, String> {
        self.0.push(f.cookie);
        Ok("fake")
    }
}

struct FakeHolders(HashSet<u64>);
impl Holders for FakeHolders {
    fn holds(&mut self, _: u32, inode: u64) -> Option<bool> {
        Some(self.0.contains(&inode))
    }
}

fn cfg(close: RemedyMode) -> LeaksSection {
    LeaksSection {
        close_wait_after: std::time::Duration::from_secs(60),
        quiet_for: std::time::Duration::from_secs(30),
        close,
        ..Default::default()
    }
}

fn run(
    mode: RemedyMode,
    flows: &[Flow],
    store: &mut FindingStore,
    r: &mut CloseRemedy,
    closer: &mut FakeCloser,
    now: Nanos,
) {
    let c = cfg(mode);
    let p = evaluate(now, flows.iter(), &c, &FakeEnv::default());
    store.reconcile(Family::Stuck, p.stuck, now, |_, _| "gone".into());
    store.reconcile(Family::HalfOpen, p.half_open, now, |_, _| "gone".into());
    let lookup = |ck: u64| flows.iter().find(|f| f.cookie == ck).cloned();
    r.consider(now, &p.candidates, &lookup, &c, &[], closer, store);
}

#[test]
fn closes_only_quiet_dead_sockets_once_and_checks_the_owner_released_them() {
    let mut store = FindingStore::default();
    let mut r = CloseRemedy::default();
    let mut closer = FakeCloser(Vec::new());
    let flows = vec![
        flow(1, tcp_state::CLOSE_WAIT, 10 * S, 90_000),
        flow(2, tcp_state::CLOSE_WAIT, 20 * S, 80_000),
        flow(4, tcp_state::CLOSE_WAIT, 10 * S, 1_000), // carried data 1 s ago
    ];
    run(
        RemedyMode::Enforce,
        &flows,
        &mut store,
        &mut r,
        &mut closer,
        100 * S,
    );
    assert_eq!(closer.0, vec![1, 2], "never the recently active one");
    run(
        RemedyMode::Enforce,
        &flows,
        &mut store,
        &mut r,
        &mut closer,
        101 * S,
    );
    assert_eq!(closer.0.len(), 2, "closed sockets are not closed again");
    let f = &store.all()[0];
    assert_eq!(f.actions.len(), 2);
    assert!(
        f.actions
            .iter()
            .all(|a| a.outcome.status == OutcomeStatus::Pending)
    );
    // The owner released inode 1 but still holds inode 2 past the grace period.
    let mut holders = FakeHolders(HashSet::from([2]));
    let ch = r.verify(102 * S, &mut holders, &mut store);
    assert_eq!(ch.len(), 1);
    let ch = r.verify(120 * S, &mut holders, &mut store);
    assert_eq!(ch.len(), 1);
    let acts = &store.all()[0].actions;
    let of = |c: u64| acts.iter().find(|a| is_close_of(c)(a)).unwrap();
    assert_eq!(of(1).outcome.status, OutcomeStatus::Succeeded);
    assert!(
        of(1).outcome.text.contains("released fd"),
        "{}",
        of(1).outcome.text
    );
    assert_eq!(of(2).outcome.status, OutcomeStatus::Ineffective);
    assert!(
        of(2).outcome.text.contains("still holds fd"),
        "{}",
        of(2).outcome.text
    );
    assert_eq!(r.unreleased(2).map(|u| u.0), Some(50));
    // Still held: it stays unreleased. Let go of (or the process gone): released.
    r.settle(&mut |_| Some(HashSet::from([2, 9])));
    assert!(r.unreleased(2).is_some());
    r.settle(&mut |_| Some(HashSet::from([9])));
    assert!(r.unreleased(2).is_none(), "the descriptor was closed");
}

#[test]
fn a_ledger_service_close_counts_as_held_until_the_owner_lets_go() {
    let mut store = FindingStore::default();
    let mut r = CloseRemedy::default();
    let mut closer = FakeCloser(Vec::new());
    let flows = [flow(1, tcp_state::CLOSE_WAIT, 0, 90_000)];
    let svc = vec![ServiceConfig {
        name: "bridge".into(),
        comm: Some("bridge".into()),
        ..Default::default()
    }];
    let c = cfg(RemedyMode::Enforce);
    let p = evaluate(100 * S, flows.iter(), &c, &FakeEnv::default());
    store.reconcile(Family::Stuck, p.stuck, 100 * S, |_, _| "gone".into());
    let lookup = |ck: u64| flows.iter().find(|f| f.cookie == ck).cloned();
    r.consider(100 * S, &p.candidates, &lookup, &c, &svc, &mut closer, &mut store);
    assert_eq!(closer.0, vec![1]);
    assert_eq!(r.not_yet_released().collect::<Vec<_>>(), vec![("bridge", 50, 1)]);
    // Past the grace period, still held: in doubt until the process is gone.
    r.verify(200 * S, &mut FakeHolders(HashSet::from([1])), &mut store);
    assert_eq!(r.not_yet_released().count(), 1);
    r.settle(&mut |_| None);
    assert_eq!(
        r.not_yet_released().count(),
        0,
        "the process exited: the slot is free"
    );
    assert!(r.unreleased(1).is_none());
}

#[test]
fn dry_run_plans_each_close_once() {
    let mut store = FindingStore::default();
    let mut r = CloseRemedy::default();
    let mut closer = FakeCloser(Vec::new());
    let flows = vec![flow(1, tcp_state::CLOSE_WAIT, 0, 90_000)];
    for i in 0..5 {
        run(
            RemedyMode::DryRun,
            &flows,
            &mut store,
            &mut r,
            &mut closer,
            (100 + i) * S,
        );
    }
    assert!(closer.0.is_empty());
    let acts = &store.all()[0].actions;
    assert_eq!(acts.len(), 1);
    assert!(acts[0].outcome.text.starts_with("planned: abort"));
}
