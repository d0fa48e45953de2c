//! Where findings go: one [`Notice`] per transition or remedy outcome, written to journald with
//! structured fields, streamed to `holdfast events --follow`, logged, and counted for metrics.
pub mod journal;
pub mod metrics;
pub mod notify;

use serde::{Deserialize, Serialize};

use crate::model::finding::{
    Finding, FindingId, FindingKind, Outcome, OutcomeClass, RemedyAction, RemedyMode, Severity, Subject,
    Transition,
};

/// One finding transition or remedy outcome.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Notice {
    /// Wall-clock milliseconds since the epoch.
    pub time_ms: u64,
    pub finding: FindingId,
    pub kind: FindingKind,
    pub transition: Transition,
    pub severity: Severity,
    pub subject: Subject,
    pub message: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub netns: Option<String>,
    /// The flow's socket cookie.
    pub flow: Option<u64>,
    pub profile: Option<String>,
    pub idle_s: Option<u64>,
    pub eta_s: Option<i64>,
    pub action: Option<RemedyAction>,
    pub mode: Option<RemedyMode>,
    pub outcome: Option<Outcome>,
    /// Keepalive probes (half-open evidence): unanswered, and sent/answered where they were seen
    /// on the wire.
    #[serde(default)]
    pub probes_unanswered: Option<u32>,
    #[serde(default)]
    pub probes_sent: Option<u32>,
    #[serde(default)]
    pub probes_answered: Option<u32>,
}

impl Notice {
    /// The outcome class of a remedy notice (planned, pending, ok, failed).
    pub fn outcome_class(&self) -> Option<OutcomeClass> {
        self.outcome.as_ref().map(|o| o.class())
    }
}

pub fn notice(f: &Finding, t: Transition) -> Notice {
    let proc_ref = f.process();
    let a = f.assessment();
    let act = (t == Transition::Action).then(|| f.actions.last()).flatten();
    let message = match (act, t) {
        (Some(x), _) => format!(
            "{} {}: remedy {} ({}): {}",
            f.kind,
            f.subject,
            x.action.as_str(),
            x.mode.as_str(),
            x.outcome
        ),
        (None, Transition::Resolved) => format!(
            "{} resolved: {} — {}",
            f.kind,
            f.subject,
            f.resolution.as_deref().unwrap_or("no longer holds")
        ),
        (None, _) => format!("{} {}: {}", f.kind, f.subject, f.summary),
    };
    let evidence = match &f.details {
        crate::model::finding::Details::HalfOpen { evidence } => Some(evidence),
        _ => None,
    };
    let wire = evidence.and_then(|e| e.wire.as_ref());
    Notice {
        probes_unanswered: evidence
            .filter(|e| e.keepalive_probing || e.zero_window_probing)
            .map(|e| wire.map_or(u32::from(e.unanswered_probes), |w| w.unanswered)),
        probes_sent: wire.map(|w| w.sent),
        probes_answered: wire.map(|w| w.answered),
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        finding: f.id,
        kind: f.kind,
        transition: t,
        severity: f.severity,
        subject: f.subject.clone(),
        message,
        pid: proc_ref.as_ref().map(|p| p.pid),
        comm: proc_ref.map(|p| p.comm),
        netns: f.subject.netns().map(String::from),
        flow: f.subject.cookie(),
        profile: f.profile().map(String::from),
        idle_s: a.map(|a| a.idle_ms / 1000),
        eta_s: a.and_then(|a| a.eta_ms).map(|m| m / 1000),
        action: act.map(|x| x.action),
        mode: act.map(|x| x.mode),
        outcome: act.map(|x| x.outcome.clone()),
    }
}

/// syslog priority: findings by severity, resolutions and remedy outcomes as notices, failed
/// remedies as errors.
pub fn priority(n: &Notice) -> u8 {
    match (n.transition, n.outcome_class(), n.severity) {
        (Transition::Resolved, _, _) => 5,
        (Transition::Action, Some(OutcomeClass::Failed), _) => 3,
        (Transition::Action, _, _) => 5,
        (_, _, Severity::Critical) => 2,
        (_, _, Severity::Warning) => 4,
        (_, _, Severity::Info) => 6,
    }
}

/// The journald fields of a notice.
pub fn journal_fields(n: &Notice) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("MESSAGE", n.message.clone()),
        ("PRIORITY", priority(n).to_string()),
        ("MESSAGE_ID", n.kind.message_id().into()),
        ("HOLDFAST_KIND", n.kind.as_str().into()),
        ("HOLDFAST_TRANSITION", n.transition.as_str().into()),
        ("HOLDFAST_FINDING", n.finding.to_string()),
        ("HOLDFAST_SUBJECT", n.subject.to_string()),
    ];
    let mut opt = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            f.push((k, v));
        }
    };
    opt("HOLDFAST_PID", n.pid.map(|p| p.to_string()));
    opt("HOLDFAST_COMM", n.comm.clone());
    opt("HOLDFAST_NETNS", n.netns.clone());
    opt("HOLDFAST_FLOW", n.flow.map(|c| format!("cookie:{c}")));
    opt("HOLDFAST_PROFILE", n.profile.clone());
    opt("HOLDFAST_IDLE_S", n.idle_s.map(|v| v.to_string()));
    opt("HOLDFAST_ETA_S", n.eta_s.map(|v| v.to_string()));
    opt(
        "HOLDFAST_PROBES_UNANSWERED",
        n.probes_unanswered.map(|v| v.to_string()),
    );
    opt("HOLDFAST_PROBES_SENT", n.probes_sent.map(|v| v.to_string()));
    opt(
        "HOLDFAST_PROBES_ANSWERED",
        n.probes_answered.map(|v| v.to_string()),
    );
    opt("HOLDFAST_ACTION", n.action.map(|a| a.as_str().into()));
    opt("HOLDFAST_MODE", n.mode.map(|m| m.as_str().into()));
    opt("HOLDFAST_OUTCOME", n.outcome.as_ref().map(|o| o.text.clone()));
    opt(
        "HOLDFAST_OUTCOME_CLASS",
        n.outcome_class().map(|c| c.as_str().into()),
    );
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::{Family, FindingStore, Key, Scope, Verdict};
    use crate::model::eviction::{Applicable, Assessment, Forecast, KaSource, KaValues, Keepalive};
    use crate::model::finding::{ActionRecord, Details, OutcomeStatus, ProcRef};
    use crate::model::process::{Diagnosis, ZombieCase};

    fn zombie() -> Verdict {
        Verdict {
            key: Key {
                family: Family::Zombie,
                kind: FindingKind::Zombie,
                scope: Scope::Pid(42),
            },
            severity: Severity::Warning,
            subject: Subject::Process {
                pid: 42,
                comm: "rdpsessmgr".into(),
                netns: None,
            },
            summary: "3 zombies".into(),
            details: Details::Zombie(ZombieCase {
                ppid: 42,
                parent_comm: "rdpsessmgr".into(),
                diagnosis: Diagnosis::HandlerLostSignal,
                explanation: String::new(),
                nudge_can_help: true,
                count: 3,
                oldest_ms: 0,
                rate_per_min: 0.0,
                children: vec![],
                age_at_report_ms: 0,
                nudges: 0,
                stopped: false,
            }),
            notable: false,
        }
    }

    #[test]
    fn zombie_action_notice_has_fields_and_priority() {
        let mut s = FindingStore::default();
        let (id, _) = s.upsert(zombie(), 0);
        let n = notice(s.get(id).unwrap(), Transition::New);
        assert_eq!((n.pid, n.comm.as_deref()), (Some(42), Some("rdpsessmgr")));
        let fields = journal_fields(&n);
        let get = |fs: &[(&str, String)], k: &str| fs.iter().find(|(x, _)| *x == k).map(|(_, v)| v.clone());
        assert_eq!(get(&fields, "PRIORITY").as_deref(), Some("4"));
        assert_eq!(
            get(&fields, "MESSAGE_ID").as_deref(),
            Some(FindingKind::Zombie.message_id())
        );
        assert_eq!(get(&fields, "HOLDFAST_KIND").as_deref(), Some("zombie"));
        assert_eq!(get(&fields, "HOLDFAST_PID").as_deref(), Some("42"));
        s.act(
            id,
            ActionRecord {
                at_ms: 0,
                action: RemedyAction::Sigchld,
                mode: RemedyMode::Enforce,
                outcome: Outcome::new(OutcomeStatus::Refused, "refused: EPERM"),
                before: None,
                after: None,
            },
        );
        let n = notice(s.get(id).unwrap(), Transition::Action);
        assert_eq!(priority(&n), 3, "a refusal is an error");
        let fields = journal_fields(&n);
        assert_eq!(get(&fields, "HOLDFAST_OUTCOME_CLASS").as_deref(), Some("failed"));
        assert_eq!(get(&fields, "HOLDFAST_ACTION").as_deref(), Some("sigchld"));
    }

    #[test]
    fn flow_notice_carries_profile_idle_eta_and_namespace() {
        let mut s = FindingStore::default();
        let a = Assessment {
            cookie: 9,
            applicable: Some(Applicable {
                profile: "aws-nat-gateway".into(),
                timeout_s: 350,
                keepalive_resets: true,
                why: String::new(),
                keepalive_mode: RemedyMode::Enforce,
            }),
            no_middlebox_reason: None,
            idle_ms: 290_500,
            keepalive: Keepalive {
                on: Some(false),
                values: KaValues {
                    idle_s: 7200,
                    intvl_s: 75,
                    cnt: 9,
                },
                source: KaSource::Sysctl,
            },
            refresh_s: None,
            detection_s: None,
            eta_ms: Some(59_500),
            verdict: Forecast::NearEviction,
        };
        let (id, _) = s.upsert(
            Verdict {
                key: Key {
                    family: Family::Eviction,
                    kind: FindingKind::IdleNearEviction,
                    scope: Scope::Flow(9),
                },
                severity: Severity::Warning,
                subject: Subject::Flow {
                    cookie: 9,
                    local: "10.0.0.1:5".parse().unwrap(),
                    remote: "10.0.0.2:22".parse().unwrap(),
                    netns: Some("blue".into()),
                    owner: Some(ProcRef {
                        pid: 7,
                        comm: "ssh".into(),
                    }),
                },
                summary: "x".into(),
                details: Details::Eviction { assessment: a },
                notable: false,
            },
            0,
        );
        let n = notice(s.get(id).unwrap(), Transition::New);
        assert_eq!(
            (n.pid, n.comm.as_deref(), n.flow),
            (Some(7), Some("ssh"), Some(9))
        );
        assert_eq!(
            (n.profile.as_deref(), n.idle_s, n.eta_s),
            (Some("aws-nat-gateway"), Some(290), Some(59))
        );
        let fields = journal_fields(&n);
        assert!(fields.contains(&("HOLDFAST_NETNS", "blue".into())));
        assert!(fields.contains(&("HOLDFAST_FLOW", "cookie:9".into())));
    }
}
