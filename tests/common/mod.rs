//! Shared harness for integration tests: `mod common;` in a file under `tests/`.
//!
//! Run the suite with `make test` (`scripts/test.sh`): it prepares the venv,
//! starts ONE moto server for all test binaries and exports
//! `IM_TEST_AWS_ENDPOINT`, `IM_TEST_GRPCURL`, `IM_TEST_PYTHON`,
//! `IM_TEST_MYSQL_URL` and the AWS test credentials. A plain `cargo test` also
//! works once the venv exists: each test binary then starts its own moto.
//!
//! Tests share one moto, so every test must use its own table
//! ([`unique_name`]) and must not reset moto's global state.
//!
//! Nothing here mutates the process environment: AWS settings are passed
//! explicitly ([`aws_sdk_config`]) or set on child processes only.
#![allow(dead_code)]

pub mod wordpress;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Region used with moto.
pub const TEST_REGION: &str = "us-east-1";
/// Static credentials accepted by moto.
pub const TEST_ACCESS_KEY_ID: &str = "testing";
pub const TEST_SECRET_ACCESS_KEY: &str = "testing";

/// How long a spawned process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for moto to answer after spawning it.
const MOTO_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval for readiness checks.
const POLL: Duration = Duration::from_millis(50);

/// The crate root (where Cargo.toml is).
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<crate>/.venv/bin/<name>`.
pub fn venv_bin(name: &str) -> PathBuf {
    manifest_dir().join(".venv").join("bin").join(name)
}

const VENV_HINT: &str = "run `make test` (or scripts/ensure-venv.sh) first";

fn env_path_or_venv(var: &str, bin: &str) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => venv_bin(bin),
    };
    assert!(
        path.is_file(),
        "{} not found (from {var} or the project venv): {VENV_HINT}",
        path.display()
    );
    path
}

/// grpcurl 1.8.x: `$IM_TEST_GRPCURL`, else `.venv/bin/grpcurl`.
pub fn grpcurl_path() -> PathBuf {
    env_path_or_venv("IM_TEST_GRPCURL", "grpcurl")
}

/// Python with grpcio, grpcio-tools, grpcio-reflection,
/// grpcio-health-checking and pymysql: `$IM_TEST_PYTHON`, else
/// `.venv/bin/python`.
pub fn python_path() -> PathBuf {
    env_path_or_venv("IM_TEST_PYTHON", "python")
}

/// MariaDB URL for tests: `$IM_TEST_MYSQL_URL`, else
/// `mysql://root@127.0.0.1:3306/test` (what `make test` ensures is running).
pub fn mysql_url() -> String {
    match std::env::var("IM_TEST_MYSQL_URL") {
        Ok(v) if !v.is_empty() => v,
        _ => "mysql://root@127.0.0.1:3306/test".to_string(),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Racy (another process may take it
/// before it is bound again): never use it for a server a test starts; let the server bind
/// port 0 and report the address ([`ServerProcess::wait_serving`]), or retry on EADDRINUSE.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `--listen` value that lets the server pick a free port itself; read it back with
/// [`ServerProcess::wait_serving`].
pub const ANY_PORT: &str = "127.0.0.1:0";

/// The address in a log line of the server: `address=IP:PORT` (human format) or
/// `"address":"IP:PORT"` (JSON).
pub fn logged_address(line: &str) -> Option<SocketAddr> {
    let start = line
        .find("address=")
        .map(|i| i + "address=".len())
        .or_else(|| {
            line.find("\"address\":\"")
                .map(|i| i + "\"address\":\"".len())
        })?;
    let rest = &line[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// `prefix` plus a short random suffix, e.g. `instances-3f2a9c1b7d4e`; valid as
/// a DynamoDB table name when `prefix` is.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// Endpoint URL of the moto server for this test run.
///
/// `$IM_TEST_AWS_ENDPOINT` when set (by `make test`); otherwise a private moto
/// started once per test binary, killed when the test process exits.
pub fn aws_endpoint() -> String {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT
        .get_or_init(|| match std::env::var("IM_TEST_AWS_ENDPOINT") {
            Ok(v) if !v.is_empty() => v.trim_end_matches('/').to_string(),
            _ => start_private_moto(),
        })
        .clone()
}

/// Start a new moto server on a free port and return its endpoint URL. It
/// lives until this process exits (however it exits): it runs under a tiny
/// `sh` that waits for EOF on a pipe whose write end only this process holds.
/// Prefer [`aws_endpoint`], which shares one server.
pub fn start_private_moto() -> String {
    // A free port may be taken before moto binds it: try a few.
    for _ in 0..4 {
        if let Some(endpoint) = try_start_private_moto() {
            return endpoint;
        }
    }
    panic!("moto could not bind a port in 4 attempts");
}

/// `None` when moto exited before answering because its port was taken meanwhile.
fn try_start_private_moto() -> Option<String> {
    // scripts/moto_serial.py: moto answering one request at a time, so that its DynamoDB
    // transactions are atomic under concurrency as real DynamoDB's are.
    let moto = venv_bin("python");
    assert!(moto.is_file(), "{} not found: {VENV_HINT}", moto.display());
    let serial = manifest_dir().join("scripts").join("moto_serial.py");
    let port = free_port();
    let log = target_tmpdir().join(format!("moto-{port}.log"));
    let script = r#""$0" "$3" -H 127.0.0.1 -p "$1" >"$2" 2>&1 </dev/null &
pid=$!
read _ignored || :
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null"#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&moto)
        .arg(port.to_string())
        .arg(&log)
        .arg(&serial)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sh to run moto_server");
    // Keep the write end open for the rest of the process: EOF (our exit)
    // makes the wrapper kill moto. Rust opens pipes close-on-exec, so no other
    // child inherits it.
    std::mem::forget(child.stdin.take().expect("piped stdin"));

    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + MOTO_READY_TIMEOUT;
    loop {
        if moto_answers(port) {
            std::mem::forget(child);
            return Some(endpoint);
        }
        // The wrapper outlives moto (it waits for EOF): a lost port shows in moto's log.
        if read_lossy(&log).contains("in use") {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "moto wrapper exited ({status}) before moto answered on {endpoint}; log {}:\n{}",
                log.display(),
                read_lossy(&log)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "moto did not answer on {endpoint} within {MOTO_READY_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                read_lossy(&log)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Does a moto server answer on 127.0.0.1:`port`? (GET /moto-api/data.json)
pub fn moto_answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request = "GET /moto-api/data.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let head = String::from_utf8_lossy(&head[..got]);
    head.starts_with("HTTP/1.") && head.get(9..12) == Some("200")
}

/// SDK config for moto: region us-east-1, static credentials
/// `testing`/`testing`, the given endpoint URL. Independent of the process
/// environment's AWS_* credentials and region.
pub async fn aws_sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(TEST_REGION))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            TEST_ACCESS_KEY_ID,
            TEST_SECRET_ACCESS_KEY,
            None,
            None,
            "instance-manager-tests",
        ))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// SDK config for a fresh, empty AWS account in the shared moto: a role assumed in a
/// random account id (moto keeps every account apart), `session` naming the session.
pub async fn fresh_account(session: &str) -> aws_config::SdkConfig {
    let account = format!("{:012}", uuid::Uuid::new_v4().as_u128() % 1_000_000_000_000);
    assumed_role(&account, TEST_REGION, session).await
}

/// SDK config in `account` (role `{session}` assumed there with the test credentials; moto
/// puts what the role makes in the role's account), in `region`.
pub async fn assumed_role(account: &str, region: &str, session: &str) -> aws_config::SdkConfig {
    let endpoint = aws_endpoint();
    let base = aws_sdk_config(&endpoint).await;
    let assumed = aws_sdk_sts::Client::new(&base)
        .assume_role()
        .role_arn(format!("arn:aws:iam::{account}:role/{session}"))
        .role_session_name(session)
        .send()
        .await
        .expect("assume role");
    let credentials = assumed.credentials().expect("credentials");
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_owned()))
        .endpoint_url(&endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            credentials.access_key_id(),
            credentials.secret_access_key(),
            Some(credentials.session_token().to_owned()),
            None,
            "assumed-role",
        ))
        .load()
        .await
}

/// [`aws_sdk_config`] for [`aws_endpoint`].
pub async fn test_sdk_config() -> aws_config::SdkConfig {
    aws_sdk_config(&aws_endpoint()).await
}

/// A DynamoDB client against [`aws_endpoint`].
pub async fn dynamodb_client() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&test_sdk_config().await)
}

/// Environment for child processes that talk to moto (AWS test credentials
/// and region; no IMDS).
pub fn aws_test_env() -> Vec<(String, String)> {
    [
        ("AWS_REGION", TEST_REGION),
        ("AWS_DEFAULT_REGION", TEST_REGION),
        ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `CARGO_TARGET_TMPDIR` (a per-crate scratch dir inside target/).
pub fn target_tmpdir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&dir).expect("create CARGO_TARGET_TMPDIR");
    dir
}

/// Path of the `instance-manager` binary under test: the one cargo built for this test
/// run, or `IM_TEST_BIN` when set (a copy of it, or a release build of the same source —
/// for example while other checkouts share the target directory and rebuild its binary).
pub fn bin_path() -> PathBuf {
    match std::env::var_os("IM_TEST_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_instance-manager")),
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Variables the binary reads as defaults for its flags: removed from child
/// environments so that a developer's shell cannot change a test.
const BIN_ENV_VARS: &[&str] = &[
    "IM_AWS_ENDPOINT",
    "IM_TABLE",
    "IM_LISTEN",
    "IM_CORS_ALLOWED_ORIGINS",
    "IM_AUTH_DISABLED",
    "IM_TRACING_OTLP_ENDPOINT",
    "IM_TRACING_SAMPLE_RATIO",
    "IM_TRACING_SERVICE_NAME",
    // The client subcommands' settings.
    "IM_SERVER",
    "IM_TOKEN",
    "IM_OUTPUT",
    "IM_CA_FILE",
    "IM_CERT_FILE",
    "IM_KEY_FILE",
    "IM_TIMEOUT_SECS",
];

/// AWS variables that could point a child at real AWS or another identity.
const AWS_ENV_VARS_REMOVED: &[&str] = &[
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
];

/// A running `instance-manager` process (or any command, via
/// [`ServerProcess::spawn_command`]) with stdout/stderr captured to files.
/// Killed (SIGKILL) on drop if still running. If the test is panicking, the
/// log directory is kept and its path printed.
pub struct ServerProcess {
    child: Option<Child>,
    status: Option<ExitStatus>,
    dir: Option<tempfile::TempDir>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    /// Address passed to `wait_ready`, if any.
    pub addr: Option<SocketAddr>,
}

impl ServerProcess {
    /// Spawn the binary with `args`. The child gets the AWS test env (region,
    /// credentials; no profile, session token or AWS_ENDPOINT_URL), then
    /// `envs` on top; `IM_AWS_ENDPOINT`, `IM_TABLE`, `IM_LISTEN` and the client
    /// settings (`IM_SERVER`, `IM_TOKEN`, ...) are cleared unless given in `envs`.
    pub fn spawn<I, S>(args: I, envs: &[(&str, &str)]) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(bin_path());
        cmd.args(args);
        for var in BIN_ENV_VARS.iter().chain(AWS_ENV_VARS_REMOVED) {
            cmd.env_remove(var);
        }
        for (k, v) in aws_test_env() {
            cmd.env(k, v);
        }
        // Servers run without authentication unless a test configures it (and sets
        // `IM_AUTH_DISABLED=false` in `envs`).
        cmd.env("IM_AUTH_DISABLED", "true");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Self::spawn_command(cmd)
    }

    /// Spawn any prepared command (e.g. a Python gRPC client) with the same
    /// log capture and lifetime management. Its stdin is /dev/null and its
    /// stdout/stderr go to files.
    pub fn spawn_command(mut cmd: Command) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("im-proc-")
            .tempdir_in(target_tmpdir())
            .expect("create temp dir for process logs");
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create stdout.log"))
            .stderr(File::create(&stderr_path).expect("create stderr.log"));
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("spawn {:?}: {e}", cmd.get_program());
        });
        ServerProcess {
            child: Some(child),
            status: None,
            dir: Some(dir),
            stdout_path,
            stderr_path,
            addr: None,
        }
    }

    /// `instance-manager serve` on a free 127.0.0.1 port against `endpoint`
    /// and `table`, waited for until it accepts connections.
    pub fn serve(endpoint: &str, table: &str) -> Self {
        let mut server = Self::spawn(
            [
                "serve",
                "--listen",
                ANY_PORT,
                "--aws-endpoint",
                endpoint,
                "--table",
                table,
            ],
            &[],
        );
        server.wait_serving();
        server
    }

    /// Waits for the server's "serving gRPC" log line (a server started with
    /// `--listen 127.0.0.1:0` binds a port itself and logs it), then until it accepts
    /// connections; returns the address. Panics (with the logs) if it exits first.
    pub fn wait_serving(&mut self) -> SocketAddr {
        let addr = self.wait_logged_address("serving gRPC");
        self.wait_ready(addr);
        addr
    }

    /// The address logged on the first stderr line containing `message`.
    pub fn wait_logged_address(&mut self, message: &str) -> SocketAddr {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(addr) = self
                .stderr()
                .lines()
                .filter(|line| line.contains(message))
                .find_map(logged_address)
            {
                return addr;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "process exited ({status}) before logging {message:?}\n{}",
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "process did not log {message:?} within {READY_TIMEOUT:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Run the binary to completion (at most `timeout`) and return its exit
    /// status, stdout and stderr. Panics on timeout (after killing it).
    pub fn run<I, S>(args: I, envs: &[(&str, &str)], timeout: Duration) -> RunOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut p = Self::spawn(args, envs);
        let status = p.wait_exit(timeout).unwrap_or_else(|| {
            p.kill();
            panic!(
                "instance-manager did not exit within {timeout:?}\n{}",
                p.logs()
            )
        });
        RunOutput {
            status,
            stdout: p.stdout(),
            stderr: p.stderr(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Poll until `addr` accepts TCP connections. Panics (with the logs) if the
    /// process exits first or the deadline passes.
    pub fn wait_ready(&mut self, addr: SocketAddr) {
        self.wait_ready_within(addr, READY_TIMEOUT);
    }

    pub fn wait_ready_within(&mut self, addr: SocketAddr, timeout: Duration) {
        self.addr = Some(addr);
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "process exited ({status}) before listening on {addr}\n{}",
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "process did not listen on {addr} within {timeout:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `http://addr` of a server made ready with `wait_ready`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr.expect("wait_ready was not called"))
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
        {
            self.status = child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Send a signal by name (`TERM`, `INT`, `KILL`, ...) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        if self.status.is_some() {
            return;
        }
        if let Some(pid) = self.pid() {
            // Fails if the process has just exited; that is fine.
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// SIGTERM, then wait up to 30 s for a graceful exit. Panics (after
    /// SIGKILL) if it does not exit in time.
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(30))
    }

    pub fn terminate_within(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.signal("TERM");
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => {
                self.kill();
                panic!(
                    "process did not exit within {timeout:?} of SIGTERM\n{}",
                    self.logs()
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Directory holding stdout.log and stderr.log.
    pub fn log_dir(&self) -> &Path {
        self.stdout_path.parent().expect("log dir")
    }

    /// Both logs, labelled, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- stdout ({}) ---\n{}\n--- stderr ({}) ---\n{}",
            self.stdout_path.display(),
            self.stdout(),
            self.stderr_path.display(),
            self.stderr()
        )
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("process logs kept in {}", kept.display());
        }
    }
}

/// Result of [`ServerProcess::run`].
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// Panic with the output unless the process exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "instance-manager failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// `GET /metrics` at `addr` (a server's `metrics_listen`): the content type and the body.
/// Panics unless the answer is 200.
pub async fn scrape_metrics(addr: SocketAddr) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (content_type, body.to_owned())
}

/// Runs the future `make` builds on a thread and runtime of its own and waits for it: for
/// cleanup in destructors (of thread-locals, say), where the test's runtime is gone.
pub fn run_on_own_thread<F>(make: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime for the cleanup");
        runtime.block_on(make());
    })
    .join();
}
