//! Reading and validating a configuration file. Every error names the file, the line, the key
//! and what was expected; nothing in a file can panic the agent or make it spin.
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::{Config, trust};

/// A configuration file larger than this is refused (the documented example is 4 KiB).
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("refusing config {path}: {reason}")]
    Untrusted { path: String, reason: String },
    #[error("{path}:{line}: key `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

/// Finds the dotted key a byte offset of the file belongs to: the nearest `[table]` above and
/// the `key =` of that line.
fn key_at(text: &str, offset: usize) -> (usize, String) {
    let line_no = text[..offset.min(text.len())].matches('\n').count() + 1;
    let mut table = String::new();
    let mut key = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            if i + 1 == line_no {
                key = table.clone();
            }
        }
        if i + 1 == line_no {
            if let Some((k, _)) = t.split_once('=') {
                let k = k.trim();
                key = if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                };
            }
            break;
        }
    }
    (line_no, key)
}

/// The line of `key` in table `table` (its `index`-th instance for an array of tables), else the
/// table's header line, else 1.
fn locate(text: &str, table: &str, index: Option<usize>, key: &str) -> usize {
    let mut current = String::new();
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut header = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let n = seen.entry(name.trim().to_string()).or_insert(0);
            current = format!("{}#{}", name.trim(), *n);
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            current = name.trim().to_string();
        } else {
            let in_table = match index {
                Some(ix) => current == format!("{table}#{ix}"),
                None => current == table,
            };
            if in_table && t.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
                return i + 1;
            }
            continue;
        }
        let wanted = match index {
            Some(ix) => current == format!("{table}#{ix}"),
            None => current == table,
        };
        if wanted && header.is_none() {
            header = Some(i + 1);
        }
    }
    header.unwrap_or(1)
}

impl Config {
    /// Parses config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, key) = e
                .span()
                .map(|s| key_at(text, s.start))
                .unwrap_or((1, String::new()));
            ConfigError::Invalid {
                path: path.into(),
                line,
                key,
                message: e.message().trim().to_string(),
            }
        })?;
        cfg.validate().map_err(|b| {
            let dotted = match b.index {
                Some(i) => format!("{}[{i}].{}", b.table, b.key),
                None if b.key.is_empty() => b.table.to_string(),
                None => format!("{}.{}", b.table, b.key),
            };
            ConfigError::Invalid {
                path: path.into(),
                line: locate(text, b.table, b.index, b.key),
                key: dotted.trim_end_matches('.').to_string(),
                message: b.message,
            }
        })?;
        Ok(cfg)
    }

    /// Loads `path`; when `path` is the default and does not exist, the defaults apply. Root acts
    /// on what the file says, so the file and every directory above it must be root's and
    /// writable by nobody else, and so must every program it names for root to run (see
    /// `trust`); the file is opened without blocking and must be a regular file.
    pub fn load(path: &Path, explicit: bool) -> Result<(Self, bool), ConfigError> {
        let shown = path.display().to_string();
        let err = |reason: String| ConfigError::Read {
            path: shown.clone(),
            reason,
        };
        let too_large = || {
            err(format!(
                "larger than {} KiB; this is not a holdfast configuration",
                MAX_FILE >> 10
            ))
        };
        let text = match trust::read_regular(path, MAX_FILE, false) {
            Ok(t) => t,
            Err(trust::OpenError::NotFound) if !explicit => return Ok((Self::default(), false)),
            Err(trust::OpenError::NotFound) => return Err(err("does not exist".into())),
            Err(trust::OpenError::TooLarge { .. }) => return Err(too_large()),
            Err(trust::OpenError::Refused(r)) => return Err(err(r)),
        };
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        trust::check_chain(&path).map_err(|u| ConfigError::Untrusted {
            path: shown.clone(),
            reason: u.to_string(),
        })?;
        let cfg = Self::parse(&text, &shown)?;
        cfg.check_host(&text, &shown)?;
        Ok((cfg, true))
    }

    /// What a valid file names on this host: programs root would run, and paths the agent
    /// would create or replace.
    fn check_host(&self, text: &str, shown: &str) -> Result<(), ConfigError> {
        let invalid = |table: &'static str, index: Option<usize>, key: &'static str, message: String| {
            let dotted = match index {
                Some(i) => format!("{table}[{i}].{key}"),
                None => format!("{table}.{key}"),
            };
            ConfigError::Invalid {
                path: shown.into(),
                line: locate(text, table, index, key),
                key: dotted,
                message,
            }
        };
        for (i, sv) in self.services.iter().enumerate() {
            if let Some(prog) = sv.restart_command.as_ref().and_then(|c| c.first()) {
                trust::check_executable(Path::new(prog)).map_err(|u| {
                    invalid(
                        "services",
                        Some(i),
                        "restart_command",
                        format!("root would run {prog}, refused: {u}"),
                    )
                })?;
            }
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.agent.socket)
            && !m.file_type().is_socket()
        {
            return Err(invalid(
                "agent",
                None,
                "socket",
                format!(
                    "{} exists and is {}: the agent would have to replace it; give a path of its own (e.g. /run/holdfast/holdfast.sock)",
                    self.agent.socket.display(),
                    trust::type_name(&m)
                ),
            ));
        }
        // A directory is an operator's slip; anything else that is not the agent's file (a
        // symlink, a FIFO) is refused when the agent reads it, which it survives.
        if let Ok(m) = std::fs::symlink_metadata(&self.learning.state_file)
            && m.is_dir()
        {
            return Err(invalid(
                "learning",
                None,
                "state_file",
                format!(
                    "{} is {}; give the file's path, e.g. /var/lib/holdfast/learned-paths.json",
                    self.learning.state_file.display(),
                    trust::type_name(&m)
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
