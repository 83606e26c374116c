//! Dead-letter listing and replay: read a dead-letter queue without losing anything, and
//! re-publish chosen dead letters to where they were first published, with their attempt
//! count reset.
//!
//! * [`list`] reads every message that is in the queue when it starts, sums them up by reason
//!   kind ([`headers::DEAD_LETTER_KIND`]) and gives every one of them back.
//! * [`replay`] re-publishes the messages a [`Selection`] picks to their original exchange and
//!   routing key ([`headers::ORIGINAL_EXCHANGE`], [`headers::ORIGINAL_ROUTING_KEY`]), with
//!   [`replay_headers`], and acknowledges a dead letter only once its copy is
//!   publisher-confirmed as routed (`mandatory`). Everything else is given back.
//! * [`DeadMessage::read`], [`Selection::matches`] and [`replay_headers`] are the pure parts,
//!   for a service that reads dead letters its own way.
//!
//! # Guarantees
//!
//! * Nothing is lost, whatever stops the run (Ctrl-C, `kill -9`, a dropped connection): a dead
//!   letter is acknowledged only after its copy was confirmed, and every message read but not
//!   replayed stays unacknowledged until the run ends, so the broker gives it back. The worst
//!   case is a duplicate: a copy confirmed whose dead letter was not acknowledged yet.
//! * A run reads at most the messages that were ready when it started (so a service that
//!   dead-letters a replayed message again cannot make a run endless), each at most once.
//! * Messages given back are returned **once per run**, all together, with `basic.nack`
//!   (`multiple`, `requeue`), and keep their order (when the process dies instead, the broker
//!   returns them itself, possibly in another order). On a quorum queue every return raises the
//!   message's delivery
//!   count (`x-delivery-count`); RabbitMQ 4.0+ sets a delivery limit of 20 on every quorum queue
//!   by default and drops (or dead-letters) a message beyond it, and from 4.3 `basic.nack` no
//!   longer counts. [`KindSummary::max_delivery_count`] shows how close a queue is.
//! * [`StopSignal::stop`] ends a run after the message in progress.
//!
//! ```no_run
//! use prereq::amqp::AmqpAddr;
//! use prereq::amqp::replay::{self, DeadLetterQueue, KeyPath, ReplayOptions, Selection};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dlq = DeadLetterQueue::new(AmqpAddr::from_env(), "payment-processor.dead");
//!
//! // What is in there, by reason.
//! let listing = replay::list(&dlq, &Selection::all(), false, |_| {}).await?;
//! for (kind, summary) in &listing.by_kind {
//!     println!("{kind}: {} ({:?})", summary.count, summary.sample_reason);
//! }
//!
//! // Replay the payments of client 5 whose client never arrived.
//! let selection = Selection::all()
//!     .kind("key-never-arrived")
//!     .keys(KeyPath::parse("clientId")?, ["5"]);
//! let report = replay::replay(&dlq, &selection, &ReplayOptions::default(), |p| {
//!     eprintln!("{}/{}: {:?}", p.done, p.total, p.outcome);
//! })
//! .await?;
//! println!("replayed {}", report.total().replayed);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::addr::AmqpAddr;
use super::connect::connect_once;
use super::error::AmqpError;
use super::headers::{self, get_int, get_str};
use super::settle::copy_properties;
use super::tls::Tls;

/// How long connecting, and each broker operation of a run, may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The kind shown for a dead letter without a readable [`headers::DEAD_LETTER_KIND`].
pub const NO_KIND: &str = "(none)";

/// Headers the broker adds when it dead-letters or redelivers a message; a replayed copy starts
/// without them. `x-first-death-*` and `x-last-death-*` are removed by prefix.
const BROKER_HISTORY: [&str; 2] = ["x-death", "x-delivery-count"];
const BROKER_HISTORY_PREFIXES: [&str; 2] = ["x-first-death-", "x-last-death-"];

/// What can stop a listing or a replay before it starts, or end it early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The broker could not be reached in time, or refused the connection.
    #[error("cannot connect to RabbitMQ at {addr}: {message}")]
    Connect {
        /// The address, credentials redacted.
        addr: String,
        /// What went wrong (credentials scrubbed).
        message: String,
    },
    /// The dead-letter queue does not exist.
    #[error(
        "queue {queue:?} does not exist (a service's dead-letter queue is named \
         \"<queue>.dead\", e.g. \"payment-processor.dead\")"
    )]
    QueueNotFound {
        /// The queue asked for.
        queue: String,
    },
    /// A broker operation failed or did not answer in time.
    #[error("{operation}: {message}")]
    Broker {
        /// What was being done.
        operation: String,
        /// What went wrong (credentials scrubbed).
        message: String,
    },
    /// A name or an argument is not usable.
    #[error("{0}")]
    Invalid(String),
}

/// The dead-letter queue to work on, and how long the broker may take.
#[derive(Clone, Debug)]
pub struct DeadLetterQueue {
    addr: AmqpAddr,
    queue: String,
    timeout: Duration,
    tls: Tls,
}

impl DeadLetterQueue {
    /// The queue `queue` (the dead-letter queue itself, e.g. `payment-processor.dead`) on the
    /// broker at `addr`.
    pub fn new(addr: AmqpAddr, queue: impl Into<String>) -> Self {
        Self {
            addr,
            queue: queue.into(),
            timeout: DEFAULT_TIMEOUT,
            tls: Tls::new(),
        }
    }

    /// TLS settings for an `amqps://` address (default: the system's roots, no client
    /// certificate). See [`Tls`].
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }

    /// The dead-letter queue of the service queue `queue`: `<queue>.dead`.
    pub fn of_queue(addr: AmqpAddr, queue: &str) -> Self {
        Self::new(addr, format!("{queue}.dead"))
    }

    /// The deadline of connecting and of each broker operation (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The broker's address.
    pub fn addr(&self) -> &AmqpAddr {
        &self.addr
    }
}

/// A field of a JSON body, named by a dotted path (`clientId`, `client.id`, `items.0.sku`: a
/// number indexes an array). The tool does not know a service's key function: this names the
/// field that holds the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPath {
    path: String,
    segments: Vec<String>,
}

impl KeyPath {
    /// Parse a dotted path; empty segments (`a..b`, a leading or trailing dot) are refused.
    pub fn parse(path: &str) -> Result<Self, ReplayError> {
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if path.is_empty() || segments.iter().any(String::is_empty) {
            return Err(ReplayError::Invalid(format!(
                "key field {path:?}: expected a field name or a dotted path such as client.id"
            )));
        }
        Ok(Self {
            path: path.to_owned(),
            segments,
        })
    }

    /// The key of `body`: the field's value as text (a string as is, a number or a boolean as
    /// written in JSON). An error says why there is none: the body is not JSON, the field is
    /// missing, or it holds null, an object or an array.
    pub fn read(&self, body: &[u8]) -> Result<String, String> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON ({e})"))?;
        let mut at = &value;
        for segment in &self.segments {
            let next = match at {
                serde_json::Value::Object(map) => map.get(segment),
                serde_json::Value::Array(items) => {
                    segment.parse::<usize>().ok().and_then(|i| items.get(i))
                }
                _ => None,
            };
            at = next.ok_or_else(|| format!("body has no field {:?}", self.path))?;
        }
        match at {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Number(n) => Ok(n.to_string()),
            serde_json::Value::Bool(b) => Ok(b.to_string()),
            serde_json::Value::Null => Err(format!("field {:?} is null", self.path)),
            serde_json::Value::Object(_) => {
                Err(format!("field {:?} is an object, not a key", self.path))
            }
            serde_json::Value::Array(_) => {
                Err(format!("field {:?} is an array, not a key", self.path))
            }
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

impl std::str::FromStr for KeyPath {
    type Err = ReplayError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What the tool reads of one dead letter (its body aside). Header values of an unexpected
/// type count as absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadMessage {
    /// The `message-id` property.
    pub message_id: Option<String>,
    /// [`headers::DEAD_LETTER_KIND`] (`undecodable`, `rejected`, `key-never-arrived`,
    /// `retries-exhausted`), or [`NO_KIND`].
    pub kind: String,
    /// [`headers::DEAD_LETTER_REASON`].
    pub reason: Option<String>,
    /// [`headers::ATTEMPTS`].
    pub attempts: Option<i64>,
    /// [`headers::ORIGINAL_EXCHANGE`].
    pub original_exchange: Option<String>,
    /// [`headers::ORIGINAL_ROUTING_KEY`].
    pub original_routing_key: Option<String>,
    /// [`headers::FIRST_SEEN`], ms since the Unix epoch.
    pub first_seen_ms: Option<i64>,
    /// [`headers::DEAD_LETTERED_AT`], ms since the Unix epoch.
    pub dead_lettered_at_ms: Option<i64>,
    /// [`headers::REPLAYED`]: how many times it was replayed before.
    pub replayed: Option<i64>,
    /// `x-delivery-count`: how many times a quorum queue gave it back so far.
    pub delivery_count: Option<i64>,
    /// The key, when a [`KeyPath`] was given: the text, or why there is none.
    pub key: Option<Result<String, String>>,
    /// The body's size in bytes.
    pub body_len: usize,
}

impl DeadMessage {
    /// Read a dead letter's properties and body; `key` names the JSON field holding the key.
    /// Never fails: what cannot be read is absent.
    pub fn read(properties: &BasicProperties, body: &[u8], key: Option<&KeyPath>) -> Self {
        let h = properties.headers().as_ref();
        Self {
            message_id: properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            kind: get_str(h, headers::DEAD_LETTER_KIND)
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| NO_KIND.to_owned()),
            reason: get_str(h, headers::DEAD_LETTER_REASON),
            attempts: get_int(h, headers::ATTEMPTS),
            original_exchange: get_str(h, headers::ORIGINAL_EXCHANGE),
            original_routing_key: get_str(h, headers::ORIGINAL_ROUTING_KEY),
            first_seen_ms: get_int(h, headers::FIRST_SEEN),
            dead_lettered_at_ms: get_int(h, headers::DEAD_LETTERED_AT),
            replayed: get_int(h, headers::REPLAYED),
            delivery_count: get_int(h, "x-delivery-count"),
            key: key.map(|k| k.read(body)),
            body_len: body.len(),
        }
    }

    /// The original exchange and routing key, when both headers are readable.
    pub fn origin(&self) -> Option<Target> {
        Some(Target {
            exchange: self.original_exchange.clone()?,
            routing_key: self.original_routing_key.clone()?,
        })
    }
}

/// Which dead letters a run is about. Criteria combine with AND; the values of one criterion
/// with OR. [`Selection::all`] (no criterion) picks everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    kinds: BTreeSet<String>,
    ids: BTreeSet<String>,
    key_path: Option<KeyPath>,
    keys: BTreeSet<String>,
    limit: Option<usize>,
}

/// How a [`Selection`] judges one dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// Picked.
    Selected,
    /// Not picked: left where it is.
    NotSelected,
    /// Picked by every other criterion, but its key cannot be read (the reason says why): left
    /// where it is and reported.
    Unreadable(String),
}

impl Selection {
    /// Every message.
    pub fn all() -> Self {
        Self::default()
    }

    /// Also accept dead letters of this kind (e.g. `key-never-arrived`; [`NO_KIND`] for those
    /// without the header).
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kinds.insert(kind.into());
        self
    }

    /// Also accept the message with this `message-id`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.ids.insert(id.into());
        self
    }

    /// Read keys from this field (shown by [`list`]) without filtering on them.
    pub fn key_field(mut self, path: KeyPath) -> Self {
        self.key_path = Some(path);
        self
    }

    /// Keep only messages whose field `path` holds one of `values`.
    pub fn keys(
        mut self,
        path: KeyPath,
        values: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.key_path = Some(path);
        self.keys.extend(values.into_iter().map(Into::into));
        self
    }

    /// Act on at most `n` selected messages (the rest are left).
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// True when nothing narrows the selection: every message is picked.
    pub fn is_all(&self) -> bool {
        self.kinds.is_empty() && self.ids.is_empty() && self.keys.is_empty()
    }

    /// The field keys are read from, if any.
    pub fn key_path(&self) -> Option<&KeyPath> {
        self.key_path.as_ref()
    }

    /// The limit set by [`Selection::limit`].
    pub fn max(&self) -> Option<usize> {
        self.limit
    }

    /// Judge one dead letter (the limit aside). `message.key` must have been read with
    /// [`Selection::key_path`] (as [`DeadMessage::read`] does when given it).
    pub fn matches(&self, message: &DeadMessage) -> Match {
        if !self.kinds.is_empty() && !self.kinds.contains(&message.kind) {
            return Match::NotSelected;
        }
        if !self.ids.is_empty()
            && !message
                .message_id
                .as_ref()
                .is_some_and(|id| self.ids.contains(id))
        {
            return Match::NotSelected;
        }
        if self.keys.is_empty() {
            return Match::Selected;
        }
        match &message.key {
            Some(Ok(key)) if self.keys.contains(key) => Match::Selected,
            Some(Ok(_)) => Match::NotSelected,
            Some(Err(reason)) => Match::Unreadable(reason.clone()),
            None => Match::Unreadable("its key was not read".to_owned()),
        }
    }
}

/// Where a replayed copy goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The exchange (`""`: the default exchange, the routing key names a queue).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.exchange.is_empty() {
            write!(f, "default exchange, key {:?}", self.routing_key)
        } else {
            write!(f, "{:?}, key {:?}", self.exchange, self.routing_key)
        }
    }
}

/// Ends a run after the message in progress; clones share one signal.
#[derive(Clone, Debug, Default)]
pub struct StopSignal(Arc<StopInner>);

#[derive(Debug, Default)]
struct StopInner {
    stopped: AtomicBool,
    notify: tokio::sync::Notify,
}

impl StopSignal {
    /// A signal not given yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the run to stop after the message in progress.
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// Whether [`StopSignal::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    /// Wait `d`, or less if the signal is given meanwhile.
    async fn pause(&self, d: Duration) {
        let notified = self.0.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_stopped() {
            return;
        }
        let _ = tokio::time::timeout(d, notified).await;
    }
}

/// How [`replay`] runs.
#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    /// Say what would be done; publish and acknowledge nothing.
    pub dry_run: bool,
    /// Where messages without origin headers go; without it they are skipped.
    pub fallback: Option<Target>,
    /// At most this many copies per second (e.g. not to flood a service); `None`: no limit.
    pub rate: Option<f64>,
    /// Ends the run after the message in progress.
    pub stop: StopSignal,
}

/// What happened to one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Listed (by [`list`]) and given back.
    Listed,
    /// Its copy was confirmed at the target and the dead letter acknowledged.
    Replayed(Target),
    /// Dry run: it would be replayed to the target.
    WouldReplay(Target),
    /// Not selected: left in the queue.
    Left,
    /// Selected but not replayed, for the reason given (no origin, unreadable key): left in
    /// the queue.
    Skipped(String),
    /// Selected, but the copy could not be stored (missing exchange, unroutable, nacked, no
    /// confirm in time): left in the queue. After a timeout the copy may exist all the same.
    Failed(String),
}

/// One step of a run, for a progress display.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Messages read so far (this one included).
    pub done: usize,
    /// Messages ready in the queue when the run started (the most it reads).
    pub total: usize,
    /// This message.
    pub message: &'a DeadMessage,
    /// What happened to it.
    pub outcome: &'a Outcome,
}

/// One reason kind in a [`Listing`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KindSummary {
    /// Messages of this kind.
    pub count: usize,
    /// The reason text of the first one that had one.
    pub sample_reason: Option<String>,
    /// The earliest [`DeadMessage::dead_lettered_at_ms`].
    pub oldest_ms: Option<i64>,
    /// The latest [`DeadMessage::dead_lettered_at_ms`].
    pub newest_ms: Option<i64>,
    /// The largest [`DeadMessage::delivery_count`] seen (before this listing's own return).
    pub max_delivery_count: Option<i64>,
}

impl KindSummary {
    fn add(&mut self, m: &DeadMessage) {
        self.count += 1;
        if self.sample_reason.is_none() {
            self.sample_reason.clone_from(&m.reason);
        }
        if let Some(at) = m.dead_lettered_at_ms {
            self.oldest_ms = Some(self.oldest_ms.map_or(at, |o| o.min(at)));
            self.newest_ms = Some(self.newest_ms.map_or(at, |n| n.max(at)));
        }
        if let Some(c) = m.delivery_count {
            self.max_delivery_count = Some(self.max_delivery_count.map_or(c, |x| x.max(c)));
        }
    }
}

/// What [`list`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Messages ready when the listing started.
    pub ready_at_start: usize,
    /// Messages read (all given back).
    pub read: usize,
    /// The selected messages, by kind.
    pub by_kind: BTreeMap<String, KindSummary>,
    /// The selected messages one by one, in queue order (when asked for).
    pub messages: Vec<DeadMessage>,
    /// Messages whose key could not be read under a key filter, with the reason.
    pub unreadable: Vec<(DeadMessage, String)>,
}

/// Counts of one reason kind in a [`ReplayReport`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Replayed (or, in a dry run, would be).
    pub replayed: usize,
    /// Selected but skipped.
    pub skipped: usize,
    /// Selected but failed.
    pub failed: usize,
    /// Not selected.
    pub left: usize,
}

impl Tally {
    fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Replayed(_) | Outcome::WouldReplay(_) => self.replayed += 1,
            Outcome::Skipped(_) => self.skipped += 1,
            Outcome::Failed(_) => self.failed += 1,
            Outcome::Left | Outcome::Listed => self.left += 1,
        }
    }

    fn plus(self, o: Self) -> Self {
        Self {
            replayed: self.replayed + o.replayed,
            skipped: self.skipped + o.skipped,
            failed: self.failed + o.failed,
            left: self.left + o.left,
        }
    }
}

/// What [`replay`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// A dry run: nothing was published or acknowledged.
    pub dry_run: bool,
    /// Messages ready when the run started.
    pub ready_at_start: usize,
    /// Messages read.
    pub read: usize,
    /// Counts by reason kind.
    pub by_kind: BTreeMap<String, Tally>,
    /// Every message skipped or failed, with its outcome (for the report).
    pub not_replayed: Vec<(DeadMessage, Outcome)>,
    /// Stopped by the [`StopSignal`] before reading everything.
    pub interrupted: bool,
    /// Ended early by a broker failure (what failed). Nothing is lost: every message not
    /// acknowledged goes back to the queue; a message whose copy was confirmed but whose
    /// acknowledgement failed is duplicated.
    pub aborted: Option<String>,
}

impl ReplayReport {
    /// The counts over every kind.
    pub fn total(&self) -> Tally {
        self.by_kind
            .values()
            .fold(Tally::default(), |a, b| a.plus(*b))
    }
}

/// The headers of a replayed copy: the dead letter's, without the dead-letter headers, prereq's
/// attempt count ([`headers::ATTEMPT`]) and the broker's history (`x-death`,
/// `x-first-death-*`, `x-last-death-*`, `x-delivery-count`); [`headers::RETRY`] set to 0 when
/// present; [`headers::DELAY`] set to 0 (a 32-bit integer) when the dead letter carries
/// [`headers::RETRY`] or [`headers::DELAY`]; [`headers::REPLAYED`] one more than before. The
/// origin, [`headers::FIRST_SEEN`], [`headers::RETRY_LIMIT`] and the service's own headers are
/// kept.
///
/// `x-delay: 0` is what a payment demo message starts with: the Go demo's consumer reads
/// `x-delay` as a required 32-bit integer (a copy without it crashes it), and on a
/// delayed-message exchange 0 means "now", so the copy is routed at once.
pub fn replay_headers(dead: Option<&FieldTable>) -> FieldTable {
    let replayed = get_int(dead, headers::REPLAYED).unwrap_or(0);
    let had_retry = dead.is_some_and(|h| h.contains_key(headers::RETRY));
    let had_delay = dead.is_some_and(|h| h.contains_key(headers::DELAY));
    let mut map = dead.map(|h| h.inner().clone()).unwrap_or_default();
    for name in [
        headers::DEAD_LETTER_KIND,
        headers::DEAD_LETTER_REASON,
        headers::LAST_ERROR,
        headers::ATTEMPTS,
        headers::DEAD_LETTERED_AT,
        headers::ATTEMPT,
        headers::DELAY,
        headers::COPY,
    ]
    .into_iter()
    .chain(BROKER_HISTORY)
    {
        map.remove(name);
    }
    map.retain(|name, _| {
        !BROKER_HISTORY_PREFIXES
            .iter()
            .any(|p| name.as_str().starts_with(p))
    });
    let mut h = FieldTable::from(map);
    if had_retry {
        h.insert(headers::RETRY.into(), AMQPValue::LongInt(0));
    }
    if had_retry || had_delay {
        h.insert(headers::DELAY.into(), AMQPValue::LongInt(0));
    }
    h.insert(
        headers::REPLAYED.into(),
        AMQPValue::LongInt(i32::try_from(replayed.saturating_add(1)).unwrap_or(i32::MAX)),
    );
    h
}

/// The properties of a replayed copy: the dead letter's metadata with `headers`, persistent;
/// without `expiration` (a copy must not vanish) and `user-id` (the broker refuses one that is
/// not the connection's).
pub fn replay_properties(p: &BasicProperties, headers: FieldTable) -> BasicProperties {
    // The same rules as every copy the transport publishes.
    copy_properties(p, headers)
}

/// Read every message of the queue (as of the start), sum the selected ones up by kind, and
/// give everything back (one return per message). `keep_messages` keeps each selected message
/// in [`Listing::messages`]. `progress` is called once per message.
pub async fn list(
    dlq: &DeadLetterQueue,
    selection: &Selection,
    keep_messages: bool,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Listing, ReplayError> {
    let mut session = Session::open(dlq).await?;
    let mut listing = Listing {
        ready_at_start: session.total,
        ..Listing::default()
    };
    let mut selected = 0usize;
    let result: Result<(), ReplayError> = async {
        while let Some((properties, body)) = session.next().await? {
            listing.read += 1;
            let message = DeadMessage::read(&properties, &body, selection.key_path());
            let outcome = match selection.matches(&message) {
                Match::Selected if selection.limit.is_none_or(|n| selected < n) => {
                    selected += 1;
                    Outcome::Listed
                }
                Match::Unreadable(reason) => {
                    listing.unreadable.push((message.clone(), reason.clone()));
                    Outcome::Skipped(reason)
                }
                _ => Outcome::Left,
            };
            progress(Progress {
                done: listing.read,
                total: listing.ready_at_start,
                message: &message,
                outcome: &outcome,
            });
            if outcome == Outcome::Listed {
                listing
                    .by_kind
                    .entry(message.kind.clone())
                    .or_default()
                    .add(&message);
                if keep_messages {
                    listing.messages.push(message);
                }
            }
        }
        Ok(())
    }
    .await;
    let finished = session.finish().await;
    result?;
    finished?;
    Ok(listing)
}

/// Re-publish the selected messages (of those ready when the run starts) to their origin, or
/// `options.fallback` for messages without one; acknowledge each dead letter once its copy is
/// confirmed as routed; give every other message back at the end (one return each).
///
/// Errors before the run starts (connection, missing queue) are returned as `Err`; a broker
/// failure during the run ends it with [`ReplayReport::aborted`] set.
pub async fn replay(
    dlq: &DeadLetterQueue,
    selection: &Selection,
    options: &ReplayOptions,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<ReplayReport, ReplayError> {
    if let Some(rate) = options.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(ReplayError::Invalid(format!(
            "rate {rate}: expected a positive number of messages per second"
        )));
    }
    let pace = options.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut session = Session::open(dlq).await?;
    let mut publisher = match Publisher::open(&session).await {
        Ok(p) => p,
        Err(e) => {
            let _ = session.finish().await;
            return Err(e);
        }
    };
    let mut report = ReplayReport {
        dry_run: options.dry_run,
        ready_at_start: session.total,
        ..ReplayReport::default()
    };
    let mut selected = 0usize;
    let mut next_publish = tokio::time::Instant::now();
    loop {
        if options.stop.is_stopped() {
            report.interrupted = report.read < report.ready_at_start;
            break;
        }
        let (properties, body, acker) = match session.next_delivery().await {
            Ok(Some(got)) => got,
            Ok(None) => break,
            Err(e) => {
                report.aborted = Some(e.to_string());
                break;
            }
        };
        report.read += 1;
        let message = DeadMessage::read(&properties, &body, selection.key_path());
        let target = match selection.matches(&message) {
            Match::Selected if selection.limit.is_none_or(|n| selected < n) => {
                selected += 1;
                message
                    .origin()
                    .or_else(|| options.fallback.clone())
                    .ok_or_else(|| {
                        "no origin headers (x-prereq-original-exchange and \
                         x-prereq-original-routing-key); give a fallback target to send it \
                         elsewhere"
                            .to_owned()
                    })
            }
            Match::Unreadable(reason) => Err(reason),
            _ => Err(String::new()),
        };
        let outcome = match target {
            Err(reason) if reason.is_empty() => Outcome::Left,
            Err(reason) => Outcome::Skipped(reason),
            Ok(target) => match publisher.exchange_exists(&session, &target.exchange).await {
                Err(e) => {
                    report.aborted = Some(e.to_string());
                    Outcome::Failed(e.to_string())
                }
                Ok(false) => {
                    Outcome::Failed(format!("exchange {:?} does not exist", target.exchange))
                }
                Ok(true) if options.dry_run => Outcome::WouldReplay(target),
                Ok(true) => {
                    if let Some(pace) = pace {
                        let now = tokio::time::Instant::now();
                        if next_publish > now {
                            options.stop.pause(next_publish - now).await;
                        }
                        next_publish = tokio::time::Instant::now() + pace;
                    }
                    let props = replay_properties(
                        &properties,
                        replay_headers(properties.headers().as_ref()),
                    );
                    match publisher.publish(&session, &target, &body, props).await {
                        Ok(()) => match session.ack(&acker).await {
                            Ok(()) => Outcome::Replayed(target),
                            Err(e) => {
                                // The copy is stored; the dead letter comes back (a duplicate).
                                report.aborted = Some(format!(
                                    "{e} (the copy of message {:?} was stored: it will be \
                                     replayed twice if replayed again)",
                                    message.message_id.as_deref().unwrap_or("without id")
                                ));
                                Outcome::Replayed(target)
                            }
                        },
                        Err(reason) => {
                            if let Err(e) = publisher.ensure_open(&session).await {
                                report.aborted = Some(e.to_string());
                            }
                            Outcome::Failed(reason)
                        }
                    }
                }
            },
        };
        report
            .by_kind
            .entry(message.kind.clone())
            .or_default()
            .count(&outcome);
        progress(Progress {
            done: report.read,
            total: report.ready_at_start,
            message: &message,
            outcome: &outcome,
        });
        if matches!(outcome, Outcome::Skipped(_) | Outcome::Failed(_)) {
            report.not_replayed.push((message, outcome));
        }
        if report.aborted.is_some() {
            break;
        }
    }
    publisher.close().await;
    let finished = session.finish().await;
    if let (Err(e), None) = (finished, &report.aborted) {
        report.aborted = Some(e.to_string());
    }
    Ok(report)
}

fn short(s: &str, what: &str) -> Result<ShortString, String> {
    ShortString::try_new(s).map_err(|_| format!("{what} {s:?} is longer than 255 bytes"))
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404)
}

/// A connection and the channel that reads (and holds) the dead letters.
///
/// Reading is a consumer, not `basic.get`: RabbitMQ (3.10, quorum queues) gives back a large
/// batch of `basic.get` deliveries in no particular order, but a consumer's deliveries, given
/// back with one `basic.nack` (`multiple`, `requeue`), in their order. The prefetch covers
/// every message of the queue (everything not replayed is held to the end), so the client
/// buffers up to the whole queue.
struct Session {
    addr: AmqpAddr,
    queue: String,
    timeout: Duration,
    connection: Connection,
    reader: Channel,
    consumer: Option<lapin::Consumer>,
    /// Ready when the run started: the most it reads.
    total: usize,
    /// Read so far.
    fetched: usize,
}

impl Session {
    fn broker(&self, operation: impl Into<String>, e: &lapin::Error) -> ReplayError {
        ReplayError::Broker {
            operation: operation.into(),
            message: self.addr.scrub(&e.to_string()),
        }
    }

    async fn timed<T>(
        &self,
        operation: &str,
        f: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, ReplayError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.broker(operation, &e)),
            Err(_) => Err(ReplayError::Broker {
                operation: operation.to_owned(),
                message: format!("no answer within {:?}", self.timeout),
            }),
        }
    }

    async fn open(dlq: &DeadLetterQueue) -> Result<Self, ReplayError> {
        let queue = short(&dlq.queue, "queue name").map_err(ReplayError::Invalid)?;
        let addr = dlq.addr.clone();
        let connected = match dlq.tls.load(&addr) {
            Ok(tls) => connect_once(&addr, &tls, "prereq-replay", dlq.timeout).await,
            Err(e) => Err(e),
        };
        let connection = match connected {
            Ok(c) => c,
            Err(AmqpError::Connect { addr, message }) => {
                return Err(ReplayError::Connect { addr, message });
            }
            Err(AmqpError::Config(message)) => return Err(ReplayError::Invalid(message)),
            Err(e) => {
                return Err(ReplayError::Connect {
                    addr: addr.redacted(),
                    message: addr.scrub(&e.to_string()),
                });
            }
        };
        let reader = match tokio::time::timeout(dlq.timeout, connection.create_channel()).await {
            Ok(Ok(ch)) => ch,
            failed => {
                let message = match failed {
                    Ok(Err(e)) => addr.scrub(&e.to_string()),
                    _ => format!("no answer within {:?}", dlq.timeout),
                };
                let _ =
                    tokio::time::timeout(dlq.timeout, connection.close(200, "prereq: done".into()))
                        .await;
                return Err(ReplayError::Broker {
                    operation: "open a channel".to_owned(),
                    message,
                });
            }
        };
        let mut session = Self {
            addr,
            queue: dlq.queue.clone(),
            timeout: dlq.timeout,
            connection,
            reader,
            consumer: None,
            total: 0,
            fetched: 0,
        };
        let look_up = format!("look up queue {:?}", dlq.queue);
        let declared = tokio::time::timeout(
            dlq.timeout,
            session.reader.queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        session.total = match declared {
            Ok(Ok(q)) => q.message_count() as usize,
            Ok(Err(e)) => {
                let error = if is_not_found(&e) {
                    ReplayError::QueueNotFound {
                        queue: dlq.queue.clone(),
                    }
                } else {
                    session.broker(look_up, &e)
                };
                session.close().await;
                return Err(error);
            }
            Err(_) => {
                session.close().await;
                return Err(ReplayError::Broker {
                    operation: look_up,
                    message: format!("no answer within {:?}", dlq.timeout),
                });
            }
        };
        if session.total > 0
            && let Err(e) = session.subscribe(queue).await
        {
            session.close().await;
            return Err(e);
        }
        Ok(session)
    }

    async fn subscribe(&mut self, queue: ShortString) -> Result<(), ReplayError> {
        // Everything is held to the end: the prefetch must cover the whole queue (0: no limit,
        // for queues beyond the protocol's 65 535).
        let prefetch = u16::try_from(self.total).unwrap_or(0);
        self.timed(
            "set the prefetch",
            self.reader.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let consumer = self
            .timed(
                &format!("read from {:?}", self.queue),
                self.reader.basic_consume(
                    queue,
                    "prereq-replay".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        self.consumer = Some(consumer);
        Ok(())
    }

    /// The next message, held (not acknowledged) until [`Session::finish`].
    async fn next(&mut self) -> Result<Option<(BasicProperties, Vec<u8>)>, ReplayError> {
        let got = self.next_delivery().await?;
        Ok(got.map(|(p, b, _)| (p, b)))
    }

    /// The next message and its acker, up to the count at the start; the caller either
    /// acknowledges it or leaves it to [`Session::finish`].
    async fn next_delivery(
        &mut self,
    ) -> Result<Option<(BasicProperties, Vec<u8>, lapin::Acker)>, ReplayError> {
        if self.fetched >= self.total {
            return Ok(None);
        }
        let operation = format!("read from {:?}", self.queue);
        loop {
            let Some(consumer) = self.consumer.as_mut() else {
                return Ok(None);
            };
            match tokio::time::timeout(self.timeout, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    self.fetched += 1;
                    return Ok(Some((d.properties, d.data, d.acker)));
                }
                Ok(Some(Err(e))) => return Err(self.broker(operation, &e)),
                Ok(None) => {
                    return Err(ReplayError::Broker {
                        operation,
                        message: "the broker cancelled the consumer (was the queue deleted?)"
                            .to_owned(),
                    });
                }
                Err(_) => {
                    // Nothing for a while: fewer messages than counted at the start (another
                    // consumer took some) ends the run; else keep waiting.
                    if self.ready().await? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Messages ready in the queue now (a passive declare).
    async fn ready(&self) -> Result<u32, ReplayError> {
        let queue = short(&self.queue, "queue name").map_err(ReplayError::Invalid)?;
        let q = self
            .timed(
                &format!("look up queue {:?}", self.queue),
                self.reader.queue_declare(
                    queue,
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
        Ok(q.message_count())
    }

    async fn ack(&self, acker: &lapin::Acker) -> Result<(), ReplayError> {
        match self
            .timed(
                "acknowledge a dead letter",
                acker.ack(BasicAckOptions::default()),
            )
            .await?
        {
            true => Ok(()),
            false => Err(ReplayError::Broker {
                operation: "acknowledge a dead letter".to_owned(),
                message: "the reading channel had closed".to_owned(),
            }),
        }
    }

    /// Stop the consumer, give back every delivery not acknowledged (held ones, and any the
    /// client had buffered) with one `basic.nack` (`multiple`, `requeue`): once each, in
    /// delivery order; then close.
    async fn finish(mut self) -> Result<(), ReplayError> {
        let mut result = Ok(());
        if let Some(consumer) = self.consumer.take()
            && self.reader.status().connected()
        {
            result = self
                .timed(
                    "stop reading",
                    self.reader
                        .basic_cancel(consumer.tag(), BasicCancelOptions::default()),
                )
                .await;
            if result.is_ok() {
                result = self
                    .timed(
                        "give the messages back",
                        self.reader.basic_nack(
                            0,
                            BasicNackOptions {
                                multiple: true,
                                requeue: true,
                            },
                        ),
                    )
                    .await;
            }
        }
        self.close().await;
        result
    }

    /// Close the connection, waiting for the broker's close-ok: the acknowledgements and the
    /// return before it are processed by then. Should this fail, the broker gives back every
    /// unacknowledged message when the connection ends.
    async fn close(&self) {
        let _ = tokio::time::timeout(
            self.timeout,
            self.connection.close(200, "prereq: done".into()),
        )
        .await;
    }
}

/// The confirm-mode channel that publishes copies; reopened after a failure closed it (a
/// publish to a missing exchange closes the channel).
struct Publisher {
    channel: Channel,
    exchanges: HashMap<String, bool>,
}

impl Publisher {
    async fn open(session: &Session) -> Result<Self, ReplayError> {
        Ok(Self {
            channel: Self::confirm_channel(session).await?,
            exchanges: HashMap::new(),
        })
    }

    async fn confirm_channel(session: &Session) -> Result<Channel, ReplayError> {
        let channel = session
            .timed("open a channel", session.connection.create_channel())
            .await?;
        session
            .timed(
                "enable publisher confirms",
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
        Ok(channel)
    }

    async fn ensure_open(&mut self, session: &Session) -> Result<(), ReplayError> {
        if !self.channel.status().connected() {
            self.channel = Self::confirm_channel(session).await?;
        }
        Ok(())
    }

    /// Whether `exchange` exists (cached), checked with a passive declare on a channel of its
    /// own (a missing exchange closes the channel that asked).
    async fn exchange_exists(
        &mut self,
        session: &Session,
        exchange: &str,
    ) -> Result<bool, ReplayError> {
        if exchange.is_empty() {
            return Ok(true);
        }
        if let Some(known) = self.exchanges.get(exchange) {
            return Ok(*known);
        }
        let Ok(name) = ShortString::try_new(exchange) else {
            return Ok(false);
        };
        let probe = session
            .timed("open a channel", session.connection.create_channel())
            .await?;
        let declared = tokio::time::timeout(
            session.timeout,
            probe.exchange_declare(
                name,
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        let exists = match declared {
            Ok(Ok(())) => true,
            Ok(Err(e)) if is_not_found(&e) => false,
            Ok(Err(e)) => return Err(session.broker(format!("look up exchange {exchange:?}"), &e)),
            Err(_) => {
                return Err(ReplayError::Broker {
                    operation: format!("look up exchange {exchange:?}"),
                    message: format!("no answer within {:?}", session.timeout),
                });
            }
        };
        if exists {
            let _ = probe.close(200, "prereq: done".into()).await;
        }
        self.exchanges.insert(exchange.to_owned(), exists);
        Ok(exists)
    }

    /// Publish (`mandatory`) and wait for the confirm; an error says why the copy is not known
    /// to be stored.
    async fn publish(
        &mut self,
        session: &Session,
        target: &Target,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), String> {
        let exchange = short(&target.exchange, "exchange")?;
        let routing_key = short(&target.routing_key, "routing key")?;
        let confirmed = tokio::time::timeout(session.timeout, async {
            self.channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    properties,
                )
                .await?
                .await
        })
        .await;
        match confirmed {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(format!(
                "unroutable: {} {} (no queue bound to {target})",
                returned.reply_code, returned.reply_text
            )),
            Ok(Ok(Confirmation::Nack(_))) => Err("nacked by the broker".to_owned()),
            Ok(Ok(Confirmation::NotRequested)) => Err("publisher confirms are off".to_owned()),
            Ok(Err(e)) => {
                if is_not_found(&e) {
                    // Deleted since it was looked up: the next messages for it fail at once.
                    self.exchanges.insert(target.exchange.clone(), false);
                }
                Err(session.addr.scrub(&e.to_string()))
            }
            Err(_) => {
                // The confirm may still come: start afresh so that it cannot be mistaken.
                let _ = self
                    .channel
                    .close(200, "prereq: confirm timed out".into())
                    .await;
                Err(format!(
                    "no confirm within {:?} (the copy may have been stored)",
                    session.timeout
                ))
            }
        }
    }

    async fn close(self) {
        let _ = self.channel.close(200, "prereq: done".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn dead_headers() -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(headers::DEAD_LETTER_KIND.into(), long("key-never-arrived"));
        h.insert(headers::DEAD_LETTER_REASON.into(), long("client 5 unknown"));
        h.insert(headers::LAST_ERROR.into(), long("client 5 unknown"));
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongInt(10));
        h.insert(
            headers::DEAD_LETTERED_AT.into(),
            AMQPValue::LongLongInt(2_000),
        );
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongInt(10));
        h.insert(headers::RETRY.into(), AMQPValue::LongInt(10));
        h.insert(headers::RETRY_LIMIT.into(), AMQPValue::LongInt(10));
        h.insert(headers::DELAY.into(), AMQPValue::LongInt(-5000));
        h.insert(headers::ORIGINAL_EXCHANGE.into(), long("payments"));
        h.insert(
            headers::ORIGINAL_ROUTING_KEY.into(),
            long("process.payment"),
        );
        h.insert(headers::FIRST_SEEN.into(), AMQPValue::LongLongInt(1_000));
        h.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        h.insert("x-first-death-queue".into(), long("delay.1000"));
        h.insert("x-last-death-reason".into(), long("expired"));
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        h.insert("tenant".into(), long("acme"));
        h
    }

    fn message(body: &str, key: Option<&str>) -> DeadMessage {
        let props = BasicProperties::default()
            .with_message_id("p-1".into())
            .with_headers(dead_headers());
        let path = key.map(|k| KeyPath::parse(k).unwrap());
        DeadMessage::read(&props, body.as_bytes(), path.as_ref())
    }

    #[test]
    fn replay_headers_reset_the_attempts_and_drop_the_dead_letter_headers() {
        let h = replay_headers(Some(&dead_headers()));
        for gone in [
            headers::DEAD_LETTER_KIND,
            headers::DEAD_LETTER_REASON,
            headers::LAST_ERROR,
            headers::ATTEMPTS,
            headers::DEAD_LETTERED_AT,
            headers::ATTEMPT,
            "x-death",
            "x-first-death-queue",
            "x-last-death-reason",
            "x-delivery-count",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h.inner().get(headers::RETRY), Some(&AMQPValue::LongInt(0)));
        // The payment demo's consumer requires `x-delay` as a 32-bit integer; 0: no delay.
        assert_eq!(h.inner().get(headers::DELAY), Some(&AMQPValue::LongInt(0)));
        assert_eq!(
            h.inner().get(headers::REPLAYED),
            Some(&AMQPValue::LongInt(1))
        );
        assert_eq!(get_int(Some(&h), headers::RETRY_LIMIT), Some(10));
        assert_eq!(get_int(Some(&h), headers::FIRST_SEEN), Some(1_000));
        assert_eq!(
            get_str(Some(&h), headers::ORIGINAL_EXCHANGE).as_deref(),
            Some("payments")
        );
        assert_eq!(get_str(Some(&h), "tenant").as_deref(), Some("acme"));
        assert_eq!(headers::read_incoming(Some(&h)).attempt, 0);
    }

    #[test]
    fn replay_headers_count_replays_and_add_no_retry_header() {
        let mut h = FieldTable::default();
        h.insert(headers::REPLAYED.into(), AMQPValue::ShortInt(2));
        let out = replay_headers(Some(&h));
        assert_eq!(
            out.inner().get(headers::REPLAYED),
            Some(&AMQPValue::LongInt(3))
        );
        assert!(!out.contains_key(headers::RETRY));
        assert!(!out.contains_key(headers::DELAY));
        let fresh = replay_headers(None);
        assert_eq!(
            fresh.inner().get(headers::REPLAYED),
            Some(&AMQPValue::LongInt(1))
        );
    }

    #[test]
    fn replay_headers_restore_x_delay_on_demo_dead_letters() {
        // A dead letter as prereq writes it: `x-retry` kept, `x-delay` removed.
        let mut dead = FieldTable::default();
        dead.insert(headers::RETRY.into(), AMQPValue::LongInt(10));
        dead.insert(headers::RETRY_LIMIT.into(), AMQPValue::LongInt(10));
        let out = replay_headers(Some(&dead));
        assert_eq!(
            out.inner().get(headers::DELAY),
            Some(&AMQPValue::LongInt(0))
        );
        assert_eq!(
            out.inner().get(headers::RETRY),
            Some(&AMQPValue::LongInt(0))
        );
        // Only `x-delay`, of another width: rewritten as a 32-bit 0.
        let mut only_delay = FieldTable::default();
        only_delay.insert(headers::DELAY.into(), AMQPValue::LongLongInt(7_000));
        let out = replay_headers(Some(&only_delay));
        assert_eq!(
            out.inner().get(headers::DELAY),
            Some(&AMQPValue::LongInt(0))
        );
    }

    #[test]
    fn replay_properties_keep_metadata_and_drop_expiry() {
        let p = BasicProperties::default()
            .with_message_id("m".into())
            .with_correlation_id("c".into())
            .with_content_type("application/json".into())
            .with_expiration("1000".into())
            .with_user_id("guest".into());
        let out = replay_properties(&p, FieldTable::default());
        assert_eq!(out.message_id().as_ref().map(|v| v.as_str()), Some("m"));
        assert_eq!(out.correlation_id().as_ref().map(|v| v.as_str()), Some("c"));
        assert_eq!(
            out.content_type().as_ref().map(|v| v.as_str()),
            Some("application/json")
        );
        assert_eq!(out.expiration(), &None);
        assert_eq!(out.user_id(), &None);
        assert_eq!(out.delivery_mode(), &Some(2));
    }

    #[test]
    fn dead_message_reads_the_headers() {
        let m = message(r#"{"clientId":5}"#, Some("clientId"));
        assert_eq!(m.message_id.as_deref(), Some("p-1"));
        assert_eq!(m.kind, "key-never-arrived");
        assert_eq!(m.reason.as_deref(), Some("client 5 unknown"));
        assert_eq!(m.attempts, Some(10));
        assert_eq!(m.dead_lettered_at_ms, Some(2_000));
        assert_eq!(m.delivery_count, Some(2));
        assert_eq!(m.key, Some(Ok("5".to_owned())));
        assert_eq!(
            m.origin(),
            Some(Target {
                exchange: "payments".into(),
                routing_key: "process.payment".into()
            })
        );
    }

    #[test]
    fn headers_of_the_wrong_type_are_absent() {
        let mut h = FieldTable::default();
        h.insert(headers::DEAD_LETTER_KIND.into(), AMQPValue::LongInt(3));
        h.insert(headers::ORIGINAL_EXCHANGE.into(), AMQPValue::Boolean(true));
        h.insert(headers::ORIGINAL_ROUTING_KEY.into(), long("k"));
        h.insert(headers::DEAD_LETTERED_AT.into(), long("yesterday"));
        let props = BasicProperties::default().with_headers(h);
        let m = DeadMessage::read(&props, b"", None);
        assert_eq!(m.kind, NO_KIND);
        assert_eq!(m.origin(), None);
        assert_eq!(m.dead_lettered_at_ms, None);
        let bare = DeadMessage::read(&BasicProperties::default(), b"x", None);
        assert_eq!(bare.kind, NO_KIND);
        assert_eq!(bare.message_id, None);
    }

    #[test]
    fn key_paths_read_nested_fields() {
        let body = br#"{"client":{"id":"c-9","tags":["a","b"]},"n":1.5,"ok":true,"none":null}"#;
        let read = |p: &str| KeyPath::parse(p).unwrap().read(body);
        assert_eq!(read("client.id"), Ok("c-9".to_owned()));
        assert_eq!(read("client.tags.1"), Ok("b".to_owned()));
        assert_eq!(read("n"), Ok("1.5".to_owned()));
        assert_eq!(read("ok"), Ok("true".to_owned()));
        assert!(read("none").unwrap_err().contains("null"));
        assert!(read("client").unwrap_err().contains("object"));
        assert!(read("client.tags").unwrap_err().contains("array"));
        assert!(read("client.tags.7").unwrap_err().contains("no field"));
        assert!(read("missing").unwrap_err().contains("no field"));
        let not_json = KeyPath::parse("id").unwrap().read(b"\xff not json");
        assert!(not_json.unwrap_err().contains("not JSON"));
    }

    #[test]
    fn key_paths_refuse_empty_segments() {
        for bad in ["", ".", "a.", ".a", "a..b"] {
            assert!(KeyPath::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(KeyPath::parse("a.b").unwrap().to_string(), "a.b");
    }

    #[test]
    fn selection_combines_criteria() {
        let m = message(r#"{"clientId":5}"#, Some("clientId"));
        assert_eq!(Selection::all().matches(&m), Match::Selected);
        assert!(Selection::all().is_all());
        let kind = Selection::all().kind("rejected");
        assert_eq!(kind.matches(&m), Match::NotSelected);
        assert_eq!(
            kind.clone().kind("key-never-arrived").matches(&m),
            Match::Selected
        );
        assert_eq!(Selection::all().id("p-2").matches(&m), Match::NotSelected);
        assert_eq!(
            Selection::all().id("p-2").id("p-1").matches(&m),
            Match::Selected
        );
        let path = KeyPath::parse("clientId").unwrap();
        let by_key = Selection::all().keys(path.clone(), ["4", "5"]);
        assert_eq!(by_key.matches(&m), Match::Selected);
        assert_eq!(
            Selection::all().keys(path.clone(), ["6"]).matches(&m),
            Match::NotSelected
        );
        // AND across criteria.
        assert_eq!(
            Selection::all()
                .kind("rejected")
                .keys(path.clone(), ["5"])
                .matches(&m),
            Match::NotSelected
        );
        // A key field alone does not filter.
        assert_eq!(
            Selection::all().key_field(path).matches(&m),
            Match::Selected
        );
    }

    #[test]
    fn unreadable_keys_are_reported_not_selected() {
        let m = message("not json", Some("clientId"));
        let s = Selection::all().keys(KeyPath::parse("clientId").unwrap(), ["5"]);
        match s.matches(&m) {
            Match::Unreadable(reason) => assert!(reason.contains("not JSON"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Excluded by another criterion first: simply not selected.
        assert_eq!(s.clone().kind("rejected").matches(&m), Match::NotSelected);
        // Key never read.
        let unread = message("{}", None);
        assert!(matches!(s.matches(&unread), Match::Unreadable(_)));
    }

    #[test]
    fn kind_summary_tracks_range_and_sample() {
        let mut s = KindSummary::default();
        let mut a = message("{}", None);
        a.dead_lettered_at_ms = Some(50);
        a.reason = None;
        let mut b = message("{}", None);
        b.dead_lettered_at_ms = Some(10);
        b.delivery_count = Some(7);
        s.add(&a);
        s.add(&b);
        assert_eq!(s.count, 2);
        assert_eq!(s.oldest_ms, Some(10));
        assert_eq!(s.newest_ms, Some(50));
        assert_eq!(s.sample_reason.as_deref(), Some("client 5 unknown"));
        assert_eq!(s.max_delivery_count, Some(7));
    }

    #[tokio::test]
    async fn stop_signal_cuts_a_pause_short() {
        let stop = StopSignal::new();
        let waiter = stop.clone();
        let task = tokio::spawn(async move { waiter.pause(Duration::from_secs(3600)).await });
        stop.stop();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("pause ended by the signal")
            .expect("task");
        assert!(stop.is_stopped());
        // Already stopped: returns at once.
        tokio::time::timeout(
            Duration::from_secs(30),
            stop.pause(Duration::from_secs(3600)),
        )
        .await
        .expect("no wait once stopped");
    }

    #[test]
    fn queue_names() {
        let d = DeadLetterQueue::of_queue(AmqpAddr::default(), "payment-processor");
        assert_eq!(d.queue(), "payment-processor.dead");
    }
}
