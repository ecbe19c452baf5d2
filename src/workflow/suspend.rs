//! Suspending (for example for non-payment): the site stops being served and its tasks
//! stop, and every byte of data stays — the database and its user, the EFS access point and
//! its files, the secret, the target group, the listener rule and the task definition are
//! left as they are. Only two things change: the host's listener rule answers with a fixed
//! "suspended" page instead of forwarding, and the ECS service's desired count is 0. The
//! instance keeps its `desired_count`, which a resume restores.
//!
//! Steps, in order (one per stage):
//! - `suspend_page`: the rule's action becomes a fixed response (503, text/html, a short
//!   page saying the site is suspended — visitors see why, instead of the 503 an ALB gives
//!   for a target group without targets). First, so no visitor meets a draining site.
//!   Idempotent: it reads the rule's action and changes only a forward to the instance's own
//!   target group (or an older fixed response); a forward anywhere else was changed outside
//!   this control plane and is fatal. It reads the action back and retries until ELBv2 shows
//!   the page.
//! - `stop_tasks`: UpdateService desiredCount 0 (an absolute value; repeating it is
//!   harmless).
//! - `wait_stopped`: polls the service until no task runs, as the environment's
//!   [`Readiness`](crate::cloud::Readiness) policy decides (on AWS: `runningCount` and
//!   `pendingCount` both 0 — tasks being stopped are first deregistered from the target
//!   group, which takes its deregistration delay). A desired count other than 0 means someone
//!   changed the service meanwhile: fatal.
//! - `record_duration`: records how long the attempt took, as the step's output and its
//!   event (`record_duration: done (suspended in 41.2 s, target 120 s)`), measured from when
//!   this attempt started to the end of `wait_stopped`. Above the target it also logs a
//!   warning.
//!
//! The suspension's reason is kept in the operation (`params.reason`, and the first event
//! "suspend requested: …"); the instance's `failure_reason` stays empty (nothing failed).
//!
//! Rollback (a later step failed for good, or the operation was cancelled), newest first:
//! `stop_tasks` is undone by restoring the instance's desired count and waiting until the
//! rollout is finished and the targets are healthy; `suspend_page` is undone by putting the
//! forward action back — after the targets are healthy, so there is no error window.
//!
//! Ending: completed, the instance is SUSPENDED. Failed or cancelled with a clean rollback,
//! it is ACTIVE again with a `failure_reason`. STUCK (an undo failed, or the deadline
//! passed) leaves it FAILED: the site may be suspended or half so; a retry of the operation
//! suspends again (FAILED → SUSPENDING), or the instance can be deleted.

use std::time::Duration;

use async_trait::async_trait;

use crate::cloud::{CloudEnv, RuleAction};
use crate::domain::{Instance, InstanceState, Operation, Verb};

use super::provision::{LISTENER_RULE, TARGET_GROUP, steadiness};
use super::restart::current_status;
use super::{Failure, StepCtx, StepError, StepResult, Workflow};

pub const SUSPEND_PAGE: &str = "suspend_page";
pub const STOP_TASKS: &str = "stop_tasks";
pub const WAIT_STOPPED: &str = "wait_stopped";
pub const RECORD_DURATION: &str = "record_duration";

/// How long a suspension should take on AWS (the seed's design).
pub const SUSPEND_TARGET: Duration = Duration::from_secs(120);

/// The HTTP status of the suspended page: 503 tells crawlers the site will be back.
pub const SUSPENDED_STATUS: u16 = 503;

/// The page visitors of a suspended site get (well under ELBv2's 1024 characters).
pub const SUSPENDED_PAGE: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>Site suspended</title></head><body style=\"font-family:sans-serif;margin:4em auto;\
max-width:36em\"><h1>This site is suspended</h1><p>This website is temporarily unavailable \
because its account has been suspended. Its content is kept and the site will be back as \
soon as the account is restored.</p><p>If this is your site, please contact support.</p>\
</body></html>";

/// The listener rule's action while the instance is suspended.
pub fn suspended_page() -> RuleAction {
    RuleAction::FixedResponse {
        status_code: SUSPENDED_STATUS,
        content_type: "text/html".into(),
        body: SUSPENDED_PAGE.into(),
    }
}

/// The params of a suspend operation: `{"reason": …}`.
pub fn params(reason: &str) -> serde_json::Value {
    serde_json::json!({ "reason": reason })
}

pub struct Suspend;

#[async_trait]
impl Workflow for Suspend {
    fn verb(&self) -> Verb {
        Verb::Suspend
    }

    fn plan(&self, _: &Operation, _: &Instance, _: &CloudEnv) -> Vec<Vec<&'static str>> {
        vec![
            vec![SUSPEND_PAGE],
            vec![STOP_TASKS],
            vec![WAIT_STOPPED],
            vec![RECORD_DURATION],
        ]
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        match step {
            SUSPEND_PAGE => show_page(ctx).await.map(Some),
            STOP_TASKS => stop_tasks(ctx).await.map(|()| None),
            WAIT_STOPPED => wait_stopped(ctx).await.map(|()| None),
            RECORD_DURATION => Ok(Some(duration_note(ctx, "suspended", SUSPEND_TARGET))),
            other => Err(StepError::Fatal(format!("unknown step {other}"))),
        }
    }

    async fn undo(&self, ctx: &StepCtx, step: &str, _: Option<&str>) -> StepResult<()> {
        match step {
            STOP_TASKS => start_and_wait(ctx).await,
            SUSPEND_PAGE => serve_site(ctx).await.map(drop),
            _ => Ok(()),
        }
    }

    fn rolls_back(&self) -> bool {
        true
    }

    fn running_state(&self) -> InstanceState {
        InstanceState::Suspending
    }

    fn on_complete(&self, instance: &mut Instance, _: &Operation, _: &CloudEnv) -> bool {
        instance.state = InstanceState::Suspended;
        instance.failure_reason = None;
        false
    }

    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool {
        instance.state = if failure.rolled_back {
            InstanceState::Active
        } else {
            InstanceState::Failed
        };
        instance.failure_reason = Some(format!("suspend: {}", failure.message));
        false
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(20 * 60)
    }
}

/// A resource the instance recorded when it was provisioned.
pub(super) fn recorded<'a>(ctx: &'a StepCtx, key: &str) -> StepResult<&'a str> {
    ctx.instance
        .resources
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| StepError::Fatal(format!("the instance recorded no {key}")))
}

/// Sets the rule's action to `want` unless it has it already; `replaceable` says which
/// current actions this control plane may replace (anything else was changed outside it).
/// Reads the action back: ELBv2 answers ModifyRule before DescribeRules may show it.
async fn set_action(
    ctx: &StepCtx,
    want: RuleAction,
    replaceable: impl Fn(&RuleAction) -> bool,
) -> StepResult<String> {
    let rules = super::provision::recorded_rules(recorded(ctx, LISTENER_RULE)?);
    for rule in &rules {
        set_rule_action(ctx, rule, &want, &replaceable).await?;
    }
    Ok(rules.join(","))
}

/// [`set_action`] of one of the instance's rules (it has one per three host names).
async fn set_rule_action(
    ctx: &StepCtx,
    rule: &str,
    want: &RuleAction,
    replaceable: impl Fn(&RuleAction) -> bool,
) -> StepResult<()> {
    let routing = &ctx.cloud.routing;
    let Some(current) = routing.rule_action(rule).await? else {
        return Err(StepError::Fatal(format!(
            "the listener rule {rule} is gone"
        )));
    };
    if current == *want {
        return Ok(());
    }
    if !replaceable(&current) {
        return Err(StepError::Fatal(format!(
            "the listener rule {rule} was changed outside this control plane: {current:?}"
        )));
    }
    routing.set_rule_action(rule, want).await?;
    match routing.rule_action(rule).await? {
        Some(now) if now == *want => Ok(()),
        _ => Err(StepError::Transient(
            "the rule's new action is not visible yet".into(),
        )),
    }
}

/// The rule answers with the suspended page (replacing a forward to the instance's own
/// target group, or another fixed response — an older version of the page).
pub(super) async fn show_page(ctx: &StepCtx) -> StepResult<String> {
    let own = recorded(ctx, TARGET_GROUP)?.to_owned();
    set_action(ctx, suspended_page(), |current| match current {
        RuleAction::Forward { target_group_arn } => *target_group_arn == own,
        RuleAction::FixedResponse { .. } => true,
        RuleAction::Other { .. } => false,
    })
    .await
}

/// The rule forwards to the instance's target group again (replacing a fixed response).
pub(super) async fn serve_site(ctx: &StepCtx) -> StepResult<String> {
    let forward = RuleAction::Forward {
        target_group_arn: recorded(ctx, TARGET_GROUP)?.to_owned(),
    };
    set_action(ctx, forward, |current| {
        matches!(current, RuleAction::FixedResponse { .. })
    })
    .await
}

/// Sets the service's desired count to `count` (absolute: repeating it is harmless).
async fn set_count(ctx: &StepCtx, count: u32) -> StepResult<()> {
    ctx.cloud
        .compute
        .update_service(
            &ctx.cloud.platform.cluster,
            &ctx.names.stack,
            Some(count),
            None,
            false,
        )
        .await?;
    Ok(())
}

pub(super) async fn stop_tasks(ctx: &StepCtx) -> StepResult<()> {
    set_count(ctx, 0).await
}

pub(super) async fn start_tasks(ctx: &StepCtx) -> StepResult<()> {
    set_count(ctx, ctx.instance.spec.desired_count).await
}

pub(super) async fn wait_stopped(ctx: &StepCtx) -> StepResult<()> {
    let status = current_status(ctx).await?;
    stopped(&status, ctx.cloud.readiness.as_ref())
}

/// Has every task stopped? Fatal when the service wants tasks again (changed outside this
/// operation); NotYet while tasks run or are pending.
pub fn stopped(
    status: &crate::cloud::ServiceStatus,
    readiness: &dyn crate::cloud::Readiness,
) -> StepResult<()> {
    if status.desired != 0 {
        return Err(StepError::Fatal(format!(
            "the service wants {} tasks, not 0: changed outside this operation",
            status.desired
        )));
    }
    if !readiness.tasks_stopped(status) {
        return Err(StepError::NotYet(format!(
            "{} tasks running, {} pending",
            status.running, status.pending
        )));
    }
    Ok(())
}

/// Is the service back at the instance's count, its rollout finished and enough targets
/// healthy (the platform's `min_healthy_targets`, else every desired task)?
pub(super) async fn steady(ctx: &StepCtx) -> StepResult<()> {
    let status = current_status(ctx).await?;
    let want = ctx.instance.spec.desired_count;
    if status.desired != want {
        return Err(StepError::Fatal(format!(
            "the service wants {} tasks, not {want}: changed outside this operation",
            status.desired
        )));
    }
    let healthy = ctx
        .cloud
        .routing
        .target_health(recorded(ctx, TARGET_GROUP)?)
        .await?
        .iter()
        .filter(|(_, state)| state == "healthy")
        .count();
    let healthy = u32::try_from(healthy).unwrap_or(u32::MAX);
    let required = ctx.cloud.platform.min_healthy_targets.unwrap_or(want);
    steadiness(&status, healthy, required, ctx.cloud.readiness.as_ref())
}

/// Undo of `stop_tasks`: the instance's count again, then wait until it is served.
async fn start_and_wait(ctx: &StepCtx) -> StepResult<()> {
    let status = current_status(ctx).await?;
    if status.desired != ctx.instance.spec.desired_count {
        start_tasks(ctx).await?;
        return Err(StepError::NotYet(
            "restored the desired count; waiting for the tasks".into(),
        ));
    }
    steady(ctx).await
}

/// Undo of `start_tasks`: the count 0 again, then wait until no task runs.
pub(super) async fn stop_and_wait(ctx: &StepCtx) -> StepResult<()> {
    let status = current_status(ctx).await?;
    if status.desired != 0 {
        stop_tasks(ctx).await?;
        return Err(StepError::NotYet(
            "set the desired count to 0; waiting for the tasks to stop".into(),
        ));
    }
    stopped(&status, ctx.cloud.readiness.as_ref())
}

/// "`done` in 12.3 s, target 120 s", measured on the engine's clock from the start of this
/// attempt; logs a warning when the target was missed.
pub(super) fn duration_note(ctx: &StepCtx, done: &str, target: Duration) -> String {
    let started = ctx
        .operation
        .params
        .get("attempt_started_at")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(ctx.operation.created_at.millis());
    let millis = (ctx.now.millis() - started).max(0);
    let seconds = millis as f64 / 1000.0;
    let note = format!("{done} in {seconds:.1} s, target {} s", target.as_secs());
    if millis > i64::try_from(target.as_millis()).unwrap_or(i64::MAX) {
        tracing::warn!(operation = %ctx.operation.id, %note, "slower than the target");
    } else {
        tracing::info!(operation = %ctx.operation.id, %note, "finished within the target");
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{AwsReadiness, EmulatorReadiness, ServiceStatus};

    fn status(desired: u32, running: u32, pending: u32) -> ServiceStatus {
        ServiceStatus {
            status: "ACTIVE".into(),
            desired,
            running,
            pending,
            rollout_state: Some("COMPLETED".into()),
            deployments: 1,
            task_definition: "td:1".into(),
            ..ServiceStatus::default()
        }
    }

    fn decide(sequence: &[ServiceStatus]) -> Vec<&'static str> {
        sequence
            .iter()
            .map(|s| match stopped(s, &AwsReadiness) {
                Ok(()) => "stopped",
                Err(StepError::NotYet(_)) => "waiting",
                Err(StepError::Fatal(_) | StepError::Refused { .. }) => "fatal",
                Err(StepError::Transient(_)) => "transient",
            })
            .collect()
    }

    #[test]
    fn tasks_drain_one_at_a_time_before_the_service_counts_as_stopped() {
        // Two tasks deregister from the target group (the deregistration delay) and stop
        // one after the other once the count is 0.
        assert_eq!(
            decide(&[status(0, 2, 0), status(0, 1, 0), status(0, 0, 0)]),
            vec!["waiting", "waiting", "stopped"]
        );
        // Suspended while a deployment was still starting a task: the PENDING one has to
        // go too.
        assert_eq!(
            decide(&[status(0, 1, 1), status(0, 0, 1), status(0, 0, 0)]),
            vec!["waiting", "waiting", "stopped"]
        );
        // Someone scaled the service up again while it drained: fatal (the rollback then
        // restores the instance's count and the forward rule).
        assert_eq!(
            decide(&[status(0, 2, 0), status(2, 2, 0)]),
            vec!["waiting", "fatal"]
        );
    }

    #[test]
    fn an_emulator_runs_no_task_so_none_is_left() {
        assert_eq!(stopped(&status(0, 2, 1), &EmulatorReadiness), Ok(()));
        assert!(matches!(
            stopped(&status(2, 0, 0), &EmulatorReadiness),
            Err(StepError::Fatal(_))
        ));
    }

    #[test]
    fn the_page_fits_a_fixed_response() {
        assert!(SUSPENDED_PAGE.chars().count() <= crate::cloud::FIXED_RESPONSE_BODY_MAX);
        assert!(SUSPENDED_PAGE.contains("This site is suspended"));
    }
}
