//! Middlebox idle-timeout profiles: the built-in table (with sources) plus config additions.
//!
//! Each row names its source (vendor documentation, kernel docs, issue trackers).
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    /// Idle timeout of an established TCP flow.
    pub idle_timeout_s: u64,
    /// Whether a TCP keepalive probe (no payload) resets the idle timer. L4 trackers: yes;
    /// L7 proxies (AWS ALB, Classic LB): no — those need application-level pings.
    pub keepalive_resets: bool,
    /// What happens on expiry.
    pub on_expiry: String,
    pub source: String,
}

fn p(name: &str, secs: u64, resets: bool, on_expiry: &str, source: &str) -> Profile {
    Profile {
        name: name.into(),
        idle_timeout_s: secs,
        keepalive_resets: resets,
        on_expiry: on_expiry.into(),
        source: source.into(),
    }
}

/// The built-in table.
pub fn builtin() -> Vec<Profile> {
    vec![
        p(
            "aws-nat-gateway",
            350,
            true,
            "RST to the inside host on the next packet",
            "docs.aws.amazon.com/vpc/latest/userguide/nat-gateway-troubleshooting.html",
        ),
        p(
            "aws-nlb",
            350,
            true,
            "closed",
            "docs.aws.amazon.com/elasticloadbalancing/latest/network/update-idle-timeout.html",
        ),
        p(
            "aws-alb",
            60,
            false,
            "closed (keepalive probes do not reset it)",
            "docs.aws.amazon.com/elasticloadbalancing/latest/application/edit-load-balancer-attributes.html",
        ),
        p(
            "aws-classic-lb",
            60,
            false,
            "closed (keepalive probes do not reset it)",
            "docs.aws.amazon.com/elasticloadbalancing/latest/classic/config-idle-timeout.html",
        ),
        p(
            "gcp-cloud-nat",
            1200,
            true,
            "mapping dropped silently",
            "cloud.google.com compute v1 RouterNat tcpEstablishedIdleTimeoutSec",
        ),
        p(
            "azure-lb",
            240,
            true,
            "silent drop (or RST with TCP reset on idle)",
            "MicrosoftDocs azure-docs load-balancer-tcp-idle-timeout.md",
        ),
        p(
            "azure-nat-gateway",
            240,
            true,
            "idle flow disconnected",
            "learn.microsoft.com NAT gateway idleTimeoutInMinutes",
        ),
        p(
            "linux-conntrack",
            432_000,
            true,
            "entry removed silently",
            "kernel Documentation/networking/nf_conntrack-sysctl.rst",
        ),
        p(
            "kube-proxy",
            86_400,
            true,
            "entry removed silently",
            "kubernetes.io kube-proxy --conntrack-tcp-timeout-established",
        ),
        p(
            "ipvs",
            900,
            true,
            "flow black-holed",
            "moby/moby#31208; kubernetes/kubernetes#117873",
        ),
        p(
            "openwrt",
            7440,
            true,
            "silent",
            "openwrt sysctl-nf-conntrack.conf",
        ),
        p(
            "home-router",
            600,
            true,
            "silent",
            "typical consumer gateways (Hätönen et al., IMC 2010)",
        ),
    ]
}

/// Built-ins overridden and extended by config profiles (same name replaces).
pub fn merged(extra: &[Profile]) -> Vec<Profile> {
    let mut all = builtin();
    for e in extra {
        match all.iter_mut().find(|p| p.name == e.name) {
            Some(p) => *p = e.clone(),
            None => all.push(e.clone()),
        }
    }
    all
}

pub fn timeout(p: &Profile) -> Duration {
    Duration::from_secs(p.idle_timeout_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_the_documented_values_and_config_overrides() {
        let b = builtin();
        let get = |n: &str| b.iter().find(|p| p.name == n).unwrap().clone();
        assert_eq!(get("aws-nat-gateway").idle_timeout_s, 350);
        assert_eq!(get("gcp-cloud-nat").idle_timeout_s, 1200);
        assert_eq!(get("azure-lb").idle_timeout_s, 240);
        assert!(!get("aws-alb").keepalive_resets);
        assert_eq!(get("home-router").idle_timeout_s, 600);
        let m = merged(&[
            p("home-router", 300, true, "x", "mine"),
            p("corp-fw", 1800, true, "x", "mine"),
        ]);
        assert_eq!(
            m.iter().find(|p| p.name == "home-router").unwrap().idle_timeout_s,
            300
        );
        assert!(m.iter().any(|p| p.name == "corp-fw"));
        assert_eq!(m.len(), b.len() + 1);
    }
}
