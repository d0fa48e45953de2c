//! The close remedy (opt-in): aborts only sockets proven dead (half-open, or stuck closing) that
//! carried no data recently, through SOCK_DESTROY in the socket's namespace; then checks from the
//! owner's side whether the slot really came back (the owner released its descriptor).
use std::collections::{HashMap, HashSet};

use super::{RateLimit, record};
use crate::config::{LeaksSection, ServiceConfig};
use crate::detect::leaks::{Candidate, service_of};
use crate::findings::{Change, FindingStore};
use crate::kernel::{procfs, sys};
use crate::model::finding::{
    ActionRecord, ActionValues, FindingId, Outcome, OutcomeStatus, RemedyAction, RemedyMode,
};
use crate::model::flow::Flow;
use crate::model::observe::state_name;
use crate::model::time::{Nanos, SEC, fmt_ms, ms};

/// Closes per minute, across all processes.
const CLOSES_PER_MINUTE: usize = 600;

/// Aborts one socket (SOCK_DESTROY over sock_diag in the agent).
pub trait Closer {
    fn close(&mut self, f: &Flow) -> Result<&'static str, String>;
}

/// Whether `pid` still holds socket `inode` (the owner's side of a close).
pub trait Holders {
    fn holds(&mut self, pid: u32, inode: u64) -> Option<bool>;
}

/// The live /proc: a process that is gone holds nothing.
pub struct LiveHolders;

impl Holders for LiveHolders {
    fn holds(&mut self, pid: u32, inode: u64) -> Option<bool> {
        if procfs::read_stat(pid).is_none() {
            return Some(false);
        }
        Some(procfs::fd_of(pid, inode).is_some())
    }
}

/// Aborts sockets through sock_diag SOCK_DESTROY in the flow's namespace; without
/// CONFIG_INET_DIAG_DESTROY, shuts the socket down through a pidfd duplicate (re-checked to be
/// the same socket) so that the owner sees EOF / EPIPE.
pub struct SockDiagCloser<'a> {
    /// Runs a sock_diag request in a namespace.
    pub destroy: &'a mut dyn FnMut(&Flow) -> std::io::Result<()>,
}

impl Closer for SockDiagCloser<'_> {
    fn close(&mut self, f: &Flow) -> Result<&'static str, String> {
        match (self.destroy)(f) {
            Ok(()) => Ok("SOCK_DESTROY"),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let pid = f
                    .owner
                    .as_ref()
                    .map(|o| o.pid)
                    .ok_or("no SOCK_DESTROY in this kernel and the owner is unknown")?;
                let dup = sys::socket_of(pid, f.inode())?;
                sys::shutdown(std::os::fd::AsFd::as_fd(&dup)).map_err(|e| format!("shutdown: {e}"))?;
                Ok("pidfd + shutdown (no SOCK_DESTROY in this kernel)")
            }
            Err(e) => Err(format!("SOCK_DESTROY: {e}")),
        }
    }
}

/// A close whose effect on the owner is not known yet.
#[derive(Clone, Debug)]
struct Release {
    finding: FindingId,
    cookie: u64,
    pid: u32,
    inode: u64,
    fd: Option<i32>,
    via: &'static str,
    at: Nanos,
    deadline: Nanos,
}

#[derive(Default)]
pub struct CloseRemedy {
    closed: HashSet<u64>,
    planned: HashSet<u64>,
    waiting: Vec<Release>,
    /// Cookie -> (pid, fd, socket inode) of closes the owner never released: their slot is still taken.
    unreleased: HashMap<u64, (u32, Option<i32>, u64)>,
    /// Cookie -> (service, pid, inode) of closes of a ledger service's sockets whose release is
    /// not known: the slot counts as taken until the owner is seen letting go.
    doubt: HashMap<u64, (String, u32, u64)>,
    limit: Option<RateLimit>,
}

fn mode_for(f: &Flow, cfg: &LeaksSection, services: &[ServiceConfig]) -> RemedyMode {
    let name = service_of(f, services);
    services
        .iter()
        .find(|s| Some(&s.name) == name.as_ref())
        .and_then(|s| s.close)
        .unwrap_or(cfg.close)
}

fn is_close_of(cookie: u64) -> impl Fn(&ActionRecord) -> bool {
    move |a| {
        a.action == RemedyAction::Close
            && matches!(a.before, Some(ActionValues::Socket { cookie: c, .. }) if c == cookie)
    }
}

impl CloseRemedy {
    /// Considers each candidate: only quiet ones, each once, within the rate limit.
    #[allow(clippy::too_many_arguments)]
    pub fn consider(
        &mut self,
        now: Nanos,
        candidates: &[Candidate],
        flow: &dyn Fn(u64) -> Option<Flow>,
        cfg: &LeaksSection,
        services: &[ServiceConfig],
        closer: &mut dyn Closer,
        store: &mut FindingStore,
    ) -> Vec<Change> {
        let mut out = Vec::new();
        for c in candidates {
            let Some(f) = flow(c.cookie) else { continue };
            let mode = mode_for(&f, cfg, services);
            if mode == RemedyMode::Off || self.closed.contains(&c.cookie) {
                continue;
            }
            let Some(finding) = store.id_of(&c.key) else {
                continue;
            };
            let v = f.view(now, None);
            let quiet = v
                .last_data_sent_ms
                .unwrap_or(u64::MAX)
                .min(v.last_data_recv_ms.unwrap_or(u64::MAX));
            if quiet < cfg.quiet_for.as_millis() as u64 {
                continue;
            }
            let before = Some(ActionValues::Socket {
                cookie: f.cookie,
                local: f.local().addr(),
                remote: f.remote().addr(),
                state: state_name(f.state).to_string(),
                evidence: c.evidence.clone(),
                quiet_ms: quiet,
            });
            let rec = if mode == RemedyMode::DryRun {
                if !self.planned.insert(c.cookie) {
                    continue;
                }
                record(
                    now,
                    RemedyAction::Close,
                    mode,
                    OutcomeStatus::Planned,
                    format!(
                        "planned: abort {} → {} (dry-run, socket untouched)",
                        f.local(),
                        f.remote()
                    ),
                    before,
                    None,
                )
            } else {
                if !self
                    .limit
                    .get_or_insert_with(|| RateLimit::new(CLOSES_PER_MINUTE, 60 * SEC))
                    .take(now)
                {
                    continue;
                }
                self.closed.insert(c.cookie);
                match closer.close(&f) {
                    Ok(via) => {
                        let owner = f.owner.as_ref().map(|o| o.pid);
                        let text = match owner {
                            Some(pid) => {
                                let fd = procfs::fd_of(pid, f.inode());
                                if let Some(svc) = service_of(&f, services) {
                                    self.doubt.insert(f.cookie, (svc, pid, f.inode()));
                                }
                                self.waiting.push(Release {
                                    finding,
                                    cookie: f.cookie,
                                    pid,
                                    inode: f.inode(),
                                    fd,
                                    via,
                                    at: now,
                                    deadline: now + cfg.release_grace.as_nanos() as u64,
                                });
                                format!(
                                    "socket aborted via {via}; waiting up to {} for pid {pid} to release fd {}",
                                    fmt_ms(cfg.release_grace.as_millis() as u64),
                                    fd.map_or("?".into(), |d| d.to_string())
                                )
                            }
                            None => format!(
                                "socket aborted via {via}; its owner is unknown, so the release cannot be checked"
                            ),
                        };
                        record(
                            now,
                            RemedyAction::Close,
                            mode,
                            OutcomeStatus::Pending,
                            text,
                            before,
                            Some(ActionValues::SocketState {
                                state: "CLOSE".into(),
                            }),
                        )
                    }
                    Err(e) => record(
                        now,
                        RemedyAction::Close,
                        mode,
                        OutcomeStatus::Failed,
                        format!("failed: {e}; not retried"),
                        before,
                        None,
                    ),
                }
            };
            if let Some(ch) = store.act(finding, rec) {
                out.push(ch);
            }
        }
        out
    }

    /// Checks aborted sockets from the owner's side: released within the grace period, or still
    /// held (the slot is not free).
    pub fn verify(&mut self, now: Nanos, holders: &mut dyn Holders, store: &mut FindingStore) -> Vec<Change> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for r in std::mem::take(&mut self.waiting) {
            let held = holders.holds(r.pid, r.inode);
            let fd = r.fd.map_or("?".into(), |d| d.to_string());
            let outcome = match held {
                Some(false) => {
                    self.doubt.remove(&r.cookie);
                    Outcome::new(
                        OutcomeStatus::Succeeded,
                        format!("closed via {}; pid {} released fd {fd}", r.via, r.pid),
                    )
                }
                Some(true) | None if now >= r.deadline => {
                    self.unreleased.insert(r.cookie, (r.pid, r.fd, r.inode));
                    Outcome::new(
                        OutcomeStatus::Ineffective,
                        format!(
                            "socket aborted via {}, but pid {} still holds fd {fd} after {}: its slot is not free; the program must close it or be restarted",
                            r.via,
                            r.pid,
                            fmt_ms(ms(now.saturating_sub(r.at)))
                        ),
                    )
                }
                _ => {
                    keep.push(r);
                    continue;
                }
            };
            if let Some(c) = store.amend_where(r.finding, is_close_of(r.cookie), |a| a.outcome = outcome) {
                out.push(c);
            }
        }
        self.waiting = keep;
        out
    }

    /// The processes of closes waiting for their release or not released.
    pub fn owners(&self) -> Vec<u32> {
        self.waiting
            .iter()
            .map(|r| r.pid)
            .chain(self.unreleased.values().map(|(p, _, _)| *p))
            .collect()
    }

    /// Closes of ledger services' sockets whose owner has not been seen releasing them:
    /// (service, pid, socket inode). The ledger counts them as held until it knows better.
    pub fn not_yet_released(&self) -> impl Iterator<Item = (&str, u32, u64)> {
        self.doubt.values().map(|(s, p, i)| (s.as_str(), *p, *i))
    }

    /// Whether holdfast aborted this socket (until the flow is forgotten).
    pub fn did_close(&self, cookie: u64) -> bool {
        self.closed.contains(&cookie)
    }

    /// Closes still waiting for the owner's release.
    pub fn pending(&self) -> usize {
        self.waiting.len()
    }

    /// Whether a close of this flow was not released by its owner.
    pub fn unreleased(&self, cookie: u64) -> Option<(u32, Option<i32>)> {
        self.unreleased.get(&cookie).map(|(p, fd, _)| (*p, *fd))
    }

    /// Forgets closed cookies (their sockets are gone from the tables); an unreleased close is
    /// remembered until its owner lets go of the descriptor (`release`).
    pub fn forget(&mut self, cookie: u64) {
        self.planned.remove(&cookie);
        if !self.unreleased.contains_key(&cookie) && !self.waiting.iter().any(|r| r.cookie == cookie) {
            self.closed.remove(&cookie);
        }
    }

    /// Forgets closes of flows no longer tracked, except those still waiting for their owner or
    /// unreleased.
    pub fn retain(&mut self, live: &HashSet<u64>) {
        let waiting: HashSet<u64> = self.waiting.iter().map(|r| r.cookie).collect();
        let unreleased = &self.unreleased;
        self.closed
            .retain(|c| live.contains(c) || waiting.contains(c) || unreleased.contains_key(c));
        self.planned.retain(|c| live.contains(c));
    }

    /// Releases the unreleased closes whose owner has let go of the descriptor (closed it,
    /// exited, or was restarted). `sockets(pid)` is the socket inodes the process holds, None
    /// when it is gone; called once per owner with unreleased closes.
    pub fn settle(&mut self, sockets: &mut dyn FnMut(u32) -> Option<HashSet<u64>>) {
        if self.unreleased.is_empty() {
            return;
        }
        let mut by_pid: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        for (cookie, (pid, _, inode)) in &self.unreleased {
            by_pid.entry(*pid).or_default().push((*cookie, *inode));
        }
        for (pid, socks) in by_pid {
            let held = sockets(pid);
            for (cookie, inode) in socks {
                if held.as_ref().is_none_or(|h| !h.contains(&inode)) {
                    self.release(cookie);
                }
            }
        }
    }

    /// The owner finally released an unreleased close.
    pub fn release(&mut self, cookie: u64) {
        self.unreleased.remove(&cookie);
        self.doubt.remove(&cookie);
        self.closed.remove(&cookie);
    }
}

#[cfg(test)]
mod tests;
