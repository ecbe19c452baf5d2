//! The audit trail (issue 12, point 3) through an in-process server with static tokens on
//! moto's DynamoDB: what a mutating call records, refused calls included, the order and
//! pages of ListAuditEvents, tenant scoping and retention.
//!
//! No workflow engine runs here: between the calls the test plays the engine's part on the
//! store (the operation ends COMPLETED, the instance ACTIVE), so each call is accepted.

mod authz_support;
mod common;

use std::time::Duration;

use authz_support::{Who, finish, req, start};
use instance_manager::api::ApiSettings;
use instance_manager::auth::Role;
use instance_manager::auth::authz::method;
use instance_manager::domain::InstanceState;
use instance_manager::proto::v1;
use tonic::Code;

fn list(
    parent: &str,
    filter: &str,
    page_size: i32,
    page_token: &str,
) -> v1::ListAuditEventsRequest {
    v1::ListAuditEventsRequest {
        parent: parent.into(),
        page_size,
        page_token: page_token.into(),
        filter: filter.into(),
    }
}

#[tokio::test]
async fn create_scale_delete_are_recorded_in_order() {
    let mut server = start(ApiSettings::default()).await;
    let operator = Who::global(Role::Operator);
    let admin = Who::of(Role::Admin, "acme");
    let created = server
        .instances
        .create_instance(req(
            Some(operator),
            authz_support::create_request("acme", "wp"),
            Some("req-create"),
        ))
        .await
        .unwrap()
        .into_inner();
    finish(&server.store, &created.name, InstanceState::Active).await;
    let scaled = server
        .instances
        .scale_instance(req(
            Some(operator),
            v1::ScaleInstanceRequest {
                name: "tenants/acme/instances/wp".into(),
                desired_count: 3,
                ..Default::default()
            },
            Some("req-scale"),
        ))
        .await
        .unwrap()
        .into_inner();
    finish(&server.store, &scaled.name, InstanceState::Active).await;
    // Refused: a viewer may not delete (audited as PERMISSION_DENIED, no request id sent:
    // the server generates one).
    let denied = server
        .instances
        .delete_instance(req(
            Some(Who::of(Role::Viewer, "acme")),
            v1::DeleteInstanceRequest {
                name: "tenants/acme/instances/wp".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let deleted = server
        .instances
        .delete_instance(req(
            Some(admin),
            v1::DeleteInstanceRequest {
                name: "tenants/acme/instances/wp".into(),
                skip_archive: true,
                ..Default::default()
            },
            Some("req-delete"),
        ))
        .await
        .unwrap()
        .into_inner();

    let events = server
        .instances
        .list_audit_events(req(Some(admin), list("tenants/acme", "", 0, ""), None))
        .await
        .unwrap()
        .into_inner()
        .audit_events;
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.method.as_str(),
                e.principal.clone(),
                e.target.as_str(),
                e.outcome.as_str(),
                e.operation.as_str(),
            )
        })
        .collect();
    // Newest first.
    assert_eq!(
        summary,
        [
            (
                method::DELETE_INSTANCE,
                admin.subject(),
                "tenants/acme/instances/wp",
                "OK",
                deleted.name.as_str()
            ),
            (
                method::DELETE_INSTANCE,
                Who::of(Role::Viewer, "acme").subject(),
                "tenants/acme/instances/wp",
                "PERMISSION_DENIED",
                ""
            ),
            (
                method::SCALE_INSTANCE,
                operator.subject(),
                "tenants/acme/instances/wp",
                "OK",
                scaled.name.as_str()
            ),
            (
                method::CREATE_INSTANCE,
                operator.subject(),
                "tenants/acme",
                "OK",
                created.name.as_str()
            ),
        ]
    );
    assert_eq!(events[0].request_id, "req-delete");
    assert_eq!(events[2].request_id, "req-scale");
    assert_eq!(events[3].request_id, "req-create");
    // The generated request id is a UUID.
    assert!(
        uuid::Uuid::parse_str(&events[1].request_id).is_ok(),
        "{:?}",
        events[1]
    );
    assert!(events.iter().all(|e| e.tenant == "acme"));
    let times: Vec<_> = events
        .iter()
        .map(|e| {
            e.event_time.unwrap().seconds * 1000
                + i64::from(e.event_time.unwrap().nanos / 1_000_000)
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");

    // Filters.
    let refused = server
        .instances
        .list_audit_events(req(
            Some(admin),
            list(
                "tenants/-",
                "outcome = PERMISSION_DENIED AND method = DeleteInstance",
                0,
                "",
            ),
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .audit_events;
    assert_eq!(refused.len(), 1);
    assert_eq!(
        refused[0].principal,
        Who::of(Role::Viewer, "acme").subject()
    );
}

#[tokio::test]
async fn refused_and_scoped_calls_are_recorded_for_the_right_tenant() {
    let mut server = start(ApiSettings::default()).await;
    let fixtures = authz_support::seed(&mut server).await;
    let acme_operator = Who::of(Role::Operator, "acme");
    // acme's operator reaches for globex's instance: NOT_FOUND, recorded under globex.
    let status = server
        .instances
        .restart_instance(req(
            Some(acme_operator),
            v1::RestartInstanceRequest {
                name: fixtures["globex"].instance.clone(),
                ..Default::default()
            },
            Some("req-probe"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let globex_admin = Who::of(Role::Admin, "globex");
    let globex = server
        .instances
        .list_audit_events(req(
            Some(globex_admin),
            list("tenants/-", "principal = \"token:operator-acme\"", 0, ""),
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .audit_events;
    assert_eq!(globex.len(), 1, "{globex:?}");
    assert_eq!(globex[0].outcome, "NOT_FOUND");
    assert_eq!(globex[0].method, method::RESTART_INSTANCE);
    assert_eq!(globex[0].request_id, "req-probe");
    // acme's admin sees only acme's events (the two creations were globex's and acme's).
    let acme = server
        .instances
        .list_audit_events(req(
            Some(Who::of(Role::Admin, "acme")),
            list("tenants/-", "", 0, ""),
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .audit_events;
    assert!(!acme.is_empty());
    assert!(acme.iter().all(|e| e.tenant == "acme"), "{acme:?}");
    let other = server
        .instances
        .list_audit_events(req(
            Some(Who::of(Role::Admin, "acme")),
            list("tenants/globex", "", 0, ""),
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(other.audit_events.is_empty());
    // Operators may not read the trail.
    let status = server
        .instances
        .list_audit_events(req(
            Some(Who::global(Role::Operator)),
            list("tenants/-", "", 0, ""),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn pages_cover_every_event_once() {
    let mut server = start(ApiSettings::default()).await;
    let admin = Who::global(Role::Admin);
    // Seven refused calls (operations that do not exist), each audited.
    for i in 0..7 {
        let status = server
            .operations
            .cancel_operation(req(
                Some(admin),
                instance_manager::proto::google_longrunning::CancelOperationRequest {
                    name: format!("operations/00000000-0000-4000-8000-00000000000{i}"),
                },
                Some(&format!("req-{i}")),
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = server
            .instances
            .list_audit_events(req(Some(admin), list("tenants/-", "", 3, &token), None))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.audit_events.into_iter().map(|e| e.request_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let expected: Vec<_> = (0..7).rev().map(|i| format!("req-{i}")).collect();
    assert_eq!(seen, expected);
    // A token is bound to its query.
    let first = server
        .instances
        .list_audit_events(req(Some(admin), list("tenants/-", "", 3, ""), None))
        .await
        .unwrap()
        .into_inner();
    let status = server
        .instances
        .list_audit_events(req(
            Some(admin),
            list("tenants/acme", "", 3, &first.next_page_token),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn expired_events_are_not_listed() {
    // Events kept for 1.5 s.
    let settings = ApiSettings {
        audit_retention: Duration::from_millis(1500),
        ..ApiSettings::default()
    };
    let mut server = start(settings).await;
    let admin = Who::global(Role::Admin);
    let cancel = |i: u32| {
        req(
            Some(admin),
            instance_manager::proto::google_longrunning::CancelOperationRequest {
                name: format!("operations/00000000-0000-4000-8000-00000000000{i}"),
            },
            Some(&format!("old-{i}")),
        )
    };
    server
        .operations
        .cancel_operation(cancel(1))
        .await
        .unwrap_err();
    let listed = |server: &mut authz_support::Server| {
        let mut client = server.instances.clone();
        async move {
            client
                .list_audit_events(req(Some(admin), list("tenants/-", "", 0, ""), None))
                .await
                .unwrap()
                .into_inner()
                .audit_events
                .into_iter()
                .map(|e| e.request_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(&mut server).await, ["old-1"]);
    // Poll until the event's expiry has passed (deadline 10 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if listed(&mut server).await.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the expired event is still listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new event is listed while the expired one stays gone.
    server
        .operations
        .cancel_operation(cancel(2))
        .await
        .unwrap_err();
    assert_eq!(listed(&mut server).await, ["old-2"]);
}
