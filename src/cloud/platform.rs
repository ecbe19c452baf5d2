//! An environment's shared platform, created in an emulator (moto) for local runs and
//! tests: VPC, subnets, security group, ECS cluster, EFS file system, ALB with its HTTPS
//! listener, an RDS instance record, the master secret, the log group, the archive bucket,
//! and the Route53 zones: the sites' domain and a managed customer zone
//! ([`EMULATED_MANAGED_ZONE`]).
//!
//! In production the platform is made by the platform team's infrastructure code and only
//! referenced in the configuration; this module makes a faithful stand-in. Every step finds
//! its resource first (by deterministic name, creation token or the `bbws:platform` tag), so
//! running it again returns the same ids and creates nothing.

use std::time::Duration;

use aws_config::SdkConfig;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::error::classify;
use super::{CloudError, CloudResult, ErrorKind, ManagedZone, MasterCredentials, Platform};
use crate::domain::Environment;

/// Tag key marking every platform resource with its environment (`DEV`, …).
pub const PLATFORM_TAG: &str = "bbws:platform";
/// Image of the one-off wp-content archiver task.
pub const ARCHIVER_IMAGE: &str = "public.ecr.aws/docker/library/alpine:3";
/// The emulated platform's managed customer zone: a clearly fake domain delegated to us, so
/// that custom domains under it get their records created by the control plane, while any
/// other custom domain's records are returned for its owner to create.
pub const EMULATED_MANAGED_ZONE: &str = "bbws-customers.example";
/// A new file system takes a few seconds to become available in AWS (at once in moto).
const FILE_SYSTEM_WAIT: Duration = Duration::from_secs(120);

/// Deterministic names of one environment's platform resources.
struct Names {
    env: Environment,
    /// `bbws-{env}`: VPC Name tag, ECS cluster, ALB, RDS instance.
    base: String,
    cidr_octet: u8,
}

impl Names {
    fn new(env: Environment) -> Self {
        let cidr_octet = match env {
            Environment::Dev => 10,
            Environment::Sit => 20,
            Environment::Prod => 30,
        };
        Self {
            env,
            base: format!("bbws-{}", env.short()),
            cidr_octet,
        }
    }

    fn tags(&self, name: &str) -> Vec<(String, String)> {
        vec![
            ("Name".into(), name.to_owned()),
            (PLATFORM_TAG.into(), self.env.as_str().into()),
            ("bbws:environment".into(), self.env.as_str().into()),
            ("bbws:managed-by".into(), "instance-manager".into()),
            ("bbws:component".into(), "platform".into()),
        ]
    }
}

/// The AWS error code of a service error, if that is what `error` is.
fn code<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> Option<&str> {
    error.as_service_error().and_then(|e| e.code())
}

fn invalid(what: &str, error: impl std::fmt::Display) -> CloudError {
    CloudError::fatal(format!("{what}: {error}"))
}

fn missing(what: &str, field: &str) -> CloudError {
    CloudError::fatal(format!("{what}: the response has no {field}"))
}

/// Creates (or finds) the shared platform of `environment` in the account `sdk` reaches.
///
/// `db` is the MySQL server tenants' databases go to (a real server, since the emulator's
/// RDS has none): the master secret points at it, and so do `db_host`/`db_port`.
pub async fn ensure_platform(
    sdk: &SdkConfig,
    environment: Environment,
    db: &MasterCredentials,
    domain: &str,
) -> CloudResult<Platform> {
    let names = Names::new(environment);
    let account = aws_sdk_sts::Client::new(sdk)
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| classify("sts:GetCallerIdentity", &e))?
        .account
        .ok_or_else(|| missing("sts:GetCallerIdentity", "account"))?;
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .ok_or_else(|| CloudError::fatal("ensure platform: no region configured"))?;
    tracing::info!(environment = %environment, %account, %region, "ensuring platform");

    let ec2 = aws_sdk_ec2::Client::new(sdk);
    let vpc_id = ensure_vpc(&ec2, &names).await?;
    let subnets = ensure_subnets(&ec2, &names, &vpc_id).await?;
    let security_group = ensure_security_group(&ec2, &names, &vpc_id).await?;
    let cluster = ensure_cluster(sdk, &names).await?;
    let file_system_id = ensure_file_system(sdk, &names, &subnets, &security_group).await?;
    let certificate_arn = ensure_certificate(sdk, &names, domain).await?;
    // A pool of two load balancers, so that placement is visible; the first is also the
    // platform's `listener_arn`.
    let mut load_balancers = Vec::new();
    for (index, name) in [(1, names.base.clone()), (2, format!("{}-2", names.base))] {
        let mut lb = ensure_load_balancer(
            sdk,
            &names,
            &name,
            &subnets,
            &security_group,
            &certificate_arn,
        )
        .await?;
        lb.name = format!("alb-{index}");
        load_balancers.push(lb);
    }
    let listener_arn = load_balancers[0].listener_arn.clone();
    ensure_db_instance(sdk, &names, db, &security_group).await?;
    let master_secret_arn = ensure_master_secret(sdk, &names, db).await?;
    let log_group = ensure_log_group(sdk, &names).await?;
    let archive_bucket = ensure_bucket(sdk, &names, &account, &region).await?;
    let (hosted_zone_id, managed_zones) = ensure_zones(sdk, domain).await?;

    let env = environment.short();
    Ok(Platform {
        vpc_id,
        cluster,
        subnets,
        security_groups: vec![security_group],
        file_system_id,
        db_host: db.host.clone(),
        db_port: db.port,
        db_tls: db.tls,
        db_ca_file: db
            .ca_file
            .as_ref()
            .map(|path| path.to_string_lossy().into_owned())
            .unwrap_or_default(),
        master_secret_arn,
        listener_arn,
        load_balancers,
        domain: domain.to_owned(),
        log_group,
        archive_bucket,
        cognito_enabled: environment == Environment::Dev,
        execution_role_arn: format!("arn:aws:iam::{account}:role/bbws-{env}-task-execution"),
        task_role_arn: format!("arn:aws:iam::{account}:role/bbws-{env}-task"),
        archiver_image: ARCHIVER_IMAGE.to_owned(),
        // The defaults: the MariaDB client programs on this host's PATH.
        db_dump_command: String::new(),
        db_client_command: String::new(),
        // The emulator starts no tasks, so no target ever registers with the target groups:
        // requiring healthy targets would keep every instance from becoming ACTIVE.
        min_healthy_targets: Some(0),
        emulator: true,
        deregistration_delay_secs: None,
        db_instance_identifier: names.base.clone(),
        hosted_zone_id,
        managed_zones,
        ..Platform::default()
    })
}

fn ec2_tags(
    names: &Names,
    name: &str,
    resource: aws_sdk_ec2::types::ResourceType,
) -> aws_sdk_ec2::types::TagSpecification {
    use aws_sdk_ec2::types::{Tag, TagSpecification};
    let tags = names
        .tags(name)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    TagSpecification::builder()
        .resource_type(resource)
        .set_tags(Some(tags))
        .build()
}

fn ec2_filter(name: &str, value: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name(name)
        .values(value)
        .build()
}

async fn ensure_vpc(ec2: &aws_sdk_ec2::Client, names: &Names) -> CloudResult<String> {
    use aws_sdk_ec2::types::{AttributeBooleanValue, ResourceType};
    let found = ec2
        .describe_vpcs()
        .filters(ec2_filter(
            &format!("tag:{PLATFORM_TAG}"),
            names.env.as_str(),
        ))
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeVpcs", &e))?;
    let vpc_id = match found.vpcs().iter().find_map(|v| v.vpc_id()) {
        Some(id) => id.to_owned(),
        None => {
            let created = ec2
                .create_vpc()
                .cidr_block(format!("10.{}.0.0/16", names.cidr_octet))
                // Tagged in the same call: a crash cannot leave an untagged VPC behind.
                .tag_specifications(ec2_tags(names, &names.base, ResourceType::Vpc))
                .send()
                .await
                .map_err(|e| classify("ec2:CreateVpc", &e))?;
            let id = created
                .vpc()
                .and_then(|v| v.vpc_id())
                .ok_or_else(|| missing("ec2:CreateVpc", "vpc id"))?
                .to_owned();
            tracing::info!(vpc = %id, "vpc created");
            id
        }
    };
    // One attribute per call (EC2's rule). ECS tasks with EFS need DNS names in the VPC.
    let on = || AttributeBooleanValue::builder().value(true).build();
    ec2.modify_vpc_attribute()
        .vpc_id(&vpc_id)
        .enable_dns_support(on())
        .send()
        .await
        .map_err(|e| classify("ec2:ModifyVpcAttribute", &e))?;
    ec2.modify_vpc_attribute()
        .vpc_id(&vpc_id)
        .enable_dns_hostnames(on())
        .send()
        .await
        .map_err(|e| classify("ec2:ModifyVpcAttribute", &e))?;
    Ok(vpc_id)
}

/// Two subnets in the region's first two availability zones (an ALB needs two).
async fn ensure_subnets(
    ec2: &aws_sdk_ec2::Client,
    names: &Names,
    vpc_id: &str,
) -> CloudResult<Vec<String>> {
    use aws_sdk_ec2::types::{AvailabilityZoneState, ResourceType};
    let zones = ec2
        .describe_availability_zones()
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeAvailabilityZones", &e))?;
    let mut zones: Vec<String> = zones
        .availability_zones()
        .iter()
        .filter(|z| z.state() == Some(&AvailabilityZoneState::Available))
        .filter_map(|z| z.zone_name().map(str::to_owned))
        .collect();
    zones.sort();
    if zones.len() < 2 {
        return Err(CloudError::fatal(
            "ensure platform: the region has fewer than two availability zones",
        ));
    }
    let mut subnets = Vec::new();
    for (index, zone) in zones.iter().take(2).enumerate() {
        let name = format!("{}-{index}", names.base);
        let found = ec2
            .describe_subnets()
            .filters(ec2_filter("vpc-id", vpc_id))
            .filters(ec2_filter("tag:Name", &name))
            .send()
            .await
            .map_err(|e| classify("ec2:DescribeSubnets", &e))?;
        if let Some(id) = found.subnets().iter().find_map(|s| s.subnet_id()) {
            subnets.push(id.to_owned());
            continue;
        }
        let created = ec2
            .create_subnet()
            .vpc_id(vpc_id)
            .availability_zone(zone)
            .cidr_block(format!("10.{}.{index}.0/24", names.cidr_octet))
            .tag_specifications(ec2_tags(names, &name, ResourceType::Subnet))
            .send()
            .await
            .map_err(|e| classify("ec2:CreateSubnet", &e))?;
        let id = created
            .subnet()
            .and_then(|s| s.subnet_id())
            .ok_or_else(|| missing("ec2:CreateSubnet", "subnet id"))?
            .to_owned();
        tracing::info!(subnet = %id, %zone, "subnet created");
        subnets.push(id);
    }
    Ok(subnets)
}

/// One group for the ALB, the tasks and the EFS mount targets: members reach each other
/// (ALB → task :80, task → EFS :2049), and HTTPS is open to the world for the ALB.
async fn ensure_security_group(
    ec2: &aws_sdk_ec2::Client,
    names: &Names,
    vpc_id: &str,
) -> CloudResult<String> {
    use aws_sdk_ec2::types::{IpPermission, IpRange, ResourceType, UserIdGroupPair};
    let name = format!("{}-platform", names.base);
    let found = ec2
        .describe_security_groups()
        .filters(ec2_filter("vpc-id", vpc_id))
        .filters(ec2_filter("group-name", &name))
        .send()
        .await
        .map_err(|e| classify("ec2:DescribeSecurityGroups", &e))?;
    let group_id = match found.security_groups().iter().find_map(|g| g.group_id()) {
        Some(id) => id.to_owned(),
        None => {
            let created = ec2
                .create_security_group()
                .vpc_id(vpc_id)
                .group_name(&name)
                .description("bbws platform: ALB, tasks and EFS mount targets")
                .tag_specifications(ec2_tags(names, &name, ResourceType::SecurityGroup))
                .send()
                .await
                .map_err(|e| classify("ec2:CreateSecurityGroup", &e))?;
            let id = created
                .group_id()
                .ok_or_else(|| missing("ec2:CreateSecurityGroup", "group id"))?
                .to_owned();
            tracing::info!(security_group = %id, "security group created");
            id
        }
    };
    let rules = [
        IpPermission::builder()
            .ip_protocol("-1")
            .user_id_group_pairs(UserIdGroupPair::builder().group_id(&group_id).build())
            .build(),
        IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(443)
            .to_port(443)
            .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
            .build(),
    ];
    for rule in rules {
        let result = ec2
            .authorize_security_group_ingress()
            .group_id(&group_id)
            .ip_permissions(rule)
            .send()
            .await;
        match result {
            Ok(_) => {}
            Err(e) if code(&e) == Some("InvalidPermission.Duplicate") => {}
            Err(e) => return Err(classify("ec2:AuthorizeSecurityGroupIngress", &e)),
        }
    }
    Ok(group_id)
}

/// CreateCluster returns the existing cluster when one of that name is active.
async fn ensure_cluster(sdk: &SdkConfig, names: &Names) -> CloudResult<String> {
    use aws_sdk_ecs::types::Tag;
    let ecs = aws_sdk_ecs::Client::new(sdk);
    let tags = names
        .tags(&names.base)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let created = ecs
        .create_cluster()
        .cluster_name(&names.base)
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| classify("ecs:CreateCluster", &e))?;
    Ok(created
        .cluster()
        .and_then(|c| c.cluster_name())
        .unwrap_or(&names.base)
        .to_owned())
}

async fn ensure_file_system(
    sdk: &SdkConfig,
    names: &Names,
    subnets: &[String],
    security_group: &str,
) -> CloudResult<String> {
    use aws_sdk_efs::types::{LifeCycleState, PerformanceMode, Tag};
    let efs = aws_sdk_efs::Client::new(sdk);
    let token = format!("{}-platform", names.base);
    let describe = || async {
        efs.describe_file_systems()
            .creation_token(&token)
            .send()
            .await
            .map_err(|e| classify("efs:DescribeFileSystems", &e))
            .map(|out| {
                out.file_systems().first().map(|fs| {
                    (
                        fs.file_system_id().to_owned(),
                        fs.life_cycle_state().clone(),
                    )
                })
            })
    };
    let file_system_id = match describe().await? {
        Some((id, _)) => id,
        None => {
            let tags = names
                .tags(&names.base)
                .into_iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("efs:CreateFileSystem", e))?;
            let created = efs
                .create_file_system()
                .creation_token(&token)
                .encrypted(true)
                .performance_mode(PerformanceMode::GeneralPurpose)
                .set_tags(Some(tags))
                .send()
                .await;
            match created {
                Ok(out) => {
                    tracing::info!(file_system = %out.file_system_id(), "file system created");
                    out.file_system_id().to_owned()
                }
                // Another run got there first: the token makes it the same file system.
                Err(e) if code(&e) == Some("FileSystemAlreadyExists") => describe()
                    .await?
                    .map(|(id, _)| id)
                    .ok_or_else(|| missing("efs:DescribeFileSystems", "file system"))?,
                Err(e) => return Err(classify("efs:CreateFileSystem", &e)),
            }
        }
    };
    // Mount targets can only be added to an available file system.
    let deadline = tokio::time::Instant::now() + FILE_SYSTEM_WAIT;
    loop {
        match describe().await? {
            Some((_, LifeCycleState::Available)) => break,
            Some((_, state)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(file_system = %file_system_id, ?state, "waiting for file system");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            other => {
                return Err(CloudError::new(
                    ErrorKind::Retryable,
                    format!(
                        "file system {file_system_id} is not available: {:?}",
                        other.map(|(_, state)| state)
                    ),
                ));
            }
        }
    }
    let existing = efs
        .describe_mount_targets()
        .file_system_id(&file_system_id)
        .send()
        .await
        .map_err(|e| classify("efs:DescribeMountTargets", &e))?;
    let covered: Vec<&str> = existing
        .mount_targets()
        .iter()
        .map(|m| m.subnet_id())
        .collect();
    for subnet in subnets.iter().filter(|s| !covered.contains(&s.as_str())) {
        let created = efs
            .create_mount_target()
            .file_system_id(&file_system_id)
            .subnet_id(subnet)
            .security_groups(security_group)
            .send()
            .await;
        match created {
            Ok(out) => {
                tracing::info!(mount_target = %out.mount_target_id(), %subnet, "mount target created")
            }
            // One mount target per availability zone: the zone is served already.
            Err(e) if code(&e) == Some("MountTargetConflict") => {}
            Err(e) => return Err(classify("efs:CreateMountTarget", &e)),
        }
    }
    Ok(file_system_id)
}

/// The public hosted zones: `domain`'s (the instances' alias records) and the managed
/// customer zone [`EMULATED_MANAGED_ZONE`]. Returns their ids.
async fn ensure_zones(sdk: &SdkConfig, domain: &str) -> CloudResult<(String, Vec<ManagedZone>)> {
    let route53 = aws_sdk_route53::Client::new(sdk);
    let sites = ensure_hosted_zone(&route53, domain).await?;
    let customers = ensure_hosted_zone(&route53, EMULATED_MANAGED_ZONE).await?;
    Ok((
        sites,
        vec![ManagedZone {
            domain: EMULATED_MANAGED_ZONE.to_owned(),
            hosted_zone_id: customers,
        }],
    ))
}

/// The public hosted zone of `domain`, found by name first; created with a caller reference
/// derived from the name, so a repeated creation is refused rather than made twice. Returns
/// its id without the `/hostedzone/` prefix.
async fn ensure_hosted_zone(
    route53: &aws_sdk_route53::Client,
    domain: &str,
) -> CloudResult<String> {
    let bare = |id: &str| id.trim_start_matches("/hostedzone/").to_owned();
    let want = super::aws::normalise_name(domain);
    let find = || async {
        let found = route53
            .list_hosted_zones_by_name()
            .dns_name(format!("{want}."))
            .send()
            .await
            .map_err(|e| classify("route53:ListHostedZonesByName", &e))?;
        CloudResult::Ok(
            found
                .hosted_zones()
                .iter()
                .find(|zone| {
                    super::aws::normalise_name(zone.name()) == want
                        && !zone.config().is_some_and(|c| c.private_zone())
                })
                .map(|zone| bare(zone.id())),
        )
    };
    if let Some(id) = find().await? {
        return Ok(id);
    }
    let created = route53
        .create_hosted_zone()
        .name(format!("{want}."))
        .caller_reference(format!("bbws-platform-{want}"))
        .send()
        .await;
    match created {
        Ok(out) => {
            let id = out
                .hosted_zone()
                .map(|zone| bare(zone.id()))
                .ok_or_else(|| missing("route53:CreateHostedZone", "hosted zone"))?;
            tracing::info!(zone = %want, hosted_zone_id = %id, "hosted zone created");
            Ok(id)
        }
        // HostedZoneAlreadyExists: the same caller reference, made meanwhile.
        Err(error) if code(&error) == Some("HostedZoneAlreadyExists") => find()
            .await?
            .ok_or_else(|| classify("route53:CreateHostedZone", &error)),
        Err(error) => Err(classify("route53:CreateHostedZone", &error)),
    }
}

/// A wildcard certificate for the sites. In AWS it stays PENDING_VALIDATION until its DNS
/// record exists (which the platform team's DNS does); moto accepts it on a listener as is.
async fn ensure_certificate(sdk: &SdkConfig, names: &Names, domain: &str) -> CloudResult<String> {
    use aws_sdk_acm::types::{CertificateStatus, Tag, ValidationMethod};
    let acm = aws_sdk_acm::Client::new(sdk);
    let wildcard = format!("*.{domain}");
    let mut next_token = None;
    let mut found: Option<(String, bool)> = None;
    loop {
        let page = acm
            .list_certificates()
            .certificate_statuses(CertificateStatus::Issued)
            .certificate_statuses(CertificateStatus::PendingValidation)
            .set_next_token(next_token.take())
            .send()
            .await
            .map_err(|e| classify("acm:ListCertificates", &e))?;
        for summary in page.certificate_summary_list() {
            if summary.domain_name() != Some(wildcard.as_str()) {
                continue;
            }
            let issued = summary.status() == Some(&CertificateStatus::Issued);
            if let Some(arn) = summary.certificate_arn()
                && found
                    .as_ref()
                    .is_none_or(|(_, was_issued)| issued && !was_issued)
            {
                found = Some((arn.to_owned(), issued));
            }
        }
        next_token = page.next_token().map(str::to_owned);
        if next_token.is_none() {
            break;
        }
    }
    if let Some((arn, _)) = found {
        return Ok(arn);
    }
    let tags = names
        .tags(&names.base)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("acm:RequestCertificate", e))?;
    let requested = acm
        .request_certificate()
        .domain_name(&wildcard)
        .subject_alternative_names(domain)
        .validation_method(ValidationMethod::Dns)
        // Letters and digits only; AWS returns the same certificate for an hour.
        .idempotency_token(format!("bbws{}platform", names.env.short()))
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| classify("acm:RequestCertificate", &e))?;
    let arn = requested
        .certificate_arn()
        .ok_or_else(|| missing("acm:RequestCertificate", "certificate arn"))?
        .to_owned();
    tracing::info!(certificate = %arn, "certificate requested");
    Ok(arn)
}

/// The ALB `name` and its HTTPS listener on 443, whose default action answers 404: a host
/// that no tenant rule matches is no site. Returns it as a pool member (named `name`; the
/// caller names it), with AWS's default quotas.
async fn ensure_load_balancer(
    sdk: &SdkConfig,
    names: &Names,
    name: &str,
    subnets: &[String],
    security_group: &str,
    certificate_arn: &str,
) -> CloudResult<super::LoadBalancer> {
    use aws_sdk_elasticloadbalancingv2::types::{
        Action, ActionTypeEnum, Certificate, FixedResponseActionConfig, IpAddressType,
        LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, Tag,
    };
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(sdk);
    let tags: Vec<Tag> = names
        .tags(name)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let described = |lb: &aws_sdk_elasticloadbalancingv2::types::LoadBalancer| {
        lb.load_balancer_arn().map(|arn| {
            (
                arn.to_owned(),
                lb.dns_name().unwrap_or_default().to_owned(),
                lb.canonical_hosted_zone_id().unwrap_or_default().to_owned(),
            )
        })
    };
    let found = elb
        .describe_load_balancers()
        .names(name)
        .send()
        .await
        .map_err(|e| classify("elbv2:DescribeLoadBalancers", &e));
    let found = match found {
        Ok(out) => out.load_balancers().iter().find_map(described),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e),
    };
    let (load_balancer_arn, dns_name, hosted_zone_id) = match found {
        Some(found) => found,
        None => {
            let created = elb
                .create_load_balancer()
                .name(name)
                .r#type(LoadBalancerTypeEnum::Application)
                .scheme(LoadBalancerSchemeEnum::InternetFacing)
                .ip_address_type(IpAddressType::Ipv4)
                .set_subnets(Some(subnets.to_vec()))
                .security_groups(security_group)
                .set_tags(Some(tags.clone()))
                .send()
                .await
                .map_err(|e| classify("elbv2:CreateLoadBalancer", &e))?;
            let found = created
                .load_balancers()
                .iter()
                .find_map(described)
                .ok_or_else(|| missing("elbv2:CreateLoadBalancer", "load balancer arn"))?;
            tracing::info!(load_balancer = %found.0, "load balancer created");
            found
        }
    };
    let member = |listener_arn: String| super::LoadBalancer {
        name: name.to_owned(),
        listener_arn,
        dns_name: dns_name.clone(),
        hosted_zone_id: hosted_zone_id.clone(),
        ..super::LoadBalancer::default()
    };
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(&load_balancer_arn)
        .send()
        .await
        .map_err(|e| classify("elbv2:DescribeListeners", &e))?;
    // moto (unlike AWS) accepts a second listener on a port, so finding first matters.
    if let Some(arn) = listeners
        .listeners()
        .iter()
        .find(|l| l.port() == Some(443))
        .and_then(|l| l.listener_arn())
    {
        return Ok(member(arn.to_owned()));
    }
    let not_found = Action::builder()
        .r#type(ActionTypeEnum::FixedResponse)
        .fixed_response_config(
            FixedResponseActionConfig::builder()
                .status_code("404")
                .content_type("text/plain")
                .message_body("no such site")
                .build(),
        )
        .build();
    let created = elb
        .create_listener()
        .load_balancer_arn(&load_balancer_arn)
        .protocol(ProtocolEnum::Https)
        .port(443)
        .ssl_policy("ELBSecurityPolicy-TLS13-1-2-2021-06")
        .certificates(
            Certificate::builder()
                .certificate_arn(certificate_arn)
                .build(),
        )
        .default_actions(not_found)
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| classify("elbv2:CreateListener", &e))?;
    let arn = created
        .listeners()
        .iter()
        .find_map(|l| l.listener_arn())
        .ok_or_else(|| missing("elbv2:CreateListener", "listener arn"))?
        .to_owned();
    tracing::info!(listener = %arn, "https listener created");
    Ok(member(arn))
}

/// The RDS instance record. moto invents an endpoint with no server behind it, so the
/// platform keeps the real server's host and port instead; the record exists so that the
/// emulated account looks like a real one. RDS keeps its own master password
/// (ManageMasterUserPassword), so no password is invented here.
async fn ensure_db_instance(
    sdk: &SdkConfig,
    names: &Names,
    db: &MasterCredentials,
    security_group: &str,
) -> CloudResult<()> {
    use aws_sdk_rds::types::Tag;
    let rds = aws_sdk_rds::Client::new(sdk);
    match rds
        .describe_db_instances()
        .db_instance_identifier(&names.base)
        .send()
        .await
    {
        Ok(_) => return Ok(()),
        Err(e) => {
            let error = classify("rds:DescribeDBInstances", &e);
            if !error.is_not_found() {
                return Err(error);
            }
        }
    }
    let tags = names
        .tags(&names.base)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let created = rds
        .create_db_instance()
        .db_instance_identifier(&names.base)
        .engine("mysql")
        .db_instance_class("db.t3.micro")
        .allocated_storage(20)
        .master_username(&db.username)
        .manage_master_user_password(true)
        .vpc_security_group_ids(security_group)
        .publicly_accessible(false)
        .set_tags(Some(tags))
        .send()
        .await;
    match created {
        Ok(_) => {
            tracing::info!(db_instance = %names.base, "rds instance record created");
            Ok(())
        }
        Err(e) => {
            let error = classify("rds:CreateDBInstance", &e);
            if error.kind == ErrorKind::Conflict {
                Ok(())
            } else {
                Err(error)
            }
        }
    }
}

/// `bbws/{env}/rds/master`, in the JSON shape RDS uses, pointing at the real server. An
/// existing secret is brought up to date, so a changed `db` is picked up by a rerun.
async fn ensure_master_secret(
    sdk: &SdkConfig,
    names: &Names,
    db: &MasterCredentials,
) -> CloudResult<String> {
    use aws_sdk_secretsmanager::types::Tag;
    let secrets = aws_sdk_secretsmanager::Client::new(sdk);
    let name = format!("bbws/{}/rds/master", names.env.short());
    let value = serde_json::json!({
        "engine": "mysql",
        "host": db.host,
        "port": db.port,
        "username": db.username,
        "password": db.password.expose(),
        "dbInstanceIdentifier": names.base,
    })
    .to_string();
    let tags = names
        .tags(&name)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let created = secrets
        .create_secret()
        .name(&name)
        .description("MySQL master credentials of the environment (instance-manager)")
        .secret_string(&value)
        .set_tags(Some(tags))
        .send()
        .await;
    match created {
        Ok(out) => {
            tracing::info!(secret = %name, "master secret created");
            out.arn()
                .map(str::to_owned)
                .ok_or_else(|| missing("secretsmanager:CreateSecret", "arn"))
        }
        Err(e) if code(&e) == Some("ResourceExistsException") => {
            let current = secrets
                .get_secret_value()
                .secret_id(&name)
                .send()
                .await
                .map_err(|e| classify("secretsmanager:GetSecretValue", &e))?;
            if current.secret_string() != Some(value.as_str()) {
                secrets
                    .put_secret_value()
                    .secret_id(&name)
                    .secret_string(&value)
                    .send()
                    .await
                    .map_err(|e| classify("secretsmanager:PutSecretValue", &e))?;
                tracing::info!(secret = %name, "master secret updated");
            }
            current
                .arn()
                .map(str::to_owned)
                .ok_or_else(|| missing("secretsmanager:GetSecretValue", "arn"))
        }
        Err(e) => Err(classify("secretsmanager:CreateSecret", &e)),
    }
}

async fn ensure_log_group(sdk: &SdkConfig, names: &Names) -> CloudResult<String> {
    let logs = aws_sdk_cloudwatchlogs::Client::new(sdk);
    let name = format!("/bbws/{}/wordpress", names.env.short());
    let created = logs
        .create_log_group()
        .log_group_name(&name)
        .set_tags(Some(names.tags(&name).into_iter().collect()))
        .send()
        .await;
    match created {
        Ok(_) => tracing::info!(log_group = %name, "log group created"),
        Err(e) if code(&e) == Some("ResourceAlreadyExistsException") => {}
        Err(e) => return Err(classify("logs:CreateLogGroup", &e)),
    }
    logs.put_retention_policy()
        .log_group_name(&name)
        .retention_in_days(30)
        .send()
        .await
        .map_err(|e| classify("logs:PutRetentionPolicy", &e))?;
    Ok(name)
}

/// `bbws-{env}-archive-{account}`: private, objects expire after the 90-day retention.
async fn ensure_bucket(
    sdk: &SdkConfig,
    names: &Names,
    account: &str,
    region: &str,
) -> CloudResult<String> {
    use aws_sdk_s3::types::{
        AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, BucketLocationConstraint,
        CreateBucketConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
        LifecycleRuleFilter, PublicAccessBlockConfiguration, Tag, Tagging,
    };
    let s3 = aws_sdk_s3::Client::new(sdk);
    let bucket = format!("{}-archive-{account}", names.base);
    let exists = match s3.head_bucket().bucket(&bucket).send().await {
        Ok(_) => true,
        Err(e) => {
            let error = classify("s3:HeadBucket", &e);
            if !error.is_not_found() {
                return Err(error);
            }
            false
        }
    };
    if !exists {
        let mut create = s3.create_bucket().bucket(&bucket);
        // us-east-1 is the one region that refuses its own name as a location constraint.
        if region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => tracing::info!(%bucket, "archive bucket created"),
            Err(e) if code(&e) == Some("BucketAlreadyOwnedByYou") => {}
            Err(e) => return Err(classify("s3:CreateBucket", &e)),
        }
    }
    s3.put_public_access_block()
        .bucket(&bucket)
        .public_access_block_configuration(
            PublicAccessBlockConfiguration::builder()
                .block_public_acls(true)
                .ignore_public_acls(true)
                .block_public_policy(true)
                .restrict_public_buckets(true)
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("s3:PutPublicAccessBlock", &e))?;
    let rule = LifecycleRule::builder()
        .id("archive-retention")
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().prefix("").build())
        .expiration(LifecycleExpiration::builder().days(90).build())
        // Parts of a streamed upload whose uploader died (kill -9) before it could abort.
        .abort_incomplete_multipart_upload(
            AbortIncompleteMultipartUpload::builder()
                .days_after_initiation(1)
                .build(),
        )
        .build()
        .map_err(|e| invalid("s3:PutBucketLifecycleConfiguration", e))?;
    s3.put_bucket_lifecycle_configuration()
        .bucket(&bucket)
        .lifecycle_configuration(
            BucketLifecycleConfiguration::builder()
                .rules(rule)
                .build()
                .map_err(|e| invalid("s3:PutBucketLifecycleConfiguration", e))?,
        )
        .send()
        .await
        .map_err(|e| classify("s3:PutBucketLifecycleConfiguration", &e))?;
    let tags = names
        .tags(&bucket)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("s3:PutBucketTagging", e))?;
    s3.put_bucket_tagging()
        .bucket(&bucket)
        .tagging(
            Tagging::builder()
                .set_tag_set(Some(tags))
                .build()
                .map_err(|e| invalid("s3:PutBucketTagging", e))?,
        )
        .send()
        .await
        .map_err(|e| classify("s3:PutBucketTagging", &e))?;
    Ok(bucket)
}
