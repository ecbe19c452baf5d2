//! CheckInstanceHealth: a unary read (not an operation) that looks at the instance's cloud
//! resources directly (see [`crate::health`] for the checks and the overall rule).
//!
//! Errors: INVALID_ARGUMENT (`name`), NOT_FOUND, FAILED_PRECONDITION `WRONG_STATE` when the
//! instance has no resources to check (PENDING_PROVISIONING, PROVISIONING — its resources
//! are recorded when provisioning completes —, DEPROVISIONED, or FAILED after a create that
//! was rolled back), FAILED_PRECONDITION `ENVIRONMENT_UNAVAILABLE` when its environment is
//! not served here, UNAVAILABLE `ENVIRONMENT_UNAVAILABLE` when this replica has no cloud
//! access at all. A failing dependency is a failed check in the report, never an error.

use tokio::time::Instant;

use crate::domain::{InstanceName, InstanceState};
use crate::health::{self, Status};
use crate::proto::v1;

use super::Api;
use super::convert;
use super::error::{ApiError, ApiResult, reason};

fn status_to_proto(status: Status) -> v1::HealthStatus {
    match status {
        Status::Skipped => v1::HealthStatus::Unspecified,
        Status::Healthy => v1::HealthStatus::Healthy,
        Status::Degraded => v1::HealthStatus::Degraded,
        Status::Unhealthy => v1::HealthStatus::Unhealthy,
    }
}

fn duration(value: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}

impl Api {
    pub async fn check_instance_health(
        &self,
        request: v1::CheckInstanceHealthRequest,
    ) -> ApiResult<v1::HealthReport> {
        let deadline = Instant::now() + self.settings.health.overall;
        let name = InstanceName::parse(&request.name)
            .map_err(|e| ApiError::invalid("name", e.to_string()))?;
        let instance = self
            .store
            .get_instance(&name)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(name.to_string()))?;
        let nothing_to_check = match instance.state {
            InstanceState::PendingProvisioning
            | InstanceState::Provisioning
            | InstanceState::Deprovisioned => true,
            InstanceState::Failed => instance.released || instance.resources.is_empty(),
            _ => false,
        };
        if nothing_to_check {
            return Err(ApiError::FailedPrecondition {
                reason: reason::WRONG_STATE,
                message: format!(
                    "{} is {}; it has no resources to check",
                    instance.name, instance.state
                ),
                metadata: vec![("state", instance.state.to_string())],
            });
        }
        let environment = instance.spec.environment;
        self.check_environment(environment)?;
        let Some(clouds) = &self.clouds else {
            return Err(ApiError::NoCloudAccess(
                "this replica has no cloud access (no environments configured); try another".into(),
            ));
        };
        let cloud =
            clouds
                .env(environment)
                .await
                .map_err(|error| ApiError::FailedPrecondition {
                    reason: reason::ENVIRONMENT_UNAVAILABLE,
                    message: format!("environment {environment} cannot be reached: {error}"),
                    metadata: vec![("environment", environment.to_string())],
                })?;
        let report = health::check(&instance, &cloud, &self.settings.health, deadline).await;
        tracing::info!(
            instance = %instance.name,
            overall = ?report.overall,
            failing = ?report
                .checks
                .iter()
                .filter(|c| matches!(c.status, Status::Unhealthy | Status::Degraded))
                .map(|c| c.name)
                .collect::<Vec<_>>(),
            "health checked"
        );
        Ok(v1::HealthReport {
            name: instance.name.to_string(),
            overall: status_to_proto(report.overall).into(),
            checks: report
                .checks
                .into_iter()
                .map(|check| v1::HealthCheck {
                    name: check.name.to_owned(),
                    status: status_to_proto(check.status).into(),
                    reason: check.reason,
                    latency: Some(duration(check.latency)),
                })
                .collect(),
            check_time: Some(convert::timestamp(report.checked_at)),
        })
    }
}
