//! Tests clean up what they create in shared services, also when they fail.

mod common;
mod platform;

use instance_manager::cloud::Database;
use instance_manager::cloud::mysql::MySqlDatabase;
use instance_manager::config::Secret;
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::{Environment, TenantId};

#[test]
fn a_failed_test_s_tenant_databases_are_dropped() {
    // A "test" on its own thread: it provisions a tenant database, then fails.
    let created = std::thread::spawn(|| {
        let tenant = platform::tenant("hygiene");
        assert!(tenant.starts_with(platform::TEST_TENANT_PREFIX));
        let names = ResourceNames::derive(&TenantId::parse(&tenant).unwrap(), Environment::Sit);
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            MySqlDatabase::new()
                .ensure_database(
                    &platform::mariadb(),
                    &names.database,
                    &names.database_user,
                    &Secret::new("hygiene-Pa55word"),
                )
                .await
                .unwrap();
        });
        std::panic::panic_any(names);
    })
    .join()
    .expect_err("the test thread fails");
    let names = created.downcast::<ResourceNames>().unwrap();
    assert!(
        names.database.starts_with("tenant_imt_"),
        "{}",
        names.database
    );
    let mysql = MySqlDatabase::new();
    let master = platform::mariadb();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        assert!(
            !mysql
                .database_exists(&master, &names.database)
                .await
                .unwrap()
        );
        assert!(
            !mysql
                .user_exists(&master, &names.database_user)
                .await
                .unwrap()
        );
    });
}
