//! The iterators: a snapshot of one namespace's TCP table (complete, or only the sockets worth a
//! look), the owners of every socket file on the host, and keepalive on targeted sockets.
use foldhash::{HashMap, HashMapExt};
use std::io::Read;

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::programs::Iter;
use monitor_common::{KaTarget, OwnerRecord, SnapFilter, SnapRecord};

use super::{EbpfError, Loaded, merr, perr, program};
use crate::kernel::netns::NsHandle;
use crate::kernel::{decode, sys};
use crate::model::eviction::{KaRequest, KaResult, KaValues};
use crate::model::observe::{Coverage, Snapshot};

/// Bytes read from an iterator per read(2): large reads cost fewer syscalls and copies.
const READ_CHUNK: usize = 1 << 20;

/// EAGAIN answers in a row before a read gives up: the kernel returns EAGAIN after visiting a
/// million objects without writing anything (MAX_ITER_OBJECTS in kernel/bpf/bpf_iter.c), and the
/// next read(2) resumes where it stopped. A filtered read of a table of 1M calm sockets writes
/// nothing: each retry walks a million more, so 4096 covers any table a host can hold.
const EAGAIN_RETRIES: u32 = 4096;

/// Everything an iterator's file yields, to its end.
fn read_all(mut file: impl Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let mut again = 0;
    loop {
        match file.read_to_end(&mut buf) {
            Ok(_) => return Ok(buf),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && again < EAGAIN_RETRIES => again += 1,
            Err(e) => return Err(e),
        }
    }
}

impl Loaded {
    /// Runs iterator `name` once and returns everything it wrote. A tcp iterator walks the table
    /// of the namespace it is created in: `ns` (the agent's own when None).
    pub(super) fn run_iter(
        &mut self,
        name: &'static str,
        ns: Option<&NsHandle>,
    ) -> Result<Vec<u8>, EbpfError> {
        let iter: &mut Iter = program(&mut self.ebpf, name)?;
        let id = iter.attach().map_err(perr(name))?;
        let link = iter.take_link(id).map_err(perr(name))?;
        let file = match ns {
            Some(ns) => ns.within(|| link.into_file())?,
            None => link.into_file(),
        };
        let file = file.map_err(|e| EbpfError::Iter(format!("{name}: {e}")))?;
        read_all(file).map_err(|e| EbpfError::Iter(format!("{name}: read: {e}")))
    }

    /// Runs the tcp iterator in namespace `ns`. Unfiltered (`None`) it reports every socket (and
    /// marks them in SEEN when `seen_mark_ms` is set); with `Some(min_idle_ms)` only the sockets
    /// worth a look (see `SnapFilter`).
    pub fn snapshot(&mut self, filter_idle_ms: Option<u64>, ns: &NsHandle) -> Result<Snapshot, EbpfError> {
        let hz = u64::from(self.hz);
        let jiffies = |ms: u64| (ms.saturating_mul(hz) / 1000).min(u64::from(u32::MAX)) as u32;
        let filter = SnapFilter {
            enabled: u32::from(filter_idle_ms.is_some()),
            min_idle_jiffies: filter_idle_ms.or(self.seen_mark_ms).map_or(0, jiffies),
        };
        self.read_table(filter, Coverage::filtered(filter_idle_ms), ns)
    }

    /// Every socket of namespace `ns`, without marking SEEN (a query's fresh values: the flows it
    /// names are taken from it, and sockets the agent has not met yet stay to be reported, with
    /// their owners, by the next filtered read).
    pub fn snapshot_unmarked(&mut self, ns: &NsHandle) -> Result<Snapshot, EbpfError> {
        let filter = SnapFilter {
            enabled: 0,
            min_idle_jiffies: 0,
        };
        self.read_table(filter, Coverage::Targeted, ns)
    }

    fn read_table(
        &mut self,
        filter: SnapFilter,
        coverage: Coverage,
        ns: &NsHandle,
    ) -> Result<Snapshot, EbpfError> {
        let started = sys::monotonic_ns();
        {
            let mut f: Array<&mut MapData, SnapFilter> = Array::try_from(
                self.ebpf
                    .map_mut("SNAP_FILTER")
                    .ok_or(EbpfError::Missing("SNAP_FILTER"))?,
            )
            .map_err(merr("SNAP_FILTER"))?;
            f.set(0, &filter, 0).map_err(merr("SNAP_FILTER"))?;
        }
        let buf = self.run_iter("snapshot_tcp", Some(ns))?;
        let rec = std::mem::size_of::<SnapRecord>();
        let mut socks = Vec::with_capacity(buf.len() / rec);
        for chunk in buf.chunks(rec) {
            if let Ok(s) = decode::snap(chunk, self.hz) {
                socks.push(s);
            }
        }
        Ok(Snapshot::taken(
            ns.id,
            (started, sys::monotonic_ns()),
            socks,
            coverage,
        ))
    }

    /// Every socket file on the host (all namespaces) from the kernel's task_file iterator:
    /// (socket inode, holding tgid, fd), without a /proc/*/fd walk.
    pub fn socket_files(&mut self) -> Result<Vec<OwnerRecord>, EbpfError> {
        let buf = self.run_iter("owners_task_file", None)?;
        let rec = std::mem::size_of::<OwnerRecord>();
        Ok(buf
            .chunks_exact(rec)
            .filter_map(|c| decode::owner(c).ok())
            .collect())
    }

    /// The socket inodes process `pid` holds: the task_file iterator limited to that process
    /// (its descriptors only, read in the kernel: no readlink of each descriptor in /proc).
    pub fn sockets_of(&mut self, pid: u32) -> Result<Vec<u64>, EbpfError> {
        const NAME: &str = "owners_task_file";
        let iter: &mut Iter = program(&mut self.ebpf, NAME)?;
        let prog = iter.fd().map_err(perr(NAME))?;
        let file = sys::iter_for_pid(std::os::fd::AsFd::as_fd(prog), pid)
            .map_err(|e| EbpfError::Iter(format!("{NAME} for pid {pid}: {e}")))?;
        let buf = read_all(file).map_err(|e| EbpfError::Iter(format!("{NAME} for pid {pid}: read: {e}")))?;
        let rec = std::mem::size_of::<OwnerRecord>();
        Ok(buf
            .chunks_exact(rec)
            .filter_map(|c| decode::owner(c).ok())
            .filter(|r| r.tgid == pid)
            .map(|r| r.inode)
            .collect())
    }

    /// `sockets_of`, or /proc where the per-process iterator fails (said once in the log).
    /// Measured: a process holding 800 sockets costs about 2.8 ms through /proc (3.5 µs per
    /// descriptor), so a server accepting 2 sessions a second spent 1.4 % of a core on finding
    /// their owner.
    pub fn sockets_of_or_proc(&mut self, pid: u32) -> Vec<u64> {
        if !self.pid_iter_failed {
            match self.sockets_of(pid) {
                Ok(v) => return v,
                Err(e) => {
                    tracing::warn!("the per-process socket-file iterator failed, reading /proc instead: {e}");
                    self.pid_iter_failed = true;
                }
            }
        }
        crate::kernel::owners::proc_sockets(pid)
    }

    /// Socket inode -> owning process (the first holder wins, as in a /proc walk).
    pub fn owners(&mut self) -> Result<HashMap<u64, u32>, EbpfError> {
        Ok(owner_map(&self.socket_files()?))
    }

    /// Applies or reads keepalive on exactly the requested sockets of namespace `ns`, in the
    /// kernel (bpf_setsockopt from the tcp iterator, under the socket lock).
    pub fn apply_keepalive(&mut self, reqs: &[KaRequest], ns: &NsHandle) -> Result<Vec<KaResult>, EbpfError> {
        {
            let mut m: BpfHashMap<&mut MapData, u64, KaTarget> = BpfHashMap::try_from(
                self.ebpf
                    .map_mut("KA_TARGETS")
                    .ok_or(EbpfError::Missing("KA_TARGETS"))?,
            )
            .map_err(merr("KA_TARGETS"))?;
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
                    watch: i32::from(r.watch),
                    ..Default::default()
                };
                m.insert(&r.cookie, &t, 0).map_err(merr("KA_TARGETS"))?;
            }
        }
        if reqs.iter().any(|r| r.watch) {
            self.attach_answers()?;
        }
        let run = self.run_iter("apply_keepalive", Some(ns)).map(|_| ());
        let mut m: BpfHashMap<&mut MapData, u64, KaTarget> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("KA_TARGETS")
                .ok_or(EbpfError::Missing("KA_TARGETS"))?,
        )
        .map_err(merr("KA_TARGETS"))?;
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
}

/// Socket inode -> owning process from the task_file records (the first holder wins, as in a
/// /proc walk).
pub fn owner_map(files: &[OwnerRecord]) -> HashMap<u64, u32> {
    let mut out = HashMap::with_capacity(files.len());
    for f in files {
        out.entry(f.inode).or_insert(f.tgid);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::read_all;

    /// A file that answers EAGAIN between its chunks, as an iterator does after a million
    /// sockets left out.
    struct Skipping(Vec<Option<&'static [u8]>>);

    impl std::io::Read for Skipping {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            match self.0.remove(0) {
                None => Err(std::io::Error::from_raw_os_error(libc::EAGAIN)),
                Some(b) => {
                    out[..b.len()].copy_from_slice(b);
                    Ok(b.len())
                }
            }
        }
    }

    #[test]
    fn a_read_goes_on_after_eagain() {
        let f = Skipping(vec![None, Some(b"ab"), None, None, Some(b"c")]);
        assert_eq!(read_all(f).unwrap(), b"abc");
        let endless = Skipping(vec![None; 5000]);
        assert!(
            read_all(endless).is_err(),
            "a file that only says EAGAIN is an error"
        );
    }
}
