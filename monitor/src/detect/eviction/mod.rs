//! NAT / load-balancer idle eviction: per flow, whether its middlebox will forget it
//! (`idle-near-eviction`, `keepalive-too-slow`, `likely-evicted`), and post-mortems of flows that
//! died after idling past the timeout. Pure: the clock, the flows, the policy and an [`Env`] come
//! in; verdicts go out. The keepalive remedy acts on them (remedy::keepalive).
pub mod forecast;
mod postmortem;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};

use super::Env;
use crate::config::policy::EvictionPolicy;
use crate::findings::{Family, Key, Scope, Verdict};
use crate::model::eviction::{Assessment, Forecast, KaValues, RoutePath};
use crate::model::finding::{Details, FindingKind, ProcRef, Severity, Subject};
use crate::model::flow::Flow;
use crate::model::observe::NetnsId;
use crate::model::time::{Nanos, SEC};
pub use forecast::{applicable, assess, describe};

/// Post-mortem findings stay active this long, then resolve.
const POSTMORTEM_KEEP: Nanos = 3600 * SEC;

/// What the detector remembers per flow (one map, one entry per cookie it has judged).
#[derive(Clone, Debug, Default)]
struct Memo {
    /// The sample time the flow was last fully assessed at.
    judged_at: Option<Nanos>,
    /// Its at-risk assessment then (re-reported while the sample has not changed).
    at_risk: Option<Box<Assessment>>,
    /// Per-socket keepalive values learnt through an executor (poll mode has no other source).
    known: Option<KaValues>,
    /// A read of those values is in flight.
    reading: bool,
}

/// A quiet flow is assessed again at least this often, whatever else wakes it. Changes that
/// could alter a judgement wake the flows they touch: the flow's own (events, samples), the
/// policy, a namespace's sysctls, its routes and rules (`Router::changed`, checked every 10 s).
/// This is a safety net for what none of those sees. It was 60 s, when route changes were not
/// followed: at a million idle flows, 16,700 judgements a second and about 3 % of a core
/// (`perf`, this machine).
const QUIET_MAX: Nanos = 600 * crate::model::time::SEC;

/// One pass of the detector.
#[derive(Debug, Default)]
pub struct Pass {
    /// Live forecasts (Family::Eviction): the store reconciles them.
    pub verdicts: Vec<Verdict>,
    /// The flows at risk that keepalive can help, with their assessment (for the remedy).
    pub remediable: Vec<(Key, Assessment)>,
    /// Flows whose per-socket keepalive values must be read before judging (poll mode).
    pub reads: Vec<u64>,
    /// New post-mortems (Family::PostMortem).
    pub postmortems: Vec<Verdict>,
    /// Post-mortems past their time: resolve them.
    pub expired: Vec<Key>,
    /// Flows closed since the last pass, with why they died, for the findings they leave.
    pub closed: HashMap<u64, Cow<'static, str>>,
    /// Flows through a gateway that broke after idling: (cookie, namespace, gateway,
    /// destination, idle ms), for the path learner.
    pub breaks: Vec<(u64, NetnsId, String, std::net::IpAddr, u64)>,
    /// Flows judged quiet, with the time until which they are (`Flow::quiet_until`: the
    /// caller marks them in the table).
    /// The flag: a read must confirm the flow before then (see `quiet_until`).
    pub quiet: Vec<(u64, Nanos, bool)>,
}

#[derive(Default)]
pub struct EvictionDetector {
    memo: HashMap<u64, Memo>,
    postmortems: VecDeque<(Key, Nanos)>,
}

pub fn kind_of(v: Forecast) -> Option<FindingKind> {
    match v {
        Forecast::NearEviction | Forecast::KeepaliveCannotHelp => Some(FindingKind::IdleNearEviction),
        Forecast::KeepaliveTooSlow => Some(FindingKind::KeepaliveTooSlow),
        Forecast::LikelyEvicted => Some(FindingKind::LikelyEvicted),
        _ => None,
    }
}

/// The subject of a flow finding.
pub fn flow_subject(f: &Flow, netns: Option<String>) -> Subject {
    Subject::Flow {
        cookie: f.cookie,
        local: f.local().addr(),
        remote: f.remote().addr(),
        netns,
        owner: f.pid_comm().map(|(pid, comm)| ProcRef {
            pid,
            comm: comm.to_string(),
        }),
    }
}

fn verdict(f: &Flow, a: &Assessment, env: &dyn Env) -> Option<Verdict> {
    let kind = kind_of(a.verdict)?;
    Some(Verdict {
        key: Key {
            family: Family::Eviction,
            kind,
            scope: Scope::Flow(f.cookie),
        },
        severity: if kind == FindingKind::LikelyEvicted {
            Severity::Critical
        } else {
            Severity::Warning
        },
        subject: flow_subject(f, env.netns_name(f.netns)),
        summary: describe(a),
        details: Details::Eviction {
            assessment: a.clone(),
        },
        notable: false,
    })
}

/// Until when a calm flow's assessment cannot change while its sample stays the same: no
/// middlebox or kept safe by keepalive (until routes or policy change: QUIET_MAX), or idle until
/// it reaches the warn point. None for anything at risk. The flag: whether a read must confirm
/// the flow before then (the judgement holds only while the flow stays as sampled: an idle one
/// may have moved, a keepalive may be probing a dead peer); a flow with no middlebox and no
/// keepalive needs none (nothing it can do unseen changes a verdict; data it sends unanswered
/// comes as retransmission events). A loopback flow with no middlebox and no keepalive is quiet
/// until it changes.
fn quiet_until(a: &Assessment, f: &Flow, now: Nanos, pol: &EvictionPolicy) -> Option<(Nanos, bool)> {
    // A loopback session never leaves the host: no route change can put a middlebox on it, so
    // without keepalive (which may probe a dead peer) nothing but a change of the flow or of the
    // policy (both wake it) can change its verdict. At 100k idle loopback flows the 60 s
    // re-judgement was a third of the agent's steady time.
    if a.verdict == Forecast::NoMiddlebox
        && a.keepalive.on != Some(true)
        && f.remote().ip().to_canonical().is_loopback()
    {
        return Some((Nanos::MAX, false));
    }
    let (ms, read) = match a.verdict {
        Forecast::NoMiddlebox => (QUIET_MAX / 1_000_000, a.keepalive.on == Some(true)),
        Forecast::Safe => (QUIET_MAX / 1_000_000, true),
        Forecast::Idle => {
            let timeout_ms = a.applicable.as_ref()?.timeout_s.saturating_mul(1000);
            (pol.warn_at_ms(timeout_ms).checked_sub(a.idle_ms)?, true)
        }
        _ => return None,
    };
    Some((now + (ms * 1_000_000).min(QUIET_MAX), read))
}

impl EvictionDetector {
    /// Judges the flows given (the caller passes those changed or due: `FlowTable::to_judge`)
    /// and the flows closed since the last pass. `watched` says which flows the keepalive
    /// remedy is following (they are always assessed). Flows found quiet are listed in
    /// `Pass::quiet` with the time to look again.
    pub fn evaluate<'a>(
        &mut self,
        now: Nanos,
        flows: impl Iterator<Item = &'a Flow>,
        closed: &[(Flow, Nanos)],
        pol: &EvictionPolicy,
        env: &mut dyn Env,
        watched: &dyn Fn(u64) -> bool,
    ) -> Pass {
        let mut pass = Pass::default();
        let quick = pol.warn_at_ms(pol.min_timeout_ms);
        for f in flows {
            // Only ESTABLISHED flows are forecast: others wait for a change (an event).
            if f.state != monitor_common::tcp_state::ESTABLISHED {
                pass.quiet.push((f.cookie, Nanos::MAX, false));
                continue;
            }
            // No sample yet: the read that brings one wakes it; look again now and then.
            let Some(t) = f.tcp.as_ref() else {
                pass.quiet.push((f.cookie, now + QUIET_MAX, false));
                continue;
            };
            // Judged quiet on this very sample (`Flow::quiet_until`): no lookup, no assessment.
            // At 100k flows the memo lookup alone is a cache miss per flow per round.
            if now < f.quiet_until && !watched(f.cookie) {
                continue;
            }
            let memo = self.memo.get(&f.cookie);
            // Quick reject (no allocation, no lookups): recently active, keepalive off or already
            // judged on this sample, no retransmissions, and not followed by the remedy.
            let calm = t.unacked == 0 && t.retransmits == 0;
            let same_sample = memo.is_some_and(|m| m.judged_at == Some(f.tcp_at));
            if calm
                && f.idle_ms(now).is_some_and(|i| i < quick)
                && (t.keepalive != Some(true) || same_sample)
                && !watched(f.cookie)
            {
                // A finding judged on this very sample still holds (no flapping in dry-run).
                if let Some(a) = memo.and_then(|m| m.at_risk.as_deref())
                    && let Some(v) = verdict(f, a, env)
                {
                    pass.verdicts.push(v);
                } else if t.backoff == 0
                    && let Some(idle) = f.idle_ms(now)
                {
                    // Nothing to judge before its idle reaches the quick-reject bound.
                    let wait = (quick.saturating_sub(idle) * 1_000_000).min(QUIET_MAX);
                    pass.quiet.push((f.cookie, now + wait, true));
                }
                continue;
            }
            let known = memo.and_then(|m| m.known);
            let a = assess(f, now, pol, known, env);
            // Poll mode does not see per-socket keepalive values: read them once, then judge.
            if a.keepalive.on == Some(true)
                && a.keepalive.source == crate::model::eviction::KaSource::Sysctl
                && a.applicable.is_some()
                && known.is_none()
            {
                let memo = self.memo.entry(f.cookie).or_default();
                if !memo.reading {
                    memo.reading = true;
                    pass.reads.push(f.cookie);
                }
                memo.judged_at = None;
                continue;
            }
            // A memo only where it carries something: the sample judged (read only for flows
            // with keepalive on, above), an at-risk assessment, values learnt or a read in
            // flight. Most flows have none of these; a memo each was about 75 bytes per flow
            // at 200k flows.
            let at_risk = a.at_risk().then(|| Box::new(a.clone()));
            let reading = memo.is_some_and(|m| m.reading);
            if t.keepalive == Some(true) || at_risk.is_some() || known.is_some() || reading {
                let memo = self.memo.entry(f.cookie).or_default();
                memo.judged_at = Some(f.tcp_at);
                memo.at_risk = at_risk;
            } else if memo.is_some() {
                self.memo.remove(&f.cookie);
            }
            if calm
                && t.backoff == 0
                && let Some((u, read)) = quiet_until(&a, f, now, pol)
            {
                pass.quiet.push((f.cookie, u, read));
            }
            let Some(v) = verdict(f, &a, env) else { continue };
            if matches!(a.verdict, Forecast::NearEviction | Forecast::KeepaliveTooSlow) {
                pass.remediable.push((v.key.clone(), a));
            }
            pass.verdicts.push(v);
        }
        for (f, at) in closed {
            let memo = self.memo.remove(&f.cookie).unwrap_or_default();
            let cause = postmortem::cause(f);
            pass.closed.insert(f.cookie, cause.clone());
            if let Some(idle) = postmortem::idle_before_break(f, *at)
                && let RoutePath::Gateway(gw) = env.route(f.netns, f.remote().ip())
            {
                pass.breaks.push((f.cookie, f.netns, gw, f.remote().ip(), idle));
            }
            let was_evicted_live = memo
                .at_risk
                .as_deref()
                .is_some_and(|a| a.verdict == Forecast::LikelyEvicted);
            if was_evicted_live {
                continue;
            }
            if let Some(v) = postmortem::judge(f, *at, &cause, pol, env) {
                self.postmortems.push_back((v.key.clone(), *at));
                pass.postmortems.push(v);
            }
        }
        while let Some((_, at)) = self.postmortems.front() {
            if now.saturating_sub(*at) <= POSTMORTEM_KEEP {
                break;
            }
            if let Some((key, _)) = self.postmortems.pop_front() {
                pass.expired.push(key);
            }
        }
        pass
    }

    /// Per-socket values read or set by an executor.
    pub fn learn(&mut self, cookie: u64, values: Option<KaValues>) {
        let m = self.memo.entry(cookie).or_default();
        m.reading = false;
        if values.is_some() {
            m.known = values;
        }
        // Judge it again with what was learnt.
        m.judged_at = None;
    }

    /// The values learnt for a flow.
    pub fn known(&self, cookie: u64) -> Option<KaValues> {
        self.memo.get(&cookie).and_then(|m| m.known)
    }

    /// Forgets flows that are gone without a close record (their namespace vanished).
    pub fn forget(&mut self, live: &HashSet<u64>) {
        self.memo.retain(|c, _| live.contains(c));
        if self.memo.capacity() > 2 * self.memo.len() + 1024 {
            self.memo.shrink_to_fit();
        }
    }

    pub fn len(&self) -> usize {
        self.memo.len()
    }

    pub fn is_empty(&self) -> bool {
        self.memo.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests;
