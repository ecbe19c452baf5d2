//! GetResourceUsage: what an instance uses, each part measured on its own, in parallel;
//! a part that cannot be measured is named with the reason, never an error of the RPC.
//!
//! - CPU and memory utilisation: CloudWatch `AWS/ECS` averages of the instance's service,
//!   one point per period over the window.
//! - Running and desired tasks: the ECS service now (DescribeServices).
//! - Database size: the data and index bytes of the tenant's tables in information_schema,
//!   read as the tenant's own database user (its secret), not as the master.
//! - EFS: not measured. EFS meters a whole file system (`SizeInBytes`), not an access
//!   point's directory; a per-tenant figure would take a task walking the tenant's tree.

use std::time::Duration;

use crate::cloud::{CloudEnv, ServiceUtilization};
use crate::domain::Instance;
use crate::domain::naming::ResourceNames;
use crate::workflow::provision::SECRET;

/// Limits of a usage request (validated at the API edge).
pub mod limits {
    use std::time::Duration;

    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60 * 60);
    pub const DEFAULT_PERIOD: Duration = Duration::from_secs(5 * 60);
    /// CloudWatch keeps hourly points for 455 days.
    pub const MAX_WINDOW: Duration = Duration::from_secs(455 * 24 * 60 * 60);
    /// Points per series in one answer.
    pub const MAX_POINTS: u64 = 1440;
    /// Standard-resolution metrics (ECS's) have one point a minute at best.
    pub const PERIOD_UNIT_SECS: u64 = 60;
    /// Past 15 days CloudWatch keeps 5-minute points, past 63 days hourly ones: a window
    /// reaching that far needs a period that is a multiple of these.
    pub const FIVE_MINUTE_AFTER: Duration = Duration::from_secs(15 * 24 * 60 * 60);
    pub const HOURLY_AFTER: Duration = Duration::from_secs(63 * 24 * 60 * 60);
}

/// Checks a window and period against CloudWatch's rules; the message names what is wrong.
pub fn check_window(window: Duration, period: Duration) -> Result<(), (&'static str, String)> {
    use limits::*;
    if window.is_zero() {
        return Err(("window", "must be positive".into()));
    }
    if window > MAX_WINDOW {
        return Err((
            "window",
            format!("must be at most {} days", MAX_WINDOW.as_secs() / 86_400),
        ));
    }
    if period.is_zero() {
        return Err(("period", "must be positive".into()));
    }
    if period.subsec_nanos() != 0 || !period.as_secs().is_multiple_of(PERIOD_UNIT_SECS) {
        return Err(("period", "must be a whole number of minutes".into()));
    }
    if period > window {
        return Err(("period", "must not be longer than the window".into()));
    }
    if window.as_secs() / period.as_secs() > MAX_POINTS {
        return Err((
            "period",
            format!("gives more than {MAX_POINTS} points over the window; use a longer period"),
        ));
    }
    if window > HOURLY_AFTER && !period.as_secs().is_multiple_of(3600) {
        return Err((
            "period",
            "must be a multiple of 1 hour for a window longer than 63 days".into(),
        ));
    }
    if window > FIVE_MINUTE_AFTER && !period.as_secs().is_multiple_of(300) {
        return Err((
            "period",
            "must be a multiple of 5 minutes for a window longer than 15 days".into(),
        ));
    }
    Ok(())
}

/// What was measured; `unavailable` names each part that could not be, `field: reason`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Usage {
    pub utilization: ServiceUtilization,
    pub running_tasks: u32,
    pub desired_tasks: u32,
    pub database_bytes: u64,
    pub unavailable: Vec<String>,
}

/// Measures `instance` over `[start_ms, end_ms)`, each part bounded by `per_part`.
pub async fn measure(
    instance: &Instance,
    cloud: &CloudEnv,
    start_ms: i64,
    end_ms: i64,
    period: Duration,
    per_part: Duration,
) -> Usage {
    let names = ResourceNames::derive(&instance.name.tenant, instance.spec.environment);
    let cluster = &cloud.platform.cluster;
    let period_secs = u32::try_from(period.as_secs()).unwrap_or(u32::MAX);
    let metrics = bounded(per_part, "cloudwatch", async {
        cloud
            .metrics
            .service_utilization(cluster, &names.stack, start_ms, end_ms, period_secs)
            .await
            .map_err(|e| e.to_string())
    });
    let tasks = bounded(per_part, "ecs", async {
        match cloud.compute.service_status(cluster, &names.stack).await {
            Ok(Some(status)) => Ok((status.running, status.desired)),
            Ok(None) => Err("the ECS service does not exist".to_owned()),
            Err(error) => Err(error.to_string()),
        }
    });
    let database = bounded(
        per_part,
        "database",
        database_bytes(instance, cloud, &names),
    );
    let (metrics, tasks, database) = tokio::join!(metrics, tasks, database);
    let mut usage = Usage::default();
    match metrics {
        Ok(utilization) => usage.utilization = utilization,
        Err(reason) => {
            usage.unavailable.push(format!("cpu_utilization: {reason}"));
            usage
                .unavailable
                .push(format!("memory_utilization: {reason}"));
        }
    }
    match tasks {
        Ok((running, desired)) => {
            usage.running_tasks = running;
            usage.desired_tasks = desired;
        }
        Err(reason) => {
            usage.unavailable.push(format!("running_tasks: {reason}"));
            usage.unavailable.push(format!("desired_tasks: {reason}"));
        }
    }
    match database {
        Ok(bytes) => usage.database_bytes = bytes,
        Err(reason) => usage
            .unavailable
            .push(format!("database_size_bytes: {reason}")),
    }
    usage
}

/// `future`'s result, or an error once `limit` has passed.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    future: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(format!("{what}: no answer within {limit:?}")),
    }
}

async fn database_bytes(
    instance: &Instance,
    cloud: &CloudEnv,
    names: &ResourceNames,
) -> Result<u64, String> {
    let secret_arn = instance
        .resources
        .get(SECRET)
        .ok_or("the instance has no database secret recorded")?;
    let secret = cloud
        .secrets
        .read_secret(secret_arn)
        .await
        .map_err(|e| format!("cannot read the tenant secret: {e}"))?;
    let (login, database) = crate::health::tenant_login(&secret, cloud, names, instance)?;
    match cloud.database.database_size(&login, &database).await {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(format!("database {database} does not exist")),
        Err(error) => {
            // The adapter redacts the password from its errors; this is a second guard.
            let mut message = error.to_string();
            if !login.password.is_empty() {
                message = message.replace(login.password.expose(), "<redacted>");
            }
            Err(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn windows_and_periods_follow_cloudwatch_rules() {
        assert_eq!(check_window(secs(3600), secs(300)), Ok(()));
        assert_eq!(check_window(secs(3600), secs(3600)), Ok(()));
        let field = |w: u64, p: u64| check_window(secs(w), secs(p)).unwrap_err().0;
        assert_eq!(field(0, 60), "window");
        assert_eq!(field(3600, 0), "period");
        assert_eq!(field(3600, 90), "period");
        assert_eq!(field(600, 1200), "period");
        assert_eq!(field(2 * 1440 * MIN, MIN), "period");
        assert_eq!(field(20 * 86_400, 60 * MIN + 60), "period");
        assert_eq!(check_window(secs(20 * 86_400), secs(60 * MIN)), Ok(()));
        assert_eq!(field(100 * 86_400, 30 * MIN), "period");
        assert_eq!(field(500 * 86_400, 24 * 60 * MIN), "window");
        assert_eq!(
            check_window(secs(3600), Duration::from_millis(60_500))
                .unwrap_err()
                .0,
            "period"
        );
    }
}
