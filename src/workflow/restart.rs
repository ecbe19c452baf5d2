//! Restarting: force a new deployment of the instance's ECS service (every task replaced,
//! same task definition and count) and wait until the rollout has finished.
//!
//! Idempotence of `force_deployment`: the step records the id of the deployment it started.
//! Before forcing one, it looks at the service's primary deployment: one created at or after
//! the moment this attempt of the restart started already replaces every task that ran
//! before it, so a resumed step (a crash between the
//! UpdateService call and the recording of its outcome) adopts it instead of forcing a
//! second one. Clock skew between the control plane and ECS: with ECS's clock behind, a
//! resumed step may force one more deployment (harmless); with it ahead by more than the
//! time between the request and the claim, a deployment started just before the request
//! would be adopted. The recorded id also lets `wait_rollout` notice that ECS's circuit
//! breaker replaced the deployment with a rollback.
//!
//! Ending: success or failure, the instance returns to ACTIVE — a restart changes nothing
//! the instance records, and the site keeps running on whatever ECS has (ECS's circuit
//! breaker rolls a failed deployment back). A failure is reported in `failure_reason`.
//! There is nothing to undo (`rolls_back` is false). A retry (RetryOperation) forces a new
//! deployment rather than waiting again for the one that failed.

use std::time::Duration;

use async_trait::async_trait;

use crate::cloud::{CloudEnv, Readiness, ServiceStatus};
use crate::domain::{Instance, InstanceState, Operation, Verb};

use super::{Failure, StepCtx, StepError, StepResult, Workflow};

pub const FORCE_DEPLOYMENT: &str = "force_deployment";
pub const WAIT_ROLLOUT: &str = "wait_rollout";

pub struct Restart;

#[async_trait]
impl Workflow for Restart {
    fn verb(&self) -> Verb {
        Verb::Restart
    }

    fn plan(&self, _: &Operation, _: &Instance, _: &CloudEnv) -> Vec<Vec<&'static str>> {
        vec![vec![FORCE_DEPLOYMENT], vec![WAIT_ROLLOUT]]
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        match step {
            FORCE_DEPLOYMENT => force_deployment(ctx).await.map(Some),
            WAIT_ROLLOUT => {
                let status = current_status(ctx).await?;
                let expected = ctx.output(FORCE_DEPLOYMENT);
                rollout_finished(&status, expected, None, ctx.cloud.readiness.as_ref())
                    .map(|()| None)
            }
            other => Err(StepError::Fatal(format!("unknown step {other}"))),
        }
    }

    async fn undo(&self, _: &StepCtx, _: &str, _: Option<&str>) -> StepResult<()> {
        Ok(())
    }

    fn rolls_back(&self) -> bool {
        false
    }

    fn running_state(&self) -> InstanceState {
        InstanceState::Restarting
    }

    fn on_complete(&self, instance: &mut Instance, _: &Operation, _: &CloudEnv) -> bool {
        instance.state = InstanceState::Active;
        instance.failure_reason = None;
        false
    }

    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool {
        instance.state = InstanceState::Active;
        instance.failure_reason = Some(format!("restart: {}", failure.message));
        false
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(20 * 60)
    }

    /// A retried restart forces a deployment of its own: the one the failed attempt forced
    /// was rolled back or never finished, and waiting for it again would fail again.
    fn on_retry(&self, operation: &mut Operation, _: &Instance) {
        for step in &mut operation.steps {
            if step.name == FORCE_DEPLOYMENT {
                step.status = crate::domain::StepStatus::Pending;
                step.resource_id = None;
                step.error = None;
            }
        }
    }
}

/// The instance's service as ECS reports it now; its absence is fatal.
pub async fn current_status(ctx: &StepCtx) -> StepResult<ServiceStatus> {
    ctx.cloud
        .compute
        .service_status(&ctx.cloud.platform.cluster, &ctx.names.stack)
        .await?
        .filter(|status| status.status != "DRAINING")
        .ok_or_else(|| StepError::Fatal(format!("the ECS service {} is gone", ctx.names.stack)))
}

async fn force_deployment(ctx: &StepCtx) -> StepResult<String> {
    let cluster = &ctx.cloud.platform.cluster;
    // The start of this attempt (a retry's deployment must be newer than the retry).
    let requested_at = ctx
        .operation
        .params
        .get("attempt_started_at")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(ctx.operation.created_at.millis());
    let before = current_status(ctx).await?;
    if let (Some(id), Some(created)) = (&before.primary_deployment, before.primary_created_at_ms)
        && created >= requested_at
    {
        tracing::info!(deployment = %id, "adopting the deployment started since the restart was requested");
        return Ok(id.clone());
    }
    ctx.cloud
        .compute
        .update_service(cluster, &ctx.names.stack, None, None, true)
        .await?;
    let after = current_status(ctx).await?;
    match after.primary_deployment {
        Some(id) if before.primary_deployment.as_ref() != Some(&id) => Ok(id),
        // ECS answered before the new deployment shows: look again (the next run adopts it).
        _ => Err(StepError::Transient(
            "the forced deployment is not visible yet".into(),
        )),
    }
}

/// Has the rollout finished? NotYet while it runs; Fatal when it failed — the primary
/// deployment reports FAILED, or it is no longer `deployment` (ECS's circuit breaker
/// replaced it with a rollback), or the service no longer uses `task_definition`.
/// Finished: one deployment, the readiness policy satisfied (on AWS: COMPLETED, every
/// desired task running).
pub fn rollout_finished(
    status: &ServiceStatus,
    deployment: Option<&str>,
    task_definition: Option<&str>,
    readiness: &dyn Readiness,
) -> StepResult<()> {
    if status.rollout_state.as_deref() == Some("FAILED") {
        return Err(StepError::Fatal(
            "the deployment failed and ECS rolled it back".into(),
        ));
    }
    if let Some(expected) = deployment
        && status
            .primary_deployment
            .as_deref()
            .is_some_and(|id| id != expected)
    {
        return Err(StepError::Fatal(format!(
            "deployment {expected} was replaced (rolled back) by {}",
            status.primary_deployment.as_deref().unwrap_or_default()
        )));
    }
    if let Some(expected) = task_definition
        && status.task_definition != expected
    {
        return Err(StepError::Fatal(format!(
            "the service runs {} instead of {expected} (rolled back)",
            status.task_definition
        )));
    }
    if status.status != "ACTIVE" {
        return Err(StepError::NotYet(format!("service is {}", status.status)));
    }
    if status.deployments > 1 || !readiness.rollout_done(status) {
        return Err(StepError::NotYet(format!(
            "{}/{} tasks running, {} deployments, rollout {:?}",
            status.running, status.desired, status.deployments, status.rollout_state,
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{AwsReadiness, EmulatorReadiness};

    fn status(running: u32, deployments: u32, rollout: Option<&str>) -> ServiceStatus {
        ServiceStatus {
            status: "ACTIVE".into(),
            desired: 2,
            running,
            rollout_state: rollout.map(str::to_owned),
            deployments,
            task_definition: "td:2".into(),
            primary_deployment: Some("ecs-svc/2".into()),
            ..ServiceStatus::default()
        }
    }

    fn check(status: &ServiceStatus, deployment: Option<&str>, td: Option<&str>) -> StepResult<()> {
        rollout_finished(status, deployment, td, &AwsReadiness)
    }

    #[test]
    fn a_rollout_is_finished_completed_with_every_task_running() {
        let done = status(2, 1, Some("COMPLETED"));
        assert_eq!(check(&done, Some("ecs-svc/2"), Some("td:2")), Ok(()));
        for pending in [
            status(1, 1, Some("COMPLETED")),
            status(2, 2, Some("COMPLETED")),
            status(2, 1, Some("IN_PROGRESS")),
        ] {
            assert!(matches!(
                check(&pending, Some("ecs-svc/2"), None),
                Err(StepError::NotYet(_))
            ));
        }
        // An emulator shows no tasks; one deployment is enough there.
        assert_eq!(
            rollout_finished(
                &status(0, 1, Some("IN_PROGRESS")),
                None,
                None,
                &EmulatorReadiness
            ),
            Ok(())
        );
    }

    #[test]
    fn a_failed_or_replaced_rollout_is_fatal() {
        let fatal = |result: StepResult<()>| matches!(result, Err(StepError::Fatal(_)));
        assert!(fatal(check(&status(2, 1, Some("FAILED")), None, None)));
        // The circuit breaker rolled our deployment back: another one is primary.
        assert!(fatal(check(
            &status(2, 1, Some("COMPLETED")),
            Some("ecs-svc/1"),
            None
        )));
        // Or the service went back to another revision.
        assert!(fatal(check(
            &status(2, 1, Some("COMPLETED")),
            None,
            Some("td:3")
        )));
    }
}
