//! Resuming a SUSPENDED instance: its tasks start again and, once they serve, the host's
//! listener rule forwards to them again instead of answering with the suspended page.
//! Nothing else changes (see [`super::suspend`]: the data, secret and access point were
//! kept).
//!
//! Steps, in order (one per stage):
//! - `start_tasks`: UpdateService desiredCount = the instance's `desired_count` (absolute;
//!   repeating it is harmless).
//! - `wait_rollout`: polls until the rollout is finished (one deployment, on AWS COMPLETED
//!   with every desired task running — the same decision as restart and provisioning) and
//!   enough targets are healthy (the platform's `min_healthy_targets`, else every desired
//!   task). A desired count other than the instance's means someone changed the service
//!   meanwhile: fatal. So is the rollout timeout (`rollout_timeout_ms` in the params, the
//!   server's `rollout_timeout` as for scale and update) passing with the tasks still not
//!   steady and healthy: the resume then rolls back to SUSPENDED instead of waiting for the
//!   operation's deadline.
//! - `serve_site`: the rule forwards to the instance's target group again — only now, with
//!   healthy targets, so visitors go from the suspended page straight to the site, never to
//!   an error. Idempotent: it reads the rule's action, replaces only a fixed response (a
//!   forward elsewhere is fatal), and reads it back.
//! - `record_duration`: how long the attempt took, as the step's output and event
//!   (`record_duration: done (resumed in 95.0 s, target 300 s)`); a warning above the target.
//!
//! Rollback, newest first: `serve_site` is undone by showing the suspended page again,
//! `start_tasks` by setting the count to 0 and waiting until no task runs.
//!
//! Ending: completed, the instance is ACTIVE. Failed or cancelled with a clean rollback, it
//! is SUSPENDED again with a `failure_reason`. STUCK leaves it FAILED; a retry of the
//! operation resumes again (FAILED → RESUMING), or the instance can be deleted.

use std::time::Duration;

use async_trait::async_trait;

use crate::cloud::CloudEnv;
use crate::domain::{Instance, InstanceState, Operation, Verb};

use super::restart::WAIT_ROLLOUT;
use super::rollout::rollout_deadline;
use super::suspend::{
    RECORD_DURATION, duration_note, serve_site, show_page, start_tasks, steady, stop_and_wait,
};
use super::{Failure, StepCtx, StepError, StepResult, Workflow};

pub const START_TASKS: &str = "start_tasks";
pub const SERVE_SITE: &str = "serve_site";

/// How long a resume should take on AWS (the seed's design).
pub const RESUME_TARGET: Duration = Duration::from_secs(300);

pub struct Resume;

#[async_trait]
impl Workflow for Resume {
    fn verb(&self) -> Verb {
        Verb::Resume
    }

    fn plan(&self, _: &Operation, _: &Instance, _: &CloudEnv) -> Vec<Vec<&'static str>> {
        vec![
            vec![START_TASKS],
            vec![WAIT_ROLLOUT],
            vec![SERVE_SITE],
            vec![RECORD_DURATION],
        ]
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        match step {
            START_TASKS => start_tasks(ctx).await.map(|()| None),
            WAIT_ROLLOUT => wait_rollout(ctx).await.map(|()| None),
            SERVE_SITE => serve_site(ctx).await.map(Some),
            RECORD_DURATION => Ok(Some(duration_note(ctx, "resumed", RESUME_TARGET))),
            other => Err(StepError::Fatal(format!("unknown step {other}"))),
        }
    }

    async fn undo(&self, ctx: &StepCtx, step: &str, _: Option<&str>) -> StepResult<()> {
        match step {
            SERVE_SITE => show_page(ctx).await.map(drop),
            START_TASKS => stop_and_wait(ctx).await,
            _ => Ok(()),
        }
    }

    fn rolls_back(&self) -> bool {
        true
    }

    fn running_state(&self) -> InstanceState {
        InstanceState::Resuming
    }

    fn on_complete(&self, instance: &mut Instance, _: &Operation, _: &CloudEnv) -> bool {
        instance.state = InstanceState::Active;
        instance.failure_reason = None;
        false
    }

    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool {
        instance.state = if failure.rolled_back {
            InstanceState::Suspended
        } else {
            InstanceState::Failed
        };
        instance.failure_reason = Some(format!("resume: {}", failure.message));
        false
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(30 * 60)
    }
}

/// The params of a resume operation: `{"rollout_timeout_ms": …}` when there is a timeout.
pub fn params(rollout_timeout: Option<Duration>) -> serde_json::Value {
    let mut params = serde_json::json!({});
    if let Some(timeout) = rollout_timeout {
        params["rollout_timeout_ms"] =
            serde_json::json!(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
    }
    params
}

/// Steady and healthy, or fatal once the rollout timeout (if any) has passed without.
async fn wait_rollout(ctx: &StepCtx) -> StepResult<()> {
    match steady(ctx).await {
        Err(StepError::NotYet(detail)) => {
            if let Some(deadline) = rollout_deadline(&ctx.operation)
                && ctx.now >= deadline
            {
                let secs = ctx.operation.params["rollout_timeout_ms"]
                    .as_i64()
                    .unwrap_or_default()
                    / 1000;
                return Err(StepError::Fatal(format!(
                    "the tasks did not become steady and healthy within {secs} s ({detail})"
                )));
            }
            Err(StepError::NotYet(detail))
        }
        other => other,
    }
}
