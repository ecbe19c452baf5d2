//! The forward phase: the persisted plan's stages in order, the steps of a stage in
//! parallel. Every attempt of a step runs under a guard: it is dropped the moment the lease
//! is lost, the replica shuts down, the operation is cancelled or its deadline passes, and
//! so is every backoff or convergence wait between attempts.

use futures::future::join_all;
use tracing::Instrument;

use crate::domain::operation::StepStatus;
use crate::domain::{Operation, Phase, Step, Timestamp};
use crate::metrics;

use super::super::{StepCtx, StepError};
use super::ending::Ending;
use super::lease::Wake;
use super::{Engine, Interrupt, Run, millis};

pub(super) enum StepOutcome {
    Interrupted(Interrupt),
    Failed(Ending),
}

impl From<Interrupt> for StepOutcome {
    fn from(interrupt: Interrupt) -> Self {
        StepOutcome::Interrupted(interrupt)
    }
}

impl Engine {
    /// Runs the remaining stages, then finishes the operation one way or another. An
    /// operation resumed in its compensating phase goes straight back to undoing.
    pub(super) async fn drive(&self, run: &Run) -> Result<(), Interrupt> {
        let (phase, failure, stages) = {
            let state = run.state.lock().await;
            let op = &state.operation;
            (op.phase, op.failure.clone(), op.stages())
        };
        if phase == Phase::Compensating {
            return self.fail(run, Ending::resumed(failure)).await;
        }
        for stage in &stages {
            self.check_boundary(run).await?;
            if let Some(ending) = self.boundary_ending(run).await {
                return self.fail(run, ending).await;
            }
            let pending: Vec<&str> = {
                let state = run.state.lock().await;
                stage
                    .iter()
                    .map(String::as_str)
                    .filter(|name| {
                        state.operation.steps.iter().any(|s| {
                            s.name == *name
                                && !matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped)
                        })
                    })
                    .collect()
            };
            let results = join_all(pending.iter().map(|name| {
                self.run_step(run, name)
                    .instrument(run.step_span("forward", name))
            }))
            .await;
            let mut failure = None;
            for result in results {
                match result {
                    Ok(()) => {}
                    Err(StepOutcome::Interrupted(interrupt)) => return Err(interrupt),
                    Err(StepOutcome::Failed(ending)) => failure = failure.or(Some(ending)),
                }
            }
            if let Some(ending) = failure {
                return self.fail(run, ending).await;
            }
        }
        self.check_boundary(run).await?;
        self.complete(run).await
    }

    /// Between stages: stop if the lease is gone or the replica is stopping, and refresh the
    /// operation from the store (a cancel request may have arrived through any replica).
    async fn check_boundary(&self, run: &Run) -> Result<(), Interrupt> {
        if run.lost.is_cancelled() {
            return Err(Interrupt::LeaseLost);
        }
        if run.shutdown.is_cancelled() {
            return Err(Interrupt::Shutdown);
        }
        // The state stays locked while reading, so a lease renewal cannot slip in between
        // and make our copy look stale.
        let mut state = run.state.lock().await;
        let stored = self
            .store
            .get_operation(&state.operation.id)
            .await
            .map_err(|_| Interrupt::LeaseLost)?;
        match stored {
            Some(op) if op.version == state.operation.version => Ok(()),
            other => {
                if self.adopt(&mut state.operation, other, &run.cancel) {
                    Ok(())
                } else {
                    Err(Interrupt::LeaseLost)
                }
            }
        }
    }

    /// A reason to stop before the next stage: a cancel request or a passed deadline.
    async fn boundary_ending(&self, run: &Run) -> Option<Ending> {
        let state = run.state.lock().await;
        if state.operation.cancel_requested {
            return Some(Ending::cancelled());
        }
        if self.clock.now() >= self.deadline_at(&state.operation, run) {
            return Some(Ending::deadline());
        }
        None
    }

    /// When the current attempt of the operation must have ended (the engine's clock).
    pub(super) fn deadline_at(&self, operation: &Operation, run: &Run) -> Timestamp {
        let started = operation
            .params
            .get("attempt_started_at")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(operation.created_at.millis());
        Timestamp(started).plus_millis(millis(self.settings.deadline(run.workflow.as_ref())))
    }

    async fn run_step(&self, run: &Run, name: &str) -> Result<(), StepOutcome> {
        self.record_step(
            run,
            name,
            StepStatus::Running,
            format!("{name}: started"),
            |step| {
                step.status = StepStatus::Running;
                step.started_at = Some(Timestamp::now());
                step.error = None;
                step.attempts += 1;
            },
        )
        .await?;
        let mut transient_failures = 0;
        loop {
            let ctx = self.snapshot(run).await;
            let deadline = self.deadline_at(&ctx.operation, run);
            let result = match self
                .guarded(run, deadline, true, self.attempt(run, &ctx, name))
                .await
            {
                Ok(result) => result,
                Err(wake) => return Err(self.step_interrupted(run, name, wake).await),
            };
            let pause = match result {
                Ok(resource) => {
                    let text = match &resource {
                        Some(id) => format!("{name}: done ({id})"),
                        None => format!("{name}: done"),
                    };
                    return self
                        .record_step(run, name, StepStatus::Succeeded, text, |step| {
                            step.status = StepStatus::Succeeded;
                            step.ended_at = Some(Timestamp::now());
                            if resource.is_some() {
                                step.resource_id = resource.clone();
                            }
                        })
                        .await;
                }
                Err(StepError::NotYet(detail)) => {
                    tracing::debug!(step = name, %detail, "waiting");
                    self.settings.converge_interval
                }
                Err(StepError::Transient(detail))
                    if transient_failures + 1 < self.settings.max_attempts =>
                {
                    transient_failures += 1;
                    let delay = super::backoff(
                        self.settings.backoff_base,
                        self.settings.backoff_cap,
                        transient_failures,
                    );
                    tracing::warn!(step = name, %detail, attempt = transient_failures, delay_ms = delay.as_millis() as u64, "transient failure; retrying");
                    self.metrics.increment(
                        metrics::STEP_RETRIES,
                        &[("verb", ctx.operation.verb.as_str()), ("step", name)],
                    );
                    let text = format!("{name}: retrying after: {detail}");
                    self.record_step(run, name, StepStatus::Running, text, |step| {
                        step.attempts += 1;
                    })
                    .await?;
                    delay
                }
                Err(StepError::Transient(detail) | StepError::Fatal(detail)) => {
                    tracing::warn!(step = name, %detail, "step failed");
                    self.mark_step_failed(run, name, &detail).await?;
                    return Err(StepOutcome::Failed(Ending::step_failed(name, &detail)));
                }
                Err(StepError::Refused { reason, message }) => {
                    tracing::warn!(step = name, reason, %message, "step refused");
                    self.mark_step_failed(run, name, &message).await?;
                    return Err(StepOutcome::Failed(Ending::refused(reason, &message)));
                }
            };
            if let Err(wake) = self
                .guarded(run, deadline, true, tokio::time::sleep(pause))
                .await
            {
                return Err(self.step_interrupted(run, name, wake).await);
            }
        }
    }

    /// What a guarded attempt or wait that was cut short means for the step.
    async fn step_interrupted(&self, run: &Run, name: &str, wake: Wake) -> StepOutcome {
        let (detail, ending) = match wake {
            Wake::LeaseLost => return StepOutcome::Interrupted(Interrupt::LeaseLost),
            Wake::Shutdown => return StepOutcome::Interrupted(Interrupt::Shutdown),
            Wake::Cancelled => ("cancelled while running", Ending::cancelled()),
            Wake::Deadline => ("deadline exceeded", Ending::deadline()),
        };
        tracing::warn!(step = name, detail, "attempt abandoned");
        match self.mark_step_failed(run, name, detail).await {
            Ok(()) => StepOutcome::Failed(ending),
            Err(outcome) => outcome,
        }
    }

    /// One try of the step's action. Nothing is recorded here: what the action made is
    /// recorded when it returns, and found again by name and tag when the process died
    /// before that (the window every step must survive).
    async fn attempt(
        &self,
        run: &Run,
        ctx: &StepCtx,
        name: &str,
    ) -> Result<Option<String>, StepError> {
        if let Some(hook) = &self.hook {
            hook.before(&ctx.operation, name).await?;
        }
        let resource = run.workflow.run(ctx, name).await?;
        if let Some(hook) = &self.hook {
            hook.after(&ctx.operation, name).await?;
        }
        Ok(resource)
    }

    async fn mark_step_failed(
        &self,
        run: &Run,
        name: &str,
        detail: &str,
    ) -> Result<(), StepOutcome> {
        let text = format!("{name}: failed: {detail}");
        self.record_step(run, name, StepStatus::Failed, text, |step| {
            step.status = StepStatus::Failed;
            step.error = Some(detail.to_owned());
            step.ended_at = Some(Timestamp::now());
        })
        .await
    }

    /// Records a change of one step, with an event saying `text`.
    pub(super) async fn record_step(
        &self,
        run: &Run,
        name: &str,
        status: StepStatus,
        text: String,
        edit: impl Fn(&mut Step),
    ) -> Result<(), StepOutcome> {
        self.persist(run, Some((Some((name, status)), text)), |op| {
            if let Some(step) = op.steps.iter_mut().find(|s| s.name == name) {
                edit(step);
            }
        })
        .await
        .map_err(StepOutcome::Interrupted)
    }
}
