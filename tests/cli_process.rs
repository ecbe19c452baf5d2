//! The client CLI as operators run it: the built binary as a process, against a server
//! process on the emulators. Output and exit codes are asserted, `--output json` parsed.

mod common;
mod platform;

use std::time::Duration;

use common::{RunOutput, ServerProcess};
use instance_manager::domain::Environment;
use serde_json::Value;

/// Bounds a hung command; nothing here measures time.
const COMMAND_BOUND: Duration = Duration::from_secs(300);

/// The CLI pointed at one server.
struct Cli {
    server: String,
    envs: Vec<(&'static str, &'static str)>,
}

impl Cli {
    fn new(addr: &str) -> Self {
        Self {
            server: format!("http://{addr}"),
            envs: Vec::new(),
        }
    }

    fn run(&self, args: &[&str]) -> RunOutput {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--server", &self.server]);
        ServerProcess::run(&all, &self.envs, COMMAND_BOUND)
    }

    /// Runs `args`, asserts exit 0, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        out.assert_success();
        assert!(
            !out.stdout.contains('\u{1b}') && !out.stderr.contains('\u{1b}'),
            "no terminal codes when not on a terminal: {out:?}"
        );
        out.stdout
    }

    /// Runs `args` with `--output json`, asserts exit 0, parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let stdout = self.ok(&all);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}\n{stdout}"))
    }
}

fn exit_code(out: &RunOutput) -> Option<i32> {
    out.status.code()
}

#[test]
fn the_cli_drives_an_instance_from_create_to_delete() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = runtime.block_on(platform::config_with_platforms(&[Environment::Dev]));
    let dir = tempfile::tempdir().unwrap();
    let path = platform::write_config(&config, dir.path(), 30);
    let (_server, addr) = platform::serve_process(&path, "");
    let cli = Cli::new(&addr);
    let tenant = platform::tenant("cli");
    let name = format!("tenants/{tenant}/instances/wp");

    // create --watch, JSON: the operation as it ended, progress as plain lines on stderr.
    let out = cli.run(&[
        "create",
        &name,
        "--environment",
        "dev",
        "--organization",
        "CLI Ltd",
        "--contact-email",
        "ops@example.com",
        "--label",
        "team=web",
        "--watch",
        "--output",
        "json",
    ]);
    out.assert_success();
    let created: Value = serde_json::from_str(&out.stdout).expect("create prints JSON");
    assert_eq!(created["done"], true, "{created}");
    assert_eq!(
        created["metadata"]["status"], "OPERATION_STATUS_COMPLETED",
        "{created}"
    );
    assert_eq!(created["metadata"]["verb"], "create");
    assert_eq!(created["response"]["name"], name.as_str());
    assert_eq!(created["response"]["state"], "INSTANCE_STATE_ACTIVE");
    let create_op = created["name"].as_str().unwrap().to_owned();
    assert!(create_op.starts_with("operations/"), "{create_op}");
    // Not a terminal: one plain line per event, the steps in them, the end announced.
    assert!(
        out.stderr.contains(&format!("watching {create_op}")),
        "{}",
        out.stderr
    );
    for line in ["database SUCCEEDED", "service SUCCEEDED", "[100%]"] {
        assert!(out.stderr.contains(line), "{line}\n{}", out.stderr);
    }
    assert!(
        out.stderr
            .trim_end()
            .ends_with(&format!("{create_op}: COMPLETED")),
        "{}",
        out.stderr
    );

    // get (table and JSON, the short name form), list.
    let table = cli.ok(&["get", &format!("{tenant}/wp")]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("state") && l.ends_with("ACTIVE")),
        "{table}"
    );
    assert!(table.contains("team=web"), "{table}");
    let instance = cli.json(&["get", &name]);
    assert_eq!(instance["desiredCount"], 2, "{instance}");
    let listed = cli.json(&["list", &tenant, "--environment", "dev"]);
    let names: Vec<&str> = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [name.as_str()], "{listed}");
    let table = cli.ok(&["list", "--state", "active"]);
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&name) && l.contains(" ACTIVE ")),
        "{table}"
    );

    // scale --watch, tables: the final operation with its steps; exit 0.
    let scaled = cli.ok(&["scale", &name, "--count", "3", "--watch"]);
    assert!(
        scaled
            .lines()
            .any(|l| l.starts_with("status") && l.ends_with("COMPLETED")),
        "{scaled}"
    );
    assert!(
        scaled
            .lines()
            .any(|l| l.starts_with("STEP ") && l.contains("STATUS")),
        "{scaled}"
    );
    assert_eq!(cli.json(&["get", &name])["desiredCount"], 3);
    // Without --watch: the operation just started, exit 0; `watch` follows it to its end.
    let restart = cli.json(&["restart", &name]);
    let restart_op = restart["name"].as_str().unwrap().to_owned();
    let watched = cli.json(&["watch", &restart_op]);
    assert_eq!(watched["name"], restart_op.as_str());
    assert_eq!(watched["metadata"]["status"], "OPERATION_STATUS_COMPLETED");

    // health: a report (moto runs no task: not HEALTHY, but the call succeeds).
    let health = cli.json(&["health", &name]);
    let checks: Vec<&str> = health["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for check in [
        "ecs_service",
        "alb_targets",
        "http",
        "database",
        "db_instance",
    ] {
        assert!(checks.contains(&check), "{check}: {health}");
    }
    let table = cli.ok(&["health", &name]);
    assert!(table.contains("CHECK "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["database", "HEALTHY"])),
        "{table}"
    );

    // operations: list by target, get one.
    let operations = cli.json(&["operations", "list", "--target", &name]);
    let verbs: Vec<&str> = operations["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["verb"].as_str().unwrap())
        .collect();
    for verb in ["create", "scale", "restart"] {
        assert!(verbs.contains(&verb), "{verb}: {operations}");
    }
    let got = cli.ok(&[
        "operations",
        "get",
        create_op.trim_start_matches("operations/"),
    ]);
    assert!(got.contains("access_point"), "{got}");

    // delete --watch: DEPROVISIONED after.
    let deleted = cli.json(&["delete", &name, "--skip-archive", "--watch"]);
    assert_eq!(deleted["metadata"]["status"], "OPERATION_STATUS_COMPLETED");
    assert_eq!(
        cli.json(&["get", &name])["state"],
        "INSTANCE_STATE_DEPROVISIONED"
    );

    // Errors: the code, the reason, the field violation; no debug dump; non-zero.
    let bad = cli.run(&[
        "create",
        "tenants/a;drop/instances/wp",
        "--environment",
        "dev",
    ]);
    assert_eq!(exit_code(&bad), Some(1), "{bad:?}");
    assert!(bad.stdout.is_empty(), "{bad:?}");
    assert!(
        bad.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{}",
        bad.stderr
    );
    assert!(
        bad.stderr.contains("\n  invalid field parent: "),
        "{}",
        bad.stderr
    );
    assert!(
        bad.stderr.contains("reason: INVALID_ARGUMENT"),
        "{}",
        bad.stderr
    );
    assert!(!bad.stderr.contains("Status {"), "{}", bad.stderr);
    let missing = cli.run(&["get", &format!("tenants/{tenant}/instances/nothere")]);
    assert_eq!(exit_code(&missing), Some(1), "{missing:?}");
    assert!(missing.stderr.contains("NOT_FOUND: "), "{}", missing.stderr);
    assert!(
        missing.stderr.contains("reason: INSTANCE_NOT_FOUND"),
        "{}",
        missing.stderr
    );
    // A busy or finished target is refused with its reason: resuming an instance that is
    // not SUSPENDED.
    let refused = cli.run(&["resume", &name, "--watch"]);
    assert_eq!(exit_code(&refused), Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("FAILED_PRECONDITION"),
        "{}",
        refused.stderr
    );
}

#[test]
fn a_failing_operation_exits_non_zero_and_says_why() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = runtime.block_on(platform::config_with_platforms(&[Environment::Sit]));
    let dir = tempfile::tempdir().unwrap();
    let path = platform::write_config(&config, dir.path(), 30);
    let (_server, addr) = platform::serve_process(&path, "service=error");
    let cli = Cli::new(&addr);
    let tenant = platform::tenant("clifail");
    let name = format!("{tenant}/wp");

    let out = cli.run(&[
        "create",
        &name,
        "-e",
        "sit",
        "--organization",
        "Fail Ltd",
        "--contact-email",
        "ops@example.com",
        "--watch",
    ]);
    assert_eq!(exit_code(&out), Some(3), "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("status") && l.ends_with("FAILED")),
        "the final operation is still printed:\n{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("service FAILED"),
        "the failing step is shown:\n{}",
        out.stderr
    );
    let message = out
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(
        message.starts_with("error: operation operations/") && message.contains(" ended FAILED"),
        "{}",
        out.stderr
    );
    // `watch` of the ended operation says the same, JSON on stdout.
    let operation = message
        .trim_start_matches("error: operation ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let mut args = vec!["watch", operation.as_str(), "--output", "json"];
    let watched = cli.run(&args);
    assert_eq!(exit_code(&watched), Some(3), "{watched:?}");
    let ended: Value = serde_json::from_str(&watched.stdout).unwrap();
    assert_eq!(ended["metadata"]["status"], "OPERATION_STATUS_FAILED");
    assert!(ended["error"]["code"].as_i64().unwrap_or(0) > 0, "{ended}");
    // A retry on the same failing server fails again: non-zero again.
    args = vec!["retry", operation.as_str(), "--watch"];
    let retried = cli.run(&args);
    assert_eq!(exit_code(&retried), Some(3), "{retried:?}");
}

#[test]
fn bad_command_lines_and_unreachable_servers_exit_non_zero() {
    // No server needed: clap refuses before connecting.
    let cli = Cli::new("127.0.0.1:9");
    let out = cli.run(&["create", "acme/wp"]);
    assert_eq!(exit_code(&out), Some(2), "{out:?}");
    assert!(out.stderr.contains("--environment"), "{}", out.stderr);
    let out = cli.run(&["create", "acme/wp", "-e", "qa"]);
    assert_eq!(exit_code(&out), Some(2), "{out:?}");
    assert!(out.stderr.contains("dev, sit, prod"), "{}", out.stderr);

    // Nothing listens on the discard port: a clear connection error, and the token, which
    // travels only in a header, appears nowhere.
    let mut cli = Cli::new("127.0.0.1:9");
    cli.envs = vec![("IM_TOKEN", "s3cr3t-t0ken")];
    let out = cli.run(&["get", "acme/wp"]);
    assert_eq!(exit_code(&out), Some(1), "{out:?}");
    assert!(
        out.stderr
            .starts_with("error: cannot connect to http://127.0.0.1:9"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("s3cr3t") && !out.stdout.contains("s3cr3t"));
    let out = cli.run(&["get", "acme/wp", "--ca-file", "/nonexistent.pem"]);
    assert_eq!(exit_code(&out), Some(1), "{out:?}");
    assert!(out.stderr.contains("https://"), "{}", out.stderr);
}

#[test]
fn healthcheck_exits_zero_only_while_the_server_is_serving() {
    // Nothing listens: not healthy.
    let out = Cli::new("127.0.0.1:9").run(&["healthcheck"]);
    assert_eq!(exit_code(&out), Some(1), "{out:?}");
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);

    // A server whose table does not exist yet answers NOT_SERVING (its state store does not
    // answer): the check fails and says so.
    let endpoint = common::aws_endpoint();
    let table = common::unique_name("healthcheck");
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
    let addr = server.wait_serving().to_string();
    let cli = Cli::new(&addr);
    let out = cli.run(&["healthcheck"]);
    assert_eq!(exit_code(&out), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("the server answers NOT_SERVING"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    // Once the table exists the server turns SERVING by itself, and so does the check.
    common::ServerProcess::run(
        ["bootstrap", "--aws-endpoint", &endpoint, "--table", &table],
        &[],
        COMMAND_BOUND,
    )
    .assert_success();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = cli.run(&["healthcheck"]);
        if exit_code(&out) == Some(0) || std::time::Instant::now() >= deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(exit_code(&out), Some(0), "{out:?}\n{}", server.logs());
    assert_eq!(out.stdout, "SERVING\n");

    // One service by name; a name the server does not know is an error, not SERVING.
    let out = cli.ok(&[
        "healthcheck",
        "--service",
        "bbws.instance.v1.InstanceService",
    ]);
    assert_eq!(out, "SERVING\n");
    let out = cli.run(&["healthcheck", "--service", "no.such.Service"]);
    assert_eq!(exit_code(&out), Some(1), "{out:?}");
    assert!(out.stderr.contains("NOT_FOUND"), "{}", out.stderr);
}
