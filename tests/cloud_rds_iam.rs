//! RDS IAM database authentication for the control plane's own MySQL login. The local
//! MariaDB cannot verify AWS tokens, so the token is checked itself: its host, port, user,
//! region, expiry and credential scope, and its SigV4 signature recomputed here from the
//! secret key (an independent implementation of the presigning algorithm). The endpoint
//! comes from moto's RDS DB instance (DescribeDBInstances), through the environment's
//! assumed role. (The fallback, the stored master secret, is what every workflow test uses
//! against MariaDB.)

mod common;

use std::collections::BTreeMap;

use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use hmac::{Hmac, KeyInit, Mac};
use instance_manager::cloud::accounts::Accounts;
use instance_manager::cloud::aws::AwsDbInstances;
use instance_manager::cloud::{DbInstances, DbTls, EnvironmentConfig, Platform};
use instance_manager::config::{Config, Secret};
use instance_manager::domain::Environment;
use sha2::{Digest, Sha256};

const ACCESS_KEY: &str = "AKIDEXAMPLE";
const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(u8::from_str_radix(&value[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// SigV4's URI encoding: everything but unreserved characters percent-encoded.
fn aws_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A token split into its authority (`host:port`) and query parameters (decoded).
fn parse(token: &str) -> (String, BTreeMap<String, String>) {
    assert!(!token.starts_with("http"), "a token has no scheme: {token}");
    let (authority, rest) = token.split_once('/').unwrap();
    let query = rest.strip_prefix('?').unwrap();
    let params = query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (authority.to_owned(), params)
}

/// The signature SigV4 query-string presigning gives `GET https://{authority}/?{params}`.
fn expected_signature(authority: &str, params: &BTreeMap<String, String>, secret: &str) -> String {
    let canonical_query = params
        .iter()
        .filter(|(k, _)| k.as_str() != "X-Amz-Signature")
        .map(|(k, v)| format!("{}={}", aws_encode(k), aws_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let empty_hash = hex::encode(Sha256::digest(b""));
    let canonical_request =
        format!("GET\n/\n{canonical_query}\nhost:{authority}\n\nhost\n{empty_hash}");
    let date = &params["X-Amz-Date"];
    let scope = params["X-Amz-Credential"]
        .split_once('/')
        .unwrap()
        .1
        .to_owned();
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let parts: Vec<&str> = scope.split('/').collect();
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), parts[0]);
    for part in &parts[1..] {
        key = hmac(&key, part);
    }
    hex::encode(hmac(&key, &string_to_sign))
}

#[tokio::test]
async fn the_token_is_a_presigned_rds_db_connect_for_host_port_user_and_region() {
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("eu-west-1"))
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .load()
        .await;
    let signer = AwsDbInstances::new(&sdk);
    let host = "bbws-prod.abc123xyz.eu-west-1.rds.amazonaws.com";
    let before = std::time::SystemTime::now();
    let token = signer
        .auth_token(host, 3306, "instance_manager")
        .await
        .unwrap();
    let (authority, params) = parse(token.expose());
    assert_eq!(authority, format!("{host}:3306"));
    assert_eq!(params["Action"], "connect");
    assert_eq!(params["DBUser"], "instance_manager");
    assert_eq!(params["X-Amz-Algorithm"], "AWS4-HMAC-SHA256");
    assert_eq!(params["X-Amz-Expires"], "900", "15 minutes");
    assert_eq!(params["X-Amz-SignedHeaders"], "host");
    let date = &params["X-Amz-Date"];
    let day = &date[..8];
    assert_eq!(
        params["X-Amz-Credential"],
        format!("{ACCESS_KEY}/{day}/eu-west-1/rds-db/aws4_request")
    );
    // Signed now (not some cached time).
    let signed_at = {
        let secs = |from: usize, len: usize| date[from..from + len].parse::<u64>().unwrap();
        let (y, mo, d) = (secs(0, 4), secs(4, 2), secs(6, 2));
        // Days since the epoch (civil calendar), then the time of day.
        let (y2, m2) = if mo <= 2 {
            (y - 1, mo + 9)
        } else {
            (y, mo - 3)
        };
        let era_days = 365 * y2 + y2 / 4 - y2 / 100 + y2 / 400 + (153 * m2 + 2) / 5 + d - 1;
        let days = era_days - 719_468;
        days * 86_400 + secs(9, 2) * 3600 + secs(11, 2) * 60 + secs(13, 2)
    };
    let now = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(signed_at + 5 >= now && signed_at <= now + 60, "{date}");
    assert_eq!(
        params["X-Amz-Signature"],
        expected_signature(&authority, &params, SECRET_KEY),
        "{}",
        token.expose()
    );
    // The wrong key gives another signature: the comparison is not vacuous.
    assert_ne!(
        params["X-Amz-Signature"],
        expected_signature(&authority, &params, "another-secret")
    );
    assert_eq!(format!("{token:?}"), "<redacted>");
}

#[tokio::test]
async fn the_login_is_resolved_from_the_rds_instance_and_signed_by_the_assumed_role() {
    let account = format!(
        "{:012}",
        uuid::Uuid::new_v4().as_u128() % 900_000_000_000 + 100_000_000_000
    );
    let identifier = "bbws-dev-iam";
    let config = Config {
        aws_endpoint: Some(common::aws_endpoint()),
        table: common::unique_name("iam"),
        environments: vec![EnvironmentConfig {
            name: Environment::Dev,
            account_id: account.clone(),
            region: common::TEST_REGION.to_owned(),
            role_arn: format!("arn:aws:iam::{account}:role/instance-manager"),
            external_id: Secret::default(),
            endpoint: None,
            platform: Platform {
                db_iam_auth: true,
                db_iam_user: "instance_manager".into(),
                db_instance_identifier: identifier.into(),
                // Typed into configuration only to show that it is not used.
                db_host: "typed.example".into(),
                db_port: 1,
                db_ca_file: "/etc/ssl/rds/global-bundle.pem".into(),
                ..Platform::default()
            },
            scale_bounds: None,
        }],
        ..Config::default()
    };
    config.validate().unwrap();
    let accounts = Accounts::with_control_plane(&common::test_sdk_config().await, &config).await;
    let cloud = accounts.env(Environment::Dev).await.unwrap();

    // No DB instance yet: refused, naming it.
    let error = instance_manager::workflow::provision::iam_credentials(&cloud)
        .await
        .unwrap_err();
    assert!(error.message.contains(identifier), "{error}");

    let rds = aws_sdk_rds::Client::new(&accounts.sdk_config(Environment::Dev).unwrap());
    rds.create_db_instance()
        .db_instance_identifier(identifier)
        .engine("mysql")
        .db_instance_class("db.t3.micro")
        .allocated_storage(20)
        .master_username("admin")
        .manage_master_user_password(true)
        .enable_iam_database_authentication(true)
        .send()
        .await
        .unwrap();
    // What RDS says, read with the SDK in the environment's account.
    let described = rds
        .describe_db_instances()
        .db_instance_identifier(identifier)
        .send()
        .await
        .unwrap();
    let endpoint = described.db_instances()[0].endpoint().unwrap();
    let (address, port) = (
        endpoint.address().unwrap().to_owned(),
        u16::try_from(endpoint.port().unwrap()).unwrap(),
    );

    let login = instance_manager::workflow::provision::iam_credentials(&cloud)
        .await
        .unwrap();
    assert_eq!((login.host.as_str(), login.port), (address.as_str(), port));
    assert_ne!(login.host, "typed.example");
    assert_eq!(login.username, "instance_manager");
    assert_eq!(login.tls, DbTls::Verified, "a token only ever crosses TLS");
    assert_eq!(
        login.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/ssl/rds/global-bundle.pem"))
    );
    let (authority, params) = parse(login.password.expose());
    assert_eq!(authority, format!("{address}:{port}"));
    assert_eq!(params["DBUser"], "instance_manager");
    assert_eq!(params["X-Amz-Expires"], "900");
    let credential = &params["X-Amz-Credential"];
    assert!(
        credential.ends_with(&format!("/{}/rds-db/aws4_request", common::TEST_REGION)),
        "{credential}"
    );
    // Signed with the environment's role session (moto issues it a key and a session
    // token), not with the control plane's own key.
    assert!(!credential.starts_with("testing/"), "{credential}");
    assert!(params.contains_key("X-Amz-Security-Token"), "{params:?}");
}
