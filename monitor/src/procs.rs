//! Processes from procfs: /proc/PID/stat and /proc/PID/status parsing, the zombie scan, and the
//! diagnosis of why a parent does not reap.
use serde::{Deserialize, Serialize};

/// SIGCHLD's bit in the /proc/PID/status signal masks (signal 17 -> bit 16).
const SIGCHLD_BIT: u64 = 1 << (17 - 1);

/// The fields of /proc/PID/stat holdfast uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    /// Start time in clock ticks since boot (identifies a pid incarnation).
    pub starttime: u64,
}

/// Parses /proc/PID/stat. The comm may contain spaces and parentheses: it ends at the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    Some(ProcStat {
        pid,
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        starttime: rest.get(19)?.parse().ok()?,
    })
}

pub fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Signal dispositions and state of a process (/proc/PID/status).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcSignals {
    pub state: char,
    pub blocked: u64,
    pub ignored: u64,
    pub caught: u64,
    pub pending: u64,
}

pub fn parse_status(text: &str) -> Option<ProcSignals> {
    let mut s = ProcSignals::default();
    let hex = |v: &str| u64::from_str_radix(v.trim(), 16).ok();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k {
            "State" => s.state = v.trim().chars().next()?,
            "SigBlk" => s.blocked = hex(v)?,
            "SigIgn" => s.ignored = hex(v)?,
            "SigCgt" => s.caught = hex(v)?,
            "ShdPnd" => s.pending |= hex(v)?,
            "SigPnd" => s.pending |= hex(v)?,
            _ => {}
        }
    }
    (s.state != '\0').then_some(s)
}

/// Why a parent does not reap its zombie children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Diagnosis {
    /// SIGCHLD is blocked: the signal stays pending; a nudge cannot help.
    SigchldBlocked,
    /// SIGCHLD is ignored now (it was not when the children exited): a nudge cannot help.
    SigchldIgnored,
    /// Default disposition and the parent never calls wait(): the signal is discarded.
    NoHandler,
    /// A handler is installed but zombies persist: a lost or coalesced SIGCHLD. A nudge can help.
    HandlerLostSignal,
    /// The parent is stopped (SIGSTOP/SIGTSTP): it runs no handler until continued.
    ParentStopped,
    /// The parent is being traced and stopped by a debugger.
    ParentTraced,
    /// The parent is PID 1 of this namespace and does not reap orphans.
    InitDoesNotReap,
    /// The parent could not be read (gone, or not visible).
    Unknown,
}

impl Diagnosis {
    /// Whether sending SIGCHLD to the parent can get the zombies reaped.
    pub fn nudge_can_help(self) -> bool {
        self == Diagnosis::HandlerLostSignal
    }

    pub fn explain(self) -> &'static str {
        match self {
            Diagnosis::SigchldBlocked => {
                "the parent blocks SIGCHLD, so its handler never runs; fix the parent's signal mask"
            }
            Diagnosis::SigchldIgnored => {
                "the parent ignores SIGCHLD now but did not when these children exited; only wait() by the parent or its exit frees them"
            }
            Diagnosis::NoHandler => {
                "the parent has no SIGCHLD handler and never calls wait(); fix the parent to reap (or set SIGCHLD to SIG_IGN)"
            }
            Diagnosis::HandlerLostSignal => {
                "the parent has a SIGCHLD handler but zombies persist: a lost or coalesced SIGCHLD; a nudge can trigger the handler"
            }
            Diagnosis::ParentStopped => {
                "the parent is stopped and runs no handler until it is continued (SIGCONT)"
            }
            Diagnosis::ParentTraced => "the parent is stopped under a tracer (debugger)",
            Diagnosis::InitDoesNotReap => {
                "the zombies were orphaned to PID 1, which does not reap here; only a reboot or a reaping init frees them"
            }
            Diagnosis::Unknown => "the parent could not be inspected",
        }
    }
}

impl Diagnosis {
    /// `explain()` for the kebab-case name as it travels in JSON.
    pub fn explain_str(name: &str) -> &'static str {
        serde_json::from_value::<Diagnosis>(serde_json::Value::String(name.into()))
            .map_or("", |d| d.explain())
    }
}

/// Diagnoses a parent from its status.
pub fn diagnose(ppid: u32, sig: Option<&ProcSignals>) -> Diagnosis {
    let Some(s) = sig else { return Diagnosis::Unknown };
    match s.state {
        'T' => return Diagnosis::ParentStopped,
        't' => return Diagnosis::ParentTraced,
        _ => {}
    }
    if s.blocked & SIGCHLD_BIT != 0 {
        Diagnosis::SigchldBlocked
    } else if s.ignored & SIGCHLD_BIT != 0 {
        Diagnosis::SigchldIgnored
    } else if ppid == 1 {
        Diagnosis::InitDoesNotReap
    } else if s.caught & SIGCHLD_BIT != 0 {
        Diagnosis::HandlerLostSignal
    } else {
        Diagnosis::NoHandler
    }
}

pub fn read_signals(pid: u32) -> Option<ProcSignals> {
    parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Result of one /proc walk.
#[derive(Clone, Debug, Default)]
pub struct ProcScan {
    pub processes: usize,
    pub zombies: Vec<ProcStat>,
}

/// Reads /proc/PID/stat of every process and keeps the zombies.
pub fn scan() -> ProcScan {
    let mut out = ProcScan::default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut buf = String::with_capacity(512);
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        buf.clear();
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if f.read_to_string(&mut buf).is_err() {
            continue;
        }
        out.processes += 1;
        // Cheap pre-check on the state letter before a full parse.
        if let Some(close) = buf.rfind(')') {
            if buf[close + 1..].trim_start().starts_with('Z') {
                if let Some(st) = parse_stat(&buf) {
                    out.zombies.push(st);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comms() {
        let line = "4242 (my (weird) proc) Z 100 4242 4242 0 -1 4194564 0 0 0 0 0 0 0 0 20 0 1 0 123456 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            (s.pid, s.comm.as_str(), s.state, s.ppid, s.starttime),
            (4242, "my (weird) proc", 'Z', 100, 123456)
        );
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S").is_none());
    }

    fn status(state: &str, blk: u64, ign: u64, cgt: u64) -> String {
        format!(
            "Name:\tx\nState:\t{state}\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t{blk:016x}\nSigIgn:\t{ign:016x}\nSigCgt:\t{cgt:016x}\n"
        )
    }

    #[test]
    fn diagnoses_parents() {
        let d = |st: &str, b, i, c, ppid| diagnose(ppid, parse_status(&status(st, b, i, c)).as_ref());
        assert_eq!(
            d("S (sleeping)", SIGCHLD_BIT, 0, SIGCHLD_BIT, 50),
            Diagnosis::SigchldBlocked
        );
        assert_eq!(
            d("S (sleeping)", 0, SIGCHLD_BIT, 0, 50),
            Diagnosis::SigchldIgnored
        );
        assert_eq!(
            d("S (sleeping)", 0, 0, SIGCHLD_BIT | 1, 50),
            Diagnosis::HandlerLostSignal
        );
        assert_eq!(d("S (sleeping)", 0, 0, 0, 50), Diagnosis::NoHandler);
        assert_eq!(d("T (stopped)", 0, 0, SIGCHLD_BIT, 50), Diagnosis::ParentStopped);
        assert_eq!(
            d("t (tracing stop)", 0, 0, SIGCHLD_BIT, 50),
            Diagnosis::ParentTraced
        );
        assert_eq!(d("S (sleeping)", 0, 0, 0, 1), Diagnosis::InitDoesNotReap);
        assert_eq!(diagnose(5, None), Diagnosis::Unknown);
        assert!(Diagnosis::HandlerLostSignal.nudge_can_help());
        assert!(!Diagnosis::SigchldBlocked.nudge_can_help());
    }

    #[test]
    fn scans_this_system() {
        let s = scan();
        assert!(s.processes > 1);
        let me = read_stat(std::process::id()).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(read_signals(std::process::id()).is_some());
    }
}
