//! The native journald protocol: one datagram per entry to /run/systemd/journal/socket, fields
//! as `KEY=value` lines (or `KEY\n<le64 length><value>\n` when the value has a newline).
//! Finding transitions and remedy outcomes are written here with structured fields; the agent's
//! own logs too when it runs under systemd.
use std::os::unix::net::UnixDatagram;
use std::path::Path;

pub const SOCKET: &str = "/run/systemd/journal/socket";

/// Serializes fields in the journal's native format. Keys must be uppercase ASCII, digits and
/// underscores, not starting with an underscore; other keys are dropped.
pub fn encode(fields: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    for (k, v) in fields {
        let valid = !k.is_empty()
            && !k.starts_with('_')
            && k.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        if v.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        } else {
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

/// A connection to journald, if it runs.
pub struct Journal {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl Journal {
    /// Opens the journal if journald listens at `path` (a socket file left by a journald that is
    /// gone refuses the connection: None).
    pub fn open(path: &Path) -> Option<Self> {
        UnixDatagram::unbound().ok()?.connect(path).ok()?;
        let sock = UnixDatagram::unbound().ok()?;
        Some(Journal {
            sock,
            path: path.to_path_buf(),
        })
    }

    /// Sends one entry; a failure is returned, never retried.
    pub fn send(&self, fields: &[(&str, String)]) -> std::io::Result<()> {
        let mut all: Vec<(&str, String)> = vec![("SYSLOG_IDENTIFIER", "holdfast".into())];
        all.extend(fields.iter().cloned());
        self.sock.send_to(&encode(&all), &self.path).map(|_| ())
    }
}

/// A tracing layer writing the agent's own logs to journald with their fields.
pub struct JournalLayer {
    journal: Journal,
}

impl JournalLayer {
    pub fn new(journal: Journal) -> Self {
        JournalLayer { journal }
    }
}

struct Visit(Vec<(String, String)>, String);

impl tracing::field::Visit for Visit {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.1 = format!("{value:?}");
        } else {
            self.0.push((
                format!("HOLDFAST_{}", field.name().to_ascii_uppercase()),
                format!("{value:?}"),
            ));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.1 = value.to_string();
        } else {
            self.0.push((
                format!("HOLDFAST_{}", field.name().to_ascii_uppercase()),
                value.to_string(),
            ));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut v = Visit(Vec::new(), String::new());
        event.record(&mut v);
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => "3",
            tracing::Level::WARN => "4",
            tracing::Level::INFO => "6",
            _ => "7",
        };
        let mut fields: Vec<(&str, String)> = vec![("MESSAGE", v.1.clone()), ("PRIORITY", priority.into())];
        fields.extend(v.0.iter().map(|(k, val)| (k.as_str(), val.clone())));
        let _ = self.journal.send(&fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_simple_and_multiline_values() {
        let b = encode(&[
            ("MESSAGE", "hi".into()),
            ("HOLDFAST_X", "a\nb".into()),
            ("bad key", "x".into()),
            ("_TRUSTED", "x".into()),
        ]);
        let mut want = b"MESSAGE=hi\nHOLDFAST_X\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(b, want);
    }

    #[test]
    fn sends_datagrams_to_a_socket() {
        let dir = std::env::temp_dir().join(format!("hf-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("socket");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let j = Journal::open(&path).unwrap();
        j.send(&[("MESSAGE", "x".into()), ("PRIORITY", "4".into())])
            .unwrap();
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"SYSLOG_IDENTIFIER=holdfast\nMESSAGE=x\nPRIORITY=4\n");
        assert!(Journal::open(&dir.join("missing")).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
