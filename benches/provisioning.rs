//! `make bench`, part 2: provisioning throughput, beside its sequential floor.
//!
//! Boots the real engine and gRPC server in this process against moto (DynamoDB store, the
//! environment's emulated platform) and the local MariaDB, and runs `BENCH_PROVISIONS`
//! (default 50) concurrent CreateInstance calls (distinct tenants, one environment) until
//! every operation has ended, once per value of `BENCH_WORKERS` (default "10 50"), each
//! round in a fresh account, platform and table. Per round: create accepted → operation
//! ended (p50 / p99), total wall time, AWS calls and store writes per provisioning.
//!
//! Then `BENCH_WATCHED` (default 10) more, each with a WatchOperation stream on the same
//! server: the delay from the engine publishing an event to the watcher receiving it.
//!
//! The floor: a minimal driver with no engine issues the same adapter calls (the workflow's
//! own step functions, in plan order) one after another, `BENCH_FLOOR` (default 5) times.
//!
//! Nothing is counted with the product's help: AWS calls (the adapters' and the store's)
//! and MySQL round trips go through counting relays (benches/support/relay.rs); store
//! calls through a counting `StateStore` wrapper. Where time goes: time inside AWS calls,
//! MySQL round trips and store calls per provisioning, moto's busy time (it serves one
//! request at a time), and per operation the wait for a worker, the steps' critical path
//! and the rest (the engine between steps). It asserts nothing about time.
//!
//! Tenants are `imb-…` (their MySQL databases `tenant_imb_…`, users `t_imb_…`); every one
//! is dropped from MariaDB at the end, and any a killed run left at the start.

#[path = "support/relay.rs"]
mod relay;
#[path = "support/sdk.rs"]
mod sdk;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::cloud::accounts::Accounts;
use instance_manager::cloud::platform::ensure_platform;
use instance_manager::cloud::{Database, DbTls, MasterCredentials, Platform};
use instance_manager::config::{Config, EnvironmentConfig, Secret};
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::{
    AuditEvent, Backup, BackupName, Environment, Instance, InstanceName, InstanceSpec, Operation,
    OperationEvent, OperationId, OperationStatus, RequestId, Step, TenantId, Tier, Timestamp, Verb,
};
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::store::{
    AuditCursor, AuditQuery, BackupCursor, DomainClaim, DynamoStore, Guard, InstanceCursor,
    InstanceQuery, OperationCursor, OperationQuery, Page, PriorityClaim, RequestRecord, StateStore,
    StoreResult, Write,
};
use instance_manager::workflow::provision::Provision;
use instance_manager::workflow::{
    Engine, EngineOptions, EngineSettings, EventBus, StepCtx, StepError, Workflow,
};
use mysql_async::prelude::Queryable;
use relay::{Protocol, Relay, Snapshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const TENANT_PREFIX: &str = "imb-";
const DOMAIN: &str = "bench.test";
/// How long one round may take before the bench gives up waiting (and says so).
const ROUND_LIMIT: Duration = Duration::from_secs(30 * 60);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mysql_url() -> String {
    match std::env::var("IM_TEST_MYSQL_URL") {
        Ok(v) if !v.is_empty() => v,
        _ => "mysql://root@127.0.0.1:3306/test".to_owned(),
    }
}

/// The MariaDB master login, at `port` (the relay's, or MariaDB's own).
fn master(port: Option<u16>) -> MasterCredentials {
    let opts = mysql_async::Opts::from_url(&mysql_url()).expect("mysql url");
    MasterCredentials {
        host: opts.ip_or_hostname().to_owned(),
        port: port.unwrap_or(opts.tcp_port()),
        username: opts.user().unwrap_or("root").to_owned(),
        password: Secret::new(opts.pass().unwrap_or_default()),
        tls: DbTls::Disabled,
        ca_file: None,
    }
}

fn random_hex(n: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..n].to_owned()
}

fn random_account() -> String {
    let n = u64::from_str_radix(&random_hex(12), 16).unwrap();
    format!("{:012}", 100_000_000_000 + n % 900_000_000_000)
}

// ---------------------------------------------------------------------------------------
// A StateStore that counts and times every call.

#[derive(Debug, Clone, Default)]
struct StoreCounts {
    reads: u64,
    read_time: Duration,
    /// Atomic batches (`commit`) and audit records.
    commits: u64,
    /// Writes inside those batches (an audit record counts one).
    writes: u64,
    write_time: Duration,
}

impl StoreCounts {
    fn since(&self, earlier: &StoreCounts) -> StoreCounts {
        StoreCounts {
            reads: self.reads - earlier.reads,
            read_time: self.read_time - earlier.read_time,
            commits: self.commits - earlier.commits,
            writes: self.writes - earlier.writes,
            write_time: self.write_time - earlier.write_time,
        }
    }
}

struct CountingStore {
    inner: Arc<dyn StateStore>,
    counts: Mutex<StoreCounts>,
}

impl CountingStore {
    fn counts(&self) -> StoreCounts {
        self.counts.lock().expect("store counts").clone()
    }

    async fn read<T>(&self, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = call.await;
        let mut counts = self.counts.lock().expect("store counts");
        counts.reads += 1;
        counts.read_time += started.elapsed();
        out
    }

    async fn write<T>(&self, writes: usize, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = call.await;
        let mut counts = self.counts.lock().expect("store counts");
        counts.commits += 1;
        counts.writes += writes as u64;
        counts.write_time += started.elapsed();
        out
    }
}

#[async_trait]
impl StateStore for CountingStore {
    async fn ping(&self) -> StoreResult<()> {
        self.read(self.inner.ping()).await
    }
    async fn get_instance(&self, name: &InstanceName) -> StoreResult<Option<Instance>> {
        self.read(self.inner.get_instance(name)).await
    }
    async fn list_instances(
        &self,
        query: &InstanceQuery,
    ) -> StoreResult<Page<Instance, InstanceCursor>> {
        self.read(self.inner.list_instances(query)).await
    }
    async fn get_guard(
        &self,
        tenant: &TenantId,
        environment: Environment,
    ) -> StoreResult<Option<Guard>> {
        self.read(self.inner.get_guard(tenant, environment)).await
    }
    async fn get_domain_claim(&self, domain: &str) -> StoreResult<Option<DomainClaim>> {
        self.read(self.inner.get_domain_claim(domain)).await
    }
    async fn get_operation(&self, id: &OperationId) -> StoreResult<Option<Operation>> {
        self.read(self.inner.get_operation(id)).await
    }
    async fn list_operations(
        &self,
        query: &OperationQuery,
    ) -> StoreResult<Page<Operation, OperationCursor>> {
        self.read(self.inner.list_operations(query)).await
    }
    async fn read_events(
        &self,
        operation: &OperationId,
        from_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<OperationEvent>> {
        self.read(self.inner.read_events(operation, from_seq, limit))
            .await
    }
    async fn get_request(
        &self,
        request_id: &RequestId,
        now: Timestamp,
    ) -> StoreResult<Option<RequestRecord>> {
        self.read(self.inner.get_request(request_id, now)).await
    }
    async fn runnable_operations(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> StoreResult<Vec<Operation>> {
        self.read(self.inner.runnable_operations(now, limit)).await
    }
    async fn get_backup(&self, name: &BackupName) -> StoreResult<Option<Backup>> {
        self.read(self.inner.get_backup(name)).await
    }
    async fn list_backups(
        &self,
        instance: &InstanceName,
        after: Option<&BackupCursor>,
        limit: usize,
    ) -> StoreResult<Page<Backup, BackupCursor>> {
        self.read(self.inner.list_backups(instance, after, limit))
            .await
    }
    async fn expired_backups(&self, now: Timestamp, limit: usize) -> StoreResult<Vec<Backup>> {
        self.read(self.inner.expired_backups(now, limit)).await
    }
    async fn record_audit_event(&self, event: &AuditEvent) -> StoreResult<()> {
        self.write(1, self.inner.record_audit_event(event)).await
    }
    async fn list_audit_events(
        &self,
        query: &AuditQuery,
    ) -> StoreResult<Page<AuditEvent, AuditCursor>> {
        self.read(self.inner.list_audit_events(query)).await
    }
    async fn listener_priorities(&self, listener_arn: &str) -> StoreResult<Vec<PriorityClaim>> {
        self.read(self.inner.listener_priorities(listener_arn))
            .await
    }
    async fn commit(&self, writes: Vec<Write>) -> StoreResult<()> {
        let n = writes.len();
        self.write(n, self.inner.commit(writes)).await
    }
}

// ---------------------------------------------------------------------------------------
// One environment: a fresh account with its platform, a fresh table.

struct Setup {
    config: Config,
    accounts: Arc<Accounts>,
    store: Arc<CountingStore>,
}

/// A configuration with DEV in a fresh moto account (its platform bootstrapped there, the
/// tenants' master login through the MySQL relay) and a fresh table; every AWS call of the
/// control plane goes through `aws`.
async fn setup(aws: &Relay, mysql: &Relay, workers: u32) -> Setup {
    let account = random_account();
    let mut config = Config {
        aws_endpoint: Some(aws.url()),
        table: format!("bench-{}", random_hex(8)),
        replica_id: format!("bench-{}", random_hex(6)),
        workers,
        environments: vec![EnvironmentConfig {
            name: Environment::Dev,
            account_id: account.clone(),
            region: "us-east-1".to_owned(),
            role_arn: format!("arn:aws:iam::{account}:role/instance-manager"),
            external_id: Secret::default(),
            endpoint: None,
            platform: Platform::default(),
            scale_bounds: None,
        }],
        ..Config::default()
    };
    let control_plane = sdk::moto_sdk_config(&aws.url()).await;
    let accounts = Accounts::with_control_plane(&control_plane, &config).await;
    let sdk = accounts.sdk_config(Environment::Dev).expect("DEV sdk");
    config.environments[0].platform = ensure_platform(
        &sdk,
        Environment::Dev,
        &master(Some(mysql.addr.port())),
        &format!("dev.{DOMAIN}"),
    )
    .await
    .expect("bootstrap platform");
    config.validate().expect("valid configuration");
    let accounts = Arc::new(Accounts::with_control_plane(&control_plane, &config).await);
    for (environment, outcome) in accounts.verify().await {
        outcome.unwrap_or_else(|e| panic!("{environment}: {e}"));
    }
    let dynamo = DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&control_plane),
        config.table.clone(),
    );
    dynamo.ensure_table().await.expect("create table");
    let store = Arc::new(CountingStore {
        inner: Arc::new(dynamo),
        counts: Mutex::new(StoreCounts::default()),
    });
    Setup {
        config,
        accounts,
        store,
    }
}

fn tenant(label: &str, i: usize) -> String {
    format!("{TENANT_PREFIX}{label}-{i:02}-{}", random_hex(6))
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        environment: Environment::Dev,
        organization_name: "Bench Ltd".to_owned(),
        contact_email: "ops@example.com".to_owned(),
        tier: Tier::Standard,
        desired_count: 2,
        cpu: 512,
        memory_mib: 1024,
        wordpress_image: "wordpress".to_owned(),
        wordpress_version: "6.7-php8.3-apache".to_owned(),
        labels: Default::default(),
        opportunity_id: "opp-7".to_owned(),
        cost_center: "cc-42".to_owned(),
        custom_domains: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// The floor: the workflow's steps, one after another, no engine.

struct FloorRun {
    wall: Duration,
    /// Polls of `wait_steady` until the service was steady.
    polls: u32,
}

async fn floor_once(setup: &Setup, tenant_id: &str) -> FloorRun {
    let tenant = TenantId::parse(tenant_id).expect("tenant id");
    let name = InstanceName::new(
        tenant.clone(),
        instance_manager::domain::InstanceId::parse("wp").unwrap(),
    );
    let now = Timestamp::now();
    let cloud = setup
        .accounts
        .env(Environment::Dev)
        .await
        .expect("DEV adapters");
    let operation = Operation::new(Verb::Create, name.clone(), Vec::new(), None, now);
    let instance = Instance::new_pending(name, spec(), operation.id.clone(), now);
    let plan = Provision.plan(&operation, &instance, &cloud);
    let mut ctx = StepCtx {
        operation,
        instance,
        cloud,
        store: setup.store.clone(),
        names: ResourceNames::derive(&tenant, Environment::Dev),
        tag_settings: EngineSettings::from_config(&setup.config).tags,
        now,
    };
    let started = Instant::now();
    let mut polls = 0;
    for step in plan.into_iter().flatten() {
        let mut record = Step::pending(step);
        record.started_at = Some(Timestamp::now());
        let output = loop {
            match Provision.run(&ctx, step).await {
                Ok(output) => break output,
                // A waiter (wait_steady): poll again at once; bounded.
                Err(StepError::NotYet(_)) if polls < 1000 => polls += 1,
                Err(error) => panic!("floor step {step} of {tenant_id}: {error:?}"),
            }
        };
        record.resource_id = output;
        record.ended_at = Some(Timestamp::now());
        ctx.operation.steps.push(record);
    }
    FloorRun {
        wall: started.elapsed(),
        polls,
    }
}

// ---------------------------------------------------------------------------------------
// A round: N concurrent CreateInstance through the server and the engine.

struct Round {
    workers: u32,
    provisions: usize,
    wall: Duration,
    /// Create accepted → operation ended (ms), sorted.
    latencies_ms: Vec<i64>,
    /// Accepted → first step started; steps' critical path; the rest (ms), per operation.
    queue_ms: Vec<i64>,
    critical_ms: Vec<i64>,
    rest_ms: Vec<i64>,
    failed: Vec<String>,
    active: usize,
    aws: Snapshot,
    mysql: Snapshot,
    store: StoreCounts,
    /// With watchers: the engine published an event (this process's bus subscriber got
    /// it) → a WatchOperation stream on this server delivered it (ms), live events only,
    /// sorted.
    delivery_ms: Vec<f64>,
    /// The same, for events published a second or more after the stream's first event.
    settled_ms: Vec<f64>,
}

/// One WatchOperation stream from the start of operation `name`: when each event arrived
/// (by sequence).
async fn watch(mut client: InstanceServiceClient<Channel>, name: String) -> Vec<(u64, Instant)> {
    let mut arrivals = Vec::new();
    let mut stream = client
        .watch_operation(v1::WatchOperationRequest {
            name,
            from_sequence: 0,
        })
        .await
        .unwrap_or_else(|s| panic!("WatchOperation: {s}"))
        .into_inner();
    while let Ok(Some(event)) = stream.message().await {
        arrivals.push((event.sequence as u64, Instant::now()));
    }
    arrivals
}

async fn start_server(setup: &Setup, bus: EventBus, shutdown: &CancellationToken) -> SocketAddr {
    let store: Arc<dyn StateStore> = setup.store.clone();
    let engine = Engine::with_options(
        store.clone(),
        setup.accounts.clone(),
        EngineSettings::from_config(&setup.config),
        bus.clone(),
        EngineOptions::default(),
    );
    let api = Api::new(
        store,
        ApiSettings {
            scale_bounds: setup.config.scale_bounds,
            health: instance_manager::health::HealthSettings::from_config(&setup.config),
            logs: instance_manager::logs::LogSettings::from_config(&setup.config),
            ..ApiSettings::default()
        },
        PageTokens::new(b"bench"),
    )
    .with_engine(bus, engine.waker())
    .with_shutdown(shutdown.clone())
    .with_clouds(setup.accounts.clone())
    .with_environments(setup.accounts.served());
    tokio::spawn(engine.run(shutdown.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(instance_manager::server::serve(
        api,
        listener,
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    addr
}

fn create_request(tenant: &str) -> v1::CreateInstanceRequest {
    v1::CreateInstanceRequest {
        parent: format!("tenants/{tenant}"),
        instance_id: "wp".into(),
        instance: Some(v1::Instance {
            environment: v1::Environment::Dev.into(),
            organization_name: format!("{tenant} Ltd"),
            contact_email: "ops@example.com".into(),
            cost_center: "cc-42".into(),
            opportunity_id: "opp-7".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

async fn round(
    aws: &Relay,
    mysql: &Relay,
    workers: u32,
    provisions: usize,
    watched: bool,
    tenants: &mut Vec<String>,
) -> Round {
    let setup = setup(aws, mysql, workers).await;
    let shutdown = CancellationToken::new();
    let bus = EventBus::new();
    let addr = start_server(&setup, bus.clone(), &shutdown).await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let client = InstanceServiceClient::new(channel);
    let names: Vec<String> = (0..provisions)
        .map(|i| tenant(&format!("w{workers}"), i))
        .collect();
    tenants.extend(names.iter().cloned());

    // Terminal events from the engine's in-process bus (no store read): when each ended.
    let mut events = bus.subscribe();
    let (aws0, mysql0, store0) = (aws.snapshot(), mysql.snapshot(), setup.store.counts());
    let started = Instant::now();
    let creates = names.iter().map(|tenant| {
        let mut client = client.clone();
        let request = create_request(tenant);
        async move {
            let operation = client
                .create_instance(request)
                .await
                .unwrap_or_else(|s| panic!("CreateInstance: {s}"))
                .into_inner();
            (
                OperationId::from_name(&operation.name).expect("operation name"),
                Timestamp::now(),
            )
        }
    });
    let accepted: HashMap<OperationId, Timestamp> = futures::future::join_all(creates)
        .await
        .into_iter()
        .collect();
    let watchers: Vec<_> = if watched {
        accepted
            .keys()
            .map(|id| tokio::spawn(watch(client.clone(), id.name())))
            .collect()
    } else {
        Vec::new()
    };
    let mut published: HashMap<(OperationId, u64), Instant> = HashMap::new();
    let mut pending: HashSet<OperationId> = accepted.keys().cloned().collect();
    let mut lagged = false;
    let deadline = tokio::time::Instant::now() + ROUND_LIMIT;
    while !pending.is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) => {
                published.insert((event.operation.clone(), event.seq), Instant::now());
                if event.terminal {
                    pending.remove(&event.operation);
                }
            }
            // Lost events: the store says which operations are done.
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                lagged = true;
                for id in pending.clone() {
                    if let Some(op) = setup.store.inner.get_operation(&id).await.unwrap()
                        && op.status.is_done()
                    {
                        pending.remove(&id);
                    }
                }
            }
            Ok(Err(error)) => panic!("event bus: {error}"),
            Err(_) => break,
        }
    }
    let wall = started.elapsed();
    let (aws1, mysql1, store1) = (aws.snapshot(), mysql.snapshot(), setup.store.counts());
    if lagged {
        eprintln!("provisioning: the bus lagged; some ends were read from the store");
    }
    let mut delivery_ms = Vec::new();
    let mut settled_ms = Vec::new();
    for (id, watcher) in accepted.keys().zip(watchers) {
        let arrivals = watcher.await.expect("watcher");
        // Live events only: published once the stream was open (its first event, the
        // replay's, had arrived); those before came from the watcher's own store read.
        let Some(&(_, open)) = arrivals.first() else {
            continue;
        };
        for (seq, arrived) in arrivals {
            if let Some(&at) = published.get(&(id.clone(), seq))
                && at > open
            {
                let took = ms(arrived.saturating_duration_since(at));
                delivery_ms.push(took);
                if at >= open + Duration::from_secs(1) {
                    settled_ms.push(took);
                }
            }
        }
    }
    delivery_ms.sort_by(f64::total_cmp);
    settled_ms.sort_by(f64::total_cmp);

    let mut result = Round {
        workers,
        provisions,
        wall,
        latencies_ms: Vec::new(),
        queue_ms: Vec::new(),
        critical_ms: Vec::new(),
        rest_ms: Vec::new(),
        failed: Vec::new(),
        active: 0,
        aws: aws1.since(&aws0),
        mysql: mysql1.since(&mysql0),
        store: store1.since(&store0),
        delivery_ms,
        settled_ms,
    };
    for (id, accepted_at) in &accepted {
        let Some(op) = setup.store.inner.get_operation(id).await.unwrap() else {
            result.failed.push(format!("{id}: gone"));
            continue;
        };
        if op.status != OperationStatus::Completed {
            result.failed.push(format!(
                "{id}: {:?} {}",
                op.status,
                op.error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default()
            ));
            continue;
        }
        let ended = op.ended_at.expect("ended operation has ended_at").millis();
        let total = ended - accepted_at.millis();
        let first = op
            .steps
            .iter()
            .filter_map(|s| s.started_at)
            .map(|t| t.millis())
            .min()
            .unwrap_or(ended);
        let mut stages: BTreeMap<u32, i64> = BTreeMap::new();
        for step in &op.steps {
            if let (Some(s), Some(e)) = (step.started_at, step.ended_at) {
                let longest = stages.entry(step.stage).or_default();
                *longest = (*longest).max(e.millis() - s.millis());
            }
        }
        let critical: i64 = stages.values().sum();
        let queue = (first - accepted_at.millis()).max(0);
        result.latencies_ms.push(total);
        result.queue_ms.push(queue);
        result.critical_ms.push(critical);
        result.rest_ms.push(total - queue - critical);
    }
    for list in [
        &mut result.latencies_ms,
        &mut result.queue_ms,
        &mut result.critical_ms,
        &mut result.rest_ms,
    ] {
        list.sort_unstable();
    }
    // Independently of the engine's records: the API says ACTIVE.
    for tenant in &names {
        let mut client = client.clone();
        let instance = client
            .get_instance(v1::GetInstanceRequest {
                name: format!("tenants/{tenant}/instances/wp"),
            })
            .await;
        if instance.is_ok_and(|i| i.into_inner().state() == v1::InstanceState::Active) {
            result.active += 1;
        }
    }
    if !pending.is_empty() {
        result.failed.push(format!(
            "{} not ended within {ROUND_LIMIT:?}",
            pending.len()
        ));
    }
    shutdown.cancel();
    result
}

// ---------------------------------------------------------------------------------------
// Cleanup: the bench tenants' databases and users in the shared MariaDB.

async fn drop_bench_databases() {
    let master = master(None);
    let mysql = instance_manager::cloud::mysql::MySqlDatabase::new();
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&mysql_url()).unwrap())
        .await
        .expect("connect to MariaDB");
    let databases: Vec<String> = conn
        .query("SHOW DATABASES LIKE 'tenant\\_imb\\_%'")
        .await
        .expect("list databases");
    let users: Vec<String> = conn
        .query("SELECT User FROM mysql.user WHERE User LIKE 't\\_imb\\_%'")
        .await
        .expect("list users");
    let _ = conn.disconnect().await;
    for database in &databases {
        if let Err(error) = mysql.drop_schema(&master, database).await {
            eprintln!("cleanup of {database}: {error}");
        }
    }
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&mysql_url()).unwrap())
        .await
        .expect("connect to MariaDB");
    for user in &users {
        if let Err(error) = conn
            .query_drop(format!("DROP USER IF EXISTS `{user}`@'%'"))
            .await
        {
            eprintln!("cleanup of user {user}: {error}");
        }
    }
    let _ = conn.disconnect().await;
}

/// Releases the ownership records of the bench's tenants (the databases are dropped).
async fn release_ownership(tenants: &[String]) {
    let master = master(None);
    let mysql = instance_manager::cloud::mysql::MySqlDatabase::new();
    for tenant in tenants {
        let id = TenantId::parse(tenant).expect("tenant id");
        let names = ResourceNames::derive(&id, Environment::Dev);
        let owner = format!("tenants/{tenant}/instances/wp");
        if let Err(error) = mysql
            .release_database(&master, &names.database, &owner)
            .await
        {
            eprintln!("release of {}: {error}", names.database);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The report.

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn is_store(label: &str) -> bool {
    label.starts_with("dynamodb:")
}

fn is_sts(label: &str) -> bool {
    label.starts_with("sts:")
}

/// "ecs 12, elasticloadbalancing 9, …": calls per provisioning by service.
fn services(snapshot: &Snapshot, per: f64) -> String {
    snapshot
        .by_service()
        .iter()
        .map(|(service, (n, _))| format!("{service} {:.1}", *n as f64 / per))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("provisioning: a benchmark, run by `make bench` (pass --bench to run it)");
        return;
    }
    let provisions: usize = env_or("BENCH_PROVISIONS", 50);
    let watched_provisions: usize = env_or("BENCH_WATCHED", 10);
    let floor_runs: usize = env_or("BENCH_FLOOR", 5);
    let workers: Vec<u32> = std::env::var("BENCH_WORKERS")
        .unwrap_or_else(|_| "10 50".into())
        .split_whitespace()
        .map(|w| w.parse().expect("BENCH_WORKERS: numbers"))
        .collect();
    let moto: SocketAddr = std::env::var("IM_TEST_AWS_ENDPOINT")
        .expect("IM_TEST_AWS_ENDPOINT")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("IM_TEST_AWS_ENDPOINT is http://HOST:PORT");
    let mariadb: SocketAddr = {
        let opts = mysql_async::Opts::from_url(&mysql_url()).unwrap();
        tokio::net::lookup_host((opts.ip_or_hostname(), opts.tcp_port()))
            .await
            .expect("MariaDB address")
            .next()
            .expect("MariaDB address")
    };
    let aws = Relay::start(moto, Protocol::Aws).await;
    let mysql = Relay::start(mariadb, Protocol::Mysql).await;
    drop_bench_databases().await;
    let mut tenants = Vec::new();

    // The floor.
    eprintln!("provisioning: floor, {floor_runs} sequential provisionings");
    let floor_setup = setup(&aws, &mysql, 1).await;
    let (aws0, mysql0, store0) = (aws.snapshot(), mysql.snapshot(), floor_setup.store.counts());
    let mut floor_walls = Vec::new();
    let mut floor_polls = 0;
    for i in 0..floor_runs {
        let name = tenant("floor", i);
        tenants.push(name.clone());
        let run = floor_once(&floor_setup, &name).await;
        floor_walls.push(run.wall);
        floor_polls += run.polls;
    }
    let floor_aws = aws.snapshot().since(&aws0);
    let floor_mysql = mysql.snapshot().since(&mysql0);
    let floor_store = floor_setup.store.counts().since(&store0);
    floor_walls.sort_unstable();

    let mut rounds = Vec::new();
    for &w in &workers {
        eprintln!("provisioning: {provisions} concurrent CreateInstance, workers = {w}");
        rounds.push(round(&aws, &mysql, w, provisions, false, &mut tenants).await);
    }
    // Watched: fewer operations (each stream's feed reads the store 4 times a second, which
    // would load moto and move the figures above), one WatchOperation each.
    let watched = if watched_provisions > 0 {
        eprintln!(
            "provisioning: {watched_provisions} concurrent CreateInstance, each watched, workers = {watched_provisions}"
        );
        let round = round(
            &aws,
            &mysql,
            watched_provisions as u32,
            watched_provisions,
            true,
            &mut tenants,
        )
        .await;
        Some(round)
    } else {
        None
    };

    eprintln!("provisioning: dropping the bench tenants' databases");
    drop_bench_databases().await;
    release_ownership(&tenants).await;

    // Report.
    let f = floor_runs.max(1) as f64;
    let floor_mean = floor_walls.iter().sum::<Duration>() / floor_runs.max(1) as u32;
    let (floor_aws_n, floor_aws_t) = floor_aws.total(|l| !is_store(l) && !is_sts(l));
    let (floor_sql_n, floor_sql_t) = floor_mysql.total(|_| true);
    println!("## 2. Provisioning throughput\n");
    println!(
        "The real engine and server in one process (production engine settings from the \
         configuration's defaults: poll 500 ms, converge 1 s), DynamoDB store and the \
         environment's emulated platform on moto (one request at a time), tenant databases in \
         the local MariaDB. Every AWS call and MySQL round trip is counted and timed by a TCP \
         relay in front of moto and MariaDB; store calls by a counting `StateStore` wrapper. \
         Each round runs in a fresh account, platform and table.\n"
    );
    println!(
        "**Floor** (no engine: the workflow's step functions in plan order, one after another, \
         {floor_runs} provisionings): {:.0} ms per provisioning (min {:.0}, max {:.0}); per \
         provisioning {:.1} AWS calls ({:.0} ms in them: {}), {:.1} MySQL round trips ({:.0} ms), \
         {:.1} store reads and {:.1} store writes (the listener priority claim), \
         {:.1} polls of wait_steady.\n",
        ms(floor_mean),
        ms(floor_walls[0]),
        ms(*floor_walls.last().unwrap()),
        floor_aws_n as f64 / f,
        ms(floor_aws_t) / f,
        services(&floor_aws, f),
        floor_sql_n as f64 / f,
        ms(floor_sql_t) / f,
        floor_store.reads as f64 / f,
        floor_store.writes as f64 / f,
        floor_polls as f64 / f,
    );
    println!(
        "| workers | provisions | ACTIVE | wall s | p50 ms | p99 ms | p50 / floor | AWS calls / prov | store writes / prov (batches) | store reads / prov |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rounds {
        let n = r.provisions as f64;
        let (aws_n, _) = r.aws.total(|l| !is_store(l) && !is_sts(l));
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {:.2} | {:.1} | {:.1} ({:.1}) | {:.1} |",
            r.workers,
            r.provisions,
            r.active,
            r.wall.as_secs_f64(),
            percentile(&r.latencies_ms, 50.0),
            percentile(&r.latencies_ms, 99.0),
            percentile(&r.latencies_ms, 50.0) as f64 / ms(floor_mean),
            aws_n as f64 / n,
            r.store.writes as f64 / n,
            r.store.commits as f64 / n,
            r.store.reads as f64 / n,
        );
    }
    println!(
        "\nWhere the time goes, per provisioning (sums over the round divided by the provisions; calls overlap, so sums exceed the wall time):\n"
    );
    println!(
        "| workers | in AWS adapter calls ms | in store calls ms | MySQL round trips | in MySQL ms | moto busy / wall | p50 wait for a worker ms | p50 steps' critical path ms | p50 rest (engine) ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rounds {
        let n = r.provisions as f64;
        let (_, aws_t) = r.aws.total(|l| !is_store(l));
        let (sql_n, sql_t) = r.mysql.total(|_| true);
        println!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0}% | {} | {} | {} |",
            r.workers,
            ms(aws_t) / n,
            ms(r.store.read_time + r.store.write_time) / n,
            sql_n as f64 / n,
            ms(sql_t) / n,
            100.0 * r.aws.busy.as_secs_f64() / r.wall.as_secs_f64(),
            percentile(&r.queue_ms, 50.0),
            percentile(&r.critical_ms, 50.0),
            percentile(&r.rest_ms, 50.0),
        );
    }
    println!(
        "\nFloor for comparison: {:.0} ms in AWS adapter calls, {:.0} ms in MySQL, {:.0} ms in \
         store calls, the rest {:.0} ms (in this process) per provisioning.\n",
        ms(floor_aws_t) / f,
        ms(floor_sql_t) / f,
        ms(floor_store.read_time + floor_store.write_time) / f,
        (ms(floor_mean)
            - ms(floor_aws_t) / f
            - ms(floor_sql_t) / f
            - ms(floor_store.read_time + floor_store.write_time) / f)
            .max(0.0),
    );
    for r in &rounds {
        println!(
            "- workers {}: AWS calls per provisioning by service: {} (dynamodb = the store; sts = role sessions)",
            r.workers,
            services(&r.aws, r.provisions as f64)
        );
        let mut heaviest: Vec<(&String, &(u64, Duration))> = r.aws.calls.iter().collect();
        heaviest.sort_by_key(|(_, (_, t))| std::cmp::Reverse(*t));
        println!(
            "- workers {}: the calls with the most time at moto (calls, mean ms including the wait in its queue, total s): {}",
            r.workers,
            heaviest
                .iter()
                .take(8)
                .map(|(label, (n, t))| format!(
                    "{label} {n}, {:.0}, {:.1}",
                    ms(*t) / *n as f64,
                    t.as_secs_f64()
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        if !r.failed.is_empty() {
            println!(
                "- workers {}: {} did not complete: {}",
                r.workers,
                r.failed.len(),
                r.failed.join("; ")
            );
        }
    }
    if let Some(r) = watched {
        let at = |d: &[f64], p: f64| {
            d.get(((p / 100.0 * d.len() as f64).ceil() as usize).clamp(1, d.len().max(1)) - 1)
                .copied()
                .unwrap_or(f64::NAN)
        };
        let (d, settled) = (&r.delivery_ms, &r.settled_ms);
        println!(
            "\n**Delivery on the replica running the operation** ({} concurrent CreateInstance, \
             workers {}, one WatchOperation each on the same server, from sequence 0): the \
             engine published an event once its transaction landed (this process's bus \
             subscriber got it) → the watcher received it over gRPC, live events only (published \
             after the stream's first event arrived): {} \
             events, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; of those published a second or \
             more after the stream's first event ({} events, past the feed's first store read): \
             p50 {:.1} ms, p99 {:.1} ms ({} of {} ACTIVE; provisioning p50 {} ms). This is the \
             path of every watcher on the replica that runs the operation: its feed passes the \
             engine's events on without reading the store.{}",
            r.provisions,
            r.workers,
            d.len(),
            at(d, 50.0),
            at(d, 99.0),
            d.last().copied().unwrap_or(f64::NAN),
            settled.len(),
            at(settled, 50.0),
            at(settled, 99.0),
            r.active,
            r.provisions,
            percentile(&r.latencies_ms, 50.0),
            if r.failed.is_empty() {
                String::new()
            } else {
                format!(" Not completed: {}.", r.failed.join("; "))
            }
        );
    }
}
