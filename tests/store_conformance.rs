//! One conformance suite for every [`StateStore`]: each test below is written once against
//! `&dyn StateStore` and instantiated for the in-memory store and for the DynamoDB store
//! (on moto, one fresh table per test so the tests run in parallel) by
//! `conformance_tests!`.

mod common;

use std::collections::BTreeMap;

use instance_manager::domain::operation::Lease;
use instance_manager::domain::{
    AuditEvent, Backup, BackupId, BackupName, BackupOrigin, BackupState, ConditionType,
    Environment, Instance, InstanceCondition, InstanceId, InstanceName, InstanceSpec,
    InstanceState, Operation, OperationEvent, OperationId, OperationStatus, RequestId, Step,
    StepStatus, TenantId, Tier, Timestamp, Verb,
};
use instance_manager::store::{
    AuditCursor, AuditQuery, BackupCursor, DomainClaim, DynamoStore, Guard, InstanceCursor,
    InstanceQuery, MemoryStore, OperationCursor, OperationQuery, PriorityClaim, RequestRecord,
    StateStore, StoreError, StoreResult, Write, WriteKind,
};

// ---------------------------------------------------------------------------------------
// Instantiation

async fn memory_store() -> MemoryStore {
    MemoryStore::new()
}

async fn dynamo_store() -> DynamoStore {
    let client = common::dynamodb_client().await;
    let store = DynamoStore::new(client, common::unique_name("conformance"));
    let created = store.ensure_table().await.expect("ensure_table");
    assert!(created, "a table with a fresh name is created");
    store
}

macro_rules! conformance_tests {
    ($store:ident, $make:path) => {
        conformance_tests!(@expand $store, $make,
            instances_are_versioned,
            guards_are_exclusive,
            domain_claims_are_exclusive_across_tenants,
            domain_claims_commit_with_their_batch,
            batches_apply_atomically,
            invalid_batches_write_nothing,
            operations_are_versioned,
            event_log,
            request_records_expire,
            instance_listing_pages_in_order,
            sparse_filters_page_through_many_items,
            operation_listing_newest_first,
            runnable_operations,
            listener_priorities_are_exclusive,
            backups_are_versioned,
            backup_listing_newest_first,
            expired_backups_oldest_first,
            backups_and_instances_share_the_tenant_partition,
            audit_events_newest_first_by_tenant_and_filter,
            audit_events_expire,
            audit_event_ids_are_unique,
        );
    };
    (@expand $store:ident, $make:path, $($test:ident),* $(,)?) => {
        mod $store {
            $(
                #[tokio::test]
                async fn $test() {
                    let store = $make().await;
                    super::$test(&store).await;
                }
            )*
        }
    };
}

conformance_tests!(memory, crate::memory_store);
conformance_tests!(dynamo, crate::dynamo_store);

/// What only the DynamoDB store has: table bootstrap and its health check.
mod dynamo_only {
    use super::*;

    #[tokio::test]
    async fn ensure_table_is_idempotent_and_ping_checks_the_table() {
        let store = dynamo_store().await;
        store.ping().await.expect("ping an active table");
        assert!(
            !store.ensure_table().await.expect("ensure_table again"),
            "the second call finds the table"
        );
        store
            .ping()
            .await
            .expect("ping after a second ensure_table");

        let missing = DynamoStore::new(
            common::dynamodb_client().await,
            common::unique_name("missing"),
        );
        assert!(
            matches!(missing.ping().await, Err(StoreError::Unavailable(_))),
            "ping of a missing table fails as unavailable"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures

fn tenant(id: &str) -> TenantId {
    TenantId::parse(id).unwrap()
}

fn name(tenant_id: &str, instance: &str) -> InstanceName {
    InstanceName::new(tenant(tenant_id), InstanceId::parse(instance).unwrap())
}

fn op_id(id: &str) -> OperationId {
    OperationId::parse(id).unwrap()
}

fn spec(environment: Environment) -> InstanceSpec {
    InstanceSpec {
        environment,
        organization_name: "Acme Corp".to_owned(),
        contact_email: "ops@example.com".to_owned(),
        tier: Tier::Standard,
        desired_count: 2,
        cpu: 512,
        memory_mib: 1024,
        wordpress_image: "wordpress".to_owned(),
        wordpress_version: "6.7-php8.3-apache".to_owned(),
        labels: BTreeMap::from([("team".to_owned(), "web".to_owned())]),
        opportunity_id: "opp-1".to_owned(),
        cost_center: "cc-1".to_owned(),
        custom_domains: Vec::new(),
    }
}

fn instance(
    tenant_id: &str,
    instance_id: &str,
    environment: Environment,
    state: InstanceState,
) -> Instance {
    let mut instance = Instance::new_pending(
        name(tenant_id, instance_id),
        spec(environment),
        op_id("op-create"),
        Timestamp(1_700_000_000_000),
    );
    instance.state = state;
    instance
        .resources
        .insert("efs".to_owned(), "fs-123".to_owned());
    instance
}

fn operation(
    id: &str,
    target: &InstanceName,
    status: OperationStatus,
    created_at: i64,
) -> Operation {
    let mut operation = Operation::new(
        Verb::Create,
        target.clone(),
        vec![Step::pending("database"), Step::pending("service")],
        None,
        Timestamp(created_at),
    );
    operation.id = op_id(id);
    operation.status = status;
    operation
}

fn leased(mut operation: Operation, expires_at: i64) -> Operation {
    operation.lease = Some(Lease {
        owner: "replica-1".to_owned(),
        expires_at: Timestamp(expires_at),
    });
    operation
}

fn event(operation: &str, seq: u64) -> OperationEvent {
    OperationEvent {
        operation: op_id(operation),
        seq,
        at: Timestamp(1_000 + i64::try_from(seq).unwrap()),
        status: OperationStatus::InProgress,
        step: Some("database".to_owned()),
        step_status: Some(StepStatus::Running),
        message: format!("event {seq} of {operation}"),
        percent: 10,
        terminal: false,
    }
}

fn guard(tenant_id: &str, environment: Environment, instance: &str) -> Guard {
    Guard {
        tenant: tenant(tenant_id),
        environment,
        instance: InstanceId::parse(instance).unwrap(),
    }
}

fn request(id: &str, operation: &str, created_at: i64, expires_at: i64) -> RequestRecord {
    RequestRecord {
        request_id: RequestId::parse(id).unwrap(),
        fingerprint: format!("sha256:{operation}:{created_at}"),
        operation: op_id(operation),
        created_at: Timestamp(created_at),
        expires_at: Timestamp(expires_at),
    }
}

fn with_version<T: Clone>(value: &T, set: impl FnOnce(&mut T)) -> T {
    let mut copy = value.clone();
    set(&mut copy);
    copy
}

#[track_caller]
fn assert_conflict(result: StoreResult<()>, index: usize, kind: WriteKind) {
    match result {
        Err(StoreError::Conflict {
            index: got_index,
            kind: got_kind,
        }) if got_index == index && got_kind == kind => {}
        other => panic!("expected Conflict {{ index: {index}, kind: {kind:?} }}, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid_batch(result: StoreResult<()>) {
    assert!(
        matches!(result, Err(StoreError::InvalidBatch(_))),
        "expected InvalidBatch, got {result:?}"
    );
}

async fn commit(store: &dyn StateStore, writes: Vec<Write>) {
    store.commit(writes).await.expect("commit");
}

// ---------------------------------------------------------------------------------------
// Single records and preconditions

async fn instances_are_versioned(store: &dyn StateStore) {
    let key = name("acme", "wp");
    assert_eq!(store.get_instance(&key).await.unwrap(), None);

    // The version the caller passes on create is ignored: the store writes 1.
    let original = with_version(
        &instance(
            "acme",
            "wp",
            Environment::Dev,
            InstanceState::PendingProvisioning,
        ),
        |i| i.version = 7,
    );
    commit(store, vec![Write::CreateInstance(original.clone())]).await;
    let stored = store.get_instance(&key).await.unwrap().expect("created");
    assert_eq!(stored, with_version(&original, |i| i.version = 1));

    let again = with_version(&original, |i| i.state = InstanceState::Active);
    assert_conflict(
        store.commit(vec![Write::CreateInstance(again)]).await,
        0,
        WriteKind::CreateInstance,
    );
    assert_eq!(store.get_instance(&key).await.unwrap().unwrap(), stored);

    // The reconciler's conditions are part of the record.
    let provisioning = with_version(&stored, |i| {
        i.state = InstanceState::Provisioning;
        i.conditions = vec![InstanceCondition {
            kind: ConditionType::Drift,
            resource_kind: "secret".into(),
            resource_id: "arn:aws:secretsmanager:us-east-1:1:secret:x".into(),
            message: "secret arn:aws:secretsmanager:us-east-1:1:secret:x no longer exists".into(),
            since: Timestamp(1_700_000_000_500),
        }];
    });
    commit(store, vec![Write::UpdateInstance(provisioning.clone())]).await;
    let second = store.get_instance(&key).await.unwrap().unwrap();
    assert_eq!(second, with_version(&provisioning, |i| i.version = 2));

    // Stale (1), future (5) and missing records all fail and change nothing.
    for version in [1, 5] {
        let stale = with_version(&stored, |i| {
            i.version = version;
            i.state = InstanceState::Failed;
        });
        assert_conflict(
            store.commit(vec![Write::UpdateInstance(stale)]).await,
            0,
            WriteKind::UpdateInstance,
        );
    }
    assert_eq!(store.get_instance(&key).await.unwrap().unwrap(), second);
    let missing = with_version(
        &instance("acme", "nope", Environment::Dev, InstanceState::Active),
        |i| i.version = 1,
    );
    assert_conflict(
        store.commit(vec![Write::UpdateInstance(missing)]).await,
        0,
        WriteKind::UpdateInstance,
    );
    assert_eq!(
        store.get_instance(&name("acme", "nope")).await.unwrap(),
        None
    );

    let active = with_version(&second, |i| i.state = InstanceState::Active);
    commit(store, vec![Write::UpdateInstance(active)]).await;
    let third = store.get_instance(&key).await.unwrap().unwrap();
    assert_eq!((third.version, third.state), (3, InstanceState::Active));
}

async fn guards_are_exclusive(store: &dyn StateStore) {
    let acme = tenant("acme");
    assert_eq!(
        store.get_guard(&acme, Environment::Dev).await.unwrap(),
        None
    );

    let first = guard("acme", Environment::Dev, "wp");
    commit(store, vec![Write::ClaimGuard(first.clone())]).await;
    assert_eq!(
        store.get_guard(&acme, Environment::Dev).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.get_guard(&acme, Environment::Prod).await.unwrap(),
        None
    );

    // Claiming is not idempotent: even the identical claim conflicts.
    assert_conflict(
        store.commit(vec![Write::ClaimGuard(first.clone())]).await,
        0,
        WriteKind::ClaimGuard,
    );
    let other = guard("acme", Environment::Dev, "other");
    assert_conflict(
        store.commit(vec![Write::ClaimGuard(other.clone())]).await,
        0,
        WriteKind::ClaimGuard,
    );
    assert_conflict(
        store.commit(vec![Write::ReleaseGuard(other.clone())]).await,
        0,
        WriteKind::ReleaseGuard,
    );
    assert_eq!(
        store.get_guard(&acme, Environment::Dev).await.unwrap(),
        Some(first.clone()),
        "failed claims and releases leave the guard as it was"
    );
    // Releasing a guard nobody holds is idempotent: it succeeds and creates nothing (a
    // retried release whose first answer was lost must not look like a lost lease).
    commit(
        store,
        vec![Write::ReleaseGuard(guard("acme", Environment::Prod, "wp"))],
    )
    .await;
    assert_eq!(
        store.get_guard(&acme, Environment::Prod).await.unwrap(),
        None
    );

    // Another environment of the same tenant is a separate guard.
    commit(
        store,
        vec![Write::ClaimGuard(guard("acme", Environment::Prod, "wp"))],
    )
    .await;

    commit(store, vec![Write::ReleaseGuard(first.clone())]).await;
    assert_eq!(
        store.get_guard(&acme, Environment::Dev).await.unwrap(),
        None
    );
    commit(store, vec![Write::ReleaseGuard(first)]).await;
    commit(store, vec![Write::ClaimGuard(other.clone())]).await;
    assert_eq!(
        store.get_guard(&acme, Environment::Dev).await.unwrap(),
        Some(other)
    );
    assert!(
        store
            .get_guard(&acme, Environment::Prod)
            .await
            .unwrap()
            .is_some()
    );
}

fn domain(domain: &str, tenant_id: &str, instance: &str) -> DomainClaim {
    DomainClaim {
        domain: domain.to_owned(),
        owner: name(tenant_id, instance),
    }
}

async fn domain_claims_are_exclusive_across_tenants(store: &dyn StateStore) {
    let www = domain("www.shop.example", "acme", "wp");
    assert_eq!(store.get_domain_claim(&www.domain).await.unwrap(), None);
    commit(store, vec![Write::ClaimDomain(www.clone())]).await;
    assert_eq!(
        store.get_domain_claim(&www.domain).await.unwrap(),
        Some(www.clone())
    );
    // The same owner claiming again changes nothing (an update that keeps a domain).
    commit(store, vec![Write::ClaimDomain(www.clone())]).await;
    assert_eq!(
        store.get_domain_claim(&www.domain).await.unwrap(),
        Some(www.clone())
    );

    // Another tenant, and another instance of the same tenant, are refused: claim and
    // release alike, and the claim stays as it was.
    for other in [
        domain("www.shop.example", "globex", "wp"),
        domain("www.shop.example", "acme", "other"),
    ] {
        assert_conflict(
            store.commit(vec![Write::ClaimDomain(other.clone())]).await,
            0,
            WriteKind::ClaimDomain,
        );
        assert_conflict(
            store
                .commit(vec![Write::ReleaseDomain(other.clone())])
                .await,
            0,
            WriteKind::ReleaseDomain,
        );
    }
    assert_eq!(
        store.get_domain_claim(&www.domain).await.unwrap(),
        Some(www.clone()),
        "failed claims and releases leave the claim as it was"
    );
    // Other domains are separate claims, whoever holds them.
    let shop = domain("shop.example", "globex", "wp");
    commit(store, vec![Write::ClaimDomain(shop.clone())]).await;
    assert_eq!(
        store.get_domain_claim("shop.example").await.unwrap(),
        Some(shop)
    );

    // Releasing is idempotent, and frees the domain for anyone.
    commit(store, vec![Write::ReleaseDomain(www.clone())]).await;
    assert_eq!(store.get_domain_claim(&www.domain).await.unwrap(), None);
    commit(store, vec![Write::ReleaseDomain(www.clone())]).await;
    assert_eq!(store.get_domain_claim(&www.domain).await.unwrap(), None);
    let globex = domain("www.shop.example", "globex", "wp");
    commit(store, vec![Write::ClaimDomain(globex.clone())]).await;
    assert_eq!(
        store.get_domain_claim(&www.domain).await.unwrap(),
        Some(globex)
    );
}

/// Claims ride in the transaction that creates an instance and its operation: a claim held
/// by someone else fails the whole batch, so nothing of the second request is written.
async fn domain_claims_commit_with_their_batch(store: &dyn StateStore) {
    let first = instance("acme", "wp", Environment::Prod, InstanceState::Provisioning);
    commit(
        store,
        vec![
            Write::CreateInstance(first.clone()),
            Write::ClaimDomain(domain("a.example.org", "acme", "wp")),
            Write::ClaimDomain(domain("b.example.org", "acme", "wp")),
        ],
    )
    .await;
    let second = instance(
        "globex",
        "wp",
        Environment::Dev,
        InstanceState::Provisioning,
    );
    assert_conflict(
        store
            .commit(vec![
                Write::CreateInstance(second.clone()),
                Write::ClaimDomain(domain("c.example.org", "globex", "wp")),
                Write::ClaimDomain(domain("b.example.org", "globex", "wp")),
            ])
            .await,
        2,
        WriteKind::ClaimDomain,
    );
    assert_eq!(store.get_instance(&second.name).await.unwrap(), None);
    assert_eq!(store.get_domain_claim("c.example.org").await.unwrap(), None);
    assert_eq!(
        store
            .get_domain_claim("b.example.org")
            .await
            .unwrap()
            .map(|c| c.owner),
        Some(first.name.clone())
    );
    // Two writes to one claim in a batch are refused, as for any item.
    assert_invalid_batch(
        store
            .commit(vec![
                Write::ClaimDomain(domain("d.example.org", "acme", "wp")),
                Write::ReleaseDomain(domain("d.example.org", "acme", "wp")),
            ])
            .await,
    );
    assert_eq!(store.get_domain_claim("d.example.org").await.unwrap(), None);
}

async fn operations_are_versioned(store: &dyn StateStore) {
    let target = name("acme", "wp");
    let mut original = operation("op-1", &target, OperationStatus::Pending, 5_000);
    original.params = serde_json::json!({ "desired_count": 4, "reason": "load" });
    original.request_id = Some(RequestId::parse("req-1").unwrap());
    commit(store, vec![Write::CreateOperation(original.clone())]).await;
    let stored = store
        .get_operation(&original.id)
        .await
        .unwrap()
        .expect("created");
    assert_eq!(stored, with_version(&original, |o| o.version = 1));

    assert_conflict(
        store
            .commit(vec![Write::CreateOperation(with_version(&original, |o| {
                o.status = OperationStatus::Failed;
            }))])
            .await,
        0,
        WriteKind::CreateOperation,
    );

    let mut running = leased(stored.clone(), 9_000);
    running.status = OperationStatus::InProgress;
    running.attempt = 1;
    running.steps[0].status = StepStatus::Succeeded;
    running.steps[0].resource_id = Some("db-1".to_owned());
    commit(store, vec![Write::UpdateOperation(running.clone())]).await;
    let second = store.get_operation(&original.id).await.unwrap().unwrap();
    assert_eq!(second, with_version(&running, |o| o.version = 2));

    assert_conflict(
        store
            .commit(vec![Write::UpdateOperation(with_version(&stored, |o| {
                o.status = OperationStatus::Cancelled;
            }))])
            .await,
        0,
        WriteKind::UpdateOperation,
    );
    assert_conflict(
        store
            .commit(vec![Write::UpdateOperation(with_version(
                &operation("op-missing", &target, OperationStatus::Pending, 1),
                |o| o.version = 1,
            ))])
            .await,
        0,
        WriteKind::UpdateOperation,
    );
    assert_eq!(
        store.get_operation(&original.id).await.unwrap().unwrap(),
        second
    );
    assert_eq!(
        store.get_operation(&op_id("op-missing")).await.unwrap(),
        None
    );
}

async fn event_log(store: &dyn StateStore) {
    // Events 1..=5 arrive with the operation in one batch, 6..=12 one at a time.
    let target = name("acme", "wp");
    let mut batch = vec![Write::CreateOperation(operation(
        "ev-a",
        &target,
        OperationStatus::InProgress,
        1,
    ))];
    batch.extend((1..=5).map(|seq| Write::AppendEvent(event("ev-a", seq))));
    commit(store, batch).await;
    for seq in 6..=12 {
        commit(store, vec![Write::AppendEvent(event("ev-a", seq))]).await;
    }
    commit(
        store,
        (1..=3)
            .map(|seq| Write::AppendEvent(event("ev-b", seq)))
            .collect(),
    )
    .await;

    let a = op_id("ev-a");
    let seqs = |events: Vec<OperationEvent>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    let all = store.read_events(&a, 1, 100).await.unwrap();
    assert_eq!(
        all,
        (1..=12).map(|seq| event("ev-a", seq)).collect::<Vec<_>>()
    );
    assert_eq!(seqs(store.read_events(&a, 0, 2).await.unwrap()), [1, 2]);
    assert_eq!(seqs(store.read_events(&a, 4, 3).await.unwrap()), [4, 5, 6]);
    assert_eq!(
        seqs(store.read_events(&a, 10, 100).await.unwrap()),
        [10, 11, 12]
    );
    assert_eq!(seqs(store.read_events(&a, 12, 1).await.unwrap()), [12]);
    assert!(store.read_events(&a, 13, 10).await.unwrap().is_empty());
    assert!(store.read_events(&a, 1, 0).await.unwrap().is_empty());

    let b = store.read_events(&op_id("ev-b"), 1, 100).await.unwrap();
    assert_eq!(b, (1..=3).map(|seq| event("ev-b", seq)).collect::<Vec<_>>());
    assert!(
        store
            .read_events(&op_id("ev-c"), 1, 100)
            .await
            .unwrap()
            .is_empty()
    );

    assert_conflict(
        store
            .commit(vec![Write::AppendEvent(event("ev-a", 5))])
            .await,
        0,
        WriteKind::AppendEvent,
    );
    let mut duplicate = event("ev-a", 5);
    duplicate.message = "rewritten".to_owned();
    assert_conflict(
        store
            .commit(vec![Write::AppendEvent(duplicate.clone())])
            .await,
        0,
        WriteKind::AppendEvent,
    );
    assert_conflict(
        store
            .commit(vec![
                Write::AppendEvent(event("ev-a", 13)),
                Write::AppendEvent(duplicate),
            ])
            .await,
        1,
        WriteKind::AppendEvent,
    );
    assert_eq!(store.read_events(&a, 1, 100).await.unwrap(), all);
}

async fn request_records_expire(store: &dyn StateStore) {
    let id = RequestId::parse("client-key_1.a:b").unwrap();
    assert_eq!(store.get_request(&id, Timestamp(0)).await.unwrap(), None);

    let first = request("client-key_1.a:b", "op-1", 1_000, 5_000);
    commit(store, vec![Write::PutRequest(first.clone())]).await;
    assert_eq!(
        store.get_request(&id, Timestamp(1_000)).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.get_request(&id, Timestamp(5_000)).await.unwrap(),
        Some(first.clone()),
        "a record is valid up to and including its expiry instant"
    );
    assert_eq!(
        store.get_request(&id, Timestamp(5_001)).await.unwrap(),
        None
    );

    assert_conflict(
        store.commit(vec![Write::PutRequest(first.clone())]).await,
        0,
        WriteKind::PutRequest,
    );
    for created_at in [4_000, 5_000] {
        assert_conflict(
            store
                .commit(vec![Write::PutRequest(request(
                    "client-key_1.a:b",
                    "op-2",
                    created_at,
                    created_at + 4_000,
                ))])
                .await,
            0,
            WriteKind::PutRequest,
        );
    }
    assert_eq!(
        store.get_request(&id, Timestamp(4_500)).await.unwrap(),
        Some(first)
    );

    // Once expired, the record is overwritten as if it were absent.
    let second = request("client-key_1.a:b", "op-3", 5_001, 9_000);
    commit(store, vec![Write::PutRequest(second.clone())]).await;
    assert_eq!(
        store.get_request(&id, Timestamp(5_001)).await.unwrap(),
        Some(second)
    );
}

// ---------------------------------------------------------------------------------------
// Atomic batches

/// The items of a "create instance" batch, distinct per `tag`.
struct CreateBatch {
    instance: Instance,
    guard: Guard,
    operation: Operation,
    event: OperationEvent,
    request: RequestRecord,
}

impl CreateBatch {
    const KINDS: [WriteKind; 5] = [
        WriteKind::CreateInstance,
        WriteKind::ClaimGuard,
        WriteKind::CreateOperation,
        WriteKind::AppendEvent,
        WriteKind::PutRequest,
    ];

    fn new(tag: &str) -> Self {
        let tenant_id = format!("tenant-{tag}");
        let operation_id = format!("op-{tag}");
        let instance = instance(
            &tenant_id,
            "wp",
            Environment::Sit,
            InstanceState::PendingProvisioning,
        );
        let operation = operation(
            &operation_id,
            &instance.name,
            OperationStatus::Pending,
            10_000,
        );
        Self {
            guard: guard(&tenant_id, Environment::Sit, "wp"),
            event: event(&operation_id, 1),
            request: request(&format!("req-{tag}"), &operation_id, 10_000, 20_000),
            instance,
            operation,
        }
    }

    fn writes(&self) -> Vec<Write> {
        vec![
            Write::CreateInstance(self.instance.clone()),
            Write::ClaimGuard(self.guard.clone()),
            Write::CreateOperation(self.operation.clone()),
            Write::AppendEvent(self.event.clone()),
            Write::PutRequest(self.request.clone()),
        ]
    }

    /// A different record under the same key as write `position`, so that its
    /// precondition fails.
    fn blocker(&self, position: usize) -> Write {
        match position {
            0 => Write::CreateInstance(with_version(&self.instance, |i| {
                i.state = InstanceState::Active;
            })),
            1 => Write::ClaimGuard(with_version(&self.guard, |g| {
                g.instance = InstanceId::parse("blocker").unwrap();
            })),
            2 => Write::CreateOperation(with_version(&self.operation, |o| {
                o.status = OperationStatus::Completed;
            })),
            3 => Write::AppendEvent(with_version(&self.event, |e| {
                e.message = "blocker".to_owned();
            })),
            4 => Write::PutRequest(with_version(&self.request, |r| {
                r.created_at = Timestamp(0);
                r.fingerprint = "blocker".to_owned();
            })),
            _ => unreachable!(),
        }
    }

    /// Reads back the five items: `Some` where an item exists.
    async fn read(&self, store: &dyn StateStore) -> Snapshot {
        Snapshot {
            instance: store.get_instance(&self.instance.name).await.unwrap(),
            guard: store
                .get_guard(&self.guard.tenant, self.guard.environment)
                .await
                .unwrap(),
            operation: store.get_operation(&self.operation.id).await.unwrap(),
            events: store.read_events(&self.operation.id, 1, 10).await.unwrap(),
            request: store
                .get_request(&self.request.request_id, self.request.created_at)
                .await
                .unwrap(),
        }
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    instance: Option<Instance>,
    guard: Option<Guard>,
    operation: Option<Operation>,
    events: Vec<OperationEvent>,
    request: Option<RequestRecord>,
}

impl Snapshot {
    fn empty() -> Self {
        Self {
            instance: None,
            guard: None,
            operation: None,
            events: Vec::new(),
            request: None,
        }
    }

    /// The snapshot after only `write` was applied to an empty store.
    fn only(write: &Write) -> Self {
        let mut snapshot = Self::empty();
        match write.clone() {
            Write::CreateInstance(i) => {
                snapshot.instance = Some(with_version(&i, |i| i.version = 1))
            }
            Write::ClaimGuard(g) => snapshot.guard = Some(g),
            Write::CreateOperation(o) => {
                snapshot.operation = Some(with_version(&o, |o| o.version = 1));
            }
            Write::AppendEvent(e) => snapshot.events = vec![e],
            Write::PutRequest(r) => snapshot.request = Some(r),
            other => unreachable!("{other:?}"),
        }
        snapshot
    }
}

async fn batches_apply_atomically(store: &dyn StateStore) {
    // All five writes succeed together.
    let good = CreateBatch::new("good");
    commit(store, good.writes()).await;
    assert_eq!(
        good.read(store).await,
        Snapshot {
            instance: Some(with_version(&good.instance, |i| i.version = 1)),
            guard: Some(good.guard.clone()),
            operation: Some(with_version(&good.operation, |o| o.version = 1)),
            events: vec![good.event.clone()],
            request: Some(good.request.clone()),
        }
    );

    // One failing precondition, at each position in turn, rolls the whole batch back.
    for position in 0..5 {
        let batch = CreateBatch::new(&format!("fail{position}"));
        let blocker = batch.blocker(position);
        commit(store, vec![blocker.clone()]).await;
        assert_conflict(
            store.commit(batch.writes()).await,
            position,
            CreateBatch::KINDS[position],
        );
        assert_eq!(
            batch.read(store).await,
            Snapshot::only(&blocker),
            "failure at position {position} must leave only the blocker"
        );
    }

    // With several failing preconditions the error names the first.
    let batch = CreateBatch::new("twofail");
    commit(store, vec![batch.blocker(3), batch.blocker(1)]).await;
    assert_conflict(store.commit(batch.writes()).await, 1, WriteKind::ClaimGuard);
    assert_eq!(batch.read(store).await.instance, None);

    // Updates roll back too: a stale operation version keeps the instance and the guard.
    let stored_instance = store
        .get_instance(&good.instance.name)
        .await
        .unwrap()
        .unwrap();
    let stored_operation = store
        .get_operation(&good.operation.id)
        .await
        .unwrap()
        .unwrap();
    let provisioning = with_version(&stored_instance, |i| i.state = InstanceState::Provisioning);
    let started = with_version(&stored_operation, |o| {
        o.status = OperationStatus::InProgress
    });
    let before = good.read(store).await;
    assert_conflict(
        store
            .commit(vec![
                Write::UpdateInstance(provisioning.clone()),
                Write::UpdateOperation(with_version(&started, |o| o.version = 2)),
                Write::ReleaseGuard(good.guard.clone()),
            ])
            .await,
        1,
        WriteKind::UpdateOperation,
    );
    assert_eq!(good.read(store).await, before);

    commit(
        store,
        vec![
            Write::UpdateInstance(provisioning.clone()),
            Write::UpdateOperation(started.clone()),
            Write::ReleaseGuard(good.guard.clone()),
        ],
    )
    .await;
    let after = good.read(store).await;
    assert_eq!(
        after.instance,
        Some(with_version(&provisioning, |i| i.version = 2))
    );
    assert_eq!(
        after.operation,
        Some(with_version(&started, |o| o.version = 2))
    );
    assert_eq!(after.guard, None);
}

async fn invalid_batches_write_nothing(store: &dyn StateStore) {
    commit(store, Vec::new()).await;

    let too_many: Vec<Write> = (1..=101)
        .map(|seq| Write::AppendEvent(event("op-big", seq)))
        .collect();
    assert_invalid_batch(store.commit(too_many).await);
    assert!(
        store
            .read_events(&op_id("op-big"), 1, 200)
            .await
            .unwrap()
            .is_empty()
    );

    let created = instance("acme", "wp", Environment::Dev, InstanceState::Active);
    assert_invalid_batch(
        store
            .commit(vec![
                Write::CreateInstance(created.clone()),
                Write::UpdateInstance(with_version(&created, |i| i.version = 1)),
            ])
            .await,
    );
    assert_eq!(store.get_instance(&created.name).await.unwrap(), None);
    let claimed = guard("acme", Environment::Dev, "wp");
    assert_invalid_batch(
        store
            .commit(vec![
                Write::ClaimGuard(claimed.clone()),
                Write::ReleaseGuard(claimed.clone()),
            ])
            .await,
    );
    assert_eq!(
        store
            .get_guard(&claimed.tenant, Environment::Dev)
            .await
            .unwrap(),
        None
    );

    // Exactly the limit is accepted, and read back in full.
    let hundred: Vec<Write> = (1..=100)
        .map(|seq| Write::AppendEvent(event("op-big", seq)))
        .collect();
    commit(store, hundred).await;
    let events = store.read_events(&op_id("op-big"), 1, 200).await.unwrap();
    assert_eq!(events.len(), 100);
    assert!(events.iter().map(|e| e.seq).eq(1..=100));
}

// ---------------------------------------------------------------------------------------
// Listing instances

/// The documented order: by instance id with a tenant, else by (environment, tenant,
/// instance); after the cursor; filtered.
fn expected_instances(all: &[Instance], query: &InstanceQuery) -> Vec<InstanceName> {
    let mut matching: Vec<&Instance> = all
        .iter()
        .filter(|i| query.tenant.as_ref().is_none_or(|t| &i.name.tenant == t))
        .filter(|i| query.environment.is_none_or(|e| i.spec.environment == e))
        .filter(|i| query.state.is_none_or(|s| i.state == s))
        .collect();
    let sort_key = |i: &Instance| {
        if query.tenant.is_some() {
            (None, i.name.clone())
        } else {
            (Some(i.spec.environment), i.name.clone())
        }
    };
    matching.sort_by_key(|i| sort_key(i));
    if let Some(after) = &query.after {
        let after_key = if query.tenant.is_some() {
            (None, after.name.clone())
        } else {
            (Some(after.environment), after.name.clone())
        };
        matching.retain(|i| sort_key(i) > after_key);
    }
    matching.into_iter().map(|i| i.name.clone()).collect()
}

/// Follows `next` from `query` to the end; checks the page invariants on the way and
/// returns every item in the order seen.
async fn page_through_instances(store: &dyn StateStore, query: &InstanceQuery) -> Vec<Instance> {
    let mut seen = Vec::new();
    let mut after = query.after.clone();
    for _ in 0..100 {
        let page = store
            .list_instances(&InstanceQuery {
                after: after.clone(),
                ..query.clone()
            })
            .await
            .unwrap();
        assert!(page.items.len() <= query.limit, "{query:?}: page too long");
        seen.extend(page.items.iter().cloned());
        match page.next {
            None => return seen,
            Some(next) => {
                assert_eq!(
                    page.items.len(),
                    query.limit,
                    "{query:?}: short page with next"
                );
                let last = page.items.last().unwrap();
                assert_eq!(
                    next,
                    InstanceCursor {
                        environment: last.spec.environment,
                        name: last.name.clone()
                    },
                    "{query:?}: next names the last item"
                );
                after = Some(next);
            }
        }
    }
    panic!("{query:?}: more than 100 pages");
}

/// Pages through `query` with each limit in `limits` (0 stands for "exactly the number of
/// matches") and compares with [`expected_instances`].
async fn check_instance_listing(
    store: &dyn StateStore,
    all: &[Instance],
    query: InstanceQuery,
    limits: &[usize],
) {
    let expected = expected_instances(all, &query);
    let mut limits: Vec<usize> = limits
        .iter()
        .map(|&limit| {
            if limit == 0 {
                expected.len().max(1)
            } else {
                limit
            }
        })
        .collect();
    limits.dedup();
    for limit in limits {
        let query = InstanceQuery {
            limit,
            ..query.clone()
        };
        let seen = page_through_instances(store, &query).await;
        let names: Vec<InstanceName> = seen.iter().map(|i| i.name.clone()).collect();
        assert_eq!(names, expected, "{query:?}");
        // Items come back whole, with the stored version.
        for instance in &seen {
            let original = all.iter().find(|i| i.name == instance.name).unwrap();
            assert_eq!(instance, &with_version(original, |i| i.version = 1));
        }
        // No empty trailing page: `next` is unset when a page exactly exhausts the data.
        let first = store.list_instances(&query).await.unwrap();
        assert_eq!(first.next.is_some(), expected.len() > limit, "{query:?}");
    }
}

async fn instance_listing_pages_in_order(store: &dyn StateStore) {
    use Environment::{Dev, Prod, Sit};
    use InstanceState::{Active, Failed, Suspended};
    // Tenants acme < acme-2 < acme0 and ids wp < wp-1 < wp1 check that the stores order
    // by (tenant, instance) tuples, not by joined strings.
    let all = vec![
        instance("acme", "wp", Dev, Active),
        instance("acme", "wp-1", Prod, Active),
        instance("acme", "wp1", Sit, Failed),
        instance("acme", "a", Dev, Suspended),
        instance("acme-2", "wp", Dev, Failed),
        instance("acme-2", "b", Prod, Active),
        instance("acme0", "wp", Dev, Active),
        instance("acme0", "wp-1", Sit, Active),
        instance("beta", "x", Prod, Failed),
        instance("beta", "y", Sit, Active),
    ];
    commit(
        store,
        all.iter().cloned().map(Write::CreateInstance).collect(),
    )
    .await;

    // Each filter absent or set; "nobody" matches nothing.
    let tenants = [None, Some("acme"), Some("nobody")];
    let environments = [None, Some(Dev), Some(Prod)];
    let states = [None, Some(Active), Some(Failed)];
    for tenant_filter in tenants {
        for environment in environments {
            for state in states {
                let query = InstanceQuery {
                    tenant: tenant_filter.map(tenant),
                    environment,
                    state,
                    after: None,
                    limit: 1,
                };
                check_instance_listing(store, &all, query, &[1, 3, 0]).await;
            }
        }
    }

    // A cursor need not name an existing instance (it may have been deleted since).
    let cursors = [
        InstanceCursor {
            environment: Dev,
            name: name("acme-1", "zzz"),
        },
        InstanceCursor {
            environment: Sit,
            name: name("acme", "wp0"),
        },
    ];
    for after in cursors {
        for tenant_filter in [None, Some("acme")] {
            let query = InstanceQuery {
                tenant: tenant_filter.map(tenant),
                after: Some(after.clone()),
                limit: 1,
                ..InstanceQuery::default()
            };
            check_instance_listing(store, &all, query, &[1, 3]).await;
        }
    }
}

async fn sparse_filters_page_through_many_items(store: &dyn StateStore) {
    // 40 instances, 3 of them FAILED, spread over the environments; plus other tenants.
    let environments = [Environment::Dev, Environment::Sit, Environment::Prod];
    let mut all: Vec<Instance> = (0..40)
        .map(|n| {
            let state = if [5, 22, 37].contains(&n) {
                InstanceState::Failed
            } else {
                InstanceState::Active
            };
            instance("bulk", &format!("i{n:02}"), environments[n % 3], state)
        })
        .collect();
    all.push(instance(
        "zulu",
        "z",
        Environment::Sit,
        InstanceState::Failed,
    ));
    all.push(instance(
        "alpha",
        "a",
        Environment::Dev,
        InstanceState::Active,
    ));
    for chunk in all.chunks(20) {
        commit(
            store,
            chunk.iter().cloned().map(Write::CreateInstance).collect(),
        )
        .await;
    }

    let queries = [
        InstanceQuery {
            state: Some(InstanceState::Failed),
            ..InstanceQuery::default()
        },
        InstanceQuery {
            tenant: Some(tenant("bulk")),
            state: Some(InstanceState::Failed),
            ..InstanceQuery::default()
        },
        InstanceQuery {
            environment: Some(Environment::Prod),
            state: Some(InstanceState::Failed),
            ..InstanceQuery::default()
        },
        InstanceQuery {
            tenant: Some(tenant("bulk")),
            environment: Some(Environment::Sit),
            ..InstanceQuery::default()
        },
        InstanceQuery {
            tenant: Some(tenant("bulk")),
            environment: Some(Environment::Dev),
            state: Some(InstanceState::Failed),
            ..InstanceQuery::default()
        },
    ];
    for query in queries {
        check_instance_listing(store, &all, query, &[1, 0]).await;
    }
}

// ---------------------------------------------------------------------------------------
// Listing operations

fn expected_operations(all: &[Operation], query: &OperationQuery) -> Vec<OperationId> {
    let mut matching: Vec<&Operation> = all
        .iter()
        .filter(|o| query.tenant.as_ref().is_none_or(|t| &o.target.tenant == t))
        .filter(|o| query.target.as_ref().is_none_or(|t| &o.target == t))
        .filter(|o| query.status.is_none_or(|s| o.status == s))
        .filter(|o| query.done.is_none_or(|d| o.status.is_done() == d))
        .filter(|o| {
            query
                .after
                .as_ref()
                .is_none_or(|a| (o.created_at, &o.id) < (a.created_at, &a.id))
        })
        .collect();
    matching.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    matching.into_iter().map(|o| o.id.clone()).collect()
}

async fn check_operation_listing(store: &dyn StateStore, all: &[Operation], query: OperationQuery) {
    let expected = expected_operations(all, &query);
    let mut limits = vec![1, 2, expected.len().max(1)];
    limits.dedup();
    for limit in limits {
        let mut seen = Vec::new();
        let mut after = query.after.clone();
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages <= 100, "{query:?}: too many pages");
            let page = store
                .list_operations(&OperationQuery {
                    after: after.clone(),
                    limit,
                    ..query.clone()
                })
                .await
                .unwrap();
            assert!(page.items.len() <= limit);
            seen.extend(page.items.iter().cloned());
            let Some(next) = page.next else { break };
            assert_eq!(page.items.len(), limit, "{query:?}: short page with next");
            let last = page.items.last().unwrap();
            assert_eq!(
                next,
                OperationCursor {
                    created_at: last.created_at,
                    id: last.id.clone()
                }
            );
            after = Some(next);
        }
        let ids: Vec<OperationId> = seen.iter().map(|o| o.id.clone()).collect();
        assert_eq!(ids, expected, "{query:?} limit {limit}");
        assert_eq!(
            pages,
            expected.len().div_ceil(limit).max(1),
            "{query:?} limit {limit}"
        );
        for operation in &seen {
            let original = all.iter().find(|o| o.id == operation.id).unwrap();
            assert_eq!(operation, &with_version(original, |o| o.version = 1));
        }
    }
}

async fn operation_listing_newest_first(store: &dyn StateStore) {
    use OperationStatus::{Cancelled, Completed, Failed, InProgress, Pending, Stuck};
    let wp = name("acme", "wp");
    let wp1 = name("acme", "wp-1");
    let x = name("beta", "x");
    // Same created_at for op-b and op-c (ordered by id); 99_999 and 100_000 check that
    // instants compare as numbers.
    let all = vec![
        operation("op-a", &wp, Pending, 1_000),
        operation("op-b", &wp, Completed, 2_000),
        operation("op-c", &x, InProgress, 2_000),
        operation("op-d", &wp, Failed, 3_000),
        operation("op-e", &x, Cancelled, 500),
        operation("op-f", &wp1, Pending, 3_000),
        operation("op-g", &wp, InProgress, 99_999),
        operation("op-h", &wp, Stuck, 100_000),
    ];
    commit(
        store,
        all.iter().cloned().map(Write::CreateOperation).collect(),
    )
    .await;

    for target in [None, Some(&wp), Some(&name("nobody", "wp"))] {
        for status in [None, Some(Pending), Some(Completed)] {
            for done in [None, Some(true), Some(false)] {
                let query = OperationQuery {
                    tenant: None,
                    target: target.cloned(),
                    status,
                    done,
                    after: None,
                    limit: 1,
                };
                check_operation_listing(store, &all, query).await;
            }
        }
    }
    // By tenant ("acme" must not match a tenant whose id merely starts with it).
    commit(
        store,
        vec![Write::CreateOperation(operation(
            "op-i",
            &name("acme-two", "wp"),
            Pending,
            4_000,
        ))],
    )
    .await;
    let mut all = all;
    all.push(operation("op-i", &name("acme-two", "wp"), Pending, 4_000));
    for tenant_id in ["acme", "beta", "acme-two", "nobody"] {
        for status in [None, Some(Pending)] {
            let query = OperationQuery {
                tenant: Some(tenant(tenant_id)),
                target: None,
                status,
                done: None,
                after: None,
                limit: 1,
            };
            check_operation_listing(store, &all, query).await;
        }
    }
    let query = OperationQuery {
        after: Some(OperationCursor {
            created_at: Timestamp(2_000),
            id: op_id("op-bb"),
        }),
        limit: 1,
        ..OperationQuery::default()
    };
    check_operation_listing(store, &all, query).await;
}

// ---------------------------------------------------------------------------------------
// Runnable operations

async fn runnable_ids(store: &dyn StateStore, now: i64, limit: usize) -> Vec<String> {
    store
        .runnable_operations(Timestamp(now), limit)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.id.to_string())
        .collect()
}

async fn runnable_operations(store: &dyn StateStore) {
    use OperationStatus::{Cancelled, Completed, Failed, InProgress, Pending, Stuck};
    const NOW: i64 = 1_700_000_000_000;
    let target = name("acme", "wp");
    let op = |id: &str, status| operation(id, &target, status, 1_000);
    let all = vec![
        op("r-a", Pending),                          // no lease: runnable
        leased(op("r-b", InProgress), NOW - 1_000),  // lease expired: runnable
        leased(op("r-c", InProgress), NOW),          // expires exactly now: still held
        leased(op("r-d", InProgress), NOW + 60_000), // live lease
        op("r-e", Completed),
        leased(op("r-f", Failed), NOW - 1_000),
        leased(op("r-g", Pending), NOW - 5_000), // released claim that expired: runnable
        op("r-h", Pending),
        op("r-i", Stuck),
        op("r-j", Cancelled),
    ];
    commit(
        store,
        all.iter().cloned().map(Write::CreateOperation).collect(),
    )
    .await;

    // Oldest lease expiry first (no lease counts as 0), then id.
    assert_eq!(
        runnable_ids(store, NOW, 10).await,
        ["r-a", "r-h", "r-g", "r-b"]
    );
    assert_eq!(runnable_ids(store, NOW, 2).await, ["r-a", "r-h"]);
    assert_eq!(
        runnable_ids(store, NOW + 1, 10).await,
        ["r-a", "r-h", "r-g", "r-b", "r-c"]
    );
    assert!(runnable_ids(store, NOW, 0).await.is_empty());
    let returned = store.runnable_operations(Timestamp(NOW), 1).await.unwrap();
    assert_eq!(returned, vec![with_version(&all[0], |o| o.version = 1)]);

    // Finishing, renewing and retrying move operations in and out of the set.
    let stored = |id: &str| {
        let id = op_id(id);
        async move { store.get_operation(&id).await.unwrap().unwrap() }
    };
    let finished = with_version(&stored("r-b").await, |o| {
        o.status = Completed;
        o.lease = None;
    });
    let renewed = leased(stored("r-g").await, NOW + 30_000);
    let lapsed = leased(stored("r-d").await, NOW - 1);
    let retried = with_version(&stored("r-e").await, |o| o.status = Pending);
    commit(
        store,
        vec![
            Write::UpdateOperation(finished),
            Write::UpdateOperation(renewed),
            Write::UpdateOperation(lapsed),
            Write::UpdateOperation(retried),
        ],
    )
    .await;
    assert_eq!(
        runnable_ids(store, NOW, 10).await,
        ["r-a", "r-e", "r-h", "r-d"]
    );
}

// ---------------------------------------------------------------------------------------
// Listener rule priorities

const LISTENER: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/web/50dc6c495c0c9188/f2f7dc8efc522ab2";
const OTHER_LISTENER: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/web/50dc6c495c0c9188/0000000000000000";

fn claim(listener_arn: &str, priority: u32, owner: &str) -> PriorityClaim {
    PriorityClaim {
        listener_arn: listener_arn.to_owned(),
        priority,
        owner: name("acme", owner),
    }
}

async fn priorities(store: &dyn StateStore, listener_arn: &str) -> Vec<(u32, String)> {
    store
        .listener_priorities(listener_arn)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.priority, c.owner.instance.to_string()))
        .collect()
}

async fn listener_priorities_are_exclusive(store: &dyn StateStore) {
    assert!(priorities(store, LISTENER).await.is_empty());
    // 9 < 10 < 100 numerically, not as strings.
    commit(
        store,
        vec![
            Write::ClaimPriority(claim(LISTENER, 100, "c")),
            Write::ClaimPriority(claim(LISTENER, 9, "a")),
            Write::ClaimPriority(claim(OTHER_LISTENER, 10, "z")),
        ],
    )
    .await;
    commit(store, vec![Write::ClaimPriority(claim(LISTENER, 10, "b"))]).await;
    let expected = vec![
        (9, "a".to_owned()),
        (10, "b".to_owned()),
        (100, "c".to_owned()),
    ];
    assert_eq!(priorities(store, LISTENER).await, expected);
    assert_eq!(
        store.listener_priorities(OTHER_LISTENER).await.unwrap(),
        vec![claim(OTHER_LISTENER, 10, "z")]
    );

    // Taken priorities cannot be claimed again, not even by their owner; a failed batch
    // claims nothing.
    assert_conflict(
        store
            .commit(vec![Write::ClaimPriority(claim(LISTENER, 10, "b"))])
            .await,
        0,
        WriteKind::ClaimPriority,
    );
    assert_conflict(
        store
            .commit(vec![Write::ClaimPriority(claim(LISTENER, 10, "d"))])
            .await,
        0,
        WriteKind::ClaimPriority,
    );
    assert_conflict(
        store
            .commit(vec![
                Write::ClaimPriority(claim(LISTENER, 11, "d")),
                Write::ClaimPriority(claim(LISTENER, 9, "d")),
            ])
            .await,
        1,
        WriteKind::ClaimPriority,
    );
    assert_conflict(
        store
            .commit(vec![Write::ReleasePriority(claim(LISTENER, 10, "a"))])
            .await,
        0,
        WriteKind::ReleasePriority,
    );
    assert_conflict(
        store
            .commit(vec![Write::ReleasePriority(claim(LISTENER, 12, "a"))])
            .await,
        0,
        WriteKind::ReleasePriority,
    );
    assert_eq!(priorities(store, LISTENER).await, expected);

    commit(
        store,
        vec![Write::ReleasePriority(claim(LISTENER, 10, "b"))],
    )
    .await;
    assert_eq!(
        priorities(store, LISTENER).await,
        vec![(9, "a".to_owned()), (100, "c".to_owned())]
    );
    commit(store, vec![Write::ClaimPriority(claim(LISTENER, 10, "d"))]).await;
    assert_eq!(
        priorities(store, LISTENER).await,
        vec![
            (9, "a".to_owned()),
            (10, "d".to_owned()),
            (100, "c".to_owned())
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Backups

fn backup_name(tenant_id: &str, instance: &str, backup: &str) -> BackupName {
    BackupName::new(name(tenant_id, instance), BackupId::parse(backup).unwrap())
}

fn backup(tenant_id: &str, instance: &str, id: &str, created_at: i64, expire_at: i64) -> Backup {
    let name = backup_name(tenant_id, instance, id);
    let prefix = Backup::key_prefix(Environment::Dev, &name);
    Backup {
        environment: Environment::Dev,
        description: format!("backup {id}"),
        labels: BTreeMap::from([("kind".to_owned(), "nightly".to_owned())]),
        state: BackupState::Ready,
        origin: BackupOrigin::Requested,
        operation: op_id("op-backup"),
        created_at: Timestamp(created_at),
        expire_at: Timestamp(expire_at),
        updated_at: Timestamp(created_at),
        location: format!("s3://archive/{prefix}"),
        database_uri: Some(format!("s3://archive/{prefix}database.sql.gz")),
        content_uri: None,
        manifest_uri: Some(format!("s3://archive/{prefix}manifest.json")),
        size_bytes: 1_234_567,
        failure_reason: None,
        version: 0,
        name,
    }
}

async fn backups_are_versioned(store: &dyn StateStore) {
    let key = backup_name("acme", "wp", "bk-1");
    assert_eq!(store.get_backup(&key).await.unwrap(), None);

    // The version passed on create is ignored: the store writes 1.
    let original = with_version(&backup("acme", "wp", "bk-1", 1_000, 9_000), |b| {
        b.version = 7;
        b.state = BackupState::Creating;
    });
    commit(store, vec![Write::CreateBackup(original.clone())]).await;
    let stored = store.get_backup(&key).await.unwrap().expect("created");
    assert_eq!(stored, with_version(&original, |b| b.version = 1));

    // Created twice: a conflict, the first one stays.
    let again = with_version(&original, |b| b.description = "other".to_owned());
    assert_conflict(
        store.commit(vec![Write::CreateBackup(again)]).await,
        0,
        WriteKind::CreateBackup,
    );
    assert_eq!(store.get_backup(&key).await.unwrap().unwrap(), stored);

    let ready = with_version(&stored, |b| {
        b.state = BackupState::Ready;
        b.size_bytes = 42;
    });
    commit(store, vec![Write::UpdateBackup(ready.clone())]).await;
    let second = store.get_backup(&key).await.unwrap().unwrap();
    assert_eq!(second, with_version(&ready, |b| b.version = 2));

    // Stale (1) and future (5) versions, and a missing backup, change nothing.
    for version in [1, 5] {
        let stale = with_version(&second, |b| {
            b.version = version;
            b.state = BackupState::Deleting;
        });
        assert_conflict(
            store.commit(vec![Write::UpdateBackup(stale.clone())]).await,
            0,
            WriteKind::UpdateBackup,
        );
        assert_conflict(
            store.commit(vec![Write::DeleteBackup(stale)]).await,
            0,
            WriteKind::DeleteBackup,
        );
    }
    let missing = with_version(&backup("acme", "wp", "bk-none", 1_000, 9_000), |b| {
        b.version = 1;
    });
    assert_conflict(
        store
            .commit(vec![Write::UpdateBackup(missing.clone())])
            .await,
        0,
        WriteKind::UpdateBackup,
    );
    assert_conflict(
        store.commit(vec![Write::DeleteBackup(missing)]).await,
        0,
        WriteKind::DeleteBackup,
    );
    assert_eq!(store.get_backup(&key).await.unwrap().unwrap(), second);
    assert_eq!(
        store
            .get_backup(&backup_name("acme", "wp", "bk-none"))
            .await
            .unwrap(),
        None
    );

    // In a batch with other records: all or nothing (a CreateBackup writes no backup when
    // the instance's update fails, as CreateBackup's transaction relies on).
    let wp = instance("acme", "wp", Environment::Dev, InstanceState::Active);
    commit(store, vec![Write::CreateInstance(wp.clone())]).await;
    let stale_instance = with_version(&wp, |i| i.version = 9);
    let next = backup("acme", "wp", "bk-2", 2_000, 9_000);
    assert_conflict(
        store
            .commit(vec![
                Write::CreateBackup(next.clone()),
                Write::UpdateInstance(stale_instance),
            ])
            .await,
        1,
        WriteKind::UpdateInstance,
    );
    assert_eq!(store.get_backup(&next.name).await.unwrap(), None);
    let current_instance = with_version(&wp, |i| i.version = 1);
    commit(
        store,
        vec![
            Write::CreateBackup(next.clone()),
            Write::UpdateInstance(current_instance),
        ],
    )
    .await;
    assert_eq!(
        store
            .get_backup(&next.name)
            .await
            .unwrap()
            .map(|b| b.version),
        Some(1)
    );

    // Deleted with the current version: gone, and a second delete is a conflict.
    commit(store, vec![Write::DeleteBackup(second.clone())]).await;
    assert_eq!(store.get_backup(&key).await.unwrap(), None);
    assert_conflict(
        store.commit(vec![Write::DeleteBackup(second)]).await,
        0,
        WriteKind::DeleteBackup,
    );
    // The name can be used again, from version 1.
    commit(store, vec![Write::CreateBackup(original.clone())]).await;
    assert_eq!(store.get_backup(&key).await.unwrap().unwrap().version, 1);
}

/// Follows `next` from the first page to the end, checking the page invariants.
async fn page_through_backups(
    store: &dyn StateStore,
    instance: &InstanceName,
    limit: usize,
) -> (Vec<Backup>, usize) {
    let mut seen = Vec::new();
    let mut after: Option<BackupCursor> = None;
    for pages in 1..=100 {
        let page = store
            .list_backups(instance, after.as_ref(), limit)
            .await
            .unwrap();
        assert!(
            page.items.len() <= limit,
            "{instance} limit {limit}: page too long"
        );
        seen.extend(page.items.iter().cloned());
        match page.next {
            None => return (seen, pages),
            Some(next) => {
                assert_eq!(page.items.len(), limit, "{instance}: short page with next");
                let last = page.items.last().unwrap();
                assert_eq!(
                    next,
                    BackupCursor {
                        created_at: last.created_at,
                        backup: last.name.backup.clone(),
                    },
                    "next names the last item"
                );
                after = Some(next);
            }
        }
    }
    panic!("{instance}: more than 100 pages");
}

async fn backup_listing_newest_first(store: &dyn StateStore) {
    // bk-b and bk-c share an instant (then ordered by id, descending); 99_999 < 100_000
    // checks that instants compare as numbers; bk < bk-1 < bk1 that ids compare as
    // strings, not joined with their instant.
    let ours = vec![
        backup("acme", "wp", "bk-a", 1_000, 50_000),
        backup("acme", "wp", "bk-b", 2_000, 50_000),
        backup("acme", "wp", "bk-c", 2_000, 50_000),
        backup("acme", "wp", "bk-d", 3_000, 50_000),
        backup("acme", "wp", "bk-e", 99_999, 50_000),
        backup("acme", "wp", "bk-f", 100_000, 50_000),
        backup("acme", "wp", "bk", 500, 50_000),
        backup("acme", "wp", "bk-1", 500, 50_000),
        backup("acme", "wp", "bk1", 500, 50_000),
    ];
    // Neighbours that must never show up: a sibling instance of the tenant (also one
    // whose id extends ours), the same instance id in another tenant, and a tenant whose
    // id extends ours.
    let others = vec![
        backup("acme", "wp2", "bk-a", 1_500, 50_000),
        backup("acme", "wp-1", "bk-z", 2_500, 50_000),
        backup("beta", "wp", "bk-a", 1_000, 50_000),
        backup("acme-2", "wp", "bk-q", 4_000, 50_000),
    ];
    commit(
        store,
        ours.iter()
            .chain(&others)
            .cloned()
            .map(Write::CreateBackup)
            .collect(),
    )
    .await;
    let wp = name("acme", "wp");
    let expected = [
        "bk-f", "bk-e", "bk-d", "bk-c", "bk-b", "bk-a", "bk1", "bk-1", "bk",
    ];
    // 4 pages of 2 and a last of 1; 3 pages of 3 exactly (no empty trailing page); one
    // page holding everything.
    for (limit, pages) in [(2, 5), (3, 3), (9, 1), (50, 1)] {
        let (seen, count) = page_through_backups(store, &wp, limit).await;
        let ids: Vec<String> = seen.iter().map(|b| b.name.backup.to_string()).collect();
        assert_eq!(ids, expected, "limit {limit}");
        assert_eq!(count, pages, "limit {limit}: pages");
        for backup in &seen {
            let original = ours.iter().find(|b| b.name == backup.name).unwrap();
            assert_eq!(backup, &with_version(original, |b| b.version = 1));
        }
    }
    // A cursor that names no stored backup still positions the page.
    let after = BackupCursor {
        created_at: Timestamp(2_000),
        backup: BackupId::parse("bk-bb").unwrap(),
    };
    let page = store.list_backups(&wp, Some(&after), 10).await.unwrap();
    let ids: Vec<String> = page
        .items
        .iter()
        .map(|b| b.name.backup.to_string())
        .collect();
    assert_eq!(ids, ["bk-b", "bk-a", "bk1", "bk-1", "bk"]);
    assert!(page.next.is_none());

    // The neighbours list only their own.
    let sibling = store
        .list_backups(&name("acme", "wp2"), None, 10)
        .await
        .unwrap();
    assert_eq!(
        sibling.items,
        vec![with_version(&others[0], |b| b.version = 1)]
    );
    let other_tenant = store
        .list_backups(&name("beta", "wp"), None, 10)
        .await
        .unwrap();
    assert_eq!(
        other_tenant.items,
        vec![with_version(&others[2], |b| b.version = 1)]
    );
    let none = store
        .list_backups(&name("acme", "nope"), None, 10)
        .await
        .unwrap();
    assert!(none.items.is_empty() && none.next.is_none());

    // A deleted backup leaves the listing.
    let stored_c = store
        .get_backup(&backup_name("acme", "wp", "bk-c"))
        .await
        .unwrap()
        .unwrap();
    commit(store, vec![Write::DeleteBackup(stored_c)]).await;
    let (seen, _) = page_through_backups(store, &wp, 4).await;
    assert_eq!(seen.len(), expected.len() - 1);
    assert!(seen.iter().all(|b| b.name.backup.as_str() != "bk-c"));
}

async fn expired_ids(store: &dyn StateStore, now: i64, limit: usize) -> Vec<String> {
    store
        .expired_backups(Timestamp(now), limit)
        .await
        .unwrap()
        .into_iter()
        .map(|b| format!("{}/{}", b.name.instance.tenant, b.name.backup))
        .collect()
}

async fn expired_backups_oldest_first(store: &dyn StateStore) {
    const NOW: i64 = 1_700_000_000_000;
    let all = [
        backup("acme", "wp", "e-a", 1_000, NOW - 10_000),
        backup("acme", "wp2", "e-b", 1_000, NOW - 20_000),
        backup("beta", "wp", "e-c", 1_000, NOW), // expires exactly now: expired
        backup("beta", "x", "e-d", 1_000, NOW + 1), // not yet
        backup("acme", "wp", "e-e", 1_000, NOW + 60_000_000),
        backup("acme-2", "wp", "e-f", 1_000, NOW - 10_000), // same instant as e-a
        backup("acme", "wp", "e-g", 1_000, 99_999),         // numbers, not strings
        backup("acme", "wp", "e-h", 1_000, 100_000),
    ];
    commit(
        store,
        all.iter().cloned().map(Write::CreateBackup).collect(),
    )
    .await;
    // Oldest expiry first; on the same instant, by (tenant, instance, backup).
    assert_eq!(
        expired_ids(store, NOW, 10).await,
        [
            "acme/e-g",
            "acme/e-h",
            "acme/e-b",
            "acme/e-a",
            "acme-2/e-f",
            "beta/e-c"
        ]
    );
    assert_eq!(
        expired_ids(store, NOW, 3).await,
        ["acme/e-g", "acme/e-h", "acme/e-b"]
    );
    assert_eq!(
        expired_ids(store, NOW - 10_001, 10).await,
        ["acme/e-g", "acme/e-h", "acme/e-b"]
    );
    assert_eq!(expired_ids(store, NOW + 1, 10).await.len(), 7);
    assert!(expired_ids(store, 50_000, 10).await.is_empty());
    let first = store.expired_backups(Timestamp(NOW), 1).await.unwrap();
    assert_eq!(first, vec![with_version(&all[6], |b| b.version = 1)]);

    // A new expiry (DeleteBackup sets it to now; a retention change pushes it later)
    // moves a backup in or out of the set; a deleted one leaves it.
    let stored = |tenant_id: &'static str, instance: &'static str, id: &'static str| {
        let key = backup_name(tenant_id, instance, id);
        async move { store.get_backup(&key).await.unwrap().unwrap() }
    };
    let now_deleting = with_version(&stored("acme", "wp", "e-e").await, |b| {
        b.state = BackupState::Deleting;
        b.expire_at = Timestamp(NOW - 30_000);
    });
    let extended = with_version(&stored("acme", "wp", "e-g").await, |b| {
        b.expire_at = Timestamp(NOW + 60_000);
    });
    let removed = stored("acme", "wp", "e-h").await;
    commit(
        store,
        vec![
            Write::UpdateBackup(now_deleting),
            Write::UpdateBackup(extended),
            Write::DeleteBackup(removed),
        ],
    )
    .await;
    assert_eq!(
        expired_ids(store, NOW, 10).await,
        ["acme/e-e", "acme/e-b", "acme/e-a", "acme-2/e-f", "beta/e-c"]
    );
}

async fn backups_and_instances_share_the_tenant_partition(store: &dyn StateStore) {
    use Environment::{Dev, Prod};
    // The tenant partition holds instances and backups: each listing sees only its kind.
    let instances = vec![
        instance("acme", "a", Dev, InstanceState::Active),
        instance("acme", "wp", Prod, InstanceState::Active),
        instance("acme", "zz", Dev, InstanceState::Deprovisioned),
    ];
    let backups = [
        backup("acme", "a", "bk-1", 1_000, 50_000),
        backup("acme", "wp", "bk-1", 2_000, 50_000),
        backup("acme", "wp", "bk-2", 3_000, 50_000),
        backup("acme", "zz", "bk-1", 4_000, 50_000),
    ];
    commit(
        store,
        instances
            .iter()
            .cloned()
            .map(Write::CreateInstance)
            .chain(backups.iter().cloned().map(Write::CreateBackup))
            .collect(),
    )
    .await;
    for tenant_filter in [Some(tenant("acme")), None] {
        for environment in [None, Some(Dev)] {
            let query = InstanceQuery {
                tenant: tenant_filter.clone(),
                environment,
                state: None,
                after: None,
                limit: 1,
            };
            check_instance_listing(store, &instances, query, &[1, 2, 0]).await;
        }
    }
    let (seen, _) = page_through_backups(store, &name("acme", "wp"), 1).await;
    let ids: Vec<String> = seen.iter().map(|b| b.name.to_string()).collect();
    assert_eq!(
        ids,
        [
            "tenants/acme/instances/wp/backups/bk-2",
            "tenants/acme/instances/wp/backups/bk-1"
        ]
    );
    // Backups named like instances are not instances, and the other way round.
    assert_eq!(
        store.get_instance(&name("acme", "bk-1")).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .get_backup(&backup_name("acme", "a", "a"))
            .await
            .unwrap(),
        None
    );
}

// ---------------------------------------------------------------------------------------
// Audit events

fn audit(
    id: &str,
    tenant_id: Option<&str>,
    principal: &str,
    outcome: &str,
    time: i64,
    expires_at: i64,
) -> AuditEvent {
    AuditEvent {
        id: id.into(),
        time: Timestamp(time),
        tenant: tenant_id.map(tenant),
        principal: principal.into(),
        method: "/bbws.instance.v1.InstanceService/DeleteInstance".into(),
        target: format!("tenants/{}/instances/wp", tenant_id.unwrap_or("x")),
        request_id: format!("req-{id}"),
        outcome: outcome.into(),
        operation: None,
        expires_at: Timestamp(expires_at),
    }
}

fn audit_query(tenant_id: Option<&str>, now: i64, limit: usize) -> AuditQuery {
    AuditQuery {
        tenant: tenant_id.map(tenant),
        principal: None,
        method: None,
        target: None,
        outcome: None,
        now: Timestamp(now),
        after: None,
        limit,
    }
}

/// Every page of `query`, as ids.
async fn page_through_audit(store: &dyn StateStore, query: &AuditQuery) -> Vec<String> {
    let mut seen = Vec::new();
    let mut after: Option<AuditCursor> = None;
    for _ in 0..100 {
        let page = store
            .list_audit_events(&AuditQuery {
                after: after.clone(),
                ..query.clone()
            })
            .await
            .unwrap();
        assert!(page.items.len() <= query.limit);
        seen.extend(page.items.iter().map(|e| e.id.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => return seen,
        }
    }
    panic!("{query:?}: too many pages");
}

async fn audit_events_newest_first_by_tenant_and_filter(store: &dyn StateStore) {
    let far = i64::MAX / 2;
    // e-b and e-c share an instant (ordered by id, descending); 99_999 < 100_000 as numbers.
    let events = [
        audit("e-a", Some("acme"), "token:ops", "OK", 1_000, far),
        audit("e-b", Some("beta"), "token:ops", "NOT_FOUND", 2_000, far),
        audit(
            "e-c",
            Some("acme"),
            "token:viewer",
            "PERMISSION_DENIED",
            2_000,
            far,
        ),
        audit("e-d", None, "token:ops", "INVALID_ARGUMENT", 99_999, far),
        audit("e-e", Some("acme"), "token:ops", "OK", 100_000, far),
    ];
    for event in &events {
        store.record_audit_event(event).await.unwrap();
    }
    for limit in [1, 2, 10] {
        assert_eq!(
            page_through_audit(store, &audit_query(None, 0, limit)).await,
            ["e-e", "e-d", "e-c", "e-b", "e-a"],
            "limit {limit}"
        );
        assert_eq!(
            page_through_audit(store, &audit_query(Some("acme"), 0, limit)).await,
            ["e-e", "e-c", "e-a"]
        );
        assert_eq!(
            page_through_audit(store, &audit_query(Some("nobody"), 0, limit)).await,
            Vec::<String>::new()
        );
    }
    let by_principal = AuditQuery {
        principal: Some("token:ops".into()),
        outcome: Some("OK".into()),
        ..audit_query(None, 0, 1)
    };
    assert_eq!(
        page_through_audit(store, &by_principal).await,
        ["e-e", "e-a"]
    );
    let by_target = AuditQuery {
        target: Some("tenants/beta/instances/wp".into()),
        method: Some("/bbws.instance.v1.InstanceService/DeleteInstance".into()),
        ..audit_query(None, 0, 2)
    };
    assert_eq!(page_through_audit(store, &by_target).await, ["e-b"]);
    // Stored as given.
    let page = store
        .list_audit_events(&audit_query(Some("beta"), 0, 5))
        .await
        .unwrap();
    assert_eq!(page.items, [events[1].clone()]);
}

async fn audit_events_expire(store: &dyn StateStore) {
    store
        .record_audit_event(&audit("old", Some("acme"), "p", "OK", 1_000, 5_000))
        .await
        .unwrap();
    store
        .record_audit_event(&audit("new", Some("acme"), "p", "OK", 2_000, 50_000))
        .await
        .unwrap();
    assert_eq!(
        page_through_audit(store, &audit_query(Some("acme"), 4_999, 5)).await,
        ["new", "old"]
    );
    // Expired at its expiry instant, and from then on.
    assert_eq!(
        page_through_audit(store, &audit_query(Some("acme"), 5_000, 5)).await,
        ["new"]
    );
    assert_eq!(
        page_through_audit(store, &audit_query(None, 49_999, 1)).await,
        ["new"]
    );
    assert!(
        page_through_audit(store, &audit_query(None, 50_000, 1))
            .await
            .is_empty()
    );
}

async fn audit_event_ids_are_unique(store: &dyn StateStore) {
    let event = audit("same", Some("acme"), "p", "OK", 1_000, i64::MAX / 2);
    store.record_audit_event(&event).await.unwrap();
    let again = store.record_audit_event(&event).await;
    assert!(
        matches!(
            again,
            Err(StoreError::Conflict {
                kind: WriteKind::RecordAudit,
                ..
            })
        ),
        "{again:?}"
    );
    assert_eq!(
        page_through_audit(store, &audit_query(None, 0, 5)).await,
        ["same"]
    );
}
