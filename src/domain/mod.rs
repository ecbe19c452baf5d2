//! Domain model: instances, specs, states and transitions, operations, naming rules.
//! Nothing here knows about tonic, protobuf or AWS: the API layer parses requests into
//! these types, and the store and workflows work only with them.

pub mod audit;
pub mod backup;
pub mod ids;
pub mod image;
pub mod instance;
pub mod naming;
pub mod operation;
pub mod spec;
pub mod state;
pub mod time;
pub mod violation;

pub use audit::AuditEvent;
pub use backup::{Backup, BackupOrigin, BackupState};
pub use ids::{BackupId, BackupName, InstanceId, InstanceName, OperationId, RequestId, TenantId};
pub use image::ImagePolicy;
pub use instance::{
    ConditionType, CustomDomainInfo, DnsPurpose, DnsRecordInfo, DomainState, Instance,
    InstanceCondition, Placement,
};
pub use operation::{Operation, OperationEvent, OperationStatus, Phase, Step, StepStatus, Verb};
pub use spec::{Environment, InstanceSpec, ScaleBounds, Tier};
pub use state::InstanceState;
pub use time::Timestamp;
pub use violation::{FieldViolation, Violations};
