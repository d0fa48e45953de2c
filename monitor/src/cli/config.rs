//! `holdfast config check FILE [--show]` and `holdfast reload`.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::query;
use crate::config::Config;
use crate::ipc::{ReloadReply, Request};

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate a configuration file (exit 2 if it is bad; --show prints the effective values).
    Check {
        file: PathBuf,
        /// Print the effective configuration (defaults filled in) as TOML.
        #[arg(long)]
        show: bool,
    },
}

pub fn run(cmd: ConfigCmd) -> Result<(), ExitCode> {
    match cmd {
        ConfigCmd::Check { file, show } => match Config::load(&file, true) {
            Ok((cfg, _)) => {
                if show {
                    print!("{}", cfg.to_toml());
                } else {
                    println!("{}: ok", file.display());
                }
                Ok(())
            }
            Err(e) => {
                eprintln!("holdfast: {e}");
                Err(ExitCode::from(2))
            }
        },
    }
}

pub fn reload(socket: &Path) -> Result<(), ExitCode> {
    let r: ReloadReply = query(socket, Request::Reload {})?;
    if r.restart_needed.is_empty() {
        println!("reloaded {}", r.config);
    } else {
        println!(
            "reloaded {} — but changes to {} take effect only after a restart (systemctl restart holdfast)",
            r.config,
            r.restart_needed.join(", ")
        );
    }
    Ok(())
}
