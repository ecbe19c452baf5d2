//! Identifier newtypes. Each is parsed once at the edge; holding one means it is valid, so
//! names derived from it (AWS resources, MySQL identifiers) need no further escaping.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why an identifier was rejected; the text is safe to show to clients.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct IdError(String);

fn err(message: impl Into<String>) -> IdError {
    IdError(message.into())
}

/// Checks the DNS-label-like shape shared by tenant and instance ids: lower-case ASCII
/// letters, digits and single hyphens, starting with a letter and not ending with a hyphen.
fn check_label(value: &str, min: usize, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if !value.is_ascii() {
        return Err(err("must contain only ASCII characters"));
    }
    if value.len() < min || value.len() > max {
        return Err(err(format!("must be {min} to {max} characters long")));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(err(format!(
            "must contain only lower-case letters, digits and hyphens (found {bad:?})"
        )));
    }
    if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(err("must start with a lower-case letter"));
    }
    if value.ends_with('-') {
        return Err(err("must not end with a hyphen"));
    }
    if value.contains("--") {
        return Err(err("must not contain consecutive hyphens"));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(&value)
            }
        }
    };
}

string_id!(
    /// A tenant (customer organisation): 3–40 characters, `[a-z][a-z0-9-]*[a-z0-9]`.
    /// It becomes a DNS label (`{tenant}.{domain}`) and part of every resource name.
    TenantId
);
string_id!(
    /// An instance of a tenant: 1–63 characters in the same alphabet (AIP-122).
    InstanceId
);
string_id!(
    /// A backup of an instance: 1–63 characters in the instance id's alphabet (AIP-122).
    BackupId
);
string_id!(
    /// An operation: 1–64 lower-case letters, digits and hyphens (server generated).
    OperationId
);
string_id!(
    /// A client's idempotency key (AIP-155): 1–128 ASCII letters, digits, `-`, `_`, `.`, `:`.
    RequestId
);

impl TenantId {
    pub const MIN_LEN: usize = 3;
    pub const MAX_LEN: usize = 40;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        check_label(value, Self::MIN_LEN, Self::MAX_LEN)?;
        Ok(Self(value.to_owned()))
    }
}

impl InstanceId {
    pub const MAX_LEN: usize = 63;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        check_label(value, 1, Self::MAX_LEN)?;
        Ok(Self(value.to_owned()))
    }

    /// A fresh id for callers that did not choose one: `wp-` and 12 random hex digits.
    pub fn generate() -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("wp-{}", &hex[..12]))
    }
}

impl BackupId {
    pub const MAX_LEN: usize = 63;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        check_label(value, 1, Self::MAX_LEN)?;
        Ok(Self(value.to_owned()))
    }

    /// A fresh id for callers that did not choose one: `bk-`, the UTC time to the second
    /// and 6 random hex digits (ids sort roughly by time, and never collide in practice).
    pub fn generate(now: super::time::Timestamp) -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("bk-{}-{}", now.utc_compact(), &hex[..6]))
    }
}

impl OperationId {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        if value.is_empty() || value.len() > 64 {
            return Err(err("must be 1 to 64 characters long"));
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(err(
                "must contain only lower-case letters, digits and hyphens",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    /// The resource name, `operations/{id}`.
    pub fn name(&self) -> String {
        format!("operations/{}", self.0)
    }

    /// Parses `operations/{id}`.
    pub fn from_name(name: &str) -> Result<Self, IdError> {
        let id = name
            .strip_prefix("operations/")
            .ok_or_else(|| err("must have the form operations/{operation}"))?;
        Self::parse(id)
    }
}

impl RequestId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(value: &str) -> Result<Self, IdError> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(err(format!(
                "must be 1 to {} characters long",
                Self::MAX_LEN
            )));
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(err(
                "must contain only ASCII letters, digits, '-', '_', '.' and ':'",
            ));
        }
        Ok(Self(value.to_owned()))
    }
}

/// The full name of an instance: `tenants/{tenant}/instances/{instance}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceName {
    pub tenant: TenantId,
    pub instance: InstanceId,
}

impl InstanceName {
    pub fn new(tenant: TenantId, instance: InstanceId) -> Self {
        Self { tenant, instance }
    }

    pub fn parse(name: &str) -> Result<Self, IdError> {
        let shape = || err("must have the form tenants/{tenant}/instances/{instance}");
        let rest = name.strip_prefix("tenants/").ok_or_else(shape)?;
        let (tenant, rest) = rest.split_once('/').ok_or_else(shape)?;
        let instance = rest.strip_prefix("instances/").ok_or_else(shape)?;
        let tenant = TenantId::parse(tenant).map_err(|e| err(format!("tenant id {e}")))?;
        let instance = InstanceId::parse(instance).map_err(|e| err(format!("instance id {e}")))?;
        Ok(Self { tenant, instance })
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tenants/{}/instances/{}", self.tenant, self.instance)
    }
}

/// The full name of a backup: `tenants/{tenant}/instances/{instance}/backups/{backup}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackupName {
    pub instance: InstanceName,
    pub backup: BackupId,
}

impl BackupName {
    pub fn new(instance: InstanceName, backup: BackupId) -> Self {
        Self { instance, backup }
    }

    pub fn parse(name: &str) -> Result<Self, IdError> {
        let shape =
            || err("must have the form tenants/{tenant}/instances/{instance}/backups/{backup}");
        let (instance, backup) = name.rsplit_once("/backups/").ok_or_else(shape)?;
        let instance = InstanceName::parse(instance).map_err(|_| shape())?;
        let backup = BackupId::parse(backup).map_err(|e| err(format!("backup id {e}")))?;
        Ok(Self { instance, backup })
    }
}

impl fmt::Display for BackupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/backups/{}", self.instance, self.backup)
    }
}

/// Parses a collection parent `tenants/{tenant}`; `tenants/-` (AIP-159) means every tenant
/// and yields `None`.
pub fn parse_tenant_parent(
    parent: &str,
    allow_wildcard: bool,
) -> Result<Option<TenantId>, IdError> {
    let tenant = parent
        .strip_prefix("tenants/")
        .ok_or_else(|| err("must have the form tenants/{tenant}"))?;
    if tenant == "-" {
        return if allow_wildcard {
            Ok(None)
        } else {
            Err(err(
                "must name one tenant; the wildcard '-' is not allowed here",
            ))
        };
    }
    TenantId::parse(tenant)
        .map(Some)
        .map_err(|e| err(format!("tenant id {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_accept_dns_labels() {
        for ok in ["acme", "a1b", "acme-corp-42", &"a".repeat(40)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn tenant_ids_reject_bad_input() {
        let long = "a".repeat(41);
        let cases = [
            ("", "empty"),
            ("Acme", "lower-case"),
            ("ACME", "lower-case"),
            (long.as_str(), "3 to 40"),
            ("ab", "3 to 40"),
            ("acmé", "ASCII"),
            ("a;drop", "lower-case letters"),
            ("../x", "lower-case letters"),
            ("a b", "lower-case letters"),
            ("a'b", "lower-case letters"),
            ("$(rm)", "lower-case letters"),
            ("1abc", "start with"),
            ("-abc", "start with"),
            ("abc-", "end with"),
            ("ab--c", "consecutive"),
        ];
        for (input, expected) in cases {
            let error = TenantId::parse(input).expect_err(input).to_string();
            assert!(error.contains(expected), "{input:?}: {error}");
        }
    }

    #[test]
    fn instance_names_round_trip() {
        let name = InstanceName::parse("tenants/acme/instances/wp-1").unwrap();
        assert_eq!(name.tenant.as_str(), "acme");
        assert_eq!(name.instance.as_str(), "wp-1");
        assert_eq!(name.to_string(), "tenants/acme/instances/wp-1");
        for bad in [
            "",
            "tenants/acme",
            "tenants/acme/instances/",
            "tenants/acme/instances/a/b",
            "tenants//instances/x",
            "projects/acme/instances/x",
            "tenants/ACME/instances/x",
        ] {
            assert!(
                InstanceName::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = InstanceId::generate();
        let b = InstanceId::generate();
        assert_ne!(a, b);
        assert!(InstanceId::parse(a.as_str()).is_ok());
        let op = OperationId::generate();
        assert_eq!(OperationId::from_name(&op.name()).unwrap(), op);
    }

    #[test]
    fn parents_and_wildcards() {
        assert_eq!(
            parse_tenant_parent("tenants/acme", false).unwrap(),
            Some(TenantId::parse("acme").unwrap())
        );
        assert_eq!(parse_tenant_parent("tenants/-", true).unwrap(), None);
        assert!(parse_tenant_parent("tenants/-", false).is_err());
        assert!(parse_tenant_parent("acme", true).is_err());
    }

    #[test]
    fn request_ids() {
        assert!(RequestId::parse("7c9e6679-7425-40de-944b-e07fc1f90ae7").is_ok());
        assert!(RequestId::parse("").is_err());
        assert!(RequestId::parse("a b").is_err());
        assert!(RequestId::parse(&"a".repeat(129)).is_err());
    }
}
