//! Deferred copies of a partition's messages that are away (in a delay, or back and not settled
//! yet), so that a consumer keeps the partition until they are back.
//!
//! The engine keeps a key's later messages behind its deferred copy, but only in the instance
//! that deferred it. Were the partition handed over while a copy is away, the next instance
//! would run the key's later messages (given back with the hand-over) before the copy comes
//! back. So the consumer of a partition it no longer owns keeps it until every copy it deferred
//! from it came back and was settled here (a copy is settled after the messages held behind
//! it were queued behind it), or until the copy's delay plus [`COPY_GRACE`] passed (a copy
//! taken by another instance, or lost with a broker). Copies deferred while the consumer waits
//! do not make the wait longer ([`Leave`]): a partition is never kept for good, even one that
//! goes on deferring messages.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// How long after its delay a deferred copy may take to come back before its partition is
/// handed over without it.
pub(crate) const COPY_GRACE: Duration = Duration::from_secs(30);

/// The copies away, by copy identity.
#[derive(Debug, Default)]
pub(crate) struct Away {
    /// Each copy's partition and the instant its partition stops waiting for it.
    copies: HashMap<String, (u32, Instant)>,
}

impl Away {
    /// A copy of a message of `partition` was published (confirmed) with this `delay`.
    pub(crate) fn sent(&mut self, copy: String, partition: u32, delay: Duration, now: Instant) {
        self.copies
            .insert(copy, (partition, now + delay + COPY_GRACE));
    }

    /// The copy came back and was settled (or given back): it is away no more. Whether it was
    /// one of these.
    pub(crate) fn settled(&mut self, copy: &str) -> bool {
        self.copies.remove(copy).is_some()
    }

    /// Until when the copies of `partition` still away may be waited for: `None` when none is
    /// (those past their time are forgotten).
    pub(crate) fn out_until(&mut self, partition: u32, now: Instant) -> Option<Instant> {
        self.copies.retain(|_, (_, until)| *until > now);
        self.copies
            .values()
            .filter(|(p, _)| *p == partition)
            .map(|(_, until)| *until)
            .max()
    }
}

/// A consumer's wait for the copies of a partition its instance no longer owns.
///
/// The wait ends when no copy is away any more, and at the latest when the copies that were
/// away as it began are past their time: a partition that goes on deferring messages meanwhile
/// (copies made after the wait began) still moves on.
#[derive(Debug, Default)]
pub(crate) struct Leave {
    /// When the wait ends at the latest; `None` while not waiting.
    by: Option<Instant>,
}

impl Leave {
    /// Keep the partition (start or go on waiting)? `out_until` is [`Away::out_until`] now.
    pub(crate) fn keeps(&mut self, out_until: Option<Instant>, now: Instant) -> bool {
        self.by = match (self.by, out_until) {
            (_, None) => None,
            (Some(by), Some(_)) if now >= by => None,
            (Some(by), Some(_)) => Some(by),
            (None, Some(until)) => Some(until),
        };
        self.by.is_some()
    }

    /// Is the consumer waiting?
    pub(crate) fn waiting(&self) -> bool {
        self.by.is_some()
    }

    /// When the wait ends at the latest.
    pub(crate) fn by(&self) -> Option<Instant> {
        self.by
    }

    /// The partition is this instance's again, or was handed over: no more waiting.
    pub(crate) fn end(&mut self) {
        self.by = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_when_the_copies_are_back_or_past_the_time_they_had_as_it_began() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let mut leave = Leave::default();
        assert!(!leave.keeps(None, now), "nothing away: hand over");
        assert!(leave.keeps(Some(now + s(40)), now));
        assert_eq!(leave.by(), Some(now + s(40)));
        assert!(
            leave.keeps(Some(now + s(90)), now + s(10)),
            "a later copy does not extend the wait"
        );
        assert_eq!(leave.by(), Some(now + s(40)));
        assert!(
            !leave.keeps(Some(now + s(90)), now + s(40)),
            "past its time"
        );
        assert!(!leave.waiting());
        assert!(leave.keeps(Some(now + s(90)), now + s(41)), "a new wait");
        assert!(!leave.keeps(None, now + s(42)), "every copy back");
        assert!(leave.keeps(Some(now + s(90)), now + s(43)));
        leave.end();
        assert!(!leave.waiting());
    }

    #[test]
    fn a_partition_waits_for_its_own_copies_until_settled_or_past_their_time() {
        let now = Instant::now();
        let mut away = Away::default();
        assert_eq!(away.out_until(1, now), None);
        away.sent("a".into(), 1, Duration::from_secs(5), now);
        away.sent("b".into(), 1, Duration::from_secs(1), now);
        away.sent("c".into(), 2, Duration::from_secs(9), now);
        assert_eq!(
            away.out_until(1, now),
            Some(now + Duration::from_secs(5) + COPY_GRACE),
            "the latest of its copies"
        );
        assert!(away.settled("a"));
        assert!(!away.settled("a"), "settled once");
        assert_eq!(
            away.out_until(1, now),
            Some(now + Duration::from_secs(1) + COPY_GRACE)
        );
        let late = now + Duration::from_secs(1) + COPY_GRACE;
        assert_eq!(away.out_until(1, late), None, "past its time: forgotten");
        assert!(!away.settled("b"));
        assert_eq!(
            away.out_until(2, late),
            Some(now + Duration::from_secs(9) + COPY_GRACE),
            "another partition's copy is not"
        );
    }
}
