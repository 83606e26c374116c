//! CPU time spent by this process and by the broker (Linux `/proc`, nanoseconds summed over
//! every thread), so that a scenario's CPU per message can be set against a baseline's in the
//! same run: on a machine whose two cores the broker shares with the consumer, CPU spent is
//! both steadier than wall time and what the latency tail waits for.

use std::path::Path;

/// CPU consumed so far: this process's threads, and the broker's (when it runs on this machine
/// and its process can be read).
#[derive(Clone, Copy)]
pub struct Cpu {
    own: Sched,
    broker_ns: Option<u64>,
    broker: Option<u32>,
}

/// CPU per message between two readings, in microseconds.
pub struct PerMsg {
    pub own_us: f64,
    pub broker_us: Option<f64>,
    /// Times this process's threads were put on a core (woken or resumed), per message.
    pub own_slices: f64,
    /// Time this process's threads waited, runnable, for a core, per message, in microseconds.
    pub own_wait_us: f64,
}

/// A thread group's `schedstat`, summed over its threads.
#[derive(Clone, Copy, Default)]
struct Sched {
    /// On a core, ns.
    run_ns: u64,
    /// Runnable, waiting for a core, ns.
    wait_ns: u64,
    /// Times put on a core.
    slices: u64,
}

impl Cpu {
    /// Read the counters now; `broker` is the broker's process ([`listener_pid`]), if known.
    pub fn now(broker: Option<u32>) -> Self {
        Self {
            own: threads(Path::new("/proc/self/task")).unwrap_or_default(),
            broker_ns: broker
                .and_then(|pid| threads(&Path::new("/proc").join(pid.to_string()).join("task")))
                .map(|s| s.run_ns),
            broker,
        }
    }

    /// CPU per message spent since `self`, for `n` messages.
    pub fn per_msg(self, n: usize) -> PerMsg {
        let later = Self::now(self.broker);
        let n = n.max(1) as f64;
        PerMsg {
            own_us: later.own.run_ns.saturating_sub(self.own.run_ns) as f64 / 1e3 / n,
            own_slices: later.own.slices.saturating_sub(self.own.slices) as f64 / n,
            own_wait_us: later.own.wait_ns.saturating_sub(self.own.wait_ns) as f64 / 1e3 / n,
            broker_us: match (self.broker_ns, later.broker_ns) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e3 / n),
                _ => None,
            },
        }
    }
}

/// The `schedstat` of every thread under `tasks` (a `/proc/<pid>/task` directory), summed: run
/// time, wait for a core (ns) and times put on a core. Threads that ended meanwhile are not
/// counted (the bench's threads live for the whole run).
fn threads(tasks: &Path) -> Option<Sched> {
    let mut total = Sched::default();
    for entry in std::fs::read_dir(tasks).ok()? {
        let Ok(entry) = entry else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let mut f = stat
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        total.run_ns += f.next().unwrap_or(0);
        total.wait_ns += f.next().unwrap_or(0);
        total.slices += f.next().unwrap_or(0);
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
