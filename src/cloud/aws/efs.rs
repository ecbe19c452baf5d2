//! Tenant access points on an environment's EFS file system.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_efs::Client;
use aws_sdk_efs::types::{
    AccessPointDescription, CreationInfo, LifeCycleState, PosixUser, RootDirectory, Tag,
};

use super::{gone_is_ok, has_all_tags};
use crate::cloud::error::classify;
use crate::cloud::{
    AccessPointSpec, CloudError, CloudResult, Files, TaggedResource, Tags, owned_by,
};

pub struct AwsFiles {
    client: Client,
}

impl AwsFiles {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: super::traced_client!(aws_sdk_efs, sdk),
        }
    }

    /// Every access point on the file system that is not on its way out.
    async fn live_access_points(
        &self,
        file_system_id: &str,
    ) -> CloudResult<Vec<AccessPointDescription>> {
        let all = self
            .client
            .describe_access_points()
            .file_system_id(file_system_id)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("efs:DescribeAccessPoints", &e))?;
        Ok(all.into_iter().filter(is_live).collect())
    }

    /// An access point made earlier for this spec: same client token, or (if it was made
    /// by hand or with an older token) the same tags; in both cases owned by the spec's
    /// instance (its owner tags), never a sibling instance's.
    async fn find_existing(&self, spec: &AccessPointSpec) -> CloudResult<Option<String>> {
        let found = self
            .live_access_points(&spec.file_system_id)
            .await?
            .into_iter()
            .find(|ap| {
                (ap.client_token() == Some(spec.client_token.as_str()) || carries(ap, &spec.tags))
                    && owned_by(ap.tags().iter().map(|t| (t.key(), t.value())), &spec.tags)
            });
        Ok(found.and_then(|ap| ap.access_point_id().map(str::to_owned)))
    }

    async fn create(&self, spec: &AccessPointSpec) -> CloudResult<String> {
        let invalid = |e: aws_sdk_efs::error::BuildError| {
            CloudError::fatal(format!("efs:CreateAccessPoint: {e}"))
        };
        let posix_user = PosixUser::builder()
            .uid(spec.uid.into())
            .gid(spec.gid.into())
            .build()
            .map_err(invalid)?;
        let creation_info = CreationInfo::builder()
            .owner_uid(spec.uid.into())
            .owner_gid(spec.gid.into())
            .permissions(&spec.permissions)
            .build()
            .map_err(invalid)?;
        let root = RootDirectory::builder()
            .path(&spec.root_path)
            .creation_info(creation_info)
            .build();
        let tags = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let created = self
            .client
            .create_access_point()
            .client_token(&spec.client_token)
            .file_system_id(&spec.file_system_id)
            .posix_user(posix_user)
            .root_directory(root)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| classify("efs:CreateAccessPoint", &e))?;
        created.access_point_id().map(str::to_owned).ok_or_else(|| {
            CloudError::fatal("efs:CreateAccessPoint: no access point id in the answer")
        })
    }
}

fn is_live(ap: &AccessPointDescription) -> bool {
    !matches!(
        ap.life_cycle_state(),
        Some(LifeCycleState::Deleting | LifeCycleState::Deleted)
    )
}

fn carries(ap: &AccessPointDescription, tags: &Tags) -> bool {
    has_all_tags(ap.tags().iter().map(|t| (t.key(), t.value())), tags)
}

#[async_trait]
impl Files for AwsFiles {
    async fn ensure_access_point(&self, spec: &AccessPointSpec) -> CloudResult<String> {
        if let Some(id) = self.find_existing(spec).await? {
            return Ok(id);
        }
        match self.create(spec).await {
            // A replica racing us with the same client token won; its access point is ours.
            Err(error) if error.kind == crate::cloud::ErrorKind::Conflict => {
                self.find_existing(spec).await?.ok_or(error)
            }
            other => other,
        }
    }

    async fn delete_access_point(&self, access_point_id: &str) -> CloudResult<()> {
        let result = self
            .client
            .delete_access_point()
            .access_point_id(access_point_id)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("efs:DeleteAccessPoint", &e));
        gone_is_ok(result)
    }

    async fn access_point_state(&self, access_point_id: &str) -> CloudResult<Option<String>> {
        let answer = self
            .client
            .describe_access_points()
            .access_point_id(access_point_id)
            .send()
            .await
            .map_err(|e| classify("efs:DescribeAccessPoints", &e));
        match answer {
            Ok(out) => Ok(out
                .access_points()
                .first()
                .and_then(|ap| ap.life_cycle_state())
                .map(|state| state.as_str().to_owned())),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn find_tagged(&self, file_system_id: &str, tags: &Tags) -> CloudResult<Vec<String>> {
        Ok(self
            .live_access_points(file_system_id)
            .await?
            .iter()
            .filter(|ap| carries(ap, tags))
            .filter_map(|ap| ap.access_point_id().map(str::to_owned))
            .collect())
    }

    async fn tagged_access_points(
        &self,
        file_system_id: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        Ok(self
            .live_access_points(file_system_id)
            .await?
            .iter()
            .filter(|ap| carries(ap, tags))
            .filter_map(|ap| {
                Some(TaggedResource {
                    kind: "access_point",
                    id: ap.access_point_id()?.to_owned(),
                    tags: ap
                        .tags()
                        .iter()
                        .map(|t| (t.key().to_owned(), t.value().to_owned()))
                        .collect(),
                    // DescribeAccessPoints tells no creation time.
                    created_at: None,
                })
            })
            .collect())
    }
}
