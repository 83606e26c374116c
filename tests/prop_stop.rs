//! Property test of a graceful stop and the consumer after it, on the in-memory broker under a
//! paused clock: completeness, and per-key order across the stop when it waits for its copies.
//!
//! Each case: messages for a few keys published at random virtual times (all before the stop),
//! handlers that fail some of them once (a retry through the broker), registrations of some
//! keys while the first consumer runs and of the rest only once the next consumer runs, a
//! random policy step and hold budget (small: deferrals because the hold is full, too). The
//! first consumer is told to stop at a random moment after the last publish, with or without
//! `wait_for_copies_at_stop` (a minute); the next one starts on the same broker and key store a
//! random time later. Every case checks:
//! - completeness: every message is handled exactly once (by one consumer or the other),
//!   nothing is dead-lettered, and the broker is left empty;
//! - order of what the first consumer had: the messages it had in memory when it stopped (given
//!   back, or deferred at the stop) run in their key's order, wait or not. Without the stop's
//!   deferral of a key's messages that would come back out of order, it fails at once
//!   ("[4, 2]");
//! - order, when the stop waited for its copies: the messages of each key known before the
//!   stop run in the order they were published, across the stop. (Not otherwise: a copy out
//!   at the stop reaches the next consumer, which does not know it, and copies can come back
//!   out of order, see the check.) Without the wait it fails at once ("[1, 2, 0]").

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Msg, Reg, msg, reg};
use prereq::memory::MemoryBroker;
use prereq::{
    Backoff, Decision, DeferCause, DependentConsumer, Event, HandlerError, HoldBudget, MemoryKeys,
};
use proptest::prelude::*;

const KEYS: u8 = 3;

/// What ran: (consumer 0 or 1, message id), in the order the handlers succeeded.
type Ran = Vec<(usize, u32)>;

#[derive(Clone, Debug)]
struct Case {
    /// Per message: (wait before publishing it in ms, its key, whether its handler fails once).
    messages: Vec<(u64, u8, bool)>,
    /// Per key: registered this long into the first consumer's run, or (`None`) only once the
    /// next consumer runs.
    early: Vec<Option<u64>>,
    /// When the first consumer is told to stop (ms), and how long until the next one starts.
    stop_ms: u64,
    gap_ms: u64,
    /// `wait_for_copies_at_stop` for the first consumer (ms; 0: none, else a minute).
    wait_ms: u64,
    step_secs: u64,
    hold_ms: u64,
    max_messages: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(
            (
                prop_oneof![Just(0u64), 0u64..2_000],
                0..KEYS,
                prop::bool::weighted(0.3),
            ),
            1..14,
        ),
        prop::collection::vec(prop::option::of(0u64..8_000), KEYS as usize),
        0u64..10_000,
        0u64..4_000,
        prop_oneof![Just(0u64), Just(60_000u64)],
        1u64..4,
        100u64..6_000,
        1usize..6,
    )
        .prop_map(
            |(messages, early, stop_ms, gap_ms, wait_ms, step_secs, hold_ms, max_messages)| Case {
                messages,
                early,
                stop_ms,
                gap_ms,
                wait_ms,
                step_secs,
                hold_ms,
                max_messages,
            },
        )
}

/// When each message is published: (at, id, key).
fn schedule(case: &Case) -> Vec<(Duration, u32, u8)> {
    let mut at = Duration::ZERO;
    let mut schedule = Vec::new();
    for (id, (wait, key, _)) in case.messages.iter().enumerate() {
        at += Duration::from_millis(*wait);
        schedule.push((at, id as u32, *key));
    }
    schedule
}

/// When the first consumer is told to stop: once every message is published (and delivered:
/// the in-memory broker delivers at once), `stop_ms` later.
fn stop_after(case: &Case) -> Duration {
    let last = schedule(case).last().map_or(Duration::ZERO, |(at, ..)| *at);
    last + Duration::from_millis(100 + case.stop_ms)
}

/// What a case did.
struct Outcome {
    /// What ran.
    ran: Ran,
    /// (id, key), in publish order.
    published: Vec<(u32, u8)>,
    /// The messages the first consumer had in memory when it stopped.
    at_stop: Vec<u32>,
    broker: MemoryBroker,
}

fn run(case: &Case) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let broker = MemoryBroker::new();
        let keys = MemoryKeys::new();
        let ran: Arc<Mutex<Ran>> = Arc::default();
        let first_events: Arc<Mutex<Vec<Event<u8>>>> = Arc::default();
        let failed: Arc<Mutex<Vec<u32>>> = Arc::default();
        let fails: Vec<bool> = case.messages.iter().map(|m| m.2).collect();
        let consumer = |n: usize, hold: HoldBudget, wait: Duration| {
            let ran = Arc::clone(&ran);
            let seen = Arc::clone(&first_events);
            let failed = Arc::clone(&failed);
            let fails = fails.clone();
            DependentConsumer::builder(
                |m: &Msg| m.key,
                move |m: Msg| {
                    let mut failed = failed.lock().unwrap();
                    let result = if fails[m.id as usize] && !failed.contains(&m.id) {
                        failed.push(m.id);
                        Err(HandlerError::retry("fails once"))
                    } else {
                        ran.lock().unwrap().push((n, m.id));
                        Ok(())
                    };
                    std::future::ready(result)
                },
            )
            .registrations(|r: &Reg| r.key)
            .id(|m: &Msg| m.id.to_string())
            .keys(keys.clone())
            .policy(Backoff::linear(Duration::from_secs(case.step_secs)).max_attempts(1_000))
            .budget(hold)
            .wait_for_copies_at_stop(wait)
            .on_event(move |e| {
                if n == 0 {
                    seen.lock().unwrap().push(e.clone());
                }
            })
            .build()
        };
        let first = consumer(
            0,
            HoldBudget::DEFAULT
                .max_messages(case.max_messages)
                .max_time(Duration::from_millis(case.hold_ms)),
            Duration::from_millis(case.wait_ms),
        );
        let next = consumer(1, HoldBudget::DEFAULT, Duration::ZERO);
        let schedule = schedule(case);
        let stop_at = stop_after(case);
        let published: Vec<(u32, u8)> = schedule.iter().map(|(_, id, key)| (*id, *key)).collect();
        let t0 = tokio::time::Instant::now();
        let producer = tokio::spawn({
            let broker = broker.clone();
            async move {
                for (at, id, key) in schedule {
                    tokio::time::sleep_until(t0 + at).await;
                    broker.publish(msg(id, key));
                }
            }
        });
        let early = tokio::spawn({
            let broker = broker.clone();
            let mut regs: Vec<(u64, u8)> = case
                .early
                .iter()
                .enumerate()
                .filter_map(|(k, at)| at.map(|at| (at, k as u8)))
                .collect();
            regs.sort_unstable();
            async move {
                for (at, key) in regs {
                    tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
                    broker.register(reg(key));
                }
            }
        });
        first
            .run(broker.transport(), tokio::time::sleep(stop_at))
            .await
            .expect("the first consumer's run");
        tokio::time::sleep(Duration::from_millis(case.gap_ms)).await;
        let late: Vec<u8> = case
            .early
            .iter()
            .enumerate()
            .filter(|(_, at)| at.is_none())
            .map(|(k, _)| k as u8)
            .collect();
        let registrar = broker.clone();
        let register_late = async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for key in late {
                registrar.register(reg(key));
            }
        };
        let expected = published.len();
        let counted = Arc::clone(&ran);
        let all_ran = async move {
            // Virtual time: waiting costs nothing real. A failure bound, not a claim.
            for _ in 0..6_000 {
                if counted.lock().unwrap().len() >= expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // What runs twice shows too.
            tokio::time::sleep(Duration::from_secs(60)).await;
        };
        let (report, ()) = tokio::join!(next.run(broker.transport(), all_ran), register_late);
        report.expect("the next consumer's run");
        producer.await.expect("the producer");
        early.await.expect("the registrations");
        let ran = ran.lock().unwrap().clone();
        // What the first consumer had in memory when it stopped: what it gave back, or
        // deferred so that it comes back in order, at the stop.
        let at_stop: Vec<u32> = first_events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                matches!(
                    e.decision,
                    Decision::Requeued
                        | Decision::Deferred {
                            cause: DeferCause::OrderAtStop,
                            ..
                        }
                ) || (e.at >= t0 + stop_at
                    && matches!(
                        e.decision,
                        Decision::Deferred {
                            cause: DeferCause::BehindDeferred,
                            ..
                        }
                    ))
            })
            .filter_map(|e| e.message_id.as_deref()?.parse().ok())
            .collect();
        Outcome {
            ran,
            published,
            at_stop,
            broker,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn order_and_completeness_hold_across_a_stop(case in case()) {
        let Outcome {
            ran,
            published,
            at_stop,
            broker,
        } = run(&case);
        // Completeness: each once, nothing dead-lettered, nothing left.
        let mut count: HashMap<u32, usize> = HashMap::new();
        for (_, id) in &ran {
            *count.entry(*id).or_default() += 1;
        }
        for (id, _) in &published {
            prop_assert_eq!(count.get(id).copied(), Some(1), "message {} ran {:?}: {:?}", id, count.get(id), ran);
        }
        prop_assert_eq!(ran.len(), published.len(), "{:?}", ran);
        prop_assert!(broker.dead_letters().is_empty(), "{:?}", broker.dead_letters());
        prop_assert_eq!(broker.pending(), 0);
        // Order per key, across the stop, for the keys known before the stop, when the stop
        // waited for its copies (long enough for any here: a copy's delay is a few steps at
        // most). Not otherwise: a copy out at the stop goes to the next consumer, which does not
        // know it, and copies can come back out of order (one deferred because the hold was
        // full, before an earlier message of its key ran out of hold time and was deferred
        // for longer); a key still unknown keeps its messages going round their delays, out
        // at whatever moment the stop comes.
        let key_of: HashMap<u32, u8> = published.iter().copied().collect();
        // Always: what the first consumer had in memory at the stop runs in its key's order
        // (given back, or deferred so that it comes back in order).
        for key in 0..KEYS {
            let had: Vec<u32> = published
                .iter()
                .filter(|(id, k)| *k == key && at_stop.contains(id))
                .map(|(id, _)| *id)
                .collect();
            let got: Vec<u32> = ran
                .iter()
                .filter(|(_, id)| key_of[id] == key && at_stop.contains(id))
                .map(|(_, id)| *id)
                .collect();
            prop_assert_eq!(&got, &had, "key {}: in memory at the stop; ran {:?}", key, ran);
        }
        if case.wait_ms == 0 {
            return Ok(());
        }
        let stop_ms = stop_after(&case).as_millis() as u64;
        let known = |key: u8| case.early[key as usize].is_some_and(|at| at < stop_ms);
        for key in (0..KEYS).filter(|k| known(*k)) {
            let want: Vec<u32> = published.iter().filter(|(_, k)| *k == key).map(|(id, _)| *id).collect();
            let got: Vec<u32> = ran.iter().filter(|(_, id)| key_of[id] == key).map(|(_, id)| *id).collect();
            prop_assert_eq!(&got, &want, "key {}: ran (consumer, id) {:?}", key, ran);
        }
    }
}
