//! Load generator for `cargo xtask bench` (loopback only):
//!
//! - `hf-load conns ADDR N`  listens on ADDR, opens N client connections to it and accepts them
//!   (2N sockets), prints `ready N`, holds them until stdin closes.
//! - `hf-load churn ADDR N`  N connect/accept/close cycles as fast as possible; prints
//!   `churn N SECONDS`.
//! - `hf-load trickle ADDR MS`  listens on ADDR, prints `ready`, then opens one connection to it
//!   every MS milliseconds and holds every one (long-lived sessions arriving slowly), until stdin
//!   closes.
//! - `hf-load get ADDR`      HTTP GET /metrics, prints the body.
//! - `hf-load procs N Z`     N sleeping children of which Z exit at once and stay zombies; prints
//!   `ready`; on stdin close kills and reaps them all.
//! - `hf-load churn-for ADDR SECONDS`  connect/accept/close cycles for that long; prints
//!   `churn N SECONDS`.
//! - `hf-load ipc-idle SOCKET N`   opens N connections to the agent's CLI socket and sends
//!   nothing; prints `ready K` (K connections still open after a moment), holds them until stdin
//!   closes.
//! - `hf-load ipc-flows SOCKET N`  N connections that each ask for every flow and never read the
//!   reply; prints `ready`; holds them until stdin closes.
//! - `hf-load get-unix PATH`  a GET of /metrics over a unix socket.
//! - `hf-load tcp-idle ADDR N`  N idle TCP connections; prints `ready K` (K still open after a
//!   moment), holds them until stdin closes.
//! - `hf-load chatter ADDR`  a server that sends each connection one byte a second.
//! - `hf-load flood ADDR N SECONDS`  N connections that send and never read.
//! - `hf-load squat PATH`    a fake agent: listens on the unix socket PATH and answers every
//!   request with "no findings"; prints `listening`; runs until stdin closes.
use std::io::{BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};
use std::time::Instant;

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// Half a second after connecting, how many of `conns` the server has not closed: a
/// non-blocking read of an open, quiet connection would block; a closed one reads EOF or fails.
fn still_open<C>(conns: &[C], nonblocking: impl Fn(&C) -> bool) -> usize
where
    for<'a> &'a C: std::io::Read,
{
    std::thread::sleep(std::time::Duration::from_millis(500));
    conns
        .iter()
        .filter(|c| {
            nonblocking(c);
            let mut b = [0u8; 256];
            matches!(std::io::Read::read(&mut &**c, &mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

fn wait_stdin() {
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("conns") => {
            raise_nofile();
            let n: usize = args[3].parse().expect("N");
            let l = TcpListener::bind(&args[2]).expect("bind");
            let addr = l.local_addr().expect("addr");
            let acceptor =
                std::thread::spawn(move || (0..n).map(|_| l.accept().expect("accept").0).collect::<Vec<_>>());
            let clients: Vec<TcpStream> = (0..n)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            let servers = acceptor.join().expect("acceptor");
            println!("ready {}", clients.len() + servers.len());
            std::io::stdout().flush().ok();
            wait_stdin();
        }
        Some("churn") => {
            let n: usize = args[3].parse().expect("N");
            let l = TcpListener::bind(&args[2]).expect("bind");
            let addr = l.local_addr().expect("addr");
            let t0 = Instant::now();
            for _ in 0..n {
                let c = TcpStream::connect(addr).expect("connect");
                let (s, _) = l.accept().expect("accept");
                drop(c);
                drop(s);
            }
            println!("churn {n} {:.6}", t0.elapsed().as_secs_f64());
        }
        Some("trickle") => {
            raise_nofile();
            let every = std::time::Duration::from_millis(args[3].parse().expect("MS"));
            let l = TcpListener::bind(&args[2]).expect("bind");
            let addr = l.local_addr().expect("addr");
            println!("ready");
            std::io::stdout().flush().ok();
            std::thread::spawn(|| {
                wait_stdin();
                std::process::exit(0);
            });
            let mut held = Vec::new();
            loop {
                let next = Instant::now() + every;
                let c = TcpStream::connect(addr).expect("connect");
                let (s, _) = l.accept().expect("accept");
                held.push((c, s));
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }
        Some("procs") => {
            let n: usize = args[2].parse().expect("N");
            let z: usize = args[3].parse().expect("Z");
            let mut kids: Vec<Child> = Vec::with_capacity(n);
            for i in 0..n {
                let c = if i < z {
                    Command::new("true").spawn()
                } else {
                    Command::new("sleep").arg("3600").spawn()
                };
                kids.push(c.expect("spawn"));
            }
            println!("ready");
            std::io::stdout().flush().ok();
            wait_stdin();
            for k in &mut kids {
                let _ = k.kill();
            }
            for k in &mut kids {
                let _ = k.wait();
            }
        }
        Some("churn-for") => {
            let secs: f64 = args[3].parse().expect("SECONDS");
            let l = TcpListener::bind(&args[2]).expect("bind");
            let addr = l.local_addr().expect("addr");
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed().as_secs_f64() < secs {
                let c = TcpStream::connect(addr).expect("connect");
                let (s, _) = l.accept().expect("accept");
                drop(c);
                drop(s);
                n += 1;
            }
            println!("churn {n} {:.6}", t0.elapsed().as_secs_f64());
        }
        Some("ipc-idle") => {
            raise_nofile();
            let n: usize = args[3].parse().expect("N");
            let conns: Vec<UnixStream> = (0..n)
                .filter_map(|_| UnixStream::connect(&args[2]).ok())
                .collect();
            // Connections the agent refused are closed by now. (A refusal arrives as an error line
            // and EOF; an open connection has nothing to read.)
            let open = still_open(&conns, |c| c.set_nonblocking(true).is_ok());
            println!("ready {open}");
            std::io::stdout().flush().ok();
            wait_stdin();
        }
        Some("ipc-flows") => {
            raise_nofile();
            let n: usize = args[3].parse().expect("N");
            let mut conns = Vec::new();
            for _ in 0..n {
                if let Ok(mut c) = UnixStream::connect(&args[2]) {
                    let _ = c.write_all(b"{\"v\":1,\"op\":\"flows\",\"filter\":{\"all\":true}}\n");
                    conns.push(c);
                }
            }
            println!("ready");
            std::io::stdout().flush().ok();
            wait_stdin();
        }
        Some("squat") => {
            let l = UnixListener::bind(&args[2]).expect("bind");
            std::thread::spawn(move || {
                for c in l.incoming().flatten() {
                    let mut line = String::new();
                    let mut r = std::io::BufReader::new(&c);
                    if r.read_line(&mut line).is_ok() {
                        let _ = (&c).write_all(b"{\"ok\":true,\"data\":[]}\n");
                    }
                }
            });
            println!("listening");
            std::io::stdout().flush().ok();
            wait_stdin();
        }
        Some("get") => {
            // A minimal HTTP GET (for the metrics test): prints the response body.
            use std::io::Read;
            let mut c = TcpStream::connect(&args[2]).expect("connect");
            write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
            let mut resp = String::new();
            c.read_to_string(&mut resp).expect("read");
            let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            print!("{body}");
        }
        Some("get-unix") => {
            // The same GET over a unix socket: prints the body, or the error and exits 1.
            use std::io::Read;
            let mut c = match UnixStream::connect(&args[2]) {
                Ok(c) => c,
                Err(e) => {
                    println!("error: {e}");
                    std::process::exit(1);
                }
            };
            write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
            let mut resp = String::new();
            c.read_to_string(&mut resp).expect("read");
            let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            print!("{body}");
        }
        Some("tcp-idle") => {
            // N idle TCP connections to ADDR that never send; prints `ready K`, held until stdin
            // closes.
            let n: usize = args[3].parse().expect("N");
            let conns: Vec<TcpStream> = (0..n).filter_map(|_| TcpStream::connect(&args[2]).ok()).collect();
            // Those the server closed at accept are closed by now.
            let open = still_open(&conns, |c| c.set_nonblocking(true).is_ok());
            println!("ready {open}");
            std::io::stdout().flush().ok();
            wait_stdin();
        }
        Some("chatter") => {
            // A server that never lets a connection idle: one byte a second to each. Prints
            // `listening`; runs until stdin closes.
            let l = TcpListener::bind(&args[2]).expect("bind");
            std::thread::spawn(move || {
                for c in l.incoming().flatten() {
                    std::thread::spawn(move || {
                        while (&c).write_all(b".").is_ok() {
                            std::thread::sleep(std::time::Duration::from_secs(1));
                        }
                    });
                }
            });
            println!("listening");
            std::io::stdout().flush().ok();
            wait_stdin();
        }
        Some("flood") => {
            // N connections to ADDR that each send without ever reading, for at most SECONDS;
            // prints how many the server closed (`closed K of N after MS ms`).
            let n: usize = args[3].parse().expect("N");
            let secs: u64 = args[4].parse().expect("SECONDS");
            let t0 = Instant::now();
            let conns: Vec<TcpStream> = (0..n).filter_map(|_| TcpStream::connect(&args[2]).ok()).collect();
            let closed: Vec<std::sync::atomic::AtomicBool> = (0..conns.len())
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect();
            std::thread::scope(|s| {
                for (c, done) in conns.iter().zip(&closed) {
                    s.spawn(move || {
                        c.set_write_timeout(Some(std::time::Duration::from_millis(500)))
                            .ok();
                        let chunk = [b'x'; 65536];
                        while t0.elapsed().as_secs() < secs {
                            match (&*c).write(&chunk) {
                                Ok(_) => {}
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => {
                                    done.store(true, std::sync::atomic::Ordering::Relaxed);
                                    return;
                                }
                            }
                        }
                    });
                }
            });
            let k = closed
                .iter()
                .filter(|d| d.load(std::sync::atomic::Ordering::Relaxed))
                .count();
            println!(
                "closed {k} of {} after {} ms",
                conns.len(),
                t0.elapsed().as_millis()
            );
        }
        _ => {
            eprintln!(
                "usage: hf-load conns ADDR N | churn ADDR N | trickle ADDR MS | churn-for ADDR SECONDS | procs N Z | get ADDR | get-unix PATH | ipc-idle SOCKET N | ipc-flows SOCKET N | squat PATH | tcp-idle ADDR N | chatter ADDR | flood ADDR N SECONDS"
            );
            std::process::exit(2);
        }
    }
}
