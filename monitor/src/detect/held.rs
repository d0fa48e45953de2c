//! `dead-socket-held`: a process holds descriptors to TCP sockets that are in no TCP table any
//! more. The peer is gone (a reset, an abort, holdfast's own close) but the program never
//! noticed: each descriptor keeps a session's slot (and an fd) until the program closes it or is
//! restarted.
use std::collections::BTreeMap;

use crate::findings::{Family, Key, Scope, Verdict};
use crate::model::finding::{Details, FindingKind, Severity, Subject};
use crate::model::time::fmt_ms;
use crate::track::held::PidHeld;

/// Sockets listed in a finding at most (the count is exact).
const LIST: usize = 20;

pub fn key(pid: u32) -> Key {
    Key {
        family: Family::Held,
        kind: FindingKind::DeadSocketHeld,
        scope: Scope::Pid(pid),
    }
}

/// One verdict per process whose oldest dead descriptor has been held at least `after_ms`.
/// `netns` names the namespace of a process, if known.
pub fn evaluate(
    held: &BTreeMap<u32, PidHeld>,
    after_ms: u64,
    netns: &dyn Fn(u32) -> Option<String>,
) -> Vec<Verdict> {
    let mut out = Vec::new();
    for (pid, h) in held {
        if h.oldest_ms < after_ms {
            continue;
        }
        let comm = h
            .owner
            .as_ref()
            .map_or_else(|| "?".to_string(), |o| o.comm.clone());
        let trend = if h.per_min >= 0.05 {
            format!(", growing by {:.1}/min", h.per_min)
        } else {
            String::new()
        };
        let summary = format!(
            "pid {pid} ({comm}) holds {} descriptor(s) to TCP sockets that are closed (oldest {}{trend}): each keeps a session's slot; the program must close them or be restarted",
            h.sockets.len(),
            fmt_ms(h.oldest_ms)
        );
        let mut sockets = h.sockets.clone();
        sockets.truncate(LIST);
        out.push(Verdict {
            key: key(*pid),
            severity: Severity::Warning,
            subject: Subject::Process {
                pid: *pid,
                comm,
                netns: netns(*pid),
            },
            summary,
            details: Details::Held {
                count: h.sockets.len(),
                oldest_ms: h.oldest_ms,
                per_min: h.per_min,
                sockets,
            },
            notable: false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::leaks::HeldSocket;

    #[test]
    fn reports_only_past_the_threshold_with_count_age_and_trend() {
        let mut held = BTreeMap::new();
        held.insert(
            7,
            PidHeld {
                owner: None,
                sockets: vec![HeldSocket {
                    fd: 9,
                    inode: 99,
                    age_ms: 45_000,
                    local: None,
                    remote: None,
                }],
                oldest_ms: 45_000,
                per_min: 2.0,
            },
        );
        assert!(evaluate(&held, 60_000, &|_| None).is_empty());
        let v = evaluate(&held, 30_000, &|_| Some("blue".into()));
        assert_eq!(v.len(), 1);
        assert!(
            v[0].summary.contains("holds 1 descriptor") && v[0].summary.contains("growing by 2.0/min"),
            "{}",
            v[0].summary
        );
        assert_eq!(v[0].subject.netns(), Some("blue"));
    }
}
