//! A whole control plane in the test process, on the real emulators: environments in moto
//! accounts of their own (random ids, so tests sharing one moto never meet), their platforms
//! bootstrapped there, tenant databases in the real MariaDB, state in DynamoDB on moto, the
//! workflow engine, and the gRPC server on an ephemeral port.
#![allow(dead_code)]

pub mod compute;
pub mod sql;

use std::sync::Arc;
use std::time::Duration;

use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::cloud::accounts::Accounts;
use instance_manager::cloud::platform::ensure_platform;
use instance_manager::cloud::{CloudEnv, DbTls, MasterCredentials, Platform, Tags};
use instance_manager::config::{Config, EnvironmentConfig, Secret};
use instance_manager::domain::OperationId;
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::{Environment, TenantId};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::google_longrunning::operations_client::OperationsClient;
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::store::{DynamoStore, StateStore};
use instance_manager::workflow::engine::CloudResolver;
use instance_manager::workflow::{Engine, EngineOptions, EngineSettings, EventBus, StepHook};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::common;

pub const DOMAIN: &str = "sites.test";

pub fn random_account() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let n = u64::from_str_radix(&hex[..12], 16).unwrap();
    format!("{:012}", 100_000_000_000 + n % 900_000_000_000)
}

/// Tenant ids of tests start with this; `make dev` and real tenants must not use it. Their
/// MySQL databases and users are `tenant_imt_…` and `t_imt_…`.
pub const TEST_TENANT_PREFIX: &str = "imt-";

/// A tenant id no other test uses, `imt-{prefix}-{8 hex}`. Its MySQL database and user (in
/// every environment) are dropped when the test's thread ends, whether the test passed or
/// failed.
pub fn tenant(prefix: &str) -> String {
    let tenant = format!(
        "{TEST_TENANT_PREFIX}{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    CREATED_TENANTS.with(|created| created.borrow_mut().0.push(tenant.clone()));
    tenant
}

/// The tenants a test thread made; dropping it (at the thread's end) drops their databases.
struct CreatedTenants(Vec<String>);

impl Drop for CreatedTenants {
    fn drop(&mut self) {
        let tenants = std::mem::take(&mut self.0);
        if tenants.is_empty() {
            return;
        }
        // Thread-local destructors run while the thread ends: work on a thread of our own.
        common::run_on_own_thread(move || async move { drop_tenant_databases(&tenants).await });
    }
}

thread_local! {
    static CREATED_TENANTS: std::cell::RefCell<CreatedTenants> =
        const { std::cell::RefCell::new(CreatedTenants(Vec::new())) };
}

/// Drops the MySQL database and user of each tenant in every environment, if present.
pub async fn drop_tenant_databases(tenants: &[String]) {
    use instance_manager::cloud::Database;
    let master = mariadb();
    let mysql = instance_manager::cloud::mysql::MySqlDatabase::new();
    for tenant in tenants {
        let Ok(id) = TenantId::parse(tenant) else {
            continue;
        };
        for environment in [Environment::Dev, Environment::Sit, Environment::Prod] {
            let names = ResourceNames::derive(&id, environment);
            if let Err(error) = mysql
                .drop_database(&master, &names.database, &names.database_user)
                .await
            {
                eprintln!("cleanup of {}: {error}", names.database);
            }
            // A restore's databases (`{db}_r…`), and any scratch copy a test left.
            for database in sql::databases_like(&format!("{}_", names.database)).await {
                if let Err(error) = mysql.drop_schema(&master, &database).await {
                    eprintln!("cleanup of {database}: {error}");
                }
            }
        }
    }
}

pub fn mariadb() -> MasterCredentials {
    let opts = mysql_async::Opts::from_url(&common::mysql_url()).unwrap();
    MasterCredentials {
        host: opts.ip_or_hostname().to_owned(),
        port: opts.tcp_port(),
        username: opts.user().unwrap_or("root").to_owned(),
        password: Secret::new(opts.pass().unwrap_or_default()),
        tls: DbTls::Disabled,
        ca_file: None,
    }
}

/// A configuration with `environments`, each in a fresh moto account with its platform
/// bootstrapped, and a fresh table.
pub async fn config_with_platforms(environments: &[Environment]) -> Config {
    let endpoint = common::aws_endpoint();
    let mut config = Config {
        aws_endpoint: Some(endpoint.clone()),
        table: common::unique_name("wf"),
        replica_id: format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]),
        lease_secs: 15,
        poll_interval_ms: 50,
        environments: environments
            .iter()
            .map(|&name| {
                let account = random_account();
                EnvironmentConfig {
                    name,
                    account_id: account.clone(),
                    region: common::TEST_REGION.to_owned(),
                    role_arn: format!("arn:aws:iam::{account}:role/instance-manager"),
                    external_id: Secret::default(),
                    endpoint: None,
                    platform: Platform::default(),
                    scale_bounds: None,
                }
            })
            .collect(),
        ..Config::default()
    };
    let accounts = Accounts::with_control_plane(&common::test_sdk_config().await, &config).await;
    for env in &mut config.environments {
        let sdk = accounts.sdk_config(env.name).unwrap();
        env.platform = ensure_platform(
            &sdk,
            env.name,
            &mariadb(),
            &format!("{}.{DOMAIN}", env.name.short()),
        )
        .await
        .expect("bootstrap platform");
    }
    config.validate().unwrap();
    let store = DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&common::test_sdk_config().await),
        config.table.clone(),
    );
    store.ensure_table().await.expect("create table");
    config
}

pub struct ControlPlane {
    pub config: Config,
    pub accounts: Arc<Accounts>,
    pub store: Arc<dyn StateStore>,
    pub engine: Arc<Engine>,
    pub client: Client,
    pub shutdown: CancellationToken,
}

/// gRPC clients of one server, with helpers; cheap to clone for concurrent use.
#[derive(Clone)]
pub struct Client {
    pub instances: InstanceServiceClient<Channel>,
    pub operations: OperationsClient<Channel>,
}

impl std::ops::Deref for ControlPlane {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for ControlPlane {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl Client {
    pub async fn connect(addr: &str) -> Self {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Client {
            instances: InstanceServiceClient::new(channel.clone()),
            operations: OperationsClient::new(channel),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn fast_settings(config: &Config) -> EngineSettings {
    let mut settings = EngineSettings::from_config(config);
    settings.backoff_base = Duration::from_millis(20);
    settings.backoff_cap = Duration::from_millis(200);
    settings.converge_interval = Duration::from_millis(100);
    settings.max_attempts = 3;
    settings
}

/// Changes the adapters a workflow gets (e.g. wraps one to inject realistic AWS states).
pub type CloudWrapper = Arc<dyn Fn(CloudEnv) -> CloudEnv + Send + Sync>;

/// Resolves environments like `Accounts`, then applies a [`CloudWrapper`].
struct WrappingResolver {
    accounts: Arc<Accounts>,
    wrap: CloudWrapper,
}

#[async_trait::async_trait]
impl CloudResolver for WrappingResolver {
    async fn resolve(
        &self,
        environment: Environment,
        operation: &OperationId,
    ) -> instance_manager::cloud::CloudResult<CloudEnv> {
        let cloud = self.accounts.resolve(environment, operation).await?;
        Ok((self.wrap)(cloud))
    }
}

/// Starts the control plane for `config` in this process, with an optional step hook.
pub async fn start(config: Config, hook: Option<Arc<dyn StepHook>>) -> ControlPlane {
    start_with(
        config,
        EngineOptions {
            hook,
            ..EngineOptions::default()
        },
        |store| store,
        None,
    )
    .await
}

/// Like [`start`], with engine options (hook, clock), a wrapper around the state store the
/// engine and the API use (to inject store failures), and the workflows' adapters passed
/// through `wrap_cloud` (to inject realistic AWS states).
pub async fn start_with(
    config: Config,
    options: EngineOptions,
    wrap_store: impl FnOnce(Arc<dyn StateStore>) -> Arc<dyn StateStore>,
    wrap_cloud: Option<CloudWrapper>,
) -> ControlPlane {
    // IM_TEST_LOG=debug shows the control plane's logs while debugging a test.
    if let Ok(filter) = std::env::var("IM_TEST_LOG") {
        instance_manager::telemetry::init(instance_manager::config::LogFormat::Human, &filter);
    }
    let sdk = common::test_sdk_config().await;
    let accounts = Arc::new(Accounts::with_control_plane(&sdk, &config).await);
    for (environment, outcome) in accounts.verify().await {
        outcome.unwrap_or_else(|e| panic!("{environment}: {e}"));
    }
    let store: Arc<dyn StateStore> = wrap_store(Arc::new(DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        config.table.clone(),
    )));
    let bus = EventBus::new();
    let settings = fast_settings(&config);
    // The API's reads of the cloud (CheckInstanceHealth) see the same adapters.
    let clouds: Arc<dyn instance_manager::health::CloudEnvs> = match &wrap_cloud {
        Some(wrap) => Arc::new(instance_manager::health::WrappedCloudEnvs {
            inner: accounts.clone(),
            wrap: wrap.clone(),
        }),
        None => accounts.clone(),
    };
    let resolver: Arc<dyn CloudResolver> = match wrap_cloud {
        Some(wrap) => Arc::new(WrappingResolver {
            accounts: accounts.clone(),
            wrap,
        }),
        None => accounts.clone(),
    };
    let engine = Engine::with_options(store.clone(), resolver, settings, bus.clone(), options);
    let shutdown = CancellationToken::new();
    let api = Api::new(
        store.clone(),
        ApiSettings {
            scale_bounds: config.scale_bounds,
            idempotency_ttl_secs: 3600,
            default_page_size: 50,
            max_page_size: 1000,
            environment_scale_bounds: config
                .environments
                .iter()
                .filter_map(|env| env.scale_bounds.map(|bounds| (env.name, bounds)))
                .collect(),
            environment_domains: config
                .environments
                .iter()
                .map(|env| (env.name, env.platform.domain_rules()))
                .collect(),
            rollout_timeout: std::time::Duration::from_secs(config.rollout_timeout_secs),
            health: instance_manager::health::HealthSettings::from_config(&config),
            logs: instance_manager::logs::LogSettings::from_config(&config),
            ..ApiSettings::default()
        },
        PageTokens::new(b"test"),
    )
    .with_engine(bus, engine.waker())
    .with_shutdown(shutdown.clone())
    .with_clouds(clouds)
    .with_environments(accounts.served());
    tokio::spawn(engine.clone().run(shutdown.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(instance_manager::server::serve(
        api,
        listener,
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    ControlPlane {
        config,
        accounts,
        store,
        engine,
        client: Client::connect(&addr.to_string()).await,
        shutdown,
    }
}

/// CreateInstance of `tenants/{tenant}/instances/{instance}` in `environment`.
pub fn create_request(
    tenant: &str,
    instance: &str,
    environment: v1::Environment,
) -> v1::CreateInstanceRequest {
    v1::CreateInstanceRequest {
        parent: format!("tenants/{tenant}"),
        instance_id: instance.into(),
        instance: Some(v1::Instance {
            environment: environment.into(),
            organization_name: format!("{tenant} Ltd"),
            contact_email: "ops@example.com".into(),
            cost_center: "cc-42".into(),
            opportunity_id: "opp-7".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

/// Creates the state table `table` in the emulator.
pub async fn create_table(table: &str) {
    DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&common::test_sdk_config().await),
        table.to_owned(),
    )
    .ensure_table()
    .await
    .expect("create table");
}

pub fn metadata(operation: &lro::Operation) -> v1::OperationMetadata {
    v1::OperationMetadata::decode(operation.metadata.as_ref().unwrap().value.as_slice()).unwrap()
}

impl Client {
    pub async fn create(&mut self, tenant: &str, environment: v1::Environment) -> lro::Operation {
        self.instances
            .create_instance(create_request(tenant, "wp", environment))
            .await
            .unwrap()
            .into_inner()
    }

    /// Every event of the operation, in order, through WatchOperation (ends at the terminal
    /// event), and the final state of the operation.
    pub async fn watch(&mut self, operation: &str) -> (Vec<v1::OperationEvent>, lro::Operation) {
        self.watch_from(operation, 0).await
    }

    /// Watches `operation` to its end and asserts that it COMPLETED; its final state.
    pub async fn completed(&mut self, operation: &str) -> lro::Operation {
        let (events, done) = self.watch(operation).await;
        assert_eq!(
            metadata(&done).status(),
            v1::OperationStatus::Completed,
            "{events:#?}"
        );
        done
    }

    /// Returns once `operation` reported `step` as `status` (at most 120 s).
    pub async fn wait_for_step(&mut self, operation: &str, step: &str, status: v1::StepStatus) {
        let mut stream = self
            .instances
            .watch_operation(v1::WatchOperationRequest {
                name: operation.into(),
                from_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let reached = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(event) = stream.message().await.unwrap() {
                if event.step == step && event.step_status() == status {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(
            reached,
            Ok(true),
            "{operation}: {step} never became {status:?}"
        );
    }

    /// Deletes the tenant's instance `wp` without the archive; the operation's name.
    pub async fn delete_skipping_archive(&mut self, tenant: &str) -> String {
        self.instances
            .delete_instance(v1::DeleteInstanceRequest {
                name: format!("tenants/{tenant}/instances/wp"),
                skip_archive: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .name
    }

    /// Like `watch`, from event `from_sequence` on.
    pub async fn watch_from(
        &mut self,
        operation: &str,
        from_sequence: i64,
    ) -> (Vec<v1::OperationEvent>, lro::Operation) {
        let mut stream = self
            .instances
            .watch_operation(v1::WatchOperationRequest {
                name: operation.into(),
                from_sequence,
            })
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        let watched = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(event) = stream.message().await.unwrap() {
                events.push(event);
            }
        })
        .await;
        assert!(
            watched.is_ok(),
            "operation {operation} did not finish: {events:#?}"
        );
        let done = self
            .operations
            .get_operation(lro::GetOperationRequest {
                name: operation.into(),
            })
            .await
            .unwrap()
            .into_inner();
        (events, done)
    }

    /// Deletes the tenant's instance `wp` (with the archive); the operation's name.
    pub async fn delete(&mut self, tenant: &str) -> String {
        self.instances
            .delete_instance(v1::DeleteInstanceRequest {
                name: format!("tenants/{tenant}/instances/wp"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .name
    }

    pub async fn instance(&mut self, tenant: &str) -> v1::Instance {
        self.instance_named(tenant, "wp").await
    }

    pub async fn instance_named(&mut self, tenant: &str, instance: &str) -> v1::Instance {
        self.instances
            .get_instance(v1::GetInstanceRequest {
                name: format!("tenants/{tenant}/instances/{instance}"),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Creates `tenants/{tenant}/instances/{instance}` in `environment`.
    pub async fn create_named(
        &mut self,
        tenant: &str,
        instance: &str,
        environment: v1::Environment,
    ) -> lro::Operation {
        self.instances
            .create_instance(create_request(tenant, instance, environment))
            .await
            .unwrap()
            .into_inner()
    }

    /// Deletes `tenants/{tenant}/instances/{instance}` (with the archive).
    pub async fn delete_named(&mut self, tenant: &str, instance: &str) -> lro::Operation {
        self.instances
            .delete_instance(v1::DeleteInstanceRequest {
                name: format!("tenants/{tenant}/instances/{instance}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }
}

impl ControlPlane {
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub async fn cloud(&self, environment: Environment) -> CloudEnv {
        self.accounts.env(environment).await.unwrap()
    }

    pub fn sdk(&self, environment: Environment) -> aws_config::SdkConfig {
        self.accounts.sdk_config(environment).unwrap()
    }
}

/// The tags that mark every resource of `tenant` in `environment`.
pub fn tenant_tags(tenant: &str, environment: Environment) -> Tags {
    vec![
        ("bbws:tenant-id".into(), tenant.into()),
        ("bbws:environment".into(), environment.as_str().into()),
        ("bbws:managed-by".into(), "instance-manager".into()),
    ]
}

/// What exists of a tenant in its environment, one count per kind, each listed with the AWS
/// SDK (or SQL) directly — not with the product's own lookups, which are under test.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// ECS services that are not INACTIVE (DRAINING ones count: they still exist).
    pub services: usize,
    /// Task definitions, ACTIVE or INACTIVE (deregistered but not deleted).
    pub task_definitions: usize,
    pub access_points: usize,
    pub secrets: usize,
    pub target_groups: usize,
    pub listener_rules: usize,
    pub user_pools: usize,
    /// IAM roles (any path) carrying the tags.
    pub task_roles: usize,
    /// Databases and users of the tenant's names (they carry no tags).
    pub databases: usize,
    pub database_users: usize,
}

impl Inventory {
    pub fn is_empty(&self) -> bool {
        *self == Inventory::default()
    }
}

/// The SDK configuration of the account `cloud` lives in, by AssumeRole with the test
/// credentials (moto puts the role's resources in the role's account).
pub async fn account_sdk(cloud: &CloudEnv) -> aws_config::SdkConfig {
    common::assumed_role(&cloud.account_id, &cloud.region, "inventory").await
}

fn carries<'a>(have: impl IntoIterator<Item = (&'a str, &'a str)>, want: &Tags) -> bool {
    let have: Vec<(&str, &str)> = have.into_iter().collect();
    want.iter()
        .all(|(k, v)| have.contains(&(k.as_str(), v.as_str())))
}

/// Everything of `tenant` (any instance) in `cloud`'s environment.
/// Every listener of every load balancer in the account `elb` reaches, read with the SDK.
pub async fn account_listeners(elb: &aws_sdk_elasticloadbalancingv2::Client) -> Vec<String> {
    let balancers = elb.describe_load_balancers().send().await.unwrap();
    let mut listeners = Vec::new();
    for lb in balancers.load_balancers() {
        let described = elb
            .describe_listeners()
            .load_balancer_arn(lb.load_balancer_arn().unwrap())
            .send()
            .await
            .unwrap();
        listeners.extend(
            described
                .listeners()
                .iter()
                .filter_map(|l| l.listener_arn().map(str::to_owned)),
        );
    }
    listeners
}

pub async fn inventory(cloud: &CloudEnv, tenant: &str) -> Inventory {
    count(cloud, tenant, tenant_tags(tenant, cloud.environment)).await
}

/// Everything of one instance (`tenants/{tenant}/instances/{instance}`); databases are
/// counted by name (per tenant and environment), since they carry no tags.
pub async fn inventory_of(cloud: &CloudEnv, tenant: &str, instance: &str) -> Inventory {
    let mut tags = tenant_tags(tenant, cloud.environment);
    tags.push(("bbws:instance-id".into(), instance.into()));
    count(cloud, tenant, tags).await
}

async fn count(cloud: &CloudEnv, tenant: &str, tags: Tags) -> Inventory {
    let sdk = account_sdk(cloud).await;
    let platform = &cloud.platform;
    let mut inventory = Inventory::default();

    // ECS services and task definitions.
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let services = ecs
        .list_services()
        .cluster(&platform.cluster)
        .max_results(100)
        .send()
        .await
        .unwrap();
    for batch in services.service_arns().chunks(10) {
        let described = ecs
            .describe_services()
            .cluster(&platform.cluster)
            .set_services(Some(batch.to_vec()))
            .include(aws_sdk_ecs::types::ServiceField::Tags)
            .send()
            .await
            .unwrap();
        inventory.services += described
            .services()
            .iter()
            .filter(|s| s.status() != Some("INACTIVE"))
            .filter(|s| {
                carries(
                    s.tags().iter().filter_map(|t| Some((t.key()?, t.value()?))),
                    &tags,
                )
            })
            .count();
    }
    for status in [
        aws_sdk_ecs::types::TaskDefinitionStatus::Active,
        aws_sdk_ecs::types::TaskDefinitionStatus::Inactive,
    ] {
        let arns: Vec<String> = ecs
            .list_task_definitions()
            .status(status)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .unwrap();
        for arn in arns {
            let listed = match ecs.list_tags_for_resource().resource_arn(&arn).send().await {
                Ok(listed) => listed,
                // Deleted (another test's tenant) between the listing and this call.
                Err(error) if format!("{error:?}").contains("Unable to describe") => continue,
                Err(error) => panic!("{error:?}"),
            };
            if carries(
                listed
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?, t.value()?))),
                &tags,
            ) {
                inventory.task_definitions += 1;
            }
        }
    }

    // EFS access points on the environment's file system.
    let efs = aws_sdk_efs::Client::new(&sdk);
    let aps = efs
        .describe_access_points()
        .file_system_id(&platform.file_system_id)
        .send()
        .await
        .unwrap();
    inventory.access_points = aps
        .access_points()
        .iter()
        .filter(|ap| {
            !matches!(
                ap.life_cycle_state(),
                Some(
                    aws_sdk_efs::types::LifeCycleState::Deleting
                        | aws_sdk_efs::types::LifeCycleState::Deleted
                )
            )
        })
        .filter(|ap| carries(ap.tags().iter().map(|t| (t.key(), t.value())), &tags))
        .count();

    // Secrets (not scheduled for deletion).
    let sm = aws_sdk_secretsmanager::Client::new(&sdk);
    let secrets = sm.list_secrets().max_results(100).send().await.unwrap();
    inventory.secrets = secrets
        .secret_list()
        .iter()
        .filter(|s| s.deleted_date().is_none())
        .filter(|s| {
            carries(
                s.tags().iter().filter_map(|t| Some((t.key()?, t.value()?))),
                &tags,
            )
        })
        .count();

    // Target groups and listener rules.
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let groups = elb.describe_target_groups().send().await.unwrap();
    let group_arns: Vec<String> = groups
        .target_groups()
        .iter()
        .filter_map(|g| g.target_group_arn().map(str::to_owned))
        .collect();
    // Rules on every listener of every load balancer of the account (not only the ones the
    // platform configuration names).
    let mut rule_arns: Vec<String> = Vec::new();
    for listener in account_listeners(&elb).await {
        let rules = elb
            .describe_rules()
            .listener_arn(&listener)
            .send()
            .await
            .unwrap();
        rule_arns.extend(
            rules
                .rules()
                .iter()
                .filter(|r| r.is_default() != Some(true))
                .filter_map(|r| r.rule_arn().map(str::to_owned)),
        );
    }
    for (arns, counter) in [
        (group_arns, &mut inventory.target_groups),
        (rule_arns, &mut inventory.listener_rules),
    ] {
        for batch in arns.chunks(20) {
            let described = elb
                .describe_tags()
                .set_resource_arns(Some(batch.to_vec()))
                .send()
                .await
                .unwrap();
            *counter += described
                .tag_descriptions()
                .iter()
                .filter(|d| {
                    carries(
                        d.tags().iter().filter_map(|t| Some((t.key()?, t.value()?))),
                        &tags,
                    )
                })
                .count();
        }
    }

    // Cognito user pools.
    let cognito = aws_sdk_cognitoidentityprovider::Client::new(&sdk);
    let pools = cognito
        .list_user_pools()
        .max_results(60)
        .send()
        .await
        .unwrap();
    for pool in pools.user_pools() {
        let described = match cognito
            .describe_user_pool()
            .user_pool_id(pool.id().unwrap())
            .send()
            .await
        {
            Ok(described) => described,
            // Deleted (another test's tenant) between the listing and this call.
            Err(error) if format!("{error:?}").contains("ResourceNotFoundException") => {
                continue;
            }
            Err(error) => panic!("{error:?}"),
        };
        let pool_tags = described
            .user_pool()
            .and_then(|p| p.user_pool_tags())
            .cloned()
            .unwrap_or_default();
        if carries(
            pool_tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &tags,
        ) {
            inventory.user_pools += 1;
        }
    }

    // IAM roles, every one in the account (not only under the path the product uses).
    let iam = aws_sdk_iam::Client::new(&sdk);
    let roles: Vec<aws_sdk_iam::types::Role> = iam
        .list_roles()
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .unwrap();
    for role in roles {
        let listed = match iam
            .list_role_tags()
            .role_name(role.role_name())
            .send()
            .await
        {
            Ok(listed) => listed,
            // Deleted between the listing and this call.
            Err(error) if format!("{error:?}").contains("NoSuchEntity") => continue,
            Err(error) => panic!("{error:?}"),
        };
        if carries(listed.tags().iter().map(|t| (t.key(), t.value())), &tags) {
            inventory.task_roles += 1;
        }
    }

    // MySQL, by the tenant's names.
    let names = ResourceNames::derive(&TenantId::parse(tenant).unwrap(), cloud.environment);
    let mut conn =
        mysql_async::Conn::new(mysql_async::Opts::from_url(&common::mysql_url()).unwrap())
            .await
            .unwrap();
    use mysql_async::prelude::Queryable;
    let databases: Vec<String> = conn.query("SHOW DATABASES").await.unwrap();
    inventory.databases = databases.iter().filter(|d| **d == names.database).count();
    let users: Option<u64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM mysql.user WHERE User = ?",
            (names.database_user.clone(),),
        )
        .await
        .unwrap();
    inventory.database_users = users.unwrap_or(0) as usize;
    let _ = conn.disconnect().await;
    inventory
}

/// Exactly one of everything: what a provisioned instance owns.
pub fn provisioned(cognito: bool) -> Inventory {
    Inventory {
        services: 1,
        task_definitions: 1,
        access_points: 1,
        secrets: 1,
        target_groups: 1,
        listener_rules: 1,
        user_pools: usize::from(cognito),
        task_roles: 1,
        databases: 1,
        database_users: 1,
    }
}

/// Writes `config` for server processes with `lease_secs`, and no fixed replica id (each
/// process then names itself after its host and pid).
pub fn write_config(config: &Config, dir: &std::path::Path, lease_secs: u64) -> std::path::PathBuf {
    let mut config = config.clone();
    config.lease_secs = lease_secs;
    config.replica_id = String::new();
    let path = dir.join("instance-manager.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path
}

/// `instance-manager serve` with the configuration at `config_path` and the failpoints in
/// `failpoints` (empty for none), once it accepts connections; and its address.
pub fn serve_process(
    config_path: &std::path::Path,
    failpoints: &str,
) -> (common::ServerProcess, String) {
    let config = config_path.to_str().unwrap();
    let envs: &[(&str, &str)] = if failpoints.is_empty() {
        &[]
    } else {
        &[("IM_FAILPOINTS", failpoints)]
    };
    let mut server = common::ServerProcess::spawn(
        ["serve", "--config", config, "--listen", common::ANY_PORT],
        envs,
    );
    let addr = server.wait_serving();
    (server, addr.to_string())
}

/// Waits (without blocking the runtime) until `process` exits, at most `limit`.
pub async fn exited(
    process: &mut common::ServerProcess,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = process.try_wait() {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
