//! Bare lapin beside prereq in the race: the same registrations, routed by a fanout exchange to
//! prereq's registrations queue and to a queue of its own, which bare lapin consumes on a
//! connection of its own in the same process (as prereq's transport has its own). Its publish →
//! delivery is the broker's own latency for the same messages, at the same instants, under the
//! same load: a baseline measured with the figure it is compared to, not a minute before it (on
//! this machine a baseline measured alone swings from under 1 ms to over 4 ms at p99 from one run
//! to the next, the idle process included).

use futures::StreamExt;
use lapin::options::{BasicAckOptions, ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::data::Client;
use crate::env::Env;
use crate::raw::{consume_registrations, scratch_queue};
use crate::{Res, STUCK, timeout};

/// The shadow consumer, running.
pub struct Shadow {
    /// Where the registrations are published: prereq's registrations queue and the shadow's
    /// queue are bound to it.
    exchange: String,
    /// The shadow's own connection.
    conn: Connection,
    /// When each client's registration reached bare lapin, by client.
    receiver: JoinHandle<Res<Vec<Option<Instant>>>>,
}

impl Shadow {
    /// A fanout exchange of `scenario`'s with `clients_queue` (declared already) and a queue
    /// of the shadow's bound to it, and bare lapin consuming that queue, expecting `k`
    /// registrations. Everything is registered for cleanup.
    pub async fn start(env: &Env, scenario: &str, clients_queue: &str, k: usize) -> Res<Self> {
        let exchange = format!("{}fanout", env.prefix(scenario));
        env.cleanup.exchange(exchange.clone());
        let (queue, ch) = scratch_queue(env, &format!("{scenario}.shadow")).await?;
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        for q in [clients_queue, queue.as_str()] {
            ch.queue_bind(
                q.into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        let _ = ch.close(200, "declared".into()).await;
        let conn = Connection::connect(env.broker.addr().expose(), ConnectionProperties::default())
            .await?;
        let mut consumer = consume_registrations(&conn, &queue).await?;
        let receiver = tokio::spawn(async move {
            let mut got = vec![None; k];
            for _ in 0..k {
                let d = consumer.next().await.ok_or("shadow consumer closed")??;
                let now = Instant::now();
                let c: Client = serde_json::from_slice(&d.data)?;
                if let Some(slot) = got.get_mut(c.id as usize) {
                    *slot = Some(now);
                }
                d.acker.ack(BasicAckOptions::default()).await?;
            }
            Res::Ok(got)
        });
        Ok(Self {
            exchange,
            conn,
            receiver,
        })
    }

    /// The exchange to publish the registrations to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// When each client's registration reached bare lapin (once every one did).
    pub async fn finish(self) -> Res<Vec<Option<Instant>>> {
        let got = timeout("shadow consumer", STUCK, self.receiver).await???;
        let _ = self.conn.close(200, "done".into()).await;
        Ok(got)
    }
}
