//! AWS implementations of the cloud adapter traits, one struct per trait, each built from
//! the `SdkConfig` of one environment's account. Every SDK failure goes through
//! [`classify`](crate::cloud::error::classify); deletes treat "already gone" as success.

/// A client of the SDK crate `$service` on the `SdkConfig` `$sdk`, whose calls' spans carry
/// the AWS request id of their answers ([`crate::telemetry::AwsRequestIds`]). Every client
/// the service builds comes from here.
macro_rules! traced_client {
    ($service:ident, $sdk:expr) => {
        $service::Client::from_conf(
            $service::config::Builder::from($sdk)
                .interceptor($crate::telemetry::AwsRequestIds)
                .build(),
        )
    };
}
pub(crate) use traced_client;

mod acm;
mod cognito;
mod ecs;
mod efs;
mod elb;
mod iam;
mod logs;
mod metrics;
mod rds;
mod route53;
mod s3;
mod secrets;

pub use acm::{AcmCertificates, IDEMPOTENCY_TOKEN_MAX, check_idempotency_token};
pub use cognito::{APP_CLIENT_SUFFIX, AwsIdentity, GROUPS};
pub use ecs::{AwsCompute, CONTAINER_NAME, FINGERPRINT_LABEL, WP_CONTENT_PATH};
pub use efs::AwsFiles;
pub use elb::AwsRouting;
pub use iam::{AwsTaskRoles, file_system_policy, trust_policy};
pub use logs::AwsLogs;
pub use metrics::AwsMetrics;
pub use rds::AwsDbInstances;
pub use route53::{Route53Dns, normalise_name};
pub use s3::AwsObjects;
pub use secrets::AwsSecrets;

use crate::cloud::{CloudResult, Tags};

/// Does `have` carry every (key, value) pair of `want`? (An empty `want` matches anything,
/// so callers looking for a tenant's resources always pass the tenant's tags.)
pub(crate) fn has_all_tags<'a, I>(have: I, want: &Tags) -> bool
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let have: Vec<(&str, &str)> = have.into_iter().collect();
    want.iter()
        .all(|(key, value)| have.contains(&(key.as_str(), value.as_str())))
}

/// A delete whose target is already gone has done its job.
pub(crate) fn gone_is_ok(result: CloudResult<()>) -> CloudResult<()> {
    match result {
        Err(error) if error.is_not_found() => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::CloudError;
    use crate::cloud::ErrorKind;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_wanted_tag_must_be_present_with_its_value() {
        let have = [("a", "1"), ("b", "2"), ("c", "3")];
        assert!(has_all_tags(have, &tags(&[("a", "1"), ("c", "3")])));
        assert!(!has_all_tags(have, &tags(&[("a", "1"), ("c", "4")])));
        assert!(!has_all_tags(have, &tags(&[("d", "1")])));
    }

    #[test]
    fn only_not_found_counts_as_gone() {
        let not_found = CloudError::new(ErrorKind::NotFound, "x");
        assert!(gone_is_ok(Err(not_found)).is_ok());
        let fatal = CloudError::fatal("x");
        assert_eq!(gone_is_ok(Err(fatal.clone())), Err(fatal));
    }
}
