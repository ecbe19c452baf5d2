//! Creating the table (`instance-manager bootstrap`): keys, both indexes, on-demand
//! billing, and TTL on request records.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType,
    Projection, ProjectionType, ScalarAttributeType, TableDescription, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};

use super::DynamoStore;
use super::errors::classify;
use super::items::{GSI1, GSI1PK, GSI1SK, GSI2, GSI2PK, GSI2SK, PK, SK, TTL_ATTRIBUTE};
use crate::store::{StoreError, StoreResult};

/// How long a new table may take to become ACTIVE. DynamoDB usually needs seconds to a
/// minute for an on-demand table with two indexes; past this something is wrong.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);
const POLL_INTERVAL_START: Duration = Duration::from_millis(250);
const POLL_INTERVAL_MAX: Duration = Duration::from_secs(5);

fn build_error(error: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Internal(format!("cannot build table definition: {error}"))
}

fn key_element(attribute: &str, key_type: KeyType) -> StoreResult<KeySchemaElement> {
    KeySchemaElement::builder()
        .attribute_name(attribute)
        .key_type(key_type)
        .build()
        .map_err(build_error)
}

fn string_attribute(attribute: &str) -> StoreResult<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(attribute)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(build_error)
}

fn index(name: &str, hash: &str, range: &str) -> StoreResult<GlobalSecondaryIndex> {
    GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key_element(hash, KeyType::Hash)?)
        .key_schema(key_element(range, KeyType::Range)?)
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::All)
                .build(),
        )
        .build()
        .map_err(build_error)
}

impl DynamoStore {
    /// Creates the table if it does not exist, waits until it and its indexes are ACTIVE,
    /// and enables TTL on `expires_at`. Returns whether it created the table. Safe to call
    /// again (and concurrently): an existing table is checked, not changed.
    pub async fn ensure_table(&self) -> StoreResult<bool> {
        let mut definitions = Vec::new();
        for attribute in [PK, SK, GSI1PK, GSI1SK, GSI2PK, GSI2SK] {
            definitions.push(string_attribute(attribute)?);
        }
        let created = match self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .set_attribute_definitions(Some(definitions))
            .key_schema(key_element(PK, KeyType::Hash)?)
            .key_schema(key_element(SK, KeyType::Range)?)
            .global_secondary_indexes(index(GSI1, GSI1PK, GSI1SK)?)
            .global_secondary_indexes(index(GSI2, GSI2PK, GSI2SK)?)
            .send()
            .await
        {
            Ok(_) => true,
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|service| service.is_resource_in_use_exception()) =>
            {
                false
            }
            Err(error) => return Err(classify("create table", &error)),
        };
        let table = self.wait_until_active().await?;
        self.check_indexes(&table)?;
        self.ensure_ttl().await?;
        Ok(created)
    }

    pub(super) async fn describe_table(&self) -> StoreResult<TableDescription> {
        let response = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|error| match error.as_service_error() {
                Some(service) if service.is_resource_not_found_exception() => {
                    StoreError::Unavailable(format!("table {} does not exist", self.table))
                }
                _ => classify("describe table", &error),
            })?;
        response.table.ok_or_else(|| {
            StoreError::Internal(format!("describe table {} returned no table", self.table))
        })
    }

    async fn wait_until_active(&self) -> StoreResult<TableDescription> {
        let deadline = tokio::time::Instant::now() + TABLE_ACTIVE_TIMEOUT;
        let mut interval = POLL_INTERVAL_START;
        loop {
            // Right after CreateTable a describe may briefly not find the table yet.
            let last = match self.describe_table().await {
                Ok(table) => {
                    let indexes_active = table
                        .global_secondary_indexes()
                        .iter()
                        .all(|index| index.index_status() == Some(&IndexStatus::Active));
                    if table.table_status() == Some(&TableStatus::Active) && indexes_active {
                        return Ok(table);
                    }
                    format!("status {:?}", table.table_status())
                }
                Err(StoreError::Unavailable(message)) => message,
                Err(other) => return Err(other),
            };
            if tokio::time::Instant::now() + interval > deadline {
                return Err(StoreError::Unavailable(format!(
                    "table {} did not become active within {TABLE_ACTIVE_TIMEOUT:?} ({last})",
                    self.table
                )));
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(POLL_INTERVAL_MAX);
        }
    }

    /// An existing table made by something else must still have the indexes the store
    /// queries, or every listing would fail later with a less helpful error.
    fn check_indexes(&self, table: &TableDescription) -> StoreResult<()> {
        for wanted in [GSI1, GSI2] {
            if !table
                .global_secondary_indexes()
                .iter()
                .any(|index| index.index_name() == Some(wanted))
            {
                return Err(StoreError::Internal(format!(
                    "table {} exists without index {wanted}",
                    self.table
                )));
            }
        }
        Ok(())
    }

    async fn ensure_ttl(&self) -> StoreResult<()> {
        let current = self
            .client
            .describe_time_to_live()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|error| classify("describe time to live", &error))?;
        if let Some(description) = current.time_to_live_description()
            && matches!(
                description.time_to_live_status(),
                Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
            )
        {
            return match description.attribute_name() {
                Some(TTL_ATTRIBUTE) => Ok(()),
                other => Err(StoreError::Internal(format!(
                    "table {} has TTL on {other:?}, expected {TTL_ATTRIBUTE}",
                    self.table
                ))),
            };
        }
        let specification = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(TTL_ATTRIBUTE)
            .build()
            .map_err(build_error)?;
        match self
            .client
            .update_time_to_live()
            .table_name(&self.table)
            .time_to_live_specification(specification)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // A concurrent bootstrap may have enabled it between describe and update.
            Err(error)
                if error
                    .as_service_error()
                    .and_then(|service| service.meta().message())
                    .is_some_and(|message| message.contains("already enabled")) =>
            {
                Ok(())
            }
            Err(error) => Err(classify("update time to live", &error)),
        }
    }
}
