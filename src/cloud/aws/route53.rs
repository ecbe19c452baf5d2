//! DNS records in an environment's Route53 hosted zones: the instances' alias records and
//! the certificate validation records of managed customer zones.
//!
//! Route53 is a global service: its API lives in us-east-1 whatever the environment's
//! region. On the wire names are fully qualified with a trailing dot, and come back with
//! characters other than `a-z 0-9 - _ .` escaped as `\NNN` (octal; `\052` for `*`): names
//! are normalised (lower case, unescaped, no trailing dot) before they are compared or
//! returned. An UPSERT is idempotent; a DELETE must repeat the record set exactly as it is,
//! so it is read first, and a change in between makes the DELETE fail with
//! `InvalidChangeBatch` (read again). `PriorRequestNotComplete` and `Throttling` are
//! retryable. A change is PENDING until every Route53 name server has it (INSYNC).

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_route53::Client;
use aws_sdk_route53::config::Region;
use aws_sdk_route53::types::{
    AliasTarget, Change, ChangeAction, ChangeBatch, ChangeStatus, ResourceRecord,
    ResourceRecordSet, RrType,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::cloud::error::classify;
use crate::cloud::{CloudError, CloudResult, Dns, DnsRecordSet, ErrorKind};

/// The region of Route53's API (a global service).
const ROUTE53_REGION: &str = "us-east-1";

/// TTL of plain records (alias records have none).
const RECORD_TTL: i64 = 300;

/// How often a DELETE is re-read and repeated after the record changed under it.
const DELETE_ATTEMPTS: usize = 3;

pub struct Route53Dns {
    client: Client,
}

impl Route53Dns {
    pub fn new(sdk: &SdkConfig) -> Self {
        let config = aws_sdk_route53::config::Builder::from(sdk)
            .region(Region::from_static(ROUTE53_REGION))
            .interceptor(crate::telemetry::AwsRequestIds)
            .build();
        Self {
            client: Client::from_conf(config),
        }
    }

    /// The record set `name` of `record_type` as Route53 holds it, `None` if there is none.
    async fn record_set(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
    ) -> CloudResult<Option<ResourceRecordSet>> {
        let want = normalise_name(name);
        let rr_type = RrType::from(record_type);
        // Record sets are listed in order of (reversed) name and type from the start
        // given: the first one is ours if it exists.
        let answer = self
            .client
            .list_resource_record_sets()
            .hosted_zone_id(bare_zone_id(zone_id))
            .start_record_name(fqdn(&want))
            .start_record_type(rr_type.clone())
            .max_items(1)
            .send()
            .await
            .map_err(|e| classify_route53("route53:ListResourceRecordSets", &e))?;
        Ok(answer
            .resource_record_sets()
            .iter()
            .find(|set| normalise_name(set.name()) == want && set.r#type() == &rr_type)
            .cloned())
    }

    /// Sends one change of one record set; returns the change id.
    async fn change(
        &self,
        zone_id: &str,
        action: ChangeAction,
        set: ResourceRecordSet,
    ) -> CloudResult<String> {
        let deleting = action == ChangeAction::Delete;
        let change = Change::builder()
            .action(action)
            .resource_record_set(set)
            .build()
            .map_err(|e| CloudError::fatal(format!("route53:ChangeResourceRecordSets: {e}")))?;
        let batch = ChangeBatch::builder()
            .changes(change)
            .build()
            .map_err(|e| CloudError::fatal(format!("route53:ChangeResourceRecordSets: {e}")))?;
        let answer = self
            .client
            .change_resource_record_sets()
            .hosted_zone_id(bare_zone_id(zone_id))
            .change_batch(batch)
            .send()
            .await
            .map_err(|e| {
                classify_route53_change("route53:ChangeResourceRecordSets", &e, deleting)
            })?;
        Ok(answer
            .change_info()
            .map(|info| bare_change_id(info.id()).to_owned())
            .unwrap_or_default())
    }
}

/// Lower case, `\NNN` escapes decoded, no trailing dot.
pub fn normalise_name(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|b| (b'0'..=b'7').contains(b))
            && let Ok(byte) = u8::try_from(
                digits
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')),
            )
        {
            out.push(byte);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

/// The name as the API takes it: fully qualified, with the trailing dot.
fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// A hosted zone id without the `/hostedzone/` prefix some answers carry.
fn bare_zone_id(zone_id: &str) -> &str {
    zone_id.strip_prefix("/hostedzone/").unwrap_or(zone_id)
}

/// A change id without the `/change/` prefix ChangeResourceRecordSets answers with.
fn bare_change_id(change_id: &str) -> &str {
    change_id.strip_prefix("/change/").unwrap_or(change_id)
}

/// Route53's codes that mean something particular here, besides [`classify`]'s rules.
/// `deleting`: an `InvalidChangeBatch` answering a DELETE means the record set is no longer
/// what was read (changed or removed meanwhile): read it again.
fn route53_kind(code: &str, kind: ErrorKind, deleting: bool) -> ErrorKind {
    match code {
        "NoSuchHostedZone" | "NoSuchChange" => ErrorKind::NotFound,
        "InvalidChangeBatch" if deleting => ErrorKind::Retryable,
        "PriorRequestNotComplete" | "Throttling" => ErrorKind::Retryable,
        _ => kind,
    }
}

fn classify_route53<E>(what: &str, error: &SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    classify_route53_change(what, error, false)
}

fn classify_route53_change<E>(
    what: &str,
    error: &SdkError<E, HttpResponse>,
    deleting: bool,
) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut classified = classify(what, error);
    if let SdkError::ServiceError(service) = error
        && let Some(code) = service.err().code()
    {
        classified.kind = route53_kind(code, classified.kind, deleting);
    }
    classified
}

fn to_record_set(set: &ResourceRecordSet) -> DnsRecordSet {
    let (value, alias_zone_id) = match set.alias_target() {
        Some(alias) => (
            normalise_name(alias.dns_name()),
            Some(alias.hosted_zone_id().to_owned()),
        ),
        None => (
            set.resource_records()
                .first()
                .map(|record| record.value().trim_end_matches('.').to_owned())
                .unwrap_or_default(),
            None,
        ),
    };
    DnsRecordSet {
        name: normalise_name(set.name()),
        record_type: set.r#type().as_str().to_owned(),
        value,
        alias_zone_id,
    }
}

fn invalid(what: &str, error: impl std::fmt::Display) -> CloudError {
    CloudError::fatal(format!("{what}: {error}"))
}

#[async_trait]
impl Dns for Route53Dns {
    async fn upsert_alias(
        &self,
        zone_id: &str,
        name: &str,
        target_dns_name: &str,
        target_zone_id: &str,
    ) -> CloudResult<String> {
        const WHAT: &str = "route53:ChangeResourceRecordSets";
        let alias = AliasTarget::builder()
            .hosted_zone_id(target_zone_id)
            .dns_name(fqdn(target_dns_name))
            .evaluate_target_health(false)
            .build()
            .map_err(|e| invalid(WHAT, e))?;
        // An alias record has no TTL: Route53 uses the target's.
        let set = ResourceRecordSet::builder()
            .name(fqdn(&normalise_name(name)))
            .r#type(RrType::A)
            .alias_target(alias)
            .build()
            .map_err(|e| invalid(WHAT, e))?;
        self.change(zone_id, ChangeAction::Upsert, set).await
    }

    async fn upsert_record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
        value: &str,
    ) -> CloudResult<String> {
        const WHAT: &str = "route53:ChangeResourceRecordSets";
        let record = ResourceRecord::builder()
            .value(value)
            .build()
            .map_err(|e| invalid(WHAT, e))?;
        let set = ResourceRecordSet::builder()
            .name(fqdn(&normalise_name(name)))
            .r#type(RrType::from(record_type))
            .ttl(RECORD_TTL)
            .resource_records(record)
            .build()
            .map_err(|e| invalid(WHAT, e))?;
        self.change(zone_id, ChangeAction::Upsert, set).await
    }

    async fn delete_record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
    ) -> CloudResult<Option<String>> {
        let mut last = None;
        for _ in 0..DELETE_ATTEMPTS {
            let Some(set) = self.record_set(zone_id, name, record_type).await? else {
                return Ok(None);
            };
            match self.change(zone_id, ChangeAction::Delete, set).await {
                Ok(change_id) => return Ok(Some(change_id)),
                // Changed or removed since it was read: read it again.
                Err(error) if is_changed_meanwhile(&error) => last = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(last.unwrap_or_else(|| {
            CloudError::new(
                ErrorKind::Retryable,
                "route53:ChangeResourceRecordSets: no attempt",
            )
        }))
    }

    async fn change_in_sync(&self, change_id: &str) -> CloudResult<bool> {
        let answer = self
            .client
            .get_change()
            .id(bare_change_id(change_id))
            .send()
            .await
            .map_err(|e| classify_route53("route53:GetChange", &e))?;
        Ok(answer
            .change_info()
            .is_some_and(|info| info.status() == &ChangeStatus::Insync))
    }

    async fn record(
        &self,
        zone_id: &str,
        name: &str,
        record_type: &str,
    ) -> CloudResult<Option<DnsRecordSet>> {
        Ok(self
            .record_set(zone_id, name, record_type)
            .await?
            .as_ref()
            .map(to_record_set))
    }
}

/// A DELETE refused because the record set is no longer what was read.
fn is_changed_meanwhile(error: &CloudError) -> bool {
    error.kind == ErrorKind::Retryable && error.message.contains(": InvalidChangeBatch:")
}
