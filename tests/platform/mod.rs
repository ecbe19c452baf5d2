//! A whole control plane in the test process, on the real emulators: environments in moto
//! accounts of their own (random ids, so tests sharing one moto never meet), their platforms
//! bootstrapped there, tenant databases in the real MariaDB, state in DynamoDB on moto, the
//! workflow engine, and the gRPC server on an ephemeral port.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::cloud::accounts::Accounts;
use instance_manager::cloud::platform::ensure_platform;
use instance_manager::cloud::{CloudEnv, DbTls, MasterCredentials, Platform, Tags};
use instance_manager::config::{Config, EnvironmentConfig, Secret};
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::{Environment, TenantId};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::google_longrunning::operations_client::OperationsClient;
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::store::{DynamoStore, StateStore};
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
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for the cleanup");
            runtime.block_on(drop_tenant_databases(&tenants));
        })
        .join();
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

/// Starts the control plane for `config` in this process, with an optional step hook.
pub async fn start(config: Config, hook: Option<Arc<dyn StepHook>>) -> ControlPlane {
    start_with(
        config,
        EngineOptions {
            hook,
            ..EngineOptions::default()
        },
        |store| store,
    )
    .await
}

/// Like [`start`], with engine options (hook, clock) and a wrapper around the state store
/// the engine and the API use (to inject store failures).
pub async fn start_with(
    config: Config,
    options: EngineOptions,
    wrap_store: impl FnOnce(Arc<dyn StateStore>) -> Arc<dyn StateStore>,
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
    let engine = Engine::with_options(
        store.clone(),
        accounts.clone(),
        settings,
        bus.clone(),
        options,
    );
    let shutdown = CancellationToken::new();
    let api = Api::new(
        store.clone(),
        ApiSettings {
            scale_bounds: config.scale_bounds,
            idempotency_ttl_secs: 3600,
            default_page_size: 50,
            max_page_size: 1000,
            ..ApiSettings::default()
        },
        PageTokens::new(b"test"),
    )
    .with_engine(bus, engine.waker())
    .with_shutdown(shutdown.clone())
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

pub fn metadata(operation: &lro::Operation) -> v1::OperationMetadata {
    v1::OperationMetadata::decode(operation.metadata.as_ref().unwrap().value.as_slice()).unwrap()
}

impl Client {
    pub async fn create(&mut self, tenant: &str, environment: v1::Environment) -> lro::Operation {
        self.instances
            .create_instance(v1::CreateInstanceRequest {
                parent: format!("tenants/{tenant}"),
                instance_id: "wp".into(),
                instance: Some(v1::Instance {
                    environment: environment.into(),
                    organization_name: format!("{tenant} Ltd"),
                    contact_email: "ops@example.com".into(),
                    cost_center: "cc-42".into(),
                    opportunity_id: "opp-7".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Every event of the operation, in order, through WatchOperation (ends at the terminal
    /// event), and the final state of the operation.
    pub async fn watch(&mut self, operation: &str) -> (Vec<v1::OperationEvent>, lro::Operation) {
        self.watch_from(operation, 0).await
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
        self.instances
            .get_instance(v1::GetInstanceRequest {
                name: format!("tenants/{tenant}/instances/wp"),
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

/// What exists of a tenant, counted by tag and name in its environment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub access_points: usize,
    pub secrets: usize,
    pub routing: usize,
    pub compute: usize,
    pub user_pools: usize,
    pub database: bool,
    pub database_user: bool,
}

impl Inventory {
    pub fn is_empty(&self) -> bool {
        *self == Inventory::default()
    }
}

pub async fn inventory(cloud: &CloudEnv, tenant: &str) -> Inventory {
    let tags = tenant_tags(tenant, cloud.environment);
    let platform = &cloud.platform;
    let names = ResourceNames::derive(&TenantId::parse(tenant).unwrap(), cloud.environment);
    let master = mariadb();
    Inventory {
        access_points: cloud
            .files
            .find_tagged(&platform.file_system_id, &tags)
            .await
            .unwrap()
            .len(),
        secrets: cloud.secrets.find_tagged(&tags).await.unwrap().len(),
        routing: cloud
            .routing
            .find_tagged(&platform.listener_arn, &tags)
            .await
            .unwrap()
            .len(),
        compute: cloud
            .compute
            .find_tagged(&platform.cluster, &tags)
            .await
            .unwrap()
            .len(),
        user_pools: if platform.cognito_enabled {
            cloud.identity.find_tagged(&tags).await.unwrap().len()
        } else {
            0
        },
        database: cloud
            .database
            .database_exists(&master, &names.database)
            .await
            .unwrap(),
        database_user: cloud
            .database
            .user_exists(&master, &names.database_user)
            .await
            .unwrap(),
    }
}

/// One of everything: what a provisioned tenant owns.
pub fn provisioned(cognito: bool) -> Inventory {
    Inventory {
        access_points: 1,
        secrets: 1,
        // the target group and the listener rule
        routing: 2,
        // the service and its task definition
        compute: 2,
        user_pools: usize::from(cognito),
        database: true,
        database_user: true,
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
