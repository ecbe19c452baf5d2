//! The `instance-manager serve` process of the footprint and watch benchmarks: spawned with
//! `--listen 127.0.0.1:0`, its address read from its log, ready once health says SERVING.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Kills the child when dropped (a benchmark that panics leaves no server behind).
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// Spawns `command` (its stderr going to `log`), then waits until it logged its address
    /// and health answers SERVING, polling every `poll`, for at most `deadline`.
    pub async fn start(
        mut command: Command,
        log: &Path,
        poll: Duration,
        deadline: Duration,
    ) -> (Server, SocketAddr) {
        let deadline = Instant::now() + deadline;
        let mut server = Server(
            command
                .stderr(std::fs::File::create(log).expect("log file"))
                .spawn()
                .expect("spawn instance-manager"),
        );
        let addr = loop {
            if let Some(addr) = logged_address(log) {
                break addr;
            }
            if let Ok(Some(status)) = server.0.try_wait() {
                panic!("server exited ({status}) before serving; log in {log:?}");
            }
            assert!(
                Instant::now() < deadline,
                "no address logged; log in {log:?}"
            );
            tokio::time::sleep(poll).await;
        };
        while !serving(addr).await {
            assert!(Instant::now() < deadline, "not SERVING; log in {log:?}");
            tokio::time::sleep(poll).await;
        }
        (server, addr)
    }
}

/// The address the server logged it serves on (`--listen 127.0.0.1:0` binds its own port).
fn logged_address(log: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter(|line| line.contains("serving gRPC"))
        .find_map(|line| {
            let start = line
                .find("address=")
                .map(|i| i + "address=".len())
                .or_else(|| line.find("\"address\":\"").map(|i| i + 11))?;
            let rest = &line[start..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '"' || c == ',')
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
}

async fn serving(addr: SocketAddr) -> bool {
    let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

/// A `kB` field of /proc/PID/status (0 when unreadable).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
