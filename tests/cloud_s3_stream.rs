//! Streaming multipart upload and streamed download (`Objects::upload_stream`,
//! `download_stream`) against moto. Effects are checked with the S3 SDK directly:
//! GetObject for the bytes (hashed by the test itself), GetObjectTagging, ListObjectsV2 and
//! ListMultipartUploads for what a failure or a cancellation leaves behind.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use instance_manager::cloud::aws::AwsObjects;
use instance_manager::cloud::{ByteChunks, MAX_PART_SIZE, MIN_PART_SIZE, Objects, Tags};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// Deterministic, incompressible bytes (xorshift64*), `len` of them from `seed`, yielded in
/// chunks of an odd size so that part boundaries fall inside chunks.
fn generated(seed: u64, len: usize) -> impl Iterator<Item = Vec<u8>> {
    const CHUNK: usize = 100_003;
    let mut state = seed | 1;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK);
        left -= n;
        let mut chunk = Vec::with_capacity(n + 8);
        while chunk.len() < n {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            chunk.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        chunk.truncate(n);
        Some(chunk)
    })
}

fn source(seed: u64, len: usize) -> ByteChunks<'static> {
    futures::stream::iter(generated(seed, len).map(Ok)).boxed()
}

async fn bucket() -> (aws_sdk_s3::Client, AwsObjects, String) {
    let sdk = common::test_sdk_config().await;
    let config = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(true)
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(config);
    let bucket = common::unique_name("stream");
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    (s3, AwsObjects::new(&sdk), bucket)
}

async fn pending_uploads(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    s3.list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap()
        .uploads()
        .iter()
        .filter_map(|u| u.key().map(str::to_owned))
        .collect()
}

async fn keys(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    s3.list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .unwrap()
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_generated_stream_round_trips_byte_identical_in_parts() {
    let (s3, objects, bucket) = bucket().await;
    const LEN: usize = 36 * 1024 * 1024 + 12_345;
    let expected = {
        let mut hasher = Sha256::new();
        generated(7, LEN).for_each(|c| hasher.update(&c));
        hex::encode(hasher.finalize())
    };
    let tags: Tags = vec![("bbws:tenant-id".into(), "acme".into())];
    let started = Instant::now();
    let summary = objects
        .upload_stream(&bucket, "a/b.bin", source(7, LEN), &tags, MIN_PART_SIZE)
        .await
        .unwrap();
    eprintln!("uploaded {LEN} bytes in {:?}", started.elapsed());
    assert_eq!(summary.bytes, LEN as u64);
    assert_eq!(summary.sha256, expected);
    // ceil(LEN / 5 MiB) parts, all but the last exactly 5 MiB.
    assert_eq!(summary.parts.len(), LEN.div_ceil(MIN_PART_SIZE));
    assert!(
        summary.parts[..summary.parts.len() - 1]
            .iter()
            .all(|p| p.bytes == MIN_PART_SIZE as u64)
    );
    assert_eq!(
        summary.parts.iter().map(|p| p.bytes).sum::<u64>(),
        LEN as u64
    );

    // The stored object, read with the SDK and hashed here.
    let body = s3
        .get_object()
        .bucket(&bucket)
        .key("a/b.bin")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(body.len(), LEN);
    assert_eq!(hex::encode(Sha256::digest(&body)), expected);
    // Per-part hashes are of the object's consecutive slices.
    let mut offset = 0usize;
    for part in &summary.parts {
        let end = offset + part.bytes as usize;
        assert_eq!(part.sha256, hex::encode(Sha256::digest(&body[offset..end])));
        offset = end;
    }
    drop(body);
    let tagging = s3
        .get_object_tagging()
        .bucket(&bucket)
        .key("a/b.bin")
        .send()
        .await
        .unwrap();
    let tag = &tagging.tag_set()[0];
    assert_eq!((tag.key(), tag.value()), ("bbws:tenant-id", "acme"));
    assert!(pending_uploads(&s3, &bucket).await.is_empty());

    // The streamed download yields the same bytes.
    let mut reader = objects.download_stream(&bucket, "a/b.bin").await.unwrap();
    let mut hasher = Sha256::new();
    let mut read = 0usize;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buffer).await.unwrap();
        if n == 0 {
            break;
        }
        read += n;
        hasher.update(&buffer[..n]);
    }
    assert_eq!(read, LEN);
    assert_eq!(hex::encode(hasher.finalize()), expected);
}

#[tokio::test]
async fn a_failing_source_aborts_the_upload_and_leaves_nothing() {
    let (s3, objects, bucket) = bucket().await;
    // Two full parts go up before the source fails.
    let failing = futures::stream::iter(
        generated(9, 12 * 1024 * 1024)
            .map(Ok)
            .chain(std::iter::once(Err(std::io::Error::other("dump died")))),
    )
    .boxed();
    let error = objects
        .upload_stream(&bucket, "x.gz", failing, &Vec::new(), MIN_PART_SIZE)
        .await
        .unwrap_err();
    assert!(error.message.contains("dump died"), "{error}");
    assert!(keys(&s3, &bucket).await.is_empty());
    assert!(pending_uploads(&s3, &bucket).await.is_empty());
}

#[tokio::test]
async fn a_cancelled_upload_is_aborted() {
    let (s3, objects, bucket) = bucket().await;
    let (sent, mut signal) = tokio::sync::mpsc::channel::<()>(1);
    // Two full parts, then a source that never ends; the test cancels it.
    let stalled = futures::stream::iter(generated(3, 11 * 1024 * 1024).map(Ok))
        .chain(futures::stream::once(async move {
            sent.send(()).await.unwrap();
            std::future::pending::<std::io::Result<Vec<u8>>>().await
        }))
        .boxed();
    let no_tags: Tags = Vec::new();
    let mut upload =
        Box::pin(objects.upload_stream(&bucket, "y.gz", stalled, &no_tags, MIN_PART_SIZE));
    tokio::select! {
        result = &mut upload => panic!("the upload ended: {result:?}"),
        _ = signal.recv() => {}
    }
    assert_eq!(pending_uploads(&s3, &bucket).await, vec!["y.gz".to_owned()]);
    drop(upload);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pending_uploads(&s3, &bucket).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cancelled upload was not aborted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(keys(&s3, &bucket).await.is_empty());
}

#[tokio::test]
async fn parts_outside_the_s3_limits_are_refused_before_any_request() {
    let (s3, objects, bucket) = bucket().await;
    let error = objects
        .upload_stream(&bucket, "z", source(1, 10), &Vec::new(), MIN_PART_SIZE - 1)
        .await
        .unwrap_err();
    assert!(error.message.contains("minimum"), "{error}");
    let error = objects
        .upload_stream(&bucket, "z", source(1, 10), &Vec::new(), MAX_PART_SIZE + 1)
        .await
        .unwrap_err();
    assert!(error.message.contains("limits"), "{error}");
    assert!(pending_uploads(&s3, &bucket).await.is_empty());
    assert!(keys(&s3, &bucket).await.is_empty());
}
