//! The engine: claims runnable operations under a lease, runs their workflows step by step,
//! records every outcome before moving on, retries transient failures with capped
//! exponential backoff and jitter, and undoes completed steps when one fails for good.
//!
//! - `claim.rs`: finding and leasing work; ending or parking what cannot run;
//! - `lease.rs`: keeping the lease, conditional writes of the operation, interruptions;
//! - `steps.rs`: the forward phase, stage by stage, each attempt bounded and cancellable;
//! - `ending.rs`: the compensating phase and the final write of an operation.
//!
//! The phase (forward or compensating) and the plan are persisted on the operation, so a
//! replica resuming it continues exactly where the last one was, whatever the live
//! configuration says now. What an ending does to the instance belongs to the workflow
//! (`Workflow::on_complete` / `on_fail`), never to the engine.

mod claim;
pub mod clock;
mod ending;
mod lease;
mod steps;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::cloud::{CloudEnv, CloudResult};
use crate::domain::naming::ResourceNames;
use crate::domain::{
    Environment, Instance, InstanceName, Operation, OperationEvent, OperationId, Verb,
};
use crate::metrics::{Gauges, Metrics};
use crate::store::{StateStore, StoreError};

pub use clock::{Clock, ManualClock, SystemClock};
pub use ending::StaleOutcome;

use super::{EventBus, StepHook, TagSettings, Workflow};

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
    /// How long an operation whose environment cannot be resolved is set aside before a
    /// replica tries it again (it no longer blocks the claim loop meanwhile).
    pub park_interval: Duration,
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
            park_interval: Duration::from_secs(30),
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

/// What an engine is built from besides its store, resolver, settings and bus.
#[derive(Clone)]
pub struct EngineOptions {
    /// Failure injection around every step (tests, failpoints).
    pub hook: Option<Arc<dyn StepHook>>,
    /// Time for deadlines; the system clock unless a test injects one.
    pub clock: Arc<dyn Clock>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            hook: None,
            clock: Arc::new(SystemClock),
        }
    }
}

pub struct Engine {
    store: Arc<dyn StateStore>,
    cloud: Arc<dyn CloudResolver>,
    settings: EngineSettings,
    bus: EventBus,
    wake: Arc<Notify>,
    slots: Arc<Semaphore>,
    hook: Option<Arc<dyn StepHook>>,
    clock: Arc<dyn Clock>,
    /// Operations this replica gave up on because the store rejects every write to them
    /// (and so cannot record that it gave up): skipped by the claim loop until restart.
    abandoned: std::sync::Mutex<HashSet<OperationId>>,
    /// How many times the claim loop has looked for work (for tests and diagnostics).
    rounds: tokio::sync::watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Engine {
    pub fn new(
        store: Arc<dyn StateStore>,
        cloud: Arc<dyn CloudResolver>,
        settings: EngineSettings,
        bus: EventBus,
    ) -> Arc<Self> {
        Self::with_options(store, cloud, settings, bus, EngineOptions::default())
    }

    /// The same engine with a step hook (tests inject failures with it).
    pub fn with_hook(
        store: Arc<dyn StateStore>,
        cloud: Arc<dyn CloudResolver>,
        settings: EngineSettings,
        bus: EventBus,
        hook: Arc<dyn StepHook>,
    ) -> Arc<Self> {
        let options = EngineOptions {
            hook: Some(hook),
            ..EngineOptions::default()
        };
        Self::with_options(store, cloud, settings, bus, options)
    }

    pub fn with_options(
        store: Arc<dyn StateStore>,
        cloud: Arc<dyn CloudResolver>,
        settings: EngineSettings,
        bus: EventBus,
        options: EngineOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(settings.workers.max(1))),
            store,
            cloud,
            settings,
            bus,
            wake: Arc::new(Notify::new()),
            hook: options.hook,
            clock: options.clock,
            abandoned: std::sync::Mutex::new(HashSet::new()),
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

    /// Claims and runs operations until `shutdown`; running executions stop at once (an
    /// attempt in flight is dropped) and hand their lease back, so another replica
    /// continues without waiting for the lease to expire.
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
}

/// Why an execution stopped early without finishing the operation.
#[derive(Debug)]
enum Interrupt {
    /// Another replica holds the operation now (our conditional write lost).
    LeaseLost,
    /// This replica is shutting down; the lease is handed back.
    Shutdown,
    /// The store refuses a write for a reason that retrying cannot fix (a validation
    /// error, an undecodable record): the operation ends STUCK if that can be recorded.
    StoreRejected(String),
}

impl From<StoreError> for Interrupt {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { .. } | StoreError::Contention | StoreError::Unavailable(_) => {
                Interrupt::LeaseLost
            }
            StoreError::InvalidBatch(detail) | StoreError::Internal(detail) => {
                Interrupt::StoreRejected(detail)
            }
        }
    }
}

struct RunState {
    operation: Operation,
    instance: Instance,
}

/// What every span of one execution carries (span attributes are not inherited, and a
/// trace is searched by them).
struct SpanLabels {
    operation_id: OperationId,
    verb: Verb,
    instance: InstanceName,
    replica: String,
    /// The trace of the request that created the operation.
    trace_parent: Option<String>,
}

/// One execution of one operation by this replica.
struct Run {
    labels: SpanLabels,
    workflow: Arc<dyn Workflow>,
    cloud: CloudEnv,
    names: ResourceNames,
    state: Mutex<RunState>,
    /// Cancelled when this replica learns that the operation's lease is gone.
    lost: CancellationToken,
    /// Cancelled when a cancel request for the operation is seen.
    cancel: CancellationToken,
    /// This replica's shutdown.
    shutdown: CancellationToken,
}

impl Run {
    /// The span of this execution, a child of the span of the request that created the
    /// operation (whichever replica served it), so one operation is one trace.
    fn span(&self) -> tracing::Span {
        let labels = &self.labels;
        let span = tracing::info_span!(
            "operation",
            operation_id = %labels.operation_id,
            operation.verb = %labels.verb,
            instance = %labels.instance,
            replica = %labels.replica
        );
        crate::telemetry::parent_from_traceparent(&span, labels.trace_parent.as_deref());
        span
    }

    /// The span of one step inside [`Run::span`]: its forward run (`phase = "forward"`,
    /// retries included) or one attempt to undo it (`phase = "undo"`).
    fn step_span(&self, phase: &'static str, step: &str) -> tracing::Span {
        let labels = &self.labels;
        tracing::info_span!(
            "step",
            step,
            phase,
            operation_id = %labels.operation_id,
            operation.verb = %labels.verb,
            instance = %labels.instance,
            replica = %labels.replica
        )
    }
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

    #[test]
    fn store_errors_split_into_lost_leases_and_permanent_rejections() {
        use crate::store::WriteKind;
        let lost = [
            StoreError::Conflict {
                index: 0,
                kind: WriteKind::UpdateOperation,
            },
            StoreError::Contention,
            StoreError::Unavailable("timeout".into()),
        ];
        for error in lost {
            assert!(matches!(Interrupt::from(error), Interrupt::LeaseLost));
        }
        for error in [
            StoreError::InvalidBatch("two writes to one item".into()),
            StoreError::Internal("ValidationException: item too large".into()),
        ] {
            assert!(matches!(
                Interrupt::from(error),
                Interrupt::StoreRejected(_)
            ));
        }
    }
}
