//! eBPF mode: loads the programs, attaches the tracepoints, and attaches the keepalive-at-connect
//! sock_ops program to cgroups. `events` drains the ring buffers; `iter` runs the iterators
//! (snapshots per namespace, owners, targeted keepalive).
mod events;
mod iter;
mod ring;
pub mod watch;

use std::path::PathBuf;

use aya::maps::{Array, Map, MapData, PerCpuArray};
use aya::programs::{BtfTracePoint, CgroupAttachMode, Iter, SockOps};
use aya::{Ebpf, EbpfLoader};
use monitor_common::{KaTarget, stat};

pub use events::{Events, KernelCounters};

use super::{btf, sys};
use crate::model::eviction::KaValues;

/// The compiled eBPF object (built by build.rs from monitor-ebpf).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// Process lifecycle tracepoints.
const PROC_TRACEPOINTS: [&str; 2] = ["sched_process_exit", "sched_process_free"];
/// Iterator programs and their targets.
const ITERATORS: [(&str, &str); 3] = [
    ("snapshot_tcp", "tcp"),
    ("apply_keepalive", "tcp"),
    ("owners_task_file", "task_file"),
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("kernel struct layout: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program `{name}`: {source}")]
    Program {
        name: String,
        source: aya::programs::ProgramError,
    },
    #[error("map `{name}`: {source}")]
    Map {
        name: String,
        source: aya::maps::MapError,
    },
    #[error("ring buffer `{name}` cannot be mapped: {source}")]
    Ring {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("`{0}` missing from the eBPF object")]
    Missing(&'static str),
    #[error("iterator: {0}")]
    Iter(String),
    #[error("{0}")]
    Netns(#[from] super::netns::NetnsError),
}

impl EbpfError {
    /// True when holdfast's own build is at fault (a malformed object, a program or map missing
    /// or of the wrong type): an error to report, never a reason to fall back to poll mode.
    /// Everything else is the kernel or the privileges saying no.
    pub fn is_build_defect(&self) -> bool {
        use aya::programs::ProgramError;
        matches!(
            self,
            EbpfError::Missing(_)
                | EbpfError::Load(aya::EbpfError::ParseError(_))
                | EbpfError::Load(aya::EbpfError::RelocationError(_))
                | EbpfError::Load(aya::EbpfError::UnexpectedPinningType { .. })
                | EbpfError::Program {
                    source: ProgramError::UnexpectedProgramType,
                    ..
                }
                | EbpfError::Map {
                    source: aya::maps::MapError::InvalidMapType { .. },
                    ..
                }
        )
    }
}

/// What to set up besides the tracepoints and iterators.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Absolute cgroup directories for the keepalive-at-connect sock_ops program.
    pub cgroups: Vec<PathBuf>,
    /// The values it sets.
    pub connect_values: Option<KaValues>,
}

/// The loaded programs. Dropping it detaches everything.
pub struct Loaded {
    ebpf: Ebpf,
    hz: u32,
    /// What happened to the sock_ops attachments, for `status`.
    pub sockops: String,
    /// What loading found this kernel can do.
    pub features: Vec<crate::model::health::Feature>,
    watch: watch::WatchState,
    /// The agent's filter threshold: complete reads mark what they report in SEEN with it too,
    /// so the first filtered read after them does not report every socket again. None (the
    /// CLI's probes): complete reads leave SEEN alone.
    pub seen_mark_ms: Option<u64>,
    /// The per-process task_file iterator failed (an older kernel; the log says why): /proc
    /// is read instead.
    pub pid_iter_failed: bool,
    /// Sockets of each namespace's last complete read (`iter::SIZE_HINTS` at most).
    size_hints: foldhash::HashMap<crate::model::observe::NetnsId, usize>,
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(|source| EbpfError::Program {
            name: name.into(),
            source,
        })
}

fn perr(name: &str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError + '_ {
    move |source| EbpfError::Program {
        name: name.into(),
        source,
    }
}

fn merr(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map {
        name: name.into(),
        source,
    }
}

/// aya-log's ring (its default is 128 KiB, 260 KiB of RSS with both halves mapped). The
/// programs log only rare failures (an address they cannot read), each record well under 1 KiB.
const LOG_RING_BYTES: u32 = 16 << 10;

/// Map sizes for this host. The ring buffers' pages are mapped into the agent (they count in its
/// RSS: at a fixed 4 + 1 MiB they were 10 MiB of a 20.5 MiB idle agent while both halves of each
/// ring were mapped; `ring` maps them once). The memory of sockets already reported (`SEEN`) is socket-local storage: it
/// grows with the sockets and needs no size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// EVENTS ring buffer, bytes: 1 MiB per CPU (a churn of ~54k connections/s on 2 cores makes
    /// about 0.5 MB of records per 20 ms drain), 1..16 MiB.
    pub events: u32,
    /// PROCS ring buffer, bytes: 128 KiB per CPU, 128 KiB..4 MiB (56 bytes a record with its
    /// header, two per process: a storm of 5,000 processes/s fills a twentieth of 256 KiB between
    /// two 20 ms drains; what is lost anyway, the /proc scan finds).
    pub procs: u32,
}

impl MapSizes {
    pub fn for_host() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        Self::sized(cpus)
    }

    fn sized(cpus: u64) -> Self {
        let pow2 = |v: u64, lo: u64, hi: u64| v.clamp(lo, hi).next_power_of_two().min(hi) as u32;
        MapSizes {
            events: pow2(cpus << 20, 1 << 20, 16 << 20),
            procs: pow2(cpus << 17, 1 << 17, 4 << 20),
        }
    }
}

/// Loads and attaches every program. Events come from every network namespace (each carries its
/// namespace); iterators read the namespace they are created in.
pub fn load(opts: &LoadOptions) -> Result<(Loaded, Events), EbpfError> {
    let kbtf = btf::Btf::from_sys_fs()?;
    let offsets = btf::kernel_offsets(&kbtf)?;
    let sizes = MapSizes::for_host();
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &offsets, true)
        .map_max_entries("EVENTS", sizes.events)
        .map_max_entries("PROCS", sizes.procs)
        .map_max_entries("AYA_LOGS", LOG_RING_BYTES)
        .load(EBPF_OBJECT)?;
    let btf = aya::Btf::from_sys_fs().map_err(|e| EbpfError::Iter(format!("kernel BTF: {e}")))?;
    for name in stat::PROGRAMS.into_iter().chain(PROC_TRACEPOINTS) {
        let prog: &mut BtfTracePoint = program(&mut ebpf, name)?;
        prog.load(name, &btf).map_err(perr(name))?;
        prog.attach().map_err(perr(name))?;
    }
    for (name, target) in ITERATORS {
        let iter: &mut Iter = program(&mut ebpf, name)?;
        iter.load(target, &btf).map_err(perr(name))?;
    }
    let feat = |name: &str, available: bool, detail: String| crate::model::health::Feature {
        name: name.into(),
        available,
        detail,
    };
    let mut features = vec![
        feat(
            "tp_btf",
            true,
            format!(
                "{} tracepoints attached",
                stat::PROGRAMS.len() + PROC_TRACEPOINTS.len()
            ),
        ),
        feat("iter_tcp", true, "snapshot_tcp loaded".into()),
        feat("iter_task_file", true, "owners_task_file loaded".into()),
        feat(
            "iter_setsockopt",
            true,
            "bpf_setsockopt from the tcp iterator passed the verifier (apply_keepalive)".into(),
        ),
    ];
    // sock_ops is loaded even when no cgroup is configured: the probe says whether it can be.
    let sockops_loaded = program::<SockOps>(&mut ebpf, "keepalive_at_connect")
        .and_then(|p| p.load().map_err(perr("keepalive_at_connect")));
    features.push(match &sockops_loaded {
        Ok(()) => feat("sock_ops", true, "keepalive_at_connect loaded".into()),
        Err(e) => feat("sock_ops", false, e.to_string()),
    });
    let sockops = match sockops_loaded {
        Ok(()) => attach_sockops(&mut ebpf, opts),
        Err(e) => format!("unavailable: {e}"),
    };
    let take = |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).ok_or(EbpfError::Missing(name));
    // Read in place, the data pages mapped once (`ring`).
    let ring_of = |ebpf: &mut Ebpf, name: &'static str| match take(ebpf, name)? {
        Map::RingBuf(m) => ring::Ring::new(m).map_err(|e| EbpfError::Ring { name, source: e }),
        _ => Err(EbpfError::Missing(name)),
    };
    let ring = ring_of(&mut ebpf, "EVENTS")?;
    let procs = ring_of(&mut ebpf, "PROCS")?;
    let stats = PerCpuArray::try_from(take(&mut ebpf, "STATS")?).map_err(merr("STATS"))?;
    // The programs log only on rare error paths; their records go to the agent's log.
    let log = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, events::ToTracing) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!("no eBPF log records to forward: {e}");
            None
        }
    };
    let hz = sys::kernel_hz();
    let mut loaded = Loaded {
        ebpf,
        hz,
        sockops,
        features,
        watch: watch::WatchState::default(),
        seen_mark_ms: None,
        pid_iter_failed: false,
        size_hints: Default::default(),
    };
    let watch = loaded.setup_watch(&btf);
    if let Err(e) = &watch {
        tracing::warn!(
            "keepalive probes cannot be watched on the wire: {e}; keepalive is judged from its timer"
        );
        loaded.watch.unavailable = Some(e.clone());
    }
    loaded.features.push(feat(
        "probe_watch",
        watch.is_ok(),
        match watch {
            Ok(()) => "keepalive probes and answers seen per socket (sock_ops flag set from the tcp iterator; probe_watch at the cgroup root)".into(),
            Err(e) => e,
        },
    ));
    Ok((
        loaded,
        Events {
            ring,
            procs,
            stats,
            log,
        },
    ))
}

/// The KA_CONNECT entry for `v` (set = 0: off).
fn connect_target(v: Option<KaValues>) -> KaTarget {
    match v {
        Some(v) => KaTarget {
            idle: v.idle_s as i32,
            intvl: v.intvl_s as i32,
            cnt: v.cnt as i32,
            set: 1,
            ..Default::default()
        },
        None => KaTarget::default(),
    }
}

/// Attaches keepalive_at_connect to each configured cgroup; a failure is reported, not fatal.
fn attach_sockops(ebpf: &mut Ebpf, opts: &LoadOptions) -> String {
    let (Some(v), false) = (opts.connect_values, opts.cgroups.is_empty()) else {
        return "no cgroups configured (keepalive.cgroups)".into();
    };
    let mut setup = || -> Result<usize, String> {
        let mut cfg: Array<&mut MapData, KaTarget> =
            Array::try_from(ebpf.map_mut("KA_CONNECT").ok_or("KA_CONNECT missing")?)
                .map_err(|e| e.to_string())?;
        cfg.set(0, &connect_target(Some(v)), 0)
            .map_err(|e| e.to_string())?;
        let prog: &mut SockOps = program(ebpf, "keepalive_at_connect").map_err(|e| e.to_string())?;
        let mut n = 0;
        for dir in &opts.cgroups {
            let f = std::fs::File::open(dir).map_err(|e| format!("cgroup {}: {e}", dir.display()))?;
            prog.attach(f, CgroupAttachMode::Single).map_err(|e| {
                let cause = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                format!("attach to {}: {e}{cause}", dir.display())
            })?;
            n += 1;
        }
        Ok(n)
    };
    match setup() {
        Ok(n) => describe_connect(n, v),
        Err(e) => {
            tracing::warn!("keepalive-at-connect (sock_ops) unavailable: {e}");
            format!("unavailable: {e}")
        }
    }
}

fn describe_connect(n: usize, v: KaValues) -> String {
    format!(
        "keepalive at connect on {n} cgroup(s): TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={}",
        v.idle_s, v.intvl_s, v.cnt
    )
}

impl Loaded {
    /// New values for the connections the sock_ops program sees from now on (a reload). The set
    /// of cgroups it is attached to changes only with a restart.
    pub fn set_connect_values(&mut self, v: Option<KaValues>) -> Result<(), EbpfError> {
        let mut cfg: Array<&mut MapData, KaTarget> = Array::try_from(
            self.ebpf
                .map_mut("KA_CONNECT")
                .ok_or(EbpfError::Missing("KA_CONNECT"))?,
        )
        .map_err(merr("KA_CONNECT"))?;
        cfg.set(0, &connect_target(v), 0).map_err(merr("KA_CONNECT"))?;
        if let (Some(v), Some(n)) = (v, self.sockops.strip_prefix("keepalive at connect on ")) {
            let count = n
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            self.sockops = describe_connect(count, v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MapSizes;

    #[test]
    fn maps_are_sized_to_the_host() {
        let small = MapSizes::sized(1);
        assert_eq!((small.events, small.procs), (1 << 20, 1 << 17));
        let here = MapSizes::sized(2);
        assert_eq!((here.events, here.procs), (2 << 20, 1 << 18));
        let big = MapSizes::sized(96);
        assert_eq!((big.events, big.procs), (16 << 20, 4 << 20));
        let odd = MapSizes::sized(3);
        assert!(odd.events.is_power_of_two() && odd.events == 4 << 20);
    }
}
