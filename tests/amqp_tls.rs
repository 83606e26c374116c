//! prereq over TLS (`amqps://`) against a real TLS listener: a private RabbitMQ node (its own
//! name, ports, cookie and data, see `tests/support/node.rs`) with a TLS listener whose
//! certificate a private certificate authority of the test's own signed (for `127.0.0.1` and
//! `localhost`).
//!
//! What a user runs, as child processes: the README's walk-through with the examples, the
//! address `amqps://guest:guest@127.0.0.1:<port>/%2f` in `AMQP_ADDR`, the authority trusted
//! through `SSL_CERT_FILE` (as `docs/guarantees.md` tells for a private CA): a payment is held,
//! its client's registration releases it, the consumer stops cleanly, and the broker shows
//! every connection of the walk as TLS. Trusting another authority instead, the consumer
//! refuses the broker's certificate: it exits with an error naming the certificate, never the
//! password.
//!
//! Without `rabbitmq-server` installed it skips with a printed reason (fails under
//! `PREREQ_REQUIRE_BROKER=1`). About 20 s, most of it the node's start.
#![cfg(all(feature = "amqp", feature = "sqlite"))]

#[path = "support/db.rs"]
mod db;
#[path = "support/drill.rs"]
mod drill;
#[path = "support/node.rs"]
mod node;

use std::path::{Path, PathBuf};
use std::time::Duration;

use db::ExampleChild;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// Bound on waiting for something that must happen (a start, a line, an exit): a failure
/// bound, not a speed claim.
const PATIENCE: Duration = Duration::from_secs(60);

/// The consumer prints this once it consumes.
const CONSUMING: &str = "Ctrl-C to stop";

/// A private certificate authority, written as `<name>.pem` in `dir`; it signs with `issuer`.
fn authority(dir: &Path, name: &str) -> (PathBuf, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("prereq test authority {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("a key");
    let cert = params.self_signed(&key).expect("a self-signed authority");
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).expect("write the authority's certificate");
    (path, Issuer::new(params, key))
}

/// The broker's certificate and key, for `127.0.0.1` and `localhost`, signed by `issuer`:
/// their paths.
fn server_certificate(dir: &Path, issuer: &Issuer<'static, KeyPair>) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("valid names");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().expect("a key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("signed by the authority");
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write the server certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the server key");
    (cert_path, key_path)
}

/// A client certificate (chain: the certificate alone) and its key (PKCS#8 PEM), for the
/// client named `name`, signed by `issuer`: their paths.
fn client_certificate(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'static, KeyPair>,
) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("a key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("signed by the authority");
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("write the client certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the client key");
    (cert_path, key_path)
}

/// A node's TLS listener on `port` (`rabbitmq.conf` lines): the authority, the server's
/// certificate and key at `[ca, cert, key]`; with `verify_clients`, a client certificate the
/// authority signed is required.
fn tls_listener(port: u16, [ca, cert, key]: [&Path; 3], verify_clients: bool) -> String {
    let (verify, required) = if verify_clients {
        ("verify_peer", true)
    } else {
        ("verify_none", false)
    };
    format!(
        "listeners.ssl.default = 127.0.0.1:{port}\n\
         ssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\n\
         ssl_options.verify = {verify}\n\
         ssl_options.fail_if_no_peer_cert = {required}\n",
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// The node's connections, each as its `columns` (`rabbitmqctl list_connections` items)
/// joined by a space, one a line.
fn connections(node: &node::Node, columns: &[&str]) -> Vec<String> {
    let mut args = vec!["list_connections", "-q", "--no-table-headers"];
    args.extend_from_slice(columns);
    node.ctl_ok(&args)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// The README's walk-through with the examples as child processes, configured by `env`:
/// `consumer`, `producer p <client>` (held), `producer c <client>` (released), Ctrl-C, which
/// must end the consumer cleanly. The consumer's output, and the node's connections (as
/// `columns`) while the payment was held.
async fn walk_through(
    node: &node::Node,
    dir: &Path,
    env: &[(&str, String)],
    client: u64,
    columns: &[&str],
) -> (String, Vec<String>) {
    let log = format!("consumer-{client}.out");
    let mut consumer = ExampleChild::spawn("consumer", dir, &log, env);
    consumer.wait_for_line(CONSUMING, PATIENCE).await;
    let c = client.to_string();
    let published = db::run_example("producer", dir, &["p", &c], env).await;
    let id = db::published_id(&published);
    consumer
        .wait_for_line(
            &format!("payment {id} client {client} attempt 0: held"),
            PATIENCE,
        )
        .await;
    let listed = connections(node, columns);
    let registered = db::run_example("producer", dir, &["c", &c], env).await;
    assert!(
        registered.contains(&format!("registered client {client}")),
        "{registered}"
    );
    consumer
        .wait_for_line(
            &format!("-> processing payment {id} of client {client}"),
            PATIENCE,
        )
        .await;
    consumer.signal("INT");
    let status = consumer.wait_exit(PATIENCE).await;
    let out = consumer.output();
    assert!(
        status.success(),
        "the consumer exited with {status}; stdout:\n{out}\nstderr:\n{}",
        consumer.stderr()
    );
    assert!(
        out.contains(&format!(
            "payment {id} client {client} attempt 0: released after"
        )),
        "the payment was released by the registration:\n{out}"
    );
    assert!(
        !out.lines().any(|l| l.contains(": deferred")),
        "nothing was deferred through the broker:\n{out}"
    );
    (out, listed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walk_through_runs_over_tls_and_an_untrusted_certificate_is_refused() {
    let dir = drill::TempDir::new("tls");
    let (ca, issuer) = authority(&dir.0, "ca");
    let (other_ca, _) = authority(&dir.0, "other-ca");
    let (cert, key) = server_certificate(&dir.0, &issuer);
    let tls_port = node::free_port(&[]);
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let conf = tls_listener(tls_port, [&ca, &cert, &key], false);
    let Some(node) = node::Node::start_with("tls", &conf, &[tls_port], &[]) else {
        return;
    };
    let addr = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let trusted = [("AMQP_ADDR", addr.clone()), ("SSL_CERT_FILE", path(&ca))];

    // The walk-through: `consumer`, `producer p 5` (held), `producer c 5` (released), Ctrl-C.
    let (out, tls_connections) =
        walk_through(&node, &dir.0, &trusted, 5, &["ssl", "peer_port"]).await;
    // While the payment was held: the consumer's connection (and no other) was open, over TLS.
    assert!(
        !tls_connections.is_empty() && tls_connections.iter().all(|c| c.starts_with("true ")),
        "the consumer's connections are TLS ones: {tls_connections:?}"
    );

    // Another authority trusted: the broker's certificate is refused, and said so.
    let untrusted = [("AMQP_ADDR", addr), ("SSL_CERT_FILE", path(&other_ca))];
    let mut refused = ExampleChild::spawn("consumer", &dir.0, "refused.out", &untrusted);
    let status = refused.wait_exit(PATIENCE).await;
    let said = format!("{}{}", refused.output(), refused.stderr());
    assert!(
        !status.success(),
        "the consumer ran with an untrusted certificate:\n{said}"
    );
    assert!(
        said.contains("certificate")
            && said.contains(&format!("amqps://guest:***@127.0.0.1:{tls_port}")),
        "the error names the certificate and the address, its password hidden:\n{said}"
    );
    assert!(
        !said.contains("guest:guest"),
        "the password was printed:\n{said}"
    );
    assert!(!said.contains(CONSUMING), "it never consumed:\n{said}");
    println!("TLS connections while the payment was held: {tls_connections:?}");
    println!("--- the walk-through\n{out}--- with another authority trusted\n{said}");
}

/// Mutual TLS: a broker that verifies its clients (`verify_peer`, `fail_if_no_peer_cert`), the
/// examples configured as a user would, through the environment only: `AMQP_TLS_CA_FILE` (the
/// private authority, instead of `SSL_CERT_FILE`), `AMQP_TLS_CERT_FILE` and
/// `AMQP_TLS_KEY_FILE`.
///
/// - The walk-through runs with a user and password, and the broker shows the consumer's
///   connection with the client's certificate.
/// - It runs again with no password at all: a login by the certificate alone (RabbitMQ's
///   `EXTERNAL` mechanism, `?auth_mechanism=external` in the address), the broker naming the
///   connection's user after the certificate.
/// - Without a client certificate the broker refuses the consumer; a certificate whose name is
///   no user is refused its `EXTERNAL` login; with a certificate and no key, the consumer
///   refuses to start and names the missing variable; with a key file that holds no key, it
///   names the file. The password is never printed.
/// - The dead-letter tool reads the same variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_client_certificate_from_the_environment() {
    const CLIENT: &str = "prereq-test-client";
    let dir = drill::TempDir::new("mtls");
    let (ca, issuer) = authority(&dir.0, "ca");
    let (cert, key) = server_certificate(&dir.0, &issuer);
    let (client_cert, client_key) = client_certificate(&dir.0, CLIENT, &issuer);
    let (stranger_cert, stranger_key) = client_certificate(&dir.0, "nobody-here", &issuer);
    let tls_port = node::free_port(&[]);
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let conf = tls_listener(tls_port, [&ca, &cert, &key], true)
        + "auth_mechanisms.1 = PLAIN\n\
           auth_mechanisms.2 = AMQPLAIN\n\
           auth_mechanisms.3 = EXTERNAL\n\
           ssl_cert_login_from = common_name\n";
    let Some(node) =
        node::Node::start_with("mtls", &conf, &[tls_port], &["rabbitmq_auth_mechanism_ssl"])
    else {
        return;
    };
    let addr = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    // No SSL_CERT_FILE: the authority comes from AMQP_TLS_CA_FILE alone.
    let tls_env = |addr: &str, cert: &Path, key: &Path| {
        vec![
            ("AMQP_ADDR", addr.to_owned()),
            ("AMQP_TLS_CA_FILE", path(&ca)),
            ("AMQP_TLS_CERT_FILE", path(cert)),
            ("AMQP_TLS_KEY_FILE", path(key)),
        ]
    };
    let with_cert = tls_env(&addr, &client_cert, &client_key);

    // A user and password, and the client's certificate.
    let (out, subjects) =
        walk_through(&node, &dir.0, &with_cert, 5, &["ssl", "peer_cert_subject"]).await;
    assert!(
        subjects
            .iter()
            .any(|l| l.starts_with("true ") && l.contains(&format!("CN={CLIENT}"))),
        "the broker saw the client's certificate on the consumer's connection: {subjects:?}"
    );

    // The certificate alone: a user named after it, no password anywhere.
    node.ctl_ok(&["add_user", CLIENT, "unused-password"]);
    node.ctl_ok(&["set_permissions", "-p", "/", CLIENT, ".*", ".*", ".*"]);
    let external = format!("amqps://127.0.0.1:{tls_port}/%2f?auth_mechanism=external");
    let by_certificate = tls_env(&external, &client_cert, &client_key);
    let (out_external, users) = walk_through(
        &node,
        &dir.0,
        &by_certificate,
        6,
        &["user", "auth_mechanism"],
    )
    .await;
    assert!(
        users.contains(&format!("{CLIENT} EXTERNAL")),
        "the consumer logged in as {CLIENT} by its certificate: {users:?}"
    );

    // What goes wrong says so, and never shows the password.
    let refusals = [
        (
            "no client certificate",
            vec![("AMQP_ADDR", addr.clone()), ("AMQP_TLS_CA_FILE", path(&ca))],
            "cannot connect to amqps://guest:***@",
        ),
        (
            "a certificate whose name is no user, logging in by it",
            tls_env(&external, &stranger_cert, &stranger_key),
            "EXTERNAL",
        ),
        (
            "a certificate without its key",
            vec![
                ("AMQP_ADDR", addr.clone()),
                ("AMQP_TLS_CA_FILE", path(&ca)),
                ("AMQP_TLS_CERT_FILE", path(&client_cert)),
            ],
            "AMQP_TLS_CERT_FILE is set but AMQP_TLS_KEY_FILE is not",
        ),
        (
            "a key file that holds a certificate",
            tls_env(&addr, &client_cert, &client_cert),
            "holds no PEM private key",
        ),
    ];
    let mut said_all = String::new();
    for (i, (case, env, expected)) in refusals.into_iter().enumerate() {
        let mut refused =
            ExampleChild::spawn("consumer", &dir.0, &format!("refused-{i}.out"), &env);
        let status = refused.wait_exit(PATIENCE).await;
        let said = format!("{}{}", refused.output(), refused.stderr());
        assert!(!status.success(), "{case}: the consumer ran:\n{said}");
        assert!(
            said.contains(expected),
            "{case}: expected {expected:?} in:\n{said}"
        );
        assert!(
            !said.contains("guest:guest"),
            "{case}: the password was printed:\n{said}"
        );
        assert!(!said.contains(CONSUMING), "{case}: it consumed:\n{said}");
        said_all.push_str(&format!("--- {case}\n{said}"));
    }

    // The dead-letter tool reads the same variables: it lists the consumer's dead-letter queue
    // with the client certificate, and is refused without it.
    #[cfg(feature = "cli")]
    {
        let list = |env: &[(&str, String)]| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_prereq"));
            cmd.args(["list", "payment-processor.dead"])
                .env_remove("SSL_CERT_FILE")
                .stdin(std::process::Stdio::null());
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = cmd.output().expect("run prereq list");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status, said)
        };
        let (status, said) = list(&by_certificate);
        assert!(
            status.success(),
            "prereq list with the certificate:\n{said}"
        );
        let (status, refused) = list(&with_cert[..2]);
        assert!(
            // The broker's alert, or its reset when the alert was not read first.
            !status.success() && refused.contains("cannot connect to RabbitMQ at amqps://"),
            "prereq list without a certificate:\n{refused}"
        );
        assert!(!refused.contains("guest:guest"), "{refused}");
        said_all.push_str(&format!(
            "--- prereq list\n{said}--- without a certificate\n{refused}"
        ));
    }
    println!(
        "--- the walk-through with a client certificate\n{out}--- by the certificate alone\n\
         {out_external}{said_all}"
    );
}
