//! The AWS adapters against moto: each ensure creates the resource with the settings of
//! DESIGN.md §1 and the unified tags, a second ensure adopts it, deletes are idempotent, and
//! `find_tagged` tells tenants apart.
//!
//! Every test works in its own AWS account (AssumeRole into a random account id: moto keeps
//! each account's resources apart), so tests share one moto without seeing each other.

mod common;

use std::sync::{Arc, Mutex};

use aws_config::SdkConfig;
use aws_sdk_elasticloadbalancingv2::types::ActionTypeEnum;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use instance_manager::cloud::aws::{
    AwsCompute, AwsFiles, AwsIdentity, AwsObjects, AwsRouting, AwsSecrets, CONTAINER_NAME,
    WP_CONTENT_PATH,
};
use instance_manager::cloud::error::classify;
use instance_manager::cloud::{
    AccessPointSpec, Compute, ErrorKind, Files, HostRuleSpec, Identity, Objects, OneOffTaskSpec,
    Routing, RuleAction, SecretSpec, Secrets, ServiceSpec, Tags, TargetGroupSpec,
    TaskDefinitionSpec, UserPoolSpec,
};
use instance_manager::config::Secret;
use instance_manager::domain::naming::{ResourceNames, TagContext};
use instance_manager::domain::{Environment, TenantId};

const DOMAIN: &str = "sites.example.com";

/// SdkConfig for a fresh, empty AWS account in the shared moto.
async fn fresh_account() -> SdkConfig {
    common::fresh_account("cloud-aws-tests").await
}

struct Tenant {
    id: TenantId,
    names: ResourceNames,
}

impl Tenant {
    fn new(id: &str) -> Self {
        let id = TenantId::parse(id).unwrap();
        let names = ResourceNames::derive(&id, Environment::Dev);
        Self { id, names }
    }

    fn tags(&self, component: &str) -> Tags {
        TagContext {
            prefix: "bbws",
            tenant: &self.id,
            instance: "wp",
            environment: Environment::Dev,
            project: "wordpress",
            cost_center: "cc-42",
            opportunity: "opp-7",
            labels: &Default::default(),
        }
        .tags(component)
    }

    fn host(&self) -> String {
        ResourceNames::host(&self.id, DOMAIN)
    }
}

fn assert_unified_tags<'a>(have: impl IntoIterator<Item = (&'a str, &'a str)>, want: &Tags) {
    let have: Vec<(String, String)> = have
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for pair in want {
        assert!(have.contains(pair), "tag {pair:?} missing from {have:?}");
    }
    assert_eq!(want.len(), 8, "the unified tags are eight");
}

// ---------------------------------------------------------------------------------------
// Shared platform pieces, created directly with the SDK.

struct Network {
    vpc: String,
    subnets: Vec<String>,
    security_group: String,
}

async fn network(sdk: &SdkConfig) -> Network {
    use aws_sdk_ec2::types::AttributeBooleanValue;
    let ec2 = aws_sdk_ec2::Client::new(sdk);
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap()
        .vpc()
        .and_then(|v| v.vpc_id())
        .unwrap()
        .to_owned();
    // moto's RunTask needs DNS host names on the subnet's VPC (TESTING.md).
    ec2.modify_vpc_attribute()
        .vpc_id(&vpc)
        .enable_dns_hostnames(AttributeBooleanValue::builder().value(true).build())
        .send()
        .await
        .unwrap();
    let mut subnets = Vec::new();
    for (cidr, zone) in [("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b")] {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(cidr)
            .availability_zone(zone)
            .send()
            .await
            .unwrap();
        subnets.push(
            subnet
                .subnet()
                .and_then(|s| s.subnet_id())
                .unwrap()
                .to_owned(),
        );
    }
    let security_group = ec2
        .create_security_group()
        .group_name("tasks")
        .description("wordpress tasks")
        .vpc_id(&vpc)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned();
    Network {
        vpc,
        subnets,
        security_group,
    }
}

async fn file_system(sdk: &SdkConfig) -> String {
    aws_sdk_efs::Client::new(sdk)
        .create_file_system()
        .creation_token(common::unique_name("fs"))
        .send()
        .await
        .unwrap()
        .file_system_id()
        .to_owned()
}

/// An ALB with an HTTP listener whose default action forwards to a platform target group.
async fn listener(sdk: &SdkConfig, net: &Network) -> String {
    use aws_sdk_elasticloadbalancingv2::types::{
        Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum,
        TargetTypeEnum,
    };
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(sdk);
    let alb = elb
        .create_load_balancer()
        .name("platform")
        .set_subnets(Some(net.subnets.clone()))
        .security_groups(&net.security_group)
        .scheme(LoadBalancerSchemeEnum::Internal)
        .r#type(LoadBalancerTypeEnum::Application)
        .send()
        .await
        .unwrap();
    let alb_arn = alb.load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_owned();
    let fallback = elb
        .create_target_group()
        .name("platform-default")
        .protocol(ProtocolEnum::Http)
        .port(80)
        .vpc_id(&net.vpc)
        .target_type(TargetTypeEnum::Ip)
        .send()
        .await
        .unwrap();
    let fallback_arn = fallback.target_groups()[0].target_group_arn().unwrap();
    let created = elb
        .create_listener()
        .load_balancer_arn(alb_arn)
        .protocol(ProtocolEnum::Http)
        .port(80)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(fallback_arn)
                .build(),
        )
        .send()
        .await
        .unwrap();
    created.listeners()[0].listener_arn().unwrap().to_owned()
}

async fn cluster(sdk: &SdkConfig) -> String {
    let name = "platform".to_owned();
    aws_sdk_ecs::Client::new(sdk)
        .create_cluster()
        .cluster_name(&name)
        .send()
        .await
        .unwrap();
    name
}

/// Records the JSON bodies of the requests a client sends, by operation (awsJson protocols
/// name it in `x-amz-target`), to check settings an emulator does not echo back.
#[derive(Debug, Clone, Default)]
struct RequestRecorder(Arc<Mutex<Vec<(String, serde_json::Value)>>>);

impl RequestRecorder {
    fn sent(&self, operation: &str) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(target, _)| target.rsplit('.').next() == Some(operation))
            .map(|(_, body)| body.clone())
            .collect()
    }
}

impl Intercept for RequestRecorder {
    fn name(&self) -> &'static str {
        "request-recorder"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let target = request.headers().get("x-amz-target").unwrap_or_default();
        let body = request.body().bytes().unwrap_or_default();
        let json = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        self.0.lock().unwrap().push((target.to_owned(), json));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// EFS

fn access_point_spec(fs: &str, tenant: &Tenant) -> AccessPointSpec {
    AccessPointSpec {
        file_system_id: fs.to_owned(),
        client_token: tenant.names.access_point_token.clone(),
        root_path: tenant.names.access_point_root.clone(),
        uid: 33,
        gid: 33,
        permissions: "755".to_owned(),
        tags: tenant.tags("efs"),
    }
}

#[tokio::test]
async fn files_access_point_lifecycle() {
    let sdk = fresh_account().await;
    let efs = aws_sdk_efs::Client::new(&sdk);
    let files = AwsFiles::new(&sdk);
    let fs = file_system(&sdk).await;
    let (acme, globex) = (Tenant::new("acme"), Tenant::new("globex"));

    let id = files
        .ensure_access_point(&access_point_spec(&fs, &acme))
        .await
        .unwrap();
    let described = efs
        .describe_access_points()
        .access_point_id(&id)
        .send()
        .await
        .unwrap();
    let ap = &described.access_points()[0];
    let root = ap.root_directory().unwrap();
    assert_eq!(root.path(), Some("/tenant-acme"));
    let creation = root.creation_info().unwrap();
    assert_eq!(
        (
            creation.owner_uid(),
            creation.owner_gid(),
            creation.permissions()
        ),
        (33, 33, "755")
    );
    let user = ap.posix_user().unwrap();
    assert_eq!((user.uid(), user.gid()), (33, 33));
    assert_eq!(ap.file_system_id(), Some(fs.as_str()));
    assert_unified_tags(
        ap.tags().iter().map(|t| (t.key(), t.value())),
        &acme.tags("efs"),
    );

    // Again: adopted by client token. With another token: adopted by tags.
    assert_eq!(
        files
            .ensure_access_point(&access_point_spec(&fs, &acme))
            .await
            .unwrap(),
        id
    );
    let mut other_token = access_point_spec(&fs, &acme);
    other_token.client_token = "another-token".to_owned();
    assert_eq!(files.ensure_access_point(&other_token).await.unwrap(), id);
    let all = efs
        .describe_access_points()
        .file_system_id(&fs)
        .send()
        .await
        .unwrap();
    assert_eq!(all.access_points().len(), 1, "nothing new was created");

    let globex_id = files
        .ensure_access_point(&access_point_spec(&fs, &globex))
        .await
        .unwrap();
    assert_ne!(globex_id, id);
    assert_eq!(
        files.find_tagged(&fs, &acme.tags("efs")).await.unwrap(),
        vec![id.clone()]
    );
    assert_eq!(
        files.find_tagged(&fs, &globex.tags("efs")).await.unwrap(),
        vec![globex_id.clone()]
    );
    assert_eq!(
        files.access_point_state(&id).await.unwrap().as_deref(),
        Some("available")
    );

    files.delete_access_point(&id).await.unwrap();
    files.delete_access_point(&id).await.unwrap();
    assert_eq!(files.access_point_state(&id).await.unwrap(), None);
    assert!(
        files
            .find_tagged(&fs, &acme.tags("efs"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        files.find_tagged(&fs, &globex.tags("efs")).await.unwrap(),
        vec![globex_id]
    );

    let missing = efs
        .describe_access_points()
        .access_point_id(&id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        classify("efs:DescribeAccessPoints", &missing).kind,
        ErrorKind::NotFound
    );
}

// ---------------------------------------------------------------------------------------
// Secrets Manager

fn secret_spec(tenant: &Tenant, value: &str) -> SecretSpec {
    SecretSpec {
        name: tenant.names.secret.clone(),
        description: format!("database credentials of tenant {}", tenant.id),
        value: Secret::new(value),
        tags: tenant.tags("secret"),
    }
}

#[tokio::test]
async fn secrets_lifecycle() {
    let sdk = fresh_account().await;
    let sm = aws_sdk_secretsmanager::Client::new(&sdk);
    let secrets = AwsSecrets::new(&sdk);
    let (acme, globex) = (Tenant::new("acme"), Tenant::new("globex"));
    let first = r#"{"username":"t_acme_dev","password":"first"}"#;

    let (arn, value) = secrets
        .ensure_secret(&secret_spec(&acme, first))
        .await
        .unwrap();
    assert_eq!(value.expose(), first);
    let described = sm.describe_secret().secret_id(&arn).send().await.unwrap();
    assert_eq!(described.name(), Some("bbws/dev/tenants/acme/database"));
    assert_unified_tags(
        described
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?))),
        &acme.tags("secret"),
    );

    // A retry with a freshly generated password keeps the first one.
    let (again, kept) = secrets
        .ensure_secret(&secret_spec(&acme, r#"{"password":"second"}"#))
        .await
        .unwrap();
    assert_eq!(again, arn);
    assert_eq!(kept.expose(), first);
    assert_eq!(
        secrets
            .read_secret(&acme.names.secret)
            .await
            .unwrap()
            .expose(),
        first
    );
    let listed = sm.list_secrets().send().await.unwrap();
    assert_eq!(listed.secret_list().len(), 1, "nothing new was created");

    let (globex_arn, _) = secrets
        .ensure_secret(&secret_spec(&globex, "{}"))
        .await
        .unwrap();
    assert_eq!(
        secrets.find_tagged(&acme.tags("secret")).await.unwrap(),
        vec![arn.clone()]
    );
    assert_eq!(
        secrets.find_tagged(&globex.tags("secret")).await.unwrap(),
        vec![globex_arn]
    );

    secrets.delete_secret(&arn).await.unwrap();
    secrets.delete_secret(&arn).await.unwrap();
    assert!(
        secrets
            .find_tagged(&acme.tags("secret"))
            .await
            .unwrap()
            .is_empty()
    );
    let gone = secrets.read_secret(&arn).await.unwrap_err();
    assert_eq!(gone.kind, ErrorKind::NotFound);
    assert!(!gone.message.contains("first"), "no secret value in errors");
}

/// Two replicas running the same step at once end up with one resource, and both adopt it
/// (for the secret, with the value of whichever replica created it).
#[tokio::test]
async fn concurrent_ensures_converge_on_one_resource() {
    let sdk = fresh_account().await;
    let net = network(&sdk).await;
    let (secrets, routing) = (AwsSecrets::new(&sdk), AwsRouting::new(&sdk));
    let acme = Tenant::new("acme");
    let (one, two) = (secret_spec(&acme, "one"), secret_spec(&acme, "two"));
    let tg = target_group_spec(&acme, &net.vpc);

    let (a, b, c, d) = tokio::join!(
        secrets.ensure_secret(&one),
        secrets.ensure_secret(&two),
        routing.ensure_target_group(&tg),
        routing.ensure_target_group(&tg),
    );
    let ((arn_a, value_a), (arn_b, value_b)) = (a.unwrap(), b.unwrap());
    assert_eq!(arn_a, arn_b);
    assert_eq!(value_a, value_b, "both replicas use the stored password");
    let stored = secrets.read_secret(&arn_a).await.unwrap();
    assert_eq!(stored, value_a);
    assert_eq!(c.unwrap(), d.unwrap());
    assert_eq!(
        secrets
            .find_tagged(&acme.tags("secret"))
            .await
            .unwrap()
            .len(),
        1
    );
    let groups = aws_sdk_elasticloadbalancingv2::Client::new(&sdk)
        .describe_target_groups()
        .send()
        .await
        .unwrap();
    assert_eq!(groups.target_groups().len(), 1);
}

// ---------------------------------------------------------------------------------------
// ELBv2

fn target_group_spec(tenant: &Tenant, vpc: &str) -> TargetGroupSpec {
    TargetGroupSpec {
        name: tenant.names.target_group.clone(),
        vpc_id: vpc.to_owned(),
        health_check_path: "/".to_owned(),
        matcher: "200,301,302".to_owned(),
        deregistration_delay_secs: Some(45),
        tags: tenant.tags("alb"),
    }
}

fn rule_spec(tenant: &Tenant, listener: &str, target_group: &str, priority: u32) -> HostRuleSpec {
    HostRuleSpec {
        listener_arn: listener.to_owned(),
        hosts: vec![tenant.host()],
        target_group_arn: target_group.to_owned(),
        priority,
        tags: tenant.tags("alb"),
    }
}

#[tokio::test]
async fn routing_target_groups_and_host_rules() {
    let sdk = fresh_account().await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let routing = AwsRouting::new(&sdk);
    let net = network(&sdk).await;
    let listener = listener(&sdk, &net).await;
    let (acme, globex) = (Tenant::new("acme"), Tenant::new("globex"));

    let tg = routing
        .ensure_target_group(&target_group_spec(&acme, &net.vpc))
        .await
        .unwrap();
    let described = elb
        .describe_target_groups()
        .target_group_arns(&tg)
        .send()
        .await
        .unwrap();
    let group = &described.target_groups()[0];
    assert_eq!(group.target_group_name(), Some("bbws-dev-acme"));
    assert_eq!(group.target_type().map(|t| t.as_str()), Some("ip"));
    assert_eq!(group.protocol().map(|p| p.as_str()), Some("HTTP"));
    assert_eq!(group.port(), Some(80));
    assert_eq!(group.health_check_path(), Some("/"));
    assert_eq!(
        group.matcher().and_then(|m| m.http_code()),
        Some("200,301,302")
    );
    let tags = elb.describe_tags().resource_arns(&tg).send().await.unwrap();
    assert_unified_tags(
        tags.tag_descriptions()[0]
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?))),
        &acme.tags("alb"),
    );
    let attributes = elb
        .describe_target_group_attributes()
        .target_group_arn(&tg)
        .send()
        .await
        .unwrap();
    assert!(
        attributes.attributes().iter().any(|a| {
            a.key() == Some("deregistration_delay.timeout_seconds") && a.value() == Some("45")
        }),
        "{attributes:?}"
    );
    assert_eq!(
        routing
            .ensure_target_group(&target_group_spec(&acme, &net.vpc))
            .await
            .unwrap(),
        tg
    );
    // Same name, another instance of the tenant: never adopted.
    let mut sibling = target_group_spec(&acme, &net.vpc);
    for (key, value) in &mut sibling.tags {
        if key == "bbws:instance-id" {
            *value = "wp-2".into();
        }
    }
    let refused = routing.ensure_target_group(&sibling).await.unwrap_err();
    assert!(refused.message.contains("another instance"), "{refused}");
    let all = elb.describe_target_groups().send().await.unwrap();
    assert_eq!(
        all.target_groups().len(),
        2,
        "the platform's and acme's, nothing new"
    );

    let rule = routing
        .ensure_host_rule(&rule_spec(&acme, &listener, &tg, 10))
        .await
        .unwrap();
    let rules = elb.describe_rules().rule_arns(&rule).send().await.unwrap();
    let described = &rules.rules()[0];
    assert_eq!(described.priority(), Some("10"));
    let condition = &described.conditions()[0];
    assert_eq!(condition.field(), Some("host-header"));
    assert_eq!(
        condition.host_header_config().unwrap().values(),
        ["acme.sites.example.com"]
    );
    assert_eq!(described.actions()[0].target_group_arn(), Some(tg.as_str()));
    // A retry (even one that picked another priority) adopts the rule.
    assert_eq!(
        routing
            .ensure_host_rule(&rule_spec(&acme, &listener, &tg, 11))
            .await
            .unwrap(),
        rule
    );
    assert_eq!(routing.rule_priorities(&listener).await.unwrap(), vec![10]);

    let globex_tg = routing
        .ensure_target_group(&target_group_spec(&globex, &net.vpc))
        .await
        .unwrap();
    let taken = routing
        .ensure_host_rule(&rule_spec(&globex, &listener, &globex_tg, 10))
        .await
        .unwrap_err();
    assert_eq!(taken.kind, ErrorKind::Conflict, "{taken}");
    let globex_rule = routing
        .ensure_host_rule(&rule_spec(&globex, &listener, &globex_tg, 12))
        .await
        .unwrap();
    let mut priorities = routing.rule_priorities(&listener).await.unwrap();
    priorities.sort();
    assert_eq!(priorities, vec![10, 12]);

    let mut found = routing
        .find_tagged(&listener, &acme.tags("alb"))
        .await
        .unwrap();
    found.sort();
    let mut expected = vec![tg.clone(), rule.clone()];
    expected.sort();
    assert_eq!(found, expected);
    let mut found = routing
        .find_tagged(&listener, &globex.tags("alb"))
        .await
        .unwrap();
    found.sort();
    let mut expected = vec![globex_tg, globex_rule];
    expected.sort();
    assert_eq!(found, expected);
    // Targets are registered by ECS, not by us: an empty list is a valid answer.
    assert!(routing.target_health(&tg).await.unwrap().is_empty());

    routing.delete_rule(&rule).await.unwrap();
    routing.delete_rule(&rule).await.unwrap();
    routing.delete_target_group(&tg).await.unwrap();
    routing.delete_target_group(&tg).await.unwrap();
    assert!(
        routing
            .find_tagged(&listener, &acme.tags("alb"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(routing.rule_priorities(&listener).await.unwrap(), vec![12]);
    assert_eq!(
        routing.target_health(&tg).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    let missing = elb
        .describe_target_groups()
        .names("bbws-dev-acme")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        classify("elbv2:DescribeTargetGroups", &missing).kind,
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn routing_rule_actions_switch_between_forward_and_fixed_response() {
    let sdk = fresh_account().await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let routing = AwsRouting::new(&sdk);
    let net = network(&sdk).await;
    let listener = listener(&sdk, &net).await;
    let acme = Tenant::new("acme");
    let tg = routing
        .ensure_target_group(&target_group_spec(&acme, &net.vpc))
        .await
        .unwrap();
    let rule = routing
        .ensure_host_rule(&rule_spec(&acme, &listener, &tg, 10))
        .await
        .unwrap();
    let forward = RuleAction::Forward {
        target_group_arn: tg.clone(),
    };
    assert_eq!(
        routing.rule_action(&rule).await.unwrap(),
        Some(forward.clone())
    );

    let page = RuleAction::FixedResponse {
        status_code: 503,
        content_type: "text/html".into(),
        body: "<h1>This site is suspended</h1>".into(),
    };
    routing.set_rule_action(&rule, &page).await.unwrap();
    let described = elb.describe_rules().rule_arns(&rule).send().await.unwrap();
    let described = &described.rules()[0];
    let [action] = described.actions() else {
        panic!("not one action: {described:?}");
    };
    assert_eq!(action.r#type(), Some(&ActionTypeEnum::FixedResponse));
    let config = action.fixed_response_config().unwrap();
    assert_eq!(
        (
            config.status_code(),
            config.content_type(),
            config.message_body()
        ),
        (
            Some("503"),
            Some("text/html"),
            Some("<h1>This site is suspended</h1>")
        )
    );
    // Only the action changed: the host condition, the priority and the tags stay.
    assert_eq!(described.priority(), Some("10"));
    assert_eq!(
        described.conditions()[0]
            .host_header_config()
            .unwrap()
            .values(),
        ["acme.sites.example.com"]
    );
    assert_eq!(
        routing
            .find_tagged(&listener, &acme.tags("alb"))
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        routing.rule_action(&rule).await.unwrap(),
        Some(page.clone())
    );

    // Outside ELBv2's constraints: refused before the call, the rule unchanged.
    let redirect_status = RuleAction::FixedResponse {
        status_code: 302,
        content_type: "text/plain".into(),
        body: String::new(),
    };
    let refused = routing
        .set_rule_action(&rule, &redirect_status)
        .await
        .unwrap_err();
    assert_eq!(refused.kind, ErrorKind::Fatal, "{refused}");
    assert_eq!(routing.rule_action(&rule).await.unwrap(), Some(page));

    routing.set_rule_action(&rule, &forward).await.unwrap();
    let described = elb.describe_rules().rule_arns(&rule).send().await.unwrap();
    assert_eq!(
        described.rules()[0].actions()[0].target_group_arn(),
        Some(tg.as_str())
    );
    assert_eq!(
        routing.rule_action(&rule).await.unwrap(),
        Some(forward.clone())
    );

    // A deleted rule has no action, and cannot be given one.
    routing.delete_rule(&rule).await.unwrap();
    assert_eq!(routing.rule_action(&rule).await.unwrap(), None);
    assert_eq!(
        routing
            .set_rule_action(&rule, &forward)
            .await
            .unwrap_err()
            .kind,
        ErrorKind::NotFound
    );
    routing.delete_target_group(&tg).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// ECS

fn task_definition_spec(
    tenant: &Tenant,
    fs: &str,
    access_point: &str,
    secret_arn: &str,
) -> TaskDefinitionSpec {
    TaskDefinitionSpec {
        family: tenant.names.stack.clone(),
        cpu: 512,
        memory_mib: 1024,
        image: "wordpress:6.5-apache".to_owned(),
        file_system_id: fs.to_owned(),
        access_point_id: access_point.to_owned(),
        secret_arn: secret_arn.to_owned(),
        db_host: "db.internal".to_owned(),
        db_name: tenant.names.database.clone(),
        log_group: "/bbws/dev/wordpress".to_owned(),
        log_region: "us-east-1".to_owned(),
        log_stream_prefix: tenant.names.log_stream_prefix.clone(),
        execution_role_arn: "arn:aws:iam::123456789012:role/exec".to_owned(),
        task_role_arn: String::new(),
        db_tls: false,
        tags: tenant.tags("ecs"),
    }
}

async fn active_revisions(ecs: &aws_sdk_ecs::Client, family: &str) -> Vec<String> {
    ecs.list_task_definitions()
        .family_prefix(family)
        .status(aws_sdk_ecs::types::TaskDefinitionStatus::Active)
        .send()
        .await
        .unwrap()
        .task_definition_arns()
        .to_vec()
}

#[tokio::test]
async fn compute_task_definitions() {
    let sdk = fresh_account().await;
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let compute = AwsCompute::new(&sdk);
    let acme = Tenant::new("acme");
    let secret = "arn:aws:secretsmanager:us-east-1:123456789012:secret:bbws/dev/tenants/acme/database-AbCdEf";
    let spec = task_definition_spec(
        &acme,
        "fs-0123456789abcdef0",
        "fsap-0123456789abcdef0",
        secret,
    );

    let arn = compute.register_task_definition(&spec).await.unwrap();
    let described = ecs
        .describe_task_definition()
        .task_definition(&arn)
        .include(aws_sdk_ecs::types::TaskDefinitionField::Tags)
        .send()
        .await
        .unwrap();
    let definition = described.task_definition().unwrap();
    assert_eq!(definition.family(), Some("bbws-dev-acme"));
    assert_eq!(
        definition.network_mode().map(|m| m.as_str()),
        Some("awsvpc")
    );
    assert_eq!(definition.requires_compatibilities()[0].as_str(), "FARGATE");
    assert_eq!(
        (definition.cpu(), definition.memory()),
        (Some("512"), Some("1024"))
    );
    assert_eq!(
        definition.execution_role_arn(),
        Some("arn:aws:iam::123456789012:role/exec")
    );
    assert_eq!(
        definition.task_role_arn(),
        None,
        "an empty role is left out"
    );
    let container = &definition.container_definitions()[0];
    assert_eq!(container.name(), Some(CONTAINER_NAME));
    assert_eq!(container.image(), Some("wordpress:6.5-apache"));
    assert_eq!(container.essential(), Some(true));
    assert_eq!(container.memory(), Some(1024));
    let port = &container.port_mappings()[0];
    assert_eq!(
        (port.container_port(), port.protocol().map(|p| p.as_str())),
        (Some(80), Some("tcp"))
    );
    let env: Vec<(&str, &str)> = container
        .environment()
        .iter()
        .filter_map(|kv| Some((kv.name()?, kv.value()?)))
        .collect();
    assert!(env.contains(&("WORDPRESS_DB_HOST", "db.internal")));
    assert!(env.contains(&("WORDPRESS_DB_NAME", "tenant_acme_dev_db")));
    let secrets: Vec<(&str, &str)> = container
        .secrets()
        .iter()
        .map(|s| (s.name(), s.value_from()))
        .collect();
    assert_eq!(
        secrets,
        [
            ("WORDPRESS_DB_USER", format!("{secret}:username::").as_str()),
            (
                "WORDPRESS_DB_PASSWORD",
                format!("{secret}:password::").as_str()
            ),
        ]
    );
    let mount = &container.mount_points()[0];
    assert_eq!(
        (mount.source_volume(), mount.container_path()),
        (Some("wp-content"), Some(WP_CONTENT_PATH))
    );
    let health = container.health_check().unwrap();
    assert_eq!(
        health.command(),
        ["CMD-SHELL", "curl -f http://localhost/ || exit 1"]
    );
    let logs = container.log_configuration().unwrap();
    assert_eq!(logs.log_driver().as_str(), "awslogs");
    let options = logs.options().unwrap();
    assert_eq!(
        options.get("awslogs-group").map(String::as_str),
        Some("/bbws/dev/wordpress")
    );
    assert_eq!(
        options.get("awslogs-region").map(String::as_str),
        Some("us-east-1")
    );
    assert_eq!(
        options.get("awslogs-stream-prefix").map(String::as_str),
        Some("acme")
    );
    let volume = &definition.volumes()[0];
    assert_eq!(volume.name(), Some("wp-content"));
    let efs = volume.efs_volume_configuration().unwrap();
    assert_eq!(efs.file_system_id(), "fs-0123456789abcdef0");
    assert_eq!(
        efs.transit_encryption().map(|t| t.as_str()),
        Some("ENABLED")
    );
    let auth = efs.authorization_config().unwrap();
    assert_eq!(auth.access_point_id(), Some("fsap-0123456789abcdef0"));
    assert_eq!(auth.iam().map(|i| i.as_str()), Some("ENABLED"));
    assert_unified_tags(
        described
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?))),
        &acme.tags("ecs"),
    );

    // Identical request: the same revision. A new image: a new revision.
    assert_eq!(compute.register_task_definition(&spec).await.unwrap(), arn);
    assert_eq!(
        active_revisions(&ecs, "bbws-dev-acme").await,
        vec![arn.clone()]
    );
    let mut newer = spec.clone();
    newer.image = "wordpress:6.6-apache".to_owned();
    let newer_arn = compute.register_task_definition(&newer).await.unwrap();
    assert!(newer_arn.ends_with(":2"), "{newer_arn}");
    assert_eq!(
        compute.register_task_definition(&newer).await.unwrap(),
        newer_arn
    );

    compute
        .deregister_task_definitions("bbws-dev-acme")
        .await
        .unwrap();
    assert!(active_revisions(&ecs, "bbws-dev-acme").await.is_empty());
    compute
        .deregister_task_definitions("bbws-dev-acme")
        .await
        .unwrap();

    // Deleting is by owner: this instance's revisions, deregistered or not, go for good
    // (no INACTIVE revision stays tagged); a sibling instance's revision stays.
    let mut sibling = newer.clone();
    sibling.image = "wordpress:6.7-apache".to_owned();
    for (key, value) in &mut sibling.tags {
        if key == "bbws:instance-id" {
            *value = "wp-2".to_owned();
        }
    }
    let sibling_arn = compute.register_task_definition(&sibling).await.unwrap();
    let mine = compute.register_task_definition(&spec).await.unwrap();
    let owner: Tags = acme
        .tags("ecs")
        .into_iter()
        .filter(|(key, _)| key == "bbws:tenant-id" || key == "bbws:instance-id")
        .collect();
    compute
        .delete_task_definitions("bbws-dev-acme", &owner)
        .await
        .unwrap();
    assert_eq!(
        active_revisions(&ecs, "bbws-dev-acme").await,
        vec![sibling_arn.clone()]
    );
    let inactive = ecs
        .list_task_definitions()
        .family_prefix("bbws-dev-acme")
        .status(aws_sdk_ecs::types::TaskDefinitionStatus::Inactive)
        .send()
        .await
        .unwrap();
    assert!(inactive.task_definition_arns().is_empty(), "{inactive:?}");
    assert!(
        !active_revisions(&ecs, "bbws-dev-acme")
            .await
            .contains(&mine)
    );
    compute
        .delete_task_definitions("bbws-dev-acme", &owner)
        .await
        .unwrap();
    let missing = ecs
        .describe_services()
        .cluster("no-such-cluster")
        .services("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        classify("ecs:DescribeServices", &missing).kind,
        ErrorKind::NotFound
    );
}

struct ServiceFixture {
    sdk: SdkConfig,
    net: Network,
    cluster: String,
    fs: String,
    target_group: String,
}

async fn service_fixture() -> ServiceFixture {
    let sdk = fresh_account().await;
    let net = network(&sdk).await;
    let cluster = cluster(&sdk).await;
    let fs = file_system(&sdk).await;
    let target_group = AwsRouting::new(&sdk)
        .ensure_target_group(&target_group_spec(&Tenant::new("acme"), &net.vpc))
        .await
        .unwrap();
    ServiceFixture {
        sdk,
        net,
        cluster,
        fs,
        target_group,
    }
}

fn service_spec(fixture: &ServiceFixture, tenant: &Tenant, task_definition: &str) -> ServiceSpec {
    ServiceSpec {
        cluster: fixture.cluster.clone(),
        name: tenant.names.stack.clone(),
        task_definition_arn: task_definition.to_owned(),
        desired_count: 2,
        subnets: fixture.net.subnets.clone(),
        security_groups: vec![fixture.net.security_group.clone()],
        target_group_arn: fixture.target_group.clone(),
        tags: tenant.tags("ecs"),
    }
}

#[tokio::test]
async fn compute_service_lifecycle() {
    let fixture = service_fixture().await;
    let ecs = aws_sdk_ecs::Client::new(&fixture.sdk);
    let requests = RequestRecorder::default();
    let compute = AwsCompute::from_client(aws_sdk_ecs::Client::from_conf(
        aws_sdk_ecs::config::Builder::from(&fixture.sdk)
            .interceptor(requests.clone())
            .build(),
    ));
    let (acme, globex) = (Tenant::new("acme"), Tenant::new("globex"));
    let secret = "arn:aws:secretsmanager:us-east-1:123456789012:secret:s-AbCdEf";
    let acme_td = compute
        .register_task_definition(&task_definition_spec(&acme, &fixture.fs, "fsap-1", secret))
        .await
        .unwrap();
    let globex_td = compute
        .register_task_definition(&task_definition_spec(
            &globex,
            &fixture.fs,
            "fsap-2",
            secret,
        ))
        .await
        .unwrap();

    let arn = compute
        .ensure_service(&service_spec(&fixture, &acme, &acme_td))
        .await
        .unwrap();
    let described = ecs
        .describe_services()
        .cluster(&fixture.cluster)
        .services(&arn)
        .include(aws_sdk_ecs::types::ServiceField::Tags)
        .send()
        .await
        .unwrap();
    let service = &described.services()[0];
    assert_eq!(service.service_name(), Some("bbws-dev-acme"));
    assert_eq!(service.launch_type().map(|l| l.as_str()), Some("FARGATE"));
    assert_eq!(service.desired_count(), 2);
    assert_eq!(service.task_definition(), Some(acme_td.as_str()));
    let vpc = service
        .network_configuration()
        .and_then(|n| n.awsvpc_configuration())
        .unwrap();
    assert_eq!(vpc.subnets(), fixture.net.subnets.as_slice());
    assert_eq!(vpc.security_groups(), [fixture.net.security_group.as_str()]);
    assert_eq!(vpc.assign_public_ip().map(|a| a.as_str()), Some("DISABLED"));
    let lb = &service.load_balancers()[0];
    assert_eq!(lb.target_group_arn(), Some(fixture.target_group.as_str()));
    assert_eq!(
        (lb.container_name(), lb.container_port()),
        (Some(CONTAINER_NAME), Some(80))
    );
    // moto neither stores nor returns deploymentConfiguration: check what was sent.
    let sent = requests.sent("CreateService");
    assert_eq!(sent.len(), 1);
    let deployment = &sent[0]["deploymentConfiguration"];
    assert_eq!(
        deployment["deploymentCircuitBreaker"],
        serde_json::json!({"enable": true, "rollback": true})
    );
    assert_eq!(deployment["minimumHealthyPercent"], 50);
    assert_eq!(deployment["maximumPercent"], 200);
    assert_eq!(sent[0]["enableECSManagedTags"], true);
    assert_eq!(sent[0]["propagateTags"], "SERVICE");
    assert!(
        sent[0]["clientToken"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    assert_eq!(
        service.propagate_tags().map(|p| p.as_str()),
        Some("SERVICE")
    );
    assert_unified_tags(
        service
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?))),
        &acme.tags("ecs"),
    );

    assert_eq!(
        compute
            .ensure_service(&service_spec(&fixture, &acme, &acme_td))
            .await
            .unwrap(),
        arn
    );
    let listed = ecs
        .list_services()
        .cluster(&fixture.cluster)
        .send()
        .await
        .unwrap();
    assert_eq!(
        listed.service_arns(),
        [arn.as_str()],
        "nothing new was created"
    );

    let status = compute
        .service_status(&fixture.cluster, "bbws-dev-acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status.status.as_str(), status.desired), ("ACTIVE", 2));
    assert_eq!(status.task_definition, acme_td);
    assert_eq!(status.deployments, 1);
    assert!(
        status.rollout_state.is_some(),
        "the primary deployment's rollout state"
    );
    compute
        .update_service(&fixture.cluster, "bbws-dev-acme", Some(3), None, true)
        .await
        .unwrap();
    let status = compute
        .service_status(&fixture.cluster, "bbws-dev-acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (status.desired, status.running),
        (3, 3),
        "moto runs what is desired at once"
    );

    let globex_service = compute
        .ensure_service(&service_spec(&fixture, &globex, &globex_td))
        .await
        .unwrap();
    let mut found = compute
        .find_tagged(&fixture.cluster, &acme.tags("ecs"))
        .await
        .unwrap();
    found.sort();
    let mut expected = vec![arn.clone(), acme_td.clone()];
    expected.sort();
    assert_eq!(found, expected);
    let mut found = compute
        .find_tagged(&fixture.cluster, &globex.tags("ecs"))
        .await
        .unwrap();
    found.sort();
    let mut expected = vec![globex_service, globex_td];
    expected.sort();
    assert_eq!(found, expected);

    compute
        .delete_service(&fixture.cluster, "bbws-dev-acme")
        .await
        .unwrap();
    compute
        .delete_service(&fixture.cluster, "bbws-dev-acme")
        .await
        .unwrap();
    compute
        .delete_service(&fixture.cluster, "never-existed")
        .await
        .unwrap();
    assert_eq!(
        compute
            .service_status(&fixture.cluster, "bbws-dev-acme")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        compute
            .find_tagged(&fixture.cluster, &acme.tags("ecs"))
            .await
            .unwrap(),
        vec![acme_td.clone()]
    );
    let missing = ecs
        .update_service()
        .cluster(&fixture.cluster)
        .service("never-existed")
        .desired_count(1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        classify("ecs:UpdateService", &missing).kind,
        ErrorKind::NotFound
    );

    // A deleted service's name can be used again.
    let recreated = compute
        .ensure_service(&service_spec(&fixture, &acme, &acme_td))
        .await
        .unwrap();
    let status = compute
        .service_status(&fixture.cluster, "bbws-dev-acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (recreated.as_str(), status.status.as_str()),
        (arn.as_str(), "ACTIVE")
    );
}

#[tokio::test]
async fn compute_one_off_task() {
    let fixture = service_fixture().await;
    let ecs = aws_sdk_ecs::Client::new(&fixture.sdk);
    let compute = AwsCompute::new(&fixture.sdk);
    let acme = Tenant::new("acme");
    let spec = OneOffTaskSpec {
        cluster: fixture.cluster.clone(),
        family: format!("{}-archiver", acme.names.stack),
        image: "amazon/aws-cli:2".to_owned(),
        command: vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "tar czf - . | aws s3 cp - s3://b/k".to_owned(),
        ],
        environment: vec![("TARGET".to_owned(), "s3://b/k".to_owned())],
        file_system_id: fixture.fs.clone(),
        access_point_id: "fsap-1".to_owned(),
        subnets: fixture.net.subnets.clone(),
        security_groups: vec![fixture.net.security_group.clone()],
        execution_role_arn: String::new(),
        task_role_arn: "arn:aws:iam::123456789012:role/archiver".to_owned(),
        client_token: "operation-1/1".to_owned(),
        tags: acme.tags("archive"),
    };

    let task = compute.run_task(&spec).await.unwrap();
    // A resumed step with the same token gets the same task, not a second one.
    assert_eq!(compute.run_task(&spec).await.unwrap(), task);
    let mut next_attempt = spec.clone();
    next_attempt.client_token = "operation-1/2".to_owned();
    assert_ne!(compute.run_task(&next_attempt).await.unwrap(), task);
    let status = compute
        .task_status(&fixture.cluster, &task)
        .await
        .unwrap()
        .unwrap();
    assert!(!status.last_status.is_empty());
    let described = ecs
        .describe_tasks()
        .cluster(&fixture.cluster)
        .tasks(&task)
        .send()
        .await
        .unwrap();
    let definition = described.tasks()[0]
        .task_definition_arn()
        .unwrap()
        .to_owned();
    let td = ecs
        .describe_task_definition()
        .task_definition(&definition)
        .send()
        .await
        .unwrap();
    let container = &td.task_definition().unwrap().container_definitions()[0];
    assert_eq!(container.command(), spec.command.as_slice());
    assert_eq!(
        container.mount_points()[0].container_path(),
        Some(WP_CONTENT_PATH)
    );
    let efs = td.task_definition().unwrap().volumes()[0]
        .efs_volume_configuration()
        .unwrap();
    let auth = efs.authorization_config().unwrap();
    assert_eq!(auth.access_point_id(), Some("fsap-1"));
    assert_eq!(auth.iam().map(|i| i.as_str()), Some("ENABLED"));

    // Without an access point, the task mounts the file system's root (the tenant
    // directory cleaner), still IAM-authorised and encrypted in transit.
    let mut root = spec.clone();
    root.family = format!("{}-cleaner", acme.names.stack);
    root.access_point_id = String::new();
    root.client_token = "operation-1/1/cleaner".to_owned();
    let cleaner = compute.run_task(&root).await.unwrap();
    let described = ecs
        .describe_tasks()
        .cluster(&fixture.cluster)
        .tasks(&cleaner)
        .send()
        .await
        .unwrap();
    let td = ecs
        .describe_task_definition()
        .task_definition(described.tasks()[0].task_definition_arn().unwrap())
        .send()
        .await
        .unwrap();
    let efs = td.task_definition().unwrap().volumes()[0]
        .efs_volume_configuration()
        .unwrap();
    assert_eq!(efs.root_directory(), Some("/"));
    assert_eq!(efs.authorization_config().unwrap().access_point_id(), None);
    assert_eq!(
        efs.transit_encryption().map(|t| t.as_str()),
        Some("ENABLED")
    );

    // A second run (another token) reuses the task definition.
    let mut another = spec.clone();
    another.client_token = "operation-2/1".to_owned();
    let second = compute.run_task(&another).await.unwrap();
    assert_ne!(second, task);
    assert_eq!(active_revisions(&ecs, &spec.family).await.len(), 1);

    let unknown = format!(
        "{}/00000000000000000000000000000000",
        task.rsplit_once('/').unwrap().0
    );
    assert_eq!(
        compute
            .task_status(&fixture.cluster, &unknown)
            .await
            .unwrap(),
        None
    );
}

// ---------------------------------------------------------------------------------------
// Cognito

fn user_pool_spec(tenant: &Tenant) -> UserPoolSpec {
    UserPoolSpec {
        name: tenant.names.user_pool.clone(),
        domain_prefix: format!(
            "{}-{}",
            tenant.names.cognito_domain,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        callback_url: format!("https://{}/wp-login.php", tenant.host()),
        tags: tenant.tags("cognito"),
    }
}

#[tokio::test]
async fn identity_user_pool_lifecycle() {
    let sdk = fresh_account().await;
    let cognito = aws_sdk_cognitoidentityprovider::Client::new(&sdk);
    let identity = AwsIdentity::new(&sdk);
    let (acme, globex) = (Tenant::new("acme"), Tenant::new("globex"));
    let spec = user_pool_spec(&acme);

    let pool = identity.ensure_user_pool(&spec).await.unwrap();
    assert_eq!(pool.domain, spec.domain_prefix);
    let described = cognito
        .describe_user_pool()
        .user_pool_id(&pool.pool_id)
        .send()
        .await
        .unwrap();
    let described = described.user_pool().unwrap();
    assert_eq!(described.name(), Some("bbws-dev-acme"));
    assert_eq!(described.domain(), Some(spec.domain_prefix.as_str()));
    assert_unified_tags(
        described
            .user_pool_tags()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
        &acme.tags("cognito"),
    );
    let client = cognito
        .describe_user_pool_client()
        .user_pool_id(&pool.pool_id)
        .client_id(&pool.client_id)
        .send()
        .await
        .unwrap();
    let client = client.user_pool_client().unwrap();
    assert_eq!(client.client_name(), Some("bbws-dev-acme-app"));
    assert_eq!(
        client.callback_urls(),
        ["https://acme.sites.example.com/wp-login.php"]
    );
    assert_eq!(client.allowed_o_auth_flows()[0].as_str(), "code");
    let groups = cognito
        .list_groups()
        .user_pool_id(&pool.pool_id)
        .send()
        .await
        .unwrap();
    let mut names: Vec<&str> = groups
        .groups()
        .iter()
        .filter_map(|g| g.group_name())
        .collect();
    names.sort();
    assert_eq!(names, ["Admin", "Editor", "Viewer"]);

    assert_eq!(identity.ensure_user_pool(&spec).await.unwrap(), pool);
    let pools = cognito
        .list_user_pools()
        .max_results(60)
        .send()
        .await
        .unwrap();
    assert_eq!(pools.user_pools().len(), 1, "nothing new was created");
    let clients = cognito
        .list_user_pool_clients()
        .user_pool_id(&pool.pool_id)
        .send()
        .await
        .unwrap();
    assert_eq!(clients.user_pool_clients().len(), 1);

    let globex_pool = identity
        .ensure_user_pool(&user_pool_spec(&globex))
        .await
        .unwrap();
    assert_eq!(
        identity.find_tagged(&acme.tags("cognito")).await.unwrap(),
        vec![pool.pool_id.clone()]
    );
    assert_eq!(
        identity.find_tagged(&globex.tags("cognito")).await.unwrap(),
        vec![globex_pool.pool_id.clone()]
    );

    identity.delete_user_pool(&pool.pool_id).await.unwrap();
    identity.delete_user_pool(&pool.pool_id).await.unwrap();
    assert!(
        identity
            .find_tagged(&acme.tags("cognito"))
            .await
            .unwrap()
            .is_empty()
    );
    let domain = cognito
        .describe_user_pool_domain()
        .domain(&spec.domain_prefix)
        .send()
        .await
        .unwrap();
    assert!(
        domain
            .domain_description()
            .and_then(|d| d.user_pool_id())
            .is_none(),
        "the domain went first"
    );
    let missing = cognito
        .describe_user_pool()
        .user_pool_id(&pool.pool_id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        classify("cognito-idp:DescribeUserPool", &missing).kind,
        ErrorKind::NotFound
    );
}

// ---------------------------------------------------------------------------------------
// S3

#[tokio::test]
async fn objects_put_with_tags_and_list() {
    let sdk = fresh_account().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let bucket = common::unique_name("archive");
    let objects = AwsObjects::new(&sdk);
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let acme = Tenant::new("acme");

    objects
        .put_object(
            &bucket,
            "acme/dev/db.sql.gz",
            b"dump".to_vec(),
            &acme.tags("archive"),
        )
        .await
        .unwrap();
    objects
        .put_object(&bucket, "acme/dev/wp-content.tar.gz", vec![1, 2], &vec![])
        .await
        .unwrap();
    objects
        .put_object(&bucket, "globex/dev/db.sql.gz", vec![], &vec![])
        .await
        .unwrap();

    let tagging = s3
        .get_object_tagging()
        .bucket(&bucket)
        .key("acme/dev/db.sql.gz")
        .send()
        .await
        .unwrap();
    assert_unified_tags(
        tagging.tag_set().iter().map(|t| (t.key(), t.value())),
        &acme.tags("archive"),
    );
    let mut keys = objects.list_objects(&bucket, "acme/").await.unwrap();
    keys.sort();
    assert_eq!(keys, ["acme/dev/db.sql.gz", "acme/dev/wp-content.tar.gz"]);
    assert!(
        objects
            .list_objects(&bucket, "initech/")
            .await
            .unwrap()
            .is_empty()
    );
    let missing = objects
        .list_objects("no-such-bucket-here", "")
        .await
        .unwrap_err();
    assert_eq!(missing.kind, ErrorKind::NotFound);
}

#[tokio::test]
async fn identity_pools_duplicated_by_a_race_collapse_to_one_and_a_sibling_s_is_left() {
    let sdk = fresh_account().await;
    let cognito = aws_sdk_cognitoidentityprovider::Client::new(&sdk);
    let identity = AwsIdentity::new(&sdk);
    let acme = Tenant::new("acme");
    let spec = user_pool_spec(&acme);
    let create = |tags: Tags| {
        let cognito = cognito.clone();
        let name = spec.name.clone();
        async move {
            cognito
                .create_user_pool()
                .pool_name(name)
                .set_user_pool_tags(Some(tags.into_iter().collect()))
                .send()
                .await
                .unwrap()
                .user_pool()
                .unwrap()
                .id()
                .unwrap()
                .to_owned()
        }
    };
    // Two replicas both created the pool; a sibling instance has one of the same name.
    let first = create(acme.tags("cognito")).await;
    let second = create(acme.tags("cognito")).await;
    let mut sibling_tags = acme.tags("cognito");
    for (key, value) in &mut sibling_tags {
        if key == "bbws:instance-id" {
            *value = "wp-2".to_owned();
        }
    }
    let sibling = create(sibling_tags).await;

    let pool = identity.ensure_user_pool(&spec).await.unwrap();
    assert!(pool.pool_id == first || pool.pool_id == second, "{pool:?}");
    let left: Vec<String> = cognito
        .list_user_pools()
        .max_results(60)
        .send()
        .await
        .unwrap()
        .user_pools()
        .iter()
        .filter_map(|p| p.id().map(str::to_owned))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.contains(&pool.pool_id) && left.contains(&sibling),
        "{left:?}"
    );
    assert_eq!(identity.ensure_user_pool(&spec).await.unwrap(), pool);
}

#[tokio::test]
async fn routing_target_health_details() {
    use aws_sdk_elasticloadbalancingv2::types::TargetDescription;
    let sdk = fresh_account().await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let routing = AwsRouting::new(&sdk);
    let net = network(&sdk).await;
    let acme = Tenant::new("acme");
    let tg = routing
        .ensure_target_group(&target_group_spec(&acme, &net.vpc))
        .await
        .unwrap();
    assert!(routing.target_health_details(&tg).await.unwrap().is_empty());
    let target = |ip: &str| TargetDescription::builder().id(ip).port(80).build();
    elb.register_targets()
        .target_group_arn(&tg)
        .targets(target("10.0.1.7"))
        .targets(target("10.0.2.7"))
        .send()
        .await
        .unwrap();
    let mut targets = routing.target_health_details(&tg).await.unwrap();
    targets.sort_by(|a, b| a.id.cmp(&b.id));
    let ids: Vec<(&str, Option<u16>)> = targets.iter().map(|t| (t.id.as_str(), t.port)).collect();
    assert_eq!(ids, [("10.0.1.7", Some(80)), ("10.0.2.7", Some(80))]);
    // moto reports registered IP targets healthy, with no reason.
    assert!(
        targets
            .iter()
            .all(|t| t.state == "healthy" && t.reason.is_none())
    );
    elb.deregister_targets()
        .target_group_arn(&tg)
        .targets(target("10.0.1.7"))
        .send()
        .await
        .unwrap();
    let left = routing.target_health_details(&tg).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].id, "10.0.2.7");
    routing.delete_target_group(&tg).await.unwrap();
    assert_eq!(
        routing.target_health_details(&tg).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn rds_db_instance_as_described() {
    use instance_manager::cloud::DbInstances;
    use instance_manager::cloud::aws::AwsDbInstances;
    let sdk = fresh_account().await;
    let rds = aws_sdk_rds::Client::new(&sdk);
    let adapter = AwsDbInstances::new(&sdk);
    assert_eq!(adapter.db_instance("bbws-dev").await.unwrap(), None);
    rds.create_db_instance()
        .db_instance_identifier("bbws-dev")
        .engine("mysql")
        .db_instance_class("db.t3.micro")
        .allocated_storage(20)
        .max_allocated_storage(100)
        .master_username("admin")
        .manage_master_user_password(true)
        .send()
        .await
        .unwrap();
    let described = adapter.db_instance("bbws-dev").await.unwrap().unwrap();
    assert_eq!(described.identifier, "bbws-dev");
    assert_eq!(described.status, "available");
    assert_eq!(described.engine, "mysql");
    assert_eq!(described.allocated_storage_gib, Some(20));
    assert_eq!(described.max_allocated_storage_gib, Some(100));
    assert!(described.pending_maintenance.is_empty(), "{described:?}");
}
