//! Rolling the instance's ECS service onto a new task-definition revision and/or task
//! count: the steps that scaling and updating share.
//!
//! An operation that rolls carries, in its params (written when it is created):
//! - `target`: the count, size and (for an update) the WordPress image and tag to run;
//! - `previous`: what the instance recorded before (count, size, image, tag and the
//!   task-definition ARN), to go back to;
//! - `rollout_timeout_ms` (optional): how long the new tasks may take to become steady and
//!   healthy, counted from the start of the attempt on the engine's clock.
//!
//! Steps:
//! - `task_definition` (only when the size, image or tag changes): registers the new
//!   revision; the adapter reuses the family's latest active revision when it is identical,
//!   so a resumed step registers nothing new.
//! - `update_service`: points the service at the revision and count — absolute values, so
//!   repeating it is harmless.
//! - `wait_rollout`: waits until ECS reports the rollout finished on that revision with the
//!   target count. It fails for good when ECS's deployment circuit breaker rolled the
//!   deployment back (the primary deployment FAILED, or the service runs another revision)
//!   or when the rollout timeout passes with the new tasks still not steady and healthy.
//!
//! A failed rollout rolls back: the undo of `update_service` puts the service back on the
//! previous revision and count (when ECS's circuit breaker already did, there is nothing to
//! do) and waits until ECS shows it. A registered revision is not deregistered by the
//! rollback (the service may still be draining tasks of it, and a later change to the same
//! size and image reuses it); deprovisioning removes every revision of the family.

use serde::{Deserialize, Serialize};

use crate::domain::{Instance, Operation, Timestamp};

use super::provision::{ACCESS_POINT, SECRET, TASK_DEFINITION, task_definition_spec};
use super::restart::{current_status, rollout_finished};
use super::{StepCtx, StepError, StepResult};

pub const UPDATE_SERVICE: &str = "update_service";
pub use super::restart::WAIT_ROLLOUT;

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

/// What the service should run. Empty image fields (a scale) mean "the instance's".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    #[serde(flatten)]
    pub size: Size,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wordpress_image: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wordpress_version: String,
}

impl Target {
    /// A new count and/or size with the instance's image.
    pub fn size(size: Size) -> Self {
        Self {
            size,
            wordpress_image: String::new(),
            wordpress_version: String::new(),
        }
    }

    /// The image reference `repository:tag` to run, given what the instance runs now.
    fn image(&self, instance: &Instance) -> String {
        let pick = |mine: &str, theirs: &str| {
            if mine.is_empty() {
                theirs.to_owned()
            } else {
                mine.to_owned()
            }
        };
        format!(
            "{}:{}",
            pick(&self.wordpress_image, &instance.spec.wordpress_image),
            pick(&self.wordpress_version, &instance.spec.wordpress_version)
        )
    }
}

/// What the service ran before the operation, to go back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Previous {
    #[serde(flatten)]
    pub size: Size,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wordpress_image: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wordpress_version: String,
    /// The task definition the instance recorded (empty if none).
    pub task_definition: String,
}

impl Previous {
    pub fn of(instance: &Instance) -> Self {
        Self {
            size: Size::of(instance),
            wordpress_image: instance.spec.wordpress_image.clone(),
            wordpress_version: instance.spec.wordpress_version.clone(),
            task_definition: instance
                .resources
                .get(TASK_DEFINITION)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// The params of a rolling operation.
pub fn params(
    target: &Target,
    previous: &Previous,
    rollout_timeout: Option<std::time::Duration>,
) -> serde_json::Value {
    let mut params = serde_json::json!({ "target": target, "previous": previous });
    if let Some(timeout) = rollout_timeout {
        params["rollout_timeout_ms"] =
            serde_json::json!(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
    }
    params
}

pub fn target(operation: &Operation) -> StepResult<Target> {
    serde_json::from_value(operation.params["target"].clone())
        .map_err(|e| StepError::Fatal(format!("the operation has no valid target: {e}")))
}

pub fn previous(operation: &Operation) -> StepResult<Previous> {
    serde_json::from_value(operation.params["previous"].clone())
        .map_err(|e| StepError::Fatal(format!("the operation has no valid previous size: {e}")))
}

/// A retry rolls back to what the instance runs now, not to what it ran when the operation
/// was first requested.
pub fn refresh_previous(operation: &mut Operation, instance: &Instance) {
    operation.params["previous"] = serde_json::to_value(Previous::of(instance)).unwrap_or_default();
}

/// Whether the operation needs a new task-definition revision (size, image or tag).
pub fn needs_revision(operation: &Operation) -> bool {
    let (Ok(target), Ok(previous)) = (target(operation), previous(operation)) else {
        return false;
    };
    let changed = |mine: &str, theirs: &str| !mine.is_empty() && mine != theirs;
    (target.size.cpu, target.size.memory_mib) != (previous.size.cpu, previous.size.memory_mib)
        || changed(&target.wordpress_image, &previous.wordpress_image)
        || changed(&target.wordpress_version, &previous.wordpress_version)
}

/// The stages of a rolling operation.
pub fn plan(operation: &Operation) -> Vec<Vec<&'static str>> {
    let mut stages = Vec::new();
    if needs_revision(operation) {
        stages.push(vec![TASK_DEFINITION]);
    }
    stages.push(vec![UPDATE_SERVICE]);
    stages.push(vec![WAIT_ROLLOUT]);
    stages
}

/// Runs one of the rolling steps.
pub async fn run(ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
    match step {
        TASK_DEFINITION => register_revision(ctx).await.map(Some),
        UPDATE_SERVICE => update_service(ctx).await.map(Some),
        WAIT_ROLLOUT => wait_rollout(ctx).await.map(|()| None),
        other => Err(StepError::Fatal(format!("unknown step {other}"))),
    }
}

/// Undoes one of the rolling steps.
pub async fn undo(ctx: &StepCtx, step: &str) -> StepResult<()> {
    match step {
        UPDATE_SERVICE => restore_service(ctx).await,
        // See the module documentation: the revision stays registered.
        _ => Ok(()),
    }
}

/// Applies a completed operation's target to the instance record: count, size, image and
/// the task-definition revision the service now runs.
pub fn apply(instance: &mut Instance, operation: &Operation) {
    if let Ok(target) = target(operation) {
        instance.spec.desired_count = target.size.desired_count;
        instance.spec.cpu = target.size.cpu;
        instance.spec.memory_mib = target.size.memory_mib;
        if !target.wordpress_image.is_empty() {
            instance.spec.wordpress_image = target.wordpress_image;
        }
        if !target.wordpress_version.is_empty() {
            instance.spec.wordpress_version = target.wordpress_version;
        }
    }
    if let Some(arn) = operation
        .steps
        .iter()
        .find(|s| s.name == TASK_DEFINITION)
        .and_then(|s| s.resource_id.clone())
    {
        instance.resources.insert(TASK_DEFINITION.into(), arn);
    }
}

async fn register_revision(ctx: &StepCtx) -> StepResult<String> {
    let target = target(&ctx.operation)?;
    let resource = |key: &str| {
        ctx.instance
            .resources
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| StepError::Fatal(format!("the instance recorded no {key}")))
    };
    let mut definition = task_definition_spec(
        ctx,
        target.size.cpu,
        target.size.memory_mib,
        resource(ACCESS_POINT)?,
        resource(SECRET)?,
    );
    definition.image = target.image(&ctx.instance);
    Ok(ctx
        .cloud
        .compute
        .register_task_definition(&definition)
        .await?)
}

/// Sets the service's count and (if a revision was registered) revision. Returns the
/// revision the service uses.
async fn update_service(ctx: &StepCtx) -> StepResult<String> {
    let target = target(&ctx.operation)?;
    let revision = ctx.output(TASK_DEFINITION);
    ctx.cloud
        .compute
        .update_service(
            &ctx.cloud.platform.cluster,
            &ctx.names.stack,
            Some(target.size.desired_count),
            revision,
            false,
        )
        .await?;
    Ok(current_status(ctx).await?.task_definition)
}

/// When the rollout of this attempt must have finished, if the operation sets a timeout.
pub(super) fn rollout_deadline(operation: &Operation) -> Option<Timestamp> {
    let timeout = operation.params.get("rollout_timeout_ms")?.as_i64()?;
    let started = operation
        .params
        .get("attempt_started_at")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(operation.created_at.millis());
    Some(Timestamp(started).plus_millis(timeout))
}

async fn wait_rollout(ctx: &StepCtx) -> StepResult<()> {
    let target = target(&ctx.operation)?;
    let status = current_status(ctx).await?;
    let finished = rollout_finished(
        &status,
        None,
        ctx.output(TASK_DEFINITION),
        ctx.cloud.readiness.as_ref(),
    );
    match finished {
        Err(StepError::NotYet(detail)) => {
            if let Some(deadline) = rollout_deadline(&ctx.operation)
                && ctx.now >= deadline
            {
                let secs = ctx.operation.params["rollout_timeout_ms"]
                    .as_i64()
                    .unwrap_or_default()
                    / 1000;
                return Err(StepError::Fatal(format!(
                    "the new tasks did not become steady and healthy within {secs} s ({detail})"
                )));
            }
            return Err(StepError::NotYet(detail));
        }
        other => other?,
    }
    if status.desired != target.size.desired_count {
        return Err(StepError::Fatal(format!(
            "the service wants {} tasks, not {}: changed outside this operation",
            status.desired, target.size.desired_count
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{InstanceName, Verb};

    fn operation(target: &Target, previous: &Previous) -> Operation {
        let mut operation = Operation::new(
            Verb::Update,
            InstanceName::parse("tenants/acme/instances/wp1").unwrap(),
            Vec::new(),
            None,
            Timestamp(1_000),
        );
        operation.params = params(target, previous, Some(std::time::Duration::from_secs(60)));
        operation
    }

    fn before() -> Previous {
        Previous {
            size: Size {
                desired_count: 2,
                cpu: 512,
                memory_mib: 1024,
            },
            wordpress_image: "wordpress".into(),
            wordpress_version: "6.7".into(),
            task_definition: "td:1".into(),
        }
    }

    #[test]
    fn a_revision_is_needed_for_a_new_size_image_or_tag_only() {
        let previous = before();
        let count_only = Target::size(Size {
            desired_count: 4,
            ..previous.size
        });
        assert_eq!(
            plan(&operation(&count_only, &previous)),
            vec![vec![UPDATE_SERVICE], vec![WAIT_ROLLOUT]]
        );
        let same_image = Target {
            size: previous.size,
            wordpress_image: "wordpress".into(),
            wordpress_version: "6.7".into(),
        };
        assert!(!needs_revision(&operation(&same_image, &previous)));
        let new_tag = Target {
            wordpress_version: "6.8".into(),
            ..same_image.clone()
        };
        assert_eq!(
            plan(&operation(&new_tag, &previous)),
            vec![
                vec![TASK_DEFINITION],
                vec![UPDATE_SERVICE],
                vec![WAIT_ROLLOUT]
            ]
        );
        let bigger = Target::size(Size {
            cpu: 1024,
            memory_mib: 2048,
            ..previous.size
        });
        assert!(needs_revision(&operation(&bigger, &previous)));
    }

    #[test]
    fn old_scale_params_still_read() {
        // Written before images were part of the target.
        let mut operation = operation(&Target::size(before().size), &before());
        operation.params = serde_json::json!({
            "target": {"desired_count": 3, "cpu": 512, "memory_mib": 1024},
            "previous": {"desired_count": 2, "cpu": 512, "memory_mib": 1024, "task_definition": "td:1"},
        });
        assert_eq!(target(&operation).unwrap().size.desired_count, 3);
        assert!(target(&operation).unwrap().wordpress_image.is_empty());
        assert!(!needs_revision(&operation));
        assert_eq!(rollout_deadline(&operation), None);
    }

    #[test]
    fn the_rollout_deadline_counts_from_the_attempt() {
        let mut operation = operation(&Target::size(before().size), &before());
        assert_eq!(rollout_deadline(&operation), Some(Timestamp(61_000)));
        operation.params["attempt_started_at"] = serde_json::json!(5_000);
        assert_eq!(rollout_deadline(&operation), Some(Timestamp(65_000)));
    }
}
