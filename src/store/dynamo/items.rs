//! The single-table layout: how each record becomes a DynamoDB item, and the writes with
//! their condition expressions.
//!
//! | record | pk | sk | index keys |
//! |---|---|---|---|
//! | instance | `TENANT#{tenant}` | `INSTANCE#{instance}` | gsi1 `ENV#{ENV}` / `{tenant}#{instance}` |
//! | guard | `UNIQUE#{tenant}#{ENV}` | `UNIQUE` | |
//! | custom domain claim | `DOMAIN#{domain}` | `DOMAIN` | |
//! | operation | `OP#{id}` | `OP` | gsi1 `OPERATIONS` / `{created_at:015}#{id}`; gsi2 `RUNNABLE` / `{lease expiry:015}#{id}` while runnable |
//! | event | `OP#{id}` | `EVENT#{seq:020}` | |
//! | request | `REQ#{request_id}` | `REQ` | TTL `expires_at` |
//! | listener priority | `LISTENER#{arn}` | `PRIORITY#{n:010}` | |
//! | audit event | `AUDIT#{tenant or -}` | `{time:015}#{id}` | gsi1 `AUDIT` / `{time:015}#{id}`; TTL `expires_at` |
//! | backup | `TENANT#{tenant}` | `BACKUP#{instance}#{backup}` | gsi1 `BACKUPS#{tenant}#{instance}` / `{created_at:015}#{backup}`; gsi2 `BACKUP_EXPIRY` / `{expire_at:015}#{tenant}#{instance}#{backup}` |
//!
//! Ids are lower-case letters, digits and `-` (request ids also `_ . :`), all of which sort
//! above `#`, so `{tenant}#{instance}` sorts like the tuple (tenant, instance). Numbers are
//! zero-padded so that string order is numeric order. Every record also carries `body`, the
//! JSON of the domain struct, which is what reads decode; the other attributes exist for
//! keys, conditions and filters.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::{
    AuditEvent, Backup, BackupName, Environment, Instance, InstanceName, Operation, OperationEvent,
    OperationId, RequestId, TenantId, Timestamp,
};
use crate::store::{
    DomainClaim, Guard, PriorityClaim, RequestRecord, StoreError, StoreResult, Write,
};

pub(super) type Item = HashMap<String, AttributeValue>;

pub(super) const PK: &str = "pk";
pub(super) const SK: &str = "sk";
pub(super) const GSI1: &str = "gsi1";
pub(super) const GSI1PK: &str = "gsi1pk";
pub(super) const GSI1SK: &str = "gsi1sk";
pub(super) const GSI2: &str = "gsi2";
pub(super) const GSI2PK: &str = "gsi2pk";
pub(super) const GSI2SK: &str = "gsi2sk";
/// The TTL attribute (epoch seconds); DynamoDB deletes expired items lazily, so exact
/// checks use `expires_at_ms`.
pub(super) const TTL_ATTRIBUTE: &str = "expires_at";
const EXPIRES_AT_MS: &str = "expires_at_ms";
const BODY: &str = "body";
const VERSION: &str = "version";

pub(super) const INSTANCE_SK_PREFIX: &str = "INSTANCE#";
/// Sorts above every `INSTANCE#{id}` key (ids use only `[a-z0-9-]`), bounding a range.
pub(super) const INSTANCE_SK_END: &str = "INSTANCE#~";
pub(super) const PRIORITY_SK_PREFIX: &str = "PRIORITY#";
pub(super) const OPERATIONS_PARTITION: &str = "OPERATIONS";
pub(super) const RUNNABLE_PARTITION: &str = "RUNNABLE";
pub(super) const BACKUP_EXPIRY_PARTITION: &str = "BACKUP_EXPIRY";
pub(super) const AUDIT_PARTITION: &str = "AUDIT";
/// Attribute holding an expiring record's exact expiry (the TTL attribute is in seconds).
pub(super) const EXPIRES_AT_MILLIS: &str = EXPIRES_AT_MS;

pub(super) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// A non-negative millisecond instant, zero-padded to 15 digits (enough until year 33658).
pub(super) fn millis_key(at: Timestamp) -> String {
    format!("{:015}", at.millis().max(0))
}

pub(super) fn tenant_pk(tenant: &TenantId) -> String {
    format!("TENANT#{tenant}")
}

pub(super) fn instance_sk(instance: &str) -> String {
    format!("{INSTANCE_SK_PREFIX}{instance}")
}

pub(super) fn environment_partition(environment: Environment) -> String {
    format!("ENV#{}", environment.as_str())
}

pub(super) fn environment_sort_key(name: &InstanceName) -> String {
    format!("{}#{}", name.tenant, name.instance)
}

pub(super) fn operation_sort_key(created_at: Timestamp, id: &OperationId) -> String {
    format!("{}#{id}", millis_key(created_at))
}

pub(super) fn instance_key(name: &InstanceName) -> Item {
    key(tenant_pk(&name.tenant), instance_sk(name.instance.as_str()))
}

pub(super) fn guard_key(tenant: &TenantId, environment: Environment) -> Item {
    key(
        format!("UNIQUE#{tenant}#{}", environment.as_str()),
        "UNIQUE".to_owned(),
    )
}

/// A custom domain's claim: one item per domain (lower-case; DNS names use `[a-z0-9.-]`),
/// whatever tenant or environment holds it, so the claim is unique across all of them.
pub(super) fn domain_key(domain: &str) -> Item {
    key(format!("DOMAIN#{domain}"), "DOMAIN".to_owned())
}

pub(super) fn operation_key(id: &OperationId) -> Item {
    key(operation_pk(id), "OP".to_owned())
}

fn operation_pk(id: &OperationId) -> String {
    format!("OP#{id}")
}

pub(super) fn event_sk(seq: u64) -> String {
    format!("EVENT#{seq:020}")
}

pub(super) fn event_pk(operation: &OperationId) -> String {
    operation_pk(operation)
}

pub(super) fn request_key(request_id: &RequestId) -> Item {
    key(format!("REQ#{request_id}"), "REQ".to_owned())
}

pub(super) fn listener_pk(listener_arn: &str) -> String {
    format!("LISTENER#{listener_arn}")
}

pub(super) fn backup_key(name: &BackupName) -> Item {
    key(
        tenant_pk(&name.instance.tenant),
        format!("BACKUP#{}#{}", name.instance.instance, name.backup),
    )
}

pub(super) fn backups_partition(instance: &InstanceName) -> String {
    format!("BACKUPS#{}#{}", instance.tenant, instance.instance)
}

pub(super) fn backup_sort_key(created_at: Timestamp, backup: &crate::domain::BackupId) -> String {
    format!("{}#{backup}", millis_key(created_at))
}

/// Sorts after every expiry key of the instant `at` (ids use only `[a-z0-9-]` and `#`).
pub(super) fn expiry_bound(at: Timestamp) -> String {
    format!("{}#~", millis_key(at))
}

fn backup_item(backup: &Backup) -> StoreResult<Item> {
    let mut item = backup_key(&backup.name);
    item.extend([
        (
            GSI1PK.to_owned(),
            s(backups_partition(&backup.name.instance)),
        ),
        (
            GSI1SK.to_owned(),
            s(backup_sort_key(backup.created_at, &backup.name.backup)),
        ),
        (GSI2PK.to_owned(), s(BACKUP_EXPIRY_PARTITION)),
        (
            GSI2SK.to_owned(),
            s(format!(
                "{}#{}#{}#{}",
                millis_key(backup.expire_at),
                backup.name.instance.tenant,
                backup.name.instance.instance,
                backup.name.backup
            )),
        ),
        ("state".to_owned(), s(backup.state.as_str())),
        (VERSION.to_owned(), n(backup.version)),
        (BODY.to_owned(), body(backup)?),
    ]);
    Ok(item)
}

/// Zero-padded so that a listener's claims come back in priority order.
fn priority_key(listener_arn: &str, priority: u32) -> Item {
    key(
        listener_pk(listener_arn),
        format!("{PRIORITY_SK_PREFIX}{priority:010}"),
    )
}

fn key(pk: String, sk: String) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

fn body<T: Serialize>(value: &T) -> StoreResult<AttributeValue> {
    serde_json::to_string(value)
        .map(s)
        .map_err(|error| StoreError::Internal(format!("cannot encode record: {error}")))
}

/// Decodes an item's `body`, the JSON of the domain struct.
pub(super) fn decode<T: DeserializeOwned>(item: &Item) -> StoreResult<T> {
    let text = match item.get(BODY) {
        Some(AttributeValue::S(text)) => text,
        _ => {
            return Err(StoreError::Internal(format!(
                "item {} / {} has no body",
                key_text(item, PK),
                key_text(item, SK)
            )));
        }
    };
    serde_json::from_str(text).map_err(|error| {
        StoreError::Internal(format!(
            "cannot decode item {} / {}: {error}",
            key_text(item, PK),
            key_text(item, SK)
        ))
    })
}

fn key_text<'a>(item: &'a Item, attribute: &str) -> &'a str {
    match item.get(attribute) {
        Some(AttributeValue::S(text)) => text,
        _ => "?",
    }
}

fn instance_item(instance: &Instance) -> StoreResult<Item> {
    let mut item = instance_key(&instance.name);
    item.extend([
        (
            GSI1PK.to_owned(),
            s(environment_partition(instance.spec.environment)),
        ),
        (GSI1SK.to_owned(), s(environment_sort_key(&instance.name))),
        ("tenant".to_owned(), s(instance.name.tenant.as_str())),
        (
            "environment".to_owned(),
            s(instance.spec.environment.as_str()),
        ),
        ("state".to_owned(), s(instance.state.as_str())),
        (VERSION.to_owned(), n(instance.version)),
        (BODY.to_owned(), body(instance)?),
    ]);
    Ok(item)
}

fn guard_item(guard: &Guard) -> StoreResult<Item> {
    let mut item = guard_key(&guard.tenant, guard.environment);
    item.extend([
        ("instance".to_owned(), s(guard.instance.as_str())),
        (BODY.to_owned(), body(guard)?),
    ]);
    Ok(item)
}

fn domain_item(claim: &DomainClaim) -> StoreResult<Item> {
    let mut item = domain_key(&claim.domain);
    item.extend([
        ("owner".to_owned(), s(claim.owner.to_string())),
        (BODY.to_owned(), body(claim)?),
    ]);
    Ok(item)
}

/// Absent, or held by `claim.owner`: what both a (repeated) claim and a release require.
fn domain_owner_condition(claim: &DomainClaim) -> Condition {
    Condition {
        expression: "attribute_not_exists(#owner) OR #owner = :owner".to_owned(),
        names: HashMap::from([("#owner".to_owned(), "owner".to_owned())]),
        values: HashMap::from([(":owner".to_owned(), s(claim.owner.to_string()))]),
    }
}

fn operation_item(operation: &Operation) -> StoreResult<Item> {
    let mut item = operation_key(&operation.id);
    item.extend([
        (GSI1PK.to_owned(), s(OPERATIONS_PARTITION)),
        (
            GSI1SK.to_owned(),
            s(operation_sort_key(operation.created_at, &operation.id)),
        ),
        ("status".to_owned(), s(operation.status.as_str())),
        ("target".to_owned(), s(operation.target.to_string())),
        (
            "done".to_owned(),
            AttributeValue::Bool(operation.status.is_done()),
        ),
        (VERSION.to_owned(), n(operation.version)),
        (BODY.to_owned(), body(operation)?),
    ]);
    // The runnable index is sparse: only unfinished operations carry its keys, and a put
    // replaces the whole item, so finishing an operation drops it from the index.
    if !operation.status.is_done() {
        let lease_expiry = operation
            .lease
            .as_ref()
            .map_or(Timestamp(0), |lease| lease.expires_at);
        item.extend([
            (GSI2PK.to_owned(), s(RUNNABLE_PARTITION)),
            (
                GSI2SK.to_owned(),
                s(operation_sort_key(lease_expiry, &operation.id)),
            ),
        ]);
    }
    Ok(item)
}

fn event_item(event: &OperationEvent) -> StoreResult<Item> {
    let mut item = key(event_pk(&event.operation), event_sk(event.seq));
    item.extend([
        ("seq".to_owned(), n(event.seq)),
        (BODY.to_owned(), body(event)?),
    ]);
    Ok(item)
}

/// The audit partition of a tenant's events; `-` holds those whose tenant is unknown.
pub(super) fn audit_pk(tenant: Option<&TenantId>) -> String {
    match tenant {
        Some(tenant) => format!("AUDIT#{tenant}"),
        None => "AUDIT#-".to_owned(),
    }
}

pub(super) fn audit_sort_key(time: Timestamp, id: &str) -> String {
    format!("{}#{id}", millis_key(time))
}

/// Epoch seconds for the TTL attribute, rounded up so DynamoDB never deletes a record
/// before it expired.
fn ttl_seconds(at: Timestamp) -> i64 {
    at.millis().div_euclid(1000) + i64::from(at.millis().rem_euclid(1000) != 0)
}

pub(super) fn audit_item(event: &AuditEvent) -> StoreResult<Item> {
    let sort_key = audit_sort_key(event.time, &event.id);
    let mut item = key(audit_pk(event.tenant.as_ref()), sort_key.clone());
    item.extend([
        (GSI1PK.to_owned(), s(AUDIT_PARTITION)),
        (GSI1SK.to_owned(), s(sort_key)),
        ("principal".to_owned(), s(&event.principal)),
        ("method".to_owned(), s(&event.method)),
        ("target".to_owned(), s(&event.target)),
        ("outcome".to_owned(), s(&event.outcome)),
        (TTL_ATTRIBUTE.to_owned(), n(ttl_seconds(event.expires_at))),
        (EXPIRES_AT_MS.to_owned(), n(event.expires_at.millis())),
        (BODY.to_owned(), body(event)?),
    ]);
    Ok(item)
}

fn request_item(record: &RequestRecord) -> StoreResult<Item> {
    let mut item = request_key(&record.request_id);
    item.extend([
        (TTL_ATTRIBUTE.to_owned(), n(ttl_seconds(record.expires_at))),
        (EXPIRES_AT_MS.to_owned(), n(record.expires_at.millis())),
        (BODY.to_owned(), body(record)?),
    ]);
    Ok(item)
}

fn priority_item(claim: &PriorityClaim) -> StoreResult<Item> {
    let mut item = priority_key(&claim.listener_arn, claim.priority);
    item.extend([
        ("owner".to_owned(), s(claim.owner.to_string())),
        (BODY.to_owned(), body(claim)?),
    ]);
    Ok(item)
}

/// A condition expression with exactly the names and values it uses (DynamoDB and moto
/// reject unused ones).
#[derive(Debug, Default)]
pub(super) struct Condition {
    pub expression: String,
    pub names: HashMap<String, String>,
    pub values: HashMap<String, AttributeValue>,
}

impl Condition {
    fn not_exists() -> Self {
        Self {
            expression: "attribute_not_exists(#pk)".to_owned(),
            names: HashMap::from([("#pk".to_owned(), PK.to_owned())]),
            values: HashMap::new(),
        }
    }

    fn version_is(expected: u64) -> Self {
        Self {
            expression: "#version = :expected".to_owned(),
            names: HashMap::from([("#version".to_owned(), VERSION.to_owned())]),
            values: HashMap::from([(":expected".to_owned(), n(expected))]),
        }
    }

    /// `None` for an empty map, which DynamoDB refuses.
    pub fn values(&self) -> Option<HashMap<String, AttributeValue>> {
        (!self.values.is_empty()).then(|| self.values.clone())
    }
}

#[derive(Debug)]
pub(super) enum Action {
    Put(Item),
    Delete(Item),
}

/// One write of a batch as DynamoDB will see it.
#[derive(Debug)]
pub(super) struct PlannedWrite {
    pub action: Action,
    pub condition: Condition,
}

impl PlannedWrite {
    /// The item's primary key, to refuse batches that touch one item twice.
    pub fn key(&self) -> (String, String) {
        let item = match &self.action {
            Action::Put(item) | Action::Delete(item) => item,
        };
        (key_text(item, PK).to_owned(), key_text(item, SK).to_owned())
    }
}

/// Translates a write into its item and condition; versions are bumped here (create → 1,
/// update → expected + 1, in both the `version` attribute and the body).
pub(super) fn plan(write: &Write) -> StoreResult<PlannedWrite> {
    let put = |item, condition| PlannedWrite {
        action: Action::Put(item),
        condition,
    };
    Ok(match write {
        Write::CreateInstance(instance) => {
            let stored = Instance {
                version: 1,
                ..instance.clone()
            };
            put(instance_item(&stored)?, Condition::not_exists())
        }
        Write::UpdateInstance(instance) => {
            let stored = Instance {
                version: instance.version.saturating_add(1),
                ..instance.clone()
            };
            put(
                instance_item(&stored)?,
                Condition::version_is(instance.version),
            )
        }
        Write::ClaimGuard(guard) => put(guard_item(guard)?, Condition::not_exists()),
        Write::ReleaseGuard(guard) => PlannedWrite {
            action: Action::Delete(guard_key(&guard.tenant, guard.environment)),
            condition: Condition {
                expression: "attribute_not_exists(#instance) OR #instance = :instance".to_owned(),
                names: HashMap::from([("#instance".to_owned(), "instance".to_owned())]),
                values: HashMap::from([(":instance".to_owned(), s(guard.instance.as_str()))]),
            },
        },
        Write::ClaimDomain(claim) => put(domain_item(claim)?, domain_owner_condition(claim)),
        Write::ReleaseDomain(claim) => PlannedWrite {
            action: Action::Delete(domain_key(&claim.domain)),
            condition: domain_owner_condition(claim),
        },
        Write::CreateOperation(operation) => {
            let stored = Operation {
                version: 1,
                ..operation.clone()
            };
            put(operation_item(&stored)?, Condition::not_exists())
        }
        Write::UpdateOperation(operation) => {
            let stored = Operation {
                version: operation.version.saturating_add(1),
                ..operation.clone()
            };
            put(
                operation_item(&stored)?,
                Condition::version_is(operation.version),
            )
        }
        Write::AppendEvent(event) => put(event_item(event)?, Condition::not_exists()),
        // An expired record (past `expires_at_ms` at the new record's `created_at`) counts
        // as absent even if TTL has not deleted it yet.
        Write::PutRequest(record) => put(
            request_item(record)?,
            Condition {
                expression: "attribute_not_exists(#pk) OR #expires_at_ms < :now".to_owned(),
                names: HashMap::from([
                    ("#pk".to_owned(), PK.to_owned()),
                    ("#expires_at_ms".to_owned(), EXPIRES_AT_MS.to_owned()),
                ]),
                values: HashMap::from([(":now".to_owned(), n(record.created_at.millis()))]),
            },
        ),
        Write::ClaimPriority(claim) => put(priority_item(claim)?, Condition::not_exists()),
        Write::CreateBackup(backup) => {
            let stored = Backup {
                version: 1,
                ..backup.clone()
            };
            put(backup_item(&stored)?, Condition::not_exists())
        }
        Write::UpdateBackup(backup) => {
            let stored = Backup {
                version: backup.version.saturating_add(1),
                ..backup.clone()
            };
            put(backup_item(&stored)?, Condition::version_is(backup.version))
        }
        Write::DeleteBackup(backup) => PlannedWrite {
            action: Action::Delete(backup_key(&backup.name)),
            condition: Condition::version_is(backup.version),
        },
        Write::ReleasePriority(claim) => PlannedWrite {
            action: Action::Delete(priority_key(&claim.listener_arn, claim.priority)),
            condition: Condition {
                expression: "#owner = :owner".to_owned(),
                names: HashMap::from([("#owner".to_owned(), "owner".to_owned())]),
                values: HashMap::from([(":owner".to_owned(), s(claim.owner.to_string()))]),
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_keys_sort_like_numbers() {
        assert!(millis_key(Timestamp(999)) < millis_key(Timestamp(1000)));
        assert!(event_sk(9) < event_sk(10));
        assert_eq!(event_sk(u64::MAX).len(), "EVENT#".len() + 20);
        assert_eq!(millis_key(Timestamp(-5)), millis_key(Timestamp(0)));
    }

    #[test]
    fn environment_sort_key_orders_like_the_tuple() {
        let name = |tenant: &str, instance: &str| {
            InstanceName::new(
                TenantId::parse(tenant).unwrap(),
                crate::domain::InstanceId::parse(instance).unwrap(),
            )
        };
        let mut names = vec![
            name("acme0", "a"),
            name("acme-2", "a"),
            name("acme", "wp1"),
            name("acme", "wp-1"),
            name("acme", "wp"),
        ];
        let mut by_key = names.clone();
        names.sort();
        by_key.sort_by_key(environment_sort_key);
        assert_eq!(names, by_key);
    }
}
