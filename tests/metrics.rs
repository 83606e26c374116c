//! The `metrics` feature records every decision through the facade.
#![cfg(feature = "metrics")]

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use prereq::DependentConsumer;
use prereq::memory::MemoryBroker;

#[derive(serde::Deserialize)]
struct Msg {
    key: u32,
}

#[test]
fn decisions_are_counted_and_release_latency_is_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let broker = MemoryBroker::new();
            broker.publish(r#"{"key":1}"#); // held, then released
            broker.publish("not json"); // dead-lettered
            let keys = prereq::MemoryKeys::new();
            let consumer = DependentConsumer::builder(|m: &Msg| m.key, |_m: Msg| async { Ok(()) })
                .registrations(|m: &Msg| m.key)
                .keys(keys.clone())
                .build();
            let producer = async {
                tokio::time::sleep(Duration::from_millis(250)).await;
                keys.insert(1);
            };
            let (report, ()) = tokio::join!(
                consumer.run(
                    broker.transport(),
                    tokio::time::sleep(Duration::from_secs(1))
                ),
                producer
            );
            assert_eq!(report.unwrap().handled, 1);
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let find = |name: &str, label: Option<(&str, &str)>| {
        snapshot
            .iter()
            .find(|(k, _, _, _)| {
                k.key().name() == name
                    && label.is_none_or(|(l, v)| {
                        k.key().labels().any(|x| x.key() == l && x.value() == v)
                    })
            })
            .map(|(_, _, _, v)| v)
    };
    assert_eq!(
        find("prereq_held_total", None),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        find("prereq_released_total", None),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        find("prereq_handled_total", None),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        find(
            "prereq_dead_lettered_total",
            Some(("reason", "undecodable"))
        ),
        Some(&DebugValue::Counter(1))
    );
    match find("prereq_release_latency_seconds", None) {
        Some(DebugValue::Histogram(v)) => assert_eq!(v.len(), 1, "one release: {v:?}"),
        other => panic!("no release latency histogram: {other:?}"),
    }
    match find("prereq_held", None) {
        Some(DebugValue::Gauge(g)) => assert_eq!(g.into_inner(), 0.0),
        other => panic!("no held gauge: {other:?}"),
    }
}
