//! The two broker delay mechanisms, how prereq picks one, and the delay-queue layout.
//!
//! * [`DelayMechanism::DelayedExchange`]: the `rabbitmq_delayed_message_exchange` plugin. The
//!   retry exchange has type `x-delayed-message` (`x-delayed-type: direct`); a deferred copy is
//!   published to it with `x-delay` in milliseconds. Exact delays, but the plugin keeps delayed
//!   messages on one node, unreplicated.
//! * [`DelayMechanism::DelayQueues`]: no plugin. A deferred copy is published to a delay queue
//!   with a fixed `x-message-ttl`; when the TTL expires the broker dead-letters it to the retry
//!   exchange. Every delay queue holds exactly one delay value (a per-message TTL in a shared
//!   queue blocks behind the head), so delays are rounded to a fixed grid ([`delay_bucket`]) to
//!   keep the number of queues bounded ([`max_delay_queues`]).
//!
//! See `docs/delays.md` for the comparison.

use std::fmt;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{ErrorKind, ExchangeKind};

use super::addr::AmqpAddr;
use super::connect::connect_once;
use super::error::AmqpError;

/// The exchange type the delayed-message plugin registers.
pub(crate) const DELAYED_EXCHANGE_TYPE: &str = "x-delayed-message";

/// The longest delay prereq asks a broker for: `u32::MAX` ms (≈ 49.7 days). The plugin treats
/// larger `x-delay` values as no delay at all.
pub const MAX_BROKER_DELAY: Duration = Duration::from_millis(u32::MAX as u64);

/// Which delay mechanism to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DelayMode {
    /// Probe the broker for the delayed-message plugin (on a throw-away connection: the failed
    /// declare closes it) and use it if present, else the delay queues. The default.
    #[default]
    Auto,
    /// Require the delayed-message exchange plugin (connecting fails without it).
    DelayedExchange,
    /// Use TTL delay queues, even when the plugin is there.
    DelayQueues,
}

/// The delay mechanism in use, once [`DelayMode`] is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DelayMechanism {
    /// The delayed-message exchange plugin.
    DelayedExchange,
    /// TTL delay queues that dead-letter back into the retry exchange.
    DelayQueues,
}

impl fmt::Display for DelayMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DelayedExchange => "delayed-message exchange (plugin)",
            Self::DelayQueues => "TTL delay queues (no plugin)",
        })
    }
}

/// The mantissas of the delay grid, in tenths of a decade: 1, 1.2, 1.5, 1.8, 2, 2.5, 3, 3.5,
/// 4, 4.5, 5, 6, 7, 8, 9 (then 10, the next decade). Nearest-value rounding on this grid is
/// off by at most 1/9 (11.1 %) and keeps whole seconds from 1 to 10 s exact.
const GRID: [u64; 16] = [
    10, 12, 15, 18, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 90, 100,
];

/// The delay actually used for a requested delay on the delay-queue path, in whole
/// milliseconds: clamped to `max`, then rounded to the nearest value of a fixed grid
/// (1–9 ms exactly; from 10 ms on 15 values per decade: 1, 1.2, 1.5, 1.8, 2, 2.5, 3, 3.5, 4,
/// 4.5, 5, 6, 7, 8, 9 × 10ⁿ ms), at most 11.1 % away from the request, never above `max`; a
/// request at or above `max` gets `max` exactly. Zero stays zero (no delay queue).
pub(crate) fn delay_bucket(delay: Duration, max: Duration) -> Duration {
    let max_ms = clamp_ms(max.min(MAX_BROKER_DELAY));
    let ms = clamp_ms(delay);
    if ms >= max_ms {
        return Duration::from_millis(max_ms);
    }
    Duration::from_millis(bucket_ms(ms).min(max_ms))
}

fn clamp_ms(d: Duration) -> u64 {
    // Round to the nearest millisecond.
    let micros = d.as_micros();
    u64::try_from(micros.saturating_add(500) / 1000).unwrap_or(u64::MAX)
}

fn bucket_ms(ms: u64) -> u64 {
    if ms < 10 {
        return ms;
    }
    // scale = 10^(digits - 2), so ms / scale is in [10, 100).
    let mut scale = 1u64;
    while ms / scale >= 100 {
        scale = scale.saturating_mul(10);
    }
    let mut best = GRID[0] * scale;
    for g in GRID {
        let c = g.saturating_mul(scale);
        // Ties go to the larger value (never shorten a delay on a tie).
        if c.abs_diff(ms) <= best.abs_diff(ms) {
            best = c;
        }
    }
    best
}

/// The most delay queues [`delay_bucket`] can ever ask for with this maximum delay: the
/// number of distinct grid values in `1 ms ..= max` (plus `max` itself).
#[cfg(test)]
pub(crate) fn max_delay_queues(max: Duration) -> usize {
    let max_ms = clamp_ms(max.min(MAX_BROKER_DELAY));
    let mut n = max_ms.min(9) as usize;
    let mut scale = 1u64;
    'outer: loop {
        for g in &GRID[..GRID.len() - 1] {
            let c = g.saturating_mul(scale);
            if c > max_ms {
                break 'outer;
            }
            n += 1;
        }
        scale = scale.saturating_mul(10);
    }
    // `max` itself, when it is not on the grid.
    n + usize::from(max_ms >= 10 && bucket_ms(max_ms) != max_ms)
}

/// The name of the delay queue for a bucketed delay: `<prefix>.<ms>ms`.
pub(crate) fn delay_queue_name(prefix: &str, delay: Duration) -> String {
    format!("{prefix}.{}ms", delay.as_millis())
}

/// The declare arguments of a delay queue: a durable quorum queue with `x-message-ttl`, that
/// dead-letters to `exchange` / `routing_key` with at-least-once dead-lettering (which needs
/// `x-overflow: reject-publish`). No `x-expires`: it would delete a queue holding messages.
pub(crate) fn delay_queue_arguments(
    delay: Duration,
    exchange: &str,
    routing_key: Option<&str>,
) -> FieldTable {
    let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert("x-dead-letter-exchange".into(), long(exchange));
    if let Some(key) = routing_key {
        args.insert("x-dead-letter-routing-key".into(), long(key));
    }
    args.insert("x-overflow".into(), long("reject-publish"));
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Whether the broker knows the `x-delayed-message` exchange type.
///
/// Declares a uniquely named delayed exchange on a throw-away connection (without the plugin
/// the broker closes the whole connection with `503 COMMAND_INVALID`), deletes it if it was
/// created, and closes the connection. Errors when the broker cannot be reached, fails in
/// another way, or has not answered within `timeout` (a wrong port, a proxy or a firewall that
/// accepts connections and stays silent): an [`AmqpError::Connect`] that says so.
pub(crate) async fn probe_delayed_exchange_within(
    addr: &AmqpAddr,
    tls: &OwnedTLSConfig,
    timeout: Duration,
) -> Result<bool, AmqpError> {
    match tokio::time::timeout(timeout, probe(addr, tls, timeout)).await {
        Ok(found) => found,
        Err(_) => Err(AmqpError::Connect {
            addr: addr.redacted(),
            message: format!("plugin probe: no answer within {timeout:?} (the connect timeout)"),
        }),
    }
}

async fn probe(
    addr: &AmqpAddr,
    tls: &OwnedTLSConfig,
    timeout: Duration,
) -> Result<bool, AmqpError> {
    let conn = connect_once(addr, tls, "prereq-plugin-probe", timeout)
        .await
        .map_err(|e| match e {
            AmqpError::Connect { addr, message } => AmqpError::Connect {
                addr,
                message: format!("plugin probe: {message}"),
            },
            e => e,
        })?;
    let broker = |operation: &str, e: lapin::Error| AmqpError::Broker {
        operation: operation.to_owned(),
        message: addr.scrub(&e.to_string()),
    };
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| broker("probe: open channel", e))?;
    let name = format!(
        "prereq.probe.{}.{}",
        std::process::id(),
        super::unique_suffix()
    );
    let declared = channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Custom(DELAYED_EXCHANGE_TYPE.to_owned()),
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            {
                let mut args = FieldTable::default();
                args.insert("x-delayed-type".into(), long("direct"));
                args
            },
        )
        .await;
    let present = match declared {
        Ok(()) => {
            let _ = channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            true
        }
        Err(e) if is_unknown_exchange_type(&e) => false,
        Err(e) => return Err(broker("probe: declare delayed exchange", e)),
    };
    let _ = conn.close(200, "probe done".into()).await;
    Ok(present)
}

fn is_unknown_exchange_type(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => {
            matches!(
                amqp.kind(),
                AMQPErrorKind::Hard(AMQPHardError::COMMANDINVALID)
            ) || amqp
                .get_message()
                .as_str()
                .contains("unknown exchange type")
        }
        _ => false,
    }
}

/// Resolve a [`DelayMode`] against a broker (probing only for [`DelayMode::Auto`] and
/// [`DelayMode::DelayedExchange`]); the probe gives up after `timeout`.
pub(crate) async fn resolve_within(
    mode: DelayMode,
    addr: &AmqpAddr,
    tls: &OwnedTLSConfig,
    timeout: Duration,
) -> Result<DelayMechanism, AmqpError> {
    match mode {
        DelayMode::DelayQueues => Ok(DelayMechanism::DelayQueues),
        DelayMode::Auto => Ok(
            if probe_delayed_exchange_within(addr, tls, timeout).await? {
                DelayMechanism::DelayedExchange
            } else {
                DelayMechanism::DelayQueues
            },
        ),
        DelayMode::DelayedExchange => {
            if probe_delayed_exchange_within(addr, tls, timeout).await? {
                Ok(DelayMechanism::DelayedExchange)
            } else {
                Err(AmqpError::Config(
                    "DelayMode::DelayedExchange, but the broker has no x-delayed-message \
                     exchange type (rabbitmq_delayed_message_exchange plugin)"
                        .to_owned(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn whole_seconds_up_to_ten_are_exact() {
        for s in 1..=10 {
            let d = Duration::from_secs(s);
            assert_eq!(delay_bucket(d, DAY), d);
        }
        assert_eq!(
            delay_bucket(Duration::from_secs(60), DAY),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn small_delays_are_exact_and_zero_stays_zero() {
        assert_eq!(delay_bucket(Duration::ZERO, DAY), Duration::ZERO);
        assert_eq!(
            delay_bucket(Duration::from_micros(400), DAY),
            Duration::ZERO
        );
        for v in 1..10 {
            assert_eq!(delay_bucket(ms(v), DAY), ms(v));
        }
    }

    #[test]
    fn rounding_error_is_bounded() {
        for v in 1..200_000u64 {
            let b = delay_bucket(ms(v), DAY).as_millis() as f64;
            let err = (b - v as f64).abs() / v as f64;
            assert!(err <= 1.0 / 9.0 + 1e-9, "{v} -> {b}");
        }
    }

    #[test]
    fn clamped_to_max() {
        assert_eq!(delay_bucket(Duration::from_secs(7 * 86_400), DAY), DAY);
        assert_eq!(delay_bucket(Duration::MAX, Duration::MAX), MAX_BROKER_DELAY);
        assert_eq!(delay_bucket(ms(25_000), ms(22_000)), ms(22_000));
    }

    #[test]
    fn number_of_queues_is_bounded() {
        let mut seen = std::collections::BTreeSet::new();
        let mut v = 1u64;
        while v <= 90_000_000 {
            seen.insert(delay_bucket(ms(v), DAY));
            v += 1 + v / 500;
        }
        seen.remove(&Duration::ZERO);
        assert!(seen.len() <= max_delay_queues(DAY), "{}", seen.len());
        assert!(max_delay_queues(DAY) <= 120, "{}", max_delay_queues(DAY));
        assert_eq!(max_delay_queues(ms(5)), 5);
    }

    #[test]
    fn queue_names_and_arguments() {
        assert_eq!(delay_queue_name("q.delay", ms(1500)), "q.delay.1500ms");
        let args = delay_queue_arguments(ms(1500), "retry", Some("key"));
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongLongInt(1500)));
        assert_eq!(get("x-queue-type"), Some(long("quorum")));
        assert_eq!(get("x-overflow"), Some(long("reject-publish")));
        assert_eq!(get("x-dead-letter-strategy"), Some(long("at-least-once")));
        assert_eq!(get("x-dead-letter-exchange"), Some(long("retry")));
        assert_eq!(get("x-dead-letter-routing-key"), Some(long("key")));
        assert!(!args.contains_key("x-expires"));
        let own_key = delay_queue_arguments(ms(1500), "retry", None);
        assert!(
            !own_key.contains_key("x-dead-letter-routing-key"),
            "keeps the copy's key"
        );
    }
}
