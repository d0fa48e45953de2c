//! When quiet flows fall due, soonest first. An entry is 8 bytes, (milliseconds from the
//! wheel's epoch, the flow's position in the table's vector), where (nanoseconds, cookie) took
//! 16: at 200k young flows, each with its time due at the quick-reject bound, the heap was 21
//! bytes a flow (heaptrack), now about 10.
//!
//! A position names a flow only until a removal moves another flow into it: the table pushes
//! the moved flow again at its new position. An entry left naming a position now held by
//! another flow is stale: it wakes that flow only if that flow is due at the very same
//! millisecond (`is_at`), which is when its own entry wakes it anyway.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::model::time::Nanos;

const MS: Nanos = 1_000_000;
/// The epoch is set this far before the first time pushed into an empty wheel: every later
/// time is after it (times pushed are "now" plus a wait, and an hour is longer than any wait
/// the forecast gives).
const EPOCH_LEAD: Nanos = 3_600 * 1_000 * MS;

#[derive(Default)]
pub struct Wheel {
    heap: BinaryHeap<Reverse<[u32; 2]>>,
    /// Ticks count milliseconds from here; a tick past `u32::MAX` (49 days) re-bases it.
    epoch: Nanos,
}

impl Wheel {
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn clear(&mut self) {
        self.heap.clear();
    }

    /// The tick of `until`: milliseconds from the epoch, rounded up (an entry never falls due
    /// before its time), clamped to the ticks there are.
    fn tick(&self, until: Nanos) -> u32 {
        let ms = until.saturating_sub(self.epoch).div_ceil(MS);
        u32::try_from(ms).unwrap_or(u32::MAX)
    }

    /// Whether a flow quiet until `until` is the one an entry at `tick` was made for (else the
    /// entry is stale: the flow changed since).
    pub fn is_at(&self, until: Nanos, tick: u32) -> bool {
        self.tick(until) == tick
    }

    pub fn push(&mut self, until: Nanos, pos: u32) {
        if self.heap.is_empty() {
            self.epoch = until.saturating_sub(EPOCH_LEAD);
        } else if until.saturating_sub(self.epoch).div_ceil(MS) > u64::from(u32::MAX) {
            self.rebase();
        }
        let t = self.tick(until);
        self.heap.push(Reverse([t, pos]));
    }

    /// Moves the epoch up to the soonest entry (every tick less by as many milliseconds).
    fn rebase(&mut self) {
        let Some(Reverse([k, _])) = self.heap.peek().copied() else {
            return;
        };
        self.epoch += u64::from(k) * MS;
        self.heap = std::mem::take(&mut self.heap)
            .into_iter()
            .map(|Reverse([t, p])| Reverse([t - k, p]))
            .collect();
    }

    /// The soonest entry whose time has come by `now`, taken out: (its tick, the position).
    pub fn pop_due(&mut self, now: Nanos) -> Option<(u32, u32)> {
        let Reverse([t, p]) = *self.heap.peek()?;
        if self.epoch.saturating_add(u64::from(t) * MS) > now {
            return None;
        }
        self.heap.pop();
        Some((t, p))
    }

    /// The wheel of exactly these (until, position) entries.
    pub fn rebuild(&mut self, entries: impl Iterator<Item = (Nanos, u32)>) {
        self.heap.clear();
        let entries: Vec<(Nanos, u32)> = entries.collect();
        if let Some(min) = entries.iter().map(|(u, _)| *u).min() {
            self.epoch = min.saturating_sub(EPOCH_LEAD);
        }
        self.heap = entries
            .into_iter()
            .map(|(u, p)| Reverse([self.tick(u), p]))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000 * MS;

    #[test]
    fn entries_fall_due_in_order_never_early_and_name_their_place() {
        let mut w = Wheel::default();
        let big = u32::MAX - 7;
        w.push(100 * S + 1, 1);
        w.push(50 * S, big);
        w.push(70 * S, 3);
        assert_eq!(std::mem::size_of::<Reverse<[u32; 2]>>(), 8);
        assert_eq!(w.pop_due(49 * S), None);
        let (t, c) = w.pop_due(50 * S).unwrap();
        assert_eq!(c, big);
        assert!(w.is_at(50 * S, t) && !w.is_at(51 * S, t));
        assert_eq!(w.pop_due(69 * S + 999 * MS).map(|x| x.1), None);
        assert_eq!(w.pop_due(70 * S).map(|x| x.1), Some(3));
        // Rounded up to the next millisecond: not due one nanosecond early.
        assert_eq!(w.pop_due(100 * S), None);
        let (t, c) = w.pop_due(100 * S + MS).unwrap();
        assert_eq!(c, 1);
        assert!(w.is_at(100 * S + 1, t));
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn a_time_past_the_ticks_rebases_the_wheel() {
        let mut w = Wheel::default();
        let day = 86_400 * S;
        w.push(day, 1);
        w.push(10 * day, 2);
        assert_eq!(w.pop_due(day).map(|x| x.1), Some(1));
        // 50 days past the epoch (an hour before the first time): past the ticks, re-based
        // on the soonest entry.
        w.push(51 * day, 3);
        let (t, c) = w.pop_due(10 * day).unwrap();
        assert!(c == 2 && w.is_at(10 * day, t));
        assert_eq!(w.pop_due(51 * day - S), None);
        let (t, c) = w.pop_due(51 * day).unwrap();
        assert!(c == 3 && w.is_at(51 * day, t));
        // Times more than 49 days apart in one wheel (no forecast waits that long): the later
        // falls due early, at the last tick, and still names its flow.
        w.push(day, 4);
        w.push(60 * day, 5);
        assert_eq!(w.pop_due(day).map(|x| x.1), Some(4));
        let (t, c) = w.pop_due(55 * day).unwrap();
        assert!(c == 5 && w.is_at(60 * day, t));
    }

    #[test]
    fn a_rebuilt_wheel_holds_what_it_was_given() {
        let mut w = Wheel::default();
        for c in 0..10 {
            w.push(S, c);
        }
        w.rebuild([(5 * S, 7), (2 * S, 8)].into_iter());
        assert_eq!(w.len(), 2);
        assert_eq!(w.pop_due(10 * S).map(|x| x.1), Some(8));
        assert_eq!(w.pop_due(10 * S).map(|x| x.1), Some(7));
    }
}
