//! Post-mortems: a flow that died by RST or timeout after idling past its middlebox's timeout was
//! most likely evicted (`likely-evicted`, post-mortem).
use std::borrow::Cow;

use super::super::Env;
use super::{Family, Key, Scope, Verdict, applicable, flow_subject};
use crate::config::policy::EvictionPolicy;
use crate::model::finding::{Details, FindingKind, Severity};
use crate::model::flow::Flow;
use crate::model::time::{Nanos, fmt_ms, ms};

pub const ETIMEDOUT: i32 = 110;
pub const ECONNRESET: i32 = 104;
pub const ECONNABORTED: i32 = 103;

/// How a flow ended, in words.
pub fn cause(f: &Flow) -> Cow<'static, str> {
    // Borrowed where it can be: every closed flow gets one (a connection storm closes tens of
    // thousands a second), and nearly all are just "closed".
    match (f.resets_recv(), f.last_error()) {
        (n, _) if n > 0 => "reset by the peer or a middlebox".into(),
        (_, Some(ETIMEDOUT)) => "timed out (unanswered retransmits or keepalive probes)".into(),
        (_, Some(ECONNRESET)) => "reset".into(),
        (_, Some(ECONNABORTED)) => "aborted".into(),
        (_, Some(e)) => format!("closed with error {e}").into(),
        _ => "closed".into(),
    }
}

/// An upper bound of how long a flow that broke had idled before the send that went
/// unanswered: the idle when it started retransmitting (`Flow::trouble_idle_ms`), or, for a
/// reset with no retransmission, the idle up to the reset (a middlebox that forgot the flow
/// answers the first send with one). A flow breaks when it died by RST or ETIMEDOUT, or, where
/// no error is reported (poll mode), when it vanished while ESTABLISHED and retransmitting.
/// None if the flow did not break that way.
pub fn idle_before_break(f: &Flow, closed_at: Nanos) -> Option<u64> {
    let t = f.tcp.as_ref()?;
    let died_badly = f.resets_recv() > 0 || matches!(f.last_error(), Some(ETIMEDOUT) | Some(ECONNRESET));
    let vanished_retransmitting = f.last_error().is_none()
        && f.state == monitor_common::tcp_state::ESTABLISHED
        && t.retransmits > 0
        && t.unacked > 0;
    if !died_badly && !vanished_retransmitting {
        return None;
    }
    if f.trouble_idle_ms() > 0 {
        return Some(u64::from(f.trouble_idle_ms()));
    }
    (f.resets_recv() > 0 || f.last_error() == Some(ECONNRESET))
        .then(|| u64::from(t.last_ack_recv_ms) + ms(closed_at.saturating_sub(f.tcp_at)))
}

/// The post-mortem of a flow that keepalive found dead (eBPF mode, probes watched): it timed out
/// with probes unanswered on the wire and no middlebox timeout explains it.
fn dead_peer(f: &Flow, closed_at: Nanos, cause: &str, env: &mut dyn Env) -> Option<Verdict> {
    let w = f.wire()?;
    if f.last_error() != Some(ETIMEDOUT) || w.outstanding == 0 {
        return None;
    }
    let first = w.streak_from.unwrap_or(w.last_sent);
    let last_answer = w
        .last_answer
        .map_or("no probe was ever answered".to_string(), |a| {
            format!(
                "the last answer came {} before the end",
                fmt_ms(ms(closed_at.saturating_sub(a)))
            )
        });
    let silence_ms = f.ages_ms(closed_at).map_or(0, |(_, _, a)| a);
    let reasons = vec![
        format!(
            "{} keepalive probe(s) unanswered over {}",
            w.outstanding,
            fmt_ms(ms(closed_at.saturating_sub(first)))
        ),
        last_answer,
        format!("the kernel ended the connection ({cause})"),
    ];
    Some(Verdict {
        key: Key {
            family: Family::PostMortem,
            kind: FindingKind::HalfOpen,
            scope: Scope::Flow(f.cookie),
        },
        severity: Severity::Warning,
        subject: flow_subject(f, env.netns_name(f.netns)),
        summary: format!("dead peer found by keepalive: {}", reasons.join(", ")),
        details: Details::HalfOpen {
            evidence: crate::model::leaks::Evidence {
                silence_ms,
                unanswered_probes: w.outstanding.min(255) as u8,
                retransmits: 0,
                unacked: 0,
                zero_window_probing: false,
                keepalive_probing: true,
                reasons,
                wire: Some(w.view(closed_at)),
            },
        },
        notable: false,
    })
}

/// The post-mortem of a closed flow, if it died badly after idling past its timeout.
pub fn judge(
    f: &Flow,
    closed_at: Nanos,
    cause: &str,
    pol: &EvictionPolicy,
    env: &mut dyn Env,
) -> Option<Verdict> {
    let died_badly = f.resets_recv() > 0 || matches!(f.last_error(), Some(ETIMEDOUT) | Some(ECONNRESET));
    if !died_badly {
        return None;
    }
    let evicted = applicable(f, pol, env).ok().and_then(|app| {
        let t = f.tcp.as_ref()?;
        let silent_ms = u64::from(t.last_ack_recv_ms) + ms(closed_at.saturating_sub(f.tcp_at));
        (silent_ms >= app.timeout_s.saturating_mul(1000)).then_some((app, silent_ms))
    });
    let Some((app, silent_ms)) = evicted else {
        return dead_peer(f, closed_at, cause, env);
    };
    // Probes watched: a probe that went unanswered while the flow had idled less than the
    // middlebox's timeout reached a middlebox that still knew the flow: the peer is gone.
    if let Some(w) = f.wire().filter(|w| w.outstanding > 0) {
        let last_ack = closed_at.saturating_sub(silent_ms.saturating_mul(1_000_000));
        let first = w.streak_from.unwrap_or(w.last_sent);
        if ms(first.saturating_sub(last_ack)) < app.timeout_s.saturating_mul(1000) {
            return dead_peer(f, closed_at, cause, env);
        }
    }
    let probe = f.wire().filter(|w| w.outstanding > 0).map_or(String::new(), |w| {
        format!(
            "; the keepalive probe sent {} before the end went unanswered",
            fmt_ms(ms(closed_at.saturating_sub(w.streak_from.unwrap_or(w.last_sent))))
        )
    });
    let summary = format!(
        "connection {cause} after {} without an ACK, longer than the {} idle timeout of {}: the middlebox most likely evicted it{probe}",
        fmt_ms(silent_ms),
        fmt_ms(app.timeout_s * 1000),
        app.profile
    );
    Some(Verdict {
        key: Key {
            family: Family::PostMortem,
            kind: FindingKind::LikelyEvicted,
            scope: Scope::Flow(f.cookie),
        },
        severity: Severity::Critical,
        subject: flow_subject(f, env.netns_name(f.netns)),
        summary,
        details: Details::PostMortem {
            profile: app,
            silent_ms,
            resets_recv: u32::from(f.resets_recv()),
            error: f.last_error(),
            cause: cause.to_string(),
        },
        notable: false,
    })
}
