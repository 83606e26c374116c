//! `prereq`: list a dead-letter queue by reason, and replay chosen dead letters to where they
//! were first published. The work is done by `prereq::amqp::replay`; this is its command line.
//! See `docs/replay.md`.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use prereq::amqp::replay::{
    self, DeadLetterQueue, DeadMessage, KeyPath, Outcome, Progress, ReplayOptions, ReplayReport,
    Selection, StopSignal, Target,
};
use prereq::amqp::{AmqpAddr, Tls};

/// Exit code: some selected messages were skipped or failed (they stay in the queue).
const EXIT_NOT_ALL_REPLAYED: u8 = 3;
/// Exit code: stopped by Ctrl-C (after the message in progress).
const EXIT_INTERRUPTED: u8 = 130;
/// A delivery count from which the listing warns (RabbitMQ 4.0+ defaults to a limit of 20).
const DELIVERY_COUNT_WARNING: i64 = 10;
/// How many skipped or failed messages the replay report names.
const REPORT_LINES: usize = 20;

#[derive(Parser, Debug)]
#[command(
    name = "prereq",
    version,
    about = "Dead-letter tools for prereq consumers: list a dead-letter queue by reason, replay \
             chosen messages to their original exchange and routing key.",
    after_help = "Exit codes: 0 done; 1 error; 2 bad arguments; 3 some selected messages were \
                  skipped or failed (they stay in the queue); 130 interrupted by Ctrl-C.\n\
                  Reading returns every message it does not replay once per run: on a quorum \
                  queue that raises its delivery count (see docs/replay.md).\n\
                  TLS (amqps://): the system's roots, and AMQP_TLS_CA_FILE (a PEM authority \
                  to trust as well); AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE, a client \
                  certificate and its key (PEM), for a broker that asks for one."
)]
struct Cli {
    /// Broker address [default: $AMQP_ADDR, else amqp://guest:guest@127.0.0.1:5672/%2f].
    /// Prefer AMQP_ADDR: a password on the command line shows in the process list.
    #[arg(long, global = true, value_name = "URI")]
    addr: Option<String>,
    /// Deadline for connecting and for each broker operation, in seconds.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sum a dead-letter queue up by reason (optionally message by message); changes nothing.
    List(ListArgs),
    /// Re-publish chosen dead letters to their original exchange and routing key, attempts
    /// reset; each dead letter is acknowledged only once its copy is confirmed.
    Replay(ReplayArgs),
}

#[derive(Args, Debug)]
struct Filter {
    /// The dead-letter queue, e.g. payment-processor.dead.
    queue: String,
    /// Only this reason kind (undecodable, rejected, key-never-arrived, retries-exhausted;
    /// "(none)" for messages without one). Repeatable.
    #[arg(long = "kind", value_name = "KIND")]
    kinds: Vec<String>,
    /// Only the message with this message id. Repeatable.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
    /// The JSON field of the body that holds the key, e.g. clientId (a dotted path for a
    /// nested field: client.id).
    #[arg(long, value_name = "FIELD")]
    key_field: Option<KeyPath>,
    /// Only messages whose key field holds this value. Repeatable.
    #[arg(long = "key", value_name = "VALUE", requires = "key_field")]
    keys: Vec<String>,
    /// Act on at most N of the selected messages.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

impl Filter {
    fn selection(&self) -> Selection {
        let mut s = Selection::all();
        for k in &self.kinds {
            s = s.kind(k.clone());
        }
        for id in &self.ids {
            s = s.id(id.clone());
        }
        if let Some(path) = &self.key_field {
            s = if self.keys.is_empty() {
                s.key_field(path.clone())
            } else {
                s.keys(path.clone(), self.keys.iter().cloned())
            };
        }
        if let Some(n) = self.limit {
            s = s.limit(n);
        }
        s
    }
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    filter: Filter,
    /// Also one line per message: id, key (with --key-field), reason.
    #[arg(long)]
    messages: bool,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    #[command(flatten)]
    filter: Filter,
    /// Replay every message (needed when no --kind, --id or --key narrows the choice).
    #[arg(long, conflicts_with_all = ["kinds", "ids", "keys"])]
    all: bool,
    /// Say what would be done; publish and acknowledge nothing.
    #[arg(long)]
    dry_run: bool,
    /// Messages without origin headers go to this exchange ("" for the default exchange)
    /// instead of being skipped.
    #[arg(long, value_name = "EXCHANGE", requires = "routing_key")]
    to_exchange: Option<String>,
    /// The routing key that goes with --to-exchange.
    #[arg(long, value_name = "KEY", requires = "to_exchange")]
    routing_key: Option<String>,
    /// At most N copies per second (not to flood the service).
    #[arg(long, value_name = "N")]
    rate: Option<f64>,
    /// One line per replayed, skipped or failed message.
    #[arg(short, long)]
    verbose: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let addr = cli
        .addr
        .as_deref()
        .map(AmqpAddr::new)
        .unwrap_or_else(AmqpAddr::from_env);
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let result = match &cli.command {
        Command::List(args) => list(&addr, timeout, args).await,
        Command::Replay(args) => run_replay(&addr, timeout, args).await,
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "error: {}", addr.scrub(&message));
            ExitCode::FAILURE
        }
    }
}

fn progress_bar(total: usize) -> ProgressBar {
    // Drawn on stderr, and only when it is a terminal.
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

async fn list(addr: &AmqpAddr, timeout: Duration, args: &ListArgs) -> Result<ExitCode, String> {
    let dlq = DeadLetterQueue::new(addr.clone(), &args.filter.queue)
        .with_timeout(timeout)
        .tls(Tls::from_env());
    let selection = args.filter.selection();
    let mut bar: Option<ProgressBar> = None;
    let listing = replay::list(&dlq, &selection, args.messages, |p: Progress<'_>| {
        bar.get_or_insert_with(|| progress_bar(p.total))
            .set_position(p.done as u64);
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let mut out = String::new();
    let narrowed = if selection.is_all() && selection.max().is_none() {
        String::new()
    } else {
        let n: usize = listing.by_kind.values().map(|s| s.count).sum();
        format!(", {n} selected")
    };
    out.push_str(&format!(
        "{} on {addr}: {} ready, {} read{narrowed}, all given back\n\n",
        dlq.queue(),
        listing.ready_at_start,
        listing.read,
    ));
    let mut rows = vec![row([
        "REASON",
        "COUNT",
        "OLDEST",
        "NEWEST",
        "SAMPLE REASON",
    ])];
    let mut total = 0;
    let mut max_delivery = None::<i64>;
    for (kind, s) in &listing.by_kind {
        total += s.count;
        max_delivery = max_delivery.max(s.max_delivery_count);
        rows.push(vec![
            kind.clone(),
            s.count.to_string(),
            time(s.oldest_ms),
            time(s.newest_ms),
            clip(s.sample_reason.as_deref().unwrap_or("-"), 70),
        ]);
    }
    rows.push(vec![
        "total".into(),
        total.to_string(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    out.push_str(&table(&rows, &[false, true, false, false, false]));

    if args.messages && !listing.messages.is_empty() {
        out.push('\n');
        let mut rows = vec![row([
            "ID",
            "KEY",
            "REASON",
            "ATTEMPTS",
            "DEAD-LETTERED",
            "TEXT",
        ])];
        for m in &listing.messages {
            rows.push(vec![
                m.message_id.clone().unwrap_or_else(|| "-".into()),
                match &m.key {
                    None => "-".into(),
                    Some(Ok(k)) => clip(k, 30),
                    Some(Err(_)) => "(unreadable)".into(),
                },
                m.kind.clone(),
                m.attempts.map_or("-".into(), |a| a.to_string()),
                time(m.dead_lettered_at_ms),
                clip(m.reason.as_deref().unwrap_or("-"), 70),
            ]);
        }
        out.push_str(&table(&rows, &[false, false, false, true, false, false]));
    }
    if let Some((first, reason)) = listing.unreadable.first() {
        out.push_str(&format!(
            "\n{} message(s) not selected because their key could not be read, e.g. {}: {reason}\n",
            listing.unreadable.len(),
            first
                .message_id
                .as_deref()
                .unwrap_or("a message without id"),
        ));
    }
    if let Some(c) = max_delivery
        && c >= DELIVERY_COUNT_WARNING
    {
        out.push_str(&format!(
            "\nnote: a message here was already given back {c} times (x-delivery-count). On \
             RabbitMQ 4.0+ a quorum queue drops a message past its delivery limit (20 by \
             default), and every listing gives each message back once.\n"
        ));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

async fn run_replay(
    addr: &AmqpAddr,
    timeout: Duration,
    args: &ReplayArgs,
) -> Result<ExitCode, String> {
    let selection = args.filter.selection();
    if selection.is_all() && !args.all {
        return Err(
            "choose what to replay: --kind, --id, --key-field with --key, or --all".to_owned(),
        );
    }
    let dlq = DeadLetterQueue::new(addr.clone(), &args.filter.queue)
        .with_timeout(timeout)
        .tls(Tls::from_env());
    if args.dry_run {
        println!("DRY RUN: nothing will be published or acknowledged");
    }
    let stop = StopSignal::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            signal.stop();
            let _ = writeln!(
                std::io::stderr(),
                "stopping after the message in progress (Ctrl-C again quits at once; nothing \
                 is lost either way)"
            );
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(i32::from(EXIT_INTERRUPTED));
            }
        }
    });
    let options = ReplayOptions {
        dry_run: args.dry_run,
        fallback: match (&args.to_exchange, &args.routing_key) {
            (Some(exchange), Some(routing_key)) => Some(Target {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
            }),
            _ => None,
        },
        rate: args.rate,
        stop,
    };
    let verbose = args.verbose;
    let mut bar: Option<ProgressBar> = None;
    let report = replay::replay(&dlq, &selection, &options, |p: Progress<'_>| {
        let bar = bar.get_or_insert_with(|| progress_bar(p.total));
        bar.set_position(p.done as u64);
        if verbose && let Some(line) = outcome_line(p.message, p.outcome) {
            // Above the bar when there is one; plain stdout otherwise.
            bar.suspend(|| println!("{line}"));
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print!("{}", report_text(dlq.queue(), addr, &report));
    let total = report.total();
    Ok(if let Some(error) = &report.aborted {
        let _ = writeln!(
            std::io::stderr(),
            "error: {} (nothing is lost: what was not acknowledged is back in the queue)",
            addr.scrub(error)
        );
        ExitCode::FAILURE
    } else if report.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if total.skipped + total.failed > 0 {
        ExitCode::from(EXIT_NOT_ALL_REPLAYED)
    } else {
        ExitCode::SUCCESS
    })
}

fn who(m: &DeadMessage) -> String {
    format!(
        "{} ({})",
        m.message_id.as_deref().unwrap_or("<no id>"),
        m.kind
    )
}

fn outcome_line(m: &DeadMessage, outcome: &Outcome) -> Option<String> {
    Some(match outcome {
        Outcome::Replayed(t) => format!("replayed {} -> {t}", who(m)),
        Outcome::WouldReplay(t) => format!("would replay {} -> {t}", who(m)),
        Outcome::Skipped(why) => format!("skipped {}: {why}", who(m)),
        Outcome::Failed(why) => format!("failed {}: {why}", who(m)),
        Outcome::Left | Outcome::Listed => return None,
    })
}

fn report_text(queue: &str, addr: &AmqpAddr, report: &ReplayReport) -> String {
    let mut out = String::new();
    if report.dry_run {
        out.push_str("DRY RUN: nothing was published or acknowledged\n");
    }
    out.push_str(&format!(
        "replay from {queue} on {addr}: {} ready at start, {} read\n\n",
        report.ready_at_start, report.read
    ));
    let replayed = if report.dry_run {
        "WOULD REPLAY"
    } else {
        "REPLAYED"
    };
    let mut rows = vec![row(["REASON", replayed, "SKIPPED", "FAILED", "LEFT"])];
    for (kind, t) in &report.by_kind {
        rows.push(vec![
            kind.clone(),
            t.replayed.to_string(),
            t.skipped.to_string(),
            t.failed.to_string(),
            t.left.to_string(),
        ]);
    }
    let t = report.total();
    rows.push(vec![
        "total".into(),
        t.replayed.to_string(),
        t.skipped.to_string(),
        t.failed.to_string(),
        t.left.to_string(),
    ]);
    out.push_str(&table(&rows, &[false, true, true, true, true]));
    if !report.not_replayed.is_empty() {
        out.push_str("\nnot replayed (still in the queue):\n");
        for (m, outcome) in report.not_replayed.iter().take(REPORT_LINES) {
            if let Some(line) = outcome_line(m, outcome) {
                out.push_str(&format!("  {line}\n"));
            }
        }
        if report.not_replayed.len() > REPORT_LINES {
            out.push_str(&format!(
                "  … and {} more (run with --verbose to see every one)\n",
                report.not_replayed.len() - REPORT_LINES
            ));
        }
    }
    if report.interrupted {
        out.push_str(&format!(
            "\ninterrupted: stopped after the message in progress; {} message(s) not read are \
             still in the queue\n",
            report.ready_at_start.saturating_sub(report.read)
        ));
    }
    out
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Columns padded to their widest cell; `right[i]` aligns column `i` to the right.
fn table(rows: &[Vec<String>], right: &[bool]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c > 0 {
                line.push_str("  ");
            }
            if right.get(c).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if c + 1 < r.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// At most `max` characters, with `…` when cut; control characters shown as spaces.
fn clip(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= max {
        clean
    } else {
        let mut cut: String = clean.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SSZ` (UTC); `-` when absent.
fn time(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "-".to_owned();
    };
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(time(None), "-");
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00Z");
        assert_eq!(time(Some(951_782_400_000)), "2000-02-29 00:00:00Z");
        assert_eq!(time(Some(1_714_564_800_123)), "2024-05-01 12:00:00Z");
        assert_eq!(time(Some(4_102_444_799_000)), "2099-12-31 23:59:59Z");
    }

    #[test]
    fn clipping_marks_the_cut_and_hides_control_characters() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdefghij", 5), "abcd…");
        assert_eq!(clip("a\nb", 10), "a b");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &[row(["A", "N"]), row(["long name", "7"]), row(["x", "123"])],
            &[false, true],
        );
        assert_eq!(t, "A            N\nlong name    7\nx          123\n");
    }

    #[test]
    fn arguments_parse() {
        let cli = Cli::try_parse_from([
            "prereq",
            "replay",
            "q.dead",
            "--key-field",
            "client.id",
            "--key",
            "5",
            "--key",
            "6",
            "--dry-run",
        ])
        .expect("parse");
        let Command::Replay(args) = cli.command else {
            panic!("replay expected");
        };
        assert!(args.dry_run);
        assert!(!args.filter.selection().is_all());
        // --key without --key-field, --all with a filter, half a fallback target: refused.
        for bad in [
            &["prereq", "replay", "q", "--key", "5"][..],
            &["prereq", "replay", "q", "--all", "--kind", "rejected"],
            &["prereq", "replay", "q", "--all", "--to-exchange", "x"],
            &["prereq", "list", "q", "--key-field", "a..b"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
