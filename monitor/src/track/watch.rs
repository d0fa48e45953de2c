//! Which sockets have their keepalive probes watched in the kernel (eBPF mode): the sockets the
//! keepalive remedy acts on, bounded. Plans the changes for the snapshot thread (which runs the
//! selection iterator in each socket's namespace) and keeps what it reported.
use std::collections::{HashMap, HashSet};

use crate::model::observe::NetnsId;

/// Sockets watched at most by default (the kernel map holds 4096).
pub const DEFAULT_MAX: usize = 1024;

pub use crate::model::probe::WatchOutcome;

#[derive(Debug, Default)]
pub struct WatchSet {
    /// The kernel can do it (eBPF mode, the self-test at load passed).
    pub enabled: bool,
    pub max: usize,
    /// Confirmed watched, with their namespace.
    pub watching: HashMap<u64, NetnsId>,
    /// Asked for, not yet confirmed (watch) or released (release).
    asked: HashSet<u64>,
    /// Refused by the kernel: reported once, never asked again.
    pub refused: HashMap<u64, String>,
    /// Sockets found flagged at the last census, per namespace, and the stray ones among them.
    pub census: HashMap<NetnsId, (usize, usize)>,
    /// Desired sockets left out because of `max` at the last plan.
    pub over_max: usize,
    /// The last watched socket closed: one empty plan lets the loader detach what only
    /// watched sockets need.
    tidy: bool,
}

/// What to ask of the kernel: (cookie, namespace) to watch and to release.
pub type Plan = (Vec<(u64, NetnsId)>, Vec<(u64, NetnsId)>);

impl WatchSet {
    pub fn new(enabled: bool) -> Self {
        WatchSet {
            enabled,
            max: DEFAULT_MAX,
            ..Default::default()
        }
    }

    /// The changes that bring the kernel to `want` (cookie, namespace), at most `max` sockets.
    /// None when nothing changes (or a previous plan is still in flight for those sockets).
    pub fn plan(&mut self, want: &[(u64, NetnsId)]) -> Option<Plan> {
        if !self.enabled {
            return None;
        }
        let mut keep: HashSet<u64> = HashSet::with_capacity(want.len());
        let mut on = Vec::new();
        let mut over = 0;
        for &(c, ns) in want {
            if self.refused.contains_key(&c) {
                continue;
            }
            if keep.len() >= self.max {
                over += 1;
                continue;
            }
            keep.insert(c);
            if !self.watching.contains_key(&c) && self.asked.insert(c) {
                on.push((c, ns));
            }
        }
        self.over_max = over;
        if std::mem::take(&mut self.tidy) && on.is_empty() && self.watching.is_empty() {
            return Some((on, Vec::new()));
        }
        let off: Vec<(u64, NetnsId)> = self
            .watching
            .iter()
            .filter(|(c, _)| !keep.contains(*c))
            .map(|(c, ns)| (*c, *ns))
            .filter(|(c, _)| self.asked.insert(*c))
            .collect();
        (!on.is_empty() || !off.is_empty()).then_some((on, off))
    }

    /// Records a report; returns the refusals that are new (to log once).
    pub fn apply(&mut self, r: &WatchOutcome) -> Vec<(u64, String)> {
        for c in &r.watching {
            self.asked.remove(c);
            self.watching.insert(*c, r.netns);
        }
        for c in &r.released {
            self.asked.remove(c);
            self.watching.remove(c);
        }
        let mut new = Vec::new();
        for (c, why) in &r.failed {
            self.asked.remove(c);
            self.watching.remove(c);
            if !why.contains("gone") && self.refused.insert(*c, why.clone()).is_none() {
                new.push((*c, why.clone()));
            }
        }
        self.census.insert(r.netns, (r.flagged, r.stray));
        new
    }

    /// A socket closed: its flag went with it.
    pub fn forget(&mut self, cookie: u64) -> bool {
        self.asked.remove(&cookie);
        self.refused.remove(&cookie);
        let was = self.watching.remove(&cookie).is_some();
        if was && self.watching.is_empty() {
            self.tidy = true;
        }
        was
    }

    /// Words for `status`.
    pub fn describe(&self) -> String {
        if !self.enabled {
            return "off".into();
        }
        let (flagged, stray) = self.census.values().fold((0, 0), |(a, b), (f, s)| (a + f, b + s));
        let mut s = format!(
            "{} socket(s) watched (at most {}); {flagged} flagged at the last census, {stray} stray",
            self.watching.len(),
            self.max
        );
        if !self.refused.is_empty() {
            s.push_str(&format!("; {} refused by the kernel", self.refused.len()));
        }
        if self.over_max > 0 {
            s.push_str(&format!("; {} left unwatched over the limit", self.over_max));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_only_changes_and_never_retries_a_refusal() {
        let mut w = WatchSet::new(true);
        w.max = 2;
        let (on, off) = w.plan(&[(1, 7), (2, 7), (3, 7)]).unwrap();
        assert_eq!(on, vec![(1, 7), (2, 7)]);
        assert!(off.is_empty());
        assert_eq!(w.over_max, 1);
        assert!(w.plan(&[(1, 7), (2, 7)]).is_none(), "in flight: not asked twice");
        let fresh = w.apply(&WatchOutcome {
            netns: 7,
            watching: vec![1],
            failed: vec![(2, "errno 22".into())],
            flagged: 1,
            ..Default::default()
        });
        assert_eq!(fresh.len(), 1);
        assert!(w.plan(&[(1, 7), (2, 7)]).is_none(), "refused: never retried");
        let (on, off) = w.plan(&[]).unwrap();
        assert!(on.is_empty());
        assert_eq!(off, vec![(1, 7)]);
        w.apply(&WatchOutcome {
            netns: 7,
            released: vec![1],
            ..Default::default()
        });
        assert!(w.watching.is_empty());
        assert!(!WatchSet::new(false).describe().is_empty());
    }
}
