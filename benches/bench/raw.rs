//! The bare-lapin baselines: throughput (publish with confirms; consume with each ack awaited,
//! or with acks pipelined) and publish → delivery latency on the race's schedule.

use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection, ConnectionProperties, Consumer};
use tokio::time::Instant;

use crate::cpu::{Cpu, PerMsg};
use crate::data::{BODY_BYTES, Client, Payment, RaceData, payment_body};
use crate::env::{Env, default_prefetch};
use crate::publish::{PUBLISH_WINDOW, confirm_channel, publish_all, register_on_schedule};
use crate::sizes::Sizes;
use crate::{Res, STUCK, timeout};

/// Bare lapin's rates, messages per second.
pub struct Raw {
    pub publish_per_s: f64,
    pub consume_per_s: f64,
    pub consume_pipelined_per_s: f64,
    /// CPU per message of the pipelined consume.
    pub cpu: PerMsg,
}

/// A durable classic queue of its own for a bare-lapin scenario (deleted with the rest), and a
/// confirm channel to publish to it.
pub async fn scratch_queue(env: &Env, tag: &str) -> Res<(String, Channel)> {
    let queue = format!("{}queue", env.prefix(tag));
    env.cleanup.queue(queue.clone());
    let ch = confirm_channel(env.conn()).await?;
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok((queue, ch))
}

/// N payments published with confirms, consumed with each ack awaited, published again,
/// consumed with acks pipelined.
pub async fn raw(env: &Env, s: &Sizes) -> Res<Raw> {
    let (queue, ch) = scratch_queue(env, "raw").await?;
    let bodies: Vec<Vec<u8>> = (0..s.n as u64)
        .map(|i| payment_body(i, i % s.k, BODY_BYTES))
        .collect();
    let t = Instant::now();
    publish_all(&ch, &queue, &bodies, |_| {}).await?;
    let publish = t.elapsed();
    let consume = raw_consume(env.conn(), &queue, s.n, false).await?;
    // The same messages again, for the pipelined variant.
    publish_all(&ch, &queue, &bodies, |_| {}).await?;
    let cpu = Cpu::now(env.broker_pid);
    let pipelined = raw_consume(env.conn(), &queue, s.n, true).await?;
    let cpu = cpu.per_msg(s.n);
    let _ = ch.close(200, "done".into()).await;
    Ok(Raw {
        publish_per_s: s.n as f64 / publish.as_secs_f64(),
        consume_per_s: s.n as f64 / consume.as_secs_f64(),
        consume_pipelined_per_s: s.n as f64 / pipelined.as_secs_f64(),
        cpu,
    })
}

/// Acknowledgements sent without waiting for one another, awaited in windows of
/// [`PUBLISH_WINDOW`].
#[derive(Default)]
pub struct Acks(FuturesUnordered<BoxFuture<'static, lapin::Result<bool>>>);

impl Acks {
    /// Send `acker`'s acknowledgement; wait for all in flight once a window is full.
    pub async fn push(&mut self, acker: Acker) -> Res<()> {
        self.0.push(Box::pin(async move {
            acker.ack(BasicAckOptions::default()).await
        }));
        if self.0.len() >= PUBLISH_WINDOW {
            self.drain().await?;
        }
        Ok(())
    }

    /// Wait for every acknowledgement in flight.
    pub async fn drain(&mut self) -> Res<()> {
        while let Some(r) = self.0.next().await {
            r?;
        }
        Ok(())
    }
}

/// Consume `n` messages with a manual ack each, from the first delivery to the last ack: each
/// ack awaited before the next delivery, or (`pipelined`) acks sent without waiting for one
/// another, awaited in windows of [`PUBLISH_WINDOW`].
async fn raw_consume(conn: &Connection, queue: &str, n: usize, pipelined: bool) -> Res<Duration> {
    // The same prefetch as prereq's consumer gets by default.
    let cch = conn.create_channel().await?;
    cch.basic_qos(default_prefetch(), BasicQosOptions::default())
        .await?;
    let mut consumer = consume(&cch, queue).await?;
    let mut first = None;
    let consumed = timeout("raw consume", STUCK, async {
        let mut acks = Acks::default();
        for _ in 0..n {
            let d = consumer.next().await.ok_or("raw consumer closed")??;
            first.get_or_insert_with(Instant::now);
            if pipelined {
                acks.push(d.acker).await?;
            } else {
                d.acker.ack(BasicAckOptions::default()).await?;
            }
        }
        acks.drain().await
    })
    .await?;
    consumed?;
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = cch.close(200, "done".into()).await;
    Ok(elapsed)
}

/// Consume `queue` on `ch` with manual acks (no consumer arguments).
pub async fn consume(ch: &Channel, queue: &str) -> Res<Consumer> {
    Ok(ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// A registrations consumer on a channel of its own of `conn`, with prereq's registrations
/// prefetch.
pub async fn consume_registrations(conn: &Connection, queue: &str) -> Res<Consumer> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(
        prereq::amqp::DEFAULT_REGISTRATION_PREFETCH,
        BasicQosOptions::default(),
    )
    .await?;
    consume(&ch, queue).await
}

/// What [`raw_latency`] receives meanwhile.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Meanwhile {
    /// Nothing: the floor of the key path.
    Nothing,
    /// The release's broker traffic: the race's payments, delivered beforehand to a second
    /// channel of the same connection and held there; when a client's registration arrives, its
    /// payments are acknowledged, each in a task of its own as prereq's handler tasks do, and so
    /// is the registration. What the key path would cost if prereq's own work were free.
    Releasing,
}

/// What [`raw_latency`] measured.
pub struct Latencies {
    /// Publish → delivery per registration, in ms, sorted.
    pub ms: Vec<f64>,
    /// CPU from the first registration's publish to the last settlement, per payment of the
    /// race (what releasing them cost, with [`Meanwhile::Releasing`]).
    pub cpu: PerMsg,
}

/// Registrations published on the race's schedule into a queue that bare lapin consumes (on its
/// own connection, as prereq's transport does): latency from publish to delivery.
pub async fn raw_latency(env: &Env, data: &RaceData, meanwhile: Meanwhile) -> Res<Latencies> {
    let releasing = meanwhile == Meanwhile::Releasing;
    let (queue, ch) = scratch_queue(env, if releasing { "rawlatl" } else { "rawlat" }).await?;
    let k = data.reg_at.len();
    let consumer_conn =
        Connection::connect(env.broker.addr().expose(), ConnectionProperties::default()).await?;
    let mut payments = if releasing {
        Some(hold_payments(env, &consumer_conn, data).await?)
    } else {
        None
    };
    let mut held = payments
        .as_mut()
        .map(|p| std::mem::take(&mut p.ackers))
        .unwrap_or_default();
    let mut consumer = consume_registrations(&consumer_conn, &queue).await?;
    let receiver = tokio::spawn(async move {
        let mut got = vec![None; k];
        let mut acks = tokio::task::JoinSet::new();
        for _ in 0..k {
            let d = consumer.next().await.ok_or("raw consumer closed")??;
            let now = Instant::now();
            let c: Client = serde_json::from_slice(&d.data)?;
            if let Some(slot) = got.get_mut(c.id as usize) {
                *slot = Some(now);
            }
            if !releasing {
                d.acker.ack(BasicAckOptions::default()).await?;
                continue;
            }
            let payments = held.get_mut(c.id as usize).map(std::mem::take);
            for acker in payments.unwrap_or_default().into_iter().chain([d.acker]) {
                acks.spawn(async move { acker.ack(BasicAckOptions::default()).await });
            }
            while let Some(done) = acks.try_join_next() {
                done??;
            }
        }
        while let Some(done) = acks.join_next().await {
            done??;
        }
        Res::Ok(got)
    });
    let t0 = Instant::now() + Duration::from_millis(50);
    let cpu = Cpu::now(env.broker_pid);
    let sent_at = register_on_schedule(&ch, "", &queue, data, t0).await?;
    let got = timeout("raw latency", STUCK, receiver).await???;
    let cpu = cpu.per_msg(data.client_of.len());
    if let Some(payments) = payments {
        payments.all_acknowledged(&consumer_conn).await?;
    }
    let _ = consumer_conn.close(200, "done".into()).await;
    let _ = ch.close(200, "done".into()).await;
    let mut v: Vec<f64> = got
        .iter()
        .zip(&sent_at)
        .filter_map(|(g, s)| g.map(|g| g.saturating_duration_since(*s).as_secs_f64() * 1e3))
        .collect();
    v.sort_by(f64::total_cmp);
    Ok(Latencies { ms: v, cpu })
}

/// The race's payments held by bare lapin: their acknowledgers by client, and what must stay open
/// until they are used (dropping the channel or the consumer closes the channel, the broker takes
/// the payments back, and their acknowledgements then go nowhere, without an error).
struct HeldPayments {
    ackers: Vec<Vec<Acker>>,
    queue: String,
    channel: Channel,
    consumer: Consumer,
}

impl HeldPayments {
    /// Close the payments' channel and check that the broker took none back: each was
    /// acknowledged.
    async fn all_acknowledged(self, conn: &Connection) -> Res<()> {
        let _ = self.channel.close(200, "done".into()).await;
        drop(self.consumer);
        let ch = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let left = ch
            .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
            .await?
            .message_count();
        let _ = ch.close(200, "done".into()).await;
        match left {
            0 => Ok(()),
            left => Err(format!("raw latency: {left} held payments were not acknowledged").into()),
        }
    }
}

/// The race's payments published to a queue of their own and delivered to a channel of `conn`
/// (prereq's default prefetch), held unacknowledged.
async fn hold_payments(env: &Env, conn: &Connection, data: &RaceData) -> Res<HeldPayments> {
    let (queue, ch) = scratch_queue(env, "rawlatp").await?;
    let bodies: Vec<Vec<u8>> = data
        .client_of
        .iter()
        .enumerate()
        .map(|(i, c)| payment_body(i as u64, *c, BODY_BYTES))
        .collect();
    publish_all(&ch, &queue, &bodies, |_| {}).await?;
    let _ = ch.close(200, "done".into()).await;
    let pch = conn.create_channel().await?;
    pch.basic_qos(default_prefetch(), BasicQosOptions::default())
        .await?;
    let mut consumer = consume(&pch, &queue).await?;
    let mut held: Vec<Vec<Acker>> = vec![Vec::new(); data.reg_at.len()];
    timeout("raw latency: taking in payments", STUCK, async {
        for _ in 0..bodies.len() {
            let d = consumer.next().await.ok_or("raw consumer closed")??;
            let p: Payment = serde_json::from_slice(&d.data)?;
            if let Some(slot) = held.get_mut(p.client as usize) {
                slot.push(d.acker);
            }
        }
        Res::Ok(())
    })
    .await??;
    Ok(HeldPayments {
        ackers: held,
        queue,
        channel: pch,
        consumer,
    })
}
