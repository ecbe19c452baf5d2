//! An in-process server on moto's DynamoDB with static tokens for every role × {every
//! tenant, tenant acme, tenant globex}, and fixtures seeded through the API and the store.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::auth::{AuthConfig, Authenticator, Role, StaticTokenConfig, token_sha256};
use instance_manager::domain::{
    Backup, BackupId, BackupName, BackupOrigin, BackupState, Environment, InstanceName,
    InstanceState, OperationId, OperationStatus, Timestamp,
};
use instance_manager::proto::google_longrunning::operations_client::OperationsClient;
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::server::{ServeOptions, serve_with};
use instance_manager::store::{DynamoStore, StateStore, Write};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::common;

pub const TENANTS: [&str; 2] = ["acme", "globex"];

/// A principal of the test server: its role and the tenant it is limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who {
    pub role: Role,
    pub tenant: Option<&'static str>,
}

impl Who {
    pub fn all() -> Vec<Who> {
        let mut all = Vec::new();
        for role in Role::ALL {
            for tenant in [None, Some("acme"), Some("globex")] {
                all.push(Who { role, tenant });
            }
        }
        all
    }

    pub fn global(role: Role) -> Who {
        Who { role, tenant: None }
    }

    pub fn of(role: Role, tenant: &'static str) -> Who {
        Who {
            role,
            tenant: Some(tenant),
        }
    }

    pub fn name(&self) -> String {
        format!("{}-{}", self.role, self.tenant.unwrap_or("all"))
    }

    /// The bearer token (its SHA-256 is what the server is configured with).
    pub fn token(&self) -> String {
        format!("secret-of-{}", self.name())
    }

    pub fn subject(&self) -> String {
        format!("token:{}", self.name())
    }

    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.is_none_or(|own| own == tenant)
    }
}

pub struct Server {
    pub instances: InstanceServiceClient<Channel>,
    pub operations: OperationsClient<Channel>,
    pub store: Arc<DynamoStore>,
    pub shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn auth_config() -> AuthConfig {
    AuthConfig {
        disabled: false,
        tokens: Who::all()
            .into_iter()
            .map(|who| StaticTokenConfig {
                name: who.name(),
                sha256: token_sha256(&who.token()),
                role: who.role,
                tenant: who.tenant.map(str::to_owned),
            })
            .collect(),
        ..AuthConfig::default()
    }
}

pub async fn start(settings: ApiSettings) -> Server {
    let sdk = common::test_sdk_config().await;
    let store = Arc::new(DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        common::unique_name("authz"),
    ));
    store.ensure_table().await.expect("create table");
    let api = Api::new(store.clone(), settings, PageTokens::new(b"test-key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let options = ServeOptions {
        auth: Arc::new(Authenticator::from_config(&auth_config()).unwrap()),
        ..ServeOptions::default()
    };
    let stop = shutdown.clone();
    tokio::spawn(
        async move { serve_with(api, listener, stop, Duration::from_secs(1), &options).await },
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    Server {
        instances: InstanceServiceClient::new(channel.clone()),
        operations: OperationsClient::new(channel),
        store,
        shutdown,
    }
}

/// `message` with `who`'s bearer token (none for `None`) and, if given, an `x-request-id`.
pub fn req<T>(who: Option<Who>, message: T, request_id: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(who) = who {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", who.token()).parse().unwrap(),
        );
    }
    if let Some(id) = request_id {
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().unwrap());
    }
    request
}

pub fn create_request(tenant: &str, id: &str) -> v1::CreateInstanceRequest {
    v1::CreateInstanceRequest {
        parent: format!("tenants/{tenant}"),
        instance_id: id.into(),
        instance: Some(v1::Instance {
            environment: v1::Environment::Dev.into(),
            organization_name: "Acme Corp".into(),
            contact_email: "ops@acme.example".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

/// What each tenant has: instance `wp`, the (completed) operation that created it, and a
/// backup of it in state CREATING.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub instance: String,
    pub operation: String,
    pub backup: String,
}

/// Plays the engine's part: the operation ends COMPLETED and its instance becomes `state`.
pub async fn finish(store: &DynamoStore, operation: &str, state: InstanceState) {
    let id = OperationId::from_name(operation).unwrap();
    let mut op = store.get_operation(&id).await.unwrap().unwrap();
    let mut instance = store.get_instance(&op.target).await.unwrap().unwrap();
    op.status = OperationStatus::Completed;
    op.lease = None;
    instance.state = state;
    instance.current_operation = None;
    store
        .commit(vec![
            Write::UpdateOperation(op),
            Write::UpdateInstance(instance),
        ])
        .await
        .unwrap();
}

pub async fn seed(server: &mut Server) -> BTreeMap<&'static str, Fixture> {
    let admin = Who::global(Role::Admin);
    let mut fixtures = BTreeMap::new();
    for tenant in TENANTS {
        let operation = server
            .instances
            .create_instance(req(Some(admin), create_request(tenant, "wp"), None))
            .await
            .unwrap()
            .into_inner();
        finish(&server.store, &operation.name, InstanceState::Active).await;
        let instance = InstanceName::parse(&format!("tenants/{tenant}/instances/wp")).unwrap();
        let backup = BackupName::new(instance.clone(), BackupId::parse("bk").unwrap());
        let now = Timestamp::now();
        server
            .store
            .commit(vec![Write::CreateBackup(Backup {
                name: backup.clone(),
                environment: Environment::Dev,
                description: String::new(),
                labels: BTreeMap::new(),
                state: BackupState::Creating,
                origin: BackupOrigin::Requested,
                operation: OperationId::from_name(&operation.name).unwrap(),
                created_at: now,
                expire_at: now.plus_millis(86_400_000),
                updated_at: now,
                location: format!("s3://archive/backups/dev/{tenant}/wp/bk/"),
                database_uri: None,
                content_uri: None,
                manifest_uri: None,
                size_bytes: 0,
                failure_reason: None,
                version: 1,
            })])
            .await
            .unwrap();
        fixtures.insert(
            tenant,
            Fixture {
                instance: instance.to_string(),
                operation: operation.name,
                backup: backup.to_string(),
            },
        );
    }
    fixtures
}

/// Versions of everything the fixtures hold, and every operation id: equal snapshots mean
/// nothing was written.
pub async fn snapshot(store: &DynamoStore, fixtures: &BTreeMap<&'static str, Fixture>) -> String {
    let mut out = String::new();
    for fixture in fixtures.values() {
        let instance = store
            .get_instance(&InstanceName::parse(&fixture.instance).unwrap())
            .await
            .unwrap()
            .unwrap();
        let operation = store
            .get_operation(&OperationId::from_name(&fixture.operation).unwrap())
            .await
            .unwrap()
            .unwrap();
        let backup = store
            .get_backup(&BackupName::parse(&fixture.backup).unwrap())
            .await
            .unwrap()
            .unwrap();
        out.push_str(&format!(
            "{} v{} {}; {} v{}; {} v{}\n",
            instance.name,
            instance.version,
            instance.state,
            operation.id,
            operation.version,
            backup.name,
            backup.version
        ));
    }
    let all = store
        .list_operations(&instance_manager::store::OperationQuery {
            tenant: None,
            target: None,
            status: None,
            done: None,
            after: None,
            limit: 1000,
        })
        .await
        .unwrap();
    out.push_str(&format!("{} operations\n", all.items.len()));
    out
}
