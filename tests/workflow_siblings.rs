//! Resources belong to an instance, not to a (tenant, environment) pair: two instances of one
//! tenant in one environment (a failed one and its live successor) share resource names, and
//! neither may touch the other's. And AWS behaviour the emulator does not show (a deleted
//! ECS service DRAINING for a while), injected around the real adapters.
//!
//! Every count is made with the AWS SDK and SQL directly (`platform::inventory`).

mod common;
mod platform;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use instance_manager::cloud::{
    CloudEnv, CloudResult, Compute, OneOffTaskSpec, ServiceSpec, ServiceStatus, Tags, TaskStatus,
};
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::{Environment, Operation, TenantId};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use instance_manager::workflow::{StepError, StepHook, StepResult};
use mysql_async::prelude::Queryable;
use platform::compute::{Changed, ComputeChanges};
use platform::{inventory, inventory_of, metadata, provisioned};

fn status(operation: &lro::Operation) -> v1::OperationStatus {
    metadata(operation).status()
}

/// Fails `wait_steady` of one instance id, every time.
struct FailSteady {
    instance: &'static str,
}

#[async_trait]
impl StepHook for FailSteady {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == "wait_steady" && operation.target.instance.as_str() == self.instance {
            return Err(StepError::Fatal(
                "injected: the service never got steady".into(),
            ));
        }
        Ok(())
    }
}

#[tokio::test]
async fn deleting_a_failed_instance_leaves_its_live_sibling_alone() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hook = Arc::new(FailSteady { instance: "wp1" });
    let mut cp = platform::start(config, Some(hook)).await;
    let tenant = platform::tenant("sib");
    let cloud = cp.cloud(Environment::Dev).await;

    // wp1 fails at wait_steady and rolls back cleanly.
    let first = cp.create_named(&tenant, "wp1", v1::Environment::Dev).await;
    let (events, failed) = cp.watch(&first.name).await;
    assert_eq!(status(&failed), v1::OperationStatus::Failed, "{events:#?}");
    assert_eq!(
        cp.instance_named(&tenant, "wp1").await.state(),
        v1::InstanceState::Failed
    );
    assert!(
        inventory(&cloud, &tenant).await.is_empty(),
        "{:?}",
        inventory(&cloud, &tenant).await
    );

    // wp2, same tenant and environment, same resource names: ACTIVE, one of everything.
    let second = cp.create_named(&tenant, "wp2", v1::Environment::Dev).await;
    let (events, done) = cp.watch(&second.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(
        inventory_of(&cloud, &tenant, "wp2").await,
        provisioned(true)
    );
    assert_eq!(inventory(&cloud, &tenant).await, provisioned(true));

    // Deleting wp1 — whose create rolled back cleanly and so owns nothing — completes at
    // once without a single step (nothing archived, removed or scanned), and every
    // resource of wp2 is still there.
    let deleted = cp.delete_named(&tenant, "wp1").await;
    let (events, done) = cp.watch(&deleted.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert!(metadata(&done).steps.is_empty(), "{:#?}", metadata(&done));
    assert_eq!(
        cp.instance_named(&tenant, "wp1").await.state(),
        v1::InstanceState::Deprovisioned
    );
    assert_eq!(
        inventory_of(&cloud, &tenant, "wp2").await,
        provisioned(true),
        "wp2 lost resources to wp1's deprovisioning"
    );
    assert_eq!(inventory(&cloud, &tenant).await, provisioned(true));
    assert_eq!(
        cp.instance_named(&tenant, "wp2").await.state(),
        v1::InstanceState::Active
    );
}

#[tokio::test]
async fn a_database_that_existed_before_is_never_adopted_or_dropped() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = platform::tenant("predb");
    let names = ResourceNames::derive(&TenantId::parse(&tenant).unwrap(), Environment::Sit);
    let mut conn =
        mysql_async::Conn::new(mysql_async::Opts::from_url(&common::mysql_url()).unwrap())
            .await
            .unwrap();
    conn.query_drop(format!("CREATE DATABASE `{}`", names.database))
        .await
        .unwrap();
    conn.query_drop(format!(
        "CREATE TABLE `{}`.precious (id INT PRIMARY KEY)",
        names.database
    ))
    .await
    .unwrap();

    let operation = cp.create(&tenant, v1::Environment::Sit).await;
    let (events, failed) = cp.watch(&operation.name).await;
    assert_eq!(status(&failed), v1::OperationStatus::Failed, "{events:#?}");
    let Some(lro::operation::Result::Error(error)) = &failed.result else {
        panic!("no error: {failed:?}")
    };
    assert!(
        error.message.contains("already exists"),
        "{}",
        error.message
    );
    // Rolled back: everything of ours is gone, the foreign database is untouched.
    let left = inventory(&cp.cloud(Environment::Sit).await, &tenant).await;
    assert_eq!(
        left,
        platform::Inventory {
            databases: 1,
            ..Default::default()
        }
    );
    let tables: Vec<String> = conn
        .query(format!("SHOW TABLES FROM `{}`", names.database))
        .await
        .unwrap();
    assert_eq!(tables, ["precious"]);
    conn.query_drop(format!("DROP DATABASE `{}`", names.database))
        .await
        .unwrap();
    let _ = conn.disconnect().await;
}

/// The real adapter, except that a deleted service reports DRAINING for `polls` status
/// reads before it is gone, as ECS does for up to the deregistration delay (moto never
/// shows DRAINING); one-off tasks are recorded, and the tenant-directory cleaner's can be
/// made to stop with `cleaner_exit` (moto runs no container, so reports no exit code).
struct DrainingCompute {
    inner: Arc<dyn Compute>,
    polls: u32,
    one_offs: Arc<Mutex<Vec<(OneOffTaskSpec, String)>>>,
    cleaner_exit: Option<i32>,
    /// Service name → (DRAINING reads left, its tags).
    draining: Arc<Mutex<HashMap<String, (u32, Tags)>>>,
    /// DRAINING answers given so far.
    observed: Arc<Mutex<u32>>,
}

impl DrainingCompute {
    fn draining(&self, name: &str) -> Option<Tags> {
        let mut draining = self.draining.lock().unwrap();
        match draining.get_mut(name) {
            Some((left, tags)) if *left > 0 => {
                *left -= 1;
                *self.observed.lock().unwrap() += 1;
                Some(tags.clone())
            }
            _ => None,
        }
    }

    fn peek(&self, name: &str) -> Option<Tags> {
        let draining = self.draining.lock().unwrap();
        match draining.get(name) {
            Some((left, tags)) if *left > 0 => Some(tags.clone()),
            _ => None,
        }
    }
}

#[async_trait]
impl ComputeChanges for DrainingCompute {
    fn inner(&self) -> &dyn Compute {
        self.inner.as_ref()
    }
    async fn ensure_service(&self, spec: &ServiceSpec) -> CloudResult<String> {
        if self.peek(&spec.name).is_some() {
            return Err(instance_manager::cloud::CloudError::new(
                instance_manager::cloud::ErrorKind::Retryable,
                format!("ecs:CreateService: service {} is still draining", spec.name),
            ));
        }
        self.inner.ensure_service(spec).await
    }
    async fn service_status(
        &self,
        cluster: &str,
        name: &str,
    ) -> CloudResult<Option<ServiceStatus>> {
        if self.draining(name).is_some() {
            return Ok(Some(ServiceStatus {
                status: "DRAINING".into(),
                desired: 0,
                running: 1,
                pending: 0,
                rollout_state: None,
                deployments: 1,
                task_definition: String::new(),
                ..ServiceStatus::default()
            }));
        }
        self.inner.service_status(cluster, name).await
    }
    async fn delete_service(&self, cluster: &str, name: &str) -> CloudResult<()> {
        let tags = self.inner.service_tags(cluster, name).await?;
        self.inner.delete_service(cluster, name).await?;
        if let Some(tags) = tags {
            self.draining
                .lock()
                .unwrap()
                .insert(name.to_owned(), (self.polls, tags));
        }
        Ok(())
    }
    async fn run_task(&self, spec: &OneOffTaskSpec) -> CloudResult<String> {
        let task = self.inner.run_task(spec).await?;
        self.one_offs
            .lock()
            .unwrap()
            .push((spec.clone(), task.clone()));
        Ok(task)
    }
    async fn task_status(&self, cluster: &str, task_arn: &str) -> CloudResult<Option<TaskStatus>> {
        let cleaner = self
            .one_offs
            .lock()
            .unwrap()
            .iter()
            .any(|(spec, task)| task == task_arn && spec.family.ends_with("-cleaner"));
        if cleaner && let Some(code) = self.cleaner_exit {
            return Ok(Some(TaskStatus {
                last_status: "STOPPED".into(),
                exit_code: Some(code),
            }));
        }
        self.inner.task_status(cluster, task_arn).await
    }
    async fn service_tags(&self, cluster: &str, name: &str) -> CloudResult<Option<Tags>> {
        if let Some(tags) = self.peek(name) {
            return Ok(Some(tags));
        }
        self.inner.service_tags(cluster, name).await
    }
}

#[tokio::test]
async fn a_draining_service_is_waited_for_on_delete_and_on_re_create() {
    const POLLS: u32 = 8;
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let draining = Arc::new(Mutex::new(HashMap::new()));
    let observed = Arc::new(Mutex::new(0));
    let wrap: platform::CloudWrapper = {
        let (draining, observed) = (draining.clone(), observed.clone());
        Arc::new(move |mut cloud: CloudEnv| {
            cloud.compute = Arc::new(Changed(DrainingCompute {
                inner: cloud.compute.clone(),
                polls: POLLS,
                one_offs: Arc::default(),
                cleaner_exit: None,
                draining: draining.clone(),
                observed: observed.clone(),
            }));
            cloud
        })
    };
    let mut cp = platform::start_with(
        config,
        instance_manager::workflow::EngineOptions::default(),
        |store| store,
        Some(wrap),
    )
    .await;
    let tenant = platform::tenant("drain");
    let cloud = cp.cloud(Environment::Sit).await;
    let created = cp.create_named(&tenant, "wp1", v1::Environment::Sit).await;
    let (events, done) = cp.watch(&created.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");

    // Delete: the service drains for POLLS reads (more than the retry budget of transient
    // failures), and the deprovisioning waits for it instead of failing.
    let deleted = cp.delete_named(&tenant, "wp1").await;
    let (events, done) = cp.watch(&deleted.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(
        *observed.lock().unwrap(),
        POLLS,
        "DRAINING was never observed"
    );
    assert!(inventory(&cloud, &tenant).await.is_empty());

    // Re-create right after a deletion whose service still drains: waits, then succeeds.
    let stack = ResourceNames::derive(&TenantId::parse(&tenant).unwrap(), Environment::Sit).stack;
    draining.lock().unwrap().insert(stack, (POLLS, Vec::new()));
    let again = cp.create_named(&tenant, "wp2", v1::Environment::Sit).await;
    let (events, done) = cp.watch(&again.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(*observed.lock().unwrap(), 2 * POLLS);
    assert_eq!(
        inventory_of(&cloud, &tenant, "wp2").await,
        provisioned(false)
    );
}

/// A control plane whose one-off tasks are recorded, and whose directory cleaner stops with
/// `cleaner_exit`.
async fn with_recorded_tasks(
    cleaner_exit: i32,
) -> (
    platform::ControlPlane,
    Arc<Mutex<Vec<(OneOffTaskSpec, String)>>>,
) {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let one_offs = Arc::new(Mutex::new(Vec::new()));
    let wrap: platform::CloudWrapper = {
        let one_offs = one_offs.clone();
        Arc::new(move |mut cloud: CloudEnv| {
            cloud.compute = Arc::new(Changed(DrainingCompute {
                inner: cloud.compute.clone(),
                polls: 0,
                one_offs: one_offs.clone(),
                cleaner_exit: Some(cleaner_exit),
                draining: Arc::default(),
                observed: Arc::default(),
            }));
            cloud
        })
    };
    let cp = platform::start_with(
        config,
        instance_manager::workflow::EngineOptions::default(),
        |store| store,
        Some(wrap),
    )
    .await;
    (cp, one_offs)
}

#[tokio::test]
async fn deprovisioning_removes_the_tenant_directory_even_without_an_archive() {
    let (mut cp, one_offs) = with_recorded_tasks(0).await;
    let tenant = platform::tenant("files");
    let created = cp.create_named(&tenant, "wp", v1::Environment::Sit).await;
    let (events, done) = cp.watch(&created.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");

    let deleted = cp.delete_skipping_archive(&tenant).await;
    let done = cp.completed(&deleted).await;
    let step = metadata(&done)
        .steps
        .into_iter()
        .find(|s| s.name == "remove_content")
        .expect("a remove_content step");
    assert_eq!(step.status(), v1::StepStatus::Succeeded);

    // One cleaner, on the file system's root, removing exactly this tenant's directory.
    let cleaners: Vec<_> = one_offs
        .lock()
        .unwrap()
        .iter()
        .filter(|(spec, _)| spec.family.ends_with("-cleaner"))
        .map(|(spec, task)| (spec.clone(), task.clone()))
        .collect();
    let tasks: std::collections::BTreeSet<_> = cleaners.iter().map(|(_, t)| t).collect();
    assert_eq!(tasks.len(), 1, "{cleaners:#?}");
    let (spec, _) = &cleaners[0];
    assert_eq!(
        spec.access_point_id, "",
        "the root is mounted, not the access point"
    );
    assert!(
        spec.environment
            .contains(&("TENANT_DIR".to_owned(), format!("tenant-{tenant}"))),
        "{spec:#?}"
    );
    // Nothing of it is left behind either (its task definition is deleted).
    let cloud = cp.cloud(Environment::Sit).await;
    assert!(inventory(&cloud, &tenant).await.is_empty());
}

#[tokio::test]
async fn a_tenant_directory_that_cannot_be_removed_fails_the_deprovisioning() {
    let (mut cp, _) = with_recorded_tasks(1).await;
    let tenant = platform::tenant("stuckfiles");
    let created = cp.create_named(&tenant, "wp", v1::Environment::Sit).await;
    let (events, done) = cp.watch(&created.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    let deleted = cp.delete_named(&tenant, "wp").await;
    let (events, done) = cp.watch(&deleted.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Failed, "{events:#?}");
    assert!(
        metadata(&done).status_detail.contains("could not remove"),
        "{:#?}",
        metadata(&done)
    );
}
