//! `make bench`, part 1: the unary API's overhead over its floors, in one run on one machine.
//!
//! A tonic client drives GetInstance and ListInstances (a page of 100 out of 120 seeded
//! instances) for a fixed time per cell at concurrency 1, 16 and 64 (that many tasks sharing
//! one channel), against:
//! (a) the real server (`server::serve`, authentication disabled) on the in-memory store,
//!     beside its floor, a bare tonic server answering `grpc.health.v1.Health/Check` (tonic
//!     doing no work of ours);
//! (b) the same server on DynamoDB (moto at `IM_TEST_AWS_ENDPOINT`), beside its floor, the
//!     SDK's GetItem / Query issued directly against the same table with the same keys and
//!     limit the store uses.
//!
//! It prints a Markdown section: requests/s, p50 and p99 per cell, then the ratios. It
//! asserts nothing about time. `cargo test --all-targets` would run it without `--bench`;
//! it then only says so and exits (scripts/bench.sh passes `--bench`).

#[path = "support/sdk.rs"]
mod sdk;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::domain::{
    Environment, Instance, InstanceId, InstanceName, InstanceSpec, InstanceState, OperationId,
    TenantId, Tier, Timestamp,
};
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::store::dynamo::DynamoStore;
use instance_manager::store::memory::MemoryStore;
use instance_manager::store::{StateStore, Write};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const TENANT: &str = "bench";
const SEEDED: usize = 120;
const PAGE: i32 = 100;
const CONCURRENCY: [usize; 3] = [1, 16, 64];

/// Latencies of one cell, sorted, and the time they took.
struct Cell {
    latencies_us: Vec<u64>,
    elapsed: Duration,
    errors: usize,
}

impl Cell {
    fn rps(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        self.latencies_us[rank.clamp(1, self.latencies_us.len()) - 1] as f64 / 1000.0
    }
}

/// One call of a cell; `i` varies the instance read.
type Call = Arc<
    dyn Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// Runs `call` from `concurrency` tasks for `duration` after a short warm-up.
async fn measure(call: Call, concurrency: usize, duration: Duration) -> Cell {
    let warm_until = Instant::now() + Duration::from_millis(300);
    let mut i = 0;
    while Instant::now() < warm_until {
        call(i).await.expect("warm-up call");
        i += 1;
    }
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut i) = (Vec::new(), 0, task);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match call(i).await {
                        Ok(()) => latencies.push(sent.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                    i += concurrency;
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut cell = Cell {
        latencies_us: Vec::new(),
        elapsed: Duration::ZERO,
        errors: 0,
    };
    for task in tasks {
        let (latencies, errors) = task.await.expect("load task");
        cell.latencies_us.extend(latencies);
        cell.errors += errors;
    }
    cell.elapsed = started.elapsed();
    cell.latencies_us.sort_unstable();
    cell
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        environment: Environment::Dev,
        organization_name: "Bench Corp".to_owned(),
        contact_email: "ops@example.com".to_owned(),
        tier: Tier::Standard,
        desired_count: 2,
        cpu: 512,
        memory_mib: 1024,
        wordpress_image: "wordpress".to_owned(),
        wordpress_version: "6.7-php8.3-apache".to_owned(),
        labels: Default::default(),
        opportunity_id: "opp-1".to_owned(),
        cost_center: "cc-1".to_owned(),
        custom_domains: Vec::new(),
    }
}

fn instance_id(i: usize) -> String {
    format!("wp-{:03}", i % SEEDED)
}

/// Seeds ACTIVE instances of one tenant directly in the store (no workflow runs).
async fn seed(store: &dyn StateStore) {
    for i in 0..SEEDED {
        let name = InstanceName::new(
            TenantId::parse(TENANT).unwrap(),
            InstanceId::parse(&instance_id(i)).unwrap(),
        );
        let mut instance = Instance::new_pending(
            name,
            spec(),
            OperationId::parse("op-seed").unwrap(),
            Timestamp::now(),
        );
        instance.state = InstanceState::Active;
        instance.current_operation = None;
        store
            .commit(vec![Write::CreateInstance(instance)])
            .await
            .expect("seed instance");
    }
}

/// The real server on `store`, authentication disabled, on an ephemeral port.
async fn start_server(store: Arc<dyn StateStore>, shutdown: &CancellationToken) -> SocketAddr {
    let api = Api::new(store, ApiSettings::default(), PageTokens::new(b"bench-key"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        instance_manager::server::serve(api, listener, shutdown, Duration::from_secs(1))
            .await
            .expect("serve");
    });
    addr
}

/// A bare tonic server with only the health service, SERVING: the floor of (a). Its
/// connections have Nagle's algorithm off, as the real server's do (with it on, the floor
/// itself waited ~40 ms for delayed ACKs at concurrency 16 and 64).
async fn start_echo(shutdown: &CancellationToken) -> SocketAddr {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    |accepted| {
                        if let Ok(stream) = &accepted {
                            let _ = stream.set_nodelay(true);
                        }
                        accepted
                    },
                ),
                shutdown.cancelled_owned(),
            )
            .await
            .expect("echo server");
    });
    addr
}

/// A channel to `addr` once its health service answers SERVING (polled with a deadline).
async fn connect(addr: SocketAddr) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let status = HealthClient::new(channel.clone())
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status);
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            if matches!(status, Ok(s) if s == serving) {
                return channel;
            }
        }
        assert!(Instant::now() < deadline, "{addr} not SERVING within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn get_instance_call(channel: Channel) -> Call {
    let client = InstanceServiceClient::new(channel);
    Arc::new(move |i| {
        let mut client = client.clone();
        Box::pin(async move {
            let request = v1::GetInstanceRequest {
                name: format!("tenants/{TENANT}/instances/{}", instance_id(i)),
            };
            client
                .get_instance(request)
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        })
    })
}

fn list_instances_call(channel: Channel) -> Call {
    let client = InstanceServiceClient::new(channel);
    Arc::new(move |_| {
        let mut client = client.clone();
        Box::pin(async move {
            let request = v1::ListInstancesRequest {
                parent: format!("tenants/{TENANT}"),
                page_size: PAGE,
                ..Default::default()
            };
            let page = client
                .list_instances(request)
                .await
                .map_err(|s| s.to_string())?;
            match page.into_inner().instances.len() {
                n if n == PAGE as usize => Ok(()),
                n => Err(format!("page of {n}")),
            }
        })
    })
}

fn echo_call(channel: Channel) -> Call {
    let client = HealthClient::new(channel);
    Arc::new(move |_| {
        let mut client = client.clone();
        Box::pin(async move {
            client
                .check(HealthCheckRequest::default())
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        })
    })
}

// The item layout of the store (DESIGN.md §4): `pk` TENANT#{tenant}, `sk` INSTANCE#{id}.
fn direct_get_item_call(client: aws_sdk_dynamodb::Client, table: String) -> Call {
    Arc::new(move |i| {
        let (client, table) = (client.clone(), table.clone());
        Box::pin(async move {
            let item = client
                .get_item()
                .table_name(table)
                .key("pk", AttributeValue::S(format!("TENANT#{TENANT}")))
                .key(
                    "sk",
                    AttributeValue::S(format!("INSTANCE#{}", instance_id(i))),
                )
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            item.item.map(|_| ()).ok_or_else(|| "no item".to_owned())
        })
    })
}

/// The Query the store issues for a page of 100: one more item than the page, to know
/// whether another page follows.
fn direct_query_call(client: aws_sdk_dynamodb::Client, table: String) -> Call {
    Arc::new(move |_| {
        let (client, table) = (client.clone(), table.clone());
        Box::pin(async move {
            let page = client
                .query()
                .table_name(table)
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_names("#sk", "sk")
                .expression_attribute_values(":pk", AttributeValue::S(format!("TENANT#{TENANT}")))
                .expression_attribute_values(":prefix", AttributeValue::S("INSTANCE#".into()))
                .consistent_read(true)
                .limit(PAGE + 1)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            match page.items.map_or(0, |items| items.len()) {
                n if n == PAGE as usize + 1 => Ok(()),
                n => Err(format!("query of {n}")),
            }
        })
    })
}

fn cell_row(target: &str, rpc: &str, concurrency: usize, cell: &Cell) -> String {
    format!(
        "| {target} | {rpc} | {concurrency} | {:.0} | {:.2} | {:.2} | {} |",
        cell.rps(),
        cell.percentile_ms(50.0),
        cell.percentile_ms(99.0),
        cell.errors,
    )
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("unary_api: a benchmark, run by `make bench` (pass --bench to run it)");
        return;
    }
    let duration = Duration::from_secs_f64(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5.0),
    );
    let endpoint = std::env::var("IM_TEST_AWS_ENDPOINT").expect("IM_TEST_AWS_ENDPOINT");
    let shutdown = CancellationToken::new();

    // (a) in-memory store, and the echo floor.
    let memory: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    seed(memory.as_ref()).await;
    let memory_server = connect(start_server(memory, &shutdown).await).await;
    let echo = connect(start_echo(&shutdown).await).await;

    // (b) DynamoDB on moto, and the direct SDK floor on the same table.
    let sdk = sdk::moto_sdk_config(&endpoint).await;
    let dynamo_client = aws_sdk_dynamodb::Client::new(&sdk);
    let table = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let dynamo = DynamoStore::new(dynamo_client.clone(), table.clone());
    dynamo.ensure_table().await.expect("create table");
    seed(&dynamo).await;
    let dynamo_server = connect(start_server(Arc::new(dynamo), &shutdown).await).await;

    let cells: Vec<(&'static str, &'static str, Call)> = vec![
        ("echo (tonic Health/Check)", "Check", echo_call(echo)),
        (
            "server, in-memory store",
            "GetInstance",
            get_instance_call(memory_server.clone()),
        ),
        (
            "server, in-memory store",
            "ListInstances",
            list_instances_call(memory_server),
        ),
        (
            "direct SDK on moto",
            "GetItem",
            direct_get_item_call(dynamo_client.clone(), table.clone()),
        ),
        (
            "server, DynamoDB (moto)",
            "GetInstance",
            get_instance_call(dynamo_server.clone()),
        ),
        (
            "direct SDK on moto",
            "Query (101)",
            direct_query_call(dynamo_client.clone(), table.clone()),
        ),
        (
            "server, DynamoDB (moto)",
            "ListInstances",
            list_instances_call(dynamo_server),
        ),
    ];

    let mut results: HashMap<(&'static str, &'static str, usize), Cell> = HashMap::new();
    let mut rows = Vec::new();
    for (target, rpc, call) in &cells {
        for concurrency in CONCURRENCY {
            eprintln!("unary_api: {target} {rpc} at concurrency {concurrency}");
            let cell = measure(call.clone(), concurrency, duration).await;
            rows.push(cell_row(target, rpc, concurrency, &cell));
            results.insert((*target, *rpc, concurrency), cell);
        }
    }
    shutdown.cancel();

    println!("## 1. Unary API overhead\n");
    println!(
        "{} s per cell after a 0.3 s warm-up; concurrency = tasks sharing one HTTP/2 channel; \
         the client and the in-process servers share one tokio runtime. ListInstances returns \
         a page of {PAGE} of {SEEDED} instances of one tenant.\n",
        duration.as_secs_f64()
    );
    println!("| target | call | concurrency | requests/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!("{row}");
    }

    let cell = |target: &'static str, rpc: &'static str, concurrency: usize| {
        results
            .get(&(target, rpc, concurrency))
            .expect("measured cell")
    };
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "\n(a) server on the in-memory store vs the echo floor, throughput ratio (goal >= 0.5):\n"
    );
    println!("| call | concurrency | server req/s | echo req/s | ratio | goal |");
    println!("|---|---:|---:|---:|---:|---|");
    for rpc in ["GetInstance", "ListInstances"] {
        for concurrency in CONCURRENCY {
            let server = cell("server, in-memory store", rpc, concurrency).rps();
            let echo = cell("echo (tonic Health/Check)", "Check", concurrency).rps();
            let ratio = server / echo;
            println!(
                "| {rpc} | {concurrency} | {server:.0} | {echo:.0} | {ratio:.2} | {} |",
                verdict(ratio >= 0.5)
            );
        }
    }
    println!(
        "\n(b) server on DynamoDB vs the same call issued directly with the SDK, p99 added \
         (goal < 1 ms; moto's own latency dominates both):\n"
    );
    println!("| call vs floor | concurrency | server p99 ms | direct p99 ms | added ms | goal |");
    println!("|---|---:|---:|---:|---:|---|");
    for (rpc, floor) in [("GetInstance", "GetItem"), ("ListInstances", "Query (101)")] {
        for concurrency in CONCURRENCY {
            let server = cell("server, DynamoDB (moto)", rpc, concurrency).percentile_ms(99.0);
            let direct = cell("direct SDK on moto", floor, concurrency).percentile_ms(99.0);
            let added = server - direct;
            println!(
                "| {rpc} vs {floor} | {concurrency} | {server:.2} | {direct:.2} | {added:.2} | {} |",
                verdict(added < 1.0)
            );
        }
    }
}
