//! A held message that the broker delivers again (its connection dropped and came back, so the
//! held delivery is void) is held once, not twice: the redelivered copy takes the original's
//! place and hold time, and the stale delivery is dropped. Without this, every message held
//! across a reconnect would run twice when its key arrives, and stale entries would eat the
//! hold budget until they expired.

mod common;

use common::*;
use prereq::Decision;
use prereq::memory::{MemoryBroker, Stored};

fn redelivered(body: Vec<u8>) -> Stored {
    Stored {
        redelivered: true,
        ..Stored::message(body)
    }
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_copy_of_a_held_message_replaces_it() {
    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7)); // held: client 7 unknown
    broker.publish(payment(2, 7)); // held behind it
    broker.publish_stored(redelivered(payment(1, 7))); // the broker gives payment 1 again
    broker.register(client(7));
    let rec = Recorder::new();
    let seen = Log::new();
    let consumer = {
        let seen = seen.clone();
        builder(&rec, move |p: Payment| {
            seen.push(p.id);
            async { Ok(()) }
        })
        .build()
    };
    let report = run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 2
    })
    .await;
    assert_eq!(seen.get(), vec![1, 2], "each once, in the original order");
    assert_eq!(report.held, 2, "the copy did not count as a new hold");
    assert_eq!(report.peak_held, 2);
    assert_eq!(broker.pending(), 0, "the stale delivery was settled too");
    assert_eq!(
        broker.stats().acked,
        4,
        "2 handled, the stale delivery, the registration"
    );
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_message_that_is_not_held_is_handled_normally() {
    let broker = MemoryBroker::new();
    broker.register(client(7));
    broker.publish_stored(redelivered(payment(1, 7)));
    broker.publish_stored(redelivered(payment(2, 8))); // held: nothing to replace
    let rec = Recorder::new();
    let consumer = builder(&rec, |_p: Payment| async { Ok(()) }).build();
    let report = run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 1
            && count(ev, |e| e.decision == Decision::Held) == 1
    })
    .await;
    assert_eq!((report.handled, report.held), (1, 1));
}
