//! How the client subcommands reach a server: address, TLS, bearer token, timeouts.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;

use crate::proto::google_longrunning::operations_client::OperationsClient;
use crate::proto::v1::instance_service_client::InstanceServiceClient;

use super::output::Format;
use super::report::CliError;

/// Connection flags of every client subcommand; each can also come from the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Server address: `http://host:port`, `https://host:port` (TLS), or `host:port`
    /// (plain text).
    #[arg(long, env = "IM_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// PEM file of the certificate authorities to trust for an https:// server, besides the
    /// public roots.
    #[arg(long, env = "IM_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate for a server that requires mutual TLS (with
    /// --key-file).
    #[arg(long, env = "IM_CERT_FILE", value_name = "PEM", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, env = "IM_KEY_FILE", value_name = "PEM", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Bearer token sent as `authorization: Bearer TOKEN`. Prefer the environment variable:
    /// other local users can read a process's flags.
    #[arg(long, env = "IM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How results are printed: readable tables, or JSON (the protobuf JSON mapping).
    #[arg(long, short = 'o', env = "IM_OUTPUT", value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Deadline of each unary call, in seconds (streams have none).
    #[arg(long, env = "IM_TIMEOUT_SECS", default_value_t = 30)]
    pub timeout_secs: u64,
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Transport = InterceptedService<Channel, Auth>;

/// The clients of both services, and of `grpc.health.v1`, over one connection.
#[derive(Clone)]
pub struct Conn {
    pub instances: InstanceServiceClient<Transport>,
    pub operations: OperationsClient<Transport>,
    pub health: HealthClient<Transport>,
    pub format: Format,
    timeout: Duration,
}

impl Conn {
    /// Connects to `args.server` (fails at once with a clear message if it cannot).
    pub async fn open(args: &ClientArgs) -> Result<Self, CliError> {
        let auth = Auth(bearer(args.token.as_deref())?);
        let endpoint = endpoint(args).await?;
        let channel = endpoint.connect().await.map_err(|error| {
            CliError::Local(format!(
                "cannot connect to {}: {}",
                args.server,
                error_chain(&error)
            ))
        })?;
        let transport = InterceptedService::new(channel, auth);
        Ok(Self {
            instances: InstanceServiceClient::new(transport.clone()),
            operations: OperationsClient::new(transport.clone()),
            health: HealthClient::new(transport),
            format: args.output,
            timeout: Duration::from_secs(args.timeout_secs.max(1)),
        })
    }

    /// A unary request with the deadline.
    pub fn unary<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }
}

/// The `authorization` value for `token`; the token itself never appears in an error.
fn bearer(token: Option<&str>) -> Result<Option<MetadataValue<Ascii>>, CliError> {
    let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
        CliError::Local(
            "the token (--token / IM_TOKEN) holds characters a header cannot carry".into(),
        )
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

async fn endpoint(args: &ClientArgs) -> Result<Endpoint, CliError> {
    let server = args.server.trim();
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let tls = url.starts_with("https://");
    if !tls && !url.starts_with("http://") {
        return Err(CliError::Local(format!(
            "--server {server:?}: the scheme must be http:// or https://"
        )));
    }
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|_| CliError::Local(format!("--server {server:?} is not a valid address")))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if tls {
        let mut config = ClientTlsConfig::new().with_webpki_roots();
        if let Some(path) = &args.ca_file {
            let pem = tokio::fs::read(path).await.map_err(|error| {
                CliError::Local(format!("cannot read --ca-file {}: {error}", path.display()))
            })?;
            config = config.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
            let read = |flag: &str, path: &std::path::Path| {
                let path = path.to_owned();
                let flag = flag.to_owned();
                async move {
                    tokio::fs::read(&path).await.map_err(|error| {
                        CliError::Local(format!("cannot read {flag} {}: {error}", path.display()))
                    })
                }
            };
            let cert = read("--cert-file", cert).await?;
            let key = read("--key-file", key).await?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|error| CliError::Local(format!("TLS setup: {}", error_chain(&error))))?;
    } else if args.ca_file.is_some() || args.cert_file.is_some() {
        return Err(CliError::Local(
            "--ca-file and --cert-file need an https:// server (--server https://host:port)".into(),
        ));
    }
    Ok(endpoint)
}

/// `error` and its sources, joined: tonic's transport errors say little at the top.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(cause) = current {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        current = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_sent_as_bearer_and_never_shown() {
        let value = bearer(Some(" s3cr3t ")).unwrap().unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer s3cr3t");
        assert!(!format!("{value:?}").contains("s3cr3t"));
        assert!(bearer(Some("")).unwrap().is_none());
        assert!(bearer(None).unwrap().is_none());
        let error = bearer(Some("bad\ns3cr3t")).unwrap_err().to_string();
        assert!(!error.contains("s3cr3t"), "{error}");

        let mut auth = Auth(bearer(Some("s3cr3t")).unwrap());
        let request = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cr3t"
        );
        let request = Auth(None).call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }
}
