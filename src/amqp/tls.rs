//! TLS for `amqps://` addresses: authorities to trust besides the system's, and a client
//! certificate for brokers that ask for one (mutual TLS).
//!
//! PEM files are read (and checked) each time prereq opens a connection of its own, so a
//! rotated certificate is used from the next start of a [`Broker`](super::Broker); a broken
//! file fails that start with an error naming the file, never its content.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::addr::AmqpAddr;
use super::error::AmqpError;

/// The environment variable [`Tls::from_env`] reads a trusted authority's PEM file from.
pub const AMQP_TLS_CA_FILE_ENV: &str = "AMQP_TLS_CA_FILE";
/// The environment variable [`Tls::from_env`] reads the client certificate's PEM file from.
pub const AMQP_TLS_CERT_FILE_ENV: &str = "AMQP_TLS_CERT_FILE";
/// The environment variable [`Tls::from_env`] reads the client key's PEM file from.
pub const AMQP_TLS_KEY_FILE_ENV: &str = "AMQP_TLS_KEY_FILE";

/// TLS settings for an `amqps://` address. The default trusts the system's roots (and the
/// certificates of the `SSL_CERT_FILE` file, when that variable is set) and sends no client
/// certificate; this adds to it:
///
/// - [`trust_file`](Tls::trust_file) / [`trust_pem`](Tls::trust_pem): an authority (a
///   private CA) to trust as well, for a broker whose certificate it signed;
/// - [`client_cert_files`](Tls::client_cert_files) / [`client_cert_pem`](Tls::client_cert_pem):
///   the certificate (chain) and private key prereq presents to a broker that verifies its
///   clients (`ssl_options.verify = verify_peer`, `fail_if_no_peer_cert = true`). The key is an
///   unencrypted PEM key (PKCS#8, PKCS#1 or SEC1). To log in by the certificate alone, with
///   no password (RabbitMQ's `EXTERNAL` mechanism, plugin `rabbitmq_auth_mechanism_ssl`), add
///   `?auth_mechanism=external` to the address and leave its user and password out.
///
/// Given to [`BrokerOptions::tls`](super::BrokerOptions::tls) and to
/// [`DeadLetterQueue::tls`](super::replay::DeadLetterQueue::tls). Settings with an `amqp://`
/// (plain TCP) address are refused at connect: a certificate that would not be used is a
/// mistake worth hearing about.
///
/// `Debug` shows the files' paths and the inline PEMs' sizes, never a key.
///
/// ```no_run
/// use prereq::amqp::{Broker, BrokerOptions, Tls};
///
/// # async fn f() -> Result<(), prereq::amqp::AmqpError> {
/// let tls = Tls::new()
///     .trust_file("/etc/prereq/ca.pem")
///     .client_cert_files("/etc/prereq/client.pem", "/etc/prereq/client.key");
/// let broker = Broker::connect(
///     BrokerOptions::new("amqps://orders:secret@rabbit.internal:5671/%2f").tls(tls),
/// )
/// .await?;
/// # let _ = broker; Ok(()) }
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct Tls {
    /// Authorities trusted besides the system's roots, in the order given.
    trust: Vec<Pem>,
    /// The client certificate (chain) and its private key, presented when the broker asks.
    client: Option<(Pem, Pem)>,
    /// What made the settings unusable (an environment with a certificate and no key): reported
    /// at connect, as [`AmqpError::Config`].
    problem: Option<String>,
}

/// PEM data, or the file it is read from at connect.
#[derive(Clone)]
enum Pem {
    Inline(Arc<[u8]>),
    File(PathBuf),
}

impl Pem {
    fn read(&self, what: &str) -> Result<Arc<[u8]>, AmqpError> {
        match self {
            Self::Inline(pem) => Ok(Arc::clone(pem)),
            Self::File(path) => std::fs::read(path).map(Arc::from).map_err(|e| {
                AmqpError::Config(format!(
                    "TLS: cannot read the {what} file {}: {e}",
                    path.display()
                ))
            }),
        }
    }

    /// Where it comes from, for errors and `Debug`: the path, or the inline PEM's size.
    fn source(&self) -> String {
        match self {
            Self::Inline(pem) => format!("inline PEM, {} bytes", pem.len()),
            Self::File(path) => format!("file {}", path.display()),
        }
    }
}

impl Tls {
    /// The system's roots, no client certificate.
    pub const fn new() -> Self {
        Self {
            trust: Vec::new(),
            client: None,
            problem: None,
        }
    }

    /// From the environment: [`AMQP_TLS_CA_FILE_ENV`] (a trusted authority's PEM file),
    /// [`AMQP_TLS_CERT_FILE_ENV`] and [`AMQP_TLS_KEY_FILE_ENV`] (the client certificate and its
    /// key, both or neither). Unset or empty variables add nothing; a certificate without a key
    /// (or the reverse) fails the connection with an error naming the missing variable.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let mut tls = Self::new();
        if let Some(ca) = var(AMQP_TLS_CA_FILE_ENV) {
            tls = tls.trust_file(ca);
        }
        match (var(AMQP_TLS_CERT_FILE_ENV), var(AMQP_TLS_KEY_FILE_ENV)) {
            (Some(cert), Some(key)) => tls = tls.client_cert_files(cert, key),
            (None, None) => {}
            (cert, _) => {
                let (set, unset) = if cert.is_some() {
                    (AMQP_TLS_CERT_FILE_ENV, AMQP_TLS_KEY_FILE_ENV)
                } else {
                    (AMQP_TLS_KEY_FILE_ENV, AMQP_TLS_CERT_FILE_ENV)
                };
                tls.problem = Some(format!(
                    "TLS: {set} is set but {unset} is not: a client certificate needs both"
                ));
            }
        }
        tls
    }

    /// Trust the authorities of this PEM file as well (one certificate or several).
    pub fn trust_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.trust.push(Pem::File(path.into()));
        self
    }

    /// Trust the authorities of this PEM text as well (one certificate or several).
    pub fn trust_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.trust.push(Pem::Inline(pem.into().into()));
        self
    }

    /// Present this client certificate (PEM, the client's first, then any intermediates) with
    /// this private key (PEM, unencrypted) to a broker that asks for one.
    pub fn client_cert_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client = Some((Pem::File(cert.into()), Pem::File(key.into())));
        self
    }

    /// As [`client_cert_files`](Tls::client_cert_files), from PEM text held in memory (a
    /// secret store's answer, say).
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client = Some((
            Pem::Inline(cert.into().into()),
            Pem::Inline(key.into().into()),
        ));
        self
    }

    /// Nothing added to the default (the system's roots, no client certificate).
    pub fn is_default(&self) -> bool {
        self.trust.is_empty() && self.client.is_none() && self.problem.is_none()
    }

    /// The configuration lapin connects with: files read, PEM checked, and the address checked
    /// to be `amqps://` when anything was added. Errors name files, never their content.
    pub(crate) fn load(&self, addr: &AmqpAddr) -> Result<OwnedTLSConfig, AmqpError> {
        if let Some(problem) = &self.problem {
            return Err(AmqpError::Config(problem.clone()));
        }
        if self.is_default() {
            return Ok(OwnedTLSConfig::default());
        }
        let scheme = addr.expose().trim().get(..8);
        if !scheme.is_some_and(|s| s.eq_ignore_ascii_case("amqps://")) {
            return Err(AmqpError::Config(format!(
                "TLS settings were given, but {addr} is not an amqps:// address: they would \
                 not be used"
            )));
        }
        let mut chain = String::new();
        for pem in &self.trust {
            let text = certificates(pem, "trusted authority")?;
            chain.push_str(&text);
            chain.push('\n');
        }
        let identity = match &self.client {
            None => None,
            Some((cert, key)) => {
                let cert_pem = certificates(cert, "client certificate")?;
                let key_pem = key.read("client key")?;
                if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
                    return Err(AmqpError::Config(format!(
                        "TLS: the client key ({}) holds no PEM private key (PKCS#8, PKCS#1 or \
                         SEC1, unencrypted)",
                        key.source()
                    )));
                }
                Some(OwnedIdentity::PKCS8 {
                    pem: cert_pem.into_bytes(),
                    key: key_pem.to_vec(),
                })
            }
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain: (!chain.is_empty()).then_some(chain),
        })
    }
}

/// The PEM text of `pem`, checked to hold at least one certificate and nothing unreadable.
fn certificates(pem: &Pem, what: &str) -> Result<String, AmqpError> {
    let bytes = pem.read(what)?;
    let invalid =
        |why: &str| AmqpError::Config(format!("TLS: the {what} ({}) {why}", pem.source()));
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        cert.map_err(|e| invalid(&format!("is not valid PEM: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid("holds no PEM certificate"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid("is not UTF-8 text"))
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trust: Vec<String> = self.trust.iter().map(Pem::source).collect();
        let client = self.client.as_ref().map(|(cert, key)| match key {
            Pem::File(_) => format!("{} with key {}", cert.source(), key.source()),
            Pem::Inline(_) => format!("{} with an inline key", cert.source()),
        });
        f.debug_struct("Tls")
            .field("trust", &trust)
            .field("client", &client)
            .field("problem", &self.problem)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIPpf7qQwUn3mUe6lV2q3kZyT0k3lJ1mGJd9cSg2vqMPi\n-----END PRIVATE KEY-----\n";

    fn tls_addr() -> AmqpAddr {
        AmqpAddr::new("amqps://guest:guest@localhost:5671/%2f")
    }

    fn config_error(r: Result<OwnedTLSConfig, AmqpError>) -> String {
        match r {
            Err(AmqpError::Config(m)) => m,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn the_default_adds_nothing_on_either_scheme() {
        for addr in ["amqp://g:g@h/%2f", "amqps://g:g@h/%2f"] {
            let config = Tls::new().load(&AmqpAddr::new(addr)).expect("default");
            assert_eq!(config, OwnedTLSConfig::default());
        }
    }

    #[test]
    fn settings_with_a_plain_address_are_refused() {
        let m = config_error(
            Tls::new()
                .trust_pem("x")
                .load(&AmqpAddr::new("amqp://guest:secret@h/%2f")),
        );
        assert!(m.contains("not an amqps:// address"), "{m}");
        assert!(!m.contains("secret"), "{m}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let m = config_error(
            Tls::new()
                .trust_file("/nonexistent/ca.pem")
                .load(&tls_addr()),
        );
        assert!(
            m.contains("trusted authority file /nonexistent/ca.pem"),
            "{m}"
        );
    }

    #[test]
    fn text_without_a_certificate_is_refused_and_a_key_is_never_shown() {
        let m = config_error(Tls::new().trust_pem("not a pem").load(&tls_addr()));
        assert!(m.contains("holds no PEM certificate"), "{m}");
        // A key given where a certificate belongs: refused without printing it.
        let m = config_error(Tls::new().client_cert_pem(KEY, KEY).load(&tls_addr()));
        assert!(m.contains("client certificate (inline PEM"), "{m}");
        assert!(!m.contains("MC4CAQAw"), "{m}");
    }

    #[test]
    fn debug_shows_sources_never_a_key() {
        let tls = Tls::new().trust_file("ca.pem").client_cert_pem("cert", KEY);
        let shown = format!("{tls:?}");
        assert!(shown.contains("ca.pem"), "{shown}");
        assert!(shown.contains("an inline key"), "{shown}");
        assert!(
            !shown.contains("MC4CAQAw") && !shown.contains("PRIVATE"),
            "{shown}"
        );
    }
}
