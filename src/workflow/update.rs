//! Updating: a new WordPress image and/or tag (and with it, possibly, a new count or size),
//! rolled out as a new task-definition revision with the steps of [`super::rollout`], plus
//! the record-only fields (labels, organisation name, contact email) that change with it.
//!
//! Updates that change only record fields never reach this workflow: the API completes
//! them in the request's own transaction, without touching AWS (see `api::update`). An
//! update that changes only the count or size is a scale (`Verb::Scale`), as the contract
//! says (the instance is SCALING meanwhile).
//!
//! The operation's params hold the rollout's `target`, `previous` and `rollout_timeout_ms`
//! (see [`super::rollout`]) and the instance's whole new `spec`.
//!
//! Ending: completed, the instance's spec is the new one, its recorded task definition is
//! the revision the service runs, and it is ACTIVE. A rollout that fails — ECS's circuit
//! breaker rolled it back, or the new tasks were not steady and healthy within the rollout
//! timeout — is rolled back: the service runs the previous revision again, the operation is
//! FAILED with the reason, and the instance is ACTIVE with its previous spec and a
//! `failure_reason`. STUCK (an undo failed, or the operation's deadline passed) leaves it
//! FAILED; a retry of the operation updates again (FAILED → UPDATING).

use std::time::Duration;

use async_trait::async_trait;

use crate::cloud::CloudEnv;
use crate::domain::{Instance, InstanceSpec, InstanceState, Operation, Verb};

use super::rollout::{self, Previous, Target};
use super::{Failure, StepCtx, StepResult, Workflow};

/// The params of an update operation.
pub fn params(
    spec: &InstanceSpec,
    previous: &Previous,
    rollout_timeout: Option<Duration>,
) -> serde_json::Value {
    let target = Target {
        size: rollout::Size {
            desired_count: spec.desired_count,
            cpu: spec.cpu,
            memory_mib: spec.memory_mib,
        },
        wordpress_image: spec.wordpress_image.clone(),
        wordpress_version: spec.wordpress_version.clone(),
    };
    let mut params = rollout::params(&target, previous, rollout_timeout);
    params["spec"] = serde_json::to_value(spec).unwrap_or_default();
    params
}

fn new_spec(operation: &Operation) -> Option<InstanceSpec> {
    serde_json::from_value(operation.params["spec"].clone()).ok()
}

pub struct Update;

#[async_trait]
impl Workflow for Update {
    fn verb(&self) -> Verb {
        Verb::Update
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
        InstanceState::Updating
    }

    fn on_complete(&self, instance: &mut Instance, operation: &Operation, _: &CloudEnv) -> bool {
        instance.state = InstanceState::Active;
        instance.failure_reason = None;
        rollout::apply(instance, operation);
        if let Some(spec) = new_spec(operation) {
            instance.spec.labels = spec.labels;
            instance.spec.organization_name = spec.organization_name;
            instance.spec.contact_email = spec.contact_email;
        }
        false
    }

    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool {
        instance.state = if failure.rolled_back {
            InstanceState::Active
        } else {
            InstanceState::Failed
        };
        instance.failure_reason = Some(format!("update: {}", failure.message));
        false
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(30 * 60)
    }

    fn on_retry(&self, operation: &mut Operation, instance: &Instance) {
        rollout::refresh_previous(operation, instance);
    }
}
