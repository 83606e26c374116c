//! Shared helpers for the key source tests and the database drills: connect-or-skip, a schema
//! or table of the test's own dropped even when the test fails, waiting for a subscription's
//! next wake, and the examples as child processes built with this test's features.
//!
//! Include with `#[path = "support/db.rs"] mod db;` (it needs no broker).
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prereq::{KeyWakes, Wake};
#[cfg(feature = "postgres")]
use sqlx::{Connection, PgConnection};

/// The environment variable naming the test database.
pub const PG_URL_ENV: &str = "PREREQ_PG_URL";

/// The test database when [`PG_URL_ENV`] is not set: the local server, trust authentication.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How long a test waits for something that must happen (a wake, a backend to go away).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The test database's URL.
pub fn url() -> String {
    match std::env::var(PG_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
        _ => DEFAULT_PG_URL.to_owned(),
    }
}

#[cfg(feature = "postgres")]
/// A connection to the test database, or `None` (with the reason printed) when it is
/// unreachable. Under `PREREQ_REQUIRE_DB=1` an unreachable database fails the test instead.
pub async fn pg() -> Option<PgConnection> {
    let url = url();
    let attempt = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&url)).await;
    let error = match attempt {
        Ok(Ok(conn)) => return Some(conn),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out after 10 s".to_owned(),
    };
    let reason = format!("PostgreSQL at {} unreachable: {error}", redact(&url));
    if std::env::var("PREREQ_REQUIRE_DB").as_deref() == Ok("1") {
        panic!("PREREQ_REQUIRE_DB=1 but {reason}");
    }
    // Straight to the process's stderr: the harness captures `eprintln!` of passing tests.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "skipping a PostgreSQL test: {reason} (set PREREQ_REQUIRE_DB=1 to make this a failure)"
    );
    None
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if url[s + 3..at].contains(':') => {
            let user = url[s + 3..at].split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// A name unique to this run and call, valid as an unquoted identifier:
/// `prq_<tag>_<pid>_<n>_<micros>`.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or(0);
    format!(
        "prq_{tag}_{}_{}_{micros}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(feature = "postgres")]
/// A schema of the test's own, dropped (with everything in it) when this is dropped — also
/// when the test panics. The drop runs on its own thread and runtime, so it works anywhere.
pub struct Schema {
    pub name: String,
}

#[cfg(feature = "postgres")]
impl Schema {
    /// Create a schema named after `tag` (made unique).
    pub async fn create(conn: &mut PgConnection, tag: &str) -> Self {
        let name = unique(tag);
        sqlx::query(&format!("CREATE SCHEMA \"{name}\""))
            .execute(&mut *conn)
            .await
            .expect("create the test schema");
        Self { name }
    }

    /// `name` qualified by this schema, quoted.
    pub fn qualify(&self, name: &str) -> String {
        format!("\"{}\".\"{name}\"", self.name)
    }
}

#[cfg(feature = "postgres")]
impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                eprintln!("cleanup: no runtime, left schema {name}");
                return;
            };
            rt.block_on(async move {
                match PgConnection::connect(&url()).await {
                    Ok(mut conn) => {
                        let drop = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                        if let Err(e) = sqlx::query(&drop).execute(&mut conn).await {
                            eprintln!("cleanup: schema {name}: {e}");
                        }
                        let _ = conn.close().await;
                    }
                    Err(e) => eprintln!("cleanup: database unreachable, left schema {name}: {e}"),
                }
            });
        });
        let _ = worker.join();
    }
}

/// The next wake of `wakes`; fails the test if none comes within [`PATIENCE`].
pub async fn next_wake<K: Clone + Debug>(wakes: &mut KeyWakes<K>) -> Wake<K> {
    match tokio::time::timeout(PATIENCE, wakes.next()).await {
        Ok(Some(wake)) => wake,
        Ok(None) => panic!("the subscription ended"),
        Err(_) => panic!("no wake within {PATIENCE:?}"),
    }
}

/// Wait until `wakes` reports `expected`, skipping anything else (a duplicate, another key);
/// fails the test if it does not within [`PATIENCE`]. Returns what was skipped.
pub async fn wait_for<K: Clone + Debug + PartialEq>(
    wakes: &mut KeyWakes<K>,
    expected: Wake<K>,
) -> Vec<Wake<K>> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, wakes.next()).await {
            Ok(Some(wake)) if wake == expected => return skipped,
            Ok(Some(wake)) => skipped.push(wake),
            Ok(None) => panic!("the subscription ended waiting for {expected:?}"),
            Err(_) => panic!("no {expected:?} within {PATIENCE:?}; saw {skipped:?}"),
        }
    }
}

/// Poll `condition` until it holds; fails the test if it does not within [`PATIENCE`].
pub async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {PATIENCE:?}: {what}"
        );
        // Polling interval: the condition is a query, there is no event to wait on.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "postgres")]
/// A table (in the search path's schema) of the test's own, with the notify trigger's function
/// if one was installed, dropped when this is dropped — also when the test panics. For the
/// examples, which take a table name (`PREREQ_DB_TABLE`) rather than a schema.
pub struct Table {
    pub name: String,
}

#[cfg(feature = "postgres")]
impl Table {
    /// A fresh table name after `tag` (nothing is created: the source under test does it).
    pub fn named(tag: &str) -> Self {
        Self { name: unique(tag) }
    }
}

#[cfg(feature = "postgres")]
impl Drop for Table {
    fn drop(&mut self) {
        let name = self.name.clone();
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                eprintln!("cleanup: no runtime, left table {name}");
                return;
            };
            rt.block_on(async move {
                match PgConnection::connect(&url()).await {
                    Ok(mut conn) => {
                        for sql in [
                            format!("DROP TABLE IF EXISTS \"{name}\" CASCADE"),
                            format!("DROP FUNCTION IF EXISTS \"{name}_prereq_notify\"() CASCADE"),
                        ] {
                            if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                                eprintln!("cleanup: {sql}: {e}");
                            }
                        }
                        let _ = conn.close().await;
                    }
                    Err(e) => eprintln!("cleanup: database unreachable, left table {name}: {e}"),
                }
            });
        });
        let _ = worker.join();
    }
}

/// The cargo features this test was built with, so that an example built for it reuses the
/// library this test links (another set would rebuild it).
fn features() -> String {
    let mut features = Vec::new();
    for (on, name) in [
        (cfg!(feature = "amqp"), "amqp"),
        (cfg!(feature = "cli"), "cli"),
        (cfg!(feature = "metrics"), "metrics"),
        (cfg!(feature = "backon"), "backon"),
        (cfg!(feature = "sqlite"), "sqlite"),
        (cfg!(feature = "postgres"), "postgres"),
    ] {
        if on {
            features.push(name);
        }
    }
    features.join(",")
}

/// The executable of example `name`, built on first use with this test's features and
/// profile (`cargo test --test x` does not build examples; a stale one must not be used). It
/// is copied out of cargo's output directory, so that a build of the same example with other
/// features (another test's) does not replace it under a running test.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(exe) = built.get(name) {
        return exe.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--example", name, "--message-format=json"])
        .args(["--no-default-features", "--features", &features()])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .stderr(Stdio::inherit());
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("run cargo build --example");
    assert!(out.status.success(), "building example {name} failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exe = stdout
        .lines()
        .filter(|l| l.contains(&format!(r#""name":"{name}""#)))
        .find_map(|l| {
            let start = l.find(r#""executable":""#)? + r#""executable":""#.len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .unwrap_or_else(|| panic!("cargo reported no executable for example {name}"));
    // One copy per example and feature set, in cargo's directory for test files: written
    // under a name of this process's, then renamed over the last one (a running child keeps
    // its own).
    let copy = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("example-{name}-{}", features().replace(',', "-")));
    let fresh = copy.with_extension(std::process::id().to_string());
    std::fs::copy(&exe, &fresh).unwrap_or_else(|e| panic!("copy {}: {e}", exe.display()));
    std::fs::rename(&fresh, &copy).unwrap_or_else(|e| panic!("rename {}: {e}", fresh.display()));
    built.insert(name.to_owned(), copy.clone());
    copy
}

/// An example running as a child process, its stdout and stderr in files. Dropping it kills
/// the process (SIGKILL) if it still runs.
pub struct ExampleChild {
    child: Child,
    pub stdout: PathBuf,
}

impl ExampleChild {
    /// Start example `name` in `dir` with these variables (and the test's environment, less
    /// `PREREQ_DB`, `PREREQ_DB_TABLE` and `PREREQ_HOLD_MS` unless given here); its stdout goes
    /// to `<dir>/<out>`, its stderr to `<dir>/<out>.stderr`.
    pub fn spawn(name: &str, dir: &Path, out: &str, env: &[(&str, String)]) -> Self {
        let stdout = dir.join(out);
        let file = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("child output file")
        };
        let mut cmd = Command::new(example_binary(name));
        cmd.current_dir(dir)
            .env_remove("PREREQ_DB")
            .env_remove("PREREQ_DB_TABLE")
            .env_remove("PREREQ_HOLD_MS")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(file(&stdout))
            .stderr(file(&stdout.with_extension("stderr")));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn the example");
        Self { child, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal by name (`INT`, `TERM`, `KILL`) with the system's `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} {} failed", self.pid());
    }

    /// Wait for the process to exit, polling; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; stderr:\n{}",
                self.stdout.display(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Panics (with its stderr) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "{} exited early ({status}); stderr:\n{}",
                self.stdout.display(),
                self.stderr()
            );
        }
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stdout.with_extension("stderr")).unwrap_or_default()
    }

    /// Wait until its stdout has a line containing `text`; panics (with its output) after
    /// `timeout` or if it exits first.
    pub async fn wait_for_line(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(text)) {
                return line.to_owned();
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "no line with {text:?} within {timeout:?} from {}; stdout:\n{}\nstderr:\n{}",
                self.stdout.display(),
                self.output(),
                self.stderr()
            );
            // Polling a file the child appends to: there is no event to wait on.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ExampleChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The payment id the `producer` example printed (`published payment <id> for client …`).
pub fn published_id(printed: &str) -> String {
    printed
        .split_whitespace()
        .nth(2)
        .filter(|_| printed.starts_with("published payment "))
        .unwrap_or_else(|| panic!("unexpected producer output {printed:?}"))
        .to_owned()
}

/// Run example `name` to completion in `dir` with `args` and `env` (as for
/// [`ExampleChild::spawn`]); panics unless it exits 0. Returns its stdout.
pub async fn run_example(name: &str, dir: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    let mut cmd = tokio::process::Command::new(example_binary(name));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("PREREQ_DB")
        .env_remove("PREREQ_DB_TABLE")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name} {args:?} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A private PostgreSQL cluster for the outage drills: its own data directory (a temporary
/// one), its own port, its socket in its directory; the shared server is never touched.
/// Dropping it stops the server (immediately) and removes the directory — also when the test
/// panics (the server's log is printed then).
pub struct PrivatePg {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// The directory of the newest PostgreSQL server binaries (`initdb`, `pg_ctl`): the Debian
/// layout `/usr/lib/postgresql/<version>/bin`, else `PATH`.
fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("pg_ctl").is_file() && dir.join("initdb").is_file())
    })
}

/// Run `cmd` with `sh`, as the `postgres` user when running as root (the server refuses to run
/// as root); its output, or why it failed.
fn as_owner(cmd: &str) -> Result<String, String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let out = if root {
        Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c", cmd])
            .output()
    } else {
        Command::new("sh").args(["-c", cmd]).output()
    }
    .map_err(|e| format!("{cmd}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd}: {}\n{text}", out.status))
    }
}

impl PrivatePg {
    /// Create and start a cluster on a free port near `55432 + pid % 1000`, or `None` (with the
    /// reason printed) when the server binaries are missing or it cannot start; under
    /// `PREREQ_REQUIRE_DB=1` that fails the test instead.
    pub fn start() -> Option<Self> {
        let skip = |reason: String| -> Option<Self> {
            if std::env::var("PREREQ_REQUIRE_DB").as_deref() == Ok("1") {
                panic!("PREREQ_REQUIRE_DB=1 but {reason}");
            }
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "skipping a private PostgreSQL drill: {reason} (set PREREQ_REQUIRE_DB=1 to make \
                 this a failure)"
            );
            None
        };
        let Some(bin) = pg_bin() else {
            return skip("no PostgreSQL server binaries (initdb, pg_ctl)".into());
        };
        let base = 55_432 + (std::process::id() % 1000) as u16;
        let Some(port) =
            (base..base + 200).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        else {
            return skip("no free port".into());
        };
        let dir = std::env::temp_dir().join(format!("prereq-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return skip(format!("cannot create {}: {e}", dir.display()));
        }
        // Owned by the server's user when running as root (a no-op otherwise).
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let pg = Self { port, dir, bin };
        let initdb = format!(
            "{} -D {}/data -A trust -U postgres --no-sync",
            pg.bin.join("initdb").display(),
            pg.dir.display()
        );
        if let Err(e) = as_owner(&initdb) {
            return skip(format!("initdb failed: {e}"));
        }
        if let Err(e) = pg.try_start() {
            return skip(e);
        }
        Some(pg)
    }

    fn try_start(&self) -> Result<(), String> {
        as_owner(&format!(
            "{} -D {dir}/data -l {dir}/server.log -w -t 60 -o '-p {} -k {dir} -c \
             listen_addresses=127.0.0.1 -c fsync=off' start",
            self.bin.join("pg_ctl").display(),
            self.port,
            dir = self.dir.display()
        ))
        .map(drop)
    }

    /// The URL of its `postgres` database (trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Start the (stopped) server and wait until it accepts connections.
    pub fn start_server(&self) {
        if let Err(e) = self.try_start() {
            panic!("starting the private server: {e}\n{}", self.log());
        }
    }

    /// Stop the server (`pg_ctl stop -m fast`: sessions are terminated) and wait until it is
    /// down.
    pub fn stop_server(&self) {
        if let Err(e) = as_owner(&format!(
            "{} -D {}/data -m fast -w -t 60 stop",
            self.bin.join("pg_ctl").display(),
            self.dir.display()
        )) {
            panic!("stopping the private server: {e}\n{}", self.log());
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("private PostgreSQL log:\n{}", self.log());
        }
        let _ = as_owner(&format!(
            "{} -D {}/data -m immediate -w -t 60 stop",
            self.bin.join("pg_ctl").display(),
            self.dir.display()
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
