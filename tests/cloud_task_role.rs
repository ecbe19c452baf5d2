//! Every instance's own IAM task role, end to end on moto: what provisioning makes (read
//! back with the IAM, EFS and ECS SDKs directly), that two instances' roles each name only
//! their own access point, that scaling's new revision keeps it (and an instance recorded
//! without one keeps the platform's shared role), the rollback and the deprovisioning that
//! remove it, the reconciler's `task_role` orphans, and ECS refusing a role IAM has not
//! propagated yet (injected: moto never does).

mod common;
mod platform;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use aws_smithy_mocks::{MockResponseInterceptor, RuleMode, mock};
use instance_manager::cloud::error::classify;
use instance_manager::cloud::{
    CloudEnv, CloudError, CloudResult, Compute, ErrorKind, ServiceSpec, TaskDefinitionSpec,
};
use instance_manager::domain::{Environment, Timestamp};
use instance_manager::proto::v1;
use instance_manager::reconcile::{ReconcileSettings, Reconciler};
use instance_manager::workflow::failpoints::Failpoints;
use platform::compute::{Changed, ComputeChanges};
use platform::{inventory_of, metadata};

/// IAM returns policy documents URL-encoded (RFC 3986); moto may not.
fn policy_json(document: &str) -> serde_json::Value {
    let decoded = if document.trim_start().starts_with('{') {
        document.to_owned()
    } else {
        let bytes = document.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    serde_json::from_str(&decoded).unwrap_or_else(|e| panic!("{e}: {decoded}"))
}

fn role_name(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap()
}

/// What the role of one instance is, read with the SDKs (not the product's adapters).
struct Observed {
    /// The task definition the service runs.
    definition_arn: String,
    access_point_arn: String,
    policy_access_points: Vec<String>,
}

/// Checks the role of `tenants/{tenant}/instances/wp` with the IAM, EFS and ECS SDKs.
async fn check_role(cp: &platform::ControlPlane, tenant: &str) -> Observed {
    let mut client = cp.client();
    let instance = client.instance(tenant).await;
    let cloud = cp.cloud(Environment::Sit).await;
    let sdk = cp.sdk(Environment::Sit);
    let role_arn = &instance.resources["task_role"];
    let name = role_name(role_arn);
    assert!(name.len() <= 64, "{name}");
    assert!(name.ends_with("-wp") && name.contains(tenant), "{name}");

    let iam = aws_sdk_iam::Client::new(&sdk);
    let role = iam.get_role().role_name(name).send().await.unwrap();
    let role = role.role().unwrap();
    assert_eq!(role.arn(), role_arn);
    assert_eq!(role.path(), "/bbws/instances/");
    assert!(
        role_arn.starts_with(&format!(
            "arn:aws:iam::{}:role/bbws/instances/",
            cloud.account_id
        )),
        "{role_arn}"
    );
    let trust = policy_json(role.assume_role_policy_document().unwrap());
    let statements = trust["Statement"].as_array().unwrap();
    assert_eq!(statements.len(), 1, "{trust}");
    assert_eq!(statements[0]["Effect"], "Allow");
    assert_eq!(
        statements[0]["Principal"]["Service"],
        "ecs-tasks.amazonaws.com"
    );
    assert_eq!(statements[0]["Action"], "sts:AssumeRole");
    assert_eq!(
        statements[0]["Condition"]["StringEquals"]["aws:SourceAccount"],
        cloud.account_id.as_str()
    );

    let tags = iam.list_role_tags().role_name(name).send().await.unwrap();
    let tag = |key: &str| {
        tags.tags()
            .iter()
            .find(|t| t.key() == key)
            .map(|t| t.value().to_owned())
    };
    assert_eq!(tag("bbws:tenant-id").as_deref(), Some(tenant));
    assert_eq!(tag("bbws:instance-id").as_deref(), Some("wp"));
    assert_eq!(tag("bbws:environment").as_deref(), Some("SIT"));
    assert_eq!(tag("bbws:managed-by").as_deref(), Some("instance-manager"));
    assert_eq!(tag("bbws:component").as_deref(), Some("task-role"));

    // One inline policy: mount and write the platform's file system, through this
    // instance's access point only (its ARN as EFS reports it).
    let policies = iam
        .list_role_policies()
        .role_name(name)
        .send()
        .await
        .unwrap();
    assert_eq!(policies.policy_names(), ["tenant-file-system"]);
    let attached = iam
        .list_attached_role_policies()
        .role_name(name)
        .send()
        .await
        .unwrap();
    assert!(attached.attached_policies().is_empty());
    let policy = iam
        .get_role_policy()
        .role_name(name)
        .policy_name("tenant-file-system")
        .send()
        .await
        .unwrap();
    let policy = policy_json(policy.policy_document());
    let efs = aws_sdk_efs::Client::new(&sdk);
    let access_point = efs
        .describe_access_points()
        .access_point_id(&instance.resources["access_point"])
        .send()
        .await
        .unwrap()
        .access_points()[0]
        .clone();
    let file_system = efs
        .describe_file_systems()
        .file_system_id(&cloud.platform.file_system_id)
        .send()
        .await
        .unwrap()
        .file_systems()[0]
        .clone();
    let mut policy_access_points = Vec::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow", "{policy}");
        assert_eq!(
            statement["Action"],
            serde_json::json!([
                "elasticfilesystem:ClientMount",
                "elasticfilesystem:ClientWrite"
            ])
        );
        assert_eq!(
            statement["Resource"].as_str(),
            file_system.file_system_arn(),
            "{policy}"
        );
        let condition = &statement["Condition"];
        assert_eq!(
            condition.as_object().unwrap().len(),
            1,
            "StringEquals only: {policy}"
        );
        policy_access_points.push(
            condition["StringEquals"]["elasticfilesystem:AccessPointArn"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let access_point_arn = access_point.access_point_arn().unwrap().to_owned();
    assert_eq!(
        policy_access_points,
        std::slice::from_ref(&access_point_arn)
    );

    // The service runs a task definition whose task role is this role, mounting through the
    // access point with transit encryption and IAM authorisation.
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let services = ecs
        .describe_services()
        .cluster(&cloud.platform.cluster)
        .services(format!("bbws-sit-{tenant}"))
        .send()
        .await
        .unwrap();
    let definition_arn = services.services()[0].task_definition().unwrap().to_owned();
    let described = ecs
        .describe_task_definition()
        .task_definition(&definition_arn)
        .send()
        .await
        .unwrap();
    let definition = described.task_definition().unwrap();
    assert_eq!(definition.task_role_arn(), Some(role_arn.as_str()));
    assert_ne!(
        definition.task_role_arn(),
        Some(cloud.platform.task_role_arn.as_str())
    );
    let volume = definition.volumes()[0]
        .efs_volume_configuration()
        .unwrap()
        .clone();
    assert_eq!(
        volume.transit_encryption(),
        Some(&aws_sdk_ecs::types::EfsTransitEncryption::Enabled)
    );
    let authorization = volume.authorization_config().unwrap();
    assert_eq!(
        authorization.access_point_id(),
        access_point.access_point_id()
    );
    assert_eq!(
        authorization.iam(),
        Some(&aws_sdk_ecs::types::EfsAuthorizationConfigIam::Enabled)
    );
    Observed {
        definition_arn,
        access_point_arn,
        policy_access_points,
    }
}

async fn scale(
    client: &mut platform::Client,
    tenant: &str,
    cpu: i32,
    memory_mib: i32,
) -> instance_manager::proto::google_longrunning::Operation {
    client
        .instances
        .scale_instance(v1::ScaleInstanceRequest {
            name: format!("tenants/{tenant}/instances/wp"),
            desired_count: 2,
            cpu,
            memory_mib,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn role_exists(cp: &platform::ControlPlane, name: &str) -> bool {
    let iam = aws_sdk_iam::Client::new(&cp.sdk(Environment::Sit));
    match iam.get_role().role_name(name).send().await {
        Ok(_) => true,
        Err(error) if format!("{error:?}").contains("NoSuchEntity") => false,
        Err(error) => panic!("{error:?}"),
    }
}

#[tokio::test]
async fn each_instance_gets_its_own_role_which_deprovisioning_removes() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let cp = platform::start(config, None).await;
    let (first, second) = (platform::tenant("role-a"), platform::tenant("role-b"));
    let mut client = cp.client();
    let one = client.create(&first, v1::Environment::Sit).await;
    let two = client.create(&second, v1::Environment::Sit).await;
    client.completed(&one.name).await;
    client.completed(&two.name).await;

    let a = check_role(&cp, &first).await;
    let b = check_role(&cp, &second).await;
    assert_ne!(a.access_point_arn, b.access_point_arn);
    assert!(!a.policy_access_points.contains(&b.access_point_arn));
    assert!(!b.policy_access_points.contains(&a.access_point_arn));
    let role_a = client.instance(&first).await.resources["task_role"].clone();
    let role_b = client.instance(&second).await.resources["task_role"].clone();
    assert_ne!(role_a, role_b);
    let cloud = cp.cloud(Environment::Sit).await;
    assert_eq!(inventory_of(&cloud, &first, "wp").await.task_roles, 1);

    // Scaling registers a new revision, still with the instance's own role.
    let scaled = scale(&mut client, &second, 1024, 2048).await;
    client.completed(&scaled.name).await;
    let rescaled = check_role(&cp, &second).await;
    assert_ne!(rescaled.definition_arn, b.definition_arn);

    // An instance provisioned before instances had roles (none recorded) keeps the
    // platform's shared role in its new revisions.
    let name =
        instance_manager::domain::InstanceName::parse(&format!("tenants/{second}/instances/wp"))
            .unwrap();
    let mut legacy = cp.store.get_instance(&name).await.unwrap().unwrap();
    assert!(legacy.resources.remove("task_role").is_some());
    cp.store
        .commit(vec![instance_manager::store::Write::UpdateInstance(legacy)])
        .await
        .unwrap();
    let scaled = scale(&mut client, &second, 512, 1024).await;
    client.completed(&scaled.name).await;
    let ecs = aws_sdk_ecs::Client::new(&cp.sdk(Environment::Sit));
    let service = ecs
        .describe_services()
        .cluster(&cloud.platform.cluster)
        .services(format!("bbws-sit-{second}"))
        .send()
        .await
        .unwrap();
    let definition = ecs
        .describe_task_definition()
        .task_definition(service.services()[0].task_definition().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        definition.task_definition().unwrap().task_role_arn(),
        Some(cloud.platform.task_role_arn.as_str())
    );

    // Deprovisioning the first removes its role (counted with the IAM SDK), not the
    // second's.
    let deleting = client.delete_skipping_archive(&first).await;
    client.completed(&deleting).await;
    assert!(inventory_of(&cloud, &first, "wp").await.is_empty());
    assert!(!role_exists(&cp, role_name(&role_a)).await);
    assert!(role_exists(&cp, role_name(&role_b)).await);
    assert_eq!(inventory_of(&cloud, &second, "wp").await.task_roles, 1);
    let deleting = client.delete_skipping_archive(&second).await;
    client.completed(&deleting).await;
    assert!(inventory_of(&cloud, &second, "wp").await.is_empty());
}

#[tokio::test]
async fn a_failure_after_the_role_step_rolls_the_role_back() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    // The task definition step fails after the role was made.
    let hook = Failpoints::parse(&["task_definition=error".to_owned()]).unwrap();
    let cp = platform::start(config, Some(Arc::new(hook))).await;
    let tenant = platform::tenant("role-rb");
    let mut client = cp.client();
    let operation = client.create(&tenant, v1::Environment::Sit).await;
    let (events, done) = client.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.step == "task_role" && e.step_status() == v1::StepStatus::Succeeded),
        "{events:#?}"
    );
    let cloud = cp.cloud(Environment::Sit).await;
    let left = inventory_of(&cloud, &tenant, "wp").await;
    assert_eq!(left.task_roles, 0, "{left:?}");
    assert!(left.is_empty(), "{left:?}");
    let names = instance_manager::domain::naming::ResourceNames::derive(
        &instance_manager::domain::TenantId::parse(&tenant).unwrap(),
        Environment::Sit,
    );
    assert!(!role_exists(&cp, &names.task_role("wp")).await);
}

/// ECS refusing the first `refusals` registrations and service creations the way it refuses
/// a role IAM has not propagated to it yet.
struct UnpropagatedRole {
    inner: Arc<dyn Compute>,
    refusals: u32,
    registrations: Arc<AtomicU32>,
    creations: Arc<AtomicU32>,
    roles_seen: Arc<std::sync::Mutex<Vec<String>>>,
}

fn unable_to_assume(what: &str, role: &str) -> CloudError {
    CloudError::new(
        ErrorKind::NotYetVisible,
        format!(
            "{what}: ClientException: ECS was unable to assume the role '{role}' that was provided for this task. Please verify that the role being passed has the proper trust relationship and permissions and that your IAM user has permissions to pass this role."
        ),
    )
}

#[async_trait]
impl ComputeChanges for UnpropagatedRole {
    fn inner(&self) -> &dyn Compute {
        self.inner.as_ref()
    }
    async fn register_task_definition(&self, spec: &TaskDefinitionSpec) -> CloudResult<String> {
        self.roles_seen
            .lock()
            .unwrap()
            .push(spec.task_role_arn.clone());
        if self.registrations.fetch_add(1, Ordering::SeqCst) < self.refusals {
            return Err(unable_to_assume(
                "ecs:RegisterTaskDefinition",
                &spec.task_role_arn,
            ));
        }
        self.inner.register_task_definition(spec).await
    }
    async fn ensure_service(&self, spec: &ServiceSpec) -> CloudResult<String> {
        if self.creations.fetch_add(1, Ordering::SeqCst) < self.refusals {
            return Err(unable_to_assume(
                "ecs:CreateService",
                &spec.task_definition_arn,
            ));
        }
        self.inner.ensure_service(spec).await
    }
}

#[tokio::test]
async fn ecs_refusing_a_role_not_yet_propagated_is_waited_for() {
    // More refusals than the engine's transient attempts (3 in tests): only the bounded
    // wait for IAM gets the provisioning through.
    const REFUSALS: u32 = 5;
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let registrations = Arc::new(AtomicU32::new(0));
    let creations = Arc::new(AtomicU32::new(0));
    let roles_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let wrap: platform::CloudWrapper = {
        let (registrations, creations, roles_seen) =
            (registrations.clone(), creations.clone(), roles_seen.clone());
        Arc::new(move |mut cloud: CloudEnv| {
            cloud.compute = Arc::new(Changed(UnpropagatedRole {
                inner: cloud.compute.clone(),
                refusals: REFUSALS,
                registrations: registrations.clone(),
                creations: creations.clone(),
                roles_seen: roles_seen.clone(),
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
    let tenant = platform::tenant("role-wait");
    let mut client = cp.client();
    let operation = client.create(&tenant, v1::Environment::Sit).await;
    let done = client.completed(&operation.name).await;
    assert_eq!(registrations.load(Ordering::SeqCst), REFUSALS + 1);
    assert_eq!(creations.load(Ordering::SeqCst), REFUSALS + 1);
    // The waiting was no failure: neither step failed, nor was it retried as a transient
    // failure (which would have given up after 3 attempts).
    for step in metadata(&done).steps {
        assert!(step.error.is_empty(), "{step:?}");
        if step.name == "task_definition" || step.name == "service" {
            assert_eq!(step.attempts, 1, "{step:?}");
        }
    }
    let role = client.instance(&tenant).await.resources["task_role"].clone();
    assert!(
        roles_seen.lock().unwrap().iter().all(|seen| *seen == role),
        "every registration named the instance's role"
    );
    let deleting = client.delete_skipping_archive(&tenant).await;
    client.completed(&deleting).await;
    let cloud = cp.cloud(Environment::Sit).await;
    assert!(inventory_of(&cloud, &tenant, "wp").await.is_empty());
}

/// ECS's refusal, as the SDK reports it, is classified as not visible yet; ECS's other
/// ClientExceptions stay fatal.
#[tokio::test]
async fn ecs_unable_to_assume_the_role_is_classified_as_not_yet_visible() {
    use aws_sdk_ecs::operation::register_task_definition::RegisterTaskDefinitionError;
    let refusal = |message: &'static str| {
        mock!(aws_sdk_ecs::Client::register_task_definition).then_error(move || {
            RegisterTaskDefinitionError::generic(
                aws_smithy_types::error::ErrorMetadata::builder()
                    .code("ClientException")
                    .message(message)
                    .build(),
            )
        })
    };
    for (message, kind) in [
        (
            "ECS was unable to assume the role 'arn:aws:iam::111122223333:role/bbws/instances/bbws-sit-acme-wp' that was provided for this task. Please verify that the role being passed has the proper trust relationship and permissions and that your IAM user has permissions to pass this role.",
            ErrorKind::NotYetVisible,
        ),
        (
            "Container.image should not be null or empty.",
            ErrorKind::Fatal,
        ),
    ] {
        let rule = refusal(message);
        let interceptor = MockResponseInterceptor::new()
            .rule_mode(RuleMode::MatchAny)
            .with_rule(&rule);
        let config = aws_sdk_ecs::Config::builder()
            .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
            .region(aws_sdk_ecs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ecs::config::Credentials::new(
                "testing", "testing", None, None, "mock",
            ))
            .retry_config(aws_sdk_ecs::config::retry::RetryConfig::disabled())
            .http_client(aws_smithy_mocks::create_mock_http_client())
            .interceptor(interceptor)
            .build();
        let error = aws_sdk_ecs::Client::from_conf(config)
            .register_task_definition()
            .family("f")
            .send()
            .await
            .unwrap_err();
        let classified = classify("ecs:RegisterTaskDefinition", &error);
        assert_eq!(classified.kind, kind, "{classified}");
    }
}

/// A role under our path, with our tags, naming an instance that does not exist, is an
/// orphan of kind `task_role`: reported, and removed (inline policy first) when removal is
/// on; a live instance's role is not touched.
#[tokio::test]
async fn an_orphaned_role_is_found_and_removed_by_the_reconciler() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let cp = platform::start(config, None).await;
    let live = platform::tenant("role-live");
    let mut client = cp.client();
    let created = client.create(&live, v1::Environment::Sit).await;
    client.completed(&created.name).await;
    let live_role = client.instance(&live).await.resources["task_role"].clone();

    let ghost = platform::tenant("role-ghost");
    let mut tags = platform::tenant_tags(&ghost, Environment::Sit);
    tags.push(("bbws:instance-id".into(), "gone".into()));
    let iam = aws_sdk_iam::Client::new(&cp.sdk(Environment::Sit));
    let ghost_role = format!("bbws-sit-{ghost}-gone");
    iam.create_role()
        .role_name(&ghost_role)
        .path("/bbws/instances/")
        .assume_role_policy_document(instance_manager::cloud::aws::trust_policy("1"))
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| {
                    aws_sdk_iam::types::Tag::builder()
                        .key(k)
                        .value(v)
                        .build()
                        .unwrap()
                })
                .collect(),
        ))
        .send()
        .await
        .unwrap();
    iam.put_role_policy()
        .role_name(&ghost_role)
        .policy_name("tenant-file-system")
        .policy_document(instance_manager::cloud::aws::file_system_policy(
            "arn:aws:elasticfilesystem:us-east-1:1:file-system/fs-1",
            "arn:aws:elasticfilesystem:us-east-1:1:access-point/fsap-1",
        ))
        .send()
        .await
        .unwrap();

    let reconciler = |remove_orphans| {
        Reconciler::new(
            cp.store.clone(),
            cp.accounts.clone(),
            cp.engine.clone(),
            vec![Environment::Sit],
            ReconcileSettings {
                remove_orphans,
                orphan_grace: std::time::Duration::ZERO,
                stuck_after: std::time::Duration::from_secs(3600),
                tag_prefix: "bbws".into(),
            },
        )
    };
    let reported = reconciler(false).reconcile_once(Timestamp::now()).await;
    assert_eq!(
        reported.orphans[&(Environment::Sit, "task_role")],
        1,
        "{reported:?}"
    );
    assert_eq!(
        (reported.removed, reported.failures),
        (0, 0),
        "{reported:?}"
    );
    assert!(role_exists(&cp, &ghost_role).await);

    let removed = reconciler(true).reconcile_once(Timestamp::now()).await;
    assert_eq!(removed.failures, 0, "{removed:?}");
    assert_eq!(removed.removed, 1, "{removed:?}");
    assert!(!role_exists(&cp, &ghost_role).await);
    assert!(role_exists(&cp, role_name(&live_role)).await);
    let again = reconciler(true).reconcile_once(Timestamp::now()).await;
    assert_eq!(again.orphans_found(), 0, "{again:?}");
    platform::drop_tenant_databases(&[live]).await;
}
