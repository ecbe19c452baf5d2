//! Tenant secrets in Secrets Manager. Secret values never appear in logs or error messages:
//! errors carry only the operation, the AWS error code and AWS's own message.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType, SecretListEntry, Tag};

use super::{gone_is_ok, has_all_tags};
use crate::cloud::error::classify;
use crate::cloud::settings::Secret;
use crate::cloud::{
    CloudError, CloudResult, ErrorKind, SecretSpec, Secrets, TaggedResource, Tags, not_ours,
    owned_by,
};

pub struct AwsSecrets {
    client: Client,
}

impl AwsSecrets {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: super::traced_client!(aws_sdk_secretsmanager, sdk),
        }
    }

    /// The ARN of the secret named `name`, `None` if there is none. A secret scheduled for
    /// deletion (by hand, with a recovery window) is restored: we are about to use it. A
    /// secret that `owner` (a spec's tags) does not own is refused, never restored.
    async fn existing_arn(&self, name: &str, owner: &Tags) -> CloudResult<Option<String>> {
        let described = self.client.describe_secret().secret_id(name).send().await;
        let secret = match described.map_err(|e| classify("secretsmanager:DescribeSecret", &e)) {
            Ok(secret) => secret,
            Err(error) if error.is_not_found() => return Ok(None),
            Err(error) => return Err(error),
        };
        let arn = secret
            .arn()
            .ok_or_else(|| {
                CloudError::fatal("secretsmanager:DescribeSecret: no ARN in the answer")
            })?
            .to_owned();
        let tags = secret
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?, t.value()?)));
        if !owned_by(tags, owner) {
            return Err(not_ours(&format!("secret {name}")));
        }
        if secret.deleted_date().is_some() {
            self.client
                .restore_secret()
                .secret_id(&arn)
                .send()
                .await
                .map_err(|e| classify("secretsmanager:RestoreSecret", &e))?;
        }
        Ok(Some(arn))
    }

    async fn create(&self, spec: &SecretSpec) -> CloudResult<String> {
        let tags = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build());
        let created = self
            .client
            .create_secret()
            .name(&spec.name)
            .description(&spec.description)
            .secret_string(spec.value.expose())
            .set_tags(Some(tags.collect()))
            .send()
            .await
            .map_err(|e| classify("secretsmanager:CreateSecret", &e))?;
        created
            .arn()
            .map(str::to_owned)
            .ok_or_else(|| CloudError::fatal("secretsmanager:CreateSecret: no ARN in the answer"))
    }

    /// Reads and adopts an existing secret, whose value wins over the one in `spec`.
    async fn adopt(&self, name: &str, owner: &Tags) -> CloudResult<Option<(String, Secret)>> {
        let Some(arn) = self.existing_arn(name, owner).await? else {
            return Ok(None);
        };
        let value = self.read_secret(&arn).await?;
        Ok(Some((arn, value)))
    }
}

fn carries(entry: &SecretListEntry, tags: &Tags) -> bool {
    let pairs = entry
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value()?)));
    has_all_tags(pairs, tags)
}

#[async_trait]
impl Secrets for AwsSecrets {
    async fn ensure_secret(&self, spec: &SecretSpec) -> CloudResult<(String, Secret)> {
        if let Some(adopted) = self.adopt(&spec.name, &spec.tags).await? {
            return Ok(adopted);
        }
        match self.create(spec).await {
            Ok(arn) => Ok((arn, spec.value.clone())),
            // Another replica created it between our read and our create: its value wins.
            Err(error) if error.kind == ErrorKind::Conflict => {
                self.adopt(&spec.name, &spec.tags).await?.ok_or(error)
            }
            Err(error) => Err(error),
        }
    }

    async fn read_secret(&self, name_or_arn: &str) -> CloudResult<Secret> {
        let answer = self
            .client
            .get_secret_value()
            .secret_id(name_or_arn)
            .send()
            .await
            .map_err(|e| classify("secretsmanager:GetSecretValue", &e))?;
        answer.secret_string().map(Secret::new).ok_or_else(|| {
            CloudError::fatal(format!(
                "secretsmanager:GetSecretValue: {name_or_arn} holds no string"
            ))
        })
    }

    async fn delete_secret(&self, name_or_arn: &str) -> CloudResult<()> {
        let result = self
            .client
            .delete_secret()
            .secret_id(name_or_arn)
            .force_delete_without_recovery(true)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("secretsmanager:DeleteSecret", &e));
        gone_is_ok(result)
    }

    async fn secret_tags(&self, name_or_arn: &str) -> CloudResult<Option<Tags>> {
        let described = self
            .client
            .describe_secret()
            .secret_id(name_or_arn)
            .send()
            .await;
        match described.map_err(|e| classify("secretsmanager:DescribeSecret", &e)) {
            Ok(secret) if secret.deleted_date().is_none() => Ok(Some(
                secret
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                    .collect(),
            )),
            Ok(_) => Ok(None),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn find_tagged(&self, tags: &Tags) -> CloudResult<Vec<String>> {
        Ok(self
            .tagged_secrets(tags)
            .await?
            .into_iter()
            .map(|secret| secret.id)
            .collect())
    }

    async fn tagged_secrets(&self, tags: &Tags) -> CloudResult<Vec<TaggedResource>> {
        // The service filters on one key and one value (by prefix, independently); the
        // exact check of every tag happens here.
        let mut request = self.client.list_secrets();
        if let Some((key, value)) = tags.first() {
            request = request
                .filters(
                    Filter::builder()
                        .key(FilterNameStringType::TagKey)
                        .values(key)
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .key(FilterNameStringType::TagValue)
                        .values(value)
                        .build(),
                );
        }
        let pages = request
            .into_paginator()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("secretsmanager:ListSecrets", &e))?;
        Ok(pages
            .iter()
            .flat_map(|page| page.secret_list())
            .filter(|entry| entry.deleted_date().is_none() && carries(entry, tags))
            .filter_map(|entry| {
                Some(TaggedResource {
                    kind: "secret",
                    id: entry.arn()?.to_owned(),
                    tags: entry
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                        .collect(),
                    created_at: entry
                        .created_date()
                        .and_then(|at| at.to_millis().ok())
                        .map(crate::domain::Timestamp),
                })
            })
            .collect())
    }
}
