//! `make bench`: dump and restore a generated database of `--mb N` megabytes through
//! moto's S3, printing throughput and this process's peak RSS (VmHWM). Run once per size,
//! each in its own process, so each peak is that size's alone. Needs the local MariaDB
//! and `IM_TEST_AWS_ENDPOINT` (scripts/bench.sh provides both).

use std::time::Instant;

use instance_manager::backup::{DumpTools, dump_to, restore_from};
use instance_manager::cloud::aws::AwsObjects;
use instance_manager::cloud::{DEFAULT_PART_SIZE, DbTls, MasterCredentials, Secret};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mb: u64 = match (args.next().as_deref(), args.next()) {
        (Some("--mb"), Some(n)) => n.parse().expect("--mb N"),
        _ => panic!("usage: backup_bench --mb N"),
    };
    let endpoint = std::env::var("IM_TEST_AWS_ENDPOINT").expect("IM_TEST_AWS_ENDPOINT");
    let url = std::env::var("IM_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let opts = Opts::from_url(&url).unwrap();
    let master = MasterCredentials {
        host: opts.ip_or_hostname().to_owned(),
        port: opts.tcp_port(),
        username: opts.user().unwrap_or("root").to_owned(),
        password: Secret::new(opts.pass().unwrap_or_default()),
        tls: DbTls::Disabled,
        ca_file: None,
    };
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (db, restored) = (
        format!("imt_bench_{suffix}"),
        format!("imt_bench_{suffix}_r"),
    );
    let mut conn = Conn::new(opts).await.unwrap();

    // ~1 KiB rows of hex digests (compress about 2:1, like real content).
    let rows = mb * 1024;
    conn.query_drop(format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    conn.query_drop(format!(
        "CREATE TABLE {db}.t (id bigint PRIMARY KEY, payload text NOT NULL) ENGINE=InnoDB"
    ))
    .await
    .unwrap();
    let digests = (0..16)
        .map(|i| format!("SHA2(seq * 16 + {i}, 256)"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut start = 1;
    while start <= rows {
        let end = (start + 99_999).min(rows);
        conn.query_drop(format!(
            "INSERT INTO {db}.t SELECT seq, CONCAT({digests}) FROM seq_{start}_to_{end}"
        ))
        .await
        .unwrap();
        start = end + 1;
    }

    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            "testing", "testing", None, None, "bench",
        ))
        .load()
        .await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let bucket = format!("bench-{suffix}");
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let objects = AwsObjects::new(&sdk);
    let tools = DumpTools::default();
    let before = peak_rss_mib();

    let started = Instant::now();
    let summary = dump_to(
        &tools,
        &master,
        &db,
        &objects,
        &bucket,
        "database.sql.gz",
        &Vec::new(),
        DEFAULT_PART_SIZE,
    )
    .await
    .unwrap();
    let dump_secs = started.elapsed().as_secs_f64();
    let after_dump = peak_rss_mib();
    let started = Instant::now();
    restore_from(
        &tools,
        &master,
        &objects,
        &bucket,
        "database.sql.gz",
        &summary.sha256,
        &restored,
    )
    .await
    .unwrap();
    let restore_secs = started.elapsed().as_secs_f64();
    let after_restore = peak_rss_mib();
    let sql_mb = summary.uncompressed_bytes as f64 / 1e6;
    println!(
        "size {mb} MiB of rows: dump {sql_mb:.0} MB SQL -> {:.0} MB gzip in {} parts, {dump_secs:.1} s ({:.1} MB/s); \
         restore {restore_secs:.1} s ({:.1} MB/s); peak RSS MiB: {before:.0} before, {after_dump:.0} after dump, {after_restore:.0} after restore",
        summary.compressed_bytes as f64 / 1e6,
        summary.parts.len(),
        sql_mb / dump_secs,
        sql_mb / restore_secs,
    );
    for name in [&db, &restored] {
        conn.query_drop(format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .unwrap();
    }
    let _ = conn.disconnect().await;
}
