//! The iterators: a snapshot of one namespace's TCP table (complete, or only the sockets worth a
//! look), the owners of every socket file on the host, and keepalive on targeted sockets.
use foldhash::{HashMap, HashMapExt};
use std::io::Read;
use std::mem::size_of;

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::programs::Iter;
use monitor_common::{KaTarget, OwnerRecord, SnapFilter, SnapRecord};

use super::{EbpfError, Loaded, merr, perr, program};
use crate::kernel::netns::NsHandle;
use crate::kernel::{decode, sys};
use crate::model::eviction::{KaRequest, KaResult, KaValues};
use crate::model::observe::{Coverage, Snapshot};

/// Bytes read from an iterator per read(2). The kernel hands out at most its seq buffer (8 pages)
/// per read: `strace` of a complete read of 10k sockets with a 1 MiB buffer showed every read
/// returning 32,640 bytes (340 records) or less. 64 KiB holds one such read next to a partial
/// record carried over, and stays under glibc's mmap threshold (no map and unmap per read; the
/// agent's targeted owner lookups run one small read each).
const READ_CHUNK: usize = 64 << 10;

/// EAGAIN answers in a row before a read gives up: the kernel returns EAGAIN after visiting a
/// million objects without writing anything (MAX_ITER_OBJECTS in kernel/bpf/bpf_iter.c), and the
/// next read(2) resumes where it stopped. A filtered read of a table of 1M calm sockets writes
/// nothing: each retry walks a million more, so 4096 covers any table a host can hold.
const EAGAIN_RETRIES: u32 = 4096;

/// Reads an iterator's file to its end and hands every whole `rec`-byte record to `each` as it
/// arrives: the output is never held whole. A complete read of 1M sockets is 96 MB of records,
/// held whole next to the samples decoded from them before (by hand at 200k sockets, `holdfast
/// probe snapshot --mode ebpf --owners`: peak RSS 75.6 MB holding them, 55.0 MB without).
/// Bytes left at the end that do not make a record (the kernel writes whole records: never
/// seen) are an error.
fn read_records(mut file: impl Read, rec: usize, mut each: impl FnMut(&[u8])) -> std::io::Result<()> {
    let rec = rec.clamp(1, READ_CHUNK);
    let mut buf = vec![0u8; READ_CHUNK];
    let (mut filled, mut again) = (0, 0);
    loop {
        match file.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(()),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the iterator ended inside a record ({filled} of {rec} bytes)"),
                ));
            }
            Ok(n) => {
                filled += n;
                let whole = filled - filled % rec;
                buf[..whole].chunks_exact(rec).for_each(&mut each);
                buf.copy_within(whole..filled, 0);
                filled -= whole;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && again < EAGAIN_RETRIES => again += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Complete reads whose size is remembered, per namespace, to size the next one's vector at once
/// (growing it by doubling would hold the old and the new one together: 1.5 times the samples).
const SIZE_HINTS: usize = 4096;

impl Loaded {
    /// Runs iterator `name` once and hands each `rec`-byte record it writes to `each`. A tcp
    /// iterator walks the table of the namespace it is created in: `ns` (the agent's own when
    /// None).
    pub(super) fn run_iter(
        &mut self,
        name: &'static str,
        ns: Option<&NsHandle>,
        rec: usize,
        each: impl FnMut(&[u8]),
    ) -> Result<(), EbpfError> {
        let iter: &mut Iter = program(&mut self.ebpf, name)?;
        let id = iter.attach().map_err(perr(name))?;
        let link = iter.take_link(id).map_err(perr(name))?;
        let file = match ns {
            Some(ns) => ns.within(|| link.into_file())?,
            None => link.into_file(),
        };
        let file = file.map_err(|e| EbpfError::Iter(format!("{name}: {e}")))?;
        read_records(file, rec, each).map_err(|e| EbpfError::Iter(format!("{name}: read: {e}")))
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
        let complete = filter.enabled == 0;
        let hint = if complete {
            self.size_hints.get(&ns.id).copied().unwrap_or(0)
        } else {
            0
        };
        // Room for the sockets the last complete read found and a sixteenth more.
        let mut socks = Vec::with_capacity(hint + hint / 16);
        let hz = self.hz;
        self.run_iter("snapshot_tcp", Some(ns), size_of::<SnapRecord>(), |r| {
            if let Ok(s) = decode::snap(r, hz) {
                socks.push(s);
            }
        })?;
        if complete {
            if self.size_hints.len() >= SIZE_HINTS && !self.size_hints.contains_key(&ns.id) {
                // Namespaces come and go; the hints of gone ones are dropped together.
                self.size_hints.clear();
            }
            self.size_hints.insert(ns.id, socks.len());
        }
        Ok(Snapshot::taken(
            ns.id,
            (started, sys::monotonic_ns()),
            socks,
            coverage,
        ))
    }

    /// Every socket file on the host (all namespaces) from the kernel's task_file iterator:
    /// (socket inode, holding tgid, fd), without a /proc/*/fd walk; each record handed to `each`
    /// as it is read (at 1M sockets the whole list would be 24 MB held for the walk).
    pub fn each_socket_file(&mut self, mut each: impl FnMut(OwnerRecord)) -> Result<(), EbpfError> {
        self.run_iter("owners_task_file", None, size_of::<OwnerRecord>(), |r| {
            if let Ok(f) = decode::owner(r) {
                each(f);
            }
        })
    }

    /// The socket inodes process `pid` holds: the task_file iterator limited to that process
    /// (its descriptors only, read in the kernel: no readlink of each descriptor in /proc).
    pub fn sockets_of(&mut self, pid: u32) -> Result<Vec<u64>, EbpfError> {
        const NAME: &str = "owners_task_file";
        let iter: &mut Iter = program(&mut self.ebpf, NAME)?;
        let prog = iter.fd().map_err(perr(NAME))?;
        let file = sys::iter_for_pid(std::os::fd::AsFd::as_fd(prog), pid)
            .map_err(|e| EbpfError::Iter(format!("{NAME} for pid {pid}: {e}")))?;
        let mut out = Vec::new();
        read_records(file, size_of::<OwnerRecord>(), |r| {
            if let Ok(f) = decode::owner(r)
                && f.tgid == pid
            {
                out.push(f.inode);
            }
        })
        .map_err(|e| EbpfError::Iter(format!("{NAME} for pid {pid}: read: {e}")))?;
        Ok(out)
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
        let mut out = HashMap::new();
        self.each_socket_file(|f| {
            out.entry(f.inode).or_insert(f.tgid);
        })?;
        Ok(out)
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
        // It writes nothing: the results are in KA_TARGETS.
        let run = self.run_iter("apply_keepalive", Some(ns), 1, |_| {});
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

#[cfg(test)]
mod tests {
    use super::read_records;

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

    fn records(f: Skipping, rec: usize) -> std::io::Result<Vec<Vec<u8>>> {
        let mut got = Vec::new();
        read_records(f, rec, |r| got.push(r.to_vec()))?;
        Ok(got)
    }

    #[test]
    fn a_read_goes_on_after_eagain() {
        let f = Skipping(vec![None, Some(b"ab"), None, None, Some(b"c")]);
        assert_eq!(records(f, 1).unwrap(), [b"a", b"b", b"c"]);
        let endless = Skipping(vec![None; 5000]);
        assert!(
            records(endless, 1).is_err(),
            "a file that only says EAGAIN is an error"
        );
    }

    #[test]
    fn records_split_across_reads_are_handed_out_whole() {
        let f = Skipping(vec![
            Some(b"abc"),
            Some(b"d"),
            None,
            Some(b"efgh"),
            Some(b"ij"),
            Some(b"kl"),
        ]);
        assert_eq!(records(f, 4).unwrap(), [b"abcd", b"efgh", b"ijkl"]);
        let cut = Skipping(vec![Some(b"abcd"), Some(b"ef")]);
        let err = records(cut, 4).unwrap_err();
        assert!(
            err.to_string().contains("inside a record (2 of 4 bytes)"),
            "a tail that is not a record is an error: {err}"
        );
        assert!(records(Skipping(vec![]), 4).unwrap().is_empty());
    }
}
