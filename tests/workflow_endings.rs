//! How operations end when things go wrong, in process, on moto and MariaDB: a failed undo
//! and a passed deadline end STUCK (and a retry finishes the job without duplicates), a
//! throttled AWS call is retried until it goes through, and a replica runs no more
//! operations at once than it has workers.

mod common;
mod platform;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use instance_manager::domain::{Environment, Operation};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use instance_manager::workflow::{StepError, StepHook, StepResult};
use platform::{inventory, metadata, provisioned};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};

fn status(operation: &lro::Operation) -> v1::OperationStatus {
    metadata(operation).status()
}

/// The `ErrorInfo.reason` of a finished operation's error.
fn error_reason(operation: &lro::Operation) -> String {
    let Some(lro::operation::Result::Error(error)) = &operation.result else {
        panic!("no error in {operation:?}")
    };
    error
        .details
        .iter()
        .find(|d| d.type_url.ends_with("google.rpc.ErrorInfo"))
        .map(|d| {
            tonic_types::pb::ErrorInfo::decode(d.value.as_slice())
                .unwrap()
                .reason
        })
        .expect("ErrorInfo")
}

fn step_status(operation: &lro::Operation, step: &str) -> v1::StepStatus {
    metadata(operation)
        .steps
        .iter()
        .find(|s| s.name == step)
        .unwrap_or_else(|| panic!("no step {step}"))
        .status()
}

async fn retry(cp: &mut platform::Client, operation: &str) {
    cp.instances
        .retry_operation(v1::RetryOperationRequest {
            name: operation.into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
}

/// Fails the `service` step, then the undo of the `secret` step, once each.
#[derive(Default)]
struct UndoFails {
    fired: Mutex<HashSet<&'static str>>,
}

#[async_trait]
impl StepHook for UndoFails {
    async fn before(&self, _: &Operation, step: &str) -> StepResult<()> {
        if step == "service" && self.fired.lock().unwrap().insert("service") {
            return Err(StepError::Fatal("injected failure in service".into()));
        }
        Ok(())
    }
    async fn before_undo(&self, _: &Operation, step: &str) -> StepResult<()> {
        if step == "secret" && self.fired.lock().unwrap().insert("undo secret") {
            return Err(StepError::Fatal("injected failure undoing secret".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_undo_ends_stuck_and_a_retry_completes_without_duplicates() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, Some(Arc::new(UndoFails::default()))).await;
    let tenant = platform::tenant("undo");
    let operation = cp.create(&tenant, v1::Environment::Dev).await;
    let (events, stuck) = cp.watch(&operation.name).await;
    assert_eq!(status(&stuck), v1::OperationStatus::Stuck, "{events:#?}");
    assert_eq!(error_reason(&stuck), "UNDO_FAILED");
    assert!(
        cp.engine
            .render_metrics()
            .lines()
            .any(|l| l == "im_operations_stuck_total{reason=\"UNDO_FAILED\",verb=\"create\"} 1"),
        "{}",
        cp.engine.render_metrics()
    );
    assert_eq!(step_status(&stuck, "secret"), v1::StepStatus::UndoFailed);
    assert_eq!(step_status(&stuck, "access_point"), v1::StepStatus::Undone);
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("secret: undo failed")),
        "{events:#?}"
    );
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Failed
    );
    // Everything else was undone; the secret is what is left for an operator.
    let cloud = cp.cloud(Environment::Dev).await;
    let left = inventory(&cloud, &tenant).await;
    assert_eq!(
        left,
        platform::Inventory {
            secrets: 1,
            ..Default::default()
        }
    );

    retry(&mut cp, &operation.name).await;
    let (events, done) = cp
        .watch_from(&operation.name, events.len() as i64 + 1)
        .await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(inventory(&cloud, &tenant).await, provisioned(true));
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Active
    );
}

/// A rollout that never converges.
struct NeverSteady;

#[async_trait]
impl StepHook for NeverSteady {
    async fn before(&self, _: &Operation, step: &str) -> StepResult<()> {
        if step == "wait_steady" {
            return Err(StepError::NotYet("injected: rollout in progress".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_passed_deadline_ends_stuck_and_leaves_resources_for_a_retry() {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    let normal = config.clone();
    // Long enough for every step before `wait_steady` even on a loaded machine.
    config.provision_deadline_secs = 15;
    let mut cp = platform::start(config, Some(Arc::new(NeverSteady))).await;
    let tenant = platform::tenant("late");
    let operation = cp.create(&tenant, v1::Environment::Dev).await;
    let (events, stuck) = cp.watch(&operation.name).await;
    assert_eq!(status(&stuck), v1::OperationStatus::Stuck, "{events:#?}");
    assert_eq!(error_reason(&stuck), "DEADLINE_EXCEEDED");
    assert_eq!(
        cp.engine.metrics().value(
            "im_operations_stuck_total",
            &[("verb", "create"), ("reason", "DEADLINE_EXCEEDED")]
        ),
        1
    );
    assert_eq!(step_status(&stuck, "wait_steady"), v1::StepStatus::Failed);
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Failed
    );
    // Nothing is undone at a deadline: the resources stay for an operator or a retry.
    let cloud = cp.cloud(Environment::Dev).await;
    assert_eq!(inventory(&cloud, &tenant).await, provisioned(true));

    // The operator restarts the replica with the normal deadline and retries.
    cp.shutdown.cancel();
    let mut cp = platform::start(normal, None).await;
    retry(&mut cp, &operation.name).await;
    let (events, done) = cp
        .watch_from(&operation.name, events.len() as i64 + 1)
        .await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(metadata(&done).attempt, 2);
    assert_eq!(inventory(&cloud, &tenant).await, provisioned(true));
}

/// An HTTP relay to moto that answers the first `failures` requests carrying `marker` (a
/// lower-case header line) with a ThrottlingException, as AWS does under load, and relays
/// every other request. Each connection carries one request (`Connection: close`), so
/// every request is looked at.
async fn throttling_proxy(
    target: String,
    marker: &'static str,
    failures: usize,
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let target = target.trim_start_matches("http://").to_owned();
    let throttled = Arc::new(AtomicUsize::new(0));
    let count = throttled.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Some((head, body)) = read_request(&mut client).await else {
                    return;
                };
                let lower = head.to_ascii_lowercase();
                if lower.contains(marker)
                    && count
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n < failures).then_some(n + 1)
                        })
                        .is_ok()
                {
                    let body = r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#;
                    let response = format!(
                        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: throttled\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = client.write_all(response.as_bytes()).await;
                    let _ = client.shutdown().await;
                    return;
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let head: String = head
                    .split("\r\n")
                    .filter(|line| !line.to_ascii_lowercase().starts_with("connection:"))
                    .map(|line| format!("{line}\r\n"))
                    .collect();
                let request = [
                    head.trim_end_matches("\r\n").as_bytes(),
                    b"\r\nConnection: close\r\n\r\n",
                    &body,
                ]
                .concat();
                if upstream.write_all(&request).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut upstream, &mut client).await;
                let _ = client.shutdown().await;
            });
        }
    });
    (format!("http://{address}"), throttled)
}

/// One HTTP/1.1 request: its head (request line and headers, without the blank line) and
/// its body (by Content-Length).
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let length: usize = head
        .split("\r\n")
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buffer[end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

#[tokio::test]
async fn a_throttled_aws_call_is_retried_until_it_goes_through() {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    // More throttles than the SDK's own attempts (3): the engine must retry the step.
    let (endpoint, throttled) = throttling_proxy(
        common::aws_endpoint(),
        "x-amz-target: secretsmanager.createsecret",
        4,
    )
    .await;
    config.environments[0].endpoint = Some(endpoint);
    let mut cp = platform::start(config, None).await;
    let tenant = platform::tenant("throttled");
    let operation = cp.create(&tenant, v1::Environment::Dev).await;
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(throttled.load(Ordering::SeqCst), 4);
    let retried: Vec<_> = events
        .iter()
        .filter(|e| e.step == "secret" && e.message.contains("retrying after"))
        .collect();
    assert!(
        !retried.is_empty() && retried[0].message.contains("ThrottlingException"),
        "{events:#?}"
    );
    let secret = metadata(&done)
        .steps
        .into_iter()
        .find(|s| s.name == "secret")
        .unwrap();
    assert!(secret.attempts >= 2, "{secret:?}");
    assert!(
        cp.engine.metrics().value(
            "im_step_retries_total",
            &[("verb", "create"), ("step", "secret")]
        ) >= 1
    );
    assert_eq!(
        inventory(&cp.cloud(Environment::Dev).await, &tenant).await,
        provisioned(true)
    );
}

/// Holds every operation at its first step until opened, counting how many wait at once.
struct Turnstile {
    open: watch::Sender<bool>,
    inside: AtomicUsize,
    most: AtomicUsize,
    arrived: Notify,
}

#[async_trait]
impl StepHook for Turnstile {
    async fn before(&self, _: &Operation, step: &str) -> StepResult<()> {
        if step != "access_point" {
            return Ok(());
        }
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.arrived.notify_one();
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
        self.inside.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_replica_runs_at_most_its_workers_at_once() {
    let mut config = platform::config_with_platforms(&[Environment::Sit]).await;
    config.workers = 2;
    let turnstile = Arc::new(Turnstile {
        open: watch::Sender::new(false),
        inside: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
        arrived: Notify::new(),
    });
    let cp = platform::start(config, Some(turnstile.clone())).await;
    let tenants: Vec<String> = (0..5).map(|_| platform::tenant("bounded")).collect();
    let mut operations = Vec::new();
    for tenant in &tenants {
        operations.push(cp.client().create(tenant, v1::Environment::Sit).await.name);
    }
    while turnstile.inside.load(Ordering::SeqCst) < 2 {
        turnstile.arrived.notified().await;
    }
    // Let the claim loop look for work a few more times with every slot busy.
    let mut rounds = cp.engine.claim_rounds();
    let seen = *rounds.borrow_and_update();
    rounds.wait_for(|r| *r >= seen + 3).await.unwrap();
    assert_eq!(cp.engine.running(), 2);
    assert_eq!(turnstile.inside.load(Ordering::SeqCst), 2);
    let mut waiting = 0;
    for name in &operations {
        let operation = cp
            .client()
            .operations
            .get_operation(lro::GetOperationRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        if status(&operation) == v1::OperationStatus::Pending {
            waiting += 1;
        }
    }
    assert_eq!(waiting, 3, "three operations wait for a worker");

    turnstile.open.send_replace(true);
    for name in &operations {
        let (events, done) = cp.client().watch(name).await;
        assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    }
    assert_eq!(turnstile.most.load(Ordering::SeqCst), 2);
}
