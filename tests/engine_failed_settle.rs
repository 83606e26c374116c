//! A settlement the transport did not confirm (the connection dropped, the confirm was refused)
//! did not happen, and is reported as such: never as `Deferred` or `Handled`.
//!
//! - A deferral whose copy the broker may not have stored is reported as failed, and keeps its
//!   key's order all the same: the broker gives the original back (or stored the copy after
//!   all), and the key's later messages wait for whichever comes first, which takes the
//!   original's place. If neither comes back here (another instance took it), they wait
//!   30 s at most.
//! - An acknowledgement that failed leaves the message with the broker, which delivers it again:
//!   it runs again. Every event of a handled message is dated no earlier than the moment its
//!   handler returned and its acknowledgement was made.

mod common;

use std::time::Duration;

use common::*;
use prereq::Decision;
use prereq::memory::MemoryBroker;
use prereq::transport::Settle;

/// When the broker delivers the message of a failed settlement again (the reconnect after a
/// dropped connection).
const REDELIVERY: Duration = Duration::from_secs(5);

/// How long each handler runs where the test dates events.
const HANDLER: Duration = Duration::from_secs(1);

/// Client 5 is registered; payment 1's handler fails once and its deferral fails, and the
/// broker gives payment 1 back `redelivery` later (never: another instance took it); payment 2
/// of the client comes 100 ms after payment 1. Until `until_handled` payments are handled: the
/// broker, the events, the payments the handler ran successfully in order, and the report.
async fn failed_deferral_then_payment_2(
    redelivery: Option<Duration>,
    until_handled: usize,
) -> (MemoryBroker, Recorder<u64>, Vec<u64>, prereq::Report) {
    let broker = MemoryBroker::new();
    broker.register(client(5));
    broker.publish(payment(1, 5));
    let deferral = |s: &Settle| matches!(s, Settle::Defer { .. });
    let transport = FailingSettles::first(&broker, deferral, Fails::GivenBack(redelivery));
    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = builder(&rec, fails_once(1, seen.clone()))
        .policy(linear(1, 3))
        .build();
    // After payment 1's deferral failed.
    let producer = publish_at(broker.clone(), Duration::from_millis(100), payment(2, 5));
    let (report, ()) = tokio::join!(
        consumer.run(transport, rec.until(move |ev| handled(ev) == until_handled)),
        producer
    );
    (broker, rec, seen.get(), report.unwrap())
}

/// How long after payment 1's failed deferral payment 2 was released; asserts what both tests
/// share: the failed deferral reported as such (never as a deferral), no copy stored, and
/// payment 2 held, released, handled.
fn released_after_failure(
    rec: &Recorder<u64>,
    report: &prereq::Report,
    broker: &MemoryBroker,
) -> Duration {
    let one = rec.of("1");
    let failed_at = one
        .first()
        .filter(|e| matches!(e.decision, Decision::SettleFailed { .. }))
        .map(|e| e.at)
        .unwrap_or_else(|| panic!("the failed deferral is reported as such: {one:?}"));
    assert!(
        !one.iter()
            .any(|e| matches!(e.decision, Decision::Deferred { .. })),
        "no deferral reported: {one:?}"
    );
    assert_eq!(report.deferred, 0, "{report:?}");
    assert_eq!(report.settle_failures, 1, "{report:?}");
    assert_eq!(broker.stats().deferred, 0, "no copy stored");
    let two = rec.of("2");
    let decisions: Vec<Decision> = two.iter().map(|e| e.decision.clone()).collect();
    assert!(
        matches!(
            decisions.as_slice(),
            [Decision::Held, Decision::Released { .. }, Decision::Handled]
        ),
        "payment 2 waited behind payment 1: {decisions:?}"
    );
    two[1].at - failed_at
}

#[tokio::test(start_paused = true)]
async fn a_failed_deferral_keeps_its_key_s_order() {
    let (broker, rec, seen, report) = failed_deferral_then_payment_2(Some(REDELIVERY), 2).await;
    assert_eq!(
        seen,
        vec![1, 2],
        "payment 1, given back by the broker, ran first"
    );
    let waited = released_after_failure(&rec, &report, &broker);
    assert_eq!(
        waited, REDELIVERY,
        "payment 2 was released as the broker gave payment 1 back"
    );
    assert_eq!(report.handled, 2, "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_deferral_that_never_comes_back_blocks_its_key_30_s_at_most() {
    // Another instance took payment 1.
    let (broker, rec, seen, report) = failed_deferral_then_payment_2(None, 1).await;
    assert_eq!(seen, vec![2], "payment 2 ran once payment 1 was given up");
    let waited = released_after_failure(&rec, &report, &broker);
    assert_eq!(
        waited,
        Duration::from_secs(30),
        "payment 2 waited 30 s after the failure for payment 1"
    );
    assert_eq!(report.handled, 1, "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_acknowledgement_is_reported_and_the_message_runs_again() {
    let broker = MemoryBroker::new();
    broker.register(client(5));
    broker.publish(payment(1, 5));
    let rec = Recorder::new();
    let ran = Log::new();
    let consumer = {
        let ran = ran.clone();
        builder(&rec, move |p: Payment| {
            let ran = ran.clone();
            async move {
                tokio::time::sleep(HANDLER).await;
                // When this handler returned.
                ran.push((p.id, tokio::time::Instant::now()));
                Ok(())
            }
        })
        .build()
    };
    let ack = |s: &Settle| matches!(s, Settle::Ack);
    let transport = FailingSettles::first(&broker, ack, Fails::GivenBack(Some(REDELIVERY)));
    let report = consumer
        .run(transport, rec.until(move |ev| handled(ev) == 1))
        .await
        .unwrap();

    let events = rec.of("1");
    let decisions: Vec<Decision> = events.iter().map(|e| e.decision.clone()).collect();
    assert!(
        matches!(
            decisions.as_slice(),
            [Decision::SettleFailed { error }, Decision::Handled] if error.contains("connection dropped")
        ),
        "the failed acknowledgement is reported with the transport's error, then the redelivered \
         copy is handled: {decisions:?}"
    );
    assert!(
        events.iter().all(|e| e.key == Some(5)),
        "both events carry the key: {events:?}"
    );
    let runs = ran.get();
    assert_eq!(runs.len(), 2, "the handler ran again on the redelivery");
    for (event, (_, returned)) in events.iter().zip(&runs) {
        assert!(
            event.at >= *returned,
            "an event is dated after its handler returned: {:?} < {:?}",
            event.at,
            returned
        );
    }
    assert!(
        runs[1].1 >= runs[0].1 + REDELIVERY,
        "the second run waited for the broker's redelivery: {runs:?}"
    );
    assert_eq!(
        (report.handled, report.settle_failures),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(
        broker.stats().acked,
        2,
        "the registration and the payment's second delivery acknowledged"
    );
}
