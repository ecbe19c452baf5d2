//! Domain ↔ protobuf mapping. Parsing (proto → domain) collects field violations; rendering
//! (domain → proto) cannot fail.

use prost::{Message, Name};
use prost_types::Any;

use crate::domain::operation::StepStatus;
use crate::domain::spec::SpecInput;
use crate::domain::{
    Backup, BackupState, ConditionType, DnsPurpose, DomainState, Environment, Instance,
    InstanceState, Operation, OperationEvent, OperationStatus, Tier, Timestamp, Violations,
};
use crate::proto::google_longrunning as lro;
use crate::proto::v1;

use super::error::{ERROR_DOMAIN, reason};

pub fn timestamp(at: Timestamp) -> prost_types::Timestamp {
    let millis = at.millis();
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A proto enum field: unspecified → `None`; a number the schema does not define → a
/// violation naming the field.
pub fn parse_enum<P, D>(
    raw: i32,
    field: &str,
    violations: &mut Violations,
    map: impl Fn(P) -> Option<D>,
) -> Option<D>
where
    P: TryFrom<i32>,
{
    match P::try_from(raw) {
        Ok(value) => map(value),
        Err(_) => {
            violations.add(field, format!("unknown enum value {raw}"));
            None
        }
    }
}

pub fn environment_from_proto(value: v1::Environment) -> Option<Environment> {
    match value {
        v1::Environment::Unspecified => None,
        v1::Environment::Dev => Some(Environment::Dev),
        v1::Environment::Sit => Some(Environment::Sit),
        v1::Environment::Prod => Some(Environment::Prod),
    }
}

pub fn environment_to_proto(value: Environment) -> v1::Environment {
    match value {
        Environment::Dev => v1::Environment::Dev,
        Environment::Sit => v1::Environment::Sit,
        Environment::Prod => v1::Environment::Prod,
    }
}

pub fn tier_from_proto(value: v1::Tier) -> Option<Tier> {
    match value {
        v1::Tier::Unspecified => None,
        v1::Tier::Basic => Some(Tier::Basic),
        v1::Tier::Standard => Some(Tier::Standard),
        v1::Tier::Premium => Some(Tier::Premium),
    }
}

fn tier_to_proto(value: Tier) -> v1::Tier {
    match value {
        Tier::Basic => v1::Tier::Basic,
        Tier::Standard => v1::Tier::Standard,
        Tier::Premium => v1::Tier::Premium,
    }
}

pub fn state_from_proto(value: v1::InstanceState) -> Option<InstanceState> {
    use v1::InstanceState as P;
    Some(match value {
        P::Unspecified => return None,
        P::PendingProvisioning => InstanceState::PendingProvisioning,
        P::Provisioning => InstanceState::Provisioning,
        P::Active => InstanceState::Active,
        P::Scaling => InstanceState::Scaling,
        P::Restarting => InstanceState::Restarting,
        P::Updating => InstanceState::Updating,
        P::Suspending => InstanceState::Suspending,
        P::Suspended => InstanceState::Suspended,
        P::Resuming => InstanceState::Resuming,
        P::Restoring => InstanceState::Restoring,
        P::PendingDeprovisioning => InstanceState::PendingDeprovisioning,
        P::Deprovisioning => InstanceState::Deprovisioning,
        P::Deprovisioned => InstanceState::Deprovisioned,
        P::Failed => InstanceState::Failed,
    })
}

pub fn state_to_proto(value: InstanceState) -> v1::InstanceState {
    use v1::InstanceState as P;
    match value {
        InstanceState::PendingProvisioning => P::PendingProvisioning,
        InstanceState::Provisioning => P::Provisioning,
        InstanceState::Active => P::Active,
        InstanceState::Scaling => P::Scaling,
        InstanceState::Restarting => P::Restarting,
        InstanceState::Updating => P::Updating,
        InstanceState::Suspending => P::Suspending,
        InstanceState::Suspended => P::Suspended,
        InstanceState::Resuming => P::Resuming,
        InstanceState::Restoring => P::Restoring,
        InstanceState::PendingDeprovisioning => P::PendingDeprovisioning,
        InstanceState::Deprovisioning => P::Deprovisioning,
        InstanceState::Deprovisioned => P::Deprovisioned,
        InstanceState::Failed => P::Failed,
    }
}

pub fn operation_status_to_proto(value: OperationStatus) -> v1::OperationStatus {
    match value {
        OperationStatus::Pending => v1::OperationStatus::Pending,
        OperationStatus::InProgress => v1::OperationStatus::InProgress,
        OperationStatus::Completed => v1::OperationStatus::Completed,
        OperationStatus::Failed => v1::OperationStatus::Failed,
        OperationStatus::Stuck => v1::OperationStatus::Stuck,
        OperationStatus::Cancelled => v1::OperationStatus::Cancelled,
    }
}

fn step_status_to_proto(value: StepStatus) -> v1::StepStatus {
    match value {
        StepStatus::Pending => v1::StepStatus::Pending,
        StepStatus::Running => v1::StepStatus::Running,
        StepStatus::Succeeded => v1::StepStatus::Succeeded,
        StepStatus::Failed => v1::StepStatus::Failed,
        StepStatus::Skipped => v1::StepStatus::Skipped,
        StepStatus::Undone => v1::StepStatus::Undone,
        StepStatus::UndoFailed => v1::StepStatus::UndoFailed,
    }
}

/// The spec fields of a client's `Instance`, unvalidated; enum problems are recorded in
/// `violations` under `prefix.field`.
pub fn spec_input(instance: &v1::Instance, prefix: &str, violations: &mut Violations) -> SpecInput {
    let field = |name: &str| format!("{prefix}.{name}");
    SpecInput {
        environment: parse_enum(
            instance.environment,
            &field("environment"),
            violations,
            environment_from_proto,
        ),
        organization_name: instance.organization_name.clone(),
        contact_email: instance.contact_email.clone(),
        tier: parse_enum(instance.tier, &field("tier"), violations, tier_from_proto),
        desired_count: i64::from(instance.desired_count),
        cpu: i64::from(instance.cpu),
        memory_mib: i64::from(instance.memory_mib),
        wordpress_image: instance.wordpress_image.clone(),
        wordpress_version: instance.wordpress_version.clone(),
        labels: instance.labels.clone(),
        opportunity_id: instance.opportunity_id.clone(),
        cost_center: instance.cost_center.clone(),
        custom_domains: instance.custom_domains.clone(),
    }
}

fn count(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

pub fn instance_to_proto(instance: &Instance) -> v1::Instance {
    let spec = &instance.spec;
    v1::Instance {
        name: instance.name.to_string(),
        environment: environment_to_proto(spec.environment).into(),
        organization_name: spec.organization_name.clone(),
        contact_email: spec.contact_email.clone(),
        tier: tier_to_proto(spec.tier).into(),
        desired_count: count(spec.desired_count),
        cpu: count(spec.cpu),
        memory_mib: count(spec.memory_mib),
        wordpress_image: spec.wordpress_image.clone(),
        wordpress_version: spec.wordpress_version.clone(),
        labels: spec.labels.clone(),
        opportunity_id: spec.opportunity_id.clone(),
        cost_center: spec.cost_center.clone(),
        state: state_to_proto(instance.state).into(),
        current_operation: instance
            .current_operation
            .as_ref()
            .map(|id| id.name())
            .unwrap_or_default(),
        url: instance.resources.get("url").cloned().unwrap_or_default(),
        resources: instance.resources.clone(),
        create_time: Some(timestamp(instance.created_at)),
        update_time: Some(timestamp(instance.updated_at)),
        state_change_time: Some(timestamp(instance.state_changed_at)),
        etag: instance.etag(),
        custom_domains: spec.custom_domains.clone(),
        load_balancer: instance
            .load_balancer
            .as_ref()
            .map(|lb| v1::LoadBalancerPlacement {
                name: lb.name.clone(),
                listener_arn: lb.listener_arn.clone(),
                dns_name: lb.dns_name.clone(),
            }),
        dns_records: instance
            .dns_records
            .iter()
            .map(|record| v1::DnsRecord {
                name: record.name.clone(),
                r#type: record.record_type.clone(),
                value: record.value.clone(),
                purpose: match record.purpose {
                    DnsPurpose::Traffic => v1::dns_record::Purpose::Traffic,
                    DnsPurpose::CertificateValidation => {
                        v1::dns_record::Purpose::CertificateValidation
                    }
                }
                .into(),
                managed: record.managed,
                in_sync: record.in_sync,
            })
            .collect(),
        custom_domain_statuses: instance
            .custom_domain_statuses
            .iter()
            .map(|status| v1::CustomDomainStatus {
                domain: status.domain.clone(),
                state: match status.state {
                    DomainState::PendingValidation => {
                        v1::custom_domain_status::State::PendingValidation
                    }
                    DomainState::Active => v1::custom_domain_status::State::Active,
                    DomainState::Failed => v1::custom_domain_status::State::Failed,
                }
                .into(),
                certificate_arn: status.certificate_arn.clone(),
                message: status.message.clone(),
            })
            .collect(),
        failure_reason: instance.failure_reason.clone().unwrap_or_default(),
        conditions: instance
            .conditions
            .iter()
            .map(|condition| v1::InstanceCondition {
                r#type: match condition.kind {
                    ConditionType::Drift => v1::instance_condition::Type::Drift,
                }
                .into(),
                resource_kind: condition.resource_kind.clone(),
                resource_id: condition.resource_id.clone(),
                message: condition.message.clone(),
                first_seen_time: Some(timestamp(condition.since)),
            })
            .collect(),
    }
}

pub fn backup_state_to_proto(value: BackupState) -> v1::BackupState {
    match value {
        BackupState::Creating => v1::BackupState::Creating,
        BackupState::Ready => v1::BackupState::Ready,
        BackupState::Failed => v1::BackupState::Failed,
        BackupState::Deleting => v1::BackupState::Deleting,
    }
}

/// A backup as clients see it (GetBackup, ListBackups, and CreateBackup's response).
pub(crate) fn backup_to_proto(backup: &Backup) -> v1::Backup {
    v1::Backup {
        name: backup.name.to_string(),
        description: backup.description.clone(),
        state: backup_state_to_proto(backup.state).into(),
        create_time: Some(timestamp(backup.created_at)),
        expire_time: Some(timestamp(backup.expire_at)),
        database_dump_uri: backup.database_uri.clone().unwrap_or_default(),
        content_archive_uri: backup.content_uri.clone().unwrap_or_default(),
        size_bytes: i64::try_from(backup.size_bytes).unwrap_or(i64::MAX),
        labels: backup
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        etag: backup.etag(),
    }
}

pub fn metadata_to_proto(operation: &Operation) -> v1::OperationMetadata {
    v1::OperationMetadata {
        target: operation.target.to_string(),
        verb: operation.verb.to_string(),
        status: operation_status_to_proto(operation.status).into(),
        steps: operation
            .steps
            .iter()
            .map(|step| v1::OperationStep {
                name: step.name.clone(),
                status: step_status_to_proto(step.status).into(),
                resource_id: step.resource_id.clone().unwrap_or_default(),
                error: step.error.clone().unwrap_or_default(),
                start_time: step.started_at.map(timestamp),
                end_time: step.ended_at.map(timestamp),
                attempts: count(step.attempts),
            })
            .collect(),
        progress_percent: count(operation.progress_percent()),
        create_time: Some(timestamp(operation.created_at)),
        update_time: Some(timestamp(operation.updated_at)),
        end_time: operation.ended_at.map(timestamp),
        status_detail: operation
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
        cancel_requested: operation.cancel_requested,
        attempt: count(operation.attempt),
        request_id: operation
            .request_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

/// Packs a message with the conventional `type.googleapis.com/` prefix, which grpcurl and
/// other generic clients resolve through reflection.
pub(crate) fn pack<M: Name>(message: &M) -> Any {
    Any {
        type_url: format!("type.googleapis.com/{}", M::full_name()),
        value: message.encode_to_vec(),
    }
}

/// The `google.longrunning.Operation` view. A completed operation's response is the
/// instance as it is now (`target`; for a delete, the DEPROVISIONED record).
pub fn operation_to_proto(operation: &Operation, target: Option<&Instance>) -> lro::Operation {
    let result = match operation.status {
        OperationStatus::Completed => Some(lro::operation::Result::Response(match target {
            Some(instance) => pack(&instance_to_proto(instance)),
            None => Any {
                type_url: "type.googleapis.com/google.protobuf.Empty".into(),
                value: Vec::new(),
            },
        })),
        OperationStatus::Failed | OperationStatus::Stuck | OperationStatus::Cancelled => {
            let (code, reason_text, message) = match (&operation.error, operation.status) {
                (_, OperationStatus::Cancelled) => (
                    tonic::Code::Cancelled,
                    "OPERATION_CANCELLED".to_owned(),
                    "the operation was cancelled".to_owned(),
                ),
                (Some(error), _) => (
                    crate::domain::operation::failure_reason::code(&error.reason)
                        .map_or(tonic::Code::Aborted, tonic::Code::from),
                    error.reason.clone(),
                    error.message.clone(),
                ),
                (None, _) => (
                    tonic::Code::Unknown,
                    reason::INTERNAL.to_owned(),
                    "the operation failed".to_owned(),
                ),
            };
            let info = tonic_types::pb::ErrorInfo {
                reason: reason_text,
                domain: ERROR_DOMAIN.to_owned(),
                metadata: Default::default(),
            };
            Some(lro::operation::Result::Error(tonic_types::Status {
                code: code as i32,
                message,
                details: vec![Any {
                    type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                    value: info.encode_to_vec(),
                }],
            }))
        }
        OperationStatus::Pending | OperationStatus::InProgress => None,
    };
    lro::Operation {
        name: operation.id.name(),
        metadata: Some(pack(&metadata_to_proto(operation))),
        done: operation.status.is_done(),
        result,
    }
}

pub fn event_to_proto(event: &OperationEvent) -> v1::OperationEvent {
    v1::OperationEvent {
        sequence: i64::try_from(event.seq).unwrap_or(i64::MAX),
        time: Some(timestamp(event.at)),
        operation: event.operation.name(),
        status: operation_status_to_proto(event.status).into(),
        step: event.step.clone().unwrap_or_default(),
        step_status: event
            .step_status
            .map(step_status_to_proto)
            .unwrap_or(v1::StepStatus::Unspecified)
            .into(),
        message: event.message.clone(),
        progress_percent: count(event.percent),
        terminal: event.terminal,
    }
}
