//! Finding work and taking its lease. Operations that can never run here (no target, no
//! workflow for their verb) end FAILED with the reason; operations whose environment
//! cannot be reached now are parked for a while, so neither kind blocks the claim loop.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::naming::ResourceNames;
use crate::domain::operation::{Lease, OperationError};
use crate::domain::{Operation, OperationStatus, Phase, Timestamp};
use crate::metrics;
use crate::store::{StoreError, Write};

use super::super::workflow_for;
use super::{Engine, Run, RunState, SpanLabels, millis};

/// Lease owners of parked operations start with this.
const PARKED: &str = "parked-by-";

impl Engine {
    pub(super) async fn claim_round(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let free = self.slots.available_permits();
        if free == 0 {
            return Ok(());
        }
        let abandoned = self.abandoned_count();
        let candidates = self
            .store
            .runnable_operations(Timestamp::now(), free * 2 + abandoned)
            .await?;
        for operation in candidates {
            if self.is_abandoned(&operation.id) {
                continue;
            }
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                break;
            };
            let id = operation.id.clone();
            match self.claim(operation, shutdown).await {
                Ok(Some(run)) => {
                    let engine = self.clone();
                    let span = run.span();
                    tokio::spawn(engine.execute(run, permit).instrument(span));
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(operation = %id, %error, "claim failed"),
            }
        }
        Ok(())
    }

    fn abandoned_count(&self) -> usize {
        self.abandoned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    fn is_abandoned(&self, id: &crate::domain::OperationId) -> bool {
        self.abandoned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(id)
    }

    pub(super) fn abandon(&self, id: &crate::domain::OperationId) {
        self.abandoned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id.clone());
    }

    /// Takes the lease of `operation` with a conditional write; `None` when another replica
    /// won the race or the operation cannot run (it is then ended or parked).
    async fn claim(
        &self,
        mut operation: Operation,
        shutdown: &CancellationToken,
    ) -> Result<Option<Run>, StoreError> {
        let Some(workflow) = workflow_for(operation.verb) else {
            let message = format!("this version has no workflow for {}", operation.verb);
            self.end_unclaimable(operation, "UNSUPPORTED_VERB", message)
                .await?;
            return Ok(None);
        };
        let Some(mut instance) = self.store.get_instance(&operation.target).await? else {
            let message = format!("the target {} does not exist", operation.target);
            self.end_unclaimable(operation, "TARGET_MISSING", message)
                .await?;
            return Ok(None);
        };
        let cloud = match self
            .cloud
            .resolve(instance.spec.environment, &operation.id)
            .await
        {
            Ok(cloud) => cloud,
            Err(error) => {
                // The environment may come back (credentials, network): set the operation
                // aside for a while instead of offering it to every claim round.
                self.park(operation, &error.message).await?;
                return Ok(None);
            }
        };
        let now = Timestamp::now();
        let resumed = operation.status == OperationStatus::InProgress;
        if !resumed {
            operation.status = OperationStatus::InProgress;
            operation.attempt += 1;
            operation.phase = Phase::Forward;
            operation.failure = None;
            operation.params["attempt_started_at"] = serde_json::json!(self.clock.now().millis());
            if let Some(params) = operation.params.as_object_mut() {
                params.remove("compensation_started_at");
            }
        }
        if operation.steps.is_empty() {
            // The plan is decided once and persisted with the steps; a resumed operation
            // runs what was planned, whatever the configuration says now.
            operation.steps =
                Operation::planned_steps(&workflow.plan(&operation, &instance, &cloud));
        } else if operation.steps.len() > 1 && operation.steps.iter().all(|s| s.stage == 0) {
            // Recorded before stages were persisted: take each step's stage from the plan,
            // and run anything the plan does not know last.
            let plan = workflow.plan(&operation, &instance, &cloud);
            let last = u32::try_from(plan.len()).unwrap_or(u32::MAX);
            for step in &mut operation.steps {
                step.stage = plan
                    .iter()
                    .position(|stage| stage.contains(&step.name.as_str()))
                    .map_or(last, |index| u32::try_from(index).unwrap_or(last));
            }
        }
        operation.lease = Some(Lease {
            owner: self.settings.replica_id.clone(),
            expires_at: now.plus_millis(millis(self.settings.lease)),
        });
        operation.updated_at = now;
        let message = match (resumed, operation.phase) {
            (true, Phase::Compensating) => format!(
                "rollback resumed by {} after the previous lease expired",
                self.settings.replica_id
            ),
            (true, Phase::Forward) => format!(
                "resumed by {} after the previous lease expired",
                self.settings.replica_id
            ),
            (false, _) => format!(
                "started by {} (attempt {})",
                self.settings.replica_id, operation.attempt
            ),
        };
        let event = operation.next_event(now, None, message);
        let mut writes = vec![
            Write::UpdateOperation(operation.clone()),
            Write::AppendEvent(event.clone()),
        ];
        let before = instance.clone();
        if !resumed {
            workflow.on_start(&mut instance);
        }
        let running = workflow.running_state_for(instance.state);
        if instance.state != running {
            instance.state = running;
            instance.state_changed_at = now;
            instance.current_operation = Some(operation.id.clone());
        }
        let move_instance = instance != before;
        if move_instance {
            instance.updated_at = now;
            writes.push(Write::UpdateInstance(instance.clone()));
        }
        match self.store.commit(writes).await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. } | StoreError::Contention) => return Ok(None),
            Err(other) => return Err(other),
        }
        operation.version += 1;
        if move_instance {
            instance.version += 1;
        }
        self.bus.publish(event);
        self.metrics.increment(
            metrics::OPERATIONS_CLAIMED,
            &[
                ("verb", operation.verb.as_str()),
                ("resumed", if resumed { "true" } else { "false" }),
            ],
        );
        tracing::info!(operation = %operation.id, verb = %operation.verb, target = %operation.target, resumed, phase = ?operation.phase, "operation claimed");
        let names = ResourceNames::derive(&instance.name.tenant, instance.spec.environment);
        Ok(Some(Run {
            labels: SpanLabels {
                operation_id: operation.id.clone(),
                verb: operation.verb,
                instance: operation.target.clone(),
                replica: self.settings.replica_id.clone(),
                trace_parent: operation.trace_parent.clone(),
            },
            workflow,
            cloud,
            names,
            state: Mutex::new(RunState {
                operation,
                instance,
            }),
            lost: CancellationToken::new(),
            cancel: CancellationToken::new(),
            shutdown: shutdown.clone(),
        }))
    }

    /// Ends an operation that can never run (FAILED, with `reason`), so it stops being
    /// offered to every claim round.
    async fn end_unclaimable(
        &self,
        mut operation: Operation,
        reason: &str,
        message: String,
    ) -> Result<(), StoreError> {
        tracing::error!(operation = %operation.id, reason, %message, "operation cannot run; ending it FAILED");
        let now = Timestamp::now();
        operation.status = OperationStatus::Failed;
        operation.error = Some(OperationError {
            reason: reason.into(),
            message: message.clone(),
        });
        operation.ended_at = Some(now);
        operation.updated_at = now;
        operation.lease = None;
        let event = operation.next_event(now, None, format!("FAILED: {message}"));
        let mut writes = vec![
            Write::UpdateOperation(operation.clone()),
            Write::AppendEvent(event.clone()),
        ];
        if let Some(mut instance) = self.store.get_instance(&operation.target).await?
            && instance.current_operation.as_ref() == Some(&operation.id)
        {
            instance.current_operation = None;
            instance.failure_reason = Some(message);
            instance.updated_at = now;
            writes.push(Write::UpdateInstance(instance));
        }
        match self.store.commit(writes).await {
            Ok(()) => {
                self.count_finished(&operation);
                self.bus.publish(event);
                Ok(())
            }
            // Someone else changed it first; the next round sees the new state.
            Err(StoreError::Conflict { .. } | StoreError::Contention) => Ok(()),
            Err(other) => Err(other),
        }
    }

    /// Sets an operation aside until `park_interval` from now (a lease nobody renews), with
    /// one event saying why the first time.
    async fn park(&self, mut operation: Operation, reason: &str) -> Result<(), StoreError> {
        let now = Timestamp::now();
        let already = operation
            .lease
            .as_ref()
            .is_some_and(|lease| lease.owner.starts_with(PARKED));
        tracing::warn!(operation = %operation.id, %reason, retry_in_ms = millis(self.settings.park_interval), "environment unavailable; operation parked");
        operation.lease = Some(Lease {
            owner: format!("{PARKED}{}", self.settings.replica_id),
            expires_at: now.plus_millis(millis(self.settings.park_interval)),
        });
        operation.updated_at = now;
        let mut writes = Vec::new();
        if !already {
            let text = format!(
                "waiting: the environment is unavailable ({reason}); tried again every {} s",
                self.settings.park_interval.as_secs()
            );
            let event = operation.next_event(now, None, text);
            writes.push(Write::AppendEvent(event));
        }
        writes.insert(0, Write::UpdateOperation(operation));
        match self.store.commit(writes).await {
            Ok(()) | Err(StoreError::Conflict { .. } | StoreError::Contention) => Ok(()),
            Err(other) => Err(other),
        }
    }
}
