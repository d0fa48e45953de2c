//! The agent's configuration file (TOML): its sections and defaults. `parse` reads and validates
//! a file (errors name the file, the line, the key and what was expected); `policy` turns a valid
//! configuration into the runtime policy the agent runs with.
pub mod cidr;
mod parse;
pub mod policy;
pub mod profiles;
pub mod trust;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::model::finding::RemedyMode;
use crate::model::time::{fmt_exact, parse_duration};
pub use parse::ConfigError;

pub const DEFAULT_PATH: &str = "/etc/holdfast/holdfast.toml";
pub const DEFAULT_SOCKET: &str = "/run/holdfast/holdfast.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
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

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map(Some).map_err(serde::de::Error::custom)
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&fmt_exact(*d))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&fmt_exact(*d)),
        None => s.serialize_none(),
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

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
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
    /// Any local user can read them there; `metrics_socket` serves them to the read group only.
    pub metrics: Option<std::net::SocketAddr>,
    /// Prometheus metrics on a unix socket beside the CLI socket (`metrics.sock` in its
    /// directory, owner root, group read_group, mode 0660).
    pub metrics_socket: bool,
    /// CLI connections served at once; more are refused with an error reply.
    pub max_clients: usize,
    /// Which network namespaces the agent watches: every one on the host, or only its own.
    pub namespaces: NamespaceScope,
}

impl AgentSection {
    /// Where `metrics_socket` serves: `metrics.sock` beside the CLI socket.
    pub fn metrics_socket_path(&self) -> PathBuf {
        self.socket.with_file_name("metrics.sock")
    }
}

/// The network namespaces an agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceScope {
    /// Every namespace with a process or a bind mount (`ip netns`, containers, pods): what an
    /// agent installed on a host should see. Entering them needs CAP_SYS_ADMIN.
    #[default]
    All,
    /// Only the namespace the agent runs in (an agent inside one container).
    Own,
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
            metrics_socket: false,
            max_clients: 64,
            namespaces: NamespaceScope::All,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSection {
    /// Poll mode: how often the whole TCP table is read (sock_diag).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub poll_interval: Duration,
    /// eBPF mode: how often the iterator reads the sockets worth a look (idle ones, troubled
    /// ones, new ones: the kernel filters out the rest).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub ebpf_interval: Duration,
    /// eBPF mode: how often a complete snapshot heals what events and filtered reads missed.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub full_interval: Duration,
    /// The share of one core periodic reads may take, in percent, their merge into the table
    /// counted; reads are spaced further apart than the interval when they cost more. Default:
    /// 0.5 in poll mode (its complete reads), 1 in eBPF mode (its filtered reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_cpu_percent: Option<f64>,
}

impl Default for SnapshotSection {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            ebpf_interval: Duration::from_secs(10),
            full_interval: Duration::from_secs(120),
            read_cpu_percent: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ZombiesSection {
    /// Zombies younger than this are normal (the parent is about to reap) and not reported.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub min_age: Duration,
    /// Poll mode: how often /proc is scanned for zombies.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub scan_interval: Duration,
    /// eBPF mode: how often a /proc scan heals lost exit/free events.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
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

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
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

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvictionSection {
    /// Profile for flows via a gateway that no rule matches.
    pub default_profile: String,
    /// `idle-near-eviction` fires at this share of the idle timeout ...
    #[serde(deserialize_with = "ratio")]
    pub warn_ratio: f64,
    /// ... or this long before the timeout, whichever comes first (never less than three
    /// evaluation intervals).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub margin: Duration,
}

impl Default for EvictionSection {
    fn default() -> Self {
        Self {
            default_profile: "home-router".into(),
            warn_ratio: 0.8,
            margin: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveSection {
    /// The keepalive remedy (it only adds probes, so it is on by default).
    pub mode: RemedyMode,
    /// TCP_KEEPIDLE = idle timeout x this ratio (SIP session timers refresh at half the interval).
    #[serde(deserialize_with = "ratio")]
    pub refresh_ratio: f64,
    /// TCP_KEEPIDLE is never set below this (as SIP's Min-SE bounds refresh rates).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub floor: Duration,
    /// TCP_KEEPCNT: unanswered probes before the peer is declared dead (1 to 127).
    pub probes: u32,
    /// cgroup v2 paths (relative to the cgroup2 mount) whose new connections get keepalive at
    /// establishment (sock_ops in eBPF mode; at first sight through a pidfd in poll mode).
    pub cgroups: Vec<String>,
    /// Idle timeout assumed for the cgroups' connections (the values follow the same rules).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
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
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub name: String,
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    #[serde(default = "yes")]
    pub keepalive_resets: bool,
    #[serde(default)]
    pub source: String,
}

fn yes() -> bool {
    true
}

/// Which idle timeout applies to matching flows. Every given match key must match; exactly one
/// of `profile` and `timeout` says what applies.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Remote address prefix.
    pub cidr: Option<cidr::Cidr>,
    /// Local or remote port.
    pub port: Option<u16>,
    /// Owner's command name.
    pub comm: Option<String>,
    /// Owner's systemd unit.
    pub unit: Option<String>,
    /// Owner's cgroup path prefix.
    pub cgroup: Option<String>,
    /// The flow's network namespace: an `ip netns` name, a container name or id, or net:[inode].
    pub netns: Option<String>,
    pub profile: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Overrides keepalive.mode for matching flows.
    pub keepalive: Option<RemedyMode>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaksSection {
    /// CLOSE_WAIT longer than this is a leak: the peer closed and the program never did.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub close_wait_after: Duration,
    /// FIN_WAIT2 longer than this (beyond the kernel's tcp_fin_timeout) is stuck.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub fin_wait2_after: Duration,
    /// LAST_ACK longer than this is stuck.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub last_ack_after: Duration,
    /// half-open: no ACK from the peer for at least this long ...
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub half_open_silence: Duration,
    /// ... and at least this many unanswered keepalive / zero-window probes ...
    pub half_open_probes: u8,
    /// ... or unacked data retransmitted at least this many times.
    pub half_open_retransmits: u8,
    /// The `close` remedy (opt-in): off, dry-run (default) or enforce.
    pub close: RemedyMode,
    /// Never close a socket that carried data more recently than this.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub quiet_for: Duration,
    /// After a close, how long the owner has to release its descriptor before holdfast says the
    /// slot is still taken.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub release_grace: Duration,
    /// A descriptor held to a dead TCP socket this long is reported (`dead-socket-held`): the
    /// program missed the socket's end and keeps its slot.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    pub held_after: Duration,
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
            release_grace: Duration::from_secs(10),
            held_after: Duration::from_secs(30),
        }
    }
}

/// A service for the session ledger: flows whose owner matches are counted together.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
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
    /// The restart remedy for this service (default off).
    pub restart: Option<RemedyMode>,
    /// Restart only when at most this many sessions are live (the quietest moment).
    pub restart_when_live_at_most: Option<u64>,
    /// Never restart more often than this.
    #[serde(
        default,
        deserialize_with = "opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub restart_min_interval: Option<Duration>,
    /// Without a systemd unit: the command that restarts the service (argv, no shell).
    pub restart_command: Option<Vec<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    /// `session-budget` fires at this share of the limit ...
    #[serde(deserialize_with = "ratio")]
    pub warn_ratio: f64,
    /// ... or when the trend reaches the limit within this horizon.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
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

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
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
    pub learning: LearningSection,
}

/// Learning each path's idle timeout from the host's own flows (see `holdfast profiles`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LearningSection {
    /// Learn from evictions (upper bounds) and survivals (lower bounds); a rule always wins.
    pub enabled: bool,
    /// Evictions on a path before its learnt timeout is used.
    pub min_evictions: u32,
    /// Where the evidence is kept across restarts (the unit's StateDirectory).
    pub state_file: PathBuf,
}

impl Default for LearningSection {
    fn default() -> Self {
        LearningSection {
            enabled: true,
            min_evictions: 2,
            state_file: PathBuf::from("/var/lib/holdfast/learned-paths.json"),
        }
    }
}

impl Config {
    /// Built-in profiles with this config's additions and overrides.
    pub fn profiles(&self) -> Vec<profiles::Profile> {
        let extra: Vec<profiles::Profile> = self
            .profiles
            .iter()
            .map(|p| profiles::Profile {
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
        profiles::merged(&extra)
    }

    /// The effective configuration as TOML (`config check --show`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}
