//! Durable workflows. Every mutating request is an operation in the store; workers in every
//! replica claim runnable operations with a conditional write (a lease), run their steps,
//! record each step's outcome before starting the next, and undo what they did when a step
//! fails for good. A replica that dies stops renewing its lease, and another replica resumes
//! the operation from its recorded steps — so every step is idempotent (`ensure`).

pub mod backup;
pub mod deprovision;
pub mod domains;
pub mod engine;
pub mod events;
pub mod failpoints;
pub mod placement;
pub mod provision;
pub mod restart;
pub mod restore;
pub mod resume;
pub mod rollout;
pub mod scale;
pub mod suspend;
pub mod update;

use std::time::Duration;

use async_trait::async_trait;

use crate::cloud::{CloudEnv, CloudError, ErrorKind, Tags};
use crate::domain::naming::{ResourceNames, TagContext};
use crate::domain::{Instance, InstanceState, Operation, Verb};
use crate::store::StateStore;

pub use engine::{Clock, Engine, EngineOptions, EngineSettings, ManualClock, SystemClock};
pub use events::EventBus;

/// Why a step did not succeed this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// Worth retrying with backoff (throttling, timeouts, 5xx).
    Transient(String),
    /// Waiting for something to converge (a rollout, a task): poll again, bounded only by the
    /// operation's deadline.
    NotYet(String),
    /// Retrying will not help.
    Fatal(String),
    /// Retrying will not help, and the operation's error names why with its own reason (an
    /// `ErrorInfo` reason such as `LOAD_BALANCER_POOL_FULL`, which the API maps to its
    /// canonical code) instead of `STEP_FAILED`.
    Refused {
        reason: &'static str,
        message: String,
    },
}

impl StepError {
    pub fn message(&self) -> &str {
        match self {
            StepError::Transient(m) | StepError::NotYet(m) | StepError::Fatal(m) => m,
            StepError::Refused { message, .. } => message,
        }
    }
}

impl From<CloudError> for StepError {
    fn from(error: CloudError) -> Self {
        match error.kind {
            ErrorKind::Retryable => StepError::Transient(error.message),
            _ => StepError::Fatal(error.message),
        }
    }
}

impl From<crate::store::StoreError> for StepError {
    fn from(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::Unavailable(m) => StepError::Transient(m),
            crate::store::StoreError::Contention => StepError::Transient("store contention".into()),
            other => StepError::Fatal(other.to_string()),
        }
    }
}

pub type StepResult<T> = Result<T, StepError>;

/// Tag settings shared by every workflow.
#[derive(Debug, Clone)]
pub struct TagSettings {
    pub prefix: String,
    pub project: String,
}

/// What a step can see: the operation as recorded so far (with earlier steps' outputs), the
/// instance, and the environment's adapters.
pub struct StepCtx {
    pub operation: Operation,
    pub instance: Instance,
    pub cloud: CloudEnv,
    pub store: std::sync::Arc<dyn StateStore>,
    pub names: ResourceNames,
    pub tag_settings: TagSettings,
    /// The engine's clock when this attempt started (deadlines; tests move it).
    pub now: crate::domain::Timestamp,
}

impl StepCtx {
    /// The recorded output (resource id) of an earlier step.
    pub fn output(&self, step: &str) -> Option<&str> {
        self.operation
            .steps
            .iter()
            .find(|s| s.name == step)
            .and_then(|s| s.resource_id.as_deref())
    }

    pub fn require_output(&self, step: &str) -> StepResult<&str> {
        self.output(step)
            .ok_or_else(|| StepError::Fatal(format!("step {step} recorded no resource")))
    }

    fn tag_context(&self) -> TagContext<'_> {
        let spec = &self.instance.spec;
        TagContext {
            prefix: &self.tag_settings.prefix,
            tenant: &self.instance.name.tenant,
            instance: self.instance.name.instance.as_str(),
            environment: spec.environment,
            project: &self.tag_settings.project,
            cost_center: &spec.cost_center,
            opportunity: &spec.opportunity_id,
            labels: &spec.labels,
        }
    }

    /// The unified tags of one component.
    pub fn tags(&self, component: &str) -> Tags {
        self.tag_context().tags(component)
    }

    /// Tags that identify every resource of this tenant in this environment (for scans).
    pub fn tenant_tags(&self) -> Tags {
        let all = self.tag_context().own_tags("");
        all.into_iter()
            .filter(|(key, _)| {
                key.ends_with(crate::domain::naming::tag_keys::TENANT_ID)
                    || key.ends_with(crate::domain::naming::tag_keys::ENVIRONMENT)
                    || key.ends_with(crate::domain::naming::tag_keys::MANAGED_BY)
            })
            .collect()
    }

    /// Tags that identify every resource of THIS instance (tenant, environment, instance):
    /// what removal, adoption and verification scan for, so a sibling instance of the same
    /// tenant and environment is never touched.
    pub fn owner_tags(&self) -> Tags {
        let mut tags = self.tenant_tags();
        tags.push((
            format!(
                "{}:{}",
                self.tag_settings.prefix,
                crate::domain::naming::tag_keys::INSTANCE_ID
            ),
            self.instance.name.instance.as_str().to_owned(),
        ));
        tags
    }

    /// Tags that identify one component of this instance.
    pub fn component_tags(&self, component: &str) -> Tags {
        let mut tags = self.owner_tags();
        tags.push((
            format!(
                "{}:{}",
                self.tag_settings.prefix,
                crate::domain::naming::tag_keys::COMPONENT
            ),
            component.to_owned(),
        ));
        tags
    }

    /// Does a resource carrying `have` belong to this instance?
    pub fn owns(&self, have: &Tags) -> bool {
        self.owner_tags().iter().all(|pair| have.contains(pair))
    }

    /// The owner recorded with resources that cannot carry tags (MySQL databases).
    pub fn owner(&self) -> String {
        self.instance.name.to_string()
    }

    /// An idempotency token unique to this instance, fitted to `limit` characters.
    pub fn instance_token(&self, base: &str, limit: usize) -> String {
        crate::domain::naming::fit(
            &format!("{base}-{}", self.instance.name.instance),
            limit,
            '-',
        )
    }
}

/// How an operation that did not complete ended, for [`Workflow::on_fail`].
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    /// FAILED, CANCELLED or STUCK.
    pub status: crate::domain::OperationStatus,
    pub reason: &'a str,
    pub message: &'a str,
    /// True when the workflow's undos all ran and succeeded (nothing it made is left).
    pub rolled_back: bool,
    /// The instance's state when the operation was requested (its params' `from_state`).
    pub from_state: Option<InstanceState>,
}

/// One kind of operation: its steps, grouped in stages (the steps of a stage run in
/// parallel; stages run in order), how to do and undo each step, and what its ending
/// does to the instance. The engine persists the plan and the phase; a workflow owns
/// everything it changes on the instance.
#[async_trait]
pub trait Workflow: Send + Sync {
    fn verb(&self) -> Verb;

    /// The stages for this operation, decided once when it is first claimed and persisted
    /// with its steps (a resumed operation runs what was planned).
    fn plan(
        &self,
        operation: &Operation,
        instance: &Instance,
        cloud: &CloudEnv,
    ) -> Vec<Vec<&'static str>>;

    /// Does the step and returns the id of what it made, if anything. Must be idempotent.
    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>>;

    /// Undoes the step; `resource` is what `run` returned, if it got that far. Must succeed
    /// when there is nothing left to undo.
    async fn undo(&self, ctx: &StepCtx, step: &str, resource: Option<&str>) -> StepResult<()>;

    /// Whether a failed step leads to undoing the earlier ones.
    fn rolls_back(&self) -> bool;

    /// The instance's state while the operation runs (set when a worker claims it).
    fn running_state(&self) -> InstanceState;

    /// The running state for an instance now in `current` (a backup keeps the state).
    fn running_state_for(&self, _current: InstanceState) -> InstanceState {
        self.running_state()
    }

    /// Edits the instance when an attempt starts (not when a crashed one is resumed).
    fn on_start(&self, _instance: &mut Instance) {}

    /// Edits the instance when the operation completes; returns whether to give back the
    /// (tenant, environment) guard.
    fn on_complete(&self, instance: &mut Instance, operation: &Operation, cloud: &CloudEnv)
    -> bool;

    /// Edits the instance when the operation ends FAILED, CANCELLED or STUCK; returns
    /// whether to give back the (tenant, environment) guard.
    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool;

    /// How long an attempt may run before it is declared STUCK.
    fn deadline(&self) -> Duration;

    /// Edits a FAILED or STUCK operation that RetryOperation is about to run again, with the
    /// instance as it is now (for example to roll back to what it runs now).
    fn on_retry(&self, _operation: &mut Operation, _instance: &Instance) {}
}

/// The workflow that runs operations of `verb`.
pub fn workflow_for(verb: Verb) -> Option<std::sync::Arc<dyn Workflow>> {
    match verb {
        Verb::Create => Some(std::sync::Arc::new(provision::Provision)),
        Verb::Delete => Some(std::sync::Arc::new(deprovision::Deprovision)),
        Verb::Restart => Some(std::sync::Arc::new(restart::Restart)),
        Verb::Scale => Some(std::sync::Arc::new(scale::Scale)),
        Verb::Suspend => Some(std::sync::Arc::new(suspend::Suspend)),
        Verb::Resume => Some(std::sync::Arc::new(resume::Resume)),
        Verb::Update => Some(std::sync::Arc::new(update::Update)),
        Verb::Backup => Some(std::sync::Arc::new(backup::BackupWorkflow)),
        Verb::Restore => Some(std::sync::Arc::new(restore::Restore)),
    }
}

/// Test hook around every step execution (failure injection).
#[async_trait]
pub trait StepHook: Send + Sync {
    /// Called before the step's action; an error fails the attempt as the action would.
    async fn before(&self, _operation: &Operation, _step: &str) -> StepResult<()> {
        Ok(())
    }
    /// Called after the step's action succeeded; an error fails the attempt even though the
    /// action's effects exist (the undo must still remove them).
    async fn after(&self, _operation: &Operation, _step: &str) -> StepResult<()> {
        Ok(())
    }
    /// Called before a step is undone; an error fails the undo attempt as the undo would.
    async fn before_undo(&self, _operation: &Operation, _step: &str) -> StepResult<()> {
        Ok(())
    }
}
