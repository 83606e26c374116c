//! A deferred message keeps its place in its key's order: later messages of the key wait behind
//! it (held, or deferred in turn when the hold is full) and run after it when it comes back.
//! `keep_key_order(false)` opts out.

mod common;

use std::time::Duration;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::{Decision, DeferCause, HoldBudget, MemoryKeys};

/// Payment 1 fails once (deferred 1 s); payment 2 of the same client arrives 100 ms later.
async fn retry_then_later_message(keep_order: bool) -> Vec<u64> {
    let broker = MemoryBroker::new();
    broker.register(client(5));
    broker.publish(payment(1, 5));
    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = builder(&rec, fails_once(1, seen.clone()))
        .policy(linear(1, 3))
        .keep_key_order(keep_order)
        .build();
    let producer = publish_at(broker.clone(), Duration::from_millis(100), payment(2, 5));
    let (report, ()) = tokio::join!(
        consumer.run(broker.transport(), rec.until(|ev| handled(ev) == 2)),
        producer
    );
    report.unwrap();
    if keep_order {
        assert_eq!(
            rec.decisions_of("2"),
            vec![
                Decision::Held,
                Decision::Released {
                    waited: Duration::from_millis(900)
                },
                Decision::Handled
            ],
            "payment 2 waited behind payment 1 until it came back"
        );
    }
    seen.get()
}

#[tokio::test(start_paused = true)]
async fn a_later_message_waits_behind_a_retried_one() {
    assert_eq!(retry_then_later_message(true).await, vec![1, 2]);
}

#[tokio::test(start_paused = true)]
async fn without_key_order_a_later_message_overtakes_a_retried_one() {
    assert_eq!(retry_then_later_message(false).await, vec![2, 1]);
}

/// The hold is full when payment 1 arrives (deferred), its client registers, then payment 2
/// arrives: the key is known, but payment 2 waits for payment 1.
#[tokio::test(start_paused = true)]
async fn a_later_message_waits_behind_a_message_deferred_for_a_full_hold() {
    let broker = MemoryBroker::new();
    broker.publish(payment(100, 9)); // fills the hold
    broker.publish(payment(1, 5)); // hold full: deferred 1 s
    broker.register(client(9)); // the hold has room again
    broker.register(client(5));
    broker.publish(payment(2, 5)); // key known, held behind payment 1
    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = builder(&rec, logs(seen.clone()))
        .policy(linear(1, 3))
        .budget(HoldBudget::DEFAULT.max_messages(1))
        .build();
    run_until(consumer, &broker, &rec, |ev| handled(ev) == 3).await;
    assert_eq!(seen.get(), vec![100, 1, 2]);
    assert_eq!(
        rec.decisions_of("1")[0],
        Decision::Deferred {
            delay: Duration::from_secs(1),
            cause: DeferCause::HoldFull
        }
    );
    assert_eq!(rec.decisions_of("2")[0], Decision::Held);
}

/// With no room to wait in the hold, later messages are deferred in turn (without using an
/// attempt) and still run in order.
#[tokio::test(start_paused = true)]
async fn with_no_room_later_messages_are_deferred_in_turn_and_keep_their_order() {
    let broker = MemoryBroker::new();
    broker.register(client(5));
    for id in 1..=4 {
        broker.publish(payment(id, 5));
    }
    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = builder(&rec, fails_once(1, seen.clone()))
        .policy(linear(1, 3))
        .budget(HoldBudget::NONE)
        .concurrency(1)
        .build();
    run_until(consumer, &broker, &rec, |ev| handled(ev) == 4).await;
    assert_eq!(seen.get(), vec![1, 2, 3, 4]);
    let behind = rec.count(|e| {
        matches!(
            e.decision,
            Decision::Deferred {
                cause: DeferCause::BehindDeferred,
                ..
            }
        ) && e.attempt == 0
    });
    assert!(
        behind >= 3,
        "payments 2-4 deferred behind payment 1: {behind}"
    );
    assert!(broker.dead_letters().is_empty());
}

/// A consumer stops while payment 1 of a client is out in a 5 s delay and payment 2 of the
/// client waits behind it; another consumer starts on the same broker a second later. Payment 2
/// is deferred at the stop (until after payment 1 can be back), not given back: the next
/// consumer runs payment 1 first.
#[tokio::test(start_paused = true)]
async fn a_stop_defers_what_waits_behind_a_deferred_message_and_the_next_consumer_keeps_the_order()
{
    let broker = MemoryBroker::new();
    let keys = MemoryKeys::new();
    broker.register(client(5));
    broker.publish(payment(1, 5));
    let seen = Log::new();
    let first = Recorder::new();
    let a = builder(&first, fails_once(1, seen.clone()))
        .policy(linear(5, 3))
        .keys(keys.clone())
        .build();
    let producer = publish_at(broker.clone(), Duration::from_millis(100), payment(2, 5));
    let held_2 = |ev: &[prereq::Event<u64>]| {
        ev.iter()
            .any(|e| e.message_id.as_deref() == Some("2") && e.decision == Decision::Held)
    };
    let (report, ()) = tokio::join!(a.run(broker.transport(), first.until(held_2)), producer);
    let report = report.unwrap();
    let two = first.decisions_of("2");
    assert!(
        matches!(
            two.as_slice(),
            [
                Decision::Held,
                Decision::Deferred {
                    cause: DeferCause::BehindDeferred,
                    ..
                }
            ]
        ),
        "payment 2 was deferred at the stop, not given back: {two:?}"
    );
    assert_eq!((report.deferred, report.requeued), (2, 0), "{report:?}");

    tokio::time::sleep(Duration::from_secs(1)).await;
    let next = Recorder::new();
    let b = builder(&next, logs(seen.clone()))
        .policy(linear(5, 3))
        .keys(keys.clone())
        .build();
    b.run(broker.transport(), next.until(|ev| handled(ev) == 2))
        .await
        .unwrap();
    assert_eq!(
        seen.get(),
        vec![1, 2],
        "the next consumer kept the key's order"
    );
}

/// A consumer stops once payment 1's copy is back and held again (its client still unknown),
/// payment 2, which arrived while the copy was out, waiting behind it. Given back, payment 2
/// (delivered first) would reach the next consumer first; both are deferred together at the
/// stop instead, in the key's order, and the next consumer runs 1 then 2 once the client
/// registers.
#[tokio::test(start_paused = true)]
async fn a_stop_keeps_the_order_of_a_copy_back_in_the_hold_and_what_arrived_while_it_was_out() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 9));
    let seen = Log::new();
    let first = Recorder::new();
    let a = builder(&first, logs(seen.clone()))
        .policy(linear(1, 5))
        .budget(HoldBudget::DEFAULT.max_time(Duration::from_secs(3)))
        .build();
    // Payment 1 is held 3 s, then out for 1 s; payment 2 arrives meanwhile (and is still held
    // when the copy is back).
    let producer = publish_at(broker.clone(), Duration::from_millis(3_500), payment(2, 9));
    let copy_held = |ev: &[prereq::Event<u64>]| {
        ev.iter().any(|e| {
            e.message_id.as_deref() == Some("1") && e.attempt == 1 && e.decision == Decision::Held
        })
    };
    let (report, ()) = tokio::join!(a.run(broker.transport(), first.until(copy_held)), producer);
    let report = report.unwrap();
    for id in ["1", "2"] {
        assert!(
            first.decisions_of(id).last().is_some_and(|d| matches!(
                d,
                Decision::Deferred {
                    cause: DeferCause::OrderAtStop,
                    ..
                }
            )),
            "payment {id} deferred in order at the stop: {:?}",
            first.decisions_of(id)
        );
    }
    assert_eq!((report.deferred, report.requeued), (3, 0), "{report:?}");

    let next = Recorder::new();
    let b = builder(&next, logs(seen.clone()))
        .policy(linear(1, 5))
        .build();
    let registrar = broker.clone();
    let register_once_both_held = async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        registrar.register(client(9));
    };
    let (run, ()) = tokio::join!(
        b.run(broker.transport(), next.until(|ev| handled(ev) == 2)),
        register_once_both_held
    );
    run.unwrap();
    assert_eq!(
        seen.get(),
        vec![1, 2],
        "the next consumer kept the key's order"
    );
}

/// A consumer told to stop while payment 1 of a client is out in a 5 s delay; payment 2 of the
/// client is published a second after the stop began, and a next consumer is already running.
/// With `wait_for_copies_at_stop`, the stopping consumer goes on until payment 1 is back and
/// has run: payment 2 reaches it, waits behind payment 1 and runs after it, and the stop ends
/// then (5 s in, not at the wait's 10 s bound). Without it (the control), the next consumer
/// gets payment 2 first and runs it before payment 1 is back.
#[tokio::test(start_paused = true)]
async fn a_stop_that_waits_for_its_copies_keeps_the_order_of_what_is_published_after_it() {
    assert_eq!(published_after_the_stop(true).await, (vec![1, 2], vec![]));
    assert_eq!(published_after_the_stop(false).await, (vec![], vec![2, 1]));
}

/// The scene above; what the stopping consumer ran, and what the next one ran.
async fn published_after_the_stop(wait: bool) -> (Vec<u64>, Vec<u64>) {
    let broker = MemoryBroker::new();
    let keys = MemoryKeys::new();
    broker.register(client(5));
    broker.publish(payment(1, 5));
    let (ran_a, ran_b) = (Log::new(), Log::new());
    let first = Recorder::new();
    let mut a = builder(&first, fails_once(1, ran_a.clone()))
        .policy(linear(5, 3))
        .keys(keys.clone());
    if wait {
        a = a.wait_for_copies_at_stop(Duration::from_secs(10));
    }
    let a = a.build();
    let next = Recorder::new();
    let b = builder(&next, logs(ran_b.clone()))
        .policy(linear(5, 3))
        .keys(keys.clone())
        .build();
    let t0 = tokio::time::Instant::now();
    // The first consumer is told to stop at 1 s; the next one starts then.
    let first_run = async {
        let report = a
            .run(
                broker.transport(),
                tokio::time::sleep(Duration::from_secs(1)),
            )
            .await
            .unwrap();
        (report, t0.elapsed())
    };
    let next_run = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.run(
            broker.transport(),
            tokio::time::sleep(Duration::from_secs(20)),
        )
        .await
        .unwrap()
    };
    let producer = publish_at(broker.clone(), Duration::from_secs(2), payment(2, 5));
    let ((report, stopped_after), _, ()) = tokio::join!(first_run, next_run, producer);
    if wait {
        assert_eq!(report.handled, 2, "{report:?}");
        assert!(
            stopped_after >= Duration::from_secs(5) && stopped_after < Duration::from_secs(6),
            "the stop ended once payment 1 was back and had run: {stopped_after:?}"
        );
    } else {
        assert_eq!(
            stopped_after,
            Duration::from_secs(1),
            "a stop that does not wait"
        );
    }
    (ran_a.get(), ran_b.get())
}
