//! Authorisation (issue 12, point 2): every RPC of the authorisation table × every role ×
//! every tenant scope × own/other tenant, through an in-process server with static tokens
//! on moto's DynamoDB. The expectations come from `auth::authz::RULES`; this file only
//! knows how to build a request for each method.

mod authz_support;
mod common;

use std::collections::BTreeMap;

use authz_support::{Fixture, Server, TENANTS, Who, req, seed, snapshot, start};
use instance_manager::api::ApiSettings;
use instance_manager::auth::Role;
use instance_manager::auth::authz::{RULES, Rule, method};
use instance_manager::domain::InstanceName;
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use instance_manager::store::StateStore;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// A request id that fails validation: an allowed mutating call is refused by its handler
/// and writes nothing.
const BAD_REQUEST_ID: &str = "not a valid id!";

/// How a method names its target tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A resource of the tenant: another tenant's is NOT_FOUND to a scoped principal.
    Resource,
    /// A list under `tenants/{tenant}`: another tenant's lists nothing.
    TenantList,
    /// No tenant in the request (ListOperations): filtered, checked separately.
    Unscoped,
}

/// Calls `method` as `who` on `tenant`'s fixtures. What the call answered, how it names
/// its tenant, and for lists how many items it returned.
async fn call(
    server: &mut Server,
    rule: &Rule,
    who: Option<Who>,
    fixture: &Fixture,
    tenant: &str,
) -> (Result<usize, Status>, Shape) {
    let inst = fixture.instance.clone();
    let op = fixture.operation.clone();
    let backup = fixture.backup.clone();
    let bad = BAD_REQUEST_ID.to_owned();
    let s = &mut server.instances;
    let o = &mut server.operations;
    macro_rules! r {
        ($message:expr) => {
            req(who, $message, None)
        };
    }
    use Shape::*;
    match rule.method {
        method::GET_INSTANCE => (
            one(s
                .get_instance(r!(v1::GetInstanceRequest { name: inst }))
                .await),
            Resource,
        ),
        method::LIST_INSTANCES => (
            s.list_instances(r!(v1::ListInstancesRequest {
                parent: format!("tenants/{tenant}"),
                ..Default::default()
            }))
            .await
            .map(|l| l.into_inner().instances.len()),
            TenantList,
        ),
        method::WATCH_INSTANCE => (
            one(s
                .watch_instance(r!(v1::WatchInstanceRequest { name: inst }))
                .await),
            Resource,
        ),
        method::WATCH_OPERATION => (
            one(s
                .watch_operation(r!(v1::WatchOperationRequest {
                    name: op,
                    from_sequence: 0,
                }))
                .await),
            Resource,
        ),
        method::CHECK_INSTANCE_HEALTH => (
            one(s
                .check_instance_health(r!(v1::CheckInstanceHealthRequest { name: inst }))
                .await),
            Resource,
        ),
        method::GET_RESOURCE_USAGE => (
            one(s
                .get_resource_usage(r!(v1::GetResourceUsageRequest {
                    name: inst,
                    ..Default::default()
                }))
                .await),
            Resource,
        ),
        method::QUERY_LOGS => (
            one(s
                .query_logs(r!(v1::QueryLogsRequest {
                    name: inst,
                    ..Default::default()
                }))
                .await),
            Resource,
        ),
        method::TAIL_LOGS => (
            one(s
                .tail_logs(r!(v1::TailLogsRequest {
                    name: inst,
                    ..Default::default()
                }))
                .await),
            Resource,
        ),
        method::GET_BACKUP => (
            one(s
                .get_backup(r!(v1::GetBackupRequest { name: backup }))
                .await),
            Resource,
        ),
        method::LIST_BACKUPS => (
            s.list_backups(r!(v1::ListBackupsRequest {
                parent: inst,
                ..Default::default()
            }))
            .await
            .map(|l| l.into_inner().backups.len()),
            Resource,
        ),
        method::GET_OPERATION => (
            one(o
                .get_operation(r!(lro::GetOperationRequest { name: op }))
                .await),
            Resource,
        ),
        method::LIST_OPERATIONS => (
            o.list_operations(r!(lro::ListOperationsRequest::default()))
                .await
                .map(|l| l.into_inner().operations.len()),
            Unscoped,
        ),
        method::WAIT_OPERATION => (
            one(o
                .wait_operation(r!(lro::WaitOperationRequest {
                    name: op,
                    timeout: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                }))
                .await),
            Resource,
        ),
        method::CREATE_INSTANCE => {
            let mut create = authz_support::create_request(tenant, "wp2");
            create.request_id = bad;
            (one(s.create_instance(r!(create)).await), Resource)
        }
        method::UPDATE_INSTANCE => (
            one(s
                .update_instance(r!(v1::UpdateInstanceRequest {
                    instance: Some(v1::Instance {
                        name: inst,
                        ..Default::default()
                    }),
                    update_mask: None,
                    request_id: bad,
                }))
                .await),
            Resource,
        ),
        method::SCALE_INSTANCE => (
            one(s
                .scale_instance(r!(v1::ScaleInstanceRequest {
                    name: inst,
                    desired_count: 3,
                    request_id: bad,
                    ..Default::default()
                }))
                .await),
            Resource,
        ),
        method::SUSPEND_INSTANCE => (
            one(s
                .suspend_instance(r!(v1::SuspendInstanceRequest {
                    name: inst,
                    reason: String::new(),
                    request_id: bad,
                }))
                .await),
            Resource,
        ),
        method::RESUME_INSTANCE => (
            one(s
                .resume_instance(r!(v1::ResumeInstanceRequest {
                    name: inst,
                    request_id: bad,
                }))
                .await),
            Resource,
        ),
        method::RESTART_INSTANCE => (
            one(s
                .restart_instance(r!(v1::RestartInstanceRequest {
                    name: inst,
                    request_id: bad,
                }))
                .await),
            Resource,
        ),
        method::CREATE_BACKUP => (
            one(s
                .create_backup(r!(v1::CreateBackupRequest {
                    parent: inst,
                    request_id: bad,
                    ..Default::default()
                }))
                .await),
            Resource,
        ),
        method::RESTORE_INSTANCE => (
            one(s
                .restore_instance(r!(v1::RestoreInstanceRequest {
                    name: inst,
                    backup,
                    request_id: bad,
                }))
                .await),
            Resource,
        ),
        method::RETRY_OPERATION => (
            one(s
                .retry_operation(r!(v1::RetryOperationRequest {
                    name: op,
                    request_id: bad,
                }))
                .await),
            Resource,
        ),
        // The fixture's operation is COMPLETED: cancelling it is refused, nothing written.
        method::CANCEL_OPERATION => (
            one(o
                .cancel_operation(r!(lro::CancelOperationRequest { name: op }))
                .await),
            Resource,
        ),
        method::DELETE_INSTANCE => (
            one(s
                .delete_instance(r!(v1::DeleteInstanceRequest {
                    name: inst,
                    request_id: bad,
                    ..Default::default()
                }))
                .await),
            Resource,
        ),
        // A wrong etag: ABORTED before anything is touched.
        method::DELETE_BACKUP => (
            one(s
                .delete_backup(r!(v1::DeleteBackupRequest {
                    name: backup,
                    etag: "\"stale\"".into(),
                }))
                .await),
            Resource,
        ),
        method::DELETE_OPERATION => (
            one(o
                .delete_operation(r!(lro::DeleteOperationRequest { name: op }))
                .await),
            Resource,
        ),
        method::LIST_AUDIT_EVENTS => (
            s.list_audit_events(r!(v1::ListAuditEventsRequest {
                parent: format!("tenants/{tenant}"),
                ..Default::default()
            }))
            .await
            .map(|l| l.into_inner().audit_events.len()),
            TenantList,
        ),
        other => panic!("{other} is in the authorisation table but this test cannot call it"),
    }
}

fn one<T>(result: Result<T, Status>) -> Result<usize, Status> {
    result.map(|_| 1)
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
        .reason
}

async fn audit_count(server: &mut Server) -> usize {
    let mut count = 0;
    let mut token = String::new();
    loop {
        let page = server
            .instances
            .list_audit_events(req(
                Some(Who::global(Role::Admin)),
                v1::ListAuditEventsRequest {
                    parent: "tenants/-".into(),
                    page_size: 1000,
                    page_token: token,
                    filter: String::new(),
                },
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        count += page.audit_events.len();
        if page.next_page_token.is_empty() {
            return count;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn every_rpc_by_role_and_tenant() {
    let mut server = start(ApiSettings::default()).await;
    let fixtures: BTreeMap<&'static str, Fixture> = seed(&mut server).await;
    let before = snapshot(&server.store, &fixtures).await;
    let audited_before = audit_count(&mut server).await;
    let mut mutating_calls = 0;
    let mut checked = 0;
    for rule in RULES {
        for who in Who::all() {
            for tenant in TENANTS {
                let (result, shape) =
                    call(&mut server, rule, Some(who), &fixtures[tenant], tenant).await;
                let context = format!("{} as {} on {tenant}: {result:?}", rule.method, who.name());
                if rule.mutating {
                    mutating_calls += 1;
                }
                checked += 1;
                let hidden = !who.sees(tenant);
                match (shape, hidden, who.role >= rule.role) {
                    (Shape::Resource, true, _) => {
                        let status = result.expect_err(&context);
                        assert_eq!(status.code(), Code::NotFound, "{context}");
                        assert!(reason(&status).ends_with("_NOT_FOUND"), "{context}");
                    }
                    (_, _, false) => {
                        let status = result.expect_err(&context);
                        assert_eq!(status.code(), Code::PermissionDenied, "{context}");
                        assert_eq!(reason(&status), "ROLE_REQUIRED", "{context}");
                        let info = status.get_details_error_info().unwrap();
                        assert_eq!(
                            info.metadata["required_role"],
                            rule.role.as_str(),
                            "{context}"
                        );
                    }
                    (Shape::TenantList, true, true) => {
                        assert_eq!(result.expect(&context), 0, "{context}");
                    }
                    (_, _, true) => {
                        if let Err(status) = &result {
                            assert!(
                                !matches!(
                                    status.code(),
                                    Code::PermissionDenied | Code::Unauthenticated | Code::NotFound
                                ),
                                "{context}"
                            );
                        }
                        if shape == Shape::TenantList && rule.method == method::LIST_INSTANCES {
                            assert_eq!(result.expect(&context), 1, "{context}");
                        }
                    }
                }
            }
        }
        // Without a token nothing reaches a handler.
        let (result, _) = call(&mut server, rule, None, &fixtures["acme"], "acme").await;
        let status = result.expect_err(rule.method);
        assert_eq!(status.code(), Code::Unauthenticated, "{}", rule.method);
    }
    assert_eq!(checked, RULES.len() * 9 * 2);
    // Nothing was written by any call: refused ones never reach a handler, allowed ones
    // were crafted to fail validation or a precondition.
    assert_eq!(snapshot(&server.store, &fixtures).await, before);
    // Every mutating call by an authenticated principal is in the audit trail, and only
    // those (the unauthenticated ones stop at the authentication layer).
    assert_eq!(
        audit_count(&mut server).await - audited_before,
        mutating_calls
    );
}

/// Another tenant's instance, backup or operation answers exactly like a missing one.
#[tokio::test]
async fn another_tenants_resources_are_indistinguishable_from_missing_ones() {
    let mut server = start(ApiSettings::default()).await;
    let fixtures = seed(&mut server).await;
    let acme = Who::of(Role::Admin, "acme");
    let admin = Who::global(Role::Admin);
    let globex = &fixtures["globex"];
    // What an admin of every tenant gets for names that do not exist.
    let missing_instance = "tenants/globex/instances/ghost";
    let missing_backup = "tenants/globex/instances/wp/backups/ghost";
    let missing_operation = "operations/00000000-0000-4000-8000-000000000000";

    let normalise = |status: Status, name: &str| {
        let info = status.get_details_error_info().unwrap();
        (
            status.code(),
            status.message().replace(name, "{name}"),
            info.reason,
            info.metadata
                .into_iter()
                .map(|(k, v)| (k, v.replace(name, "{name}")))
                .collect::<BTreeMap<_, _>>(),
        )
    };

    let hidden = server
        .instances
        .get_instance(req(
            Some(acme),
            v1::GetInstanceRequest {
                name: globex.instance.clone(),
            },
            None,
        ))
        .await
        .unwrap_err();
    let missing = server
        .instances
        .get_instance(req(
            Some(admin),
            v1::GetInstanceRequest {
                name: missing_instance.into(),
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        normalise(hidden, &globex.instance),
        normalise(missing, missing_instance)
    );

    let hidden = server
        .instances
        .get_backup(req(
            Some(acme),
            v1::GetBackupRequest {
                name: globex.backup.clone(),
            },
            None,
        ))
        .await
        .unwrap_err();
    let missing = server
        .instances
        .get_backup(req(
            Some(admin),
            v1::GetBackupRequest {
                name: missing_backup.into(),
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        normalise(hidden, &globex.backup),
        normalise(missing, missing_backup)
    );

    for who in [acme, Who::of(Role::Viewer, "acme")] {
        let hidden = server
            .operations
            .get_operation(req(
                Some(who),
                lro::GetOperationRequest {
                    name: globex.operation.clone(),
                },
                None,
            ))
            .await
            .unwrap_err();
        let missing = server
            .operations
            .get_operation(req(
                Some(admin),
                lro::GetOperationRequest {
                    name: missing_operation.into(),
                },
                None,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            normalise(hidden, &globex.operation),
            normalise(missing, missing_operation)
        );
        // A mutation needing more than the principal's role: still NOT_FOUND, not
        // PERMISSION_DENIED, for another tenant's operation.
        let cancel = server
            .operations
            .cancel_operation(req(
                Some(who),
                lro::CancelOperationRequest {
                    name: globex.operation.clone(),
                },
                None,
            ))
            .await
            .unwrap_err();
        assert_eq!(cancel.code(), Code::NotFound);
    }
}

/// Lists leave other tenants out; a replayed request id cannot reach another tenant's
/// operation.
#[tokio::test]
async fn lists_are_filtered_and_replays_stay_in_their_tenant() {
    let mut server = start(ApiSettings::default()).await;
    let fixtures = seed(&mut server).await;
    let acme = Who::of(Role::Operator, "acme");

    let all = server
        .instances
        .list_instances(req(
            Some(acme),
            v1::ListInstancesRequest {
                parent: "tenants/-".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = all.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, [fixtures["acme"].instance.as_str()]);

    let operations = server
        .operations
        .list_operations(req(
            Some(acme),
            lro::ListOperationsRequest {
                page_size: 1,
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(operations.operations.len(), 1);
    assert_eq!(operations.operations[0].name, fixtures["acme"].operation);
    // The page was full: is there more? Only acme's, and acme has no second operation.
    if !operations.next_page_token.is_empty() {
        let rest = server
            .operations
            .list_operations(req(
                Some(acme),
                lro::ListOperationsRequest {
                    page_size: 1,
                    page_token: operations.next_page_token,
                    ..Default::default()
                },
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(rest.operations.is_empty(), "{rest:?}");
    }
    // A global viewer sees both tenants' operations.
    let both = server
        .operations
        .list_operations(req(
            Some(Who::global(Role::Viewer)),
            lro::ListOperationsRequest::default(),
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(both.operations.len(), 2);

    // globex's admin creates with a request id; acme reuses it for its own tenant.
    let globex_admin = Who::of(Role::Admin, "globex");
    // (In SIT: each tenant has its DEV instance already.)
    let mut create = authz_support::create_request("globex", "second");
    create.instance.as_mut().unwrap().environment = v1::Environment::Sit.into();
    create.request_id = "shared-request-id".into();
    let globex_op = server
        .instances
        .create_instance(req(Some(globex_admin), create.clone(), None))
        .await
        .unwrap()
        .into_inner();
    // The same payload from acme names globex: NOT_FOUND, not globex's operation.
    let same = server
        .instances
        .create_instance(req(Some(acme), create, None))
        .await
        .unwrap_err();
    assert_eq!(same.code(), Code::NotFound);
    // acme's own tenant with the same id: the id is taken by a different request.
    let mut own = authz_support::create_request("acme", "second");
    own.instance.as_mut().unwrap().environment = v1::Environment::Sit.into();
    own.request_id = "shared-request-id".into();
    let reused = server
        .instances
        .create_instance(req(Some(acme), own, None))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert!(!reused.message().contains(&globex_op.name), "{reused:?}");
    assert!(
        server
            .store
            .get_instance(&InstanceName::parse("tenants/acme/instances/second").unwrap())
            .await
            .unwrap()
            .is_none()
    );
}
