//! Operations: the durable record of one mutating request, its steps, and its event log
//! (which doubles as the audit trail).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ids::{InstanceName, OperationId, RequestId};
use super::time::Timestamp;

/// What an operation does to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Create,
    Update,
    Delete,
    Suspend,
    Resume,
    Restart,
    Scale,
    Backup,
    Restore,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
            Verb::Suspend => "suspend",
            Verb::Resume => "resume",
            Verb::Restart => "restart",
            Verb::Scale => "scale",
            Verb::Backup => "backup",
            Verb::Restore => "restore",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The seed's status vocabulary: `PENDING → IN_PROGRESS → COMPLETED | FAILED | STUCK`, plus
/// CANCELLED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperationStatus {
    Pending,
    InProgress,
    Completed,
    Failed,
    Stuck,
    Cancelled,
}

impl OperationStatus {
    pub const ALL: [OperationStatus; 6] = [
        OperationStatus::Pending,
        OperationStatus::InProgress,
        OperationStatus::Completed,
        OperationStatus::Failed,
        OperationStatus::Stuck,
        OperationStatus::Cancelled,
    ];

    /// True when nothing more will happen unless someone retries the operation.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            OperationStatus::Completed
                | OperationStatus::Failed
                | OperationStatus::Stuck
                | OperationStatus::Cancelled
        )
    }

    /// Allowed status changes. FAILED and STUCK go back to PENDING on retry; COMPLETED and
    /// CANCELLED are final.
    pub fn can_transition_to(self, to: OperationStatus) -> bool {
        use OperationStatus::*;
        matches!(
            (self, to),
            (Pending, InProgress)
                | (Pending, Cancelled)
                | (Pending, Failed)
                | (InProgress, Completed)
                | (InProgress, Failed)
                | (InProgress, Stuck)
                | (InProgress, Cancelled)
                | (Failed, Pending)
                | (Stuck, Pending)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OperationStatus::Pending => "PENDING",
            OperationStatus::InProgress => "IN_PROGRESS",
            OperationStatus::Completed => "COMPLETED",
            OperationStatus::Failed => "FAILED",
            OperationStatus::Stuck => "STUCK",
            OperationStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }
}

impl fmt::Display for OperationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one step of a workflow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Undone,
    UndoFailed,
}

/// Which way an operation is going. Persisted, so a resumed operation continues in the
/// phase it was in: a crash during a rollback resumes the rollback, never the forward run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// Running the steps of the plan.
    #[default]
    Forward,
    /// Undoing what the forward run did, newest first, after a step failed for good or a
    /// cancel request; `Operation::failure` says why.
    Compensating,
}

/// One step of a workflow and what it produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    /// The step's stage in the plan: steps of one stage run in parallel, stages in order.
    /// Persisted with the plan, so a resumed operation runs what was planned, whatever the
    /// configuration says now.
    #[serde(default)]
    pub stage: u32,
    pub status: StepStatus,
    pub resource_id: Option<String>,
    pub error: Option<String>,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub attempts: u32,
}

impl Step {
    pub fn pending(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            stage: 0,
            status: StepStatus::Pending,
            resource_id: None,
            error: None,
            started_at: None,
            ended_at: None,
            attempts: 0,
        }
    }
}

/// Reasons of operation errors that have a canonical code of their own (the rest are
/// ABORTED): the API maps them (see `api::convert::operation_to_proto`).
pub mod failure_reason {
    /// No load balancer of the environment's pool has room for the instance
    /// (RESOURCE_EXHAUSTED).
    pub const LOAD_BALANCER_POOL_FULL: &str = "LOAD_BALANCER_POOL_FULL";
    /// The instance's load balancer has no room for what the change adds: more rules or
    /// certificates for custom domains (RESOURCE_EXHAUSTED).
    pub const LOAD_BALANCER_FULL: &str = "LOAD_BALANCER_FULL";
    /// A custom domain is held by another instance (ALREADY_EXISTS).
    pub const DOMAIN_TAKEN: &str = "DOMAIN_TAKEN";

    /// The canonical code (`tonic::Code` as i32) of an operation error with `reason`, if it
    /// has one of its own.
    pub fn code(reason: &str) -> Option<i32> {
        match reason {
            LOAD_BALANCER_POOL_FULL | LOAD_BALANCER_FULL => Some(8),
            DOMAIN_TAKEN => Some(6),
            _ => None,
        }
    }
}

/// A failure recorded on an operation: a stable reason and a message safe to show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationError {
    pub reason: String,
    pub message: String,
}

/// A worker's claim on an operation; expired leases may be taken over by any replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub expires_at: Timestamp,
}

/// The durable record of one mutating request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: OperationId,
    pub verb: Verb,
    pub target: InstanceName,
    pub status: OperationStatus,
    pub steps: Vec<Step>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub error: Option<OperationError>,
    pub request_id: Option<RequestId>,
    pub cancel_requested: bool,
    /// How many times the operation has been started (1 on the first run; retries add one).
    pub attempt: u32,
    pub lease: Option<Lease>,
    /// Verb-specific parameters (for example the new size of a scale), as the workflow
    /// that owns the verb defines them.
    pub params: serde_json::Value,
    /// The sequence number of the last event appended for this operation.
    pub last_event_seq: u64,
    /// Forward or compensating; see [`Phase`].
    #[serde(default)]
    pub phase: Phase,
    /// Why the operation is compensating (set with `Phase::Compensating`), so that a
    /// replica resuming the rollback ends the operation with the original failure.
    #[serde(default)]
    pub failure: Option<OperationError>,
    /// The W3C `traceparent` of the request that created the operation (when spans are
    /// exported), so the replica that runs it continues that request's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    /// Optimistic-concurrency version, bumped by the store on every write.
    pub version: u64,
}

impl Operation {
    pub fn new(
        verb: Verb,
        target: InstanceName,
        steps: Vec<Step>,
        request_id: Option<RequestId>,
        now: Timestamp,
    ) -> Self {
        Self {
            id: OperationId::generate(),
            verb,
            target,
            status: OperationStatus::Pending,
            steps,
            created_at: now,
            updated_at: now,
            ended_at: None,
            error: None,
            request_id,
            cancel_requested: false,
            attempt: 0,
            lease: None,
            params: serde_json::Value::Null,
            last_event_seq: 0,
            phase: Phase::Forward,
            failure: None,
            trace_parent: None,
            version: 0,
        }
    }

    /// The plan as persisted: step names grouped by stage, stages in order.
    pub fn stages(&self) -> Vec<Vec<String>> {
        let mut stages: Vec<(u32, Vec<String>)> = Vec::new();
        for step in &self.steps {
            match stages.iter_mut().find(|(stage, _)| *stage == step.stage) {
                Some((_, names)) => names.push(step.name.clone()),
                None => stages.push((step.stage, vec![step.name.clone()])),
            }
        }
        stages.sort_by_key(|(stage, _)| *stage);
        stages.into_iter().map(|(_, names)| names).collect()
    }

    /// Pending steps for a plan given as stages.
    pub fn planned_steps(stages: &[Vec<&str>]) -> Vec<Step> {
        let mut steps = Vec::new();
        for (index, stage) in stages.iter().enumerate() {
            for name in stage {
                let mut step = Step::pending(*name);
                step.stage = u32::try_from(index).unwrap_or(u32::MAX);
                steps.push(step);
            }
        }
        steps
    }

    /// Percent of steps done; 100 once the operation completed.
    pub fn progress_percent(&self) -> u32 {
        if self.status == OperationStatus::Completed {
            return 100;
        }
        if self.steps.is_empty() {
            return 0;
        }
        let done = self
            .steps
            .iter()
            .filter(|s| matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped))
            .count();
        u32::try_from(done * 100 / self.steps.len()).unwrap_or(100)
    }

    /// Builds the next event of this operation's log and advances `last_event_seq`; the
    /// caller persists both in one transaction.
    pub fn next_event(
        &mut self,
        now: Timestamp,
        step: Option<(&str, StepStatus)>,
        message: impl Into<String>,
    ) -> OperationEvent {
        self.last_event_seq += 1;
        OperationEvent {
            operation: self.id.clone(),
            seq: self.last_event_seq,
            at: now,
            status: self.status,
            step: step.map(|(name, _)| name.to_owned()),
            step_status: step.map(|(_, status)| status),
            message: message.into(),
            percent: self.progress_percent(),
            terminal: self.status.is_done(),
        }
    }
}

/// One entry of an operation's progress log; sequence numbers start at 1 and have no gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationEvent {
    pub operation: OperationId,
    pub seq: u64,
    pub at: Timestamp,
    pub status: OperationStatus,
    pub step: Option<String>,
    pub step_status: Option<StepStatus>,
    pub message: String,
    pub percent: u32,
    pub terminal: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{InstanceId, TenantId};

    fn op() -> Operation {
        let target = InstanceName::new(
            TenantId::parse("acme").unwrap(),
            InstanceId::parse("wp").unwrap(),
        );
        Operation::new(
            Verb::Create,
            target,
            vec![Step::pending("a"), Step::pending("b")],
            None,
            Timestamp(0),
        )
    }

    #[test]
    fn status_transitions() {
        use OperationStatus::*;
        let allowed = [
            (Pending, InProgress),
            (Pending, Cancelled),
            (Pending, Failed),
            (InProgress, Completed),
            (InProgress, Failed),
            (InProgress, Stuck),
            (InProgress, Cancelled),
            (Failed, Pending),
            (Stuck, Pending),
        ];
        for from in OperationStatus::ALL {
            for to in OperationStatus::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert!(!Completed.can_transition_to(Pending));
        assert!(Completed.is_done() && Stuck.is_done() && !InProgress.is_done());
    }

    #[test]
    fn progress_and_events() {
        let mut op = op();
        assert_eq!(op.progress_percent(), 0);
        op.steps[0].status = StepStatus::Succeeded;
        assert_eq!(op.progress_percent(), 50);
        let first = op.next_event(Timestamp(5), Some(("a", StepStatus::Succeeded)), "a done");
        let second = op.next_event(Timestamp(6), None, "next");
        assert_eq!((first.seq, second.seq, op.last_event_seq), (1, 2, 2));
        assert_eq!(first.percent, 50);
        op.status = OperationStatus::Completed;
        let last = op.next_event(Timestamp(7), None, "done");
        assert!(last.terminal);
        assert_eq!(last.percent, 100);
    }

    #[test]
    fn the_plan_round_trips_through_the_steps() {
        let stages = vec![vec!["a", "b"], vec!["c"], vec!["d", "e"]];
        let mut op = op();
        op.steps = Operation::planned_steps(&stages);
        let back = op.stages();
        assert_eq!(back, vec![vec!["a", "b"], vec!["c"], vec!["d", "e"]]);
        // Stored without stages (older records): one stage, in order.
        let legacy: Step = serde_json::from_str(
            r#"{"name":"x","status":"PENDING","resource_id":null,"error":null,"started_at":null,"ended_at":null,"attempts":0}"#,
        )
        .unwrap();
        assert_eq!(legacy.stage, 0);
        let stored = serde_json::to_string(&op).unwrap();
        let decoded: Operation = serde_json::from_str(&stored).unwrap();
        assert_eq!(decoded, op);
        assert_eq!(decoded.phase, Phase::Forward);
    }
}
