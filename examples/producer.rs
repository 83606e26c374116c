//! Publish one payment or one client registration exactly as the classic Go demo's producer
//! does (same exchange, routing key, body, content type and header types), with publisher
//! confirms and `mandatory`: a message nothing would receive is an error, never a silent loss.
//!
//! ```text
//! cargo run --example producer -- p 5    # a payment for client 5
//! cargo run --example producer -- c 5    # register client 5
//! ```
//!
//! A payment: `{"id":<random 63-bit>,"clientId":5,"value":200,"operationDate":"<RFC 3339>"}` to
//! `payments` with `process.payment`, headers `x-delay: 0`, `x-retry: 0`, `x-retry-limit: 10`
//! (32-bit integers). A client: `{"id":5,"name":"novo client"}` to `clients` with routing key
//! `""`, header `x-delay: 5000`. The broker is `AMQP_ADDR` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; TLS settings from `AMQP_TLS_*`, as for the
//! consumer); `PREREQ_PREFIX` prefixes every name, as for the consumer. The topology is declared if missing, so the producer may run first.

use std::hash::{BuildHasher, Hasher};
use std::process::ExitCode;

use chrono::{DateTime, Local, Offset, Timelike};
use prereq::amqp::payment_demo::{self, PROCESS_KEY, PaymentNames};
use prereq::amqp::{AmqpError, Broker, BrokerOptions};
use serde::Serialize;

const USAGE: &str = "usage: producer <p|c> <client-id>
  p <client-id>   publish a payment for this client
  c <client-id>   register this client
The broker is AMQP_ADDR (default amqp://guest:guest@127.0.0.1:5672/%2f); for amqps://,
AMQP_TLS_CA_FILE, AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE (PEM files) as needed.";

/// The Go demo's payment, fields in its struct order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Payment {
    id: u64,
    client_id: u64,
    value: u64,
    operation_date: String,
}

/// The Go demo's client.
#[derive(Serialize)]
struct Client {
    id: u64,
    name: &'static str,
}

enum Command {
    Payment(u64),
    Client(u64),
}

fn parse(args: &[String]) -> Result<Command, String> {
    let [kind, id] = args else {
        return Err(format!(
            "expected 2 arguments (p or c, then a client id), got {}",
            args.len()
        ));
    };
    let id: u64 = id
        .parse()
        .map_err(|_| format!("the client id must be a non-negative integer, got {id:?}"))?;
    match kind.as_str() {
        "p" => Ok(Command::Payment(id)),
        "c" => Ok(Command::Client(id)),
        other => Err(format!(
            "the first argument must be `p` (a payment) or `c` (a client), got {other:?}"
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse(&args) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("producer: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(command).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("producer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<String, AmqpError> {
    let prefix = std::env::var("PREREQ_PREFIX").unwrap_or_default();
    let names = PaymentNames::with_prefix(&prefix);
    let broker =
        Broker::connect(BrokerOptions::from_env().connection_name("prereq-producer-example"))
            .await?;
    broker.declare(&payment_demo::route(&names)).await?;
    let publisher = broker.publisher().await?;
    let line = match command {
        Command::Payment(client_id) => {
            let payment = Payment {
                id: random_id(),
                client_id,
                value: 200,
                operation_date: go_rfc3339_nano(Local::now()),
            };
            let body = serde_json::to_vec(&payment).unwrap_or_default();
            publisher
                .publish(
                    &names.payments_exchange,
                    PROCESS_KEY,
                    &body,
                    &payment_demo::payment_message(),
                )
                .await?;
            format!(
                "published payment {} for client {client_id} (confirmed)",
                payment.id
            )
        }
        Command::Client(id) => {
            let client = Client {
                id,
                name: "novo client",
            };
            let body = serde_json::to_vec(&client).unwrap_or_default();
            publisher
                .publish(
                    &names.clients_exchange,
                    payment_demo::CLIENT_KEY,
                    &body,
                    &payment_demo::client_message(),
                )
                .await?;
            format!("registered client {id} (confirmed)")
        }
    };
    let _ = broker.close().await;
    Ok(line)
}

/// A random non-negative 63-bit integer, like Go's `rand.Int()`.
fn random_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 1
}

/// Go's `time.RFC3339Nano`: nanoseconds with trailing zeros trimmed (none at all for a whole
/// second), `Z` for UTC, else the local offset `±hh:mm`.
fn go_rfc3339_nano(t: DateTime<Local>) -> String {
    let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.nanosecond() % 1_000_000_000;
    if nanos > 0 {
        let digits = format!("{nanos:09}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    if t.offset().fix().local_minus_utc() == 0 {
        out.push('Z');
    } else {
        out.push_str(&t.format("%:z").to_string());
    }
    out
}
