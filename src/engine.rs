//! The decision loop: handle, hold, defer or dead-letter each delivery.
//!
//! One task owns all state (the cache, the hold, the lanes, the deferred messages, the
//! counters), so decisions need no locks and happen in a well-defined order. Handlers run in
//! worker tasks (`handlers`); broker settlements, key lookups and registration writes run in
//! spawned tasks; all report back to the loop. The loop knows nothing of AMQP or SQL: it
//! speaks the [`Transport`] seam and the key source seam only.
//!
//! Where a message can be, once decoded:
//! - waiting for the source's answer about its key (`lookups`), behind earlier messages of the
//!   same key;
//! - held (`hold`): its key is unknown, or an earlier message of its key is deferred and it waits
//!   behind it;
//! - in its key's lane (`lanes`): its key is known, it waits for a handler slot or runs;
//! - settled: acknowledged, deferred through the broker, dead-lettered or given back.
//!
//! Every message has a *position* among the messages of its key (its arrival order). A
//! deferred message's position is remembered (`away`) until it comes back and takes it again,
//! so that the key's later messages wait behind it and the key's order survives the deferral.

mod away;
mod handlers;
mod here;
mod intake;
mod lanes;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::Either;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use self::away::Away;
use self::handlers::{Assigned, Handlers, Jobs, Resumed, Teller, Told};
use self::here::Here;
use self::intake::Intake;
use self::lanes::Lanes;
use crate::cache::KeyCache;
use crate::config::Config;
use crate::context::Context;
use crate::dead_letter::{DeadLetter, DeadLetterKind};
use crate::error::{BoxError, HandlerError, RunError};
use crate::event::{Decision, DeferCause, Event};
use crate::hashed::{ByHash, Hashed};
use crate::hold::Hold;
use crate::keys::{Key, KeyError, SharedSource, Wake};
use crate::pending::{Meta, Pending};
use crate::probe::{self, Stage};
use crate::report::Report;
use crate::retry::{Policy, seed_of};
use crate::transport::{Delivery, Demand, Settle, Source, Transport};

/// Ready items the loop takes after a turn before it turns again (see `Engine::take_ready`).
const TAKE_READY: usize = 64;
/// The most messages of one key a handler job runs in a row (the key's other messages wait for
/// the next job, behind other keys). Small: the jobs' acknowledgements go out key by key, away
/// from the order of delivery, and RabbitMQ takes acknowledgements far out of that order slowly
/// when many are unacknowledged (docs/performance.md, round 6: with 32, a hold of 65 535 drained
/// below 300 msg/s).
const JOB_MAX: usize = 8;
/// Key lookups in flight at once (a database pool is not flooded by a resync).
const MAX_LOOKUPS: usize = 64;
/// A deferred message that has not come back this long after its delay (or after its deferral
/// failed) stops blocking its key (its copy went to another instance, or it was dead-lettered
/// elsewhere).
const AWAY_GRACE: Duration = Duration::from_secs(30);
/// A message waiting behind a deferred one is deferred until a little after that one is due.
const BEHIND_MARGIN: Duration = Duration::from_millis(100);
/// A registration whose key the source could not record is retried after this, doubling…
const INSERT_RETRY_FIRST: Duration = Duration::from_millis(100);
/// …up to this, until it is recorded or the consumer stops.
const INSERT_RETRY_MAX: Duration = Duration::from_secs(5);
/// While the key source fails, held keys are asked again after this, doubling…
const RECHECK_FIRST: Duration = Duration::from_secs(1);
/// …up to this, until it answers.
const RECHECK_MAX: Duration = Duration::from_secs(5);
/// Why a delivery void since a reconnect is dropped rather than run.
const STALE: &str = "the delivery predates a reconnect: the broker delivers it again";
/// The delay of a deferral that does not count as an attempt, for a policy that has none.
const FALLBACK_DELAY: Duration = Duration::from_secs(1);

/// Run a consumer on `transport` until `shutdown` completes, the transport closes or fails.
///
/// The loop runs in a task of its own on the runtime (`tokio::spawn`), not in the caller's
/// future: a `run` awaited where no worker thread polls it (`block_on`, as in `#[tokio::main]`)
/// would otherwise wake every handler job from outside the runtime's workers, through its
/// shared queue, and be woken by them through a thread park; on two cores that thread also
/// competes with both workers (docs/performance.md, round 15). `shutdown` stays in the caller's
/// future (it need not be `'static`): once it completes, the loop is told to stop. Dropping
/// `run` cancels the loop's task, which ends it as dropping the loop itself would.
pub(crate) async fn run<K, M, T, S>(
    cfg: Arc<Config<K, M>>,
    transport: T,
    shutdown: S,
) -> Result<Report, RunError<T::Error>>
where
    K: Key,
    M: Send + 'static,
    T: Transport,
    S: Future + Send,
{
    let stop = CancellationToken::new();
    let mut task = AbortOnDropHandle::new(tokio::spawn(
        run_here(cfg, transport, stop.clone().cancelled_owned()).in_current_span(),
    ));
    tokio::pin!(shutdown);
    let joined = tokio::select! {
        biased;
        _ = &mut shutdown => {
            stop.cancel();
            (&mut task).await
        }
        joined = &mut task => joined,
    };
    match joined {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            // The loop panicked: so does `run`, as it did when the loop ran in it.
            Ok(payload) => std::panic::resume_unwind(payload),
            // Only a runtime shutting down cancels the task while `run` waits for it.
            Err(e) => Err(RunError::Cancelled {
                reason: e.to_string(),
                report: Report::default(),
            }),
        },
    }
}

/// The loop itself, in the task `run` spawns: until `shutdown`, the transport closes or fails.
async fn run_here<K, M, T, S>(
    cfg: Arc<Config<K, M>>,
    transport: T,
    shutdown: S,
) -> Result<Report, RunError<T::Error>>
where
    K: Key,
    M: Send + 'static,
    T: Transport,
    S: Future + Send,
{
    let transport = Arc::new(transport);
    let demand = Demand::new(cfg.budget.max_messages, cfg.concurrency);
    if let Err(source) = transport.start(demand).await {
        return Err(RunError::Transport {
            source,
            report: Report::default(),
        });
    }
    let mut engine = Engine::new(cfg, Arc::clone(&transport));
    let stop = engine.serve(shutdown, Intake::new(transport)).await;
    // Nothing new from here on: what is given back stays with the broker. (A delivery the
    // transport had ready and the loop did not take is the transport's: it was not handed out.)
    engine.transport.stop_receiving().await;
    engine.finish_handlers().await;
    engine.give_back();
    engine.finish_work().await;
    engine.transport.finished().await;
    match stop {
        Stop::Failed(source) => Err(RunError::Transport {
            source,
            report: engine.report,
        }),
        Stop::Shutdown | Stop::Closed => Ok(engine.report),
    }
}

/// Why the loop ended.
enum Stop<E> {
    /// The shutdown future completed.
    Shutdown,
    /// The transport closed for good.
    Closed,
    /// The transport failed.
    Failed(E),
}

/// A message waiting for the source's answer about its key.
struct Waiting<M> {
    p: Pending<M>,
    /// It was held until its hold time ran out: a "no" defers it rather than holding it again.
    expired: bool,
}

/// What a handler job reports: the message's key and description, and what became of it.
struct Handled<K> {
    key: K,
    meta: Meta,
    outcome: Outcome,
}

/// What became of a message a job ran. The loop makes the event, dated when it took the news
/// (`Handlers::taken_at`): the job does not read the clock for it (docs/performance.md, round
/// 18).
enum Outcome {
    /// The handler succeeded and the job acknowledged the message.
    Acked,
    /// The handler succeeded; the acknowledgement failed (the transport's error).
    AckFailed(String),
    /// The handler failed.
    Failed(HandlerError),
}

/// A handler job's messages (a key's, up to `JOB_MAX`, in order), kept by its teller: what it
/// has not run yet, and what it ends with (a retryable failure, a stale delivery or a stop came
/// first, or the job was cancelled).
type Left<M> = VecDeque<Pending<M>>;

/// A running handler job, as the engine knows it.
struct Running<K> {
    /// The key it handles.
    key: Hashed<K>,
    /// The partition its messages came from.
    partition: Option<u32>,
    /// Its key's lane is still taken: the job runs handlers, or ended early (the lane is freed
    /// once the job ends, after what it did not run went back to the lane or the hold).
    lane: bool,
    /// Its messages whose outcome it has not told yet.
    unreported: usize,
}

/// What the other tasks report.
enum Work<K> {
    /// A settlement finished: the event to emit, if any.
    Settled(Option<Event<K>>),
    /// A deferral that keeps its key's order finished: the event to emit. If it failed, its
    /// slot waits for the original the broker gives back (`Engine::on_deferral`).
    Deferral { key: K, pos: u64, event: Event<K> },
    /// Settlements made one after the other finished (deferrals at a stop): their events.
    Batch(Vec<Event<K>>),
    /// A registration's key was recorded by the source: the key is known, the registration
    /// may be acknowledged.
    Recorded { key: K, registered: Event<K> },
    /// A registration's key was not recorded: settle it so (a dead letter for a key the source
    /// refuses, a give-back at shutdown), as the event says.
    Unrecorded { event: Event<K>, settle: Settle },
    /// The source answered about `key`.
    Looked {
        key: Hashed<K>,
        answer: Result<bool, KeyError<BoxError>>,
    },
}

struct Engine<K, M, T> {
    /// What the consumer was built with (the hold time clamped to the transport's limit).
    cfg: Arc<Config<K, M>>,
    /// The broker.
    transport: Arc<T>,
    /// Hashes keys for the cache, the hold, the lookups and the lanes, once for each message
    /// (SipHash with random keys, as a `HashMap`'s own).
    hasher: std::hash::RandomState,
    /// Keys known to be known: answered without asking the source.
    cache: KeyCache<K>,
    /// Messages whose key is unknown, or that wait behind a deferred message of their key.
    hold: Hold<Hashed<K>, Pending<M>, ByHash>,
    /// Messages waiting for the source's answer about their key, in arrival order; a key is
    /// listed exactly while a lookup of it is in flight.
    lookups: HashMap<Hashed<K>, Vec<Waiting<M>>, ByHash>,
    /// How many messages `lookups` holds.
    looking: usize,
    /// Messages whose key is known, waiting for a handler or running.
    lanes: Lanes<Hashed<K>, Pending<M>, ByHash>,
    /// Deferred messages expected back, per key: later messages of the key wait behind them.
    away: Away<K>,
    /// Running handler jobs, and for each its key and partition, and whether it still holds
    /// its key's lane (to free the lane even if the job was lost, and to know when a revoked
    /// partition runs nothing any more). A job whose handler succeeded tells it before it
    /// acknowledges (unless the acknowledgement is done at once): its key's next message may
    /// run while the acknowledgement travels.
    handlers: Handlers<K, Handled<K>, Left<M>, Running<K>>,
    /// Whether the loop runs the next job itself (see `here`).
    here: Here<Handled<K>>,
    /// Messages in running jobs besides the one each runs (counted in memory like a lane's).
    in_jobs: usize,
    /// Set when the consumer stops: jobs run no further message. Every job reads it before each
    /// message: a flag, not a `CancellationToken`, whose look takes a lock that the workers
    /// share (docs/performance.md, round 17).
    draining: Arc<AtomicBool>,
    /// Partitions the transport revoked whose running handlers have not all finished: their
    /// messages are given back as they come.
    revoking: std::collections::HashSet<u32>,
    /// Settlements, lookups and registration writes in flight.
    work: JoinSet<Work<K>>,
    /// Bounds the lookups in flight.
    lookup_slots: Arc<Semaphore>,
    /// Cancelled at shutdown: registration writes stop retrying and give their registration
    /// back.
    stopping: CancellationToken,
    /// The position the next new message gets.
    next_pos: u64,
    /// The most messages in memory (held, in lanes, waiting for lookups) before intake pauses.
    intake_limit: usize,
    /// The last lookup failed: warned once, until the source answers again.
    source_down: bool,
    /// While the source fails: when to ask it again about the held keys, and the wait after.
    recheck: Option<(Instant, Duration)>,
    /// What was done.
    report: Report,
}

impl<K: Key, M: Send + 'static, T: Transport> Engine<K, M, T> {
    fn new(cfg: Arc<Config<K, M>>, transport: Arc<T>) -> Self {
        let mut budget = cfg.budget;
        if let Some(ack_timeout) = transport.ack_timeout() {
            // A held message is an unacknowledged delivery: defer it well before the broker
            // would take it back (and close the channel over it).
            budget.max_time = budget.max_time.min(ack_timeout / 2);
        }
        // Messages in memory stay within the hold budget plus a small backlog: past it, stop
        // taking deliveries until handlers catch up. A release only moves messages from the
        // hold to a lane, so it never blocks the registrations that would wake other keys.
        let backlog = cfg.concurrency.saturating_mul(4).max(16);
        Self {
            hasher: std::hash::RandomState::new(),
            cache: KeyCache::new(cfg.cache_capacity),
            hold: Hold::with_budget(budget),
            lookups: HashMap::default(),
            looking: 0,
            lanes: Lanes::default(),
            away: Away::new(),
            handlers: Handlers::new(),
            here: Here::new(),
            in_jobs: 0,
            draining: Arc::new(AtomicBool::new(false)),
            revoking: std::collections::HashSet::new(),
            work: JoinSet::new(),
            lookup_slots: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            stopping: CancellationToken::new(),
            next_pos: 0,
            intake_limit: budget.max_messages.saturating_add(backlog),
            source_down: false,
            recheck: None,
            report: Report::default(),
            cfg,
            transport,
        }
    }

    // ---- The phases of a run ----------------------------------------------------------------

    /// Decide until told to stop; returns why.
    async fn serve<S: Future>(&mut self, shutdown: S, mut intake: Intake<T>) -> Stop<T::Error> {
        let mut wakes = self.cfg.source.subscribe();
        let mut wakes_open = true;
        tokio::pin!(shutdown);
        // One timer for the loop's next deadline, kept across the turns and moved only when the
        // deadline moves: a timer made in each turn is registered with the runtime's driver in
        // each turn, and wakes the driver's thread each time (docs/performance.md, round 17).
        // Polled only while there is a deadline.
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        // Once told to stop while copies were out (`wait_for_copies_at_stop`): until when the
        // loop goes on for them, and their keys.
        let mut stopping: Option<(Instant, Vec<Hashed<K>>)> = None;
        loop {
            if let Some((by, keys)) = &stopping
                && (Instant::now() >= *by || self.copies_done(keys))
            {
                return Stop::Shutdown;
            }
            // Jobs the loop ran itself to the bound: more may be runnable, and nothing else may
            // wake the loop for them (no job running tells anything): the turn does not wait.
            let more = self.start_handlers(TAKE_READY) == TAKE_READY;
            // The loop may wait now: the next job it runs is timed from then.
            self.here.waits();
            let in_memory = self.in_memory();
            let deadline = [
                self.hold.next_deadline(),
                self.away.next_deadline(),
                self.recheck.map(|(at, _)| at),
                stopping.as_ref().map(|(by, _)| *by),
            ]
            .into_iter()
            .flatten()
            .min();
            if let Some(at) = deadline
                && timer.deadline() != at
            {
                timer.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                _ = &mut shutdown, if stopping.is_none() => {
                    match self.wait_for_copies() {
                        Some(wait) => stopping = Some(wait),
                        None => return Stop::Shutdown,
                    }
                }
                told = self.handlers.recv(), if !self.handlers.is_empty() => self.on_told(told),
                Some(done) = self.work.join_next(), if !self.work.is_empty() => {
                    if let Ok(work) = done { self.on_work(work); }
                }
                wake = wakes.next(), if wakes_open => match wake {
                    Some(wake) => self.on_wake(wake),
                    None => wakes_open = false,
                },
                () = &mut timer, if deadline.is_some() => self.expire(),
                Some(partition) = self.transport.revoked() => self.on_revoked(partition),
                got = intake.next(), if in_memory < self.intake_limit => match got {
                    Ok(Some(d)) => self.on_delivery(d),
                    Ok(None) => return Stop::Closed,
                    Err(e) => return Stop::Failed(e),
                },
                () = std::future::ready(()), if more => {}
            }
            if let Some(stop) = self.take_ready(&mut intake) {
                return stop;
            }
        }
    }

    /// Told to stop: with `wait_for_copies_at_stop` and copies out, until when to go on for
    /// them, and their keys; else none.
    fn wait_for_copies(&mut self) -> Option<(Instant, Vec<Hashed<K>>)> {
        let max = self.cfg.copies_wait;
        if max.is_zero() {
            return None;
        }
        let keys: Vec<Hashed<K>> = self.away.keys().map(|k| self.hashed(k.clone())).collect();
        if keys.is_empty() {
            return None;
        }
        tracing::info!(
            target: "prereq",
            keys = keys.len(),
            max = ?max,
            "stopping: waiting for the deferred messages out in a delay to come back first"
        );
        Some((Instant::now() + max, keys))
    }

    /// None of the keys that had copies out when the stop began has one out now (a copy
    /// deferred again meanwhile, behind another or for its key still unknown, is waited for
    /// too: out at the stop, it would reach the next consumer, which does not know it), nor a
    /// message waiting to run or running. (A copy back to a key still unknown is held again:
    /// the stop defers it with what waits behind it, in order.)
    fn copies_done(&self, keys: &[Hashed<K>]) -> bool {
        keys.iter()
            .all(|k| self.away.first(k.key()).is_none() && self.lanes.is_idle(k))
    }

    /// After a turn of the loop, take what else is ready already (what handler jobs told,
    /// finished work, deliveries the transport has ready) without another turn: a turn sets
    /// up and polls every source of the loop, which costs more than the item it takes. Up to
    /// `TAKE_READY` items, so that shutdown, key wakes and hold deadlines are looked at soon;
    /// in the loop's order (what frees a lane before what fills one).
    fn take_ready(&mut self, intake: &mut Intake<T>) -> Option<Stop<T::Error>> {
        let mut left = TAKE_READY;
        loop {
            let before = left;
            while left > 0
                && let Some(told) = self.handlers.try_recv()
            {
                self.on_told(told);
                left -= 1;
            }
            while left > 0
                && let Some(done) = self.work.try_join_next()
            {
                if let Ok(work) = done {
                    self.on_work(work);
                }
                left -= 1;
            }
            left -= self.start_handlers(left);
            // One delivery, then what the handlers told meanwhile: a free handler slot is
            // filled before the next delivery is decoded, as in the loop's own order.
            if left > 0 && self.in_memory() < self.intake_limit {
                match intake.ready() {
                    Some(Ok(Some(d))) => {
                        self.on_delivery(d);
                        left -= 1;
                    }
                    Some(Ok(None)) => return Some(Stop::Closed),
                    Some(Err(e)) => return Some(Stop::Failed(e)),
                    None => {}
                }
            }
            if left == before || left == 0 {
                return None;
            }
        }
    }

    /// Messages in memory: held, in lanes, waiting for lookups.
    fn in_memory(&self) -> usize {
        self.hold.len() + self.lanes.queued() + self.looking + self.in_jobs
    }

    /// Let running handlers finish (for up to the shutdown grace); start nothing new.
    async fn finish_handlers(&mut self) {
        self.draining.store(true, Ordering::Release);
        let grace = tokio::time::sleep(self.cfg.shutdown_grace);
        tokio::pin!(grace);
        while !self.handlers.is_empty() {
            tokio::select! {
                told = self.handlers.recv() => self.on_told(told),
                () = &mut grace => {
                    tracing::warn!(
                        target: "prereq",
                        running = self.handlers.len(),
                        "shutdown grace over: abandoning running handlers; the broker redelivers their messages"
                    );
                    self.handlers.abort_all();
                    while !self.handlers.is_empty() {
                        let told = self.handlers.recv().await;
                        self.on_told(told);
                    }
                    return;
                }
            }
        }
    }

    /// Give every message in memory back to the transport, in the order it was received; but
    /// where that would let whoever consumes next take a key's messages out of order, they are
    /// deferred in the key's order instead (`defer_behind`):
    ///
    /// - one that waits behind a deferred message of its key (out in a delay) would reach it
    ///   before that message: it is deferred until after it;
    /// - a key's messages that came back from a delay after a later one arrived (a broker puts
    ///   a given-back message at its place in its queue: the later one's is earlier), or that
    ///   came some from a delay and some not (the delayed ones come back through the retry
    ///   path, maybe another queue): they are deferred together, so that they travel one path,
    ///   in order.
    fn give_back(&mut self) {
        self.stopping.cancel();
        let mut all: Vec<(Hashed<K>, Pending<M>)> = self.hold.drain();
        all.extend(self.lanes.drain());
        for (key, waiting) in self.lookups.drain() {
            all.extend(waiting.into_iter().map(|w| (key.clone(), w.p)));
        }
        self.looking = 0;
        all.sort_unstable_by_key(|(_, p)| p.meta.id);
        let unordered = if self.cfg.keep_order {
            unordered_keys(&all)
        } else {
            HashSet::new()
        };
        let mut behind: HashMap<Hashed<K>, Vec<Pending<M>>> = HashMap::new();
        let mut together: HashMap<Hashed<K>, Vec<Pending<M>>> = HashMap::new();
        for (key, p) in all {
            if self.behind_deferred(key.key(), p.meta.pos) {
                behind.entry(key).or_default().push(p);
                continue;
            }
            if unordered.contains(&key) {
                together.entry(key).or_default().push(p);
                continue;
            }
            let event = event_of(&p.meta, Some(key.into_key()), Decision::Requeued);
            self.settle(event, Settle::Requeue);
        }
        for (key, waiting) in together {
            self.defer_behind(key.into_key(), waiting, DeferCause::OrderAtStop);
        }
        for (key, waiting) in behind {
            self.defer_behind(key.into_key(), waiting, DeferCause::BehindDeferred);
        }
    }

    /// At a stop, defer messages of `key` in their order, one after the other, all with one
    /// delay that ends after the last of its deferred messages can be back in its queue (or
    /// just `BEHIND_MARGIN` when none is out): they reach whoever consumes next after those,
    /// in order. (Each delayed by as much as the transport may shorten it, plus
    /// `BEHIND_MARGIN`; a deferral that does not count as an attempt.)
    fn defer_behind(&mut self, key: K, mut waiting: Vec<Pending<M>>, cause: DeferCause) {
        waiting.sort_unstable_by_key(|p| p.meta.pos);
        let now = Instant::now();
        let back = self.away.latest_back(&key).unwrap_or(now);
        let delay = back.saturating_duration_since(now) * away::ROUNDING / (away::ROUNDING - 1)
            + BEHIND_MARGIN;
        let batch: Vec<(Event<K>, Settle)> = waiting
            .iter()
            .map(|p| {
                let (settle, decision) =
                    deferral(&*self.cfg.policy, &key, &p.meta, cause, Some(delay), None);
                (event_of(&p.meta, Some(key.clone()), decision), settle)
            })
            .collect();
        let transport = Arc::clone(&self.transport);
        self.work.spawn(async move {
            let mut events = Vec::with_capacity(batch.len());
            for (event, settle) in batch {
                events.push(settle_with(&*transport, event, settle).await);
            }
            Work::Batch(events)
        });
    }

    /// Wait for every settlement (and registration write) in flight.
    async fn finish_work(&mut self) {
        while let Some(done) = self.work.join_next().await {
            match done {
                Ok(Work::Settled(Some(event)) | Work::Deferral { event, .. }) => self.emit(event),
                Ok(Work::Batch(events)) => events.into_iter().for_each(|e| self.emit(e)),
                Ok(Work::Recorded { registered, .. }) => {
                    self.emit(registered.clone());
                    self.settle_quietly(registered, Settle::Ack);
                }
                Ok(Work::Unrecorded { event, settle }) => self.settle(event, settle),
                // Everything was given back; a late answer concerns nothing.
                Ok(Work::Settled(None) | Work::Looked { .. }) | Err(_) => {}
            }
        }
    }

    // ---- What arrives -----------------------------------------------------------------------

    fn on_delivery(&mut self, d: Delivery) {
        probe::stamp(Stage::Decided, d.source, d.id, None);
        if d.partition.is_some() && self.transport.is_stale(d.id) {
            // From a partition being given up: give it back.
            let event = self.event(&d, None, Decision::Requeued);
            return self.settle(event, Settle::Requeue);
        }
        match d.source {
            Source::Registration => self.on_registration(d),
            Source::Message => self.on_message(d),
        }
    }

    /// A registration: its key is known from now on; it is acknowledged once the source
    /// recorded it.
    fn on_registration(&mut self, d: Delivery) {
        let decoded = match &self.cfg.registration {
            Some(decode) => decode(&d.body),
            None => Err(
                "a registration arrived, but this consumer has no registration decoder \
                 (`.registrations(..)`)"
                    .to_owned(),
            ),
        };
        let key = match decoded {
            Ok(key) => key,
            Err(reason) => return self.dead_letter_undecodable(d, reason),
        };
        // The key is known once the source recorded it; the registration is acknowledged
        // after that. A source that records at once (in memory) is answered here.
        let event = self.event(&d, Some(key.clone()), Decision::Registered);
        self.now_or_later(record(
            self.cfg.source.clone(),
            key,
            event,
            self.stopping.clone(),
        ));
    }

    /// A dependent message: run it, hold it, or ask the source about its key.
    fn on_message(&mut self, d: Delivery) {
        let msg = match (self.cfg.decode)(&d.body) {
            Ok(m) => m,
            Err(reason) => return self.dead_letter_undecodable(d, reason),
        };
        let key = (self.cfg.key)(&msg);
        let message_id: Option<Arc<str>> = match &self.cfg.id {
            Some(f) => Some(f(&msg).into()),
            None => d.message_id.as_deref().map(Arc::from),
        };
        let seed = message_id
            .as_deref()
            .map_or_else(|| seed_of(&d.body), |id| seed_of(id.as_bytes()));
        let mut p = Pending {
            msg,
            meta: Meta {
                id: d.id,
                pos: 0,
                attempt: d.attempt,
                max_attempts: d.max_attempts,
                message_id,
                redelivered: d.redelivered,
                seed,
                size: u32::try_from(d.body.len()).unwrap_or(u32::MAX),
                held_at: None,
                partition: d.partition,
            },
        };
        if d.redelivered {
            p = match self.replace_held(p) {
                Ok(stale) => {
                    // The broker gave a held message again (its connection dropped): the copy
                    // took the held one's place; the stale delivery is dropped (an ack is
                    // harmless on a dead channel, and consumes a live duplicate otherwise).
                    tracing::debug!(target: "prereq", message_id = stale.message_id.as_deref(),
                        "a redelivered copy replaced its held original");
                    let event = event_of(&stale, Some(key), Decision::Held);
                    self.settle_quietly(event, Settle::Ack);
                    return;
                }
                Err(p) => p,
            };
        }
        // A deferred message coming back takes its old position, before later arrivals.
        let back = self.away.claim(&key, seed);
        p.meta.pos = back.unwrap_or_else(|| {
            self.next_pos += 1;
            self.next_pos
        });
        let key = self.hashed(key);
        self.route(key.clone(), p);
        if back.is_some() {
            self.release_ready(&key);
        }
    }

    /// The source says `key` became known (by any path), or that notifications were lost.
    fn on_wake(&mut self, wake: Wake<K>) {
        match wake {
            Wake::Known(key) => self.known(self.hashed(key)),
            Wake::Resync => self.recheck_held(),
        }
    }

    /// Ask the source again about every held key (none is in flight).
    fn recheck_held(&mut self) {
        let keys: Vec<Hashed<K>> = self
            .hold
            .keys()
            .filter(|k| !self.lookups.contains_key(*k))
            .cloned()
            .collect();
        tracing::debug!(target: "prereq", keys = keys.len(), "re-checking held keys");
        for key in keys {
            self.start_lookup(key, Vec::new());
        }
    }

    fn on_work(&mut self, work: Work<K>) {
        match work {
            Work::Settled(Some(event)) => self.emit(event),
            Work::Settled(None) => {}
            Work::Recorded { key, registered } => {
                self.emit(registered.clone());
                self.settle_quietly(registered, Settle::Ack);
                self.known(self.hashed(key));
            }
            Work::Unrecorded { event, settle } => self.settle(event, settle),
            Work::Looked { key, answer } => self.on_answer(key, answer),
            Work::Deferral { key, pos, event } => self.on_deferral(key, pos, event),
            Work::Batch(events) => events.into_iter().for_each(|e| self.emit(e)),
        }
    }

    fn on_told(&mut self, told: Told<Handled<K>, Left<M>>) {
        match told {
            Told::Output(id, handled) => self.on_handled(id, handled),
            Told::Returned(id) => self.on_returned(id),
            Told::Ended(id, left) => self.on_job_end(id, left.unwrap_or_default(), false),
            Told::Lost(id, left) => self.on_job_end(id, left.unwrap_or_default(), true),
        }
    }

    /// Job `id` ran its last handler successfully and acknowledges now: the key's next message
    /// may start. (Its order is the handlers' order; an acknowledgement that is
    /// lost with its connection makes the broker deliver the message again, as always.)
    fn on_returned(&mut self, id: u64) {
        if let Some(running) = self.handlers.get_mut(id)
            && std::mem::replace(&mut running.lane, false)
        {
            self.lanes.finish(&running.key);
        }
    }

    /// Job `id` is done with a message: settle it by the outcome.
    fn on_handled(&mut self, id: u64, handled: Handled<K>) {
        if let Some(running) = self.handlers.get_mut(id) {
            if running.unreported > 1 {
                self.in_jobs -= 1;
            }
            running.unreported = running.unreported.saturating_sub(1);
        }
        let at = self.handlers.taken_at();
        self.on_outcome(handled, at);
    }

    /// A message's outcome, known to the loop `at` (not before the handler returned): emit it,
    /// or defer or dead-letter the message.
    fn on_outcome(&mut self, handled: Handled<K>, at: Instant) {
        let Handled { key, meta, outcome } = handled;
        match outcome {
            Outcome::Acked => self.emit(event_at(&meta, Some(key), Decision::Handled, at)),
            Outcome::AckFailed(error) => {
                self.emit(event_at(
                    &meta,
                    Some(key),
                    Decision::SettleFailed { error },
                    at,
                ));
            }
            Outcome::Failed(e) if e.is_permanent() => {
                let dl = DeadLetter::new(DeadLetterKind::Rejected, e.chain(), meta.attempt);
                self.dead_letter(key.clone(), &meta, dl);
            }
            Outcome::Failed(e) => {
                self.defer(key.clone(), &meta, DeferCause::HandlerRetry, Some(&e));
                if self.away.first(&key) == Some(meta.pos) {
                    // The key is blocked by this message now: what waited in its lane waits
                    // behind it.
                    let key = self.hashed(key);
                    for (_, p) in self.lanes.take(&key) {
                        self.hold_or_defer(key.clone(), p, DeferCause::BehindDeferred);
                    }
                }
            }
        }
    }

    /// Job `id` ended; what it did not run goes back to its key's lane (or the hold, behind a
    /// deferred message of the key; or the broker, if its partition is being given up), then
    /// the lane is freed if the job still had it. A `lost` job was cancelled (at the end of the
    /// shutdown grace): the message it was running stays unsettled, and the broker delivers it
    /// again.
    fn on_job_end(&mut self, id: u64, left: Left<M>, lost: bool) {
        if let Some(running) = self.handlers.remove(id, lost) {
            self.job_done(running, left);
        }
    }

    /// A job (`running`) is done, `left` not run.
    fn job_done(&mut self, running: Running<K>, left: Left<M>) {
        self.in_jobs -= running.unreported.saturating_sub(1);
        for p in left {
            let key = running.key.clone();
            if p.meta.partition.is_some_and(|q| self.revoking.contains(&q)) {
                let event = event_of(&p.meta, Some(key.into_key()), Decision::Requeued);
                self.settle(event, Settle::Requeue);
            } else if self.transport.is_stale(p.meta.id) {
                // Its channel failed since (a reconnect): the broker delivers it again, and
                // running it now would run it twice.
                let failed = Decision::SettleFailed {
                    error: STALE.to_owned(),
                };
                self.emit(event_of(&p.meta, Some(key.key().clone()), failed));
                let event = event_of(&p.meta, Some(key.into_key()), Decision::Requeued);
                self.settle_quietly(event, Settle::Requeue);
            } else {
                self.enqueue_known(key, p);
            }
        }
        if running.lane {
            self.lanes.finish(&running.key);
        }
        self.release_partition_if_idle(running.partition);
    }

    /// The transport gives up `partition`: give back what is held or queued of it, in the order
    /// it was received; once its running handlers finished, tell the transport.
    fn on_revoked(&mut self, partition: u32) {
        self.revoking.insert(partition);
        let of = |p: &Pending<M>| p.meta.partition == Some(partition);
        let mut back: Vec<(Hashed<K>, Pending<M>)> = self.hold.take_where(of);
        back.extend(self.lanes.take_where(of));
        let keys: Vec<Hashed<K>> = self.lookups.keys().cloned().collect();
        for key in keys {
            if let Some(waiting) = self.lookups.get_mut(&key) {
                let (gone, kept): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|w| of(&w.p));
                *waiting = kept;
                self.looking -= gone.len();
                back.extend(gone.into_iter().map(|w| (key.clone(), w.p)));
            }
        }
        back.sort_unstable_by_key(|(_, p)| p.meta.id);
        tracing::info!(target: "prereq", partition, given_back = back.len(),
            "giving a partition up");
        for (key, p) in back {
            let event = event_of(&p.meta, Some(key.into_key()), Decision::Requeued);
            self.settle(event, Settle::Requeue);
        }
        self.release_partition_if_idle(Some(partition));
    }

    /// If `partition` is being given up and none of its handlers runs any more, tell the
    /// transport.
    fn release_partition_if_idle(&mut self, partition: Option<u32>) {
        let Some(partition) = partition.filter(|p| self.revoking.contains(p)) else {
            return;
        };
        if self.handlers.iter().any(|r| r.partition == Some(partition)) {
            return;
        }
        self.revoking.remove(&partition);
        self.transport.released(partition);
    }

    /// The source answered about `key`.
    fn on_answer(&mut self, key: Hashed<K>, answer: Result<bool, KeyError<BoxError>>) {
        match answer {
            Ok(true) => {
                self.source_answers();
                self.known(key);
            }
            Ok(false) => {
                self.source_answers();
                for w in self.take_waiting(&key) {
                    if w.expired {
                        let k = key.key().clone();
                        self.defer(k, &w.p.meta, DeferCause::HoldExpired, None);
                    } else {
                        self.hold_or_defer(key.clone(), w.p, DeferCause::HoldFull);
                    }
                }
            }
            Err(KeyError::Unavailable(e)) => {
                self.source_failed(&e);
                for w in self.take_waiting(&key) {
                    if w.expired {
                        let k = key.key().clone();
                        self.defer(k, &w.p.meta, DeferCause::SourceUnavailable, None);
                    } else {
                        self.hold_or_defer(key.clone(), w.p, DeferCause::SourceUnavailable);
                    }
                }
            }
            Err(KeyError::InvalidKey(reason)) => {
                for w in self.take_waiting(&key) {
                    let dl = DeadLetter::new(
                        DeadLetterKind::InvalidKey,
                        format!("the key source refused key {:?}: {reason}", key.key()),
                        w.p.meta.attempt,
                    );
                    self.dead_letter(key.key().clone(), &w.p.meta, dl);
                }
            }
        }
    }

    /// Hold times and deferred messages' return times ran out.
    fn expire(&mut self) {
        let now = Instant::now();
        if let Some((at, wait)) = self.recheck
            && at <= now
        {
            // The source failed: has it come back?
            self.recheck = Some((now + wait, (wait * 2).min(RECHECK_MAX)));
            self.recheck_held();
        }
        // A deferred message that did not come back in time stops blocking its key.
        while let Some(key) = self.away.pop_expired(now) {
            self.release_ready(&self.hashed(key));
        }
        let mut expired = Vec::new();
        while let Some(entry) = self.hold.pop_expired(now) {
            expired.push(entry);
        }
        for (key, p) in expired {
            if self.cache.contains(&key) {
                // Its key is known: it waited behind a deferred message of its key.
                self.defer(key.into_key(), &p.meta, DeferCause::BehindDeferred, None);
            } else if let Some(waiting) = self.lookups.get_mut(&key) {
                waiting.push(Waiting { p, expired: true });
                self.looking += 1;
            } else {
                // Ask the source once more before deferring: the key may have become known by
                // a path that did not notify.
                self.start_lookup(key, vec![Waiting { p, expired: true }]);
            }
        }
    }

    // ---- Where a message goes ---------------------------------------------------------------

    /// A new (or returning) message of `key`.
    fn route(&mut self, key: Hashed<K>, p: Pending<M>) {
        if self.cache.contains(&key) {
            self.run_or_enqueue(key, p);
        } else if let Some(waiting) = self.lookups.get_mut(&key) {
            waiting.push(Waiting { p, expired: false });
            self.looking += 1;
        } else if self.hold.holds(&key) {
            // Messages of the key are held: it was unknown moments ago, and any news of it
            // wakes them all.
            self.hold_or_defer(key, p, DeferCause::HoldFull);
        } else {
            self.start_lookup(key, vec![Waiting { p, expired: false }]);
        }
    }

    /// A new message of a known `key`: run by the loop at once where it could start at once
    /// (nothing waits to start, no message of the key waits or runs, a handler is free, and
    /// the loop runs jobs itself), else to its lane as `enqueue_known`. A lane is made only if
    /// its handler has to wait: one look-up of the key's lane, not five (docs/performance.md,
    /// round 21).
    fn run_or_enqueue(&mut self, key: Hashed<K>, p: Pending<M>) {
        if self.here.is_now()
            && self.handlers.len() < self.cfg.concurrency
            && self.lanes.is_clear(&key)
            && self.away.first(key.key()).is_none()
        {
            let running = Running {
                key: key.clone(),
                partition: p.meta.partition,
                lane: false,
                unreported: 1,
            };
            return self.run_one(running, key.into_key(), p);
        }
        self.enqueue_known(key, p);
    }

    /// `key` is known: to its lane, unless an earlier message of the key is deferred.
    fn enqueue_known(&mut self, key: Hashed<K>, p: Pending<M>) {
        if self.behind_deferred(key.key(), p.meta.pos) {
            self.hold_or_defer(key, p, DeferCause::BehindDeferred);
        } else {
            self.lanes.push(key, p.meta.pos, p);
        }
    }

    /// Does the message at `pos` of `key` wait behind a deferred message of its key?
    fn behind_deferred(&self, key: &K, pos: u64) -> bool {
        self.away.first(key).is_some_and(|first| first < pos)
    }

    /// `key` with its hash for the cache and the lanes.
    fn hashed(&self, key: K) -> Hashed<K> {
        Hashed::new(&self.hasher, key)
    }

    /// `key` is known: remember it, and move what waited for it to its lane.
    fn known(&mut self, key: Hashed<K>) {
        self.cache.insert(key.clone());
        for w in self.take_waiting(&key) {
            if w.expired {
                // It was held until the re-check found its key (rare: the clock read here, not
                // for every key; `release_ready` reads it for what it releases).
                let now = Instant::now();
                let waited = self.hold.waited(w.p.meta.held_at, now);
                self.emit(released(&w.p.meta, key.key(), waited, now));
            }
            self.enqueue_known(key.clone(), w.p);
        }
        self.release_ready(&key);
    }

    /// Release the held messages of a known `key` that no deferred message precedes.
    fn release_ready(&mut self, key: &Hashed<K>) {
        if !self.hold.holds(key) || !self.cache.contains(key) {
            return;
        }
        let limit = self.away.first(key.key()).unwrap_or(u64::MAX);
        let now = Instant::now();
        let stamp = self.hold.stamp(now);
        let taken = self.hold.take_before(key, limit);
        for (_, p) in &taken {
            let waited = stamp.since(p.meta.held_at);
            self.emit(released(&p.meta, key.key(), waited, now));
        }
        self.lanes.extend(key, taken);
        // A release can take a while (an event for each message): the next job on the loop is
        // timed from a new look at the clock, not from before it.
        self.here.waits();
    }

    /// Hold `p`, or defer it for `cause` if the hold has no room.
    fn hold_or_defer(&mut self, key: Hashed<K>, mut p: Pending<M>, cause: DeferCause) {
        if !self.hold.fits(p.meta.size as usize) {
            return self.defer(key.into_key(), &p.meta, cause, None);
        }
        let now = self.here.clock();
        let stamp = self.hold.stamp(now);
        p.meta.held_at.get_or_insert(stamp);
        let event = event_at(&p.meta, Some(key.key().clone()), Decision::Held, now);
        let pos = p.meta.pos;
        self.hold.insert_at(key, pos, p, stamp);
        self.report.peak_held = self.report.peak_held.max(self.hold.len());
        self.emit(event);
    }

    /// If a message with `p`'s id is held, put `p` in its place (keeping its position and hold
    /// time) and return the one it replaced; else give `p` back.
    fn replace_held(&mut self, mut p: Pending<M>) -> Result<Meta, Pending<M>> {
        let held = p
            .meta
            .message_id
            .as_deref()
            .and_then(|id| self.hold.by_id(id));
        match held {
            Some(held) => {
                p.meta.held_at = held.meta.held_at;
                p.meta.pos = held.meta.pos;
                self.hold.replace(p).map(|replaced| replaced.meta)
            }
            None => Err(p),
        }
    }

    /// Ask the source about `key` for the `waiting` messages (possibly none: a re-check).
    fn start_lookup(&mut self, key: Hashed<K>, waiting: Vec<Waiting<M>>) {
        self.looking += waiting.len();
        self.lookups.insert(key.clone(), waiting);
        let mut answer = self.cfg.source.contains(key.key().clone());
        let slots = Arc::clone(&self.lookup_slots);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                // A source that answers at once (in memory) is answered here, without a task.
                if let Some(answer) = (&mut answer).now_or_never() {
                    drop(permit);
                    return self.on_answer(key, answer);
                }
                self.work.spawn(async move {
                    let answer = answer.await;
                    drop(permit);
                    Work::Looked { key, answer }
                });
            }
            Err(_) => {
                self.work.spawn(async move {
                    let _permit = slots.acquire_owned().await;
                    Work::Looked {
                        key,
                        answer: answer.await,
                    }
                });
            }
        }
    }

    /// The messages that waited for the lookup of `key`, which is over.
    fn take_waiting(&mut self, key: &Hashed<K>) -> Vec<Waiting<M>> {
        let waiting = self.lookups.remove(key).unwrap_or_default();
        self.looking -= waiting.len();
        waiting
    }

    fn source_failed(&mut self, e: &BoxError) {
        if !self.source_down {
            self.source_down = true;
            self.recheck = Some((Instant::now() + RECHECK_FIRST, RECHECK_FIRST * 2));
            tracing::warn!(target: "prereq", error = %e,
                "key source unavailable: holding messages until it answers again");
        }
    }

    fn source_answers(&mut self) {
        if self.source_down {
            self.source_down = false;
            self.recheck = None;
            tracing::info!(target: "prereq", "key source answers again");
        }
    }

    /// Start handlers for runnable lanes, up to the concurrency; of the jobs the loop runs
    /// itself (which take no slot), at most `at_once`, so that it looks at its other sources
    /// between them (keys released together are as many jobs). How many of those it ran.
    fn start_handlers(&mut self, at_once: usize) -> usize {
        let mut ran = 0;
        while self.handlers.len() < self.cfg.concurrency && ran < at_once {
            let Some((key, first, mut batch)) = self
                .lanes
                .start_batch(JOB_MAX, |a, b| a.meta.partition == b.meta.partition)
            else {
                return ran;
            };
            self.in_jobs += batch.len();
            let running = Running {
                key: key.clone(),
                partition: first.meta.partition,
                lane: true,
                unreported: batch.len() + 1,
            };
            if self.here.now() {
                ran += 1;
                if batch.is_empty() {
                    self.run_one(running, key.into_key(), first);
                } else {
                    batch.push_front(first);
                    self.run_job_here(running, key.into_key(), batch);
                }
            } else {
                batch.push_front(first);
                let (cfg, transport, draining) = (&self.cfg, &self.transport, &self.draining);
                self.handlers.start(running, key.into_key(), batch, |jobs| {
                    worker(
                        Arc::clone(cfg),
                        Arc::clone(transport),
                        Arc::clone(draining),
                        jobs,
                    )
                });
            }
        }
        ran
    }

    /// A job of several messages that the loop runs itself, for up to `here::BUDGET`; one that
    /// has to wait or runs past its budget goes on in a worker from where it stopped.
    fn run_job_here(&mut self, running: Running<K>, key: K, batch: Left<M>) {
        let started = self.here.started();
        let mut teller = self.handlers.start_here(running, batch);
        teller.gather_in(self.here.outputs());
        let id = teller.job();
        let mut job = self.job_here(key, teller, started, None);
        // A panic outside the handler (which `call` catches), as a worker's death: the job is
        // dropped, its teller tells it lost.
        match std::panic::catch_unwind(AssertUnwindSafe(|| job.as_mut().now_or_never())) {
            Ok(Some(outputs)) => self.here.ended(outputs, Instant::now()),
            Ok(None) => self.hand_over(id, job),
            Err(_) => {
                tracing::error!(
                    target: "prereq",
                    "a handler job panicked outside its handler: its messages run again"
                );
                self.here.handed_over();
            }
        }
    }

    /// A job of one message that the loop runs itself, and settles at once where it can: its
    /// outcome is handled here, not told through the jobs' inbox. A handler that has to wait goes
    /// on in a worker as a job the loop began (`run_job`'s `first`), an acknowledgement not done
    /// at once too (the key's next message need not wait for it); what `run_job` does for each
    /// message, for one that completes at once.
    fn run_one(&mut self, mut running: Running<K>, key: K, p: Pending<M>) {
        // (No job starts once the consumer drains: only the staleness is looked at.)
        if self.transport.is_stale(p.meta.id) {
            // Requeued as what a job did not run.
            return self.job_done(running, VecDeque::from([p]));
        }
        let started = self.here.started();
        let Pending { msg, meta } = p;
        let done = match call(&self.cfg, &key, msg, &meta) {
            Ok(mut called) => match (&mut called).now_or_never() {
                Some(done) => done,
                None => {
                    if !running.lane {
                        // Begun without its lane: the key's later messages wait for it.
                        self.lanes.run(running.key.clone());
                        running.lane = true;
                    }
                    let teller = self.handlers.start_here(running, VecDeque::new());
                    let id = teller.job();
                    let job = self.job_here(key, teller, started, Some((called, meta)));
                    return self.hand_over(id, job);
                }
            },
            Err(e) => Ok(Err(e)),
        };
        let handled = match done.unwrap_or_else(|payload| Err(panicked(&*payload))) {
            Ok(()) => {
                let transport = Arc::clone(&self.transport);
                let mut acking = Box::pin(async move { acked(&*transport, key, meta).await });
                match std::panic::catch_unwind(AssertUnwindSafe(|| (&mut acking).now_or_never())) {
                    Ok(Some(handled)) => handled,
                    Ok(None) => {
                        let mut teller = self.handlers.start_here(running, VecDeque::new());
                        let id = teller.job();
                        teller.returned();
                        let job = async move {
                            let done = acking.await;
                            teller.output(done);
                            teller.ended()
                        };
                        return self.hand_over(id, Box::pin(job));
                    }
                    Err(_) => {
                        tracing::error!(
                            target: "prereq",
                            "a handler job panicked outside its handler: its message runs again"
                        );
                        self.here.handed_over();
                        return self.job_done(running, VecDeque::new());
                    }
                }
            }
            Err(e) => Handled {
                key,
                meta,
                outcome: Outcome::Failed(e),
            },
        };
        // One look at the clock: the job's end (for its budget) and its outcome's date.
        let at = Instant::now();
        self.here.done(at);
        self.on_outcome(handled, at);
        self.job_done(running, VecDeque::new());
    }

    /// A job the loop runs itself, `started` now (see `job_here`), boxed so that a worker can
    /// go on with it.
    fn job_here(
        &self,
        key: K,
        teller: Teller<Handled<K>, Left<M>>,
        started: Instant,
        first: Option<(Called, Meta)>,
    ) -> Resumed<Handled<K>> {
        Box::pin(job_here(
            Arc::clone(&self.cfg),
            Arc::clone(&self.transport),
            Arc::clone(&self.draining),
            key,
            teller,
            started + here::BUDGET,
            first,
        ))
    }

    /// Job `id`, which the loop began, goes on in a worker; so do the next jobs, for a while.
    fn hand_over(&mut self, id: u64, job: Resumed<Handled<K>>) {
        self.here.handed_over();
        let (cfg, transport, draining) = (&self.cfg, &self.transport, &self.draining);
        self.handlers.hand_over(id, job, |jobs| {
            worker(
                Arc::clone(cfg),
                Arc::clone(transport),
                Arc::clone(draining),
                jobs,
            )
        });
    }

    // ---- Settling ---------------------------------------------------------------------------

    /// Defer through the broker for `cause`, or dead-letter if the policy gives up.
    fn defer(&mut self, key: K, meta: &Meta, cause: DeferCause, error: Option<&HandlerError>) {
        let now = Instant::now();
        let min_delay = match cause {
            DeferCause::BehindDeferred => self
                .away
                .first_due(&key)
                .map(|t| t.saturating_duration_since(now) + BEHIND_MARGIN),
            _ => error.and_then(HandlerError::min_delay),
        };
        let (settle, decision) = deferral(&*self.cfg.policy, &key, meta, cause, min_delay, error);
        let event = event_of(meta, Some(key.clone()), decision);
        if let Settle::Defer { delay, .. } = &settle
            && self.cfg.keep_order
            && !self.transport.is_stale(meta.id)
        {
            // Recorded now, so that what arrives meanwhile waits behind it; kept if the copy is
            // not stored (`Work::Deferral`). A void delivery (`Transport::is_stale`) is not
            // recorded: after a reconnect the broker delivers it again ahead of its queue's
            // later messages (its copy may be here already, behind it), and a partition being
            // handed over runs none of its messages here any more.
            let due = now + *delay;
            self.away.insert(
                key.clone(),
                meta.pos,
                meta.seed,
                [now, due, due + AWAY_GRACE],
            );
            let transport = Arc::clone(&self.transport);
            let pos = meta.pos;
            self.work.spawn(async move {
                let event = settle_with(&*transport, event, settle).await;
                Work::Deferral { key, pos, event }
            });
            return;
        }
        self.settle(event, settle);
    }

    /// A deferral that keeps its key's order finished. If it failed, the broker gives the
    /// original back (or stored the copy after all): the key's later messages go on waiting
    /// for whichever comes first, for `AWAY_GRACE` at most (it may come to another instance).
    fn on_deferral(&mut self, key: K, pos: u64, event: Event<K>) {
        let failed = matches!(event.decision, Decision::SettleFailed { .. });
        self.emit(event);
        if failed {
            let now = Instant::now();
            self.away.failed(&key, pos, now, now + AWAY_GRACE);
        }
    }

    fn dead_letter(&mut self, key: K, meta: &Meta, dl: DeadLetter) {
        let event = event_of(meta, Some(key), Decision::DeadLettered(dl.clone()));
        self.settle(event, Settle::DeadLetter(dl));
    }

    fn dead_letter_undecodable(&mut self, d: Delivery, reason: String) {
        let dl = DeadLetter::new(DeadLetterKind::Undecodable, reason, d.attempt);
        let event = self.event(&d, None, Decision::DeadLettered(dl.clone()));
        self.settle(event, Settle::DeadLetter(dl));
    }

    /// Carry out `settle` (at once where the transport answers at once, else in a task); emit
    /// `event` once the transport confirmed it, or a `SettleFailed` event if it did not.
    fn settle(&mut self, event: Event<K>, settle: Settle) {
        self.settle_then(event, settle, Some);
    }

    /// Like [`Engine::settle`], but emit an event only if the transport failed.
    fn settle_quietly(&mut self, event: Event<K>, settle: Settle) {
        self.settle_then(event, settle, quiet);
    }

    /// Carry out `settle`; `report` picks what of its event to emit.
    fn settle_then(
        &mut self,
        event: Event<K>,
        settle: Settle,
        report: fn(Event<K>) -> Option<Event<K>>,
    ) {
        let transport = Arc::clone(&self.transport);
        self.now_or_later(Box::pin(async move {
            Work::Settled(report(settle_with(&*transport, event, settle).await))
        }));
    }

    /// `work` done here if it completes at once (a settlement the transport answers at once, as
    /// the in-memory one does; a key the source records at once), else in a task of its own. A
    /// task spawned from the loop wakes a parked runtime thread to take it: one registration's
    /// acknowledgement cost a thread's wake-up and its return (docs/performance.md, round 21).
    /// Boxed by the caller (it is looked at once, then may move to its task).
    fn now_or_later(&mut self, mut work: impl Future<Output = Work<K>> + Send + Unpin + 'static) {
        match (&mut work).now_or_never() {
            Some(done) => self.on_work(done),
            None => {
                self.work.spawn(work);
            }
        }
    }

    // ---- Events -----------------------------------------------------------------------------

    fn event(&self, d: &Delivery, key: Option<K>, decision: Decision) -> Event<K> {
        Event {
            at: Instant::now(),
            delivery: d.id,
            message_id: d.message_id.clone(),
            key,
            attempt: d.attempt,
            decision,
        }
    }

    fn emit(&mut self, event: Event<K>) {
        let r = &mut self.report;
        match &event.decision {
            Decision::Registered => r.registered += 1,
            Decision::Held => r.held += 1,
            Decision::Released { .. } => r.released += 1,
            Decision::Handled => r.handled += 1,
            Decision::Deferred { .. } => r.deferred += 1,
            Decision::DeadLettered(_) => r.dead_lettered += 1,
            Decision::Requeued => r.requeued += 1,
            Decision::SettleFailed { .. } => r.settle_failures += 1,
        }
        trace(&event);
        #[cfg(feature = "metrics")]
        crate::metrics::record(&event.decision, self.hold.len());
        if let Some(observer) = &self.cfg.observer {
            observer(&event);
        }
    }
}

fn event_of<K>(meta: &Meta, key: Option<K>, decision: Decision) -> Event<K> {
    event_at(meta, key, decision, Instant::now())
}

/// The event of a decision taken at `at` (a time the caller read already).
fn event_at<K>(meta: &Meta, key: Option<K>, decision: Decision, at: Instant) -> Event<K> {
    Event {
        at,
        delivery: meta.id,
        message_id: meta.message_id.as_deref().map(str::to_owned),
        key,
        attempt: meta.attempt,
        decision,
    }
}

/// The event of a held message released at `at` after it `waited`.
fn released<K: Clone>(meta: &Meta, key: &K, waited: Duration, at: Instant) -> Event<K> {
    event_at(meta, Some(key.clone()), Decision::Released { waited }, at)
}

/// The event, if the settlement failed.
fn quiet<K>(event: Event<K>) -> Option<Event<K>> {
    matches!(event.decision, Decision::SettleFailed { .. }).then_some(event)
}

async fn settle_with<K, T: Transport + ?Sized>(
    transport: &T,
    mut event: Event<K>,
    settle: Settle,
) -> Event<K> {
    if let Err(e) = transport.settle(event.delivery, settle).await {
        event.decision = Decision::SettleFailed {
            error: e.to_string(),
        };
    }
    event.at = Instant::now();
    event
}

/// Record a registration's key in the source; while the source fails, retry (the registration
/// stays unacknowledged), until the consumer stops: then give it back.
fn record<K: Key>(
    source: SharedSource<K>,
    key: K,
    mut event: Event<K>,
    stopping: CancellationToken,
) -> std::pin::Pin<Box<dyn Future<Output = Work<K>> + Send>> {
    Box::pin(async move {
        let mut wait = INSERT_RETRY_FIRST;
        loop {
            match source.insert(key.clone()).await {
                Ok(()) => {
                    event.at = Instant::now();
                    return Work::Recorded {
                        key,
                        registered: event,
                    };
                }
                Err(KeyError::InvalidKey(reason)) => {
                    let dl = DeadLetter::new(
                        DeadLetterKind::InvalidKey,
                        format!("the key source refused key {key:?}: {reason}"),
                        event.attempt,
                    );
                    event.decision = Decision::DeadLettered(dl.clone());
                    return Work::Unrecorded {
                        event,
                        settle: Settle::DeadLetter(dl),
                    };
                }
                Err(KeyError::Unavailable(e)) => {
                    tracing::debug!(target: "prereq", key = ?key, error = %e,
                        "the key source could not record a registration; retrying");
                }
            }
            tokio::select! {
                () = stopping.cancelled() => {
                    event.decision = Decision::Requeued;
                    return Work::Unrecorded { event, settle: Settle::Requeue };
                }
                () = tokio::time::sleep(wait) => wait = (wait * 2).min(INSERT_RETRY_MAX),
            }
        }
    })
}

/// A worker: runs the jobs it is given, one after another, until the engine drops its channel.
#[allow(clippy::manual_async_fn)]
fn worker<K: Key, M: Send + 'static, T: Transport>(
    cfg: Arc<Config<K, M>>,
    transport: Arc<T>,
    draining: Arc<AtomicBool>,
    mut jobs: Jobs<K, Handled<K>, Left<M>>,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let ack = |key: K, meta: Meta| acked(&*transport, key, meta);
        // The box of the last acknowledgement that completed at once, for the next one.
        let mut spare = None;
        // The list the last job gathered its outcomes in, for the next one.
        let mut outputs = Vec::new();
        while let Some(assigned) = jobs.recv().await {
            let (key, mut teller) = match assigned {
                Assigned::Start(key, teller) => (key, teller),
                Assigned::Resume(job) => {
                    outputs = job.await;
                    continue;
                }
            };
            teller.gather_in(std::mem::take(&mut outputs));
            let job = Job {
                cfg: &cfg,
                transport: &*transport,
                draining: &draining,
                ack: &ack,
                spare: &mut spare,
                until: None,
            };
            outputs = run_job(job, key, teller, None).await;
        }
    }
}

/// A job the loop runs itself: owns what it needs, so that a worker can go on with it
/// ([`Assigned::Resume`]) if it has to wait or runs out of its budget (`here::BUDGET`).
#[allow(clippy::manual_async_fn)]
fn job_here<K: Key, M: Send + 'static, T: Transport>(
    cfg: Arc<Config<K, M>>,
    transport: Arc<T>,
    draining: Arc<AtomicBool>,
    key: K,
    teller: Teller<Handled<K>, Left<M>>,
    until: Instant,
    first: Option<(Called, Meta)>,
) -> impl Future<Output = Vec<Handled<K>>> + Send + 'static {
    async move {
        let ack = |key: K, meta: Meta| acked(&*transport, key, meta);
        let mut spare = None;
        let job = Job {
            cfg: &cfg,
            transport: &*transport,
            draining: &draining,
            ack: &ack,
            spare: &mut spare,
            until: Some(until),
        };
        run_job(job, key, teller, first).await
    }
}

/// What a worker's jobs share.
struct Job<'a, K: Key, M, T, A, F> {
    /// The consumer's configuration: the handler.
    cfg: &'a Config<K, M>,
    /// To ask whether a delivery went stale before its handler runs.
    transport: &'a T,
    /// Set when the consumer stops.
    draining: &'a AtomicBool,
    /// Acknowledges a message whose handler succeeded (`acked`).
    ack: &'a F,
    /// A box for the next acknowledgement: each that completes at once leaves its box here, so
    /// that the next takes it rather than allocate one (one allocation and one free per
    /// message less; docs/performance.md, round 17). A box, not the stack: one that does not
    /// complete at once is kept (as it is) while the next handler runs.
    spare: &'a mut Option<Pin<Box<A>>>,
    /// For a job the loop runs itself: when it goes on in a worker (it lets the loop go, once,
    /// before its next message after this time).
    until: Option<Instant>,
}

/// Run a key's messages (kept by `teller`) in order, each handler after the one before returned;
/// acknowledge each that succeeded (while the next runs). Tells the loop each outcome; stops
/// after a retryable failure, at a stale delivery (a reconnect, a revoked partition: the loop
/// gives it back), or once the consumer stops, and ends with the messages it did not run; returns
/// the list it gathered its outcomes in ([`Teller::ended`]).
///
/// A plain function returning an `async move` block, not an `async fn`: an `async fn` keeps
/// each argument twice in its future (once as given, once as the body's local). For the same
/// reason the handler is called in `call` (its context and span are not kept).
#[allow(clippy::manual_async_fn)]
fn run_job<'a, K, M, T, A, F>(
    job: Job<'a, K, M, T, A, F>,
    key: K,
    mut teller: Teller<Handled<K>, Left<M>>,
    first: Option<(Called, Meta)>,
) -> impl Future<Output = Vec<Handled<K>>> + Send + 'a
where
    K: Key,
    M: Send + 'static,
    T: Transport,
    A: Future<Output = Handled<K>> + Send + 'a,
    F: Fn(K, Meta) -> A + Sync,
{
    let Job {
        cfg,
        transport,
        draining,
        ack,
        spare,
        mut until,
    } = job;
    async move {
        // Acknowledgements still on their way (made only when one does not complete at once).
        let mut acks: Option<FuturesUnordered<_>> = None;
        let mut first = first;
        // What is not run yet stays with the teller: if the job is cancelled, the loop gets it
        // back. What the job did is told before it waits (`Teller::flush`) and with its end.
        loop {
            let (done, meta) = match first.take() {
                // A handler the loop called, which has to wait: the job goes on with it.
                Some((running, meta)) => (running.await, meta),
                None => {
                    let Some(p) = teller.unfinished().and_then(VecDeque::pop_front) else {
                        break;
                    };
                    if let Some(acks) = acks.as_mut() {
                        while let Some(Some(done)) = acks.next().now_or_never() {
                            teller.output(done);
                        }
                    }
                    if draining.load(Ordering::Acquire) || transport.is_stale(p.meta.id) {
                        if let Some(unfinished) = teller.unfinished() {
                            unfinished.push_front(p);
                        }
                        break;
                    }
                    let Pending { msg, meta } = p;
                    let done = match call(cfg, &key, msg, &meta) {
                        // Most handlers of a fast path complete at once: looked at once without
                        // a waker; one that has to wait is awaited after the loop was told.
                        Ok(mut running) => match (&mut running).now_or_never() {
                            Some(done) => done,
                            None => {
                                teller.flush();
                                running.await
                            }
                        },
                        Err(e) => Ok(Err(e)),
                    };
                    (done, meta)
                }
            };
            match done.unwrap_or_else(|payload| Err(panicked(&*payload))) {
                Ok(()) => {
                    // Most acknowledgements complete at once (they are queued, not awaited):
                    // looked at once here, without a waker; only one still on its way is kept.
                    let acking = ack(key.clone(), meta);
                    let mut acking = match spare.take() {
                        Some(mut boxed) => {
                            boxed.set(acking);
                            boxed
                        }
                        None => Box::pin(acking),
                    };
                    match (&mut acking).now_or_never() {
                        Some(done) => {
                            teller.output(done);
                            *spare = Some(acking);
                        }
                        None => acks.get_or_insert_with(FuturesUnordered::new).push(acking),
                    }
                }
                Err(e) => {
                    let retry = !e.is_permanent();
                    teller.output(Handled {
                        key: key.clone(),
                        meta,
                        outcome: Outcome::Failed(e),
                    });
                    if retry {
                        break;
                    }
                }
            }
            // A job on the loop past its budget lets the loop go; a worker goes on with it.
            if let Some(at) = until
                && teller.unfinished().is_some_and(|left| !left.is_empty())
                && Instant::now() >= at
            {
                until = None;
                teller.flush();
                tokio::task::yield_now().await;
            }
        }
        let Some(mut acks) = acks.filter(|a| !a.is_empty()) else {
            return teller.ended();
        };
        while let Some(Some(done)) = acks.next().now_or_never() {
            teller.output(done);
        }
        let ran_all = teller.unfinished().is_none_or(|left| left.is_empty());
        if ran_all && !acks.is_empty() {
            // The key's next message need not wait for the acknowledgements.
            teller.returned();
        }
        teller.flush();
        while let Some(done) = acks.next().await {
            teller.output(done);
            teller.flush();
        }
        teller.ended()
    }
}

/// Acknowledge a message whose handler succeeded; what became of it.
async fn acked<K: Key, T: Transport>(transport: &T, key: K, meta: Meta) -> Handled<K> {
    let outcome = match transport.settle(meta.id, Settle::Ack).await {
        Ok(()) => Outcome::Acked,
        Err(e) => Outcome::AckFailed(e.to_string()),
    };
    Handled { key, meta, outcome }
}

/// What a handler job awaits: the handler's future, in its span where a subscriber wants one
/// (else on its own: entering and leaving a span that is none still costs at each poll and at
/// the drop; docs/performance.md, round 19), a panic caught.
type Called = futures::future::CatchUnwind<
    AssertUnwindSafe<Either<tracing::instrument::Instrumented<HandlerFuture>, HandlerFuture>>,
>;

/// The future a handler returns.
type HandlerFuture = futures::future::BoxFuture<'static, Result<(), HandlerError>>;

/// Call the handler with `msg` inside a span, so that its own logs carry the key and the
/// message; a panic in the call itself is an error at once.
fn call<K: Key, M>(
    cfg: &Config<K, M>,
    key: &K,
    msg: M,
    meta: &Meta,
) -> Result<Called, HandlerError> {
    let ctx = Context {
        key: key.clone(),
        message_id: meta.message_id.as_deref().map(str::to_owned),
        attempt: meta.attempt,
        redelivered: meta.redelivered,
    };
    let called = |ctx| std::panic::catch_unwind(AssertUnwindSafe(|| (cfg.handler)(msg, ctx)));
    // No subscriber wants it: no span at all (a disabled one still writes `log` records when
    // it is made, entered, left and dropped, where tracing's `log` feature is on), and none
    // to enter at each poll.
    let called = if tracing::enabled!(target: "prereq", tracing::Level::INFO) {
        let span = tracing::info_span!(
            target: "prereq",
            "handle",
            key = ?key,
            message_id = meta.message_id.as_deref(),
            attempt = meta.attempt
        );
        let called = {
            let _entered = span.enter();
            called(ctx)
        };
        called.map(|fut| Either::Left(fut.instrument(span)))
    } else {
        called(ctx).map(Either::Right)
    };
    match called {
        Ok(fut) => Ok(AssertUnwindSafe(fut).catch_unwind()),
        Err(payload) => Err(panicked(&*payload)),
    }
}

/// A panicking handler counts as a retryable error, with the panic's message as the reason.
fn panicked(payload: &(dyn std::any::Any + Send)) -> HandlerError {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    HandlerError::retry(format!("handler panicked: {message}"))
}

/// The keys of `all` (in delivery order) whose messages would not come back in the key's
/// order if given back: two or more of them, and either a later one (in the key's order) was
/// delivered first, or some came from a delay (an attempt past the first) and some not.
fn unordered_keys<K: Key, M>(all: &[(Hashed<K>, Pending<M>)]) -> HashSet<Hashed<K>> {
    // Per key: the last position seen, whether one was a retry, whether one was not.
    let mut seen: HashMap<&Hashed<K>, (u64, bool, bool)> = HashMap::new();
    let mut unordered = HashSet::new();
    for (key, p) in all {
        let retry = p.meta.attempt > 0;
        match seen.get_mut(key) {
            None => {
                seen.insert(key, (p.meta.pos, retry, !retry));
            }
            Some((last, retried, fresh)) => {
                *retried |= retry;
                *fresh |= !retry;
                if p.meta.pos < *last || (*retried && *fresh) {
                    unordered.insert(key.clone());
                }
                *last = (*last).max(p.meta.pos);
            }
        }
    }
    unordered
}

/// Defer by the policy, or dead-letter once it gives up.
///
/// A deferral for a cause that counts as an attempt carries the next attempt and waits
/// `policy.delay_for(next)` (at least `min_delay`); the limit is the policy's, lowered (never
/// raised) by the message's own (`max_attempts`, e.g. the `x-retry-limit` header). A deferral
/// that does not count keeps the attempt and waits `min_delay`, else the policy's delay for the
/// current attempt: it never dead-letters.
fn deferral<K: Key>(
    policy: &dyn Policy,
    key: &K,
    meta: &Meta,
    cause: DeferCause,
    min_delay: Option<Duration>,
    error: Option<&HandlerError>,
) -> (Settle, Decision) {
    let policy_max = policy.max_attempts();
    if !cause.counts_as_attempt() {
        let delay = min_delay
            .or_else(|| policy.delay_for(meta.attempt.clamp(1, policy_max.max(1)), meta.seed))
            .unwrap_or(FALLBACK_DELAY);
        let settle = Settle::Defer {
            delay,
            attempt: meta.attempt,
        };
        return (settle, Decision::Deferred { delay, cause });
    }
    let limit = meta
        .max_attempts
        .map_or(policy_max, |own| own.min(policy_max));
    let next = meta.attempt.saturating_add(1);
    let delay = if next <= limit && meta.attempt < u32::MAX {
        policy
            .delay_for(next, meta.seed)
            .map(|d| min_delay.map_or(d, |min| d.max(min)))
    } else {
        None
    };
    match delay {
        Some(delay) => (
            Settle::Defer {
                delay,
                attempt: next,
            },
            Decision::Deferred { delay, cause },
        ),
        None => {
            let dl = match error {
                Some(e) => DeadLetter::new(
                    DeadLetterKind::RetriesExhausted,
                    format!(
                        "handler still failing after {} attempts: {}",
                        meta.attempt,
                        e.chain()
                    ),
                    meta.attempt,
                ),
                None => DeadLetter::new(
                    DeadLetterKind::KeyNeverArrived,
                    format!(
                        "prerequisite key {key:?} still unknown after {} attempts",
                        meta.attempt
                    ),
                    meta.attempt,
                ),
            };
            (Settle::DeadLetter(dl.clone()), Decision::DeadLettered(dl))
        }
    }
}
fn trace<K: Key>(e: &Event<K>) {
    // Formatted only if a subscriber records the field.
    let key = e.key.as_ref().map(tracing::field::debug);
    let id = e.message_id.as_deref();
    match &e.decision {
        Decision::DeadLettered(dl) => tracing::warn!(
            target: "prereq", delivery = e.delivery.0, message_id = id, key, attempt = e.attempt,
            reason_kind = dl.kind.as_str(), reason = %dl.reason, "dead-lettered"
        ),
        Decision::SettleFailed { error } => tracing::warn!(
            target: "prereq", delivery = e.delivery.0, message_id = id, key, attempt = e.attempt,
            %error, "settle failed; the broker will redeliver"
        ),
        Decision::Deferred { delay, cause } => tracing::info!(
            target: "prereq", delivery = e.delivery.0, message_id = id, key, attempt = e.attempt,
            delay_ms = delay.as_millis() as u64, cause = cause.as_str(), "deferred"
        ),
        other => tracing::debug!(
            target: "prereq", delivery = e.delivery.0, message_id = id, key, attempt = e.attempt,
            decision = ?other, "decided"
        ),
    }
}
