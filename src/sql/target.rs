//! A database address kept with its secret and shown without it, and the error type of the
//! SQL key sources ([`SqlKeysError`]), which never contains a password.

use std::fmt;
use std::time::Duration;

/// How long connecting (or opening a file) and setting up an SQL source may take by default;
/// also how long a lookup waits for a free connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong with an SQL key source: at start (configuration, connection, setup) and at
/// run time (a query failed: [`crate::KeyError::Unavailable`]).
///
/// Messages never contain a password: URLs appear with it replaced by `***`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SqlKeysError {
    /// The configuration cannot work (a malformed URL, a name that cannot be an identifier, an
    /// existence query that does not return a boolean, …).
    #[error("invalid key source configuration: {0}")]
    Config(String),
    /// The database could not be reached or refused the connection.
    #[error("cannot connect to {target}: {reason}")]
    Connect {
        /// The database, credentials redacted.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// The database did not answer in time (connecting or setting up).
    #[error("{target} did not answer within {after:?}")]
    Timeout {
        /// The database, credentials redacted.
        target: String,
        /// How long prereq waited.
        after: Duration,
    },
    /// Connected, but preparing the source failed (creating the table, checking the query, …).
    #[error("setting up the key source in {target}: {reason}")]
    Setup {
        /// The database, credentials redacted.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// A query failed at run time (the database is down, busy, …).
    #[error("key source query on {target} failed: {reason}")]
    Query {
        /// The database, credentials redacted.
        target: String,
        /// What went wrong.
        reason: String,
    },
}

/// A database address kept with its secret, shown without it.
#[derive(Clone)]
pub(crate) struct Target {
    shown: String,
    secrets: Vec<String>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Target {
    /// A URL (`scheme://user:password@host/db?password=…`): shown with its passwords masked.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn url(url: &str) -> Self {
        let (shown, found) = redact_url(url);
        let mut secrets = Vec::new();
        for secret in found {
            let decoded = percent_decode(&secret);
            if decoded != secret {
                secrets.push(decoded);
            }
            secrets.push(secret);
        }
        // Longest first, so that a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.retain(|s| !s.is_empty());
        Self { shown, secrets }
    }

    /// A name without secrets (a file path).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn plain(name: String) -> Self {
        Self {
            shown: name,
            secrets: Vec::new(),
        }
    }

    /// `text` (an error from elsewhere) with every occurrence of the secrets replaced by `***`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            out = out.replace(secret.as_str(), "***");
        }
        out
    }

    pub(crate) fn connect(&self, error: &dyn fmt::Display) -> SqlKeysError {
        SqlKeysError::Connect {
            target: self.shown.clone(),
            reason: self.scrub(&error.to_string()),
        }
    }

    pub(crate) fn setup(&self, reason: impl fmt::Display) -> SqlKeysError {
        SqlKeysError::Setup {
            target: self.shown.clone(),
            reason: self.scrub(&reason.to_string()),
        }
    }

    pub(crate) fn query(&self, error: &dyn fmt::Display) -> SqlKeysError {
        SqlKeysError::Query {
            target: self.shown.clone(),
            reason: self.scrub(&error.to_string()),
        }
    }

    pub(crate) fn timeout(&self, after: Duration) -> SqlKeysError {
        SqlKeysError::Timeout {
            target: self.shown.clone(),
            after,
        }
    }
}

/// `url` with the password of its userinfo and of any `password=` query parameter replaced by
/// `***`, and the passwords found (as written).
fn redact_url(url: &str) -> (String, Vec<String>) {
    let mut secrets = Vec::new();
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    if let Some(scheme_end) = url.find("://") {
        let start = scheme_end + 3;
        let after = &url[start..];
        let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        if let Some(at) = after[..authority_end].rfind('@') {
            let userinfo = &after[..at];
            out.push_str(&url[..start]);
            match userinfo.split_once(':') {
                Some((user, password)) => {
                    out.push_str(user);
                    out.push_str(":***");
                    secrets.push(password.to_owned());
                }
                None => out.push_str(userinfo),
            }
            rest = &after[at..];
        }
    }
    match rest.split_once('?') {
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, value)) if name.eq_ignore_ascii_case("password") => {
                        secrets.push(value.to_owned());
                        format!("{name}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(rest),
    }
    (out, secrets)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_passwords() {
        let t = Target::url("postgres://user:s3cr%40t@db.example:5432/app?sslmode=disable");
        assert_eq!(
            t.to_string(),
            "postgres://user:***@db.example:5432/app?sslmode=disable"
        );
        let scrubbed = t.scrub("failed: s3cr@t and s3cr%40t, user");
        assert_eq!(scrubbed, "failed: *** and ***, user");
        let q = Target::url("postgres://host/db?user=u&password=hunter2&application_name=x");
        assert_eq!(
            format!("{q:?}"),
            "postgres://host/db?user=u&password=***&application_name=x"
        );
        assert_eq!(q.scrub("hunter2!"), "***!");
        assert_eq!(
            Target::url("postgres://bob@h/db").to_string(),
            "postgres://bob@h/db"
        );
        assert_eq!(Target::url("not a url").to_string(), "not a url");
        assert_eq!(
            Target::url("postgres://h/p@th").to_string(),
            "postgres://h/p@th",
            "an @ in the path is no userinfo"
        );
        let e = t.connect(&"password authentication failed (s3cr@t)");
        assert!(!format!("{e} {e:?}").contains("s3cr"), "{e:?}");
    }
}
