//! The agent's one module of raw system calls; every `unsafe` block of the agent lives here.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// CLOCK_MONOTONIC in nanoseconds (the clock of bpf_ktime_get_ns).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel's HZ, from the rate of jiffies in /proc/timer_list over 100 ms (250 if unreadable).
pub fn kernel_hz() -> u32 {
    let read = || -> Option<(u64, f64)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let j = text
            .lines()
            .find_map(|l| l.strip_prefix("jiffies: "))?
            .trim()
            .parse::<u64>()
            .ok()?;
        Some((j, monotonic_ns() as f64 / 1e9))
    };
    let Some((j0, t0)) = read() else { return 250 };
    std::thread::sleep(std::time::Duration::from_millis(100));
    read()
        .and_then(|(j1, t1)| crate::decode::hz_from_rate(j0, t0, j1, t1))
        .unwrap_or(250)
}

/// Credentials of the peer of a connected unix socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// chown(2) without following symlinks.
pub fn lchown(path: &std::path::Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::lchown(path, uid, gid)
}

pub const NETLINK_SOCK_DIAG: i32 = libc::NETLINK_SOCK_DIAG;

/// A netlink socket of `protocol`, close-on-exec.
pub fn netlink_socket(protocol: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the returned descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sends one netlink request to the kernel.
pub fn netlink_send(fd: &std::os::fd::OwnedFd, msg: &[u8]) -> io::Result<()> {
    let mut addr: libc::sockaddr_nl = unsafe_zeroed_nl();
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and addr are valid for the lengths passed.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn unsafe_zeroed_nl() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Receives one netlink datagram, retrying on EINTR.
pub fn netlink_recv(fd: &std::os::fd::OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A process held by a pidfd: signals sent through it can never hit a reused pid.
pub struct Pidfd(std::os::fd::OwnedFd);

/// pidfd_open(2).
pub fn pidfd_open(pid: u32) -> io::Result<Pidfd> {
    use std::os::fd::FromRawFd;
    // SAFETY: raw syscall with integer arguments; on success it returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(Pidfd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
}

impl Pidfd {
    /// pidfd_send_signal(2) with no siginfo (as kill(2) would send it).
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: raw syscall on a descriptor we own; a null siginfo is allowed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Pidfd {
    /// pidfd_getfd(2): a duplicate of the target's descriptor `fd` in this process (close-on-exec).
    /// Needs PTRACE_MODE_ATTACH_REALCREDS over the target (root has it).
    pub fn getfd(&self, fd: i32) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: raw syscall with integer arguments; on success it returns a new descriptor we own.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.0.as_raw_fd(), fd, 0u32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: r is a fresh descriptor owned by nobody else.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
    }
}

/// getsockopt(2) of an int option.
pub fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// setsockopt(2) of an int option.
pub fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    let v: libc::c_int = value;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `v`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// shutdown(2) both directions.
pub fn shutdown(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor we hold; no memory is passed.
    let rc = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Restores the default SIGPIPE disposition (the CLI then ends quietly when its output pipe
/// closes, like other Unix tools; the agent keeps ignoring it and handles EPIPE).
pub fn default_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_DFL has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
