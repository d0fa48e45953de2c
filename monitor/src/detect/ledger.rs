//! The session ledger: per service (and its processes) how many sessions opened, closed, are
//! live and leaked, against what limit, and when the trend reaches it (`session-budget`).
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use monitor_common::tcp_state;

use super::leaks::service_of;
use crate::config::{LedgerSection, ServiceConfig};
use crate::findings::{Family, Key, Scope, Verdict};
use crate::kernel::procfs::nofile;
use crate::model::finding::{Details, FindingKind, Severity, Subject};
use crate::model::flow::{Flow, Tally};
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
    /// The service of each (owner address, port key) looked up in this count (owners are
    /// shared `Arc`s, one per process; the port key is the local port only where a configured
    /// service names it, else 0: one entry per process, not per ephemeral port).
    round_owner: HashMap<(usize, u16), u32>,
    /// The services the lookups are made with, and the ports they name.
    services: Vec<ServiceConfig>,
    ports: Vec<u16>,
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

    /// Starts a count with the configured services. True when they changed since the last
    /// count (a reload): every flow must then be accounted again, its service looked up anew.
    pub fn begin(&mut self, services: &[ServiceConfig]) -> bool {
        // `finish` clears it too; a count left unfinished must not leave lookups keyed by the
        // address of an owner since freed.
        self.round_owner.clear();
        if self.services == services {
            return false;
        }
        self.services = services.to_vec();
        self.ports = services.iter().filter_map(|s| s.port).collect();
        true
    }

    /// Accounts one flow as it is now and returns its new tally (the caller keeps it on the
    /// flow): opened when first counted, moved between services or processes when its owner or
    /// service changed, closed when it is no longer a counted session (a listener, no owner).
    pub fn account(&mut self, f: &Flow) -> Tally {
        let now = if f.state == tcp_state::LISTEN {
            None
        } else {
            self.service(f)
        };
        match (f.tally.get(), now) {
            (Some((opened_as, svc, pid)), Some((id, opid))) => {
                if (svc, pid) != (id, opid) {
                    self.count(svc, pid, 1, false);
                    self.count(id, opid, 1, true);
                }
                Tally::counted(opened_as, id, opid)
            }
            (Some(_), None) => {
                self.closed(&[(f.tally, 1)]);
                Tally::NONE
            }
            (None, Some((id, pid))) => {
                self.count(id, pid, 1, true);
                if let Some(name) = self.names.get(id as usize) {
                    self.acc.entry(name.clone()).or_default().opened += 1;
                }
                Tally::counted(id, id, pid)
            }
            (None, None) => Tally::NONE,
        }
    }

    /// The service id and pid a flow counts under now (None: no owner yet).
    fn service(&mut self, f: &Flow) -> Option<(u32, u32)> {
        let owner = f.owner.as_ref()?;
        let port = f.local().port();
        let key = (
            Arc::as_ptr(owner) as usize,
            if self.ports.contains(&port) { port } else { 0 },
        );
        let svc = match self.round_owner.get(&key) {
            Some(id) => *id,
            None => {
                let name = service_of(f, &self.services)?;
                let id = self.intern(name);
                self.round_owner.insert(key, id);
                id
            }
        };
        Some((svc, owner.pid))
    }

    /// Counts closed sessions: `n` flows of each tally (their close is counted under the
    /// service they were opened as).
    pub fn closed(&mut self, gone: &[(Tally, u64)]) {
        for (t, n) in gone {
            let Some((opened_as, svc, pid)) = t.get() else {
                continue;
            };
            self.count(svc, pid, *n, false);
            if let Some(name) = self.names.get(opened_as as usize) {
                self.acc.entry(name.clone()).or_default().closed += n;
            }
        }
    }

    /// Ends a count: `leaked` gives the service of each leaked flow (its tally's), `held` the
    /// descriptors each service holds to dead sockets (sessions it still pays for).
    pub fn finish(
        &mut self,
        now: Nanos,
        leaked: impl IntoIterator<Item = u32>,
        held: &HashMap<String, (u64, Vec<u32>)>,
    ) {
        // Addresses name owners only while their flows hold them: this count's lookups end here.
        self.round_owner.clear();
        if self.round_owner.capacity() > 1024 {
            self.round_owner = HashMap::new();
        }
        for a in self.acc.values_mut() {
            a.live = 0;
            a.leaked = 0;
            a.held = 0;
            a.pids.clear();
        }
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
        for svc in leaked {
            if let Some(n) = leaked_by.get_mut(svc as usize) {
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

    /// `k` live flows more (`up`) or fewer for a service and process.
    fn count(&mut self, svc: u32, pid: u32, k: u64, up: bool) {
        let i = svc as usize;
        if self.live_by.len() <= i {
            self.live_by.resize(i + 1, 0);
        }
        let n = self.pids_by.entry((svc, pid)).or_default();
        let k32 = u32::try_from(k).unwrap_or(u32::MAX);
        if up {
            self.live_by[i] += k;
            *n = n.saturating_add(k32);
        } else {
            self.live_by[i] = self.live_by[i].saturating_sub(k);
            *n = n.saturating_sub(k32);
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
    use std::collections::HashSet;

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
        f.set_inode(cookie);
        f.owner = Some(std::sync::Arc::new(Owner {
            pid: 4_194_305,
            comm: "bridge".into(),
            cgroup: None,
            unit: None,
        }));
        f
    }

    /// The flow table as the ledger sees it: flows with their tallies, and the tallies of
    /// those closed since the last count.
    #[derive(Clone, Default)]
    struct Table {
        flows: BTreeMap<u64, Flow>,
        gone: Vec<(Tally, u64)>,
    }

    impl Table {
        fn of(flows: impl IntoIterator<Item = Flow>) -> Self {
            Table {
                flows: flows.into_iter().map(|f| (f.cookie, f)).collect(),
                gone: vec![],
            }
        }

        fn close(&mut self, cookie: u64) {
            if let Some(f) = self.flows.remove(&cookie)
                && f.tally.get().is_some()
            {
                self.gone.push((f.tally, 1));
            }
        }

        /// One count, as the agent makes it: the flows in `changed` (None: every flow).
        fn count(
            &mut self,
            l: &mut Ledger,
            now: Nanos,
            changed: Option<&[u64]>,
            leaked: &HashSet<u64>,
            held: &HashMap<String, (u64, Vec<u32>)>,
            svc: &[ServiceConfig],
        ) {
            let all = l.begin(svc) || changed.is_none();
            for f in self.flows.values_mut() {
                if all || changed.is_some_and(|c| c.contains(&f.cookie)) {
                    f.tally = l.account(f);
                }
            }
            l.closed(&std::mem::take(&mut self.gone));
            let flows = &self.flows;
            l.finish(
                now,
                leaked
                    .iter()
                    .filter_map(|c| flows.get(c).and_then(|f| f.tally.svc())),
                held,
            );
        }
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
        let mut t_full = Table::of((0..20).map(|c| flow(c, 1)));
        let mut t_inc = t_full.clone();
        let mut changed: Vec<u64> = t_inc.flows.keys().copied().collect();
        for step in 0..6u64 {
            let leaked: HashSet<u64> = [1, 2, 3].into();
            t_full.count(&mut full, step * SEC, None, &leaked, &none, &svc);
            t_inc.count(&mut inc, step * SEC, Some(&changed), &leaked, &none, &svc);
            let rows = |l: &Ledger| {
                l.rows(&svc)
                    .into_iter()
                    .map(|r| (r.service, r.opened, r.closed, r.live, r.leaked, r.pids))
                    .collect::<Vec<_>>()
            };
            assert_eq!(rows(&full), rows(&inc), "step {step}");
            if step == 0 {
                assert_eq!(rows(&inc)[0].4, 3, "flows 1, 2 and 3 are leaked bridge sessions");
            }
            // Next: two close, two open, one changes owner (another service and process).
            changed = vec![100 + step * 2, 100 + step * 2 + 1, 10 + step];
            for t in [&mut t_full, &mut t_inc] {
                t.close(step * 2);
                t.close(step * 2 + 1);
                for c in [100 + step * 2, 100 + step * 2 + 1] {
                    t.flows.insert(c, flow(c, 1));
                }
                if let Some(f) = t.flows.get_mut(&(10 + step)) {
                    f.owner = Some(other.clone());
                }
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
        let mut t = Table::of((0..5).map(|c| flow(c, 1)));
        t.count(
            &mut l,
            SEC,
            Some(&[0, 1, 2, 3, 4]),
            &HashSet::new(),
            &none,
            &bridge,
        );
        let live = |l: &Ledger, svc: &[ServiceConfig]| {
            l.rows(svc)
                .into_iter()
                .map(|r| (r.service, r.live, r.opened, r.closed))
                .collect::<Vec<_>>()
        };
        assert_eq!(live(&l, &bridge), vec![("bridge".to_string(), 5, 5, 0)]);
        // A reload renames the service: the flows move, counted as opened under bridge (their
        // closes are counted there), live under media; nothing else changed about them.
        t.close(0);
        t.count(&mut l, 2 * SEC, Some(&[]), &HashSet::new(), &none, &media);
        assert_eq!(
            live(&l, &media),
            vec![("bridge".to_string(), 0, 5, 1), ("media".to_string(), 4, 0, 0)]
        );
        // And the next count, with nothing changed, keeps them there; a close is counted
        // under the service the flow was opened as.
        t.close(1);
        t.count(&mut l, 3 * SEC, Some(&[]), &HashSet::new(), &none, &media);
        assert_eq!(
            live(&l, &media),
            vec![("bridge".to_string(), 0, 5, 2), ("media".to_string(), 3, 0, 0)]
        );
    }

    #[test]
    fn a_flow_that_stops_being_a_session_is_counted_closed() {
        let svc = vec![ServiceConfig {
            name: "bridge".into(),
            comm: Some("bridge".into()),
            ..Default::default()
        }];
        let none = HashMap::new();
        let mut l = Ledger::default();
        let mut t = Table::of([flow(1, 1), flow(2, 1)]);
        t.count(&mut l, SEC, None, &HashSet::new(), &none, &svc);
        // Its owner is no longer known: no longer counted, once.
        t.flows.get_mut(&2).unwrap().owner = None;
        for k in 2..4 {
            t.count(&mut l, k * SEC, Some(&[2]), &HashSet::new(), &none, &svc);
        }
        let r = &l.rows(&svc)[0];
        assert_eq!((r.opened, r.closed, r.live), (2, 1, 1));
        assert_eq!(t.flows[&2].tally, Tally::NONE);
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
        let mut t = Table::default();
        let none = HashMap::new();
        // One leaked session every 10 s.
        for i in 0..8u64 {
            t.flows.insert(i, flow(i, tcp_state::CLOSE_WAIT));
            let leaked: HashSet<u64> = t.flows.keys().copied().collect();
            t.count(&mut l, i * 10 * SEC, Some(&[i]), &leaked, &none, &svc);
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
        for c in 0..6 {
            t.close(c);
        }
        for k in 0..200u64 {
            t.count(
                &mut l,
                (80 + k * 2) * SEC,
                Some(&[]),
                &HashSet::new(),
                &none,
                &svc,
            );
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
        Table::default().count(&mut l, SEC, None, &HashSet::new(), &held, &svc);
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
