//! One evaluation round of each kind: detectors judge the tracked state, the finding store
//! reconciles their verdicts, remedies act on what is open. Each round returns the changes to
//! announce (the caller hands them to the sinks) and any work for the snapshot thread.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use super::state::{NetnsInfo, State};
use crate::detect::{self, Env};
use crate::findings::{Change, Family, Scope};
use crate::kernel::routes::Router;
use crate::model::eviction::{KaRequest, NetFacts, RoutePath};
use crate::model::finding::FindingKind;
use crate::model::observe::NetnsId;
use crate::model::time::Nanos;
use crate::remedy::close::{Closer, Holders};
use crate::remedy::keepalive::request;
use crate::remedy::sigchld::Nudger;
use crate::track::paths::PathKey;
use crate::track::zombies::ProcView;

/// The host as the detectors see it: routes, names and sysctls per namespace.
pub struct AgentEnv<'a> {
    pub router: &'a mut Router,
    pub netns: &'a BTreeMap<NetnsId, NetnsInfo>,
    /// Timeouts learnt per path (State::learned).
    pub learned: &'a HashMap<PathKey, (u64, String)>,
}

/// The path key of a flow from `netns` via `gateway` to `dst`.
fn path_key(netns: &BTreeMap<NetnsId, NetnsInfo>, id: NetnsId, gateway: &str, dst: IpAddr) -> PathKey {
    PathKey {
        netns: super::state::netns_name(netns, id).unwrap_or_else(|| format!("net:[{id}]")),
        gateway: gateway.to_string(),
        prefix: crate::track::paths::prefix_of(dst),
    }
}

impl Env for AgentEnv<'_> {
    fn route(&mut self, netns: NetnsId, dst: IpAddr) -> RoutePath {
        let own = crate::kernel::netns::own_id();
        match self.netns.get(&netns).or_else(|| self.netns.get(&own)) {
            Some(n) => self.router.path(&n.handle, dst),
            None => RoutePath::Unknown,
        }
    }
    fn facts(&self, netns: NetnsId) -> NetFacts {
        self.netns
            .get(&netns)
            .or_else(|| self.netns.get(&crate::kernel::netns::own_id()))
            .map_or_else(NetFacts::default, |n| n.facts)
    }
    fn netns_name(&self, netns: NetnsId) -> Option<String> {
        super::state::netns_name(self.netns, netns)
    }
    fn learned(&self, netns: NetnsId, gateway: &str, dst: IpAddr) -> Option<(u64, String)> {
        if self.learned.is_empty() {
            return None;
        }
        self.learned
            .get(&path_key(self.netns, netns, gateway, dst))
            .cloned()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Path learning: breaks from the eviction pass (upper bounds) and survivals the flow table saw
/// (lower bounds), recorded per path (namespace, gateway, destination prefix).
fn learn_paths(st: &mut State, breaks: &[(u64, NetnsId, String, IpAddr, u64)]) {
    let survivals = st.table.take_survivals();
    if !st.policy.learning.enabled {
        return;
    }
    let t = unix_now();
    for (cookie, id, gw, dst, idle) in breaks {
        // A socket holdfast aborted itself (the close remedy) teaches nothing about the path.
        if st.remedies.close.did_close(*cookie) {
            continue;
        }
        let key = path_key(&st.netns, *id, gw, *dst);
        tracing::info!(path = %key, cookie, idle_ms = idle, "a flow through a gateway broke after idling: evidence for the path's timeout");
        st.paths.broke(key, *idle, t);
    }
    for (cookie, idle) in survivals {
        let Some(f) = st.table.get(cookie) else { continue };
        let (id, dst) = (f.netns, f.remote().ip());
        let info = st
            .netns
            .get(&id)
            .or_else(|| st.netns.get(&crate::kernel::netns::own_id()));
        let Some(info) = info else { continue };
        if let RoutePath::Gateway(gw) = st.router.path(&info.handle, dst) {
            let key = path_key(&st.netns, id, &gw, dst);
            st.paths.survived(key, idle, t);
        }
    }
}

/// Zombies: judge every parent, settle the nudges of parents whose zombies are gone, reconcile,
/// then nudge where it can help.
pub fn zombies(now: Nanos, st: &mut State, view: &dyn ProcView, nudger: &mut dyn Nudger) -> Vec<Change> {
    let sig = &st.remedies.sigchld;
    let pass = st
        .detect
        .zombies
        .evaluate(now, &mut st.zombies, st.policy.zombies.min_age, view, &|p| {
            sig.nudges(p)
        });
    let gone: Vec<(u32, Option<u64>)> = pass
        .gone
        .iter()
        .map(|p| (*p, st.store.id_of(&detect::zombies::key(*p))))
        .collect();
    let mut out = st.remedies.sigchld.settle_gone(&gone, &mut st.store);
    let sig = &st.remedies.sigchld;
    out.extend(st.store.reconcile(Family::Zombie, pass.verdicts, now, |k, f| {
        let (pid, comm) = match (&k.scope, f.process()) {
            (Scope::Pid(p), Some(pr)) => (*p, pr.comm),
            (Scope::Pid(p), None) => (*p, "?".into()),
            _ => (0, "?".into()),
        };
        sig.resolution(pid, &comm)
    }));
    for p in &pass.gone {
        st.remedies.sigchld.forget(*p);
    }
    for case in &pass.cases {
        if let Some(c) = st.remedies.sigchld.step(
            now,
            case,
            st.policy.zombies.sigchld,
            view,
            nudger,
            &mut st.zombies,
            &mut st.store,
        ) {
            out.push(c);
        }
    }
    out
}

/// Flows: eviction forecasts and post-mortems, keepalive where it helps, half-open and stuck
/// closing states, the close remedy and its release check. Returns the changes and the keepalive
/// work for the snapshot thread.
pub fn flows(
    now: Nanos,
    st: &mut State,
    closer: &mut dyn Closer,
    holders: &mut dyn Holders,
) -> (Vec<Change>, Vec<KaRequest>) {
    let closed = st.table.take_closed(now);
    let mut out = Vec::new();
    let mut requests = Vec::new();
    // The flows changed or due, and those the keepalive remedy follows: not every flow.
    let mut judge = st.table.to_judge(now);
    judge.extend(st.remedies.keepalive.watched());
    judge.sort_unstable();
    judge.dedup();
    st.stats.rounds.judged += judge.len() as u64;
    let ka = &st.remedies.keepalive;
    let mut env = AgentEnv {
        router: &mut st.router,
        netns: &st.netns,
        learned: &st.learned,
    };
    let table = &st.table;
    let pass = st.detect.eviction.evaluate(
        now,
        judge.iter().filter_map(|c| table.get(*c)),
        &closed,
        &st.policy.eviction,
        &mut env,
        &|c| ka.watches(c),
    );
    st.table.set_quiet(&pass.quiet);
    learn_paths(st, &pass.breaks);
    for c in &pass.reads {
        if let Some(f) = st.table.get(*c) {
            requests.push(request(f, None));
        }
    }
    // Verification first: a verified remedy names the resolution of its finding.
    for c in st.remedies.keepalive.watched() {
        if let Some(f) = st.table.get(c) {
            let a = pass
                .remediable
                .iter()
                .find(|(k, _)| k.scope == Scope::Flow(c))
                .map(|(_, a)| a);
            if let Some(ch) = st.remedies.keepalive.verify(now, f, a, &mut st.store) {
                out.push(ch);
            }
        }
    }
    // A flow the keepalive remedy acted on that ended: its action says whether it ever worked.
    for (f, _) in &closed {
        if let Some(cause) = pass.closed.get(&f.cookie)
            && let Some(ch) = st.remedies.keepalive.on_closed(f, cause, &mut st.store)
        {
            out.push(ch);
        }
    }
    let ka = &st.remedies.keepalive;
    let dead = &pass.closed;
    out.extend(st.store.reconcile_until(Family::Eviction, pass.verdicts, now, |k, _| {
        let Scope::Flow(c) = k.scope else {
            return Some("no longer at risk".into());
        };
        Some(match (dead.get(&c), ka.resolution(c)) {
            (Some(cause), Some(_)) if ka.awaiting_answer(c) => format!(
                "the connection ended ({cause}) after keepalive was applied, before any probe was answered: unresolved"
            ),
            (Some(cause), Some(_)) => {
                format!("the connection ended ({cause}) after keepalive was applied")
            }
            (Some(cause), None) => format!("the connection ended ({cause}) while this finding was open"),
            // Probes are watched: open until one is answered (see KeepaliveRemedy::verify).
            (None, Some(_)) if ka.awaiting_answer(c) => return None,
            (None, Some(r)) => r,
            (None, None) => "the flow is no longer at risk (activity or keepalive)".into(),
        })
    }));
    for v in pass.postmortems {
        let (id, t) = st.store.upsert(v, now);
        if let Some(t) = t {
            out.push((id, t));
        }
    }
    for key in &pass.expired {
        if let Some(c) = st
            .store
            .resolve(key, "post-mortem kept for an hour; expired".into(), now)
        {
            out.push(c);
        }
    }
    let k = st.policy.eviction.keepalive.clone();
    for (key, a) in &pass.remediable {
        let Scope::Flow(c) = key.scope else { continue };
        let Some(f) = st.table.get(c) else { continue };
        let (ch, req) = st.remedies.keepalive.consider(now, key, a, f, &k, &mut st.store);
        out.extend(ch);
        requests.extend(req);
    }
    // Leaks.
    let env = AgentEnv {
        router: &mut st.router,
        netns: &st.netns,
        learned: &st.learned,
    };
    let lp = detect::leaks::evaluate(now, st.table.notable(), &st.policy.leaks, &env);
    let ho_closed: HashSet<u64> = closed.iter().map(|(f, _)| f.cookie).collect();
    let close = &st.remedies.close;
    out.extend(
        st.store
            .reconcile(Family::HalfOpen, lp.half_open, now, |k, _| match k.scope {
                Scope::Flow(c) if close.unreleased(c).is_some() || ho_closed.contains(&c) => {
                    "the socket closed".into()
                }
                _ => "the peer answered again or the socket closed".into(),
            }),
    );
    out.extend(st.store.reconcile(Family::Stuck, lp.stuck, now, |_, _| {
        "no stuck sockets left".into()
    }));
    let table = &st.table;
    let lookup = |c: u64| table.get(c).cloned();
    out.extend(st.remedies.close.consider(
        now,
        &lp.candidates,
        &lookup,
        &st.policy.leaks,
        &st.policy.services,
        closer,
        &mut st.store,
    ));
    out.extend(st.remedies.close.verify(now, holders, &mut st.store));
    for (f, _) in &closed {
        st.remedies.keepalive.forget(f.cookie);
        st.remedies.close.forget(f.cookie);
        st.watch.forget(f.cookie);
    }
    (out, requests)
}

/// Descriptors held to dead sockets (`dead-socket-held`), then the session ledger: counts per
/// service (live, leaked, held), then `session-budget`.
pub fn ledger(now: Nanos, st: &mut State) -> Vec<Change> {
    // Closes the owner did not release: released since? (one /proc/PID/fd read per such owner)
    st.remedies.close.settle(&mut |pid| {
        crate::kernel::procfs::alive(pid).then(|| {
            crate::kernel::procfs::socket_fds(pid)
                .into_iter()
                .map(|(_, i)| i)
                .collect()
        })
    });
    let by_pid = st.held.by_pid(now);
    // What each service's processes hold dead: sessions it still pays for.
    let mut held: HashMap<String, (u64, Vec<u32>)> = HashMap::new();
    for (pid, h) in &by_pid {
        let Some(o) = &h.owner else { continue };
        let svc = detect::leaks::service_of_owner(o, None, &st.policy.services);
        let e = held.entry(svc).or_default();
        e.0 += h.sockets.len() as u64;
        e.1.push(*pid);
    }
    // Aborted sockets whose owner has not been seen letting go: until the held check says,
    // the slot is taken (no "back within budget" in the moment between a close and that check).
    for (svc, pid, inode) in st.remedies.close.not_yet_released() {
        if !st.held.holds(pid, inode) {
            let e = held.entry(svc.to_string()).or_default();
            e.0 += 1;
            if !e.1.contains(&pid) {
                e.1.push(pid);
            }
        }
    }
    let netns = |pid: u32| {
        let id = crate::kernel::netns::inode_of(std::path::Path::new(&format!("/proc/{pid}/ns/net")))?;
        super::state::netns_name(&st.netns, id)
    };
    let verdicts = detect::held::evaluate(&by_pid, st.policy.leaks.held_after.as_millis() as u64, &netns);
    let mut out = st.store.reconcile(Family::Held, verdicts, now, |_, _| {
        "the descriptors were closed".into()
    });
    let leaked = detect::leaks::leaked(st.table.notable(), now, &st.policy.leaks);
    // What changed since the last count (flows opened, closed, given an owner), not every
    // flow; every flow when the services changed or too much changed to list.
    let changed = st.table.take_ledger_changes();
    let gone = st.table.take_ledger_gone();
    let ledger = &mut st.detect.ledger;
    let relookup = ledger.begin(&st.policy.services);
    let cookies = changed.as_deref().filter(|_| !relookup);
    st.table.retally(cookies, |f| ledger.account(f));
    ledger.closed(&gone);
    let table = &st.table;
    ledger.finish(
        now,
        leaked
            .iter()
            .filter_map(|c| table.get(*c).and_then(|f| f.tally.svc())),
        &held,
    );
    st.leaked = leaked;
    let verdicts = st.detect.ledger.evaluate(&st.policy.services, &st.policy.ledger);
    out.extend(
        st.store
            .reconcile(Family::Budget, verdicts, now, |_, _| "back within budget".into()),
    );
    out
}

/// Poll mode: the processes whose descriptors are checked for dead sockets: those of the
/// ledger's services, those with leak or dead-socket findings, and owners of closed sockets.
pub fn held_watch(st: &State) -> Vec<u32> {
    let mut pids: Vec<u32> = st
        .store
        .active()
        .filter(|f| matches!(f.kind, FindingKind::CloseWaitLeak | FindingKind::DeadSocketHeld))
        .filter_map(|f| f.subject.process().map(|p| p.pid))
        .collect();
    for r in st.detect.ledger.rows(&st.policy.services) {
        if st.policy.services.iter().any(|s| s.name == r.service) {
            pids.extend(r.pids);
        }
    }
    pids.extend(st.remedies.close.owners());
    pids.sort_unstable();
    pids.dedup();
    pids.truncate(HELD_WATCH_MAX);
    pids
}

/// Processes whose descriptors poll mode checks at most (each costs a /proc/PID/fd walk).
const HELD_WATCH_MAX: usize = 64;

#[cfg(test)]
mod tests;
