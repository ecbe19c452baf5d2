//! The classification of each check and the overall rule, on the states AWS reports
//! (see the AWS docs of DescribeTargetHealth, DescribeServices, DescribeDBInstances).

use std::time::Duration;

use super::*;
use crate::cloud::ServiceEvent;

fn target(id: &str, state: &str, reason: Option<&str>, description: Option<&str>) -> TargetHealth {
    TargetHealth {
        id: id.into(),
        port: Some(80),
        state: state.into(),
        reason: reason.map(str::to_owned),
        description: description.map(str::to_owned),
    }
}

fn service(desired: u32, running: u32, pending: u32, rollout: &str) -> ServiceStatus {
    ServiceStatus {
        status: "ACTIVE".into(),
        desired,
        running,
        pending,
        rollout_state: Some(rollout.into()),
        deployments: 1,
        ..ServiceStatus::default()
    }
}

fn check(name: &'static str, status: Status) -> Check {
    Check {
        name,
        status,
        reason: String::new(),
        latency: Duration::ZERO,
    }
}

fn all(status: Status) -> Vec<Check> {
    [
        ECS_SERVICE,
        ALB_TARGETS,
        HTTP,
        DATABASE,
        DB_INSTANCE,
        EFS_ACCESS_POINT,
    ]
    .into_iter()
    .map(|name| check(name, status))
    .collect()
}

fn with(mut checks: Vec<Check>, name: &str, status: Status) -> Vec<Check> {
    checks.iter_mut().find(|c| c.name == name).unwrap().status = status;
    checks
}

#[test]
fn overall_rule() {
    use Status::*;
    assert_eq!(overall(&all(Healthy)), Healthy);
    // Any critical dependency down: unhealthy.
    for name in [ECS_SERVICE, HTTP, DATABASE, DB_INSTANCE, EFS_ACCESS_POINT] {
        assert_eq!(
            overall(&with(all(Healthy), name, Unhealthy)),
            Unhealthy,
            "{name}"
        );
        assert_eq!(
            overall(&with(all(Healthy), name, Degraded)),
            Degraded,
            "{name}"
        );
    }
    // No healthy target while the site still answers: the ALB fails open, degraded.
    assert_eq!(
        overall(&with(all(Healthy), ALB_TARGETS, Unhealthy)),
        Degraded
    );
    let dark = with(with(all(Healthy), ALB_TARGETS, Unhealthy), HTTP, Unhealthy);
    assert_eq!(overall(&dark), Unhealthy);
    let probe_skipped = with(with(all(Healthy), ALB_TARGETS, Unhealthy), HTTP, Skipped);
    assert_eq!(overall(&probe_skipped), Unhealthy);
    // Skipped checks (a suspended instance's probe and targets) do not count.
    let suspended = with(with(all(Healthy), ALB_TARGETS, Skipped), HTTP, Skipped);
    assert_eq!(overall(&suspended), Healthy);
    // Degraded and unhealthy together: unhealthy.
    let mixed = with(
        with(all(Healthy), ECS_SERVICE, Degraded),
        DATABASE,
        Unhealthy,
    );
    assert_eq!(overall(&mixed), Unhealthy);
    // Nothing checked: nothing is known to work.
    assert_eq!(overall(&all(Skipped)), Unhealthy);
    assert_eq!(overall(&[]), Unhealthy);
}

#[test]
fn target_health_through_a_registration() {
    // A new task registers (initial), passes its checks (healthy), is replaced in a
    // deployment (draining beside a new healthy one), and is gone.
    let registering = [target(
        "10.0.1.5",
        "initial",
        Some("Elb.RegistrationInProgress"),
        Some("Target registration is in progress"),
    )];
    let (status, reason) = targets_check(&registering, 1);
    assert_eq!(status, Status::Unhealthy);
    assert!(reason.contains("Elb.RegistrationInProgress"), "{reason}");
    let up = [target("10.0.1.5", "healthy", None, None)];
    let (status, reason) = targets_check(&up, 1);
    assert_eq!(status, Status::Healthy, "{reason}");
    assert!(reason.contains("1 healthy of 1 registered"), "{reason}");
    let replacing = [
        target(
            "10.0.1.5",
            "draining",
            Some("Target.DeregistrationInProgress"),
            None,
        ),
        target("10.0.2.9", "healthy", None, None),
    ];
    assert_eq!(targets_check(&replacing, 1).0, Status::Healthy);
    let new_one_starting = [
        target("10.0.1.5", "healthy", None, None),
        target(
            "10.0.2.9",
            "initial",
            Some("Elb.RegistrationInProgress"),
            None,
        ),
    ];
    assert_eq!(targets_check(&new_one_starting, 1).0, Status::Healthy);
    assert_eq!(targets_check(&[], 1).0, Status::Unhealthy);
}

#[test]
fn failing_and_reduced_targets() {
    let mismatch = target(
        "10.0.2.9",
        "unhealthy",
        Some("Target.ResponseCodeMismatch"),
        Some("Health checks failed with these codes: [500]"),
    );
    // One of two healthy, the other failing its checks: degraded, with the reason.
    let (status, reason) = targets_check(
        &[target("10.0.1.5", "healthy", None, None), mismatch.clone()],
        2,
    );
    assert_eq!(status, Status::Degraded);
    assert!(
        reason.contains("10.0.2.9:80 unhealthy (Target.ResponseCodeMismatch: Health checks failed with these codes: [500])"),
        "{reason}"
    );
    // Every target failing: unhealthy.
    let timeout = target(
        "10.0.1.5",
        "unhealthy",
        Some("Target.Timeout"),
        Some("Request timed out"),
    );
    let (status, reason) = targets_check(&[timeout, mismatch], 2);
    assert_eq!(status, Status::Unhealthy);
    assert!(reason.starts_with("no healthy target"), "{reason}");
    // Enough healthy ones, but fewer than desired: degraded.
    assert_eq!(
        targets_check(&[target("10.0.1.5", "healthy", None, None)], 3).0,
        Status::Degraded
    );
    // Not used by any rule or in a disabled zone, or not health-checked at all.
    let unused = target("10.0.3.3", "unused", Some("Target.NotInUse"), None);
    let (status, reason) = targets_check(&[target("10.0.1.5", "healthy", None, None), unused], 1);
    assert_eq!(status, Status::Degraded);
    assert!(reason.contains("Target.NotInUse"), "{reason}");
    let unchecked = target(
        "10.0.1.5",
        "unavailable",
        Some("Target.HealthCheckDisabled"),
        None,
    );
    assert_eq!(targets_check(&[unchecked], 1).0, Status::Unhealthy);
}

#[test]
fn ecs_service_states() {
    assert_eq!(ecs_check(None, false).0, Status::Unhealthy);
    // A deployment's life: tasks pending, one of two running, complete.
    let (status, reason) = ecs_check(Some(&service(2, 0, 2, "IN_PROGRESS")), false);
    assert_eq!(status, Status::Unhealthy);
    assert!(
        reason.contains("running 0, desired 2, pending 2"),
        "{reason}"
    );
    assert_eq!(
        ecs_check(Some(&service(2, 1, 1, "IN_PROGRESS")), false).0,
        Status::Degraded
    );
    let (status, reason) = ecs_check(Some(&service(2, 2, 0, "COMPLETED")), false);
    assert_eq!(status, Status::Healthy, "{reason}");
    // A restart: the old tasks run while the new deployment rolls.
    let mut rolling = service(2, 2, 0, "IN_PROGRESS");
    rolling.deployments = 2;
    let (status, reason) = ecs_check(Some(&rolling), false);
    assert_eq!(status, Status::Degraded);
    assert!(reason.contains("2 deployments"), "{reason}");
    // The circuit breaker rolled back: the old tasks serve.
    assert_eq!(
        ecs_check(Some(&service(2, 2, 0, "FAILED")), false).0,
        Status::Degraded
    );
    let mut draining = service(0, 0, 0, "COMPLETED");
    draining.status = "DRAINING".into();
    assert_eq!(ecs_check(Some(&draining), false).0, Status::Unhealthy);
    assert_eq!(
        ecs_check(Some(&service(0, 0, 0, "COMPLETED")), false).0,
        Status::Unhealthy
    );
}

#[test]
fn ecs_service_of_a_suspended_instance() {
    let (status, reason) = ecs_check(Some(&service(0, 0, 0, "COMPLETED")), true);
    assert_eq!(status, Status::Healthy);
    assert!(reason.starts_with("suspended"), "{reason}");
    assert_eq!(
        ecs_check(Some(&service(0, 1, 0, "IN_PROGRESS")), true).0,
        Status::Degraded
    );
}

#[test]
fn ecs_events_are_reported_newest_first() {
    let mut status = service(1, 0, 0, "IN_PROGRESS");
    status.recent_events = vec![
        ServiceEvent {
            created_at_ms: Some(1_700_000_060_000),
            message: "(service x) was unable to place a task.".into(),
        },
        ServiceEvent {
            created_at_ms: Some(1_700_000_000_000),
            message: "(service x) has started 1 tasks.".into(),
        },
    ];
    let (_, reason) = ecs_check(Some(&status), false);
    assert!(
        reason.contains("recent events: 2023-11-14T22:14:20Z (service x) was unable to place a task. | 2023-11-14T22:13:20Z (service x) has started 1 tasks."),
        "{reason}"
    );
}

fn rds(status: &str, maintenance: &[&str]) -> DbInstanceStatus {
    DbInstanceStatus {
        identifier: "bbws-dev".into(),
        status: status.into(),
        engine: "mysql".into(),
        allocated_storage_gib: Some(20),
        max_allocated_storage_gib: Some(100),
        pending_maintenance: maintenance.iter().map(|m| m.to_string()).collect(),
        maintenance_window: Some("sun:03:00-sun:03:30".into()),
        endpoint: None,
    }
}

#[test]
fn rds_states() {
    let (status, reason) = db_instance_check("bbws-dev", Some(&rds("available", &[])));
    assert_eq!(status, Status::Healthy);
    assert_eq!(
        reason,
        "bbws-dev (mysql) is available, storage 20 GiB (autoscaling to 100 GiB)"
    );
    let (status, reason) = db_instance_check(
        "bbws-dev",
        Some(&rds("available", &["instance class -> db.t3.large"])),
    );
    assert_eq!(status, Status::Degraded);
    assert!(
        reason.ends_with(
            "pending maintenance: instance class -> db.t3.large (window sun:03:00-sun:03:30 UTC)"
        ),
        "{reason}"
    );
    for serving in [
        "backing-up",
        "modifying",
        "maintenance",
        "configuring-log-exports",
    ] {
        assert_eq!(
            db_instance_check("bbws-dev", Some(&rds(serving, &[]))).0,
            Status::Degraded,
            "{serving}"
        );
    }
    for down in [
        "stopped",
        "rebooting",
        "storage-full",
        "failed",
        "starting",
        "deleting",
    ] {
        assert_eq!(
            db_instance_check("bbws-dev", Some(&rds(down, &[]))).0,
            Status::Unhealthy,
            "{down}"
        );
    }
    assert_eq!(db_instance_check("bbws-dev", None).0, Status::Unhealthy);
}

#[test]
fn access_point_states() {
    assert_eq!(
        access_point_check("fsap-1", Some("available")).0,
        Status::Healthy
    );
    assert_eq!(
        access_point_check("fsap-1", Some("creating")).0,
        Status::Degraded
    );
    assert_eq!(
        access_point_check("fsap-1", Some("deleting")).0,
        Status::Unhealthy
    );
    assert_eq!(
        access_point_check("fsap-1", Some("error")).0,
        Status::Unhealthy
    );
    let (status, reason) = access_point_check("fsap-1", None);
    assert_eq!(status, Status::Unhealthy);
    assert_eq!(reason, "access point fsap-1 does not exist");
}

#[tokio::test]
async fn a_check_past_its_deadline_is_unhealthy_and_returns_on_time() {
    let deadline = Instant::now() + Duration::from_millis(50);
    let started = Instant::now();
    let hung = timed(HTTP, deadline, std::future::pending::<Outcome>()).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(hung.status, Status::Unhealthy);
    assert!(
        hung.reason.starts_with("timed out after"),
        "{}",
        hung.reason
    );
    assert!(
        hung.latency >= Duration::from_millis(40),
        "{:?}",
        hung.latency
    );
    let quick = timed(DATABASE, deadline, async { healthy("ok") }).await;
    assert_eq!(quick.status, Status::Healthy);
}
