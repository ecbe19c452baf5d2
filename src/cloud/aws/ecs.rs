//! Tenant task definitions, services and one-off tasks on an environment's ECS cluster.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_ecs::Client;
use aws_sdk_ecs::error::BuildError;
use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, Compatibility, ContainerDefinition,
    DeploymentCircuitBreaker, DeploymentConfiguration, EfsAuthorizationConfig,
    EfsAuthorizationConfigIam, EfsTransitEncryption, EfsVolumeConfiguration, HealthCheck,
    KeyValuePair, LaunchType, LoadBalancer, LogConfiguration, LogDriver, MountPoint,
    NetworkConfiguration, NetworkMode, PortMapping, PropagateTags, Service, ServiceField, Tag,
    TaskDefinitionStatus, TransportProtocol, Volume,
};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::{gone_is_ok, has_all_tags};
use crate::cloud::error::classify;
use crate::cloud::{
    CloudError, CloudResult, Compute, ErrorKind, OneOffTaskSpec, ServiceSpec, ServiceStatus,
    TaggedResource, Tags, TaskDefinitionInfo, TaskDefinitionSpec, TaskStatus, not_ours, owned_by,
    owner_tags,
};
use crate::domain::Timestamp;

/// The WordPress container, the one the target group sends traffic to.
pub const CONTAINER_NAME: &str = "wordpress";
/// Where wp-content (the tenant's EFS access point) is mounted, in the WordPress container
/// and in one-off tasks alike.
pub const WP_CONTENT_PATH: &str = "/var/www/html/wp-content";
/// Docker label carrying a hash of everything a task definition was registered from, so an
/// identical request reuses the family's latest revision instead of piling up new ones.
pub const FINGERPRINT_LABEL: &str = "instance-manager.fingerprint";

const VOLUME_NAME: &str = "wp-content";
/// `wp-config.php` lines (the official image's `WORDPRESS_CONFIG_EXTRA`) that make WordPress
/// connect to MySQL over TLS, for a tenant user created `REQUIRE SSL`.
pub const WORDPRESS_DB_TLS: &str = "define('MYSQL_CLIENT_FLAGS', MYSQLI_CLIENT_SSL);";
const ONE_OFF_CONTAINER: &str = "task";
/// Enough for tar + upload of wp-content; the smallest Fargate size with 1 GiB.
const ONE_OFF_CPU: u32 = 512;
const ONE_OFF_MEMORY_MIB: u32 = 1024;
/// DescribeServices accepts at most 10 services per call.
const DESCRIBE_SERVICES_BATCH: usize = 10;
/// Concurrent ListTagsForResource calls while looking for tagged task definitions.
const TAG_LOOKUPS_IN_FLIGHT: usize = 8;
/// DeleteTaskDefinitions accepts at most 10 task definitions per call.
const DELETE_TASK_DEFINITIONS_BATCH: usize = 10;

pub struct AwsCompute {
    client: Client,
}

/// Everything RegisterTaskDefinition needs, for the WordPress and the one-off definitions.
struct Registration {
    family: String,
    cpu: u32,
    memory_mib: u32,
    container: ContainerDefinition,
    volume: Volume,
    execution_role_arn: String,
    task_role_arn: String,
    tags: Tags,
    fingerprint: String,
}

fn invalid(what: &str) -> impl Fn(BuildError) -> CloudError + '_ {
    move |error| CloudError::fatal(format!("{what}: {error}"))
}

/// A short hash of `parts`, unambiguous however the parts are split.
fn fingerprint<I: IntoIterator<Item = S>, S: AsRef<str>>(parts: I) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.as_ref().len() as u64).to_be_bytes());
        hasher.update(part.as_ref().as_bytes());
    }
    hex::encode(hasher.finalize())[..32].to_owned()
}

fn to_tags(tags: &Tags) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn env(name: &str, value: &str) -> KeyValuePair {
    KeyValuePair::builder().name(name).value(value).build()
}

/// (family, revision) of a task definition ARN `…:task-definition/{family}:{revision}`.
fn family_and_revision(arn: &str) -> Option<(&str, u32)> {
    let (_, name) = arn.rsplit_once('/')?;
    let (family, revision) = name.rsplit_once(':')?;
    Some((family, revision.parse().ok()?))
}

/// The EFS volume through `access_point_id`, or — when it is empty — the file system's root
/// (IAM-authorised; the task role needs `elasticfilesystem:ClientRootAccess`).
fn efs_volume(file_system_id: &str, access_point_id: &str) -> CloudResult<Volume> {
    let mut authorization =
        EfsAuthorizationConfig::builder().iam(EfsAuthorizationConfigIam::Enabled);
    let mut efs = EfsVolumeConfiguration::builder()
        .file_system_id(file_system_id)
        .transit_encryption(EfsTransitEncryption::Enabled);
    if access_point_id.is_empty() {
        efs = efs.root_directory("/");
    } else {
        authorization = authorization.access_point_id(access_point_id);
    }
    let efs = efs
        .authorization_config(authorization.build())
        .build()
        .map_err(invalid("ecs:RegisterTaskDefinition"))?;
    Ok(Volume::builder()
        .name(VOLUME_NAME)
        .efs_volume_configuration(efs)
        .build())
}

fn wp_content_mount() -> MountPoint {
    MountPoint::builder()
        .source_volume(VOLUME_NAME)
        .container_path(WP_CONTENT_PATH)
        .read_only(false)
        .build()
}

fn wordpress_registration(spec: &TaskDefinitionSpec) -> CloudResult<Registration> {
    let what = "ecs:RegisterTaskDefinition";
    let secret = |name: &str, key: &str| {
        aws_sdk_ecs::types::Secret::builder()
            .name(name)
            .value_from(format!("{}:{key}::", spec.secret_arn))
            .build()
            .map_err(invalid(what))
    };
    let logs = LogConfiguration::builder()
        .log_driver(LogDriver::Awslogs)
        .options("awslogs-group", &spec.log_group)
        .options("awslogs-region", &spec.log_region)
        .options("awslogs-stream-prefix", &spec.log_stream_prefix)
        .build()
        .map_err(invalid(what))?;
    let health = HealthCheck::builder()
        .command("CMD-SHELL")
        .command("curl -f http://localhost/ || exit 1")
        .build()
        .map_err(invalid(what))?;
    let cpu = spec.cpu.to_string();
    let memory = spec.memory_mib.to_string();
    let mut parts: Vec<&str> = vec![
        "wordpress/1",
        &spec.family,
        &cpu,
        &memory,
        &spec.image,
        &spec.file_system_id,
        &spec.access_point_id,
        &spec.secret_arn,
        &spec.db_host,
        &spec.db_name,
        &spec.log_group,
        &spec.log_region,
        &spec.log_stream_prefix,
        &spec.execution_role_arn,
        &spec.task_role_arn,
    ];
    // Only a TLS connection adds a part, so the revisions registered before stay identical.
    if spec.db_tls {
        parts.push(WORDPRESS_DB_TLS);
    }
    let fingerprint = fingerprint(parts);
    let mut container = ContainerDefinition::builder()
        .name(CONTAINER_NAME)
        .image(&spec.image)
        .essential(true)
        // Fargate needs only the task-level size; the container limit equal to it changes
        // nothing there, and emulators refuse to run tasks without one.
        .memory(i32::try_from(spec.memory_mib).unwrap_or(i32::MAX))
        .port_mappings(
            PortMapping::builder()
                .container_port(80)
                .protocol(TransportProtocol::Tcp)
                .build(),
        )
        .environment(env("WORDPRESS_DB_HOST", &spec.db_host))
        .environment(env("WORDPRESS_DB_NAME", &spec.db_name));
    if spec.db_tls {
        container = container.environment(env("WORDPRESS_CONFIG_EXTRA", WORDPRESS_DB_TLS));
    }
    let container = container
        .secrets(secret("WORDPRESS_DB_USER", "username")?)
        .secrets(secret("WORDPRESS_DB_PASSWORD", "password")?)
        .mount_points(wp_content_mount())
        .log_configuration(logs)
        .health_check(health)
        .docker_labels(FINGERPRINT_LABEL, &fingerprint)
        .build();
    Ok(Registration {
        family: spec.family.clone(),
        cpu: spec.cpu,
        memory_mib: spec.memory_mib,
        container,
        volume: efs_volume(&spec.file_system_id, &spec.access_point_id)?,
        execution_role_arn: spec.execution_role_arn.clone(),
        task_role_arn: spec.task_role_arn.clone(),
        tags: spec.tags.clone(),
        fingerprint,
    })
}

fn one_off_registration(spec: &OneOffTaskSpec) -> CloudResult<Registration> {
    let mut parts = vec![
        "one-off/1".to_owned(),
        spec.family.clone(),
        spec.image.clone(),
        spec.file_system_id.clone(),
        spec.access_point_id.clone(),
        spec.execution_role_arn.clone(),
        spec.task_role_arn.clone(),
        spec.command.len().to_string(),
    ];
    parts.extend(spec.command.iter().cloned());
    parts.extend(
        spec.environment
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()]),
    );
    let fingerprint = fingerprint(&parts);
    let environment = spec.environment.iter().map(|(k, v)| env(k, v)).collect();
    let container = ContainerDefinition::builder()
        .name(ONE_OFF_CONTAINER)
        .image(&spec.image)
        .essential(true)
        .memory(ONE_OFF_MEMORY_MIB as i32)
        .set_command(Some(spec.command.clone()))
        .set_environment(Some(environment))
        .mount_points(wp_content_mount())
        .docker_labels(FINGERPRINT_LABEL, &fingerprint)
        .build();
    Ok(Registration {
        family: spec.family.clone(),
        cpu: ONE_OFF_CPU,
        memory_mib: ONE_OFF_MEMORY_MIB,
        container,
        volume: efs_volume(&spec.file_system_id, &spec.access_point_id)?,
        execution_role_arn: spec.execution_role_arn.clone(),
        task_role_arn: spec.task_role_arn.clone(),
        tags: spec.tags.clone(),
        fingerprint,
    })
}

/// Empty role ARNs mean "no role" (an emulator, or a task that needs no AWS access).
fn role(arn: &str) -> Option<String> {
    (!arn.is_empty()).then(|| arn.to_owned())
}

fn network(subnets: &[String], security_groups: &[String]) -> CloudResult<NetworkConfiguration> {
    let vpc = AwsVpcConfiguration::builder()
        .set_subnets(Some(subnets.to_vec()))
        .set_security_groups(Some(security_groups.to_vec()))
        .assign_public_ip(AssignPublicIp::Disabled)
        .build()
        .map_err(invalid("ecs:awsvpcConfiguration"))?;
    Ok(NetworkConfiguration::builder()
        .awsvpc_configuration(vpc)
        .build())
}

fn to_status(service: &Service) -> ServiceStatus {
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    let primary = service
        .deployments()
        .iter()
        .find(|deployment| deployment.status() == Some("PRIMARY"));
    ServiceStatus {
        status: service.status().unwrap_or_default().to_owned(),
        desired: count(service.desired_count()),
        running: count(service.running_count()),
        pending: count(service.pending_count()),
        rollout_state: primary
            .and_then(|deployment| deployment.rollout_state())
            .map(|state| state.as_str().to_owned()),
        deployments: u32::try_from(service.deployments().len()).unwrap_or(u32::MAX),
        task_definition: service.task_definition().unwrap_or_default().to_owned(),
        primary_deployment: primary.and_then(|deployment| deployment.id().map(str::to_owned)),
        primary_created_at_ms: primary
            .and_then(|deployment| deployment.created_at())
            .and_then(|at| at.to_millis().ok()),
        // ECS lists events newest first.
        recent_events: service
            .events()
            .iter()
            .take(crate::cloud::SERVICE_EVENTS_KEPT)
            .map(|event| crate::cloud::ServiceEvent {
                created_at_ms: event.created_at().and_then(|at| at.to_millis().ok()),
                message: event.message().unwrap_or_default().to_owned(),
            })
            .collect(),
    }
}

/// ECS remembers client tokens: a token reused for a *different* request is refused, and a
/// service re-created after a deletion must not be answered with the deleted one. So the
/// token covers the whole request and the creation time of the service it replaces.
fn service_client_token(spec: &ServiceSpec, replaced: Option<&Service>) -> String {
    let replaced_at = replaced
        .and_then(Service::created_at)
        .map(|at| at.as_nanos().to_string())
        .unwrap_or_default();
    let mut parts = vec![
        spec.cluster.clone(),
        spec.name.clone(),
        spec.task_definition_arn.clone(),
        spec.desired_count.to_string(),
        spec.target_group_arn.clone(),
        replaced_at,
    ];
    parts.extend(spec.subnets.iter().cloned());
    parts.push(String::new());
    parts.extend(spec.security_groups.iter().cloned());
    fingerprint(parts)
}

impl AwsCompute {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self::from_client(super::traced_client!(aws_sdk_ecs, sdk))
    }

    /// From a client configured by the caller (e.g. with interceptors, in tests).
    pub fn from_client(client: Client) -> Self {
        Self { client }
    }

    /// ARNs of the family's ACTIVE revisions, oldest first.
    async fn active_revisions(&self, family: &str) -> CloudResult<Vec<String>> {
        self.revisions(family, TaskDefinitionStatus::Active).await
    }

    /// ARNs of the family's revisions in `status`, oldest first.
    async fn revisions(
        &self,
        family: &str,
        status: TaskDefinitionStatus,
    ) -> CloudResult<Vec<String>> {
        let arns: Vec<String> = self
            .client
            .list_task_definitions()
            .family_prefix(family)
            .status(status)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("ecs:ListTaskDefinitions", &e))?;
        // `familyPrefix` is an exact family in AWS; checked here anyway, and sorted here
        // because not every implementation honours `sort`.
        let mut revisions: Vec<(u32, String)> = arns
            .into_iter()
            .filter_map(|arn| match family_and_revision(&arn) {
                Some((f, revision)) if f == family => Some((revision, arn)),
                _ => None,
            })
            .collect();
        revisions.sort();
        Ok(revisions.into_iter().map(|(_, arn)| arn).collect())
    }

    /// The latest ACTIVE revision of the family if it was registered from the same inputs.
    async fn reusable_revision(&self, registration: &Registration) -> CloudResult<Option<String>> {
        let Some(latest) = self.active_revisions(&registration.family).await?.pop() else {
            return Ok(None);
        };
        let described = self
            .client
            .describe_task_definition()
            .task_definition(&latest)
            .send()
            .await
            .map_err(|e| classify("ecs:DescribeTaskDefinition", &e))?;
        let same = described.task_definition().is_some_and(|definition| {
            definition.container_definitions().iter().any(|container| {
                container
                    .docker_labels()
                    .and_then(|labels| labels.get(FINGERPRINT_LABEL))
                    == Some(&registration.fingerprint)
            })
        });
        Ok(same.then_some(latest))
    }

    /// A task started earlier with `started_by` (running or stopped), if ECS still knows it.
    async fn task_started_by(
        &self,
        cluster: &str,
        started_by: &str,
    ) -> CloudResult<Option<String>> {
        for desired in [
            aws_sdk_ecs::types::DesiredStatus::Running,
            aws_sdk_ecs::types::DesiredStatus::Stopped,
        ] {
            let answer = self
                .client
                .list_tasks()
                .cluster(cluster)
                .started_by(started_by)
                .desired_status(desired)
                .send()
                .await
                .map_err(|e| classify("ecs:ListTasks", &e))?;
            if let Some(arn) = answer.task_arns().first() {
                return Ok(Some(arn.clone()));
            }
        }
        Ok(None)
    }

    async fn register(&self, registration: Registration) -> CloudResult<String> {
        if let Some(arn) = self.reusable_revision(&registration).await? {
            return Ok(arn);
        }
        let registered = self
            .client
            .register_task_definition()
            .family(&registration.family)
            .requires_compatibilities(Compatibility::Fargate)
            .network_mode(NetworkMode::Awsvpc)
            .cpu(registration.cpu.to_string())
            .memory(registration.memory_mib.to_string())
            .container_definitions(registration.container)
            .volumes(registration.volume)
            .set_execution_role_arn(role(&registration.execution_role_arn))
            .set_task_role_arn(role(&registration.task_role_arn))
            .set_tags(Some(to_tags(&registration.tags)))
            .send()
            .await
            .map_err(|e| classify("ecs:RegisterTaskDefinition", &e))?;
        registered
            .task_definition()
            .and_then(|definition| definition.task_definition_arn())
            .map(str::to_owned)
            .ok_or_else(|| CloudError::fatal("ecs:RegisterTaskDefinition: no ARN in the answer"))
    }

    /// The service as ECS describes it (any status, with its tags), `None` if ECS never
    /// heard of it.
    async fn describe_service(&self, cluster: &str, name: &str) -> CloudResult<Option<Service>> {
        let answer = self
            .client
            .describe_services()
            .cluster(cluster)
            .services(name)
            .include(ServiceField::Tags)
            .send()
            .await
            .map_err(|e| classify("ecs:DescribeServices", &e))?;
        Ok(answer.services().first().cloned())
    }

    async fn create_service(
        &self,
        spec: &ServiceSpec,
        replaced: Option<&Service>,
    ) -> CloudResult<String> {
        let desired = i32::try_from(spec.desired_count)
            .map_err(|_| CloudError::fatal("ecs:CreateService: desired count out of range"))?;
        let load_balancer = LoadBalancer::builder()
            .target_group_arn(&spec.target_group_arn)
            .container_name(CONTAINER_NAME)
            .container_port(80)
            .build();
        let deployment = DeploymentConfiguration::builder()
            .deployment_circuit_breaker(
                DeploymentCircuitBreaker::builder()
                    .enable(true)
                    .rollback(true)
                    .build(),
            )
            .minimum_healthy_percent(50)
            .maximum_percent(200)
            .build();
        let created = self
            .client
            .create_service()
            .cluster(&spec.cluster)
            .service_name(&spec.name)
            .task_definition(&spec.task_definition_arn)
            .desired_count(desired)
            .launch_type(LaunchType::Fargate)
            .network_configuration(network(&spec.subnets, &spec.security_groups)?)
            .load_balancers(load_balancer)
            .deployment_configuration(deployment)
            .propagate_tags(PropagateTags::Service)
            .enable_ecs_managed_tags(true)
            .set_tags(Some(to_tags(&spec.tags)))
            .client_token(service_client_token(spec, replaced))
            .send()
            .await
            .map_err(|e| classify("ecs:CreateService", &e))?;
        created
            .service()
            .and_then(Service::service_arn)
            .map(str::to_owned)
            .ok_or_else(|| CloudError::fatal("ecs:CreateService: no service in the answer"))
    }

    /// ARNs of the cluster's live (not INACTIVE) services carrying every tag.
    async fn tagged_service_arns(&self, cluster: &str, tags: &Tags) -> CloudResult<Vec<String>> {
        Ok(self
            .described_services(cluster, tags)
            .await?
            .iter()
            .filter(|service| service.status() != Some("INACTIVE"))
            .filter_map(|service| service.service_arn().map(str::to_owned))
            .collect())
    }

    /// The cluster's services carrying every tag, as DescribeServices reports them (with
    /// their tags; any status).
    async fn described_services(&self, cluster: &str, tags: &Tags) -> CloudResult<Vec<Service>> {
        let arns: Vec<String> = self
            .client
            .list_services()
            .cluster(cluster)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("ecs:ListServices", &e))?;
        let mut matching = Vec::new();
        // DescribeServices rather than ListTagsForResource per service: one call per ten
        // services, and it shows the status (deleted services may still be listed).
        for batch in arns.chunks(DESCRIBE_SERVICES_BATCH) {
            let answer = self
                .client
                .describe_services()
                .cluster(cluster)
                .set_services(Some(batch.to_vec()))
                .include(ServiceField::Tags)
                .send()
                .await
                .map_err(|e| classify("ecs:DescribeServices", &e))?;
            for service in answer.services() {
                let pairs = service
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?, t.value()?)));
                if has_all_tags(pairs, tags) {
                    matching.push(service.clone());
                }
            }
        }
        Ok(matching)
    }

    async fn carries_tags(&self, arn: String, tags: &Tags) -> CloudResult<Option<String>> {
        let answer = self
            .client
            .list_tags_for_resource()
            .resource_arn(&arn)
            .send()
            .await
            .map_err(|e| classify("ecs:ListTagsForResource", &e));
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) if error.is_not_found() => return Ok(None),
            // A task definition deleted (DeleteTaskDefinitions) between the listing and
            // this call is answered with a ClientException, not a "not found": if it can
            // no longer be described either, it is gone.
            Err(error) if !error.is_retryable() => {
                let described = self
                    .client
                    .describe_task_definition()
                    .task_definition(&arn)
                    .send()
                    .await
                    .map_err(|e| classify("ecs:DescribeTaskDefinition", &e));
                return match described {
                    Ok(_) => Err(error),
                    Err(again) if !again.is_retryable() => Ok(None),
                    Err(again) => Err(again),
                };
            }
            Err(error) => return Err(error),
        };
        let pairs = answer
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?)));
        Ok(has_all_tags(pairs, tags).then_some(arn))
    }

    /// The revision with its tags (DescribeTaskDefinition `include: TAGS`), `None` if ECS
    /// cannot describe it: an unknown or deleted revision is answered with a
    /// ClientException ("Unable to describe task definition"), not a "not found".
    async fn describe_revision(
        &self,
        arn: &str,
    ) -> CloudResult<
        Option<aws_sdk_ecs::operation::describe_task_definition::DescribeTaskDefinitionOutput>,
    > {
        let answer = self
            .client
            .describe_task_definition()
            .task_definition(arn)
            .include(aws_sdk_ecs::types::TaskDefinitionField::Tags)
            .send()
            .await
            .map_err(|e| classify("ecs:DescribeTaskDefinition", &e));
        match answer {
            Ok(answer) => Ok(Some(answer)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error)
                if error.kind == ErrorKind::Fatal
                    && error.message.contains("Unable to describe task definition") =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Task definitions carrying every tag: ACTIVE and INACTIVE ones (a deregistered
    /// revision stays, tagged, until DeleteTaskDefinitions).
    async fn tagged_task_definitions(&self, tags: &Tags) -> CloudResult<Vec<String>> {
        let mut arns: Vec<String> = Vec::new();
        for status in [TaskDefinitionStatus::Active, TaskDefinitionStatus::Inactive] {
            let listed: Vec<String> = self
                .client
                .list_task_definitions()
                .status(status)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|e| classify("ecs:ListTaskDefinitions", &e))?;
            arns.extend(listed);
        }
        let found: Vec<Option<String>> = futures::stream::iter(arns)
            .map(|arn| self.carries_tags(arn, tags))
            .buffered(TAG_LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }
}

#[async_trait]
impl Compute for AwsCompute {
    async fn register_task_definition(&self, spec: &TaskDefinitionSpec) -> CloudResult<String> {
        self.register(wordpress_registration(spec)?).await
    }

    async fn deregister_task_definitions(&self, family: &str) -> CloudResult<()> {
        for arn in self.active_revisions(family).await? {
            let result = self
                .client
                .deregister_task_definition()
                .task_definition(&arn)
                .send()
                .await
                .map(drop)
                .map_err(|e| classify("ecs:DeregisterTaskDefinition", &e));
            gone_is_ok(result)?;
        }
        Ok(())
    }

    async fn ensure_service(&self, spec: &ServiceSpec) -> CloudResult<String> {
        let existing = self.describe_service(&spec.cluster, &spec.name).await?;
        if let Some(service) = &existing {
            let tags = service
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?, t.value()?)));
            let ours = owned_by(tags, &spec.tags);
            match service.status() {
                Some("ACTIVE" | "DRAINING") if !ours => {
                    return Err(not_ours(&format!("ECS service {}", spec.name)));
                }
                Some("ACTIVE") => {
                    return service.service_arn().map(str::to_owned).ok_or_else(|| {
                        CloudError::fatal("ecs:DescribeServices: service without ARN")
                    });
                }
                // A service of this name is still being deleted; its name frees up soon.
                Some("DRAINING") => {
                    return Err(CloudError::new(
                        ErrorKind::Retryable,
                        format!("ecs:CreateService: service {} is still draining", spec.name),
                    ));
                }
                _ => {}
            }
        }
        match self.create_service(spec, existing.as_ref()).await {
            Ok(arn) => Ok(arn),
            // Lost a race with another replica creating the same service: adopt theirs.
            Err(error) => match self.describe_service(&spec.cluster, &spec.name).await? {
                Some(service) if service.status() == Some("ACTIVE") => {
                    service.service_arn().map(str::to_owned).ok_or(error)
                }
                _ => Err(error),
            },
        }
    }

    async fn service_status(
        &self,
        cluster: &str,
        name: &str,
    ) -> CloudResult<Option<ServiceStatus>> {
        // A deleted service lingers as INACTIVE for a while; for us it is gone.
        match self.describe_service(cluster, name).await {
            Ok(Some(service)) if service.status() != Some("INACTIVE") => {
                Ok(Some(to_status(&service)))
            }
            Ok(_) => Ok(None),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
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
        let desired = desired_count
            .map(i32::try_from)
            .transpose()
            .map_err(|_| CloudError::fatal("ecs:UpdateService: desired count out of range"))?;
        self.client
            .update_service()
            .cluster(cluster)
            .service(name)
            .set_desired_count(desired)
            .set_task_definition(task_definition_arn.map(str::to_owned))
            .force_new_deployment(force_new_deployment)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("ecs:UpdateService", &e))
    }

    async fn delete_service(&self, cluster: &str, name: &str) -> CloudResult<()> {
        // Scaling to zero first lets ECS drain the tasks from the target group in order;
        // `force` then deletes even if the scale-in has not finished.
        gone_is_ok(
            self.update_service(cluster, name, Some(0), None, false)
                .await,
        )?;
        let result = self
            .client
            .delete_service()
            .cluster(cluster)
            .service(name)
            .force(true)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("ecs:DeleteService", &e));
        gone_is_ok(result)
    }

    async fn run_task(&self, spec: &OneOffTaskSpec) -> CloudResult<String> {
        // A resumed step must not start a second task: ECS answers a repeated clientToken
        // with the first task (for a while), and the task carries the token as `startedBy`
        // so it can be found for as long as ECS describes it.
        let token = fingerprint(["one-off-token/1", spec.client_token.as_str()]);
        if let Some(arn) = self.task_started_by(&spec.cluster, &token).await? {
            return Ok(arn);
        }
        let task_definition = self.register(one_off_registration(spec)?).await?;
        let answer = self
            .client
            .run_task()
            .cluster(&spec.cluster)
            .task_definition(&task_definition)
            .launch_type(LaunchType::Fargate)
            .count(1)
            .network_configuration(network(&spec.subnets, &spec.security_groups)?)
            .propagate_tags(aws_sdk_ecs::types::PropagateTags::TaskDefinition)
            .set_tags(Some(to_tags(&spec.tags)))
            .started_by(&token)
            .client_token(&token)
            .send()
            .await
            .map_err(|e| classify("ecs:RunTask", &e))?;
        if let Some(arn) = answer.tasks().first().and_then(|task| task.task_arn()) {
            return Ok(arn.to_owned());
        }
        let reasons: Vec<&str> = answer
            .failures()
            .iter()
            .filter_map(|f| f.reason())
            .collect();
        // `RESOURCE:*` failures mean no capacity right now, worth another try.
        let kind = if reasons.iter().any(|reason| reason.starts_with("RESOURCE")) {
            ErrorKind::Retryable
        } else {
            ErrorKind::Fatal
        };
        Err(CloudError::new(
            kind,
            format!("ecs:RunTask: no task started: {}", reasons.join(", ")),
        ))
    }

    async fn task_status(&self, cluster: &str, task_arn: &str) -> CloudResult<Option<TaskStatus>> {
        let answer = self
            .client
            .describe_tasks()
            .cluster(cluster)
            .tasks(task_arn)
            .send()
            .await
            .map_err(|e| classify("ecs:DescribeTasks", &e));
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) if error.is_not_found() => return Ok(None),
            Err(error) => return Err(error),
        };
        Ok(answer.tasks().first().map(|task| TaskStatus {
            last_status: task.last_status().unwrap_or_default().to_owned(),
            exit_code: task
                .containers()
                .iter()
                .find_map(|container| container.exit_code()),
        }))
    }

    async fn find_tagged(&self, cluster: &str, tags: &Tags) -> CloudResult<Vec<String>> {
        let mut found = self.tagged_service_arns(cluster, tags).await?;
        found.extend(self.tagged_task_definitions(tags).await?);
        Ok(found)
    }

    async fn service_tags(&self, cluster: &str, name: &str) -> CloudResult<Option<Tags>> {
        match self.describe_service(cluster, name).await {
            Ok(Some(service)) if service.status() != Some("INACTIVE") => Ok(Some(
                service
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                    .collect(),
            )),
            Ok(_) => Ok(None),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn delete_task_definitions(&self, family: &str, owner: &Tags) -> CloudResult<()> {
        let mut ours = Vec::new();
        for status in [TaskDefinitionStatus::Active, TaskDefinitionStatus::Inactive] {
            for arn in self.revisions(family, status.clone()).await? {
                if let Some(arn) = self.carries_tags(arn, owner).await? {
                    ours.push((status.clone(), arn));
                }
            }
        }
        for (status, arn) in &ours {
            if *status == TaskDefinitionStatus::Active {
                let result = self
                    .client
                    .deregister_task_definition()
                    .task_definition(arn)
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| classify("ecs:DeregisterTaskDefinition", &e));
                gone_is_ok(result)?;
            }
        }
        // Only INACTIVE revisions can be deleted; deletion is asynchronous
        // (DELETE_IN_PROGRESS), and a revision already gone is fine.
        let arns: Vec<String> = ours.into_iter().map(|(_, arn)| arn).collect();
        for batch in arns.chunks(DELETE_TASK_DEFINITIONS_BATCH) {
            let answer = self
                .client
                .delete_task_definitions()
                .set_task_definitions(Some(batch.to_vec()))
                .send()
                .await
                .map_err(|e| classify("ecs:DeleteTaskDefinitions", &e));
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) if error.is_not_found() => continue,
                Err(error) => return Err(error),
            };
            let failures: Vec<String> = answer
                .failures()
                .iter()
                .filter_map(|f| f.reason())
                .filter(|reason| !reason.contains("does not exist"))
                .map(str::to_owned)
                .collect();
            if !failures.is_empty() {
                return Err(CloudError::new(
                    ErrorKind::Retryable,
                    format!("ecs:DeleteTaskDefinitions: {}", failures.join(", ")),
                ));
            }
        }
        Ok(())
    }

    async fn tagged_services(
        &self,
        cluster: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        Ok(self
            .described_services(cluster, tags)
            .await?
            .iter()
            .filter(|service| service.status() == Some("ACTIVE"))
            .filter_map(|service| {
                Some(TaggedResource {
                    kind: "service",
                    id: service.service_name()?.to_owned(),
                    tags: service
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                        .collect(),
                    created_at: service
                        .created_at()
                        .and_then(|at| at.to_millis().ok())
                        .map(Timestamp),
                })
            })
            .collect())
    }

    async fn tagged_task_families(
        &self,
        family_prefix: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        // ListTaskDefinitions' `familyPrefix` is an exact family; the families' listing
        // is the one that takes a prefix.
        let families: Vec<String> = self
            .client
            .list_task_definition_families()
            .family_prefix(family_prefix)
            .status(aws_sdk_ecs::types::TaskDefinitionFamilyStatus::All)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("ecs:ListTaskDefinitionFamilies", &e))?;
        let mut arns = Vec::new();
        for family in families.iter().filter(|f| f.starts_with(family_prefix)) {
            for status in [TaskDefinitionStatus::Active, TaskDefinitionStatus::Inactive] {
                arns.extend(self.revisions(family, status).await?);
            }
        }
        let described: Vec<_> = futures::stream::iter(arns)
            .map(|arn| async move { self.describe_revision(&arn).await })
            .buffered(TAG_LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await?;
        // One entry per (family, owner): the owner's latest revision's tags, and the newest
        // registration (a family is as young as its newest revision).
        let mut found: Vec<(u32, TaggedResource)> = Vec::new();
        for answer in described.into_iter().flatten() {
            let Some(definition) = answer.task_definition() else {
                continue;
            };
            let have: Tags = answer
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                .collect();
            let pairs = have.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            if !has_all_tags(pairs, tags) {
                continue;
            }
            let Some(family) = definition.family() else {
                continue;
            };
            let revision = u32::try_from(definition.revision()).unwrap_or(0);
            let registered = definition
                .registered_at()
                .and_then(|at| at.to_millis().ok())
                .map(Timestamp);
            let owner = owner_tags(&have);
            let same = found
                .iter_mut()
                .find(|(_, entry)| entry.id == family && owner_tags(&entry.tags) == owner);
            match same {
                Some((latest, entry)) => {
                    if revision > *latest {
                        *latest = revision;
                        entry.tags = have;
                    }
                    entry.created_at = entry.created_at.max(registered);
                }
                None => found.push((
                    revision,
                    TaggedResource {
                        kind: "task_definition",
                        id: family.to_owned(),
                        tags: have,
                        created_at: registered,
                    },
                )),
            }
        }
        Ok(found.into_iter().map(|(_, entry)| entry).collect())
    }

    async fn task_definition(&self, arn: &str) -> CloudResult<Option<TaskDefinitionInfo>> {
        let Some(answer) = self.describe_revision(arn).await? else {
            return Ok(None);
        };
        Ok(answer.task_definition().map(|definition| {
            let containers = definition.container_definitions();
            let wordpress = containers
                .iter()
                .find(|c| c.name() == Some(CONTAINER_NAME))
                .or_else(|| containers.first());
            TaskDefinitionInfo {
                arn: definition.task_definition_arn().unwrap_or(arn).to_owned(),
                status: definition
                    .status()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                image: wordpress.and_then(|c| c.image()).map(str::to_owned),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_definition_arns_split_into_family_and_revision() {
        let arn = "arn:aws:ecs:us-east-1:123456789012:task-definition/bbws-dev-acme:12";
        assert_eq!(family_and_revision(arn), Some(("bbws-dev-acme", 12)));
        assert_eq!(family_and_revision("nonsense"), None);
    }

    #[test]
    fn a_tls_database_connection_is_configured_and_fingerprinted() {
        let spec = TaskDefinitionSpec {
            family: "bbws-dev-acme".into(),
            cpu: 512,
            memory_mib: 1024,
            image: "wordpress:6.7".into(),
            file_system_id: "fs-1".into(),
            access_point_id: "fsap-1".into(),
            secret_arn: "arn:aws:secretsmanager:us-east-1:1:secret:x".into(),
            db_host: "db:3306".into(),
            db_name: "tenant_acme_dev_db".into(),
            log_group: "/bbws/dev".into(),
            log_region: "us-east-1".into(),
            log_stream_prefix: "acme".into(),
            execution_role_arn: "arn:aws:iam::1:role/exec".into(),
            task_role_arn: String::new(),
            db_tls: false,
            tags: Vec::new(),
        };
        let extra = |registration: &Registration| {
            registration
                .container
                .environment()
                .iter()
                .find(|e| e.name() == Some("WORDPRESS_CONFIG_EXTRA"))
                .and_then(|e| e.value())
                .map(str::to_owned)
        };
        let plain = wordpress_registration(&spec).unwrap();
        assert_eq!(extra(&plain), None);
        assert_eq!(plain.container.environment().len(), 2);
        let tls = wordpress_registration(&TaskDefinitionSpec {
            db_tls: true,
            ..spec.clone()
        })
        .unwrap();
        assert_eq!(extra(&tls).as_deref(), Some(WORDPRESS_DB_TLS));
        assert_eq!(tls.container.environment().len(), 3);
        assert_ne!(plain.fingerprint, tls.fingerprint, "a new revision");
    }

    #[test]
    fn fingerprints_do_not_depend_on_where_parts_are_split() {
        assert_ne!(fingerprint(["ab", "c"]), fingerprint(["a", "bc"]));
        assert_eq!(fingerprint(["ab", "c"]), fingerprint(["ab", "c"]));
    }
}
