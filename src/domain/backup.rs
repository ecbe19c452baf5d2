//! The backup record: a point-in-time copy of an instance's database and wp-content in
//! its environment's archive bucket, as the control plane knows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ids::{BackupName, OperationId};
use super::spec::Environment;
use super::time::Timestamp;

/// The lifecycle of a backup: `CREATING → READY | FAILED`, and `DELETING` while its objects
/// are being removed (by DeleteBackup or the retention sweeper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BackupState {
    Creating,
    Ready,
    Failed,
    Deleting,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Creating => "CREATING",
            BackupState::Ready => "READY",
            BackupState::Failed => "FAILED",
            BackupState::Deleting => "DELETING",
        }
    }
}

/// Why a backup was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupOrigin {
    /// CreateBackup.
    Requested,
    /// The final archive of a DeleteInstance (offboarding).
    Offboarding,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    pub name: BackupName,
    /// The environment whose archive bucket holds the objects (the instance's).
    pub environment: Environment,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub state: BackupState,
    pub origin: BackupOrigin,
    /// The operation that writes it (CreateBackup's, or the DeleteInstance's).
    pub operation: OperationId,
    pub created_at: Timestamp,
    /// When the retention sweeper removes it.
    pub expire_at: Timestamp,
    pub updated_at: Timestamp,
    /// `s3://bucket/prefix/` under which every object of the backup lives.
    pub location: String,
    /// `s3://…/database.sql.gz`, once written.
    pub database_uri: Option<String>,
    /// `s3://…/wp-content.tar.gz`, once written (absent when the instance had no content).
    pub content_uri: Option<String>,
    /// `s3://…/manifest.json`, once written (a READY backup always has one).
    pub manifest_uri: Option<String>,
    /// Total size of the backup's objects.
    pub size_bytes: u64,
    pub failure_reason: Option<String>,
    /// Optimistic-concurrency version, bumped by the store on every write.
    pub version: u64,
}

impl Backup {
    /// The AIP-154 etag: changes whenever the stored record changes.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }

    /// The object key prefix of a backup (without bucket), `backups/{env}/{tenant}/{instance}/{backup}/`.
    pub fn key_prefix(environment: Environment, name: &BackupName) -> String {
        format!(
            "backups/{}/{}/{}/{}/",
            environment.short(),
            name.instance.tenant,
            name.instance.instance,
            name.backup
        )
    }
}
