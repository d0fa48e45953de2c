//! Detectors: pure judges of the tracked state. Each takes the clock, the state and the policy
//! (and an [`Env`] for the few host facts it needs) and returns verdicts for the finding store;
//! none of them acts. Unit tests drive them with a fake clock and a fake host.
pub mod discover;
pub mod eviction;
pub mod held;
pub mod leaks;
pub mod ledger;
pub mod zombies;

use std::net::IpAddr;

use crate::model::eviction::{NetFacts, RoutePath};
use crate::model::observe::NetnsId;

/// What a judgement needs from the host beyond the flow itself, per network namespace.
pub trait Env {
    /// The path to `dst` from namespace `netns`.
    fn route(&mut self, netns: NetnsId, dst: IpAddr) -> RoutePath;
    /// The namespace's sysctls that forecasts depend on.
    fn facts(&self, netns: NetnsId) -> NetFacts;
    /// The namespace in words (`ip netns` name, container, pod, `net:[inode]`); None if unknown (0).
    fn netns_name(&self, netns: NetnsId) -> Option<String>;
    /// The idle timeout learnt for the path from `netns` via `gateway` to `dst`, with the
    /// evidence in words (see track::paths); None when nothing is learnt.
    fn learned(&self, _netns: NetnsId, _gateway: &str, _dst: IpAddr) -> Option<(u64, String)> {
        None
    }
}

/// A fixed host for unit tests: every destination via one gateway, default sysctls.
#[cfg(test)]
pub struct FakeEnv {
    pub path: RoutePath,
    pub facts: NetFacts,
}

#[cfg(test)]
impl Default for FakeEnv {
    fn default() -> Self {
        FakeEnv {
            path: RoutePath::Gateway("10.77.1.1".into()),
            facts: NetFacts::default(),
        }
    }
}

#[cfg(test)]
impl Env for FakeEnv {
    fn route(&mut self, _: NetnsId, _: IpAddr) -> RoutePath {
        self.path.clone()
    }
    fn facts(&self, _: NetnsId) -> NetFacts {
        self.facts
    }
    fn netns_name(&self, netns: NetnsId) -> Option<String> {
        (netns != 0).then(|| format!("net:[{netns}]"))
    }
}
