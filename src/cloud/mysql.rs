//! [`Database`] over a real MySQL/MariaDB connection, with the environment's master
//! credentials: tenant databases and users, and a logical dump written by us (no `mysqldump`
//! binary needed in the control plane's image).
//!
//! One short-lived connection per call: these calls are rare (a few per workflow), and a
//! connection of our own lets us set session variables (sql_mode, time zone, a consistent
//! snapshot) without leaking them into a pool.
//!
//! Time limits ([`DbTimeouts`]): connecting is bounded; every session sets
//! `lock_wait_timeout` and `innodb_lock_wait_timeout` (so `DROP DATABASE` behind a metadata
//! lock fails with a retryable error instead of waiting for days) and a statement time limit
//! (MariaDB `max_statement_time`; MySQL `max_execution_time`, which covers SELECTs only);
//! and every query runs under a client-side timeout a little longer than those, as a
//! backstop for what the server does not bound. Every timeout is retryable.
//!
//! Passwords: MySQL and MariaDB accept no placeholder in `IDENTIFIED BY` (the server answers
//! a syntax error to `IDENTIFIED BY ?`), so the password is inlined as a string literal,
//! escaped for the session's actual `sql_mode`. It is never logged, and every error message
//! built while it is in play has it redacted.

use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, SslOpts, Value};

use super::settings::{DbTimeouts, Secret};
use super::{
    CloudError, CloudResult, Database, DatabaseClaim, DatabaseRecord, DbTls, ErrorKind,
    MasterCredentials,
};

/// How much longer than the server's own limits the client waits for a statement.
const BACKSTOP_MARGIN: Duration = Duration::from_secs(5);
/// Each INSERT of the dump carries rows up to about this many bytes, well under the
/// default `max_allowed_packet` (64 MiB on MySQL 8, 16 MiB on MariaDB 10.11).
const INSERT_BATCH_BYTES: usize = 512 * 1024;
/// `value` as the literal start of a LIKE pattern whose escape character is `!`.
fn like_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '%' | '_' | '!') {
            out.push('!');
        }
        out.push(c);
    }
    out
}

/// MySQL's identifier limit (database names); MySQL 8 limits user names to 32 and will
/// refuse longer ones itself.
const MAX_IDENTIFIER_LEN: usize = 64;
/// Schema and table recording which instance owns which tenant database.
const OWNERSHIP_SCHEMA: &str = "instance_manager";
const OWNERSHIP_TABLE: &str = "`instance_manager`.`owned_databases`";

/// The MySQL implementation of [`Database`]. It holds only its time limits: the master
/// credentials come with every call (they live in the environment's secret and may be
/// rotated).
#[derive(Debug, Clone, Copy, Default)]
pub struct MySqlDatabase {
    timeouts: DbTimeouts,
}

impl MySqlDatabase {
    /// With the default time limits.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_timeouts(timeouts: DbTimeouts) -> Self {
        Self { timeouts }
    }

    /// Claims `database` (and records `user` with it) for `owner`: a name someone holds is
    /// theirs; an unclaimed one is claimed only if no database of that name exists — and,
    /// with `user_must_be_new`, no user of that name either (a first claim creates both;
    /// a restore's further database reuses the owner's user). The primary key settles a
    /// race between two claimants.
    async fn claim(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
        owner: &str,
        user_must_be_new: bool,
    ) -> CloudResult<DatabaseClaim> {
        quote_identifier("database", database)?;
        quote_identifier("user", user)?;
        let mut session = Session::open(master, self.timeouts).await?;
        let result = async {
            session.ensure_ownership_table().await?;
            if let Some(holder) = session.owner_of(database).await? {
                return Ok(if holder == owner {
                    DatabaseClaim::Ours
                } else {
                    DatabaseClaim::Theirs(holder)
                });
            }
            // Unclaimed: an existing database (or user) of that name was made by someone
            // else and is never adopted.
            let databases = session
                .count(
                    &format!("look up database {database}"),
                    "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                    vec![database.into()],
                )
                .await?;
            let users = if user_must_be_new {
                session
                    .count(
                        &format!("look up user {user}"),
                        "SELECT COUNT(*) FROM mysql.user WHERE User = ?",
                        vec![user.into()],
                    )
                    .await?
            } else {
                0
            };
            if databases > 0 || users > 0 {
                return Ok(DatabaseClaim::Theirs(
                    "nobody recorded (it existed before)".into(),
                ));
            }
            session
                .exec(
                    &format!("claim database {database}"),
                    &format!(
                        "INSERT IGNORE INTO {OWNERSHIP_TABLE} (database_name, user_name, owner) VALUES (?, ?, ?)"
                    ),
                    vec![database.into(), user.into(), owner.into()],
                )
                .await?;
            Ok(match session.owner_of(database).await? {
                Some(holder) if holder == owner => DatabaseClaim::Ours,
                Some(holder) => DatabaseClaim::Theirs(holder),
                None => DatabaseClaim::Theirs("nobody (the claim vanished)".into()),
            })
        }
        .await;
        session.close().await;
        result
    }
}

/// Refuses anything but `[a-z0-9_]` (names come from validated ids; this is defence in
/// depth) and returns the backtick-quoted identifier.
pub fn quote_identifier(kind: &str, name: &str) -> CloudResult<String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IDENTIFIER_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(CloudError::fatal(format!(
            "invalid mysql {kind} name {name:?}: only [a-z0-9_], 1 to {MAX_IDENTIFIER_LEN} characters"
        )));
    }
    Ok(format!("`{name}`"))
}

/// A quoted database name as a GRANT's database pattern: in GRANT, `_` and `%` are
/// wildcards, so `tenant_a_b_dev_db` would also match `tenant_axb_dev_db` (the database of
/// tenant `axb`); escaped, it names one database only.
pub fn grant_pattern(quoted: &str) -> String {
    quoted.replace('_', "\\_").replace('%', "\\%")
}

/// Quotes a name we did not choose (a table or column found in a tenant's database).
fn quote_any_identifier(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A single-quoted string literal of `bytes` (which must hold no NUL when
/// `no_backslash_escapes`), as `mysql_real_escape_string` would write it.
fn string_literal(out: &mut Vec<u8>, bytes: &[u8], no_backslash_escapes: bool) {
    out.push(b'\'');
    for &b in bytes {
        if no_backslash_escapes {
            if b == b'\'' {
                out.extend_from_slice(b"''");
            } else {
                out.push(b);
            }
            continue;
        }
        match b {
            0 => out.extend_from_slice(b"\\0"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\'' => out.extend_from_slice(b"\\'"),
            b'"' => out.extend_from_slice(b"\\\""),
            0x1a => out.extend_from_slice(b"\\Z"),
            _ => out.push(b),
        }
    }
    out.push(b'\'');
}

/// Replaces every occurrence of the secrets in `text` (also in escaped form, as a server
/// may quote a statement back) with `<redacted>`.
fn redact(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        for form in [
            secret.to_string(),
            escaped_text(secret, false),
            escaped_text(secret, true),
        ] {
            if !form.is_empty() {
                text = text.replace(&form, "<redacted>");
            }
        }
    }
    text
}

fn escaped_text(value: &str, no_backslash_escapes: bool) -> String {
    let mut out = Vec::new();
    string_literal(&mut out, value.as_bytes(), no_backslash_escapes);
    let quoted = String::from_utf8_lossy(&out).into_owned();
    quoted[1..quoted.len() - 1].to_owned()
}

/// Server error codes worth retrying: the server is busy, shutting down or lost us.
const RETRYABLE_SERVER_CODES: &[u16] = &[
    1040, // ER_CON_COUNT_ERROR: too many connections
    1053, // ER_SERVER_SHUTDOWN
    1158, 1159, 1160, 1161, // network read/write errors and timeouts
    1205, // ER_LOCK_WAIT_TIMEOUT
    1213, // ER_LOCK_DEADLOCK
    1317, // ER_QUERY_INTERRUPTED
    1927, // ER_CONNECTION_KILLED (MariaDB)
    1969, // ER_STATEMENT_TIMEOUT (MariaDB max_statement_time)
    3024, // ER_QUERY_TIMEOUT (MySQL max_execution_time)
    2006, 2013, // server gone away, lost connection
];

/// Classifies a MySQL failure of `what`; `secrets` are redacted from the message.
fn classify_mysql(what: &str, error: &mysql_async::Error, secrets: &[&str]) -> CloudError {
    use mysql_async::{DriverError, Error};
    let (kind, detail) = match error {
        // A refused certificate or a broken handshake will not heal by retrying.
        Error::Io(mysql_async::IoError::Tls(tls)) => {
            (ErrorKind::Fatal, format!("TLS handshake failed: {tls}"))
        }
        Error::Io(mysql_async::IoError::Io(io)) if io.kind() == std::io::ErrorKind::InvalidData => {
            (ErrorKind::Fatal, format!("TLS handshake failed: {io}"))
        }
        Error::Io(io) => (ErrorKind::Retryable, format!("connection failed: {io}")),
        Error::Driver(DriverError::ConnectionClosed | DriverError::PoolDisconnected) => {
            (ErrorKind::Retryable, error.to_string())
        }
        Error::Server(server) => {
            let kind = if RETRYABLE_SERVER_CODES.contains(&server.code) {
                ErrorKind::Retryable
            } else {
                ErrorKind::Fatal
            };
            (
                kind,
                format!(
                    "error {} ({}): {}",
                    server.code, server.state, server.message
                ),
            )
        }
        Error::Driver(_) | Error::Other(_) | Error::Url(_) => (ErrorKind::Fatal, error.to_string()),
    };
    CloudError::new(kind, redact(&format!("{what}: {detail}"), secrets))
}

/// ER_UNKNOWN_SYSTEM_VARIABLE: a server without the statement time limit we asked for.
const UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;

/// Awaits one query for at most `limit`; running out is a retryable error.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    secrets: &[&str],
    query: impl Future<Output = mysql_async::Result<T>>,
) -> CloudResult<T> {
    match tokio::time::timeout(limit, query).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(classify_mysql(what, &error, secrets)),
        Err(_) => Err(CloudError::new(
            ErrorKind::Retryable,
            format!("{what}: no answer from mysql within {limit:?}"),
        )),
    }
}

/// The session variables that bound lock waits and statements; `mariadb` picks the
/// statement limit's name (and unit). `None` for the statement limit leaves it out.
fn limits_statement(timeouts: &DbTimeouts, statement_limit: Option<bool>) -> String {
    // Both lock waits are whole seconds, and 0 would mean "never wait" on some versions.
    let lock_wait = timeouts.lock_wait.as_secs().max(1);
    let mut sql = format!(
        "SET SESSION lock_wait_timeout = {lock_wait}, innodb_lock_wait_timeout = {lock_wait}"
    );
    match statement_limit {
        // MariaDB: seconds, fractions allowed, every statement.
        Some(true) => {
            let _ = write!(
                sql,
                ", max_statement_time = {:.3}",
                timeouts.statement.as_secs_f64()
            );
        }
        // MySQL 5.7.8+: milliseconds, read-only SELECTs only.
        Some(false) => {
            let _ = write!(
                sql,
                ", max_execution_time = {}",
                timeouts.statement.as_millis().max(1)
            );
        }
        None => {}
    }
    sql
}

/// Connection options for the master user, with the platform's TLS settings.
pub(crate) fn master_opts(master: &MasterCredentials) -> OptsBuilder {
    let opts = OptsBuilder::default()
        .ip_or_hostname(master.host.clone())
        .tcp_port(master.port)
        .user(Some(master.username.clone()))
        .pass(Some(master.password.expose().to_owned()))
        // Without this a loopback host makes the driver switch to the Unix socket, where
        // the server may authenticate differently than over TCP.
        .prefer_socket(false)
        // RDS IAM authentication sends its token with `mysql_clear_password`: allowed only
        // where the connection is verified TLS, so a password never crosses in plain text.
        .enable_cleartext_plugin(master.tls == DbTls::Verified)
        .init(vec!["SET NAMES utf8mb4"]);
    match master.tls {
        DbTls::Disabled => opts,
        DbTls::Verified => {
            let mut ssl = SslOpts::default();
            if let Some(ca) = &master.ca_file {
                ssl = ssl.with_root_certs(vec![ca.clone().into()]);
            }
            opts.ssl_opts(ssl)
        }
    }
}

/// The master connection of one call; `secrets` are what its errors must never show.
struct Session<'a> {
    conn: Conn,
    secrets: Vec<&'a str>,
    /// Client-side limit of each query: the server's limits and a margin.
    query_limit: Duration,
    timeouts: DbTimeouts,
}

impl<'a> Session<'a> {
    async fn open(master: &'a MasterCredentials, timeouts: DbTimeouts) -> CloudResult<Session<'a>> {
        let opts = master_opts(master);
        let secrets = vec![master.password.expose()];
        let endpoint = format!("{}:{}", master.host, master.port);
        let conn = match tokio::time::timeout(timeouts.connect, Conn::new(opts)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                return Err(classify_mysql(
                    &format!("mysql connect to {endpoint} as {}", master.username),
                    &error,
                    &secrets,
                ));
            }
            Err(_) => {
                return Err(CloudError::new(
                    ErrorKind::Retryable,
                    format!(
                        "mysql connect to {endpoint}: timed out after {:?}",
                        timeouts.connect
                    ),
                ));
            }
        };
        let mut session = Session {
            conn,
            secrets,
            query_limit: timeouts.lock_wait.max(timeouts.statement) + BACKSTOP_MARGIN,
            timeouts,
        };
        if let Err(error) = session.set_limits().await {
            session.close().await;
            return Err(error);
        }
        Ok(session)
    }

    /// Bounds lock waits and statements of this session (see the module documentation).
    async fn set_limits(&mut self) -> CloudResult<()> {
        let limit = self.query_limit;
        let secrets = self.secrets.clone();
        let version: Option<String> = bounded(
            limit,
            "read server version",
            &secrets,
            self.conn.query_first("SELECT VERSION()"),
        )
        .await?;
        let mariadb = version
            .unwrap_or_default()
            .to_ascii_lowercase()
            .contains("mariadb");
        let what = "set session time limits";
        let with_statement = limits_statement(&self.timeouts, Some(mariadb));
        match tokio::time::timeout(limit, self.conn.query_drop(with_statement)).await {
            Ok(Ok(())) => Ok(()),
            // A server without the statement limit (MySQL before 5.7.8, some forks): the lock
            // waits still apply, and the client-side backstop bounds statements.
            Ok(Err(mysql_async::Error::Server(server)))
                if server.code == UNKNOWN_SYSTEM_VARIABLE =>
            {
                tracing::warn!(message = %server.message, "mysql server has no statement time limit; relying on the client-side timeout");
                let lock_waits = limits_statement(&self.timeouts, None);
                bounded(limit, what, &secrets, self.conn.query_drop(lock_waits)).await
            }
            Ok(Err(error)) => Err(classify_mysql(what, &error, &secrets)),
            Err(_) => Err(CloudError::new(
                ErrorKind::Retryable,
                format!("{what}: no answer from mysql within {limit:?}"),
            )),
        }
    }

    /// Runs one statement; `what` names it in errors (never the statement itself, which may
    /// hold a password).
    async fn run(&mut self, what: &str, statement: &str) -> CloudResult<()> {
        let secrets = self.secrets.clone();
        bounded(
            self.query_limit,
            what,
            &secrets,
            self.conn.query_drop(statement),
        )
        .await
    }

    async fn count(&mut self, what: &str, query: &str, params: Vec<Value>) -> CloudResult<u64> {
        let secrets = self.secrets.clone();
        let count = bounded(
            self.query_limit,
            what,
            &secrets,
            self.conn.exec_first::<u64, _, _>(query, params),
        )
        .await?;
        Ok(count.unwrap_or(0))
    }

    async fn first_string(
        &mut self,
        what: &str,
        query: &str,
        params: Vec<Value>,
    ) -> CloudResult<Option<String>> {
        let secrets = self.secrets.clone();
        bounded(
            self.query_limit,
            what,
            &secrets,
            self.conn.exec_first::<String, _, _>(query, params),
        )
        .await
    }

    async fn exec(&mut self, what: &str, statement: &str, params: Vec<Value>) -> CloudResult<()> {
        let secrets = self.secrets.clone();
        bounded(
            self.query_limit,
            what,
            &secrets,
            self.conn.exec_drop(statement, params),
        )
        .await
    }

    /// The server-wide record of which instance created which tenant database (and user):
    /// databases carry no tags, and a database named like ours may be someone else's.
    async fn ensure_ownership_table(&mut self) -> CloudResult<()> {
        self.run(
            "create the ownership schema",
            &format!(
                "CREATE DATABASE IF NOT EXISTS `{OWNERSHIP_SCHEMA}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            ),
        )
        .await?;
        self.run(
            "create the ownership table",
            &format!(
                "CREATE TABLE IF NOT EXISTS {OWNERSHIP_TABLE} (\
                 database_name VARCHAR(64) NOT NULL PRIMARY KEY, \
                 user_name VARCHAR(80) NOT NULL, \
                 owner VARCHAR(255) NOT NULL, \
                 claimed_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            ),
        )
        .await
    }

    async fn owner_of(&mut self, database: &str) -> CloudResult<Option<String>> {
        self.first_string(
            &format!("look up the owner of {database}"),
            &format!("SELECT owner FROM {OWNERSHIP_TABLE} WHERE database_name = ?"),
            vec![database.into()],
        )
        .await
    }

    async fn no_backslash_escapes(&mut self) -> CloudResult<bool> {
        let secrets = self.secrets.clone();
        let mode = bounded(
            self.query_limit,
            "read sql_mode",
            &secrets,
            self.conn
                .query_first::<String, _>("SELECT @@SESSION.sql_mode"),
        )
        .await?;
        Ok(mode
            .unwrap_or_default()
            .to_ascii_uppercase()
            .contains("NO_BACKSLASH_ESCAPES"))
    }

    async fn close(self) {
        // The work is done; a failed (or hanging) goodbye changes nothing.
        let _ = tokio::time::timeout(self.timeouts.connect, self.conn.disconnect()).await;
    }
}

#[async_trait]
impl Database for MySqlDatabase {
    async fn ensure_tenant_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
        password: &Secret,
        require_tls: bool,
    ) -> CloudResult<()> {
        let db = quote_identifier("database", database)?;
        let grant_on = grant_pattern(&db);
        // Set both ways: a user made while TLS was not required gets the requirement, and
        // turning the setting off lifts it.
        let require = if require_tls {
            "REQUIRE SSL"
        } else {
            "REQUIRE NONE"
        };
        let account = format!("{}@'%'", quote_identifier("user", user)?);
        if password.is_empty() || password.expose().contains('\0') {
            return Err(CloudError::fatal(format!(
                "refusing an empty password or one with a NUL character for mysql user {user}"
            )));
        }
        let mut session = Session::open(master, self.timeouts).await?;
        session.secrets.push(password.expose());
        let result = async {
            session
                .run(
                    &format!("create database {database}"),
                    &format!(
                        "CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                    ),
                )
                .await?;
            let mut literal = Vec::new();
            string_literal(
                &mut literal,
                password.expose().as_bytes(),
                session.no_backslash_escapes().await?,
            );
            // Valid UTF-8 in, only ASCII escapes added: still valid UTF-8.
            let literal = String::from_utf8_lossy(&literal).into_owned();
            session
                .run(
                    &format!("create user {user}"),
                    &format!(
                        "CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {literal} {require}"
                    ),
                )
                .await?;
            // The user may exist from an earlier attempt with another password: this call
            // decides the password.
            session
                .run(
                    &format!("set password of user {user}"),
                    &format!("ALTER USER {account} IDENTIFIED BY {literal} {require}"),
                )
                .await?;
            session
                .run(
                    &format!("grant {user} on {database}"),
                    &format!("GRANT ALL PRIVILEGES ON {grant_on}.* TO {account}"),
                )
                .await?;
            // Earlier versions granted the name unescaped, where each `_` matched any
            // character (another tenant's database could match): that grant goes.
            let unescaped = session
                .count(
                    &format!("look for an unescaped grant of {user}"),
                    "SELECT COUNT(*) FROM mysql.db WHERE User = ? AND Host = '%' AND Db = ?",
                    vec![user.into(), database.into()],
                )
                .await?;
            if unescaped > 0 && grant_on != db {
                session
                    .run(
                        &format!("revoke the unescaped grant of {user} on {database}"),
                        &format!("REVOKE ALL PRIVILEGES ON {db}.* FROM {account}"),
                    )
                    .await?;
            }
            Ok(())
        }
        .await;
        session.close().await;
        result
    }

    async fn drop_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
    ) -> CloudResult<()> {
        let db = quote_identifier("database", database)?;
        let account = format!("{}@'%'", quote_identifier("user", user)?);
        let mut session = Session::open(master, self.timeouts).await?;
        let result = async {
            session
                .run(
                    &format!("drop user {user}"),
                    &format!("DROP USER IF EXISTS {account}"),
                )
                .await?;
            session
                .run(
                    &format!("drop database {database}"),
                    &format!("DROP DATABASE IF EXISTS {db}"),
                )
                .await
        }
        .await;
        session.close().await;
        result
    }

    async fn dump_database(
        &self,
        master: &MasterCredentials,
        database: &str,
    ) -> CloudResult<Vec<u8>> {
        let db = quote_identifier("database", database)?;
        let mut session = Session::open(master, self.timeouts).await?;
        let result = dump(&mut session, database, &db).await;
        session.close().await;
        result
    }

    async fn database_exists(
        &self,
        master: &MasterCredentials,
        database: &str,
    ) -> CloudResult<bool> {
        quote_identifier("database", database)?;
        let mut session = Session::open(master, self.timeouts).await?;
        let result = session
            .count(
                &format!("look up database {database}"),
                "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                vec![database.into()],
            )
            .await;
        session.close().await;
        Ok(result? > 0)
    }

    async fn claim_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
        owner: &str,
    ) -> CloudResult<DatabaseClaim> {
        self.claim(master, database, user, owner, true).await
    }

    async fn database_owner(
        &self,
        master: &MasterCredentials,
        database: &str,
    ) -> CloudResult<Option<String>> {
        quote_identifier("database", database)?;
        let mut session = Session::open(master, self.timeouts).await?;
        let result = async {
            session.ensure_ownership_table().await?;
            session.owner_of(database).await
        }
        .await;
        session.close().await;
        result
    }

    async fn release_database(
        &self,
        master: &MasterCredentials,
        database: &str,
        owner: &str,
    ) -> CloudResult<()> {
        quote_identifier("database", database)?;
        let mut session = Session::open(master, self.timeouts).await?;
        let result = async {
            session.ensure_ownership_table().await?;
            session
                .exec(
                    &format!("release database {database}"),
                    &format!("DELETE FROM {OWNERSHIP_TABLE} WHERE database_name = ? AND owner = ?"),
                    vec![database.into(), owner.into()],
                )
                .await
        }
        .await;
        session.close().await;
        result
    }

    async fn claim_schema(
        &self,
        master: &MasterCredentials,
        database: &str,
        user: &str,
        owner: &str,
    ) -> CloudResult<DatabaseClaim> {
        self.claim(master, database, user, owner, false).await
    }

    async fn drop_schema(&self, master: &MasterCredentials, database: &str) -> CloudResult<()> {
        let db = quote_identifier("database", database)?;
        let mut session = Session::open(master, self.timeouts).await?;
        let result = session
            .run(
                &format!("drop database {database}"),
                &format!("DROP DATABASE IF EXISTS {db}"),
            )
            .await;
        session.close().await;
        result
    }

    async fn databases_owned_by(
        &self,
        master: &MasterCredentials,
        owner: &str,
    ) -> CloudResult<Vec<String>> {
        let mut session = Session::open(master, self.timeouts).await?;
        let result = async {
            session.ensure_ownership_table().await?;
            let secrets = session.secrets.clone();
            bounded(
                session.query_limit,
                "list the databases of an owner",
                &secrets,
                session.conn.exec::<String, _, _>(
                    format!(
                        "SELECT database_name FROM {OWNERSHIP_TABLE} WHERE owner = ? ORDER BY database_name"
                    ),
                    (owner,),
                ),
            )
            .await
        }
        .await;
        session.close().await;
        result
    }

    async fn ownership_records(
        &self,
        master: &MasterCredentials,
    ) -> CloudResult<Vec<DatabaseRecord>> {
        let mut session = Session::open(master, self.timeouts).await?;
        let result = async {
            session.ensure_ownership_table().await?;
            let secrets = session.secrets.clone();
            // UNIX_TIMESTAMP: the claim time in seconds whatever the session's time zone.
            let rows: Vec<(String, String, String, i64)> = bounded(
                session.query_limit,
                "list the database claims",
                &secrets,
                session.conn.query(format!(
                    "SELECT database_name, user_name, owner, CAST(UNIX_TIMESTAMP(claimed_at) AS SIGNED) \
                     FROM {OWNERSHIP_TABLE} ORDER BY database_name"
                )),
            )
            .await?;
            Ok(rows
                .into_iter()
                .map(|(database, user, owner, claimed)| DatabaseRecord {
                    database,
                    user,
                    owner,
                    claimed_at: crate::domain::Timestamp(claimed.saturating_mul(1000)),
                })
                .collect())
        }
        .await;
        session.close().await;
        result
    }

    async fn databases_named(
        &self,
        master: &MasterCredentials,
        prefix: &str,
    ) -> CloudResult<Vec<String>> {
        // LIKE with the prefix's wildcards escaped: `_` is part of every tenant name.
        let pattern = format!("{}%", like_escape(prefix));
        let mut session = Session::open(master, self.timeouts).await?;
        let secrets = session.secrets.clone();
        let result = bounded(
            session.query_limit,
            "list databases",
            &secrets,
            session.conn.exec::<String, _, _>(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA \
                 WHERE SCHEMA_NAME LIKE ? ESCAPE '!' ORDER BY SCHEMA_NAME",
                (pattern,),
            ),
        )
        .await;
        session.close().await;
        result
    }

    async fn database_size(
        &self,
        login: &MasterCredentials,
        database: &str,
    ) -> CloudResult<Option<u64>> {
        quote_identifier("database", database)?;
        let mut session = Session::open(login, self.timeouts).await?;
        let result = async {
            let what = format!("size of database {database}");
            // MySQL 8 caches these figures for a day by default; MariaDB has no such
            // cache (and no such variable: the error is expected there).
            let _ = session
                .run(&what, "SET SESSION information_schema_stats_expiry = 0")
                .await;
            let exists = session
                .count(
                    &what,
                    "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                    vec![database.into()],
                )
                .await?;
            if exists == 0 {
                return Ok(None);
            }
            let bytes = session
                .count(
                    &what,
                    "SELECT CAST(COALESCE(SUM(DATA_LENGTH + INDEX_LENGTH), 0) AS UNSIGNED) \
                     FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?",
                    vec![database.into()],
                )
                .await?;
            Ok(Some(bytes))
        }
        .await;
        session.close().await;
        result
    }

    /// Whether `user@'%'` (the account `ensure_database` makes) exists.
    async fn user_exists(&self, master: &MasterCredentials, user: &str) -> CloudResult<bool> {
        quote_identifier("user", user)?;
        let mut session = Session::open(master, self.timeouts).await?;
        let result = session
            .count(
                &format!("look up user {user}"),
                "SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = '%'",
                vec![user.into()],
            )
            .await;
        session.close().await;
        Ok(result? > 0)
    }

    async fn check_login(&self, login: &MasterCredentials, database: &str) -> CloudResult<()> {
        let quoted = quote_identifier("database", database)?;
        let mut session = Session::open(login, self.timeouts).await?;
        let limit = session.query_limit;
        let secrets = session.secrets.clone();
        let result = async {
            bounded(
                limit,
                &format!("use database {database}"),
                &secrets,
                session.conn.query_drop(format!("USE {quoted}")),
            )
            .await?;
            let one: Option<i64> = bounded(
                limit,
                "SELECT 1",
                &secrets,
                session.conn.query_first("SELECT 1"),
            )
            .await?;
            match one {
                Some(1) => Ok(()),
                other => Err(CloudError::fatal(format!("SELECT 1 answered {other:?}"))),
            }
        }
        .await;
        session.close().await;
        result
    }
}

/// Header of every dump: the restoring session gets the settings the dump was written for
/// (like mysqldump's): utf8mb4, UTC for TIMESTAMP values, backslash escapes on (by
/// resetting sql_mode), explicit zeros kept in AUTO_INCREMENT columns, and no foreign-key
/// or unique checks while tables are refilled in name order. The trailer restores them.
const DUMP_HEADER: &str = "SET NAMES utf8mb4;
SET @OLD_TIME_ZONE = @@TIME_ZONE, TIME_ZONE = '+00:00';
SET @OLD_SQL_MODE = @@SQL_MODE, SQL_MODE = 'NO_AUTO_VALUE_ON_ZERO';
SET @OLD_FOREIGN_KEY_CHECKS = @@FOREIGN_KEY_CHECKS, FOREIGN_KEY_CHECKS = 0;
SET @OLD_UNIQUE_CHECKS = @@UNIQUE_CHECKS, UNIQUE_CHECKS = 0;
";

const DUMP_TRAILER: &str = "SET UNIQUE_CHECKS = @OLD_UNIQUE_CHECKS;
SET FOREIGN_KEY_CHECKS = @OLD_FOREIGN_KEY_CHECKS;
SET SQL_MODE = @OLD_SQL_MODE;
SET TIME_ZONE = @OLD_TIME_ZONE;
";

/// Base tables (schema and rows) of `database`, in a consistent snapshot. Views, triggers
/// and routines are not dumped: WordPress uses none.
async fn dump(session: &mut Session<'_>, database: &str, db: &str) -> CloudResult<Vec<u8>> {
    if session
        .count(
            &format!("look up database {database}"),
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            vec![database.into()],
        )
        .await?
        == 0
    {
        return Err(CloudError::new(
            ErrorKind::NotFound,
            format!("dump {database}: no such database"),
        ));
    }
    // Same values as the header tells the restoring session to use.
    session
        .run("prepare dump session", "SET SESSION TIME_ZONE = '+00:00'")
        .await?;
    session
        .run(
            "prepare dump session",
            "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        )
        .await?;
    session
        .run(
            "start snapshot",
            "START TRANSACTION WITH CONSISTENT SNAPSHOT",
        )
        .await?;
    let secrets = session.secrets.clone();
    let tables: Vec<String> = bounded(
        session.query_limit,
        &format!("list tables of {database}"),
        &secrets,
        session.conn.exec(
            "SELECT TABLE_NAME FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
            (database,),
        ),
    )
    .await?;

    let mut out = Vec::new();
    let _ = writeln!(
        Text(&mut out),
        "-- instance-manager logical dump of database {database}\n-- restore into any database: it names none"
    );
    out.extend_from_slice(DUMP_HEADER.as_bytes());
    for table in &tables {
        dump_table(session, database, db, table, &mut out).await?;
    }
    out.extend_from_slice(DUMP_TRAILER.as_bytes());
    session.run("end snapshot", "COMMIT").await?;
    Ok(out)
}

async fn dump_table(
    session: &mut Session<'_>,
    database: &str,
    db: &str,
    table: &str,
    out: &mut Vec<u8>,
) -> CloudResult<()> {
    let quoted_table = quote_any_identifier(table);
    let secrets = session.secrets.clone();
    let limit = session.query_limit;
    let create: Option<(String, String)> = bounded(
        limit,
        &format!("show create table {database}.{table}"),
        &secrets,
        session
            .conn
            .query_first(format!("SHOW CREATE TABLE {db}.{quoted_table}")),
    )
    .await?;
    let Some((_, create)) = create else {
        return Err(CloudError::fatal(format!(
            "show create table {database}.{table}: no answer"
        )));
    };
    let _ = write!(
        Text(out),
        "\n-- table {quoted_table}\nDROP TABLE IF EXISTS {quoted_table};\n{create};\n"
    );

    // Generated columns cannot be given values; every other column is listed explicitly
    // (which also covers invisible columns that `SELECT *` would miss).
    let columns: Vec<String> = bounded(
        limit,
        &format!("list columns of {database}.{table}"),
        &secrets,
        session.conn.exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND COALESCE(GENERATION_EXPRESSION, '') = '' \
             ORDER BY ORDINAL_POSITION",
            (database, table),
        ),
    )
    .await?;
    if columns.is_empty() {
        return Ok(());
    }
    let column_list = columns
        .iter()
        .map(|c| quote_any_identifier(c))
        .collect::<Vec<_>>()
        .join(", ");
    let insert_prefix = format!("INSERT INTO {quoted_table} ({column_list}) VALUES\n");

    let what = format!("read rows of {database}.{table}");
    let mut result = bounded(
        limit,
        &what,
        &secrets,
        session
            .conn
            .query_iter(format!("SELECT {column_list} FROM {db}.{quoted_table}")),
    )
    .await?;
    let kinds: Vec<ValueKind> = result.columns_ref().iter().map(ValueKind::of).collect();
    let mut batch: Vec<u8> = Vec::new();
    loop {
        let Some(row) = bounded(limit, &what, &secrets, result.next()).await? else {
            break;
        };
        batch.extend_from_slice(if batch.is_empty() { b"(" } else { b",\n(" });
        for (i, value) in row.unwrap().into_iter().enumerate() {
            if i > 0 {
                batch.push(b',');
            }
            render_value(
                &mut batch,
                &value,
                kinds.get(i).copied().unwrap_or(ValueKind::Text),
            );
        }
        batch.push(b')');
        if batch.len() >= INSERT_BATCH_BYTES {
            flush_insert(out, &insert_prefix, &mut batch);
        }
    }
    flush_insert(out, &insert_prefix, &mut batch);
    Ok(())
}

fn flush_insert(out: &mut Vec<u8>, prefix: &str, batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    out.extend_from_slice(prefix.as_bytes());
    out.append(batch);
    out.extend_from_slice(b";\n");
}

/// How a column's values are written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    /// Numbers: written bare when they look like a number.
    Number,
    /// Bytes that are no text in any character set (BLOB, BINARY, BIT, geometry): hex.
    Binary,
    /// Everything else (text, dates, JSON, ENUM, …): a string in the connection's utf8mb4.
    Text,
}

/// The `binary` pseudo character set.
const BINARY_CHARSET: u16 = 63;

impl ValueKind {
    fn of(column: &mysql_async::Column) -> Self {
        use ColumnType::*;
        match column.column_type() {
            MYSQL_TYPE_DECIMAL
            | MYSQL_TYPE_NEWDECIMAL
            | MYSQL_TYPE_TINY
            | MYSQL_TYPE_SHORT
            | MYSQL_TYPE_LONG
            | MYSQL_TYPE_FLOAT
            | MYSQL_TYPE_DOUBLE
            | MYSQL_TYPE_LONGLONG
            | MYSQL_TYPE_INT24
            | MYSQL_TYPE_YEAR => ValueKind::Number,
            MYSQL_TYPE_BIT | MYSQL_TYPE_GEOMETRY => ValueKind::Binary,
            MYSQL_TYPE_STRING
            | MYSQL_TYPE_VAR_STRING
            | MYSQL_TYPE_VARCHAR
            | MYSQL_TYPE_BLOB
            | MYSQL_TYPE_TINY_BLOB
            | MYSQL_TYPE_MEDIUM_BLOB
            | MYSQL_TYPE_LONG_BLOB
                if column.character_set() == BINARY_CHARSET =>
            {
                ValueKind::Binary
            }
            _ => ValueKind::Text,
        }
    }
}

fn render_value(out: &mut Vec<u8>, value: &Value, kind: ValueKind) {
    let bytes: Vec<u8> = match value {
        Value::NULL => {
            out.extend_from_slice(b"NULL");
            return;
        }
        Value::Bytes(bytes) => bytes.clone(),
        // The text protocol sends bytes only; other variants are rendered as text.
        other => other.as_sql(true).trim_matches('\'').as_bytes().to_vec(),
    };
    match kind {
        ValueKind::Number
            if !bytes.is_empty()
                && bytes.iter().all(|b| {
                    b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
                }) =>
        {
            out.extend_from_slice(&bytes);
        }
        ValueKind::Binary => {
            out.extend_from_slice(b"X'");
            out.extend_from_slice(hex::encode_upper(&bytes).as_bytes());
            out.push(b'\'');
        }
        _ => string_literal(out, &bytes, false),
    }
}

/// `fmt::Write` into a byte buffer.
struct Text<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_outside_the_safe_set_are_refused() {
        assert_eq!(
            quote_identifier("database", "tenant_acme_db").unwrap(),
            "`tenant_acme_db`"
        );
        for bad in ["", "a`b", "a;b", "a'b", "A", "a-b", "a b", &"x".repeat(65)] {
            let error = quote_identifier("database", bad).unwrap_err();
            assert_eq!(error.kind, ErrorKind::Fatal, "{bad}");
        }
    }

    #[test]
    fn like_prefixes_match_literally() {
        assert_eq!(like_escape("tenant_a%b!"), "tenant!_a!%b!!");
    }

    #[test]
    fn grant_patterns_escape_wildcards() {
        let quoted = quote_identifier("database", "tenant_a_b_dev_db").unwrap();
        assert_eq!(grant_pattern(&quoted), "`tenant\\_a\\_b\\_dev\\_db`");
        assert_eq!(grant_pattern("`plain`"), "`plain`");
    }

    #[test]
    fn literals_escape_for_either_sql_mode() {
        let mut out = Vec::new();
        string_literal(&mut out, b"a'b\\c\0\n", false);
        assert_eq!(out, b"'a\\'b\\\\c\\0\\n'");
        let mut out = Vec::new();
        string_literal(&mut out, b"a'b\\c", true);
        assert_eq!(out, b"'a''b\\c'");
    }

    #[test]
    fn redaction_covers_escaped_forms() {
        let text = redact("near 'p\\'w' and p'w and p''w", &["p'w"]);
        assert!(!text.contains("p'w") && !text.contains("p\\'w"), "{text}");
    }

    #[test]
    fn session_limits_name_each_servers_variables() {
        let timeouts = DbTimeouts {
            connect: Duration::from_secs(5),
            lock_wait: Duration::from_millis(1500),
            statement: Duration::from_millis(2500),
        };
        assert_eq!(
            limits_statement(&timeouts, Some(true)),
            "SET SESSION lock_wait_timeout = 1, innodb_lock_wait_timeout = 1, max_statement_time = 2.500"
        );
        assert_eq!(
            limits_statement(&timeouts, Some(false)),
            "SET SESSION lock_wait_timeout = 1, innodb_lock_wait_timeout = 1, max_execution_time = 2500"
        );
        assert_eq!(
            limits_statement(&timeouts, None),
            "SET SESSION lock_wait_timeout = 1, innodb_lock_wait_timeout = 1"
        );
    }

    #[tokio::test]
    async fn a_query_past_the_backstop_is_retryable() {
        let error = bounded::<()>(
            Duration::from_millis(20),
            "drop database x",
            &[],
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert_eq!(error.kind, ErrorKind::Retryable, "{error}");
        assert!(error.message.starts_with("drop database x: "), "{error}");
    }

    #[test]
    fn values_render_by_kind() {
        let mut out = Vec::new();
        render_value(&mut out, &Value::Bytes(b"42".to_vec()), ValueKind::Number);
        out.push(b' ');
        render_value(&mut out, &Value::Bytes(vec![0, 255]), ValueKind::Binary);
        out.push(b' ');
        render_value(&mut out, &Value::Bytes(b"it's".to_vec()), ValueKind::Text);
        out.push(b' ');
        render_value(&mut out, &Value::NULL, ValueKind::Text);
        assert_eq!(String::from_utf8(out).unwrap(), "42 X'00FF' 'it\\'s' NULL");
    }
}
