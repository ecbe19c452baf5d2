//! Keeping the lease and writing the operation. Every write of a leased operation is
//! conditional on the version this replica holds and renews the lease; the only change
//! anyone else may make meanwhile is a cancel request, which is adopted. Anything else
//! means the lease is gone, and the running attempt is dropped at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::domain::{Operation, OperationStatus, StepStatus, Timestamp};
use crate::store::{StoreError, Write};

use super::super::StepCtx;
use super::{Engine, Interrupt, Run, backoff, millis};

/// Why a guarded wait or attempt was cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    LeaseLost,
    Shutdown,
    Cancelled,
    Deadline,
}

/// Writes to the store are retried quickly: the lease must never wait behind a long
/// backoff (a third of the lease passes between renewals).
const STORE_ATTEMPTS: u32 = 5;
const STORE_BACKOFF_BASE: Duration = Duration::from_millis(50);
const STORE_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// The pause before retrying a store write (at most a second).
pub(super) fn store_backoff(attempt: u32) -> Duration {
    backoff(STORE_BACKOFF_BASE, STORE_BACKOFF_CAP, attempt)
}

impl Engine {
    pub(super) async fn execute(self: Arc<Self>, run: Run, permit: OwnedSemaphorePermit) {
        let run = Arc::new(run);
        let renewal = tokio::spawn(self.clone().renew_lease(run.clone()));
        let outcome = self.drive(&run).await;
        renewal.abort();
        match outcome {
            Ok(()) => {}
            Err(Interrupt::LeaseLost) => {
                tracing::warn!("lease lost: another replica continues the operation")
            }
            Err(Interrupt::Shutdown) => {
                let released = self
                    .persist(&run, None, |op| {
                        if let Some(lease) = &mut op.lease {
                            lease.expires_at = Timestamp(0);
                        }
                    })
                    .await;
                tracing::info!(
                    released = released.is_ok(),
                    "shutting down: lease handed back"
                );
            }
            Err(Interrupt::StoreRejected(detail)) => self.give_up(&run, &detail).await,
        }
        drop(permit);
    }

    /// Renews the lease every third of its length. A lost renewal cancels `run.lost`, which
    /// drops whatever the run is doing; a cancel request seen on the way cancels `run.cancel`.
    async fn renew_lease(self: Arc<Self>, run: Arc<Run>) {
        let every = self.settings.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            // `persist` renews the lease with every write; this one changes nothing else.
            match self.persist(&run, None, |_| {}).await {
                Ok(()) => {}
                Err(interrupt) => {
                    tracing::warn!(?interrupt, "lease renewal failed");
                    run.lost.cancel();
                    return;
                }
            }
        }
    }

    /// Runs `work` unless the lease is lost, the replica shuts down, the operation is
    /// cancelled (when `cancellable`) or `deadline` passes first; `work` is dropped then.
    pub(super) async fn guarded<F: Future>(
        &self,
        run: &Run,
        deadline: Timestamp,
        cancellable: bool,
        work: F,
    ) -> Result<F::Output, Wake> {
        tokio::select! {
            biased;
            () = run.lost.cancelled() => Err(Wake::LeaseLost),
            () = run.shutdown.cancelled() => Err(Wake::Shutdown),
            () = run.cancel.cancelled(), if cancellable => Err(Wake::Cancelled),
            () = self.clock.sleep_until(deadline) => Err(Wake::Deadline),
            output = work => Ok(output),
        }
    }

    /// Writes a change of the operation (and optionally an event) conditionally on the
    /// version we hold, renewing the lease with it. The only change anyone else may make to
    /// a leased operation is a cancel request (with its event); that is adopted and the
    /// write retried. Any other lost condition means the lease is gone.
    pub(super) async fn persist(
        &self,
        run: &Run,
        message: Option<(Option<(&str, StepStatus)>, String)>,
        change: impl Fn(&mut Operation),
    ) -> Result<(), Interrupt> {
        let mut state = run.state.lock().await;
        for _ in 0..3 {
            let now = Timestamp::now();
            let mut next = state.operation.clone();
            if let Some(lease) = &mut next.lease
                && lease.owner == self.settings.replica_id
            {
                lease.expires_at = now.plus_millis(millis(self.settings.lease));
            }
            change(&mut next);
            next.updated_at = now;
            let event = message
                .as_ref()
                .map(|(step, text)| next.next_event(now, *step, text.clone()));
            let mut writes = vec![Write::UpdateOperation(next.clone())];
            if let Some(event) = &event {
                writes.push(Write::AppendEvent(event.clone()));
            }
            match self.commit_with_retry(writes).await {
                Ok(()) => {
                    next.version += 1;
                    state.operation = next;
                    if let Some(event) = event {
                        self.bus.publish(event);
                    }
                    return Ok(());
                }
                Err(Interrupt::LeaseLost) => {
                    let stored = self
                        .store
                        .get_operation(&state.operation.id)
                        .await
                        .map_err(|_| Interrupt::LeaseLost)?;
                    // "Failed" may mean "happened, but the answer was lost" (the SDK retried
                    // a write that had landed, and the retry's condition failed).
                    next.version += 1;
                    if stored.as_ref() == Some(&next) {
                        state.operation = next;
                        if let Some(event) = event {
                            self.bus.publish(event);
                        }
                        return Ok(());
                    }
                    if !self.adopt(&mut state.operation, stored, &run.cancel) {
                        return Err(Interrupt::LeaseLost);
                    }
                }
                Err(other) => return Err(other),
            }
        }
        Err(Interrupt::LeaseLost)
    }

    /// Takes over a cancel request written by the API while we hold the lease (and signals
    /// `cancel`). Returns false when the stored operation changed in any other way (someone
    /// else owns it now).
    pub(super) fn adopt(
        &self,
        ours: &mut Operation,
        stored: Option<Operation>,
        cancel: &CancellationToken,
    ) -> bool {
        let Some(stored) = stored else { return false };
        let still_ours = stored.status == OperationStatus::InProgress
            && stored
                .lease
                .as_ref()
                .is_some_and(|l| l.owner == self.settings.replica_id);
        if !still_ours || !stored.cancel_requested {
            return false;
        }
        ours.cancel_requested = true;
        ours.version = stored.version;
        ours.last_event_seq = stored.last_event_seq;
        cancel.cancel();
        true
    }

    /// Commits `writes`, retrying briefly when the store is unavailable. A failed condition
    /// is a lost lease; a write the store can never accept is `StoreRejected`.
    pub(super) async fn commit_with_retry(&self, writes: Vec<Write>) -> Result<(), Interrupt> {
        let mut attempt = 0;
        loop {
            match self.store.commit(writes.clone()).await {
                Ok(()) => return Ok(()),
                // Either nothing was written or (unavailable) it may have been: a retry of a
                // versioned write that landed fails its condition, which the caller then
                // checks against the stored record.
                Err(error @ (StoreError::Unavailable(_) | StoreError::Contention))
                    if attempt + 1 < STORE_ATTEMPTS =>
                {
                    tracing::warn!(%error, attempt, "state store write failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(store_backoff(attempt)).await;
                }
                Err(error) => {
                    tracing::error!(%error, "state store write failed");
                    return Err(Interrupt::from(error));
                }
            }
        }
    }

    pub(super) async fn snapshot(&self, run: &Run) -> StepCtx {
        let state = run.state.lock().await;
        StepCtx {
            operation: state.operation.clone(),
            instance: state.instance.clone(),
            cloud: run.cloud.clone(),
            store: self.store.clone(),
            names: run.names.clone(),
            tag_settings: self.settings.tags.clone(),
            now: self.clock.now(),
        }
    }
}
