//! A wrong PostgreSQL URL or an unreachable server fails `PgKeys` at start, within its
//! connect timeout, with a clear error; the password of the URL appears in no error (`Display`
//! or `Debug`), no `Debug` of the source or its builder, and no log line of any crate, at any
//! level — also while the listener reconnects. Its own test binary: it owns the process's
//! global `tracing` subscriber.
#![cfg(feature = "postgres")]

#[path = "support/db.rs"]
mod db;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use db::{Schema, pg, unique, url, wait_for};
use prereq::sql::{PgKeys, SqlKeysError};
use prereq::{KeySource, Wake};

const PASSWORD: &str = "s3cret-pw";
const PASSWORD_ENCODED: &str = "s3cret%2Dpw";

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

fn assert_no_password(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD) && !text.contains(PASSWORD_ENCODED),
        "the password leaked into {what}: {text}"
    );
}

fn assert_logs_clean() {
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert_no_password("the logs", &logs);
}

/// `url` with `user:PASSWORD@` as its userinfo and `host:port` replaced if given.
fn with_password(url: &str, host_port: Option<&str>, database: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let authority = host_port.unwrap_or(authority);
    let path = database.unwrap_or(path);
    format!("{scheme}://postgres:{PASSWORD_ENCODED}@{authority}/{path}")
}

async fn failure(url: String, timeout: Duration) -> SqlKeysError {
    let builder = PgKeys::<i64>::builder(url).connect_timeout(timeout);
    assert_no_password("the builder's Debug", &format!("{builder:?}"));
    match builder.connect().await {
        Ok(keys) => panic!("connected: {keys:?}"),
        Err(e) => {
            assert_no_password("the error", &format!("{e} {e:?}"));
            assert!(
                format!("{e}").contains("postgres:***@"),
                "the error names the database, password masked: {e}"
            );
            e
        }
    }
}

#[tokio::test]
async fn a_closed_port_fails_at_start_without_the_password() {
    logs();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let hp = format!("127.0.0.1:{port}");
    let e = failure(
        with_password(&url(), Some(&hp), None),
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(e, SqlKeysError::Connect { .. }), "{e:?}");
    assert_logs_clean();
}

#[tokio::test]
async fn a_server_that_never_answers_fails_within_the_connect_timeout() {
    logs();
    // Accepts connections (the kernel does, from the backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hp = silent.local_addr().expect("addr").to_string();
    let e = failure(
        with_password(&url(), Some(&hp), None),
        Duration::from_millis(300),
    )
    .await;
    assert!(
        matches!(e, SqlKeysError::Timeout { after, .. } if after == Duration::from_millis(300)),
        "{e:?}"
    );
    assert_logs_clean();
}

#[tokio::test]
async fn a_malformed_url_fails_without_the_password() {
    logs();
    let e = failure(
        format!("postgres://postgres:{PASSWORD}@127.0.0.1:notaport/test"),
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(e, SqlKeysError::Config(_)), "{e:?}");
    assert_logs_clean();
}

#[tokio::test]
async fn a_missing_database_fails_at_start_without_the_password() {
    logs();
    let Some(_conn) = pg().await else { return };
    let missing = unique("no_such_db");
    let e = failure(
        with_password(&url(), None, Some(&missing)),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        matches!(&e, SqlKeysError::Connect { reason, .. } if reason.contains(&missing)),
        "{e:?}"
    );
    assert_logs_clean();
}

#[tokio::test]
async fn a_connected_source_and_its_reconnection_do_not_show_the_password() {
    logs();
    let Some(mut conn) = pg().await else { return };
    let schema = Schema::create(&mut conn, "secret").await;
    let app = unique("app");
    // Under trust authentication the server does not ask for the password: it connects.
    let keys: PgKeys<i64> = PgKeys::builder(with_password(&url(), None, None))
        .schema(&schema.name)
        .application_name(&app)
        .connect()
        .await
        .expect("connect");
    assert_no_password("the source's Debug", &format!("{keys:?}"));
    let mut wakes = keys.subscribe();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&app)
    .execute(&mut conn)
    .await
    .expect("terminate");
    wait_for(&mut wakes, Wake::Resync).await;
    keys.insert(&1)
        .await
        .expect("insert after the reconnection");
    assert_logs_clean();
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(
        logs.contains("reconnected") && logs.contains("postgres:***@"),
        "the reconnection was logged, naming the database with its password masked: {logs}"
    );
}
