//! Findings: what holdfast concluded, with transitions (new, updated, resolved) and the actions
//! taken on each. Kinds are stable kebab-case ids with a fixed journald MESSAGE_ID.
use serde::{Deserialize, Serialize};

use crate::observe::Nanos;

/// Stable finding kinds and their MESSAGE_IDs (journald catalog ids).
pub const KINDS: &[(&str, &str)] = &[
    ("idle-near-eviction", "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f21"),
    ("keepalive-too-slow", "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f22"),
    ("likely-evicted", "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f23"),
    ("half-open", "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f24"),
    ("close-wait-leak", "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f25"),
    ("session-budget", "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f26"),
    ("zombie", "5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f27"),
];

pub fn message_id(kind: &str) -> Option<&'static str> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, id)| *id)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// One remedy attempt (or plan, in dry-run) and its result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub at_ms: u64,
    /// `sigchld`, `keepalive`, `close`
    pub action: String,
    /// `enforce` or `dry-run`
    pub mode: String,
    /// `planned`, `sent`, `reaped 2 of 2`, `refused: EPERM`, ...
    pub outcome: String,
    pub before: serde_json::Value,
    pub after: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub id: u64,
    pub kind: String,
    pub severity: Severity,
    /// What it is about, e.g. `pid 4242 (rdpsessmgr)`.
    pub subject: String,
    pub summary: String,
    pub active: bool,
    pub opened_ms: u64,
    pub updated_ms: u64,
    pub resolved_ms: Option<u64>,
    pub details: serde_json::Value,
    pub actions: Vec<ActionRecord>,
}

/// A change worth one log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    New,
    Updated,
    Resolved,
    Action,
}

impl Transition {
    pub fn as_str(&self) -> &'static str {
        match self {
            Transition::New => "new",
            Transition::Updated => "updated",
            Transition::Resolved => "resolved",
            Transition::Action => "action",
        }
    }
}

/// Active findings and the most recent resolved ones.
#[derive(Default)]
pub struct FindingStore {
    next_id: u64,
    pub items: Vec<Finding>,
}

/// Resolved findings kept for the CLI.
const KEEP_RESOLVED: usize = 200;

pub fn ms(ns: Nanos) -> u64 {
    ns / 1_000_000
}

impl FindingStore {
    pub fn open(
        &mut self,
        kind: &str,
        severity: Severity,
        subject: String,
        summary: String,
        details: serde_json::Value,
        now: Nanos,
    ) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.items.push(Finding {
            id,
            kind: kind.into(),
            severity,
            subject,
            summary,
            active: true,
            opened_ms: ms(now),
            updated_ms: ms(now),
            resolved_ms: None,
            details,
            actions: Vec::new(),
        });
        id
    }

    pub fn get(&self, id: u64) -> Option<&Finding> {
        self.items.iter().find(|f| f.id == id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Finding> {
        self.items.iter_mut().find(|f| f.id == id)
    }

    pub fn resolve(&mut self, id: u64, summary: String, now: Nanos) {
        if let Some(f) = self.get_mut(id) {
            f.active = false;
            f.resolved_ms = Some(ms(now));
            f.updated_ms = ms(now);
            f.summary = summary;
        }
        let resolved = self.items.iter().filter(|f| !f.active).count();
        if resolved > KEEP_RESOLVED {
            if let Some(pos) = self.items.iter().position(|f| !f.active) {
                self.items.remove(pos);
            }
        }
    }

    pub fn active(&self) -> impl Iterator<Item = &Finding> {
        self.items.iter().filter(|f| f.active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_unique_ids() {
        let mut ids: Vec<&str> = KINDS.iter().map(|(_, i)| *i).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), KINDS.len());
        assert!(
            ids.iter()
                .all(|i| i.len() == 32 && i.chars().all(|c| c.is_ascii_hexdigit()))
        );
        assert_eq!(message_id("zombie"), Some("5d0c1e4f8a2b4c7e9f1a3b5c7d9e0f27"));
    }

    #[test]
    fn the_shipped_catalog_explains_every_kind() {
        let cat = include_str!("../../packaging/holdfast.catalog");
        for (kind, id) in KINDS {
            assert!(
                cat.contains(&format!("-- {id}\nSubject: ")),
                "catalog entry for {kind}"
            );
        }
        for (kind, _) in KINDS {
            let page =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../docs/findings/{kind}.md"));
            assert!(page.exists(), "docs page for {kind}");
        }
    }

    #[test]
    fn open_resolve_and_bound_history() {
        let mut s = FindingStore::default();
        let id = s.open(
            "zombie",
            Severity::Warning,
            "pid 1".into(),
            "x".into(),
            serde_json::Value::Null,
            5_000_000,
        );
        assert_eq!(s.active().count(), 1);
        s.resolve(id, "gone".into(), 9_000_000);
        assert_eq!(s.active().count(), 0);
        assert_eq!(s.get(id).unwrap().resolved_ms, Some(9));
        for i in 0..(KEEP_RESOLVED as u64 + 10) {
            let id = s.open(
                "zombie",
                Severity::Info,
                format!("{i}"),
                String::new(),
                serde_json::Value::Null,
                0,
            );
            s.resolve(id, String::new(), 0);
        }
        assert_eq!(s.items.len(), KEEP_RESOLVED);
    }
}
