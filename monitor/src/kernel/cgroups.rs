//! cgroup v2: where it is mounted (discovered from /proc/self/mountinfo, never assumed) and
//! configured paths under it.
use std::path::{Path, PathBuf};

/// The absolute directory of a configured cgroup path (`system.slice/ssh.service`).
pub fn resolve(mount: &Path, cgroup: &str) -> PathBuf {
    mount.join(cgroup.trim_start_matches('/'))
}

/// Discovers the cgroup2 mount on this host.
pub fn mount() -> Option<PathBuf> {
    procfs::process::Process::myself()
        .ok()?
        .mountinfo()
        .ok()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths_under_the_real_mount() {
        assert_eq!(
            resolve(Path::new("/sys/fs/cgroup"), "/app.slice/x"),
            PathBuf::from("/sys/fs/cgroup/app.slice/x")
        );
        // This machine has cgroup v2 (DESIGN: mounted at /sys/fs/cgroup/unified here).
        let m = mount().expect("a cgroup2 mount");
        assert!(m.join("cgroup.procs").exists(), "{}", m.display());
    }
}
