//! The session ledger: per service (and its processes) how many sessions opened, closed, are
//! live and leaked, against what limit, and when the trend reaches it (`session-budget`).
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use monitor_common::tcp_state;

use super::leaks::service_of;
use crate::config::{LedgerSection, ServiceConfig};
use crate::findings::{Family, Key, Scope, Verdict};
use crate::kernel::procfs::nofile;
use crate::model::finding::{Details, FindingKind, Severity, Subject};
use crate::model::flow::Flow;
pub use crate::model::leaks::LedgerRow;
use crate::model::observe::Owner;
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

/// What the ledger is given to count.
pub enum Counting<'a> {
    /// Every flow (what is not among them has closed).
    All(Box<dyn Iterator<Item = &'a Flow> + 'a>),
    /// What changed since the last update (None: gone), and every flow for a recount.
    Changed {
        changed: Vec<(u64, Option<&'a Flow>)>,
        all: Box<dyn Iterator<Item = &'a Flow> + 'a>,
    },
}

/// A flow the ledger counts: 16 bytes, one map entry of 24 per counted flow (it was 32 with a
/// separate pid, an optional owner and a round number: about 43 bytes a flow at 200k flows,
/// now about 33).
struct Counted {
    /// The service it was counted as opened by (its close is counted there).
    opened_as: u32,
    /// Its service now.
    svc: u32,
    /// The owner `svc` was found for, whose pid it is counted under (held: the same `Arc` means
    /// the same owner).
    owner: Arc<Owner>,
}

#[derive(Default)]
pub struct Ledger {
    /// Flows counted as opened, with their service (an index into `names`). Keyed by socket
    /// cookies (the kernel's): foldhash.
    counted: foldhash::HashMap<u64, Counted>,
    /// The service of each (owner address, local port) looked up in this update (owners are
    /// shared `Arc`s, one per process).
    round_owner: HashMap<(usize, u16), u32>,
    /// The services the lookups were made with.
    services: Vec<ServiceConfig>,
    /// Live flows per service id, and per (service id, pid), kept as flows are counted.
    live_by: Vec<u64>,
    pids_by: HashMap<(u32, u32), u32>,
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
        flows: impl Iterator<Item = &'a Flow> + 'a,
        leaked: &HashSet<u64>,
        held: &HashMap<String, (u64, Vec<u32>)>,
        services: &[ServiceConfig],
    ) {
        self.update_from(now, Counting::All(Box::new(flows)), leaked, held, services);
    }

    /// Accounts what changed since the last update: each changed cookie with its flow, None
    /// for a flow gone. Everything else counts as it did (no walk of every flow). A change of
    /// the configured services recounts from `all`.
    pub fn update_from<'a>(
        &mut self,
        now: Nanos,
        counting: Counting<'a>,
        leaked: &HashSet<u64>,
        held: &HashMap<String, (u64, Vec<u32>)>,
        services: &[ServiceConfig],
    ) {
        // The configured services changed (a reload): every flow's service is looked up again.
        let relookup = self.services != services;
        if relookup {
            self.services = services.to_vec();
        }
        match counting {
            Counting::All(flows) => self.account_all(flows, relookup, services),
            Counting::Changed { changed, all } if relookup => {
                // Recount: the changed ones as they are now, then every flow.
                for (c, f) in changed {
                    self.account(c, f, relookup, services);
                }
                self.account_all(all, relookup, services);
            }
            Counting::Changed { changed, .. } => {
                for (c, f) in changed {
                    self.account(c, f, relookup, services);
                }
            }
        }
        // Addresses name owners only while their flows hold them: this update's lookups end here.
        self.round_owner.clear();
        if self.counted.capacity() > 4 * self.counted.len() + 4096 {
            self.counted.shrink_to_fit();
        }
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
        let mut leaked_by = vec![0u64; self.names.len()];
        for c in leaked {
            if let Some(e) = self.counted.get(c)
                && let Some(n) = leaked_by.get_mut(e.svc as usize)
            {
                *n += 1;
            }
        }
        let mut pids: Vec<(u32, u32)> = self.pids_by.keys().copied().collect();
        pids.sort_unstable();
        for (id, name) in self.names.iter().enumerate() {
            let live = self.live_by.get(id).copied().unwrap_or(0);
            if live == 0 && !self.acc.contains_key(name) {
                continue;
            }
            let a = self.acc.entry(name.clone()).or_default();
            a.live += live;
            a.leaked += leaked_by[id];
        }
        for (id, pid) in pids {
            if let Some(name) = self.names.get(id as usize)
                && let Some(a) = self.acc.get_mut(name)
                && !a.pids.contains(&pid)
            {
                a.pids.push(pid);
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

    /// Counts every flow; a flow counted before and not among them has closed.
    fn account_all<'a>(
        &mut self,
        flows: Box<dyn Iterator<Item = &'a Flow> + 'a>,
        relookup: bool,
        services: &[ServiceConfig],
    ) {
        let mut seen: foldhash::HashSet<u64> = foldhash::HashSet::default();
        for f in flows {
            seen.insert(f.cookie);
            self.account(f.cookie, Some(f), relookup, services);
        }
        let absent: Vec<u64> = self
            .counted
            .keys()
            .filter(|k| !seen.contains(*k))
            .copied()
            .collect();
        for c in absent {
            self.account(c, None, relookup, services);
        }
    }

    /// Counts one flow as it is now (`None`: gone): opened when first counted, closed when
    /// gone, and moved between services or processes when its owner changed. `relookup`: the
    /// services changed, so the service its owner was found to be is looked up again.
    fn account(&mut self, cookie: u64, f: Option<&Flow>, relookup: bool, services: &[ServiceConfig]) {
        let now = f.filter(|f| f.state != tcp_state::LISTEN).and_then(|f| {
            let owner = f.owner.as_ref()?;
            let known = self
                .counted
                .get(&cookie)
                .filter(|c| !relookup && Arc::ptr_eq(&c.owner, owner))
                .map(|c| c.svc);
            // Within one update every owner is held by its flows: its address names it.
            let key = (Arc::as_ptr(owner) as usize, f.local.port());
            let svc = match known.or_else(|| self.round_owner.get(&key).copied()) {
                Some(id) => id,
                None => {
                    let id = self.intern(service_of(f, services)?);
                    self.round_owner.insert(key, id);
                    id
                }
            };
            Some((svc, owner.clone()))
        });
        match (
            self.counted
                .get(&cookie)
                .map(|c| (c.svc, c.owner.pid, c.opened_as)),
            now,
        ) {
            (Some((svc, pid, _)), Some((id, owner))) => {
                if (svc, pid) != (id, owner.pid) {
                    self.count(svc, pid, false);
                    self.count(id, owner.pid, true);
                }
                if let Some(c) = self.counted.get_mut(&cookie) {
                    c.svc = id;
                    c.owner = owner;
                }
            }
            (Some((svc, pid, opened_as)), None) => {
                self.counted.remove(&cookie);
                self.count(svc, pid, false);
                if let Some(name) = self.names.get(opened_as as usize) {
                    self.acc.entry(name.clone()).or_default().closed += 1;
                }
            }
            (None, Some((id, owner))) => {
                self.count(id, owner.pid, true);
                self.counted.insert(
                    cookie,
                    Counted {
                        opened_as: id,
                        svc: id,
                        owner,
                    },
                );
                if let Some(name) = self.names.get(id as usize) {
                    self.acc.entry(name.clone()).or_default().opened += 1;
                }
            }
            (None, None) => {}
        }
    }

    /// One live flow more (`up`) or less for a service and process.
    fn count(&mut self, svc: u32, pid: u32, up: bool) {
        let i = svc as usize;
        if self.live_by.len() <= i {
            self.live_by.resize(i + 1, 0);
        }
        let n = self.pids_by.entry((svc, pid)).or_default();
        if up {
            self.live_by[i] += 1;
            *n += 1;
        } else {
            self.live_by[i] = self.live_by[i].saturating_sub(1);
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pids_by.remove(&(svc, pid));
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
    fn counting_the_changes_equals_counting_every_flow() {
        let svc = vec![ServiceConfig {
            name: "bridge".into(),
            comm: Some("bridge".into()),
            ..Default::default()
        }];
        let other = std::sync::Arc::new(Owner {
            pid: 77,
            comm: "sshd".into(),
            cgroup: None,
            unit: None,
        });
        let none = HashMap::new();
        let (mut full, mut inc) = (Ledger::default(), Ledger::default());
        let mut flows: std::collections::BTreeMap<u64, Flow> = (0..20).map(|c| (c, flow(c, 1))).collect();
        let mut changed: Vec<u64> = flows.keys().copied().collect();
        for step in 0..6u64 {
            let leaked: HashSet<u64> = [1, 2, 3].into();
            full.update(step * SEC, flows.values(), &leaked, &none, &svc);
            let counting = Counting::Changed {
                changed: changed.iter().map(|c| (*c, flows.get(c))).collect(),
                all: Box::new(flows.values()),
            };
            inc.update_from(step * SEC, counting, &leaked, &none, &svc);
            let rows = |l: &Ledger| {
                l.rows(&svc)
                    .into_iter()
                    .map(|r| (r.service, r.opened, r.closed, r.live, r.leaked, r.pids))
                    .collect::<Vec<_>>()
            };
            assert_eq!(rows(&full), rows(&inc), "step {step}");
            // Next: two close, two open, one changes owner (another service and process).
            changed = vec![
                step * 2,
                step * 2 + 1,
                100 + step * 2,
                100 + step * 2 + 1,
                10 + step,
            ];
            flows.remove(&(step * 2));
            flows.remove(&(step * 2 + 1));
            flows.insert(100 + step * 2, flow(100 + step * 2, 1));
            flows.insert(100 + step * 2 + 1, flow(100 + step * 2 + 1, 1));
            if let Some(f) = flows.get_mut(&(10 + step)) {
                f.owner = Some(other.clone());
            }
        }
        let r = inc.rows(&svc);
        let bridge = r.iter().find(|r| r.service == "bridge").unwrap();
        assert_eq!((bridge.opened, bridge.closed), (30, 10));
        assert!(
            r.iter()
                .any(|r| r.service == "sshd" && r.live == 5 && r.pids == vec![77])
        );
    }

    #[test]
    fn a_change_of_services_moves_every_counted_flow() {
        let bridge = vec![ServiceConfig {
            name: "bridge".into(),
            comm: Some("bridge".into()),
            ..Default::default()
        }];
        let media = vec![ServiceConfig {
            name: "media".into(),
            comm: Some("bridge".into()),
            ..Default::default()
        }];
        let none = HashMap::new();
        let mut l = Ledger::default();
        let flows: Vec<Flow> = (0..5).map(|c| flow(c, 1)).collect();
        l.update(SEC, flows.iter(), &HashSet::new(), &none, &bridge);
        let live = |l: &Ledger, svc: &[ServiceConfig]| {
            l.rows(svc)
                .into_iter()
                .map(|r| (r.service, r.live, r.opened, r.closed))
                .collect::<Vec<_>>()
        };
        assert_eq!(live(&l, &bridge), vec![("bridge".to_string(), 5, 5, 0)]);
        // A reload renames the service: the flows move, counted as opened under bridge (their
        // closes are counted there), live under media; nothing else changed about them.
        let counting = Counting::Changed {
            changed: vec![(0, None)],
            all: Box::new(flows[1..].iter()),
        };
        l.update_from(2 * SEC, counting, &HashSet::new(), &none, &media);
        assert_eq!(
            live(&l, &media),
            vec![("bridge".to_string(), 0, 5, 1), ("media".to_string(), 4, 0, 0)]
        );
        // And the next update, with nothing changed, keeps them there.
        let counting = Counting::Changed {
            changed: vec![],
            all: Box::new(flows[1..].iter()),
        };
        l.update_from(3 * SEC, counting, &HashSet::new(), &none, &media);
        assert_eq!(live(&l, &media)[1], ("media".to_string(), 4, 0, 0));
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
