//! The ingress router's extra hop: keyed payments published straight to a partitioned group's
//! exchange (`Publisher::publish_keyed`) against the same payments published to a plain queue
//! that `route_by_key` re-publishes to their partition, confirmed before it acknowledges. A bare
//! lapin consumer on the partition queues (no ack) stamps each arrival.
//!
//! Latency: one payment at a time, publish (confirmed) → arrival on its partition. Throughput:
//! all payments with up to 64 publishes in flight, until the last arrives.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use prereq::amqp::{Message, Partitions, Publisher, Queue, Route, route_by_key};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::data::{BODY_BYTES, payment_body};
use crate::env::Env;
use crate::figures::percentile;
use crate::{Res, STUCK, timeout};

/// Partitions of the scenario's group.
const PARTITIONS: u32 = 4;
/// Payments timed one at a time, per path.
const LATENCY_N: usize = 400;
/// Publishes in flight in the throughput run.
const IN_FLIGHT: usize = 64;

/// One path's figures.
pub struct Path {
    /// Publish → arrival, sorted, in milliseconds.
    pub latencies_ms: Vec<f64>,
    /// Payments per second, publish of the first to arrival of the last.
    pub per_s: f64,
}

/// Both paths, measured in the same run.
pub struct RouterHop {
    pub direct: Path,
    pub routed: Path,
}

/// The payment's client, the key the router reads from the body.
fn client_of(body: &[u8]) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    v["client"]
        .as_u64()
        .map(|c| c.to_string())
        .ok_or_else(|| "no client".to_owned())
}

/// The payment's id (its sequence here).
fn id_of(body: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["id"].as_u64()
}

pub async fn router_hop(env: &Env, n: usize) -> Res<RouterHop> {
    let prefix = env.prefix("router");
    let partitions = Partitions::new(format!("{prefix}parts"), PARTITIONS);
    let route = Route::partitioned(partitions.clone());
    env.cleanup.route(&route);
    let ingress = format!("{prefix}ingress");
    env.cleanup.queue(ingress.clone());
    env.cleanup
        .queue(format!("{}.dead", partitions.exchange().name()));
    env.broker.declare(&route).await?;

    // Arrivals, by payment id.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<(u64, Instant)>();
    let consumer_ch = env.conn().create_channel().await?;
    consumer_ch
        .basic_qos(1000, BasicQosOptions::default())
        .await?;
    for i in 0..PARTITIONS {
        let queue = partitions.queue_name(i);
        let mut consumer = consumer_ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let tx = arrived_tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                if let Some(id) = id_of(&d.data) {
                    let _ = tx.send((id, Instant::now()));
                }
            }
        });
    }

    let (stop_router, router_stopped) = oneshot::channel::<()>();
    let router = {
        let broker = env.broker.clone();
        let partitions = partitions.clone();
        let from = Queue::classic(ingress.clone());
        tokio::spawn(async move {
            route_by_key(&broker, from, &partitions, client_of, async {
                let _ = router_stopped.await;
            })
            .await
        })
    };

    let publisher = Arc::new(env.broker.publisher().await?);
    let mut next_id = 0u64;
    let direct = path(
        &publisher,
        &mut arrived,
        &mut next_id,
        n,
        |p, body, client| {
            let partitions = partitions.clone();
            async move {
                p.publish_keyed(&partitions, &client.to_string(), &body, &Message::new())
                    .await
            }
        },
    )
    .await?;
    let routed = path(&publisher, &mut arrived, &mut next_id, n, |p, body, _| {
        let ingress = ingress.clone();
        async move { p.publish("", &ingress, &body, &Message::new()).await }
    })
    .await?;

    let _ = stop_router.send(());
    match timeout("router stop", STUCK, router).await? {
        Ok(Ok(report)) if report.dead_lettered == 0 => {}
        Ok(Ok(report)) => return Err(format!("router dead-lettered {report:?}").into()),
        Ok(Err(e)) => return Err(format!("router: {e}").into()),
        Err(e) => return Err(format!("router task: {e}").into()),
    }
    let _ = consumer_ch.close(200, "done".into()).await;
    Ok(RouterHop { direct, routed })
}

/// Time one path: [`LATENCY_N`] payments one at a time, then `n` with [`IN_FLIGHT`] publishes
/// in flight. `publish(publisher, body, client)` publishes one.
async fn path<F, Fut>(
    publisher: &Arc<Publisher>,
    arrived: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    next_id: &mut u64,
    n: usize,
    publish: F,
) -> Res<Path>
where
    F: Fn(Arc<Publisher>, Vec<u8>, u64) -> Fut,
    Fut: Future<Output = Result<(), prereq::amqp::AmqpError>>,
{
    let mut latencies_ms = Vec::with_capacity(LATENCY_N);
    for _ in 0..LATENCY_N {
        let id = *next_id;
        *next_id += 1;
        let client = id % 97;
        let t = Instant::now();
        publish(
            publisher.clone(),
            payment_body(id, client, BODY_BYTES),
            client,
        )
        .await?;
        loop {
            let (got, at) = timeout("arrival", STUCK, arrived.recv())
                .await?
                .ok_or("the partition consumers ended")?;
            if got == id {
                latencies_ms.push(at.duration_since(t).as_secs_f64() * 1000.0);
                break;
            }
        }
    }
    latencies_ms.sort_by(f64::total_cmp);

    let first = *next_id;
    *next_id += n as u64;
    let t = Instant::now();
    let publishing = futures::stream::iter(first..first + n as u64)
        .map(|id| {
            let client = id % 997;
            publish(
                publisher.clone(),
                payment_body(id, client, BODY_BYTES),
                client,
            )
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>();
    let receiving = async {
        let mut seen = 0usize;
        while seen < n {
            let (id, _) = arrived
                .recv()
                .await
                .ok_or("the partition consumers ended")?;
            if (first..first + n as u64).contains(&id) {
                seen += 1;
            }
        }
        Res::Ok(())
    };
    let (published, received) = timeout("throughput", STUCK, async {
        tokio::join!(publishing, receiving)
    })
    .await?;
    published?;
    received?;
    let elapsed = t.elapsed().max(Duration::from_micros(1));
    Ok(Path {
        latencies_ms,
        per_s: n as f64 / elapsed.as_secs_f64(),
    })
}

/// p50 and p99 of a path, in milliseconds.
pub fn p50_p99(p: &Path) -> (f64, f64) {
    (
        percentile(&p.latencies_ms, 50.0),
        percentile(&p.latencies_ms, 99.0),
    )
}
