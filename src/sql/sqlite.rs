//! [`SqliteKeys`]: known keys in an SQLite file, so that they survive restarts (feature
//! `sqlite`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Sqlite, SqliteConnection};

use super::key::{SqlKey, SqlKeyKind, SqlKeyValue, key_value};
use super::quote::quote_ident;
use super::target::{DEFAULT_CONNECT_TIMEOUT, SqlKeysError, Target};
use crate::{DEFAULT_NOTIFY_CAPACITY, KeyError, KeyNotifier, KeySource, KeyWakes};

/// The table [`SqliteKeys`] creates and uses unless told otherwise.
pub const DEFAULT_SQLITE_TABLE: &str = "prereq_keys";

/// How long an SQLite source waits for another writer by default.
pub const DEFAULT_SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Known keys in an SQLite file, so that they survive restarts (feature `sqlite`).
///
/// The embedded default for a single host: no server, one file. Several consumers, clones and
/// even processes may share the file: it is put in WAL mode (readers never wait for the
/// writer) and a busy writer is waited for ([`SqliteKeysBuilder::busy_timeout`]). Keys are
/// written with `synchronous = FULL`, so that a registration acknowledged after
/// [`KeySource::insert`] returned is on disk.
///
/// Subscribers hear of the keys inserted through this process's [`SqliteKeys`] (all clones);
/// SQLite has no notifications between processes, so a key inserted by another process is seen
/// when a held message's hold runs out and it is looked up again.
///
/// ```no_run
/// use prereq::KeySource;
/// use prereq::sql::SqliteKeys;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Creates the file and its table `prereq_keys` if needed.
/// let keys: SqliteKeys<u64> = SqliteKeys::open("keys.db").await?;
/// keys.insert(&42).await?;
/// assert!(keys.contains(&42).await?);
///
/// // Or a table of your own, read with your query (prereq never writes to it):
/// let clients: SqliteKeys<i64> = SqliteKeys::builder("app.db")
///     .existence_query("SELECT EXISTS(SELECT 1 FROM clients WHERE id = ?1)")
///     .open()
///     .await?;
/// # Ok(()) }
/// ```
///
/// Built by [`SqliteKeys::open`] or [`SqliteKeys::builder`]; clones share one pool and one
/// notifier.
pub struct SqliteKeys<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    pool: SqlitePool,
    notifier: KeyNotifier<K>,
    target: Target,
    table: Option<String>,
    contains_sql: String,
    insert_sql: Option<String>,
}

impl<K> Clone for SqliteKeys<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> fmt::Debug for SqliteKeys<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteKeys")
            .field("file", &self.inner.target)
            .field("table", &self.inner.table)
            .field("notifier", &self.inner.notifier)
            .finish_non_exhaustive()
    }
}

/// How to open an [`SqliteKeys`]: from [`SqliteKeys::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `open` is awaited"]
pub struct SqliteKeysBuilder<K> {
    path: PathBuf,
    table: String,
    query: Option<String>,
    busy_timeout: Duration,
    open_timeout: Duration,
    max_connections: u32,
    notify_capacity: usize,
    _key: std::marker::PhantomData<fn() -> K>,
}

impl<K: SqlKey> SqliteKeys<K> {
    /// Open (or create) the file at `path` and its table [`DEFAULT_SQLITE_TABLE`].
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, SqlKeysError> {
        Self::builder(path).open().await
    }

    /// Configure a source in the file at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteKeysBuilder<K> {
        SqliteKeysBuilder {
            path: path.as_ref().to_owned(),
            table: DEFAULT_SQLITE_TABLE.to_owned(),
            query: None,
            busy_timeout: DEFAULT_SQLITE_BUSY_TIMEOUT,
            open_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections: 4,
            notify_capacity: DEFAULT_NOTIFY_CAPACITY,
            _key: std::marker::PhantomData,
        }
    }

    /// The notifier of this source's subscribers: [`KeyNotifier::notify`] a key your own code
    /// made known (in a table read by [`SqliteKeysBuilder::existence_query`]) to wake the
    /// messages held for it at once.
    pub fn notifier(&self) -> &KeyNotifier<K> {
        &self.inner.notifier
    }
}

impl<K: SqlKey> SqliteKeysBuilder<K> {
    /// The table prereq creates (if missing) and writes keys to; [`DEFAULT_SQLITE_TABLE`]
    /// by default. Its one column, `key`, is `INTEGER PRIMARY KEY` for integer keys and
    /// `TEXT PRIMARY KEY` for text keys.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// Look keys up with your own query instead of prereq's table: one parameter (`?1`, the
    /// key), one row with one boolean, e.g. `SELECT EXISTS(SELECT 1 FROM clients WHERE id =
    /// ?1)`. No row or `NULL` counts as unknown. prereq then never writes to the file and does
    /// not change its journal mode; [`KeySource::insert`] only notifies this process's
    /// subscribers. The file must exist.
    pub fn existence_query(mut self, sql: impl Into<String>) -> Self {
        self.query = Some(sql.into());
        self
    }

    /// How long a statement waits for another connection's write lock before failing (the
    /// lookup is then [`KeyError::Unavailable`]); [`DEFAULT_SQLITE_BUSY_TIMEOUT`] by default.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How long [`SqliteKeysBuilder::open`] may take, and how long a lookup waits for a free
    /// connection; [`DEFAULT_CONNECT_TIMEOUT`] by default.
    pub fn open_timeout(mut self, timeout: Duration) -> Self {
        self.open_timeout = timeout;
        self
    }

    /// At most this many connections to the file (at least 1); 4 by default.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How many notifications a subscriber may fall behind before it gets a resync; see
    /// [`KeyNotifier::with_capacity`].
    pub fn notify_capacity(mut self, capacity: usize) -> Self {
        self.notify_capacity = capacity;
        self
    }

    /// Open the file (creating it and the table if needed, unless an existence query is
    /// set), put it in WAL mode, and check that lookups work. Fails within the open timeout.
    pub async fn open(self) -> Result<SqliteKeys<K>, SqlKeysError> {
        let target = Target::plain(self.path.display().to_string());
        let timeout = self.open_timeout;
        match tokio::time::timeout(timeout, self.open_inner(target.clone())).await {
            Ok(result) => result,
            Err(_) => Err(target.timeout(timeout)),
        }
    }

    async fn open_inner(self, target: Target) -> Result<SqliteKeys<K>, SqlKeysError> {
        let own_query = self.query.is_some();
        let options = SqliteConnectOptions::new()
            .filename(&self.path)
            .create_if_missing(!own_query)
            .busy_timeout(self.busy_timeout)
            .synchronous(SqliteSynchronous::Full);

        let (table, contains_sql, insert_sql) = match &self.query {
            Some(query) => (None, query.clone(), None),
            None => {
                let table = quote_ident("table", &self.table)?;
                let contains = format!("SELECT EXISTS(SELECT 1 FROM {table} WHERE \"key\" = ?1)");
                let insert =
                    format!("INSERT INTO {table} (\"key\") VALUES (?1) ON CONFLICT DO NOTHING");
                (Some(self.table.clone()), contains, Some(insert))
            }
        };

        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| target.connect(&e))?;
        let setup = async {
            if !own_query {
                set_wal(&mut conn, &target).await?;
                create_table::<K>(&mut conn, &target, &self.table).await?;
            }
            // One lookup of a sample key: a wrong query fails here, not at every message.
            let sample = match K::KIND {
                SqlKeyKind::Integer => SqlKeyValue::Integer(0),
                SqlKeyKind::Text => SqlKeyValue::Text(String::new()),
            };
            lookup(&mut conn, &contains_sql, sample)
                .await
                .map_err(|e| target.setup(format_args!("the existence query failed: {e}")))?;
            Ok::<(), SqlKeysError>(())
        }
        .await;
        let _ = conn.close().await;
        setup?;

        let pool = SqlitePoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.open_timeout)
            .connect_lazy_with(options);
        Ok(SqliteKeys {
            inner: Arc::new(Inner {
                pool,
                notifier: KeyNotifier::with_capacity(self.notify_capacity),
                target,
                table,
                contains_sql,
                insert_sql,
            }),
        })
    }
}

/// Put the file in WAL mode (a setting kept in the file). Switching needs a lock that the busy
/// timeout does not wait for: another process opening the file at the same moment makes it
/// fail with "database is locked", so it is retried until the open timeout.
async fn set_wal(conn: &mut SqliteConnection, target: &Target) -> Result<(), SqlKeysError> {
    let mut pause = Duration::from_millis(10);
    loop {
        match sqlx::query_scalar::<_, String>("PRAGMA journal_mode = WAL")
            .fetch_one(&mut *conn)
            .await
        {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => {
                return Ok(());
            }
            Ok(mode) => {
                return Err(target.setup(format_args!(
                    "the file cannot be put in WAL mode (journal mode stays {mode:?})"
                )));
            }
            Err(e) if is_busy(&e) => {
                // Retry pause: another connection holds the lock for a moment.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(target.setup(format_args!("setting WAL mode: {e}"))),
        }
    }
}

fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
            matches!(db.code().as_deref().and_then(|c| c.parse::<i64>().ok()), Some(c) if matches!(c & 0xff, 5 | 6))
        }
        _ => false,
    }
}

async fn create_table<K: SqlKey>(
    conn: &mut SqliteConnection,
    target: &Target,
    name: &str,
) -> Result<(), SqlKeysError> {
    let table = quote_ident("table", name)?;
    let column = match K::KIND {
        SqlKeyKind::Integer => "INTEGER",
        SqlKeyKind::Text => "TEXT",
    };
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {table} (\"key\" {column} PRIMARY KEY NOT NULL){}",
        if column == "TEXT" {
            " WITHOUT ROWID"
        } else {
            ""
        }
    );
    sqlx::query(&ddl)
        .execute(&mut *conn)
        .await
        .map_err(|e| target.setup(format_args!("creating table {table}: {e}")))?;
    // A table made earlier for another key type would refuse or mangle these keys.
    let declared: Option<String> =
        sqlx::query_scalar("SELECT type FROM pragma_table_info(?1) WHERE name = 'key'")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| target.setup(format_args!("reading the columns of {table}: {e}")))?;
    match declared {
        Some(t) if t.eq_ignore_ascii_case(column) => Ok(()),
        Some(t) => Err(target.setup(format_args!(
            "table {table} has a column \"key\" of type {t}, but these keys need {column}"
        ))),
        None => Err(target.setup(format_args!(
            "table {table} exists without a column \"key\""
        ))),
    }
}

fn bind<'q, O>(
    q: sqlx::query::QueryScalar<'q, Sqlite, O, SqliteArguments<'q>>,
    key: SqlKeyValue,
) -> sqlx::query::QueryScalar<'q, Sqlite, O, SqliteArguments<'q>> {
    match key {
        SqlKeyValue::Integer(i) => q.bind(i),
        SqlKeyValue::Text(s) => q.bind(s),
    }
}

async fn lookup<'c, E>(conn: E, sql: &str, key: SqlKeyValue) -> Result<bool, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = Sqlite>,
{
    let row: Option<Option<bool>> = bind(sqlx::query_scalar(sql), key)
        .fetch_optional(conn)
        .await?;
    Ok(row.flatten().unwrap_or(false))
}

impl<K: SqlKey> KeySource<K> for SqliteKeys<K> {
    type Error = SqlKeysError;

    async fn contains(&self, key: &K) -> Result<bool, KeyError<SqlKeysError>> {
        let value = key_value(key).map_err(KeyError::InvalidKey)?;
        let inner = &self.inner;
        lookup(&inner.pool, &inner.contains_sql, value)
            .await
            .map_err(|e| KeyError::Unavailable(inner.target.query(&e)))
    }

    async fn insert(&self, key: &K) -> Result<(), KeyError<SqlKeysError>> {
        let value = key_value(key).map_err(KeyError::InvalidKey)?;
        let inner = &self.inner;
        let Some(sql) = &inner.insert_sql else {
            // A table of the user's: prereq never writes there.
            inner.notifier.notify(key.clone());
            return Ok(());
        };
        let q = sqlx::query(sql);
        let q = match value {
            SqlKeyValue::Integer(i) => q.bind(i),
            SqlKeyValue::Text(s) => q.bind(s),
        };
        let done = q
            .execute(&inner.pool)
            .await
            .map_err(|e| KeyError::Unavailable(inner.target.query(&e)))?;
        if done.rows_affected() > 0 {
            inner.notifier.notify(key.clone());
        }
        Ok(())
    }

    fn subscribe(&self) -> KeyWakes<K> {
        self.inner.notifier.subscribe()
    }
}
