//! Archives and backups as objects in an environment's S3 bucket.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;

use crate::cloud::error::classify;
use crate::cloud::{CloudResult, Objects, Tags};

pub struct AwsObjects {
    client: Client,
}

impl AwsObjects {
    pub fn new(sdk: &SdkConfig) -> Self {
        // With an endpoint override (an emulator) bucket names cannot become host names:
        // `bucket.127.0.0.1` does not resolve. AWS itself takes virtual-hosted requests.
        let config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(sdk.endpoint_url().is_some())
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
