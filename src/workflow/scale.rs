//! Scaling: a new task count and/or task size for the instance's ECS service. A new size is
//! a new task-definition revision (`task_definition`), then the service is pointed at the
//! new revision and/or count (`update_service`), then the rollout is awaited
//! (`wait_rollout`).
//!
//! The operation's params, written when it is created, hold the `target` (count, cpu,
//! memory) and the `previous` values (count, cpu, memory, task-definition ARN, as the
//! instance recorded them). A failed rollout rolls back: the undo of `update_service` puts
//! the service back on the previous revision and count. A registered revision is not
//! deregistered by the rollback (the service may still be draining tasks of it, and a
//! later scale to the same size reuses it); deprovisioning removes every revision of the
//! family.
//!
//! Ending: completed, the instance's spec (count, cpu, memory) and recorded task definition
//! match the service, and it is ACTIVE. Failed or cancelled with a clean rollback, it is
//! ACTIVE again with its previous spec and a `failure_reason`. STUCK (an undo failed, or the
//! deadline passed) leaves it FAILED: the service may run either size; a retry of the
//! operation scales again (FAILED → SCALING), or the instance can be deleted.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::cloud::CloudEnv;
use crate::domain::{Instance, InstanceState, Operation, Verb};

use super::provision::{ACCESS_POINT, SECRET, TASK_DEFINITION, task_definition_spec};
use super::restart::{WAIT_ROLLOUT, current_status, rollout_finished};
use super::{Failure, StepCtx, StepError, StepResult, Workflow};

pub const UPDATE_SERVICE: &str = "update_service";

/// A task count and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub desired_count: u32,
    pub cpu: u32,
    pub memory_mib: u32,
}

impl Size {
    pub fn of(instance: &Instance) -> Self {
        Self {
            desired_count: instance.spec.desired_count,
            cpu: instance.spec.cpu,
            memory_mib: instance.spec.memory_mib,
        }
    }
}

/// What the service ran before the scale, to go back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Previous {
    #[serde(flatten)]
    pub size: Size,
    /// The task definition the instance recorded (empty if none).
    pub task_definition: String,
}

impl Previous {
    pub fn of(instance: &Instance) -> Self {
        Self {
            size: Size::of(instance),
            task_definition: instance
                .resources
                .get(TASK_DEFINITION)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// The params of a scale operation: `{"target": Size, "previous": Previous}`.
pub fn params(target: Size, previous: &Previous) -> serde_json::Value {
    serde_json::json!({ "target": target, "previous": previous })
}

fn target(operation: &Operation) -> StepResult<Size> {
    serde_json::from_value(operation.params["target"].clone())
        .map_err(|e| StepError::Fatal(format!("the operation has no valid target size: {e}")))
}

fn previous(operation: &Operation) -> StepResult<Previous> {
    serde_json::from_value(operation.params["previous"].clone())
        .map_err(|e| StepError::Fatal(format!("the operation has no valid previous size: {e}")))
}

fn resizes(operation: &Operation) -> bool {
    match (target(operation), previous(operation)) {
        (Ok(target), Ok(previous)) => {
            (target.cpu, target.memory_mib) != (previous.size.cpu, previous.size.memory_mib)
        }
        _ => false,
    }
}

pub struct Scale;

#[async_trait]
impl Workflow for Scale {
    fn verb(&self) -> Verb {
        Verb::Scale
    }

    fn plan(&self, operation: &Operation, _: &Instance, _: &CloudEnv) -> Vec<Vec<&'static str>> {
        let mut stages = Vec::new();
        if resizes(operation) {
            stages.push(vec![TASK_DEFINITION]);
        }
        stages.push(vec![UPDATE_SERVICE]);
        stages.push(vec![WAIT_ROLLOUT]);
        stages
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        match step {
            TASK_DEFINITION => register_revision(ctx).await.map(Some),
            UPDATE_SERVICE => update_service(ctx).await.map(Some),
            WAIT_ROLLOUT => wait_rollout(ctx).await.map(|()| None),
            other => Err(StepError::Fatal(format!("unknown step {other}"))),
        }
    }

    async fn undo(&self, ctx: &StepCtx, step: &str, _: Option<&str>) -> StepResult<()> {
        match step {
            UPDATE_SERVICE => restore_service(ctx).await,
            // See the module documentation: the revision stays registered.
            _ => Ok(()),
        }
    }

    fn rolls_back(&self) -> bool {
        true
    }

    fn running_state(&self) -> InstanceState {
        InstanceState::Scaling
    }

    fn on_complete(&self, instance: &mut Instance, operation: &Operation, _: &CloudEnv) -> bool {
        instance.state = InstanceState::Active;
        instance.failure_reason = None;
        if let Ok(target) = target(operation) {
            instance.spec.desired_count = target.desired_count;
            instance.spec.cpu = target.cpu;
            instance.spec.memory_mib = target.memory_mib;
        }
        if let Some(arn) = operation
            .steps
            .iter()
            .find(|s| s.name == TASK_DEFINITION)
            .and_then(|s| s.resource_id.clone())
        {
            instance.resources.insert(TASK_DEFINITION.into(), arn);
        }
        false
    }

    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool {
        instance.state = if failure.rolled_back {
            InstanceState::Active
        } else {
            InstanceState::Failed
        };
        instance.failure_reason = Some(format!("scale: {}", failure.message));
        false
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(30 * 60)
    }

    /// A retry rolls back to what the instance runs now, not to what it ran when the
    /// operation was first requested.
    fn on_retry(&self, operation: &mut Operation, instance: &Instance) {
        operation.params["previous"] =
            serde_json::to_value(Previous::of(instance)).unwrap_or_default();
    }
}

/// Registers the revision with the new size (the adapter reuses the family's latest active
/// revision when it is identical, so a resumed step registers nothing new).
async fn register_revision(ctx: &StepCtx) -> StepResult<String> {
    let target = target(&ctx.operation)?;
    let resource = |key: &str| {
        ctx.instance
            .resources
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| StepError::Fatal(format!("the instance recorded no {key}")))
    };
    let definition = task_definition_spec(
        ctx,
        target.cpu,
        target.memory_mib,
        resource(ACCESS_POINT)?,
        resource(SECRET)?,
    );
    Ok(ctx
        .cloud
        .compute
        .register_task_definition(&definition)
        .await?)
}

/// Sets the service's count and (if resized) revision: absolute values, so repeating it is
/// harmless. Returns the revision the service uses.
async fn update_service(ctx: &StepCtx) -> StepResult<String> {
    let target = target(&ctx.operation)?;
    let revision = ctx.output(TASK_DEFINITION);
    ctx.cloud
        .compute
        .update_service(
            &ctx.cloud.platform.cluster,
            &ctx.names.stack,
            Some(target.desired_count),
            revision,
            false,
        )
        .await?;
    Ok(current_status(ctx).await?.task_definition)
}

async fn wait_rollout(ctx: &StepCtx) -> StepResult<()> {
    let target = target(&ctx.operation)?;
    let status = current_status(ctx).await?;
    rollout_finished(
        &status,
        None,
        ctx.output(TASK_DEFINITION),
        ctx.cloud.readiness.as_ref(),
    )?;
    if status.desired != target.desired_count {
        return Err(StepError::Fatal(format!(
            "the service wants {} tasks, not {}: changed outside this operation",
            status.desired, target.desired_count
        )));
    }
    Ok(())
}

/// Puts the service back on the previous revision and count, and checks that ECS took it.
async fn restore_service(ctx: &StepCtx) -> StepResult<()> {
    let previous = previous(&ctx.operation)?;
    let revision =
        (!previous.task_definition.is_empty()).then_some(previous.task_definition.as_str());
    let Some(status) = ctx
        .cloud
        .compute
        .service_status(&ctx.cloud.platform.cluster, &ctx.names.stack)
        .await?
    else {
        return Err(StepError::Fatal(format!(
            "the ECS service {} is gone",
            ctx.names.stack
        )));
    };
    let restored = status.desired == previous.size.desired_count
        && revision.is_none_or(|arn| status.task_definition == arn);
    if restored {
        return Ok(());
    }
    ctx.cloud
        .compute
        .update_service(
            &ctx.cloud.platform.cluster,
            &ctx.names.stack,
            Some(previous.size.desired_count),
            revision,
            false,
        )
        .await?;
    Err(StepError::NotYet(
        "put the service back on its previous revision and count; checking".into(),
    ))
}
