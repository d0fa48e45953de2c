//! eBPF mode: loads the programs, drains the ring buffers, runs the tcp iterators (snapshot and
//! targeted keepalive), and attaches the keepalive-at-connect sock_ops program to cgroups.
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, CgroupAttachMode, Iter, SockOps};
use aya::{Ebpf, EbpfLoader};
use monitor_common::{KaTarget, OwnerRecord, SnapFilter, SnapRecord, stat};

use crate::btf;
use crate::decode;
use crate::eviction::{KaRequest, KaResult, KaValues};
use crate::observe::{Event, ProcEvent, Snapshot};
use crate::sys;

/// The compiled eBPF object (built by build.rs from monitor-ebpf).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// Socket tracepoints (their counters are indexed in this order).
const TRACEPOINTS: [&str; 5] = stat::PROGRAMS;
/// Process lifecycle tracepoints.
const PROC_TRACEPOINTS: [&str; 2] = ["sched_process_exit", "sched_process_free"];

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
    #[error("`{0}` missing from the eBPF object")]
    Missing(&'static str),
    #[error("tcp iterator: {0}")]
    Iter(String),
    #[error("cannot read the network namespace of this process: {0}")]
    Netns(std::io::Error),
}

/// Per-program counters kept in the kernel.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct KernelCounters {
    pub events: u64,
    pub lost: u64,
    pub errors: u64,
    pub lost_by_program: Vec<(String, u64)>,
    pub errors_by_program: Vec<(String, u64)>,
    pub iter_sockets: u64,
    pub proc_events: u64,
    pub proc_lost: u64,
    pub sockops_applied: u64,
    pub sockops_failed: u64,
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
}

/// The event ring buffers and the kernel-side counters, owned by the reader task.
pub struct Events {
    ring: RingBuf<MapData>,
    procs: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
}

impl Events {
    /// Decodes every socket record waiting; returns the number of undecodable ones.
    pub fn drain(&mut self, out: &mut Vec<Event>) -> u64 {
        let mut bad = 0;
        while let Some(item) = self.ring.next() {
            match decode::event(&item) {
                Ok(e) => out.push(e),
                Err(_) => bad += 1,
            }
        }
        bad
    }

    /// Decodes every process record waiting; returns the number of undecodable ones.
    pub fn drain_procs(&mut self, out: &mut Vec<ProcEvent>) -> u64 {
        let mut bad = 0;
        while let Some(item) = self.procs.next() {
            match decode::proc_event(&item) {
                Ok(e) => out.push(e),
                Err(_) => bad += 1,
            }
        }
        bad
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> KernelCounters {
        let get = |i: u32| -> u64 { self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        let mut c = KernelCounters {
            events: get(stat::EVENTS),
            iter_sockets: get(stat::ITER_SOCKETS),
            proc_events: get(stat::PROC_EVENTS),
            proc_lost: get(stat::PROC_LOST),
            sockops_applied: get(stat::SOCKOPS_APPLIED),
            sockops_failed: get(stat::SOCKOPS_FAILED),
            ..Default::default()
        };
        for (i, name) in TRACEPOINTS.iter().enumerate() {
            let lost = get(stat::LOST_BASE + i as u32);
            let err = get(stat::ERR_BASE + i as u32);
            c.lost += lost;
            c.errors += err;
            c.lost_by_program.push(((*name).into(), lost));
            c.errors_by_program.push(((*name).into(), err));
        }
        c
    }
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

/// Loads and attaches every program for the current network namespace.
pub fn load(opts: &LoadOptions) -> Result<(Loaded, Events), EbpfError> {
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map_err(EbpfError::Netns)?
        .ino() as u32;
    let kbtf = btf::Btf::from_sys_fs()?;
    let offsets = btf::kernel_offsets(&kbtf, netns)?;
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &offsets, true)
        .load(EBPF_OBJECT)?;
    let btf = aya::Btf::from_sys_fs().map_err(|e| EbpfError::Iter(format!("kernel BTF: {e}")))?;
    for name in TRACEPOINTS.into_iter().chain(PROC_TRACEPOINTS) {
        let prog: &mut BtfTracePoint = program(&mut ebpf, name)?;
        prog.load(name, &btf).map_err(perr(name))?;
        prog.attach().map_err(perr(name))?;
    }
    for (name, target) in [
        ("snapshot_tcp", "tcp"),
        ("apply_keepalive", "tcp"),
        ("owners_task_file", "task_file"),
    ] {
        let iter: &mut Iter = program(&mut ebpf, name)?;
        iter.load(target, &btf).map_err(perr(name))?;
    }
    let sockops = attach_sockops(&mut ebpf, opts);
    let take = |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).ok_or(EbpfError::Missing(name));
    let merr = |name: &'static str| {
        move |source| EbpfError::Map {
            name: name.into(),
            source,
        }
    };
    let ring = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(merr("EVENTS"))?;
    let procs = RingBuf::try_from(take(&mut ebpf, "PROCS")?).map_err(merr("PROCS"))?;
    let stats = PerCpuArray::try_from(take(&mut ebpf, "STATS")?).map_err(merr("STATS"))?;
    let hz = sys::kernel_hz();
    Ok((Loaded { ebpf, hz, sockops }, Events { ring, procs, stats }))
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
        let t = KaTarget {
            idle: v.idle_s as i32,
            intvl: v.intvl_s as i32,
            cnt: v.cnt as i32,
            set: 1,
            ..Default::default()
        };
        cfg.set(0, &t, 0).map_err(|e| e.to_string())?;
        let prog: &mut SockOps = program(ebpf, "keepalive_at_connect").map_err(|e| e.to_string())?;
        prog.load().map_err(|e| format!("load: {e}"))?;
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
        Ok(n) => format!(
            "keepalive at connect on {n} cgroup(s): TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={}",
            v.idle_s, v.intvl_s, v.cnt
        ),
        Err(e) => {
            tracing::warn!("keepalive-at-connect (sock_ops) unavailable: {e}");
            format!("unavailable: {e}")
        }
    }
}

impl Loaded {
    /// Runs iterator `name` once and returns everything it wrote.
    fn run_iter(&mut self, name: &'static str) -> Result<Vec<u8>, EbpfError> {
        let iter: &mut Iter = program(&mut self.ebpf, name)?;
        let id = iter.attach().map_err(perr(name))?;
        let link = iter.take_link(id).map_err(perr(name))?;
        let mut file = link.into_file().map_err(|e| EbpfError::Iter(e.to_string()))?;
        let mut buf = Vec::with_capacity(1 << 16);
        file.read_to_end(&mut buf)
            .map_err(|e| EbpfError::Iter(format!("read: {e}")))?;
        Ok(buf)
    }

    /// Runs the tcp iterator once. Unfiltered (`None`) it reports every socket of the namespace;
    /// with `Some(min_idle_ms)` only the sockets worth a look (see `SnapFilter`).
    pub fn snapshot(&mut self, filter_idle_ms: Option<u64>) -> Result<Snapshot, EbpfError> {
        let started = sys::monotonic_ns();
        {
            let mut f: Array<&mut MapData, SnapFilter> = Array::try_from(
                self.ebpf
                    .map_mut("SNAP_FILTER")
                    .ok_or(EbpfError::Missing("SNAP_FILTER"))?,
            )
            .map_err(|source| EbpfError::Map {
                name: "SNAP_FILTER".into(),
                source,
            })?;
            let v = SnapFilter {
                enabled: u32::from(filter_idle_ms.is_some()),
                min_idle_jiffies: filter_idle_ms.map_or(0, |ms| {
                    (ms * u64::from(self.hz) / 1000).min(u64::from(u32::MAX)) as u32
                }),
            };
            f.set(0, &v, 0).map_err(|source| EbpfError::Map {
                name: "SNAP_FILTER".into(),
                source,
            })?;
        }
        let buf = self.run_iter("snapshot_tcp")?;
        let rec = std::mem::size_of::<SnapRecord>();
        let mut socks = Vec::with_capacity(buf.len() / rec);
        for chunk in buf.chunks(rec) {
            if let Ok(s) = decode::snap(chunk, self.hz) {
                socks.push(s);
            }
        }
        Ok(Snapshot {
            started,
            finished: sys::monotonic_ns(),
            socks,
            filtered_idle_ms: filter_idle_ms,
        })
    }

    /// Socket inode -> owning process for every socket file on the host, from the kernel's
    /// task_file iterator (no /proc/*/fd walk).
    pub fn owners(&mut self) -> Result<std::collections::HashMap<u64, u32>, EbpfError> {
        let buf = self.run_iter("owners_task_file")?;
        let rec = std::mem::size_of::<OwnerRecord>();
        let mut out = std::collections::HashMap::with_capacity(buf.len() / rec);
        for c in buf.chunks_exact(rec) {
            let inode = u64::from_ne_bytes(c[0..8].try_into().expect("8"));
            let tgid = u32::from_ne_bytes(c[8..12].try_into().expect("4"));
            // The first holder wins, as in the /proc walk.
            out.entry(inode).or_insert(tgid);
        }
        Ok(out)
    }

    /// Applies or reads keepalive on exactly the requested sockets, in the kernel (bpf_setsockopt
    /// from the tcp iterator, under the socket lock).
    pub fn apply_keepalive(&mut self, reqs: &[KaRequest]) -> Result<Vec<KaResult>, EbpfError> {
        let merr = |source| EbpfError::Map {
            name: "KA_TARGETS".into(),
            source,
        };
        {
            let mut m: BpfHashMap<&mut MapData, u64, KaTarget> = BpfHashMap::try_from(
                self.ebpf
                    .map_mut("KA_TARGETS")
                    .ok_or(EbpfError::Missing("KA_TARGETS"))?,
            )
            .map_err(merr)?;
            for r in reqs {
                let v = r.set.unwrap_or(KaValues {
                    idle_s: 0,
                    intvl_s: 0,
                    cnt: 0,
                });
                let t = KaTarget {
                    idle: v.idle_s as i32,
                    intvl: v.intvl_s as i32,
                    cnt: v.cnt as i32,
                    set: i32::from(r.set.is_some()),
                    ..Default::default()
                };
                m.insert(&r.cookie, &t, 0).map_err(merr)?;
            }
        }
        let run = self.run_iter("apply_keepalive");
        let mut m: BpfHashMap<&mut MapData, u64, KaTarget> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("KA_TARGETS")
                .ok_or(EbpfError::Missing("KA_TARGETS"))?,
        )
        .map_err(merr)?;
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            let t = m.get(&r.cookie, 0).ok();
            let _ = m.remove(&r.cookie);
            let vals = |on: i32, i: i32, v: i32, c: i32| {
                (on >= 0 && i >= 0).then_some((
                    on > 0,
                    KaValues {
                        idle_s: i as u32,
                        intvl_s: v.max(0) as u32,
                        cnt: c.max(0) as u32,
                    },
                ))
            };
            let mut res = KaResult {
                cookie: r.cookie,
                before: None,
                after: None,
                error: None,
                via: "bpf iterator",
            };
            match (&run, t) {
                (Err(e), _) => res.error = Some(e.to_string()),
                (Ok(_), None) => res.error = Some("lost the target entry".into()),
                (Ok(_), Some(t)) if t.done == 0 => {
                    res.error = Some("the socket is gone (not seen by the iterator)".into())
                }
                (Ok(_), Some(t)) => {
                    res.before = vals(t.before_on, t.before_idle, t.before_intvl, t.before_cnt);
                    res.after = vals(t.after_on, t.after_idle, t.after_intvl, t.after_cnt);
                    if t.rc == -1000 {
                        res.error = Some("not a full TCP socket".into());
                    } else if t.rc != 0 {
                        res.error = Some(format!("bpf_setsockopt failed: errno {}", -t.rc));
                    }
                }
            }
            out.push(res);
        }
        Ok(out)
    }

    pub fn hz(&self) -> u32 {
        self.hz
    }
}
