//! Comparing a restored copy with its original, through the server itself: per table the
//! row count, `CHECKSUM TABLE` and collation; the names of views, triggers, routines and
//! events.

use std::collections::{BTreeMap, BTreeSet};

use mysql_async::Conn;
use mysql_async::prelude::Queryable;

use crate::cloud::mysql::{master_opts, quote_identifier};
use crate::cloud::{CloudError, CloudResult, ErrorKind, MasterCredentials};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableFacts {
    pub rows: u64,
    pub checksum: Option<u64>,
    pub collation: Option<String>,
}

/// What [`verify_copy`] compares, for one database.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DatabaseFacts {
    pub tables: BTreeMap<String, TableFacts>,
    pub views: BTreeSet<String>,
    pub triggers: BTreeSet<String>,
    /// `PROCEDURE name` / `FUNCTION name`.
    pub routines: BTreeSet<String>,
    pub events: BTreeSet<String>,
}

fn failed(what: &str, error: mysql_async::Error) -> CloudError {
    let kind = match error {
        mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => ErrorKind::Retryable,
        _ => ErrorKind::Fatal,
    };
    CloudError::new(kind, format!("{what}: {error}"))
}

/// A name found in a database, quoted for SQL.
fn quote_found(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

async fn names(conn: &mut Conn, sql: &str, database: &str) -> CloudResult<BTreeSet<String>> {
    conn.exec::<String, _, _>(sql, (database,))
        .await
        .map(|rows| rows.into_iter().collect())
        .map_err(|e| failed(&format!("list objects of {database}"), e))
}

/// The facts of one database (which must exist).
pub async fn database_facts(
    master: &MasterCredentials,
    database: &str,
) -> CloudResult<DatabaseFacts> {
    let db = quote_identifier("database", database)?;
    let mut conn = Conn::new(master_opts(master))
        .await
        .map_err(|e| failed("mysql connect", e))?;
    let result = collect(&mut conn, database, &db).await;
    let _ = conn.disconnect().await;
    result
}

async fn collect(conn: &mut Conn, database: &str, db: &str) -> CloudResult<DatabaseFacts> {
    let exists: Option<String> = conn
        .exec_first(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            (database,),
        )
        .await
        .map_err(|e| failed("look up database", e))?;
    if exists.is_none() {
        return Err(CloudError::new(
            ErrorKind::NotFound,
            format!("database {database} does not exist"),
        ));
    }
    let tables: Vec<(String, Option<String>)> = conn
        .exec(
            "SELECT TABLE_NAME, TABLE_COLLATION FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE'",
            (database,),
        )
        .await
        .map_err(|e| failed(&format!("list tables of {database}"), e))?;
    let mut facts = DatabaseFacts::default();
    for (table, collation) in tables {
        let name = format!("{db}.{}", quote_found(&table));
        let rows: Option<u64> = conn
            .query_first(format!("SELECT COUNT(*) FROM {name}"))
            .await
            .map_err(|e| failed(&format!("count {database}.{table}"), e))?;
        let checksum: Option<(String, Option<u64>)> = conn
            .query_first(format!("CHECKSUM TABLE {name}"))
            .await
            .map_err(|e| failed(&format!("checksum {database}.{table}"), e))?;
        facts.tables.insert(
            table,
            TableFacts {
                rows: rows.unwrap_or(0),
                checksum: checksum.and_then(|(_, sum)| sum),
                collation,
            },
        );
    }
    facts.views = names(
        conn,
        "SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ?",
        database,
    )
    .await?;
    facts.triggers = names(
        conn,
        "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ?",
        database,
    )
    .await?;
    facts.routines = names(
        conn,
        "SELECT CONCAT(ROUTINE_TYPE, ' ', ROUTINE_NAME) FROM information_schema.ROUTINES \
         WHERE ROUTINE_SCHEMA = ?",
        database,
    )
    .await?;
    facts.events = names(
        conn,
        "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = ?",
        database,
    )
    .await?;
    Ok(facts)
}

/// Compares `copy` with `original`: an error naming every difference, or the copy's facts.
pub async fn verify_copy(
    master: &MasterCredentials,
    original: &str,
    copy: &str,
) -> CloudResult<DatabaseFacts> {
    let a = database_facts(master, original).await?;
    let b = database_facts(master, copy).await?;
    let differences = differences(&a, &b);
    if differences.is_empty() {
        Ok(b)
    } else {
        Err(CloudError::fatal(format!(
            "database {copy} is not a copy of {original}: {}",
            differences.join("; ")
        )))
    }
}

pub fn differences(a: &DatabaseFacts, b: &DatabaseFacts) -> Vec<String> {
    let mut out = Vec::new();
    let tables: BTreeSet<&String> = a.tables.keys().chain(b.tables.keys()).collect();
    for table in tables {
        match (a.tables.get(table), b.tables.get(table)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => out.push(format!("table {table}: {x:?} vs {y:?}")),
            (Some(_), None) => out.push(format!("table {table} missing")),
            (None, _) => out.push(format!("table {table} not in the original")),
        }
    }
    let sets = [
        ("views", &a.views, &b.views),
        ("triggers", &a.triggers, &b.triggers),
        ("routines", &a.routines, &b.routines),
        ("events", &a.events, &b.events),
    ];
    for (what, x, y) in sets {
        if x != y {
            out.push(format!("{what}: {x:?} vs {y:?}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_difference_is_named() {
        let table = |rows, checksum| TableFacts {
            rows,
            checksum: Some(checksum),
            collation: Some("utf8mb4_unicode_ci".into()),
        };
        let mut a = DatabaseFacts::default();
        a.tables.insert("t1".into(), table(3, 10));
        a.tables.insert("t2".into(), table(1, 1));
        a.views.insert("v".into());
        a.routines.insert("PROCEDURE p".into());
        assert!(differences(&a, &a.clone()).is_empty());
        let mut b = a.clone();
        b.tables.insert("t1".into(), table(3, 11));
        b.tables.remove("t2");
        b.views.clear();
        b.events.insert("e".into());
        let found = differences(&a, &b);
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].starts_with("table t1:"));
        assert_eq!(found[1], "table t2 missing");
    }
}
