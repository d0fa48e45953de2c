//! Remedy executors that touch other processes: always through a pidfd, never a bare pid.
use crate::procs;
use crate::sys;
use crate::zombies::{NudgeError, Nudger, ProcView};

/// The live /proc.
pub struct LiveProc;

impl ProcView for LiveProc {
    fn stat(&self, pid: u32) -> Option<procs::ProcStat> {
        procs::read_stat(pid)
    }
    fn signals(&self, pid: u32) -> Option<procs::ProcSignals> {
        procs::read_signals(pid)
    }
}

/// Sends SIGCHLD through a pidfd after checking the pid is still the diagnosed process.
pub struct PidfdNudger;

fn classify(e: std::io::Error, what: &str) -> NudgeError {
    match e.raw_os_error() {
        Some(libc::ESRCH) => NudgeError::Gone,
        Some(libc::EPERM) => NudgeError::Refused(format!(
            "EPERM on {what} (holdfast needs CAP_KILL or the parent's uid)"
        )),
        _ => NudgeError::Refused(format!("{what}: {e}")),
    }
}

impl Nudger for PidfdNudger {
    fn nudge(&mut self, pid: u32, starttime: u64) -> Result<(), NudgeError> {
        let fd = sys::pidfd_open(pid).map_err(|e| classify(e, "pidfd_open"))?;
        // The pidfd pins one process; make sure it is the incarnation that was diagnosed.
        match procs::read_stat(pid) {
            Some(st) if st.starttime == starttime => {}
            _ => return Err(NudgeError::Gone),
        }
        fd.send_signal(libc::SIGCHLD)
            .map_err(|e| classify(e, "pidfd_send_signal"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_reused_pid() {
        let me = procs::read_stat(std::process::id()).unwrap();
        let mut n = PidfdNudger;
        assert_eq!(n.nudge(me.pid, me.starttime + 1), Err(NudgeError::Gone));
    }

    #[test]
    fn a_missing_process_is_gone() {
        let mut n = PidfdNudger;
        // pid_max is at most 4194304: this pid cannot exist.
        assert_eq!(n.nudge(4_194_305, 0), Err(NudgeError::Gone));
    }
}
