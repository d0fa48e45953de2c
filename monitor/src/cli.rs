//! The `holdfast` command line: agent, status, flows, config check.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, Mode};
use crate::flows::FlowView;
use crate::ipc::{self, FlowFilter, Request, Status};
use crate::render;

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
    /// Show the agent's mode, versions and counters.
    Status {
        #[arg(long)]
        json: bool,
        /// For scripts and health checks: exit 1 when findings are active.
        #[arg(long)]
        check: bool,
    },
    /// Finding transitions and remedy outcomes (like journalctl; --follow streams them).
    Events {
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        json: bool,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only findings about this process.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Re-read the agent's configuration file (as SIGHUP does); needs root or the admin group.
    Reload,
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
    /// List tracked TCP flows.
    Flows {
        #[arg(long)]
        json: bool,
        /// Include listening sockets.
        #[arg(long)]
        all: bool,
        /// Only flows in this state (estab, close-wait, listen, ...).
        #[arg(long)]
        state: Option<String>,
        /// Only flows with this local or remote port.
        #[arg(long)]
        port: Option<u16>,
        /// Only flows owned by this process.
        #[arg(long)]
        pid: Option<u32>,
        /// Only flows of processes in this systemd unit.
        #[arg(long)]
        unit: Option<String>,
        /// Only flows at risk of NAT / load-balancer eviction.
        #[arg(long)]
        at_risk: bool,
        /// Only leaked sessions (half-open, or stuck in CLOSE_WAIT / FIN_WAIT2 / LAST_ACK).
        #[arg(long)]
        leaked: bool,
        /// Only flows idle at least this long (350s, 5m, 2h).
        #[arg(long, value_name = "DURATION", value_parser = parse_human_duration)]
        idle_over: Option<std::time::Duration>,
    },
    /// The session ledger: per service opened, closed, live, leaked, limit and time to exhaustion.
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
        action: RemedyCmd,
    },
    /// Processes with findings: parents of zombie children, with diagnosis and nudges.
    Procs {
        #[arg(long)]
        json: bool,
        /// Only parents of zombies (today the only process findings).
        #[arg(long)]
        zombies: bool,
    },
    /// Findings (active; --all adds recently resolved ones).
    Findings {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        all: bool,
        /// Only this kind (zombie, ...).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Explain what holdfast knows about a process (and the findings about it).
    Explain {
        /// A pid.
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Time one full read of the kernel's views here, as the agent does it (prints JSON).
    Probe {
        #[command(subcommand)]
        what: ProbeCmd,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProbeCmd {
    /// The whole TCP table with tcp_info (and owners with --owners).
    Snapshot {
        #[arg(long, value_enum, default_value = "poll")]
        mode: Mode,
        #[arg(long)]
        owners: bool,
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// eBPF: also time kernel-filtered reads (the steady-state at-risk read) with this
        /// idle threshold in milliseconds.
        #[arg(long)]
        filtered_ms: Option<u64>,
    },
    /// The /proc zombie scan of poll mode.
    Procs {
        #[arg(long, default_value_t = 3)]
        repeat: u32,
    },
}

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

fn parse_human_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::human::parse_duration(s)
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate a configuration file and print the effective values.
    Check { file: PathBuf },
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd the agent's own logs go to journald natively, with their fields.
    let under_systemd =
        std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    if under_systemd {
        if let Some(j) = crate::journal::Journal::open(std::path::Path::new(crate::journal::SOCKET)) {
            tracing_subscriber::registry()
                .with(filter)
                .with(crate::journal::JournalLayer::new(j))
                .init();
            return;
        }
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

fn query<T: serde::de::DeserializeOwned>(socket: &std::path::Path, req: Request) -> Result<T, ExitCode> {
    match ipc::call(socket, &req) {
        Ok(v) => serde_json::from_value(v).map_err(|e| {
            eprintln!("holdfast: unreadable reply from the agent: {e}");
            ExitCode::from(1)
        }),
        Err(e) => {
            eprintln!("holdfast: {e}");
            Err(ExitCode::from(e.exit_code() as u8))
        }
    }
}

fn json_out<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Agent { .. } | Cmd::Events { .. }) {
        crate::sys::default_sigpipe();
    }
    let socket_override = cli.socket.clone();
    let socket = cli.socket.unwrap_or_else(|| config::DEFAULT_SOCKET.into());
    let result: Result<(), ExitCode> = match cli.cmd {
        Cmd::Agent { config, mode } => {
            init_logging();
            let explicit = config.is_some();
            let path = config.unwrap_or_else(|| config::DEFAULT_PATH.into());
            match Config::load(&path, explicit) {
                Err(e) => {
                    eprintln!("holdfast: {e}");
                    Err(ExitCode::from(2))
                }
                Ok((mut cfg, found)) => {
                    if let Some(m) = mode {
                        cfg.agent.mode = m;
                    }
                    if let Some(s) = socket_override {
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
            }
        }
        Cmd::Status { json, check } => match query::<Status>(&socket, Request::Status) {
            Ok(s) => {
                if json { json_out(&s) } else { print!("{}", render::status(&s)) }
                if check && s.findings_active > 0 { Err(ExitCode::from(1)) } else { Ok(()) }
            }
            Err(c) => Err(c),
        },
        Cmd::Events { follow, json, kind, pid } => {
            let keep = |n: &serde_json::Value| {
                kind.as_ref().is_none_or(|k| n["kind"] == k.as_str()) && pid.is_none_or(|p| n["pid"] == p)
            };
            let show = |n: &serde_json::Value| {
                if json {
                    println!("{n}");
                } else {
                    println!("{}", render::notice(n));
                }
            };
            if follow {
                crate::ipc::follow(&socket, |n| {
                    if keep(&n) {
                        show(&n);
                    }
                })
                .map_err(|e| {
                    eprintln!("holdfast: {e}");
                    ExitCode::from(e.exit_code() as u8)
                })
            } else {
                query::<Vec<serde_json::Value>>(&socket, Request::Events { follow: false })
                    .map(|v| v.iter().filter(|n| keep(n)).for_each(show))
            }
        }
        Cmd::Reload => query::<serde_json::Value>(&socket, Request::Reload)
            .map(|v| println!("reloaded {}", v["reloaded"].as_str().unwrap_or(""))),
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
        Cmd::Probe { what } => {
            let r = match what {
                ProbeCmd::Snapshot { mode, owners, repeat, filtered_ms } => {
                    crate::probe::snapshot(if mode == Mode::Ebpf { "ebpf" } else { "poll" }, owners, repeat, filtered_ms)
                }
                ProbeCmd::Procs { repeat } => Ok(crate::probe::procs(repeat)),
            };
            match r {
                Ok(v) => {
                    println!("{v}");
                    Ok(())
                }
                Err(e) => {
                    eprintln!("holdfast: {e}");
                    Err(ExitCode::from(1))
                }
            }
        }
        Cmd::Ledger { json } => query::<Vec<crate::ledger::LedgerRow>>(&socket, Request::Ledger).map(|v| {
            if json { json_out(&v) } else { print!("{}", render::ledger(&v)) }
        }),
        Cmd::Profiles { json } => query::<Vec<crate::profiles::Profile>>(&socket, Request::Profiles).map(|v| {
            if json { json_out(&v) } else { print!("{}", render::profiles(&v)) }
        }),
        Cmd::Remedy { action: RemedyCmd::Keepalive { flow, dry_run, json } } => {
            query::<serde_json::Value>(&socket, Request::Remedy { action: "keepalive".into(), target: flow, dry_run }).map(|v| {
                if json {
                    json_out(&v)
                } else if let Some(p) = v.get("planned") {
                    println!("would set SO_KEEPALIVE=1 TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={} (dry-run)", p["idle_s"], p["intvl_s"], p["cnt"]);
                } else {
                    let q = &v["queued"];
                    println!(
                        "queued: SO_KEEPALIVE=1 TCP_KEEPIDLE={} TCP_KEEPINTVL={} TCP_KEEPCNT={}; see `holdfast explain cookie:{}`",
                        q["idle_s"], q["intvl_s"], q["cnt"], v["cookie"]
                    );
                }
            })
        }
        Cmd::Flows {
            json,
            all,
            state,
            port,
            pid,
            at_risk,
            idle_over,
            leaked,
            unit,
        } => {
            let filter = FlowFilter { all, state, port, pid, at_risk, idle_over_ms: idle_over.map(|d| d.as_millis() as u64), leaked, unit };
            query::<Vec<FlowView>>(&socket, Request::Flows { filter }).map(|v| {
                if json {
                    json_out(&v)
                } else {
                    print!("{}", render::flows(&v))
                }
            })
        }
        Cmd::Procs { json, zombies } => query::<Vec<serde_json::Value>>(&socket, Request::Procs { zombies })
            .map(|v| {
                if json {
                    json_out(&v)
                } else {
                    print!("{}", render::procs(&v))
                }
            }),
        Cmd::Findings { json, all, kind } => {
            query::<Vec<serde_json::Value>>(&socket, Request::Findings { all, kind }).map(|v| {
                if json {
                    json_out(&v)
                } else {
                    print!("{}", render::findings(&v))
                }
            })
        }
        Cmd::Explain { target, json } => query::<serde_json::Value>(&socket, Request::Explain { target })
            .map(|v| {
                if json {
                    json_out(&v)
                } else {
                    print!("{}", render::explain(&v))
                }
            }),
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => match Config::load(&file, true) {
            Ok((cfg, _)) => {
                println!("{}: ok", file.display());
                println!("{cfg:#?}");
                Ok(())
            }
            Err(e) => {
                eprintln!("holdfast: {e}");
                Err(ExitCode::from(1))
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(c) => c,
    }
}
