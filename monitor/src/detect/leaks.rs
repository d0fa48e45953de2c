//! Dead and leaked sessions: `half-open` flows (the peer stopped answering) and sockets stuck in
//! CLOSE_WAIT / FIN_WAIT2 / LAST_ACK (`close-wait-leak`, one finding per owning process). Pure:
//! verdicts and the sockets proven dead; the close remedy decides what to abort (remedy::close).
use std::collections::{BTreeMap, HashSet};

use monitor_common::tcp_state;

use super::Env;
use super::eviction::flow_subject;
use crate::config::{LeaksSection, ServiceConfig};
use crate::findings::{Family, Key, Scope, Verdict};
use crate::model::finding::{Details, FindingKind, Severity, Subject};
use crate::model::flow::Flow;
use crate::model::leaks::{Evidence, StuckSocket};
use crate::model::observe::{Owner, Timer, state_name};
use crate::model::time::{Nanos, fmt_ms, ms};

/// Sockets listed in a finding's details.
const LIST: usize = 50;

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
        wire: f.wire().map(|w| w.view(now)),
    })
}

/// Half-open evidence seen on the wire (eBPF mode, watched sockets): a keepalive probe that
/// went unanswered is evidence at once, with no silence threshold. It makes a finding, not a
/// close candidate: one lost probe is not proof (the close remedy waits for `half_open`).
pub fn wire_evidence(f: &Flow, now: Nanos) -> Option<Evidence> {
    if f.state != tcp_state::ESTABLISHED {
        return None;
    }
    let w = f.wire()?;
    let lost = w.unanswered(now);
    if lost == 0 {
        return None;
    }
    let first = w.streak_from.unwrap_or(w.last_sent);
    let silence_ms = f.ages_ms(now).map_or(0, |(_, _, a)| a);
    let mut reasons = vec![format!(
        "{lost} keepalive probe(s) unanswered on the wire, the first sent {} ago",
        fmt_ms(ms(now.saturating_sub(first)))
    )];
    if let Some(a) = w.last_answer {
        reasons.push(format!(
            "the last answer came {} ago",
            fmt_ms(ms(now.saturating_sub(a)))
        ));
    } else {
        reasons.push("no probe was ever answered".into());
    }
    Some(Evidence {
        silence_ms,
        unanswered_probes: lost.min(255) as u8,
        retransmits: f.tcp.as_ref().map_or(0, |t| t.retransmits),
        unacked: f.tcp.as_ref().map_or(0, |t| t.unacked),
        zero_window_probing: false,
        keepalive_probing: true,
        reasons,
        wire: Some(w.view(now)),
    })
}

/// How long `f` has been in its state (since first seen if it entered it before holdfast).
pub fn state_age_ms(f: &Flow, now: Nanos) -> u64 {
    ms(now.saturating_sub(f.state_since().unwrap_or(f.first_seen)))
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

/// Whether `f` is stuck closing past its threshold.
pub fn stuck(f: &Flow, now: Nanos, cfg: &LeaksSection) -> bool {
    stuck_after(f.state, cfg).is_some_and(|t| state_age_ms(f, now) >= t)
}

/// Cookies counted as leaked: half-open, or stuck past their threshold.
pub fn leaked<'a>(flows: impl Iterator<Item = &'a Flow>, now: Nanos, cfg: &LeaksSection) -> HashSet<u64> {
    flows
        .filter(|f| stuck(f, now, cfg) || half_open(f, now, cfg).is_some())
        .map(|f| f.cookie)
        .collect()
}

/// The service a flow belongs to: the first matching [[services]] entry, else its unit,
/// cgroup or command.
pub fn service_of(f: &Flow, services: &[ServiceConfig]) -> Option<String> {
    Some(service_of_owner(
        f.owner.as_ref()?,
        Some(f.local().port()),
        services,
    ))
}

/// The service of a process (and local port, when known): the first configured service it
/// matches, else its unit, its cgroup, or its command.
pub fn service_of_owner(o: &Owner, local_port: Option<u16>, services: &[ServiceConfig]) -> String {
    for s in services {
        let ok = s.comm.as_ref().is_none_or(|c| &o.comm == c)
            && s.unit.as_ref().is_none_or(|u| o.unit.as_ref() == Some(u))
            && s.cgroup
                .as_ref()
                .is_none_or(|c| o.cgroup.as_ref().is_some_and(|g| g.starts_with(c.as_str())))
            && s.port.is_none_or(|p| local_port == Some(p));
        if ok {
            return s.name.clone();
        }
    }
    o.unit
        .clone()
        .or_else(|| o.cgroup.clone().filter(|c| c != "/"))
        .unwrap_or_else(|| o.comm.clone())
}

/// A socket proven dead, that the close remedy may abort.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub cookie: u64,
    /// The finding it is evidence of.
    pub key: Key,
    /// Why it is believed dead, in words.
    pub evidence: String,
}

#[derive(Debug, Default)]
pub struct LeakPass {
    pub half_open: Vec<Verdict>,
    pub stuck: Vec<Verdict>,
    pub candidates: Vec<Candidate>,
}

/// Judges every flow: half-open per flow, stuck closing states per owning process.
pub fn evaluate<'a>(
    now: Nanos,
    flows: impl Iterator<Item = &'a Flow> + Clone,
    cfg: &LeaksSection,
    env: &dyn Env,
) -> LeakPass {
    let mut pass = LeakPass::default();
    for f in flows.clone() {
        let wire = wire_evidence(f, now);
        let (ev, candidate) = match (half_open(f, now, cfg), wire) {
            (Some(mut ev), w) => {
                if let Some(w) = w {
                    ev.reasons.insert(0, w.reasons[0].clone());
                }
                (ev, true)
            }
            (None, Some(w)) => (w, false),
            (None, None) => continue,
        };
        let key = Key {
            family: Family::HalfOpen,
            kind: FindingKind::HalfOpen,
            scope: Scope::Flow(f.cookie),
        };
        if candidate {
            pass.candidates.push(Candidate {
                cookie: f.cookie,
                key: key.clone(),
                evidence: ev.reasons.join(", "),
            });
        }
        pass.half_open.push(Verdict {
            key,
            severity: Severity::Warning,
            subject: flow_subject(f, env.netns_name(f.netns)),
            summary: format!("the peer stopped answering: {}", ev.reasons.join(", ")),
            details: Details::HalfOpen { evidence: ev },
            notable: false,
        });
    }
    let mut by_pid: BTreeMap<u32, (String, Vec<&Flow>)> = BTreeMap::new();
    for f in flows.filter(|f| stuck(f, now, cfg)) {
        let (pid, comm) = f
            .owner
            .as_ref()
            .map(|o| (o.pid, o.comm.clone()))
            .unwrap_or((0, "(no owner: orphaned)".into()));
        by_pid.entry(pid).or_insert_with(|| (comm, Vec::new())).1.push(f);
    }
    for (pid, (comm, socks)) in by_pid {
        let key = Key {
            family: Family::Stuck,
            kind: FindingKind::CloseWaitLeak,
            scope: Scope::Pid(pid),
        };
        let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
        for f in &socks {
            *by_state.entry(state_name(f.state).to_string()).or_default() += 1;
        }
        let mut list: Vec<StuckSocket> = socks
            .iter()
            .map(|f| StuckSocket {
                cookie: f.cookie,
                local: f.local().addr(),
                remote: f.remote().addr(),
                state: state_name(f.state).to_string(),
                age_ms: state_age_ms(f, now),
            })
            .collect();
        list.sort_by_key(|s| std::cmp::Reverse(s.age_ms));
        let oldest = list.first().map_or(0, |s| s.age_ms);
        // The namespace(s) of these sockets, in words.
        let spaces: std::collections::BTreeSet<String> =
            socks.iter().filter_map(|f| env.netns_name(f.netns)).collect();
        let netns = (!spaces.is_empty()).then(|| spaces.into_iter().collect::<Vec<_>>().join(", "));
        for s in &list {
            pass.candidates.push(Candidate {
                cookie: s.cookie,
                key: key.clone(),
                evidence: format!("{} for {}", s.state, fmt_ms(s.age_ms)),
            });
        }
        let summary = format!(
            "pid {pid} ({comm}) holds {} socket(s) the peer has closed or that never finished closing ({}), oldest {}: the program does not close them",
            socks.len(),
            by_state
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            fmt_ms(oldest)
        );
        list.truncate(LIST);
        pass.stuck.push(Verdict {
            key,
            severity: Severity::Warning,
            subject: Subject::Process { pid, comm, netns },
            summary,
            details: Details::Stuck {
                count: socks.len(),
                by_state,
                oldest_ms: oldest,
                sockets: list,
            },
            notable: false,
        });
    }
    pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::FakeEnv;
    use crate::model::finding::RemedyMode;
    use crate::model::observe::{Owner, TcpSample};
    use crate::model::time::SEC;
    use std::time::Duration;

    const S: Nanos = SEC;

    pub fn flow(cookie: u64, state: u8, since: Nanos, t: TcpSample) -> Flow {
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
        f.owner = Some(std::sync::Arc::new(Owner {
            pid: 50,
            comm: "bridge".into(),
            cgroup: None,
            unit: None,
        }));
        f.tcp = Some(t);
        f.tcp_at = 100 * S;
        f
    }

    pub fn quiet(ms: u32) -> TcpSample {
        TcpSample {
            last_data_sent_ms: ms,
            last_data_recv_ms: ms,
            last_ack_recv_ms: ms,
            ..Default::default()
        }
    }

    pub fn cfg(close: RemedyMode) -> LeaksSection {
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
    fn close_wait_is_one_verdict_per_process_with_every_socket_a_candidate() {
        let c = cfg(RemedyMode::Enforce);
        let all = [
            flow(1, tcp_state::CLOSE_WAIT, 10 * S, quiet(90_000)),
            flow(2, tcp_state::CLOSE_WAIT, 20 * S, quiet(80_000)),
            flow(3, tcp_state::CLOSE_WAIT, 90 * S, quiet(9_000)), // young
            flow(4, tcp_state::ESTABLISHED, 10 * S, quiet(1_000)),
        ];
        let p = evaluate(100 * S, all.iter(), &c, &FakeEnv::default());
        assert_eq!(p.stuck.len(), 1, "one verdict for the process");
        let Details::Stuck { count, oldest_ms, .. } = &p.stuck[0].details else {
            panic!()
        };
        assert_eq!((*count, *oldest_ms), (2, 90_000));
        assert_eq!(
            p.candidates.iter().map(|c| c.cookie).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(leaked(all.iter(), 100 * S, &c), HashSet::from([1, 2]));
    }

    #[test]
    fn services_group_flows() {
        let svc = vec![ServiceConfig {
            name: "jvb".into(),
            comm: Some("bridge".into()),
            close: Some(RemedyMode::Enforce),
            ..Default::default()
        }];
        let f = flow(1, tcp_state::ESTABLISHED, 0, quiet(0));
        assert_eq!(service_of(&f, &svc).as_deref(), Some("jvb"));
        assert_eq!(service_of(&f, &[]).as_deref(), Some("bridge"));
    }
}
