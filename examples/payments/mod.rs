//! The payment demo's consumer configuration, shared by the `consumer` example and the drills'
//! `drill_consumer` (which only adds a journal of what it handled): the same messages, the same
//! client store, the same route, policy and hold — what a user runs is what the drills prove.
#![allow(dead_code)] // each example uses its own subset

use std::fmt;
use std::time::Duration;

use prereq::amqp::payment_demo::{self, CLIENT_KEY, PaymentNames};
use prereq::amqp::{AmqpError, Broker, BrokerOptions, Partitions, Queue, Route, RouterReport};
use prereq::sql::SqlKeysError;
use prereq::{
    Backoff, ConsumerBuilder, DependentConsumer, Handler, HoldBudget, KeyError, KeySource, KeyWakes,
};
use serde::Deserialize;

/// A payment as the Go demo publishes it (`id` a number), or as other producers do (a string).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub id: PaymentId,
    pub client_id: u64,
    pub value: serde_json::Number,
    pub operation_date: String,
}

/// A payment id: the Go demo's is a number, other producers' may be a string.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum PaymentId {
    Number(u64),
    Text(String),
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(s) => f.write_str(s),
        }
    }
}

/// A client registration: `{"id":5,"name":"novo client"}`.
#[derive(Debug, Deserialize)]
pub struct Client {
    pub id: u64,
}

/// How many payments are processed at once.
pub const CONCURRENCY: usize = 8;

/// Where registered clients are kept: an SQLite file (the default), or PostgreSQL for several
/// instances.
#[derive(Clone)]
pub enum Clients {
    /// `PREREQ_DB` is a file (default `prereq-demo.db`).
    Sqlite(prereq::sql::SqliteKeys<u64>),
    /// `PREREQ_DB` is a `postgres://` URL.
    #[cfg(feature = "postgres")]
    Postgres(prereq::sql::PgKeys<u64>),
}

impl Clients {
    /// The store `PREREQ_DB` names: a `postgres://` URL, else an SQLite file (default
    /// `prereq-demo.db` in the working directory). Its table is `PREREQ_DB_TABLE` (default
    /// `clients`; in PostgreSQL also the `LISTEN`/`NOTIFY` channel, so that demos sharing one
    /// database keep apart).
    pub async fn from_env() -> Result<Self, Box<dyn std::error::Error>> {
        let db = std::env::var("PREREQ_DB").unwrap_or_else(|_| "prereq-demo.db".to_owned());
        let table = std::env::var("PREREQ_DB_TABLE").unwrap_or_else(|_| "clients".to_owned());
        if db.starts_with("postgres://") || db.starts_with("postgresql://") {
            return Self::postgres(&db, &table).await;
        }
        let keys = prereq::sql::SqliteKeys::builder(&db)
            .table(table)
            .open()
            .await?;
        Ok(Self::Sqlite(keys))
    }

    #[cfg(feature = "postgres")]
    async fn postgres(url: &str, table: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let keys = prereq::sql::PgKeys::builder(url)
            .table(table)
            .connect()
            .await?;
        Ok(Self::Postgres(keys))
    }

    #[cfg(not(feature = "postgres"))]
    async fn postgres(_url: &str, _table: &str) -> Result<Self, Box<dyn std::error::Error>> {
        Err("PREREQ_DB is a PostgreSQL URL: build with `--features postgres`".into())
    }
}

impl fmt::Display for Clients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(k) => write!(f, "SQLite {k:?}"),
            #[cfg(feature = "postgres")]
            Self::Postgres(k) => write!(f, "PostgreSQL, shared by every instance: {k:?}"),
        }
    }
}

impl KeySource<u64> for Clients {
    type Error = SqlKeysError;

    async fn contains(&self, key: &u64) -> Result<bool, KeyError<SqlKeysError>> {
        match self {
            Self::Sqlite(k) => k.contains(key).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(k) => k.contains(key).await,
        }
    }

    async fn insert(&self, key: &u64) -> Result<(), KeyError<SqlKeysError>> {
        match self {
            Self::Sqlite(k) => k.insert(key).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(k) => k.insert(key).await,
        }
    }

    fn subscribe(&self) -> KeyWakes<u64> {
        match self {
            Self::Sqlite(k) => k.subscribe(),
            #[cfg(feature = "postgres")]
            Self::Postgres(k) => k.subscribe(),
        }
    }
}

/// `PREREQ_PREFIX`: a prefix for every exchange and queue name (default none).
fn prefix() -> String {
    std::env::var("PREREQ_PREFIX").unwrap_or_default()
}

/// The demo's names, each prefixed with `PREREQ_PREFIX` (default none).
pub fn names() -> PaymentNames {
    PaymentNames::with_prefix(&prefix())
}

/// The demo's route on `names`.
pub fn route(names: &PaymentNames) -> Route {
    payment_demo::route(names)
}

/// `PREREQ_PARTITIONS`: when set to P > 0, this instance is one of a partitioned group of P
/// partitions named `payment-partitions` (with the prefix); unset or 0, the Go demo's queues
/// are consumed directly. Every instance of a group must be given the same P.
pub fn partitions() -> Result<Option<Partitions>, String> {
    let Ok(text) = std::env::var("PREREQ_PARTITIONS") else {
        return Ok(None);
    };
    let count: u32 = text.trim().parse().map_err(|_| {
        format!("PREREQ_PARTITIONS must be a number of partitions (1 to 1024), not {text:?}")
    })?;
    if count == 0 {
        return Ok(None);
    }
    if count > prereq::amqp::MAX_PARTITIONS {
        return Err(format!(
            "PREREQ_PARTITIONS is {count}: at most {} partitions",
            prereq::amqp::MAX_PARTITIONS
        ));
    }
    Ok(Some(Partitions::new(
        format!("{}payment-partitions", prefix()),
        count,
    )))
}

/// The partitioned route: this instance's share of the partitions (payments keyed by client),
/// client registrations from the demo's `clients-processor` queue (any instance records them
/// in the shared client store, which wakes every instance).
pub fn partitioned_route(names: &PaymentNames, partitions: &Partitions) -> Route {
    Route::partitioned(partitions.clone())
        .registrations(Queue::classic(&names.clients_queue).bound_to(names.clients(), CLIENT_KEY))
}

/// The client id of a payment body, as the routing key of its partition.
pub fn client_of(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Keyed {
        #[serde(rename = "clientId")]
        client_id: u64,
    }
    serde_json::from_slice::<Keyed>(body)
        .map(|k| k.client_id.to_string())
        .map_err(|e| format!("no client id: {e}"))
}

/// The ingress router of a partitioned group: the Go demo's producer publishes payments to
/// `payment-processor` without the client in the routing key; one instance at a time (the
/// others stand by) re-publishes each to its client's partition, confirmed before its ack. The
/// demo's topology is declared first, as the plain consumer declares it, so that `payments`
/// gets the delay mechanism's type.
pub async fn route_payments(
    broker: &Broker,
    names: &PaymentNames,
    partitions: &Partitions,
    shutdown: impl std::future::Future,
) -> Result<RouterReport, AmqpError> {
    broker.declare(&payment_demo::route(names)).await?;
    prereq::amqp::route_by_key(
        broker,
        Queue::classic(&names.payments_queue),
        partitions,
        client_of,
        shutdown,
    )
    .await
}

/// What runs beside this instance's consumer: when partitioned (`PREREQ_PARTITIONS`), the
/// ingress router, until [`Instance::finish`].
pub struct Instance {
    /// The group's partitions, when partitioned.
    pub partitions: Option<Partitions>,
    /// The router task (partitioned only).
    router: Option<tokio::task::JoinHandle<Result<RouterReport, AmqpError>>>,
    /// Stops the router.
    stop: tokio_util::sync::CancellationToken,
}

impl Instance {
    /// Declare and open this instance's route, plain or partitioned, and start the router when
    /// partitioned.
    pub async fn start(
        broker: &Broker,
        names: &PaymentNames,
        clients: &Clients,
    ) -> Result<(prereq::amqp::AmqpTransport, Self), Box<dyn std::error::Error>> {
        let partitions = partitions()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let Some(p) = partitions.clone() else {
            let transport = broker.transport(route(names)).await?;
            let instance = Self {
                partitions,
                router: None,
                stop,
            };
            return Ok((transport, instance));
        };
        shared_store(clients)?;
        let transport = broker.transport(partitioned_route(names, &p)).await?;
        let router = {
            let (broker, names, stop) = (broker.clone(), names.clone(), stop.clone());
            tokio::spawn(async move {
                let routed = route_payments(&broker, &names, &p, stop.cancelled_owned()).await;
                if let Err(e) = &routed {
                    // Said at once, not only at the stop: this instance routes no more (another
                    // instance's router, standing by, takes over).
                    eprintln!(
                        "the router of {} stopped: {e}; this instance no longer routes payments",
                        names.payments_queue
                    );
                }
                routed
            })
        };
        let instance = Self {
            partitions,
            router: Some(router),
            stop,
        };
        Ok((transport, instance))
    }

    /// Stop the router (if any) and say what it did.
    pub async fn finish(self) -> Result<Option<RouterReport>, String> {
        self.stop.cancel();
        match self.router {
            None => Ok(None),
            Some(task) => match task.await {
                Ok(Ok(report)) => Ok(Some(report)),
                Ok(Err(e)) => Err(format!("the router stopped: {e}")),
                Err(e) => Err(format!("the router task failed: {e}")),
            },
        }
    }
}

/// Partitioned instances share what they know: the client store must be PostgreSQL.
pub fn shared_store(clients: &Clients) -> Result<(), String> {
    match clients {
        Clients::Sqlite(_) => Err(
            "PREREQ_PARTITIONS needs a client store every instance shares: set PREREQ_DB to a \
             postgres:// URL (and build with --features postgres)"
                .to_owned(),
        ),
        #[cfg(feature = "postgres")]
        Clients::Postgres(_) => Ok(()),
    }
}

/// Connect to `AMQP_ADDR` (default: the local broker).
pub async fn connect(connection_name: &str) -> Result<Broker, AmqpError> {
    Broker::connect(BrokerOptions::from_env().connection_name(connection_name)).await
}

/// The demo's consumer: payments keyed by client, registrations from client messages, clients
/// recorded in `clients`, the Go demo's linear 1 s backoff with 10 attempts, and a short hold
/// (`PREREQ_HOLD_MS`, default 5 s: a payment whose client comes later is deferred through the
/// broker and held again on return).
pub fn consumer<A>(
    clients: Clients,
    handler: impl Handler<u64, Payment, A>,
) -> ConsumerBuilder<u64, Payment> {
    let hold = std::env::var("PREREQ_HOLD_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(5), Duration::from_millis);
    DependentConsumer::builder(|p: &Payment| p.client_id, handler)
        .id(|p: &Payment| p.id.to_string())
        .registrations(|c: &Client| c.id)
        .keys(clients)
        .policy(Backoff::linear(Duration::from_secs(1)).max_attempts(10))
        .budget(HoldBudget::DEFAULT.max_time(hold))
        .concurrency(CONCURRENCY)
}
