//! Cloud adapters: one narrow trait per capability, shaped by what the workflows need (not
//! by the SDKs), with AWS and MySQL implementations; and the per-environment account
//! resolution (STS AssumeRole).
//!
//! Every `ensure_*` is idempotent: it finds the resource by its deterministic name, tag or
//! client token and adopts it, and creates it only when it is missing. Every `delete_*`
//! succeeds when the resource is already gone. Together they make workflow steps safe to
//! run again after a crash.

use std::sync::Arc;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};

pub use settings::{CloudSettings, DbTimeouts, EnvironmentConfig, SdkTimeouts, Secret};

pub mod accounts;
pub mod aws;
pub mod credentials;
pub mod error;
pub mod mysql;
/// The emulated-platform bootstrap: local runs and tests only.
#[cfg(feature = "emulator")]
pub mod platform;
pub mod settings;

pub use error::{CloudError, CloudResult, ErrorKind};

/// Resource tags as (key, value) pairs.
pub type Tags = Vec<(String, String)>;

/// A resource found by its tags, with every tag it carries (what the reconciler needs to
/// tell whose it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedResource {
    /// What it is: `access_point`, `secret`, `target_group`, `listener_rule`, `service`,
    /// `task_definition` (a family), `user_pool`, `database` or `task_role` (the keys of an
    /// instance's `resources`).
    pub kind: &'static str,
    /// Its id or ARN, as the `delete_*` call of its kind takes it.
    pub id: String,
    pub tags: Tags,
    /// When it was created, where the service says.
    pub created_at: Option<crate::domain::Timestamp>,
}

impl TaggedResource {
    /// The value of the tag whose key ends with `:{name}` (for example `instance-id`).
    pub fn tag(&self, name: &str) -> Option<&str> {
        let suffix = format!(":{name}");
        self.tags
            .iter()
            .find(|(key, _)| key.ends_with(&suffix))
            .map(|(_, value)| value.as_str())
    }
}

/// The tags among `tags` that say who owns a resource: `…:tenant-id` and `…:instance-id`.
pub fn owner_tags(tags: &Tags) -> Tags {
    tags.iter()
        .filter(|(key, _)| key.ends_with(":tenant-id") || key.ends_with(":instance-id"))
        .cloned()
        .collect()
}

/// Whether a resource carrying `have` belongs to the owner that `want` (a spec's tags)
/// names. A spec that names no instance (`…:instance-id`) claims nothing and matches
/// anything; otherwise every owner tag must be present with its value — an untagged
/// resource found by name is someone else's.
pub fn owned_by<'a, I>(have: I, want: &Tags) -> bool
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let owner = owner_tags(want);
    if !owner.iter().any(|(key, _)| key.ends_with(":instance-id")) {
        return true;
    }
    let have: Vec<(&str, &str)> = have.into_iter().collect();
    owner
        .iter()
        .all(|(key, value)| have.contains(&(key.as_str(), value.as_str())))
}

/// The error for a resource found by its deterministic name that another instance owns.
pub fn not_ours(what: &str) -> CloudError {
    CloudError::fatal(format!(
        "{what} exists but belongs to another instance (or to no instance); not adopting it"
    ))
}

/// An EFS access point for one tenant.
#[derive(Debug, Clone)]
pub struct AccessPointSpec {
    pub file_system_id: String,
    /// Deterministic client token (idempotency across retries and replicas).
    pub client_token: String,
    /// Root directory, e.g. `/tenant-acme`; created with `uid`/`gid` and `permissions`.
    pub root_path: String,
    pub uid: u32,
    pub gid: u32,
    pub permissions: String,
    pub tags: Tags,
}

#[async_trait]
pub trait Files: Send + Sync {
    /// Returns the access point id, creating the access point if none with this client
    /// token (or these tenant tags on this file system) exists.
    async fn ensure_access_point(&self, spec: &AccessPointSpec) -> CloudResult<String>;
    async fn delete_access_point(&self, access_point_id: &str) -> CloudResult<()>;
    /// Lifecycle state (`available`, …) or `None` if it does not exist.
    async fn access_point_state(&self, access_point_id: &str) -> CloudResult<Option<String>>;
    /// Ids of access points on `file_system_id` carrying every tag in `tags`.
    async fn find_tagged(&self, file_system_id: &str, tags: &Tags) -> CloudResult<Vec<String>>;
    /// Access points on `file_system_id` carrying every tag in `tags`, with all their tags.
    async fn tagged_access_points(
        &self,
        file_system_id: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>>;
}

#[derive(Clone)]
pub struct SecretSpec {
    pub name: String,
    pub description: String,
    /// The secret string to store if the secret does not exist yet.
    pub value: Secret,
    pub tags: Tags,
}

#[async_trait]
pub trait Secrets: Send + Sync {
    /// Returns (ARN, the value now stored). An existing secret is adopted with the value it
    /// already holds, so a retried workflow keeps the password it generated first.
    async fn ensure_secret(&self, spec: &SecretSpec) -> CloudResult<(String, Secret)>;
    async fn read_secret(&self, name_or_arn: &str) -> CloudResult<Secret>;
    /// Deletes at once, without a recovery window.
    async fn delete_secret(&self, name_or_arn: &str) -> CloudResult<()>;
    /// ARNs of secrets carrying every tag in `tags`.
    async fn find_tagged(&self, tags: &Tags) -> CloudResult<Vec<String>>;
    /// Secrets carrying every tag in `tags` (not those scheduled for deletion), with all
    /// their tags and their creation time.
    async fn tagged_secrets(&self, tags: &Tags) -> CloudResult<Vec<TaggedResource>>;
    /// The tags of the secret (`None` if it does not exist or is scheduled for deletion).
    async fn secret_tags(&self, name_or_arn: &str) -> CloudResult<Option<Tags>>;
}

/// Who holds a database name on an environment's MySQL server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseClaim {
    /// Recorded as `owner`'s (now, or by an earlier attempt).
    Ours,
    /// Recorded as another owner's, or the database (or its user) existed before anyone
    /// claimed it: never to be adopted or dropped.
    Theirs(String),
}

/// Administrative access to an environment's MySQL server (from its master secret).
#[derive(Clone, Debug)]
pub struct MasterCredentials {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: Secret,
    pub tls: DbTls,
    /// PEM bundle of the CAs that may sign the server's certificate (for RDS, the RDS
    /// global bundle), trusted besides the public web PKI roots.
    pub ca_file: Option<std::path::PathBuf>,
}

/// How the control plane connects to an environment's database server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbTls {
    /// TLS, with the server's certificate and host name verified; never plain text.
    #[default]
    Verified,
    /// Plain TCP: only for a database on the same host (the emulated platform).
    Disabled,
}

#[async_trait]
pub trait Database: Send + Sync {
    /// `CREATE DATABASE IF NOT EXISTS` (utf8mb4 / utf8mb4_unicode_ci), the user with
    /// `password` (reset if it exists), and all privileges on that database only (its name
    /// matched literally, never as a wildcard pattern). `database` and `user` come from
    /// validated ids (see `domain::naming`). With `require_tls` the user may log in over
    /// TLS only (`REQUIRE SSL`); without, any requirement is lifted (`REQUIRE NONE`).
    async fn ensure_tenant_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
        password: &Secret,
        require_tls: bool,
    ) -> CloudResult<()>;
    /// [`Database::ensure_tenant_database`] for a user that need not use TLS.
    async fn ensure_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
        password: &Secret,
    ) -> CloudResult<()> {
        self.ensure_tenant_database(master, database, user, password, false)
            .await
    }
    /// Drops the user and the database if they exist.
    async fn drop_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
    ) -> CloudResult<()>;
    /// A logical SQL dump of `database` (schema and data), uncompressed.
    async fn dump_database(
        &self,
        master: &MasterCredentials,
        database: &str,
    ) -> CloudResult<Vec<u8>>;
    async fn database_exists(
        &self,
        master: &MasterCredentials,
        database: &str,
    ) -> CloudResult<bool>;
    async fn user_exists(&self, master: &MasterCredentials, user: &str) -> CloudResult<bool>;
    /// Logs in as `login` (any user: host, port, TLS and CA as for the master connection)
    /// to `database` and runs `SELECT 1`, bounded by the connect and statement time limits.
    /// A refused password is `ErrorKind::Fatal`; the password never appears in the error.
    async fn check_login(&self, login: &MasterCredentials, database: &str) -> CloudResult<()>;
    /// Records `owner` as the owner of `database` and `user` in the server's ownership
    /// table (schema `instance_manager`), unless someone else holds them or they already
    /// exist unrecorded. Call before `ensure_database`.
    async fn claim_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
        owner: &str,
    ) -> CloudResult<DatabaseClaim>;
    /// The recorded owner of `database`, if any.
    async fn database_owner(
        &self,
        master: &MasterCredentials,
        database: &str,
    ) -> CloudResult<Option<String>>;
    /// Bytes `database` takes (data and indexes of its tables, as information_schema
    /// reports them; InnoDB's figures are estimates), `None` if it does not exist. `login`
    /// may be any user that can see the database's tables (the tenant's own).
    async fn database_size(
        &self,
        login: &MasterCredentials,
        database: &str,
    ) -> CloudResult<Option<u64>>;
    /// Forgets `owner`'s claim on `database` (after dropping it).
    async fn release_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        owner: &str,
    ) -> CloudResult<()>;
    /// Claims a further database name for `owner`, whose `user` already exists (a restore's
    /// fresh database): only a name no database uses and nobody claimed. Repeating a claim
    /// `owner` holds answers `Ours`.
    async fn claim_schema(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
        owner: &str,
    ) -> CloudResult<DatabaseClaim>;
    /// Drops the database if it exists, leaving users alone.
    async fn drop_schema(&self, master: &MasterCredentials, database: &str) -> CloudResult<()>;
    /// Every database name `owner` has claimed, sorted.
    async fn databases_owned_by(
        &self,
        master: &MasterCredentials,
        owner: &str,
    ) -> CloudResult<Vec<String>>;
    /// Every claim in the server's ownership table, sorted by database name.
    async fn ownership_records(
        &self,
        master: &MasterCredentials,
    ) -> CloudResult<Vec<DatabaseRecord>>;
    /// Names of the server's databases that start with `prefix` (taken literally), sorted.
    async fn databases_named(
        &self,
        master: &MasterCredentials,
        prefix: &str,
    ) -> CloudResult<Vec<String>>;
}

/// One row of the ownership table: who claimed a database (and its user), and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRecord {
    pub database: String,
    pub user: String,
    /// The owning instance's resource name (`tenants/{tenant}/instances/{instance}`).
    pub owner: String,
    /// When the claim was made.
    pub claimed_at: crate::domain::Timestamp,
}

#[derive(Debug, Clone)]
pub struct TargetGroupSpec {
    pub name: String,
    pub vpc_id: String,
    pub health_check_path: String,
    pub matcher: String,
    /// `deregistration_delay.timeout_seconds`: how long a deregistered target drains (and
    /// a deleted service stays DRAINING); `None` leaves AWS's default (300 s).
    pub deregistration_delay_secs: Option<u32>,
    pub tags: Tags,
}

#[derive(Debug, Clone)]
pub struct HostRuleSpec {
    pub listener_arn: String,
    /// The values of the rule's host-header condition: 1..=[`HOSTS_PER_RULE`] host names.
    pub hosts: Vec<String>,
    pub target_group_arn: String,
    pub priority: u32,
    pub tags: Tags,
}

/// The most characters ELBv2 accepts in a fixed-response body (FixedResponseActionConfig).
pub const FIXED_RESPONSE_BODY_MAX: usize = 1024;

/// What a listener rule does with the requests it matches (its final action).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// Forwards to one target group.
    Forward { target_group_arn: String },
    /// Answers itself: `status_code` 2XX, 4XX or 5XX; `content_type` one of text/plain,
    /// text/css, text/html, application/javascript, application/json; `body` at most
    /// [`FIXED_RESPONSE_BODY_MAX`] characters.
    FixedResponse {
        status_code: u16,
        content_type: String,
        body: String,
    },
    /// Anything else (a redirect, a weighted forward to several groups, …): `kind` says what.
    Other { kind: String },
}

/// One registered target as DescribeTargetHealth reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetHealth {
    /// IP address or instance id.
    pub id: String,
    pub port: Option<u16>,
    /// `initial`, `healthy`, `unhealthy`, `unhealthy.draining`, `unused`, `draining` or
    /// `unavailable`.
    pub state: String,
    /// For example `Target.ResponseCodeMismatch`, `Elb.RegistrationInProgress`.
    pub reason: Option<String>,
    pub description: Option<String>,
}

#[async_trait]
pub trait Routing: Send + Sync {
    /// Returns the target group ARN (ip targets, HTTP 80), creating it if missing.
    async fn ensure_target_group(&self, spec: &TargetGroupSpec) -> CloudResult<String>;
    async fn delete_target_group(&self, arn: &str) -> CloudResult<()>;
    /// Priorities of every rule on the listener (ours or not).
    async fn rule_priorities(&self, listener_arn: &str) -> CloudResult<Vec<u32>>;
    /// Returns the rule ARN: an existing rule of the listener whose hosts include
    /// `hosts[0]` is adopted when it carries the spec's owner tags and forwards to the
    /// spec's target group (its hosts are left as they are: [`Routing::set_rule_hosts`]
    /// changes them); else a rule is created at `priority`. A priority taken on the
    /// listener is `ErrorKind::Conflict`; a rule of someone else's routing `hosts[0]`, or
    /// no hosts or more than [`HOSTS_PER_RULE`], is `ErrorKind::Fatal`.
    async fn ensure_host_rule(&self, spec: &HostRuleSpec) -> CloudResult<String>;
    async fn delete_rule(&self, rule_arn: &str) -> CloudResult<()>;
    /// The final action of the rule (after any authenticate actions), `None` if the rule
    /// does not exist.
    async fn rule_action(&self, rule_arn: &str) -> CloudResult<Option<RuleAction>>;
    /// Makes `action` the rule's only action (ModifyRule replaces the whole action list;
    /// its conditions, priority and tags stay). A missing rule is `ErrorKind::NotFound`.
    async fn set_rule_action(&self, rule_arn: &str, action: &RuleAction) -> CloudResult<()>;
    /// (target id, state) of every registered target.
    async fn target_health(&self, target_group_arn: &str) -> CloudResult<Vec<(String, String)>>;
    /// Every registered target with its state and, unless healthy, ELB's reason code and
    /// description (DescribeTargetHealth).
    async fn target_health_details(&self, target_group_arn: &str)
    -> CloudResult<Vec<TargetHealth>>;
    /// ARNs of target groups and rules carrying every tag in `tags`.
    async fn find_tagged(&self, listener_arn: &str, tags: &Tags) -> CloudResult<Vec<String>>;
    /// Target groups, and rules on `listener_arn`, carrying every tag in `tags`, with all
    /// their tags.
    async fn tagged_routing(
        &self,
        listener_arn: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>>;
    /// Adds the certificate to the listener's certificate list (SNI); succeeds when it is
    /// there already. The listener's certificate quota reached (`TooManyCertificates`) is
    /// `ErrorKind::Fatal`, its message naming the quota.
    async fn add_listener_certificate(
        &self,
        listener_arn: &str,
        certificate_arn: &str,
    ) -> CloudResult<()>;
    /// Removes it from the listener's list; succeeds when it is not there.
    async fn remove_listener_certificate(
        &self,
        listener_arn: &str,
        certificate_arn: &str,
    ) -> CloudResult<()>;
    /// The listener's certificates besides its default one.
    async fn listener_certificates(&self, listener_arn: &str) -> CloudResult<Vec<String>>;
    /// The values of the rule's host-header condition, `None` if the rule does not exist.
    async fn rule_hosts(&self, rule_arn: &str) -> CloudResult<Option<Vec<String>>>;
    /// Makes `hosts` (1..=[`HOSTS_PER_RULE`]) the values of the rule's host-header
    /// condition (ModifyRule; its action, priority and tags stay). A missing rule is
    /// `ErrorKind::NotFound`.
    async fn set_rule_hosts(&self, rule_arn: &str, hosts: &[String]) -> CloudResult<()>;
}

/// Values one host-header condition takes (ALB: at most three match evaluations per
/// condition, five per rule).
pub const HOSTS_PER_RULE: usize = 3;

/// A DNS record set as Route53 holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsRecordSet {
    /// Fully qualified, lower-case, without the trailing dot.
    pub name: String,
    /// `A`, `CNAME`, …
    pub record_type: String,
    /// An alias's target DNS name (without the trailing dot), or the first resource record.
    pub value: String,
    /// The alias target's hosted zone id; `None` for a plain record.
    pub alias_zone_id: Option<String>,
}

/// An environment's Route53 hosted zones (the platform's zone, and managed customer zones).
/// Every change is an UPSERT or a DELETE of one record set, answered with its change id;
/// a change is visible to resolvers once GetChange reports it INSYNC.
#[async_trait]
pub trait Dns: Send + Sync {
    /// UPSERTs the alias A record `name` → the load balancer (`target_dns_name`,
    /// `target_zone_id`, no target health evaluation) in `zone_id`. Returns the change id.
    async fn upsert_alias(
        &self,
        zone_id: &str,
        name: &str,
        target_dns_name: &str,
        target_zone_id: &str,
    ) -> CloudResult<String>;
    /// UPSERTs the record `name` of `record_type` (`CNAME`: certificate validation) with the
    /// one value `value`, TTL 300. Returns the change id.
    async fn upsert_record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
        value: &str,
    ) -> CloudResult<String>;
    /// Deletes the record set `name` of `record_type` (a DELETE must repeat the record
    /// exactly, so it is read first). Returns the change id, `None` when there was none.
    async fn delete_record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
    ) -> CloudResult<Option<String>>;
    /// Whether the change is INSYNC (GetChange); false while it is PENDING.
    async fn change_in_sync(&self, change_id: &str) -> CloudResult<bool>;
    /// The record set `name` of `record_type` in `zone_id`, `None` if there is none.
    async fn record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
    ) -> CloudResult<Option<DnsRecordSet>>;
}

/// An ACM certificate for one custom domain, validated through DNS.
#[derive(Debug, Clone)]
pub struct CertificateSpec {
    /// The domain (the certificate's only name).
    pub domain: String,
    /// RequestCertificate's idempotency token (at most 32 word characters): ACM answers
    /// a repeated request with the same token within an hour with the same certificate.
    pub idempotency_token: String,
    pub tags: Tags,
}

/// The DNS record that proves control of a domain to ACM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidationRecord {
    /// Without the trailing dot.
    pub name: String,
    /// `CNAME`.
    pub record_type: String,
    /// Without the trailing dot.
    pub value: String,
}

/// A certificate as DescribeCertificate reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertificateStatus {
    pub arn: String,
    pub domain: String,
    /// `PENDING_VALIDATION`, `ISSUED`, `INACTIVE`, `EXPIRED`, `VALIDATION_TIMED_OUT`,
    /// `REVOKED` or `FAILED`.
    pub status: String,
    /// The validation record, once ACM has made it (DescribeCertificate leaves it out for
    /// a few seconds after the request).
    pub validation: Option<ValidationRecord>,
    /// ACM's `FailureReason`, when FAILED.
    pub failure_reason: Option<String>,
    /// ARNs of what uses it (load balancers); ACM refuses to delete it while any does.
    pub in_use_by: Vec<String>,
}

#[async_trait]
pub trait Certificates: Send + Sync {
    /// Returns the ARN of the certificate for `spec.domain`: one carrying the spec's owner
    /// tags that is neither FAILED, VALIDATION_TIMED_OUT, REVOKED nor EXPIRED is adopted;
    /// otherwise one is requested (DNS validation, the spec's token and tags).
    async fn ensure_certificate(&self, spec: &CertificateSpec) -> CloudResult<String>;
    /// The certificate, `None` if ACM does not know it.
    async fn certificate(&self, arn: &str) -> CloudResult<Option<CertificateStatus>>;
    /// Deletes it; succeeds when it is already gone. While a listener still uses it (ELB
    /// lets go of a removed certificate after a while) the error is
    /// `ErrorKind::Retryable`.
    async fn delete_certificate(&self, arn: &str) -> CloudResult<()>;
    /// Certificates carrying every tag in `tags`, with all their tags (kind `certificate`).
    async fn tagged_certificates(&self, tags: &Tags) -> CloudResult<Vec<TaggedResource>>;
}

#[derive(Debug, Clone)]
pub struct UserPoolSpec {
    pub name: String,
    pub domain_prefix: String,
    pub callback_url: String,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPool {
    pub pool_id: String,
    pub client_id: String,
    pub domain: String,
}

#[async_trait]
pub trait Identity: Send + Sync {
    /// The pool (found by name), its app client, its domain and the groups Admin, Editor
    /// and Viewer, each created if missing.
    async fn ensure_user_pool(&self, spec: &UserPoolSpec) -> CloudResult<UserPool>;
    /// Deletes the domain and the pool.
    async fn delete_user_pool(&self, pool_id: &str) -> CloudResult<()>;
    /// Ids of user pools carrying every tag in `tags`.
    async fn find_tagged(&self, tags: &Tags) -> CloudResult<Vec<String>>;
    /// User pools carrying every tag in `tags`, with all their tags and their creation time.
    async fn tagged_user_pools(&self, tags: &Tags) -> CloudResult<Vec<TaggedResource>>;
    /// Whether the pool exists.
    async fn user_pool_exists(&self, pool_id: &str) -> CloudResult<bool>;
}

/// The IAM role one instance's WordPress tasks run as: ECS tasks of this account may assume
/// it, and it may mount and write the platform's file system only through the instance's
/// own access point.
#[derive(Debug, Clone)]
pub struct TaskRoleSpec {
    /// The role's name (at most 64 characters, see `domain::naming`).
    pub name: String,
    /// The role's path, e.g. `/bbws/instances/` (the platform's file-system policy names
    /// the roles by it).
    pub path: String,
    pub description: String,
    /// The account whose ECS tasks may assume the role (the trust policy's
    /// `aws:SourceAccount` condition).
    pub account_id: String,
    /// ARN of the environment's file system (the only resource the policy allows).
    pub file_system_arn: String,
    /// ARN of the instance's access point (the policy's `elasticfilesystem:AccessPointArn`).
    pub access_point_arn: String,
    /// ARN of a managed policy set as the role's permissions boundary, if any.
    pub permissions_boundary: Option<String>,
    pub tags: Tags,
}

/// The name of the inline policy every task role carries.
pub const TASK_ROLE_POLICY: &str = "tenant-file-system";

#[async_trait]
pub trait TaskRoles: Send + Sync {
    /// Returns the role's ARN. A missing role is created (trust policy and tags); a role of
    /// that name is adopted only if it carries the spec's owner tags (else it is another
    /// instance's: `ErrorKind::Fatal`). Either way its inline policy [`TASK_ROLE_POLICY`] is
    /// (re)written from the spec.
    async fn ensure_task_role(&self, spec: &TaskRoleSpec) -> CloudResult<String>;
    /// Deletes every inline policy, detaches every managed policy, then deletes the role.
    /// Succeeds when the role is already gone.
    async fn delete_task_role(&self, name: &str) -> CloudResult<()>;
    /// The role's tags, `None` if it does not exist.
    async fn role_tags(&self, name: &str) -> CloudResult<Option<Tags>>;
    /// Roles under `path_prefix` carrying every tag in `tags`, with all their tags and their
    /// creation time (`id` is the role's name, what [`TaskRoles::delete_task_role`] takes).
    async fn tagged_roles(
        &self,
        path_prefix: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>>;
}

#[derive(Debug, Clone)]
pub struct TaskDefinitionSpec {
    pub family: String,
    pub cpu: u32,
    pub memory_mib: u32,
    /// Full image reference, `repository:tag`.
    pub image: String,
    pub file_system_id: String,
    pub access_point_id: String,
    /// Secret holding the tenant's database credentials (JSON keys username, password).
    pub secret_arn: String,
    pub db_host: String,
    pub db_name: String,
    pub log_group: String,
    pub log_region: String,
    pub log_stream_prefix: String,
    pub execution_role_arn: String,
    pub task_role_arn: String,
    /// WordPress connects to MySQL with TLS (its user is `REQUIRE SSL`).
    pub db_tls: bool,
    pub tags: Tags,
}

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub cluster: String,
    pub name: String,
    pub task_definition_arn: String,
    pub desired_count: u32,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub target_group_arn: String,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceStatus {
    pub status: String,
    pub desired: u32,
    pub running: u32,
    pub pending: u32,
    /// Rollout state of the primary deployment (`COMPLETED`, `IN_PROGRESS`, `FAILED`).
    pub rollout_state: Option<String>,
    pub deployments: u32,
    pub task_definition: String,
    /// Id of the primary deployment (`ecs-svc/…`).
    pub primary_deployment: Option<String>,
    /// When the primary deployment was created, in milliseconds since the Unix epoch.
    pub primary_created_at_ms: Option<i64>,
    /// The service's latest events (DescribeServices `events`), newest first, at most
    /// [`SERVICE_EVENTS_KEPT`].
    pub recent_events: Vec<ServiceEvent>,
}

/// How many of a service's events [`ServiceStatus`] keeps.
pub const SERVICE_EVENTS_KEPT: usize = 5;

/// One ECS service event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceEvent {
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: Option<i64>,
    pub message: String,
}

/// A one-off task (the wp-content archiver).
#[derive(Debug, Clone)]
pub struct OneOffTaskSpec {
    pub cluster: String,
    pub family: String,
    pub image: String,
    pub command: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub file_system_id: String,
    /// The access point the task mounts; empty mounts the file system's root instead.
    pub access_point_id: String,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub execution_role_arn: String,
    pub task_role_arn: String,
    /// Idempotency: RunTask's `clientToken` and the task's `startedBy`, so a resumed step
    /// finds the task it started instead of starting another.
    pub client_token: String,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStatus {
    pub last_status: String,
    pub exit_code: Option<i32>,
}

#[async_trait]
pub trait Compute: Send + Sync {
    /// Registers the task definition (container `wordpress`, port 80, EFS volume through the
    /// access point with transit encryption and IAM auth, DB credentials from the secret,
    /// health check `curl -f http://localhost/`); reuses the family's latest active revision
    /// when it is identical. Returns its ARN.
    async fn register_task_definition(&self, spec: &TaskDefinitionSpec) -> CloudResult<String>;
    /// Deregisters every active revision of `family`.
    async fn deregister_task_definitions(&self, family: &str) -> CloudResult<()>;
    /// Returns the service ARN, creating the service (Fargate, awsvpc, no public IP, circuit
    /// breaker with rollback, 50 %/200 %, propagateTags=SERVICE) if no active one exists.
    async fn ensure_service(&self, spec: &ServiceSpec) -> CloudResult<String>;
    async fn service_status(&self, cluster: &str, name: &str)
    -> CloudResult<Option<ServiceStatus>>;
    async fn update_service(
        &self,
        cluster: &str,
        name: &str,
        desired_count: Option<u32>,
        task_definition_arn: Option<&str>,
        force_new_deployment: bool,
    ) -> CloudResult<()>;
    /// Scales to zero and deletes the service.
    async fn delete_service(&self, cluster: &str, name: &str) -> CloudResult<()>;
    /// Registers a task definition for the one-off task and runs it; returns the task ARN.
    async fn run_task(&self, spec: &OneOffTaskSpec) -> CloudResult<String>;
    async fn task_status(&self, cluster: &str, task_arn: &str) -> CloudResult<Option<TaskStatus>>;
    /// ARNs of services (in `cluster`) and task definitions (ACTIVE or INACTIVE, not yet
    /// deleted) carrying every tag.
    async fn find_tagged(&self, cluster: &str, tags: &Tags) -> CloudResult<Vec<String>>;
    /// Tags and status of the service (`None` if ECS never heard of it or it is INACTIVE).
    async fn service_tags(&self, cluster: &str, name: &str) -> CloudResult<Option<Tags>>;
    /// Deregisters and then deletes (DeleteTaskDefinitions) every revision of `family`
    /// carrying every tag in `owner`, active or already inactive.
    async fn delete_task_definitions(&self, family: &str, owner: &Tags) -> CloudResult<()>;
    /// ACTIVE services of `cluster` carrying every tag in `tags` (kind `service`, id its
    /// name), with all their tags and their creation time. DRAINING ones are being deleted
    /// already and are left out.
    async fn tagged_services(&self, cluster: &str, tags: &Tags)
    -> CloudResult<Vec<TaggedResource>>;
    /// Task definition families whose name starts with `family_prefix` and that have
    /// revisions (ACTIVE or INACTIVE, not yet deleted) carrying every tag in `tags`: one
    /// entry (kind `task_definition`, id the family) per owner (`…:tenant-id`,
    /// `…:instance-id`) found in the family, with the tags of that owner's latest revision
    /// and the registration time of its newest one.
    async fn tagged_task_families(
        &self,
        family_prefix: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>>;
    /// The revision as DescribeTaskDefinition reports it, `None` if ECS cannot describe it
    /// (never registered, or deleted).
    async fn task_definition(&self, arn: &str) -> CloudResult<Option<TaskDefinitionInfo>>;
}

/// One task definition revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskDefinitionInfo {
    pub arn: String,
    /// `ACTIVE`, `INACTIVE` or `DELETE_IN_PROGRESS`.
    pub status: String,
    /// The image of the WordPress container (the first container if there is none of that
    /// name).
    pub image: Option<String>,
}

#[async_trait]
pub trait Objects: Send + Sync {
    async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        tags: &Tags,
    ) -> CloudResult<()>;
    /// Keys under `prefix`.
    async fn list_objects(&self, bucket: &str, prefix: &str) -> CloudResult<Vec<String>>;
    /// Removes the objects (DeleteObjects, up to 1000 keys a call). A missing key is not an
    /// error (S3 answers success for it), so a repeat after a crash succeeds.
    async fn delete_objects(&self, bucket: &str, keys: &[String]) -> CloudResult<()>;
    /// Uploads everything `source` yields as one object, in parts of `part_size` bytes
    /// (multipart upload), holding at most one part in memory. Any failure — of the source
    /// or of S3 — aborts the upload: no object, no pending parts.
    async fn upload_stream(
        &self,
        bucket: &str,
        key: &str,
        source: ByteChunks<'_>,
        tags: &Tags,
        part_size: usize,
    ) -> CloudResult<UploadSummary>;
    /// The object's body as a stream (never read whole into memory).
    async fn download_stream(&self, bucket: &str, key: &str) -> CloudResult<ByteReader>;
}

/// The source of a streaming upload: chunks of any size; an error aborts the upload.
pub type ByteChunks<'a> = futures::stream::BoxStream<'a, std::io::Result<Vec<u8>>>;

/// The body of a streamed download.
pub type ByteReader = std::pin::Pin<Box<dyn tokio::io::AsyncBufRead + Send>>;

/// S3's smallest part (all but the last), its largest part count, and our default part:
/// with 8 MiB parts an object may reach 10 000 × 8 MiB = 78.1 GiB.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// S3's largest part (5 GiB).
pub const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;
pub const MAX_PARTS: usize = 10_000;
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

/// What a streaming upload stored: its size and sha256 (hex), whole and per part.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadSummary {
    pub bytes: u64,
    pub sha256: String,
    pub parts: Vec<PartSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartSummary {
    pub number: i32,
    pub bytes: u64,
    pub sha256: String,
}

/// An RDS DB instance as DescribeDBInstances reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DbInstanceStatus {
    pub identifier: String,
    /// `DBInstanceStatus`: `available`, `backing-up`, `modifying`, `storage-full`, …
    pub status: String,
    pub engine: String,
    pub allocated_storage_gib: Option<i32>,
    /// The storage autoscaling limit, if autoscaling is on.
    pub max_allocated_storage_gib: Option<i32>,
    /// Changes RDS applies in the next maintenance window (`PendingModifiedValues`), e.g.
    /// `instance class -> db.t3.large`.
    pub pending_maintenance: Vec<String>,
    /// `PreferredMaintenanceWindow`, e.g. `sun:03:00-sun:03:30` (UTC).
    pub maintenance_window: Option<String>,
    /// Where it answers (`None` while RDS has not assigned an endpoint yet).
    pub endpoint: Option<DbEndpoint>,
}

/// An RDS DB instance's endpoint and what a client needs to log in there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DbEndpoint {
    pub address: String,
    pub port: u16,
    /// `CACertificateIdentifier`, e.g. `rds-ca-rsa2048-g1`: the RDS CA that signed the
    /// server's certificate (every one is in RDS's global bundle).
    pub ca_identifier: Option<String>,
    /// `IAMDatabaseAuthenticationEnabled`.
    pub iam_auth_enabled: bool,
    /// `DbiResourceId` (`db-…`), the resource of the `rds-db:connect` grant.
    pub resource_id: Option<String>,
}

#[async_trait]
pub trait DbInstances: Send + Sync {
    /// The DB instance `identifier`, or `None` if RDS does not know it.
    async fn db_instance(&self, identifier: &str) -> CloudResult<Option<DbInstanceStatus>>;
    /// An RDS IAM database authentication token for `user` at `host:port`: a presigned
    /// `rds-db:connect` request valid for 15 minutes, signed with this environment's
    /// credentials (its assumed role) for its region. It is the password of one TLS login
    /// (`mysql_clear_password`).
    async fn auth_token(&self, host: &str, port: u16, user: &str) -> CloudResult<Secret>;
}

/// One log event as CloudWatch Logs stores it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogEvent {
    /// When the line was emitted, in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// When CloudWatch Logs ingested it (may be much later than `timestamp_ms`).
    pub ingestion_ms: i64,
    pub stream: String,
    pub message: String,
    /// Unique within the log group.
    pub event_id: String,
}

/// One FilterLogEvents call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogQuery {
    pub group: String,
    /// Only streams whose name starts with this (an instance's streams).
    pub stream_prefix: String,
    /// Events from this time (inclusive), milliseconds since the Unix epoch.
    pub start_ms: i64,
    /// Events before this time (exclusive); `None`: up to now.
    pub end_ms: Option<i64>,
    /// CloudWatch Logs filter pattern; empty matches everything.
    pub filter: String,
    /// At most this many events (FilterLogEvents allows 1 to 10 000).
    pub limit: u32,
    /// The `next_token` of the previous page of the same query.
    pub token: Option<String>,
}

/// One page of FilterLogEvents. A page may be empty and still carry a token (CloudWatch
/// scans the time range a slice at a time); no token means the scan is complete.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogPage {
    pub events: Vec<LogEvent>,
    pub next_token: Option<String>,
}

#[async_trait]
pub trait Logs: Send + Sync {
    /// One page of the events matching `query`, oldest first. A missing log group is
    /// `ErrorKind::NotFound`; a filter pattern or token CloudWatch refuses is
    /// `ErrorKind::Fatal`.
    async fn filter_events(&self, query: &LogQuery) -> CloudResult<LogPage>;
}

/// CPU and memory utilisation of an ECS service, in percent, one point per period.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceUtilization {
    /// (start of the period in milliseconds since the Unix epoch, average), oldest first.
    pub cpu: Vec<(i64, f64)>,
    pub memory: Vec<(i64, f64)>,
}

#[async_trait]
pub trait Metrics: Send + Sync {
    /// The `AWS/ECS` `CPUUtilization` and `MemoryUtilization` averages of the service over
    /// `[start_ms, end_ms)`, one point per `period_secs` (a multiple of 60). Periods without
    /// data have no point.
    async fn service_utilization(
        &self,
        cluster: &str,
        service: &str,
        start_ms: i64,
        end_ms: i64,
        period_secs: u32,
    ) -> CloudResult<ServiceUtilization>;
}

/// The shared infrastructure of one environment, inside which tenants get their resources.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Platform {
    pub vpc_id: String,
    pub cluster: String,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub file_system_id: String,
    pub db_host: String,
    pub db_port: u16,
    /// TLS to the database server (`verified` unless set).
    pub db_tls: DbTls,
    /// CA bundle for `db_tls = "verified"` (for RDS: the RDS global bundle); empty means the
    /// public web PKI roots only.
    pub db_ca_file: String,
    /// The database server accepts TLS, so tenant users are created `REQUIRE SSL` and the
    /// WordPress containers connect with TLS (`MYSQL_CLIENT_FLAGS = MYSQLI_CLIENT_SSL`; the
    /// image must trust the server's CA, for RDS its global bundle). Off unless set.
    pub db_require_tls: bool,
    /// Secret with the MySQL master credentials: JSON `username`, `password`, `host`, `port`.
    /// Not read when `db_iam_auth` is on.
    pub master_secret_arn: String,
    /// The control plane logs in to the environment's MySQL with RDS IAM database
    /// authentication (a 15-minute token, over verified TLS) as `db_iam_user`, at the
    /// endpoint DescribeDBInstances reports for `db_instance_identifier`, instead of with the
    /// master secret.
    pub db_iam_auth: bool,
    /// The MySQL user of `db_iam_auth`, created `IDENTIFIED WITH AWSAuthenticationPlugin AS
    /// 'RDS'` with the privileges to create databases and users and grant them.
    pub db_iam_user: String,
    /// The HTTPS listener of an environment with one load balancer and no `load_balancers`
    /// pool (it is then the pool's only member, `default`, with AWS's default quotas).
    pub listener_arn: String,
    /// The environment's pool of load balancers: each provisioning places the instance on
    /// the first one with room for its rules, target group and certificates (see
    /// [`Platform::pool`]). Adding one is a configuration change; instances stay where they
    /// were placed.
    pub load_balancers: Vec<LoadBalancer>,
    /// Sites are served at `{tenant}.{domain}`.
    pub domain: String,
    /// The Route53 hosted zone of `domain` in the environment's account: each instance gets
    /// an alias record `{tenant}.{domain}` there, pointing at its load balancer. Empty: no
    /// per-instance records (a wildcard record, made outside, must then point at the one
    /// load balancer).
    pub hosted_zone_id: String,
    /// Hosted zones (in the environment's account) of customer domains delegated to us: a
    /// custom domain under one of them gets its certificate's validation record and its
    /// alias record created there; any other custom domain's records are the customer's to
    /// create.
    pub managed_zones: Vec<ManagedZone>,
    /// Custom domains one instance may have; `None`: [`DEFAULT_MAX_CUSTOM_DOMAINS`].
    pub max_custom_domains: Option<u32>,
    /// How long an operation waits for ACM to issue a custom domain's certificate (its
    /// DNS validation record must resolve) before it completes with the domain
    /// PENDING_VALIDATION; `None`: 900 s.
    pub certificate_validation_timeout_secs: Option<u32>,
    pub log_group: String,
    pub archive_bucket: String,
    pub cognito_enabled: bool,
    pub execution_role_arn: String,
    /// The role of the one-off archiver and cleaner tasks, and of the WordPress tasks of
    /// instances provisioned before each instance got its own role (`task_role` among its
    /// resources).
    pub task_role_arn: String,
    /// ARN of a managed policy set as the permissions boundary of every instance's task
    /// role; empty: none.
    pub task_role_permissions_boundary: String,
    /// Image of the one-off task that archives wp-content to S3.
    pub archiver_image: String,
    /// The dump program backups run (`mariadb-dump` if empty; or `mysqldump`, a path).
    pub db_dump_command: String,
    /// The client program restores run (`mariadb` if empty; or `mysql`, a path).
    pub db_client_command: String,
    /// Healthy ALB targets required before an instance counts as ACTIVE; `None` means the
    /// instance's desired count. (An emulator runs no tasks, so it registers no targets.)
    pub min_healthy_targets: Option<u32>,
    /// The environment is an emulator (moto): no container ever runs, so one-off tasks
    /// report no exit code. Only chooses the [`Readiness`] policy (see [`readiness_for`]);
    /// workflow code never reads it.
    pub emulator: bool,
    /// `deregistration_delay.timeout_seconds` of tenant target groups: how long targets
    /// drain, and so how long a deleted service stays DRAINING before its name is free
    /// again. `None` means [`DEFAULT_DEREGISTRATION_DELAY_SECS`] (AWS's own default, 300 s,
    /// would make every deprovisioning wait five minutes).
    pub deregistration_delay_secs: Option<u32>,
    /// The RDS DB instance holding the tenants' databases (the health check's `db_instance`
    /// check); empty: not checked.
    pub db_instance_identifier: String,
    /// Where the health check's HTTP probe connects, `http://host[:port]` or
    /// `https://host[:port]` (for example the ALB's DNS name); the request's Host header is
    /// always the instance's host. Empty: `https://{tenant}.{domain}`.
    pub health_probe_url: String,
    /// Path the probe requests; empty: `/`.
    pub health_probe_path: String,
    /// Status codes that count as serving, e.g. `200-399` or `200,301,302`; empty: `200-399`.
    pub health_probe_codes: String,
}

/// Custom domains per instance unless the platform sets a limit.
pub const DEFAULT_MAX_CUSTOM_DOMAINS: u32 = 5;

/// AWS's default quotas of one Application Load Balancer: rules (besides the default rules),
/// target groups, and certificates (besides each listener's default certificate).
pub const ALB_RULES_QUOTA: u32 = 100;
pub const ALB_TARGET_GROUPS_QUOTA: u32 = 100;
pub const ALB_CERTIFICATES_QUOTA: u32 = 25;

/// One load balancer of an environment's pool: an ALB and its HTTPS listener, with what the
/// control plane may place on it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LoadBalancer {
    /// Unique within the environment (`alb-1`); recorded on every instance placed here, so
    /// it must not be renamed while instances use it.
    pub name: String,
    /// The HTTPS listener holding the instances' rules and certificates.
    pub listener_arn: String,
    /// The ALB's DNS name: the target of the instances' alias records.
    pub dns_name: String,
    /// The ALB's canonical hosted zone id (DescribeLoadBalancers `CanonicalHostedZoneId`),
    /// which an alias record names with `dns_name`.
    pub hosted_zone_id: String,
    /// Listener rules the control plane may create on it; `None`: [`ALB_RULES_QUOTA`]. Lower
    /// it by the rules others keep there.
    pub max_rules: Option<u32>,
    /// Target groups the control plane may attach; `None`: [`ALB_TARGET_GROUPS_QUOTA`].
    pub max_target_groups: Option<u32>,
    /// Certificates the control plane may add to the listener (SNI); `None`:
    /// [`ALB_CERTIFICATES_QUOTA`].
    pub max_certificates: Option<u32>,
}

impl LoadBalancer {
    pub fn rules_quota(&self) -> u32 {
        self.max_rules.unwrap_or(ALB_RULES_QUOTA)
    }

    pub fn target_groups_quota(&self) -> u32 {
        self.max_target_groups.unwrap_or(ALB_TARGET_GROUPS_QUOTA)
    }

    pub fn certificates_quota(&self) -> u32 {
        self.max_certificates.unwrap_or(ALB_CERTIFICATES_QUOTA)
    }
}

/// A hosted zone of delegated customer domains (see [`Platform::managed_zones`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ManagedZone {
    /// The zone's domain, e.g. `customers.example.net`; it manages that name and every name
    /// under it.
    pub domain: String,
    pub hosted_zone_id: String,
}

impl Platform {
    /// The pool of load balancers: `load_balancers`, or when that is empty the one
    /// `listener_arn` (named `default`, AWS's quotas), or nothing.
    pub fn pool(&self) -> Vec<LoadBalancer> {
        if !self.load_balancers.is_empty() {
            return self.load_balancers.clone();
        }
        if self.listener_arn.is_empty() {
            return Vec::new();
        }
        vec![LoadBalancer {
            name: DEFAULT_LOAD_BALANCER.to_owned(),
            listener_arn: self.listener_arn.clone(),
            ..LoadBalancer::default()
        }]
    }

    /// The pool member called `name`.
    pub fn load_balancer(&self, name: &str) -> Option<LoadBalancer> {
        self.pool().into_iter().find(|lb| lb.name == name)
    }

    /// Every listener of the pool (where the reconciler and the verify steps look).
    pub fn listeners(&self) -> Vec<String> {
        self.pool().into_iter().map(|lb| lb.listener_arn).collect()
    }

    /// Custom domains one instance may have.
    pub fn custom_domains_limit(&self) -> u32 {
        self.max_custom_domains
            .unwrap_or(DEFAULT_MAX_CUSTOM_DOMAINS)
    }

    /// What the API accepts as custom domains here: not this platform's `domain` or under it,
    /// at most [`Platform::custom_domains_limit`].
    pub fn domain_rules(&self) -> crate::domain::spec::DomainRules {
        crate::domain::spec::DomainRules {
            platform_domain: self.domain.clone(),
            limit: self.custom_domains_limit(),
        }
    }

    /// The managed zone holding `host`, the most specific one if several do.
    pub fn managed_zone_of(&self, host: &str) -> Option<&ManagedZone> {
        self.managed_zones
            .iter()
            .filter(|zone| {
                let domain = zone.domain.trim_end_matches('.').to_ascii_lowercase();
                host == domain || host.ends_with(&format!(".{domain}"))
            })
            .max_by_key(|zone| zone.domain.len())
    }
}

/// The name of the pool's only member when a platform sets `listener_arn` alone.
pub const DEFAULT_LOAD_BALANCER: &str = "default";

/// The target groups' deregistration delay unless the platform sets one: long enough for
/// in-flight WordPress requests to finish.
pub const DEFAULT_DEREGISTRATION_DELAY_SECS: u32 = 30;

/// What counts as finished when observing ECS. Production uses AWS's rules
/// ([`AwsReadiness`]); an emulator, which never runs a container, gets a policy that
/// accepts what it can show ([`EmulatorReadiness`]). Injected through [`CloudEnv`], so the
/// workflows never branch on the environment being emulated.
pub trait Readiness: Send + Sync {
    /// Whether the service's tasks and primary deployment show a finished rollout (the
    /// service being ACTIVE with one deployment is checked separately).
    fn rollout_done(&self, status: &ServiceStatus) -> bool;
    /// Whether a STOPPED one-off task that reported `exit_code` succeeded.
    fn task_succeeded(&self, exit_code: Option<i32>) -> bool;
    /// Whether no task of the service runs any more (after it was scaled to zero).
    fn tasks_stopped(&self, status: &ServiceStatus) -> bool;
    /// Whether a one-off task that succeeded must have written its output (on AWS it must;
    /// an emulator runs no task, so nothing is written).
    fn task_output_required(&self) -> bool {
        true
    }
}

/// AWS: every desired task running, the primary deployment COMPLETED, exit code 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct AwsReadiness;

impl Readiness for AwsReadiness {
    fn rollout_done(&self, status: &ServiceStatus) -> bool {
        status.running >= status.desired
            && status
                .rollout_state
                .as_deref()
                .is_none_or(|state| state == "COMPLETED")
    }

    fn task_succeeded(&self, exit_code: Option<i32>) -> bool {
        exit_code == Some(0)
    }

    /// Neither RUNNING nor PENDING tasks. A task being stopped leaves `runningCount` when
    /// ECS deactivates it (deregistering it from the target group first, which takes the
    /// group's deregistration delay), so `running` falls one task at a time; PENDING tasks
    /// of a deployment still starting also have to go.
    fn tasks_stopped(&self, status: &ServiceStatus) -> bool {
        status.running == 0 && status.pending == 0
    }
}

/// An emulator (moto) starts no containers: it never reports running tasks or a finished
/// rollout (the deployment stays IN_PROGRESS), and stopped tasks carry no exit code.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmulatorReadiness;

impl Readiness for EmulatorReadiness {
    fn rollout_done(&self, _: &ServiceStatus) -> bool {
        true
    }

    fn task_succeeded(&self, exit_code: Option<i32>) -> bool {
        matches!(exit_code, None | Some(0))
    }

    /// No container ever runs there, so none is left running.
    fn tasks_stopped(&self, _: &ServiceStatus) -> bool {
        true
    }

    fn task_output_required(&self) -> bool {
        false
    }
}

/// The readiness policy of a platform.
pub fn readiness_for(platform: &Platform) -> Arc<dyn Readiness> {
    if platform.emulator {
        Arc::new(EmulatorReadiness)
    } else {
        Arc::new(AwsReadiness)
    }
}

/// Every adapter of one environment, bound to credentials of that environment's account.
#[derive(Clone)]
pub struct CloudEnv {
    pub environment: crate::domain::Environment,
    pub account_id: String,
    pub region: String,
    pub platform: Platform,
    pub files: Arc<dyn Files>,
    pub secrets: Arc<dyn Secrets>,
    pub database: Arc<dyn Database>,
    pub routing: Arc<dyn Routing>,
    pub identity: Arc<dyn Identity>,
    pub compute: Arc<dyn Compute>,
    pub objects: Arc<dyn Objects>,
    pub db_instances: Arc<dyn DbInstances>,
    /// The environment's log group (the instances' container logs).
    pub logs: Arc<dyn Logs>,
    /// CloudWatch metrics.
    pub metrics: Arc<dyn Metrics>,
    /// The instances' IAM task roles.
    pub task_roles: Arc<dyn TaskRoles>,
    /// Route53 (a global service) in the environment's account: the platform's hosted zone
    /// and the managed customer zones.
    pub dns: Arc<dyn Dns>,
    /// ACM in the environment's region (where its load balancers are).
    pub certificates: Arc<dyn Certificates>,
    /// What counts as a finished rollout or a successful task here.
    pub readiness: Arc<dyn Readiness>,
}

/// The SDK configuration of the control plane's own account (DynamoDB), with the
/// configured time limits.
///
/// With an endpoint override (an emulator) and no credentials in the environment, static
/// test credentials are used, so the SDK never falls back to the instance metadata service.
pub async fn control_plane_sdk_config(settings: &CloudSettings) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(settings.sdk_timeouts.timeout_config());
    if let Some(region) = &settings.aws_region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &settings.aws_endpoint {
        loader = loader.endpoint_url(endpoint);
        if std::env::var_os("AWS_REGION").is_none() && settings.aws_region.is_none() {
            loader = loader.region(Region::new("us-east-1"));
        }
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                "testing", "testing", None, None, "emulator",
            ));
        }
    }
    loader.load().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pairs(tags: &Tags) -> Vec<(&str, &str)> {
        tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn ownership_is_tenant_and_instance() {
        let spec = tags(&[
            ("bbws:tenant-id", "acme"),
            ("bbws:instance-id", "wp1"),
            ("bbws:component", "secret"),
            ("bbws:cost-center", "cc-1"),
        ]);
        assert_eq!(
            owner_tags(&spec),
            tags(&[("bbws:tenant-id", "acme"), ("bbws:instance-id", "wp1")])
        );
        // Other labels may differ (updated since); the owner may not.
        let ours = tags(&[("bbws:tenant-id", "acme"), ("bbws:instance-id", "wp1")]);
        assert!(owned_by(pairs(&ours), &spec));
        let sibling = tags(&[("bbws:tenant-id", "acme"), ("bbws:instance-id", "wp2")]);
        assert!(!owned_by(pairs(&sibling), &spec));
        let unmarked = tags(&[("bbws:tenant-id", "acme")]);
        assert!(!owned_by(pairs(&unmarked), &spec));
        assert!(!owned_by(Vec::new(), &spec));
        // A spec naming no instance claims nothing.
        assert!(owned_by(Vec::new(), &tags(&[("bbws:tenant-id", "acme")])));
    }

    fn service(running: u32, rollout: Option<&str>) -> ServiceStatus {
        ServiceStatus {
            status: "ACTIVE".into(),
            desired: 2,
            running,
            pending: 0,
            rollout_state: rollout.map(str::to_owned),
            deployments: 1,
            task_definition: "td".into(),
            ..ServiceStatus::default()
        }
    }

    #[test]
    fn readiness_policies() {
        let aws = AwsReadiness;
        assert!(aws.rollout_done(&service(2, Some("COMPLETED"))));
        assert!(aws.rollout_done(&service(2, None)));
        assert!(!aws.rollout_done(&service(1, Some("COMPLETED"))));
        assert!(!aws.rollout_done(&service(2, Some("IN_PROGRESS"))));
        assert!(aws.task_succeeded(Some(0)));
        assert!(!aws.task_succeeded(None));
        assert!(!aws.task_succeeded(Some(1)));
        // Stopped: nothing RUNNING (tasks being drained still count) and nothing PENDING.
        let at_zero = |running: u32, pending: u32| ServiceStatus {
            desired: 0,
            running,
            pending,
            ..service(0, Some("COMPLETED"))
        };
        assert!(!aws.tasks_stopped(&at_zero(2, 0)));
        assert!(!aws.tasks_stopped(&at_zero(1, 0)));
        assert!(!aws.tasks_stopped(&at_zero(0, 1)));
        assert!(aws.tasks_stopped(&at_zero(0, 0)));
        let emulator = EmulatorReadiness;
        assert!(emulator.tasks_stopped(&at_zero(2, 1)));
        assert!(emulator.rollout_done(&service(0, Some("IN_PROGRESS"))));
        assert!(emulator.task_succeeded(None));
        assert!(!emulator.task_succeeded(Some(2)));
        let production = Platform::default();
        assert!(!readiness_for(&production).task_succeeded(None));
        let emulated = Platform {
            emulator: true,
            ..Platform::default()
        };
        assert!(readiness_for(&emulated).task_succeeded(None));
    }
}
