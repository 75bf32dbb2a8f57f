//! The two databases central can use behind one small interface: embedded SQLite (default)
//! and PostgreSQL (feature `postgres`). Statements are written once, in the SQL both accept,
//! with `$1`, `$2`, … placeholders; values are 64-bit integers or text, either possibly null.

use anyhow::{Context, Result, bail};

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// A 64-bit integer (or null).
    I(Option<i64>),
    /// Text (or null).
    T(Option<String>),
}

impl Val {
    /// An integer column.
    pub fn int(&self) -> Result<i64> {
        match self {
            Val::I(Some(v)) => Ok(*v),
            other => bail!("expected an integer, found {other:?}"),
        }
    }

    /// An integer column that may be null.
    pub fn opt_int(&self) -> Result<Option<i64>> {
        match self {
            Val::I(v) => Ok(*v),
            Val::T(None) => Ok(None),
            other => bail!("expected an integer, found {other:?}"),
        }
    }

    /// A text column.
    pub fn text(&self) -> Result<String> {
        match self {
            Val::T(Some(v)) => Ok(v.clone()),
            other => bail!("expected text, found {other:?}"),
        }
    }

    /// A text column that may be null.
    pub fn opt_text(&self) -> Result<Option<String>> {
        match self {
            Val::T(v) => Ok(v.clone()),
            Val::I(None) => Ok(None),
            other => bail!("expected text, found {other:?}"),
        }
    }
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::I(Some(v))
    }
}

impl From<u64> for Val {
    fn from(v: u64) -> Self {
        Val::I(Some(v as i64))
    }
}

impl From<u32> for Val {
    fn from(v: u32) -> Self {
        Val::I(Some(i64::from(v)))
    }
}

impl From<Option<u64>> for Val {
    fn from(v: Option<u64>) -> Self {
        Val::I(v.map(|v| v as i64))
    }
}

impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::T(Some(v.to_string()))
    }
}

impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::T(Some(v.clone()))
    }
}

impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::T(Some(v))
    }
}

impl From<Option<&str>> for Val {
    fn from(v: Option<&str>) -> Self {
        Val::T(v.map(str::to_string))
    }
}

/// A connection to one of the databases.
pub enum Conn {
    /// Embedded SQLite.
    Sqlite(rusqlite::Connection),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(postgres::Client),
}

/// Whether `db` names a PostgreSQL database rather than a file.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

impl Conn {
    /// Opens `db`: a `postgres://` URL, or else an SQLite file (`:memory:` for a throwaway one).
    pub fn open(db: &str) -> Result<Self> {
        if is_postgres_url(db) {
            #[cfg(feature = "postgres")]
            {
                let c = postgres::Client::connect(db, postgres::NoTls)
                    .context("connecting to PostgreSQL (the URL's password is not shown)")?;
                return Ok(Conn::Postgres(c));
            }
            #[cfg(not(feature = "postgres"))]
            bail!("this build of central has no PostgreSQL support: build it with `--features postgres`");
        }
        let c = rusqlite::Connection::open(db).with_context(|| format!("opening {db}"))?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed message survives a power cut (it has been acknowledged by then).
        c.pragma_update(None, "synchronous", "FULL")?;
        c.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Conn::Sqlite(c))
    }

    /// Runs several statements without parameters.
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Conn::Sqlite(c) => c.execute_batch(sql)?,
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => c.batch_execute(sql)?,
        }
        Ok(())
    }

    /// Runs one statement; the number of rows it changed.
    pub fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        match self {
            Conn::Sqlite(c) => {
                let n = c
                    .execute(
                        &sqlite_sql(sql),
                        rusqlite::params_from_iter(params.iter().map(sqlite_value)),
                    )
                    .with_context(|| first_line(sql))?;
                Ok(n as u64)
            }
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => Ok(c.execute(sql, &pg_refs(params)).with_context(|| first_line(sql))?),
        }
    }

    /// Runs a query; every row's values.
    pub fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>> {
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare(&sqlite_sql(sql)).with_context(|| first_line(sql))?;
                let n = st.column_count();
                let rows = st.query_map(rusqlite::params_from_iter(params.iter().map(sqlite_value)), |r| {
                    (0..n)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                rusqlite::types::ValueRef::Integer(v) => Val::I(Some(v)),
                                rusqlite::types::ValueRef::Text(t) => Val::T(Some(String::from_utf8_lossy(t).into())),
                                rusqlite::types::ValueRef::Null => Val::T(None),
                                rusqlite::types::ValueRef::Real(v) => Val::I(Some(v as i64)),
                                rusqlite::types::ValueRef::Blob(b) => Val::T(Some(String::from_utf8_lossy(b).into())),
                            })
                        })
                        .collect::<rusqlite::Result<Vec<Val>>>()
                })?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            }
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => {
                let rows = c.query(sql, &pg_refs(params)).with_context(|| first_line(sql))?;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| {
                                use postgres::types::Type;
                                let t = r.columns()[i].type_();
                                Ok(if *t == Type::INT8 {
                                    Val::I(r.try_get::<_, Option<i64>>(i)?)
                                } else if *t == Type::INT4 {
                                    Val::I(r.try_get::<_, Option<i32>>(i)?.map(i64::from))
                                } else if *t == Type::NUMERIC {
                                    bail!("unexpected NUMERIC column {}", r.columns()[i].name())
                                } else {
                                    Val::T(r.try_get::<_, Option<String>>(i)?)
                                })
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }

    /// Runs `f` in a transaction: committed if it returns `Ok`, rolled back otherwise.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        self.batch("BEGIN")?;
        match f(self) {
            Ok(v) => {
                self.batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                if let Err(r) = self.batch("ROLLBACK") {
                    tracing::error!(error = %r, "rollback failed");
                }
                Err(e)
            }
        }
    }
}

/// Whether the database refused a statement for what it was given (a value it cannot hold, a
/// constraint) rather than for its own state (down, full, busy): a message refused so is
/// recorded as rejected and acknowledged; any other error stops ingest until the database is
/// back, and the broker keeps the message meanwhile.
pub fn refused_for_content(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = cause.downcast_ref::<rusqlite::Error>() {
            use rusqlite::ErrorCode as C;
            return matches!(f.code, C::ConstraintViolation | C::TooBig | C::TypeMismatch);
        }
        #[cfg(feature = "postgres")]
        if let Some(pg) = cause.downcast_ref::<postgres::Error>() {
            // SQLSTATE class 22: data exception (a NUL in text, a value out of range);
            // class 23: integrity constraint violation.
            return pg
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"));
        }
    }
    false
}

fn first_line(sql: &str) -> String {
    sql.trim().lines().next().unwrap_or("").to_string()
}

/// SQLite reads `$1` as a named parameter numbered by first appearance; `?1` is by number.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

fn sqlite_value(v: &Val) -> rusqlite::types::Value {
    match v {
        Val::I(Some(i)) => rusqlite::types::Value::Integer(*i),
        Val::T(Some(t)) => rusqlite::types::Value::Text(t.clone()),
        Val::I(None) | Val::T(None) => rusqlite::types::Value::Null,
    }
}

#[cfg(feature = "postgres")]
fn pg_refs(p: &[Val]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|v| match v {
            Val::I(i) => i as &(dyn postgres::types::ToSql + Sync),
            Val::T(t) => t as &(dyn postgres::types::ToSql + Sync),
        })
        .collect()
}

/// The databases each test runs on: an SQLite file always, a fresh PostgreSQL server in a
/// build with the `postgres` feature. Keep the first element alive while using the second.
#[cfg(test)]
pub(crate) fn databases() -> Vec<(Box<dyn std::any::Any>, std::path::PathBuf)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sqlite");
    #[allow(unused_mut)]
    let mut v: Vec<(Box<dyn std::any::Any>, std::path::PathBuf)> = vec![(Box::new(dir), path)];
    #[cfg(feature = "postgres")]
    {
        let pg = testing::PgServer::start().unwrap();
        let url = pg.url("secret");
        v.push((Box::new(pg), url.into()));
    }
    v
}

/// A throwaway PostgreSQL server for tests (Debian's `postgresql` package).
#[cfg(all(test, feature = "postgres"))]
pub(crate) mod testing {
    use anyhow::{Context, Result, bail};
    use std::path::PathBuf;
    use std::process::Command;

    /// A server in a temporary folder on a free loopback port, stopped when dropped. As root
    /// (CI) it runs as the `postgres` user, which the server requires.
    pub struct PgServer {
        dir: tempfile::TempDir,
        bin: PathBuf,
        port: u16,
    }

    fn bin_dir() -> Result<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed (Debian: apt-get install postgresql); the postgres tests need it")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").is_file())
            .collect();
        found.sort();
        found.pop().context("no initdb under /usr/lib/postgresql")
    }

    /// Whether the tests run as root (CI).
    fn root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    }

    fn as_server_user(bin: &std::path::Path, tool: &str) -> Command {
        if root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
            c
        } else {
            Command::new(bin.join(tool))
        }
    }

    impl PgServer {
        /// Initialises and starts a server with a superuser `wbc` whose password is `secret`.
        pub fn start() -> Result<Self> {
            let bin = bin_dir()?;
            let dir = tempfile::tempdir()?;
            if root() {
                let st = Command::new("chown").arg("postgres").arg(dir.path()).status()?;
                if !st.success() {
                    bail!("chown postgres failed");
                }
            }
            let pw = dir.path().join("pw");
            std::fs::write(&pw, "secret\n")?;
            if root() {
                Command::new("chown").arg("postgres").arg(&pw).status()?;
            }
            let data = dir.path().join("data");
            let out = as_server_user(&bin, "initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "wbc", "-A", "scram-sha-256", "--pwfile"])
                .arg(&pw)
                .output()?;
            if !out.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let out = as_server_user(&bin, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1",
                    dir.path().display()
                ))
                .arg("-l")
                .arg(dir.path().join("log"))
                .args(["-w", "start"])
                .output()?;
            if !out.status.success() {
                bail!("pg_ctl start failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(PgServer { dir, bin, port })
        }

        /// The URL of its `postgres` database.
        pub fn url(&self, password: &str) -> String {
            format!("postgres://wbc:{password}@127.0.0.1:{}/postgres", self.port)
        }
    }

    impl Drop for PgServer {
        fn drop(&mut self) {
            let _ = as_server_user(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}
