//! State store: the one place instance and operation state is kept.
//!
//! Contract (both implementations, checked by one conformance suite in
//! `tests/store_conformance.rs`):
//! - reads are strongly consistent (read-your-writes);
//! - [`StateStore::commit`] applies a batch of [`Write`]s atomically: either every write's
//!   precondition holds and all of them are applied, or none is and the error names the
//!   first write whose precondition failed;
//! - versions: a created record is stored with `version = 1`; an update must carry the
//!   version it read and is stored with that version + 1. Nothing is written blindly.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::{
    AuditEvent, Backup, BackupName, Environment, Instance, InstanceId, InstanceName, InstanceState,
    Operation, OperationEvent, OperationId, OperationStatus, RequestId, TenantId, Timestamp,
};

pub mod dynamo;
pub mod memory;

pub use dynamo::DynamoStore;
pub use memory::MemoryStore;

/// The per-(tenant, environment) uniqueness guard (business rule BR-002): while it exists,
/// no second instance of the tenant can be created in the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    pub tenant: TenantId,
    pub environment: Environment,
    pub instance: InstanceId,
}

/// An idempotency key (AIP-155): the operation a request created, and a fingerprint of the
/// request so a replay with a different payload can be told apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: RequestId,
    pub fingerprint: String,
    pub operation: OperationId,
    pub created_at: Timestamp,
    /// After this instant the record is treated as absent (and DynamoDB TTL removes it).
    pub expires_at: Timestamp,
}

/// A listener rule priority held by an instance. A conditional put makes allocation
/// conflict-free across replicas (a listener holds at most 100 rules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorityClaim {
    pub listener_arn: String,
    pub priority: u32,
    pub owner: InstanceName,
}

/// A custom domain held by one instance (issue 14): a domain serves one site, so while the
/// claim exists no other instance, of any tenant or environment, can have it. The domain is
/// lower-case (as [`crate::domain::spec::check_domain`] accepts it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainClaim {
    pub domain: String,
    pub owner: InstanceName,
}

/// One write of an atomic batch, with its precondition.
#[derive(Debug, Clone)]
pub enum Write {
    /// Precondition: no instance with this name exists. Stored with version 1.
    CreateInstance(Instance),
    /// Precondition: the stored version equals `instance.version`. Stored with version + 1.
    UpdateInstance(Instance),
    /// Precondition: the guard for (tenant, environment) does not exist.
    ClaimGuard(Guard),
    /// Precondition: the guard is absent or names the same instance (so a release is
    /// idempotent: repeating one that landed succeeds). Deletes it. A guard held by another
    /// instance is a conflict and stays.
    ReleaseGuard(Guard),
    /// Precondition: the domain is unclaimed, or claimed by the same owner (so a repeated
    /// claim succeeds and changes nothing). A claim held by another owner is a conflict.
    ClaimDomain(DomainClaim),
    /// Precondition: the claim is absent or held by the same owner (idempotent, like
    /// [`Write::ReleaseGuard`]). Deletes it. A claim held by another owner is a conflict
    /// and stays.
    ReleaseDomain(DomainClaim),
    /// Precondition: no operation with this id exists. Stored with version 1.
    CreateOperation(Operation),
    /// Precondition: the stored version equals `operation.version`. Stored with version + 1.
    UpdateOperation(Operation),
    /// Precondition: no event with this (operation, seq) exists.
    AppendEvent(OperationEvent),
    /// Precondition: no unexpired record with this request id exists at `created_at`
    /// (an expired one is overwritten).
    PutRequest(RequestRecord),
    /// Precondition: nobody holds this (listener, priority).
    ClaimPriority(PriorityClaim),
    /// Precondition: the claim exists and has the same owner. Deletes it.
    ReleasePriority(PriorityClaim),
    /// Precondition: no backup with this name exists. Stored with version 1.
    CreateBackup(Backup),
    /// Precondition: the stored version equals `backup.version`. Stored with version + 1.
    UpdateBackup(Backup),
    /// Precondition: the stored version equals `backup.version`. Deletes it.
    DeleteBackup(Backup),
}

impl Write {
    pub fn kind(&self) -> WriteKind {
        match self {
            Write::CreateInstance(_) => WriteKind::CreateInstance,
            Write::UpdateInstance(_) => WriteKind::UpdateInstance,
            Write::ClaimGuard(_) => WriteKind::ClaimGuard,
            Write::ReleaseGuard(_) => WriteKind::ReleaseGuard,
            Write::ClaimDomain(_) => WriteKind::ClaimDomain,
            Write::ReleaseDomain(_) => WriteKind::ReleaseDomain,
            Write::CreateOperation(_) => WriteKind::CreateOperation,
            Write::UpdateOperation(_) => WriteKind::UpdateOperation,
            Write::AppendEvent(_) => WriteKind::AppendEvent,
            Write::PutRequest(_) => WriteKind::PutRequest,
            Write::ClaimPriority(_) => WriteKind::ClaimPriority,
            Write::ReleasePriority(_) => WriteKind::ReleasePriority,
            Write::CreateBackup(_) => WriteKind::CreateBackup,
            Write::UpdateBackup(_) => WriteKind::UpdateBackup,
            Write::DeleteBackup(_) => WriteKind::DeleteBackup,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    CreateInstance,
    UpdateInstance,
    ClaimGuard,
    ReleaseGuard,
    ClaimDomain,
    ReleaseDomain,
    CreateOperation,
    UpdateOperation,
    AppendEvent,
    PutRequest,
    ClaimPriority,
    ReleasePriority,
    CreateBackup,
    UpdateBackup,
    DeleteBackup,
    /// Not part of a batch: [`StateStore::record_audit_event`].
    RecordAudit,
}

#[derive(Debug, Error)]
pub enum StoreError {
    /// The precondition of `writes[index]` did not hold; nothing was written.
    #[error("precondition failed for write {index} ({kind:?})")]
    Conflict { index: usize, kind: WriteKind },
    /// Another transaction touched the same items at the same moment; nothing was written
    /// and the caller may re-read and try again.
    #[error("concurrent transaction on the same items")]
    Contention,
    /// The batch is not acceptable (for example two writes to one item); a bug in the caller.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The store could not be reached or answered with a retryable error. The write may or
    /// may not have happened: re-read before deciding.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded, or another non-retryable store failure.
    #[error("state store error: {0}")]
    Internal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Position after the last instance of a page. With a tenant filter the order is by
/// instance id; without, by (environment, tenant, instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceCursor {
    pub environment: Environment,
    pub name: InstanceName,
}

#[derive(Debug, Clone, Default)]
pub struct InstanceQuery {
    pub tenant: Option<TenantId>,
    pub environment: Option<Environment>,
    pub state: Option<InstanceState>,
    pub after: Option<InstanceCursor>,
    /// At least 1.
    pub limit: usize,
}

/// Position after the last operation of a page; operations are listed newest first, by
/// (created_at, id) descending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationCursor {
    pub created_at: Timestamp,
    pub id: OperationId,
}

#[derive(Debug, Clone, Default)]
pub struct OperationQuery {
    /// Only operations on this tenant's instances.
    pub tenant: Option<TenantId>,
    pub target: Option<InstanceName>,
    pub status: Option<OperationStatus>,
    /// `Some(true)`: only finished operations; `Some(false)`: only unfinished ones.
    pub done: Option<bool>,
    pub after: Option<OperationCursor>,
    /// At least 1.
    pub limit: usize,
}

/// Position after the last backup of a page; backups are listed newest first, by
/// (created_at, backup id) descending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCursor {
    pub created_at: Timestamp,
    pub backup: crate::domain::BackupId,
}

/// Position after the last audit event of a page; events are listed newest first, by
/// (time, id) descending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCursor {
    pub time: Timestamp,
    pub id: String,
}

/// Which audit events to list. Every `Some` filter must match exactly.
#[derive(Debug, Clone)]
pub struct AuditQuery {
    /// Only events whose target belongs to this tenant; `None`: every event.
    pub tenant: Option<TenantId>,
    pub principal: Option<String>,
    pub method: Option<String>,
    pub target: Option<String>,
    pub outcome: Option<String>,
    /// Events expired at this instant are left out.
    pub now: Timestamp,
    pub after: Option<AuditCursor>,
    /// At least 1.
    pub limit: usize,
}

/// A page of results. `next` is set only when at least one more matching item exists.
#[derive(Debug, Clone)]
pub struct Page<T, C> {
    pub items: Vec<T>,
    pub next: Option<C>,
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Checks that the store is reachable and its schema exists (used for readiness).
    async fn ping(&self) -> StoreResult<()>;

    async fn get_instance(&self, name: &InstanceName) -> StoreResult<Option<Instance>>;

    async fn list_instances(
        &self,
        query: &InstanceQuery,
    ) -> StoreResult<Page<Instance, InstanceCursor>>;

    async fn get_guard(
        &self,
        tenant: &TenantId,
        environment: Environment,
    ) -> StoreResult<Option<Guard>>;

    /// Who holds the custom domain `domain` (lower-case), if anyone.
    async fn get_domain_claim(&self, domain: &str) -> StoreResult<Option<DomainClaim>>;

    async fn get_operation(&self, id: &OperationId) -> StoreResult<Option<Operation>>;

    async fn list_operations(
        &self,
        query: &OperationQuery,
    ) -> StoreResult<Page<Operation, OperationCursor>>;

    /// Events of `operation` with `seq >= from_seq`, in order, at most `limit`.
    async fn read_events(
        &self,
        operation: &OperationId,
        from_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<OperationEvent>>;

    /// The request record, unless it is missing or expired at `now`.
    async fn get_request(
        &self,
        request_id: &RequestId,
        now: Timestamp,
    ) -> StoreResult<Option<RequestRecord>>;

    /// Operations a worker may claim at `now`: PENDING or IN_PROGRESS, with no lease or a
    /// lease that expired before `now`; oldest lease expiry first, at most `limit`.
    async fn runnable_operations(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> StoreResult<Vec<Operation>>;

    async fn get_backup(&self, name: &BackupName) -> StoreResult<Option<Backup>>;

    /// The backups of one instance, newest first (created_at, then id, descending), after
    /// `after`, at most `limit` (≥ 1).
    async fn list_backups(
        &self,
        instance: &InstanceName,
        after: Option<&BackupCursor>,
        limit: usize,
    ) -> StoreResult<Page<Backup, BackupCursor>>;

    /// Backups whose `expire_at` is at or before `now`, any instance, oldest expiry first,
    /// at most `limit` (for the retention sweeper).
    async fn expired_backups(&self, now: Timestamp, limit: usize) -> StoreResult<Vec<Backup>>;

    /// Records one audit event. Precondition: no event with its id exists (a repeat of a
    /// landed write is a conflict, not a second event).
    async fn record_audit_event(&self, event: &AuditEvent) -> StoreResult<()>;

    /// Audit events matching `query`, newest first ((time, id) descending), without those
    /// expired at `query.now`.
    async fn list_audit_events(
        &self,
        query: &AuditQuery,
    ) -> StoreResult<Page<AuditEvent, AuditCursor>>;

    /// Every priority claimed on `listener_arn`, by priority.
    async fn listener_priorities(&self, listener_arn: &str) -> StoreResult<Vec<PriorityClaim>>;

    /// Applies `writes` atomically (see the module docs). At most 100 writes, and no two
    /// writes to the same item.
    async fn commit(&self, writes: Vec<Write>) -> StoreResult<()>;
}
