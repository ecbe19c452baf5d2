//! The master connection over TLS, as to RDS: against a MariaDB of this test's own that
//! requires secure transport, with certificates made by openssl for this run. The server
//! refuses any connection that is not encrypted, so a call that succeeds went over TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use instance_manager::cloud::mysql::MySqlDatabase;
use instance_manager::cloud::{Database, DbTls, ErrorKind, MasterCredentials};
use instance_manager::config::Secret;

const ADMIN: &str = "tls_admin";
const ADMIN_PASSWORD: &str = "tls-admin-pw";

/// A MariaDB server started for one test, stopped when dropped.
struct TlsMariaDb {
    child: Child,
    port: u16,
    ca: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for TlsMariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(program: &str, args: &[&str], cwd: &Path) {
    let output = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); install it (Debian: openssl, mariadb-server)")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The first of `names` found in PATH or the usual sbin directories.
fn find_program(names: &[&str]) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .collect::<Vec<_>>();
    for name in names {
        for dir in &dirs {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate.to_string_lossy().into_owned();
            }
        }
    }
    panic!(
        "none of {names:?} found; install mariadb-server (Debian: apt-get install mariadb-server)"
    )
}

fn start_tls_mariadb() -> TlsMariaDb {
    let dir = tempfile::Builder::new()
        .prefix("mariadb-tls-")
        .tempdir_in(common::target_tmpdir())
        .unwrap();
    let d = dir.path();
    // A CA, and a server certificate it signed for 127.0.0.1 and localhost.
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=instance-manager test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        d,
    );
    run(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        d,
    );
    std::fs::write(
        d.join("san.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            "server.pem",
        ],
        d,
    );
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();
    let data = d.join("data");
    run(
        &find_program(&["mariadb-install-db", "mysql_install_db"]),
        &[
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            &format!("--user={user}"),
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        d,
    );
    // An administrator that can log in over TCP, as the RDS master user does.
    std::fs::write(
        d.join("init.sql"),
        format!(
            "DROP USER IF EXISTS ''@'localhost';\n\
             CREATE USER IF NOT EXISTS '{ADMIN}'@'localhost' IDENTIFIED BY '{ADMIN_PASSWORD}';\n\
             GRANT ALL PRIVILEGES ON *.* TO '{ADMIN}'@'localhost' WITH GRANT OPTION;\n"
        ),
    )
    .unwrap();
    // A free port can be taken before mariadbd binds it (it cannot report a port of its
    // own choosing): try again on another port when the bind fails.
    let d = d.to_path_buf();
    let mut dir = dir;
    let log_path = d.join("server.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    for _ in 0..4 {
        let port = common::free_port();
        let log_file = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(find_program(&["mariadbd", "mysqld"]))
            .args([
                "--no-defaults".to_owned(),
                format!("--datadir={}", data.display()),
                format!("--user={user}"),
                format!("--port={port}"),
                "--bind-address=127.0.0.1".to_owned(),
                format!("--socket={}", d.join("mysqld.sock").display()),
                format!("--pid-file={}", d.join("mysqld.pid").display()),
                format!("--ssl-ca={}", d.join("ca.pem").display()),
                format!("--ssl-cert={}", d.join("server.pem").display()),
                format!("--ssl-key={}", d.join("server.key").display()),
                "--require-secure-transport=ON".to_owned(),
                "--skip-log-bin".to_owned(),
                format!("--init-file={}", d.join("init.sql").display()),
            ])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start mariadbd");
        let mut server = TlsMariaDb {
            child,
            port,
            ca: d.join("ca.pem"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // "ready for connections" once it listens: a connect alone could reach whoever took
        // the port.
        loop {
            if log().contains("ready for connections") {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let text = log();
                if text.contains("Bind on TCP/IP port") || text.contains("in use") {
                    break;
                }
                panic!("mariadbd exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not listen within 60 s:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    }
    panic!("mariadbd could not bind a port in 4 attempts");
}

fn master(port: u16, tls: DbTls, ca_file: Option<PathBuf>) -> MasterCredentials {
    MasterCredentials {
        host: "127.0.0.1".into(),
        port,
        username: ADMIN.into(),
        password: Secret::new(ADMIN_PASSWORD),
        tls,
        ca_file,
    }
}

#[tokio::test]
async fn the_master_connection_verifies_the_server_and_encrypts() {
    let server = start_tls_mariadb();
    let db = MySqlDatabase::new();
    let name = common::unique_name("tls").replace('-', "_");
    let password = Secret::new("tenant-pw-1");

    // Verified against the environment's CA bundle (for RDS: the RDS global bundle).
    let verified = master(server.port, DbTls::Verified, Some(server.ca.clone()));
    db.ensure_database(&verified, &name, &name, &password)
        .await
        .expect("TLS with the CA file");
    assert!(db.database_exists(&verified, &name).await.unwrap());

    // A tenant user that must use TLS (the platform's `db_require_tls`) logs in over it.
    db.ensure_tenant_database(&verified, &name, &name, &password, true)
        .await
        .expect("REQUIRE SSL user");
    let tenant = MasterCredentials {
        username: name.clone(),
        password: password.clone(),
        ..verified.clone()
    };
    db.check_login(&tenant, &name)
        .await
        .expect("the REQUIRE SSL user logs in over TLS");

    // The same login in plain text is refused by a server that requires secure transport
    // (MySQL says "insecure transport"; MariaDB 10.11 just denies access)…
    let plain = master(server.port, DbTls::Disabled, None);
    let error = db.database_exists(&plain, &name).await.unwrap_err();
    assert!(
        error.message.contains("insecure transport") || error.message.contains("Access denied"),
        "{error}"
    );

    // …and a server certificate from an unknown CA is refused by us, for good.
    let unknown_ca = master(server.port, DbTls::Verified, None);
    let error = db.database_exists(&unknown_ca, &name).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Fatal, "{error}");
    assert!(error.message.contains("TLS"), "{error}");

    db.drop_database(&verified, &name, &name).await.unwrap();
    assert!(!db.database_exists(&verified, &name).await.unwrap());
}

#[tokio::test]
async fn verified_tls_never_falls_back_to_plain_text() {
    // The shared MariaDB of the test run speaks no TLS.
    let opts = mysql_async::Opts::from_url(&common::mysql_url()).unwrap();
    let mut master = master(opts.tcp_port(), DbTls::Verified, None);
    master.host = opts.ip_or_hostname().to_owned();
    master.username = opts.user().unwrap_or("root").to_owned();
    master.password = Secret::new(opts.pass().unwrap_or_default());
    let error = MySqlDatabase::new()
        .database_exists(&master, "mysql")
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Fatal, "{error}");
    assert!(
        error.message.contains("SSL") || error.message.contains("TLS"),
        "{error}"
    );
}
