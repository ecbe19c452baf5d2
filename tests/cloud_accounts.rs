//! Account resolution and the emulated platform, against moto.
//!
//! moto lets any role be assumed (it enforces neither trust policies nor ExternalId) and
//! keeps each account's resources apart, so every test uses accounts of its own (random
//! ids): tests share one moto and still never see each other's resources.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use instance_manager::cloud::accounts::Accounts;
use instance_manager::cloud::platform::ensure_platform;
use instance_manager::cloud::{DbTls, ErrorKind, MasterCredentials, Platform, SecretSpec};
use instance_manager::config::{Config, EnvironmentConfig, Secret};
use instance_manager::domain::Environment;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn random_account() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let n = u64::from_str_radix(&hex[..12], 16).unwrap();
    format!("{:012}", 100_000_000_000 + n % 900_000_000_000)
}

fn environment(name: Environment, account: &str) -> EnvironmentConfig {
    EnvironmentConfig {
        name,
        account_id: account.to_owned(),
        region: common::TEST_REGION.to_owned(),
        role_arn: format!("arn:aws:iam::{account}:role/instance-manager"),
        external_id: Secret::default(),
        endpoint: None,
        platform: Platform::default(),
        scale_bounds: None,
    }
}

fn config(environments: Vec<EnvironmentConfig>) -> Config {
    let config = Config {
        aws_endpoint: Some(common::aws_endpoint()),
        replica_id: "replica-7".into(),
        environments,
        ..Config::default()
    };
    config.validate().unwrap();
    config
}

async fn accounts(config: &Config) -> Accounts {
    Accounts::with_control_plane(&common::test_sdk_config().await, config).await
}

/// (account, caller ARN) of the credentials behind `sdk`.
async fn caller(sdk: &aws_config::SdkConfig) -> (String, String) {
    let identity = aws_sdk_sts::Client::new(sdk)
        .get_caller_identity()
        .send()
        .await
        .unwrap();
    (
        identity.account().unwrap().to_owned(),
        identity.arn().unwrap().to_owned(),
    )
}

fn secret_spec(name: &str) -> SecretSpec {
    SecretSpec {
        name: name.to_owned(),
        description: "test".into(),
        value: Secret::new("value"),
        tags: vec![("bbws:component".into(), "test".into())],
    }
}

#[tokio::test]
async fn each_environment_uses_its_own_account() {
    let (dev_account, sit_account) = (random_account(), random_account());
    let config = config(vec![
        environment(Environment::Dev, &dev_account),
        environment(Environment::Sit, &sit_account),
    ]);
    let accounts = accounts(&config).await;
    let outcomes = accounts.verify().await;
    assert_eq!(
        outcomes,
        vec![(Environment::Dev, Ok(())), (Environment::Sit, Ok(()))]
    );
    assert_eq!(accounts.served(), vec![Environment::Dev, Environment::Sit]);

    for (env, account) in [
        (Environment::Dev, &dev_account),
        (Environment::Sit, &sit_account),
    ] {
        let (actual, arn) = caller(&accounts.sdk_config(env).unwrap()).await;
        assert_eq!(&actual, account);
        assert_eq!(
            arn,
            format!(
                "arn:aws:sts::{account}:assumed-role/instance-manager/instance-manager-replica-7"
            )
        );
        let cloud = accounts.env(env).await.unwrap();
        assert_eq!((&cloud.account_id, cloud.environment), (account, env));
    }

    // A resource made through DEV's adapter exists in DEV's account only.
    let dev = accounts.env(Environment::Dev).await.unwrap();
    let sit = accounts.env(Environment::Sit).await.unwrap();
    let name = common::unique_name("bbws/dev/tenants/isolation");
    let (arn, _) = dev
        .secrets
        .ensure_secret(&secret_spec(&name))
        .await
        .unwrap();
    assert!(arn.contains(&format!(":{dev_account}:")), "{arn}");
    assert_eq!(
        dev.secrets.read_secret(&name).await.unwrap().expose(),
        "value"
    );
    let unseen = sit.secrets.read_secret(&name).await.unwrap_err();
    assert_eq!(unseen.kind, ErrorKind::NotFound, "{unseen}");

    let error = accounts.env(Environment::Prod).await.err().unwrap();
    assert_eq!(error.kind, ErrorKind::Fatal);
    assert!(
        error.message.contains("PROD") && error.message.contains("not configured"),
        "{error}"
    );
}

#[tokio::test]
async fn a_wrong_account_takes_only_that_environment_out() {
    let (dev_account, sit_account) = (random_account(), random_account());
    let mut sit = environment(Environment::Sit, &sit_account);
    // The role lives in another account than the one the configuration expects.
    sit.role_arn = format!("arn:aws:iam::{}:role/instance-manager", random_account());
    let accounts = accounts(&config(vec![
        environment(Environment::Dev, &dev_account),
        sit,
    ]))
    .await;

    let outcomes = accounts.verify().await;
    assert_eq!(outcomes[0], (Environment::Dev, Ok(())));
    let (env, outcome) = &outcomes[1];
    assert_eq!(*env, Environment::Sit);
    let reason = outcome.clone().unwrap_err();
    assert!(
        reason.contains("SIT") && reason.contains(&sit_account),
        "{reason}"
    );

    assert_eq!(accounts.served(), vec![Environment::Dev]);
    let error = accounts.env(Environment::Sit).await.err().unwrap();
    assert_eq!(error.kind, ErrorKind::Fatal);
    assert!(
        error.message.contains("SIT") && error.message.contains("not available"),
        "{error}"
    );
    assert!(
        accounts
            .for_operation(Environment::Sit, "op-1")
            .await
            .is_err()
    );
    let dev = accounts.env(Environment::Dev).await.unwrap();
    dev.secrets
        .ensure_secret(&secret_spec(&common::unique_name("still-works")))
        .await
        .unwrap();
}

#[tokio::test]
async fn operations_get_a_role_session_of_their_own() {
    let account = random_account();
    let accounts = accounts(&config(vec![environment(Environment::Dev, &account)])).await;

    let sdk = accounts
        .operation_sdk_config(Environment::Dev, "0f3c9a2e-op")
        .await
        .unwrap();
    let (actual, arn) = caller(&sdk).await;
    assert_eq!(actual, account);
    assert!(
        arn.ends_with(":assumed-role/instance-manager/im-op-0f3c9a2e-op"),
        "{arn}"
    );

    // STS caps session names at 64 characters.
    let long_id = "x".repeat(100);
    let sdk = accounts
        .operation_sdk_config(Environment::Dev, &long_id)
        .await
        .unwrap();
    let (_, arn) = caller(&sdk).await;
    let session = arn.rsplit('/').next().unwrap();
    assert_eq!(session.len(), 64, "{arn}");
    assert!(session.starts_with("im-op-xxx"));

    // The operation's adapters work in the same account as the environment's.
    let op = accounts
        .for_operation(Environment::Dev, "0f3c9a2e-op")
        .await
        .unwrap();
    let name = common::unique_name("made-by-op");
    op.secrets.ensure_secret(&secret_spec(&name)).await.unwrap();
    let shared = accounts.env(Environment::Dev).await.unwrap();
    assert_eq!(
        shared.secrets.read_secret(&name).await.unwrap().expose(),
        "value"
    );
}

/// A TCP relay to moto that keeps every byte sent to it: moto ignores ExternalId, so the
/// only way to see that it is sent is to look at the request.
async fn recording_proxy(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let target = target.trim_start_matches("http://").to_owned();
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let (mut up_read, mut up_write) = upstream.into_split();
                let (mut client_read, mut client_write) = client.split();
                let forward = async {
                    let mut buffer = vec![0u8; 16 * 1024];
                    loop {
                        let n = match client_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        recorded.lock().unwrap().extend_from_slice(&buffer[..n]);
                        if up_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = up_write.shutdown().await;
                };
                let backward = tokio::io::copy(&mut up_read, &mut client_write);
                let _ = tokio::join!(forward, backward);
            });
        }
    });
    (format!("http://{address}"), seen)
}

#[tokio::test]
async fn the_external_id_is_sent_with_assume_role() {
    let (endpoint, seen) = recording_proxy(common::aws_endpoint()).await;
    let account = random_account();
    let mut dev = environment(Environment::Dev, &account);
    dev.external_id = Secret::new("ext-id-4711");
    dev.endpoint = Some(endpoint);
    let accounts = accounts(&config(vec![dev])).await;
    assert_eq!(accounts.verify().await, vec![(Environment::Dev, Ok(()))]);
    let requests = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(requests.contains("Action=AssumeRole"), "{requests}");
    assert!(requests.contains("ExternalId=ext-id-4711"), "{requests}");
    assert!(
        requests.contains("RoleSessionName=instance-manager-replica-7"),
        "{requests}"
    );
}

fn mariadb() -> MasterCredentials {
    let opts = mysql_async::Opts::from_url(&common::mysql_url()).unwrap();
    MasterCredentials {
        host: opts.ip_or_hostname().to_owned(),
        port: opts.tcp_port(),
        username: opts.user().unwrap_or("root").to_owned(),
        password: Secret::new(opts.pass().unwrap_or_default()),
        tls: DbTls::Disabled,
        ca_file: None,
    }
}

#[tokio::test]
async fn the_platform_is_created_once_and_adopted_after() {
    let account = random_account();
    let accounts = accounts(&config(vec![environment(Environment::Dev, &account)])).await;
    let sdk = accounts.sdk_config(Environment::Dev).unwrap();
    let db = mariadb();

    let first = ensure_platform(&sdk, Environment::Dev, &db, "dev.sites.test")
        .await
        .unwrap();
    let second = ensure_platform(&sdk, Environment::Dev, &db, "dev.sites.test")
        .await
        .unwrap();
    assert_eq!(first, second, "the second run adopts everything");

    let p = &first;
    assert_eq!(p.cluster, "bbws-dev");
    assert_eq!(p.subnets.len(), 2);
    assert_eq!(p.security_groups.len(), 1);
    assert_eq!((p.db_host.as_str(), p.db_port), (db.host.as_str(), db.port));
    assert_eq!(p.domain, "dev.sites.test");
    assert_eq!(p.log_group, "/bbws/dev/wordpress");
    assert_eq!(p.archive_bucket, format!("bbws-dev-archive-{account}"));
    assert_eq!(
        p.execution_role_arn,
        format!("arn:aws:iam::{account}:role/bbws-dev-task-execution")
    );
    assert!(p.cognito_enabled, "cognito is on in DEV");
    assert_eq!(p.min_healthy_targets, Some(0));
    assert!(p.emulator);

    // Nothing was made twice.
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let filter = |name: &str, value: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(name)
            .values(value)
            .build()
    };
    let vpcs = ec2
        .describe_vpcs()
        .filters(filter("tag:bbws:platform", "DEV"))
        .send()
        .await
        .unwrap();
    assert_eq!(vpcs.vpcs().len(), 1);
    assert_eq!(vpcs.vpcs()[0].vpc_id(), Some(p.vpc_id.as_str()));
    assert!(vpcs.vpcs()[0].cidr_block().unwrap().starts_with("10."));
    let dns = ec2
        .describe_vpc_attribute()
        .vpc_id(&p.vpc_id)
        .attribute(aws_sdk_ec2::types::VpcAttributeName::EnableDnsHostnames)
        .send()
        .await
        .unwrap();
    assert_eq!(
        dns.enable_dns_hostnames().and_then(|v| v.value()),
        Some(true)
    );
    let subnets = ec2
        .describe_subnets()
        .filters(filter("vpc-id", &p.vpc_id))
        .send()
        .await
        .unwrap();
    assert_eq!(subnets.subnets().len(), 2);
    let zones: std::collections::HashSet<_> = subnets
        .subnets()
        .iter()
        .map(|s| s.availability_zone().unwrap().to_owned())
        .collect();
    assert_eq!(zones.len(), 2, "two availability zones");

    let efs = aws_sdk_efs::Client::new(&sdk);
    let file_systems = efs.describe_file_systems().send().await.unwrap();
    assert_eq!(file_systems.file_systems().len(), 1);
    let mounts = efs
        .describe_mount_targets()
        .file_system_id(&p.file_system_id)
        .send()
        .await
        .unwrap();
    assert_eq!(mounts.mount_targets().len(), 2);

    // The listener: HTTPS on 443, a certificate, and 404 for hosts no tenant rule matches.
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let listener = elb
        .describe_listeners()
        .listener_arns(&p.listener_arn)
        .send()
        .await
        .unwrap();
    let listener = &listener.listeners()[0];
    assert_eq!(listener.port(), Some(443));
    assert_eq!(
        listener.protocol(),
        Some(&aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Https)
    );
    assert_eq!(listener.certificates().len(), 1);
    let action = &listener.default_actions()[0];
    assert_eq!(
        action.fixed_response_config().and_then(|f| f.status_code()),
        Some("404")
    );
    let all = elb
        .describe_listeners()
        .load_balancer_arn(listener.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(all.listeners().len(), 1);
    let certificates = aws_sdk_acm::Client::new(&sdk)
        .list_certificates()
        .certificate_statuses(aws_sdk_acm::types::CertificateStatus::PendingValidation)
        .certificate_statuses(aws_sdk_acm::types::CertificateStatus::Issued)
        .send()
        .await
        .unwrap();
    assert_eq!(certificates.certificate_summary_list().len(), 1);

    // The master secret points at the real MariaDB.
    let value = aws_sdk_secretsmanager::Client::new(&sdk)
        .get_secret_value()
        .secret_id(&p.master_secret_arn)
        .send()
        .await
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(value.secret_string().unwrap()).unwrap();
    assert_eq!(value["host"], db.host.as_str());
    assert_eq!(value["port"], db.port);
    assert_eq!(value["username"], db.username.as_str());
    assert_eq!(value["password"], db.password.expose());
    let versions = aws_sdk_secretsmanager::Client::new(&sdk)
        .list_secret_version_ids()
        .secret_id(&p.master_secret_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(
        versions.versions().len(),
        1,
        "an unchanged secret is not rewritten"
    );

    // The RDS record exists (its endpoint is fake; the platform keeps the real one).
    let rds = aws_sdk_rds::Client::new(&sdk)
        .describe_db_instances()
        .db_instance_identifier("bbws-dev")
        .send()
        .await
        .unwrap();
    assert_eq!(rds.db_instances().len(), 1);
    aws_sdk_ecs::Client::new(&sdk)
        .describe_clusters()
        .clusters("bbws-dev")
        .send()
        .await
        .unwrap()
        .clusters()
        .iter()
        .find(|c| c.status() == Some("ACTIVE"))
        .expect("the cluster is active");
}

#[tokio::test]
async fn the_bootstrap_command_writes_a_config_that_serve_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let (dev_account, sit_account) = (random_account(), random_account());
    let table = common::unique_name("bootstrap");
    let input = dir.path().join("input.toml");
    std::fs::write(
        &input,
        format!(
            r#"table = "{table}"
aws_endpoint = "{endpoint}"

[[environments]]
name = "DEV"
account_id = "{dev_account}"
region = "us-east-1"
role_arn = "arn:aws:iam::{dev_account}:role/instance-manager"

[environments.platform]
domain = "dev.sites.localhost"

[[environments]]
name = "SIT"
account_id = "{sit_account}"
region = "us-east-1"
role_arn = "arn:aws:iam::{sit_account}:role/instance-manager"
"#,
            endpoint = common::aws_endpoint()
        ),
    )
    .unwrap();
    let db = mariadb();
    let port = db.port.to_string();
    let bootstrap = |output: &std::path::Path| {
        common::ServerProcess::run(
            [
                "bootstrap",
                "--config",
                input.to_str().unwrap(),
                "--emulate-platform",
                "--mysql-host",
                &db.host,
                "--mysql-port",
                &port,
                "--mysql-user",
                &db.username,
                "--write-config",
                output.to_str().unwrap(),
            ],
            &[("IM_MYSQL_PASSWORD", db.password.expose())],
            Duration::from_secs(120),
        )
    };
    let written = dir.path().join("out").join("dev.toml");
    bootstrap(&written).assert_success();
    let config: Config = toml::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
    config.validate().unwrap();
    assert_eq!(config.table, table);
    let [dev, sit] = &config.environments[..] else {
        panic!("two environments: {config:?}");
    };
    assert_eq!(dev.platform.domain, "dev.sites.localhost");
    assert_eq!(sit.platform.domain, "sit.sites.localhost", "default domain");
    assert!(dev.platform.cognito_enabled && !sit.platform.cognito_enabled);
    assert!(dev.platform.listener_arn.contains(&dev_account));
    assert!(sit.platform.listener_arn.contains(&sit_account));
    assert_ne!(dev.platform.vpc_id, "");

    // Again from the same input: the same platforms.
    let again = dir.path().join("again.toml");
    bootstrap(&again).assert_success();
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        std::fs::read_to_string(&again).unwrap()
    );

    let dumped = common::ServerProcess::run(
        [
            "serve",
            "--config",
            written.to_str().unwrap(),
            "--dump-config",
        ],
        &[],
        Duration::from_secs(30),
    );
    dumped.assert_success();
    assert!(
        dumped.stdout.contains(&dev.platform.vpc_id),
        "{}",
        dumped.stdout
    );

    // Without an emulator endpoint no stand-in infrastructure is made, and nothing at all
    // is attempted (not even the table).
    let real = dir.path().join("real.toml");
    std::fs::write(
        &real,
        format!(
            "table = \"{table}\"\n[[environments]]\nname = \"DEV\"\naccount_id = \"{dev_account}\"\nregion = \"us-east-1\"\n"
        ),
    )
    .unwrap();
    let refused = common::ServerProcess::run(
        [
            "bootstrap",
            "--config",
            real.to_str().unwrap(),
            "--emulate-platform",
        ],
        &[],
        Duration::from_secs(30),
    );
    assert!(!refused.status.success());
    assert!(refused.stderr.contains("emulator"), "{}", refused.stderr);
}

#[tokio::test]
async fn role_sessions_are_cached_and_assumed_again_before_they_expire() {
    use aws_credential_types::provider::ProvideCredentials;
    use instance_manager::cloud::accounts::{SessionSettings, role_credentials};
    use std::time::SystemTime;

    let account = random_account();
    let env = environment(Environment::Dev, &account);
    let base = common::test_sdk_config().await;
    let session = SessionSettings {
        length: Duration::from_secs(900),
        refresh_margin: Duration::from_secs(300),
    };
    let now = Arc::new(Mutex::new(SystemTime::now()));
    let clock = now.clone();
    let credentials = role_credentials(&base, &env, "refresh-test", session)
        .await
        .with_clock(Arc::new(move || *clock.lock().unwrap()));

    let first = credentials.provide_credentials().await.unwrap();
    let expiry = first.expiry().expect("an assumed role session expires");
    let length = expiry.duration_since(*now.lock().unwrap()).unwrap();
    assert!(
        length > Duration::from_secs(850) && length <= Duration::from_secs(905),
        "STS was asked for a 900 s session and gave {length:?}"
    );
    // Cached: every request in the session's lifetime reuses it…
    let start = *now.lock().unwrap();
    for at in [start, expiry - Duration::from_secs(301)] {
        *now.lock().unwrap() = at;
        let again = credentials.provide_credentials().await.unwrap();
        assert_eq!(again.access_key_id(), first.access_key_id());
    }
    // …until it is within the margin of its expiry: then the role is assumed again.
    *now.lock().unwrap() = expiry - Duration::from_secs(299);
    let second = credentials.provide_credentials().await.unwrap();
    assert_ne!(second.access_key_id(), first.access_key_id());
    assert!(second.expiry().unwrap() > expiry);
    // The new session is a real one of the environment's account.
    let sdk = aws_config::SdkConfig::builder()
        .region(aws_config::Region::new(common::TEST_REGION))
        .endpoint_url(common::aws_endpoint())
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(second),
        )
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let (actual, arn) = caller(&sdk).await;
    assert_eq!(actual, account);
    assert!(arn.ends_with("/refresh-test"), "{arn}");
}

/// A TCP relay to moto that drops every connection while `up` is false (an environment
/// whose endpoint cannot be reached), and relays once it is true.
async fn switchable_relay(target: String) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let target = target.trim_start_matches("http://").to_owned();
    let up = Arc::new(AtomicBool::new(false));
    let switch = up.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if !switch.load(Ordering::SeqCst) {
                drop(client);
                continue;
            }
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (format!("http://{address}"), up)
}

#[tokio::test]
async fn an_environment_unreachable_at_start_up_is_served_once_it_verifies() {
    let (relay, up) = switchable_relay(common::aws_endpoint()).await;
    let mut sit = environment(Environment::Sit, &random_account());
    sit.endpoint = Some(relay);
    let accounts = Arc::new(accounts(&config(vec![sit])).await);
    let outcomes = accounts.verify().await;
    assert!(outcomes[0].1.is_err(), "{outcomes:?}");
    let served = Arc::new(std::sync::RwLock::new(accounts.served()));
    assert!(served.read().unwrap().is_empty());

    let stop = tokio_util::sync::CancellationToken::new();
    let recheck = tokio::spawn(instance_manager::server::recheck_environments(
        accounts.clone(),
        served.clone(),
        Duration::from_millis(100),
        stop.clone(),
    ));
    // The endpoint comes back: the next re-check serves the environment again.
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let back = tokio::time::timeout(Duration::from_secs(60), async {
        while !served.read().unwrap().contains(&Environment::Sit) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(back.is_ok(), "SIT was not served again");
    assert_eq!(accounts.served(), vec![Environment::Sit]);
    accounts.env(Environment::Sit).await.unwrap();
    stop.cancel();
    recheck.await.unwrap();
}
