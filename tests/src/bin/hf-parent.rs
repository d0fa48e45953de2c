//! Test parent with broken SIGCHLD handling, for the zombie scenario tests.
//!
//! `hf-parent MODE N` starts N children that exit at once, prints `children PID...` and `ready`,
//! then sleeps until stdin closes. Modes:
//! - `lost-signal`: the children exit while SIGCHLD is at its default (the signal is discarded),
//!   then a handler that reaps every child is installed: it works, but the signal was lost.
//! - `blocked`: a reaping handler is installed but SIGCHLD is blocked.
//! - `no-handler`: default disposition, never waits.
use std::io::BufRead;
use std::process::Command;
use std::time::{Duration, Instant};

extern "C" fn reap_all(_sig: libc::c_int) {
    // SAFETY: waitpid is async-signal-safe; -1/WNOHANG reaps every exited child without blocking.
    unsafe { while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {} }
}

fn install_handler() {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid argument.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = reap_all as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()), 0);
    }
}

fn block_sigchld() {
    // SAFETY: plain signal-mask manipulation of this (single-threaded) process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        assert_eq!(libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()), 0);
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, n) = match args.as_slice() {
        [_, m, n] => (m.clone(), n.parse::<usize>().expect("N")),
        _ => {
            eprintln!("usage: hf-parent lost-signal|blocked|no-handler N");
            std::process::exit(2);
        }
    };
    match mode.as_str() {
        "blocked" => {
            install_handler();
            block_sigchld();
        }
        "lost-signal" | "no-handler" => {}
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        // Children are never waited for: dropping a Child does not reap it (the point of the test).
        #[allow(clippy::zombie_processes)]
        let child = Command::new("/bin/true").spawn().expect("spawn /bin/true");
        pids.push(child.id());
    }
    let t0 = Instant::now();
    while !pids.iter().all(|p| is_zombie(*p)) {
        assert!(t0.elapsed() < Duration::from_secs(30), "children did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    if mode == "lost-signal" {
        install_handler();
    }
    println!(
        "children {}",
        pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")
    );
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
}
