//! A TCP listener that accepts connections and never says a word (what a wrong port, a proxy
//! or a black-holing firewall looks like to a client), optionally forwarding the first few
//! connections to a real broker, and able to cut those and turn silent later.
//!
//! Include with `#[path = "support/silent.rs"] mod silent;`.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prereq::amqp::AmqpAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// See the module documentation. Dropping it closes every connection.
pub struct Silent {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    silenced: Arc<AtomicBool>,
    /// Armed: the next `channel.open` a client sends ends its connection instead.
    cut_on_channel_open: Arc<AtomicBool>,
    /// Set: forwarded connections stay open and carry nothing more, either way.
    frozen: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Silent {
    /// Accept on a free loopback port; forward the first `forward` connections to `target`
    /// (`host:port`), keep every later one open and silent.
    pub async fn start(target: Option<String>, forward: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let silenced = Arc::new(AtomicBool::new(false));
        let cut_on_channel_open = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (a, s, l) = (accepted.clone(), silenced.clone(), links.clone());
        let armed = cut_on_channel_open.clone();
        let ice = frozen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = a.fetch_add(1, Ordering::SeqCst);
                let target = target
                    .clone()
                    .filter(|_| n < forward && !s.load(Ordering::SeqCst));
                let (armed, ice) = (armed.clone(), ice.clone());
                let link = tokio::spawn(async move {
                    match target {
                        Some(target) => {
                            if let Ok(upstream) = TcpStream::connect(&target).await {
                                forward_until_armed_open(client, upstream, armed, ice).await;
                            }
                        }
                        // Hold the socket open, read nothing, answer nothing.
                        None => std::future::pending::<()>().await,
                    }
                });
                l.lock().unwrap().push(link);
            }
        });
        Self {
            port,
            accepted,
            silenced,
            cut_on_channel_open,
            frozen,
            links,
            accept,
        }
    }

    /// `addr` pointed at this listener (same credentials and vhost).
    pub fn addr(&self, addr: &AmqpAddr) -> AmqpAddr {
        let mut url = url::Url::parse(addr.expose().trim()).expect("a well-formed address");
        url.set_host(Some("127.0.0.1")).expect("set host");
        url.set_port(Some(self.port)).expect("set port");
        AmqpAddr::new(String::from(url))
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// From now on, every new connection stays silent.
    pub fn silence(&self) {
        self.silenced.store(true, Ordering::SeqCst);
    }

    /// From now on, every new connection stays silent, and the next `channel.open` a client
    /// sends on a forwarded connection closes that connection instead of reaching the broker:
    /// a connection lost while a channel opens.
    pub fn cut_at_next_channel_open(&self) {
        self.silence();
        self.cut_on_channel_open.store(true, Ordering::SeqCst);
    }

    /// From now on, the connections forwarded so far stay open and carry nothing more, either
    /// way: a broker that stopped answering.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Close every connection accepted so far (new ones are still accepted).
    pub fn cut(&self) -> usize {
        let links: Vec<_> = self.links.lock().unwrap().drain(..).collect();
        let n = links.len();
        for l in links {
            l.abort();
        }
        n
    }
}

/// Forward both ways until either side ends, or until the client sends a `channel.open` method
/// frame (type 1, a channel other than 0, class 20, method 10) while `armed` is set; while
/// `frozen` is set, hold both sides open and forward nothing.
async fn forward_until_armed_open(
    client: TcpStream,
    upstream: TcpStream,
    armed: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
) {
    let (client_rx, client_tx) = client.into_split();
    let (upstream_rx, upstream_tx) = upstream.into_split();
    // A `channel.open` method frame (type 1, a channel other than 0, class 20, method 10) in
    // what the client sends.
    let channel_open = |chunk: &[u8]| {
        chunk
            .windows(11)
            .any(|f| f[0] == 1 && (f[1], f[2]) != (0, 0) && f[7..11] == [0, 20, 0, 10])
    };
    let to_broker = relay(client_rx, upstream_tx, &frozen, |chunk: &[u8]| {
        channel_open(chunk) && armed.swap(false, Ordering::SeqCst)
    });
    let to_client = relay(upstream_rx, client_tx, &frozen, |_: &[u8]| false);
    tokio::select! {
        () = to_broker => {}
        () = to_client => {}
    }
}

/// Copy `rx` to `tx` until either ends or a chunk read makes `ends_here` true (that chunk is not
/// passed on); while `frozen` is set, hold both open and pass nothing.
async fn relay(
    mut rx: tokio::net::tcp::OwnedReadHalf,
    mut tx: tokio::net::tcp::OwnedWriteHalf,
    frozen: &AtomicBool,
    mut ends_here: impl FnMut(&[u8]) -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if ends_here(&buf[..n]) {
            return;
        }
        if frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if tx.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `host:port` of a well-formed AMQP address (port 5672 when absent).
pub fn host_port(addr: &AmqpAddr) -> String {
    let url = url::Url::parse(addr.expose().trim()).expect("a well-formed address");
    format!(
        "{}:{}",
        url.host_str().expect("a host"),
        url.port().unwrap_or(5672)
    )
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
