//! Hostile bodies: malformed JSON, wrong types, an empty body, 10 MB bodies, invalid UTF-8,
//! bad registrations. Each is dead-lettered as `Undecodable` with a short, readable reason (the
//! decode error, never the body itself), and the consumer keeps handling good messages after
//! them.

mod common;

use common::*;
use prereq::memory::MemoryBroker;
use prereq::transport::Source;
use prereq::{DeadLetterKind, Decision, Event};

const TEN_MB: usize = 10 << 20;

/// A dead-letter reason must fit in a broker header and a log line.
const MAX_REASON: usize = 1024;

fn dead(ev: &[Event<u64>]) -> usize {
    count(ev, |e| matches!(e.decision, Decision::DeadLettered(_)))
}

/// (what, body, source) of every hostile input.
fn hostile() -> Vec<(&'static str, Vec<u8>, Source)> {
    let mut huge_string = Vec::with_capacity(TEN_MB + 2);
    huge_string.push(b'"');
    huge_string.resize(TEN_MB + 1, b'a');
    huge_string.push(b'"');
    let mut huge_object = br#"{"id":1,"client":1,"pad":""#.to_vec();
    huge_object.resize(TEN_MB, b'x'); // an unterminated string
    let mut deep = br#"{"id":1,"client":1,"pad":"#.to_vec();
    deep.resize(TEN_MB, b'['); // 10 M levels of nesting in an ignored field
    vec![
        (
            "malformed JSON",
            br#"{"id":1,"client":"#.to_vec(),
            Source::Message,
        ),
        (
            "wrong types",
            br#"{"id":"one","client":1}"#.to_vec(),
            Source::Message,
        ),
        ("missing field", br#"{"id":1}"#.to_vec(), Source::Message),
        ("empty body", Vec::new(), Source::Message),
        ("10 MB wrong type", huge_string, Source::Message),
        ("10 MB unterminated", huge_object, Source::Message),
        ("deeply nested", deep, Source::Message),
        ("invalid UTF-8", b"\xff\xfe\xfd".to_vec(), Source::Message),
        (
            "invalid UTF-8 in a string",
            b"{\"id\":1,\"client\":\"\xff\"}".to_vec(),
            Source::Message,
        ),
        (
            "negative id",
            br#"{"id":-1,"client":1}"#.to_vec(),
            Source::Message,
        ),
        (
            "bad registration",
            b"not json".to_vec(),
            Source::Registration,
        ),
        (
            "registration of the wrong type",
            br#"{"id":"seven"}"#.to_vec(),
            Source::Registration,
        ),
    ]
}

#[tokio::test(start_paused = true)]
async fn each_bad_body_is_dead_lettered_with_a_readable_reason_and_the_consumer_goes_on() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(1, 1));
    let inputs = hostile();
    for (_, body, source) in &inputs {
        match source {
            Source::Message => broker.publish(body.clone()),
            Source::Registration => broker.register(body.clone()),
        }
    }
    // Good messages after the bad ones, including a new registration and a held payment.
    broker.publish(payment(2, 3));
    broker.register(client(3));
    broker.publish(payment(3, 1));

    let rec = Recorder::new();
    let seen = Log::new();
    let log = seen.clone();
    let consumer = builder(&rec, move |p: Payment| {
        log.push(p.id);
        async { Ok(()) }
    })
    .build();
    let expected = inputs.len();
    let report = run_until(consumer, &broker, &rec, move |ev| {
        handled(ev) == 3 && dead(ev) == expected
    })
    .await;

    assert_eq!(seen.get(), vec![1, 2, 3], "good messages all handled");
    let dead_letters = broker.dead_letters();
    assert_eq!(dead_letters.len(), inputs.len());
    for ((what, body, source), dl) in inputs.iter().zip(&dead_letters) {
        assert_eq!(dl.message.body, *body, "{what}: the body is kept as it was");
        assert_eq!(dl.message.source, *source, "{what}");
        assert_eq!(dl.dead_letter.kind, DeadLetterKind::Undecodable, "{what}");
        assert_eq!(dl.dead_letter.attempts, 0, "{what}");
        let reason = &dl.dead_letter.reason;
        let prefix = match source {
            Source::Message => "invalid JSON body: ",
            Source::Registration => "invalid JSON registration: ",
        };
        assert!(reason.starts_with(prefix), "{what}: {reason:?}");
        assert!(
            reason.len() > prefix.len() && reason.len() <= MAX_REASON,
            "{what}: a reason of {} bytes",
            reason.len()
        );
        assert!(
            reason.contains("line ") && reason.contains("column "),
            "{what}: says where: {reason:?}"
        );
        assert!(
            !reason.chars().any(char::is_control),
            "{what}: printable: {reason:?}"
        );
    }
    // The events carry the same reasons; no key, since nothing decoded.
    let events: Vec<_> = rec
        .events()
        .into_iter()
        .filter(|e| matches!(e.decision, Decision::DeadLettered(_)))
        .collect();
    assert_eq!(events.len(), inputs.len());
    for e in &events {
        assert_eq!(e.key, None);
        let Decision::DeadLettered(dl) = &e.decision else {
            unreachable!()
        };
        assert!(dl.reason.len() <= MAX_REASON);
    }
    assert_eq!(report.dead_lettered, inputs.len() as u64);
    assert_eq!((report.handled, report.registered), (3, 2));
    assert_eq!(broker.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_registration_without_a_registration_decoder_is_dead_lettered() {
    let broker = MemoryBroker::new();
    broker.register(client(1));
    broker.publish(payment(1, 1));

    let rec = Recorder::new();
    let consumer =
        prereq::DependentConsumer::builder(|p: &Payment| p.client, |_p: Payment| async { Ok(()) })
            .on_event(rec.observer())
            .build();
    let report = run_until(consumer, &broker, &rec, |ev| {
        dead(ev) == 1 && count(ev, |e| e.decision == Decision::Held) == 1
    })
    .await;
    let dl = &broker.dead_letters()[0];
    assert_eq!(dl.dead_letter.kind, DeadLetterKind::Undecodable);
    assert!(
        dl.dead_letter.reason.contains("no registration decoder"),
        "{:?}",
        dl.dead_letter.reason
    );
    assert_eq!(report.registered, 0);
}
