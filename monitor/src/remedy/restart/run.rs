//! Running a restart, off the state owner's loop: systemd's RestartUnit over D-Bus (zbus; the
//! system bus from DBUS_SYSTEM_BUS_ADDRESS or its standard path), or the configured command
//! (argv, no shell) with a time limit. The answer says how, or why not, in words.
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::How;

/// How long a restart command may run.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// How long the D-Bus call may take.
const DBUS_LIMIT: Duration = Duration::from_secs(30);
/// Bytes of a failing command's stderr kept for the report.
const STDERR_KEEP: usize = 2048;

/// Restarts as `how` says. Ok: what was done; Err: why it failed.
pub async fn run(how: &How) -> Result<String, String> {
    match how {
        How::Unit(unit) => match tokio::time::timeout(DBUS_LIMIT, restart_unit(unit)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "RestartUnit({unit}) over D-Bus: no answer within {DBUS_LIMIT:?}"
            )),
        },
        How::Command(argv) => {
            // A thread of its own, not the runtime's blocking pool: the agent's shutdown never
            // waits for a restart command (it is bounded by COMMAND_LIMIT all the same).
            let argv = argv.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("holdfast-restart".into())
                .spawn(move || {
                    let _ = tx.send(command(&argv));
                })
                .map_err(|e| format!("the restart command's thread could not start: {e}"))?;
            rx.await
                .map_err(|_| "the restart command's thread ended without an answer".to_string())?
        }
    }
}

/// org.freedesktop.systemd1.Manager.RestartUnit(unit, "replace") on the system bus.
async fn restart_unit(unit: &str) -> Result<String, String> {
    let conn = zbus::connection::Builder::system()
        .build()
        .await
        .map_err(|e| format!("connecting to the system bus: {e}"))?;
    let reply = conn
        .call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "RestartUnit",
            &(unit, "replace"),
        )
        .await
        .map_err(|e| format!("RestartUnit({unit}) over D-Bus: {e}"))?;
    let job: zbus::OwnedObjectPath = reply
        .body()
        .deserialize()
        .map_err(|e| format!("RestartUnit({unit}): unexpected reply: {e}"))?;
    Ok(format!("RestartUnit({unit}) over D-Bus, job {}", job.as_str()))
}

/// Runs `argv` (at most COMMAND_LIMIT) in a process group of its own, with stdin and stdout on
/// /dev/null and stderr read without blocking. When the command exits (or the limit passes), its
/// group is killed: a child it left behind in the group (a `sleep &`, a forked helper that
/// keeps stderr open) cannot hold the agent up, and is named in the answer. A daemon that left
/// the group (setsid) is the service itself and is not touched. A non-zero exit is a failure
/// with its stderr.
fn command(argv: &[String]) -> Result<String, String> {
    command_within(argv, COMMAND_LIMIT)
}

fn command_within(argv: &[String], limit: Duration) -> Result<String, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (prog, args) = argv.split_first().ok_or("restart_command is empty")?;
    let shown = format!("`{}`", argv.join(" "));
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{shown} could not start: {e}"))?;
    let pgid = child.id() as i32;
    let mut stderr = child.stderr.take();
    if let Some(e) = &stderr {
        let _ = crate::kernel::sys::set_nonblocking(e.as_raw_fd());
    }
    let mut err = Vec::new();
    let t0 = Instant::now();
    let status = loop {
        drain(&mut stderr, &mut err);
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if t0.elapsed() >= limit => break None,
            Ok(None) => {
                // Wait for stderr or 50 ms, whichever first.
                if let Some(e) = &stderr {
                    crate::kernel::sys::wait_readable(e.as_raw_fd(), Duration::from_millis(50));
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(e) => {
                let _ = crate::kernel::sys::kill_group(pgid);
                let _ = child.wait();
                return Err(format!("{shown}: {e}"));
            }
        }
    };
    drain(&mut stderr, &mut err);
    drop(stderr);
    // Whatever is still in the command's group was left behind: it goes with the command.
    let left = crate::kernel::sys::group_members(pgid);
    let _ = crate::kernel::sys::kill_group(pgid);
    let err = String::from_utf8_lossy(&err).trim().to_string();
    let left_note = if left.is_empty() {
        String::new()
    } else {
        format!(
            "; it left {} process(es) behind in its group ({}), killed",
            left.len(),
            left.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
        )
    };
    let Some(status) = status else {
        let _ = child.wait();
        return Err(format!(
            "{shown} did not finish within {limit:?}: its process group was killed{}",
            if err.is_empty() {
                String::new()
            } else {
                format!(" (stderr: {err})")
            }
        ));
    };
    if status.success() {
        Ok(format!("{shown}{left_note}"))
    } else {
        Err(format!(
            "{shown} failed ({status}){}{left_note}",
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        ))
    }
}

/// Reads what stderr holds now (non-blocking), keeping the first STDERR_KEEP bytes; closes it at
/// end of file.
fn drain(stderr: &mut Option<std::process::ChildStderr>, keep: &mut Vec<u8>) {
    let Some(e) = stderr.as_mut() else { return };
    let mut buf = [0u8; 4096];
    loop {
        match e.read(&mut buf) {
            Ok(0) => {
                *stderr = None;
                return;
            }
            Ok(n) => {
                let room = STDERR_KEEP.saturating_sub(keep.len());
                keep.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_reports_success_or_its_exit_and_stderr() {
        assert_eq!(command(&["true".into()]), Ok("`true`".into()));
        let e = command(&[
            "sh".into(),
            "-c".into(),
            "echo no such service >&2; exit 3".into(),
        ])
        .unwrap_err();
        assert!(
            e.contains("exit status: 3") && e.contains("no such service"),
            "{e}"
        );
        let e = command(&["/nonexistent/restart".into()]).unwrap_err();
        assert!(e.contains("could not start"), "{e}");
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
    }

    #[test]
    fn children_left_in_the_group_neither_hold_it_up_nor_outlive_it() {
        // The grandchild keeps stderr open for 100 s: the answer comes when `sh` exits.
        let dir = std::env::temp_dir().join(format!("hf-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("pid");
        let script = format!("sleep 100 & echo $! > {}; exit 0", pidfile.display());
        let t0 = Instant::now();
        let r = command(&["/bin/sh".into(), "-c".into(), script]).unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "answered in {:?}",
            t0.elapsed()
        );
        assert!(
            r.contains("left 1 process(es) behind") && r.contains("killed"),
            "{r}"
        );
        let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let t1 = Instant::now();
        while alive(pid) && t1.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "the grandchild {pid} was killed");
        // Twenty forked children: none is left.
        let script = format!(
            "for i in $(seq 20); do sleep 100 & done; echo $$ > {}; exit 0",
            pidfile.display()
        );
        let r = command(&["/bin/sh".into(), "-c".into(), script]).unwrap();
        assert!(r.contains("left 20 process(es) behind"), "{r}");
        let pgid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let t1 = Instant::now();
        while !crate::kernel::sys::group_members(pgid).is_empty() && t1.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(crate::kernel::sys::group_members(pgid).is_empty());
        // A command that outlives its limit: killed with its group, at the limit.
        let t0 = Instant::now();
        let e = command_within(
            &["/bin/sh".into(), "-c".into(), "sleep 100 & sleep 100".into()],
            Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(
            e.contains("did not finish within") && e.contains("process group was killed"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
