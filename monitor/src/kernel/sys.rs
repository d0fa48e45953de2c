//! System calls. nix wraps most of them safely; the few it lacks (pidfd_*, setxattr for the CLI
//! socket's ACL, malloc_trim, the SIGPIPE disposition) are here, and every `unsafe` block of the
//! agent outside the eBPF loader is in this file.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{self, sockopt};

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of bpf_ktime_get_ns).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
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
        .and_then(|(j1, t1)| super::decode::hz_from_rate(j0, t0, j1, t1))
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
    let c = socket::getsockopt(&fd, sockopt::PeerCredentials).map_err(io_err)?;
    Ok(PeerCred {
        pid: c.pid() as u32,
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// The socket's cookie (SO_COOKIE, Linux 4.12): the key the eBPF programs and sock_diag use.
/// nix 0.32 lacks it.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = 8 as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` (8) bytes into `v`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The supplementary groups of the peer of a connected unix socket (SO_PEERGROUPS, Linux 4.13):
/// taken at connect time, so a pid reused since cannot lie about them. nix 0.32 lacks it.
pub fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 256];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which holds that many.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / 4);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: `len` now says how much is needed (at most NGROUPS_MAX = 65536 groups).
        if e.raw_os_error() == Some(libc::ERANGE) && groups.len() < 65_536 {
            groups.resize((len as usize / 4).clamp(groups.len() * 2, 65_536), 0);
            continue;
        }
        return Err(e);
    }
}

pub fn geteuid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The gid of group `name`, through NSS (files, LDAP, sssd: whatever the host configures).
pub fn group_gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// A netlink socket of `protocol` (NETLINK_SOCK_DIAG, NETLINK_ROUTE), close-on-exec, in the
/// network namespace of the calling thread.
pub fn netlink_socket(protocol: socket::SockProtocol) -> io::Result<OwnedFd> {
    socket::socket(
        socket::AddressFamily::Netlink,
        socket::SockType::Datagram,
        socket::SockFlag::SOCK_CLOEXEC,
        protocol,
    )
    .map_err(io_err)
}

/// Sends one netlink request to the kernel.
pub fn netlink_send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    let kernel = socket::NetlinkAddr::new(0, 0);
    socket::sendto(fd.as_raw_fd(), msg, &kernel, socket::MsgFlags::empty())
        .map(|_| ())
        .map_err(io_err)
}

/// Receives one netlink datagram, retrying on EINTR.
pub fn netlink_recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match socket::recv(fd.as_raw_fd(), buf, socket::MsgFlags::empty()) {
            Ok(n) => return Ok(n),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// Makes the calling thread enter the network namespace `ns` (a /proc/PID/ns/net or bind-mount
/// file). Needs CAP_SYS_ADMIN.
pub fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io_err)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io_err)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io_err)?;
    Ok(hard)
}

/// A process held by a pidfd: signals sent through it can never hit a reused pid.
/// (nix 0.32 has no pidfd wrappers: these three are raw syscalls.)
pub struct Pidfd(OwnedFd);

/// pidfd_open(2).
pub fn pidfd_open(pid: u32) -> io::Result<Pidfd> {
    // SAFETY: raw syscall with integer arguments; on success it returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(Pidfd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

impl Pidfd {
    /// pidfd_send_signal(2) with no siginfo (as kill(2) would send it).
    pub fn send_signal(&self, sig: nix::sys::signal::Signal) -> io::Result<()> {
        // SAFETY: raw syscall on a descriptor we own; a null siginfo is allowed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig as i32,
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

    /// pidfd_getfd(2): a duplicate of the target's descriptor `fd` in this process (close-on-exec).
    /// Needs PTRACE_MODE_ATTACH_REALCREDS over the target (CAP_SYS_PTRACE).
    pub fn getfd(&self, fd: i32) -> io::Result<OwnedFd> {
        // SAFETY: raw syscall with integer arguments; on success it returns a new descriptor we own.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.0.as_raw_fd(), fd, 0u32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: r is a fresh descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
    }
}

/// A duplicate of the socket with this inode that `pid` holds, checked to be that very socket
/// after the duplication (the pid may have closed and reused the descriptor number meanwhile).
pub fn socket_of(pid: u32, inode: u64) -> Result<OwnedFd, String> {
    use std::os::unix::fs::MetadataExt;
    if inode == 0 {
        return Err("the socket has no file (not accepted yet, or orphaned)".into());
    }
    let pidfd = pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    let fd = super::procfs::fd_of(pid, inode)
        .ok_or_else(|| format!("pid {pid} no longer holds socket inode {inode}"))?;
    let dup = pidfd
        .getfd(fd)
        .map_err(|e| format!("pidfd_getfd({pid}, {fd}): {e}"))?;
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", dup.as_raw_fd()))
        .map(|m| m.ino())
        .unwrap_or(0);
    if ino != inode {
        return Err(format!(
            "descriptor {fd} of pid {pid} is no longer socket inode {inode}"
        ));
    }
    Ok(dup)
}

/// SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT of a socket.
pub fn keepalive_opts(fd: BorrowedFd<'_>) -> io::Result<(bool, u32, u32, u32)> {
    Ok((
        socket::getsockopt(&fd, sockopt::KeepAlive).map_err(io_err)?,
        socket::getsockopt(&fd, sockopt::TcpKeepIdle).map_err(io_err)?,
        socket::getsockopt(&fd, sockopt::TcpKeepInterval).map_err(io_err)?,
        socket::getsockopt(&fd, sockopt::TcpKeepCount).map_err(io_err)?,
    ))
}

/// Keepalive on: SO_KEEPALIVE, the interval and count, then TCP_KEEPIDLE last (with keepalive on,
/// setting TCP_KEEPIDLE re-arms the timer from the last activity: an idle flow is probed at once).
pub fn set_keepalive(fd: BorrowedFd<'_>, idle: u32, intvl: u32, cnt: u32) -> io::Result<()> {
    socket::setsockopt(&fd, sockopt::KeepAlive, &true).map_err(io_err)?;
    socket::setsockopt(&fd, sockopt::TcpKeepInterval, &intvl).map_err(io_err)?;
    socket::setsockopt(&fd, sockopt::TcpKeepCount, &cnt).map_err(io_err)?;
    socket::setsockopt(&fd, sockopt::TcpKeepIdle, &idle).map_err(io_err)
}

/// Whether a socket is TCP: a stream socket on which TCP options exist (unix stream sockets refuse
/// TCP_KEEPIDLE with EOPNOTSUPP).
pub fn is_tcp(fd: BorrowedFd<'_>) -> bool {
    socket::getsockopt(&fd, sockopt::SockType).ok() == Some(socket::SockType::Stream)
        && socket::getsockopt(&fd, sockopt::TcpKeepIdle).is_ok()
}

/// The TCP state of a socket (the first byte of struct tcp_info), e.g. 7 (CLOSE) for an aborted
/// one. nix 0.32 has no TCP_INFO option.
pub fn tcp_state(fd: BorrowedFd<'_>) -> Option<u8> {
    tcp_state_and_segs(fd).map(|(s, _)| s)
}

/// The TCP state and the segments received plus sent (`tcpi_segs_in` + `tcpi_segs_out`, at
/// offsets 140 and 136 of struct tcp_info): a socket never connected has sent and received none.
pub fn tcp_state_and_segs(fd: BorrowedFd<'_>) -> Option<(u8, u64)> {
    let mut buf = [0u8; 144];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || len < 1 {
        return None;
    }
    let at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
    let segs = if len >= 144 {
        u64::from(at(136)) + u64::from(at(140))
    } else {
        0
    };
    Some((buf[0], segs))
}

/// shutdown(2) both directions.
pub fn shutdown(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket::shutdown(fd.as_raw_fd(), socket::Shutdown::Both).map_err(io_err)
}

/// Restores the default SIGPIPE disposition (the CLI then ends quietly when its output pipe
/// closes, like other Unix tools; the agent keeps ignoring it and handles EPIPE).
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler, so no code runs in signal context.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}

/// An iterator limited to one process (Linux 5.19+): BPF_LINK_CREATE for the iterator program
/// `prog` with `bpf_iter_link_info.task.pid`, then BPF_ITER_CREATE; returns the file to read.
/// Written here because aya 0.16 attaches iterators without link info. Layouts from
/// include/uapi/linux/bpf.h (`union bpf_attr`'s `link_create` and `iter_create`, `union
/// bpf_iter_link_info`).
pub fn iter_for_pid(prog: BorrowedFd<'_>, pid: u32) -> io::Result<std::fs::File> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_ITER_CREATE: libc::c_long = 33;
    const BPF_TRACE_ITER: u32 = 28;
    /// `union bpf_iter_link_info`: 16 bytes (its cgroup member ends with a u64); `task` first.
    #[repr(C, align(8))]
    struct IterLinkInfo {
        tid: u32,
        pid: u32,
        pid_fd: u32,
        _rest: u32,
    }
    /// `link_create`: prog_fd, target_fd, attach_type, flags, then the aligned iter_info pointer
    /// and its length.
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        iter_info: u64,
        iter_info_len: u32,
        _rest: u32,
    }
    #[repr(C)]
    struct IterCreate {
        link_fd: u32,
        flags: u32,
    }
    const _: () = assert!(size_of::<IterLinkInfo>() == 16 && size_of::<LinkCreate>() == 32);
    let info = IterLinkInfo {
        tid: 0,
        pid,
        pid_fd: 0,
        _rest: 0,
    };
    let attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_ITER,
        flags: 0,
        iter_info: &raw const info as u64,
        iter_info_len: size_of::<IterLinkInfo>() as u32,
        _rest: 0,
    };
    // `info` outlives the call that reads it through `attr`.
    let link = bpf_fd(BPF_LINK_CREATE, &attr)?;
    let create = IterCreate {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    // The link stays open until the iterator's file is made.
    Ok(std::fs::File::from(bpf_fd(BPF_ITER_CREATE, &create)?))
}

/// bpf(2) for a command that returns a new descriptor, with `attr` as its `union bpf_attr`.
fn bpf_fd<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is live, initialised and of the size passed; the kernel only reads it and
    // what it points to, which the caller keeps alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Fixes glibc's thresholds for returning memory at 128 KiB (its defaults), unless the operator
/// set them (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`). By default glibc raises both
/// each time a large block is freed (up to 32 / 64 MiB), after which the free top of a thread's
/// arena is never given back, and `malloc_trim` does not trim the top of a thread's arena:
/// after two 20 s churn loops the agent stayed 3-5 MB above its size before (live heap: 0.7 MB,
/// heaptrack), and came back to it with fixed thresholds (`tests/hostile.rs`, and by hand:
/// 16.4 MB before, 16.6 MB 20 s after). Large buffers are then mapped and unmapped each time;
/// they are few (read batches, snapshots): event batches stay under the threshold
/// (`agent::workers::BATCH_EVENTS`). Call before any thread starts.
pub fn tune_heap() {
    let keep = |name: &str| std::env::var_os(name).is_some();
    // SAFETY: mallopt only sets the allocator's parameters; no thread allocates concurrently.
    unsafe {
        if !keep("MALLOC_MMAP_THRESHOLD_") {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
        if !keep("MALLOC_TRIM_THRESHOLD_") {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        }
    }
}

/// Gives freed heap pages back to the system (glibc keeps them otherwise: after a connection
/// storm the agent's RSS would stay at its peak).
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

/// Grants `gid` read+write (and, for a directory, search) on `path` through a POSIX ACL entry, so
/// that a second group (the admin group) can use the CLI socket besides its owning group.
pub fn grant_group(path: &Path, owner_group_perm: u16, gid: u32) -> io::Result<()> {
    // struct posix_acl_xattr_header { le32 version = 2 } and entries { le16 tag, le16 perm, le32 id }.
    const USER_OBJ: u16 = 0x01;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    let undefined = u32::MAX;
    let mut b = Vec::with_capacity(4 + 5 * 8);
    b.extend_from_slice(&2u32.to_le_bytes());
    for (tag, perm, id) in [
        (USER_OBJ, 7u16, undefined),
        (GROUP_OBJ, owner_group_perm, undefined),
        (GROUP, owner_group_perm, gid),
        (MASK, owner_group_perm, undefined),
        (OTHER, 0, undefined),
    ] {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&perm.to_le_bytes());
        b.extend_from_slice(&id.to_le_bytes());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: both C strings are NUL-terminated and live across the call; `b` is valid for len.
    let rc = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            b.as_ptr().cast(),
            b.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The filesystem of namespace files (include/uapi/linux/magic.h NSFS_MAGIC).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Whether `path` (not followed if a symlink) is a namespace file: a symlink is not.
pub fn is_nsfs(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_symlink())
        && nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 == NSFS_MAGIC)
}

/// Opens a file for setns: the fd of a namespace file. Opened without blocking (a FIFO planted
/// in /run/netns cannot stall the caller) and refused unless it is a namespace file (nsfs).
pub fn open_ns(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let fs = nix::sys::statfs::fstatfs(&f).map_err(io::Error::from)?;
    if fs.filesystem_type().0 != NSFS_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a namespace file (nsfs)", path.display()),
        ));
    }
    Ok(OwnedFd::from(f))
}

/// Puts a descriptor into non-blocking mode.
pub fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    // SAFETY: the caller owns `fd` for the duration of the call.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let fl = OFlag::from_bits_truncate(fcntl(b, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(b, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

/// Waits until `fd` is readable (or hung up) or `timeout` passes.
pub fn wait_readable(fd: std::os::fd::RawFd, timeout: std::time::Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    // SAFETY: the caller owns `fd` for the duration of the call.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(b, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::ZERO);
    let _ = poll(&mut fds, ms);
}

/// SIGKILL to every process of process group `pgid` (never 0 or 1: that would be the caller's
/// own group or init's).
pub fn kill_group(pgid: i32) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a process group of a child",
        ));
    }
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(io::Error::from)
}

/// The live (not zombie) processes of process group `pgid`, from /proc/PID/stat.
pub fn group_members(pgid: i32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: fields after the last ')'.
        let mut f = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace();
        let state = f.next();
        let pgrp = f.nth(1).and_then(|p| p.parse::<i32>().ok());
        if pgrp == Some(pgid) && state != Some("Z") && state != Some("X") {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}
