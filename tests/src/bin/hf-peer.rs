//! Test peer for the scenario tests: a TCP server or client driven by stdin lines.
//!
//! `hf-peer listen ADDR`  prints `listening ADDR`, accepts and holds connections; each
//!                        connection is closed when its peer closes (EOF); `quit` exits.
//! `hf-peer connect ADDR [USER_TIMEOUT_MS] [ka] [from=LOCAL]` prints `connected LOCAL`, then
//!                        obeys `send`, `close`, `keepalive` (prints `keepalive 0|1`: what the
//!                        program itself sees of SO_KEEPALIVE), `quit`; with USER_TIMEOUT_MS,
//!                        TCP_USER_TIMEOUT makes a send to an evicted flow fail within that time
//!                        instead of minutes; with `ka`, the program turns keepalive on itself
//!                        (30 s / 5 s / 3 probes); with `from=`, it binds that local address.
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
    let from = opts.iter().find_map(|o| o.strip_prefix("from="));
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
            let stream = match from {
                None => TcpStream::connect(addr).expect("connect"),
                Some(local) => connect_from(local, addr),
            };
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
                    "keepalive" => {
                        if let Some(st) = s.as_ref() {
                            println!("keepalive {}", getopt(st, libc::SOL_SOCKET, libc::SO_KEEPALIVE));
                        }
                    }
                    // What the program sees without touching the session: the socket's TCP
                    // state (tcpi_state, 1 = ESTABLISHED, 7 = CLOSE) and pending error.
                    "state" => {
                        if let Some(st) = s.as_ref() {
                            let mut info = [0u8; 8];
                            let mut len = info.len() as libc::socklen_t;
                            // SAFETY: getsockopt writes at most `len` bytes into `info`.
                            let rc = unsafe {
                                libc::getsockopt(
                                    std::os::fd::AsRawFd::as_raw_fd(st),
                                    libc::IPPROTO_TCP,
                                    libc::TCP_INFO,
                                    info.as_mut_ptr().cast(),
                                    &mut len,
                                )
                            };
                            let state = if rc == 0 { i32::from(info[0]) } else { -1 };
                            println!(
                                "state {state} err {}",
                                getopt(st, libc::SOL_SOCKET, libc::SO_ERROR)
                            );
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

fn getopt(s: &TcpStream, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a live local.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt {level}/{name}");
    v
}

/// An IPv4 connection from a chosen local address and port (std cannot bind before connecting).
fn connect_from(local: &str, remote: &str) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sin = |a: &str| {
        let a: std::net::SocketAddrV4 = a.parse().expect("an IPv4 ADDR:PORT");
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    };
    let (l, r) = (sin(local), sin(remote));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; the addresses are live
    // locals of the stated length.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(
            libc::bind(fd, (&l as *const libc::sockaddr_in).cast(), len),
            0,
            "bind {local}"
        );
        assert_eq!(
            libc::connect(fd, (&r as *const libc::sockaddr_in).cast(), len),
            0,
            "connect {remote}"
        );
        TcpStream::from_raw_fd(fd)
    }
}
