//! The CLI <-> agent protocol: one JSON object per line over a unix socket, request then reply.
//!
//! A malformed line gets an error reply and the connection stays usable. The socket is 0660
//! root:<read_group>; the agent also checks the peer's credentials (SO_PEERCRED).
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::flows::TableCounters;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the agent reads.
pub const MAX_LINE: usize = 64 * 1024;

/// Filters for `flows`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlowFilter {
    /// Include listening sockets.
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub pid: Option<u32>,
    /// Only flows with an eviction risk (near eviction, keepalive too slow, likely evicted).
    #[serde(default)]
    pub at_risk: bool,
    /// Only flows idle at least this long.
    #[serde(default)]
    pub idle_over_ms: Option<u64>,
    /// Only leaked sessions (half-open, or stuck in CLOSE_WAIT / FIN_WAIT2 / LAST_ACK).
    #[serde(default)]
    pub leaked: bool,
    /// Only flows of processes in this systemd unit.
    #[serde(default)]
    pub unit: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Flows {
        #[serde(default)]
        filter: FlowFilter,
    },
    /// Processes with findings (today: parents of zombies).
    Procs {
        #[serde(default)]
        zombies: bool,
    },
    Findings {
        /// Include resolved findings.
        #[serde(default)]
        all: bool,
        #[serde(default)]
        kind: Option<String>,
    },
    Explain {
        target: String,
    },
    Profiles,
    /// The session ledger per service.
    Ledger,
    /// Finding transitions and remedy outcomes; with `follow` the connection streams them.
    Events {
        #[serde(default)]
        follow: bool,
    },
    /// Re-read the configuration file (needs root or the admin group).
    Reload,
    /// Apply a remedy now (needs root or the agent's uid).
    Remedy {
        action: String,
        target: String,
        #[serde(default)]
        dry_run: bool,
    },
}

/// Wire envelope of a request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub req: Request,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub mode: String,
    pub mode_reason: String,
    pub kernel: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub netns_inode: u64,
    pub flows: usize,
    pub table: TableCounters,
    /// Kernel events decoded by the agent (eBPF mode).
    pub events: u64,
    pub events_lost: u64,
    pub events_undecodable: u64,
    pub program_errors: u64,
    pub lost_by_program: Vec<(String, u64)>,
    pub snapshots: u64,
    pub snapshot_interval_ms: u64,
    pub last_snapshot_ms: f64,
    pub last_snapshot_sockets: usize,
    pub owner_full_walks: u64,
    pub owner_targeted_walks: u64,
    pub proc_scans: u64,
    pub proc_scan_interval_ms: u64,
    pub last_proc_scan_ms: f64,
    pub processes: usize,
    pub zombies_tracked: usize,
    pub findings_active: usize,
    pub keepalive_at_connect: String,
    pub sockops_applied: u64,
    pub config: String,
    pub config_reloads: u64,
    pub last_reload_error: Option<String>,
    /// Findings are written to journald.
    pub journal: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok<T: Serialize>(data: &T) -> Self {
        match serde_json::to_value(data) {
            Ok(v) => Reply {
                ok: true,
                data: Some(v),
                error: None,
            },
            Err(e) => Reply::err(format!("internal: cannot encode reply: {e}")),
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Reply {
            ok: false,
            data: None,
            error: Some(msg.into()),
        }
    }
    pub fn to_line(&self) -> String {
        let mut s =
            serde_json::to_string(self).unwrap_or_else(|_| r#"{"ok":false,"error":"internal"}"#.into());
        s.push('\n');
        s
    }
}

/// Parses one request line into a request or the error reply to send back.
pub fn parse_request(line: &str) -> Result<Request, Reply> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
        Reply::err(format!(
            "malformed request (expected one JSON object per line): {e}"
        ))
    })?;
    let version = v.get("v").and_then(|x| x.as_u64());
    if version != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(Reply::err(format!(
            "unsupported protocol version {}: this agent speaks v{PROTOCOL_VERSION}; use a holdfast CLI of the same release",
            version.map_or("(missing)".to_string(), |v| v.to_string())
        )));
    }
    serde_json::from_value::<Envelope>(v).map(|e| e.req).map_err(|e| {
        Reply::err(format!(
            "bad request: {e} (ops: status, flows, procs, findings, explain, profiles, ledger, events, reload, remedy)"
        ))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent at {path}: start it with `holdfast agent` (or `systemctl start holdfast`), or pass --socket PATH"
    )]
    NoAgent { path: String },
    #[error(
        "permission denied on {path}: only root and members of the agent's read group (default `holdfast`) may query it; ask an admin to run `usermod -aG holdfast $USER`"
    )]
    Denied { path: String },
    #[error("talking to the agent at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the agent refused the request: {0}")]
    Refused(String),
    #[error("unreadable reply from the agent: {0}")]
    BadReply(String),
}

impl ClientError {
    /// Exit code for the CLI: 3 when the agent is unreachable, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::NoAgent { .. } | ClientError::Denied { .. } | ClientError::Io { .. } => 3,
            _ => 1,
        }
    }
}

/// Connects to the agent, mapping the usual failures to what the operator should do.
fn connect(socket: &Path) -> Result<(UnixStream, String), ClientError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NoAgent { path: path.clone() }
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Denied { path: path.clone() },
        _ => ClientError::Io {
            path: path.clone(),
            source: e,
        },
    })?;
    Ok((stream, path))
}

/// Streams `events --follow`: calls `each` with every notice line until the agent goes away.
pub fn follow(socket: &Path, mut each: impl FnMut(serde_json::Value)) -> Result<(), ClientError> {
    let (stream, path) = connect(socket)?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let mut line = serde_json::to_string(&Envelope {
        v: PROTOCOL_VERSION,
        req: Request::Events { follow: true },
    })
    .map_err(|e| ClientError::BadReply(e.to_string()))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    for l in BufReader::new(&stream).lines() {
        let l = l.map_err(io)?;
        let r: Reply = serde_json::from_str(&l).map_err(|e| ClientError::BadReply(e.to_string()))?;
        match (r.ok, r.data, r.error) {
            (true, Some(d), _) => each(d),
            (_, _, Some(e)) => return Err(ClientError::Refused(e)),
            _ => {}
        }
    }
    Ok(())
}

/// Sends one request and returns the reply's data.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let (stream, path) = connect(socket)?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_string(&Envelope {
        v: PROTOCOL_VERSION,
        req: req.clone(),
    })
    .map_err(|e| ClientError::BadReply(e.to_string()))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    if reply.is_empty() {
        return Err(ClientError::BadReply(
            "the agent closed the connection without replying".into(),
        ));
    }
    let r: Reply = serde_json::from_str(&reply).map_err(|e| ClientError::BadReply(e.to_string()))?;
    match (r.ok, r.data, r.error) {
        (true, Some(d), _) => Ok(d),
        (_, _, Some(e)) => Err(ClientError::Refused(e)),
        _ => Err(ClientError::BadReply("reply without data or error".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Status,
            Request::Flows {
                filter: FlowFilter {
                    all: true,
                    state: Some("estab".into()),
                    port: Some(22),
                    pid: Some(7),
                    at_risk: true,
                    idle_over_ms: Some(300_000),
                    leaked: true,
                    unit: Some("ssh.service".into()),
                },
            },
            Request::Explain {
                target: "cookie:5".into(),
            },
            Request::Remedy {
                action: "keepalive".into(),
                target: "10.0.0.1:5000".into(),
                dry_run: true,
            },
            Request::Profiles,
            Request::Events { follow: true },
            Request::Reload,
        ] {
            let line = serde_json::to_string(&Envelope {
                v: PROTOCOL_VERSION,
                req: req.clone(),
            })
            .unwrap();
            assert_eq!(parse_request(&line).unwrap(), req);
        }
        assert_eq!(
            parse_request(r#"{"v":1,"op":"flows"}"#).unwrap(),
            Request::Flows {
                filter: FlowFilter::default()
            }
        );
    }

    #[test]
    fn bad_lines_get_error_replies() {
        let e = parse_request("not json").unwrap_err();
        assert!(!e.ok && e.error.unwrap().contains("malformed"));
        let e = parse_request(r#"{"op":"status"}"#).unwrap_err();
        assert!(e.error.unwrap().contains("version (missing)"));
        let e = parse_request(r#"{"v":1,"op":"reboot"}"#).unwrap_err();
        assert!(e.error.unwrap().contains("ops: status, flows, procs"));
        let e = parse_request(r#"{"v":1,"op":"flows","filter":{"port":"x"}}"#).unwrap_err();
        assert!(e.error.unwrap().contains("bad request"));
    }

    #[test]
    fn replies_are_single_lines() {
        let r = Reply::ok(&vec![1, 2]).to_line();
        assert_eq!(r.matches('\n').count(), 1);
        let back: Reply = serde_json::from_str(&r).unwrap();
        assert!(back.ok);
        assert_eq!(Reply::err("x\ny").to_line().matches('\n').count(), 1);
    }

    #[test]
    fn missing_socket_is_reported_as_no_agent() {
        let e = call(Path::new("/nonexistent/holdfast.sock"), &Request::Status).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert!(
            e.to_string()
                .starts_with("no agent at /nonexistent/holdfast.sock: start it with")
        );
    }
}
