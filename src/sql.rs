//! Key sources in SQL databases, with sqlx: known keys that survive restarts and are shared by
//! instances.
//!
//! - [`SqliteKeys`] (feature `sqlite`): an SQLite file, no server: the embedded default.
//! - [`PgKeys`] (feature `postgres`): a PostgreSQL table shared by a fleet; every insert sends a
//!   `NOTIFY` and every instance `LISTEN`s, so a key registered anywhere wakes the messages held
//!   for it everywhere. Or your own table: [`PgKeysBuilder::existence_query`].
//! - [`SqlKey`]: how a key type maps to a column (`i64`, `i32`, `u32`, `u64`, `String`).
//!
//! See `docs/keys.md` for the cache's assumptions, outages and the notify trigger.

mod key;
#[cfg(feature = "postgres")]
mod postgres;
mod quote;
#[cfg(feature = "sqlite")]
mod sqlite;
mod target;

pub use key::{MAX_TEXT_KEY_BYTES, SqlKey, SqlKeyKind, SqlKeyValue};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{DEFAULT_PG_TABLE, PgKeys, PgKeysBuilder, notify_trigger_sql};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::{
    DEFAULT_SQLITE_BUSY_TIMEOUT, DEFAULT_SQLITE_TABLE, SqliteKeys, SqliteKeysBuilder,
};
pub use target::{DEFAULT_CONNECT_TIMEOUT, SqlKeysError};
