//! The ring buffers the tracepoints fill, and the per-CPU counters the programs keep.
use aya::maps::{MapData, PerCpuArray};
use monitor_common::stat;

use super::super::decode;
use super::ring::Ring;
pub use crate::model::health::KernelCounters;
use crate::model::observe::{Event, ProcEvent};

/// Forwards the programs' aya-log records (rare error paths only) to the agent's tracing log.
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        match r.level() {
            log::Level::Error => tracing::error!(source = "ebpf", "{}", r.args()),
            log::Level::Warn => tracing::warn!(source = "ebpf", "{}", r.args()),
            log::Level::Info => tracing::info!(source = "ebpf", "{}", r.args()),
            _ => tracing::debug!(source = "ebpf", "{}", r.args()),
        }
    }
    fn flush(&self) {}
}

/// The event ring buffers and the kernel-side counters, owned by the reader task.
pub struct Events {
    pub(super) ring: Ring,
    pub(super) procs: Ring,
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) log: Option<aya_log::EbpfLogger<ToTracing>>,
}

impl Events {
    /// Decodes the socket records waiting, up to `max` records; returns the number of
    /// undecodable ones, and whether it stopped at `max` (more may be waiting).
    pub fn drain(&mut self, out: &mut Vec<Event>, max: usize) -> (u64, bool) {
        let mut bad = 0;
        let d = self.ring.drain(max, |item| match decode::event(item) {
            Ok(e) => out.push(e),
            Err(_) => bad += 1,
        });
        (bad + d.corrupt, d.full)
    }

    /// Decodes every process record waiting; returns the number of undecodable ones.
    pub fn drain_procs(&mut self, out: &mut Vec<ProcEvent>) -> u64 {
        let mut bad = 0;
        loop {
            let d = self.procs.drain(4096, |item| match decode::proc_event(item) {
                Ok(e) => out.push(e),
                Err(_) => bad += 1,
            });
            bad += d.corrupt;
            if !d.full {
                return bad;
            }
        }
    }

    /// The two event rings registered with tokio's reactor, to wait on: readable when a ring holds
    /// records. The programs wake waiters only for a record that finds its ring drained, so at
    /// most once per drain. Each registration owns a duplicate of the ring's descriptor.
    /// Must be called inside the tokio runtime.
    pub fn readiness(&self) -> std::io::Result<[tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>; 2]> {
        use std::os::fd::AsFd;
        let register = |fd: std::os::fd::BorrowedFd<'_>| {
            let owned = fd.try_clone_to_owned()?;
            // SAFETY: the AsyncFd owns `owned`: the descriptor stays open, and refers to the same
            // ring, for as long as it is registered.
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
        };
        Ok([register(self.ring.as_fd())?, register(self.procs.as_fd())?])
    }

    /// Forwards the programs' log records (if any) to tracing.
    pub fn drain_log(&mut self) {
        if let Some(l) = &mut self.log {
            l.flush();
        }
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> KernelCounters {
        let get = |i: u32| -> u64 { self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        let mut c = KernelCounters {
            events: get(stat::EVENTS),
            iter_sockets: get(stat::ITER_SOCKETS),
            iter_overflow: get(stat::ITER_OVERFLOW),
            iter_skipped: get(stat::ITER_SKIPPED),
            proc_events: get(stat::PROC_EVENTS),
            proc_lost: get(stat::PROC_LOST),
            sockops_applied: get(stat::SOCKOPS_APPLIED),
            sockops_failed: get(stat::SOCKOPS_FAILED),
            ..Default::default()
        };
        for (i, name) in stat::PROGRAMS.iter().enumerate() {
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
