//! Remedies: what holdfast does about findings. Each is policy-gated (off / dry-run / enforce),
//! rate-limited, logged on the finding with the values before and after, acts on processes only
//! through pidfds, and reports a refusal once instead of retrying it.
pub mod close;
pub mod keepalive;
pub mod restart;
pub mod sigchld;

use std::collections::VecDeque;

use crate::model::finding::{ActionRecord, ActionValues, Outcome, OutcomeStatus, RemedyAction, RemedyMode};
use crate::model::time::{Nanos, ms};

/// At most `max` actions per `window`.
#[derive(Clone, Debug)]
pub struct RateLimit {
    max: usize,
    window: Nanos,
    times: VecDeque<Nanos>,
}

impl RateLimit {
    pub fn new(max: usize, window: Nanos) -> Self {
        RateLimit {
            max,
            window,
            times: VecDeque::new(),
        }
    }

    /// Takes a slot at `now` if one is free.
    pub fn take(&mut self, now: Nanos) -> bool {
        while self
            .times
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= self.window)
        {
            self.times.pop_front();
        }
        if self.times.len() >= self.max {
            return false;
        }
        self.times.push_back(now);
        true
    }
}

/// An action record at `now`.
pub fn record(
    now: Nanos,
    action: RemedyAction,
    mode: RemedyMode,
    status: OutcomeStatus,
    text: impl Into<String>,
    before: Option<ActionValues>,
    after: Option<ActionValues>,
) -> ActionRecord {
    ActionRecord {
        at_ms: ms(now),
        action,
        mode,
        outcome: Outcome::new(status, text),
        before,
        after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_frees_slots_as_the_window_moves() {
        let mut r = RateLimit::new(2, 10);
        assert!(r.take(0) && r.take(1));
        assert!(!r.take(5));
        assert!(r.take(10), "the first slot expired");
        assert!(!r.take(10));
    }
}
