//! The engine: claims runnable operations under a lease, runs their workflows step by step,
//! records every outcome before moving on, retries transient failures with capped
//! exponential backoff and jitter, and undoes completed steps when one fails for good.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cloud::{CloudEnv, CloudResult};
use crate::domain::naming::ResourceNames;
use crate::domain::operation::{Lease, OperationError, StepStatus};
use crate::domain::{
    Environment, Instance, InstanceState, Operation, OperationEvent, OperationId, OperationStatus,
    Step, Timestamp, Verb,
};
use crate::metrics::{self, Gauges, Metrics};
use crate::store::{Guard, StateStore, StoreError, Write};

use super::{EventBus, StepCtx, StepError, StepHook, TagSettings, Workflow, workflow_for};

/// Gives a workflow the adapters of an environment, with credentials for one operation.
#[async_trait]
pub trait CloudResolver: Send + Sync {
    async fn resolve(
        &self,
        environment: Environment,
        operation: &OperationId,
    ) -> CloudResult<CloudEnv>;
}

#[async_trait]
impl CloudResolver for crate::cloud::accounts::Accounts {
    async fn resolve(
        &self,
        environment: Environment,
        operation: &OperationId,
    ) -> CloudResult<CloudEnv> {
        self.for_operation(environment, operation.as_str()).await
    }
}

#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub replica_id: String,
    pub workers: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    /// Attempts of a step on transient errors before it fails.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Pause between polls of a converging step (rollouts, tasks).
    pub converge_interval: Duration,
    pub tags: TagSettings,
    /// Deadlines per verb that replace the workflow's own (from the configuration).
    pub deadlines: Vec<(Verb, Duration)>,
}

impl EngineSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        let mut settings = Self::new(config.replica_id());
        settings.workers = config.workers as usize;
        settings.lease = Duration::from_secs(config.lease_secs);
        settings.poll_interval = Duration::from_millis(config.poll_interval_ms);
        settings.tags = TagSettings {
            prefix: config.tag_prefix.clone(),
            project: config.project.clone(),
        };
        settings.deadlines = vec![
            (
                Verb::Create,
                Duration::from_secs(config.provision_deadline_secs),
            ),
            (
                Verb::Delete,
                Duration::from_secs(config.deprovision_deadline_secs),
            ),
        ];
        settings
    }

    pub fn new(replica_id: impl Into<String>) -> Self {
        Self {
            replica_id: replica_id.into(),
            workers: 10,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            max_attempts: 6,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(10),
            converge_interval: Duration::from_secs(1),
            tags: TagSettings {
                prefix: "bbws".into(),
                project: "bbws-wordpress".into(),
            },
            deadlines: Vec::new(),
        }
    }

    /// How long one attempt of `workflow` may run.
    pub fn deadline(&self, workflow: &dyn Workflow) -> Duration {
        self.deadlines
            .iter()
            .find(|(verb, _)| *verb == workflow.verb())
            .map_or_else(|| workflow.deadline(), |(_, deadline)| *deadline)
    }
}

/// Capped exponential backoff with full jitter: a random delay in [0, min(cap, base·2^n)].
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << attempt.min(20))
        .min(cap)
        .as_millis()
        .max(1) as u64;
    Duration::from_millis(rand::random_range(0..=ceiling))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

pub struct Engine {
    store: Arc<dyn StateStore>,
    cloud: Arc<dyn CloudResolver>,
    settings: EngineSettings,
    bus: EventBus,
    wake: Arc<Notify>,
    slots: Arc<Semaphore>,
    hook: Option<Arc<dyn StepHook>>,
    /// How many times the claim loop has looked for work (for tests and diagnostics).
    rounds: tokio::sync::watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// Why an execution stopped early without finishing the operation.
#[derive(Debug)]
enum Interrupt {
    /// Another replica holds the operation now (our conditional write lost).
    LeaseLost,
    /// This replica is shutting down; the lease was handed back.
    Shutdown,
}

impl Engine {
    pub fn new(
        store: Arc<dyn StateStore>,
        cloud: Arc<dyn CloudResolver>,
        settings: EngineSettings,
        bus: EventBus,
    ) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(settings.workers.max(1))),
            store,
            cloud,
            settings,
            bus,
            wake: Arc::new(Notify::new()),
            hook: None,
            rounds: tokio::sync::watch::Sender::new(0),
            metrics: Metrics::new(),
        })
    }

    /// The same engine with a step hook (tests inject failures with it).
    pub fn with_hook(
        store: Arc<dyn StateStore>,
        cloud: Arc<dyn CloudResolver>,
        settings: EngineSettings,
        bus: EventBus,
        hook: Arc<dyn StepHook>,
    ) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(settings.workers.max(1))),
            store,
            cloud,
            settings,
            bus,
            wake: Arc::new(Notify::new()),
            hook: Some(hook),
            rounds: tokio::sync::watch::Sender::new(0),
            metrics: Metrics::new(),
        })
    }

    /// Wakes the claim loop early (a new operation was written by this replica).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    pub fn bus(&self) -> EventBus {
        self.bus.clone()
    }

    /// The engine's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Every metric of this engine in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(Gauges {
            running: self.running(),
            workers: self.settings.workers.max(1),
        })
    }

    /// Operations this replica is executing now.
    pub fn running(&self) -> usize {
        self.settings.workers.max(1) - self.slots.available_permits()
    }

    /// Counts the claim loop's rounds (each looks for work, or finds every slot busy).
    pub fn claim_rounds(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rounds.subscribe()
    }

    /// Claims and runs operations until `shutdown`; running executions stop at their next
    /// step boundary and hand their lease back, so another replica continues at once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(replica = %self.settings.replica_id, workers = self.settings.workers, "workflow engine started");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
            if let Err(error) = self.claim_round(&shutdown).await {
                tracing::warn!(%error, "cannot look for runnable operations");
            }
            self.rounds.send_modify(|rounds| *rounds += 1);
        }
        // Wait for executions to hand back their leases.
        let _ = self
            .slots
            .acquire_many(self.settings.workers.max(1) as u32)
            .await;
        tracing::info!("workflow engine stopped");
    }

    async fn claim_round(self: &Arc<Self>, shutdown: &CancellationToken) -> Result<(), StoreError> {
        let free = self.slots.available_permits();
        if free == 0 {
            return Ok(());
        }
        let candidates = self
            .store
            .runnable_operations(Timestamp::now(), free * 2)
            .await?;
        for operation in candidates {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                break;
            };
            let id = operation.id.clone();
            match self.claim(operation).await {
                Ok(Some(run)) => {
                    let engine = self.clone();
                    let shutdown = shutdown.clone();
                    let span = tracing::info_span!("operation", operation = %id, replica = %self.settings.replica_id);
                    tokio::spawn(engine.execute(run, permit, shutdown).instrument(span));
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(operation = %id, %error, "claim failed"),
            }
        }
        Ok(())
    }

    /// Takes the lease of `operation` with a conditional write; `None` when another replica
    /// won the race or the operation cannot run.
    async fn claim(&self, mut operation: Operation) -> Result<Option<Run>, StoreError> {
        let Some(workflow) = workflow_for(operation.verb) else {
            tracing::warn!(operation = %operation.id, verb = %operation.verb, "no workflow for verb");
            return Ok(None);
        };
        let Some(mut instance) = self.store.get_instance(&operation.target).await? else {
            tracing::error!(operation = %operation.id, "operation target is missing");
            return Ok(None);
        };
        let cloud = match self
            .cloud
            .resolve(instance.spec.environment, &operation.id)
            .await
        {
            Ok(cloud) => cloud,
            Err(error) => {
                // Leave it runnable: the environment may come back (credentials, network).
                tracing::warn!(operation = %operation.id, %error, "environment unavailable; not claiming");
                return Ok(None);
            }
        };
        let now = Timestamp::now();
        let resumed = operation.status == OperationStatus::InProgress;
        if !resumed {
            operation.status = OperationStatus::InProgress;
            operation.attempt += 1;
            operation.params["attempt_started_at"] = serde_json::json!(now.millis());
        }
        if operation.steps.is_empty() {
            operation.steps = workflow
                .plan(&operation, &instance, &cloud)
                .into_iter()
                .flatten()
                .map(Step::pending)
                .collect();
        }
        operation.lease = Some(Lease {
            owner: self.settings.replica_id.clone(),
            expires_at: now.plus_millis(millis(self.settings.lease)),
        });
        operation.updated_at = now;
        let message = if resumed {
            format!(
                "resumed by {} after the previous lease expired",
                self.settings.replica_id
            )
        } else {
            format!(
                "started by {} (attempt {})",
                self.settings.replica_id, operation.attempt
            )
        };
        let event = operation.next_event(now, None, message);
        let mut writes = vec![
            Write::UpdateOperation(operation.clone()),
            Write::AppendEvent(event.clone()),
        ];
        let running = workflow.states().running;
        let move_instance = instance.state != running;
        if move_instance {
            instance.state = running;
            instance.state_changed_at = now;
            instance.updated_at = now;
            instance.current_operation = Some(operation.id.clone());
            writes.push(Write::UpdateInstance(instance.clone()));
        }
        match self.store.commit(writes).await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. } | StoreError::Contention) => return Ok(None),
            Err(other) => return Err(other),
        }
        operation.version += 1;
        if move_instance {
            instance.version += 1;
        }
        self.bus.publish(event);
        self.metrics.increment(
            metrics::OPERATIONS_CLAIMED,
            &[
                ("verb", operation.verb.as_str()),
                ("resumed", if resumed { "true" } else { "false" }),
            ],
        );
        tracing::info!(operation = %operation.id, verb = %operation.verb, target = %operation.target, resumed, "operation claimed");
        let names = ResourceNames::derive(&instance.name.tenant, instance.spec.environment);
        Ok(Some(Run {
            workflow,
            cloud,
            names,
            state: Mutex::new(RunState {
                operation,
                instance,
            }),
        }))
    }

    async fn execute(
        self: Arc<Self>,
        run: Run,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let run = Arc::new(run);
        let lost = CancellationToken::new();
        let renewal = tokio::spawn(self.clone().renew_lease(run.clone(), lost.clone()));
        let outcome = self.drive(&run, &lost, &shutdown).await;
        renewal.abort();
        match outcome {
            Ok(()) => {}
            Err(Interrupt::LeaseLost) => {
                tracing::warn!("lease lost: another replica continues the operation")
            }
            Err(Interrupt::Shutdown) => {
                let released = self
                    .persist(&run, None, |op| {
                        if let Some(lease) = &mut op.lease {
                            lease.expires_at = Timestamp(0);
                        }
                    })
                    .await;
                tracing::info!(
                    released = released.is_ok(),
                    "shutting down: lease handed back"
                );
            }
        }
        drop(permit);
    }

    async fn renew_lease(self: Arc<Self>, run: Arc<Run>, lost: CancellationToken) {
        let every = self.settings.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let lease = self.settings.lease;
            let owner = self.settings.replica_id.clone();
            let renewed = self
                .persist(&run, None, |op| {
                    op.lease = Some(Lease {
                        owner: owner.clone(),
                        expires_at: Timestamp::now().plus_millis(millis(lease)),
                    });
                })
                .await;
            if renewed.is_err() {
                lost.cancel();
                return;
            }
        }
    }

    /// Writes a change of the operation (and optionally an event) conditionally on the
    /// version we hold. The only change anyone else may make to a leased operation is a
    /// cancel request (with its event); that is adopted and the write retried. Any other
    /// lost condition means the lease is gone.
    async fn persist(
        &self,
        run: &Run,
        message: Option<(Option<(&str, StepStatus)>, String)>,
        change: impl Fn(&mut Operation),
    ) -> Result<(), Interrupt> {
        let mut state = run.state.lock().await;
        for _ in 0..3 {
            let now = Timestamp::now();
            let mut next = state.operation.clone();
            change(&mut next);
            next.updated_at = now;
            let event = message
                .as_ref()
                .map(|(step, text)| next.next_event(now, *step, text.clone()));
            let mut writes = vec![Write::UpdateOperation(next.clone())];
            if let Some(event) = &event {
                writes.push(Write::AppendEvent(event.clone()));
            }
            match self.commit_with_retry(writes).await {
                Ok(()) => {
                    next.version += 1;
                    state.operation = next;
                    if let Some(event) = event {
                        self.bus.publish(event);
                    }
                    return Ok(());
                }
                Err(Interrupt::LeaseLost) => {
                    let stored = self
                        .store
                        .get_operation(&state.operation.id)
                        .await
                        .map_err(|_| Interrupt::LeaseLost)?;
                    // "Failed" may mean "happened, but the answer was lost" (the SDK retried
                    // a write that had landed, and the retry's condition failed).
                    next.version += 1;
                    if stored.as_ref() == Some(&next) {
                        state.operation = next;
                        if let Some(event) = event {
                            self.bus.publish(event);
                        }
                        return Ok(());
                    }
                    if !self.adopt(&mut state.operation, stored) {
                        return Err(Interrupt::LeaseLost);
                    }
                }
                Err(other) => return Err(other),
            }
        }
        Err(Interrupt::LeaseLost)
    }

    /// Takes over a cancel request written by the API while we hold the lease. Returns false
    /// when the stored operation changed in any other way (someone else owns it now).
    fn adopt(&self, ours: &mut Operation, stored: Option<Operation>) -> bool {
        let Some(stored) = stored else { return false };
        let still_ours = stored.status == OperationStatus::InProgress
            && stored
                .lease
                .as_ref()
                .is_some_and(|l| l.owner == self.settings.replica_id);
        if !still_ours || !stored.cancel_requested {
            return false;
        }
        ours.cancel_requested = true;
        ours.version = stored.version;
        ours.last_event_seq = stored.last_event_seq;
        true
    }

    async fn commit_with_retry(&self, writes: Vec<Write>) -> Result<(), Interrupt> {
        let mut attempt = 0;
        loop {
            match self.store.commit(writes.clone()).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. }) => return Err(Interrupt::LeaseLost),
                // Either nothing was written or (unavailable) it may have been: a retry of a
                // versioned write that landed fails its condition, which we then treat as a
                // lost lease — safe, since the lease expires and the work resumes.
                Err(error @ (StoreError::Unavailable(_) | StoreError::Contention))
                    if attempt < 5 =>
                {
                    tracing::warn!(%error, attempt, "state store write failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(backoff(
                        self.settings.backoff_base,
                        self.settings.backoff_cap,
                        attempt,
                    ))
                    .await;
                }
                Err(error) => {
                    tracing::error!(%error, "state store write failed");
                    return Err(Interrupt::LeaseLost);
                }
            }
        }
    }

    async fn snapshot(&self, run: &Run) -> StepCtx {
        let state = run.state.lock().await;
        StepCtx {
            operation: state.operation.clone(),
            instance: state.instance.clone(),
            cloud: run.cloud.clone(),
            store: self.store.clone(),
            names: run.names.clone(),
            tag_settings: self.settings.tags.clone(),
        }
    }

    fn deadline_passed(&self, run_op: &Operation, run: &Run) -> bool {
        let started = run_op
            .params
            .get("attempt_started_at")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(run_op.created_at.millis());
        Timestamp::now().millis()
            > started.saturating_add(millis(self.settings.deadline(run.workflow.as_ref())))
    }

    /// Runs the remaining stages, then finishes the operation one way or another.
    async fn drive(
        &self,
        run: &Run,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupt> {
        let stages = {
            let state = run.state.lock().await;
            run.workflow
                .plan(&state.operation, &state.instance, &run.cloud)
        };
        for stage in &stages {
            self.check_boundary(run, lost, shutdown).await?;
            if let Some(ending) = self.boundary_ending(run).await {
                return self.fail(run, ending).await;
            }
            let pending: Vec<&str> = {
                let state = run.state.lock().await;
                stage
                    .iter()
                    .copied()
                    .filter(|name| {
                        state.operation.steps.iter().any(|s| {
                            s.name == *name
                                && !matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped)
                        })
                    })
                    .collect()
            };
            let results = join_all(pending.iter().map(|name| self.run_step(run, name, lost))).await;
            let mut failure = None;
            for result in results {
                match result {
                    Ok(()) => {}
                    Err(StepOutcome::Interrupted(interrupt)) => return Err(interrupt),
                    Err(StepOutcome::Failed(ending)) => failure = failure.or(Some(ending)),
                }
            }
            if let Some(ending) = failure {
                return self.fail(run, ending).await;
            }
        }
        self.complete(run).await
    }

    async fn check_boundary(
        &self,
        run: &Run,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupt> {
        if lost.is_cancelled() {
            return Err(Interrupt::LeaseLost);
        }
        if shutdown.is_cancelled() {
            return Err(Interrupt::Shutdown);
        }
        // Cancellation is requested through the store (any replica may receive it): refresh.
        // The state stays locked while reading, so a lease renewal cannot slip in between
        // and make our copy look stale.
        let mut state = run.state.lock().await;
        let stored = self
            .store
            .get_operation(&state.operation.id)
            .await
            .map_err(|_| Interrupt::LeaseLost)?;
        match stored {
            Some(op) if op.version == state.operation.version => Ok(()),
            other => {
                if self.adopt(&mut state.operation, other) {
                    Ok(())
                } else {
                    Err(Interrupt::LeaseLost)
                }
            }
        }
    }

    /// A reason to stop before the next stage: a cancel request or a passed deadline.
    async fn boundary_ending(&self, run: &Run) -> Option<Ending> {
        let state = run.state.lock().await;
        if state.operation.cancel_requested {
            return Some(Ending::Cancelled);
        }
        if self.deadline_passed(&state.operation, run) {
            return Some(Ending::DeadlineExceeded);
        }
        None
    }

    async fn run_step(
        &self,
        run: &Run,
        name: &str,
        lost: &CancellationToken,
    ) -> Result<(), StepOutcome> {
        self.record_step(
            run,
            name,
            StepStatus::Running,
            format!("{name}: started"),
            |step| {
                step.status = StepStatus::Running;
                step.started_at = Some(Timestamp::now());
                step.error = None;
                step.attempts += 1;
            },
        )
        .await?;
        let mut transient_failures = 0;
        loop {
            if lost.is_cancelled() {
                return Err(StepOutcome::Interrupted(Interrupt::LeaseLost));
            }
            let ctx = self.snapshot(run).await;
            if self.deadline_passed(&ctx.operation, run) {
                self.mark_step_failed(run, name, "deadline exceeded")
                    .await?;
                return Err(StepOutcome::Failed(Ending::DeadlineExceeded));
            }
            let result = self.attempt(run, &ctx, name).await;
            match result {
                Ok(resource) => {
                    let text = match &resource {
                        Some(id) => format!("{name}: done ({id})"),
                        None => format!("{name}: done"),
                    };
                    return self
                        .record_step(run, name, StepStatus::Succeeded, text, |step| {
                            step.status = StepStatus::Succeeded;
                            step.ended_at = Some(Timestamp::now());
                            if resource.is_some() {
                                step.resource_id = resource.clone();
                            }
                        })
                        .await;
                }
                Err(StepError::NotYet(detail)) => {
                    tracing::debug!(step = name, %detail, "waiting");
                    tokio::time::sleep(self.settings.converge_interval).await;
                }
                Err(StepError::Transient(detail))
                    if transient_failures + 1 < self.settings.max_attempts =>
                {
                    transient_failures += 1;
                    let delay = backoff(
                        self.settings.backoff_base,
                        self.settings.backoff_cap,
                        transient_failures,
                    );
                    tracing::warn!(step = name, %detail, attempt = transient_failures, delay_ms = delay.as_millis() as u64, "transient failure; retrying");
                    self.metrics.increment(
                        metrics::STEP_RETRIES,
                        &[("verb", ctx.operation.verb.as_str()), ("step", name)],
                    );
                    let text = format!("{name}: retrying after: {detail}");
                    self.record_step(run, name, StepStatus::Running, text, |step| {
                        step.attempts += 1;
                    })
                    .await?;
                    tokio::time::sleep(delay).await;
                }
                Err(StepError::Transient(detail) | StepError::Fatal(detail)) => {
                    tracing::warn!(step = name, %detail, "step failed");
                    self.mark_step_failed(run, name, &detail).await?;
                    return Err(StepOutcome::Failed(Ending::StepFailed {
                        step: name.to_owned(),
                        detail,
                    }));
                }
            }
        }
    }

    async fn attempt(
        &self,
        run: &Run,
        ctx: &StepCtx,
        name: &str,
    ) -> Result<Option<String>, StepError> {
        if let Some(hook) = &self.hook {
            hook.before(&ctx.operation, name).await?;
        }
        let resource = run.workflow.run(ctx, name).await?;
        if let Some(hook) = &self.hook
            && let Err(error) = hook.after(&ctx.operation, name).await
        {
            // The action happened; remember what it made so the undo finds it.
            if let Some(id) = &resource {
                let _ = self
                    .persist(run, None, |op| {
                        if let Some(step) = op.steps.iter_mut().find(|s| s.name == name) {
                            step.resource_id = Some(id.clone());
                        }
                    })
                    .await;
            }
            return Err(error);
        }
        Ok(resource)
    }

    async fn mark_step_failed(
        &self,
        run: &Run,
        name: &str,
        detail: &str,
    ) -> Result<(), StepOutcome> {
        let text = format!("{name}: failed: {detail}");
        self.record_step(run, name, StepStatus::Failed, text, |step| {
            step.status = StepStatus::Failed;
            step.error = Some(detail.to_owned());
            step.ended_at = Some(Timestamp::now());
        })
        .await
    }

    /// Records a change of one step, with an event saying `text`.
    async fn record_step(
        &self,
        run: &Run,
        name: &str,
        status: StepStatus,
        text: String,
        edit: impl Fn(&mut Step),
    ) -> Result<(), StepOutcome> {
        self.persist(run, Some((Some((name, status)), text)), |op| {
            if let Some(step) = op.steps.iter_mut().find(|s| s.name == name) {
                edit(step);
            }
        })
        .await
        .map_err(StepOutcome::Interrupted)
    }

    /// Undoes every step that ran (or may have), newest first. Returns false if any undo
    /// failed for good.
    async fn roll_back(&self, run: &Run) -> Result<bool, Interrupt> {
        let steps: Vec<Step> = run.state.lock().await.operation.steps.clone();
        let mut clean = true;
        for step in steps.iter().rev() {
            if !matches!(
                step.status,
                StepStatus::Succeeded | StepStatus::Failed | StepStatus::Running
            ) {
                continue;
            }
            let name = step.name.as_str();
            let mut failures = 0;
            let outcome = loop {
                let ctx = self.snapshot(run).await;
                let resource = ctx.output(name).map(str::to_owned);
                let undone = match &self.hook {
                    Some(hook) => hook.before_undo(&ctx.operation, name).await,
                    None => Ok(()),
                };
                let undone = match undone {
                    Ok(()) => run.workflow.undo(&ctx, name, resource.as_deref()).await,
                    Err(error) => Err(error),
                };
                match undone {
                    Ok(()) => break Ok(()),
                    Err(StepError::NotYet(_)) => {
                        tokio::time::sleep(self.settings.converge_interval).await
                    }
                    Err(StepError::Transient(detail))
                        if failures + 1 < self.settings.max_attempts =>
                    {
                        failures += 1;
                        tracing::warn!(step = name, %detail, "undo failed; retrying");
                        tokio::time::sleep(backoff(
                            self.settings.backoff_base,
                            self.settings.backoff_cap,
                            failures,
                        ))
                        .await;
                    }
                    Err(StepError::Transient(detail) | StepError::Fatal(detail)) => {
                        break Err(detail);
                    }
                }
            };
            let (status, text) = match &outcome {
                Ok(()) => (StepStatus::Undone, format!("{name}: undone")),
                Err(detail) => {
                    clean = false;
                    (
                        StepStatus::UndoFailed,
                        format!("{name}: undo failed: {detail}"),
                    )
                }
            };
            let error = outcome.err();
            self.persist(run, Some((Some((name, status)), text)), |op| {
                if let Some(step) = op.steps.iter_mut().find(|s| s.name == name) {
                    step.status = status;
                    if let Some(detail) = &error {
                        step.error = Some(detail.clone());
                    }
                }
            })
            .await?;
        }
        Ok(clean)
    }

    async fn fail(&self, run: &Run, ending: Ending) -> Result<(), Interrupt> {
        let rolled_back = match ending {
            // A passed deadline leaves everything in place for an operator (or a retry).
            Ending::DeadlineExceeded => false,
            _ if run.workflow.rolls_back() => {
                self.persist(run, Some((None, "rolling back".into())), |_| {})
                    .await?;
                self.roll_back(run).await?
            }
            _ => false,
        };
        let (status, reason, message) = match &ending {
            Ending::DeadlineExceeded => (
                OperationStatus::Stuck,
                "DEADLINE_EXCEEDED",
                "the operation passed its deadline".to_owned(),
            ),
            _ if run.workflow.rolls_back() && !rolled_back => (
                OperationStatus::Stuck,
                "UNDO_FAILED",
                format!(
                    "{}; undoing it failed, so resources may remain",
                    ending.describe()
                ),
            ),
            Ending::Cancelled => (
                OperationStatus::Cancelled,
                "OPERATION_CANCELLED",
                "cancelled".to_owned(),
            ),
            Ending::StepFailed { .. } => {
                (OperationStatus::Failed, "STEP_FAILED", ending.describe())
            }
        };
        if status == OperationStatus::Stuck {
            let verb = run.workflow.verb();
            self.metrics.increment(
                metrics::OPERATIONS_STUCK,
                &[("verb", verb.as_str()), ("reason", reason)],
            );
            tracing::error!(metric = metrics::OPERATIONS_STUCK, reason, %message, "operation STUCK: needs attention");
        }
        // A clean rollback of a create leaves nothing: the (tenant, environment) slot is free.
        let release_guard = rolled_back
            && run.workflow.states().failure == InstanceState::Failed
            && run.workflow.rolls_back();
        self.finish(
            run,
            status,
            Some(OperationError {
                reason: reason.into(),
                message: message.clone(),
            }),
            |instance| {
                instance.state = if status == OperationStatus::Stuck {
                    InstanceState::Failed
                } else {
                    run.workflow.states().failure
                };
                instance.failure_reason = Some(message.clone());
                release_guard
            },
        )
        .await
    }

    async fn complete(&self, run: &Run) -> Result<(), Interrupt> {
        let outputs: Vec<(String, String)> = run
            .state
            .lock()
            .await
            .operation
            .steps
            .iter()
            .filter_map(|s| s.resource_id.clone().map(|id| (s.name.clone(), id)))
            .collect();
        let success = run.workflow.states().success;
        let domain = run.cloud.platform.domain.clone();
        self.finish(run, OperationStatus::Completed, None, |instance| {
            instance.state = success;
            instance.failure_reason = None;
            if success == InstanceState::Deprovisioned {
                instance.resources.clear();
                true
            } else {
                instance.resources.extend(outputs);
                if !domain.is_empty() {
                    instance.resources.insert(
                        "url".into(),
                        format!(
                            "https://{}",
                            ResourceNames::host(&instance.name.tenant, &domain)
                        ),
                    );
                }
                false
            }
        })
        .await
    }

    /// Ends the operation with `status`, updating the instance in the same transaction;
    /// `change` edits the instance and says whether to release the (tenant, environment) guard.
    async fn finish(
        &self,
        run: &Run,
        status: OperationStatus,
        error: Option<OperationError>,
        change: impl FnOnce(&mut Instance) -> bool,
    ) -> Result<(), Interrupt> {
        let mut state = run.state.lock().await;
        let now = Timestamp::now();
        let mut operation = state.operation.clone();
        operation.status = status;
        operation.error = error;
        operation.ended_at = Some(now);
        operation.updated_at = now;
        operation.lease = None;
        let text = match &operation.error {
            Some(error) => format!("{status}: {}", error.message),
            None => status.to_string(),
        };
        let event = operation.next_event(now, None, text);
        // The instance may have been re-read by the API in the meantime; start from the store.
        let mut instance = match self.store.get_instance(&state.instance.name).await {
            Ok(Some(instance)) => instance,
            _ => return Err(Interrupt::LeaseLost),
        };
        let release = change(&mut instance);
        instance.state_changed_at = now;
        instance.updated_at = now;
        instance.current_operation = None;
        let mut writes = vec![
            Write::UpdateOperation(operation.clone()),
            Write::AppendEvent(event.clone()),
            Write::UpdateInstance(instance.clone()),
        ];
        if release {
            writes.push(Write::ReleaseGuard(Guard {
                tenant: instance.name.tenant.clone(),
                environment: instance.spec.environment,
                instance: instance.name.instance.clone(),
            }));
        }
        if let Err(interrupt) = self.commit_with_retry(writes).await {
            // As in `persist`: the transaction may have landed with its answer lost.
            let mut landed = operation.clone();
            landed.version += 1;
            let stored = self.store.get_operation(&operation.id).await.ok().flatten();
            if stored != Some(landed) {
                return Err(interrupt);
            }
        }
        operation.version += 1;
        instance.version += 1;
        self.metrics.increment(
            metrics::OPERATIONS_FINISHED,
            &[
                ("verb", operation.verb.as_str()),
                ("status", status.as_str()),
            ],
        );
        tracing::info!(status = %status, instance_state = %instance.state, "operation finished");
        state.operation = operation;
        state.instance = instance;
        drop(state);
        self.bus.publish(event);
        Ok(())
    }
}

/// How a run ends when it does not complete.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Ending {
    StepFailed { step: String, detail: String },
    Cancelled,
    DeadlineExceeded,
}

impl Ending {
    fn describe(&self) -> String {
        match self {
            Ending::StepFailed { step, detail } => format!("step {step} failed: {detail}"),
            Ending::Cancelled => "cancelled".into(),
            Ending::DeadlineExceeded => "deadline exceeded".into(),
        }
    }
}

enum StepOutcome {
    Interrupted(Interrupt),
    Failed(Ending),
}

impl From<Interrupt> for StepOutcome {
    fn from(interrupt: Interrupt) -> Self {
        StepOutcome::Interrupted(interrupt)
    }
}

struct RunState {
    operation: Operation,
    instance: Instance,
}

struct Run {
    workflow: Arc<dyn Workflow>,
    cloud: CloudEnv,
    names: ResourceNames,
    state: Mutex<RunState>,
}

/// The newest events of an operation from `from_seq`, for watchers.
pub async fn events_since(
    store: &dyn StateStore,
    operation: &OperationId,
    from_seq: u64,
) -> Result<Vec<OperationEvent>, StoreError> {
    store.read_events(operation, from_seq, 500).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for attempt in 0..30 {
            let ceiling = (base * 2u32.pow(attempt.min(20))).min(cap);
            for _ in 0..50 {
                let delay = backoff(base, cap, attempt);
                assert!(
                    delay <= ceiling,
                    "attempt {attempt}: {delay:?} > {ceiling:?}"
                );
            }
        }
        // Full jitter: delays spread over the range instead of repeating one value.
        let samples: std::collections::BTreeSet<_> =
            (0..50).map(|_| backoff(base, cap, 10)).collect();
        assert!(samples.len() > 10, "{samples:?}");
    }
}
