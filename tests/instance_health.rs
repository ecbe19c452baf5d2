//! CheckInstanceHealth end to end, in process, on moto and MariaDB: a provisioned instance,
//! then one failure induced behind the control plane's back at a time (with the AWS SDK or
//! as root on MariaDB), and the report naming the check that fails.
//!
//! moto runs no containers, so its ECS service never has a running task: the adapters
//! given to the control plane report the service as AWS does once its tasks run (running =
//! desired, the rollout COMPLETED); everything else is moto's. "The site" is a small HTTP
//! responder in the test, which the platform's `health_probe_url` points at, and the target
//! group gets an IP target registered with the ELBv2 SDK.

mod common;
mod platform;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use instance_manager::cloud::{CloudEnv, CloudResult, Compute, ServiceStatus};
use instance_manager::config::Config;
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::{Environment, TenantId};
use instance_manager::proto::v1;
use instance_manager::workflow::EngineOptions;
use mysql_async::prelude::Queryable;
use platform::ControlPlane;
use platform::compute::{Changed, ComputeChanges};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_types::StatusExt;

const CHECKS: [&str; 6] = [
    "ecs_service",
    "alb_targets",
    "http",
    "database",
    "db_instance",
    "efs_access_point",
];
/// The instance's two tasks (the default desired count), as the ALB would have them.
const TARGET_IPS: [&str; 2] = ["10.0.1.10", "10.0.2.10"];

/// The service as ECS describes it once its tasks run: every desired task running, the
/// deployment COMPLETED (moto never starts one). Everything else is moto's.
struct TasksRun {
    inner: Arc<dyn Compute>,
}

#[async_trait]
impl ComputeChanges for TasksRun {
    fn inner(&self) -> &dyn Compute {
        self.inner.as_ref()
    }
    async fn service_status(
        &self,
        cluster: &str,
        name: &str,
    ) -> CloudResult<Option<ServiceStatus>> {
        Ok(self
            .inner
            .service_status(cluster, name)
            .await?
            .map(|status| ServiceStatus {
                running: status.desired,
                pending: 0,
                rollout_state: Some("COMPLETED".into()),
                ..status
            }))
    }
}

/// "The site": answers every request `200 OK` and records the Host headers it saw.
async fn site() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hosts = Arc::new(Mutex::new(Vec::new()));
    let seen = hosts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_string();
                if let Some(host) = text
                    .lines()
                    .find_map(|line| line.strip_prefix("host: ").or(line.strip_prefix("Host: ")))
                {
                    seen.lock().unwrap().push(host.trim().to_owned());
                }
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (url, hosts)
}

/// A provisioned instance whose probe goes to `probe` (changeable), with a registered
/// target.
struct World {
    cp: ControlPlane,
    tenant: String,
    probe: Arc<Mutex<String>>,
    site_hosts: Arc<Mutex<Vec<String>>>,
    names: ResourceNames,
}

async fn world(prefix: &str, tune: impl FnOnce(&mut Config)) -> World {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    config.health_timeout_ms = 3000;
    config.health_check_timeout_ms = 2000;
    tune(&mut config);
    let (url, site_hosts) = site().await;
    let probe = Arc::new(Mutex::new(url));
    let wrap: platform::CloudWrapper = {
        let probe = probe.clone();
        Arc::new(move |mut cloud: CloudEnv| {
            cloud.platform.health_probe_url = probe.lock().unwrap().clone();
            cloud.compute = Arc::new(Changed(TasksRun {
                inner: cloud.compute,
            }));
            cloud
        })
    };
    let mut cp = platform::start_with(config, EngineOptions::default(), |s| s, Some(wrap)).await;
    let tenant = platform::tenant(prefix);
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    let names = ResourceNames::derive(&TenantId::parse(&tenant).unwrap(), Environment::Dev);
    let world = World {
        cp,
        tenant,
        probe,
        site_hosts,
        names,
    };
    let elb = world.elb();
    elb.register_targets()
        .target_group_arn(world.target_group_arn().await)
        .set_targets(Some(TARGET_IPS.iter().map(|ip| target(ip)).collect()))
        .send()
        .await
        .unwrap();
    world
}

fn target(ip: &str) -> aws_sdk_elasticloadbalancingv2::types::TargetDescription {
    aws_sdk_elasticloadbalancingv2::types::TargetDescription::builder()
        .id(ip)
        .port(80)
        .build()
}

impl World {
    fn name(&self) -> String {
        format!("tenants/{}/instances/wp", self.tenant)
    }

    fn elb(&self) -> aws_sdk_elasticloadbalancingv2::Client {
        aws_sdk_elasticloadbalancingv2::Client::new(&self.cp.sdk(Environment::Dev))
    }

    /// Found by name with the SDK, not from the instance record.
    async fn target_group_arn(&self) -> String {
        self.elb()
            .describe_target_groups()
            .names(&self.names.target_group)
            .send()
            .await
            .unwrap()
            .target_groups()[0]
            .target_group_arn()
            .unwrap()
            .to_owned()
    }

    async fn health(&mut self) -> Result<v1::HealthReport, tonic::Status> {
        let name = self.name();
        self.cp
            .instances
            .check_instance_health(v1::CheckInstanceHealthRequest { name })
            .await
            .map(tonic::Response::into_inner)
    }

    /// The tenant's password as Secrets Manager holds it (read with the SDK).
    async fn stored_password(&self) -> String {
        let secrets = aws_sdk_secretsmanager::Client::new(&self.cp.sdk(Environment::Dev));
        let value = secrets
            .get_secret_value()
            .secret_id(&self.names.secret)
            .send()
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(value.secret_string().unwrap()).unwrap();
        json["password"].as_str().unwrap().to_owned()
    }
}

fn status_of(report: &v1::HealthReport, check: &str) -> (v1::HealthStatus, String) {
    let found = report
        .checks
        .iter()
        .find(|c| c.name == check)
        .unwrap_or_else(|| panic!("no check {check} in {report:#?}"));
    (found.status(), found.reason.clone())
}

/// Every check but `failing` is HEALTHY; `failing` is UNHEALTHY; returns its reason.
fn only_failing(report: &v1::HealthReport, failing: &str) -> String {
    only(report, failing, v1::HealthStatus::Unhealthy)
}

/// Every check but `failing` is HEALTHY; `failing` is `want`; returns its reason.
fn only(report: &v1::HealthReport, failing: &str, want_failing: v1::HealthStatus) -> String {
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, CHECKS, "{report:#?}");
    for check in CHECKS {
        let (status, reason) = status_of(report, check);
        let want = if check == failing {
            want_failing
        } else {
            v1::HealthStatus::Healthy
        };
        assert_eq!(status, want, "{check}: {reason}\n{report:#?}");
    }
    status_of(report, failing).1
}

fn assert_all_healthy(report: &v1::HealthReport) {
    for check in &report.checks {
        assert_eq!(
            check.status(),
            v1::HealthStatus::Healthy,
            "{}: {}",
            check.name,
            check.reason
        );
        assert!(check.latency.is_some());
    }
    assert_eq!(report.checks.len(), CHECKS.len());
    assert_eq!(report.overall(), v1::HealthStatus::Healthy);
}

#[tokio::test]
async fn a_healthy_instance_then_its_password_changed_behind_our_back() {
    let mut w = world("hpw", |_| {}).await;
    let report = w.health().await.unwrap();
    assert_eq!(report.name, w.name());
    assert!(report.check_time.is_some());
    assert_all_healthy(&report);
    let host = format!("{}.dev.{}", w.tenant, platform::DOMAIN);
    assert!(
        w.site_hosts.lock().unwrap().contains(&host),
        "the probe sends the instance's host: {:?}",
        w.site_hosts.lock().unwrap()
    );
    let (_, targets) = status_of(&report, "alb_targets");
    for ip in TARGET_IPS {
        assert!(targets.contains(&format!("{ip}:80 healthy")), "{targets}");
    }

    // Someone resets the tenant user's password on the server, not in the secret.
    let stored = w.stored_password().await;
    let mut root = mysql_async::Conn::from_url(common::mysql_url())
        .await
        .unwrap();
    root.query_drop(format!(
        "ALTER USER '{}'@'%' IDENTIFIED BY 'changed-behind-our-back'",
        w.names.database_user
    ))
    .await
    .unwrap();
    root.disconnect().await.unwrap();

    let report = w.health().await.unwrap();
    let reason = only_failing(&report, "database");
    assert!(reason.contains("Access denied"), "{reason}");
    assert!(reason.contains(&w.names.database_user), "{reason}");
    assert_eq!(report.overall(), v1::HealthStatus::Unhealthy);
    let shown = format!("{report:?}");
    assert!(!shown.contains(&stored), "the stored password leaked");
    assert!(!shown.contains("changed-behind-our-back"));
}

#[tokio::test]
async fn deregistered_targets_degrade_then_fail_alb_targets() {
    let mut w = world("htg", |_| {}).await;
    assert_all_healthy(&w.health().await.unwrap());
    let arn = w.target_group_arn().await;
    w.elb()
        .deregister_targets()
        .target_group_arn(&arn)
        .targets(target(TARGET_IPS[0]))
        .send()
        .await
        .unwrap();
    // One of the two desired tasks is no longer behind the load balancer.
    let report = w.health().await.unwrap();
    let reason = only(&report, "alb_targets", v1::HealthStatus::Degraded);
    assert!(
        reason.starts_with("1 healthy of 1 registered, 2 desired"),
        "{reason}"
    );
    assert_eq!(report.overall(), v1::HealthStatus::Degraded);
    w.elb()
        .deregister_targets()
        .target_group_arn(&arn)
        .targets(target(TARGET_IPS[1]))
        .send()
        .await
        .unwrap();
    let report = w.health().await.unwrap();
    let reason = only_failing(&report, "alb_targets");
    assert!(reason.contains("no target is registered"), "{reason}");
    // The site still answers (an ALB with no healthy target fails open): degraded.
    assert_eq!(report.overall(), v1::HealthStatus::Degraded);
}

#[tokio::test]
async fn a_probe_to_a_closed_port_fails_http() {
    let mut w = world("hport", |_| {}).await;
    assert_all_healthy(&w.health().await.unwrap());
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    *w.probe.lock().unwrap() = format!("http://{closed}");
    let report = w.health().await.unwrap();
    let reason = only_failing(&report, "http");
    assert!(
        reason.starts_with(&format!(
            "GET / (Host: {}.dev.{}) at http://{closed}: connect: ",
            w.tenant,
            platform::DOMAIN
        )),
        "{reason}"
    );
    assert_eq!(report.overall(), v1::HealthStatus::Unhealthy);
}

#[tokio::test]
async fn a_deleted_access_point_fails_efs_access_point() {
    let mut w = world("hap", |_| {}).await;
    assert_all_healthy(&w.health().await.unwrap());
    let efs = aws_sdk_efs::Client::new(&w.cp.sdk(Environment::Dev));
    let cloud = w.cp.cloud(Environment::Dev).await;
    let points = efs
        .describe_access_points()
        .file_system_id(&cloud.platform.file_system_id)
        .send()
        .await
        .unwrap();
    let root = format!("/tenant-{}", w.tenant);
    let ours: Vec<String> = points
        .access_points()
        .iter()
        .filter(|ap| ap.root_directory().and_then(|r| r.path()) == Some(root.as_str()))
        .filter_map(|ap| ap.access_point_id().map(str::to_owned))
        .collect();
    assert_eq!(ours.len(), 1, "{points:?}");
    efs.delete_access_point()
        .access_point_id(&ours[0])
        .send()
        .await
        .unwrap();
    let report = w.health().await.unwrap();
    let reason = only_failing(&report, "efs_access_point");
    assert_eq!(reason, format!("access point {} does not exist", ours[0]));
    assert_eq!(report.overall(), v1::HealthStatus::Unhealthy);
}

#[tokio::test]
async fn a_site_that_never_answers_is_a_failed_check_within_the_bound() {
    let mut w = world("hhang", |config| {
        config.health_timeout_ms = 2500;
        config.health_check_timeout_ms = 1500;
    })
    .await;
    // Accepts connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    *w.probe.lock().unwrap() = format!("http://{silent}");
    let started = Instant::now();
    let report = w.health().await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    let reason = only_failing(&report, "http");
    assert!(reason.starts_with("timed out after"), "{reason}");
    let latency = report
        .checks
        .iter()
        .find(|c| c.name == "http")
        .and_then(|c| c.latency)
        .unwrap();
    assert!(
        latency.seconds == 1 && latency.nanos >= 400_000_000,
        "{latency:?}"
    );
}

#[tokio::test]
async fn errors_and_what_the_emulator_shows() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let check = |name: &str| v1::CheckInstanceHealthRequest { name: name.into() };

    let error = cp
        .instances
        .check_instance_health(check("tenants/x/nope"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let violations = error.get_details_bad_request().unwrap().field_violations;
    assert_eq!(violations[0].field, "name");

    let error = cp
        .instances
        .check_instance_health(check("tenants/imt-nobody/instances/wp"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);

    // Without the adapters' help moto shows what it is: a service with no running task.
    let tenant = platform::tenant("hemu");
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    let name = format!("tenants/{tenant}/instances/wp");
    let report = cp
        .instances
        .check_instance_health(check(&name))
        .await
        .unwrap()
        .into_inner();
    let (status, reason) = status_of(&report, "ecs_service");
    assert_eq!(status, v1::HealthStatus::Unhealthy);
    assert!(
        reason.starts_with("no task is running: running 0, desired 2"),
        "{reason}"
    );
    assert_eq!(status_of(&report, "database").0, v1::HealthStatus::Healthy);
    assert_eq!(
        status_of(&report, "db_instance").0,
        v1::HealthStatus::Healthy
    );
    assert_eq!(report.overall(), v1::HealthStatus::Unhealthy);

    // Deprovisioned: nothing left to check.
    let deleted = cp.delete_skipping_archive(&tenant).await;
    cp.completed(&deleted).await;
    let error = cp
        .instances
        .check_instance_health(check(&name))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(
        error.message().contains("DEPROVISIONED"),
        "{}",
        error.message()
    );
}

/// Suspended by SuspendInstance: the service at 0, the host answering the suspended page.
#[tokio::test]
async fn a_suspended_instance_says_so() {
    let mut w = world("hsus", |_| {}).await;
    let name = w.name();
    let suspended =
        w.cp.instances
            .suspend_instance(v1::SuspendInstanceRequest {
                name,
                reason: "non-payment".into(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
    w.cp.completed(&suspended.name).await;
    let desired = aws_sdk_ecs::Client::new(&w.cp.sdk(Environment::Dev))
        .describe_services()
        .cluster(&w.cp.cloud(Environment::Dev).await.platform.cluster)
        .services(&w.names.stack)
        .send()
        .await
        .unwrap()
        .services()[0]
        .desired_count();
    assert_eq!(desired, 0);
    // The site would answer the listener's fixed response; the probe must not hit it.
    let (url, hits) = site().await;
    *w.probe.lock().unwrap() = url;

    let report = w.health().await.unwrap();
    let (status, reason) = status_of(&report, "ecs_service");
    assert_eq!(status, v1::HealthStatus::Healthy);
    assert!(reason.starts_with("suspended: scaled to 0"), "{reason}");
    for skipped in ["alb_targets", "http"] {
        let (status, reason) = status_of(&report, skipped);
        assert_eq!(status, v1::HealthStatus::Unspecified, "{skipped}");
        assert!(reason.contains("SUSPENDED"), "{reason}");
    }
    for checked in ["database", "db_instance", "efs_access_point"] {
        assert_eq!(status_of(&report, checked).0, v1::HealthStatus::Healthy);
    }
    assert_eq!(report.overall(), v1::HealthStatus::Healthy);
    assert!(hits.lock().unwrap().is_empty());
}
