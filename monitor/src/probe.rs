//! `holdfast probe`: time one full read of the kernel's views in this namespace, the way the agent
//! does it (for `cargo xtask bench` and for operators sizing a host). Prints JSON.
use std::collections::HashMap;
use std::time::Instant;

use serde_json::json;

use crate::owners::OwnerResolver;

/// Times `repeat` full TCP table reads through `mode` (`ebpf` or `poll`), with owners if asked.
pub fn snapshot(
    mode: &str,
    owners: bool,
    repeat: u32,
    filtered_ms: Option<u64>,
) -> Result<serde_json::Value, String> {
    let mut loaded = if mode == "ebpf" {
        Some(
            crate::ebpf::load(&Default::default())
                .map_err(|e| e.to_string())?
                .0,
        )
    } else {
        None
    };
    let mut runs = Vec::new();
    let mut socks = 0;
    let mut owned = 0;
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        let snap = match loaded.as_mut() {
            Some(l) => l.snapshot(None).map_err(|e| e.to_string())?,
            None => crate::sockdiag::dump().map_err(|e| e.to_string())?,
        };
        let read = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if owners {
            // A fresh resolver each run: the cost of finding every owner from nothing.
            let mut resolver = OwnerResolver::default();
            match loaded.as_mut() {
                Some(l) => resolver.resolve_from(&snap.socks, &l.owners().map_err(|e| e.to_string())?),
                None => resolver.resolve(&snap.socks, &HashMap::new(), Instant::now()),
            }
            owned = snap
                .socks
                .iter()
                .filter(|s| resolver.owner(s.inode).is_some())
                .count();
        }
        socks = snap.socks.len();
        runs.push(json!({ "read_s": read, "owners_s": t1.elapsed().as_secs_f64(), "total_s": t0.elapsed().as_secs_f64() }));
    }
    // The steady-state read: the kernel reports only new, troubled or idle sockets (after the
    // full reads above, every socket has been seen once).
    let mut filtered = serde_json::Value::Null;
    if let (Some(l), Some(ms)) = (loaded.as_mut(), filtered_ms) {
        let mut best = f64::MAX;
        let mut reported = 0;
        for _ in 0..repeat.max(1) {
            let t0 = Instant::now();
            let s = l.snapshot(Some(ms)).map_err(|e| e.to_string())?;
            best = best.min(t0.elapsed().as_secs_f64());
            reported = s.socks.len();
        }
        filtered = json!({ "min_idle_ms": ms, "best_s": best, "reported": reported });
    }
    let best = |k: &str| runs.iter().filter_map(|r| r[k].as_f64()).fold(f64::MAX, f64::min);
    Ok(
        json!({ "mode": mode, "sockets": socks, "owned": owned, "runs": runs, "best_read_s": best("read_s"), "best_total_s": best("total_s"), "best_owners_s": best("owners_s"), "filtered": filtered }),
    )
}

/// Times `repeat` /proc zombie scans.
pub fn procs(repeat: u32) -> serde_json::Value {
    let mut best = f64::MAX;
    let mut last = crate::procs::ProcScan::default();
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        last = crate::procs::scan();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    json!({ "processes": last.processes, "zombies": last.zombies.len(), "best_s": best })
}
