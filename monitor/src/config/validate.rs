//! Ranges and cross-references that the configuration's types alone cannot express: intervals
//! that would spin, numbers the kernel refuses, profiles that do not exist, rules that say nothing.
use std::path::Path;
use std::time::Duration;

use super::Config;

/// One validation rule's failure, before it is placed in the file.
pub struct Bad {
    pub table: &'static str,
    pub index: Option<usize>,
    pub key: &'static str,
    pub message: String,
}

fn bad(table: &'static str, index: Option<usize>, key: &'static str, message: impl Into<String>) -> Bad {
    Bad {
        table,
        index,
        key,
        message: message.into(),
    }
}

/// `lo <= d <= hi`, or the error for `table.key`.
fn range(d: Duration, lo: Duration, hi: Duration, table: &'static str, key: &'static str) -> Result<(), Bad> {
    if d < lo || d > hi {
        return Err(bad(
            table,
            None,
            key,
            format!(
                "expected a duration between {} and {}, found {}",
                crate::model::time::fmt_exact(lo),
                crate::model::time::fmt_exact(hi),
                crate::model::time::fmt_exact(d)
            ),
        ));
    }
    Ok(())
}

const MS: fn(u64) -> Duration = Duration::from_millis;
const SECS: fn(u64) -> Duration = Duration::from_secs;
const DAY: Duration = Duration::from_secs(86_400);
/// TCP_KEEPIDLE and TCP_KEEPINTVL are at most 32767 s (MAX_TCP_KEEPIDLE), TCP_KEEPCNT 127.
const MAX_KEEPIDLE: u64 = 32_767;
const MAX_KEEPCNT: u32 = 127;

impl Config {
    /// Ranges and cross-references that the types alone cannot express.
    pub(super) fn validate(&self) -> Result<(), Bad> {
        let s = &self.snapshot;
        range(s.poll_interval, MS(100), DAY, "snapshot", "poll_interval")?;
        range(s.ebpf_interval, MS(100), DAY, "snapshot", "ebpf_interval")?;
        range(s.full_interval, MS(100), DAY, "snapshot", "full_interval")?;
        if let Some(p) = s.read_cpu_percent
            && !(0.1..=50.0).contains(&p)
        {
            return Err(bad(
                "snapshot",
                None,
                "read_cpu_percent",
                format!("expected a share of one core between 0.1 and 50 (percent), found {p}"),
            ));
        }
        let z = &self.zombies;
        range(z.min_age, Duration::ZERO, DAY, "zombies", "min_age")?;
        range(z.scan_interval, MS(100), DAY, "zombies", "scan_interval")?;
        range(z.heal_interval, MS(100), DAY, "zombies", "heal_interval")?;
        let k = &self.keepalive;
        range(k.floor, SECS(1), SECS(MAX_KEEPIDLE), "keepalive", "floor")?;
        range(
            k.cgroup_timeout,
            SECS(2),
            SECS(MAX_KEEPIDLE),
            "keepalive",
            "cgroup_timeout",
        )?;
        if !(1..=MAX_KEEPCNT).contains(&k.probes) {
            return Err(bad(
                "keepalive",
                None,
                "probes",
                format!("expected 1 to {MAX_KEEPCNT} (TCP_KEEPCNT), found {}", k.probes),
            ));
        }
        if !k.cgroups.is_empty() && k.floor >= k.cgroup_timeout {
            return Err(bad(
                "keepalive",
                None,
                "floor",
                format!(
                    "keepalive.floor ({}) must be below keepalive.cgroup_timeout ({}) or no keepalive can refresh in time",
                    crate::model::time::fmt_exact(k.floor),
                    crate::model::time::fmt_exact(k.cgroup_timeout)
                ),
            ));
        }
        for c in &k.cgroups {
            if c.trim_matches('/').is_empty() || c.split('/').any(|p| p == "..") {
                return Err(bad(
                    "keepalive",
                    None,
                    "cgroups",
                    format!(
                        "`{c}` is not a cgroup path below the cgroup2 mount (e.g. \"system.slice/app.service\")"
                    ),
                ));
            }
        }
        range(self.eviction.margin, Duration::ZERO, DAY, "eviction", "margin")?;
        let l = &self.leaks;
        range(l.close_wait_after, SECS(1), DAY, "leaks", "close_wait_after")?;
        range(l.held_after, SECS(1), DAY, "leaks", "held_after")?;
        range(l.fin_wait2_after, SECS(1), DAY, "leaks", "fin_wait2_after")?;
        range(l.last_ack_after, SECS(1), DAY, "leaks", "last_ack_after")?;
        range(l.half_open_silence, SECS(1), DAY, "leaks", "half_open_silence")?;
        range(l.quiet_for, Duration::ZERO, DAY, "leaks", "quiet_for")?;
        range(l.release_grace, MS(100), SECS(3600), "leaks", "release_grace")?;
        if l.half_open_probes == 0 || l.half_open_retransmits == 0 {
            let key = if l.half_open_probes == 0 {
                "half_open_probes"
            } else {
                "half_open_retransmits"
            };
            return Err(bad("leaks", None, key, "expected at least 1"));
        }
        range(
            self.ledger.horizon,
            SECS(1),
            SECS(30 * 86_400),
            "ledger",
            "horizon",
        )?;
        if !(1..=100).contains(&self.learning.min_evictions) {
            return Err(bad("learning", None, "min_evictions", "expected 1 to 100"));
        }
        if !self.learning.state_file.is_absolute() {
            return Err(bad(
                "learning",
                None,
                "state_file",
                "expected an absolute path, e.g. /var/lib/holdfast/learned-paths.json",
            ));
        }
        self.validate_agent()?;
        self.validate_profiles_and_rules()?;
        self.validate_services()
    }

    fn validate_agent(&self) -> Result<(), Bad> {
        let a = &self.agent;
        if !a.socket.is_absolute() {
            return Err(bad("agent", None, "socket", "expected an absolute path"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if a.socket.as_os_str().len() > 107 {
            return Err(bad(
                "agent",
                None,
                "socket",
                format!(
                    "the path is {} bytes long; a unix socket path holds at most 107",
                    a.socket.as_os_str().len()
                ),
            ));
        }
        if a.socket.is_dir() {
            return Err(bad(
                "agent",
                None,
                "socket",
                "names a directory; give the socket's file path, e.g. /run/holdfast/holdfast.sock",
            ));
        }
        if a.socket
            .parent()
            .is_none_or(|p| p.as_os_str().is_empty() || p == Path::new("/"))
        {
            return Err(bad(
                "agent",
                None,
                "socket",
                "the socket must live in a directory of its own (e.g. /run/holdfast/holdfast.sock)",
            ));
        }
        if !(1..=4096).contains(&a.max_clients) {
            return Err(bad("agent", None, "max_clients", "expected 1 to 4096"));
        }
        if a.metrics_socket && a.socket.file_name().is_some_and(|n| n == "metrics.sock") {
            return Err(bad(
                "agent",
                None,
                "socket",
                "with metrics_socket on, metrics.sock beside the CLI socket is the metrics' own: name the CLI socket otherwise (e.g. holdfast.sock)",
            ));
        }
        if a.metrics.is_some_and(|m| !m.ip().is_loopback()) {
            return Err(bad(
                "agent",
                None,
                "metrics",
                "expected a loopback address such as 127.0.0.1:9464 (metrics are not served to the network)",
            ));
        }
        for (key, g) in [
            ("read_group", Some(&a.read_group)),
            ("admin_group", a.admin_group.as_ref()),
        ] {
            if let Some(g) = g
                && (g.is_empty() || g.contains([':', '\n', '/']))
            {
                return Err(bad("agent", None, key, format!("`{g}` is not a group name")));
            }
        }
        Ok(())
    }

    fn validate_profiles_and_rules(&self) -> Result<(), Bad> {
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.profiles.iter().enumerate() {
            if p.name.is_empty()
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err(bad(
                    "profiles",
                    Some(i),
                    "name",
                    format!("`{}` is not a profile name (letters, digits, - _ .)", p.name),
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(bad(
                    "profiles",
                    Some(i),
                    "name",
                    format!("profile `{}` is defined twice", p.name),
                ));
            }
            if p.idle_timeout < SECS(1) || p.idle_timeout > SECS(30 * 86_400) {
                return Err(bad(
                    "profiles",
                    Some(i),
                    "idle_timeout",
                    "expected a duration between 1s and 30d",
                ));
            }
        }
        let known: Vec<String> = self.profiles().into_iter().map(|p| p.name).collect();
        let exists = |n: &str| known.iter().any(|k| k == n);
        if !exists(&self.eviction.default_profile) {
            return Err(bad(
                "eviction",
                None,
                "default_profile",
                format!(
                    "unknown profile `{}`; `holdfast profiles` lists them ({})",
                    self.eviction.default_profile,
                    known.join(", ")
                ),
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.cidr.is_none()
                && r.port.is_none()
                && r.comm.is_none()
                && r.unit.is_none()
                && r.cgroup.is_none()
                && r.netns.is_none()
            {
                return Err(bad(
                    "rules",
                    Some(i),
                    "",
                    "a rule needs at least one match key (cidr, port, comm, unit, cgroup, netns); to change what applies to every flow set eviction.default_profile",
                ));
            }
            if r.port == Some(0) {
                return Err(bad("rules", Some(i), "port", "expected a port from 1 to 65535"));
            }
            match (&r.profile, r.timeout) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "rules",
                        Some(i),
                        "timeout",
                        "give either `profile` or `timeout`, not both",
                    ));
                }
                (None, None) => {
                    return Err(bad(
                        "rules",
                        Some(i),
                        "",
                        "a rule needs `profile = \"NAME\"` or `timeout = \"350s\"` to say what applies",
                    ));
                }
                (Some(p), None) if !exists(p) => {
                    return Err(bad(
                        "rules",
                        Some(i),
                        "profile",
                        format!(
                            "unknown profile `{p}`; define it in [[profiles]] or use one of {}",
                            known.join(", ")
                        ),
                    ));
                }
                (None, Some(t)) if t < SECS(1) || t > SECS(30 * 86_400) => {
                    return Err(bad(
                        "rules",
                        Some(i),
                        "timeout",
                        "expected a duration between 1s and 30d",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn validate_services(&self) -> Result<(), Bad> {
        let mut names = std::collections::HashSet::new();
        for (i, sv) in self.services.iter().enumerate() {
            if sv.name.is_empty()
                || (sv.comm.is_none() && sv.unit.is_none() && sv.cgroup.is_none() && sv.port.is_none())
            {
                return Err(bad(
                    "services",
                    Some(i),
                    "name",
                    "a service needs a `name` and at least one of comm, unit, cgroup, port",
                ));
            }
            if !names.insert(sv.name.as_str()) {
                return Err(bad(
                    "services",
                    Some(i),
                    "name",
                    format!("service `{}` is defined twice", sv.name),
                ));
            }
            if sv.port == Some(0) {
                return Err(bad(
                    "services",
                    Some(i),
                    "port",
                    "expected a port from 1 to 65535",
                ));
            }
            if sv.max_sessions == Some(0) {
                return Err(bad("services", Some(i), "max_sessions", "expected at least 1"));
            }
            if let Some(d) = sv.restart_min_interval
                && (d < SECS(10) || d > SECS(30 * 86_400))
            {
                return Err(bad(
                    "services",
                    Some(i),
                    "restart_min_interval",
                    "expected a duration between 10s and 30d",
                ));
            }
            if let Some(cmd) = &sv.restart_command
                && (cmd.is_empty() || cmd[0].is_empty() || !Path::new(&cmd[0]).is_absolute())
            {
                return Err(bad(
                    "services",
                    Some(i),
                    "restart_command",
                    "expected an argv list whose first element is an absolute path, e.g. [\"/usr/bin/systemctl\", \"restart\", \"app\"]",
                ));
            }
            if sv.restart.is_some_and(|m| m != super::RemedyMode::Off)
                && sv.unit.is_none()
                && sv.restart_command.is_none()
            {
                return Err(bad(
                    "services",
                    Some(i),
                    "restart",
                    "a restart needs the service's systemd `unit` or a `restart_command`",
                ));
            }
        }
        Ok(())
    }
}
