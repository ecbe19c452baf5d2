//! The load-balancer pool: instances are placed on the first ALB with room, a full pool
//! refuses a provisioning before anything exists (RESOURCE_EXHAUSTED), a deletion frees its
//! slot, and two replicas provisioning at once never put more rules on a listener than its
//! quota.
//!
//! Rules are counted per listener with the elbv2 SDK directly (DescribeRules), never with
//! the product's own slot accounting, which is under test.

mod common;
mod platform;

use std::collections::BTreeMap;

use instance_manager::config::Config;
use instance_manager::domain::Environment;
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use platform::{ControlPlane, inventory, metadata, provisioned};

/// The emulated platform's pool (two ALBs) with `max_rules` on each.
async fn config_with_quota(max_rules: u32) -> Config {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    let platform = &mut config.environments[0].platform;
    assert_eq!(platform.load_balancers.len(), 2, "the emulated pool");
    for lb in &mut platform.load_balancers {
        lb.max_rules = Some(max_rules);
    }
    config
}

/// Non-default rules on each listener of the pool, with the SDK: listener ARN → count.
async fn rules_per_listener(cp: &ControlPlane) -> BTreeMap<String, usize> {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let mut counts = BTreeMap::new();
    for listener in platform::account_listeners(&elb).await {
        let rules = elb
            .describe_rules()
            .listener_arn(&listener)
            .send()
            .await
            .unwrap();
        let ours = rules
            .rules()
            .iter()
            .filter(|r| r.is_default() != Some(true))
            .count();
        counts.insert(listener, ours);
    }
    counts
}

fn listener_of(cp: &ControlPlane, name: &str) -> String {
    cp.config.environments[0]
        .platform
        .load_balancers
        .iter()
        .find(|lb| lb.name == name)
        .unwrap()
        .listener_arn
        .clone()
}

fn error_of(operation: &lro::Operation) -> (i32, String) {
    match operation.result.as_ref() {
        Some(lro::operation::Result::Error(status)) => (status.code, status.message.clone()),
        other => panic!("operation did not fail: {other:?}"),
    }
}

/// Creates every tenant at once; waits for each operation's end.
async fn create_all(cp: &ControlPlane, tenants: &[String]) -> Vec<lro::Operation> {
    let mut tasks = Vec::new();
    for tenant in tenants {
        let mut client = cp.client();
        let tenant = tenant.clone();
        tasks.push(tokio::spawn(async move {
            let accepted = client.create(&tenant, v1::Environment::Dev).await;
            client.watch(&accepted.name).await.1
        }));
    }
    let mut done = Vec::new();
    for task in tasks {
        done.push(task.await.unwrap());
    }
    done
}

#[tokio::test]
async fn a_full_pool_refuses_before_creating_anything_and_a_deletion_frees_a_slot() {
    let mut cp = platform::start(config_with_quota(3).await, None).await;
    let cloud = cp.cloud(Environment::Dev).await;
    let tenants: Vec<String> = (0..8).map(|_| platform::tenant("pool")).collect();
    let (alb1, alb2) = (listener_of(&cp, "alb-1"), listener_of(&cp, "alb-2"));

    // Five at once: the first ALB fills (3), the rest go to the second (2).
    for done in create_all(&cp, &tenants[..5]).await {
        assert_eq!(
            metadata(&done).status(),
            v1::OperationStatus::Completed,
            "{done:?}"
        );
    }
    let counts = rules_per_listener(&cp).await;
    assert_eq!((counts[&alb1], counts[&alb2]), (3, 2), "{counts:?}");
    let mut placed = BTreeMap::<String, Vec<String>>::new();
    for tenant in &tenants[..5] {
        let instance = cp.instance(tenant).await;
        let lb = instance.load_balancer.expect("placement on the instance");
        assert_eq!(lb.listener_arn, listener_of(&cp, &lb.name));
        assert!(!lb.dns_name.is_empty(), "{lb:?}");
        assert_eq!(instance.resources["load_balancer"], lb.name);
        placed.entry(lb.name).or_default().push(tenant.clone());
    }
    assert_eq!(placed["alb-1"].len(), 3, "{placed:?}");
    assert_eq!(placed["alb-2"].len(), 2, "{placed:?}");

    // The sixth fills the pool.
    let sixth = create_all(&cp, &tenants[5..6]).await;
    assert_eq!(metadata(&sixth[0]).status(), v1::OperationStatus::Completed);
    assert_eq!(
        cp.instance(&tenants[5]).await.load_balancer.unwrap().name,
        "alb-2"
    );

    // The seventh: RESOURCE_EXHAUSTED naming the limit, and nothing of it exists.
    let seventh = create_all(&cp, &tenants[6..7]).await.remove(0);
    assert_eq!(metadata(&seventh).status(), v1::OperationStatus::Failed);
    let (code, message) = error_of(&seventh);
    assert_eq!(code, tonic::Code::ResourceExhausted as i32, "{message}");
    assert!(message.contains("3 of 3 rules"), "{message}");
    assert!(
        message.contains("alb-1") && message.contains("alb-2"),
        "{message}"
    );
    let steps = metadata(&seventh).steps;
    let ran: Vec<&str> = steps
        .iter()
        .filter(|s| s.status() != v1::StepStatus::Pending)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(ran, ["load_balancer"], "{steps:#?}");
    assert!(
        inventory(&cloud, &tenants[6]).await.is_empty(),
        "{:?}",
        inventory(&cloud, &tenants[6]).await
    );
    let refused = cp.instance(&tenants[6]).await;
    assert_eq!(refused.state(), v1::InstanceState::Failed);
    assert!(refused.load_balancer.is_none());
    let counts = rules_per_listener(&cp).await;
    assert_eq!((counts[&alb1], counts[&alb2]), (3, 3), "{counts:?}");

    // Deleting one of alb-1's instances frees its slot: the next tenant goes there.
    let leaving = placed["alb-1"][0].clone();
    let deleted = cp.delete_skipping_archive(&leaving).await;
    cp.completed(&deleted).await;
    assert_eq!(rules_per_listener(&cp).await[&alb1], 2);
    let eighth = create_all(&cp, &tenants[7..8]).await.remove(0);
    assert_eq!(metadata(&eighth).status(), v1::OperationStatus::Completed);
    assert_eq!(
        cp.instance(&tenants[7]).await.load_balancer.unwrap().name,
        "alb-1"
    );
    assert_eq!(inventory(&cloud, &tenants[7]).await, provisioned(true));
    let counts = rules_per_listener(&cp).await;
    assert_eq!((counts[&alb1], counts[&alb2]), (3, 3), "{counts:?}");

    // Everything goes; the listeners are empty again.
    for tenant in tenants
        .iter()
        .filter(|t| **t != leaving && **t != tenants[6])
    {
        let deleted = cp.delete_skipping_archive(tenant).await;
        cp.completed(&deleted).await;
    }
    let counts = rules_per_listener(&cp).await;
    assert_eq!((counts[&alb1], counts[&alb2]), (0, 0), "{counts:?}");
    platform::drop_tenant_databases(&tenants).await;
}

#[tokio::test]
async fn two_replicas_provisioning_at_once_never_overfill_a_listener() {
    // Two slots per ALB, four in the pool; six tenants ask at once, three through each
    // replica (two engines, two servers, one table).
    let config = config_with_quota(2).await;
    let mut second = config.clone();
    second.replica_id = format!("{}-b", config.replica_id);
    let first = platform::start(config, None).await;
    let other = platform::start(second, None).await;
    let tenants: Vec<String> = (0..6).map(|_| platform::tenant("race")).collect();

    let mut tasks = Vec::new();
    for (index, tenant) in tenants.iter().enumerate() {
        let mut client = if index % 2 == 0 {
            first.client()
        } else {
            other.client()
        };
        let tenant = tenant.clone();
        tasks.push(tokio::spawn(async move {
            let accepted = client.create(&tenant, v1::Environment::Dev).await;
            client.watch(&accepted.name).await.1
        }));
    }
    let mut completed = 0;
    let mut exhausted = 0;
    for task in tasks {
        let done = task.await.unwrap();
        match metadata(&done).status() {
            v1::OperationStatus::Completed => completed += 1,
            v1::OperationStatus::Failed => {
                let (code, message) = error_of(&done);
                assert_eq!(code, tonic::Code::ResourceExhausted as i32, "{message}");
                exhausted += 1;
            }
            other => panic!("{other:?}: {done:?}"),
        }
    }
    assert_eq!((completed, exhausted), (4, 2));
    let counts = rules_per_listener(&first).await;
    for lb in ["alb-1", "alb-2"] {
        assert_eq!(counts[&listener_of(&first, lb)], 2, "{lb}: {counts:?}");
    }
    let mut client = first.client();
    for tenant in &tenants {
        if client.instance(tenant).await.state() == v1::InstanceState::Active {
            let deleted = client.delete_skipping_archive(tenant).await;
            client.completed(&deleted).await;
        }
    }
    platform::drop_tenant_databases(&tenants).await;
}
