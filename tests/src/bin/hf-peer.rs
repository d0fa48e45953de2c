//! Test peer for the scenario tests: a TCP server or client driven by stdin lines.
//!
//! `hf-peer listen ADDR`  prints `listening ADDR`, accepts and holds connections; each
//!                        connection is closed when its peer closes (EOF); `quit` exits.
//! `hf-peer connect ADDR` prints `connected LOCAL`, then obeys `send`, `close`, `quit`.
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, addr) = match args.as_slice() {
        [_, m, a] => (m.as_str(), a.as_str()),
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
            let mut s = Some(TcpStream::connect(addr).expect("connect"));
            println!(
                "connected {}",
                s.as_ref().expect("stream").local_addr().expect("addr")
            );
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match line.trim() {
                    "send" => {
                        if let Some(st) = s.as_mut() {
                            let ok = st.write_all(b"ping").is_ok() && st.read(&mut [0u8; 4]).is_ok();
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
