//! Test peer for the scenario tests: a TCP server or client driven by stdin lines.
//!
//! `hf-peer listen ADDR`  prints `listening ADDR`, accepts and holds connections; each
//!                        connection is closed when its peer closes (EOF); `quit` exits.
//! `hf-peer connect ADDR [USER_TIMEOUT_MS] [ka]` prints `connected LOCAL`, then obeys `send`,
//!                        `close`, `quit`; with USER_TIMEOUT_MS, TCP_USER_TIMEOUT makes a send to
//!                        an evicted flow fail within that time instead of minutes; with `ka`,
//!                        the program turns keepalive on itself (30 s / 5 s / 3 probes).
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, addr, opts) = match args.as_slice() {
        [_, m, a, rest @ ..] => (m.as_str(), a.as_str(), rest),
        _ => {
            eprintln!("usage: hf-peer listen|connect ADDR [USER_TIMEOUT_MS] [ka]");
            std::process::exit(2);
        }
    };
    let user_timeout = opts.iter().find_map(|o| o.parse::<u32>().ok());
    let keepalive = opts.iter().any(|o| o == "ka");
    match mode {
        "listen" => {
            let l = TcpListener::bind(addr).expect("bind");
            println!("listening {}", l.local_addr().expect("addr"));
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    // Echo until EOF, then close (a well-behaved server).
                    std::thread::spawn(move || {
                        let mut s = s;
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            for line in std::io::stdin().lock().lines() {
                if line.map(|l| l.trim() == "quit").unwrap_or(true) {
                    break;
                }
            }
        }
        "connect" => {
            let stream = TcpStream::connect(addr).expect("connect");
            if let Some(ms) = user_timeout {
                setopt(&stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms as i32);
            }
            if keepalive {
                setopt(&stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
                setopt(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
                setopt(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
                setopt(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
            }
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .expect("read timeout");
            let mut s = Some(stream);
            println!(
                "connected {}",
                s.as_ref().expect("stream").local_addr().expect("addr")
            );
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match line.trim() {
                    "send" => {
                        if let Some(st) = s.as_mut() {
                            let mut buf = [0u8; 4];
                            let ok =
                                st.write_all(b"ping").is_ok() && matches!(st.read_exact(&mut buf), Ok(()));
                            println!("sent {ok}");
                        }
                    }
                    "close" => {
                        s.take();
                        println!("closed");
                    }
                    "quit" => break,
                    _ => {}
                }
            }
        }
        _ => {
            eprintln!("unknown mode {mode}");
            std::process::exit(2);
        }
    }
}

fn setopt(s: &TcpStream, level: i32, name: i32, v: i32) {
    // SAFETY: setsockopt reads sizeof(int) bytes from `v`, a live local.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt {level}/{name}");
}
