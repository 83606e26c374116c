//! The `prereq` command (feature `cli`) as a user runs it, against a real broker: killed with
//! SIGKILL mid-replay it loses nothing; Ctrl-C stops it cleanly after the message in progress;
//! `list` and `--dry-run` change nothing; errors are clear and never show the password.
#![cfg(feature = "cli")]

mod replay_support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use replay_support::{
    Fixture, SlowProxy, assert_empty, counts, ids, mixed, sorted, take_all, take_exactly,
    wait_no_consumers, wait_ready,
};

const BIN: &str = env!("CARGO_BIN_EXE_prereq");

fn command(args: &[&str]) -> Command {
    command_to(args, replay_support::addr().expose())
}

fn command_to(args: &[&str], addr: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("AMQP_ADDR", addr).stdin(Stdio::null());
    cmd
}

/// Run to the end (at most 120 s) and return the output.
fn run(args: &[&str]) -> Output {
    let mut child = command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn prereq");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("prereq {args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `prereq` whose stdout lines arrive on a channel; killed when dropped.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(args: &[&str], addr: &str) -> Self {
        let mut child = command_to(args, addr)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn prereq");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait until `n` lines starting with `prefix` were printed (the process must still run).
    fn wait_lines(&mut self, prefix: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.seen.iter().filter(|l| l.starts_with(prefix)).count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "waiting for {n} {prefix:?} lines: {e}; seen {:?}",
                    self.seen
                ),
            }
        }
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "prereq finished before it could be interrupted; raise the message count or \
             lower --rate"
        );
    }

    /// Every line printed until the process closed its stdout.
    fn rest(&mut self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.seen.clone(),
                Err(e) => panic!("stdout not closed within 60 s: {e}"),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name}");
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "prereq did not exit within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The message id of a `replayed <id> (<kind>) -> …` line.
fn replayed_id(line: &str) -> Option<String> {
    let rest = line.strip_prefix("replayed ")?;
    Some(rest.split(' ').next()?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_replay_it_loses_nothing() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    // Paced at 10 ms a message: the kills land at 0–8 ms into a message's cycle (reading,
    // waiting for its turn, publishing, confirming, acknowledging).
    let offsets = [0, 2_000, 4_000, 6_000, 8_000];
    let addr = replay_support::addr().expose().to_owned();
    kill_rounds(&conn, "cli-kill", 200, &["--rate", "100"], &offsets, &addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_waiting_for_confirms_it_loses_nothing() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    // Everything the broker sends arrives 20 ms late: a message's cycle is about 40 ms, half
    // of it waiting for its `basic.get` answer, half for its confirm. The kills land across
    // it; one landing in a confirm's wait leaves a stored copy whose dead letter is not
    // acknowledged: a duplicate, never a loss.
    let uri = replay_support::addr().expose().to_owned();
    let proxy = SlowProxy::start(SlowProxy::target_of(&uri), Duration::from_millis(20)).await;
    let offsets: Vec<u64> = (0..10).map(|i| i * 5_000).collect();
    let through = proxy.uri(&uri);
    kill_rounds(&conn, "cli-kill-slow", 200, &[], &offsets, &through).await;
}

/// Dead-letter `n` messages; then, once per offset, start a replay of all of them and SIGKILL
/// it `offset` µs after it reported its 3rd message. Then every id must be at the origin or
/// still in the dead-letter queue; duplicates (a copy confirmed whose dead letter was not
/// acknowledged yet) are counted: at most one per kill.
async fn kill_rounds(
    conn: &lapin::Connection,
    tag: &str,
    n: usize,
    extra: &[&str],
    offsets_us: &[u64],
    addr: &str,
) {
    let f = Fixture::new(conn, tag).await;
    let letters = mixed(tag, n);
    f.dead_letters(&letters).await;
    let all: BTreeSet<String> = letters.iter().map(|d| d.id.clone()).collect();

    let mut args = vec!["replay", f.dlq.as_str(), "--all", "--verbose"];
    args.extend_from_slice(extra);
    let mut reported = BTreeSet::new();
    for offset in offsets_us {
        // The previous round's reader is gone, and what it held is back.
        wait_no_consumers(&f.ch, &f.dlq).await;
        // Blocking waits, off the runtime's workers (a proxy may run on them).
        tokio::task::block_in_place(|| {
            let mut child = Running::spawn(&args, addr);
            child.wait_lines("replayed ", 3);
            // Not a synchronisation: it only chooses where in the cycle of the next message
            // the kill lands; the checks below hold wherever it lands.
            std::thread::sleep(Duration::from_micros(*offset));
            child.child.kill().expect("SIGKILL");
            let status = child.wait_exit();
            assert!(!status.success(), "killed: {status}");
            reported.extend(child.rest().iter().filter_map(|l| replayed_id(l)));
        });
    }
    assert!(reported.len() < n, "{} of {n} reported", reported.len());

    // Every id comes back to one of the two queues (the broker returns what a killed process
    // held when it sees its connection gone).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut work, mut dead) = (Vec::new(), Vec::new());
    loop {
        work.extend(take_all(&f.ch, &f.work).await);
        dead.extend(take_all(&f.ch, &f.dlq).await);
        let seen: BTreeSet<String> = ids(&work).into_iter().chain(ids(&dead)).collect();
        if seen == all {
            break;
        }
        let missing: Vec<&String> = all.difference(&seen).collect();
        assert!(
            Instant::now() < deadline,
            "lost after a SIGKILL: {missing:?} ({} at the origin, {} still dead)",
            work.len(),
            dead.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replayed: BTreeSet<String> = ids(&work).into_iter().collect();
    assert!(
        reported.is_subset(&replayed),
        "every id reported as replayed is at the origin"
    );
    let dead_ids: BTreeSet<String> = ids(&dead).into_iter().collect();
    assert_eq!(dead_ids.len(), dead.len(), "each dead letter once");
    let duplicated: Vec<String> = counts(ids(&work).iter().map(String::as_str))
        .into_iter()
        .filter(|(_, k)| *k > 1)
        .map(|(id, _)| id)
        .chain(replayed.intersection(&dead_ids).cloned())
        .collect();
    println!(
        "{} kills: {} ids at the origin ({} copies), {} still dead-lettered, {} duplicated: \
         {duplicated:?}",
        offsets_us.len(),
        replayed.len(),
        work.len(),
        dead_ids.len(),
        duplicated.len()
    );
    assert!(
        duplicated.len() <= offsets_us.len(),
        "at most the message in progress at each kill: {duplicated:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_after_the_message_in_progress() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    let f = Fixture::new(&conn, "cli-int").await;
    let letters = mixed("int", 200);
    f.dead_letters(&letters).await;

    let mut child = Running::spawn(
        &["replay", &f.dlq, "--all", "--rate", "100", "--verbose"],
        replay_support::addr().expose(),
    );
    child.wait_lines("replayed ", 10);
    child.signal("INT");
    let status = child.wait_exit();
    let lines = child.rest();
    assert_eq!(status.code(), Some(130), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.starts_with("interrupted:")),
        "{lines:#?}"
    );
    let reported: Vec<String> = lines.iter().filter_map(|l| replayed_id(l)).collect();
    let total = lines
        .iter()
        .find(|l| l.starts_with("total "))
        .expect("summary table");
    let cells: Vec<&str> = total.split_whitespace().collect();
    assert_eq!(cells[1], reported.len().to_string(), "{total}");

    // A clean stop: exactly what it reported is at the origin, the rest is still dead, and
    // nothing is in both.
    let work = take_exactly(&f.ch, &f.work, reported.len()).await;
    assert_eq!(sorted(ids(&work)), sorted(reported.clone()));
    let dead = take_exactly(&f.ch, &f.dlq, 200 - reported.len()).await;
    let expected: Vec<String> = letters
        .iter()
        .map(|d| d.id.clone())
        .filter(|id| !reported.contains(id))
        .collect();
    assert_eq!(sorted(ids(&dead)), sorted(expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_dry_run_print_tables_and_change_nothing() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    let f = Fixture::new(&conn, "cli-list").await;
    let letters = mixed("list", 12);
    f.dead_letters(&letters).await;

    let out = run(&["list", &f.dlq, "--messages", "--key-field", "clientId"]);
    let (stdout, stderr) = text(&out);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("12 ready, 12 read"), "{stdout}");
    for kind in [
        "key-never-arrived",
        "retries-exhausted",
        "rejected",
        "undecodable",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(kind))
            .unwrap_or_else(|| panic!("no {kind} row in\n{stdout}"));
        assert_eq!(line.split_whitespace().nth(1), Some("3"), "{line}");
    }
    assert!(stdout.contains("2024-05-01 12:00:00Z"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("list-1 ") && l.contains(" 1 ")),
        "{stdout}"
    );
    assert!(stdout.contains("(unreadable)"), "{stdout}");
    assert!(!stdout.contains("guest:guest"), "{stdout}");
    wait_ready(&f.ch, &f.dlq, 12).await;

    let out = run(&["replay", &f.dlq, "--all", "--dry-run", "--verbose"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("DRY RUN"), "said first: {stdout}");
    assert!(
        stdout.contains("DRY RUN: nothing was published"),
        "and last: {stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("would replay "))
            .count(),
        12,
        "{stdout}"
    );
    assert!(stdout.contains("WOULD REPLAY"), "{stdout}");
    wait_ready(&f.ch, &f.dlq, 12).await;
    assert_eq!(replay_support::ready_count(&f.ch, &f.work).await, 0);

    // A real run of one kind: exit 0, the table counts it.
    let out = run(&["replay", &f.dlq, "--kind", "rejected"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let total = stdout
        .lines()
        .find(|l| l.starts_with("total "))
        .expect("summary");
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>(),
        ["total", "3", "0", "0", "9"]
    );
    let work = take_exactly(&f.ch, &f.work, 3).await;
    assert_eq!(
        sorted(ids(&work)),
        sorted(
            letters
                .iter()
                .filter(|d| d.kind == "rejected")
                .map(|d| d.id.clone())
                .collect()
        )
    );

    // Skipped messages (key unreadable) make the exit code 3.
    wait_ready(&f.ch, &f.dlq, 9).await;
    let out = run(&["replay", &f.dlq, "--key-field", "clientId", "--key", "1"]);
    let (stdout, stderr) = text(&out);
    println!("{stdout}");
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("body is not JSON"), "{stdout}");
    let replayed_now = letters
        .iter()
        .filter(|d| d.kind != "rejected" && d.kind != "undecodable" && d.client == 1)
        .count();
    assert_eq!(replayed_now, 2);
    take_exactly(&f.ch, &f.work, replayed_now).await;
    let left = take_exactly(&f.ch, &f.dlq, 9 - replayed_now).await;
    assert_eq!(left.len(), 9 - replayed_now);
    assert_empty(&f.ch, &f.work).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_clear_and_never_show_the_password() {
    let Some(_conn) = replay_support::broker().await else {
        return;
    };
    let missing = format!("{}missing.dead", replay_support::unique("cli-missing"));
    let out = run(&["list", &missing]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("does not exist"), "{stderr}");

    let out = run(&["replay", &missing]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("choose what to replay"), "{stderr}");

    let out = run(&["replay", &missing, "--key", "5"]);
    assert_eq!(out.status.code(), Some(2), "usage error");

    // A refused connection, with a password in the address: named, not shown.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let addr = format!("amqp://someone:Sup3rSecretPw@127.0.0.1:{port}/%2f");
    let out = run(&["--addr", &addr, "list", &missing]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(stderr.contains("someone:***@"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("Sup3rSecretPw"));

    // A server that never answers: the deadline ends the attempt.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let addr = format!("amqp://someone:Sup3rSecretPw@127.0.0.1:{port}/%2f");
    let out = run(&["--addr", &addr, "--timeout", "1", "list", &missing]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("no answer within"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("Sup3rSecretPw"));
    drop(silent);
}
