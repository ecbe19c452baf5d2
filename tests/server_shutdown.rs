//! Graceful shutdown of the real process: health turns NOT_SERVING on the first signal, open
//! streams are drained within the grace period, and a second signal exits at once.

mod common;

use std::time::Duration;

use common::ServerProcess;
use tonic::Streaming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Generous upper bounds that only stop a hung test; nothing here measures time.
const EXIT_BOUND: Duration = Duration::from_secs(60);

async fn serve(grace_secs: &str) -> (ServerProcess, Streaming<HealthCheckResponse>) {
    let endpoint = common::aws_endpoint();
    let table = common::unique_name("shutdown");
    ServerProcess::run(
        [
            "bootstrap",
            "--aws-endpoint",
            endpoint.as_str(),
            "--table",
            table.as_str(),
        ],
        &[],
        EXIT_BOUND,
    )
    .assert_success();
    let mut server = ServerProcess::spawn(
        [
            "serve",
            "--listen",
            common::ANY_PORT,
            "--aws-endpoint",
            &endpoint,
            "--table",
            &table,
            "--shutdown-grace-secs",
            grace_secs,
        ],
        &[],
    );
    let addr = server.wait_serving();
    assert!(
        !server.stderr().contains('\u{1b}'),
        "no colour codes in a log written to a file:\n{}",
        server.stderr()
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // The watch reports NOT_SERVING until the state store answered, then SERVING.
    loop {
        let update = watch.message().await.unwrap().expect("watch ended early");
        if update.status() == ServingStatus::Serving {
            break;
        }
    }
    (server, watch)
}

async fn next_status(watch: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    watch
        .message()
        .await
        .unwrap()
        .expect("watch ended")
        .status()
}

#[tokio::test]
async fn first_signal_reports_not_serving_and_drains_open_streams() {
    let (mut server, mut watch) = serve("1").await;
    server.signal("TERM");
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    // The open watch does not hold the server up past its grace period.
    let status = server.wait_exit(EXIT_BOUND).expect("server did not exit");
    assert!(status.success(), "{status}\n{}", server.logs());
    assert!(
        server.logs().contains("grace period over"),
        "{}",
        server.logs()
    );
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    // A grace period far longer than the bound below: only the second signal can end it.
    let (mut server, mut watch) = serve("3600").await;
    server.signal("TERM");
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    server.signal("INT");
    let status = server
        .wait_exit(EXIT_BOUND)
        .expect("second signal did not stop the server");
    assert_eq!(status.code(), Some(130), "{}", server.logs());
}
