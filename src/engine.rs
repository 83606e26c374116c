//! The decision loop: handle, hold, defer or dead-letter each delivery.
//!
//! One task owns all state (the hold, the per-key lanes, the counters), so decisions need no
//! locks and happen in a well-defined order. Handlers and broker settlements run in spawned
//! tasks and report back to the loop. The loop knows nothing of AMQP: it speaks the
//! [`Transport`] seam only.
//!
//! A *lane* is the queue of a known key: messages of one key run one at a time, in order.
//! Lanes with work wait in `runnable` for one of the `concurrency` handler slots.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::consumer::{Config, Key, Report};
use crate::context::Context;
use crate::error::{Error, HandlerError};
use crate::event::{Decision, DeferCause, Event};
use crate::hold::Hold;
use crate::retry::seed_of;
use crate::transport::{
    DeadLetter, DeadLetterKind, Delivery, DeliveryId, Settle, Source, Transport,
};

/// A decoded message on its way through the engine.
struct Pending<M> {
    id: DeliveryId,
    msg: M,
    attempt: u32,
    max_attempts: Option<u32>,
    message_id: Option<String>,
    redelivered: bool,
    seed: u64,
    held_at: Option<Instant>,
}

struct Lane<M> {
    queue: VecDeque<Pending<M>>,
    running: bool,
    runnable: bool,
}

impl<M> Default for Lane<M> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            running: false,
            runnable: false,
        }
    }
}

/// Deliveries the pump may have handed over before the loop takes them.
const PUMP_BUFFER: usize = 32;

pub(crate) struct Engine<K, M, T> {
    cfg: Arc<Config<K, M>>,
    transport: Arc<T>,
    wake_rx: mpsc::UnboundedReceiver<K>,
    hold: Hold<K, Pending<M>>,
    lanes: HashMap<K, Lane<M>>,
    runnable: VecDeque<K>,
    /// Messages in lanes, not yet running.
    queued: usize,
    handlers: JoinSet<Event<K>>,
    /// The lane of each running handler; a handler frees its lane as soon as it returns,
    /// before its message is settled, so that the key's next message need not wait for a
    /// broker round-trip.
    handler_lanes: HashMap<Id, K>,
    lane_free_tx: mpsc::UnboundedSender<Id>,
    lane_free_rx: mpsc::UnboundedReceiver<Id>,
    /// Settlements in flight; each yields the event to emit, if any.
    settles: JoinSet<Option<Event<K>>>,
    report: Report,
}

impl<K: Key, M: Send + 'static, T: Transport> Engine<K, M, T> {
    pub(crate) fn new(
        cfg: Arc<Config<K, M>>,
        transport: Arc<T>,
        wake_rx: mpsc::UnboundedReceiver<K>,
    ) -> Self {
        let budget = cfg.budget;
        let (lane_free_tx, lane_free_rx) = mpsc::unbounded_channel();
        Self {
            cfg,
            transport,
            wake_rx,
            hold: Hold::new(budget),
            lanes: HashMap::new(),
            runnable: VecDeque::new(),
            queued: 0,
            handlers: JoinSet::new(),
            handler_lanes: HashMap::new(),
            lane_free_tx,
            lane_free_rx,
            settles: JoinSet::new(),
            report: Report::default(),
        }
    }

    pub(crate) async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Report, Error<T::Error>> {
        // A few deliveries in flight between the pump and the loop, so that neither waits for
        // the other on every message.
        let (tx, mut inbox) = mpsc::channel(PUMP_BUFFER);
        let (stop_tx, stop_rx) = oneshot::channel();
        let pump = tokio::spawn(pump(Arc::clone(&self.transport), tx, stop_rx));
        tokio::pin!(shutdown);
        // Messages in memory (held, or waiting in a lane for a handler slot) stay within the
        // hold budget plus a small backlog: past it, stop taking deliveries until handlers
        // catch up. Released messages only move from the hold to a lane, so a release never
        // blocks the registrations that would wake other keys.
        let backlog = self.cfg.concurrency.saturating_mul(4).max(16);
        let in_memory_limit = self.cfg.budget.max_messages.saturating_add(backlog);
        let mut failure = None;
        loop {
            let deadline = self.hold.next_deadline();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(key) = self.wake_rx.recv() => self.release(&key),
                Some(id) = self.lane_free_rx.recv() => self.free_lane(id),
                Some(done) = self.handlers.join_next_with_id(), if !self.handlers.is_empty() => {
                    self.handler_done(done);
                }
                Some(done) = self.settles.join_next(), if !self.settles.is_empty() => {
                    if let Ok(Some(event)) = done { self.emit(event); }
                }
                () = sleep_until_opt(deadline), if deadline.is_some() => self.expire(),
                got = inbox.recv(), if self.queued + self.hold.len() < in_memory_limit => match got {
                    Some(Ok(Some(d))) => self.on_delivery(d),
                    Some(Ok(None)) | None => break,
                    Some(Err(e)) => { failure = Some(e); break; }
                },
            }
            self.start_runnable();
        }
        // Stop taking deliveries; give back what the pump had taken.
        let _ = stop_tx.send(());
        inbox.close();
        while let Some(got) = inbox.recv().await {
            if let Ok(Some(d)) = got {
                self.requeue_delivery(d);
            }
        }
        let _ = pump.await;
        // Let running handlers finish (they settle their own messages), start nothing new.
        let grace = tokio::time::sleep(self.cfg.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                done = self.handlers.join_next_with_id() => match done {
                    Some(done) => self.handler_done(done),
                    None => break,
                },
                () = &mut grace => {
                    tracing::warn!(
                        target: "prereq",
                        running = self.handlers.len(),
                        "shutdown grace over: abandoning running handlers; the broker redelivers their messages"
                    );
                    self.handlers.abort_all();
                    while let Some(done) = self.handlers.join_next_with_id().await {
                        self.handler_done(done);
                    }
                    break;
                }
            }
        }
        // Give back every held or queued message.
        for (key, p) in self.hold.drain() {
            self.requeue(Some(key), p);
        }
        let lanes: Vec<_> = self.lanes.drain().collect();
        for (key, lane) in lanes {
            for p in lane.queue {
                self.requeue(Some(key.clone()), p);
            }
        }
        while let Some(done) = self.settles.join_next().await {
            if let Ok(Some(event)) = done {
                self.emit(event);
            }
        }
        match failure {
            Some(e) => Err(Error::Transport(e)),
            None => Ok(self.report),
        }
    }

    fn on_delivery(&mut self, d: Delivery) {
        match d.source {
            Source::Registration => self.on_registration(d),
            Source::Message => self.on_message(d),
        }
    }

    fn on_registration(&mut self, d: Delivery) {
        let decoded = match &self.cfg.registration {
            Some(decode) => decode(&d.body),
            None => Err("this consumer has no registration decoder".to_owned()),
        };
        match decoded {
            Ok(key) => {
                if self.cfg.keys.insert(key.clone()) {
                    self.report.registered += 1;
                }
                let event = self.event(
                    d.id,
                    d.message_id,
                    Some(key.clone()),
                    d.attempt,
                    Decision::Registered,
                );
                self.emit(event.clone());
                // The key is known from now on; the acknowledgement only reports failure.
                self.settle_quietly(event, Settle::Ack);
                self.release(&key);
            }
            Err(reason) => self.dead_letter_undecodable(d, reason),
        }
    }

    fn on_message(&mut self, d: Delivery) {
        let msg = match (self.cfg.decode)(&d.body) {
            Ok(m) => m,
            Err(reason) => return self.dead_letter_undecodable(d, reason),
        };
        let key = (self.cfg.key)(&msg);
        let message_id = self.cfg.id.as_ref().map(|f| f(&msg)).or(d.message_id);
        let seed = message_id
            .as_deref()
            .map_or_else(|| seed_of(&d.body), |id| seed_of(id.as_bytes()));
        let mut p = Pending {
            id: d.id,
            msg,
            attempt: d.attempt,
            max_attempts: d.max_attempts,
            message_id,
            redelivered: d.redelivered,
            seed,
            held_at: None,
        };
        if d.redelivered {
            // The broker gave a held message again (its connection dropped): the copy takes
            // the held one's place, and the stale delivery is dropped (an ack is harmless on a
            // dead channel, and consumes a live duplicate otherwise).
            p = match self.replace_held(p, d.body.len()) {
                Ok(stale) => {
                    tracing::debug!(target: "prereq", message_id = stale.message_id.as_deref(),
                        "a redelivered copy replaced its held original");
                    let event = self.pending_event(&stale, Some(key), Decision::Held);
                    self.settle_quietly(event, Settle::Ack);
                    return;
                }
                Err(p) => p,
            };
        }
        if self.cfg.keys.contains(&key) {
            // A key inserted through a KeyHandle may not have woken its messages yet: they
            // were received earlier, so they go first.
            self.release(&key);
            self.enqueue(key, p);
        } else if self.hold.fits(d.body.len()) {
            let now = Instant::now();
            p.held_at = Some(now);
            self.report.held += 1;
            let event = self.pending_event(&p, Some(key.clone()), Decision::Held);
            self.hold
                .insert(key, p.message_id.clone(), p, d.body.len(), now);
            self.report.peak_held = self.report.peak_held.max(self.hold.len());
            self.emit(event);
        } else {
            self.defer(key, p, DeferCause::HoldFull);
        }
    }

    /// If a message with `p`'s id is held, put `p` in its place (keeping its hold time) and
    /// return the one it replaced; else give `p` back.
    fn replace_held(&mut self, mut p: Pending<M>, size: usize) -> Result<Pending<M>, Pending<M>> {
        let Some(id) = p.message_id.clone() else {
            return Err(p);
        };
        match self.hold.by_id_mut(&id, size) {
            Some(held) => {
                p.held_at = held.held_at;
                Ok(std::mem::replace(held, p))
            }
            None => Err(p),
        }
    }

    /// The key is known: move its held messages, in arrival order, to its lane.
    fn release(&mut self, key: &K) {
        let released = self.hold.take(key);
        if released.is_empty() {
            // The common case for a known key: nothing was held, nothing to time.
            return;
        }
        let now = Instant::now();
        for p in released {
            let waited = p.held_at.map(|t| now - t).unwrap_or_default();
            self.report.released += 1;
            self.emit(self.pending_event(&p, Some(key.clone()), Decision::Released { waited }));
            self.enqueue(key.clone(), p);
        }
    }

    /// Held too long: defer the expired messages through the broker.
    fn expire(&mut self) {
        while let Some((key, p)) = self.hold.pop_expired(Instant::now()) {
            self.defer(key, p, DeferCause::HoldExpired);
        }
    }

    fn enqueue(&mut self, key: K, p: Pending<M>) {
        let lane = self.lanes.entry(key.clone()).or_default();
        lane.queue.push_back(p);
        self.queued += 1;
        if !lane.running && !lane.runnable {
            lane.runnable = true;
            self.runnable.push_back(key);
        }
    }

    fn start_runnable(&mut self) {
        while self.handler_lanes.len() < self.cfg.concurrency {
            let Some(key) = self.runnable.pop_front() else {
                return;
            };
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            lane.runnable = false;
            let Some(p) = lane.queue.pop_front() else {
                continue;
            };
            lane.running = true;
            self.queued -= 1;
            let handle = self.handlers.spawn(handle(
                Arc::clone(&self.cfg),
                Arc::clone(&self.transport),
                self.lane_free_tx.clone(),
                key.clone(),
                p,
            ));
            self.handler_lanes.insert(handle.id(), key);
        }
    }

    fn handler_done(&mut self, done: Result<(Id, Event<K>), tokio::task::JoinError>) {
        let (id, event) = match done {
            Ok((id, event)) => (id, Some(event)),
            // The task itself cannot panic (the handler's panic is caught inside it); if it was
            // cancelled, its message stays unsettled and the broker redelivers it.
            Err(e) => (e.id(), None),
        };
        if let Some(event) = event {
            self.emit(event);
        }
        self.free_lane(id);
    }

    /// The handler of task `id` returned (or its task ended): the key's next message may run.
    fn free_lane(&mut self, id: Id) {
        let Some(key) = self.handler_lanes.remove(&id) else {
            return;
        };
        if let Some(lane) = self.lanes.get_mut(&key) {
            lane.running = false;
            if lane.queue.is_empty() {
                self.lanes.remove(&key);
            } else if !lane.runnable {
                lane.runnable = true;
                self.runnable.push_back(key);
            }
        }
    }

    /// Defer through the broker by the policy, or dead-letter if it gives up.
    fn defer(&mut self, key: K, p: Pending<M>, cause: DeferCause) {
        let (settle, decision) = defer_decision(&self.cfg, &key, &p, cause, None);
        let event = self.pending_event(&p, Some(key), decision);
        self.settle(event.clone(), settle);
    }

    fn dead_letter_undecodable(&mut self, d: Delivery, reason: String) {
        let dl = dead_letter(DeadLetterKind::Undecodable, reason, d.attempt);
        let event = self.event(
            d.id,
            d.message_id,
            None,
            d.attempt,
            Decision::DeadLettered(dl.clone()),
        );
        self.settle(event, Settle::DeadLetter(dl));
    }

    fn requeue_delivery(&mut self, d: Delivery) {
        let event = self.event(d.id, d.message_id, None, d.attempt, Decision::Requeued);
        self.settle(event, Settle::Requeue);
    }

    fn requeue(&mut self, key: Option<K>, p: Pending<M>) {
        let event = self.pending_event(&p, key, Decision::Requeued);
        self.settle(event, Settle::Requeue);
    }

    /// Carry out `settle` in a task; emit `event` once the transport confirmed it, or a
    /// `SettleFailed` event if it did not.
    fn settle(&mut self, event: Event<K>, settle: Settle) {
        let transport = Arc::clone(&self.transport);
        self.settles
            .spawn(async move { Some(settle_with(&*transport, event, settle).await) });
    }

    /// Like [`Engine::settle`], but emit an event only if the transport failed.
    fn settle_quietly(&mut self, event: Event<K>, settle: Settle) {
        let transport = Arc::clone(&self.transport);
        self.settles.spawn(async move {
            let done = settle_with(&*transport, event, settle).await;
            matches!(done.decision, Decision::SettleFailed { .. }).then_some(done)
        });
    }

    fn event(
        &self,
        delivery: DeliveryId,
        message_id: Option<String>,
        key: Option<K>,
        attempt: u32,
        decision: Decision,
    ) -> Event<K> {
        Event {
            at: Instant::now(),
            delivery,
            message_id,
            key,
            attempt,
            decision,
        }
    }

    fn pending_event(&self, p: &Pending<M>, key: Option<K>, decision: Decision) -> Event<K> {
        self.event(p.id, p.message_id.clone(), key, p.attempt, decision)
    }

    fn emit(&mut self, event: Event<K>) {
        match &event.decision {
            Decision::Handled => self.report.handled += 1,
            Decision::Deferred { .. } => self.report.deferred += 1,
            Decision::DeadLettered(_) => self.report.dead_lettered += 1,
            Decision::Requeued => self.report.requeued += 1,
            Decision::SettleFailed { .. } => self.report.settle_failures += 1,
            Decision::Registered | Decision::Held | Decision::Released { .. } => {}
        }
        trace(&event);
        #[cfg(feature = "metrics")]
        crate::metrics::record(&event.decision, self.hold.len());
        if let Some(observer) = &self.cfg.observer {
            observer(&event);
        }
    }
}

async fn settle_with<K, T: Transport>(
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

/// Run the handler for one message and settle it by the outcome.
async fn handle<K: Key, M: Send + 'static, T: Transport>(
    cfg: Arc<Config<K, M>>,
    transport: Arc<T>,
    lane_free: mpsc::UnboundedSender<Id>,
    key: K,
    p: Pending<M>,
) -> Event<K> {
    let Pending {
        id,
        msg,
        attempt,
        max_attempts,
        ref message_id,
        redelivered,
        seed,
        held_at,
    } = p;
    let ctx = Context {
        key: key.clone(),
        message_id: message_id.clone(),
        attempt,
        redelivered,
    };
    // The handler runs inside a span, so that its own logs carry the key and the message.
    let span = tracing::info_span!(
        target: "prereq",
        "handle",
        key = ?key,
        message_id = message_id.as_deref(),
        attempt
    );
    let called = {
        let _entered = span.enter();
        std::panic::catch_unwind(AssertUnwindSafe(|| (cfg.handler)(msg, ctx)))
    };
    let outcome = match called {
        Ok(fut) => AssertUnwindSafe(fut.instrument(span))
            .catch_unwind()
            .await
            .unwrap_or_else(|payload| Err(panicked(&*payload))),
        Err(payload) => Err(panicked(&*payload)),
    };
    // The engine may run the key's next message now; this one's settlement follows.
    let _ = lane_free.send(tokio::task::id());
    let stub = Pending {
        id,
        msg: (),
        attempt,
        max_attempts,
        message_id: message_id.clone(),
        redelivered,
        seed,
        held_at,
    };
    let (settle, decision) = match outcome {
        Ok(()) => (Settle::Ack, Decision::Handled),
        Err(HandlerError::Retry(e)) => {
            defer_decision(&cfg, &key, &stub, DeferCause::HandlerRetry, Some(e))
        }
        Err(HandlerError::Permanent(e)) => {
            let dl = dead_letter(DeadLetterKind::Rejected, e, attempt);
            (Settle::DeadLetter(dl.clone()), Decision::DeadLettered(dl))
        }
    };
    let event = Event {
        at: Instant::now(),
        delivery: id,
        message_id: stub.message_id,
        key: Some(key),
        attempt,
        decision,
    };
    settle_with(&*transport, event, settle).await
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

/// Defer by the policy, or dead-letter once it (or the message's own limit) gives up.
///
/// A message's own limit (`max_attempts`, e.g. the `x-retry-limit` header) overrides the
/// policy's; past the policy's last attempt, its last delay repeats.
fn defer_decision<K: Key, M, X>(
    cfg: &Config<K, M>,
    key: &K,
    p: &Pending<X>,
    cause: DeferCause,
    last_error: Option<String>,
) -> (Settle, Decision) {
    let next = p.attempt.saturating_add(1);
    let policy_max = cfg.policy.max_attempts();
    let limit = p.max_attempts.unwrap_or(policy_max);
    let delay = if next <= limit && p.attempt < u32::MAX {
        cfg.policy.delay_for(next.min(policy_max), p.seed)
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
            let dl = match last_error {
                Some(e) => dead_letter(
                    DeadLetterKind::RetriesExhausted,
                    format!("handler still failing after {} deferrals: {e}", p.attempt),
                    p.attempt,
                ),
                None => dead_letter(
                    DeadLetterKind::KeyNeverArrived,
                    format!(
                        "prerequisite key {key:?} still unknown after {} deferrals",
                        p.attempt
                    ),
                    p.attempt,
                ),
            };
            (Settle::DeadLetter(dl.clone()), Decision::DeadLettered(dl))
        }
    }
}

/// The longest dead-letter reason, in bytes. A reason travels in a broker header and in log
/// lines, and a decode error can quote a whole body (serde quotes the offending string): a
/// 10 MB body must not make a 10 MB header, which the broker would refuse.
pub(crate) const MAX_REASON: usize = 1024;

/// A dead letter whose reason is at most [`MAX_REASON`] bytes: a longer one keeps its head and
/// its tail (where a decode error says the line and column) around a note of what was cut.
fn dead_letter(kind: DeadLetterKind, reason: String, attempts: u32) -> DeadLetter {
    DeadLetter {
        kind,
        reason: bounded(reason),
        attempts,
    }
}

fn bounded(reason: String) -> String {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    // " … (18446744073709551615 bytes cut) … " is at most 44 bytes.
    let keep = MAX_REASON - 44;
    let mut head = keep * 3 / 5;
    while !reason.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = reason.len() - (keep - head);
    while !reason.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{} … ({} bytes cut) … {}",
        &reason[..head],
        tail - head,
        &reason[tail..]
    )
}

/// Take deliveries from the transport and pass them to the loop, until told to stop. A delivery
/// the loop no longer accepts goes back to the transport.
async fn pump<T: Transport>(
    transport: Arc<T>,
    tx: mpsc::Sender<Result<Option<Delivery>, T::Error>>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let got = tokio::select! {
            biased;
            _ = &mut stop => return,
            got = transport.recv() => got,
        };
        let last = !matches!(got, Ok(Some(_)));
        if let Err(mpsc::error::SendError(Ok(Some(d)))) = tx.send(got).await {
            let _ = transport.settle(d.id, Settle::Requeue).await;
            return;
        }
        if last {
            return;
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
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
            delay_ms = delay.as_millis() as u64, cause = ?cause, "deferred"
        ),
        other => tracing::debug!(
            target: "prereq", delivery = e.delivery.0, message_id = id, key, attempt = e.attempt,
            decision = ?other, "decided"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reasons_are_kept_and_long_ones_bounded_on_char_boundaries() {
        assert_eq!(bounded("short".into()), "short");
        let exact = "x".repeat(MAX_REASON);
        assert_eq!(bounded(exact.clone()), exact);
        for unit in ["a", "é", "€", "😀"] {
            let long = format!("start {} end at line 1 column 9", unit.repeat(100_000));
            let b = bounded(long.clone());
            assert!(b.len() <= MAX_REASON, "{} bytes", b.len());
            assert!(b.starts_with("start "));
            assert!(b.ends_with(" end at line 1 column 9"));
            assert!(b.contains(" bytes cut) "));
        }
    }
}
