//! Settling the deliveries of one consumer channel: acknowledgements and requeues are sent by
//! one task per channel, in batches. What is asked while a batch is written goes in the next
//! one, and the acknowledgements of a batch that cover every delivery still open on the channel
//! up to a tag go as one `basic.ack` with `multiple` set: one frame for the broker to read
//! instead of one per message.
//!
//! `multiple` acknowledges every unsettled delivery of the channel up to its tag, so the task
//! must know them all: every delivery taken from the channel's consumer is [`Acks::opened`]
//! before anything else happens to it, and leaves the open set only when its own settlement is
//! sent. A delivery left open on purpose (held, being copied, left to the channel's close) bounds
//! what one frame may cover, never the other way round.
//!
//! A consumer that moved on to a fresh channel leaves its old one to its [`Acks`], retired: the
//! task closes the channel once every delivery it carried is settled.
//!
//! One [`Acks`] serves one life of a channel: a channel that failed and recovered in place has
//! new delivery tags, and its consumer starts a new [`Acks`] with the first delivery of the new
//! life. Deliveries of the old life are void: nothing is sent for them (the broker has them
//! back), and a batch asked before the failure is not sent after it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use futures::future::join_all;
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Acker, Channel};
use tokio::sync::{mpsc, oneshot};

use super::broker::answered;
use super::health::{Health, Retired};

/// The most settlements one batch takes, so that one write stays reasonably sized.
const BATCH: usize = 1024;

/// Why a settlement was not sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AckError {
    /// The channel failed since the delivery came: the broker has it back.
    #[error("the channel failed since the delivery came")]
    Void,
    /// The connection refused it.
    #[error(transparent)]
    Broker(lapin::Error),
}

/// The settlements of one channel's deliveries, for one life of the channel.
pub(crate) struct Acks {
    /// To the channel's task.
    asks: mpsc::UnboundedSender<Ask>,
    /// What the task and the consumer share.
    window: Arc<Window>,
}

/// What the consumer and the task share.
struct Window {
    /// The tags of the deliveries taken from the channel and not settled yet, ascending.
    open: Mutex<BTreeSet<u64>>,
    /// The acknowledger of the first delivery of this life: every delivery of a life shares its
    /// poisoning, so it tells whether the channel failed since.
    life: OnceLock<Acker>,
    /// Set once the consumer moved on to a fresh channel ([`Acks::retire`]): the task closes
    /// this one when every delivery it carried is settled. Counted in the transport's health
    /// while it lives.
    retired: OnceLock<Retired>,
}

/// One settlement asked of the task.
struct Ask {
    tag: u64,
    requeue: bool,
    done: oneshot::Sender<Result<(), AckError>>,
}

impl Acks {
    /// Settlements for `channel` (freshly opened or recovered); its task runs until the last
    /// handle is dropped.
    pub(crate) fn new(channel: Channel) -> Arc<Self> {
        let (asks, rx) = mpsc::unbounded_channel();
        let window = Arc::new(Window {
            open: Mutex::new(BTreeSet::new()),
            life: OnceLock::new(),
            retired: OnceLock::new(),
        });
        tokio::spawn(run(channel, rx, Arc::clone(&window)));
        Arc::new(Self { asks, window })
    }

    /// `d` was taken from the channel's consumer: it is open until settled. How many are open
    /// on the channel now.
    pub(crate) fn opened(&self, d: &LapinDelivery) -> usize {
        self.window.life.get_or_init(|| d.acker.clone());
        let mut open = self.window.open();
        open.insert(d.delivery_tag);
        open.len()
    }

    /// The consumer took its last delivery from this channel and moved on to a fresh one: close
    /// the channel once every delivery it carried is settled (the last handle is dropped).
    pub(crate) fn retire(&self, health: &Health) {
        let _ = self.window.retired.set(health.retire());
    }

    /// Has the channel failed since this life began (its deliveries are the broker's again)?
    pub(crate) fn is_void(&self) -> bool {
        self.window.is_void()
    }

    /// Acknowledge delivery `tag`; done once the frame carrying it was written.
    pub(crate) async fn ack(&self, tag: u64) -> Result<(), AckError> {
        self.ask(tag, false).await
    }

    /// Give delivery `tag` back to its queue (`basic.nack` with `requeue`).
    pub(crate) async fn requeue(&self, tag: u64) -> Result<(), AckError> {
        self.ask(tag, true).await
    }

    async fn ask(&self, tag: u64, requeue: bool) -> Result<(), AckError> {
        let (done, answer) = oneshot::channel();
        if self.asks.send(Ask { tag, requeue, done }).is_err() {
            return Err(AckError::Void);
        }
        // The task answers every ask it takes; it ends only when no handle is left.
        answer.await.unwrap_or(Err(AckError::Void))
    }
}

impl Window {
    fn open(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_void(&self) -> bool {
        self.life.get().is_some_and(Acker::poisoned)
    }
}

/// The frames for a batch of settlements (`(tag, requeue)`, in the order asked), given the
/// tags still `open` on the channel, which the batch leaves. The acknowledgements that are the
/// lowest open tags, every one of them, go as one frame; every other settlement as its own.
fn plan(open: &mut BTreeSet<u64>, batch: impl Iterator<Item = (u64, bool)> + Clone) -> Plan {
    let mut acks: Vec<u64> = batch.clone().filter(|a| !a.1).map(|a| a.0).collect();
    acks.sort_unstable();
    let covered = open
        .iter()
        .zip(&acks)
        .take_while(|(open, ack)| open == ack)
        .count();
    for (tag, _) in batch.clone() {
        open.remove(&tag);
    }
    let mut frames = Vec::with_capacity(acks.len());
    let up_to = match covered {
        0 | 1 => None,
        n => {
            frames.push(Frame::AckUpTo(acks[n - 1]));
            Some(acks[n - 1])
        }
    };
    let carried_by = batch
        .map(|(tag, requeue)| match (requeue, up_to) {
            // Below the highest covered tag, every acknowledgement is one of the covered.
            (false, Some(up_to)) if tag <= up_to => 0,
            (requeue, _) => {
                frames.push(if requeue {
                    Frame::Requeue(tag)
                } else {
                    Frame::Ack(tag)
                });
                frames.len() - 1
            }
        })
        .collect();
    Plan { frames, carried_by }
}

/// The frames that carry a batch.
struct Plan {
    frames: Vec<Frame>,
    /// For each settlement of the batch, in order: the frame that carries it.
    carried_by: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// `basic.ack` with `multiple`: every open delivery up to the tag.
    AckUpTo(u64),
    Ack(u64),
    Requeue(u64),
}

/// Send what is asked, batch by batch, until every handle is dropped; then close a retired
/// channel.
async fn run(channel: Channel, mut asks: mpsc::UnboundedReceiver<Ask>, window: Arc<Window>) {
    let mut batch = Vec::new();
    while asks.recv_many(&mut batch, BATCH).await > 0 {
        if window.is_void() {
            for ask in batch.drain(..) {
                let _ = ask.done.send(Err(AckError::Void));
            }
            continue;
        }
        let plan = plan(&mut window.open(), batch.iter().map(|a| (a.tag, a.requeue)));
        // Each frame is queued on the connection at its future's first poll, in this order.
        let sent = join_all(plan.frames.iter().map(|frame| send(&channel, *frame))).await;
        for (ask, frame) in batch.drain(..).zip(plan.carried_by) {
            let result = match &sent[frame] {
                Ok(()) => Ok(()),
                Err(_) if window.is_void() => Err(AckError::Void),
                Err(e) => Err(AckError::Broker(e.clone())),
            };
            let _ = ask.done.send(result);
        }
    }
    if window.retired.get().is_some() && channel.status().connected() {
        let close = channel.close(200, "prereq: every delivery of this channel settled".into());
        let _ = answered("closing a retired channel", close).await;
    }
}

/// Send one frame, bounded ([`answered`]): lapin never answers a call on a channel of a
/// connection whose recovery stalled, and a settle waiting for it would never be reported.
async fn send(channel: &Channel, frame: Frame) -> lapin::Result<()> {
    match frame {
        Frame::AckUpTo(tag) => {
            let ack = channel.basic_ack(tag, BasicAckOptions { multiple: true });
            answered("an acknowledgement", ack).await
        }
        Frame::Ack(tag) => {
            let ack = channel.basic_ack(tag, BasicAckOptions::default());
            answered("an acknowledgement", ack).await
        }
        Frame::Requeue(tag) => {
            let options = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            answered("a requeue", channel.basic_nack(tag, options)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// What the broker does with `frames` on a channel whose unsettled deliveries are `open`:
    /// each tag's fate (true: acknowledged, false: requeued); `Err` where a frame names a tag
    /// that is not unsettled (the broker closes the channel with `PRECONDITION_FAILED`).
    fn broker(open: &BTreeSet<u64>, frames: &[Frame]) -> Result<BTreeMap<u64, bool>, String> {
        let mut unsettled = open.clone();
        let mut fate = BTreeMap::new();
        for frame in frames {
            match *frame {
                Frame::AckUpTo(up_to) => {
                    let covered: Vec<u64> = unsettled.range(..=up_to).copied().collect();
                    if covered.is_empty() {
                        return Err(format!("{frame:?} covers nothing"));
                    }
                    for tag in covered {
                        unsettled.remove(&tag);
                        fate.insert(tag, true);
                    }
                }
                Frame::Ack(tag) | Frame::Requeue(tag) => {
                    if !unsettled.remove(&tag) {
                        return Err(format!("{frame:?}: unknown delivery tag"));
                    }
                    fate.insert(tag, matches!(frame, Frame::Ack(_)));
                }
            }
        }
        Ok(fate)
    }

    #[test]
    fn acknowledgements_below_every_other_open_delivery_go_as_one_frame() {
        let mut open: BTreeSet<u64> = (1..=6).collect();
        // 1, 2 and 3 acknowledged, 4 held (open), 5 acknowledged, 6 requeued.
        let batch = [(3, false), (1, false), (5, false), (2, false), (6, true)];
        let plan = plan(&mut open, batch.into_iter());
        assert_eq!(
            plan.frames,
            [Frame::AckUpTo(3), Frame::Ack(5), Frame::Requeue(6)]
        );
        assert_eq!(plan.carried_by, [0, 0, 1, 0, 2]);
        assert_eq!(open, BTreeSet::from([4]));
    }

    #[test]
    fn a_lone_acknowledgement_and_one_behind_an_open_delivery_go_on_their_own() {
        let mut open: BTreeSet<u64> = BTreeSet::from([7, 8, 9]);
        let plan = plan(&mut open, [(7, false)].into_iter());
        assert_eq!(plan.frames, [Frame::Ack(7)]);
        let plan = plan_of(&mut open, &[(9, false)]);
        assert_eq!(plan.frames, [Frame::Ack(9)], "8 is still open");
        assert_eq!(open, BTreeSet::from([8]));
    }

    fn plan_of(open: &mut BTreeSet<u64>, batch: &[(u64, bool)]) -> Plan {
        plan(open, batch.iter().copied())
    }

    /// Open tags (ascending, with gaps) and a batch of some of them in any order, each an ack
    /// or a requeue.
    fn open_and_batch() -> impl Strategy<Value = (BTreeSet<u64>, Vec<(u64, bool)>)> {
        proptest::collection::btree_set(1u64..200, 0..40).prop_flat_map(|open| {
            let tags: Vec<u64> = open.iter().copied().collect();
            let n = tags.len();
            (
                Just(open),
                proptest::sample::subsequence(tags, 0..=n)
                    .prop_shuffle()
                    .prop_flat_map(|chosen| {
                        let len = chosen.len();
                        (
                            Just(chosen),
                            proptest::collection::vec(proptest::bool::weighted(0.2), len),
                        )
                    })
                    .prop_map(|(chosen, requeue)| chosen.into_iter().zip(requeue).collect()),
            )
        })
    }

    proptest! {
        /// Safety and completeness: the broker, applying the frames, settles exactly the asked
        /// deliveries, each as asked (never one held back), names no settled tag twice, and
        /// each settlement's frame is one that settles it; the batch leaves the open set.
        /// Coalescing: when the k ≥ 2 lowest open tags are all acknowledged, one frame carries
        /// them.
        #[test]
        fn frames_settle_exactly_the_batch((open, batch) in open_and_batch()) {
            let mut left = open.clone();
            let plan = plan_of(&mut left, &batch);
            let fate = broker(&open, &plan.frames).map_err(TestCaseError::fail)?;
            let asked: BTreeMap<u64, bool> = batch.iter().map(|&(t, rq)| (t, !rq)).collect();
            prop_assert_eq!(&fate, &asked);
            for (&(tag, requeue), &frame) in batch.iter().zip(&plan.carried_by) {
                let ok = match plan.frames[frame] {
                    Frame::AckUpTo(up_to) => !requeue && tag <= up_to,
                    Frame::Ack(t) => !requeue && t == tag,
                    Frame::Requeue(t) => requeue && t == tag,
                };
                prop_assert!(ok, "{tag} carried by {:?}", plan.frames[frame]);
            }
            let expected: BTreeSet<u64> = open.iter().copied().filter(|t| !asked.contains_key(t)).collect();
            prop_assert_eq!(left, expected);
            let lowest_acked = open
                .iter()
                .take_while(|t| asked.get(t) == Some(&true))
                .count();
            if lowest_acked >= 2 {
                prop_assert_eq!(plan.frames.len(), batch.len() - lowest_acked + 1);
            } else {
                prop_assert_eq!(plan.frames.len(), batch.len());
            }
        }
    }
}
