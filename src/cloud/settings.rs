//! What the cloud layer needs to know, as plain data: the environments with their platforms,
//! role sessions, endpoints. The process configuration converts into these types (see
//! `Config::cloud_settings`); nothing in `cloud` reads the configuration itself.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Platform;
use crate::domain::Environment;

/// A value that must never be printed: `Debug` and the redacted dump show `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
            "<redacted>"
        })
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
    pub environments: Vec<EnvironmentConfig>,
}
