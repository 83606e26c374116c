//! Helpers for the reliability drills: the drill consumer as a child process, its log, signals,
//! polling with a deadline, and publishing in bulk with confirms.
//!
//! Include with `mod support;` and `#[path = "support/drill.rs"] mod drill;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};

/// Poll `cond` every 20 ms until it holds; panics with `what` and the last `detail` after
/// `timeout`. The interval only paces the polling: correctness comes from the condition.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl AsyncFnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let detail = match cond().await {
            Ok(()) => return,
            Err(detail) => detail,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The drill consumer example's executable, built on first use with this test's features and
/// profile (`cargo test --test x` does not build examples; a stale one must not be used).
pub fn consumer_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut features = vec!["amqp", "sqlite"];
        if cfg!(feature = "metrics") {
            features.push("metrics");
        }
        if cfg!(feature = "postgres") {
            features.push("postgres");
        }
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--example",
            "drill_consumer",
            "--message-format=json",
        ])
        .args(["--no-default-features", "--features", &features.join(",")])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .stderr(Stdio::inherit());
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .expect("run cargo build --example drill_consumer");
        assert!(out.status.success(), "building the drill consumer failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let exe = stdout
            .lines()
            .filter(|l| l.contains(r#""name":"drill_consumer""#))
            .find_map(|l| {
                let start = l.find(r#""executable":""#)? + r#""executable":""#.len();
                let end = start + l[start..].find('"')?;
                Some(PathBuf::from(&l[start..end]))
            })
            .expect("cargo reported the drill consumer's executable");
        assert!(exe.exists(), "{} missing", exe.display());
        exe
    })
}

/// A running drill consumer. Dropping it kills the process (SIGKILL) if it still runs.
pub struct DrillChild {
    child: Child,
    pub log: PathBuf,
}

impl DrillChild {
    /// Start the drill consumer with these variables (`PREREQ_PREFIX`, `PREREQ_DB`, `DRILL_*`;
    /// `AMQP_ADDR` from the environment, as the tests use it). Its stderr goes to
    /// `<log>.stderr`.
    pub fn spawn(log: &Path, env: &[(&str, String)]) -> Self {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log.with_extension("stderr"))
            .expect("child stderr file");
        let mut cmd = Command::new(consumer_binary());
        cmd.env("DRILL_OUT", log)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn the drill consumer");
        Self {
            child,
            log: log.to_owned(),
        }
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

    /// SIGKILL, then reap the process.
    pub fn kill(mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the child");
        self.child.wait().expect("reap the child")
    }

    /// Wait for the process to exit, polling; panics after `timeout` (the child is then killed
    /// by `Drop`). Also panics if it exits while `alive` is expected.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the drill consumer did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until its journal holds `n` READY lines (a consumer started `n` times on it). Panics
    /// at once, with its stderr, if the process exits meanwhile, and after `timeout`.
    pub async fn wait_ready(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = count(&self.log, |l| *l == Line::Ready);
            if got >= n {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for the drill consumer to start: \
                 {got} of {n} READY lines; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Panics (with its stderr) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "the drill consumer exited early ({status}); stderr:\n{}",
                self.stderr()
            );
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("stderr")).unwrap_or_default()
    }
}

impl Drop for DrillChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A small deterministic generator (xorshift64*), so that every run of a drill races the same
/// way.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One line of the drill consumer's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    Ready,
    Registered {
        client: u64,
        at_ns: u128,
    },
    Handled {
        payment: u64,
        client: u64,
        known: bool,
        first: bool,
        at_ns: u128,
    },
    /// The handler returned: entered and returned at these times.
    Ended {
        payment: u64,
        client: u64,
        entered_ns: u128,
        returned_ns: u128,
    },
    Held(u64),
    Deferred(u64),
    Requeued(u64),
    DeadLettered(String),
    Exit(BTreeMap<String, u64>),
}

/// Parse the drill log. Every line must be complete and well-formed: a torn or unknown line
/// fails the test. A read can catch a live writer in the middle of its one `write`: an
/// incomplete last line is read again for up to a second before it counts as torn.
pub fn read_log(path: &Path) -> Vec<Line> {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    for _ in 0..100 {
        if text.is_empty() || text.ends_with('\n') {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        text = std::fs::read_to_string(path).unwrap_or_default();
    }
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "torn last line in {}",
        path.display()
    );
    text.lines().map(parse_line).collect()
}

fn parse_line(line: &str) -> Line {
    let w: Vec<&str> = line.split(' ').collect();
    let num = |i: usize| -> u64 {
        w.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad drill log line {line:?}"))
    };
    // A message id: a number, or a number behind a prefix (`pay-17`).
    let id = |i: usize| -> u64 {
        w.get(i)
            .and_then(|s| s.rsplit('-').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad drill log line {line:?}"))
    };
    let ns = |i: usize| -> u128 {
        w.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad drill log line {line:?}"))
    };
    match w[0] {
        "READY" => Line::Ready,
        "R" if w.len() == 3 => Line::Registered {
            client: num(1),
            at_ns: ns(2),
        },
        "P" if w.len() == 6 => Line::Handled {
            payment: num(1),
            client: num(2),
            known: num(3) == 1,
            first: num(4) == 1,
            at_ns: ns(5),
        },
        "E" if w.len() == 5 => Line::Ended {
            payment: num(1),
            client: num(2),
            entered_ns: ns(3),
            returned_ns: ns(4),
        },
        "H" if w.len() == 2 => Line::Held(id(1)),
        "D" if w.len() == 2 => Line::Deferred(id(1)),
        "Q" if w.len() == 2 => Line::Requeued(id(1)),
        "X" => Line::DeadLettered(line.to_owned()),
        "EXIT" => Line::Exit(
            w[1..]
                .iter()
                .map(|kv| {
                    let (k, v) = kv
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad EXIT line {line:?}"));
                    (k.to_owned(), v.parse().expect("EXIT counter"))
                })
                .collect(),
        ),
        _ => panic!("unknown drill log line {line:?}"),
    }
}

/// How many lines of the log satisfy `pred`.
pub fn count(path: &Path, pred: impl Fn(&Line) -> bool) -> usize {
    read_log(path).iter().filter(|l| pred(l)).count()
}

/// Nanoseconds since the Unix epoch (the clock the drill consumer stamps its lines with).
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// One message to publish.
pub struct Out {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// Publish every message (mandatory) on a confirm channel, `window` at a time in flight, and
/// check every confirm. `before_each` runs right before each publish (e.g.
/// to record when it was sent).
pub async fn publish_all(
    ch: &Channel,
    messages: impl IntoIterator<Item = Out>,
    window: usize,
    mut before_each: impl FnMut(&Out),
) {
    let mut in_flight = std::collections::VecDeque::new();
    for m in messages {
        before_each(&m);
        let confirm = ch
            .basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &m.body,
                m.properties,
            )
            .await
            .expect("publish");
        in_flight.push_back(confirm);
        if in_flight.len() >= window {
            check(in_flight.pop_front().unwrap().await.expect("confirm"));
        }
    }
    for c in in_flight {
        check(c.await.expect("confirm"));
    }
}

fn check(c: Confirmation) {
    assert_eq!(
        c,
        Confirmation::Ack(None),
        "publish not confirmed as routed"
    );
}

/// A persistent message with this message id.
pub fn persistent(id: impl Into<String>) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.into().into())
}

/// A temporary directory for drill logs, removed on drop unless the test panicked (then it is
/// kept, and its path printed, for diagnosis).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("prereq-{tag}-{}-{}", std::process::id(), now_ns()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("drill logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Messages ready in `queue` (0 when the queue does not exist), on a channel of its own that
/// is closed afterwards (a passive declare of a missing queue closes its channel).
pub async fn depth(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let got = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    match got {
        Ok(q) => {
            let _ = ch.close(200, "depth".into()).await;
            q.message_count()
        }
        Err(e) if e.to_string().contains("NOT_FOUND") => 0,
        Err(e) => panic!("passive declare of {queue}: {e}"),
    }
}

/// Ready and unacknowledged message counts of every queue whose name starts with `prefix`,
/// from `rabbitmqctl` (`None` when it cannot run here, or when the broker under test is not the
/// local default node `rabbitmqctl` talks to). Unlike a passive declare, this sees deliveries a
/// consumer holds unacknowledged.
pub fn queue_counts(prefix: &str) -> Option<BTreeMap<String, (u64, u64)>> {
    let addr = std::env::var("AMQP_ADDR").unwrap_or_default();
    let local = addr.is_empty()
        || [
            "@127.0.0.1:5672/",
            "@localhost:5672/",
            "@127.0.0.1/",
            "@localhost/",
        ]
        .iter()
        .any(|h| addr.contains(h));
    if !local {
        return None;
    }
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        if let [name, ready, unacked] = cols[..]
            && name.starts_with(prefix)
        {
            counts.insert(
                name.to_owned(),
                (ready.parse().ok()?, unacked.parse().ok()?),
            );
        }
    }
    Some(counts)
}
