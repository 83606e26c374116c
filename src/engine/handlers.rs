//! [`Handlers`]: the tasks that run handlers, and what they tell the loop.
//!
//! Handlers run in worker tasks (they may use every core), at most one job at a time each,
//! kept between jobs: a job is a channel send to an idle worker, not a task spawned (a spawn
//! allocates, initialises and frees a task, and its handle; see docs/performance.md, round 6).
//! Workers are started as needed, up to as many as jobs run at once. The loop may also run a
//! job itself ([`Handlers::start_here`]); one that has to wait goes on in a worker
//! ([`Handlers::hand_over`]).
//!
//! A job tells the loop through one channel: what it has done (`Told::Output`: gathered while
//! the job runs without waiting, told before it waits and with what it tells next, one lock and
//! one wake for all of it), when it need not keep its place any more (`Told::Returned`,
//! optional), and how it ended, always exactly once and after everything else it tells:
//! `Told::Ended`, or `Told::Lost` from its [`Teller`]'s drop when its worker is aborted or dies
//! (that worker is not used again). Either way with what the job had left undone, which its
//! teller keeps (`Teller::unfinished`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures::task::AtomicWaker;
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// What a job tells the loop; `u64` is the job's number.
pub(super) enum Told<O, E> {
    /// Something it did (there may be several).
    Output(u64, O),
    /// It runs nothing more; what it still does (settling) need not keep its place.
    Returned(u64),
    /// The job ended, with what it left undone.
    Ended(u64, Option<E>),
    /// The job was dropped before it ended (its worker aborted or died), with what it had left
    /// undone.
    Lost(u64, Option<E>),
}

/// What the jobs tell, in the order they tell it, until the loop takes it: a list behind a lock
/// that the loop takes whole, one lock for everything waiting (a channel takes a few atomic
/// steps for each item, and as many again to find itself empty; the loop looks after every
/// turn). See docs/performance.md, round 13.
struct Inbox<T> {
    /// Told and not taken yet.
    told: Mutex<VecDeque<T>>,
    /// `told` is not empty (set and cleared under its lock). The loop reads it before it takes
    /// the lock: a read leaves the line shared with the jobs that tell, a lock takes it from
    /// them, and the loop looks far more often than they tell (docs/performance.md, round 17).
    any: AtomicBool,
    /// The loop, when it waits for what is told.
    waker: AtomicWaker,
}

impl<T> Inbox<T> {
    /// Everything in `all`, in order: one lock and one wake.
    fn push_all(&self, all: impl IntoIterator<Item = T>) {
        {
            let mut told = self.told.lock().unwrap_or_else(PoisonError::into_inner);
            told.extend(all);
            if !told.is_empty() {
                self.any.store(true, Ordering::Release);
            }
        }
        self.waker.wake();
    }
}

/// How a job tells the loop.
pub(super) struct Teller<O, E> {
    /// The job's number.
    id: u64,
    /// To the loop's `Handlers`.
    tx: Arc<Inbox<Told<O, E>>>,
    /// `Ended` was told (the drop tells `Lost` otherwise).
    ended: bool,
    /// What the job did and has not told yet (see `Teller::flush`).
    outputs: Vec<O>,
    /// What the job has not done yet, told with its end.
    unfinished: Option<E>,
}

impl<O, E> Teller<O, E> {
    /// The job's number.
    pub(super) fn job(&self) -> u64 {
        self.id
    }

    /// The job did `output`: told with what the job tells next (the job calls
    /// [`Teller::flush`] before it waits for anything).
    pub(super) fn output(&mut self, output: O) {
        self.outputs.push(output);
    }

    /// Tell what the job did so far (before the job waits: the loop may be waiting for it).
    pub(super) fn flush(&mut self) {
        if !self.outputs.is_empty() {
            self.tell(None);
        }
    }

    /// The job runs nothing more.
    pub(super) fn returned(&mut self) {
        self.tell(Some(Told::Returned(self.id)));
    }

    /// Gather what the job does in `outputs` (emptied, its capacity kept), a list the worker
    /// keeps from job to job: a list of its own would grow anew for each job (two reallocations
    /// a job of eight; docs/performance.md, round 19).
    pub(super) fn gather_in(&mut self, mut outputs: Vec<O>) {
        if self.outputs.is_empty() {
            outputs.clear();
            self.outputs = outputs;
        }
    }

    /// The job ends, with what it has not done; the list it gathered in, emptied, for the
    /// worker's next job ([`Teller::gather_in`]).
    pub(super) fn ended(mut self) -> Vec<O> {
        self.ended = true;
        let end = Told::Ended(self.id, self.unfinished.take());
        self.tell(Some(end));
        std::mem::take(&mut self.outputs)
    }

    /// What the job did so far, then `then`, if any: one step for the loop's inbox.
    fn tell(&mut self, then: Option<Told<O, E>>) {
        let id = self.id;
        let outputs = self.outputs.drain(..).map(|o| Told::Output(id, o));
        self.tx.push_all(outputs.chain(then));
    }

    /// What the job has not done yet: it takes its work from here, and puts back what it
    /// leaves; told with the job's end, also if the job is dropped before it ends.
    pub(super) fn unfinished(&mut self) -> Option<&mut E> {
        self.unfinished.as_mut()
    }
}

impl<O, E> Drop for Teller<O, E> {
    fn drop(&mut self) {
        if !self.ended {
            let lost = Told::Lost(self.id, self.unfinished.take());
            self.tell(Some(lost));
        }
    }
}

/// What a worker receives.
pub(super) enum Assigned<J, O, E> {
    /// A job, and how it tells the loop about it.
    Start(J, Teller<O, E>),
    /// A job the loop began itself and that has to wait: run it to its end.
    Resume(Resumed<O>),
}

/// A job the loop began itself, as it is handed to a worker: it ends with the list it gathered
/// its outcomes in ([`Teller::ended`]).
pub(super) type Resumed<O> = Pin<Box<dyn Future<Output = Vec<O>> + Send>>;

/// Where a worker receives its jobs.
pub(super) type Jobs<J, O, E> = mpsc::UnboundedReceiver<Assigned<J, O, E>>;

/// A worker task, as the loop knows it.
struct Worker<J, O, E> {
    /// Its jobs.
    jobs: mpsc::UnboundedSender<Assigned<J, O, E>>,
    /// To cancel it at the end of a shutdown's grace.
    abort: AbortHandle,
}

/// A running job, as the loop knows it.
struct Running<R> {
    /// The worker that runs it (an index into `Handlers::workers`); `None` while the loop runs
    /// it itself.
    worker: Option<usize>,
    /// What the loop keeps about it.
    what: R,
}

/// The workers and their running jobs: what the loop keeps about each job (`R`), what a job is
/// (`J`), what it tells as it goes (`O`) and what it ends with (`E`).
pub(super) struct Handlers<J, O, E, R> {
    /// Every worker started, by index; `None` once it is gone (aborted or died).
    workers: Vec<Option<Worker<J, O, E>>>,
    /// Workers without a job.
    idle: Vec<usize>,
    /// Each running job by its number. The numbers come from no one outside: a fast hasher,
    /// not a DoS-resistant one.
    running: FxHashMap<u64, Running<R>>,
    /// What the jobs tell (each job's teller holds it too).
    inbox: Arc<Inbox<Told<O, E>>>,
    /// What the loop took from the inbox and has not handled yet, in order.
    taken: VecDeque<Told<O, E>>,
    /// When the loop last took from the inbox: after everything in `taken` was told. What the
    /// jobs did is dated by it, one look at the clock for all of it rather than one for each
    /// message (docs/performance.md, round 18).
    taken_at: Instant,
    /// The number the next job gets.
    next_id: u64,
}

impl<J: Send + 'static, O: Send + 'static, E: Send + 'static, R> Handlers<J, O, E, R> {
    pub(super) fn new() -> Self {
        Self {
            workers: Vec::new(),
            idle: Vec::new(),
            running: FxHashMap::default(),
            inbox: Arc::new(Inbox {
                told: Mutex::new(VecDeque::new()),
                any: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            }),
            taken: VecDeque::new(),
            taken_at: Instant::now(),
            next_id: 0,
        }
    }

    /// Jobs that have not told their end.
    pub(super) fn len(&self) -> usize {
        self.running.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Run `job` on an idle worker, or on a new one that `worker` makes from its job channel;
    /// keep `what` about it. `work`: what the job has to do, as its teller keeps it (told with
    /// the job's end, also if the job is dropped before it started).
    pub(super) fn start<F>(&mut self, what: R, job: J, work: E, worker: impl Fn(Jobs<J, O, E>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let teller = self.teller(work);
        let id = teller.id;
        let at = self.assign(Assigned::Start(job, teller), worker);
        self.running.insert(
            id,
            Running {
                worker: Some(at),
                what,
            },
        );
    }

    /// A job the loop runs itself: keep `what` about it; its teller, which keeps `work`. If it
    /// has to wait, the loop hands it to a worker ([`Handlers::hand_over`]).
    pub(super) fn start_here(&mut self, what: R, work: E) -> Teller<O, E> {
        let teller = self.teller(work);
        self.running
            .insert(teller.id, Running { worker: None, what });
        teller
    }

    /// Job `id`, which the loop began itself, goes on in a worker (an idle one, or a new one
    /// that `worker` makes).
    pub(super) fn hand_over<F>(
        &mut self,
        id: u64,
        job: Resumed<O>,
        worker: impl Fn(Jobs<J, O, E>) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let at = self.assign(Assigned::Resume(job), worker);
        if let Some(r) = self.running.get_mut(&id) {
            r.worker = Some(at);
        }
    }

    /// The teller of a new job, which keeps `work`.
    fn teller(&mut self, work: E) -> Teller<O, E> {
        self.next_id += 1;
        Teller {
            id: self.next_id,
            tx: Arc::clone(&self.inbox),
            ended: false,
            outputs: Vec::new(),
            unfinished: Some(work),
        }
    }

    /// Send `sent` to an idle worker, or to a new one that `worker` makes; the worker's index.
    fn assign<F>(
        &mut self,
        mut sent: Assigned<J, O, E>,
        worker: impl Fn(Jobs<J, O, E>) -> F,
    ) -> usize
    where
        F: Future<Output = ()> + Send + 'static,
    {
        loop {
            let at = match self.idle.pop() {
                Some(at) => at,
                None => {
                    let (jobs, rx) = mpsc::unbounded_channel();
                    let abort = tokio::spawn(worker(rx)).abort_handle();
                    self.workers.push(Some(Worker { jobs, abort }));
                    self.workers.len() - 1
                }
            };
            let Some(w) = self.workers.get(at).and_then(Option::as_ref) else {
                continue;
            };
            match w.jobs.send(sent) {
                Ok(()) => return at,
                // The worker is gone (it can only have died): never again, try another.
                Err(mpsc::error::SendError(back)) => {
                    sent = back;
                    self.workers[at] = None;
                }
            }
        }
    }

    /// What the loop keeps about running job `id`.
    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut R> {
        self.running.get_mut(&id).map(|r| &mut r.what)
    }

    /// Forget job `id`, which told its end; what the loop kept about it. `lost`: it ended
    /// without an outcome, its worker is not used again.
    pub(super) fn remove(&mut self, id: u64, lost: bool) -> Option<R> {
        let r = self.running.remove(&id)?;
        if let Some(worker) = r.worker {
            if lost {
                if let Some(w) = self.workers.get_mut(worker).and_then(Option::take) {
                    w.abort.abort();
                }
            } else {
                self.idle.push(worker);
            }
        }
        Some(r.what)
    }

    /// What the loop keeps about each running job.
    pub(super) fn iter(&self) -> impl Iterator<Item = &R> {
        self.running.values().map(|r| &r.what)
    }

    /// The next thing a job tells. Pending forever while no job runs (the loop guards it).
    /// Cancel-safe: what is told stays in the inbox until taken.
    pub(super) async fn recv(&mut self) -> Told<O, E> {
        std::future::poll_fn(|cx| {
            if let Some(told) = self.try_recv() {
                return Poll::Ready(told);
            }
            self.inbox.waker.register(cx.waker());
            // Told between the look and the registration: its wake went to the waker before.
            match self.try_recv() {
                Some(told) => Poll::Ready(told),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// What a job told, if anything is waiting.
    pub(super) fn try_recv(&mut self) -> Option<Told<O, E>> {
        if let Some(told) = self.taken.pop_front() {
            return Some(told);
        }
        // Nothing told since the last take (the flag is set, with `Release`, before the wake
        // that follows each telling: seen by the look after a waker's registration).
        if !self.inbox.any.load(Ordering::Acquire) {
            return None;
        }
        {
            let mut told = self
                .inbox
                .told
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if told.is_empty() {
                return None;
            }
            // Everything waiting, in one step: the emptied list left behind keeps its capacity.
            std::mem::swap(&mut *told, &mut self.taken);
            self.inbox.any.store(false, Ordering::Relaxed);
        }
        self.taken_at = Instant::now();
        self.taken.pop_front()
    }

    /// When the loop took what `try_recv` gives now from the inbox: not before it was told.
    pub(super) fn taken_at(&self) -> Instant {
        self.taken_at
    }

    /// Cancel every worker; each running job tells its end (`None`) as it is dropped.
    pub(super) fn abort_all(&mut self) {
        self.idle.clear();
        for w in self.workers.iter().flatten() {
            w.abort.abort();
        }
    }
}

impl<J, O, E, R> Drop for Handlers<J, O, E, R> {
    /// Workers end with the loop (as a dropped join set's tasks would): a job still running is
    /// cancelled, its message left unsettled for the broker to deliver again.
    fn drop(&mut self) {
        for w in self.workers.iter().flatten() {
            w.abort.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set when job 11 reached its wait (only one test runs job 11).
    static JOB_11_WAITS: AtomicBool = AtomicBool::new(false);

    /// Tells each job doubled and leaves no work undone; panics on 0; never ends on 1; on 11,
    /// does 1 and never ends (`JOB_11_WAITS`); on 13, does 1, then waits, telling it first, and
    /// never ends.
    ///
    /// Gathers in one list from job to job, left with a stale entry each time (which
    /// `gather_in` must not tell).
    async fn worker(mut jobs: Jobs<u32, u32, u32>) {
        let mut kept = vec![999];
        while let Some(assigned) = jobs.recv().await {
            let (job, mut teller) = match assigned {
                Assigned::Start(job, teller) => (job, teller),
                Assigned::Resume(job) => {
                    kept = job.await;
                    kept.push(999);
                    continue;
                }
            };
            teller.gather_in(std::mem::take(&mut kept));
            match job {
                0 => panic!("a worker dies"),
                1 => std::future::pending::<()>().await,
                11 => {
                    teller.output(1);
                    JOB_11_WAITS.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                13 => {
                    teller.output(1);
                    teller.flush();
                    std::future::pending::<()>().await;
                }
                n => {
                    teller.output(n * 2);
                    if let Some(work) = teller.unfinished() {
                        *work = 0;
                    }
                    teller.returned();
                    kept = teller.ended();
                    assert!(kept.is_empty(), "the list comes back emptied");
                    assert!(kept.capacity() > 0, "with its capacity");
                    kept.push(999);
                }
            }
        }
    }

    /// The job's end, `Ok` with its output or `Err` if lost, and what it left; checks that the
    /// output came before the end.
    async fn ended(
        h: &mut Handlers<u32, u32, u32, &'static str>,
    ) -> (u64, Result<u32, ()>, Option<u32>) {
        let mut output = None;
        loop {
            match h.recv().await {
                Told::Output(_, n) => {
                    assert_eq!(output.replace(n), None, "one output, told once");
                }
                Told::Returned(_) => {}
                Told::Ended(id, left) => {
                    let out = output.expect("the output, then the end");
                    return (id, Ok(out), left);
                }
                Told::Lost(id, left) => return (id, Err(()), left),
            }
        }
    }

    #[tokio::test]
    async fn a_worker_is_kept_between_jobs_and_replaced_when_it_dies() {
        let mut h: Handlers<u32, u32, u32, &'static str> = Handlers::new();
        for n in 2..5 {
            h.start("job", n, 1, worker);
            let (id, out, left) = ended(&mut h).await;
            assert_eq!(out, Ok(n * 2));
            assert_eq!(left, Some(0), "it told what it left undone");
            assert_eq!(h.remove(id, false), Some("job"));
        }
        assert_eq!(h.workers.len(), 1, "one worker ran the three jobs");

        h.start("dies", 0, 5, worker);
        let (id, out, left) = ended(&mut h).await;
        assert_eq!(out, Err(()), "a job whose worker died is lost");
        assert_eq!(left, Some(5), "with its work");
        assert_eq!(h.remove(id, true), Some("dies"));
        assert!(h.is_empty());

        h.start("after", 7, 1, worker);
        let (id, out, _) = ended(&mut h).await;
        assert_eq!(out, Ok(14));
        h.remove(id, false);
        assert_eq!(
            h.workers.iter().flatten().count(),
            1,
            "the dead worker is not used again"
        );
    }

    #[tokio::test]
    async fn what_a_job_did_is_told_before_it_waits_and_before_it_is_lost() {
        let mut h: Handlers<u32, u32, u32, &'static str> = Handlers::new();
        h.start("waits", 13, 7, worker);
        // Told before the job waits: it comes while the job still runs.
        assert!(matches!(h.recv().await, Told::Output(_, 1)));
        h.start("waits untold", 11, 7, worker);
        // Once the second job waits, what it did is not told yet.
        while !JOB_11_WAITS.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert!(
            h.try_recv().is_none(),
            "told only before a wait or with the end"
        );
        h.abort_all();
        let mut told = Vec::new();
        while !h.is_empty() {
            match h.recv().await {
                Told::Output(id, n) => told.push((id, Some(n))),
                Told::Lost(id, left) => {
                    assert_eq!(left, Some(7));
                    told.push((id, None));
                    h.remove(id, true);
                }
                Told::Returned(_) | Told::Ended(..) => panic!("neither returned nor ended"),
            }
        }
        told.sort_by_key(|(id, _)| *id);
        assert_eq!(
            told,
            [(1, None), (2, Some(1)), (2, None)],
            "the job lost told what it had done, then its loss"
        );
    }

    /// Counts its wakes.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for Wakes {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_loop_is_woken_for_what_is_told_or_sees_it_before_it_waits() {
        let mut h: Handlers<u32, u32, u32, &'static str> = Handlers::new();
        let inbox = Arc::clone(&h.inbox);
        let wakes = Arc::new(Wakes(std::sync::atomic::AtomicUsize::new(0)));
        let waker = futures::task::waker(Arc::clone(&wakes));
        let mut cx = std::task::Context::from_waker(&waker);
        let woken = || wakes.0.load(Ordering::SeqCst);
        let told = |t: Option<Told<u32, u32>>| match t {
            Some(Told::Returned(n)) => n,
            _ => 0,
        };
        {
            let recv = h.recv();
            futures::pin_mut!(recv);
            assert!(recv.as_mut().poll(&mut cx).is_pending());
            inbox.push_all([Told::Returned(1)]);
            assert_eq!(woken(), 1, "the waiting loop is woken");
            inbox.push_all([Told::Returned(2)]);
            let Poll::Ready(Told::Returned(1)) = recv.as_mut().poll(&mut cx) else {
                panic!("the first told");
            };
        }
        assert_eq!(told(h.try_recv()), 2, "then the second");
        // Told while the loop was not waiting: seen when it next waits, without a wake.
        inbox.push_all([Told::Returned(3)]);
        {
            let recv = h.recv();
            futures::pin_mut!(recv);
            let Poll::Ready(Told::Returned(3)) = recv.as_mut().poll(&mut cx) else {
                panic!("told before the loop waited");
            };
        }
        {
            let recv = h.recv();
            futures::pin_mut!(recv);
            assert!(recv.as_mut().poll(&mut cx).is_pending());
            inbox.push_all([Told::Returned(4)]);
            assert_eq!(woken(), 2, "woken again, once it took everything");
        }
        assert_eq!(told(h.try_recv()), 4);
    }

    #[tokio::test]
    async fn aborted_jobs_are_lost_with_what_they_left() {
        let mut h: Handlers<u32, u32, u32, &'static str> = Handlers::new();
        h.start("stuck", 1, 7, worker);
        h.start("stuck too", 1, 7, worker);
        assert_eq!(h.len(), 2);
        h.abort_all();
        let mut whats = Vec::new();
        while !h.is_empty() {
            let (id, out, left) = ended(&mut h).await;
            assert_eq!(out, Err(()));
            assert_eq!(left, Some(7), "lost, with what it had left undone");
            whats.extend(h.remove(id, true));
        }
        whats.sort_unstable();
        assert_eq!(whats, ["stuck", "stuck too"]);
    }
}
