//! The runtime policy: everything the agent decides with, built from a valid configuration at
//! start and rebuilt on every reload (the snapshot thread gets its part by message). Nothing is
//! computed once and forgotten.
use std::time::Duration;

use super::profiles::Profile;
use super::{Config, KeepaliveSection, LeaksSection, LedgerSection, Rule, ServiceConfig};
use crate::model::eviction::KaValues;
use crate::model::finding::RemedyMode;
use crate::model::time::{Nanos, fmt_ms};

/// Everything that decides which idle timeout applies and when a flow is at risk.
#[derive(Clone, Debug)]
pub struct EvictionPolicy {
    pub profiles: Vec<Profile>,
    pub rules: Vec<Rule>,
    pub default_profile: String,
    pub warn_ratio: f64,
    /// Warn (and act) at least this long before the timeout.
    pub margin_ms: u64,
    pub keepalive: KeepaliveSection,
    /// The shortest idle timeout any flow can get from rules and the default profile: flows
    /// idler than the warn point of it are the only ones that need a full assessment.
    pub min_timeout_ms: u64,
}

impl EvictionPolicy {
    /// The idle time at which a flow with this timeout is reported (and given keepalive):
    /// min(warn_ratio x timeout, timeout - margin).
    pub fn warn_at_ms(&self, timeout_ms: u64) -> u64 {
        let by_ratio = (timeout_ms as f64 * self.warn_ratio) as u64;
        by_ratio
            .min(timeout_ms.saturating_sub(self.margin_ms))
            .max(timeout_ms / 4)
    }
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
    let cnt = k.probes.clamp(1, 127);
    let intvl = ((timeout_s - idle) / u64::from(cnt)).clamp(1, idle);
    Ok(KaValues {
        idle_s: idle.min(32_767) as u32,
        intvl_s: intvl.min(32_767) as u32,
        cnt,
    })
}

/// Remedy policy for zombies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZombiePolicy {
    pub min_age: Nanos,
    pub sigchld: RemedyMode,
}

/// How the snapshot thread paces itself (sent to it at start and on reload).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    /// Between two snapshots (filtered ones in eBPF mode).
    pub interval: Duration,
    /// eBPF mode: a complete snapshot this often heals what events and filtered snapshots missed.
    pub full_every: Duration,
    /// eBPF mode: the kernel leaves out ESTABLISHED sockets active within this many ms.
    pub filter_idle_ms: Option<u64>,
    /// Keepalive values the sock_ops program gives the configured cgroups' new connections.
    pub connect_values: Option<KaValues>,
    /// Watch every network namespace (else only the agent's own).
    pub all_netns: bool,
    /// Periodic reads take at most 1/`read_duty` of the time, their merge counted
    /// (`snapshot.read_cpu_percent`; `POLL_DUTY`, `FILTERED_DUTY` by default).
    pub read_duty: u32,
}

/// Poll mode reads every table each time (nothing else sees new and closed sockets): such a round
/// takes at most 1/POLL_DUTY of the time by default, read and merge counted. At 200k sockets a
/// round costs about 0.65 s: one about every 130 s, and the agent settles at 0.88 % of a core
/// where 1/100 gave 1.6-2.1 % (/proc/PID/stat over 180 s, 200k idle loopback sockets; 1.07-1.09 %
/// in the bench's 180 s window, which held two rounds). A read of a nearly empty table still
/// walks the kernel's whole TCP hash table (shared by every namespace unless
/// net.ipv4.tcp_child_ehash_entries is set): about 3 ms per address family and namespace on a
/// machine with 262 144 buckets, so even there rounds are about 1.4 s apart per namespace.
pub const POLL_DUTY: u32 = 200;
/// eBPF mode's periodic filtered reads take at most 1/FILTERED_DUTY of the time by default
/// (complete ones heal, at HEAL_DUTY_INVERSE).
pub const FILTERED_DUTY: u32 = 100;

#[derive(Clone, Debug)]
pub struct Policy {
    pub eviction: EvictionPolicy,
    pub leaks: LeaksSection,
    pub ledger: LedgerSection,
    pub services: Vec<ServiceConfig>,
    pub zombies: ZombiePolicy,
    pub pacing: Pacing,
    /// How often the flow detectors run over large tables.
    pub flows_period: Duration,
    /// How often the /proc zombie scan runs.
    pub proc_interval: Duration,
    pub learning: crate::config::LearningSection,
}

/// How often the flow detectors walk a large table: often enough to act within a third of the
/// margin before the shortest timeout, at least every 200 ms and at most every 2 s.
fn flows_period(min_timeout_ms: u64, warn_at_ms: u64) -> Duration {
    let margin = min_timeout_ms.saturating_sub(warn_at_ms);
    Duration::from_millis(margin / 3).clamp(Duration::from_millis(200), Duration::from_secs(2))
}

/// The shortest idle timeout a flow can get from the configuration.
fn min_timeout_ms(cfg: &Config, profiles: &[Profile]) -> u64 {
    let timeout = |name: &str| {
        profiles
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.idle_timeout_s.saturating_mul(1000))
    };
    let mut min = timeout(&cfg.eviction.default_profile).unwrap_or(600_000);
    for r in &cfg.rules {
        let t = r
            .timeout
            .map(|t| t.as_millis() as u64)
            .or_else(|| r.profile.as_deref().and_then(timeout));
        min = min.min(t.unwrap_or(min));
    }
    if !cfg.keepalive.cgroups.is_empty() {
        min = min.min(cfg.keepalive.cgroup_timeout.as_millis() as u64);
    }
    min
}

impl Policy {
    /// The policy for `cfg`. `ebpf` picks the snapshot cadence of the mode; `host_conntrack_s`
    /// is the shortest timeout not in the configuration: the namespaces' conntrack (flows may be
    /// cut by it) and the timeouts learnt per path.
    pub fn build(cfg: &Config, ebpf: bool, host_conntrack_s: Option<u64>) -> Policy {
        let profiles = cfg.profiles();
        let mut min_timeout = min_timeout_ms(cfg, &profiles);
        if let Some(ct) = host_conntrack_s {
            min_timeout = min_timeout.min(ct.saturating_mul(1000));
        }
        let eviction = EvictionPolicy {
            profiles,
            rules: cfg.rules.clone(),
            default_profile: cfg.eviction.default_profile.clone(),
            warn_ratio: cfg.eviction.warn_ratio,
            margin_ms: cfg.eviction.margin.as_millis() as u64,
            keepalive: cfg.keepalive.clone(),
            min_timeout_ms: min_timeout,
        };
        let warn_at = eviction.warn_at_ms(min_timeout);
        let period = flows_period(min_timeout, warn_at);
        // The evaluation cadence is part of the margin: never less than three periods.
        let eviction = EvictionPolicy {
            margin_ms: eviction.margin_ms.max(3 * period.as_millis() as u64),
            ..eviction
        };
        let interval = if ebpf {
            cfg.snapshot.ebpf_interval
        } else {
            cfg.snapshot.poll_interval
        };
        // The kernel may leave out flows that cannot reach the warn point before the next read
        // (two intervals of slack); below 1 s filtering is pointless.
        let filter_idle_ms = {
            let t = eviction
                .warn_at_ms(min_timeout)
                .saturating_sub(2 * interval.as_millis() as u64);
            (t >= 1000).then_some(t)
        };
        let connect_values = (!cfg.keepalive.cgroups.is_empty())
            .then(|| plan(cfg.keepalive.cgroup_timeout.as_secs(), &cfg.keepalive).ok())
            .flatten();
        Policy {
            eviction,
            leaks: cfg.leaks.clone(),
            ledger: cfg.ledger.clone(),
            services: cfg.services.clone(),
            zombies: ZombiePolicy {
                min_age: cfg.zombies.min_age.as_nanos() as u64,
                sigchld: cfg.remedies.sigchld,
            },
            pacing: Pacing {
                interval,
                full_every: cfg.snapshot.full_interval,
                filter_idle_ms,
                connect_values,
                all_netns: cfg.agent.namespaces == crate::config::NamespaceScope::All,
                // Validated: 0.1..=50 %, so 2..=1000.
                read_duty: cfg
                    .snapshot
                    .read_cpu_percent
                    .map_or(if ebpf { FILTERED_DUTY } else { POLL_DUTY }, |p| {
                        (100.0 / p).round().clamp(1.0, 1000.0) as u32
                    }),
            },
            flows_period: period,
            proc_interval: if ebpf {
                cfg.zombies.heal_interval
            } else {
                cfg.zombies.scan_interval
            },
            learning: cfg.learning.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(text, "t").unwrap()
    }

    #[test]
    fn defaults_give_a_filtered_ebpf_read_and_a_safe_margin() {
        let p = Policy::build(&Config::default(), true, None);
        // home-router: 600 s. Warn at min(480 s, 600 s - margin).
        assert_eq!(p.eviction.min_timeout_ms, 600_000);
        assert_eq!(p.eviction.warn_at_ms(600_000), 480_000);
        assert_eq!(p.flows_period, Duration::from_secs(2));
        assert_eq!(p.pacing.filter_idle_ms, Some(460_000));
        assert_eq!(p.pacing.connect_values, None);
        let poll = Policy::build(&Config::default(), false, None);
        assert_eq!(poll.pacing.interval, Duration::from_millis(500));
        assert_eq!(poll.proc_interval, Duration::from_secs(2));
        assert_eq!(
            (p.pacing.read_duty, poll.pacing.read_duty),
            (FILTERED_DUTY, POLL_DUTY)
        );
    }

    #[test]
    fn a_read_share_sets_how_far_apart_costly_reads_are() {
        let c = cfg("[snapshot]\nread_cpu_percent = 5\n");
        assert_eq!(Policy::build(&c, false, None).pacing.read_duty, 20);
        assert_eq!(Policy::build(&c, true, None).pacing.read_duty, 20);
        let c = cfg("[snapshot]\nread_cpu_percent = 0.1\n");
        assert_eq!(Policy::build(&c, false, None).pacing.read_duty, 1000);
    }

    #[test]
    fn the_margin_holds_at_any_timeout() {
        let p = Policy::build(
            &cfg("[[rules]]\ncidr = \"10.0.0.0/8\"\ntimeout = \"20s\"\n"),
            true,
            None,
        );
        // 20 s: 80 % would leave 4 s; the 5 s margin (and three 2 s evaluation periods) win.
        assert_eq!(p.eviction.min_timeout_ms, 20_000);
        let warn = p.eviction.warn_at_ms(20_000);
        assert!(warn <= 15_000, "warn at {warn} ms");
        assert!(20_000 - warn >= 3 * p.flows_period.as_millis() as u64);
        // Long timeouts keep the ratio.
        assert_eq!(p.eviction.warn_at_ms(3_600_000), 2_880_000);
    }

    #[test]
    fn reload_inputs_change_the_derived_values() {
        let a = Policy::build(&Config::default(), true, None);
        let b = Policy::build(
            &cfg("[keepalive]\ncgroups = [\"app\"]\ncgroup_timeout = \"60s\"\nfloor = \"2s\"\n"),
            true,
            None,
        );
        assert_ne!(a.pacing.filter_idle_ms, b.pacing.filter_idle_ms);
        assert_eq!(
            b.pacing.connect_values,
            Some(KaValues {
                idle_s: 30,
                intvl_s: 7,
                cnt: 4
            })
        );
        let ct = Policy::build(&Config::default(), true, Some(30));
        assert_eq!(
            ct.eviction.min_timeout_ms, 30_000,
            "a short conntrack timeout counts"
        );
    }
}
