//! SQL helpers for backup and restore tests, by the test's own queries on the real MariaDB
//! (as the master user): a small WordPress-like schema, per-table sums, databases by prefix.

use std::collections::BTreeMap;

use mysql_async::prelude::Queryable;

pub async fn master_conn() -> mysql_async::Conn {
    let master = super::mariadb();
    mysql_async::Conn::new(
        mysql_async::OptsBuilder::default()
            .ip_or_hostname(master.host.clone())
            .tcp_port(master.port)
            .user(Some(master.username.clone()))
            .pass(Some(master.password.expose().to_owned())),
    )
    .await
    .unwrap()
}

/// A small WordPress-like schema with a view, a trigger and a routine, in the tenant's
/// (existing) database.
pub async fn fill(db: &str) {
    let mut conn = master_conn().await;
    for statement in [
        format!("USE `{db}`"),
        "CREATE TABLE wp_posts (ID bigint unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY, \
         post_title text NOT NULL, comment_count bigint NOT NULL DEFAULT 0) ENGINE=InnoDB"
            .into(),
        "CREATE TABLE wp_postmeta (meta_id bigint unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY, \
         post_id bigint unsigned NOT NULL, meta_value longtext NULL) ENGINE=InnoDB"
            .into(),
        "INSERT INTO wp_posts (post_title) SELECT CONCAT('Post ', seq, ' 🎉 עברית') FROM seq_1_to_2000"
            .into(),
        "CREATE VIEW wp_titles AS SELECT ID, post_title FROM wp_posts".into(),
        "CREATE TRIGGER wp_meta_count AFTER INSERT ON wp_postmeta FOR EACH ROW \
         UPDATE wp_posts SET comment_count = comment_count + 1 WHERE ID = NEW.post_id"
            .into(),
        "INSERT INTO wp_postmeta (post_id, meta_value) SELECT seq % 2000 + 1, \
         IF(seq % 5 = 0, NULL, REPEAT('m', seq % 50)) FROM seq_1_to_5000"
            .into(),
        "CREATE PROCEDURE wp_count(OUT n BIGINT) SELECT COUNT(*) INTO n FROM wp_posts".into(),
    ] {
        conn.query_drop(&statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// (COUNT(*), CHECKSUM TABLE) per table, by the test's own SQL.
pub async fn table_sums(db: &str) -> BTreeMap<String, (u64, Option<u64>)> {
    super::common::wordpress::table_sums(&mut master_conn().await, db).await
}

/// Databases whose name starts with `prefix`.
pub async fn databases_like(prefix: &str) -> Vec<String> {
    let mut conn = master_conn().await;
    let all: Vec<String> = conn
        .query("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA")
        .await
        .unwrap();
    all.into_iter().filter(|d| d.starts_with(prefix)).collect()
}

/// The live data changed after the backup: rows updated, deleted and added, a view dropped.
pub async fn damage(db: &str) {
    let mut conn = master_conn().await;
    for statement in [
        format!("UPDATE `{db}`.wp_posts SET post_title = 'defaced' WHERE ID % 3 = 0"),
        format!("DELETE FROM `{db}`.wp_postmeta WHERE meta_id % 2 = 0"),
        format!("INSERT INTO `{db}`.wp_posts (post_title) VALUES ('spam')"),
        format!("DROP VIEW `{db}`.wp_titles"),
    ] {
        conn.query_drop(&statement).await.unwrap();
    }
}
