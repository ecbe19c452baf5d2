//! [`StateStore`] on one DynamoDB table (layout in [`items`]).
//!
//! Consistency: every read of the base table (gets, a tenant's instances, event logs) is a
//! strongly consistent read. Global secondary indexes cannot be read consistently, so
//! listing instances across tenants, listing operations and finding runnable operations
//! are eventually consistent in real DynamoDB (typically well under a second behind);
//! moto applies index updates at once. Workers tolerate this because claiming an operation
//! is a conditional write on the operation's version, which is always checked against the
//! latest data.
//!
//! Writes: a batch of one is a conditional `PutItem`/`DeleteItem`; a larger batch is one
//! `TransactWriteItems`, which the SDK retries with the same client request token, so a
//! retried transaction is applied once and answers as the first attempt did. A single
//! write has no such token: if its first attempt was applied but the answer was lost
//! (timeout, dropped connection), the SDK's retry fails its own condition and reports
//! `Conflict`. That is rare and callers already answer `Conflict` by re-reading, where
//! they find their own write. (Sending single writes as one-item transactions would
//! close the gap at twice the write cost.)

mod errors;
mod items;
mod schema;

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TableStatus, TransactWriteItem};
use serde::de::DeserializeOwned;

use self::errors::{cancellation_error, classify};
use self::items::{Action, Condition, Item, PlannedWrite};
use super::{
    AuditCursor, AuditQuery, BackupCursor, DomainClaim, Guard, InstanceCursor, InstanceQuery,
    OperationCursor, OperationQuery, Page, PriorityClaim, RequestRecord, StateStore, StoreError,
    StoreResult, Write, WriteKind,
};
use crate::domain::{
    AuditEvent, Backup, BackupName, Environment, Instance, InstanceName, Operation, OperationEvent,
    OperationId, RequestId, TenantId, Timestamp,
};

/// DynamoDB's limit on the items of one `TransactWriteItems`.
const MAX_BATCH_WRITES: usize = 100;

/// A [`StateStore`] backed by one DynamoDB table.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

/// One `Query`, repeated over DynamoDB's pages: exactly the names and values its
/// expressions use.
struct QuerySpec {
    index: Option<&'static str>,
    key_condition: String,
    filter: Option<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    ascending: bool,
}

impl QuerySpec {
    fn new(index: Option<&'static str>, ascending: bool) -> Self {
        Self {
            index,
            key_condition: String::new(),
            filter: None,
            names: HashMap::new(),
            values: HashMap::new(),
            ascending,
        }
    }

    fn name(&mut self, placeholder: &str, attribute: &str) -> &mut Self {
        self.names
            .insert(placeholder.to_owned(), attribute.to_owned());
        self
    }

    fn value(&mut self, placeholder: &str, value: AttributeValue) -> &mut Self {
        self.values.insert(placeholder.to_owned(), value);
        self
    }

    /// Adds `attribute = value` to the filter expression.
    fn filter_equals(&mut self, attribute: &str, value: AttributeValue) -> &mut Self {
        let clause = format!("#f_{attribute} = :f_{attribute}");
        self.filter = Some(match self.filter.take() {
            Some(filter) => format!("{filter} AND {clause}"),
            None => clause,
        });
        self.name(&format!("#f_{attribute}"), attribute)
            .value(&format!(":f_{attribute}"), value)
    }
}

impl QuerySpec {
    /// Adds `begins_with(attribute, prefix)` to the filter expression.
    fn filter_prefix(&mut self, attribute: &str, prefix: String) -> &mut Self {
        let clause = format!("begins_with(#p_{attribute}, :p_{attribute})");
        self.filter = Some(match self.filter.take() {
            Some(filter) => format!("{filter} AND {clause}"),
            None => clause,
        });
        self.name(&format!("#p_{attribute}"), attribute)
            .value(&format!(":p_{attribute}"), items::s(prefix))
    }

    /// Adds `attribute > value` (a number) to the filter expression.
    fn filter_greater(&mut self, attribute: &str, value: i64) -> &mut Self {
        let clause = format!("#g_{attribute} > :g_{attribute}");
        self.filter = Some(match self.filter.take() {
            Some(filter) => format!("{filter} AND {clause}"),
            None => clause,
        });
        self.name(&format!("#g_{attribute}"), attribute).value(
            &format!(":g_{attribute}"),
            AttributeValue::N(value.to_string()),
        )
    }
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    async fn get_item(&self, key: Item) -> StoreResult<Option<Item>> {
        let response = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|error| classify("get item", &error))?;
        Ok(response.item)
    }

    async fn get_decoded<T: DeserializeOwned>(&self, key: Item) -> StoreResult<Option<T>> {
        self.get_item(key)
            .await?
            .map(|item| items::decode(&item))
            .transpose()
    }

    /// Runs `spec` page after page, appending matches to `found` until it holds `want`
    /// items or the data is exhausted. With a filter, DynamoDB applies `Limit` before
    /// filtering, so a page may hold fewer matches than asked for (even none) while more
    /// exist; only a missing `LastEvaluatedKey` means the end.
    async fn query_into(
        &self,
        spec: &QuerySpec,
        want: usize,
        found: &mut Vec<Item>,
    ) -> StoreResult<()> {
        let mut start_key = None;
        while found.len() < want {
            // Evaluating only as many items as are still wanted reads no more than needed
            // when nothing is filtered out.
            let remaining = want - found.len();
            let response = self
                .client
                .query()
                .table_name(&self.table)
                .set_index_name(spec.index.map(str::to_owned))
                .key_condition_expression(&spec.key_condition)
                .set_filter_expression(spec.filter.clone())
                .set_expression_attribute_names(Some(spec.names.clone()))
                .set_expression_attribute_values(Some(spec.values.clone()))
                .scan_index_forward(spec.ascending)
                // Index reads cannot be consistent (DynamoDB refuses the flag).
                .consistent_read(spec.index.is_none())
                .limit(i32::try_from(remaining).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start_key.take())
                .send()
                .await
                .map_err(|error| classify("query", &error))?;
            found.extend(
                response
                    .items
                    .unwrap_or_default()
                    .into_iter()
                    .take(remaining),
            );
            match response.last_evaluated_key {
                Some(key) => start_key = Some(key),
                None => break,
            }
        }
        Ok(())
    }

    async fn commit_one(&self, write: &Write, planned: PlannedWrite) -> StoreResult<()> {
        let conflict = StoreError::Conflict {
            index: 0,
            kind: write.kind(),
        };
        let values = planned.condition.values();
        let Condition {
            expression, names, ..
        } = planned.condition;
        match planned.action {
            Action::Put(item) => self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression(expression)
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(values)
                .send()
                .await
                .map(drop)
                .map_err(|error| match error.as_service_error() {
                    Some(service) if service.is_conditional_check_failed_exception() => conflict,
                    _ => classify("put item", &error),
                }),
            Action::Delete(key) => self
                .client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key))
                .condition_expression(expression)
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(values)
                .send()
                .await
                .map(drop)
                .map_err(|error| match error.as_service_error() {
                    Some(service) if service.is_conditional_check_failed_exception() => conflict,
                    _ => classify("delete item", &error),
                }),
        }
    }

    async fn commit_transaction(
        &self,
        writes: &[Write],
        planned: Vec<PlannedWrite>,
    ) -> StoreResult<()> {
        let build_error =
            |error: aws_sdk_dynamodb::error::BuildError| StoreError::Internal(error.to_string());
        let mut transact_items = Vec::with_capacity(planned.len());
        for write in planned {
            let values = write.condition.values();
            let item = match write.action {
                Action::Put(item) => TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&self.table)
                            .set_item(Some(item))
                            .condition_expression(write.condition.expression)
                            .set_expression_attribute_names(Some(write.condition.names))
                            .set_expression_attribute_values(values)
                            .build()
                            .map_err(build_error)?,
                    )
                    .build(),
                Action::Delete(key) => TransactWriteItem::builder()
                    .delete(
                        Delete::builder()
                            .table_name(&self.table)
                            .set_key(Some(key))
                            .condition_expression(write.condition.expression)
                            .set_expression_attribute_names(Some(write.condition.names))
                            .set_expression_attribute_values(values)
                            .build()
                            .map_err(build_error)?,
                    )
                    .build(),
            };
            transact_items.push(item);
        }
        self.client
            .transact_write_items()
            .set_transact_items(Some(transact_items))
            .send()
            .await
            .map(drop)
            .map_err(|error| match error.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => {
                    cancellation_error(cancelled.cancellation_reasons(), writes)
                }
                _ => classify("transact write items", &error),
            })
    }
}

fn decode_all<T: DeserializeOwned>(found: &[Item]) -> StoreResult<Vec<T>> {
    found.iter().map(items::decode).collect()
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

#[async_trait]
impl StateStore for DynamoStore {
    async fn ping(&self) -> StoreResult<()> {
        let table = self.describe_table().await?;
        match table.table_status() {
            Some(TableStatus::Active) => Ok(()),
            status => Err(StoreError::Unavailable(format!(
                "table {} is not active ({status:?})",
                self.table
            ))),
        }
    }

    async fn get_instance(&self, name: &InstanceName) -> StoreResult<Option<Instance>> {
        self.get_decoded(items::instance_key(name)).await
    }

    async fn list_instances(
        &self,
        query: &InstanceQuery,
    ) -> StoreResult<Page<Instance, InstanceCursor>> {
        let limit = query.limit.max(1);
        let want = limit + 1;
        let mut found = Vec::new();
        if let Some(tenant) = &query.tenant {
            // The tenant's partition, in instance id order.
            let mut spec = QuerySpec::new(None, true);
            spec.name("#pk", items::PK)
                .name("#sk", items::SK)
                .value(":pk", items::s(items::tenant_pk(tenant)));
            match &query.after {
                Some(after) => {
                    // BETWEEN is inclusive; `{id}#` is the smallest key above `{id}` since
                    // every id character sorts above '#'.
                    spec.key_condition = "#pk = :pk AND #sk BETWEEN :from AND :to".to_owned();
                    spec.value(
                        ":from",
                        items::s(format!(
                            "{}#",
                            items::instance_sk(after.name.instance.as_str())
                        )),
                    )
                    .value(":to", items::s(items::INSTANCE_SK_END));
                }
                None => {
                    spec.key_condition = "#pk = :pk AND begins_with(#sk, :prefix)".to_owned();
                    spec.value(":prefix", items::s(items::INSTANCE_SK_PREFIX));
                }
            }
            if let Some(environment) = query.environment {
                spec.filter_equals("environment", items::s(environment.as_str()));
            }
            if let Some(state) = query.state {
                spec.filter_equals("state", items::s(state.as_str()));
            }
            self.query_into(&spec, want, &mut found).await?;
        } else {
            // The environment index, one partition per environment in Environment order.
            let environments = match query.environment {
                Some(environment) => vec![environment],
                None => Environment::ALL.to_vec(),
            };
            for environment in environments {
                let after = query.after.as_ref().map(|after| after.environment);
                if after.is_some_and(|after| after > environment) || found.len() >= want {
                    continue;
                }
                let mut spec = QuerySpec::new(Some(items::GSI1), true);
                spec.name("#pk", items::GSI1PK)
                    .value(":pk", items::s(items::environment_partition(environment)));
                spec.key_condition = "#pk = :pk".to_owned();
                if let Some(after) = &query.after
                    && after.environment == environment
                {
                    spec.key_condition.push_str(" AND #sk > :after");
                    spec.name("#sk", items::GSI1SK)
                        .value(":after", items::s(items::environment_sort_key(&after.name)));
                }
                if let Some(state) = query.state {
                    spec.filter_equals("state", items::s(state.as_str()));
                }
                self.query_into(&spec, want, &mut found).await?;
            }
        }
        Ok(page(decode_all(&found)?, limit, |instance: &Instance| {
            InstanceCursor {
                environment: instance.spec.environment,
                name: instance.name.clone(),
            }
        }))
    }

    async fn get_guard(
        &self,
        tenant: &TenantId,
        environment: Environment,
    ) -> StoreResult<Option<Guard>> {
        self.get_decoded(items::guard_key(tenant, environment))
            .await
    }

    async fn get_domain_claim(&self, domain: &str) -> StoreResult<Option<DomainClaim>> {
        self.get_decoded(items::domain_key(domain)).await
    }

    async fn get_operation(&self, id: &OperationId) -> StoreResult<Option<Operation>> {
        self.get_decoded(items::operation_key(id)).await
    }

    async fn list_operations(
        &self,
        query: &OperationQuery,
    ) -> StoreResult<Page<Operation, OperationCursor>> {
        let limit = query.limit.max(1);
        let mut spec = QuerySpec::new(Some(items::GSI1), false);
        spec.name("#pk", items::GSI1PK)
            .value(":pk", items::s(items::OPERATIONS_PARTITION));
        spec.key_condition = "#pk = :pk".to_owned();
        if let Some(after) = &query.after {
            spec.key_condition.push_str(" AND #sk < :after");
            spec.name("#sk", items::GSI1SK).value(
                ":after",
                items::s(items::operation_sort_key(after.created_at, &after.id)),
            );
        }
        if let Some(tenant) = &query.tenant {
            spec.filter_prefix("target", format!("tenants/{tenant}/"));
        }
        if let Some(target) = &query.target {
            spec.filter_equals("target", items::s(target.to_string()));
        }
        if let Some(status) = query.status {
            spec.filter_equals("status", items::s(status.as_str()));
        }
        if let Some(done) = query.done {
            spec.filter_equals("done", AttributeValue::Bool(done));
        }
        let mut found = Vec::new();
        self.query_into(&spec, limit + 1, &mut found).await?;
        Ok(page(decode_all(&found)?, limit, |operation: &Operation| {
            OperationCursor {
                created_at: operation.created_at,
                id: operation.id.clone(),
            }
        }))
    }

    async fn get_backup(&self, name: &BackupName) -> StoreResult<Option<Backup>> {
        self.get_decoded(items::backup_key(name)).await
    }

    async fn list_backups(
        &self,
        instance: &InstanceName,
        after: Option<&BackupCursor>,
        limit: usize,
    ) -> StoreResult<Page<Backup, BackupCursor>> {
        let limit = limit.max(1);
        // Newest first from the index (eventually consistent, like listing operations).
        let mut spec = QuerySpec::new(Some(items::GSI1), false);
        spec.name("#pk", items::GSI1PK)
            .value(":pk", items::s(items::backups_partition(instance)));
        spec.key_condition = "#pk = :pk".to_owned();
        if let Some(after) = after {
            spec.key_condition.push_str(" AND #sk < :after");
            spec.name("#sk", items::GSI1SK).value(
                ":after",
                items::s(items::backup_sort_key(after.created_at, &after.backup)),
            );
        }
        let mut found = Vec::new();
        self.query_into(&spec, limit + 1, &mut found).await?;
        Ok(page(decode_all(&found)?, limit, |backup: &Backup| {
            BackupCursor {
                created_at: backup.created_at,
                backup: backup.name.backup.clone(),
            }
        }))
    }

    async fn expired_backups(&self, now: Timestamp, limit: usize) -> StoreResult<Vec<Backup>> {
        let mut spec = QuerySpec::new(Some(items::GSI2), true);
        spec.key_condition = "#pk = :pk AND #sk < :bound".to_owned();
        spec.name("#pk", items::GSI2PK)
            .name("#sk", items::GSI2SK)
            .value(":pk", items::s(items::BACKUP_EXPIRY_PARTITION))
            .value(":bound", items::s(items::expiry_bound(now)));
        let mut found = Vec::new();
        self.query_into(&spec, limit.max(1), &mut found).await?;
        decode_all(&found)
    }

    async fn read_events(
        &self,
        operation: &OperationId,
        from_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<OperationEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut spec = QuerySpec::new(None, true);
        spec.key_condition = "#pk = :pk AND #sk BETWEEN :from AND :to".to_owned();
        spec.name("#pk", items::PK)
            .name("#sk", items::SK)
            .value(":pk", items::s(items::event_pk(operation)))
            .value(":from", items::s(items::event_sk(from_seq)))
            .value(":to", items::s(items::event_sk(u64::MAX)));
        let mut found = Vec::new();
        self.query_into(&spec, limit, &mut found).await?;
        decode_all(&found)
    }

    async fn get_request(
        &self,
        request_id: &RequestId,
        now: Timestamp,
    ) -> StoreResult<Option<RequestRecord>> {
        // TTL deletes lazily (often days later): an expired record may still be there.
        let record: Option<RequestRecord> =
            self.get_decoded(items::request_key(request_id)).await?;
        Ok(record.filter(|record| now <= record.expires_at))
    }

    async fn runnable_operations(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> StoreResult<Vec<Operation>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // gsi2sk is `{lease expiry:015}#{id}` (0 without a lease), so every key below
        // `{now:015}` has a lease expiry strictly before `now`: a lease expiring exactly
        // at `now` is still live, as in the memory store.
        let mut spec = QuerySpec::new(Some(items::GSI2), true);
        spec.key_condition = "#pk = :pk AND #sk < :now".to_owned();
        spec.name("#pk", items::GSI2PK)
            .name("#sk", items::GSI2SK)
            .value(":pk", items::s(items::RUNNABLE_PARTITION))
            .value(":now", items::s(items::millis_key(now)));
        let mut found = Vec::new();
        self.query_into(&spec, limit, &mut found).await?;
        decode_all(&found)
    }

    async fn record_audit_event(&self, event: &AuditEvent) -> StoreResult<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(items::audit_item(event)?))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", items::PK)
            .send()
            .await
            .map(drop)
            .map_err(|error| match error.as_service_error() {
                Some(service) if service.is_conditional_check_failed_exception() => {
                    StoreError::Conflict {
                        index: 0,
                        kind: WriteKind::RecordAudit,
                    }
                }
                _ => classify("put audit event", &error),
            })
    }

    async fn list_audit_events(
        &self,
        query: &AuditQuery,
    ) -> StoreResult<Page<AuditEvent, AuditCursor>> {
        let limit = query.limit.max(1);
        // One tenant: its partition of the table (consistent). Every tenant: the index's
        // single partition (eventually consistent, like listing operations).
        let (mut spec, pk, partition) = match &query.tenant {
            Some(tenant) => (
                QuerySpec::new(None, false),
                items::PK,
                items::audit_pk(Some(tenant)),
            ),
            None => (
                QuerySpec::new(Some(items::GSI1), false),
                items::GSI1PK,
                items::AUDIT_PARTITION.to_owned(),
            ),
        };
        let sk = if query.tenant.is_some() {
            items::SK
        } else {
            items::GSI1SK
        };
        spec.name("#pk", pk).value(":pk", items::s(partition));
        spec.key_condition = "#pk = :pk".to_owned();
        if let Some(after) = &query.after {
            spec.key_condition.push_str(" AND #sk < :after");
            spec.name("#sk", sk).value(
                ":after",
                items::s(items::audit_sort_key(after.time, &after.id)),
            );
        }
        spec.filter_greater(items::EXPIRES_AT_MILLIS, query.now.millis());
        for (attribute, wanted) in [
            ("principal", &query.principal),
            ("method", &query.method),
            ("target", &query.target),
            ("outcome", &query.outcome),
        ] {
            if let Some(wanted) = wanted {
                spec.filter_equals(attribute, items::s(wanted));
            }
        }
        let mut found = Vec::new();
        self.query_into(&spec, limit + 1, &mut found).await?;
        Ok(page(decode_all(&found)?, limit, |event: &AuditEvent| {
            AuditCursor {
                time: event.time,
                id: event.id.clone(),
            }
        }))
    }

    async fn listener_priorities(&self, listener_arn: &str) -> StoreResult<Vec<PriorityClaim>> {
        let mut spec = QuerySpec::new(None, true);
        spec.key_condition = "#pk = :pk AND begins_with(#sk, :prefix)".to_owned();
        spec.name("#pk", items::PK)
            .name("#sk", items::SK)
            .value(":pk", items::s(items::listener_pk(listener_arn)))
            .value(":prefix", items::s(items::PRIORITY_SK_PREFIX));
        let mut found = Vec::new();
        self.query_into(&spec, usize::MAX, &mut found).await?;
        decode_all(&found)
    }

    async fn commit(&self, writes: Vec<Write>) -> StoreResult<()> {
        if writes.len() > MAX_BATCH_WRITES {
            return Err(StoreError::InvalidBatch(format!(
                "{} writes in one batch, at most {MAX_BATCH_WRITES} allowed",
                writes.len()
            )));
        }
        let planned = writes
            .iter()
            .map(items::plan)
            .collect::<StoreResult<Vec<_>>>()?;
        let mut keys = HashSet::with_capacity(planned.len());
        for (index, write) in planned.iter().enumerate() {
            if !keys.insert(write.key()) {
                return Err(StoreError::InvalidBatch(format!(
                    "write {index} ({:?}) touches an item an earlier write of the batch touches",
                    writes[index].kind()
                )));
            }
        }
        let mut planned = planned;
        if planned.len() > 1 {
            return self.commit_transaction(&writes, planned).await;
        }
        match (planned.pop(), writes.first()) {
            (Some(planned), Some(write)) => self.commit_one(write, planned).await,
            _ => Ok(()),
        }
    }
}
