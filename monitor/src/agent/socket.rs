//! The CLI socket file, in a directory that is holdfast's own: created by the agent itself
//! (exclusively, 0750 owner:read-group, the admin group through an ACL), or the runtime directory
//! systemd made for this very service (`$RUNTIME_DIRECTORY`), or an existing one that is already
//! exactly what holdfast makes. Any other directory is never changed: the agent refuses it with
//! the reason (a socket set in /run, /root or /etc must not change who can read them). Refused
//! too: a directory others can write or that hangs below one, a symlink, and a live agent's socket.
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::config::trust;
use crate::kernel::sys;

/// The mode of the directory holdfast makes.
const DIR_MODE: u32 = 0o750;

/// Directories systemd created for this service (RuntimeDirectory=), which it hands over in
/// `$RUNTIME_DIRECTORY` (colon-separated). Only whoever starts the agent sets it.
fn systemd_runtime_dirs() -> Vec<PathBuf> {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default()
}

/// Creates `dir` and any missing directory above it, each exclusively (mkdir fails on anything
/// already there, so nothing existing is adopted); the deepest existing ancestor must be trusted
/// (root's, writable by nobody else, or a sticky root directory such as /tmp).
fn create_own(dir: &Path) -> anyhow::Result<()> {
    let mut missing = vec![dir.to_path_buf()];
    let mut up = dir.parent();
    while let Some(p) = up {
        match std::fs::symlink_metadata(p) {
            Ok(_) => break,
            Err(_) => missing.push(p.to_path_buf()),
        }
        up = p.parent();
    }
    if let Some(existing) = up {
        trust::check_chain(existing)
            .map_err(|u| anyhow::anyhow!("cannot create the socket directory {} below {u}", dir.display()))?;
    }
    for d in missing.iter().rev() {
        std::fs::DirBuilder::new()
            .mode(if d == dir { DIR_MODE } else { 0o755 })
            .create(d)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", d.display()))?;
    }
    // The umask may have taken bits away: say exactly what it is.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
    Ok(())
}

/// Makes sure the socket's directory is the agent's own (see the module's comment): created if
/// missing, accepted if it is already what holdfast makes or systemd's runtime directory for the
/// service, refused otherwise without a change.
fn secure_dir(dir: &Path, group: Option<u32>, admin: Option<u32>) -> anyhow::Result<()> {
    secure_dir_with(dir, group, admin, &systemd_runtime_dirs())
}

fn secure_dir_with(
    dir: &Path,
    group: Option<u32>,
    admin: Option<u32>,
    runtime_dirs: &[PathBuf],
) -> anyhow::Result<()> {
    let me = sys::geteuid();
    let want_gid = group.unwrap_or_else(|| nix::unistd::getegid().as_raw());
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_own(dir)?;
            sys_chown(dir, want_gid)?;
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
            "the socket directory {} is writable by others (mode {:o}): anyone could put a fake agent there; use a directory of the agent's own (e.g. /run/holdfast, which holdfast creates)",
            dir.display(),
            m.mode() & 0o7777
        ),
        Ok(m) => {
            if let Some(parent) = dir.parent() {
                trust::check_chain(parent)
                    .map_err(|u| anyhow::anyhow!("the socket directory {} hangs below {u}", dir.display()))?;
            }
            let exact = m.uid() == me && m.gid() == want_gid && m.mode() & 0o7777 == DIR_MODE;
            let from_systemd = runtime_dirs.iter().any(|d| d == dir);
            if from_systemd && !exact {
                // RuntimeDirectory= made it for this service alone: ours to finish.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
                sys_chown(dir, want_gid)?;
            } else if !exact {
                anyhow::bail!(
                    "the socket directory {} exists and is not one holdfast made (uid {}, gid {}, mode {:04o}; holdfast makes uid {me}, gid {want_gid}, mode {DIR_MODE:04o}): holdfast changes only a directory it created itself. Set agent.socket (or --socket) to a path in a directory that does not exist yet, e.g. /run/holdfast/holdfast.sock, and holdfast creates it; or make this one exactly that yourself",
                    dir.display(),
                    m.uid(),
                    m.gid(),
                    m.mode() & 0o7777
                );
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
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => anyhow::bail!(
            "{} is a symlink: refusing to follow it; remove it and start again",
            path.display()
        ),
        Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => anyhow::bail!(
            "{} exists and is not a socket: remove it or set agent.socket elsewhere",
            path.display()
        ),
        _ => {}
    }
    secure_dir(dir, group, admin)?;
    if std::fs::symlink_metadata(path).is_ok() {
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

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn refuses_a_world_writable_directory_and_a_symlinked_socket() {
        let base = std::env::temp_dir().join(format!("hf-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
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
        assert_eq!(mode_of(&open), 0o777, "left as it was");
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
        let l = bind_socket(&fresh.join("h.sock"), None, None).unwrap();
        assert_eq!(mode_of(&fresh), 0o750, "created 0750");
        assert_eq!(
            mode_of(&base.join("fresh")),
            0o755,
            "the directory above it, created too"
        );
        drop(l);
        // Again at the same place: what holdfast made is accepted as it is.
        bind_socket(&fresh.join("h.sock"), None, None).unwrap();
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_directory_holdfast_did_not_make_is_never_changed() {
        let base = std::env::temp_dir().join(format!("hf-sockdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        // As /run would be: 0755 with other files in it.
        let shared = base.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = bind_socket(&shared.join("x.sock"), Some(12345), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not one holdfast made") && e.contains("0755"), "{e}");
        assert_eq!(mode_of(&shared), 0o755);
        assert_eq!(
            std::fs::metadata(&shared).unwrap().gid(),
            nix::unistd::getegid().as_raw()
        );
        // As /root would be: 0700 with a secret in it.
        let private = base.join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(bind_socket(&private.join("hf.sock"), None, None).is_err());
        assert_eq!(mode_of(&private), 0o700);
        // A file where the socket goes: refused before the directory is looked at.
        std::fs::write(shared.join("passwd"), "x").unwrap();
        let e = bind_socket(&shared.join("passwd"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(mode_of(&shared), 0o755);
        // The runtime directory systemd made for the service is finished by the agent.
        let rd = base.join("rundir");
        std::fs::create_dir(&rd).unwrap();
        std::fs::set_permissions(&rd, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(secure_dir_with(&rd, None, None, &[]).is_err());
        secure_dir_with(&rd, None, None, std::slice::from_ref(&rd)).unwrap();
        assert_eq!(mode_of(&rd), 0o750);
        // Below a directory others can write, nothing is created.
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_socket(&open.join("a/h.sock"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by every user"), "{e}");
        assert!(!open.join("a").exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
