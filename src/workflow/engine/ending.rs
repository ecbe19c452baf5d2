//! How an operation ends: the compensating phase (persisted, so a crash in the middle of a
//! rollback resumes the rollback) and the one transaction that ends the operation and
//! applies the workflow's edit of the instance.

use crate::domain::operation::{OperationError, StepStatus};
use crate::domain::{Instance, Operation, OperationStatus, Phase, Timestamp};
use crate::metrics;
use crate::store::{DomainClaim, Guard, StoreError, Write, WriteKind};
use tracing::Instrument;

use super::super::{Failure, StepError};
use super::lease::Wake;
use super::{Engine, Interrupt, Run, millis};

const OPERATION_CANCELLED: &str = "OPERATION_CANCELLED";

/// How a run ends when it does not complete.
#[derive(Debug, Clone)]
pub(super) struct Ending {
    status: OperationStatus,
    reason: String,
    message: String,
    /// Whether the workflow's undos run (when it rolls back at all).
    compensate: bool,
}

impl Ending {
    pub(super) fn step_failed(step: &str, detail: &str) -> Self {
        Self {
            status: OperationStatus::Failed,
            reason: "STEP_FAILED".into(),
            message: format!("step {step} failed: {detail}"),
            compensate: true,
        }
    }

    /// A step refused with its own reason (see `StepError::Refused`).
    pub(super) fn refused(reason: &str, message: &str) -> Self {
        Self {
            status: OperationStatus::Failed,
            reason: reason.to_owned(),
            message: message.to_owned(),
            compensate: true,
        }
    }

    pub(super) fn cancelled() -> Self {
        Self {
            status: OperationStatus::Cancelled,
            reason: OPERATION_CANCELLED.into(),
            message: "cancelled".into(),
            compensate: true,
        }
    }

    /// A passed deadline leaves everything in place for an operator (or a retry).
    pub(super) fn deadline() -> Self {
        Self {
            status: OperationStatus::Stuck,
            reason: "DEADLINE_EXCEEDED".into(),
            message: "the operation passed its deadline".into(),
            compensate: false,
        }
    }

    /// The ending recorded when the compensating phase began, for a resumed rollback.
    pub(super) fn resumed(failure: Option<OperationError>) -> Self {
        let failure = failure.unwrap_or_else(|| OperationError {
            reason: "STEP_FAILED".into(),
            message: "a step failed (reason not recorded)".into(),
        });
        Self {
            status: if failure.reason == OPERATION_CANCELLED {
                OperationStatus::Cancelled
            } else {
                OperationStatus::Failed
            },
            reason: failure.reason,
            message: failure.message,
            compensate: true,
        }
    }

    fn error(&self) -> OperationError {
        OperationError {
            reason: self.reason.clone(),
            message: self.message.clone(),
        }
    }
}

/// How a rollback went.
enum Rollback {
    Clean,
    UndoFailed,
    DeadlineExceeded,
}

impl Engine {
    pub(super) async fn fail(&self, run: &Run, ending: Ending) -> Result<(), Interrupt> {
        let mut ending = ending;
        let mut rolled_back = false;
        if ending.compensate && run.workflow.rolls_back() {
            let phase = run.state.lock().await.operation.phase;
            if phase != Phase::Compensating {
                let error = ending.error();
                let since = self.clock.now().millis();
                let text = format!("rolling back: {}", ending.message);
                self.persist(run, Some((None, text)), |op| {
                    op.phase = Phase::Compensating;
                    op.failure = Some(error.clone());
                    op.params["compensation_started_at"] = serde_json::json!(since);
                })
                .await?;
            }
            match self.roll_back(run).await? {
                Rollback::Clean => rolled_back = true,
                Rollback::UndoFailed => {
                    ending = Ending {
                        status: OperationStatus::Stuck,
                        reason: "UNDO_FAILED".into(),
                        message: format!(
                            "{}; undoing it failed, so resources may remain",
                            ending.message
                        ),
                        compensate: false,
                    }
                }
                Rollback::DeadlineExceeded => {
                    ending = Ending {
                        status: OperationStatus::Stuck,
                        reason: "DEADLINE_EXCEEDED".into(),
                        message: format!(
                            "{}; the rollback passed its deadline, so resources may remain",
                            ending.message
                        ),
                        compensate: false,
                    }
                }
            }
        }
        if ending.status == OperationStatus::Stuck {
            self.count_stuck(
                run.workflow.verb().as_str(),
                &ending.reason,
                &ending.message,
            );
        }
        let workflow = run.workflow.clone();
        self.finish(
            run,
            ending.status,
            Some(ending.error()),
            |instance, operation| {
                let failure = Failure {
                    status: ending.status,
                    reason: &ending.reason,
                    message: &ending.message,
                    rolled_back,
                    from_state: operation.params["from_state"]
                        .as_str()
                        .and_then(|s| serde_json::from_value(serde_json::json!(s)).ok()),
                };
                workflow.on_fail(instance, &failure)
            },
        )
        .await
    }

    /// Counts an ended operation (`ended_at` and `status` set): by verb and status, and
    /// its duration from its creation (queueing included: what the caller waited).
    pub(super) fn count_finished(&self, operation: &Operation) {
        let labels = [
            ("verb", operation.verb.as_str()),
            ("status", operation.status.as_str()),
        ];
        self.metrics
            .increment(metrics::OPERATIONS_FINISHED, &labels);
        let ended = operation.ended_at.unwrap_or_else(Timestamp::now);
        let millis = (ended.millis() - operation.created_at.millis()).max(0);
        #[allow(clippy::cast_precision_loss)] // milliseconds stay far below 2^52
        let seconds = millis as f64 / 1000.0;
        self.metrics
            .observe(metrics::OPERATION_DURATION, &labels, seconds);
    }

    pub(super) fn count_stuck(&self, verb: &str, reason: &str, message: &str) {
        self.metrics.increment(
            metrics::OPERATIONS_STUCK,
            &[("verb", verb), ("reason", reason)],
        );
        tracing::error!(metric = metrics::OPERATIONS_STUCK, reason, %message, "operation STUCK: needs attention");
    }

    /// When the compensating phase must have ended: as long again as the forward deadline,
    /// counted from when it began.
    fn compensation_deadline(&self, operation: &Operation, run: &Run) -> Timestamp {
        let since = operation
            .params
            .get("compensation_started_at")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or_else(|| self.clock.now().millis());
        Timestamp(since).plus_millis(millis(self.settings.deadline(run.workflow.as_ref())))
    }

    /// Undoes every step that ran (or may have), newest first, skipping what an earlier
    /// run of this rollback already undid.
    async fn roll_back(&self, run: &Run) -> Result<Rollback, Interrupt> {
        let (steps, deadline) = {
            let state = run.state.lock().await;
            (
                state.operation.steps.clone(),
                self.compensation_deadline(&state.operation, run),
            )
        };
        let mut clean = true;
        for step in steps.iter().rev() {
            if !matches!(
                step.status,
                StepStatus::Succeeded | StepStatus::Failed | StepStatus::Running
            ) {
                continue;
            }
            let name = step.name.as_str();
            let mut failures = 0;
            let outcome: Result<(), String> = loop {
                let ctx = self.snapshot(run).await;
                let resource = ctx.output(name).map(str::to_owned);
                let undo = async {
                    if let Some(hook) = &self.hook {
                        hook.before_undo(&ctx.operation, name).await?;
                    }
                    run.workflow.undo(&ctx, name, resource.as_deref()).await
                }
                .instrument(run.step_span("undo", name));
                let pause = match self.guarded(run, deadline, false, undo).await {
                    Err(Wake::LeaseLost | Wake::Cancelled) => return Err(Interrupt::LeaseLost),
                    Err(Wake::Shutdown) => return Err(Interrupt::Shutdown),
                    Err(Wake::Deadline) => break Err("deadline exceeded while undoing".into()),
                    Ok(Ok(())) => break Ok(()),
                    Ok(Err(StepError::NotYet(_))) => self.settings.converge_interval,
                    Ok(Err(StepError::Transient(detail)))
                        if failures + 1 < self.settings.max_attempts =>
                    {
                        failures += 1;
                        tracing::warn!(step = name, %detail, "undo failed; retrying");
                        super::backoff(
                            self.settings.backoff_base,
                            self.settings.backoff_cap,
                            failures,
                        )
                    }
                    Ok(Err(
                        StepError::Transient(detail)
                        | StepError::Fatal(detail)
                        | StepError::Refused {
                            message: detail, ..
                        },
                    )) => {
                        break Err(detail);
                    }
                };
                match self
                    .guarded(run, deadline, false, tokio::time::sleep(pause))
                    .await
                {
                    Ok(()) => {}
                    Err(Wake::Shutdown) => return Err(Interrupt::Shutdown),
                    Err(Wake::Deadline) => break Err("deadline exceeded while undoing".into()),
                    Err(_) => return Err(Interrupt::LeaseLost),
                }
            };
            let (status, text) = match &outcome {
                Ok(()) => (StepStatus::Undone, format!("{name}: undone")),
                Err(detail) => {
                    clean = false;
                    (
                        StepStatus::UndoFailed,
                        format!("{name}: undo failed: {detail}"),
                    )
                }
            };
            let error = outcome.as_ref().err().cloned();
            self.persist(run, Some((Some((name, status)), text)), |op| {
                if let Some(step) = op.steps.iter_mut().find(|s| s.name == name) {
                    step.status = status;
                    if let Some(detail) = &error {
                        step.error = Some(detail.clone());
                    }
                }
            })
            .await?;
            if self.clock.now() >= deadline && outcome.is_err() {
                return Ok(Rollback::DeadlineExceeded);
            }
        }
        Ok(if clean {
            Rollback::Clean
        } else {
            Rollback::UndoFailed
        })
    }

    pub(super) async fn complete(&self, run: &Run) -> Result<(), Interrupt> {
        let workflow = run.workflow.clone();
        let cloud = run.cloud.clone();
        self.finish(
            run,
            OperationStatus::Completed,
            None,
            |instance, operation| workflow.on_complete(instance, operation, &cloud),
        )
        .await
    }

    /// Ends the operation with `status`, updating the instance in the same transaction;
    /// `change` is the workflow's edit of the instance and says whether to give back the
    /// (tenant, environment) guard — which is released only if this instance holds it.
    async fn finish(
        &self,
        run: &Run,
        status: OperationStatus,
        error: Option<OperationError>,
        change: impl Fn(&mut Instance, &Operation) -> bool,
    ) -> Result<(), Interrupt> {
        let mut state = run.state.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let now = Timestamp::now();
            let mut operation = state.operation.clone();
            operation.status = status;
            operation.error = error.clone();
            operation.ended_at = Some(now);
            operation.updated_at = now;
            operation.lease = None;
            let text = match &operation.error {
                Some(error) => format!("{status}: {}", error.message),
                None => status.to_string(),
            };
            let event = operation.next_event(now, None, text);
            let mut writes = vec![
                Write::UpdateOperation(operation.clone()),
                Write::AppendEvent(event.clone()),
            ];
            // The instance may have been changed by the API meanwhile: start from the store.
            let stored = self
                .store
                .get_instance(&state.instance.name)
                .await
                .map_err(|_| Interrupt::LeaseLost)?;
            let mut instance = stored.clone();
            if let Some(instance) = &mut instance {
                let before = instance.spec.custom_domains.clone();
                let release = change(instance, &operation);
                instance.state_changed_at = now;
                instance.updated_at = now;
                instance.current_operation = None;
                writes.push(Write::UpdateInstance(instance.clone()));
                if release {
                    let guard = self
                        .store
                        .get_guard(&instance.name.tenant, instance.spec.environment)
                        .await
                        .map_err(|_| Interrupt::LeaseLost)?;
                    // A sibling created after a clean rollback may hold it now: not ours.
                    if guard.is_some_and(|g| g.instance == instance.name.instance) {
                        writes.push(Write::ReleaseGuard(Guard {
                            tenant: instance.name.tenant.clone(),
                            environment: instance.spec.environment,
                            instance: instance.name.instance.clone(),
                        }));
                    }
                }
                for domain in domains_to_release(&before, instance, &operation, release) {
                    let claim = self
                        .store
                        .get_domain_claim(&domain)
                        .await
                        .map_err(|_| Interrupt::LeaseLost)?;
                    if claim.is_some_and(|c| c.owner == instance.name) {
                        writes.push(Write::ReleaseDomain(DomainClaim {
                            domain,
                            owner: instance.name.clone(),
                        }));
                    }
                }
            }
            let may_retry = attempt < 5;
            let committed = match self.store.commit(writes).await {
                Ok(()) => true,
                // The API changed the instance meanwhile: re-read it and apply the edit again.
                Err(StoreError::Conflict {
                    kind:
                        WriteKind::UpdateInstance | WriteKind::ReleaseGuard | WriteKind::ReleaseDomain,
                    ..
                }) if may_retry => continue,
                Err(StoreError::Unavailable(_) | StoreError::Contention) if may_retry => {
                    tokio::time::sleep(super::lease::store_backoff(attempt)).await;
                    false
                }
                Err(error @ (StoreError::InvalidBatch(_) | StoreError::Internal(_))) => {
                    return Err(Interrupt::from(error));
                }
                Err(_) => false,
            };
            if !committed {
                // The transaction may have landed with its answer lost, or a cancel request
                // raced the ending: look at what is stored.
                let stored = self
                    .store
                    .get_operation(&operation.id)
                    .await
                    .map_err(|_| Interrupt::LeaseLost)?;
                let mut landed = operation.clone();
                landed.version += 1;
                if stored.as_ref() != Some(&landed) {
                    let unchanged = stored
                        .as_ref()
                        .is_some_and(|s| s.version == state.operation.version);
                    if self.adopt(&mut state.operation, stored, &run.cancel)
                        || (unchanged && may_retry)
                    {
                        continue;
                    }
                    return Err(Interrupt::LeaseLost);
                }
            }
            operation.version += 1;
            self.count_finished(&operation);
            let instance_state = instance.as_ref().map(|i| i.state.to_string());
            tracing::info!(status = %status, instance_state, "operation finished");
            state.operation = operation;
            if let Some(mut instance) = instance {
                instance.version += 1;
                state.instance = instance;
            }
            drop(state);
            self.bus.publish(event);
            return Ok(());
        }
    }

    /// The store refuses every write of this run for a reason retrying cannot fix: end the
    /// operation STUCK if the store takes a smaller write, and stop offering it to this
    /// replica's claim loop otherwise. Either way the STUCK metric counts it.
    pub(super) async fn give_up(&self, run: &Run, detail: &str) {
        let verb = run.workflow.verb();
        self.count_stuck(verb.as_str(), "STORE_REJECTED", detail);
        let state = run.state.lock().await;
        let now = Timestamp::now();
        let mut operation = state.operation.clone();
        operation.status = OperationStatus::Stuck;
        operation.error = Some(OperationError {
            reason: "STORE_REJECTED".into(),
            message: format!("the state store rejects this operation's writes: {detail}"),
        });
        operation.ended_at = Some(now);
        operation.updated_at = now;
        operation.lease = None;
        let event = operation.next_event(now, None, "STUCK: the state store rejects its writes");
        let base = vec![
            Write::UpdateOperation(operation.clone()),
            Write::AppendEvent(event.clone()),
        ];
        let mut with_instance = base.clone();
        if let Ok(Some(mut instance)) = self.store.get_instance(&state.instance.name).await {
            instance.state = crate::domain::InstanceState::Failed;
            instance.state_changed_at = now;
            instance.updated_at = now;
            instance.current_operation = None;
            instance.failure_reason = operation.error.as_ref().map(|e| e.message.clone());
            with_instance.push(Write::UpdateInstance(instance));
        }
        for writes in [with_instance, base] {
            if self.store.commit(writes).await.is_ok() {
                self.count_finished(&operation);
                self.bus.publish(event);
                return;
            }
        }
        tracing::error!(operation = %operation.id, "cannot record STUCK either; this replica stops running the operation");
        self.abandon(&operation.id);
    }
}

/// What [`Engine::end_stale`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleOutcome {
    /// This call ended the operation STUCK.
    Stuck,
    /// The operation changed since it was read (a replica resumed it, another reconciler
    /// ended it first): left alone.
    Changed,
}

impl Engine {
    /// Ends STUCK (reason `LEASE_EXPIRED`) an unfinished operation whose lease expired and
    /// that nobody has resumed since: the reconciler's finding. Nothing is undone (as for a
    /// passed deadline, what is left stays for an operator or a retry); the workflow's
    /// `on_fail` edits the instance in the same transaction, conditional on both versions
    /// read, so two replicas never both end it and a replica resuming it meanwhile wins.
    pub async fn end_stale(
        &self,
        operation: &Operation,
        message: &str,
    ) -> Result<StaleOutcome, StoreError> {
        let reason = "LEASE_EXPIRED";
        let now = Timestamp::now();
        let mut ended = operation.clone();
        ended.status = OperationStatus::Stuck;
        ended.error = Some(OperationError {
            reason: reason.into(),
            message: message.to_owned(),
        });
        ended.ended_at = Some(now);
        ended.updated_at = now;
        ended.lease = None;
        let event = ended.next_event(now, None, format!("STUCK: {message}"));
        let mut writes = vec![
            Write::UpdateOperation(ended.clone()),
            Write::AppendEvent(event.clone()),
        ];
        if let Some(mut instance) = self.store.get_instance(&operation.target).await?
            && instance.current_operation.as_ref() == Some(&operation.id)
        {
            let failure = Failure {
                status: OperationStatus::Stuck,
                reason,
                message,
                rolled_back: false,
                from_state: operation.params["from_state"]
                    .as_str()
                    .and_then(|s| serde_json::from_value(serde_json::json!(s)).ok()),
            };
            // A stale operation releases no guard: whatever it made may still be there.
            if let Some(workflow) = super::super::workflow_for(operation.verb) {
                workflow.on_fail(&mut instance, &failure);
            }
            instance.state_changed_at = now;
            instance.updated_at = now;
            instance.current_operation = None;
            writes.push(Write::UpdateInstance(instance));
        }
        match self.store.commit(writes).await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. } | StoreError::Contention) => {
                return Ok(StaleOutcome::Changed);
            }
            Err(other) => return Err(other),
        }
        self.count_stuck(ended.verb.as_str(), reason, message);
        self.count_finished(&ended);
        self.bus.publish(event);
        Ok(StaleOutcome::Stuck)
    }
}

/// The custom domains whose claims an ending gives back: every domain the instance had or
/// the operation would have given it (its params' `spec` and `previous_domains`) that the
/// instance, as the ending leaves it, does not keep — all of them when the instance is
/// released (a clean provisioning rollback, deprovisioning's end). So a completed update
/// gives back the domains it removed, and a failed one those it would have added.
pub(crate) fn domains_to_release(
    before: &[String],
    after: &Instance,
    operation: &Operation,
    released: bool,
) -> Vec<String> {
    let listed = |value: &serde_json::Value| -> Vec<String> {
        serde_json::from_value(value.clone()).unwrap_or_default()
    };
    let mut candidates: Vec<String> = before.to_vec();
    candidates.extend(listed(&operation.params["spec"]["custom_domains"]));
    candidates.extend(listed(&operation.params["previous_domains"]));
    candidates.extend(after.spec.custom_domains.iter().cloned());
    candidates.sort();
    candidates.dedup();
    let gone = released || after.state == crate::domain::InstanceState::Deprovisioned;
    candidates
        .into_iter()
        .filter(|domain| gone || !after.spec.custom_domains.contains(domain))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::spec::SpecInput;
    use crate::domain::{
        Environment, InstanceName, InstanceSpec, InstanceState, OperationId, ScaleBounds, Verb,
    };

    fn instance(domains: &[&str], state: InstanceState) -> Instance {
        let spec = InstanceSpec::parse(
            SpecInput {
                environment: Some(Environment::Dev),
                organization_name: "Acme".into(),
                contact_email: "ops@acme.example".into(),
                custom_domains: domains.iter().map(|d| d.to_string()).collect(),
                ..SpecInput::default()
            },
            ScaleBounds::default(),
        )
        .unwrap();
        let mut instance = Instance::new_pending(
            InstanceName::parse("tenants/acme/instances/wp").unwrap(),
            spec,
            OperationId::parse("op-1").unwrap(),
            Timestamp(1),
        );
        instance.state = state;
        instance
    }

    fn update(from: &[&str], to: &[&str]) -> Operation {
        let mut operation = Operation::new(
            Verb::Update,
            InstanceName::parse("tenants/acme/instances/wp").unwrap(),
            Vec::new(),
            None,
            Timestamp(1),
        );
        operation.params = serde_json::json!({
            "previous_domains": from,
            "spec": { "custom_domains": to },
        });
        operation
    }

    fn owned(domains: &[&str]) -> Vec<String> {
        domains.iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn endings_give_back_the_domains_the_instance_does_not_keep() {
        let (a, b, c) = ("a.example.com", "b.example.com", "c.example.com");
        let before = owned(&[a, b]);
        let change = update(&[a, b], &[b, c]);
        // Completed: the instance has the new domains; the removed one goes.
        let completed = instance(&[b, c], InstanceState::Active);
        assert_eq!(
            domains_to_release(&before, &completed, &change, false),
            owned(&[a])
        );
        // Failed: the instance keeps the old ones; the one it would have added goes.
        let failed = instance(&[a, b], InstanceState::Active);
        assert_eq!(
            domains_to_release(&before, &failed, &change, false),
            owned(&[c])
        );
        // Released (clean rollback) or deprovisioned: every one.
        assert_eq!(
            domains_to_release(&before, &failed, &change, true),
            owned(&[a, b, c])
        );
        let gone = instance(&[a, b], InstanceState::Deprovisioned);
        let mut delete = update(&[], &[]);
        delete.params = serde_json::json!({});
        assert_eq!(
            domains_to_release(&before, &gone, &delete, false),
            owned(&[a, b])
        );
        // An operation that does not touch domains gives back nothing.
        let kept = instance(&[a, b], InstanceState::Active);
        assert!(domains_to_release(&before, &kept, &delete, false).is_empty());
    }
}
