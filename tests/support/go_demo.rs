//! The classic Go payment demo as an independent AMQP client sees it: its literal names, its
//! exact bodies and header types (lapin's own `AMQPValue`s), its declarations, and a consumer
//! that behaves like the Go one (auto-ack; an unknown client's payment re-published to
//! `reprocess.payment` with `x-delay` + 1000 and `x-retry` + 1). Nothing here goes through
//! prereq's producer code or its payment-demo constants: these are the wire facts, written out.
//!
//! Include with `mod support;` and `#[path = "support/go_demo.rs"] mod go_demo;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

/// The Go demo's names, literally.
pub const CLIENTS: &str = "clients";
pub const PAYMENTS: &str = "payments";
pub const CLIENTS_QUEUE: &str = "clients-processor";
pub const PAYMENT_QUEUE: &str = "payment-processor";
pub const REPROCESS_QUEUE: &str = "payment-reprocessor";
pub const PROCESS_KEY: &str = "process.payment";
pub const REPROCESS_KEY: &str = "reprocess.payment";
/// The client binding's routing key: the empty string.
pub const CLIENT_KEY: &str = "";

/// The Go demo's names under a prefix (the tests' unique one; `""` in a private vhost).
#[derive(Clone, Debug)]
pub struct GoNames {
    pub clients: String,
    pub payments: String,
    pub clients_queue: String,
    pub payment_queue: String,
    pub reprocess_queue: String,
}

impl GoNames {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            clients: format!("{prefix}{CLIENTS}"),
            payments: format!("{prefix}{PAYMENTS}"),
            clients_queue: format!("{prefix}{CLIENTS_QUEUE}"),
            payment_queue: format!("{prefix}{PAYMENT_QUEUE}"),
            reprocess_queue: format!("{prefix}{REPROCESS_QUEUE}"),
        }
    }
}

/// A payment body exactly as Go's `encoding/json` writes it: compact, fields in struct order,
/// `id` and `clientId` JSON numbers, `value` 200, RFC 3339 with nanoseconds.
pub fn payment_body(id: u64, client: u64) -> Vec<u8> {
    format!(
        r#"{{"id":{id},"clientId":{client},"value":200,"operationDate":"2026-11-28T08:31:01.958043123-03:00"}}"#
    )
    .into_bytes()
}

/// A client registration body exactly as the Go producer writes it.
pub fn client_body(id: u64) -> Vec<u8> {
    format!(r#"{{"id":{id},"name":"novo client"}}"#).into_bytes()
}

/// Headers of 32-bit integers (AMQP type `I`, what Go `int` values in an `amqp.Table` become).
pub fn int32_headers(pairs: &[(&str, i32)]) -> FieldTable {
    let mut h = FieldTable::default();
    for (name, v) in pairs {
        h.insert((*name).into(), AMQPValue::LongInt(*v));
    }
    h
}

/// A new payment's headers: `x-delay: 0`, `x-retry: 0`, `x-retry-limit: 10`.
pub fn new_payment_headers() -> FieldTable {
    int32_headers(&[("x-delay", 0), ("x-retry", 0), ("x-retry-limit", 10)])
}

/// A client registration's headers: `x-delay: 5000`.
pub fn client_headers() -> FieldTable {
    int32_headers(&[("x-delay", 5000)])
}

/// The Go producer's properties: `application/json`, no delivery mode, no message id.
pub fn properties(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
}

/// A channel in confirm mode (the Go producer does not confirm; the tests do, to know the
/// broker has the message before they go on).
pub async fn channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    ch
}

/// Publish as the Go producer does: **not** mandatory; waits for the broker's confirm.
pub async fn publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    headers: FieldTable,
) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(
        confirm,
        Confirmation::Ack(None),
        "publish to {exchange:?} not confirmed"
    );
}

/// A new payment, as `producer p <client>` publishes it.
pub async fn publish_payment(ch: &Channel, names: &GoNames, id: u64, client: u64) {
    publish(
        ch,
        &names.payments,
        PROCESS_KEY,
        &payment_body(id, client),
        new_payment_headers(),
    )
    .await;
}

/// A client registration, as `producer c <client>` publishes it.
pub async fn publish_client(ch: &Channel, names: &GoNames, client: u64) {
    publish(
        ch,
        &names.clients,
        CLIENT_KEY,
        &client_body(client),
        client_headers(),
    )
    .await;
}

/// Declare the Go demo's topology exactly as its programs do (types, flags, arguments, the
/// `""` client binding). `payments` is `x-delayed-message` with `x-delayed-type: direct` when
/// `plugin`; without the plugin that declaration cannot succeed (503 closes the connection),
/// so `payments` is declared `direct` with the same flags — the most of it a broker without
/// the plugin can hold.
pub async fn declare_topology(
    conn: &Connection,
    names: &GoNames,
    plugin: bool,
) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        passive: false,
        durable: true,
        auto_delete: false,
        internal: false,
        nowait: false,
    };
    ch.exchange_declare(
        names.clients.as_str().into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    let (kind, args) = if plugin {
        let mut args = FieldTable::default();
        args.insert(
            "x-delayed-type".into(),
            AMQPValue::LongString(LongString::from("direct")),
        );
        (ExchangeKind::Custom("x-delayed-message".to_owned()), args)
    } else {
        (ExchangeKind::Direct, FieldTable::default())
    };
    ch.exchange_declare(names.payments.as_str().into(), kind, durable, args)
        .await?;
    for q in [
        &names.clients_queue,
        &names.payment_queue,
        &names.reprocess_queue,
    ] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await?;
    }
    for (q, x, key) in [
        (&names.clients_queue, &names.clients, CLIENT_KEY),
        (&names.payment_queue, &names.payments, PROCESS_KEY),
        (&names.reprocess_queue, &names.payments, REPROCESS_KEY),
    ] {
        ch.queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Whether the broker at `uri` has the delayed-message plugin: declare a throw-away
/// `x-delayed-message` exchange on a throw-away connection (without the plugin the broker
/// closes that connection with 503).
pub async fn has_delayed_plugin(uri: &str) -> bool {
    let conn = Connection::connect(uri, ConnectionProperties::default())
        .await
        .expect("connect for the plugin probe");
    let ch = conn.create_channel().await.expect("probe channel");
    let name = format!(
        "prereq-test.go-probe.{}.{}",
        std::process::id(),
        crate::drill::now_ns()
    );
    let mut args = FieldTable::default();
    args.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString(LongString::from("direct")),
    );
    let declared = ch
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Custom("x-delayed-message".to_owned()),
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            args,
        )
        .await;
    let plugin = match declared {
        Ok(()) => {
            let _ = ch
                .exchange_delete(name.as_str().into(), Default::default())
                .await;
            true
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("COMMAND_INVALID") || text.contains("unknown exchange type"),
                "unexpected plugin probe error: {text}"
            );
            false
        }
    };
    let _ = conn.close(200, "probe".into()).await;
    plugin
}

/// What the Go consumer reads of a payment's headers: `x-delay` with a hard type assertion to
/// int32 (an `Err` is where the Go consumer would crash), `x-retry` with a soft one (missing or
/// of another type: 0).
pub fn go_read_headers(headers: Option<&FieldTable>) -> Result<(i32, i32), String> {
    let h = headers.map(|h| h.inner());
    let delay = match h.and_then(|h| h.get("x-delay")) {
        Some(AMQPValue::LongInt(v)) => *v,
        other => {
            return Err(format!(
                "x-delay is {other:?}, not an int32: the Go consumer panics"
            ));
        }
    };
    let retry = match h.and_then(|h| h.get("x-retry")) {
        Some(AMQPValue::LongInt(v)) => *v,
        _ => 0,
    };
    Ok((delay, retry))
}

/// What the Go-style consumers did.
#[derive(Clone, Debug, Default)]
pub struct GoRecord {
    /// Payment ids processed (client known), in order.
    pub processed: Vec<u64>,
    /// Payments re-published (client unknown).
    pub republished: u64,
    /// Registrations stored.
    pub registered: Vec<u64>,
    /// Messages the Go consumer could not read (bad JSON, `x-delay` not an int32): where it
    /// would crash.
    pub crashes: Vec<String>,
}

/// A consumer behaving like the Go demo's on the three queues, sharing the client store (the
/// SQLite file prereq's example consumer uses: table `clients`, column `key`; the Go demo's
/// own table is `clients(id, name)`).
pub struct GoConsumer {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    channel: Channel,
}

impl GoConsumer {
    /// Start consuming on its own channel of `conn`, auto-ack, with the Go consumer tags.
    pub async fn start(
        conn: &Connection,
        names: &GoNames,
        db: &Path,
        record: Arc<Mutex<GoRecord>>,
    ) -> Self {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(db)
                    .busy_timeout(Duration::from_secs(30)),
            )
            .await
            .expect("open the shared client store");
        let channel = channel(conn).await;
        let mut tasks = Vec::new();
        for (queue, tag) in [
            (&names.clients_queue, "client-consumer"),
            (&names.payment_queue, "payment-consumer"),
            (&names.reprocess_queue, "payment-consumer-reprocess"),
        ] {
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("basic_consume");
            let clients = queue == &names.clients_queue;
            let (pool, record, ch, payments) = (
                pool.clone(),
                record.clone(),
                channel.clone(),
                names.payments.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(d)) = consumer.next().await {
                    if clients {
                        on_client(&pool, &record, &d.data).await;
                    } else {
                        on_payment(&pool, &record, &ch, &payments, &d).await;
                    }
                }
            }));
        }
        Self { tasks, channel }
    }

    /// Stop consuming (an auto-ack consumer holds nothing).
    pub async fn stop(self) {
        let _ = self.channel.close(200, "go consumer stops".into()).await;
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn on_client(pool: &sqlx::SqlitePool, record: &Mutex<GoRecord>, body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        record
            .lock()
            .unwrap()
            .crashes
            .push("client body".to_owned());
        return;
    };
    let Some(id) = v.get("id").and_then(serde_json::Value::as_i64) else {
        record.lock().unwrap().crashes.push("client id".to_owned());
        return;
    };
    // A duplicate fails the insert and is only logged, as in the Go demo.
    if sqlx::query(r#"INSERT INTO clients ("key") VALUES (?)"#)
        .bind(id)
        .execute(pool)
        .await
        .is_ok()
    {
        record.lock().unwrap().registered.push(id as u64);
    }
}

async fn on_payment(
    pool: &sqlx::SqlitePool,
    record: &Mutex<GoRecord>,
    ch: &Channel,
    payments: &str,
    d: &lapin::message::Delivery,
) {
    let parsed = serde_json::from_slice::<serde_json::Value>(&d.data).ok();
    let (Some(id), Some(client)) = (
        parsed.as_ref().and_then(|v| v.get("id")?.as_u64()),
        parsed.as_ref().and_then(|v| v.get("clientId")?.as_i64()),
    ) else {
        record.lock().unwrap().crashes.push(format!(
            "payment body {:?}",
            String::from_utf8_lossy(&d.data)
        ));
        return;
    };
    let known = sqlx::query(r#"SELECT 1 FROM clients WHERE "key" = ?"#)
        .bind(client)
        .fetch_optional(pool)
        .await
        .expect("query the client store")
        .is_some();
    if known {
        record.lock().unwrap().processed.push(id);
        return;
    }
    let (delay, retry) = match go_read_headers(d.properties.headers().as_ref()) {
        Ok(read) => read,
        Err(crash) => {
            record
                .lock()
                .unwrap()
                .crashes
                .push(format!("payment {id}: {crash}"));
            return;
        }
    };
    let headers = int32_headers(&[
        ("x-delay", delay.wrapping_add(1000)),
        ("x-retry", retry.wrapping_add(1)),
    ]);
    publish(ch, payments, REPROCESS_KEY, &d.data, headers).await;
    record.lock().unwrap().republished += 1;
}

/// A private virtual host on the broker under test, deleted on drop (with everything in it).
/// Created with `rabbitmqctl`, so only when the broker under test is the local default node.
pub struct Vhost {
    pub name: String,
    /// The test broker's address with this vhost.
    pub uri: String,
}

impl Vhost {
    /// Create the vhost and grant the test's user everything on it; `None`, with the reason
    /// printed, when `rabbitmqctl` cannot manage the broker under test (a failure instead under
    /// `PREREQ_REQUIRE_BROKER=1` when that broker is the local node).
    pub fn create(tag: &str) -> Option<Self> {
        let base = std::env::var("AMQP_ADDR")
            .ok()
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        let skip = |why: String| {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "skipping a private-vhost broker test: {why}"
            );
            None
        };
        let (scheme, rest) = base.split_once("://")?;
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if !["127.0.0.1", "localhost", "127.0.0.1:5672", "localhost:5672"].contains(&host) {
            return skip(format!(
                "rabbitmqctl manages the local node, the broker under test is {host}"
            ));
        }
        let user = authority
            .rsplit_once('@')
            .and_then(|(u, _)| u.split(':').next())
            .unwrap_or("guest")
            .to_owned();
        let name = format!(
            "prereq-test.{tag}.{}.{}",
            std::process::id(),
            crate::drill::now_ns()
        );
        let ctl = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("rabbitmqctl")
                .args(args)
                .output()
                .map_err(|e| format!("rabbitmqctl: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "rabbitmqctl {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        if let Err(e) = ctl(&["-q", "add_vhost", &name]) {
            // The broker under test is the local node: under PREREQ_REQUIRE_BROKER=1 it must be
            // manageable.
            if std::env::var("PREREQ_REQUIRE_BROKER").as_deref() == Ok("1") {
                panic!("PREREQ_REQUIRE_BROKER=1 but {e}");
            }
            return skip(e);
        }
        let vhost = Self {
            uri: format!("{scheme}://{authority}/{name}"),
            name,
        };
        if let Err(e) = ctl(&[
            "-q",
            "set_permissions",
            "-p",
            &vhost.name,
            &user,
            ".*",
            ".*",
            ".*",
        ]) {
            panic!("{e}");
        }
        Some(vhost)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("could not delete vhost {}: {out:?}", self.name);
        }
    }
}
