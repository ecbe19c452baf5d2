//! `make bench`, part 4: the footprint of `instance-manager serve`.
//!
//! Spawns the binary given with `--binary PATH` against moto (`IM_TEST_AWS_ENDPOINT`, a fresh
//! table), measures the time from exec to `grpc.health.v1.Health/Check` answering SERVING
//! (polled every 5 ms with a deadline), then reads the process's VmRSS at that moment and
//! again after a second idle; the binary's size, and its stripped size when `strip` exists.
//! Three start-ups; prints a Markdown section. It asserts nothing about time. Without
//! `--bench` (as `cargo test --all-targets` would run it) it only says so and exits.

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/serve.rs"]
mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use instance_manager::store::dynamo::DynamoStore;
use serve::Server;

const STARTS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(60);

/// A `kB` field of /proc/PID/status, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    serve::status_kib(pid, field) as f64 / 1024.0
}

struct Start {
    to_serving: Duration,
    rss_serving_mib: f64,
    rss_idle_mib: f64,
}

async fn start_once(binary: &Path, endpoint: &str, table: &str, dir: &Path, n: usize) -> Start {
    let log = dir.join(format!("serve-{n}.log"));
    let started = Instant::now();
    let mut command = Command::new(binary);
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--aws-endpoint", endpoint, "--table", table])
        .env("IM_AUTH_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (server, _) = Server::start(command, &log, Duration::from_millis(5), DEADLINE).await;
    let to_serving = started.elapsed();
    let pid = server.0.id();
    let rss_serving_mib = status_mib(pid, "VmRSS:");
    // Idle: nothing calls it for a second (its background loops still tick).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle_mib = status_mib(pid, "VmRSS:");
    drop(server);
    Start {
        to_serving,
        rss_serving_mib,
        rss_idle_mib,
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The stripped size of a copy of `binary`, if `strip` runs here.
fn stripped_size(binary: &Path, dir: &Path) -> Option<u64> {
    let copy: PathBuf = dir.join("instance-manager.stripped");
    std::fs::copy(binary, &copy).ok()?;
    let status = Command::new("strip").arg(&copy).status().ok()?;
    if !status.success() {
        return None;
    }
    std::fs::metadata(&copy).ok().map(|m| m.len())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("footprint: a benchmark, run by `make bench` (pass --bench to run it)");
        return;
    }
    let binary = args
        .iter()
        .position(|a| a == "--binary")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .expect("--binary PATH of instance-manager");
    let endpoint = std::env::var("IM_TEST_AWS_ENDPOINT").expect("IM_TEST_AWS_ENDPOINT");
    let dir = tempfile::tempdir().expect("temp dir");

    // The server answers NOT_SERVING until its table answers: create it first.
    let sdk = sdk::moto_sdk_config(&endpoint).await;
    let table = format!(
        "footprint-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), table.clone())
        .ensure_table()
        .await
        .expect("create table");

    let mut starts = Vec::new();
    for n in 0..STARTS {
        eprintln!("footprint: start-up {}", n + 1);
        starts.push(start_once(&binary, &endpoint, &table, dir.path(), n).await);
    }
    let size = std::fs::metadata(&binary).expect("binary size").len();
    let stripped = stripped_size(&binary, dir.path());

    println!("## 4. Footprint\n");
    println!(
        "`instance-manager serve` on DynamoDB (moto), no environments configured, authentication \
         disabled; {STARTS} start-ups. Exec to SERVING includes the table check against moto.\n"
    );
    println!("| start-up | exec to SERVING ms | VmRSS at SERVING MiB | VmRSS after 1 s idle MiB |");
    println!("|---:|---:|---:|---:|");
    for (n, start) in starts.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.1} | {:.1} |",
            n + 1,
            start.to_serving.as_secs_f64() * 1000.0,
            start.rss_serving_mib,
            start.rss_idle_mib
        );
    }
    let mut times: Vec<f64> = starts.iter().map(|s| s.to_serving.as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    println!(
        "\nMedian exec to SERVING: {:.0} ms. Binary `{}`: {:.1} MiB{}.",
        times[times.len() / 2] * 1000.0,
        binary.file_name().unwrap_or_default().display(),
        mib(size),
        match stripped {
            Some(bytes) => format!(", stripped {:.1} MiB", mib(bytes)),
            None => " (strip not available)".to_owned(),
        }
    );
}
