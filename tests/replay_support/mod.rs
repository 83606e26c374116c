//! Helpers for the dead-letter replay tests, self-contained (they use none of prereq's engine
//! or transport): connect-or-skip, unique names, cleanup that runs even when a test fails, a
//! service topology with its dead-letter queue, dead letters built the way prereq writes them
//! (typed header values), draining queues with a deadline, and a proxy that delays the broker.
//!
//! Include with `mod replay_support;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use prereq::amqp::{AmqpAddr, headers};

/// The broker address for tests (`AMQP_ADDR`, else the local default).
pub fn addr() -> AmqpAddr {
    AmqpAddr::from_env()
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
    // Straight to the process's stderr: the harness captures the output of passing tests.
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

/// Deletes every queue and exchange registered with it when dropped — also when the test
/// panics — on its own thread, runtime and connection.
#[derive(Default)]
pub struct Cleanup {
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl Cleanup {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn queue(&self, name: impl Into<String>) -> &Self {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.into());
        self
    }

    pub fn exchange(&self, name: impl Into<String>) -> &Self {
        self.exchanges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.into());
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        let exchanges =
            std::mem::take(&mut *self.exchanges.lock().unwrap_or_else(|e| e.into_inner()));
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                eprintln!("cleanup: no runtime, left {queues:?} {exchanges:?}");
                return;
            };
            rt.block_on(async move {
                let addr = addr();
                let Ok(Ok(conn)) = tokio::time::timeout(
                    Duration::from_secs(10),
                    Connection::connect(addr.expose(), ConnectionProperties::default()),
                )
                .await
                else {
                    eprintln!("cleanup: broker unreachable, left {queues:?} {exchanges:?}");
                    return;
                };
                for q in &queues {
                    // A fresh channel each time: a failed delete closes its channel.
                    if let Ok(ch) = conn.create_channel().await
                        && let Err(e) = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await
                    {
                        eprintln!("cleanup: queue {q}: {e}");
                    }
                }
                for x in &exchanges {
                    if let Ok(ch) = conn.create_channel().await
                        && let Err(e) = ch
                            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                            .await
                        && !e.to_string().contains("NOT_FOUND")
                    {
                        eprintln!("cleanup: exchange {x}: {e}");
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        });
        let _ = worker.join();
    }
}

/// A channel in confirm mode, for publishing test messages.
pub async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    ch
}

/// Publish (`mandatory`) and wait for the broker's confirm; panics if the message is
/// unroutable or nacked.
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

/// How many ready messages a queue holds.
pub async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

/// An integer header, whatever its width; `None` if absent or not an integer.
pub fn header_int(h: Option<&FieldTable>, name: &str) -> Option<i64> {
    Some(match h?.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    })
}

/// A string header; `None` if absent or not a string.
pub fn header_str(h: Option<&FieldTable>, name: &str) -> Option<String> {
    match h?.inner().get(name)? {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// The routing key the service's queue is bound with.
pub const ROUTING_KEY: &str = "process.payment";

/// A service's exchange and queue, and the queue's dead-letter queue (durable quorum, as
/// prereq declares it), all under a unique prefix and deleted on drop.
pub struct Fixture {
    pub exchange: String,
    pub work: String,
    pub dlq: String,
    pub ch: Channel,
    _cleanup: Cleanup,
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

impl Fixture {
    pub async fn new(conn: &Connection, tag: &str) -> Self {
        let cleanup = Cleanup::new();
        let p = unique(tag);
        let exchange = format!("{p}payments");
        let work = format!("{p}work");
        let dlq = format!("{work}.dead");
        cleanup.exchange(&exchange).queue(&work).queue(&dlq);
        let ch = confirm_channel(conn).await;
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
        for q in [&work, &dlq] {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                quorum(),
            )
            .await
            .expect("declare queue");
        }
        ch.queue_bind(
            work.as_str().into(),
            exchange.as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        Self {
            exchange,
            work,
            dlq,
            ch,
            _cleanup: cleanup,
        }
    }

    /// Publish dead letters to the dead-letter queue (confirmed).
    pub async fn dead_letters(&self, letters: &[Dead]) {
        for d in letters {
            let (body, props) = d.message(&self.exchange);
            publish(&self.ch, "", &self.dlq, &body, props).await;
        }
    }
}

/// A dead letter as prereq writes it.
#[derive(Clone, Debug)]
pub struct Dead {
    pub id: String,
    pub kind: &'static str,
    pub client: u64,
    /// Body override (e.g. not JSON); default `{"id":…,"clientId":…,"client":{"id":…}}`.
    pub body: Option<Vec<u8>>,
    /// Without the origin headers.
    pub no_origin: bool,
    /// Origin exchange override (default: the fixture's exchange).
    pub exchange: Option<String>,
    /// Origin routing key override (default [`ROUTING_KEY`]).
    pub routing_key: Option<String>,
    pub dead_lettered_at: i64,
}

impl Dead {
    pub fn new(id: impl Into<String>, kind: &'static str, client: u64) -> Self {
        Self {
            id: id.into(),
            kind,
            client,
            body: None,
            no_origin: false,
            exchange: None,
            routing_key: None,
            dead_lettered_at: 1_714_564_800_000,
        }
    }

    pub fn body(&self) -> Vec<u8> {
        self.body.clone().unwrap_or_else(|| {
            format!(
                r#"{{"id":"{}","clientId":{},"client":{{"id":"c{}"}},"value":12.5}}"#,
                self.id, self.client, self.client
            )
            .into_bytes()
        })
    }

    fn message(&self, exchange: &str) -> (Vec<u8>, BasicProperties) {
        let long = |s: &str| AMQPValue::LongString(LongString::from(s));
        let mut h = FieldTable::default();
        h.insert(headers::DEAD_LETTER_KIND.into(), long(self.kind));
        let reason = format!("{} for client {}", self.kind, self.client);
        h.insert(headers::DEAD_LETTER_REASON.into(), long(&reason));
        h.insert(headers::LAST_ERROR.into(), long(&reason));
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongInt(10));
        h.insert(
            headers::DEAD_LETTERED_AT.into(),
            AMQPValue::LongLongInt(self.dead_lettered_at),
        );
        h.insert(
            headers::FIRST_SEEN.into(),
            AMQPValue::LongLongInt(self.dead_lettered_at - 60_000),
        );
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongInt(10));
        h.insert(headers::RETRY.into(), AMQPValue::LongInt(10));
        h.insert(headers::RETRY_LIMIT.into(), AMQPValue::LongInt(10));
        h.insert("tenant".into(), long("acme"));
        if !self.no_origin {
            h.insert(
                headers::ORIGINAL_EXCHANGE.into(),
                long(self.exchange.as_deref().unwrap_or(exchange)),
            );
            h.insert(
                headers::ORIGINAL_ROUTING_KEY.into(),
                long(self.routing_key.as_deref().unwrap_or(ROUTING_KEY)),
            );
        }
        let props = BasicProperties::default()
            .with_headers(h)
            .with_message_id(self.id.as_str().into())
            .with_correlation_id(format!("corr-{}", self.id).as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        (self.body(), props)
    }
}

/// `n` dead letters `<tag>-0`…: kinds in turn key-never-arrived, retries-exhausted, rejected,
/// undecodable (its body not JSON); client `i % 7`.
pub fn mixed(tag: &str, n: usize) -> Vec<Dead> {
    const KINDS: [&str; 4] = [
        "key-never-arrived",
        "retries-exhausted",
        "rejected",
        "undecodable",
    ];
    (0..n)
        .map(|i| {
            let kind = KINDS[i % 4];
            let mut d = Dead::new(format!("{tag}-{i}"), kind, (i % 7) as u64);
            if kind == "undecodable" {
                d.body = Some(format!("not json {i}").into_bytes());
            }
            d.dead_lettered_at += i as i64 * 1000;
            d
        })
        .collect()
}

/// A message taken from a queue.
#[derive(Clone, Debug)]
pub struct Got {
    pub id: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl Got {
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }
}

/// Take (auto-ack) every ready message of `queue` now.
pub async fn take_all(ch: &Channel, queue: &str) -> Vec<Got> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        let d = m.delivery;
        out.push(Got {
            id: d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
            body: d.data,
            properties: d.properties,
        });
    }
    out
}

/// Take messages from `queue` until `expected` were taken, polling up to `timeout` (messages
/// given back by a closed connection reach the queue a moment after the close); then one more
/// look for extras. Panics with what was seen if fewer arrive.
pub async fn take_exactly(ch: &Channel, queue: &str, expected: usize) -> Vec<Got> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    loop {
        got.extend(take_all(ch, queue).await);
        if got.len() >= expected {
            got.extend(take_all(ch, queue).await);
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: {} of {expected} messages after 30 s: {:?}",
            got.len(),
            ids(&got)
        );
        // Paces the polling only: the loop ends on the count, or fails at the deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `queue` has `expected` ready messages (without taking them).
pub async fn wait_ready(ch: &Channel, queue: &str, expected: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = ready_count(ch, queue).await;
        if n == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: {n} ready, {expected} expected after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `queue` has no consumer: the broker has noticed a killed reader's connection,
/// and given back what it held (the same step).
pub async fn wait_no_consumers(ch: &Channel, queue: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        if q.consumer_count() == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue}: still {} consumer(s) after 30 s",
            q.consumer_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish a marker to `queue` and check it is the first message there: nothing else was
/// in the queue, nor was given back to it since (a given-back message is served before newer
/// ones).
pub async fn assert_empty(ch: &Channel, queue: &str) {
    let marker = format!("marker-{}", unique("m"));
    publish(
        ch,
        "",
        queue,
        b"marker",
        BasicProperties::default().with_message_id(marker.as_str().into()),
    )
    .await;
    let got = take_exactly(ch, queue, 1).await;
    assert_eq!(ids(&got), vec![marker], "{queue} is not empty");
}

pub fn ids(got: &[Got]) -> Vec<String> {
    got.iter().map(|g| g.id.clone()).collect()
}

/// How many times each id occurs.
pub fn counts<'a>(ids: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for id in ids {
        *m.entry(id.to_owned()).or_insert(0) += 1;
    }
    m
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A TCP proxy in front of the broker that delays everything the broker sends by `delay`
/// (what the client sends passes at once): publisher confirms and `basic.get` answers come
/// late, so a process killed at a random moment is often waiting for a confirm.
pub struct SlowProxy {
    pub port: u16,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl SlowProxy {
    pub async fn start(target: String, delay: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let spawned = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                let (mut client_rd, mut client_wr) = client.into_split();
                let (mut up_rd, mut up_wr) = upstream.into_split();
                // Client to broker: at once; the broker sees the close when the client goes.
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rd, &mut up_wr).await;
                    let _ = up_wr.shutdown().await;
                });
                // Broker to client: each chunk `delay` after it arrived, in order.
                let (tx, mut rx) =
                    tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                let read = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = up_rd.read(&mut buf).await {
                        if n == 0
                            || tx
                                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                                .is_err()
                        {
                            break;
                        }
                    }
                });
                let write = tokio::spawn(async move {
                    while let Some((at, bytes)) = rx.recv().await {
                        tokio::time::sleep_until(at).await;
                        if client_wr.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                });
                spawned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend([up, read, write]);
            }
        });
        tasks.lock().unwrap_or_else(|e| e.into_inner()).push(accept);
        Self { port, tasks }
    }

    /// `uri` with its host and port replaced by the proxy's.
    pub fn uri(&self, uri: &str) -> String {
        let (scheme, rest) = uri.split_once("://").unwrap_or(("amqp", uri));
        let (userinfo, hostpart) = match rest.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), rest),
        };
        let path = hostpart.find('/').map_or("", |i| &hostpart[i..]);
        format!("{scheme}://{userinfo}127.0.0.1:{}{path}", self.port)
    }

    /// `host:port` of the broker in `uri` (5672 when absent).
    pub fn target_of(uri: &str) -> String {
        let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:5672")
        }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}
