//! The session ledger: per service (and its processes) how many sessions opened, closed, are
//! live and leaked, against what limit, and when the trend reaches it (`session-budget`).
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use monitor_common::tcp_state;

use super::leaks::service_of;
use crate::config::{LedgerSection, ServiceConfig};
use crate::findings::{Family, Key, Scope, Verdict};
use crate::kernel::procfs::nofile;
use crate::model::finding::{Details, FindingKind, Severity, Subject};
use crate::model::flow::Flow;
pub use crate::model::leaks::LedgerRow;
use crate::model::time::{Nanos, SEC, fmt_ms};
/// Trend samples: one every SAMPLE_EVERY over TREND_WINDOW.
const SAMPLE_EVERY: Nanos = 2 * SEC;
const TREND_WINDOW: Nanos = 300 * SEC;

#[derive(Default)]
struct Acc {
    opened: u64,
    closed: u64,
    samples: VecDeque<(Nanos, u64, u64)>,
    pids: Vec<u32>,
    live: u64,
    leaked: u64,
    held: u64,
}

#[derive(Default)]
pub struct Ledger {
    /// Flows counted as opened, with their service (an index into `names`).
    counted: HashMap<u64, u32>,
    names: Vec<String>,
    ids: HashMap<String, u32>,
    acc: BTreeMap<String, Acc>,
    last_sample: Option<Nanos>,
}

pub fn key(service: &str) -> Key {
    Key {
        family: Family::Budget,
        kind: FindingKind::SessionBudget,
        scope: Scope::Service(service.to_string()),
    }
}

impl Ledger {
    fn intern(&mut self, svc: String) -> u32 {
        if let Some(id) = self.ids.get(&svc) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(svc.clone());
        self.ids.insert(svc, id);
        id
    }

    /// Accounts the current flows. A flow counted before and absent now has closed, whether or
    /// not its close was seen (under a connection storm closes are sampled, never lost from
    /// the count).
    pub fn update<'a>(
        &mut self,
        now: Nanos,
        flows: impl Iterator<Item = &'a Flow>,
        leaked: &HashSet<u64>,
        held: &HashMap<String, (u64, Vec<u32>)>,
        services: &[ServiceConfig],
    ) {
        for a in self.acc.values_mut() {
            a.live = 0;
            a.leaked = 0;
            a.held = 0;
            a.pids.clear();
        }
        // Descriptors held to dead sockets are sessions the service still pays for.
        for (svc, (n, pids)) in held {
            let a = self.acc.entry(svc.clone()).or_default();
            a.held = *n;
            a.live += n;
            a.leaked += n;
            for p in pids {
                if !a.pids.contains(p) {
                    a.pids.push(*p);
                }
            }
        }
        let mut seen = HashSet::with_capacity(self.counted.len());
        for f in flows.filter(|f| f.state != tcp_state::LISTEN) {
            let Some(svc) = service_of(f, services) else {
                continue;
            };
            seen.insert(f.cookie);
            if !self.counted.contains_key(&f.cookie) {
                let id = self.intern(svc.clone());
                self.counted.insert(f.cookie, id);
                self.acc.entry(svc.clone()).or_default().opened += 1;
            }
            let a = self.acc.entry(svc).or_default();
            a.live += 1;
            a.leaked += u64::from(leaked.contains(&f.cookie));
            if let Some(o) = &f.owner
                && !a.pids.contains(&o.pid)
            {
                a.pids.push(o.pid);
            }
        }
        let (names, acc) = (&self.names, &mut self.acc);
        self.counted.retain(|c, id| {
            if seen.contains(c) {
                return true;
            }
            if let Some(name) = names.get(*id as usize) {
                acc.entry(name.clone()).or_default().closed += 1;
            }
            false
        });
        if self.counted.capacity() > 4 * self.counted.len() + 4096 {
            self.counted.shrink_to_fit();
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
            .filter(|(_, a)| a.live > 0 || a.opened > 0 || a.held > 0)
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
                    held: a.held,
                    restart: None,
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
    pub fn evaluate(&self, services: &[ServiceConfig], cfg: &LedgerSection) -> Vec<Verdict> {
        let mut out = Vec::new();
        for r in self.rows(services) {
            let Some(limit) = r.limit else { continue };
            let near = r.live as f64 >= cfg.warn_ratio * limit as f64;
            let soon = r.exhaustion_eta_s.is_some_and(|e| e <= cfg.horizon.as_secs());
            if !near && !soon {
                continue;
            }
            let held = if r.held > 0 {
                format!(", {} held as descriptors to dead sockets", r.held)
            } else {
                String::new()
            };
            let summary = format!(
                "{}: {} of {} sessions in use ({} leaked{held}){}",
                r.service,
                r.live,
                limit,
                r.leaked,
                r.exhaustion_eta_s.map_or(String::new(), |e| format!(
                    ", limit reached in {} at the current trend",
                    fmt_ms(e.saturating_mul(1000))
                ))
            );
            out.push(Verdict {
                key: key(&r.service),
                severity: if r.live >= limit {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                subject: Subject::Service {
                    name: r.service.clone(),
                },
                summary,
                details: Details::Budget { ledger: r },
                notable: false,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::FindingStore;
    use crate::model::finding::Transition;
    use crate::model::observe::Owner;

    fn flow(cookie: u64, state: u8) -> Flow {
        let mut f = Flow::new(
            cookie,
            0,
            "10.0.0.1:7000".parse().unwrap(),
            format!("10.0.0.2:{}", 40000 + cookie).parse().unwrap(),
            state,
            0,
        );
        f.inode = cookie;
        f.owner = Some(std::sync::Arc::new(Owner {
            pid: 4_194_305,
            comm: "bridge".into(),
            cgroup: None,
            unit: None,
        }));
        f
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
        let none = HashMap::new();
        // One leaked session every 10 s.
        for i in 0..8u64 {
            flows.push(flow(i, tcp_state::CLOSE_WAIT));
            let leaked: HashSet<u64> = flows.iter().map(|f| f.cookie).collect();
            l.update(i * 10 * SEC, flows.iter(), &leaked, &none, &svc);
            let c = store.reconcile(Family::Budget, l.evaluate(&svc, &cfg), i * 10 * SEC, |_, _| {
                "back".into()
            });
            if (1..7).contains(&i) {
                // Budget fires as soon as the trend reaches the limit within the horizon.
                assert!(!store.all().is_empty(), "fires before the limit");
            }
            if i == 7 {
                assert!(c.is_empty(), "not repeated");
            }
        }
        let r = &l.rows(&svc)[0];
        assert_eq!(
            (r.opened, r.closed, r.live, r.leaked, r.limit),
            (8, 0, 8, 8, Some(10))
        );
        assert!((r.growth_per_min - 6.0).abs() < 0.01, "{}", r.growth_per_min);
        assert_eq!(r.exhaustion_eta_s, Some(20));
        assert_eq!(store.all().len(), 1);
        assert!(
            store.all()[0]
                .summary
                .contains("8 of 10 sessions in use (8 leaked), limit reached in 20s"),
            "{}",
            store.all()[0].summary
        );
        // Sessions close: counted, and the budget resolves once the trend stops.
        flows.drain(..6);
        for k in 0..200u64 {
            l.update((80 + k * 2) * SEC, flows.iter(), &HashSet::new(), &none, &svc);
        }
        let r = &l.rows(&svc)[0];
        assert_eq!((r.closed, r.live), (6, 2));
        let c = store.reconcile(Family::Budget, l.evaluate(&svc, &cfg), 480 * SEC, |_, _| {
            "back".into()
        });
        assert_eq!(c, vec![(1, Transition::Resolved)]);
    }

    #[test]
    fn descriptors_held_to_dead_sockets_count_as_live_and_leaked() {
        let svc = vec![ServiceConfig {
            name: "bridge".into(),
            comm: Some("bridge".into()),
            max_sessions: Some(4),
            ..Default::default()
        }];
        let mut l = Ledger::default();
        let held = HashMap::from([("bridge".to_string(), (4u64, vec![7u32]))]);
        l.update(SEC, std::iter::empty(), &HashSet::new(), &held, &svc);
        let r = &l.rows(&svc)[0];
        assert_eq!(
            (r.live, r.leaked, r.held, r.pids.as_slice()),
            (4, 4, 4, &[7u32][..])
        );
        let v = l.evaluate(&svc, &LedgerSection::default());
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].severity, Severity::Critical);
        assert!(
            v[0].summary.contains("4 held as descriptors to dead sockets"),
            "{}",
            v[0].summary
        );
    }
}
