//! The CLI socket file: created only in a directory the agent owns (0750 owner:read-group, the
//! admin group through an ACL); refused in a directory others can write, through a symlink, or
//! over a live agent's socket.
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::kernel::sys;

/// Makes sure the socket's directory is the agent's own: created 0750 owner:read-group if
/// missing; refused if it is a symlink, owned by someone else, or writable by others.
fn secure_dir(dir: &Path, group: Option<u32>, admin: Option<u32>) -> anyhow::Result<()> {
    let me = sys::geteuid();
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
            if let Some(g) = group {
                sys_chown(dir, g)?;
            }
        }
        Err(e) => anyhow::bail!("cannot inspect the socket directory {}: {e}", dir.display()),
        Ok(m) if m.file_type().is_symlink() => anyhow::bail!(
            "the socket directory {} is a symlink: refusing to follow it (remove it, or set agent.socket elsewhere)",
            dir.display()
        ),
        Ok(m) if !m.is_dir() => anyhow::bail!("{} is not a directory", dir.display()),
        Ok(m) if m.uid() != me && m.uid() != 0 => anyhow::bail!(
            "the socket directory {} belongs to uid {}, not to the agent: anyone who owns it can replace the socket; use a directory of the agent's own (e.g. /run/holdfast)",
            dir.display(),
            m.uid()
        ),
        Ok(m) if m.mode() & 0o022 != 0 => anyhow::bail!(
            "the socket directory {} is writable by others (mode {:o}): anyone could put a fake agent there; use a directory of the agent's own (e.g. /run/holdfast) or chmod go-w it",
            dir.display(),
            m.mode() & 0o7777
        ),
        Ok(_) => {
            // Ours: shared with the read group only.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
            if let Some(g) = group {
                sys_chown(dir, g)?;
            } else {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            }
        }
    }
    if let Some(a) = admin {
        // Admin-only users must reach the socket too: search permission through an ACL entry.
        if let Err(e) = sys::grant_group(dir, 5, a) {
            tracing::warn!("cannot grant the admin group access to {}: {e}", dir.display());
        }
    }
    Ok(())
}

fn sys_chown(path: &Path, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, None, Some(gid))
        .map_err(|e| anyhow::anyhow!("chown {} to gid {gid}: {e}", path.display()))
}

/// Binds the CLI socket: refuses to steal one a live agent serves, to follow a symlink, or to
/// share a directory others can write; replaces a stale socket.
pub fn bind_socket(path: &Path, group: Option<u32>, admin: Option<u32>) -> anyhow::Result<UnixListener> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", path.display()))?;
    secure_dir(dir, group, admin)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => anyhow::bail!(
            "{} is a symlink: refusing to follow it; remove it and start again",
            path.display()
        ),
        Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => anyhow::bail!(
            "{} exists and is not a socket: remove it or set agent.socket elsewhere",
            path.display()
        ),
        Ok(_) => {
            if let Ok(s) = std::os::unix::net::UnixStream::connect(path) {
                let who = sys::peer_cred(s.as_fd()).map(|c| c.uid).unwrap_or(u32::MAX);
                anyhow::bail!(
                    "another holdfast agent (uid {who}) is already serving {}; stop it first or use --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .map_err(|e| anyhow::anyhow!("removing stale socket {}: {e}", path.display()))?;
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group {
        sys_chown(path, gid)?;
    }
    if let Some(a) = admin
        && let Err(e) = sys::grant_group(path, 6, a)
    {
        tracing::warn!("cannot grant the admin group access to {}: {e}", path.display());
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_world_writable_directory_and_a_symlinked_socket() {
        let base = std::env::temp_dir().join(format!("hf-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let e = bind_socket(&open.join("h.sock"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by others"), "{e}");
        let own = base.join("own");
        std::fs::create_dir(&own).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", own.join("h.sock")).unwrap();
        let e = bind_socket(&own.join("h.sock"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a symlink"), "{e}");
        std::fs::remove_file(own.join("h.sock")).unwrap();
        let fresh = base.join("fresh/sub");
        bind_socket(&fresh.join("h.sock"), None, None).unwrap();
        let m = std::fs::metadata(&fresh).unwrap();
        assert_eq!(m.mode() & 0o777, 0o750, "created 0750");
        let _ = std::fs::remove_dir_all(&base);
    }
}
