//! [`Membership`]: a group of instances, from heartbeats on the group's members exchange.
//!
//! Every member publishes a small heartbeat (`{"member": name, "leaving": false, "beat_ms": b,
//! "incarnation": i}`)
//! to the group's fanout exchange every `beat`, and hears everyone's through a queue of its own
//! bound to it. The live set is this member and every member heard from within the last
//! [`EXPIRY_BEATS`] of its beats; a member that leaves says so (`"leaving": true`) and is gone
//! from the others' sets at once.
//!
//! Timing, for a beat `b` (the group uses 1 s):
//! * a join is seen by the others with the newcomer's first heartbeat: at once;
//! * a leave ([`Membership::leave`], or dropping the membership) is seen at once, and so is a
//!   join again under the same name (each join is an incarnation of its own: a late heartbeat
//!   of the one that left says nothing, the first of the new one is heard);
//! * a member that crashes (`kill -9`, a lost network) is gone after 3 of its beats without a
//!   heartbeat, plus at most one of the hearer's (expiry is checked once a beat). Each member
//!   is expired by the beat its heartbeats carry, so members with different beats (a change of
//!   beat rolled out one instance at a time) keep each other; a heartbeat without one (an older
//!   version) is expired by the hearer's own beat;
//! * so a group rebalances within a few beats of a change, plus the partitions' hand-over.
//!
//! While this member's connection is down it keeps its last set (it cannot hear anybody, and
//! expiring everyone would make it claim every partition); once reconnected it declares its
//! queue again, consumes again, and gives every known member 3 fresh beats to be heard.
//!
//! The member's queue is named after the exchange, the member and this join's incarnation
//! (`<exchange>.<member>.<incarnation>`): two members under one name (a misconfiguration) each
//! hear every heartbeat, the other's too, and are told (a queue named after the member alone
//! was shared by the two, the broker handed its heartbeats to them in turn, and twins beating
//! in step could each be handed only their own). It is
//! auto-delete and expires when unused: not exclusive and not server-named, because lapin's
//! connection recovery declares every queue again by name, and a server-named (`amq.gen-…`)
//! name may not be declared by a client, nor an exclusive queue still held by a connection the
//! broker has not noticed dead yet; either would stop the recovery of the whole connection.
//! Heartbeats expire in the queue after 3 beats: a late one says nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer, ExchangeKind};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::broker::{Broker, answered};
use super::declare::short;
use super::error::AmqpError;

/// A member not heard from for this many beats is gone.
pub const EXPIRY_BEATS: u32 = 3;

/// How long a leave may take to be sent.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The heartbeat on the wire.
#[derive(Serialize, Deserialize)]
struct Heartbeat {
    member: String,
    #[serde(default)]
    leaving: bool,
    /// The sender's beat, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    beat_ms: Option<u64>,
    /// Which join of the member this is (unique to each [`Membership::join`]): a member that
    /// left and joins again under its name is a new incarnation, heard at once, where a late
    /// heartbeat of the one that left says nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incarnation: Option<String>,
}

/// The shortest and the longest beat a heartbeat may claim (a hostile or broken one is
/// clamped: a member never stays for good on one heartbeat).
const BEAT_CLAIMED: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(600));

/// This instance's view of a group of instances: who is live, from heartbeats on the group's
/// members exchange (see the timing above). A partitioned transport joins its group by itself
/// ([`super::Route::partitioned`]); a service may join a group of its own, e.g. to share out
/// work of its own.
///
/// Kept by a task of its own until left or dropped (dropping it leaves too, without waiting).
///
/// ```no_run
/// use std::time::Duration;
/// use prereq::amqp::{Broker, BrokerOptions, Membership};
///
/// # async fn f() -> Result<(), prereq::amqp::AmqpError> {
/// let broker = Broker::connect(BrokerOptions::from_env()).await?;
/// let me = Membership::join(&broker, "reports.members", "host-a".into(), Duration::from_secs(1)).await?;
/// let mut members = me.members();
/// while members.changed().await.is_ok() {
///     println!("live: {:?}", *members.borrow_and_update());
/// }
/// me.leave().await;
/// # Ok(()) }
/// ```
pub struct Membership {
    members: Arc<watch::Sender<BTreeSet<String>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The task says goodbye on its own.
            let _ = stop.send(());
        }
    }
}

/// What the task needs to know about its group.
struct Group {
    broker: Broker,
    exchange: String,
    queue: String,
    member: String,
    beat: Duration,
    /// This join's incarnation (see [`Heartbeat::incarnation`]).
    incarnation: String,
}

impl Membership {
    /// Join the group whose members exchange is `name` (a fanout exchange, declared if missing)
    /// as `member` (a name unique in the group), beating every `beat` (at least 10 ms): declares
    /// the exchange and this member's queue, consumes it and sends the first heartbeat before it
    /// returns. Fails if the broker refuses any of it. A member that left may join again under
    /// the same name (a restarted service): the others hear it at once.
    pub async fn join(
        broker: &Broker,
        name: &str,
        member: String,
        beat: Duration,
    ) -> Result<Self, AmqpError> {
        let beat = beat.max(Duration::from_millis(10));
        let incarnation = super::unique_suffix();
        let group = Group {
            broker: broker.clone(),
            exchange: name.to_owned(),
            queue: queue_name(name, &member, &incarnation),
            member: member.clone(),
            beat,
            incarnation,
        };
        let session = group.open().await?;
        let members = Arc::new(watch::channel(BTreeSet::from([member])).0);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep(group, session, Arc::clone(&members), stopped));
        Ok(Self {
            members,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The live members (this one included), changing only when the set changes.
    pub fn members(&self) -> watch::Receiver<BTreeSet<String>> {
        self.members.subscribe()
    }

    /// Leave the group: the others drop this member at once.
    pub async fn leave(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(LEAVE_TIMEOUT, task).await;
        }
    }
}

/// The member's queue: `<exchange>.<member>.<incarnation>`, or hashes of the exchange and the
/// member then the incarnation when that is too long for AMQP.
fn queue_name(exchange: &str, member: &str, incarnation: &str) -> String {
    let name = format!("{exchange}.{member}.{incarnation}");
    if name.len() <= 255 {
        return name;
    }
    let fnv = |s: &str| {
        s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let name = format!(
        "prereq.members.{:016x}.{:016x}.{incarnation}",
        fnv(exchange),
        fnv(member)
    );
    if name.len() <= 255 {
        return name;
    }
    format!(
        "prereq.members.{:016x}.{:016x}.{:016x}",
        fnv(exchange),
        fnv(member),
        fnv(incarnation)
    )
}

/// A channel consuming this member's queue.
struct Session {
    channel: Channel,
    consumer: Consumer,
}

impl Group {
    /// Declare the exchange and the queue, bind, consume, and beat once.
    async fn open(&self) -> Result<Session, AmqpError> {
        let addr = self.broker.addr();
        let channel = self.broker.channel("open the group's channel").await?;
        channel
            .exchange_declare(
                short(&self.exchange)?,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| addr.broker_error(format!("declare exchange {}", self.exchange), &e))?;
        let mut arguments = FieldTable::default();
        // Unused (never consumed, e.g. a crash right after declaring): gone after a while.
        let expires = (self.beat * 20).max(Duration::from_secs(60));
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
        );
        channel
            .queue_declare(
                short(&self.queue)?,
                QueueDeclareOptions {
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(|e| addr.broker_error(format!("declare queue {}", self.queue), &e))?;
        channel
            .queue_bind(
                short(&self.queue)?,
                short(&self.exchange)?,
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| addr.broker_error(format!("bind queue {}", self.queue), &e))?;
        let consumer = channel
            .basic_consume(
                short(&self.queue)?,
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| addr.broker_error(format!("consume {}", self.queue), &e))?;
        let session = Session { channel, consumer };
        self.beat_on(&session.channel, false).await?;
        Ok(session)
    }

    /// Publish a heartbeat (or a leave) on `channel`.
    async fn beat_on(&self, channel: &Channel, leaving: bool) -> Result<(), AmqpError> {
        let body = serde_json::to_vec(&Heartbeat {
            member: self.member.clone(),
            leaving,
            beat_ms: Some(u64::try_from(self.beat.as_millis()).unwrap_or(u64::MAX)),
            incarnation: Some(self.incarnation.clone()),
        })
        .map_err(|e| AmqpError::Config(format!("encode a heartbeat: {e}")))?;
        let ttl = (self.beat * EXPIRY_BEATS).as_millis().to_string();
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_expiration(ttl.as_str().into());
        let sent = tokio::time::timeout(
            self.beat.max(Duration::from_secs(1)),
            channel.basic_publish(
                short(&self.exchange)?,
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            ),
        )
        .await;
        match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self
                .broker
                .addr()
                .broker_error(format!("publish to {}", self.exchange), &e)),
            Err(_) => Err(AmqpError::Broker {
                operation: format!("publish to {}", self.exchange),
                message: "timed out".into(),
            }),
        }
    }

    /// Is the connection closed for good (on purpose, or given up on)?
    fn closed(&self) -> bool {
        let status = self.broker.connection().status();
        status.closing() || status.closed() || self.broker.lost().borrow().is_some()
    }
}

/// A member heard from.
struct Heard {
    /// When last.
    at: Instant,
    /// How long it may stay silent: 3 of the beats it claims.
    expiry: Duration,
    /// Which join of it (`None` from a version that sends none).
    incarnation: Option<String>,
}

/// Two incarnations, both known and not the same: two joins under one name.
fn other_join(a: Option<&String>, b: Option<&String>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a != b)
}

/// Who was heard from, and when.
struct Live {
    /// This member's name.
    me: String,
    /// This member's incarnation, once known (see [`Heartbeat::incarnation`]).
    mine: Option<String>,
    /// Heartbeats heard from another incarnation of this member's name (a twin: names must be
    /// unique in a group); warned about at the second.
    twins: u32,
    /// Each member heard, by name.
    heard: HashMap<String, Heard>,
    /// Members that left, when, and the incarnation that left: a heartbeat of it still on its
    /// way says nothing (one of a new incarnation is a join).
    left: HashMap<String, (Instant, Option<String>)>,
    expiry: Duration,
}

impl Live {
    fn new(me: String, beat: Duration) -> Self {
        Self {
            me,
            heard: HashMap::new(),
            left: HashMap::new(),
            expiry: beat * EXPIRY_BEATS,
            mine: None,
            twins: 0,
        }
    }

    /// A heartbeat arrived.
    fn hear(&mut self, body: &[u8], now: Instant) {
        let beat: Heartbeat = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => {
                debug!(target: "prereq", error = %e, bytes = body.len(),
                    "ignoring a malformed group heartbeat");
                return;
            }
        };
        if beat.member == self.me {
            let twin = !beat.leaving && other_join(self.mine.as_ref(), beat.incarnation.as_ref());
            if twin {
                self.twins = self.twins.saturating_add(1);
                // At the second: one could be a late heartbeat of this name's run before.
                if self.twins == 2 {
                    warn!(target: "prereq", member = %self.me,
                        "another member of the group beats under this member's name: names \
                         must be unique in a group (the others count the two as one, and the \
                         two share one member's partitions)");
                }
            }
            return;
        }
        if beat.member.is_empty() {
            return;
        }
        if beat.leaving {
            let heard = self.heard.get(&beat.member);
            if other_join(
                heard.and_then(|h| h.incarnation.as_ref()),
                beat.incarnation.as_ref(),
            ) {
                // A late leave of an earlier incarnation: the one heard now stays.
                return;
            }
            self.heard.remove(&beat.member);
            self.left.insert(beat.member, (now, beat.incarnation));
            return;
        }
        if let Some((_, gone)) = self.left.get(&beat.member) {
            if !other_join(gone.as_ref(), beat.incarnation.as_ref()) {
                return;
            }
            self.left.remove(&beat.member);
        }
        let expiry = beat.beat_ms.map_or(self.expiry, |ms| {
            Duration::from_millis(ms).clamp(BEAT_CLAIMED.0, BEAT_CLAIMED.1) * EXPIRY_BEATS
        });
        let heard = Heard {
            at: now,
            expiry,
            incarnation: beat.incarnation,
        };
        self.heard.insert(beat.member, heard);
    }

    /// Forget members silent for too long.
    fn expire(&mut self, now: Instant) {
        self.heard
            .retain(|_, h| now.saturating_duration_since(h.at) < h.expiry);
        let expiry = self.expiry;
        self.left
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < expiry * 10);
    }

    /// Back after a disconnection: everyone known gets a full expiry to be heard again.
    fn refresh(&mut self, now: Instant) {
        for h in self.heard.values_mut() {
            h.at = now;
        }
    }

    fn set(&self) -> BTreeSet<String> {
        self.heard
            .keys()
            .cloned()
            .chain([self.me.clone()])
            .collect()
    }
}

/// Publish the live set when it changed.
fn publish(tx: &watch::Sender<BTreeSet<String>>, live: &Live) {
    let now = live.set();
    tx.send_if_modified(|set| {
        if *set == now {
            return false;
        }
        info!(target: "prereq", members = now.len(), "group members changed");
        *set = now;
        true
    });
}

/// Beat, listen and keep the live set until stopped; then leave.
async fn keep(
    group: Group,
    session: Session,
    tx: Arc<watch::Sender<BTreeSet<String>>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut live = Live::new(group.member.clone(), group.beat);
    live.mine = Some(group.incarnation.clone());
    let mut session = Some(session);
    let mut retry = group.beat;
    loop {
        let Some(Session {
            channel,
            mut consumer,
        }) = session.take()
        else {
            // Not consuming: wait (for a stop, or a while), then open again.
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(retry) => {}
            }
            if group.closed() {
                // Closed for good: nothing to hear or say any more; keep the last set.
                let _ = (&mut stop).await;
                return;
            }
            if group.broker.connected() {
                match group.open().await {
                    Ok(s) => {
                        info!(target: "prereq", group = %group.exchange, "group membership back");
                        live.refresh(Instant::now());
                        session = Some(s);
                        retry = group.beat;
                    }
                    Err(e) => {
                        debug!(target: "prereq", group = %group.exchange, error = %e,
                            "cannot rejoin the group yet");
                        retry = (retry * 2).min(group.beat * 4);
                    }
                }
            }
            continue;
        };
        let mut tick = tokio::time::interval_at(Instant::now() + group.beat, group.beat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reopen = loop {
            tokio::select! {
                _ = &mut stop => {
                    // Leave: the others drop this member at once.
                    if let Err(e) = group.beat_on(&channel, true).await {
                        debug!(target: "prereq", error = %e, "could not announce leaving the group");
                    }
                    let _ = tokio::time::timeout(LEAVE_TIMEOUT,
                        channel.close(200, "prereq: left the group".into())).await;
                    return;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        live.hear(&delivery.data, Instant::now());
                        publish(&tx, &live);
                    }
                    Some(Err(e)) => {
                        debug!(target: "prereq", group = %group.exchange,
                            error = %group.broker.addr().scrub(&e.to_string()),
                            "group heartbeats interrupted, waiting for the connection");
                        let recovered = tokio::select! {
                            _ = &mut stop => return,
                            r = channel.wait_for_recovery(e) => r.is_ok(),
                        };
                        if !recovered {
                            break true;
                        }
                        live.refresh(Instant::now());
                    }
                    // Cancelled by the broker (the queue deleted): declare and consume again.
                    None => break true,
                },
                _ = tick.tick() => {
                    if !group.broker.connected() || !channel.status().connected() {
                        // Cannot hear anyone: keep the set as it is.
                        continue;
                    }
                    if let Err(e) = group.beat_on(&channel, false).await {
                        debug!(target: "prereq", error = %e, "could not send a group heartbeat");
                    }
                    live.expire(Instant::now());
                    publish(&tx, &live);
                }
            }
        };
        if reopen {
            warn!(target: "prereq", group = %group.exchange,
                "group heartbeats stopped; joining again");
            let _ = answered(
                "closing a channel",
                channel.close(200, "prereq: reopening".into()),
            )
            .await;
            retry = Duration::from_millis(100).min(group.beat);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heartbeat on the wire.
    fn heartbeat(
        member: &str,
        leaving: bool,
        beat_ms: Option<u64>,
        incarnation: Option<&str>,
    ) -> Vec<u8> {
        serde_json::to_vec(&Heartbeat {
            member: member.into(),
            leaving,
            beat_ms,
            incarnation: incarnation.map(Into::into),
        })
        .unwrap_or_default()
    }

    /// A heartbeat as an older version sends it (no beat, no incarnation).
    fn beat(member: &str, leaving: bool) -> Vec<u8> {
        heartbeat(member, leaving, None, None)
    }

    #[tokio::test(start_paused = true)]
    async fn heard_members_expire_leavers_go_at_once_and_garbage_is_ignored() {
        let b = Duration::from_millis(100);
        let mut live = Live::new("me".into(), b);
        let t0 = Instant::now();
        live.hear(&beat("a", false), t0);
        live.hear(&beat("b", false), t0);
        live.hear(b"not json", t0);
        live.hear(br#"{"leaving":true}"#, t0);
        live.hear(&beat("", false), t0);
        let all: BTreeSet<String> = ["a", "b", "me"].iter().map(|s| (*s).into()).collect();
        assert_eq!(live.set(), all);
        // b leaves: gone at once, and a late heartbeat of b's does not bring it back.
        live.hear(&beat("b", true), t0);
        live.hear(&beat("b", false), t0 + b);
        let without_b: BTreeSet<String> = ["a", "me"].iter().map(|s| (*s).into()).collect();
        assert_eq!(live.set(), without_b);
        // a keeps beating for a while, then stops: gone once 3 beats passed.
        live.hear(&beat("a", false), t0 + b * 2);
        live.expire(t0 + b * 4);
        assert_eq!(live.set(), without_b);
        live.expire(t0 + b * 5);
        assert_eq!(live.set(), BTreeSet::from(["me".to_owned()]));
        // Never expires itself.
        live.hear(&beat("me", true), t0 + b * 6);
        assert_eq!(live.set(), BTreeSet::from(["me".to_owned()]));
    }

    #[tokio::test(start_paused = true)]
    async fn each_member_is_expired_by_the_beat_it_claims() {
        let b = Duration::from_millis(100);
        let mut live = Live::new("me".into(), b);
        let t0 = Instant::now();
        let claiming = |member: &str, ms: u64| heartbeat(member, false, Some(ms), None);
        // A slower member (1 s) stays for 3 of its beats, not 3 of mine.
        live.hear(&claiming("slow", 1_000), t0);
        // One claiming no beat at all, or an absurd one, is clamped.
        live.hear(&claiming("zero", 0), t0);
        live.hear(&claiming("forever", u64::MAX), t0);
        live.expire(t0 + b * 5);
        assert!(live.set().contains("slow"), "{:?}", live.set());
        assert!(!live.set().contains("zero"), "a 0 ms beat counts as 10 ms");
        live.expire(t0 + Duration::from_millis(2_999));
        assert!(live.set().contains("slow"));
        live.expire(t0 + Duration::from_secs(3));
        assert!(!live.set().contains("slow"));
        assert!(live.set().contains("forever"));
        live.expire(t0 + Duration::from_secs(1_800));
        assert!(!live.set().contains("forever"), "at most 10 min a beat");
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_that_left_is_heard_again_only_as_a_new_incarnation() {
        let b = Duration::from_millis(100);
        let mut live = Live::new("me".into(), b);
        let t0 = Instant::now();
        let of = |incarnation: &str, leaving: bool| {
            heartbeat("b", leaving, Some(100), Some(incarnation))
        };
        live.hear(&of("1", false), t0);
        assert!(live.set().contains("b"));
        live.hear(&of("1", true), t0);
        assert!(!live.set().contains("b"), "gone at its leave");
        live.hear(&of("1", false), t0 + b);
        assert!(
            !live.set().contains("b"),
            "a late heartbeat of the leaver says nothing"
        );
        live.hear(&of("2", false), t0 + b * 2);
        assert!(live.set().contains("b"), "a new incarnation is a join");
        live.hear(&of("1", true), t0 + b * 3);
        assert!(
            live.set().contains("b"),
            "a late leave of the old one does not drop it"
        );
        live.hear(&of("2", true), t0 + b * 4);
        assert!(!live.set().contains("b"), "its own leave does");
        // Without incarnations (an older version), a leaver stays ignored for a while.
        live.hear(&beat("c", false), t0 + b * 5);
        live.hear(&beat("c", true), t0 + b * 5);
        live.hear(&beat("c", false), t0 + b * 6);
        assert!(!live.set().contains("c"));
    }

    #[test]
    fn another_incarnation_under_this_member_s_name_is_a_twin() {
        let mut live = Live::new("me".into(), Duration::from_millis(100));
        live.mine = Some("1".into());
        let t0 = Instant::now();
        let of = |incarnation: Option<&str>, leaving: bool| {
            heartbeat("me", leaving, Some(100), incarnation)
        };
        live.hear(&of(Some("1"), false), t0);
        live.hear(&of(None, false), t0);
        live.hear(&of(Some("0"), true), t0);
        assert_eq!(live.twins, 0, "its own, an older version's, a leave");
        live.hear(&of(Some("2"), false), t0);
        live.hear(&of(Some("2"), false), t0);
        assert_eq!(live.twins, 2);
        assert_eq!(live.set(), BTreeSet::from(["me".to_owned()]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnection_gives_everyone_fresh_beats() {
        let b = Duration::from_millis(100);
        let mut live = Live::new("me".into(), b);
        let t0 = Instant::now();
        live.hear(&beat("a", false), t0);
        live.refresh(t0 + b * 10);
        live.expire(t0 + b * 11);
        assert!(live.set().contains("a"));
        live.expire(t0 + b * 13);
        assert!(!live.set().contains("a"));
    }

    #[test]
    fn queue_names_fit_amqp() {
        assert_eq!(queue_name("g.members", "m-1", "17.0"), "g.members.m-1.17.0");
        let long = queue_name(&"x".repeat(200), &"y".repeat(100), "17.0");
        assert!(long.len() <= 255 && long.starts_with("prereq.members."));
        assert!(long.ends_with(".17.0"), "the incarnation kept: {long}");
        assert_ne!(long, queue_name(&"x".repeat(200), &"y".repeat(100), "17.1"));
        let longer = queue_name("g", "m", &"z".repeat(300));
        assert!(longer.len() <= 255 && longer.starts_with("prereq.members."));
        assert_ne!(longer, queue_name("g", "m", &"z".repeat(301)));
    }
}
