//! Authentication through a real server (in process, state in DynamoDB on moto): bearer
//! JWTs validated against a JWKS the test serves over HTTP (keys generated here), static
//! tokens, health left open, and the binary refusing to start with no authentication.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::auth::{AuthConfig, Authenticator, JwtConfig, Role, StaticTokenConfig};
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::server::ServeOptions;
use instance_manager::store::DynamoStore;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

const ISSUER: &str = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Test";
const CLIENT_ID: &str = "im-admin-portal";

/// A signing key generated for this run, and its public JWK under `kid`.
struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    public_pem: String,
    jwk: Jwk,
}

impl SigningKey {
    fn generate(kid: &str, algorithm: Algorithm) -> Self {
        let (pair, encoding) = match algorithm {
            Algorithm::RS256 => {
                let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
                let encoding = EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).unwrap();
                (pair, encoding)
            }
            Algorithm::ES256 => {
                let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                let encoding = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
                (pair, encoding)
            }
            other => panic!("no test keys for {other:?}"),
        };
        let mut jwk = Jwk::from_encoding_key(&encoding, algorithm).unwrap();
        jwk.common.key_id = Some(kid.into());
        Self {
            kid: kid.into(),
            algorithm,
            encoding,
            public_pem: pair.public_key_pem(),
            jwk,
        }
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn jwks_document(keys: &[&SigningKey]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.iter().map(|key| key.jwk.clone()).collect(),
    })
    .unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A Cognito access token's claims: `client_id`, no `aud`.
fn access_claims(groups: &[&str], tenant: Option<&str>) -> serde_json::Value {
    let mut claims = json!({
        "sub": "4f1c-user",
        "iss": ISSUER,
        "client_id": CLIENT_ID,
        "token_use": "access",
        "iat": now(),
        "exp": now() + 600,
        "cognito:groups": groups,
    });
    if let Some(tenant) = tenant {
        claims["custom:tenant"] = json!(tenant);
    }
    claims
}

/// A JWKS over HTTP: the document can be swapped, fetches are counted.
struct JwksServer {
    url: String,
    document: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve_jwks(document: String) -> JwksServer {
    let document = Arc::new(Mutex::new(document));
    let fetches = Arc::new(AtomicUsize::new(0));
    let router = axum::Router::new().route(
        "/eu-west-1_Test/.well-known/jwks.json",
        axum::routing::get({
            let document = document.clone();
            let fetches = fetches.clone();
            move || async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                let body = document.lock().unwrap().clone();
                ([(http::header::CONTENT_TYPE, "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    JwksServer {
        url: format!("http://{addr}/eu-west-1_Test/.well-known/jwks.json"),
        document,
        fetches,
        _stop: stop,
    }
}

struct TestServer {
    channel: Channel,
    shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(auth: AuthConfig) -> TestServer {
    let sdk = common::test_sdk_config().await;
    let store = DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        common::unique_name("auth"),
    );
    store.ensure_table().await.expect("create table");
    let api = Api::new(
        Arc::new(store),
        ApiSettings::default(),
        PageTokens::new(b"test-key"),
    );
    let options = ServeOptions {
        auth: Arc::new(Authenticator::from_config(&auth).expect("auth config")),
        ..ServeOptions::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            instance_manager::server::serve_with(
                api,
                listener,
                shutdown,
                Duration::from_secs(1),
                &options,
            )
            .await
            .unwrap();
        }
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    TestServer { channel, shutdown }
}

/// ListInstances (harmless) with `authorization: Bearer token`, or without credentials.
async fn list(server: &TestServer, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(v1::ListInstancesRequest {
        parent: "tenants/-".into(),
        page_size: 10,
        ..Default::default()
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    InstanceServiceClient::new(server.channel.clone())
        .list_instances(request)
        .await
        .map(|_| ())
}

async fn assert_refused(server: &TestServer, token: Option<&str>, what: &str) -> tonic::Status {
    let status = list(server, token)
        .await
        .expect_err(&format!("{what}: must be refused"));
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    status
}

/// Accepting Cognito access tokens (`token_use = "access"`, as for a pool whose
/// pre-token-generation trigger adds the tenant to them); the default, ID tokens only, is
/// checked in `cognito_access_tokens_are_refused_by_default`.
fn jwt_config(jwks_url: &str) -> AuthConfig {
    let mut jwt = JwtConfig::new(ISSUER, CLIENT_ID);
    jwt.jwks_url = Some(jwks_url.into());
    jwt.token_use = "access".into();
    AuthConfig {
        jwt: Some(jwt),
        ..AuthConfig::default()
    }
}

/// The health service answers SERVING or NOT_SERVING, without credentials.
async fn health_is_open(server: &TestServer) {
    let answer = tonic_health::pb::health_client::HealthClient::new(server.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(answer.is_ok(), "health needs no credentials: {answer:?}");
}

#[tokio::test]
async fn cognito_access_tokens_are_refused_by_default() {
    let rsa = SigningKey::generate("rsa-1", Algorithm::RS256);
    let jwks = serve_jwks(jwks_document(&[&rsa])).await;
    let mut jwt = JwtConfig::new(ISSUER, CLIENT_ID);
    jwt.jwks_url = Some(jwks.url.clone());
    let server = start(AuthConfig {
        jwt: Some(jwt),
        ..AuthConfig::default()
    })
    .await;
    // An access token has no custom attributes: a tenant user's would read as staff.
    let access = rsa.sign(&access_claims(&["admin"], None));
    let status = assert_refused(&server, Some(&access), "an access token").await;
    assert!(status.message().contains("token_use"), "{status:?}");
    let mut id_token = access_claims(&["viewer"], Some("acme"));
    id_token.as_object_mut().unwrap().remove("client_id");
    id_token["aud"] = json!(CLIENT_ID);
    id_token["token_use"] = json!("id");
    list(&server, Some(&rsa.sign(&id_token)))
        .await
        .expect("an ID token");
}

#[tokio::test]
async fn jwts_are_accepted_only_when_signature_issuer_audience_and_times_hold() {
    let rsa = SigningKey::generate("rsa-1", Algorithm::RS256);
    let ec = SigningKey::generate("ec-1", Algorithm::ES256);
    let jwks = serve_jwks(jwks_document(&[&rsa, &ec])).await;
    let server = start(jwt_config(&jwks.url)).await;

    // Valid: an RS256 Cognito access token (client_id), an ES256 ID token (aud).
    let access = rsa.sign(&access_claims(&["viewer", "operator"], Some("acme")));
    list(&server, Some(&access))
        .await
        .expect("a valid access token");
    let mut id_token = access_claims(&["admin"], None);
    id_token.as_object_mut().unwrap().remove("client_id");
    id_token["aud"] = json!(CLIENT_ID);
    list(&server, Some(&ec.sign(&id_token)))
        .await
        .expect("a valid ES256 token with aud");

    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = access_claims(&["admin"], None);
        change(&mut claims);
        claims
    };
    // Beyond the 30 s leeway either way.
    let expired = rsa.sign(&with(&|c| c["exp"] = json!(now() - 120)));
    let status = assert_refused(&server, Some(&expired), "expired").await;
    assert!(status.message().contains("expired"), "{status:?}");
    let early = rsa.sign(&with(&|c| c["nbf"] = json!(now() + 300)));
    let status = assert_refused(&server, Some(&early), "not yet valid").await;
    assert!(status.message().contains("not yet valid"), "{status:?}");
    let issuer = rsa.sign(&with(&|c| c["iss"] = json!("https://evil.example")));
    assert_refused(&server, Some(&issuer), "wrong issuer").await;
    let client = rsa.sign(&with(&|c| c["client_id"] = json!("other-client")));
    assert_refused(&server, Some(&client), "wrong client_id").await;
    let audience = rsa.sign(&with(&|c| c["aud"] = json!("other-client")));
    assert_refused(&server, Some(&audience), "wrong aud (client_id right)").await;
    let no_exp = rsa.sign(&with(&|c| {
        c.as_object_mut().unwrap().remove("exp");
    }));
    assert_refused(&server, Some(&no_exp), "no exp").await;

    // Forged: same kid, another key.
    let forger = SigningKey::generate("rsa-1", Algorithm::RS256);
    let forged = forger.sign(&access_claims(&["admin"], None));
    assert_refused(&server, Some(&forged), "signed by another key").await;
    // A valid signature with its payload swapped.
    let parts: Vec<&str> = access.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let admin_payload = b64.encode(access_claims(&["admin"], None).to_string());
    let tampered = format!("{}.{}.{}", parts[0], admin_payload, parts[2]);
    assert_refused(&server, Some(&tampered), "tampered payload").await;
    // alg none: no signature at all.
    let header = b64.encode(json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).to_string());
    let none = format!("{header}.{admin_payload}.");
    assert_refused(&server, Some(&none), "alg none").await;
    // HS256 keyed with the public key (the key-confusion forgery).
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(
        &hs_header,
        &access_claims(&["admin"], None),
        &EncodingKey::from_secret(rsa.public_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_refused(&server, Some(&confused), "HS256 with the public key").await;

    // No credentials, garbage.
    let status = assert_refused(&server, None, "no credentials").await;
    assert!(
        status.message().contains("missing credentials"),
        "{status:?}"
    );
    assert_refused(&server, Some("not-a-token"), "garbage").await;

    // Authenticated but no role of ours: PERMISSION_DENIED.
    let no_role = rsa.sign(&access_claims(&["Admins", "billing"], None));
    let status = list(&server, Some(&no_role)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    health_is_open(&server).await;
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart() {
    let old = SigningKey::generate("2026-11", Algorithm::RS256);
    let new = SigningKey::generate("2026-12", Algorithm::ES256);
    let jwks = serve_jwks(jwks_document(&[&old])).await;
    let mut config = jwt_config(&jwks.url);
    config.jwt.as_mut().unwrap().jwks_min_refresh_secs = 1;
    let server = start(config).await;
    let claims = access_claims(&["operator"], None);
    list(&server, Some(&old.sign(&claims)))
        .await
        .expect("the old key before rotation");

    *jwks.document.lock().unwrap() = jwks_document(&[&new]);
    // The new kid triggers a reload, at most one a second: poll until it is accepted.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match list(&server, Some(&new.sign(&claims))).await {
            Ok(()) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                assert!(
                    Instant::now() < deadline,
                    "the rotated key was never picked up: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // The old key is gone from the set, so its tokens no longer pass.
    assert_refused(&server, Some(&old.sign(&claims)), "the retired key").await;
}

#[tokio::test]
async fn unknown_key_ids_reload_the_jwks_at_most_once_per_interval() {
    let key = SigningKey::generate("k1", Algorithm::ES256);
    let jwks = serve_jwks(jwks_document(&[&key])).await;
    // The default: at most one reload per 30 s.
    let server = start(jwt_config(&jwks.url)).await;
    list(&server, Some(&key.sign(&access_claims(&["viewer"], None))))
        .await
        .expect("valid token");
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "the first token loads the JWKS"
    );
    for n in 0..10 {
        let stranger = SigningKey::generate(&format!("made-up-{n}"), Algorithm::ES256);
        let token = stranger.sign(&access_claims(&["admin"], None));
        assert_refused(&server, Some(&token), "unknown kid").await;
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "unknown kids within the interval must not fetch the JWKS again"
    );
}

#[tokio::test]
async fn a_jwks_file_works_too() {
    let key = SigningKey::generate("file-key", Algorithm::RS256);
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_document(&[&key])).unwrap();
    let mut jwt = JwtConfig::new(ISSUER, CLIENT_ID);
    jwt.jwks_file = Some(path);
    jwt.token_use = "access".into();
    let server = start(AuthConfig {
        jwt: Some(jwt),
        ..AuthConfig::default()
    })
    .await;
    list(
        &server,
        Some(&key.sign(&access_claims(&["viewer"], Some("acme")))),
    )
    .await
    .expect("a token signed by the file's key");
    let other = SigningKey::generate("file-key", Algorithm::RS256);
    assert_refused(
        &server,
        Some(&other.sign(&access_claims(&["viewer"], None))),
        "another key under the file's kid",
    )
    .await;
}

#[tokio::test]
async fn static_tokens_valid_wrong_and_missing() {
    let server = start(AuthConfig {
        tokens: vec![StaticTokenConfig {
            name: "ci".into(),
            sha256: instance_manager::auth::token_sha256("im-ci-7c1e0d"),
            role: Role::Operator,
            tenant: None,
        }],
        ..AuthConfig::default()
    })
    .await;
    list(&server, Some("im-ci-7c1e0d"))
        .await
        .expect("the configured token");
    let status = assert_refused(&server, Some("im-ci-7c1e0e"), "wrong token").await;
    assert!(!status.message().contains("im-ci"), "{status:?}");
    assert_refused(&server, None, "missing token").await;
    // A JWT-shaped token with no [auth.jwt] configured.
    let key = SigningKey::generate("k", Algorithm::ES256);
    assert_refused(
        &server,
        Some(&key.sign(&access_claims(&["admin"], None))),
        "a JWT without [auth.jwt]",
    )
    .await;
    health_is_open(&server).await;
}

#[test]
fn the_binary_refuses_to_start_without_authentication() {
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "table = \"auth-none\"\n").unwrap();
    let output = common::ServerProcess::run(
        ["serve", "--listen", common::ANY_PORT],
        &[
            ("IM_AUTH_DISABLED", "false"),
            ("IM_CONFIG", config.to_str().unwrap()),
        ],
        Duration::from_secs(60),
    );
    assert!(!output.status.success(), "{}", output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", output.stderr);
    let said = format!("{}{}", output.stdout, output.stderr);
    assert!(
        said.contains("no authentication configured")
            && said.contains("[auth.jwt]")
            && said.contains("auth.disabled"),
        "the message must say what to set: {said}"
    );
    assert!(!said.contains("serving gRPC"), "{said}");

    // An [auth.jwt] with a broken JWKS file is refused by name, also before serving.
    std::fs::write(
        &config,
        "table = \"auth-none\"\n[auth.jwt]\nissuer = \"https://i\"\naudience = \"c\"\njwks_file = \"/nonexistent/jwks.json\"\n",
    )
    .unwrap();
    let output = common::ServerProcess::run(
        ["serve", "--listen", common::ANY_PORT],
        &[
            ("IM_AUTH_DISABLED", "false"),
            ("IM_CONFIG", config.to_str().unwrap()),
        ],
        Duration::from_secs(60),
    );
    assert!(!output.status.success());
    let said = format!("{}{}", output.stdout, output.stderr);
    assert!(said.contains("auth.jwt.jwks_file"), "{said}");
}

#[tokio::test]
async fn the_jwks_is_reloaded_on_schedule_too() {
    let key = SigningKey::generate("k1", Algorithm::ES256);
    let jwks = serve_jwks(jwks_document(&[&key])).await;
    let mut config = jwt_config(&jwks.url);
    if let Some(jwt) = config.jwt.as_mut() {
        jwt.jwks_refresh_secs = 1;
        jwt.jwks_min_refresh_secs = 1;
    }
    let server = start(config).await;
    let token = key.sign(&access_claims(&["viewer"], None));
    list(&server, Some(&token)).await.expect("valid token");
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1);
    // Only a known kid from here on: a further fetch can come only from the schedule.
    let deadline = Instant::now() + Duration::from_secs(20);
    while jwks.fetches.load(Ordering::SeqCst) < 2 {
        list(&server, Some(&token)).await.expect("still valid");
        assert!(Instant::now() < deadline, "stale keys were never reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
