//! Archives and backups as objects in an environment's S3 bucket.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::cloud::error::classify;
use crate::cloud::{
    ByteChunks, ByteReader, CloudError, CloudResult, MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE,
    Objects, PartSummary, Tags, UploadSummary,
};

pub struct AwsObjects {
    client: Client,
}

impl AwsObjects {
    pub fn new(sdk: &SdkConfig) -> Self {
        // With an endpoint override (an emulator) bucket names cannot become host names:
        // `bucket.127.0.0.1` does not resolve. AWS itself takes virtual-hosted requests.
        let config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(sdk.endpoint_url().is_some())
            .interceptor(crate::telemetry::AwsRequestIds)
            .build();
        Self {
            client: Client::from_conf(config),
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Tags in the `x-amz-tagging` header form: a URL query string.
fn tagging(tags: &Tags) -> String {
    tags.iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// One multipart upload in progress. Dropped while still armed (the upload future was
/// cancelled), it aborts the upload in the background, so no parts stay behind and billed;
/// failures abort explicitly (awaited) before returning.
struct PendingUpload {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    armed: bool,
}

impl PendingUpload {
    async fn abort(mut self) {
        self.armed = false;
        abort_upload(&self.client, &self.bucket, &self.key, &self.upload_id).await;
    }
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, bucket, key, upload_id) = (
                self.client.clone(),
                std::mem::take(&mut self.bucket),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.upload_id),
            );
            runtime.spawn(async move { abort_upload(&client, &bucket, &key, &upload_id).await });
        }
    }
}

async fn abort_upload(client: &Client, bucket: &str, key: &str, upload_id: &str) {
    // AbortMultipartUpload is idempotent; parts being uploaded meanwhile may survive it
    // (AWS docs), but we upload one part at a time and only abort once none is in flight.
    if let Err(error) = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        tracing::warn!(
            bucket,
            key,
            error = %classify("s3:AbortMultipartUpload", &error),
            "cannot abort a failed multipart upload; the bucket's lifecycle rule must remove its parts"
        );
    }
}

impl AwsObjects {
    async fn upload_part(
        &self,
        pending: &PendingUpload,
        number: i32,
        body: Vec<u8>,
        parts: &mut Vec<PartSummary>,
        completed: &mut Vec<CompletedPart>,
    ) -> CloudResult<()> {
        if number as usize > MAX_PARTS {
            return Err(CloudError::fatal(format!(
                "upload of s3://{}/{}: more than {MAX_PARTS} parts; use a larger part size",
                pending.bucket, pending.key
            )));
        }
        let summary = PartSummary {
            number,
            bytes: body.len() as u64,
            sha256: hex::encode(Sha256::digest(&body)),
        };
        let output = self
            .client
            .upload_part()
            .bucket(&pending.bucket)
            .key(&pending.key)
            .upload_id(&pending.upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify("s3:UploadPart", &e))?;
        let etag = output
            .e_tag()
            .ok_or_else(|| CloudError::fatal("s3:UploadPart: no ETag in the response"))?;
        completed.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(etag)
                .build(),
        );
        parts.push(summary);
        Ok(())
    }

    /// Reads `source` into parts of `part_size` and completes the upload.
    async fn upload_parts(
        &self,
        pending: &PendingUpload,
        mut source: ByteChunks<'_>,
        part_size: usize,
    ) -> CloudResult<UploadSummary> {
        let mut whole = Sha256::new();
        let mut bytes = 0u64;
        let mut parts = Vec::new();
        let mut completed = Vec::new();
        let mut buffer = Vec::with_capacity(part_size);
        while let Some(chunk) = source.next().await {
            let chunk = chunk.map_err(|e| {
                CloudError::fatal(format!(
                    "upload of s3://{}/{}: the source failed: {e}",
                    pending.bucket, pending.key
                ))
            })?;
            whole.update(&chunk);
            bytes += chunk.len() as u64;
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let take = (part_size - buffer.len()).min(rest.len());
                buffer.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buffer.len() == part_size {
                    let body = std::mem::replace(&mut buffer, Vec::with_capacity(part_size));
                    let number = parts.len() as i32 + 1;
                    self.upload_part(pending, number, body, &mut parts, &mut completed)
                        .await?;
                }
            }
        }
        // The last part may be smaller than the minimum (or empty, for an empty object).
        if !buffer.is_empty() || parts.is_empty() {
            let number = parts.len() as i32 + 1;
            self.upload_part(pending, number, buffer, &mut parts, &mut completed)
                .await?;
        }
        self.client
            .complete_multipart_upload()
            .bucket(&pending.bucket)
            .key(&pending.key)
            .upload_id(&pending.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("s3:CompleteMultipartUpload", &e))?;
        Ok(UploadSummary {
            bytes,
            sha256: hex::encode(whole.finalize()),
            parts,
        })
    }
}

#[async_trait]
impl Objects for AwsObjects {
    async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        tags: &Tags,
    ) -> CloudResult<()> {
        let tagging = (!tags.is_empty()).then(|| tagging(tags));
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body))
            .set_tagging(tagging)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("s3:PutObject", &e))
    }

    async fn list_objects(&self, bucket: &str, prefix: &str) -> CloudResult<Vec<String>> {
        let pages: Vec<_> = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("s3:ListObjectsV2", &e))?;
        Ok(pages
            .iter()
            .flat_map(|page| page.contents())
            .filter_map(|object| object.key().map(str::to_owned))
            .collect())
    }

    async fn delete_objects(&self, bucket: &str, keys: &[String]) -> CloudResult<()> {
        for chunk in keys.chunks(1000) {
            let objects = chunk
                .iter()
                .map(|key| {
                    aws_sdk_s3::types::ObjectIdentifier::builder()
                        .key(key)
                        .build()
                        .map_err(|e| CloudError::fatal(format!("bad object key {key:?}: {e}")))
                })
                .collect::<CloudResult<Vec<_>>>()?;
            let delete = aws_sdk_s3::types::Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| CloudError::fatal(format!("cannot build DeleteObjects: {e}")))?;
            let output = self
                .client
                .delete_objects()
                .bucket(bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify("s3:DeleteObjects", &e))?;
            // DeleteObjects answers 200 with per-key errors (AccessDenied, InternalError,
            // SlowDown): any of them means the objects are not all gone.
            if let Some(error) = output.errors().first() {
                let code = error.code().unwrap_or("unknown");
                let message = format!(
                    "s3:DeleteObjects could not remove {}: {code}: {}",
                    error.key().unwrap_or("?"),
                    error.message().unwrap_or("")
                );
                return Err(
                    if matches!(code, "InternalError" | "SlowDown" | "ServiceUnavailable") {
                        CloudError::new(crate::cloud::ErrorKind::Retryable, message)
                    } else {
                        CloudError::fatal(message)
                    },
                );
            }
        }
        Ok(())
    }

    async fn upload_stream(
        &self,
        bucket: &str,
        key: &str,
        source: ByteChunks<'_>,
        tags: &Tags,
        part_size: usize,
    ) -> CloudResult<UploadSummary> {
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(CloudError::fatal(format!(
                "part size {part_size} is outside S3's limits: {MIN_PART_SIZE} (the minimum) to {MAX_PART_SIZE} bytes"
            )));
        }
        let tagging = (!tags.is_empty()).then(|| tagging(tags));
        let created = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .set_tagging(tagging)
            .send()
            .await
            .map_err(|e| classify("s3:CreateMultipartUpload", &e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| CloudError::fatal("s3:CreateMultipartUpload: no upload id"))?;
        let mut pending = PendingUpload {
            client: self.client.clone(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            armed: true,
        };
        match self.upload_parts(&pending, source, part_size).await {
            Ok(summary) => {
                pending.armed = false;
                Ok(summary)
            }
            Err(error) => {
                pending.abort().await;
                Err(error)
            }
        }
    }

    async fn download_stream(&self, bucket: &str, key: &str) -> CloudResult<ByteReader> {
        let output = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify("s3:GetObject", &e))?;
        Ok(Box::pin(output.body.into_async_read()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_become_an_encoded_query_string() {
        let tags = vec![
            ("bbws:tenant-id".to_owned(), "acme".to_owned()),
            ("note".to_owned(), "a b&c=d".to_owned()),
        ];
        assert_eq!(tagging(&tags), "bbws%3Atenant-id=acme&note=a%20b%26c%3Dd");
    }
}
