//! Feature probes at start: what this kernel and these privileges allow, asked of the kernel
//! itself (never guessed from a version number). `holdfast status` shows them; mode selection
//! and the remedies use them.
use std::os::fd::AsFd;

use crate::model::health::Feature;

fn feature(name: &str, r: Result<String, String>) -> Feature {
    match r {
        Ok(detail) => Feature {
            name: name.into(),
            available: true,
            detail,
        },
        Err(detail) => Feature {
            name: name.into(),
            available: false,
            detail,
        },
    }
}

/// SOCK_DESTROY for a socket that cannot exist: ENOENT means the kernel supports it (and we may
/// use it); EOPNOTSUPP means CONFIG_INET_DIAG_DESTROY is missing; EPERM means no CAP_NET_ADMIN.
pub fn sock_destroy() -> Feature {
    let r = super::sockdiag::socket()
        .map_err(|e| e.to_string())
        .and_then(|s| {
            let any: std::net::SocketAddr = "127.0.0.1:1".parse().expect("literal");
            match super::sockdiag::destroy_on(&s, any, any, 1, u64::MAX - 7) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok("supported".into()),
                Ok(()) => Ok("supported".into()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    Err("this kernel lacks CONFIG_INET_DIAG_DESTROY: the close remedy falls back to shutdown through a pidfd".into())
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    Err("EPERM: the close remedy needs CAP_NET_ADMIN".into())
                }
                Err(e) => Err(format!("{e}")),
            }
        });
    feature("sock_destroy", r)
}

/// pidfd_getfd on one of our own descriptors: what the keepalive remedy of poll mode (and of
/// other namespaces) needs, with CAP_SYS_PTRACE over the target.
pub fn pidfd_getfd() -> Feature {
    let r = (|| -> Result<String, String> {
        let pidfd = super::sys::pidfd_open(std::process::id()).map_err(|e| format!("pidfd_open: {e}"))?;
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&probe);
        let dup = pidfd.getfd(fd).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSYS) => "pidfd_getfd is missing (Linux < 5.6)".to_string(),
            Some(libc::EPERM) => "EPERM: needs CAP_SYS_PTRACE".to_string(),
            _ => e.to_string(),
        })?;
        drop(dup);
        Ok("supported".into())
    })();
    feature("pidfd_getfd", r)
}

/// setns into our own network namespace: allowed exactly when entering others is (CAP_SYS_ADMIN).
pub fn setns() -> Feature {
    let r = super::sys::open_ns(std::path::Path::new("/proc/self/ns/net"))
        .map_err(|e| e.to_string())
        .and_then(|fd| {
            super::sys::setns_net(fd.as_fd()).map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM) => {
                    "EPERM: reading other network namespaces needs CAP_SYS_ADMIN".to_string()
                }
                _ => e.to_string(),
            })
        })
        .map(|()| "other network namespaces can be read".to_string());
    feature("setns", r)
}

/// sock_diag itself: poll mode's source.
pub fn sock_diag() -> Feature {
    let r = super::sockdiag::dump(0)
        .map(|s| format!("{} sockets in this namespace", s.socks.len()))
        .map_err(|e| e.to_string());
    feature("sock_diag", r)
}

/// The probes that need no eBPF.
pub fn host() -> Vec<Feature> {
    vec![sock_diag(), sock_destroy(), pidfd_getfd(), setns()]
}
