//! The eviction forecast of a flow: which middlebox idle timeout applies, the socket's keepalive,
//! and the verdict.
use serde::{Deserialize, Serialize};

use super::finding::RemedyMode;

/// TCP keepalive values (seconds, seconds, count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KaValues {
    pub idle_s: u32,
    pub intvl_s: u32,
    pub cnt: u32,
}

impl KaValues {
    /// How often keepalive refreshes a middlebox: max(TCP_KEEPIDLE, TCP_KEEPINTVL) (after an
    /// answered probe the next one still waits TCP_KEEPINTVL).
    pub fn refresh_s(&self) -> u32 {
        self.idle_s.max(self.intvl_s)
    }

    /// Dead-peer detection time after the last activity: idle + intvl x cnt.
    pub fn detection_s(&self) -> u32 {
        self.idle_s.saturating_add(self.intvl_s.saturating_mul(self.cnt))
    }
}

/// Where a socket's keepalive values come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KaSource {
    /// Set on the socket (TCP_KEEPIDLE and friends).
    Socket,
    /// The namespace's sysctls apply (net.ipv4.tcp_keepalive_*).
    Sysctl,
}

impl KaSource {
    pub fn as_str(self) -> &'static str {
        match self {
            KaSource::Socket => "socket",
            KaSource::Sysctl => "sysctl",
        }
    }
}

/// A socket's keepalive as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Keepalive {
    pub on: Option<bool>,
    pub values: KaValues,
    pub source: KaSource,
}

/// The idle timeout that applies to a flow, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applicable {
    pub profile: String,
    pub timeout_s: u64,
    pub keepalive_resets: bool,
    pub why: String,
    pub keepalive_mode: RemedyMode,
}

/// The forecast for one ESTABLISHED flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forecast {
    NoMiddlebox,
    Safe,
    Idle,
    NearEviction,
    KeepaliveTooSlow,
    KeepaliveCannotHelp,
    LikelyEvicted,
}

impl Forecast {
    pub fn as_str(self) -> &'static str {
        match self {
            Forecast::NoMiddlebox => "no-middlebox",
            Forecast::Safe => "safe",
            Forecast::Idle => "idle",
            Forecast::NearEviction => "near-eviction",
            Forecast::KeepaliveTooSlow => "keepalive-too-slow",
            Forecast::KeepaliveCannotHelp => "keepalive-cannot-help",
            Forecast::LikelyEvicted => "likely-evicted",
        }
    }

    /// Whether the flow is at risk (a finding is open for it).
    pub fn at_risk(self) -> bool {
        matches!(
            self,
            Forecast::NearEviction
                | Forecast::KeepaliveCannotHelp
                | Forecast::KeepaliveTooSlow
                | Forecast::LikelyEvicted
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    pub verdict: Forecast,
}

impl Assessment {
    /// The forecast as the CLI shows it, if a middlebox applies.
    pub fn risk(&self) -> Option<RiskView> {
        let app = self.applicable.as_ref()?;
        Some(RiskView {
            profile: app.profile.clone(),
            timeout_s: app.timeout_s,
            verdict: self.verdict,
            eta_ms: self.eta_ms,
        })
    }

    pub fn at_risk(&self) -> bool {
        self.verdict.at_risk()
    }
}

/// A flow's eviction forecast, as `flows` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RiskView {
    pub profile: String,
    pub timeout_s: u64,
    pub verdict: Forecast,
    /// Milliseconds until the middlebox forgets the flow (negative: overdue); null if keepalive
    /// refreshes it in time.
    pub eta_ms: Option<i64>,
}

/// Which path a destination takes from a namespace: only flows via a gateway can cross a NAT or
/// load balancer without a rule saying so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutePath {
    /// This host (loopback or a local address): no middlebox.
    Local,
    /// Directly reachable on a link: no middlebox on the way.
    OnLink,
    /// Through a gateway: may cross NATs, firewalls, load balancers.
    Gateway(String),
    /// No route, or a route type holdfast does not classify.
    Unknown,
}

/// Facts of one network namespace that forecasts depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetFacts {
    /// net.ipv4.tcp_keepalive_time, _intvl, _probes.
    pub keepalive: KaValues,
    /// nf_conntrack_tcp_timeout_established, if conntrack tracks connections there.
    pub conntrack_s: Option<u64>,
}

impl Default for NetFacts {
    fn default() -> Self {
        NetFacts {
            keepalive: KaValues {
                idle_s: 7200,
                intvl_s: 75,
                cnt: 9,
            },
            conntrack_s: None,
        }
    }
}

/// A keepalive change (or a read of the current values) to execute on a live socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KaRequest {
    pub cookie: u64,
    pub netns: super::observe::NetnsId,
    pub inode: u64,
    pub pid: Option<u32>,
    /// None: only read the socket's current values.
    pub set: Option<KaValues>,
    /// Watch the socket's probes from the same moment (eBPF): the first probe, which leaves at
    /// once when the flow idled past the new TCP_KEEPIDLE, is seen too.
    pub watch: bool,
}

/// What an executor did: values before and after as (SO_KEEPALIVE, values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KaResult {
    pub cookie: u64,
    pub before: Option<(bool, KaValues)>,
    pub after: Option<(bool, KaValues)>,
    pub error: Option<String>,
    pub via: &'static str,
}

/// `holdfast profiles`: the profiles, and what the host's flows taught about each path.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProfilesView {
    pub profiles: Vec<crate::config::profiles::Profile>,
    /// Paths with evidence (most evidence first), learnt or not.
    pub learned: Vec<LearnedPath>,
    /// Whether learning is on (`[learning] enabled`).
    pub learning: bool,
}

/// One path's evidence and what holdfast makes of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LearnedPath {
    pub netns: String,
    pub gateway: String,
    pub prefix: String,
    /// The learnt timeout, if the evidence suffices.
    pub timeout_s: Option<u64>,
    /// The evidence in words, or why it does not (yet) give a timeout.
    pub evidence: String,
    /// A namespace of that name is watched now. A path of a namespace that is gone is kept
    /// (it may come back) but shortens no read interval.
    #[serde(default = "yes")]
    pub netns_present: bool,
}

fn yes() -> bool {
    true
}
