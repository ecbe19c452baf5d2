//! The environment's shared RDS DB instance, read-only: what the health check reports.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_rds::Client;
use aws_sdk_rds::types::Filter;

use crate::cloud::error::classify;
use crate::cloud::{CloudResult, DbInstanceStatus, DbInstances};

pub struct AwsDbInstances {
    client: Client,
}

impl AwsDbInstances {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: Client::new(sdk),
        }
    }

    /// Pending maintenance actions of the instance `arn` (`action: description`, with the
    /// date it will be applied when one is set).
    async fn pending_maintenance(&self, arn: &str) -> CloudResult<Vec<String>> {
        let answer = self
            .client
            .describe_pending_maintenance_actions()
            .filters(Filter::builder().name("db-instance-id").values(arn).build())
            .send()
            .await
            .map_err(|e| classify("rds:DescribePendingMaintenanceActions", &e))?;
        Ok(answer
            .pending_maintenance_actions()
            .iter()
            .flat_map(|resource| resource.pending_maintenance_action_details())
            .map(|action| {
                let mut text = action.action().unwrap_or("maintenance").to_owned();
                if let Some(description) = action.description() {
                    text.push_str(": ");
                    text.push_str(description);
                }
                if let Some(at) = action.current_apply_date() {
                    text.push_str(&format!(" (applied {at})"));
                }
                text
            })
            .collect())
    }
}

#[async_trait]
impl DbInstances for AwsDbInstances {
    async fn db_instance(&self, identifier: &str) -> CloudResult<Option<DbInstanceStatus>> {
        let answer = self
            .client
            .describe_db_instances()
            .db_instance_identifier(identifier)
            .send()
            .await
            .map_err(|e| classify("rds:DescribeDBInstances", &e));
        let instance = match answer {
            Ok(out) => match out.db_instances().first() {
                Some(instance) => instance.clone(),
                None => return Ok(None),
            },
            Err(error) if error.is_not_found() => return Ok(None),
            Err(error) => return Err(error),
        };
        let pending_maintenance = match instance.db_instance_arn() {
            Some(arn) => self.pending_maintenance(arn).await?,
            None => Vec::new(),
        };
        Ok(Some(DbInstanceStatus {
            identifier: instance
                .db_instance_identifier()
                .unwrap_or(identifier)
                .to_owned(),
            status: instance.db_instance_status().unwrap_or_default().to_owned(),
            engine: instance.engine().unwrap_or_default().to_owned(),
            allocated_storage_gib: instance.allocated_storage(),
            max_allocated_storage_gib: instance.max_allocated_storage(),
            pending_maintenance,
        }))
    }
}
