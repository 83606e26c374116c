//! Every connection has a deadline. A peer that accepts TCP connections and then says nothing
//! (a wrong port, a proxy, a black-holing firewall) makes the plugin probe, the pre-flight
//! connection, the transport's own connection and its reconnection fail with a clear error
//! within the configured time, never hang, and never show the password.
//!
//! Durations are not asserted: each attempt is bounded by a generous outer timeout, and the
//! error must say which deadline ran out.
#![cfg(feature = "amqp")]

#[path = "support/silent.rs"]
mod silent;
mod support;

use std::time::Duration;

use prereq::amqp::{
    AmqpAddr, AmqpError, AmqpTransport, Broker, BrokerOptions, DelayMode, Queue, Route,
};
use prereq::transport::{Demand, Transport};
use silent::Silent;

const PASSWORD: &str = "S1lent-S3cret";
/// The deadline the tests configure.
const DEADLINE: Duration = Duration::from_secs(1);
/// How long a test waits before calling an attempt hung.
const HUNG: Duration = Duration::from_secs(60);

fn silent_addr(listener: &Silent) -> AmqpAddr {
    AmqpAddr::new(format!(
        "amqp://alice:{PASSWORD}@127.0.0.1:{}/%2f",
        listener.port
    ))
}

/// Run `attempt` under the outer timeout; it must fail with a connect error that names the
/// deadline and not the password.
async fn fails_on_the_deadline<T: std::fmt::Debug>(
    what: &str,
    attempt: impl Future<Output = Result<T, AmqpError>>,
    deadline: &str,
) -> AmqpError {
    let e = match tokio::time::timeout(HUNG, attempt).await {
        Err(_) => panic!("{what}: still waiting after {HUNG:?}"),
        Ok(Ok(v)) => panic!("{what}: succeeded?! {v:?}"),
        Ok(Err(e)) => e,
    };
    let text = format!("{e} | {e:?}");
    assert!(
        matches!(e, AmqpError::Connect { .. }),
        "{what}: a connect error, got {text}"
    );
    assert!(
        text.contains(deadline),
        "{what}: the error should say the deadline ran out ({deadline:?}): {text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "{what}: leaks the password: {text}"
    );
    assert!(text.contains("alice:***@127.0.0.1"), "{what}: {text}");
    e
}

fn options(addr: AmqpAddr, mode: DelayMode) -> BrokerOptions {
    BrokerOptions::new(addr)
        .delay_mode(mode)
        .connect_timeout(DEADLINE)
}

fn route() -> Route {
    let p = support::unique("deadline");
    Route::new(Queue::classic(format!("{p}payments")))
        .registrations(Queue::classic(format!("{p}clients")))
}

/// Connect (the plugin probe, the pre-flight, the kept connection), then declare `route`.
async fn transport(options: BrokerOptions, route: Route) -> Result<AmqpTransport, AmqpError> {
    Broker::connect(options).await?.transport(route).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_fails_every_connection_within_the_deadline() {
    let listener = Silent::start(None, 0).await;
    let addr = silent_addr(&listener);
    let probe = "plugin probe: no answer within 1s";
    let open = "no answer within 1s (the connect timeout)";
    // With the plugin probe first (Auto, DelayedExchange), or straight to the pre-flight.
    for (mode, deadline) in [
        (DelayMode::Auto, probe),
        (DelayMode::DelayedExchange, probe),
        (DelayMode::DelayQueues, open),
    ] {
        fails_on_the_deadline(
            &format!("Broker::connect({mode:?})"),
            Broker::connect(options(addr.clone(), mode)),
            deadline,
        )
        .await;
    }
    assert!(
        listener.accepted() >= 3,
        "the listener took the connections (so silence, not refusal, was tested): {}",
        listener.accepted()
    );
}

/// Without configuring anything, every connection gives up too (after `CONNECT_TIMEOUT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_deadline_is_bounded_too() {
    let listener = Silent::start(None, 0).await;
    let addr = silent_addr(&listener);
    let default = prereq::amqp::CONNECT_TIMEOUT;
    let probe = format!("plugin probe: no answer within {default:?}");
    let open = format!("no answer within {default:?} (the connect timeout)");
    tokio::join!(
        fails_on_the_deadline(
            "Broker::connect, default options",
            Broker::connect(BrokerOptions::new(addr.clone())),
            &probe,
        ),
        fails_on_the_deadline(
            "Broker::connect, no probe",
            Broker::connect(BrokerOptions::new(addr.clone()).delay_mode(DelayMode::DelayQueues)),
            &open,
        ),
    );
}

/// The broker answers the first connections, then the next one meets silence: each later
/// stage of `AmqpTransport::connect` is bounded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_turns_silent_fails_each_later_connection_within_the_deadline() {
    if support::broker().await.is_none() {
        return;
    }
    let broker = support::addr();
    let open = "no answer within 1s (the connect timeout)";
    // (delay mode, connections that reach the broker, the one that meets silence)
    let cases = [
        (
            DelayMode::Auto,
            1,
            "the pre-flight connection after the probe",
        ),
        (
            DelayMode::Auto,
            2,
            "the transport's connection after the pre-flight",
        ),
        (
            DelayMode::DelayQueues,
            1,
            "the transport's connection after the pre-flight",
        ),
    ];
    for (mode, forward, stage) in cases {
        let listener = Silent::start(Some(silent::host_port(&broker)), forward).await;
        // The broker's credentials, through the listener: the password shown nowhere is the
        // broker's own.
        let addr = listener.addr(&broker);
        let password = url::Url::parse(broker.expose().trim())
            .ok()
            .and_then(|u| u.password().map(str::to_owned))
            .unwrap_or_default();
        let attempt = tokio::time::timeout(HUNG, transport(options(addr, mode), route())).await;
        let e = match attempt {
            Err(_) => panic!("{stage}: still waiting after {HUNG:?}"),
            Ok(Ok(t)) => panic!("{stage}: connected?! {t:?}"),
            Ok(Err(e)) => e,
        };
        let text = format!("{e} | {e:?}");
        assert!(matches!(e, AmqpError::Connect { .. }), "{stage}: {text}");
        assert!(text.contains(open), "{stage}: {text}");
        assert!(
            password.len() < 3 || !text.contains(&format!(":{password}@")),
            "{stage}: {text}"
        );
        assert_eq!(listener.accepted(), forward + 1, "{stage}");
    }
}

/// A transport connected through a [`Silent`] listener that forwards its pre-flight and its own
/// connection to the broker, with a reconnect timeout of 2 s; `None` without a broker.
async fn through_a_listener() -> Option<(Silent, support::Cleanup, AmqpTransport)> {
    support::broker().await?;
    let broker = support::addr();
    let listener = Silent::start(Some(silent::host_port(&broker)), 2).await;
    let cleanup = support::Cleanup::new();
    let route = route();
    cleanup.route(&route);
    let options = options(listener.addr(&broker), DelayMode::DelayQueues)
        .reconnect_timeout(Duration::from_secs(2));
    let transport = tokio::time::timeout(HUNG, transport(options, route))
        .await
        .expect("connects in time")
        .expect("connects");
    Some((listener, cleanup, transport))
}

/// The transport's next delivery must be an error that says the reconnect timeout (2 s) ran
/// out: the connection's watch or the consumer's own retries, whichever gives up first.
async fn ends_at_the_reconnect_timeout(transport: &AmqpTransport) {
    let got = tokio::time::timeout(HUNG, transport.recv())
        .await
        .unwrap_or_else(|_| panic!("still waiting for the connection after {HUNG:?}"));
    let e = match got {
        Err(e) => e,
        Ok(d) => panic!("a delivery or an end instead of an error: {d:?}"),
    };
    let text = format!("{e} | {e:?}");
    assert!(text.contains("within 2s (the reconnect timeout)"), "{text}");
}

/// Connected, then the connection drops and every reconnection meets silence: the transport
/// gives up after its reconnect timeout, with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_that_cannot_come_back_ends_with_a_clear_error() {
    let Some((listener, _cleanup, transport)) = through_a_listener().await else {
        return;
    };
    transport.start(Demand::new(10, 1)).await.expect("consumes");
    listener.silence();
    assert!(listener.cut() >= 1, "the transport's connection is cut");
    // The cut may also land while the consumer's channel opens: the same end either way.
    ends_at_the_reconnect_timeout(&transport).await;
    // How many reconnection attempts lapin made meanwhile (it may be none, when another test of
    // this binary holds lapin's I/O in a silent handshake): informative.
    println!(
        "connections accepted by the silent peer: {}",
        listener.accepted()
    );
}

/// The connection drops while the consumers' first channel opens: the first subscription rides
/// the same recovery as a later one, and the transport gives up at the reconnect timeout with an
/// error that says so — not with the channel's I/O error the moment the first channel fails to
/// open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_before_the_first_subscription_is_waited_for_too() {
    let Some((listener, _cleanup, transport)) = through_a_listener().await else {
        return;
    };
    listener.cut_at_next_channel_open();
    transport.start(Demand::new(10, 1)).await.expect("starts");
    ends_at_the_reconnect_timeout(&transport).await;
}

/// Connected, then the broker stops answering (the connection stays open): closing the broker
/// handle ends on the connect timeout with an error that says so, instead of waiting for a
/// `close-ok` that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_whose_broker_went_silent_ends_on_the_deadline() {
    if support::broker().await.is_none() {
        return;
    }
    let broker = support::addr();
    // The pre-flight connection and the kept one reach the broker.
    let listener = Silent::start(Some(silent::host_port(&broker)), 2).await;
    let options = options(listener.addr(&broker), DelayMode::DelayQueues);
    let connected = tokio::time::timeout(HUNG, Broker::connect(options))
        .await
        .expect("connects in time")
        .expect("connects");
    listener.freeze();
    let closed = tokio::time::timeout(HUNG, connected.close())
        .await
        .unwrap_or_else(|_| panic!("close still waiting after {HUNG:?}"));
    let e = closed.expect_err("a broker that never answered cannot have closed");
    let text = format!("{e} | {e:?}");
    assert!(matches!(e, AmqpError::Broker { .. }), "{text}");
    assert!(
        text.contains("close connection") && text.contains("within 1s (the connect timeout)"),
        "{text}"
    );
}
