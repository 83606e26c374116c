//! A consumer group on plain RabbitMQ: which partitions this instance owns, recomputed as
//! instances come and go.
//!
//! Every instance hears the others' heartbeats ([`Membership`]) and computes the same balanced
//! assignment ([`assign`]). Exclusivity comes from the broker: each partition queue has a single
//! active consumer. An instance consumes every partition (active or standing by), and hands over
//! each partition it does not own — the consumer gives back what it holds and lets its handlers
//! finish before the queue's consumer is cancelled, so the broker activates the next instance in
//! line. For a while after every change the hand-over is repeated, so that a partition reaches
//! its owner even when another non-owner stood between them in the broker's line.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::assign::assign;
use super::broker::Broker;
use super::error::AmqpError;
use super::members::Membership;
use super::route::Partitions;

/// How often instances beat.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// After a change, hand over non-owned partitions again this often…
const SETTLE_EVERY: Duration = Duration::from_secs(2);
/// …for this long.
const SETTLE_FOR: Duration = Duration::from_secs(20);
/// How long [`Group::leave`] waits for the leave to be announced.
const LEAVE_WITHIN: Duration = Duration::from_secs(6);

/// The partitions this instance owns, and a round number: every new round asks each partition
/// consumer to check again that it does not hold a partition it does not own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Assignment {
    /// Owned partitions; `None` before the first assignment (everything counts as owned).
    owned: Option<BTreeSet<u32>>,
    /// Increases with every check.
    round: u64,
}

impl Assignment {
    /// Does this instance own `partition`?
    pub(crate) fn owns(&self, partition: u32) -> bool {
        self.owned.as_ref().is_none_or(|o| o.contains(&partition))
    }
}

/// This instance's membership of a group, and the task that keeps its assignment.
pub(crate) struct Group {
    /// This instance's partitions, as the task recomputes them.
    assignment: watch::Receiver<Assignment>,
    /// Keeps the membership and the assignment; aborted when the group is dropped.
    task: JoinHandle<()>,
    /// Tells the task to leave the group and end ([`Group::leave`]).
    leave: Option<oneshot::Sender<()>>,
}

impl Drop for Group {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Group {
    /// Join the group of `partitions` as `member`.
    pub(crate) async fn join(
        broker: &Broker,
        partitions: &Partitions,
        member: String,
    ) -> Result<Self, AmqpError> {
        let membership = Membership::join(
            broker,
            &partitions.members_exchange(),
            member.clone(),
            HEARTBEAT,
        )
        .await?;
        let (tx, assignment) = watch::channel(Assignment::default());
        let (leave, leaving) = oneshot::channel();
        let task = tokio::spawn(keep(membership, partitions.count, member, tx, leaving));
        Ok(Self {
            assignment,
            task,
            leave: Some(leave),
        })
    }

    /// Leave the group and wait until the others were told (at most [`LEAVE_WITHIN`]), so that
    /// they own this instance's partitions by the time its consumers let go of them. Dropped
    /// instead, the group is left in the background: an instance that closes its connection
    /// right after leaves its partitions to members that still count it in for a few beats,
    /// and each of them hands the partitions it is made active on over to it, in vain.
    pub(crate) async fn leave(mut self) {
        if let Some(leave) = self.leave.take() {
            let _ = leave.send(());
        }
        let _ = tokio::time::timeout(LEAVE_WITHIN, &mut self.task).await;
    }

    /// The assignment, as it changes.
    pub(crate) fn assignment(&self) -> watch::Receiver<Assignment> {
        self.assignment.clone()
    }
}

/// Recompute the assignment when the members change, and start a new round every
/// [`SETTLE_EVERY`] for [`SETTLE_FOR`] after each change.
async fn keep(
    membership: Membership,
    partitions: u32,
    member: String,
    tx: watch::Sender<Assignment>,
    mut leaving: oneshot::Receiver<()>,
) {
    let mut members = membership.members();
    let mut round = 0u64;
    let mut settle_until = Instant::now() + SETTLE_FOR;
    let mut tick = tokio::time::interval(SETTLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = members.borrow_and_update().clone();
        let owned = assign(&now, partitions).remove(&member).unwrap_or_default();
        round += 1;
        tracing::debug!(target: "prereq", members = now.len(), owned = ?owned, round,
            "partition assignment");
        tx.send_replace(Assignment {
            owned: Some(owned),
            round,
        });
        loop {
            tokio::select! {
                changed = members.changed() => {
                    if changed.is_err() {
                        // The membership is gone: so is the transport.
                        return;
                    }
                    settle_until = Instant::now() + SETTLE_FOR;
                    break;
                }
                _ = tick.tick() => {
                    if Instant::now() < settle_until {
                        break;
                    }
                }
                () = tx.closed() => {
                    membership.leave().await;
                    return;
                }
                _ = &mut leaving => {
                    membership.leave().await;
                    return;
                }
            }
        }
    }
}
