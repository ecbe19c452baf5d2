//! Who may call what: the one authorisation table.
//!
//! Every RPC of `bbws.instance.v1.InstanceService` and `google.longrunning.Operations` has
//! exactly one entry here (a test checks it against the proto's service descriptors), with
//! the least [`Role`] that may call it and whether it changes anything (mutating calls are
//! recorded in the audit trail). The README's roles table is checked against it too.
//!
//! Tenant scoping is not in the table: it applies to every RPC alike (a principal limited
//! to one tenant finds the other tenants' resources NOT_FOUND, and lists leave them out).

use super::Role;

/// One RPC's entry in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The full gRPC method path, `/{package}.{Service}/{Method}`.
    pub method: &'static str,
    /// The least role that may call it.
    pub role: Role,
    /// Whether the call changes state; every such call is audited, allowed or refused.
    pub mutating: bool,
}

const INSTANCES: &str = "/bbws.instance.v1.InstanceService/";
const OPERATIONS: &str = "/google.longrunning.Operations/";

macro_rules! table {
    ($( $name:ident = $path:literal, $role:ident, $mutating:literal; )*) => {
        /// The method paths, as constants for the handlers.
        pub mod method {
            $( pub const $name: &str = $path; )*
        }
        /// The authorisation table.
        pub const RULES: &[Rule] = &[
            $( Rule { method: method::$name, role: Role::$role, mutating: $mutating }, )*
        ];
    };
}

table! {
    // Reads: viewer.
    GET_INSTANCE = "/bbws.instance.v1.InstanceService/GetInstance", Viewer, false;
    LIST_INSTANCES = "/bbws.instance.v1.InstanceService/ListInstances", Viewer, false;
    WATCH_INSTANCE = "/bbws.instance.v1.InstanceService/WatchInstance", Viewer, false;
    WATCH_OPERATION = "/bbws.instance.v1.InstanceService/WatchOperation", Viewer, false;
    CHECK_INSTANCE_HEALTH = "/bbws.instance.v1.InstanceService/CheckInstanceHealth", Viewer, false;
    GET_RESOURCE_USAGE = "/bbws.instance.v1.InstanceService/GetResourceUsage", Viewer, false;
    QUERY_LOGS = "/bbws.instance.v1.InstanceService/QueryLogs", Viewer, false;
    TAIL_LOGS = "/bbws.instance.v1.InstanceService/TailLogs", Viewer, false;
    GET_BACKUP = "/bbws.instance.v1.InstanceService/GetBackup", Viewer, false;
    LIST_BACKUPS = "/bbws.instance.v1.InstanceService/ListBackups", Viewer, false;
    GET_OPERATION = "/google.longrunning.Operations/GetOperation", Viewer, false;
    LIST_OPERATIONS = "/google.longrunning.Operations/ListOperations", Viewer, false;
    WAIT_OPERATION = "/google.longrunning.Operations/WaitOperation", Viewer, false;
    // The lifecycle: operator.
    CREATE_INSTANCE = "/bbws.instance.v1.InstanceService/CreateInstance", Operator, true;
    UPDATE_INSTANCE = "/bbws.instance.v1.InstanceService/UpdateInstance", Operator, true;
    SCALE_INSTANCE = "/bbws.instance.v1.InstanceService/ScaleInstance", Operator, true;
    SUSPEND_INSTANCE = "/bbws.instance.v1.InstanceService/SuspendInstance", Operator, true;
    RESUME_INSTANCE = "/bbws.instance.v1.InstanceService/ResumeInstance", Operator, true;
    RESTART_INSTANCE = "/bbws.instance.v1.InstanceService/RestartInstance", Operator, true;
    CREATE_BACKUP = "/bbws.instance.v1.InstanceService/CreateBackup", Operator, true;
    RESTORE_INSTANCE = "/bbws.instance.v1.InstanceService/RestoreInstance", Operator, true;
    RETRY_OPERATION = "/bbws.instance.v1.InstanceService/RetryOperation", Operator, true;
    CANCEL_OPERATION = "/google.longrunning.Operations/CancelOperation", Operator, true;
    // What cannot be undone, and the audit trail: admin.
    DELETE_INSTANCE = "/bbws.instance.v1.InstanceService/DeleteInstance", Admin, true;
    DELETE_BACKUP = "/bbws.instance.v1.InstanceService/DeleteBackup", Admin, true;
    DELETE_OPERATION = "/google.longrunning.Operations/DeleteOperation", Admin, true;
    LIST_AUDIT_EVENTS = "/bbws.instance.v1.InstanceService/ListAuditEvents", Admin, false;
}

/// The rule of a method path, `None` for a method the table does not know.
pub fn rule(method: &str) -> Option<&'static Rule> {
    RULES.iter().find(|rule| rule.method == method)
}

/// The method's last segment (`DeleteInstance`), for messages.
pub fn short_name(method: &str) -> &str {
    method.rsplit('/').next().unwrap_or(method)
}

/// Whether `method` belongs to one of the two authorised services.
pub fn is_authorised_service(method: &str) -> bool {
    method.starts_with(INSTANCES) || method.starts_with(OPERATIONS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::DescriptorPool;

    #[test]
    fn every_rpc_of_both_services_has_exactly_one_entry() {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut from_proto = Vec::new();
        for service in [
            "bbws.instance.v1.InstanceService",
            "google.longrunning.Operations",
        ] {
            let service = pool.get_service_by_name(service).expect(service);
            for method in service.methods() {
                from_proto.push(format!("/{}/{}", service.full_name(), method.name()));
            }
        }
        for method in &from_proto {
            let entries = RULES.iter().filter(|rule| rule.method == method).count();
            assert_eq!(entries, 1, "{method} has {entries} entries in the table");
        }
        for rule in RULES {
            assert!(
                from_proto.contains(&rule.method.to_owned()),
                "{} is in the table but not in the proto",
                rule.method
            );
            assert!(is_authorised_service(rule.method));
        }
        assert_eq!(RULES.len(), from_proto.len());
    }

    #[test]
    fn the_readme_roles_table_matches_the_code() {
        let readme = include_str!("../../README.md");
        for rule in RULES {
            let row = format!(
                "| `{}` | {} | {} |",
                short_name(rule.method),
                rule.role,
                if rule.mutating { "yes" } else { "no" }
            );
            assert!(
                readme.contains(&row),
                "README's roles table lacks the row {row:?}"
            );
        }
        let rows = readme
            .lines()
            .filter(|line| {
                line.starts_with("| `")
                    && (line.ends_with("| yes |") || line.ends_with("| no |"))
                    && Role::ALL
                        .iter()
                        .any(|role| line.contains(&format!("| {role} |")))
            })
            .count();
        assert_eq!(rows, RULES.len(), "README's roles table has extra rows");
    }

    #[test]
    fn lookups() {
        assert_eq!(rule(method::DELETE_INSTANCE).unwrap().role, Role::Admin);
        assert_eq!(
            method::CANCEL_OPERATION,
            "/google.longrunning.Operations/CancelOperation"
        );
        assert!(rule("/bbws.instance.v1.InstanceService/Nope").is_none());
        assert_eq!(short_name(method::GET_INSTANCE), "GetInstance");
    }
}
