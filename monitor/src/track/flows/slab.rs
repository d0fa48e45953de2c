//! The flows themselves: a dense vector of flows and an index from cookie to position.
//!
//! A hash map of flows keeps every entry in a bucket array sized to the next power of two at
//! most 7/8 full, and every bucket is touched: at 200k flows, 262 144 buckets of a 256-byte
//! flow, about 340 bytes per flow before any other structure. Here the flows sit packed in a
//! `Vec` (its unused capacity is never written, so it costs address space, not memory) and the
//! index holds a 4-byte position per bucket: about 7 bytes per flow at that size. Removal
//! moves the last flow into the hole, so positions are not stable: callers hold cookies.
//! Iteration walks the vector in memory order (faster than a bucket walk).
use foldhash::fast::RandomState;
use hashbrown::HashTable;
use std::hash::BuildHasher;

use crate::model::flow::Flow;

pub struct FlowSlab {
    flows: Vec<Flow>,
    /// Positions in `flows`, hashed by the cookie of the flow there.
    index: HashTable<u32>,
    hasher: RandomState,
}

impl Default for FlowSlab {
    fn default() -> Self {
        FlowSlab {
            flows: Vec::new(),
            index: HashTable::new(),
            // Cookies are the kernel's, not a client's: foldhash, not SipHash (see
            // `kernel::owners`).
            hasher: RandomState::default(),
        }
    }
}

impl FlowSlab {
    fn hash(&self, cookie: u64) -> u64 {
        self.hasher.hash_one(cookie)
    }

    fn position(&self, cookie: u64) -> Option<usize> {
        let flows = &self.flows;
        self.index
            .find(self.hash(cookie), |&i| flows[i as usize].cookie == cookie)
            .map(|&i| i as usize)
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn contains_key(&self, cookie: u64) -> bool {
        self.position(cookie).is_some()
    }

    pub fn get(&self, cookie: u64) -> Option<&Flow> {
        self.position(cookie).map(|i| &self.flows[i])
    }

    pub fn get_mut(&mut self, cookie: u64) -> Option<&mut Flow> {
        self.position(cookie).map(|i| &mut self.flows[i])
    }

    /// The flow of `cookie`, made by `make` (which must give it that cookie) if there is none.
    pub fn or_insert_with(&mut self, cookie: u64, make: impl FnOnce() -> Flow) -> &mut Flow {
        if let Some(i) = self.position(cookie) {
            return &mut self.flows[i];
        }
        let flow = make();
        debug_assert_eq!(flow.cookie, cookie);
        // More than 4 billion flows would take a terabyte: not reachable (the kernel's own
        // limits on sockets come first).
        let at = u32::try_from(self.flows.len()).expect("fewer than 2^32 flows");
        self.flows.push(flow);
        let (flows, hasher) = (&self.flows, &self.hasher);
        self.index.insert_unique(hasher.hash_one(cookie), at, |&i| {
            hasher.hash_one(flows[i as usize].cookie)
        });
        &mut self.flows[at as usize]
    }

    /// The position of `cookie`'s flow (until a removal moves it: `remove`).
    pub fn index_of(&self, cookie: u64) -> Option<u32> {
        self.position(cookie).map(|i| i as u32)
    }

    pub fn at(&self, pos: u32) -> Option<&Flow> {
        self.flows.get(pos as usize)
    }

    pub fn at_mut(&mut self, pos: u32) -> Option<&mut Flow> {
        self.flows.get_mut(pos as usize)
    }

    /// Removes `cookie`'s flow; the last flow moves into its place, whose new position is
    /// returned with it (None when the removed flow was the last). The ledger counts a close only
    /// through the removed flow's tally: `FlowTable::close`, the one caller, hands it over; a new
    /// removal path must do the same, or the session stays counted open.
    pub fn remove(&mut self, cookie: u64) -> Option<(Flow, Option<u32>)> {
        let hash = self.hash(cookie);
        let flows = &self.flows;
        let entry = self
            .index
            .find_entry(hash, |&i| flows[i as usize].cookie == cookie)
            .ok()?;
        let (at, _) = entry.remove();
        let at = at as usize;
        let last = self.flows.len() - 1;
        let moved_to = (at != last).then_some(at as u32);
        if at != last {
            // The last flow moves into the hole: its index entry follows it.
            let moved = self.flows[last].cookie;
            let flows = &self.flows;
            if let Some(i) = self.index.find_mut(self.hasher.hash_one(moved), |&i| {
                flows[i as usize].cookie == moved
            }) {
                *i = at as u32;
            }
        }
        Some((self.flows.swap_remove(at), moved_to))
    }

    pub fn values(&self) -> std::slice::Iter<'_, Flow> {
        self.flows.iter()
    }

    pub fn values_mut(&mut self) -> std::slice::IterMut<'_, Flow> {
        self.flows.iter_mut()
    }

    /// Room for this many flows without growing (the vector's and the index's, the smaller).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.flows.capacity().min(self.index.capacity())
    }

    /// Gives back memory when far fewer flows remain than there was room for (after a storm).
    /// Returns true when it did.
    pub fn shrink_if_sparse(&mut self) -> bool {
        if self.flows.capacity() <= 4 * self.flows.len() + 4096 {
            return false;
        }
        self.flows.shrink_to_fit();
        let (flows, hasher) = (&self.flows, &self.hasher);
        self.index
            .shrink_to_fit(|&i| hasher.hash_one(flows[i as usize].cookie));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(cookie: u64) -> Flow {
        let a = "127.0.0.1:1".parse().unwrap();
        Flow::new(cookie, 1, a, a, monitor_common::tcp_state::ESTABLISHED, 0)
    }

    /// Inserts and removes in an order that moves flows around, checking against a model.
    #[test]
    fn finds_every_flow_after_removals_move_others() {
        let mut slab = FlowSlab::default();
        let mut model = std::collections::BTreeSet::new();
        for c in 1..=5000u64 {
            slab.or_insert_with(c * 7919, || flow(c * 7919));
            model.insert(c * 7919);
        }
        // Remove every third, from the front (each removal moves the last flow).
        for c in (1..=5000u64).step_by(3) {
            let last = slab.values().last().map(|f| f.cookie);
            let (gone, moved_to) = slab.remove(c * 7919).unwrap();
            assert_eq!(gone.cookie, c * 7919);
            model.remove(&(c * 7919));
            // The flow that moved is where the removal says.
            if let Some(p) = moved_to {
                assert_eq!(slab.at(p).map(|f| f.cookie), last);
                assert_eq!(slab.index_of(last.unwrap()), Some(p));
            } else {
                assert_eq!(last, Some(c * 7919), "only the last flow moves nothing");
            }
            assert!(slab.remove(c * 7919).is_none());
        }
        assert_eq!(slab.len(), model.len());
        for c in 1..=5000u64 {
            assert_eq!(
                slab.get(c * 7919).is_some(),
                model.contains(&(c * 7919)),
                "cookie {}",
                c * 7919
            );
        }
        // An existing flow is returned, not replaced.
        slab.get_mut(2 * 7919).unwrap().uid = 42;
        assert_eq!(slab.or_insert_with(2 * 7919, || flow(2 * 7919)).uid, 42);
        let mut seen: Vec<u64> = slab.values().map(|f| f.cookie).collect();
        seen.sort_unstable();
        assert_eq!(seen, model.iter().copied().collect::<Vec<_>>());
        // Emptied, then shrunk: still consistent.
        for c in model.clone() {
            slab.remove(c);
        }
        assert!(slab.is_empty());
        assert!(slab.shrink_if_sparse());
        slab.or_insert_with(3, || flow(3));
        assert_eq!(slab.get(3).map(|f| f.cookie), Some(3));
    }
}
