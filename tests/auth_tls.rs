//! TLS on the gRPC port, against a real server (in process, state in DynamoDB on moto) with
//! a CA and certificates generated for this run: untrusted clients are refused and do not
//! stop the server, mutual TLS refuses clients without a good certificate, a replaced
//! certificate is served on new handshakes without a restart, so is a replaced client CA,
//! handshakes in progress are limited, ALPN offers h2 and http/1.1, and the CLI connects
//! with a client certificate.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::server::ServeOptions;
use instance_manager::store::DynamoStore;
use instance_manager::tls::{TlsConfig, TlsServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio_rustls::rustls::{self, pki_types};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA made for this run.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM, certificate DER) for `name`, valid for localhost and
    /// 127.0.0.1.
    fn issue(&self, name: &str) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

struct TestServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(tls: TlsConfig) -> TestServer {
    let sdk = common::test_sdk_config().await;
    let store = DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        common::unique_name("tls"),
    );
    store.ensure_table().await.expect("create table");
    let api = Api::new(
        Arc::new(store),
        ApiSettings::default(),
        PageTokens::new(b"test-key"),
    );
    let options = ServeOptions {
        tls: Some(Arc::new(TlsServer::from_config(&tls).expect("tls config"))),
        ..ServeOptions::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            instance_manager::server::serve_with(
                api,
                listener,
                shutdown,
                Duration::from_secs(1),
                &options,
            )
            .await
            .unwrap();
        }
    });
    TestServer { addr, shutdown }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Connects over TLS with `tls` and calls ListInstances; any failure as text.
async fn call(addr: SocketAddr, tls: ClientTlsConfig) -> Result<(), String> {
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    InstanceServiceClient::new(channel)
        .list_instances(v1::ListInstancesRequest {
            parent: "tenants/-".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|status| format!("call: {status:?}"))
}

fn trusting(ca: &Ca) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost")
}

/// A fresh TLS connection trusting `ca`, offering `alpn`.
async fn connect_tls(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake with a trusting client")
}

/// The certificate the server presents on a fresh handshake, and the protocol ALPN chose.
async fn handshake(addr: SocketAddr, ca_pem: &str, alpn: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>) {
    let tls = connect_tls(addr, ca_pem, alpn).await;
    let (_, connection) = tls.get_ref();
    (
        connection.peer_certificates().unwrap()[0].to_vec(),
        connection.alpn_protocol().map(<[u8]>::to_vec),
    )
}

#[tokio::test]
async fn untrusting_clients_are_refused_and_the_server_keeps_serving() {
    let ca = Ca::new("im-test-ca");
    let (cert, key, der) = ca.issue("server-1");
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let server = start(TlsConfig::new(
        write(dir.path(), "cert.pem", &cert),
        write(dir.path(), "key.pem", &key),
    ))
    .await;

    // Public roots only: our CA is unknown to it.
    let refused = call(
        server.addr,
        ClientTlsConfig::new()
            .with_webpki_roots()
            .domain_name("localhost"),
    )
    .await;
    assert!(
        refused.is_err(),
        "a client that does not trust the CA must fail"
    );
    // Plain text on the TLS port: refused too.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let answer = InstanceServiceClient::new(channel)
            .list_instances(v1::ListInstancesRequest::default())
            .await;
        assert!(answer.is_err(), "plain text must not be served: {answer:?}");
    }
    // The failed handshakes did not stop the accept loop.
    call(server.addr, trusting(&ca))
        .await
        .expect("a trusting client works");

    // ALPN: h2 for gRPC, http/1.1 for gRPC-Web.
    let (served, alpn) = handshake(server.addr, &ca.pem, &[b"h2", b"http/1.1"]).await;
    assert_eq!(served, der);
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (_, alpn) = handshake(server.addr, &ca.pem, &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));

    // A gRPC-Web call over HTTP/1.1 inside TLS (health: needs no credentials).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = connect_tls(server.addr, &ca.pem, &[b"http/1.1"]).await;
    tls.write_all(
        b"POST /grpc.health.v1.Health/Check HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
          content-length: 5\r\nconnection: close\r\n\r\n\0\0\0\0\0",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut raw))
        .await
        .expect("the server answers and closes")
        .ok();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("grpc-status:0") || text.contains("grpc-status: 0"),
        "{text}"
    );
}

#[tokio::test]
async fn the_binary_serves_tls_from_its_configuration() {
    let ca = Ca::new("im-test-ca");
    let (cert, key, der) = ca.issue("server-1");
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let table = common::unique_name("tls-bin");
    let sdk = common::test_sdk_config().await;
    DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), table.clone())
        .ensure_table()
        .await
        .expect("create table");
    let config = write(
        dir.path(),
        "config.toml",
        &format!(
            "table = \"{table}\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nreload_check_ms = 1000\n",
            write(dir.path(), "cert.pem", &cert).display(),
            write(dir.path(), "key.pem", &key).display()
        ),
    );
    let endpoint = common::aws_endpoint();
    let (_server, addr) = tokio::task::spawn_blocking(move || {
        let mut server = common::ServerProcess::spawn(
            [
                "serve",
                "--listen",
                common::ANY_PORT,
                "--aws-endpoint",
                &endpoint,
                "--config",
                config.to_str().unwrap(),
            ],
            &[],
        );
        let addr = server.wait_serving();
        (server, addr)
    })
    .await
    .unwrap();
    assert_eq!(handshake(addr, &ca.pem, &[b"h2"]).await.0, der);
    call(addr, trusting(&ca))
        .await
        .expect("the binary serves gRPC over TLS");
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let ca = Ca::new("im-test-ca");
    let (cert1, key1, der1) = ca.issue("server-1");
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let cert_file = write(dir.path(), "cert.pem", &cert1);
    let key_file = write(dir.path(), "key.pem", &key1);
    let mut config = TlsConfig::new(cert_file.clone(), key_file.clone());
    config.reload_check_ms = 200;
    let server = start(config).await;
    assert_eq!(handshake(server.addr, &ca.pem, &[b"h2"]).await.0, der1);

    // Renewal as cert-manager or an ACME client does it: new files moved into place.
    let (cert2, key2, der2) = ca.issue("server-2");
    assert_ne!(der1, der2);
    std::fs::rename(write(dir.path(), "key.new", &key2), &key_file).unwrap();
    std::fs::rename(write(dir.path(), "cert.new", &cert2), &cert_file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let served = handshake(server.addr, &ca.pem, &[b"h2"]).await.0;
        if served == der2 {
            break;
        }
        assert_eq!(served, der1, "only the old or the new certificate");
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    call(server.addr, trusting(&ca))
        .await
        .expect("calls work after the reload");

    // A broken replacement (key of another certificate) keeps the working pair.
    let (_, stray_key, _) = ca.issue("stray");
    std::fs::write(&key_file, stray_key).unwrap();
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        assert_eq!(handshake(server.addr, &ca.pem, &[b"h2"]).await.0, der2);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_good_certificate() {
    let ca = Ca::new("im-test-ca");
    let clients = Ca::new("im-test-client-ca");
    let (cert, key, _) = ca.issue("server-1");
    let (client_cert, client_key, _) = clients.issue("automation");
    let stranger_ca = Ca::new("elsewhere");
    let (stranger_cert, stranger_key, _) = stranger_ca.issue("stranger");
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let mut config = TlsConfig::new(
        write(dir.path(), "cert.pem", &cert),
        write(dir.path(), "key.pem", &key),
    );
    config.client_ca_file = Some(write(dir.path(), "clients.pem", &clients.pem));
    let server = start(config).await;

    let anonymous = call(server.addr, trusting(&ca)).await;
    assert!(anonymous.is_err(), "no client certificate must be refused");
    let stranger = call(
        server.addr,
        trusting(&ca).identity(Identity::from_pem(&stranger_cert, &stranger_key)),
    )
    .await;
    assert!(
        stranger.is_err(),
        "a certificate of another CA must be refused"
    );
    call(
        server.addr,
        trusting(&ca).identity(Identity::from_pem(&client_cert, &client_key)),
    )
    .await
    .expect("a client certificate of the client CA works");

    // The CLI with --ca-file, --cert-file and --key-file (and refused without them).
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let cert_file = write(dir.path(), "client.pem", &client_cert);
    let key_file = write(dir.path(), "client.key", &client_key);
    let url = format!("https://localhost:{}", server.addr.port());
    let run = move |with_identity: bool| {
        let mut args = vec![
            "list".to_owned(),
            "--server".into(),
            url.clone(),
            "--ca-file".into(),
            ca_file.display().to_string(),
            "-o".into(),
            "json".into(),
        ];
        if with_identity {
            args.extend([
                "--cert-file".into(),
                cert_file.display().to_string(),
                "--key-file".into(),
                key_file.display().to_string(),
            ]);
        }
        common::ServerProcess::run(args, &[], Duration::from_secs(60))
    };
    let (with, without) = tokio::task::spawn_blocking(move || (run(true), run(false)))
        .await
        .unwrap();
    assert!(with.status.success(), "{}\n{}", with.stdout, with.stderr);
    assert!(!without.status.success(), "{}", without.stdout);
}

#[tokio::test]
async fn a_replaced_client_ca_is_used_without_a_restart() {
    let ca = Ca::new("im-test-ca");
    let (cert, key, _) = ca.issue("server-1");
    let old_clients = Ca::new("im-test-old-client-ca");
    let new_clients = Ca::new("im-test-new-client-ca");
    let (old_cert, old_key, _) = old_clients.issue("automation-old");
    let (new_cert, new_key, _) = new_clients.issue("automation-new");
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let mut config = TlsConfig::new(
        write(dir.path(), "cert.pem", &cert),
        write(dir.path(), "key.pem", &key),
    );
    let ca_file = write(dir.path(), "clients.pem", &old_clients.pem);
    config.client_ca_file = Some(ca_file.clone());
    config.reload_check_ms = 200;
    let server = start(config).await;
    let old = || trusting(&ca).identity(Identity::from_pem(&old_cert, &old_key));
    let new = || trusting(&ca).identity(Identity::from_pem(&new_cert, &new_key));
    call(server.addr, old()).await.expect("the old CA's client");
    assert!(call(server.addr, new()).await.is_err(), "not yet trusted");

    // A broken file is not taken: the old CA keeps working through several checks.
    std::fs::write(&ca_file, "not a certificate").unwrap();
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        call(server.addr, old())
            .await
            .expect("a broken client CA file keeps the previous CAs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The CA rotated: the new file names only the new client CA.
    std::fs::rename(write(dir.path(), "clients.new", &new_clients.pem), &ca_file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if call(server.addr, new()).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new client CA was never used"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        call(server.addr, old()).await.is_err(),
        "the old CA's clients are refused once it is replaced"
    );
}

#[tokio::test]
async fn handshakes_in_progress_are_limited() {
    let ca = Ca::new("im-test-ca");
    let (cert, key, _) = ca.issue("server-1");
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let mut config = TlsConfig::new(
        write(dir.path(), "cert.pem", &cert),
        write(dir.path(), "key.pem", &key),
    );
    config.max_handshakes = 2;
    let server = start(config).await;
    handshake(server.addr, &ca.pem, &[b"h2"]).await;

    // Two clients connect and never say hello: both permits are held.
    let stalled_1 = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let _stalled_2 = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let addr = server.addr;
    let ca_pem = ca.pem.clone();
    let waiting = tokio::spawn(async move { handshake(addr, &ca_pem, &[b"h2"]).await });
    // The third handshake cannot start while both are held (it would take milliseconds).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "a third handshake ran while two were in progress"
    );
    // One stalled client goes away: its handshake fails at once and frees its permit.
    drop(stalled_1);
    tokio::time::timeout(Duration::from_secs(8), waiting)
        .await
        .expect("the waiting handshake completes once a permit is free")
        .unwrap();
}
