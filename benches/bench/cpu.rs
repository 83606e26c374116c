//! CPU time spent by this process and by the broker (Linux `/proc`, nanoseconds summed over
//! every thread), so that a scenario's CPU per message can be set against a baseline's in the
//! same run: on a machine whose two cores the broker shares with the consumer, CPU spent is
//! both steadier than wall time and what the latency tail waits for.

use std::path::Path;

/// CPU consumed so far: this process's threads, and the broker's (when it runs on this machine
/// and its process can be read).
#[derive(Clone, Copy)]
pub struct Cpu {
    own_ns: u64,
    broker_ns: Option<u64>,
    broker: Option<u32>,
}

/// CPU per message between two readings, in microseconds.
pub struct PerMsg {
    pub own_us: f64,
    pub broker_us: Option<f64>,
}

impl Cpu {
    /// Read the counters now; `broker` is the broker's process ([`listener_pid`]), if known.
    pub fn now(broker: Option<u32>) -> Self {
        Self {
            own_ns: threads_ns(Path::new("/proc/self/task")).unwrap_or(0),
            broker_ns: broker
                .and_then(|pid| threads_ns(&Path::new("/proc").join(pid.to_string()).join("task"))),
            broker,
        }
    }

    /// CPU per message spent since `self`, for `n` messages.
    pub fn per_msg(self, n: usize) -> PerMsg {
        let later = Self::now(self.broker);
        let n = n.max(1) as f64;
        PerMsg {
            own_us: later.own_ns.saturating_sub(self.own_ns) as f64 / 1e3 / n,
            broker_us: match (self.broker_ns, later.broker_ns) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e3 / n),
                _ => None,
            },
        }
    }
}

/// The run time of every thread under `tasks` (a `/proc/<pid>/task` directory), in ns: the
/// first field of each thread's `schedstat`. Threads that ended meanwhile are not counted (the
/// bench's threads live for the whole run).
fn threads_ns(tasks: &Path) -> Option<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(tasks).ok()? {
        let Ok(entry) = entry else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// The process listening on `port` on this machine (the broker under test), if any.
pub fn listener_pid(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let local_port = f.get(1)?.rsplit(':').next()?;
                let listening = f.get(3) == Some(&"0A");
                (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                    .then(|| f.get(9).map(|s| (*s).to_owned()))
                    .flatten()
            })
        })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}
