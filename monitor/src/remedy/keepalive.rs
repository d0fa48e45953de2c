//! The keepalive remedy: turns on TCP keepalive, with values below the flow's idle timeout, on the
//! live socket of a running program (in the kernel through the tcp iterator, or through a pidfd
//! duplicate of the owner's descriptor), and follows it until its effect is seen.
use std::collections::HashMap;

use super::{RateLimit, record};
use crate::config::KeepaliveSection;
pub use crate::config::policy::plan;
use crate::findings::{Change, FindingStore, Key};
use crate::kernel::sys;
use crate::model::eviction::{Assessment, KaRequest, KaResult, KaValues};
use crate::model::finding::{ActionValues, FindingId, OutcomeStatus, RemedyAction, RemedyMode};
use crate::model::flow::Flow;
use crate::model::time::{Nanos, SEC, fmt_ms};

/// Keepalive changes per minute, across all flows.
const CHANGES_PER_MINUTE: usize = 600;

fn values(x: Option<(bool, KaValues)>) -> Option<ActionValues> {
    x.map(|(on, v)| ActionValues::Keepalive {
        so_keepalive: on,
        idle_s: v.idle_s,
        intvl_s: v.intvl_s,
        cnt: v.cnt,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Dry-run: the plan was reported.
    Planned,
    /// Not possible (values cannot refresh in time): reported once.
    Impossible,
    /// Sent to the executor, no result yet.
    Sent,
    /// Set on the socket; its effect not yet seen.
    Applied,
    /// Seen on and armed in a sample; waiting for a probe to be answered (probes watched).
    Armed,
    /// The effect was seen: a probe answered (probes watched), or keepalive armed (otherwise).
    Verified,
    /// The executor failed or was refused: reported once, never retried.
    Failed,
}

#[derive(Clone, Debug)]
struct Job {
    finding: FindingId,
    values: KaValues,
    at: Nanos,
    /// When the change was asked for (before the executor ran): probes and answers after it
    /// are its effect.
    requested: Nanos,
    stage: Stage,
    /// Idle and timeout when it was applied (the margin achieved).
    idle_ms: u64,
    timeout_ms: u64,
}

/// What the keepalive remedy is doing, per flow cookie.
#[derive(Default)]
pub struct KeepaliveRemedy {
    jobs: HashMap<u64, Job>,
    /// Poll mode's keepalive-at-first-sight for the configured cgroups (cookies already done).
    prevented: std::collections::HashSet<u64>,
    limit: Option<RateLimit>,
    /// Keepalive probes and their answers are seen on the wire (eBPF mode, probe watch
    /// available): a remedy is verified by an answered probe, not by an armed timer.
    pub wire: bool,
}

impl KeepaliveRemedy {
    /// Whether the remedy follows this flow (the detector then always assesses it).
    pub fn watches(&self, cookie: u64) -> bool {
        self.jobs
            .get(&cookie)
            .is_some_and(|j| matches!(j.stage, Stage::Sent | Stage::Applied | Stage::Armed))
    }

    /// The flows whose keepalive was set and whose effect is not yet seen.
    pub fn watched(&self) -> Vec<u64> {
        self.jobs
            .iter()
            .filter(|(_, j)| matches!(j.stage, Stage::Sent | Stage::Applied | Stage::Armed))
            .map(|(c, _)| *c)
            .collect()
    }

    /// The sockets whose probes should be watched on the wire: every socket this remedy set
    /// keepalive on (until it closes), oldest first.
    pub fn wire_wanted(&self) -> Vec<u64> {
        let mut v: Vec<(Nanos, u64)> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                matches!(
                    j.stage,
                    Stage::Sent | Stage::Applied | Stage::Armed | Stage::Verified
                )
            })
            .map(|(c, j)| (j.at, *c))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// While probes are watched, a finding this remedy acted on stays open until a probe is
    /// answered (or the flow carries traffic again): true while that wait lasts.
    pub fn awaiting_answer(&self, cookie: u64) -> bool {
        self.wire
            && self
                .jobs
                .get(&cookie)
                .is_some_and(|j| matches!(j.stage, Stage::Sent | Stage::Applied | Stage::Armed))
    }

    /// Acts on flows at risk: plans (dry-run), or asks the executor to set keepalive (enforce).
    pub fn consider(
        &mut self,
        now: Nanos,
        key: &Key,
        a: &Assessment,
        f: &Flow,
        k: &KeepaliveSection,
        store: &mut FindingStore,
    ) -> (Option<Change>, Option<KaRequest>) {
        let Some(app) = a.applicable.as_ref() else {
            return (None, None);
        };
        let Some(finding) = store.id_of(key) else {
            return (None, None);
        };
        if app.keepalive_mode == RemedyMode::Off || self.jobs.contains_key(&f.cookie) {
            return (None, None);
        }
        let before = Some(ActionValues::Keepalive {
            so_keepalive: a.keepalive.on == Some(true),
            idle_s: a.keepalive.values.idle_s,
            intvl_s: a.keepalive.values.intvl_s,
            cnt: a.keepalive.values.cnt,
        });
        let job = |stage, values| Job {
            finding,
            values,
            at: now,
            requested: now,
            stage,
            idle_ms: a.idle_ms,
            timeout_ms: app.timeout_s * 1000,
        };
        let v = match plan(app.timeout_s, k) {
            Ok(v) => v,
            Err(e) => {
                self.jobs.insert(
                    f.cookie,
                    job(
                        Stage::Impossible,
                        KaValues {
                            idle_s: 0,
                            intvl_s: 0,
                            cnt: 0,
                        },
                    ),
                );
                let r = record(
                    now,
                    RemedyAction::Keepalive,
                    app.keepalive_mode,
                    OutcomeStatus::Failed,
                    format!("not possible: {e}"),
                    before,
                    None,
                );
                return (store.act(finding, r), None);
            }
        };
        let after = Some(ActionValues::Keepalive {
            so_keepalive: true,
            idle_s: v.idle_s,
            intvl_s: v.intvl_s,
            cnt: v.cnt,
        });
        if app.keepalive_mode == RemedyMode::DryRun {
            self.jobs.insert(f.cookie, job(Stage::Planned, v));
            let r = record(
                now,
                RemedyAction::Keepalive,
                RemedyMode::DryRun,
                OutcomeStatus::Planned,
                format!(
                    "planned: SO_KEEPALIVE=1 TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={} (dry-run, socket untouched)",
                    v.idle_s, v.intvl_s, v.cnt
                ),
                before,
                after,
            );
            return (store.act(finding, r), None);
        }
        if !self
            .limit
            .get_or_insert_with(|| RateLimit::new(CHANGES_PER_MINUTE, 60 * SEC))
            .take(now)
        {
            return (None, None);
        }
        self.jobs.insert(f.cookie, job(Stage::Sent, v));
        let mut req = request(f, Some(v));
        req.watch = self.wire;
        (None, Some(req))
    }

    /// A manual `holdfast remedy keepalive`: always sent (an operator asked), recorded on `finding`.
    pub fn manual(
        &mut self,
        now: Nanos,
        f: &Flow,
        v: KaValues,
        finding: FindingId,
        a: &Assessment,
    ) -> KaRequest {
        let timeout_ms = a.applicable.as_ref().map_or(0, |x| x.timeout_s * 1000);
        self.jobs.insert(
            f.cookie,
            Job {
                finding,
                values: v,
                at: now,
                requested: now,
                stage: Stage::Sent,
                idle_ms: a.idle_ms,
                timeout_ms,
            },
        );
        let mut req = request(f, Some(v));
        req.watch = self.wire;
        req
    }

    /// Records what an executor did.
    pub fn on_result(&mut self, r: &KaResult, now: Nanos, store: &mut FindingStore) -> Option<Change> {
        let job = self.jobs.get_mut(&r.cookie)?;
        if job.stage != Stage::Sent {
            return None;
        }
        let (status, text) = match &r.error {
            Some(e) => {
                job.stage = Stage::Failed;
                (
                    OutcomeStatus::Failed,
                    format!("failed via {}: {e}; not retried", r.via),
                )
            }
            None => {
                job.stage = Stage::Applied;
                job.at = now;
                let margin = job.timeout_ms.saturating_sub(job.idle_ms);
                (
                    OutcomeStatus::Pending,
                    format!(
                        "applied via {}: TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={} at idle {} of the {} timeout ({} before eviction); waiting to see it armed",
                        r.via,
                        job.values.idle_s,
                        job.values.intvl_s,
                        job.values.cnt,
                        fmt_ms(job.idle_ms),
                        fmt_ms(job.timeout_ms),
                        fmt_ms(margin)
                    ),
                )
            }
        };
        store.act(
            job.finding,
            record(
                now,
                RemedyAction::Keepalive,
                RemedyMode::Enforce,
                status,
                text,
                values(r.before),
                values(r.after),
            ),
        )
    }

    /// After an apply, a newer sample must show keepalive on and its timer (or a probe) armed.
    /// With probes watched, the remedy is verified only by an answered probe (or by traffic the
    /// peer acknowledged after the change); an unanswered one says so.
    pub fn verify(
        &mut self,
        now: Nanos,
        f: &Flow,
        a: Option<&Assessment>,
        store: &mut FindingStore,
    ) -> Option<Change> {
        let wire = self.wire;
        let job = self.jobs.get_mut(&f.cookie)?;
        // A probe seen leaving after the change proves keepalive on and armed.
        let probed = wire
            && f.wire()
                .is_some_and(|w| w.sent > 0 && w.last_sent >= job.requested);
        match job.stage {
            Stage::Applied if probed => {}
            // A sample aged by a filtered read carries the values from before the change.
            Stage::Applied if f.tcp_at > job.at && !f.sample_aged() => {}
            Stage::Armed => return verify_on_wire(job, now, f, store),
            _ => return None,
        }
        let t = f.tcp.as_ref()?;
        let on = probed || a.is_some_and(|a| a.keepalive.on == Some(true)) || t.keepalive == Some(true);
        let armed = probed
            || on
                && matches!(
                    t.timer,
                    crate::model::observe::Timer::Keepalive | crate::model::observe::Timer::None
                );
        let refresh = job.values.refresh_s();
        if armed && wire {
            job.stage = Stage::Armed;
            let ch = store.amend_action(job.finding, RemedyAction::Keepalive, |act| {
                act.outcome = crate::model::finding::Outcome::new(
                    OutcomeStatus::Pending,
                    format!(
                        "{}; armed (a probe every {} once the flow idles): waiting for the first probe to be answered",
                        base_text(&act.outcome.text),
                        fmt_ms(u64::from(refresh) * 1000)
                    ),
                );
            });
            // An answer may already be in.
            return verify_on_wire(job, now, f, store).or(ch);
        }
        // Not seen on: the failure is reported once and the finding stays with the detector.
        job.stage = if armed { Stage::Verified } else { Stage::Failed };
        store.amend_action(job.finding, RemedyAction::Keepalive, |act| {
            let base = base_text(&act.outcome.text);
            act.outcome = if armed {
                crate::model::finding::Outcome::new(
                    OutcomeStatus::Succeeded,
                    format!(
                        "{base}; verified: keepalive on and armed, a probe every {} once the flow idles (probes on the wire are not visible in this mode)",
                        fmt_ms(u64::from(refresh) * 1000)
                    ),
                )
            } else {
                crate::model::finding::Outcome::new(
                    OutcomeStatus::Ineffective,
                    format!("{base}; NOT verified: the next sample shows keepalive off"),
                )
            };
        })
    }

    /// A flow this remedy acted on ended: the action says whether its effect was ever seen.
    pub fn on_closed(&mut self, f: &Flow, cause: &str, store: &mut FindingStore) -> Option<Change> {
        let job = self.jobs.get(&f.cookie)?;
        if job.stage == Stage::Verified {
            // It seemed to work, then the connection died with probes unanswered (on the wire,
            // or in the last sample's tcpi_probes): the peer stopped answering. Said on the
            // action and on the finding's resolution.
            let unanswered = f
                .wire()
                .map(|w| w.outstanding)
                .filter(|&n| n > 0)
                .or_else(|| f.tcp.as_ref().map(|t| u32::from(t.probes)).filter(|&n| n > 0))?;
            let finding = job.finding;
            let text = format!(
                "afterwards the connection ended ({cause}) with {unanswered} keepalive probe(s) unanswered: the peer stopped answering"
            );
            let ch = store.amend_action(finding, RemedyAction::Keepalive, |act| {
                act.outcome = crate::model::finding::Outcome::new(
                    OutcomeStatus::Ineffective,
                    format!("{}; {text}", act.outcome.text),
                );
            });
            return store.annotate_resolution(finding, &text).or(ch);
        }
        if !matches!(job.stage, Stage::Applied | Stage::Armed | Stage::Sent) {
            return None;
        }
        let finding = job.finding;
        let sent = f.wire().map_or(0, |w| w.sent);
        let text = if sent > 0 {
            format!(
                "the connection ended ({cause}) before any probe was answered: {sent} probe(s) sent, none answered"
            )
        } else {
            format!("the connection ended ({cause}) before the keepalive was seen working")
        };
        store.amend_action(finding, RemedyAction::Keepalive, |act| {
            act.outcome = crate::model::finding::Outcome::new(
                OutcomeStatus::Ineffective,
                format!("{}; {text}", base_text(&act.outcome.text)),
            );
        })
    }

    /// Why a finding on this flow no longer holds, if the remedy is the reason.
    pub fn resolution(&self, cookie: u64) -> Option<String> {
        let j = self.jobs.get(&cookie)?;
        match j.stage {
            Stage::Verified if self.wire => Some(format!(
                "keepalive verified on the wire (a probe answered, or traffic acknowledged): refreshed every {}",
                fmt_ms(u64::from(j.values.refresh_s()) * 1000)
            )),
            // Only what was seen: the socket's keepalive armed (probes are not watched here).
            Stage::Verified => Some(format!(
                "keepalive applied and seen armed: a probe every {} once the flow idles, in time for its timeout",
                fmt_ms(u64::from(j.values.refresh_s()) * 1000)
            )),
            Stage::Applied | Stage::Sent | Stage::Armed => {
                Some("keepalive applied; its effect is not yet seen".into())
            }
            _ => None,
        }
    }

    /// Poll mode's stand-in for keepalive-at-connect: flows of the configured cgroups get
    /// keepalive through a pidfd the first time they are seen established without it.
    pub fn preventive<'a>(
        &mut self,
        flows: impl Iterator<Item = &'a Flow>,
        cgroups: &[String],
        values: KaValues,
    ) -> Vec<KaRequest> {
        let mut out = Vec::new();
        for f in flows.filter(|f| f.state == monitor_common::tcp_state::ESTABLISHED) {
            let Some(cg) = f.owner.as_ref().and_then(|o| o.cgroup.as_ref()) else {
                continue;
            };
            let inside = cgroups.iter().any(|c| {
                let c = format!("/{}", c.trim_matches('/'));
                cg == &c || cg.starts_with(&format!("{c}/"))
            });
            if !inside
                || f.tcp.as_ref().and_then(|t| t.keepalive) != Some(false)
                || !self.prevented.insert(f.cookie)
            {
                continue;
            }
            out.push(request(f, Some(values)));
        }
        out
    }

    /// Forgets closed flows.
    pub fn forget(&mut self, cookie: u64) {
        self.jobs.remove(&cookie);
        self.prevented.remove(&cookie);
    }

    /// Forgets everything not in `live` (flows that vanished with their namespace).
    pub fn retain(&mut self, live: &std::collections::HashSet<u64>) {
        self.jobs.retain(|c, _| live.contains(c));
        self.prevented.retain(|c| live.contains(c));
    }
}

/// An outcome text without what was appended while waiting.
fn base_text(text: &str) -> String {
    let mut t = text;
    for cut in [
        "; waiting",
        "; armed",
        "; verified",
        "; NOT verified",
        "; the connection ended",
    ] {
        t = t.split(cut).next().unwrap_or("");
    }
    if let Some(i) = t.find(" probe(s) unanswered") {
        t = t[..i].rsplit_once("; ").map_or(t, |(a, _)| a);
    }
    t.to_string()
}

/// Armed and watched: verified by the first probe answered after the change, or by traffic the
/// peer acknowledged after it; unanswered probes are said (once per count).
fn verify_on_wire(job: &mut Job, now: Nanos, f: &Flow, store: &mut FindingStore) -> Option<Change> {
    let refresh = fmt_ms(u64::from(job.values.refresh_s()) * 1000);
    let at = job.requested;
    if let Some(w) = f.wire()
        && w.last_answer.is_some_and(|t| t > at)
    {
        job.stage = Stage::Verified;
        let idle = crate::model::time::ms(w.last_sent.saturating_sub(at));
        let rtt = crate::model::probe::rtt_words(w.last_rtt_us.unwrap_or(0));
        return store.amend_action(job.finding, RemedyAction::Keepalive, |act| {
            act.outcome = crate::model::finding::Outcome::new(
                OutcomeStatus::Succeeded,
                format!(
                    "{}; verified on the wire: a probe sent {} after the change was answered in {rtt}; refreshed every {refresh}",
                    base_text(&act.outcome.text),
                    fmt_ms(idle)
                ),
            );
        });
    }
    // Traffic the peer acknowledged after the change also proves the path open.
    if !f.sample_aged()
        && let Some((_, _, ack_ms)) = f.ages_ms(now)
        && ack_ms.saturating_mul(1_000_000) < now.saturating_sub(job.at)
        && f.wire().is_none_or(|w| w.outstanding == 0)
    {
        job.stage = Stage::Verified;
        return store.amend_action(job.finding, RemedyAction::Keepalive, |act| {
            act.outcome = crate::model::finding::Outcome::new(
                OutcomeStatus::Succeeded,
                format!(
                    "{}; verified: the peer acknowledged traffic after the change; refreshed every {refresh}",
                    base_text(&act.outcome.text)
                ),
            );
        });
    }
    let w = f.wire()?;
    let lost = w.unanswered(now);
    if lost == 0 {
        return None;
    }
    let since = fmt_ms(crate::model::time::ms(
        now.saturating_sub(w.streak_from.unwrap_or(now)),
    ));
    let text = |base: &str| {
        format!(
            "{base}; {lost} probe(s) unanswered, the first sent {since} ago: the peer or the path is not answering"
        )
    };
    let finding = job.finding;
    let current = store
        .get(finding)
        .and_then(|fd| {
            fd.actions
                .iter()
                .rev()
                .find(|a| a.action == RemedyAction::Keepalive)
        })
        .map(|a| a.outcome.text.clone())?;
    if current.contains(&format!("; {lost} probe(s) unanswered")) {
        return None;
    }
    store.amend_action(finding, RemedyAction::Keepalive, |act| {
        act.outcome = crate::model::finding::Outcome::new(
            OutcomeStatus::Ineffective,
            text(&base_text(&act.outcome.text)),
        );
    })
}

/// The executor request for a flow.
pub fn request(f: &Flow, set: Option<KaValues>) -> KaRequest {
    KaRequest {
        cookie: f.cookie,
        netns: f.netns,
        inode: f.inode(),
        pid: f.pid_comm().map(|(p, _)| p),
        set,
        watch: false,
    }
}

fn read_ka(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<(bool, KaValues)> {
    let (on, idle, intvl, cnt) = sys::keepalive_opts(fd)?;
    Ok((
        on,
        KaValues {
            idle_s: idle,
            intvl_s: intvl,
            cnt,
        },
    ))
}

/// Keepalive on a live socket of another process: pidfd_open + pidfd_getfd + setsockopt. The
/// duplicate shares the socket, so the owner sees the new options; it is closed at once. Works in
/// every network namespace (no setns needed).
pub fn pidfd_keepalive(req: &KaRequest) -> KaResult {
    let mut res = KaResult {
        cookie: req.cookie,
        before: None,
        after: None,
        error: None,
        via: "pidfd",
    };
    let run = |res: &mut KaResult| -> Result<(), String> {
        let pid = req.pid.ok_or("the socket's owner is not known yet")?;
        let dup = sys::socket_of(pid, req.inode)?;
        res.before = Some(read_ka(dup.as_fd()).map_err(|e| format!("getsockopt: {e}"))?);
        if let Some(v) = req.set {
            sys::set_keepalive(dup.as_fd(), v.idle_s, v.intvl_s, v.cnt)
                .map_err(|e| format!("setsockopt: {e}"))?;
        }
        res.after = Some(read_ka(dup.as_fd()).map_err(|e| format!("getsockopt: {e}"))?);
        Ok(())
    };
    if let Err(e) = run(&mut res) {
        res.error = Some(e);
    }
    res
}

use std::os::fd::AsFd;

#[cfg(test)]
mod tests;
