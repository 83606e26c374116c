//! How a key type maps to a column: [`SqlKey`], for the SQL key sources.

/// The longest text key the SQL sources accept, in bytes (UTF-8). Longer keys are refused with
/// [`crate::KeyError::InvalidKey`]: the message is dead-lettered, never held.
///
/// Text keys live in a `TEXT` column; the bound keeps them well inside PostgreSQL's limits for
/// an index entry and a notification payload.
pub const MAX_TEXT_KEY_BYTES: usize = 1024;

/// The column kind a [`SqlKey`] is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqlKeyKind {
    /// A 64-bit signed integer: `BIGINT` in PostgreSQL, `INTEGER` in SQLite.
    Integer,
    /// Text: `TEXT` in both.
    Text,
}

/// A key as it is bound to a query: what [`SqlKey::to_sql`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqlKeyValue {
    /// Bound as a 64-bit integer (`BIGINT` / `INTEGER`).
    Integer(i64),
    /// Bound as text (`TEXT`): at most [`MAX_TEXT_KEY_BYTES`] bytes, no NUL character.
    Text(String),
}

impl SqlKeyValue {
    /// The value if every SQL source can store it, else the reason it cannot.
    pub(crate) fn checked(self) -> Result<Self, String> {
        if let Self::Text(text) = &self {
            if text.len() > MAX_TEXT_KEY_BYTES {
                return Err(format!(
                    "key of {} bytes is longer than the {MAX_TEXT_KEY_BYTES} bytes a text key \
                     column accepts",
                    text.len()
                ));
            }
            if text.contains('\0') {
                return Err("key contains a NUL character, which a text column cannot hold".into());
            }
        }
        Ok(self)
    }

    pub(crate) fn kind(&self) -> SqlKeyKind {
        match self {
            Self::Integer(_) => SqlKeyKind::Integer,
            Self::Text(_) => SqlKeyKind::Text,
        }
    }
}

/// A key type the SQL sources can store, look up and read back from a notification.
///
/// Implemented for `i64`, `i32`, `u32`, `u64` (stored as a signed 64-bit integer: a `u64`
/// above `i64::MAX` is refused as an invalid key) and `String` (stored as `TEXT`, at most
/// [`MAX_TEXT_KEY_BYTES`] bytes, no NUL). Implement it for your own key type (a UUID kept as
/// text, …) by mapping it to one of these.
///
/// ```
/// use prereq::sql::{SqlKey, SqlKeyKind, SqlKeyValue};
///
/// #[derive(Clone, Debug, PartialEq, Eq, Hash)]
/// struct ClientId(u32);
///
/// impl SqlKey for ClientId {
///     const KIND: SqlKeyKind = SqlKeyKind::Integer;
///     fn to_sql(&self) -> Result<SqlKeyValue, String> {
///         Ok(SqlKeyValue::Integer(i64::from(self.0)))
///     }
///     fn from_text(text: &str) -> Option<Self> {
///         text.trim().parse().ok().map(ClientId)
///     }
/// }
/// # assert_eq!(ClientId::from_text("7"), Some(ClientId(7)));
/// ```
pub trait SqlKey: Clone + Send + Sync + 'static {
    /// The column kind the key is stored in.
    const KIND: SqlKeyKind;

    /// The key as bound to a query, or why it can never be stored (dead-lettered with that
    /// reason). Must return a value of [`SqlKey::KIND`].
    fn to_sql(&self) -> Result<SqlKeyValue, String>;

    /// The key from its text form: a notification's payload (PostgreSQL's `key::text`).
    /// `None` when the text is not a key of this type.
    fn from_text(text: &str) -> Option<Self>;
}

impl SqlKey for i64 {
    const KIND: SqlKeyKind = SqlKeyKind::Integer;
    fn to_sql(&self) -> Result<SqlKeyValue, String> {
        Ok(SqlKeyValue::Integer(*self))
    }
    fn from_text(text: &str) -> Option<Self> {
        text.trim().parse().ok()
    }
}

impl SqlKey for i32 {
    const KIND: SqlKeyKind = SqlKeyKind::Integer;
    fn to_sql(&self) -> Result<SqlKeyValue, String> {
        Ok(SqlKeyValue::Integer(i64::from(*self)))
    }
    fn from_text(text: &str) -> Option<Self> {
        text.trim().parse().ok()
    }
}

impl SqlKey for u32 {
    const KIND: SqlKeyKind = SqlKeyKind::Integer;
    fn to_sql(&self) -> Result<SqlKeyValue, String> {
        Ok(SqlKeyValue::Integer(i64::from(*self)))
    }
    fn from_text(text: &str) -> Option<Self> {
        text.trim().parse().ok()
    }
}

impl SqlKey for u64 {
    const KIND: SqlKeyKind = SqlKeyKind::Integer;
    fn to_sql(&self) -> Result<SqlKeyValue, String> {
        i64::try_from(*self).map(SqlKeyValue::Integer).map_err(|_| {
            format!(
                "key {self} is above {}, the largest a BIGINT column holds",
                i64::MAX
            )
        })
    }
    fn from_text(text: &str) -> Option<Self> {
        text.trim().parse().ok()
    }
}

impl SqlKey for String {
    const KIND: SqlKeyKind = SqlKeyKind::Text;
    fn to_sql(&self) -> Result<SqlKeyValue, String> {
        Ok(SqlKeyValue::Text(self.clone()))
    }
    fn from_text(text: &str) -> Option<Self> {
        Some(text.to_owned())
    }
}

/// The key of `K` checked for every SQL source, or the reason it is invalid.
pub(crate) fn key_value<K: SqlKey>(key: &K) -> Result<SqlKeyValue, String> {
    let value = key.to_sql()?.checked()?;
    if value.kind() != K::KIND {
        return Err(format!(
            "key maps to a {:?} value but its type declares {:?} (a SqlKey implementation bug)",
            value.kind(),
            K::KIND
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_keys_map_to_bigint_and_u64_above_i64_max_is_invalid() {
        assert_eq!(key_value(&7u64), Ok(SqlKeyValue::Integer(7)));
        assert_eq!(
            key_value(&(i64::MAX as u64)),
            Ok(SqlKeyValue::Integer(i64::MAX))
        );
        let too_big = key_value(&(i64::MAX as u64 + 1));
        assert!(
            matches!(&too_big, Err(reason) if reason.contains("9223372036854775808")),
            "{too_big:?}"
        );
        assert!(key_value(&u64::MAX).is_err());
        assert_eq!(key_value(&-3i32), Ok(SqlKeyValue::Integer(-3)));
        assert_eq!(
            key_value(&u32::MAX),
            Ok(SqlKeyValue::Integer(4_294_967_295))
        );
        assert_eq!(key_value(&i64::MIN), Ok(SqlKeyValue::Integer(i64::MIN)));
    }

    #[test]
    fn text_keys_are_bounded_and_refuse_nul() {
        let fits = "é".repeat(MAX_TEXT_KEY_BYTES / 2);
        assert_eq!(key_value(&fits), Ok(SqlKeyValue::Text(fits.clone())));
        assert!(key_value(&format!("{fits}x")).is_err(), "one byte too long");
        assert!(key_value(&"a\0b".to_owned()).is_err());
        assert_eq!(
            key_value(&String::new()),
            Ok(SqlKeyValue::Text(String::new()))
        );
    }

    #[test]
    fn payloads_parse_back_or_are_refused() {
        assert_eq!(u64::from_text("18446744073709551615"), Some(u64::MAX));
        assert_eq!(u64::from_text("-1"), None);
        assert_eq!(i32::from_text("99999999999"), None);
        assert_eq!(i64::from_text(" 42 "), Some(42));
        assert_eq!(u32::from_text("{\"id\": 1}"), None);
        assert_eq!(String::from_text("c-1"), Some("c-1".to_owned()));
    }

    #[test]
    fn a_key_of_the_wrong_kind_is_invalid() {
        #[derive(Clone)]
        struct Liar;
        impl SqlKey for Liar {
            const KIND: SqlKeyKind = SqlKeyKind::Integer;
            fn to_sql(&self) -> Result<SqlKeyValue, String> {
                Ok(SqlKeyValue::Text("x".into()))
            }
            fn from_text(_: &str) -> Option<Self> {
                None
            }
        }
        assert!(key_value(&Liar).is_err());
    }
}
