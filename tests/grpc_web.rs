//! gRPC-Web on the gRPC port, as a browser's client library speaks it: HTTP/1.1 POSTs with
//! `application/grpc-web+proto`, each message framed by hand (1 flag byte, 4-byte length,
//! protobuf), the status in a trailer frame; CORS for the configured origins only. Native
//! gRPC keeps working on the same port (the native client here, and every other test).

mod common;
mod platform;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use instance_manager::domain::Environment;
use instance_manager::proto::v1;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_types::StatusExt;

const ALLOWED: &str = "http://portal.test:8080";
const OTHER: &str = "http://evil.test";
/// Bounds a hung exchange; nothing here measures time.
const EXCHANGE_BOUND: Duration = Duration::from_secs(120);

struct HttpResponse {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`), read to its end.
async fn exchange(addr: &str, head: &str, body: &[u8]) -> HttpResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = head.replace('\n', "\r\n").into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(EXCHANGE_BOUND, stream.read_to_end(&mut raw))
        .await
        .expect("the server answers and closes")
        .unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = String::from_utf8(data[..line_end].to_vec()).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A gRPC-Web message frame: flag 0, big-endian length, the message.
fn frame(message: &impl Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&bytes);
    framed
}

/// The data frames' messages and the trailer frame's fields of a gRPC-Web response body.
fn unframe(mut body: &[u8]) -> (Vec<Vec<u8>>, BTreeMap<String, String>) {
    let mut messages = Vec::new();
    let mut trailers = BTreeMap::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "truncated frame header: {body:?}");
        let flag = body[0];
        let length = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let payload = &body[5..5 + length];
        if flag & 0x80 != 0 {
            assert!(trailers.is_empty(), "one trailer frame");
            for line in String::from_utf8(payload.to_vec()).unwrap().split("\r\n") {
                if let Some((k, v)) = line.split_once(':') {
                    trailers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
        } else {
            assert!(trailers.is_empty(), "no data after the trailers");
            messages.push(payload.to_vec());
        }
        body = &body[5 + length..];
    }
    (messages, trailers)
}

fn post_head(addr: &str, path: &str, length: usize, origin: Option<&str>) -> String {
    let origin = origin.map(|o| format!("Origin: {o}\n")).unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\nHost: {addr}\nContent-Type: application/grpc-web+proto\nAccept: application/grpc-web+proto\nX-Grpc-Web: 1\n{origin}Content-Length: {length}\nConnection: close\n\n"
    )
}

/// A gRPC-Web call; the response is checked to be a gRPC-Web answer (HTTP 200, its content
/// type, a trailer frame) and returned with its messages and trailers.
async fn call(
    addr: &str,
    path: &str,
    request: &impl Message,
    origin: Option<&str>,
) -> (HttpResponse, Vec<Vec<u8>>, BTreeMap<String, String>) {
    let body = frame(request);
    let response = exchange(addr, &post_head(addr, path, body.len(), origin), &body).await;
    assert_eq!(response.status, 200, "{:?}", response.headers);
    assert_eq!(
        response.header("content-type"),
        Some("application/grpc-web+proto"),
        "{:?}",
        response.headers
    );
    let (messages, mut trailers) = unframe(&response.body);
    if trailers.is_empty() {
        // A "trailers-only" response (PROTOCOL-WEB: trailers may be sent together with the
        // response headers, with no message in the body): what tonic answers when a call
        // fails before any message. The status is then in the headers, which CORS exposes.
        assert!(messages.is_empty(), "{:?}", response.headers);
        for key in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
            if let Some(value) = response.header(key) {
                trailers.insert(key.to_owned(), value.to_owned());
            }
        }
    }
    assert!(
        trailers.contains_key("grpc-status"),
        "no status in a trailer frame nor in the headers: {:?}",
        response.headers
    );
    (response, messages, trailers)
}

#[tokio::test]
async fn browsers_call_unary_and_streaming_rpcs_over_grpc_web_with_cors() {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    config.cors_allowed_origins = vec![ALLOWED.to_owned()];
    let dir = tempfile::tempdir().unwrap();
    let path = platform::write_config(&config, dir.path(), 30);
    let (_server, addr) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || platform::serve_process(&path, ""))
            .await
            .unwrap()
    };
    const SERVICE: &str = "/bbws.instance.v1.InstanceService";

    // Unary, an error: NOT_FOUND with its ErrorInfo detail (trailers-only: in the headers).
    let missing = v1::GetInstanceRequest {
        name: "tenants/nobody/instances/wp".into(),
    };
    let (_, messages, trailers) =
        call(&addr, &format!("{SERVICE}/GetInstance"), &missing, None).await;
    assert!(messages.is_empty());
    assert_eq!(trailers["grpc-status"], "5", "{trailers:?}");
    let details = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trailers["grpc-status-details-bin"].trim_end_matches('='))
        .unwrap();
    let status = tonic::Status::with_details(tonic::Code::NotFound, "", details.into());
    assert_eq!(
        status.get_error_details().error_info().unwrap().reason,
        "INSTANCE_NOT_FOUND"
    );

    // An instance made with native gRPC on the same port...
    let mut native = platform::Client::connect(&addr).await;
    let tenant = platform::tenant("web");
    let operation = native.create(&tenant, v1::Environment::Dev).await;

    // ...whose progress a browser follows: a server stream over gRPC-Web, every event in
    // order to the terminal one, then status 0.
    let watch = v1::WatchOperationRequest {
        name: operation.name.clone(),
        from_sequence: 0,
    };
    let (_, messages, trailers) =
        call(&addr, &format!("{SERVICE}/WatchOperation"), &watch, None).await;
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
    let events: Vec<v1::OperationEvent> = messages
        .iter()
        .map(|m| v1::OperationEvent::decode(m.as_slice()).unwrap())
        .collect();
    assert!(events.len() > 5, "{events:#?}");
    let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=events.len() as i64).collect::<Vec<_>>());
    let last = events.last().unwrap();
    assert!(last.terminal);
    assert_eq!(last.status(), v1::OperationStatus::Completed, "{events:#?}");

    // Unary, OK, from the allowed origin: the answer, and CORS headers the browser needs.
    let list = v1::ListInstancesRequest {
        parent: format!("tenants/{tenant}"),
        ..Default::default()
    };
    let (response, messages, trailers) = call(
        &addr,
        &format!("{SERVICE}/ListInstances"),
        &list,
        Some(ALLOWED),
    )
    .await;
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
    assert_eq!(messages.len(), 1);
    let listed = v1::ListInstancesResponse::decode(messages[0].as_slice()).unwrap();
    assert_eq!(listed.instances.len(), 1);
    assert_eq!(
        listed.instances[0].name,
        format!("tenants/{tenant}/instances/wp")
    );
    assert_eq!(listed.instances[0].state(), v1::InstanceState::Active);
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some(ALLOWED)
    );
    let exposed = response
        .header("access-control-expose-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for header in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(header), "{exposed}");
    }

    // CORS preflight from the allowed origin: allowed, with the gRPC-Web headers.
    let preflight = |origin: &str| {
        format!(
            "OPTIONS {SERVICE}/ListInstances HTTP/1.1\nHost: {addr}\nOrigin: {origin}\nAccess-Control-Request-Method: POST\nAccess-Control-Request-Headers: content-type,x-grpc-web,x-user-agent,authorization\nConnection: close\n\n"
        )
    };
    let allowed = exchange(&addr, &preflight(ALLOWED), b"").await;
    assert!(
        (200..300).contains(&allowed.status),
        "{} {:?}",
        allowed.status,
        allowed.headers
    );
    assert_eq!(allowed.header("access-control-allow-origin"), Some(ALLOWED));
    assert!(
        allowed
            .header("access-control-allow-methods")
            .unwrap_or_default()
            .contains("POST"),
        "{:?}",
        allowed.headers
    );
    let allowed_headers = allowed
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for header in [
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "authorization",
    ] {
        assert!(allowed_headers.contains(header), "{allowed_headers}");
    }

    // Another origin: the preflight is refused, and so is the call itself, before it runs
    // (the instance it would have created does not exist).
    let refused = exchange(&addr, &preflight(OTHER), b"").await;
    assert_eq!(refused.status, 403, "{:?}", refused.headers);
    assert_eq!(refused.header("access-control-allow-origin"), None);
    let other_tenant = platform::tenant("webevil");
    let create = v1::CreateInstanceRequest {
        parent: format!("tenants/{other_tenant}"),
        instance_id: "wp".into(),
        instance: Some(v1::Instance {
            environment: v1::Environment::Dev.into(),
            organization_name: "Evil Ltd".into(),
            contact_email: "ops@evil.test".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let body = frame(&create);
    let path = format!("{SERVICE}/CreateInstance");
    let response = exchange(
        &addr,
        &post_head(&addr, &path, body.len(), Some(OTHER)),
        &body,
    )
    .await;
    assert_eq!(response.status, 403, "{:?}", response.headers);
    assert_eq!(response.header("access-control-allow-origin"), None);
    let not_created = native
        .instances
        .get_instance(v1::GetInstanceRequest {
            name: format!("tenants/{other_tenant}/instances/wp"),
        })
        .await
        .unwrap_err();
    assert_eq!(not_created.code(), tonic::Code::NotFound);

    // Without the allowed origin the same call from a program without Origin works (CORS is
    // a browser's rule), proving the 403 above came from the origin alone.
    let (_, _, trailers) = call(&addr, &path, &create, None).await;
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
}

#[tokio::test]
async fn with_no_origin_configured_every_browser_origin_is_refused() {
    // The default configuration: no allow-list.
    let endpoint = common::aws_endpoint();
    let table = common::unique_name("web");
    let mut server = tokio::task::spawn_blocking(move || {
        let bootstrap = [
            "bootstrap",
            "--aws-endpoint",
            endpoint.as_str(),
            "--table",
            table.as_str(),
        ];
        common::ServerProcess::run(bootstrap, &[], Duration::from_secs(60)).assert_success();
        let mut server = common::ServerProcess::spawn(
            [
                "serve",
                "--listen",
                common::ANY_PORT,
                "--aws-endpoint",
                &endpoint,
                "--table",
                &table,
            ],
            &[],
        );
        server.wait_serving();
        server
    })
    .await
    .unwrap();
    let addr = server.addr.unwrap().to_string();
    let health = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let body = frame(&health);
    let path = "/grpc.health.v1.Health/Check";
    for origin in [ALLOWED, "http://localhost:8080"] {
        let response = exchange(
            &addr,
            &post_head(&addr, path, body.len(), Some(origin)),
            &body,
        )
        .await;
        assert_eq!(response.status, 403, "{origin}: {:?}", response.headers);
    }
    // A program (no Origin) gets its answer: a data frame, then status 0.
    let (_, messages, trailers) = call(&addr, path, &health, None).await;
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
    let answer = tonic_health::pb::HealthCheckResponse::decode(messages[0].as_slice()).unwrap();
    assert_ne!(answer.status, 0, "{answer:?}");
    server.terminate();
}
