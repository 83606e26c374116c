//! Publish one payment or one client registration, wire-compatible with the original Go demo.
//!
//! ```text
//! cargo run --example producer -- p 5    # a payment for client 5
//! cargo run --example producer -- c 5    # register client 5
//! ```
//!
//! The broker is `AMQP_ADDR` (default `amqp://guest:guest@127.0.0.1:5672/%2f`). The topology
//! (exchanges `clients` and `payments`, queues `clients-processor`, `payment-processor`,
//! `payment-reprocessor`) is declared if missing, so the producer may run first.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use prereq::amqp::headers::demo_new_message_headers;
use prereq::amqp::topology::{self, CLIENT_KEY, DEMO_RETRY_LIMIT, PROCESS_KEY, PaymentNames};
use prereq::amqp::{AmqpAddr, AmqpError, DelayMechanism, connect, declare_topology, delay};
use serde::Serialize;

const USAGE: &str = "usage: producer <p|c> <client-id>
  p <client-id>   publish a payment for this client
  c <client-id>   register this client
The broker is AMQP_ADDR (default amqp://guest:guest@127.0.0.1:5672/%2f).";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Payment {
    id: String,
    client_id: u64,
    value: f64,
    operation_date: String,
}

#[derive(Serialize)]
struct Client {
    id: u64,
    name: String,
}

enum Command {
    Payment(u64),
    Client(u64),
}

fn parse(args: &[String]) -> Option<Command> {
    let [kind, id] = args else { return None };
    let id: u64 = id.parse().ok()?;
    match kind.as_str() {
        "p" => Some(Command::Payment(id)),
        "c" => Some(Command::Client(id)),
        _ => None,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = parse(&args) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
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
    let addr = AmqpAddr::from_env();
    let names = PaymentNames::default();
    let config = topology::payments(&names).with_addr(addr.clone());
    let timeout = |e: tokio::time::error::Elapsed| AmqpError::Connect {
        addr: addr.redacted(),
        message: e.to_string(),
    };
    let mechanism = tokio::time::timeout(
        Duration::from_secs(15),
        delay::resolve(config.delay_mode(), &addr),
    )
    .await
    .map_err(timeout)??;
    let conn = tokio::time::timeout(Duration::from_secs(15), connect(&addr, "prereq-producer"))
        .await
        .map_err(timeout)??;
    let broker = |operation: &str, e: lapin::Error| AmqpError::Broker {
        operation: operation.to_owned(),
        message: addr.scrub(&e.to_string()),
    };
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| broker("open channel", e))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| broker("enable confirms", e))?;
    declare_topology(&ch, &config, mechanism).await?;

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (exchange, key, body, props, line) = match command {
        Command::Payment(client_id) => {
            let id = format!("pay-{}", now.as_nanos());
            let payment = Payment {
                id: id.clone(),
                client_id,
                value: f64::from(u32::try_from(now.as_millis() % 100_000).unwrap_or(0)) / 100.0,
                operation_date: rfc3339(now.as_secs()),
            };
            let props = BasicProperties::default()
                .with_headers(demo_new_message_headers(DEMO_RETRY_LIMIT))
                .with_message_id(id.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            (
                names.payments_exchange.clone(),
                PROCESS_KEY,
                serde_json::to_vec(&payment).unwrap_or_default(),
                props,
                format!("published payment {id} for client {client_id} (confirmed)"),
            )
        }
        Command::Client(id) => {
            let client = Client {
                id,
                name: format!("client-{id}"),
            };
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            (
                names.clients_exchange.clone(),
                CLIENT_KEY,
                serde_json::to_vec(&client).unwrap_or_default(),
                props,
                format!("registered client {id} (confirmed)"),
            )
        }
    };
    // `mandatory` catches a missing binding; the delayed-message exchange would report every
    // message as unroutable at once, so it is off there.
    let mandatory = mechanism == DelayMechanism::DelayQueues || key == CLIENT_KEY;
    let confirm = ch
        .basic_publish(
            exchange.as_str().into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            &body,
            props,
        )
        .await
        .map_err(|e| broker("publish", e))?
        .await
        .map_err(|e| broker("publish confirm", e))?;
    let _ = conn.close(200, "done".into()).await;
    match confirm {
        Confirmation::Ack(None) => Ok(line),
        Confirmation::Ack(Some(_)) => Err(AmqpError::NotConfirmed {
            what: "publish",
            message: format!("unroutable: nothing bound to {exchange} with key {key}"),
        }),
        other => Err(AmqpError::NotConfirmed {
            what: "publish",
            message: format!("{other:?}"),
        }),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (proleptic Gregorian, UTC).
fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
