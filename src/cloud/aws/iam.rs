//! Per-instance IAM task roles: ECS tasks of the environment's account may assume one, and
//! it may mount and write the platform's file system only through its instance's access
//! point.
//!
//! IAM is eventually consistent: a role just created may not be visible to IAM's own next
//! call yet (a `NoSuchEntity` right after `CreateRole` is retried), nor to ECS (see
//! [`ErrorKind::NotYetVisible`]).

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_iam::Client;
use aws_sdk_iam::types::{Role, Tag};
use serde_json::json;

use super::{gone_is_ok, has_all_tags};
use crate::cloud::error::classify;
use crate::cloud::{
    CloudError, CloudResult, ErrorKind, TASK_ROLE_POLICY, TaggedResource, Tags, TaskRoleSpec,
    TaskRoles, not_ours, owned_by,
};

pub struct AwsTaskRoles {
    client: Client,
}

impl AwsTaskRoles {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: Client::new(sdk),
        }
    }

    /// The role, `None` if it does not exist.
    async fn role(&self, name: &str) -> CloudResult<Option<Role>> {
        match self.client.get_role().role_name(name).send().await {
            Ok(out) => Ok(out.role),
            Err(error) => match classify("iam:GetRole", &error) {
                error if error.is_not_found() => Ok(None),
                error => Err(error),
            },
        }
    }

    async fn create(&self, spec: &TaskRoleSpec) -> CloudResult<String> {
        let tags = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CloudError::fatal(format!("iam:CreateRole: {e}")))?;
        let created = self
            .client
            .create_role()
            .role_name(&spec.name)
            .path(&spec.path)
            .description(&spec.description)
            .assume_role_policy_document(trust_policy(&spec.account_id))
            .set_permissions_boundary(spec.permissions_boundary.clone())
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| classify("iam:CreateRole", &e))?;
        created
            .role()
            .map(|role| role.arn().to_owned())
            .ok_or_else(|| CloudError::fatal("iam:CreateRole: no role in the answer"))
    }

    /// Every page of a role's tags (GetRole returns at most 50 of them).
    async fn all_tags(&self, name: &str) -> CloudResult<Tags> {
        let tags: Vec<Tag> = self
            .client
            .list_role_tags()
            .role_name(name)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("iam:ListRoleTags", &e))?;
        Ok(tags
            .into_iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect())
    }
}

/// Only ECS tasks, and only on behalf of `account_id` (the confused-deputy guard AWS
/// recommends for service roles).
pub fn trust_policy(account_id: &str) -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Service": "ecs-tasks.amazonaws.com" },
            "Action": "sts:AssumeRole",
            "Condition": { "StringEquals": { "aws:SourceAccount": account_id } }
        }]
    })
    .to_string()
}

/// Mount and write the file system, only through `access_point_arn` (no root access).
pub fn file_system_policy(file_system_arn: &str, access_point_arn: &str) -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "OwnAccessPointOnly",
            "Effect": "Allow",
            "Action": ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"],
            "Resource": file_system_arn,
            "Condition": {
                "StringEquals": { "elasticfilesystem:AccessPointArn": access_point_arn }
            }
        }]
    })
    .to_string()
}

#[async_trait]
impl TaskRoles for AwsTaskRoles {
    async fn ensure_task_role(&self, spec: &TaskRoleSpec) -> CloudResult<String> {
        let (arn, created) = match self.role(&spec.name).await? {
            Some(role) => (role.arn().to_owned(), false),
            None => match self.create(spec).await {
                Ok(arn) => (arn, true),
                // A replica (or our own earlier attempt) made it meanwhile: check it below.
                Err(error) if error.kind == ErrorKind::Conflict => {
                    let role = self.role(&spec.name).await?.ok_or(error)?;
                    (role.arn().to_owned(), false)
                }
                Err(error) => return Err(error),
            },
        };
        if !created {
            let tags = self.all_tags(&spec.name).await?;
            if !owned_by(
                tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                &spec.tags,
            ) {
                return Err(not_ours(&format!("IAM role {}", spec.name)));
            }
        }
        let put = self
            .client
            .put_role_policy()
            .role_name(&spec.name)
            .policy_name(TASK_ROLE_POLICY)
            .policy_document(file_system_policy(
                &spec.file_system_arn,
                &spec.access_point_arn,
            ))
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("iam:PutRolePolicy", &e));
        match put {
            // IAM has not propagated the role it just created to this call yet.
            Err(error) if created && error.is_not_found() => Err(CloudError::new(
                ErrorKind::Retryable,
                format!("{error} (the role was created a moment ago)"),
            )),
            Err(error) => Err(error),
            Ok(()) => Ok(arn),
        }
    }

    async fn delete_task_role(&self, name: &str) -> CloudResult<()> {
        let inline: CloudResult<Vec<String>> = self
            .client
            .list_role_policies()
            .role_name(name)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("iam:ListRolePolicies", &e));
        let inline = match inline {
            Err(error) if error.is_not_found() => return Ok(()),
            other => other?,
        };
        for policy in inline {
            let result = self
                .client
                .delete_role_policy()
                .role_name(name)
                .policy_name(&policy)
                .send()
                .await
                .map(drop)
                .map_err(|e| classify("iam:DeleteRolePolicy", &e));
            gone_is_ok(result)?;
        }
        // We attach none; one attached by hand would block DeleteRole.
        let attached: CloudResult<Vec<_>> = self
            .client
            .list_attached_role_policies()
            .role_name(name)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("iam:ListAttachedRolePolicies", &e));
        let attached = match attached {
            Err(error) if error.is_not_found() => return Ok(()),
            other => other?,
        };
        for policy in attached {
            let Some(policy_arn) = policy.policy_arn() else {
                continue;
            };
            let result = self
                .client
                .detach_role_policy()
                .role_name(name)
                .policy_arn(policy_arn)
                .send()
                .await
                .map(drop)
                .map_err(|e| classify("iam:DetachRolePolicy", &e));
            gone_is_ok(result)?;
        }
        let result = self
            .client
            .delete_role()
            .role_name(name)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("iam:DeleteRole", &e));
        gone_is_ok(result)
    }

    async fn role_tags(&self, name: &str) -> CloudResult<Option<Tags>> {
        if self.role(name).await?.is_none() {
            return Ok(None);
        }
        match self.all_tags(name).await {
            Ok(tags) => Ok(Some(tags)),
            // Deleted between the two calls.
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn tagged_roles(
        &self,
        path_prefix: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        // ListRoles returns no tags: each role under the path is asked for its own.
        let roles: Vec<Role> = self
            .client
            .list_roles()
            .path_prefix(path_prefix)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("iam:ListRoles", &e))?;
        let mut found = Vec::new();
        for role in roles {
            let have = match self.all_tags(role.role_name()).await {
                Ok(have) => have,
                Err(error) if error.is_not_found() => continue,
                Err(error) => return Err(error),
            };
            if !has_all_tags(have.iter().map(|(k, v)| (k.as_str(), v.as_str())), tags) {
                continue;
            }
            found.push(TaggedResource {
                kind: "task_role",
                id: role.role_name().to_owned(),
                tags: have,
                created_at: role
                    .create_date()
                    .to_millis()
                    .ok()
                    .map(crate::domain::Timestamp),
            });
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_name_the_account_the_file_system_and_the_access_point() {
        let trust: serde_json::Value = serde_json::from_str(&trust_policy("111122223333")).unwrap();
        let statement = &trust["Statement"][0];
        assert_eq!(statement["Principal"]["Service"], "ecs-tasks.amazonaws.com");
        assert_eq!(statement["Action"], "sts:AssumeRole");
        assert_eq!(
            statement["Condition"]["StringEquals"]["aws:SourceAccount"],
            "111122223333"
        );
        let policy: serde_json::Value =
            serde_json::from_str(&file_system_policy("arn:fs", "arn:ap")).unwrap();
        let statements = policy["Statement"].as_array().unwrap();
        assert_eq!(statements.len(), 1);
        assert_eq!(statements[0]["Effect"], "Allow");
        assert_eq!(statements[0]["Resource"], "arn:fs");
        assert_eq!(
            statements[0]["Condition"]["StringEquals"]["elasticfilesystem:AccessPointArn"],
            "arn:ap"
        );
        // No root access.
        assert_eq!(
            statements[0]["Action"],
            json!([
                "elasticfilesystem:ClientMount",
                "elasticfilesystem:ClientWrite"
            ])
        );
    }
}
