//! `holdfast discover`: the plan of idle durations to try and the verdict from what each
//! connection experienced. Pure: the command (cli/discover) runs the connections.
//!
//! The plan: a ladder of connections opened together and probed after idling g0, 2·g0, 4·g0, …
//! up to `--max`; each time a ladder connection survives idling g, a batch of `BATCH` fresh
//! connections is opened at once to try the idles evenly spaced in (g, 2g]. When a ladder
//! connection breaks at g', the batch opened at g'/2 is already running and resolves the timeout
//! to (g'/2)/BATCH. The wall time stays under 2× the timeout plus the answer wait (the batch
//! started at g'/2 ≤ T and the first batch probe past T ends it).
use serde::Serialize;

use crate::model::time::fmt_ms;

/// The first ladder idle: 4.5 s, so that the ladder (4.5, 9, 18, 36, 72 s, …) never lands on
/// the round values timeouts are set to (20 s, 60 s, 240 s, 350 s), where a probe would race the
/// middlebox's own clock.
pub const FIRST_IDLE_MS: u64 = 4_500;
/// Connections per batch (the resolution is the batch's span / BATCH).
pub const BATCH: usize = 8;

/// The ladder of idles to try, up to and including `max_ms`.
pub fn ladder(max_ms: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut g = FIRST_IDLE_MS.min(max_ms);
    while g < max_ms {
        out.push(g);
        g = g.saturating_mul(2);
    }
    out.push(max_ms);
    out
}

/// The idles a batch tries in (lo, hi], in increasing order.
pub fn batch(lo_ms: u64, hi_ms: u64) -> Vec<u64> {
    let span = hi_ms.saturating_sub(lo_ms);
    let mut v: Vec<u64> = (1..=BATCH as u64)
        .map(|j| lo_ms + span * j / BATCH as u64)
        .collect();
    v.dedup();
    v.retain(|&x| x > lo_ms);
    v
}

/// What one connection experienced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fate {
    /// The probe was answered after idling.
    Answered,
    /// The probe got no answer within the answer wait: packets dropped (a middlebox forgot it).
    Silence,
    /// The probe was answered by a reset: the path (or the peer) no longer knows the connection.
    Reset,
    /// The peer closed the connection (FIN) while it idled, before any probe.
    PeerClosed,
    /// A reset arrived while it idled, before any probe.
    ResetWhileIdle,
    /// The server kept sending: the connection never idled as long as asked before its own
    /// limit (twice the idle and the answer wait) ran out.
    Chatter,
}

impl Fate {
    fn broke(self) -> bool {
        matches!(self, Fate::Silence | Fate::Reset)
    }
}

/// One observation: the connection idled `idle_ms` (measured) and then this happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Observation {
    pub idle_ms: u64,
    pub fate: Fate,
}

/// The conclusion.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// The idle timeout lies in (survived, broke]; `timeout_ms` is the conservative value (the
    /// longest idle that survived) for a rule.
    Timeout {
        survived_ms: u64,
        broke_ms: u64,
        how: &'static str,
        /// The middle of the interval: the best single figure.
        estimate_ms: u64,
        /// The conservative figure for a rule: the longest idle that survived, whole seconds.
        timeout_ms: u64,
    },
    /// Nothing broke up to the longest idle tried.
    NoTimeout { survived_ms: u64 },
    /// The evidence does not give a number; the reason says why.
    Inconclusive { reason: String },
}

impl Verdict {
    pub fn summary(&self) -> String {
        match self {
            Verdict::Timeout {
                survived_ms,
                broke_ms,
                how,
                estimate_ms,
                ..
            } => format!(
                "idle timeout about {} (between {} and {}): a connection idle {} survived, one idle {} broke ({how})",
                fmt_ms(*estimate_ms),
                fmt_ms(*survived_ms),
                fmt_ms(*broke_ms),
                fmt_ms(*survived_ms),
                fmt_ms(*broke_ms)
            ),
            Verdict::NoTimeout { survived_ms } => format!(
                "no idle timeout up to {}: a connection idle {} was still answered",
                fmt_ms(*survived_ms),
                fmt_ms(*survived_ms)
            ),
            Verdict::Inconclusive { reason } => format!("inconclusive: {reason}"),
        }
    }
}

/// A close this soon after connecting is a refusal, not an idle limit.
const CLOSED_AT_ONCE_MS: u64 = 1_000;

/// The verdict from every observation so far.
pub fn judge(obs: &[Observation]) -> Verdict {
    if let Some(o) = obs.iter().find(|o| o.fate == Fate::Chatter) {
        return Verdict::Inconclusive {
            reason: format!(
                "the server kept sending on an idle connection (its longest quiet spell was {} when the connection's time ran out): it is not an echo server that stays quiet; run `holdfast echo` on the far side",
                fmt_ms(o.idle_ms)
            ),
        };
    }
    if let Some(o) = obs
        .iter()
        .filter(|o| o.fate == Fate::PeerClosed && o.idle_ms < CLOSED_AT_ONCE_MS)
        .min_by_key(|o| o.idle_ms)
    {
        return Verdict::Inconclusive {
            reason: format!(
                "the server closed a new connection at once (after {}), before it could idle: it refuses connections (busy, or a limit per client); try again later or with a smaller --max",
                fmt_ms(o.idle_ms)
            ),
        };
    }
    if let Some(o) = obs
        .iter()
        .filter(|o| o.fate == Fate::PeerClosed)
        .min_by_key(|o| o.idle_ms)
    {
        return Verdict::Inconclusive {
            reason: format!(
                "the server closed idle connections after {}: it has its own idle limit; run `holdfast echo` on the far side, or try a server that keeps idle connections open",
                fmt_ms(o.idle_ms)
            ),
        };
    }
    if let Some(o) = obs
        .iter()
        .filter(|o| o.fate == Fate::ResetWhileIdle)
        .min_by_key(|o| o.idle_ms)
    {
        return Verdict::Inconclusive {
            reason: format!(
                "an idle connection was reset after {} before any probe: the server or a middlebox resets idle connections actively (a timeout of about {} with a reset); check the server's own limits",
                fmt_ms(o.idle_ms),
                fmt_ms(o.idle_ms)
            ),
        };
    }
    let survived = obs
        .iter()
        .filter(|o| o.fate == Fate::Answered)
        .map(|o| o.idle_ms)
        .max();
    let broke = obs.iter().filter(|o| o.fate.broke()).min_by_key(|o| o.idle_ms);
    match (survived, broke) {
        (None, None) => Verdict::Inconclusive {
            reason: "no connection was probed".into(),
        },
        (Some(s), None) => Verdict::NoTimeout { survived_ms: s },
        (None, Some(b)) => Verdict::Inconclusive {
            reason: format!(
                "every connection broke, the shortest after idling {}: the timeout is below that, or the server does not answer; check with a shorter --max or `holdfast echo` on the far side",
                fmt_ms(b.idle_ms)
            ),
        },
        (Some(s), Some(b)) if b.idle_ms <= s => Verdict::Inconclusive {
            reason: format!(
                "a connection idle {} broke while one idle {} survived: the path's behaviour changed during the run, or its timeout is not an idle timer",
                fmt_ms(b.idle_ms),
                fmt_ms(s)
            ),
        },
        (Some(s), Some(b)) => {
            let resets = obs
                .iter()
                .filter(|o| o.fate == Fate::Reset && o.idle_ms > s)
                .count();
            let silent = obs
                .iter()
                .filter(|o| o.fate == Fate::Silence && o.idle_ms > s)
                .count();
            let how = match (resets, silent) {
                (0, _) => "silence: packets dropped",
                (_, 0) => "reset",
                _ => "silence and resets",
            };
            Verdict::Timeout {
                survived_ms: s,
                broke_ms: b.idle_ms,
                how,
                estimate_ms: (s + b.idle_ms) / 2,
                timeout_ms: s / 1000 * 1000,
            }
        }
    }
}

/// The rule an operator would add for `cidr` (and `port`), for a verdict with a timeout.
pub fn rule(v: &Verdict, cidr: &str, port: u16) -> Option<String> {
    let Verdict::Timeout { timeout_ms, .. } = v else {
        return None;
    };
    Some(format!(
        "[[rules]]\ncidr = \"{cidr}\"\nport = {port}\ntimeout = \"{}s\"\n",
        (timeout_ms / 1000).max(1)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(idle_ms: u64, result: Fate) -> Observation {
        Observation {
            idle_ms,
            fate: result,
        }
    }

    #[test]
    fn the_ladder_doubles_up_to_the_max_and_batches_split_a_step() {
        assert_eq!(ladder(60_000), vec![4_500, 9_000, 18_000, 36_000, 60_000]);
        assert_eq!(ladder(3_000), vec![3_000]);
        assert_eq!(ladder(4_500), vec![4_500]);
        let b = batch(10_000, 20_000);
        assert_eq!(b.len(), BATCH);
        assert_eq!(b.first(), Some(&11_250));
        assert_eq!(b.last(), Some(&20_000));
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(batch(0, 3), vec![1, 2, 3], "tiny spans dedup");
    }

    #[test]
    fn a_timeout_is_bounded_by_the_longest_survivor_and_the_shortest_break() {
        let v = judge(&[
            o(5_000, Fate::Answered),
            o(10_000, Fate::Answered),
            o(18_750, Fate::Answered),
            o(20_000, Fate::Silence),
            o(21_250, Fate::Silence),
        ]);
        assert_eq!(
            v,
            Verdict::Timeout {
                survived_ms: 18_750,
                broke_ms: 20_000,
                how: "silence: packets dropped",
                estimate_ms: 19_375,
                timeout_ms: 18_000
            }
        );
        assert!(rule(&v, "10.0.0.2/32", 22).unwrap().contains("timeout = \"18s\""));
        let v = judge(&[o(10_000, Fate::Answered), o(12_000, Fate::Reset)]);
        assert!(matches!(v, Verdict::Timeout { how: "reset", .. }), "{v:?}");
    }

    #[test]
    fn bad_cases_never_give_a_number() {
        let peer = judge(&[o(5_000, Fate::Answered), o(30_000, Fate::PeerClosed)]);
        assert!(
            peer.summary()
                .contains("the server closed idle connections after 30s"),
            "{}",
            peer.summary()
        );
        assert!(rule(&peer, "10.0.0.2/32", 22).is_none());
        let busy = judge(&[o(5_000, Fate::Answered), o(3, Fate::PeerClosed)]);
        assert!(
            busy.summary().contains("closed a new connection at once")
                && !busy.summary().contains("idle limit"),
            "{}",
            busy.summary()
        );
        let chatter = judge(&[o(1_000, Fate::Chatter), o(5_000, Fate::Answered)]);
        assert!(
            chatter.summary().contains("kept sending"),
            "{}",
            chatter.summary()
        );
        assert!(rule(&chatter, "10.0.0.2/32", 22).is_none());
        let changed = judge(&[o(12_000, Fate::Silence), o(18_000, Fate::Answered)]);
        assert!(
            changed.summary().contains("behaviour changed"),
            "{}",
            changed.summary()
        );
        let none = judge(&[o(5_000, Fate::Silence)]);
        assert!(none.summary().starts_with("inconclusive: every connection broke"));
        let rst = judge(&[o(240_000, Fate::ResetWhileIdle), o(5_000, Fate::Answered)]);
        assert!(rst.summary().contains("reset after 4m"), "{}", rst.summary());
        assert_eq!(
            judge(&[o(60_000, Fate::Answered)]),
            Verdict::NoTimeout { survived_ms: 60_000 }
        );
        assert!(matches!(judge(&[]), Verdict::Inconclusive { .. }));
    }
}
