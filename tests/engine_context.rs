//! `handler_with_context` hands the handler its delivery's key, message id, attempt and
//! redelivered flag: what an idempotent handler needs to deduplicate.

mod common;

use common::*;
use prereq::memory::{MemoryBroker, Stored};
use prereq::{Context, Decision, HandlerError};

#[tokio::test(start_paused = true)]
async fn the_handler_sees_key_id_attempt_and_redelivery() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(1, 1)); // fails once, then runs again at attempt 1
    broker.publish_stored(Stored {
        redelivered: true,
        ..Stored::message(payment(2, 1))
    });
    let rec = Recorder::new();
    let seen: Log<(u64, Context<u64>)> = Log::new();
    let consumer = {
        let seen = seen.clone();
        builder(&rec, move |p: Payment, ctx: Context<u64>| {
            let first_try = p.id == 1 && ctx.attempt == 0;
            seen.push((p.id, ctx));
            async move {
                if first_try {
                    Err(HandlerError::retry("busy"))
                } else {
                    Ok(())
                }
            }
        })
        .policy(linear(1, 3))
        .build()
    };
    run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 2
    })
    .await;
    let seen: Vec<_> = seen
        .get()
        .into_iter()
        .map(|(id, c)| (id, c.key, c.message_id, c.attempt, c.redelivered))
        .collect();
    assert_eq!(
        seen,
        // Payment 2 (same client) waits behind payment 1's deferral: the key keeps its order.
        vec![
            (1, 1, mid(1), 0, false),
            (1, 1, mid(1), 1, false),
            (2, 1, mid(2), 0, true),
        ]
    );
}
