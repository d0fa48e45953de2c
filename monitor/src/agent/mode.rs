//! Picking the mode: eBPF when it loads, poll otherwise (auto); "this kernel lacks X" is a reason
//! to fall back, "our build is broken" is an error in every mode.
use crate::config::Mode;
use crate::kernel::{ebpf, probes, sys};
use crate::model::health::Feature;

/// The chosen mode, why, and what the kernel allows.
pub struct Chosen {
    pub loaded: Option<(ebpf::Loaded, ebpf::Events)>,
    pub mode: &'static str,
    pub reason: String,
    pub features: Vec<Feature>,
}

fn explain(e: &ebpf::EbpfError) -> String {
    let uid = sys::geteuid();
    if uid == 0 {
        e.to_string()
    } else {
        format!("{e}; the agent runs as uid {uid}: eBPF needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)")
    }
}

/// Loads the programs as `mode` asks and probes the rest.
pub fn select(mode: Mode, opts: &ebpf::LoadOptions) -> anyhow::Result<Chosen> {
    let mut features = probes::host();
    let poll_ok = features.iter().any(|f| f.name == "sock_diag" && f.available);
    let attempt = match mode {
        Mode::Poll => None,
        Mode::Ebpf | Mode::Auto => Some(ebpf::load(opts)),
    };
    let chosen = match (mode, attempt) {
        (Mode::Poll, _) => Chosen {
            loaded: None,
            mode: "poll",
            reason: "poll mode requested: sock_diag + procfs".into(),
            features: vec![],
        },
        (_, Some(Ok((l, ev)))) => {
            let why = if mode == Mode::Ebpf {
                "ebpf mode requested"
            } else {
                "auto"
            };
            features.extend(l.features.clone());
            Chosen {
                reason: format!("{why}: 7 tp_btf tracepoints, tcp and task_file iterators loaded"),
                loaded: Some((l, ev)),
                mode: "ebpf",
                features: vec![],
            }
        }
        (_, Some(Err(e))) if e.is_build_defect() => anyhow::bail!(
            "the eBPF object built into this holdfast is broken ({e}): this is a build defect, not a kernel limit; rebuild with `cargo xtask build` (poll mode is not used to hide it)"
        ),
        (Mode::Ebpf, Some(Err(e))) => anyhow::bail!(
            "eBPF mode was requested but the programs cannot load: {}. Run as root on a kernel with BTF, or use --mode poll",
            explain(&e)
        ),
        (_, Some(Err(e))) => {
            let why = explain(&e);
            features.push(Feature {
                name: "ebpf".into(),
                available: false,
                detail: why.clone(),
            });
            tracing::warn!("eBPF unavailable, running in poll mode (sock_diag + procfs): {why}");
            Chosen {
                loaded: None,
                mode: "poll",
                reason: format!("auto: eBPF unavailable ({why}); using sock_diag + procfs"),
                features: vec![],
            }
        }
        (Mode::Auto | Mode::Ebpf, None) => unreachable_mode(),
    };
    if chosen.mode == "poll" && !poll_ok {
        let why = features
            .iter()
            .find(|f| f.name == "sock_diag")
            .map_or(String::new(), |f| f.detail.clone());
        anyhow::bail!("poll mode cannot read the TCP table through sock_diag: {why}");
    }
    Ok(Chosen { features, ..chosen })
}

/// `select` never leaves eBPF or auto without an attempt; kept total without a panic.
fn unreachable_mode() -> Chosen {
    Chosen {
        loaded: None,
        mode: "poll",
        reason: "internal: no eBPF attempt was made".into(),
        features: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_mode_probes_the_host_and_never_loads_ebpf() {
        let c = select(Mode::Poll, &ebpf::LoadOptions::default()).unwrap();
        assert_eq!(c.mode, "poll");
        assert!(c.loaded.is_none());
        let names: Vec<&str> = c.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["sock_diag", "sock_destroy", "pidfd_getfd", "setns"]);
        assert!(c.features[0].available, "{:?}", c.features[0]);
    }

    #[test]
    fn a_build_defect_is_not_a_kernel_limit() {
        assert!(ebpf::EbpfError::Missing("snapshot_tcp").is_build_defect());
        assert!(!ebpf::EbpfError::Iter("EPERM".into()).is_build_defect());
    }
}
