use super::*;
use crate::findings::Verdict;
use crate::model::finding::{Details, Severity, Subject};

fn row(live: u64, leaked: u64, pids: Vec<u32>) -> LedgerRow {
    LedgerRow {
        service: "bridge".into(),
        pids,
        opened: 10,
        closed: 0,
        live,
        leaked,
        held: leaked,
        limit: Some(4),
        limit_source: Some("config".into()),
        growth_per_min: 1.0,
        opened_per_min: 1.0,
        exhaustion_eta_s: None,
        restart: None,
    }
}

fn service(mode: RemedyMode, command: Option<&[&str]>) -> ServiceConfig {
    ServiceConfig {
        name: "bridge".into(),
        comm: Some("bridge".into()),
        restart: Some(mode),
        restart_command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

/// A store with the service's session-budget finding open.
fn store_with_budget(r: &LedgerRow) -> (FindingStore, FindingId) {
    let mut store = FindingStore::default();
    let (id, _) = store.upsert(
        Verdict {
            key: ledger::key("bridge"),
            severity: Severity::Critical,
            subject: Subject::Service {
                name: "bridge".into(),
            },
            summary: "bridge: 4 of 4".into(),
            details: Details::Budget { ledger: r.clone() },
            notable: false,
        },
        0,
    );
    (store, id)
}

fn actions(store: &FindingStore, id: FindingId) -> Vec<crate::model::finding::ActionRecord> {
    store.get(id).unwrap().actions.clone()
}

#[test]
fn waits_for_a_quiet_moment_then_restarts_once_per_interval() {
    let s = [service(RemedyMode::Enforce, Some(&["restart-bridge"]))];
    let busy = row(4, 3, vec![100]);
    let (mut store, id) = store_with_budget(&busy);
    let mut r = RestartRemedy::default();
    // One live session: wait.
    let (_, jobs) = r.act(SEC, &[busy], &s, &mut store, 1);
    assert!(jobs.is_empty());
    assert!(
        r.notes["bridge"].starts_with("waiting for a quiet moment: 1 live"),
        "{:?}",
        r.notes
    );
    // Quiet: restart via the command, recorded with the sessions before.
    let quiet = row(4, 4, vec![100]);
    let (_, jobs) = r.act(2 * SEC, std::slice::from_ref(&quiet), &s, &mut store, 1);
    assert_eq!(
        jobs,
        [Job {
            service: "bridge".into(),
            how: How::Command(vec!["restart-bridge".into()])
        }]
    );
    assert_eq!(actions(&store, id)[0].outcome.status, OutcomeStatus::Pending);
    // Accepted; the service comes back with a new pid, its leaks gone.
    r.done("bridge", Ok("`restart-bridge`".into()), &mut store);
    let back = row(0, 0, vec![200]);
    r.verify(3 * SEC, std::slice::from_ref(&back), &|p| p == 200, &mut store);
    let a = &actions(&store, id)[0];
    assert_eq!(a.outcome.status, OutcomeStatus::Succeeded, "{a:?}");
    assert!(
        a.outcome.text.contains("[100] replaced by [200]"),
        "{}",
        a.outcome.text
    );
    // Leaking again within the hour: no second restart.
    let (_, jobs) = r.act(60 * SEC, &[quiet], &s, &mut store, 1);
    assert!(jobs.is_empty());
    assert!(r.notes["bridge"].starts_with("not before"), "{:?}", r.notes);
    assert_eq!(actions(&store, id).len(), 1);
}

#[test]
fn a_failed_restart_is_reported_once_and_not_retried_before_the_interval() {
    let s = [service(RemedyMode::Enforce, Some(&["restart-bridge"]))];
    let quiet = row(4, 4, vec![100]);
    let (mut store, id) = store_with_budget(&quiet);
    let mut r = RestartRemedy::default();
    let (_, jobs) = r.act(SEC, std::slice::from_ref(&quiet), &s, &mut store, 1);
    assert_eq!(jobs.len(), 1);
    r.done("bridge", Err("exit status 3: no such service".into()), &mut store);
    let a = &actions(&store, id)[0];
    assert_eq!(a.outcome.status, OutcomeStatus::Failed);
    assert!(a.outcome.text.contains("exit status 3"), "{}", a.outcome.text);
    for t in 2..10 {
        let (_, jobs) = r.act(t * SEC, std::slice::from_ref(&quiet), &s, &mut store, 1);
        assert!(jobs.is_empty());
    }
    assert_eq!(actions(&store, id).len(), 1);
}

#[test]
fn a_restart_that_changes_nothing_is_ineffective() {
    let s = [service(RemedyMode::Enforce, Some(&["true"]))];
    let quiet = row(4, 4, vec![100]);
    let (mut store, id) = store_with_budget(&quiet);
    let mut r = RestartRemedy::default();
    r.act(SEC, std::slice::from_ref(&quiet), &s, &mut store, 1);
    r.done("bridge", Ok("`true`".into()), &mut store);
    r.verify(5 * SEC, std::slice::from_ref(&quiet), &|_| true, &mut store);
    assert_eq!(
        actions(&store, id)[0].outcome.status,
        OutcomeStatus::Pending,
        "still within the wait"
    );
    r.verify(40 * SEC, std::slice::from_ref(&quiet), &|_| true, &mut store);
    let a = &actions(&store, id)[0];
    assert_eq!(a.outcome.status, OutcomeStatus::Ineffective);
    assert!(a.outcome.text.contains("still run"), "{}", a.outcome.text);
}

#[test]
fn dry_run_plans_once_and_refusals_are_reported_once() {
    let quiet = row(4, 4, vec![100]);
    let (mut store, id) = store_with_budget(&quiet);
    let mut r = RestartRemedy::default();
    let s = [service(RemedyMode::DryRun, Some(&["restart-bridge"]))];
    for t in 1..5 {
        let (_, jobs) = r.act(t * SEC, std::slice::from_ref(&quiet), &s, &mut store, 1);
        assert!(jobs.is_empty());
    }
    let a = actions(&store, id);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].outcome.status, OutcomeStatus::Planned);
    // Neither unit nor command: refused once.
    let (mut store, id) = store_with_budget(&quiet);
    let mut r = RestartRemedy::default();
    let s = [service(RemedyMode::Enforce, None)];
    for t in 1..5 {
        r.act(t * SEC, std::slice::from_ref(&quiet), &s, &mut store, 1);
    }
    let a = actions(&store, id);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].outcome.status, OutcomeStatus::Refused);
    // The agent's own pid: never.
    let (mut store, id) = store_with_budget(&quiet);
    let mut r = RestartRemedy::default();
    let s = [service(RemedyMode::Enforce, Some(&["x"]))];
    let (_, jobs) = r.act(SEC, std::slice::from_ref(&quiet), &s, &mut store, 100);
    assert!(jobs.is_empty());
    assert!(
        actions(&store, id)[0]
            .outcome
            .text
            .contains("never restarts itself")
    );
}

#[test]
fn units_go_over_dbus_and_win_over_a_command() {
    let mut s = service(RemedyMode::Enforce, Some(&["x"]));
    s.unit = Some("bridge.service".into());
    assert_eq!(how(&s), Some(How::Unit("bridge.service".into())));
}
