//! AWS SDK time limits: every client the service builds carries the configured
//! `TimeoutConfig`, and a call to an endpoint that never answers ends, within the limits,
//! in a retryable error. No emulator needed: the endpoint is a local listener that accepts
//! connections and never says a word.

use std::time::{Duration, Instant};

use instance_manager::cloud::accounts::Accounts;
use instance_manager::cloud::error::classify;
use instance_manager::cloud::{
    CloudSettings, EnvironmentConfig, ErrorKind, Platform, SdkTimeouts, Secret,
    control_plane_sdk_config,
};
use instance_manager::domain::Environment;

/// A TCP listener on 127.0.0.1 that accepts every connection and never answers; its URL.
async fn silent_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{addr}")
}

fn settings(endpoint: &str) -> CloudSettings {
    CloudSettings {
        aws_endpoint: Some(endpoint.to_owned()),
        aws_region: Some("us-east-1".into()),
        replica: "timeouts-test".into(),
        sdk_timeouts: SdkTimeouts {
            connect: Duration::from_millis(500),
            attempt: Duration::from_millis(300),
            operation: Duration::from_secs(2),
        },
        environments: vec![EnvironmentConfig {
            name: Environment::Dev,
            account_id: "123456789012".into(),
            region: "eu-west-1".into(),
            role_arn: String::new(),
            external_id: Secret::default(),
            endpoint: None,
            platform: Platform::default(),
            scale_bounds: None,
        }],
        ..CloudSettings::default()
    }
}

#[tokio::test]
async fn a_silent_endpoint_times_out_into_a_retryable_error() {
    let endpoint = silent_endpoint().await;
    let settings = settings(&endpoint);
    let sdk = control_plane_sdk_config(&settings).await;
    let timeouts = sdk
        .timeout_config()
        .expect("the control plane has time limits");
    assert_eq!(
        timeouts.operation_attempt_timeout(),
        Some(Duration::from_millis(300))
    );

    let started = Instant::now();
    let error = tokio::time::timeout(
        Duration::from_secs(20),
        aws_sdk_sts::Client::new(&sdk).get_caller_identity().send(),
    )
    .await
    .expect("the SDK's own limits end the call")
    .unwrap_err();
    let took = started.elapsed();
    let error = classify("sts:GetCallerIdentity", &error);
    assert_eq!(error.kind, ErrorKind::Retryable, "{error}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[tokio::test]
async fn every_environment_client_inherits_the_limits() {
    let endpoint = silent_endpoint().await;
    let settings = settings(&endpoint);
    // A control plane without limits of its own: the environment's clients still get them.
    let control_plane = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .timeout_config(aws_smithy_types::timeout::TimeoutConfig::disabled())
        .load()
        .await;
    let accounts = Accounts::with_control_plane(&control_plane, settings.clone()).await;
    let sdk = accounts.sdk_config(Environment::Dev).unwrap();
    let timeouts = sdk.timeout_config().unwrap();
    assert_eq!(timeouts.connect_timeout(), Some(Duration::from_millis(500)));
    assert_eq!(
        timeouts.operation_attempt_timeout(),
        Some(Duration::from_millis(300))
    );
    assert_eq!(timeouts.operation_timeout(), Some(Duration::from_secs(2)));

    // Through an adapter: the environment's secrets client gives up in time, retryably.
    let cloud = accounts.env(Environment::Dev).await.unwrap();
    let started = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(20), cloud.secrets.read_secret("x"))
        .await
        .expect("the SDK's own limits end the call")
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Retryable, "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "{error}");
}
