//! The session ledger: per service (and its processes) how many sessions opened, closed, are
//! live and leaked, against what limit, and when the trend reaches it (`session-budget`).
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use monitor_common::tcp_state;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{LedgerSection, ServiceConfig};
use crate::findings::{FindingStore, Severity, Transition, ms};
use crate::flows::Flow;
use crate::human::fmt_ms;
use crate::leaks::service_of;
use crate::observe::Nanos;

const SEC: Nanos = 1_000_000_000;
/// Trend samples: one every SAMPLE_EVERY over TREND_WINDOW.
const SAMPLE_EVERY: Nanos = 2 * SEC;
const TREND_WINDOW: Nanos = 300 * SEC;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LedgerRow {
    pub service: String,
    pub pids: Vec<u32>,
    pub opened: u64,
    pub closed: u64,
    pub live: u64,
    pub leaked: u64,
    pub limit: Option<u64>,
    /// Where the limit comes from: `config` (max_sessions) or `RLIMIT_NOFILE`.
    pub limit_source: Option<String>,
    /// Net sessions per minute over the trend window (live growth).
    pub growth_per_min: f64,
    pub opened_per_min: f64,
    /// Seconds until the limit at the current trend.
    pub exhaustion_eta_s: Option<u64>,
}

#[derive(Default)]
struct Acc {
    opened: u64,
    closed: u64,
    samples: VecDeque<(Nanos, u64, u64)>,
    pids: Vec<u32>,
    live: u64,
    leaked: u64,
}

#[derive(Default)]
pub struct Ledger {
    counted: HashMap<u64, String>,
    acc: BTreeMap<String, Acc>,
    budget: HashMap<String, u64>,
    last_sample: Option<Nanos>,
}

/// The soft RLIMIT_NOFILE of `pid` (each session holds a descriptor).
fn nofile(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Ledger {
    /// Accounts the current flows and those closed since the last call.
    pub fn update<'a>(
        &mut self,
        now: Nanos,
        flows: impl Iterator<Item = &'a Flow>,
        closed: &[(Flow, Nanos)],
        leaked: &HashSet<u64>,
        services: &[ServiceConfig],
    ) {
        for a in self.acc.values_mut() {
            a.live = 0;
            a.leaked = 0;
            a.pids.clear();
        }
        for f in flows.filter(|f| f.state != tcp_state::LISTEN) {
            let Some(svc) = service_of(f, services) else {
                continue;
            };
            let a = self.acc.entry(svc.clone()).or_default();
            if !self.counted.contains_key(&f.cookie) {
                self.counted.insert(f.cookie, svc);
                a.opened += 1;
            }
            a.live += 1;
            a.leaked += u64::from(leaked.contains(&f.cookie));
            if let Some(o) = &f.owner {
                if !a.pids.contains(&o.pid) {
                    a.pids.push(o.pid);
                }
            }
        }
        for (f, _) in closed {
            if let Some(svc) = self.counted.remove(&f.cookie) {
                self.acc.entry(svc).or_default().closed += 1;
            }
        }
        if self
            .last_sample
            .is_none_or(|t| now.saturating_sub(t) >= SAMPLE_EVERY)
        {
            self.last_sample = Some(now);
            for a in self.acc.values_mut() {
                a.samples.push_back((now, a.live, a.opened));
                while a
                    .samples
                    .front()
                    .is_some_and(|(t, _, _)| now.saturating_sub(*t) > TREND_WINDOW)
                {
                    a.samples.pop_front();
                }
            }
        }
    }

    pub fn rows(&self, services: &[ServiceConfig]) -> Vec<LedgerRow> {
        self.acc
            .iter()
            .filter(|(_, a)| a.live > 0 || a.opened > 0)
            .map(|(name, a)| {
                let per_min = |d: f64, dt: Nanos| {
                    if dt == 0 {
                        0.0
                    } else {
                        d * 60.0 * SEC as f64 / dt as f64
                    }
                };
                let (growth, opened_rate) = match (a.samples.front(), a.samples.back()) {
                    (Some(f), Some(b)) if b.0 > f.0 => (
                        per_min(b.1 as f64 - f.1 as f64, b.0 - f.0),
                        per_min((b.2 - f.2) as f64, b.0 - f.0),
                    ),
                    _ => (0.0, 0.0),
                };
                let (limit, source) = match services
                    .iter()
                    .find(|s| &s.name == name)
                    .and_then(|s| s.max_sessions)
                {
                    Some(m) => (Some(m), Some("config".to_string())),
                    None => match a.pids.first().and_then(|p| nofile(*p)) {
                        Some(n) => (Some(n), Some("RLIMIT_NOFILE".to_string())),
                        None => (None, None),
                    },
                };
                let eta = limit
                    .filter(|_| growth > 0.0)
                    .map(|l| ((l.saturating_sub(a.live)) as f64 / growth * 60.0) as u64);
                LedgerRow {
                    service: name.clone(),
                    pids: a.pids.clone(),
                    opened: a.opened,
                    closed: a.closed,
                    live: a.live,
                    leaked: a.leaked,
                    limit,
                    limit_source: source,
                    growth_per_min: growth,
                    opened_per_min: opened_rate,
                    exhaustion_eta_s: eta,
                }
            })
            .collect()
    }

    /// `session-budget`: a service near its limit, or whose trend reaches it within the horizon.
    pub fn evaluate(
        &mut self,
        now: Nanos,
        services: &[ServiceConfig],
        cfg: &LedgerSection,
        store: &mut FindingStore,
    ) -> Vec<(u64, Transition)> {
        let mut out = Vec::new();
        let mut firing = HashSet::new();
        for r in self.rows(services) {
            let Some(limit) = r.limit else { continue };
            let near = r.live as f64 >= cfg.warn_ratio * limit as f64;
            let soon = r.exhaustion_eta_s.is_some_and(|e| e <= cfg.horizon.as_secs());
            if !near && !soon {
                continue;
            }
            firing.insert(r.service.clone());
            let summary = format!(
                "{}: {} of {} sessions in use ({} leaked){}",
                r.service,
                r.live,
                limit,
                r.leaked,
                r.exhaustion_eta_s.map_or(String::new(), |e| format!(
                    ", limit reached in {} at the current trend",
                    fmt_ms(e * 1000)
                ))
            );
            let details = json!({ "ledger": r });
            match self.budget.get(&r.service) {
                Some(id) => {
                    if let Some(f) = store.get_mut(*id) {
                        f.summary = summary;
                        f.details = details;
                        f.updated_ms = ms(now);
                    }
                }
                None => {
                    let sev = if r.live >= limit {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    };
                    let id = store.open(
                        "session-budget",
                        sev,
                        format!("service {}", r.service),
                        summary,
                        details,
                        now,
                    );
                    self.budget.insert(r.service.clone(), id);
                    out.push((id, Transition::New));
                }
            }
        }
        for (svc, id) in self.budget.clone() {
            if !firing.contains(&svc) {
                self.budget.remove(&svc);
                let summary = store
                    .get(id)
                    .map(|f| format!("{} — resolved: back within budget", f.summary))
                    .unwrap_or_default();
                store.resolve(id, summary, now);
                out.push((id, Transition::Resolved));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Owner;

    fn flow(cookie: u64, state: u8) -> Flow {
        Flow {
            cookie,
            local: "10.0.0.1:7000".parse().unwrap(),
            remote: format!("10.0.0.2:{}", 40000 + cookie).parse().unwrap(),
            state,
            state_since: None,
            first_seen: 0,
            last_seen: 0,
            inode: cookie,
            uid: 0,
            owner: Some(std::sync::Arc::new(Owner {
                pid: 4_194_305,
                comm: "bridge".into(),
                cgroup: None,
                unit: None,
            })),
            pid_hint: None,
            tcp: None,
            tcp_at: 0,
            resets_recv: 0,
            resets_sent: 0,
            retransmit_events: 0,
            last_error: None,
        }
    }

    #[test]
    fn counts_trend_and_budget() {
        let svc = vec![ServiceConfig {
            name: "bridge".into(),
            comm: Some("bridge".into()),
            max_sessions: Some(10),
            ..Default::default()
        }];
        let cfg = LedgerSection::default();
        let mut l = Ledger::default();
        let mut store = FindingStore::default();
        let mut flows: Vec<Flow> = Vec::new();
        // One leaked session every 10 s.
        for i in 0..8u64 {
            flows.push(flow(i, tcp_state::CLOSE_WAIT));
            let leaked: HashSet<u64> = flows.iter().map(|f| f.cookie).collect();
            l.update(i * 10 * SEC, flows.iter(), &[], &leaked, &svc);
            let t = l.evaluate(i * 10 * SEC, &svc, &cfg, &mut store);
            if i < 7 {
                // Budget fires as soon as the trend reaches the limit within the horizon.
                if i >= 1 {
                    assert!(!store.items.is_empty(), "fires before the limit");
                }
            } else {
                assert!(t.is_empty(), "not repeated");
            }
        }
        let r = &l.rows(&svc)[0];
        assert_eq!(
            (r.opened, r.closed, r.live, r.leaked, r.limit),
            (8, 0, 8, 8, Some(10))
        );
        assert!((r.growth_per_min - 6.0).abs() < 0.01, "{}", r.growth_per_min);
        assert_eq!(r.exhaustion_eta_s, Some(20));
        assert_eq!(store.items.len(), 1);
        assert!(
            store.items[0]
                .summary
                .contains("8 of 10 sessions in use (8 leaked), limit reached in 20s")
        );
        // Sessions close: counted, and the budget resolves once the trend stops.
        let closed: Vec<(Flow, Nanos)> = flows.drain(..6).map(|f| (f, 80 * SEC)).collect();
        for k in 0..200u64 {
            l.update(
                (80 + k * 2) * SEC,
                flows.iter(),
                if k == 0 { &closed } else { &[] },
                &HashSet::new(),
                &svc,
            );
        }
        let r = &l.rows(&svc)[0];
        assert_eq!((r.closed, r.live), (6, 2));
        l.evaluate(480 * SEC, &svc, &cfg, &mut store);
        assert!(!store.items[0].active);
    }
}
