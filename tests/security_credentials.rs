//! Credentials in the AMQP address never leak: not into `tracing` output (every level, every
//! crate: prereq's, lapin's, its TCP and TLS layers), not into errors (`Display` and `Debug`,
//! and their `source()` chains), not into the `Debug` of `AmqpAddr`, `BrokerOptions` or
//! `AmqpTransport`. Checked while failing to connect with a wrong password, to a host that does
//! not resolve, to a closed port, with `amqps://` against a plain-AMQP port, and while connected.
//! Passwords are also checked percent-decoded (`p%40ss` is `p@ss`). A malformed `AMQP_ADDR`
//! leaks nowhere either (`tests/prop_redaction.rs` covers random mangled addresses).
#![cfg(feature = "amqp")]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prereq::DependentConsumer;
use prereq::amqp::{AmqpAddr, AmqpError, Broker, BrokerOptions, DelayMode, Queue, Route};

/// Everything any crate logs, at every level, for the whole test process.
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

fn captured() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// `text` mentions none of `secrets`.
#[track_caller]
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !text.contains(s),
            "{what} leaks the credential {s:?}:\n{text}"
        );
    }
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

/// Try to connect for at most `limit`; `None` if it was still trying by then.
async fn connect_attempt(uri: &str, mode: DelayMode, limit: Duration) -> Option<AmqpError> {
    let options = BrokerOptions::new(uri).delay_mode(mode);
    assert_clean(
        "Debug of BrokerOptions",
        &format!("{options:?}"),
        &[password_of(uri)],
    );
    match tokio::time::timeout(limit, Broker::connect(options)).await {
        Ok(Ok(b)) => panic!("connected to {}?! {b:?}", AmqpAddr::new(uri)),
        Ok(Err(e)) => Some(e),
        Err(_) => None,
    }
}

fn password_of(uri: &str) -> &str {
    let userinfo = uri.split("://").nth(1).unwrap().split('@').next().unwrap();
    userinfo.split_once(':').unwrap().1
}

/// Fail to connect to `uri`, then check the error, the captured logs and the address for
/// `secrets`, for both the plugin probe's path (`DelayMode::Auto`) and the direct one
/// (`DelayMode::DelayQueues`, which starts with the pre-flight connection).
async fn check_failure(uri: &str, secrets: &[&str], expect_in_error: &str) {
    logs();
    let mut errors = Vec::new();
    for mode in [DelayMode::Auto, DelayMode::DelayQueues] {
        let e = connect_attempt(uri, mode, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{} still connecting after 30 s", AmqpAddr::new(uri)));
        errors.push(e);
    }
    for e in errors {
        let text = everything_about(&e);
        assert_clean("the connect error", &text, secrets);
        assert!(
            text.contains(expect_in_error),
            "the error should say {expect_in_error:?}: {text}"
        );
        // The engine's error wraps the transport's.
        let wrapped: prereq::RunError<AmqpError> = prereq::RunError::Transport {
            source: e,
            report: prereq::Report::default(),
        };
        assert_clean("the engine error", &everything_about(&wrapped), secrets);
    }
    let addr = AmqpAddr::new(uri);
    assert_clean(
        "AmqpAddr Display/Debug/redacted",
        &format!("{addr} {addr:?} {}", addr.redacted()),
        secrets,
    );
    assert_clean("the logs", &captured(), secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_leaks_nowhere() {
    if support::broker().await.is_none() {
        return;
    }
    let uri = "amqp://guest:Wr0ng-S3cret-pw@127.0.0.1:5672/%2f";
    // The broker refuses the login (ACCESS_REFUSED); the message says so, without the password.
    check_failure(uri, &["Wr0ng-S3cret-pw"], "guest:***@127.0.0.1").await;
    let logged = captured();
    assert!(
        logged.contains("127.0.0.1"),
        "the capture saw the connection attempt (else the check above proves nothing):\n{logged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_password_leaks_nowhere_raw_or_decoded() {
    if support::broker().await.is_none() {
        return;
    }
    let uri = "amqp://guest:p%40ss%3Aw0rd-Zq9@127.0.0.1:5672/%2f";
    check_failure(
        uri,
        &["p%40ss%3Aw0rd-Zq9", "p@ss:w0rd-Zq9", "w0rd-Zq9"],
        "***",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_host_leaks_nowhere() {
    let uri = "amqp://alice:Hunter2-S3cret@no-such-host.invalid:5672/%2f";
    check_failure(uri, &["Hunter2-S3cret"], "alice:***@no-such-host.invalid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_leaks_nowhere() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("amqp://alice:Cl0sed-S3cret@127.0.0.1:{port}/%2f");
    check_failure(&uri, &["Cl0sed-S3cret"], "alice:***@127.0.0.1").await;
}

/// `amqps://` is understood (lapin's default `rustls` feature): against a plain AMQP port the
/// TLS handshake fails, quickly and with a clear error that names neither the password nor
/// hides the scheme. (No TLS broker is available here; see docs/guarantees.md for real use.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_against_a_plain_port_fails_clearly_without_credentials() {
    if support::broker().await.is_none() {
        return;
    }
    let uri = "amqps://guest:Tls-S3cret-pw@127.0.0.1:5672/%2f";
    check_failure(uri, &["Tls-S3cret-pw"], "amqps://guest:***@127.0.0.1:5672").await;
    let e = connect_attempt(uri, DelayMode::Auto, Duration::from_secs(30))
        .await
        .expect("fails");
    // rustls got AMQP bytes where it expected a TLS record.
    assert!(e.to_string().contains("corrupt message"), "{e}");
    println!("amqps:// against a plain port: {e}");
}

/// `Broker::connect` to an unreachable broker fails at once, although lapin's
/// auto-recovery alone would retry the first TCP connection for about 11 minutes (16 tries,
/// 1 s doubling to 60 s): the transport makes a plain pre-flight connection first. A
/// misconfigured service fails at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_fails_fast() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("amqp://alice:pw@127.0.0.1:{port}/%2f");
    let e = connect_attempt(&uri, DelayMode::DelayQueues, Duration::from_secs(30)).await;
    let e = e.expect("an error within 30 s, not minutes of retries");
    assert!(e.to_string().contains("refused"), "{e}");
}

/// Connected, consuming, deferring, shutting down: the `Debug` of the transport and every log
/// line stay free of the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_connection_leaks_nothing_either() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    logs();
    let addr = support::addr();
    let secret = password_of(addr.expose()).to_owned();
    // "guest" is also the user name: look for it where a password would be.
    let needles = [format!(":{secret}@")];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let cleanup = support::Cleanup::new();
    let p = support::unique("security");
    let route = Route::new(Queue::classic(format!("{p}payments")))
        .registrations(Queue::classic(format!("{p}clients")));
    let transport = support::transport(
        &cleanup,
        route,
        DelayMode::DelayQueues,
        prereq::transport::Demand::new(64, 1),
    )
    .await;
    assert_clean(
        "Debug of AmqpTransport",
        &format!("{transport:?}"),
        &needles,
    );
    assert!(
        format!("{transport:?}").contains(":***@"),
        "the redacted address is shown: {transport:?}"
    );
    let consumer = DependentConsumer::builder(
        |_: &serde_json::Value| 1u64,
        |_: serde_json::Value| async { Ok(()) },
    )
    .build();
    let report = consumer
        .run(transport, async {})
        .await
        .expect("an immediate clean stop");
    assert_eq!(report.handled, 0);
    let logged = captured();
    assert_clean("the logs", &logged, &needles);
    assert!(
        logged.contains(":***@"),
        "the logs show the redacted address (so the capture works):\n{logged}"
    );
}

/// Set in the child process of [`a_malformed_amqp_addr_leaks_nowhere`].
const MALFORMED_CHILD: &str = "PREREQ_TEST_MALFORMED_ADDR_CHILD";

/// A malformed `AMQP_ADDR` (a mangled scheme separator, no scheme, a password holding `/`, `#`
/// or `@` unencoded, whitespace around) makes the transport fail at once with a clear error,
/// and its password shows nowhere: not in the error, not in the log, not in the `Debug` of the
/// configuration. Each address goes through the environment for real: the test runs itself as
/// a child process with `AMQP_ADDR` set, and the child builds its configuration from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_amqp_addr_leaks_nowhere() {
    if std::env::var_os(MALFORMED_CHILD).is_some() {
        logs();
        // `BrokerOptions::from_env` reads `AMQP_ADDR`.
        let options = BrokerOptions::from_env().connect_timeout(Duration::from_secs(5));
        println!("options: {options:?}");
        let e = match tokio::time::timeout(Duration::from_secs(30), Broker::connect(options)).await
        {
            Ok(Ok(b)) => panic!("connected with a malformed address?! {b:?}"),
            Ok(Err(e)) => e,
            Err(_) => panic!("still connecting after 30 s"),
        };
        println!("error: {}", everything_about(&e));
        println!("logs:\n{}", captured());
        println!("child done");
        return;
    }
    // Where a host shows, a closed port on this machine: nothing else is ever contacted.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = "M4lf0rmed-S3cret";
    let addresses = [
        format!("amqp//alice:{secret}@127.0.0.1:{port}/%2f"),
        format!("amqp:/alice:{secret}@127.0.0.1:{port}/%2f"),
        format!("amqp:alice:{secret}@127.0.0.1:{port}"),
        format!("alice:{secret}@127.0.0.1:{port}"),
        format!("amqp://alice:{secret}"),
        format!("amqp://amqp://alice:{secret}"),
        format!("amqp://alice:M4lf/0rmed#S3cret@127.0.0.1:{port}/%2f"),
        format!("amqp://alice:12/{secret}@127.0.0.1:{port}/%2f"),
        format!("  amqp://alice:{secret}@127.0.0.1:{port}/%2f\n"),
    ];
    for uri in &addresses {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "a_malformed_amqp_addr_leaks_nowhere",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MALFORMED_CHILD, "1")
            .env("AMQP_ADDR", uri)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run the child");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("child done"),
            "the child failed for {}: {text}",
            AmqpAddr::new(uri.as_str())
        );
        for s in [secret, "M4lf/0rmed#S3cret", "M4lf0rmed", "S3cret"] {
            assert!(
                !text.contains(s),
                "{} leaks {s:?}:\n{text}",
                AmqpAddr::new(uri.as_str())
            );
        }
        // Well-formed but unreachable: refused. Malformed: refused before any connection.
        assert!(
            text.contains("refused") || text.contains("not a well-formed AMQP URI"),
            "{text}"
        );
    }
}

/// A client key given inline (a secret store's answer) never shows in the options' `Debug`,
/// nor in the error of a start it fails (here: given with an `amqp://` address).
#[tokio::test]
async fn a_client_key_never_shows() {
    const KEY_BODY: &str = "MC4CAQAwBQYDK2VwBCIEIPpf7qQwUn3mUe6lV2q3kZyT0k3lJ1mGJd9cSg2vqMPi";
    let key = format!("-----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n-----END PRIVATE KEY-----\n");
    let options = BrokerOptions::new("amqp://guest:guest@127.0.0.1:1/%2f")
        .tls(prereq::amqp::Tls::new().client_cert_pem("a certificate", key.clone()));
    let shown = format!("{options:?}");
    assert_clean("Debug of BrokerOptions", &shown, &[KEY_BODY, "guest:guest"]);
    assert!(shown.contains("an inline key"), "{shown}");
    let e = Broker::connect(options).await.expect_err("refused");
    let said = everything_about(&e);
    assert_clean("the error", &said, &[KEY_BODY, "guest:guest"]);
    assert!(said.contains("not an amqps:// address"), "{said}");
}
