//! `make bench`, part 3: WatchOperation fan-out.
//!
//! One server process (`instance-manager serve`, the binary as it ships, given with
//! `--binary`, so its RSS can be read from /proc) on DynamoDB in moto, reached through a
//! counting relay (benches/support/relay.rs) so its store reads are counted without its
//! help. The server process only ever runs on DynamoDB (`serve` has no in-memory store).
//!
//! The events come from "another replica": this process writes `BENCH_WATCH_OPS` (default
//! 5) operations straight into the table, leased to a replica that is not the server (so
//! its engine leaves them alone), and appends one event to each every `BENCH_EVENT_MS`
//! (default 500 ms) the way the engine does (the event and the operation's
//! `last_event_seq` in one transaction). The server's watchers learn of them only by
//! reading the store: this is the path every replica but the one running an operation
//! takes; the one running it also wakes its feeds from its in-process bus.
//!
//! `BENCH_WATCH_POLL_MS` sets the server's `watch_poll_ms` (how often a feed re-reads the
//! store; unset: the server's default, 250 ms).
//!
//! Phases, each with events flowing for `BENCH_WATCH_SECONDS` (default 20):
//!   A. 1 % of the watchers (100 of 10 000; at least one per operation) open, then measure;
//!   B. the rest open (to `BENCH_WATCHERS`, default 10 000), then measure.
//! Watchers are tonic streams spread over connections of 100 streams each, and resume from
//! the operation's current sequence (as a reconnecting client does), so opening does not
//! replay the whole history; at most `BENCH_OPENING` (default 32) open at a time, since
//! moto serves one request at a time and a burst of 10 000 times out in its queue. Measured: the server's VmRSS idle and with every stream open
//! (KiB per stream); delivery latency from the moment the event's transaction returned
//! (persisted) to its arrival at a watcher, p50/p99, for live events only; DynamoDB reads
//! per second during each phase, and per watcher opened. It asserts nothing about time.

#[path = "support/relay.rs"]
mod relay;
#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/serve.rs"]
mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use instance_manager::domain::operation::Lease;
use instance_manager::domain::{
    InstanceId, InstanceName, Operation, OperationEvent, OperationId, OperationStatus, Step,
    StepStatus, TenantId, Timestamp, Verb,
};
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::store::{DynamoStore, StateStore, Write};
use relay::{Protocol, Relay, Snapshot};
use serve::{Server, status_kib};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const STREAMS_PER_CONNECTION: usize = 100;
/// Events per operation the latency table holds.
const MAX_EVENTS: usize = 20_000;
const PHASE_SHIFT: u32 = 56;
const DEADLINE: Duration = Duration::from_secs(60);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The server, once health says SERVING; and its address.
async fn start_server(
    binary: &Path,
    endpoint: &str,
    table: &str,
    max_streams: usize,
    watch_poll_ms: u64,
    log: &Path,
) -> (Server, SocketAddr) {
    let mut command = Command::new(binary);
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--aws-endpoint", endpoint, "--table", table])
        .args(["--max-streams", &max_streams.to_string()])
        .args(["--watch-poll-ms", &watch_poll_ms.to_string()])
        .env("IM_AUTH_DISABLED", "true")
        .env("IM_LOG", "warn,instance_manager=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Server::start(command, log, Duration::from_millis(10), DEADLINE).await
}

/// When each event was persisted: micros since `base`, with the phase in the top byte
/// (0: not measured). Zero until the writer's transaction returned.
struct Persisted {
    base: Instant,
    slots: Vec<Vec<AtomicU64>>,
    phase: AtomicU8,
    /// No events while streams open (moto, serving one request at a time, is the opening's
    /// bottleneck; the openings' reads are counted apart).
    paused: AtomicBool,
    /// The last sequence written per operation.
    last: Vec<AtomicU64>,
}

impl Persisted {
    fn micros(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

/// The other replica: creates the operations, then appends an event to each every
/// `interval` until `stop`.
async fn writer(
    store: DynamoStore,
    ops: Vec<Operation>,
    persisted: Arc<Persisted>,
    interval: Duration,
    stop: CancellationToken,
) {
    let tasks = ops.into_iter().enumerate().map(|(i, mut op)| {
        let (store, persisted, stop) = (store.clone(), persisted.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                if persisted.paused.load(Ordering::SeqCst) {
                    continue;
                }
                let seq = op.last_event_seq + 1;
                if seq as usize >= MAX_EVENTS {
                    return;
                }
                let now = Timestamp::now();
                op.last_event_seq = seq;
                op.updated_at = now;
                let event = OperationEvent {
                    operation: op.id.clone(),
                    seq,
                    at: now,
                    status: OperationStatus::InProgress,
                    step: Some("work".into()),
                    step_status: Some(StepStatus::Running),
                    message: format!("progress {seq}"),
                    percent: 50,
                    terminal: false,
                };
                store
                    .commit(vec![
                        Write::UpdateOperation(op.clone()),
                        Write::AppendEvent(event),
                    ])
                    .await
                    .expect("append event");
                op.version += 1;
                let phase = u64::from(persisted.phase.load(Ordering::SeqCst));
                persisted.slots[i][seq as usize].store(
                    (phase << PHASE_SHIFT) | persisted.micros(),
                    Ordering::SeqCst,
                );
                persisted.last[i].store(seq, Ordering::SeqCst);
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        let _ = task.await;
    }
}

/// An operation "another replica" runs: IN_PROGRESS, leased for an hour, event 1 recorded.
async fn create_operation(store: &DynamoStore, i: usize) -> Operation {
    let target = InstanceName::new(
        TenantId::parse(&format!("imb-watch-{i:02}")).unwrap(),
        InstanceId::parse("wp").unwrap(),
    );
    let now = Timestamp::now();
    let mut op = Operation::new(Verb::Create, target, vec![Step::pending("work")], None, now);
    op.status = OperationStatus::InProgress;
    op.lease = Some(Lease {
        owner: "bench-other-replica".into(),
        expires_at: Timestamp(now.millis() + 3_600_000),
    });
    op.last_event_seq = 1;
    let event = OperationEvent {
        operation: op.id.clone(),
        seq: 1,
        at: now,
        status: OperationStatus::InProgress,
        step: Some("work".into()),
        step_status: Some(StepStatus::Running),
        message: "started".into(),
        percent: 0,
        terminal: false,
    };
    store
        .commit(vec![
            Write::CreateOperation(op.clone()),
            Write::AppendEvent(event),
        ])
        .await
        .expect("create operation");
    op.version = 1;
    op
}

/// Latencies (µs) of the live events one watcher received, with their phase.
type Samples = Vec<(u8, u32)>;

/// Opens one WatchOperation stream from the operation's current sequence; signals `ready`
/// at its first event, then records live events until `stop`.
fn watcher(
    channel: Channel,
    op_index: usize,
    op: OperationId,
    persisted: Arc<Persisted>,
    gates: (Arc<Semaphore>, Arc<Semaphore>),
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<Samples, String>> {
    tokio::spawn(async move {
        let (opening, ready) = gates;
        // Opened (or failed to open): the next stream may open.
        let mut opening = Some(opening.acquire_owned().await.expect("opening gate"));
        let mut opened = move || {
            drop(opening.take());
            ready.add_permits(1);
        };
        let mut client = InstanceServiceClient::new(channel);
        let from = persisted.last[op_index].load(Ordering::SeqCst).max(1);
        let mut stream = match client
            .watch_operation(v1::WatchOperationRequest {
                name: op.name(),
                from_sequence: from as i64,
            })
            .await
        {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                opened();
                return Err(format!("WatchOperation: {status}"));
            }
        };
        let mut samples = Samples::new();
        let mut opened_at: Option<u64> = None;
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return Ok(samples),
                message = stream.message() => message,
            };
            let event = match message {
                Ok(Some(event)) => event,
                Ok(None) => {
                    if opened_at.is_none() {
                        opened();
                    }
                    return Err("stream ended".into());
                }
                Err(status) => {
                    if opened_at.is_none() {
                        opened();
                    }
                    return Err(format!("stream failed: {status}"));
                }
            };
            let now = persisted.micros();
            let Some(opened_micros) = opened_at else {
                opened_at = Some(now);
                opened();
                continue;
            };
            let slot = persisted.slots[op_index]
                .get(event.sequence as usize)
                .map_or(0, |s| s.load(Ordering::SeqCst));
            let (phase, at) = ((slot >> PHASE_SHIFT) as u8, slot & ((1 << PHASE_SHIFT) - 1));
            // Live events of a measured phase only: not replayed, persisted after opening.
            if phase != 0 && at > opened_micros {
                samples.push((
                    phase,
                    now.saturating_sub(at).min(u64::from(u32::MAX)) as u32,
                ));
            }
        }
    })
}

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

fn is_read(label: &str) -> bool {
    [
        "GetItem",
        "Query",
        "Scan",
        "BatchGetItem",
        "TransactGetItems",
    ]
    .iter()
    .any(|op| label == format!("dynamodb:{op}"))
}

struct Phase {
    watchers: usize,
    seconds: f64,
    reads: u64,
    calls: Snapshot,
    server_cpu: f64,
    /// This process: the watchers' client side and the relay.
    client_cpu: f64,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("watch_fanout: a benchmark, run by `make bench` (pass --bench to run it)");
        return;
    }
    let binary = args
        .iter()
        .position(|a| a == "--binary")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .expect("--binary PATH of instance-manager");
    let watchers: usize = env_or("BENCH_WATCHERS", 10_000);
    let operations: usize = env_or("BENCH_WATCH_OPS", 5).max(1);
    let seconds: f64 = env_or("BENCH_WATCH_SECONDS", 20.0);
    let interval = Duration::from_millis(env_or("BENCH_EVENT_MS", 500));
    let poll_ms: u64 = env_or(
        "BENCH_WATCH_POLL_MS",
        instance_manager::config::Config::default().watch_poll_ms,
    );
    let first_phase = (watchers / 100).max(operations).min(watchers);
    let endpoint = std::env::var("IM_TEST_AWS_ENDPOINT").expect("IM_TEST_AWS_ENDPOINT");
    let moto: SocketAddr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("IM_TEST_AWS_ENDPOINT is http://HOST:PORT");
    let dir = tempfile::tempdir().expect("temp dir");
    let ticks = clock_ticks_per_second();

    let sdk = sdk::moto_sdk_config(&endpoint).await;
    let table = format!("watch-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), table.clone());
    store.ensure_table().await.expect("create table");

    // The relay on a runtime of its own, so the 10 000 client streams of this process do not
    // delay the server's store calls in its scheduler queue.
    let relay = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("relay runtime");
        let relay = runtime.block_on(Relay::start(moto, Protocol::Aws));
        // Its worker keeps relaying after this thread ends; it lives as long as the process.
        std::mem::forget(runtime);
        relay
    })
    .join()
    .expect("relay thread");
    let log = dir.path().join("serve.log");
    let (server, addr) =
        start_server(&binary, &relay.url(), &table, watchers + 100, poll_ms, &log).await;
    let pid = server.0.id();

    let mut ops = Vec::new();
    for i in 0..operations {
        ops.push(create_operation(&store, i).await);
    }
    let ids: Vec<OperationId> = ops.iter().map(|op| op.id.clone()).collect();
    let persisted = Arc::new(Persisted {
        base: Instant::now(),
        slots: (0..operations)
            .map(|_| (0..MAX_EVENTS).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        phase: AtomicU8::new(0),
        paused: AtomicBool::new(false),
        last: (0..operations).map(|_| AtomicU64::new(1)).collect(),
    });
    let stop = CancellationToken::new();
    let writer_task = tokio::spawn(writer(
        store.clone(),
        ops,
        persisted.clone(),
        interval,
        stop.clone(),
    ));

    // Idle: the server with events flowing and no watcher.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = status_kib(pid, "VmRSS:");
    let idle_phase = {
        let (calls0, cpu0, t0) = (relay.snapshot(), cpu_ticks(pid), Instant::now());
        let own0 = cpu_ticks(std::process::id());
        tokio::time::sleep(Duration::from_secs_f64(seconds.min(5.0))).await;
        let calls = relay.snapshot().since(&calls0);
        let secs = t0.elapsed().as_secs_f64();
        Phase {
            watchers: 0,
            seconds: secs,
            reads: calls.total(is_read).0,
            calls,
            server_cpu: (cpu_ticks(pid) - cpu0) as f64 / ticks / secs,
            client_cpu: (cpu_ticks(std::process::id()) - own0) as f64 / ticks / secs,
        }
    };

    let connections = watchers.div_ceil(STREAMS_PER_CONNECTION);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .expect("connect"),
        );
    }
    let ready = Arc::new(Semaphore::new(0));
    // Streams opening at once: moto serves one request at a time, and 10 000 openings at
    // once queue past the SDK's 30 s attempt timeout there.
    let opening = Arc::new(Semaphore::new(env_or("BENCH_OPENING", 32)));
    let mut handles = Vec::with_capacity(watchers);
    let open = |from: usize, to: usize, handles: &mut Vec<_>| {
        for w in from..to {
            let op = w % operations;
            handles.push(watcher(
                channels[w / STREAMS_PER_CONNECTION].clone(),
                op,
                ids[op].clone(),
                persisted.clone(),
                (opening.clone(), ready.clone()),
                stop.clone(),
            ));
        }
    };

    let mut phases = vec![idle_phase];
    let mut opening = Vec::new();
    let mut rss_phase = Vec::new();
    for (number, (from, to)) in [(0, first_phase), (first_phase, watchers)]
        .into_iter()
        .enumerate()
    {
        if to <= from {
            continue;
        }
        eprintln!("watch_fanout: opening {} streams (to {to})", to - from);
        let (calls0, t0) = (relay.snapshot(), Instant::now());
        persisted.paused.store(true, Ordering::SeqCst);
        open(from, to, &mut handles);
        let wanted = u32::try_from(to - from).unwrap();
        tokio::time::timeout(Duration::from_secs(1800), ready.acquire_many(wanted))
            .await
            .expect("streams opened within 30 minutes")
            .expect("semaphore")
            .forget();
        persisted.paused.store(false, Ordering::SeqCst);
        let opened = relay.snapshot().since(&calls0);
        opening.push((to - from, t0.elapsed(), opened.total(is_read).0));

        eprintln!("watch_fanout: {to} watchers, measuring for {seconds} s");
        let (calls0, cpu0, t0) = (relay.snapshot(), cpu_ticks(pid), Instant::now());
        let own0 = cpu_ticks(std::process::id());
        persisted.phase.store(number as u8 + 1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        persisted.phase.store(0, Ordering::SeqCst);
        let calls = relay.snapshot().since(&calls0);
        let secs = t0.elapsed().as_secs_f64();
        phases.push(Phase {
            watchers: to,
            seconds: secs,
            reads: calls.total(is_read).0,
            calls,
            server_cpu: (cpu_ticks(pid) - cpu0) as f64 / ticks / secs,
            client_cpu: (cpu_ticks(std::process::id()) - own0) as f64 / ticks / secs,
        });
        // Let the last events of the phase arrive before reading the memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_phase.push((to, status_kib(pid, "VmRSS:")));
    }
    let rss_hwm = status_kib(pid, "VmHWM:");
    stop.cancel();
    let _ = writer_task.await;
    let mut latencies: Vec<Vec<u32>> = vec![Vec::new(), Vec::new()];
    let mut failures = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(Ok(samples)) => {
                for (phase, micros) in samples {
                    latencies[usize::from(phase) - 1].push(micros);
                }
            }
            Ok(Err(error)) => failures.push(error),
            Err(error) => failures.push(error.to_string()),
        }
    }
    drop(server);
    for list in &mut latencies {
        list.sort_unstable();
    }

    println!("## 3. Watch fan-out: {watchers} watchers, watch_poll_ms {poll_ms}\n");
    println!(
        "`instance-manager serve` (the binary as it ships) on DynamoDB in moto, through a \
         counting relay. {operations} operations run by \"another replica\" (this process \
         writes them into the table, leased to it) each get an event every {} ms (the event \
         and the operation in one transaction); the server learns of them only from the store \
         (its feed per operation polls every {poll_ms} ms, `watch_poll_ms`; no in-process bus \
         wakes it: that is the path every replica but the running one takes). Watchers: tonic streams, \
         {STREAMS_PER_CONNECTION} per HTTP/2 connection, resuming from the operation's current \
         sequence. Latency: the writer's transaction returned → the watcher received the \
         event (same clock), live events only. Store reads: DynamoDB GetItem/Query/Scan the \
         server sent, counted by the relay.\n",
        interval.as_millis()
    );
    println!(
        "| watchers | measured s | deliveries | p50 ms | p99 ms | store reads/s | mean read ms | server CPU (cores) | client CPU (cores) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, phase) in phases.iter().enumerate() {
        let (count, p50, p99) = match i {
            0 => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
            i => {
                let list = &latencies[i - 1];
                (
                    list.len().to_string(),
                    format!("{:.1}", percentile_ms(list, 50.0)),
                    format!("{:.1}", percentile_ms(list, 99.0)),
                )
            }
        };
        let (reads, read_time) = phase.calls.total(is_read);
        println!(
            "| {} | {:.1} | {count} | {p50} | {p99} | {:.1} | {:.1} | {:.2} | {:.2} |",
            phase.watchers,
            phase.seconds,
            phase.reads as f64 / phase.seconds,
            read_time.as_secs_f64() * 1000.0 / reads.max(1) as f64,
            phase.server_cpu,
            phase.client_cpu,
        );
    }
    println!();
    for (n, took, reads) in &opening {
        println!(
            "- opening {n} streams (no events meanwhile) took {:.1} s and {reads} store reads ({:.2} per stream)",
            took.as_secs_f64(),
            *reads as f64 / *n as f64
        );
    }
    for phase in &phases {
        let labels: Vec<String> = phase
            .calls
            .calls
            .iter()
            .map(|(label, (n, _))| format!("{label} {n}"))
            .collect();
        println!(
            "- calls with {} watchers over {:.1} s: {}",
            phase.watchers,
            phase.seconds,
            labels.join(", ")
        );
    }
    let last = rss_phase.last().map_or((0, rss_idle), |&(n, kib)| (n, kib));
    println!(
        "- server VmRSS: idle {:.1} MiB; {}; peak (VmHWM) {:.1} MiB",
        rss_idle as f64 / 1024.0,
        rss_phase
            .iter()
            .map(|(n, kib)| format!("with {n} streams {:.1} MiB", *kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", "),
        rss_hwm as f64 / 1024.0,
    );
    if last.0 > 0 {
        println!(
            "- memory per stream: {:.1} KiB ((VmRSS with {} streams − idle) / {}; goal < 20 KiB)",
            last.1.saturating_sub(rss_idle) as f64 / last.0 as f64,
            last.0,
            last.0
        );
    }
    if !failures.is_empty() {
        println!(
            "- {} watchers failed, first: {}",
            failures.len(),
            failures[0]
        );
    }
}
