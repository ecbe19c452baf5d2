//! Proves the shared test harness (tests/common) works: moto answers through
//! the AWS SDK, helper tools are installed, child processes are managed.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn moto_answers_dynamodb_create_and_list_table() {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };

    let client = common::dynamodb_client().await;
    let table = common::unique_name("harness-smoke");
    client
        .create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("create_table against moto");

    // Other tests share this moto: page through all tables.
    let mut names = Vec::new();
    let mut start: Option<String> = None;
    loop {
        let page = client
            .list_tables()
            .set_exclusive_start_table_name(start.take())
            .send()
            .await
            .expect("list_tables");
        names.extend(page.table_names().iter().cloned());
        match page.last_evaluated_table_name() {
            Some(last) => start = Some(last.to_string()),
            None => break,
        }
    }
    assert!(names.contains(&table), "{table} not in {names:?}");

    client
        .delete_table()
        .table_name(&table)
        .send()
        .await
        .expect("delete_table");
}

#[test]
fn unique_names_differ_and_keep_prefix() {
    let a = common::unique_name("t");
    let b = common::unique_name("t");
    assert_ne!(a, b);
    assert!(a.starts_with("t-") && a.len() == "t-".len() + 12, "{a}");
    assert!(
        a.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'),
        "{a} is not a valid DynamoDB table name"
    );
}

#[test]
fn logged_addresses_are_read_from_human_and_json_lines() {
    let addr: std::net::SocketAddr = "127.0.0.1:41234".parse().unwrap();
    let human =
        "2026-12-01T22:00:00Z  INFO instance_manager::server: serving gRPC address=127.0.0.1:41234";
    let json =
        r#"{"timestamp":"x","level":"INFO","address":"127.0.0.1:41234","message":"serving gRPC"}"#;
    assert_eq!(common::logged_address(human), Some(addr));
    assert_eq!(common::logged_address(json), Some(addr));
    assert_eq!(common::logged_address("serving gRPC"), None);
}

#[test]
fn grpcurl_and_python_tools_are_installed() {
    let out = Command::new(common::grpcurl_path())
        .arg("-version")
        .output()
        .expect("run grpcurl -version");
    let version =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        version.contains("1.8."),
        "unexpected grpcurl version: {version}"
    );

    let status = Command::new(common::python_path())
        .args([
            "-c",
            "import grpc, grpc_tools, grpc_reflection, grpc_health, pymysql",
        ])
        .status()
        .expect("run python");
    assert!(status.success(), "python lacks grpcio/pymysql modules");
}

#[test]
fn server_process_runs_binary_and_captures_output() {
    let out = common::ServerProcess::run(["--help"], &[], Duration::from_secs(60));
    out.assert_success();
}

#[test]
fn server_process_kill_terminate_and_wait_ready() {
    // `sleep` stands in for a long-running server.
    let mut p = common::ServerProcess::spawn_command({
        let mut c = Command::new("sleep");
        c.arg("600");
        c
    });
    assert!(p.try_wait().is_none(), "sleep exited early");
    p.kill();
    assert!(p.try_wait().is_some(), "kill() must reap the child");

    let mut p = common::ServerProcess::spawn_command({
        let mut c = Command::new("sleep");
        c.arg("600");
        c
    });
    let status = p.terminate();
    assert!(!status.success(), "SIGTERM ends sleep with a signal");

    // wait_serving: a listener that a python child opens on a port of its choosing after a
    // short delay, logging its address as the server does.
    let mut p = common::ServerProcess::spawn_command({
        let mut c = Command::new(common::python_path());
        c.args([
            "-c",
            "import socket, sys, time\n\
             time.sleep(0.3)\n\
             s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n\
             print('listening', flush=True)\n\
             print('INFO serving gRPC address=127.0.0.1:%d' % s.getsockname()[1], file=sys.stderr, flush=True)\n\
             time.sleep(600)",
        ]);
        c
    });
    let addr = p.wait_serving();
    assert_eq!(p.url(), format!("http://{addr}"));
    assert!(p.stdout().contains("listening"), "{}", p.logs());
    drop(p); // Drop kills it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "dropped process still listens");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Helper run in a child process by `private_moto_dies_with_its_test_process`.
#[test]
#[ignore = "helper: run by private_moto_dies_with_its_test_process"]
fn private_moto_child() {
    let endpoint = common::start_private_moto();
    println!("MOTO_ENDPOINT={endpoint}");
}

#[test]
fn private_moto_dies_with_its_test_process() {
    // Without IM_TEST_AWS_ENDPOINT a test binary starts its own moto; it must
    // not outlive that binary.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "private_moto_child", "--nocapture"])
        .env_remove("IM_TEST_AWS_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("run the helper test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helper failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let endpoint = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MOTO_ENDPOINT="))
        .unwrap_or_else(|| panic!("no endpoint in helper output:\n{stdout}"));
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "private moto on port {port} still answers after its test process exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
