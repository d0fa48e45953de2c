//! What one local user's queries may cost the agent. Every user but root (and the agent's own
//! uid) has a share of one core for the time the agent spends answering it (QUERY_SHARE, with a
//! burst of BURST): its queries run one at a time, each is charged what it took, and a user whose
//! credit is spent waits for it to come back (its query then answers from the table, without a
//! fresh read of the kernel, and says so); a wait longer than MAX_WAIT is refused with the time to
//! come back. So sixteen connections of one user looping `flows --all --fresh` cost the agent what
//! one does, and that is at most QUERY_SHARE of a core.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::OwnedMutexGuard;

/// The share of one core one user's queries may take, over time.
pub const QUERY_SHARE: f64 = 0.05;
/// The credit a user starts with and may save up (seconds of the agent's time).
const BURST: f64 = 2.0;
/// A user who would have to wait longer than this for credit is refused instead.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// One user's credit, in seconds of the agent's time.
#[derive(Debug)]
struct Bucket {
    credit: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.credit = (self.credit + dt * QUERY_SHARE).min(BURST);
        self.at = now;
    }
}

/// The budgets of every user who has asked.
#[derive(Default)]
pub struct Budgets {
    users: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<Bucket>>>>,
}

/// Leave to run one query; charge it with [`Ticket::charge`].
pub struct Ticket {
    bucket: OwnedMutexGuard<Bucket>,
    /// Over budget: answer from the table (no fresh read) and say so.
    pub note: Option<String>,
}

impl Ticket {
    /// Charges what the query took.
    pub fn charge(mut self, cost: Duration) {
        self.bucket.credit -= cost.as_secs_f64();
    }
}

impl Budgets {
    /// Waits for this user's previous query to end and for credit; Err: the refusal to send.
    pub async fn admit(&self, uid: u32) -> Result<Ticket, String> {
        let user = {
            let mut m = self
                .users
                .lock()
                .map_err(|_| "internal: budget lock poisoned".to_string())?;
            m.entry(uid)
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Mutex::new(Bucket {
                        credit: BURST,
                        at: Instant::now(),
                    }))
                })
                .clone()
        };
        let mut bucket = user.lock_owned().await;
        bucket.refill(Instant::now());
        if bucket.credit > 0.0 {
            return Ok(Ticket { bucket, note: None });
        }
        let wait = Duration::from_secs_f64(-bucket.credit / QUERY_SHARE);
        if wait > MAX_WAIT {
            return Err(format!(
                "uid {uid}'s queries have used their share of the agent's time ({:.0} % of a core): try again in {}s",
                QUERY_SHARE * 100.0,
                wait.as_secs() + 1
            ));
        }
        tokio::time::sleep(wait).await;
        bucket.refill(Instant::now());
        Ok(Ticket {
            bucket,
            note: Some(format!(
                "uid {uid}'s queries are over their share of the agent's time ({:.0} % of a core): this one waited {} ms and was answered from the agent's table, without a fresh read",
                QUERY_SHARE * 100.0,
                wait.as_millis()
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_user_over_its_share_waits_then_is_refused_and_users_do_not_share() {
        let b = Budgets::default();
        // The burst: 2 s of queries go through at once.
        let t = b.admit(1000).await.unwrap();
        assert!(t.note.is_none());
        t.charge(Duration::from_millis(2100));
        // 0.1 s in debt: the next one waits 2 s (0.1 / 0.05) and says so.
        let t0 = tokio::time::Instant::now();
        let t = b.admit(1000).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
        let note = t.note.clone().unwrap();
        assert!(
            note.contains("without a fresh read") && note.contains("5 % of a core"),
            "{note}"
        );
        t.charge(Duration::from_secs(1));
        // 1 s in debt: 20 s to wait is more than a client should: refused, with when to return.
        let e = b.admit(1000).await.err().unwrap();
        assert!(e.contains("try again in 21s"), "{e}");
        // Another user is not charged for the first one's queries.
        assert!(b.admit(1001).await.unwrap().note.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn one_query_at_a_time_per_user() {
        let b = Arc::new(Budgets::default());
        let first = b.admit(7).await.unwrap();
        let b2 = b.clone();
        let second = tokio::spawn(async move { b2.admit(7).await.map(|t| t.note.is_none()) });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "the second query waits for the first");
        first.charge(Duration::from_millis(10));
        assert_eq!(second.await.unwrap(), Ok(true));
    }
}
