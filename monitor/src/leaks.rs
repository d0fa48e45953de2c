//! Dead and leaked sessions: `half-open` flows (the peer stopped answering) and sockets stuck in
//! CLOSE_WAIT / FIN_WAIT2 / LAST_ACK (`close-wait-leak`, one finding per owning process), and the
//! opt-in `close` remedy that aborts only sockets proven dead.
//!
//! Pure: the detector takes the clock, the flows and a `Closer`, so unit tests use fakes.
use std::collections::{BTreeMap, HashMap, HashSet};

use monitor_common::tcp_state;
use serde::Serialize;
use serde_json::json;

use crate::config::{LeaksSection, RemedyMode, ServiceConfig};
use crate::findings::{ActionRecord, FindingStore, Severity, Transition, ms};
use crate::flows::Flow;
use crate::human::fmt_ms;
use crate::observe::{Nanos, Timer, state_name};

/// Closes per minute, across all processes.
const CLOSES_PER_MINUTE: usize = 600;
/// Sockets listed in a finding's details.
const LIST: usize = 50;

/// Aborts one socket (SOCK_DESTROY over sock_diag in the agent).
pub trait Closer {
    fn close(&mut self, f: &Flow) -> Result<&'static str, String>;
}

/// Why a flow is believed dead.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evidence {
    pub silence_ms: u64,
    pub unanswered_probes: u8,
    pub retransmits: u8,
    pub unacked: u32,
    pub zero_window_probing: bool,
    pub keepalive_probing: bool,
    pub reasons: Vec<String>,
}

/// The half-open evidence of `f` at `now`, if it meets the thresholds.
pub fn half_open(f: &Flow, now: Nanos, cfg: &LeaksSection) -> Option<Evidence> {
    if f.state != tcp_state::ESTABLISHED {
        return None;
    }
    let t = f.tcp.as_ref()?;
    let (_, _, silence_ms) = f.ages_ms(now)?;
    if silence_ms < cfg.half_open_silence.as_millis() as u64 {
        return None;
    }
    let mut reasons = Vec::new();
    let keepalive_probing = t.timer == Timer::Keepalive && t.probes >= cfg.half_open_probes;
    if keepalive_probing {
        reasons.push(format!("{} keepalive probes unanswered", t.probes));
    }
    let zero_window_probing = t.timer == Timer::ZeroWindowProbe && t.probes >= cfg.half_open_probes;
    if zero_window_probing {
        reasons.push(format!("{} zero-window probes unanswered", t.probes));
    }
    if t.unacked > 0 && (t.retransmits >= cfg.half_open_retransmits || t.backoff >= cfg.half_open_retransmits)
    {
        reasons.push(format!(
            "{} segments unacknowledged after {} retransmits (backoff {})",
            t.unacked, t.retransmits, t.backoff
        ));
    }
    if reasons.is_empty() {
        return None;
    }
    reasons.push(format!("no ACK for {}", fmt_ms(silence_ms)));
    Some(Evidence {
        silence_ms,
        unanswered_probes: t.probes,
        retransmits: t.retransmits,
        unacked: t.unacked,
        zero_window_probing,
        keepalive_probing,
        reasons,
    })
}

/// How long `f` has been in its state (since first seen if it entered it before holdfast).
fn state_age_ms(f: &Flow, now: Nanos) -> u64 {
    ms(now.saturating_sub(f.state_since.unwrap_or(f.first_seen)))
}

/// The threshold for a stuck closing state, if `state` is one.
fn stuck_after(state: u8, cfg: &LeaksSection) -> Option<u64> {
    match state {
        tcp_state::CLOSE_WAIT => Some(cfg.close_wait_after.as_millis() as u64),
        tcp_state::FIN_WAIT2 => Some(cfg.fin_wait2_after.as_millis() as u64),
        tcp_state::LAST_ACK => Some(cfg.last_ack_after.as_millis() as u64),
        _ => None,
    }
}

/// The service a flow belongs to: the first matching [[services]] entry, else its unit,
/// cgroup or command.
pub fn service_of(f: &Flow, services: &[ServiceConfig]) -> Option<String> {
    let o = f.owner.as_ref()?;
    for s in services {
        let ok = s.comm.as_ref().is_none_or(|c| &o.comm == c)
            && s.unit.as_ref().is_none_or(|u| o.unit.as_ref() == Some(u))
            && s.cgroup
                .as_ref()
                .is_none_or(|c| o.cgroup.as_ref().is_some_and(|g| g.starts_with(c.as_str())))
            && s.port.is_none_or(|p| f.local.port() == p);
        if ok {
            return Some(s.name.clone());
        }
    }
    Some(
        o.unit
            .clone()
            .or_else(|| o.cgroup.clone().filter(|c| c != "/"))
            .unwrap_or_else(|| o.comm.clone()),
    )
}

fn close_mode(f: &Flow, cfg: &LeaksSection, services: &[ServiceConfig]) -> RemedyMode {
    let name = service_of(f, services);
    services
        .iter()
        .find(|s| Some(&s.name) == name.as_ref())
        .and_then(|s| s.close)
        .unwrap_or(cfg.close)
}

/// One stuck socket as listed in a close-wait-leak finding.
#[derive(Clone, Debug, Serialize)]
struct Stuck {
    cookie: u64,
    local: String,
    remote: String,
    state: &'static str,
    age_ms: u64,
}

#[derive(Default)]
pub struct LeakDetector {
    half_open: HashMap<u64, u64>,
    /// Owner pid -> finding.
    stuck: HashMap<u32, u64>,
    closed: HashSet<u64>,
    planned: HashSet<u64>,
    close_times: Vec<Nanos>,
}

impl LeakDetector {
    /// Cookies currently counted as leaked (half-open or stuck past their threshold).
    pub fn leaked<'a>(
        &self,
        flows: impl Iterator<Item = &'a Flow>,
        now: Nanos,
        cfg: &LeaksSection,
    ) -> HashSet<u64> {
        flows
            .filter(|f| {
                half_open(f, now, cfg).is_some()
                    || stuck_after(f.state, cfg).is_some_and(|t| state_age_ms(f, now) >= t)
            })
            .map(|f| f.cookie)
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn evaluate<'a>(
        &mut self,
        now: Nanos,
        flows: impl Iterator<Item = &'a Flow> + Clone,
        cfg: &LeaksSection,
        services: &[ServiceConfig],
        closer: &mut dyn Closer,
        store: &mut FindingStore,
    ) -> Vec<(u64, Transition)> {
        let mut out = Vec::new();
        let mut close_candidates: Vec<(&Flow, u64, serde_json::Value)> = Vec::new();
        // half-open, per flow.
        let mut live_half = HashSet::new();
        for f in flows.clone() {
            let Some(ev) = half_open(f, now, cfg) else {
                continue;
            };
            live_half.insert(f.cookie);
            let subject = format!(
                "flow {} → {}{}",
                f.local,
                f.remote,
                f.owner
                    .as_ref()
                    .map(|o| format!(" pid {} ({})", o.pid, o.comm))
                    .unwrap_or_default()
            );
            let summary = format!("the peer stopped answering: {}", ev.reasons.join(", "));
            let details = json!({ "cookie": f.cookie, "evidence": ev });
            let id = match self.half_open.get(&f.cookie) {
                Some(id) => {
                    if let Some(x) = store.get_mut(*id) {
                        x.summary = summary;
                        x.details = details.clone();
                        x.updated_ms = ms(now);
                    }
                    *id
                }
                None => {
                    let id = store.open(
                        "half-open",
                        Severity::Warning,
                        subject,
                        summary,
                        details.clone(),
                        now,
                    );
                    self.half_open.insert(f.cookie, id);
                    out.push((id, Transition::New));
                    id
                }
            };
            close_candidates.push((f, id, details));
        }
        for (cookie, id) in self.half_open.clone() {
            if !live_half.contains(&cookie) {
                self.half_open.remove(&cookie);
                let why = if self.closed.contains(&cookie) {
                    "closed by holdfast"
                } else {
                    "the peer answered again or the socket closed"
                };
                let summary = store
                    .get(id)
                    .map(|x| format!("{} — resolved: {why}", x.summary))
                    .unwrap_or_default();
                store.resolve(id, summary, now);
                out.push((id, Transition::Resolved));
            }
        }
        // Stuck closing states, one finding per owning process.
        let mut by_pid: BTreeMap<u32, (String, Vec<&Flow>)> = BTreeMap::new();
        for f in flows.clone() {
            let Some(t) = stuck_after(f.state, cfg) else {
                continue;
            };
            if state_age_ms(f, now) < t {
                continue;
            }
            let (pid, comm) = f
                .owner
                .as_ref()
                .map(|o| (o.pid, o.comm.clone()))
                .unwrap_or((0, "(no owner: orphaned)".into()));
            by_pid.entry(pid).or_insert_with(|| (comm, Vec::new())).1.push(f);
        }
        for (pid, (comm, socks)) in &by_pid {
            let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
            for f in socks {
                *counts.entry(state_name(f.state)).or_default() += 1;
            }
            let oldest = socks.iter().map(|f| state_age_ms(f, now)).max().unwrap_or(0);
            let mut list: Vec<Stuck> = socks
                .iter()
                .map(|f| Stuck {
                    cookie: f.cookie,
                    local: f.local.to_string(),
                    remote: f.remote.to_string(),
                    state: state_name(f.state),
                    age_ms: state_age_ms(f, now),
                })
                .collect();
            list.sort_by(|a, b| b.age_ms.cmp(&a.age_ms));
            let summary = format!(
                "pid {pid} ({comm}) holds {} socket(s) the peer has closed or that never finished closing ({}), oldest {}: the program does not close them",
                socks.len(),
                counts
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                fmt_ms(oldest)
            );
            let details = json!({ "pid": pid, "comm": comm, "count": socks.len(), "by_state": counts, "oldest_ms": oldest, "sockets": list.iter().take(LIST).collect::<Vec<_>>() });
            let id = match self.stuck.get(pid) {
                Some(id) => {
                    if let Some(x) = store.get_mut(*id) {
                        x.summary = summary;
                        x.details = details;
                        x.updated_ms = ms(now);
                    }
                    *id
                }
                None => {
                    let id = store.open(
                        "close-wait-leak",
                        Severity::Warning,
                        format!("pid {pid} ({comm})"),
                        summary,
                        details,
                        now,
                    );
                    self.stuck.insert(*pid, id);
                    out.push((id, Transition::New));
                    id
                }
            };
            for f in socks {
                let ev = json!({ "state": state_name(f.state), "age_ms": state_age_ms(f, now), "cookie": f.cookie });
                close_candidates.push((f, id, ev));
            }
        }
        for (pid, id) in self.stuck.clone() {
            if !by_pid.contains_key(&pid) {
                self.stuck.remove(&pid);
                let summary = store
                    .get(id)
                    .map(|x| format!("{} — resolved: no stuck sockets left", x.summary))
                    .unwrap_or_default();
                store.resolve(id, summary, now);
                out.push((id, Transition::Resolved));
            }
        }
        // The close remedy: only proven-dead sockets that carried no data recently.
        self.close_times
            .retain(|t| now.saturating_sub(*t) < 60_000_000_000);
        for (f, finding, evidence) in close_candidates {
            let mode = close_mode(f, cfg, services);
            if mode == RemedyMode::Off || self.closed.contains(&f.cookie) {
                continue;
            }
            let v = f.view(now);
            let quiet = v
                .last_data_sent_ms
                .unwrap_or(u64::MAX)
                .min(v.last_data_recv_ms.unwrap_or(u64::MAX));
            if quiet < cfg.quiet_for.as_millis() as u64 {
                continue;
            }
            let mut action = ActionRecord {
                at_ms: ms(now),
                action: "close".into(),
                mode: if mode == RemedyMode::DryRun {
                    "dry-run"
                } else {
                    "enforce"
                }
                .into(),
                outcome: String::new(),
                before: json!({ "cookie": f.cookie, "local": f.local.to_string(), "remote": f.remote.to_string(), "evidence": evidence, "quiet_ms": quiet }),
                after: serde_json::Value::Null,
            };
            if mode == RemedyMode::DryRun {
                if !self.planned.insert(f.cookie) {
                    continue;
                }
                action.outcome = format!(
                    "planned: abort {} → {} (dry-run, socket untouched)",
                    f.local, f.remote
                );
            } else {
                if self.close_times.len() >= CLOSES_PER_MINUTE {
                    continue;
                }
                self.closed.insert(f.cookie);
                self.close_times.push(now);
                match closer.close(f) {
                    Ok(via) => {
                        action.outcome =
                            format!("closed via {via}: the owner sees ECONNABORTED and can free the slot");
                        action.after = json!({ "state": "CLOSE" });
                    }
                    Err(e) => action.outcome = format!("failed: {e}; not retried"),
                }
            }
            if let Some(x) = store.get_mut(finding) {
                x.actions.push(action);
            }
            out.push((finding, Transition::Action));
        }
        out
    }

    /// Forgets closed cookies.
    pub fn forget(&mut self, cookies: impl Iterator<Item = u64>) {
        for c in cookies {
            self.planned.remove(&c);
            self.closed.remove(&c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{Owner, TcpSample};
    use std::time::Duration;

    const S: Nanos = 1_000_000_000;

    fn flow(cookie: u64, state: u8, since: Nanos, t: TcpSample) -> Flow {
        Flow {
            cookie,
            local: "10.0.0.1:7000".parse().unwrap(),
            remote: format!("10.0.0.2:{}", 40000 + cookie).parse().unwrap(),
            state,
            state_since: Some(since),
            first_seen: 0,
            last_seen: 0,
            inode: cookie,
            uid: 0,
            owner: Some(std::sync::Arc::new(Owner {
                pid: 50,
                comm: "bridge".into(),
                cgroup: None,
                unit: None,
            })),
            pid_hint: None,
            tcp: Some(t),
            tcp_at: 100 * S,
            resets_recv: 0,
            resets_sent: 0,
            retransmit_events: 0,
            last_error: None,
        }
    }

    fn quiet(ms: u32) -> TcpSample {
        TcpSample {
            last_data_sent_ms: ms,
            last_data_recv_ms: ms,
            last_ack_recv_ms: ms,
            ..Default::default()
        }
    }

    struct FakeCloser(Vec<u64>);
    impl Closer for FakeCloser {
        fn close(&mut self, f: &Flow) -> Result<&'static str, String> {
            self.0.push(f.cookie);
            Ok("fake")
        }
    }

    fn cfg(close: RemedyMode) -> LeaksSection {
        LeaksSection {
            close_wait_after: Duration::from_secs(60),
            close,
            ..Default::default()
        }
    }

    #[test]
    fn half_open_needs_silence_and_evidence() {
        let c = cfg(RemedyMode::Off);
        let mut t = quiet(15_000);
        t.timer = Timer::Keepalive;
        t.probes = 3;
        let ev = half_open(&flow(1, tcp_state::ESTABLISHED, 0, t.clone()), 100 * S, &c).unwrap();
        assert!(ev.keepalive_probing);
        assert!(
            ev.reasons
                .iter()
                .any(|r| r.contains("3 keepalive probes unanswered"))
        );
        // A healthy idle flow with keepalive: probes answered (probes_out back to 0).
        let mut ok = t.clone();
        ok.probes = 0;
        assert!(half_open(&flow(1, tcp_state::ESTABLISHED, 0, ok), 100 * S, &c).is_none());
        // A busy flow: recent ACKs.
        let mut busy = t.clone();
        busy.last_ack_recv_ms = 10;
        assert!(half_open(&flow(1, tcp_state::ESTABLISHED, 0, busy), 100 * S, &c).is_none());
        let mut rtx = quiet(20_000);
        rtx.unacked = 2;
        rtx.retransmits = 4;
        assert!(
            half_open(&flow(2, tcp_state::ESTABLISHED, 0, rtx), 100 * S, &c)
                .unwrap()
                .reasons[0]
                .contains("2 segments unacknowledged")
        );
    }

    #[test]
    fn close_wait_leak_is_one_finding_per_process_and_closes_only_quiet_ones() {
        let c = cfg(RemedyMode::Enforce);
        let mut d = LeakDetector::default();
        let mut store = FindingStore::default();
        let mut closer = FakeCloser(Vec::new());
        let old = flow(1, tcp_state::CLOSE_WAIT, 10 * S, quiet(90_000));
        let old2 = flow(2, tcp_state::CLOSE_WAIT, 20 * S, quiet(80_000));
        let young = flow(3, tcp_state::CLOSE_WAIT, 90 * S, quiet(9_000));
        let chatty = flow(4, tcp_state::CLOSE_WAIT, 10 * S, quiet(1_000)); // carried data 1 s ago
        let all = [old.clone(), old2.clone(), young.clone(), chatty.clone()];
        let t = d.evaluate(100 * S, all.iter(), &c, &[], &mut closer, &mut store);
        assert_eq!(store.items.len(), 1, "one finding for the process");
        assert_eq!(store.items[0].kind, "close-wait-leak");
        assert_eq!(store.items[0].details["count"], 3);
        assert_eq!(store.items[0].details["oldest_ms"], 90_000);
        assert_eq!(closer.0, vec![1, 2], "never the young or the recently active one");
        assert_eq!(t.iter().filter(|x| x.1 == Transition::Action).count(), 2);
        assert!(store.items[0].actions[0].outcome.starts_with("closed via fake"));
        // Closed sockets are not closed again; once gone, the finding resolves.
        d.evaluate(101 * S, all.iter(), &c, &[], &mut closer, &mut store);
        assert_eq!(closer.0.len(), 2);
        let t = d.evaluate(102 * S, [young].iter(), &c, &[], &mut closer, &mut store);
        assert!(t.contains(&(1, Transition::Resolved)));
    }

    #[test]
    fn dry_run_plans_each_close_once() {
        let c = cfg(RemedyMode::DryRun);
        let mut d = LeakDetector::default();
        let mut store = FindingStore::default();
        let mut closer = FakeCloser(Vec::new());
        let f = [flow(1, tcp_state::CLOSE_WAIT, 0, quiet(90_000))];
        for i in 0..5 {
            d.evaluate((100 + i) * S, f.iter(), &c, &[], &mut closer, &mut store);
        }
        assert!(closer.0.is_empty());
        assert_eq!(store.items[0].actions.len(), 1);
        assert!(store.items[0].actions[0].outcome.starts_with("planned: abort"));
    }

    #[test]
    fn services_group_and_override() {
        let svc = vec![ServiceConfig {
            name: "jvb".into(),
            comm: Some("bridge".into()),
            close: Some(RemedyMode::Enforce),
            ..Default::default()
        }];
        let f = flow(1, tcp_state::ESTABLISHED, 0, quiet(0));
        assert_eq!(service_of(&f, &svc).as_deref(), Some("jvb"));
        assert_eq!(service_of(&f, &[]).as_deref(), Some("bridge"));
        assert_eq!(
            close_mode(&f, &cfg(RemedyMode::DryRun), &svc),
            RemedyMode::Enforce
        );
    }
}
