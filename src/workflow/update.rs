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
use super::{Failure, StepCtx, StepResult, Workflow, domains};

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

/// Whether the update rolls out a revision or count (`rollout: false`: only custom domains
/// change).
fn rolls_out(operation: &Operation) -> bool {
    operation
        .params
        .get("rollout")
        .and_then(serde_json::Value::as_bool)
        != Some(false)
}

/// The custom domains the instance had when the update was requested.
fn previous_domains(operation: &Operation, instance: &Instance) -> Vec<String> {
    serde_json::from_value(operation.params["previous_domains"].clone())
        .unwrap_or_else(|_| instance.spec.custom_domains.clone())
}

pub struct Update;

#[async_trait]
impl Workflow for Update {
    fn verb(&self) -> Verb {
        Verb::Update
    }

    fn plan(
        &self,
        operation: &Operation,
        instance: &Instance,
        _: &CloudEnv,
    ) -> Vec<Vec<&'static str>> {
        let mut stages = if rolls_out(operation) {
            rollout::plan(operation)
        } else {
            Vec::new()
        };
        if let Some(spec) = new_spec(operation) {
            let previous = previous_domains(operation, instance);
            // Also when the domains are the same: an update naming them resumes the wait for
            // certificates that were still pending validation.
            let named = operation.params["update_mask"]
                .as_array()
                .is_some_and(|paths| paths.iter().any(|p| p == "custom_domains"));
            if spec.custom_domains != previous || named {
                stages.push(vec![domains::CUSTOM_DOMAINS]);
            }
            if previous.iter().any(|d| !spec.custom_domains.contains(d)) {
                stages.push(vec![domains::REMOVE_CUSTOM_DOMAINS]);
            }
        }
        stages
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        match step {
            domains::CUSTOM_DOMAINS => domains::ensure(ctx).await.map(Some),
            domains::REMOVE_CUSTOM_DOMAINS => domains::remove_dropped(ctx).await.map(|()| None),
            _ => rollout::run(ctx, step).await,
        }
    }

    async fn undo(&self, ctx: &StepCtx, step: &str, _: Option<&str>) -> StepResult<()> {
        match step {
            domains::CUSTOM_DOMAINS => domains::undo_ensure(ctx).await,
            // What was removed is gone; the domains' claims stay until the ending.
            domains::REMOVE_CUSTOM_DOMAINS => Ok(()),
            _ => rollout::undo(ctx, step).await,
        }
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
            instance.spec.custom_domains = spec.custom_domains;
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
