//! Announcing changes: every finding transition and remedy outcome becomes one log line, one
//! journal entry, one `events` line and one metrics count. Owned by the main loop, outside State.
use std::collections::{BTreeMap, VecDeque};

use tracing::{info, warn};

use crate::findings::{Change, FindingStore};
use crate::model::finding::Transition;
use crate::sinks::{Notice, journal::Journal, journal_fields, notice};

/// Notices kept for `holdfast events` without --follow.
const RECENT: usize = 200;

pub struct Sinks {
    pub journal: Option<Journal>,
    journal_failed: bool,
    /// Each notice as sent to `events --follow` readers (shared: the channel's 1024 slots hold a
    /// pointer each, 50 KB where 1024 notices in place were 390 KB of an idle agent, heaptrack).
    pub notices: tokio::sync::broadcast::Sender<std::sync::Arc<Notice>>,
    pub recent: VecDeque<Notice>,
    /// Remedy outcomes by (kind, action, outcome class), for metrics.
    pub remedies: BTreeMap<(String, String, String), u64>,
}

impl Sinks {
    pub fn new(journal: Option<Journal>) -> Self {
        let (notices, _) = tokio::sync::broadcast::channel(1024);
        Sinks {
            journal,
            journal_failed: false,
            notices,
            recent: VecDeque::new(),
            remedies: BTreeMap::new(),
        }
    }

    pub fn publish(&mut self, store: &FindingStore, changes: Vec<Change>) {
        for (id, t) in changes {
            let Some(f) = store.get(id) else { continue };
            let n = notice(f, t);
            if let Some(j) = &self.journal
                && let Err(e) = j.send(&journal_fields(&n))
                && !self.journal_failed
            {
                warn!("writing to journald failed (reported once): {e}");
                self.journal_failed = true;
            }
            if let (Some(a), Some(c)) = (n.action, n.outcome_class()) {
                *self
                    .remedies
                    .entry((n.kind.as_str().into(), a.as_str().into(), c.as_str().into()))
                    .or_default() += 1;
            }
            match t {
                Transition::Action => {
                    if let Some(a) = f.actions.last() {
                        info!(kind = %f.kind, finding = id, subject = %f.subject, action = a.action.as_str(),
                              mode = a.mode.as_str(), outcome = %a.outcome, class = a.outcome.class().as_str(),
                              "remedy {}: {}", a.action.as_str(), a.outcome);
                    }
                }
                Transition::Resolved => info!(
                    kind = %f.kind, finding = id, transition = "resolved", subject = %f.subject,
                    "resolved: {}", f.resolution.as_deref().unwrap_or("")
                ),
                _ => {
                    warn!(kind = %f.kind, finding = id, transition = t.as_str(), subject = %f.subject, "{}", f.summary)
                }
            }
            self.recent.push_back(n.clone());
            if self.recent.len() > RECENT {
                self.recent.pop_front();
            }
            let _ = self.notices.send(std::sync::Arc::new(n));
        }
    }
}
