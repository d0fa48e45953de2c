//! The `holdfast` command line: one module per command. Exit codes: 0 ok, 1 findings present
//! (`status --check`) or an error reply, 2 usage or configuration error, 3 agent unreachable.
mod agent;
mod config;
mod discover;
mod explain;
mod findings;
mod flows;
mod info;
mod probe;
mod remedy;
mod status;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Mode;
use crate::ipc::{Request, client};

#[derive(Parser, Debug)]
#[command(name = "holdfast", version, about = "Keeps long-lived TCP sessions and their processes healthy", long_about = None)]
pub struct Cli {
    /// The agent's CLI socket.
    #[arg(long, global = true, env = "HOLDFAST_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the agent in the foreground.
    Agent {
        /// Configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Override the config's agent.mode.
        #[arg(long, value_enum)]
        mode: Option<Mode>,
    },
    /// Show the agent's mode, kernel features, namespaces and counters.
    Status {
        #[arg(long)]
        json: bool,
        /// For scripts and health checks: exit 1 when findings are active.
        #[arg(long)]
        check: bool,
    },
    /// List tracked TCP flows.
    Flows(flows::Args),
    /// Findings (active; --all adds recently resolved ones).
    Findings {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        all: bool,
        /// Only this kind (zombie, half-open, ...).
        #[arg(long, value_parser = parse_kind)]
        kind: Option<crate::model::finding::FindingKind>,
    },
    /// Finding transitions and remedy outcomes (like journalctl; --follow streams them).
    Events {
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        json: bool,
        /// Only this kind.
        #[arg(long, value_parser = parse_kind)]
        kind: Option<crate::model::finding::FindingKind>,
        /// Only findings about this process.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Explain what holdfast knows about a process or a flow: `explain PID`, `explain cookie:N`,
    /// `explain ADDR:PORT` (a flow's local address) or `explain local ADDR:PORT`.
    Explain {
        #[arg(required = true, num_args = 1..=2, value_name = "TARGET")]
        target: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Processes with findings: parents of zombies, holders of dead sockets.
    Procs {
        #[arg(long)]
        json: bool,
        /// Only parents of zombies.
        #[arg(long)]
        zombies: bool,
    },
    /// The session ledger: per service live, leaked, held, limit and time to exhaustion.
    Ledger {
        #[arg(long)]
        json: bool,
    },
    /// The middlebox idle-timeout profiles (built-in and configured).
    Profiles {
        #[arg(long)]
        json: bool,
    },
    /// Apply a remedy by hand.
    Remedy {
        #[command(subcommand)]
        action: remedy::RemedyCmd,
    },
    /// Re-read the agent's configuration file (as SIGHUP does); needs root or the admin group.
    Reload,
    /// Measure a path's idle timeout with a few idle connections to HOST:PORT (no agent needed).
    Discover(discover::DiscoverArgs),
    /// Serve idle connections for `discover` on the far side: keep them open, echo what comes.
    Echo(discover::EchoArgs),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: config::ConfigCmd,
    },
    /// Time one full read of the kernel's views here, as the agent does it (prints JSON).
    Probe {
        #[command(subcommand)]
        what: probe::ProbeCmd,
    },
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

fn parse_kind(s: &str) -> Result<crate::model::finding::FindingKind, String> {
    crate::model::finding::FindingKind::parse(s)
}

pub fn parse_human_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::model::time::parse_duration(s)
}

/// Sends a request and decodes the typed reply, mapping failures to the exit codes.
pub fn query<T: serde::de::DeserializeOwned>(socket: &Path, req: Request) -> Result<T, ExitCode> {
    client::call(socket, &req).map_err(|e| {
        eprintln!("holdfast: {e}");
        ExitCode::from(e.exit_code())
    })
}

pub fn json_out<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Agent { .. } | Cmd::Events { .. }) {
        crate::kernel::sys::default_sigpipe();
    }
    let socket_override = cli.socket.clone();
    let socket = cli.socket.unwrap_or_else(|| crate::config::DEFAULT_SOCKET.into());
    let result: Result<(), ExitCode> = match cli.cmd {
        Cmd::Agent { config, mode } => agent::run(config, mode, socket_override),
        Cmd::Status { json, check } => status::run(&socket, json, check),
        Cmd::Flows(args) => flows::run(&socket, args),
        Cmd::Findings { json, all, kind } => findings::findings(&socket, json, all, kind),
        Cmd::Events {
            follow,
            json,
            kind,
            pid,
        } => findings::events(&socket, follow, json, kind, pid),
        Cmd::Explain { target, json } => explain::run(&socket, &target, json),
        Cmd::Procs { json, zombies } => info::procs(&socket, json, zombies),
        Cmd::Ledger { json } => info::ledger(&socket, json),
        Cmd::Profiles { json } => info::profiles(&socket, json),
        Cmd::Remedy { action } => remedy::run(&socket, action),
        Cmd::Reload => config::reload(&socket),
        Cmd::Config { cmd } => config::run(cmd),
        Cmd::Probe { what } => probe::run(what),
        Cmd::Discover(a) => discover::run(a, &socket),
        Cmd::Echo(a) => discover::echo(a),
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "holdfast", &mut out);
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &out);
            Ok(())
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            match clap_mangen::Man::new(cmd).render(&mut out) {
                Ok(()) => {
                    let _ = std::io::Write::write_all(&mut std::io::stdout(), &out);
                    Ok(())
                }
                Err(_) => Err(ExitCode::from(1)),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(c) => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent_and_rejects_bad_durations() {
        <Cli as clap::CommandFactory>::command().debug_assert();
        let e =
            Cli::try_parse_from(["holdfast", "flows", "--idle-over", "18446744073709551615s1s"]).unwrap_err();
        assert!(e.to_string().contains("maximum of 10 years"), "{e}");
        let e = Cli::try_parse_from(["holdfast", "findings", "--kind", "zombies"]).unwrap_err();
        assert!(e.to_string().contains("unknown finding kind"), "{e}");
        assert!(Cli::try_parse_from(["holdfast", "explain", "local", "10.0.0.1:5"]).is_ok());
    }
}
