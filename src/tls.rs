//! TLS on the gRPC port: certificate and key from files, re-read when they change (no
//! restart for a renewed certificate), optional mutual TLS against a client CA.
//!
//! Tonic's own `ServerTlsConfig` cannot swap its certificate, so the server accepts TCP
//! connections itself, runs each TLS handshake in its own task (a slow or failing client
//! holds up nobody, and never stops the accept loop), and hands the finished streams to
//! tonic. The certificate is chosen per handshake by [`ReloadingCert`], which looks at the
//! files' modification times at most every `reload_check_ms`; a pair that does not load
//! (half written, key not matching) is logged and the previous one kept. The client CA of
//! mutual TLS is re-read the same way: a changed file builds a new rustls configuration,
//! used from the next handshake on (one that does not load keeps the previous CAs).
//!
//! At most `max_handshakes` handshakes are in progress at once: past that the accept loop
//! waits for one to finish (connections queue in the kernel's backlog), so a flood of
//! clients that connect and never finish their handshake holds at most that many tasks and
//! sockets, each for at most the handshake timeout.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

/// `[tls]` of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server certificate, then its intermediates.
    pub cert_file: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: the CAs client certificates must chain to. Set: mutual TLS, every client must
    /// present such a certificate. Re-read when it changes, like the certificate.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often (at most) a handshake checks whether the certificate files changed.
    #[serde(default = "default_reload_check_ms")]
    pub reload_check_ms: u64,
    /// TLS handshakes in progress at once (1..=65536); further connections wait.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
}

fn default_reload_check_ms() -> u64 {
    5000
}

fn default_max_handshakes() -> usize {
    256
}

impl TlsConfig {
    pub fn new(cert_file: PathBuf, key_file: PathBuf) -> Self {
        Self {
            cert_file,
            key_file,
            client_ca_file: None,
            reload_check_ms: default_reload_check_ms(),
            max_handshakes: default_max_handshakes(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{field}: cannot read {path}: {reason}")]
    File {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("tls: {0}")]
    Setup(String),
}

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS side of the server: its rustls configuration (rebuilt when the client CA
/// changes), the reloading certificate, and the handshake limit.
#[derive(Debug)]
pub struct TlsServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    provider: Arc<rustls::crypto::CryptoProvider>,
    resolver: Arc<ReloadingCert>,
    client_ca: Option<ClientCa>,
    config: RwLock<Arc<rustls::ServerConfig>>,
    handshakes: Arc<tokio::sync::Semaphore>,
}

/// The client CA file of mutual TLS and the stamp of the one in use.
#[derive(Debug)]
struct ClientCa {
    path: PathBuf,
    check_every: Duration,
    checked: Mutex<(Instant, Stamp)>,
}

/// Modification time and length of a file.
type Stamp = (Option<SystemTime>, u64);

impl TlsServer {
    /// Reads the certificate, key and client CA now: a server whose TLS files are broken
    /// does not start.
    pub fn from_config(config: &TlsConfig) -> Result<Self, TlsError> {
        if !(1..=65536).contains(&config.max_handshakes) {
            return Err(TlsError::Setup(
                "max_handshakes must be between 1 and 65536".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let resolver = Arc::new(ReloadingCert::new(config, provider.clone())?);
        let client_ca = config.client_ca_file.as_ref().map(|path| ClientCa {
            path: path.clone(),
            check_every: Duration::from_millis(config.reload_check_ms.max(100)),
            checked: Mutex::new((Instant::now(), stamp(path))),
        });
        let server = server_config(&provider, &resolver, client_ca.as_ref())?;
        Ok(Self {
            inner: Arc::new(Inner {
                provider,
                resolver,
                client_ca,
                config: RwLock::new(Arc::new(server)),
                handshakes: Arc::new(tokio::sync::Semaphore::new(config.max_handshakes)),
            }),
        })
    }

    /// The TLS connections accepted on `listener` until `shutdown` (or until the receiver
    /// is dropped). Failed handshakes are logged and dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let inner = self.inner.clone();
        tokio::spawn(
            async move {
                loop {
                    // A permit first: with `max_handshakes` in progress, new connections
                    // wait in the backlog rather than each taking a task and a socket.
                    let permit = tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = sender.closed() => return,
                        permit = inner.handshakes.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        },
                    };
                    let accepted = tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = sender.closed() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let (tcp, peer) = match accepted {
                        Ok(pair) => {
                            crate::server::no_delay(&pair.0);
                            pair
                        }
                        Err(error) => {
                            // Out of file descriptors and the like: back off briefly
                            // rather than spin.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = tokio_rustls::TlsAcceptor::from(inner.current());
                    let sender = sender.clone();
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                        drop(permit);
                        match handshake {
                            Ok(Ok(stream)) => {
                                let _ = sender.send(Ok(stream)).await;
                            }
                            Ok(Err(error)) => {
                                tracing::info!(%peer, %error, "tls handshake failed");
                            }
                            Err(_) => tracing::info!(%peer, "tls handshake timed out"),
                        }
                    });
                }
            }
            .instrument(tracing::info_span!("tls_accept")),
        );
        ReceiverStream::new(receiver)
    }
}

impl Inner {
    /// The configuration for the next handshake, rebuilt first if the client CA file
    /// changed (checked at most every `reload_check_ms`).
    fn current(&self) -> Arc<rustls::ServerConfig> {
        if let Some(ca) = &self.client_ca {
            // Another connection is checking right now: use the current configuration.
            if let Ok(mut checked) = ca.checked.try_lock()
                && checked.0.elapsed() >= ca.check_every
            {
                checked.0 = Instant::now();
                let now = stamp(&ca.path);
                if now != checked.1 {
                    match server_config(&self.provider, &self.resolver, Some(ca)) {
                        Ok(config) => {
                            *self.config.write().unwrap_or_else(|p| p.into_inner()) =
                                Arc::new(config);
                            checked.1 = now;
                            tracing::info!(client_ca_file = %ca.path.display(), "tls client CA reloaded");
                        }
                        Err(error) => tracing::warn!(
                            %error,
                            "tls client CA not reloaded: keeping the previous one"
                        ),
                    }
                }
            }
        }
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The rustls configuration: the reloading certificate, and the client CA's verifier when
/// mutual TLS is on (the file read now).
fn server_config(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    resolver: &Arc<ReloadingCert>,
    client_ca: Option<&ClientCa>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("client_ca_file", &ca.path)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    field: "client_ca_file",
                    path: ca.path.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Setup(format!("client_ca_file: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_cert_resolver(resolver.clone());
    // gRPC speaks HTTP/2; gRPC-Web from browsers may come over HTTP/1.1.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

/// The server certificate, re-read from its files when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    check_every: Duration,
    current: RwLock<Arc<CertifiedKey>>,
    /// When the files were last looked at, and the stamps of the pair in use.
    checked: Mutex<(Instant, Stamps)>,
}

/// Modification time and length of the certificate and key files.
type Stamps = [Stamp; 2];

impl ReloadingCert {
    fn new(
        config: &TlsConfig,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let stamps = stamps(&config.cert_file, &config.key_file);
        let key = load(&config.cert_file, &config.key_file, &provider)?;
        Ok(Self {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            provider,
            check_every: Duration::from_millis(config.reload_check_ms.max(100)),
            current: RwLock::new(Arc::new(key)),
            checked: Mutex::new((Instant::now(), stamps)),
        })
    }

    /// Re-reads the pair if the check is due and the files changed. The files are small
    /// and looked at every few seconds at most, so the handshake task reads them itself.
    fn reload_if_changed(&self) {
        // Another handshake is checking right now: use the current pair.
        let Ok(mut checked) = self.checked.try_lock() else {
            return;
        };
        if checked.0.elapsed() < self.check_every {
            return;
        }
        checked.0 = Instant::now();
        let now = stamps(&self.cert_file, &self.key_file);
        if now == checked.1 {
            return;
        }
        match load(&self.cert_file, &self.key_file, &self.provider) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
                checked.1 = now;
                tracing::info!(cert_file = %self.cert_file.display(), "tls certificate reloaded");
            }
            // Stamps unchanged: tried again at the next check (the other file may still
            // be on its way).
            Err(error) => {
                tracing::warn!(%error, "tls certificate not reloaded: keeping the previous one")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn stamps(cert: &Path, key: &Path) -> Stamps {
    [cert, key].map(stamp)
}

fn stamp(path: &Path) -> Stamp {
    match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    }
}

fn read_certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |reason: String| TlsError::File {
        field,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The certificate chain and its key, checked to belong together.
fn load(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs("cert_file", cert)?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        field: "key_file",
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        TlsError::Setup(format!(
            "the key in {} does not fit the certificate in {}: {e}",
            key.display(),
            cert.display()
        ))
    })
}
