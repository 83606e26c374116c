//! [`PgKeys`]: known keys in PostgreSQL, shared by every instance of a service and woken by
//! `LISTEN`/`NOTIFY` (feature `postgres`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions,
};
use sqlx::{Column, Connection, Executor, Postgres, Statement, Type, TypeInfo};
use tokio::sync::oneshot;

use super::key::{SqlKey, SqlKeyKind, SqlKeyValue, key_value};
use super::quote::{MAX_IDENTIFIER_BYTES, quote_ident, quote_literal};
use super::target::{DEFAULT_CONNECT_TIMEOUT, SqlKeysError, Target};
use crate::{DEFAULT_NOTIFY_CAPACITY, KeyError, KeyNotifier, KeySource, KeyWakes};

/// The table [`PgKeys`] creates and uses unless told otherwise.
pub const DEFAULT_PG_TABLE: &str = "prereq_keys";

/// The `application_name` of prereq's connections when the URL sets none.
const DEFAULT_APPLICATION_NAME: &str = "prereq";

/// After this long without a notification, the listener checks that its connection still
/// answers (a connection cut without a word would otherwise wait forever).
const LISTENER_PING_EVERY: Duration = Duration::from_secs(30);

/// The longest pause between two attempts to reconnect the listener.
const LISTENER_MAX_PAUSE: Duration = Duration::from_secs(5);

/// The transaction-level advisory lock under which prereq creates tables and triggers, so that
/// instances starting together do not collide on the catalog (`"prereq"` in ASCII).
const SETUP_LOCK: i64 = 0x7072_6572_6571;

/// The trigger's SQL, with placeholders: see [`notify_trigger_sql`].
const NOTIFY_TRIGGER_TEMPLATE: &str = include_str!("pg_notify_trigger.sql");

/// Known keys in PostgreSQL, shared by every instance of a service and woken by
/// `LISTEN`/`NOTIFY` (feature `postgres`).
///
/// Two ways to use it:
///
/// - **prereq's table** ([`PgKeys::connect`], [`PgKeys::builder`]): prereq creates the table
///   (`CREATE TABLE IF NOT EXISTS`, one column `key`: `BIGINT` for integer keys, `TEXT` for text
///   keys) and [`KeySource::insert`] writes to it with `INSERT … ON CONFLICT DO NOTHING` and a
///   `pg_notify(channel, key::text)` in the same statement. Keys inserted by other services
///   with a plain `INSERT` wake held messages too once [`PgKeys::install_notify_trigger`] has
///   installed the trigger (the SQL is [`notify_trigger_sql`], also a file of the crate).
/// - **Your own table** ([`PgKeysBuilder::existence_query`]): your query answers whether a
///   key is known (`SELECT EXISTS(SELECT 1 FROM customers WHERE id = $1)`), your trigger or
///   code notifies a channel with the key as text as payload. prereq never writes there:
///   [`KeySource::insert`] only notifies this instance's subscribers.
///
/// Every source listens on its channel on a connection of its own, in a background task that
/// feeds its subscribers. The listener reconnects by itself; notifications sent while it was
/// disconnected are lost (PostgreSQL keeps none for absent listeners), so after a reconnection
/// subscribers get [`Wake::Resync`](crate::Wake::Resync) and look every held key up again.
/// The task ends when the last clone of the source is dropped.
///
/// Connecting is bounded ([`PgKeysBuilder::connect_timeout`]) and fails with a clear
/// [`SqlKeysError`]; no error, log line or `Debug` output shows the password of the URL.
/// At run time a failed query is [`KeyError::Unavailable`]: the consumer holds the message and
/// asks again later.
///
/// ```no_run
/// use prereq::KeySource;
/// use prereq::sql::PgKeys;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let url = "postgres://prereq:secret@db.internal/app";
///
/// // prereq's table `prereq_keys`, notifications on the channel `prereq_keys`:
/// let keys: PgKeys<i64> = PgKeys::connect(url).await?;
/// keys.install_notify_trigger().await?; // optional: plain INSERTs by others wake too
/// keys.insert(&42).await?;
///
/// // A table of your own, and the channel your trigger notifies with the id as payload:
/// let customers: PgKeys<i64> = PgKeys::builder(url)
///     .existence_query("SELECT EXISTS(SELECT 1 FROM customers WHERE id = $1)")
///     .channel("customer_created")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
///
/// Clones share the connection pool, the listener and the subscribers.
pub struct PgKeys<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    pool: PgPool,
    notifier: KeyNotifier<K>,
    target: Target,
    table: Option<Table>,
    channel: Option<String>,
    contains_sql: String,
    insert_sql: Option<String>,
    connect_timeout: Duration,
    /// Dropped with the last clone: the listener task sees it and ends.
    _stop_listener: Option<oneshot::Sender<()>>,
}

/// prereq's own table.
#[derive(Clone, Debug)]
struct Table {
    schema: Option<String>,
    name: String,
}

impl Table {
    fn quoted(&self) -> Result<String, SqlKeysError> {
        let name = quote_ident("table", &self.name)?;
        Ok(match &self.schema {
            Some(schema) => format!("{}.{name}", quote_ident("schema", schema)?),
            None => name,
        })
    }

    fn default_channel(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl<K> Clone for PgKeys<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> fmt::Debug for PgKeys<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        let mut d = f.debug_struct("PgKeys");
        d.field("url", &inner.target);
        match &inner.table {
            Some(table) => d.field("table", &table.default_channel()),
            None => d.field("existence_query", &inner.contains_sql),
        };
        d.field("channel", &inner.channel)
            .field("notifier", &inner.notifier)
            .finish_non_exhaustive()
    }
}

/// How to connect a [`PgKeys`]: from [`PgKeys::builder`].
#[must_use = "a builder does nothing until `connect` is awaited"]
pub struct PgKeysBuilder<K> {
    url: String,
    table: Table,
    query: Option<String>,
    channel: Option<String>,
    connect_timeout: Duration,
    max_connections: u32,
    application_name: Option<String>,
    notify_capacity: usize,
    _key: std::marker::PhantomData<fn() -> K>,
}

impl<K> fmt::Debug for PgKeysBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgKeysBuilder")
            .field("url", &Target::url(&self.url))
            .field("table", &self.table)
            .field("existence_query", &self.query)
            .field("channel", &self.channel)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_connections", &self.max_connections)
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

impl<K: SqlKey> PgKeys<K> {
    /// Connect to `url` (`postgres://user:password@host:port/database`), create the table
    /// [`DEFAULT_PG_TABLE`] if needed and listen on its channel.
    pub async fn connect(url: impl Into<String>) -> Result<Self, SqlKeysError> {
        Self::builder(url).connect().await
    }

    /// Configure a source in the database at `url`.
    pub fn builder(url: impl Into<String>) -> PgKeysBuilder<K> {
        PgKeysBuilder {
            url: url.into(),
            table: Table {
                schema: None,
                name: DEFAULT_PG_TABLE.to_owned(),
            },
            query: None,
            channel: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections: 4,
            application_name: None,
            notify_capacity: DEFAULT_NOTIFY_CAPACITY,
            _key: std::marker::PhantomData,
        }
    }

    /// The notifier of this instance's subscribers: [`KeyNotifier::notify`] a key your own
    /// code made known to wake this instance's held messages at once (other instances hear of
    /// it through the channel).
    pub fn notifier(&self) -> &KeyNotifier<K> {
        &self.inner.notifier
    }

    /// The channel this source listens on, if any.
    pub fn channel(&self) -> Option<&str> {
        self.inner.channel.as_deref()
    }

    /// Create (or replace) the trigger that notifies the channel of every key inserted into
    /// prereq's table by anyone, a plain `INSERT` of another service included. Idempotent and
    /// safe to call from several instances at once (it runs under an advisory lock). Needs
    /// PostgreSQL 14 or later, and the right to create functions and triggers in the schema.
    ///
    /// Fails with [`SqlKeysError::Config`] for a source on your own table: run
    /// [`notify_trigger_sql`] for that table in your migrations instead.
    pub async fn install_notify_trigger(&self) -> Result<(), SqlKeysError> {
        let inner = &self.inner;
        let (Some(table), Some(channel)) = (&inner.table, &inner.channel) else {
            return Err(SqlKeysError::Config(
                "install_notify_trigger needs prereq's own table; for your own table run \
                 notify_trigger_sql in your migrations"
                    .into(),
            ));
        };
        let sql = notify_trigger_sql(table.schema.as_deref(), &table.name, "key", channel)?;
        let target = &inner.target;
        let work = async {
            let mut tx = inner.pool.begin().await.map_err(|e| target.query(&e))?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(SETUP_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(|e| target.setup(format_args!("taking the setup lock: {e}")))?;
            sqlx::raw_sql(&sql)
                .execute(&mut *tx)
                .await
                .map_err(|e| target.setup(format_args!("installing the notify trigger: {e}")))?;
            tx.commit().await.map_err(|e| target.query(&e))
        };
        match tokio::time::timeout(inner.connect_timeout * 3, work).await {
            Ok(done) => done,
            Err(_) => Err(target.timeout(inner.connect_timeout * 3)),
        }
    }
}

/// The SQL of a trigger that runs `pg_notify(channel, NEW.column::text)` after every row
/// inserted into `schema.table` (or `table` in the search path), to run in your migrations for
/// a table of your own. Idempotent (`CREATE OR REPLACE`, PostgreSQL 14 or later).
///
/// The template is `pg_notify_trigger.sql` in the crate's sources. It creates the function
/// `<table>_prereq_notify` in the table's schema and the trigger of the same name. Names are
/// quoted; fails with [`SqlKeysError::Config`] for a name that cannot be an identifier or is
/// too long (a table name of at most 49 bytes leaves room for the suffix).
///
/// ```
/// let sql = prereq::sql::notify_trigger_sql(Some("billing"), "customers", "id", "customer_created")
///     .expect("valid names");
/// assert!(sql.contains(r#"AFTER INSERT ON "billing"."customers""#));
/// assert!(sql.contains(r#"pg_notify('customer_created', NEW."id"::text)"#));
/// ```
pub fn notify_trigger_sql(
    schema: Option<&str>,
    table: &str,
    column: &str,
    channel: &str,
) -> Result<String, SqlKeysError> {
    check_channel(channel)?;
    let schema = schema.map(|s| quote_ident("schema", s)).transpose()?;
    let qualify = |name: &str| match &schema {
        Some(schema) => format!("{schema}.{name}"),
        None => name.to_owned(),
    };
    let name = format!("{table}_prereq_notify");
    let quoted_table = qualify(&quote_ident("table", table)?);
    let function = quote_ident("trigger function", &name)?;
    Ok(NOTIFY_TRIGGER_TEMPLATE
        .replace("{{function}}", &qualify(&function))
        .replace("{{trigger}}", &function)
        .replace("{{table}}", &quoted_table)
        .replace("{{column}}", &quote_ident("column", column)?)
        .replace("{{channel}}", &quote_literal(channel)))
}

fn check_channel(channel: &str) -> Result<(), SqlKeysError> {
    // The channel is an identifier too: LISTEN truncates a longer one, pg_notify refuses it.
    quote_ident("channel", channel).map(drop).map_err(|_| {
        SqlKeysError::Config(format!(
            "the channel name {channel:?} must be 1 to {MAX_IDENTIFIER_BYTES} bytes without NUL \
             (set one with PgKeysBuilder::channel)"
        ))
    })
}

impl<K: SqlKey> PgKeysBuilder<K> {
    /// The table prereq creates (if missing) and writes keys to; [`DEFAULT_PG_TABLE`] by
    /// default.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table.name = name.into();
        self
    }

    /// The schema of prereq's table; by default the first schema of the connection's
    /// `search_path`. The schema must exist.
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.table.schema = Some(name.into());
        self
    }

    /// Look keys up with your own query instead of prereq's table: the key is `$1` (bound as
    /// `BIGINT` for integer keys, `TEXT` for text keys: cast it if your column differs, e.g.
    /// `id = $1::uuid`), and the query returns one boolean, e.g. `SELECT EXISTS(SELECT 1 FROM
    /// customers WHERE id = $1)`; no row or `NULL` counts as unknown. prereq creates nothing
    /// and never writes: [`KeySource::insert`] only notifies this instance's subscribers. The
    /// source listens only if a [`PgKeysBuilder::channel`] is set.
    pub fn existence_query(mut self, sql: impl Into<String>) -> Self {
        self.query = Some(sql.into());
        self
    }

    /// The channel to listen on (and, for prereq's table, to notify). By default the table's
    /// name, schema-qualified if a schema is set (`billing.prereq_keys`); none for an
    /// existence query. Set it when several prereq tables share a database through their
    /// `search_path`: channels are global to a database.
    pub fn channel(mut self, name: impl Into<String>) -> Self {
        self.channel = Some(name.into());
        self
    }

    /// How long connecting and setting up may take, and how long a lookup waits for a free
    /// connection before it is [`KeyError::Unavailable`]; [`DEFAULT_CONNECT_TIMEOUT`] by default.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// At most this many connections for lookups and inserts (at least 1); 4 by default. The
    /// listener has one more of its own.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// The `application_name` of the connections (as seen in `pg_stat_activity`); the URL's,
    /// else `prereq`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// How many notifications a subscriber may fall behind before it gets a resync; see
    /// [`KeyNotifier::with_capacity`].
    pub fn notify_capacity(mut self, capacity: usize) -> Self {
        self.notify_capacity = capacity;
        self
    }

    /// Connect, create the table if needed (not for an existence query), check that lookups
    /// work, and start listening. Fails within the connect timeout (setting up gets as long
    /// again) with an error that names the database without its password.
    pub async fn connect(self) -> Result<PgKeys<K>, SqlKeysError> {
        let target = Target::url(&self.url);
        let mut options = PgConnectOptions::from_str(&self.url).map_err(|e| {
            SqlKeysError::Config(format!(
                "invalid PostgreSQL URL {target}: {}",
                target.scrub(&e.to_string())
            ))
        })?;
        if let Some(name) = &self.application_name {
            options = options.application_name(name);
        } else if options.get_application_name().is_none() {
            options = options.application_name(DEFAULT_APPLICATION_NAME);
        }
        let (table, contains_sql, insert_sql, channel) = match &self.query {
            Some(query) => (None, query.clone(), None, self.channel.clone()),
            None => {
                let quoted = self.table.quoted()?;
                let contains = format!("SELECT EXISTS(SELECT 1 FROM {quoted} WHERE \"key\" = $1)");
                let insert = format!(
                    "WITH inserted AS (INSERT INTO {quoted} (\"key\") VALUES ($1) \
                     ON CONFLICT DO NOTHING RETURNING \"key\") \
                     SELECT pg_notify($2, \"key\"::text) FROM inserted"
                );
                let channel = self
                    .channel
                    .clone()
                    .unwrap_or_else(|| self.table.default_channel());
                (
                    Some(self.table.clone()),
                    contains,
                    Some(insert),
                    Some(channel),
                )
            }
        };
        if let Some(channel) = &channel {
            check_channel(channel)?;
        }

        let timeout = self.connect_timeout;
        let mut conn =
            match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(target.connect(&e)),
                Err(_) => return Err(target.timeout(timeout)),
            };
        let setup = async {
            if let Some(table) = &table {
                create_table::<K>(&mut conn, &target, table).await?;
            }
            check_query::<K>(&mut conn, &target, &contains_sql).await
        };
        let setup = match tokio::time::timeout(timeout, setup).await {
            Ok(done) => done,
            Err(_) => Err(target.timeout(timeout)),
        };
        let _ = conn.close().await;
        setup?;

        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(timeout)
            .connect_lazy_with(options.clone());
        let notifier = KeyNotifier::with_capacity(self.notify_capacity);
        let stop = match &channel {
            Some(channel) => {
                // A pool of its own, so that the listener never waits behind lookups.
                let listener_pool = PgPoolOptions::new()
                    .max_connections(1)
                    .max_lifetime(None)
                    .idle_timeout(None)
                    .acquire_timeout(timeout)
                    .connect_lazy_with(options);
                let listener =
                    match tokio::time::timeout(timeout, listen(&listener_pool, channel)).await {
                        Ok(Ok(listener)) => listener,
                        Ok(Err(e)) => return Err(target.connect(&e)),
                        Err(_) => return Err(target.timeout(timeout)),
                    };
                let (stop_tx, stop_rx) = oneshot::channel();
                tokio::spawn(
                    Listening {
                        pool: listener_pool,
                        channel: channel.clone(),
                        notifier: notifier.clone(),
                        target: target.clone(),
                        ping_timeout: timeout,
                        warned_payload: false,
                    }
                    .run(listener, stop_rx),
                );
                Some(stop_tx)
            }
            None => None,
        };
        Ok(PgKeys {
            inner: Arc::new(Inner {
                pool,
                notifier,
                target,
                table,
                channel,
                contains_sql,
                insert_sql,
                connect_timeout: timeout,
                _stop_listener: stop,
            }),
        })
    }
}

async fn create_table<K: SqlKey>(
    conn: &mut PgConnection,
    target: &Target,
    table: &Table,
) -> Result<(), SqlKeysError> {
    let quoted = table.quoted()?;
    let column = match K::KIND {
        SqlKeyKind::Integer => "BIGINT",
        SqlKeyKind::Text => "TEXT",
    };
    let mut tx = conn.begin().await.map_err(|e| target.query(&e))?;
    // Concurrent CREATE TABLE IF NOT EXISTS can fail on the catalog's unique index: serialise.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SETUP_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(|e| target.setup(format_args!("taking the setup lock: {e}")))?;
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {quoted} (\"key\" {column} PRIMARY KEY)"
    ))
    .execute(&mut *tx)
    .await
    .map_err(|e| target.setup(format_args!("creating table {quoted}: {e}")))?;
    tx.commit().await.map_err(|e| target.query(&e))
}

/// Prepare the existence query with the key's type, check that it returns one boolean, and run
/// it once with a sample key: a wrong query, or a table of another key type, fails here.
async fn check_query<K: SqlKey>(
    conn: &mut PgConnection,
    target: &Target,
    sql: &str,
) -> Result<(), SqlKeysError> {
    let (param, sample) = match K::KIND {
        SqlKeyKind::Integer => (
            <i64 as Type<Postgres>>::type_info(),
            SqlKeyValue::Integer(0),
        ),
        SqlKeyKind::Text => (
            <String as Type<Postgres>>::type_info(),
            SqlKeyValue::Text(String::new()),
        ),
    };
    if !sql.contains("$1") {
        return Err(SqlKeysError::Config(format!(
            "the existence query must use the key as $1: {sql}"
        )));
    }
    let statement = (&mut *conn)
        .prepare_with(sql, &[param])
        .await
        .map_err(|e| target.setup(format_args!("the existence query does not prepare: {e}")))?;
    match statement.columns() {
        [column] if <bool as Type<Postgres>>::compatible(column.type_info()) => {}
        columns => {
            let types: Vec<&str> = columns.iter().map(|c| c.type_info().name()).collect();
            return Err(SqlKeysError::Config(format!(
                "the existence query must return one boolean (SELECT EXISTS(…)), not {types:?}"
            )));
        }
    }
    lookup(&mut *conn, sql, sample)
        .await
        .map(drop)
        .map_err(|e| target.setup(format_args!("the existence query failed: {e}")))
}

fn bind<'q, O>(
    q: sqlx::query::QueryScalar<'q, Postgres, O, PgArguments>,
    key: SqlKeyValue,
) -> sqlx::query::QueryScalar<'q, Postgres, O, PgArguments> {
    match key {
        SqlKeyValue::Integer(i) => q.bind(i),
        SqlKeyValue::Text(s) => q.bind(s),
    }
}

async fn lookup<'c, E>(conn: E, sql: &str, key: SqlKeyValue) -> Result<bool, sqlx::Error>
where
    E: Executor<'c, Database = Postgres>,
{
    let row: Option<Option<bool>> = bind(sqlx::query_scalar(sql), key)
        .fetch_optional(conn)
        .await?;
    Ok(row.flatten().unwrap_or(false))
}

async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnection is the task's: it must know when it happened, to resync.
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}

/// The background task feeding a source's subscribers from its channel.
struct Listening<K> {
    pool: PgPool,
    channel: String,
    notifier: KeyNotifier<K>,
    target: Target,
    ping_timeout: Duration,
    warned_payload: bool,
}

impl<K: SqlKey> Listening<K> {
    async fn run(mut self, listener: PgListener, mut stop: oneshot::Receiver<()>) {
        tokio::select! {
            _ = &mut stop => {}
            _ = self.serve(listener) => {}
        }
        // The listener (if any) was dropped with `serve`: let it give its connection back, then
        // close it.
        let _ = tokio::time::timeout(self.ping_timeout, self.pool.close()).await;
        tracing::debug!(channel = %self.channel, "key source listener stopped");
    }

    /// Receive until the connection is lost, reconnect, resync, and again: forever.
    async fn serve(&mut self, mut listener: PgListener) {
        loop {
            let lost = self.receive(&mut listener).await;
            drop(listener);
            tracing::warn!(
                target = %self.target, channel = %self.channel,
                "key source listener lost its connection ({lost}); reconnecting"
            );
            listener = self.reconnect().await;
            tracing::info!(
                target = %self.target, channel = %self.channel,
                "key source listener reconnected; held keys are looked up again"
            );
            self.notifier.resync();
        }
    }

    /// Feed notifications to the subscribers until the connection fails; why it failed.
    async fn receive(&mut self, listener: &mut PgListener) -> String {
        loop {
            match tokio::time::timeout(LISTENER_PING_EVERY, listener.try_recv()).await {
                Ok(Ok(Some(notification))) => self.deliver(notification.payload()),
                Ok(Ok(None)) => return "the connection closed".into(),
                Ok(Err(e)) => return self.target.scrub(&e.to_string()),
                Err(_) => {
                    // Quiet for a while: does the connection still answer?
                    match tokio::time::timeout(self.ping_timeout, listener.execute("SELECT 1"))
                        .await
                    {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return self.target.scrub(&e.to_string()),
                        Err(_) => return "the connection stopped answering".into(),
                    }
                }
            }
        }
    }

    fn deliver(&mut self, payload: &str) {
        match K::from_text(payload) {
            Some(key) => self.notifier.notify(key),
            None => {
                // Not a key of ours: some key may have been meant, so every held key is looked
                // up again. Warned once per listener, since a foreign format repeats.
                if !self.warned_payload {
                    self.warned_payload = true;
                    tracing::warn!(
                        channel = %self.channel, payload = %payload.chars().take(64).collect::<String>(),
                        "notification payload is not a key of this source; held keys are looked \
                         up again (further ones are logged at debug level)"
                    );
                } else {
                    tracing::debug!(channel = %self.channel, "notification payload is not a key");
                }
                self.notifier.resync();
            }
        }
    }

    /// Connect and listen again, pausing longer after each failure; logs the first failure only.
    async fn reconnect(&mut self) -> PgListener {
        let mut pause = Duration::from_millis(100);
        let mut logged = false;
        loop {
            match tokio::time::timeout(self.ping_timeout, listen(&self.pool, &self.channel)).await {
                Ok(Ok(listener)) => return listener,
                Ok(Err(e)) if !logged => {
                    logged = true;
                    tracing::warn!(
                        target = %self.target, channel = %self.channel,
                        "key source listener cannot reconnect yet: {}",
                        self.target.scrub(&e.to_string())
                    );
                }
                _ => {}
            }
            // Reconnection backoff: the server is down or refusing.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LISTENER_MAX_PAUSE);
        }
    }
}

impl<K: SqlKey> KeySource<K> for PgKeys<K> {
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
        let (Some(sql), Some(channel)) = (&inner.insert_sql, &inner.channel) else {
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
            .bind(channel.as_str())
            .execute(&inner.pool)
            .await
            .map_err(|e| KeyError::Unavailable(inner.target.query(&e)))?;
        if done.rows_affected() > 0 {
            // The listener hears of it too; telling this instance's subscribers at once does not
            // wait for the round trip, nor for a listener that is reconnecting.
            inner.notifier.notify(key.clone());
        }
        Ok(())
    }

    fn subscribe(&self) -> KeyWakes<K> {
        self.inner.notifier.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trigger_sql_quotes_every_name() {
        let sql = notify_trigger_sql(None, "we\"ird", "key", "it's").unwrap_or_default();
        assert!(
            sql.contains(r#"CREATE OR REPLACE FUNCTION "we""ird_prereq_notify"()"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"pg_notify('it''s', NEW."key"::text)"#),
            "{sql}"
        );
        assert!(!sql.contains("{{"), "every placeholder filled: {sql}");
        assert!(notify_trigger_sql(None, &"t".repeat(50), "key", "c").is_err());
        assert!(notify_trigger_sql(None, "t", "key", "").is_err());
        assert!(notify_trigger_sql(None, "t", "key", &"c".repeat(64)).is_err());
    }

    #[tokio::test]
    async fn a_malformed_url_is_a_config_error_without_the_password() {
        let e = PgKeys::<i64>::connect("postgres://u:hunter2@host:notaport/db")
            .await
            .err();
        let shown = format!("{e:?}");
        assert!(matches!(e, Some(SqlKeysError::Config(_))), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let builder = PgKeys::<i64>::builder("postgres://u:hunter2@host/db");
        assert!(!format!("{builder:?}").contains("hunter2"));
    }
}
