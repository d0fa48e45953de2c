//! The agent's configuration file (TOML) and its validation.
//!
//! Errors name the file, the line, the key and what was expected, so a bad config is fixed in
//! one look; an agent that is already running keeps its old config when a new one is refused.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::human::parse_duration;

pub const DEFAULT_PATH: &str = "/etc/holdfast/holdfast.toml";
pub const DEFAULT_SOCKET: &str = "/run/holdfast/holdfast.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF if the kernel allows it, else poll (with one warning saying why).
    #[default]
    Auto,
    /// eBPF only: fail at start if the programs cannot load.
    Ebpf,
    /// sock_diag + procfs polling only.
    Poll,
}

/// How a remedy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemedyMode {
    /// Never act.
    Off,
    /// Report the planned action once; change nothing.
    DryRun,
    /// Act (policy-gated, rate-limited, logged with before/after).
    Enforce,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    pub mode: Mode,
    pub socket: PathBuf,
    /// Members of this group may query the agent (root always may).
    pub read_group: String,
    /// Members of this group may also change things (remedies, reload); root always may.
    pub admin_group: Option<String>,
    /// Write finding transitions and remedy outcomes to journald (when it runs).
    pub journal: bool,
    /// Prometheus metrics on this loopback address (off when unset), e.g. "127.0.0.1:9464".
    pub metrics: Option<std::net::SocketAddr>,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            socket: DEFAULT_SOCKET.into(),
            read_group: "holdfast".into(),
            admin_group: None,
            journal: true,
            metrics: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSection {
    /// Poll mode: how often the whole TCP table is read (sock_diag).
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// eBPF mode: how often the iterator reads the sockets worth a look (idle ones, troubled
    /// ones, new ones: the kernel filters out the rest).
    #[serde(deserialize_with = "duration")]
    pub ebpf_interval: Duration,
    /// eBPF mode: how often a complete snapshot heals what events and filtered reads missed.
    #[serde(deserialize_with = "duration")]
    pub full_interval: Duration,
}

impl Default for SnapshotSection {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            ebpf_interval: Duration::from_secs(10),
            full_interval: Duration::from_secs(120),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ZombiesSection {
    /// Zombies younger than this are normal (the parent is about to reap) and not reported.
    #[serde(deserialize_with = "duration")]
    pub min_age: Duration,
    /// Poll mode: how often /proc is scanned for zombies.
    #[serde(deserialize_with = "duration")]
    pub scan_interval: Duration,
    /// eBPF mode: how often a /proc scan heals lost exit/free events.
    #[serde(deserialize_with = "duration")]
    pub heal_interval: Duration,
}

impl Default for ZombiesSection {
    fn default() -> Self {
        Self {
            min_age: Duration::from_secs(5),
            scan_interval: Duration::from_secs(2),
            heal_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemediesSection {
    /// SIGCHLD nudge to a parent whose handler missed a signal (it only delivers a signal the
    /// parent already expects, so it is on by default).
    pub sigchld: RemedyMode,
}

impl Default for RemediesSection {
    fn default() -> Self {
        Self {
            sigchld: RemedyMode::Enforce,
        }
    }
}

fn ratio<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "expected a ratio between 0 and 1 (exclusive), found {v}"
        )))
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map(Some).map_err(serde::de::Error::custom)
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvictionSection {
    /// Profile for flows via a gateway that no rule matches.
    pub default_profile: String,
    /// `idle-near-eviction` fires at this share of the idle timeout.
    #[serde(deserialize_with = "ratio")]
    pub warn_ratio: f64,
}

impl Default for EvictionSection {
    fn default() -> Self {
        Self {
            default_profile: "home-router".into(),
            warn_ratio: 0.8,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveSection {
    /// The keepalive remedy (it only adds probes, so it is on by default).
    pub mode: RemedyMode,
    /// TCP_KEEPIDLE = idle timeout x this ratio (SIP session timers refresh at half the interval).
    #[serde(deserialize_with = "ratio")]
    pub refresh_ratio: f64,
    /// TCP_KEEPIDLE is never set below this (as SIP's Min-SE bounds refresh rates).
    #[serde(deserialize_with = "duration")]
    pub floor: Duration,
    /// TCP_KEEPCNT: unanswered probes before the peer is declared dead.
    pub probes: u32,
    /// cgroup v2 paths (relative to the cgroup2 mount) whose new connections get keepalive at
    /// establishment (sock_ops in eBPF mode; at first sight through a pidfd in poll mode).
    pub cgroups: Vec<String>,
    /// Idle timeout assumed for the cgroups' connections (the values follow the same rules).
    #[serde(deserialize_with = "duration")]
    pub cgroup_timeout: Duration,
}

impl Default for KeepaliveSection {
    fn default() -> Self {
        Self {
            mode: RemedyMode::Enforce,
            refresh_ratio: 0.5,
            floor: Duration::from_secs(30),
            probes: 4,
            cgroups: Vec::new(),
            cgroup_timeout: Duration::from_secs(240),
        }
    }
}

/// A profile defined (or overridden) in the config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub name: String,
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "yes")]
    pub keepalive_resets: bool,
    #[serde(default)]
    pub source: String,
}

fn yes() -> bool {
    true
}

/// Which idle timeout applies to matching flows. Every given match key must match.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Remote address prefix.
    pub cidr: Option<crate::cidr::Cidr>,
    /// Local or remote port.
    pub port: Option<u16>,
    /// Owner's command name.
    pub comm: Option<String>,
    /// Owner's systemd unit.
    pub unit: Option<String>,
    /// Owner's cgroup path prefix.
    pub cgroup: Option<String>,
    pub profile: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Overrides keepalive.mode for matching flows.
    pub keepalive: Option<RemedyMode>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaksSection {
    /// CLOSE_WAIT longer than this is a leak: the peer closed and the program never did.
    #[serde(deserialize_with = "duration")]
    pub close_wait_after: Duration,
    /// FIN_WAIT2 longer than this (beyond the kernel's tcp_fin_timeout) is stuck.
    #[serde(deserialize_with = "duration")]
    pub fin_wait2_after: Duration,
    /// LAST_ACK longer than this is stuck.
    #[serde(deserialize_with = "duration")]
    pub last_ack_after: Duration,
    /// half-open: no ACK from the peer for at least this long ...
    #[serde(deserialize_with = "duration")]
    pub half_open_silence: Duration,
    /// ... and at least this many unanswered keepalive / zero-window probes ...
    pub half_open_probes: u8,
    /// ... or unacked data retransmitted at least this many times.
    pub half_open_retransmits: u8,
    /// The `close` remedy (opt-in): off, dry-run (default) or enforce.
    pub close: RemedyMode,
    /// Never close a socket that carried data more recently than this.
    #[serde(deserialize_with = "duration")]
    pub quiet_for: Duration,
}

impl Default for LeaksSection {
    fn default() -> Self {
        Self {
            close_wait_after: Duration::from_secs(60),
            fin_wait2_after: Duration::from_secs(120),
            last_ack_after: Duration::from_secs(120),
            half_open_silence: Duration::from_secs(10),
            half_open_probes: 2,
            half_open_retransmits: 3,
            close: RemedyMode::DryRun,
            quiet_for: Duration::from_secs(30),
        }
    }
}

/// A service for the session ledger: flows whose owner matches are counted together.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub comm: Option<String>,
    pub unit: Option<String>,
    pub cgroup: Option<String>,
    /// Local port the service serves.
    pub port: Option<u16>,
    /// Its hard session limit (e.g. 149 for a media bridge).
    pub max_sessions: Option<u64>,
    /// Overrides leaks.close for this service's sockets.
    pub close: Option<RemedyMode>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    /// `session-budget` fires at this share of the limit ...
    #[serde(deserialize_with = "ratio")]
    pub warn_ratio: f64,
    /// ... or when the trend reaches the limit within this horizon.
    #[serde(deserialize_with = "duration")]
    pub horizon: Duration,
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            warn_ratio: 0.8,
            horizon: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: AgentSection,
    pub snapshot: SnapshotSection,
    pub zombies: ZombiesSection,
    pub remedies: RemediesSection,
    pub eviction: EvictionSection,
    pub keepalive: KeepaliveSection,
    pub profiles: Vec<ProfileConfig>,
    pub rules: Vec<Rule>,
    pub leaks: LeaksSection,
    pub ledger: LedgerSection,
    pub services: Vec<ServiceConfig>,
}

impl Config {
    /// Built-in profiles with this config's additions and overrides.
    pub fn profiles(&self) -> Vec<crate::profiles::Profile> {
        let extra: Vec<crate::profiles::Profile> = self
            .profiles
            .iter()
            .map(|p| crate::profiles::Profile {
                name: p.name.clone(),
                idle_timeout_s: p.idle_timeout.as_secs(),
                keepalive_resets: p.keepalive_resets,
                on_expiry: "as configured".into(),
                source: if p.source.is_empty() {
                    "config".into()
                } else {
                    p.source.clone()
                },
            })
            .collect();
        crate::profiles::merged(&extra)
    }
}

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
        cfg.validate(text, path)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str, path: &str) -> Result<(), ConfigError> {
        let line_of = |needle: &str| {
            text.lines()
                .position(|l| l.trim_start().starts_with(needle))
                .map_or(1, |i| i + 1)
        };
        let check = |ok: bool, key: &str, short: &str, message: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    path: path.into(),
                    line: line_of(short),
                    key: key.into(),
                    message: message.into(),
                })
            }
        };
        check(
            self.snapshot.poll_interval >= Duration::from_millis(100),
            "snapshot.poll_interval",
            "poll_interval",
            "expected at least 100ms (each read walks the whole TCP table)",
        )?;
        check(
            self.snapshot.ebpf_interval >= Duration::from_millis(100),
            "snapshot.ebpf_interval",
            "ebpf_interval",
            "expected at least 100ms",
        )?;
        let svc_lines: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim() == "[[services]]")
            .map(|(i, _)| i + 1)
            .collect();
        for (i, sv) in self.services.iter().enumerate() {
            if sv.name.is_empty()
                || (sv.comm.is_none() && sv.unit.is_none() && sv.cgroup.is_none() && sv.port.is_none())
            {
                return Err(ConfigError::Invalid {
                    path: path.into(),
                    line: svc_lines.get(i).copied().unwrap_or(1),
                    key: format!("services[{i}]"),
                    message: "a service needs a `name` and at least one of comm, unit, cgroup, port".into(),
                });
            }
        }
        check(
            self.agent.metrics.is_none_or(|a| a.ip().is_loopback()),
            "agent.metrics",
            "metrics",
            "expected a loopback address such as 127.0.0.1:9464 (metrics are not served to the network)",
        )?;
        check(
            self.agent.socket.is_absolute(),
            "agent.socket",
            "socket",
            "expected an absolute path",
        )?;
        Ok(())
    }

    /// Loads `path`; when `path` is the default and does not exist, the defaults apply.
    pub fn load(path: &Path, explicit: bool) -> Result<(Self, bool), ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Self::parse(&text, &path.display().to_string())?, true)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok((Self::default(), false)),
            Err(e) => Err(ConfigError::Read {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_a_full_file() {
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
        let c = Config::parse(
            "[agent]\nmode = \"poll\"\nsocket = \"/tmp/h.sock\"\n[snapshot]\npoll_interval = \"250ms\"\n",
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
        let e = Config::parse("[remedies]\nsigchld = \"yes\"\n", "f")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f:2: key `remedies.sigchld`") && e.contains("dry-run"),
            "{e}"
        );
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

        let e = Config::parse("[snapshot]\n\npoll_interval = \"10\"\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f:3: key `snapshot.poll_interval`"), "{e}");
        assert!(e.contains("needs a unit"), "{e}");

        let e = Config::parse("[agent]\nsokcet = \"/x\"\n", "f")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f:2") && e.contains("sokcet") && e.contains("expected one of"),
            "{e}"
        );

        let e = Config::parse("[agent\n", "f").unwrap_err().to_string();
        assert!(e.starts_with("f:1"), "{e}");

        let e = Config::parse("[snapshot]\npoll_interval = \"1ms\"\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f:2") && e.contains("at least 100ms"), "{e}");

        let e = Config::parse("[agent]\nsocket = \"rel/x\"\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
    }

    #[test]
    fn missing_default_file_means_defaults_but_missing_explicit_file_is_an_error() {
        let p = Path::new("/nonexistent/holdfast.toml");
        assert_eq!(Config::load(p, false).unwrap(), (Config::default(), false));
        assert!(matches!(Config::load(p, true), Err(ConfigError::Read { .. })));
    }
}
