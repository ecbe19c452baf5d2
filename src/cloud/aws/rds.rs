//! The environment's shared RDS DB instance, read-only: what the health check reports, where
//! the control plane connects, and RDS IAM authentication tokens for that connection.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_rds::Client;
use aws_sdk_rds::types::PendingModifiedValues;

use crate::cloud::error::classify;
use crate::cloud::{
    CloudError, CloudResult, DbEndpoint, DbInstanceStatus, DbInstances, ErrorKind, Secret,
};

/// RDS's longest (and our) lifetime of an IAM authentication token.
pub const AUTH_TOKEN_SECS: u64 = 15 * 60;

pub struct AwsDbInstances {
    client: Client,
    /// The environment's configuration (its assumed-role credentials, region and clock),
    /// which signs authentication tokens.
    sdk: SdkConfig,
}

impl AwsDbInstances {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: super::traced_client!(aws_sdk_rds, sdk),
            sdk: sdk.clone(),
        }
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
        Ok(Some(DbInstanceStatus {
            identifier: instance
                .db_instance_identifier()
                .unwrap_or(identifier)
                .to_owned(),
            status: instance.db_instance_status().unwrap_or_default().to_owned(),
            engine: instance.engine().unwrap_or_default().to_owned(),
            allocated_storage_gib: instance.allocated_storage(),
            max_allocated_storage_gib: instance.max_allocated_storage(),
            pending_maintenance: instance
                .pending_modified_values()
                .map(pending_changes)
                .unwrap_or_default(),
            maintenance_window: instance.preferred_maintenance_window().map(str::to_owned),
            endpoint: instance.endpoint().and_then(|endpoint| {
                Some(DbEndpoint {
                    address: endpoint.address()?.to_owned(),
                    port: u16::try_from(endpoint.port()?).ok()?,
                    ca_identifier: instance.ca_certificate_identifier().map(str::to_owned),
                    iam_auth_enabled: instance
                        .iam_database_authentication_enabled()
                        .unwrap_or(false),
                    resource_id: instance.dbi_resource_id().map(str::to_owned),
                })
            }),
        }))
    }

    async fn auth_token(&self, host: &str, port: u16, user: &str) -> CloudResult<Secret> {
        use aws_sdk_rds::auth_token::{AuthTokenGenerator, Config};
        let what = format!("rds-db:connect token for {user} at {host}:{port}");
        let config = Config::builder()
            .hostname(host)
            .port(u64::from(port))
            .username(user)
            .expires_in(AUTH_TOKEN_SECS)
            .build()
            .map_err(|e| CloudError::fatal(format!("{what}: {e}")))?;
        // Signing is local; what can fail is fetching the role's credentials.
        let token = AuthTokenGenerator::new(config)
            .auth_token(&self.sdk)
            .await
            .map_err(|e| CloudError::new(ErrorKind::Retryable, format!("{what}: {e}")))?;
        Ok(Secret::new(token.as_str()))
    }
}

/// The changes RDS will apply in the next maintenance window (`PendingModifiedValues`), one
/// entry per changed setting; secrets are named, never shown.
fn pending_changes(pending: &PendingModifiedValues) -> Vec<String> {
    let mut changes = Vec::new();
    let mut add = |what: &str, value: Option<String>| {
        if let Some(value) = value {
            changes.push(format!("{what} -> {value}"));
        }
    };
    add(
        "instance class",
        pending.db_instance_class().map(str::to_owned),
    );
    add(
        "engine version",
        pending.engine_version().map(str::to_owned),
    );
    add(
        "storage GiB",
        pending.allocated_storage().map(|v| v.to_string()),
    );
    add("storage type", pending.storage_type().map(str::to_owned));
    add("iops", pending.iops().map(|v| v.to_string()));
    add("multi-AZ", pending.multi_az().map(|v| v.to_string()));
    add(
        "backup retention days",
        pending.backup_retention_period().map(|v| v.to_string()),
    );
    add(
        "CA certificate",
        pending.ca_certificate_identifier().map(str::to_owned),
    );
    if pending.master_user_password().is_some() {
        changes.push("master password change".to_owned());
    }
    changes
}
