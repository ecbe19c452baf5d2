//! Backups on the real MariaDB (127.0.0.1:3306) into moto's S3: a WordPress-like database
//! with every awkward kind of content is dumped, damaged, restored into a fresh database
//! and compared with what it held before the damage — with the test's own SQL (CHECKSUM
//! TABLE, COUNT(*), information_schema) and the SDK's GetObject, not the product's
//! lookups. A corrupted or missing object fails before any database is created; a failing
//! dump leaves no object and no pending upload.

mod common;

use std::time::Instant;

use instance_manager::backup::{DumpTools, dump_to, restore_from, verify_copy};
use instance_manager::cloud::aws::AwsObjects;
use instance_manager::cloud::settings::Secret;
use instance_manager::cloud::{DEFAULT_PART_SIZE, DbTls, ErrorKind, MasterCredentials, Tags};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};
use sha2::{Digest, Sha256};

fn master() -> MasterCredentials {
    let opts = Opts::from_url(&common::mysql_url()).expect("IM_TEST_MYSQL_URL is a mysql:// url");
    MasterCredentials {
        host: opts.ip_or_hostname().to_owned(),
        port: opts.tcp_port(),
        username: opts.user().unwrap_or("root").to_owned(),
        password: Secret::new(opts.pass().unwrap_or_default()),
        tls: DbTls::Disabled,
        ca_file: None,
    }
}

async fn conn() -> Conn {
    Conn::new(Opts::from_url(&common::mysql_url()).unwrap())
        .await
        .unwrap()
}

/// Drops the test's databases when the test ends, passed or failed (the mariadb client,
/// synchronously: Drop cannot await).
struct Databases(Vec<String>);

impl Databases {
    fn new(base: &str, suffixes: &[&str]) -> Self {
        Self(suffixes.iter().map(|s| format!("{base}{s}")).collect())
    }
}

impl Drop for Databases {
    fn drop(&mut self) {
        let m = master();
        let drops: String = self
            .0
            .iter()
            .map(|db| format!("DROP DATABASE IF EXISTS `{db}`;"))
            .collect();
        let _ = std::process::Command::new("mariadb")
            .args([
                format!("--host={}", m.host),
                format!("--port={}", m.port),
                format!("--user={}", m.username),
                "--protocol=TCP".to_owned(),
                "--skip-ssl".to_owned(),
                "-e".to_owned(),
                drops,
            ])
            .env("MYSQL_PWD", m.password.expose())
            .status();
    }
}

fn base_name() -> String {
    format!(
        "imt_bk_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

async fn bucket() -> (aws_sdk_s3::Client, AwsObjects, String) {
    let sdk = common::test_sdk_config().await;
    let config = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(true)
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(config);
    let bucket = common::unique_name("backup");
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    (s3, AwsObjects::new(&sdk), bucket)
}

async fn get_object(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    s3.get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

async fn database_exists(conn: &mut Conn, db: &str) -> bool {
    let found: Option<String> = conn
        .exec_first(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            (db,),
        )
        .await
        .unwrap();
    found.is_some()
}

/// Every column's type, character set and collation.
async fn columns(
    conn: &mut Conn,
    db: &str,
) -> Vec<(String, String, String, Option<String>, Option<String>)> {
    conn.exec(
        "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, CHARACTER_SET_NAME, COLLATION_NAME \
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, ORDINAL_POSITION",
        (db,),
    )
    .await
    .unwrap()
}

async fn comment_count(conn: &mut Conn) -> i64 {
    conn.query_first("SELECT comment_count FROM wp_posts WHERE ID = 7")
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wordpress_database_survives_dump_damage_and_restore() {
    let started = Instant::now();
    let base = base_name();
    let _guard = Databases::new(&base, &["", "_restored"]);
    let (db, restored) = (base.clone(), format!("{base}_restored"));
    let master = master();
    let mut conn = conn().await;
    common::wordpress::create_wordpress_like(&mut conn, &db).await;
    let before = common::wordpress::table_sums(&mut conn, &db).await;
    let rows: u64 = before.values().map(|(count, _)| count).sum();
    assert!(rows >= 100_000, "{rows} rows");
    let columns_before = columns(&mut conn, &db).await;
    eprintln!("fixture: {rows} rows in {:?}", started.elapsed());

    let (s3, objects, bucket) = bucket().await;
    let key = "archives/dev/acme/wp/op/database.sql.gz";
    let tags: Tags = vec![("bbws:tenant-id".into(), "acme".into())];
    let tools = DumpTools::default();
    let dumping = Instant::now();
    let summary = dump_to(
        &tools,
        &master,
        &db,
        &objects,
        &bucket,
        key,
        &tags,
        DEFAULT_PART_SIZE,
    )
    .await
    .unwrap();
    eprintln!("dump: {summary:?} in {:?}", dumping.elapsed());
    let stored = get_object(&s3, &bucket, key).await;
    assert_eq!(summary.compressed_bytes, stored.len() as u64);
    assert_eq!(summary.sha256, hex::encode(Sha256::digest(&stored)));
    let mut sql = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&stored[..]), &mut sql).unwrap();
    assert_eq!(summary.uncompressed_bytes, sql.len() as u64);
    drop((stored, sql));
    let version: String = conn.query_first("SELECT VERSION()").await.unwrap().unwrap();
    assert_eq!(summary.server_version, version);

    // Damage the live database: rows, the view, the routine.
    for statement in [
        format!("DELETE FROM `{db}`.wp_postmeta WHERE meta_id % 2 = 0"),
        format!("UPDATE `{db}`.wp_posts SET post_content = 'spam' WHERE ID % 3 = 0"),
        format!("UPDATE `{db}`.wp_options SET blob_value = NULL WHERE option_name = 'all_bytes'"),
        format!("DROP VIEW `{db}`.wp_published"),
        format!("DROP PROCEDURE `{db}`.wp_count_meta"),
    ] {
        conn.query_drop(statement).await.unwrap();
    }
    let damaged = common::wordpress::table_sums(&mut conn, &db).await;
    assert_ne!(damaged, before, "the damage changed nothing");

    let restoring = Instant::now();
    let result = restore_from(
        &tools,
        &master,
        &objects,
        &bucket,
        key,
        &summary.sha256,
        &restored,
    )
    .await
    .unwrap();
    eprintln!("restore: {result:?} in {:?}", restoring.elapsed());
    assert_eq!(result.compressed_bytes, summary.compressed_bytes);
    assert_eq!(result.uncompressed_bytes, summary.uncompressed_bytes);

    // Every table: the same rows and CHECKSUM TABLE as before the damage; the same columns
    // with the same character sets and collations.
    assert_eq!(
        common::wordpress::table_sums(&mut conn, &restored).await,
        before
    );
    assert_eq!(columns(&mut conn, &restored).await, columns_before);
    let (charset, collation): (String, String) = conn
        .exec_first(
            "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME \
             FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            (&restored,),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (charset.as_str(), collation.as_str()),
        ("utf8mb4", "utf8mb4_unicode_ci")
    );

    // The content, spot-checked byte for byte.
    conn.query_drop(format!("USE `{restored}`")).await.unwrap();
    let all_bytes: Vec<u8> = conn
        .query_first("SELECT blob_value FROM wp_options WHERE option_name = 'all_bytes'")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all_bytes, (0u8..=255).collect::<Vec<u8>>());
    let long_text: String = conn
        .query_first("SELECT option_value FROM wp_options WHERE option_name = 'long_text'")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        long_text,
        "ßé🙂 ".repeat(common::wordpress::LONG_TEXT_REPEAT)
    );
    let display: String = conn
        .query_first("SELECT display_name FROM wp_users WHERE ID = 42")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(display, "שלום 42 مرحبا 👩‍💻");
    let zero_dates: u64 = conn
        .query_first("SELECT COUNT(*) FROM wp_posts WHERE post_date = '0000-00-00 00:00:00'")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(zero_dates, 3000);
    let nulls: u64 = conn
        .query_first("SELECT COUNT(*) FROM wp_postmeta WHERE meta_value IS NULL")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(nulls, 12_000);
    let legacy: String = conn
        .query_first("SELECT label FROM wp_legacy WHERE id = 2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(legacy, "smörgåsbord");

    // The view, the procedure, the trigger and the event exist and work.
    let published: u64 = conn
        .query_first("SELECT COUNT(*) FROM wp_published")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(published, 24_000);
    conn.query_drop("CALL wp_count_meta(7, @n)").await.unwrap();
    let meta_of_7: i64 = conn.query_first("SELECT @n").await.unwrap().unwrap();
    assert_eq!(meta_of_7, 2);
    let count_before = comment_count(&mut conn).await;
    conn.query_drop("INSERT INTO wp_postmeta (post_id, meta_key) VALUES (7, 'new')")
        .await
        .unwrap();
    assert_eq!(comment_count(&mut conn).await, count_before + 1);
    let event: Option<(String, String)> = conn
        .exec_first(
            "SELECT INTERVAL_VALUE, INTERVAL_FIELD FROM information_schema.EVENTS \
             WHERE EVENT_SCHEMA = ? AND EVENT_NAME = 'wp_purge_transients'",
            (&restored,),
        )
        .await
        .unwrap();
    assert_eq!(event, Some(("1".to_owned(), "DAY".to_owned())));

    // verify_copy sees the damage in the live database.
    let error = verify_copy(&master, &db, &restored).await.unwrap_err();
    for difference in ["wp_postmeta", "wp_posts", "wp_options", "views", "routines"] {
        assert!(error.message.contains(difference), "{difference}: {error}");
    }
    eprintln!("whole test: {:?}", started.elapsed());
}

#[tokio::test]
async fn verify_copy_accepts_a_faithful_copy() {
    let base = base_name();
    let _guard = Databases::new(&base, &["", "_copy"]);
    let (db, copy) = (base.clone(), format!("{base}_copy"));
    let master = master();
    let (_, objects, bucket) = bucket().await;
    let mut conn = conn().await;
    for statement in [
        format!("CREATE DATABASE `{db}`"),
        format!("CREATE TABLE `{db}`.t (id int PRIMARY KEY, v varchar(20) NULL)"),
        format!("INSERT INTO `{db}`.t SELECT seq, IF(seq % 2, 'x', NULL) FROM seq_1_to_500"),
        format!("CREATE VIEW `{db}`.v AS SELECT id FROM `{db}`.t"),
    ] {
        conn.query_drop(statement).await.unwrap();
    }
    let tools = DumpTools::default();
    let summary = dump_to(
        &tools,
        &master,
        &db,
        &objects,
        &bucket,
        "k",
        &Vec::new(),
        DEFAULT_PART_SIZE,
    )
    .await
    .unwrap();
    restore_from(
        &tools,
        &master,
        &objects,
        &bucket,
        "k",
        &summary.sha256,
        &copy,
    )
    .await
    .unwrap();
    let facts = verify_copy(&master, &db, &copy).await.unwrap();
    assert_eq!(facts.tables["t"].rows, 500);
    assert!(facts.views.contains("v"));
    // One changed row is a difference.
    conn.query_drop(format!("UPDATE `{copy}`.t SET v = 'y' WHERE id = 250"))
        .await
        .unwrap();
    let error = verify_copy(&master, &db, &copy).await.unwrap_err();
    assert!(error.message.contains("table t"), "{error}");
}

#[tokio::test]
async fn a_corrupted_or_missing_object_fails_before_any_database_is_created() {
    let base = base_name();
    let _guard = Databases::new(&base, &["", "_target"]);
    let (db, target) = (base.clone(), format!("{base}_target"));
    let master = master();
    let (s3, objects, bucket) = bucket().await;
    let mut conn = conn().await;
    for statement in [
        format!("CREATE DATABASE `{db}`"),
        format!("CREATE TABLE `{db}`.t (id int PRIMARY KEY, v text)"),
        format!("INSERT INTO `{db}`.t SELECT seq, REPEAT('abc', seq) FROM seq_1_to_2000"),
    ] {
        conn.query_drop(statement).await.unwrap();
    }
    let tools = DumpTools::default();
    let key = "b/database.sql.gz";
    let summary = dump_to(
        &tools,
        &master,
        &db,
        &objects,
        &bucket,
        key,
        &Vec::new(),
        DEFAULT_PART_SIZE,
    )
    .await
    .unwrap();

    // One byte flipped in the middle of the object, written back with the SDK.
    let mut body = get_object(&s3, &bucket, key).await;
    let middle = body.len() / 2;
    body[middle] ^= 0x01;
    s3.put_object()
        .bucket(&bucket)
        .key(key)
        .body(body.into())
        .send()
        .await
        .unwrap();
    let error = restore_from(
        &tools,
        &master,
        &objects,
        &bucket,
        key,
        &summary.sha256,
        &target,
    )
    .await
    .unwrap_err();
    assert!(error.message.contains("sha256"), "{error}");
    assert!(!database_exists(&mut conn, &target).await);

    // A missing object: not found, and still no database.
    let error = restore_from(
        &tools,
        &master,
        &objects,
        &bucket,
        "b/none.sql.gz",
        &summary.sha256,
        &target,
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind, ErrorKind::NotFound, "{error}");
    assert!(!database_exists(&mut conn, &target).await);

    // The same restore of an intact object does create it (the checks above could fail).
    let intact = dump_to(
        &tools,
        &master,
        &db,
        &objects,
        &bucket,
        "c",
        &Vec::new(),
        DEFAULT_PART_SIZE,
    )
    .await
    .unwrap();
    restore_from(
        &tools,
        &master,
        &objects,
        &bucket,
        "c",
        &intact.sha256,
        &target,
    )
    .await
    .unwrap();
    assert!(database_exists(&mut conn, &target).await);
    // An existing target database is refused by the client, untouched.
    conn.query_drop(format!("CREATE TABLE `{target}`.marker (id int)"))
        .await
        .unwrap();
    let error = restore_from(
        &tools,
        &master,
        &objects,
        &bucket,
        "c",
        &intact.sha256,
        &target,
    )
    .await
    .unwrap_err();
    assert!(error.message.contains("database exists"), "{error}");
    let marker: Option<String> = conn
        .exec_first(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'marker'",
            (&target,),
        )
        .await
        .unwrap();
    assert!(marker.is_some());
}

#[tokio::test]
async fn a_failing_dump_leaves_no_object_and_no_pending_upload_and_no_secret() {
    let (s3, objects, bucket) = bucket().await;
    let tools = DumpTools::default();
    // A database that does not exist: mariadb-dump exits non-zero after connecting.
    let missing = base_name();
    let error = dump_to(
        &tools,
        &master(),
        &missing,
        &objects,
        &bucket,
        "k",
        &Vec::new(),
        DEFAULT_PART_SIZE,
    )
    .await
    .unwrap_err();
    assert!(error.message.contains(&missing), "{error}");
    // Wrong credentials: the error says why, without the password.
    let mut wrong = master();
    wrong.username = format!("nobody_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    wrong.password = Secret::new("wrong-S3CRET-pass");
    let error = dump_to(
        &tools,
        &wrong,
        "mysql",
        &objects,
        &bucket,
        "k",
        &Vec::new(),
        DEFAULT_PART_SIZE,
    )
    .await
    .unwrap_err();
    assert!(error.message.contains("Access denied"), "{error}");
    assert!(!error.message.contains("wrong-S3CRET-pass"), "{error}");
    let objects_left = s3
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap()
        .contents()
        .len();
    assert_eq!(objects_left, 0);
    let pending = s3
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap()
        .uploads()
        .len();
    assert_eq!(pending, 0);
}
