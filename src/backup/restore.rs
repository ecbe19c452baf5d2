//! The restore: the object streamed from S3 twice — once to check its sha256 before
//! anything touches a database, once gunzipped into the client program's stdin, for a
//! database that must not exist yet.

use std::io::Write as _;
use std::process::Stdio;

use flate2::write::GzDecoder;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::client::{self, DefaultsFile, DumpTools, Flavour};
use crate::cloud::mysql::quote_identifier;
use crate::cloud::{ByteReader, CloudError, CloudResult, ErrorKind, MasterCredentials, Objects};

const READ_CHUNK: usize = 256 * 1024;

/// What [`restore_from`] read and fed to the client.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreSummary {
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
}

fn read_failed(bucket: &str, key: &str, error: std::io::Error) -> CloudError {
    CloudError::new(
        ErrorKind::Retryable,
        format!("reading s3://{bucket}/{key}: {error}"),
    )
}

async fn read_chunk(
    reader: &mut ByteReader,
    buffer: &mut [u8],
    bucket: &str,
    key: &str,
) -> CloudResult<usize> {
    reader
        .read(buffer)
        .await
        .map_err(|e| read_failed(bucket, key, e))
}

/// Streams `s3://bucket/key` once and checks its sha256; returns its size.
pub async fn verify_object(
    objects: &dyn Objects,
    bucket: &str,
    key: &str,
    expected_sha256: &str,
) -> CloudResult<u64> {
    let mut reader = objects.download_stream(bucket, key).await?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buffer = vec![0u8; READ_CHUNK];
    loop {
        let n = read_chunk(&mut reader, &mut buffer, bucket, key).await?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buffer[..n]);
    }
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(CloudError::fatal(format!(
            "s3://{bucket}/{key} is not the backup: sha256 {actual}, expected {expected_sha256}"
        )));
    }
    Ok(bytes)
}

/// Restores the dump at `s3://bucket/key` into the new database `database`
/// (utf8mb4 / utf8mb4_unicode_ci; the restore fails if it exists). The object's sha256 is
/// checked first, so a corrupt or missing object fails before any database is touched.
/// On a failure after that, `database` may exist with part of the data: the caller
/// drops it (it never is a live database).
#[allow(clippy::too_many_arguments)]
pub async fn restore_from(
    tools: &DumpTools,
    master: &MasterCredentials,
    objects: &dyn Objects,
    bucket: &str,
    key: &str,
    expected_sha256: &str,
    database: &str,
) -> CloudResult<RestoreSummary> {
    let db = quote_identifier("database", database)?;
    verify_object(objects, bucket, key, expected_sha256).await?;

    let program = tools.client_command.as_str();
    let flavour = Flavour::of(program).await?;
    let defaults = DefaultsFile::create(master, flavour)?;
    let arguments: Vec<String> = [
        "--batch",
        "--binary-mode",
        "--default-character-set=utf8mb4",
        "--max-allowed-packet=1G",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let mut child = client::command(program, &defaults, &arguments)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| CloudError::fatal(format!("cannot run {program}: {e}")))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stderr = client::capture_stderr(child.stderr.take().expect("stderr is piped"));

    // CREATE DATABASE without IF NOT EXISTS: an existing database stops the client at
    // line 1, before any statement of the dump.
    let preamble = format!(
        "CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;\nUSE {db};\n"
    );
    let fed = feed(
        &mut stdin,
        preamble.as_bytes(),
        objects,
        bucket,
        key,
        expected_sha256,
    )
    .await;
    match fed {
        Ok(summary) => {
            drop(stdin);
            client::finish(program, child, stderr, master).await?;
            Ok(summary)
        }
        // The client stopped reading: its own error says why.
        Err(Feed::Closed(error)) => {
            drop(stdin);
            client::finish(program, child, stderr, master).await?;
            Err(CloudError::fatal(format!(
                "{program} stopped reading the dump: {error}"
            )))
        }
        // Killed before its input ends. What it executed so far stays in the new
        // database, which the caller drops.
        Err(Feed::Failed(error)) => {
            let _ = child.kill().await;
            drop(stdin);
            Err(error)
        }
    }
}

enum Feed {
    /// Writing to the client failed (it exited).
    Closed(std::io::Error),
    /// The object could not be read or was not the backup.
    Failed(CloudError),
}

async fn feed(
    stdin: &mut tokio::process::ChildStdin,
    preamble: &[u8],
    objects: &dyn Objects,
    bucket: &str,
    key: &str,
    expected_sha256: &str,
) -> Result<RestoreSummary, Feed> {
    stdin.write_all(preamble).await.map_err(Feed::Closed)?;
    let mut reader = objects
        .download_stream(bucket, key)
        .await
        .map_err(Feed::Failed)?;
    let mut hasher = Sha256::new();
    let mut decoder = GzDecoder::new(Vec::new());
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut compressed = 0u64;
    let mut uncompressed = 0u64;
    let corrupt = |e: std::io::Error| {
        Feed::Failed(CloudError::fatal(format!(
            "s3://{bucket}/{key} is not a gzip stream: {e}"
        )))
    };
    loop {
        let n = read_chunk(&mut reader, &mut buffer, bucket, key)
            .await
            .map_err(Feed::Failed)?;
        if n == 0 {
            break;
        }
        compressed += n as u64;
        hasher.update(&buffer[..n]);
        decoder.write_all(&buffer[..n]).map_err(corrupt)?;
        let out = std::mem::take(decoder.get_mut());
        uncompressed += out.len() as u64;
        stdin.write_all(&out).await.map_err(Feed::Closed)?;
    }
    // The object may have changed since it was checked: the end of the stream must match
    // too, before the client sees its end of input.
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(Feed::Failed(CloudError::fatal(format!(
            "s3://{bucket}/{key} changed during the restore: sha256 {actual}, expected {expected_sha256}"
        ))));
    }
    let rest = decoder.finish().map_err(corrupt)?;
    uncompressed += rest.len() as u64;
    stdin.write_all(&rest).await.map_err(Feed::Closed)?;
    stdin.flush().await.map_err(Feed::Closed)?;
    Ok(RestoreSummary {
        compressed_bytes: compressed,
        uncompressed_bytes: uncompressed,
    })
}
