//! What the host's own flows teach about each path's idle timeout (issue 14, passive learning).
//!
//! A path is a network namespace + gateway + destination prefix (/24 for IPv4, /48 for IPv6).
//! Evidence per path: idles after which a flow broke (it sent after idling X, and the send was
//! never answered: retransmits, then RST or ETIMEDOUT) are upper bounds; idles a flow survived
//! (it idled Y, then an ACK came) are lower bounds. Once `min_evictions` breaks agree with every
//! survivor, the path's timeout is learned, conservatively: the longest idle that survived, or
//! three quarters of the shortest that broke while nothing survived close to it. Contradictory
//! evidence (a flow survived longer than one broke) keeps the default and says why.
//!
//! The book is bounded (MAX_PATHS, the least recently updated path goes first) and persisted as
//! JSON under the agent's state directory, so it survives restarts.
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::time::fmt_ms;

/// Paths remembered at most.
pub const MAX_PATHS: usize = 4096;
/// Breaks remembered per path (the most recent).
const MAX_BREAKS: usize = 16;
/// Idles shorter than this teach nothing about middleboxes.
pub const MIN_EVIDENCE_MS: u64 = 2_000;
/// Idles longer than this are not evidence (no profile's timeout is longer than 30 days).
const MAX_EVIDENCE_MS: u64 = 30 * 86_400_000;
/// The state file is at most this large: MAX_PATHS paths of MAX_BREAKS breaks each, pretty
/// printed, are about 4 MB.
const MAX_FILE: u64 = 8 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PathKey {
    /// The namespace's name (`host` for the agent's own, the `ip netns` name, ...).
    pub netns: String,
    pub gateway: String,
    /// The destination prefix, e.g. 10.77.2.0/24.
    pub prefix: String,
}

impl std::fmt::Display for PathKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {} in {}", self.prefix, self.gateway, self.netns)
    }
}

/// The destination prefix a path is kept for.
pub fn prefix_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Idles after which a flow broke (most recent last).
    pub broke_ms: Vec<u64>,
    /// The longest idle a flow survived, and how many survivals were seen.
    pub survived_max_ms: u64,
    pub survived: u64,
    /// Unix seconds of the last update (the least recent path is forgotten first).
    pub updated: u64,
    /// The last measurement by `holdfast discover`: (survived ms, broke ms, unix seconds).
    #[serde(default)]
    pub discovered: Option<(u64, u64, u64)>,
}

/// What the evidence says.
#[derive(Clone, Debug, PartialEq)]
pub enum Learned {
    /// The timeout to use, in ms, with the evidence in words.
    Timeout { ms: u64, evidence: String },
    /// Not (yet) a timeout: why.
    Not { reason: String },
}

impl Evidence {
    /// The evidence with every value a flow could have produced, or None when nothing is left.
    fn sane(mut self) -> Option<Evidence> {
        let ok = |ms: u64| (MIN_EVIDENCE_MS..=MAX_EVIDENCE_MS).contains(&ms);
        self.broke_ms.retain(|&ms| ok(ms));
        if self.broke_ms.len() > MAX_BREAKS {
            let extra = self.broke_ms.len() - MAX_BREAKS;
            self.broke_ms.drain(..extra);
        }
        if self.survived_max_ms != 0 && !ok(self.survived_max_ms) {
            self.survived_max_ms = 0;
            self.survived = 0;
        }
        if self.survived == 0 {
            self.survived_max_ms = 0;
        }
        if let Some((s, b, _)) = self.discovered
            && !(ok(s) && ok(b) && s < b)
        {
            self.discovered = None;
        }
        let empty = self.broke_ms.is_empty() && self.survived == 0 && self.discovered.is_none();
        (!empty).then_some(self)
    }

    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some((s, b, _)) = self.discovered {
            parts.push(format!(
                "discovered: survived {} idle, broke at {} (holdfast discover)",
                fmt_ms(s),
                fmt_ms(b)
            ));
        }
        if let Some(min) = self.broke_ms.iter().min() {
            parts.push(format!(
                "evicted after {} idle ({} flow{})",
                fmt_ms(*min),
                self.broke_ms.len(),
                if self.broke_ms.len() == 1 { "" } else { "s" }
            ));
        }
        if self.survived > 0 {
            parts.push(format!(
                "survived {} ({} flow{})",
                fmt_ms(self.survived_max_ms),
                self.survived,
                if self.survived == 1 { "" } else { "s" }
            ));
        }
        parts.join("; ")
    }

    pub fn learned(&self, min_evictions: usize) -> Learned {
        // A measurement is direct evidence: it wins over what flows suggested.
        if let Some((s, _, _)) = self.discovered {
            return Learned::Timeout {
                ms: s / 1000 * 1000,
                evidence: self.summary(),
            };
        }
        let Some(&min_broke) = self.broke_ms.iter().min() else {
            return Learned::Not {
                reason: format!("no eviction seen yet ({})", self.summary()),
            };
        };
        if self.survived > 0 && self.survived_max_ms >= min_broke {
            return Learned::Not {
                reason: format!(
                    "contradictory: a flow survived {} idle, longer than one that broke after {} (a peer that died, or a path that changed); the default applies",
                    fmt_ms(self.survived_max_ms),
                    fmt_ms(min_broke)
                ),
            };
        }
        if self.broke_ms.len() < min_evictions {
            return Learned::Not {
                reason: format!(
                    "{} eviction(s) seen, {min_evictions} needed ({})",
                    self.broke_ms.len(),
                    self.summary()
                ),
            };
        }
        let three_quarters = min_broke / 4 * 3;
        let ms = if self.survived > 0 {
            self.survived_max_ms.max(three_quarters)
        } else {
            three_quarters
        };
        Learned::Timeout {
            ms: ms / 1000 * 1000,
            evidence: self.summary(),
        }
    }
}

#[derive(Debug, Default)]
pub struct PathBook {
    paths: HashMap<PathKey, Evidence>,
    /// Changed since the last save.
    pub dirty: bool,
    /// Entries dropped at load because their evidence made no sense.
    dropped: usize,
}

/// Why the state file was not loaded.
#[derive(Debug)]
pub struct LoadError {
    pub msg: String,
    /// The file is ours but its content is bad (it may be moved aside); otherwise the file or
    /// its directory is not to be touched.
    pub content: bool,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    paths: Vec<(PathKey, Evidence)>,
}

impl PathBook {
    /// A flow on `key` broke after idling `idle_ms`.
    pub fn broke(&mut self, key: PathKey, idle_ms: u64, unix_s: u64) -> bool {
        if idle_ms < MIN_EVIDENCE_MS {
            return false;
        }
        let e = self.entry(key, unix_s);
        e.broke_ms.push(idle_ms);
        if e.broke_ms.len() > MAX_BREAKS {
            e.broke_ms.remove(0);
        }
        self.dirty = true;
        true
    }

    /// `holdfast discover` measured the path: a connection idle `survived_ms` was answered, one
    /// idle `broke_ms` was not.
    pub fn discovered(&mut self, key: PathKey, survived_ms: u64, broke_ms: u64, unix_s: u64) {
        let e = self.entry(key, unix_s);
        e.discovered = Some((survived_ms, broke_ms, unix_s));
        self.dirty = true;
    }

    /// A flow on `key` idled `idle_ms` and was answered afterwards.
    pub fn survived(&mut self, key: PathKey, idle_ms: u64, unix_s: u64) {
        if idle_ms < MIN_EVIDENCE_MS {
            return;
        }
        let e = self.entry(key, unix_s);
        e.survived += 1;
        if idle_ms > e.survived_max_ms {
            e.survived_max_ms = idle_ms;
            self.dirty = true;
        }
    }

    fn entry(&mut self, key: PathKey, unix_s: u64) -> &mut Evidence {
        if !self.paths.contains_key(&key)
            && self.paths.len() >= MAX_PATHS
            && let Some(oldest) = self
                .paths
                .iter()
                .min_by_key(|(_, e)| e.updated)
                .map(|(k, _)| k.clone())
        {
            self.paths.remove(&oldest);
        }
        let e = self.paths.entry(key).or_default();
        e.updated = unix_s;
        e
    }

    pub fn get(&self, key: &PathKey) -> Option<&Evidence> {
        self.paths.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PathKey, &Evidence)> {
        self.paths.iter()
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Reads the book; a missing file is an empty book, a bad one an error naming it. Root
    /// reads it, so the file must be a regular file (never followed through a symlink, opened
    /// without blocking) of at most MAX_FILE bytes in a directory only root can change; evidence
    /// that no flow could have produced (an idle under MIN_EVIDENCE_MS or over MAX_EVIDENCE_MS, a
    /// measurement that survived longer than it broke) is dropped and counted in `dropped`.
    pub fn load(file: &Path) -> Result<PathBook, LoadError> {
        let refused = |msg: String| LoadError { msg, content: false };
        use crate::config::trust;
        let text = match trust::read_regular(file, MAX_FILE, true) {
            Ok(t) => t,
            Err(trust::OpenError::NotFound) => return Ok(PathBook::default()),
            Err(e) => return Err(refused(format!("{}: {e}", file.display()))),
        };
        if let Some(dir) = file.parent() {
            trust::check_chain(dir)
                .map_err(|u| refused(format!("the state directory is not root's alone: {u}")))?;
        }
        let d: OnDisk = serde_json::from_str(&text).map_err(|e| LoadError {
            msg: format!(
                "{}: not a learned-paths file ({e}); move it away to start learning afresh",
                file.display()
            ),
            content: true,
        })?;
        let total = d.paths.len();
        let mut paths: HashMap<PathKey, Evidence> = d
            .paths
            .into_iter()
            .filter_map(|(k, e)| Some((k, e.sane()?)))
            .collect();
        let dropped = total - paths.len();
        if paths.len() > MAX_PATHS {
            let mut v: Vec<_> = paths.into_iter().collect();
            v.sort_by_key(|(_, e)| std::cmp::Reverse(e.updated));
            v.truncate(MAX_PATHS);
            paths = v.into_iter().collect();
        }
        Ok(PathBook {
            paths,
            dirty: false,
            dropped,
        })
    }

    /// Entries of the last load whose evidence made no sense (dropped).
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Writes the book atomically: a new temporary file (created exclusively, never through a
    /// symlink) renamed over the old one, in a directory only root can change.
    pub fn save(&mut self, file: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let mut v: Vec<(PathKey, Evidence)> =
            self.paths.iter().map(|(k, e)| (k.clone(), e.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let d = OnDisk { version: 1, paths: v };
        let text = serde_json::to_string_pretty(&d).map_err(|e| e.to_string())?;
        let dir = file
            .parent()
            .ok_or_else(|| format!("{}: no directory", file.display()))?;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        crate::config::trust::check_chain(dir).map_err(|u| {
            format!("refusing to write the learnt paths: the state directory is not root's alone: {u}")
        })?;
        let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
        // A leftover of ours (a crash between create and rename) goes; nobody else can write here.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        let written = f.write_all(text.as_bytes()).and_then(|_| f.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("{}: {e}", tmp.display()));
        }
        std::fs::rename(&tmp, file).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", file.display())
        })?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PathKey {
        PathKey {
            netns: "blue".into(),
            gateway: "10.77.1.1".into(),
            prefix: prefix_of("10.77.2.2".parse().unwrap()),
        }
    }

    #[test]
    fn two_evictions_teach_a_conservative_timeout() {
        let mut b = PathBook::default();
        assert_eq!(key().prefix, "10.77.2.0/24");
        assert!(b.broke(key(), 25_000, 1));
        let e = b.get(&key()).unwrap();
        assert!(
            matches!(e.learned(2), Learned::Not { .. }),
            "one eviction is not enough"
        );
        b.broke(key(), 26_000, 2);
        let Learned::Timeout { ms, evidence } = b.get(&key()).unwrap().learned(2) else {
            panic!("learned")
        };
        assert_eq!(ms, 18_000, "three quarters of the shortest break");
        assert_eq!(evidence, "evicted after 25s idle (2 flows)");
        // A survivor narrows it from below.
        b.survived(key(), 19_500, 3);
        let Learned::Timeout { ms, evidence } = b.get(&key()).unwrap().learned(2) else {
            panic!()
        };
        assert_eq!(ms, 19_000);
        assert!(evidence.contains("survived 19s (1 flow)"), "{evidence}");
    }

    #[test]
    fn a_measurement_wins_over_passive_evidence() {
        let mut b = PathBook::default();
        b.broke(key(), 40_000, 1);
        b.discovered(key(), 18_500, 20_250, 2);
        let Learned::Timeout { ms, evidence } = b.get(&key()).unwrap().learned(2) else {
            panic!()
        };
        assert_eq!(ms, 18_000);
        assert!(evidence.starts_with("discovered: survived 1"), "{evidence}");
    }

    #[test]
    fn contradictory_evidence_keeps_the_default_and_says_why() {
        let mut b = PathBook::default();
        b.broke(key(), 20_000, 1);
        b.broke(key(), 21_000, 1);
        b.survived(key(), 30_000, 2);
        let Learned::Not { reason } = b.get(&key()).unwrap().learned(2) else {
            panic!()
        };
        assert!(
            reason.starts_with("contradictory: a flow survived 30s idle"),
            "{reason}"
        );
        // Short idles teach nothing.
        assert!(!b.broke(key(), 500, 3));
    }

    #[test]
    fn the_state_file_is_never_followed_and_nonsense_is_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hf-paths-sym-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let file = dir.join("learned.json");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // A planted temporary file name and a planted state file: neither is followed.
        std::os::unix::fs::symlink(
            &victim,
            file.with_extension(format!("tmp.{}", std::process::id())),
        )
        .unwrap();
        let mut b = PathBook::default();
        b.broke(key(), 25_000, 1);
        b.save(&file).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&file).unwrap().file_type().is_symlink());
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&victim, &file).unwrap();
        let e = PathBook::load(&file).unwrap_err().msg;
        assert!(e.contains("is a symlink"), "{e}");
        std::fs::remove_file(&file).unwrap();
        // A FIFO is refused without blocking.
        nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = PathBook::load(&file).unwrap_err().msg;
        assert!(e.contains("FIFO"), "{e}");
        std::fs::remove_file(&file).unwrap();
        // Oversized: refused by its size, not read.
        std::fs::write(&file, vec![b' '; MAX_FILE as usize + 1]).unwrap();
        let e = PathBook::load(&file).unwrap_err().msg;
        assert!(e.contains("bytes, more than"), "{e}");
        // Values no flow could produce are dropped and counted; sane ones stay.
        let bad = r#"{"version":1,"paths":[
            [{"netns":"host","gateway":"10.0.0.1","prefix":"10.1.0.0/24"},{"broke_ms":[0],"survived_max_ms":0,"survived":0,"updated":1}],
            [{"netns":"host","gateway":"10.0.0.1","prefix":"10.2.0.0/24"},{"broke_ms":[],"survived_max_ms":0,"survived":0,"updated":1,"discovered":[90000,1000,1]}],
            [{"netns":"host","gateway":"10.0.0.1","prefix":"10.3.0.0/24"},{"broke_ms":[0,30000],"survived_max_ms":0,"survived":0,"updated":1}]
        ]}"#;
        std::fs::write(&file, bad).unwrap();
        let b = PathBook::load(&file).unwrap();
        assert_eq!((b.len(), b.dropped()), (1, 2));
        let (_, e) = b.iter().next().unwrap();
        assert_eq!(e.broke_ms, [30_000]);
        // A state directory others can write is refused for reading and writing.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = PathBook::load(&file).unwrap_err().msg;
        assert!(e.contains("not root's alone"), "{e}");
        assert!(PathBook::default().save(&file).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_book_survives_a_restart_and_stays_bounded() {
        let dir = std::env::temp_dir().join(format!("hf-paths-{}", std::process::id()));
        let file = dir.join("learned.json");
        let mut b = PathBook::default();
        b.broke(key(), 25_000, 1);
        b.survived(key(), 10_000, 1);
        b.save(&file).unwrap();
        let back = PathBook::load(&file).unwrap();
        assert_eq!(back.get(&key()), b.get(&key()));
        std::fs::write(&file, "{not json").unwrap();
        let e = PathBook::load(&file).unwrap_err().msg;
        assert!(
            e.contains("not a learned-paths file") && e.contains("move it away"),
            "{e}"
        );
        assert!(PathBook::load(&dir.join("missing.json")).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
        let mut b = PathBook::default();
        for i in 0..(MAX_PATHS as u64 + 10) {
            let mut k = key();
            k.prefix = format!("10.{}.{}.0/24", i / 256, i % 256);
            b.broke(k, 10_000, i);
        }
        assert_eq!(b.len(), MAX_PATHS);
    }
}
