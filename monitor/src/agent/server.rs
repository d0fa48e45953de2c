//! The CLI socket: created only in a directory the agent owns, shared with the read group (and
//! the admin group through an ACL); peer credentials checked on every connection; what one
//! client can cost is bounded (connections, idle and slow-reader timeouts, replies streamed in
//! chunks); the socket file is watched and recreated if it disappears.
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::Msg;
use super::socket::bind_socket;
use crate::ipc::{self, FlowFilter, Reply, Request};
use crate::kernel::sys;

/// A client has this long to send a request after connecting or after its last reply.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Each chunk of a reply must be taken by the client within this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `flows` waits for fresh values before it answers with the last read's.
const FRESH_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Flows per streamed chunk (about 0.5 MB of JSON).
const PAGE: usize = 500;
/// How often the socket file is checked.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Who may talk to the agent.
#[derive(Clone, Debug)]
pub struct Access {
    pub agent_uid: u32,
    /// The read group's name and, if it exists on this host, its gid.
    pub group: (String, Option<u32>),
    /// The admin group (may change things: remedies, reload), if configured.
    pub admin: Option<(String, Option<u32>)>,
}

impl Access {
    fn in_group(groups: &[u32], cred: sys::PeerCred, gid: Option<u32>) -> bool {
        gid.is_some_and(|g| cred.gid == g || groups.contains(&g))
    }

    /// Root, the agent's own uid, or a member of the admin group.
    pub fn is_admin(&self, cred: sys::PeerCred, groups: &[u32]) -> bool {
        cred.uid == 0
            || cred.uid == self.agent_uid
            || self
                .admin
                .as_ref()
                .is_some_and(|(_, g)| Self::in_group(groups, cred, *g))
    }

    /// Ok, or the refusal to send back.
    pub fn check(&self, cred: sys::PeerCred, groups: &[u32]) -> Result<(), String> {
        let (name, gid) = &self.group;
        if Self::in_group(groups, cred, *gid) || self.is_admin(cred, groups) {
            return Ok(());
        }
        let admin = self
            .admin
            .as_ref()
            .map_or(String::new(), |(a, _)| format!(" or `{a}`"));
        let fix = match gid {
            Some(_) => format!("ask an admin to run `usermod -aG {name} <user>`"),
            None => format!(
                "group `{name}` does not exist on this host: an admin can create it with `groupadd --system {name}` and add users to it"
            ),
        };
        Err(format!(
            "permission denied: uid {} is neither root nor in group `{name}`{admin}; {fix}",
            cred.uid
        ))
    }
}

/// Connection counters shared with `status`.
#[derive(Default)]
pub struct ClientCounters {
    pub connected: AtomicUsize,
    pub refused: AtomicU64,
}

/// Everything a connection task needs.
#[derive(Clone)]
pub struct Ctx {
    pub tx: mpsc::Sender<Msg>,
    pub status: mpsc::Sender<oneshot::Sender<Reply>>,
    pub access: Access,
    pub notices: tokio::sync::broadcast::Sender<std::sync::Arc<crate::sinks::Notice>>,
    pub counters: Arc<ClientCounters>,
    pub budgets: Arc<super::budget::Budgets>,
}

/// Refusals being written at once; past this a connection over the caps is closed at once (each
/// would otherwise hold a descriptor for up to two seconds).
const REFUSING_AT_ONCE: usize = 64;
/// The reserved lane's idle limit: root's one extra connection is for a quick `status`.
const LANE_IDLE: Duration = Duration::from_secs(2);

/// A connection's place: in the non-root users' `max_clients`, in root's (and the agent's
/// uid's) own `max_clients`, or the one place kept for root when its own are all taken (`lane`),
/// so that `status` is always answered. Held until the connection ends.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    lane: bool,
}

/// Accepts CLI connections until `stop`; rebinds the socket if its file disappears.
pub async fn accept_loop(
    mut listener: UnixListener,
    path: PathBuf,
    groups: (Option<u32>, Option<u32>),
    max_clients: usize,
    ctx: Ctx,
    socket_ok: Arc<std::sync::atomic::AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_clients));
    let root_slots = Arc::new(tokio::sync::Semaphore::new(max_clients));
    let lane = Arc::new(tokio::sync::Semaphore::new(1));
    let refusing = Arc::new(tokio::sync::Semaphore::new(REFUSING_AT_ONCE));
    let per_uid_count: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>> = Default::default();
    let mut bound = std::fs::metadata(&path).map(|m| m.ino()).ok();
    let mut watch = tokio::time::interval(WATCH_EVERY);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = watch.tick() => {
                let now = std::fs::symlink_metadata(&path).map(|m| m.ino()).ok();
                if now != bound {
                    tracing::warn!(socket = %path.display(), "the CLI socket file disappeared or was replaced; recreating it");
                    let _ = std::fs::remove_file(&path);
                    match bind_socket(&path, groups.0, groups.1) {
                        Ok(l) => {
                            listener = l;
                            bound = std::fs::metadata(&path).map(|m| m.ino()).ok();
                            socket_ok.store(true, Ordering::Relaxed);
                        }
                        Err(e) => {
                            socket_ok.store(false, Ordering::Relaxed);
                            tracing::error!("recreating the CLI socket failed: {e:#}");
                        }
                    }
                }
                continue;
            }
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                failures = 0;
                s
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; say so once per streak.
                failures += 1;
                if failures == 1 {
                    tracing::warn!("accepting a CLI connection failed: {e}; backing off");
                }
                tokio::time::sleep(Duration::from_millis(50u64 << failures.min(6))).await;
                continue;
            }
        };
        // Non-root users share `max_clients`, and one uid may hold at most a quarter of them.
        // Root (and the agent's own uid) has `max_clients` places of its own and, when those are
        // taken, one reserved lane with a short idle limit, so that its `status` is always
        // answered however many connections something left open.
        let uid = sys::peer_cred(stream.as_fd()).map(|c| c.uid).unwrap_or(u32::MAX);
        let privileged = uid == 0 || uid == ctx.access.agent_uid;
        let per_uid = (max_clients / 4).max(4);
        let admitted = if privileged {
            let admit = |p, lane| Admitted { _permit: p, lane };
            root_slots
                .clone()
                .try_acquire_owned()
                .map(|p| admit(p, false))
                .or_else(|_| lane.clone().try_acquire_owned().map(|p| admit(p, true)))
                .ok()
        } else {
            let mine = per_uid_count
                .lock()
                .map_or(usize::MAX, |m| m.get(&uid).copied().unwrap_or(0));
            if mine >= per_uid {
                None
            } else {
                slots.clone().try_acquire_owned().ok().map(|p| Admitted {
                    _permit: p,
                    lane: false,
                })
            }
        };
        match admitted {
            Some(permit) => {
                let ctx = ctx.clone();
                let per = per_uid_count.clone();
                if let Ok(mut m) = per.lock() {
                    *m.entry(uid).or_default() += 1;
                }
                let idle = if permit.lane { LANE_IDLE } else { IDLE_TIMEOUT };
                tokio::spawn(async move {
                    ctx.counters.connected.fetch_add(1, Ordering::Relaxed);
                    serve_conn(stream, &ctx, idle).await;
                    ctx.counters.connected.fetch_sub(1, Ordering::Relaxed);
                    if let Ok(mut m) = per.lock()
                        && let Some(n) = m.get_mut(&uid)
                    {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            m.remove(&uid);
                        }
                    }
                    drop(permit);
                });
            }
            None => {
                ctx.counters.refused.fetch_add(1, Ordering::Relaxed);
                let Ok(writer) = refusing.clone().try_acquire_owned() else {
                    // Too many refusals under way: this one is closed without a word.
                    continue;
                };
                let line = if privileged {
                    Reply::err(format!(
                        "too many root CLI connections ({max_clients} and the reserved one are open; agent.max_clients): close some and try again"
                    ))
                } else {
                    Reply::err(format!(
                        "too many CLI connections (at most {per_uid} per user and {max_clients} in all; agent.max_clients): try again"
                    ))
                };
                tokio::spawn(async move {
                    refuse(stream, line.to_line()).await;
                    drop(writer);
                });
            }
        }
    }
}

/// Reads the client's request line if it comes at once (so that the refusal is its reply and
/// the client's write does not fail first; the CLI reads a refusal after a failed write too),
/// then writes the refusal and closes; 1.2 seconds at most.
async fn refuse(stream: UnixStream, line: String) {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    let mut limited = (&mut reader).take(ipc::MAX_LINE as u64);
    let _ = tokio::time::timeout(Duration::from_millis(200), limited.read_until(b'\n', &mut buf)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), w.write_all(line.as_bytes())).await;
    let _ = w.shutdown().await;
}

async fn write(w: &mut tokio::net::unix::OwnedWriteHalf, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, w.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

async fn serve_conn(stream: UnixStream, ctx: &Ctx, idle: Duration) {
    let cred = sys::peer_cred(stream.as_fd());
    // Whose budget pays for this connection's queries: None for root and the agent's own uid.
    let payer = cred
        .as_ref()
        .ok()
        .map(|c| c.uid)
        .filter(|&u| u != 0 && u != ctx.access.agent_uid);
    let groups = sys::peer_groups(stream.as_fd()).unwrap_or_default();
    let verdict = cred
        .as_ref()
        .map_err(|e| format!("cannot read peer credentials: {e}"))
        .and_then(|c| ctx.access.check(*c, &groups));
    let admin = cred.as_ref().is_ok_and(|c| ctx.access.is_admin(*c, &groups));
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    if let Err(refusal) = verdict {
        ctx.counters.refused.fetch_add(1, Ordering::Relaxed);
        // Read the request first so that the refusal is its reply (the client may still be writing).
        let mut limited = (&mut reader).take(ipc::MAX_LINE as u64);
        let _ = tokio::time::timeout(Duration::from_secs(1), limited.read_until(b'\n', &mut buf)).await;
        let _ = write(&mut w, Reply::err(refusal).to_line().as_bytes()).await;
        return;
    }
    loop {
        buf.clear();
        let mut limited = (&mut reader).take(ipc::MAX_LINE as u64 + 1);
        let n = match tokio::time::timeout(idle, limited.read_until(b'\n', &mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return,
            Err(_) => {
                let msg = format!("no request within {}s; closing", idle.as_secs());
                let _ = write(&mut w, Reply::err(msg).to_line().as_bytes()).await;
                return;
            }
        };
        if n == 0 {
            return;
        }
        if buf.len() > ipc::MAX_LINE {
            let msg = format!("request line longer than {} bytes; closing", ipc::MAX_LINE);
            let _ = write(&mut w, Reply::err(msg).to_line().as_bytes()).await;
            return;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let req = match ipc::parse_request(line) {
            Err(r) => {
                if !write(&mut w, r.to_line().as_bytes()).await {
                    return;
                }
                continue;
            }
            Ok(req) => req,
        };
        if let Request::Events { follow: true } = req {
            follow(&mut w, ctx).await;
            return;
        }
        // A non-root user's query waits for its previous one and for its share of the agent's
        // time (see `budget`); over it, it is answered from the table and says so.
        let ticket = match payer {
            Some(uid) => match ctx.budgets.admit(uid).await {
                Ok(t) => Some(t),
                Err(refusal) => {
                    if !write(&mut w, Reply::err(refusal).to_line().as_bytes()).await {
                        return;
                    }
                    continue;
                }
            },
            None => None,
        };
        let note = ticket.as_ref().and_then(|t| t.note.clone());
        let (ok, cost) = match req {
            Request::Status {} => {
                let t0 = std::time::Instant::now();
                let (otx, orx) = oneshot::channel();
                if ctx.status.send(otx).await.is_err() {
                    return;
                }
                let r = orx
                    .await
                    .unwrap_or_else(|_| Reply::err("the agent is shutting down"));
                let cost = t0.elapsed();
                (write(&mut w, r.with_note(note).to_line().as_bytes()).await, cost)
            }
            Request::Flows { mut filter } => {
                if note.is_some() {
                    filter.fresh = false;
                }
                stream_flows(&mut w, ctx, filter, note).await
            }
            req => {
                let t0 = std::time::Instant::now();
                let (otx, orx) = oneshot::channel();
                if ctx
                    .tx
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
                let r = orx
                    .await
                    .unwrap_or_else(|_| Reply::err("the agent is shutting down"));
                let cost = t0.elapsed();
                (write(&mut w, r.with_note(note).to_line().as_bytes()).await, cost)
            }
        };
        if let Some(t) = ticket {
            t.charge(cost);
        }
        if !ok {
            // A client that does not take its reply loses the connection.
            ctx.counters.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// `flows`: the state owner selects and sorts the cookies, then hands out the views in pages; the
/// reply is written page by page, so neither side holds the whole reply. Answers whether the
/// client took it all, and the time the agent spent on it (its waits for the state owner and the
/// fresh read; not the time spent waiting for the client to read).
async fn stream_flows(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    ctx: &Ctx,
    filter: FlowFilter,
    note: Option<String>,
) -> (bool, Duration) {
    let mut cost = Duration::ZERO;
    let t0 = std::time::Instant::now();
    let (otx, orx) = oneshot::channel();
    if ctx
        .tx
        .send(Msg::FlowIds {
            filter: filter.clone(),
            reply: otx,
        })
        .await
        .is_err()
    {
        return (false, t0.elapsed());
    }
    let ids = match orx.await {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => {
            let cost = t0.elapsed();
            return (write(w, Reply::err(e).to_line().as_bytes()).await, cost);
        }
        Err(_) => return (false, t0.elapsed()),
    };
    // Fresh values for what was selected (see `kernel::tables::read_of`): the pages below
    // show them. A refresh that does not come back in time leaves the last read's values, with
    // their age (`sample_age_ms`).
    if filter.fresh && !ids.is_empty() {
        let (otx, orx) = oneshot::channel();
        let msg = Msg::Refresh {
            cookies: ids.clone(),
            reply: otx,
        };
        if ctx.tx.send(msg).await.is_err() {
            return (false, t0.elapsed());
        }
        let _ = tokio::time::timeout(FRESH_WAIT, orx).await;
    }
    cost += t0.elapsed();
    if !write(w, ipc::STREAM_OPEN.as_bytes()).await {
        return (false, cost);
    }
    let mut first = true;
    for page in ids.chunks(PAGE) {
        let t0 = std::time::Instant::now();
        let (otx, orx) = oneshot::channel();
        let msg = Msg::FlowPage {
            cookies: page.to_vec(),
            filter: filter.clone(),
            reply: otx,
        };
        if ctx.tx.send(msg).await.is_err() {
            return (false, cost + t0.elapsed());
        }
        let Ok(chunk) = orx.await else {
            return (false, cost + t0.elapsed());
        };
        cost += t0.elapsed();
        if chunk.is_empty() {
            continue;
        }
        if !first && !write(w, b",").await {
            return (false, cost);
        }
        first = false;
        if !write(w, &chunk).await {
            return (false, cost);
        }
    }
    (
        write(w, ipc::stream_close(note.as_deref()).as_bytes()).await,
        cost,
    )
}

/// `events --follow`: every notice as its own reply line until the client goes away.
async fn follow(w: &mut tokio::net::unix::OwnedWriteHalf, ctx: &Ctx) {
    let mut rx = ctx.notices.subscribe();
    loop {
        match rx.recv().await {
            Ok(n) => {
                if !write(w, Reply::ok(&*n).to_line().as_bytes()).await {
                    return;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                let msg = format!("{k} events were dropped: this reader is too slow");
                if !write(w, Reply::err(msg).to_line().as_bytes()).await {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests;
