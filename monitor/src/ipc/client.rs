//! The CLI's side of the protocol: connect, check who answers, send one request, read the reply.
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{Request, request_line};
use crate::kernel::sys;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent at {path}: start it with `holdfast agent` (or `systemctl start holdfast`), or pass --socket PATH"
    )]
    NoAgent { path: String },
    #[error(
        "permission denied on {path}: only root and members of {who} may query the agent; ask an admin to run `usermod -aG <group> $USER` (then log in again)"
    )]
    Denied { path: String, who: String },
    #[error(
        "the process serving {path} runs as uid {uid}, not as root: refusing to believe it (something may be impersonating the agent); remove it, or pass --socket"
    )]
    Untrusted { path: String, uid: u32 },
    #[error("talking to the agent at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the agent refused the request: {0}")]
    Refused(String),
    #[error("unreadable reply from the agent: {0}")]
    BadReply(String),
}

impl ClientError {
    /// Exit code for the CLI: 3 when the agent is unreachable or untrusted, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NoAgent { .. }
            | ClientError::Denied { .. }
            | ClientError::Io { .. }
            | ClientError::Untrusted { .. } => 3,
            _ => 1,
        }
    }
}

/// Who may open the socket, in words: its group (and ACL groups), as far as this user can see.
fn who_may(socket: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let gid = std::fs::metadata(socket)
        .or_else(|_| std::fs::metadata(socket.parent().unwrap_or(Path::new("/"))))
        .map(|m| m.gid())
        .ok();
    match gid.and_then(|g| {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(g))
            .ok()
            .flatten()
    }) {
        Some(g) => format!("group `{}` (or the agent's admin group)", g.name),
        None => "the agent's read or admin group (agent.read_group, agent.admin_group)".into(),
    }
}

/// Connects to the agent, mapping the usual failures to what the operator should do, and checks
/// that the peer is root or this very user (SO_PEERCRED).
fn connect(socket: &Path) -> Result<(UnixStream, String), ClientError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NoAgent { path: path.clone() }
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Denied {
            path: path.clone(),
            who: who_may(socket),
        },
        _ => ClientError::Io {
            path: path.clone(),
            source: e,
        },
    })?;
    let cred = sys::peer_cred(stream.as_fd()).map_err(|source| ClientError::Io {
        path: path.clone(),
        source,
    })?;
    if cred.uid != 0 && cred.uid != sys::geteuid() {
        return Err(ClientError::Untrusted { path, uid: cred.uid });
    }
    Ok((stream, path))
}

#[derive(Deserialize)]
struct TypedReply<T> {
    ok: bool,
    data: Option<T>,
    error: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

/// Sends one request and decodes the reply's data as `T` (streamed from the socket).
pub fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> Result<T, ClientError> {
    let (stream, path) = connect(socket)?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    // A refusal may already be waiting and the agent gone: read it before reporting the write.
    let sent = (&stream).write_all(request_line(req).as_bytes());
    if let Err(e) = &sent
        && !matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    {
        return Err(io(sent.unwrap_err()));
    }
    let mut de = serde_json::Deserializer::from_reader(BufReader::new(&stream));
    let r = TypedReply::<T>::deserialize(&mut de).map_err(|e| {
        if let Err(w) = &sent {
            ClientError::BadReply(format!(
                "the agent closed the connection before the request was sent ({w})"
            ))
        } else if e.is_eof() {
            ClientError::BadReply("the agent closed the connection without replying".into())
        } else if e.is_io() {
            ClientError::BadReply(format!("reading the reply: {e}"))
        } else {
            ClientError::BadReply(e.to_string())
        }
    })?;
    if let Some(n) = &r.note {
        eprintln!("holdfast: note: {n}");
    }
    match (r.ok, r.data, r.error) {
        (true, Some(d), _) => Ok(d),
        (_, _, Some(e)) => Err(ClientError::Refused(e)),
        _ => Err(ClientError::BadReply("reply without data or error".into())),
    }
}

/// Streams `events --follow`: calls `each` with every notice until the agent goes away.
pub fn follow(socket: &Path, mut each: impl FnMut(crate::sinks::Notice)) -> Result<(), ClientError> {
    let (stream, path) = connect(socket)?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    (&stream)
        .write_all(request_line(&Request::Events { follow: true }).as_bytes())
        .map_err(io)?;
    for l in BufReader::new(&stream).lines() {
        let l = l.map_err(io)?;
        let r: TypedReply<crate::sinks::Notice> =
            serde_json::from_str(&l).map_err(|e| ClientError::BadReply(e.to_string()))?;
        match (r.ok, r.data, r.error) {
            (true, Some(d), _) => each(d),
            (_, _, Some(e)) => return Err(ClientError::Refused(e)),
            _ => {}
        }
    }
    Ok(())
}
