//! Reading and validating a configuration file. Every error names the file, the line, the key
//! and what was expected; nothing in a file can panic the agent or make it spin.
use std::io::Read;
use std::path::Path;

use super::Config;

/// A configuration file larger than this is refused (the documented example is 4 KiB).
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: String, reason: String },
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

    /// Loads `path`; when `path` is the default and does not exist, the defaults apply.
    pub fn load(path: &Path, explicit: bool) -> Result<(Self, bool), ConfigError> {
        let shown = path.display().to_string();
        let err = |reason: String| ConfigError::Read {
            path: shown.clone(),
            reason,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok((Self::default(), false));
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        let mut text = String::new();
        file.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| err(format!("{e} (expected UTF-8 TOML)")))?;
        if text.len() as u64 > MAX_FILE {
            return Err(err(format!(
                "larger than {} KiB; this is not a holdfast configuration",
                MAX_FILE >> 10
            )));
        }
        Ok((Self::parse(&text, &shown)?, true))
    }
}

#[cfg(test)]
mod tests;
