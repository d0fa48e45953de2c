//! The probe watch: keepalive probes and their answers seen per socket, in the kernel.
//!
//! `probe_select` (iter/tcp) sets or clears the sock_ops callback flag of exactly the sockets in
//! PROBE_WATCH, through bpf_setsockopt(TCP_BPF_SOCK_OPS_CB_FLAGS) under the socket lock (Linux
//! 6.12+), and lists every socket of the namespace left with the flag. `probe_watch` (sock_ops,
//! attached at the cgroup v2 root) sees each keepalive probe of a flagged socket leave;
//! `probe_answer` (tp_btf `tcp_probe`, attached only while a socket is watched) sees the segment
//! that answers it. Sockets without the flag cost nothing in sock_ops and one flag test per
//! received segment while any socket is watched.
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{BtfTracePoint, CgroupAttachMode, SockOps};
use monitor_common::{ProbeWatch, WATCH_CB_FLAG, WatchFlagRecord};

use super::{EbpfError, Loaded, merr, perr, program};
use crate::kernel::netns::NsHandle;
use crate::kernel::{cgroups, decode, sys};
use crate::model::observe::NetnsId;

/// Entries of PROBE_WATCH (the map's size): the most sockets watched at once.
pub const WATCH_MAX: usize = 4096;

pub use crate::model::probe::WatchOutcome as WatchReport;

/// State of the probe watch inside `Loaded`.
#[derive(Default)]
pub struct WatchState {
    /// Why the watch is unavailable, or None when it works.
    pub unavailable: Option<String>,
    answer_link: Option<aya::programs::tp_btf::BtfTracePointLinkId>,
}

fn map(l: &mut Loaded) -> Result<BpfHashMap<&mut MapData, u64, ProbeWatch>, EbpfError> {
    BpfHashMap::try_from(
        l.ebpf
            .map_mut("PROBE_WATCH")
            .ok_or(EbpfError::Missing("PROBE_WATCH"))?,
    )
    .map_err(merr("PROBE_WATCH"))
}

impl Loaded {
    /// Loads the probe programs and proves on a loopback connection of the agent's namespace that
    /// the flag can be set and cleared from the iterator. Any failure leaves the watch
    /// unavailable, with the reason (for `status`); nothing else depends on it.
    pub(super) fn setup_watch(&mut self, btf: &aya::Btf) -> Result<(), String> {
        let mut load = || -> Result<(), EbpfError> {
            let it: &mut aya::programs::Iter = program(&mut self.ebpf, "probe_select")?;
            it.load("tcp", btf).map_err(perr("probe_select"))?;
            let tp: &mut BtfTracePoint = program(&mut self.ebpf, "probe_answer")?;
            tp.load("tcp_probe", btf).map_err(perr("probe_answer"))?;
            let so: &mut SockOps = program(&mut self.ebpf, "probe_watch")?;
            so.load().map_err(perr("probe_watch"))?;
            Ok(())
        };
        load().map_err(|e| format!("loading the probe programs failed: {e}"))?;
        self.self_test_watch()?;
        let root = cgroups::mount().ok_or("no cgroup v2 mount to attach probe_watch to")?;
        let f = std::fs::File::open(&root).map_err(|e| format!("cgroup root {}: {e}", root.display()))?;
        let so: &mut SockOps = program(&mut self.ebpf, "probe_watch").map_err(|e| e.to_string())?;
        // Through a bpf_link (the kernel refuses attach flags there): a cgroup link always runs
        // alongside the programs of other links and of child cgroups.
        so.attach(f, CgroupAttachMode::Single).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("attaching probe_watch to {}: {e}{cause}", root.display())
        })?;
        Ok(())
    }

    /// Sets and clears the flag on one loopback connection and reads it back each time.
    fn self_test_watch(&mut self) -> Result<(), String> {
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
        let c = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let cookie = sys::socket_cookie(c.as_fd()).map_err(|e| format!("SO_COOKIE: {e}"))?;
        let own = NsHandle {
            id: crate::kernel::netns::own_id(),
            path: "/proc/self/ns/net".into(),
        };
        let step = |l: &mut Loaded, on: bool| -> Result<i32, String> {
            let want = if on { vec![cookie] } else { vec![] };
            let off = if on { vec![] } else { vec![cookie] };
            let r = l.select(&want, &off, &own).map_err(|e| e.to_string())?;
            if let Some((_, why)) = r.failed.first() {
                return Err(why.clone());
            }
            Ok(r.flagged as i32)
        };
        let set = step(self, true)?;
        let cleared = step(self, false)?;
        if set < 1 || cleared != 0 {
            return Err(format!(
                "the sock_ops flag did not stick (set: {set} socket(s) flagged, cleared: {cleared})"
            ));
        }
        Ok(())
    }

    /// Watches `on` and releases `off` in namespace `ns` (one tcp iterator run). Released
    /// entries leave the map; watched ones keep their counters.
    pub fn select(&mut self, on: &[u64], off: &[u64], ns: &NsHandle) -> Result<WatchReport, EbpfError> {
        self.select_in(on, off, ns, true)
    }

    /// As `select`; with `unseen_gone` false, a released socket the iterator did not see stays in
    /// the map (it lives in another namespace).
    fn select_in(
        &mut self,
        on: &[u64],
        off: &[u64],
        ns: &NsHandle,
        unseen_gone: bool,
    ) -> Result<WatchReport, EbpfError> {
        {
            let mut m = map(self)?;
            for &c in on {
                let mut w = m.get(&c, 0).unwrap_or_default();
                w.want = 1;
                w.done = 0;
                m.insert(&c, &w, 0).map_err(merr("PROBE_WATCH"))?;
            }
            for &c in off {
                if let Ok(mut w) = m.get(&c, 0) {
                    w.want = 0;
                    w.done = 0;
                    m.insert(&c, &w, 0).map_err(merr("PROBE_WATCH"))?;
                }
            }
        }
        if !on.is_empty() {
            self.attach_answers()?;
        }
        let mut census: Vec<WatchFlagRecord> = Vec::new();
        self.run_iter(
            "probe_select",
            Some(ns),
            std::mem::size_of::<WatchFlagRecord>(),
            |r| {
                if let Ok(f) = decode::watch_flag(r) {
                    census.push(f);
                }
            },
        )?;
        let mut rep = WatchReport {
            netns: ns.id,
            flagged: census.len(),
            stray: census.iter().filter(|r| r.watched == 0).count(),
            ..Default::default()
        };
        let mut m = map(self)?;
        for &c in on {
            match m.get(&c, 0) {
                Ok(w) if w.done == 1 && w.rc == 0 && w.flags >= 0 && w.flags as u32 & WATCH_CB_FLAG != 0 => {
                    rep.watching.push(c)
                }
                Ok(w) if w.done == 0 => {
                    let _ = m.remove(&c);
                    rep.failed
                        .push((c, "the socket is gone (not seen by the iterator)".into()));
                }
                Ok(w) => {
                    let _ = m.remove(&c);
                    rep.failed.push((
                        c,
                        match w.rc {
                            0 => format!("the flag did not stick (flags read back: {})", w.flags),
                            rc => format!(
                                "bpf_setsockopt(TCP_BPF_SOCK_OPS_CB_FLAGS) failed: errno {} (Linux 6.12 or later is needed)",
                                -rc
                            ),
                        },
                    ));
                }
                Err(e) => rep.failed.push((c, format!("lost the entry: {e}"))),
            }
        }
        for &c in off {
            if let Ok(w) = m.get(&c, 0) {
                if w.done == 1 && w.flags >= 0 && w.flags as u32 & WATCH_CB_FLAG != 0 {
                    rep.failed
                        .push((c, format!("the flag could not be cleared (errno {})", -w.rc)));
                    continue;
                }
                if w.done == 0 && !unseen_gone {
                    continue;
                }
                let _ = m.remove(&c);
            }
            rep.released.push(c);
        }
        self.detach_answers_if_idle();
        Ok(rep)
    }

    /// At shutdown: clears the flag of every watched socket, in each namespace given (one
    /// iterator pass each), so that nothing is left flagged when the programs go. Returns the
    /// sockets still flagged in those namespaces afterwards.
    pub fn release_all(&mut self, spaces: &[NsHandle]) -> usize {
        let all: Vec<u64> = match map(self) {
            Ok(m) => m.keys().filter_map(Result::ok).collect(),
            Err(_) => return 0,
        };
        if all.is_empty() {
            return 0;
        }
        let mut left = 0;
        for ns in spaces {
            // Each run clears the sockets of its namespace; the others are not seen there.
            let pending: Vec<u64> = match map(self) {
                Ok(m) => m.keys().filter_map(Result::ok).collect(),
                Err(_) => break,
            };
            if pending.is_empty() {
                break;
            }
            match self.select_in(&[], &pending, ns, false) {
                Ok(r) => left += r.flagged,
                Err(e) => tracing::debug!("releasing watched sockets in {}: {e}", ns.id),
            }
        }
        left
    }

    /// Forgets sockets that closed (their flag went with them).
    pub fn forget_watched(&mut self, cookies: &[u64]) {
        if let Ok(mut m) = map(self) {
            for c in cookies {
                let _ = m.remove(c);
            }
        }
        self.detach_answers_if_idle();
    }

    fn watched_count(&mut self) -> usize {
        map(self).map(|m| m.keys().count()).unwrap_or(0)
    }

    /// `tcp_probe` runs for every segment an established socket receives: attached only while
    /// some socket is watched.
    pub(super) fn attach_answers(&mut self) -> Result<(), EbpfError> {
        if self.watch.answer_link.is_some() {
            return Ok(());
        }
        let tp: &mut BtfTracePoint = program(&mut self.ebpf, "probe_answer")?;
        let id = tp.attach().map_err(perr("probe_answer"))?;
        self.watch.answer_link = Some(id);
        Ok(())
    }

    fn detach_answers_if_idle(&mut self) {
        if self.watch.answer_link.is_some()
            && self.watched_count() == 0
            && let Some(id) = self.watch.answer_link.take()
            && let Ok(tp) = program::<BtfTracePoint>(&mut self.ebpf, "probe_answer")
            && let Err(e) = tp.detach(id)
        {
            tracing::warn!("detaching probe_answer failed: {e}");
        }
    }

    /// (runs, run time in ns) of probe_watch and of probe_answer, from the kernel's program
    /// statistics (counted only while a caller holds `aya::sys::enable_stats`); None if unreadable.
    pub fn watch_program_stats(&mut self) -> Option<[(u64, u64); 2]> {
        let w = program::<SockOps>(&mut self.ebpf, "probe_watch")
            .ok()?
            .info()
            .ok()?;
        let a = program::<BtfTracePoint>(&mut self.ebpf, "probe_answer")
            .ok()?
            .info()
            .ok()?;
        Some([
            (w.run_count(), w.run_time().as_nanos() as u64),
            (a.run_count(), a.run_time().as_nanos() as u64),
        ])
    }
}

/// Groups cookies by namespace.
pub fn by_netns(items: &[(u64, NetnsId)]) -> HashMap<NetnsId, Vec<u64>> {
    let mut out: HashMap<NetnsId, Vec<u64>> = HashMap::new();
    for (c, ns) in items {
        out.entry(*ns).or_default().push(*c);
    }
    out
}
