//! The broker address, with credentials kept out of every log line, error and `Debug` output.
//!
//! Redaction never trusts the address to be well formed: an `AMQP_ADDR` with a typo
//! (`amqp//user:pw@host`, no scheme, a password holding `/`, `#` or `@` unencoded) must not print
//! its password either. A well-formed URI is read by the `url` crate (the parser lapin itself
//! uses) and printed with its password replaced; anything the parser rejects, or reads in a way
//! that could have split a password (an `@` after the host), is redacted conservatively: all that
//! comes before the last `@` is hidden, and so is a "port" that is not a port number.

use std::fmt;

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use url::Url;

use super::error::AmqpError;

/// The environment variable read by [`AmqpAddr::from_env`].
pub const AMQP_ADDR_ENV: &str = "AMQP_ADDR";

/// The address used when [`AMQP_ADDR_ENV`] is not set: a local broker, user `guest`, vhost `/`.
pub const DEFAULT_AMQP_ADDR: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// What a hidden credential is replaced by.
const MASK: &str = "***";

/// Secrets shorter than this are not searched for in free text by [`AmqpAddr::scrub`] (a
/// one-letter password would mask every occurrence of that letter); the address itself is
/// still redacted wherever it appears.
const MIN_SCRUB_LEN: usize = 3;

/// An AMQP URI (`amqp://user:password@host:port/vhost`, or `amqps://` for TLS).
///
/// `Debug` and `Display` show the address with the password replaced by `***`; the full URI is
/// only handed to lapin when connecting. Errors built by this module never contain it either.
/// This holds for malformed addresses too: see [`redact_uri`].
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpAddr {
    uri: String,
}

impl AmqpAddr {
    /// A broker operation's failure, its message scrubbed of this address's credentials.
    pub(crate) fn broker_error(&self, operation: impl Into<String>, e: &lapin::Error) -> AmqpError {
        AmqpError::Broker {
            operation: operation.into(),
            message: self.scrub(&e.to_string()),
        }
    }

    /// Wrap a URI. Nothing is validated here: a malformed URI fails at connect time (with an
    /// error that does not show its credentials).
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

    /// Check that this is an address prereq can connect to without guessing: an `amqp://` or
    /// `amqps://` URI with a host, that lapin reads the same way. Every connection prereq opens
    /// checks it first, so a mangled address never reaches the network.
    ///
    /// This matters for more than a clear error: lapin reads `amqp:/user:password@host` as a
    /// URI without a host, and would connect to `localhost:5672` asking for the virtual host
    /// `user:password@host`, handing the password to that broker and to its logs. An `@` after
    /// the host is refused too (a password holding `/`, `?` or `#` cuts the authority short):
    /// percent-encode `@` (`%40`), `/` (`%2F`), `?` (`%3F`), `#` (`%23`), `:` (`%3A`) and `%`
    /// (`%25`) in the user, password and vhost.
    pub fn validate(&self) -> Result<(), AmqpError> {
        let uri = self.uri.trim();
        let invalid = |why: &str| {
            Err(AmqpError::Config(format!(
                "the broker address {} is not a well-formed AMQP URI \
                 (amqp://user:password@host:port/vhost): {why}",
                self.redacted()
            )))
        };
        let url = match Url::parse(uri) {
            Ok(url) => url,
            Err(e) => return invalid(&e.to_string()),
        };
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return invalid("the scheme must be amqp:// or amqps://");
        }
        if parse_well_formed(uri).is_none() {
            return invalid(
                "no host, or an '@' after the host (percent-encode '@', '/', '?' and '#' in the \
                 password and vhost)",
            );
        }
        match uri.parse::<lapin::uri::AMQPUri>() {
            Ok(_) => Ok(()),
            Err(e) => invalid(&self.scrub(&e)),
        }
    }

    /// The URI with its credentials replaced by `***` (safe to log); see [`redact_uri`].
    pub fn redacted(&self) -> String {
        redact_uri(&self.uri)
    }

    /// `text` with this address replaced by its redacted form, and every credential it may
    /// hold (raw, percent-decoded and percent-encoded) replaced by `***`: for error messages
    /// that come from elsewhere. What counts as a credential is decided as conservatively as
    /// in [`redact_uri`].
    pub fn scrub(&self, text: &str) -> String {
        let redacted = self.redacted();
        let mut out = text.to_owned();
        for raw in [self.uri.as_str(), self.uri.trim()] {
            if !raw.is_empty() {
                out = out.replace(raw, &redacted);
            }
        }
        for secret in secrets(&self.uri) {
            out = out.replace(&secret, MASK);
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

/// The URI with its credentials replaced by `***`, safe to print whatever the input.
///
/// * A well-formed URI (`scheme://user:password@host:port/vhost`, surrounding whitespace
///   ignored) keeps everything but its password: `amqp://user:***@host:port/vhost`. A user
///   without a password may be a token: it is hidden (`amqp://***@host/vhost`).
/// * Anything else is redacted conservatively: everything before the last `@` is hidden
///   (`amqp//***@host/vhost`, `***@host`), and so is whatever follows a `:` after the host
///   that is not a port number (`user:***`, `host:***`), up to the end.
///
/// A URI without credentials is returned unchanged (up to surrounding whitespace, and the
/// `url` crate's normalisation of a well-formed URI).
pub fn redact_uri(uri: &str) -> String {
    let uri = uri.trim();
    well_formed(uri).unwrap_or_else(|| conservative(uri))
}

/// The URL parser's reading of `uri`, if it is unambiguous: `scheme://`, a host, a port that
/// is a number if there is a `:` after the host (`amqp://amqp://user:password` has host `amqp`
/// and an empty port), and no `@` after the host (an `@` in the path, query or fragment means
/// a password holding `/`, `?` or `#` may have ended the authority early, leaving part of it in
/// plain sight).
fn parse_well_formed(uri: &str) -> Option<Url> {
    let (_, rest) = uri.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let hostpart = authority
        .rfind('@')
        .map_or(authority, |at| &authority[at + 1..]);
    if !port_ok(hostpart) {
        return None;
    }
    let url = Url::parse(uri).ok()?;
    let after_host = [
        url.path(),
        url.query().unwrap_or(""),
        url.fragment().unwrap_or(""),
    ];
    if url.cannot_be_a_base()
        || url.host_str().is_none_or(str::is_empty)
        || after_host.iter().any(|part| part.contains('@'))
    {
        return None;
    }
    Some(url)
}

fn well_formed(uri: &str) -> Option<String> {
    let mut url = parse_well_formed(uri)?;
    if url.password().is_some() {
        url.set_password(Some(MASK)).ok()?;
    } else if !url.username().is_empty() {
        url.set_username(MASK).ok()?;
    }
    Some(url.into())
}

fn conservative(uri: &str) -> String {
    let (scheme, rest) = split_scheme(uri);
    match rest.rfind('@') {
        Some(at) => format!("{scheme}{MASK}@{}", mask_port(&rest[at + 1..])),
        None => format!("{scheme}{}", mask_port(rest)),
    }
}

/// `amqp` or `amqps` (any case) followed by a run of `:`, `/` or `\` (however mangled), and
/// the rest. `("", uri)` when `uri` does not start that way.
fn split_scheme(uri: &str) -> (&str, &str) {
    let bytes = uri.as_bytes();
    for name in [b"amqps".as_slice(), b"amqp".as_slice()] {
        if bytes.len() > name.len() && bytes[..name.len()].eq_ignore_ascii_case(name) {
            let separator = bytes[name.len()..]
                .iter()
                .take_while(|b| matches!(b, b':' | b'/' | b'\\'))
                .count();
            if separator > 0 {
                // ASCII up to there: a char boundary.
                return uri.split_at(name.len() + separator);
            }
        }
    }
    ("", uri)
}

/// Whether the authority part of `hostpart` (`host[:port]`, up to `/`, `?` or `#`) has a
/// valid port, or none.
fn port_ok(hostpart: &str) -> bool {
    let authority = &hostpart[..hostpart.find(['/', '?', '#']).unwrap_or(hostpart.len())];
    suspicious_colon(authority).is_none()
}

/// Whether `s` is a TCP port number.
fn is_port(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u32>().is_ok_and(|p| p <= u32::from(u16::MAX))
}

/// Where the first `:` of `s` that is not followed by a port number is (colons inside `[…]`,
/// an IPv6 literal, do not count): what follows it may be a password.
fn suspicious_colon(s: &str) -> Option<usize> {
    let mut in_brackets = false;
    for (i, c) in s.char_indices() {
        match c {
            '[' => in_brackets = true,
            ']' => in_brackets = false,
            ':' if !in_brackets => {
                let tail = &s[i + 1..];
                let port = &tail[..tail.find(['/', '?', '#']).unwrap_or(tail.len())];
                if !is_port(port) {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `s` unchanged when every `:` in it is followed by a port number; else cut at the first
/// that is not, and ended with `:***`.
fn mask_port(s: &str) -> String {
    match suspicious_colon(s) {
        None => s.to_owned(),
        Some(colon) => format!("{}:{MASK}", &s[..colon]),
    }
}

/// Everything in `uri` that may be a credential, each raw, percent-decoded and
/// percent-encoded, longest first (so that a longer secret is masked before a part of it).
fn secrets(uri: &str) -> Vec<String> {
    let uri = uri.trim();
    let mut found: Vec<String> = Vec::new();
    if let Some(url) = parse_well_formed(uri) {
        match url.password() {
            Some(password) => found.push(password.to_owned()),
            None if !url.username().is_empty() => found.push(url.username().to_owned()),
            None => {}
        }
    }
    // The conservative reading too: what it hides is a secret in free text as well.
    let (_, rest) = split_scheme(uri);
    match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            found.push(userinfo.to_owned());
            if let Some((_, password)) = userinfo.split_once(':') {
                found.push(password.to_owned());
            }
            found.extend(hidden_port(&rest[at + 1..]));
        }
        None => found.extend(hidden_port(rest)),
    }
    let mut all: Vec<String> = Vec::new();
    for s in found {
        let decoded = percent_decode_str(&s).decode_utf8_lossy().into_owned();
        let encoded = utf8_percent_encode(&decoded, NON_ALPHANUMERIC).to_string();
        all.extend([s, decoded, encoded]);
    }
    all.retain(|s| s.len() >= MIN_SCRUB_LEN);
    all.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    all.dedup();
    all
}

/// What [`mask_port`] hides of `s`, if anything.
fn hidden_port(s: &str) -> Option<String> {
    suspicious_colon(s).map(|colon| s[colon + 1..].to_owned())
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
        assert_eq!(
            redact_uri("amqp://host:5672/%2f?heartbeat=10"),
            "amqp://host:5672/%2f?heartbeat=10"
        );
        assert_eq!(redact_uri("amqp://[::1]:5672/v"), "amqp://[::1]:5672/v");
        assert_eq!(redact_uri("localhost:5672"), "localhost:5672");
        assert_eq!(redact_uri("not a uri"), "not a uri");
        assert_eq!(redact_uri("amqps://u:p@h"), "amqps://u:***@h");
    }

    #[test]
    fn a_user_without_password_may_be_a_token_and_is_hidden() {
        assert_eq!(redact_uri("amqp://bob@host/"), "amqp://***@host/");
    }

    #[test]
    fn at_sign_after_the_host_is_treated_as_a_split_password() {
        // A password holding `/` ends the authority early: `12` reads as a port, `34` as part
        // of the vhost. Everything before the last `@` is hidden.
        assert_eq!(redact_uri("amqp://user:12/34@host/v"), "amqp://***@host/v");
        assert_eq!(redact_uri("amqp://host/v@host"), "amqp://***@host");
    }

    #[test]
    fn malformed_addresses_hide_their_credentials() {
        let cases = [
            ("amqp//user:s3cr3tpw@host/%2f", "amqp//***@host/%2f"),
            ("amqp:/user:s3cr3tpw@host", "amqp:/***@host"),
            ("amqp:user:s3cr3tpw@host", "amqp:***@host"),
            ("user:s3cr3tpw@host:5672", "***@host:5672"),
            ("  amqp://user:s3cr3tpw@host  ", "amqp://user:***@host"),
            ("amqp://user:s3c@r3t@pw@host", "amqp://user:***@host"),
            ("amqp://user:s3/cr#3t?pw@host", "amqp://***@host"),
            ("amqp://user:s3cr3tpw", "amqp://user:***"),
            ("amqp://user:s3cr3tpw/vhost", "amqp://user:***"),
            ("amqp://user@host:s3cr3tpw", "amqp://***@host:***"),
            ("amqp ://user:s3cr3tpw@host", "***@host"),
            ("amqp://amqp://user:s3cr3tpw", "amqp://amqp:***"),
            ("//user:s3cr3tpw", "//user:***"),
            ("amqp;//user:s3cr3tpw/host", "amqp;//user:***"),
        ];
        for (uri, want) in cases {
            let addr = AmqpAddr::new(uri);
            assert_eq!(addr.redacted(), want, "{uri}");
            let shown = format!("{addr} {addr:?} {}", addr.scrub(&format!("bad {uri}")));
            assert!(!shown.contains("s3"), "{uri}: {shown}");
        }
    }

    #[test]
    fn only_unambiguous_amqp_uris_are_valid() {
        for ok in [
            DEFAULT_AMQP_ADDR,
            " amqps://u:p%40ss@host:5671/vh?heartbeat=10 ",
            "amqp://host",
            "amqp://u:p@ss@host/%2f",
        ] {
            assert_eq!(AmqpAddr::new(ok).validate(), Ok(()), "{ok}");
        }
        for bad in [
            "amqp:/user:s3cr3tpw@host",
            "amqp//user:s3cr3tpw@host",
            "amqp:user:s3cr3tpw@host",
            "user:s3cr3tpw@host",
            "http://user:s3cr3tpw@host",
            "amqp://user:12/s3cr3tpw@host",
            "amqp://user:s3cr3tpw",
            "amqp://host/v@host",
            "amqp://amqp://user:s3cr3tpw",
            "amqp://host?heartbeat=x",
        ] {
            match AmqpAddr::new(bad).validate() {
                Err(AmqpError::Config(msg)) => {
                    assert!(msg.contains("not a well-formed AMQP URI"), "{msg}");
                    assert!(!msg.contains("s3cr3t"), "{msg}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn scrub_removes_raw_and_decoded_password() {
        let addr = AmqpAddr::new("amqp://alice:s3cr%40t@broker/%2f");
        let text = format!("failed {} with s3cr@t and s3cr%40t", addr.expose());
        let clean = addr.scrub(&text);
        assert!(!clean.contains("s3cr"), "{clean}");
    }

    #[test]
    fn scrub_finds_the_password_of_a_malformed_address_and_its_encodings() {
        let addr = AmqpAddr::new("amqp//alice:pa-ss@word@broker");
        let text = "parse error near 'pa-ss@word', 'pa%2Dss%40word' or 'alice:pa-ss@word'";
        let clean = addr.scrub(text);
        assert!(
            !clean.contains("pa-ss") && !clean.contains("pa%2D"),
            "{clean}"
        );
    }
}
