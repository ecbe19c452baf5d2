//! How operations end when things go wrong, in process, on moto and MariaDB: a failed undo
//! and a passed deadline end STUCK (and a retry finishes the job without duplicates), a
//! throttled AWS call is retried until it goes through, and a replica runs no more
//! operations at once than it has workers.

mod common;
mod platform;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use async_trait::async_trait;
use instance_manager::domain::spec::SpecInput;
use instance_manager::domain::{
    Backup, BackupName, Environment, Instance, InstanceId, InstanceName, InstanceSpec, Operation,
    OperationEvent, OperationId, OperationStatus, RequestId, ScaleBounds, StepStatus, TenantId,
    Timestamp, Verb,
};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use instance_manager::store::{
    BackupCursor, DomainClaim, Guard, InstanceCursor, InstanceQuery, OperationCursor,
    OperationQuery, Page, PriorityClaim, RequestRecord, StateStore, StoreError, StoreResult, Write,
};
use instance_manager::workflow::{EngineOptions, ManualClock, StepError, StepHook, StepResult};
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
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    // The engine's clock is ours: the deadline passes when the test says so, not after a
    // wall-clock wait.
    let clock = ManualClock::new();
    let options = EngineOptions {
        hook: Some(Arc::new(NeverSteady)),
        clock: clock.clone(),
    };
    let mut cp = platform::start_with(config.clone(), options, |store| store, None).await;
    let tenant = platform::tenant("late");
    let operation = cp.create(&tenant, v1::Environment::Dev).await;
    // Every step before `wait_steady` finishes; then the rollout never converges.
    cp.wait_for_step(&operation.name, "wait_steady", v1::StepStatus::Running)
        .await;
    clock.advance(Duration::from_secs(config.provision_deadline_secs + 1));

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

    // The operator fixes the rollout (a replica without the fault) and retries.
    cp.shutdown.cancel();
    let mut cp = platform::start(config, None).await;
    retry(&mut cp, &operation.name).await;
    let (events, done) = cp
        .watch_from(&operation.name, events.len() as i64 + 1)
        .await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(metadata(&done).attempt, 2);
    assert_eq!(inventory(&cloud, &tenant).await, provisioned(true));
}

/// A state store that refuses, as a permanent error (DynamoDB's ValidationException), the
/// write that records the `service` step of `tenant`'s operation as done.
struct RejectingStore {
    inner: Arc<dyn StateStore>,
    tenant: String,
    rejected: AtomicUsize,
}

#[async_trait]
impl StateStore for RejectingStore {
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn get_instance(&self, name: &InstanceName) -> StoreResult<Option<Instance>> {
        self.inner.get_instance(name).await
    }
    async fn list_instances(
        &self,
        query: &InstanceQuery,
    ) -> StoreResult<Page<Instance, InstanceCursor>> {
        self.inner.list_instances(query).await
    }
    async fn get_guard(&self, tenant: &TenantId, env: Environment) -> StoreResult<Option<Guard>> {
        self.inner.get_guard(tenant, env).await
    }
    async fn get_domain_claim(&self, domain: &str) -> StoreResult<Option<DomainClaim>> {
        self.inner.get_domain_claim(domain).await
    }
    async fn get_operation(&self, id: &OperationId) -> StoreResult<Option<Operation>> {
        self.inner.get_operation(id).await
    }
    async fn list_operations(
        &self,
        query: &OperationQuery,
    ) -> StoreResult<Page<Operation, OperationCursor>> {
        self.inner.list_operations(query).await
    }
    async fn read_events(
        &self,
        operation: &OperationId,
        from_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<OperationEvent>> {
        self.inner.read_events(operation, from_seq, limit).await
    }
    async fn get_request(
        &self,
        request_id: &RequestId,
        now: Timestamp,
    ) -> StoreResult<Option<RequestRecord>> {
        self.inner.get_request(request_id, now).await
    }
    async fn runnable_operations(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> StoreResult<Vec<Operation>> {
        self.inner.runnable_operations(now, limit).await
    }
    async fn listener_priorities(&self, listener_arn: &str) -> StoreResult<Vec<PriorityClaim>> {
        self.inner.listener_priorities(listener_arn).await
    }
    async fn record_audit_event(
        &self,
        event: &instance_manager::domain::AuditEvent,
    ) -> StoreResult<()> {
        self.inner.record_audit_event(event).await
    }
    async fn list_audit_events(
        &self,
        query: &instance_manager::store::AuditQuery,
    ) -> StoreResult<
        instance_manager::store::Page<
            instance_manager::domain::AuditEvent,
            instance_manager::store::AuditCursor,
        >,
    > {
        self.inner.list_audit_events(query).await
    }
    async fn get_backup(&self, name: &BackupName) -> StoreResult<Option<Backup>> {
        self.inner.get_backup(name).await
    }
    async fn list_backups(
        &self,
        instance: &InstanceName,
        after: Option<&BackupCursor>,
        limit: usize,
    ) -> StoreResult<Page<Backup, BackupCursor>> {
        self.inner.list_backups(instance, after, limit).await
    }
    async fn expired_backups(&self, now: Timestamp, limit: usize) -> StoreResult<Vec<Backup>> {
        self.inner.expired_backups(now, limit).await
    }
    async fn commit(&self, writes: Vec<Write>) -> StoreResult<()> {
        let poisoned = writes.iter().any(|write| match write {
            Write::UpdateOperation(op) => {
                op.target.tenant.as_str() == self.tenant
                    && op.status == OperationStatus::InProgress
                    && op
                        .steps
                        .iter()
                        .any(|s| s.name == "service" && s.status == StepStatus::Succeeded)
            }
            _ => false,
        });
        if poisoned {
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Internal(
                "ValidationException: Item size has exceeded the maximum allowed size".into(),
            ));
        }
        self.inner.commit(writes).await
    }
}

#[tokio::test]
async fn a_write_the_store_always_rejects_ends_stuck_instead_of_looping() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let poisoned = platform::tenant("poison");
    let rejecting = Arc::new(std::sync::OnceLock::<Arc<RejectingStore>>::new());
    let slot = rejecting.clone();
    let tenant = poisoned.clone();
    let mut cp = platform::start_with(
        config,
        EngineOptions::default(),
        move |inner| {
            let store = Arc::new(RejectingStore {
                inner,
                tenant,
                rejected: AtomicUsize::new(0),
            });
            let _ = slot.set(store.clone());
            store
        },
        None,
    )
    .await;
    let operation = cp.create(&poisoned, v1::Environment::Sit).await;
    let (events, stuck) = cp.watch(&operation.name).await;
    assert_eq!(status(&stuck), v1::OperationStatus::Stuck, "{events:#?}");
    assert_eq!(error_reason(&stuck), "STORE_REJECTED");
    assert_eq!(
        cp.engine.metrics().value(
            "im_operations_stuck_total",
            &[("verb", "create"), ("reason", "STORE_REJECTED")]
        ),
        1
    );
    assert_eq!(
        cp.instance(&poisoned).await.state(),
        v1::InstanceState::Failed
    );
    // One rejection, no retry loop: the write can never succeed, so it is not retried.
    assert_eq!(rejecting.get().unwrap().rejected.load(Ordering::SeqCst), 1);
    // The replica goes on with other work.
    let other = platform::tenant("healthy");
    let operation = cp.create(&other, v1::Environment::Sit).await;
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
}

#[tokio::test]
async fn operations_that_cannot_run_do_not_starve_the_others() {
    let mut config = platform::config_with_platforms(&[Environment::Sit]).await;
    config.workers = 2;
    let mut cp = platform::start(config, None).await;
    let now = Timestamp::now();
    // Four times the workers' worth of operations on instances that do not exist, and one
    // for an instance in an environment this deployment does not serve: before any real
    // work, and each one oldest first in the claim order.
    let mut missing = Vec::new();
    for i in 0..8 {
        let target = InstanceName::new(
            TenantId::parse(&platform::tenant("ghost")).unwrap(),
            InstanceId::parse(&format!("wp{i}")).unwrap(),
        );
        let operation = Operation::new(Verb::Create, target, Vec::new(), None, now);
        missing.push(operation.id.clone());
        cp.store
            .commit(vec![Write::CreateOperation(operation)])
            .await
            .unwrap();
    }
    let elsewhere = InstanceName::new(
        TenantId::parse(&platform::tenant("prod")).unwrap(),
        InstanceId::parse("wp").unwrap(),
    );
    let spec = InstanceSpec::parse(
        SpecInput {
            environment: Some(Environment::Prod),
            organization_name: "Elsewhere Ltd".into(),
            contact_email: "ops@example.com".into(),
            ..SpecInput::default()
        },
        ScaleBounds::default(),
    )
    .unwrap();
    let parked = Operation::new(Verb::Create, elsewhere.clone(), Vec::new(), None, now);
    cp.store
        .commit(vec![
            Write::CreateInstance(Instance::new_pending(
                elsewhere,
                spec,
                parked.id.clone(),
                now,
            )),
            Write::CreateOperation(parked.clone()),
        ])
        .await
        .unwrap();

    // Real work still gets done.
    let tenant = platform::tenant("real");
    let operation = cp.create(&tenant, v1::Environment::Sit).await;
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");

    // The ones without a target ended FAILED with the reason; the other waits, parked.
    for id in &missing {
        let stored = cp.store.get_operation(id).await.unwrap().unwrap();
        assert_eq!(stored.status, OperationStatus::Failed, "{stored:?}");
        assert_eq!(stored.error.unwrap().reason, "TARGET_MISSING");
    }
    let stored = cp.store.get_operation(&parked.id).await.unwrap().unwrap();
    assert_eq!(stored.status, OperationStatus::Pending);
    let lease = stored.lease.expect("parked with a lease nobody renews");
    assert!(lease.owner.starts_with("parked-by-"), "{lease:?}");
    assert!(lease.expires_at > now, "{lease:?}");
    let events = cp.store.read_events(&parked.id, 0, 10).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("the environment is unavailable")),
        "{events:#?}"
    );
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

/// Holds the `service` step of every deletion until the replica shuts down.
struct HoldDeleteService {
    reached: Notify,
}

#[async_trait]
impl StepHook for HoldDeleteService {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if operation.verb == Verb::Delete && step == "service" {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_resumed_operation_runs_its_persisted_plan_not_the_live_configuration() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    assert!(config.environments[0].platform.cognito_enabled);
    let hold = Arc::new(HoldDeleteService {
        reached: Notify::new(),
    });
    let mut cp = platform::start(config.clone(), Some(hold.clone())).await;
    let tenant = platform::tenant("plan");
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    let (events, done) = cp.watch(&created.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    let cloud = cp.cloud(Environment::Dev).await;
    assert_eq!(inventory(&cloud, &tenant).await, provisioned(true));

    let deleted = cp.delete_skipping_archive(&tenant).await;
    hold.reached.notified().await;
    // The replica stops mid-deletion (its lease handed back), and the next one starts with
    // Cognito switched off for the environment.
    cp.shutdown.cancel();
    let mut flipped = config.clone();
    flipped.environments[0].platform.cognito_enabled = false;
    let mut cp = platform::start(flipped, None).await;
    let done = cp.completed(&deleted).await;
    assert_eq!(step_status(&done, "user_pool"), v1::StepStatus::Succeeded);
    // Counted on the original platform's view: the pool is gone, not orphaned.
    assert!(
        inventory(&cloud, &tenant).await.is_empty(),
        "{:?}",
        inventory(&cloud, &tenant).await
    );
}

/// Notifies `dropped` when the attempt holding it is dropped.
struct DropSignal<'a>(&'a Notify);

impl Drop for DropSignal<'_> {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// Holds the first attempt of `step` (of a create) until it is dropped.
struct HoldStep {
    step: &'static str,
    reached: Notify,
    dropped: Notify,
    held: AtomicUsize,
}

impl HoldStep {
    fn new(step: &'static str) -> Arc<Self> {
        Arc::new(Self {
            step,
            reached: Notify::new(),
            dropped: Notify::new(),
            held: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl StepHook for HoldStep {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if operation.verb == Verb::Create
            && step == self.step
            && self.held.fetch_add(1, Ordering::SeqCst) == 0
        {
            let _signal = DropSignal(&self.dropped);
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// How long a held attempt may take to be dropped: a lease renewal (a third of the lease)
/// plus slack for a loaded machine.
const DROP_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_cancel_request_drops_the_attempt_in_flight_and_rolls_back() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let hold = HoldStep::new("service");
    let mut cp = platform::start(config, Some(hold.clone())).await;
    let tenant = platform::tenant("cancel");
    let operation = cp.create(&tenant, v1::Environment::Sit).await;
    hold.reached.notified().await;
    cp.operations
        .cancel_operation(lro::CancelOperationRequest {
            name: operation.name.clone(),
        })
        .await
        .unwrap();
    tokio::time::timeout(DROP_LIMIT, hold.dropped.notified())
        .await
        .expect("the attempt in flight was not dropped after the cancel request");
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Cancelled, "{events:#?}");
    let cloud = cp.cloud(Environment::Sit).await;
    assert!(inventory(&cloud, &tenant).await.is_empty());
}

#[tokio::test]
async fn a_replica_that_lost_its_lease_stops_working_at_once() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let hold = HoldStep::new("service");
    let mut cp = platform::start(config, Some(hold.clone())).await;
    let tenant = platform::tenant("stolen");
    let operation = cp.create(&tenant, v1::Environment::Sit).await;
    hold.reached.notified().await;
    // Another replica takes the operation over (as after an expired lease).
    let id = OperationId::from_name(&operation.name).unwrap();
    let mut stolen = cp.store.get_operation(&id).await.unwrap().unwrap();
    stolen.lease = Some(instance_manager::domain::operation::Lease {
        owner: "another-replica".into(),
        expires_at: Timestamp::now().plus_millis(3_600_000),
    });
    cp.store
        .commit(vec![Write::UpdateOperation(stolen.clone())])
        .await
        .unwrap();
    tokio::time::timeout(DROP_LIMIT, hold.dropped.notified())
        .await
        .expect("the attempt in flight went on after the lease was lost");
    // And this replica writes nothing more to the operation: once its engine has stopped
    // (which waits for every execution to end), the stolen record is as the thief left it.
    cp.shutdown.cancel();
    cp.engine.clone().run(cp.shutdown.clone()).await;
    let stored = cp.store.get_operation(&id).await.unwrap().unwrap();
    assert_eq!(stored.version, stolen.version + 1, "{stored:#?}");
    assert_eq!(stored.lease.unwrap().owner, "another-replica");
}
