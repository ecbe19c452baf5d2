//! SuspendInstance and ResumeInstance end to end, in process, on moto and MariaDB: states
//! through WatchInstance, the listener rule's action and the service's count checked with
//! the ELBv2 and ECS SDKs directly, the tenant's data through its own database login.

mod common;
mod platform;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2::types::ActionTypeEnum;
use instance_manager::cloud::{
    AwsReadiness, CloudEnv, CloudResult, Compute, EmulatorReadiness, Readiness, ServiceStatus,
};
use instance_manager::domain::{Environment, Operation, Verb};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use instance_manager::workflow::{EngineOptions, ManualClock, StepError, StepHook, StepResult};
use mysql_async::prelude::Queryable;
use platform::compute::{Changed, ComputeChanges};
use platform::{ControlPlane, metadata};
use tokio::sync::Notify;
use tonic::Code;
use tonic_types::StatusExt;

/// Holds one step of every operation of `verb` until released.
struct Hold {
    verb: Verb,
    step: &'static str,
    reached: Notify,
    release: Notify,
}

impl Hold {
    fn new(verb: Verb, step: &'static str) -> Arc<Self> {
        Arc::new(Self {
            verb,
            step,
            reached: Notify::new(),
            release: Notify::new(),
        })
    }
}

/// Several hooks, each asked in turn.
struct Hooks(Vec<Arc<dyn StepHook>>);

#[async_trait]
impl StepHook for Hooks {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        for hook in &self.0 {
            hook.before(operation, step).await?;
        }
        Ok(())
    }
    async fn after(&self, operation: &Operation, step: &str) -> StepResult<()> {
        for hook in &self.0 {
            hook.after(operation, step).await?;
        }
        Ok(())
    }
    async fn before_undo(&self, operation: &Operation, step: &str) -> StepResult<()> {
        for hook in &self.0 {
            hook.before_undo(operation, step).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl StepHook for Hold {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == self.step && operation.verb == self.verb {
            self.reached.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

/// Fails `step` of the first attempt of `verb` operations for good, after its action ran
/// (so the undo has something to undo).
struct FirstAttemptFails {
    verb: Verb,
    step: &'static str,
}

#[async_trait]
impl StepHook for FirstAttemptFails {
    async fn after(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == self.step && operation.verb == self.verb && operation.attempt == 1 {
            return Err(StepError::Fatal(format!("injected: {step} failed")));
        }
        Ok(())
    }
}

/// Fails the undo of `step` in the first attempt of `verb` operations.
struct FirstUndoFails {
    verb: Verb,
    step: &'static str,
}

#[async_trait]
impl StepHook for FirstUndoFails {
    async fn before_undo(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == self.step && operation.verb == self.verb && operation.attempt == 1 {
            return Err(StepError::Fatal(format!("injected: undoing {step} failed")));
        }
        Ok(())
    }
}

fn name(tenant: &str) -> String {
    format!("tenants/{tenant}/instances/wp")
}

fn suspend_request(tenant: &str, reason: &str) -> v1::SuspendInstanceRequest {
    v1::SuspendInstanceRequest {
        name: name(tenant),
        reason: reason.into(),
        request_id: String::new(),
    }
}

async fn suspend(
    cp: &mut ControlPlane,
    request: v1::SuspendInstanceRequest,
) -> Result<lro::Operation, tonic::Status> {
    cp.instances
        .suspend_instance(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn resume(cp: &mut ControlPlane, tenant: &str) -> Result<lro::Operation, tonic::Status> {
    cp.instances
        .resume_instance(v1::ResumeInstanceRequest {
            name: name(tenant),
            request_id: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn retry(cp: &mut ControlPlane, operation: &str) -> lro::Operation {
    cp.instances
        .retry_operation(v1::RetryOperationRequest {
            name: operation.into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn provisioned(cp: &mut ControlPlane, prefix: &str) -> String {
    let tenant = platform::tenant(prefix);
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    tenant
}

/// What the ALB and ECS say about the instance, through their SDKs.
struct Observed {
    /// The host rule's action type and, for a fixed response, (status, content type, body);
    /// for a forward, the target group.
    action: ActionTypeEnum,
    fixed: Option<(String, String, String)>,
    forward_to: Option<String>,
    desired_count: i32,
}

async fn observe(cp: &ControlPlane, tenant: &str) -> Observed {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let instance = cp.client().instance(tenant).await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let rules = elb
        .describe_rules()
        .rule_arns(&instance.resources["listener_rule"])
        .send()
        .await
        .unwrap();
    let [rule] = rules.rules() else {
        panic!("not one rule: {rules:?}");
    };
    let [action] = rule.actions() else {
        panic!("not one action: {rule:?}");
    };
    let fixed = action.fixed_response_config().map(|c| {
        (
            c.status_code().unwrap_or_default().to_owned(),
            c.content_type().unwrap_or_default().to_owned(),
            c.message_body().unwrap_or_default().to_owned(),
        )
    });
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let names = instance_manager::domain::naming::ResourceNames::derive(
        &instance_manager::domain::TenantId::parse(tenant).unwrap(),
        Environment::Dev,
    );
    let services = ecs
        .describe_services()
        .cluster(&cloud.platform.cluster)
        .services(&names.stack)
        .send()
        .await
        .unwrap();
    Observed {
        action: action.r#type().unwrap().clone(),
        fixed,
        forward_to: action.target_group_arn().map(str::to_owned),
        desired_count: services.services()[0].desired_count(),
    }
}

/// Asserts the rule forwards to the instance's target group and the service wants its
/// count.
async fn assert_serving(cp: &mut ControlPlane, tenant: &str) {
    let instance = cp.instance(tenant).await;
    let observed = observe(cp, tenant).await;
    assert_eq!(observed.action, ActionTypeEnum::Forward);
    assert_eq!(
        observed.forward_to.as_deref(),
        Some(instance.resources["target_group"].as_str())
    );
    assert_eq!(observed.desired_count, instance.desired_count);
}

/// Asserts the rule answers with the suspended page and the service wants no task.
async fn assert_suspended(cp: &ControlPlane, tenant: &str) {
    let observed = observe(cp, tenant).await;
    assert_eq!(observed.action, ActionTypeEnum::FixedResponse);
    let (status, content_type, body) = observed.fixed.expect("a fixed-response config");
    assert_eq!(
        (status.as_str(), content_type.as_str()),
        ("503", "text/html")
    );
    assert!(body.contains("This site is suspended"), "{body}");
    assert!(body.chars().count() <= 1024);
    assert_eq!(observed.forward_to, None);
    assert_eq!(observed.desired_count, 0);
}

/// The instance's states as WatchInstance reports them until `last` is reached (60 s at
/// most), starting with the current one.
async fn states_until(
    stream: &mut tonic::Streaming<v1::WatchInstanceResponse>,
    seen: &mut Vec<v1::InstanceState>,
    last: v1::InstanceState,
) {
    while seen.last() != Some(&last) {
        let change = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .unwrap_or_else(|_| panic!("no state change after {seen:?}"))
            .unwrap()
            .expect("the stream goes on");
        seen.push(change.instance.unwrap().state());
    }
}

async fn watch(cp: &mut ControlPlane, tenant: &str) -> tonic::Streaming<v1::WatchInstanceResponse> {
    cp.instances
        .watch_instance(v1::WatchInstanceRequest { name: name(tenant) })
        .await
        .unwrap()
        .into_inner()
}

/// The tenant's secret as Secrets Manager holds it (JSON with the database login).
async fn secret_value(cp: &ControlPlane, secret: &str) -> String {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    aws_sdk_secretsmanager::Client::new(&sdk)
        .get_secret_value()
        .secret_id(secret)
        .send()
        .await
        .unwrap()
        .secret_string()
        .unwrap()
        .to_owned()
}

async fn tenant_login(secret_json: &str) -> mysql_async::Conn {
    let value: serde_json::Value = serde_json::from_str(secret_json).unwrap();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(value["host"].as_str().unwrap())
        .tcp_port(value["port"].as_u64().unwrap() as u16)
        .user(value["username"].as_str())
        .pass(value["password"].as_str())
        .db_name(value["dbname"].as_str());
    mysql_async::Conn::new(opts)
        .await
        .expect("the tenant user logs in")
}

/// The access point's id and root directory, if EFS knows it.
async fn access_point(cp: &ControlPlane, id: &str) -> Option<(String, String)> {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let answer = aws_sdk_efs::Client::new(&sdk)
        .describe_access_points()
        .access_point_id(id)
        .send()
        .await
        .ok()?;
    answer.access_points().first().map(|ap| {
        (
            ap.access_point_id().unwrap().to_owned(),
            ap.root_directory()
                .and_then(|r| r.path())
                .unwrap_or_default()
                .to_owned(),
        )
    })
}

fn step_names(operation: &lro::Operation) -> Vec<String> {
    metadata(operation)
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect()
}

fn step_resource(operation: &lro::Operation, step: &str) -> String {
    metadata(operation)
        .steps
        .iter()
        .find(|s| s.name == step)
        .unwrap_or_else(|| panic!("no step {step}"))
        .resource_id
        .clone()
}

fn undone(operation: &lro::Operation) -> Vec<String> {
    metadata(operation)
        .steps
        .iter()
        .filter(|s| s.status() == v1::StepStatus::Undone)
        .map(|s| s.name.clone())
        .collect()
}

#[tokio::test]
async fn suspend_then_resume_keeps_the_data_and_shows_the_page_meanwhile() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hold_suspend = Hold::new(Verb::Suspend, "wait_stopped");
    let hold_resume = Hold::new(Verb::Resume, "serve_site");
    let hooks: Arc<dyn StepHook> = Arc::new(Hooks(vec![hold_suspend.clone(), hold_resume.clone()]));
    let mut cp = platform::start(config, Some(hooks)).await;
    let tenant = provisioned(&mut cp, "suspend").await;
    let before = cp.instance(&tenant).await;
    assert_serving(&mut cp, &tenant).await;

    // Rows written through the tenant's own login, with the password from the secret.
    let secret = secret_value(&cp, &before.resources["secret"]).await;
    let mut conn = tenant_login(&secret).await;
    conn.query_drop("CREATE TABLE wp_posts_probe (id INT PRIMARY KEY, title TEXT)")
        .await
        .unwrap();
    conn.query_drop("INSERT INTO wp_posts_probe VALUES (1, 'hello'), (2, 'world')")
        .await
        .unwrap();
    drop(conn);
    let access_point_id = before.resources["access_point"].clone();
    let ap_before = access_point(&cp, &access_point_id)
        .await
        .expect("the access point");

    // Suspend, watched: ACTIVE -> SUSPENDING -> SUSPENDED.
    let mut stream = watch(&mut cp, &tenant).await;
    let mut seen = vec![
        stream
            .message()
            .await
            .unwrap()
            .unwrap()
            .instance
            .unwrap()
            .state(),
    ];
    let mut request = suspend_request(&tenant, "non-payment: invoice 2026-11");
    request.request_id = uuid::Uuid::new_v4().to_string();
    let operation = suspend(&mut cp, request.clone()).await.unwrap();
    // A replay is the same operation.
    assert_eq!(
        suspend(&mut cp, request).await.unwrap().name,
        operation.name
    );
    hold_suspend.reached.notified().await;
    states_until(&mut stream, &mut seen, v1::InstanceState::Suspending).await;
    // The page is up before the tasks are gone; meanwhile the instance is busy.
    let observed = observe(&cp, &tenant).await;
    assert_eq!(observed.action, ActionTypeEnum::FixedResponse);
    assert_eq!(observed.desired_count, 0);
    for error in [
        suspend(&mut cp, suspend_request(&tenant, "again"))
            .await
            .unwrap_err(),
        resume(&mut cp, &tenant).await.unwrap_err(),
        cp.instances
            .delete_instance(v1::DeleteInstanceRequest {
                name: name(&tenant),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(error.code(), Code::Aborted, "{error:?}");
    }
    hold_suspend.release.notify_one();
    states_until(&mut stream, &mut seen, v1::InstanceState::Suspended).await;
    assert_eq!(
        seen,
        vec![
            v1::InstanceState::Active,
            v1::InstanceState::Suspending,
            v1::InstanceState::Suspended
        ]
    );
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Completed,
        "{events:#?}"
    );
    assert_eq!(
        step_names(&done),
        vec![
            "suspend_page",
            "stop_tasks",
            "wait_stopped",
            "record_duration"
        ]
    );
    assert!(
        events[0].message.contains("non-payment: invoice 2026-11"),
        "{:?}",
        events[0]
    );
    let duration = step_resource(&done, "record_duration");
    assert!(
        duration.starts_with("suspended in ") && duration.ends_with(", target 120 s"),
        "{duration}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.step == "record_duration" && e.message.contains(&duration)),
        "{events:#?}"
    );
    assert_suspended(&cp, &tenant).await;
    let suspended = cp.instance(&tenant).await;
    assert_eq!(suspended.state(), v1::InstanceState::Suspended);
    assert_eq!(suspended.failure_reason, "");
    // The instance keeps its count for the resume.
    assert_eq!(suspended.desired_count, before.desired_count);

    // A suspended instance cannot be suspended, restarted or scaled.
    let error = suspend(&mut cp, suspend_request(&tenant, "twice"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("only ACTIVE"), "{error:?}");
    let error = cp
        .instances
        .restart_instance(v1::RestartInstanceRequest {
            name: name(&tenant),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");

    // Resume, watched: SUSPENDED -> RESUMING -> ACTIVE; the rule forwards only once the
    // tasks are back.
    let operation = resume(&mut cp, &tenant).await.unwrap();
    hold_resume.reached.notified().await;
    states_until(&mut stream, &mut seen, v1::InstanceState::Resuming).await;
    let observed = observe(&cp, &tenant).await;
    assert_eq!(observed.action, ActionTypeEnum::FixedResponse);
    assert_eq!(observed.desired_count, before.desired_count);
    hold_resume.release.notify_one();
    states_until(&mut stream, &mut seen, v1::InstanceState::Active).await;
    assert_eq!(
        seen[3..],
        [v1::InstanceState::Resuming, v1::InstanceState::Active]
    );
    let done = cp.completed(&operation.name).await;
    assert_eq!(
        step_names(&done),
        vec![
            "start_tasks",
            "wait_rollout",
            "serve_site",
            "record_duration"
        ]
    );
    let duration = step_resource(&done, "record_duration");
    assert!(
        duration.starts_with("resumed in ") && duration.ends_with(", target 300 s"),
        "{duration}"
    );
    assert_serving(&mut cp, &tenant).await;
    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert_eq!(after.resources, before.resources);

    // Every byte kept: the rows, the secret, the access point.
    assert_eq!(secret_value(&cp, &after.resources["secret"]).await, secret);
    let mut conn = tenant_login(&secret).await;
    let rows: Vec<(i32, String)> = conn
        .query("SELECT id, title FROM wp_posts_probe ORDER BY id")
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, "hello".into()), (2, "world".into())]);
    drop(conn);
    assert_eq!(access_point(&cp, &access_point_id).await, Some(ap_before));

    // An ACTIVE instance cannot be resumed.
    let error = resume(&mut cp, &tenant).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("only SUSPENDED"), "{error:?}");
    let deleted = cp.delete_skipping_archive(&tenant).await;
    cp.completed(&deleted).await;
}

#[tokio::test]
async fn bad_suspend_and_resume_requests_are_refused_and_change_nothing() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "suspendbad").await;
    let too_long = "x".repeat(501);
    for (request, field) in [
        (suspend_request(&tenant, &too_long), "reason"),
        (suspend_request(&tenant, "two\nlines"), "reason"),
        (suspend_request("Not A Tenant", "x"), "name"),
        (
            v1::SuspendInstanceRequest {
                request_id: "not an id!".into(),
                ..suspend_request(&tenant, "x")
            },
            "request_id",
        ),
    ] {
        let error = suspend(&mut cp, request.clone()).await.unwrap_err();
        assert_eq!(
            error.code(),
            Code::InvalidArgument,
            "{request:?}: {error:?}"
        );
        let fields: Vec<String> = error
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("no BadRequest in {error:?}"))
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, vec![field.to_owned()], "{request:?}: {error:?}");
    }
    // 500 characters is the bound, not above it.
    assert!(
        suspend_request(&tenant, &"x".repeat(500))
            .reason
            .chars()
            .count()
            == 500
    );
    let error = cp
        .instances
        .resume_instance(v1::ResumeInstanceRequest {
            name: "tenants//instances/wp".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    let error = resume(&mut cp, &platform::tenant("nobody"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    // Resuming an ACTIVE instance is a wrong state.
    let error = resume(&mut cp, &tenant).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    // Nothing was started: the instance is ACTIVE and served.
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert!(instance.current_operation.is_empty(), "{instance:?}");
    assert_serving(&mut cp, &tenant).await;

    // A request_id reused for another reason is refused; the first request (a reason of
    // exactly the 500 characters allowed) runs.
    let mut request = suspend_request(&tenant, &"y".repeat(500));
    request.request_id = uuid::Uuid::new_v4().to_string();
    let operation = suspend(&mut cp, request.clone()).await.unwrap();
    request.reason = "another reason".into();
    let error = suspend(&mut cp, request).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    cp.completed(&operation.name).await;
    assert_suspended(&cp, &tenant).await;
}

#[tokio::test]
async fn a_suspend_failing_late_rolls_back_to_active_and_a_retry_suspends() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hook = Arc::new(FirstAttemptFails {
        verb: Verb::Suspend,
        step: "wait_stopped",
    });
    let mut cp = platform::start(config, Some(hook)).await;
    let tenant = provisioned(&mut cp, "suspendfail").await;
    let operation = suspend(&mut cp, suspend_request(&tenant, "non-payment"))
        .await
        .unwrap();
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    let undone = undone(&done);
    assert!(
        undone.contains(&"suspend_page".to_owned()) && undone.contains(&"stop_tasks".to_owned()),
        "{undone:?}"
    );
    // Served again: the forward rule and the count are back; the instance says why.
    assert_serving(&mut cp, &tenant).await;
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert!(
        instance.failure_reason.starts_with("suspend: ")
            && instance.failure_reason.contains("injected"),
        "{:?}",
        instance.failure_reason
    );

    let retried = retry(&mut cp, &operation.name).await;
    assert_eq!(retried.name, operation.name);
    let done = cp.completed(&operation.name).await;
    assert_eq!(metadata(&done).attempt, 2);
    assert_suspended(&cp, &tenant).await;
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Suspended);
    assert_eq!(instance.failure_reason, "");
}

#[tokio::test]
async fn a_stuck_suspend_leaves_the_instance_failed_and_a_retry_suspends_it() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hooks: Arc<dyn StepHook> = Arc::new(Hooks(vec![
        Arc::new(FirstAttemptFails {
            verb: Verb::Suspend,
            step: "wait_stopped",
        }),
        Arc::new(FirstUndoFails {
            verb: Verb::Suspend,
            step: "stop_tasks",
        }),
    ]));
    let mut cp = platform::start(config, Some(hooks)).await;
    let tenant = provisioned(&mut cp, "suspendstuck").await;
    let operation = suspend(&mut cp, suspend_request(&tenant, "non-payment"))
        .await
        .unwrap();
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Stuck,
        "{events:#?}"
    );
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Failed);
    assert!(
        instance.failure_reason.starts_with("suspend: "),
        "{:?}",
        instance.failure_reason
    );
    // Half suspended: the forward rule is back, the count is not.
    let observed = observe(&cp, &tenant).await;
    assert_eq!(observed.action, ActionTypeEnum::Forward);
    assert_eq!(observed.desired_count, 0);

    // FAILED -> SUSPENDING -> SUSPENDED.
    retry(&mut cp, &operation.name).await;
    let done = cp.completed(&operation.name).await;
    assert_eq!(metadata(&done).attempt, 2);
    assert_suspended(&cp, &tenant).await;
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Suspended
    );
}

#[tokio::test]
async fn a_resume_failing_late_goes_back_to_suspended_and_a_retry_resumes() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hook = Arc::new(FirstAttemptFails {
        verb: Verb::Resume,
        step: "serve_site",
    });
    let mut cp = platform::start(config, Some(hook)).await;
    let tenant = provisioned(&mut cp, "resumefail").await;
    let operation = suspend(&mut cp, suspend_request(&tenant, ""))
        .await
        .unwrap();
    cp.completed(&operation.name).await;
    let operation = resume(&mut cp, &tenant).await.unwrap();
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    let undone = undone(&done);
    assert!(
        undone.contains(&"serve_site".to_owned()) && undone.contains(&"start_tasks".to_owned()),
        "{undone:?}"
    );
    // The page is back (serve_site had forwarded) and the tasks are stopped again.
    assert_suspended(&cp, &tenant).await;
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Suspended);
    assert!(
        instance.failure_reason.starts_with("resume: "),
        "{:?}",
        instance.failure_reason
    );

    retry(&mut cp, &operation.name).await;
    let done = cp.completed(&operation.name).await;
    assert_eq!(metadata(&done).attempt, 2);
    assert_serving(&mut cp, &tenant).await;
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Active
    );
}

#[tokio::test]
async fn deleting_a_suspended_instance_leaves_nothing() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "suspenddel").await;
    let cloud = cp.cloud(Environment::Dev).await;
    assert!(
        !platform::inventory_of(&cloud, &tenant, "wp")
            .await
            .is_empty()
    );
    let operation = suspend(&mut cp, suspend_request(&tenant, "closing"))
        .await
        .unwrap();
    cp.completed(&operation.name).await;
    assert_suspended(&cp, &tenant).await;
    let deleted = cp.delete(&tenant).await;
    cp.completed(&deleted).await;
    let inventory = platform::inventory_of(&cloud, &tenant, "wp").await;
    assert!(inventory.is_empty(), "{inventory:?}");
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Deprovisioned
    );
}

/// ECS as AWS shows it. A service scaled to zero: its two tasks drain one after the other
/// (each waits out the deregistration delay), so successive DescribeServices report
/// `runningCount` 2, 2, 1, 1, 0. With `never_steady` set, a service with tasks to run
/// never gets them running (they fail their health checks): the rollout stays IN_PROGRESS.
struct DrainingCompute {
    inner: Arc<dyn Compute>,
    /// The running counts reported for the service at desired 0, in order.
    reported: Arc<std::sync::Mutex<Vec<u32>>>,
    never_steady: Arc<AtomicBool>,
}

const DRAINING: [u32; 5] = [2, 2, 1, 1, 0];

#[async_trait]
impl ComputeChanges for DrainingCompute {
    fn inner(&self) -> &dyn Compute {
        self.inner.as_ref()
    }
    async fn service_status(
        &self,
        cluster: &str,
        name: &str,
    ) -> CloudResult<Option<ServiceStatus>> {
        let mut status = self.inner.service_status(cluster, name).await?;
        if let Some(status) = &mut status
            && status.desired == 0
        {
            let mut reported = self.reported.lock().unwrap();
            status.running = DRAINING[reported.len().min(DRAINING.len() - 1)];
            status.pending = 0;
            reported.push(status.running);
        }
        if let Some(status) = &mut status
            && status.desired > 0
            && self.never_steady.load(Ordering::SeqCst)
        {
            status.running = 0;
            status.pending = status.desired;
            status.rollout_state = Some("IN_PROGRESS".into());
            status.deployments = 2;
        }
        Ok(status)
    }
}

/// AWS's rule for stopped tasks; the emulator's for rollouts (moto never finishes one, so
/// provisioning could not complete under AWS's).
struct AwsStoppedRule;

impl Readiness for AwsStoppedRule {
    fn rollout_done(&self, status: &ServiceStatus) -> bool {
        EmulatorReadiness.rollout_done(status)
    }
    fn task_succeeded(&self, exit_code: Option<i32>) -> bool {
        EmulatorReadiness.task_succeeded(exit_code)
    }
    fn tasks_stopped(&self, status: &ServiceStatus) -> bool {
        AwsReadiness.tasks_stopped(status)
    }
}

#[tokio::test]
async fn on_aws_a_suspend_waits_until_the_last_task_has_drained() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let reported = Arc::new(std::sync::Mutex::new(Vec::new()));
    let shared = reported.clone();
    let wrap: platform::CloudWrapper = Arc::new(move |mut cloud: CloudEnv| {
        cloud.compute = Arc::new(Changed(DrainingCompute {
            inner: cloud.compute.clone(),
            reported: shared.clone(),
            never_steady: Arc::new(AtomicBool::new(false)),
        }));
        cloud.readiness = Arc::new(AwsStoppedRule);
        cloud
    });
    let mut cp =
        platform::start_with(config, EngineOptions::default(), |store| store, Some(wrap)).await;
    let tenant = provisioned(&mut cp, "suspenddrain").await;
    assert!(reported.lock().unwrap().is_empty());
    let operation = suspend(&mut cp, suspend_request(&tenant, "non-payment"))
        .await
        .unwrap();
    let done = cp.completed(&operation.name).await;
    // wait_stopped polled through the drain and finished at the first report of none.
    assert_eq!(*reported.lock().unwrap(), DRAINING.to_vec());
    assert_eq!(
        step_names(&done),
        vec![
            "suspend_page",
            "stop_tasks",
            "wait_stopped",
            "record_duration"
        ]
    );
    assert_suspended(&cp, &tenant).await;
}

#[tokio::test]
async fn a_resume_never_healthy_goes_back_to_suspended_at_the_rollout_timeout() {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    config.rollout_timeout_secs = 600;
    let never_steady = Arc::new(AtomicBool::new(false));
    let flag = never_steady.clone();
    let wrap: platform::CloudWrapper = Arc::new(move |mut cloud: CloudEnv| {
        cloud.compute = Arc::new(Changed(DrainingCompute {
            inner: cloud.compute.clone(),
            reported: Arc::new(std::sync::Mutex::new(Vec::new())),
            never_steady: flag.clone(),
        }));
        cloud
    });
    // The engine's clock is ours: the timeout passes when the test says so.
    let clock = ManualClock::new();
    let options = EngineOptions {
        clock: clock.clone(),
        ..EngineOptions::default()
    };
    let mut cp = platform::start_with(config, options, |store| store, Some(wrap)).await;
    let tenant = provisioned(&mut cp, "resumetimeout").await;
    let operation = suspend(&mut cp, suspend_request(&tenant, "non-payment"))
        .await
        .unwrap();
    cp.completed(&operation.name).await;
    // From now on the tasks never pass their health checks.
    never_steady.store(true, Ordering::SeqCst);
    let operation = resume(&mut cp, &tenant).await.unwrap();
    cp.wait_for_step(&operation.name, "wait_rollout", v1::StepStatus::Running)
        .await;
    // Still waiting, with the page up: nothing has given up yet.
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Resuming
    );
    assert_eq!(
        observe(&cp, &tenant).await.action,
        ActionTypeEnum::FixedResponse
    );
    clock.advance(Duration::from_secs(601));
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    let failed = metadata(&done)
        .steps
        .into_iter()
        .find(|s| s.name == "wait_rollout")
        .unwrap();
    assert!(failed.error.contains("within 600 s"), "{:?}", failed.error);
    assert!(
        undone(&done).contains(&"start_tasks".to_owned()),
        "{done:?}"
    );
    // Back to SUSPENDED: the page stays, the count is 0 again.
    assert_suspended(&cp, &tenant).await;
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Suspended);
    assert!(
        instance.failure_reason.contains("within 600 s"),
        "{:?}",
        instance.failure_reason
    );
}
