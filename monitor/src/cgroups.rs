//! cgroup v2: where it is mounted (discovered, never assumed) and configured paths under it.
use std::path::{Path, PathBuf};

/// The cgroup2 mount point from the text of /proc/self/mountinfo.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The absolute directory of a configured cgroup path (`system.slice/ssh.service`).
pub fn resolve(mount: &Path, cgroup: &str) -> PathBuf {
    mount.join(cgroup.trim_start_matches('/'))
}

/// Discovers the mount on this host.
pub fn mount() -> Option<PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let mi = "25 30 0:22 / /sys/fs/cgroup/cpu rw,relatime shared:8 - cgroup cgroup rw,cpu\n\
                  35 30 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(mi), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        assert_eq!(
            resolve(Path::new("/sys/fs/cgroup"), "/app.slice/x"),
            PathBuf::from("/sys/fs/cgroup/app.slice/x")
        );
    }
}
