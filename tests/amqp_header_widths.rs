//! Attempt and limit headers decode in every AMQP integer width (and as integer strings) after
//! a real trip through the broker; negative and garbage values count as absent.
#![cfg(feature = "amqp")]

mod support;

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use prereq::amqp::{DelayMode, Queue, Route};
use prereq::transport::Settle;
use prereq::transport::{Demand, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_integer_width_decodes_after_a_broker_round_trip() {
    let Some(conn) = support::broker().await else {
        return;
    };
    let cleanup = support::Cleanup::new();
    let p = support::unique("widths");
    let work = format!("{p}work");
    let route =
        Route::new(Queue::classic(work.clone())).registrations(Queue::classic(format!("{p}keys")));
    let transport =
        support::transport(&cleanup, route, DelayMode::DelayQueues, Demand::new(64, 1)).await;
    let ch = support::confirm_channel(&conn).await;

    // (label, value for x-retry and x-retry-limit, expected attempt, expected limit)
    let cases: Vec<(&str, AMQPValue, u32, Option<u32>)> = vec![
        ("i8", AMQPValue::ShortShortInt(7), 7, Some(7)),
        ("u8", AMQPValue::ShortShortUInt(200), 200, Some(200)),
        ("i16", AMQPValue::ShortInt(300), 300, Some(300)),
        ("u16", AMQPValue::ShortUInt(60_000), 60_000, Some(60_000)),
        ("i32", AMQPValue::LongInt(10), 10, Some(10)),
        (
            "u32",
            AMQPValue::LongUInt(4_000_000_000),
            4_000_000_000,
            Some(4_000_000_000),
        ),
        ("i64", AMQPValue::LongLongInt(12), 12, Some(12)),
        (
            "i64 huge",
            AMQPValue::LongLongInt(1 << 40),
            u32::MAX,
            Some(u32::MAX),
        ),
        ("timestamp u64", AMQPValue::Timestamp(5), 5, Some(5)),
        ("string", AMQPValue::LongString("42".into()), 42, Some(42)),
        ("double", AMQPValue::Double(3.0), 3, Some(3)),
        ("negative", AMQPValue::LongInt(-4), 0, None),
        ("garbage", AMQPValue::LongString("1500.5".into()), 0, None),
        ("bool", AMQPValue::Boolean(true), 0, None),
    ];
    for (i, (label, value, _, _)) in cases.iter().enumerate() {
        let mut h = FieldTable::default();
        h.insert("x-retry".into(), value.clone());
        h.insert("x-retry-limit".into(), value.clone());
        // A hostile x-delay is never read.
        h.insert("x-delay".into(), AMQPValue::LongInt(-1));
        let props = BasicProperties::default()
            .with_headers(h)
            .with_message_id(format!("{i}:{label}").into());
        support::publish(&ch, "", &work, label.as_bytes(), props).await;
    }
    let mut seen = 0;
    while seen < cases.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), transport.recv())
            .await
            .expect("delivery in time")
            .expect("recv")
            .expect("open");
        let id = d.message_id.clone().expect("message id");
        let index: usize = id.split(':').next().unwrap().parse().unwrap();
        let (label, _, attempt, limit) = &cases[index];
        assert_eq!(d.attempt, *attempt, "attempt from {label}");
        assert_eq!(d.max_attempts, *limit, "limit from {label}");
        transport.settle(d.id, Settle::Ack).await.expect("ack");
        seen += 1;
    }
    assert_eq!(support::ready_count(&ch, &work).await, 0);
    transport.close().await.expect("close");
}
