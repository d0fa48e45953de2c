//! `holdfast probe`: one full read of the kernel's views, timed as the agent does it (the bench
//! uses it to compare with `ss` and `ps` on the same sockets and processes).
use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;
use serde_json::json;

use crate::config::Mode;
use crate::kernel::netns::{NsHandle, own_id};
use crate::kernel::owners::OwnerResolver;
use crate::kernel::{ebpf, procfs, sockdiag};

#[derive(Subcommand, Debug)]
pub enum ProbeCmd {
    /// The whole TCP table with tcp_info (and owners with --owners).
    Snapshot {
        #[arg(long, value_enum, default_value = "poll")]
        mode: Mode,
        #[arg(long)]
        owners: bool,
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// eBPF: also time kernel-filtered reads (the steady-state at-risk read) with this idle
        /// threshold in milliseconds.
        #[arg(long)]
        filtered_ms: Option<u64>,
    },
    /// Every network namespace: a discovery, then each namespace's whole table read from inside
    /// it (as the agent does), timed apart.
    Namespaces {
        #[arg(long, value_enum, default_value = "poll")]
        mode: Mode,
        #[arg(long, default_value_t = 3)]
        repeat: u32,
    },
    /// The keepalive-probe watch: flags N loopback connections from the tcp iterator, checks
    /// with getsockopt (the iterator's census) that exactly they carry the flag, sends traffic on
    /// them to time the sock_ops callback, releases them and checks that no flag is left.
    Watch {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        /// Segments sent per socket while watched (each is one or two callbacks).
        #[arg(long, default_value_t = 20)]
        segments: usize,
        /// Only count the sockets of this namespace that carry the flag (nothing is changed).
        #[arg(long)]
        census: bool,
    },
    /// The /proc zombie scan.
    Procs {
        #[arg(long, default_value_t = 3)]
        repeat: u32,
    },
}

fn snapshot(
    mode: Mode,
    owners: bool,
    repeat: u32,
    filtered_ms: Option<u64>,
) -> Result<serde_json::Value, String> {
    let ns = NsHandle {
        id: own_id(),
        path: "/proc/self/ns/net".into(),
    };
    let mut loaded = load(mode)?;
    let mode = if loaded.is_some() { "ebpf" } else { "poll" };
    let mut runs = Vec::new();
    let mut socks = 0;
    let mut owned = 0;
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        let snap = match loaded.as_mut() {
            Some(l) => l.snapshot(None, &ns).map_err(|e| e.to_string())?,
            None => sockdiag::dump(ns.id).map_err(|e| e.to_string())?,
        };
        let read = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if owners {
            // A fresh resolver each run: the cost of finding every owner from nothing.
            let mut resolver = OwnerResolver::default();
            let socks: Vec<_> = snap.socks.iter().collect();
            match loaded.as_mut() {
                Some(l) => resolver.resolve_from(&socks, &l.owners().map_err(|e| e.to_string())?),
                None => resolver.resolve(
                    &socks,
                    &crate::kernel::owners::PidHints::new(0, Instant::now()),
                    Instant::now(),
                ),
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
            let s = l.snapshot(Some(ms), &ns).map_err(|e| e.to_string())?;
            best = best.min(t0.elapsed().as_secs_f64());
            reported = s.socks.len();
        }
        filtered = json!({ "min_idle_ms": ms, "best_s": best, "reported": reported });
    }
    let best = |k: &str| runs.iter().filter_map(|r| r[k].as_f64()).fold(f64::MAX, f64::min);
    Ok(json!({
        "mode": mode, "sockets": socks, "owned": owned, "runs": runs, "best_read_s": best("read_s"),
        "best_total_s": best("total_s"), "best_owners_s": best("owners_s"), "filtered": filtered
    }))
}

/// The eBPF programs, unless `mode` is poll.
fn load(mode: Mode) -> Result<Option<ebpf::Loaded>, String> {
    match mode {
        Mode::Poll => Ok(None),
        _ => Ok(Some(
            ebpf::load(&ebpf::LoadOptions::default())
                .map_err(|e| e.to_string())?
                .0,
        )),
    }
}

/// Times discovery and a read of every namespace's table, `repeat` times (best of each).
fn namespaces(mode: Mode, repeat: u32) -> Result<serde_json::Value, String> {
    let mut loaded = load(mode)?;
    let mode = if loaded.is_some() { "ebpf" } else { "poll" };
    let (mut best_discovery, mut best_read) = (f64::MAX, f64::MAX);
    let (mut spaces, mut socks, mut failed) = (0, 0, 0);
    for _ in 0..repeat.max(1) {
        // A fresh discovery each time: the cost at start (later ones only look at new pids).
        let t0 = Instant::now();
        let found = crate::kernel::netns::discover::Discovery::default().run(own_id());
        best_discovery = best_discovery.min(t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        let (mut n, mut bad) = (0, 0);
        for f in &found {
            let r = crate::kernel::tables::read(loaded.as_mut(), None, &f.handle, None);
            match r {
                Ok(snap) => n += snap.socks.len(),
                Err(_) => bad += 1,
            }
        }
        best_read = best_read.min(t1.elapsed().as_secs_f64());
        (spaces, socks, failed) = (found.len(), n, bad);
    }
    Ok(json!({
        "mode": mode, "namespaces": spaces, "sockets": socks, "failed": failed,
        "best_discovery_s": best_discovery, "best_read_s": best_read,
        "ns_per_socket": if socks > 0 { best_read * 1e9 / socks as f64 } else { 0.0 },
    }))
}

/// See `ProbeCmd::Watch`.
fn watch(sockets: usize, segments: usize, census: bool) -> Result<serde_json::Value, String> {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    // Two sockets per connection: room for them.
    let _ = crate::kernel::sys::raise_nofile();
    let mut l = load(Mode::Ebpf)?.ok_or("eBPF did not load")?;
    let ns = NsHandle {
        id: own_id(),
        path: "/proc/self/ns/net".into(),
    };
    if census {
        let r = l.select(&[], &[], &ns).map_err(|e| e.to_string())?;
        // Loading attached a fresh probe_watch; every flag counted here belongs to no agent.
        return Ok(json!({ "flagged": r.flagged }));
    }
    let lst = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = lst.local_addr().map_err(|e| e.to_string())?;
    let mut pairs = Vec::with_capacity(sockets);
    let mut cookies = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let c = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let (s, _) = lst.accept().map_err(|e| format!("accept: {e}"))?;
        cookies.push(crate::kernel::sys::socket_cookie(c.as_fd()).map_err(|e| e.to_string())?);
        pairs.push((c, s));
    }
    // Run-time statistics only while this descriptor is open (nothing left switched on).
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let stats = |l: &mut ebpf::Loaded| l.watch_program_stats();
    let before = stats(&mut l);
    let t0 = Instant::now();
    let on = l.select(&cookies, &[], &ns).map_err(|e| e.to_string())?;
    let select_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut buf = [0u8; 64];
    for (c, s) in pairs.iter_mut() {
        for _ in 0..segments {
            c.write_all(b"x").map_err(|e| e.to_string())?;
            s.read_exact(&mut buf[..1]).map_err(|e| e.to_string())?;
            s.write_all(b"y").map_err(|e| e.to_string())?;
            c.read_exact(&mut buf[..1]).map_err(|e| e.to_string())?;
        }
    }
    let traffic_s = t1.elapsed().as_secs_f64();
    let after = stats(&mut l);
    let t2 = Instant::now();
    let off = l.select(&[], &cookies, &ns).map_err(|e| e.to_string())?;
    let release_s = t2.elapsed().as_secs_f64();
    // A last census with nothing asked: what is left flagged in the namespace.
    let left = l.select(&[], &[], &ns).map_err(|e| e.to_string())?;
    let measured = before.is_some() && after.is_some();
    let (b, a) = (before.unwrap_or_default(), after.unwrap_or_default());
    let runs = a[0].0.saturating_sub(b[0].0);
    let ns_total = a[0].1.saturating_sub(b[0].1);
    let answer_runs = a[1].0.saturating_sub(b[1].0);
    let answer_ns = a[1].1.saturating_sub(b[1].1);
    let per_callback = if runs > 0 {
        ns_total as f64 / runs as f64
    } else {
        0.0
    };
    let per_segment = runs as f64 / (2 * sockets * segments).max(1) as f64;
    Ok(json!({
        "sockets": sockets, "segments_per_socket": segments,
        "watching": on.watching.len(), "refused": on.failed.len(),
        "flagged_while_watched": on.flagged, "stray_while_watched": on.stray,
        "released": off.released.len(), "flagged_after_release": left.flagged,
        "select_s": select_s, "release_s": release_s, "traffic_s": traffic_s,
        "callbacks": runs,
        "ns_per_callback": per_callback,
        "callbacks_per_segment": per_segment,
        // tcp_probe runs for every segment received by any socket while some socket is watched
        // (here half of the receivers are watched, half not).
        "answer_runs": answer_runs,
        "answer_ns_per_run": if answer_runs > 0 { answer_ns as f64 / answer_runs as f64 } else { 0.0 },
        // One core's worth of callbacks, for watched sockets each sending one segment a second.
        "sockets_per_core_at_1_segment_per_s": if per_callback > 0.0 { 1e9 / (per_callback * per_segment.max(1.0)) } else { 0.0 },
        "run_time_measured": measured,
    }))
}

/// Times `repeat` /proc zombie scans.
fn procs(repeat: u32) -> serde_json::Value {
    let mut best = f64::MAX;
    let mut last = procfs::ProcScan::default();
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        last = procfs::scan();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    json!({ "processes": last.processes, "zombies": last.zombies.len(), "best_s": best })
}

pub fn run(what: ProbeCmd) -> Result<(), ExitCode> {
    let r = match what {
        ProbeCmd::Snapshot {
            mode,
            owners,
            repeat,
            filtered_ms,
        } => snapshot(mode, owners, repeat, filtered_ms),
        ProbeCmd::Namespaces { mode, repeat } => namespaces(mode, repeat),
        ProbeCmd::Procs { repeat } => Ok(procs(repeat)),
        ProbeCmd::Watch {
            sockets,
            segments,
            census,
        } => watch(sockets, segments, census),
    };
    match r {
        Ok(v) => {
            println!("{v}");
            Ok(())
        }
        Err(e) => {
            eprintln!("holdfast: {e}");
            Err(ExitCode::from(1))
        }
    }
}
