//! systemd's notify protocol (Type=notify): READY, STATUS and WATCHDOG datagrams to $NOTIFY_SOCKET.
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// Reads $NOTIFY_SOCKET (a path, or `@name` for the abstract namespace); nothing if unset.
    pub fn from_env() -> Self {
        let target = std::env::var("NOTIFY_SOCKET").ok().and_then(|s| {
            let addr = match s.strip_prefix('@') {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&s).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Notifier { target }
    }

    pub fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target {
            let _ = sock.send_to_addr(msg.as_bytes(), addr);
        }
    }
}

/// Half of $WATCHDOG_USEC, if systemd asked for keep-alives.
pub fn watchdog_interval() -> Option<Duration> {
    let us: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(us / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("hf-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let addr = std::os::unix::net::SocketAddr::from_pathname(&path).unwrap();
        let n = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), addr)),
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1");
        Notifier { target: None }.send("ignored");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
