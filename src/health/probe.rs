//! The HTTP probe of a site: one `GET` over HTTP/1.1 (hyper's client connection over a
//! tokio TCP stream, with rustls for `https`), sent to the configured address with the
//! instance's host as `Host` (and as the TLS server name, which the certificate must
//! match). Redirects are never followed: the status code (and a redirect's `Location`)
//! is the result.

use std::sync::Arc;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Where the probe connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub https: bool,
    /// Host name or IP address to connect to.
    pub host: String,
    pub port: u16,
}

impl ProbeTarget {
    /// Parses `http://host[:port]` or `https://host[:port]` (a trailing `/` is allowed;
    /// anything after the authority is refused, the path is configured on its own).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "{url:?}: only scheme, host and port are allowed (the path is health_probe_path)"
            ));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            // [IPv6]:port
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(port) => parse_port(url, port)?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{url:?}: junk after the address")),
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), parse_port(url, port)?),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        Ok(Self { https, host, port })
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

fn parse_port(url: &str, port: &str) -> Result<u16, String> {
    port.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{url:?}: invalid port {port:?}"))
}

/// Status codes that count as serving: `200-399`, `200,301,302`, or both mixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedCodes(Vec<(u16, u16)>);

impl AcceptedCodes {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in spec.split(',').map(str::trim) {
            let code = |text: &str| {
                text.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| format!("{spec:?}: {text:?} is not an HTTP status code"))
            };
            let range = match part.split_once('-') {
                Some((low, high)) => (code(low)?, code(high)?),
                None => {
                    let c = code(part)?;
                    (c, c)
                }
            };
            if range.0 > range.1 {
                return Err(format!("{spec:?}: empty range {part:?}"));
            }
            ranges.push(range);
        }
        Ok(Self(ranges))
    }

    pub fn accepts(&self, code: u16) -> bool {
        self.0
            .iter()
            .any(|&(low, high)| (low..=high).contains(&code))
    }
}

impl std::fmt::Display for AcceptedCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|&(low, high)| {
                if low == high {
                    low.to_string()
                } else {
                    format!("{low}-{high}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// What the site answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub status: u16,
    /// A redirect's `Location` (not followed).
    pub location: Option<String>,
}

/// Public web PKI roots (the ALB's certificate comes from ACM).
fn tls_config() -> Result<Arc<ClientConfig>, String> {
    let roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `GET path` with `Host: host` at `target`. Not bounded here: the caller bounds it.
pub async fn get(target: &ProbeTarget, host: &str, path: &str) -> Result<ProbeAnswer, String> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if target.https {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
        let tls = TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS as {host}: {e}"))?;
        send(TokioIo::new(tls), host, path).await
    } else {
        send(TokioIo::new(tcp), host, path).await
    }
}

/// The caller names the address and the request in its message; errors say what failed.
async fn send<T>(io: T, host: &str, path: &str) -> Result<ProbeAnswer, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    // The connection is driven until the response head arrives; dropping the task (with
    // the sender) closes it.
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "instance-manager-health/1")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("invalid probe request: {e}"))?;
    let answer = sender.send_request(request).await;
    driver.abort();
    let response = answer.map_err(|e| format!("no response: {e}"))?;
    Ok(ProbeAnswer {
        status: response.status().as_u16(),
        location: response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            ProbeTarget::parse("http://127.0.0.1:8080").unwrap(),
            ProbeTarget {
                https: false,
                host: "127.0.0.1".into(),
                port: 8080
            }
        );
        let alb = ProbeTarget::parse("https://alb-1.eu-west-1.elb.amazonaws.com/").unwrap();
        assert!(alb.https);
        assert_eq!(alb.port, 443);
        assert_eq!(alb.url(), "https://alb-1.eu-west-1.elb.amazonaws.com:443");
        assert_eq!(ProbeTarget::parse("http://[::1]:81").unwrap().host, "::1");
        for bad in [
            "ftp://x",
            "http://",
            "http://x:0",
            "http://x:99999",
            "http://x/path",
            "http://u@x",
            "x:80",
        ] {
            assert!(ProbeTarget::parse(bad).is_err(), "{bad}");
        }
    }

    /// A one-connection server answering `response` (after reading the request head if
    /// `read_head`); returns its port and, at the end, the head it read and how many more
    /// connections came.
    async fn answer_once(
        response: &'static str,
        read_head: bool,
    ) -> (u16, tokio::task::JoinHandle<(String, usize)>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buffer = [0u8; 512];
            while read_head && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buffer).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buffer[..n]);
            }
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
            // Count further connections for a moment: a followed redirect would make one.
            let more =
                tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept())
                    .await
                    .map_or(0, |_| 1);
            (String::from_utf8_lossy(&head).into_owned(), more)
        });
        (port, served)
    }

    /// The probe is bounded by its caller; so are these tests.
    async fn bounded<T>(probe: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(10), probe)
            .await
            .expect("the probe hung")
    }

    #[tokio::test]
    async fn a_get_carries_the_host_and_path_and_does_not_follow_redirects() {
        let (port, served) = answer_once(
            "HTTP/1.1 301 Moved Permanently\r\nLocation: /wp-admin/\r\nContent-Length: 0\r\n\r\n",
            true,
        )
        .await;
        let target = ProbeTarget::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let answer = bounded(get(&target, "acme.sites.example", "/wp-login.php"))
            .await
            .unwrap();
        assert_eq!(
            answer,
            ProbeAnswer {
                status: 301,
                location: Some("/wp-admin/".into())
            }
        );
        let (head, more) = served.await.unwrap();
        assert!(head.starts_with("GET /wp-login.php HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("\r\nhost: acme.sites.example\r\n"),
            "{head}"
        );
        assert_eq!(more, 0, "the redirect was followed");
    }

    #[tokio::test]
    async fn https_speaks_tls_and_a_non_tls_answer_fails() {
        let (port, _served) =
            answer_once("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false).await;
        let target = ProbeTarget::parse(&format!("https://127.0.0.1:{port}")).unwrap();
        let error = bounded(get(&target, "acme.sites.example", "/"))
            .await
            .unwrap_err();
        assert!(error.starts_with("TLS as acme.sites.example: "), "{error}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let port = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().port()
        };
        let target = ProbeTarget::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let error = bounded(get(&target, "acme.sites.example", "/"))
            .await
            .unwrap_err();
        assert!(error.starts_with("connect: "), "{error}");
    }

    #[test]
    fn accepted_codes() {
        let codes = AcceptedCodes::parse("200-399").unwrap();
        assert!(codes.accepts(200) && codes.accepts(302) && codes.accepts(399));
        assert!(!codes.accepts(404) && !codes.accepts(503) && !codes.accepts(199));
        let listed = AcceptedCodes::parse("200, 301,302,500-502").unwrap();
        assert!(listed.accepts(301) && listed.accepts(501));
        assert!(!listed.accepts(303));
        for bad in ["", "abc", "399-200", "200-", "99", "600"] {
            assert!(AcceptedCodes::parse(bad).is_err(), "{bad}");
        }
    }
}
