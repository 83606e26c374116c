//! Shared helpers for the RabbitMQ integration tests: connect-or-skip, unique names, cleanup
//! that runs even when a test fails, a TCP proxy that can cut connections, and a publisher.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use prereq::amqp::AmqpAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The broker address for tests (`AMQP_ADDR`, else the local default).
pub fn addr() -> AmqpAddr {
    AmqpAddr::from_env()
}

/// Connect prereq to the broker under test as `name` (its connection's name), with delay queues
/// forced: the tests run on brokers with and without the delayed-message plugin. Panics if the
/// broker refuses (call [`broker`] first, which skips or fails with the reason).
#[allow(dead_code, reason = "not every test binary connects so")]
pub async fn connect(name: impl Into<String>) -> prereq::amqp::Broker {
    let name = name.into();
    prereq::amqp::Broker::connect(
        prereq::amqp::BrokerOptions::new(addr())
            .delay_mode(prereq::amqp::DelayMode::DelayQueues)
            .connection_name(name.as_str()),
    )
    .await
    .unwrap_or_else(|e| panic!("connect as {name}: {e}"))
}

/// Connect to the broker, or explain why the test is skipped. Under
/// `PREREQ_REQUIRE_BROKER=1` an unreachable broker fails the test instead.
pub async fn broker() -> Option<Connection> {
    let addr = addr();
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(addr.expose(), ConnectionProperties::default()),
    )
    .await;
    let error = match attempt {
        Ok(Ok(conn)) => return Some(conn),
        Ok(Err(e)) => addr.scrub(&e.to_string()),
        Err(_) => "timed out after 10 s".to_owned(),
    };
    let reason = format!("RabbitMQ at {addr} unreachable: {error}");
    if std::env::var("PREREQ_REQUIRE_BROKER").as_deref() == Ok("1") {
        panic!("PREREQ_REQUIRE_BROKER=1 but {reason}");
    }
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing
    // tests, and a skip must be seen.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "skipping a broker test: {reason} (set PREREQ_REQUIRE_BROKER=1 to make this a failure)"
    );
    None
}

/// A name prefix unique to this run and call: `prereq-test.<tag>.<pid>.<nanos>.<n>.`.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "prereq-test.{tag}.{}.{nanos}.{}.",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The payment examples' policy (`examples/payments`): linear 1 s, 10 attempts; for
/// [`Cleanup::delay_queues`] of tests that run the examples.
pub const EXAMPLE_POLICY: prereq::Backoff =
    prereq::Backoff::linear(Duration::from_secs(1)).max_attempts(10);

/// Deletes every queue and exchange registered with it when dropped — also when the test
/// panics. Deletion runs on its own thread and runtime, so it works from any context.
#[derive(Default)]
pub struct Cleanup {
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
    /// Prefixes (delay queues' and members exchanges'): every queue named `<prefix>.…` is
    /// deleted too (a jittered delay or an incarnation makes names not known in advance), where
    /// `rabbitmqctl` sees the broker under test.
    prefixes: Mutex<Vec<String>>,
}

/// The queues of the broker under test whose names start with one of `prefixes`, from
/// `rabbitmqctl` (nothing where it cannot run, or talks to another broker than the local one).
fn queues_named(prefixes: &[String]) -> Vec<String> {
    if prefixes.is_empty() {
        return Vec::new();
    }
    let Some(all) = listed_queues() else {
        return Vec::new();
    };
    all.into_iter()
        .filter(|name| prefixes.iter().any(|p| name.starts_with(&format!("{p}."))))
        .collect()
}

/// The queues of the broker under test named `<prefix>.…`, from `rabbitmqctl`; `None` where it
/// cannot run, or talks to another broker than the local one (the reason is printed).
#[allow(dead_code, reason = "not every test binary looks")]
pub fn queues_under(prefix: &str) -> Option<Vec<String>> {
    let Some(all) = listed_queues() else {
        eprintln!("rabbitmqctl does not see the broker under test: its queues are not listed");
        return None;
    };
    Some(
        all.into_iter()
            .filter(|name| name.starts_with(&format!("{prefix}.")))
            .collect(),
    )
}

/// Every queue of the broker under test, where `rabbitmqctl` runs and talks to it.
fn listed_queues() -> Option<Vec<String>> {
    // `rabbitmqctl` talks to the local node: only when that is the broker under test.
    let local = match std::env::var("AMQP_ADDR") {
        Err(_) => true,
        Ok(addr) => url::Url::parse(addr.trim()).is_ok_and(|u| {
            matches!(u.host_str(), Some("127.0.0.1" | "localhost"))
                && u.port_or_known_default().unwrap_or(5672) == 5672
        }),
    };
    if !local {
        return None;
    }
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .map(str::to_owned)
            .collect(),
    )
}

impl Cleanup {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn queue(&self, name: impl Into<String>) -> &Self {
        self.queues.lock().unwrap().push(name.into());
        self
    }

    pub fn exchange(&self, name: impl Into<String>) -> &Self {
        self.exchanges.lock().unwrap().push(name.into());
        self
    }

    /// Register a group's members exchange and its members' queues
    /// (`<exchange>.<member>.<incarnation>`; auto-delete, so gone with their consumers, unless a
    /// test ends before its members left).
    pub fn members(&self, exchange: &str) -> &Self {
        self.exchange(exchange);
        self.prefixes.lock().unwrap().push(exchange.to_owned());
        self
    }

    /// Register every queue and exchange a route declares (not its delay queues: see
    /// [`Cleanup::delay_queues`]).
    pub fn route(&self, route: &prereq::amqp::Route) -> &Self {
        for q in route.queue_names() {
            self.queue(q);
        }
        for x in route.exchange_names() {
            self.exchange(x);
        }
        self
    }

    /// Register the delay queues (and their exchange) a route may need for the delays of
    /// `policy`'s first 20 attempts, on the delay-queue path.
    pub fn delay_queues(&self, route: &prereq::amqp::Route, policy: &impl prereq::Policy) -> &Self {
        for attempt in 1..=20 {
            if let Some(d) = policy.delay_for(attempt, 0) {
                // Whole milliseconds up to 10 s are exact delay buckets; other delays are
                // rounded by the transport: list both neighbours.
                let ms = d.as_millis();
                for v in [ms, ms.saturating_sub(1), ms + 1] {
                    self.queue(format!("{}.{v}ms", route.delay_prefix()));
                }
            }
        }
        self.exchange(route.delay_prefix());
        self.prefixes
            .lock()
            .unwrap()
            .push(route.delay_prefix().to_owned());
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut queues =
            std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        let mut exchanges =
            std::mem::take(&mut *self.exchanges.lock().unwrap_or_else(|e| e.into_inner()));
        let prefixes =
            std::mem::take(&mut *self.prefixes.lock().unwrap_or_else(|e| e.into_inner()));
        queues.extend(queues_named(&prefixes));
        queues.sort();
        queues.dedup();
        exchanges.sort();
        exchanges.dedup();
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let addr = addr();
                let Ok(conn) =
                    Connection::connect(addr.expose(), ConnectionProperties::default()).await
                else {
                    eprintln!("cleanup: broker unreachable, left {queues:?} {exchanges:?}");
                    return;
                };
                for q in &queues {
                    // A fresh channel each time: a failed delete closes its channel.
                    if let Ok(ch) = conn.create_channel().await {
                        match ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await
                        {
                            Ok(_) => close_channel(&ch).await,
                            Err(e) => eprintln!("cleanup: queue {q}: {e}"),
                        }
                    }
                }
                for x in &exchanges {
                    if let Ok(ch) = conn.create_channel().await {
                        match ch
                            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                            .await
                        {
                            Ok(()) => close_channel(&ch).await,
                            Err(e) => eprintln!("cleanup: exchange {x}: {e}"),
                        }
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        });
        let _ = worker.join();
    }
}

/// Close a channel and wait for the broker's answer. A channel only dropped is closed by lapin
/// in the background, and a connection closed meanwhile makes lapin log a connection error.
async fn close_channel(ch: &Channel) {
    let _ = ch.close(200, "cleanup".into()).await;
}

/// A header as text (short or long string).
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        lapin::types::AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        _ => None,
    }
}

/// A header as an integer, whatever its width.
pub fn header_int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    use lapin::types::AMQPValue as V;
    Some(match headers?.inner().get(name)? {
        V::ShortShortInt(v) => i64::from(*v),
        V::ShortShortUInt(v) => i64::from(*v),
        V::ShortInt(v) => i64::from(*v),
        V::ShortUInt(v) => i64::from(*v),
        V::LongInt(v) => i64::from(*v),
        V::LongUInt(v) => i64::from(*v),
        V::LongLongInt(v) => *v,
        V::Timestamp(v) => i64::try_from(*v).ok()?,
        _ => return None,
    })
}

/// A transport for `route` on the broker under test, with delay mechanism `mode`, consuming
/// with the prefetch of `demand`; everything the route declares is registered with `cleanup`.
pub async fn transport(
    cleanup: &Cleanup,
    route: prereq::amqp::Route,
    mode: prereq::amqp::DelayMode,
    demand: prereq::transport::Demand,
) -> prereq::amqp::AmqpTransport {
    use prereq::transport::Transport;
    let transport = unstarted_transport(cleanup, route, mode).await;
    transport.start(demand).await.expect("consume");
    transport
}

/// As [`transport`], not started: for a consumer, which starts it with the prefetch its budget
/// asks for.
#[allow(
    dead_code,
    reason = "not every test binary runs a consumer on its own transport"
)]
pub async fn unstarted_transport(
    cleanup: &Cleanup,
    route: prereq::amqp::Route,
    mode: prereq::amqp::DelayMode,
) -> prereq::amqp::AmqpTransport {
    cleanup.route(&route);
    prereq::amqp::Broker::connect(prereq::amqp::BrokerOptions::new(addr()).delay_mode(mode))
        .await
        .expect("connect")
        .transport(route)
        .await
        .expect("declare the route")
}

/// A channel in confirm mode, for publishing test messages.
pub async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    ch
}

/// Publish and wait for the broker's confirm; panics if the message is unroutable or nacked.
pub async fn publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(
        confirm,
        Confirmation::Ack(None),
        "publish to {exchange:?}/{routing_key:?} not confirmed"
    );
}

/// Poll a queue with `basic.get` until a message arrives or `timeout` passes.
pub async fn get_one(
    ch: &Channel,
    queue: &str,
    timeout: Duration,
) -> Option<lapin::message::BasicGetMessage> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get");
        if got.is_some() || tokio::time::Instant::now() >= deadline {
            return got;
        }
        // Polling interval of basic.get: there is no event to wait on for an empty queue.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many messages the queue `name` holds ready; `None` while it does not exist. (A passive
/// declare on a channel of its own: a miss closes the channel.)
pub async fn ready_if_exists(conn: &lapin::Connection, name: &str) -> Option<u32> {
    let ch = conn.create_channel().await.ok()?;
    let q = ch
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = ch.close(200, "counted".into()).await;
    Some(q.message_count())
}

/// How many ready messages a queue holds.
pub async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

/// A TCP proxy in front of the broker whose connections can be cut, to drop a client's
/// connection the way a network failure would.
pub struct Proxy {
    pub port: u16,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listen on a free local port and forward to the broker of `addr`.
    pub async fn start(addr: &AmqpAddr) -> Self {
        let target = host_port(addr.expose());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept_links = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                accept_links.lock().unwrap().push(link);
            }
        });
        Self {
            port,
            links,
            accept,
        }
    }

    /// `addr` with its host and port replaced by this proxy's.
    pub fn addr(&self, addr: &AmqpAddr) -> AmqpAddr {
        let uri = addr.expose();
        let hp = host_port(uri);
        AmqpAddr::new(uri.replacen(&hp, &format!("127.0.0.1:{}", self.port), 1))
    }

    /// Close every connection that goes through the proxy (new ones are still accepted).
    pub fn cut(&self) -> usize {
        let links: Vec<_> = self.links.lock().unwrap().drain(..).collect();
        let n = links.len();
        for l in links {
            l.abort();
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `host:port` of an AMQP URI (port 5672 when absent).
fn host_port(uri: &str) -> String {
    let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or(uri);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    }
}

/// Wait for the first item of `rx` that `pred` accepts, up to `timeout`; every item seen is
/// returned too (in order), for diagnostics.
pub async fn wait_for<T: Clone + std::fmt::Debug>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    timeout: Duration,
    mut pred: impl FnMut(&T) -> bool,
    seen: &mut Vec<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => {
                seen.push(item.clone());
                if pred(&item) {
                    return item;
                }
            }
            Ok(None) => panic!("event stream closed; seen: {seen:#?}"),
            Err(_) => panic!("timed out after {timeout:?}; seen: {seen:#?}"),
        }
    }
}

/// Log to stderr under `RUST_LOG` (for diagnosing a failing test); harmless if called twice.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Every `prereq` log line at `info` and above, captured for the whole test binary (a global
/// subscriber, installed by the first call): tests look for lines naming their own unique queues.
pub fn captured_logs() -> &'static CapturedLogs {
    static LOGS: std::sync::OnceLock<CapturedLogs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("prereq=info"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
}

/// What [`captured_logs`] collected.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// The lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes; panics naming `what`.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        // Polling interval: the state polled has no change notification.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub mod payments {
    //! The payment scenario against the real broker: the demo's topology under a unique
    //! prefix, a publisher, and a running `DependentConsumer` whose events a test can await.

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Channel, Connection};
    use prereq::amqp::payment_demo::{self, CLIENT_KEY, PROCESS_KEY, PaymentNames};
    use prereq::amqp::{Broker, BrokerOptions, DelayMode};
    use prereq::{Backoff, DeadLetter, Decision, DependentConsumer, Event, HoldBudget, Report};
    use serde::{Deserialize, Serialize};
    use tokio::sync::{mpsc, oneshot};

    use super::Cleanup;

    /// A payment as the original demo sends it.
    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct Payment {
        pub id: String,
        pub client_id: u64,
        pub value: f64,
        pub operation_date: String,
    }

    /// A client registration as the original demo sends it.
    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct Client {
        pub id: u64,
        pub name: String,
    }

    pub fn payment(id: &str, client_id: u64) -> Payment {
        Payment {
            id: id.to_owned(),
            client_id,
            value: 12.5,
            operation_date: "2024-05-01T12:00:00Z".to_owned(),
        }
    }

    /// Publish payment `id` of `client` to the demo route's payments exchange (message id `id`,
    /// persistent, JSON), confirmed.
    pub async fn publish_payment(ch: &Channel, names: &PaymentNames, id: &str, client: u64) {
        let props = BasicProperties::default()
            .with_message_id(id.into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let body = serde_json::to_vec(&payment(id, client)).unwrap();
        super::publish(ch, &names.payments_exchange, PROCESS_KEY, &body, props).await;
    }

    /// Register client `id` on the demo route's clients exchange, confirmed.
    pub async fn register(ch: &Channel, names: &PaymentNames, id: u64) {
        let body = serde_json::to_vec(&Client {
            id,
            name: format!("client {id}"),
        })
        .unwrap();
        super::publish(
            ch,
            &names.clients_exchange,
            CLIENT_KEY,
            &body,
            BasicProperties::default(),
        )
        .await;
    }

    /// The headers the Go demo's producer gives a new payment: `x-delay: 0`, `x-retry: 0`,
    /// `x-retry-limit: limit`, all 32-bit integers (AMQP type `I`).
    pub fn demo_headers(limit: u32) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert("x-delay".into(), AMQPValue::LongInt(0));
        headers.insert("x-retry".into(), AMQPValue::LongInt(0));
        headers.insert(
            "x-retry-limit".into(),
            AMQPValue::LongInt(i32::try_from(limit).unwrap_or(i32::MAX)),
        );
        headers
    }

    /// A consumer running on the demo topology (prefixed), and what it did.
    pub struct Scenario {
        pub names: PaymentNames,
        pub events: mpsc::UnboundedReceiver<Event<u64>>,
        pub handled: Arc<Mutex<Vec<String>>>,
        pub publisher: Channel,
        pub seen: Vec<Event<u64>>,
        stop: Option<oneshot::Sender<()>>,
        run: Option<
            tokio::task::JoinHandle<Result<Report, prereq::RunError<prereq::amqp::AmqpError>>>,
        >,
        // Last: dropped after the consumer is stopped.
        _cleanup: Cleanup,
    }

    impl Scenario {
        /// Start a consumer with this policy and hold budget on a fresh prefixed topology.
        pub async fn start(
            conn: &Connection,
            tag: &str,
            policy: Backoff,
            budget: HoldBudget,
        ) -> Self {
            let cleanup = Cleanup::new();
            let names = PaymentNames::with_prefix(&super::unique(tag));
            let concurrency = 4;
            let route = payment_demo::route(&names);
            cleanup.route(&route).delay_queues(&route, &policy);
            // Whichever mechanism the broker offers (the plugin where it has it).
            let transport =
                Broker::connect(BrokerOptions::new(super::addr()).delay_mode(DelayMode::Auto))
                    .await
                    .expect("connect")
                    .transport(route)
                    .await
                    .expect("declare the route");

            let (tx, events) = mpsc::unbounded_channel();
            let handled: Arc<Mutex<Vec<String>>> = Arc::default();
            let h = handled.clone();
            let consumer = DependentConsumer::builder(
                |p: &Payment| p.client_id,
                move |p: Payment| {
                    let h = h.clone();
                    async move {
                        h.lock().unwrap().push(p.id);
                        Ok(())
                    }
                },
            )
            .id(|p: &Payment| p.id.clone())
            .registrations(|c: &Client| c.id)
            .policy(policy)
            .budget(budget)
            .concurrency(concurrency)
            .on_event(move |e: &Event<u64>| {
                let _ = tx.send(e.clone());
            })
            .build();
            let (stop, stop_rx) = oneshot::channel::<()>();
            let run = tokio::spawn(consumer.run(transport, async move {
                let _ = stop_rx.await;
            }));
            let publisher = super::confirm_channel(conn).await;
            Self {
                names,
                events,
                handled,
                publisher,
                seen: Vec::new(),
                stop: Some(stop),
                run: Some(run),
                _cleanup: cleanup,
            }
        }

        /// Publish a payment the way the demo's producer does (`x-delay: 0`, `x-retry: 0`,
        /// `x-retry-limit: limit`, 32-bit integers).
        pub async fn publish_payment(&self, p: &Payment, limit: u32) {
            self.publish_raw_payment(&serde_json::to_vec(p).unwrap(), &p.id, demo_headers(limit))
                .await;
        }

        /// Publish any body as a payment.
        pub async fn publish_raw_payment(&self, body: &[u8], id: &str, headers: FieldTable) {
            let props = BasicProperties::default()
                .with_headers(headers)
                .with_message_id(id.into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            super::publish(
                &self.publisher,
                &self.names.payments_exchange,
                PROCESS_KEY,
                body,
                props,
            )
            .await;
        }

        /// Register a client.
        pub async fn register(&self, c: &Client) {
            let props = BasicProperties::default().with_delivery_mode(2);
            super::publish(
                &self.publisher,
                &self.names.clients_exchange,
                CLIENT_KEY,
                &serde_json::to_vec(c).unwrap(),
                props,
            )
            .await;
        }

        /// Wait for an event `pred` accepts.
        pub async fn wait(
            &mut self,
            timeout: Duration,
            pred: impl FnMut(&Event<u64>) -> bool,
        ) -> Event<u64> {
            super::wait_for(&mut self.events, timeout, pred, &mut self.seen).await
        }

        /// Wait for the first dead letter; returns its event and its reason.
        pub async fn dead_letter(&mut self, timeout: Duration) -> (Event<u64>, DeadLetter) {
            let event = self
                .wait(timeout, |e| matches!(e.decision, Decision::DeadLettered(_)))
                .await;
            match &event.decision {
                Decision::DeadLettered(dl) => {
                    let dl = dl.clone();
                    (event, dl)
                }
                other => panic!("waited for a dead letter, got {other:?}"),
            }
        }

        /// Stop the consumer gracefully and return its report.
        pub async fn stop(mut self) -> Report {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            let run = self.run.take().expect("running");
            tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .expect("consumer stops in time")
                .expect("consumer task")
                .expect("consumer run")
        }
    }

    /// A payment consumer (keyed by client, registrations from clients, the payment id as
    /// message id) running on a transport the test made, and what it did.
    pub struct Running {
        pub events: mpsc::UnboundedReceiver<Event<u64>>,
        pub handled: Arc<Mutex<Vec<String>>>,
        pub seen: Vec<Event<u64>>,
        stop: Option<oneshot::Sender<()>>,
        run: Option<
            tokio::task::JoinHandle<Result<Report, prereq::RunError<prereq::amqp::AmqpError>>>,
        >,
    }

    impl Running {
        /// Run the payment consumer on `transport`, with `policy`, `budget` and key order kept
        /// or not; every handled payment id is recorded.
        pub fn start(
            transport: prereq::amqp::AmqpTransport,
            policy: Backoff,
            budget: HoldBudget,
            keep_order: bool,
        ) -> Self {
            Self::start_with(transport, policy, budget, keep_order, |b| b)
        }

        /// As [`Running::start`], with `more` configuring the consumer further.
        pub fn start_with(
            transport: prereq::amqp::AmqpTransport,
            policy: Backoff,
            budget: HoldBudget,
            keep_order: bool,
            more: impl FnOnce(
                prereq::ConsumerBuilder<u64, Payment>,
            ) -> prereq::ConsumerBuilder<u64, Payment>,
        ) -> Self {
            let (tx, events) = mpsc::unbounded_channel();
            let handled: Arc<Mutex<Vec<String>>> = Arc::default();
            let h = handled.clone();
            let consumer = DependentConsumer::builder(
                |p: &Payment| p.client_id,
                move |p: Payment| {
                    let h = h.clone();
                    async move {
                        h.lock().unwrap().push(p.id);
                        Ok(())
                    }
                },
            )
            .id(|p: &Payment| p.id.clone())
            .registrations(|c: &Client| c.id)
            .policy(policy)
            .budget(budget)
            .keep_key_order(keep_order)
            .concurrency(4)
            .on_event(move |e: &Event<u64>| {
                let _ = tx.send(e.clone());
            });
            let consumer = more(consumer).build();
            let (stop, stop_rx) = oneshot::channel::<()>();
            let run = tokio::spawn(consumer.run(transport, async move {
                let _ = stop_rx.await;
            }));
            Self {
                events,
                handled,
                seen: Vec::new(),
                stop: Some(stop),
                run: Some(run),
            }
        }

        /// Wait for an event `pred` accepts.
        pub async fn wait(
            &mut self,
            timeout: Duration,
            pred: impl FnMut(&Event<u64>) -> bool,
        ) -> Event<u64> {
            super::wait_for(&mut self.events, timeout, pred, &mut self.seen).await
        }

        /// The payment ids handled so far, in order.
        pub fn handled(&self) -> Vec<String> {
            self.handled.lock().unwrap().clone()
        }

        /// Stop the consumer gracefully; its result (a report, or the error it ended with).
        pub async fn stop(mut self) -> Result<Report, prereq::RunError<prereq::amqp::AmqpError>> {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            self.join().await
        }

        /// Tell the consumer to stop, without waiting for it (see [`Running::join`]).
        pub fn signal_stop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }

        /// Wait (up to 60 s) for the consumer to end by itself; its result.
        pub async fn join(&mut self) -> Result<Report, prereq::RunError<prereq::amqp::AmqpError>> {
            let run = self.run.take().expect("running");
            tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .expect("consumer ends in time")
                .expect("consumer task")
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(run) = self.run.take() {
                run.abort();
            }
        }
    }

    impl Drop for Scenario {
        fn drop(&mut self) {
            if let Some(run) = self.run.take() {
                run.abort();
            }
        }
    }
}
