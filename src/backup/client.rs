//! Running the standard MySQL/MariaDB client programs as child processes: which flavour a
//! command is, the temporary option file that carries the credentials (never the command
//! line), and a bounded capture of the child's stderr for error messages.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncReadExt as _;
use tokio::process::{Child, ChildStderr, Command};
use tokio::task::JoinHandle;

use crate::cloud::{CloudError, CloudResult, DbTls, ErrorKind, MasterCredentials};

/// How much of a child's stderr is kept for an error message.
pub const STDERR_LIMIT: usize = 4 * 1024;

/// The client programs, from the platform configuration (`db_dump_command`,
/// `db_client_command`): a program name looked up on `PATH`, or a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpTools {
    pub dump_command: String,
    pub client_command: String,
}

impl Default for DumpTools {
    fn default() -> Self {
        Self {
            dump_command: "mariadb-dump".into(),
            client_command: "mariadb".into(),
        }
    }
}

impl DumpTools {
    /// The platform's commands; an empty one means the default (`mariadb-dump`, `mariadb`).
    pub fn from_platform(platform: &crate::cloud::Platform) -> Self {
        let default = Self::default();
        let pick = |configured: &str, default: String| {
            if configured.trim().is_empty() {
                default
            } else {
                configured.trim().to_owned()
            }
        };
        Self {
            dump_command: pick(&platform.db_dump_command, default.dump_command),
            client_command: pick(&platform.db_client_command, default.client_command),
        }
    }
}

/// MariaDB's and MySQL's client programs differ in their TLS options (MySQL 8 removed
/// `--ssl`/`--skip-ssl`/`--ssl-verify-server-cert` for `--ssl-mode`) and in a few dump
/// options (`--set-gtid-purged` is MySQL's only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    MariaDb,
    MySql,
}

impl Flavour {
    /// From `PROGRAM --version`: MariaDB's programs (also when installed as `mysqldump`)
    /// say "MariaDB".
    pub async fn of(program: &str) -> CloudResult<Flavour> {
        let output = Command::new(program)
            .arg("--version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| CloudError::fatal(format!("cannot run {program}: {e}")))?;
        if !output.status.success() {
            return Err(CloudError::fatal(format!(
                "{program} --version failed with {}",
                output.status
            )));
        }
        Ok(Self::from_version(&String::from_utf8_lossy(&output.stdout)))
    }

    pub fn from_version(version: &str) -> Flavour {
        if version.contains("MariaDB") {
            Flavour::MariaDb
        } else {
            Flavour::MySql
        }
    }
}

/// A `--defaults-extra-file` with the master credentials and TLS settings: created mode
/// 0600 under a random name, removed when dropped.
pub struct DefaultsFile {
    path: PathBuf,
}

impl DefaultsFile {
    pub fn create(master: &MasterCredentials, flavour: Flavour) -> CloudResult<DefaultsFile> {
        Self::create_in(&std::env::temp_dir(), master, flavour)
    }

    pub fn create_in(
        directory: &Path,
        master: &MasterCredentials,
        flavour: Flavour,
    ) -> CloudResult<DefaultsFile> {
        let content = option_file(master, flavour)?;
        let path = directory.join(format!("im-client-{}.cnf", uuid::Uuid::new_v4().simple()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| CloudError::fatal(format!("cannot create the client option file: {e}")))?;
        let file = DefaultsFile { path }.with(|| file.write_all(content.as_bytes()))?;
        Ok(file)
    }

    /// Runs `write`; on failure the file is removed (by drop) and the error returned.
    fn with(self, write: impl FnOnce() -> std::io::Result<()>) -> CloudResult<Self> {
        write()
            .map_err(|e| CloudError::fatal(format!("cannot write the client option file: {e}")))?;
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `--defaults-extra-file=PATH`: it must be the program's first argument.
    pub fn argument(&self) -> String {
        format!("--defaults-extra-file={}", self.path.display())
    }
}

impl Drop for DefaultsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An option-file value in double quotes; the file format's escapes cover `\\` only
/// reliably, so values with quotes or control characters are refused (without showing
/// them: one of them is the password).
fn quoted(what: &str, value: &str) -> CloudResult<String> {
    if value.chars().any(|c| c == '"' || c.is_control()) {
        return Err(CloudError::fatal(format!(
            "the database {what} contains a character a client option file cannot hold (a quote or a control character)"
        )));
    }
    Ok(format!("\"{}\"", value.replace('\\', "\\\\")))
}

/// The `[client]` group read by both programs of both flavours.
pub fn option_file(master: &MasterCredentials, flavour: Flavour) -> CloudResult<String> {
    let mut lines = vec![
        "[client]".to_owned(),
        format!("host={}", quoted("host", &master.host)?),
        format!("port={}", master.port),
        format!("user={}", quoted("user name", &master.username)?),
        format!("password={}", quoted("password", master.password.expose())?),
        // A loopback host would otherwise mean the Unix socket.
        "protocol=TCP".to_owned(),
    ];
    match (master.tls, flavour) {
        (DbTls::Verified, Flavour::MariaDb) => {
            lines.push("ssl".into());
            lines.push("ssl-verify-server-cert".into());
        }
        (DbTls::Verified, Flavour::MySql) => {
            lines.push("ssl-mode=VERIFY_IDENTITY".into());
            // An RDS IAM token is sent with mysql_clear_password, which MySQL's programs
            // refuse unless told (MariaDB's allow it); only ever over verified TLS.
            lines.push("enable-cleartext-plugin".into());
        }
        (DbTls::Disabled, Flavour::MariaDb) => lines.push("skip-ssl".into()),
        (DbTls::Disabled, Flavour::MySql) => lines.push("ssl-mode=DISABLED".into()),
    }
    if master.tls == DbTls::Verified
        && let Some(ca) = &master.ca_file
    {
        lines.push(format!(
            "ssl-ca={}",
            quoted("CA file path", &ca.display().to_string())?
        ));
    }
    lines.push(String::new());
    Ok(lines.join("\n"))
}

/// `program --defaults-extra-file=… ARGS`, killed if its handle is dropped.
pub fn command(program: &str, defaults: &DefaultsFile, args: &[String]) -> Command {
    let mut command = Command::new(program);
    command
        .arg(defaults.argument())
        .args(args)
        // The password comes from the option file only.
        .env_remove("MYSQL_PWD")
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Reads a child's stderr to the end (so it never blocks on a full pipe), keeping the
/// first [`STDERR_LIMIT`] bytes.
pub fn capture_stderr(stderr: ChildStderr) -> JoinHandle<String> {
    tokio::spawn(async move {
        let mut stderr = stderr;
        let mut kept = Vec::new();
        let mut buffer = [0u8; 1024];
        loop {
            match stderr.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = STDERR_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buffer[..n.min(room)]);
                }
            }
        }
        String::from_utf8_lossy(&kept).trim().to_owned()
    })
}

/// The error for a child that failed: its stderr (bounded, the password masked should it
/// ever appear). Lost connections and unreachable servers are retryable.
pub fn child_failure(
    program: &str,
    status: std::process::ExitStatus,
    stderr: &str,
    master: &MasterCredentials,
) -> CloudError {
    let mut stderr = stderr.to_owned();
    let password = master.password.expose();
    if !password.is_empty() {
        stderr = stderr.replace(password, "***");
    }
    let transient = ["Can't connect", "Lost connection", "server has gone away"]
        .iter()
        .any(|s| stderr.contains(s));
    let kind = if transient {
        ErrorKind::Retryable
    } else {
        ErrorKind::Fatal
    };
    CloudError::new(kind, format!("{program} failed ({status}): {stderr}"))
}

/// Waits for `child` and its stderr; an error unless it exited 0.
pub async fn finish(
    program: &str,
    mut child: Child,
    stderr: JoinHandle<String>,
    master: &MasterCredentials,
) -> CloudResult<()> {
    let status = child
        .wait()
        .await
        .map_err(|e| CloudError::fatal(format!("waiting for {program}: {e}")))?;
    let stderr = stderr.await.unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(child_failure(program, status, &stderr, master))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::settings::Secret;

    fn master(tls: DbTls, ca: Option<&str>) -> MasterCredentials {
        MasterCredentials {
            host: "db.example.com".into(),
            port: 3306,
            username: "admin".into(),
            password: Secret::new("p#a\\ss;w'rd".to_owned()),
            tls,
            ca_file: ca.map(PathBuf::from),
        }
    }

    #[test]
    fn tls_options_follow_the_platform_and_the_flavour() {
        let verified = option_file(
            &master(DbTls::Verified, Some("/etc/rds.pem")),
            Flavour::MariaDb,
        )
        .unwrap();
        assert!(
            verified.contains("\nssl-verify-server-cert\n"),
            "{verified}"
        );
        assert!(
            verified.contains("\nssl-ca=\"/etc/rds.pem\"\n"),
            "{verified}"
        );
        assert!(!verified.contains("skip-ssl"));
        let mysql = option_file(&master(DbTls::Verified, None), Flavour::MySql).unwrap();
        assert!(mysql.contains("\nssl-mode=VERIFY_IDENTITY\n"), "{mysql}");
        assert!(mysql.contains("\nenable-cleartext-plugin\n"), "{mysql}");
        assert!(!verified.contains("cleartext"), "{verified}");
        assert!(!mysql.contains("ssl-ca"));
        let off = option_file(&master(DbTls::Disabled, Some("/x.pem")), Flavour::MariaDb).unwrap();
        assert!(
            off.contains("\nskip-ssl\n") && !off.contains("ssl-ca"),
            "{off}"
        );
        let off = option_file(&master(DbTls::Disabled, None), Flavour::MySql).unwrap();
        assert!(off.contains("\nssl-mode=DISABLED\n"), "{off}");
        assert!(off.starts_with("[client]\n"));
        assert!(off.contains("\npassword=\"p#a\\\\ss;w'rd\"\n"), "{off}");
    }

    #[test]
    fn a_password_the_file_cannot_hold_is_refused_without_showing_it() {
        let mut m = master(DbTls::Disabled, None);
        m.password = Secret::new("se\"cret".to_owned());
        let error = option_file(&m, Flavour::MariaDb).unwrap_err();
        assert!(!error.message.contains("se\"cret"), "{error}");
        assert!(error.message.contains("password"), "{error}");
    }

    #[test]
    fn the_option_file_is_private_and_removed_when_dropped() {
        use std::os::unix::fs::PermissionsExt as _;
        let directory = std::env::temp_dir();
        let file =
            DefaultsFile::create_in(&directory, &master(DbTls::Disabled, None), Flavour::MariaDb)
                .unwrap();
        let path = file.path().to_owned();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(file.argument().starts_with("--defaults-extra-file=/"));
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn failures_mask_the_password_and_classify_connection_errors() {
        use std::os::unix::process::ExitStatusExt as _;
        let m = master(DbTls::Disabled, None);
        let error = child_failure(
            "mariadb",
            std::process::ExitStatus::from_raw(2 << 8),
            "ERROR 2002 (HY000): Can't connect to server using p#a\\ss;w'rd",
            &m,
        );
        assert_eq!(error.kind, ErrorKind::Retryable);
        assert!(!error.message.contains("p#a\\ss;w'rd"), "{error}");
        let error = child_failure(
            "mariadb",
            std::process::ExitStatus::from_raw(1 << 8),
            "ERROR 1007 (HY000) at line 1: Can't create database 'x'; database exists",
            &m,
        );
        assert_eq!(error.kind, ErrorKind::Fatal);
    }
}
