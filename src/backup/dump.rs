//! The dump: `mariadb-dump` (or `mysqldump`) → gzip → multipart upload, in bounded memory.

use std::io::Write as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use flate2::Compression;
use flate2::write::GzEncoder;
use futures::StreamExt as _;
use tokio::io::AsyncReadExt as _;
use tokio::process::{Child, ChildStdout};
use tokio::task::JoinHandle;

use super::client::{self, DefaultsFile, DumpTools, Flavour};
use crate::cloud::mysql::quote_identifier;
use crate::cloud::{
    ByteChunks, CloudError, CloudResult, MasterCredentials, Objects, PartSummary, Tags,
};

/// What [`dump_to`] stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpSummary {
    /// The SQL text's size, before compression.
    pub uncompressed_bytes: u64,
    /// The object's size.
    pub compressed_bytes: u64,
    /// sha256 (hex) of the object, as stored.
    pub sha256: String,
    /// From the dump's header (`-- Server version`), `unknown` if it has none.
    pub server_version: String,
    pub parts: Vec<PartSummary>,
}

/// The dump program's options: a consistent snapshot (`--single-transaction`, so no table
/// locks on InnoDB), everything that is not table data too (routines, triggers, events),
/// binary columns as hex (safe through any character set), utf8mb4, and no tablespace
/// statements (they need the PROCESS privilege, which RDS's master user may lack). No
/// `--databases`: the dump names no database, so it restores into any. MySQL's
/// `mysqldump` would also write `SET @@GLOBAL.GTID_PURGED` on a GTID-enabled server,
/// which a restore into a server that has GTIDs of its own refuses: `--set-gtid-purged=OFF`
/// (MariaDB's programs have no such option and would refuse it).
pub fn dump_arguments(flavour: Flavour, database: &str) -> Vec<String> {
    let mut arguments: Vec<String> = [
        "--single-transaction",
        "--routines",
        "--triggers",
        "--events",
        "--hex-blob",
        "--default-character-set=utf8mb4",
        "--no-tablespaces",
        "--max-allowed-packet=1G",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    if flavour == Flavour::MySql {
        arguments.push("--set-gtid-purged=OFF".into());
    }
    arguments.push(database.to_owned());
    arguments
}

/// How far the dump got; the child's failure, if it failed (the upload only sees an I/O
/// error).
#[derive(Default)]
struct Progress {
    uncompressed: u64,
    head: Vec<u8>,
    failure: Option<CloudError>,
}

const HEAD_LIMIT: usize = 4096;
const READ_CHUNK: usize = 256 * 1024;
/// Compressed output is handed to the upload in chunks of about this size.
const YIELD_AT: usize = 256 * 1024;

/// Dumps `database` into `s3://bucket/key` (gzip, multipart upload of `part_size`
/// parts). The dump program's failure (a non-zero exit) aborts the upload, so a
/// truncated dump never becomes an object. Dropping the future kills the program and
/// aborts the upload.
#[allow(clippy::too_many_arguments)]
pub async fn dump_to(
    tools: &DumpTools,
    master: &MasterCredentials,
    database: &str,
    objects: &dyn Objects,
    bucket: &str,
    key: &str,
    tags: &Tags,
    part_size: usize,
) -> CloudResult<DumpSummary> {
    quote_identifier("database", database)?;
    let program = tools.dump_command.as_str();
    let flavour = Flavour::of(program).await?;
    let defaults = DefaultsFile::create(master, flavour)?;
    let mut child = client::command(program, &defaults, &dump_arguments(flavour, database))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| CloudError::fatal(format!("cannot run {program}: {e}")))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = client::capture_stderr(child.stderr.take().expect("stderr is piped"));
    let progress = Arc::new(Mutex::new(Progress::default()));
    let source = gzip_stream(program, master, stdout, child, stderr, progress.clone());
    let uploaded = objects
        .upload_stream(bucket, key, source, tags, part_size)
        .await;
    drop(defaults);
    let mut progress = progress.lock().expect("progress lock");
    let summary = match (uploaded, progress.failure.take()) {
        (_, Some(failure)) => return Err(failure),
        (Err(error), None) => return Err(error),
        (Ok(summary), None) => summary,
    };
    Ok(DumpSummary {
        uncompressed_bytes: progress.uncompressed,
        compressed_bytes: summary.bytes,
        sha256: summary.sha256,
        server_version: server_version(&progress.head).unwrap_or_else(|| "unknown".into()),
        parts: summary.parts,
    })
}

/// `-- Server version\t10.11.19-MariaDB-0+deb12u1` in the dump's header.
fn server_version(head: &[u8]) -> Option<String> {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|line| line.strip_prefix("-- Server version"))
        .map(|rest| rest.trim().to_owned())
        .filter(|version| !version.is_empty())
}

struct Gzipping {
    stdout: ChildStdout,
    child: Child,
    stderr: JoinHandle<String>,
    encoder: GzEncoder<Vec<u8>>,
    buffer: Vec<u8>,
}

/// The program's stdout, gzipped, as chunks for the upload; at the end, the program's
/// exit status: a failure becomes an error (and is recorded in `progress`).
fn gzip_stream<'a>(
    program: &'a str,
    master: &'a MasterCredentials,
    stdout: ChildStdout,
    child: Child,
    stderr: JoinHandle<String>,
    progress: Arc<Mutex<Progress>>,
) -> ByteChunks<'a> {
    let state = Gzipping {
        stdout,
        child,
        stderr,
        encoder: GzEncoder::new(Vec::new(), Compression::default()),
        buffer: vec![0; READ_CHUNK],
    };
    futures::stream::unfold(Some(state), move |state| {
        let progress = progress.clone();
        async move {
            let mut state = state?;
            loop {
                let n = match state.stdout.read(&mut state.buffer).await {
                    Ok(n) => n,
                    Err(e) => return Some((Err(e), None)),
                };
                if n == 0 {
                    let Gzipping {
                        child,
                        stderr,
                        encoder,
                        ..
                    } = state;
                    if let Err(failure) = client::finish(program, child, stderr, master).await {
                        let message = failure.message.clone();
                        progress.lock().expect("progress lock").failure = Some(failure);
                        return Some((Err(std::io::Error::other(message)), None));
                    }
                    return Some((encoder.finish(), None));
                }
                let chunk = &state.buffer[..n];
                {
                    let mut progress = progress.lock().expect("progress lock");
                    progress.uncompressed += n as u64;
                    let room = HEAD_LIMIT.saturating_sub(progress.head.len());
                    progress.head.extend_from_slice(&chunk[..n.min(room)]);
                }
                if let Err(e) = state.encoder.write_all(chunk) {
                    return Some((Err(e), None));
                }
                if state.encoder.get_ref().len() >= YIELD_AT {
                    let out = std::mem::take(state.encoder.get_mut());
                    return Some((Ok(out), Some(state)));
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_option_only_for_mysql_and_the_database_last() {
        let mariadb = dump_arguments(Flavour::MariaDb, "tenant_db");
        assert!(!mariadb.iter().any(|a| a.contains("gtid")));
        assert_eq!(mariadb.last().unwrap(), "tenant_db");
        assert!(mariadb.contains(&"--single-transaction".to_owned()));
        let mysql = dump_arguments(Flavour::MySql, "tenant_db");
        assert!(mysql.contains(&"--set-gtid-purged=OFF".to_owned()));
        assert!(
            !mysql
                .iter()
                .any(|a| a == "--databases" || a.contains("password"))
        );
    }

    #[test]
    fn the_server_version_comes_from_the_header() {
        let head = b"-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB\n--\n-- Host: 127.0.0.1    Database: x\n-- ------\n-- Server version\t10.11.19-MariaDB-0+deb12u1\n";
        assert_eq!(
            server_version(head).as_deref(),
            Some("10.11.19-MariaDB-0+deb12u1")
        );
        assert_eq!(server_version(b"-- no header\n"), None);
    }
}
