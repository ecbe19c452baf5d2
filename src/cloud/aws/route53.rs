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

#[cfg(test)]
mod tests {
    use aws_sdk_route53::operation::change_resource_record_sets::ChangeResourceRecordSetsError;
    use aws_sdk_route53::operation::list_resource_record_sets::ListResourceRecordSetsError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    use super::*;

    fn answer<E>(error: E, status: u16) -> SdkError<E, HttpResponse> {
        SdkError::service_error(
            error,
            Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty()),
        )
    }

    fn change_error(
        code: &str,
        status: u16,
    ) -> SdkError<ChangeResourceRecordSetsError, HttpResponse> {
        let meta = ErrorMetadata::builder().code(code).message("m").build();
        answer(ChangeResourceRecordSetsError::generic(meta), status)
    }

    #[test]
    fn names_are_compared_unescaped_lower_case_and_without_the_trailing_dot() {
        assert_eq!(normalise_name("\\052.example.com."), "*.example.com");
        assert_eq!(normalise_name("Acme.Example.COM."), "acme.example.com");
        assert_eq!(normalise_name("acme.example.com"), "acme.example.com");
        assert_eq!(normalise_name("a\\100b.example."), "a@b.example");
        // Not an escape: left as it is.
        assert_eq!(normalise_name("a\\9.example"), "a\\9.example");
        assert_eq!(normalise_name("a\\05"), "a\\05");
        assert_eq!(fqdn("acme.example.com"), "acme.example.com.");
        assert_eq!(fqdn("acme.example.com."), "acme.example.com.");
    }

    #[test]
    fn ids_are_taken_with_or_without_their_path() {
        assert_eq!(bare_change_id("/change/C2682N5HXP0BZ4"), "C2682N5HXP0BZ4");
        assert_eq!(bare_change_id("C2682N5HXP0BZ4"), "C2682N5HXP0BZ4");
        assert_eq!(bare_zone_id("/hostedzone/Z1D633PJN98FT9"), "Z1D633PJN98FT9");
        assert_eq!(bare_zone_id("Z1D633PJN98FT9"), "Z1D633PJN98FT9");
    }

    #[test]
    fn route53_errors_are_classified() {
        const WHAT: &str = "route53:ChangeResourceRecordSets";
        // Another change of the zone is still being applied; throttled.
        for code in ["PriorRequestNotComplete", "Throttling"] {
            let error = classify_route53_change(WHAT, &change_error(code, 400), false);
            assert_eq!(error.kind, ErrorKind::Retryable, "{code}");
        }
        // A DELETE that no longer matches the record set: read again. Elsewhere the batch
        // itself is wrong.
        let deleting =
            classify_route53_change(WHAT, &change_error("InvalidChangeBatch", 400), true);
        assert_eq!(deleting.kind, ErrorKind::Retryable);
        assert!(is_changed_meanwhile(&deleting));
        let upserting =
            classify_route53_change(WHAT, &change_error("InvalidChangeBatch", 400), false);
        assert_eq!(upserting.kind, ErrorKind::Fatal);
        assert!(!is_changed_meanwhile(&upserting));
        let zone_gone = classify_route53_change(WHAT, &change_error("NoSuchHostedZone", 404), true);
        assert_eq!(zone_gone.kind, ErrorKind::NotFound);
        assert!(!is_changed_meanwhile(&zone_gone));
        let listing = answer(
            ListResourceRecordSetsError::generic(
                ErrorMetadata::builder().code("NoSuchHostedZone").build(),
            ),
            404,
        );
        let error = classify_route53("route53:ListResourceRecordSets", &listing);
        assert_eq!(error.kind, ErrorKind::NotFound);
        assert!(
            error
                .message
                .starts_with("route53:ListResourceRecordSets: NoSuchHostedZone")
        );
        assert_eq!(
            classify_route53_change(WHAT, &change_error("InvalidInput", 400), false).kind,
            ErrorKind::Fatal
        );
    }

    #[test]
    fn record_sets_are_reported_normalised() {
        let alias = ResourceRecordSet::builder()
            .name("\\052.acme.example.com.")
            .r#type(RrType::A)
            .alias_target(
                AliasTarget::builder()
                    .hosted_zone_id("Z35SXDOTRQ7X7K")
                    .dns_name("Dualstack.My-ALB-1.us-east-1.elb.amazonaws.com.")
                    .evaluate_target_health(false)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        assert_eq!(
            to_record_set(&alias),
            DnsRecordSet {
                name: "*.acme.example.com".into(),
                record_type: "A".into(),
                value: "dualstack.my-alb-1.us-east-1.elb.amazonaws.com".into(),
                alias_zone_id: Some("Z35SXDOTRQ7X7K".into()),
            }
        );
        let cname = ResourceRecordSet::builder()
            .name("_abc.shop.example.")
            .r#type(RrType::Cname)
            .ttl(300)
            .resource_records(
                ResourceRecord::builder()
                    .value("_def.acm-validations.aws.")
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let plain = to_record_set(&cname);
        assert_eq!(plain.value, "_def.acm-validations.aws");
        assert_eq!(plain.alias_zone_id, None);
    }
}
