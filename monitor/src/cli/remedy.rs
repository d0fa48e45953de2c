//! `holdfast remedy keepalive FLOW [--dry-run]`.
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use super::{json_out, query};
use crate::ipc::{RemedyReply, Request};

#[derive(Subcommand, Debug)]
pub enum RemedyCmd {
    /// Turn on keepalive (values from the flow's idle timeout) on a live socket.
    Keepalive {
        /// The flow: cookie:N or its local ADDR:PORT.
        flow: String,
        /// Show the values without changing anything.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(socket: &Path, cmd: RemedyCmd) -> Result<(), ExitCode> {
    let RemedyCmd::Keepalive { flow, dry_run, json } = cmd;
    let r: RemedyReply = query(
        socket,
        Request::Remedy {
            action: "keepalive".into(),
            target: flow,
            dry_run,
        },
    )?;
    if json {
        json_out(&r);
        return Ok(());
    }
    let v = r.values;
    if r.planned {
        println!(
            "would set SO_KEEPALIVE=1 TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={} (dry-run; {}s idle timeout of {})",
            v.idle_s, v.intvl_s, v.cnt, r.timeout_s, r.profile
        );
    } else {
        println!(
            "queued: SO_KEEPALIVE=1 TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={}; see `holdfast explain cookie:{}`",
            v.idle_s, v.intvl_s, v.cnt, r.cookie
        );
    }
    Ok(())
}
