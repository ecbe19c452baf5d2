//! `MySqlDatabase` against the real MariaDB (`common::mysql_url()`).
//!
//! Every test uses its own database and user names, so tests run in parallel and leave
//! nothing behind when they pass.

mod common;

use instance_manager::cloud::mysql::MySqlDatabase;
use instance_manager::cloud::{Database, DbTls, ErrorKind, MasterCredentials};
use instance_manager::config::Secret;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};

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

/// Fresh names: `(database, user)`. Both are dropped when the test's thread ends, whether
/// the test passed or failed.
fn names(label: &str) -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let names = (
        format!("it_{label}_{}_db", &id[..10]),
        format!("it_{label}_{}", &id[..10]),
    );
    LEFTOVERS.with(|left| left.borrow_mut().0.push(names.clone()));
    names
}

/// The databases and users a test thread named; dropping it (at the thread's end) drops them.
struct Leftovers(Vec<(String, String)>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        if names.is_empty() {
            return;
        }
        // Thread-local destructors run while the thread ends: work on a thread of our own.
        common::run_on_own_thread(move || async move {
            let master = master();
            for (database, user) in &names {
                cleanup(&master, database, user).await;
            }
        });
    }
}

thread_local! {
    static LEFTOVERS: std::cell::RefCell<Leftovers> =
        const { std::cell::RefCell::new(Leftovers(Vec::new())) };
}

async fn connect(
    master: &MasterCredentials,
    user: &str,
    password: &str,
    db: Option<&str>,
) -> mysql_async::Result<Conn> {
    let opts = OptsBuilder::default()
        .ip_or_hostname(master.host.clone())
        .tcp_port(master.port)
        .user(Some(user))
        .pass(Some(password))
        .db_name(db)
        .prefer_socket(false);
    Conn::new(opts).await
}

async fn as_master(master: &MasterCredentials) -> Conn {
    connect(master, &master.username, master.password.expose(), None)
        .await
        .expect("master login")
}

/// Drops the test's leftovers even when an assertion failed halfway.
async fn cleanup(master: &MasterCredentials, database: &str, user: &str) {
    let _ = MySqlDatabase::new()
        .drop_database(master, database, user)
        .await;
}

#[tokio::test]
async fn tenant_database_and_user_lifecycle() {
    let master = master();
    let mysql = MySqlDatabase::new();
    let (database, user) = names("life");
    let (other_database, other_user) = names("other");
    let password = Secret::new("first-Pa55'word\\with;odd\"chars");

    // Twice: the second call adopts everything.
    mysql
        .ensure_database(&master, &database, &user, &password)
        .await
        .unwrap();
    mysql
        .ensure_database(&master, &database, &user, &password)
        .await
        .unwrap();
    mysql
        .ensure_database(
            &master,
            &other_database,
            &other_user,
            &Secret::new("other-password-1"),
        )
        .await
        .unwrap();
    assert!(mysql.database_exists(&master, &database).await.unwrap());
    assert!(mysql.user_exists(&master, &user).await.unwrap());

    let mut admin = as_master(&master).await;
    let charset: Option<(String, String)> = admin
        .exec_first(
            "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            (&database,),
        )
        .await
        .unwrap();
    assert_eq!(
        charset,
        Some(("utf8mb4".into(), "utf8mb4_unicode_ci".into()))
    );

    // The tenant logs in with its password and owns its database...
    let mut tenant = connect(&master, &user, password.expose(), Some(&database))
        .await
        .unwrap();
    tenant
        .query_drop("CREATE TABLE wp_options (option_id INT PRIMARY KEY, option_value TEXT)")
        .await
        .unwrap();
    tenant
        .query_drop("INSERT INTO wp_options VALUES (1, 'x')")
        .await
        .unwrap();
    // ...and nothing else.
    let denied = tenant
        .query_drop(format!("CREATE TABLE `{other_database}`.intruder (id INT)"))
        .await
        .unwrap_err();
    assert!(
        matches!(&denied, mysql_async::Error::Server(e) if e.code == 1142 || e.code == 1044),
        "{denied}"
    );
    assert!(
        connect(&master, &user, password.expose(), Some(&other_database))
            .await
            .is_err()
    );
    drop(tenant);

    // A reset password replaces the old one.
    let reset = Secret::new("second-password-2");
    mysql
        .ensure_database(&master, &database, &user, &reset)
        .await
        .unwrap();
    assert!(
        connect(&master, &user, password.expose(), None)
            .await
            .is_err(),
        "old password still works"
    );
    let mut tenant = connect(&master, &user, reset.expose(), Some(&database))
        .await
        .unwrap();
    let kept: Option<String> = tenant
        .query_first("SELECT option_value FROM wp_options")
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some("x"), "ensuring again keeps the data");
    drop(tenant);

    // Drop removes both, and dropping again is fine.
    mysql
        .drop_database(&master, &database, &user)
        .await
        .unwrap();
    mysql
        .drop_database(&master, &database, &user)
        .await
        .unwrap();
    assert!(!mysql.database_exists(&master, &database).await.unwrap());
    assert!(!mysql.user_exists(&master, &user).await.unwrap());
    assert!(connect(&master, &user, reset.expose(), None).await.is_err());
    cleanup(&master, &other_database, &other_user).await;
    let _ = admin.disconnect().await;
}

#[tokio::test]
async fn dump_restores_into_a_fresh_database() {
    let master = master();
    let mysql = MySqlDatabase::new();
    let (database, user) = names("dump");
    let (restored, restored_user) = names("restore");
    mysql
        .ensure_database(&master, &database, &user, &Secret::new("dump-password-1"))
        .await
        .unwrap();

    let mut admin = as_master(&master).await;
    admin.query_drop(format!("USE `{database}`")).await.unwrap();
    admin
        .query_drop(
            "CREATE TABLE wp_posts (
                id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
                title VARCHAR(200) NOT NULL,
                body LONGTEXT,
                price DECIMAL(10,2),
                ratio DOUBLE,
                raw BLOB,
                flags BIT(8),
                created DATETIME,
                seen TIMESTAMP NULL,
                title_len INT AS (CHAR_LENGTH(title)) VIRTUAL
            ) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
        )
        .await
        .unwrap();
    admin
        .query_drop("CREATE TABLE wp_empty (id INT PRIMARY KEY)")
        .await
        .unwrap();
    // A zero id is kept only when asked for: the dump must keep it too.
    admin
        .query_drop("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_AUTO_VALUE_ON_ZERO')")
        .await
        .unwrap();
    let tricky = "it's a \"quote\", a back\\slash, a newline\n, a tab\t, unicode ✓ 🎉 and ; DROP TABLE x; --";
    let blob: Vec<u8> = (0..=255).collect();
    admin
        .exec_drop(
            "INSERT INTO wp_posts (id, title, body, price, ratio, raw, flags, created, seen) VALUES (?, ?, ?, ?, ?, ?, b'10100101', ?, ?)",
            (0u64, "zero id", tricky, "12.50", 0.1f64, blob.clone(), "2024-02-29 23:59:59", "2024-01-01 00:00:00"),
        )
        .await
        .unwrap();
    admin
        .query_drop("INSERT INTO wp_posts (title, body) VALUES ('second', NULL)")
        .await
        .unwrap();
    // Enough rows to need several INSERT statements.
    let bulk: Vec<String> = (0..600)
        .map(|i| format!("('bulk {i}', REPEAT('y', 2000))"))
        .collect();
    admin
        .query_drop(format!(
            "INSERT INTO wp_posts (title, body) VALUES {}",
            bulk.join(",")
        ))
        .await
        .unwrap();

    let dump = mysql.dump_database(&master, &database).await.unwrap();
    let text = String::from_utf8(dump).expect("the dump is UTF-8");
    assert!(
        text.contains("CREATE TABLE `wp_posts`"),
        "{}",
        &text[..text.len().min(2000)]
    );
    assert!(text.contains("CREATE TABLE `wp_empty`"));
    assert!(text.contains("INSERT INTO `wp_posts`"));
    assert!(
        text.matches("INSERT INTO `wp_posts`").count() > 1,
        "rows are batched"
    );
    assert!(
        !text.contains(&format!("`{database}`")) && !text.contains("USE "),
        "the dump refers to no database"
    );

    // Restore into a fresh database and compare every row.
    mysql
        .ensure_database(
            &master,
            &restored,
            &restored_user,
            &Secret::new("restore-password-1"),
        )
        .await
        .unwrap();
    let mut restore = as_master(&master).await;
    restore
        .query_drop(format!("USE `{restored}`"))
        .await
        .unwrap();
    // The server's strict default mode must not be what the dump relies on.
    restore
        .query_drop("SET SESSION sql_mode = 'NO_BACKSLASH_ESCAPES,STRICT_ALL_TABLES'")
        .await
        .unwrap();
    restore.query_drop(&text).await.expect("the dump restores");
    let mode: Option<String> = restore
        .query_first("SELECT @@SESSION.sql_mode")
        .await
        .unwrap();
    let mut mode: Vec<String> = mode.unwrap().split(',').map(str::to_owned).collect();
    mode.sort();
    assert_eq!(
        mode,
        ["NO_BACKSLASH_ESCAPES", "STRICT_ALL_TABLES"],
        "the dump restores the session"
    );

    let checksum = |db: &str| {
        format!(
            "SELECT COUNT(*), SUM(CRC32(CONCAT_WS('|', id, title, body, price, ratio, HEX(raw), flags + 0, created, seen, title_len))) FROM `{db}`.wp_posts"
        )
    };
    let original: Option<(u64, u64)> = admin.query_first(checksum(&database)).await.unwrap();
    let copy: Option<(u64, u64)> = admin.query_first(checksum(&restored)).await.unwrap();
    assert_eq!(original, copy);
    assert_eq!(original.unwrap().0, 602);
    let row: Option<(String, Vec<u8>, String)> = admin
        .query_first(format!(
            "SELECT body, raw, CAST(seen AS CHAR) FROM `{restored}`.wp_posts WHERE id = 0"
        ))
        .await
        .unwrap();
    assert_eq!(
        row,
        Some((tricky.to_owned(), blob, "2024-01-01 00:00:00".to_owned()))
    );

    cleanup(&master, &database, &user).await;
    cleanup(&master, &restored, &restored_user).await;
    let missing = mysql.dump_database(&master, &database).await.unwrap_err();
    assert_eq!(missing.kind, ErrorKind::NotFound, "{missing}");
}

#[tokio::test]
async fn unsafe_identifiers_are_refused_before_any_sql() {
    let master = master();
    let mysql = MySqlDatabase::new();
    let password = Secret::new("irrelevant-1");
    for bad in [
        "a`b",
        "x'; DROP DATABASE mysql; --",
        "a;b",
        "Upper",
        "a-b",
        "",
    ] {
        let error = mysql
            .ensure_database(&master, bad, "ok_user", &password)
            .await
            .unwrap_err();
        assert_eq!(error.kind, ErrorKind::Fatal, "{bad}: {error}");
        let error = mysql
            .ensure_database(&master, "ok_db", bad, &password)
            .await
            .unwrap_err();
        assert_eq!(error.kind, ErrorKind::Fatal, "{bad}: {error}");
        assert!(mysql.drop_database(&master, bad, "ok_user").await.is_err());
        assert!(mysql.dump_database(&master, bad).await.is_err());
        assert!(mysql.database_exists(&master, bad).await.is_err());
        assert!(mysql.user_exists(&master, bad).await.is_err());
    }
    assert!(!mysql.database_exists(&master, "ok_db").await.unwrap());
}

#[tokio::test]
async fn errors_never_show_a_password() {
    let master = master();
    let mysql = MySqlDatabase::new();

    // Wrong master password: access denied is not worth retrying.
    let wrong = MasterCredentials {
        password: Secret::new("wrong-master-S3CRET"),
        username: format!("nobody_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        ..master.clone()
    };
    let error = mysql.database_exists(&wrong, "some_db").await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Fatal, "{error}");
    assert!(!error.message.contains("wrong-master-S3CRET"), "{error}");

    // Nothing listening: worth retrying.
    let down = MasterCredentials {
        port: common::free_port(),
        password: Secret::new("down-S3CRET"),
        ..master.clone()
    };
    let error = mysql.database_exists(&down, "some_db").await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Retryable, "{error}");
    assert!(!error.message.contains("down-S3CRET"), "{error}");

    // A master that may create the database but not users: the failure comes while the
    // tenant password is in play.
    let (database, user) = names("pw");
    let limited = format!("it_lim_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut admin = as_master(&master).await;
    admin
        .query_drop(format!(
            "CREATE USER `{limited}`@'%' IDENTIFIED BY 'limited-S3CRET'"
        ))
        .await
        .unwrap();
    admin
        .query_drop(format!(
            "GRANT CREATE, DROP ON `{database}`.* TO `{limited}`@'%'"
        ))
        .await
        .unwrap();
    let limited_master = MasterCredentials {
        username: limited.clone(),
        password: Secret::new("limited-S3CRET"),
        ..master.clone()
    };
    let password = Secret::new("tenant-S3CRET-value");
    let error = mysql
        .ensure_database(&limited_master, &database, &user, &password)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Fatal, "{error}");
    assert!(error.message.contains(&user), "names what failed: {error}");
    for secret in ["tenant-S3CRET-value", "limited-S3CRET"] {
        assert!(!error.message.contains(secret), "{error}");
        assert!(!format!("{error:?}").contains(secret), "{error:?}");
    }
    admin
        .query_drop(format!("DROP USER `{limited}`@'%'"))
        .await
        .unwrap();
    cleanup(&master, &database, &user).await;
    let _ = admin.disconnect().await;
}

/// A draining task holding a metadata lock on a tenant table must not make `DROP DATABASE`
/// wait for days: with a 1 s lock wait it fails, retryably, in about that time.
#[tokio::test]
async fn drop_database_behind_a_metadata_lock_gives_up_retryably() {
    use instance_manager::cloud::DbTimeouts;
    use std::time::{Duration, Instant};

    let master = master();
    let (database, user) = names("locked");
    let mysql = MySqlDatabase::with_timeouts(DbTimeouts {
        connect: Duration::from_secs(5),
        lock_wait: Duration::from_secs(1),
        statement: Duration::from_secs(30),
    });
    mysql
        .ensure_database(&master, &database, &user, &Secret::new("locked-password-1"))
        .await
        .unwrap();
    // Another session (the "draining task") with an open transaction that read the table:
    // it holds a shared metadata lock until it commits.
    let mut holder = as_master(&master).await;
    holder
        .query_drop(format!("CREATE TABLE `{database}`.t (id INT PRIMARY KEY)"))
        .await
        .unwrap();
    holder.query_drop("START TRANSACTION").await.unwrap();
    holder
        .query_drop(format!("SELECT * FROM `{database}`.t"))
        .await
        .unwrap();

    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        mysql.drop_database(&master, &database, &user),
    )
    .await
    .expect("drop_database must not hang behind the metadata lock");
    let took = started.elapsed();
    let error = outcome.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Retryable, "{error}");
    assert!(error.message.contains("1205"), "{error}");
    assert!(
        took < Duration::from_secs(10),
        "gave up after {took:?}, configured lock wait 1 s"
    );
    assert!(mysql.database_exists(&master, &database).await.unwrap());

    // Once the lock is released, the retry succeeds.
    holder.query_drop("COMMIT").await.unwrap();
    mysql
        .drop_database(&master, &database, &user)
        .await
        .unwrap();
    assert!(!mysql.database_exists(&master, &database).await.unwrap());
    let _ = holder.disconnect().await;
    cleanup(&master, &database, &user).await;
}

#[tokio::test]
async fn database_names_are_claimed_by_one_owner() {
    use instance_manager::cloud::DatabaseClaim;
    let master = master();
    let mysql = MySqlDatabase::new();
    let (database, user) = names("claim");
    let (a, b) = ("tenants/t/instances/a", "tenants/t/instances/b");

    assert_eq!(
        mysql
            .claim_database(&master, &database, &user, a)
            .await
            .unwrap(),
        DatabaseClaim::Ours
    );
    // Idempotent for the owner, refused to anyone else.
    assert_eq!(
        mysql
            .claim_database(&master, &database, &user, a)
            .await
            .unwrap(),
        DatabaseClaim::Ours
    );
    assert_eq!(
        mysql
            .claim_database(&master, &database, &user, b)
            .await
            .unwrap(),
        DatabaseClaim::Theirs(a.to_owned())
    );
    assert_eq!(
        mysql
            .database_owner(&master, &database)
            .await
            .unwrap()
            .as_deref(),
        Some(a)
    );
    // Only the owner's release counts.
    mysql.release_database(&master, &database, b).await.unwrap();
    assert_eq!(
        mysql
            .database_owner(&master, &database)
            .await
            .unwrap()
            .as_deref(),
        Some(a)
    );
    mysql
        .ensure_database(&master, &database, &user, &Secret::new("claim-Pa55word"))
        .await
        .unwrap();
    mysql
        .drop_database(&master, &database, &user)
        .await
        .unwrap();
    mysql.release_database(&master, &database, a).await.unwrap();
    assert_eq!(
        mysql.database_owner(&master, &database).await.unwrap(),
        None
    );

    // A database that exists without a claim (made by hand, or by someone else) is never
    // claimed, and neither is a user of the name.
    let mut conn = as_master(&master).await;
    conn.query_drop(format!("CREATE DATABASE `{database}`"))
        .await
        .unwrap();
    assert!(matches!(
        mysql
            .claim_database(&master, &database, &user, a)
            .await
            .unwrap(),
        DatabaseClaim::Theirs(_)
    ));
    conn.query_drop(format!("DROP DATABASE `{database}`"))
        .await
        .unwrap();
    conn.query_drop(format!(
        "CREATE USER `{user}`@'%' IDENTIFIED BY 'x-Pa55word'"
    ))
    .await
    .unwrap();
    assert!(matches!(
        mysql
            .claim_database(&master, &database, &user, a)
            .await
            .unwrap(),
        DatabaseClaim::Theirs(_)
    ));
    conn.query_drop(format!("DROP USER `{user}`@'%'"))
        .await
        .unwrap();
    assert_eq!(
        mysql.database_owner(&master, &database).await.unwrap(),
        None
    );
    cleanup(&master, &database, &user).await;
}

#[tokio::test]
async fn a_tenant_login_is_checked_with_its_own_password() {
    let master = master();
    let db = MySqlDatabase::new();
    let (database, user) = names("login");
    let password = Secret::new("Tenant-Pass'word-42");
    db.ensure_database(&master, &database, &user, &password)
        .await
        .unwrap();
    let login = |password: &str| MasterCredentials {
        username: user.clone(),
        password: Secret::new(password),
        ..master.clone()
    };
    db.check_login(&login(password.expose()), &database)
        .await
        .unwrap();

    // The password changed on the server behind the secret's back.
    let mut root = Conn::new(OptsBuilder::from_opts(
        Opts::from_url(&common::mysql_url()).unwrap(),
    ))
    .await
    .unwrap();
    root.query_drop(format!(
        "ALTER USER '{user}'@'%' IDENTIFIED BY 'another-secret-77'"
    ))
    .await
    .unwrap();
    root.disconnect().await.unwrap();
    let error = db
        .check_login(&login(password.expose()), &database)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Fatal, "{error}");
    assert!(error.message.contains("1045"), "{error}");
    assert!(!error.message.contains(password.expose()), "{error}");
    assert!(!error.message.contains("another-secret-77"), "{error}");
    db.check_login(&login("another-secret-77"), &database)
        .await
        .unwrap();

    // A database the user has no grant on.
    let error = db
        .check_login(&login("another-secret-77"), "mysql")
        .await
        .unwrap_err();
    assert!(error.message.contains("use database mysql"), "{error}");
}

/// In GRANT a database name is a pattern where `_` matches any character: the grant of
/// `it_wc_{id}_db` would also open `it_wcx{id}_db`, another tenant's. The tenant's user
/// reaches its own database only — also one left with such a grant by an earlier version.
#[tokio::test]
async fn a_tenant_user_cannot_reach_a_database_its_name_pattern_would_match() {
    let master = master();
    let mysql = MySqlDatabase::new();
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let ours = (format!("it_wc_{id}_db"), format!("it_wc_{id}"));
    let theirs = (format!("it_wcx{id}_db"), format!("it_wcx{id}"));
    LEFTOVERS.with(|left| {
        let mut left = left.borrow_mut();
        left.0.push(ours.clone());
        left.0.push(theirs.clone());
    });
    let our_password = Secret::new("ours-Pa55word");
    let their_password = Secret::new("theirs-Pa55word");
    mysql
        .ensure_database(&master, &ours.0, &ours.1, &our_password)
        .await
        .unwrap();
    mysql
        .ensure_database(&master, &theirs.0, &theirs.1, &their_password)
        .await
        .unwrap();
    let mut them = connect(&master, &theirs.1, their_password.expose(), Some(&theirs.0))
        .await
        .unwrap();
    them.query_drop("CREATE TABLE wp_users (id INT PRIMARY KEY, pass TEXT)")
        .await
        .unwrap();
    them.query_drop("INSERT INTO wp_users VALUES (1, 'their-hash')")
        .await
        .unwrap();
    drop(them);

    let denied = |error: &mysql_async::Error| matches!(error, mysql_async::Error::Server(e) if e.code == 1142 || e.code == 1044);
    let assert_isolated = |label: &'static str| {
        let master = master.clone();
        let ours = ours.clone();
        let theirs = theirs.clone();
        let password = our_password.clone();
        async move {
            let mut us = connect(&master, &ours.1, password.expose(), Some(&ours.0))
                .await
                .unwrap();
            let read = us
                .query_drop(format!("SELECT * FROM `{}`.wp_users", theirs.0))
                .await
                .unwrap_err();
            assert!(denied(&read), "{label}: {read}");
            let write = us
                .query_drop(format!("DROP TABLE `{}`.wp_users", theirs.0))
                .await
                .unwrap_err();
            assert!(denied(&write), "{label}: {write}");
            // Its own database stays fully usable.
            us.query_drop("CREATE TABLE mine (id INT)").await.unwrap();
            us.query_drop("DROP TABLE mine").await.unwrap();
            drop(us);
            let error = connect(&master, &ours.1, password.expose(), Some(&theirs.0))
                .await
                .unwrap_err();
            assert!(denied(&error), "{label}: {error}");
        }
    };
    assert_isolated("as created").await;

    // The grant an earlier version made (unescaped), then our ensure again: it is revoked.
    let mut admin = as_master(&master).await;
    admin
        .query_drop(format!(
            "GRANT ALL PRIVILEGES ON `{}`.* TO `{}`@'%'",
            ours.0, ours.1
        ))
        .await
        .unwrap();
    let mut us = connect(&master, &ours.1, our_password.expose(), Some(&ours.0))
        .await
        .unwrap();
    let leaked: Option<String> = us
        .query_first(format!("SELECT pass FROM `{}`.wp_users", theirs.0))
        .await
        .expect("the unescaped grant matches the other database (the hole this closes)");
    assert_eq!(leaked.as_deref(), Some("their-hash"));
    drop(us);
    mysql
        .ensure_database(&master, &ours.0, &ours.1, &our_password)
        .await
        .unwrap();
    assert_isolated("after the old grant was revoked").await;
    let _ = admin.disconnect().await;
}

/// `REQUIRE SSL` where the environment's database speaks TLS: the user's definition says so
/// and a plain-text login is refused; without the setting the requirement is lifted again.
/// (The shared MariaDB may have no TLS at all — `have_ssl` — so the TLS login itself is
/// tested against a TLS server in `cloud_mysql_tls`.)
#[tokio::test]
async fn a_tenant_user_requires_tls_when_the_platform_says_so() {
    let master = master();
    let mysql = MySqlDatabase::new();
    let (database, user) = names("tls");
    let password = Secret::new("tls-Pa55word");
    mysql
        .ensure_tenant_database(&master, &database, &user, &password, true)
        .await
        .unwrap();
    let mut admin = as_master(&master).await;
    let created = show_create_user(&mut admin, &user).await;
    assert!(created.contains("REQUIRE SSL"), "{created}");
    // This client connects without TLS: refused whether or not the server has TLS.
    let error = connect(&master, &user, password.expose(), Some(&database))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, mysql_async::Error::Server(e) if e.code == 1045),
        "{error}"
    );

    mysql
        .ensure_tenant_database(&master, &database, &user, &password, false)
        .await
        .unwrap();
    let lifted = show_create_user(&mut admin, &user).await;
    assert!(!lifted.contains("REQUIRE SSL"), "{lifted}");
    connect(&master, &user, password.expose(), Some(&database))
        .await
        .expect("a plain login once TLS is not required");
    let _ = admin.disconnect().await;
}

async fn show_create_user(admin: &mut Conn, user: &str) -> String {
    let row: Option<String> = admin
        .query_first(format!("SHOW CREATE USER `{user}`@'%'"))
        .await
        .unwrap();
    row.expect("the user exists")
}
