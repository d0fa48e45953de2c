//! Test server with a hard session limit that leaks sessions: it never closes a socket after the
//! peer's FIN (the socket stays in CLOSE_WAIT and keeps its slot), but frees the slot when the
//! socket reports an error (SO_ERROR, as after holdfast's SOCK_DESTROY: ECONNABORTED).
//!
//! `hf-leaky ADDR LIMIT [ka] [deaf] [detached]` prints `listening ADDR`; a client beyond LIMIT is
//! closed at once. With `ka`, accepted sockets get keepalive 2 s / 1 s / 10 probes. With `deaf`
//! it is the worse, common kind: after the peer's FIN it never touches the socket again (not
//! even to see an error), so nothing but closing the descriptor or a restart frees the slot.
//! stdin `count` prints the sessions in use; with `detached` stdin is ignored and it serves until
//! killed (for a supervisor loop, like a service under systemd).
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn setopt(s: &TcpStream, level: i32, name: i32, v: i32) {
    // SAFETY: setsockopt reads sizeof(int) bytes from `v`, a live local.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt {level}/{name}");
}

fn serve(mut s: TcpStream, active: Arc<AtomicUsize>, deaf: bool) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            // The deaf bug: the session is parked forever, its descriptor kept.
            Ok(0) if deaf => loop {
                std::thread::sleep(Duration::from_secs(3600));
                let _ = &s;
            },
            // The bug: the peer closed, and this server never closes its end. Like an event-loop
            // server it still notices a socket error (EPOLLERR + SO_ERROR) and frees the slot.
            Ok(0) => {
                if matches!(s.take_error(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    active.fetch_sub(1, Ordering::SeqCst);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (addr, limit, flags) = match args.as_slice() {
        [_, a, l, flags @ ..]
            if flags
                .iter()
                .all(|f| ["ka", "deaf", "detached"].contains(&f.as_str())) =>
        {
            (a.clone(), l.parse::<usize>().expect("LIMIT"), flags)
        }
        _ => {
            eprintln!("usage: hf-leaky ADDR LIMIT [ka] [deaf] [detached]");
            std::process::exit(2);
        }
    };
    let has = |f: &str| flags.iter().any(|x| x == f);
    let (ka, deaf) = (has("ka"), has("deaf"));
    let l = TcpListener::bind(&addr).expect("bind");
    println!("listening {}", l.local_addr().expect("addr"));
    let active = Arc::new(AtomicUsize::new(0));
    let a2 = active.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            if a2.load(Ordering::SeqCst) >= limit {
                drop(s); // full: the client is not served
                continue;
            }
            if ka {
                setopt(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
                setopt(&s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2);
                setopt(&s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
                setopt(&s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 10);
            }
            a2.fetch_add(1, Ordering::SeqCst);
            let a3 = a2.clone();
            std::thread::spawn(move || serve(s, a3, deaf));
        }
    });
    if has("detached") {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    for line in std::io::stdin().lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("count") => println!("active {}", active.load(Ordering::SeqCst)),
            Ok("quit") | Err(_) => break,
            _ => {}
        }
    }
}
