//! One connection to the ledger's database (SQLite or PostgreSQL) for the queries written once
//! for both: accounts, keys, the audit trail, earnings and entry lookups. Statements use `$1`
//! placeholders (turned into `?1` for SQLite); values are integers, text, bytes or null.

use std::path::Path;
use std::time::Duration;

use postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::error::{AccountError, Error, Result};

/// One value of a row or a parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

impl Val {
    /// The text, if it is text.
    pub fn text(&self) -> Option<&str> {
        match self {
            Val::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The text, or an empty string.
    pub fn string(&self) -> String {
        self.text().unwrap_or_default().to_string()
    }

    /// The integer, if it is one.
    pub fn int(&self) -> Option<i64> {
        match self {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl From<&str> for Val {
    fn from(s: &str) -> Self {
        Val::Text(s.to_string())
    }
}

impl From<String> for Val {
    fn from(s: String) -> Self {
        Val::Text(s)
    }
}

impl From<i64> for Val {
    fn from(i: i64) -> Self {
        Val::Int(i)
    }
}

impl From<u64> for Val {
    fn from(i: u64) -> Self {
        Val::Int(i.min(i64::MAX as u64) as i64)
    }
}

impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(i) => i.to_sql(ty, out),
            Val::Text(s) => s.to_sql(ty, out),
            Val::Bytes(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty) || <String as ToSql>::accepts(ty) || <Vec<u8> as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// A connection to the ledger's database.
pub enum Db {
    /// The SQLite file.
    Sqlite(rusqlite::Connection),
    /// The PostgreSQL server.
    Postgres(postgres::Client),
}

fn store(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    AccountError::Store { what: what.to_string(), source: Box::new(e) }.into()
}

fn sqlite_val(v: rusqlite::types::ValueRef<'_>) -> Val {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Val::Null,
        ValueRef::Integer(i) => Val::Int(i),
        ValueRef::Real(f) => Val::Int(f as i64),
        ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Val::Bytes(b.to_vec()),
    }
}

fn postgres_val(row: &postgres::Row, i: usize) -> Val {
    let ty = row.columns()[i].type_().clone();
    let got = if ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i).map(|v| v.map(Val::Int))
    } else if ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i).map(|v| v.map(|x| Val::Int(x.into())))
    } else if ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(i).map(|v| v.map(Val::Bytes))
    } else {
        row.try_get::<_, Option<String>>(i).map(|v| v.map(Val::Text))
    };
    got.ok().flatten().unwrap_or(Val::Null)
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Val::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

impl Db {
    /// Connects to a PostgreSQL server.
    pub fn postgres(url: &str) -> Result<Self> {
        Ok(Db::Postgres(postgres::Client::connect(url, postgres::NoTls).map_err(|e| store("connect", e))?))
    }

    /// Opens an SQLite file (creating it and its folder if needed).
    pub fn sqlite(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let conn = rusqlite::Connection::open(path).map_err(|e| store("open", e))?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(|e| store("open", e))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| store("open", e))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(|e| store("open", e))?;
        Ok(Db::Sqlite(conn))
    }

    /// Whether this is PostgreSQL (for the few statements that differ).
    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    /// Runs statements without parameters (schema).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(c) => c.execute_batch(sql).map_err(|e| store("schema", e)),
            Db::Postgres(c) => c.batch_execute(sql).map_err(|e| store("schema", e)),
        }
    }

    /// Runs one statement; returns the rows it changed.
    pub fn exec(&mut self, sql: &str, args: &[Val]) -> Result<u64> {
        match self {
            Db::Sqlite(c) => c
                .execute(&sql.replace('$', "?"), rusqlite::params_from_iter(args.iter()))
                .map(|n| n as u64)
                .map_err(|e| store("write", e)),
            Db::Postgres(c) => {
                let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                c.execute(sql, &refs).map_err(|e| store("write", e))
            }
        }
    }

    /// Runs one query; returns its rows.
    pub fn rows(&mut self, sql: &str, args: &[Val]) -> Result<Vec<Vec<Val>>> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(&sql.replace('$', "?")).map_err(|e| store("read", e))?;
                let n = stmt.column_count();
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                        (0..n).map(|i| r.get_ref(i).map(sqlite_val)).collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map_err(|e| store("read", e))?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| store("read", e))
            }
            Db::Postgres(c) => {
                let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                let rows = c.query(sql, &refs).map_err(|e| store("read", e))?;
                Ok(rows.iter().map(|r| (0..r.len()).map(|i| postgres_val(r, i)).collect()).collect())
            }
        }
    }

    /// Runs `work` in one transaction that holds the database's write lock from its start
    /// (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: the caller locks rows with `FOR UPDATE`): all of
    /// it is written, or none.
    pub fn atomically<T>(&mut self, work: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        let begin = if self.is_postgres() { "BEGIN" } else { "BEGIN IMMEDIATE" };
        self.batch(begin)?;
        match work(self) {
            Ok(v) => {
                if let Err(e) = self.batch("COMMIT") {
                    let _ = self.batch("ROLLBACK");
                    return Err(e);
                }
                Ok(v)
            }
            Err(e) => {
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_sqlite() {
        let dir = std::env::temp_dir().join(format!("openlora-sql-{}", std::process::id()));
        let mut db = Db::sqlite(&dir.join("t.db")).unwrap();
        db.batch("CREATE TABLE t (a INTEGER, b TEXT, c BLOB, d TEXT)").unwrap();
        let row = vec![Val::Int(-3), Val::from("x"), Val::Bytes(vec![1, 2]), Val::Null];
        assert_eq!(db.exec("INSERT INTO t VALUES ($1, $2, $3, $4)", &row).unwrap(), 1);
        assert_eq!(db.rows("SELECT a, b, c, d FROM t WHERE b = $1", &["x".into()]).unwrap(), vec![row]);
        let failed: Result<()> = db.atomically(|db| {
            db.exec("INSERT INTO t (a) VALUES ($1)", &[Val::Int(9)])?;
            Err(AccountError::NotFound("rolled back".into()).into())
        });
        assert!(failed.is_err());
        assert_eq!(db.rows("SELECT COUNT(*) FROM t", &[]).unwrap()[0][0], Val::Int(1));
        let _ = std::fs::remove_dir_all(dir);
    }
}
