//! The engine's notion of time for deadlines. Production uses the system clock; tests
//! inject a [`ManualClock`] and move it forward instead of waiting.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::Timestamp;

#[async_trait]
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// Returns once `now() >= at`.
    async fn sleep_until(&self, at: Timestamp);
}

/// Wall-clock time.
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    async fn sleep_until(&self, at: Timestamp) {
        let wait = at.millis().saturating_sub(Timestamp::now().millis());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
        }
    }
}

/// A clock that only moves when told to (tests). Starts at the wall-clock time.
pub struct ManualClock {
    now: tokio::sync::watch::Sender<Timestamp>,
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            now: tokio::sync::watch::Sender::new(Timestamp::now()),
        })
    }

    /// Moves the clock forward by `by`, waking every sleeper whose instant has come.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.now.send_modify(|now| *now = now.plus_millis(by));
    }
}

#[async_trait]
impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.borrow()
    }

    async fn sleep_until(&self, at: Timestamp) {
        let mut changes = self.now.subscribe();
        while *changes.borrow_and_update() < at {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_only_when_moved_past_their_instant() {
        let clock = ManualClock::new();
        let at = clock.now().plus_millis(1_000);
        let sleeper = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.sleep_until(at).await })
        };
        tokio::task::yield_now().await;
        clock.advance(Duration::from_millis(999));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_millis(1));
        sleeper.await.unwrap();
        assert!(clock.now() >= at);
    }
}
