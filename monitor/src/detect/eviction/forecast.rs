//! The forecast of one flow: which idle timeout applies (first matching rule, else the route and
//! the namespace's conntrack), what its keepalive does, and the verdict.
use super::super::Env;
use crate::config::Rule;
use crate::config::policy::EvictionPolicy;
use crate::model::eviction::{Applicable, Assessment, Forecast, KaSource, KaValues, Keepalive, RoutePath};
use crate::model::flow::Flow;
use crate::model::time::{Nanos, fmt_ms};

fn rule_matches(r: &Rule, f: &Flow, netns_name: &dyn Fn() -> Option<String>) -> bool {
    let owner = f.owner.as_ref();
    r.cidr.is_none_or(|c| c.contains(f.remote().ip()))
        && r.port
            .is_none_or(|p| f.remote().port() == p || f.local().port() == p)
        && r.comm
            .as_ref()
            .is_none_or(|c| owner.is_some_and(|o| &o.comm == c) || f.pid_hint().is_some_and(|h| &h.comm == c))
        && r.unit
            .as_ref()
            .is_none_or(|u| owner.and_then(|o| o.unit.as_ref()) == Some(u))
        && r.cgroup.as_ref().is_none_or(|c| {
            owner
                .and_then(|o| o.cgroup.as_ref())
                .is_some_and(|g| g.starts_with(c.as_str()))
        })
        && r.netns.as_ref().is_none_or(|want| {
            let name = netns_name().unwrap_or_default();
            crate::model::observe::netns_matches(&name, f.netns, want)
        })
}

/// Which timeout applies to `f`: the first matching rule, else the route (plus conntrack).
pub fn applicable(f: &Flow, pol: &EvictionPolicy, env: &mut dyn Env) -> Result<Applicable, String> {
    let profile = |name: &str| pol.profiles.iter().find(|p| p.name == name);
    let mut a = None;
    let name = || env_name(env, f);
    for (i, r) in pol.rules.iter().enumerate() {
        if !rule_matches(r, f, &name) {
            continue;
        }
        let mode = r.keepalive.unwrap_or(pol.keepalive.mode);
        a = Some(match (&r.profile, r.timeout) {
            (Some(pname), _) => {
                // Validated at load: the profile exists.
                let p = profile(pname).ok_or_else(|| format!("rule {i} names unknown profile {pname}"))?;
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
    let a = match a {
        Some(a) => a,
        None => match env.route(f.netns, f.remote().ip()) {
            RoutePath::Local => return Err("local destination: no middlebox".into()),
            RoutePath::OnLink => return Err("on-link destination: no middlebox on the path".into()),
            RoutePath::Unknown => return Err("no route to classify: no profile applies".into()),
            RoutePath::Gateway(gw) => {
                if let Some((timeout_s, evidence)) = env.learned(f.netns, &gw, f.remote().ip()) {
                    return Ok(Applicable {
                        profile: "learned".into(),
                        timeout_s,
                        keepalive_resets: true,
                        why: format!(
                            "via gateway {gw}: learned for {}: {evidence}",
                            crate::track::paths::prefix_of(f.remote().ip())
                        ),
                        keepalive_mode: pol.keepalive.mode,
                    })
                    .map(|a| with_conntrack(a, f, env));
                }
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
    Ok(with_conntrack(a, f, env))
}

/// The namespace's own conntrack may forget sooner than the path's middlebox.
fn with_conntrack(mut a: Applicable, f: &Flow, env: &mut dyn Env) -> Applicable {
    if let Some(ct) = env.facts(f.netns).conntrack_s
        && ct < a.timeout_s
    {
        a.why = format!(
            "{}; this namespace's conntrack forgets sooner ({})",
            a.why,
            fmt_ms(ct * 1000)
        );
        a.timeout_s = ct;
        a.profile = "host-conntrack".into();
    }
    a
}

fn env_name(env: &dyn Env, f: &Flow) -> Option<String> {
    env.netns_name(f.netns)
}

/// The socket's keepalive: per-socket values where known, else the namespace sysctls.
pub fn keepalive_of(f: &Flow, known: Option<KaValues>, sysctl: KaValues) -> Keepalive {
    let t = f.tcp.as_ref();
    let sample = t.map(|t| (t.keepalive_idle_s, t.keepalive_intvl_s, t.keepalive_cnt));
    let per_socket = known.or_else(|| {
        let (i, v, c) = sample?;
        (i.is_some() || v.is_some() || c.is_some()).then(|| KaValues {
            idle_s: i.map_or(sysctl.idle_s, |s| u32::from(s.get())),
            intvl_s: v.map_or(sysctl.intvl_s, |s| u32::from(s.get())),
            cnt: c.map_or(sysctl.cnt, |n| u32::from(n.get())),
        })
    });
    Keepalive {
        on: t.and_then(|t| t.keepalive),
        values: per_socket.unwrap_or(sysctl),
        source: if per_socket.is_some() {
            KaSource::Socket
        } else {
            KaSource::Sysctl
        },
    }
}

/// Assesses one ESTABLISHED flow at `now`.
pub fn assess(
    f: &Flow,
    now: Nanos,
    pol: &EvictionPolicy,
    known: Option<KaValues>,
    env: &mut dyn Env,
) -> Assessment {
    let ages = f.ages_ms(now);
    let idle_ms = f.idle_ms(now).unwrap_or(0);
    let keepalive = keepalive_of(f, known, env.facts(f.netns).keepalive);
    let ka_on = keepalive.on == Some(true);
    let refresh_s = ka_on.then(|| keepalive.values.refresh_s());
    let detection_s = ka_on.then(|| keepalive.values.detection_s());
    let mut a = Assessment {
        cookie: f.cookie,
        applicable: None,
        no_middlebox_reason: None,
        idle_ms,
        keepalive,
        refresh_s,
        detection_s,
        eta_ms: None,
        verdict: Forecast::NoMiddlebox,
    };
    let app = match applicable(f, pol, env) {
        Ok(app) => app,
        Err(why) => {
            a.no_middlebox_reason = Some(why);
            return a;
        }
    };
    let timeout_ms = app.timeout_s.saturating_mul(1000);
    let refreshes = app.keepalive_resets && refresh_s.is_some_and(|r| u64::from(r) < app.timeout_s);
    let t = f.tcp.as_ref();
    let stuck = t.is_some_and(|t| t.unacked > 0 && (t.retransmits > 0 || t.backoff > 0))
        && ages.is_some_and(|(_, _, ack)| ack >= timeout_ms);
    a.verdict = if stuck {
        Forecast::LikelyEvicted
    } else if refreshes {
        Forecast::Safe
    } else if ka_on && app.keepalive_resets {
        Forecast::KeepaliveTooSlow
    } else if idle_ms >= pol.warn_at_ms(timeout_ms) {
        if app.keepalive_resets {
            Forecast::NearEviction
        } else {
            Forecast::KeepaliveCannotHelp
        }
    } else {
        Forecast::Idle
    };
    if !refreshes {
        a.eta_ms = Some(timeout_ms as i64 - idle_ms as i64);
    }
    a.applicable = Some(app);
    a
}

/// What the finding says about an assessment.
pub fn describe(a: &Assessment) -> String {
    let app = a.applicable.as_ref();
    let timeout = app.map_or(String::new(), |p| fmt_ms(p.timeout_s * 1000));
    let profile = app.map_or("", |p| p.profile.as_str());
    match a.verdict {
        Forecast::NearEviction => format!(
            "idle {} of the {timeout} idle timeout ({profile}); keepalive {} will not refresh it; eviction in {}",
            fmt_ms(a.idle_ms),
            if a.keepalive.on == Some(true) { "on" } else { "off" },
            fmt_ms(a.eta_ms.unwrap_or(0).max(0) as u64)
        ),
        Forecast::KeepaliveCannotHelp => format!(
            "idle {} of the {timeout} idle timeout ({profile}), which keepalive probes do not reset: send application-level pings (data) more often than {timeout}",
            fmt_ms(a.idle_ms)
        ),
        Forecast::KeepaliveTooSlow => format!(
            "keepalive is on but refreshes every {} ({} values), not below the {timeout} idle timeout ({profile})",
            fmt_ms(u64::from(a.refresh_s.unwrap_or(0)) * 1000),
            a.keepalive.source.as_str()
        ),
        Forecast::LikelyEvicted => format!(
            "data sent after an idle period is not acknowledged (no ACK for longer than the {timeout} idle timeout of {profile}): the middlebox most likely forgot this flow"
        ),
        _ => String::new(),
    }
}
