//! Network namespaces: entering one for a moment from the calling thread (setns there and back),
//! which is how sock_diag, rtnetlink and the tcp iterator reach a namespace other than the
//! agent's (each binds to the namespace its socket or iterator was created in).
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::OnceLock;

pub mod discover;

use super::sys;
use crate::model::eviction::{KaValues, NetFacts};
use crate::model::observe::NetnsId;

/// The agent's own network namespace, opened once at start (it never goes away).
struct Own {
    fd: OwnedFd,
    id: NetnsId,
}

static OWN: OnceLock<Option<Own>> = OnceLock::new();

fn own() -> Option<&'static Own> {
    OWN.get_or_init(|| {
        let fd = sys::open_ns(std::path::Path::new("/proc/self/ns/net")).ok()?;
        let id = std::fs::metadata("/proc/self/ns/net").ok()?.ino() as NetnsId;
        Some(Own { fd, id })
    })
    .as_ref()
}

/// The agent's own namespace (0 if /proc cannot tell).
pub fn own_id() -> NetnsId {
    own().map_or(0, |o| o.id)
}

/// A namespace the agent can enter: its id and a file that names it (a process's
/// /proc/PID/ns/net or an `ip netns` bind mount). Holding a handle keeps no fd open, so it never
/// keeps a dead namespace alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsHandle {
    pub id: NetnsId,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("namespace net:[{id}] is gone ({path}: {source})")]
    Gone {
        id: NetnsId,
        path: String,
        source: io::Error,
    },
    #[error("{path} now names another namespace (net:[{found}], not net:[{id}])")]
    Replaced {
        id: NetnsId,
        found: NetnsId,
        path: String,
    },
    #[error("entering net:[{id}] failed: {source} (setns needs CAP_SYS_ADMIN)")]
    Enter { id: NetnsId, source: io::Error },
    #[error("returning to the agent's namespace failed: {0}; this thread can no longer be trusted")]
    Return(io::Error),
}

impl NsHandle {
    /// Whether this is the agent's own namespace (entering it is a no-op).
    pub fn is_own(&self) -> bool {
        self.id == own_id()
    }

    /// Runs `f` with the calling thread inside this namespace, then returns to the agent's.
    pub fn within<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        if self.is_own() {
            return Ok(f());
        }
        let gone = |source| NetnsError::Gone {
            id: self.id,
            path: self.path.display().to_string(),
            source,
        };
        let target = sys::open_ns(&self.path).map_err(gone)?;
        let found = std::fs::File::from(target.try_clone().map_err(gone)?)
            .metadata()
            .map_err(gone)?
            .ino() as NetnsId;
        if found != self.id {
            return Err(NetnsError::Replaced {
                id: self.id,
                found,
                path: self.path.display().to_string(),
            });
        }
        let own = own().ok_or_else(|| NetnsError::Return(io::Error::other("own namespace unknown")))?;
        sys::setns_net(target.as_fd()).map_err(|source| NetnsError::Enter { id: self.id, source })?;
        let out = f();
        sys::setns_net(own.fd.as_fd()).map_err(NetnsError::Return)?;
        Ok(out)
    }
}

/// The inode of a namespace file, if it can be read.
pub fn inode_of(path: &std::path::Path) -> Option<NetnsId> {
    std::fs::metadata(path).ok().map(|m| m.ino() as NetnsId)
}

/// A namespace in words: `host` for the init namespace (PID 1's), its `ip netns` name when it has
/// one (/run/netns/NAME), else `net:[inode]`.
pub fn name_of(id: NetnsId) -> String {
    if inode_of(std::path::Path::new("/proc/1/ns/net")) == Some(id) {
        return "host".into();
    }
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            if inode_of(&e.path()) == Some(id) {
                return e.file_name().to_string_lossy().into_owned();
            }
        }
    }
    format!("net:[{id}]")
}

/// TIME_WAIT sockets in the calling thread's network namespace (`tw` of its sockstat). Snapshots
/// leave TIME_WAIT sockets out; this is how many there are.
pub fn time_wait_count() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/sockstat").ok()?;
    let tcp = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let mut it = tcp.split_whitespace();
    while let Some(k) = it.next() {
        let v = it.next()?;
        if k == "tw" {
            return v.parse().ok();
        }
    }
    None
}

/// The sysctls of the calling thread's network namespace that forecasts depend on (/proc/sys/net
/// shows the namespace of the reader).
pub fn read_facts() -> NetFacts {
    let read = |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let d = NetFacts::default();
    let ka = |name: &str, default: u32| {
        read(&format!("/proc/sys/net/ipv4/tcp_keepalive_{name}"))
            .map_or(default, |v| v.min(u64::from(u32::MAX)) as u32)
    };
    // Conntrack counts only where it is tracking connections in this namespace.
    let tracking = read("/proc/sys/net/netfilter/nf_conntrack_count").is_some_and(|n| n > 0);
    NetFacts {
        keepalive: KaValues {
            idle_s: ka("time", d.keepalive.idle_s),
            intvl_s: ka("intvl", d.keepalive.intvl_s),
            cnt: ka("probes", d.keepalive.cnt),
        },
        conntrack_s: tracking
            .then(|| read("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"))
            .flatten(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_namespaces_keepalive_sysctls() {
        let f = read_facts();
        let want: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_time")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(f.keepalive.idle_s, want);
    }

    #[test]
    fn counts_time_wait_sockets_from_sockstat() {
        // A connection closed by this side first leaves one TIME_WAIT socket behind.
        let before = time_wait_count().expect("sockstat");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        drop(c);
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(s);
        let t0 = std::time::Instant::now();
        while time_wait_count().unwrap() <= before && t0.elapsed().as_secs() < 2 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(time_wait_count().unwrap() > before);
    }

    #[test]
    fn own_namespace_is_entered_without_setns() {
        let h = NsHandle {
            id: own_id(),
            path: "/proc/self/ns/net".into(),
        };
        assert_ne!(h.id, 0);
        assert!(h.is_own());
        assert_eq!(h.within(|| 5).unwrap(), 5);
    }

    #[test]
    fn a_path_naming_another_namespace_is_refused() {
        // PID 1's namespace file checked against a made-up id: never entered.
        let h = NsHandle {
            id: 1,
            path: "/proc/1/ns/net".into(),
        };
        let e = h.within(|| ()).unwrap_err().to_string();
        assert!(
            e.contains("now names another namespace") || e.contains("is gone"),
            "{e}"
        );
        let gone = NsHandle {
            id: 2,
            path: "/nonexistent/ns".into(),
        };
        assert!(matches!(gone.within(|| ()), Err(NetnsError::Gone { .. })));
    }
}
