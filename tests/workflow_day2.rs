//! Day-2 operations end to end, in process, on moto and MariaDB: RestartInstance and
//! ScaleInstance through the gRPC API, the service checked with direct ECS SDK calls.

mod common;
mod platform;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use instance_manager::domain::{Environment, Operation, Verb};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use instance_manager::workflow::{StepError, StepHook, StepResult};
use platform::{ControlPlane, metadata};
use tokio::sync::Notify;
use tonic::Code;
use tonic_types::StatusExt;

/// Holds `wait_rollout` of every operation of `verb` until released.
struct HoldRollout {
    verb: Verb,
    reached: Notify,
    release: Notify,
}

#[async_trait]
impl StepHook for HoldRollout {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == "wait_rollout" && operation.verb == self.verb {
            self.reached.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

/// Fails `wait_rollout` of scale operations for good, as a failed ECS rollout would.
struct RolloutFails;

#[async_trait]
impl StepHook for RolloutFails {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == "wait_rollout" && operation.verb == Verb::Scale {
            return Err(StepError::Fatal("injected: the rollout failed".into()));
        }
        Ok(())
    }
}

fn name(tenant: &str) -> String {
    format!("tenants/{tenant}/instances/wp")
}

fn scale_request(tenant: &str, count: i32, cpu: i32, memory: i32) -> v1::ScaleInstanceRequest {
    v1::ScaleInstanceRequest {
        name: name(tenant),
        desired_count: count,
        cpu,
        memory_mib: memory,
        request_id: String::new(),
    }
}

async fn provisioned(cp: &mut ControlPlane, prefix: &str) -> String {
    let tenant = platform::tenant(prefix);
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    tenant
}

async fn scale(cp: &mut ControlPlane, request: v1::ScaleInstanceRequest) -> lro::Operation {
    cp.instances
        .scale_instance(request)
        .await
        .unwrap()
        .into_inner()
}

async fn restart(cp: &mut ControlPlane, tenant: &str) -> Result<lro::Operation, tonic::Status> {
    cp.instances
        .restart_instance(v1::RestartInstanceRequest {
            name: name(tenant),
            request_id: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The service as ECS describes it: (desired count, task definition ARN, primary deployment).
async fn service(cp: &ControlPlane, tenant: &str) -> (i32, String, String) {
    let ecs = aws_sdk_ecs::Client::new(&cp.sdk(Environment::Dev));
    let cloud = cp.cloud(Environment::Dev).await;
    let names = instance_manager::domain::naming::ResourceNames::derive(
        &instance_manager::domain::TenantId::parse(tenant).unwrap(),
        Environment::Dev,
    );
    let answer = ecs
        .describe_services()
        .cluster(&cloud.platform.cluster)
        .services(&names.stack)
        .send()
        .await
        .unwrap();
    let service = &answer.services()[0];
    let primary = service
        .deployments()
        .iter()
        .find(|d| d.status() == Some("PRIMARY"))
        .and_then(|d| d.id())
        .unwrap_or_default()
        .to_owned();
    (
        service.desired_count(),
        service.task_definition().unwrap().to_owned(),
        primary,
    )
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

#[tokio::test]
async fn restart_forces_a_deployment_and_goes_through_restarting() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hold = Arc::new(HoldRollout {
        verb: Verb::Restart,
        reached: Notify::new(),
        release: Notify::new(),
    });
    let mut cp = platform::start(config, Some(hold.clone())).await;
    let tenant = provisioned(&mut cp, "restart").await;
    let (_, definition, deployment) = service(&cp, &tenant).await;
    let mut stream = cp
        .instances
        .watch_instance(v1::WatchInstanceRequest {
            name: name(&tenant),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let mut seen = vec![first.instance.unwrap().state()];
    assert_eq!(seen, vec![v1::InstanceState::Active]);
    let operation = restart(&mut cp, &tenant).await.unwrap();
    hold.reached.notified().await;
    let mut released = false;
    while seen.len() < 3 {
        let change = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("a state change")
            .unwrap()
            .unwrap();
        seen.push(change.instance.unwrap().state());
        if !released {
            hold.release.notify_one();
            released = true;
        }
    }
    assert_eq!(
        seen,
        vec![
            v1::InstanceState::Active,
            v1::InstanceState::Restarting,
            v1::InstanceState::Active
        ]
    );
    let done = cp.completed(&operation.name).await;
    // A new deployment, the one the step recorded, of the same task definition and count.
    let (count, after_definition, after_deployment) = service(&cp, &tenant).await;
    assert_ne!(after_deployment, deployment);
    assert_eq!(step_resource(&done, "force_deployment"), after_deployment);
    assert_eq!((count, after_definition), (2, definition));
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert!(instance.current_operation.is_empty() || instance.current_operation == done.name);
}

#[tokio::test]
async fn scale_changes_the_count_then_the_size_with_a_new_revision() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "scale").await;
    let (_, first_revision, _) = service(&cp, &tenant).await;

    // The count alone: no new revision.
    let mut request = scale_request(&tenant, 3, 0, 0);
    request.request_id = uuid::Uuid::new_v4().to_string();
    let operation = scale(&mut cp, request.clone()).await;
    // A replay is the same operation.
    assert_eq!(scale(&mut cp, request).await.name, operation.name);
    let done = cp.completed(&operation.name).await;
    let steps: Vec<_> = metadata(&done)
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(steps, vec!["update_service", "wait_rollout"]);
    assert_eq!(service(&cp, &tenant).await.0, 3);
    assert_eq!(service(&cp, &tenant).await.1, first_revision);
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert_eq!(
        (instance.desired_count, instance.cpu, instance.memory_mib),
        (3, 512, 1024)
    );

    // The size: a new revision, used by the service, recorded on the instance.
    let operation = scale(&mut cp, scale_request(&tenant, 0, 1024, 2048)).await;
    let done = cp.completed(&operation.name).await;
    let (count, revision, _) = service(&cp, &tenant).await;
    assert_eq!(count, 3);
    assert_ne!(revision, first_revision);
    assert_eq!(step_resource(&done, "task_definition"), revision);
    let ecs = aws_sdk_ecs::Client::new(&cp.sdk(Environment::Dev));
    let described = ecs
        .describe_task_definition()
        .task_definition(&revision)
        .send()
        .await
        .unwrap();
    let definition = described.task_definition().unwrap();
    assert_eq!(definition.cpu(), Some("1024"));
    assert_eq!(definition.memory(), Some("2048"));
    let instance = cp.instance(&tenant).await;
    assert_eq!(
        (instance.desired_count, instance.cpu, instance.memory_mib),
        (3, 1024, 2048)
    );
    assert_eq!(instance.resources.get("task_definition"), Some(&revision));
}

#[tokio::test]
async fn scale_refuses_nothing_to_change_out_of_bounds_and_reused_request_ids() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "scalebad").await;
    for (request, field) in [
        (scale_request(&tenant, 0, 0, 0), "desired_count"),
        // The instance already runs 2 tasks of 512 / 1024.
        (scale_request(&tenant, 2, 512, 0), "desired_count"),
        (scale_request(&tenant, 11, 0, 0), "desired_count"),
        (scale_request(&tenant, 1, 0, 0), "desired_count"),
        (scale_request(&tenant, 0, 256, 4096), "memory_mib"),
        (scale_request(&tenant, 0, 300, 0), "cpu"),
        (scale_request(&tenant, 0, 0, -1), "memory_mib"),
    ] {
        let error = cp
            .instances
            .scale_instance(request.clone())
            .await
            .unwrap_err();
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
    // Unknown instances are NOT_FOUND; a request_id reused for another payload is refused.
    let error = restart(&mut cp, &platform::tenant("nobody"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    let mut request = scale_request(&tenant, 3, 0, 0);
    request.request_id = uuid::Uuid::new_v4().to_string();
    let operation = scale(&mut cp, request.clone()).await;
    request.desired_count = 4;
    let error = cp.instances.scale_instance(request).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    cp.completed(&operation.name).await;
    // Nothing else was started.
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert_eq!(instance.desired_count, 3);
}

#[tokio::test]
async fn scale_or_restart_during_a_restart_is_aborted() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hold = Arc::new(HoldRollout {
        verb: Verb::Restart,
        reached: Notify::new(),
        release: Notify::new(),
    });
    let mut cp = platform::start(config, Some(hold.clone())).await;
    let tenant = provisioned(&mut cp, "busy").await;
    let operation = restart(&mut cp, &tenant).await.unwrap();
    hold.reached.notified().await;
    let error = cp
        .instances
        .scale_instance(scale_request(&tenant, 4, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Aborted, "{error:?}");
    let error = restart(&mut cp, &tenant).await.unwrap_err();
    assert_eq!(error.code(), Code::Aborted, "{error:?}");
    hold.release.notify_one();
    cp.completed(&operation.name).await;
    assert_eq!(service(&cp, &tenant).await.0, 2);
    // Once it is done, the instance can be scaled.
    let operation = scale(&mut cp, scale_request(&tenant, 4, 0, 0)).await;
    cp.completed(&operation.name).await;
    assert_eq!(service(&cp, &tenant).await.0, 4);
}

#[tokio::test]
async fn a_failed_rollout_puts_the_service_back() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, Some(Arc::new(RolloutFails))).await;
    let tenant = provisioned(&mut cp, "scalefail").await;
    let (_, revision, _) = service(&cp, &tenant).await;
    let operation = scale(&mut cp, scale_request(&tenant, 5, 1024, 2048)).await;
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    let undone: Vec<_> = metadata(&done)
        .steps
        .iter()
        .filter(|s| s.status() == v1::StepStatus::Undone)
        .map(|s| s.name.clone())
        .collect();
    assert!(undone.contains(&"update_service".to_owned()), "{undone:?}");
    // The service is back on the previous revision and count.
    let (count, after, _) = service(&cp, &tenant).await;
    assert_eq!((count, after), (2, revision.clone()));
    // The instance is ACTIVE with its previous spec, and says what went wrong.
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert_eq!(
        (instance.desired_count, instance.cpu, instance.memory_mib),
        (2, 512, 1024)
    );
    assert_eq!(instance.resources.get("task_definition"), Some(&revision));
    assert!(
        instance.failure_reason.contains("rollout failed"),
        "{:?}",
        instance.failure_reason
    );
}

/// Fails `wait_rollout` of a scale's first attempt only.
struct FirstRolloutFails;

#[async_trait]
impl StepHook for FirstRolloutFails {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == "wait_rollout" && operation.verb == Verb::Scale && operation.attempt == 1 {
            return Err(StepError::Fatal("injected: the rollout failed".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_scale_can_be_retried() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, Some(Arc::new(FirstRolloutFails))).await;
    let tenant = provisioned(&mut cp, "scaleretry").await;
    let operation = scale(&mut cp, scale_request(&tenant, 3, 1024, 2048)).await;
    let (_, done) = cp.watch(&operation.name).await;
    assert_eq!(metadata(&done).status(), v1::OperationStatus::Failed);
    assert_eq!(service(&cp, &tenant).await.0, 2);
    let retried = cp
        .instances
        .retry_operation(v1::RetryOperationRequest {
            name: operation.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.name, operation.name);
    let done = cp.completed(&operation.name).await;
    assert_eq!(metadata(&done).attempt, 2);
    let (count, revision, _) = service(&cp, &tenant).await;
    assert_eq!(count, 3);
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert_eq!(
        (instance.desired_count, instance.cpu, instance.memory_mib),
        (3, 1024, 2048)
    );
    assert_eq!(instance.resources.get("task_definition"), Some(&revision));
}

/// After the first `force_deployment` has forced its deployment, notes the service's
/// primary deployment and fails the step as a crash before its outcome was recorded would.
struct ForgetFirstDeployment {
    ecs: std::sync::OnceLock<(aws_sdk_ecs::Client, String)>,
    forced: std::sync::Mutex<Option<String>>,
}

#[async_trait]
impl StepHook for ForgetFirstDeployment {
    async fn after(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step != "force_deployment" || self.forced.lock().unwrap().is_some() {
            return Ok(());
        }
        let (ecs, cluster) = self.ecs.get().unwrap();
        let names = instance_manager::domain::naming::ResourceNames::derive(
            &operation.target.tenant,
            Environment::Dev,
        );
        let answer = ecs
            .describe_services()
            .cluster(cluster)
            .services(&names.stack)
            .send()
            .await
            .unwrap();
        let primary = answer.services()[0]
            .deployments()
            .iter()
            .find(|d| d.status() == Some("PRIMARY"))
            .and_then(|d| d.id())
            .unwrap()
            .to_owned();
        *self.forced.lock().unwrap() = Some(primary);
        Err(StepError::Transient("injected: lost the outcome".into()))
    }
}

#[tokio::test]
async fn a_repeated_force_deployment_adopts_the_deployment_it_started() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hook = Arc::new(ForgetFirstDeployment {
        ecs: std::sync::OnceLock::new(),
        forced: std::sync::Mutex::new(None),
    });
    let mut cp = platform::start(config, Some(hook.clone())).await;
    let cluster = cp.cloud(Environment::Dev).await.platform.cluster.clone();
    let _ = hook
        .ecs
        .set((aws_sdk_ecs::Client::new(&cp.sdk(Environment::Dev)), cluster));
    let tenant = provisioned(&mut cp, "adopt").await;
    let operation = restart(&mut cp, &tenant).await.unwrap();
    let done = cp.completed(&operation.name).await;
    let forced = hook.forced.lock().unwrap().clone().expect("the hook ran");
    // The step ran twice; the second run adopted the first deployment, forcing no other.
    assert_eq!(step_resource(&done, "force_deployment"), forced);
    assert_eq!(service(&cp, &tenant).await.2, forced);
}

#[tokio::test]
async fn scale_goes_through_scaling_in_watch_instance() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hold = Arc::new(HoldRollout {
        verb: Verb::Scale,
        reached: Notify::new(),
        release: Notify::new(),
    });
    let mut cp = platform::start(config, Some(hold.clone())).await;
    let tenant = provisioned(&mut cp, "scalewatch").await;
    let mut stream = cp
        .instances
        .watch_instance(v1::WatchInstanceRequest {
            name: name(&tenant),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let mut seen = vec![first.instance.unwrap().state()];
    let operation = scale(&mut cp, scale_request(&tenant, 4, 0, 0)).await;
    // Held in wait_rollout: the watcher sees SCALING before the operation can end.
    hold.reached.notified().await;
    let mut released = false;
    let mut counts = Vec::new();
    while seen.len() < 3 {
        let change = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("a state change")
            .unwrap()
            .unwrap()
            .instance
            .unwrap();
        seen.push(change.state());
        counts.push(change.desired_count);
        if !released {
            hold.release.notify_one();
            released = true;
        }
    }
    assert_eq!(
        seen,
        vec![
            v1::InstanceState::Active,
            v1::InstanceState::Scaling,
            v1::InstanceState::Active
        ]
    );
    // The record takes the new count when the scale completes, not before.
    assert_eq!(counts, vec![2, 4]);
    cp.completed(&operation.name).await;
    assert_eq!(service(&cp, &tenant).await.0, 4);
}

/// Fails `wait_rollout` of a restart's first attempt only, as ECS's circuit breaker would.
struct FirstRestartFails;

#[async_trait]
impl StepHook for FirstRestartFails {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == "wait_rollout" && operation.verb == Verb::Restart && operation.attempt == 1 {
            return Err(StepError::Fatal("injected: the deployment failed".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_restart_leaves_the_site_active_and_can_be_retried() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, Some(Arc::new(FirstRestartFails))).await;
    let tenant = provisioned(&mut cp, "restartretry").await;
    let operation = restart(&mut cp, &tenant).await.unwrap();
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert!(
        instance.failure_reason.starts_with("restart:")
            && instance.failure_reason.contains("deployment failed"),
        "{:?}",
        instance.failure_reason
    );
    let (_, _, first_deployment) = service(&cp, &tenant).await;
    let retried = cp
        .instances
        .retry_operation(v1::RetryOperationRequest {
            name: operation.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.name, operation.name);
    let done = cp.completed(&operation.name).await;
    assert_eq!(metadata(&done).attempt, 2);
    // The first attempt's deployment failed: the retry forced one of its own and waited
    // for that one.
    let (_, _, deployment) = service(&cp, &tenant).await;
    assert_ne!(deployment, first_deployment);
    assert_eq!(step_resource(&done, "force_deployment"), deployment);
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert!(instance.failure_reason.is_empty());
}
