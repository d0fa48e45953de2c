//! Which files root may trust: the agent runs as root, so a file it reads for instructions (the
//! configuration, the learnt-paths state) or a program it runs (a service's `restart_command`) is
//! only as safe as the least trusted user who could have written it. As sshd's StrictModes: the
//! file and every directory above it must be owned by root (or the agent's own uid) and writable
//! by nobody else. A world-writable directory is allowed above only when it is root's and sticky
//! (`/tmp`): in such a directory nobody but root can rename or remove a root-owned entry, and every
//! entry on the path is checked to be root-owned.
//!
//! Reading is non-blocking and checked with fstat before a byte is read: a FIFO, a device or a
//! socket at a path the agent reads is refused by name instead of stalling the agent.
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Why a path cannot be trusted or opened, in words that name the path and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct Untrusted {
    pub path: PathBuf,
    pub problem: String,
}

fn untrusted(path: &Path, problem: impl Into<String>) -> Untrusted {
    Untrusted {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// What a file type is called in a message.
pub fn type_name(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symlink"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// The uids a trusted file may belong to: root and the agent's own.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn owner_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// One object on a trusted path: owned by root and writable by nobody else (a sticky root
/// directory may be world-writable: see the module's comment).
fn check_one(path: &Path, m: &Metadata, last: bool) -> Result<(), Untrusted> {
    let mode = m.mode() & 0o7777;
    if !trusted_owner(m.uid()) {
        return Err(untrusted(
            path,
            format!(
                "owned by {} (mode {mode:04o}); root runs or reads it, so it must belong to root: `chown root:root {}`",
                owner_name(m.uid()),
                path.display()
            ),
        ));
    }
    if m.file_type().is_symlink() {
        // A symlink's own mode means nothing; its target is checked on the resolved path.
        return Ok(());
    }
    let writable = mode & 0o022 != 0;
    let sticky_dir = m.is_dir() && mode & 0o1000 != 0 && m.uid() == 0;
    if writable && (last || !sticky_dir) {
        let who = if mode & 0o002 != 0 {
            "every user"
        } else {
            "its group"
        };
        return Err(untrusted(
            path,
            format!(
                "writable by {who} (mode {mode:04o}, gid {}); root runs or reads it, so nobody else may change it: `chmod go-w {}`",
                m.gid(),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Checks every component of `path` as written, from `/` down (lstat: a symlink is checked as
/// an entry of its directory, its target on the resolved path).
fn check_components(path: &Path) -> Result<(), Untrusted> {
    let mut cur = PathBuf::from("/");
    let parts: Vec<Component> = path.components().collect();
    let n = parts.len();
    for (i, c) in parts.iter().enumerate() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => cur.push(p),
            Component::CurDir => continue,
            Component::ParentDir => {
                return Err(untrusted(path, "contains `..`: give the path without it"));
            }
            Component::Prefix(_) => return Err(untrusted(path, "not a Unix path")),
        }
        let m = std::fs::symlink_metadata(&cur).map_err(|e| untrusted(&cur, e.to_string()))?;
        check_one(&cur, &m, i + 1 == n)?;
    }
    Ok(())
}

/// The file at `path` (followed through symlinks) and every directory above it, both as written
/// and as resolved, belong to root and are writable by nobody else. `path` must be absolute.
pub fn check_chain(path: &Path) -> Result<(), Untrusted> {
    if !path.is_absolute() {
        return Err(untrusted(path, "not an absolute path"));
    }
    check_components(path)?;
    let real = std::fs::canonicalize(path).map_err(|e| untrusted(path, e.to_string()))?;
    if real != path {
        check_components(&real)?;
    }
    Ok(())
}

/// A program root will execute: an existing regular file with an execute bit, on a trusted
/// chain. The message says what to fix.
pub fn check_executable(path: &Path) -> Result<(), Untrusted> {
    let m = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => untrusted(path, "does not exist: install it or correct the path"),
        _ => untrusted(path, e.to_string()),
    })?;
    if !m.is_file() {
        return Err(untrusted(path, format!("is {}, not a program", type_name(&m))));
    }
    if m.mode() & 0o111 == 0 {
        return Err(untrusted(path, "is not executable (no x bit)"));
    }
    check_chain(path)
}

/// What `read_regular` refuses.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("not found")]
    NotFound,
    /// Larger than the caller takes (`size`: what fstat said, or more when it grew meanwhile).
    #[error("is {size} bytes, more than the {max} this file may hold; it is not what holdfast wrote")]
    TooLarge { size: u64, max: u64 },
    #[error("{0}")]
    Refused(String),
}

/// Reads `path` as UTF-8 text without trusting what is there: opened non-blocking (a FIFO
/// cannot stall the open), without following a final symlink when `nofollow`, refused unless
/// fstat says it is a regular file, and never more than `max` bytes read (a file that grows
/// past `max` after fstat is refused too).
pub fn read_regular(path: &Path, max: u64, nofollow: bool) -> Result<String, OpenError> {
    use std::io::Read;
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => OpenError::NotFound,
            Some(libc::ELOOP) if nofollow => OpenError::Refused(
                "is a symlink: refusing to follow it (replace it with the file itself)".into(),
            ),
            _ => OpenError::Refused(e.to_string()),
        })?;
    let m = f.metadata().map_err(|e| OpenError::Refused(e.to_string()))?;
    if !m.is_file() {
        return Err(OpenError::Refused(format!(
            "is {}, not a regular file",
            type_name(&m)
        )));
    }
    if m.len() > max {
        return Err(OpenError::TooLarge { size: m.len(), max });
    }
    let mut text = String::new();
    f.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| OpenError::Refused(format!("{e} (expected UTF-8 text)")))?;
    if text.len() as u64 > max {
        return Err(OpenError::TooLarge {
            size: text.len() as u64,
            max,
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn base(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hf-trust-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn a_root_owned_file_under_sticky_tmp_is_trusted_and_a_writable_one_is_not() {
        let d = base("chain");
        let f = d.join("c.toml");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_chain(&f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_chain(&f).unwrap_err();
        assert!(
            e.problem.contains("writable by every user") && e.problem.contains("0666"),
            "{e}"
        );
        assert_eq!(e.path, f);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A group-writable directory above it: the directory is named, not the file.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_chain(&f).unwrap_err();
        assert_eq!(e.path, d, "{e}");
        assert!(e.problem.contains("writable by its group"), "{e}");
        // A sticky world-writable directory is fine above, never as the file itself.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_chain(&f).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A symlink is checked on both paths: to a writable file it is refused.
        let bad = d.join("bad");
        std::fs::write(&bad, "x").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o646)).unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&bad, &link).unwrap();
        let e = check_chain(&link).unwrap_err();
        assert_eq!(e.path, bad, "{e}");
        assert!(check_chain(Path::new("relative/x")).is_err());
        assert!(check_chain(&d.join("../x")).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn executables_must_exist_be_programs_and_be_trusted() {
        check_executable(Path::new("/bin/sh")).unwrap();
        let e = check_executable(Path::new("/nonexistent/restart")).unwrap_err();
        assert!(e.problem.contains("does not exist"), "{e}");
        let d = base("exec");
        let f = d.join("script");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_executable(&f).unwrap_err();
        assert!(e.problem.contains("not executable"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_executable(&f).unwrap();
        // Owned by another user: root would run what that user wrote.
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = check_executable(&f).unwrap_err();
            assert!(
                e.problem.contains("owned by uid 65534") && e.problem.contains("chown root:root"),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(&d);
        let e = check_executable(Path::new("/tmp")).unwrap_err();
        assert!(e.problem.contains("a directory"), "{e}");
    }

    #[test]
    fn special_files_symlinks_and_oversized_files_are_refused_without_blocking() {
        let d = base("open");
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let t0 = std::time::Instant::now();
        let e = read_regular(&fifo, 1024, false).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(2),
            "the open did not block"
        );
        let e = read_regular(Path::new("/dev/null"), 1024, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("character device"), "{e}");
        let e = read_regular(&d, 1024, false).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        let big = d.join("big");
        std::fs::write(&big, vec![b'a'; 2048]).unwrap();
        let e = read_regular(&big, 1024, false).unwrap_err().to_string();
        assert!(e.contains("2048 bytes"), "{e}");
        let link = d.join("link");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        let e = read_regular(&link, 4096, true).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        assert_eq!(read_regular(&link, 4096, false).unwrap().len(), 2048);
        assert!(matches!(
            read_regular(&d.join("none"), 1, true),
            Err(OpenError::NotFound)
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
