//! End to end with a client that is not ours: the real `instance-manager` binary, bootstrapped
//! and served against moto, driven by grpcurl 1.8 (which speaks reflection v1alpha only).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::ServerProcess;

struct Grpcurl {
    addr: String,
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Grpcurl {
    /// `grpcurl -plaintext [-d body] [-H header] ADDRESS ARGS...`
    fn run_with(&self, body: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(common::grpcurl_path());
        command.arg("-plaintext");
        if let Some(body) = body {
            command.args(["-d", body]);
        }
        // A leading `-H header` is a flag, so it goes before the address.
        let (flags, rest) = args.split_at(if args.first() == Some(&"-H") { 2 } else { 0 });
        command.args(flags).arg(&self.addr).args(rest);
        let output = command.output().expect("run grpcurl");
        Output {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(None, args)
    }

    fn call(&self, args: &[&str]) -> String {
        self.call_with(None, args)
    }

    fn call_with(&self, body: Option<&str>, args: &[&str]) -> String {
        let out = self.run_with(body, args);
        assert!(
            out.ok,
            "grpcurl {args:?} failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        out.stdout
    }
}

#[test]
fn grpcurl_lists_describes_checks_health_creates_and_gets() {
    let endpoint = common::aws_endpoint();
    let table = common::unique_name("e2e");
    let bootstrap = [
        "bootstrap",
        "--aws-endpoint",
        endpoint.as_str(),
        "--table",
        table.as_str(),
    ];
    ServerProcess::run(bootstrap, &[], Duration::from_secs(60)).assert_success();
    // Idempotent: a second bootstrap finds the table and succeeds.
    let second = ServerProcess::run(bootstrap, &[], Duration::from_secs(60));
    second.assert_success();
    assert!(
        second.stderr.contains("already exists"),
        "{}",
        second.stderr
    );

    let mut server = ServerProcess::spawn(
        [
            "serve",
            "--listen",
            common::ANY_PORT,
            "--aws-endpoint",
            &endpoint,
            "--table",
            &table,
            "--page-token-secret",
            "do-not-print-me",
        ],
        &[],
    );
    let addr = server.wait_serving();
    let grpcurl = Grpcurl {
        addr: addr.to_string(),
    };

    let services = grpcurl.call(&["list"]);
    for service in [
        "bbws.instance.v1.InstanceService",
        "google.longrunning.Operations",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} missing from:\n{services}"
        );
    }
    let described = grpcurl.call(&["describe", "bbws.instance.v1.InstanceService"]);
    for rpc in [
        "rpc CreateInstance",
        "rpc WatchOperation",
        "returns ( stream .bbws.instance.v1.OperationEvent )",
        "rpc RetryOperation",
    ] {
        assert!(described.contains(rpc), "{rpc} missing from:\n{described}");
    }
    let health = grpcurl.call(&["describe", "grpc.health.v1.Health"]);
    assert!(health.contains("rpc Check"), "{health}");
    let message = grpcurl.call(&["describe", "bbws.instance.v1.Instance"]);
    assert!(message.contains("contact_email"), "{message}");

    // Readiness: NOT_SERVING until the state store answers, then SERVING.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = grpcurl.run(&["grpc.health.v1.Health/Check"]);
        if out.stdout.contains("\"SERVING\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never SERVING: {} {}",
            out.stdout,
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let body = r#"{"parent": "tenants/acme", "instance_id": "wp-main", "request_id": "0e4d2c1a-5b7f-4f0e-9a51-1c2d3e4f5a6b",
        "instance": {"environment": "ENVIRONMENT_DEV", "organization_name": "Acme Corp", "contact_email": "ops@acme.example",
                     "labels": {"team": "web"}}}"#;
    let created = grpcurl.call_with(
        Some(body),
        &["bbws.instance.v1.InstanceService/CreateInstance"],
    );
    // grpcurl pretty-prints the outer message and inlines the Any: compare without spaces.
    let compact: String = created.split_whitespace().collect();
    for expected in [
        r#""name":"operations/"#,
        r#""@type":"type.googleapis.com/bbws.instance.v1.OperationMetadata""#,
        r#""target":"tenants/acme/instances/wp-main""#,
        r#""status":"OPERATION_STATUS_PENDING""#,
        r#""verb":"create""#,
    ] {
        assert!(
            compact.contains(expected),
            "{expected} missing from {created}"
        );
    }
    let replayed = grpcurl.call_with(
        Some(body),
        &["bbws.instance.v1.InstanceService/CreateInstance"],
    );
    let op_name = |s: &str| {
        s.lines()
            .find(|l| l.contains("\"name\": \"operations/"))
            .map(str::trim)
            .map(str::to_owned)
    };
    assert_eq!(op_name(&created), op_name(&replayed));

    let got = grpcurl.call_with(
        Some(r#"{"name": "tenants/acme/instances/wp-main"}"#),
        &["bbws.instance.v1.InstanceService/GetInstance"],
    );
    assert!(
        got.contains("\"state\": \"INSTANCE_STATE_PENDING_PROVISIONING\""),
        "{got}"
    );
    assert!(
        got.contains("\"environment\": \"ENVIRONMENT_DEV\""),
        "{got}"
    );
    assert!(got.contains("\"team\": \"web\""), "{got}");

    let listed = grpcurl.call_with(
        Some(r#"{"parent": "tenants/-"}"#),
        &["bbws.instance.v1.InstanceService/ListInstances"],
    );
    assert!(
        listed.contains("tenants/acme/instances/wp-main"),
        "{listed}"
    );

    let bad = grpcurl.run_with(
        Some(r#"{"parent": "tenants/a;drop", "instance": {"environment": "ENVIRONMENT_DEV"}}"#),
        &["bbws.instance.v1.InstanceService/CreateInstance"],
    );
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("Code: InvalidArgument"),
        "{}",
        bad.stderr
    );
    assert!(bad.stderr.contains("parent"), "{}", bad.stderr);

    // Nothing provisions here (no environment): the instance has nothing to measure yet.
    let pending = grpcurl.run_with(
        Some(r#"{"name": "tenants/acme/instances/wp-main"}"#),
        &["bbws.instance.v1.InstanceService/GetResourceUsage"],
    );
    assert!(
        pending.stderr.contains("Code: FailedPrecondition")
            && pending.stderr.contains("PENDING_PROVISIONING"),
        "{}",
        pending.stderr
    );

    let status = server.terminate();
    assert!(
        status.success(),
        "server exited with {status}\n{}",
        server.logs()
    );
    assert!(
        !server.logs().contains("do-not-print-me"),
        "a secret reached the logs"
    );
}

#[test]
fn dump_config_redacts_secrets() {
    let out = ServerProcess::run(
        ["serve", "--dump-config", "--table", "from-flag"],
        &[
            ("IM_PAGE_TOKEN_SECRET", "hunter2"),
            ("IM_LISTEN", "127.0.0.1:7777"),
        ],
        Duration::from_secs(30),
    );
    out.assert_success();
    assert!(
        out.stdout.contains("table = \"from-flag\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("listen = \"127.0.0.1:7777\""),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("<redacted>"), "{}", out.stdout);
    assert!(!out.stdout.contains("hunter2") && !out.stderr.contains("hunter2"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let endpoint = common::aws_endpoint();
    let table = common::unique_name("json");
    let out = ServerProcess::run(
        [
            "bootstrap",
            "--aws-endpoint",
            endpoint.as_str(),
            "--table",
            table.as_str(),
            "--log-format",
            "json",
        ],
        &[],
        Duration::from_secs(60),
    );
    out.assert_success();
    let lines: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "table created" && l["table"] == table.as_str()),
        "{}",
        out.stderr
    );
}
