//! Reading and validating a configuration file. Every error names the file, the line, the key
//! and what was expected; nothing in a file can panic the agent or make it spin.
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use super::Config;

/// A configuration file larger than this is refused (the documented example is 4 KiB).
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}:{line}: key `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

/// Finds the dotted key a byte offset of the file belongs to: the nearest `[table]` above and
/// the `key =` of that line.
fn key_at(text: &str, offset: usize) -> (usize, String) {
    let line_no = text[..offset.min(text.len())].matches('\n').count() + 1;
    let mut table = String::new();
    let mut key = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            if i + 1 == line_no {
                key = table.clone();
            }
        }
        if i + 1 == line_no {
            if let Some((k, _)) = t.split_once('=') {
                let k = k.trim();
                key = if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                };
            }
            break;
        }
    }
    (line_no, key)
}

/// The line of `key` in table `table` (its `index`-th instance for an array of tables), else the
/// table's header line, else 1.
fn locate(text: &str, table: &str, index: Option<usize>, key: &str) -> usize {
    let mut current = String::new();
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut header = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let n = seen.entry(name.trim().to_string()).or_insert(0);
            current = format!("{}#{}", name.trim(), *n);
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            current = name.trim().to_string();
        } else {
            let in_table = match index {
                Some(ix) => current == format!("{table}#{ix}"),
                None => current == table,
            };
            if in_table && t.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
                return i + 1;
            }
            continue;
        }
        let wanted = match index {
            Some(ix) => current == format!("{table}#{ix}"),
            None => current == table,
        };
        if wanted && header.is_none() {
            header = Some(i + 1);
        }
    }
    header.unwrap_or(1)
}

/// One validation rule's failure, before it is placed in the file.
struct Bad {
    table: &'static str,
    index: Option<usize>,
    key: &'static str,
    message: String,
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
    /// Parses config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, key) = e
                .span()
                .map(|s| key_at(text, s.start))
                .unwrap_or((1, String::new()));
            ConfigError::Invalid {
                path: path.into(),
                line,
                key,
                message: e.message().trim().to_string(),
            }
        })?;
        cfg.validate().map_err(|b| {
            let dotted = match b.index {
                Some(i) => format!("{}[{i}].{}", b.table, b.key),
                None if b.key.is_empty() => b.table.to_string(),
                None => format!("{}.{}", b.table, b.key),
            };
            ConfigError::Invalid {
                path: path.into(),
                line: locate(text, b.table, b.index, b.key),
                key: dotted.trim_end_matches('.').to_string(),
                message: b.message,
            }
        })?;
        Ok(cfg)
    }

    /// Ranges and cross-references that the types alone cannot express.
    fn validate(&self) -> Result<(), Bad> {
        let s = &self.snapshot;
        range(s.poll_interval, MS(100), DAY, "snapshot", "poll_interval")?;
        range(s.ebpf_interval, MS(100), DAY, "snapshot", "ebpf_interval")?;
        range(s.full_interval, MS(100), DAY, "snapshot", "full_interval")?;
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

    /// Loads `path`; when `path` is the default and does not exist, the defaults apply.
    pub fn load(path: &Path, explicit: bool) -> Result<(Self, bool), ConfigError> {
        let shown = path.display().to_string();
        let err = |reason: String| ConfigError::Read {
            path: shown.clone(),
            reason,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok((Self::default(), false));
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        let mut text = String::new();
        file.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| err(format!("{e} (expected UTF-8 TOML)")))?;
        if text.len() as u64 > MAX_FILE {
            return Err(err(format!(
                "larger than {} KiB; this is not a holdfast configuration",
                MAX_FILE >> 10
            )));
        }
        Ok((Self::parse(&text, &shown)?, true))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Mode, RemedyMode};
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "f").unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_a_full_file() {
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
        let c = Config::parse(
            "[agent]\nmode = \"poll\"\nsocket = \"/tmp/h/h.sock\"\n[snapshot]\npoll_interval = \"250ms\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.agent.mode, Mode::Poll);
        assert_eq!(c.snapshot.poll_interval, Duration::from_millis(250));
        assert_eq!(c.snapshot.ebpf_interval, Duration::from_secs(10));
        let c = Config::parse(
            "[zombies]\nmin_age = \"0s\"\n[remedies]\nsigchld = \"dry-run\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.zombies.min_age, Duration::ZERO);
        assert_eq!(c.remedies.sigchld, RemedyMode::DryRun);
        let e = err("[remedies]\nsigchld = \"yes\"\n");
        assert!(
            e.contains("f:2: key `remedies.sigchld`") && e.contains("dry-run"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_example_is_valid_and_shows_back_as_the_same_config() {
        let text = include_str!("../../../packaging/holdfast.toml.example");
        let c = Config::parse(text, "example").unwrap();
        let shown = c.to_toml();
        assert_eq!(Config::parse(&shown, "shown").unwrap(), c, "{shown}");
    }

    #[test]
    fn errors_name_file_line_key_and_expectation() {
        let e = Config::parse("[agent]\nmode = \"fast\"\n", "/etc/h.toml").unwrap_err();
        let ConfigError::Invalid {
            path,
            line,
            key,
            message,
        } = e
        else {
            panic!()
        };
        assert_eq!(
            (path.as_str(), line, key.as_str()),
            ("/etc/h.toml", 2, "agent.mode")
        );
        assert!(message.contains("auto") && message.contains("poll"), "{message}");
        let e = err("[snapshot]\n\npoll_interval = \"10\"\n");
        assert!(
            e.starts_with("f:3: key `snapshot.poll_interval`") && e.contains("needs a unit"),
            "{e}"
        );
        let e = err("[agent]\nsokcet = \"/x\"\n");
        assert!(
            e.contains("f:2") && e.contains("sokcet") && e.contains("expected one of"),
            "{e}"
        );
        assert!(err("[agent\n").starts_with("f:1"));
        let e = err("[snapshot]\npoll_interval = \"1ms\"\n");
        assert!(e.contains("f:2") && e.contains("between 100ms and 1d"), "{e}");
        assert!(err("[agent]\nsocket = \"rel/x\"\n").contains("absolute"));
    }

    #[test]
    fn nonsense_is_refused_with_the_key_that_holds_it() {
        let cases: &[(&str, &str)] = &[
            (
                "[zombies]\nheal_interval = \"0s\"\n",
                "f:2: key `zombies.heal_interval`",
            ),
            (
                "[zombies]\nscan_interval = \"0s\"\n",
                "f:2: key `zombies.scan_interval`",
            ),
            (
                "[snapshot]\nfull_interval = \"0s\"\n",
                "f:2: key `snapshot.full_interval`",
            ),
            ("[keepalive]\nprobes = 0\n", "f:2: key `keepalive.probes`"),
            (
                "[keepalive]\nprobes = 4294967295\n",
                "f:2: key `keepalive.probes`",
            ),
            (
                "[eviction]\ndefault_profile = \"nope\"\n",
                "f:2: key `eviction.default_profile`: unknown profile `nope`",
            ),
            (
                "[[rules]]\ncidr = \"10.0.0.0/8\"\nprofile = \"nope\"\n",
                "f:3: key `rules[0].profile`: unknown profile `nope`",
            ),
            (
                "[[rules]]\nport = 22\nprofile = \"azure-lb\"\n[[rules]]\nport = 23\nprofile = \"azure-lb\"\ntimeout = \"5s\"\n",
                "f:7: key `rules[1].timeout`: give either",
            ),
            ("[[rules]]\nport = 22\n", "f:1: key `rules[0]`: a rule needs"),
            (
                "[[profiles]]\nname = \"a\"\nidle_timeout = \"1m\"\n[[profiles]]\nname = \"a\"\nidle_timeout = \"2m\"\n",
                "f:5: key `profiles[1].name`: profile `a` is defined twice",
            ),
            (
                "[[profiles]]\nname = \"\"\nidle_timeout = \"1m\"\n",
                "f:2: key `profiles[0].name`",
            ),
            (
                "[[profiles]]\nname = \"x\"\nidle_timeout = \"0s\"\n",
                "f:3: key `profiles[0].idle_timeout`",
            ),
            (
                "[[rules]]\nport = 1\ntimeout = \"0s\"\n",
                "f:3: key `rules[0].timeout`",
            ),
            (
                "[agent]\nsocket = \"/run/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.sock\"\n",
                "at most 107",
            ),
            ("[agent]\nsocket = \"/tmp\"\n", "names a directory"),
            (
                "[snapshot]\nfull_interval = \"18446744073709551615s18446744073709551615s\"\n",
                "f:2: key `snapshot.full_interval`",
            ),
            (
                "[[services]]\nname = \"a\"\ncomm = \"a\"\nrestart = \"enforce\"\n",
                "needs the service's systemd `unit`",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{text:?}\n got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn load_refuses_what_is_not_a_config_file() {
        let p = Path::new("/nonexistent/holdfast.toml");
        assert_eq!(Config::load(p, false).unwrap(), (Config::default(), false));
        assert!(matches!(Config::load(p, true), Err(ConfigError::Read { .. })));
        let e = Config::load(Path::new("/dev/zero"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Config::load(Path::new("/tmp"), true).unwrap_err().to_string();
        assert!(e.contains("/tmp"), "{e}");
    }
}
