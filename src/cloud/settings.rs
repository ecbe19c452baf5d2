//! What the cloud layer needs to know, as plain data: the environments with their platforms,
//! role sessions, endpoints. The process configuration converts into these types (see
//! `Config::cloud_settings`); nothing in `cloud` reads the configuration itself.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Platform;
use crate::domain::Environment;

/// What a set [`Secret`] shows instead of its value, when printed or serialized.
pub const REDACTED: &str = "<redacted>";

/// A value that must never be shown: `Debug` prints `<redacted>`, serializing writes
/// `<redacted>` (an unset secret stays empty, so a configuration without secrets
/// round-trips), there is no `Display`, and the memory is zeroed when it is dropped. Only
/// [`Secret::expose`] gives the value, for the one call that needs it. Configuration files
/// still deserialize into it as a plain string.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<unset>"
        } else {
            REDACTED
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { REDACTED })
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// One environment: its own AWS account and region, reached through STS AssumeRole, and
/// the shared platform inside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentConfig {
    pub name: Environment,
    /// The account the role belongs to; checked with GetCallerIdentity at start-up.
    pub account_id: String,
    pub region: String,
    /// Role to assume; empty means the control plane's own credentials (same account).
    #[serde(default)]
    pub role_arn: String,
    #[serde(default)]
    pub external_id: Secret,
    /// AWS endpoint override for this environment (an emulator); defaults to `aws_endpoint`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub platform: Platform,
    /// Bounds on an instance's task count in this environment; the deployment's
    /// `scale_bounds` when unset.
    #[serde(default)]
    pub scale_bounds: Option<crate::domain::ScaleBounds>,
}

/// How role sessions are assumed and refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSettings {
    pub length: Duration,
    pub refresh_margin: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            length: Duration::from_secs(60 * 60),
            refresh_margin: Duration::from_secs(5 * 60),
        }
    }
}

/// Time limits of every AWS SDK call the service makes (every client of every account,
/// the STS role sessions included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdkTimeouts {
    /// Establishing the TCP (and TLS) connection.
    pub connect: Duration,
    /// One attempt of an operation: a request and its response. A timed-out attempt is
    /// retried by the SDK's retry policy.
    pub attempt: Duration,
    /// The whole operation, every retry included.
    pub operation: Duration,
}

impl Default for SdkTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            attempt: Duration::from_secs(30),
            operation: Duration::from_secs(120),
        }
    }
}

impl SdkTimeouts {
    /// The SDK's form of these limits.
    pub fn timeout_config(&self) -> aws_smithy_types::timeout::TimeoutConfig {
        aws_smithy_types::timeout::TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.attempt)
            .operation_timeout(self.operation)
            .build()
    }
}

/// Time limits of the work on an environment's MySQL server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbTimeouts {
    /// Connecting and logging in.
    pub connect: Duration,
    /// Waiting for a metadata lock (`lock_wait_timeout`) or a row lock
    /// (`innodb_lock_wait_timeout`); whole seconds, at least one.
    pub lock_wait: Duration,
    /// One statement (MariaDB `max_statement_time`; MySQL `max_execution_time`, which
    /// limits SELECTs only).
    pub statement: Duration,
}

impl Default for DbTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            lock_wait: Duration::from_secs(30),
            statement: Duration::from_secs(300),
        }
    }
}

/// Everything the cloud layer takes from the process configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CloudSettings {
    /// AWS endpoint override (an emulator) for every account unless an environment names
    /// its own; unset in production.
    pub aws_endpoint: Option<String>,
    /// Region of the control plane's own account; unset: the SDK's default.
    pub aws_region: Option<String>,
    /// This replica's name, used in role session names.
    pub replica: String,
    pub session: SessionSettings,
    pub sdk_timeouts: SdkTimeouts,
    pub db_timeouts: DbTimeouts,
    pub environments: Vec<EnvironmentConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_neither_prints_nor_serializes_but_deserializes() {
        #[derive(Serialize, Deserialize)]
        struct Holder {
            key: Secret,
            unset: Secret,
        }
        let holder: Holder = toml::from_str("key = \"hunter2-value\"\nunset = \"\"\n").unwrap();
        assert_eq!(holder.key.expose(), "hunter2-value");
        assert_eq!(format!("{:?}", holder.key), "<redacted>");
        assert_eq!(format!("{:?}", holder.unset), "<unset>");
        for text in [
            toml::to_string(&holder).unwrap(),
            serde_json::to_string(&holder).unwrap(),
        ] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
        assert_eq!(
            serde_json::to_value(&holder).unwrap()["unset"],
            serde_json::json!("")
        );
    }
}
