//! A counting TCP relay for the benchmarks: the process under measurement talks to moto (or
//! MariaDB) through it, and it counts and times every request/response round trip without
//! the product's help.
//!
//! Both protocols it relays alternate on a connection: the client sends a request (HTTP/1.1
//! to moto, a command packet to MySQL) and waits for the answer before it sends the next. So
//! a round trip starts with the first client byte after an answer, and ends with the first
//! server byte after it; its time is what the backend (plus the loopback) took. A label
//! classifies each round trip from its first chunk: for AWS the service of the SigV4
//! credential scope and the operation (`X-Amz-Target`, or `Action=` of a query-protocol
//! body, or the HTTP method for REST services); for MySQL the fixed label "mysql".
//!
//! Besides per-label counts and time it keeps the backend's *busy* time: the union of all
//! intervals with at least one round trip outstanding (for moto, which serves one request
//! at a time, that is its utilisation).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// AWS over HTTP/1.1: labels "service:operation".
    Aws,
    /// MySQL: one label.
    Mysql,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Round trips and the time they took, per label.
    pub calls: BTreeMap<String, (u64, Duration)>,
    /// The union of the intervals with a round trip outstanding.
    pub busy: Duration,
}

impl Snapshot {
    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let mut calls = BTreeMap::new();
        for (label, (n, t)) in &self.calls {
            let (n0, t0) = earlier.calls.get(label).copied().unwrap_or_default();
            if *n > n0 {
                calls.insert(label.clone(), (n - n0, t.saturating_sub(t0)));
            }
        }
        Snapshot {
            calls,
            busy: self.busy.saturating_sub(earlier.busy),
        }
    }

    /// Round trips and time of the labels `keep` accepts.
    pub fn total(&self, keep: impl Fn(&str) -> bool) -> (u64, Duration) {
        self.calls
            .iter()
            .filter(|(label, _)| keep(label))
            .fold((0, Duration::ZERO), |(n, t), (_, (n1, t1))| {
                (n + n1, t + *t1)
            })
    }

    /// Round trips and time per service (the label up to its colon).
    pub fn by_service(&self) -> BTreeMap<String, (u64, Duration)> {
        let mut services: BTreeMap<String, (u64, Duration)> = BTreeMap::new();
        for (label, (n, t)) in &self.calls {
            let service = label.split(':').next().unwrap_or(label).to_owned();
            let entry = services.entry(service).or_default();
            entry.0 += n;
            entry.1 += *t;
        }
        services
    }
}

#[derive(Default)]
struct Totals {
    calls: BTreeMap<String, (u64, Duration)>,
    outstanding: usize,
    busy_since: Option<Instant>,
    busy: Duration,
}

pub struct Relay {
    pub addr: SocketAddr,
    totals: Arc<Mutex<Totals>>,
}

impl Relay {
    /// Listens on an ephemeral loopback port and relays every connection to `backend`.
    pub async fn start(backend: SocketAddr, protocol: Protocol) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let totals = Arc::new(Mutex::new(Totals::default()));
        let shared = totals.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let totals = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(backend).await {
                        relay(client, server, protocol, totals).await;
                    }
                });
            }
        });
        Relay { addr, totals }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn snapshot(&self) -> Snapshot {
        let totals = self.totals.lock().expect("relay totals");
        let mut busy = totals.busy;
        if let Some(since) = totals.busy_since {
            busy += since.elapsed();
        }
        Snapshot {
            calls: totals.calls.clone(),
            busy,
        }
    }
}

/// The round trip a connection has outstanding: when it started and its label.
type Outstanding = Arc<Mutex<Option<(Instant, String)>>>;

async fn relay(
    client: TcpStream,
    server: TcpStream,
    protocol: Protocol,
    totals: Arc<Mutex<Totals>>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let outstanding: Outstanding = Arc::new(Mutex::new(None));

    let up = {
        let (outstanding, totals) = (outstanding.clone(), totals.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                {
                    let mut pending = outstanding.lock().expect("outstanding");
                    if pending.is_none() {
                        let now = Instant::now();
                        *pending = Some((now, classify(protocol, &buf[..n])));
                        let mut totals = totals.lock().expect("relay totals");
                        if totals.outstanding == 0 {
                            totals.busy_since = Some(now);
                        }
                        totals.outstanding += 1;
                    }
                }
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = server_write.shutdown().await;
        }
    };
    let down = {
        let (outstanding, totals) = (outstanding.clone(), totals.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some((started, label)) = outstanding.lock().expect("outstanding").take() {
                    finish(&totals, started, label);
                }
                if client_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = client_write.shutdown().await;
        }
    };
    tokio::join!(up, down);
    // A round trip the server never answered (the connection closed) still ends.
    if let Some((started, label)) = outstanding.lock().expect("outstanding").take() {
        finish(&totals, started, format!("{label} (no answer)"));
    }
}

fn finish(totals: &Mutex<Totals>, started: Instant, label: String) {
    let now = Instant::now();
    let mut totals = totals.lock().expect("relay totals");
    let entry = totals.calls.entry(label).or_default();
    entry.0 += 1;
    entry.1 += now - started;
    totals.outstanding -= 1;
    if totals.outstanding == 0
        && let Some(since) = totals.busy_since.take()
    {
        totals.busy += now - since;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// The text after `key` up to the first byte `stop` accepts.
fn field<'a>(chunk: &'a [u8], key: &[u8], stop: impl Fn(u8) -> bool) -> Option<&'a str> {
    let start = find(chunk, key)? + key.len();
    let rest = &chunk[start..];
    let end = rest.iter().position(|&b| stop(b)).unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()
}

/// The label of a round trip from its first chunk.
fn classify(protocol: Protocol, chunk: &[u8]) -> String {
    if protocol == Protocol::Mysql {
        return "mysql".to_owned();
    }
    // Authorization: AWS4-HMAC-SHA256 Credential=AKID/20261202/us-east-1/dynamodb/aws4_request
    let service = field(chunk, b"Credential=", |b| b == b',' || b == b' ')
        .and_then(|scope| scope.split('/').nth(3))
        .unwrap_or("unsigned")
        .to_owned();
    let operation = field(chunk, b"x-amz-target:", |b| b == b'\r')
        .and_then(|t| t.trim().rsplit('.').next())
        .map(str::to_owned)
        .or_else(|| {
            // Query protocol (STS, IAM, ELBv2, RDS, EC2): `Action=...` starts the body.
            let body = find(chunk, b"\r\n\r\n").map(|i| &chunk[i + 4..])?;
            field(body, b"Action=", |b| b == b'&').map(str::to_owned)
        })
        .unwrap_or_else(|| {
            let method = chunk.split(|&b| b == b' ').next().unwrap_or_default();
            String::from_utf8_lossy(method).into_owned()
        });
    format!("{service}:{operation}")
}
