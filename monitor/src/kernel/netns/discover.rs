//! Finding every network namespace on the host: `ip netns` bind mounts (/run/netns), docker's
//! (/run/docker/netns), and every namespace a process lives in (/proc/*/ns/net); naming each in
//! words (`ip netns` name, container, pod, else `net:[inode]`). No descriptor is held between
//! calls, so a namespace that ends is never kept alive by the agent.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{NsHandle, inode_of};
use crate::model::observe::NetnsId;

/// A namespace found on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub handle: NsHandle,
    pub name: String,
}

/// Discovery with a memory: each namespace's name is worked out once, and each process's
/// namespace is read once (a process rarely changes namespace; all are read again every
/// `REREAD_PIDS`), so a discovery on a host with 10k processes is one /proc listing.
#[derive(Default)]
pub struct Discovery {
    names: HashMap<NetnsId, String>,
    pids: HashMap<u32, NetnsId>,
    reread: Option<std::time::Instant>,
}

/// How often every process's namespace is read again (one that moved with setns/unshare).
const REREAD_PIDS: std::time::Duration = std::time::Duration::from_secs(30);

/// The container id in a cgroup path: docker-<id>.scope, cri-containerd-<id>.scope,
/// crio-<id>.scope, libpod-<id>.scope, or a 64-hex-digit component (cgroupfs drivers).
fn container_id(cgroup: &str) -> Option<String> {
    cgroup.split('/').rev().find_map(|c| {
        let c = c.strip_suffix(".scope").unwrap_or(c);
        let id = ["docker-", "cri-containerd-", "crio-", "libpod-"]
            .iter()
            .find_map(|p| c.strip_prefix(p))
            .unwrap_or(c);
        (id.len() == 64 && id.chars().all(|x| x.is_ascii_hexdigit())).then(|| id[..12].to_string())
    })
}

/// The Kubernetes pod uid in a cgroup path (`.../kubepods-burstable-pod<uid>.slice/...` or
/// `.../kubepods/besteffort/pod<uid>/...`).
fn pod_uid(cgroup: &str) -> Option<String> {
    cgroup.split('/').find_map(|c| {
        let c = c.strip_suffix(".slice").unwrap_or(c);
        let uid = c.rsplit_once("pod").map(|(_, u)| u)?;
        let uid = uid.replace('_', "-");
        (uid.len() == 36 && uid.chars().all(|x| x.is_ascii_hexdigit() || x == '-')).then_some(uid)
    })
}

/// The name of a namespace some process `pid` lives in, from its cgroup: a pod, a container.
fn name_from_pid(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    if let Some(uid) = pod_uid(path) {
        return Some(format!("pod:{uid}"));
    }
    container_id(path).map(|id| format!("container:{id}"))
}

/// docker's container names by sandbox (its netns file name), from the runtime's state on disk.
fn docker_names() -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/var/lib/docker/containers") else {
        return out;
    };
    for e in dir.flatten() {
        // docker's own state: non-blocking, regular files only, at most 4 MiB each.
        let Ok(text) = crate::config::trust::read_regular(&e.path().join("config.v2.json"), 4 << 20, true)
        else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let (Some(key), Some(name)) = (v["NetworkSettings"]["SandboxKey"].as_str(), v["Name"].as_str())
        else {
            continue;
        };
        if let Some(sandbox) = Path::new(key).file_name() {
            out.insert(
                sandbox.to_string_lossy().into_owned(),
                name.trim_start_matches('/').to_string(),
            );
        }
    }
    out
}

/// Bind mounts in a directory: (inode, path, file name).
fn mounts(dir: &str) -> Vec<(NetnsId, PathBuf, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let path = e.path();
            // Only namespace files (a bind mount of nsfs): a file, FIFO or symlink someone put
            // here is passed over (statfs neither opens nor follows into a FIFO).
            if !crate::kernel::sys::is_nsfs(&path) {
                return None;
            }
            Some((
                inode_of(&path)?,
                path,
                e.file_name().to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

impl Discovery {
    /// Every namespace on the host now, the agent's own included.
    pub fn run(&mut self, own: NetnsId) -> Vec<Found> {
        let mut found: HashMap<NetnsId, Found> = HashMap::new();
        fn add(
            found: &mut HashMap<NetnsId, Found>,
            names: &mut HashMap<NetnsId, String>,
            id: NetnsId,
            path: PathBuf,
            name: Option<String>,
        ) {
            found.entry(id).or_insert_with(|| {
                if let Some(n) = name {
                    names.insert(id, n);
                }
                Found {
                    handle: NsHandle { id, path },
                    name: String::new(),
                }
            });
        }
        for (id, path, name) in mounts("/run/netns") {
            add(&mut found, &mut self.names, id, path, Some(name));
        }
        let docker = mounts("/run/docker/netns");
        if !docker.is_empty() {
            let names = docker_names();
            for (id, path, sandbox) in docker {
                let name = names.get(&sandbox).map_or_else(
                    || format!("docker:{}", &sandbox[..sandbox.len().min(12)]),
                    |n| format!("docker:{n}"),
                );
                add(&mut found, &mut self.names, id, path, Some(name));
            }
        }
        let reread = self.reread.is_none_or(|t| t.elapsed() >= REREAD_PIDS);
        if reread {
            self.reread = Some(std::time::Instant::now());
        }
        let mut alive: HashMap<u32, NetnsId> = HashMap::with_capacity(self.pids.len());
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
                let known = if reread {
                    None
                } else {
                    self.pids.get(&pid).copied()
                };
                let Some(id) = known.or_else(|| inode_of(&path)) else {
                    continue;
                };
                alive.insert(pid, id);
                if found.contains_key(&id) {
                    continue;
                }
                let name = (!self.names.contains_key(&id) && id != own)
                    .then(|| name_from_pid(pid))
                    .flatten();
                add(&mut found, &mut self.names, id, path, name);
            }
        }
        self.pids = alive;
        if !found.contains_key(&own) {
            add(&mut found, &mut self.names, own, "/proc/self/ns/net".into(), None);
        }
        self.names.retain(|id, _| found.contains_key(id));
        let mut out: Vec<Found> = found
            .into_values()
            .map(|mut f| {
                f.name = self.names.get(&f.handle.id).cloned().unwrap_or_else(|| {
                    if f.handle.id == own {
                        super::name_of(own)
                    } else {
                        format!("net:[{}]", f.handle.id)
                    }
                });
                f
            })
            .collect();
        out.sort_by_key(|f| f.handle.id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_and_pod_ids_from_cgroup_paths() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            container_id(&format!("/system.slice/docker-{id}.scope")).as_deref(),
            Some("0123456789ab")
        );
        assert_eq!(
            container_id(&format!("/kubepods.slice/x/cri-containerd-{id}.scope")).as_deref(),
            Some("0123456789ab")
        );
        assert_eq!(
            container_id(&format!("/docker/{id}")).as_deref(),
            Some("0123456789ab")
        );
        assert_eq!(container_id("/system.slice/ssh.service"), None);
        assert_eq!(
            pod_uid("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice/cri-containerd-x.scope")
                .as_deref(),
            Some("1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901")
        );
        assert_eq!(pod_uid("/system.slice"), None);
    }

    #[test]
    fn names_match_whole_after_a_kind_or_by_inode() {
        use crate::model::observe::netns_matches as matches;
        assert!(matches("blue", 5, "blue"));
        assert!(matches("docker:web", 5, "web"));
        assert!(matches("docker:web", 5, "docker:web"));
        assert!(matches("net:[5]", 5, "net:[5]"));
        assert!(matches("blue", 5, "5"));
        assert!(!matches("blue", 5, "red"));
    }

    #[test]
    fn finds_this_processs_namespace() {
        let own = super::super::own_id();
        let found = Discovery::default().run(own);
        assert!(found.iter().any(|f| f.handle.id == own), "{found:?}");
    }
}
