//! Whatever the broker address looks like, its password is never printed.
//!
//! Random users, passwords (with `:`, `/`, `@`, `#`, `?`, `%`, spaces, non-ASCII…) and hosts,
//! percent-encoded or not, put together into addresses that are well formed or mangled the ways
//! addresses get mangled: a missing or garbled scheme separator, no scheme at all, the `@` or
//! the `:` dropped or doubled, the password glued to the host, several `@`, surrounding
//! whitespace. For each, the password (raw, and as written into the address) appears in none
//! of: `Display`, `Debug` and `redacted()` of the address, `redact_uri`, `scrub` of text that
//! quotes the address, the `Debug` of a `BrokerOptions`, the errors prereq builds from lapin's
//! own URI parse error, and, for addresses on loopback, the error of a real connection attempt
//! and every log line it produced.
//!
//! Passwords start with a letter: an address with no `@` whose "password" starts with a port
//! number (`amqp://user:5672/rest`) is indistinguishable from `host:port/vhost`, and is printed
//! as such.
#![cfg(feature = "amqp")]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use percent_encoding::{AsciiSet, CONTROLS, NON_ALPHANUMERIC, utf8_percent_encode};
use prereq::amqp::{AmqpAddr, AmqpError, Broker, BrokerOptions, DelayMode, redact_uri};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Everything logged by any crate, at every level.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = Buffer(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        buf
    })
}

#[derive(Clone)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The characters that end or split a userinfo: what a careful user percent-encodes.
const USERINFO_DELIMITERS: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b':')
    .add(b'/')
    .add(b'?')
    .add(b'#')
    .add(b'@')
    .add(b'%')
    .add(b'[')
    .add(b']');

#[derive(Clone, Copy, Debug)]
enum Encoding {
    Raw,
    Delimiters,
    Everything,
}

/// How the user, password and host are put together.
#[derive(Clone, Copy, Debug)]
enum Join {
    /// `user:pw@host`
    Normal,
    /// `user:pw@@host`
    DoubleAt,
    /// `userpw@host`
    NoColon,
    /// `:pw@host`
    NoUser,
    /// `user::pw@host`
    DoubleColon,
    /// `user@pw@host`
    AtForColon,
    /// `user:pwhost`
    NoAt,
    /// `user:pw/host`
    SlashForAt,
    /// `user:pw#host`
    HashForAt,
    /// `user:pw`
    NoHost,
    /// `user@x:pw@host`
    AtInUser,
    /// `user:pw @ host`
    SpacedAt,
}

const SCHEMES: &[&str] = &[
    "amqp://",
    "amqps://",
    "AMQP://",
    "amqp//",
    "amqp:/",
    "amqp:",
    "amqp:///",
    "amqp:\\\\",
    "amqp;//",
    "amqp ://",
    "amqp://amqp://",
    "://",
    "//",
    "",
];

const SPACES: &[&str] = &["", " ", "  ", "\t", "\n", " \r\n"];

const VHOSTS: &[&str] = &["", "/", "/%2f", "/vh", "/a/b", "/%2f?heartbeat=10"];

#[derive(Clone, Debug)]
struct Case {
    lead: &'static str,
    scheme: &'static str,
    user: String,
    password: String,
    encoding: Encoding,
    join: Join,
    /// Loopback (with a port nobody listens on) or a made-up name.
    loopback: bool,
    host: String,
    port: Option<u16>,
    vhost: &'static str,
    trail: &'static str,
}

impl Case {
    fn written_password(&self) -> String {
        match self.encoding {
            Encoding::Raw => self.password.clone(),
            Encoding::Delimiters => {
                utf8_percent_encode(&self.password, USERINFO_DELIMITERS).to_string()
            }
            Encoding::Everything => {
                utf8_percent_encode(&self.password, NON_ALPHANUMERIC).to_string()
            }
        }
    }

    fn uri(&self, closed_port: u16) -> String {
        let (user, pw) = (&self.user, self.written_password());
        let host = if self.loopback {
            format!("127.0.0.1:{closed_port}")
        } else {
            match self.port {
                Some(port) => format!("{}:{port}", self.host),
                None => self.host.clone(),
            }
        };
        let userinfo_and_host = match self.join {
            Join::Normal => format!("{user}:{pw}@{host}"),
            Join::DoubleAt => format!("{user}:{pw}@@{host}"),
            Join::NoColon => format!("{user}{pw}@{host}"),
            Join::NoUser => format!(":{pw}@{host}"),
            Join::DoubleColon => format!("{user}::{pw}@{host}"),
            Join::AtForColon => format!("{user}@{pw}@{host}"),
            Join::NoAt => format!("{user}:{pw}{host}"),
            Join::SlashForAt => format!("{user}:{pw}/{host}"),
            Join::HashForAt => format!("{user}:{pw}#{host}"),
            Join::NoHost => format!("{user}:{pw}"),
            Join::AtInUser => format!("{user}@x:{pw}@{host}"),
            Join::SpacedAt => format!("{user}:{pw} @ {host}"),
        };
        format!(
            "{}{}{userinfo_and_host}{}{}",
            self.lead, self.scheme, self.vhost, self.trail
        )
    }

    /// The forms of the password that must never be printed.
    fn secrets(&self) -> Vec<String> {
        let mut s = vec![self.password.clone(), self.written_password()];
        s.dedup();
        s
    }
}

fn password() -> impl Strategy<Value = String> {
    let first = prop::sample::select(('a'..='z').chain('A'..='Z').collect::<Vec<_>>());
    let chars: Vec<char> = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(":/@#?%!$&'()*+,;=~-._ [] é€日".chars())
        .collect();
    (
        first,
        prop::collection::vec(prop::sample::select(chars), 7..24),
    )
        .prop_map(|(first, rest)| std::iter::once(first).chain(rest).collect())
}

fn case() -> impl Strategy<Value = Case> {
    let encoding = prop_oneof![
        Just(Encoding::Raw),
        Just(Encoding::Delimiters),
        Just(Encoding::Everything)
    ];
    let join = prop_oneof![
        3 => Just(Join::Normal),
        1 => Just(Join::DoubleAt),
        1 => Just(Join::NoColon),
        1 => Just(Join::NoUser),
        1 => Just(Join::DoubleColon),
        1 => Just(Join::AtForColon),
        1 => Just(Join::NoAt),
        1 => Just(Join::SlashForAt),
        1 => Just(Join::HashForAt),
        1 => Just(Join::NoHost),
        1 => Just(Join::AtInUser),
        1 => Just(Join::SpacedAt),
    ];
    (
        (
            prop::sample::select(SPACES),
            prop::sample::select(SCHEMES),
            "[a-zA-Z][a-zA-Z0-9._-]{0,11}",
            password(),
            encoding,
            join,
        ),
        (
            any::<bool>(),
            "[a-z][a-z0-9-]{0,12}(\\.[a-z]{2,6})?",
            prop::option::of(1u16..),
            prop::sample::select(VHOSTS),
            prop::sample::select(SPACES),
        ),
    )
        .prop_map(
            |(
                (lead, scheme, user, password, encoding, join),
                (loopback, host, port, vhost, trail),
            )| {
                Case {
                    lead,
                    scheme,
                    user,
                    password,
                    encoding,
                    join,
                    loopback,
                    host,
                    port,
                    vhost,
                    trail,
                }
            },
        )
}

/// Display, Debug and the whole source chain of an error.
fn everything_about(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{e} | {e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(" | {s} | {s:?}"));
        source = s.source();
    }
    out
}

fn check(what: &str, text: &str, secrets: &[String]) -> Result<(), TestCaseError> {
    for s in secrets {
        prop_assert!(
            !text.contains(s.as_str()),
            "{} shows the password {:?}: {:?}",
            what,
            s,
            text
        );
    }
    Ok(())
}

#[test]
fn the_password_of_any_address_is_never_printed() {
    logs();
    // A port nobody listens on: bind one, note it, close it.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let connected = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&case(), |case| {
        let uri = case.uri(closed_port);
        let secrets = case.secrets();
        let addr = AmqpAddr::new(uri.clone());
        check("Display", &addr.to_string(), &secrets)?;
        check("Debug", &format!("{addr:?}"), &secrets)?;
        check("redacted()", &addr.redacted(), &secrets)?;
        check("redact_uri", &redact_uri(&uri), &secrets)?;
        check(
            "scrub of text quoting the address",
            &addr.scrub(&format!("failed to connect to {uri} ({})", uri.trim())),
            &secrets,
        )?;
        let options = BrokerOptions::new(addr.clone()).connect_timeout(Duration::from_secs(2));
        check("Debug of BrokerOptions", &format!("{options:?}"), &secrets)?;
        // lapin's own reading of the address, as prereq reports it.
        for raw in [uri.as_str(), uri.trim()] {
            if let Err(e) = raw.parse::<lapin::uri::AMQPUri>() {
                let error = AmqpError::Connect {
                    addr: addr.redacted(),
                    message: addr.scrub(&e),
                };
                check("a URI parse error", &everything_about(&error), &secrets)?;
            }
        }
        // A real attempt, where it cannot reach anything but this machine.
        if case.loopback && !matches!(case.join, Join::NoHost) {
            logs().lock().unwrap().clear();
            let attempt = runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    Broker::connect(options.delay_mode(DelayMode::Auto)),
                )
                .await
            });
            let error = match attempt {
                Ok(Ok(t)) => panic!("connected to a closed port?! {t:?}"),
                Ok(Err(e)) => e,
                Err(_) => panic!("{addr}: still connecting after 30 s"),
            };
            connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            check("the connect error", &everything_about(&error), &secrets)?;
            let logged = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
            check("the logs", &logged, &secrets)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let connected = connected.into_inner();
    assert!(connected > 0, "no case tried a real connection");
    println!("{cases} addresses, {connected} real connection attempts: no password printed");
}
