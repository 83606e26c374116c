//! Group membership on a real RabbitMQ: members hear each other's heartbeats, a leaver is gone
//! from the others' sets at once, a member whose connection dies is gone after a few beats,
//! members that beat at different rates keep each other, and a member whose connection is cut
//! comes back by itself.
#![cfg(feature = "amqp")]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use prereq::amqp::{Broker, BrokerOptions, DelayMode, Membership, Partitions, Route};
use prereq::{DependentConsumer, MemoryKeys};
use tokio::sync::watch;

/// A broker connection of its own, named `name` (as `rabbitmqctl list_connections` shows).
async fn connect(addr: prereq::amqp::AmqpAddr, name: &str) -> Broker {
    Broker::connect(
        BrokerOptions::new(addr)
            .delay_mode(DelayMode::DelayQueues)
            .connection_name(name),
    )
    .await
    .expect("connect")
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Wait until `rx` shows `want`, for up to `timeout`; panics with the last set otherwise.
async fn wait_for(
    who: &str,
    rx: &mut watch::Receiver<BTreeSet<String>>,
    want: &BTreeSet<String>,
    timeout: Duration,
) {
    let got = tokio::time::timeout(timeout, rx.wait_for(|s| s == want))
        .await
        .map(|r| r.is_ok());
    match got {
        Ok(true) => {}
        Ok(false) => panic!("{who}: membership gone"),
        Err(_) => panic!(
            "{who}: wanted {want:?} within {timeout:?}, has {:?}",
            *rx.borrow()
        ),
    }
}

/// Three members see each other; one leaves and the others drop it at once — long before it
/// could have expired (the beat is 3 s, so expiry would take 9 s); the sets do not change
/// while nobody comes or goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_each_other_and_a_leaver_is_gone_at_once() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    support::init_tracing();
    let cleanup = support::Cleanup::new();
    let p = support::unique("members");
    let exchange = format!("{p}members");
    cleanup.members(&exchange);
    let beat = Duration::from_secs(3);
    let mut members = Vec::new();
    for m in ["a", "b", "c"] {
        let broker = connect(support::addr(), &format!("{p}{m}")).await;
        let membership = Membership::join(&broker, &exchange, m.to_owned(), beat)
            .await
            .expect("join");
        members.push((m, broker, membership));
    }
    let all = set(&["a", "b", "c"]);
    // A member hears those who joined before it at their next beat.
    for (m, _, membership) in &members {
        wait_for(m, &mut membership.members(), &all, beat * 4).await;
    }
    // Nothing changes while the group is stable: the watch only moves on a change.
    let mut quiet: Vec<_> = members.iter().map(|(_, _, m)| m.members()).collect();
    for rx in &mut quiet {
        rx.mark_unchanged();
    }
    tokio::time::sleep(beat * 2).await;
    for rx in &quiet {
        assert!(
            !rx.has_changed().expect("open"),
            "changed: {:?}",
            *rx.borrow()
        );
    }

    let (_, b_broker, b) = members.remove(1);
    b.leave().await;
    let rest = set(&["a", "c"]);
    for (m, _, membership) in &members {
        // Well before an expiry (3 beats = 9 s): the leave removed it.
        wait_for(m, &mut membership.members(), &rest, beat).await;
    }
    let _ = b_broker.close().await;
    for (_, broker, membership) in members {
        membership.leave().await;
        let _ = broker.close().await;
    }
}

/// Members that beat at different rates (a rollout that changes the beat, or a `Membership` of
/// the user's own beside prereq's) keep each other: each is expired after 3 of its own beats,
/// which its heartbeats claim, not of its hearer's. Before, the fast member dropped the slow one
/// 3 of its own (fast) beats after each slow heartbeat and heard it again at the next: its set
/// changed twice every slow beat, and in a partitioned group each change moved partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_beat_at_different_rates_keep_each_other() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    support::init_tracing();
    let cleanup = support::Cleanup::new();
    let p = support::unique("members-beats");
    let exchange = format!("{p}members");
    cleanup.members(&exchange);
    let beats = [
        ("fast", Duration::from_millis(200)),
        ("slow", Duration::from_secs(2)),
    ];
    let mut members = Vec::new();
    for (m, beat) in beats {
        let broker = connect(support::addr(), &format!("{p}{m}")).await;
        let membership = Membership::join(&broker, &exchange, m.to_owned(), beat)
            .await
            .expect("join");
        members.push((m, broker, membership));
    }
    let both = set(&["fast", "slow"]);
    for (m, _, membership) in &members {
        wait_for(m, &mut membership.members(), &both, Duration::from_secs(10)).await;
    }
    let mut quiet: Vec<_> = members
        .iter()
        .map(|(m, _, ms)| (*m, ms.members()))
        .collect();
    for (_, rx) in &mut quiet {
        rx.mark_unchanged();
    }
    // Three slow beats, thirty fast ones: the fast member's old expiry (600 ms) would have run
    // out after every slow heartbeat. (Beats of a few hundred milliseconds at least: a member
    // stalled for 3 of its beats on a loaded machine is expired, rightly.)
    tokio::time::sleep(Duration::from_secs(6)).await;
    for (m, rx) in &quiet {
        assert!(
            !rx.has_changed().expect("open"),
            "{m}'s set changed while nobody came or went (now {:?})",
            *rx.borrow()
        );
        assert_eq!(*rx.borrow(), both, "{m}");
    }
    for (_, broker, membership) in members {
        membership.leave().await;
        let _ = broker.close().await;
    }
}

/// A member that left and joins again under the same name (a service restarted with a stable
/// member name, as `Membership`'s example has it) is seen again at its first heartbeat. Before,
/// the others ignored the name for 10 of their expiries after the leave (30 beats: 15 s here),
/// so that a late heartbeat of the leaver would not bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_left_is_seen_again_when_it_joins_again_under_its_name() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    support::init_tracing();
    let cleanup = support::Cleanup::new();
    let p = support::unique("members-rejoin");
    let exchange = format!("{p}members");
    cleanup.members(&exchange);
    let beat = Duration::from_millis(500);
    let a_broker = connect(support::addr(), &format!("{p}a")).await;
    let a = Membership::join(&a_broker, &exchange, "a".into(), beat)
        .await
        .expect("join a");
    let b_broker = connect(support::addr(), &format!("{p}b")).await;
    let b = Membership::join(&b_broker, &exchange, "b".into(), beat)
        .await
        .expect("join b");
    let both = set(&["a", "b"]);
    let mut seen_by_a = a.members();
    wait_for("a", &mut seen_by_a, &both, Duration::from_secs(10)).await;
    b.leave().await;
    wait_for("a", &mut seen_by_a, &set(&["a"]), beat * 2).await;
    // b starts again, same name.
    let b = Membership::join(&b_broker, &exchange, "b".into(), beat)
        .await
        .expect("join b again");
    // Its first heartbeat went out before `join` returned; a few beats of slack.
    wait_for("a", &mut seen_by_a, &both, beat * 5).await;
    wait_for("b", &mut b.members(), &both, beat * 5).await;
    b.leave().await;
    a.leave().await;
    let _ = b_broker.close().await;
    let _ = a_broker.close().await;
}

/// A member whose connection closes without leaving is gone from the others' sets after a few
/// beats; the others keep each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_dies_without_leaving_expires() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    support::init_tracing();
    let cleanup = support::Cleanup::new();
    let p = support::unique("members-expire");
    let exchange = format!("{p}members");
    cleanup.members(&exchange);
    let beat = Duration::from_millis(500);
    let mut members = Vec::new();
    for m in ["a", "b", "c"] {
        let broker = connect(support::addr(), &format!("{p}{m}")).await;
        let membership = Membership::join(&broker, &exchange, m.to_owned(), beat)
            .await
            .expect("join");
        members.push((m, broker, membership));
    }
    let all = set(&["a", "b", "c"]);
    for (m, _, membership) in &members {
        wait_for(m, &mut membership.members(), &all, Duration::from_secs(10)).await;
    }
    // c's connection goes away without a word (as with kill -9, the broker closes it).
    let (_, c_broker, c) = members.pop().expect("c");
    c_broker.close().await.expect("close c");
    let rest = set(&["a", "b"]);
    for (m, _, membership) in &members {
        wait_for(m, &mut membership.members(), &rest, Duration::from_secs(10)).await;
    }
    // And the survivors stay together (they keep beating).
    tokio::time::sleep(beat * 8).await;
    for (m, _, membership) in &members {
        assert_eq!(*membership.members().borrow(), rest, "{m}");
    }
    drop(c);
    for (_, broker, membership) in members {
        membership.leave().await;
        let _ = broker.close().await;
    }
}

/// A member whose connection is cut (a network failure) comes back by itself: it hears a
/// member that joined after the cut, and the others hear it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_comes_back_after_its_connection_is_cut() {
    let Some(_conn) = support::broker().await else {
        return;
    };
    support::init_tracing();
    let cleanup = support::Cleanup::new();
    let p = support::unique("members-cut");
    let exchange = format!("{p}members");
    cleanup.members(&exchange);
    let beat = Duration::from_millis(500);
    let proxy = support::Proxy::start(&support::addr()).await;
    let a_broker = connect(support::addr(), &format!("{p}a")).await;
    let a = Membership::join(&a_broker, &exchange, "a".into(), beat)
        .await
        .expect("join a");
    let b_broker = connect(proxy.addr(&support::addr()), &format!("{p}b")).await;
    let b = Membership::join(&b_broker, &exchange, "b".into(), beat)
        .await
        .expect("join b");
    let ab = set(&["a", "b"]);
    wait_for("a", &mut a.members(), &ab, Duration::from_secs(10)).await;
    wait_for("b", &mut b.members(), &ab, Duration::from_secs(10)).await;

    assert!(proxy.cut() > 0, "b's connection went through the proxy");
    // While b is away, d joins: b can only hear it once its queue is consumed again.
    let d_broker = connect(support::addr(), &format!("{p}d")).await;
    let d = Membership::join(&d_broker, &exchange, "d".into(), beat)
        .await
        .expect("join d");
    let abd = set(&["a", "b", "d"]);
    wait_for("b", &mut b.members(), &abd, Duration::from_secs(30)).await;
    wait_for("a", &mut a.members(), &abd, Duration::from_secs(30)).await;
    wait_for("d", &mut d.members(), &abd, Duration::from_secs(30)).await;
    // And b stays (it beats again: it would have expired after 3 beats otherwise).
    tokio::time::sleep(beat * 8).await;
    assert_eq!(*a.members().borrow(), abd);
    assert_eq!(*d.members().borrow(), abd);

    for (m, broker) in [(a, a_broker), (b, b_broker), (d, d_broker)] {
        m.leave().await;
        let _ = broker.close().await;
    }
}

/// A partitioned consumer that stops gracefully has told its group it left by the time its
/// `run` returns, so a service may close its connection right after. Told only in the
/// background, the leave raced that close and was mostly lost: the others then counted the
/// instance in until it expired (3 beats), and each of them handed the instance's partitions,
/// whenever the broker made it their active consumer, over to it in vain (2 500 hand-overs
/// in a few seconds in `amqp_group_balance`, two runs in three).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_consumer_has_left_its_group_when_its_run_returns() {
    #[derive(serde::Deserialize)]
    struct Payment {
        #[serde(rename = "clientId")]
        client_id: u64,
    }
    #[derive(serde::Deserialize)]
    struct Beat {
        member: String,
        leaving: bool,
    }
    let Some(conn) = support::broker().await else {
        return;
    };
    support::init_tracing();
    let cleanup = support::Cleanup::new();
    let name = support::unique("members-run-leave");
    let partitions = Partitions::new(&name, 2);
    let route = Route::partitioned(partitions.clone());
    let exchange = partitions.members_exchange();
    let heard = format!("{name}heard");
    cleanup
        .route(&route)
        .exchange(exchange.as_str())
        .queue(heard.as_str());
    // Every heartbeat on the group's exchange, read beside the group (not a member of it).
    let channel = conn.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the members exchange");
    channel
        .queue_declare(
            heard.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .queue_bind(
            heard.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut beats = channel
        .basic_consume(
            heard.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut next_beat = async || -> Beat {
        let d = tokio::time::timeout(Duration::from_secs(10), beats.next())
            .await
            .expect("a heartbeat within 10 s (after the stop: the instance never said it left)")
            .expect("the heartbeats' consumer ended")
            .expect("a heartbeat");
        d.ack(BasicAckOptions::default()).await.expect("ack");
        serde_json::from_slice(&d.data).expect("a heartbeat's body")
    };

    let broker = connect(support::addr(), &format!("{name}instance")).await;
    let transport = broker.transport(route.clone()).await.expect("transport");
    let consumer = DependentConsumer::builder(
        |p: &Payment| p.client_id,
        |_: Payment| async { Ok::<(), prereq::HandlerError>(()) },
    )
    .keys(MemoryKeys::new())
    .build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(transport, async {
        let _ = stopped.await;
    }));
    let member = next_beat().await;
    assert!(!member.leaving, "a first heartbeat");

    let _ = stop.send(());
    run.await.expect("run").expect("a graceful stop");
    // Right after, as a service's main does.
    let _ = broker.close().await;
    loop {
        let beat = next_beat().await;
        if beat.member == member.member && beat.leaving {
            break;
        }
    }
    let _ = channel.close(200, "done".into()).await;
}
