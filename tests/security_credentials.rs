//! Credentials in the AMQP address never leak: not into `tracing` output (every level, every
//! crate: prereq's, lapin's, its TCP and TLS layers), not into errors (`Display` and `Debug`,
//! and their `source()` chains), not into the `Debug` of `AmqpAddr`, `AmqpConfig` or
//! `AmqpTransport`. Checked while failing to connect with a wrong password, to a host that does
//! not resolve, to a closed port, with `amqps://` against a plain-AMQP port, and while connected.
//! Passwords are also checked percent-decoded (`p%40ss` is `p@ss`).
#![cfg(feature = "amqp")]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prereq::amqp::{AmqpAddr, AmqpConfig, AmqpError, AmqpTransport, DelayMode};
use prereq::{DependentConsumer, HandlerError};

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
    let config = AmqpConfig::new("prereq-security-never-declared", "prereq-security-keys")
        .with_addr(uri)
        .with_delay_mode(mode);
    assert_clean(
        "Debug of AmqpConfig",
        &format!("{config:?}"),
        &[password_of(uri)],
    );
    match tokio::time::timeout(limit, AmqpTransport::connect(config)).await {
        Ok(Ok(t)) => panic!("connected to {}?! {t:?}", AmqpAddr::new(uri)),
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
        let wrapped: prereq::Error<AmqpError> = prereq::Error::Transport(e);
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

/// `AmqpTransport::connect` to an unreachable broker fails at once, although lapin's
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
    let config = AmqpConfig::new(format!("{p}payments"), format!("{p}clients"))
        .with_addr(addr.clone())
        .with_delay_mode(DelayMode::DelayQueues);
    cleanup.config(&config);
    let transport = AmqpTransport::connect(config).await.expect("connect");
    assert_clean(
        "Debug of AmqpTransport",
        &format!("{transport:?}"),
        &needles,
    );
    assert!(
        format!("{transport:?}").contains(":***@"),
        "the redacted address is shown: {transport:?}"
    );
    let consumer = DependentConsumer::<u64, serde_json::Value>::builder()
        .key(|_| 1)
        .handler(|_| async { Ok::<_, HandlerError>(()) })
        .build()
        .unwrap();
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
