//! Remedy executors that touch other processes: always through a pidfd, never a bare pid.
use std::os::fd::AsFd;

use crate::eviction::{KaRequest, KaResult, KaValues};
use crate::procs;
use crate::sys;
use crate::zombies::{NudgeError, Nudger, ProcView};

/// The live /proc.
pub struct LiveProc;

impl ProcView for LiveProc {
    fn stat(&self, pid: u32) -> Option<procs::ProcStat> {
        procs::read_stat(pid)
    }
    fn signals(&self, pid: u32) -> Option<procs::ProcSignals> {
        procs::read_signals(pid)
    }
}

/// Sends SIGCHLD through a pidfd after checking the pid is still the diagnosed process.
pub struct PidfdNudger;

fn classify(e: std::io::Error, what: &str) -> NudgeError {
    match e.raw_os_error() {
        Some(libc::ESRCH) => NudgeError::Gone,
        Some(libc::EPERM) => NudgeError::Refused(format!(
            "EPERM on {what} (holdfast needs CAP_KILL or the parent's uid)"
        )),
        _ => NudgeError::Refused(format!("{what}: {e}")),
    }
}

impl Nudger for PidfdNudger {
    fn nudge(&mut self, pid: u32, starttime: u64) -> Result<(), NudgeError> {
        let fd = sys::pidfd_open(pid).map_err(|e| classify(e, "pidfd_open"))?;
        // The pidfd pins one process; make sure it is the incarnation that was diagnosed.
        match procs::read_stat(pid) {
            Some(st) if st.starttime == starttime => {}
            _ => return Err(NudgeError::Gone),
        }
        fd.send_signal(libc::SIGCHLD)
            .map_err(|e| classify(e, "pidfd_send_signal"))
    }
}

/// Aborts sockets through sock_diag SOCK_DESTROY; without CONFIG_INET_DIAG_DESTROY, shuts the
/// socket down through a pidfd duplicate so that the owner sees EOF / EPIPE.
pub struct SockDiagCloser;

impl crate::leaks::Closer for SockDiagCloser {
    fn close(&mut self, f: &crate::flows::Flow) -> Result<&'static str, String> {
        match crate::sockdiag::destroy(f.local, f.remote, f.state, f.cookie) {
            Ok(()) => Ok("SOCK_DESTROY"),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let pid = f
                    .owner
                    .as_ref()
                    .map(|o| o.pid)
                    .ok_or("no SOCK_DESTROY in this kernel and the owner is unknown")?;
                let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
                let fd =
                    fd_of(pid, f.inode).ok_or_else(|| format!("pid {pid} no longer holds the socket"))?;
                let dup = pidfd.getfd(fd).map_err(|e| format!("pidfd_getfd: {e}"))?;
                sys::shutdown(dup.as_fd()).map_err(|e| format!("shutdown: {e}"))?;
                Ok("pidfd + shutdown (no SOCK_DESTROY in this kernel)")
            }
            Err(e) => Err(format!("SOCK_DESTROY: {e}")),
        }
    }
}

/// The descriptor number under which `pid` holds the socket with this inode.
fn fd_of(pid: u32, inode: u64) -> Option<i32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let want = format!("socket:[{inode}]");
    dir.flatten().find_map(|e| {
        let target = std::fs::read_link(e.path()).ok()?;
        (target.to_str()? == want).then(|| e.file_name().to_str()?.parse().ok())?
    })
}

fn read_ka(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<(bool, KaValues)> {
    let on = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0;
    let idle = sys::getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?;
    let intvl = sys::getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?;
    let cnt = sys::getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?;
    Ok((
        on,
        KaValues {
            idle_s: idle as u32,
            intvl_s: intvl as u32,
            cnt: cnt as u32,
        },
    ))
}

/// Keepalive on a live socket of another process: pidfd_open + pidfd_getfd + setsockopt.
/// The duplicate shares the socket, so the owner sees the new options; it is closed at once.
pub fn pidfd_keepalive(req: &KaRequest) -> KaResult {
    let mut res = KaResult {
        cookie: req.cookie,
        before: None,
        after: None,
        error: None,
        via: "pidfd",
    };
    let run = |res: &mut KaResult| -> Result<(), String> {
        let pid = req.pid.ok_or("the socket's owner is not known yet")?;
        if req.inode == 0 {
            return Err("the socket has no file (not accepted yet or orphaned)".into());
        }
        let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let fd = fd_of(pid, req.inode)
            .ok_or_else(|| format!("pid {pid} no longer holds socket inode {}", req.inode))?;
        let dup = pidfd
            .getfd(fd)
            .map_err(|e| format!("pidfd_getfd({pid}, {fd}): {e}"))?;
        // The pid may have closed and reused the descriptor number: check it is the same socket.
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dup)))
            .map(|m| m.ino())
            .unwrap_or(0);
        if ino != req.inode {
            return Err(format!(
                "descriptor {fd} of pid {pid} is no longer socket inode {}",
                req.inode
            ));
        }
        res.before = Some(read_ka(dup.as_fd()).map_err(|e| format!("getsockopt: {e}"))?);
        if let Some(v) = req.set {
            let set = |level, name, value| sys::setsockopt_int(dup.as_fd(), level, name, value);
            set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)
                .and_then(|_| set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, v.intvl_s as i32))
                .and_then(|_| set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, v.cnt as i32))
                // Last: with keepalive on, TCP_KEEPIDLE re-arms the timer from the last activity.
                .and_then(|_| set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, v.idle_s as i32))
                .map_err(|e| format!("setsockopt: {e}"))?;
        }
        res.after = Some(read_ka(dup.as_fd()).map_err(|e| format!("getsockopt: {e}"))?);
        Ok(())
    };
    if let Err(e) = run(&mut res) {
        res.error = Some(e);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_reused_pid() {
        let me = procs::read_stat(std::process::id()).unwrap();
        let mut n = PidfdNudger;
        assert_eq!(n.nudge(me.pid, me.starttime + 1), Err(NudgeError::Gone));
    }

    #[test]
    fn sets_keepalive_on_a_socket_of_this_process_through_a_pidfd() {
        use std::os::unix::fs::MetadataExt;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&c);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let v = KaValues {
            idle_s: 33,
            intvl_s: 7,
            cnt: 3,
        };
        let r = pidfd_keepalive(&KaRequest {
            cookie: 1,
            inode,
            pid: Some(std::process::id()),
            set: Some(v),
        });
        if r.error
            .as_deref()
            .is_some_and(|e| e.contains("Operation not permitted"))
        {
            eprintln!("SKIP: pidfd_getfd needs ptrace rights over this process here: {r:?}");
            return;
        }
        assert_eq!(r.error, None);
        assert!(!r.before.unwrap().0);
        assert_eq!(r.after, Some((true, v)));
        assert_eq!(
            sys::getsockopt_int(c.as_fd(), libc::IPPROTO_TCP, libc::TCP_KEEPIDLE).unwrap(),
            33,
            "the owner's socket changed"
        );
        let missing = pidfd_keepalive(&KaRequest {
            cookie: 1,
            inode: inode + 999_999,
            pid: Some(std::process::id()),
            set: None,
        });
        assert!(missing.error.unwrap().contains("no longer holds"));
    }

    #[test]
    fn a_missing_process_is_gone() {
        let mut n = PidfdNudger;
        // pid_max is at most 4194304: this pid cannot exist.
        assert_eq!(n.nudge(4_194_305, 0), Err(NudgeError::Gone));
    }
}
