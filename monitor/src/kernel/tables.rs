//! Reading one network namespace's TCP table, as the agent and `holdfast probe` do: the
//! namespace's socket counts first (O(1)), then, only if it has sockets, a walk with the bpf
//! iterator (eBPF mode) or sock_diag (poll mode), each created inside the namespace.
use super::netns::{NsHandle, TcpCounts};
use super::{ebpf, sockdiag, sys};
use crate::model::observe::{Coverage, Snapshot};

/// Reads `ns`'s table with the iterator of `loaded` (eBPF mode, optionally kernel-filtered to the
/// sockets worth a look) or with sock_diag (`loaded` None). A namespace without a TCP socket is
/// not walked: every walk costs the whole host-wide hash table (262144 buckets on the bench
/// machine: 0.6 ms with sock_diag, 2 ms with the iterator, measured by `cargo xtask bench`).
/// `counts` are the namespace's socket counts if the caller has them (from [`SockstatFiles`]);
/// else they are read here.
///
/// [`SockstatFiles`]: super::netns::SockstatFiles
pub fn read(
    loaded: Option<&mut ebpf::Loaded>,
    filter_idle_ms: Option<u64>,
    ns: &NsHandle,
    counts: Option<TcpCounts>,
) -> Result<Snapshot, String> {
    let started = sys::monotonic_ns();
    let counts = match counts {
        Some(c) => Some(c),
        None => ns.tcp_counts().map_err(|e| e.to_string())?,
    };
    if counts.is_some_and(|c| c.inuse == 0) {
        return Ok(Snapshot {
            netns: ns.id,
            started,
            finished: sys::monotonic_ns(),
            socks: Vec::new(),
            coverage: Coverage::filtered(filter_idle_ms),
            time_wait: counts.map(|c| c.tw),
        });
    }
    let mut snap = match loaded {
        Some(l) => l.snapshot(filter_idle_ms, ns).map_err(|e| e.to_string())?,
        None => {
            let sock = ns.within(sockdiag::socket).map_err(|e| e.to_string())?;
            sockdiag::dump_on(&sock.map_err(|e| e.to_string())?, ns.id).map_err(|e| e.to_string())?
        }
    };
    snap.started = started;
    snap.time_wait = counts.map(|c| c.tw);
    Ok(snap)
}

/// Up to this many sockets, fresh values are read one sock_diag request each; beyond, the whole
/// table is read once. 1000 sockets named out of 101k: 10-20 ms by requests, where the bpf
/// iterator, which walks the whole table whatever it reports, took 70-90 ms (`holdfast flows
/// --port` on this machine; `cargo xtask bench` keeps the row).
pub const EXACT_MAX: usize = 4096;

/// Fresh values of the sockets `ids` of `ns` for a query (a snapshot of `Coverage::Targeted`:
/// the caller takes from it only the flows it named). A few are read exactly by sock_diag (in
/// both modes: cost grows with the sockets named, not with the table); many, by one read of the
/// whole table (the bpf iterator without marking SEEN, or a sock_diag dump).
pub fn read_of(
    loaded: Option<&mut ebpf::Loaded>,
    ids: &[sockdiag::SockId],
    ns: &NsHandle,
) -> Result<Snapshot, String> {
    let mut snap = match loaded {
        Some(l) if ids.len() > EXACT_MAX => l.snapshot_unmarked(ns).map_err(|e| e.to_string())?,
        _ => {
            let sock = ns.within(sockdiag::socket).map_err(|e| e.to_string())?;
            let sock = sock.map_err(|e| e.to_string())?;
            if ids.len() > EXACT_MAX {
                sockdiag::dump_on(&sock, ns.id).map_err(|e| e.to_string())?
            } else {
                sockdiag::lookup_on(&sock, ns.id, ids).map_err(|e| e.to_string())?
            }
        }
    };
    snap.coverage = Coverage::Targeted;
    Ok(snap)
}
