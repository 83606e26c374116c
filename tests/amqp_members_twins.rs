//! Two members of one group under one name (a misconfiguration: names must be unique in a
//! group) are told about it: a warning naming the member, from a member that hears a heartbeat
//! of another incarnation of its own name. A test binary of its own: it reads the log lines,
//! which needs its subscriber installed before any other test's.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use prereq::amqp::Membership;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_under_one_name_are_warned_about() {
    let logs = support::captured_logs();
    let Some(_conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("members-twins");
    let exchange = format!("{p}members");
    // Unique to this run, so that the warning found is this test's.
    let name = format!("twin-{}", std::process::id());
    cleanup.members(&exchange);
    // Twins beating at one rate, in step: when they shared one member queue (named after the
    // member alone) the broker handed its heartbeats to them in turn, and each could be handed
    // only its own (seen in CI: no warning in 10 s). Each join has a queue of its own now, and
    // each twin hears the other.
    let beats = [Duration::from_millis(100), Duration::from_millis(100)];
    let mut twins = Vec::new();
    for (i, beat) in beats.into_iter().enumerate() {
        let broker = support::connect(format!("{p}{i}")).await;
        let membership = Membership::join(&broker, &exchange, name.clone(), beat)
            .await
            .expect("join");
        twins.push((broker, membership));
    }
    let needle = format!("member={name}");
    // Each twin warns once (at the second heartbeat of the other it hears): two warnings.
    support::eventually("both twins warned", Duration::from_secs(10), || {
        logs.lines_with(&needle)
            .iter()
            .filter(|l| l.contains("beats under this member's name"))
            .count()
            >= 2
    })
    .await;
    // Each on a queue of its own (when they shared one, the broker's turns decided who heard
    // whom).
    if let Some(queues) = support::queues_under(&format!("{exchange}.{name}")) {
        assert_eq!(queues.len(), 2, "one member queue per twin: {queues:?}");
    }
    let warned = logs.lines_with(&needle);
    assert!(
        warned.iter().all(|l| l.contains("WARN")),
        "a warning: {warned:?}"
    );
    for (broker, membership) in twins {
        membership.leave().await;
        let _ = broker.close().await;
    }
}
