//! A private RabbitMQ node for tests that stop and start a broker: its own node name, ports
//! (AMQP and Erlang distribution, on loopback), Erlang cookie, data, logs and configuration, in a
//! temporary directory. The shared broker other tests use is never touched.
//!
//! Include with `#[path = "support/node.rs"] mod node;`. Needs `rabbitmq-server` (the Debian
//! package, or any install that puts it on `PATH`); [`Node::start`] skips, with a printed reason,
//! when it is missing, and fails under `PREREQ_REQUIRE_BROKER=1`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use prereq::amqp::AmqpAddr;

/// A running private node; dropping it stops the node (also when the test panics) and removes
/// its directory (kept, and its path printed, when the test panicked).
pub struct Node {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
    server: PathBuf,
    ctl: PathBuf,
    env: Vec<(String, String)>,
}

/// Where the RabbitMQ scripts are: the Debian package's own (`/usr/lib/rabbitmq/bin`, which
/// run as the calling user, unlike the `/usr/sbin` wrappers that switch to the `rabbitmq`
/// user), else the first on `PATH`.
fn script(name: &str) -> Option<PathBuf> {
    let debian = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A free loopback port, outside the ports RabbitMQ's own tools use (its CLI tools take
/// 35672–35682 for their Erlang distribution).
pub fn free_port(taken: &[u16]) -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        if !(35_672..=35_682).contains(&port) && !taken.contains(&port) {
            return port;
        }
    }
}

fn skip(reason: &str) -> Option<Node> {
    if std::env::var("PREREQ_REQUIRE_BROKER").as_deref() == Ok("1") {
        panic!("PREREQ_REQUIRE_BROKER=1 but {reason}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipping a private-node test: {reason} (set PREREQ_REQUIRE_BROKER=1 to make this a \
         failure)"
    );
    None
}

impl Node {
    /// Start a private node and wait until it accepts AMQP connections, or explain why the
    /// test is skipped.
    pub fn start(tag: &str) -> Option<Node> {
        Self::start_with(tag, "", &[], &[])
    }

    /// As [`Node::start`], with `conf` added to the node's `rabbitmq.conf` (another listener,
    /// say), its own ports chosen outside `taken`, and `plugins` enabled (plugins of the
    /// RabbitMQ installation, e.g. `rabbitmq_auth_mechanism_ssl`).
    pub fn start_with(tag: &str, conf: &str, taken: &[u16], plugins: &[&str]) -> Option<Node> {
        let (Some(server), Some(ctl)) = (script("rabbitmq-server"), script("rabbitmqctl")) else {
            return skip("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)");
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("prereq-{tag}-{}-{nanos}@localhost", std::process::id());
        let dir =
            std::env::temp_dir().join(format!("prereq-node-{tag}-{}-{nanos}", std::process::id()));
        let home = dir.join("home");
        for d in [&home, &dir.join("mnesia"), &dir.join("log")] {
            std::fs::create_dir_all(d).expect("create the node's directories");
        }
        // A cookie of its own: only this test's CLI calls can talk to the node.
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("PREREQ{nanos}").as_bytes()).expect("write the cookie");
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .expect("cookie permissions");
        let port = free_port(taken);
        let dist_port = free_port(&[taken, &[port]].concat());
        // Only this listener and what `conf` adds (no management, no stream plugin: nothing
        // else to collide with).
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\n{conf}"),
        )
        .expect("write rabbitmq.conf");
        std::fs::write(
            dir.join("enabled_plugins"),
            format!("[{}].\n", plugins.join(",")),
        )
        .expect("write enabled_plugins");
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let env: Vec<(String, String)> = [
            ("HOME", home.to_string_lossy().into_owned()),
            ("RABBITMQ_NODENAME", name.clone()),
            ("RABBITMQ_DIST_PORT", dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_PID_FILE", path("pid")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
            ("ERL_CRASH_DUMP", path("erl_crash.dump")),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let node = Node {
            name,
            port,
            dir,
            server,
            ctl,
            env,
        };
        let started = Instant::now();
        let out = node
            .command(&node.server)
            .arg("-detached")
            .output()
            .expect("run rabbitmq-server");
        assert!(
            out.status.success(),
            "rabbitmq-server -detached failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pid_file = node.dir.join("pid").to_string_lossy().into_owned();
        node.ctl_ok(&["wait", "--timeout", "120", &pid_file]);
        node.ctl_ok(&["await_startup", "--timeout", "120"]);
        println!(
            "private RabbitMQ node {} on 127.0.0.1:{} up in {:?}",
            node.name,
            node.port,
            started.elapsed()
        );
        Some(node)
    }

    /// The node's address (user `guest`, which RabbitMQ allows on loopback).
    pub fn addr(&self) -> AmqpAddr {
        AmqpAddr::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port))
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `rabbitmqctl -n <node> args…`: its output, or why it failed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(&self.ctl)
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "rabbitmqctl {args:?} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `rabbitmqctl -n <node> args…`, which must succeed.
    #[track_caller]
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        self.ctl(args)
            .unwrap_or_else(|e| panic!("{e}\n(node logs in {})", self.dir.join("log").display()))
    }

    /// Ready and unacknowledged message counts of every queue whose name starts with `prefix`.
    pub fn queue_counts(&self, prefix: &str) -> BTreeMap<String, (u64, u64)> {
        let text = self.ctl_ok(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            if let [name, ready, unacked] = line.split('\t').collect::<Vec<_>>()[..]
                && name.starts_with(prefix)
            {
                let n = |s: &str| s.trim().parse().expect("a message count");
                counts.insert(name.to_owned(), (n(ready), n(unacked)));
            }
        }
        counts
    }

    /// Client connection names (the `connection_name` client property, `-` when unset).
    pub fn connection_names(&self) -> Vec<String> {
        self.ctl_ok(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ])
        .lines()
        .map(|l| {
            l.split("\"connection_name\",\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("-")
                .to_owned()
        })
        .collect()
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Read first: the node removes its pid file as it stops.
        let pid = self.pid();
        let stopped = self.ctl(&["stop"]);
        if let Some(pid) = pid {
            // `stop` returns once the node is told to halt: wait until it is gone.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        if std::thread::panicking() || stopped.is_err() {
            eprintln!(
                "private node {} stopped ({stopped:?}); its files are kept in {}",
                self.name,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
