//! ACM certificates for custom domains, validated through DNS, in the environment's region
//! (a load balancer can only use certificates of its own region).
//!
//! RequestCertificate takes an idempotency token (at most 32 word characters; the same
//! token within an hour answers with the same certificate) and the tags. DescribeCertificate
//! leaves `DomainValidationOptions[].ResourceRecord` out for several seconds after the
//! request: the validation record is then `None` and the caller waits. ACM refuses to
//! delete a certificate a load balancer still uses (`ResourceInUseException`), and ELB lets
//! go of a certificate removed from a listener asynchronously: that refusal is retryable.
//! ListCertificates shows only RSA_2048 certificates unless `Includes.keyTypes` names the
//! others.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_acm::Client;
use aws_sdk_acm::types::{
    CertificateDetail, CertificateSummary, Filters, KeyAlgorithm, Tag, ValidationMethod,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::has_all_tags;
use crate::cloud::error::classify;
use crate::cloud::{
    CertificateSpec, CertificateStatus, Certificates, CloudError, CloudResult, ErrorKind,
    TaggedResource, Tags, ValidationRecord, owner_tags,
};

/// RequestCertificate's limit on `IdempotencyToken` (pattern `\w+`).
pub const IDEMPOTENCY_TOKEN_MAX: usize = 32;

/// Statuses of a certificate that will never serve: not adopted, a new one is requested.
const DEAD: &[&str] = &["FAILED", "VALIDATION_TIMED_OUT", "REVOKED", "EXPIRED"];

pub struct AcmCertificates {
    client: Client,
}

impl AcmCertificates {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: super::traced_client!(aws_sdk_acm, sdk),
        }
    }

    /// Every certificate of the account and region, whatever its key type.
    async fn summaries(&self) -> CloudResult<Vec<CertificateSummary>> {
        let includes = Filters::builder()
            .set_key_types(Some(all_key_types()))
            .build();
        self.client
            .list_certificates()
            .includes(includes)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify_acm("acm:ListCertificates", &e))
    }

    /// The certificate's tags, `None` if it is gone.
    async fn tags(&self, arn: &str) -> CloudResult<Option<Tags>> {
        let answer = self
            .client
            .list_tags_for_certificate()
            .certificate_arn(arn)
            .send()
            .await
            .map_err(|e| classify_acm("acm:ListTagsForCertificate", &e));
        match answer {
            Ok(out) => Ok(Some(
                out.tags()
                    .iter()
                    .map(|t| (t.key().to_owned(), t.value().unwrap_or_default().to_owned()))
                    .collect(),
            )),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn request(&self, spec: &CertificateSpec) -> CloudResult<String> {
        let tags = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CloudError::fatal(format!("acm:RequestCertificate: {e}")))?;
        let answer = self
            .client
            .request_certificate()
            .domain_name(&spec.domain)
            .validation_method(ValidationMethod::Dns)
            .idempotency_token(&spec.idempotency_token)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| classify_acm("acm:RequestCertificate", &e))?;
        answer.certificate_arn().map(str::to_owned).ok_or_else(|| {
            CloudError::fatal("acm:RequestCertificate: no certificate in the answer")
        })
    }
}

/// Every key algorithm the SDK knows (ListCertificates' default is RSA_2048 only).
fn all_key_types() -> Vec<KeyAlgorithm> {
    KeyAlgorithm::values()
        .iter()
        .map(|name| KeyAlgorithm::from(*name))
        .collect()
}

/// Checks the token against RequestCertificate's constraint before the call.
pub fn check_idempotency_token(token: &str) -> CloudResult<()> {
    if token.is_empty()
        || token.len() > IDEMPOTENCY_TOKEN_MAX
        || !token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(CloudError::fatal(format!(
            "acm:RequestCertificate: the idempotency token must be 1 to {IDEMPOTENCY_TOKEN_MAX} \
             word characters, not {token:?}"
        )));
    }
    Ok(())
}

/// ACM's codes that mean something particular here, besides [`classify`]'s rules.
fn acm_kind(code: &str, kind: ErrorKind) -> ErrorKind {
    match code {
        // DeleteCertificate while a load balancer holds it: ELB lets go after a while.
        "ResourceInUseException" => ErrorKind::Retryable,
        // DescribeCertificate right after a request, before ACM has the certificate ready.
        "RequestInProgressException" => ErrorKind::Retryable,
        _ => kind,
    }
}

fn classify_acm<E>(what: &str, error: &SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut classified = classify(what, error);
    if let SdkError::ServiceError(service) = error
        && let Some(code) = service.err().code()
    {
        classified.kind = acm_kind(code, classified.kind);
    }
    classified
}

/// The certificate as the trait reports it: the validation record of its domain (or of its
/// first name), once ACM has made it.
fn to_status(detail: &CertificateDetail) -> CertificateStatus {
    let domain = detail.domain_name().unwrap_or_default().to_owned();
    let options = detail.domain_validation_options();
    let option = options
        .iter()
        .find(|o| o.domain_name().eq_ignore_ascii_case(&domain))
        .or_else(|| options.first());
    let validation = option
        .and_then(|o| o.resource_record())
        .map(|record| ValidationRecord {
            name: record.name().trim_end_matches('.').to_ascii_lowercase(),
            record_type: record.r#type().as_str().to_owned(),
            value: record.value().trim_end_matches('.').to_owned(),
        });
    CertificateStatus {
        arn: detail.certificate_arn().unwrap_or_default().to_owned(),
        domain,
        status: detail
            .status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        validation,
        failure_reason: detail.failure_reason().map(|r| r.as_str().to_owned()),
        in_use_by: detail.in_use_by().to_vec(),
    }
}

fn pairs(tags: &Tags) -> impl Iterator<Item = (&str, &str)> + Clone {
    tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

#[async_trait]
impl Certificates for AcmCertificates {
    async fn ensure_certificate(&self, spec: &CertificateSpec) -> CloudResult<String> {
        check_idempotency_token(&spec.idempotency_token)?;
        // Only a certificate that names its owner is adopted: ours for another instance, or
        // one made by hand for the same domain, is not.
        let owner = owner_tags(&spec.tags);
        if !owner.is_empty() {
            for summary in self.summaries().await? {
                let (Some(arn), Some(domain)) = (summary.certificate_arn(), summary.domain_name())
                else {
                    continue;
                };
                let dead = summary.status().is_none_or(|s| DEAD.contains(&s.as_str()));
                if dead || !domain.eq_ignore_ascii_case(&spec.domain) {
                    continue;
                }
                if let Some(tags) = self.tags(arn).await?
                    && has_all_tags(pairs(&tags), &owner)
                {
                    return Ok(arn.to_owned());
                }
            }
        }
        self.request(spec).await
    }

    async fn certificate(&self, arn: &str) -> CloudResult<Option<CertificateStatus>> {
        let answer = self
            .client
            .describe_certificate()
            .certificate_arn(arn)
            .send()
            .await
            .map_err(|e| classify_acm("acm:DescribeCertificate", &e));
        match answer {
            Ok(out) => Ok(out.certificate().map(to_status)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn delete_certificate(&self, arn: &str) -> CloudResult<()> {
        let result = self
            .client
            .delete_certificate()
            .certificate_arn(arn)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify_acm("acm:DeleteCertificate", &e));
        super::gone_is_ok(result)
    }

    async fn tagged_certificates(&self, tags: &Tags) -> CloudResult<Vec<TaggedResource>> {
        let mut found = Vec::new();
        for summary in self.summaries().await? {
            let Some(arn) = summary.certificate_arn() else {
                continue;
            };
            let Some(have) = self.tags(arn).await? else {
                continue;
            };
            if !has_all_tags(pairs(&have), tags) {
                continue;
            }
            found.push(TaggedResource {
                kind: "certificate",
                id: arn.to_owned(),
                tags: have,
                created_at: summary
                    .created_at()
                    .and_then(|t| t.to_millis().ok())
                    .map(crate::domain::Timestamp),
            });
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_acm::operation::delete_certificate::DeleteCertificateError;
    use aws_sdk_acm::types::{
        CertificateStatus as AcmStatus, DomainValidation, RecordType, ResourceRecord,
    };
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    use super::*;

    fn delete_error(code: &str) -> SdkError<DeleteCertificateError, HttpResponse> {
        let meta = ErrorMetadata::builder().code(code).message("m").build();
        SdkError::service_error(
            DeleteCertificateError::generic(meta),
            Response::new(StatusCode::try_from(400).unwrap(), SdkBody::empty()),
        )
    }

    #[test]
    fn acm_errors_are_classified() {
        const WHAT: &str = "acm:DeleteCertificate";
        // A load balancer still holds it (ELB releases a removed certificate later).
        let in_use = classify_acm(WHAT, &delete_error("ResourceInUseException"));
        assert_eq!(in_use.kind, ErrorKind::Retryable);
        // Without ACM's rule it would be a conflict.
        assert_eq!(
            classify(WHAT, &delete_error("ResourceInUseException")).kind,
            ErrorKind::Conflict
        );
        let gone = classify_acm(WHAT, &delete_error("ResourceNotFoundException"));
        assert_eq!(gone.kind, ErrorKind::NotFound);
        assert_eq!(crate::cloud::aws::gone_is_ok(Err(gone)), Ok(()));
        assert_eq!(
            classify_acm(WHAT, &delete_error("RequestInProgressException")).kind,
            ErrorKind::Retryable
        );
        assert_eq!(
            classify_acm(WHAT, &delete_error("InvalidArnException")).kind,
            ErrorKind::Fatal
        );
    }

    #[test]
    fn idempotency_tokens_are_checked_before_the_call() {
        assert!(check_idempotency_token("acme_wp_shop_example_com").is_ok());
        assert!(check_idempotency_token(&"a".repeat(IDEMPOTENCY_TOKEN_MAX)).is_ok());
        assert!(check_idempotency_token(&"a".repeat(IDEMPOTENCY_TOKEN_MAX + 1)).is_err());
        assert!(check_idempotency_token("").is_err());
        assert!(check_idempotency_token("shop.example.com").is_err());
        assert!(check_idempotency_token("acme-wp").is_err());
    }

    #[test]
    fn every_key_type_is_listed() {
        let types = all_key_types();
        for wanted in [
            KeyAlgorithm::Rsa2048,
            KeyAlgorithm::EcPrime256v1,
            KeyAlgorithm::EcSecp384r1,
            KeyAlgorithm::Rsa4096,
        ] {
            assert!(types.contains(&wanted), "{wanted:?}");
        }
    }

    fn detail(record: Option<ResourceRecord>) -> CertificateDetail {
        let mut validation = DomainValidation::builder()
            .domain_name("shop.example.com")
            .set_resource_record(record);
        validation = validation.validation_method(ValidationMethod::Dns);
        CertificateDetail::builder()
            .certificate_arn("arn:aws:acm:eu-west-1:111111111111:certificate/abc")
            .domain_name("shop.example.com")
            .status(AcmStatus::PendingValidation)
            .domain_validation_options(validation.build().unwrap())
            .in_use_by("arn:aws:elasticloadbalancing:eu-west-1:111111111111:loadbalancer/app/a/b")
            .build()
    }

    #[test]
    fn the_validation_record_is_absent_until_acm_has_made_it() {
        let early = to_status(&detail(None));
        assert_eq!(early.status, "PENDING_VALIDATION");
        assert_eq!(early.validation, None);
        assert_eq!(early.in_use_by.len(), 1);
        let record = ResourceRecord::builder()
            .name("_x1.Shop.Example.com.")
            .r#type(RecordType::Cname)
            .value("_y2.acm-validations.aws.")
            .build()
            .unwrap();
        let later = to_status(&detail(Some(record)));
        assert_eq!(
            later.validation,
            Some(ValidationRecord {
                name: "_x1.shop.example.com".into(),
                record_type: "CNAME".into(),
                value: "_y2.acm-validations.aws".into(),
            })
        );
        assert_eq!(later.domain, "shop.example.com");
    }
}
