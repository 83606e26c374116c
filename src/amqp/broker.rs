//! [`Broker`]: one connection to RabbitMQ (one plugin probe), handing out a transport per
//! [`Route`] and publishers; [`BrokerOptions`]: its address and limits, with documented defaults.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use lapin::Connection;
use lapin::tcp::OwnedTLSConfig;
use tokio::sync::watch;
use tracing::info;

use super::addr::AmqpAddr;
use super::connect::{CONNECT_TIMEOUT, accepts, connect_within};
use super::declare::declare_route;
use super::delay::{self, DelayMechanism, DelayMode, MAX_BROKER_DELAY};
use super::error::AmqpError;
use super::route::Route;
use super::tls::Tls;

/// How long a lost connection may stay down by default before the transports give up and their
/// consumers stop with an error (10 minutes).
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// RabbitMQ's default acknowledgement timeout (`consumer_timeout`, 30 minutes). A consumer holds
/// messages for at most half of the broker's.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The default longest delay of a deferred copy (one day); longer delays are clamped.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(86_400);

/// Where the broker is and how to treat it. Every setting has a default:
///
/// | setting | default |
/// |---|---|
/// | address | `AMQP_ADDR`, else `amqp://guest:guest@127.0.0.1:5672/%2f` ([`BrokerOptions::from_env`]) |
/// | connection name | `prereq` (shown by `rabbitmqctl list_connections`) |
/// | delay mode | [`DelayMode::Auto`]: the plugin if the broker has it, else delay queues |
/// | connect timeout | [`CONNECT_TIMEOUT`] (10 s) per connection attempt, reconnects included |
/// | reconnect timeout | [`DEFAULT_RECONNECT_TIMEOUT`] (10 min) |
/// | ack timeout | [`DEFAULT_ACK_TIMEOUT`] (30 min): set it to your broker's `consumer_timeout` |
/// | max delay | [`DEFAULT_MAX_DELAY`] (one day) |
/// | TLS (`amqps://`) | the system's roots, no client certificate; under [`BrokerOptions::from_env`], [`Tls::from_env`] (`AMQP_TLS_CA_FILE`, `AMQP_TLS_CERT_FILE`, `AMQP_TLS_KEY_FILE`) |
#[derive(Clone, Debug)]
#[must_use]
pub struct BrokerOptions {
    addr: AmqpAddr,
    connection_name: String,
    delay_mode: DelayMode,
    connect_timeout: Duration,
    reconnect_timeout: Duration,
    ack_timeout: Duration,
    max_delay: Duration,
    tls: Tls,
}

impl BrokerOptions {
    /// The broker at `addr`, with the defaults above.
    pub fn new(addr: impl Into<AmqpAddr>) -> Self {
        Self {
            addr: addr.into(),
            connection_name: "prereq".to_owned(),
            delay_mode: DelayMode::Auto,
            connect_timeout: CONNECT_TIMEOUT,
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            max_delay: DEFAULT_MAX_DELAY,
            tls: Tls::new(),
        }
    }

    /// The broker at `AMQP_ADDR`, else the local default; TLS settings from
    /// [`Tls::from_env`].
    pub fn from_env() -> Self {
        Self::new(AmqpAddr::from_env()).tls(Tls::from_env())
    }

    /// TLS settings for an `amqps://` address: authorities to trust besides the system's, a
    /// client certificate. See [`Tls`].
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }

    /// The connection name the management UI and `rabbitmqctl list_connections` show.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// How deferred copies are delayed.
    pub fn delay_mode(mut self, mode: DelayMode) -> Self {
        self.delay_mode = mode;
        self
    }

    /// How long each connection attempt may take (the plugin probe, the pre-flight connection,
    /// the kept connection, every reconnection attempt). A broker that has not answered by then
    /// (a wrong port, a proxy or a firewall that accepts and stays silent) fails the attempt
    /// with a clear error. [`Broker::close`] waits for the broker's confirmation as long, at
    /// most. Zero is raised to 1 ms.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long a lost connection may stay down before the transports give up: their consumers
    /// then stop with an error. Until then prereq retries every 100 to 500 ms, so it consumes
    /// again within about half a second of the broker accepting connections. Sooner when the
    /// client's recovery is not making progress: a connection still down 3 connect timeouts
    /// after the broker took a probe connection counts as lost then. Zero is raised to 1 ms.
    pub fn reconnect_timeout(mut self, timeout: Duration) -> Self {
        self.reconnect_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The broker's acknowledgement timeout (its `consumer_timeout`): a consumer holds messages
    /// for at most half of it, so that the broker never takes them back.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// The longest delay of a deferred copy; longer ones are clamped (never above
    /// [`MAX_BROKER_DELAY`], about 49 days).
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max.min(MAX_BROKER_DELAY);
        self
    }

    /// The address.
    pub fn addr(&self) -> &AmqpAddr {
        &self.addr
    }

    /// The acknowledgement timeout.
    pub fn get_ack_timeout(&self) -> Duration {
        self.ack_timeout
    }

    pub(crate) fn get_max_delay(&self) -> Duration {
        self.max_delay
    }

    pub(crate) fn get_reconnect_timeout(&self) -> Duration {
        self.reconnect_timeout
    }

    /// The TLS settings.
    pub fn get_tls(&self) -> &Tls {
        &self.tls
    }
}

/// One connection to RabbitMQ, shared by every transport and publisher made from it. Cheap to
/// clone.
///
/// [`Broker::connect`] probes for the delayed-message plugin (once), connects (failing fast
/// on a wrong address, password or port), and keeps the connection up (bounded reconnect
/// backoff). [`Broker::transport`](crate::amqp::Broker::transport) declares a [`Route`] and returns the transport a consumer
/// runs on; call it once per consumer.
///
/// ```no_run
/// use prereq::amqp::{Broker, BrokerOptions, Exchange, Queue, Route};
///
/// # async fn f() -> Result<(), prereq::amqp::AmqpError> {
/// let broker = Broker::connect(BrokerOptions::from_env()).await?;
/// println!("deferring through {}", broker.mechanism());
/// let orders = broker
///     .transport(Route::new(Queue::classic("orders").bound_to(Exchange::direct("shop"), "order")))
///     .await?;
/// let refunds = broker
///     .transport(Route::new(Queue::classic("refunds").bound_to(Exchange::direct("shop"), "refund")))
///     .await?;
/// # let _ = (orders, refunds); Ok(()) }
/// ```
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    options: BrokerOptions,
    mechanism: DelayMechanism,
    connection: Connection,
    /// The TLS configuration connections are opened with ([`BrokerOptions::tls`], its files
    /// read): the watcher's probe connections use it too.
    tls: OwnedTLSConfig,
    /// Set (for good) once the connection is lost and not recovered within the reconnect
    /// timeout: every transport ends its consumer with this error.
    lost: watch::Sender<Option<AmqpError>>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("addr", &self.inner.options.addr)
            .field("mechanism", &self.inner.mechanism)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Resolve the delay mechanism (probing for the plugin under [`DelayMode::Auto`], on a
    /// throw-away connection), then connect with automatic recovery.
    pub async fn connect(options: BrokerOptions) -> Result<Self, AmqpError> {
        let addr = &options.addr;
        addr.validate()?;
        let tls = options.tls.load(addr)?;
        let mechanism =
            delay::resolve_within(options.delay_mode, addr, &tls, options.connect_timeout).await?;
        info!(target: "prereq", mechanism = %mechanism, addr = %addr, "delay mechanism selected");
        let connection = connect_within(
            addr,
            &tls,
            &options.connection_name,
            options.connect_timeout,
            options.reconnect_timeout,
        )
        .await?;
        Ok(Self::start(connection, mechanism, options, tls))
    }

    /// A broker handle on a connection you opened yourself (the escape hatch to lapin). The
    /// delay mechanism must be given: probing for the plugin would close a connection that
    /// lacks it. `options` gives the address (for redacted errors) and the limits.
    pub fn from_connection(
        connection: Connection,
        mechanism: DelayMechanism,
        options: BrokerOptions,
    ) -> Self {
        // Only the watcher's probe connections use it: without it (a file unreadable now),
        // they go without, and a broker that needs it only looks unreachable to them.
        let tls = options.tls.load(&options.addr).unwrap_or_default();
        Self::start(connection, mechanism, options, tls)
    }

    fn start(
        connection: Connection,
        mechanism: DelayMechanism,
        options: BrokerOptions,
        tls: OwnedTLSConfig,
    ) -> Self {
        let inner = Arc::new(Inner {
            options,
            mechanism,
            connection,
            tls,
            lost: watch::channel(None).0,
        });
        tokio::spawn(watch_connection(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Declare `route` (checking it first) without consuming it: for a producer that may start
    /// before any consumer.
    pub async fn declare(&self, route: &Route) -> Result<(), AmqpError> {
        route.check()?;
        // A failed declaration closes its channel: declare on one of its own.
        let declaring = self.channel("open a declaring channel").await?;
        declare_route(&declaring, route, self.mechanism(), self.addr()).await?;
        let _ = declaring.close(200, "declared".into()).await;
        Ok(())
    }

    /// The delay mechanism in use.
    pub fn mechanism(&self) -> DelayMechanism {
        self.inner.mechanism
    }

    /// The options.
    pub fn options(&self) -> &BrokerOptions {
        &self.inner.options
    }

    /// The connection name.
    pub(crate) fn connection_name(&self) -> &str {
        &self.inner.options.connection_name
    }

    /// The broker's address (shown redacted).
    pub fn addr(&self) -> &AmqpAddr {
        &self.inner.options.addr
    }

    /// The connection (the escape hatch to lapin).
    pub fn connection(&self) -> &Connection {
        &self.inner.connection
    }

    /// Close the connection (`200 OK`): every transport's unsettled deliveries go back to their
    /// queues. Bounded by the connect timeout: a broker that has not confirmed by then (it went
    /// silent) is an error, never a wait without end; the broker then gives the deliveries back
    /// when it notices the connection gone.
    pub async fn close(&self) -> Result<(), AmqpError> {
        let deadline = self.inner.options.connect_timeout;
        let closing = self.inner.connection.close(200, "prereq: closing".into());
        match tokio::time::timeout(deadline, closing).await {
            Ok(closed) => closed.map_err(|e| self.addr().broker_error("close connection", &e)),
            Err(_) => Err(AmqpError::Broker {
                operation: "close connection".to_owned(),
                message: format!("no answer within {deadline:?} (the connect timeout)"),
            }),
        }
    }

    /// A subscription to the connection being lost for good.
    pub(crate) fn lost(&self) -> watch::Receiver<Option<AmqpError>> {
        self.inner.lost.subscribe()
    }

    /// A new channel on the connection, opened within [`WRITE_WAIT`].
    pub(crate) async fn channel(&self, what: &str) -> Result<lapin::Channel, AmqpError> {
        answered("opening a channel", self.inner.connection.create_channel())
            .await
            .map_err(|e| self.addr().broker_error(what, &e))
    }

    /// Is the connection up (not recovering)?
    pub(crate) fn connected(&self) -> bool {
        self.inner.connection.status().connected()
    }
}

/// How long a call that writes to the connection (a publish, an acknowledgement, opening a
/// channel) may wait for lapin's answer. lapin never answers one whose frames were queued as its
/// connection failed, and (when its recovery raced the failure) one made on a channel of a
/// connection that never comes back: unbounded, the caller would wait for good, deaf to the
/// connection being declared lost. The connect timeout's default: a connection that cannot
/// take one frame in that time is as good as gone.
pub(crate) const WRITE_WAIT: Duration = Duration::from_secs(10);

/// `call`'s answer, or an IO error (`TimedOut`) naming `what` if none came within
/// [`WRITE_WAIT`].
pub(crate) async fn answered<T>(
    what: &str,
    call: impl Future<Output = lapin::Result<T>>,
) -> lapin::Result<T> {
    match tokio::time::timeout(WRITE_WAIT, call).await {
        Ok(answer) => answer,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} was not answered within {WRITE_WAIT:?}"),
        )
        .into()),
    }
}

/// How often [`watch_connection`] looks at the connection.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// How long past the connect timeout a connection may stay down before [`watch_connection`]
/// asks the broker whether it takes new connections (one reconnection attempt gives up after
/// the connect timeout, and the next follows within half a second).
const PROBE_AFTER: Duration = Duration::from_secs(2);

/// Declare the connection lost when it has been down for longer than the reconnect timeout, or
/// when the broker has been taking new connections for 3 connect timeouts while this one has not
/// come back.
///
/// lapin's recovery alone may never end: a peer that accepts the reconnection and then stays
/// silent holds it forever, and a consumer's stream just waits meanwhile. And sometimes it never
/// starts: after a write failed as the connection broke, lapin made no new connection at all
/// (about one cut in three during a burst of publishes, `tests/amqp_partitions.rs`). So the
/// connection's state is watched, and a connection that is not back within the reconnect
/// timeout, or not back 3 connect timeouts after a probe connection to the same broker
/// succeeded, ends every transport's deliveries with an error. Ends with the broker handle.
async fn watch_connection(inner: Weak<Inner>) {
    let mut down_since: Option<tokio::time::Instant> = None;
    // While down: when a probe connection last succeeded, and when one was last tried.
    let mut reachable_since: Option<tokio::time::Instant> = None;
    let mut probed_at: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let status = inner.connection.status();
        if status.connected() {
            down_since = None;
            reachable_since = None;
            probed_at = None;
            continue;
        }
        if status.closing() || status.closed() {
            // Closed on purpose (`close`).
            return;
        }
        let limit = inner.options.reconnect_timeout;
        let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= limit {
            inner.lost.send_replace(Some(AmqpError::Connect {
                addr: inner.options.addr.redacted(),
                message: format!(
                    "connection lost, and not recovered within {limit:?} (the reconnect timeout)"
                ),
            }));
            return;
        }
        let connect = inner.options.connect_timeout;
        if let Some(at) = reachable_since
            && at.elapsed() >= connect * 3
        {
            inner.lost.send_replace(Some(AmqpError::Connect {
                addr: inner.options.addr.redacted(),
                message: format!(
                    "connection lost, and not recovered {:?} after the broker took a new \
                     connection again: the client's recovery is not making progress",
                    at.elapsed()
                ),
            }));
            return;
        }
        if reachable_since.is_none()
            && since.elapsed() >= connect + PROBE_AFTER
            && probed_at.is_none_or(|p| p.elapsed() >= connect + PROBE_AFTER)
        {
            probed_at = Some(tokio::time::Instant::now());
            let (addr, tls, name) = (
                inner.options.addr.clone(),
                inner.tls.clone(),
                inner.options.connection_name.clone(),
            );
            // Not kept alive by its watcher while the probe runs.
            drop(inner);
            if accepts(&addr, &tls, &name, connect).await {
                reachable_since = Some(tokio::time::Instant::now());
            }
        }
    }
}
