//! UpdateInstance end to end, in process, on moto and MariaDB: update masks and etags, a new
//! image rolled out as a new task-definition revision, record-only changes that touch
//! nothing in AWS, and rollouts that fail the two ways ECS fails them — the deployment
//! circuit breaker rolls back, or the new tasks never become healthy before the rollout
//! timeout — each leaving the service on its previous revision. The service is read with
//! direct ECS SDK calls; the failing rollouts are realistic ECS state sequences played by a
//! wrapper around the real (moto) adapter.

mod common;
mod platform;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use instance_manager::cloud::{CloudEnv, CloudResult, Compute, ServiceStatus};
use instance_manager::domain::{Environment, Operation, Verb};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use instance_manager::workflow::{EngineOptions, ManualClock, StepHook, StepResult};
use platform::compute::{Changed, ComputeChanges};
use platform::{ControlPlane, metadata};
use tokio::sync::Notify;
use tonic::Code;
use tonic_types::StatusExt;

fn name(tenant: &str) -> String {
    format!("tenants/{tenant}/instances/wp")
}

async fn provisioned(cp: &mut ControlPlane, prefix: &str) -> String {
    let tenant = platform::tenant(prefix);
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    tenant
}

fn request(instance: v1::Instance, paths: &[&str]) -> v1::UpdateInstanceRequest {
    v1::UpdateInstanceRequest {
        instance: Some(instance),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        request_id: String::new(),
    }
}

async fn update(
    cp: &mut ControlPlane,
    request: v1::UpdateInstanceRequest,
) -> Result<lro::Operation, tonic::Status> {
    cp.instances
        .update_instance(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The service as ECS describes it: (desired count, task definition ARN, its image).
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
    let definition = service.task_definition().unwrap().to_owned();
    let described = ecs
        .describe_task_definition()
        .task_definition(&definition)
        .send()
        .await
        .unwrap();
    let image = described.task_definition().unwrap().container_definitions()[0]
        .image()
        .unwrap()
        .to_owned();
    (service.desired_count(), definition, image)
}

/// Revisions ECS holds for the instance's family (active ones).
async fn revisions(cp: &ControlPlane, tenant: &str) -> usize {
    let ecs = aws_sdk_ecs::Client::new(&cp.sdk(Environment::Dev));
    let names = instance_manager::domain::naming::ResourceNames::derive(
        &instance_manager::domain::TenantId::parse(tenant).unwrap(),
        Environment::Dev,
    );
    ecs.list_task_definitions()
        .family_prefix(&names.stack)
        .send()
        .await
        .unwrap()
        .task_definition_arns()
        .len()
}

fn reason_of(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

/// Holds `wait_rollout` of every update until released.
struct HoldRollout {
    reached: Notify,
    release: Notify,
}

#[async_trait]
impl StepHook for HoldRollout {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == "wait_rollout" && operation.verb == Verb::Update {
            self.reached.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_image_update_rolls_out_a_new_revision_through_updating() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hold = Arc::new(HoldRollout {
        reached: Notify::new(),
        release: Notify::new(),
    });
    let mut cp = platform::start(config, Some(hold.clone())).await;
    let tenant = provisioned(&mut cp, "upimage").await;
    let (_, first_revision, first_image) = service(&cp, &tenant).await;
    let before = cp.instance(&tenant).await;
    assert!(first_image.ends_with(&format!(":{}", before.wordpress_version)));

    let mut stream = cp
        .instances
        .watch_instance(v1::WatchInstanceRequest {
            name: name(&tenant),
        })
        .await
        .unwrap()
        .into_inner();
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
    let mut change = v1::Instance {
        name: name(&tenant),
        etag: before.etag.clone(),
        wordpress_version: "6.8-php8.3-apache".into(),
        ..v1::Instance::default()
    };
    change.labels.insert("release".into(), "2026-12".into());
    let operation = update(&mut cp, request(change, &["wordpress_version", "labels"]))
        .await
        .unwrap();
    assert_eq!(metadata(&operation).verb, "update");
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
            v1::InstanceState::Updating,
            v1::InstanceState::Active
        ]
    );
    let done = cp.completed(&operation.name).await;
    let steps: Vec<_> = metadata(&done)
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(
        steps,
        vec!["task_definition", "update_service", "wait_rollout"]
    );

    // ECS runs a new revision with the new image, same count; the record agrees.
    let (count, revision, image) = service(&cp, &tenant).await;
    assert_ne!(revision, first_revision);
    assert_eq!(count, 2);
    assert_eq!(
        image,
        format!("{}:6.8-php8.3-apache", before.wordpress_image)
    );
    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert_eq!(after.wordpress_version, "6.8-php8.3-apache");
    assert_eq!(
        after.labels.get("release").map(String::as_str),
        Some("2026-12")
    );
    assert_eq!(after.resources.get("task_definition"), Some(&revision));
    assert_ne!(after.etag, before.etag);
    // The response of the done operation is the updated instance.
    let Some(lro::operation::Result::Response(any)) = &done.result else {
        panic!("no response: {done:?}");
    };
    let response: v1::Instance = prost::Message::decode(any.value.as_slice()).unwrap();
    assert_eq!(response.wordpress_version, "6.8-php8.3-apache");
}

#[tokio::test]
async fn record_only_updates_complete_at_once_without_touching_aws() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "uprecord").await;
    let ecs_before = service(&cp, &tenant).await;
    let revisions_before = revisions(&cp, &tenant).await;
    let before = cp.instance(&tenant).await;

    let mut change = v1::Instance {
        name: name(&tenant),
        etag: before.etag.clone(),
        contact_email: "new-ops@example.com".into(),
        organization_name: "Renamed Org".into(),
        ..v1::Instance::default()
    };
    change.labels.insert("team".into(), "web".into());
    let operation = update(
        &mut cp,
        request(change, &["labels", "contact_email", "organization_name"]),
    )
    .await
    .unwrap();
    // Done in the answer itself, with the updated instance as its response.
    assert!(operation.done, "{operation:?}");
    assert_eq!(
        metadata(&operation).status(),
        v1::OperationStatus::Completed
    );
    assert!(metadata(&operation).steps.is_empty());
    let Some(lro::operation::Result::Response(any)) = &operation.result else {
        panic!("no response: {operation:?}");
    };
    let response: v1::Instance = prost::Message::decode(any.value.as_slice()).unwrap();
    let after = cp.instance(&tenant).await;
    assert_eq!(response.etag, after.etag);
    assert_eq!(after.contact_email, "new-ops@example.com");
    assert_eq!(after.organization_name, "Renamed Org");
    assert_eq!(after.labels.get("team").map(String::as_str), Some("web"));
    // The state never moved, the service and its revisions are as they were.
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert_eq!(after.state_change_time, before.state_change_time);
    assert_eq!(service(&cp, &tenant).await, ecs_before);
    assert_eq!(revisions(&cp, &tenant).await, revisions_before);
    // The operation is stored and readable like any other.
    let fetched = cp
        .operations
        .get_operation(lro::GetOperationRequest {
            name: operation.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(fetched.done);
}

#[tokio::test]
async fn bad_masks_stale_etags_and_no_ops_are_refused_and_write_nothing() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "upbad").await;
    let before = cp.instance(&tenant).await;
    let base = v1::Instance {
        name: name(&tenant),
        wordpress_version: "6.8-php8.3-apache".into(),
        tier: v1::Tier::Premium as i32,
        ..v1::Instance::default()
    };

    // Not updatable, not a field, no mask, "*": INVALID_ARGUMENT naming the path.
    for (paths, needle) in [
        (vec!["tier"], "\"tier\" is not updatable"),
        (vec!["environment"], "\"environment\" is not updatable"),
        (vec!["colour"], "\"colour\" is not a field"),
        (vec!["*"], "\"*\""),
        (vec![], "is required"),
    ] {
        let error = update(&mut cp, request(base.clone(), &paths))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{paths:?}: {error:?}");
        let found = violations(&error);
        assert!(
            found
                .iter()
                .any(|(field, text)| field == "update_mask" && text.contains(needle)),
            "{paths:?}: {found:?}"
        );
    }
    // An invalid value names its field.
    let bad_tag = v1::Instance {
        wordpress_version: "not a tag!".into(),
        ..base.clone()
    };
    let error = update(&mut cp, request(bad_tag, &["wordpress_version"]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        violations(&error)
            .iter()
            .any(|(field, _)| field == "instance.wordpress_version"),
        "{:?}",
        violations(&error)
    );
    // Out of the environment's bounds.
    let too_many = v1::Instance {
        desired_count: 11,
        ..base.clone()
    };
    let error = update(&mut cp, request(too_many, &["desired_count"]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    // Nothing to change.
    let same = v1::Instance {
        wordpress_version: before.wordpress_version.clone(),
        ..base.clone()
    };
    let error = update(&mut cp, request(same, &["wordpress_version"]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    // A stale etag.
    let stale = v1::Instance {
        etag: "\"1\"".into(),
        ..base.clone()
    };
    assert_ne!(before.etag, "\"1\"");
    let error = update(&mut cp, request(stale, &["wordpress_version"]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Aborted, "{error:?}");
    assert_eq!(reason_of(&error), "ETAG_MISMATCH");
    // None of that wrote anything.
    let after = cp.instance(&tenant).await;
    assert_eq!(after.etag, before.etag);
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert!(after.current_operation.is_empty());

    // Two record-only updates racing with the same etag: exactly one wins.
    let racer = |email: &str| {
        request(
            v1::Instance {
                name: name(&tenant),
                etag: before.etag.clone(),
                contact_email: email.into(),
                ..v1::Instance::default()
            },
            &["contact_email"],
        )
    };
    let (mut a, mut b) = (cp.client(), cp.client());
    let (first, second) = tokio::join!(
        a.instances.update_instance(racer("a@example.com")),
        b.instances.update_instance(racer("b@example.com")),
    );
    let outcomes = [first.map(|_| ()), second.map(|_| ())];
    let won = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(won, 1, "{outcomes:?}");
    let lost = outcomes.iter().find_map(|o| o.as_ref().err()).unwrap();
    assert_eq!(lost.code(), Code::Aborted, "{lost:?}");

    // The count alone is a scale: SCALING, verb scale, no new revision.
    let now = cp.instance(&tenant).await;
    let count_only = v1::Instance {
        name: name(&tenant),
        etag: now.etag.clone(),
        desired_count: 3,
        ..v1::Instance::default()
    };
    let operation = update(&mut cp, request(count_only, &["desired_count"]))
        .await
        .unwrap();
    assert_eq!(metadata(&operation).verb, "scale");
    let done = cp.completed(&operation.name).await;
    let steps: Vec<_> = metadata(&done)
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(steps, vec!["update_service", "wait_rollout"]);
    assert_eq!(service(&cp, &tenant).await.0, 3);
    assert_eq!(cp.instance(&tenant).await.desired_count, 3);
}

/// How the wrapped ECS plays a rollout of a new revision.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rollout {
    /// As moto does (finished at once).
    Passthrough,
    /// In progress for `polls` reads, then the deployment circuit breaker rolls back: ECS
    /// starts a deployment of the previous revision, which becomes the service's.
    CircuitBreaker { polls: u32 },
    /// The new tasks never pass their health checks: in progress forever.
    NeverHealthy,
}

/// The moto adapter, with rollouts of new revisions played as `mode` says.
struct RollingCompute {
    inner: Arc<dyn Compute>,
    mode: Arc<Mutex<Rollout>>,
    /// Per service: the revision it ran before the rollout being played.
    previous: Arc<Mutex<HashMap<String, String>>>,
    polls: Arc<AtomicU32>,
    rollbacks: Arc<AtomicU32>,
}

impl RollingCompute {
    fn in_progress(status: &ServiceStatus) -> ServiceStatus {
        ServiceStatus {
            running: 0,
            pending: status.desired,
            rollout_state: Some("IN_PROGRESS".into()),
            deployments: 2,
            ..status.clone()
        }
    }
}

#[async_trait]
impl ComputeChanges for RollingCompute {
    fn inner(&self) -> &dyn Compute {
        self.inner.as_ref()
    }
    async fn service_status(
        &self,
        cluster: &str,
        name: &str,
    ) -> CloudResult<Option<ServiceStatus>> {
        let Some(status) = self.inner.service_status(cluster, name).await? else {
            return Ok(None);
        };
        let mode = *self.mode.lock().unwrap();
        let previous = self.previous.lock().unwrap().get(name).cloned();
        let Some(previous) = previous.filter(|p| *p != status.task_definition) else {
            return Ok(Some(status));
        };
        match mode {
            Rollout::Passthrough => Ok(Some(status)),
            Rollout::NeverHealthy => Ok(Some(Self::in_progress(&status))),
            Rollout::CircuitBreaker { polls } => {
                if self.polls.fetch_add(1, Ordering::SeqCst) < polls {
                    return Ok(Some(Self::in_progress(&status)));
                }
                // The circuit breaker: a rollback deployment of the previous revision.
                self.inner
                    .update_service(cluster, name, None, Some(&previous), false)
                    .await?;
                self.rollbacks.fetch_add(1, Ordering::SeqCst);
                self.previous.lock().unwrap().remove(name);
                let rolled_back = self.inner.service_status(cluster, name).await?;
                Ok(rolled_back.map(|s| ServiceStatus {
                    rollout_state: Some("IN_PROGRESS".into()),
                    ..s
                }))
            }
        }
    }
    async fn update_service(
        &self,
        cluster: &str,
        name: &str,
        desired_count: Option<u32>,
        task_definition_arn: Option<&str>,
        force_new_deployment: bool,
    ) -> CloudResult<()> {
        if task_definition_arn.is_some()
            && let Some(status) = self.inner.service_status(cluster, name).await?
        {
            self.previous
                .lock()
                .unwrap()
                .entry(name.to_owned())
                .or_insert(status.task_definition);
        }
        self.inner
            .update_service(
                cluster,
                name,
                desired_count,
                task_definition_arn,
                force_new_deployment,
            )
            .await
    }
}

struct Rolling {
    mode: Arc<Mutex<Rollout>>,
    polls: Arc<AtomicU32>,
    rollbacks: Arc<AtomicU32>,
    wrap: platform::CloudWrapper,
}

fn rolling(mode: Rollout) -> Rolling {
    let mode = Arc::new(Mutex::new(mode));
    let previous = Arc::new(Mutex::new(HashMap::new()));
    let polls = Arc::new(AtomicU32::new(0));
    let rollbacks = Arc::new(AtomicU32::new(0));
    let wrap: platform::CloudWrapper = {
        let (mode, polls, rollbacks) = (mode.clone(), polls.clone(), rollbacks.clone());
        Arc::new(move |mut cloud: CloudEnv| {
            cloud.compute = Arc::new(Changed(RollingCompute {
                inner: cloud.compute.clone(),
                mode: mode.clone(),
                previous: previous.clone(),
                polls: polls.clone(),
                rollbacks: rollbacks.clone(),
            }));
            cloud
        })
    };
    Rolling {
        mode,
        polls,
        rollbacks,
        wrap,
    }
}

fn new_version(tenant: &str, etag: &str) -> v1::UpdateInstanceRequest {
    request(
        v1::Instance {
            name: name(tenant),
            etag: etag.to_owned(),
            wordpress_version: "6.8-php8.3-apache".into(),
            ..v1::Instance::default()
        },
        &["wordpress_version"],
    )
}

#[tokio::test]
async fn a_rollout_the_circuit_breaker_rolls_back_leaves_the_previous_revision() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let rolling = rolling(Rollout::CircuitBreaker { polls: 3 });
    let mut cp = platform::start_with(
        config,
        EngineOptions::default(),
        |store| store,
        Some(rolling.wrap.clone()),
    )
    .await;
    let tenant = provisioned(&mut cp, "upbreaker").await;
    let (_, first_revision, first_image) = service(&cp, &tenant).await;
    let before = cp.instance(&tenant).await;

    let operation = update(&mut cp, new_version(&tenant, &before.etag))
        .await
        .unwrap();
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    assert_eq!(rolling.rollbacks.load(Ordering::SeqCst), 1);
    assert!(rolling.polls.load(Ordering::SeqCst) > 3);
    let failed_step = metadata(&done)
        .steps
        .into_iter()
        .find(|s| s.name == "wait_rollout")
        .unwrap();
    assert!(
        failed_step.error.contains("rolled back"),
        "{:?}",
        failed_step.error
    );
    // ECS runs the previous revision and image; the instance is ACTIVE on it and says why.
    let (count, revision, image) = service(&cp, &tenant).await;
    assert_eq!(
        (count, &revision, &image),
        (2, &first_revision, &first_image)
    );
    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert_eq!(after.wordpress_version, before.wordpress_version);
    assert_eq!(
        after.resources.get("task_definition"),
        Some(&first_revision)
    );
    assert!(
        after.failure_reason.starts_with("update:") && after.failure_reason.contains("rolled back"),
        "{:?}",
        after.failure_reason
    );
    // The etag moved on: the old one no longer updates.
    let error = update(&mut cp, new_version(&tenant, &before.etag))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Aborted);
}

#[tokio::test]
async fn a_rollout_never_healthy_is_rolled_back_at_the_timeout_and_a_retry_completes() {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    config.rollout_timeout_secs = 600;
    let rolling = rolling(Rollout::NeverHealthy);
    // The engine's clock is ours: the timeout passes when the test says so.
    let clock = ManualClock::new();
    let options = EngineOptions {
        clock: clock.clone(),
        ..EngineOptions::default()
    };
    let mut cp =
        platform::start_with(config, options, |store| store, Some(rolling.wrap.clone())).await;
    let tenant = provisioned(&mut cp, "uptimeout").await;
    let (_, first_revision, first_image) = service(&cp, &tenant).await;
    let before = cp.instance(&tenant).await;

    let operation = update(&mut cp, new_version(&tenant, &before.etag))
        .await
        .unwrap();
    cp.wait_for_step(&operation.name, "wait_rollout", v1::StepStatus::Running)
        .await;
    // Still rolling, the new revision in place: nothing has given up yet.
    assert_ne!(service(&cp, &tenant).await.1, first_revision);
    clock.advance(Duration::from_secs(601));
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    let failed_step = metadata(&done)
        .steps
        .into_iter()
        .find(|s| s.name == "wait_rollout")
        .unwrap();
    assert!(
        failed_step.error.contains("within 600 s"),
        "{:?}",
        failed_step.error
    );
    // Our rollback put the previous revision back.
    let (count, revision, image) = service(&cp, &tenant).await;
    assert_eq!(
        (count, &revision, &image),
        (2, &first_revision, &first_image)
    );
    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert_eq!(after.wordpress_version, before.wordpress_version);

    // The image is fixed (the tasks now pass their checks): a retry completes.
    *rolling.mode.lock().unwrap() = Rollout::Passthrough;
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
    let (_, revision, image) = service(&cp, &tenant).await;
    assert_ne!(revision, first_revision);
    assert!(image.ends_with(":6.8-php8.3-apache"), "{image}");
    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert_eq!(after.wordpress_version, "6.8-php8.3-apache");
    assert_eq!(after.resources.get("task_definition"), Some(&revision));
    assert!(after.failure_reason.is_empty());
}
