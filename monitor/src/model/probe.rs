//! Keepalive probes seen on the wire for one watched socket (eBPF mode: the `probe_watch`
//! sock_ops program sees each probe leave, `probe_answer` the segment that answers it).
use serde::{Deserialize, Serialize};

use super::time::{Nanos, ms};

/// A probe counts as unanswered once it is this old with nothing received (or once the kernel
/// sent the next one). 1 s is far above any RTT a keepalive crosses in practice and far below any
/// keepalive interval holdfast sets (at least 2 s).
pub const ANSWER_WAIT: Nanos = 1_000_000_000;

/// What the kernel reported about one socket's probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeLog {
    pub sent: u32,
    pub answered: u32,
    /// Probes sent since the last answer (0: the last probe was answered, or none was sent).
    pub outstanding: u32,
    /// When the first probe holdfast saw left, and the latest.
    pub first_sent: Nanos,
    pub last_sent: Nanos,
    /// When the first unanswered probe of the current streak left.
    pub streak_from: Option<Nanos>,
    pub last_answer: Option<Nanos>,
    /// Round trip of the last answered probe, in microseconds.
    pub last_rtt_us: Option<u32>,
    /// Probes the kernel said were outstanding when the latest left (icsk_probes_out).
    pub kernel_outstanding: u32,
}

impl ProbeLog {
    pub fn on_sent(&mut self, at: Nanos, kernel_outstanding: u32) {
        if self.sent == 0 {
            self.first_sent = at;
        }
        self.sent += 1;
        self.last_sent = at;
        if self.outstanding == 0 {
            self.streak_from = Some(at);
        }
        self.outstanding += 1;
        self.kernel_outstanding = kernel_outstanding;
    }

    pub fn on_answered(&mut self, at: Nanos, rtt_us: u32) {
        self.answered += 1;
        self.outstanding = 0;
        self.streak_from = None;
        self.last_answer = Some(at);
        self.last_rtt_us = Some(rtt_us);
    }

    /// Probes known unanswered at `now`: every outstanding probe but the latest, and the latest
    /// too once it waited `ANSWER_WAIT`.
    pub fn unanswered(&self, now: Nanos) -> u32 {
        if self.outstanding == 0 {
            return 0;
        }
        let latest_late = now.saturating_sub(self.last_sent) >= ANSWER_WAIT;
        self.outstanding - u32::from(!latest_late)
    }

    pub fn view(&self, now: Nanos) -> ProbeView {
        ProbeView {
            sent: self.sent,
            answered: self.answered,
            unanswered: self.unanswered(now),
            last_sent_ago_ms: (self.sent > 0).then(|| ms(now.saturating_sub(self.last_sent))),
            last_answer_ago_ms: self.last_answer.map(|a| ms(now.saturating_sub(a))),
            last_rtt_us: self.last_rtt_us,
        }
    }
}

/// A round trip in words: microseconds below 1 ms, else milliseconds with one decimal.
pub fn rtt_words(us: u32) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else {
        format!("{:.1} ms", f64::from(us) / 1000.0)
    }
}

/// What one run of the probe-watch selection did in one network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchOutcome {
    pub netns: super::observe::NetnsId,
    /// Cookies now watched (flag confirmed set).
    pub watching: Vec<u64>,
    /// Cookies released (flag confirmed clear, or the socket is gone).
    pub released: Vec<u64>,
    /// (cookie, why) for sockets whose flag could not be changed.
    pub failed: Vec<(u64, String)>,
    /// Sockets of the namespace carrying the flag after the run, and how many of them holdfast
    /// does not watch (must be 0).
    pub flagged: usize,
    pub stray: usize,
}

/// The probe record as the CLI sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeView {
    pub sent: u32,
    pub answered: u32,
    pub unanswered: u32,
    pub last_sent_ago_ms: Option<u64>,
    pub last_answer_ago_ms: Option<u64>,
    pub last_rtt_us: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn a_probe_is_unanswered_after_the_wait_or_the_next_probe() {
        let mut p = ProbeLog::default();
        p.on_sent(10 * S, 0);
        assert_eq!(p.unanswered(10 * S + S / 2), 0, "still within the wait");
        assert_eq!(p.unanswered(11 * S), 1);
        p.on_sent(12 * S, 1);
        assert_eq!(
            p.unanswered(12 * S),
            1,
            "the first is unanswered, the second not yet"
        );
        assert_eq!(p.streak_from, Some(10 * S));
        p.on_answered(12 * S + 1000, 1);
        assert_eq!(p.unanswered(20 * S), 0);
        assert_eq!((p.sent, p.answered), (2, 1));
    }
}
