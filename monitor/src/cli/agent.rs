//! `holdfast agent`: logging set up for a terminal or for systemd, the configuration loaded, and
//! the agent run in the foreground.
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, Config, Mode};

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd the agent's own logs go to journald natively, with their fields.
    let under_systemd =
        std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    if under_systemd
        && let Some(j) =
            crate::sinks::journal::Journal::open(std::path::Path::new(crate::sinks::journal::SOCKET))
    {
        tracing_subscriber::registry()
            .with(filter)
            .with(crate::sinks::journal::JournalLayer::new(j))
            .init();
        return;
    }
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if under_systemd {
        b.without_time().with_ansi(false).init();
    } else {
        b.init();
    }
}

pub fn run(config: Option<PathBuf>, mode: Option<Mode>, socket: Option<PathBuf>) -> Result<(), ExitCode> {
    init_logging();
    let explicit = config.is_some();
    let path = config.unwrap_or_else(|| config::DEFAULT_PATH.into());
    let (mut cfg, found) = Config::load(&path, explicit).map_err(|e| {
        eprintln!("holdfast: {e}");
        ExitCode::from(2)
    })?;
    if let Some(m) = mode {
        cfg.agent.mode = m;
    }
    if let Some(s) = socket {
        cfg.agent.socket = s;
    }
    let desc = if found {
        path.display().to_string()
    } else {
        format!("defaults ({} not found)", path.display())
    };
    crate::agent::run(cfg, desc, found.then(|| path.clone())).map_err(|e| {
        tracing::error!("{e:#}");
        ExitCode::from(1)
    })
}
