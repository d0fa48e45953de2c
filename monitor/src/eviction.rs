//! NAT / load-balancer idle eviction: which timeout applies to a flow, whether its keepalive
//! refreshes the middlebox in time, the findings, and the keepalive values to apply.
//!
//! Pure: `assess` and `EvictionDetector::evaluate` take the clock, the flows, the policy and a
//! route lookup as arguments, so unit tests drive them with a fake clock and fake routes.
use std::collections::HashMap;
use std::net::IpAddr;

use serde::Serialize;
use serde_json::json;

use crate::config::{KeepaliveSection, RemedyMode, Rule};
use crate::findings::{ActionRecord, FindingStore, Severity, Transition, ms};
use crate::flows::Flow;
use crate::human::fmt_ms;
use crate::observe::Nanos;
use crate::profiles::Profile;
use crate::routes::Path;

const ETIMEDOUT: i32 = 110;
const ECONNRESET: i32 = 104;
/// Post-mortem findings stay active this long.
const POSTMORTEM_NS: Nanos = 3600 * 1_000_000_000;

/// Everything that decides which timeout applies.
#[derive(Clone, Debug)]
pub struct EvictionPolicy {
    pub profiles: Vec<Profile>,
    pub rules: Vec<Rule>,
    pub default_profile: String,
    pub warn_ratio: f64,
    pub keepalive: KeepaliveSection,
    /// This namespace's conntrack established timeout, if conntrack is tracking here.
    pub host_conntrack_s: Option<u64>,
    /// Namespace keepalive sysctls: tcp_keepalive_time, _intvl, _probes.
    pub sysctl_keepalive: (u32, u32, u32),
    /// The shortest idle timeout any flow can get (rules, default profile, host conntrack): flows
    /// idler than warn_ratio of it are the only ones that need a full assessment.
    pub min_timeout_ms: u64,
}

/// The idle timeout that applies to a flow, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Applicable {
    pub profile: String,
    pub timeout_s: u64,
    pub keepalive_resets: bool,
    pub why: String,
    pub keepalive_mode: RemedyMode,
}

/// TCP keepalive values (seconds, seconds, count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KaValues {
    pub idle_s: u32,
    pub intvl_s: u32,
    pub cnt: u32,
}

/// A socket's keepalive as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Keepalive {
    pub on: Option<bool>,
    pub values: KaValues,
    /// `socket` (set on the socket) or `sysctl` (the namespace default applies).
    pub source: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    NoMiddlebox,
    Safe,
    Idle,
    NearEviction,
    KeepaliveTooSlow,
    KeepaliveCannotHelp,
    LikelyEvicted,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Assessment {
    pub cookie: u64,
    pub applicable: Option<Applicable>,
    pub no_middlebox_reason: Option<String>,
    pub idle_ms: u64,
    pub keepalive: Keepalive,
    /// How often keepalive refreshes the middlebox: max(TCP_KEEPIDLE, TCP_KEEPINTVL).
    pub refresh_s: Option<u32>,
    /// Dead-peer detection time after the last activity: idle + intvl x cnt.
    pub detection_s: Option<u32>,
    /// Time left before the middlebox forgets the flow, if nothing refreshes it.
    pub eta_ms: Option<i64>,
    pub verdict: Verdict,
}

fn rule_matches(r: &Rule, f: &Flow) -> bool {
    let owner = f.owner.as_ref();
    r.cidr.is_none_or(|c| c.contains(f.remote.ip()))
        && r.port.is_none_or(|p| f.remote.port() == p || f.local.port() == p)
        && r.comm.as_ref().is_none_or(|c| {
            owner.is_some_and(|o| &o.comm == c) || f.pid_hint.as_ref().is_some_and(|h| &h.comm == c)
        })
        && r.unit
            .as_ref()
            .is_none_or(|u| owner.and_then(|o| o.unit.as_ref()) == Some(u))
        && r.cgroup.as_ref().is_none_or(|c| {
            owner
                .and_then(|o| o.cgroup.as_ref())
                .is_some_and(|g| g.starts_with(c.as_str()))
        })
}

/// Which timeout applies to `f`: the first matching rule, else the route (plus host conntrack).
pub fn applicable(
    f: &Flow,
    pol: &EvictionPolicy,
    route: &mut dyn FnMut(IpAddr) -> Path,
) -> Result<Applicable, String> {
    let profile = |name: &str| pol.profiles.iter().find(|p| p.name == name);
    let mut a = None;
    for (i, r) in pol.rules.iter().enumerate() {
        if !rule_matches(r, f) {
            continue;
        }
        let mode = r.keepalive.unwrap_or(pol.keepalive.mode);
        a = Some(match (&r.profile, r.timeout) {
            (Some(name), _) => {
                let p = profile(name).ok_or_else(|| format!("rule {i} names unknown profile {name}"))?;
                Applicable {
                    profile: p.name.clone(),
                    timeout_s: p.idle_timeout_s,
                    keepalive_resets: p.keepalive_resets,
                    why: format!("rule {i} → profile {}", p.name),
                    keepalive_mode: mode,
                }
            }
            (None, Some(t)) => Applicable {
                profile: "rule".into(),
                timeout_s: t.as_secs(),
                keepalive_resets: true,
                why: format!("rule {i} → timeout {}", fmt_ms(t.as_millis() as u64)),
                keepalive_mode: mode,
            },
            (None, None) => continue,
        });
        break;
    }
    let mut a = match a {
        Some(a) => a,
        None => match route(f.remote.ip()) {
            Path::Local => return Err("local destination: no middlebox".into()),
            Path::OnLink => return Err("on-link destination: no middlebox on the path".into()),
            Path::Unknown => return Err("no route to classify: no profile applies".into()),
            Path::Gateway(gw) => {
                let p = profile(&pol.default_profile).ok_or("default profile missing")?;
                Applicable {
                    profile: p.name.clone(),
                    timeout_s: p.idle_timeout_s,
                    keepalive_resets: p.keepalive_resets,
                    why: format!("via gateway {gw}: default profile {}", p.name),
                    keepalive_mode: pol.keepalive.mode,
                }
            }
        },
    };
    if let Some(ct) = pol.host_conntrack_s {
        if ct < a.timeout_s {
            a.why = format!(
                "{}; this host's conntrack forgets sooner ({})",
                a.why,
                fmt_ms(ct * 1000)
            );
            a.timeout_s = ct;
            a.profile = "host-conntrack".into();
        }
    }
    Ok(a)
}

/// The socket's keepalive: per-socket values where known, else the namespace sysctls.
pub fn keepalive_of(f: &Flow, known: Option<KaValues>, pol: &EvictionPolicy) -> Keepalive {
    let t = f.tcp.as_ref();
    let (si, sv, sc) = pol.sysctl_keepalive;
    let sample = t.map(|t| (t.keepalive_idle_s, t.keepalive_intvl_s, t.keepalive_cnt));
    let per_socket = known.or_else(|| {
        let (i, v, c) = sample?;
        (i.is_some() || v.is_some() || c.is_some()).then(|| KaValues {
            idle_s: i.unwrap_or(si),
            intvl_s: v.unwrap_or(sv),
            cnt: c.unwrap_or(sc),
        })
    });
    Keepalive {
        on: t.and_then(|t| t.keepalive),
        values: per_socket.unwrap_or(KaValues {
            idle_s: si,
            intvl_s: sv,
            cnt: sc,
        }),
        source: if per_socket.is_some() { "socket" } else { "sysctl" },
    }
}

/// Assesses one ESTABLISHED flow at `now`.
pub fn assess(
    f: &Flow,
    now: Nanos,
    pol: &EvictionPolicy,
    known: Option<KaValues>,
    route: &mut dyn FnMut(IpAddr) -> Path,
) -> Assessment {
    let ages = f.ages_ms(now);
    let idle_ms = f.idle_ms(now).unwrap_or(0);
    let keepalive = keepalive_of(f, known, pol);
    let ka_on = keepalive.on == Some(true);
    let refresh_s = ka_on.then(|| keepalive.values.idle_s.max(keepalive.values.intvl_s));
    let detection_s =
        ka_on.then(|| keepalive.values.idle_s + keepalive.values.intvl_s * keepalive.values.cnt);
    let mut a = Assessment {
        cookie: f.cookie,
        applicable: None,
        no_middlebox_reason: None,
        idle_ms,
        keepalive,
        refresh_s,
        detection_s,
        eta_ms: None,
        verdict: Verdict::NoMiddlebox,
    };
    let app = match applicable(f, pol, route) {
        Ok(app) => app,
        Err(why) => {
            a.no_middlebox_reason = Some(why);
            return a;
        }
    };
    let timeout_ms = app.timeout_s * 1000;
    let refreshes = app.keepalive_resets && refresh_s.is_some_and(|r| u64::from(r) < app.timeout_s);
    let t = f.tcp.as_ref();
    let stuck = t.is_some_and(|t| t.unacked > 0 && (t.retransmits > 0 || t.backoff > 0))
        && ages.is_some_and(|(_, _, ack)| ack >= timeout_ms);
    a.verdict = if stuck {
        Verdict::LikelyEvicted
    } else if refreshes {
        Verdict::Safe
    } else if ka_on && app.keepalive_resets {
        Verdict::KeepaliveTooSlow
    } else if (idle_ms as f64) >= pol.warn_ratio * timeout_ms as f64 {
        if app.keepalive_resets {
            Verdict::NearEviction
        } else {
            Verdict::KeepaliveCannotHelp
        }
    } else {
        Verdict::Idle
    };
    if !refreshes {
        a.eta_ms = Some(timeout_ms as i64 - idle_ms as i64);
    }
    a.applicable = Some(app);
    a
}

/// Keepalive values for a flow behind a middlebox that forgets after `timeout_s`.
///
/// TCP_KEEPIDLE = timeout x refresh_ratio, at least `floor`; TCP_KEEPINTVL spreads the probes so
/// that a dead peer is found within one more timeout after the last activity.
pub fn plan(timeout_s: u64, k: &KeepaliveSection) -> Result<KaValues, String> {
    let floor = k.floor.as_secs().max(1);
    let idle = ((timeout_s as f64 * k.refresh_ratio) as u64).max(floor);
    if idle >= timeout_s {
        return Err(format!(
            "keepalive.floor ({}) is not below the idle timeout ({}): keepalive cannot refresh in time; lower keepalive.floor or send application pings",
            fmt_ms(floor * 1000),
            fmt_ms(timeout_s * 1000)
        ));
    }
    let cnt = k.probes.max(1);
    let intvl = ((timeout_s - idle) / u64::from(cnt)).clamp(1, idle);
    Ok(KaValues {
        idle_s: idle as u32,
        intvl_s: intvl as u32,
        cnt,
    })
}

/// A keepalive change (or a read of the current values) to execute on a live socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KaRequest {
    pub cookie: u64,
    pub inode: u64,
    pub pid: Option<u32>,
    /// None: only read the socket's current values.
    pub set: Option<KaValues>,
}

/// What an executor did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KaResult {
    pub cookie: u64,
    /// Values before (SO_KEEPALIVE, values).
    pub before: Option<(bool, KaValues)>,
    pub after: Option<(bool, KaValues)>,
    pub error: Option<String>,
    pub via: &'static str,
}

#[derive(Clone, Debug)]
struct Applied {
    finding: u64,
    values: KaValues,
    at: Nanos,
    verified: bool,
}

/// Eviction findings and the keepalive remedy, per flow cookie.
#[derive(Default)]
pub struct EvictionDetector {
    open: HashMap<(u64, &'static str), u64>,
    applied: HashMap<u64, Applied>,
    /// Per-socket keepalive values learnt through an executor (poll mode has no other source).
    pub known: HashMap<u64, KaValues>,
    pending: HashMap<u64, Nanos>,
    planned: HashMap<u64, u64>,
    postmortems: Vec<(u64, Nanos)>,
    prevented: std::collections::HashSet<u64>,
    /// Sample time a keepalive-on flow was last fully assessed at.
    judged: HashMap<u64, Nanos>,
}

fn kind_of(v: Verdict) -> Option<&'static str> {
    match v {
        Verdict::NearEviction | Verdict::KeepaliveCannotHelp => Some("idle-near-eviction"),
        Verdict::KeepaliveTooSlow => Some("keepalive-too-slow"),
        Verdict::LikelyEvicted => Some("likely-evicted"),
        _ => None,
    }
}

fn subject(f: &Flow) -> String {
    let who = f
        .owner
        .as_ref()
        .map(|o| format!(" pid {} ({})", o.pid, o.comm))
        .or_else(|| {
            f.pid_hint
                .as_ref()
                .map(|h| format!(" pid {} ({})", h.pid, h.comm))
        })
        .unwrap_or_default();
    format!("flow {} → {}{who}", f.local, f.remote)
}

fn describe(a: &Assessment) -> String {
    let app = a.applicable.as_ref();
    let timeout = app.map_or(String::new(), |p| fmt_ms(p.timeout_s * 1000));
    let profile = app.map_or("", |p| p.profile.as_str());
    match a.verdict {
        Verdict::NearEviction => format!(
            "idle {} of the {timeout} idle timeout ({profile}); keepalive {} will not refresh it; eviction in {}",
            fmt_ms(a.idle_ms),
            if a.keepalive.on == Some(true) { "on" } else { "off" },
            fmt_ms(a.eta_ms.unwrap_or(0).max(0) as u64)
        ),
        Verdict::KeepaliveCannotHelp => format!(
            "idle {} of the {timeout} idle timeout ({profile}), which keepalive probes do not reset: send application-level pings (data) more often than {timeout}",
            fmt_ms(a.idle_ms)
        ),
        Verdict::KeepaliveTooSlow => format!(
            "keepalive is on but refreshes every {} ({} source), not below the {timeout} idle timeout ({profile})",
            fmt_ms(u64::from(a.refresh_s.unwrap_or(0)) * 1000),
            a.keepalive.source
        ),
        Verdict::LikelyEvicted => format!(
            "data sent after an idle period is not acknowledged (no ACK for longer than the {timeout} idle timeout of {profile}): the middlebox most likely forgot this flow"
        ),
        _ => String::new(),
    }
}

impl EvictionDetector {
    /// Evaluates every ESTABLISHED flow and the flows closed since the last call.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate<'a>(
        &mut self,
        now: Nanos,
        flows: impl Iterator<Item = &'a Flow>,
        closed: &[(Flow, Nanos)],
        pol: &EvictionPolicy,
        route: &mut dyn FnMut(IpAddr) -> Path,
        store: &mut FindingStore,
    ) -> (Vec<(u64, Transition)>, Vec<KaRequest>) {
        let mut out = Vec::new();
        let mut requests = Vec::new();
        let mut live: HashMap<(u64, &'static str), ()> = HashMap::new();
        let quick = (pol.min_timeout_ms as f64 * pol.warn_ratio) as u64;
        for f in flows.filter(|f| f.state == monitor_common::tcp_state::ESTABLISHED && f.tcp.is_some()) {
            // Quick reject (no allocation, no lookups): recently active, keepalive off or already
            // judged on this sample, and no retransmissions.
            let t = f.tcp.as_ref().expect("filtered");
            let calm = t.unacked == 0 && t.retransmits == 0;
            if calm
                && f.idle_ms(now).is_some_and(|i| i < quick)
                && (t.keepalive != Some(true) || self.judged.get(&f.cookie) == Some(&f.tcp_at))
                && !self.applied.contains_key(&f.cookie)
            {
                continue;
            }
            self.judged.insert(f.cookie, f.tcp_at);
            let a = assess(f, now, pol, self.known.get(&f.cookie).copied(), route);
            self.verify(f, &a, now, store, &mut out);
            // Poll mode does not see per-socket keepalive values: read them once through a pidfd.
            if a.keepalive.on == Some(true)
                && a.keepalive.source == "sysctl"
                && a.applicable.is_some()
                && !self.pending.contains_key(&f.cookie)
                && !self.known.contains_key(&f.cookie)
            {
                self.pending.insert(f.cookie, now);
                requests.push(KaRequest {
                    cookie: f.cookie,
                    inode: f.inode,
                    pid: f.owner.as_ref().map(|o| o.pid),
                    set: None,
                });
                continue;
            }
            let Some(kind) = kind_of(a.verdict) else { continue };
            live.insert((f.cookie, kind), ());
            let id = match self.open.get(&(f.cookie, kind)) {
                Some(id) => {
                    if let Some(fd) = store.get_mut(*id) {
                        fd.summary = describe(&a);
                        fd.details = json!({ "assessment": a, "cookie": f.cookie });
                        fd.updated_ms = ms(now);
                    }
                    *id
                }
                None => {
                    let sev = if kind == "likely-evicted" {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    };
                    let id = store.open(
                        kind,
                        sev,
                        subject(f),
                        describe(&a),
                        json!({ "assessment": a, "cookie": f.cookie }),
                        now,
                    );
                    self.open.insert((f.cookie, kind), id);
                    out.push((id, Transition::New));
                    id
                }
            };
            if matches!(a.verdict, Verdict::NearEviction | Verdict::KeepaliveTooSlow) {
                if let Some(r) = self.remedy(f, &a, id, now, pol, store, &mut out) {
                    requests.push(r);
                }
            }
        }
        // Findings whose condition no longer holds (activity, keepalive now armed, flow closed).
        let stale: Vec<(u64, &'static str)> = self
            .open
            .keys()
            .filter(|k| !live.contains_key(k))
            .copied()
            .collect();
        let closed_cookies: HashMap<u64, &Flow> = closed.iter().map(|(f, _)| (f.cookie, f)).collect();
        for key in stale {
            let id = self.open.remove(&key).expect("present");
            let why = if closed_cookies.contains_key(&key.0) {
                "the connection closed".to_string()
            } else if self.applied.get(&key.0).is_some_and(|a| a.finding == id) {
                "keepalive applied: the flow is now refreshed in time".to_string()
            } else {
                "the flow is no longer at risk (activity or keepalive)".to_string()
            };
            if let Some(f) = store.get(id) {
                let summary = format!("{} — resolved: {why}", f.summary);
                store.resolve(id, summary, now);
                out.push((id, Transition::Resolved));
            }
        }
        for (f, at) in closed {
            self.applied.remove(&f.cookie);
            self.known.remove(&f.cookie);
            self.pending.remove(&f.cookie);
            self.planned.remove(&f.cookie);
            self.prevented.remove(&f.cookie);
            self.judged.remove(&f.cookie);
            if let Some(id) = self.postmortem(f, *at, pol, route, store) {
                out.push((id, Transition::New));
            }
        }
        let expired: Vec<u64> = self
            .postmortems
            .iter()
            .filter(|(_, t)| now.saturating_sub(*t) > POSTMORTEM_NS)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            store.resolve(
                id,
                store.get(id).map(|f| f.summary.clone()).unwrap_or_default(),
                now,
            );
        }
        self.postmortems
            .retain(|(_, t)| now.saturating_sub(*t) <= POSTMORTEM_NS);
        (out, requests)
    }

    /// A flow that died by RST or timeout after the middlebox's idle timeout: `likely-evicted`.
    fn postmortem(
        &mut self,
        f: &Flow,
        closed_at: Nanos,
        pol: &EvictionPolicy,
        route: &mut dyn FnMut(IpAddr) -> Path,
        store: &mut FindingStore,
    ) -> Option<u64> {
        let died_badly = f.resets_recv > 0 || matches!(f.last_error, Some(ETIMEDOUT) | Some(ECONNRESET));
        if !died_badly
            || self
                .open
                .keys()
                .any(|(c, k)| *c == f.cookie && *k == "likely-evicted")
        {
            return None;
        }
        let app = applicable(f, pol, route).ok()?;
        let t = f.tcp.as_ref()?;
        let silent_ms = u64::from(t.last_ack_recv_ms) + ms(closed_at.saturating_sub(f.tcp_at));
        if silent_ms < app.timeout_s * 1000 {
            return None;
        }
        let cause = if f.resets_recv > 0 {
            "reset by the peer or the middlebox"
        } else if f.last_error == Some(ETIMEDOUT) {
            "timed out"
        } else {
            "reset"
        };
        let summary = format!(
            "connection {cause} after {} without an ACK, longer than the {} idle timeout of {}: the middlebox most likely evicted it",
            fmt_ms(silent_ms),
            fmt_ms(app.timeout_s * 1000),
            app.profile
        );
        let id = store.open("likely-evicted", Severity::Critical, subject(f), summary, json!({ "cookie": f.cookie, "profile": app, "silent_ms": silent_ms, "resets_recv": f.resets_recv, "error": f.last_error, "post_mortem": true }), closed_at);
        self.postmortems.push((id, closed_at));
        Some(id)
    }

    #[allow(clippy::too_many_arguments)]
    fn remedy(
        &mut self,
        f: &Flow,
        a: &Assessment,
        finding: u64,
        now: Nanos,
        pol: &EvictionPolicy,
        store: &mut FindingStore,
        out: &mut Vec<(u64, Transition)>,
    ) -> Option<KaRequest> {
        let app = a.applicable.as_ref()?;
        if app.keepalive_mode == RemedyMode::Off
            || self.applied.contains_key(&f.cookie)
            || self.pending.contains_key(&f.cookie)
        {
            return None;
        }
        let values = match plan(app.timeout_s, &pol.keepalive) {
            Ok(v) => v,
            Err(e) => {
                if self.planned.insert(f.cookie, finding).is_none() {
                    push_action(
                        store,
                        finding,
                        now,
                        "keepalive",
                        app.keepalive_mode,
                        format!("not possible: {e}"),
                        json!(a.keepalive),
                        json!(null),
                    );
                    out.push((finding, Transition::Action));
                }
                return None;
            }
        };
        if app.keepalive_mode == RemedyMode::DryRun {
            if self.planned.insert(f.cookie, finding).is_none() {
                let plan = format!(
                    "planned: SO_KEEPALIVE=1 TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={} (dry-run, socket untouched)",
                    values.idle_s, values.intvl_s, values.cnt
                );
                push_action(
                    store,
                    finding,
                    now,
                    "keepalive",
                    RemedyMode::DryRun,
                    plan,
                    json!(a.keepalive),
                    json!(values),
                );
                out.push((finding, Transition::Action));
            }
            return None;
        }
        Some(self.manual(f, values, finding, now))
    }

    /// Records what an executor did.
    pub fn on_result(
        &mut self,
        r: &KaResult,
        now: Nanos,
        store: &mut FindingStore,
    ) -> Option<(u64, Transition)> {
        self.pending.remove(&r.cookie);
        if let Some((_, v)) = r.after.or(r.before) {
            if r.error.is_none() {
                self.known.insert(r.cookie, v);
            }
        }
        let applied = self.applied.get(&r.cookie)?.clone();
        let fmt = |x: Option<(bool, KaValues)>| {
            x.map_or(json!(null), |(on, v)| json!({ "so_keepalive": on, "idle_s": v.idle_s, "intvl_s": v.intvl_s, "cnt": v.cnt }))
        };
        let outcome = match &r.error {
            Some(e) => format!("failed via {}: {e}; not retried", r.via),
            None => format!(
                "applied via {}: TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={}; waiting for the keepalive timer",
                r.via, applied.values.idle_s, applied.values.intvl_s, applied.values.cnt
            ),
        };
        push_action(
            store,
            applied.finding,
            now,
            "keepalive",
            RemedyMode::Enforce,
            outcome,
            fmt(r.before),
            fmt(r.after),
        );
        Some((applied.finding, Transition::Action))
    }

    /// After an apply, the next sample must show the keepalive timer armed.
    fn verify(
        &mut self,
        f: &Flow,
        a: &Assessment,
        _now: Nanos,
        store: &mut FindingStore,
        out: &mut Vec<(u64, Transition)>,
    ) {
        let Some(ap) = self.applied.get_mut(&f.cookie) else {
            return;
        };
        if ap.verified || f.tcp_at <= ap.at || self.pending.contains_key(&f.cookie) {
            return;
        }
        let t = f.tcp.as_ref();
        let armed = a.keepalive.on == Some(true)
            && t.is_some_and(|t| {
                t.timer == crate::observe::Timer::Keepalive || t.timer == crate::observe::Timer::None
            });
        ap.verified = true;
        if let Some(act) = store
            .get_mut(ap.finding)
            .and_then(|f| f.actions.iter_mut().rev().find(|x| x.action == "keepalive"))
        {
            act.outcome = if armed {
                format!(
                    "{}; verified: keepalive on, refresh every {}",
                    act.outcome.split("; waiting").next().unwrap_or(""),
                    fmt_ms(u64::from(a.refresh_s.unwrap_or(0)) * 1000)
                )
            } else {
                format!(
                    "{}; NOT verified: the next snapshot shows keepalive off",
                    act.outcome.split("; waiting").next().unwrap_or("")
                )
            };
            out.push((ap.finding, Transition::Action));
        }
    }
}

impl Assessment {
    /// The forecast as the CLI shows it, if a middlebox applies.
    pub fn risk(&self) -> Option<crate::flows::RiskView> {
        let app = self.applicable.as_ref()?;
        Some(crate::flows::RiskView {
            profile: app.profile.clone(),
            timeout_s: app.timeout_s,
            verdict: serde_json::to_value(self.verdict).ok()?.as_str()?.to_string(),
            eta_ms: self.eta_ms,
        })
    }

    pub fn at_risk(&self) -> bool {
        kind_of(self.verdict).is_some()
    }
}

impl EvictionDetector {
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
            let Some(o) = &f.owner else { continue };
            let Some(cg) = &o.cgroup else { continue };
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
            out.push(KaRequest {
                cookie: f.cookie,
                inode: f.inode,
                pid: Some(o.pid),
                set: Some(values),
            });
        }
        out
    }

    /// Queues a manual keepalive for one flow (`holdfast remedy keepalive`).
    pub fn manual(&mut self, f: &Flow, values: KaValues, finding: u64, now: Nanos) -> KaRequest {
        self.pending.insert(f.cookie, now);
        self.applied.insert(
            f.cookie,
            Applied {
                finding,
                values,
                at: now,
                verified: false,
            },
        );
        KaRequest {
            cookie: f.cookie,
            inode: f.inode,
            pid: f
                .owner
                .as_ref()
                .map(|o| o.pid)
                .or(f.pid_hint.as_ref().map(|h| h.pid)),
            set: Some(values),
        }
    }

    /// Tracks a finding opened outside `evaluate` (a manual remedy) like its own.
    pub fn adopt(&mut self, cookie: u64, id: u64) {
        self.open.insert((cookie, "idle-near-eviction"), id);
    }

    /// The finding a flow's manual remedy is recorded on: its open finding, if any.
    pub fn finding_of(&self, cookie: u64) -> Option<u64> {
        self.open
            .iter()
            .find(|((c, _), _)| *c == cookie)
            .map(|(_, id)| *id)
    }
}

#[allow(clippy::too_many_arguments)]
fn push_action(
    store: &mut FindingStore,
    finding: u64,
    now: Nanos,
    action: &str,
    mode: RemedyMode,
    outcome: String,
    before: serde_json::Value,
    after: serde_json::Value,
) {
    if let Some(f) = store.get_mut(finding) {
        f.actions.push(ActionRecord {
            at_ms: ms(now),
            action: action.into(),
            mode: if mode == RemedyMode::DryRun {
                "dry-run"
            } else {
                "enforce"
            }
            .into(),
            outcome,
            before,
            after,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{Owner, TcpSample, Timer};
    use std::time::Duration;

    const S: Nanos = 1_000_000_000;

    fn policy() -> EvictionPolicy {
        let mut profiles = crate::profiles::builtin();
        profiles.push(Profile {
            name: "lab".into(),
            idle_timeout_s: 20,
            keepalive_resets: true,
            on_expiry: String::new(),
            source: String::new(),
        });
        EvictionPolicy {
            profiles,
            rules: vec![Rule {
                cidr: Some("10.77.0.0/16".parse().unwrap()),
                profile: Some("lab".into()),
                ..Default::default()
            }],
            default_profile: "home-router".into(),
            warn_ratio: 0.8,
            keepalive: KeepaliveSection {
                floor: Duration::from_secs(2),
                ..Default::default()
            },
            host_conntrack_s: None,
            sysctl_keepalive: (7200, 75, 9),
            min_timeout_ms: 20_000,
        }
    }

    fn flow(remote: &str, idle_ms: u32, ka: Option<bool>) -> Flow {
        Flow {
            cookie: 9,
            local: "10.77.1.2:40000".parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: 1,
            state_since: Some(0),
            first_seen: 0,
            last_seen: 0,
            inode: 5,
            uid: 0,
            owner: Some(std::sync::Arc::new(Owner {
                pid: 77,
                comm: "psql".into(),
                cgroup: None,
                unit: None,
            })),
            pid_hint: None,
            tcp: Some(TcpSample {
                last_data_sent_ms: idle_ms,
                last_data_recv_ms: idle_ms,
                last_ack_recv_ms: idle_ms,
                keepalive: ka,
                ..Default::default()
            }),
            tcp_at: 100 * S,
            resets_recv: 0,
            resets_sent: 0,
            retransmit_events: 0,
            last_error: None,
        }
    }

    fn gw(_: IpAddr) -> Path {
        Path::Gateway("10.77.1.1".into())
    }

    #[test]
    fn rules_then_routes_pick_the_timeout() {
        let pol = policy();
        let a = applicable(&flow("10.77.2.2:5432", 0, None), &pol, &mut gw).unwrap();
        assert_eq!((a.profile.as_str(), a.timeout_s), ("lab", 20));
        let a = applicable(&flow("192.0.2.9:22", 0, None), &pol, &mut gw).unwrap();
        assert_eq!((a.profile.as_str(), a.timeout_s), ("home-router", 600));
        assert!(
            applicable(&flow("192.0.2.9:22", 0, None), &pol, &mut |_| Path::OnLink)
                .unwrap_err()
                .contains("on-link")
        );
        let mut ct = pol.clone();
        ct.host_conntrack_s = Some(300);
        let a = applicable(&flow("192.0.2.9:22", 0, None), &ct, &mut gw).unwrap();
        assert_eq!((a.profile.as_str(), a.timeout_s), ("host-conntrack", 300));
    }

    #[test]
    fn verdicts() {
        let pol = policy();
        let at = |idle, ka| assess(&flow("10.77.2.2:80", idle, ka), 100 * S, &pol, None, &mut gw);
        assert_eq!(at(5_000, Some(false)).verdict, Verdict::Idle);
        let near = at(16_000, Some(false));
        assert_eq!(near.verdict, Verdict::NearEviction);
        assert_eq!(near.eta_ms, Some(4_000));
        // Keepalive on with the sysctl defaults (7200 s) is too slow for a 20 s middlebox.
        let slow = at(1_000, Some(true));
        assert_eq!(slow.verdict, Verdict::KeepaliveTooSlow);
        assert_eq!(slow.refresh_s, Some(7200));
        assert_eq!(slow.detection_s, Some(7200 + 75 * 9));
        let safe = assess(
            &flow("10.77.2.2:80", 16_000, Some(true)),
            100 * S,
            &pol,
            Some(KaValues {
                idle_s: 10,
                intvl_s: 2,
                cnt: 4,
            }),
            &mut gw,
        );
        assert_eq!(safe.verdict, Verdict::Safe);
        assert_eq!(safe.eta_ms, None);
        // Refresh is max(idle, intvl): an interval at or above the timeout is too slow.
        let slow_intvl = assess(
            &flow("10.77.2.2:80", 0, Some(true)),
            100 * S,
            &pol,
            Some(KaValues {
                idle_s: 10,
                intvl_s: 30,
                cnt: 4,
            }),
            &mut gw,
        );
        assert_eq!(slow_intvl.verdict, Verdict::KeepaliveTooSlow);
        // ALB: keepalive does not reset it.
        let mut alb = pol.clone();
        alb.rules[0].profile = Some("aws-alb".into());
        let a = assess(
            &flow("10.77.2.2:80", 50_000, Some(false)),
            100 * S,
            &alb,
            None,
            &mut gw,
        );
        assert_eq!(a.verdict, Verdict::KeepaliveCannotHelp);
        let mut stuck = flow("10.77.2.2:80", 25_000, Some(false));
        let t = stuck.tcp.as_mut().unwrap();
        t.unacked = 1;
        t.retransmits = 2;
        t.last_data_sent_ms = 500;
        assert_eq!(
            assess(&stuck, 100 * S, &pol, None, &mut gw).verdict,
            Verdict::LikelyEvicted
        );
    }

    #[test]
    fn plans_keepalive_below_the_timeout() {
        let k = KeepaliveSection::default();
        assert_eq!(
            plan(350, &k).unwrap(),
            KaValues {
                idle_s: 175,
                intvl_s: 43,
                cnt: 4
            }
        );
        let v = plan(240, &k).unwrap();
        assert!(v.idle_s.max(v.intvl_s) < 240 && v.idle_s + v.intvl_s * v.cnt <= 240);
        assert!(plan(20, &k).unwrap_err().contains("keepalive.floor"));
        let lab = KeepaliveSection {
            floor: Duration::from_secs(2),
            ..Default::default()
        };
        assert_eq!(
            plan(10, &lab).unwrap(),
            KaValues {
                idle_s: 5,
                intvl_s: 1,
                cnt: 4
            }
        );
    }

    #[test]
    fn finding_then_remedy_then_resolution() {
        let pol = policy();
        let mut d = EvictionDetector::default();
        let mut store = FindingStore::default();
        let f = flow("10.77.2.2:80", 16_000, Some(false));
        let (t, reqs) = d.evaluate(100 * S, [&f].into_iter(), &[], &pol, &mut gw, &mut store);
        assert_eq!(t, vec![(1, Transition::New)]);
        assert_eq!(
            reqs,
            vec![KaRequest {
                cookie: 9,
                inode: 5,
                pid: Some(77),
                set: Some(KaValues {
                    idle_s: 10,
                    intvl_s: 2,
                    cnt: 4
                })
            }]
        );
        assert_eq!(store.items[0].kind, "idle-near-eviction");
        // Re-evaluating while the request is in flight sends nothing more.
        let (t, reqs) = d.evaluate(100 * S + 1, [&f].into_iter(), &[], &pol, &mut gw, &mut store);
        assert!(t.is_empty() && reqs.is_empty());
        let before = KaValues {
            idle_s: 7200,
            intvl_s: 75,
            cnt: 9,
        };
        let after = KaValues {
            idle_s: 10,
            intvl_s: 2,
            cnt: 4,
        };
        d.on_result(
            &KaResult {
                cookie: 9,
                before: Some((false, before)),
                after: Some((true, after)),
                error: None,
                via: "test",
            },
            101 * S,
            &mut store,
        )
        .unwrap();
        assert!(store.items[0].actions[0].outcome.starts_with("applied via test"));
        // The next sample shows keepalive on: verified, and the finding resolves.
        let mut f2 = flow("10.77.2.2:80", 100, Some(true));
        f2.tcp_at = 102 * S;
        f2.tcp.as_mut().unwrap().timer = Timer::Keepalive;
        let (t, reqs) = d.evaluate(102 * S, [&f2].into_iter(), &[], &pol, &mut gw, &mut store);
        assert!(reqs.is_empty());
        assert!(t.contains(&(1, Transition::Resolved)), "{t:?}");
        assert!(
            store.items[0].actions[0]
                .outcome
                .contains("verified: keepalive on"),
            "{:?}",
            store.items[0].actions
        );
        assert!(!store.items[0].active);
    }

    #[test]
    fn dry_run_plans_once() {
        let mut pol = policy();
        pol.keepalive.mode = RemedyMode::DryRun;
        let mut d = EvictionDetector::default();
        let mut store = FindingStore::default();
        let f = flow("10.77.2.2:80", 17_000, Some(false));
        for i in 0..10 {
            let (_, reqs) = d.evaluate(100 * S + i, [&f].into_iter(), &[], &pol, &mut gw, &mut store);
            assert!(reqs.is_empty());
        }
        assert_eq!(store.items[0].actions.len(), 1);
        assert!(
            store.items[0].actions[0]
                .outcome
                .starts_with("planned: SO_KEEPALIVE=1 TCP_KEEPIDLE=10")
        );
    }

    #[test]
    fn postmortem_after_reset_past_the_timeout() {
        let pol = policy();
        let mut d = EvictionDetector::default();
        let mut store = FindingStore::default();
        let mut f = flow("10.77.2.2:80", 30_000, Some(false));
        f.last_error = Some(ETIMEDOUT);
        let (t, _) = d.evaluate(
            105 * S,
            std::iter::empty(),
            &[(f.clone(), 104 * S)],
            &pol,
            &mut gw,
            &mut store,
        );
        assert_eq!(t.len(), 1);
        assert_eq!(store.items[0].kind, "likely-evicted");
        assert!(
            store.items[0].summary.contains("timed out after 34s"),
            "{}",
            store.items[0].summary
        );
        // A reset after a short idle is not blamed on the middlebox.
        let mut g = flow("10.77.2.2:80", 1_000, Some(false));
        g.cookie = 10;
        g.resets_recv = 1;
        let (t, _) = d.evaluate(
            106 * S,
            std::iter::empty(),
            &[(g, 100 * S)],
            &pol,
            &mut gw,
            &mut store,
        );
        assert!(t.is_empty());
    }
}
