//! [`Here`]: when the loop runs a handler job itself rather than hand it to a worker.
//!
//! A job handed to a worker crosses to another thread and back: a channel send, a wake of the
//! worker (often of a parked thread), and the same again for what it tells. Where handlers
//! complete at once, that costs more than the handlers (docs/performance.md, round 20). So the
//! loop runs a job itself, up to a budget of time; a job that has to wait, or that runs out of
//! budget, goes on in a worker from where it stopped. A job that did either, or took longer
//! than the budget, sends the next jobs to workers: 64 of them, twice as many after each such
//! job in a row (up to 4 096), so that handlers that wait or compute long (the usual service,
//! which writes to a database) are tried on the loop rarely and run side by side in workers,
//! and the loop is never held by more than one handler call past the budget.

use std::time::Duration;

use tokio::time::Instant;

/// The longest a job runs on the loop before it goes on in a worker: checked before each of
/// its messages after the first (the handlers of a fast path take a microsecond or so).
pub(super) const BUDGET: Duration = Duration::from_micros(50);
/// Jobs sent to workers after the first job that had to wait or ran out of budget.
const PAUSE_FIRST: u32 = 64;
/// The most jobs sent to workers in a row, however often jobs on the loop had to wait.
const PAUSE_MAX: u32 = 4_096;

/// Whether the loop runs the next job itself, and the list it gathers outcomes in.
pub(super) struct Here<O> {
    /// Jobs still to send to workers before the loop runs one itself again.
    pause: u32,
    /// The pause after the next job on the loop that has to wait or runs out of budget.
    next_pause: u32,
    /// The list the last job on the loop gathered its outcomes in, emptied, for the next one.
    outputs: Vec<O>,
    /// The loop's last look at the clock since it last waited: the next job it runs is timed
    /// from it (with the little the loop did in between), and a job's end is the next job's
    /// start, so a job costs one look at the clock, not two (docs/performance.md, round 21).
    mark: Option<Instant>,
    /// The loop's last look at the clock since it last waited (or did something long), for the
    /// moments it stamps: the messages it holds in one turn share one look, not one each
    /// (docs/performance.md, round 22). Unlike `mark`, a hand-over keeps it.
    seen: Option<Instant>,
}

impl<O> Here<O> {
    pub(super) fn new() -> Self {
        Self {
            pause: 0,
            next_pause: PAUSE_FIRST,
            outputs: Vec::new(),
            mark: None,
            seen: None,
        }
    }

    /// When the next job on the loop starts, for its budget.
    pub(super) fn started(&mut self) -> Instant {
        if let Some(at) = self.mark {
            return at;
        }
        let at = Instant::now();
        self.mark = Some(at);
        self.seen = Some(at);
        at
    }

    /// A look at the clock: the loop's last since it waited, else a new one.
    pub(super) fn clock(&mut self) -> Instant {
        *self.seen.get_or_insert_with(Instant::now)
    }

    /// How long a job on the loop that ended at `at` took since it `started`. The next job is
    /// timed from `at`.
    fn lap(&mut self, at: Instant) -> Duration {
        let took = at.saturating_duration_since(self.mark.unwrap_or(at));
        self.mark = Some(at);
        self.seen = Some(at);
        took
    }

    /// The loop waits (or did something long): the next job is timed from a new look at the
    /// clock.
    pub(super) fn waits(&mut self) {
        self.mark = None;
        self.seen = None;
    }

    /// Does the loop run the next job itself? Counts a job sent to a worker otherwise.
    pub(super) fn now(&mut self) -> bool {
        if self.pause == 0 {
            return true;
        }
        self.pause -= 1;
        false
    }

    /// Would the loop run the next job itself? (Counts nothing.)
    pub(super) fn is_now(&self) -> bool {
        self.pause == 0
    }

    /// The list for a job the loop runs.
    pub(super) fn outputs(&mut self) -> Vec<O> {
        std::mem::take(&mut self.outputs)
    }

    /// A job on the loop ended there at `at`, with the list it gathered in.
    pub(super) fn ended(&mut self, outputs: Vec<O>, at: Instant) {
        self.outputs = outputs;
        self.done(at);
    }

    /// A job on the loop ended there at `at` (the look at the clock that also dates its
    /// outcome): one that took longer than the budget sends the next jobs to workers.
    pub(super) fn done(&mut self, at: Instant) {
        let took = self.lap(at);
        if took > BUDGET {
            self.handed_over();
        } else {
            self.next_pause = PAUSE_FIRST;
        }
    }

    /// A job on the loop had to wait or ran out of budget: it goes on in a worker, and so do
    /// the next jobs.
    pub(super) fn handed_over(&mut self) {
        self.mark = None;
        self.pause = self.next_pause;
        self.next_pause = self.next_pause.saturating_mul(2).min(PAUSE_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of the next `n` jobs run on the loop.
    fn here_of(h: &mut Here<u32>, n: u32) -> u32 {
        (0..n).filter(|_| h.now()).count() as u32
    }

    #[test]
    fn a_job_is_timed_from_the_loop_s_last_look_at_the_clock() {
        let mut h = Here::<u32>::new();
        let first = h.started();
        assert_eq!(h.started(), first, "one look until a job ends");
        let end = first + Duration::from_secs(3_600);
        assert_eq!(h.lap(end), Duration::from_secs(3_600));
        assert_eq!(h.started(), end, "the next job starts where the last ended");
        let later = end + Duration::from_micros(30);
        assert_eq!(h.lap(later), Duration::from_micros(30));
        h.waits();
        assert!(h.started() < end, "after a wait, a new look at the clock");
        h.lap(later);
        h.handed_over();
        assert!(h.started() < end, "and after a hand-over");
    }

    #[test]
    fn what_the_loop_stamps_in_a_turn_shares_one_look_at_the_clock() {
        let mut h = Here::<u32>::new();
        let first = h.clock();
        assert_eq!(h.clock(), first, "one look until the loop waits");
        let end = first + Duration::from_secs(3_600);
        h.started();
        h.lap(end);
        assert_eq!(h.clock(), end, "a job's end is a look at the clock");
        h.handed_over();
        assert_eq!(h.clock(), end, "a hand-over keeps it");
        h.waits();
        assert!(h.clock() < end, "after a wait, a new look");
        let started = h.started();
        assert_eq!(h.clock(), started, "so is a job's start");
    }

    #[test]
    fn jobs_go_to_workers_for_a_pause_that_doubles_while_jobs_on_the_loop_wait() {
        let mut h = Here::new();
        assert_eq!(here_of(&mut h, 10), 10, "every job on the loop at first");
        h.handed_over();
        assert_eq!(
            here_of(&mut h, PAUSE_FIRST),
            0,
            "then the next 64 in workers"
        );
        assert!(h.now(), "then one on the loop again");
        h.handed_over();
        assert_eq!(
            here_of(&mut h, 2 * PAUSE_FIRST),
            0,
            "twice as long after another"
        );
        assert!(h.now());
        for _ in 0..20 {
            h.handed_over();
            while !h.now() {}
        }
        h.handed_over();
        assert_eq!(here_of(&mut h, PAUSE_MAX), 0);
        assert!(h.now(), "never longer than the most");
        let t = h.started();
        h.ended(vec![7], t + BUDGET);
        h.handed_over();
        assert_eq!(
            here_of(&mut h, PAUSE_FIRST),
            0,
            "back to the first after a quick job"
        );
        assert!(h.now());
        assert_eq!(h.outputs(), [7], "the list a job ended with, for the next");
        let t = h.started();
        h.ended(Vec::new(), t + BUDGET);
        let t = h.started();
        h.ended(Vec::new(), t + BUDGET * 2);
        assert_eq!(
            here_of(&mut h, PAUSE_FIRST),
            0,
            "a job that took long pauses too"
        );
        assert!(h.now());
    }
}
