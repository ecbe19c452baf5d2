//! A [`Compute`] that changes some calls of a real one (to inject the states AWS goes
//! through and moto does not): implement [`ComputeChanges`] with `inner` and the calls to
//! change; every other call goes to the inner adapter as it is. Use it as
//! `Arc::new(Changed(changes))`.

use async_trait::async_trait;
use instance_manager::cloud::{
    CloudResult, Compute, OneOffTaskSpec, ServiceSpec, ServiceStatus, TaggedResource, Tags,
    TaskDefinitionInfo, TaskDefinitionSpec, TaskStatus,
};

#[async_trait]
pub trait ComputeChanges: Send + Sync {
    /// The adapter every unchanged call goes to.
    fn inner(&self) -> &dyn Compute;

    async fn register_task_definition(&self, spec: &TaskDefinitionSpec) -> CloudResult<String> {
        self.inner().register_task_definition(spec).await
    }
    async fn deregister_task_definitions(&self, family: &str) -> CloudResult<()> {
        self.inner().deregister_task_definitions(family).await
    }
    async fn ensure_service(&self, spec: &ServiceSpec) -> CloudResult<String> {
        self.inner().ensure_service(spec).await
    }
    async fn service_status(
        &self,
        cluster: &str,
        name: &str,
    ) -> CloudResult<Option<ServiceStatus>> {
        self.inner().service_status(cluster, name).await
    }
    async fn update_service(
        &self,
        cluster: &str,
        name: &str,
        desired_count: Option<u32>,
        task_definition_arn: Option<&str>,
        force_new_deployment: bool,
    ) -> CloudResult<()> {
        self.inner()
            .update_service(
                cluster,
                name,
                desired_count,
                task_definition_arn,
                force_new_deployment,
            )
            .await
    }
    async fn delete_service(&self, cluster: &str, name: &str) -> CloudResult<()> {
        self.inner().delete_service(cluster, name).await
    }
    async fn run_task(&self, spec: &OneOffTaskSpec) -> CloudResult<String> {
        self.inner().run_task(spec).await
    }
    async fn task_status(&self, cluster: &str, task_arn: &str) -> CloudResult<Option<TaskStatus>> {
        self.inner().task_status(cluster, task_arn).await
    }
    async fn find_tagged(&self, cluster: &str, tags: &Tags) -> CloudResult<Vec<String>> {
        self.inner().find_tagged(cluster, tags).await
    }
    async fn service_tags(&self, cluster: &str, name: &str) -> CloudResult<Option<Tags>> {
        self.inner().service_tags(cluster, name).await
    }
    async fn delete_task_definitions(&self, family: &str, owner: &Tags) -> CloudResult<()> {
        self.inner().delete_task_definitions(family, owner).await
    }
    async fn tagged_services(
        &self,
        cluster: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        self.inner().tagged_services(cluster, tags).await
    }
    async fn tagged_task_families(
        &self,
        family_prefix: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        self.inner().tagged_task_families(family_prefix, tags).await
    }
    async fn task_definition(&self, arn: &str) -> CloudResult<Option<TaskDefinitionInfo>> {
        self.inner().task_definition(arn).await
    }
}

/// The [`Compute`] a [`ComputeChanges`] makes.
pub struct Changed<T>(pub T);

#[async_trait]
impl<T: ComputeChanges> Compute for Changed<T> {
    async fn register_task_definition(&self, spec: &TaskDefinitionSpec) -> CloudResult<String> {
        self.0.register_task_definition(spec).await
    }
    async fn deregister_task_definitions(&self, family: &str) -> CloudResult<()> {
        self.0.deregister_task_definitions(family).await
    }
    async fn ensure_service(&self, spec: &ServiceSpec) -> CloudResult<String> {
        self.0.ensure_service(spec).await
    }
    async fn service_status(
        &self,
        cluster: &str,
        name: &str,
    ) -> CloudResult<Option<ServiceStatus>> {
        self.0.service_status(cluster, name).await
    }
    async fn update_service(
        &self,
        cluster: &str,
        name: &str,
        desired_count: Option<u32>,
        task_definition_arn: Option<&str>,
        force_new_deployment: bool,
    ) -> CloudResult<()> {
        self.0
            .update_service(
                cluster,
                name,
                desired_count,
                task_definition_arn,
                force_new_deployment,
            )
            .await
    }
    async fn delete_service(&self, cluster: &str, name: &str) -> CloudResult<()> {
        self.0.delete_service(cluster, name).await
    }
    async fn run_task(&self, spec: &OneOffTaskSpec) -> CloudResult<String> {
        self.0.run_task(spec).await
    }
    async fn task_status(&self, cluster: &str, task_arn: &str) -> CloudResult<Option<TaskStatus>> {
        self.0.task_status(cluster, task_arn).await
    }
    async fn find_tagged(&self, cluster: &str, tags: &Tags) -> CloudResult<Vec<String>> {
        self.0.find_tagged(cluster, tags).await
    }
    async fn service_tags(&self, cluster: &str, name: &str) -> CloudResult<Option<Tags>> {
        self.0.service_tags(cluster, name).await
    }
    async fn delete_task_definitions(&self, family: &str, owner: &Tags) -> CloudResult<()> {
        self.0.delete_task_definitions(family, owner).await
    }
    async fn tagged_services(
        &self,
        cluster: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        self.0.tagged_services(cluster, tags).await
    }
    async fn tagged_task_families(
        &self,
        family_prefix: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        self.0.tagged_task_families(family_prefix, tags).await
    }
    async fn task_definition(&self, arn: &str) -> CloudResult<Option<TaskDefinitionInfo>> {
        self.0.task_definition(arn).await
    }
}
