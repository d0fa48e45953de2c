//! Test peer for the scenario tests: a TCP server or client driven by stdin lines.
//!
//! `hf-peer listen ADDR`  prints `listening ADDR`, accepts and holds connections; each
//!                        connection is closed when its peer closes (EOF); `quit` exits.
//! `hf-peer connect ADDR [USER_TIMEOUT_MS]` prints `connected LOCAL`, then obeys `send`, `close`,
//!                        `quit`; with USER_TIMEOUT_MS, TCP_USER_TIMEOUT makes a send to an
//!                        evicted flow fail within that time instead of minutes.
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, addr, user_timeout) = match args.as_slice() {
        [_, m, a] => (m.as_str(), a.as_str(), None),
        [_, m, a, t] => (
            m.as_str(),
            a.as_str(),
            Some(t.parse::<u32>().expect("USER_TIMEOUT_MS")),
        ),
        _ => {
            eprintln!("usage: hf-peer listen|connect ADDR");
            std::process::exit(2);
        }
    };
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
                set_user_timeout(&stream, ms);
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

fn set_user_timeout(s: &TcpStream, ms: u32) {
    let v: libc::c_int = ms as libc::c_int;
    // SAFETY: setsockopt reads sizeof(int) bytes from `v`, a live local.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_USER_TIMEOUT");
}
