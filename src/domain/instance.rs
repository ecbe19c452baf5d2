//! The instance record: a tenant's WordPress environment as the control plane knows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ids::{InstanceName, OperationId};
use super::spec::InstanceSpec;
use super::state::InstanceState;
use super::time::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: InstanceName,
    pub spec: InstanceSpec,
    pub state: InstanceState,
    pub state_changed_at: Timestamp,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The operation now changing the instance, if any; at most one runs at a time.
    pub current_operation: Option<OperationId>,
    /// Cloud resources recorded by workflows: kind → id or ARN.
    pub resources: BTreeMap<String, String>,
    pub failure_reason: Option<String>,
    /// True when a create was rolled back cleanly: every resource it made is gone and the
    /// (tenant, environment) slot was given back. Deleting such an instance touches nothing
    /// in the cloud (a sibling may own the tenant's names by now).
    #[serde(default)]
    pub released: bool,
    /// What the reconciler found wrong with the instance (drift), one entry per resource;
    /// an entry goes when what it reports does.
    #[serde(default)]
    pub conditions: Vec<InstanceCondition>,
    /// The load balancer of the environment's pool the instance is served from, once
    /// provisioning placed it (`None` for an instance provisioned before pools existed: it is
    /// on the platform's `listener_arn`).
    #[serde(default)]
    pub load_balancer: Option<Placement>,
    /// The DNS records of the instance (its alias record; its custom domains' validation
    /// and traffic records), as last written or observed by a workflow.
    #[serde(default)]
    pub dns_records: Vec<DnsRecordInfo>,
    /// Where each custom domain stands, in the spec's order.
    #[serde(default)]
    pub custom_domain_statuses: Vec<CustomDomainInfo>,
    /// Optimistic-concurrency version, bumped by the store on every write.
    pub version: u64,
}

impl Instance {
    pub fn new_pending(
        name: InstanceName,
        spec: InstanceSpec,
        operation: OperationId,
        now: Timestamp,
    ) -> Self {
        Self {
            name,
            spec,
            state: InstanceState::PendingProvisioning,
            state_changed_at: now,
            created_at: now,
            updated_at: now,
            current_operation: Some(operation),
            resources: BTreeMap::new(),
            failure_reason: None,
            released: false,
            conditions: Vec::new(),
            load_balancer: None,
            dns_records: Vec::new(),
            custom_domain_statuses: Vec::new(),
            version: 0,
        }
    }

    /// The AIP-154 etag: changes whenever the stored record changes.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }
}

/// The kinds of [`InstanceCondition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConditionType {
    /// A resource recorded on the instance is missing, or differs from what the instance
    /// says it should be.
    Drift,
}

/// Something the reconciler found about one of the instance's resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceCondition {
    #[serde(rename = "type")]
    pub kind: ConditionType,
    /// The resource's kind, a key of `resources` (`secret`, `target_group`, …).
    pub resource_kind: String,
    /// The resource's id or ARN as recorded.
    pub resource_id: String,
    pub message: String,
    /// When a reconciler first saw it (kept while it lasts).
    pub since: Timestamp,
}

/// The pool member an instance is placed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The member's name in the platform configuration.
    pub name: String,
    pub listener_arn: String,
    pub dns_name: String,
}

/// What a DNS record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DnsPurpose {
    /// Sends a host's traffic to the instance's load balancer.
    Traffic,
    /// Proves control of a custom domain to ACM.
    CertificateValidation,
}

/// One DNS record of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecordInfo {
    /// Without the trailing dot.
    pub name: String,
    /// `A` (alias) or `CNAME`.
    pub record_type: String,
    pub value: String,
    pub purpose: DnsPurpose,
    /// The control plane writes and removes it (a zone it manages).
    pub managed: bool,
    /// It exists as shown (managed: Route53 reported the change INSYNC).
    pub in_sync: bool,
}

/// The states of a custom domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DomainState {
    PendingValidation,
    Active,
    Failed,
}

/// Where one custom domain stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomDomainInfo {
    pub domain: String,
    pub state: DomainState,
    pub certificate_arn: String,
    /// What ACM reported (empty when active).
    pub message: String,
}
