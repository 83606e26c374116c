//! Dead-letter listing and replay (`prereq::amqp::replay`) against a real broker: every
//! dead letter replayed arrives once at its original queue with its attempts reset, a selection
//! replays exactly what it picks, a listing and a dry run change nothing, and what cannot be
//! replayed stays in the dead-letter queue.
#![cfg(feature = "amqp")]

mod replay_support;

use std::collections::BTreeSet;

use lapin::types::AMQPValue;
use prereq::amqp::headers;
use prereq::amqp::replay::{
    self, DeadLetterQueue, KeyPath, Outcome, ReplayError, ReplayOptions, Selection, StopSignal,
    Tally, Target,
};
use replay_support::{
    Dead, Fixture, ROUTING_KEY, assert_empty, header_int, header_str, ids, mixed, sorted,
    take_exactly,
};

fn dlq(f: &Fixture) -> DeadLetterQueue {
    DeadLetterQueue::new(replay_support::addr(), &f.dlq)
}

async fn run(f: &Fixture, selection: &Selection) -> replay::ReplayReport {
    replay::replay(&dlq(f), selection, &ReplayOptions::default(), |_| {})
        .await
        .expect("replay")
}

fn ids_of(letters: &[Dead], pred: impl Fn(&Dead) -> bool) -> Vec<String> {
    sorted(
        letters
            .iter()
            .filter(|d| pred(d))
            .map(|d| d.id.clone())
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_all_delivers_each_once_with_attempts_reset_and_empties_the_queue() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    let f = Fixture::new(&conn, "replay-all").await;
    let letters = mixed("all", 100);
    f.dead_letters(&letters).await;

    let mut seen = Vec::new();
    let report = replay::replay(
        &dlq(&f),
        &Selection::all(),
        &ReplayOptions::default(),
        |p| {
            seen.push((p.done, p.total, p.outcome.clone()));
        },
    )
    .await
    .expect("replay");

    assert_eq!(report.ready_at_start, 100);
    assert_eq!(report.read, 100);
    assert!(
        !report.interrupted && report.aborted.is_none(),
        "{report:?}"
    );
    assert_eq!(
        report.total(),
        Tally {
            replayed: 100,
            ..Tally::default()
        }
    );
    for kind in [
        "key-never-arrived",
        "retries-exhausted",
        "rejected",
        "undecodable",
    ] {
        assert_eq!(report.by_kind[kind].replayed, 25, "{kind}");
    }
    assert_eq!(seen.len(), 100, "one progress call per message");
    assert_eq!(seen.last().map(|s| (s.0, s.1)), Some((100, 100)));
    let target = Target {
        exchange: f.exchange.clone(),
        routing_key: ROUTING_KEY.into(),
    };
    assert!(
        seen.iter()
            .all(|s| s.2 == Outcome::Replayed(target.clone()))
    );

    let got = take_exactly(&f.ch, &f.work, 100).await;
    assert_eq!(
        sorted(ids(&got)),
        ids_of(&letters, |_| true),
        "each once, none missing"
    );
    for g in &got {
        let d = letters.iter().find(|d| d.id == g.id).expect("known id");
        assert_eq!(g.body, d.body(), "{}: same body", g.id);
        let p = &g.properties;
        assert_eq!(
            p.correlation_id().as_ref().map(|c| c.as_str().to_owned()),
            Some(format!("corr-{}", d.id))
        );
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(p.delivery_mode(), &Some(2));
        let h = g.headers();
        for gone in [
            headers::DEAD_LETTER_KIND,
            headers::DEAD_LETTER_REASON,
            headers::LAST_ERROR,
            headers::ATTEMPTS,
            headers::DEAD_LETTERED_AT,
            headers::ATTEMPT,
        ] {
            assert!(
                h.is_none_or(|h| !h.contains_key(gone)),
                "{}: {gone} kept",
                g.id
            );
        }
        // A quorum queue stamps its own count on every delivery: 0 here, not the dead
        // letter's.
        assert!(
            header_int(h, "x-delivery-count").is_none_or(|c| c == 0),
            "{}: {:?}",
            g.id,
            header_int(h, "x-delivery-count")
        );
        let inner = h.expect("headers").inner();
        assert_eq!(inner.get(headers::RETRY), Some(&AMQPValue::LongInt(0)));
        assert_eq!(header_int(h, headers::REPLAYED), Some(1));
        assert_eq!(header_int(h, headers::RETRY_LIMIT), Some(10));
        assert_eq!(header_str(h, "tenant").as_deref(), Some("acme"));
        assert_eq!(
            header_str(h, headers::ORIGINAL_EXCHANGE).as_deref(),
            Some(f.exchange.as_str())
        );
    }
    assert_empty(&f.ch, &f.dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selection_replays_exactly_what_it_picks() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    let f = Fixture::new(&conn, "replay-select").await;
    let letters = mixed("sel", 40);
    f.dead_letters(&letters).await;
    let mut replayed: BTreeSet<String> = BTreeSet::new();

    // By kind.
    let report = run(&f, &Selection::all().kind("rejected")).await;
    let want = ids_of(&letters, |d| d.kind == "rejected");
    assert_eq!(report.total().replayed, want.len());
    assert_eq!(report.total().left, 40 - want.len());
    let got = take_exactly(&f.ch, &f.work, want.len()).await;
    assert_eq!(sorted(ids(&got)), want);
    replayed.extend(want);

    // By key (a top-level field): the undecodable ones cannot say their key.
    replay_support::wait_ready(&f.ch, &f.dlq, 40 - replayed.len() as u32).await;
    let by_key = Selection::all().keys(KeyPath::parse("clientId").unwrap(), ["5", "6"]);
    let report = run(&f, &by_key).await;
    let want = ids_of(&letters, |d| {
        !replayed.contains(&d.id) && d.kind != "undecodable" && d.client >= 5
    });
    assert!(!want.is_empty());
    assert_eq!(report.total().replayed, want.len());
    let undecodable = letters.iter().filter(|d| d.kind == "undecodable").count();
    assert_eq!(report.total().skipped, undecodable, "{report:?}");
    assert!(
        report
            .not_replayed
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Skipped(why) if why.contains("not JSON"))),
        "{:?}",
        report.not_replayed
    );
    let got = take_exactly(&f.ch, &f.work, want.len()).await;
    assert_eq!(sorted(ids(&got)), want);
    replayed.extend(want);

    // By a nested key, within one kind.
    replay_support::wait_ready(&f.ch, &f.dlq, 40 - replayed.len() as u32).await;
    let nested = Selection::all()
        .kind("key-never-arrived")
        .keys(KeyPath::parse("client.id").unwrap(), ["c0", "c1"]);
    let report = run(&f, &nested).await;
    let want = ids_of(&letters, |d| {
        !replayed.contains(&d.id) && d.kind == "key-never-arrived" && d.client <= 1
    });
    assert!(!want.is_empty());
    assert_eq!(report.total().replayed, want.len());
    assert_eq!(
        report.total().skipped,
        0,
        "undecodable ones not of the kind"
    );
    let got = take_exactly(&f.ch, &f.work, want.len()).await;
    assert_eq!(sorted(ids(&got)), want);
    replayed.extend(want);

    // By id, with a limit of one.
    replay_support::wait_ready(&f.ch, &f.dlq, 40 - replayed.len() as u32).await;
    let rest: Vec<String> = ids_of(&letters, |d| !replayed.contains(&d.id));
    let two = Selection::all().id(rest[0].clone()).id(rest[1].clone());
    let report = run(&f, &two.clone().limit(1)).await;
    assert_eq!(report.total().replayed, 1);
    let got = take_exactly(&f.ch, &f.work, 1).await;
    assert!(rest[..2].contains(&got[0].id), "{:?}", ids(&got));
    replayed.insert(got[0].id.clone());
    replay_support::wait_ready(&f.ch, &f.dlq, 40 - replayed.len() as u32).await;
    let report = run(&f, &two).await;
    assert_eq!(report.total().replayed, 1, "the other one");
    let got = take_exactly(&f.ch, &f.work, 1).await;
    replayed.insert(got[0].id.clone());
    assert!(replayed.contains(&rest[0]) && replayed.contains(&rest[1]));

    // The rest is untouched, dead-letter headers and all.
    let left = take_exactly(&f.ch, &f.dlq, 40 - replayed.len()).await;
    assert_eq!(
        ids(&left),
        letters
            .iter()
            .filter(|d| !replayed.contains(&d.id))
            .map(|d| d.id.clone())
            .collect::<Vec<_>>(),
        "in their order"
    );
    for g in &left {
        let d = letters.iter().find(|d| d.id == g.id).expect("known id");
        assert_eq!(
            header_str(g.headers(), headers::DEAD_LETTER_KIND).as_deref(),
            Some(d.kind)
        );
        assert_eq!(header_int(g.headers(), headers::ATTEMPT), Some(10));
        assert_eq!(g.body, d.body());
    }
    assert_empty(&f.ch, &f.work).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_replayed_stays_in_the_dead_letter_queue() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    let f = Fixture::new(&conn, "replay-fail").await;
    let mut no_origin = Dead::new("no-origin", "rejected", 1);
    no_origin.no_origin = true;
    let mut unroutable = Dead::new("unroutable", "rejected", 2);
    unroutable.routing_key = Some("nobody.listens".into());
    let mut missing = Dead::new("missing-exchange", "rejected", 3);
    missing.exchange = Some(format!("{}-missing", f.exchange));
    let fine = Dead::new("fine", "rejected", 4);
    let fine_after = Dead::new("fine-after", "rejected", 5);
    let letters = [no_origin, unroutable, missing, fine, fine_after];
    f.dead_letters(&letters).await;

    let report = run(&f, &Selection::all()).await;
    assert!(report.aborted.is_none(), "{report:?}");
    assert_eq!(
        report.total(),
        Tally {
            replayed: 2,
            skipped: 1,
            failed: 2,
            left: 0
        }
    );
    let why = |id: &str| {
        report
            .not_replayed
            .iter()
            .find(|(m, _)| m.message_id.as_deref() == Some(id))
            .map(|(_, o)| o.clone())
    };
    assert!(matches!(why("no-origin"), Some(Outcome::Skipped(w)) if w.contains("origin")));
    assert!(
        matches!(why("unroutable"), Some(Outcome::Failed(w)) if w.contains("NO_ROUTE")),
        "{:?}",
        why("unroutable")
    );
    assert!(
        matches!(why("missing-exchange"), Some(Outcome::Failed(w)) if w.contains("does not exist"))
    );
    let got = take_exactly(&f.ch, &f.work, 2).await;
    assert_eq!(sorted(ids(&got)), vec!["fine", "fine-after"]);
    let left = take_exactly(&f.ch, &f.dlq, 3).await;
    assert_eq!(
        sorted(ids(&left)),
        vec!["missing-exchange", "no-origin", "unroutable"]
    );
    for g in &left {
        assert_eq!(
            header_str(g.headers(), headers::DEAD_LETTER_KIND).as_deref(),
            Some("rejected"),
            "left as it was"
        );
    }

    // With a fallback target, the one without origin goes there.
    f.dead_letters(&letters[..1]).await;
    let options = ReplayOptions {
        fallback: Some(Target {
            exchange: String::new(),
            routing_key: f.work.clone(),
        }),
        ..ReplayOptions::default()
    };
    let report = replay::replay(&dlq(&f), &Selection::all(), &options, |_| {})
        .await
        .expect("replay");
    assert_eq!(report.total().replayed, 1, "{report:?}");
    let got = take_exactly(&f.ch, &f.work, 1).await;
    assert_eq!(ids(&got), vec!["no-origin"]);
    assert_empty(&f.ch, &f.dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_and_a_listing_change_nothing() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    let f = Fixture::new(&conn, "replay-dry").await;
    // More than 32: the broker keeps a small set of returns in order by chance, not a large one.
    let letters = mixed("dry", 100);
    f.dead_letters(&letters).await;
    let q = dlq(&f);

    let options = ReplayOptions {
        dry_run: true,
        ..ReplayOptions::default()
    };
    let report = replay::replay(&q, &Selection::all(), &options, |_| {})
        .await
        .expect("dry run");
    assert!(report.dry_run);
    assert_eq!(report.total().replayed, 100, "would replay every one");
    replay_support::wait_ready(&f.ch, &f.dlq, 100).await;
    assert_eq!(
        replay_support::ready_count(&f.ch, &f.work).await,
        0,
        "nothing sent"
    );

    let key = KeyPath::parse("clientId").unwrap();
    let first = replay::list(&q, &Selection::all().key_field(key.clone()), true, |_| {})
        .await
        .expect("list");
    assert_eq!((first.ready_at_start, first.read), (100, 100));
    let ids_listed = |l: &replay::Listing| -> Vec<String> {
        l.messages
            .iter()
            .map(|m| m.message_id.clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(
        ids_listed(&first),
        letters.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        "in queue order"
    );
    let kna = &first.by_kind["key-never-arrived"];
    assert_eq!(kna.count, 25);
    let kna_letters: Vec<&Dead> = letters
        .iter()
        .filter(|d| d.kind == "key-never-arrived")
        .collect();
    assert_eq!(kna.oldest_ms, Some(kna_letters[0].dead_lettered_at));
    assert_eq!(
        kna.newest_ms,
        Some(kna_letters[kna_letters.len() - 1].dead_lettered_at)
    );
    assert_eq!(
        kna.sample_reason.as_deref(),
        Some("key-never-arrived for client 0")
    );
    assert_eq!(first.messages[1].key, Some(Ok("1".to_owned())));
    assert!(matches!(&first.messages[3].key, Some(Err(e)) if e.contains("not JSON")));

    // The queue is whole again, in the same order: a second listing sees the same.
    replay_support::wait_ready(&f.ch, &f.dlq, 100).await;
    let second = replay::list(&q, &Selection::all(), true, |_| {})
        .await
        .expect("list again");
    assert_eq!(ids_listed(&second), ids_listed(&first));
    let max_count = second
        .by_kind
        .values()
        .filter_map(|s| s.max_delivery_count)
        .max();
    println!("x-delivery-count after a dry run and a listing: {max_count:?}");
    // One return per run (RabbitMQ 4.3+ no longer counts a nack at all).
    assert!(max_count.is_none_or(|c| c <= 2), "{max_count:?}");

    // A filtered listing sums up only what it picks, and reports unreadable keys.
    replay_support::wait_ready(&f.ch, &f.dlq, 100).await;
    let picked = replay::list(&q, &Selection::all().keys(key, ["3"]), false, |_| {})
        .await
        .expect("filtered list");
    let want = letters
        .iter()
        .filter(|d| d.kind != "undecodable" && d.client == 3)
        .count();
    assert_eq!(
        picked.by_kind.values().map(|s| s.count).sum::<usize>(),
        want
    );
    assert_eq!(picked.unreadable.len(), 25, "the undecodable ones");
    assert!(picked.messages.is_empty(), "not kept when not asked");

    let all = take_exactly(&f.ch, &f.dlq, 100).await;
    assert_eq!(sorted(ids(&all)), ids_of(&letters, |_| true));
    for g in &all {
        assert_eq!(
            header_int(g.headers(), headers::ATTEMPT),
            Some(10),
            "unchanged"
        );
    }
    assert_empty(&f.ch, &f.work).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_the_run_after_the_message_in_progress() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    let f = Fixture::new(&conn, "replay-stop").await;
    let letters = mixed("stop", 50);
    f.dead_letters(&letters).await;
    let stop = StopSignal::new();
    let options = ReplayOptions {
        stop: stop.clone(),
        ..ReplayOptions::default()
    };
    let mut done = Vec::new();
    let report = replay::replay(&dlq(&f), &Selection::all(), &options, |p| {
        done.push(p.message.message_id.clone().unwrap_or_default());
        if p.done == 7 {
            stop.stop();
        }
    })
    .await
    .expect("replay");
    assert!(report.interrupted);
    assert_eq!((report.read, report.total().replayed), (7, 7));
    let got = take_exactly(&f.ch, &f.work, 7).await;
    assert_eq!(
        sorted(ids(&got)),
        sorted(done.clone()),
        "exactly the 7 done"
    );
    let left = take_exactly(&f.ch, &f.dlq, 43).await;
    assert_eq!(
        sorted(ids(&left)),
        ids_of(&letters, |d| !done.contains(&d.id)),
        "the rest, once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_a_clear_error() {
    let Some(_conn) = replay_support::broker().await else {
        return;
    };
    let name = format!("{}missing.dead", replay_support::unique("replay-missing"));
    let q = DeadLetterQueue::new(replay_support::addr(), &name);
    let listed = replay::list(&q, &Selection::all(), false, |_| {}).await;
    assert_eq!(
        listed.err(),
        Some(ReplayError::QueueNotFound {
            queue: name.clone()
        })
    );
    let replayed = replay::replay(&q, &Selection::all(), &ReplayOptions::default(), |_| {}).await;
    assert!(
        matches!(&replayed, Err(ReplayError::QueueNotFound { queue }) if *queue == name),
        "{replayed:?}"
    );
    let bad_rate = ReplayOptions {
        rate: Some(0.0),
        ..ReplayOptions::default()
    };
    let refused = replay::replay(&q, &Selection::all(), &bad_rate, |_| {}).await;
    assert!(
        matches!(refused, Err(ReplayError::Invalid(_))),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_deleted_mid_run_fails_its_messages_and_the_run_goes_on() {
    let Some(conn) = replay_support::broker().await else {
        return;
    };
    let f = Fixture::new(&conn, "replay-gone").await;
    // A second exchange, bound to the same queue, that vanishes after the first replay.
    let doomed = format!("{}-doomed", f.exchange);
    let cleanup = replay_support::Cleanup::new();
    cleanup.exchange(&doomed);
    f.ch.exchange_declare(
        doomed.as_str().into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("declare");
    f.ch.queue_bind(
        f.work.as_str().into(),
        doomed.as_str().into(),
        ROUTING_KEY.into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("bind");
    let letters: Vec<Dead> = ["a1", "a2", "a3", "b"]
        .into_iter()
        .map(|id| {
            let mut d = Dead::new(id, "rejected", 1);
            if id.starts_with('a') {
                d.exchange = Some(doomed.clone());
            }
            d
        })
        .collect();
    f.dead_letters(&letters).await;

    let addr = replay_support::addr();
    let report = replay::replay(
        &dlq(&f),
        &Selection::all(),
        &ReplayOptions::default(),
        |p| {
            if p.done == 1 {
                // Delete it now, from outside the run (its own thread, runtime and connection).
                let doomed = doomed.clone();
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async move {
                        let c = lapin::Connection::connect(
                            addr.expose(),
                            lapin::ConnectionProperties::default(),
                        )
                        .await
                        .expect("connect");
                        let ch = c.create_channel().await.expect("channel");
                        ch.exchange_delete(doomed.as_str().into(), Default::default())
                            .await
                            .expect("delete exchange");
                        let _ = c.close(200, "done".into()).await;
                    });
                })
                .join()
                .expect("delete thread");
            }
        },
    )
    .await
    .expect("replay");
    assert!(report.aborted.is_none(), "{report:?}");
    assert_eq!(
        report.total(),
        Tally {
            replayed: 2,
            failed: 2,
            ..Tally::default()
        },
        "{:?}",
        report.not_replayed
    );
    let why: Vec<(Option<String>, Outcome)> = report
        .not_replayed
        .iter()
        .map(|(m, o)| (m.message_id.clone(), o.clone()))
        .collect();
    // The first one learns it from the broker (which closes the publishing channel: it is
    // reopened), the next one from that lesson.
    assert!(
        matches!(&why[..], [
            (Some(a2), Outcome::Failed(w2)),
            (Some(a3), Outcome::Failed(w3)),
        ] if a2 == "a2" && w2.contains("NOT_FOUND") && a3 == "a3" && w3.contains("does not exist")),
        "{why:?}"
    );
    let got = take_exactly(&f.ch, &f.work, 2).await;
    assert_eq!(sorted(ids(&got)), vec!["a1", "b"]);
    let left = take_exactly(&f.ch, &f.dlq, 2).await;
    assert_eq!(sorted(ids(&left)), vec!["a2", "a3"]);
}
