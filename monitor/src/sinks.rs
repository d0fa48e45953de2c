//! Where findings go: one `Notice` per transition or remedy outcome, written to journald with
//! structured fields, streamed to `holdfast events --follow`, and counted for metrics.
use serde::{Deserialize, Serialize};

use crate::findings::{Finding, Severity, Transition, message_id};

/// One finding transition or remedy outcome.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Notice {
    /// Wall-clock milliseconds since the epoch.
    pub time_ms: u64,
    pub finding: u64,
    pub kind: String,
    pub transition: String,
    pub severity: Severity,
    pub subject: String,
    pub message: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub flow: Option<String>,
    pub profile: Option<String>,
    pub idle_s: Option<u64>,
    pub eta_s: Option<i64>,
    pub action: Option<String>,
    pub mode: Option<String>,
    pub outcome: Option<String>,
}

/// `pid N (comm)` inside a subject.
fn owner_of(subject: &str) -> (Option<u32>, Option<String>) {
    let Some(i) = subject.rfind("pid ") else {
        return (None, None);
    };
    let rest = &subject[i + 4..];
    let pid = rest.split_whitespace().next().and_then(|p| p.parse().ok());
    let comm = rest
        .find('(')
        .and_then(|a| rest.rfind(')').map(|b| rest[a + 1..b].to_string()));
    (pid, comm)
}

pub fn notice(f: &Finding, t: &Transition) -> Notice {
    let (pid, comm) = owner_of(&f.subject);
    let a = &f.details["assessment"];
    let act = matches!(t, Transition::Action)
        .then(|| f.actions.last())
        .flatten();
    let message = match act {
        Some(x) => format!(
            "{} {}: remedy {} ({}): {}",
            f.kind, f.subject, x.action, x.mode, x.outcome
        ),
        None if *t == Transition::Resolved => format!("{} resolved: {}", f.kind, f.summary),
        None => format!("{}: {}", f.kind, f.summary),
    };
    Notice {
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        finding: f.id,
        kind: f.kind.clone(),
        transition: t.as_str().into(),
        severity: f.severity,
        subject: f.subject.clone(),
        message,
        pid: pid.or_else(|| f.details["ppid"].as_u64().map(|p| p as u32)),
        comm: comm.or_else(|| f.details["parent_comm"].as_str().map(String::from)),
        flow: f.details["cookie"].as_u64().map(|c| format!("cookie:{c}")),
        profile: a["applicable"]["profile"].as_str().map(String::from),
        idle_s: a["idle_ms"].as_u64().map(|m| m / 1000),
        eta_s: a["eta_ms"].as_i64().map(|m| m / 1000),
        action: act.map(|x| x.action.clone()),
        mode: act.map(|x| x.mode.clone()),
        outcome: act.map(|x| x.outcome.clone()),
    }
}

/// syslog priority: findings by severity, resolutions as notices, failed remedies as errors.
pub fn priority(n: &Notice) -> u8 {
    match (n.transition.as_str(), n.severity) {
        ("resolved", _) => 5,
        ("action", _)
            if n.outcome
                .as_deref()
                .is_some_and(|o| o.starts_with("failed") || o.starts_with("refused")) =>
        {
            3
        }
        ("action", _) => 5,
        (_, Severity::Critical) => 2,
        (_, Severity::Warning) => 4,
        (_, Severity::Info) => 6,
    }
}

/// The journald fields of a notice.
pub fn journal_fields(n: &Notice) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("MESSAGE", n.message.clone()),
        ("PRIORITY", priority(n).to_string()),
        ("HOLDFAST_KIND", n.kind.clone()),
        ("HOLDFAST_TRANSITION", n.transition.clone()),
        ("HOLDFAST_FINDING", n.finding.to_string()),
        ("HOLDFAST_SUBJECT", n.subject.clone()),
    ];
    if let Some(id) = message_id(&n.kind) {
        f.push(("MESSAGE_ID", id.into()));
    }
    let opt = |f: &mut Vec<(&'static str, String)>, k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            f.push((k, v));
        }
    };
    opt(&mut f, "HOLDFAST_PID", n.pid.map(|p| p.to_string()));
    opt(&mut f, "HOLDFAST_COMM", n.comm.clone());
    opt(&mut f, "HOLDFAST_FLOW", n.flow.clone());
    opt(&mut f, "HOLDFAST_PROFILE", n.profile.clone());
    opt(&mut f, "HOLDFAST_IDLE_S", n.idle_s.map(|v| v.to_string()));
    opt(&mut f, "HOLDFAST_ETA_S", n.eta_s.map(|v| v.to_string()));
    opt(&mut f, "HOLDFAST_ACTION", n.action.clone());
    opt(&mut f, "HOLDFAST_MODE", n.mode.clone());
    opt(&mut f, "HOLDFAST_OUTCOME", n.outcome.clone());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::{ActionRecord, FindingStore};
    use serde_json::json;

    #[test]
    fn zombie_action_notice_has_fields_and_priority() {
        let mut s = FindingStore::default();
        let id = s.open(
            "zombie",
            Severity::Warning,
            "pid 42 (rdpsessmgr)".into(),
            "3 zombies".into(),
            json!({ "ppid": 42, "parent_comm": "rdpsessmgr" }),
            0,
        );
        let n = notice(s.get(id).unwrap(), &Transition::New);
        assert_eq!((n.pid, n.comm.as_deref()), (Some(42), Some("rdpsessmgr")));
        let fields = journal_fields(&n);
        let get = |k: &str| fields.iter().find(|(x, _)| *x == k).map(|(_, v)| v.clone());
        assert_eq!(get("PRIORITY").as_deref(), Some("4"));
        assert_eq!(get("MESSAGE_ID").as_deref(), message_id("zombie"));
        assert_eq!(get("HOLDFAST_KIND").as_deref(), Some("zombie"));
        s.get_mut(id).unwrap().actions.push(ActionRecord {
            at_ms: 0,
            action: "sigchld".into(),
            mode: "enforce".into(),
            outcome: "refused: EPERM".into(),
            before: json!(null),
            after: json!(null),
        });
        let n = notice(s.get(id).unwrap(), &Transition::Action);
        assert_eq!(priority(&n), 3);
        assert_eq!(n.outcome.as_deref(), Some("refused: EPERM"));
    }

    #[test]
    fn flow_notice_carries_profile_idle_and_eta() {
        let mut s = FindingStore::default();
        let id = s.open(
            "idle-near-eviction",
            Severity::Warning,
            "flow 10.0.0.1:5 → 10.0.0.2:22 pid 7 (ssh)".into(),
            "x".into(),
            json!({ "cookie": 9, "assessment": { "applicable": { "profile": "aws-nat-gateway" }, "idle_ms": 290500, "eta_ms": 59500 } }),
            0,
        );
        let n = notice(s.get(id).unwrap(), &Transition::New);
        assert_eq!(
            (n.pid, n.comm.as_deref(), n.flow.as_deref()),
            (Some(7), Some("ssh"), Some("cookie:9"))
        );
        assert_eq!(
            (n.profile.as_deref(), n.idle_s, n.eta_s),
            (Some("aws-nat-gateway"), Some(290), Some(59))
        );
    }
}
