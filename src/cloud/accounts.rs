//! Account resolution: one set of AWS credentials per environment, obtained by STS
//! AssumeRole of the environment's role from the control plane's own credentials, and the
//! adapters ([`CloudEnv`]) built on them.
//!
//! Credentials are resolved lazily on first use and cached per role session by
//! [`RefreshingCredentials`], which assumes the role again a margin before the session
//! expires (`role_refresh_margin_secs`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use aws_config::identity::IdentityCache;
use aws_config::sts::AssumeRoleProvider;
use aws_config::{Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;

use super::credentials::RefreshingCredentials;

use super::aws::{
    AcmCertificates, AwsCompute, AwsDbInstances, AwsFiles, AwsIdentity, AwsLogs, AwsMetrics,
    AwsObjects, AwsRouting, AwsSecrets, AwsTaskRoles, Route53Dns,
};
use super::mysql::MySqlDatabase;
pub use super::settings::SessionSettings;
use super::settings::{CloudSettings, EnvironmentConfig, SdkTimeouts};
use super::{CloudEnv, CloudError, CloudResult, Database, error::classify};
use crate::domain::Environment;

/// STS limit on `RoleSessionName`.
const MAX_SESSION_NAME: usize = 64;

/// A role session name: characters outside STS's `[\w+=,.@-]` become `-`, cut to 64.
pub fn session_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(MAX_SESSION_NAME)
        .collect();
    // STS wants at least two characters.
    while name.len() < 2 {
        name.push('-');
    }
    name
}

/// One configured environment.
struct Account {
    config: EnvironmentConfig,
    session: SessionSettings,
    /// The control plane's credentials with this environment's region and endpoint: what
    /// AssumeRole is called with.
    base: SdkConfig,
    /// `base` with the environment's (assumed-role) credentials.
    sdk: SdkConfig,
    cloud: CloudEnv,
    /// `Err(reason)` once verification failed.
    status: RwLock<Result<(), String>>,
}

/// Every configured environment, reachable through its own account.
pub struct Accounts {
    replica: String,
    accounts: BTreeMap<Environment, Account>,
    database: Arc<MySqlDatabase>,
}

impl Accounts {
    /// From the settings (or the configuration they come from), with the control plane's
    /// credentials from [`control_plane_sdk_config`](super::control_plane_sdk_config).
    pub async fn new(settings: impl Into<CloudSettings>) -> Self {
        let settings = settings.into();
        let control_plane = super::control_plane_sdk_config(&settings).await;
        Self::with_control_plane(&control_plane, settings).await
    }

    /// From the settings (or the configuration they come from), with the given
    /// control-plane SDK configuration (whose credentials are the ones that assume each
    /// environment's role).
    pub async fn with_control_plane(
        control_plane: &SdkConfig,
        settings: impl Into<CloudSettings>,
    ) -> Self {
        let settings = settings.into();
        let replica = settings.replica.clone();
        let database = Arc::new(MySqlDatabase::with_timeouts(settings.db_timeouts));
        let mut accounts = BTreeMap::new();
        for env in &settings.environments {
            let base = base_sdk_config(
                control_plane,
                env,
                settings.aws_endpoint.as_deref(),
                settings.sdk_timeouts,
            );
            let session = settings.session;
            let sdk = assumed_sdk_config(
                &base,
                env,
                &session_name(&format!("instance-manager-{replica}")),
                session,
            )
            .await;
            let cloud = cloud_env(env, &sdk, database.clone());
            accounts.insert(
                env.name,
                Account {
                    config: env.clone(),
                    session,
                    base,
                    sdk,
                    cloud,
                    status: RwLock::new(Ok(())),
                },
            );
        }
        Self {
            replica,
            accounts,
            database,
        }
    }

    /// Checks, for every environment at once, that its credentials belong to its configured
    /// `account_id` (GetCallerIdentity). An environment that fails is marked unavailable
    /// (its reason names it); the others keep being served. A later call can restore it.
    /// Until the first call every configured environment counts as available.
    pub async fn verify(&self) -> Vec<(Environment, Result<(), String>)> {
        let checks = self.accounts.iter().map(|(&name, account)| async move {
            let outcome = check_identity(name, account).await;
            match &outcome {
                Ok(()) => tracing::info!(environment = %name, account = %account.config.account_id, "environment verified"),
                Err(reason) => tracing::error!(environment = %name, %reason, "environment unavailable"),
            }
            *account
                .status
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = outcome.clone();
            (name, outcome)
        });
        futures::future::join_all(checks).await
    }

    /// Every configured environment, served or not.
    pub fn configured(&self) -> Vec<Environment> {
        self.accounts.keys().copied().collect()
    }

    /// Environments configured and not found broken by [`verify`](Self::verify).
    pub fn served(&self) -> Vec<Environment> {
        self.accounts
            .iter()
            .filter(|(_, account)| account.available().is_ok())
            .map(|(&name, _)| name)
            .collect()
    }

    /// The adapters of `environment`, on credentials of its account (shared and cached).
    pub async fn env(&self, environment: Environment) -> CloudResult<CloudEnv> {
        Ok(self.account(environment)?.cloud.clone())
    }

    /// The SDK configuration behind [`env`](Self::env): for what the adapters do not cover
    /// (bootstrap, diagnostics).
    pub fn sdk_config(&self, environment: Environment) -> CloudResult<SdkConfig> {
        Ok(self.account(environment)?.sdk.clone())
    }

    /// The adapters of `environment` on a role session of their own, named after the
    /// operation (`im-op-{id}`), so the environment's CloudTrail ties every call to the
    /// operation. Not cached: the session lives as long as the returned value. With no role
    /// configured (same account) there is no session to name, and this is [`env`](Self::env).
    pub async fn for_operation(
        &self,
        environment: Environment,
        operation_id: &str,
    ) -> CloudResult<CloudEnv> {
        let account = self.account(environment)?;
        if account.config.role_arn.is_empty() {
            return Ok(account.cloud.clone());
        }
        let sdk = self.operation_sdk_config(environment, operation_id).await?;
        Ok(cloud_env(&account.config, &sdk, self.database.clone()))
    }

    /// The SDK configuration behind [`for_operation`](Self::for_operation).
    pub async fn operation_sdk_config(
        &self,
        environment: Environment,
        operation_id: &str,
    ) -> CloudResult<SdkConfig> {
        let account = self.account(environment)?;
        if account.config.role_arn.is_empty() {
            return Ok(account.sdk.clone());
        }
        Ok(assumed_sdk_config(
            &account.base,
            &account.config,
            &session_name(&format!("im-op-{operation_id}")),
            account.session,
        )
        .await)
    }

    /// This replica's name, as used in role session names.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    fn account(&self, environment: Environment) -> CloudResult<&Account> {
        let Some(account) = self.accounts.get(&environment) else {
            return Err(CloudError::fatal(format!(
                "environment {environment} is not configured"
            )));
        };
        account.available().map_err(|reason| {
            CloudError::fatal(format!(
                "environment {environment} is not available: {reason}"
            ))
        })?;
        Ok(account)
    }
}

impl Account {
    fn available(&self) -> Result<(), String> {
        self.status
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

async fn check_identity(name: Environment, account: &Account) -> Result<(), String> {
    let sts = super::aws::traced_client!(aws_sdk_sts, &account.sdk);
    let identity = sts.get_caller_identity().send().await.map_err(|error| {
        let error = classify("sts:GetCallerIdentity", &error);
        let role = &account.config.role_arn;
        format!("environment {name}: cannot use role {role:?}: {error}")
    })?;
    let actual = identity.account().unwrap_or_default();
    if actual != account.config.account_id {
        return Err(format!(
            "environment {name}: credentials belong to account {actual}, configured account_id is {}",
            account.config.account_id
        ));
    }
    Ok(())
}

/// The control plane's credentials with the environment's region and endpoint (its own,
/// else the global `aws_endpoint`) and the configured time limits, which every client of
/// the environment inherits (the STS client of its role sessions too).
fn base_sdk_config(
    control_plane: &SdkConfig,
    env: &EnvironmentConfig,
    default_endpoint: Option<&str>,
    timeouts: SdkTimeouts,
) -> SdkConfig {
    let mut builder = control_plane
        .to_builder()
        .region(Region::new(env.region.clone()))
        .timeout_config(timeouts.timeout_config());
    builder.set_endpoint_url(
        env.endpoint
            .clone()
            .or_else(|| default_endpoint.map(str::to_owned)),
    );
    builder.build()
}

/// The cached credentials of a session of `env`'s role, assumed with `base`'s credentials.
pub async fn role_credentials(
    base: &SdkConfig,
    env: &EnvironmentConfig,
    session_name: &str,
    session: SessionSettings,
) -> RefreshingCredentials {
    let mut provider = AssumeRoleProvider::builder(env.role_arn.clone())
        .session_name(session_name)
        .session_length(session.length)
        .region(Region::new(env.region.clone()))
        .configure(base);
    if !env.external_id.is_empty() {
        provider = provider.external_id(env.external_id.expose());
    }
    let provider = provider.build().await;
    RefreshingCredentials::new(
        SharedCredentialsProvider::new(provider),
        session.refresh_margin,
        format!("{}/{session_name}", env.name),
    )
}

/// `base` with credentials of the environment's role (or `base` itself when no role is
/// configured), shared by every client built from it.
async fn assumed_sdk_config(
    base: &SdkConfig,
    env: &EnvironmentConfig,
    session_name: &str,
    session: SessionSettings,
) -> SdkConfig {
    if env.role_arn.is_empty() {
        return base.clone();
    }
    let credentials = role_credentials(base, env, session_name, session).await;
    base.to_builder()
        .credentials_provider(SharedCredentialsProvider::new(credentials))
        // `RefreshingCredentials` is the cache; a second one would hide its refreshes.
        .identity_cache(IdentityCache::no_cache())
        .build()
}

fn cloud_env(env: &EnvironmentConfig, sdk: &SdkConfig, database: Arc<MySqlDatabase>) -> CloudEnv {
    CloudEnv {
        environment: env.name,
        account_id: env.account_id.clone(),
        region: env.region.clone(),
        platform: env.platform.clone(),
        files: Arc::new(AwsFiles::new(sdk)),
        secrets: Arc::new(AwsSecrets::new(sdk)),
        database: database as Arc<dyn Database>,
        routing: Arc::new(AwsRouting::new(sdk)),
        identity: Arc::new(AwsIdentity::new(sdk)),
        compute: Arc::new(AwsCompute::new(sdk)),
        objects: Arc::new(AwsObjects::new(sdk)),
        db_instances: Arc::new(AwsDbInstances::new(sdk)),
        logs: Arc::new(AwsLogs::new(sdk)),
        metrics: Arc::new(AwsMetrics::new(sdk)),
        task_roles: Arc::new(AwsTaskRoles::new(sdk)),
        // Route53's API is global (us-east-1, set by the adapter); ACM must be the
        // environment's region, where its load balancers are (the SdkConfig's region).
        dns: Arc::new(Route53Dns::new(sdk)),
        certificates: Arc::new(AcmCertificates::new(sdk)),
        readiness: crate::cloud::readiness_for(&env.platform),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_fit_sts_rules() {
        assert_eq!(session_name("im-op-abc"), "im-op-abc");
        assert_eq!(
            session_name("instance-manager-host:42/x"),
            "instance-manager-host-42-x"
        );
        let long = session_name(&format!("im-op-{}", "a".repeat(100)));
        assert_eq!(long.len(), 64);
        assert!(long.starts_with("im-op-aaa"));
        assert_eq!(session_name("x"), "x-");
    }
}
