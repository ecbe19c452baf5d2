//! Per-tenant Cognito user pools: the pool, its app client, its hosted-UI domain and the
//! WordPress role groups.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_cognitoidentityprovider::Client;
use aws_sdk_cognitoidentityprovider::types::{
    OAuthFlowType, UserPoolDescriptionType, VerifiedAttributeType,
};

use super::{gone_is_ok, has_all_tags};
use crate::cloud::error::classify;
use crate::cloud::{
    CloudError, CloudResult, ErrorKind, Identity, TaggedResource, Tags, UserPool, UserPoolSpec,
    owner_tags,
};
use crate::domain::Timestamp;

/// The app client of pool `{pool}` is named `{pool}{APP_CLIENT_SUFFIX}`.
pub const APP_CLIENT_SUFFIX: &str = "-app";
/// The groups every tenant pool gets, mirroring WordPress roles.
pub const GROUPS: [&str; 3] = ["Admin", "Editor", "Viewer"];
/// The largest page ListUserPools and ListUserPoolClients accept.
const PAGE_SIZE: i32 = 60;

pub struct AwsIdentity {
    client: Client,
}

impl AwsIdentity {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: super::traced_client!(aws_sdk_cognitoidentityprovider, sdk),
        }
    }

    async fn all_pools(&self) -> CloudResult<Vec<UserPoolDescriptionType>> {
        self.client
            .list_user_pools()
            .max_results(PAGE_SIZE)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("cognito-idp:ListUserPools", &e))
    }

    /// Pool names are not unique in Cognito: if a race ever made two, the oldest is the one
    /// we use (and the other shows up as an orphan through its tags).
    /// Pools named `spec.name` that carry the spec's owner tags, oldest first. Cognito
    /// allows any number of pools with one name: a same-named pool of another instance is
    /// not ours, and two of ours mean two replicas raced.
    async fn owned_pools(&self, spec: &UserPoolSpec) -> CloudResult<Vec<String>> {
        let mut pools: Vec<UserPoolDescriptionType> = self
            .all_pools()
            .await?
            .into_iter()
            .filter(|pool| pool.name() == Some(spec.name.as_str()))
            .collect();
        pools.sort_by_key(|pool| {
            (
                pool.creation_date().map(|d| d.as_nanos()),
                pool.id().map(str::to_owned),
            )
        });
        let owner = owner_tags(&spec.tags);
        let mut owned = Vec::new();
        for id in pools.iter().filter_map(|pool| pool.id()) {
            if self.pool_tagged(id, &owner).await? {
                owned.push(id.to_owned());
            }
        }
        Ok(owned)
    }

    /// The pool to use: the oldest of ours, after deleting any duplicates (made by a replica
    /// that raced us); creates one if there is none.
    async fn ensure_pool(&self, spec: &UserPoolSpec) -> CloudResult<String> {
        let mut owned = self.owned_pools(spec).await?;
        if owned.is_empty() {
            self.create_pool(spec).await?;
            owned = self.owned_pools(spec).await?;
        }
        let mut owned = owned.into_iter();
        let keep = owned
            .next()
            .ok_or_else(|| CloudError::fatal("cognito-idp:CreateUserPool: the pool vanished"))?;
        for duplicate in owned {
            tracing::warn!(pool = %duplicate, kept = %keep, "deleting a duplicate user pool");
            self.delete_user_pool(&duplicate).await?;
        }
        Ok(keep)
    }

    async fn create_pool(&self, spec: &UserPoolSpec) -> CloudResult<String> {
        let created = self
            .client
            .create_user_pool()
            .pool_name(&spec.name)
            .auto_verified_attributes(VerifiedAttributeType::Email)
            .set_user_pool_tags(Some(spec.tags.iter().cloned().collect()))
            .send()
            .await
            .map_err(|e| classify("cognito-idp:CreateUserPool", &e))?;
        created
            .user_pool()
            .and_then(|pool| pool.id())
            .map(str::to_owned)
            .ok_or_else(|| {
                CloudError::fatal("cognito-idp:CreateUserPool: no pool id in the answer")
            })
    }

    async fn ensure_client(&self, pool_id: &str, spec: &UserPoolSpec) -> CloudResult<String> {
        let name = format!("{}{APP_CLIENT_SUFFIX}", spec.name);
        let clients: Vec<_> = self
            .client
            .list_user_pool_clients()
            .user_pool_id(pool_id)
            .max_results(PAGE_SIZE)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("cognito-idp:ListUserPoolClients", &e))?;
        if let Some(id) = clients
            .iter()
            .find(|c| c.client_name() == Some(name.as_str()))
            .and_then(|c| c.client_id())
        {
            return Ok(id.to_owned());
        }
        let created = self
            .client
            .create_user_pool_client()
            .user_pool_id(pool_id)
            .client_name(&name)
            // WordPress logs in server-side (authorization code flow), so it can keep a secret.
            .generate_secret(true)
            .callback_urls(&spec.callback_url)
            .allowed_o_auth_flows(OAuthFlowType::Code)
            .allowed_o_auth_flows_user_pool_client(true)
            .allowed_o_auth_scopes("openid")
            .allowed_o_auth_scopes("email")
            .allowed_o_auth_scopes("profile")
            .supported_identity_providers("COGNITO")
            .send()
            .await
            .map_err(|e| classify("cognito-idp:CreateUserPoolClient", &e))?;
        created
            .user_pool_client()
            .and_then(|c| c.client_id())
            .map(str::to_owned)
            .ok_or_else(|| {
                CloudError::fatal("cognito-idp:CreateUserPoolClient: no client id in the answer")
            })
    }

    /// The pool's domain as Cognito knows it, `None` if it has none (or the pool is gone).
    async fn pool_domain(&self, pool_id: &str) -> CloudResult<Option<String>> {
        let described = self
            .client
            .describe_user_pool()
            .user_pool_id(pool_id)
            .send()
            .await;
        match described.map_err(|e| classify("cognito-idp:DescribeUserPool", &e)) {
            Ok(out) => Ok(out
                .user_pool()
                .and_then(|pool| pool.domain())
                .filter(|domain| !domain.is_empty())
                .map(str::to_owned)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn ensure_domain(&self, pool_id: &str, prefix: &str) -> CloudResult<String> {
        if let Some(domain) = self.pool_domain(pool_id).await? {
            return Ok(domain);
        }
        // Domain prefixes are global across accounts: one taken by another pool is a conflict.
        let described = self
            .client
            .describe_user_pool_domain()
            .domain(prefix)
            .send()
            .await
            .map_err(|e| classify("cognito-idp:DescribeUserPoolDomain", &e))?;
        match described
            .domain_description()
            .and_then(|d| d.user_pool_id())
        {
            Some(owner) if owner == pool_id => return Ok(prefix.to_owned()),
            Some(_) => {
                return Err(CloudError::new(
                    ErrorKind::Conflict,
                    format!(
                        "cognito-idp:CreateUserPoolDomain: domain {prefix} belongs to another pool"
                    ),
                ));
            }
            None => {}
        }
        self.client
            .create_user_pool_domain()
            .domain(prefix)
            .user_pool_id(pool_id)
            .send()
            .await
            .map_err(|e| classify("cognito-idp:CreateUserPoolDomain", &e))?;
        Ok(prefix.to_owned())
    }

    async fn ensure_groups(&self, pool_id: &str) -> CloudResult<()> {
        for group in GROUPS {
            let created = self
                .client
                .create_group()
                .user_pool_id(pool_id)
                .group_name(group)
                .description(format!("WordPress {group} role"))
                .send()
                .await
                .map_err(|e| classify("cognito-idp:CreateGroup", &e));
            match created {
                // GroupExistsException: made by an earlier attempt.
                Err(error) if error.kind == ErrorKind::Conflict => {}
                other => other.map(drop)?,
            }
        }
        Ok(())
    }

    async fn pool_tagged(&self, pool_id: &str, tags: &Tags) -> CloudResult<bool> {
        Ok(self.pool_tags(pool_id).await?.is_some_and(|have| {
            has_all_tags(have.iter().map(|(k, v)| (k.as_str(), v.as_str())), tags)
        }))
    }

    /// The pool's tags, `None` if it does not exist.
    async fn pool_tags(&self, pool_id: &str) -> CloudResult<Option<Tags>> {
        // DescribeUserPool rather than ListTagsForResource: it needs no ARN, and the
        // emulator answers ListTagsForResource for user pools with HTTP 500.
        let described = self
            .client
            .describe_user_pool()
            .user_pool_id(pool_id)
            .send()
            .await;
        match described.map_err(|e| classify("cognito-idp:DescribeUserPool", &e)) {
            Ok(out) => {
                let have = out.user_pool().and_then(|pool| pool.user_pool_tags());
                let mut tags: Tags = have
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                tags.sort();
                Ok(Some(tags))
            }
            // Deleted between the listing and now.
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }
}

#[async_trait]
impl Identity for AwsIdentity {
    async fn ensure_user_pool(&self, spec: &UserPoolSpec) -> CloudResult<UserPool> {
        let pool_id = self.ensure_pool(spec).await?;
        let client_id = self.ensure_client(&pool_id, spec).await?;
        let domain = self.ensure_domain(&pool_id, &spec.domain_prefix).await?;
        self.ensure_groups(&pool_id).await?;
        Ok(UserPool {
            pool_id,
            client_id,
            domain,
        })
    }

    async fn delete_user_pool(&self, pool_id: &str) -> CloudResult<()> {
        // A pool with a domain cannot be deleted: the domain goes first.
        if let Some(domain) = self.pool_domain(pool_id).await? {
            let result = self
                .client
                .delete_user_pool_domain()
                .domain(domain)
                .user_pool_id(pool_id)
                .send()
                .await
                .map(drop)
                .map_err(|e| classify("cognito-idp:DeleteUserPoolDomain", &e));
            gone_is_ok(result)?;
        }
        let result = self
            .client
            .delete_user_pool()
            .user_pool_id(pool_id)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("cognito-idp:DeleteUserPool", &e));
        gone_is_ok(result)
    }

    async fn find_tagged(&self, tags: &Tags) -> CloudResult<Vec<String>> {
        let mut found = Vec::new();
        for pool in self.all_pools().await? {
            let Some(id) = pool.id() else { continue };
            if self.pool_tagged(id, tags).await? {
                found.push(id.to_owned());
            }
        }
        Ok(found)
    }

    async fn tagged_user_pools(&self, tags: &Tags) -> CloudResult<Vec<TaggedResource>> {
        let mut found = Vec::new();
        for pool in self.all_pools().await? {
            let Some(id) = pool.id() else { continue };
            let Some(have) = self.pool_tags(id).await? else {
                continue;
            };
            if has_all_tags(have.iter().map(|(k, v)| (k.as_str(), v.as_str())), tags) {
                found.push(TaggedResource {
                    kind: "user_pool",
                    id: id.to_owned(),
                    tags: have,
                    created_at: pool
                        .creation_date()
                        .and_then(|at| at.to_millis().ok())
                        .map(Timestamp),
                });
            }
        }
        Ok(found)
    }

    async fn user_pool_exists(&self, pool_id: &str) -> CloudResult<bool> {
        Ok(self.pool_tags(pool_id).await?.is_some())
    }
}
