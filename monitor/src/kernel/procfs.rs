//! Processes from /proc (through the procfs crate): stat and signal masks, the zombie scan, owners
//! (comm, cgroup, unit), the socket descriptors a process holds, and its RLIMIT_NOFILE.
use procfs::process::{FDTarget, LimitValue, Process};

use crate::model::observe::Owner;
use crate::model::process::{ProcSignals, ProcStat};

fn process(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

fn stat_of(p: &Process) -> Option<ProcStat> {
    let s = p.stat().ok()?;
    Some(ProcStat {
        pid: s.pid as u32,
        comm: s.comm,
        state: s.state,
        ppid: s.ppid as u32,
        starttime: s.starttime,
    })
}

pub fn read_stat(pid: u32) -> Option<ProcStat> {
    stat_of(&process(pid)?)
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    read_stat(pid).is_some_and(|s| s.state != 'Z')
}

pub fn read_signals(pid: u32) -> Option<ProcSignals> {
    let s = process(pid)?.status().ok()?;
    Some(ProcSignals {
        state: s.state.chars().next()?,
        blocked: s.sigblk,
        ignored: s.sigign,
        caught: s.sigcgt,
        pending: s.sigpnd | s.shdpnd,
    })
}

/// Result of one /proc walk.
#[derive(Clone, Debug, Default)]
pub struct ProcScan {
    pub processes: usize,
    pub zombies: Vec<ProcStat>,
}

/// Reads /proc/PID/stat of every process and keeps the zombies. The hot path of poll mode: each
/// stat file is opened directly and parsed by procfs's `Stat` (`Process::new` would also open and
/// stat the /proc/PID directory: measured 0.173 s vs 0.105 s for 10k processes).
pub fn scan() -> ProcScan {
    use procfs::FromRead;
    let mut out = ProcScan::default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(s) = procfs::process::Stat::from_file(format!("/proc/{pid}/stat")) else {
            continue;
        };
        out.processes += 1;
        if s.state == 'Z' {
            out.zombies.push(ProcStat {
                pid,
                comm: s.comm,
                state: s.state,
                ppid: s.ppid as u32,
                starttime: s.starttime,
            });
        }
    }
    out
}

/// The cgroup v2 path of a process.
fn cgroup_v2(p: &Process) -> Option<String> {
    p.cgroups()
        .ok()?
        .into_iter()
        .find(|c| c.hierarchy == 0)
        .map(|c| c.pathname)
}

/// The systemd unit of a cgroup v2 path: its last `.service` or `.scope` component.
pub fn unit_of(cgroup: &str) -> Option<String> {
    cgroup
        .split('/')
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_string)
}

/// Reads comm, cgroup and unit of `pid`.
pub fn describe(pid: u32) -> Option<Owner> {
    let p = process(pid)?;
    let comm = p.stat().ok()?.comm;
    let cgroup = cgroup_v2(&p);
    let unit = cgroup.as_deref().and_then(unit_of);
    Some(Owner {
        pid,
        comm,
        cgroup,
        unit,
    })
}

/// The socket descriptors of `pid`: (fd, socket inode).
pub fn socket_fds(pid: u32) -> Vec<(i32, u64)> {
    let Some(p) = process(pid) else {
        return Vec::new();
    };
    let Ok(fds) = p.fd() else { return Vec::new() };
    fds.flatten()
        .filter_map(|f| match f.target {
            FDTarget::Socket(inode) => Some((f.fd, inode)),
            _ => None,
        })
        .collect()
}

/// The descriptor number under which `pid` holds the socket with this inode.
pub fn fd_of(pid: u32, inode: u64) -> Option<i32> {
    socket_fds(pid)
        .into_iter()
        .find(|(_, i)| *i == inode)
        .map(|(fd, _)| fd)
}

/// Every pid in /proc.
pub fn all_pids() -> Vec<u32> {
    procfs::process::all_processes()
        .map(|all| all.flatten().map(|p| p.pid() as u32).collect())
        .unwrap_or_default()
}

/// The soft RLIMIT_NOFILE of `pid` (each session holds a descriptor).
pub fn nofile(pid: u32) -> Option<u64> {
    match process(pid)?.limits().ok()?.max_open_files.soft_limit {
        LimitValue::Value(n) => Some(n),
        LimitValue::Unlimited => None,
    }
}

/// The network namespace inode of `pid` (its /proc/PID/ns/net).
pub fn netns_of(pid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_from_cgroup_paths() {
        assert_eq!(
            unit_of("/system.slice/ssh.service").as_deref(),
            Some("ssh.service")
        );
        assert_eq!(
            unit_of("/user.slice/user-0.slice/session-3.scope/x").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(unit_of("/"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let st = read_stat(me).expect("own stat");
        assert_eq!(st.pid, me);
        assert!("RS".contains(st.state), "{st:?}");
        let sig = read_signals(me).expect("own status");
        assert!("RS".contains(sig.state), "{sig:?}");
        let o = describe(me).expect("own owner");
        assert_eq!(o.pid, me);
        assert!(o.cgroup.is_some());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let (_, inode) = *socket_fds(me).iter().find(|(f, _)| *f == fd).expect("listed");
        assert_eq!(fd_of(me, inode), Some(fd));
        assert!(nofile(me).is_some_and(|n| n > 0));
        assert!(all_pids().contains(&me));
        assert!(netns_of(me).is_some());
        assert!(read_stat(4_194_305).is_none(), "pid_max is at most 4194304");
    }
}
