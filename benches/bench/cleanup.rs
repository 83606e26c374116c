//! Everything the bench declares on the shared broker is registered here and deleted at the
//! end, also on error, panic or Ctrl-C.

use std::sync::{Mutex, MutexGuard, PoisonError};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use prereq::amqp::{AmqpAddr, Route};

/// Queues and exchanges to delete, by [`Cleanup::run`] or, failing that, on drop (also when a
/// scenario panics).
pub struct Cleanup {
    addr: AmqpAddr,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl Cleanup {
    /// Nothing registered yet; deletes through its own connection to `addr`.
    pub fn new(addr: AmqpAddr) -> Self {
        Self {
            addr,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// A queue to delete.
    pub fn queue(&self, name: impl Into<String>) {
        lock(&self.queues).push(name.into());
    }

    /// An exchange to delete.
    pub fn exchange(&self, name: impl Into<String>) {
        lock(&self.exchanges).push(name.into());
    }

    /// Every queue and exchange `route` declares (its delay queues are made on demand: register
    /// them with [`Cleanup::queue`] from `AmqpTransport::delay_queues`).
    pub fn route(&self, route: &Route) {
        lock(&self.queues).extend(route.queue_names());
        lock(&self.exchanges).extend(route.exchange_names());
    }

    fn take(&self) -> (Vec<String>, Vec<String>) {
        let mut q = std::mem::take(&mut *lock(&self.queues));
        let mut x = std::mem::take(&mut *lock(&self.exchanges));
        q.sort();
        q.dedup();
        x.sort();
        x.dedup();
        (q, x)
    }

    /// Delete everything registered so far; returns how many queues were deleted.
    pub async fn run(&self) -> usize {
        let (queues, exchanges) = self.take();
        delete_all(&self.addr, &queues, &exchanges).await
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (queues, exchanges) = self.take();
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let addr = self.addr.clone();
        // Its own thread and runtime: works from any context, also while unwinding.
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(delete_all(&addr, &queues, &exchanges));
            }
        });
        let _ = worker.join();
    }
}

async fn delete_all(addr: &AmqpAddr, queues: &[String], exchanges: &[String]) -> usize {
    if queues.is_empty() && exchanges.is_empty() {
        return 0;
    }
    let Ok(conn) = Connection::connect(addr.expose(), ConnectionProperties::default()).await else {
        eprintln!("cleanup: broker unreachable, left queues {queues:?}, exchanges {exchanges:?}");
        return 0;
    };
    let mut deleted = 0;
    for q in queues {
        // A fresh channel each time: a failed delete closes its channel.
        if let Ok(ch) = conn.create_channel().await {
            match ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                Ok(_) => deleted += 1,
                Err(e) => eprintln!("cleanup: queue {q}: {e}"),
            }
            let _ = ch.close(200, "cleanup".into()).await;
        }
    }
    for x in exchanges {
        if let Ok(ch) = conn.create_channel().await {
            if let Err(e) = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await
            {
                eprintln!("cleanup: exchange {x}: {e}");
            }
            let _ = ch.close(200, "cleanup".into()).await;
        }
    }
    let _ = conn.close(200, "cleanup".into()).await;
    deleted
}

/// A mutex's contents, also after a panic elsewhere.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
