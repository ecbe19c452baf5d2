//! Secrets stay secret: the real binary provisions, checks and deletes an instance with every
//! log at debug level, and neither the tenant's generated database password (read back with
//! the Secrets Manager SDK) nor the environment's master password shows anywhere a person or
//! a tool could see it — the process's stdout and stderr, the API's responses, operation
//! events, error messages (a failing database login among them) and `/metrics`.

mod common;
mod platform;

use instance_manager::cloud::accounts::Accounts;
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::{Environment, TenantId};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use mysql_async::prelude::Queryable;
use platform::{Client, metadata, serve_process, write_config};

/// A MariaDB master user of this test's own, with a password (the shared server's root has
/// none, which could not be looked for); dropped when the test ends, passed or failed.
struct MasterUser {
    name: String,
}

impl Drop for MasterUser {
    fn drop(&mut self) {
        let name = self.name.clone();
        common::run_on_own_thread(move || async move {
            let mut root = platform::sql::master_conn().await;
            let _ = root
                .query_drop(format!("DROP USER IF EXISTS `{name}`@'%'"))
                .await;
            let _ = root.disconnect().await;
        });
    }
}

#[tokio::test]
async fn a_debug_level_provisioning_never_shows_a_password() {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;

    // The environment's master secret names a master user with a real password.
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let master = MasterUser {
        name: format!("imt_master_{}", &hex[..8]),
    };
    let master_password = format!("MasterPw{}", &hex[8..]);
    let mut root = platform::sql::master_conn().await;
    root.query_drop(format!(
        "CREATE USER `{}`@'%' IDENTIFIED BY '{master_password}'",
        master.name
    ))
    .await
    .unwrap();
    root.query_drop(format!(
        "GRANT ALL PRIVILEGES ON *.* TO `{}`@'%' WITH GRANT OPTION",
        master.name
    ))
    .await
    .unwrap();
    let accounts = Accounts::with_control_plane(&common::test_sdk_config().await, &config).await;
    let secrets = aws_sdk_secretsmanager::Client::new(
        &accounts
            .sdk_config(Environment::Dev)
            .expect("DEV's account"),
    );
    let master_arn = config.environments[0].platform.master_secret_arn.clone();
    let stored = secrets
        .get_secret_value()
        .secret_id(&master_arn)
        .send()
        .await
        .unwrap();
    let mut value: serde_json::Value =
        serde_json::from_str(stored.secret_string().unwrap()).unwrap();
    value["username"] = master.name.clone().into();
    value["password"] = master_password.clone().into();
    secrets
        .put_secret_value()
        .secret_id(&master_arn)
        .secret_string(value.to_string())
        .send()
        .await
        .unwrap();

    config.log_filter = "debug".into();
    config.metrics_listen = Some(common::ANY_PORT.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&config, dir.path(), 30);
    let (mut server, addr) = serve_process(&path, "");
    let metrics = server.wait_logged_address("serving metrics");
    let mut client = Client::connect(&addr).await;

    // Everything the API shows, kept as text: (what, text).
    let mut shown: Vec<(String, String)> = Vec::new();
    let tenant = platform::tenant("leak");
    let created = client.create(&tenant, v1::Environment::Dev).await;
    shown.push(("CreateInstance".into(), format!("{created:?}")));
    let (events, done) = client.watch(&created.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Completed,
        "{events:#?}"
    );
    shown.push(("create events".into(), format!("{events:?}")));
    shown.push(("create operation".into(), format!("{done:?}")));
    shown.push((
        "GetInstance".into(),
        format!("{:?}", client.instance(&tenant).await),
    ));
    let name = format!("tenants/{tenant}/instances/wp");
    let health = |client: &mut Client| {
        let mut instances = client.instances.clone();
        let name = name.clone();
        async move {
            instances
                .check_instance_health(v1::CheckInstanceHealthRequest { name })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let healthy = health(&mut client).await;
    let database = healthy
        .checks
        .iter()
        .find(|c| c.name == "database")
        .expect("a database check");
    assert_eq!(
        database.status(),
        v1::HealthStatus::Healthy,
        "the tenant's login works: {healthy:#?}"
    );
    shown.push(("CheckInstanceHealth".into(), format!("{healthy:?}")));

    // The tenant's password, as Secrets Manager holds it.
    let names = ResourceNames::derive(&TenantId::parse(&tenant).unwrap(), Environment::Dev);
    let tenant_secret = secrets
        .get_secret_value()
        .secret_id(&names.secret)
        .send()
        .await
        .unwrap();
    let tenant_value: serde_json::Value =
        serde_json::from_str(tenant_secret.secret_string().unwrap()).unwrap();
    let tenant_password = tenant_value["password"].as_str().unwrap().to_owned();
    assert_eq!(tenant_password.len(), 32, "a generated password");
    assert_eq!(tenant_value["username"], names.database_user.as_str());

    // An error while the password is in play: the login fails once the server's password
    // no longer matches the secret.
    root.query_drop(format!(
        "ALTER USER `{}`@'%' IDENTIFIED BY 'Changed-{}'",
        names.database_user,
        &hex[..12]
    ))
    .await
    .unwrap();
    let failing = health(&mut client).await;
    let database = failing
        .checks
        .iter()
        .find(|c| c.name == "database")
        .expect("a database check");
    assert_eq!(
        database.status(),
        v1::HealthStatus::Unhealthy,
        "{failing:#?}"
    );
    assert!(database.reason.contains("1045"), "{}", database.reason);
    shown.push(("failing CheckInstanceHealth".into(), format!("{failing:?}")));

    // Deleting reads the master secret again.
    let deleted = client.delete_skipping_archive(&tenant).await;
    let (events, done) = client.watch(&deleted).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Completed,
        "{events:#?}"
    );
    shown.push(("delete events".into(), format!("{events:?}")));
    shown.push(("delete operation".into(), format!("{done:?}")));
    let operations = client
        .operations
        .list_operations(lro::ListOperationsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(operations.operations.len() >= 2, "{operations:?}");
    shown.push(("ListOperations".into(), format!("{operations:?}")));
    shown.push(("/metrics".into(), common::scrape_metrics(metrics).await.1));

    server.terminate();
    let stderr = server.stderr();
    assert!(
        stderr.contains("DEBUG") && stderr.contains(&tenant),
        "the logs are at debug level and cover the provisioning:\n{stderr}"
    );
    shown.push(("stdout".into(), server.stdout()));
    shown.push(("stderr".into(), stderr));

    for (what, text) in &shown {
        for (secret, label) in [
            (&tenant_password, "the tenant's password"),
            (&master_password, "the master password"),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "{label} shows in {what}:\n{text}"
            );
        }
    }
    let _ = root.disconnect().await;
}
