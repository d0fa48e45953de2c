//! The restart remedy (opt-in per service, default off): a service that leaks sessions is
//! restarted when its budget is exhausted or about to be (its `session-budget` finding is open),
//! at its quietest moment (live sessions at or below `restart_when_live_at_most`, default 0),
//! never more often than `restart_min_interval` (default 1 h). With a systemd unit: RestartUnit
//! over D-Bus; without one: the configured `restart_command`. Logged with the sessions before
//! and after, and checked from the service's side (its processes were replaced, its slots freed).
//!
//! This replaces a blind nightly restart with one that happens only when needed and drops no live
//! session. It never restarts the agent itself or anything not configured.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::record;
use crate::config::ServiceConfig;
use crate::detect::ledger;
use crate::findings::{Change, FindingStore};
use crate::model::finding::{ActionValues, FindingId, Outcome, OutcomeStatus, RemedyAction, RemedyMode};
use crate::model::leaks::LedgerRow;
use crate::model::time::{Nanos, SEC, fmt_ms, ms};

/// Defaults of the per-service keys.
pub const DEFAULT_LIVE_AT_MOST: u64 = 0;
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(3600);
/// How long a restarted service has to come back with new processes.
const VERIFY_WITHIN: Nanos = 30 * SEC;

/// How a service is restarted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum How {
    /// systemd's RestartUnit(unit, "replace") over D-Bus.
    Unit(String),
    /// The configured command (argv, no shell).
    Command(Vec<String>),
}

impl std::fmt::Display for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            How::Unit(u) => write!(f, "RestartUnit({u}) over D-Bus"),
            How::Command(c) => write!(f, "`{}`", c.join(" ")),
        }
    }
}

/// A restart to run (off the state owner's loop); its result comes back through
/// [`RestartRemedy::done`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub service: String,
    pub how: How,
}

#[derive(Debug)]
struct Attempt {
    finding: FindingId,
    at: Nanos,
    pids_before: Vec<u32>,
    /// Set when the executor answered.
    requested: Option<Result<String, String>>,
}

#[derive(Default)]
pub struct RestartRemedy {
    /// Last attempt per service (done or failed): the interval counts from it.
    last: HashMap<String, Nanos>,
    /// Attempts waiting for the executor or for the service to come back.
    waiting: HashMap<String, Attempt>,
    /// Services that cannot be restarted (no unit, no command; the agent's own), reported once.
    refused: HashSet<String>,
    /// Findings that got their dry-run plan.
    planned: HashSet<FindingId>,
    /// Per service, what the remedy is waiting for or did last, in words (the ledger's RESTART).
    pub notes: HashMap<String, String>,
}

/// Records a restart action on `finding` with the service's sessions before it.
fn act(
    store: &mut FindingStore,
    finding: FindingId,
    now: Nanos,
    mode: RemedyMode,
    status: OutcomeStatus,
    text: impl Into<String>,
    row: &LedgerRow,
) -> Option<Change> {
    store.act(
        finding,
        record(
            now,
            RemedyAction::Restart,
            mode,
            status,
            text,
            Some(sessions(row)),
            None,
        ),
    )
}

fn sessions(r: &LedgerRow) -> ActionValues {
    ActionValues::Sessions {
        live: r.live,
        leaked: r.leaked,
        held: r.held,
        pids: r.pids.clone(),
    }
}

/// How `s` can be restarted, if at all.
pub fn how(s: &ServiceConfig) -> Option<How> {
    match (&s.unit, &s.restart_command) {
        (Some(u), _) => Some(How::Unit(u.clone())),
        (None, Some(c)) if !c.is_empty() => Some(How::Command(c.clone())),
        _ => None,
    }
}

impl RestartRemedy {
    /// Decides for each service with a restart policy. Returns what changed on findings and the
    /// restarts to run now (enforce mode).
    pub fn act(
        &mut self,
        now: Nanos,
        rows: &[LedgerRow],
        services: &[ServiceConfig],
        store: &mut FindingStore,
        own_pid: u32,
    ) -> (Vec<Change>, Vec<Job>) {
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        for s in services {
            let mode = s.restart.unwrap_or(RemedyMode::Off);
            if mode == RemedyMode::Off {
                self.notes.remove(&s.name);
                continue;
            }
            let Some(row) = rows.iter().find(|r| r.service == s.name) else {
                continue;
            };
            if self.waiting.contains_key(&s.name) {
                continue;
            }
            // Only while the budget is exhausted or about to be (the finding is open).
            let Some(finding) = store
                .id_of(&ledger::key(&s.name))
                .filter(|id| store.get(*id).is_some_and(|f| f.active))
            else {
                continue;
            };
            let refusal = match how(s) {
                None => Some((
                    "cannot restart: neither `unit` nor `restart_command` is set",
                    "refused: the service has neither `unit` (systemd) nor `restart_command`; set one to let holdfast restart it",
                )),
                Some(_) if row.pids.contains(&own_pid) => Some((
                    "never: it is the agent itself",
                    "refused: holdfast never restarts itself",
                )),
                Some(_) => None,
            };
            if let Some((note, outcome)) = refusal {
                self.notes.insert(s.name.clone(), note.into());
                // Reported once per service.
                if self.refused.insert(s.name.clone())
                    && let Some(c) = act(store, finding, now, mode, OutcomeStatus::Refused, outcome, row)
                {
                    out.push(c);
                }
                continue;
            }
            let Some(how) = how(s) else { continue };
            let interval = s.restart_min_interval.unwrap_or(DEFAULT_MIN_INTERVAL).as_nanos() as u64;
            if let Some(last) = self.last.get(&s.name)
                && now.saturating_sub(*last) < interval
            {
                self.notes.insert(
                    s.name.clone(),
                    format!(
                        "not before {} from now (restart_min_interval)",
                        fmt_ms(ms(interval - now.saturating_sub(*last)))
                    ),
                );
                continue;
            }
            let quiet_at = s.restart_when_live_at_most.unwrap_or(DEFAULT_LIVE_AT_MOST);
            let live = row.live.saturating_sub(row.leaked);
            if live > quiet_at {
                self.notes.insert(
                    s.name.clone(),
                    format!(
                        "waiting for a quiet moment: {live} live session(s), restarts at {quiet_at} or fewer"
                    ),
                );
                continue;
            }
            if mode == RemedyMode::DryRun {
                self.notes
                    .insert(s.name.clone(), format!("would restart now via {how} (dry-run)"));
                if self.planned.insert(finding)
                    && let Some(c) = act(
                        store,
                        finding,
                        now,
                        mode,
                        OutcomeStatus::Planned,
                        format!(
                            "planned: restart via {how} ({live} live, {} leaked, {} held; dry-run)",
                            row.leaked, row.held
                        ),
                        row,
                    )
                {
                    out.push(c);
                }
                continue;
            }
            self.last.insert(s.name.clone(), now);
            self.notes.insert(s.name.clone(), format!("restarting via {how}"));
            self.waiting.insert(
                s.name.clone(),
                Attempt {
                    finding,
                    at: now,
                    pids_before: row.pids.clone(),
                    requested: None,
                },
            );
            if let Some(c) = act(
                store,
                finding,
                now,
                mode,
                OutcomeStatus::Pending,
                format!(
                    "restarting via {how}: {live} live, {} leaked, {} held session(s) before",
                    row.leaked, row.held
                ),
                row,
            ) {
                out.push(c);
            }
            jobs.push(Job {
                service: s.name.clone(),
                how,
            });
        }
        (out, jobs)
    }

    /// The executor's answer: the request was accepted (and how), or failed (why).
    pub fn done(
        &mut self,
        service: &str,
        result: Result<String, String>,
        store: &mut FindingStore,
    ) -> Vec<Change> {
        let Some(a) = self.waiting.get_mut(service) else {
            return Vec::new();
        };
        match result {
            Ok(r) => {
                a.requested = Some(Ok(r));
                Vec::new()
            }
            Err(e) => {
                let a = self.waiting.remove(service).expect("present");
                self.notes.insert(
                    service.to_string(),
                    format!("last restart failed: {e}; not retried before the interval"),
                );
                let outcome = Outcome::new(
                    OutcomeStatus::Failed,
                    format!("failed: {e}; not retried before restart_min_interval"),
                );
                store
                    .amend_action(a.finding, RemedyAction::Restart, |x| x.outcome = outcome)
                    .into_iter()
                    .collect()
            }
        }
    }

    /// Checks requested restarts from the service's side: its processes were replaced (and what
    /// it holds and serves now), or they were not within VERIFY_WITHIN.
    /// `alive` tells whether a pid still runs.
    pub fn verify(
        &mut self,
        now: Nanos,
        rows: &[LedgerRow],
        alive: &dyn Fn(u32) -> bool,
        store: &mut FindingStore,
    ) -> Vec<Change> {
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (svc, a) in &self.waiting {
            let Some(Ok(how)) = &a.requested else { continue };
            let row = rows.iter().find(|r| &r.service == svc);
            let pids_now: Vec<u32> = row.map(|r| r.pids.clone()).unwrap_or_default();
            let replaced = !a.pids_before.is_empty()
                && a.pids_before.iter().all(|p| !pids_now.contains(p))
                && a.pids_before.iter().all(|p| !alive(*p));
            let (status, text) = if replaced {
                (
                    OutcomeStatus::Succeeded,
                    format!(
                        "restarted via {how}: pids {:?} replaced by {:?}; now {} live, {} leaked, {} held",
                        a.pids_before,
                        pids_now,
                        row.map_or(0, |r| r.live),
                        row.map_or(0, |r| r.leaked),
                        row.map_or(0, |r| r.held)
                    ),
                )
            } else if now.saturating_sub(a.at) >= VERIFY_WITHIN {
                (
                    OutcomeStatus::Ineffective,
                    format!(
                        "requested via {how}, but after {} pids {:?} still run: the service was not restarted",
                        fmt_ms(ms(now.saturating_sub(a.at))),
                        a.pids_before
                    ),
                )
            } else {
                continue;
            };
            self.notes.insert(svc.clone(), text.clone());
            let after = row.map(sessions);
            if let Some(c) = store.amend_action(a.finding, RemedyAction::Restart, |x| {
                x.outcome = Outcome::new(status, text);
                x.after = after;
            }) {
                out.push(c);
            }
            done.push(svc.clone());
        }
        for s in done {
            self.waiting.remove(&s);
        }
        out
    }
}

pub mod run;

#[cfg(test)]
mod tests;
