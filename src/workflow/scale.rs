//! Scaling: a new task count and/or task size for the instance's ECS service, rolled out
//! with the steps of [`super::rollout`] (a new size is a new task-definition revision; the
//! service is pointed at it and/or the new count; the rollout is awaited; a failed rollout
//! puts the service back).
//!
//! Ending: completed, the instance's spec (count, cpu, memory) and recorded task definition
//! match the service, and it is ACTIVE. Failed or cancelled with a clean rollback, it is
//! ACTIVE again with its previous spec and a `failure_reason`. STUCK (an undo failed, or the
//! deadline passed) leaves it FAILED: the service may run either size; a retry of the
//! operation scales again (FAILED → SCALING), or the instance can be deleted.

use std::time::Duration;

use async_trait::async_trait;

use crate::cloud::CloudEnv;
use crate::domain::{Instance, InstanceState, Operation, Verb};

use super::rollout::{self, Target};
pub use super::rollout::{Previous, Size, UPDATE_SERVICE};
use super::{Failure, StepCtx, StepResult, Workflow};

/// The params of a scale operation (see [`rollout::params`]).
pub fn params(
    target: Size,
    previous: &Previous,
    rollout_timeout: Option<Duration>,
) -> serde_json::Value {
    rollout::params(&Target::size(target), previous, rollout_timeout)
}

pub struct Scale;

#[async_trait]
impl Workflow for Scale {
    fn verb(&self) -> Verb {
        Verb::Scale
    }

    fn plan(&self, operation: &Operation, _: &Instance, _: &CloudEnv) -> Vec<Vec<&'static str>> {
        rollout::plan(operation)
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        rollout::run(ctx, step).await
    }

    async fn undo(&self, ctx: &StepCtx, step: &str, _: Option<&str>) -> StepResult<()> {
        rollout::undo(ctx, step).await
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
        rollout::apply(instance, operation);
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

    fn on_retry(&self, operation: &mut Operation, instance: &Instance) {
        rollout::refresh_previous(operation, instance);
    }
}
