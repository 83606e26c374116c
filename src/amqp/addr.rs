//! The broker address, with credentials kept out of every log line, error and `Debug` output.

use std::fmt;

/// The environment variable read by [`AmqpAddr::from_env`].
pub const AMQP_ADDR_ENV: &str = "AMQP_ADDR";

/// The address used when [`AMQP_ADDR_ENV`] is not set: a local broker, user `guest`, vhost `/`.
pub const DEFAULT_AMQP_ADDR: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An AMQP URI (`amqp://user:password@host:port/vhost`, or `amqps://` for TLS).
///
/// `Debug` and `Display` show the address with the password replaced by `***`; the full URI is
/// only handed to lapin when connecting. Errors built by this module never contain it either.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpAddr {
    uri: String,
}

impl AmqpAddr {
    /// Wrap a URI. Nothing is validated here: a malformed URI fails at connect time.
    pub fn new(uri: impl Into<String>) -> Self {
        Self { uri: uri.into() }
    }

    /// `AMQP_ADDR` from the environment, else [`DEFAULT_AMQP_ADDR`].
    pub fn from_env() -> Self {
        match std::env::var(AMQP_ADDR_ENV) {
            Ok(uri) if !uri.trim().is_empty() => Self::new(uri.trim()),
            _ => Self::new(DEFAULT_AMQP_ADDR),
        }
    }

    /// The full URI, credentials included. Only for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.uri
    }

    /// The URI with its password replaced by `***` (safe to log).
    pub fn redacted(&self) -> String {
        redact_uri(&self.uri)
    }

    /// `text` with every occurrence of this address's password (raw and percent-encoded)
    /// replaced by `***`: for error messages that come from elsewhere.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = redact_uri_occurrences(text, &self.uri);
        if let Some(password) = password_of(&self.uri)
            && password.len() >= 3
        {
            out = out.replace(password, "***");
            let decoded = percent_decode(password);
            if decoded.len() >= 3 {
                out = out.replace(&decoded, "***");
            }
        }
        out
    }
}

impl Default for AmqpAddr {
    fn default() -> Self {
        Self::new(DEFAULT_AMQP_ADDR)
    }
}

impl fmt::Debug for AmqpAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AmqpAddr").field(&self.redacted()).finish()
    }
}

impl fmt::Display for AmqpAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl From<&str> for AmqpAddr {
    fn from(uri: &str) -> Self {
        Self::new(uri)
    }
}

impl From<String> for AmqpAddr {
    fn from(uri: String) -> Self {
        Self::new(uri)
    }
}

/// The byte range of the userinfo (`user:password`) part of a URI, if it has one.
fn userinfo_range(uri: &str) -> Option<(usize, usize)> {
    let start = uri.find("://")? + 3;
    let rest = &uri[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some((start, start + at))
}

fn password_of(uri: &str) -> Option<&str> {
    let (start, end) = userinfo_range(uri)?;
    let userinfo = &uri[start..end];
    let colon = userinfo.find(':')?;
    Some(&userinfo[colon + 1..])
}

/// Replace the password of a URI (`scheme://user:password@host/…`) by `***`.
///
/// A URI without a password is returned unchanged; text that is not a URI is returned as is.
pub fn redact_uri(uri: &str) -> String {
    match userinfo_range(uri) {
        Some((start, end)) => {
            let userinfo = &uri[start..end];
            let user = userinfo.split(':').next().unwrap_or_default();
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{}{}{}", &uri[..start], masked, &uri[end..])
        }
        None => uri.to_owned(),
    }
}

fn redact_uri_occurrences(text: &str, uri: &str) -> String {
    if uri.is_empty() {
        return text.to_owned();
    }
    text.replace(uri, &redact_uri(uri))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
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
    fn redacts_password_in_debug_and_display() {
        let addr = AmqpAddr::new("amqp://alice:s3cr%40t@broker:5672/%2f");
        let shown = format!("{addr} {addr:?} {}", addr.redacted());
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(
            shown.contains("amqp://alice:***@broker:5672/%2f"),
            "{shown}"
        );
    }

    #[test]
    fn default_is_local_guest() {
        let addr = AmqpAddr::default();
        assert_eq!(addr.expose(), DEFAULT_AMQP_ADDR);
        assert_eq!(addr.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
    }

    #[test]
    fn uri_without_credentials_is_unchanged() {
        assert_eq!(redact_uri("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact_uri("amqp://bob@host/"), "amqp://bob@host/");
        assert_eq!(redact_uri("not a uri"), "not a uri");
        assert_eq!(redact_uri("amqps://u:p@h"), "amqps://u:***@h");
    }

    #[test]
    fn at_sign_in_path_is_not_userinfo() {
        assert_eq!(redact_uri("amqp://host/v@host"), "amqp://host/v@host");
    }

    #[test]
    fn scrub_removes_raw_and_decoded_password() {
        let addr = AmqpAddr::new("amqp://alice:s3cr%40t@broker/%2f");
        let text = format!("failed {} with s3cr@t and s3cr%40t", addr.expose());
        let clean = addr.scrub(&text);
        assert!(!clean.contains("s3cr"), "{clean}");
    }
}
