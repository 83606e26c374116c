//! The load generator: bare lapin publishing with confirms, the same for the raw baselines and
//! for prereq's scenarios.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use tokio::time::Instant;

use crate::Res;
use crate::data::{RaceData, client_body};
use futures::future::join_all;

/// Confirms awaited per batch when publishing.
pub const PUBLISH_WINDOW: usize = 1000;

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// A channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Res<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

fn check_confirms(confirms: Vec<lapin::Result<Confirmation>>) -> Res<()> {
    for c in confirms {
        match c? {
            Confirmation::Ack(None) => {}
            other => return Err(format!("publish not confirmed: {other:?}").into()),
        }
    }
    Ok(())
}

/// Publish persistent messages to a queue (default exchange), awaiting confirms in windows of
/// [`PUBLISH_WINDOW`]. Calls `sent(i)` just before publishing message `i`.
pub async fn publish_all(
    ch: &Channel,
    queue: &str,
    bodies: &[Vec<u8>],
    mut sent: impl FnMut(usize),
) -> Res<()> {
    let mut window: Vec<PublisherConfirm> = Vec::with_capacity(PUBLISH_WINDOW);
    for (i, body) in bodies.iter().enumerate() {
        sent(i);
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                persistent(),
            )
            .await?;
        window.push(confirm);
        if window.len() == PUBLISH_WINDOW {
            check_confirms(join_all(window.drain(..)).await)?;
        }
    }
    check_confirms(join_all(window).await)
}

/// Publish every client's registration to `exchange` (`""`: the default exchange) with routing
/// key `queue` at `t0 + data.reg_at[client]`, in time order, and wait for the confirms; returns
/// when each was sent, by client.
///
/// From a thread and a runtime of its own, as another service would publish: on the runtime
/// of the consumer under test, a publish waits behind the consumer's own tasks, and that wait
/// would count as latency (it did: the key path's p99 read 3.6 ms with the publisher sharing
/// prereq's runtime, 2.2–2.9 ms without, in runs one after the other).
pub async fn register_on_schedule(
    ch: &Channel,
    exchange: &str,
    queue: &str,
    data: &RaceData,
    t0: Instant,
) -> Res<Vec<Instant>> {
    let (ch, exchange, queue) = (ch.clone(), exchange.to_owned(), queue.to_owned());
    let reg_at = data.reg_at.clone();
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?
            .block_on(publish_on_schedule(&ch, &exchange, &queue, &reg_at, t0))
    })
    .await?
}

async fn publish_on_schedule(
    ch: &Channel,
    exchange: &str,
    queue: &str,
    reg_at: &[std::time::Duration],
    t0: Instant,
) -> Res<Vec<Instant>> {
    let mut order: Vec<u64> = (0..reg_at.len() as u64).collect();
    order.sort_by_key(|c| reg_at[*c as usize]);
    let mut sent_at = vec![t0; reg_at.len()];
    let mut confirms = Vec::with_capacity(order.len());
    for c in order {
        tokio::time::sleep_until(t0 + reg_at[c as usize]).await;
        sent_at[c as usize] = Instant::now();
        confirms.push(
            ch.basic_publish(
                exchange.into(),
                queue.into(),
                BasicPublishOptions::default(),
                &client_body(c),
                persistent(),
            )
            .await?,
        );
    }
    check_confirms(join_all(confirms).await)?;
    Ok(sent_at)
}
