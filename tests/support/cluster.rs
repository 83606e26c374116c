//! A private three-node RabbitMQ cluster on loopback for tests that stop and start a cluster
//! member: each node with its own node name, AMQP and Erlang distribution ports, data, logs and
//! configuration, all three sharing one Erlang cookie of their own, with the consistent-hash
//! exchange plugin enabled; nodes 2 and 3 joined to node 1. The shared broker other tests use is
//! never touched.
//!
//! Include with `#[path = "support/cluster.rs"] mod cluster;`. Needs `rabbitmq-server` (the
//! Debian package, or any install that puts it on `PATH`); [`Cluster::start`] skips, with a
//! printed reason, when it is missing, and fails under `PREREQ_REQUIRE_BROKER=1`.
//!
//! Nodes are numbered 0, 1, 2 in the API (`node1`, `node2`, `node3` in names and messages).
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use prereq::amqp::AmqpAddr;

/// How many nodes the cluster has.
pub const NODES: usize = 3;

/// One node of the cluster.
pub struct ClusterNode {
    /// Its Erlang node name (`prereq-<tag>-node<N>-<pid>-<nanos>@localhost`).
    pub name: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

/// A running private cluster; dropping it stops every node (also when the test panics) and
/// removes its directory (kept, and its path printed, when the test panicked).
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
    server: PathBuf,
    ctl: PathBuf,
}

/// A queue as `rabbitmqctl list_queues` shows it.
#[derive(Clone, Debug)]
pub struct QueueInfo {
    pub name: String,
    /// `quorum`, `classic`, …
    pub kind: String,
    /// The quorum queue's member nodes (empty for other kinds).
    pub members: Vec<String>,
    /// The quorum queue's leader node (empty for other kinds).
    pub leader: String,
    pub ready: u64,
    pub unacked: u64,
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
/// 35672–35682 for their Erlang distribution) and the shared broker's, and not in `taken`.
fn free_port(taken: &[u16]) -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        if !(35_672..=35_682).contains(&port)
            && ![5672, 25_672, 4369].contains(&port)
            && !taken.contains(&port)
        {
            return port;
        }
    }
}

fn skip(reason: &str) -> Option<Cluster> {
    if std::env::var("PREREQ_REQUIRE_BROKER").as_deref() == Ok("1") {
        panic!("PREREQ_REQUIRE_BROKER=1 but {reason}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipping a private-cluster test: {reason} (set PREREQ_REQUIRE_BROKER=1 to make this a \
         failure)"
    );
    None
}

/// `[a@h, b@h]` or `a@h` → the node names.
fn node_list(text: &str) -> Vec<String> {
    text.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|s| s.trim().trim_matches('\'').trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Cluster {
    /// Start three private nodes, join nodes 2 and 3 to node 1, and wait until all three run as
    /// one cluster; or explain why the test is skipped.
    pub fn start(tag: &str) -> Option<Cluster> {
        let (Some(server), Some(ctl)) = (script("rabbitmq-server"), script("rabbitmqctl")) else {
            return skip("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)");
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("prereq-cluster-{tag}-{pid}-{nanos}"));
        // One home, hence one Erlang cookie, for the three nodes and this test's CLI calls: only
        // they can talk to one another.
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("create the cluster's directory");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("PREREQCLUSTER{nanos}").as_bytes())
            .expect("write the cookie");
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .expect("cookie permissions");
        let mut taken = Vec::new();
        let mut nodes = Vec::new();
        for n in 1..=NODES {
            let port = free_port(&taken);
            taken.push(port);
            let dist_port = free_port(&taken);
            taken.push(dist_port);
            let name = format!("prereq-{tag}-node{n}-{pid}-{nanos}@localhost");
            let node_dir = dir.join(format!("node{n}"));
            for d in [node_dir.join("mnesia"), node_dir.join("log")] {
                std::fs::create_dir_all(d).expect("create the node's directories");
            }
            // Only this listener (no management, no stream plugin: nothing else to collide
            // with); quorum queue leaders spread over the nodes, not all on the declaring one.
            std::fs::write(
                node_dir.join("rabbitmq.conf"),
                format!("listeners.tcp.1 = 127.0.0.1:{port}\nqueue_leader_locator = balanced\n"),
            )
            .expect("write rabbitmq.conf");
            std::fs::write(
                node_dir.join("enabled_plugins"),
                "[rabbitmq_consistent_hash_exchange].\n",
            )
            .expect("write enabled_plugins");
            std::fs::write(node_dir.join("rabbitmq-env.conf"), "")
                .expect("write rabbitmq-env.conf");
            let path = |p: &str| node_dir.join(p).to_string_lossy().into_owned();
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
            nodes.push(ClusterNode {
                name,
                port,
                dir: node_dir,
                env,
            });
        }
        let cluster = Cluster {
            nodes,
            dir,
            server,
            ctl,
        };
        let started = Instant::now();
        // Start the three at once, then wait for each.
        for i in 0..NODES {
            cluster.launch(i);
        }
        for i in 0..NODES {
            cluster.await_node(i);
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..NODES {
            cluster.ctl_ok(i, &["stop_app"]);
            cluster.ctl_ok(i, &["join_cluster", &first]);
            cluster.ctl_ok(i, &["start_app"]);
            cluster.ctl_ok(i, &["await_startup", "--timeout", "120"]);
        }
        let running = cluster.running_nodes(0);
        assert_eq!(
            running.len(),
            NODES,
            "the cluster runs on {running:?}, not on all of {:?}",
            cluster.names()
        );
        println!(
            "private RabbitMQ cluster of {} up in {:?}: {}",
            NODES,
            started.elapsed(),
            cluster
                .nodes
                .iter()
                .map(|n| format!("{} on 127.0.0.1:{}", n.name, n.port))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Some(cluster)
    }

    /// The nodes' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Node `i`'s address (user `guest`, which RabbitMQ allows on loopback).
    pub fn addr(&self, i: usize) -> AmqpAddr {
        AmqpAddr::new(format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[i].port
        ))
    }

    fn command(&self, i: usize, program: &Path) -> Command {
        let node = &self.nodes[i];
        let mut cmd = Command::new(program);
        cmd.current_dir(&node.dir)
            .envs(node.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `rabbitmq-server -detached` for node `i`.
    fn launch(&self, i: usize) {
        let out = self
            .command(i, &self.server)
            .arg("-detached")
            .output()
            .expect("run rabbitmq-server");
        assert!(
            out.status.success(),
            "rabbitmq-server -detached failed for node{}: {}{}",
            i + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Wait until node `i` has started (its pid file written, its applications up).
    fn await_node(&self, i: usize) {
        let pid_file = self.nodes[i].dir.join("pid").to_string_lossy().into_owned();
        self.ctl_ok(i, &["wait", "--timeout", "120", &pid_file]);
        self.ctl_ok(i, &["await_startup", "--timeout", "120"]);
    }

    /// `rabbitmqctl -n <node i> args…`: its output, or why it failed.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(i, &self.ctl)
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "rabbitmqctl -n node{} {args:?} failed ({}): {stdout}{}",
                i + 1,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `rabbitmqctl -n <node i> args…`, which must succeed.
    #[track_caller]
    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> String {
        self.ctl(i, args)
            .unwrap_or_else(|e| panic!("{e}\n(node logs in {})", self.nodes[i].dir.display()))
    }

    /// The nodes running in the cluster, as node `i` sees them.
    pub fn running_nodes(&self, i: usize) -> Vec<String> {
        let text = self.ctl_ok(i, &["eval", "rabbit_nodes:all_running()."]);
        node_list(&text)
    }

    /// Did a node log that the at-least-once dead-letter worker of the quorum queue `queue`
    /// could not start? RabbitMQ 3.10 elects a queue's leader on a node still booting, before
    /// its `rabbit_fifo_dlx_sup` runs ("Leader monitor down with {noproc, … rabbit_fifo_dlx_sup
    /// …}"): the queue's expired messages then stay in it.
    pub fn dead_letter_worker_failed(&self, queue: &str) -> bool {
        let needle = format!("queue '{queue}'");
        self.nodes.iter().any(|n| {
            let Ok(entries) = std::fs::read_dir(n.dir.join("log")) else {
                return false;
            };
            entries.flatten().any(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|log| {
                    log.lines().any(|l| {
                        l.contains(&needle)
                            && l.contains("rabbit_fifo_dlx_sup")
                            && l.contains("noproc")
                    })
                })
            })
        })
    }

    /// Every queue whose name starts with `prefix`, as node `i` lists them.
    pub fn queues(&self, i: usize, prefix: &str) -> Vec<QueueInfo> {
        let text = self.ctl_ok(
            i,
            &[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "type",
                "members",
                "leader",
                "messages_ready",
                "messages_unacknowledged",
            ],
        );
        let mut queues = Vec::new();
        for line in text.lines() {
            if let [name, kind, members, leader, ready, unacked] =
                line.split('\t').collect::<Vec<_>>()[..]
                && name.starts_with(prefix)
            {
                let n = |s: &str| s.trim().parse().unwrap_or(u64::MAX);
                queues.push(QueueInfo {
                    name: name.to_owned(),
                    kind: kind.trim().to_owned(),
                    members: node_list(members),
                    leader: leader.trim().to_owned(),
                    ready: n(ready),
                    unacked: n(unacked),
                });
            }
        }
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        queues
    }

    fn pid(&self, i: usize) -> Option<u32> {
        std::fs::read_to_string(self.nodes[i].dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Stop node `i` entirely (`rabbitmqctl stop`: the Erlang VM exits) and wait until its
    /// process is gone; how long that took.
    pub fn stop_node(&self, i: usize) -> Duration {
        let started = Instant::now();
        // Read first: the node removes its pid file as it stops.
        let pid = self.pid(i);
        self.ctl_ok(i, &["stop"]);
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Path::new(&format!("/proc/{pid}")).exists() {
                assert!(
                    Instant::now() < deadline,
                    "node{} (pid {pid}) still runs 60 s after `rabbitmqctl stop`",
                    i + 1
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        started.elapsed()
    }

    /// Start node `i` again (after [`Cluster::stop_node`]) and wait until it runs in the
    /// cluster again; how long that took.
    pub fn start_node(&self, i: usize) -> Duration {
        let started = Instant::now();
        self.launch(i);
        self.await_node(i);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.running_nodes(0).contains(&self.nodes[i].name) {
            assert!(
                Instant::now() < deadline,
                "node{} started but is not back in the cluster: {:?}",
                i + 1,
                self.running_nodes(0)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        started.elapsed()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut failed = Vec::new();
        // Last joined first; each may already be stopped (a failed test mid-drill).
        for i in (0..NODES).rev() {
            let pid = self.pid(i);
            let stopped = self.ctl(i, &["stop"]);
            if let Some(pid) = pid {
                let deadline = Instant::now() + Duration::from_secs(30);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                if stopped.is_err() {
                    failed.push(format!("node{}: {stopped:?}", i + 1));
                }
            }
        }
        if std::thread::panicking() || !failed.is_empty() {
            eprintln!(
                "private cluster stopped ({failed:?}); its files are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
