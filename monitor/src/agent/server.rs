//! The CLI socket: binding, peer-credential checks, and one task per connection.
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::Msg;
use crate::ipc::{self, Reply};
use crate::sys;

/// Who may talk to the agent.
#[derive(Clone, Debug)]
pub struct Access {
    pub agent_uid: u32,
    /// The read group's name and, if it exists on this host, its gid.
    pub group: (String, Option<u32>),
    /// The admin group (may change things: remedies, reload), if configured.
    pub admin: Option<(String, Option<u32>)>,
}

/// The gid of `name` from /etc/group.
pub fn group_gid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

fn supplementary_groups(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        })
        .unwrap_or_default()
}

fn in_group(cred: sys::PeerCred, gid: u32) -> bool {
    cred.gid == gid || supplementary_groups(cred.pid).contains(&gid)
}

impl Access {
    /// Root, the agent's own uid, or a member of the admin group.
    pub fn is_admin(&self, cred: sys::PeerCred) -> bool {
        cred.uid == 0
            || cred.uid == self.agent_uid
            || self
                .admin
                .as_ref()
                .and_then(|(_, g)| *g)
                .is_some_and(|g| in_group(cred, g))
    }

    /// Ok, or the refusal to send back.
    pub fn check(&self, cred: sys::PeerCred) -> Result<(), String> {
        if cred.uid == 0 || cred.uid == self.agent_uid {
            return Ok(());
        }
        let (name, gid) = &self.group;
        if let Some(gid) = gid {
            if in_group(cred, *gid) {
                return Ok(());
            }
        }
        if self.is_admin(cred) {
            return Ok(());
        }
        let fix = match gid {
            Some(_) => format!("ask an admin to run `usermod -aG {name} <user>`"),
            None => format!(
                "group `{name}` does not exist on this host: an admin can create it with `groupadd --system {name}` and add users to it"
            ),
        };
        Err(format!(
            "permission denied: uid {} is neither root nor in group `{name}`; {fix}",
            cred.uid
        ))
    }
}

/// Binds the CLI socket: refuses to steal one a live agent serves, replaces a stale one.
pub fn bind_socket(path: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another holdfast agent is already serving {}; stop it first or use --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group {
        sys::lchown(path, None, Some(gid))
            .with_context(|| format!("chown {} to gid {gid}", path.display()))?;
    }
    Ok(l)
}

pub async fn serve_conn(
    stream: UnixStream,
    tx: mpsc::Sender<Msg>,
    access: Access,
    notices: tokio::sync::broadcast::Sender<crate::sinks::Notice>,
) {
    use std::os::fd::AsFd;
    let cred = sys::peer_cred(stream.as_fd()).ok();
    let admin = cred.is_some_and(|c| access.is_admin(c));
    let verdict = sys::peer_cred(stream.as_fd())
        .map_err(|e| format!("cannot read peer credentials: {e}"))
        .and_then(|c| access.check(c));
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    if let Err(refusal) = verdict {
        // Read the request first so that the refusal is its reply (the client may still be writing).
        let mut limited = (&mut reader).take(ipc::MAX_LINE as u64);
        let _ = tokio::time::timeout(Duration::from_secs(2), limited.read_until(b'\n', &mut buf)).await;
        let _ = w.write_all(Reply::err(refusal).to_line().as_bytes()).await;
        return;
    }
    loop {
        buf.clear();
        let n = match (&mut reader)
            .take(ipc::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if buf.len() > ipc::MAX_LINE {
            let msg = format!("request line longer than {} bytes; closing", ipc::MAX_LINE);
            let _ = w.write_all(Reply::err(msg).to_line().as_bytes()).await;
            return;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let reply = match ipc::parse_request(line) {
            Err(r) => r,
            Ok(ipc::Request::Events { follow: true }) => {
                // Stream every notice as its own reply line until the client goes away.
                let mut rx = notices.subscribe();
                loop {
                    match rx.recv().await {
                        Ok(n) => {
                            if w.write_all(Reply::ok(&n).to_line().as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                            let msg = format!("{k} events were dropped: this reader is too slow");
                            if w.write_all(Reply::err(msg).to_line().as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            }
            Ok(req) => {
                let (otx, orx) = oneshot::channel();
                if tx
                    .send(Msg::Query {
                        req,
                        admin,
                        reply: otx,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                orx.await
                    .unwrap_or_else(|_| Reply::err("the agent is shutting down"))
            }
        };
        if w.write_all(reply.to_line().as_bytes()).await.is_err() {
            return;
        }
    }
}
