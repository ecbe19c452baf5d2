//! In-memory [`StateStore`] with exactly the semantics of the DynamoDB store, for tests and
//! single-process development. Everything sits behind one mutex that is never held across
//! an `.await`, so every read and every batch is trivially linearizable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    AuditCursor, AuditQuery, BackupCursor, DomainClaim, Guard, InstanceCursor, InstanceQuery,
    OperationCursor, OperationQuery, Page, PriorityClaim, RequestRecord, StateStore, StoreError,
    StoreResult, Write, WriteKind,
};
use crate::domain::{
    AuditEvent, Backup, BackupName, Environment, Instance, InstanceName, Operation, OperationEvent,
    OperationId, OperationStatus, RequestId, TenantId, Timestamp,
};

/// The most writes one [`StateStore::commit`] accepts (DynamoDB's transaction limit).
const MAX_BATCH_WRITES: usize = 100;

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<InstanceName, Instance>,
    guards: HashMap<(TenantId, Environment), Guard>,
    domains: HashMap<String, DomainClaim>,
    operations: HashMap<OperationId, Operation>,
    events: BTreeMap<(OperationId, u64), OperationEvent>,
    requests: HashMap<RequestId, RequestRecord>,
    priorities: BTreeMap<(String, u32), PriorityClaim>,
    backups: BTreeMap<BackupName, Backup>,
    /// By (time, id).
    audit: BTreeMap<(Timestamp, String), AuditEvent>,
}

/// The identity of the stored item a write touches, to refuse two writes to one item.
#[derive(Debug, PartialEq, Eq, Hash)]
enum ItemKey {
    Instance(InstanceName),
    Guard(TenantId, Environment),
    Domain(String),
    Operation(OperationId),
    Event(OperationId, u64),
    Request(RequestId),
    Priority(String, u32),
    Backup(BackupName),
}

fn item_key(write: &Write) -> ItemKey {
    match write {
        Write::CreateInstance(instance) | Write::UpdateInstance(instance) => {
            ItemKey::Instance(instance.name.clone())
        }
        Write::ClaimGuard(guard) | Write::ReleaseGuard(guard) => {
            ItemKey::Guard(guard.tenant.clone(), guard.environment)
        }
        Write::ClaimDomain(claim) | Write::ReleaseDomain(claim) => {
            ItemKey::Domain(claim.domain.clone())
        }
        Write::CreateOperation(operation) | Write::UpdateOperation(operation) => {
            ItemKey::Operation(operation.id.clone())
        }
        Write::AppendEvent(event) => ItemKey::Event(event.operation.clone(), event.seq),
        Write::PutRequest(record) => ItemKey::Request(record.request_id.clone()),
        Write::ClaimPriority(claim) | Write::ReleasePriority(claim) => {
            ItemKey::Priority(claim.listener_arn.clone(), claim.priority)
        }
        Write::CreateBackup(backup) | Write::UpdateBackup(backup) | Write::DeleteBackup(backup) => {
            ItemKey::Backup(backup.name.clone())
        }
    }
}

/// A request record counts as absent once `now` is past its expiry (the same rule as the
/// DynamoDB store: valid while `now <= expires_at`).
fn request_is_live(record: &RequestRecord, now: Timestamp) -> bool {
    now <= record.expires_at
}

/// The instant a runnable operation's lease ran out; 0 when it has none. An operation is
/// runnable at `now` when this is strictly before `now` (the DynamoDB store's `gsi2sk`
/// bound encodes the same rule).
fn lease_expiry_millis(operation: &Operation) -> i64 {
    operation
        .lease
        .as_ref()
        .map_or(0, |lease| lease.expires_at.millis().max(0))
}

fn is_runnable_status(status: OperationStatus) -> bool {
    matches!(
        status,
        OperationStatus::Pending | OperationStatus::InProgress
    )
}

impl State {
    fn precondition_holds(&self, write: &Write) -> bool {
        match write {
            Write::CreateInstance(instance) => !self.instances.contains_key(&instance.name),
            Write::UpdateInstance(instance) => self
                .instances
                .get(&instance.name)
                .is_some_and(|stored| stored.version == instance.version),
            Write::ClaimGuard(guard) => !self
                .guards
                .contains_key(&(guard.tenant.clone(), guard.environment)),
            Write::ReleaseGuard(guard) => self
                .guards
                .get(&(guard.tenant.clone(), guard.environment))
                .is_none_or(|stored| stored.instance == guard.instance),
            Write::ClaimDomain(claim) | Write::ReleaseDomain(claim) => self
                .domains
                .get(&claim.domain)
                .is_none_or(|stored| stored.owner == claim.owner),
            Write::CreateOperation(operation) => !self.operations.contains_key(&operation.id),
            Write::UpdateOperation(operation) => self
                .operations
                .get(&operation.id)
                .is_some_and(|stored| stored.version == operation.version),
            Write::AppendEvent(event) => !self
                .events
                .contains_key(&(event.operation.clone(), event.seq)),
            Write::PutRequest(record) => self
                .requests
                .get(&record.request_id)
                .is_none_or(|stored| !request_is_live(stored, record.created_at)),
            Write::ClaimPriority(claim) => !self
                .priorities
                .contains_key(&(claim.listener_arn.clone(), claim.priority)),
            Write::ReleasePriority(claim) => self
                .priorities
                .get(&(claim.listener_arn.clone(), claim.priority))
                .is_some_and(|stored| stored.owner == claim.owner),
            Write::CreateBackup(backup) => !self.backups.contains_key(&backup.name),
            Write::UpdateBackup(backup) | Write::DeleteBackup(backup) => self
                .backups
                .get(&backup.name)
                .is_some_and(|stored| stored.version == backup.version),
        }
    }

    /// Applies a write whose precondition was checked; versions are bumped here.
    fn apply(&mut self, write: Write) {
        match write {
            Write::CreateInstance(mut instance) => {
                instance.version = 1;
                self.instances.insert(instance.name.clone(), instance);
            }
            Write::UpdateInstance(mut instance) => {
                instance.version = instance.version.saturating_add(1);
                self.instances.insert(instance.name.clone(), instance);
            }
            Write::ClaimGuard(guard) => {
                self.guards
                    .insert((guard.tenant.clone(), guard.environment), guard);
            }
            Write::ReleaseGuard(guard) => {
                self.guards.remove(&(guard.tenant, guard.environment));
            }
            Write::ClaimDomain(claim) => {
                self.domains.insert(claim.domain.clone(), claim);
            }
            Write::ReleaseDomain(claim) => {
                self.domains.remove(&claim.domain);
            }
            Write::CreateOperation(mut operation) => {
                operation.version = 1;
                self.operations.insert(operation.id.clone(), operation);
            }
            Write::UpdateOperation(mut operation) => {
                operation.version = operation.version.saturating_add(1);
                self.operations.insert(operation.id.clone(), operation);
            }
            Write::AppendEvent(event) => {
                self.events
                    .insert((event.operation.clone(), event.seq), event);
            }
            Write::PutRequest(record) => {
                self.requests.insert(record.request_id.clone(), record);
            }
            Write::ClaimPriority(claim) => {
                self.priorities
                    .insert((claim.listener_arn.clone(), claim.priority), claim);
            }
            Write::ReleasePriority(claim) => {
                self.priorities
                    .remove(&(claim.listener_arn, claim.priority));
            }
            Write::CreateBackup(mut backup) => {
                backup.version = 1;
                self.backups.insert(backup.name.clone(), backup);
            }
            Write::UpdateBackup(mut backup) => {
                backup.version = backup.version.saturating_add(1);
                self.backups.insert(backup.name.clone(), backup);
            }
            Write::DeleteBackup(backup) => {
                self.backups.remove(&backup.name);
            }
        }
    }
}

/// Checks what the DynamoDB store checks before sending a batch: the size limit and no two
/// writes to one item.
fn validate_batch(writes: &[Write]) -> StoreResult<()> {
    if writes.len() > MAX_BATCH_WRITES {
        return Err(StoreError::InvalidBatch(format!(
            "{} writes in one batch, at most {MAX_BATCH_WRITES} allowed",
            writes.len()
        )));
    }
    let mut seen = HashSet::with_capacity(writes.len());
    for (index, write) in writes.iter().enumerate() {
        let key = item_key(write);
        if !seen.insert(key) {
            return Err(StoreError::InvalidBatch(format!(
                "write {index} ({:?}) touches an item an earlier write of the batch touches",
                write.kind()
            )));
        }
    }
    Ok(())
}

/// A [`StateStore`] kept in process memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing that can panic runs between a batch's checks and the end of its
        // mutations, so a poisoned lock still guards consistent data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn get_instance(&self, name: &InstanceName) -> StoreResult<Option<Instance>> {
        Ok(self.lock().instances.get(name).cloned())
    }

    async fn list_instances(
        &self,
        query: &InstanceQuery,
    ) -> StoreResult<Page<Instance, InstanceCursor>> {
        let limit = query.limit.max(1);
        let state = self.lock();
        let mut matches: Vec<&Instance> = state
            .instances
            .values()
            .filter(|instance| {
                query
                    .tenant
                    .as_ref()
                    .is_none_or(|tenant| &instance.name.tenant == tenant)
                    && query
                        .environment
                        .is_none_or(|environment| instance.spec.environment == environment)
                    && query.state.is_none_or(|wanted| instance.state == wanted)
            })
            .collect();
        // With a tenant the order is by instance id (the tenant partition's sort key),
        // without it by (environment, tenant, instance) (the environment index).
        let items: Vec<Instance> = if query.tenant.is_some() {
            matches.sort_by(|a, b| a.name.instance.cmp(&b.name.instance));
            matches
                .into_iter()
                .filter(|instance| {
                    query
                        .after
                        .as_ref()
                        .is_none_or(|after| instance.name.instance > after.name.instance)
                })
                .take(limit + 1)
                .cloned()
                .collect()
        } else {
            let key = |instance: &Instance| {
                (
                    instance.spec.environment,
                    instance.name.tenant.clone(),
                    instance.name.instance.clone(),
                )
            };
            matches.sort_by_key(|instance| key(instance));
            matches
                .into_iter()
                .filter(|instance| {
                    query.after.as_ref().is_none_or(|after| {
                        key(instance)
                            > (
                                after.environment,
                                after.name.tenant.clone(),
                                after.name.instance.clone(),
                            )
                    })
                })
                .take(limit + 1)
                .cloned()
                .collect()
        };
        drop(state);
        Ok(page(items, limit, |instance| InstanceCursor {
            environment: instance.spec.environment,
            name: instance.name.clone(),
        }))
    }

    async fn get_guard(
        &self,
        tenant: &TenantId,
        environment: Environment,
    ) -> StoreResult<Option<Guard>> {
        Ok(self
            .lock()
            .guards
            .get(&(tenant.clone(), environment))
            .cloned())
    }

    async fn get_domain_claim(&self, domain: &str) -> StoreResult<Option<DomainClaim>> {
        Ok(self.lock().domains.get(domain).cloned())
    }

    async fn get_backup(&self, name: &BackupName) -> StoreResult<Option<Backup>> {
        Ok(self.lock().backups.get(name).cloned())
    }

    async fn list_backups(
        &self,
        instance: &InstanceName,
        after: Option<&BackupCursor>,
        limit: usize,
    ) -> StoreResult<Page<Backup, BackupCursor>> {
        let limit = limit.max(1);
        let state = self.lock();
        let mut matches: Vec<&Backup> = state
            .backups
            .values()
            .filter(|backup| {
                &backup.name.instance == instance
                    && after.is_none_or(|after| {
                        (backup.created_at, &backup.name.backup) < (after.created_at, &after.backup)
                    })
            })
            .collect();
        // Newest first: (created_at, id) descending.
        matches.sort_by(|a, b| (b.created_at, &b.name.backup).cmp(&(a.created_at, &a.name.backup)));
        let items: Vec<Backup> = matches.into_iter().take(limit + 1).cloned().collect();
        drop(state);
        Ok(page(items, limit, |backup| BackupCursor {
            created_at: backup.created_at,
            backup: backup.name.backup.clone(),
        }))
    }

    async fn expired_backups(&self, now: Timestamp, limit: usize) -> StoreResult<Vec<Backup>> {
        let state = self.lock();
        let mut matches: Vec<&Backup> = state
            .backups
            .values()
            .filter(|backup| backup.expire_at <= now)
            .collect();
        matches.sort_by(|a, b| (a.expire_at, &a.name).cmp(&(b.expire_at, &b.name)));
        Ok(matches.into_iter().take(limit.max(1)).cloned().collect())
    }

    async fn get_operation(&self, id: &OperationId) -> StoreResult<Option<Operation>> {
        Ok(self.lock().operations.get(id).cloned())
    }

    async fn list_operations(
        &self,
        query: &OperationQuery,
    ) -> StoreResult<Page<Operation, OperationCursor>> {
        let limit = query.limit.max(1);
        let state = self.lock();
        let mut matches: Vec<&Operation> = state
            .operations
            .values()
            .filter(|operation| {
                query
                    .tenant
                    .as_ref()
                    .is_none_or(|tenant| &operation.target.tenant == tenant)
                    && query
                        .target
                        .as_ref()
                        .is_none_or(|target| &operation.target == target)
                    && query.status.is_none_or(|status| operation.status == status)
                    && query
                        .done
                        .is_none_or(|done| operation.status.is_done() == done)
                    && query.after.as_ref().is_none_or(|after| {
                        (operation.created_at, &operation.id) < (after.created_at, &after.id)
                    })
            })
            .collect();
        // Newest first: (created_at, id) descending.
        matches.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        let items: Vec<Operation> = matches.into_iter().take(limit + 1).cloned().collect();
        drop(state);
        Ok(page(items, limit, |operation| OperationCursor {
            created_at: operation.created_at,
            id: operation.id.clone(),
        }))
    }

    async fn record_audit_event(&self, event: &AuditEvent) -> StoreResult<()> {
        let mut state = self.lock();
        if state.audit.values().any(|kept| kept.id == event.id) {
            return Err(StoreError::Conflict {
                index: 0,
                kind: WriteKind::RecordAudit,
            });
        }
        state
            .audit
            .insert((event.time, event.id.clone()), event.clone());
        Ok(())
    }

    async fn list_audit_events(
        &self,
        query: &AuditQuery,
    ) -> StoreResult<Page<AuditEvent, AuditCursor>> {
        let limit = query.limit.max(1);
        let mut state = self.lock();
        // Expired events are dropped when the trail is read.
        state.audit.retain(|_, kept| kept.expires_at > query.now);
        let same =
            |wanted: &Option<String>, value: &str| wanted.as_deref().is_none_or(|w| w == value);
        let items: Vec<AuditEvent> = state
            .audit
            .values()
            .rev()
            .filter(|event| {
                query
                    .tenant
                    .as_ref()
                    .is_none_or(|tenant| event.tenant.as_ref() == Some(tenant))
                    && same(&query.principal, &event.principal)
                    && same(&query.method, &event.method)
                    && same(&query.target, &event.target)
                    && same(&query.outcome, &event.outcome)
                    && query
                        .after
                        .as_ref()
                        .is_none_or(|after| (event.time, &event.id) < (after.time, &after.id))
            })
            .take(limit + 1)
            .cloned()
            .collect();
        drop(state);
        Ok(page(items, limit, |event| AuditCursor {
            time: event.time,
            id: event.id.clone(),
        }))
    }

    async fn read_events(
        &self,
        operation: &OperationId,
        from_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<OperationEvent>> {
        let state = self.lock();
        Ok(state
            .events
            .range((operation.clone(), from_seq)..=(operation.clone(), u64::MAX))
            .take(limit)
            .map(|(_, event)| event.clone())
            .collect())
    }

    async fn get_request(
        &self,
        request_id: &RequestId,
        now: Timestamp,
    ) -> StoreResult<Option<RequestRecord>> {
        Ok(self
            .lock()
            .requests
            .get(request_id)
            .filter(|record| request_is_live(record, now))
            .cloned())
    }

    async fn runnable_operations(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> StoreResult<Vec<Operation>> {
        let state = self.lock();
        let mut runnable: Vec<&Operation> = state
            .operations
            .values()
            .filter(|operation| {
                is_runnable_status(operation.status)
                    && lease_expiry_millis(operation) < now.millis()
            })
            .collect();
        runnable
            .sort_by(|a, b| (lease_expiry_millis(a), &a.id).cmp(&(lease_expiry_millis(b), &b.id)));
        Ok(runnable.into_iter().take(limit).cloned().collect())
    }

    async fn listener_priorities(&self, listener_arn: &str) -> StoreResult<Vec<PriorityClaim>> {
        let state = self.lock();
        Ok(state
            .priorities
            .range((listener_arn.to_owned(), 0)..=(listener_arn.to_owned(), u32::MAX))
            .map(|(_, claim)| claim.clone())
            .collect())
    }

    async fn commit(&self, writes: Vec<Write>) -> StoreResult<()> {
        validate_batch(&writes)?;
        let mut state = self.lock();
        if let Some(index) = writes
            .iter()
            .position(|write| !state.precondition_holds(write))
        {
            return Err(StoreError::Conflict {
                index,
                kind: writes[index].kind(),
            });
        }
        // Every precondition holds and no two writes share an item, so applying them one
        // by one is the same as applying them at once.
        for write in writes {
            state.apply(write);
        }
        Ok(())
    }
}

/// Cuts `items` (at most `limit + 1` matches) to a page: `next` only when a further match
/// exists.
fn page<T, C>(mut items: Vec<T>, limit: usize, cursor: impl Fn(&T) -> C) -> Page<T, C> {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor)
    } else {
        None
    };
    Page { items, next }
}
