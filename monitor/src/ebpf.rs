//! eBPF mode: loads the programs, drains the event ring buffer, runs the tcp iterator snapshot.
use std::io::Read;
use std::os::unix::fs::MetadataExt;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, Iter};
use aya::{Ebpf, EbpfLoader};
use monitor_common::{SnapRecord, stat};

use crate::btf;
use crate::decode;
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
    #[error("map `{0}` missing from the eBPF object")]
    MissingMap(&'static str),
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
}

/// The loaded programs. Dropping it detaches everything.
pub struct Loaded {
    ebpf: Ebpf,
    hz: u32,
}

/// The event ring buffer and the kernel-side counters, owned by the reader task.
pub struct Events {
    ring: RingBuf<MapData>,
    procs: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
}

impl Events {
    /// Decodes every record waiting in the ring; undecodable ones are counted, not fatal.
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
            proc_events: get(stat::PROC_EVENTS),
            proc_lost: get(stat::PROC_LOST),
            events: get(stat::EVENTS),
            iter_sockets: get(stat::ITER_SOCKETS),
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

/// Loads and attaches every program for the current network namespace.
pub fn load() -> Result<(Loaded, Events), EbpfError> {
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
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| EbpfError::Iter(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|source| EbpfError::Program {
                name: name.into(),
                source,
            })?;
        prog.load(name, &btf).map_err(|source| EbpfError::Program {
            name: name.into(),
            source,
        })?;
        prog.attach().map_err(|source| EbpfError::Program {
            name: name.into(),
            source,
        })?;
    }
    let iter: &mut Iter = ebpf
        .program_mut("snapshot_tcp")
        .ok_or_else(|| EbpfError::Iter("program snapshot_tcp missing from the object".into()))?
        .try_into()
        .map_err(|source| EbpfError::Program {
            name: "snapshot_tcp".into(),
            source,
        })?;
    iter.load("tcp", &btf).map_err(|source| EbpfError::Program {
        name: "snapshot_tcp".into(),
        source,
    })?;
    let ring = ebpf.take_map("EVENTS").ok_or(EbpfError::MissingMap("EVENTS"))?;
    let ring = RingBuf::try_from(ring).map_err(|source| EbpfError::Map {
        name: "EVENTS".into(),
        source,
    })?;
    let procs = ebpf.take_map("PROCS").ok_or(EbpfError::MissingMap("PROCS"))?;
    let procs = RingBuf::try_from(procs).map_err(|source| EbpfError::Map {
        name: "PROCS".into(),
        source,
    })?;
    let stats = ebpf.take_map("STATS").ok_or(EbpfError::MissingMap("STATS"))?;
    let stats = PerCpuArray::try_from(stats).map_err(|source| EbpfError::Map {
        name: "STATS".into(),
        source,
    })?;
    let hz = sys::kernel_hz();
    Ok((Loaded { ebpf, hz }, Events { ring, procs, stats }))
}

impl Loaded {
    /// Runs the tcp iterator once and decodes every socket of the namespace.
    pub fn snapshot(&mut self) -> Result<Snapshot, EbpfError> {
        let started = sys::monotonic_ns();
        let iter: &mut Iter = self
            .ebpf
            .program_mut("snapshot_tcp")
            .ok_or_else(|| EbpfError::Iter("program snapshot_tcp missing".into()))?
            .try_into()
            .map_err(|source| EbpfError::Program {
                name: "snapshot_tcp".into(),
                source,
            })?;
        let id = iter.attach().map_err(|source| EbpfError::Program {
            name: "snapshot_tcp".into(),
            source,
        })?;
        let link = iter.take_link(id).map_err(|source| EbpfError::Program {
            name: "snapshot_tcp".into(),
            source,
        })?;
        let mut file = link.into_file().map_err(|e| EbpfError::Iter(e.to_string()))?;
        let mut buf = Vec::with_capacity(1 << 16);
        file.read_to_end(&mut buf)
            .map_err(|e| EbpfError::Iter(format!("read: {e}")))?;
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
        })
    }

    pub fn hz(&self) -> u32 {
        self.hz
    }
}
