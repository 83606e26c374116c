//! [`Handlers`]: the running handler tasks, and what they tell the loop.
//!
//! Each handler runs in a task of its own (handlers may use both cores). A task tells the loop
//! through one channel: when its handler returned (`Told::Returned`, optional) and when it ended
//! (`Told::Ended`, always exactly once: a task that is aborted or panics tells it from its
//! [`Teller`]'s drop). The loop needs no join handle per task (a join set costs a lock and a
//! waker per task, and a copy of each output), only an abort handle for the end of a shutdown.

use std::future::Future;

use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// What a handler task tells the loop; `u64` is the task's number among the handlers.
pub(super) enum Told<O> {
    /// Its handler returned successfully; the task still settles the message.
    Returned(u64),
    /// The task ended: with its output, or `None` if it was aborted (or failed) before it had
    /// one.
    Ended(u64, Option<O>),
}

/// How a handler task tells the loop.
pub(super) struct Teller<O> {
    /// The task's number.
    id: u64,
    /// To the loop's `Handlers`.
    tx: mpsc::UnboundedSender<Told<O>>,
    /// `Ended` was told (the drop tells it otherwise).
    ended: bool,
}

impl<O> Teller<O> {
    /// The handler returned successfully.
    pub(super) fn returned(&self) {
        let _ = self.tx.send(Told::Returned(self.id));
    }

    /// The task ends with `output`.
    pub(super) fn ended(mut self, output: O) {
        self.ended = true;
        let _ = self.tx.send(Told::Ended(self.id, Some(output)));
    }
}

impl<O> Drop for Teller<O> {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.tx.send(Told::Ended(self.id, None));
        }
    }
}

/// A running task, as the loop knows it.
struct Task<R> {
    /// To cancel it at the end of a shutdown's grace.
    abort: AbortHandle,
    /// What the loop keeps about it.
    what: R,
}

/// The running handler tasks: what the loop keeps about each (`R`), and what they tell it.
pub(super) struct Handlers<O, R> {
    /// Each running task by its number. The numbers come from no one outside: a fast hasher,
    /// not a DoS-resistant one.
    running: FxHashMap<u64, Task<R>>,
    /// What the tasks tell.
    told: mpsc::UnboundedReceiver<Told<O>>,
    /// The sending side of `told`, for each new task's teller.
    tx: mpsc::UnboundedSender<Told<O>>,
    /// The number the next task gets.
    next_id: u64,
}

impl<O: Send + 'static, R> Handlers<O, R> {
    pub(super) fn new() -> Self {
        let (tx, told) = mpsc::unbounded_channel();
        Self {
            running: FxHashMap::default(),
            told,
            tx,
            next_id: 0,
        }
    }

    /// Tasks that have not told their end.
    pub(super) fn len(&self) -> usize {
        self.running.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Spawn the task `make` returns for its teller, keeping `what` about it.
    pub(super) fn spawn<F>(&mut self, what: R, make: impl FnOnce(Teller<O>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.next_id += 1;
        let id = self.next_id;
        let teller = Teller {
            id,
            tx: self.tx.clone(),
            ended: false,
        };
        let abort = tokio::spawn(make(teller)).abort_handle();
        self.running.insert(id, Task { abort, what });
    }

    /// What the loop keeps about running task `id`.
    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut R> {
        self.running.get_mut(&id).map(|t| &mut t.what)
    }

    /// Forget task `id` (it told its end); what the loop kept about it.
    pub(super) fn remove(&mut self, id: u64) -> Option<R> {
        self.running.remove(&id).map(|t| t.what)
    }

    /// What the loop keeps about each running task.
    pub(super) fn iter(&self) -> impl Iterator<Item = &R> {
        self.running.values().map(|t| &t.what)
    }

    /// The next thing a task tells. Pending forever while no task runs (the loop guards it).
    pub(super) async fn recv(&mut self) -> Told<O> {
        match self.told.recv().await {
            Some(told) => told,
            // `self.tx` keeps the channel open.
            None => std::future::pending().await,
        }
    }

    /// What a task told, if anything is waiting.
    pub(super) fn try_recv(&mut self) -> Option<Told<O>> {
        self.told.try_recv().ok()
    }

    /// Cancel every running task; each tells its end (`None`) as it is dropped.
    pub(super) fn abort_all(&self) {
        for t in self.running.values() {
            t.abort.abort();
        }
    }
}
