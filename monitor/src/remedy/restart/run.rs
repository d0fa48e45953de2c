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
            let argv = argv.clone();
            tokio::task::spawn_blocking(move || command(&argv))
                .await
                .map_err(|e| format!("the restart command's thread failed: {e}"))?
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

/// Runs `argv` to completion (at most COMMAND_LIMIT); a non-zero exit is a failure with its
/// stderr.
fn command(argv: &[String]) -> Result<String, String> {
    let (prog, args) = argv.split_first().ok_or("restart_command is empty")?;
    let shown = format!("`{}`", argv.join(" "));
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown} could not start: {e}"))?;
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = Vec::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.by_ref().take(STDERR_KEEP as u64).read_to_end(&mut err);
                }
                let err = String::from_utf8_lossy(&err).trim().to_string();
                return if status.success() {
                    Ok(shown)
                } else {
                    Err(format!(
                        "{shown} failed ({status}){}",
                        if err.is_empty() {
                            String::new()
                        } else {
                            format!(": {err}")
                        }
                    ))
                };
            }
            Ok(None) if t0.elapsed() >= COMMAND_LIMIT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} did not finish within {COMMAND_LIMIT:?} and was killed"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("{shown}: {e}")),
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
}
