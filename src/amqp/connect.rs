//! Opening connections: a deadline on every attempt (reconnects included), a bounded reconnect
//! backoff that starts over once connected, and a plain pre-flight connection so that a wrong
//! address or password fails at start instead of being retried for minutes.

use std::time::Duration;

use lapin::tcp::{AMQPUriTcpExt, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use super::addr::AmqpAddr;
use super::error::AmqpError;

/// How long each connection attempt may take by default (10 s): the plugin probe, the
/// pre-flight connection, the transport's connection, and each TCP connection attempt while
/// reconnecting. See [`super::BrokerOptions::connect_timeout`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The first pause before a reconnection attempt; pauses double up to [`RECONNECT_MAX_DELAY`].
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);

/// The longest pause between reconnection attempts, before jitter (which adds up to as much
/// again, at random): a broker that comes back is found within half a second, however long it
/// was away. The backoff starts over once a connection is up.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(250);

/// Open a connection with lapin's auto-recovery on; errors never show the credentials.
///
/// Each attempt gives up after `timeout`, and a lost connection is retried every 100 to 500 ms
/// for up to `reconnect_for`.
///
/// With auto-recovery, lapin retries even the *first* connection when the broker is
/// unreachable or refuses the login. A misconfigured service should fail at start instead: so a
/// plain connection is tried first, and only once it succeeded is the recovering one opened.
pub(crate) async fn connect_within(
    addr: &AmqpAddr,
    tls: &OwnedTLSConfig,
    connection_name: &str,
    timeout: Duration,
    reconnect_for: Duration,
) -> Result<Connection, AmqpError> {
    open_and_close(addr, tls, &format!("{connection_name}-preflight"), timeout).await?;
    // Reconnection: short pauses, capped low and reset once connected (lapin's own default
    // doubles from 1 s to 60 s and gives up after 16 tries), for up to `reconnect_for` in all.
    let properties = ConnectionProperties::default()
        .configure_backoff(|backoff| {
            backoff
                .with_min_delay(RECONNECT_MIN_DELAY)
                .with_factor(2.0)
                .with_max_delay(RECONNECT_MAX_DELAY)
                .with_jitter()
                .without_max_times()
                .with_total_delay(Some(reconnect_for))
        })
        .enable_auto_recover()
        .with_connection_name(connection_name.into());
    open(addr, tls, properties, timeout).await
}

/// Does the broker take a new connection now? A throw-away one (no recovery), opened within
/// `timeout` and closed.
pub(crate) async fn accepts(
    addr: &AmqpAddr,
    tls: &OwnedTLSConfig,
    connection_name: &str,
    timeout: Duration,
) -> bool {
    open_and_close(addr, tls, &format!("{connection_name}-probe"), timeout)
        .await
        .is_ok()
}

/// A throw-away connection named `name` (no recovery), opened within `timeout` and closed.
async fn open_and_close(
    addr: &AmqpAddr,
    tls: &OwnedTLSConfig,
    name: &str,
    timeout: Duration,
) -> Result<(), AmqpError> {
    let connection = connect_once(addr, tls, name, timeout).await?;
    let _ = tokio::time::timeout(timeout, connection.close(200, "prereq: done".into())).await;
    Ok(())
}

/// A connection named `name` without recovery (for a short task: a probe, a replay), opened
/// within `timeout`; errors never show the credentials.
pub(crate) async fn connect_once(
    addr: &AmqpAddr,
    tls: &OwnedTLSConfig,
    name: &str,
    timeout: Duration,
) -> Result<Connection, AmqpError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    open(addr, tls, properties, timeout).await
}

/// One connection, within `timeout`; each TCP (and TLS) connection attempt lapin makes for it,
/// including when it reconnects later, gives up after `timeout` too.
async fn open(
    addr: &AmqpAddr,
    tls: &OwnedTLSConfig,
    properties: ConnectionProperties,
    timeout: Duration,
) -> Result<Connection, AmqpError> {
    addr.validate()?;
    let failed = |message: String| AmqpError::Connect {
        addr: addr.redacted(),
        message,
    };
    let uri: AMQPUri = addr
        .expose()
        .trim()
        .parse()
        .map_err(|e: String| failed(addr.scrub(&e)))?;
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| failed(addr.scrub(&e.to_string())))?;
    let tls = tls.clone();
    let connecting = Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| match tokio::time::timeout(
            timeout,
            uri.connect_with_config_async(tls.as_ref(), &runtime),
        )
        .await
        {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("TCP connection not established within {timeout:?}"),
            )
            .into()),
        },
        properties,
    );
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(failed(addr.scrub(&e.to_string()))),
        Err(_) => Err(failed(format!(
            "no answer within {timeout:?} (the connect timeout)"
        ))),
    }
}
