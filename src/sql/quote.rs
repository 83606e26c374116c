//! SQL identifiers and literals, quoted.

use super::target::SqlKeysError;

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`); longer ones are truncated by
/// the server, so prereq refuses them.
pub(crate) const MAX_IDENTIFIER_BYTES: usize = 63;

/// `name` quoted as an SQL identifier (`"name"`, inner quotes doubled), or why it cannot be one.
pub(crate) fn quote_ident(what: &str, name: &str) -> Result<String, SqlKeysError> {
    if name.is_empty() {
        return Err(SqlKeysError::Config(format!("the {what} name is empty")));
    }
    if name.len() > MAX_IDENTIFIER_BYTES {
        return Err(SqlKeysError::Config(format!(
            "the {what} name {name:?} is longer than {MAX_IDENTIFIER_BYTES} bytes"
        )));
    }
    if name.contains('\0') {
        return Err(SqlKeysError::Config(format!(
            "the {what} name {name:?} contains a NUL character"
        )));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// `text` as an SQL string literal (`'text'`, inner quotes doubled).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_or_refused() {
        assert_eq!(quote_ident("table", "keys").ok(), Some("\"keys\"".into()));
        assert_eq!(
            quote_ident("table", "a\"; DROP TABLE x; --").ok(),
            Some("\"a\"\"; DROP TABLE x; --\"".into())
        );
        assert!(quote_ident("table", "").is_err());
        assert!(quote_ident("table", &"x".repeat(64)).is_err());
        assert!(quote_ident("table", "a\0").is_err());
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
