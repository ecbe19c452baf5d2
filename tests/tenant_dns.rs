//! Per-tenant DNS: with a pool of two ALBs a wildcard record cannot work, so every instance
//! gets an alias record `{tenant}.{domain}` → its own ALB in the environment's hosted zone,
//! the provisioning waits until Route53 reports the change INSYNC, and deprovisioning
//! removes the record and verifies it is gone.
//!
//! Records and load balancers are read with the Route53 and ELBv2 SDKs directly. moto
//! answers every change INSYNC at once (see tests/cloud_dns_acm.rs), so the wait for a
//! PENDING change is shown by a `Dns` wrapper answering PENDING first, as Route53 does for
//! the tens of seconds a change takes to reach every name server.

mod common;
mod platform;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use aws_sdk_route53::types::RrType;
use instance_manager::cloud::{CloudEnv, CloudResult, Dns, DnsRecordSet};
use instance_manager::domain::Environment;
use instance_manager::proto::v1;
use platform::{ControlPlane, metadata};

/// The A record `name` of the environment's zone as Route53 lists it: (alias DNS name
/// without the trailing dot, alias zone id), `None` if there is none.
async fn alias_record(cp: &ControlPlane, name: &str) -> Option<(String, String)> {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let route53 = aws_sdk_route53::Client::new(&sdk);
    let listed = route53
        .list_resource_record_sets()
        .hosted_zone_id(&cloud.platform.hosted_zone_id)
        .start_record_name(name)
        .start_record_type(RrType::A)
        .max_items(1)
        .send()
        .await
        .unwrap();
    listed
        .resource_record_sets()
        .iter()
        .find(|r| r.name().trim_end_matches('.') == name && *r.r#type() == RrType::A)
        .map(|r| {
            let alias = r.alias_target().expect("an alias record");
            (
                alias.dns_name().trim_end_matches('.').to_lowercase(),
                alias.hosted_zone_id().to_owned(),
            )
        })
}

/// Every ALB of the account with the SDK: (DNS name, canonical zone id) of the one whose
/// listener is `listener`.
async fn load_balancer_of_listener(cp: &ControlPlane, listener: &str) -> (String, String) {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let balancers = elb.describe_load_balancers().send().await.unwrap();
    for lb in balancers.load_balancers() {
        let listeners = elb
            .describe_listeners()
            .load_balancer_arn(lb.load_balancer_arn().unwrap())
            .send()
            .await
            .unwrap();
        if listeners
            .listeners()
            .iter()
            .any(|l| l.listener_arn() == Some(listener))
        {
            return (
                lb.dns_name().unwrap().to_lowercase(),
                lb.canonical_hosted_zone_id().unwrap().to_owned(),
            );
        }
    }
    panic!("no load balancer has listener {listener}");
}

#[tokio::test]
async fn each_instance_gets_an_alias_to_its_own_alb_and_loses_it_on_deletion() {
    // One rule per ALB: the first tenant lands on alb-1, the second on alb-2.
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    assert!(!config.environments[0].platform.hosted_zone_id.is_empty());
    for lb in &mut config.environments[0].platform.load_balancers {
        lb.max_rules = Some(1);
    }
    let mut cp = platform::start(config, None).await;
    let tenants = [platform::tenant("dns"), platform::tenant("dns")];
    for tenant in &tenants {
        let created = cp.create(tenant, v1::Environment::Dev).await;
        cp.completed(&created.name).await;
    }
    let mut albs = Vec::new();
    for tenant in &tenants {
        let instance = cp.instance(tenant).await;
        let placed = instance.load_balancer.clone().unwrap();
        let host = format!("{tenant}.dev.{}", platform::DOMAIN);
        let expected = load_balancer_of_listener(&cp, &placed.listener_arn).await;
        assert_eq!(
            alias_record(&cp, &host).await,
            Some(expected.clone()),
            "{tenant}"
        );
        // GetInstance shows it.
        let record = instance
            .dns_records
            .iter()
            .find(|r| r.purpose() == v1::dns_record::Purpose::Traffic)
            .expect("the traffic record on the instance");
        assert_eq!(record.name, host);
        assert_eq!(record.r#type, "A");
        assert_eq!(record.value.to_lowercase(), expected.0);
        assert!(record.managed && record.in_sync, "{record:?}");
        albs.push(placed.name);
    }
    assert_eq!(albs, ["alb-1", "alb-2"]);

    // Deleting the first removes its record only.
    let deleted = cp.delete_skipping_archive(&tenants[0]).await;
    let done = cp.completed(&deleted).await;
    assert!(
        metadata(&done).steps.iter().any(|s| s.name == "dns_record"),
        "deprovisioning removes the record"
    );
    let host = |tenant: &str| format!("{tenant}.dev.{}", platform::DOMAIN);
    assert_eq!(alias_record(&cp, &host(&tenants[0])).await, None);
    assert!(alias_record(&cp, &host(&tenants[1])).await.is_some());
    let deleted = cp.delete_skipping_archive(&tenants[1]).await;
    cp.completed(&deleted).await;
    assert_eq!(alias_record(&cp, &host(&tenants[1])).await, None);
    platform::drop_tenant_databases(&tenants).await;
}

/// Route53 as it behaves: a change is PENDING for a while before it is INSYNC.
struct PendingChanges {
    inner: Arc<dyn Dns>,
    pending: u32,
    asked: Arc<AtomicU32>,
}

#[async_trait]
impl Dns for PendingChanges {
    async fn upsert_alias(
        &self,
        zone_id: &str,
        name: &str,
        target_dns_name: &str,
        target_zone_id: &str,
    ) -> CloudResult<String> {
        self.inner
            .upsert_alias(zone_id, name, target_dns_name, target_zone_id)
            .await
    }

    async fn upsert_record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
        value: &str,
    ) -> CloudResult<String> {
        self.inner
            .upsert_record(zone_id, name, record_type, value)
            .await
    }

    async fn delete_record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
    ) -> CloudResult<Option<String>> {
        self.inner.delete_record(zone_id, name, record_type).await
    }

    async fn change_in_sync(&self, change_id: &str) -> CloudResult<bool> {
        let asked = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
        if asked <= self.pending {
            return Ok(false);
        }
        self.inner.change_in_sync(change_id).await
    }

    async fn record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
    ) -> CloudResult<Option<DnsRecordSet>> {
        self.inner.record(zone_id, name, record_type).await
    }
}

#[tokio::test]
async fn provisioning_waits_for_the_change_to_be_insync() {
    const PENDING: u32 = 4;
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let asked = Arc::new(AtomicU32::new(0));
    let wrap: platform::CloudWrapper = {
        let asked = asked.clone();
        Arc::new(move |mut cloud: CloudEnv| {
            cloud.dns = Arc::new(PendingChanges {
                inner: cloud.dns.clone(),
                pending: PENDING,
                asked: asked.clone(),
            });
            cloud
        })
    };
    let cp = platform::start_with(
        config,
        instance_manager::workflow::EngineOptions::default(),
        |store| store,
        Some(wrap),
    )
    .await;
    let tenant = platform::tenant("insync");
    let mut client = cp.client();
    let created = client.create(&tenant, v1::Environment::Dev).await;
    let (events, done) = client.watch(&created.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Completed,
        "{events:#?}"
    );
    // Asked until INSYNC, and not once more; the step waited (no failure, no retry).
    assert_eq!(asked.load(Ordering::SeqCst), PENDING + 1);
    let step = metadata(&done)
        .steps
        .into_iter()
        .find(|s| s.name == "wait_dns")
        .unwrap();
    assert_eq!(step.status(), v1::StepStatus::Succeeded, "{step:?}");
    assert!(
        !events
            .iter()
            .any(|e| e.step == "wait_dns" && e.message.contains("retrying")),
        "waiting is not a failure: {events:#?}"
    );
    let deleted = client.delete_skipping_archive(&tenant).await;
    client.completed(&deleted).await;
    platform::drop_tenant_databases(&[tenant]).await;
}
